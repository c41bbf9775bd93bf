"""Byte-level BPE encoding by merge rank (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019).

Text is split into pre-tokens by a regex; each pre-token's UTF-8 bytes start as single-byte tokens
and the adjacent pair whose concatenation has the lowest rank is merged, again and again, until no
adjacent pair is in the vocabulary. Ranks are ids, so applying merges "by rank" reproduces the
order in which training learned them. Each pre-token's result is cached (up to 256 characters): natural
text repeats its words, so most pre-tokens are a dictionary lookup. A long pre-token (a run of
letters, digits or punctuation: minified code, base64, DNA) merges in O(n log n), see ``bpe_merge``.

Speed (``benchmarks/bench_tokenizer.py``; a fresh encoder must be fast too, as tiktoken keeps no
cache). For GPT-2's pattern, ASCII text is split by an equivalent ASCII-only pattern on Python's
``re`` (about twice as fast as ``regex``), other text in blocks cut where no pre-token can span
(``_GPT2_CUT``). ~1 MB of pre-tokens at a time, one C loop (``dict.setdefault``) both looks each up
in the cache and numbers the new ones (``_SpanCache.encode``); the new ones are encoded together (a
rank lookup for those that are a token, most words; for the rest the merge loop for all at once as
NumPy steps, ``merge.bpe_merge_spans``), and all ids are gathered from the cache's tables by NumPy.
"""
import functools
import gc
import itertools
import re
import threading

import numpy as np
import regex

from . import merge
from .merge import bpe_merge, pair_table

__all__ = ["Encoding", "GPT2_PATTERN", "GPT4_PATTERN", "pretokenize", "bpe_merge"]

# GPT-2's pre-tokenizer: contractions, optional space + letters, optional space + digits, optional
# space + other symbols, whitespace not followed by a non-space (so " word" keeps its space), whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (cl100k_base): case-insensitive contractions, 1-3 digit numbers, newlines grouped.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                r"""\s*[\r\n]|\s+(?!\S)|\s+""")


# The same pattern restricted to ASCII text, where (checked over all 128 characters in the tests)
# \p{L} = [A-Za-z], \p{N} = [0-9] and \s = [\t\n\x0b\x0c\r ] (not re's \s, which adds \x1c-\x1f).
# Reordered for ``re``, which skips an alternative whose first character cannot match: " ?X+" split
# in two ("X+", " X+"), the most frequent first. At a position at most one alternative can match
# (the contraction before punctuation, as in the original; whitespace last), so the pre-tokens are
# the same; ~10 % faster on the bundled corpus.
GPT2_ASCII_PATTERN = (r" [A-Za-z]+|[A-Za-z]+|'(?:[sdmt]|ll|ve|re)|[^\t\n\x0b\x0c\r A-Za-z0-9]+|[0-9]+| [0-9]+"
                      r"| [^\t\n\x0b\x0c\r A-Za-z0-9]+|[\t\n\x0b\x0c\r ]+(?![^\t\n\x0b\x0c\r ])|[\t\n\x0b\x0c\r ]+")
# A point between a non-space and a space character: every GPT-2 pre-token holding the non-space
# ends there (only the whitespace alternatives contain spaces, and they start with one), no
# alternative's choice depends on a character it cannot match, and matching needs no look-behind,
# so the text on either side tokenizes on its own exactly as within the whole text.
_GPT2_CUT = regex.compile(r"(?<=\S)(?=\s)")
_BLOCK_CHARS = 1 << 14
_CACHE_MAX = 500_000
_CACHE_PIECE = 256
_CACHE_IDS = 4 * _CACHE_MAX             # ids in the tables (long pieces' ids stay until emptied)
_BATCH_CHARS = 1 << 20            # text per batch of pre-tokens (~270k of them, ~20 MB of objects)
_BATCH_MIN = 64                   # new pieces merged together by NumPy (fewer: one by one)
_FEW_CHARS = 1024                 # shorter text, all cached, skips NumPy (``_SpanCache.cached``)


@functools.lru_cache(maxsize=16)
def _compiled(pattern):
    return regex.compile(pattern), (re.compile(GPT2_ASCII_PATTERN) if pattern == GPT2_PATTERN else None)


def _cuts(text, size):
    """(start, end) of consecutive pieces of ``text`` of about ``size`` characters (at least ``size``,
    under 2 * ``size`` for the last), cut at ``_GPT2_CUT`` points (a piece runs on while it has none)."""
    start, n = 0, len(text)
    while start < n:
        m = _GPT2_CUT.search(text, start + size) if n - start > 2 * size else None
        end = m.start() if m is not None else n
        yield start, end
        start = end


def pretokenize(text, pattern=GPT2_PATTERN):
    """The pre-tokens of ``text`` under the regex ``pattern``, as one list per block of text.

    For GPT-2's pattern the text is cut into ~16k-character blocks between a non-space and a space
    character (safe, see ``_GPT2_CUT``) and pure-ASCII blocks use ``GPT2_ASCII_PATTERN``; the
    concatenated lists always equal ``regex.findall(pattern, text)``."""
    pat, ascii_pat = _compiled(pattern)
    if ascii_pat is None:
        yield pat.findall(text)
        return
    for start, end in _cuts(text, _BLOCK_CHARS):
        block = text[start:end]
        yield (ascii_pat if block.isascii() else pat).findall(block)


def _batches(text, pattern):
    """The pre-tokens of ``text`` as lists for about _BATCH_CHARS characters each (GPT-2's pattern;
    other patterns: one list)."""
    if pattern != GPT2_PATTERN:
        yield sum(pretokenize(text, pattern), [])
        return
    ascii_pat = _compiled(pattern)[1]
    for start, end in _cuts(text, _BATCH_CHARS):
        batch = text[start:end]
        if batch.isascii():                          # one findall (blocks only to find non-ASCII ones)
            yield ascii_pat.findall(batch)
        else:
            yield list(itertools.chain.from_iterable(pretokenize(batch, pattern)))


class _SpanCache:
    """The pre-token cache: str -> ids, as rows of flat tables: the string with row r
    (``rows[string]``) has the ids ``ids[starts[r]:starts[r] + counts[r]]``. (Lookups are bound by
    memory latency: keys of several pre-tokens made fewer lookups but more keys, and were slower.)"""

    def __init__(self):
        self.clear()

    def clear(self):
        self.rows = {}
        self.ids = self.starts = self.counts = np.zeros(0, np.int64)
        self.row_ids = []                            # tuple of each row's ids, for ``cached``

    def encode(self, keys, encode_new):
        """(ids of ``keys``, one array; each key's number of ids); ``encode_new(new keys)`` gives the
        new keys' (ids, starts, counts). One C loop gives each key a number: ``rows.setdefault(key,
        n_rows + i)`` returns a cached key's row (< n_rows, the tables' length) and stores n_rows + i
        for a new one, so the first occurrences of the new keys are the i whose number is n_rows + i:
        one pass both looks up and deduplicates. The new keys are encoded together and appended to
        the tables as rows n_rows, n_rows + 1, ..., and each occurrence's number becomes its row.
        The ids are then gathered from the tables by NumPy indexing. Over _CACHE_MAX keys the cache
        is emptied."""
        cache, n_rows, n = self.rows, len(self.starts), len(keys)
        try:
            codes = np.fromiter(map(cache.setdefault, keys, itertools.count(n_rows)), np.int64, n)
            first = np.flatnonzero(codes == np.arange(n_rows, n_rows + n))    # first occurrences of new keys
            if len(first):
                new = list(map(keys.__getitem__, first.tolist()))
                ids, starts, counts = encode_new(new)
                cache.update(zip(new, range(n_rows, n_rows + len(new))))
                tables = (np.concatenate((self.ids, ids)), np.concatenate((self.starts, starts + len(self.ids))),
                          np.concatenate((self.counts, counts)))
        except BaseException:                        # (a lone surrogate: encode_ordinary retries)
            for key in [key for key, code in cache.items() if code >= n_rows]:
                del cache[key]                       # numbers that are not rows in the tables
            raise
        if len(first):
            self.ids, self.starts, self.counts = tables
            if max(map(len, new)) > _CACHE_PIECE:   # a long run rarely repeats: not kept (its row
                for key in new:                      # stays until the cache is emptied)
                    if len(key) > _CACHE_PIECE:
                        del cache[key]
            is_new = codes >= n_rows
            row_of = np.empty(n, np.int64)           # first occurrence -> its row
            row_of[first] = np.arange(n_rows, n_rows + len(new))
            codes[is_new] = row_of[codes[is_new] - n_rows]
        ids, starts, counts = self.ids, self.starts[codes], self.counts[codes]
        if len(cache) > _CACHE_MAX or len(ids) > _CACHE_IDS:
            self.clear()
        ends = np.cumsum(counts)
        if not n or ends[-1] == n:                   # one id each
            return ids[starts], counts
        return ids[np.repeat(starts - ends + counts, counts) + np.arange(ends[-1])], counts

    def cached(self, keys):
        """For short text, where NumPy's per-call cost would dominate: the ids of ``keys``, all cached
        (else KeyError), as a list, by C loops over a Python list of each row's ids (synced from the
        tables when behind)."""
        rows = list(map(self.rows.__getitem__, keys))
        row_ids, done = self.row_ids, len(self.row_ids)
        if done < len(self.starts):
            begin = int(self.starts[done:].min())   # (a batch's rows start anywhere in its ids)
            ids = self.ids[begin:].tolist()
            starts = (self.starts[done:] - begin).tolist()
            row_ids += [tuple(ids[s:s + n]) for s, n in zip(starts, self.counts[done:].tolist())]
        return list(itertools.chain.from_iterable(map(row_ids.__getitem__, rows)))


class Encoding:
    """A tiktoken-compatible encoder: ``encode``, ``encode_ordinary``, ``decode``, ``decode_bytes``,
    ``encode_batch``, ``n_vocab``, ``eot_token``.

    mergeable_ranks: bytes -> id for every regular token (all 256 single bytes included);
    special_tokens: str -> id (e.g. {"<|endoftext|>": 50256}).
    """

    def __init__(self, name, pattern, mergeable_ranks, special_tokens=None):
        self.name = name
        self.pattern = pattern
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = dict(special_tokens or {})
        missing = [b for b in range(256) if bytes([b]) not in self.mergeable_ranks]
        if missing:
            raise ValueError(f"the vocabulary lacks {len(missing)} single bytes (e.g. {missing[:5]}); "
                             f"byte-level BPE needs all 256")
        self.decoder = {i: b for b, i in self.mergeable_ranks.items()}
        for s, i in self.special_tokens.items():
            self.decoder[i] = s.encode("utf-8")
        self._n_vocab = max(self.decoder) + 1
        self._pieces = _SpanCache()                  # pre-token -> ids
        self._lock = threading.Lock()                # one encode at a time: the cache holds placeholders
        self._pair_table = False                     # built by the first long pre-token
        self._span_table = merge.span_table(self.mergeable_ranks)   # for merging new pre-tokens together
        top = max(self.mergeable_ranks.values()) + 1   # the output's ints, made once (not one per token)
        self._id_objects = np.arange(top).astype(object) if top <= 1 << 22 else None

    def add_decodings(self, id_to_bytes):
        """Ids that decode to bytes but are never produced by encoding (a trained vocabulary can
        spell the same bytes by two merges; encoding uses the lower id)."""
        self.decoder.update(id_to_bytes)
        self._n_vocab = max(self.decoder) + 1

    def __getstate__(self):                          # (pickling: a lock cannot be pickled)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self):
        return f"<Encoding {self.name!r} n_vocab={self.n_vocab}>"

    @property
    def n_vocab(self):
        """One more than the largest id (tiktoken's definition)."""
        return self._n_vocab

    @property
    def eot_token(self):
        return self.special_tokens.get("<|endoftext|>")

    @property
    def special_tokens_set(self):
        return set(self.special_tokens)

    # ---- encoding ----------------------------------------------------------------------------------
    def _encode_new(self, pieces):
        """The ids of ``pieces`` (new pre-tokens, distinct) as spans of one array: (ids, starts, counts).
        A piece that is a token is one lookup (most words are): ``ids`` starts with those ranks (-1
        for the others). The others merge together by ``bpe_merge_spans`` when there are many (a
        fresh cache meeting a new text), else one by one, as does a piece over ``SHORT_PIECE`` bytes
        (O(n log n), ``bpe_merge``); their ids follow."""
        ranks, n = self.mergeable_ranks, len(pieces)
        data = list(map(str.encode, pieces))        # UTF-8; a lone surrogate raises: see encode_ordinary
        ranked = np.fromiter(map(ranks.get, data, itertools.repeat(-1)), np.int64, n)
        starts, counts = np.arange(n), np.ones(n, np.int64)
        rest = np.flatnonzero(ranked < 0)
        if not len(rest):
            return ranked, starts, counts
        rest_data = list(map(data.__getitem__, rest.tolist()))
        is_short = np.fromiter(map(len, rest_data), np.int64, len(rest)) <= merge.SHORT_PIECE
        out, one_by_one = [ranked], rest.tolist()
        if is_short.sum() >= _BATCH_MIN:
            short, one_by_one = rest[is_short], rest[~is_short].tolist()
            short_data = rest_data if is_short.all() else list(itertools.compress(rest_data, is_short))
            short_ids, short_starts, counts[short] = merge.bpe_merge_spans(short_data, ranks, self._span_table)
            starts[short] = short_starts + n
            out.append(short_ids)
        if self._pair_table is False and any(len(data[i]) > merge.ROUNDS_PIECE for i in one_by_one):
            self._pair_table = pair_table(ranks)
        merged = [bpe_merge(data[i], ranks, self._pair_table or None) for i in one_by_one]
        if merged:
            merged_counts = np.fromiter(map(len, merged), np.int64, len(merged))
            starts[one_by_one] = sum(map(len, out)) + np.cumsum(merged_counts) - merged_counts
            counts[one_by_one] = merged_counts
            out.append(np.fromiter(itertools.chain.from_iterable(merged), np.int64, int(merged_counts.sum())))
        return np.concatenate(out), starts, counts

    @property
    def _cache(self):
        """The cached pre-tokens (str -> row)."""
        return self._pieces.rows

    def _encode_ordinary(self, text):
        """Pre-tokens in batches of about _BATCH_CHARS characters (``_batches``), each one lookup in
        the cache (``_SpanCache.encode``); short text that is all cached: ``_SpanCache.cached``."""
        if len(text) <= _FEW_CHARS:
            pieces = sum(pretokenize(text, self.pattern), [])
            try:
                return self._pieces.cached(pieces)
            except KeyError:
                return self._pieces.encode(pieces, self._encode_new)[0].tolist()
        ids = [self._pieces.encode(pieces, self._encode_new)[0] for pieces in _batches(text, self.pattern)]
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        return (ids if self._id_objects is None else self._id_objects.take(ids)).tolist()

    def encode_ordinary(self, text):
        """Ids of ``text`` with special-token strings treated as plain text. As in tiktoken, text that
        is not valid Unicode (lone surrogates) is first round-tripped through UTF-16 with U+FFFD
        replacement.

        The cyclic garbage collector is paused meanwhile (each 700 new containers, e.g. the merge
        loops' lists, would walk all live ones; none made here forms a cycle). One thread encodes at a
        time (a lock): during a batch the cache holds numbers that are not rows yet."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            with self._lock:
                try:
                    return self._encode_ordinary(text)
                except UnicodeEncodeError:
                    return self._encode_ordinary(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
        finally:
            if enabled:
                gc.enable()

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """Ids of ``text``. Special tokens in ``allowed_special`` ("all" or a set) become their ids;
        one in ``disallowed_special`` (default: every special not allowed) raises ValueError, as
        tiktoken does, so text from users cannot smuggle in control tokens."""
        specials = set(self.special_tokens)
        allowed = specials if allowed_special == "all" else set(allowed_special)
        disallowed = specials - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed:
            found = _alternation(frozenset(disallowed)).search(text)
            if found:
                raise ValueError(
                    f"Encountered text corresponding to disallowed special token {found.group()!r}.\n"
                    f"If you want this text to be encoded as a special token, pass it to `allowed_special`, "
                    f"e.g. `allowed_special={{{found.group()!r}, ...}}`.\nIf you want this text to be encoded "
                    f"as normal text, disable the check for this token by passing "
                    f"`disallowed_special=(enc.special_tokens_set - {{{found.group()!r}}})`.\n"
                    f"To disable this check for all special tokens, pass `disallowed_special=()`.")
        allowed &= specials                          # strings that are not special tokens are ignored
        if not allowed:
            return self.encode_ordinary(text)
        out, start = [], 0
        for m in _alternation(frozenset(allowed)).finditer(text):   # ordinary text between allowed specials
            out += self.encode_ordinary(text[start:m.start()])
            out.append(self.special_tokens[m.group()])
            start = m.end()
        out += self.encode_ordinary(text[start:])
        return out

    def encode_batch(self, texts, *, num_threads=None, allowed_special=frozenset(), disallowed_special="all"):
        """``[encode(t) for t in texts]``; tiktoken's signature, but one thread (``num_threads`` is
        accepted and ignored: pure Python gains nothing from threads, and the cache is shared)."""
        return [self.encode(t, allowed_special, disallowed_special) for t in texts]

    def encode_ordinary_batch(self, texts, *, num_threads=None):
        return [self.encode_ordinary(t) for t in texts]

    # ---- decoding ----------------------------------------------------------------------------------
    def decode_bytes(self, ids):
        """The bytes of a token sequence (ints or NumPy integers; special tokens as their text)."""
        try:
            return b"".join(map(self.decoder.__getitem__, ids))
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary (n_vocab={self.n_vocab})") from None

    def decode(self, ids, errors="replace"):
        """The text of a token sequence; a partial UTF-8 character becomes U+FFFD (errors="replace")."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_batch(self, batch, *, errors="replace", num_threads=None):
        return [self.decode(ids, errors) for ids in batch]

    def decode_single_token_bytes(self, i):
        return self.decode_bytes([i])


@functools.lru_cache(maxsize=64)
def _alternation(tokens):
    """A regex matching any of the literal strings ``tokens`` (longest first)."""
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))
