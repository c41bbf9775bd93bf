"""The fused layers of ``npgpt.functional``: float64 gradcheck over hypothesis-drawn shapes, equality
(forward and gradients) with the same function composed from engine primitives, known answers from
the math, float32 preservation, and parity with PyTorch."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npgpt import Tensor, backend, gradcheck
from npgpt import functional as F
from npgpt.backend import to_numpy
from npgpt.layers.tuning import TUNING

seeds = st.integers(0, 2**32 - 1)
side = st.integers(1, 3)      # B, T, NH
width = st.integers(1, 6)     # C, V, hs


def normal(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape)


def integers(seed, high, *shape):
    return np.random.default_rng(seed).integers(0, high, shape)


# ---- the same layers composed from primitives (the reference for equality) ----------------------
# Each layer's ``<layer>_reference`` lives beside it in ``npgpt/layers/``.

linear_ref = F.linear_reference
embedding_ref = F.embedding_reference
layer_norm_ref = F.layer_norm_reference
gelu_ref = F.gelu_reference
softmax_ref = F.softmax_reference
cross_entropy_ref = F.cross_entropy_reference


attention_ref = F.attention_reference


# ---- helpers -------------------------------------------------------------------------------------

def run(fn, arrays, dout_seed=0, consts=()):
    """fn(*Tensors, *consts) and the gradients of sum(r * out) for a fixed random r."""
    ts = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*ts, *consts)
    xp = backend.get_array_module(out.data)
    r = xp.asarray(normal(dout_seed, *out.shape), dtype=out.dtype)
    out.backward(r)
    return to_numpy(out.data), [to_numpy(t.grad) if t.grad is not None else None for t in ts]


def assert_same(fused, composed, arrays, consts=(), tol=1e-10):
    """Forward and every gradient of the fused layer equal the composed one to ``tol`` (float64)."""
    out1, g1 = run(fused, arrays, consts=consts)
    out2, g2 = run(composed, arrays, consts=consts)
    assert out1.dtype == np.float64
    assert out1.shape == out2.shape
    np.testing.assert_allclose(out1, out2, rtol=0, atol=tol)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def attention_shapes():
    return st.tuples(side, side, st.integers(1, 4), st.integers(0, 3), st.integers(1, 4))


# ---- linear --------------------------------------------------------------------------------------

@given(B=side, T=side, cin=width, cout=width, bias=st.booleans(), seed=seeds)
def test_linear(xp, B, T, cin, cout, bias, seed):
    arrays = [xp.asarray(normal(seed, B, T, cin)), xp.asarray(normal(seed + 1, cin, cout))]
    arrays += [xp.asarray(normal(seed + 2, cout))] if bias else []
    assert gradcheck(F.linear, arrays)
    assert_same(F.linear, linear_ref, arrays)


def test_linear_known_answer(xp):
    x = Tensor(xp.asarray([[1.0, 2.0]]), requires_grad=True)                 # (1, 2)
    w = Tensor(xp.asarray([[1.0, 0.0, 2.0], [0.0, 1.0, 3.0]]), requires_grad=True)
    b = Tensor(xp.asarray([0.5, 0.0, -1.0]), requires_grad=True)
    y = F.linear(x, w, b)
    np.testing.assert_array_equal(to_numpy(y.data), [[1.5, 2.0, 7.0]])
    y.sum().backward()
    np.testing.assert_array_equal(to_numpy(x.grad), [[3.0, 4.0]])         # row sums of W
    np.testing.assert_array_equal(to_numpy(w.grad), [[1.0] * 3, [2.0] * 3])
    np.testing.assert_array_equal(to_numpy(b.grad), [1.0, 1.0, 1.0])


# ---- embedding -----------------------------------------------------------------------------------

@given(B=side, T=side, V=width, C=width, seed=seeds)
def test_embedding(xp, B, T, V, C, seed):
    ids = xp.asarray(integers(seed, V, B, T))
    w = xp.asarray(normal(seed, V, C))
    assert gradcheck(lambda w: F.embedding(ids, w), [w])
    assert_same(lambda w: F.embedding(ids, w), lambda w: embedding_ref(ids, w), [w])


def test_embedding_known_answer_counts_repeats(xp):
    w = Tensor(xp.asarray(np.arange(12.0).reshape(4, 3)), requires_grad=True)
    ids = xp.asarray([[2, 0, 2], [2, 3, 0]])
    out = F.embedding(ids, w)                                                # (2, 3, 3)
    np.testing.assert_array_equal(to_numpy(out.data)[0, 0], [6.0, 7.0, 8.0])
    out.sum().backward()
    np.testing.assert_array_equal(to_numpy(w.grad), np.repeat([[2.0], [0.0], [3.0], [1.0]], 3, axis=1))


def test_embedding_grad_methods_agree():
    """Both NumPy scatter-adds of the embedding backward, (E2) sorted and (E3) one-hot, give
    np.add.at's answer, small and large V."""
    from npgpt.layers.embedding import embedding_backward_one_hot, embedding_backward_sorted
    rng = np.random.default_rng(0)
    for V in (5, 65, 3000):
        ids = rng.integers(0, V, 300)
        dout = rng.normal(size=(300, 7))
        expected = np.zeros((V, 7))
        np.add.at(expected, ids, dout)
        for fn in (embedding_backward_one_hot, embedding_backward_sorted):
            np.testing.assert_allclose(fn(ids, dout, V), expected, rtol=0, atol=1e-12)


def test_embedding_rejects_float_ids(xp):
    with pytest.raises(TypeError, match="integers"):
        F.embedding(xp.asarray([0.0, 1.0]), Tensor(xp.ones((2, 3))))


# ---- layer_norm ----------------------------------------------------------------------------------

@given(B=side, T=side, C=width, affine=st.booleans(), seed=seeds)
def test_layer_norm(xp, B, T, C, affine, seed):
    arrays = [xp.asarray(normal(seed, B, T, C))]
    arrays += [xp.asarray(normal(seed + 1, C)), xp.asarray(normal(seed + 2, C))] if affine else []
    assert gradcheck(F.layer_norm, arrays)
    assert_same(F.layer_norm, layer_norm_ref, arrays)


def test_layer_norm_known_answer(xp):
    x = xp.asarray(normal(0, 4, 7) * 3 + 5)
    y = to_numpy(F.layer_norm(Tensor(x), eps=0.0).data)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, atol=1e-12)
    w, b = Tensor(xp.full(7, 2.0)), Tensor(xp.full(7, -1.0))
    np.testing.assert_allclose(to_numpy(F.layer_norm(Tensor(x), w, b, eps=0.0).data), 2 * y - 1, atol=1e-12)


# ---- gelu ----------------------------------------------------------------------------------------

@given(B=side, T=side, C=width, seed=seeds)
def test_gelu(xp, B, T, C, seed):
    x = xp.asarray(normal(seed, B, T, C) * 2)
    assert gradcheck(F.gelu, [x])
    assert_same(F.gelu, gelu_ref, [x])


def test_gelu_known_answer(xp):
    x = Tensor(xp.asarray([0.0, 30.0, -30.0]), requires_grad=True)
    y = F.gelu(x)
    np.testing.assert_allclose(to_numpy(y.data), [0.0, 30.0, 0.0], atol=1e-12)   # gelu(0)=0, ~relu far out
    y.backward(xp.ones(3))
    np.testing.assert_allclose(to_numpy(x.grad), [0.5, 1.0, 0.0], atol=1e-12)  # gelu'(0) = 1/2


# ---- softmax -------------------------------------------------------------------------------------

@given(B=side, T=side, C=width, axis=st.sampled_from([-1, 0, 1]), seed=seeds)
def test_softmax(xp, B, T, C, axis, seed):
    x = xp.asarray(normal(seed, B, T, C) * 3)
    assert gradcheck(lambda x: F.softmax(x, axis), [x])
    assert_same(lambda x: F.softmax(x, axis), lambda x: softmax_ref(x, axis), [x])


def test_softmax_known_answer(xp):
    p = to_numpy(F.softmax(Tensor(xp.full((2, 4), 1000.0))).data)           # equal logits, huge: no overflow
    np.testing.assert_allclose(p, 0.25, atol=1e-15)
    p = to_numpy(F.softmax(Tensor(xp.asarray([0.0, math.log(3.0)]))).data)
    np.testing.assert_allclose(p, [0.25, 0.75], atol=1e-15)


# ---- cross_entropy -------------------------------------------------------------------------------

@given(B=side, T=side, V=width, seed=seeds, p_ignore=st.sampled_from([0.0, 0.4]))
def test_cross_entropy(xp, B, T, V, seed, p_ignore):
    t = integers(seed, V, B, T)
    t[np.random.default_rng(seed).random((B, T)) < p_ignore] = -100
    if (t == -100).all():
        t[0, 0] = 0
    targets = xp.asarray(t)
    x = xp.asarray(normal(seed, B, T, V) * 2)
    assert gradcheck(lambda x: F.cross_entropy(x, targets), [x])
    assert_same(lambda x: F.cross_entropy(x, targets), lambda x: cross_entropy_ref(x, targets), [x])


def test_cross_entropy_known_answers(xp):
    x = Tensor(xp.zeros((2, 3, 5)), requires_grad=True)                      # uniform: loss = log V
    loss = F.cross_entropy(x, xp.asarray([[0, 1, 4], [2, 3, 3]]))
    assert loss.shape == ()
    np.testing.assert_allclose(loss.item(), math.log(5), atol=1e-15)
    loss.backward()
    g = to_numpy(x.grad)                                                      # (1/V - onehot) / N
    np.testing.assert_allclose(g[0, 0], np.array([-0.8, 0.2, 0.2, 0.2, 0.2]) / 6, atol=1e-15)
    big = Tensor(xp.asarray([[1000.0, 0.0]]))                                # stable: no overflow
    np.testing.assert_allclose(F.cross_entropy(big, xp.asarray([1])).item(), 1000.0)
    np.testing.assert_allclose(F.cross_entropy(big, xp.asarray([0])).item(), 0.0, atol=1e-12)


def test_cross_entropy_all_ignored_is_zero(xp):
    x = Tensor(xp.asarray(normal(0, 2, 3)), requires_grad=True)
    loss = F.cross_entropy(x, xp.asarray([-100, -100]))
    assert loss.item() == 0.0
    loss.backward()
    np.testing.assert_array_equal(to_numpy(x.grad), 0.0)


def test_cross_entropy_bad_targets(xp):
    with pytest.raises(ValueError, match="positions"):
        F.cross_entropy(Tensor(xp.zeros((2, 3))), xp.asarray([0, 1, 2]))
    if xp is np:
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            F.cross_entropy(Tensor(xp.zeros((2, 3))), xp.asarray([0, 3]))
    else:   # checking would make the host wait for the GPU: the loss is NaN instead
        assert np.isnan(F.cross_entropy(Tensor(xp.zeros((2, 3))), xp.asarray([0, 3])).item())


# ---- scaled_dot_product_attention ----------------------------------------------------------------

@given(shape=attention_shapes(), seed=seeds)
def test_attention_causal(xp, shape, seed):
    B, NH, Tq, extra, hs = shape                                            # Tk = Tq + extra >= Tq
    q = xp.asarray(normal(seed, B, NH, Tq, hs))
    k, v = xp.asarray(normal(seed + 1, B, NH, Tq + extra, hs)), xp.asarray(normal(seed + 2, B, NH, Tq + extra, hs))
    assert gradcheck(F.scaled_dot_product_attention, [q, k, v])
    assert_same(F.scaled_dot_product_attention, attention_ref, [q, k, v])


@given(shape=attention_shapes(), seed=seeds)
def test_attention_bool_mask(xp, shape, seed):
    B, NH, Tq, Tk, hs = shape
    Tk += 1
    keep = np.random.default_rng(seed).random((B, 1, Tq, Tk)) < 0.6
    keep[..., 0] = True                                                      # no row fully masked
    mask = xp.asarray(keep)
    q = xp.asarray(normal(seed, B, NH, Tq, hs))
    k, v = xp.asarray(normal(seed + 1, B, NH, Tk, hs)), xp.asarray(normal(seed + 2, B, NH, Tk, hs))
    fused = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=False, attn_mask=mask)  # noqa: E731
    assert gradcheck(fused, [q, k, v])
    assert_same(fused, lambda q, k, v: attention_ref(q, k, v, is_causal=False, attn_mask=mask), [q, k, v])
    additive = xp.asarray(np.where(keep, 0.0, -np.inf))                      # the same mask, additive
    np.testing.assert_array_equal(
        to_numpy(F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), False, additive).data),
        to_numpy(fused(Tensor(q), Tensor(k), Tensor(v)).data))


def test_attention_known_answers(xp):
    q = Tensor(xp.asarray(normal(0, 2, 3, 4, 5)), requires_grad=True)
    k = Tensor(xp.asarray(normal(1, 2, 3, 1, 5)), requires_grad=True)
    v = Tensor(xp.asarray(normal(2, 2, 3, 1, 5)), requires_grad=True)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=False)           # one key: returns v
    np.testing.assert_allclose(to_numpy(out.data), np.broadcast_to(to_numpy(v.data), (2, 3, 4, 5)), atol=1e-15)
    out.backward(xp.ones((2, 3, 4, 5)))
    np.testing.assert_allclose(to_numpy(q.grad), 0.0, atol=1e-15)            # softmax of one logit is flat
    # causal, Tq = Tk: the first query sees only the first key
    q2, k2, v2 = (Tensor(xp.asarray(normal(s, 1, 1, 3, 2))) for s in (3, 4, 5))
    out = F.scaled_dot_product_attention(q2, k2, v2)
    np.testing.assert_allclose(to_numpy(out.data)[0, 0, 0], to_numpy(v2.data)[0, 0, 0], atol=1e-15)


def test_attention_fully_masked_row_is_zero(xp):
    q, k, v = (Tensor(xp.asarray(normal(s, 1, 1, 2, 3)), requires_grad=True) for s in range(3))
    mask = xp.asarray([[True, True], [False, False]])
    out = F.scaled_dot_product_attention(q, k, v, is_causal=False, attn_mask=mask)
    assert np.isfinite(to_numpy(out.data)).all()
    np.testing.assert_array_equal(to_numpy(out.data)[0, 0, 1], 0.0)
    out.backward(xp.ones((1, 1, 2, 3)))
    assert all(np.isfinite(to_numpy(t.grad)).all() for t in (q, k, v))


def test_attention_kv_cache_matches_full_sequence(xp):
    """Queries for the last positions against all keys (Tq < Tk) = those rows of full attention."""
    q, k, v = (xp.asarray(normal(s, 2, 2, 5, 3)) for s in range(3))
    full = to_numpy(F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v)).data)
    last = to_numpy(F.scaled_dot_product_attention(Tensor(q[:, :, 3:]), Tensor(k), Tensor(v)).data)
    np.testing.assert_allclose(last, full[:, :, 3:], atol=1e-14)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        F.scaled_dot_product_attention(Tensor(q), Tensor(k[:, :, :2]), Tensor(v[:, :, :2]))


def test_attention_dropout(xp):
    """Dropout on the probabilities: same seed = same mask; the gradient is checked with it fixed."""
    q, k, v = (xp.asarray(normal(s, 1, 2, 4, 3)) for s in range(3))

    def fn(q, k, v):
        backend.seed(7)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert gradcheck(fn, [q, k, v])
    a, b = (to_numpy(fn(Tensor(q), Tensor(k), Tensor(v)).data) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, to_numpy(F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v)).data))


# ---- dropout -------------------------------------------------------------------------------------

def test_dropout(xp):
    x = Tensor(xp.ones((200, 500)), requires_grad=True)
    assert F.dropout(x, 0.0) is x and F.dropout(x, 0.5, training=False) is x
    backend.seed(3)
    y = F.dropout(x, 0.25)
    vals = to_numpy(y.data)
    assert set(np.unique(vals)) <= {0.0, 1 / 0.75}
    assert abs((vals == 0).mean() - 0.25) < 0.01 and abs(vals.mean() - 1.0) < 0.02  # E[y] = x
    y.backward(xp.full((200, 500), 2.0))
    np.testing.assert_array_equal(to_numpy(x.grad), 2 * vals)                 # same mask, same scale
    backend.seed(3)
    assert_same(lambda a: F.dropout(a, 0.25), lambda a: a * xp.asarray(vals), [x.data])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        F.dropout(x, 1.0)


# ---- the thread pool ----------------------------------------------------------------------------

CHUNK_MIN = TUNING["numpy"]["threads_min_elements"]
THREADED = {  # each big enough (>= CHUNK_MIN elements) to be split over the pool
    "gelu": (F.gelu, [(3, CHUNK_MIN // 3 + 7)]),
    "softmax": (F.softmax, [(600, 501)]),
    "softmax axis 0": (lambda x: F.softmax(x, axis=0), [(501, 600)]),
    "attention": (F.scaled_dot_product_attention, [(2, 9, 128, 16)] * 3),
    "layer_norm": (F.layer_norm, [(CHUNK_MIN // 301 + 5, 301), (301,), (301,)]),
    "layer_norm no bias": (F.layer_norm, [(CHUNK_MIN // 64 + 3, 64), (64,)]),
}


@pytest.mark.parametrize("name", THREADED)
def test_threaded_is_bit_identical(xp, name, monkeypatch):
    """Large arrays are split over threads; each element must come out exactly as in one call."""
    fn, shapes = THREADED[name]
    arrays = [xp.asarray(normal(i, *s), dtype=np.float32) for i, s in enumerate(shapes)]
    split = run(fn, arrays)
    monkeypatch.setitem(TUNING["numpy"], "threads_min_elements", 1 << 62)  # no array is large enough to split
    whole = run(fn, arrays)
    np.testing.assert_array_equal(split[0], whole[0])
    for a, b in zip(split[1], whole[1]):
        np.testing.assert_array_equal(a, b)


# ---- registry, dtype ----------------------------------------------------------------------------

def test_registered_checks_pass(xp):
    """Every fused layer registered for `npgpt gradcheck` passes it."""
    from npgpt import funcchecks  # noqa: F401
    from npgpt.gradcheck import CHECKS, gradcheck_report
    names = [n for n in CHECKS if n.startswith("F.")]
    assert len(names) >= 10
    rng = np.random.default_rng(0)
    for name in names:
        fn, make = CHECKS[name]
        report = gradcheck_report(fn, [xp.asarray(a) for a in make(rng)])
        assert report.ok, name
        assert report.max_abs_err < 1e-8, name


FLOAT32_CASES = {
    "linear": (F.linear, [(2, 3, 4), (4, 5), (5,)]),
    "embedding": (lambda w: F.embedding(np.array([[0, 2, 2]]), w), [(3, 4)]),
    "layer_norm": (F.layer_norm, [(2, 3, 5), (5,), (5,)]),
    "gelu": (F.gelu, [(2, 3, 5)]),
    "gelu threaded": (F.gelu, [(4, CHUNK_MIN // 2 + 1)]),
    "softmax": (F.softmax, [(2, 3, 5)]),
    "cross_entropy": (lambda x: F.cross_entropy(x, np.array([[0, 4, -100]])), [(1, 3, 5)]),
    "attention": (F.scaled_dot_product_attention, [(1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4)]),
    "attention dropout": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.2),
                          [(1, 2, 3, 4)] * 3),
    "dropout": (lambda x: F.dropout(x, 0.5), [(3, 4)]),
}


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_float32_preserved(xp, name):
    fn, shapes = FLOAT32_CASES[name]
    ts = [Tensor(xp.asarray(normal(i, *s), dtype=np.float32), requires_grad=True) for i, s in enumerate(shapes)]
    out = fn(*ts)
    assert out.dtype == np.float32
    out.backward(xp.ones(out.shape, dtype=np.float32))
    for t in ts:
        assert t.grad.dtype == np.float32


# ---- float16 -------------------------------------------------------------------------------------

def run_float16(xp, fn, arrays, seed=0):
    """fn on float16 copies of ``arrays`` and on the same values in float64, each with the same
    (float16-rounded) dout: [(out, grads) in float16, (out, grads) in float64], as NumPy arrays."""
    a16 = [np.asarray(a).astype(np.float16) for a in arrays]
    results = []
    for dtype in (np.float16, np.float64):
        ts = [Tensor(xp.asarray(a.astype(dtype)), requires_grad=True) for a in a16]
        out = fn(*ts)
        out.backward(xp.asarray(normal(seed, *out.shape).astype(np.float16).astype(out.dtype)))
        results.append((to_numpy(out.data), [to_numpy(t.grad) for t in ts]))
    return results


def assert_float16_close(got, ref, tol=1e-2):
    """float16 results equal the float64 ones to ``tol`` relative to the largest |ref|."""
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=tol, atol=tol * np.abs(ref).max())


FLOAT16_CASES = {
    "layer_norm": (F.layer_norm, [(4, 5, 48), (48,), (48,)], [3.0, 1.0, 1.0]),
    "layer_norm (no weight/bias)": (F.layer_norm, [(3, 33)], [100.0]),
    "gelu": (F.gelu, [(4, 5, 48)], [4.0]),
    "cross_entropy": (lambda x: F.cross_entropy(x, np.array([[0, 36, -100], [5, -100, 7]])), [(2, 3, 37)], [4.0]),
    "cross_entropy, huge logits": (lambda x: F.cross_entropy(x, np.array([1, 2, 3])), [(3, 11)], [2e4]),
}


@pytest.mark.parametrize("name", FLOAT16_CASES)
def test_float16(xp, name):
    """float16 in: float16 out (cross_entropy: a float32 loss) and float16 gradients, computed in
    float32 inside, so they match float64 math on the same inputs to float16 precision. Logits
    spread over float16's whole range (|x| <= 6e4) keep the loss finite."""
    fn, shapes, scales = FLOAT16_CASES[name]
    arrays = [np.clip(normal(i, *s) * k + (1.0 if i == 1 else 0.0), -6e4, 6e4)   # float16 max: 65504
              for i, (s, k) in enumerate(zip(shapes, scales))]
    (out16, g16), (out64, g64) = run_float16(xp, fn, arrays)
    assert out16.dtype == (np.float32 if name.startswith("cross_entropy") else np.float16)
    assert all(g.dtype == np.float16 for g in g16)
    assert_float16_close(out16, out64, tol=1e-5 if name.startswith("cross_entropy") else 1e-2)
    for a, b in zip(g16, g64):
        assert_float16_close(a, b)


# ---- parity with PyTorch -------------------------------------------------------------------------

def _torch_run(fn, arrays, dout):
    torch = pytest.importorskip("torch")
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(torch.tensor(dout) if out.ndim else None)
    return out.detach().numpy(), [t.grad.numpy() for t in ts]


def _ours_run(fn, arrays, dout, xp):
    ts = [Tensor(xp.asarray(a), requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(xp.asarray(dout) if out.ndim else None)
    return to_numpy(out.data), [to_numpy(t.grad) for t in ts]


def _assert_parity(ours, theirs, arrays, xp, tol=1e-10):
    dout = normal(99, *ours(*[Tensor(xp.asarray(a)) for a in arrays]).shape)
    a_out, a_grads = _ours_run(ours, arrays, dout, xp)
    b_out, b_grads = _torch_run(theirs, arrays, dout)
    np.testing.assert_allclose(a_out, b_out, rtol=tol, atol=tol)
    for a, b in zip(a_grads, b_grads):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_torch_parity_attention(xp):
    torch = pytest.importorskip("torch")
    TF = torch.nn.functional
    q, k, v = (normal(s, 2, 3, 6, 4) for s in range(3))
    _assert_parity(F.scaled_dot_product_attention,
                   lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], xp)
    # Tq < Tk (a KV cache): PyTorch's is_causal aligns top-left, so pass the end-aligned mask explicitly
    end_aligned = torch.ones(2, 6, dtype=torch.bool).tril(diagonal=6 - 2)
    _assert_parity(F.scaled_dot_product_attention,
                   lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, attn_mask=end_aligned),
                   [q[:, :, -2:], k, v], xp)
    keep = np.random.default_rng(0).random((2, 1, 6, 6)) < 0.7
    keep[..., 0] = True
    _assert_parity(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, False, xp.asarray(keep)),
                   lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, attn_mask=torch.tensor(keep)),
                   [q, k, v], xp)


def test_torch_parity_layers(xp):
    torch = pytest.importorskip("torch")
    TF = torch.nn.functional
    x, w, b = normal(0, 3, 4, 7), normal(1, 7) + 1, normal(2, 7)
    _assert_parity(F.layer_norm, lambda x, w, b: TF.layer_norm(x, (7,), w, b), [x, w, b], xp)
    _assert_parity(F.gelu, lambda x: TF.gelu(x, approximate="tanh"), [x * 3], xp)
    _assert_parity(F.softmax, lambda x: torch.softmax(x, -1), [x], xp)
    _assert_parity(F.linear, lambda x, w, b: x @ w + b, [x, normal(3, 7, 5), normal(4, 5)], xp)
    ids = integers(5, 7, 3, 4)
    _assert_parity(lambda w: F.embedding(xp.asarray(ids), w),
                   lambda w: TF.embedding(torch.tensor(ids), w), [normal(6, 7, 5)], xp)
    t = integers(7, 7, 3, 4)
    t[0, :2] = t[2, 3] = -100
    _assert_parity(lambda x: F.cross_entropy(x, xp.asarray(t)),
                   lambda x: TF.cross_entropy(x.reshape(-1, 7), torch.tensor(t).reshape(-1), ignore_index=-100),
                   [x * 2], xp)
