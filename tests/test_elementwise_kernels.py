"""The 16-byte-load elementwise kernels (GELU and bias + GELU in ``gelu.py``, the bias add in
``linear.py``, switch ``TUNING["cupy"]["elementwise_vectorized"]``) and the bias gradient as one GEMM
(``linear.column_sums``): on a GPU against float64 NumPy, forward and every gradient, float16/32/64,
with the kernel choice checked (the ``_vec`` kernels exactly where C % VEC == 0); on NumPy
``column_sums`` is the plain sum."""
import numpy as np
import pytest

from npgpt import Tensor, backend
from npgpt import functional as F
from npgpt.backend import to_numpy
from npgpt.layers import _cuda, tuning
from npgpt.layers.bias_gelu import bias_gelu, bias_gelu_reference
from npgpt.layers.linear import column_sums

DTYPES = [np.float16, np.float32, np.float64]
TOL = {np.float16: 1e-2, np.float32: 2e-5, np.float64: 1e-12}   # relative to the largest |reference|
SHAPES = [(33, 128), (5, 2304), (7, 130), (3, 12)]


@pytest.fixture
def launched(monkeypatch, kernel_launches):
    """The vectorized elementwise kernels switched on; the names of the RawKernels launched."""
    monkeypatch.setitem(tuning.TUNING["cupy"], "elementwise_vectorized", True)
    return kernel_launches


def grads_of(fn, arrays, xp, dout_seed=7):
    """fn(*Tensors) -> (out, gradients) with a fixed random dout, as float64 NumPy arrays."""
    ts = [Tensor(xp.asarray(a), requires_grad=True) for a in arrays]
    out = fn(*ts)
    dout = np.random.default_rng(dout_seed).normal(size=out.shape).astype(out.dtype)
    out.backward(xp.asarray(dout))
    return [to_numpy(a).astype(np.float64) for a in [out.data] + [t.grad for t in ts]]


def close(got, want, dtype):
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.isfinite(g).all()
        np.testing.assert_allclose(g, w, rtol=TOL[dtype], atol=TOL[dtype] * max(np.abs(w).max(), 1e-30))


def reference(fn, arrays):
    with backend.default_dtype(np.float64):
        return grads_of(fn, [a.astype(np.float64) for a in arrays], np)


def gelu_case(N, C, dtype):
    """GELU(x), x (N, C): (op, its float64 reference op, inputs)."""
    x = (np.random.default_rng(N * C).normal(size=(N, C)) * 3).astype(dtype)
    return F.gelu, F.gelu, [x]


def bias_gelu_case(N, C, dtype):
    """GELU(h + b), h (N, C), b (C,): (op, its float64 reference op, inputs)."""
    rng = np.random.default_rng(C)
    h, b = (rng.normal(size=(N, C)) * 3).astype(dtype), rng.normal(size=C).astype(dtype)
    return bias_gelu, bias_gelu_reference, [h, b]


@pytest.mark.cupy
@pytest.mark.parametrize("case", [gelu_case, bias_gelu_case], ids=["gelu", "bias_gelu"])
@pytest.mark.parametrize("N, C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_kernels(cp, launched, case, dtype, N, C):
    fn, ref, arrays = case(N, C, dtype)
    got, names = grads_of(fn, arrays, cp), list(launched)    # before the reference (float64, maybe on the GPU)
    close(got, reference(ref, arrays), dtype)
    applies = C % _cuda.vector_width(dtype) == 0
    assert ("npgpt_gelu_fwd_vec" in names) == applies and ("npgpt_gelu_bwd_vec" in names) == applies


@pytest.mark.cupy
@pytest.mark.parametrize("N, C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_bias_add_and_bias_gradient(cp, launched, dtype, N, C):
    """y = x W + b: the bias added by the vectorized kernel, its gradient by column_sums (one GEMM
    for float16/float32), both against float64 NumPy."""
    rng = np.random.default_rng(N + C)
    x, W, b = rng.normal(size=(2, N, 16)).astype(dtype), (rng.normal(size=(16, C)) / 4).astype(dtype), \
        rng.normal(size=C).astype(dtype)
    got, names = grads_of(F.linear, [x, W, b], cp), list(launched)
    close(got, reference(F.linear, [x, W, b]), dtype)
    assert ("npgpt_bias_add_vec" in names) == (C % _cuda.vector_width(dtype) == 0)


@pytest.mark.cupy
def test_column_sums_of_many_rows_in_float32(cp):
    """16384 float16 rows: summed in float32 (a float16 running sum would be off by far more)."""
    dout = np.random.default_rng(0).normal(size=(16384, 24)).astype(np.float16)
    want = dout.astype(np.float64).sum(0)
    np.testing.assert_allclose(to_numpy(column_sums(cp.asarray(dout))).astype(np.float64), want,
                               rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_column_sums_on_numpy_is_the_sum():
    dout = np.random.default_rng(1).normal(size=(50, 7)).astype(np.float32)
    np.testing.assert_allclose(column_sums(dout), dout.sum(0), rtol=1e-6)
    half = dout.astype(np.float16)
    assert column_sums(half).dtype == np.float16
