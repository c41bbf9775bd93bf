"""GELU, tanh approximation (Hendrycks & Gimpel 2016), as in GPT-2, as one graph node.

Forward, elementwise, with a = sqrt(2/π) and b = 0.044715:

    (G1)  u = a (x + b x^3) = x (a + ab x^2)
    (G2)  y = x/2 (1 + tanh u)

Backward. dy/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) du/dx with du/dx = a (1 + 3b x^2).
Writing s = 1 + tanh u (kept from the forward on NumPy), 1 - tanh^2 u = (2 - s) s, so

    (G3)  dy/dx = s (1/2 + x/2 (a + 3ab x^2) (2 - s))
    (G4)  dinp  = dout * dy/dx

Shapes: x (...) -> y (...), dinp like x. float16 input is computed in float32 and the output and
gradient cast back.

The CUDA twin recomputes s from x in the backward instead of reading a saved s: GELU is
memory-bound, and recomputing the tanh moves 3 arrays per element (x, dout -> dinp) where saving s
would move 4 (x, s, dout -> dinp) plus 1 more in the forward and an x-sized buffer held in between.
"""
import math

import numpy as np

from ..backend import get_array_module
from ..engine import Tensor
from . import _cuda
from ._threads import run_chunked

__all__ = ["gelu", "gelu_reference", "GELU_A", "GELU_B"]

GELU_A = math.sqrt(2.0 / math.pi)  # Python floats: a NumPy float64 scalar would upcast float32
GELU_B = 0.044715


# ---- reference: (G1)-(G2) composed from engine primitives ---------------------------------------

def gelu_reference(x):
    """(G1)-(G2) from engine ops; autograd supplies (G3)-(G4). The oracle for ``gelu``."""
    from .. import ops
    return 0.5 * x * (1.0 + ops.tanh(GELU_A * (x + GELU_B * x ** 3)))


# ---- NumPy forward and backward, in place over the thread pool ----------------------------------
# In place (out=) with one temporary and split over threads: RESULTS.md, "Tuning constants" (the
# plain expressions are in the comments; every element is computed exactly as without threads).
# s = 1 + tanh u is computed as 2 / (1 + exp(-2u)) (the same number: 1 + tanh u = 2 sigmoid(2u), with
# no cancellation at either end): NumPy's float32 exp is SIMD and about twice as fast as its tanh.

def _gelu_forward_block(X, out, s):
    xp = get_array_module(X)
    xp.multiply(X, X, out=s)
    s *= -2.0 * GELU_A * GELU_B
    s -= 2.0 * GELU_A
    s *= X                                                  # -2u, u = x (a + ab x^2)     (G1)
    with np.errstate(over="ignore"):                        # exp(-2u) = inf: y = 0 and s = 0, as they should
        xp.exp(s, out=s)
    s += 1.0                                                # 1 + exp(-2u)
    xp.divide(X, s, out=out)                                # y = x s / 2 = x / (1 + exp(-2u))  (G2)
    xp.divide(2.0, s, out=s)                                # s = 1 + tanh u = 2 / (1 + exp(-2u))


def _gelu_backward_block(X, s, dout, dinp):
    xp = get_array_module(X)
    two_minus_s = xp.subtract(2.0, s)                       # 2 - s = 1 - tanh u
    xp.multiply(X, X, out=dinp)
    dinp *= 1.5 * GELU_A * GELU_B
    dinp += 0.5 * GELU_A
    dinp *= X                                               # x/2 (a + 3ab x^2)
    dinp *= two_minus_s
    dinp += 0.5
    dinp *= s                                               # dy/dx                       (G3)
    dinp *= dout                                            # dinp = dout dy/dx           (G4)


def gelu_forward(X):
    """(G1)-(G2): X (...) -> (y, s) with s = 1 + tanh u kept for the backward (float32 for float16 X)."""
    xp = get_array_module(X)
    if X.dtype == np.float16:
        X = X.astype(np.float32)                            # (...) computed in float32
    out = xp.empty_like(X)                                  # (...) y
    s = xp.empty_like(X)                                    # (...) 1 + tanh u
    run_chunked(_gelu_forward_block, X.reshape(-1), out.reshape(-1), s.reshape(-1))
    return out, s


def gelu_backward(dout, X, s):
    """(G3)-(G4): dout, X (...) and s from the forward -> dinp (...) in s's dtype."""
    xp = get_array_module(X)
    X = X.astype(s.dtype, copy=False)
    dinp = xp.empty_like(X)                                 # (...)
    flat = (a.reshape(-1) for a in (X, s, xp.ascontiguousarray(dout, dtype=X.dtype), dinp))
    run_chunked(_gelu_backward_block, *flat)
    return dinp


# ---- CUDA: two ElementwiseKernels (ACC = the accumulation type) ---------------------------------

_FORWARD_BODY = """
ACC v = (ACC)x;
ACC s = (ACC)1 + TANH(v * ((ACC)%(a)r + (ACC)%(ab)r * v * v));
y = (T)((ACC)0.5 * v * s);
"""
_BACKWARD_BODY = """
ACC v = (ACC)x;
ACC s = (ACC)1 + TANH(v * ((ACC)%(a)r + (ACC)%(ab)r * v * v));
ACC g = s * ((ACC)0.5 + v * ((ACC)%(ha)r + (ACC)%(h3ab)r * v * v) * ((ACC)2 - s));
dinp = (T)(g * (ACC)dout);
"""
_CONSTANTS = {"a": GELU_A, "ab": GELU_A * GELU_B, "ha": 0.5 * GELU_A, "h3ab": 1.5 * GELU_A * GELU_B}
_PARAMS = {"forward": ("T x", "T y"), "backward": ("T x, T dout", "T dinp")}


def gelu_kernel_body(which, acc):
    """The ElementwiseKernel body of "forward" or "backward" with ACC = ``acc`` (also ``bias_gelu.py``'s)."""
    body = ((_FORWARD_BODY if which == "forward" else _BACKWARD_BODY) % _CONSTANTS).replace("ACC", acc)
    return body.replace("TANH", "tanh" if acc == "double" else "tanhf")


for _which in _PARAMS:
    for _acc in ("float", "double"):
        _cuda.register_source("elementwise", f"npgpt_gelu_{_which}_{_acc}", gelu_kernel_body(_which, _acc),
                              in_params=_PARAMS[_which][0], out_params=_PARAMS[_which][1],
                              dtypes=("float64",) if _acc == "double" else ("float16", "float32"))


def _gelu_kernel(xp, which, dtype):
    acc = "double" if np.dtype(dtype) == np.float64 else "float"
    return _cuda.elementwise_kernel(xp, f"npgpt_gelu_{which}_{acc}", *_PARAMS[which], gelu_kernel_body(which, acc), acc)


# The same (G1)-(G4) with 16-byte loads and stores (VEC elements of a row-major (N, C) array per
# instruction, a grid-stride loop over its N C / VEC vectors), optionally with a bias b (C,) added
# first and kept unrounded (bias_gelu.py's (BG1)-(BG3)). Element e is column e % C; C % VEC == 0 keeps a
# vector in one row. CuPy's one-element-per-thread kernel above moved float16 at ~0.8 TB/s on an H200
# (0.24 ms per (16384, 3072) call, PyTorch's vectorized one 0.10 ms: RESULTS.md, "GPU kernels measured
# on the H200"); used where ``TUNING["cupy"]["elementwise_vectorized"]`` and ``_cuda.vectorized_applies`` allow.
GELU_VEC_SOURCE = _cuda.register_source("raw", "gelu_vectorized", r"""
__device__ __forceinline__ float th(float v) { return tanhf(v); }
__device__ __forceinline__ double th(double v) { return tanh(v); }
__device__ __forceinline__ A gelu_s(A v) { return (A)1 + th(v * ((A)%(a)r + (A)%(ab)r * v * v)); }   // (G1)

extern "C" __global__ void npgpt_gelu_fwd_vec(const T* x, const T* b, T* y, long long n_vec, int C, int has_b) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_vec;
         i += (long long)gridDim.x * blockDim.x) {
        const long long e = i * VEC;
        const Vec xv = load_vec(x + e), bv = load_vec(has_b ? b + (int)(e %% C) : x + e);
        Vec out;
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            const A v = to_acc(xv.v[k]) + (has_b ? to_acc(bv.v[k]) : (A)0);
            put(&out.v[k], (A)0.5 * v * gelu_s(v));                                        // (G2)
        }
        store_vec(y + e, out);
    }
}

extern "C" __global__ void npgpt_gelu_bwd_vec(const T* x, const T* b, const T* dout, T* dinp, long long n_vec,
                                              int C, int has_b) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_vec;
         i += (long long)gridDim.x * blockDim.x) {
        const long long e = i * VEC;
        const Vec xv = load_vec(x + e), dv = load_vec(dout + e), bv = load_vec(has_b ? b + (int)(e %% C) : x + e);
        Vec out;
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            const A v = to_acc(xv.v[k]) + (has_b ? to_acc(bv.v[k]) : (A)0);
            const A s = gelu_s(v);
            put(&out.v[k], s * ((A)0.5 + v * ((A)%(ha)r + (A)%(h3ab)r * v * v) * ((A)2 - s))   // (G3)
                           * to_acc(dv.v[k]));                                                 // (G4)
        }
        store_vec(dinp + e, out);
    }
}
""" % _CONSTANTS)


def _launch_vec(name, x, b, *inputs):
    """The ``_vec`` kernel ``name`` over x (N, C), b (C,) or None and the further (N, C) ``inputs``
    (the backward's dout), into a new (N, C) array of x's dtype: its arguments are (x, b or x,
    *inputs, out, N C / VEC, C, has_b)."""
    xp = get_array_module(x)
    N, C = x.shape
    out = _cuda.empty(xp, (N, C), x.dtype)
    n_vec = N * C // _cuda.vector_width(x.dtype)
    if n_vec:
        _cuda.raw_kernel(xp, name, x.dtype, GELU_VEC_SOURCE)(
            *_cuda.grid_stride(n_vec), (x, x if b is None else b, *inputs, out, np.int64(n_vec), _cuda.i32(C),
                                        np.int32(b is not None)))
    return out


def gelu_forward_vec(x, b=None):
    """GELU(x + b) or GELU(x) with the ``_vec`` kernel: x (N, C), b (C,) or None -> y (N, C) of x's
    dtype (``_cuda.vectorized_applies`` must hold for them)."""
    return _launch_vec("npgpt_gelu_fwd_vec", x, b)


def gelu_backward_vec(x, dout, b=None):
    """dout GELU'(x + b) (or of x) with the ``_vec`` kernel: x, dout (N, C), b (C,) or None -> dinp."""
    return _launch_vec("npgpt_gelu_bwd_vec", x, b, dout)


def _rows(x):
    """x (..., C) as (N, C) (a view of a contiguous array)."""
    return x.reshape(-1, x.shape[-1])


def gelu_forward_cuda(x):
    """(G1)-(G2) on CuPy: x (...) -> y (...) of x's dtype."""
    xp = get_array_module(x)
    if x.ndim and _cuda.vectorized_applies("elementwise_vectorized", x.shape[-1], x):
        return gelu_forward_vec(_rows(x)).reshape(x.shape)
    y = _cuda.empty(xp, x.shape, x.dtype)
    _gelu_kernel(xp, "forward", x.dtype)(x, y)
    return y


def gelu_backward_cuda(x, dout):
    """(G3)-(G4) on CuPy, s recomputed from x: x and dout (...) -> dinp (...) of x's dtype."""
    xp = get_array_module(x)
    dout = dout.astype(x.dtype, copy=False)
    if x.ndim and _cuda.vectorized_applies("elementwise_vectorized", x.shape[-1], x, dout):
        return gelu_backward_vec(_rows(x), _rows(dout)).reshape(x.shape)
    dinp = _cuda.empty(xp, x.shape, x.dtype)
    _gelu_kernel(xp, "backward", x.dtype)(x, dout, dinp)
    return dinp


# ---- the graph node: CUDA kernels or array code -------------------------------------------------

def gelu(x):
    """GELU of Tensor x (...) -> (...) of x's dtype, (G1)-(G2); its backward is (G3)-(G4)."""
    xp = get_array_module(x.data)
    X = xp.ascontiguousarray(x.data)
    if _cuda.use_cuda_kernels(xp, X):
        return Tensor.from_op(gelu_forward_cuda(X), (x,),
                              lambda dout: x._accumulate(gelu_backward_cuda(X, dout), owned=True), "gelu")
    out, s = gelu_forward(X)

    def backward(dout):
        x._accumulate(gelu_backward(dout, X, s).astype(x.dtype, copy=False))
    return Tensor.from_op(out.astype(x.dtype, copy=False), (x,), backward, "gelu")
