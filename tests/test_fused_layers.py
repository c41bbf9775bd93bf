"""The fused residual add + layer norm (``residual_layer_norm.py``) and bias + GELU
(``bias_gelu.py``): on NumPy their composed fallbacks against the engine-primitive references and
float64 finite differences; on a GPU their CUDA kernels against float64 NumPy (forward and every
gradient, float16/32/64, both orders in which r's two gradients can arrive)."""
import numpy as np
import pytest

from npgpt import Tensor, backend, gradcheck
from npgpt.backend import to_numpy
from npgpt.layers.bias_gelu import bias_gelu, bias_gelu_reference
from npgpt.layers.residual_layer_norm import residual_layer_norm, residual_layer_norm_reference

DTYPES = [np.float16, np.float32, np.float64]
TOL = {np.float16: 1e-2, np.float32: 2e-5, np.float64: 1e-12}


def arrays(seed, *shapes, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(dtype) for s in shapes]


def residual_loss(fused, x, d, w, b, c_r, c_y, r_first):
    """sum(c_r * r) + sum(c_y * LN(r)), r = x + d: the loss reaches r both ways, like a pre-LN block's
    residual stream (r_first: r's own use is built after the layer norm, so its gradient arrives first)."""
    r, y = (residual_layer_norm if fused else residual_layer_norm_reference)(x, d, w, b)
    xp = backend.get_array_module(x.data)
    terms = [(y * Tensor(xp.asarray(c_y))).sum(), (r * Tensor(xp.asarray(c_r))).sum()]
    return terms[0] + terms[1] if r_first else terms[1] + terms[0]


def test_residual_layer_norm_fallback_matches_reference(f64):
    x, d, c_r, c_y = arrays(0, (3, 5, 8), (3, 5, 8), (3, 5, 8), (3, 5, 8))
    w, b = arrays(1, (8,), (8,))
    r, y = residual_layer_norm(Tensor(x), Tensor(d), Tensor(w), Tensor(b))
    np.testing.assert_allclose(r.data, x + d, atol=1e-15)
    _, want = residual_layer_norm_reference(Tensor(x), Tensor(d), Tensor(w), Tensor(b))
    np.testing.assert_allclose(y.data, want.data, atol=1e-12)
    assert gradcheck(lambda *t: residual_loss(True, *t, c_r, c_y, True),
                     [Tensor(a, requires_grad=True) for a in (x, d, w, b)])


def test_bias_gelu_fallback_matches_reference(f64):
    h, b = arrays(2, (4, 6), (6,))
    y = bias_gelu(Tensor(h), Tensor(b))
    np.testing.assert_allclose(y.data, bias_gelu_reference(Tensor(h), Tensor(b)).data, atol=1e-15)
    assert gradcheck(bias_gelu, [Tensor(h, requires_grad=True), Tensor(b, requires_grad=True)])


# ---- the CUDA kernels (need a GPU) ---------------------------------------------------------------

# ``cp``: the CuPy kernel fixture of conftest.py


def grads_of(loss_fn, arrays_, xp):
    ts = [Tensor(xp.asarray(a), requires_grad=True) for a in arrays_]
    out = loss_fn(*ts)
    out.backward()
    return [float(to_numpy(out.data))] + [to_numpy(t.grad).astype(np.float64) for t in ts]


def close(got, want, dtype):
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, rtol=TOL[dtype], atol=TOL[dtype] * max(np.abs(w).max(initial=0), 1.0))


@pytest.mark.cupy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r_first", [True, False])
def test_residual_layer_norm_kernels(cp, dtype, r_first):
    x, d, c_r, c_y = arrays(3, (4, 7, 96), (4, 7, 96), (4, 7, 96), (4, 7, 96), dtype=dtype)
    w, b = arrays(4, (96,), (96,), dtype=dtype)
    got = grads_of(lambda *t: residual_loss(True, *t, c_r, c_y, r_first), (x, d, w, b), cp)
    with backend.default_dtype(np.float64):
        want = grads_of(lambda *t: residual_loss(False, *t, c_r.astype(np.float64), c_y.astype(np.float64), r_first),
                        [a.astype(np.float64) for a in (x, d, w, b)], np)
    close(got, want, dtype)


@pytest.mark.cupy
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu_kernels(cp, dtype):
    h, b, c = arrays(5, (33, 130), (130,), (33, 130), dtype=dtype)

    def loss(fused):
        return lambda h_, b_: ((bias_gelu if fused else bias_gelu_reference)(h_, b_)
                               * Tensor(backend.get_array_module(h_.data).asarray(c))).sum()
    got = grads_of(loss(True), (h, b), cp)
    with backend.default_dtype(np.float64):
        want = grads_of(loss(False), [a.astype(np.float64) for a in (h, b)], np)
    close(got, want, dtype)
