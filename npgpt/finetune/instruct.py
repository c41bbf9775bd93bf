"""Instruction fine-tuning (Alpaca format; Taori et al. 2023) with the loss on the response only.

Each example ``{"instruction", "input", "output"}`` becomes

    prompt   = Alpaca template with the instruction (and the input, when there is one)
    sequence = prompt + output + END

and the model is trained on next-token prediction over ``sequence`` with every target inside the
prompt, and every padding position, set to -100 (``cross_entropy``'s ignore_index): the model is
graded only on writing the response and its end. END is the tokenizer's ``eot_token``
(``<|endoftext|>`` for GPT-2 BPE) when it has one; a character tokenizer has no spare symbol, so
END is the text ``"\\n\\n"`` (``CHAR_END``), which never occurs inside the bundled responses
(single lines); generation stops when it appears.

Batches are right-padded to the longest sequence in the batch (dynamic padding).
"""
import json
import os

import numpy as np

from .. import backend
from ..engine import no_grad
from .base import check_dtype, finetune_optimizer, run_steps

__all__ = ["PROMPT_WITH_INPUT", "PROMPT_NO_INPUT", "CHAR_END", "IGNORE_INDEX", "format_prompt",
           "end_ids", "encode_instruction", "collate", "fit_examples", "load_instructions", "InstructConfig",
           "train_instruct", "evaluate_instruct", "generate_response", "CHAT_KEY", "chat_template",
           "checkpoint_chat_template", "chat_prompt"]

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
CHAR_END = "\n\n"
IGNORE_INDEX = -100
CHAT_KEY = "instruct"          # the checkpoint entry that holds ``chat_template(tok)``


def format_prompt(ex):
    """The Alpaca prompt of one example (the input section only when ``input`` is non-empty)."""
    if ex.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=ex["instruction"], input=ex["input"])
    return PROMPT_NO_INPUT.format(instruction=ex["instruction"])


def end_ids(tok):
    """Token ids that end a response: [eot_token] if the tokenizer has one, else encode(CHAR_END)."""
    eot = getattr(tok, "eot_token", None)
    return [int(eot)] if eot is not None else list(tok.encode(CHAR_END))


def chat_template(tok):
    """What ``npgpt chat`` needs to talk to a model tuned here with ``tok``, as a checkpoint stores it
    (under ``CHAT_KEY``): the Alpaca prompts and the end marker's text."""
    return {"template": "alpaca", "prompt_with_input": PROMPT_WITH_INPUT, "prompt_no_input": PROMPT_NO_INPUT,
            "end": tok.decode(end_ids(tok))}


def checkpoint_chat_template(ckpt, tok):
    """The chat template of an instruction-tuned checkpoint dict: its ``CHAT_KEY`` entry, or, for a
    ``finetune-instruct`` checkpoint saved before that entry existed (it has a ``lora_config`` key
    and no ``train_config``), ``chat_template(tok)``. Any other checkpoint: ValueError."""
    if ckpt.get(CHAT_KEY):
        return ckpt[CHAT_KEY]
    if "lora_config" in ckpt and "train_config" not in ckpt:
        return chat_template(tok)
    raise ValueError("this checkpoint was not instruction-tuned (no chat template in it): sample from it "
                     "with `npgpt sample --out_dir DIR --start TEXT`, or tune it first with "
                     "`npgpt finetune-instruct --init_from DIR --out_dir NEW`")


def chat_prompt(template, instruction, input=""):
    """The prompt text for one question in a ``chat_template`` (as ``format_prompt`` builds it)."""
    if input:
        return template["prompt_with_input"].format(instruction=instruction, input=input)
    return template["prompt_no_input"].format(instruction=instruction)


def encode_instruction(ex, tok):
    """(x, y) token lists of one example: x = seq[:-1], y = seq[1:] with the prompt's targets -100.

    seq = prompt + output + END. Target y[i] predicts seq[i + 1]; it belongs to the response when
    i + 1 >= len(prompt), so y[:len(prompt) - 1] is masked.
    """
    prompt = list(tok.encode(format_prompt(ex)))
    response = list(tok.encode(ex["output"])) + end_ids(tok)
    seq = prompt + response
    y = seq[1:]
    y[:len(prompt) - 1] = [IGNORE_INDEX] * (len(prompt) - 1)
    return seq[:-1], y


def collate(pairs, pad_id=0):
    """Right-pad (x, y) pairs to the longest: x with ``pad_id``, y with -100. -> x, y (B, T) int64."""
    if not pairs:
        raise ValueError("collate needs at least one example")
    T = max(len(x) for x, _ in pairs)
    inputs = np.full((len(pairs), T), pad_id, dtype=np.int64)            # (B, T)
    targets = np.full((len(pairs), T), IGNORE_INDEX, dtype=np.int64)     # (B, T)
    for i, (x, y) in enumerate(pairs):
        inputs[i, :len(x)] = x
        targets[i, :len(y)] = y
    return inputs, targets


def load_instructions(path):
    """Examples from an Alpaca JSON file (a list of objects) or JSONL (one object a line); each needs
    ``instruction`` and ``output`` (``input`` may be missing or empty)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; give an Alpaca-style JSON or JSONL file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON/JSONL ({e}); give a list of "
                         f"{{instruction, input, output}} objects or one object per line") from None
    for i, ex in enumerate(data):
        if not isinstance(ex, dict) or "instruction" not in ex or "output" not in ex:
            raise ValueError(f"{path}: example {i + 1} needs 'instruction' and 'output' keys")
        ex.setdefault("input", "")
    if not data:
        raise ValueError(f"{path} holds no examples")
    return data


def fit_examples(examples, tok, block_size):
    """(encoded pairs, kept examples): examples whose sequence fits ``block_size`` tokens."""
    pairs, kept = [], []
    for ex in examples:
        x, y = encode_instruction(ex, tok)
        if len(x) <= block_size:
            pairs.append((x, y))
            kept.append(ex)
    return pairs, kept


class InstructConfig:
    """Fine-tuning knobs (keyword arguments; see the defaults). ``dtype="float16"``: fp16 compute of
    the trained parameters, float32 master weights."""

    def __init__(self, max_iters=300, batch_size=8, learning_rate=1e-3, weight_decay=0.0, grad_clip=1.0,
                 warmup_iters=20, seed=0, dtype=None):
        if max_iters < 0 or batch_size < 1 or learning_rate <= 0:
            raise ValueError("max_iters must be >= 0, batch_size >= 1 and learning_rate > 0")
        check_dtype(dtype)
        self.max_iters, self.batch_size, self.learning_rate = max_iters, batch_size, learning_rate
        self.weight_decay, self.grad_clip, self.warmup_iters, self.seed = weight_decay, grad_clip, warmup_iters, seed
        self.dtype = dtype


def train_instruct(model, pairs, cfg, pad_id=0, log=print):
    """Fine-tune a GPT on encoded (x, y) pairs with the masked loss; only parameters that require
    gradients train (so it works after ``apply_lora``). Returns {"losses", "step_time"}."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = finetune_optimizer(params, cfg)
    model.train()

    def loss_of(batch):
        x, y = collate([pairs[i] for i in batch], pad_id)
        return model(x, y)[1]
    losses, times = run_steps(cfg, len(pairs), loss_of, opt, log)
    model.eval()
    return {"losses": losses, "step_time": float(np.median(times)) if times else 0.0}


@no_grad()
def generate_response(model, tok, ex, max_new_tokens=64):
    """Greedy continuation of the example's prompt until END (or ``max_new_tokens``), decoded."""
    end = end_ids(tok)
    prompt = list(tok.encode(format_prompt(ex)))
    room = model.config.block_size - len(prompt)
    if room < 1:
        raise ValueError(f"the prompt has {len(prompt)} tokens, no room within block_size {model.config.block_size}")
    out = []
    for ids in model.generate_stream(np.asarray(prompt)[None, :], min(max_new_tokens, room), temperature=0):
        out.append(int(backend.to_numpy(ids)[0]))
        if out[-len(end):] == end:
            out = out[:-len(end)]
            break
    return tok.decode(out)


@no_grad()
def evaluate_instruct(model, examples, tok, batch_size=16, max_new_tokens=64, generate=True):
    """Scores on held-out examples: exact match of the greedy response (after stripping spaces),
    and the mean log-likelihood per reference token (response + END) under teacher forcing.
    Returns {"exact_match", "loglik_per_token", "by_task": {...}, "n"}."""
    model.eval()
    pairs = [encode_instruction(ex, tok) for ex in examples]
    nll = np.zeros(len(pairs))
    ntok = np.zeros(len(pairs))
    for i in range(0, len(pairs), batch_size):
        x, y = collate(pairs[i:i + batch_size])
        logits, _ = model(x)
        shifted = backend.to_numpy(logits.data).astype(np.float64)           # (B, T, V)
        shifted = shifted - shifted.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))      # (B, T, V)
        keep = y != IGNORE_INDEX
        tok_lp = np.take_along_axis(logp, np.where(keep, y, 0)[..., None], -1)[..., 0] * keep
        nll[i:i + len(x)] = -tok_lp.sum(1)
        ntok[i:i + len(x)] = keep.sum(1)
    exact = np.zeros(len(examples), dtype=bool)
    if generate:
        for j, ex in enumerate(examples):
            exact[j] = generate_response(model, tok, ex, max_new_tokens).strip() == ex["output"].strip()
    tasks = sorted({ex.get("task", "all") for ex in examples})
    by_task = {}
    for t in tasks:
        m = np.array([ex.get("task", "all") == t for ex in examples])
        by_task[t] = {"n": int(m.sum()), "exact_match": float(exact[m].mean()) if generate else None,
                      "loglik_per_token": float(-nll[m].sum() / ntok[m].sum())}
    return {"n": len(examples), "exact_match": float(exact.mean()) if generate else None,
            "loglik_per_token": float(-nll.sum() / max(ntok.sum(), 1)), "by_task": by_task}
