"""Softmax over one axis, as one graph node.

Forward, for a row x of length V (the softmax axis):

    (S1)  p_i = e^{x_i} / sum_j e^{x_j} = e^{x_i - m} / sum_j e^{x_j - m},   m = max_j x_j

(subtracting m changes nothing mathematically and keeps every exponent <= 0: no overflow).

Backward. The Jacobian is dp_i/dx_j = p_i (δ_ij - p_j), so with dout = dL/dp

    (S2)  dinp_j = sum_i dout_i p_i (δ_ij - p_j) = p_j (dout_j - sum_i dout_i p_i)

one row dot product and one elementwise pass; no V x V Jacobian is formed.
Shapes: x (..., V, ...) with the softmax over ``axis``; p and dinp have x's shape.

Attention (``layers/attention.py``) uses the same row helpers on its scores; a row whose entries
are all -inf (every key masked) becomes 0 there instead of NaN (``guard``).
"""
from ..backend import get_array_module
from ..engine import Tensor
from ._threads import run_chunked

__all__ = ["softmax", "softmax_reference", "softmax_array", "softmax_rows", "softmax_backward_rows"]


# ---- reference: (S1) composed from engine primitives --------------------------------------------

def softmax_reference(x, axis=-1):
    """(S1) from engine ops; autograd supplies (S2). The oracle for ``softmax``."""
    from .. import ops
    e = ops.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---- NumPy forward and backward, row by row (rows over the thread pool) --------------------------

def softmax_rows(S, guard=False):
    """(S1) in place on each row of S (n, V). guard: all -inf rows become 0 instead of NaN.

    Plain: m = S.max(-1); P = exp(S - m); P /= P.sum(-1). The in-place chain avoids three (n, V)
    temporaries, and ``einsum("ij->i")`` is the row sum (faster than ``.sum(-1)``: RESULTS.md,
    "Tuning constants")."""
    xp = get_array_module(S)
    m = S.max(axis=-1, keepdims=True)                       # (n, 1)
    if guard:
        m[~xp.isfinite(m)] = 0
    S -= m
    xp.exp(S, out=S)
    z = xp.einsum("ij->i", S)[:, None]                      # (n, 1)
    if guard:
        z[z == 0] = 1
    S /= z


def softmax_array(S, guard=False):
    """(S1) over the last axis of an array, in place when it is contiguous (else on a copy), in row
    blocks over the thread pool. Returns the probabilities (..., V)."""
    S = get_array_module(S).ascontiguousarray(S)
    run_chunked(lambda rows: softmax_rows(rows, guard), S.reshape(-1, S.shape[-1]))
    return S


def softmax_backward_rows(dP, P, dot=None):
    """(S2) in place on rows: dP (n, V) -> P * (dP - sum(dP * P)); ``dot`` (n, 1) = sum(dP * P) when
    already known (attention computes it from the output: FlashAttention's rowsum(dy * y))."""
    if dot is None:
        dot = get_array_module(dP).einsum("ij,ij->i", dP, P)[:, None]
    dP -= dot
    dP *= P


# ---- the graph node -----------------------------------------------------------------------------

def softmax(x, axis=-1):
    """Softmax of Tensor x (...) along ``axis`` -> (...), (S1); its backward is (S2).
    Both passes work on a copy with ``axis`` moved last, in row blocks over the thread pool."""
    xp = get_array_module(x.data)
    P = softmax_array(xp.moveaxis(x.data, axis, -1).copy())  # (..., V) softmax axis last

    def backward(dout):
        dinp = xp.moveaxis(dout, axis, -1).copy()           # (..., V) contiguous
        run_chunked(softmax_backward_rows, dinp.reshape(-1, P.shape[-1]), P.reshape(-1, P.shape[-1]))
        x._accumulate(xp.moveaxis(dinp, -1, axis))
    return Tensor.from_op(xp.moveaxis(P, -1, axis), (x,), backward, "softmax")
