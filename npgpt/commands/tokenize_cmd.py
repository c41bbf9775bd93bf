"""``npgpt tokenize`` (show ids and pieces, or decode ids) and ``npgpt train-tokenizer``."""
import argparse
import sys


def register(sub):
    parser = sub.add_parser("tokenize", help="show the GPT-2 (or a saved) tokenization of text, or decode ids",
                            description='npgpt tokenize "Hello world"      prints ids and pieces\n'
                                        'npgpt tokenize --decode 15496 11   prints the text of ids\n'
                                        'With no text, reads standard input.',
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="*", help="text to encode (or ids with --decode)")
    parser.add_argument("--decode", action="store_true", help="treat the arguments as token ids and decode them")
    parser.add_argument("--tokenizer", default="gpt2",
                        help="gpt2 (default), a saved tokenizer file (.json/.tiktoken), or a prepared data directory "
                             "(its meta.json names the tokenizer, e.g. char)")
    parser.set_defaults(func=run_tokenize)

    parser = sub.add_parser("train-tokenizer", help="train a byte-level BPE vocabulary on text files",
                            description="Learn a byte-level BPE vocabulary (GPT-2 pre-tokenization by default) "
                                        "and save it as readable JSON (PATH.json) or tiktoken ranks (PATH.tiktoken).")
    parser.add_argument("input", nargs="+", help="text files (.txt/.jsonl), directories or globs")
    parser.add_argument("--vocab_size", type=int, required=True,
                        help="total vocabulary size, specials included (>= 257)")
    parser.add_argument("--out", required=True, help="where to save: PATH.json (readable) or PATH.tiktoken")
    parser.add_argument("--pattern", default="gpt2", help="pre-tokenizer: gpt2 (default), gpt4, none, or a regex")
    parser.add_argument("--special", action="append", default=None, metavar="TOKEN",
                        help="special token (repeatable; default <|endoftext|>)")
    parser.set_defaults(func=run_train_tokenizer)


def _fail(cmd, e):
    print(f"npgpt {cmd}: error: {e}", file=sys.stderr)
    return 2


def _piece(tok, i):
    """A token shown as a quoted string, or as bytes when it is part of a UTF-8 character."""
    data = tok.encoding.decode_bytes([i]) if hasattr(tok, "encoding") else (
        tok.decode_bytes([i]) if hasattr(tok, "decode_bytes") else tok.decode([i]).encode())
    try:
        return repr(data.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(data)


def run_tokenize(args):
    import os
    from ..tokenizer import load_tokenizer_from_meta, tokenizer_from_name
    try:
        if os.path.isfile(os.path.join(args.tokenizer, "meta.json")):
            tok = load_tokenizer_from_meta(args.tokenizer)
        else:
            tok = tokenizer_from_name(args.tokenizer)
        if args.decode:
            try:
                ids = [int(x) for x in args.text]
            except ValueError:
                raise ValueError("--decode takes integer token ids, e.g. npgpt tokenize --decode 15496 11") from None
            print(tok.decode(ids))
            return 0
        text = " ".join(args.text) if args.text else sys.stdin.read()
        ids = tok.encode(text, allowed_special="all")     # the CLI shows special tokens as such
    except (ValueError, FileNotFoundError) as e:
        return _fail("tokenize", e)
    print(" ".join(map(str, ids)))
    print(" | ".join(_piece(tok, i) for i in ids))
    print(f"{len(ids)} tokens, {len(text.encode('utf-8', errors='replace'))} bytes")
    return 0


def run_train_tokenizer(args):
    import time
    import regex
    from ..prepare import list_inputs, iter_chunks
    from ..tokenizer import BasicTokenizer, RegexTokenizer
    specials = list(dict.fromkeys(args.special or ["<|endoftext|>"]))
    try:
        files = list_inputs(args.input)
        if args.vocab_size < 257 + len(specials):
            raise ValueError(f"--vocab_size must be at least {257 + len(specials)} "
                             f"(256 bytes + {len(specials)} special + 1 merge)")
        tok = BasicTokenizer() if args.pattern == "none" else RegexTokenizer(args.pattern)
        t0 = time.time()
        tok.train_from_iterator(iter_chunks(files), args.vocab_size, special_tokens=specials)  # streamed
        tok.save(args.out)
    except (ValueError, OSError) as e:
        return _fail("train-tokenizer", e)
    except regex.error as e:
        return _fail("train-tokenizer", f"bad --pattern regex: {e}")
    print(f"trained {tok.n_vocab} tokens ({len(tok.merges)} merges) on {len(files)} file(s) in "
          f"{time.time() - t0:.1f} s; saved {args.out}")
    return 0
