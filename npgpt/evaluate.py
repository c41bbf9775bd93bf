"""Evaluation: perplexity and bits per byte of a text, and multiple-choice accuracy.

Perplexity uses a strided sliding window (as in Hugging Face's perplexity guide). A text of N
tokens t_0 .. t_{N-1} has N - 1 predictions (t_0 has no context). Windows of at most block_size
inputs start every ``stride`` tokens; each window scores only the targets that earlier windows did
not, so every prediction is scored exactly once, with between block_size - stride and block_size
tokens of context (all of it near the start). stride = block_size gives disjoint windows (fast,
little context for the first tokens of each); smaller strides cost block_size / stride times the
compute for more context per token.

    ppl = exp(total nats / predictions)          bits per byte = total nats / (ln 2 * bytes)

where bytes counts the UTF-8 bytes of the predicted tokens (the text minus its first token), so
bits per byte compares models with different tokenizers.

Multiple choice: each choice is scored by the log-likelihood of its tokens given the context,
summed (``sum``) or averaged over its tokens (``mean``); the highest score is the prediction.
Both are always reported, as HellaSwag's evaluations do:

    acc       argmax_i  sum_t log p(e_i,t | ctx, e_i,<t)
    acc_norm  argmax_i  (1 / n_i) sum_t log p(e_i,t | ctx, e_i,<t)     n_i = tokens of ending i

The sum favours short endings (every token adds a negative term); the per-token mean removes that
bias. (This mean per token is nanoGPT's / llm.c's acc_norm; lm-evaluation-harness divides by the
ending's characters instead.)

Two JSONL formats are read, told apart row by row: npgpt's ``{"context", "choices", "label"}``
(choices appended to the context as they are) and HellaSwag's ``{"ctx", "endings", "label"}``,
where each ending follows the context after one space. Rows of the original HellaSwag files carry
``ctx`` (= ctx_a + " " + ctx_b); a row with only ``ctx_a``/``ctx_b`` gets
ctx_a + " " + ctx_b.capitalize(), lm-evaluation-harness's rendering.
"""
import json
import math
import os
import time

import numpy as np

from . import backend
from .engine import no_grad

__all__ = ["strided_windows", "target_logprobs", "perplexity", "evaluate_text", "bits_per_byte",
           "encode_choice", "score_choices", "multiple_choice", "load_mc", "mc_item", "hellaswag_item",
           "resolve_mc", "MC_EXAMPLE", "HELLASWAG_SAMPLE", "BUNDLED_MC"]

MC_EXAMPLE = os.path.join(os.path.dirname(__file__), "data", "mc_example.jsonl")
HELLASWAG_SAMPLE = os.path.join(os.path.dirname(__file__), "data", "hellaswag_sample.jsonl")
BUNDLED_MC = {"example": MC_EXAMPLE, "hellaswag_sample": HELLASWAG_SAMPLE}   # names --mc accepts
IGNORE = -100


def strided_windows(n_tokens, block_size, stride):
    """Windows (begin, end, n_new) over ``n_tokens`` token ids: inputs ids[begin:end] (at most
    ``block_size``), targets ids[begin+1:end+1], of which the last ``n_new`` are scored. Over all
    windows the scored targets are ids[1:], each once."""
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"the text must encode to at least 2 tokens to score a prediction, got {n_tokens}")
    out, prev = [], 0                      # targets ids[1..prev] are scored already
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + block_size, n_tokens - 1)
        out.append((begin, end, end - prev))
        prev = end
        if end == n_tokens - 1:
            break
    return out


@no_grad()
def target_logprobs(model, x, y):
    """log p(y | x) per position: x, y integer arrays (B, T); returns a float64 NumPy array (B, T) with
    0 where y == -100."""
    was_training = model.training
    model.eval()
    try:
        logits = model(x)[0].data                                          # (B, T, V)
    finally:
        model.train(was_training)
    xp = backend.get_array_module(logits)
    y = backend.to_device(np.asarray(y))
    keep = y != IGNORE
    t = xp.where(keep, y, 0)
    m = logits.max(axis=-1)                                                # (B, T)
    picked = xp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]    # (B, T) x[y]
    E = logits - m[..., None]                                              # (B, T, V), one temporary
    xp.exp(E, out=E)
    lse = m + xp.log(E.sum(axis=-1))                                       # (B, T) log sum_j e^x_j
    return backend.to_numpy(xp.where(keep, picked - lse, 0.0)).astype(np.float64)


def perplexity(model, ids, stride=None, batch_size=1, progress=False):
    """Strided sliding-window evaluation of token ids (1-D) -> dict with ``nll`` (total nats),
    ``tokens`` (predictions scored), ``loss`` (nats/token), ``ppl``, ``seconds``, ``tokens_per_s``."""
    ids = np.asarray(backend.to_numpy(ids)).reshape(-1).astype(np.int64)
    bs = model.config.block_size
    stride = max(bs // 2, 1) if stride is None else int(stride)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wins = strided_windows(len(ids), bs, stride)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(ids) - 1, unit="tok", dynamic_ncols=True, desc="perplexity")
    total, count, t0 = 0.0, 0, time.time()
    i = 0
    try:
        while i < len(wins):   # batch consecutive windows of equal length
            L = wins[i][1] - wins[i][0]
            group = [wins[i]]
            while len(group) < batch_size and i + len(group) < len(wins) and \
                    wins[i + len(group)][1] - wins[i + len(group)][0] == L:
                group.append(wins[i + len(group)])
            x = np.stack([ids[b:e] for b, e, _ in group])                   # (B, L)
            y = np.stack([ids[b + 1:e + 1] for b, e, _ in group])           # (B, L)
            for r, (_, _, n_new) in enumerate(group):
                y[r, :L - n_new] = IGNORE                                     # scored by an earlier window
            total += float(target_logprobs(model, x, y).sum()) * -1.0
            new = sum(n for _, _, n in group)
            count += new
            if bar:
                bar.update(new)
            i += len(group)
    finally:
        if bar:
            bar.close()
    dt = time.time() - t0
    return {"nll": total, "tokens": count, "loss": total / count, "ppl": math.exp(total / count),
            "stride": stride, "windows": len(wins), "seconds": dt, "tokens_per_s": count / max(dt, 1e-9)}


def bits_per_byte(nats, n_bytes):
    """Total nats over ``n_bytes`` UTF-8 bytes in bits per byte: nats / (ln 2 * n_bytes)."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}")
    return nats / (math.log(2) * n_bytes)


def _encode(tok, text):
    try:
        return list(tok.encode(text, allowed_special="all"))
    except TypeError:
        return list(tok.encode(text))


def _n_bytes(tok, ids):
    if hasattr(tok, "decode_bytes"):
        return len(tok.decode_bytes(list(ids)))
    return len(tok.decode(list(ids)).encode("utf-8"))


def evaluate_text(model, tok, text, stride=None, batch_size=1, max_tokens=None, progress=False):
    """``perplexity`` of ``text`` under ``model`` with tokenizer ``tok``, plus ``bytes`` and ``bpb``
    (bits per UTF-8 byte of the predicted tokens). ``max_tokens`` keeps the first that many tokens."""
    ids = _encode(tok, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids and max(ids) >= model.config.vocab_size:
        raise ValueError(f"the tokenizer produced id {max(ids)}, outside the model's vocabulary "
                         f"(vocab_size {model.config.vocab_size}); evaluate with the model's own tokenizer")
    res = perplexity(model, ids, stride, batch_size, progress)
    n_bytes = _n_bytes(tok, ids) - _n_bytes(tok, ids[:1])
    res["bytes"] = n_bytes
    res["bpb"] = bits_per_byte(res["nll"], n_bytes)
    return res


def encode_choice(tok, context, choice):
    """(context ids, choice ids). The choice's ids are those the tokenizer gives it after the context
    (the tail of encode(context + choice)) when that encoding extends the context's, else its own."""
    ctx, whole = _encode(tok, context), _encode(tok, context + choice)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else _encode(tok, choice)
    if not cont:
        raise ValueError(f"choice {choice!r} encodes to no tokens")
    if not ctx:
        eot = getattr(tok, "eot_token", None)
        if eot is None:
            raise ValueError("the context encodes to no tokens; multiple-choice items need a non-empty context")
        ctx = [eot]
    return ctx, cont


def score_choices(model, tok, context, choices):
    """[(sum of log p over the choice's tokens, number of tokens)] for each choice, one batched pass."""
    bs = model.config.block_size
    rows = []
    for ch in choices:
        ctx, cont = encode_choice(tok, context, ch)
        if len(cont) > bs:
            raise ValueError(f"choice {ch!r} is {len(cont)} tokens, longer than the model's block_size {bs}")
        seq = (ctx + cont)[-(bs + 1):]                  # keep the last block_size inputs
        rows.append((seq[:-1], seq[1:], len(cont)))
    L = max(len(x) for x, _, _ in rows)
    x = np.zeros((len(rows), L), dtype=np.int64)        # right-padded: causal, so pads change nothing before them
    y = np.full((len(rows), L), IGNORE, dtype=np.int64)
    for r, (xi, yi, n) in enumerate(rows):
        x[r, :len(xi)] = xi
        y[r, len(yi) - n:len(yi)] = yi[len(yi) - n:]
    lp = target_logprobs(model, x, y)                   # (n_choices, L)
    return [(float(lp[r].sum()), n) for r, (_, _, n) in enumerate(rows)]


def resolve_mc(name):
    """The path of a multiple-choice task: a bundled name (``BUNDLED_MC``) or a file path."""
    return BUNDLED_MC.get(name, name)


def _label(row, n_choices):
    label = row.get("label")
    if isinstance(label, str) and label.strip().isdigit():     # the Hugging Face copy stores "3"
        label = int(label)
    if label in ("", None):
        raise ValueError("no label (HellaSwag's test split is unlabeled: evaluate on the val split)")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n_choices:
        raise ValueError(f"label must be an index into the {n_choices} choices, got {label!r}")
    return label


def hellaswag_item(row):
    """{"context", "choices", "label"} of a HellaSwag row: the context is ``ctx``, or, when a row has
    none, ctx_a + " " + ctx_b.capitalize(); each ending becomes the choice " " + ending."""
    ctx = row.get("ctx")
    if ctx is None:
        a, b = row.get("ctx_a"), row.get("ctx_b", "")
        if not isinstance(a, str) or not isinstance(b, str):
            raise ValueError('a HellaSwag row needs "ctx" (or "ctx_a" and "ctx_b"), strings')
        ctx = f"{a} {b.capitalize()}" if b.strip() else a
    endings = row.get("endings")
    if not isinstance(ctx, str) or not ctx.strip():
        raise ValueError('"ctx" must be a non-empty string')
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e.strip() for e in endings):
        raise ValueError('"endings" must be a list of at least 2 non-empty strings')
    return {"context": ctx, "choices": [" " + e for e in endings], "label": _label(row, len(endings))}


def mc_item(row):
    """One multiple-choice item from a JSONL row of either format (HellaSwag's when it has
    "endings"); ValueError naming what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "endings" in row:
        return {**hellaswag_item(row), "format": "hellaswag"}
    if "choices" not in row:
        raise ValueError('expected {"context": str, "choices": [str, ...], "label": i} or HellaSwag\'s '
                         '{"ctx": str, "endings": [str, ...], "label": i}')
    ok = (isinstance(row.get("context"), str) and isinstance(row["choices"], list) and len(row["choices"]) >= 2
          and all(isinstance(c, str) for c in row["choices"]))
    if not ok:
        raise ValueError('expected {"context": str, "choices": [str, str, ...], "label": index into choices}')
    return {"context": row["context"], "choices": row["choices"], "label": _label(row, len(row["choices"])),
            "format": "choices"}


def load_mc(path):
    """Multiple-choice items {"context", "choices", "label", "format"} from a JSONL file in npgpt's
    or HellaSwag's format (``mc_item``); a bad row raises one ValueError naming file and line."""
    path = resolve_mc(path)
    if not os.path.exists(path):
        raise ValueError(f"multiple-choice file {path} not found (bundled tasks: {', '.join(BUNDLED_MC)})")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            try:
                items.append(mc_item(row))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}; got {line.strip()[:200]}") from None
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def multiple_choice(model, tok, items, normalize="sum", progress=False):
    """Accuracy on ``items`` (dicts as ``load_mc`` returns) by both scores: ``acc`` (summed
    log-likelihood of each choice) and ``acc_norm`` (per token mean), with ``correct_sum`` /
    ``correct_norm`` and ``n``. ``normalize`` ("sum" or "mean") picks which one ``accuracy``,
    ``correct``, ``predictions`` and ``scores`` report; ``loglik`` and ``n_tokens`` hold each choice's sum and
    token count."""
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
    it = items
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(items, unit="item", dynamic_ncols=True, desc="multiple choice")
    loglik, n_tokens, pred_sum, pred_mean = [], [], [], []
    for item in it:
        scored = score_choices(model, tok, item["context"], item["choices"])
        sums = [ll for ll, _ in scored]
        means = [ll / n for ll, n in scored]
        loglik.append(sums)
        n_tokens.append([n for _, n in scored])
        pred_sum.append(int(np.argmax(sums)))
        pred_mean.append(int(np.argmax(means)))
    labels = [item["label"] for item in items]
    correct = sum(p == l for p, l in zip(pred_sum, labels))
    correct_norm = sum(p == l for p, l in zip(pred_mean, labels))
    n = len(items)
    by_sum = normalize == "sum"
    scores = loglik if by_sum else [[ll / k for ll, k in zip(lls, ns)] for lls, ns in zip(loglik, n_tokens)]
    return {"acc": correct / n, "acc_norm": correct_norm / n, "correct_sum": correct, "correct_norm": correct_norm,
            "accuracy": (correct if by_sum else correct_norm) / n, "correct": correct if by_sum else correct_norm,
            "n": n, "normalize": normalize, "predictions": pred_sum if by_sum else pred_mean,
            "predictions_sum": pred_sum, "predictions_norm": pred_mean, "scores": scores,
            "loglik": loglik, "n_tokens": n_tokens}
