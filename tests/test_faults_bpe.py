"""BPE of long pre-tokens (issue 18): the heap and NumPy-round merges equal the short-piece list loop
and tiktoken, byte-exact, on long runs (1 MB of "a", digits, punctuation, DNA, random letters), on
hypothesis-drawn runs with the thresholds lowered so every path runs on short text, and on random toy
vocabularies whose ranks do not grow with length (where merging a whole round at once would be wrong).
Long pre-tokens stay out of the cache. Speed is in benchmarks/bench_tokenizer.py, not asserted here."""
import random
import string

import pytest
from hypothesis import given, settings, strategies as st

from npgpt.tokenizer import GPT2_PATTERN, get_encoding
from npgpt.tokenizer import merge as encoding_mod
from npgpt.tokenizer.encoding import Encoding, bpe_merge, pair_table

ENC = get_encoding("gpt2")
TABLE = pair_table(ENC.mergeable_ranks)


def all_paths(piece, ranks, table):
    """bpe_merge of ``piece`` by the list loop, by the heap and by rounds + heap."""
    saved = encoding_mod.SHORT_PIECE, encoding_mod.ROUNDS_PIECE, encoding_mod.SMALL_ROUNDS
    try:
        encoding_mod.SHORT_PIECE = 1 << 30
        by_list = bpe_merge(piece, ranks)
        encoding_mod.SHORT_PIECE = encoding_mod.ROUNDS_PIECE = 0
        by_heap = bpe_merge(piece, ranks)
        encoding_mod.SMALL_ROUNDS = 1 << 30                # rounds as long as they are exact
        by_rounds = bpe_merge(piece, ranks, table)
    finally:
        encoding_mod.SHORT_PIECE, encoding_mod.ROUNDS_PIECE, encoding_mod.SMALL_ROUNDS = saved
    return by_list, by_heap, by_rounds


RNG = random.Random(0)
LONG = {
    "a": "a" * 1_000_000, "a 5000": "a" * 5000, "a 100k + b": "a" * 100_000 + "b", "ab": "ab" * 50_000,
    "digits": "0123456789" * 10_000, "7": "7" * 100_000, "punct": "-=" * 50_000, "dots": "." * 30_000,
    "dna": "".join(RNG.choices("ACGT", k=100_000)), "letters": "".join(RNG.choices(string.ascii_letters, k=20_000)),
    "base64": "".join(RNG.choices(string.ascii_letters + string.digits + "+/", k=50_000)),
    "mixed": " ".join("x" * RNG.randrange(1, 9000) for _ in range(20)), "é": "é" * 20_000, "日": "日本" * 5000,
}


@pytest.mark.parametrize("name", LONG)
def test_long_runs_match_tiktoken(tiktoken_ref, name):
    text = LONG[name]
    assert ENC.encode_ordinary(text) == tiktoken_ref.encode_ordinary(text)


def test_long_runs_all_paths_agree():
    for text in ["a" * 3000, "ab" * 1500, "0123456789" * 300, "".join(RNG.choices("ACGT", k=3000)),
                 "".join(RNG.choices(string.ascii_lowercase, k=3000)), "é" * 1000]:
        by_list, by_heap, by_rounds = all_paths(text.encode(), ENC.mergeable_ranks, TABLE)
        assert by_list == by_heap == by_rounds


runs = st.lists(st.tuples(st.sampled_from(["a", "b", "ab", "aab", "0", "12", "-", "=-", "é", "xyz", "e", "th"]),
                          st.integers(1, 60)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(runs)
def test_runs_all_paths_agree_hypothesis(units):
    text = "".join(unit * count for unit, count in units).encode()
    by_list, by_heap, by_rounds = all_paths(text, ENC.mergeable_ranks, TABLE)
    assert by_list == by_heap == by_rounds


@settings(max_examples=30, deadline=None)
@given(runs)
def test_runs_match_tiktoken_with_low_thresholds(tiktoken_ref, units):
    """Through Encoding, with every pre-token of 2+ bytes on the heap or rounds path."""
    text = "".join(unit * count for unit, count in units)
    saved = encoding_mod.SHORT_PIECE, encoding_mod.ROUNDS_PIECE
    encoding_mod.SHORT_PIECE, encoding_mod.ROUNDS_PIECE = 1, 8
    try:
        fresh = Encoding("gpt2", GPT2_PATTERN, ENC.mergeable_ranks, ENC.special_tokens)
        fresh._pair_table = TABLE                            # (built once, not per example)
        assert fresh.encode_ordinary(text) == tiktoken_ref.encode_ordinary(text)
    finally:
        encoding_mod.SHORT_PIECE, encoding_mod.ROUNDS_PIECE = saved


def toy_ranks(rng, n_merges):
    """All 256 bytes plus random concatenations of tokens over "abc", ranked in random order (so a
    longer token may rank below its parts' merge, as can happen in any vocabulary)."""
    singles = [bytes([b]) for b in range(256)]
    tokens = list(dict.fromkeys(singles[97:100] + [rng.choice(singles[97:100]) + rng.choice(singles[97:100])]))
    while len(tokens) < n_merges:
        tokens.append(rng.choice(tokens) + rng.choice(tokens))
        tokens = list(dict.fromkeys(tokens))
    order = rng.sample(range(256, 256 + len(tokens)), len(tokens))
    ranks = {b: i for i, b in enumerate(singles)}
    ranks.update((t, r) for t, r in zip(tokens, order) if len(t) > 1)
    return ranks


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32), st.integers(3, 60), st.text(alphabet="abc", min_size=2, max_size=300))
def test_toy_vocabularies_all_paths_agree(seed, n_merges, text):
    ranks = toy_ranks(random.Random(seed), n_merges)
    by_list, by_heap, by_rounds = all_paths(text.encode(), ranks, pair_table(ranks))
    assert by_list == by_heap == by_rounds


def test_round_that_would_make_a_lower_pair_is_left_to_the_heap():
    # "ab" ranks 300, "aba" 256: one at a time, "abab" -> ab|a|b -> aba|b; merging both "ab" at once
    # would give ab|ab. The rounds see the brief pair (ab, a) rank below 300 and hand over.
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 300, b"aba": 256})
    assert all_paths(b"abab", ranks, pair_table(ranks)) == ([256, 98],) * 3
    assert len(bpe_merge(b"ab" * 1000, ranks, pair_table(ranks))) == 1000   # (aba|b) * 500


def test_duplicate_ranks_fall_back_to_the_heap():
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"aa": 300, b"bb": 300})
    assert pair_table(ranks) is None
    by_list, by_heap, by_rounds = all_paths(b"aabbaabb" * 100, ranks, None)
    assert by_list == by_heap == by_rounds


def test_long_pieces_stay_out_of_the_cache():
    fresh = Encoding("gpt2", GPT2_PATTERN, ENC.mergeable_ranks, ENC.special_tokens)
    text = "a" * 10_000 + " b" + " " + "7" * 300
    assert fresh.encode_ordinary(text) == ENC.encode_ordinary(text) == fresh.encode_ordinary(text)
    assert "a" * 10_000 not in fresh._cache and "7" * 300 not in fresh._cache and " b" in fresh._cache
    assert fresh.decode(fresh.encode_ordinary(text)) == text
