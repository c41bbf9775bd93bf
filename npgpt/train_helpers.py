"""The pieces of ``npgpt train``'s loop (``train.py``): the output directory (its lock, leftovers of a
killed save, no silent overwrite, SIGTERM), then in the order the loop uses them: the backend and the
data, init-or-resume (with the checks a resumed run needs), batches, the optimizer and its step,
evaluation, checkpoints (never of inf/nan weights); the log is ``run_log.RunLog`` (re-exported here).
How every command reads a model is ``loading.load_model``.

``make_optimizer`` and ``train_step`` are also fine-tuning's (``npgpt.finetune``): every run builds
the same flat AdamW (decay on matrices only, clipping inside the step, optional fp16 mixed
precision) and steps it the same way.
"""
import math
import os
from dataclasses import asdict

import numpy as np

from . import backend, distributed
from .checkpoint import save_checkpoint, copy_checkpoint, load_checkpoint, CheckpointError
from .data import check_split_length, load_split, get_batch, ensure_prepared, DeviceBatches, fits_on_device, device_bytes
from .engine import no_grad
from .lora import named_modules
from .model import GPT, GPTConfig
from .nn import LayerNorm
from .optim import FlatAdamW, decay_groups
from .loading import CKPT_NAME, load_model
from .replicas import ThreadReplicas
from .resume import check_vocab, resume_config, vocab_fingerprint
from .run_dir import TrainingDiverged, all_finite
from .run_log import RunLog
from .threads import get_threads, use_threads

__all__ = ["CKPT_NAME", "BEST_NAME", "make_optimizer", "train_step", "use_backend", "load_data", "init_or_resume",
           "init_from_weights", "batch_source", "estimate_loss", "save_run", "RunLog", "check_split_lengths",
           "thread_replicas"]

BEST_NAME = "best.npz"      # the checkpoint of the best validation loss so far
RESUME_KEYS = ("optimizer", "iter_num", "batch_rng")   # what a checkpoint needs beyond weights to resume


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


def thread_replicas(cfg, model, opt, comm=None):
    """``ThreadReplicas`` (``npgpt/replicas.py``: each CPU thread computes its block of a batch's
    rows) for a run in one process on NumPy with ``thread_split="batch"``, 2 or more threads and
    batches of 2 or more rows; else None (each op is split over the threads)."""
    n = min(get_threads() or 1, cfg.batch_size)
    if cfg.thread_split != "batch" or comm is not None or cfg.device != "cpu" or n < 2:
        return None
    return ThreadReplicas(model, opt, n)


# ---- set-up: backend, data, model and optimizer -----------------------------------------------------

def use_backend(cfg):
    """NumPy or CuPy, TF32 or not, the default dtype (float32 under fp16: the master weights), and on
    NumPy the CPU threads (``threads.use_threads``). Returns a few words for the log: the threads."""
    backend.use("cupy" if cfg.device == "cuda" else "numpy")
    backend.set_tf32(cfg.tf32)
    backend.set_default_dtype("float32" if cfg.dtype == "float16" else cfg.dtype)
    if cfg.device == "cuda":
        return ""
    n, why = use_threads(cfg.threads)
    return f"{n} CPU thread{'s' if n > 1 else ''} ({why})"


def load_data(cfg):
    """(meta, {"train": ids, "val": ids}) of ``cfg.data``; only the default directory (the bundled
    Shakespeare) is prepared on first use."""
    default = type(cfg).data
    if cfg.data != default and not os.path.exists(os.path.join(cfg.data, "meta.json")):
        raise FileNotFoundError(f"{cfg.data} holds no prepared data: run npgpt prepare --out_dir {cfg.data} "
                                f"[--input FILES] [--tokenizer char|gpt2] first (only the default "
                                f"{default} is prepared automatically)")
    meta = ensure_prepared(cfg.data)
    return meta, {"train": load_split(cfg.data, "train"), "val": load_split(cfg.data, "val")}


def check_split_lengths(splits, cfg):
    """Raise one DataError (a ValueError) unless every split has a window of block_size + 1 tokens (a
    batch's inputs and their next tokens): ``data.check_split_length`` on each."""
    for name, data in splits.items():
        check_split_length(data, cfg.block_size, f"{name} ({os.path.join(cfg.data, name + '.bin')})")


def _make_training_optimizer(model, cfg):
    return make_optimizer(model.parameters(), cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                          cfg.grad_clip, "float16" if cfg.dtype == "float16" else None)


def init_or_resume(cfg, meta, log):
    """(cfg, model, optimizer, iter_num, best_val_loss, evals_since_best, batch_rng): a new model
    (``init_from="scratch"``), the weights of another run or of a Hugging Face GPT-2 with a fresh
    optimizer (``init_from=PATH``: ``init_from_weights``), or the checkpoint in ``cfg.out_dir`` with
    its optimizer moments, step and random-generator states (``"resume"``: the resumed run continues
    bit for bit; the returned cfg holds the checkpoint's ``ARCH_KNOBS``, see ``resume_config``)."""
    ckpt = None
    if cfg.init_from == "resume":
        ckpt_path = os.path.join(cfg.out_dir, CKPT_NAME)
        ckpt = load_checkpoint(ckpt_path)
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(f"{ckpt_path} holds weights only (no {', '.join(missing)}), so there is no run "
                                  f"to resume; start a new run from its weights: npgpt train "
                                  f"--init_from={cfg.out_dir} --out_dir=NEW_DIR")
        cfg = resume_config(cfg, ckpt, meta, ckpt_path, log)
    batch_rng = np.random.default_rng(cfg.seed)
    backend.seed(cfg.seed)
    iter_num, best_val, evals_since_best = 0, float("inf"), 0
    if ckpt is not None:
        model = GPT(GPTConfig.from_dict({**ckpt["model_config"], "dropout": cfg.dropout}))
        model.load_state_dict(ckpt["model"])
        opt = _make_training_optimizer(model, cfg)
        knobs = [{k: g[k] for k in ("weight_decay", "betas") if k in g} for g in opt.param_groups]
        opt.load_state_dict(ckpt["optimizer"])
        for group, ours in zip(opt.param_groups, knobs):   # this run's weight decay and betas take effect
            group.update(ours)
        iter_num, best_val = ckpt["iter_num"], ckpt.get("best_val_loss", float("inf"))
        evals_since_best = ckpt.get("evals_since_best", 0)
        batch_rng.bit_generator.state = ckpt["batch_rng"]
        if ckpt.get("backend_rng") and backend.name == "numpy":
            backend.rng().bit_generator.state = ckpt["backend_rng"]
        else:
            backend.seed(cfg.seed + iter_num)
        log(f"resuming from {ckpt_path} at iteration {iter_num}")
    elif cfg.init_from == "scratch":
        model = GPT(cfg.model_config(meta["vocab_size"]))
        opt = _make_training_optimizer(model, cfg)
    else:
        model = init_from_weights(cfg, meta, log)
        opt = _make_training_optimizer(model, cfg)
    if cfg.dtype == "float16" and backend.name == "numpy":
        log("note: float16 on the CPU is nearly 100x slower than float32 (NumPy has no fp16 BLAS); it is there to "
            "check mixed precision without a GPU. Train on the CPU with dtype=float32.")
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, "
        f"backend {backend.name}, {cfg.dtype}")
    return cfg, model, opt, iter_num, best_val, evals_since_best, batch_rng


def data_parallel(opt, cfg, comm, iter_num, log):
    """``opt`` stepped in step on the ranks of ``comm`` (``distributed.DataParallel``: rank 0's weights
    broadcast, gradients summed in buckets, ZeRO-1 unless ``cfg.zero`` is false). Ranks other than 0
    draw dropout masks from streams of their own (seeded by rank), so with dropout a parallel run is
    not the single process's bit for bit."""
    if comm.rank:
        backend.seed(cfg.seed + iter_num + 1_000_003 * comm.rank)
    opt = distributed.DataParallel(opt, comm, cfg.gradient_accumulation_steps, zero=cfg.zero)
    log(opt.memory_note())
    return opt


def init_from_weights(cfg, meta, log):
    """A GPT (train mode) holding the weights at ``cfg.init_from`` (anything ``load_model`` reads),
    shaped for this run: the checkpoint fixes n_layer, n_head, n_embd, vocab_size, bias and pos;
    ``cfg.block_size`` below the checkpoint's crops the learned position table to its first rows
    (nanoGPT's ``crop_block_size``), above it is refused for learned positions (sinusoidal ones have
    no parameters and simply extend); ``cfg.dropout`` is set anew. The data's tokenizer must be the
    checkpoint's (``check_vocab``)."""
    source, ckpt = load_model(cfg.init_from)
    conf = source.config.to_dict()
    check_vocab(meta, ckpt.get("meta"), conf["vocab_size"], cfg.data, cfg.init_from)
    if cfg.block_size > conf["block_size"] and conf["pos"] == "learned":
        raise ValueError(f"--block_size={cfg.block_size} exceeds the {conf['block_size']} positions {cfg.init_from} "
                         f"learned; use --block_size={conf['block_size']} or less (a smaller one crops the table)")
    state = source.state_dict()
    if conf["pos"] == "learned" and cfg.block_size < conf["block_size"]:
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:cfg.block_size]   # (T, C): crop
        log(f"cropping the position table from {conf['block_size']} to block_size {cfg.block_size}")
    conf.update(block_size=cfg.block_size, dropout=cfg.dropout, vocab_multiple=cfg.padding_multiple())
    model = GPT(GPTConfig.from_dict(conf))
    model.load_state_dict(state)
    for (_, theirs), (_, ours) in zip(named_modules(source), named_modules(model)):
        if isinstance(theirs, LayerNorm):
            ours.eps = theirs.eps            # a Hugging Face model may use another layer_norm_epsilon
    del source, state
    log(f"initialized from {cfg.init_from} (n_layer={conf['n_layer']}, n_head={conf['n_head']}, "
        f"n_embd={conf['n_embd']}, vocab {conf['vocab_size']}; fresh optimizer and schedule)")
    return model.train()


def batch_source(train_data, cfg, iter_num, batch_rng, log=print, comm=None):
    """``next_batch() -> x, y`` (B, T). On CuPy the split lives on the GPU and batches are drawn there
    (seeded with seed + iter_num), unless it would take more than its share of free GPU memory
    (``data.fits_on_device``): then, as on NumPy, the host draws them from the memory-mapped split
    with ``batch_rng`` (checkpointed) and each batch is copied over. With ``comm`` (N ranks) rank r
    takes draws r, N + r, 2N + r, ... of that same stream (``distributed.rank_batches``)."""
    if backend.name == "cupy":
        nbytes, free = device_bytes(train_data), backend.xp.cuda.Device().mem_info[0]
        if distributed.rank0_decides(comm, fits_on_device(nbytes, free)):
            draw = DeviceBatches(train_data, cfg.batch_size, cfg.block_size, cfg.seed + iter_num)
            return draw if comm is None else distributed.rank_batches(comm, draw)
        log(f"the training split ({nbytes / 2**30:.1f} GiB as int32) would not fit in GPU memory "
            f"({free / 2**30:.1f} GiB free): drawing batches on the host and copying each one")
    if comm is None:
        return lambda: get_batch(train_data, cfg.batch_size, cfg.block_size, batch_rng)
    skip = lambda: batch_rng.integers(0, len(train_data) - cfg.block_size, size=cfg.batch_size)  # get_batch's draw
    return distributed.rank_batches(comm, lambda: get_batch(train_data, cfg.batch_size, cfg.block_size, batch_rng),
                                    skip)


# ---- evaluation and checkpoints ---------------------------------------------------------------------

@no_grad()
def estimate_loss(model, splits, cfg, seed, comm=None, replicas=None):
    """Mean loss over ``eval_iters`` batches of each split, from a generator seeded afresh (so every
    evaluation sees the same batches and training's random stream is untouched). With ``comm`` (N
    ranks) rank r scores batches r, N + r, ... of the same stream and the sums are added over ranks;
    with ``replicas`` (``ThreadReplicas``) each batch's rows are cut over its threads."""
    model.eval()
    out = {}
    for name, data in splits.items():
        rng = np.random.default_rng(seed)
        total = 0.0   # summed on the device: one host read per split, not one per batch
        for i in range(cfg.eval_iters):
            batch = get_batch(data, cfg.batch_size, cfg.block_size, rng)
            if comm is None or i % comm.size == comm.rank:
                total = total + (replicas.loss(*batch) if replicas else model(*batch)[1].data)
        out[name] = (float(total) if comm is None else distributed.sum_over_ranks(comm, total)) / cfg.eval_iters
    model.train()
    return out


def _rng_state(gen):
    """JSON-able state of a NumPy Generator (None for CuPy's, which is reseeded on resume)."""
    state = getattr(getattr(gen, "bit_generator", None), "state", None)
    return state if isinstance(state, dict) else None


def save_run(cfg, model, opt, meta, iter_num, best_val, losses, batch_rng, best=False, evals_since_best=0, comm=None):
    """Write ``out_dir/ckpt.npz`` atomically: the (float32 master) weights, the optimizer, the step,
    the losses, the early-stopping count and the random-generator states; with ``best`` (the
    validation loss improved) copy it to ``out_dir/best.npz`` too, so either one resumes. Weights or
    losses that are not finite raise ``TrainingDiverged`` and write nothing: a diverged run never
    replaces a good checkpoint. With ``comm`` every rank calls it (ZeRO-1 gathers the sharded state)
    and rank 0 writes."""
    path = os.path.join(cfg.out_dir, CKPT_NAME)
    weights = model.unpadded(opt.master_state_dict(model))    # no vocabulary padding rows in checkpoints
    optimizer_state = opt.state_dict()
    if not all(math.isfinite(v) for v in (losses.get("train", 0.0), losses.get("val", 0.0))) \
            or not all_finite(weights.values()):
        raise TrainingDiverged(f"the weights or losses at iteration {iter_num} are not finite")
    if not distributed.is_rank0(comm):
        return
    save_checkpoint(path, {
        "model": weights, "optimizer": optimizer_state,
        "model_config": model.config.to_dict(), "train_config": asdict(cfg), "meta": meta,
        "vocab_fingerprint": vocab_fingerprint(meta),
        "iter_num": iter_num, "best_val_loss": best_val, "val_loss": losses.get("val"),
        "evals_since_best": evals_since_best,
        "batch_rng": _rng_state(batch_rng), "backend_rng": _rng_state(backend.rng())})
    if best:
        copy_checkpoint(path, os.path.join(cfg.out_dir, BEST_NAME))
