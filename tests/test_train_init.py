"""Training from other weights (--init_from=PATH), load_model's inputs, best.npz, max_time, patience,
the host-or-device batch decision and the printed log line."""
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

import npgpt.train as train_module
from npgpt import backend
from npgpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from npgpt.cli import main
from npgpt.data import fits_on_device
from npgpt.lora import LoRALinear, apply_lora, merge_lora, named_modules
from npgpt.model import GPT, GPTConfig
from npgpt.train import TrainConfig, train, load_model
from npgpt.train_helpers import batch_source

from test_train import make_char_data, tiny_cfg

QUIET = dict(log=lambda *_: None)


def char_meta(data_dir):
    return json.load(open(f"{data_dir}/meta.json"))


def trained(tmp_path, **kw):
    """A finished tiny run; returns its config."""
    cfg = tiny_cfg(tmp_path, **kw)
    train(cfg, **QUIET)
    return cfg


# ---- --init_from=PATH -------------------------------------------------------------------------------

def test_init_from_a_training_checkpoint_takes_weights_and_shape_with_a_fresh_optimizer(tmp_path):
    src = trained(tmp_path / "a")
    # n_layer/n_embd given here are ignored: the checkpoint fixes the model's shape
    cfg = tiny_cfg(tmp_path / "b", init_from=src.out_dir, n_layer=5, n_embd=64, max_iters=0, dropout=0.1)
    r = train(cfg, **QUIET)
    ck = load_checkpoint(f"{cfg.out_dir}/ckpt.npz")
    src_ck = load_checkpoint(f"{src.out_dir}/ckpt.npz")
    assert ck["iter_num"] == 0 and ck["model_config"]["n_layer"] == 2 and ck["model_config"]["dropout"] == 0.1
    for k, v in src_ck["model"].items():
        np.testing.assert_array_equal(ck["model"][k], v)
    assert r["val_loss"] == src_ck["val_loss"]                    # same weights, same eval batches
    assert ck["optimizer"]["state"] and not any(ck["optimizer"]["state"])   # fresh: no moments yet
    # and it trains on from there
    r2 = train(tiny_cfg(tmp_path / "c", init_from=src.out_dir, max_iters=10), **QUIET)
    assert r2["iter"] == 10 and r2["losses"][0] < 3.0            # far below a fresh model's ln(V)


def test_init_from_a_weights_only_checkpoint_and_resuming_it_says_what_is_missing(tmp_path, capsys):
    from npgpt.commands.convert_cmd import convert
    src = trained(tmp_path / "a")
    convert(from_ckpt=src.out_dir, to_ckpt=str(tmp_path / "w"))
    model, ck = load_model(str(tmp_path / "w"))                  # every reader takes it
    assert "optimizer" not in ck and ck["meta"]["tokenizer"] == "char"
    r = train(tiny_cfg(tmp_path / "b", init_from=str(tmp_path / "w"), max_iters=5), **QUIET)
    assert r["iter"] == 5
    with pytest.raises(CheckpointError, match=r"weights only \(no optimizer, iter_num, batch_rng\)"):
        train(tiny_cfg(tmp_path / "c", out_dir=str(tmp_path / "w"), init_from="resume"), **QUIET)
    rc = main(["train", f"--data={src.data}", f"--out_dir={tmp_path / 'w'}", "--init_from=resume",
               "--progress=false", "--no-sample"])
    err = capsys.readouterr().err
    assert rc == 2 and "weights only" in err and f"--init_from={tmp_path / 'w'}" in err


def _hf_dir(tmp_path, name, vocab, block_size, meta=None, seed=0):
    pytest.importorskip("safetensors")
    backend.seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=16))
    for p in model.parameters():                                  # not the init: every weight distinct
        p.data[...] = backend.rng().standard_normal(p.shape).astype(p.dtype) * 0.1
    return model, model.save_hf(str(tmp_path / name), meta=meta)


def test_init_from_a_hugging_face_directory_crops_the_position_table(tmp_path):
    data = make_char_data(str(tmp_path / "data"))
    meta = char_meta(data)
    hf_model, hf_dir = _hf_dir(tmp_path, "hf", meta["vocab_size"], 32, meta=meta)
    model, ck = load_model(hf_dir)                                # load_model reads HF directories too
    assert ck["meta"]["chars"] == meta["chars"] and model.config.block_size == 32
    cfg = tiny_cfg(tmp_path, init_from=hf_dir, block_size=16, max_iters=0)
    train(cfg, **QUIET)
    got = load_checkpoint(f"{cfg.out_dir}/ckpt.npz")["model"]
    want = hf_model.state_dict()
    np.testing.assert_array_equal(got["transformer.wpe.weight"], want["transformer.wpe.weight"][:16])   # crop
    for k, v in want.items():
        if k != "transformer.wpe.weight":
            np.testing.assert_array_equal(got[k], v)
    with pytest.raises(ValueError, match="exceeds the 32 positions"):
        train(tiny_cfg(tmp_path / "x", init_from=hf_dir, block_size=64), **QUIET)


def test_init_from_refuses_data_of_another_tokenizer(tmp_path, capsys):
    data = make_char_data(str(tmp_path / "data"))
    _, gpt2_dir = _hf_dir(tmp_path, "gpt2ish", 97, 32)            # no npgpt_meta.json: GPT-2's tokenizer
    with pytest.raises(ValueError, match="npgpt prepare --tokenizer gpt2"):
        train(tiny_cfg(tmp_path, init_from=gpt2_dir), **QUIET)
    rc = main(["train", f"--data={data}", f"--out_dir={tmp_path / 'o'}", f"--init_from={gpt2_dir}",
               "--progress=false", "--no-sample"])
    assert rc == 2 and "'gpt2' tokens" in capsys.readouterr().err
    other = dict(char_meta(data), chars=list("abcdefghijklmnopqrstuvwxyz"))   # another alphabet
    _, char_dir = _hf_dir(tmp_path, "other", 97, 32, meta=other)
    with pytest.raises(ValueError, match="different character sets"):
        train(tiny_cfg(tmp_path, init_from=char_dir), **QUIET)


# ---- load_model: LoRA checkpoints ---------------------------------------------------------------------

def test_load_model_merges_lora_adapters(tmp_path):
    backend.seed(3)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16))
    apply_lora(model, ["attn.c_attn", "attn.c_proj"], r=4, alpha=8)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.data[...] = backend.rng().standard_normal(p.shape).astype(p.dtype) * 0.1
    # what finetune-instruct --lora_r writes
    save_checkpoint(str(tmp_path / "ft" / "ckpt.npz"), {
        "model": model.state_dict(), "model_config": model.config.to_dict(),
        "meta": {"tokenizer": "char", "vocab_size": 20}, "lora_config": model._lora_config})
    idx = np.arange(12)[None, :] % 20
    adapted = backend.to_numpy(model.eval()(idx)[0].data)
    loaded, _ = load_model(str(tmp_path / "ft"))
    assert not any(isinstance(m, LoRALinear) for _, m in named_modules(loaded))   # a plain GPT
    got = backend.to_numpy(loaded(idx)[0].data)
    np.testing.assert_allclose(got, adapted, atol=1e-5)
    merge_lora(model)
    np.testing.assert_array_equal(got, backend.to_numpy(model(idx)[0].data))     # exactly merge_lora's weights


def test_load_model_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(str(tmp_path / "nothing"))
    save_checkpoint(str(tmp_path / "a" / "ckpt.npz"), {"lora": {}, "lora_config": {}})
    with pytest.raises(CheckpointError, match="without a model"):
        load_model(str(tmp_path / "a"))


# ---- best.npz, max_time, patience -------------------------------------------------------------------

def scripted_losses(monkeypatch, vals):
    """Make evaluation return the validation losses ``vals`` in turn (train loss = val loss)."""
    it = iter(vals)

    def fake(model, splits, cfg, seed, **kwargs):
        v = next(it)
        return {"train": v, "val": v}
    monkeypatch.setattr(train_module, "estimate_loss", fake)


def test_best_and_latest_checkpoints(tmp_path, monkeypatch):
    scripted_losses(monkeypatch, [3.0, 2.0, 1.5, 1.7, 1.8])       # evals at 0, 5, 10, 15, 20
    cfg = tiny_cfg(tmp_path)
    r = train(cfg, **QUIET)
    best, latest = load_checkpoint(f"{cfg.out_dir}/best.npz"), load_checkpoint(f"{cfg.out_dir}/ckpt.npz")
    assert (best["iter_num"], best["val_loss"], best["best_val_loss"]) == (10, 1.5, 1.5)
    assert (latest["iter_num"], latest["val_loss"], latest["best_val_loss"]) == (20, 1.8, 1.5)
    assert "optimizer" in best and "batch_rng" in best            # a full checkpoint: resumable
    assert r["best_val_loss"] == 1.5 and r["stopped"] is None
    model, _ = load_model(f"{cfg.out_dir}/best.npz")              # a checkpoint file reads too
    np.testing.assert_array_equal(model.state_dict()["transformer.wte.weight"], best["model"]["transformer.wte.weight"])


def test_patience_stops_after_evaluations_without_improvement(tmp_path, monkeypatch):
    scripted_losses(monkeypatch, [3.0, 2.0, 2.5, 2.6, 1.0])
    said = []
    r = train(tiny_cfg(tmp_path, patience=2), log=said.append)
    assert r["iter"] == 15 and r["stopped"] == "patience" and len(r["losses"]) == 15
    assert any("early stopping" in s and "2 evaluations" in s for s in said)
    ck = load_checkpoint(str(tmp_path / "out" / "ckpt.npz"))
    assert ck["iter_num"] == 15 and ck["evals_since_best"] == 2
    assert load_checkpoint(str(tmp_path / "out" / "best.npz"))["iter_num"] == 5


def test_patience_count_resumes(tmp_path, monkeypatch):
    scripted_losses(monkeypatch, [3.0, 2.0, 2.5])                 # evals at 0, 5, 10: one without improvement
    train(tiny_cfg(tmp_path, patience=2, max_iters=10), **QUIET)
    scripted_losses(monkeypatch, [2.5, 2.6])                      # at 10 again (not counted), then 15
    r = train(tiny_cfg(tmp_path, patience=2, init_from="resume"), **QUIET)
    assert r["iter"] == 15 and r["stopped"] == "patience"


def test_max_time_stops_at_the_next_iteration_and_saves(tmp_path):
    said = []
    r = train(tiny_cfg(tmp_path, max_time=1e-9, max_iters=1000), log=said.append)
    assert r["iter"] == 1 and r["stopped"] == "max_time" and len(r["losses"]) == 1 and r["val_loss"] is not None
    assert load_checkpoint(str(tmp_path / "out" / "ckpt.npz"))["iter_num"] == 1
    assert any("time budget" in s for s in said) and any(s.startswith("step 1: train loss") for s in said)


def test_new_knobs_are_validated(tmp_path):
    with pytest.raises(ValueError, match="max_time"):
        TrainConfig(max_time=-1)
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=-2)
    with pytest.raises(ValueError, match="does not exist"):
        TrainConfig(init_from=str(tmp_path / "nope"))


# ---- batches on the device or from the host ---------------------------------------------------------

def test_fits_on_device_decision():
    assert fits_on_device(4 * 10**9, 10 * 10**9)
    assert not fits_on_device(6 * 10**9, 10 * 10**9)
    assert fits_on_device(0, 0) and not fits_on_device(1, 0)
    assert fits_on_device(9, 10, fraction=0.9) and not fits_on_device(10, 10, fraction=0.9)


def test_batch_source_falls_back_to_the_host_when_the_split_is_too_big(tmp_path, monkeypatch):
    """The CuPy branch's decision, on NumPy: a GPU reporting 1 KB free gets host batches, with a message."""
    fake_xp = SimpleNamespace(cuda=SimpleNamespace(Device=lambda: SimpleNamespace(mem_info=(1000, 2000))))
    monkeypatch.setattr(backend, "name", "cupy")
    monkeypatch.setattr(backend, "xp", fake_xp)
    said = []
    data = np.arange(1000, dtype=np.uint16)                        # 4000 bytes as int32
    next_batch = batch_source(data, tiny_cfg(tmp_path), 0, np.random.default_rng(0), said.append)
    monkeypatch.undo()
    assert len(said) == 1 and "on the host" in said[0]
    x, y = next_batch()
    assert x.shape == (4, 16) and np.array_equal(backend.to_numpy(y), backend.to_numpy(x) + 1)


# ---- the printed log line ---------------------------------------------------------------------------

def test_log_line_is_printed_without_the_progress_bar(tmp_path, capsys):
    data = make_char_data(str(tmp_path / "d"))
    rc = main(["train", f"--data={data}", f"--out_dir={tmp_path / 'o'}", "--n_layer=1", "--n_head=2",
               "--n_embd=16", "--block_size=16", "--batch_size=2", "--max_iters=4", "--eval_interval=4",
               "--eval_iters=1", "--log_interval=2", "--progress=false", "--no-sample"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = re.findall(r"^iter (\d+): loss \d+\.\d{4}, time \d+\.\dms, tok/s [\d,]+, mfu \d+\.\d%$", out, re.M)
    assert lines == ["2", "4"]
    assert "best.npz" in out
