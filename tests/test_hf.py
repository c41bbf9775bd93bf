"""Hugging Face GPT-2 checkpoints: exact round trip, key handling and errors, transformers parity
(logits and gradients, both directions), conversion commands, ``npgpt sample --hf``."""
import json
import os

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, backend
from npgpt.cli import main
from npgpt.hf import HFCheckpointError, from_hf, save_hf

safetensors_numpy = pytest.importorskip("safetensors.numpy")

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32)


def random_model(seed=0, eps=1e-5, **kw):
    """A tiny GPT with every parameter random (LayerNorm weights and all biases too)."""
    backend.use("numpy")
    backend.seed(seed)
    m = GPT(GPTConfig(**{**TINY, **kw}))
    rng = np.random.default_rng(seed)
    for name, p in m.named_parameters():
        p.data[...] = rng.standard_normal(p.shape).astype(p.dtype) * (0.5 if "ln" in name else 0.1)
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            p.data += 1
    for m_ in _layer_norms(m):
        m_.eps = eps
    return m.eval()


def _layer_norms(m):
    from npgpt.nn import LayerNorm
    out, todo = [], [m]
    while todo:
        x = todo.pop()
        if isinstance(x, LayerNorm):
            out.append(x)
        todo.extend(c for _, c in x.named_children())
    return out


def write_hf(path, tensors, config=None):
    os.makedirs(path, exist_ok=True)
    safetensors_numpy.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = {"model_type": "gpt2", "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 97,
           "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg, **(config or {})}, f)
    return str(path)


# --- without transformers ---

def test_save_load_round_trip_is_exact(tmp_path):
    m = random_model(eps=1e-3)
    save_hf(m, str(tmp_path / "hf"))
    m2 = GPT.from_hf(str(tmp_path / "hf"))
    assert m2.config == m.config
    a, b = m.state_dict(), m2.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32 and b[k].flags.c_contiguous
        assert np.array_equal(a[k], b[k]), k
    assert {ln.eps for ln in _layer_norms(m2)} == {1e-3}
    x = np.random.default_rng(0).integers(0, 97, (2, 32))
    assert np.array_equal(m(x)[0].data, m2(x)[0].data)
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["n_positions"] == cfg["n_ctx"] == 32 and cfg["layer_norm_epsilon"] == 1e-3
    assert cfg["activation_function"] == "gelu_new" and cfg["tie_word_embeddings"] is True


def test_load_with_dtype(tmp_path):
    m = random_model()
    save_hf(m, str(tmp_path))
    m64 = from_hf(str(tmp_path), dtype="float64")
    assert all(p.dtype == np.float64 for p in m64.parameters())
    assert backend.get_default_dtype() == np.float32           # the default is restored
    np.testing.assert_array_equal(m64.state_dict()["transformer.wte.weight"], m.state_dict()["transformer.wte.weight"])


def test_unprefixed_keys_buffers_and_tied_head(tmp_path):
    """The hub's gpt2 file: no ``transformer.`` prefix, causal-mask buffers, sometimes an lm_head copy."""
    m = random_model(seed=1)
    sd = {k[len("transformer."):]: v for k, v in m.state_dict().items()}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = np.tril(np.ones((32, 32), np.float32))[None, None]
        sd[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    sd["lm_head.weight"] = sd["wte.weight"].copy()
    m2 = from_hf(write_hf(tmp_path / "a", sd))
    for k, v in m.state_dict().items():
        assert np.array_equal(m2.state_dict()[k], v)
    sd["lm_head.weight"] = sd["wte.weight"] + 1
    with pytest.raises(HFCheckpointError, match="lm_head.weight differs"):
        from_hf(write_hf(tmp_path / "b", sd))


def test_float16_file_loads_as_float32(tmp_path):
    m = random_model()
    sd = {k: v.astype(np.float16) for k, v in m.state_dict().items()}
    m2 = from_hf(write_hf(tmp_path, sd))
    assert m2.transformer.wte.weight.dtype == np.float32
    np.testing.assert_array_equal(m2.state_dict()["transformer.h.0.attn.c_attn.weight"],
                                  sd["transformer.h.0.attn.c_attn.weight"].astype(np.float32))


def test_missing_unexpected_misshaped_keys_in_one_error(tmp_path):
    sd = random_model().state_dict()
    del sd["transformer.h.1.mlp.c_fc.bias"]
    sd["transformer.h.0.attn.q_proj.weight"] = np.zeros((32, 32), np.float32)
    sd["transformer.wpe.weight"] = np.zeros((16, 32), np.float32)
    with pytest.raises(HFCheckpointError) as e:
        from_hf(write_hf(tmp_path, sd))
    msg = str(e.value)
    assert "missing keys ['transformer.h.1.mlp.c_fc.bias']" in msg
    assert "unexpected keys ['transformer.h.0.attn.q_proj.weight']" in msg
    assert "transformer.wpe.weight: file (16, 32) vs model (32, 32)" in msg


def test_directory_errors_say_what_is_needed(tmp_path):
    with pytest.raises(HFCheckpointError, match="not a directory"):
        from_hf(str(tmp_path / "nowhere"))
    with pytest.raises(HFCheckpointError, match="no config.json.*safetensors is required"):
        from_hf(str(tmp_path))
    d = tmp_path / "bin"
    write_hf(d, {"x": np.zeros(1, np.float32)})
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02not loaded")
    with pytest.raises(HFCheckpointError, match="pytorch_model.bin.*safetensors weights are required"):
        from_hf(str(d))
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(HFCheckpointError, match="not a readable safetensors file"):
        from_hf(str(d))


@pytest.mark.parametrize("change,msg", [({"model_type": "llama"}, "model_type"),
                                        ({"activation_function": "relu"}, "activation_function"),
                                        ({"n_inner": 64}, "n_inner"),
                                        ({"n_head": None}, "n_head")])
def test_unsupported_configs(tmp_path, change, msg):
    d = write_hf(tmp_path, random_model().state_dict(), change)
    with pytest.raises(HFCheckpointError, match=msg):
        from_hf(d)


@pytest.mark.parametrize("kw,msg", [({"bias": False}, "bias=False"), ({"pos": "sinusoidal"}, "sinusoidal")])
def test_models_gpt2_cannot_represent_are_refused(tmp_path, kw, msg):
    backend.use("numpy")
    m = GPT(GPTConfig(**{**TINY, **kw}))
    with pytest.raises(HFCheckpointError, match=msg):
        m.save_hf(str(tmp_path))
    assert not os.path.exists(tmp_path / "model.safetensors")


def test_convert_commands_round_trip(tmp_path, capsys):
    from npgpt.checkpoint import save_checkpoint
    from npgpt.train import load_model
    m = random_model(seed=2)
    meta = {"tokenizer": "char", "chars": [chr(32 + i) for i in range(97)], "vocab_size": 97}
    save_checkpoint(str(tmp_path / "ck" / "ckpt.npz"),
                    {"model": m.state_dict(), "model_config": m.config.to_dict(), "meta": meta})
    assert main(["convert", "--from-ckpt", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf")]) == 0
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--to-ckpt", str(tmp_path / "ck2")]) == 0
    m2, ck = load_model(str(tmp_path / "ck2"))
    assert ck["meta"] == meta                                   # the char tokenizer travels in npgpt_meta.json
    for k, v in m.state_dict().items():
        assert np.array_equal(m2.state_dict()[k], v)
    os.remove(tmp_path / "hf" / "npgpt_meta.json")              # a plain HF directory: GPT-2's tokenizer
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--to-ckpt", str(tmp_path / "ck3")]) == 0
    assert load_model(str(tmp_path / "ck3"))[1]["meta"] == {"tokenizer": "gpt2", "vocab_size": 97}
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(tmp_path / "nope"), "--to-ckpt", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and "Traceback" not in err


def test_sample_hf_uses_gpt2_tokenizer_and_kv_cache(tmp_path, capsys, monkeypatch):
    """``npgpt sample --hf``: a GPT-2-vocabulary model, the GPT-2 tokenizer, cached and uncached agree."""
    from npgpt.tokenizer import get_encoding
    backend.use("numpy")
    backend.seed(0)
    m = GPT(GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=8))
    save_hf(m, str(tmp_path))
    args = ["sample", "--hf", str(tmp_path), "--start", "Hello world", "--max_new_tokens", "5", "--temperature", "0"]
    assert main(args) == 0
    cached = capsys.readouterr().out
    assert main(args + ["--no-cache"]) == 0
    assert capsys.readouterr().out == cached and cached.startswith("Hello world")
    enc = get_encoding("gpt2")
    x = np.asarray(enc.encode("Hello world"))[None]
    want = enc.decode([int(t) for t in m.generate(x, 5, temperature=0)[0]])
    assert cached.strip("\n") == want.strip("\n")


# --- transformers parity ---

@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=97,
                                  layer_norm_epsilon=1e-3, bos_token_id=0, eos_token_id=0)
    t = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf")
    t.save_pretrained(str(d), safe_serialization=True)
    return t, str(d)


def test_logits_and_gradients_match_transformers(hf_model):
    import torch
    t, d = hf_model
    m = from_hf(d)
    assert {ln.eps for ln in _layer_norms(m)} == {1e-3}
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 97, (3, 32)), rng.integers(0, 97, (3, 32))
    logits, loss = m(x, y)
    loss.backward()
    tl = t(torch.tensor(x)).logits
    tloss = torch.nn.functional.cross_entropy(tl.reshape(-1, 97), torch.tensor(y).reshape(-1))
    t.zero_grad()
    tloss.backward()
    assert np.abs(logits.data - tl.detach().numpy()).max() <= 1e-4
    assert abs(loss.item() - tloss.item()) <= 1e-5
    tgrads = dict(t.named_parameters())
    worst = 0.0
    for name, p in m.named_parameters():
        g_t = tgrads[name].grad.numpy()                 # wte's grad includes the tied LM head's
        worst = max(worst, np.linalg.norm(p.grad - g_t) / np.linalg.norm(g_t))
    assert worst <= 1e-3


def test_export_loads_in_transformers_with_equal_logits(tmp_path, hf_model):
    import torch
    import transformers
    m = random_model(seed=5, eps=1e-4)
    m.save_hf(str(tmp_path))
    t, info = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert t.config.layer_norm_epsilon == 1e-4
    x = np.random.default_rng(1).integers(0, 97, (2, 32))
    with torch.no_grad():
        tl = t.eval()(torch.tensor(x)).logits.numpy()
    assert np.abs(m(x)[0].data - tl).max() <= 1e-4


# --- memory (slow: writes and loads a 500 MB file) ---

@pytest.mark.slow
def test_124m_load_peak_memory_below_twice_the_weights(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from bench_hf_memory import write_checkpoint, measure
    write_checkpoint(str(tmp_path))
    before, peak, weights, _ = measure(str(tmp_path))
    assert weights > 400e6
    assert peak - before < 2.0 * weights
