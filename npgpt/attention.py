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

Two implementations of these formulas:

materialized  S and P for all (Tq, Tk) pairs at once, P kept from forward to backward. Handles
              every case: attn_mask, dropout, rows whose keys are all masked. Memory: the
              (B, NH, Tq, Tk) probabilities live until the backward (float32 for float16 input).
chunked       causal attention without mask or dropout, in blocks of n query rows (FlashAttention-2
              style, Dao 2023, split over queries only). Block [i0, i1) sees keys [0, end) with
              end = i1 + Tk - Tq, so the blocks above the diagonal are never computed (about half
              the FLOPs and exp's), and only the last n keys of a block need the mask. Each block
              holds all of its keys, so its softmax is the ordinary one, no running rescale:
                  S = (q_blk / sqrt(hs)) k[:end]^T,  m = max_j S,  l = sum_j e^(S - m),
                  P = e^(S - m) / l,   y_blk = P v[:end],   lse = m + log l   (B, NH, Tq) kept.
              Backward per block recomputes P = e^(S - lse) from the saved lse (exact: it is the
              same normalised softmax), then with D = rowsum(dy * y) as above
                  dv[:end] += P^T dy_blk,  dP = dy_blk v[:end]^T,  dS = P * (dP - D),
                  dq_blk = dS k[:end] / sqrt(hs),  dk[:end] += dS^T q_blk / sqrt(hs)
              (dq_blk is complete after its block: block i is the only one holding queries i0..i1).
              Memory: one block's (B, NH, n, end) scores at a time, plus lse; nothing of size
              Tq x Tk survives the forward.

Which runs (``scaled_dot_product_attention``): the chunked path when is_causal, no attn_mask,
dropout_p == 0 and Tq >= CHUNKED_MIN_T (see its comment for the NumPy measurements); the
materialized path otherwise. ``NPGPT_ATTENTION=materialized|chunked`` (or ``set_impl``) forces one
(the chunked one only where it applies) so GPU runs can measure which wins.
``NPGPT_ATTENTION_BLOCK_Q`` fixes the block height n (default: sized by ``_block_rows``). On CuPy
each block's elementwise work is one kernel of ``npgpt.kernels`` (off with NPGPT_FUSED=0).

float16: q, k, v, y and every gradient stay float16, but scores, softmax, lse, dP, dS and the
dk/dv accumulators are float32 (scores of size ~|q||k| lose ~1e-3 relative in float16, and
e^(S - m) multiplies that error by S; FlashAttention also keeps them in float32). P and dS are
rounded to float16 just before the GEMMs that consume them (P v, P^T dy, dS k, dS^T q), which
accumulate in float32 (``_gemm``). float32 and float64 compute in their own dtype throughout.
"""
import math
import os

import numpy as np

from . import backend
from .backend import bmm, get_array_module
from .engine import Tensor
from .functional import _run_chunked, _softmax_backward_rows, softmax_array
from .ops import sum_to_shape

__all__ = ["scaled_dot_product_attention", "causal_bias", "set_impl", "IMPLS"]

IMPLS = ("auto", "materialized", "chunked")
_impl = os.environ.get("NPGPT_ATTENTION", "auto").strip().lower() or "auto"
if _impl not in IMPLS:
    raise ValueError(f"NPGPT_ATTENTION={_impl!r}: use one of {', '.join(IMPLS)}")

# auto: the chunked path from this many query rows up, per backend. NumPy on this 2-core CPU
# (B=8, NH=6, hs=64, float32, forward + backward, `python tests/test_attention.py 256 1024`):
#   T=256   materialized 43-46 ms, chunked 50 ms;   T=512  147 vs 141 ms;
#   T=1024  460-480 ms vs 450-465 ms (forward 200 -> 150, backward 275 -> 305: S is recomputed);
#   T=2048  2.07 s vs 1.61 s.
# Held from forward to backward at T=1024: 220 MiB vs 24 MiB; backward peak 484 vs 150 MiB.
# So from 512 the chunked path costs no time and saves the (B, NH, T, T) tensors.
# CuPy on an H100 (B=16, NH=12, hs=64, forward + backward, benchmarks/gpu_probe.py, 2026-11-26):
#   T=256   fp16 materialized 0.91 ms, chunked 1.07 / 0.75 / 0.74 ms (blocks of 128 / 256 / 512 rows);
#           fp32 1.16 ms vs 1.05 / 0.93 / 0.91 ms;
#   T=1024  fp16 10.27 ms vs 5.00 / 2.94 / 2.96 ms;  fp32 11.54 ms vs 5.77 / 5.71 / 6.09 ms.
# So on the GPU the chunked path (256-row blocks) wins from T=256 on, 3.5x at T=1024 in fp16.
CHUNKED_MIN_T = {"numpy": 512, "cupy": 256}

_mask_cache = {}


def set_impl(impl):
    """Choose the attention implementation: "auto" (default), "materialized" or "chunked"
    (the chunked one only runs where it applies: causal, no attn_mask, no dropout). Returns the
    previous choice. Same as the environment variable ``NPGPT_ATTENTION``."""
    global _impl
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}: use one of {', '.join(IMPLS)}")
    old, _impl = _impl, impl
    return old


def causal_bias(Tq, Tk, dtype, xp):
    """Additive mask (Tq, Tk): 0 where key j <= i + Tk - Tq, -inf above that diagonal (cached)."""
    key = (Tq, Tk, np.dtype(dtype).str, xp.__name__)
    if key not in _mask_cache:
        above = np.triu(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)
        _mask_cache[key] = xp.asarray(np.where(above, -np.inf, 0.0).astype(dtype))
    return _mask_cache[key]


def _score_dtype(dtype):
    """Scores, softmax and row statistics: float32 for float16 inputs, else the input dtype."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


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
    min_t = CHUNKED_MIN_T["numpy" if get_array_module(q.data) is np else "cupy"]
    if chunkable and (_impl == "chunked" or (_impl == "auto" and Tq >= min_t)):
        return attention_chunked(q, k, v)
    return attention_materialized(q, k, v, is_causal, attn_mask, dropout_p)


# ---- materialized -------------------------------------------------------------------------------

def attention_materialized(q, k, v, is_causal=True, attn_mask=None, dropout_p=0.0):
    """Every case of ``scaled_dot_product_attention``, with the full (B, NH, Tq, Tk) probabilities."""
    xp = get_array_module(q.data)
    Q, K, Vv = q.data, k.data, v.data
    dtype, sdt = Q.dtype, _score_dtype(Q.dtype)              # sdt: float32 for float16 inputs
    hs, Tq, Tk = Q.shape[-1], Q.shape[-2], K.shape[-2]
    scale = 1.0 / math.sqrt(hs)                              # Python float: keeps float32
    Qs = Q * scale                                           # (B, NH, Tq, hs) q / sqrt(hs)
    S = _bcastbmm(Qs, K, trans_b=True, dtype=sdt)          # (B, NH, Tq, Tk)
    if is_causal and Tq > 1:                                 # one query sees every key
        S += causal_bias(Tq, Tk, S.dtype, xp)
    if attn_mask is not None:
        m = backend.to_device(attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask)
        if m.dtype == bool:
            S = xp.where(m, S, xp.asarray(-np.inf, dtype=S.dtype))
        else:
            S += m.astype(S.dtype, copy=False)
    P = softmax_array(S, guard=attn_mask is not None)        # (B, NH, Tq, Tk), in place
    if dropout_p > 0.0:
        keep = backend.rng().random(P.shape, dtype=P.dtype) >= dropout_p
        drop = keep * P.dtype.type(1.0 / (1.0 - dropout_p))  # (B, NH, Tq, Tk) D(P) = P * drop
        Pd = P * drop
    else:
        drop, Pd = None, P
    if dtype != sdt:
        Pd = Pd.astype(dtype)                                # rounded for the GEMMs (float16)
    out = _bcastbmm(Pd, Vv)                                # (B, NH, Tq, hs)

    def backward(dout):
        if v.requires_grad:
            dv = _bcastbmm(Pd, dout, trans_a=True)         # (B, NH, Tk, hs)
            v._accumulate(sum_to_shape(dv, v.shape))
        if not (q.requires_grad or k.requires_grad):
            return
        dS = _bcastbmm(dout, Vv, trans_b=True, dtype=sdt)  # (B, NH, Tq, Tk) dP
        if drop is not None:
            dS *= drop
        dot = _row_dot(dout, out)[..., None]                 # (B, NH, Tq, 1) sum(dP * P), module doc
        rows = (a.reshape(-1, a.shape[-1]) for a in (dS, P, dot))  # views: all three are contiguous
        _run_chunked(_softmax_backward_rows, *rows)          # dS = P * (dP - sum(dP * P)), in place
        if dtype != sdt:
            dS = dS.astype(dtype)
        if q.requires_grad:
            dq = _bcastbmm(dS, K, alpha=scale)             # (B, NH, Tq, hs)
            q._accumulate(sum_to_shape(dq, q.shape))
        if k.requires_grad:
            dk = _bcastbmm(dS, Qs, trans_a=True)           # (B, NH, Tk, hs), scale inside Qs
            k._accumulate(sum_to_shape(dk, k.shape))
    return Tensor.from_op(out, (q, k, v), backward, "attention")


def _bcastbmm(a, b, trans_a=False, trans_b=False, dtype=None, alpha=1.0):
    """``backend.bmm`` after broadcasting the leading axes of a and b against each other."""
    xp = get_array_module(a, b)
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if a.shape[:-2] != lead:
        a = xp.broadcast_to(a, lead + a.shape[-2:])
    if b.shape[:-2] != lead:
        b = xp.broadcast_to(b, lead + b.shape[-2:])
    return bmm(a, b, trans_a, trans_b, dtype=dtype, alpha=alpha)


def _row_dot(a, b):
    """sum over the last axis of a * b in the score dtype: (..., hs) x2 -> (...)."""
    xp = get_array_module(a)
    if a.dtype == _score_dtype(a.dtype):
        return xp.einsum("...i,...i->...", a, b)
    w = a.astype(np.float32)
    w *= b
    return w.sum(axis=-1)


# ---- chunked ------------------------------------------------------------------------------------

_BLOCK_ROWS = {"numpy": 128, "cupy": 256}         # target query rows per block (see _block_rows)
_BLOCK_BYTES = {"numpy": 64 << 20, "cupy": 256 << 20}  # cap on one block's float32 scores


def _block_rows(BH, Tq, Tk, xp):
    """Query rows per block: NPGPT_ATTENTION_BLOCK_Q if set, else _BLOCK_ROWS, fewer when one
    block's (B*NH, n, Tk) float32 scores would pass _BLOCK_BYTES (at least 16), balanced over the
    blocks and a multiple of 16. Larger blocks run the GEMMs more efficiently (NumPy at T=1024,
    B*NH=48: n=48 590 ms, 128 460, 256 475 forward + backward), smaller ones skip more of the
    causal upper triangle ((nb + 1) / 2nb of the FLOPs for nb blocks) and hold less memory."""
    env = os.environ.get("NPGPT_ATTENTION_BLOCK_Q")
    if env:
        return max(1, min(int(env), Tq))
    kind = "numpy" if xp is np else "cupy"
    fits = _BLOCK_BYTES[kind] // (4 * BH * max(Tk, 1))
    n_max = max(16, min(_BLOCK_ROWS[kind], fits // 16 * 16))
    n_blocks = -(-Tq // n_max)
    n = -(-Tq // n_blocks)                                   # balanced: no thin last block
    return min(Tq, -(-n // 16) * 16)


def _fused_kernels(xp, dtype):
    """``npgpt.kernels`` when its attention kernels run here (CuPy, a supported dtype, kernels
    enabled: NPGPT_FUSED=0 switches them off) -- one launch for a block's masked softmax forward
    and one for its backward elementwise work -- else None (the array code below)."""
    if xp is np:
        return None
    from . import kernels   # CuPy only: kernels is where the CUDA sources live
    if not (kernels.enabled() and kernels.supports(dtype) and hasattr(kernels, "attention_softmax_forward")):
        return None
    return kernels


def attention_chunked(q, k, v, block_q=None):
    """Causal attention (end-aligned, Tq <= Tk) without mask or dropout, in query blocks of
    ``block_q`` rows (default ``_block_rows``): the chunked path of the module docstring.
    q (B, NH, Tq, hs), k and v (B, NH, Tk, hs) Tensors with equal leading axes -> (B, NH, Tq, hs)."""
    xp = get_array_module(q.data)
    dtype = q.data.dtype
    *lead, Tq, hs = q.shape
    Tk = k.shape[-2]
    if Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    BH = int(np.prod(lead))
    n = block_q or _block_rows(BH, Tq, Tk, xp)
    scale = 1.0 / math.sqrt(hs)
    Qs = xp.empty(q.shape, dtype)                            # (B, NH, Tq, hs) contiguous q / sqrt(hs)
    xp.multiply(q.data, scale, out=Qs)
    K, Vv = xp.ascontiguousarray(k.data), xp.ascontiguousarray(v.data)  # (B, NH, Tk, hs)
    out, lse = _chunked_forward(xp, Qs, K, Vv, n)

    def backward(dout):
        dq, dk, dv = _chunked_backward(xp, Qs, K, Vv, out, lse, xp.ascontiguousarray(dout), n, scale,
                                       q.requires_grad, k.requires_grad, v.requires_grad)
        for t, g in ((q, dq), (k, dk), (v, dv)):
            if g is not None:
                t._accumulate(g, owned=True)
    return Tensor.from_op(out, (q, k, v), backward, "attention")


def _blocks(Tq, Tk, n):
    """(i0, i1, end) per query block: rows [i0, i1) see keys [0, end), end = i1 + Tk - Tq."""
    return [(i0, min(i0 + n, Tq), min(i0 + n, Tq) + Tk - Tq) for i0 in range(0, Tq, n)]


def _chunked_forward(xp, Qs, K, Vv, n):
    """y (B, NH, Tq, hs) in the input dtype and lse (B, NH, Tq) in the score dtype."""
    *lead, Tq, hs = Qs.shape
    Tk, dtype = K.shape[-2], Qs.dtype
    sdt = _score_dtype(dtype)
    out = xp.empty(Qs.shape, dtype)                          # (B, NH, Tq, hs)
    lse = xp.empty(tuple(lead) + (Tq,), sdt)                 # (B, NH, Tq) log sum_j e^S
    fused = _fused_kernels(xp, dtype)
    for i0, i1, end in _blocks(Tq, Tk, n):
        S = bmm(Qs[..., i0:i1, :], K[..., :end, :], trans_b=True, dtype=sdt)  # (B, NH, n, end)
        if fused is not None:                                # mask + softmax + lse + cast: one launch
            P = S if sdt == dtype else xp.empty(S.shape, dtype)
            fused.attention_softmax_forward(S, P, lse, i0)
        else:
            _causal_block_mask(S, xp)
            lse_blk = xp.empty(S.shape[:-1], sdt)            # (B, NH, n)
            _run_chunked(_softmax_lse_rows, S.reshape(-1, end), lse_blk.reshape(-1))
            lse[..., i0:i1] = lse_blk
            P = S if sdt == dtype else S.astype(dtype)
        bmm(P, Vv[..., :end, :], out=out[..., i0:i1, :])   # (B, NH, n, hs) y_blk = P v
    return out, lse


def _chunked_backward(xp, Qs, K, Vv, out, lse, dout, n, scale, need_q, need_k, need_v):
    """(dq, dk, dv), None where not needed, in the input dtype; dk and dv accumulate over the
    blocks in the score dtype (float32 for float16 inputs)."""
    Tq, Tk, dtype = Qs.shape[-2], K.shape[-2], Qs.dtype
    sdt = _score_dtype(dtype)
    need_s = need_q or need_k
    dq = xp.empty(Qs.shape, dtype) if need_q else None       # (B, NH, Tq, hs) each block writes its rows
    dk = xp.zeros(K.shape, sdt) if need_k else None          # (B, NH, Tk, hs) accumulated
    dv = xp.zeros(Vv.shape, sdt) if need_v else None
    D = xp.ascontiguousarray(_row_dot(dout, out)) if need_s else None  # (B, NH, Tq) rowsum(dy y) = sum(dP P)
    fused = _fused_kernels(xp, dtype)
    for i0, i1, end in _blocks(Tq, Tk, n):
        qs, do = Qs[..., i0:i1, :], dout[..., i0:i1, :]      # (B, NH, n, hs)
        Kb, Vb = K[..., :end, :], Vv[..., :end, :]           # (B, NH, end, hs)
        S = bmm(qs, Kb, trans_b=True, dtype=sdt)           # (B, NH, n, end) scores again
        dP = bmm(do, Vb, trans_b=True, dtype=sdt) if need_s else None
        if fused is not None and need_s:                     # P, dS and their casts: one launch
            P = S if sdt == dtype else xp.empty(S.shape, dtype)
            dS = dP if sdt == dtype else xp.empty(S.shape, dtype)
            fused.attention_softmax_backward(S, dP, lse, D, P, dS, i0)
        else:
            _causal_block_mask(S, xp)
            rows = S.reshape(-1, end)
            lse_b = xp.ascontiguousarray(lse[..., i0:i1]).reshape(-1, 1)
            if need_s:
                D_b = xp.ascontiguousarray(D[..., i0:i1]).reshape(-1, 1)
                _run_chunked(_attention_backward_rows, rows, lse_b, dP.reshape(-1, end), D_b)
            else:
                _run_chunked(_exp_minus_rows, rows, lse_b)
            P = S if sdt == dtype else S.astype(dtype)       # rounded for the GEMMs (float16)
            dS = None if not need_s else dP if sdt == dtype else dP.astype(dtype)
        if need_v:
            bmm(P, do, trans_a=True, out=dv[..., :end, :], accumulate=True)     # dv += P^T dy
        if need_q:
            bmm(dS, Kb, out=dq[..., i0:i1, :], alpha=scale)                    # dq = dS k / sqrt(hs)
        if need_k:
            bmm(dS, qs, trans_a=True, out=dk[..., :end, :], accumulate=True)   # dk += dS^T q / sqrt(hs)
    return dq, _cast(dk, dtype), _cast(dv, dtype)


def _cast(g, dtype):
    return g if g is None or g.dtype == dtype else g.astype(dtype)


def _causal_block_mask(S, xp):
    """-inf above the diagonal of a query block's scores S (B, NH, n, end), in place: row r sees
    keys j <= end - n + r, so only the last n columns hold masked entries."""
    n = S.shape[-2]
    if n > 1:
        S[..., -n:] += causal_bias(n, n, S.dtype, xp)


def _softmax_lse_rows(S, lse):
    """In place, rows of S (r, L) -> softmax; lse (r,) <- m + log sum e^(S - m). No row is all -inf
    (causal rows always see key 0)."""
    xp = get_array_module(S)
    m = S.max(axis=-1)                                       # (r,)
    S -= m[:, None]
    xp.exp(S, out=S)
    s = xp.einsum("ij->i", S)                                # (r,) l
    S *= (1.0 / s)[:, None]
    xp.log(s, out=s)
    xp.add(s, m, out=lse)


def _exp_minus_rows(S, lse):
    """In place: S (r, L) -> e^(S - lse), lse (r, 1)."""
    S -= lse
    get_array_module(S).exp(S, out=S)


def _attention_backward_rows(S, lse, dP, D):
    """In place, rows: S -> P = e^(S - lse), dP -> dS = P * (dP - D); lse and D (r, 1)."""
    _exp_minus_rows(S, lse)
    _softmax_backward_rows(dP, S, D)
