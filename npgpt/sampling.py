"""Autoregressive sampling with a KV cache: temperature, top-k, nucleus (top-p, Holtzman et al. 2020), greedy.

With the cache, the prompt is run once and each later step feeds only the newest token: its query
attends to the cached keys/values of every earlier position, so a step costs O(T) instead of
O(T^2). When the sequence would pass ``block_size`` the window slides: the cache is rebuilt from
the last ``block_size`` tokens (learned positions are absolute, so cached keys cannot be reused).
"""
import numpy as np

from . import backend
from .engine import no_grad
from .nn import cache_len

__all__ = ["generate", "generate_stream", "sample_from_logits"]


def sample_from_logits(logits, temperature=1.0, top_k=None, top_p=None, rng=None):
    """One token id per row of ``logits`` (B, V) -> (B,). temperature 0 is greedy (argmax)."""
    xp = backend.get_array_module(logits)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits.astype(xp.float32) / xp.float32(temperature)             # (B, V)
    V = logits.shape[-1]
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(int(top_k), V)
        kth = xp.partition(logits, V - k, axis=-1)[:, V - k:V - k + 1]      # (B, 1): k-th largest
        logits = xp.where(logits < kth, -xp.inf, logits)
    probs = xp.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)                               # (B, V)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        order = xp.argsort(-probs, axis=-1)                                  # (B, V) descending
        sorted_p = xp.take_along_axis(probs, order, axis=-1)
        before = xp.cumsum(sorted_p, axis=-1) - sorted_p                     # mass strictly before each
        sorted_p = xp.where(before < top_p, sorted_p, 0.0)                   # smallest set with mass >= p
        probs = xp.zeros_like(probs)
        xp.put_along_axis(probs, order, sorted_p, axis=-1)
        probs /= probs.sum(axis=-1, keepdims=True)
    rng = rng if rng is not None else backend.rng()
    u = rng.random((probs.shape[0], 1), dtype=xp.float32)                   # inverse-CDF sampling
    cdf = xp.cumsum(probs, axis=-1)
    ids = (cdf < u * cdf[:, -1:]).sum(axis=-1)
    return xp.minimum(ids, V - 1)


@no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                    eos_token=None, use_cache=True):
    """Yield arrays (B,) of new token ids, one per step, for prompts ``idx`` (B, T) (or (T,)).

    Stops after ``max_new_tokens`` or when every row has produced ``eos_token`` (rows that
    finished early keep producing ``eos_token``).
    """
    xp = backend.xp
    idx = backend.to_device(np.asarray(backend.to_numpy(idx)))
    if idx.ndim == 1:
        idx = idx[None, :]
    if idx.shape[1] == 0:
        raise ValueError("generate needs a prompt of at least one token")
    rng = xp.random.default_rng(seed) if seed is not None else backend.rng()
    was_training = model.training
    model.eval()
    bs = model.config.block_size
    try:
        done = xp.zeros(idx.shape[0], dtype=bool)
        cache = model.new_cache() if use_cache else None
        context = idx[:, -bs:]
        pending = context                                      # tokens not yet run through the model
        for _ in range(max_new_tokens):
            if use_cache:
                if cache_len(cache) + pending.shape[1] > bs:   # slide the window: rebuild the cache
                    cache, pending = model.new_cache(), context    # from the last block_size tokens
                logits = logits_last(model, pending, cache)
            else:
                logits = logits_last(model, context[:, -bs:])
            nxt = sample_from_logits(logits, temperature, top_k, top_p, rng)  # (B,)
            if eos_token is not None:
                nxt = xp.where(done, eos_token, nxt)
                done |= nxt == eos_token
            yield nxt
            context = xp.concatenate([context, nxt[:, None].astype(context.dtype)], axis=1)[:, -bs:]
            pending = nxt[:, None].astype(idx.dtype)
            if eos_token is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
             eos_token=None, use_cache=True):
    """``idx`` (B, T) followed by up to ``max_new_tokens`` sampled ids: an array (B, T + n)."""
    xp = backend.xp
    idx = backend.to_device(np.asarray(backend.to_numpy(idx)))
    squeeze = idx.ndim == 1
    if squeeze:
        idx = idx[None, :]
    new = [t[:, None].astype(idx.dtype) for t in generate_stream(
        model, idx, max_new_tokens, temperature, top_k, top_p, seed, eos_token, use_cache)]
    out = xp.concatenate([idx] + new, axis=1)
    return out[0] if squeeze else out


@no_grad()
def logits_last(model, idx, cache=None):
    """Logits (B, V) of the last position, as an array."""
    logits, _ = model(idx, cache=cache)
    return logits.data[:, -1, :]
