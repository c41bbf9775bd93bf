"""Modules: parameters with names, and the layers of a GPT-2 block built from the fused layers (``functional``).

A Module finds its parameters by walking its attributes in the order they were set, so names come
out as GPT-2's (``transformer.h.0.attn.c_attn.weight``) and Hugging Face weights load by name.
Linear weights use GPT-2's Conv1D layout (in, out): y = x W + b.
"""
import math

import numpy as np

from . import backend
from . import functional as F
from .engine import Tensor
from .layers.bias_gelu import bias_gelu
from .layers.tuning import TUNING

__all__ = ["Parameter", "Module", "ModuleList", "Linear", "LayerNorm", "Embedding", "MLP", "cache_len",
           "CausalSelfAttention", "Block"]


class Parameter(Tensor):
    """A leaf Tensor that a Module owns and an optimizer updates (requires_grad=True)."""
    __slots__ = ()

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)


def normal_(shape, std):
    """N(0, std^2) values of the default dtype from the backend's seeded Generator."""
    dtype = backend.get_default_dtype()
    return backend.rng().standard_normal(shape, dtype=np.float32).astype(dtype) * dtype.type(std)


def zeros_(shape):
    return backend.xp.zeros(shape, dtype=backend.get_default_dtype())


def ones_(shape):
    return backend.xp.ones(shape, dtype=backend.get_default_dtype())


class Module:
    """Base class: ``named_parameters()``, ``state_dict()``, ``train()/eval()``, ``__call__``."""
    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def named_children(self):
        for name, v in vars(self).items():
            if isinstance(v, Module):
                yield name, v

    def named_parameters(self, prefix=""):
        """(name, Parameter) pairs, each shared parameter once, in definition order."""
        seen = set()
        for name, p in self._walk(prefix):
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def _walk(self, prefix):
        for name, v in vars(self).items():
            full = f"{prefix}{name}"
            if isinstance(v, Parameter):
                yield full, v
            elif isinstance(v, Module):
                yield from v._walk(full + ".")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_params(self):
        """Number of scalar parameters (shared ones counted once)."""
        return int(sum(p.size for p in self.parameters()))

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def train(self, mode=True):
        """Training mode (dropout active); returns self."""
        self.training = mode
        for _, m in self.named_children():
            m.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def state_dict(self):
        """Name -> NumPy array (host copy) of every parameter."""
        return {name: backend.to_numpy(p.data).copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters by name (cast to each parameter's dtype, moved to its
        backend). With ``strict``, missing, unexpected and mis-shaped keys raise one KeyError/ValueError
        that lists them all; nothing is copied unless everything matches."""
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        shapes = [f"{k}: checkpoint {tuple(np.shape(state[k]))} vs model {p.shape}"
                  for k, p in params.items() if k in state and tuple(np.shape(state[k])) != p.shape]
        if shapes:
            raise ValueError("state dict shapes do not match the model:\n  " + "\n  ".join(shapes))
        if strict and (missing or unexpected):
            raise KeyError(f"state dict does not match the model: missing {missing}, unexpected {unexpected}")
        for k, p in params.items():
            if k in state:
                p.data[...] = backend.to_device(np.asarray(backend.to_numpy(state[k])), dtype=p.dtype)
        return missing, unexpected


class ModuleList(Module):
    """A list of modules named 0, 1, 2, ... (GPT-2's ``h.0``, ``h.1``, ...)."""

    def __init__(self, modules):
        for i, m in enumerate(modules):
            setattr(self, str(i), m)
        self._n = len(modules)

    def __len__(self):
        return self._n

    def __iter__(self):
        return (getattr(self, str(i)) for i in range(self._n))

    def __getitem__(self, i):
        return getattr(self, str(range(self._n)[i]))


class Linear(Module):
    """y = x W + b with W of shape (in, out) (GPT-2's Conv1D layout), W ~ N(0, std^2), b = 0."""

    def __init__(self, n_in, n_out, bias=True, std=0.02):
        self.weight = Parameter(normal_((n_in, n_out), std))
        self.bias = Parameter(zeros_((n_out,))) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)  # (..., n_in) -> (..., n_out)


class LayerNorm(Module):
    """Layer normalization over the last axis (Ba, Kiros & Hinton 2016), weight 1 and bias 0 at init."""

    def __init__(self, n, bias=True, eps=1e-5):
        self.weight = Parameter(ones_((n,)))
        self.bias = Parameter(zeros_((n,))) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class Embedding(Module):
    """A lookup table (V, C), rows ~ N(0, 0.02^2)."""

    def __init__(self, n, dim, std=0.02):
        self.weight = Parameter(normal_((n, dim), std))

    def forward(self, ids):
        return F.embedding(ids, self.weight)  # (B, T) -> (B, T, C)


class MLP(Module):
    """GPT-2's feed-forward: C -> 4C, GELU (tanh approximation), 4C -> C, dropout."""

    def __init__(self, cfg):
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, cfg.bias)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, cfg.bias, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self.dropout = cfg.dropout

    def forward(self, x):
        if self.c_fc.bias is not None and backend.name == "cupy" and TUNING["cupy"]["fused_bias_gelu"]:
            h = bias_gelu(F.linear(x, self.c_fc.weight), self.c_fc.bias)   # one pass for + b and GELU
        else:
            h = F.gelu(self.c_fc(x))                                   # (B, T, 4C)
        return F.dropout(self.c_proj(h), self.dropout, self.training)  # (B, T, C)


class CausalSelfAttention(Module):
    """Multi-head causal self-attention (Vaswani et al. 2017, sec. 3.2) with one fused qkv projection.

    With a ``cache`` dict the keys and values of earlier positions are reused (KV cache): only the
    new positions are projected and attend to everything seen so far.
    """

    def __init__(self, cfg):
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, cfg.bias)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, cfg.bias, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self.n_head, self.dropout = cfg.n_head, cfg.dropout

    def forward(self, x, cache=None):
        B, T, C = x.shape
        NH, hs = self.n_head, C // self.n_head
        qkv = self.c_attn(x)                                            # (B, T, 3C)
        qkv = qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)     # (3, B, NH, T, hs)
        q, k, v = qkv[0], qkv[1], qkv[2]                                # (B, NH, T, hs) each
        if cache is not None:
            xp = backend.get_array_module(k.data)
            if "k" in cache:  # append the new keys/values to the cached ones (inference only)
                k = Tensor(xp.concatenate([cache["k"], k.data], axis=2))  # (B, NH, Tk, hs)
                v = Tensor(xp.concatenate([cache["v"], v.data], axis=2))
            cache["k"], cache["v"] = k.data, v.data
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, NH, T, hs)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)                    # (B, T, C): heads side by side
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class Block(Module):
    """Pre-LN transformer block (GPT-2): x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg):
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))


def cache_len(cache):
    """Number of positions already held in a KV cache (0 for None or empty)."""
    if not cache or "k" not in cache[0]:
        return 0
    return cache[0]["k"].shape[2]
