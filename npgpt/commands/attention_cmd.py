"""``npgpt attention``: a PNG grid of every layer's and head's attention weights over a text."""
import os
import sys

DEFAULT_TEXT = "ROMEO:\nBut soft, what light"

HELP = """Draw the attention weights of a trained checkpoint over a short text: one map per layer (rows)
and head (columns), queries down and keys across, the tokens as tick labels. Needs matplotlib
(pip install -e ".[plot]"). The text must fit in the model's context (block_size tokens).
  npgpt attention                                     (the default checkpoint and text)
  npgpt attention --out_dir out-shakespeare-char --text "JULIET: O Romeo, Romeo!" --out juliet.png"""


def register(sub):
    p = sub.add_parser("attention", description=HELP, formatter_class=_Raw,
                       help="draw every layer x head's attention weights over a text (needs matplotlib)")
    p.add_argument("--out_dir", default="out-shakespeare-char", help="directory holding ckpt.npz")
    p.add_argument("--text", default=DEFAULT_TEXT,
                   help="the text to look at (default: a line of Romeo's); FILE:path reads it from a file")
    p.add_argument("--out", "--png", dest="png", metavar="PATH", default=None, help="where to write the picture (default OUT_DIR/attention.png)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the PNG (default 110)")
    p.set_defaults(func=run_attention)


class _Raw(__import__("argparse").RawDescriptionHelpFormatter):
    pass


def _error(msg):
    print(f"npgpt attention: error: {msg}", file=sys.stderr)
    return 2


def run_attention(args):
    import importlib
    try:
        importlib.import_module("matplotlib")      # checked first: a missing extra should not cost a model load
    except ImportError:
        return _error('needs matplotlib: pip install -e ".[plot]"')
    import numpy as np
    from ..checkpoint import CheckpointError
    from ..tokenizer import load_tokenizer_from_meta
    from ..loading import load_model
    from ..viz import attention_weights, plot_attention, token_labels
    from .sample_cmd import read_text_file
    text = args.text
    try:
        if text.startswith("FILE:"):
            text = read_text_file(text[5:], "--text FILE:")
        model, ckpt = load_model(args.out_dir)
        tok = load_tokenizer_from_meta(ckpt["meta"])
        ids = tok.encode(text)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        return _error(e)
    block_size = model.config.block_size
    if not ids:
        return _error("the text encodes to no tokens; give a non-empty --text")
    if len(ids) > block_size:
        return _error(f"the text is {len(ids)} tokens but the model sees at most block_size={block_size}; "
                      f"shorten --text")
    weights = attention_weights(model, np.asarray(ids))                   # (n_layer, n_head, T, T)
    path = args.png or os.path.join(args.out_dir, "attention.png")
    title = f"attention weights of {args.out_dir} over {len(ids)} tokens (rows: queries, columns: keys)"
    plot_attention(weights, token_labels(tok, ids), path, title=title, dpi=args.dpi)
    print(f"wrote {path}: {weights.shape[0]} layers x {weights.shape[1]} heads over {len(ids)} tokens")
    return 0
