"""The training loop: AdamW with warmup + cosine decay, gradient accumulation and clipping,
periodic evaluation, a JSONL log and atomic checkpoints that resume exactly.

Knob names are nanoGPT's, so a user's config carries over. Resuming restores the model, the
optimizer moments, the step, and the states of the batch and dropout random generators: N steps
straight and N/2 steps + resume + N/2 steps give identical losses.
"""
import json
import math
import os
import time
from dataclasses import dataclass, asdict, fields

import numpy as np

from . import backend
from .checkpoint import save_checkpoint, load_checkpoint
from .data import load_split, get_batch, ensure_prepared, DeviceBatches
from .engine import no_grad
from .model import GPT, GPTConfig
from .optim import get_lr

__all__ = ["TrainConfig", "train", "load_model", "estimate_loss"]

CKPT_NAME = "ckpt.npz"


@dataclass
class TrainConfig:
    """Everything a run needs; defaults train the baby Shakespeare char model on a 2-core CPU."""
    data: str = "data/shakespeare_char"
    out_dir: str = "out-shakespeare-char"
    init_from: str = "scratch"            # scratch | resume
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    pos: str = "learned"
    # optimization
    batch_size: int = 12
    gradient_accumulation_steps: int = 1
    max_iters: int = 5000
    learning_rate: float = 2e-3
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 5000
    min_lr: float = 2e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # evaluation and logging
    eval_interval: int = 500
    eval_iters: int = 50
    log_interval: int = 50
    always_save_checkpoint: bool = True
    seed: int = 1337
    device: str = "cpu"                   # cpu (numpy) | cuda (cupy)
    dtype: str = "float32"                # float32 | float16 (mixed precision: fp32 master weights,
                                          # dynamic loss scaling) | float64 (checks)
    tf32: bool = False                    # float32 matmuls on TF32 tensor cores (cuda only)
    progress: bool = True

    def __post_init__(self):
        if self.init_from not in ("scratch", "resume"):
            raise ValueError(f"init_from must be 'scratch' or 'resume', got {self.init_from!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in ("float32", "float16", "float64"):
            raise ValueError(f"dtype must be float32, float16 (mixed precision) or float64, got {self.dtype!r}")
        for k in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.max_iters < 0 or self.learning_rate <= 0:
            raise ValueError("max_iters must be >= 0 and learning_rate > 0")

    def model_config(self, vocab_size):
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias,
                         pos=self.pos)

    @classmethod
    def field_types(cls):
        return {f.name: f.type for f in fields(cls)}


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


def load_model(out_dir):
    """(model, checkpoint dict) from ``out_dir/ckpt.npz``, in eval mode on the active backend."""
    ckpt = load_checkpoint(os.path.join(out_dir, CKPT_NAME))
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def make_optimizer(model, cfg):
    """The training optimizer: AdamW over flat buffers with clipping inside the step, fp16 mixed
    precision when ``cfg.dtype == "float16"`` (see ``npgpt.mixed_precision``)."""
    return model.configure_optimizer(cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), flat=True,
                                     dtype="float16" if cfg.dtype == "float16" else None,
                                     max_grad_norm=cfg.grad_clip)


def train(cfg, log=print):
    """Train (or resume) as configured; returns {"iter", "train_loss", "val_loss", "losses", "seconds"}."""
    backend.use("cupy" if cfg.device == "cuda" else "numpy")
    backend.set_tf32(cfg.tf32)
    backend.set_default_dtype("float32" if cfg.dtype == "float16" else cfg.dtype)  # fp16: fp32 master
    if cfg.data != TrainConfig.data and not os.path.exists(os.path.join(cfg.data, "meta.json")):
        raise FileNotFoundError(f"{cfg.data} holds no prepared data: run npgpt prepare --out {cfg.data} "
                                f"[--input FILES] [--tokenizer char|gpt2] first (only the default "
                                f"{TrainConfig.data} is prepared automatically)")
    meta = ensure_prepared(cfg.data)
    train_data, val_data = load_split(cfg.data, "train"), load_split(cfg.data, "val")
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, CKPT_NAME)

    batch_rng = np.random.default_rng(cfg.seed)
    backend.seed(cfg.seed)
    iter_num, best_val = 0, float("inf")
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
        model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        opt = make_optimizer(model, cfg)
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
        opt = make_optimizer(model, cfg)
    if cfg.dtype == "float16" and backend.name == "numpy":
        log("note: float16 on the CPU is nearly 100x slower than float32 (NumPy has no fp16 BLAS); it is there to "
            "check mixed precision without a GPU. Train on the CPU with dtype=float32.")
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, "
        f"backend {backend.name}, {cfg.dtype}")

    def save(it, losses):
        save_checkpoint(ckpt_path, {
            "model": opt.master_state_dict(model), "optimizer": opt.state_dict(),
            "model_config": model.config.to_dict(), "train_config": asdict(cfg), "meta": meta,
            "iter_num": it, "best_val_loss": best_val, "val_loss": losses.get("val"),
            "batch_rng": _rng_state(batch_rng), "backend_rng": _rng_state(backend.rng())})

    log_f = open(os.path.join(cfg.out_dir, "log.jsonl"), "a")
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_iters, initial=iter_num, unit="it", dynamic_ncols=True)
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    losses, history, pending, t0, t_start = {}, [], [], time.time(), time.time()
    if backend.name == "cupy":    # the split lives on the GPU and batches are drawn there
        next_batch = DeviceBatches(train_data, cfg.batch_size, cfg.block_size, cfg.seed + iter_num)
    else:
        def next_batch():
            return get_batch(train_data, cfg.batch_size, cfg.block_size, batch_rng)
    model.train()
    try:
        it = iter_num
        while True:
            lr = get_lr(it, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr) \
                if cfg.decay_lr else cfg.learning_rate
            opt.set_lr(lr)
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                losses = estimate_loss(model, {"train": train_data, "val": val_data}, cfg, cfg.seed + 1)
                msg = f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                (bar.write if bar else log)(msg)
                log_f.write(json.dumps({"iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                                        "time": time.time() - t_start}) + "\n")
                log_f.flush()
                if losses["val"] < best_val or cfg.always_save_checkpoint:
                    best_val = min(best_val, losses["val"])
                    if it > iter_num or it == cfg.max_iters:
                        save(it, losses)
            if it >= cfg.max_iters:
                break
            for _ in range(cfg.gradient_accumulation_steps):
                x, y = next_batch()
                _, loss = model(x, y)
                opt.backward(loss * (1.0 / cfg.gradient_accumulation_steps))
            opt.step()          # clips to grad_clip, skips (fp16) steps with inf/nan gradients
            opt.zero_grad()
            it += 1
            pending.append(loss.data)   # stays on the device until the next log line
            if bar:
                bar.update(1)
            if it % cfg.log_interval == 0 or it >= cfg.max_iters:
                history.extend(float(v) for v in backend.to_numpy(backend.xp.stack(pending)))
                lossf = history[-1]
                dt = time.time() - t0
                t0 = time.time()
                tps = tokens_per_iter * len(pending) / max(dt, 1e-9)   # the iterations since the last line
                pending.clear()
                rec = {"iter": it, "loss": lossf, "lr": lr, "tokens_per_s": tps,
                       "grad_norm": float(opt.grad_norm)}
                if opt.mixed:
                    rec.update(loss_scale=opt.loss_scale, skipped_steps=opt.skipped_steps)
                log_f.write(json.dumps(rec) + "\n")
                if bar:
                    bar.set_postfix(loss=f"{lossf:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
    finally:
        if bar:
            bar.close()
        log_f.close()
    if not math.isfinite(history[-1] if history else 0.0):
        log("warning: the loss is not finite; lower learning_rate")
    return {"iter": it, "train_loss": losses.get("train"), "val_loss": losses.get("val"),
            "losses": history, "seconds": time.time() - t_start}
