"""Character-level tokenizer: one id per distinct character (the char-level Shakespeare setup of
Karpathy's nanoGPT / char-rnn). ``from_text`` orders the vocabulary by code point."""
import numpy as np

__all__ = ["CharTokenizer"]


class CharTokenizer:
    """``CharTokenizer(chars)``: character ``chars[i]`` has id i. No special tokens (eot_token None)."""

    eot_token = None

    def __init__(self, chars):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer needs distinct single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._order = np.argsort(codes, kind="stable")     # ids sorted by code point
        self._codes = codes[self._order]

    @classmethod
    def from_text(cls, text):
        """The vocabulary of ``text``: its distinct characters, sorted by code point."""
        return cls(sorted(set(text)))

    @property
    def n_vocab(self):
        return len(self.chars)

    def _unknown(self, text):
        unknown = sorted(set(text) - set(self.stoi))
        return ValueError(f"characters not in the vocabulary: {''.join(unknown[:20])!r}"
                          f"{' ...' if len(unknown) > 20 else ''} ({len(unknown)} in all); the tokenizer knows "
                          f"{len(self.chars)} characters: prepare the data with this text included")

    def encode(self, text, **_):
        """List of ids, one per character of ``text``."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            raise self._unknown(text) from None

    encode_ordinary = encode

    def encode_array(self, text):
        """The ids of ``text`` as a uint32 array of shape (len(text),), by a vectorized lookup."""
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)  # (N,)
        if len(codes) == 0:
            return np.zeros(0, dtype=np.uint32)
        if len(self._codes) == 0:
            raise self._unknown(text)
        pos = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)    # (N,)
        if not np.array_equal(self._codes[pos], codes):
            raise self._unknown(text)
        return self._order[pos].astype(np.uint32)

    def decode(self, ids):
        """The text of ``ids`` (any iterable of ints in [0, n_vocab))."""
        ids = [int(i) for i in ids]
        if any(not 0 <= i < len(self.chars) for i in ids):
            bad = next(i for i in ids if not 0 <= i < len(self.chars))
            raise ValueError(f"token id {bad} is out of range for a {len(self.chars)}-character vocabulary")
        return "".join([self.chars[i] for i in ids])
