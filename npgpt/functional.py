"""Hand-derived fused layers: each is ONE graph node whose backward is written out by hand.

Composing these from primitives would work (tests check that it gives the same numbers) but
would store many intermediates and run many passes; here each forward keeps only what its
backward needs. Derivations are in the docstrings; x̂, μ, σ etc. are per row of the last axis.
Attention lives in ``attention.py``.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import backend, kernels
from .backend import get_array_module
from .engine import Tensor

__all__ = ["linear", "embedding", "layer_norm", "gelu", "softmax", "cross_entropy", "dropout"]


def linear(x, weight, bias=None):
    """y = x W + b.  x (..., Cin), weight (Cin, Cout) (GPT-2's Conv1D layout), bias (Cout,) -> (..., Cout).

    Run as one 2-D GEMM on x flattened to X (N, Cin). With dY = dL/dy flattened to (N, Cout),
    from y_nk = sum_i X_ni W_ik + b_k:
        dinp = dY W^T (N, Cin),   dweight = X^T dY (Cin, Cout),   dbias = sum_n dY[n] (Cout,)
    """
    W = weight.data
    Cin, Cout = W.shape
    x2 = x.data.reshape(-1, Cin)                            # (N, Cin)
    out = x2 @ W                                            # (N, Cout)
    if bias is not None:
        out += bias.data

    def backward(dout):
        dout2 = dout.reshape(-1, Cout)                      # (N, Cout)
        if x.requires_grad:
            dinp = dout2 @ W.T                              # (N, Cin)
            x._accumulate(dinp.reshape(x.shape))            # (..., Cin)
        if weight.requires_grad:
            weight._accumulate(x2.T @ dout2, owned=True)    # (Cin, Cout) dweight
        if bias is not None and bias.requires_grad:
            acc = np.float32 if dout2.dtype == np.float16 else None  # fp16: sum in float32
            bias._accumulate(dout2.sum(axis=0, dtype=acc).astype(dout2.dtype, copy=False), owned=True)  # (Cout,)
    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor.from_op(out.reshape(x.shape[:-1] + (Cout,)), parents, backward, "linear")


def embedding(ids, weight):
    """Rows of a table: out[b, t] = W[ids[b, t]].  ids: integers of any shape S, W (V, C) -> S + (C,).

    out is linear in W with d out[n] / d W[v] = [ids[n] == v], so
        dW[v] = sum of dout[n] over the positions n where ids[n] == v
    a scatter-add in which repeated ids accumulate. Measured for 2048 rows of width 384 on 2 cores
    (benchmarks/bench_layers.py): ``np.add.at`` 6.2 ms at V=65 and 15.3 ms at V=50257; sorting the ids
    and summing each run of equal ids with ``np.add.reduceat`` 1.45 ms and 14.4 ms (zeroing the
    77 MB dW dominates there); a one-hot (V, N) @ dout (N, C) GEMM 0.59 ms at V=65 but 313 ms at
    V=50257. So NumPy uses the one-hot GEMM up to V = 128 and sort + reduceat above; CuPy uses its
    atomic scatter-add.
    """
    ids = backend.to_device(ids.data if isinstance(ids, Tensor) else ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding ids must be integers, got dtype {ids.dtype}")
    out = weight.data[ids]                                  # (B, T, C)

    def backward(dout):
        V, C = weight.shape
        dweight = _embedding_grad(ids.reshape(-1), dout.reshape(-1, C), V)  # (V, C)
        weight._accumulate(dweight, owned=True)
    return Tensor.from_op(out, (weight,), backward, "embedding")


_ONE_HOT_MAX_V = 128


def _embedding_grad(ids, dout, V):
    """dW (V, C) with dW[v] = sum of dout[n] where ids[n] == v.  ids (N,), dout (N, C)."""
    xp = get_array_module(dout)
    if xp is not np:   # atomic adds, accumulated in float32 for float16 gradients
        acc = dout if dout.dtype.itemsize >= 4 else dout.astype(np.float32)
        dweight = backend.scatter_add(xp.zeros((V, dout.shape[1]), acc.dtype), ids, acc)
        return dweight if acc is dout else dweight.astype(dout.dtype)
    if V <= _ONE_HOT_MAX_V:
        return _embedding_grad_one_hot(ids, dout, V)
    return _embedding_grad_sorted(ids, dout, V)


def _embedding_grad_one_hot(ids, dout, V):
    """dW = onehot(ids)^T dout as one GEMM (V, N) @ (N, C): cheap while V is small."""
    onehot = np.zeros((V, ids.shape[0]), dout.dtype)        # (V, N)
    onehot[ids, np.arange(ids.shape[0])] = 1
    return onehot @ dout                                    # (V, C)


def _embedding_grad_sorted(ids, dout, V):
    """Sort the ids; each run of equal ids is summed by one ``np.add.reduceat`` over the sorted rows."""
    order = np.argsort(ids, kind="stable")                  # (N,)
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))  # run starts
    dweight = np.zeros((V, dout.shape[1]), dout.dtype)      # (V, C)
    dweight[sorted_ids[starts]] = np.add.reduceat(dout.take(order, axis=0), starts, axis=0)
    return dweight


def _embedding_grad_methods():
    """The scatter-add implementations compared in benchmarks/bench_layers.py (NumPy only)."""
    def add_at(ids, dout, V):
        dweight = np.zeros((V, dout.shape[1]), dout.dtype)
        np.add.at(dweight, ids, dout)
        return dweight

    def bincount_per_column(ids, dout, V):
        cols = [np.bincount(ids, weights=dout[:, c], minlength=V) for c in range(dout.shape[1])]
        return np.stack(cols, axis=1).astype(dout.dtype)

    return {"np.add.at": add_at, "sort + np.add.reduceat": _embedding_grad_sorted,
            "bincount per column": bincount_per_column, "one-hot matmul": _embedding_grad_one_hot}


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last axis (Ba et al. 2016): y = x̂ w + b, x̂ = (x - μ) / σ, σ = sqrt(var + eps).
    x (..., C), weight and bias (C,) or None -> (..., C).

    With g = dout * w (the gradient reaching x̂) and C the row length, differentiating through
    μ and σ (dμ/dx_j = 1/C, dσ/dx_j = x̂_j / (C σ)) gives
        dinp = (g - mean(g) - x̂ mean(g x̂)) / σ,   dweight = sum(dout x̂),   dbias = sum(dout)
    with the means over the row and the sums over every axis but the last. Row and column sums use
    ``einsum`` ("ij->i"), 3x faster than ``.sum(-1)`` on (2048, 384) float32, and without the
    temporary of ``(a * b).sum()``. (Row blocks over the thread pool gave nothing here: measured.)
    float16 input is normalized in float32 (μ, σ, x̂) and the output and gradients cast back.
    On CuPy this runs as the kernels ``kernels.layer_norm_forward`` / ``_backward``.
    """
    xp = get_array_module(x.data)
    C = x.shape[-1]
    X = x.data.reshape(-1, C)                               # (N, C)
    params = [t.data for t in (weight, bias) if t is not None]
    if _use_kernels(xp, X, *params):
        return _layer_norm_kernels(x, weight, bias, eps, X)
    if X.dtype == np.float16:
        X = X.astype(np.float32)                            # statistics in float32
    mu = xp.einsum("ij->i", X)[:, None]
    mu *= 1.0 / C                                           # (N, 1) μ
    xhat = X - mu                                           # (N, C) x - μ
    rstd = xp.einsum("ij,ij->i", xhat, xhat)[:, None]
    rstd *= 1.0 / C                                         # (N, 1) var
    rstd += eps
    xp.sqrt(rstd, out=rstd)
    xp.divide(1.0, rstd, out=rstd)                          # (N, 1) 1/σ
    xhat *= rstd                                            # (N, C) x̂
    out = xhat * weight.data if weight is not None else xhat.copy()  # (N, C)
    if bias is not None:
        out += bias.data

    def backward(dout):
        dout2 = dout.reshape(-1, C).astype(X.dtype, copy=False)  # (N, C)
        if weight is not None and weight.requires_grad:
            dw = xp.einsum("ij,ij->j", dout2, xhat)          # (C,) dweight
            weight._accumulate(dw.astype(weight.dtype, copy=False), owned=True)
        if bias is not None and bias.requires_grad:
            db = xp.einsum("ij->j", dout2)                   # (C,) dbias
            bias._accumulate(db.astype(bias.dtype, copy=False), owned=True)
        if x.requires_grad:
            dinp = dout2 * weight.data if weight is not None else dout2.copy()  # (N, C) g
            gxm = xp.einsum("ij,ij->i", dinp, xhat)[:, None]
            gxm *= 1.0 / C                                  # (N, 1) mean(g x̂)
            gm = xp.einsum("ij->i", dinp)[:, None]
            gm *= 1.0 / C                                   # (N, 1) mean(g)
            dinp -= gm
            gxm = xhat * gxm                                # (N, C) x̂ mean(g x̂)
            dinp -= gxm
            dinp *= rstd                                    # (N, C)
            x._accumulate(dinp.astype(x.dtype, copy=False).reshape(x.shape))
    parents = tuple(t for t in (x, weight, bias) if t is not None)
    return Tensor.from_op(out.astype(x.dtype, copy=False).reshape(x.shape), parents, backward, "layer_norm")


def _use_kernels(xp, *arrays):
    """Run the CuPy kernels of ``kernels.py``: CuPy arrays of one supported dtype, none empty, and
    the kernels not switched off (NPGPT_FUSED=0 or ``kernels.ENABLED = False``)."""
    return (xp is not np and kernels.enabled() and kernels.supports(arrays[0].dtype)
            and all(a.dtype == arrays[0].dtype and a.size for a in arrays))


def _layer_norm_kernels(x, weight, bias, eps, X):
    """layer_norm on CuPy: one forward and two backward kernels (x̂ is recomputed from μ and 1/σ)."""
    C = X.shape[1]
    w, b = (t.data if t is not None else None for t in (weight, bias))
    out, mean, rstd = kernels.layer_norm_forward(X, w, b, eps)          # (N, C), (N,), (N,)

    def backward(dout):
        need_dwb = any(t is not None and t.requires_grad for t in (weight, bias))
        dinp, dw, db = kernels.layer_norm_backward(dout.reshape(-1, C), X, w, mean, rstd,
                                                   need_dinp=x.requires_grad, need_dwb=need_dwb)
        if weight is not None and weight.requires_grad:
            weight._accumulate(dw, owned=True)              # (C,)
        if bias is not None and bias.requires_grad:
            bias._accumulate(db, owned=True)                # (C,)
        if x.requires_grad:
            x._accumulate(dinp.reshape(x.shape), owned=True)
    parents = tuple(t for t in (x, weight, bias) if t is not None)
    return Tensor.from_op(out.reshape(x.shape), parents, backward, "layer_norm")


_GELU_A = math.sqrt(2.0 / math.pi)  # Python floats: a NumPy float64 scalar would upcast float32
_GELU_B = 0.044715


def gelu(x):
    """GELU, tanh approximation (Hendrycks & Gimpel 2016), as GPT-2.  x (...) -> (...):
        y = x/2 (1 + tanh u),  u = a (x + b x^3) = x (a + ab x^2),  a = sqrt(2/pi), b = 0.044715
        dy/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) a (1 + 3b x^2)
    With s = 1 + tanh u (kept from the forward) and 1 - tanh^2 u = (2 - s) s:
        dy/dx = s (1/2 + x/2 (a + 3ab x^2) (2 - s))
    Both passes run in place (out=) with one temporary, split over a small thread pool for large
    NumPy arrays (ufuncs release the GIL; each element is computed exactly as without threads).
    float16 input is computed in float32 and the output and gradient cast back. On CuPy this runs as
    the kernels ``kernels.gelu_forward`` / ``gelu_backward`` (the backward recomputes s from x).
    """
    xp = get_array_module(x.data)
    X = xp.ascontiguousarray(x.data)
    if _use_kernels(xp, X):
        return Tensor.from_op(kernels.gelu_forward(X), (x,),
                              lambda dout: x._accumulate(kernels.gelu_backward(X, dout), owned=True), "gelu")
    if X.dtype == np.float16:
        X = X.astype(np.float32)                            # (...) computed in float32
    out = xp.empty_like(X)                                  # (...) y
    s = xp.empty_like(X)                                    # (...) 1 + tanh u
    _run_chunked(_gelu_forward, X.reshape(-1), out.reshape(-1), s.reshape(-1))

    def backward(dout):
        dinp = xp.empty_like(X)                             # (...)
        flat = (a.reshape(-1) for a in (X, s, xp.ascontiguousarray(dout, dtype=X.dtype), dinp))
        _run_chunked(_gelu_backward, *flat)
        x._accumulate(dinp.astype(x.dtype, copy=False))
    return Tensor.from_op(out.astype(x.dtype, copy=False), (x,), backward, "gelu")


def _gelu_forward(X, out, s):
    xp = get_array_module(X)
    xp.multiply(X, X, out=s)
    s *= _GELU_A * _GELU_B
    s += _GELU_A
    s *= X                                                  # u
    xp.tanh(s, out=s)
    s += 1.0                                                # s = 1 + tanh u
    xp.multiply(X, s, out=out)
    out *= 0.5                                              # y = x s / 2


def _gelu_backward(X, s, dout, dinp):
    xp = get_array_module(X)
    tmp = xp.subtract(2.0, s)                               # 2 - s = 1 - tanh u
    xp.multiply(X, X, out=dinp)
    dinp *= 1.5 * _GELU_A * _GELU_B
    dinp += 0.5 * _GELU_A
    dinp *= X                                               # x/2 (a + 3ab x^2)
    dinp *= tmp
    dinp += 0.5
    dinp *= s                                               # dy/dx
    dinp *= dout


_POOL = None
_CHUNK_MIN = 1 << 18  # elements: below this handing work to a thread costs more than it saves


def _run_chunked(kernel, *arrays):
    """kernel(*arrays) for arrays that share their first axis, where the kernel treats each index
    of that axis on its own (elementwise, or row by row) and writes its results in place.

    NumPy ufuncs release the GIL, so large NumPy arrays (at least _CHUNK_MIN elements) are cut
    into one block of that axis per thread and the blocks run concurrently; every element or row is
    computed by the same code as in one call, so results are bit-identical. (Measured on 2 cores:
    GELU forward 7.3 -> 3.8 ms on (2048, 1536); row reductions and einsum gain nothing, so
    layer_norm does not use it.)
    """
    global _POOL
    n_threads = min(2, os.cpu_count() or 1)
    n = arrays[0].shape[0]
    if get_array_module(arrays[0]) is not np or arrays[0].size < _CHUNK_MIN or min(n_threads, n) < 2:
        kernel(*arrays)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(n_threads, thread_name_prefix="npgpt-elementwise")
    cuts = [n * i // n_threads for i in range(n_threads + 1)]
    jobs = [_POOL.submit(kernel, *(a[lo:hi] for a in arrays)) for lo, hi in zip(cuts[:-1], cuts[1:])]
    for job in jobs:
        job.result()


def _softmax_rows(S, guard=False):
    """In place, each row of S (n, V) -> exp(S - max) / sum (max subtracted per row: no overflow).
    guard: rows that are entirely -inf (every key masked) become 0 instead of NaN."""
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
    """Softmax over the last axis of an array, in place when it is contiguous (else on a copy), in
    row blocks over the pool. Returns the probabilities."""
    S = get_array_module(S).ascontiguousarray(S)
    _run_chunked(lambda rows: _softmax_rows(rows, guard), S.reshape(-1, S.shape[-1]))
    return S


def _softmax_backward_rows(dP, P, dot=None):
    """In place, rows: dP -> P * (dP - sum(dP * P)); ``dot`` = sum(dP * P) when already known."""
    if dot is None:
        dot = get_array_module(dP).einsum("ij,ij->i", dP, P)[:, None]
    dP -= dot
    dP *= P


def softmax(x, axis=-1):
    """p_i = e^{x_i} / sum_j e^{x_j}, computed as e^{x_i - max x} (no overflow).  x (...) -> (...).
    Jacobian dp_i/dx_j = p_i (δ_ij - p_j), so
        dinp = p * (dout - sum(dout * p))   (sum over ``axis``).
    Both passes work on a copy with ``axis`` moved last, in row blocks over the pool."""
    xp = get_array_module(x.data)
    P = softmax_array(xp.moveaxis(x.data, axis, -1).copy())  # (..., V) softmax axis last

    def backward(dout):
        dinp = xp.moveaxis(dout, axis, -1).copy()           # (..., V) contiguous
        _run_chunked(_softmax_backward_rows, dinp.reshape(-1, P.shape[-1]), P.reshape(-1, P.shape[-1]))
        x._accumulate(xp.moveaxis(dinp, -1, axis))
    return Tensor.from_op(xp.moveaxis(P, -1, axis), (x,), backward, "softmax")


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean negative log-likelihood of ``targets`` under softmax(``logits``) -> a 0-d Tensor.

    logits (..., V) Tensor, targets (...) integers; positions whose target is ``ignore_index`` are
    left out of the mean. With m = max_j x_j per row, the log-softmax is taken in the log domain,
        log p[t] = x[t] - m - log sum_j e^(x_j - m)        (no overflow, no log of an underflowed p)
    loss = -(1/N) sum_n log p_n[t_n] over the N kept positions, and since d log p[t] / dx_j
    = δ_jt - p_j, dlogits_n = (p_n - onehot(t_n)) / N for kept rows, 0 for ignored ones.
    If every target is ignored (N = 0) the loss is 0 with a zero gradient (not NaN as 0/0 would be).
    float16 logits: the log-softmax is computed in float32, the loss is float32 and dlogits float16.

    A target outside [0, V) that is not ``ignore_index`` raises ValueError on NumPy. On CuPy, where
    checking would make the host wait for the GPU, such a row is left out and the loss is NaN.
    On CuPy this runs as the kernels ``kernels.cross_entropy_forward`` / ``_backward``, and N stays
    on the device.
    """
    xp = get_array_module(logits.data)
    V = logits.shape[-1]
    X = logits.data.reshape(-1, V)                          # (N, V)
    t = backend.to_device(targets.data if isinstance(targets, Tensor) else targets).reshape(-1)  # (N,)
    if t.shape[0] != X.shape[0]:
        raise ValueError(f"targets have {t.shape[0]} positions but logits {X.shape[0]} (shape {logits.shape})")
    if _use_kernels(xp, X):
        return _cross_entropy_kernels(logits, X, t, ignore_index)
    if X.dtype == np.float16:
        X = X.astype(np.float32)                            # (N, V) log-softmax in float32
    keep = t != ignore_index                                # (N,)
    bad = None
    if xp is np:
        n = int(keep.sum())
        all_kept = n == t.shape[0]
        tk = t if all_kept else xp.where(keep, t, 0)
        if n and (int(tk.min()) < 0 or int(tk.max()) >= V):
            raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}")
        inv_n = 1.0 / max(n, 1)
    else:   # no host sync: out-of-range targets are left out and make the loss NaN
        valid = (t >= 0) & (t < V)
        bad = (keep & ~valid).any()                         # () on the device
        keep &= valid
        all_kept = False
        tk = xp.where(keep, t, 0)
        inv_n = (1.0 / xp.maximum(keep.sum(), 1)).astype(X.dtype)   # () 1/N on the device
    rows = xp.arange(X.shape[0])
    m = X.max(axis=-1, keepdims=True)                       # (N, 1)
    E = X - m
    xp.exp(E, out=E)                                        # (N, V) e^(x - m)
    z = E.sum(axis=-1, keepdims=True)                       # (N, 1)
    logp = X[rows, tk] - m[:, 0] - xp.log(z[:, 0])          # (N,) log p[t]
    if not all_kept:
        logp *= keep
    loss = (logp.sum() * -inv_n).astype(X.dtype)
    if bad is not None:
        loss = xp.where(bad, X.dtype.type(np.nan), loss)

    fresh = [E]

    def backward(dout):
        # reuse e^(x - m) as the gradient buffer the first time; recompute it if backward runs again
        dlogits = fresh.pop() if fresh else xp.exp(X - m)   # (N, V)
        dlogits /= z                                        # p
        dlogits[rows, tk] -= 1.0                            # p - onehot(t)
        scale = dout * inv_n
        if all_kept:
            dlogits *= scale.astype(X.dtype)
        else:
            dlogits *= (keep * scale).astype(X.dtype)[:, None]
        logits._accumulate(dlogits.astype(logits.dtype, copy=False).reshape(logits.shape))   # (..., V)
    return Tensor.from_op(loss, (logits,), backward, "cross_entropy")


def _cross_entropy_kernels(logits, X, t, ignore_index):
    """cross_entropy on CuPy, in three passes over (N, V) per training step: the forward reads the
    logits once (an online max and sum of exponentials per row, keeping only lse (N,)); the backward
    reads them again and writes dlogits = (e^(x - lse) - onehot) * dout / N in the same pass. That
    is as few as llm.c's fused classifier (forward, then a second read that writes the gradient),
    while dout (a loss scale, gradient accumulation) may be any device value and the logits stay
    intact for the caller (no in-place overwrite)."""
    t = t.astype(np.int64, copy=False)                      # (N,)
    loss, lse, inv_n = kernels.cross_entropy_forward(X, t, ignore_index)  # (), (N,), ()

    def backward(dout):
        dlogits = kernels.cross_entropy_backward(dout, X, t, lse, inv_n, ignore_index)  # (N, V)
        logits._accumulate(dlogits.reshape(logits.shape), owned=True)
    return Tensor.from_op(loss, (logits,), backward, "cross_entropy")


def dropout(x, p, training=True):
    """Inverted dropout (Srivastava et al. 2014).  x (...) -> (...).

    Keep each element with probability 1 - p and scale it by 1/(1 - p), so E[y] = x; y = x * mask
    with mask = keep / (1 - p), hence dinp = dout * mask (the same mask). The mask comes from
    ``backend.rng()``. Returns ``x`` itself (no new node) when p == 0 or not training.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    rdtype = x.dtype if x.dtype.itemsize >= 4 else np.float32  # the Generator draws float32/float64
    mask = backend.rng().random(x.shape, dtype=rdtype) >= p  # (...) keep
    mask = mask * x.dtype.type(1.0 / (1.0 - p))             # (...) keep / (1 - p), x's dtype

    def backward(dout):
        x._accumulate(dout * mask)                          # dinp
    return Tensor.from_op(x.data * mask, (x,), backward, "dropout")


from .attention import scaled_dot_product_attention  # noqa: E402,F401

__all__.append("scaled_dot_product_attention")
