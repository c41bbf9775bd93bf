"""``npgpt classify``: the label and per-label probabilities of texts under a fine-tuned classifier."""
import json
import sys

HELP = """Classify texts with a classifier saved by `npgpt finetune-classify --out_dir DIR`:
  npgpt classify --out_dir DIR --text "To be, or not to be"
  npgpt classify --out_dir DIR --file passages.txt           one text per line
  npgpt classify --out_dir DIR --file passages.txt --json    one JSON object per text
Each text gives one line: the predicted label, then label:probability pairs, most probable first.
A text longer than the classifier's context is cut to its first max_len tokens, as fine-tuning cut
its training texts (a note on stderr says so; "truncated" in --json)."""


def register(sub):
    import argparse
    p = sub.add_parser("classify", help="label texts with a classifier from npgpt finetune-classify",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True,
                   help="directory holding classifier.npz (npgpt finetune-classify --out_dir), or the file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to classify (repeat for several)")
    src.add_argument("--file", metavar="PATH", help="UTF-8 file with one text per line ('-': stdin)")
    p.add_argument("--json", action="store_true", help="one JSON object per text: text, label, probs, tokens")
    p.add_argument("--batch_size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to compute: cpu (NumPy) or cuda (CuPy)")
    p.set_defaults(func=run_classify)


def read_texts(args):
    """The texts to classify: the --text values, or the lines of --file (an empty line is an error,
    so output line i always belongs to input line i)."""
    if args.text is not None:
        return list(args.text)
    if args.file == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise ValueError(f"--file {args.file} not found") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--file {args.file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    empty = [n for n, line in enumerate(lines, 1) if not line.strip()]
    if empty:
        raise ValueError(f"--file {args.file}: line {empty[0]} is empty ({len(empty)} empty lines in all); "
                         f"give one text per line")
    if not lines:
        raise ValueError(f"--file {args.file} holds no texts")
    return lines


def format_result(label_probs):
    """``label  a:0.9120 b:0.0880``: the top label, then every label with its probability, highest first."""
    ranked = sorted(label_probs.items(), key=lambda kv: -kv[1])
    return f"{ranked[0][0]}  " + " ".join(f"{label}:{p:.4f}" for label, p in ranked)


def classify(args, out=print, note=None):
    """Classify what ``args`` names; returns [{"text", "label", "probs", "tokens", "truncated"}]."""
    from ..finetune.classify import load_classifier, classify_texts
    from ..tokenizer import load_tokenizer_from_meta
    note = note or (lambda msg: print(msg, file=sys.stderr))
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    texts = read_texts(args)
    clf, labels, meta, max_len = load_classifier(args.out_dir)
    probs, counts = classify_texts(clf, load_tokenizer_from_meta(meta), texts, max_len, args.batch_size)
    results = []
    for n, (text, p, count) in enumerate(zip(texts, probs, counts), 1):
        r = {"text": text, "label": labels[int(p.argmax())], "probs": {l: float(v) for l, v in zip(labels, p)},
             "tokens": count, "truncated": count > max_len}
        if r["truncated"]:
            note(f"note: text {n} is {count} tokens; classified on its first {max_len} (the classifier's "
                 f"context; fine-tuning cut its texts the same way)")
        out(json.dumps(r) if args.json else format_result(r["probs"]))
        results.append(r)
    return results


def run_classify(args):
    from ..checkpoint import CheckpointError
    try:
        classify(args)
    except (CheckpointError, ValueError, KeyError, OSError) as e:
        print(f"npgpt classify: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    return 0
