"""The 16-byte-load ("vectorized") layer-norm and cross-entropy kernels (``npgpt/layers/
vectorized_kernels.py``), switched on through the tuning table, against float64 NumPy: forward and
every gradient, float16/32/64, shapes where they apply (C, the row stride, a multiple of 8) and
where the launchers must fall back to the scalar kernels. On NumPy the same tests check that the
switches leave the NumPy path alone; on CuPy they check the kernels (and skip without a GPU)."""
import numpy as np
import pytest

from npgpt import Tensor, backend
from npgpt import functional as F
from npgpt.backend import to_numpy
from npgpt.layers import _cuda, tuning
from npgpt.layers import cross_entropy as ce_layer
from npgpt.layers import layer_norm as ln_layer

DTYPES = [np.float16, np.float32, np.float64]
TOL = {np.float16: 4e-3, np.float32: 2e-5, np.float64: 1e-12}   # relative to the largest |reference|


def test_switches_follow_the_measurements():
    """On where the H200 measured them faster (RESULTS.md, "GPU kernels measured on the H200")."""
    assert tuning.TUNING["cupy"]["layer_norm_vectorized"] is True
    assert tuning.TUNING["cupy"]["cross_entropy_vectorized"] is True
    assert "layer_norm_vectorized" not in tuning.TUNING["numpy"]      # the NumPy path never asks


class _Ptr:
    def __init__(self, ptr):
        self.ptr = ptr


class _FakeArray:          # what ``vectorizable`` reads of an array: its dtype and device address
    def __init__(self, dtype, ptr):
        self.dtype, self.data = np.dtype(dtype), _Ptr(ptr)


def test_vectorizable_needs_whole_vectors_and_alignment():
    assert [_cuda.vector_width(d) for d in DTYPES] == [8, 4, 2]
    assert _cuda.vectorizable(768, _FakeArray(np.float16, 256), _FakeArray(np.float16, 4096))
    assert not _cuda.vectorizable(770, _FakeArray(np.float16, 256))          # 770 % 8 != 0
    assert _cuda.vectorizable(770, _FakeArray(np.float64, 256))              # 770 % 2 == 0
    assert not _cuda.vectorizable(768, _FakeArray(np.float32, 256), _FakeArray(np.float32, 256 + 4))


@pytest.fixture
def vectorized(monkeypatch, xp, kernel_launches):
    """Both switches on, kernel output buffers starting as NaN, and the names of the kernels launched."""
    monkeypatch.setitem(tuning.TUNING["cupy"], "layer_norm_vectorized", True)
    monkeypatch.setitem(tuning.TUNING["cupy"], "cross_entropy_vectorized", True)
    monkeypatch.delenv("NPGPT_CUDA_KERNELS", raising=False)
    monkeypatch.setattr(_cuda, "ENABLED", True)
    monkeypatch.setattr(_cuda, "empty", lambda xp_, shape, dtype: xp_.full(shape, np.nan, dtype))
    return kernel_launches


def close(got, ref, dtype, scale=1.0):
    got, ref = to_numpy(got).astype(np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape and np.isfinite(got).all()
    tol = TOL[dtype] * scale
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(np.abs(ref).max(initial=0), 1e-30))


def grads(fn, arrays, xp, dtype):
    """fn on Tensors of ``arrays`` (rounded to dtype, on xp): the output and the gradients of sum(out)
    weighted by a fixed random dout; float64 NumPy when dtype is float64 and xp is numpy."""
    ts = [Tensor(xp.asarray(a, dtype=dtype), requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(xp.asarray(np.random.default_rng(9).normal(size=out.shape), dtype=out.dtype))
    return [to_numpy(out.data)] + [to_numpy(t.grad) for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C", [(7, 64), (33, 768), (5, 1600), (9, 36), (4, 13)])
def test_layer_norm(xp, vectorized, dtype, N, C):
    rng = np.random.default_rng(N * C)
    arrays = [(rng.normal(size=(N, C)) * 2 + 3).astype(dtype), rng.normal(size=C).astype(dtype) + 1,
              rng.normal(size=C).astype(dtype)]
    got = grads(F.layer_norm, arrays, xp, dtype)
    launched = list(vectorized)                # before the float64 reference (on the active backend)
    with backend.default_dtype(np.float64):
        want = grads(F.layer_norm, [a.astype(np.float64) for a in arrays], np, np.float64)
    for g, w, scale in zip(got, want, (1, 10, 10, 10)):
        close(g, w, dtype, scale)
    if xp is not np:                           # the _vec kernels exactly where whole aligned vectors fit
        applies = C % _cuda.vector_width(dtype) == 0
        assert ("npgpt_ln_fwd_vec" in launched) == applies and ("npgpt_ln_bwd_vec" in launched) == applies
        assert ("npgpt_ln_fwd" in launched) != applies


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, V, classes", [(6, 64, None), (5, 50304, 50257), (4, 1024, 1000), (3, 65, None),
                                            (37, 8, None)])
def test_cross_entropy(xp, vectorized, dtype, N, V, classes):
    rng = np.random.default_rng(N + V)
    x = (rng.normal(size=(N, V)) * 4).astype(dtype)
    t = rng.integers(0, classes or V, N)
    t[0] = -100                                                 # an ignored row
    fn = lambda a: F.cross_entropy(a, xp.asarray(t), vocab_size=classes)   # noqa: E731
    got = grads(fn, [x], xp, dtype)
    launched = list(vectorized)                # before the float64 reference (on the active backend)
    with backend.default_dtype(np.float64):
        want = grads(lambda a: F.cross_entropy(a, t, vocab_size=classes), [x.astype(np.float64)], np, np.float64)
    close(got[0], want[0], np.float32 if dtype == np.float16 else dtype, scale=10)
    close(got[1], want[1], dtype)
    if xp is not np:
        applies = V % _cuda.vector_width(dtype) == 0
        assert ("npgpt_ce_fwd_vec" in launched) == applies and ("npgpt_ce_bwd_vec" in launched) == applies


@pytest.mark.cupy
@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorized_equals_scalar_kernels(vectorized, xp, dtype):
    """The launchers' ``vectorized=`` argument: both kernel versions on one input agree to rounding
    (sums taken in another order); a weight that starts off a 16-byte boundary falls back."""
    if xp is np:
        pytest.skip("CUDA kernels: CuPy only")
    rng = np.random.default_rng(3)
    x, dout = (xp.asarray(rng.normal(size=(65, 776)), dtype=dtype) for _ in range(2))
    w, b = (xp.asarray(rng.normal(size=777), dtype=dtype) for _ in range(2))
    for offset in (0, 1):                                       # w[1:] is one element off the boundary
        W, B = w[offset:offset + 776], b[:776]
        del vectorized[:]
        fwd = [ln_layer.layer_norm_forward_cuda(x, W, B, 1e-5, vectorized=v) for v in (False, True)]
        bwd = [ln_layer.layer_norm_backward_cuda(dout, x, W, *fwd[0][1:], vectorized=v) for v in (False, True)]
        assert vectorized.count("npgpt_ln_fwd_vec") == (offset == 0)
        assert vectorized.count("npgpt_ln_bwd_vec") == (offset == 0)
        for a, c in zip(fwd[0] + bwd[0], fwd[1] + bwd[1]):
            close(c, to_numpy(a), dtype, scale=10)
    t = xp.asarray(rng.integers(0, 776, 65))
    loss, lse, inv_n = zip(*[ce_layer.cross_entropy_forward_cuda(x, t, vectorized=v) for v in (False, True)])
    close(loss[1], to_numpy(loss[0]), np.float32 if dtype == np.float16 else dtype)
    dx = [ce_layer.cross_entropy_backward_cuda(xp.asarray(2.0), x, t, lse[0], inv_n[0], vectorized=v)
          for v in (False, True)]
    close(dx[1], to_numpy(dx[0]), dtype)
