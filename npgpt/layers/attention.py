"""Scaled dot-product attention (Vaswani et al. 2017, eq. 1) as one graph node with a hand-written
backward.

Shapes: q (B, NH, Tq, hs), k and v (B, NH, Tk, hs); scores S and probabilities P (B, NH, Tq, Tk);
the output y and dy (B, NH, Tq, hs).

Forward:

    (A1)  S = (q / sqrt(hs)) k^T + M                M: the mask, 0 where allowed, -inf where not
    (A2)  P = softmax(S)                            over the keys, row by row (softmax.py (S1))
    (A3)  y = drop(P) v                             drop: dropout on the probabilities,
                                                    drop(P) = P * keep / (1 - p), keep ~ Bernoulli(1 - p)

Backward, with dy = dL/dy:

    (A4)  dv = drop(P)^T dy
    (A5)  dP = drop(dy v^T)                         the same keep / (1 - p) as the forward
    (A6)  dS = P * (dP - D),  D = sum_k dP_k P_k    the softmax Jacobian (softmax.py (S2))
    (A7)  D = sum_k (dy . v_k) drop(P)_k = dy . y   a sum over hs instead of Tk
    (A8)  dq = dS k / sqrt(hs),   dk = dS^T q / sqrt(hs)

(A7) is FlashAttention's rowsum trick (Dao et al. 2022): D comes from the output, so the backward
needs no (Tq, Tk) temporary for it.

The causal mask is aligned to the END of the keys:

    (A9)  M_ij = 0 if j <= i + Tk - Tq, else -inf

so with a KV cache (Tq < Tk) query i sees exactly the positions before it in the full sequence.

Two implementations of these formulas:

materialized  (this file) S and P for all (Tq, Tk) pairs at once, P kept from forward to backward.
              Handles every case: attn_mask, dropout, rows whose keys are all masked. Memory: the
              (B, NH, Tq, Tk) probabilities live until the backward (float32 for float16 input).
chunked       (``attention_chunked.py``, its docstring has the block equations) causal attention
              without mask or dropout, in blocks of query rows (FlashAttention-2 style); nothing of
              size Tq x Tk survives the forward, and the blocks above the diagonal are never computed.

Which runs (``scaled_dot_product_attention``): the chunked path when is_causal, no attn_mask,
dropout_p == 0 and Tq >= the tuning constant ``attention_chunked_min_t`` (``layers/tuning.py``;
measured in benchmarks/RESULTS.md, "Tuning constants"); the materialized path otherwise.
``NPGPT_ATTENTION=materialized|chunked`` (or ``set_impl``) forces one (the chunked one only where it
applies) so GPU runs can measure which wins. On CuPy the chunked path's per-block elementwise work
runs as CUDA kernels (off with NPGPT_CUDA_KERNELS=0). ``NPGPT_ATTENTION=flash`` runs the tensor-core
FlashAttention-2 kernels of ``flash_attention.py`` where they apply (CuPy, float16, hs 32/64/128);
"auto" does not pick them until they are measured on a GPU.

float16: q, k, v, y and every gradient stay float16, but scores, softmax, lse, dP, dS and the
dk/dv accumulators are float32 (scores of size ~|q||k| lose ~1e-3 relative in float16, and
e^(S - m) multiplies that error by S; FlashAttention also keeps them in float32). P and dS are
rounded to float16 just before the GEMMs that consume them (P v, P^T dy, dS k, dS^T q), which
accumulate in float32 (``backend.bmm``). float32 and float64 compute in their own dtype throughout.
"""
import math
import os

import numpy as np

from .. import backend
from ..backend import bmm, get_array_module, to_numpy
from ..engine import Tensor
from ..ops import sum_to_shape
from ._attention_common import causal_bias, row_dot, score_dtype_of
from ._threads import run_chunked
from .attention_chunked import attention_chunked
from .flash_attention import flash_attention, use_flash
from .softmax import softmax_array, softmax_backward_rows, softmax_reference
from .tuning import tuned

__all__ = ["scaled_dot_product_attention", "attention_reference", "attention_materialized",
           "attention_chunked", "causal_bias", "set_impl", "IMPLS"]


# ---- reference: (A1)-(A3) composed from engine primitives ---------------------------------------

def attention_reference(q, k, v, is_causal=True, attn_mask=None):
    """(A1)-(A3) without dropout from engine ops; autograd supplies (A4)-(A8). The oracle for
    ``scaled_dot_product_attention``. q (B, NH, Tq, hs), k and v (B, NH, Tk, hs) Tensors; attn_mask
    boolean (True = may attend) broadcastable to (B, NH, Tq, Tk), or None."""
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    s = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))            # (B, NH, Tq, Tk) (A1)
    if is_causal:
        s = s.masked_fill(np.triu(np.ones((Tq, Tk), bool), k=Tk - Tq + 1), -np.inf)   # (A9)
    if attn_mask is not None:
        s = s.masked_fill(~to_numpy(attn_mask), -np.inf)
    return softmax_reference(s) @ v                                      # (B, NH, Tq, hs) (A2), (A3)


# ---- NumPy forward and backward: the materialized path ------------------------------------------

def attention_materialized(q, k, v, is_causal=True, attn_mask=None, dropout_p=0.0):
    """Every case of ``scaled_dot_product_attention``, (A1)-(A8) with the full (B, NH, Tq, Tk)
    probabilities kept for the backward."""
    xp = get_array_module(q.data)
    keys, values = k.data, v.data
    dtype, score_dtype = q.data.dtype, score_dtype_of(q.data.dtype)   # float32 scores for float16
    hs, Tq, Tk = q.shape[-1], q.shape[-2], keys.shape[-2]
    scale = 1.0 / math.sqrt(hs)                              # Python float: keeps float32
    Q_scaled = q.data * scale                                # (B, NH, Tq, hs) q / sqrt(hs)
    S = _broadcast_bmm(Q_scaled, keys, trans_b=True, dtype=score_dtype)   # (B, NH, Tq, Tk) (A1)
    if is_causal and Tq > 1:                                 # one query sees every key
        S += causal_bias(Tq, Tk, S.dtype, xp)
    if attn_mask is not None:
        mask = backend.to_device(attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask)
        if mask.dtype == bool:
            S = xp.where(mask, S, xp.asarray(-np.inf, dtype=S.dtype))
        else:
            S += mask.astype(S.dtype, copy=False)
    P = softmax_array(S, guard=attn_mask is not None)        # (B, NH, Tq, Tk) (A2), in place
    if dropout_p > 0.0:
        keep = backend.rng().random(P.shape, dtype=P.dtype) >= dropout_p
        dropout_scale = keep * P.dtype.type(1.0 / (1.0 - dropout_p))   # (B, NH, Tq, Tk) keep / (1 - p)
        P_dropped = P * dropout_scale
    else:
        dropout_scale, P_dropped = None, P
    if dtype != score_dtype:
        P_dropped = P_dropped.astype(dtype)                  # rounded for the GEMMs (float16)
    out = _broadcast_bmm(P_dropped, values)                  # (B, NH, Tq, hs) (A3)

    def backward(dout):
        if v.requires_grad:
            dv = _broadcast_bmm(P_dropped, dout, trans_a=True)   # (B, NH, Tk, hs) (A4)
            v._accumulate(sum_to_shape(dv, v.shape))
        if not (q.requires_grad or k.requires_grad):
            return
        dS = _broadcast_bmm(dout, values, trans_b=True, dtype=score_dtype)  # (B, NH, Tq, Tk) dP (A5)
        if dropout_scale is not None:
            dS *= dropout_scale
        D = row_dot(dout, out)[..., None]                    # (B, NH, Tq, 1) (A7)
        rows = (a.reshape(-1, a.shape[-1]) for a in (dS, P, D))  # views: all three are contiguous
        run_chunked(softmax_backward_rows, *rows)            # dS = P * (dP - D) (A6), in place
        if dtype != score_dtype:
            dS = dS.astype(dtype)
        if q.requires_grad:
            dq = _broadcast_bmm(dS, keys, alpha=scale)       # (B, NH, Tq, hs) (A8)
            q._accumulate(sum_to_shape(dq, q.shape))
        if k.requires_grad:
            dk = _broadcast_bmm(dS, Q_scaled, trans_a=True)  # (B, NH, Tk, hs) (A8), scale inside Q_scaled
            k._accumulate(sum_to_shape(dk, k.shape))
    return Tensor.from_op(out, (q, k, v), backward, "attention")


def _broadcast_bmm(a, b, trans_a=False, trans_b=False, dtype=None, alpha=1.0):
    """``backend.bmm`` after broadcasting the leading axes of a and b against each other."""
    xp = get_array_module(a, b)
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if a.shape[:-2] != lead:
        a = xp.broadcast_to(a, lead + a.shape[-2:])
    if b.shape[:-2] != lead:
        b = xp.broadcast_to(b, lead + b.shape[-2:])
    return bmm(a, b, trans_a, trans_b, dtype=dtype, alpha=alpha)


# ---- dispatch: materialized or chunked ----------------------------------------------------------

IMPLS = ("auto", "materialized", "chunked", "flash")
_impl = os.environ.get("NPGPT_ATTENTION", "auto").strip().lower() or "auto"
if _impl not in IMPLS:
    raise ValueError(f"NPGPT_ATTENTION={_impl!r}: use one of {', '.join(IMPLS)}")


def set_impl(impl):
    """Choose the attention implementation: "auto" (default), "materialized", "chunked" or "flash"
    (the chunked one only runs where it applies: causal, no attn_mask, no dropout; "flash", the
    tensor-core kernels of ``flash_attention.py``, only there and on CuPy in float16 with hs 32/64/128,
    else "auto" decides). Returns the previous choice. Same as the environment variable
    ``NPGPT_ATTENTION``."""
    global _impl
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}: use one of {', '.join(IMPLS)}")
    old, _impl = _impl, impl
    return old


def scaled_dot_product_attention(q, k, v, is_causal=True, attn_mask=None, dropout_p=0.0):
    """q (B, NH, Tq, hs), k and v (B, NH, Tk, hs) Tensors -> (B, NH, Tq, hs), like PyTorch's.

    is_causal: query i attends keys j <= i + Tk - Tq (aligned to the end; needs Tq <= Tk).
    attn_mask: boolean (True = may attend, PyTorch's convention) or additive float array,
    broadcastable to (B, NH, Tq, Tk); combined with the causal mask when both are given.
    dropout_p: dropout on the attention probabilities (training only; pass 0.0 in eval), mask
    from ``backend.rng()``. A row whose keys are all masked attends to nothing (output 0, grad 0).
    float16 inputs give float16 outputs and gradients, with float32 scores and softmax.
    Causal attention without mask or dropout runs in query blocks (module docstring).
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if is_causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk (queries are the last Tq positions), "
                         f"got Tq={Tq}, Tk={Tk}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    chunkable = (is_causal and attn_mask is None and dropout_p == 0.0
                 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2])  # no broadcasting over (B, NH)
    min_t = tuned(get_array_module(q.data), "attention_chunked_min_t")
    if chunkable and _impl in ("auto", "flash") and use_flash(q.data, k.data, v.data, forced=_impl == "flash"):
        return flash_attention(q, k, v)
    if chunkable and (_impl == "chunked" or (_impl == "auto" and Tq >= min_t)):
        return attention_chunked(q, k, v)
    return attention_materialized(q, k, v, is_causal, attn_mask, dropout_p)
