"""The model and tokenizer a fine-tuning run starts from: a ``npgpt train`` checkpoint or a fresh
char-level GPT of the same shape (the "from scratch" control)."""
import os
import time

import numpy as np

from .. import backend
from ..checkpoint import load_checkpoint
from ..model import GPT, GPTConfig
from ..optim import AdamW, clip_grad_norm
from .datasets import CharTokenizer, extend_char_vocab, tokenizer_from_meta

__all__ = ["load_pretrained", "init_model", "make_optimizer", "run_steps"]


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


def make_optimizer(params, cfg):
    """AdamW over ``params`` (those that train), weight decay on matrices only, as in pretraining."""
    decay, rest = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": rest, "weight_decay": 0.0}) if g["params"]]
    return AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.99))


def run_steps(cfg, n_items, loss_of, params, opt, log=print, before_step=None):
    """The fine-tuning loop shared by the task heads: ``cfg.max_iters`` steps over random minibatches
    of ``n_items`` examples (reshuffled each epoch), linear warmup then a constant rate, backward,
    global-norm clipping, an AdamW step. ``loss_of(batch_indices)`` returns the loss Tensor;
    ``before_step(it)`` runs first in each iteration. Returns (losses, step seconds)."""
    rng = np.random.default_rng(cfg.seed)
    backend.seed(cfg.seed)
    order, pos, losses, times = rng.permutation(n_items), 0, [], []
    for it in range(cfg.max_iters):
        if before_step is not None:
            before_step(it)
        if pos + cfg.batch_size > len(order):
            order, pos = rng.permutation(n_items), 0
        batch = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        t0 = time.perf_counter()
        opt.set_lr(cfg.learning_rate * min(1.0, (it + 1) / max(1, cfg.warmup_iters)))
        loss = loss_of(batch)
        loss.backward()
        if cfg.grad_clip > 0:
            clip_grad_norm(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.item()))
        if log and (it + 1) % max(1, cfg.max_iters // 5) == 0:
            log(f"  iter {it + 1}/{cfg.max_iters}: loss {np.mean(losses[-20:]):.4f}")
    return losses, times
