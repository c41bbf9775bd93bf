"""Byte-level BPE encoding by merge rank (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019).

Text is split into pre-tokens by a regex; each pre-token's UTF-8 bytes start as single-byte tokens
and the adjacent pair whose concatenation has the lowest rank is merged, again and again, until no
adjacent pair is in the vocabulary. Ranks are ids, so applying merges "by rank" reproduces the
order in which training learned them. Each pre-token's result is cached: natural text repeats its
words, so most pre-tokens are a dictionary lookup.
"""
import regex

__all__ = ["Encoding", "GPT2_PATTERN", "GPT4_PATTERN"]

# GPT-2's pre-tokenizer: contractions, optional space + letters, optional space + digits, optional
# space + other symbols, whitespace not followed by a non-space (so " word" keeps its space), whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (cl100k_base): case-insensitive contractions, 1-3 digit numbers, newlines grouped.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                r"""\s*[\r\n]|\s+(?!\S)|\s+""")


_NONE = float("inf")


def bpe_merge(piece, ranks):
    """Token ids of one pre-token ``piece`` (bytes) under ``ranks`` (bytes -> id), lowest rank first.

    ``pair_ranks[i]`` is the rank of parts[i] + parts[i+1] (inf if not a token); after a merge only
    the two pairs touching the merged part change."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    get = ranks.get
    pair_ranks = [get(parts[i] + parts[i + 1], _NONE) for i in range(len(parts) - 1)]
    while pair_ranks:
        best = min(pair_ranks)
        if best == _NONE:
            break
        i = pair_ranks.index(best)                   # leftmost pair of the lowest rank
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i < len(parts) - 1:
            pair_ranks[i] = get(parts[i] + parts[i + 1], _NONE)
        if i > 0:
            pair_ranks[i - 1] = get(parts[i - 1] + parts[i], _NONE)
    return [ranks[p] for p in parts]


class Encoding:
    """A tiktoken-compatible encoder: ``encode``, ``encode_ordinary``, ``decode``, ``decode_bytes``,
    ``encode_batch``, ``n_vocab``, ``eot_token``.

    mergeable_ranks: bytes -> id for every regular token (all 256 single bytes included);
    special_tokens: str -> id (e.g. {"<|endoftext|>": 50256}).
    """

    def __init__(self, name, pattern, mergeable_ranks, special_tokens=None):
        self.name = name
        self.pattern = pattern
        self._pat = regex.compile(pattern)
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = dict(special_tokens or {})
        missing = [b for b in range(256) if bytes([b]) not in self.mergeable_ranks]
        if missing:
            raise ValueError(f"the vocabulary lacks {len(missing)} single bytes (e.g. {missing[:5]}); "
                             f"byte-level BPE needs all 256")
        self.decoder = {i: b for b, i in self.mergeable_ranks.items()}
        for s, i in self.special_tokens.items():
            self.decoder[i] = s.encode("utf-8")
        self._special_pat = (regex.compile("|".join(regex.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)))
                             if self.special_tokens else None)
        self._cache = {}

    def __repr__(self):
        return f"<Encoding {self.name!r} n_vocab={self.n_vocab}>"

    @property
    def n_vocab(self):
        return max(self.decoder) + 1

    @property
    def eot_token(self):
        return self.special_tokens.get("<|endoftext|>")

    # ---- encoding ----------------------------------------------------------------------------------
    def encode_ordinary(self, text):
        """Ids of ``text`` with special-token strings treated as plain text."""
        cache, ranks, out = self._cache, self.mergeable_ranks, []
        for piece in self._pat.findall(text):
            ids = cache.get(piece)
            if ids is None:
                b = piece.encode("utf-8", errors="surrogatepass")
                r = ranks.get(b)
                ids = (r,) if r is not None else tuple(bpe_merge(b, ranks))
                if len(cache) < 500_000:
                    cache[piece] = ids
            out += ids
        return out

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """Ids of ``text``. Special tokens in ``allowed_special`` ("all" or a set) become their ids;
        one in ``disallowed_special`` (default: every special not allowed) raises ValueError, as
        tiktoken does, so text from users cannot smuggle in control tokens."""
        specials = set(self.special_tokens)
        allowed = specials if allowed_special == "all" else set(allowed_special)
        disallowed = specials - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed:
            found = regex.search("|".join(regex.escape(s) for s in disallowed), text)
            if found:
                raise ValueError(
                    f"Encountered text corresponding to disallowed special token {found.group()!r}.\n"
                    f"If you want this text to be encoded as a special token, pass it to `allowed_special`, "
                    f"e.g. `allowed_special={{{found.group()!r}, ...}}`.\nIf you want this text to be encoded "
                    f"as normal text, disable the check for this token by passing "
                    f"`disallowed_special=(enc.special_tokens_set - {{{found.group()!r}}})`.\n"
                    f"To disable this check for all special tokens, pass `disallowed_special=()`.")
        if not allowed:
            return self.encode_ordinary(text)
        pat = regex.compile("|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)))
        out, start = [], 0
        for m in pat.finditer(text):
            out += self.encode_ordinary(text[start:m.start()])
            out.append(self.special_tokens[m.group()])
            start = m.end()
        out += self.encode_ordinary(text[start:])
        return out

    @property
    def special_tokens_set(self):
        return set(self.special_tokens)

    def encode_batch(self, texts, allowed_special=frozenset(), disallowed_special="all"):
        return [self.encode(t, allowed_special, disallowed_special) for t in texts]

    # ---- decoding ----------------------------------------------------------------------------------
    def decode_bytes(self, ids):
        """The bytes of a token sequence (special tokens included as their text)."""
        try:
            return b"".join(self.decoder[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary (n_vocab={self.n_vocab})") from None

    def decode(self, ids, errors="replace"):
        """The text of a token sequence; a partial UTF-8 character becomes U+FFFD (errors="replace")."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_single_token_bytes(self, i):
        return self.decode_bytes([i])
