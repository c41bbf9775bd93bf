"""Residual add + layer norm as one pass: the pre-LN block's ``r = x + delta`` and ``LN(r)``.

A pre-LN transformer block adds each sub-layer's output to the residual stream and normalizes the
sum for the next sub-layer. Per row of length C (x, delta (..., C) flattened to N rows):

    (RN1)  r = x + delta                                 rounded to the storage dtype, as the add stores it
    (RN2)  y = LN(r)                                     (N1)-(N4) of ``layer_norm.py``: μ, σ of r, y = x̂ w + b

r has two consumers: the next residual add (gradient ``dres``) and the layer norm (gradient dy).
With g = dy w and x̂ = (r - μ) / σ, (N5) gives

    (RN3)  dr = dres + (g - mean(g) - x̂ mean(g x̂)) / σ
    (RN4)  dx = ddelta = dr                              (the add passes its gradient to both)
    (RN5)  dweight, dbias: (N6)-(N7) of dy and x̂

The forward kernel writes r and y in one pass over the row (llm.c's ``fused_residual_forward``)
instead of an add that writes r and a layer norm that reads it back. In the backward, when dres
has already arrived (the reverse order delivers the next residual add's gradient first), one rows
kernel computes (RN3) in the same pass; otherwise (N5) alone, added to r's gradient later.

There is no NumPy twin: on NumPy (or with the kernels off) ``residual_layer_norm`` is the plain add
and ``layer_norm`` (the same math, two nodes). Not yet measured on a GPU; nothing calls it by default
(benchmarks/RESULTS.md, "GPU work prepared without a GPU").
"""
import numpy as np

from ..backend import get_array_module
from ..engine import Tensor
from . import _cuda
from ._cuda import cdiv, contiguous, i32
from .layer_norm import ROW_BLOCK, layer_norm, layer_norm_backward_cuda, layer_norm_reference

__all__ = ["residual_layer_norm", "residual_layer_norm_reference"]


# ---- reference: (RN1)-(RN2) composed from engine primitives -------------------------------------

def residual_layer_norm_reference(x, delta, weight=None, bias=None, eps=1e-5):
    """(RN1)-(RN2) from engine ops (autograd supplies (RN3)-(RN5)): -> (r, y). The tests' oracle."""
    r = x + delta
    return r, layer_norm_reference(r, weight, bias, eps)


# ---- CUDA ---------------------------------------------------------------------------------------

_CUDA_SOURCE = _cuda.register_source("raw", "residual_layer_norm", r"""
extern "C" __global__ void npgpt_res_ln_fwd(const T* x, const T* d, const T* w, const T* b, T* r, T* y,
                                            A* mean, A* rstd, int N, int C, A eps, int has_w, int has_b) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= N) return;                     // uniform over the warp
    const long long off = row * C;
    A s = 0;
    for (int c = lane; c < C; c += 32) { put(r + off + c, to_acc(x[off + c]) + to_acc(d[off + c])); s += to_acc(r[off + c]); }
    const A mu = warp_sum(s) / (A)C;          // each lane reads back only what it wrote: no sync needed
    A v = 0;
    for (int c = lane; c < C; c += 32) { A e = to_acc(r[off + c]) - mu; v += e * e; }
    const A rs = (A)1 / sq(warp_sum(v) / (A)C + eps);
    for (int c = lane; c < C; c += 32) {
        A o = (to_acc(r[off + c]) - mu) * rs;
        if (has_w) o *= to_acc(w[c]);
        if (has_b) o += to_acc(b[c]);
        put(y + off + c, o);
    }
    if (lane == 0) { mean[row] = mu; rstd[row] = rs; }
}

// (RN3) dinp = dres + (g - mean(g) - xhat mean(g xhat)) rstd, g = dout w: (N5) plus r's other gradient.
extern "C" __global__ void npgpt_res_ln_bwd_rows(const T* dres, const T* dout, const T* r, const T* w,
                                                 const A* mean, const A* rstd, T* dinp, int N, int C, int has_w) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= N) return;
    const long long off = row * C;
    const A mu = mean[row], rs = rstd[row];
    A sg = 0, sgx = 0;
    for (int c = lane; c < C; c += 32) {
        const A g = to_acc(dout[off + c]) * (has_w ? to_acc(w[c]) : (A)1);
        sg += g;
        sgx += g * (to_acc(r[off + c]) - mu) * rs;
    }
    const A mg = warp_sum(sg) / (A)C, mgx = warp_sum(sgx) / (A)C;
    for (int c = lane; c < C; c += 32) {
        const A g = to_acc(dout[off + c]) * (has_w ? to_acc(w[c]) : (A)1);
        put(dinp + off + c, (g - mg - (to_acc(r[off + c]) - mu) * rs * mgx) * rs + to_acc(dres[off + c]));
    }
}
""")


def residual_layer_norm_forward_cuda(x, delta, weight, bias, eps):
    """r = x + delta and (N1)-(N4) of r on CuPy, one pass: x, delta (N, C) -> (r, y (N, C) of x's dtype,
    mean, rstd (N,) in ``acc_dtype``)."""
    xp = get_array_module(x)
    N, C = x.shape
    acc = _cuda.acc_dtype(x.dtype)
    x, delta = contiguous(xp, x), contiguous(xp, delta, x.dtype)
    w = x if weight is None else contiguous(xp, weight, x.dtype)
    b = x if bias is None else contiguous(xp, bias, x.dtype)
    r, y = _cuda.empty(xp, (N, C), x.dtype), _cuda.empty(xp, (N, C), x.dtype)
    mean, rstd = _cuda.empty(xp, (N,), acc), _cuda.empty(xp, (N,), acc)
    if N and C:
        _cuda.raw_kernel(xp, "npgpt_res_ln_fwd", x.dtype, _CUDA_SOURCE)(
            (cdiv(N, ROW_BLOCK // 32),), (ROW_BLOCK,),
            (x, delta, w, b, r, y, mean, rstd, i32(N), i32(C), acc.type(eps),
             np.int32(weight is not None), np.int32(bias is not None)))
    return r, y, mean, rstd


def residual_layer_norm_backward_cuda(dres, dout, r, weight, mean, rstd):
    """dres + (N5) on CuPy, one pass: dres, dout, r (N, C) -> dinp (N, C) of r's dtype."""
    xp = get_array_module(r)
    N, C = r.shape
    dres, dout = contiguous(xp, dres, r.dtype), contiguous(xp, dout, r.dtype)
    w = r if weight is None else contiguous(xp, weight, r.dtype)
    dinp = _cuda.empty(xp, (N, C), r.dtype)
    if N and C:
        _cuda.raw_kernel(xp, "npgpt_res_ln_bwd_rows", r.dtype, _CUDA_SOURCE)(
            (cdiv(N, ROW_BLOCK // 32),), (ROW_BLOCK,),
            (dres, dout, r, w, mean, rstd, dinp, i32(N), i32(C), np.int32(weight is not None)))
    return dinp


# ---- the graph node: CUDA kernels or the plain add and layer norm -------------------------------

def residual_layer_norm(x, delta, weight=None, bias=None, eps=1e-5):
    """(r, LN(r)) with r = x + delta: x, delta (..., C) Tensors -> two (..., C) Tensors. On CuPy with
    the kernels on, one fused forward kernel; in the backward, when r's other gradient has already
    arrived (the next residual add's, which the reverse order delivers first), the layer norm's
    gradient is added to it in the same pass. Elsewhere the plain add and ``layer_norm``."""
    xp = get_array_module(x.data)
    C = x.shape[-1]
    X, D = x.data.reshape(-1, C), delta.data.reshape(-1, C)
    w, b = (t.data if t is not None else None for t in (weight, bias))
    if not (_cuda.use_cuda_kernels(xp, X, D, *(a for a in (w, b) if a is not None)) and x.shape == delta.shape):
        residual = x + delta
        return residual, layer_norm(residual, weight, bias, eps)
    R, Y, mean, rstd = residual_layer_norm_forward_cuda(X, D, w, b, eps)

    def residual_backward(g):                                # r = x + delta: both get r's gradient
        x._accumulate(g)
        delta._accumulate(g)
    residual = Tensor.from_op(R.reshape(x.shape), (x, delta), residual_backward, "add")

    def backward(dout):
        dout = dout.reshape(-1, C)
        if residual.grad is not None:                        # fused: dres + (N5) in one pass
            residual.grad = residual_layer_norm_backward_cuda(residual.grad.reshape(-1, C), dout, R, w, mean,
                                                              rstd).reshape(x.shape)
            residual._grad_owned = True
        else:
            dinp, _, _ = layer_norm_backward_cuda(dout, R, w, mean, rstd, True, False)
            residual._accumulate(dinp.reshape(x.shape), owned=True)
        if (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad):
            _, dweight, dbias = layer_norm_backward_cuda(dout, R, w, mean, rstd, False, True)
            if weight is not None and weight.requires_grad:
                weight._accumulate(dweight.astype(weight.dtype, copy=False), owned=True)
            if bias is not None and bias.requires_grad:
                bias._accumulate(dbias.astype(bias.dtype, copy=False), owned=True)
    parents = tuple(t for t in (residual, weight, bias) if t is not None)
    return residual, Tensor.from_op(Y.reshape(x.shape), parents, backward, "layer_norm")
