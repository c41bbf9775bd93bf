"""``npgpt sample``: text from a trained checkpoint or a Hugging Face GPT-2, streamed to a terminal.

The sampling knobs (``add_sampling_args``) and the loading (``load_for_sampling``) are shared with
``npgpt chat`` (chat_cmd.py); ``sample --instruct "..."`` is chat's one-shot answer.
"""
import argparse
import os
import sys


def add_sampling_args(parser, temperature=0.8, top_k=200, max_new_tokens=500):
    """The knobs of ``npgpt.sampling.generate_stream`` plus --seed, --device, --no_cache, --stream."""
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=top_k, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="nucleus: keep the most likely tokens up to this probability mass (1 = off)")
    parser.add_argument("--repetition_penalty", type=float, default=1.0,
                        help="CTRL penalty on tokens already in the context: > 1 discourages repeats "
                             "(1 = off; 1.1-1.3 is typical)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling (sample i uses seed + i)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="cpu (NumPy) or cuda (CuPy); default: --backend, $NPGPT_BACKEND or cpu")
    parser.add_argument("--no_cache", action="store_true", help="recompute the whole context every step")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="print tokens as they are made (default: when stdout is a terminal)")


def register(sub):
    sample = sub.add_parser("sample", help="sample text from a trained checkpoint or a Hugging Face GPT-2")
    sample.add_argument("--out_dir", default="out-shakespeare-char",
                        help="directory holding ckpt.npz (a LoRA-tuned one loads merged)")
    sample.add_argument("--hf", metavar="DIR", default=None,
                        help="sample from a Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors) "
                             "instead of --out_dir; uses the GPT-2 tokenizer (or the one npgpt_meta.json names)")
    sample.add_argument("--start", default="\n", help="prompt text (or FILE:path to read it from a file)")
    sample.add_argument("--instruct", metavar="QUESTION", default=None,
                        help="ask an instruction-tuned checkpoint: wrap QUESTION in its template and stop at its "
                             "end marker (as `npgpt chat --prompt`); --start is then ignored")
    sample.add_argument("--num_samples", type=int, default=1, help="how many samples to print")
    add_sampling_args(sample)
    sample.set_defaults(func=run_sample)


def read_text_file(path, what="file"):
    """The text of the UTF-8 file ``path``; a missing file, a directory or a binary file (not UTF-8,
    or holding NUL bytes) is a ValueError naming ``what`` (e.g. "--start FILE:")."""
    if not os.path.exists(path):
        raise ValueError(f"{what} {path} not found")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory; give a UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); give a text file") from None
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be read: {e.strerror}") from None
    if "\0" in text:
        raise ValueError(f"{what} {path} is not UTF-8 text (it holds NUL bytes: a binary file?); give a text file")
    return text


def check_question(question, flag):
    """A question for an instruction-tuned model must say something: ValueError for a blank one."""
    if not question.strip():
        raise ValueError(f"{flag} is empty: ask a question, e.g. {flag} \"Which play is this line from?\"")


def sampling_kwargs(args):
    """generate_stream's keyword arguments from parsed --temperature ... --no_cache (checked)."""
    from ..sampling import check_sampling
    if args.max_new_tokens < 0:
        raise ValueError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, use_cache=not args.no_cache)


def writer(stream):
    """``write(piece)`` to stdout, flushed at once, when streaming (None: stream when stdout is a
    terminal); else None."""
    if stream is None:
        stream = sys.stdout.isatty()
    if not stream:
        return None

    def write(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()
    return write


def load_for_sampling(out_dir=None, hf=None):
    """(model, tokenizer, checkpoint dict) from ``out_dir`` (``loading.load_model``: npgpt
    checkpoints, LoRA-tuned ones merged) or from a Hugging Face directory ``hf``."""
    from ..tokenizer import load_tokenizer_from_meta
    if hf is not None:
        from ..hf import from_hf, load_hf_meta
        model, meta = from_hf(hf), load_hf_meta(hf)
        return model, load_tokenizer_from_meta(meta), {"meta": meta}
    from ..loading import load_model
    model, ckpt = load_model(out_dir)
    if not ckpt.get("meta"):
        raise ValueError(f"{out_dir}: the checkpoint names no tokenizer (no 'meta'); re-save it with npgpt")
    return model, load_tokenizer_from_meta(ckpt["meta"]), ckpt


def print_samples(out_dir, start, num_samples, max_new_tokens, temperature, top_k, top_p, seed, cache, hf=None,
                  repetition_penalty=1.0, stream=None):
    """Print ``num_samples`` continuations of ``start`` (each with the prompt in front), as they are
    made when streaming. The tokenizer's end-of-text token (if any) ends a sample."""
    from ..sampling import check_sampling, stream_text
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    model, tok, _ = load_for_sampling(out_dir, hf)
    ids = tok.encode(start)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --start")
    write = writer(stream)
    for i in range(num_samples):
        if write:
            write(tok.decode(ids))
        text = stream_text(model, tok, ids, max_new_tokens, write, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed + i, eos_token=getattr(tok, "eot_token", None),
                           use_cache=cache, repetition_penalty=repetition_penalty)
        print("" if write else tok.decode(ids) + text)
        if num_samples > 1:
            print("-" * 40)


def run_sample(args):
    from ..checkpoint import CheckpointError
    start = args.start
    try:
        knobs = sampling_kwargs(args)
        if args.instruct is not None:
            from .chat_cmd import answer
            check_question(args.instruct, "--instruct")
            model, tok, ckpt = load_for_sampling(args.out_dir, args.hf)
            answer(model, tok, ckpt, args.instruct, args.max_new_tokens, writer(args.stream), seed=args.seed,
                   **knobs)
            return 0
        if start.startswith("FILE:"):
            start = read_text_file(start[5:], "--start FILE:")
        print_samples(args.out_dir, start, args.num_samples, args.max_new_tokens, args.temperature,
                      args.top_k, args.top_p, args.seed, not args.no_cache, hf=args.hf,
                      repetition_penalty=args.repetition_penalty, stream=args.stream)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"npgpt sample: error: {e}", file=sys.stderr)
        return 2
    return 0
