"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").

A decoder-only transformer: token + position embeddings, ``n_layer`` pre-LN blocks of causal
multi-head attention and a 4x GELU MLP, a final LayerNorm and an LM head tied to the token
embedding (Press & Wolf 2017). Parameter names follow GPT-2's (``transformer.wte.weight``,
``transformer.h.0.attn.c_attn.weight``, ...), so Hugging Face checkpoints map by name.

Vocabulary padding (``GPTConfig.vocab_multiple``, as llm.c's padded_vocab_size): the token table
gets zero rows up to a multiple of vocab_multiple (GPT-2's 50257 -> 50304 = 786 x 64), so the LM
head's GEMM has an output width the GPU's tiles divide. The padding is invisible from outside: the
loss masks the padding logits out of the softmax (``cross_entropy(..., vocab_size=V)``), so they
get no gradient and their rows stay zero (AdamW's decay keeps zeros zero); ``forward`` returns the V
real logits (sampling and evaluation never see the padding); ``state_dict`` and Hugging Face export
hold (V, C) tables and ``load_state_dict`` pads them again; ``num_params`` counts the real rows. The
optimizer's moments keep the padded layout, which ``model_config`` (holding vocab_multiple) rebuilds
on resume.
"""
import math
from dataclasses import dataclass, asdict, fields

import numpy as np

from . import backend
from . import functional as F
from .engine import Tensor
from .nn import Module, ModuleList, Embedding, LayerNorm, Block, Parameter, cache_len
from .optim import AdamW, FlatAdamW, decay_groups
from .sampling import generate, generate_stream

__all__ = ["GPTConfig", "GPT"]


@dataclass
class GPTConfig:
    """Model shape. ``pos`` is "learned" (GPT-2) or "sinusoidal" (Vaswani et al. 2017, sec. 3.5).
    ``vocab_multiple``: pad the token table's rows to a multiple of this (1: no padding; module docstring)."""
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    pos: str = "learned"
    vocab_multiple: int = 1

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos not in ("learned", "sinusoidal"):
            raise ValueError(f"pos must be 'learned' or 'sinusoidal', got {self.pos!r}")

    @property
    def padded_vocab_size(self):
        """vocab_size rounded up to a multiple of vocab_multiple: the token table's rows."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def sinusoidal_positions(T, C):
    """PE[t, 2i] = sin(t / 10000^(2i/C)), PE[t, 2i+1] = cos(t / 10000^(2i/C)); shape (T, C)."""
    t = np.arange(T)[:, None]
    freq = np.exp(-math.log(10000.0) * np.arange(0, C, 2) / C)[None, :]
    pe = np.zeros((T, C))
    pe[:, 0::2] = np.sin(t * freq)
    pe[:, 1::2] = np.cos(t * freq)[:, : C // 2]
    return pe


class _Transformer(Module):
    def __init__(self, cfg):
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd)
        pad = cfg.padded_vocab_size - cfg.vocab_size
        if pad:   # zero rows below the real ones (the real rows draw the same numbers as without padding)
            table = self.wte.weight.data
            zeros = backend.xp.zeros((pad, cfg.n_embd), dtype=table.dtype)
            self.wte.weight = Parameter(backend.xp.concatenate([table, zeros]))   # (Vp, C)
        if cfg.pos == "learned":
            self.wpe = Embedding(cfg.block_size, cfg.n_embd)
        self.h = ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias)


class GPT(Module):
    """GPT-2 language model. ``model(idx, targets=None) -> (logits, loss)``.

    idx, targets: integer arrays (numpy or cupy) of shape (B, T) with T <= block_size.
    logits: Tensor (B, T, V); loss: mean cross-entropy Tensor (scalar) or None without targets
    (targets equal to -100 are ignored).
    """

    def __init__(self, config):
        self.config = config
        self.transformer = _Transformer(config)
        if config.pos == "sinusoidal":
            # scaled to the RMS of the N(0, 0.02^2) token embeddings (a sine of amplitude a has RMS
            # a/sqrt(2)); at amplitude 1 the positions swamp the tokens and training stalls
            self._pe = backend.to_device(sinusoidal_positions(config.block_size, config.n_embd) * (0.02 * math.sqrt(2)),
                                         dtype=backend.get_default_dtype())

    @property
    def lm_head_weight(self):
        """The LM head is the token embedding (weight tying): logits = x wte^T."""
        return self.transformer.wte.weight

    def forward(self, idx, targets=None, cache=None):
        """Logits for every position; with ``cache`` (a list of one dict per layer, from
        ``new_cache()``) earlier positions come from the cache and ``idx`` holds only new ones."""
        x = self.hidden_states(idx, cache)                                       # (B, T, C)
        logits = F.linear(x, self.lm_head_weight.T)                              # (B, T, Vp)
        V = self.config.vocab_size
        padded = logits.shape[-1] > V
        loss = None
        if targets is not None:   # the padding columns are left out of the softmax
            loss = F.cross_entropy(logits, backend.to_device(targets), vocab_size=V if padded else None)
        if padded:
            logits = logits[..., :V]                                             # (B, T, V) a view
        return logits, loss

    def hidden_states(self, idx, cache=None):
        """The final hidden states (B, T, C): embeddings, the blocks and ln_f, without the LM head
        (class heads and other task heads start here). ``idx`` (B, T) or (T,) integer ids."""
        on_host = backend.get_array_module(idx) is np
        idx = backend.to_numpy(idx) if on_host else backend._unwrap(idx)
        if idx.ndim == 1:
            idx = idx[None, :]
        if idx.dtype.kind not in "iu":
            raise TypeError(f"idx must be an integer array of token ids, got dtype {idx.dtype}")
        B, T = idx.shape
        start = cache_len(cache)
        cfg = self.config
        if start + T > cfg.block_size:
            raise ValueError(f"sequence length {start + T} exceeds the model's block_size {cfg.block_size}; "
                             f"crop the context to the last {cfg.block_size} tokens")
        # ids already on the GPU are not range-checked: reading their min/max would stall the GPU
        if on_host and idx.size and (int(idx.max()) >= cfg.vocab_size or int(idx.min()) < 0):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{int(idx.min())}, {int(idx.max())}]")
        idx = backend.to_device(idx)
        tr = self.transformer
        tok = tr.wte(idx)                                                        # (B, T, C)
        if cfg.pos == "learned":
            pos = tr.wpe(backend.xp.arange(start, start + T)[None, :])           # (1, T, C)
        else:
            pos = Tensor(self._pe[start:start + T][None].astype(tok.dtype, copy=False))  # (1, T, C) model dtype
        x = F.dropout(tok + pos, cfg.dropout, self.training)                     # (B, T, C)
        for i, block in enumerate(tr.h):
            x = block(x, None if cache is None else cache[i])
        return tr.ln_f(x)                                                        # (B, T, C)

    # ---- vocabulary padding: invisible outside the model ---------------------------------------------

    def unpadded(self, state):
        """``state`` (name -> array) with the token table cut to its vocab_size real rows (a view)."""
        name = "transformer.wte.weight"
        if name in state and np.shape(state[name])[0] > self.config.vocab_size:
            state = {**state, name: state[name][:self.config.vocab_size]}
        return state

    def state_dict(self):
        """Name -> NumPy array of every parameter, the token table without its padding rows."""
        return self.unpadded(super().state_dict())

    def load_state_dict(self, state, strict=True):
        """``Module.load_state_dict``, with a token table of vocab_size rows (or already padded)
        padded with zero rows to this model's table."""
        name, wte = "transformer.wte.weight", self.transformer.wte.weight
        if name in state and wte.shape[0] > self.config.vocab_size and np.ndim(state[name]) == 2:
            table = backend.to_numpy(state[name])[:self.config.vocab_size]
            if table.shape[0] == self.config.vocab_size:
                padded = np.zeros((wte.shape[0], table.shape[1]), dtype=table.dtype)
                padded[:table.shape[0]] = table
                state = {**state, name: padded}
        return super().load_state_dict(state, strict)

    def num_params(self):
        """Number of scalar parameters, shared ones once and the token table's padding rows not at all."""
        wte = self.transformer.wte.weight
        return super().num_params() - (wte.shape[0] - self.config.vocab_size) * wte.shape[1]

    def new_cache(self):
        """An empty KV cache: one dict per layer, filled with keys/values (B, NH, T, hs) as tokens arrive."""
        return [dict() for _ in range(self.config.n_layer)]

    def configure_optimizer(self, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                            flat=False, dtype=None, max_grad_norm=0.0, **kwargs):
        """AdamW with weight decay on matrices only (>= 2-D: embeddings and linear weights), as GPT-2.

        ``flat=True`` (implied by ``dtype``) returns an ``optim.FlatAdamW``: all parameters become
        views of one buffer, the step (with global-norm clipping at ``max_grad_norm``) is one pass,
        and ``dtype="float16"`` trains in fp16 with float32 master weights and dynamic loss scaling.
        Otherwise the per-parameter ``optim.AdamW`` (clip with ``optim.clip_grad_norm``)."""
        groups = decay_groups(self.parameters(), weight_decay)
        if flat or dtype is not None:
            return FlatAdamW(groups, lr=learning_rate, betas=betas, eps=eps, dtype=dtype,
                             max_grad_norm=max_grad_norm, **kwargs)
        if max_grad_norm or kwargs:
            raise TypeError("max_grad_norm and mixed-precision options need flat=True")
        return AdamW(groups, lr=learning_rate, betas=betas, eps=eps)

    @classmethod
    def from_hf(cls, path, dtype=None):
        """A GPT (eval mode) holding a Hugging Face GPT-2 checkpoint directory's weights; see
        ``npgpt.hf.from_hf``. ``GPT.from_hf("gpt2")`` for a local copy of GPT-2 small."""
        from .hf import from_hf   # hf builds a GPT: imported here, not at module level
        return from_hf(path, dtype)

    def save_hf(self, path, meta=None):
        """Write this model as a Hugging Face GPT-2 directory; see ``npgpt.hf.save_hf``."""
        from .hf import save_hf
        return save_hf(self, path, meta)

    def estimate_flops_per_token(self):
        """6N + 12 L H Q T (the PaLM/nanoGPT estimate of training FLOPs per token)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size

    # generation lives in sampling.py; these make it a method
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                 eos_token=None, use_cache=True, repetition_penalty=1.0):
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T); see ``npgpt.sampling.generate``."""
        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, seed, eos_token, use_cache,
                        repetition_penalty=repetition_penalty)

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                        eos_token=None, use_cache=True, repetition_penalty=1.0):
        """Yield the new tokens one step at a time as arrays (B,); see ``npgpt.sampling.generate_stream``."""
        return generate_stream(self, idx, max_new_tokens, temperature, top_k, top_p, seed, eos_token, use_cache,
                               repetition_penalty=repetition_penalty)
