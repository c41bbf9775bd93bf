"""FlashAttention-2 (Dao 2023): causal attention in tiles, with no (Tq, Tk) array in either pass.
The math is ``attention.py``'s (A1)-(A9); this file derives the tiled form its CUDA kernels
(``flash_attention_cuda.py``, forward, and ``flash_attention_cuda_backward.py``: tensor cores,
float16 in, float32 accumulation) compute, and holds a NumPy emulation of those kernels with
exactly their tiles and loops, which the tests check against the materialized path and float64
references. Shapes: q (B, NH, Tq, hs), k and v (B, NH, Tk, hs),
Tq <= Tk; query i sees key j <= i + Tk - Tq (A9); s = 1/sqrt(hs).

Forward. Query tile I (BR rows) meets key tiles J = 0, 1, ... (BC keys each). Per row, keep a running
max m, a running sum l of e^(S - m) and an unnormalised output o; for each new tile

    (F1)  S = s q_I k_J^T                                              (BR, BC), masked to -inf by (A9)
    (F2)  m' = max(m, max_j S_j),   alpha = e^(m - m')                 (alpha = 0 while m = -inf)
    (F3)  P = e^(S - m'),   l' = alpha l + sum_j P_j
    (F4)  o' = alpha o + P v_J
    (F5)  tiles with first key > the tile's last row + Tk - Tq are skipped (never loaded); only tiles
          crossing the diagonal need the mask

and at the end y_I = o / l, lse = m + log l. Induction on the tiles: after tile J, m = max of the
scores seen, l = sum e^(S - m) and o = sum e^(S - m) v over them (multiplying by alpha moves the old
sums to the new max), so o / l = sum_j softmax(S)_j v_j over all keys: (A2)-(A3) exactly. lse
(B, NH, Tq) is all the forward keeps besides y.

Backward. P is recomputed from lse instead of stored, and D from the output ((A7)):

    (F6)  P = e^(S - lse)                                              the normalised softmax, exactly
    (F7)  D_i = sum_d dy_id y_id
    (F8)  dP = dy_I v_J^T,   dS = P * (dP - D)                          (A5)-(A6)
    (F9)  dv_J += P^T dy_I,   dk_J += s dS^T q_I,   dq_I += s dS k_J    (A4), (A8)

The kernel gives each key tile J its own thread block: dk_J and dv_J accumulate in registers over the
query tiles I from the diagonal down (tiles above it see none of J's keys), and dq_I, shared by all
key tiles, is summed with float32 atomics and rounded once; the emulation walks J in the same order
and adds into dq the same way.

float16 (the kernels' only dtype): q, k, v, y, dy and the gradients are float16; S, m, l, o, lse, D,
dS and every accumulator float32; P and dS are rounded to float16 just before the products that
consume them (P v, P^T dy, dS^T q, dS k), as the tensor cores take them. Other dtypes compute in
their own dtype throughout.

Dispatch (``use_flash``). The kernels run where they apply: on CuPy, float16, hs in 32/64/128, causal
without mask or dropout, when "auto" picks them (``AUTO``, on: on an H200 they took the fp16 GPT-2
124M step from 99.1 to 85.5 ms and the small one from 21.9 to 19.3 ms, benchmarks/RESULTS.md, "GPU
kernels measured on the H200") or ``NPGPT_ATTENTION=flash`` (``attention.set_impl("flash")``) asks;
otherwise the existing paths run. On NumPy ``flash_attention`` runs the emulation (slow: it is the
kernels' check, not a CPU path).
"""
import math

import numpy as np

from ..backend import get_array_module
from ..engine import Tensor
from ._attention_common import score_dtype_of
from .flash_attention_cuda import BLOCK, HEAD_SIZES, flash_forward_cuda, kernel_applies
from .flash_attention_cuda_backward import backward_block_rows, flash_backward_cuda

__all__ = ["flash_attention", "flash_attention_reference", "flash_attention_tiled_forward",
           "flash_attention_tiled_backward", "use_flash", "key_tiles", "query_tiles_from", "AUTO", "HEAD_SIZES"]

AUTO = True         # "auto" attention picks the kernels where they apply: measured faster on an H200
                    # (RESULTS.md, "GPU kernels measured on the H200")


# ---- reference: (A1)-(A3) with everything materialized, in float64 NumPy ----------------------------

def flash_attention_reference(q, k, v, dout):
    """Causal attention and its gradients straight from (A1)-(A8) in float64 NumPy arrays, every
    (Tq, Tk) matrix materialized: (y, lse, dq, dk, dv). The tiled emulation's oracle."""
    q, k, v, dout = (np.asarray(a, dtype=np.float64) for a in (q, k, v, dout))
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    s = 1.0 / math.sqrt(hs)
    S = s * q @ k.swapaxes(-1, -2)                                           # (..., Tq, Tk) (A1)
    S[..., np.triu(np.ones((Tq, Tk), bool), k=Tk - Tq + 1)] = -np.inf      # (A9)
    m = S.max(-1, keepdims=True)
    lse = m + np.log(np.exp(S - m).sum(-1, keepdims=True))
    P = np.exp(S - lse)                                                      # (A2)
    y = P @ v                                                                # (A3)
    dP = dout @ v.swapaxes(-1, -2)
    dS = P * (dP - (dout * y).sum(-1, keepdims=True))                        # (A5)-(A7)
    return y, lse[..., 0], s * dS @ k, s * dS.swapaxes(-1, -2) @ q, P.swapaxes(-1, -2) @ dout


# ---- the kernels' tiles ---------------------------------------------------------------------------

def key_tiles(q0, rows, Tq, Tk, block_cols):
    """(F5) the key tiles the query tile of rows [q0, q0 + rows) meets: range(n), n = the tile of the
    last key its last row sees, + 1 (capped by the tiles that exist)."""
    last_key = min(q0 + rows, Tq) - 1 + Tk - Tq
    return range(min(last_key // block_cols + 1, -(-Tk // block_cols)))


def query_tiles_from(k0, Tq, Tk, block_rows):
    """(F6) the first rows of the query tiles that see any key of the tile starting at key k0: from the
    tile holding row k0 - (Tk - Tq) (the first to see key k0) to the end."""
    return range(max(0, k0 - (Tk - Tq)) // block_rows * block_rows, Tq, block_rows)


def _causal_mask(q0, q1, k0, k1, Tq, Tk):
    """(A9) on one tile: (q1 - q0, k1 - k0) True where query i sees key j."""
    return np.arange(k0, k1)[None, :] <= np.arange(q0, q1)[:, None] + (Tk - Tq)


def _round(a, dtype):
    """``a`` rounded to the input dtype where the kernels round it (float16), else as it is."""
    return a.astype(dtype).astype(a.dtype) if dtype == np.float16 else a


# ---- NumPy emulation of the kernels ---------------------------------------------------------------

def flash_attention_tiled_forward(q, k, v, block_rows=BLOCK, block_cols=BLOCK):
    """(F1)-(F5) tile by tile as ``npgpt_flash_fwd_*`` does: q (..., Tq, hs), k and v (..., Tk, hs) ->
    (y (..., Tq, hs) in q's dtype, lse (..., Tq) in the score dtype). The leading axes run together
    (the kernel's grid.y); each query tile is one thread block."""
    xp = get_array_module(q)
    dtype, acc = q.dtype, score_dtype_of(q.dtype)
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    s = 1.0 / math.sqrt(hs)                                  # Python float: keeps float32
    y = xp.empty(q.shape, dtype)
    lse = xp.empty(q.shape[:-1], acc)
    for q0 in range(0, Tq, block_rows):
        q1 = min(q0 + block_rows, Tq)
        q_tile = q[..., q0:q1, :].astype(acc)                # (..., BR, hs)
        m = xp.full(q_tile.shape[:-1] + (1,), -np.inf, acc)  # (..., BR, 1) running max
        l = xp.zeros(m.shape, acc)                           # (..., BR, 1) running sum
        o = xp.zeros(q_tile.shape, acc)                      # (..., BR, hs) unnormalised output
        for j in key_tiles(q0, q1 - q0, Tq, Tk, block_cols):
            k0, k1 = j * block_cols, min((j + 1) * block_cols, Tk)
            S = (q_tile @ k[..., k0:k1, :].astype(acc).swapaxes(-1, -2)) * s        # (F1) (..., BR, BC)
            S = xp.where(xp.asarray(_causal_mask(q0, q1, k0, k1, Tq, Tk)), S, acc.type(-np.inf))
            m_new = xp.maximum(m, S.max(-1, keepdims=True))                        # (F2)
            base = xp.where(m_new == -np.inf, acc.type(0), m_new)
            alpha = xp.exp(m - base)
            P = xp.exp(S - base)                                                    # (F3)
            l = alpha * l + P.sum(-1, keepdims=True)
            o = alpha * o + _round(P, dtype) @ v[..., k0:k1, :].astype(acc)         # (F4)
            m = m_new
        y[..., q0:q1, :] = (o / l).astype(dtype)
        lse[..., q0:q1] = (m + xp.log(l))[..., 0]
    return y, lse


def flash_attention_tiled_backward(q, k, v, y, lse, dout, block_rows=None, block_cols=BLOCK):
    """(F6)-(F9) tile by tile as ``npgpt_flash_bwd_*`` does: the forward's inputs, y and lse, and
    dout (..., Tq, hs) -> (dq, dk, dv) in q's dtype. Each key tile is one thread block that walks
    the query tiles from the diagonal down; dq is summed over the key tiles in the score dtype (the
    kernel's float32 atomics) and rounded once. ``block_rows`` defaults to the kernel's for this hs."""
    xp = get_array_module(q)
    dtype, acc = q.dtype, score_dtype_of(q.dtype)
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    block_rows = block_rows or backward_block_rows(hs)
    s = 1.0 / math.sqrt(hs)
    D = (dout.astype(acc) * y.astype(acc)).sum(-1)           # (F7) (..., Tq)
    dq = xp.zeros(q.shape, acc)
    dk, dv = xp.empty(k.shape, dtype), xp.empty(v.shape, dtype)
    for k0 in range(0, Tk, block_cols):
        k1 = min(k0 + block_cols, Tk)
        k_tile, v_tile = k[..., k0:k1, :].astype(acc), v[..., k0:k1, :].astype(acc)   # (..., BC, hs)
        dk_acc, dv_acc = xp.zeros(k_tile.shape, acc), xp.zeros(v_tile.shape, acc)
        for q0 in query_tiles_from(k0, Tq, Tk, block_rows):
            q1 = min(q0 + block_rows, Tq)
            q_tile, dout_tile = q[..., q0:q1, :].astype(acc), dout[..., q0:q1, :].astype(acc)
            S = (q_tile @ k_tile.swapaxes(-1, -2)) * s                              # (..., BR, BC)
            P = xp.exp(S - lse[..., q0:q1, None])                                   # (F6)
            P = xp.where(xp.asarray(_causal_mask(q0, q1, k0, k1, Tq, Tk)), P, acc.type(0))
            dS = P * (dout_tile @ v_tile.swapaxes(-1, -2) - D[..., q0:q1, None])    # (F8)
            P, dS = _round(P, dtype), _round(dS, dtype)
            dv_acc += P.swapaxes(-1, -2) @ dout_tile                                # (F9)
            dk_acc += dS.swapaxes(-1, -2) @ q_tile
            dq[..., q0:q1, :] += (dS @ k_tile) * s                                  # the atomicAdd
        dk[..., k0:k1, :] = (dk_acc * s).astype(dtype)
        dv[..., k0:k1, :] = dv_acc.astype(dtype)
    return dq.astype(dtype), dk, dv


# ---- the graph node and the dispatch --------------------------------------------------------------

def use_flash(q, k, v, forced=False):
    """Run the flash kernels for arrays q, k, v (causal, no mask or dropout already checked): when
    the kernels take them (CuPy, float16, hs 32/64/128, kernels on) and they are asked for
    (``forced``: NPGPT_ATTENTION=flash) or ``AUTO`` is on."""
    return (forced or AUTO) and kernel_applies(q, k, v)


def flash_attention(q, k, v):
    """Causal attention (end-aligned, Tq <= Tk) without mask or dropout, (F1)-(F9): q (B, NH, Tq, hs),
    k and v (B, NH, Tk, hs) Tensors -> (B, NH, Tq, hs). The CUDA kernels where they apply
    (``flash_attention_cuda.kernel_applies``), else the NumPy emulation of them (any backend and
    dtype; slow, for checks)."""
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    if Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    if not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        raise ValueError(f"flash attention needs equal leading axes, got {q.shape}, {k.shape}, {v.shape}")
    cuda = kernel_applies(q.data, k.data, v.data)
    scale = 1.0 / math.sqrt(hs)
    if cuda:
        out, lse = flash_forward_cuda(q.data, k.data, v.data, scale)            # (B, NH, Tq, hs), (B, NH, Tq)
    else:
        out, lse = flash_attention_tiled_forward(q.data, k.data, v.data)

    def backward(dout):
        if cuda:
            grads = flash_backward_cuda(q.data, k.data, v.data, out, lse, dout, scale)
        else:
            grads = flash_attention_tiled_backward(q.data, k.data, v.data, out, lse, dout.astype(q.dtype, copy=False))
        for t, grad in zip((q, k, v), grads):
            if t.requires_grad:
                t._accumulate(grad, owned=True)
    return Tensor.from_op(out, (q, k, v), backward, "attention")
