"""``npgpt convert``: npgpt checkpoints (ckpt.npz) to Hugging Face GPT-2 directories and back."""
import os
import sys

HELP = """Convert between npgpt checkpoints and Hugging Face GPT-2 checkpoint directories:
  npgpt convert --from_ckpt out-shakespeare-char --to_hf shakespeare-hf
  npgpt convert --from_hf gpt2 --to_ckpt out-gpt2       (then: npgpt sample --out_dir out-gpt2)
An HF directory holds config.json + model.safetensors and loads with
transformers.GPT2LMHeadModel.from_pretrained. Models with bias=False or pos=sinusoidal have no
GPT-2 equivalent and cannot be exported. An existing OUT_DIR/ckpt.npz or DIR/model.safetensors is
not replaced unless --overwrite is given."""


def register(sub):
    import argparse
    p = sub.add_parser("convert", help="convert npgpt checkpoints to/from Hugging Face GPT-2 (safetensors)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from_ckpt", metavar="OUT_DIR", help="npgpt checkpoint directory holding ckpt.npz")
    src.add_argument("--from_hf", metavar="DIR", help="Hugging Face GPT-2 directory (config.json + model.safetensors)")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--to_hf", metavar="DIR", help="write a Hugging Face GPT-2 directory")
    dst.add_argument("--to_ckpt", metavar="OUT_DIR", help="write OUT_DIR/ckpt.npz (loadable by npgpt sample/eval)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT_DIR/ckpt.npz or DIR/model.safetensors (refused without it)")
    p.set_defaults(func=run_convert)


def check_target(path, name, flag, overwrite=False):
    """Refuse (ValueError) to write ``path``/``name`` when ``path`` is a file, or when that file
    exists and ``overwrite`` is off: a conversion never silently replaces a checkpoint."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a directory: give a directory to write {name} into")
    target = os.path.join(path, name)
    if os.path.exists(target) and not overwrite:
        raise ValueError(f"{target} exists; refusing to overwrite it: give another {flag} or add --overwrite")


def convert(from_ckpt=None, from_hf=None, to_hf=None, to_ckpt=None, overwrite=False):
    """Read one format and write the other; returns the path written. An existing target file is
    replaced only with ``overwrite``. Raises ValueError/CheckpointError."""
    from ..checkpoint import save_checkpoint
    from ..finetune.instruct import CHAT_KEY
    from ..hf import WEIGHTS_NAME, from_hf as load_hf, load_hf_meta, save_hf
    from ..loading import CKPT_NAME, load_model
    if (from_ckpt is None) == (from_hf is None) or (to_hf is None) == (to_ckpt is None):
        raise ValueError("give exactly one of --from_ckpt/--from_hf and one of --to_hf/--to_ckpt")
    if to_hf is not None:
        check_target(to_hf, WEIGHTS_NAME, "--to_hf", overwrite)
    else:
        check_target(to_ckpt, CKPT_NAME, "--to_ckpt", overwrite)
    extra = {}
    if from_ckpt is not None:
        model, ckpt = load_model(from_ckpt)        # LoRA adapters from finetune-instruct are merged on load
        meta = ckpt.get("meta") or {"tokenizer": "gpt2", "vocab_size": model.config.vocab_size}
        if ckpt.get(CHAT_KEY):
            extra[CHAT_KEY] = ckpt[CHAT_KEY]       # an instruction-tuned model keeps its chat template
    else:
        model, meta = load_hf(from_hf), load_hf_meta(from_hf)
    if to_hf is not None:
        return save_hf(model, to_hf, meta=meta)
    eps = {m.eps for m in _layer_norms(model)}
    if eps != {1e-5}:
        raise ValueError(f"this model's layer_norm_epsilon is {sorted(eps)}, but npgpt checkpoints assume 1e-5; "
                         f"load it with GPT.from_hf instead of converting it")
    path = os.path.join(to_ckpt, CKPT_NAME)
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.config.to_dict(), "meta": meta,
                           **extra})
    return path


def run_convert(args):
    from ..checkpoint import CheckpointError
    try:
        out = convert(args.from_ckpt, args.from_hf, args.to_hf, args.to_ckpt, args.overwrite)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"npgpt convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _layer_norms(model):
    from ..nn import LayerNorm
    todo = [model]
    while todo:
        m = todo.pop()
        if isinstance(m, LayerNorm):
            yield m
        todo.extend(c for _, c in m.named_children())
