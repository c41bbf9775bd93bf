"""``npgpt prepare``: corpus files -> train.bin / val.bin (or shards) / meta.json for ``npgpt train``."""
import sys


def register(sub):
    parser = sub.add_parser("prepare", help="tokenize text into train.bin/val.bin (or shards) for npgpt train",
                            description="Tokenize a file, directory or glob of .txt/.jsonl/.parquet/.tar files (optionally "
                                        "compressed: .gz .xz .bz2 .zst) into DIR/train.bin, DIR/val.bin (uint16 ids, "
                                        "uint32 when ids exceed 65,535) and DIR/meta.json. A .txt file is one "
                                        "document, a .jsonl line one document (its 'text' field); BPE tokenizers put "
                                        "<|endoftext|> between documents. The first 90%% of the tokens train, the "
                                        "last 10%% validate (--val_fraction). With --shard_tokens N the splits are "
                                        "written as shards of N tokens (DIR/train_000000.bin, ..., indexed in "
                                        "meta.json) as they fill, re-running an interrupted command resumes after its "
                                        "last finished shard, and whole documents are split by a stable hash of their "
                                        "text (--split; one .txt file keeps the position split).")
    parser.add_argument("--input", nargs="+", default=None, help="inputs (default: the bundled Shakespeare)")
    parser.add_argument("--out_dir", "--out", dest="out", required=True, help="output directory (train.bin, val.bin, meta.json)")
    parser.add_argument("--tokenizer", default="char", help="char (default), gpt2, or a saved tokenizer file")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of tokens for val.bin (default 0.1)")
    parser.add_argument("--shard_tokens", type=int, default=0,
                        help="tokens per shard; 0 (default) writes one train.bin and one val.bin")
    parser.add_argument("--split", choices=("auto", "position", "hash"), default="auto",
                        help="val by position (the last tokens) or by document hash (sharded only); auto "
                             "(default): hash for a sharded multi-document corpus, else position")
    parser.add_argument("--text_key", default="text", help="the JSONL field (dotted: a.b) holding the text")
    parser.add_argument("--filter", dest="filters", action="append", default=[], metavar="KEY=VALUE",
                        help="keep only rows with this value, e.g. 'meta.pile_set_name=Wikipedia (en)' (repeatable)")
    parser.add_argument("--column", default=None, help="the Parquet text column (default: --text_key)")
    parser.add_argument("--workers", type=int, default=None, help="processes for BPE (default: the cores other processes leave free)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args):
    from ..data import bundled_corpus_path
    from ..prepare import prepare
    try:
        meta = prepare(args.input or [bundled_corpus_path()], args.out, tokenizer=args.tokenizer,
                       val_fraction=args.val_fraction, workers=args.workers, progress=not args.no_progress,
                       shard_tokens=args.shard_tokens, split=args.split, text_key=args.text_key,
                       filters=tuple(args.filters), column=args.column)
    except (ValueError, OSError) as e:
        print(f"npgpt prepare: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
          f"vocabulary {meta['vocab_size']} ({meta['tokenizer']}), {meta['dtype']}"
          + (f", {len(meta['shards']['train'])} + {len(meta['shards']['val'])} shards ({meta['split']} split)"
             if "shards" in meta else ""))
    return 0
