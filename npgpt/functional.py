"""The fused layers, by their public names: each is one graph node with a hand-written backward.

The layers live one per file in ``npgpt/layers/`` (derivation, reference, NumPy math, CUDA twin,
dispatch); this module is the list user code imports::

    from npgpt import functional as F
    y = F.layer_norm(x, w, b)
"""
from .layers.attention import attention_reference, scaled_dot_product_attention
from .layers.cross_entropy import cross_entropy, cross_entropy_reference
from .layers.dropout import dropout
from .layers.embedding import embedding, embedding_reference
from .layers.gelu import gelu, gelu_reference
from .layers.layer_norm import layer_norm, layer_norm_reference
from .layers.linear import linear, linear_reference
from .layers.softmax import softmax, softmax_reference

__all__ = ["linear", "embedding", "layer_norm", "gelu", "softmax", "cross_entropy", "dropout",
           "scaled_dot_product_attention", "attention_reference", "linear_reference", "embedding_reference",
           "layer_norm_reference", "gelu_reference", "softmax_reference", "cross_entropy_reference"]
