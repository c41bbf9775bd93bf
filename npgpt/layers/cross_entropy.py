"""Softmax cross-entropy: the mean negative log-likelihood of the targets, as one graph node.

Forward, for logits x (N, V) (the leading axes flattened), targets t (N,), and the set K of the
kept rows (target != ignore_index), n = |K|:

    (X1)  m_r = max_j x_rj,   lse_r = m_r + log sum_j e^(x_rj - m_r)      (no overflow)
    (X2)  log p_r[t_r] = x_r[t_r] - lse_r
    (X3)  loss = -(1/n) sum_{r in K} log p_r[t_r]

taken in the log domain (no log of an underflowed probability). If every target is ignored
(n = 0) the loss is 0 with a zero gradient (not the 0/0 NaN).

Backward. d log p[t] / dx_j = δ_jt - p_j with p = softmax(x), so with dout = dL/dloss

    (X4)  dlogits_r = dout (p_r - onehot(t_r)) / n     for r in K,   0 for ignored rows

Shapes: logits (..., V), targets (...) -> loss (); dlogits like logits.
float16 logits: the log-softmax is computed in float32, the loss is float32 and dlogits float16.
A target outside [0, V) that is not ``ignore_index`` raises ValueError on NumPy; on CuPy, where
checking would make the host wait for the GPU, such a row is left out and the loss is NaN.

A padded vocabulary (``GPTConfig.vocab_multiple``: the LM head's rows padded to a multiple of 64 so
its GEMM tiles evenly): ``vocab_size=V`` < the logits' width Vp makes only the first V columns classes.
The padding columns are masked to -inf, i.e. left out of (X1), and their gradient in (X4) is 0 (p = 0
there), so the loss and the real columns' gradients are exactly those of the (N, V) logits.
"""
import numpy as np

from .. import backend
from ..backend import get_array_module
from ..engine import Tensor
from . import _cuda
from ._cuda import cdiv, contiguous, i32
from .tuning import tuned
from .vectorized_kernels import CROSS_ENTROPY_VEC_SOURCE

__all__ = ["cross_entropy", "cross_entropy_reference"]


# ---- reference: (X1)-(X3) composed from engine primitives ---------------------------------------

def cross_entropy_reference(logits, targets, ignore_index=-100, vocab_size=None):
    """(X1)-(X3) from engine ops; autograd supplies (X4). The oracle for ``cross_entropy``."""
    from .. import ops
    V = logits.shape[-1]
    x = logits.reshape(-1, V)                                        # (N, V)
    if vocab_size is not None and vocab_size < V:
        x = x[:, :vocab_size]                                        # (N, vocab_size): no padding
    logp = x - x.max(axis=-1, keepdims=True)
    logp = logp - ops.log(ops.exp(logp).sum(axis=-1, keepdims=True))
    t = backend.to_numpy(targets).reshape(-1)
    rows = np.flatnonzero(t != ignore_index)
    return -logp[rows, t[rows]].mean()


# ---- NumPy (and plain CuPy) forward and backward ------------------------------------------------

def cross_entropy_forward(X, t, ignore_index):
    """(X1)-(X3): X (N, V), t (N,) -> (loss (), saved) where ``saved`` is what the backward needs.
    On NumPy out-of-range targets raise; on CuPy they make the loss NaN (no host sync).

    Plain:  m = X.max(-1);  lse = m + log(exp(X - m[:, None]).sum(-1))
            loss = -(X[rows, t] - lse)[kept].mean()
    e^(x - m) is kept (in place: no second (N, V) array) and becomes the gradient buffer of (X4)."""
    xp = get_array_module(X)
    V = X.shape[1]
    if X.dtype == np.float16:
        X = X.astype(np.float32)                            # (N, V) log-softmax in float32
    keep = t != ignore_index                                # (N,)
    bad = None
    if xp is np:
        n = int(keep.sum())
        all_kept = n == t.shape[0]
        t_kept = t if all_kept else xp.where(keep, t, 0)
        if n and (int(t_kept.min()) < 0 or int(t_kept.max()) >= V):
            raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}")
        inv_n = 1.0 / max(n, 1)
    else:   # no host sync: out-of-range targets are left out and make the loss NaN
        valid = (t >= 0) & (t < V)
        bad = (keep & ~valid).any()                         # () on the device
        keep &= valid
        all_kept = False
        t_kept = xp.where(keep, t, 0)
        inv_n = (1.0 / xp.maximum(keep.sum(), 1)).astype(X.dtype)   # () 1/n on the device
    rows = xp.arange(X.shape[0])
    m = X.max(axis=-1, keepdims=True)                       # (N, 1)
    E = X - m
    xp.exp(E, out=E)                                        # (N, V) e^(x - m)
    z = E.sum(axis=-1, keepdims=True)                       # (N, 1) lse = m + log z     (X1)
    logp = X[rows, t_kept] - m[:, 0] - xp.log(z[:, 0])      # (N,) log p[t]              (X2)
    if not all_kept:
        logp *= keep
    loss = (logp.sum() * -inv_n).astype(X.dtype)            #                            (X3)
    if bad is not None:
        loss = xp.where(bad, X.dtype.type(np.nan), loss)
    saved = dict(X=X, m=m, z=z, E=[E], rows=rows, t_kept=t_kept, keep=keep, all_kept=all_kept, inv_n=inv_n)
    return loss, saved


def cross_entropy_backward(dout, saved):
    """(X4): dout () and what the forward saved -> dlogits (N, V) in the compute dtype.

    Plain:  p = exp(X - lse[:, None]);  p[rows, t] -= 1;  dlogits = p * dout / n * kept[:, None]"""
    xp = get_array_module(saved["X"])
    X, z, keep, inv_n = saved["X"], saved["z"], saved["keep"], saved["inv_n"]
    # reuse e^(x - m) as the gradient buffer the first time; recompute it if backward runs again
    dlogits = saved["E"].pop() if saved["E"] else xp.exp(X - saved["m"])  # (N, V)
    dlogits /= z                                            # p
    dlogits[saved["rows"], saved["t_kept"]] -= 1.0          # p - onehot(t)
    scale = dout * inv_n
    if saved["all_kept"]:
        dlogits *= scale.astype(X.dtype)
    else:
        dlogits *= (keep * scale).astype(X.dtype)[:, None]
    return dlogits


# ---- CUDA: three passes over (N, V) per training step --------------------------------------------
# The forward reads the logits once (an online max and sum of exponentials per row, keeping only
# lse (N,)); the backward reads them again and writes dlogits in the same pass. That is as few as
# llm.c's fused classifier (forward, then a second read that writes the gradient), while dout (a
# loss scale, gradient accumulation) may be any device value and the logits stay intact.

_CUDA_SOURCE = _cuda.register_source("raw", "cross_entropy", r"""
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

// One block per row r of x (N, ld): lse[r] = log sum_{j < V} e^x[r, j] (X1); losses[r] = lse[r] - x[r, t[r]]
// (X2), or 0 when t[r] is ignore_index or out of [0, V). Columns V .. ld-1 are vocabulary padding.
extern "C" __global__ void npgpt_ce_fwd(const T* x, const long long* t, A* lse, A* losses, int V,
                                        long long ignore, int ld) {
    __shared__ A sm[32], ss[32];
    __shared__ A res[2];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const long long r = blockIdx.x;
    const T* xr = x + r * ld;
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

// One block: loss = sum(losses) / max(n, 1) over the n kept rows (X3), NaN if any target is out of
// range (neither ignore_index nor in [0, V)); inv_n = 1 / max(n, 1) for the backward.
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

// One block per row: dx[r, j] = (e^(x[r, j] - lse[r]) - [j == t[r]]) * dloss * inv_n (X4), 0 for rows not
// kept and for the padding columns j >= V of the (N, ld) arrays.
extern "C" __global__ void npgpt_ce_bwd(const T* x, const long long* t, const A* lse, const A* dloss,
                                        const A* inv_n, T* dx, int V, long long ignore, int ld) {
    const long long r = blockIdx.x;
    const long long tr = t[r];
    const bool kept = ce_kept(tr, V, ignore);
    const A scale = kept ? dloss[0] * inv_n[0] : (A)0;
    const A l = lse[r];
    const T* xr = x + r * ld;
    T* dr = dx + r * ld;
    for (int c = threadIdx.x; c < ld; c += blockDim.x)
        put(dr + c, kept && c < V ? (ex(to_acc(xr[c]) - l) - (c == tr ? (A)1 : (A)0)) * scale : (A)0);
}
""")


def _threads_per_row(V, per_thread=1):
    """Threads per row for the cross-entropy kernels (``per_thread`` columns each): a multiple of 32,
    at most 1024."""
    return min(1024, 32 * cdiv(cdiv(V, per_thread), 32))


def _vectorized(xp, vectorized, ld, *arrays):
    """Use the ``_vec`` kernels (vectorized_kernels.py): asked for (None: the tuning table's
    "cross_entropy_vectorized", on: RESULTS.md "GPU kernels measured on the H200") and possible: the
    row stride ld a multiple of VEC, the arrays 16-byte aligned."""
    wanted = tuned(xp, "cross_entropy_vectorized") if vectorized is None else vectorized
    return bool(wanted) and _cuda.vectorizable(ld, *arrays)


def cross_entropy_forward_cuda(logits, targets, ignore_index=-100, vocab_size=None, vectorized=None):
    """(X1)-(X3) on CuPy: logits (N, Vp) float16/32/64, targets (N,) integers -> (loss, lse, inv_n):
    the mean loss over the kept rows (0-d), the row logsumexp (N,) and 1/max(n, 1) (0-d), in
    ``acc_dtype(logits.dtype)``. Only the first ``vocab_size`` columns (default all) are classes.
    Out-of-range targets make the loss NaN; nothing is read back. ``vectorized``: the 16-byte-load
    kernel where the row stride and alignment allow (None = the tuning table's choice)."""
    xp = get_array_module(logits)
    N, ld = logits.shape
    V = ld if vocab_size is None else vocab_size
    acc = _cuda.acc_dtype(logits.dtype)
    x, t = contiguous(xp, logits), contiguous(xp, targets, np.int64)
    lse, losses = _cuda.empty(xp, (N,), acc), _cuda.empty(xp, (N,), acc)
    loss, inv_n = _cuda.empty(xp, (), acc), _cuda.empty(xp, (), acc)
    ignore = np.int64(ignore_index)
    if N and _vectorized(xp, vectorized, ld, x):
        _cuda.raw_kernel(xp, "npgpt_ce_fwd_vec", x.dtype, _CUDA_SOURCE + CROSS_ENTROPY_VEC_SOURCE)(
            (N,), (_threads_per_row(V, _cuda.vector_width(x.dtype)),), (x, t, lse, losses, i32(V), ignore, i32(ld)))
    elif N:
        _cuda.raw_kernel(xp, "npgpt_ce_fwd", x.dtype, _CUDA_SOURCE)(
            (N,), (_threads_per_row(V),), (x, t, lse, losses, i32(V), ignore, i32(ld)))
    _cuda.raw_kernel(xp, "npgpt_ce_mean", x.dtype, _CUDA_SOURCE)(
        (1,), (1024,), (t, losses, loss, inv_n, i32(N), i32(V), ignore))
    return loss, lse, inv_n


def cross_entropy_backward_cuda(dloss, logits, targets, lse, inv_n, ignore_index=-100, vocab_size=None,
                                vectorized=None):
    """(X4) on CuPy: dlogits (N, Vp) of the logits' dtype, 0 for rows not kept and for the padding
    columns beyond ``vocab_size``. dloss: the loss's gradient (0-d, on the device, any float dtype).
    ``vectorized`` as in the forward."""
    xp = get_array_module(logits)
    N, ld = logits.shape
    V = ld if vocab_size is None else vocab_size
    acc = _cuda.acc_dtype(logits.dtype)
    x, t = contiguous(xp, logits), contiguous(xp, targets, np.int64)
    dloss = contiguous(xp, xp.asarray(dloss), acc).reshape(())
    dx = _cuda.empty(xp, (N, ld), x.dtype)
    args = (x, t, lse, dloss, inv_n, dx, i32(V), np.int64(ignore_index), i32(ld))
    if N and ld and _vectorized(xp, vectorized, ld, x, dx):
        _cuda.raw_kernel(xp, "npgpt_ce_bwd_vec", x.dtype, _CUDA_SOURCE + CROSS_ENTROPY_VEC_SOURCE)(
            (N,), (_threads_per_row(ld, _cuda.vector_width(x.dtype)),), args)
    elif N and ld:
        _cuda.raw_kernel(xp, "npgpt_ce_bwd", x.dtype, _CUDA_SOURCE)((N,), (_threads_per_row(ld),), args)
    return dx


# ---- the graph node: CUDA kernels or array code -------------------------------------------------

def cross_entropy(logits, targets, ignore_index=-100, vocab_size=None):
    """Mean negative log-likelihood of ``targets`` under softmax(``logits``), (X1)-(X3) -> a 0-d Tensor.
    logits (..., V) Tensor, targets (...) integers (array or Tensor); positions whose target is
    ``ignore_index`` are left out of the mean. Its backward is (X4). ``vocab_size`` < V: only the
    first vocab_size columns are classes, the rest vocabulary padding (-inf logits, zero gradient)."""
    xp = get_array_module(logits.data)
    V = logits.shape[-1]
    if vocab_size is not None and not 0 < vocab_size <= V:
        raise ValueError(f"vocab_size must lie in [1, {V}] (the logits' width), got {vocab_size}")
    classes = V if vocab_size is None else vocab_size
    X = logits.data.reshape(-1, V)                          # (N, V)
    t = backend.to_device(targets.data if isinstance(targets, Tensor) else targets).reshape(-1)  # (N,)
    if t.shape[0] != X.shape[0]:
        raise ValueError(f"targets have {t.shape[0]} positions but logits {X.shape[0]} (shape {logits.shape})")
    if _cuda.use_cuda_kernels(xp, X):
        t = t.astype(np.int64, copy=False)                  # (N,)
        loss, lse, inv_n = cross_entropy_forward_cuda(X, t, ignore_index, classes)  # (), (N,), ()

        def backward(dout):
            dlogits = cross_entropy_backward_cuda(dout, X, t, lse, inv_n, ignore_index, classes)  # (N, V)
            logits._accumulate(dlogits.reshape(logits.shape), owned=True)
        return Tensor.from_op(loss, (logits,), backward, "cross_entropy")
    loss, saved = cross_entropy_forward(X[:, :classes] if classes < V else X, t, ignore_index)

    def backward(dout):
        dlogits = cross_entropy_backward(dout, saved)       # (N, classes)
        if classes < V:                                     # the padding columns' gradient is 0
            padded = xp.zeros((X.shape[0], V), dlogits.dtype)
            padded[:, :classes] = dlogits
            dlogits = padded
        logits._accumulate(dlogits.astype(logits.dtype, copy=False).reshape(logits.shape))   # (..., V)
    return Tensor.from_op(loss, (logits,), backward, "cross_entropy")
