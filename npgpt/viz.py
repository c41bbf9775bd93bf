"""Pictures of what a model computes: the autograd graph as Graphviz DOT, and attention maps.

``graph(tensor)`` walks the graph a Tensor remembers (``_prev``, ``_op``; see ``engine.py``) and
writes it as DOT text: one box per op with its output shape, one node per leaf (parameters by name,
filled when they need a gradient, grey when they do not). Draw it before ``backward()``, which frees
the graph. With ``path="g.svg"`` (or .png, .pdf) the Graphviz ``dot`` program renders it when it is
installed; otherwise the DOT text is written beside it as ``g.dot``.

``attention_weights(model, ids)`` recomputes every layer's and head's attention probabilities
softmax(q k^T / sqrt(hs)) with the causal mask; ``plot_attention`` draws them as a grid (matplotlib,
``pip install -e ".[plot]"``). ``npgpt attention`` does both from a checkpoint.
"""
import math
import os
import shutil
import subprocess
import warnings

import numpy as np

from . import backend
from .engine import Tensor, no_grad

__all__ = ["graph", "render", "attention_weights", "plot_attention", "token_labels"]

RENDER_FORMATS = ("svg", "png", "pdf")


# ---- the autograd graph as DOT ------------------------------------------------------------------

def graph(tensor, params=None, path=None, format=None, rankdir="TB"):
    """The autograd graph that produced ``tensor``, as Graphviz DOT text.

    params: optional {name: Tensor} (e.g. ``dict(model.named_parameters())``) naming the leaves;
        otherwise a leaf shows its ``.name`` if it has one.
    path: also write the picture there: .svg/.png/.pdf are rendered with Graphviz ``dot`` when it
        is on the PATH (else the DOT text goes to the same path with .dot and a warning says so);
        .dot/.gv get the DOT text. ``format`` overrides the suffix.
    rankdir: "TB" (inputs at the top) or "LR" (inputs on the left).

    Nodes: ops are boxes labelled ``op`` and the output shape and dtype; leaves that need a gradient
    (parameters) are filled blue and marked ``requires_grad``; other leaves (inputs, constants) are
    grey; the tensor itself has a double border. An op whose inputs need no gradient records no
    inputs, so it shows as a grey leaf named after its op. Returns the DOT text.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"graph() takes a Tensor, got {type(tensor).__name__}")
    if tensor._freed:
        raise ValueError("this graph was freed by backward(); draw it before calling backward() "
                         "(or call backward(retain_graph=True))")
    names = {id(p): name for name, p in (params or {}).items()}
    nodes = tensor.topological_order(every_input=True)
    ids = {id(t): f"n{i}" for i, t in enumerate(nodes)}
    lines = [
        "digraph autograd {",
        f"  rankdir={rankdir};",
        '  node [fontname="Helvetica", fontsize=11];',
        '  edge [color="#555555", arrowsize=0.7];',
    ]
    for t in nodes:
        lines.append(f"  {ids[id(t)]} [{_node_attrs(t, names.get(id(t)), t is tensor)}];")
    for t in nodes:
        for p in t._prev:
            lines.append(f"  {ids[id(p)]} -> {ids[id(t)]};")
    lines.append("}")
    dot = "\n".join(lines) + "\n"
    if path is not None:
        render(dot, path, format)
    return dot


def _node_attrs(t, param_name, is_output):
    """The DOT attributes of one node: its label lines, its shape and colours."""
    shape = "(" + ", ".join(str(n) for n in t.shape) + ("," if t.ndim == 1 else "") + ")"
    detail = f"{shape} {t.dtype}"
    if t._prev:                                    # a recorded op
        lines, attrs = [t._op or "op", detail], ['shape=box', 'style="rounded,filled"', 'fillcolor="#fff2cc"']
    elif t.requires_grad:                          # a leaf that gets .grad: a parameter
        lines = [param_name or t.name or "leaf", detail, "requires_grad"]
        attrs = ['shape=box', 'style=filled', 'fillcolor="#cfe2f3"']
    else:                                          # an input, constant or frozen weight: no gradient
        name = param_name or t.name or (f"{t._op} (no grad)" if t._op else
                                        f"{t.data.item():g}" if t.size == 1 else "input")
        lines, attrs = [name, detail], ['shape=box', 'style=filled', 'fillcolor="#eeeeee"', 'fontcolor="#555555"']
    if is_output:
        attrs.append("peripheries=2")
    label = "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)
    return f'label="{label}", ' + ", ".join(attrs)


def render(dot, path, format=None):
    """Write DOT text to ``path``: rendered by Graphviz ``dot`` for .svg/.png/.pdf (or ``format``),
    as text for .dot/.gv. Without ``dot`` on the PATH the text goes to ``path`` with the suffix .dot
    and a UserWarning names the file and how to get Graphviz. Returns the path written."""
    fmt = (format or os.path.splitext(path)[1].lstrip(".")).lower()
    if fmt in ("dot", "gv", ""):
        with open(path, "w", encoding="utf-8") as f:
            f.write(dot)
        return path
    if fmt not in RENDER_FORMATS:
        raise ValueError(f"cannot render {path!r} as {fmt!r}: use .svg, .png, .pdf or .dot")
    exe = shutil.which("dot")
    if exe is None:
        dot_path = os.path.splitext(path)[0] + ".dot"
        with open(dot_path, "w", encoding="utf-8") as f:
            f.write(dot)
        warnings.warn(f"Graphviz `dot` is not installed, so {path} was not drawn; wrote the DOT text to "
                      f"{dot_path} (install Graphviz, e.g. apt-get install graphviz, then "
                      f"`dot -T{fmt} {dot_path} -o {path}`)", UserWarning, stacklevel=2)
        return dot_path
    done = subprocess.run([exe, f"-T{fmt}", "-o", path], input=dot.encode(), capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"dot failed on {path}: {done.stderr.decode(errors='replace').strip()}")
    return path


# ---- attention maps -----------------------------------------------------------------------------

def attention_weights(model, ids):
    """The attention probabilities of every layer and head of a GPT on token ids.

    ids: integer array (T,) or (B, T), T <= block_size. Returns a NumPy float32 array
    (n_layer, n_head, T, T) for (T,) ids, (B, n_layer, n_head, T, T) for (B, T): entry [l, h, i, j]
    is how much query position i of head h in block l attends to key position j,
    P = softmax(q k^T / sqrt(hs)) with the causal mask (zero for j > i; each row sums to 1).
    The model runs block by block in eval mode (no dropout) under ``no_grad``: each block's q and k
    come from its ``ln_1`` and ``attn.c_attn``, the next block's input from the block itself.
    """
    ids_np = np.asarray(backend.to_numpy(ids))
    single = ids_np.ndim == 1
    ids_np = ids_np[None, :] if single else ids_np
    if ids_np.ndim != 2 or ids_np.dtype.kind not in "iu":
        raise ValueError(f"ids must be integer token ids of shape (T,) or (B, T), got {ids_np.dtype} "
                         f"{ids_np.shape}")
    cfg = model.config
    B, T = ids_np.shape
    if not 1 <= T <= cfg.block_size:
        raise ValueError(f"{T} tokens: attention maps need 1 to block_size={cfg.block_size} tokens")
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            x = _embed(model, backend.to_device(ids_np))                             # (B, T, C)
            maps = []
            for block in model.transformer.h:
                maps.append(_block_attention(block, x))                              # (B, NH, T, T)
                x = block(x)
    finally:
        model.train(was_training)
    weights = np.stack([backend.to_numpy(m) for m in maps], axis=1)                  # (B, L, NH, T, T)
    return weights[0] if single else weights


def _embed(model, idx):
    """The blocks' input for ids (B, T): token plus position embeddings, as ``GPT.hidden_states``."""
    tr, T = model.transformer, idx.shape[1]
    tok = tr.wte(idx)                                                                # (B, T, C)
    if model.config.pos == "learned":
        return tok + tr.wpe(backend.xp.arange(T)[None, :])                           # (B, T, C)
    return tok + Tensor(model._pe[:T][None].astype(tok.dtype, copy=False))


def _block_attention(block, x):
    """P (B, NH, T, T), float32: the causal softmax of one block's scaled query-key scores."""
    B, T, C = x.shape
    NH = block.attn.n_head
    hs = C // NH
    qkv = block.attn.c_attn(block.ln_1(x)).data                                      # (B, T, 3C)
    qkv = qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4).astype("float32")    # (3, B, NH, T, hs)
    q, k = qkv[0], qkv[1]                                                            # (B, NH, T, hs)
    xp = backend.get_array_module(q)
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))                   # (B, NH, T, T)
    future = xp.triu(xp.ones((T, T), dtype=bool), k=1)                               # (T, T) j > i
    scores = xp.where(future, -xp.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)                                     # row max: the diagonal is finite
    probs = xp.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs                                                                     # (B, NH, T, T)


def token_labels(tokenizer, ids):
    """A printable label per token id: its text with newline shown as ``↵``, tab as ``⇥`` and space as
    ``␣`` (glyphs of the DejaVu fonts matplotlib ships), so whitespace tokens are visible on an axis."""
    out = []
    for i in ids:
        piece = tokenizer.decode([int(i)])
        out.append(piece.replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u2423") or "\u2205")
    return out


def plot_attention(weights, tokens, path, title=None, dpi=110):
    """Draw attention weights (n_layer, n_head, T, T) as a grid: one row per layer, one column per
    head, each map with queries down and keys across, the tokens as tick labels (on the left column
    and the bottom row). One colour scale for all maps, 0 to 1 with a square-root stretch so that
    small weights stay visible; the masked future (above the diagonal) is left white. Writes
    ``path`` (PNG, or any format matplotlib infers) and returns it. Needs matplotlib
    (``pip install -e ".[plot]"``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    weights = np.asarray(weights)
    if weights.ndim != 4 or weights.shape[-1] != weights.shape[-2] or weights.shape[-1] != len(tokens):
        raise ValueError(f"weights must be (n_layer, n_head, T, T) with T = {len(tokens)} tokens, "
                         f"got {weights.shape}")
    L, NH, T, _ = weights.shape
    panel = max(1.6, 0.11 * T + 0.5)                  # inches per map: ~12 pixels a token at dpi 110
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    fig, axes = plt.subplots(L, NH, figsize=(panel * NH + 1.6, panel * L + 1.0), squeeze=False,
                             sharex=True, sharey=True)
    image = None
    for layer in range(L):
        for head in range(NH):
            ax = axes[layer, head]
            image = ax.imshow(np.ma.masked_array(weights[layer, head], future), cmap=cmap, norm=norm,
                              interpolation="nearest")
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.tick_params(length=0, labelsize=7, pad=1.5)
            if layer == L - 1:
                upright = max(len(t) for t in tokens) <= 2            # characters read better upright
                ax.set_xticklabels(tokens, rotation=0 if upright else 90, fontfamily="monospace")
            if head == 0:
                ax.set_yticklabels(tokens, fontfamily="monospace")
                ax.set_ylabel(f"layer {layer}", fontsize=11)
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=11)
    fig.suptitle(title or "attention weights (rows: queries, columns: keys)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1 - 1.0 / fig.get_figwidth(), 0.98))
    cax = fig.add_axes([1 - 0.75 / fig.get_figwidth(), 0.3, 0.18 / fig.get_figwidth(), 0.4])
    bar = fig.colorbar(image, cax=cax, ticks=[0, 0.05, 0.2, 0.5, 1.0])
    bar.ax.tick_params(labelsize=8)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
