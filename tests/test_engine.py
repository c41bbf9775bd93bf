"""The graph machinery: topological backward, accumulation, no_grad, detach, freeing the graph."""
import gc
import sys
import weakref

import numpy as np
import pytest

import npgpt
from npgpt import Tensor, no_grad
from npgpt.backend import to_numpy


def test_scalar_backward_seeds_one(xp):
    x = Tensor(3.0, requires_grad=True)
    y = x * x * x  # dy/dx = 3x^2 = 27
    y.backward()
    assert float(x.grad) == pytest.approx(27.0)


def test_shared_subexpression_accumulates(xp):
    # y = a*b + a, z = y*y: dz/da = 2y (b + 1), dz/db = 2y a
    a = Tensor(2.0, requires_grad=True)
    b = Tensor(-3.0, requires_grad=True)
    y = a * b + a
    z = y * y
    z.backward()
    yv = 2.0 * -3.0 + 2.0
    assert float(a.grad) == pytest.approx(2 * yv * (-3.0 + 1))
    assert float(b.grad) == pytest.approx(2 * yv * 2.0)


def test_same_tensor_used_twice_in_one_op(xp):
    x = Tensor(xp.asarray([1.0, -2.0, 3.0]), requires_grad=True)
    (x * x).sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), 2 * np.array([1.0, -2.0, 3.0]))
    x.zero_grad()
    (x + x).sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), [2.0, 2.0, 2.0])


def test_broadcast_siblings_do_not_alias(xp):
    # out = a + b hands the same dout to both; accumulating more into a must not change b.grad
    a = Tensor(xp.ones(3), requires_grad=True)
    b = Tensor(xp.ones(3), requires_grad=True)
    s = a + b
    z = (s + a).sum()
    z.backward()
    np.testing.assert_allclose(to_numpy(a.grad), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(to_numpy(b.grad), [1.0, 1.0, 1.0])


def test_deep_chain_no_recursion_limit(xp, f64):
    x = Tensor(1.0, requires_grad=True)
    y = x
    n = max(10_000, sys.getrecursionlimit() + 100)
    for _ in range(n):
        y = y * 1.0001
    y.backward()
    assert float(x.grad) == pytest.approx(1.0001 ** n, rel=1e-4)


def test_no_grad_builds_no_graph(xp):
    x = Tensor(xp.ones(3), requires_grad=True)
    with no_grad():
        y = (x * 2).sum()
    assert not y.requires_grad and y.is_leaf and y._prev == ()
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    assert npgpt.is_grad_enabled()


def test_no_grad_as_decorator_and_enable_grad(xp):
    @no_grad()
    def f(t):
        with npgpt.enable_grad():
            inner = t * 2
        return t * 2, inner
    x = Tensor(1.0, requires_grad=True)
    outer, inner = f(x)
    assert not outer.requires_grad and inner.requires_grad


def test_backward_twice_accumulates(xp):
    x = Tensor(xp.asarray([1.0, 2.0]), requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(to_numpy(x.grad), 2 * 2 * np.array([1.0, 2.0]))
    # two separate graphs from the same leaf also accumulate
    (x * 3).sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), 4 * np.array([1.0, 2.0]) + 3)


def test_backward_through_freed_graph_raises(xp):
    x = Tensor(2.0, requires_grad=True)
    y = x * x
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_graph_is_freed_after_backward(xp):
    x = Tensor(xp.ones((4, 4)), requires_grad=True)
    h = x * 2
    ref = weakref.ref(h)
    y = (h * h).sum()
    del h
    y.backward()
    gc.collect()
    assert ref() is None, "intermediate tensor still referenced by the graph after backward"
    assert y._prev == () and y._backward is None


def test_intermediate_grads_released_unless_retained(xp):
    x = Tensor(xp.asarray([1.0, 2.0]), requires_grad=True)
    h = x * 3
    k = (x * 5).retain_grad()
    (h * k).sum().backward()
    assert h.grad is None
    np.testing.assert_allclose(to_numpy(k.grad), [3.0, 6.0])  # d(h*k)/dk = h


def test_detach_cuts_the_graph(xp):
    x = Tensor(xp.asarray([1.0, 2.0]), requires_grad=True)
    y = (x * x.detach()).sum()  # d/dx treats the detached copy as a constant: grad = x
    y.backward()
    np.testing.assert_allclose(to_numpy(x.grad), [1.0, 2.0])


def test_backward_with_explicit_grad(xp):
    x = Tensor(xp.asarray([1.0, 2.0, 3.0]), requires_grad=True)
    y = x * 2
    y.backward(xp.asarray([1.0, 0.0, -1.0]))
    np.testing.assert_allclose(to_numpy(x.grad), [2.0, 0.0, -2.0])
    with pytest.raises(RuntimeError, match="one-element"):
        (x * 2).backward()
    with pytest.raises(ValueError, match="shape"):
        (x * 2).backward(xp.ones(2))


def test_leaf_grad_is_writeable_owned_buffer(xp):
    x = Tensor(xp.ones((2, 3)), requires_grad=True)
    x.sum().backward()  # the sum's gradient is a broadcast view; the leaf must own a real array
    x.grad *= 0.5
    np.testing.assert_allclose(to_numpy(x.grad), 0.5)


def test_integer_tensors_cannot_require_grad(xp):
    with pytest.raises(TypeError, match="float"):
        Tensor(xp.arange(3), requires_grad=True)


def test_python_floats_get_default_dtype(xp):
    assert Tensor([1.0, 2.0]).dtype == np.float32
    with npgpt.backend.default_dtype(np.float64):
        assert Tensor(1.5).dtype == np.float64
    assert Tensor(xp.arange(3)).dtype.kind == "i"


def test_zero_grad_and_properties(xp):
    x = Tensor(xp.ones((2, 3)), requires_grad=True)
    (x * 2).sum().backward()
    assert x.shape == (2, 3) and x.ndim == 2 and x.size == 6 and len(x) == 2 and x.is_leaf
    x.zero_grad()
    assert x.grad is None
    assert "requires_grad=True" in repr(x)
