"""Training a byte-level BPE vocabulary (Sennrich et al. 2016), incrementally.

The text is pre-tokenized once and reduced to its unique pre-tokens with their frequencies
(Shakespeare's 5 MB, 1.36M pre-tokens, hold 36k distinct ones). Pair counts are kept weighted by
frequency, with an index pair -> positions where it occurs, and a max-heap of (-count, pair) with
lazy deletion (an entry whose count is out of date is skipped when popped). A merge visits only
the positions of its pair and updates only the neighbouring pairs' counts, so each merge costs in
proportion to how often the pair occurs rather than to the corpus (minbpe recounts everything, as
``reference.train_bpe_reference`` does: the test oracle of ``train_bpe``). This holds for
BasicTokenizer's single long sequence too. Pairs are counted with overlaps ("aaa" holds (a, a)
twice), as in minbpe and HF tokenizers.

Ties: among pairs with equal counts the one with the smallest (left id, right id) is merged first.
This reproduces Wikipedia's example: "aaabdaaabac" merges aa -> Z, then ab -> Y (ab ties with Za,
and a=97 < Z=256), then ZY -> X.
"""
import collections
import heapq
import json
import os

import regex

from .encoding import Encoding, GPT2_PATTERN, GPT4_PATTERN, _alternation, pretokenize
from .loading import load_tiktoken_bpe, save_tiktoken_bpe

__all__ = ["BasicTokenizer", "RegexTokenizer", "train_bpe", "load_tokenizer"]


def train_bpe(word_counts, num_merges, verbose=False):
    """Learn up to ``num_merges`` merges from {bytes pre-token: count}. Returns [(left, right), ...]
    where merge k creates token id 256 + k; stops early when no adjacent pair is left.

    Every unique pre-token is laid out once in flat arrays: ``tok[i]`` the token at position i
    (-1 once merged away), ``nxt``/``prv`` the neighbours within the pre-token (-1 at its ends),
    ``weight[i]`` the pre-token's frequency. ``where[pair]`` holds the positions i where ``pair``
    starts and ``counts[pair]`` the sum of their weights. Merging (a, b) -> z visits its positions
    left to right (so "aaa" becomes [aa, a], as a left-to-right rewrite gives), skipping ones an
    earlier merge in the same pass consumed, and at each one replaces the pairs (x, a), (a, b),
    (b, y) by (x, z), (z, y): work proportional to the occurrences of the pair.
    """
    tok, nxt, prv, weight = [], [], [], []
    for w, f in word_counts.items():
        n0, n = len(tok), len(w)
        tok.extend(w)
        weight.extend([f] * n)
        prv.extend(range(n0 - 1, n0 + n - 1))
        prv[n0] = -1
        nxt.extend(range(n0 + 1, n0 + n + 1))
        nxt[-1] = -1
    counts = collections.defaultdict(int)          # pair -> weighted count
    where = collections.defaultdict(set)           # pair -> positions where it starts
    for i, j in enumerate(nxt):
        if j != -1:
            counts[tok[i], tok[j]] += weight[i]
            where[tok[i], tok[j]].add(i)
    heap = [(-c, p) for p, c in counts.items()]   # max count first; ties: smallest pair first
    heapq.heapify(heap)
    merges = []
    while len(merges) < num_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg_count:
            continue                                # stale entry: the count changed since it was pushed
        a, b = pair
        z = 256 + len(merges)
        merges.append(pair)
        touched = set()
        for i in sorted(where.pop(pair)):
            j = nxt[i]
            if tok[i] != a or j == -1 or tok[j] != b:
                continue                            # consumed by the previous occurrence ("aaa")
            w, p, k = weight[i], prv[i], nxt[j]
            if p != -1:                             # (x, a) at p -> (x, z)
                old, new = (tok[p], a), (tok[p], z)
                counts[old] -= w
                where[old].discard(p)
                counts[new] += w
                where[new].add(p)
                touched.update((old, new))
            if k != -1:                             # (b, y) at j -> (z, y) at i
                old, new = (b, tok[k]), (z, tok[k])
                counts[old] -= w
                where[old].discard(j)
                counts[new] += w
                where[new].add(i)
                touched.update((old, new))
                prv[k] = i
            tok[i], tok[j], nxt[i] = z, -1, k
        del counts[pair]
        touched.discard(pair)
        for q in touched:
            c = counts.get(q, 0)
            if c > 0:
                heapq.heappush(heap, (-c, q))
            else:
                counts.pop(q, None)
                where.pop(q, None)
        if verbose and len(merges) % 1000 == 0:
            print(f"merge {len(merges)}/{num_merges}: {pair} -> {z} ({-neg_count} occurrences)")
    return merges


class BasicTokenizer:
    """Byte-level BPE with no pre-tokenization: the whole text is one sequence (for teaching: merges
    then cross word boundaries, and encoding is quadratic in the text's length).

    State: ``merges`` [(left id, right id), ...] where merge k made id 256 + k (ids 0..255 are the
    bytes), and ``special_tokens`` {str: id}. A vocabulary loaded from a foreign ``.tiktoken`` file
    (whose ids need not follow that layout) is kept as its ranks instead, with ``merges`` empty.
    """

    pattern = None

    def __init__(self):
        self.merges, self.special_tokens = [], {}
        self._ranks = None                           # bytes -> id, only for foreign rank files
        self._encoding = None

    def _pretokens(self, text):
        """Lists of pre-tokens: here the whole text is one."""
        return [[text]]

    def train(self, text, vocab_size, special_tokens=None, verbose=False):
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``; the special token
        strings get the last ids (and are cut out of the training text). Returns self. Ties between
        equally frequent pairs go to the smallest (left id, right id), see ``train_bpe``."""
        return self.train_from_iterator([text], vocab_size, special_tokens, verbose)

    def train_from_iterator(self, texts, vocab_size, special_tokens=None, verbose=False):
        """``train`` over an iterable of texts (documents, or chunks cut where no pre-token spans, as
        ``npgpt.prepare.iter_chunks`` yields): only the pre-token counts are kept, never the corpus.
        For BasicTokenizer each text is a separate sequence."""
        special_tokens = list(dict.fromkeys(special_tokens or []))
        num_merges = vocab_size - 256 - len(special_tokens)
        if num_merges < 0:
            raise ValueError(f"vocab_size must be at least 256 + {len(special_tokens)} special tokens")
        cut_specials = _alternation(frozenset(special_tokens)).split if special_tokens else (lambda t: [t])
        counts = collections.Counter()
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:              # lone surrogates: as Encoding.encode_ordinary does
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            for part in cut_specials(text):
                for pieces in self._pretokens(part):    # unique pre-tokens with their frequencies
                    counts.update(pieces)
        counts.pop("", None)
        self.merges = train_bpe({p.encode("utf-8"): c for p, c in counts.items()}, num_merges, verbose)
        n = 256 + len(self.merges)
        self.special_tokens = {s: n + i for i, s in enumerate(special_tokens)}
        self._ranks, self._encoding = None, None
        return self

    @property
    def vocab(self):
        """id -> bytes of every regular token."""
        if self._ranks is not None:
            return {i: b for b, i in self._ranks.items()}
        vocab = {i: bytes([i]) for i in range(256)}
        for k, (a, b) in enumerate(self.merges):
            vocab[256 + k] = vocab[a] + vocab[b]
        return vocab

    @property
    def encoding(self):
        """The vocabulary as a rank-based Encoding (rank = id; merge order is id order)."""
        if self._encoding is None:
            vocab, ranks = self.vocab, {}
            for i, b in sorted(vocab.items()):
                ranks.setdefault(b, i)               # two merges spelling the same bytes: the first wins
            pat = self.pattern if self.pattern is not None else r"(?s).+"
            enc = Encoding(type(self).__name__, pat, ranks, self.special_tokens)
            enc.add_decodings({i: b for i, b in vocab.items() if ranks[b] != i})   # the second still decodes
            self._encoding = enc
        return self._encoding

    @property
    def n_vocab(self):
        return self.encoding.n_vocab

    @property
    def eot_token(self):
        return self.special_tokens.get("<|endoftext|>")

    def encode(self, text, allowed_special="all", disallowed_special=()):
        """Ids of ``text``; special-token strings become their ids by default (own training data)."""
        return self.encoding.encode(text, allowed_special, disallowed_special)

    def encode_ordinary(self, text):
        return self.encoding.encode_ordinary(text)

    def decode(self, ids):
        """Text of ``ids`` (a partial UTF-8 character becomes U+FFFD)."""
        return self.encoding.decode(ids)

    # ---- files -----------------------------------------------------------------------------------
    def save(self, path):
        """Save as readable JSON (``.json``: type, pattern, specials, merges as id pairs) or as
        tiktoken ranks (``.tiktoken``; the pattern and specials then go in a ``.json`` sidecar)."""
        meta = {"type": type(self).__name__, "pattern": self.pattern, "special_tokens": self.special_tokens}
        if path.endswith(".tiktoken"):
            save_tiktoken_bpe({b: i for i, b in self.vocab.items()}, path)
            with open(path + ".json", "w") as f:
                json.dump(meta, f, indent=1)
            return
        if self._ranks is not None:
            raise ValueError("this vocabulary was loaded from ranks without merges: save it as .tiktoken")
        with open(path, "w") as f:
            json.dump({**meta, "merges": [list(m) for m in self.merges]}, f)


class RegexTokenizer(BasicTokenizer):
    """Byte-level BPE over regex pre-tokens (``pattern="gpt2"`` (default), ``"gpt4"`` or a regex)."""

    def __init__(self, pattern="gpt2"):
        super().__init__()
        self.pattern = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}.get(pattern, pattern)
        regex.compile(self.pattern)                 # fail early on a bad pattern

    def _pretokens(self, text):
        return pretokenize(text, self.pattern)


def _merges_from_ranks(ranks):
    """The merges of a rank table in our layout (byte b has id b, then ids 256, 257, ... each the
    concatenation of two earlier tokens), or None if ``ranks`` does not follow it."""
    by_id = {i: b for b, i in ranks.items()}
    if any(by_id.get(i) != bytes([i]) for i in range(256)) or sorted(by_id) != list(range(len(by_id))):
        return None
    merges = []
    for i in range(256, len(by_id)):
        pair = _recover_merge(by_id[i], ranks, i)
        if pair is None:
            return None
        merges.append(pair)
    return merges


def _recover_merge(token, ranks, i):
    """The pair that made token ``i``: BPE-encode its bytes with the tokens before it (ids < i); a
    vocabulary learned by BPE leaves exactly two parts (any other split spells the same bytes but
    would change the merge order)."""
    parts = [token[k:k + 1] for k in range(len(token))]
    while len(parts) > 2:
        best = min(((ranks.get(parts[k] + parts[k + 1], i), k) for k in range(len(parts) - 1)))
        if best[0] >= i:
            return None
        k = best[1]
        parts[k:k + 2] = [parts[k] + parts[k + 1]]
    return (ranks[parts[0]], ranks[parts[1]]) if len(parts) == 2 else None


def load_tokenizer(path):
    """A tokenizer saved by ``save`` (``.json``, or ``.tiktoken`` with an optional ``.json`` sidecar
    holding the pattern and specials; without one, GPT-2's pattern and no specials)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path} not found")
    if path.endswith(".tiktoken"):
        side = path + ".json"
        meta = {"pattern": GPT2_PATTERN, "special_tokens": {}}
        if os.path.exists(side):
            with open(side) as f:
                meta = json.load(f)
        ranks = load_tiktoken_bpe(path)
        tok = RegexTokenizer(meta["pattern"]) if meta.get("pattern") else BasicTokenizer()
        merges = _merges_from_ranks(ranks)
        if merges is None:
            tok._ranks = ranks
        else:
            tok.merges = merges
        tok.special_tokens = meta.get("special_tokens", {})
        return tok
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    if not isinstance(meta, dict) or meta.get("type") not in ("BasicTokenizer", "RegexTokenizer"):
        raise ValueError(f"{path} is not an npgpt tokenizer file (.json saved by RegexTokenizer.save, "
                         f"or .tiktoken ranks)")
    tok = RegexTokenizer(meta["pattern"]) if meta["type"] == "RegexTokenizer" else BasicTokenizer()
    tok.merges = [tuple(m) for m in meta["merges"]]
    tok.special_tokens = meta.get("special_tokens", {})
    return tok
