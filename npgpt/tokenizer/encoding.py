"""Byte-level BPE encoding by merge rank (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019).

Text is split into pre-tokens by a regex; each pre-token's UTF-8 bytes start as single-byte tokens
and the adjacent pair whose concatenation has the lowest rank is merged, again and again, until no
adjacent pair is in the vocabulary. Ranks are ids, so applying merges "by rank" reproduces the
order in which training learned them. Each pre-token's result is cached (up to 256 characters): natural
text repeats its words, so most pre-tokens are a dictionary lookup. A long pre-token (a run of
letters, digits or punctuation: minified code, base64, DNA) merges in O(n log n), see ``bpe_merge``.

Speed: with the cache warm, the regex split is most of the time. For GPT-2's pattern, ASCII text
is split with an equivalent ASCII-only pattern on Python's ``re`` (about twice as fast as
``regex`` with Unicode classes). The text is first cut into blocks between a non-space and a
space character, where no GPT-2 pre-token can span (see ``_blocks``), and each block takes the
ASCII path when it is pure ASCII.
"""
import functools
import itertools
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


@functools.lru_cache(maxsize=16)
def _compiled(pattern):
    return regex.compile(pattern), (re.compile(GPT2_ASCII_PATTERN) if pattern == GPT2_PATTERN else None)


def pretokenize(text, pattern=GPT2_PATTERN):
    """The pre-tokens of ``text`` under the regex ``pattern``, as one list per block of text.

    For GPT-2's pattern the text is cut into ~16k-character blocks between a non-space and a space
    character (safe, see ``_GPT2_CUT``) and pure-ASCII blocks use ``GPT2_ASCII_PATTERN``; the
    concatenated lists always equal ``regex.findall(pattern, text)``."""
    pat, ascii_pat = _compiled(pattern)
    if ascii_pat is None or len(text) <= 2 * _BLOCK_CHARS:
        yield (ascii_pat if ascii_pat is not None and text.isascii() else pat).findall(text)
        return
    start, n = 0, len(text)
    while start < n:
        m = _GPT2_CUT.search(text, start + _BLOCK_CHARS) if n - start > 2 * _BLOCK_CHARS else None
        end = m.start() if m is not None else n
        block = text[start:end]
        yield (ascii_pat if block.isascii() else pat).findall(block)
        start = end


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
    def _bpe(self, piece):
        """Ids of one pre-token (str), stored in the cache (emptied when it reaches _CACHE_MAX)
        unless longer than _CACHE_PIECE characters (a long run rarely repeats: not worth its memory)."""
        data = piece.encode("utf-8")                 # a lone surrogate raises: see encode_ordinary
        rank = self.mergeable_ranks.get(data)        # a whole pre-token that is a token: no merging
        if rank is not None:
            ids = (rank,)
        else:
            if len(data) > merge.ROUNDS_PIECE and self._pair_table is False:
                self._pair_table = pair_table(self.mergeable_ranks)
            ids = tuple(bpe_merge(data, self.mergeable_ranks, self._pair_table or None))
        if len(piece) <= _CACHE_PIECE:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def _encode_ordinary(self, text):
        cache, out = self._cache, []
        get = cache.get
        expect_new = True                            # did the last block bring new pre-tokens?
        for pieces in pretokenize(text, self.pattern):
            ids = None if expect_new else list(map(get, pieces))   # most pre-tokens repeat: one lookup
            if ids is None or None in ids:
                new = set(pieces).difference(cache)  # each new pre-token once, then look all up
                uncached = {}                        # long ones, which _bpe does not cache
                for p in new:
                    ids = self._bpe(p)
                    if len(p) > _CACHE_PIECE:
                        uncached[p] = ids
                expect_new = bool(new)
                ids = list(map(get, pieces))
                if None in ids:                      # not cached (long), or the cache was emptied
                    ids = [t if t is not None else uncached[p] if p in uncached else self._bpe(p)
                           for t, p in zip(ids, pieces)]
            out.extend(itertools.chain.from_iterable(ids))
        return out

    def encode_ordinary(self, text):
        """Ids of ``text`` with special-token strings treated as plain text. As in tiktoken, text that
        is not valid Unicode (lone surrogates) is first round-tripped through UTF-16 with U+FFFD
        replacement."""
        try:
            return self._encode_ordinary(text)
        except UnicodeEncodeError:
            return self._encode_ordinary(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

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
