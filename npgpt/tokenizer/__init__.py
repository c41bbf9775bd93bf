"""Tokenizers: GPT-2's byte-level BPE (byte-exact with GPT-2's real ranks), BPE training, characters.

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
Units") over UTF-8 bytes with a regex pre-tokenizer, as in GPT-2 (Radford et al. 2019, "Language
Models are Unsupervised Multitask Learners"). Files, one idea each:

    encoding.py  pre-tokenizer patterns, rank-ordered merging, Encoding (tiktoken's API)
    loading.py   .tiktoken rank files (GPT-2's ships in npgpt/assets), HF vocab.json + merges.txt
    trainer.py   incremental BPE training, BasicTokenizer / RegexTokenizer, save/load
    reference.py minbpe-style reference trainer (get_stats, merge): the fast trainer's test oracle
    char.py      CharTokenizer (one id per character)

    from npgpt.tokenizer import get_encoding
    enc = get_encoding("gpt2")
    enc.encode("Hello world")          # [15496, 995]
"""
from .encoding import Encoding, GPT2_PATTERN, GPT4_PATTERN
from .loading import get_encoding, load_tiktoken_bpe, save_tiktoken_bpe, load_hf_bpe, bytes_to_unicode
from .trainer import BasicTokenizer, RegexTokenizer, train_bpe, load_tokenizer
from .reference import train_bpe_reference
from .char import CharTokenizer

__all__ = ["Encoding", "GPT2_PATTERN", "GPT4_PATTERN", "get_encoding", "load_tiktoken_bpe", "save_tiktoken_bpe",
           "load_hf_bpe", "bytes_to_unicode", "BasicTokenizer", "RegexTokenizer", "train_bpe", "train_bpe_reference",
           "load_tokenizer", "CharTokenizer", "load_tokenizer_from_meta", "tokenizer_from_name"]


def tokenizer_from_name(name):
    """"gpt2" or the path of a saved tokenizer (.json / .tiktoken, see ``load_tokenizer``)."""
    import os
    if name == "gpt2":
        return get_encoding("gpt2")
    if not os.path.isfile(str(name)):
        raise ValueError(f"unknown tokenizer {name!r}: use 'gpt2' or the path of a tokenizer saved by "
                         f"RegexTokenizer.save / npgpt train-tokenizer (.json or .tiktoken)")
    return load_tokenizer(name)


def load_tokenizer_from_meta(meta):
    """The tokenizer a prepared dataset / checkpoint was made with, from its ``meta`` dict (or the
    path of a directory holding ``meta.json``): a CharTokenizer for "char" (its ``chars``), GPT-2's
    Encoding for "gpt2", else the saved tokenizer at that path. All have ``encode(text)``,
    ``decode(ids)``, ``n_vocab`` and ``eot_token`` (None for characters)."""
    import json
    import os
    if isinstance(meta, (str, os.PathLike)):
        path = os.path.join(meta, "meta.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: prepare the data first (npgpt prepare --out_dir {meta})")
        with open(path) as f:
            meta = json.load(f)
    kind = meta.get("tokenizer", "char")
    if kind == "char":
        if "chars" not in meta:
            raise ValueError("a char-level meta needs its 'chars' list (re-run npgpt prepare)")
        return CharTokenizer(meta["chars"])
    return tokenizer_from_name(kind)
