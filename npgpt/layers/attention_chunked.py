"""Causal attention without mask or dropout, in blocks of n query rows (FlashAttention-2 style,
Dao 2023, split over queries only): the chunked path of ``attention.py``, whose docstring holds
(A1)-(A9). Shapes: q (B, NH, Tq, hs), k and v (B, NH, Tk, hs), Tq <= Tk.

    (C1)  block [i0, i1) sees keys [0, end),  end = i1 + Tk - Tq

so the blocks above the causal diagonal (A9) are never computed (about half the FLOPs and exp's),
and only the last n keys of a block need the mask. Each block holds all of its keys, so its softmax
is the ordinary one, no running rescale. Forward, per block:

    (C2)  S = (q_blk / sqrt(hs)) k[:end]^T,   m = max_j S,   l = sum_j e^(S - m)     (B, NH, n, end)
    (C3)  P = e^(S - m) / l,   y_blk = P v[:end],   lse = m + log l                  lse (B, NH, Tq) kept

Backward, per block: S again from (C2), then P from the saved lse (exact: it is the same normalised
softmax), and with D = rowsum(dy * y) of (A7)

    (C4)  P = e^(S - lse)
    (C5)  dv[:end] += P^T dy_blk,   dP = dy_blk v[:end]^T,   dS = P * (dP - D)
    (C6)  dq_blk = dS k[:end] / sqrt(hs),   dk[:end] += dS^T q_blk / sqrt(hs)

(dq_blk is complete after its block: block i is the only one holding queries i0..i1). Memory: one
block's (B, NH, n, end) scores at a time, plus lse; nothing of size Tq x Tk survives the forward.

The block height n: ``NPGPT_ATTENTION_BLOCK_Q`` if set, else ``block_rows`` from the tuning table.
On CuPy each block's elementwise work (mask + (C2)-(C3) softmax + lse + cast; (C4)-(C5) P and dS +
casts) is one CUDA kernel launch instead of ~6 array operations (off with NPGPT_CUDA_KERNELS=0).
float16 follows ``attention.py``: scores, lse, dP, dS and the dk/dv accumulators in float32.
"""
import math
import os

import numpy as np

from ..backend import bmm, get_array_module
from ..engine import Tensor
from . import _cuda
from ._attention_common import causal_bias, row_dot, score_dtype_of
from ._threads import run_chunked
from .softmax import softmax_backward_rows
from .tuning import tuned

__all__ = ["attention_chunked", "block_rows", "query_blocks", "block_softmax_forward_cuda",
           "block_softmax_backward_cuda"]


# ---- block sizing -------------------------------------------------------------------------------

def block_rows(BH, Tq, Tk, xp):
    """Query rows per block: NPGPT_ATTENTION_BLOCK_Q if set, else the tuned ``attention_block_rows``,
    fewer when one block's (B*NH, n, Tk) float32 scores would pass ``attention_block_bytes`` (at
    least 16), balanced over the blocks and a multiple of 16. Larger blocks run the GEMMs more
    efficiently, smaller ones skip more of the causal upper triangle ((nb + 1) / 2nb of the FLOPs
    for nb blocks) and hold less memory (RESULTS.md, "Tuning constants")."""
    env = os.environ.get("NPGPT_ATTENTION_BLOCK_Q")
    if env:
        return max(1, min(int(env), Tq))
    fits = tuned(xp, "attention_block_bytes") // (4 * BH * max(Tk, 1))
    n_max = max(16, min(tuned(xp, "attention_block_rows"), fits // 16 * 16))
    n_blocks = -(-Tq // n_max)
    n = -(-Tq // n_blocks)                                   # balanced: no thin last block
    return min(Tq, -(-n // 16) * 16)


def query_blocks(Tq, Tk, n):
    """(i0, i1, end) per query block (C1): rows [i0, i1) see keys [0, end), end = i1 + Tk - Tq."""
    return [(i0, min(i0 + n, Tq), min(i0 + n, Tq) + Tk - Tq) for i0 in range(0, Tq, n)]


# ---- NumPy: one block's elementwise work, row by row (rows over the thread pool) ----------------

def _causal_block_mask(S, xp):
    """-inf above the diagonal of a query block's scores S (B, NH, n, end), in place: row r sees
    keys j <= end - n + r, so only the last n columns hold masked entries."""
    n = S.shape[-2]
    if n > 1:
        S[..., -n:] += causal_bias(n, n, S.dtype, xp)


def _softmax_lse_rows(S, lse):
    """(C2)-(C3) in place, rows of S (r, L) -> softmax; lse (r,) <- m + log sum e^(S - m). No row is
    all -inf (causal rows always see key 0).

    Plain: m = S.max(-1); e = exp(S - m); l = e.sum(-1); P = e / l; lse = m + log(l). In place, the
    block's scores become its probabilities without an (r, L) temporary."""
    xp = get_array_module(S)
    m = S.max(axis=-1)                                       # (r,)
    S -= m[:, None]
    xp.exp(S, out=S)
    row_sum = xp.einsum("ij->i", S)                          # (r,) l
    S *= (1.0 / row_sum)[:, None]
    xp.log(row_sum, out=row_sum)
    xp.add(row_sum, m, out=lse)


def _exp_minus_lse_rows(S, lse):
    """(C4) in place: S (r, L) -> e^(S - lse), lse (r, 1). Plain: P = exp(S - lse)."""
    S -= lse
    get_array_module(S).exp(S, out=S)


def _block_backward_rows(S, lse, dP, D):
    """(C4)-(C5) in place, rows: S -> P = e^(S - lse), dP -> dS = P * (dP - D); lse and D (r, 1)."""
    _exp_minus_lse_rows(S, lse)
    softmax_backward_rows(dP, S, D)


# ---- CUDA: one block's elementwise work, one launch each ----------------------------------------
# A block holds queries i0 .. i0+n-1 of every (batch, head) and their keys 0 .. L-1; its scores S are
# (B, NH, n, L) = R rows of L, row w = bh*n + r. Query r sees key c when c <= r + L - n (the causal
# diagonal, end-aligned). lse and D are the whole (B, NH, Tq): row w's entry is bh*Tq + i0 + r.
# One warp per row; P may be S itself (and dS dP itself) when T == A: each lane reads an element
# before it writes it, and no lane touches another lane's elements.

_CUDA_SOURCE = _cuda.register_source("raw", "attention_chunked", r"""
__device__ __forceinline__ void attn_row(long long& w, int& lane, long long& bh, int& r, int n) {
    lane = threadIdx.x & 31;
    w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    bh = w / n;
    r = (int)(w - bh * n);
}

extern "C" __global__ void npgpt_attn_softmax_fwd(const A* S, T* P, A* lse, long long R, int L, int n,
                                                  int Tq, int i0) {
    long long w, bh; int lane, r;
    attn_row(w, lane, bh, r, n);
    if (w >= R) return;                       // uniform over the warp: the shuffles stay full
    const int last = r + L - n;               // the last visible key, >= 0 since L >= n
    const A* s = S + w * L;
    T* p = P + w * L;
    A m = neg_inf((A)0), l = 0;               // online max and sum of e^(s - m) over this lane's keys
    for (int c = lane; c <= last; c += 32) {
        const A v = s[c];
        if (v > m) { l = l * ex(m - v) + (A)1; m = v; }   // m = -inf at first: l = 0 * 0 + 1
        else l += ex(v - m);
    }
    for (int o = 16; o > 0; o >>= 1) {        // merge the lanes; a lane that saw no key has l = 0
        const A m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
        const A M = m > m2 ? m : m2;
        l = (l == (A)0 ? (A)0 : l * ex(m - M)) + (l2 == (A)0 ? (A)0 : l2 * ex(m2 - M));
        m = M;
    }
    const A inv = (A)1 / l;
    for (int c = lane; c < L; c += 32) put(p + c, c <= last ? ex(s[c] - m) * inv : (A)0);
    if (lane == 0) lse[bh * Tq + i0 + r] = m + lg(l);
}

extern "C" __global__ void npgpt_attn_softmax_bwd(const A* S, const A* dP, const A* lse, const A* D,
                                                  T* P, T* dS, long long R, int L, int n, int Tq, int i0) {
    long long w, bh; int lane, r;
    attn_row(w, lane, bh, r, n);
    if (w >= R) return;
    const int last = r + L - n;
    const A ls = lse[bh * Tq + i0 + r], d = D[bh * Tq + i0 + r];
    const long long off = w * L;
    for (int c = lane; c < L; c += 32) {
        const A sv = S[off + c], dpv = dP[off + c];
        const A pv = c <= last ? ex(sv - ls) : (A)0;
        put(P + off + c, pv);
        put(dS + off + c, pv * (dpv - d));
    }
}
""")

_THREADS = 256        # 8 warps: 8 score rows per CUDA block


def _check_block(S, P, lse, i0):
    """The shapes, dtypes and layouts the kernels index by hand; returns (R, L, n, Tq)."""
    assert (S.ndim >= 2 and S.shape == P.shape and S.dtype == _cuda.acc_dtype(P.dtype)
            and _cuda.supports(P.dtype)), (S.shape, S.dtype, P.shape, P.dtype)
    n, L = S.shape[-2:]
    Tq = lse.shape[-1]
    assert lse.dtype == S.dtype and lse.shape[:-1] == S.shape[:-2] and 0 <= i0 and i0 + n <= Tq and n <= L
    assert S.flags.c_contiguous and P.flags.c_contiguous and lse.flags.c_contiguous
    return S.size // L if L else 0, L, n, Tq


def block_softmax_forward_cuda(S, P, lse, i0):
    """(C1)-(C3) mask + softmax of one causal query block, in one launch. S (B, NH, n, L) scores in
    ``acc_dtype(P.dtype)``; writes P (B, NH, n, L) (may be S itself when the dtypes agree) with 0
    above the end-aligned diagonal, and lse[..., i0:i0+n] of lse (B, NH, Tq) = m + log l per row."""
    xp = get_array_module(S)
    R, L, n, Tq = _check_block(S, P, lse, i0)
    if R:
        _cuda.raw_kernel(xp, "npgpt_attn_softmax_fwd", P.dtype, _CUDA_SOURCE)(
            (_cuda.cdiv(R, _THREADS // 32),), (_THREADS,),
            (S, P, lse, np.int64(R), _cuda.i32(L), _cuda.i32(n), _cuda.i32(Tq), _cuda.i32(i0)))
    return P


def block_softmax_backward_cuda(S, dP, lse, D, P, dS, i0):
    """(C4)-(C5) elementwise work of one causal query block, in one launch. S and dP (B, NH, n, L) in
    ``acc_dtype(P.dtype)``, lse and D (B, NH, Tq) from the forward and rowsum(dy * y); writes
    P = e^(S - lse) (0 above the diagonal) and dS = P * (dP - D), both (B, NH, n, L) of P's dtype
    (P may be S, and dS dP, when the dtypes agree)."""
    xp = get_array_module(S)
    R, L, n, Tq = _check_block(S, P, lse, i0)
    assert dP.shape == S.shape and dS.shape == S.shape and dP.dtype == S.dtype and dS.dtype == P.dtype
    assert D.shape == lse.shape and D.dtype == S.dtype
    assert dP.flags.c_contiguous and dS.flags.c_contiguous and D.flags.c_contiguous
    if R:
        _cuda.raw_kernel(xp, "npgpt_attn_softmax_bwd", P.dtype, _CUDA_SOURCE)(
            (_cuda.cdiv(R, _THREADS // 32),), (_THREADS,),
            (S, dP, lse, D, P, dS, np.int64(R), _cuda.i32(L), _cuda.i32(n), _cuda.i32(Tq), _cuda.i32(i0)))
    return P, dS


def _use_cuda_kernels(xp, dtype):
    """Run each block's elementwise work as the CUDA kernels above: CuPy, a dtype they support,
    kernels switched on (NPGPT_CUDA_KERNELS=0 switches them off)."""
    return xp is not np and _cuda.enabled() and _cuda.supports(dtype)


# ---- forward and backward over the blocks, and the graph node -----------------------------------

def _chunked_forward(xp, Q_scaled, keys, values, n):
    """(C1)-(C3): y (B, NH, Tq, hs) in the input dtype and lse (B, NH, Tq) in the score dtype."""
    *lead, Tq, hs = Q_scaled.shape
    Tk, dtype = keys.shape[-2], Q_scaled.dtype
    score_dtype = score_dtype_of(dtype)
    out = xp.empty(Q_scaled.shape, dtype)                    # (B, NH, Tq, hs)
    lse = xp.empty(tuple(lead) + (Tq,), score_dtype)         # (B, NH, Tq) log sum_j e^S
    use_kernels = _use_cuda_kernels(xp, dtype)
    for i0, i1, end in query_blocks(Tq, Tk, n):
        S = bmm(Q_scaled[..., i0:i1, :], keys[..., :end, :], trans_b=True, dtype=score_dtype)  # (B, NH, n, end)
        if use_kernels:                                      # mask + softmax + lse + cast: one launch
            P = S if score_dtype == dtype else _cuda.empty(xp, S.shape, dtype)
            block_softmax_forward_cuda(S, P, lse, i0)
        else:
            _causal_block_mask(S, xp)
            lse_block = xp.empty(S.shape[:-1], score_dtype)  # (B, NH, n)
            run_chunked(_softmax_lse_rows, S.reshape(-1, end), lse_block.reshape(-1))
            lse[..., i0:i1] = lse_block
            P = S if score_dtype == dtype else S.astype(dtype)
        bmm(P, values[..., :end, :], out=out[..., i0:i1, :])  # (B, NH, n, hs) y_blk = P v
    return out, lse


def _chunked_backward(xp, Q_scaled, keys, values, out, lse, dout, n, scale, need_q, need_k, need_v):
    """(C4)-(C6): (dq, dk, dv), None where not needed, in the input dtype; dk and dv accumulate over
    the blocks in the score dtype (float32 for float16 inputs)."""
    Tq, Tk, dtype = Q_scaled.shape[-2], keys.shape[-2], Q_scaled.dtype
    score_dtype = score_dtype_of(dtype)
    need_s = need_q or need_k
    dq = xp.empty(Q_scaled.shape, dtype) if need_q else None  # (B, NH, Tq, hs) each block writes its rows
    dk = xp.zeros(keys.shape, score_dtype) if need_k else None  # (B, NH, Tk, hs) accumulated
    dv = xp.zeros(values.shape, score_dtype) if need_v else None
    D = xp.ascontiguousarray(row_dot(dout, out)) if need_s else None  # (B, NH, Tq) (A7)
    use_kernels = _use_cuda_kernels(xp, dtype)
    for i0, i1, end in query_blocks(Tq, Tk, n):
        Q_block, dout_block = Q_scaled[..., i0:i1, :], dout[..., i0:i1, :]   # (B, NH, n, hs)
        keys_block, values_block = keys[..., :end, :], values[..., :end, :]  # (B, NH, end, hs)
        S = bmm(Q_block, keys_block, trans_b=True, dtype=score_dtype)       # (B, NH, n, end) scores again
        dP = bmm(dout_block, values_block, trans_b=True, dtype=score_dtype) if need_s else None
        if use_kernels and need_s:                           # P, dS and their casts: one launch
            P = S if score_dtype == dtype else _cuda.empty(xp, S.shape, dtype)
            dS = dP if score_dtype == dtype else _cuda.empty(xp, S.shape, dtype)
            block_softmax_backward_cuda(S, dP, lse, D, P, dS, i0)
        else:
            _causal_block_mask(S, xp)
            rows = S.reshape(-1, end)
            lse_block = xp.ascontiguousarray(lse[..., i0:i1]).reshape(-1, 1)
            if need_s:
                D_block = xp.ascontiguousarray(D[..., i0:i1]).reshape(-1, 1)
                run_chunked(_block_backward_rows, rows, lse_block, dP.reshape(-1, end), D_block)
            else:
                run_chunked(_exp_minus_lse_rows, rows, lse_block)
            P = S if score_dtype == dtype else S.astype(dtype)   # rounded for the GEMMs (float16)
            dS = None if not need_s else dP if score_dtype == dtype else dP.astype(dtype)
        if need_v:
            bmm(P, dout_block, trans_a=True, out=dv[..., :end, :], accumulate=True)   # dv += P^T dy
        if need_q:
            bmm(dS, keys_block, out=dq[..., i0:i1, :], alpha=scale)                  # dq = dS k / sqrt(hs)
        if need_k:
            bmm(dS, Q_block, trans_a=True, out=dk[..., :end, :], accumulate=True)    # dk += dS^T q / sqrt(hs)
    return dq, _cast(dk, dtype), _cast(dv, dtype)


def _cast(grad, dtype):
    return grad if grad is None or grad.dtype == dtype else grad.astype(dtype)


def attention_chunked(q, k, v, block_q=None):
    """Causal attention (end-aligned, Tq <= Tk) without mask or dropout, in query blocks of
    ``block_q`` rows (default ``block_rows``): (C1)-(C6).
    q (B, NH, Tq, hs), k and v (B, NH, Tk, hs) Tensors with equal leading axes -> (B, NH, Tq, hs)."""
    xp = get_array_module(q.data)
    dtype = q.data.dtype
    *lead, Tq, hs = q.shape
    Tk = k.shape[-2]
    if Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    BH = int(np.prod(lead))
    n = block_q or block_rows(BH, Tq, Tk, xp)
    scale = 1.0 / math.sqrt(hs)
    Q_scaled = xp.empty(q.shape, dtype)                      # (B, NH, Tq, hs) contiguous q / sqrt(hs)
    xp.multiply(q.data, scale, out=Q_scaled)
    keys, values = xp.ascontiguousarray(k.data), xp.ascontiguousarray(v.data)  # (B, NH, Tk, hs)
    out, lse = _chunked_forward(xp, Q_scaled, keys, values, n)

    def backward(dout):
        dq, dk, dv = _chunked_backward(xp, Q_scaled, keys, values, out, lse, xp.ascontiguousarray(dout), n,
                                       scale, q.requires_grad, k.requires_grad, v.requires_grad)
        for t, grad in ((q, dq), (k, dk), (v, dv)):
            if grad is not None:
                t._accumulate(grad, owned=True)
    return Tensor.from_op(out, (q, k, v), backward, "attention")
