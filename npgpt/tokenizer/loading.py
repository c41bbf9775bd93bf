"""Vocabulary files: GPT-2's ranks in tiktoken's format (shipped), and Hugging Face's vocab.json + merges.txt.

``.tiktoken``: one line per token, ``base64(token bytes) rank``. GPT-2's real ranks ship in
``npgpt/assets/gpt2.tiktoken`` (50,256 tokens; ``<|endoftext|>`` = 50256 is added as a special).
HF's format stores tokens as printable strings through GPT-2's ``bytes_to_unicode`` table
(every byte mapped to a visible character) with ids in ``vocab.json``.
"""
import base64
import functools
import json
import os

from .encoding import Encoding, GPT2_PATTERN

__all__ = ["load_tiktoken_bpe", "save_tiktoken_bpe", "get_encoding", "bytes_to_unicode", "load_hf_bpe"]

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")


def load_tiktoken_bpe(path):
    """bytes -> rank from a ``.tiktoken`` file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"vocabulary file {path} not found")
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}") from None
    return ranks


def save_tiktoken_bpe(ranks, path):
    """Write bytes -> rank as a ``.tiktoken`` file (sorted by rank)."""
    with open(path, "wb") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n")


@functools.lru_cache(maxsize=None)
def get_encoding(name="gpt2"):
    """The GPT-2 encoding (the only bundled one): ``get_encoding("gpt2").encode("Hello")``."""
    if name != "gpt2":
        raise ValueError(f"unknown encoding {name!r}; npgpt bundles 'gpt2' (load others with "
                         f"Encoding(name, pattern, load_tiktoken_bpe(path), specials) or load_hf_bpe)")
    ranks = load_tiktoken_bpe(os.path.join(ASSETS, "gpt2.tiktoken"))
    return Encoding("gpt2", GPT2_PATTERN, ranks, {"<|endoftext|>": 50256})


@functools.lru_cache(maxsize=None)
def bytes_to_unicode():
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the
    other 68 bytes to code points 256, 257, ... in order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def load_hf_bpe(vocab_json, merges_txt=None, name="hf", pattern=GPT2_PATTERN):
    """An Encoding from HF's ``vocab.json`` (+ ``merges.txt``, used to check consistency).

    Ranks are the vocab ids; tokens written ``<|...|>`` (``<|endoftext|>``) become special tokens.
    """
    with open(vocab_json, encoding="utf-8") as f:
        vocab = json.load(f)
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    ranks, specials = {}, {}
    for tok, i in vocab.items():
        if tok.startswith("<|") and tok.endswith("|>"):
            specials[tok] = i
            continue
        try:
            ranks[bytes(inverse[c] for c in tok)] = i
        except KeyError:
            raise ValueError(f"{vocab_json}: token {tok!r} is not in GPT-2's byte alphabet") from None
    if merges_txt is not None:
        # merging by rank = id (tiktoken's rule) equals HF's merging in merges.txt order when the
        # merged tokens' ids follow that order, as in GPT-2 and in vocabularies HF's trainer writes
        with open(merges_txt, encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip() and not ln.startswith("#version")]
        last = -1
        for n, ln in enumerate(lines, 1):
            parts = ln.split(" ")
            if len(parts) != 2 or "".join(parts) not in vocab:
                raise ValueError(f"{merges_txt}: merge {n} {ln!r} is not two tokens whose concatenation is "
                                 f"in vocab.json")
            if vocab["".join(parts)] < last:
                raise ValueError(f"{merges_txt}: the ids in vocab.json do not follow the merge order (merge "
                                 f"{n} {ln!r}); only vocabularies whose ids are merge ranks are supported")
            last = vocab["".join(parts)]
    return Encoding(name, pattern, ranks, specials)
