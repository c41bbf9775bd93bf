"""The cold-cache fast paths of GPT-2 encoding (issue 13): new pre-tokens of a batch merged together
in NumPy steps (``merge.bpe_merge_batch``) equal the one-by-one list loop, on GPT-2's ranks and on
random toy vocabularies; and a fresh Encoding, with batches, the batch threshold and the cache
shrunk so that every path runs on short text (batched merges, cache emptied mid-text, pieces too
long to cache), is byte-exact with tiktoken on hypothesis-drawn Unicode text, special tokens allowed
or refused as tiktoken does. Speed: benchmarks/bench_tokenizer.py."""
import gc
import random

import pytest
from hypothesis import given, settings, strategies as st

from npgpt.data import bundled_corpus_path
from npgpt.tokenizer import GPT2_PATTERN, get_encoding
from npgpt.tokenizer import encoding as encoding_mod, merge as merge_mod
from npgpt.tokenizer.encoding import Encoding
from npgpt.tokenizer.merge import bpe_merge, bpe_merge_batch, span_table

ENC = get_encoding("gpt2")
RANKS = ENC.mergeable_ranks
TABLE = span_table(RANKS)


def batch_both_ways(pieces, ranks, table):
    """bpe_merge_batch with the default tail (the list loop finishes the last pieces) and with NumPy
    steps to the end."""
    saved = merge_mod.BATCH_TAIL
    try:
        with_tail = bpe_merge_batch(pieces, ranks, table)
        merge_mod.BATCH_TAIL = 0
        to_the_end = bpe_merge_batch(pieces, ranks, table)
    finally:
        merge_mod.BATCH_TAIL = saved
    return with_tail, to_the_end


words = st.one_of(st.text(min_size=1, max_size=40).map(lambda s: " " + s),
                  st.text(alphabet="etaoinshrdlu ETAOIN'", min_size=2, max_size=20),
                  st.binary(min_size=2, max_size=130))


@settings(max_examples=60, deadline=None)
@given(st.lists(words, min_size=1, max_size=200))
def test_batch_merge_equals_the_list_loop(pieces):
    pieces = [p if isinstance(p, bytes) else p.encode("utf-8", "replace") for p in pieces]
    pieces = [p for p in pieces if len(p) >= 2]
    loop = [bpe_merge(p, RANKS) for p in pieces]
    assert batch_both_ways(pieces, RANKS, TABLE) == (loop, loop)


def test_batch_merge_on_the_corpus_words():
    text = open(bundled_corpus_path(), encoding="utf-8").read()[:300_000]
    pieces = [p.encode() for p in dict.fromkeys(sum(encoding_mod.pretokenize(text), []))]
    pieces = [p for p in pieces if p not in RANKS]           # the ones that merge: ~4,000
    loop = [bpe_merge(p, RANKS) for p in pieces]
    assert len(pieces) > 1000 and batch_both_ways(pieces, RANKS, TABLE) == (loop, loop)


def toy_ranks(rng, n_merges, shared_rank=False):
    """All 256 bytes plus random concatenations over "abc" ranked in random order (a longer token may
    rank below its parts' merge); with ``shared_rank`` two tokens share an id."""
    singles = [bytes([b]) for b in range(256)]
    tokens = list(dict.fromkeys(singles[97:100] + [rng.choice(singles[97:100]) + rng.choice(singles[97:100])]))
    while len(tokens) < n_merges:
        tokens = list(dict.fromkeys(tokens + [rng.choice(tokens) + rng.choice(tokens)]))
    order = rng.sample(range(256, 256 + len(tokens)), len(tokens))
    ranks = {b: i for i, b in enumerate(singles)}
    ranks.update((t, r) for t, r in zip(tokens, order) if len(t) > 1)
    if shared_rank:
        long = [t for t in ranks if len(t) > 1]
        ranks[long[-1]] = ranks[long[0]]
    return ranks


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32), st.integers(3, 80), st.booleans(),
       st.lists(st.text(alphabet="abc", min_size=2, max_size=40), min_size=1, max_size=40))
def test_batch_merge_on_toy_vocabularies(seed, n_merges, shared_rank, texts):
    ranks = toy_ranks(random.Random(seed), n_merges, shared_rank)
    pieces = [t.encode() for t in texts]
    loop = [bpe_merge(p, ranks) for p in pieces]
    assert batch_both_ways(pieces, ranks, span_table(ranks)) == (loop, loop)


def fresh_small(monkeypatch, cache_max=40):
    """A fresh encoder with every fast path on short text: ~60-character batches, NumPy merges from one
    new piece, a cache of ``cache_max`` pre-tokens, pieces over 12 characters not cached."""
    monkeypatch.setattr(encoding_mod, "_BATCH_CHARS", 60)
    monkeypatch.setattr(encoding_mod, "_BLOCK_CHARS", 20)
    monkeypatch.setattr(encoding_mod, "_BATCH_MIN", 1)
    monkeypatch.setattr(encoding_mod, "_CACHE_MAX", cache_max)
    monkeypatch.setattr(encoding_mod, "_CACHE_PIECE", 12)
    monkeypatch.setattr(merge_mod, "BATCH_TAIL", 0)
    return Encoding("gpt2", GPT2_PATTERN, RANKS, ENC.special_tokens)


PARTS = ["word ", " Word", "  ", "\n", "\n\n", ".", "!?", "'s", "é", "日本", "🤖", "\t", "12", " 345",
         "<|endoftext|>", "<|endoftext|", "supercalifragilistic", " " * 20, "a" * 30, "\ud800"]
texts = st.one_of(st.text(max_size=400), st.lists(st.sampled_from(PARTS), max_size=120).map("".join))


@settings(max_examples=80, deadline=None)
@given(texts, st.sampled_from([2, 40, 10_000]))
def test_fresh_encoder_fast_paths_match_tiktoken(tiktoken_ref, monkeypatch, text, cache_max):
    enc = fresh_small(monkeypatch, cache_max)
    assert enc.encode_ordinary(text) == tiktoken_ref.encode_ordinary(text)
    assert enc.encode_ordinary(text) == tiktoken_ref.encode_ordinary(text)       # again, from the cache
    assert len(enc._cache) <= cache_max
    for kw in [dict(allowed_special="all"), dict(disallowed_special=()), dict(allowed_special={"<|endoftext|>"})]:
        assert enc.encode(text, **kw) == tiktoken_ref.encode(text, **kw)
    if "<|endoftext|>" in text:
        with pytest.raises(ValueError, match="disallowed special token"):
            enc.encode(text)


def test_fresh_encoder_on_the_corpus_in_many_batches(tiktoken_ref, monkeypatch):
    monkeypatch.setattr(encoding_mod, "_BATCH_CHARS", 1 << 15)
    text = open(bundled_corpus_path(), encoding="utf-8").read()[:1_000_000]
    enc = Encoding("gpt2", GPT2_PATTERN, RANKS, ENC.special_tokens)
    assert enc.encode_ordinary(text) == tiktoken_ref.encode_ordinary(text)


def test_garbage_collector_state_is_restored():
    enc = Encoding("gpt2", GPT2_PATTERN, RANKS, ENC.special_tokens)
    assert gc.isenabled()
    enc.encode_ordinary("Hello world \ud800 lone surrogate")        # the retry path too
    assert gc.isenabled()
    gc.disable()
    try:
        enc.encode_ordinary("Hello again")
        assert not gc.isenabled()
    finally:
        gc.enable()
