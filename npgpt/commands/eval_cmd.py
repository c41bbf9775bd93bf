"""``npgpt eval``: perplexity / bits per byte on a text file and multiple-choice accuracy."""
import json
import sys

HELP = """Evaluate a model (an npgpt checkpoint via --out_dir, or a Hugging Face GPT-2 via --hf):
  npgpt eval --out_dir out-shakespeare-char --text input.txt           perplexity, bits per byte
  npgpt eval --hf gpt2 --text wiki.txt --stride 512 --max_tokens 20000
  npgpt eval --out_dir out-shakespeare-char --mc example                the bundled multiple-choice task
  npgpt eval --hf gpt2 --mc hellaswag_val.jsonl                         HellaSwag: acc and acc_norm
  npgpt eval --hf gpt2 --mc hellaswag_sample                            its bundled 10-item sample
Perplexity uses a sliding window of block_size tokens moved by --stride (default block_size/2);
each token is scored once, with at least block_size - stride tokens of context when the text has them.
A multiple-choice file is JSONL of {"context": str, "choices": [str, ...], "label": int} (choices are
appended to the context as written) or HellaSwag's {"ctx": str, "endings": [str, ...], "label": int}
(ctx_a/ctx_b without ctx: ctx_a + " " + ctx_b.capitalize(); each ending after one space). Both
scores are reported: acc (summed log-likelihood of a choice's tokens) and acc_norm (per token
mean); --mc_normalize picks the one "accuracy" and "predictions" follow."""


def register(sub):
    import argparse
    p = sub.add_parser("eval", help="perplexity, bits per byte and multiple-choice accuracy of a model",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--out_dir", default=None, help="npgpt checkpoint directory holding ckpt.npz "
                                                      "(default out-shakespeare-char)")
    src.add_argument("--hf", metavar="DIR", default=None, help="Hugging Face GPT-2 checkpoint directory")
    p.add_argument("--text", metavar="FILE", help="UTF-8 text file to compute perplexity and bits per byte on")
    p.add_argument("--stride", type=int, default=None, help="window stride in tokens (default block_size // 2)")
    p.add_argument("--batch_size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--max_tokens", type=int, default=None, help="score only the first N tokens of --text")
    p.add_argument("--mc", metavar="FILE", help="multiple-choice JSONL file, npgpt's or HellaSwag's format "
                                                 "(bundled: 'example', 'hellaswag_sample')")
    p.add_argument("--mc_normalize", choices=["sum", "mean"], default="sum",
                   help="which score 'accuracy' reports: the sum (acc) or per-token mean (acc_norm) of a "
                        "choice's log-likelihood; both are printed")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to compute: cpu (NumPy) or cuda (CuPy)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval)


def _load(args):
    from ..tokenizer import load_tokenizer_from_meta
    if args.hf is not None:
        from ..hf import from_hf, load_hf_meta
        model, meta = from_hf(args.hf), load_hf_meta(args.hf)
    else:
        from ..loading import load_model
        out_dir = args.out_dir or "out-shakespeare-char"
        model, ckpt = load_model(out_dir)       # LoRA adapters from finetune-instruct are merged on load
        meta = ckpt.get("meta")
        if not meta:
            raise ValueError(f"{out_dir}: the checkpoint names no tokenizer (no 'meta'); re-save it with npgpt")
    return model, load_tokenizer_from_meta(meta)


def evaluate(args, log=print):
    """Run what ``args`` asks for; returns the results dict. Raises ValueError/CheckpointError."""
    from .. import evaluate as ev
    from .sample_cmd import read_text_file
    if not args.text and not args.mc:
        raise ValueError("nothing to evaluate: give --text FILE and/or --mc FILE (or a bundled task: "
                         "--mc example, --mc hellaswag_sample)")
    text = read_text_file(args.text, "--text") if args.text else None
    if args.stride is not None and args.stride < 1:
        raise ValueError(f"--stride must be >= 1, got {args.stride}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max_tokens must be >= 2, got {args.max_tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    mc_path = ev.resolve_mc(args.mc) if args.mc else None
    items = ev.load_mc(mc_path) if mc_path else None
    model, tok = _load(args)
    bs = model.config.block_size
    if args.stride is not None and args.stride > bs:
        raise ValueError(f"--stride {args.stride} exceeds the model's block_size {bs}")
    results = {"model": args.hf or args.out_dir or "out-shakespeare-char", "block_size": bs}
    progress = not args.no_progress and not args.json
    if args.text:
        r = ev.evaluate_text(model, tok, text, args.stride, args.batch_size, args.max_tokens, progress)
        results["text"] = r
        if not args.json:
            log(f"{args.text}: {r['tokens']:,} tokens scored in {r['windows']} windows (stride {r['stride']}), "
                f"{r['tokens_per_s']:,.0f} tokens/s")
            log(f"  loss {r['loss']:.4f} nats/token, perplexity {r['ppl']:.3f}, bits per byte {r['bpb']:.4f}")
    if items:
        r = ev.multiple_choice(model, tok, items, args.mc_normalize, progress)
        results["mc"] = {k: r[k] for k in ("accuracy", "correct", "n", "normalize", "predictions", "acc",
                                           "acc_norm", "correct_sum", "correct_norm")}
        if not args.json:
            log(f"{mc_path}: {r['n']} items, acc {r['acc']:.3f} ({r['correct_sum']}/{r['n']}, summed "
                f"log-likelihood), acc_norm {r['acc_norm']:.3f} ({r['correct_norm']}/{r['n']}, per token)")
    if args.json:
        log(json.dumps(results))
    return results


def run_eval(args):
    from ..checkpoint import CheckpointError
    try:
        evaluate(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"npgpt eval: error: {e}", file=sys.stderr)
        return 2
    return 0
