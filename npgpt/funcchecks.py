"""The gradient checks ``npgpt gradcheck`` runs for the fused layers (``npgpt/layers/``, by their ``functional`` names).

Like ``opchecks.py``: each entry is the layer as a function of Tensors and a maker of random
float64 inputs. Integer inputs (ids, targets) are closed over, so only float inputs are checked.
Dropout is checked with a fixed seed re-applied on every call, so the mask is the same in the
analytic pass and in every finite difference.
"""
import numpy as np

from . import backend
from . import functional as F
from .gradcheck import register_check


def _ids(shape, V, seed=0):
    """Token ids with repeats (so the scatter-add must accumulate)."""
    return np.random.default_rng(seed).integers(0, V, shape)


def _dropout_fixed(p, seed=0):
    def fn(x):
        backend.seed(seed)
        return F.dropout(x, p)
    return fn


def _attention_dropout_fixed(p, seed=0):
    def fn(q, k, v):
        backend.seed(seed)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    return fn


_IDS = _ids((2, 5), 4)
_TARGETS = np.array([[0, 3, -100, 1], [2, 2, 4, -100]])
_KEEP = np.random.default_rng(1).random((2, 1, 3, 5)) > 0.3

register_check("F.linear", F.linear,
               lambda r: [r.normal(size=(2, 3, 4)), r.normal(size=(4, 5)), r.normal(size=(5,))])
register_check("F.linear (no bias, 2-D)", F.linear, lambda r: [r.normal(size=(3, 4)), r.normal(size=(4, 2))])
register_check("F.embedding (repeated ids)", lambda w: F.embedding(_IDS, w), lambda r: [r.normal(size=(4, 3))])
register_check("F.layer_norm", F.layer_norm,
               lambda r: [r.normal(size=(2, 3, 5)), r.normal(size=(5,)), r.normal(size=(5,))])
register_check("F.layer_norm (no weight/bias)", F.layer_norm, lambda r: [r.normal(size=(3, 6))])
register_check("F.gelu", F.gelu, lambda r: [r.normal(size=(3, 4)) * 2])
register_check("F.softmax (axis -1)", F.softmax, lambda r: [r.normal(size=(2, 3, 4))])
register_check("F.softmax (axis 0)", lambda x: F.softmax(x, axis=0), lambda r: [r.normal(size=(3, 4))])
register_check("F.cross_entropy (ignore_index)", lambda x: F.cross_entropy(x, _TARGETS),
               lambda r: [r.normal(size=(2, 4, 5))])
register_check("F.dropout (fixed mask)", _dropout_fixed(0.3), lambda r: [r.normal(size=(4, 5))])
register_check("F.attention causal", F.scaled_dot_product_attention,
               lambda r: [r.normal(size=(2, 2, 4, 3)), r.normal(size=(2, 2, 4, 3)), r.normal(size=(2, 2, 4, 3))])
register_check("F.attention causal Tq<Tk", F.scaled_dot_product_attention,
               lambda r: [r.normal(size=(1, 2, 2, 3)), r.normal(size=(1, 2, 5, 3)), r.normal(size=(1, 2, 5, 3))])
register_check("F.attention bool mask", lambda q, k, v: F.scaled_dot_product_attention(
                   q, k, v, is_causal=False, attn_mask=_KEEP),
               lambda r: [r.normal(size=(2, 2, 3, 4)), r.normal(size=(2, 2, 5, 4)), r.normal(size=(2, 2, 5, 4))])
register_check("F.attention dropout (fixed mask)", _attention_dropout_fixed(0.25),
               lambda r: [r.normal(size=(1, 2, 4, 3)), r.normal(size=(1, 2, 4, 3)), r.normal(size=(1, 2, 4, 3))])


def _lora(x, w, b, a, bb):
    from .lora import lora_linear
    return lora_linear(x, w, b, a, bb, 2.0)


register_check("lora_linear (r=2)", _lora,
               lambda r: [r.normal(size=(2, 3, 4)), r.normal(size=(4, 5)), r.normal(size=(5,)),
                          r.normal(size=(4, 2)), r.normal(size=(2, 5))])
