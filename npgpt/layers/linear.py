"""Linear (affine) layer as one graph node: y = x W + b (GPT-2's Conv1D layout, W is (Cin, Cout)).

Forward, with x flattened to X (N, Cin), N = the product of the leading axes:

    (L1)  Y = X W + b                   Y (N, Cout), W (Cin, Cout), b (Cout,)

Backward. y_nk = sum_i X_ni W_ik + b_k, so dy_nk/dX_ni = W_ik, dy_nk/dW_ik = X_ni, dy_nk/db_k = 1,
and with dY = dL/dY (N, Cout):

    (L2)  dinp    = dY W^T              (N, Cin)
    (L3)  dweight = X^T dY              (Cin, Cout)
    (L4)  dbias   = sum_n dY[n]         (Cout,)

All three are single GEMMs / one reduction: flattening the leading axes turns a stack of
products into one 2-D GEMM (one BLAS call instead of one per matrix). There is no CUDA kernel:
on NumPy the arrays' own ``@``, on CuPy ``backend.bmm``'s cuBLAS call with the transposes as flags
(no copies; the one GEMM call a CUDA graph can record, ``npgpt/cuda_graphs.py``).
"""
import numpy as np

from .. import backend
from ..backend import bmm
from ..engine import Tensor
from . import _cuda

__all__ = ["linear", "linear_reference"]


# ---- reference: (L1) composed from engine primitives --------------------------------------------

def linear_reference(x, weight, bias=None):
    """(L1) with the engine's ``@`` and ``+``; autograd supplies (L2)-(L4). The oracle for ``linear``."""
    y = x @ weight
    return y if bias is None else y + bias


# ---- NumPy (and CuPy) forward and backward ------------------------------------------------------

def _mm(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b) for 2-D a, b (op: transpose when asked). On CuPy a column-major operand (a
    transposed view such as the tied head's wte.T) is handed to cuBLAS as its transpose plus a flag."""
    if isinstance(a, np.ndarray):
        return (a.T if trans_a else a) @ (b.T if trans_b else b)
    if a.flags.f_contiguous and not a.flags.c_contiguous:
        a, trans_a = a.T, not trans_a
    if b.flags.f_contiguous and not b.flags.c_contiguous:
        b, trans_b = b.T, not trans_b
    return bmm(a, b, trans_a, trans_b)


def linear_forward(X, W, b=None):
    """(L1): X (N, Cin), W (Cin, Cout), b (Cout,) or None -> Y (N, Cout)."""
    out = _mm(X, W)                                         # (N, Cout)
    if b is not None:
        if _cuda.vectorized_applies("elementwise_vectorized", out.shape[1], out, b):
            bias_add_(out, b)
        else:
            out += b                                        # Y = X W + b, in place (no temporary)
    return out


# "+ b" of (L1) on CuPy with 16-byte loads and stores: a grid-stride loop over the N Cout / VEC vectors of
# Y; element e is column e % Cout, and Cout % VEC == 0 keeps a vector in one row. CuPy's broadcast add
# moves one element per thread (RESULTS.md, "GPU kernels measured on the H200").
BIAS_ADD_SOURCE = _cuda.register_source("raw", "bias_add_vectorized", r"""
extern "C" __global__ void npgpt_bias_add_vec(T* y, const T* b, long long n_vec, int C) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_vec;
         i += (long long)gridDim.x * blockDim.x) {
        const long long e = i * VEC;
        Vec yv = load_vec(y + e);
        const Vec bv = load_vec(b + (int)(e % C));
#pragma unroll
        for (int k = 0; k < VEC; k++) put(&yv.v[k], to_acc(yv.v[k]) + to_acc(bv.v[k]));
        store_vec(y + e, yv);
    }
}
""")


def bias_add_(y, b):
    """y (N, C) += b (C,) in place with the ``_vec`` kernel (``_cuda.vectorized_applies`` must hold)."""
    N, C = y.shape
    n_vec = N * C // _cuda.vector_width(y.dtype)
    if n_vec:
        _cuda.raw_kernel(backend.get_array_module(y), "npgpt_bias_add_vec", y.dtype, BIAS_ADD_SOURCE)(
            *_cuda.grid_stride(n_vec), (y, b, np.int64(n_vec), _cuda.i32(C)))
    return y


def linear_backward(dout, X, W, need_dinp=True, need_dweight=True, need_dbias=True):
    """(L2)-(L4): dout (N, Cout), X (N, Cin), W (Cin, Cout) -> (dinp, dweight, dbias), None where
    not needed. float16 bias gradients are summed in float32 and rounded once."""
    dinp = _mm(dout, W, trans_b=True) if need_dinp else None        # (N, Cin)
    dweight = _mm(X, dout, trans_a=True) if need_dweight else None  # (Cin, Cout)
    dbias = None
    if need_dbias:
        dbias = column_sums(dout)                           # (Cout,)
    return dinp, dweight, dbias


_ONES = {}       # (N, dtype, device) -> ones (1, N) on the GPU, for column_sums


def column_sums(dout):
    """(L4) sum over the rows of dout (N, Cout) -> (Cout,) of dout's dtype; float16 summed in float32
    and rounded once. On CuPy it is one GEMM, ones (1, N) @ dout (cuBLAS, float32 accumulation):
    CuPy's own axis-0 reduction took 0.37 ms per call at GPT-2 124M's (16384, 3072), 18 ms of a
    step (RESULTS.md, "GPU kernels measured on the H200"). float32 under TF32 keeps the reduction (TF32 would
    round every term)."""
    if isinstance(dout, np.ndarray) or dout.dtype not in (np.float16, np.float32) or \
            (dout.dtype == np.float32 and backend.tf32_enabled()):
        acc = np.float32 if dout.dtype == np.float16 else None
        return dout.sum(axis=0, dtype=acc).astype(dout.dtype, copy=False)
    N = dout.shape[0]
    key = (N, dout.dtype.str, dout.device.id)
    ones = _ONES.get(key)
    if ones is None:
        xp = backend.get_array_module(dout)
        ones = xp.ones((1, N), dout.dtype)
        if not backend.is_capturing():   # while a graph records, the fill only runs at replay: no memo
            _ONES[key] = ones
    return bmm(ones, dout).reshape(-1)


# ---- the graph node -----------------------------------------------------------------------------

def linear(x, weight, bias=None):
    """y = x W + b.  x (..., Cin) Tensor, weight (Cin, Cout), bias (Cout,) or None -> (..., Cout)."""
    Cin, Cout = weight.shape
    X, W = x.data.reshape(-1, Cin), weight.data             # (N, Cin), (Cin, Cout)
    out = linear_forward(X, W, None if bias is None else bias.data)

    def backward(dout):
        has_bias = bias is not None and bias.requires_grad
        dinp, dweight, dbias = linear_backward(dout.reshape(-1, Cout), X, W, x.requires_grad,
                                               weight.requires_grad, has_bias)
        if dinp is not None:
            x._accumulate(dinp.reshape(x.shape))            # (..., Cin)
        if dweight is not None:
            weight._accumulate(dweight, owned=True)         # (Cin, Cout)
        if dbias is not None:
            bias._accumulate(dbias, owned=True)             # (Cout,)
    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor.from_op(out.reshape(x.shape[:-1] + (Cout,)), parents, backward, "linear")
