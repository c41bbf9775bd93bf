"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").

A decoder-only transformer: token + position embeddings, ``n_layer`` pre-LN blocks of causal
multi-head attention and a 4x GELU MLP, a final LayerNorm and an LM head tied to the token
embedding (Press & Wolf 2017). Parameter names follow GPT-2's (``transformer.wte.weight``,
``transformer.h.0.attn.c_attn.weight``, ...), so Hugging Face checkpoints map by name.
"""
import math
from dataclasses import dataclass, asdict, fields

import numpy as np

from . import backend
from . import functional as F
from .engine import Tensor
from .nn import Module, ModuleList, Embedding, LayerNorm, Block, cache_len
from .optim import AdamW, FlatAdamW, decay_groups
from .sampling import generate, generate_stream

__all__ = ["GPTConfig", "GPT"]


@dataclass
class GPTConfig:
    """Model shape. ``pos`` is "learned" (GPT-2) or "sinusoidal" (Vaswani et al. 2017, sec. 3.5)."""
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    pos: str = "learned"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos not in ("learned", "sinusoidal"):
            raise ValueError(f"pos must be 'learned' or 'sinusoidal', got {self.pos!r}")

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
        logits = F.linear(x, self.lm_head_weight.T)                              # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits, backend.to_device(targets))
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
