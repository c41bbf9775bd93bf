"""Scaled dot-product attention (Vaswani et al. 2017, eq. 1) as one node with a hand-written backward.

    S = q k^T / sqrt(hs) + mask     (B, NH, Tq, Tk)
    P = softmax(S)                  (rows over keys)
    y = D(P) v                      (B, NH, Tq, hs), D = dropout on the probabilities

Backward, with dy given (the softmax Jacobian as in functional.softmax):
    dv = D(P)^T dy,   dD = dy v^T,   dP = D'(dD),   dS = P * (dP - sum_k dP * P),
    dq = dS k / sqrt(hs),   dk = dS^T q / sqrt(hs)
The causal mask is aligned to the END of the keys, so with a KV cache (Tq < Tk) query i sees
keys j <= i + Tk - Tq, exactly the positions before it in the full sequence.
"""
import math

import numpy as np

from . import backend
from .backend import get_array_module
from .engine import Tensor

__all__ = ["scaled_dot_product_attention"]

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

    attn_mask: boolean (True = may attend, PyTorch's convention) or additive float array,
    broadcastable to (B, NH, Tq, Tk). dropout_p: dropout on the attention probabilities
    (training only; pass 0.0 in eval). A row with every key masked attends to nothing (output 0).
    """
    xp = get_array_module(q.data)
    Q, K, Vv = q.data, k.data, v.data
    hs, Tq, Tk = Q.shape[-1], Q.shape[-2], K.shape[-2]
    scale = 1.0 / math.sqrt(hs)
    S = Q @ K.swapaxes(-1, -2)                               # (B, NH, Tq, Tk)
    S *= scale
    if is_causal:
        if Tq > Tk:
            raise ValueError(f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
        S += causal_bias(Tq, Tk, S.dtype, xp)
    if attn_mask is not None:
        m = backend.to_device(getattr(attn_mask, "data", attn_mask))
        if m.dtype == bool:
            S = xp.where(m, S, -xp.inf).astype(S.dtype, copy=False)
        else:
            S = S + m.astype(S.dtype, copy=False)
    mx = S.max(axis=-1, keepdims=True)
    mx = xp.where(xp.isfinite(mx), mx, 0).astype(S.dtype, copy=False)  # fully masked rows
    P = S
    P -= mx
    xp.exp(P, out=P)
    denom = P.sum(axis=-1, keepdims=True)
    P /= xp.where(denom > 0, denom, 1).astype(S.dtype, copy=False)       # (B, NH, Tq, Tk)
    if dropout_p > 0.0:
        keep = backend.rng().random(P.shape, dtype=P.dtype) >= dropout_p
        drop = keep * P.dtype.type(1.0 / (1.0 - dropout_p))              # D(P) = P * drop
        Pd = P * drop
    else:
        drop, Pd = None, P
    out = Pd @ Vv                                            # (B, NH, Tq, hs)

    def backward(dout):
        if v.requires_grad:
            v._accumulate(_sum_batch(Pd.swapaxes(-1, -2) @ dout, v.shape))  # (B, NH, Tk, hs)
        dP = dout @ Vv.swapaxes(-1, -2)                      # (B, NH, Tq, Tk)
        if drop is not None:
            dP *= drop
        dS = dP
        dS -= (dP * P).sum(axis=-1, keepdims=True)
        dS *= P                                              # dS = P * (dP - sum(dP * P))
        dS *= scale
        if q.requires_grad:
            q._accumulate(_sum_batch(dS @ K, q.shape))        # (B, NH, Tq, hs)
        if k.requires_grad:
            k._accumulate(_sum_batch(dS.swapaxes(-1, -2) @ Q, k.shape))  # (B, NH, Tk, hs)
    return Tensor.from_op(out, (q, k, v), backward, "attention")


def _sum_batch(g, shape):
    """Reduce a gradient over batch axes that q/k/v broadcast along (usually a no-op)."""
    from .ops import sum_to_shape
    return sum_to_shape(g, shape)
