"""Optimizers: hand-worked updates, PyTorch parity, decoupled decay, groups, exact resume; lr schedule; clipping."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import npgpt
from npgpt import Tensor, backend
from npgpt.backend import to_numpy
from npgpt.checkpoint import load_checkpoint, save_checkpoint
from npgpt.optim import SGD, AdamW, clip_grad_norm, decay_groups, get_lr, global_grad_norm
from npgpt.optim.clip import sum_of_squares

SHAPES = [(4, 3), (5,), (2, 3, 2), ()]


def make_params(xp, shapes=SHAPES, dtype=np.float32, seed=0):
    r = np.random.default_rng(seed)
    return [Tensor(r.standard_normal(s).astype(dtype), requires_grad=True) for s in shapes]


def make_grads(shapes, steps, dtype=np.float32, seed=1):
    """grads[t][i]: the gradient of parameter i at step t (NumPy, moved to the backend when set)."""
    r = np.random.default_rng(seed)
    return [[r.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else backend.xp.array(g)   # a copy: clipping scales grads in place


def scalar(xp, value, dtype=np.float64):
    return Tensor(np.array(value, dtype=dtype), requires_grad=True)


def run_steps(xp, opt, p, grads):
    out = []
    for g in grads:
        p.grad = xp.asarray(np.array(g, dtype=p.dtype))
        opt.step()
        out.append(float(p.item()))
    return out


# ---- AdamW --------------------------------------------------------------------------------------

def test_adamw_scalar_by_hand(xp):
    # lr 0.1, b1 0.5, b2 0.75, eps 0, no decay; p0 = 1, grads 2, 1, 3. By hand from
    # m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, p -= lr (m/(1-b1^t)) / sqrt(v/(1-b2^t)):
    #   t=1: m = 1,  v = 1,  mhat = 1/0.5 = 2,       vhat = 1/0.25 = 4,          p = 1 - 0.1*2/2 = 0.9
    #   t=2: m = 1,  v = 1,  mhat = 1/0.75 = 4/3,    vhat = 1/0.4375 = 16/7,     p = 0.9 - 0.1*(4/3)/(4/sqrt 7)
    #   t=3: m = 2,  v = 3,  mhat = 2/0.875 = 16/7,  vhat = 3/(37/64) = 192/37,  p -= 0.1*(16/7)/sqrt(192/37)
    p = scalar(xp, 1.0)
    opt = AdamW([p], lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.0)
    got = run_steps(xp, opt, p, [2.0, 1.0, 3.0])
    p1 = 0.9
    p2 = p1 - 0.1 * math.sqrt(7) / 3
    p3 = p2 - 0.1 * (16 / 7) / math.sqrt(192 / 37)
    np.testing.assert_allclose(got, [p1, p2, p3], rtol=1e-14)
    s = opt.state[id(p)]
    assert s["step"] == 3
    assert float(s["exp_avg"]) == 2.0 and float(s["exp_avg_sq"]) == 3.0


def test_adamw_scalar_with_decay_and_eps_by_hand(xp):
    # lr 0.1, wd 0.5, default betas (0.9, 0.999), eps 0.1; p0 = 1, grads 2, -1.
    #   t=1: p = 1*(1 - 0.05) = 0.95; m = 0.2, v = 0.004; mhat = 2, vhat = 4; p = 0.95 - 0.1*2/(2 + 0.1)
    #   t=2: p *= 0.95; m = 0.18 - 0.1 = 0.08, v = 0.003996 + 0.001 = 0.004996;
    #        mhat = 0.08/0.19, vhat = 0.004996/0.001999; p -= 0.1*mhat/(sqrt(vhat) + 0.1)
    p = scalar(xp, 1.0)
    opt = AdamW([p], lr=0.1, eps=0.1, weight_decay=0.5)
    got = run_steps(xp, opt, p, [2.0, -1.0])
    p1 = 0.95 - 0.1 * 2 / 2.1
    p2 = p1 * 0.95 - 0.1 * (0.08 / 0.19) / (math.sqrt(0.004996 / 0.001999) + 0.1)
    np.testing.assert_allclose(got, [p1, p2], rtol=1e-13)


def test_adamw_float32_scalar_by_hand(xp):
    p = scalar(xp, 1.0, np.float32)
    opt = AdamW([p], lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.0)
    got = run_steps(xp, opt, p, [2.0, 1.0])
    np.testing.assert_allclose(got, [0.9, 0.9 - 0.1 * math.sqrt(7) / 3], rtol=1e-6)
    assert p.dtype == np.float32


def test_adamw_matches_torch(xp):
    torch = pytest.importorskip("torch")
    shapes = SHAPES + [(3, 1)]
    params = make_params(xp, shapes)
    tparams = [torch.tensor(to_numpy(p.data), requires_grad=True) for p in params]
    opt = AdamW([{"params": params[:2], "weight_decay": 0.1},
                 {"params": params[2:], "weight_decay": 0.0, "betas": (0.8, 0.95)}],
                lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    topt = torch.optim.AdamW([{"params": tparams[:2], "weight_decay": 0.1},
                              {"params": tparams[2:], "weight_decay": 0.0, "betas": (0.8, 0.95)}],
                             lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    for t, grads in enumerate(make_grads(shapes, 20)):
        if t % 3 == 1:
            grads[-1] = None            # an unused parameter: skipped, its moments do not advance
        lr = get_lr(t, 3e-2, 5, 20, 3e-3)
        opt.set_lr(lr)
        set_grads(params, grads)
        for tp, g in zip(tparams, grads):
            tp.grad = None if g is None else torch.from_numpy(g.copy())
        for tg in topt.param_groups:
            tg["lr"] = lr
        opt.step()
        topt.step()
        for p, tp in zip(params, tparams):
            np.testing.assert_allclose(to_numpy(p.data), tp.detach().numpy(), rtol=1e-5, atol=1e-6)
    for p, tp in zip(params, tparams):
        s, ts = opt.state[id(p)], topt.state[tp]
        assert s["step"] == int(ts["step"])
        np.testing.assert_allclose(to_numpy(s["exp_avg"]), ts["exp_avg"].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(to_numpy(s["exp_avg_sq"]), ts["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-9)
        assert p.dtype == np.float32 and s["exp_avg"].dtype == np.float32 and s["exp_avg_sq"].dtype == np.float32


@pytest.mark.parametrize("switch_off", ["cuda_kernel=False", "NPGPT_CUDA_KERNELS=0"])
def test_adamw_cuda_kernel_matches_array_code(xp, switch_off, monkeypatch):
    if xp is np:
        pytest.skip("the AdamW CUDA kernel is CuPy's; NumPy always runs the array code")
    pa, pb = make_params(xp), make_params(xp)
    oa = AdamW(pa, lr=1e-2, weight_decay=0.1)                 # the kernel (the default on CuPy)
    ob = AdamW(pb, lr=1e-2, weight_decay=0.1, **({"cuda_kernel": False} if switch_off == "cuda_kernel=False" else {}))
    for grads in make_grads(SHAPES, 10):
        set_grads(pa, grads)
        set_grads(pb, grads)
        monkeypatch.delenv("NPGPT_CUDA_KERNELS", raising=False)
        oa.step()
        if switch_off != "cuda_kernel=False":
            monkeypatch.setenv("NPGPT_CUDA_KERNELS", "0")
        ob.step()
    for a, b in zip(pa, pb):
        assert a.dtype == np.float32
        np.testing.assert_allclose(to_numpy(a.data), to_numpy(b.data), rtol=1e-6, atol=1e-7)
        for k in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(to_numpy(oa.state[id(a)][k]), to_numpy(ob.state[id(b)][k]),
                                       rtol=1e-6, atol=1e-9)


def test_adamw_weight_decay_is_decoupled(xp):
    # a zero gradient leaves the moments at 0, so each step only multiplies p by exactly (1 - lr*wd)
    p = Tensor(np.array([1.5, -2.0, 3.25], np.float32), requires_grad=True)
    expected = to_numpy(p.data).copy()
    opt = AdamW([p], lr=0.1, weight_decay=0.2)
    for _ in range(4):
        p.grad = xp.zeros_like(p.data)
        opt.step()
        expected = expected * np.float32(1 - 0.1 * 0.2)
        assert np.array_equal(to_numpy(p.data), expected)
    assert p.dtype == np.float32


def test_param_groups_weight_decay_zero(xp):
    a, b = make_params(xp, [(3, 2), (2,)])
    a0, b0 = to_numpy(a.data).copy(), to_numpy(b.data).copy()
    opt = AdamW([{"params": [a], "weight_decay": 0.5}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[1]["betas"] == (0.9, 0.999)
    for x in (a, b):
        x.grad = xp.zeros_like(x.data)
    opt.step()
    assert np.array_equal(to_numpy(a.data), a0 * np.float32(1 - 0.05))
    assert np.array_equal(to_numpy(b.data), b0)


@pytest.mark.parametrize("flat", [False, True])
def test_configure_optimizer_decays_matrices_only(xp, flat):
    """GPT-2's grouping: 1-D parameters (biases, layer-norm gains) sit in the weight_decay=0 group,
    so a step with zero gradients leaves them exactly as they were and shrinks every matrix by
    exactly (1 - lr wd). (AdamW's scale invariance hides a wrong grouping from the loss curves.)"""
    backend.seed(0)
    model = npgpt.GPT(npgpt.GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=8))
    before = {n: to_numpy(p.data).copy() for n, p in model.named_parameters()}
    assert any(v.ndim == 1 for v in before.values()) and any(v.ndim == 2 for v in before.values())
    opt = model.configure_optimizer(0.1, 0.5, flat=flat)
    for group in opt.param_groups:
        assert group["weight_decay"] == (0.5 if group["params"][0].ndim >= 2 else 0.0)
        assert len({p.ndim >= 2 for p in group["params"]}) == 1       # one kind per group
    for p in model.parameters():
        if flat:
            p.grad[...] = 0                                            # a view of the flat buffer
        else:
            p.grad = xp.zeros_like(p.data)
    opt.step()
    for n, p in model.named_parameters():
        expected = before[n] * np.float32(1 - 0.1 * 0.5) if before[n].ndim >= 2 else before[n]
        assert np.array_equal(to_numpy(p.data), expected), n


def test_decay_groups():
    m, b = Tensor(np.ones((2, 3), np.float32), requires_grad=True), Tensor(np.ones(3, np.float32), requires_grad=True)
    assert decay_groups([b, m], 0.1) == [{"params": [m], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}]
    assert decay_groups([b], 0.1) == [{"params": [b], "weight_decay": 0.0}]     # an empty group is left out


def test_lr_is_settable_per_step(xp):
    p = scalar(xp, 1.0)
    opt = AdamW([p], lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.3)
    opt.set_lr(0.0)
    run_steps(xp, opt, p, [2.0])
    assert p.item() == 1.0                      # lr 0: neither decay nor update
    opt.param_groups[0]["lr"] = 0.2             # second step: m = v = 1, as in test_adamw_scalar_by_hand
    run_steps(xp, opt, p, [1.0])
    expected = 1.0 * (1 - 0.2 * 0.3) - 0.2 * (1 / 0.75) / math.sqrt(1 / 0.4375)
    np.testing.assert_allclose(p.item(), expected, rtol=1e-14)
    with pytest.raises(ValueError, match="learning rate"):
        opt.set_lr(-1.0)


def test_none_grads_are_skipped_and_zero_grad(xp):
    a, b = make_params(xp, [(2, 2), (3,)])
    b0 = to_numpy(b.data).copy()
    opt = AdamW([a, b], lr=0.1)
    a.grad = xp.ones_like(a.data)
    opt.step()
    assert np.array_equal(to_numpy(b.data), b0) and opt.state[id(b)] == {}
    assert opt.state[id(a)]["step"] == 1
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_adamw_grad_accumulation_equals_full_batch(xp):
    # the engine adds grads across backward calls: two half batches with loss/2 == one full batch
    r = np.random.default_rng(0)
    x = r.standard_normal((4, 3)).astype(np.float32)
    w1, w2 = make_params(xp, [(3,)])[0], make_params(xp, [(3,)])[0]   # same seed: equal values
    o1, o2 = AdamW([w1], lr=0.1), AdamW([w2], lr=0.1)
    loss = lambda w, xb: ((Tensor(xb) * w).sum() * (Tensor(xb) * w).sum()) * (1.0 / len(xb))  # noqa: E731
    ((loss(w1, x[:2]) + loss(w1, x[2:])) * 0.5).backward()
    for xb in (x[:2], x[2:]):
        (loss(w2, xb) * 0.5).backward()
    np.testing.assert_allclose(to_numpy(w2.grad), to_numpy(w1.grad), rtol=1e-6)
    o1.step()
    o2.step()
    np.testing.assert_allclose(to_numpy(w2.data), to_numpy(w1.data), rtol=1e-6)


# ---- SGD ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, expected", [
    # p0 = 1, lr 0.1, grads 2, 1, 3 (worked by hand)
    (dict(), [0.8, 0.7, 0.4]),                                           # p -= 0.1 g
    (dict(momentum=0.5), [0.8, 0.6, 0.2]),                               # b: 2, 2, 4
    (dict(momentum=0.5, nesterov=True), [0.7, 0.5, 0.0]),                # g + 0.5 b: 3, 2, 5
    (dict(weight_decay=0.1), [1 - 0.1 * 2.1, None, None]),               # g + 0.1 p = 2.1
])
def test_sgd_by_hand(xp, kw, expected):
    p = scalar(xp, 1.0)
    opt = SGD([p], lr=0.1, **kw)
    got = run_steps(xp, opt, p, [2.0, 1.0, 3.0])
    for g, e in zip(got, expected):
        if e is not None:
            assert g == pytest.approx(e, rel=1e-14, abs=1e-15)


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.8, weight_decay=0.01), dict(momentum=0.7, nesterov=True, weight_decay=0.1),
                                dict(weight_decay=0.05)])
def test_sgd_matches_torch(xp, kw):
    torch = pytest.importorskip("torch")
    params = make_params(xp)
    tparams = [torch.tensor(to_numpy(p.data), requires_grad=True) for p in params]
    opt, topt = SGD(params, lr=0.05, **kw), torch.optim.SGD(tparams, lr=0.05, **kw)
    for t, grads in enumerate(make_grads(SHAPES, 20)):
        if t % 4 == 2:
            grads[0] = None
        set_grads(params, grads)
        for tp, g in zip(tparams, grads):
            tp.grad = None if g is None else torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    for p, tp in zip(params, tparams):
        assert p.dtype == np.float32
        np.testing.assert_allclose(to_numpy(p.data), tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_sgd_does_not_modify_grad(xp):
    p = make_params(xp, [(3,)])[0]
    g = np.array([1.0, -2.0, 0.5], np.float32)
    opt = SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    for _ in range(3):
        p.grad = backend.to_device(g.copy())
        opt.step()
        assert np.array_equal(to_numpy(p.grad), g)


def test_sgd_nesterov_needs_momentum():
    p = Tensor(np.zeros(2, np.float32), requires_grad=True)
    with pytest.raises(ValueError, match="momentum > 0"):
        SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum > 0"):
        SGD([{"params": [p], "momentum": 0.0}], lr=0.1, momentum=0.9, nesterov=True)


def test_constructor_errors():
    p = Tensor(np.zeros(2, np.float32), requires_grad=True)
    with pytest.raises(ValueError, match="empty"):
        AdamW([])
    with pytest.raises(ValueError, match="more than once"):
        AdamW([{"params": [p]}, {"params": [p]}])
    with pytest.raises(TypeError, match="requires_grad"):
        AdamW([Tensor(np.zeros(2, np.float32))])
    with pytest.raises(TypeError, match="list"):
        AdamW(p)
    with pytest.raises(ValueError, match="betas"):
        AdamW([p], betas=(0.9, 1.0))


# ---- state dicts --------------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw": lambda ps: AdamW([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95)),
    "sgd": lambda ps: SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("through_file", [False, True])
def test_state_dict_resume_is_bit_identical(xp, kind, through_file, tmp_path):
    grads = make_grads(SHAPES, 10)
    grads[2][1] = None                                      # one param without state progress once
    params = make_params(xp)
    opt = OPTIMIZERS[kind](params)
    for t in range(5):
        set_grads(params, grads[t])
        opt.step()
    sd = opt.state_dict()
    saved_params = [to_numpy(p.data).copy() for p in params]
    if through_file:                                        # what a training checkpoint does
        save_checkpoint(tmp_path / "ckpt.npz", {"optimizer": sd})
        sd = load_checkpoint(tmp_path / "ckpt.npz")["optimizer"]
    for t in range(5, 10):
        set_grads(params, grads[t])
        opt.step()

    params2 = [Tensor(a, requires_grad=True) for a in saved_params]
    opt2 = OPTIMIZERS[kind](params2)
    opt2.set_lr(0.5)                                        # overwritten by the loaded hyperparameters
    opt2.load_state_dict(sd)
    assert opt2.step_count == 5 and opt2.param_groups[0]["lr"] == 1e-2
    for t in range(5, 10):
        set_grads(params2, grads[t])
        opt2.step()
    for p, p2 in zip(params, params2):
        assert np.array_equal(to_numpy(p.data), to_numpy(p2.data))
        assert p2.dtype == np.float32
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in s2["param_groups"]]
    for a, b in zip(s1["state"], s2["state"]):
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k])


def test_state_dict_is_a_host_copy(xp):
    params = make_params(xp)
    opt = AdamW(params)
    set_grads(params, make_grads(SHAPES, 1)[0])
    opt.step()
    sd = opt.state_dict()
    m0 = sd["state"][0]["exp_avg"].copy()
    assert isinstance(m0, np.ndarray)
    opt.step()                                              # must not change what was saved
    assert np.array_equal(sd["state"][0]["exp_avg"], m0)
    opt.load_state_dict(sd)
    opt.step()
    assert np.array_equal(sd["state"][0]["exp_avg"], m0)    # loading copied, did not alias


def test_load_state_dict_mismatch_raises(xp):
    params = make_params(xp)
    opt = AdamW(params)
    set_grads(params, make_grads(SHAPES, 1)[0])
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="parameters"):
        AdamW(make_params(xp, SHAPES[:3])).load_state_dict(sd)
    with pytest.raises(ValueError, match="shape"):
        AdamW(make_params(xp, [(3, 4)] + SHAPES[1:])).load_state_dict(sd)
    with pytest.raises(ValueError, match="param groups"):
        AdamW([{"params": make_params(xp, SHAPES[:2])}, {"params": make_params(xp, SHAPES[2:])}]).load_state_dict(sd)
    with pytest.raises(ValueError, match="state dict"):
        opt.load_state_dict({"weights": []})


# ---- learning-rate schedule ---------------------------------------------------------------------

def test_get_lr_known_points():
    lr, min_lr, warm, decay = 6e-4, 6e-5, 100, 1100
    assert get_lr(0, lr, warm, decay, min_lr) == pytest.approx(lr / 101)
    assert get_lr(49, lr, warm, decay, min_lr) == pytest.approx(lr * 50 / 101)
    assert get_lr(99, lr, warm, decay, min_lr) == pytest.approx(lr * 100 / 101)       # last warmup step
    assert get_lr(100, lr, warm, decay, min_lr) == pytest.approx(lr)                  # top of the cosine
    assert get_lr(600, lr, warm, decay, min_lr) == pytest.approx((lr + min_lr) / 2)   # midpoint of decay
    assert get_lr(1100, lr, warm, decay, min_lr) == pytest.approx(min_lr)
    assert get_lr(5000, lr, warm, decay, min_lr) == min_lr
    assert get_lr(0, lr, 0, decay, min_lr) == pytest.approx(lr)                       # no warmup
    lrs = [get_lr(i, lr, warm, decay, min_lr) for i in range(1200)]
    assert all(a < b for a, b in zip(lrs[:100], lrs[1:101]))                          # rises, then
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))                          # never rises


# ---- gradient clipping --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 255, 257, 256 * 1024 + 3, 256 * 1024 * 3 + 1])   # 1 block ... grid-stride
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_sum_of_squares_kernel_and_array_code(xp, n, dtype, monkeypatch):
    """One pass, accumulated in float32 (float64 for float64); the CUDA kernel (on CuPy) and the
    array code agree with a float64 reference, and the kernel is deterministic."""
    x = np.random.default_rng(n).standard_normal(n).astype(dtype)
    expected = float(np.sum(x.astype(np.float64) ** 2))
    got = sum_of_squares(xp.asarray(x))
    assert got.shape == () and got.dtype == (np.float64 if dtype == np.float64 else np.float32)
    assert float(got) == pytest.approx(expected, rel=1e-12 if dtype == np.float64 else 1e-5)
    if xp is not np:
        assert float(sum_of_squares(xp.asarray(x))) == float(got)              # same order every time
        monkeypatch.setenv("NPGPT_CUDA_KERNELS", "0")
        assert float(sum_of_squares(xp.asarray(x))) == pytest.approx(float(got), rel=1e-5)


def test_global_grad_norm(xp):
    grads = [xp.asarray(g) for g in make_grads(SHAPES, 1)[0]]
    expected = math.sqrt(sum(float(np.sum(to_numpy(g).astype(np.float64) ** 2)) for g in grads))
    norm = global_grad_norm(grads)                                         # a list: float64 sum
    assert norm.dtype == np.float64 and float(norm) == pytest.approx(expected, rel=1e-6)
    flat = xp.concatenate([g.reshape(-1) for g in grads])
    one = global_grad_norm(flat)                                           # one array: its own dtype
    assert one.dtype == np.float32 and float(one) == pytest.approx(expected, rel=1e-6)


def test_clip_grad_norm_clips_to_max_norm(xp):
    params = make_params(xp)
    grads = make_grads(SHAPES, 1)[0]
    set_grads(params, grads)
    extra = Tensor(np.ones(3, np.float32), requires_grad=True)        # no grad: ignored
    expected = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    norm = clip_grad_norm(params + [extra], 1.0)
    assert isinstance(norm, float)
    assert norm == pytest.approx(expected, rel=1e-6)
    clipped = math.sqrt(sum(float(np.sum(to_numpy(p.grad).astype(np.float64) ** 2)) for p in params))
    assert clipped == pytest.approx(1.0, rel=1e-5)
    for p, g in zip(params, grads):
        assert p.grad.dtype == np.float32
        np.testing.assert_allclose(to_numpy(p.grad), g * (1.0 / (expected + 1e-6)), rtol=1e-6)
    assert extra.grad is None


def test_clip_grad_norm_is_a_noop_below_max_norm(xp):
    params = make_params(xp)
    grads = make_grads(SHAPES, 1)[0]
    set_grads(params, grads)
    norm = clip_grad_norm(params, 1e3)
    assert norm < 1e3
    for p, g in zip(params, grads):
        assert np.array_equal(to_numpy(p.grad), g)
    assert clip_grad_norm([extra := Tensor(np.ones(2, np.float32), requires_grad=True)], 1.0) == 0.0
    assert extra.grad is None
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(params, 0.0)


def test_clip_grad_norm_matches_torch(xp):
    torch = pytest.importorskip("torch")
    params = make_params(xp)
    grads = [np.asarray(g * 10) for g in make_grads(SHAPES, 1)[0]]
    set_grads(params, grads)
    tparams = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for tp, g in zip(tparams, grads):
        tp.grad = torch.from_numpy(g.copy())
    norm = clip_grad_norm(params, 0.5)
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, 0.5)
    assert norm == pytest.approx(float(tnorm), rel=1e-5)
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(to_numpy(p.grad), tp.grad.numpy(), rtol=1e-5, atol=1e-8)


@given(shapes=st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4),
       scale=st.floats(1e-3, 1e3), max_norm=st.floats(0.1, 10.0), seed=st.integers(0, 2**16))
def test_clip_grad_norm_property(xp, shapes, scale, max_norm, seed):
    params = make_params(xp, shapes, seed=seed)
    grads = [g * np.float32(scale) for g in make_grads(shapes, 1, seed=seed + 1)[0]]
    set_grads(params, grads)
    expected = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    norm = clip_grad_norm(params, max_norm)
    assert norm == pytest.approx(expected, rel=1e-5)
    after = math.sqrt(sum(float(np.sum(to_numpy(p.grad).astype(np.float64) ** 2)) for p in params))
    assert after == pytest.approx(min(expected, max_norm), rel=1e-5, abs=1e-6)
    assert all(p.grad.dtype == np.float32 for p in params)
