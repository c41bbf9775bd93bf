"""``npgpt tokenize`` and ``npgpt train-tokenizer``."""
import sys


def register(sub):
    p = sub.add_parser("tokenize", help="show the GPT-2 (or a saved) tokenization of text, or decode ids",
                       description='npgpt tokenize "Hello world"      prints ids and pieces\n'
                                   'npgpt tokenize --decode 15496 11   prints the text of ids',
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="*", help="text to encode (or ids with --decode)")
    p.add_argument("--decode", action="store_true", help="treat the arguments as token ids and decode them")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 (default) or a saved tokenizer file")
    p.set_defaults(func=run_tokenize)

    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE vocabulary on text files")
    t.add_argument("input", nargs="+", help="text files (.txt/.jsonl), directories or globs")
    t.add_argument("--vocab-size", type=int, required=True, help="total vocabulary size (>= 256)")
    t.add_argument("--out", required=True, help="where to save: PATH.json (readable) or PATH.tiktoken")
    t.add_argument("--pattern", default="gpt2", help="pre-tokenizer: gpt2, gpt4, none, or a regex")
    t.add_argument("--special", action="append", default=["<|endoftext|>"],
                   help="special token (repeatable; default <|endoftext|>)")
    t.set_defaults(func=run_train_tokenizer)


def _load(name):
    from ..tokenizer import tokenizer_from_name
    return tokenizer_from_name(name)


def run_tokenize(args):
    try:
        tok = _load(args.tokenizer)
        if args.decode:
            try:
                ids = [int(x) for x in args.text]
            except ValueError:
                raise ValueError("--decode takes integer token ids, e.g. npgpt tokenize --decode 15496 11") from None
            print(tok.decode(ids))
            return 0
        text = " ".join(args.text) if args.text else sys.stdin.read()
        ids = tok.encode(text, allowed_special="all")
    except (ValueError, FileNotFoundError) as e:
        print(f"npgpt tokenize: error: {e}", file=sys.stderr)
        return 2
    print(" ".join(map(str, ids)))
    print(" | ".join(repr(tok.decode([i]))[1:-1] for i in ids))
    print(f"{len(ids)} tokens, {len(text.encode('utf-8'))} bytes")
    return 0


def run_train_tokenizer(args):
    import time
    from ..prepare import list_inputs, iter_documents
    from ..tokenizer import BasicTokenizer, RegexTokenizer
    try:
        files = list_inputs(args.input)
        if args.vocab_size < 256 + len(args.special):
            raise ValueError(f"--vocab-size must be at least {256 + len(args.special)}")
        text = "\n".join("".join(doc) for doc in iter_documents(files))
    except (ValueError, FileNotFoundError) as e:
        print(f"npgpt train-tokenizer: error: {e}", file=sys.stderr)
        return 2
    tok = BasicTokenizer() if args.pattern == "none" else RegexTokenizer(args.pattern)
    t0 = time.time()
    tok.train(text, args.vocab_size, special_tokens=list(dict.fromkeys(args.special)))
    tok.save(args.out)
    print(f"trained {tok.n_vocab} tokens on {len(text.encode('utf-8')):,} bytes in {time.time() - t0:.1f} s; "
          f"saved {args.out}")
    return 0
