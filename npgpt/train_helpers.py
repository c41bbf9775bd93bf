"""The pieces of ``npgpt train``'s loop (``train.py``), in the order the loop uses them: the backend
and the data, init-or-resume, batches, the optimizer and its step, evaluation, checkpoints, the log.

``make_optimizer`` and ``train_step`` are also fine-tuning's (``npgpt.finetune``): every run builds
the same flat AdamW (decay on matrices only, clipping inside the step, optional fp16 mixed
precision) and steps it the same way.
"""
import json
import os
import time
from dataclasses import asdict

import numpy as np

from . import backend
from .checkpoint import save_checkpoint, load_checkpoint
from .data import load_split, get_batch, ensure_prepared, DeviceBatches
from .engine import no_grad
from .model import GPT, GPTConfig
from .optim import FlatAdamW, decay_groups
from .costs import peak_flops

__all__ = ["CKPT_NAME", "make_optimizer", "train_step", "use_backend", "load_data", "init_or_resume",
           "batch_source", "estimate_loss", "save_run", "RunLog", "load_model"]

CKPT_NAME = "ckpt.npz"


# ---- the optimizer and its step (pretraining and fine-tuning) ---------------------------------------

def make_optimizer(params, learning_rate, weight_decay, betas, grad_clip=0.0, dtype=None):
    """AdamW over flat buffers (``npgpt.optim.FlatAdamW``: every parameter becomes a view of one
    buffer, so never rebind its ``.data``): weight decay on matrices only (``decay_groups``),
    global-norm clipping at ``grad_clip`` (0: none) inside the step, and with ``dtype="float16"``
    fp16 compute with float32 master weights and dynamic loss scaling. ``params``: the parameters
    that train (a frozen one must not be in it)."""
    return FlatAdamW(decay_groups(list(params), weight_decay), lr=learning_rate, betas=betas, dtype=dtype,
                     max_grad_norm=grad_clip)


def train_step(opt, micro_batch_loss, accumulation_steps=1):
    """One optimizer step: ``accumulation_steps`` times ``micro_batch_loss()`` (the loss Tensor of the
    next micro-batch) and its backward, scaled by 1/accumulation_steps (and by the loss scale under
    fp16); then the step, which clips and skips (fp16) a step with inf/nan gradients, and zeroed
    gradients. Returns the last micro-batch's loss Tensor."""
    for _ in range(accumulation_steps):
        loss = micro_batch_loss()
        opt.backward(loss * (1.0 / accumulation_steps))
    opt.step()
    opt.zero_grad()
    return loss


# ---- set-up: backend, data, model and optimizer -----------------------------------------------------

def use_backend(cfg):
    """NumPy or CuPy, TF32 or not, and the default dtype (float32 under fp16: the master weights)."""
    backend.use("cupy" if cfg.device == "cuda" else "numpy")
    backend.set_tf32(cfg.tf32)
    backend.set_default_dtype("float32" if cfg.dtype == "float16" else cfg.dtype)


def load_data(cfg):
    """(meta, {"train": ids, "val": ids}) of ``cfg.data``; only the default directory (the bundled
    Shakespeare) is prepared on first use."""
    default = type(cfg).data
    if cfg.data != default and not os.path.exists(os.path.join(cfg.data, "meta.json")):
        raise FileNotFoundError(f"{cfg.data} holds no prepared data: run npgpt prepare --out {cfg.data} "
                                f"[--input FILES] [--tokenizer char|gpt2] first (only the default "
                                f"{default} is prepared automatically)")
    meta = ensure_prepared(cfg.data)
    return meta, {"train": load_split(cfg.data, "train"), "val": load_split(cfg.data, "val")}


def _make_training_optimizer(model, cfg):
    return make_optimizer(model.parameters(), cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                          cfg.grad_clip, "float16" if cfg.dtype == "float16" else None)


def init_or_resume(cfg, meta, log):
    """(model, optimizer, iter_num, best_val_loss, batch_rng): a new model, or the checkpoint in
    ``cfg.out_dir`` with its optimizer moments, step and random-generator states (so the resumed run
    continues bit for bit)."""
    batch_rng = np.random.default_rng(cfg.seed)
    backend.seed(cfg.seed)
    iter_num, best_val = 0, float("inf")
    if cfg.init_from == "resume":
        ckpt_path = os.path.join(cfg.out_dir, CKPT_NAME)
        ckpt = load_checkpoint(ckpt_path)
        model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        opt = _make_training_optimizer(model, cfg)
        opt.load_state_dict(ckpt["optimizer"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        batch_rng.bit_generator.state = ckpt["batch_rng"]
        if ckpt.get("backend_rng") and backend.name == "numpy":
            backend.rng().bit_generator.state = ckpt["backend_rng"]
        else:
            backend.seed(cfg.seed + iter_num)
        log(f"resuming from {ckpt_path} at iteration {iter_num}")
    else:
        model = GPT(cfg.model_config(meta["vocab_size"]))
        opt = _make_training_optimizer(model, cfg)
    if cfg.dtype == "float16" and backend.name == "numpy":
        log("note: float16 on the CPU is nearly 100x slower than float32 (NumPy has no fp16 BLAS); it is there to "
            "check mixed precision without a GPU. Train on the CPU with dtype=float32.")
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, "
        f"backend {backend.name}, {cfg.dtype}")
    return model, opt, iter_num, best_val, batch_rng


def batch_source(train_data, cfg, iter_num, batch_rng):
    """``next_batch() -> x, y`` (B, T). On CuPy the split lives on the GPU and batches are drawn there
    (seeded with seed + iter_num); on NumPy the host draws them with ``batch_rng`` (checkpointed)."""
    if backend.name == "cupy":
        return DeviceBatches(train_data, cfg.batch_size, cfg.block_size, cfg.seed + iter_num)
    return lambda: get_batch(train_data, cfg.batch_size, cfg.block_size, batch_rng)


# ---- evaluation and checkpoints ---------------------------------------------------------------------

@no_grad()
def estimate_loss(model, splits, cfg, seed):
    """Mean loss over ``eval_iters`` batches of each split, from a generator seeded afresh (so every
    evaluation sees the same batches and training's random stream is untouched)."""
    model.eval()
    out = {}
    for name, data in splits.items():
        rng = np.random.default_rng(seed)
        total = 0.0   # summed on the device: one host read per split, not one per batch
        for _ in range(cfg.eval_iters):
            total = total + model(*get_batch(data, cfg.batch_size, cfg.block_size, rng))[1].data
        out[name] = float(total) / cfg.eval_iters
    model.train()
    return out


def _rng_state(gen):
    """JSON-able state of a NumPy Generator (None for CuPy's, which is reseeded on resume)."""
    state = getattr(getattr(gen, "bit_generator", None), "state", None)
    return state if isinstance(state, dict) else None


def save_run(cfg, model, opt, meta, iter_num, best_val, losses, batch_rng):
    """Write ``out_dir/ckpt.npz`` atomically: the (float32 master) weights, the optimizer, the step,
    the losses and the random-generator states."""
    save_checkpoint(os.path.join(cfg.out_dir, CKPT_NAME), {
        "model": opt.master_state_dict(model), "optimizer": opt.state_dict(),
        "model_config": model.config.to_dict(), "train_config": asdict(cfg), "meta": meta,
        "iter_num": iter_num, "best_val_loss": best_val, "val_loss": losses.get("val"),
        "batch_rng": _rng_state(batch_rng), "backend_rng": _rng_state(backend.rng())})


def load_model(out_dir):
    """(model, checkpoint dict) from ``out_dir/ckpt.npz``, in eval mode on the active backend."""
    ckpt = load_checkpoint(os.path.join(out_dir, CKPT_NAME))
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


# ---- the log --------------------------------------------------------------------------------------

class RunLog:
    """What a run reports: ``out_dir/log.jsonl`` (one record per evaluation, {"iter", "train_loss",
    "val_loss", "time"}, and one per log line, {"iter", "loss", "lr", "tokens_per_s", "grad_norm"}
    plus "mfu" when ``model`` is given and "loss_scale" and "skipped_steps" under fp16), the tqdm bar,
    and ``history``, the loss of every step. Step losses stay on the device until the next log line
    reads them all at once.

    MFU as nanoGPT's: model FLOPs per token (6N + 12LHQT, ``GPT.estimate_flops_per_token``) times
    tokens/s over the machine's peak (``profiler.peak_flops``: a float32 GEMM measured once per
    process on the CPU, the GPU's dense peak), a fraction; the bar shows it in percent."""

    def __init__(self, cfg, iter_num, log, model=None):
        self.cfg, self.log = cfg, log
        self.flops_per_token = self.peak = None
        if model is not None:
            self.flops_per_token = model.estimate_flops_per_token()
            self.peak = peak_flops(cfg.dtype, cfg.tf32)[0]    # no random stream is touched
        self.file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a")
        self.bar = None
        if cfg.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=cfg.max_iters, initial=iter_num, unit="it", dynamic_ncols=True)
        self.tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        self.history, self.pending = [], []
        self.t_start = self.t_last = time.time()

    def _write(self, record):
        self.file.write(json.dumps(record) + "\n")

    def evaluation(self, iter_num, losses):
        """Print ``step N: train loss X, val loss Y`` and write the evaluation record."""
        msg = f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        (self.bar.write if self.bar else self.log)(msg)
        self._write({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                     "time": time.time() - self.t_start})
        self.file.flush()

    def step(self, iter_num, loss, lr, opt):
        """Record the step that brought the run to ``iter_num``; every ``log_interval`` steps (and at
        the last) read the pending losses and write a log record."""
        cfg = self.cfg
        self.pending.append(loss.data)
        if self.bar:
            self.bar.update(1)
        if iter_num % cfg.log_interval != 0 and iter_num < cfg.max_iters:
            return
        self.history.extend(float(v) for v in backend.to_numpy(backend.xp.stack(self.pending)))
        loss_now = self.history[-1]
        elapsed = time.time() - self.t_last
        self.t_last = time.time()
        tokens_per_s = self.tokens_per_iter * len(self.pending) / max(elapsed, 1e-9)   # since the last line
        self.pending.clear()
        record = {"iter": iter_num, "loss": loss_now, "lr": lr, "tokens_per_s": tokens_per_s,
                  "grad_norm": float(opt.grad_norm)}
        if self.flops_per_token:
            record["mfu"] = self.flops_per_token * tokens_per_s / self.peak
        if opt.mixed:
            record.update(loss_scale=opt.loss_scale, skipped_steps=opt.skipped_steps)
        self._write(record)
        if self.bar:
            postfix = {"loss": f"{loss_now:.4f}", "lr": f"{lr:.2e}", "tok_s": f"{tokens_per_s:,.0f}"}
            if "mfu" in record:
                postfix["mfu"] = f"{100 * record['mfu']:.2f}%"
            self.bar.set_postfix(postfix)

    def seconds(self):
        """Seconds since the loop started."""
        return time.time() - self.t_start

    def close(self):
        if self.bar:
            self.bar.close()
        self.file.close()
