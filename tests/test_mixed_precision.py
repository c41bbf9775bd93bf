"""Flat parameter/gradient buffers and FlatAdamW (fp32 and fp16 mixed precision with dynamic loss
scaling). Expected values come from the per-parameter AdamW + clip_grad_norm (themselves checked
against hand-computed updates and torch in test_optim.py) and from the update formulas."""
import math

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, backend
from npgpt.engine import Tensor
from npgpt.optim import FlatAdamW, FlatParameters, clip_grad_norm

TINY = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=24, dropout=0.0)


def _batch(B=3, T=16, V=37, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def _model(seed=0, **kw):
    backend.seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw}))


def test_flat_parameters_are_views_and_grads_land_in_the_buffer(xp):
    model = _model()
    before = {n: backend.to_numpy(p.data).copy() for n, p in model.named_parameters()}
    flat = FlatParameters([model.parameters()])
    assert flat.size == model.num_params()
    for (n, p), o in zip(model.named_parameters(), flat.offsets):
        np.testing.assert_array_equal(backend.to_numpy(p.data), before[n])           # values kept
        p.data[...] += 1                                                              # a view...
        assert float(flat.data[o]) == pytest.approx(float(before[n].reshape(-1)[0]) + 1)  # ...of the buffer
        p.data[...] -= 1
    x, y = _batch()
    _, loss = model(x, y)
    loss.backward()
    total = sum(float(xp.abs(p.grad).sum()) for p in model.parameters())
    assert total > 0 and float(xp.abs(flat.grad).sum()) == pytest.approx(total, rel=1e-5)
    g1 = flat.grad.copy()
    _, loss = model(x, y)
    loss.backward()                                   # accumulates in place
    np.testing.assert_allclose(backend.to_numpy(flat.grad), 2 * backend.to_numpy(g1), rtol=1e-5, atol=1e-7)
    model.zero_grad()                                 # per parameter: zeros, not None
    assert all(p.grad is not None for p in model.parameters())
    assert float(xp.abs(flat.grad).max()) == 0.0
    model.load_state_dict({n: v + 0.5 for n, v in before.items()})  # writes through the views
    np.testing.assert_allclose(backend.to_numpy(flat.data[:3]), before["transformer.wte.weight"].reshape(-1)[:3] + 0.5)


def test_flat_parameters_reject_bad_input():
    a = Tensor(np.ones(3, np.float32), requires_grad=True)
    with pytest.raises(ValueError, match="more than once"):
        FlatParameters([[a, a]])
    with pytest.raises(TypeError, match="leaf"):
        FlatParameters([[a * 2]])
    FlatParameters([[a]])
    with pytest.raises(ValueError, match="already a view"):
        FlatParameters([[a]])
    with pytest.raises(ValueError, match="no parameters"):
        FlatParameters([[]])


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_flat_adamw_equals_per_parameter_adamw_and_clip(xp, clip):
    ref, new = _model(), _model()
    opt_ref = ref.configure_optimizer(3e-3, 0.1, (0.9, 0.95))
    opt_new = new.configure_optimizer(3e-3, 0.1, (0.9, 0.95), flat=True, max_grad_norm=clip)
    for step in range(4):
        x, y = _batch(seed=step)
        for m, o in ((ref, opt_ref), (new, opt_new)):
            _, loss = m(x, y)
            loss.backward()
            if m is ref and clip:
                norm = clip_grad_norm(m.parameters(), clip)
            o.step()
            o.zero_grad()
        if clip:
            assert float(opt_new.grad_norm) == pytest.approx(norm, rel=1e-4)
    for (n, a), (_, b) in zip(ref.named_parameters(), new.named_parameters()):
        # Adam's m/sqrt(v) is +-1 for any tiny gradient, so a near-zero gradient that differs in its last
        # bits (another summation order on the GPU) moves a weight by up to lr per step: atol ~ 1e-3 lr
        np.testing.assert_allclose(backend.to_numpy(b.data), backend.to_numpy(a.data), rtol=1e-5, atol=2e-5, err_msg=n)


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_flat_adamw_cuda_kernel_matches_array_code(xp, dtype, monkeypatch):
    """The one AdamW kernel (with and without an fp32 master copy) against the array code on CuPy,
    including a skipped (inf) step. Both optimizers get the same gradients (the kernel model's, copied):
    some gradients are pure rounding noise (the key bias's: softmax ignores a constant added to a row
    of scores), which GPU reductions need not reproduce run to run, and Adam turns noise into +-lr steps."""
    if xp is np:
        pytest.skip("the AdamW CUDA kernel is CuPy's; NumPy always runs the array code")
    models = [_model(), _model()]
    opts = [m.configure_optimizer(3e-3, 0.1, (0.9, 0.95), dtype=dtype, flat=True, max_grad_norm=1.0)
            for m in models]
    for step in range(4):
        x, y = _batch(seed=step)
        _, loss = models[0](x, y)
        opts[0].backward(loss)
        opts[1].flat.grad[...] = opts[0].flat.grad
        for i, o in enumerate(opts):
            if dtype and step == 2:
                o.flat.grad[7] = np.inf
            monkeypatch.setenv("NPGPT_CUDA_KERNELS", "1" if i == 0 else "0")   # for the step only
            o.step()
            monkeypatch.delenv("NPGPT_CUDA_KERNELS")
            o.zero_grad()
    a, b = opts
    assert a.skipped_steps == b.skipped_steps == (1 if dtype else 0) and int(a._t) == int(b._t)
    for u, v in ((a.master, b.master), (a.exp_avg, b.exp_avg), (a.exp_avg_sq, b.exp_avg_sq)):
        np.testing.assert_allclose(backend.to_numpy(u), backend.to_numpy(v), rtol=1e-5, atol=2e-5)
    np.testing.assert_array_equal(backend.to_numpy(a.flat.data),
                                  backend.to_numpy(a.master).astype(a.flat.data.dtype))  # param = its master


def test_flat_adamw_one_step_by_hand():
    """One scalar parameter, g = 2p (loss p^2), lr 0.1, wd 0.5, clip to 1: every quantity by hand."""
    p = Tensor(np.array([3.0]), requires_grad=True)
    opt = FlatAdamW([p], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5, max_grad_norm=1.0)
    (p * p).sum().backward()                          # g = 6, norm 6 -> clipped to 1/(6+1e-6)*6
    opt.step()
    G = 6.0 * 1.0 / (6.0 + 1e-6)
    m, v = 0.1 * G, 0.01 * G * G
    expect = 3.0 * (1 - 0.1 * 0.5) - 0.1 / 0.1 * m / (math.sqrt(v) / math.sqrt(0.01) + 1e-8)
    assert float(p.data[0]) == pytest.approx(expect, rel=1e-12)
    assert float(opt.grad_norm) == pytest.approx(6.0)


def test_fp16_mixed_precision_keeps_fp32_master_and_tracks_fp32_training(xp):
    ref, amp = _model(), _model()
    opt_ref = ref.configure_optimizer(1e-2, 0.1, (0.9, 0.95), flat=True, max_grad_norm=1.0)
    opt_amp = amp.configure_optimizer(1e-2, 0.1, (0.9, 0.95), dtype="float16", max_grad_norm=1.0,
                                      init_scale=2.0 ** 10)
    assert all(p.dtype == np.float16 for p in amp.parameters())
    assert opt_amp.master.dtype == np.float32 and opt_amp.exp_avg.dtype == np.float32
    losses = {id(ref): [], id(amp): []}
    x, y = _batch()                                     # one batch, learned by heart
    for step in range(12):
        for m, o in ((ref, opt_ref), (amp, opt_amp)):
            _, loss = m(x, y)
            assert loss.dtype == np.float32
            o.backward(loss)
            o.step()
            o.zero_grad()
            losses[id(m)].append(float(loss.item()))
    assert opt_amp.skipped_steps == 0
    # the fp16 weights are the rounded master weights
    for p, w in zip(opt_amp.flat.params, opt_amp.flat.views(opt_amp.master)):
        np.testing.assert_array_equal(backend.to_numpy(p.data), backend.to_numpy(w).astype(np.float16))
    r, a = np.array(losses[id(ref)]), np.array(losses[id(amp)])
    assert r[-1] < r[0] - 0.3                           # fp32 learns...
    np.testing.assert_allclose(a, r, atol=0.03)         # ...and fp16 follows it within fp16 noise


def test_dynamic_loss_scaling_skips_non_finite_steps_and_regrows(xp):
    model = _model()
    opt = model.configure_optimizer(1e-3, 0.1, dtype="float16", init_scale=2.0 ** 8, growth_interval=3)
    x, y = _batch()
    master0 = backend.to_numpy(opt.master).copy()
    _, loss = model(x, y)
    opt.backward(loss)
    opt.flat.grad[5] = np.inf                           # an overflowed gradient
    opt.step()
    opt.zero_grad()
    np.testing.assert_array_equal(backend.to_numpy(opt.master), master0)    # nothing moved
    assert float(xp.abs(opt.exp_avg).max()) == 0.0
    assert opt.skipped_steps == 1 and opt.loss_scale == 2.0 ** 7
    for i in range(3):
        _, loss = model(x, y)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        assert opt.loss_scale == (2.0 ** 8 if i == 2 else 2.0 ** 7)       # doubled after 3 good steps
    assert int(opt._t) == 3 and opt.skipped_steps == 1
    assert not np.array_equal(backend.to_numpy(opt.master), master0)


def test_loss_scale_is_exact_for_fixed_scale():
    """With a power-of-two fixed scale the unscaled fp32 gradients equal the unscaled run's."""
    a, b = _model(), _model()
    oa = a.configure_optimizer(1e-3, flat=True)
    ob = b.configure_optimizer(1e-3, flat=True, loss_scale=1024.0)
    x, y = _batch()
    for m, o in ((a, oa), (b, ob)):
        _, loss = m(x, y)
        o.backward(loss)
    np.testing.assert_allclose(ob.flat.grad / 1024.0, oa.flat.grad, rtol=1e-6, atol=1e-9)


def _scaled_and_plain_runs(xp, dtype, loss_scale, steps=6):
    """Two FlatAdamW runs fed the same gradients, one multiplied by the loss scale S as backward
    would leave them, the other plain. Gradients are small (so eps matters: AdamW's m/sqrt(v) alone
    would hide a missing 1/S) and fp16 numbers (so times S, a power of two, they stay exact).
    Returns (scaled optimizer, plain optimizer, [(scaled norm, plain norm) per step])."""
    rng = np.random.default_rng(0)
    shapes = [(6, 5), (5,), (4, 3)]
    def params():
        return [Tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True) for s in shapes]
    p_scaled = params()
    p_plain = [Tensor(p.data.copy(), requires_grad=True) for p in p_scaled]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, dtype=dtype, max_grad_norm=2e-3)
    scaled = FlatAdamW(p_scaled, loss_scale=loss_scale, init_scale=2.0 ** 10, **kw)
    plain = FlatAdamW(p_plain, loss_scale=None, **kw)
    assert scaled.loss_scale == 2.0 ** 10
    norms = []
    for _ in range(steps):
        g = (rng.standard_normal(scaled.flat.size) * 1e-3).astype(np.float16)   # norm ~ 8e-3 > max: clipped
        scaled.flat.grad[...] = xp.asarray(g.astype(np.float32) * scaled.loss_scale, dtype=scaled.flat.grad.dtype)
        plain.flat.grad[...] = xp.asarray(g, dtype=plain.flat.grad.dtype)
        scaled.step()
        plain.step()
        norms.append((float(scaled.grad_norm), float(plain.grad_norm)))
    assert scaled.loss_scale == 2.0 ** 10 and scaled.skipped_steps == 0
    return scaled, plain, norms


@pytest.mark.parametrize("dtype, loss_scale", [(None, 1024.0), ("float16", "dynamic")])
def test_loss_scaled_step_equals_the_unscaled_step(xp, dtype, loss_scale):
    """The update divides the loss scale out: scaling the gradients by S (a power of two) changes
    no bit of the weights or moments."""
    scaled, plain, _ = _scaled_and_plain_runs(xp, dtype, loss_scale)
    for a, b in ((scaled.master, plain.master), (scaled.flat.data, plain.flat.data),
                 (scaled.exp_avg, plain.exp_avg), (scaled.exp_avg_sq, plain.exp_avg_sq)):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


@pytest.mark.parametrize("dtype, loss_scale", [(None, 1024.0), ("float16", "dynamic")])
def test_grad_norm_is_taken_on_unscaled_gradients(xp, dtype, loss_scale):
    """``grad_norm`` (and so the clipping) is the norm of the true gradients, with or without a
    loss scale; and it is the norm of what was given (clipping does not touch it)."""
    scaled, plain, norms = _scaled_and_plain_runs(xp, dtype, loss_scale)
    for s, p in norms:
        assert s == p
        assert 4e-3 < p < 2e-2                                # clipping at 2e-3 is active


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_flat_state_dict_resumes_exactly(dtype):
    def run(model, opt, steps, start):
        for s in range(start, start + steps):
            x, y = _batch(seed=s)
            _, loss = model(x, y)
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
    a = _model()
    oa = a.configure_optimizer(2e-3, flat=True, dtype=dtype, max_grad_norm=1.0)
    run(a, oa, 6, 0)
    b = _model()
    ob = b.configure_optimizer(2e-3, flat=True, dtype=dtype, max_grad_norm=1.0)
    run(b, ob, 3, 0)
    weights, state = ob.master_state_dict(b), ob.state_dict()
    c = _model(seed=99)
    c.load_state_dict(weights)                         # fp32 weights, then the optimizer over them
    oc = c.configure_optimizer(2e-3, flat=True, dtype=dtype, max_grad_norm=1.0)
    oc.load_state_dict(state)
    run(c, oc, 3, 3)
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        np.testing.assert_array_equal(backend.to_numpy(q.data), backend.to_numpy(p.data), err_msg=n)
    with pytest.raises(ValueError, match="FlatAdamW state dict"):
        oc.load_state_dict({"flat": False})


def test_per_parameter_adamw_state_converts_to_flat():
    """Checkpoints written with the per-parameter AdamW resume into FlatAdamW: same next step."""
    a, b = _model(), _model()
    oa = a.configure_optimizer(2e-3)
    x, y = _batch()
    for s in range(2):
        _, loss = a(*_batch(seed=s))
        loss.backward()
        oa.step()
        oa.zero_grad()
    b.load_state_dict(a.state_dict())
    ob = b.configure_optimizer(2e-3, flat=True)
    ob.load_state_dict(oa.state_dict())
    for m, o in ((a, oa), (b, ob)):
        _, loss = m(x, y)
        loss.backward()
        o.step()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_allclose(backend.to_numpy(q.data), backend.to_numpy(p.data), rtol=1e-6, atol=1e-7, err_msg=n)


def test_bad_options_raise():
    m = _model()
    with pytest.raises(TypeError, match="flat=True"):
        m.configure_optimizer(max_grad_norm=1.0)
    with pytest.raises(ValueError, match="loss_scale"):
        _model().configure_optimizer(flat=True, loss_scale=-1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        _model().configure_optimizer(flat=True, max_grad_norm=-1)


@pytest.mark.cupy
def test_training_step_never_synchronizes_on_the_gpu(xp):
    if xp is np:
        pytest.skip("the GPU has no host to stall on NumPy")
    model = _model()
    opt = model.configure_optimizer(1e-3, dtype="float16", max_grad_norm=1.0)
    x, y = (xp.asarray(a) for a in _batch())
    for i in range(2):                                   # the first step compiles the kernels
        with (backend.forbid_sync() if i else _null()):
            _, loss = model(x, y)
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
    assert np.isfinite(float(loss.item()))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
