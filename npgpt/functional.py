"""Hand-derived fused layers: each is ONE graph node whose backward is written out by hand.

Composing these from primitives would work (tests check that it gives the same numbers) but
would store many intermediates and run many passes; here each forward keeps only what its
backward needs. Derivations are in the docstrings; x̂, μ, σ etc. are per row of the last axis.
Attention lives in ``attention.py``.
"""
import math

from . import backend
from .backend import get_array_module
from .engine import Tensor

__all__ = ["linear", "embedding", "layer_norm", "gelu", "softmax", "cross_entropy", "dropout"]


def linear(x, weight, bias=None):
    """y = x W + b.  x (..., Cin), W (Cin, Cout) (GPT-2's Conv1D layout), b (Cout,) -> (..., Cout).

    Run as one 2-D GEMM on x flattened to (N, Cin). With dY = dL/dy flattened to (N, Cout):
        dX = dY W^T,   dW = X^T dY,   db = sum_n dY[n]
    """
    W = weight.data
    x2 = x.data.reshape(-1, W.shape[0])                     # (N, Cin)
    out = x2 @ W                                            # (N, Cout)
    if bias is not None:
        out += bias.data

    def backward(dout):
        dout2 = dout.reshape(-1, W.shape[1])                # (N, Cout)
        if x.requires_grad:
            x._accumulate((dout2 @ W.T).reshape(x.shape))   # (..., Cin)
        if weight.requires_grad:
            weight._accumulate(x2.T @ dout2)                # (Cin, Cout)
        if bias is not None and bias.requires_grad:
            bias._accumulate(dout2.sum(axis=0))             # (Cout,)
    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor.from_op(out.reshape(x.shape[:-1] + (W.shape[1],)), parents, backward, "linear")


def embedding(ids, weight):
    """Rows of a table: out[b, t] = W[ids[b, t]].  ids: integers of any shape S, W (V, C) -> S + (C,).

    dW[v] = sum of dout over the positions where ids == v (a scatter-add: repeated ids accumulate).
    """
    ids = backend.to_device(getattr(ids, "data", ids))
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding ids must be integers, got dtype {ids.dtype}")
    out = weight.data[ids]                                  # (B, T, C)

    def backward(dout):
        xp = get_array_module(dout)
        C = weight.shape[1]
        dweight = xp.zeros_like(weight.data)                # (V, C)
        backend.scatter_add(dweight, ids.reshape(-1), dout.reshape(-1, C))
        weight._accumulate(dweight)
    return Tensor.from_op(out, (weight,), backward, "embedding")


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last axis (Ba et al. 2016): y = x̂ w + b, x̂ = (x - μ) / σ, σ = sqrt(var + eps).

    With g = dout * w (the gradient reaching x̂) and C the row length, differentiating through
    μ and σ (dμ/dx_j = 1/C, dσ/dx_j = x̂_j / (C σ)) gives
        dx = (g - mean(g) - x̂ mean(g x̂)) / σ,   dw = sum(dout x̂),   db = sum(dout)
    with the sums over every axis but the last.
    """
    xp = get_array_module(x.data)
    X = x.data
    mu = X.mean(axis=-1, keepdims=True)                     # (..., 1)
    xc = X - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)                         # (..., 1)
    xhat = xc
    xhat *= rstd                                            # (..., C)
    out = xhat * weight.data if weight is not None else xhat.copy()
    if bias is not None:
        out += bias.data

    def backward(dout):
        C = X.shape[-1]
        lead = tuple(range(dout.ndim - 1))
        if weight is not None and weight.requires_grad:
            weight._accumulate((dout * xhat).sum(axis=lead))
        if bias is not None and bias.requires_grad:
            bias._accumulate(dout.sum(axis=lead))
        if x.requires_grad:
            g = dout * weight.data if weight is not None else dout.copy()
            gm = g.mean(axis=-1, keepdims=True)
            gxm = (g * xhat).sum(axis=-1, keepdims=True) * (1.0 / C)
            g -= gm
            g -= xhat * gxm
            g *= rstd
            x._accumulate(g)
    parents = tuple(t for t in (x, weight, bias) if t is not None)
    return Tensor.from_op(out, parents, backward, "layer_norm")


_GELU_A = math.sqrt(2.0 / math.pi)
_GELU_B = 0.044715


def gelu(x):
    """GELU, tanh approximation (Hendrycks & Gimpel 2016), as GPT-2:
        y = x/2 (1 + tanh u),  u = a (x + b x^3),  a = sqrt(2/pi), b = 0.044715
        dy/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) a (1 + 3 b x^2)
    The forward keeps tanh u for the backward; both passes work in place to avoid temporaries.
    """
    xp = get_array_module(x.data)
    X = x.data
    t = X * X                                               # x^2
    t *= _GELU_B
    t += 1.0
    t *= X
    t *= _GELU_A                                            # u = a x (1 + b x^2)
    xp.tanh(t, out=t)                                       # tanh u
    out = t + 1.0
    out *= X
    out *= 0.5                                              # x/2 (1 + tanh u)

    def backward(dout):
        dinp = X * X
        dinp *= 3.0 * _GELU_B
        dinp += 1.0
        dinp *= _GELU_A                                     # a (1 + 3 b x^2)
        sech2 = t * t
        xp.subtract(1.0, sech2, out=sech2)                  # 1 - tanh^2 u
        dinp *= sech2
        dinp *= X
        dinp += t
        dinp += 1.0
        dinp *= 0.5                                         # dy/dx
        dinp *= dout
        x._accumulate(dinp)
    return Tensor.from_op(out, (x,), backward, "gelu")


def _softmax_array(S, axis=-1):
    """Numerically stable softmax of an array: exp(S - max) / sum (max subtracted per row)."""
    xp = get_array_module(S)
    m = S.max(axis=axis, keepdims=True)
    P = S - m
    xp.exp(P, out=P)
    P /= P.sum(axis=axis, keepdims=True)
    return P


def softmax(x, axis=-1):
    """p_i = e^{x_i} / sum_j e^{x_j}.  Jacobian dp_i/dx_j = p_i (δ_ij - p_j), so
        dx = p * (dout - sum(dout * p))   (sum over ``axis``)."""
    P = _softmax_array(x.data, axis)

    def backward(dout):
        dinp = dout * P
        dinp -= P * dinp.sum(axis=axis, keepdims=True)
        x._accumulate(dinp)
    return Tensor.from_op(P, (x,), backward, "softmax")


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean negative log-likelihood of ``targets`` under softmax(``logits``).

    logits (..., V) Tensor, targets (...) integers; positions whose target is ``ignore_index`` are
    left out of the mean. loss = -(1/N) sum_n log p_n[t_n] with log p = x - max - log sum e^(x - max)
    (stable). dlogits_n = (p_n - onehot(t_n)) / N for kept rows, 0 for ignored ones.
    If every target is ignored the loss is 0 with a zero gradient.
    """
    xp = get_array_module(logits.data)
    V = logits.shape[-1]
    X = logits.data.reshape(-1, V)                           # (N, V)
    t = backend.to_device(getattr(targets, "data", targets)).reshape(-1)  # (N,)
    if t.shape[0] != X.shape[0]:
        raise ValueError(f"targets have {t.shape[0]} positions but logits {X.shape[0]} (shape {logits.shape})")
    keep = t != ignore_index                                 # (N,)
    n = int(keep.sum())
    tk = xp.where(keep, t, 0)
    if n and (int(tk.min()) < 0 or int(tk.max()) >= V):
        raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}")
    P = _softmax_array(X, axis=-1)                           # (N, V) probabilities
    rows = xp.arange(X.shape[0])
    logp = xp.log(xp.maximum(P[rows, tk], xp.finfo(P.dtype).tiny))
    loss = -(logp * keep).sum() / max(n, 1)
    loss = loss.astype(X.dtype)

    fresh = [P]

    def backward(dout):
        # reuse the probabilities' buffer the first time; recompute if backward runs again
        dlogits = fresh.pop() if fresh else _softmax_array(X, axis=-1)
        dlogits[rows, tk] -= 1.0
        dlogits *= (keep * (dout / max(n, 1)))[:, None].astype(X.dtype)
        logits._accumulate(dlogits.reshape(logits.shape))
    return Tensor.from_op(loss, (logits,), backward, "cross_entropy")


def dropout(x, p, training=True):
    """Inverted dropout (Srivastava et al. 2014): keep each element with probability 1 - p and scale
    by 1/(1 - p), so the expectation is unchanged; d/dx is the same mask times 1/(1 - p).
    The identity (x itself) when p == 0 or not training."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    keep = backend.rng().random(x.shape, dtype=x.dtype) >= p
    scale = 1.0 / (1.0 - p)
    mask = keep * x.dtype.type(scale)                        # (same shape as x)

    def backward(dout):
        x._accumulate(dout * mask)
    return Tensor.from_op(x.data * mask, (x,), backward, "dropout")


from .attention import scaled_dot_product_attention  # noqa: E402,F401

__all__.append("scaled_dot_product_attention")
