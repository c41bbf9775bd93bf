"""Vocabulary padding (``GPTConfig.vocab_multiple``): the padded model computes exactly what the
unpadded one does (loss, logits, gradients, training steps, samples); the padding logits are masked
out of the loss and never sampled even when their rows are not zero; checkpoints, state dicts and
Hugging Face exports hold the real vocabulary only and load back padded; training's auto choice."""
import os

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, Tensor, backend, gradcheck
from npgpt import functional as F
from npgpt.checkpoint import load_checkpoint
from npgpt.layers.cross_entropy import cross_entropy_reference
from npgpt.train import TrainConfig, train
from test_train import tiny_cfg

V, MULTIPLE = 13, 8            # 13 real tokens, padded to 16


def model_pair(xp, dtype=np.float64):
    """(unpadded, padded) GPTs from the same seed: the real rows draw the same random numbers."""
    models = []
    for multiple in (1, MULTIPLE):
        backend.seed(0)
        with backend.default_dtype(dtype):
            models.append(GPT(GPTConfig(vocab_size=V, block_size=8, n_layer=2, n_head=2, n_embd=16,
                                        vocab_multiple=multiple)))
    return models


def batch(seed=0, B=3, T=8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


# ---- the loss -----------------------------------------------------------------------------------

def test_cross_entropy_ignores_padding_columns(xp, f64):
    """cross_entropy(padded, vocab_size=V) == cross_entropy(real columns): loss and gradient, the
    padding columns' gradient exactly 0, whatever values they hold (even huge ones)."""
    rng = np.random.default_rng(1)
    real = rng.normal(size=(4, 5, V))
    padded = np.concatenate([real, rng.normal(size=(4, 5, 3)) * 50 + 100], -1)   # (4, 5, 16) loud padding
    t = rng.integers(0, V, (4, 5))
    t[0, 0] = -100
    a, b = Tensor(xp.asarray(real), requires_grad=True), Tensor(xp.asarray(padded), requires_grad=True)
    la, lb = F.cross_entropy(a, t), F.cross_entropy(b, t, vocab_size=V)
    la.backward()
    lb.backward()
    assert float(la.data) == pytest.approx(float(lb.data), abs=1e-13)
    np.testing.assert_allclose(backend.to_numpy(b.grad)[..., :V], backend.to_numpy(a.grad), atol=1e-15)
    assert not backend.to_numpy(b.grad)[..., V:].any()
    ref = cross_entropy_reference(Tensor(padded), t, vocab_size=V)
    assert float(lb.data) == pytest.approx(float(ref.data), abs=1e-12)
    assert gradcheck(lambda x: F.cross_entropy(x, t[:2, :2], vocab_size=V), [Tensor(padded[:2, :2], requires_grad=True)])
    with pytest.raises(ValueError, match="vocab_size"):
        F.cross_entropy(b, t, vocab_size=17)


def test_padded_model_is_the_unpadded_model(xp):
    """Same seed: identical real weights, logits (B, T, V), loss and gradients; the padding rows are
    zero and get zero gradient; num_params counts the real rows only."""
    plain, padded = model_pair(xp)
    wte = padded.transformer.wte.weight
    assert wte.shape == (16, 16) and padded.config.padded_vocab_size == 16
    assert not backend.to_numpy(wte.data)[V:].any()
    assert plain.num_params() == padded.num_params()
    x, y = batch()
    (la_logits, la), (lb_logits, lb) = plain(x, y), padded(x, y)
    assert lb_logits.shape == (3, 8, V)
    np.testing.assert_allclose(backend.to_numpy(lb_logits.data), backend.to_numpy(la_logits.data), atol=1e-13)
    assert float(lb.data) == pytest.approx(float(la.data), abs=1e-13)
    la.backward()
    lb.backward()
    grads = dict(padded.named_parameters())
    for name, p in plain.named_parameters():
        g = backend.to_numpy(grads[name].grad)
        if name == "transformer.wte.weight":
            assert not g[V:].any()
            g = g[:V]
        np.testing.assert_allclose(g, backend.to_numpy(p.grad), atol=1e-12, err_msg=name)


def test_training_steps_keep_padding_zero_and_match(xp):
    """Five AdamW steps with weight decay (flat buffers, clipping): the real weights stay equal to the
    unpadded model's and the padding rows stay exactly zero."""
    models = model_pair(xp)
    opts = [m.configure_optimizer(1e-2, 0.1, flat=True, max_grad_norm=1.0) for m in models]
    for step in range(5):
        x, y = batch(step)
        for m, opt in zip(models, opts):
            opt.backward(m(x, y)[1])
            opt.step()
            opt.zero_grad()
    plain, padded = (m.state_dict() for m in models)
    assert set(plain) == set(padded)
    for name in plain:
        np.testing.assert_allclose(padded[name], plain[name], atol=1e-10, err_msg=name)
    assert not backend.to_numpy(models[1].transformer.wte.weight.data)[V:].any()


def test_samples_never_draw_padding(xp):
    """Identical samples from both models; with the padding rows made loud (they would win every
    argmax if they reached the sampler), greedy and random samples still stay below V."""
    plain, padded = model_pair(xp)
    prompt = np.array([[1, 2, 3]])
    a = backend.to_numpy(plain.generate(prompt, 5, temperature=1.0, seed=3))
    b = backend.to_numpy(padded.generate(prompt, 5, temperature=1.0, seed=3))
    np.testing.assert_array_equal(a, b)
    wte = padded.transformer.wte.weight.data
    wte[V:] = xp.asarray(backend.to_numpy(wte)[:V].sum(0) * 100)   # pad rows aligned with all: huge logits
    for temperature in (0.0, 1.0, 5.0):
        out = backend.to_numpy(padded.generate(prompt, 6, temperature=temperature, seed=4))
        assert out.max() < V


# ---- checkpoints and exports --------------------------------------------------------------------

def test_state_dict_hides_padding_and_loads_back():
    plain, padded = model_pair(np)
    state = padded.state_dict()
    assert state["transformer.wte.weight"].shape == (V, 16)
    fresh = model_pair(np)[1]
    fresh.transformer.wte.weight.data[...] = 7.0
    fresh.load_state_dict(state)                              # (V, C) into a (16, C) table: zero padding
    table = fresh.transformer.wte.weight.data
    np.testing.assert_array_equal(table[:V], state["transformer.wte.weight"])
    assert not table[V:].any()
    plain.load_state_dict(state)                              # and into the unpadded model
    fresh.load_state_dict({k: p.data for k, p in padded.named_parameters()})   # an already padded table
    np.testing.assert_array_equal(fresh.transformer.wte.weight.data, padded.transformer.wte.weight.data)


def test_hf_export_has_no_padding(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file
    _, padded = model_pair(np, np.float32)
    padded.save_hf(str(tmp_path / "hf"))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert tensors["transformer.wte.weight"].shape == (V, 16)
    back = GPT.from_hf(str(tmp_path / "hf"))
    assert back.config.vocab_size == V and back.transformer.wte.weight.shape == (V, 16)
    x, _ = batch()
    np.testing.assert_allclose(back(x)[0].data, padded(x)[0].data, atol=1e-5)


def test_training_run_checkpoint_holds_the_real_vocabulary(tmp_path):
    """``npgpt train`` with vocab_multiple=64 (float16 master weights: the path that strips the
    master copy): ckpt.npz holds (V, C), the config records the multiple, resume continues."""
    log = lambda *_: None                                     # noqa: E731
    cfg = tiny_cfg(tmp_path, vocab_multiple=64, max_iters=4, eval_interval=2, dtype="float16")
    train(cfg, log=log)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.npz"))
    V_data = ckpt["meta"]["vocab_size"]
    assert ckpt["model"]["transformer.wte.weight"].shape == (V_data, 16)
    assert ckpt["model_config"]["vocab_multiple"] == 64
    resumed = train(tiny_cfg(tmp_path, vocab_multiple=64, max_iters=6, eval_interval=2, dtype="float16",
                             init_from="resume"), log=log)
    assert resumed["iter"] == 6


def test_auto_padding_choice():
    assert TrainConfig(device="cuda").padding_multiple() == 64
    assert TrainConfig(device="cpu").padding_multiple() == 1
    assert TrainConfig(device="cpu", vocab_multiple=8).model_config(50257).padded_vocab_size == 50264
    assert GPTConfig(vocab_size=50257, vocab_multiple=64).padded_vocab_size == 50304
    with pytest.raises(ValueError, match="vocab_multiple"):
        TrainConfig(vocab_multiple=-1)
    with pytest.raises(ValueError, match="vocab_multiple"):
        GPTConfig(vocab_multiple=0)
