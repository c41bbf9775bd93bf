"""``npgpt prepare``: text files -> train.bin / val.bin / meta.json for ``npgpt train``."""
import sys


def register(sub):
    parser = sub.add_parser("prepare", help="tokenize text into train.bin/val.bin for npgpt train",
                            description="Tokenize a file, directory or glob of .txt/.jsonl files into DIR/train.bin, "
                                        "DIR/val.bin (uint16 ids, uint32 when ids exceed 65,535) and DIR/meta.json. "
                                        "A .txt file is one document, a .jsonl line one document (its 'text' "
                                        "field); BPE tokenizers put <|endoftext|> between documents. The first "
                                        "90%% of the tokens train, the last 10%% validate (--val_fraction).")
    parser.add_argument("--input", nargs="+", default=None, help="inputs (default: the bundled Shakespeare)")
    parser.add_argument("--out_dir", "--out", dest="out", required=True, help="output directory (train.bin, val.bin, meta.json)")
    parser.add_argument("--tokenizer", default="char", help="char (default), gpt2, or a saved tokenizer file")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of tokens for val.bin (default 0.1)")
    parser.add_argument("--workers", type=int, default=None, help="processes for BPE (default: all cores)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args):
    from ..data import bundled_corpus_path
    from ..prepare import prepare
    try:
        meta = prepare(args.input or [bundled_corpus_path()], args.out, tokenizer=args.tokenizer,
                       val_fraction=args.val_fraction, workers=args.workers, progress=not args.no_progress)
    except (ValueError, OSError) as e:
        print(f"npgpt prepare: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
          f"vocabulary {meta['vocab_size']} ({meta['tokenizer']}), {meta['dtype']}")
    return 0
