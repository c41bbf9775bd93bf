"""Scaled dot-product attention (Vaswani et al. 2017, eq. 1) as one node with a hand-written backward.

    S = (q / sqrt(hs)) k^T + mask   (B, NH, Tq, Tk)
    P = softmax(S)                  (rows over keys)
    y = D(P) v                      (B, NH, Tq, hs), D = dropout on the probabilities

Backward, with dy given (the softmax Jacobian as in functional.softmax):
    dv = D(P)^T dy,   dP = D'(dy v^T),   dS = P * (dP - sum_k dP * P),
    dq = dS k / sqrt(hs),   dk = dS^T q / sqrt(hs)
The row sums need no (Tq, Tk) temporary: sum_k dP_k P_k = sum_k (dy . v_k) D(P)_k = dy . y
(FlashAttention's trick, Dao et al. 2022), a sum over hs instead of Tk.
The causal mask is aligned to the END of the keys, so with a KV cache (Tq < Tk) query i sees
keys j <= i + Tk - Tq, exactly the positions before it in the full sequence.
"""
import math

import numpy as np

from . import backend
from .backend import get_array_module
from .engine import Tensor
from .functional import _run_chunked, _softmax_backward_rows, softmax_array
from .ops import sum_to_shape

__all__ = ["scaled_dot_product_attention", "causal_bias"]

_mask_cache = {}


def causal_bias(Tq, Tk, dtype, xp):
    """Additive mask (Tq, Tk): 0 where key j <= i + Tk - Tq, -inf above that diagonal (cached)."""
    key = (Tq, Tk, np.dtype(dtype).str, xp.__name__)
    if key not in _mask_cache:
        above = np.triu(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)
        _mask_cache[key] = xp.asarray(np.where(above, -np.inf, 0.0).astype(dtype))
    return _mask_cache[key]


def scaled_dot_product_attention(q, k, v, is_causal=True, attn_mask=None, dropout_p=0.0):
    """q (B, NH, Tq, hs), k and v (B, NH, Tk, hs) Tensors -> (B, NH, Tq, hs), like PyTorch's.

    is_causal: query i attends keys j <= i + Tk - Tq (aligned to the end; needs Tq <= Tk).
    attn_mask: boolean (True = may attend, PyTorch's convention) or additive float array,
    broadcastable to (B, NH, Tq, Tk); combined with the causal mask when both are given.
    dropout_p: dropout on the attention probabilities (training only; pass 0.0 in eval), mask
    from ``backend.rng()``. A row whose keys are all masked attends to nothing (output 0, grad 0).
    """
    xp = get_array_module(q.data)
    Q, K, Vv = q.data, k.data, v.data
    hs, Tq, Tk = Q.shape[-1], Q.shape[-2], K.shape[-2]
    scale = 1.0 / math.sqrt(hs)                              # Python float: keeps float32
    Qs = Q * scale                                           # (B, NH, Tq, hs) q / sqrt(hs)
    S = Qs @ K.swapaxes(-1, -2)                              # (B, NH, Tq, Tk)
    if is_causal:
        if Tq > Tk:
            raise ValueError(f"causal attention needs Tq <= Tk (queries are the last Tq positions), "
                             f"got Tq={Tq}, Tk={Tk}")
        if Tq > 1:                                           # one query sees every key
            S += causal_bias(Tq, Tk, S.dtype, xp)
    if attn_mask is not None:
        m = backend.to_device(attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask)
        if m.dtype == bool:
            S = xp.where(m, S, xp.asarray(-np.inf, dtype=S.dtype))
        else:
            S += m.astype(S.dtype, copy=False)
    P = softmax_array(S, guard=attn_mask is not None)        # (B, NH, Tq, Tk), in place
    if dropout_p > 0.0:
        if not dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
        keep = backend.rng().random(P.shape, dtype=P.dtype) >= dropout_p
        drop = keep * P.dtype.type(1.0 / (1.0 - dropout_p))  # (B, NH, Tq, Tk) D(P) = P * drop
        Pd = P * drop
    else:
        drop, Pd = None, P
    out = Pd @ Vv                                            # (B, NH, Tq, hs)

    def backward(dout):
        if v.requires_grad:
            dv = Pd.swapaxes(-1, -2) @ dout                  # (B, NH, Tk, hs)
            v._accumulate(sum_to_shape(dv, v.shape))
        if not (q.requires_grad or k.requires_grad):
            return
        dS = dout @ Vv.swapaxes(-1, -2)                      # (B, NH, Tq, Tk) dP
        if drop is not None:
            dS *= drop
        dot = xp.einsum("...i,...i->...", dout, out)[..., None]  # (B, NH, Tq, 1) sum(dP * P), module doc
        rows = (a.reshape(-1, a.shape[-1]) for a in (dS, P, dot))  # views: all three are contiguous
        _run_chunked(_softmax_backward_rows, *rows)          # dS = P * (dP - sum(dP * P)), in place
        if q.requires_grad:
            dq = dS @ K                                      # (B, NH, Tq, hs)
            dq *= scale
            q._accumulate(sum_to_shape(dq, q.shape))
        if k.requires_grad:
            dk = dS.swapaxes(-1, -2) @ Qs                    # (B, NH, Tk, hs), scale inside Qs
            k._accumulate(sum_to_shape(dk, k.shape))
    return Tensor.from_op(out, (q, k, v), backward, "attention")
