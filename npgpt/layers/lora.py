"""A linear layer with a low-rank adapter (LoRA; Hu et al. 2021), as one graph node.

Forward, with x flattened to X (N, Cin), a frozen W (Cin, Cout) and b (Cout,), the trainable
A (Cin, r) and B (r, Cout), s = alpha / r, and M an inverted-dropout mask on the adapter's input
(1/(1-p) or 0 per element; all ones without dropout):

    (R1)  Xd = X ⊙ M,   H = Xd A                            (N, r)
    (R2)  Y = X W + b + s H B                               (N, Cout)

Backward. Y is linear in each of W, b, B and H, and H is linear in A and Xd, so with dY (N, Cout)

    (R3)  dweight = X^T dY,            dbias = sum_n dY[n]
    (R4)  dB = s H^T dY                                      (r, Cout)
    (R5)  dH = s dY B^T                                      (N, r)
    (R6)  dA = Xd^T dH                                       (Cin, r)
    (R7)  dinp = dY W^T + (dH A^T) ⊙ M                       (N, Cin)

(the mask passes the gradient where it passed the input). The low-rank path costs two thin GEMMs
each way (N x Cin x r, N x r x Cout) next to the base layer's N x Cin x Cout. The modules, merging
and adapter files are in ``npgpt/lora.py``.
"""
from .. import backend
from ..engine import Tensor
from .linear import column_sums

__all__ = ["lora_linear", "lora_linear_reference"]


def lora_linear_reference(x, weight, bias, A, B, scale):
    """(R2) without dropout from engine ops; autograd supplies (R3)-(R7). The oracle for ``lora_linear``."""
    y = x @ weight + (x @ A) @ B * scale
    return y if bias is None else y + bias


def lora_linear(x, weight, bias, A, B, scale, dropout_p=0.0):
    """(R1)-(R2) in one node: x (..., Cin) Tensor, weight (Cin, Cout), bias (Cout,) or None,
    A (Cin, r), B (r, Cout) -> (..., Cout); its backward is (R3)-(R7). ``scale`` = alpha / r; the
    dropout mask M of (R1) is drawn here when dropout_p > 0 (all ones otherwise)."""
    W, Ad, Bd = weight.data, A.data, B.data
    Cin, Cout = W.shape
    X = x.data.reshape(-1, Cin)                               # (N, Cin)
    if dropout_p > 0.0:
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout_p}")
        keep = backend.rng().random(X.shape, dtype=X.dtype) >= dropout_p
        mask = keep * X.dtype.type(1.0 / (1.0 - dropout_p))   # (N, Cin)
        Xd = X * mask
    else:
        mask, Xd = None, X
    H = Xd @ Ad                                               # (N, r)
    Hs = H * X.dtype.type(scale)                              # s H (N, r)
    out = X @ W                                               # (N, Cout)
    out += Hs @ Bd
    if bias is not None:
        out += bias.data

    def backward(dout):
        dY = dout.reshape(-1, Cout)                           # (N, Cout)
        if weight.requires_grad:
            weight._accumulate(X.T @ dY)                      # (Cin, Cout)
        if bias is not None and bias.requires_grad:
            bias._accumulate(column_sums(dY))                 # (Cout,) as linear's (L4)
        if B.requires_grad:
            B._accumulate(Hs.T @ dY)                          # (r, Cout)
        if not (A.requires_grad or x.requires_grad):
            return
        dH = dY @ Bd.T                                        # (N, r)
        dH *= X.dtype.type(scale)
        if A.requires_grad:
            A._accumulate(Xd.T @ dH)                          # (Cin, r)
        if x.requires_grad:
            dXd = dH @ Ad.T                                   # (N, Cin)
            if mask is not None:
                dXd *= mask
            dX = dY @ W.T
            dX += dXd
            x._accumulate(dX.reshape(x.shape))                # (..., Cin)
    parents = tuple(t for t in (x, weight, bias, A, B) if t is not None)
    return Tensor.from_op(out.reshape(x.shape[:-1] + (Cout,)), parents, backward, "lora_linear")
