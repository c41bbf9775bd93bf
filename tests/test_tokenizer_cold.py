"""The cache of GPT-2 encoding as tables (``_SpanCache.encode``): each cached pre-token has a row
(a span of ids), found by one ``dict.setdefault`` pass that also numbers the new pre-tokens. Checked
against tiktoken: short text all cached (``_SpanCache.cached``, a Python copy of the rows synced after
big batches), a lone surrogate in the middle of a batch (the numbers it left are taken back),
threads sharing one encoder, a pickled encoder; and ``bpe_merge_spans`` against the list loop.
Speed: benchmarks/bench_tokenizer.py."""
import pickle
import threading

from hypothesis import given, settings, strategies as st

from npgpt.data import bundled_corpus_path
from npgpt.tokenizer import GPT2_PATTERN, get_encoding
from npgpt.tokenizer import encoding as encoding_mod
from npgpt.tokenizer.encoding import Encoding
from npgpt.tokenizer.merge import bpe_merge, bpe_merge_spans, span_table

ENC = get_encoding("gpt2")
RANKS = ENC.mergeable_ranks
TABLE = span_table(RANKS)
TEXT = open(bundled_corpus_path(), encoding="utf-8").read()[:200_000]


def fresh():
    return Encoding("gpt2", GPT2_PATTERN, RANKS, ENC.special_tokens)


def rows_are_consistent(enc):
    """Every cached pre-token's number is a row of the tables, and the rows hold its ids."""
    cache = enc._pieces
    for piece, row in cache.rows.items():
        assert 0 <= row < len(cache.starts), (piece, row)
        ids = cache.ids[cache.starts[row]:cache.starts[row] + cache.counts[row]].tolist()
        assert ids == ENC.encode_ordinary(piece), piece


def test_short_text_after_big_batches_matches_tiktoken(tiktoken_ref):
    enc = fresh()
    lines = TEXT.splitlines(keepends=True)[:300]
    assert enc.encode_ordinary(TEXT) == tiktoken_ref.encode_ordinary(TEXT)    # rows from big batches
    for line in lines:                                # short, all cached: the Python rows, synced
        assert enc.encode_ordinary(line) == tiktoken_ref.encode_ordinary(line)
    assert len(enc._pieces.row_ids) == len(enc._pieces.starts)
    extra = "Zebras quixotically juggle 12345 xylophones."     # new rows after the sync, then short again
    assert enc.encode_ordinary(extra * 40) == tiktoken_ref.encode_ordinary(extra * 40)
    for text in [extra, TEXT[:500], "\n\n", ""]:
        assert enc.encode_ordinary(text) == tiktoken_ref.encode_ordinary(text)
    rows_are_consistent(enc)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["Hello", " world", "\ud800", " lone", "é", "  ", "\n", "日本", "'s",
                                 " supercalifragilistic", "x" * 300]), max_size=40).map("".join))
def test_lone_surrogates_leave_no_numbers_behind(tiktoken_ref, text):
    enc = fresh()
    for _ in range(2):
        assert enc.encode_ordinary(text) == tiktoken_ref.encode_ordinary(text)
        assert enc.encode_ordinary(text * 30) == tiktoken_ref.encode_ordinary(text * 30)
    rows_are_consistent(enc)
    assert "x" * 300 not in enc._cache


def test_threads_sharing_one_encoder(tiktoken_ref, monkeypatch):
    monkeypatch.setattr(encoding_mod, "_BATCH_CHARS", 1 << 12)      # many batches, each with new pieces
    enc = fresh()
    chunks = [TEXT[k * 20_000:(k + 1) * 20_000] for k in range(8)]
    results = [None] * len(chunks)

    def work(k):
        results[k] = enc.encode_ordinary(chunks[k])
    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tiktoken_ref.encode_ordinary(c) for c in chunks]
    rows_are_consistent(enc)


def test_pickled_encoder_encodes_the_same(tiktoken_ref):
    enc = fresh()
    enc.encode_ordinary(TEXT[:5000])
    copy = pickle.loads(pickle.dumps(enc))
    assert copy.encode_ordinary(TEXT[:20_000]) == enc.encode_ordinary(TEXT[:20_000]) \
        == tiktoken_ref.encode_ordinary(TEXT[:20_000])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=300))
def test_merge_spans_equal_the_list_loop(pieces):
    ids, starts, counts = bpe_merge_spans(pieces, RANKS, TABLE)
    assert [ids[s:s + n].tolist() for s, n in zip(starts, counts)] == [bpe_merge(p, RANKS) for p in pieces]

