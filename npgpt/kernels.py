"""CUDA kernels (CuPy) for the fused layers: each is the GPU twin of the NumPy math in
``functional.py``, whose docstrings hold the derivations. ``functional`` calls them when the arrays
live on CuPy (and ``enabled()``); on NumPy it runs its own code.

    gelu_forward / gelu_backward     y = x/2 (1 + tanh u), u = a (x + b x^3), and dy/dx from
                                     ``functional.gelu``; two ElementwiseKernels.
    layer_norm_forward               y = x̂ w + b per row, plus the row mean μ and 1/σ (``functional.layer_norm``);
                                     one warp per row.
    layer_norm_backward              dinp = (g - mean(g) - x̂ mean(g x̂)) / σ with g = dout w (one warp per
                                     row), dweight = sum(dout x̂), dbias = sum(dout) (per-block column
                                     partials, then one column-sum kernel).
    cross_entropy_forward / _backward  the row logsumexp and loss_n = lse_n - x_n[t_n], their mean over the
                                     kept rows, and dlogits = (softmax - onehot) * dout / N
                                     (``functional.cross_entropy``); one block per row. A step reads
                                     the logits twice and writes dlogits once; N stays on the device,
                                     and an out-of-range target makes the loss NaN instead of raising.

Every kernel computes in float32 for float16 and float32 arrays and in float64 for float64 ones
(fp16 storage, fp32 math), reads its inputs and writes freshly allocated outputs. cupy is reached
only through the arrays' module (``xp.RawKernel`` ...), so ``backend`` stays its only importer.
Each kernel is compiled once per dtype, on first use, and cached. No wrapper reads a device value
on the host: a training step that uses them never waits for the GPU.

Set ``NPGPT_FUSED=0`` (read at every call) or ``kernels.ENABLED = False`` to make ``functional`` run
its plain array code on CuPy instead (A/B benchmarks, or a fallback).
"""
import os

import numpy as np

from .backend import get_array_module

__all__ = ["ENABLED", "enabled", "supports", "acc_dtype", "gelu_forward", "gelu_backward",
           "layer_norm_forward", "layer_norm_backward", "cross_entropy_forward", "cross_entropy_backward"]

ENABLED = True
_TYPES = {np.dtype(np.float16): ("__half", "float"), np.dtype(np.float32): ("float", "float"),
          np.dtype(np.float64): ("double", "double")}   # storage type T, accumulation type A


def enabled():
    """True unless ``kernels.ENABLED`` is False or the environment variable NPGPT_FUSED is "0"."""
    return ENABLED and os.environ.get("NPGPT_FUSED", "1").strip() != "0"


def supports(*dtypes):
    """True when the kernels handle arrays of all these dtypes (float16, float32, float64)."""
    return all(np.dtype(d) in _TYPES for d in dtypes)


def acc_dtype(dtype):
    """The dtype the kernels compute and keep statistics in: float64 for float64, else float32."""
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def _empty(xp, shape, dtype):
    """Every output buffer comes from here (tests fill them with NaN to catch unwritten elements)."""
    return xp.empty(shape, dtype)


def _cdiv(a, b):
    return -(-a // b)


# ---- shared: the kernel cache and the CUDA prelude ----------------------------------------------

_CACHE = {}

# Shared by every RawKernel source: T is the storage type, A the accumulation type.
_PRELUDE = r"""
#include <cuda_fp16.h>
typedef %(T)s T;
typedef %(A)s A;
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ void put(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(double* p, double v) { *p = v; }
__device__ __forceinline__ float ex(float v) { return expf(v); }
__device__ __forceinline__ double ex(double v) { return exp(v); }
__device__ __forceinline__ float lg(float v) { return logf(v); }
__device__ __forceinline__ double lg(double v) { return log(v); }
__device__ __forceinline__ float sq(float v) { return sqrtf(v); }
__device__ __forceinline__ double sq(double v) { return sqrt(v); }
__device__ __forceinline__ float neg_inf(float) { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ double neg_inf(double) { return -__longlong_as_double(0x7ff0000000000000LL); }
__device__ __forceinline__ float nan_of(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double nan_of(double) { return __longlong_as_double(0x7ff8000000000000LL); }

template <typename V> __device__ __forceinline__ V warp_sum(V v) {   // every lane gets the sum
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it. sh: 33 slots.
template <typename V> __device__ V block_sum(V v, V* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        V w = lane < nw ? sh[lane] : (V)0;
        w = warp_sum(w);
        if (lane == 0) sh[32] = w;
    }
    __syncthreads();
    v = sh[32];
    __syncthreads();   // sh may be reused by the caller right away
    return v;
}
"""


def _raw(xp, name, dtype, source):
    """The RawKernel ``name`` of ``source`` (prelude prepended) for storage dtype ``dtype``, built once."""
    key = (name, np.dtype(dtype))
    k = _CACHE.get(key)
    if k is None:
        T, A = _TYPES[np.dtype(dtype)]
        k = _CACHE[key] = xp.RawKernel(_PRELUDE % {"T": T, "A": A} + source, name, options=("--std=c++17",))
    return k


def _c(xp, a, dtype=None):
    """a as a C-contiguous array (of ``dtype`` when given); no copy when it already is one."""
    a = a if dtype is None else a.astype(dtype, copy=False)
    return xp.ascontiguousarray(a)


# ---- layer norm / gelu / cross-entropy ----------------------------------------------------------

_GELU_A = 0.7978845608028654        # sqrt(2/pi), as functional._GELU_A
_GELU_B = 0.044715

# Forward writes only y; the backward recomputes s = 1 + tanh u from x instead of reading an s saved
# by the forward. Bytes moved per element: forward x -> y (2), backward x, dout -> dinp (3); saving s
# would cost forward x -> y, s (3) and backward x, s, dout -> dinp (4), plus a buffer the size of x
# held from forward to backward. The GELU is memory-bound, so the tanh is the cheaper side.
_GELU_FWD = """
ACC v = (ACC)x;
ACC s = (ACC)1 + TANH(v * ((ACC)%(a)r + (ACC)%(ab)r * v * v));
y = (T)((ACC)0.5 * v * s);
"""
_GELU_BWD = """
ACC v = (ACC)x;
ACC s = (ACC)1 + TANH(v * ((ACC)%(a)r + (ACC)%(ab)r * v * v));
ACC g = s * ((ACC)0.5 + v * ((ACC)%(ha)r + (ACC)%(h3ab)r * v * v) * ((ACC)2 - s));
dinp = (T)(g * (ACC)dout);
"""


def _gelu_kernel(xp, which, dtype):
    acc = "double" if np.dtype(dtype) == np.float64 else "float"
    key = ("gelu_" + which, acc)
    k = _CACHE.get(key)
    if k is None:
        consts = {"a": _GELU_A, "ab": _GELU_A * _GELU_B, "ha": 0.5 * _GELU_A, "h3ab": 1.5 * _GELU_A * _GELU_B}
        body = ((_GELU_FWD if which == "fwd" else _GELU_BWD) % consts).replace("ACC", acc)
        body = body.replace("TANH", "tanh" if acc == "double" else "tanhf")
        params = ("T x", "T y") if which == "fwd" else ("T x, T dout", "T dinp")
        k = _CACHE[key] = xp.ElementwiseKernel(*params, body, f"npgpt_gelu_{which}_{acc}")
    return k


def gelu_forward(x):
    """GELU (tanh approximation) of x (...) -> y (...) of x's dtype."""
    xp = get_array_module(x)
    y = _empty(xp, x.shape, x.dtype)
    _gelu_kernel(xp, "fwd", x.dtype)(x, y)
    return y


def gelu_backward(x, dout):
    """dinp = dout * gelu'(x), x and dout (...) -> (...) of x's dtype."""
    xp = get_array_module(x)
    dinp = _empty(xp, x.shape, x.dtype)
    _gelu_kernel(xp, "bwd", x.dtype)(x, dout.astype(x.dtype, copy=False), dinp)
    return dinp


_LN_CE_SRC = r"""
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

// Block j owns rows [j*rpb, min((j+1)*rpb, N)).
// Rows (one warp each): g = dout*w, dinp = (g - mean(g) - xhat*mean(g*xhat)) * rstd.
// Columns (one thread each, over the block's rows): part_dw[j, c] = sum dout*xhat, part_db[j, c] = sum dout.
extern "C" __global__ void npgpt_ln_bwd(const T* dout, const T* x, const T* w, const A* mean, const A* rstd,
                                        T* dinp, A* part_dw, A* part_db, int N, int C, int rpb,
                                        int has_w, int need_dinp, int need_dwb) {
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int r0 = blockIdx.x * rpb, r1 = min(r0 + rpb, N);
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

// Online logsumexp state (m, s): s = sum of e^(x - m) over the values seen, m their max.
// -inf values add nothing; NaN values make s NaN (it then stays NaN, as in NumPy).
__device__ __forceinline__ void lse_add(A& m, A& s, A v) {
    if (v > m) { s = s * ex(m - v) + (A)1; m = v; }   // m = -inf at first: s * 0 = 0
    else if (v != neg_inf(v)) s += ex(v - m);
}
__device__ __forceinline__ void lse_merge(A& m, A& s, A m2, A s2) {
    const A M = m > m2 ? m : m2;
    const A a = s == (A)0 ? (A)0 : s * ex(m - M);     // s == 0: nothing seen (m may be -inf)
    const A b = s2 == (A)0 ? (A)0 : s2 * ex(m2 - M);
    m = M;
    s = a + b;
}

__device__ __forceinline__ bool ce_kept(long long t, int V, long long ignore) {
    return t != ignore && t >= 0 && t < V;
}

// One block per row r of x (N, V): lse[r] = log sum_j e^x[r, j]; losses[r] = lse[r] - x[r, t[r]], or 0
// when t[r] is ignore_index or out of [0, V).
extern "C" __global__ void npgpt_ce_fwd(const T* x, const long long* t, A* lse, A* losses, int V,
                                        long long ignore) {
    __shared__ A sm[32], ss[32];
    __shared__ A res[2];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const long long r = blockIdx.x;
    const T* xr = x + r * V;
    A m = neg_inf((A)0), s = 0;
    for (int c = threadIdx.x; c < V; c += blockDim.x) lse_add(m, s, to_acc(xr[c]));
    for (int o = 16; o > 0; o >>= 1) lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    if (warp == 0) {
        m = lane < nw ? sm[lane] : neg_inf((A)0);
        s = lane < nw ? ss[lane] : (A)0;
        for (int o = 16; o > 0; o >>= 1) lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
        if (lane == 0) { res[0] = m; res[1] = s; }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const A l = res[0] + lg(res[1]);
        const long long tr = t[r];
        lse[r] = l;
        losses[r] = ce_kept(tr, V, ignore) ? l - to_acc(xr[tr]) : (A)0;
    }
}

// One block: loss = sum(losses) / max(n, 1) over the n kept rows, NaN if any target is out of range
// (neither ignore_index nor in [0, V)); inv_n = 1 / max(n, 1) for the backward.
extern "C" __global__ void npgpt_ce_mean(const long long* t, const A* losses, A* loss, A* inv_n, int N, int V,
                                         long long ignore) {
    __shared__ A sh[33];
    __shared__ int shi[33];
    A sum = 0;
    int n = 0, bad = 0;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const long long ti = t[i];
        n += ce_kept(ti, V, ignore);
        bad += ti != ignore && !ce_kept(ti, V, ignore);
        sum += losses[i];
    }
    sum = block_sum(sum, sh);
    n = block_sum(n, shi);
    bad = block_sum(bad, shi);
    if (threadIdx.x == 0) {
        const A inv = (A)1 / (A)(n > 1 ? n : 1);
        inv_n[0] = inv;
        loss[0] = bad ? nan_of(inv) : sum * inv;
    }
}

// One block per row: dx[r, j] = (e^(x[r, j] - lse[r]) - [j == t[r]]) * dloss * inv_n, 0 for rows not kept.
extern "C" __global__ void npgpt_ce_bwd(const T* x, const long long* t, const A* lse, const A* dloss,
                                        const A* inv_n, T* dx, int V, long long ignore) {
    const long long r = blockIdx.x;
    const long long tr = t[r];
    const bool kept = ce_kept(tr, V, ignore);
    const A scale = kept ? dloss[0] * inv_n[0] : (A)0;
    const A l = lse[r];
    const T* xr = x + r * V;
    T* dr = dx + r * V;
    for (int c = threadIdx.x; c < V; c += blockDim.x)
        put(dr + c, kept ? (ex(to_acc(xr[c]) - l) - (c == tr ? (A)1 : (A)0)) * scale : (A)0);
}
"""

_LN_BLOCK = 256          # 8 warps: one row per warp (forward and the backward's row phase)
_LN_MAX_BLOCKS = 512     # the backward's grid: rows are split into at most this many blocks
_COLS_BLOCK = 1024       # npgpt_ln_bwd_cols assumes exactly 32 x 32 threads


def _i32(n):
    assert 0 <= n < 2**31, n
    return np.int32(n)


def layer_norm_forward(x, weight, bias, eps):
    """x (N, C) float16/32/64, weight and bias (C,) or None -> y (N, C) of x's dtype and the row
    mean, rstd = 1/sqrt(var + eps) (N,) in ``acc_dtype(x.dtype)``."""
    xp = get_array_module(x)
    N, C = x.shape
    acc = acc_dtype(x.dtype)
    x = _c(xp, x)
    w = x if weight is None else _c(xp, weight, x.dtype)
    b = x if bias is None else _c(xp, bias, x.dtype)
    y, mean, rstd = _empty(xp, (N, C), x.dtype), _empty(xp, (N,), acc), _empty(xp, (N,), acc)
    if N and C:
        _raw(xp, "npgpt_ln_fwd", x.dtype, _LN_CE_SRC)(
            (_cdiv(N, _LN_BLOCK // 32),), (_LN_BLOCK,),
            (x, w, b, y, mean, rstd, _i32(N), _i32(C), acc.type(eps),
             np.int32(weight is not None), np.int32(bias is not None)))
    return y, mean, rstd


def layer_norm_backward(dout, x, weight, mean, rstd, need_dinp=True, need_dwb=True):
    """dout, x (N, C), weight (C,) or None, mean and rstd (N,) from the forward ->
    (dinp (N, C) or None, dweight (C,) or None, dbias (C,) or None), all of x's dtype;
    dinp only if ``need_dinp``, dweight and dbias only if ``need_dwb``."""
    xp = get_array_module(x)
    N, C = x.shape
    acc = acc_dtype(x.dtype)
    x, dout = _c(xp, x), _c(xp, dout, x.dtype)
    w = x if weight is None else _c(xp, weight, x.dtype)
    rpb = max(1, _cdiv(N, _LN_MAX_BLOCKS))                  # rows per block
    G = _cdiv(N, rpb)                                        # blocks
    dinp = _empty(xp, (N, C), x.dtype) if need_dinp else None
    pdw = _empty(xp, (G, C), acc) if need_dwb else None      # (G, C) per-block column partials
    pdb = _empty(xp, (G, C), acc) if need_dwb else None
    dw = _empty(xp, (C,), x.dtype) if need_dwb else None
    db = _empty(xp, (C,), x.dtype) if need_dwb else None
    if not (N and C and (need_dinp or need_dwb)):
        if need_dwb:
            dw.fill(0)
            db.fill(0)
        return dinp, dw, db
    _raw(xp, "npgpt_ln_bwd", x.dtype, _LN_CE_SRC)(
        (G,), (_LN_BLOCK,),
        (dout, x, w, mean, rstd, x if dinp is None else dinp, mean if pdw is None else pdw,
         mean if pdb is None else pdb, _i32(N), _i32(C), _i32(rpb), np.int32(weight is not None),
         np.int32(need_dinp), np.int32(need_dwb)))
    if need_dwb:
        _raw(xp, "npgpt_ln_bwd_cols", x.dtype, _LN_CE_SRC)(
            (_cdiv(C, 32),), (_COLS_BLOCK,), (pdw, pdb, dw, db, _i32(G), _i32(C)))
    return dinp, dw, db


def _ce_block(V):
    """Threads per row for the cross-entropy kernels: a multiple of 32, at most 1024."""
    return min(1024, 32 * _cdiv(V, 32))


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """logits (N, V) float16/32/64, targets (N,) integers -> (loss, lse, inv_n): the mean loss over the
    kept rows (0-d), the row logsumexp (N,) and 1/max(n, 1) (0-d), in ``acc_dtype(logits.dtype)``.

    Rows whose target is ``ignore_index`` are left out. A target out of [0, V) that is not
    ``ignore_index`` is left out too and makes the loss NaN: checking on the host would wait for the
    GPU, so the error shows in the loss instead (its gradient row is 0). Nothing is read back."""
    xp = get_array_module(logits)
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    x, t = _c(xp, logits), _c(xp, targets, np.int64)
    lse, losses = _empty(xp, (N,), acc), _empty(xp, (N,), acc)
    loss, inv_n = _empty(xp, (), acc), _empty(xp, (), acc)
    ign = np.int64(ignore_index)
    if N:
        _raw(xp, "npgpt_ce_fwd", x.dtype, _LN_CE_SRC)((N,), (_ce_block(V),), (x, t, lse, losses, _i32(V), ign))
    _raw(xp, "npgpt_ce_mean", x.dtype, _LN_CE_SRC)((1,), (1024,), (t, losses, loss, inv_n, _i32(N), _i32(V), ign))
    return loss, lse, inv_n


def cross_entropy_backward(dloss, logits, targets, lse, inv_n, ignore_index=-100):
    """dlogits (N, V) of the logits' dtype = (softmax(logits) - onehot(targets)) * dloss * inv_n for
    kept rows, 0 for the others. dloss: the loss's gradient (0-d, on the device, any float dtype)."""
    xp = get_array_module(logits)
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    x, t = _c(xp, logits), _c(xp, targets, np.int64)
    d = _c(xp, xp.asarray(dloss), acc).reshape(())
    dx = _empty(xp, (N, V), x.dtype)
    if N and V:
        _raw(xp, "npgpt_ce_bwd", x.dtype, _LN_CE_SRC)(
            (N,), (_ce_block(V),), (x, t, lse, d, inv_n, dx, _i32(V), np.int64(ignore_index)))
    return dx


# ---- attention ----------------------------------------------------------------------------------
# The elementwise work of one query block of ``attention.attention_chunked`` (its docstring has the
# math), one launch each instead of ~6 array operations:
#   attention_softmax_forward   causal mask + row softmax of the float32 scores, P cast to the input
#                               dtype, lse = m + log l per row.
#   attention_softmax_backward  causal mask + P = e^(S - lse) and dS = P * (dP - D), both cast.
# A block holds queries i0 .. i0+n-1 of every (batch, head) and their keys 0 .. L-1; its scores S are
# (B, NH, n, L) = R rows of L, row w = bh*n + r. Query r sees key c when c <= r + L - n (the causal
# diagonal, end-aligned). lse and D are the whole (B, NH, Tq): row w's entry is bh*Tq + i0 + r.
# One warp per row; P may be S itself (and dS dP itself) when T == A: each lane reads an element
# before it writes it, and no lane touches another lane's elements.

_ATTN_SRC = r"""
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
"""

_ATTN_BLOCK = 256        # 8 warps: 8 rows per block

__all__ += ["attention_softmax_forward", "attention_softmax_backward"]


def _attn_check(S, P, lse, i0):
    """The shapes, dtypes and layouts the attention kernels index by hand; returns (R, L, n, Tq)."""
    assert S.ndim >= 2 and S.shape == P.shape and S.dtype == acc_dtype(P.dtype) and supports(P.dtype), \
        (S.shape, S.dtype, P.shape, P.dtype)
    n, L = S.shape[-2:]
    Tq = lse.shape[-1]
    assert lse.dtype == S.dtype and lse.shape[:-1] == S.shape[:-2] and 0 <= i0 and i0 + n <= Tq and n <= L
    assert S.flags.c_contiguous and P.flags.c_contiguous and lse.flags.c_contiguous
    return S.size // L if L else 0, L, n, Tq


def attention_softmax_forward(S, P, lse, i0):
    """One causal query block's softmax, in one launch. S (B, NH, n, L) scores in
    ``acc_dtype(P.dtype)``; writes P (B, NH, n, L) (may be S itself when the dtypes agree) with 0
    above the end-aligned diagonal, and lse[..., i0:i0+n] of lse (B, NH, Tq) = m + log l per row."""
    xp = get_array_module(S)
    R, L, n, Tq = _attn_check(S, P, lse, i0)
    if R:
        _raw(xp, "npgpt_attn_softmax_fwd", P.dtype, _ATTN_SRC)(
            (_cdiv(R, _ATTN_BLOCK // 32),), (_ATTN_BLOCK,),
            (S, P, lse, np.int64(R), _i32(L), _i32(n), _i32(Tq), _i32(i0)))
    return P


def attention_softmax_backward(S, dP, lse, D, P, dS, i0):
    """One causal query block's backward elementwise work, in one launch. S and dP (B, NH, n, L) in
    ``acc_dtype(P.dtype)``, lse and D (B, NH, Tq) from the forward and rowsum(dy * y); writes
    P = e^(S - lse) (0 above the diagonal) and dS = P * (dP - D), both (B, NH, n, L) of P's dtype
    (P may be S, and dS dP, when the dtypes agree)."""
    xp = get_array_module(S)
    R, L, n, Tq = _attn_check(S, P, lse, i0)
    assert dP.shape == S.shape and dS.shape == S.shape and dP.dtype == S.dtype and dS.dtype == P.dtype
    assert D.shape == lse.shape and D.dtype == S.dtype
    assert dP.flags.c_contiguous and dS.flags.c_contiguous and D.flags.c_contiguous
    if R:
        _raw(xp, "npgpt_attn_softmax_bwd", P.dtype, _ATTN_SRC)(
            (_cdiv(R, _ATTN_BLOCK // 32),), (_ATTN_BLOCK,),
            (S, dP, lse, D, P, dS, np.int64(R), _i32(L), _i32(n), _i32(Tq), _i32(i0)))
    return P, dS
