"""Sequence classification with a GPT: a class head on the last real token's final hidden state.

A causal model's last position is the only one that has seen the whole sequence, so

    h = ln_f(blocks(wte[idx] + pos))          (B, T, C)  all positions, no LM head
    z = h[b, length_b - 1] W_cls + b_cls      (B, K)     the last non-pad token of each row

Rows are right-padded to the longest in the batch; because attention is causal, the pad tokens
after position length_b - 1 cannot change z, whatever their ids. Training is cross-entropy on z;
``freeze_blocks`` keeps all but the last N transformer blocks (and ln_f and the head) fixed, and
``npgpt.lora`` adds low-rank adapters instead.

A trained classifier is one checkpoint (``save_classifier``): the GPT's config and weights with any
LoRA adapters folded in, the head, the label names, the tokenizer meta, the pooling ("last": the
last real token) and ``max_len``, the most tokens of a text it reads (longer texts are cut to their
first ``max_len`` tokens, as ``encode_examples`` cut them in training). ``load_classifier`` gives it
back and ``classify_texts`` returns per-label probabilities (``npgpt classify``).
"""
import os
import tracemalloc
from dataclasses import dataclass, asdict

import numpy as np

from .. import backend
from .. import functional as F
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..engine import no_grad
from ..nn import Module, Linear
from .base import check_dtype, finetune_optimizer, run_steps
from .datasets import pad_batch

__all__ = ["hidden_states", "GPTClassifier", "freeze_blocks", "ClassifyConfig", "train_classifier",
           "evaluate_classifier", "majority_baseline", "encode_examples", "label_ids",
           "optimizer_state_bytes", "merged_state_dict", "save_classifier", "load_classifier",
           "predict_proba", "classify_texts", "CLASSIFIER_FILE"]

CLASSIFIER_FILE = "classifier.npz"


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


# ---- a saved classifier -----------------------------------------------------------------------------

def merged_state_dict(clf):
    """``clf.state_dict()`` with every LoRA adapter folded into its base weight (W + s A B, the
    ``merge_lora`` formula) and the adapter entries dropped; ``clf`` itself is not changed."""
    from ..lora import LoRALinear, named_modules
    state = clf.state_dict()
    for name, mod in named_modules(clf):
        if isinstance(mod, LoRALinear):
            A, B = state.pop(f"{name}.lora_A"), state.pop(f"{name}.lora_B")          # (in, r), (r, out)
            W = state[f"{name}.weight"]                                             # (in, out)
            state[f"{name}.weight"] = (W + (A * W.dtype.type(mod.scale)) @ B).astype(W.dtype)
    return state


def save_classifier(path, clf, labels, meta, finetune_config=None, **extra):
    """Write everything ``load_classifier`` needs to ``path`` (a ``.npz`` checkpoint): the GPT config,
    the merged weights and head, the label names (class i is ``labels[i]``), the tokenizer meta,
    the pooling and ``max_len`` (the context: texts are cut to their first ``max_len`` tokens)."""
    if len(labels) != clf.head.weight.shape[1]:
        raise ValueError(f"{len(labels)} labels for a head with {clf.head.weight.shape[1]} classes")
    save_checkpoint(path, {
        "kind": "classifier", "model": merged_state_dict(clf), "model_config": clf.gpt.config.to_dict(),
        "labels": list(labels), "meta": dict(meta), "pooling": "last", "max_len": clf.gpt.config.block_size,
        "finetune_config": finetune_config, **extra})


def load_classifier(path):
    """(classifier in eval mode, labels, tokenizer meta, max_len) from a ``save_classifier`` file or
    the directory holding ``classifier.npz``. Classifiers saved before adapters were merged at save
    time (``lora_A``/``lora_B`` entries) get them applied from their fine-tuning config and merged.
    Raises CheckpointError for a missing file or a checkpoint that is not a classifier."""
    from ..model import GPT, GPTConfig
    file = os.path.join(path, CLASSIFIER_FILE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise CheckpointError(f"no classifier at {file}; fine-tune one with "
                              f"`npgpt finetune-classify --out_dir DIR` and pass that DIR")
    ckpt = load_checkpoint(file)
    state = ckpt.get("model") or {}
    if "labels" not in ckpt or "head.weight" not in state or "model_config" not in ckpt:
        raise CheckpointError(f"{file} is an npgpt checkpoint but not a classifier (no labels or class head); "
                              f"a language model's ckpt.npz is used by `npgpt sample` / `npgpt eval`, "
                              f"a classifier is written by `npgpt finetune-classify --out_dir DIR`")
    if ckpt.get("pooling", "last") != "last":
        raise CheckpointError(f"{file}: unknown pooling {ckpt['pooling']!r}; this npgpt reads 'last'")
    labels = list(ckpt["labels"])
    clf = GPTClassifier(GPT(GPTConfig.from_dict(ckpt["model_config"])), len(labels))
    if any(k.endswith("lora_A") for k in state):
        from ..lora import apply_lora, merge_lora
        cfg = ckpt.get("finetune_config") or {}
        if not cfg.get("lora_r"):
            raise CheckpointError(f"{file} holds LoRA adapters but no LoRA settings (finetune_config.lora_r)")
        apply_lora(clf.gpt, cfg.get("lora_targets", ["attn.c_attn", "attn.c_proj"]), cfg["lora_r"],
                   cfg.get("lora_alpha", 16.0))
        clf.load_state_dict(state)
        merge_lora(clf.gpt)
    else:
        clf.load_state_dict(state)
    max_len = int(ckpt.get("max_len") or clf.gpt.config.block_size)
    return clf.eval(), labels, dict(ckpt.get("meta") or {}), max_len


@no_grad()
def predict_proba(clf, seqs, batch_size=32):
    """Class probabilities (N, K) as float64 NumPy for token sequences ``seqs`` (each at most the
    context long): softmax of the head's logits, in batches of sequences sorted by length."""
    clf.eval()
    order = np.argsort([len(s) for s in seqs], kind="stable")
    probs = np.empty((len(seqs), clf.head.weight.shape[1]), dtype=np.float64)
    for i in range(0, len(order), batch_size):
        b = order[i:i + batch_size]
        ids, lengths = pad_batch([seqs[j] for j in b])
        z = backend.to_numpy(clf(ids, lengths).data).astype(np.float64)           # (B, K)
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        probs[b] = e / e.sum(axis=-1, keepdims=True)
    return probs


def classify_texts(clf, tok, texts, max_len, batch_size=32):
    """(probabilities (N, K), token counts before truncation) of ``texts``. Each text is cut to its
    first ``max_len`` tokens, as training cut it (``encode_examples``); an empty text or a character
    the tokenizer lacks raises ValueError naming the text."""
    seqs, counts = [], []
    for n, text in enumerate(texts, 1):
        try:
            ids = list(tok.encode(text))
        except ValueError as e:
            chars = getattr(tok, "chars", None)
            if chars is None:
                raise ValueError(f"text {n}: {e}") from None
            unknown = "".join(sorted(set(text) - set(chars)))
            raise ValueError(f"text {n} has characters the classifier cannot read: {unknown[:20]!r}; a char-level "
                             f"model knows only the {len(chars)} characters it was trained and fine-tuned on: "
                             f"remove or replace them") from None
        if not ids:
            raise ValueError(f"text {n} is empty; give at least one character")
        counts.append(len(ids))
        seqs.append(ids[:max_len])
    return predict_proba(clf, seqs, batch_size), counts
