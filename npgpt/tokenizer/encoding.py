"""Byte-level BPE encoding by merge rank (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019).

Text is split into pre-tokens by a regex; each pre-token's UTF-8 bytes start as single-byte tokens
and the adjacent pair whose concatenation has the lowest rank is merged, again and again, until no
adjacent pair is in the vocabulary. Ranks are ids, so applying merges "by rank" reproduces the
order in which training learned them. Each pre-token's result is cached (up to 256 characters): natural
text repeats its words, so most pre-tokens are a dictionary lookup. A long pre-token (a run of
letters, digits or punctuation: minified code, base64, DNA) merges in O(n log n), see ``bpe_merge``.

Speed (``benchmarks/bench_tokenizer.py``; a fresh encoder must be fast too, as tiktoken keeps no
cache). For GPT-2's pattern, ASCII text is split with an equivalent ASCII-only pattern on Python's
``re`` (about twice as fast as ``regex`` with Unicode classes): the text is cut into blocks between
a non-space and a space character, where no GPT-2 pre-token can span (``_GPT2_CUT``), and each
block takes the ASCII path when it is pure ASCII. Pre-tokens are then handled ~1 MB of text at a
time: one cache lookup each (a C loop), and the batch's new pre-tokens together -- one rank lookup
for those that are a token (most words), and for the rest the merge loop run for all of them at
once as NumPy steps (``merge.bpe_merge_batch``).
"""
import functools
import gc
import itertools
import operator
import re

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
GPT2_ASCII_PATTERN = (r"'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\t\n\x0b\x0c\r A-Za-z0-9]+"
                      r"|[\t\n\x0b\x0c\r ]+(?![^\t\n\x0b\x0c\r ])|[\t\n\x0b\x0c\r ]+")
# A point between a non-space and a space character: every GPT-2 pre-token holding the non-space
# ends there (only the whitespace alternatives contain spaces, and they start with one), no
# alternative's choice depends on a character it cannot match, and matching needs no look-behind,
# so the text on either side tokenizes on its own exactly as within the whole text.
_GPT2_CUT = regex.compile(r"(?<=\S)(?=\s)")
_BLOCK_CHARS = 1 << 14
_CACHE_MAX = 500_000
_CACHE_PIECE = 256
_BATCH_CHARS = 1 << 20            # text per batch of pre-tokens (~270k of them, ~20 MB of objects)
_BATCH_MIN = 64                   # new pieces merged together by NumPy (fewer: one by one)


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
    for start, end in _cuts(text, _BATCH_CHARS):
        yield list(itertools.chain.from_iterable(pretokenize(text[start:end], pattern)))


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
        self._cache = {}                             # pre-token str -> tuple of ids
        self._pair_table = False                     # built by the first long pre-token
        self._span_table = None                      # built by the first batch of new pre-tokens

    def add_decodings(self, id_to_bytes):
        """Ids that decode to bytes but are never produced by encoding (a trained vocabulary can
        spell the same bytes by two merges; encoding uses the lower id)."""
        self.decoder.update(id_to_bytes)
        self._n_vocab = max(self.decoder) + 1

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
        """Encode ``pieces``, pre-tokens not in the cache, into the cache; returns None, or when some
        do not go there (longer than _CACHE_PIECE characters: a long run rarely repeats; or more than
        the cache holds, _CACHE_MAX) {piece: tuple of ids} of all.

        A piece that is a token is one lookup (most words are). The others merge together by
        ``bpe_merge_batch`` when there are many (a fresh cache meeting a new text), else one by one;
        a piece over ``SHORT_PIECE`` bytes merges alone in O(n log n) (``bpe_merge``)."""
        ranks, cache = self.mergeable_ranks, self._cache
        pieces = list(pieces)
        data = [piece.encode("utf-8") for piece in pieces]    # a lone surrogate raises: see encode_ordinary
        ranked = list(map(ranks.get, data))                     # the piece's rank if it is a token
        rest = list(itertools.compress(zip(pieces, data), map(operator.is_, ranked, itertools.repeat(None))))
        short = [(piece, d) for piece, d in rest if len(d) <= merge.SHORT_PIECE]
        if len(short) >= _BATCH_MIN:
            if self._span_table is None:
                self._span_table = merge.span_table(ranks)
            merged = merge.bpe_merge_batch([d for _, d in short], ranks, self._span_table)
        else:
            merged = [bpe_merge(d, ranks) for _, d in short]
        merged = zip([piece for piece, _ in short], map(tuple, merged))
        long = [(piece, d) for piece, d in rest if len(d) > merge.SHORT_PIECE]
        for piece, d in long:
            if len(d) > merge.ROUNDS_PIECE and self._pair_table is False:
                self._pair_table = pair_table(ranks)
        long = [(piece, tuple(bpe_merge(d, ranks, self._pair_table or None))) for piece, d in long]
        if len(cache) + len(pieces) <= _CACHE_MAX and max(map(len, pieces), default=0) <= _CACHE_PIECE:
            cache.update(zip(pieces, zip(ranked)))   # (rank,) ... then the merged pieces' ids over
            cache.update(merged)                     # their (None,)
            cache.update(long)
            return None
        found = dict(zip(pieces, zip(ranked)))
        found.update(merged)
        found.update(long)
        cache.update(item for item in found.items() if len(item[0]) <= _CACHE_PIECE and len(cache) < _CACHE_MAX)
        return found

    def _encode_ordinary(self, text):
        """Pre-tokens in batches of about _BATCH_CHARS characters. A batch whose pre-tokens are all
        cached is one C loop (``map`` of the cache lookup, chained onto the output; a miss stops it
        with a TypeError). Otherwise the batch's new pre-tokens (a set difference) are encoded
        together first; when the cache is full it is emptied first."""
        out, cache = [], self._cache
        get = cache.get
        for pieces in _batches(text, self.pattern):
            done = len(out)
            try:
                out += itertools.chain.from_iterable(map(get, pieces))
                continue
            except TypeError:                        # None: a pre-token not in the cache
                del out[done:]
            new = set(pieces).difference(cache)
            if len(cache) + len(new) > _CACHE_MAX:
                cache.clear()
                new = set(pieces)
            found = self._encode_new(new)
            if found is None:                        # all in the cache now
                out += itertools.chain.from_iterable(map(get, pieces))
            else:                                    # long pieces, or more than the cache holds
                out += itertools.chain.from_iterable(map(found.get, pieces, map(get, pieces)))
        return out

    def encode_ordinary(self, text):
        """Ids of ``text`` with special-token strings treated as plain text. As in tiktoken, text that
        is not valid Unicode (lone surrogates) is first round-tripped through UTF-16 with U+FFFD
        replacement.

        The cyclic garbage collector is paused meanwhile: encoding new pre-tokens makes tens of
        thousands of tuples, and each 700 would start a collection that walks the live containers,
        the output list among them (a fresh encoder met the 5 MB corpus ~10-15 % faster without them);
        nothing made here can form a reference cycle."""
        enabled = gc.isenabled()
        gc.disable()
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
