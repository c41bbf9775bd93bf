"""Every primitive op: float64 gradcheck over hypothesis-drawn shapes, known answers from the math,
and dtype preservation (float32 in, float32 out and float32 gradients)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import npgpt
from npgpt import Tensor, gradcheck, ops
from npgpt.backend import to_numpy

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)
pairs = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, min_side=1, max_side=3)
seeds = st.integers(0, 2**32 - 1)


def normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape)


def positive(seed, shape):
    return np.random.default_rng(seed).uniform(0.3, 2.0, size=shape)


def away_from_zero(seed, shape):
    r = np.random.default_rng(seed)
    return r.uniform(0.2, 1.5, shape) * r.choice([-1.0, 1.0], shape)


# ---- binary elementwise with broadcasting both ways ----------------------------------------------

BINARY = {
    "add": (lambda a, b: a + b, normal, normal),
    "sub": (lambda a, b: a - b, normal, normal),
    "mul": (lambda a, b: a * b, normal, normal),
    "div": (lambda a, b: a / b, normal, positive),
    "pow": (lambda a, b: a ** b, positive, normal),
}


@pytest.mark.parametrize("name", BINARY)
@given(shp=pairs, seed=seeds)
def test_binary_gradcheck(xp, name, shp, seed):
    fn, da, db = BINARY[name]
    (sa, sb), _ = shp
    assert gradcheck(fn, [xp.asarray(da(seed, sa)), xp.asarray(db(seed + 1, sb))])


def test_binary_known_answers(xp, f64):
    a = Tensor(xp.asarray([[1.0], [2.0]]), requires_grad=True)   # (2, 1)
    b = Tensor(xp.asarray([3.0, 4.0, 5.0]), requires_grad=True)  # (3,)
    (a / b).sum().backward()
    # d/da_i sum_j a_i/b_j = sum_j 1/b_j ; d/db_j = -sum_i a_i / b_j^2
    np.testing.assert_allclose(to_numpy(a.grad), np.full((2, 1), 1 / 3 + 1 / 4 + 1 / 5))
    np.testing.assert_allclose(to_numpy(b.grad), -3.0 / np.array([9.0, 16.0, 25.0]))
    x = Tensor(xp.asarray([2.0]), requires_grad=True)
    (x ** 3).backward(xp.ones(1))            # 3 x^2 = 12
    (2.0 ** x).backward(xp.ones(1))          # 2^x ln 2 = 4 ln 2
    np.testing.assert_allclose(to_numpy(x.grad), [12.0 + 4 * np.log(2.0)])
    y = Tensor(xp.asarray([1.0, 2.0]), requires_grad=True)
    (10.0 - y * 3.0 + 1.0 / y).sum().backward()  # -3 - 1/y^2
    np.testing.assert_allclose(to_numpy(y.grad), [-4.0, -3.25])


# ---- matmul --------------------------------------------------------------------------------------

@st.composite
def matmul_shapes(draw):
    n, k, m = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    (ba, bb), _ = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=3))
    sa, sb = ba + (n, k), bb + (k, m)
    if draw(st.booleans()) and not ba:
        sa = (k,)                      # 1-D left operand
    elif draw(st.booleans()) and not bb:
        sb = (k,)                      # 1-D right operand
    return sa, sb


@given(shp=matmul_shapes(), seed=seeds)
def test_matmul_gradcheck(xp, shp, seed):
    sa, sb = shp
    a, b = normal(seed, sa), normal(seed + 1, sb)
    out = (Tensor(xp.asarray(a)) @ Tensor(xp.asarray(b))).numpy()
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda x, y: x @ y, [xp.asarray(a), xp.asarray(b)])


def test_matmul_known_answer(xp, f64):
    # C = A B, L = sum(C): dA = 1 B^T (row sums of B), dB = A^T 1 (column sums of A)
    A = Tensor(xp.asarray([[1.0, 2.0], [3.0, 4.0]]), requires_grad=True)
    B = Tensor(xp.asarray([[5.0, 6.0], [7.0, 8.0]]), requires_grad=True)
    (A @ B).sum().backward()
    np.testing.assert_allclose(to_numpy(A.grad), [[11.0, 15.0], [11.0, 15.0]])
    np.testing.assert_allclose(to_numpy(B.grad), [[4.0, 4.0], [6.0, 6.0]])
    with pytest.raises(ValueError, match="at least 1 dimension"):
        Tensor(xp.asarray(2.0)) @ B


# ---- unary ---------------------------------------------------------------------------------------

UNARY = {
    "neg": (lambda x: -x, normal, lambda x: -1.0),
    "exp": (ops.exp, normal, np.exp),
    "log": (ops.log, positive, lambda x: 1 / x),
    "tanh": (ops.tanh, normal, lambda x: 1 - np.tanh(x) ** 2),
    "sqrt": (ops.sqrt, positive, lambda x: 0.5 / np.sqrt(x)),
    "relu": (ops.relu, away_from_zero, lambda x: (x > 0) * 1.0),
    "abs": (ops.abs, away_from_zero, np.sign),
}


@pytest.mark.parametrize("name", UNARY)
@given(shape=shapes, seed=seeds)
def test_unary_gradcheck(xp, name, shape, seed):
    fn, dom, _ = UNARY[name]
    assert gradcheck(fn, [xp.asarray(dom(seed, shape))])


@pytest.mark.parametrize("name", UNARY)
def test_unary_known_derivative(xp, f64, name):
    fn, dom, deriv = UNARY[name]
    x = dom(7, (5,))
    t = Tensor(xp.asarray(x), requires_grad=True)
    fn(t).sum().backward()
    np.testing.assert_allclose(to_numpy(t.grad), np.broadcast_to(deriv(x), x.shape), rtol=1e-12)


def test_relu_abs_at_zero_use_zero_subgradient(xp):
    x = Tensor(xp.zeros(2), requires_grad=True)
    (x.relu() + abs(x)).sum().backward()
    np.testing.assert_array_equal(to_numpy(x.grad), [0.0, 0.0])


# ---- reductions ----------------------------------------------------------------------------------

@st.composite
def shape_and_axis(draw, min_dims=0):
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=3, min_side=1, max_side=4))
    if not shape or draw(st.booleans()):
        return shape, None
    axes = draw(st.lists(st.integers(-len(shape), len(shape) - 1), min_size=1, max_size=len(shape),
                         unique_by=lambda a: a % len(shape)))
    return shape, axes[0] if len(axes) == 1 else tuple(axes)


@pytest.mark.parametrize("name", ["sum", "mean", "var"])
@given(sa=shape_and_axis(), keepdims=st.booleans(), seed=seeds)
def test_reduction_gradcheck(xp, name, sa, keepdims, seed):
    shape, axis = sa
    x = normal(seed, shape)
    fn = lambda t: getattr(t, name)(axis=axis, keepdims=keepdims)  # noqa: E731
    np.testing.assert_allclose(fn(Tensor(xp.asarray(x))).numpy(), getattr(np, name)(x, axis=axis, keepdims=keepdims),
                               rtol=1e-12, atol=1e-12)
    assert gradcheck(fn, [xp.asarray(x)])


@given(sa=shape_and_axis(), keepdims=st.booleans(), seed=seeds)
def test_max_gradcheck(xp, sa, keepdims, seed):
    shape, axis = sa
    n = int(np.prod(shape))
    x = np.random.default_rng(seed).permutation(n).reshape(shape) * 0.1  # distinct: no ties
    assert gradcheck(lambda t: t.max(axis=axis, keepdims=keepdims), [xp.asarray(x)])


def test_reduction_known_answers(xp, f64):
    x = Tensor(xp.asarray([[1.0, 5.0, 5.0], [2.0, 0.0, -1.0]]), requires_grad=True)
    x.max(axis=1).sum().backward()  # ties split evenly: row 0 has two maxima
    np.testing.assert_allclose(to_numpy(x.grad), [[0, 0.5, 0.5], [1, 0, 0]])
    x.zero_grad()
    x.mean().backward()
    np.testing.assert_allclose(to_numpy(x.grad), np.full((2, 3), 1 / 6))
    x.zero_grad()
    x.var(axis=1, ddof=1).sum().backward()  # 2 (x - mean) / (N - 1)
    v = np.array([[1.0, 5.0, 5.0], [2.0, 0.0, -1.0]])
    np.testing.assert_allclose(to_numpy(x.grad), (v - v.mean(1, keepdims=True)))
    with pytest.raises(ValueError, match="ddof"):
        Tensor(xp.ones(2)).var(ddof=2)


# ---- shape ops -----------------------------------------------------------------------------------

@given(shape=shapes, seed=seeds, data=st.data())
def test_reshape_transpose_gradcheck(xp, shape, seed, data):
    perm = data.draw(st.permutations(range(len(shape))))
    x = xp.asarray(normal(seed, shape))
    w = normal(seed + 1, (int(np.prod(shape)),))
    assert gradcheck(lambda t: t.transpose(*perm).reshape(-1) * Tensor(xp.asarray(w)), [x])
    assert gradcheck(lambda t: t.T, [x])
    np.testing.assert_array_equal(Tensor(x).transpose(*perm).numpy(), np.transpose(to_numpy(x), perm))


@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5), seed=seeds, data=st.data())
def test_getitem_gradcheck(xp, shape, seed, data):
    n0 = shape[0]
    ids = np.asarray(data.draw(st.lists(st.integers(-n0, n0 - 1), min_size=1, max_size=6)))
    lo = data.draw(st.integers(0, n0 - 1))
    step = data.draw(st.integers(1, 3))
    x = xp.asarray(normal(seed, shape))
    assert gradcheck(lambda t: t[ids], [x])                     # integer array, repeats accumulate
    assert gradcheck(lambda t: t[lo::step], [x])                # slice
    assert gradcheck(lambda t: t[..., None, -1], [x])           # ellipsis, new axis, int
    mask = np.random.default_rng(seed).random(shape) > 0.5
    assert gradcheck(lambda t: t[xp.asarray(mask)] * 1.0, [x])  # boolean mask


def test_getitem_repeated_indices_accumulate(xp, f64):
    x = Tensor(xp.asarray([10.0, 20.0, 30.0]), requires_grad=True)
    x[[0, 2, 0, 0]].sum().backward()
    np.testing.assert_array_equal(to_numpy(x.grad), [3.0, 0.0, 1.0])
    y = Tensor(xp.ones((2, 3)), requires_grad=True)
    y[xp.asarray([1, 1]), xp.asarray([0, 0])].sum().backward()
    np.testing.assert_array_equal(to_numpy(y.grad), [[0, 0, 0], [2, 0, 0]])


@given(seed=seeds, data=st.data())
def test_concatenate_stack_split_gradcheck(xp, seed, data):
    base = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3))
    axis = data.draw(st.integers(0, len(base) - 1))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    arrs = []
    for i, s in enumerate(sizes):
        sh = list(base)
        sh[axis] = s
        arrs.append(xp.asarray(normal(seed + i, sh)))
    assert gradcheck(lambda *ts: npgpt.concatenate(ts, axis=axis), arrs)
    same = [xp.asarray(normal(seed + 10 + i, base)) for i in range(len(sizes))]
    assert gradcheck(lambda *ts: npgpt.stack(ts, axis=axis), same)
    total = sum(sizes)
    points = list(np.cumsum(sizes)[:-1])
    cat = xp.asarray(normal(seed + 20, tuple(total if i == axis else n for i, n in enumerate(base))))
    assert gradcheck(lambda t: [p * (k + 1.0) for k, p in enumerate(npgpt.split(t, points, axis=axis))], [cat])


def test_split_known_answer_and_errors(xp):
    x = Tensor(xp.arange(6.0), requires_grad=True)
    a, b, c = npgpt.split(x, 3)
    np.testing.assert_array_equal(b.numpy(), [2.0, 3.0])
    (a.sum() * 1.0 + c.sum() * 3.0).backward()
    np.testing.assert_array_equal(to_numpy(x.grad), [1, 1, 0, 0, 3, 3])
    with pytest.raises(ValueError, match="equal sections"):
        npgpt.split(x, 4)


@given(shp=pairs, seed=seeds)
def test_where_masked_fill_gradcheck(xp, shp, seed):
    (sa, sb), out_shape = shp
    cond = xp.asarray(np.random.default_rng(seed).random(out_shape) > 0.5)
    assert gradcheck(lambda a, b: npgpt.where(cond, a, b), [xp.asarray(normal(seed, sa)), xp.asarray(normal(seed + 1, sb))])
    mask = xp.asarray(np.random.default_rng(seed + 2).random(sa) > 0.5)
    assert gradcheck(lambda a: a.masked_fill(mask, -5.0), [xp.asarray(normal(seed, sa))])


def test_masked_fill_known_answer(xp):
    x = Tensor(xp.asarray([[1.0, 2.0], [3.0, 4.0]]), requires_grad=True)
    causal = xp.asarray(np.triu(np.ones((2, 2), bool), 1))
    y = x.masked_fill(causal, float("-inf"))
    assert to_numpy(y.data)[0, 1] == -np.inf
    (y.masked_fill(causal, 0.0) * 2).sum().backward()
    np.testing.assert_array_equal(to_numpy(x.grad), [[2.0, 0.0], [2.0, 2.0]])


# ---- dtype preservation --------------------------------------------------------------------------

DTYPE_CASES = {
    "add": lambda a, b: a + 1.5 + b, "sub": lambda a, b: 2.0 - a - b, "mul": lambda a, b: a * b * 0.5,
    "div": lambda a, b: a / (b * b + 1.0) / 3.0, "pow": lambda a, b: (a * a + 1.0) ** 0.5 + (b * b + 1.0) ** b,
    "matmul": lambda a, b: a @ b.T, "neg": lambda a, b: -a, "exp": lambda a, b: a.exp(),
    "log": lambda a, b: (a * a + 1.0).log(), "tanh": lambda a, b: a.tanh(), "sqrt": lambda a, b: (a * a + 1.0).sqrt(),
    "relu": lambda a, b: a.relu(), "abs": lambda a, b: abs(a), "sum": lambda a, b: a.sum(axis=0),
    "mean": lambda a, b: a.mean(axis=1), "max": lambda a, b: a.max(axis=0), "var": lambda a, b: a.var(axis=1),
    "reshape": lambda a, b: a.reshape(-1), "transpose": lambda a, b: a.T, "getitem": lambda a, b: a[[0, 0]],
    "concatenate": lambda a, b: npgpt.concatenate([a, b]), "stack": lambda a, b: npgpt.stack([a, b]),
    "split": lambda a, b: npgpt.split(a, 2, axis=1)[0], "where": lambda a, b: npgpt.where(a.data > 0, a, 0.0),
    "masked_fill": lambda a, b: a.masked_fill(a.data > 0, 0.0),
}


@pytest.mark.parametrize("name", DTYPE_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved(xp, name, dtype):
    r = np.random.default_rng(0)
    a = Tensor(xp.asarray(r.normal(size=(3, 4)), dtype=dtype), requires_grad=True)
    b = Tensor(xp.asarray(r.normal(size=(3, 4)), dtype=dtype), requires_grad=True)
    out = DTYPE_CASES[name](a, b)
    assert out.dtype == dtype
    out.sum().backward()
    assert a.grad.dtype == dtype
    assert b.grad is None or b.grad.dtype == dtype
