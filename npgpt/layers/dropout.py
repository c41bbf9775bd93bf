"""Inverted dropout (Srivastava et al. 2014) as one graph node.

Forward: keep each element with probability 1 - p and scale the kept ones by 1/(1 - p),

    (D1)  y = x * mask,   mask = keep / (1 - p),   keep ~ Bernoulli(1 - p)

so E[y] = x and evaluation needs no rescaling. Backward, with the same mask:

    (D2)  dinp = dout * mask

Shapes: x (...) -> y (...). The mask comes from ``backend.rng()`` in x's dtype.
"""
import numpy as np

from .. import backend
from ..engine import Tensor

__all__ = ["dropout"]


def dropout(x, p, training=True):
    """(D1) on Tensor x (...) -> (...); its backward is (D2). Returns ``x`` itself (no new node)
    when p == 0 or not training."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    draw_dtype = x.dtype if x.dtype.itemsize >= 4 else np.float32  # the Generator draws float32/64
    mask = backend.rng().random(x.shape, dtype=draw_dtype) >= p     # (...) keep
    mask = mask * x.dtype.type(1.0 / (1.0 - p))             # (...) keep / (1 - p), x's dtype

    def backward(dout):
        x._accumulate(dout * mask)                          # dinp = dout * mask          (D2)
    return Tensor.from_op(x.data * mask, (x,), backward, "dropout")
