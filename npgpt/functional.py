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

from . import backend
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
            weight._accumulate(x2.T @ dout2)                # (Cin, Cout) dweight
        if bias is not None and bias.requires_grad:
            bias._accumulate(dout2.sum(axis=0))             # (Cout,) dbias
    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor.from_op(out.reshape(x.shape[:-1] + (Cout,)), parents, backward, "linear")


def embedding(ids, weight):
    """Rows of a table: out[b, t] = W[ids[b, t]].  ids: integers of any shape S, W (V, C) -> S + (C,).

    out is linear in W with d out[n] / d W[v] = [ids[n] == v], so
        dW[v] = sum of dout[n] over the positions n where ids[n] == v
    a scatter-add in which repeated ids accumulate. ``np.add.at`` does it element by element
    (6.7 ms for 2048 rows of 384 at V=65); sorting the ids and summing each run of equal ids with
    ``np.add.reduceat`` is 0.9 ms there and no slower at V=50257 (where zeroing dW dominates), so
    NumPy uses that at every size (see benchmarks/bench_layers.py); CuPy uses its atomic scatter-add.
    """
    ids = backend.to_device(ids.data if isinstance(ids, Tensor) else ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding ids must be integers, got dtype {ids.dtype}")
    out = weight.data[ids]                                  # (B, T, C)

    def backward(dout):
        V, C = weight.shape
        dweight = _embedding_grad(ids.reshape(-1), dout.reshape(-1, C), V)  # (V, C)
        weight._accumulate(dweight)
    return Tensor.from_op(out, (weight,), backward, "embedding")


def _embedding_grad(ids, dout, V):
    """dW (V, C) with dW[v] = sum of dout[n] where ids[n] == v.  ids (N,), dout (N, C)."""
    xp = get_array_module(dout)
    if xp is not np:
        return backend.scatter_add(xp.zeros((V, dout.shape[1]), dout.dtype), ids, dout)
    return _embedding_grad_sorted(ids, dout, V)


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

    def one_hot_matmul(ids, dout, V):
        onehot = np.zeros((V, ids.shape[0]), dout.dtype)    # (V, N)
        onehot[ids, np.arange(ids.shape[0])] = 1
        return onehot @ dout

    def bincount_per_column(ids, dout, V):
        cols = [np.bincount(ids, weights=dout[:, c], minlength=V) for c in range(dout.shape[1])]
        return np.stack(cols, axis=1).astype(dout.dtype)

    methods = {"np.add.at": add_at, "sort + np.add.reduceat": _embedding_grad_sorted,
               "bincount per column": bincount_per_column}
    return {**methods, "one-hot matmul": one_hot_matmul}


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last axis (Ba et al. 2016): y = x̂ w + b, x̂ = (x - μ) / σ, σ = sqrt(var + eps).
    x (..., C), weight and bias (C,) or None -> (..., C).

    With g = dout * w (the gradient reaching x̂) and C the row length, differentiating through
    μ and σ (dμ/dx_j = 1/C, dσ/dx_j = x̂_j / (C σ)) gives
        dinp = (g - mean(g) - x̂ mean(g x̂)) / σ,   dweight = sum(dout x̂),   dbias = sum(dout)
    with the means over the row and the sums over every axis but the last.
    """
    xp = get_array_module(x.data)
    X = x.data
    C = X.shape[-1]
    mu = X.mean(axis=-1, keepdims=True)                     # (..., 1)
    xhat = X - mu                                           # (..., C), centred for now
    out = xhat * xhat                                       # (..., C), scratch: squared deviations
    var = out.mean(axis=-1, keepdims=True)                  # (..., 1)
    var += eps
    rstd = xp.sqrt(var, out=var)
    xp.divide(1.0, rstd, out=rstd)                          # (..., 1) 1/σ
    xhat *= rstd                                            # (..., C) = x̂
    if weight is not None:
        xp.multiply(xhat, weight.data, out=out)
    else:
        out[...] = xhat
    if bias is not None:
        out += bias.data                                    # (..., C)

    def backward(dout):
        lead = tuple(range(dout.ndim - 1))
        tmp = dout * xhat                                   # (..., C)
        if weight is not None and weight.requires_grad:
            weight._accumulate(tmp.sum(axis=lead))          # (C,)
        if bias is not None and bias.requires_grad:
            bias._accumulate(dout.sum(axis=lead))           # (C,)
        if x.requires_grad:
            if weight is not None:
                g = dout * weight.data                      # (..., C)
                xp.multiply(g, xhat, out=tmp)
            else:
                g = dout.copy()
            gm = g.mean(axis=-1, keepdims=True)             # (..., 1)
            gxm = tmp.sum(axis=-1, keepdims=True)
            gxm *= 1.0 / C                                  # (..., 1) mean(g x̂)
            g -= gm
            xp.multiply(xhat, gxm, out=tmp)
            g -= tmp
            g *= rstd                                       # (..., C) dinp
            x._accumulate(g)
    parents = tuple(t for t in (x, weight, bias) if t is not None)
    return Tensor.from_op(out, parents, backward, "layer_norm")


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
    """
    xp = get_array_module(x.data)
    X = xp.ascontiguousarray(x.data)
    out = xp.empty_like(X)                                  # (...) y
    s = xp.empty_like(X)                                    # (...) 1 + tanh u
    _run_chunked(_gelu_forward, X, out, s)

    def backward(dout):
        dinp = xp.empty_like(X)                             # (...)
        _run_chunked(_gelu_backward, X, s, xp.ascontiguousarray(dout), dinp)
        x._accumulate(dinp)
    return Tensor.from_op(out, (x,), backward, "gelu")


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
    """kernel(*arrays) on contiguous same-size arrays; NumPy arrays of at least _CHUNK_MIN elements
    are cut into one flat block per thread and the blocks run concurrently (the kernel must be
    elementwise, so the result is bit-identical to one call)."""
    global _POOL
    n_threads = min(2, os.cpu_count() or 1)
    n = arrays[0].size
    if get_array_module(arrays[0]) is not np or n < _CHUNK_MIN or n_threads < 2:
        kernel(*arrays)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(n_threads, thread_name_prefix="npgpt-elementwise")
    flat = [a.reshape(-1) for a in arrays]                  # views (all contiguous)
    cuts = [n * i // n_threads for i in range(n_threads + 1)]
    jobs = [_POOL.submit(kernel, *(f[lo:hi] for f in flat)) for lo, hi in zip(cuts[:-1], cuts[1:])]
    for job in jobs:
        job.result()


def _softmax_array(S, axis=-1):
    """Numerically stable softmax of an array: exp(S - max) / sum (max subtracted per row)."""
    xp = get_array_module(S)
    P = S - S.max(axis=axis, keepdims=True)
    xp.exp(P, out=P)
    P /= P.sum(axis=axis, keepdims=True)
    return P


def softmax(x, axis=-1):
    """p_i = e^{x_i} / sum_j e^{x_j}, computed as e^{x_i - max x} (no overflow).  x (...) -> (...).
    Jacobian dp_i/dx_j = p_i (δ_ij - p_j), so
        dinp = p * (dout - sum(dout * p))   (sum over ``axis``)."""
    P = _softmax_array(x.data, axis)                        # (...)

    def backward(dout):
        dinp = dout * P
        dot = dinp.sum(axis=axis, keepdims=True)            # sum(dout * p)
        get_array_module(dout).subtract(dout, dot, out=dinp)
        dinp *= P
        x._accumulate(dinp)
    return Tensor.from_op(P, (x,), backward, "softmax")


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean negative log-likelihood of ``targets`` under softmax(``logits``) -> a 0-d Tensor.

    logits (..., V) Tensor, targets (...) integers; positions whose target is ``ignore_index`` are
    left out of the mean. With m = max_j x_j per row, the log-softmax is taken in the log domain,
        log p[t] = x[t] - m - log sum_j e^(x_j - m)        (no overflow, no log of an underflowed p)
    loss = -(1/N) sum_n log p_n[t_n] over the N kept positions, and since d log p[t] / dx_j
    = δ_jt - p_j, dlogits_n = (p_n - onehot(t_n)) / N for kept rows, 0 for ignored ones.
    If every target is ignored (N = 0) the loss is 0 with a zero gradient (not NaN as 0/0 would be).
    """
    xp = get_array_module(logits.data)
    V = logits.shape[-1]
    X = logits.data.reshape(-1, V)                          # (N, V)
    t = backend.to_device(targets.data if isinstance(targets, Tensor) else targets).reshape(-1)  # (N,)
    if t.shape[0] != X.shape[0]:
        raise ValueError(f"targets have {t.shape[0]} positions but logits {X.shape[0]} (shape {logits.shape})")
    keep = t != ignore_index                                # (N,)
    n = int(keep.sum())
    all_kept = n == t.shape[0]
    tk = t if all_kept else xp.where(keep, t, 0)
    if n and (int(tk.min()) < 0 or int(tk.max()) >= V):
        raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}")
    rows = xp.arange(X.shape[0])
    m = X.max(axis=-1, keepdims=True)                       # (N, 1)
    E = X - m
    xp.exp(E, out=E)                                        # (N, V) e^(x - m)
    z = E.sum(axis=-1, keepdims=True)                       # (N, 1)
    logp = X[rows, tk] - m[:, 0] - xp.log(z[:, 0])          # (N,) log p[t]
    if not all_kept:
        logp *= keep
    loss = (logp.sum() * (-1.0 / max(n, 1))).astype(X.dtype)

    fresh = [E]

    def backward(dout):
        # reuse e^(x - m) as the gradient buffer the first time; recompute it if backward runs again
        dlogits = fresh.pop() if fresh else xp.exp(X - m)   # (N, V)
        dlogits /= z                                        # p
        dlogits[rows, tk] -= 1.0                            # p - onehot(t)
        scale = dout * (1.0 / max(n, 1))
        if all_kept:
            dlogits *= scale.astype(X.dtype)
        else:
            dlogits *= (keep * scale).astype(X.dtype)[:, None]
        logits._accumulate(dlogits.reshape(logits.shape))   # (..., V)
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
