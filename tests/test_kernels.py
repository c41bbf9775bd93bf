"""The CUDA kernels of the layers (``npgpt/layers/*.py``, ``*_cuda`` launchers) against their NumPy twins (``functional`` on float64 NumPy
arrays of the same, already rounded, inputs): forward and every gradient, float16/32/64, odd sizes.
Every output buffer starts as NaN, so an element a kernel forgets to write fails the comparison.
All of this needs a GPU and skips without one."""
import numpy as np
import pytest

from npgpt import Tensor, backend
from npgpt import functional as F
from npgpt.layers import _cuda
from npgpt.layers import cross_entropy as ce_layer
from npgpt.layers import gelu as gelu_layer
from npgpt.layers import layer_norm as ln_layer
from npgpt.backend import to_numpy

pytestmark = pytest.mark.cupy

DTYPES = [np.float16, np.float32, np.float64]
TOL = {np.float16: 4e-3, np.float32: 2e-5, np.float64: 1e-12}   # relative to the largest |reference|


# ``cp``: the CuPy kernel fixture of conftest.py


def close(got, ref, dtype, scale=1.0):
    """got (any backend, any dtype) equals the float64 reference to the dtype's tolerance."""
    got = to_numpy(got).astype(np.float64)
    ref = to_numpy(ref).astype(np.float64)
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    tol = TOL[dtype] * scale
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(np.abs(ref).max(initial=0), 1e-30))


def rounded(rng, dtype, *shape, scale=1.0, shift=0.0):
    """Random normals rounded to dtype; returns (the dtype array, the same values in float64)."""
    a = (rng.normal(size=shape) * scale + shift).astype(dtype)
    return a, a.astype(np.float64)


def reference(fn, arrays, dout=None):
    """fn on float64 NumPy Tensors: the output and the gradients of sum(dout * out)."""
    with backend.default_dtype(np.float64):
        ts = [Tensor(a, requires_grad=True) for a in arrays]
        out = fn(*ts)
        out.backward(dout)
    return out.numpy(), [t.grad for t in ts]


def test_switch_and_constants(monkeypatch):
    """NPGPT_CUDA_KERNELS=0 or ENABLED = False turn the kernels off (read at call time); the GELU
    constants are sqrt(2/pi) and 0.044715 in both the NumPy code and the kernels. (Runs without a GPU.)"""
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "1")
    assert _cuda.enabled()
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "0")
    assert not _cuda.enabled()
    monkeypatch.delenv("NPGPT_CUDA_KERNELS")
    monkeypatch.setattr(_cuda, "ENABLED", False)
    assert not _cuda.enabled()
    import math
    assert gelu_layer.GELU_A == math.sqrt(2 / math.pi) and gelu_layer.GELU_B == 0.044715
    assert repr(gelu_layer.GELU_A) in gelu_layer.gelu_kernel_body("forward", "float")
    assert _cuda.supports(np.float16, np.float64) and not _cuda.supports(np.int32)


# ---- gelu ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 5, 77), (1000, 33)])
def test_gelu_kernels(cp, dtype, shape):
    rng = np.random.default_rng(0)
    x, x64 = rounded(rng, dtype, *shape, scale=3.0)
    x[..., 0], x64[..., 0] = 30.0, 30.0                      # far out: y = x, dy/dx = 1
    dout, dout64 = rounded(rng, dtype, *shape)
    y = gelu_layer.gelu_forward_cuda(cp.asarray(x))
    dinp = gelu_layer.gelu_backward_cuda(cp.asarray(x), cp.asarray(dout))
    assert y.dtype == dinp.dtype == dtype
    ref_y, (ref_dinp,) = reference(F.gelu, [x64], dout64)
    close(y, ref_y, dtype)
    close(dinp, ref_dinp, dtype)


# ---- layer norm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C", [(1, 1), (1, 768), (13, 7), (37, 33), (513, 65), (2101, 96), (5, 1601)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_kernels(cp, dtype, N, C, affine):
    rng = np.random.default_rng(N * C)
    x, x64 = rounded(rng, dtype, N, C, scale=2.0, shift=3.0)
    dout, dout64 = rounded(rng, dtype, N, C)
    w, w64 = rounded(rng, dtype, C, shift=1.0)
    b, b64 = rounded(rng, dtype, C)
    W, B = (cp.asarray(w), cp.asarray(b)) if affine else (None, None)
    y, mean, rstd = ln_layer.layer_norm_forward_cuda(cp.asarray(x), W, B, 1e-5)
    dinp, dw, db = ln_layer.layer_norm_backward_cuda(cp.asarray(dout), cp.asarray(x), W, mean, rstd)
    acc = _cuda.acc_dtype(dtype)
    assert y.dtype == dinp.dtype == dw.dtype == db.dtype == dtype and mean.dtype == rstd.dtype == acc

    close(mean, x64.mean(-1), np.float32 if dtype == np.float16 else dtype)
    close(rstd, 1 / np.sqrt(x64.var(-1) + 1e-5), np.float32 if dtype == np.float16 else dtype, scale=10)
    arrays = [x64, w64, b64] if affine else [x64]
    ref_y, grads = reference(F.layer_norm, arrays, dout64)
    close(y, ref_y, dtype)
    if C > 1:
        close(dinp, grads[0], dtype, scale=10)                 # a difference of nearly equal terms
    else:   # exactly 0 in exact arithmetic; the kernel's (g - mean g) rounding is amplified by rstd = 1/sqrt(eps)
        bound = 4 * np.finfo(np.float32 if dtype == np.float16 else dtype).eps * np.abs(dout64 * (w64 if affine else 1.0)) / np.sqrt(1e-5)
        assert (np.abs(to_numpy(dinp).astype(np.float64)) <= bound + np.finfo(dtype).tiny).all()
    xhat = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    close(dw, (dout64 * xhat).sum(0), dtype, scale=10)
    close(db, dout64.sum(0), dtype, scale=10)


def test_layer_norm_backward_parts(cp):
    """Only dinp, or only dweight and dbias: the same values as computing all three."""
    rng = np.random.default_rng(1)
    x, dout, w = (cp.asarray(rng.normal(size=s), dtype=np.float32) for s in [(9, 40), (9, 40), (40,)])
    _, mean, rstd = ln_layer.layer_norm_forward_cuda(x, w, None, 1e-5)
    full = ln_layer.layer_norm_backward_cuda(dout, x, w, mean, rstd)
    dinp, dw, db = ln_layer.layer_norm_backward_cuda(dout, x, w, mean, rstd, need_dwb=False)
    assert dw is None and db is None
    np.testing.assert_array_equal(to_numpy(dinp), to_numpy(full[0]))
    dinp, dw, db = ln_layer.layer_norm_backward_cuda(dout, x, w, mean, rstd, need_dinp=False)
    assert dinp is None
    np.testing.assert_array_equal(to_numpy(dw), to_numpy(full[1]))
    np.testing.assert_array_equal(to_numpy(db), to_numpy(full[2]))


# ---- cross-entropy -------------------------------------------------------------------------------

def _targets(rng, N, V, ignore):
    t = rng.integers(0, V, N)
    if ignore == "some":
        t[rng.random(N) < 0.4] = -100
        t[0] = -100
    elif ignore == "all":
        t[:] = -100
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, V", [(1, 65), (37, 65), (7, 50304), (3, 1), (5, 1025)])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_cross_entropy_kernels(cp, dtype, N, V, ignore):
    rng = np.random.default_rng(N + V)
    x, x64 = rounded(rng, dtype, N, V, scale=4.0)
    t = _targets(rng, N, V, ignore)
    loss, lse, inv_n = ce_layer.cross_entropy_forward_cuda(cp.asarray(x), cp.asarray(t))
    dloss = cp.asarray(3.0, dtype=np.float32)                # a loss scale: any device value
    dx = ce_layer.cross_entropy_backward_cuda(dloss, cp.asarray(x), cp.asarray(t), lse, inv_n)
    acc = _cuda.acc_dtype(dtype)
    assert loss.shape == () and loss.dtype == lse.dtype == inv_n.dtype == acc and dx.dtype == dtype

    n = int((t != -100).sum())
    m = x64.max(-1)
    ref_lse = m + np.log(np.exp(x64 - m[:, None]).sum(-1))
    ref_loss, (ref_dx,) = reference(lambda a: F.cross_entropy(a, t), [x64], np.float64(3.0))
    tol = np.float32 if dtype == np.float16 else dtype       # statistics are float32 for float16
    close(lse, ref_lse, tol)
    close(loss, ref_loss, tol, scale=10)
    close(inv_n, 1.0 / max(n, 1), tol)
    close(dx, ref_dx, dtype)
    if ignore == "all":
        assert float(loss) == 0.0 and not to_numpy(dx).any()


def test_cross_entropy_kernels_large_float16_logits(cp):
    """fp16 logits across the whole fp16 range: the float32 math keeps the loss finite and exact."""
    rng = np.random.default_rng(2)
    x = rng.uniform(-60000, 60000, (4, 1000)).astype(np.float16)
    t = rng.integers(0, 1000, 4)
    loss, lse, inv_n = ce_layer.cross_entropy_forward_cuda(cp.asarray(x), cp.asarray(t))
    dx = ce_layer.cross_entropy_backward_cuda(cp.asarray(1.0, np.float32), cp.asarray(x), cp.asarray(t), lse, inv_n)
    ref_loss, (ref_dx,) = reference(lambda a: F.cross_entropy(a, t), [x.astype(np.float64)])
    close(loss, ref_loss, np.float32)
    close(dx, ref_dx, np.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_kernels_minus_inf_logits(cp, dtype):
    """Masked logits (-inf, e.g. a banned token) add nothing to the row sum and get gradient 0."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 100)).astype(dtype)
    x[:, 1::3] = -np.inf
    x[1, :50] = -np.inf                                      # a thread's whole slice masked
    t = np.array([0, 99, 3])
    loss, lse, inv_n = ce_layer.cross_entropy_forward_cuda(cp.asarray(x), cp.asarray(t))
    dx = ce_layer.cross_entropy_backward_cuda(cp.asarray(1.0, np.float32), cp.asarray(x), cp.asarray(t), lse, inv_n)
    ref_loss, (ref_dx,) = reference(lambda a: F.cross_entropy(a, t), [x.astype(np.float64)])
    close(loss, ref_loss, np.float32 if dtype == np.float16 else dtype)
    close(dx, ref_dx, dtype)
    np.testing.assert_array_equal(to_numpy(dx)[:, 1::3], 0.0)


def test_cross_entropy_kernels_bad_target_makes_nan(cp):
    """A target outside [0, V) (not ignore_index): no sync, no exception; the loss is NaN, that row
    is left out of N and gets a zero gradient."""
    x = cp.zeros((4, 5), dtype=np.float32)
    t = cp.asarray([0, 5, -100, -7])
    loss, lse, inv_n = ce_layer.cross_entropy_forward_cuda(x, t)
    assert np.isnan(float(loss)) and float(inv_n) == 1.0
    dx = to_numpy(ce_layer.cross_entropy_backward_cuda(cp.asarray(1.0, np.float32), x, t, lse, inv_n))
    np.testing.assert_allclose(dx[0], [-0.8, 0.2, 0.2, 0.2, 0.2], atol=1e-6)
    np.testing.assert_array_equal(dx[1:], 0.0)


# ---- functional dispatch, fallback, no host sync --------------------------------------------------

def _inputs(xp, dtype):
    """x (2, 5, 24), LayerNorm weight and bias, targets (some ignored), and dL/dloss = 8 (a loss scale)."""
    rng = np.random.default_rng(3)
    arrays = [xp.asarray(rng.normal(size=s), dtype=dtype) for s in [(2, 5, 24), (24,), (24,)]]
    t = xp.asarray(np.where(rng.random((2, 5)) < 0.3, -100, rng.integers(0, 24, (2, 5))))
    return arrays, t, xp.asarray(8.0, dtype=_cuda.acc_dtype(dtype))


def _step(inputs):
    """ln -> gelu -> cross-entropy, forward and backward: the loss and the gradients of x, w, b."""
    arrays, t, dloss = inputs
    x, w, b = (Tensor(a, requires_grad=True) for a in arrays)
    loss = F.cross_entropy(F.gelu(F.layer_norm(x, w, b)), t)
    loss.backward(dloss)
    return loss.data, [x.grad, w.grad, b.grad]


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_dispatch_and_fallback(cp, dtype, monkeypatch):
    """On CuPy, F.layer_norm / gelu / cross_entropy call the kernels; NPGPT_CUDA_KERNELS=0 turns them off
    and the plain CuPy code gives the same numbers (the NumPy ones, too)."""
    calls = []
    for module, name in [(gelu_layer, "gelu_forward_cuda"), (gelu_layer, "gelu_backward_cuda"),
                         (ln_layer, "layer_norm_forward_cuda"), (ln_layer, "layer_norm_backward_cuda"),
                         (ce_layer, "cross_entropy_forward_cuda"), (ce_layer, "cross_entropy_backward_cuda")]:
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    fused = _step(_inputs(cp, dtype))
    assert len(set(calls)) == 6
    assert fused[0].dtype == _cuda.acc_dtype(dtype) and all(g.dtype == dtype for g in fused[1])
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "0")
    calls.clear()
    plain = _step(_inputs(cp, dtype))
    assert calls == []
    backend.use("numpy")
    on_numpy = _step(_inputs(np, dtype))
    backend.use("cupy")
    for ref in (plain, on_numpy):
        close(fused[0], to_numpy(ref[0]).astype(np.float64), dtype, scale=10)
        for g, r in zip(fused[1], ref[1]):
            close(g, to_numpy(r).astype(np.float64), dtype, scale=10)


@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_no_host_sync(cp, dtype, fused, monkeypatch):
    """A forward and backward through the three layers never waits for the GPU (no int(), .item()),
    with the kernels and without."""
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", fused)
    inputs = _inputs(cp, dtype)
    _step(inputs)                                            # compile outside the check
    with backend.forbid_sync():
        _step(inputs)
