"""Training a byte-level BPE vocabulary (Sennrich et al. 2016), incrementally.

The text is pre-tokenized once and reduced to its unique pre-tokens with their frequencies
(Shakespeare's 5 MB hold ~60k distinct pre-tokens). Pair counts are kept weighted by frequency,
with an index pair -> words containing it, and a max-heap of counts. A merge rewrites only the
words that contain the pair and updates only their pairs' counts, so each merge costs in
proportion to where the pair occurs rather than to the corpus (minbpe recounts everything).

Ties: among pairs with equal counts the one with the smallest (left id, right id) is merged first.
This reproduces Wikipedia's example: "aaabdaaabac" merges aa -> Z, then ab -> Y (ab ties with Za,
and a=97 < Z=256), then ZY -> X.
"""
import collections
import heapq
import json
import os

import regex

from .encoding import Encoding, GPT2_PATTERN, GPT4_PATTERN
from .loading import load_tiktoken_bpe, save_tiktoken_bpe

__all__ = ["BasicTokenizer", "RegexTokenizer", "train_bpe", "load_tokenizer"]


def _merge_word(word, pair, new_id):
    """``word`` (tuple of ids) with every non-overlapping occurrence of ``pair``, left to right, replaced."""
    out, i, a, b = [], 0, pair[0], pair[1]
    n = len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_bpe(word_counts, num_merges, verbose=False):
    """Learn ``num_merges`` merges from {bytes pre-token: count}. Returns [(left, right), ...] where
    merge k creates token id 256 + k."""
    words = [tuple(w) for w in word_counts]
    freqs = list(word_counts.values())
    counts = collections.defaultdict(int)          # pair -> weighted count
    where = collections.defaultdict(set)           # pair -> indices of words containing it
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            counts[p] += f
            where[p].add(wi)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < num_merges and heap:
        negc, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -negc or negc == 0:
            continue                                # stale entry: the count changed since it was pushed
        new_id = 256 + len(merges)
        merges.append(pair)
        touched = set()
        for wi in list(where[pair]):
            w, f = words[wi], freqs[wi]
            for p in zip(w, w[1:]):                 # remove the old word's pairs
                counts[p] -= f
                touched.add(p)
            nw = _merge_word(w, pair, new_id)
            for p in zip(w, w[1:]):
                where[p].discard(wi)
            for p in zip(nw, nw[1:]):               # add the new word's pairs
                counts[p] += f
                where[p].add(wi)
                touched.add(p)
            words[wi] = nw
        for p in touched:
            c = counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                counts.pop(p, None)
                where.pop(p, None)
        if verbose and len(merges) % 1000 == 0:
            print(f"merge {len(merges)}/{num_merges}: {pair} -> {new_id} ({-negc} occurrences)")
    return merges


class BasicTokenizer:
    """Byte-level BPE with no pre-tokenization: the whole text is one sequence (for teaching)."""

    pattern = None

    def __init__(self):
        self.merges, self.special_tokens = [], {}
        self._encoding = None

    def _pretokens(self, text):
        return [text]

    def train(self, text, vocab_size, special_tokens=None, verbose=False):
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``; the special token
        strings get the last ids. Returns self."""
        special_tokens = list(special_tokens or [])   # strings; they take the ids after the merges
        num_merges = vocab_size - 256 - len(special_tokens)
        if num_merges < 0:
            raise ValueError(f"vocab_size must be at least 256 + {len(special_tokens)} special tokens")
        counts = collections.Counter(p.encode("utf-8") for p in self._pretokens(text))
        self.merges = train_bpe(counts, num_merges, verbose)
        n = 256 + len(self.merges)
        self.special_tokens = {s: n + i for i, s in enumerate(special_tokens)}
        self._encoding = None
        return self

    @property
    def vocab(self):
        """id -> bytes."""
        vocab = {i: bytes([i]) for i in range(256)}
        for k, (a, b) in enumerate(self.merges):
            vocab[256 + k] = vocab[a] + vocab[b]
        return vocab

    @property
    def encoding(self):
        """The trained vocabulary as a rank-based Encoding (ranks = ids)."""
        if self._encoding is None:
            ranks = {b: i for i, b in self.vocab.items()}
            pat = self.pattern if self.pattern is not None else r"(?s).+"
            self._encoding = Encoding(type(self).__name__, pat, ranks, self.special_tokens)
        return self._encoding

    @property
    def n_vocab(self):
        return self.encoding.n_vocab

    @property
    def eot_token(self):
        return self.encoding.eot_token

    def encode(self, text, allowed_special="all", disallowed_special=()):
        return self.encoding.encode(text, allowed_special, disallowed_special)

    def encode_ordinary(self, text):
        return self.encoding.encode_ordinary(text)

    def decode(self, ids):
        return self.encoding.decode(ids)

    # ---- files -----------------------------------------------------------------------------------
    def save(self, path):
        """Save as readable JSON (``.json``: pattern, specials, merges as id pairs) or as tiktoken
        ranks (``.tiktoken``; the pattern and specials then go in a ``.json`` sidecar)."""
        meta = {"type": type(self).__name__, "pattern": self.pattern, "special_tokens": self.special_tokens}
        if path.endswith(".tiktoken"):
            save_tiktoken_bpe({b: i for i, b in self.vocab.items()}, path)
            with open(path + ".json", "w") as f:
                json.dump(meta, f, indent=1)
        else:
            with open(path, "w") as f:
                json.dump({**meta, "merges": [list(m) for m in self.merges]}, f)


class RegexTokenizer(BasicTokenizer):
    """Byte-level BPE over regex pre-tokens (``pattern="gpt2"`` (default), ``"gpt4"`` or a regex)."""

    def __init__(self, pattern="gpt2"):
        super().__init__()
        self.pattern = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}.get(pattern, pattern)
        self._pat = regex.compile(self.pattern)

    def _pretokens(self, text):
        return self._pat.findall(text)


def load_tokenizer(path):
    """A tokenizer saved by ``save`` (``.json`` or ``.tiktoken`` + sidecar)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path} not found")
    if path.endswith(".tiktoken"):
        side = path + ".json"
        meta = json.load(open(side)) if os.path.exists(side) else {"pattern": GPT2_PATTERN, "special_tokens": {}}
        ranks = load_tiktoken_bpe(path)
        tok = RegexTokenizer(meta["pattern"]) if meta.get("pattern") else BasicTokenizer()
        vocab = sorted(ranks.items(), key=lambda kv: kv[1])
        byte_to_id = {b: i for b, i in vocab}
        merges = []
        for b, i in vocab:
            if len(b) == 1:
                continue
            # recover the merge: the split of b into two known tokens with the highest-ranked halves
            best = min(((byte_to_id[b[:k]], byte_to_id[b[k:]]) for k in range(1, len(b))
                        if b[:k] in byte_to_id and b[k:] in byte_to_id and byte_to_id[b[:k]] < i
                        and byte_to_id[b[k:]] < i), key=lambda pr: max(pr))
            merges.append(best)
        tok.merges, tok.special_tokens = merges, meta.get("special_tokens", {})
        return tok
    with open(path) as f:
        meta = json.load(f)
    if meta.get("type") not in ("BasicTokenizer", "RegexTokenizer"):
        raise ValueError(f"{path} is not an npgpt tokenizer file")
    tok = RegexTokenizer(meta["pattern"]) if meta["type"] == "RegexTokenizer" else BasicTokenizer()
    tok.merges = [tuple(m) for m in meta["merges"]]
    tok.special_tokens = meta.get("special_tokens", {})
    return tok
