"""What every fine-tuning run shares: the model and tokenizer it starts from (a ``npgpt train``
checkpoint, or a fresh char-level GPT of the same shape: the "from scratch" control), and its
training loop, which builds and steps the optimizer exactly as pretraining does
(``npgpt.train_helpers.make_optimizer`` and ``train_step``: flat AdamW, decay on matrices only,
clipping inside the step, optional fp16 mixed precision)."""
import time

import numpy as np

from .. import backend
from ..model import GPT, GPTConfig
from ..tokenizer import CharTokenizer, load_tokenizer_from_meta
from ..train_helpers import make_optimizer, train_step

__all__ = ["load_pretrained", "init_model", "extend_char_vocab", "finetune_optimizer", "run_steps",
           "check_dtype"]

BETAS = (0.9, 0.99)   # AdamW's betas for fine-tuning (npgpt train's defaults)


def load_pretrained(path, block_size=None):
    """(GPT in train mode, meta) from anything ``loading.load_model`` reads: a ``npgpt train`` out_dir
    (or a checkpoint file), a weights-only or LoRA-tuned checkpoint, a Hugging Face GPT-2 directory.

    ``block_size`` larger than the checkpoint's is allowed for sinusoidal positions (they have no
    parameters, so longer inputs only need more rows of the table); learned positions cannot grow.
    """
    from ..loading import load_model
    model, ckpt = load_model(path)
    conf = dict(ckpt["model_config"])
    if block_size and block_size > conf["block_size"]:
        if conf.get("pos", "learned") != "sinusoidal":
            raise ValueError(f"the checkpoint learned positions only up to {conf['block_size']} tokens, "
                             f"{block_size} were asked for: use shorter texts or pretrain with "
                             f"--block_size={block_size}")
        conf["block_size"] = int(block_size)
    if conf["block_size"] == model.config.block_size:
        return model.train(), dict(ckpt.get("meta") or {})
    gpt = GPT(GPTConfig.from_dict(conf))
    gpt.load_state_dict(model.state_dict())
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
        gpt = GPT(GPTConfig(vocab_size=len(chars), block_size=block_size or scratch_block_size, n_layer=n_layer,
                            n_head=n_head, n_embd=n_embd, pos=pos))
        return gpt.train(), CharTokenizer(chars), meta
    gpt, meta = load_pretrained(init_from, block_size)
    meta = extend_char_vocab(gpt, meta, text)
    return gpt, load_tokenizer_from_meta(meta), meta


def extend_char_vocab(model, meta, text):
    """Make a char-level ``model`` able to read every character of ``text``: the alphabet becomes
    sorted(old | new) (what any char tokenizer builds from it), the token-embedding rows of the old
    characters move to their new ids and each new character gets a fresh N(0, 0.02^2) row (the tied
    LM head follows). Returns the new meta (unchanged when nothing is missing).

    The Alpaca template needs '#', which Shakespeare never uses; this is how a Shakespeare char
    model learns to read it.
    """
    if meta.get("tokenizer", "char") != "char" or "chars" not in meta:
        return meta
    old = list(meta["chars"])
    extra = sorted(set(text) - set(old))
    if not extra:
        return meta
    from ..nn import Parameter, normal_
    new = sorted(set(old) | set(extra))
    wte = model.transformer.wte.weight
    C = wte.shape[1]
    table = normal_((len(new), C), 0.02)                                     # (V', C)
    index = {c: i for i, c in enumerate(new)}
    table[np.array([index[c] for c in old])] = wte.data[:len(old)]
    model.transformer.wte.weight = Parameter(table, requires_grad=wte.requires_grad)
    model.config.vocab_size = len(new)
    return {**meta, "chars": new, "vocab_size": len(new)}


def check_dtype(dtype):
    """Refuse a fine-tuning ``dtype`` other than None / "float32" (the parameters' own) or "float16"."""
    if dtype not in (None, "float32", "float16"):
        raise ValueError(f"dtype must be None, 'float32' or 'float16' (mixed precision), got {dtype!r}")


def finetune_optimizer(params, cfg):
    """Pretraining's optimizer (``make_optimizer``) over ``params``, the parameters that train, with
    the fine-tuning config's learning rate, weight decay, clipping (``grad_clip`` <= 0: none) and
    dtype. Build it after ``apply_lora`` / freezing: it makes every parameter it gets a view of its
    flat buffer."""
    return make_optimizer(params, cfg.learning_rate, cfg.weight_decay, BETAS, max(cfg.grad_clip, 0.0),
                          "float16" if cfg.dtype == "float16" else None)


def run_steps(cfg, n_items, loss_of, opt, log=print, before_step=None):
    """The fine-tuning loop shared by the task heads: ``cfg.max_iters`` steps over random minibatches
    of ``n_items`` examples (reshuffled each epoch), linear warmup then a constant rate, and
    pretraining's ``train_step`` (backward, global-norm clipping and AdamW in ``opt.step()``).
    ``loss_of(batch_indices)`` returns the loss Tensor; ``before_step(it)`` runs first in each
    iteration. Returns (losses, step seconds)."""
    rng = np.random.default_rng(cfg.seed)
    backend.seed(cfg.seed)
    order, pos, losses, times = rng.permutation(n_items), 0, [], []
    for it in range(cfg.max_iters):
        if before_step is not None:
            before_step(it)
        # the next minibatch of example indices, reshuffled at the end of each epoch
        if pos + cfg.batch_size > len(order):
            order, pos = rng.permutation(n_items), 0
        batch = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        t0 = time.perf_counter()
        # linear warmup, then a constant learning rate
        opt.set_lr(cfg.learning_rate * min(1.0, (it + 1) / max(1, cfg.warmup_iters)))
        # forward, backward and update
        loss = train_step(opt, lambda: loss_of(batch))
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.item()))
        if log and (it + 1) % max(1, cfg.max_iters // 5) == 0:
            log(f"  iter {it + 1}/{cfg.max_iters}: loss {np.mean(losses[-20:]):.4f}")
    return losses, times
