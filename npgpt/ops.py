"""Primitive differentiable ops, each forward followed directly by its backward (vector-Jacobian product).

For y = f(x) and a loss L, each backward receives ``dout`` = dL/dy and adds dL/dx = J_f(x)^T dL/dy
into ``x.grad``. Binary ops broadcast as NumPy does; a broadcast input's gradient is summed back to
its own shape by the one helper ``sum_to_shape`` (the adjoint of broadcasting is summation over the
broadcast axes). Everything works on numpy or cupy arrays through ``get_array_module``; dtypes are
preserved (Python scalars never upcast float32 under NumPy >= 2's promotion rules).
"""
import numbers

import numpy as np

from .backend import get_array_module
from .engine import Tensor, sum_to_shape, lift as _lift
from .shape_ops import (reshape, transpose, getitem, concatenate, stack, split,
                        where, masked_fill)

__all__ = ["sum_to_shape", "add", "sub", "mul", "div", "power", "matmul", "neg", "exp", "log", "tanh",
           "sqrt", "relu", "abs", "sum", "mean", "max", "var", "reshape", "transpose", "getitem",
           "concatenate", "stack", "split", "where", "masked_fill"]
# shape and selection ops live in shape_ops.py and sum_to_shape in engine.py; they are re-exported here

_builtin_abs, _builtin_max, _builtin_sum = abs, max, sum


# ---- elementwise binary ------------------------------------------------------------------------

def add(a, b):
    """a + b (broadcasting). d/da = 1, d/db = 1."""
    a, b = _lift(a, getattr(b, "data", None)), _lift(b, getattr(a, "data", None))

    def backward(dout):
        if a.requires_grad:
            a._accumulate(sum_to_shape(dout, a.shape))
        if b.requires_grad:
            b._accumulate(sum_to_shape(dout, b.shape))
    return Tensor.from_op(a.data + b.data, (a, b), backward, "add")


def sub(a, b):
    """a - b (broadcasting). d/da = 1, d/db = -1."""
    a, b = _lift(a, getattr(b, "data", None)), _lift(b, getattr(a, "data", None))

    def backward(dout):
        if a.requires_grad:
            a._accumulate(sum_to_shape(dout, a.shape))
        if b.requires_grad:
            b._accumulate(sum_to_shape(-dout, b.shape))
    return Tensor.from_op(a.data - b.data, (a, b), backward, "sub")


def mul(a, b):
    """a * b (broadcasting). d/da = b, d/db = a."""
    a, b = _lift(a, getattr(b, "data", None)), _lift(b, getattr(a, "data", None))

    def backward(dout):
        if a.requires_grad:
            a._accumulate(sum_to_shape(dout * b.data, a.shape))
        if b.requires_grad:
            b._accumulate(sum_to_shape(dout * a.data, b.shape))
    return Tensor.from_op(a.data * b.data, (a, b), backward, "mul")


def div(a, b):
    """a / b (broadcasting). d/da = 1/b, d/db = -a/b^2 = -out/b."""
    a, b = _lift(a, getattr(b, "data", None)), _lift(b, getattr(a, "data", None))
    out = a.data / b.data

    def backward(dout):
        g = dout / b.data
        if a.requires_grad:
            a._accumulate(sum_to_shape(g, a.shape))
        if b.requires_grad:
            b._accumulate(sum_to_shape(-g * out, b.shape))
    return Tensor.from_op(out, (a, b), backward, "div")


def power(a, b):
    """a ** b. d/da = b a^(b-1); d/db = a^b log a (needs a > 0 where b's gradient is wanted)."""
    a, b = _lift(a, getattr(b, "data", None)), _lift(b, getattr(a, "data", None))
    out = a.data ** b.data

    def backward(dout):
        if a.requires_grad:
            a._accumulate(sum_to_shape(dout * b.data * a.data ** (b.data - 1), a.shape))
        if b.requires_grad:
            b._accumulate(sum_to_shape(dout * out * get_array_module(out).log(a.data), b.shape))
    return Tensor.from_op(out, (a, b), backward, "pow")


def matmul(a, b):
    """a @ b with NumPy's rules: batched over leading axes (broadcasting both ways), 1-D operands
    promoted to row/column vectors. For C = A B: dA = dC B^T, dB = A^T dC, each summed back over
    broadcast batch axes. A stack times a matrix, (..., n, k) @ (k, m), runs as one 2-D GEMM."""
    a, b = _lift(a, None), _lift(b, None)
    A, B = a.data, b.data
    if A.ndim == 0 or B.ndim == 0:
        raise ValueError("matmul needs operands of at least 1 dimension; use * for scalars")
    A2 = A[None, :] if A.ndim == 1 else A          # (n,) -> (1, n)
    B2 = B[:, None] if B.ndim == 1 else B          # (n,) -> (n, 1)
    if B2.ndim == 2 and A2.ndim > 2:               # (..., n, k) @ (k, m) as one (N, k) @ (k, m) GEMM
        out2 = (A2.reshape(-1, A2.shape[-1]) @ B2).reshape(A2.shape[:-1] + (B2.shape[-1],))
    else:
        out2 = A2 @ B2
    out = out2
    if A.ndim == 1:
        out = out.squeeze(-2)
    if B.ndim == 1:
        out = out.squeeze(-1)

    def backward(dout):
        d2 = dout.reshape(out2.shape)               # undo the 1-D squeezes
        if a.requires_grad:
            if B2.ndim == 2 and A2.ndim > 2:
                dA = (d2.reshape(-1, d2.shape[-1]) @ B2.T).reshape(A2.shape)
            else:
                dA = d2 @ B2.swapaxes(-1, -2)
            a._accumulate(sum_to_shape(dA, A2.shape).reshape(A.shape))
        if b.requires_grad:
            if B2.ndim == 2 and A2.ndim > 2:        # sum over the stack inside one GEMM: (k, N) @ (N, m)
                dB = A2.reshape(-1, A2.shape[-1]).T @ d2.reshape(-1, d2.shape[-1])
            else:
                dB = A2.swapaxes(-1, -2) @ d2
            b._accumulate(sum_to_shape(dB, B2.shape).reshape(B.shape))
    return Tensor.from_op(out, (a, b), backward, "matmul")


# ---- elementwise unary -------------------------------------------------------------------------

def neg(x):
    """-x. d/dx = -1."""
    def backward(dout):
        x._accumulate(-dout)
    return Tensor.from_op(-x.data, (x,), backward, "neg")


def exp(x):
    """e^x. d/dx = e^x = out."""
    out = get_array_module(x.data).exp(x.data)

    def backward(dout):
        x._accumulate(dout * out)
    return Tensor.from_op(out, (x,), backward, "exp")


def log(x):
    """Natural log. d/dx = 1/x."""
    def backward(dout):
        x._accumulate(dout / x.data)
    return Tensor.from_op(get_array_module(x.data).log(x.data), (x,), backward, "log")


def tanh(x):
    """tanh x. d/dx = 1 - tanh^2 x = 1 - out^2."""
    out = get_array_module(x.data).tanh(x.data)

    def backward(dout):
        x._accumulate(dout * (1 - out * out))
    return Tensor.from_op(out, (x,), backward, "tanh")


def sqrt(x):
    """sqrt x. d/dx = 1 / (2 sqrt x) = 0.5 / out."""
    out = get_array_module(x.data).sqrt(x.data)

    def backward(dout):
        x._accumulate(dout * 0.5 / out)
    return Tensor.from_op(out, (x,), backward, "sqrt")


def relu(x):
    """max(x, 0). d/dx = 1 where x > 0, else 0 (the subgradient 0 is taken at x = 0)."""
    mask = x.data > 0

    def backward(dout):
        x._accumulate(dout * mask)
    return Tensor.from_op(x.data * mask, (x,), backward, "relu")


def abs(x):
    """|x|. d/dx = sign(x) (0 at x = 0)."""
    xp = get_array_module(x.data)

    def backward(dout):
        x._accumulate(dout * xp.sign(x.data))
    return Tensor.from_op(xp.abs(x.data), (x,), backward, "abs")


# ---- reductions --------------------------------------------------------------------------------

def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    return tuple(sorted(ax % ndim if ndim else ax for ax in axes))


def _expand_reduced(g, shape, axis, keepdims):
    """Re-insert the reduced axes (size 1) into a reduction's gradient so it broadcasts to ``shape``."""
    if keepdims or g.ndim == len(shape):
        return g
    axes = _norm_axes(axis, len(shape))
    return g.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape)))


def sum(x, axis=None, keepdims=False):
    """Sum over ``axis`` (all by default). d/dx_i = 1: the gradient is broadcast back."""
    def backward(dout):
        xp = get_array_module(dout)
        g = _expand_reduced(dout, x.shape, axis, keepdims)
        x._accumulate(xp.broadcast_to(g, x.shape))
    return Tensor.from_op(x.data.sum(axis=axis, keepdims=keepdims), (x,), backward, "sum")


def mean(x, axis=None, keepdims=False):
    """Mean over ``axis``. d/dx_i = 1/N, N the number of elements averaged."""
    n = int(np.prod([x.shape[a] for a in _norm_axes(axis, x.ndim)]))

    def backward(dout):
        xp = get_array_module(dout)
        g = _expand_reduced(dout, x.shape, axis, keepdims) * (1.0 / n)
        x._accumulate(xp.broadcast_to(g, x.shape))
    return Tensor.from_op(x.data.mean(axis=axis, keepdims=keepdims), (x,), backward, "mean")


def max(x, axis=None, keepdims=False):
    """Max over ``axis``. The gradient goes to the maximal elements, split evenly among ties."""
    out = x.data.max(axis=axis, keepdims=keepdims)

    def backward(dout):
        mask = x.data == _expand_reduced(out, x.shape, axis, keepdims)
        count = mask.sum(axis=axis, keepdims=True).astype(x.dtype)
        x._accumulate(mask * (_expand_reduced(dout, x.shape, axis, keepdims) / count))
    return Tensor.from_op(out, (x,), backward, "max")


def var(x, axis=None, keepdims=False, ddof=0):
    """Variance sum((x - mean)^2) / (N - ddof). d/dx_i = 2 (x_i - mean) / (N - ddof)
    (the mean's own dependence on x_i cancels because the deviations sum to zero)."""
    n = int(np.prod([x.shape[a] for a in _norm_axes(axis, x.ndim)]))
    if n - ddof <= 0:
        raise ValueError(f"var over {n} element(s) with ddof={ddof} is undefined")
    centered = x.data - x.data.mean(axis=axis, keepdims=True)

    def backward(dout):
        g = _expand_reduced(dout, x.shape, axis, keepdims)
        x._accumulate(g * centered * (2.0 / (n - ddof)))
    return Tensor.from_op(x.data.var(axis=axis, keepdims=keepdims, ddof=ddof), (x,), backward, "var")


# ---- Tensor methods and operators --------------------------------------------------------------

def _install():
    T = Tensor
    T.__add__ = lambda a, b: add(a, b)
    T.__radd__ = lambda a, b: add(b, a)
    T.__sub__ = lambda a, b: sub(a, b)
    T.__rsub__ = lambda a, b: sub(b, a)
    T.__mul__ = lambda a, b: mul(a, b)
    T.__rmul__ = lambda a, b: mul(b, a)
    T.__truediv__ = lambda a, b: div(a, b)
    T.__rtruediv__ = lambda a, b: div(b, a)
    T.__pow__ = lambda a, b: power(a, b)
    T.__rpow__ = lambda a, b: power(b, a)
    T.__matmul__ = lambda a, b: matmul(a, b)
    T.__rmatmul__ = lambda a, b: matmul(b, a)
    T.__neg__ = neg
    T.__getitem__ = getitem
    T.__abs__ = abs
    for f in (exp, log, tanh, sqrt, relu, abs, sum, mean, max, var, reshape, transpose, split,
              masked_fill, matmul):
        setattr(T, f.__name__, f)
    T.T = property(lambda x: transpose(x))


_install()
