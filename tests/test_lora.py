"""LoRA: the fused node's gradients, zero-init equivalence, freezing, merging and adapter files."""
import numpy as np
import pytest

from npgpt import backend
from npgpt.checkpoint import CheckpointError, save_checkpoint
from npgpt.engine import Tensor
from npgpt.gradcheck import gradcheck
from npgpt.lora import (LoRALinear, apply_lora, load_lora, lora_linear, lora_parameters, merge_lora,
                        save_lora, trainable_parameters)
from npgpt.model import GPT, GPTConfig
from npgpt.nn import Linear
from npgpt.optim import AdamW

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc")


def tiny_gpt(seed=0, **kw):
    backend.seed(seed)
    cfg = dict(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def ids(B=2, T=10, V=23, seed=1):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def randomize_adapters(model, seed=2, std=0.1):
    r = np.random.default_rng(seed)
    for p in lora_parameters(model).values():
        p.data[...] = r.normal(0, std, p.shape).astype(p.dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_gradcheck_float64(bias):
    r = np.random.default_rng(0)
    inputs = [r.normal(size=(2, 3, 5)), r.normal(size=(5, 4)), r.normal(size=(4,)) if bias else None,
              r.normal(size=(5, 2)), r.normal(size=(2, 4))]
    if bias:
        assert gradcheck(lambda x, W, b, A, B: lora_linear(x, W, b, A, B, 1.5), inputs)
    else:
        assert gradcheck(lambda x, W, A, B: lora_linear(x, W, None, A, B, 1.5),
                         [inputs[0], inputs[1], inputs[3], inputs[4]])


def test_lora_linear_gradcheck_with_dropout():
    """The same mask in every call (the RNG is reseeded), so finite differences see one function."""
    r = np.random.default_rng(3)

    def f(x, W, b, A, B):
        backend.seed(7)
        return lora_linear(x, W, b, A, B, 2.0, dropout_p=0.4)
    assert gradcheck(f, [r.normal(size=(4, 6)), r.normal(size=(6, 3)), r.normal(size=(3,)),
                         r.normal(size=(6, 2)), r.normal(size=(2, 3))])


def test_lora_linear_matches_composition_and_keeps_float32():
    r = np.random.default_rng(0)
    x, W, b = r.normal(size=(3, 4, 8)), r.normal(size=(8, 5)), r.normal(size=(5,))
    A, B = r.normal(size=(8, 2)), r.normal(size=(2, 5))
    ts = [Tensor(a.astype(np.float32), requires_grad=True) for a in (x, W, b, A, B)]
    y = lora_linear(*ts, 0.5)
    assert y.dtype == np.float32 and y.shape == (3, 4, 5)
    np.testing.assert_allclose(y.data, x @ W + b + 0.5 * (x @ A) @ B, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert all(t.grad.dtype == np.float32 for t in ts)


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_equals_its_composed_reference(bias):
    """Forward and every gradient of the one-node layer equal (R2) composed from engine ops (float64)."""
    from npgpt.layers.lora import lora_linear_reference
    r = np.random.default_rng(1)
    arrays = [r.normal(size=(2, 3, 6)), r.normal(size=(6, 4)), r.normal(size=(4,)), r.normal(size=(6, 2)),
              r.normal(size=(2, 4))]
    dout = r.normal(size=(2, 3, 4))
    results = []
    for fn in (lora_linear, lora_linear_reference):
        ts = [Tensor(a, requires_grad=True) for a in arrays]
        if not bias:
            ts[2] = None
        y = fn(*ts, 0.75)
        y.backward(dout)
        results.append([y.data] + [t.grad for t in ts if t is not None])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_zero_B_gives_the_base_models_logits():
    base = tiny_gpt()
    before = base(ids())[0].data.copy()
    hits = apply_lora(base, TARGETS, r=4, alpha=8)
    assert len(hits) == 6 and isinstance(base.transformer.h[0].attn.c_attn, LoRALinear)
    np.testing.assert_array_equal(base(ids())[0].data, before)


def test_only_adapters_train_and_base_weights_stay_put():
    m = tiny_gpt()
    apply_lora(m, TARGETS, r=4, alpha=8)
    base = {n: p.data.copy() for n, p in m.named_parameters() if "lora_" not in n}
    params = trainable_parameters(m)
    assert {id(p) for p in params} == {id(p) for p in lora_parameters(m).values()}
    opt = AdamW(params, lr=1e-2)
    x = ids()
    for _ in range(2):
        _, loss = m(x, np.roll(x, -1, axis=1))
        loss.backward()
        for n, p in m.named_parameters():
            assert (p.grad is not None) == ("lora_" in n), n
        opt.step()
        opt.zero_grad()
    for n, p in m.named_parameters():
        if "lora_" not in n:
            np.testing.assert_array_equal(p.data, base[n])
    assert np.abs(m.transformer.h[0].attn.c_attn.lora_B.data).max() > 0


def test_merge_gives_the_same_logits():
    m = tiny_gpt()
    apply_lora(m, TARGETS, r=4, alpha=8)
    randomize_adapters(m)
    adapted = m(ids())[0].data.copy()
    assert merge_lora(m) == 6
    assert type(m.transformer.h[1].mlp.c_fc) is Linear and not lora_parameters(m)
    np.testing.assert_allclose(m(ids())[0].data, adapted, atol=1e-5)


def test_save_load_adapters_round_trip(tmp_path):
    m = tiny_gpt()
    apply_lora(m, ("attn.c_attn",), r=3, alpha=6)
    randomize_adapters(m)
    want = m(ids())[0].data.copy()
    save_lora(m, str(tmp_path / "adapter.npz"))
    fresh = tiny_gpt()                          # the same base weights, no adapters yet
    load_lora(fresh, str(tmp_path / "adapter.npz"))
    assert fresh.transformer.h[0].attn.c_attn.r == 3
    np.testing.assert_array_equal(fresh(ids())[0].data, want)


def test_adapter_errors(tmp_path):
    m = tiny_gpt()
    with pytest.raises(ValueError, match="no Linear layer matches"):
        apply_lora(m, ("attn.nothing",))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_lora(m, str(tmp_path / "a.npz"))
    apply_lora(m, ("attn.c_attn",), r=2)
    save_lora(m, str(tmp_path / "a.npz"))
    wider = tiny_gpt(n_embd=32)
    with pytest.raises(ValueError, match="do not fit"):
        load_lora(wider, str(tmp_path / "a.npz"))
    save_checkpoint(str(tmp_path / "other.npz"), {"x": np.zeros(2)})
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        load_lora(tiny_gpt(), str(tmp_path / "other.npz"))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(Linear(4, 4), r=0)


def test_lora_dropout_only_in_training():
    m = tiny_gpt()
    apply_lora(m, ("attn.c_attn",), r=2, dropout=0.5)
    randomize_adapters(m)
    m.eval()
    a, b = m(ids())[0].data.copy(), m(ids())[0].data.copy()
    np.testing.assert_array_equal(a, b)
    m.train()
    assert not np.allclose(m(ids())[0].data, a)
