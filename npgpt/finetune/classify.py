"""Sequence classification with a GPT: a class head on the last real token's final hidden state.

A causal model's last position is the only one that has seen the whole sequence, so

    h = ln_f(blocks(wte[idx] + pos))          (B, T, C)  all positions, no LM head
    z = h[b, length_b - 1] W_cls + b_cls      (B, K)     the last non-pad token of each row

Rows are right-padded to the longest in the batch; because attention is causal, the pad tokens
after position length_b - 1 cannot change z, whatever their ids. Training is cross-entropy on z;
``freeze_blocks`` keeps all but the last N transformer blocks (and ln_f and the head) fixed, and
``npgpt.lora`` adds low-rank adapters instead.
"""
import tracemalloc
from dataclasses import dataclass, asdict

import numpy as np

from .. import backend
from .. import functional as F
from ..engine import no_grad
from ..nn import Module, Linear
from .base import check_dtype, finetune_optimizer, run_steps
from .datasets import pad_batch

__all__ = ["hidden_states", "GPTClassifier", "freeze_blocks", "ClassifyConfig", "train_classifier",
           "evaluate_classifier", "majority_baseline", "encode_examples", "label_ids",
           "optimizer_state_bytes"]


def hidden_states(model, idx):
    """The final hidden states (B, T, C) of ``model`` (a GPT) for token ids ``idx`` (B, T): the
    transformer and its final LayerNorm, without the LM head (``GPT.hidden_states``)."""
    return model.hidden_states(idx)


class GPTClassifier(Module):
    """A GPT body with a class head: ``clf(idx, lengths) -> logits (B, n_classes)``.

    idx (B, T) right-padded token ids, lengths (B,) the number of real tokens in each row.
    The head is Linear(n_embd, n_classes), W ~ N(0, 0.02^2), b = 0.
    """

    def __init__(self, gpt, n_classes):
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.gpt = gpt
        self.head = Linear(gpt.config.n_embd, n_classes)

    def forward(self, idx, lengths):
        lengths = np.asarray(backend.to_numpy(lengths)).astype(np.int64)
        if lengths.min() < 1 or lengths.max() > idx.shape[1]:
            raise ValueError(f"lengths must lie in [1, {idx.shape[1]}], got [{lengths.min()}, {lengths.max()}]")
        h = hidden_states(self.gpt, idx)                                     # (B, T, C)
        last = h[(np.arange(len(lengths)), lengths - 1)]                     # (B, C)
        return self.head(last)                                               # (B, K)


def freeze_blocks(clf, trainable_blocks=None):
    """Train only the last ``trainable_blocks`` transformer blocks, ln_f and the head (None or a
    negative number: everything trains; 0: only ln_f and the head). Returns the trainable count."""
    gpt = clf.gpt
    n_layer = gpt.config.n_layer
    if trainable_blocks is None or trainable_blocks < 0 or trainable_blocks >= n_layer + 1:
        keep = lambda name: True                                             # noqa: E731
    else:
        first = n_layer - trainable_blocks
        blocks = tuple(f"gpt.transformer.h.{i}." for i in range(first, n_layer))

        def keep(name):
            return name.startswith(blocks + ("gpt.transformer.ln_f.", "head."))
    n = 0
    for name, p in clf.named_parameters():
        p.requires_grad = bool(keep(name))
        n += p.size if p.requires_grad else 0
    return int(n)


@dataclass
class ClassifyConfig:
    """Fine-tuning knobs. ``trainable_blocks``: None = full fine-tuning; ``lora_r`` > 0 adds adapters;
    ``dtype="float16"``: fp16 compute of the trained parameters, float32 master weights."""
    max_iters: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_iters: int = 20
    trainable_blocks: int = None
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = ("attn.c_attn", "attn.c_proj")
    eval_batch_size: int = 32
    seed: int = 0
    dtype: str = None

    def __post_init__(self):
        for k in ("max_iters", "batch_size", "eval_batch_size"):
            if getattr(self, k) < (0 if k == "max_iters" else 1):
                raise ValueError(f"{k} must be positive, got {getattr(self, k)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0 = no adapters), got {self.lora_r}")
        check_dtype(self.dtype)


def label_ids(examples):
    """The sorted label names of ``examples``."""
    return sorted({e["label"] for e in examples})


def encode_examples(examples, encode, labels, max_len):
    """(list of token-id lists, array of label indices) — each text cut to its first ``max_len`` tokens."""
    index = {l: i for i, l in enumerate(labels)}
    unknown = sorted({e["label"] for e in examples} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} do not occur in the training set {labels}")
    seqs = []
    for e in examples:
        ids = list(encode(e["text"]))[:max_len]
        if not ids:
            raise ValueError(f"example with empty text (label {e['label']!r}); remove it")
        seqs.append(ids)
    return seqs, np.array([index[e["label"]] for e in examples], dtype=np.int64)


def optimizer_state_bytes(opt):
    """Bytes of optimizer state (AdamW's two moments) plus the gradients of its parameters."""
    n = sum(p.size * p.dtype.itemsize for group in opt.param_groups for p in group["params"])
    return 3 * int(n)


def train_classifier(clf, seqs, y, cfg, log=print):
    """Fine-tune ``clf`` on token sequences ``seqs`` with labels ``y`` (class indices).

    Pretraining's flat AdamW over the parameters that require gradients (``base.run_steps``), linear
    warmup then constant rate, padded random minibatches. Returns {"losses", "step_time" (median
    seconds), "trainable" (count), "opt_bytes" (AdamW moments + gradients), "peak_bytes"}:
    ``peak_bytes`` is the peak of memory allocated from building the optimizer (its flat copy of the
    trained weights, their gradients and AdamW moments) through the first three steps (activations),
    by tracemalloc, which NumPy reports its buffers to.
    """
    if cfg.lora_r > 0:
        from ..lora import apply_lora
        apply_lora(clf.gpt, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    elif cfg.trainable_blocks is not None:
        freeze_blocks(clf, cfg.trainable_blocks)
    params = [p for p in clf.parameters() if p.requires_grad]
    tracemalloc.start()
    opt = finetune_optimizer(params, cfg)
    clf.train()
    peak = 0

    def stop_tracing(it):  # the peak of the first three steps
        nonlocal peak
        if it == 3 and tracemalloc.is_tracing():
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()

    def loss_of(batch):
        ids, lengths = pad_batch([seqs[i] for i in batch])
        return F.cross_entropy(clf(ids, lengths), backend.to_device(y[batch]))
    losses, times = run_steps(cfg, len(seqs), loss_of, opt, log, stop_tracing)
    if tracemalloc.is_tracing():
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    clf.eval()
    return {"losses": losses, "step_time": float(np.median(times[3:] or times)) if times else 0.0,
            "trainable": int(sum(p.size for p in params)), "opt_bytes": optimizer_state_bytes(opt),
            "peak_bytes": int(peak)}


@no_grad()
def evaluate_classifier(clf, seqs, y, n_classes, batch_size=32):
    """Accuracy and confusion matrix (K, K): rows are true classes, columns predictions.
    Batches are formed from sequences sorted by length, so little padding is computed."""
    clf.eval()
    order = np.argsort([len(s) for s in seqs], kind="stable")
    pred = np.empty(len(seqs), dtype=np.int64)
    for i in range(0, len(order), batch_size):
        b = order[i:i + batch_size]
        ids, lengths = pad_batch([seqs[j] for j in b])
        pred[b] = backend.to_numpy(clf(ids, lengths).data).argmax(axis=-1)
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(conf, (y, pred), 1)
    return {"accuracy": float((pred == y).mean()) if len(y) else 0.0, "confusion": conf, "pred": pred}


def majority_baseline(y_train, y_test):
    """Accuracy on ``y_test`` of always predicting the most frequent class of ``y_train``."""
    major = np.bincount(y_train).argmax()
    return float((np.asarray(y_test) == major).mean())


def config_dict(cfg):
    d = asdict(cfg)
    d["lora_targets"] = list(d["lora_targets"])
    return d
