"""The training loop: AdamW with warmup + cosine decay, gradient accumulation and clipping,
periodic evaluation, a JSONL log and atomic checkpoints that resume exactly.

Knob names are nanoGPT's, so a user's config carries over, and ``train`` reads like nanoGPT's
loop: one comment per phase; the helpers it calls are in ``train_helpers.py``. Resuming restores
the model, the optimizer moments, the step, and the states of the batch and dropout random
generators: N steps straight and N/2 steps + resume + N/2 steps give identical losses.
``init_from=PATH`` starts a new run (fresh optimizer and schedule) from the weights of another run,
a ``npgpt convert`` checkpoint or a Hugging Face GPT-2 directory. ``ckpt.npz`` holds the latest
evaluation, ``best.npz`` the best validation loss; ``max_time`` and ``patience`` end a run early.

Faults: one run writes to an out_dir at a time (``out_dir/train.lock``); a new run does not replace
an existing checkpoint without ``overwrite``; a loss, gradient or weight that turns inf/nan stops the
run with ``TrainingDiverged`` before anything is saved (under fp16 a step with inf/nan gradients is
skipped by the loss scaler instead); SIGTERM is handled like Ctrl-C (KeyboardInterrupt, with a resume
hint); temporary files of a save killed midway are removed at the next start.
"""
import math
import numbers
import os
from dataclasses import dataclass, fields

from . import distributed
from .cuda_graphs import graphed_train_step
from .model import GPTConfig
from .optim import get_lr
from .loading import CKPT_NAME, load_model
from .run_dir import TrainingDiverged, prepare_out_dir, remove_if_empty, sigterm_as_interrupt
from .train_helpers import (BEST_NAME, RunLog, batch_source, check_split_lengths, data_parallel, estimate_loss,
                            init_or_resume, load_data, save_run, thread_replicas, train_step, use_backend)

__all__ = ["TrainConfig", "train", "load_model", "estimate_loss", "CKPT_NAME", "BEST_NAME", "TrainingDiverged"]


@dataclass
class TrainConfig:
    """Everything a run needs; defaults train the baby Shakespeare char model on a 2-core CPU."""
    data: str = "data/shakespeare_char"
    out_dir: str = "out-shakespeare-char"
    init_from: str = "scratch"            # scratch | resume | PATH (npgpt checkpoint or Hugging Face GPT-2
                                          # directory: its weights and model shape, a fresh optimizer)
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    pos: str = "learned"
    # optimization
    batch_size: int = 24                  # with lr 4e-3 and 4000 steps: val 1.578 in 9.5 min on 2 cores, against
                                          # 1.593 for 12 rows, 3e-3 and 7000 steps in as long (RESULTS.md)
    gradient_accumulation_steps: int = 1
    max_iters: int = 4000
    learning_rate: float = 4e-3
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 4000
    min_lr: float = 2e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # evaluation and logging
    eval_interval: int = 500
    eval_iters: int = 25                  # batches per split: 600 windows of the default 24-row batches
    log_interval: int = 50
    always_save_checkpoint: bool = True   # ckpt.npz at every evaluation (else only when val improves)
    max_time: float = 0.0                 # seconds of training, then evaluate, save and stop (0: no limit)
    patience: int = 0                     # stop after this many evaluations without a new best (0: off)
    seed: int = 1337
    device: str = "cpu"                   # cpu (numpy) | cuda (cupy)
    dtype: str = "float32"                # float32 | float16 (mixed precision: fp32 master weights,
                                          # dynamic loss scaling) | float64 (checks)
    tf32: bool = False                    # float32 matmuls on TF32 tensor cores (cuda only)
    threads: int = 0                      # CPU threads (0: the cores other processes leave free, or
                                          # $NPGPT_THREADS; npgpt/threads.py)
    thread_split: str = "batch"           # how CPU threads share a step: batch (each thread the forward and
                                          # backward of its rows of the batch, npgpt/replicas.py) | ops (BLAS
                                          # and the elementwise pool split each operation)
    vocab_multiple: int = 0               # pad the token table to a multiple of this (0: auto = 64 on cuda,
                                          # 1 = none on cpu); invisible in checkpoints (model.py)
    cuda_graphs: str = "auto"             # capture and replay the training step (cuda_graphs.py):
                                          # auto (= on with CuPy, measured faster) | on | off
    progress: bool = True
    overwrite: bool = False               # a new run may replace the checkpoint already in out_dir
    zero: bool = True                     # on more than one rank (mpiexec/srun): ZeRO-1, each rank keeps 1/N
                                          # of the AdamW state (npgpt/distributed/zero.py); false: all-reduce

    def __post_init__(self):
        self._check_types()
        if not self.out_dir or not self.data:
            raise ValueError(f"out_dir and data must be non-empty paths, got out_dir={self.out_dir!r}, "
                             f"data={self.data!r}")
        if self.init_from not in ("scratch", "resume") and not os.path.exists(self.init_from):
            raise ValueError(f"init_from must be 'scratch', 'resume' or the path of an npgpt checkpoint or a Hugging "
                             f"Face GPT-2 directory; {self.init_from!r} does not exist")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in ("float32", "float16", "float64"):
            raise ValueError(f"dtype must be float32, float16 (mixed precision) or float64, got {self.dtype!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        if self.pos not in ("learned", "sinusoidal"):
            raise ValueError(f"pos must be 'learned' or 'sinusoidal', got {self.pos!r}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, value in ((f.name, getattr(self, f.name)) for f in fields(self) if f.type in (float, "float")):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not self.max_time >= 0:
            raise ValueError(f"max_time must be >= 0 seconds (0 = no limit), got {self.max_time}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 1, or 0 to choose from the machine, got {self.threads}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0 evaluations without improvement (0 = off), got {self.patience}")
        if self.vocab_multiple < 0:
            raise ValueError(f"vocab_multiple must be >= 0 (0 = auto, 1 = no padding), got {self.vocab_multiple}")
        if self.thread_split not in ("batch", "ops"):
            raise ValueError(f"thread_split must be batch or ops, got {self.thread_split!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graphs must be auto, on or off, got {self.cuda_graphs!r}")
        if self.cuda_graphs == "on" and self.device != "cuda":
            raise ValueError("cuda_graphs=on needs device=cuda: CUDA graphs record GPU kernel launches (on the "
                             "CPU use cuda_graphs=off or auto)")

    def _check_types(self):
        """Each knob of its field's type (from a JSON/TOML config a list, or true for an int, is refused;
        an int where a float goes, or an integral float where an int goes, is converted)."""
        for f in fields(self):
            value, kind = getattr(self, f.name), {"int": int, "float": float, "bool": bool, "str": str}.get(
                f.type, f.type)
            if kind is str and isinstance(value, os.PathLike):
                value = os.fspath(value)                  # a pathlib.Path for data, out_dir, init_from
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if not ok and kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok and kind is int and not isinstance(value, bool) and (
                    isinstance(value, numbers.Integral) or isinstance(value, float) and value.is_integer()):
                value, ok = int(value), True
            if not ok:
                raise ValueError(f"{f.name} expects {kind.__name__}, got {value!r} ({type(value).__name__})")
            setattr(self, f.name, value)

    def model_config(self, vocab_size):
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias,
                         pos=self.pos, vocab_multiple=self.padding_multiple())

    def padding_multiple(self):
        """The token table's row multiple: vocab_multiple, or for 0 (auto) 64 on cuda (tiles of the LM
        head's GEMM; llm.c's padded vocabulary) and 1 (none) on cpu, where padding only adds work."""
        return self.vocab_multiple or (64 if self.device == "cuda" else 1)

    @classmethod
    def field_types(cls):
        return {f.name: f.type for f in fields(cls)}


def train(cfg, log=print):
    """Train (or resume) as configured; returns {"iter", "train_loss", "val_loss", "best_val_loss",
    "losses", "seconds", "stopped"} ("stopped": None after max_iters, else "max_time" or "patience").
    Raises ``TrainingDiverged`` (nothing saved), ``OutDirLocked``, ValueError/CheckpointError for bad
    input, and KeyboardInterrupt on Ctrl-C or SIGTERM after logging how to resume."""
    # the ranks of a parallel launch (mpiexec/srun; None for one process: nothing changes), the backend,
    # the data and the output directory (locked by rank 0; leftovers of a killed save removed); a set-up
    # error on any rank ends every rank with one message (npgpt/distributed/launch.py)
    comm = distributed.connect(cfg.device)
    log = distributed.rank0_log(comm, log)
    with distributed.setup_phase(comm):
        threads = use_backend(cfg)
        if threads:
            log(f"computing with {threads}")
        meta, splits = distributed.rank0_first(comm, load_data, cfg)
        if cfg.init_from != "resume":    # (a resumed run's block_size is the checkpoint's: checked later)
            check_split_lengths(splits, cfg)
    with distributed.setup_phase(comm):
        lock, created = prepare_out_dir(cfg, log) if distributed.is_rank0(comm) else (None, False)
    try:
        with sigterm_as_interrupt(), distributed.fail_together(comm):
            return _train(cfg, meta, splits, log, comm)
    finally:
        if lock is not None:
            lock.release()
        if created:
            remove_if_empty(cfg.out_dir)


def _train(cfg, meta, splits, log, comm=None):
    # the model and its optimizer: new, from weights, or resumed with the step, best val loss and random streams
    cfg, model, opt, start_iter, best_val, evals_since_best, batch_rng = init_or_resume(cfg, meta, log)
    if cfg.init_from == "resume":        # block_size now the checkpoint's (other runs were checked in train)
        check_split_lengths(splits, cfg)
    if comm is not None:                 # N ranks: the gradient summed in buckets, ZeRO-1 unless zero=false
        opt = data_parallel(opt, cfg, comm, start_iter, log)
    # one process on 2+ CPU threads: each thread the forward and backward of its rows of the batch (replicas.py)
    replicas = thread_replicas(cfg, model, opt, comm)
    if replicas is not None:
        log(f"the {replicas.n} threads each compute their block of a batch's rows (thread_split=batch)")
    ranks = comm.size if comm is not None else 1
    run_log = RunLog(cfg, start_iter, log, model, world_size=ranks, quiet=not distributed.is_rank0(comm))
    next_batch = batch_source(splits["train"], cfg, start_iter, batch_rng, log, comm)
    # one process on the GPU with cuda_graphs on: the micro-batches replay a recorded CUDA graph (cuda_graphs.py)
    graphed_step = graphed_train_step(cfg.cuda_graphs, model, opt, next_batch, cfg.gradient_accumulation_steps) \
        if comm is None else None
    losses, iter_num, stopped, lr = {}, start_iter, None, None
    saved_at = start_iter if cfg.init_from == "resume" else None     # the step ckpt.npz holds

    def diverged(what):
        kept = f"{os.path.join(cfg.out_dir, CKPT_NAME)} still holds iteration {saved_at}" if saved_at is not None \
            else "no checkpoint was written"
        return TrainingDiverged(f"{what} at iteration {iter_num}, so the run stopped without saving ({kept}); "
                                f"lower --learning_rate (now {cfg.learning_rate:g}) or set --grad_clip, then "
                                f"resume with npgpt train --init_from=resume --out_dir {cfg.out_dir}")
    model.train()
    try:
        while True:
            # determine and set the learning rate for this iteration
            lr = get_lr(iter_num, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr) \
                if cfg.decay_lr else cfg.learning_rate
            opt.set_lr(lr)
            # evaluate the loss on train/val sets and write checkpoints: ckpt.npz the latest, best.npz the
            # best val loss (none at the step resumed from, which the checkpoint already holds and counted);
            # inf/nan losses or weights stop the run before anything is written
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or stopped:
                losses = estimate_loss(model, splits, cfg, cfg.seed + 1, replicas=replicas) if comm is None else \
                    estimate_loss(model, splits, cfg, cfg.seed + 1, comm)    # N ranks: 1/N of the batches each
                run_log.evaluation(iter_num, losses)
                if not all(math.isfinite(v) for v in losses.values()):
                    raise diverged(f"the evaluation loss is {losses['val']} (train {losses['train']})")
                improved = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                if iter_num > start_iter or cfg.init_from != "resume":
                    evals_since_best = 0 if improved else evals_since_best + 1
                if (improved or cfg.always_save_checkpoint) and (iter_num > start_iter or iter_num == cfg.max_iters):
                    try:
                        save_run(cfg, model, opt, meta, iter_num, best_val, losses, batch_rng, improved,
                                 evals_since_best, comm)
                    except TrainingDiverged:
                        raise diverged("the weights are not finite") from None
                    saved_at = iter_num
                if cfg.patience and evals_since_best >= cfg.patience and not stopped:
                    stopped = "patience"
                    log(f"early stopping: val loss has not improved for {evals_since_best} evaluations "
                        f"(best {best_val:.4f}; {os.path.join(cfg.out_dir, BEST_NAME)})")
            # termination condition
            if iter_num >= cfg.max_iters or stopped:
                break
            # forward, backward and update, with gradient accumulation; the step clips to grad_clip
            # and skips (fp16) steps with inf/nan gradients
            loss = graphed_step() if graphed_step else \
                replicas.train_step(next_batch, cfg.gradient_accumulation_steps) if replicas else \
                train_step(opt, lambda: model(*next_batch())[1], cfg.gradient_accumulation_steps)
            loss = distributed.last_micro_batch_loss(comm, loss)     # N ranks: what one process would log
            iter_num += 1
            # timing and logging; an inf/nan loss (read at each log line) stops the run, except under fp16
            # where the loss scaler skips such steps
            run_log.step(iter_num, loss, lr, opt)
            if run_log.first_non_finite is not None and not opt.mixed:
                raise diverged(f"the training loss became {run_log.history[-1]} (first at iteration "
                               f"{run_log.first_non_finite})")
            # the time budget: evaluate and save at this iteration, then stop
            if cfg.max_time and distributed.rank0_decides(comm, run_log.seconds() >= cfg.max_time) \
                    and iter_num < cfg.max_iters:
                stopped = "max_time"
                run_log.finish(iter_num, lr, opt)
                log(f"stopping at iteration {iter_num}: the time budget of {cfg.max_time:g} s is spent")
        run_log.finish(iter_num, lr, opt)
    except KeyboardInterrupt:
        kept = f"{os.path.join(cfg.out_dir, CKPT_NAME)} holds iteration {saved_at}" if saved_at is not None \
            else "no checkpoint was written yet"
        log(f"interrupted at iteration {iter_num} ({kept}); resume with npgpt train --init_from=resume "
            f"--out_dir {cfg.out_dir} --data {cfg.data}")
        raise
    finally:
        run_log.close()
        if replicas is not None:
            replicas.close()
    if not math.isfinite(run_log.history[-1] if run_log.history else 0.0):
        log("warning: the loss is not finite; lower learning_rate")
    return {"iter": iter_num, "train_loss": losses.get("train"), "val_loss": losses.get("val"),
            "best_val_loss": best_val, "losses": run_log.history, "seconds": run_log.seconds(), "stopped": stopped}
