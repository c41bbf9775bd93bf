"""The model and tokenizer a fine-tuning run starts from: a ``npgpt train`` checkpoint or a fresh
char-level GPT of the same shape (the "from scratch" control)."""
import os

from .. import backend
from ..checkpoint import load_checkpoint
from ..model import GPT, GPTConfig
from .datasets import CharTokenizer, extend_char_vocab, tokenizer_from_meta

__all__ = ["load_pretrained", "init_model"]


def load_pretrained(path, block_size=None):
    """(GPT in train mode, meta) from a ``npgpt train`` out_dir (or its ckpt.npz).

    ``block_size`` larger than the checkpoint's is allowed for sinusoidal positions (they have no
    parameters, so longer inputs only need more rows of the table); learned positions cannot grow.
    """
    ckpt = load_checkpoint(os.path.join(path, "ckpt.npz") if os.path.isdir(path) else path)
    conf = dict(ckpt["model_config"])
    if block_size and block_size > conf["block_size"]:
        if conf.get("pos", "learned") != "sinusoidal":
            raise ValueError(f"the checkpoint learned positions only up to {conf['block_size']} tokens, "
                             f"{block_size} were asked for: use shorter texts or pretrain with "
                             f"--block_size={block_size}")
        conf["block_size"] = int(block_size)
    gpt = GPT(GPTConfig.from_dict(conf))
    gpt.load_state_dict(ckpt["model"])
    return gpt.train(), dict(ckpt.get("meta") or {})


def init_model(init_from, text, n_layer=4, n_head=4, n_embd=128, block_size=None, pos="learned", seed=0,
               scratch_block_size=256):
    """(gpt, tokenizer, meta) to fine-tune.

    init_from: "scratch" (a new char-level GPT over the alphabet of ``text``) or a checkpoint path
    (its tokenizer; a char alphabet is extended with any character of ``text`` it lacks).
    ``text``: every text the run will encode (so no character is unknown).
    ``block_size``: the context; None keeps a checkpoint's own (``scratch_block_size`` from scratch).
    """
    backend.seed(seed)
    if init_from == "scratch":
        chars = sorted(set(text))
        meta = {"tokenizer": "char", "vocab_size": len(chars), "chars": chars}
        gpt = GPT(GPTConfig(vocab_size=len(chars), block_size=block_size or scratch_block_size, n_layer=n_layer, n_head=n_head,
                            n_embd=n_embd, pos=pos))
        return gpt.train(), CharTokenizer(chars), meta
    gpt, meta = load_pretrained(init_from, block_size)
    meta = extend_char_vocab(gpt, meta, text)
    return gpt, tokenizer_from_meta(meta), meta
