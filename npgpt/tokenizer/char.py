"""Character-level tokenizer: one id per distinct character, ids in sorted character order."""

__all__ = ["CharTokenizer"]


class CharTokenizer:
    """``CharTokenizer(chars)``: ids 0..len(chars)-1 in the given order. No special tokens."""

    eot_token = None

    def __init__(self, chars):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("CharTokenizer characters must be distinct")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        """The vocabulary of ``text``: its distinct characters, sorted."""
        return cls(sorted(set(text)))

    @property
    def n_vocab(self):
        return len(self.chars)

    def encode(self, text, **_):
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - set(self.stoi))
            raise ValueError(f"characters not in the vocabulary: {unknown[:10]!r}"
                             f"{' ...' if len(unknown) > 10 else ''}; the model knows {len(self.chars)} "
                             f"characters") from None

    encode_ordinary = encode

    def decode(self, ids):
        try:
            return "".join(self.chars[int(i)] for i in ids)
        except IndexError:
            raise ValueError(f"token id out of range for a {len(self.chars)}-character vocabulary") from None
