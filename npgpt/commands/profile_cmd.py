"""``npgpt profile``: where a training step's time goes, per layer and op (``npgpt.profiler``)."""
import json
import os
import sys

HELP = """Profile training steps of a checkpoint's model or of a config: per layer and op, forward and
backward time, FLOPs, bytes moved, achieved GFLOP/s against the machine's peak and the share of the
step; then the sum of the op times against the step measured without the profiler, and the MFU.
  npgpt profile --out_dir out-shakespeare-char           a checkpoint (its model and batch size)
  npgpt profile --n_layer=6 --n_embd=384 --block_size=256 --batch_size=8      a config (train's keys)
  npgpt profile --config run.toml --device=cuda --dtype=float16 --steps 10 --sort share
Peak: a measured float32 GEMM on the CPU; the GPU's dense peak (fp16, TF32 or FP32). docs/profile.md
explains the columns and the FLOP and byte counts."""

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "bias", "pos")   # fixed by a checkpoint


def register(sub):
    import argparse
    p = sub.add_parser("profile", help="time a training step per layer and op: FLOPs, bytes, GFLOP/s, MFU",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--out_dir", default=None, help="checkpoint directory holding ckpt.npz")
    src.add_argument("--config", metavar="FILE", help="JSON or TOML file of training keys")
    p.add_argument("--steps", type=int, default=10, help="profiled steps, and as many plain ones (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="plain steps first (default 1)")
    p.add_argument("--sort", choices=["order", "share"], default="order",
                   help="rows in execution order (default) or by share of the step")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="for a config: vocabulary size (default: the data's meta.json, else 65)")
    p.set_defaults(func=run_profile, accepts_overrides=True)


def _vocab_size(args, cfg):
    if args.vocab_size is not None:
        if args.vocab_size < 1:
            raise ValueError(f"--vocab_size must be >= 1, got {args.vocab_size}")
        return args.vocab_size, "--vocab_size"
    meta = os.path.join(cfg.data, "meta.json")
    if os.path.exists(meta):
        with open(meta) as f:
            return int(json.load(f)["vocab_size"]), meta
    return 65, "default"


def build(args):
    """(model, optimizer, batch, cfg, where the model comes from) for ``args``; raises ValueError,
    CheckpointError or BackendError with the fix."""
    import numpy as np
    from .. import backend
    from ..checkpoint import load_checkpoint
    from ..model import GPT, GPTConfig
    from ..train_helpers import CKPT_NAME, make_optimizer, use_backend
    from .train_cmd import build_config, parse_overrides
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    overrides = parse_overrides(args.overrides)
    if backend.name == "cupy":                            # npgpt --backend cupy profile ...
        overrides.setdefault("device", "cuda")
    ckpt = None
    if args.out_dir is not None:
        fixed = sorted(set(overrides) & set(MODEL_KEYS))
        if fixed:
            raise ValueError(f"the checkpoint fixes the model's shape; drop {', '.join('--' + k for k in fixed)} "
                             f"or profile a config instead")
        ckpt = load_checkpoint(os.path.join(args.out_dir, CKPT_NAME))
        model_cfg = GPTConfig.from_dict(ckpt["model_config"])
        overrides.setdefault("batch_size", (ckpt.get("train_config") or {}).get("batch_size", 12))
        overrides.setdefault("block_size", model_cfg.block_size)
        for k in MODEL_KEYS:
            overrides[k] = getattr(model_cfg, k)
    cfg = build_config(overrides, args.config)
    use_backend(cfg)
    backend.seed(cfg.seed)
    if ckpt is not None:
        if cfg.block_size > model_cfg.block_size:
            raise ValueError(f"--block_size {cfg.block_size} exceeds the checkpoint's block_size "
                             f"{model_cfg.block_size}")
        model_cfg.dropout = cfg.dropout
        model = GPT(model_cfg)
        from ..loading import merged_state               # LoRA adapters folded in
        model.load_state_dict(merged_state(ckpt, args.out_dir))
        source = f"checkpoint {os.path.join(args.out_dir, CKPT_NAME)}"
    else:
        vocab, where = _vocab_size(args, cfg)
        model = GPT(cfg.model_config(vocab))
        source = f"config (vocab {vocab} from {where})"
    opt = make_optimizer(model.parameters(), cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                         cfg.grad_clip, "float16" if cfg.dtype == "float16" else None)
    rng = np.random.default_rng(cfg.seed)
    V, B, T = model.config.vocab_size, cfg.batch_size, cfg.block_size

    def batch():                                          # random ids: the time does not depend on them
        ids = backend.to_device(rng.integers(0, V, (B, T + 1)))
        return ids[:, :-1], ids[:, 1:]
    return model, opt, batch, cfg, source


def run_profile(args):
    from .. import backend
    from ..checkpoint import CheckpointError
    from ..profiler import profile_steps
    try:
        model, opt, batch, cfg, source = build(args)
        report = profile_steps(model, opt, batch, args.steps, args.warmup,
                               dtype="float16" if cfg.dtype == "float16" else cfg.dtype, tf32=cfg.tf32)
    except (ValueError, CheckpointError, backend.BackendError) as e:
        print(f"npgpt profile: error: {e}", file=sys.stderr)
        return 2
    c = model.config
    print(f"profile of {source}: {model.num_params() / 1e6:.2f}M parameters, n_layer {c.n_layer}, n_head "
          f"{c.n_head}, n_embd {c.n_embd}, batch {cfg.batch_size} x {cfg.block_size} tokens, backend "
          f"{backend.name}, {cfg.dtype}{', TF32' if cfg.tf32 and backend.name == 'cupy' else ''}")
    print(report.table(args.sort))
    print()
    print("per op over all layers:")
    print(report.by_op())
    print()
    print(report.summary())
    return 0
