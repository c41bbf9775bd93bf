"""``npgpt train`` and ``npgpt plot``: the main job and its loss curves (``npgpt sample`` is in sample_cmd.py)."""
import json
import os
import sys

HELP_TRAIN = """Train a GPT. With no arguments: a small character-level GPT on the bundled Shakespeare
(the data is prepared on first use), a progress bar, a checkpoint in out-shakespeare-char/, the
validation loss and a sample. Every knob is --key=value with nanoGPT's names, e.g.
  npgpt train --n_layer=6 --n_embd=384 --block_size=256 --max_iters=2000
  npgpt train --data DIR --out_dir DIR --init_from=resume      (continue OUT_DIR/ckpt.npz exactly)
  npgpt train --init_from=./gpt2 --data data/shakespeare_gpt2 --block_size=256   (weights of a checkpoint
        or a local Hugging Face GPT-2 directory; fresh optimizer; the data must use its tokenizer)
  npgpt train --max_time=600 --patience=5   (stop after 10 minutes or 5 evaluations without a new best)
OUT_DIR/ckpt.npz is the latest checkpoint, OUT_DIR/best.npz the one with the best val loss. One run
writes to an OUT_DIR at a time; a new run there needs --overwrite; an inf/nan loss stops the run
without saving (exit 1); on resume the model shape and seed come from the checkpoint.
  npgpt train --config my.toml            (JSON or TOML of the same keys; --key=value overrides it)

The knobs (--key=value or --key value; _ or - in the key), with their type and default:
{knobs}"""

# every TrainConfig knob: (group, meaning); `npgpt train --help` prints them grouped with type and default
KNOBS = {
    "data": ("data", "directory of prepared train.bin/val.bin/meta.json (npgpt prepare)"),
    "out_dir": ("data", "directory for ckpt.npz, best.npz and log.jsonl"),
    "init_from": ("data", "scratch | resume | PATH: an npgpt checkpoint or a Hugging Face GPT-2 directory"),
    "n_layer": ("model", "transformer blocks"),
    "n_head": ("model", "attention heads per block"),
    "n_embd": ("model", "width of the residual stream"),
    "block_size": ("model", "context length in tokens"),
    "dropout": ("model", "dropout probability (0 = off)"),
    "bias": ("model", "biases in the linear and layer-norm layers"),
    "pos": ("model", "position embeddings: learned | sinusoidal"),
    "batch_size": ("optimizer", "sequences per micro-batch"),
    "gradient_accumulation_steps": ("optimizer", "micro-batches per optimizer step"),
    "learning_rate": ("optimizer", "peak learning rate"),
    "weight_decay": ("optimizer", "AdamW weight decay (matrices only)"),
    "beta1": ("optimizer", "AdamW first-moment decay"),
    "beta2": ("optimizer", "AdamW second-moment decay"),
    "grad_clip": ("optimizer", "clip the global gradient norm to this (0 = off)"),
    "max_iters": ("schedule", "optimizer steps in all"),
    "decay_lr": ("schedule", "warmup then cosine decay (false: constant learning_rate)"),
    "warmup_iters": ("schedule", "linear warmup steps"),
    "lr_decay_iters": ("schedule", "the cosine reaches min_lr here"),
    "min_lr": ("schedule", "learning rate after the decay"),
    "eval_interval": ("schedule", "evaluate (and save) every this many steps"),
    "eval_iters": ("schedule", "batches per evaluation"),
    "log_interval": ("schedule", "log a line every this many steps"),
    "always_save_checkpoint": ("schedule", "write ckpt.npz at every evaluation (false: only when val improves)"),
    "max_time": ("schedule", "seconds of training, then evaluate, save and stop (0 = no limit)"),
    "patience": ("schedule", "stop after this many evaluations without a new best (0 = off)"),
    "seed": ("system", "seed of the batches, the initialization and dropout"),
    "device": ("system", "cpu (NumPy) | cuda (CuPy)"),
    "dtype": ("system", "float32 | float16 (mixed precision, fp32 master weights) | float64"),
    "tf32": ("system", "float32 matmuls on TF32 tensor cores (cuda)"),
    "threads": ("system", "CPU threads (0 = the cores other processes leave free, or $NPGPT_THREADS)"),
    "thread_split": ("system", "how CPU threads share a step: batch (each thread its rows of the batch) | ops"),
    "vocab_multiple": ("system", "pad the token table to a multiple of this (0 = auto: 64 on cuda, none on cpu)"),
    "cuda_graphs": ("system", "capture and replay the training step: auto (on with CuPy) | on | off"),
    "progress": ("system", "a progress bar (false: a log line every log_interval)"),
    "overwrite": ("data", "a new run may replace the checkpoint already in out_dir (else refused)"),
    "zero": ("system", "under mpiexec/srun: ZeRO-1, each rank keeps 1/N of the optimizer state (false: all-reduce)"),
}
GROUPS = ("data", "model", "optimizer", "schedule", "system")


def knob_help():
    """The knobs of TrainConfig grouped, one line each: --key TYPE (default) meaning."""
    from dataclasses import fields
    from ..train import TrainConfig
    lines = []
    for group in GROUPS:
        lines.append(f"  {group}:")
        for f in fields(TrainConfig):
            if KNOBS.get(f.name, ("system",))[0] == group:
                type_name = getattr(f.type, "__name__", str(f.type))
                lines.append(f"    --{f.name:<28s} {type_name:<5s} {f.default!r:<24s} {KNOBS.get(f.name, ('', ''))[1]}")
    return "\n".join(lines)


def register(sub):
    train = sub.add_parser("train", help="train a GPT (default: char-level Shakespeare on the CPU)",
                           description=HELP_TRAIN.format(knobs=knob_help()), formatter_class=_Raw)
    train.add_argument("--config", metavar="FILE", help="JSON or TOML file of training keys")
    train.add_argument("--no_sample", action="store_true", help="do not print a sample at the end")
    train.set_defaults(func=run_train, accepts_overrides=True)

    plot = sub.add_parser("plot", help="plot the loss curves of a run to a PNG (needs matplotlib)")
    plot.add_argument("--out_dir", default="out-shakespeare-char", help="directory holding log.jsonl")
    plot.add_argument("--out", default=None, help="PNG path (default OUT_DIR/loss.png)")
    plot.set_defaults(func=run_plot)


class _Raw(__import__("argparse").RawDescriptionHelpFormatter):
    pass


def parse_overrides(tokens, flags=()):
    """['--k=v', '--k', 'v', ...] -> {k: v as text}; a bare ``--k`` of a key in ``flags`` (the bool
    knobs) is ``true`` (``--overwrite`` as the other commands spell it); raises ValueError on anything else."""
    out, i = {}, 0
    while i < len(tokens):
        t = tokens[i]
        if not t.startswith("--") or t == "--":
            raise ValueError(f"unexpected argument {t!r}: use --key=value")
        if "=" in t:
            k, v = t[2:].split("=", 1)
        elif t[2:].replace("-", "_") in flags and (i + 1 == len(tokens) or tokens[i + 1].startswith("--")):
            k, v = t[2:], "true"
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            k, v = t[2:], tokens[i + 1]
            i += 1
        else:
            raise ValueError(f"{t} needs a value: use {t}=VALUE")
        out[k.replace("-", "_")] = v
        i += 1
    return out


def _convert(key, value, field_type):
    """A --key=value text as the config field's type (bool, int, float or str); non-text unchanged."""
    if isinstance(value, str):
        if field_type in (bool, "bool"):
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"--{key} expects true/false, got {value!r}")
            return lowered in ("true", "1", "yes")
        parse = {int: int, "int": int, float: float, "float": float}.get(field_type, str)
        try:
            return parse(value)
        except ValueError:
            raise ValueError(f"--{key} expects {getattr(parse, '__name__', parse)}, got {value!r}") from None
    return value


def build_config(overrides, config_file=None):
    """A TrainConfig from an optional JSON/TOML file and --key=value overrides (one clear error)."""
    from ..train import TrainConfig
    types = TrainConfig.field_types()
    values = {}
    if config_file:
        if not os.path.exists(config_file):
            raise ValueError(f"config file {config_file} not found")
        with open(config_file, "rb") as f:
            if config_file.endswith(".toml"):
                try:
                    import tomllib
                except ImportError:
                    raise ValueError("TOML configs need Python >= 3.11; use JSON") from None
                try:
                    loaded = tomllib.load(f)
                except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"config file {config_file} is not valid TOML: {e}") from None
            else:
                try:
                    loaded = json.loads(f.read().decode())
                except ValueError as e:
                    raise ValueError(f"config file {config_file} is not valid JSON: {e}") from None
            if not isinstance(loaded, dict):
                raise ValueError(f"config file {config_file} must hold an object of key: value pairs, not a "
                                 f"{type(loaded).__name__}")
            values.update(loaded)
    values.update(overrides)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; known keys: {' '.join(types)}")
    return TrainConfig(**{k: _convert(k, v, types[k]) for k, v in values.items()})


def run_train(args):
    from ..train import train
    try:
        from ..train import TrainConfig
        flags = {k for k, t in TrainConfig.field_types().items() if t in (bool, "bool")}
        cfg = build_config(parse_overrides(args.overrides, flags), args.config)
    except ValueError as e:
        from ..distributed import world_from_env
        if world_from_env().rank == 0:        # under mpiexec every rank has the same bad knob: say it once
            print(f"npgpt train: error: {e}", file=sys.stderr)
        return 2
    from ..backend import BackendError
    from ..checkpoint import CheckpointError
    from ..run_dir import OutDirLocked, TrainingDiverged
    try:
        result = train(cfg)
    except (FileNotFoundError, BackendError, CheckpointError, OutDirLocked, ValueError) as e:   # e.g. vocab mismatch
        print(f"npgpt train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:           # not the input's fault: the run failed
        print(f"npgpt train: error: {e}", file=sys.stderr)
        return 1
    from ..distributed import world_from_env
    if world_from_env().rank != 0:            # a parallel run: rank 0 alone reports and samples
        return 0
    best = os.path.join(cfg.out_dir, "best.npz")
    print(f"done: {result['iter']} iterations in {result['seconds']:.0f} s; val loss {result['val_loss']:.4f}; "
          f"checkpoint {os.path.join(cfg.out_dir, 'ckpt.npz')}"
          + (f", best (val {result['best_val_loss']:.4f}) {best}" if os.path.exists(best) else ""))
    if not args.no_sample:
        print("sample:")
        from .sample_cmd import print_samples
        print_samples(cfg.out_dir, "\n", 1, 300, 0.8, 200, None, cfg.seed, True)
    return 0


def run_plot(args):
    path = os.path.join(args.out_dir, "log.jsonl")
    if not os.path.exists(path):
        print(f"npgpt plot: error: {path} not found; train first (npgpt train --out_dir {args.out_dir})",
              file=sys.stderr)
        return 2
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('npgpt plot: error: needs matplotlib: pip install -e ".[plot]"', file=sys.stderr)
        return 2
    rows, broken = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:         # a line cut off by a killed run
                row = None
                broken += 1
            if isinstance(row, dict) and isinstance(row.get("iter"), (int, float)):
                rows.append(row)
    if broken:
        print(f"note: skipped {broken} unreadable line(s) of {path} (cut off by an interrupted run?)", file=sys.stderr)
    steps = [(r["iter"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["iter"], r["train_loss"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot(*zip(*steps), lw=0.8, alpha=0.6, label="train (batch)")
    if evals:
        iters, train_losses, val_losses = zip(*evals)
        ax.plot(iters, train_losses, "o-", label="train (eval)")
        ax.plot(iters, val_losses, "o-", label="val (eval)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    out = args.out or os.path.join(args.out_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0
