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
cuBLAS runs (L1)-(L3) through the arrays' own ``@``.
"""
import numpy as np

from ..engine import Tensor

__all__ = ["linear", "linear_reference"]


# ---- reference: (L1) composed from engine primitives --------------------------------------------

def linear_reference(x, weight, bias=None):
    """(L1) with the engine's ``@`` and ``+``; autograd supplies (L2)-(L4). The oracle for ``linear``."""
    y = x @ weight
    return y if bias is None else y + bias


# ---- NumPy (and CuPy) forward and backward ------------------------------------------------------

def linear_forward(X, W, b=None):
    """(L1): X (N, Cin), W (Cin, Cout), b (Cout,) or None -> Y (N, Cout)."""
    out = X @ W                                             # (N, Cout)
    if b is not None:
        out += b                                            # Y = X W + b, in place (no temporary)
    return out


def linear_backward(dout, X, W, need_dinp=True, need_dweight=True, need_dbias=True):
    """(L2)-(L4): dout (N, Cout), X (N, Cin), W (Cin, Cout) -> (dinp, dweight, dbias), None where
    not needed. float16 bias gradients are summed in float32 and rounded once."""
    dinp = dout @ W.T if need_dinp else None                # (N, Cin)
    dweight = X.T @ dout if need_dweight else None          # (Cin, Cout)
    dbias = None
    if need_dbias:
        acc = np.float32 if dout.dtype == np.float16 else None
        dbias = dout.sum(axis=0, dtype=acc).astype(dout.dtype, copy=False)  # (Cout,)
    return dinp, dweight, dbias


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
