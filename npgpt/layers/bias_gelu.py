"""Bias + GELU as one pass: ``GELU(h + b)`` for the MLP's first projection h = x W (without its bias).

Per element of h (N, C), with the bias b (C,) broadcast over the rows and (G1)-(G4) of ``gelu.py``:

    (BG1)  v = h + b                                     kept in the accumulation type, not rounded
    (BG2)  y = GELU(v)                                   (G1)-(G2)
    (BG3)  dh = dout * GELU'(v)                          (G3)-(G4), u recomputed from h and b
    (BG4)  dbias = sum over rows of dh                   (C,)

One kernel each way instead of the bias add (read h, write h + b) and GELU (read it back, write y).
Unlike the unfused path, h + b is not rounded to the storage dtype in between (float16: the results
differ by that rounding). There is no NumPy twin: on NumPy (or with the kernels off) ``bias_gelu``
is the plain add and ``gelu``. The MLP calls it on CuPy while ``TUNING["cupy"]["fused_bias_gelu"]`` is on
(the default: with the 16-byte-load kernels of ``gelu.py`` the fp16 GPT-2 124M step took 54.7 ms on an
H200, against 55.0 ms unfused; benchmarks/RESULTS.md, "GPU kernels measured on the H200").
"""
import numpy as np

from ..backend import get_array_module
from ..engine import Tensor
from . import _cuda
from .gelu import gelu, gelu_backward_vec, gelu_forward_vec, gelu_kernel_body, gelu_reference
from .linear import column_sums

__all__ = ["bias_gelu", "bias_gelu_reference"]


# ---- reference: (BG1)-(BG2) composed from engine primitives -------------------------------------

def bias_gelu_reference(h, bias):
    """(BG1)-(BG2) from engine ops (autograd supplies (BG3)-(BG4)). The tests' oracle."""
    return gelu_reference(h + bias)


# ---- CUDA: two ElementwiseKernels, gelu.py's bodies with v = h + b --------------------------------

_BIAS_PARAMS = {"forward": ("T x, T b", "T y"), "backward": ("T x, T b, T dout", "T dinp")}


def _bias_body(which, acc):
    body = gelu_kernel_body(which, acc)                     # gelu.py's, with v = h + b (BG1)
    assert f"{acc} v = ({acc})x;" in body
    return body.replace(f"{acc} v = ({acc})x;", f"{acc} v = ({acc})x + ({acc})b;")


for _which in _BIAS_PARAMS:
    for _acc in ("float", "double"):
        _cuda.register_source("elementwise", f"npgpt_bias_gelu_{_which}_{_acc}", _bias_body(_which, _acc),
                              in_params=_BIAS_PARAMS[_which][0], out_params=_BIAS_PARAMS[_which][1],
                              dtypes=("float64",) if _acc == "double" else ("float16", "float32"))


def _bias_gelu_kernel(xp, which, dtype):
    acc = "double" if np.dtype(dtype) == np.float64 else "float"
    return _cuda.elementwise_kernel(xp, f"npgpt_bias_gelu_{which}_{acc}", *_BIAS_PARAMS[which],
                                    _bias_body(which, acc), acc)


def bias_gelu_forward_cuda(h, b):
    """(BG1)-(BG2) on CuPy: h (N, C), b (C,) -> y (N, C) of h's dtype."""
    xp = get_array_module(h)
    b = b.astype(h.dtype, copy=False)
    if _cuda.vectorized_applies("elementwise_vectorized", h.shape[1], h, b):
        return gelu_forward_vec(h, b)
    y = _cuda.empty(xp, h.shape, h.dtype)
    _bias_gelu_kernel(xp, "forward", h.dtype)(h, b, y)
    return y


def bias_gelu_backward_cuda(h, b, dout):
    """(BG3)-(BG4) on CuPy: -> (dh (N, C) of h's dtype, db (C,) of h's dtype, summed in float32 for
    float16 and rounded once: ``linear.column_sums``)."""
    xp = get_array_module(h)
    b, dout = b.astype(h.dtype, copy=False), dout.astype(h.dtype, copy=False)
    if _cuda.vectorized_applies("elementwise_vectorized", h.shape[1], h, b, dout):
        dh = gelu_backward_vec(h, dout, b)
    else:
        dh = _cuda.empty(xp, h.shape, h.dtype)
        _bias_gelu_kernel(xp, "backward", h.dtype)(h, b, dout, dh)
    return dh, column_sums(dh)


# ---- the graph node: the CUDA kernels or the plain add and gelu --------------------------------

def bias_gelu(h, bias):
    """GELU(h + bias) as one node: h (..., C), bias (C,) Tensors -> (..., C). On CuPy with the kernels
    on, one fused kernel each way; elsewhere the plain add and ``gelu`` (the NumPy path unchanged)."""
    xp = get_array_module(h.data)
    C = h.shape[-1]
    H = xp.ascontiguousarray(h.data).reshape(-1, C)
    if not (_cuda.use_cuda_kernels(xp, H, bias.data) and bias.shape == (C,)):
        return gelu(h + bias)

    def backward(dout):
        dh, db = bias_gelu_backward_cuda(H, bias.data, dout.reshape(-1, C))
        if h.requires_grad:
            h._accumulate(dh.reshape(h.shape), owned=True)
        if bias.requires_grad:
            bias._accumulate(db.astype(bias.dtype), owned=True)
    return Tensor.from_op(bias_gelu_forward_cuda(H, bias.data).reshape(h.shape), (h, bias), backward, "gelu")
