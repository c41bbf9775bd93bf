"""The gradient checks ``npgpt gradcheck`` runs: every primitive op on random shapes.

Each entry gives the op as a function of Tensors and a maker of random float64 inputs. Inputs of
ops whose derivative has a kink (abs, relu, max) are kept away from it, and log/sqrt/pow get
positive inputs, so the central differences are meaningful.
"""
import numpy as np

from . import ops
from .gradcheck import register_check


def _away_from_zero(rng, shape):
    """Values with |x| in [0.2, 1.5): no kink of relu/abs within eps."""
    return rng.uniform(0.2, 1.5, shape) * rng.choice([-1.0, 1.0], shape)


def _distinct(rng, shape):
    """Values whose maxima are unique: a random permutation, spread out."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) * 0.1 + rng.uniform(-0.01, 0.01, shape))


register_check("add", lambda a, b: a + b, lambda r: [r.normal(size=(3, 1, 4)), r.normal(size=(5, 1))])
register_check("sub", lambda a, b: a - b, lambda r: [r.normal(size=(2, 3)), r.normal(size=(3,))])
register_check("mul", lambda a, b: a * b, lambda r: [r.normal(size=(4, 1)), r.normal(size=(2, 1, 3))])
register_check("div", lambda a, b: a / b, lambda r: [r.normal(size=(3, 4)), r.uniform(0.5, 2, (4,))])
register_check("pow (scalar exponent)", lambda a: a ** 3, lambda r: [r.normal(size=(3, 4))])
register_check("pow (tensor exponent)", lambda a, b: a ** b,
               lambda r: [r.uniform(0.5, 2, (3, 4)), r.normal(size=(1, 4))])
register_check("matmul 2-D", lambda a, b: a @ b, lambda r: [r.normal(size=(3, 4)), r.normal(size=(4, 5))])
register_check("matmul batched x matrix", lambda a, b: a @ b,
               lambda r: [r.normal(size=(2, 3, 4)), r.normal(size=(4, 5))])
register_check("matmul broadcast batch", lambda a, b: a @ b,
               lambda r: [r.normal(size=(2, 1, 3, 4)), r.normal(size=(3, 4, 2))])
register_check("matmul 1-D", lambda a, b: a @ b, lambda r: [r.normal(size=(4,)), r.normal(size=(2, 4, 3))])
register_check("neg", lambda a: -a, lambda r: [r.normal(size=(3, 4))])
register_check("exp", ops.exp, lambda r: [r.normal(size=(3, 4))])
register_check("log", ops.log, lambda r: [r.uniform(0.2, 3, (3, 4))])
register_check("tanh", ops.tanh, lambda r: [r.normal(size=(3, 4))])
register_check("sqrt", ops.sqrt, lambda r: [r.uniform(0.2, 3, (3, 4))])
register_check("relu", ops.relu, lambda r: [_away_from_zero(r, (3, 4))])
register_check("abs", ops.abs, lambda r: [_away_from_zero(r, (3, 4))])
register_check("sum (all)", lambda a: a.sum(), lambda r: [r.normal(size=(3, 4))])
register_check("sum (axis, keepdims)", lambda a: a.sum(axis=1, keepdims=True), lambda r: [r.normal(size=(3, 4, 2))])
register_check("mean (axes)", lambda a: a.mean(axis=(0, 2)), lambda r: [r.normal(size=(3, 4, 2))])
register_check("max (axis)", lambda a: a.max(axis=-1), lambda r: [_distinct(r, (3, 5))])
register_check("max (all)", lambda a: a.max(), lambda r: [_distinct(r, (3, 5))])
register_check("var (axis)", lambda a: a.var(axis=-1), lambda r: [r.normal(size=(3, 5))])
register_check("var (ddof=1, keepdims)", lambda a: a.var(axis=0, ddof=1, keepdims=True),
               lambda r: [r.normal(size=(4, 3))])
register_check("reshape", lambda a: a.reshape(4, -1) * a.reshape(4, -1), lambda r: [r.normal(size=(2, 3, 2))])
register_check("transpose", lambda a: a.transpose(2, 0, 1), lambda r: [r.normal(size=(2, 3, 4))])
register_check(".T", lambda a: a.T, lambda r: [r.normal(size=(2, 3))])
register_check("getitem (slices)", lambda a: a[1:, ::2, None], lambda r: [r.normal(size=(3, 5))])
register_check("getitem (repeated ids)", lambda a: a[np.array([0, 2, 0, 0])], lambda r: [r.normal(size=(3, 4))])
register_check("getitem (boolean mask)", lambda a: a[np.array([True, False, True])], lambda r: [r.normal(size=(3, 2))])
register_check("concatenate", lambda a, b: ops.concatenate([a, b, a], axis=1),
               lambda r: [r.normal(size=(2, 3)), r.normal(size=(2, 1))])
register_check("stack", lambda a, b: ops.stack([a, b], axis=-1), lambda r: [r.normal(size=(2, 3)), r.normal(size=(2, 3))])
register_check("split", lambda a: [p * (k + 1) for k, p in enumerate(ops.split(a, [1, 3], axis=1))],
               lambda r: [r.normal(size=(2, 5))])
register_check("where", lambda a, b: ops.where(np.array([True, False, True]), a, b),
               lambda r: [r.normal(size=(2, 3)), r.normal(size=(1,))])
register_check("masked_fill", lambda a: a.masked_fill(np.triu(np.ones((3, 3), bool), 1), -5.0),
               lambda r: [r.normal(size=(2, 3, 3))])
