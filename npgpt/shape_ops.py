"""Shape and selection ops: reshape, transpose, indexing, concatenate/stack/split, where/masked_fill.

None of these does arithmetic, so each backward only moves gradient entries back to where their
forward took them from: the inverse reshape or permutation, a scatter into zeros for indexing
(repeated indices accumulate: the adjoint of a gather is a scatter-add), slices for joins, and the
chosen branch for ``where``.
"""
import numbers

import numpy as np

from . import backend
from .backend import get_array_module
from .engine import Tensor, as_array, lift, sum_to_shape

__all__ = ["reshape", "transpose", "getitem", "concatenate", "stack", "split", "where", "masked_fill"]


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
    xp = get_array_module(x.data)

    def on_device(i):  # index arrays must live where the data lives
        if isinstance(i, Tensor):
            i = i.data
        if isinstance(i, list) or (isinstance(i, np.ndarray) and xp is not np):
            i = xp.asarray(i)
        return i
    idx = tuple(on_device(i) for i in idx) if isinstance(idx, tuple) else on_device(idx)
    advanced = _is_advanced(idx)

    def backward(dout):
        if not advanced and x.grad is not None and x._grad_owned:
            x.grad[idx] += dout            # basic indexing: a view of the gradient already there (q, k, v of one qkv)
            return
        g = xp.zeros(x.shape, dtype=x.dtype)
        if advanced:
            backend.scatter_add(g, idx, dout)
        else:
            g[idx] = dout
        x._accumulate(g, owned=True)
    return Tensor.from_op(x.data[idx], (x,), backward, "getitem")


def concatenate(tensors, axis=0):
    """Join tensors along an existing axis. The gradient is sliced back into the pieces."""
    tensors = [lift(t, None) for t in tensors]
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
    tensors = [lift(t, None) for t in tensors]
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
    a, b = lift(a, getattr(b, "data", None)), lift(b, getattr(a, "data", None))
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
