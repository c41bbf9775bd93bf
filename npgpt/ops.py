"""Primitive differentiable ops, each forward followed directly by its backward (vector-Jacobian product).

For y = f(x) and a loss L, each backward receives ``dout`` = dL/dy and adds dL/dx = J_f(x)^T dL/dy
into ``x.grad``. Binary ops broadcast as NumPy does; a broadcast input's gradient is summed back to
its own shape by the one helper ``sum_to_shape`` (the adjoint of broadcasting is summation over the
broadcast axes). Everything works on numpy or cupy arrays through ``get_array_module``; dtypes are
preserved (Python scalars never upcast float32 under NumPy >= 2's promotion rules).
"""
import numbers

import numpy as np

from . import backend
from .backend import get_array_module
from .engine import Tensor, as_array

__all__ = ["sum_to_shape", "add", "sub", "mul", "div", "power", "matmul", "neg", "exp", "log", "tanh",
           "sqrt", "relu", "abs", "sum", "mean", "max", "var", "reshape", "transpose", "getitem",
           "concatenate", "stack", "split", "where", "masked_fill"]

_builtin_abs, _builtin_max, _builtin_sum = abs, max, sum


def sum_to_shape(g, shape):
    """Sum gradient ``g`` down to ``shape``: the adjoint of broadcasting ``shape`` up to ``g.shape``.

    Leading axes that broadcasting added are summed away; axes where ``shape`` has size 1 are
    summed with keepdims. Returns ``g`` itself when the shapes already match.
    """
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    g = g.sum(axis=axes, keepdims=True) if axes else g
    return g.reshape(shape)


def _lift(x, like):
    """A Tensor for ``x``; Python numbers take ``like``'s dtype so float32 stays float32."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, numbers.Number) and like is not None and like.dtype.kind == "f":
        return Tensor(as_array(x, like.dtype))
    return Tensor(x)


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


# ---- shape ops ---------------------------------------------------------------------------------

def reshape(x, *shape):
    """View with a new shape (-1 infers one axis). The gradient is reshaped back."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])

    def backward(dout):
        x._accumulate(dout.reshape(x.shape))
    return Tensor.from_op(x.data.reshape(shape), (x,), backward, "reshape")


def transpose(x, *axes):
    """Permute axes (reverse them when none are given). The gradient is permuted by the inverse."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    axes = tuple(ax % x.ndim for ax in axes) if axes else tuple(reversed(range(x.ndim)))
    inverse = tuple(np.argsort(axes))

    def backward(dout):
        x._accumulate(dout.transpose(inverse))
    return Tensor.from_op(x.data.transpose(axes), (x,), backward, "transpose")


def _is_advanced(idx):
    """True if an index uses integer/boolean arrays (so positions may repeat)."""
    parts = idx if isinstance(idx, tuple) else (idx,)
    return any(not isinstance(p, (slice, numbers.Integral, type(None), type(Ellipsis))) for p in parts)


def getitem(x, idx):
    """x[idx] with basic (slices, ints, None, ...) or advanced (integer/boolean arrays) indexing.
    The gradient is scattered back into zeros; repeated indices accumulate (scatter-add)."""
    if isinstance(idx, Tensor):
        idx = idx.data
    elif isinstance(idx, tuple):
        idx = tuple(i.data if isinstance(i, Tensor) else i for i in idx)
    if isinstance(idx, list):
        idx = as_array(idx)
    advanced = _is_advanced(idx)

    def backward(dout):
        xp = get_array_module(dout)
        g = xp.zeros(x.shape, dtype=x.dtype)
        if advanced:
            backend.scatter_add(g, idx, dout)
        else:
            g[idx] = dout
        x._accumulate(g)
    return Tensor.from_op(x.data[idx], (x,), backward, "getitem")


def concatenate(tensors, axis=0):
    """Join tensors along an existing axis. The gradient is sliced back into the pieces."""
    tensors = [_lift(t, None) for t in tensors]
    xp = get_array_module(*[t.data for t in tensors])
    out = xp.concatenate([t.data for t in tensors], axis=axis)
    bounds = np.cumsum([0] + [t.shape[axis] for t in tensors])

    def backward(dout):
        for t, lo, hi in zip(tensors, bounds[:-1], bounds[1:]):
            if t.requires_grad:
                sl = [slice(None)] * dout.ndim
                sl[axis] = slice(int(lo), int(hi))
                t._accumulate(dout[tuple(sl)])
    return Tensor.from_op(out, tensors, backward, "concatenate")


def stack(tensors, axis=0):
    """Join same-shape tensors along a new axis. The gradient is split along that axis."""
    tensors = [_lift(t, None) for t in tensors]
    xp = get_array_module(*[t.data for t in tensors])
    out = xp.stack([t.data for t in tensors], axis=axis)

    def backward(dout):
        for i, t in enumerate(tensors):
            if t.requires_grad:
                t._accumulate(xp.take(dout, i, axis=axis))
    return Tensor.from_op(out, tensors, backward, "stack")


def split(x, indices_or_sections, axis=0):
    """Split into a list of tensors like ``np.split`` (equal sections or split points).
    Each piece is a slice of ``x``, so its gradient lands in its own region of ``x.grad``."""
    n = x.shape[axis]
    if isinstance(indices_or_sections, numbers.Integral):
        if indices_or_sections <= 0 or n % indices_or_sections:
            raise ValueError(f"cannot split an axis of size {n} into {indices_or_sections} equal sections")
        step = n // indices_or_sections
        points = list(range(step, n, step))
    else:
        points = list(indices_or_sections)
    edges = [0] + points + [n]
    pieces = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sl = [slice(None)] * x.ndim
        sl[axis] = slice(lo, hi)
        pieces.append(getitem(x, tuple(sl)))
    return pieces


def where(cond, a, b):
    """Elementwise ``a`` where ``cond`` else ``b`` (broadcasting). The gradient flows to the chosen one."""
    cond = as_array(cond)
    a, b = _lift(a, getattr(b, "data", None)), _lift(b, getattr(a, "data", None))
    xp = get_array_module(a.data, b.data)
    out = xp.where(cond, a.data, b.data)

    def backward(dout):
        zero = xp.zeros((), dtype=dout.dtype)
        if a.requires_grad:
            a._accumulate(sum_to_shape(xp.where(cond, dout, zero), a.shape))
        if b.requires_grad:
            b._accumulate(sum_to_shape(xp.where(cond, zero, dout), b.shape))
    return Tensor.from_op(out, (a, b), backward, "where")


def masked_fill(x, mask, value):
    """``x`` with ``value`` where ``mask`` is True (e.g. -inf above the causal diagonal).
    The gradient passes through where the mask is False and is zero where it is True."""
    mask = as_array(mask)
    xp = get_array_module(x.data)
    out = xp.where(mask, xp.asarray(value, dtype=x.dtype), x.data)

    def backward(dout):
        x._accumulate(sum_to_shape(xp.where(mask, xp.zeros((), dtype=dout.dtype), dout), x.shape))
    return Tensor.from_op(out, (x,), backward, "masked_fill")


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
