"""Autoregressive sampling with a KV cache: temperature, top-k, nucleus (top-p, Holtzman et al. 2020),
greedy, a repetition penalty (CTRL, Keskar et al. 2019), and text streamed as the tokens come.

With the cache, the prompt is run once and each later step feeds only the newest token: its query
attends to the cached keys/values of every earlier position, so a step costs O(T) instead of
O(T^2). When the sequence would pass ``block_size`` the window slides: the cache is rebuilt from
the last ``block_size`` tokens (learned positions are absolute, so cached keys cannot be reused).

Each step's logits (B, V) go through, in order:

    1. repetition penalty   z_v <- z_v / p  if z_v > 0,  z_v * p  otherwise, for every v already
                            in the row's context (prompt + generated); p > 1 discourages repeats
    2. temperature          z <- z / T  (T = 0: argmax, nothing below applies)
    3. top-k                keep the k largest (k = 0 or None: off)
    4. top-p                keep the smallest set of most likely tokens with mass >= p (p = 1: off)
"""
import codecs
import math

import numpy as np

from . import backend
from .engine import no_grad
from .nn import cache_len

__all__ = ["generate", "generate_stream", "sample_from_logits", "check_sampling", "apply_repetition_penalty",
           "seen_mask", "TextStream", "stream_text"]


def check_sampling(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0):
    """Raise one ValueError naming the bad knob: temperature >= 0 (0 = greedy), top_k >= 0 (0 = off),
    top_p in (0, 1] (1 = off), repetition_penalty > 0 (1 = off); all finite."""
    if not (math.isfinite(float(temperature)) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:        # also refuses nan
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not (math.isfinite(float(repetition_penalty)) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty}")


def seen_mask(ids, vocab_size):
    """(B, V) bool: True where token v occurs in row b of ``ids`` (B, T)."""
    xp = backend.get_array_module(ids)
    seen = xp.zeros((ids.shape[0], vocab_size), dtype=bool)
    seen[xp.arange(ids.shape[0])[:, None], ids] = True
    return seen


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's penalty on logits (B, V) of the tokens ``seen`` (B, V) bool: divided by ``penalty`` when
    positive, multiplied when not, so p > 1 always lowers a seen token's probability."""
    xp = backend.get_array_module(logits)
    penalised = xp.where(logits > 0, logits / logits.dtype.type(penalty), logits * logits.dtype.type(penalty))
    return xp.where(seen, penalised, logits)


def sample_from_logits(logits, temperature=1.0, top_k=None, top_p=None, rng=None, seen=None,
                       repetition_penalty=1.0):
    """One token id per row of ``logits`` (B, V) -> (B,). temperature 0 is greedy (argmax); top_k 0
    or None and top_p 1 or None are off; ``seen`` (B, V) bool marks the tokens the repetition
    penalty applies to (ignored when the penalty is 1)."""
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    xp = backend.get_array_module(logits)
    logits = logits.astype(xp.float32)                                       # (B, V)
    if repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits / xp.float32(temperature)                                # (B, V)
    V = logits.shape[-1]
    if top_k and top_k < V:
        k = int(top_k)
        kth = xp.partition(logits, V - k, axis=-1)[:, V - k:V - k + 1]      # (B, 1): k-th largest
        logits = xp.where(logits < kth, -xp.inf, logits)
    probs = xp.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)                               # (B, V)
    if top_p is not None and top_p < 1.0:
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
                    eos_token=None, use_cache=True, repetition_penalty=1.0):
    """Yield arrays (B,) of new token ids, one per step, for prompts ``idx`` (B, T) (or (T,)).

    Stops after ``max_new_tokens`` or when every row has produced ``eos_token`` (rows that
    finished early keep producing ``eos_token``). The repetition penalty sees the whole prompt and
    every token generated so far (not only the last ``block_size``).
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty)
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
        rows = xp.arange(idx.shape[0])
        seen = seen_mask(idx, model.config.vocab_size) if repetition_penalty != 1.0 else None   # (B, V)
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
            nxt = sample_from_logits(logits, temperature, top_k, top_p, rng, seen, repetition_penalty)  # (B,)
            if eos_token is not None:
                nxt = xp.where(done, eos_token, nxt)
                done |= nxt == eos_token
            yield nxt
            if seen is not None:
                seen[rows, nxt] = True
            context = xp.concatenate([context, nxt[:, None].astype(context.dtype)], axis=1)[:, -bs:]
            pending = nxt[:, None].astype(idx.dtype)
            if eos_token is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
             eos_token=None, use_cache=True, repetition_penalty=1.0):
    """``idx`` (B, T) followed by up to ``max_new_tokens`` sampled ids: an array (B, T + n)."""
    xp = backend.xp
    idx = backend.to_device(np.asarray(backend.to_numpy(idx)))
    squeeze = idx.ndim == 1
    if squeeze:
        idx = idx[None, :]
    new = [t[:, None].astype(idx.dtype) for t in generate_stream(
        model, idx, max_new_tokens, temperature, top_k, top_p, seed, eos_token, use_cache, repetition_penalty)]
    out = xp.concatenate([idx] + new, axis=1)
    return out[0] if squeeze else out


@no_grad()
def logits_last(model, idx, cache=None):
    """Logits (B, V) of the last position, as an array; never a padded vocabulary's padding columns
    (the model already cuts them off; cut again here, a no-op view, so no sampler can draw one)."""
    logits, _ = model(idx, cache=cache)
    return logits.data[:, -1, :model.config.vocab_size]


# ---- text as it comes ---------------------------------------------------------------------------

class TextStream:
    """Token ids in, text out as soon as it is whole: ``push(ids) -> str``, ``flush() -> str``.

    A byte-level BPE token can end inside a UTF-8 character (a CJK character or an emoji is often
    two or three GPT-2 tokens), so the bytes go through an incremental UTF-8 decoder that holds an
    unfinished character until its last byte comes; the pieces joined equal ``tok.decode(ids)``
    (errors="replace" in both). A tokenizer without bytes (characters) decodes token by token.
    """

    def __init__(self, tok):
        enc = tok if hasattr(tok, "decode_bytes") else getattr(tok, "encoding", None)
        self.tok = tok
        self.to_bytes = getattr(enc, "decode_bytes", None)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids):
        ids = [int(i) for i in ids]
        if self.to_bytes is None:
            return self.tok.decode(ids)
        return self.utf8.decode(self.to_bytes(ids))

    def flush(self):
        """What is left: a character cut short at the end becomes U+FFFD, as in ``decode``."""
        return self.utf8.decode(b"", final=True) if self.to_bytes is not None else ""


def _held_back(ids, stop):
    """Length of the longest tail of ``ids`` that is a proper head of ``stop`` (it may yet become stop)."""
    for n in range(min(len(ids), len(stop) - 1), 0, -1):
        if ids[-n:] == stop[:n]:
            return n
    return 0


def stream_text(model, tok, ids, max_new_tokens, write=None, stop=None, **sampling):
    """Continue the prompt ``ids`` (a list of ints) and return the new text; ``write(piece)`` gets
    each piece as soon as it decodes (print it and flush for a terminal).

    ``stop``: token ids that end the text and are not part of it (an instruction-tuned model's end
    marker, e.g. the two tokens of "\n\n" for a char model); tokens that could begin ``stop`` are
    held back until it is clear they do not. ``sampling``: ``generate_stream``'s knobs
    (temperature, top_k, top_p, seed, eos_token, use_cache, repetition_penalty).
    """
    text, stop, held, pieces = TextStream(tok), list(stop or []), [], []

    def emit(piece):
        if piece:
            pieces.append(piece)
            if write is not None:
                write(piece)

    for step in generate_stream(model, np.asarray(ids)[None, :], max_new_tokens, **sampling):
        held.append(int(backend.to_numpy(step)[0]))
        if stop and held[-len(stop):] == stop:
            del held[-len(stop):]
            break
        n = _held_back(held, stop)
        emit(text.push(held[:len(held) - n]))
        del held[:len(held) - n]
    emit(text.push(held))
    emit(text.flush())
    return "".join(pieces)
