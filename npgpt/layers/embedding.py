"""Embedding lookup as one graph node: rows of a table, out[n] = W[ids[n]].

Forward, ids of any integer shape S (N positions in all), W (V, C):

    (E1)  out[n] = W[ids[n]]                              out S + (C,)

Backward. out[n] is linear in W with d out[n] / d W[v] = [ids[n] == v], so

    (E2)  dweight[v] = sum of dout[n] over the positions n with ids[n] == v      (V, C)

a scatter-add in which repeated ids accumulate. The same sum written as a product with the one-hot
matrix O (V, N), O[v, n] = [ids[n] == v]:

    (E3)  dweight = O dout                                (V, N) @ (N, C)

NumPy computes (E2) by sorting the ids and summing each run of equal ids with one
``np.add.reduceat``, or (E3) as one GEMM while V is small (``embedding_one_hot_max_vocab`` in
``layers/tuning.py``; ``np.add.at`` is slower than both: RESULTS.md, "Tuning constants").
CuPy uses its atomic scatter-add (``backend.scatter_add``), in float32 for float16 gradients.
The ids get no gradient.
"""
import numpy as np

from .. import backend
from ..backend import get_array_module
from ..engine import Tensor
from .tuning import tuned

__all__ = ["embedding", "embedding_reference"]


# ---- reference: (E1) composed from engine primitives --------------------------------------------

def embedding_reference(ids, weight):
    """(E1) as the engine's integer-array indexing; autograd supplies (E2). The oracle for ``embedding``."""
    return weight[ids]


# ---- NumPy backward: (E2) and (E3) --------------------------------------------------------------

def embedding_backward_one_hot(ids, dout, V):
    """(E3): dweight = onehot(ids)^T dout as one GEMM (V, N) @ (N, C): cheap while V is small."""
    onehot = np.zeros((V, ids.shape[0]), dout.dtype)        # (V, N)
    onehot[ids, np.arange(ids.shape[0])] = 1
    return onehot @ dout                                    # (V, C)


def embedding_backward_sorted(ids, dout, V):
    """(E2) by sorting: each run of equal ids is summed by one ``np.add.reduceat`` over the sorted
    rows of dout. ids (N,), dout (N, C) -> dweight (V, C)."""
    order = np.argsort(ids, kind="stable")                  # (N,)
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))  # run starts
    dweight = np.zeros((V, dout.shape[1]), dout.dtype)      # (V, C)
    dweight[sorted_ids[starts]] = np.add.reduceat(dout.take(order, axis=0), starts, axis=0)
    return dweight


def embedding_backward(ids, dout, V):
    """dweight (V, C) of (E2).  ids (N,), dout (N, C)."""
    xp = get_array_module(dout)
    if xp is not np:   # atomic adds, accumulated in float32 for float16 gradients
        acc = dout if dout.dtype.itemsize >= 4 else dout.astype(np.float32)
        dweight = backend.scatter_add(xp.zeros((V, dout.shape[1]), acc.dtype), ids, acc)
        return dweight if acc is dout else dweight.astype(dout.dtype)
    if V <= tuned(np, "embedding_one_hot_max_vocab"):
        return embedding_backward_one_hot(ids, dout, V)
    return embedding_backward_sorted(ids, dout, V)


# ---- the graph node -----------------------------------------------------------------------------

def embedding(ids, weight):
    """Rows of a table.  ids: integers of any shape S (array or Tensor), weight (V, C) Tensor -> S + (C,)."""
    ids = backend.to_device(ids.data if isinstance(ids, Tensor) else ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding ids must be integers, got dtype {ids.dtype}")
    out = weight.data[ids]                                  # (*S, C)

    def backward(dout):
        V, C = weight.shape
        dweight = embedding_backward(ids.reshape(-1), dout.reshape(-1, C), V)  # (V, C)
        weight._accumulate(dweight, owned=True)
    return Tensor.from_op(out, (weight,), backward, "embedding")
