"""Layer normalization (Ba, Kiros & Hinton 2016) over the last axis, as one graph node.

Forward, per row x of length C (x (..., C) flattened to N rows):

    (N1)  μ = (1/C) sum_j x_j
    (N2)  σ = sqrt((1/C) sum_j (x_j - μ)^2 + eps)
    (N3)  x̂_j = (x_j - μ) / σ
    (N4)  y_j = x̂_j w_j + b_j                       w, b (C,) or None (no affine part)

Backward. Let g_j = dout_j w_j, the gradient reaching x̂. From (N1)-(N3), dμ/dx_k = 1/C and
dσ/dx_k = (x_k - μ) / (C σ) = x̂_k / C, so dx̂_j/dx_k = (δ_jk - 1/C - x̂_j x̂_k / C) / σ and

    (N5)  dinp_k  = (g_k - mean_j(g_j) - x̂_k mean_j(g_j x̂_j)) / σ
    (N6)  dweight = sum over rows of dout x̂             (C,)
    (N7)  dbias   = sum over rows of dout                (C,)

The forward keeps x̂ and 1/σ (NumPy) or μ and 1/σ per row (CUDA, which recomputes x̂ from x).
float16 input is normalized in float32 (μ, σ, x̂) and the output and gradients cast back.
"""
from functools import partial

import numpy as np

from ..backend import get_array_module
from ..engine import Tensor
from . import _cuda
from ._threads import run_chunked
from ._cuda import cdiv, contiguous, i32
from .tuning import tuned
from .vectorized_kernels import LAYER_NORM_VEC_SOURCE

__all__ = ["layer_norm", "layer_norm_reference"]


# ---- reference: (N1)-(N4) composed from engine primitives ---------------------------------------

def layer_norm_reference(x, weight=None, bias=None, eps=1e-5):
    """(N1)-(N4) from engine ops; autograd supplies (N5)-(N7). The oracle for ``layer_norm``."""
    from .. import ops
    xhat = (x - x.mean(axis=-1, keepdims=True)) / ops.sqrt(x.var(axis=-1, keepdims=True) + eps)
    y = xhat if weight is None else xhat * weight
    return y if bias is None else y + bias


# ---- NumPy forward and backward -----------------------------------------------------------------
# Row and column sums are ``einsum`` ("ij->i"), faster than ``.sum(-1)`` on (2048, 384) float32 and
# without the temporary of ``(a * b).sum()`` (RESULTS.md, "Tuning constants"); the in-place chains
# save (N, C) temporaries. Every row is normalized on its own, so large inputs are cut into blocks of
# rows over the thread pool (bit-identical: each row sees the same operations); the column sums of
# the backward (dweight, dbias) stay one call over all rows.

def _forward_rows(w, b, eps, X, out, xhat, rstd):
    """(N1)-(N4) on a block of rows X (n, C), into out, xhat (n, C) and rstd (n, 1)."""
    xp = get_array_module(X)
    C = X.shape[1]
    mu = xp.einsum("ij->i", X)[:, None]
    mu *= 1.0 / C                                           # (n, 1) μ = mean(x)
    xp.subtract(X, mu, out=xhat)                            # (n, C) x - μ
    var = xp.einsum("ij,ij->i", xhat, xhat)[:, None]
    var *= 1.0 / C                                          # (n, 1) var = mean((x - μ)^2)
    var += eps
    xp.sqrt(var, out=var)
    xp.divide(1.0, var, out=rstd)                           # (n, 1) 1/σ = 1 / sqrt(var + eps)
    xhat *= rstd                                            # (n, C) x̂ = (x - μ) / σ
    if w is not None:
        xp.multiply(xhat, w, out=out)                       # (n, C) y = x̂ w + b
    else:
        out[...] = xhat
    if b is not None:
        out += b


def layer_norm_forward(X, w, b, eps):
    """(N1)-(N4): X (N, C), w and b (C,) or None -> (out (N, C), xhat (N, C), rstd (N, 1) = 1/σ),
    computed in float32 for float16 X (out then still float32: the caller casts).

    Plain:  mu = X.mean(-1, keepdims=True);  rstd = 1 / sqrt(((X - mu)**2).mean(-1, keepdims=True) + eps)
            xhat = (X - mu) * rstd;  out = xhat * w + b
    """
    xp = get_array_module(X)
    if X.dtype == np.float16:
        X = X.astype(np.float32)                            # statistics in float32
    out, xhat = xp.empty_like(X), xp.empty_like(X)          # (N, C)
    rstd = xp.empty((X.shape[0], 1), dtype=X.dtype)         # (N, 1)
    run_chunked(partial(_forward_rows, w, b, eps), X, out, xhat, rstd)
    return out, xhat, rstd


def _backward_rows(w, dout, xhat, rstd, dinp):
    """(N5) on a block of rows, into dinp (n, C)."""
    xp = get_array_module(xhat)
    C = xhat.shape[1]
    if w is not None:
        xp.multiply(dout, w, out=dinp)                      # (n, C) g = dout w
    else:
        dinp[...] = dout
    mean_g_xhat = xp.einsum("ij,ij->i", dinp, xhat)[:, None]
    mean_g_xhat *= 1.0 / C                                  # (n, 1) mean(g x̂)
    mean_g = xp.einsum("ij->i", dinp)[:, None]
    mean_g *= 1.0 / C                                       # (n, 1) mean(g)
    # dinp = (g - mean(g) - x̂ mean(g x̂)) / σ, in place on g
    dinp -= mean_g
    dinp -= xhat * mean_g_xhat
    dinp *= rstd


def layer_norm_backward(dout, xhat, rstd, w, need_dinp=True, need_dweight=True, need_dbias=True):
    """(N5)-(N7): dout (N, C), xhat (N, C) and rstd (N, 1) from the forward, w (C,) or None ->
    (dinp (N, C), dweight (C,), dbias (C,)) in xhat's dtype, None where not needed.

    Plain:  g = dout * w
            dinp = (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True)) * rstd
            dweight = (dout * xhat).sum(0);  dbias = dout.sum(0)
    """
    xp = get_array_module(xhat)
    dout = dout.astype(xhat.dtype, copy=False)
    dweight = xp.einsum("ij,ij->j", dout, xhat) if need_dweight else None  # (C,) sum(dout x̂)
    dbias = xp.einsum("ij->j", dout) if need_dbias else None              # (C,) sum(dout)
    dinp = None
    if need_dinp:
        dinp = xp.empty_like(xhat)                                        # (N, C)
        run_chunked(partial(_backward_rows, w), dout, xhat, rstd, dinp)
    return dinp, dweight, dbias


# ---- CUDA ---------------------------------------------------------------------------------------

_CUDA_SOURCE = _cuda.register_source("raw", "layer_norm", r"""
// One warp per row r: y = (x - mean) * rstd * w + b, and the row's mean and rstd = 1/sqrt(var + eps).
extern "C" __global__ void npgpt_ln_fwd(const T* x, const T* w, const T* b, T* y, A* mean, A* rstd,
                                        int N, int C, A eps, int has_w, int has_b) {
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= N) return;                       // uniform over the warp: the shuffles stay full
    const T* xr = x + r * C;
    T* yr = y + r * C;
    A s = 0;
    for (int c = lane; c < C; c += 32) s += to_acc(xr[c]);
    const A mu = warp_sum(s) / (A)C;
    A v = 0;
    for (int c = lane; c < C; c += 32) { A d = to_acc(xr[c]) - mu; v += d * d; }
    const A rs = (A)1 / sq(warp_sum(v) / (A)C + eps);
    for (int c = lane; c < C; c += 32) {
        A o = (to_acc(xr[c]) - mu) * rs;
        if (has_w) o *= to_acc(w[c]);
        if (has_b) o += to_acc(b[c]);
        put(yr + c, o);
    }
    if (lane == 0) { mean[r] = mu; rstd[r] = rs; }
}

// Block j owns rows [j*rows_per_block, min((j+1)*rows_per_block, N)).
// Rows (one warp each): g = dout*w, dinp = (g - mean(g) - xhat*mean(g*xhat)) * rstd.
// Columns (one thread each, over the block's rows): part_dw[j, c] = sum dout*xhat, part_db[j, c] = sum dout.
extern "C" __global__ void npgpt_ln_bwd(const T* dout, const T* x, const T* w, const A* mean, const A* rstd,
                                        T* dinp, A* part_dw, A* part_db, int N, int C, int rows_per_block,
                                        int has_w, int need_dinp, int need_dwb) {
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int r0 = blockIdx.x * rows_per_block, r1 = min(r0 + rows_per_block, N);
    if (need_dinp) {
        for (int r = r0 + (threadIdx.x >> 5); r < r1; r += nw) {   // uniform over the warp
            const long long off = (long long)r * C;
            const A mu = mean[r], rs = rstd[r];
            A sg = 0, sgx = 0;
            for (int c = lane; c < C; c += 32) {
                A xh = (to_acc(x[off + c]) - mu) * rs;
                A g = to_acc(dout[off + c]) * (has_w ? to_acc(w[c]) : (A)1);
                sg += g;
                sgx += g * xh;
            }
            const A mg = warp_sum(sg) / (A)C, mgx = warp_sum(sgx) / (A)C;
            for (int c = lane; c < C; c += 32) {
                A xh = (to_acc(x[off + c]) - mu) * rs;
                A g = to_acc(dout[off + c]) * (has_w ? to_acc(w[c]) : (A)1);
                put(dinp + off + c, (g - mg - xh * mgx) * rs);
            }
        }
    }
    if (need_dwb) {
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            A dw = 0, db = 0;
            for (int r = r0; r < r1; r++) {
                const long long i = (long long)r * C + c;
                A d = to_acc(dout[i]);
                dw += d * ((to_acc(x[i]) - mean[r]) * rstd[r]);
                db += d;
            }
            part_dw[(long long)blockIdx.x * C + c] = dw;
            part_db[(long long)blockIdx.x * C + c] = db;
        }
    }
}

// Column sums of the (G, C) partials: 1024 threads = 32 columns x 32 strided slices of the G rows.
extern "C" __global__ void npgpt_ln_bwd_cols(const A* part_dw, const A* part_db, T* dw, T* db, int G, int C) {
    __shared__ A sw[32][33], sb[32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int c = blockIdx.x * 32 + tx;
    A a = 0, b = 0;
    if (c < C)
        for (int g = ty; g < G; g += 32) { a += part_dw[(long long)g * C + c]; b += part_db[(long long)g * C + c]; }
    sw[ty][tx] = a;
    sb[ty][tx] = b;
    __syncthreads();
    if (ty == 0 && c < C) {
        A s = 0, t = 0;
        for (int k = 0; k < 32; k++) { s += sw[k][tx]; t += sb[k][tx]; }
        put(dw + c, s);
        put(db + c, t);
    }
}

""")

ROW_BLOCK = 256           # 8 warps: one row per warp (forward and the backward's row phase)
_MAX_BLOCKS = 512         # the backward's grid: rows are split into at most this many blocks
_COLS_BLOCK = 1024        # npgpt_ln_bwd_cols assumes exactly 32 x 32 threads


def _vectorized(xp, vectorized, C, *arrays):
    """Use the ``_vec`` kernels: asked for (None: the tuning table's "layer_norm_vectorized", on:
    RESULTS.md "GPU kernels measured on the H200") and possible for these arrays."""
    wanted = tuned(xp, "layer_norm_vectorized") if vectorized is None else vectorized
    return bool(wanted) and _cuda.vectorizable(C, *arrays)


def layer_norm_forward_cuda(x, weight, bias, eps, vectorized=None):
    """(N1)-(N4) on CuPy: x (N, C) float16/32/64, weight and bias (C,) or None -> y (N, C) of x's
    dtype and the row mean μ and rstd = 1/σ (N,) in ``acc_dtype(x.dtype)``. ``vectorized``: the
    16-byte-load kernel (when C and the alignments allow; None = the tuning table's choice)."""
    xp = get_array_module(x)
    N, C = x.shape
    acc = _cuda.acc_dtype(x.dtype)
    x = contiguous(xp, x)
    w = x if weight is None else contiguous(xp, weight, x.dtype)
    b = x if bias is None else contiguous(xp, bias, x.dtype)
    y, mean, rstd = _cuda.empty(xp, (N, C), x.dtype), _cuda.empty(xp, (N,), acc), _cuda.empty(xp, (N,), acc)
    if N and C:
        name, source = (("npgpt_ln_fwd_vec", LAYER_NORM_VEC_SOURCE) if _vectorized(xp, vectorized, C, x, w, b, y)
                        else ("npgpt_ln_fwd", _CUDA_SOURCE))
        _cuda.raw_kernel(xp, name, x.dtype, source)(
            (cdiv(N, ROW_BLOCK // 32),), (ROW_BLOCK,),
            (x, w, b, y, mean, rstd, i32(N), i32(C), acc.type(eps),
             np.int32(weight is not None), np.int32(bias is not None)))
    return y, mean, rstd


def layer_norm_backward_cuda(dout, x, weight, mean, rstd, need_dinp=True, need_dwb=True, vectorized=None):
    """(N5)-(N7) on CuPy: dout, x (N, C), weight (C,) or None, mean and rstd (N,) from the forward ->
    (dinp (N, C) or None, dweight (C,) or None, dbias (C,) or None), all of x's dtype;
    dinp only if ``need_dinp``, dweight and dbias only if ``need_dwb``; ``vectorized`` as forward."""
    xp = get_array_module(x)
    N, C = x.shape
    acc = _cuda.acc_dtype(x.dtype)
    x, dout = contiguous(xp, x), contiguous(xp, dout, x.dtype)
    w = x if weight is None else contiguous(xp, weight, x.dtype)
    rows_per_block = max(1, cdiv(N, _MAX_BLOCKS))
    G = cdiv(N, rows_per_block)                              # blocks
    dinp = _cuda.empty(xp, (N, C), x.dtype) if need_dinp else None
    part_dw = _cuda.empty(xp, (G, C), acc) if need_dwb else None   # (G, C) per-block column partials
    part_db = _cuda.empty(xp, (G, C), acc) if need_dwb else None
    dw = _cuda.empty(xp, (C,), x.dtype) if need_dwb else None
    db = _cuda.empty(xp, (C,), x.dtype) if need_dwb else None
    if not (N and C and (need_dinp or need_dwb)):
        if need_dwb:
            dw.fill(0)
            db.fill(0)
        return dinp, dw, db
    vec = _vectorized(xp, vectorized, C, dout, x, w, *(a for a in (dinp,) if a is not None))
    _cuda.raw_kernel(xp, "npgpt_ln_bwd_vec" if vec else "npgpt_ln_bwd", x.dtype,
                     LAYER_NORM_VEC_SOURCE if vec else _CUDA_SOURCE)(
        (G,), (ROW_BLOCK,),
        (dout, x, w, mean, rstd, x if dinp is None else dinp, mean if part_dw is None else part_dw,
         mean if part_db is None else part_db, i32(N), i32(C), i32(rows_per_block),
         np.int32(weight is not None), np.int32(need_dinp), np.int32(need_dwb)))
    if need_dwb:
        _cuda.raw_kernel(xp, "npgpt_ln_bwd_cols", x.dtype, _CUDA_SOURCE)(
            (cdiv(C, 32),), (_COLS_BLOCK,), (part_dw, part_db, dw, db, i32(G), i32(C)))
    return dinp, dw, db


# ---- the graph node: CUDA kernels or array code -------------------------------------------------

def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last axis, (N1)-(N4).  x (..., C) Tensor, weight and bias (C,) Tensors or
    None -> (..., C) of x's dtype; its backward is (N5)-(N7)."""
    xp = get_array_module(x.data)
    C = x.shape[-1]
    X = x.data.reshape(-1, C)                               # (N, C)
    w, b = (t.data if t is not None else None for t in (weight, bias))
    cuda = _cuda.use_cuda_kernels(xp, X, *(a for a in (w, b) if a is not None))
    if cuda:
        out, mean, rstd = layer_norm_forward_cuda(X, w, b, eps)  # (N, C), (N,), (N,)
    else:
        out, xhat, rstd = layer_norm_forward(X, w, b, eps)       # (N, C), (N, C), (N, 1)
    need_dweight = weight is not None and weight.requires_grad
    need_dbias = bias is not None and bias.requires_grad

    def backward(dout):
        dout = dout.reshape(-1, C)                          # (N, C)
        if cuda:
            dinp, dweight, dbias = layer_norm_backward_cuda(dout, X, w, mean, rstd, x.requires_grad,
                                                            need_dweight or need_dbias)
        else:
            dinp, dweight, dbias = layer_norm_backward(dout, xhat, rstd, w, x.requires_grad,
                                                       need_dweight, need_dbias)
        if need_dweight:
            weight._accumulate(dweight.astype(weight.dtype, copy=False), owned=True)  # (C,)
        if need_dbias:
            bias._accumulate(dbias.astype(bias.dtype, copy=False), owned=True)        # (C,)
        if x.requires_grad:
            x._accumulate(dinp.astype(x.dtype, copy=False).reshape(x.shape), owned=cuda)
    parents = tuple(t for t in (x, weight, bias) if t is not None)
    return Tensor.from_op(out.astype(x.dtype, copy=False).reshape(x.shape), parents, backward, "layer_norm")
