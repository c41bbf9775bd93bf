"""``npgpt sample``: text from a trained checkpoint or a Hugging Face GPT-2."""
import sys


def register(sub):
    sample = sub.add_parser("sample", help="sample text from a trained checkpoint or a Hugging Face GPT-2")
    sample.add_argument("--out_dir", default="out-shakespeare-char", help="directory holding ckpt.npz")
    sample.add_argument("--hf", metavar="DIR", default=None,
                        help="sample from a Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors) "
                             "instead of --out_dir; uses the GPT-2 tokenizer (or the one npgpt_meta.json names)")
    sample.add_argument("--start", default="\n", help="prompt text (or FILE:path to read it from a file)")
    sample.add_argument("--num_samples", type=int, default=1)
    sample.add_argument("--max_new_tokens", type=int, default=500)
    sample.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    sample.add_argument("--top_k", type=int, default=200)
    sample.add_argument("--top_p", type=float, default=None)
    sample.add_argument("--seed", type=int, default=1337)
    sample.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    sample.add_argument("--no-cache", action="store_true", help="recompute the whole context every step")
    sample.set_defaults(func=run_sample)


def print_samples(out_dir, start, num_samples, max_new_tokens, temperature, top_k, top_p, seed, cache, hf=None):
    import numpy as np
    from .. import backend
    from ..tokenizer import load_tokenizer_from_meta
    if hf is not None:
        from ..hf import from_hf, load_hf_meta
        model, meta = from_hf(hf), load_hf_meta(hf)
    else:
        from ..train import load_model
        model, ckpt = load_model(out_dir)
        meta = ckpt["meta"]
    tok = load_tokenizer_from_meta(meta)
    ids = tok.encode(start)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --start")
    for i in range(num_samples):
        out = model.generate(np.asarray(ids)[None, :], max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed + i, eos_token=getattr(tok, "eot_token", None),
                             use_cache=cache)
        print(tok.decode(backend.to_numpy(out[0]).tolist()))
        if num_samples > 1:
            print("-" * 40)


def run_sample(args):
    from .. import backend
    from ..checkpoint import CheckpointError
    if args.device == "cuda":
        backend.use("cupy")
    start = args.start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    try:
        print_samples(args.out_dir, start, args.num_samples, args.max_new_tokens, args.temperature,
                       args.top_k, args.top_p, args.seed, not args.no_cache, hf=args.hf)
    except (CheckpointError, ValueError) as e:
        print(f"npgpt sample: error: {e}", file=sys.stderr)
        return 2
    return 0
