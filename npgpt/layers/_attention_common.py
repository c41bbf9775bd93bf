"""What both attention paths (``attention.py`` materialized, ``attention_chunked.py`` in query blocks)
share: the end-aligned causal mask (A9), the score dtype (the float16 policy) and the row dot product
of FlashAttention's rowsum trick (A7). The equations are in ``attention.py``'s docstring.

A module of its own so that ``attention.py`` (which dispatches to the chunked path) and
``attention_chunked.py`` both import it without importing each other in a circle.
"""
import numpy as np

from ..backend import get_array_module

__all__ = ["causal_bias", "score_dtype_of", "row_dot"]

_mask_cache = {}


def causal_bias(Tq, Tk, dtype, xp):
    """(A9) as an additive mask (Tq, Tk): 0 where key j <= i + Tk - Tq, -inf above that diagonal (cached)."""
    key = (Tq, Tk, np.dtype(dtype).str, xp.__name__)
    if key not in _mask_cache:
        above = np.triu(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)
        _mask_cache[key] = xp.asarray(np.where(above, -np.inf, 0.0).astype(dtype))
    return _mask_cache[key]


def score_dtype_of(dtype):
    """Scores, softmax and row statistics: float32 for float16 inputs, else the input dtype."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def row_dot(a, b):
    """sum over the last axis of a * b in the score dtype: (..., hs) x2 -> (...). With a = dy and
    b = y this is D of (A7)."""
    xp = get_array_module(a)
    if a.dtype == score_dtype_of(a.dtype) and xp is np:     # CuPy's einsum is a cuBLAS call, which a
        return xp.einsum("...i,...i->...", a, b)            # CUDA graph cannot record (cuda_graphs.py)
    prod = a.astype(score_dtype_of(a.dtype))                # a copy: float32 for float16
    prod *= b
    return prod.sum(axis=-1)
