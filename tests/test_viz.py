"""npgpt.viz: the autograd graph as DOT, the attention weights, and ``npgpt attention``."""
import re
import shutil
import sys

import numpy as np
import pytest

from npgpt import backend, viz
from npgpt import functional as F
from npgpt.checkpoint import save_checkpoint
from npgpt.cli import main
from npgpt.engine import Tensor
from npgpt.model import GPT, GPTConfig
from npgpt.nn import Linear, Module

CHARS = sorted(set("ROMEO: But soft, what light through yonder window breaks?\nJULIET"))


class TinyMLP(Module):
    def __init__(self):
        self.fc1 = Linear(3, 8)
        self.fc2 = Linear(8, 1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def mlp_loss():
    mlp = TinyMLP()
    x = Tensor(np.ones((4, 3), np.float32), name="x")
    y = Tensor(np.zeros((4, 1), np.float32), name="y")
    return mlp, ((mlp(x) - y) ** 2).mean()


def node_labels(dot):
    """{node id: label with real line breaks} of a DOT text written by viz.graph."""
    return {m.group(1): m.group(2).replace("\\n", "\n") for m in re.finditer(r'^\s+(n\d+) \[label="(.*?)"', dot, re.M)}


def edges(dot):
    return re.findall(r"^\s+(n\d+) -> (n\d+);", dot, re.M)


# ---- the graph ----------------------------------------------------------------------------------

def test_graph_of_a_tiny_mlp_names_ops_shapes_and_parameters():
    mlp, loss = mlp_loss()
    dot = viz.graph(loss, params=dict(mlp.named_parameters()))
    assert dot.startswith("digraph autograd {") and dot.rstrip().endswith("}")
    labels = node_labels(dot)
    by_first_line = {}
    for node, label in labels.items():
        by_first_line.setdefault(label.split("\n")[0], []).append((node, label))
    # every op with its output shape and dtype
    assert [lab for _, lab in by_first_line["linear"]] == ["linear\n(4, 8) float32", "linear\n(4, 1) float32"]
    assert by_first_line["gelu"][0][1] == "gelu\n(4, 8) float32"
    assert by_first_line["sub"][0][1] == "sub\n(4, 1) float32"
    assert by_first_line["mean"][0][1] == "mean\n() float32"
    # parameters by name, marked as needing gradients; inputs and constants are not
    for name, p in mlp.named_parameters():
        (node, label), = by_first_line[name]
        assert label.endswith("requires_grad") and str(p.dtype) in label
    assert by_first_line["fc1.bias"][0][1] == "fc1.bias\n(8,) float32\nrequires_grad"
    for name in ("x", "y", "2"):                 # the inputs and the exponent of ** 2
        assert "requires_grad" not in by_first_line[name][0][1]
    # 4 parameters + x, y, 2 + 6 ops; one edge per recorded input; the output has a double border
    assert len(labels) == 13 and len(edges(dot)) == 12
    (out_node, _), = by_first_line["mean"]
    assert re.search(rf"^\s+{out_node} \[.*peripheries=2", dot, re.M)
    assert dot == viz.graph(loss, params=dict(mlp.named_parameters()))      # deterministic


def test_graph_of_a_gpt_block_uses_gpt2_names():
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8))
    x = Tensor(np.zeros((1, 5, 8), np.float32), name="x")
    dot = viz.graph(model.transformer.h[1](x), params=dict(model.named_parameters()))
    firsts = [lab.split("\n")[0] for lab in node_labels(dot).values()]
    block_params = [n for n, _ in model.named_parameters() if n.startswith("transformer.h.1.")]
    assert len(block_params) == 12 and all(firsts.count(n) == 1 for n in block_params)
    ops = {f for f in firsts if f not in block_params and f != "x"}
    assert ops == {"layer_norm", "linear", "reshape", "transpose", "getitem", "attention", "add", "gelu"}
    assert firsts.count("linear") == 4 and firsts.count("getitem") == 3
    assert "attention\\n(1, 2, 5, 4) float32" in dot              # (B, NH, T, hs)


def test_graph_without_params_uses_tensor_names_and_refuses_a_freed_graph():
    w = Tensor(np.ones(3, np.float32), requires_grad=True, name="w")
    loss = (w * 3.0).sum()
    labels = list(node_labels(viz.graph(loss)).values())
    assert "w\n(3,) float32\nrequires_grad" in labels and "mul\n(3,) float32" in labels
    quoted = Tensor(np.ones(3, np.float32), name='say "hi"')
    assert 'label="say \\"hi\\"\\n(3,) float32"' in viz.graph(quoted)      # quotes escaped for DOT
    loss.backward()
    with pytest.raises(ValueError, match="before calling backward"):
        viz.graph(loss)
    with pytest.raises(TypeError):
        viz.graph(np.ones(3))


def test_graph_writes_dot_and_falls_back_to_dot_text_without_graphviz(tmp_path, monkeypatch):
    _, loss = mlp_loss()
    dot = viz.graph(loss, path=str(tmp_path / "g.dot"))
    assert (tmp_path / "g.dot").read_text() == dot
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="Graphviz `dot` is not installed"):
        assert viz.graph(loss, path=str(tmp_path / "h.svg")) == dot
    assert (tmp_path / "h.dot").read_text() == dot and not (tmp_path / "h.svg").exists()
    with pytest.raises(ValueError, match="cannot render"):
        viz.render(dot, str(tmp_path / "g.jpeg"))


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_graph_renders_svg_and_png_with_graphviz(tmp_path):
    mlp, loss = mlp_loss()
    viz.graph(loss, params=dict(mlp.named_parameters()), path=str(tmp_path / "g.svg"))
    viz.graph(loss, path=str(tmp_path / "g.png"))
    svg = (tmp_path / "g.svg").read_text()
    assert "<svg" in svg and "fc1.weight" in svg
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- attention weights --------------------------------------------------------------------------

def tiny_gpt(**kw):
    cfg = dict(vocab_size=len(CHARS), block_size=16, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_attention_weights_are_the_attention_the_blocks_compute(xp, pos):
    model = tiny_gpt(pos=pos)
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5])
    T, NH, hs = len(ids), 2, 8
    P = viz.attention_weights(model, ids)                                        # (L, NH, T, T)
    assert P.shape == (2, NH, T, T) and P.dtype == np.float32 and isinstance(P, np.ndarray)
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-5)
    assert np.all(P[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)
    assert np.all(P[..., np.arange(T), np.arange(T)] > 0)
    # rebuild every block's attention output from P and v and compare with the block itself
    x = model.transformer.wte(backend.to_device(ids[None]))
    x = x + (model.transformer.wpe(xp.arange(T)[None]) if pos == "learned" else Tensor(model._pe[:T][None]))
    for layer, block in enumerate(model.transformer.h):
        qkv = block.attn.c_attn(block.ln_1(x))
        qkv = qkv.reshape(1, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)              # (3, B, NH, T, hs)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probs = backend.to_device(P[layer][None])                                # (B, NH, T, T)
        heads = probs @ v.data                                                   # (B, NH, T, hs)
        np.testing.assert_allclose(backend.to_numpy(heads),
                                   F.scaled_dot_product_attention(q, k, v).numpy(), atol=2e-6)
        merged = Tensor(heads.transpose(0, 2, 1, 3).reshape(1, T, NH * hs))
        np.testing.assert_allclose(block.attn.c_proj(merged).numpy(), block.attn(block.ln_1(x)).numpy(),
                                   atol=2e-6)
        x = block(x)
    np.testing.assert_allclose(model.transformer.ln_f(x).numpy(), model.hidden_states(ids[None]).numpy(),
                               atol=1e-6)                                        # the same blocks' inputs


def test_attention_weights_batch_eval_mode_and_errors():
    model = tiny_gpt(dropout=0.2)
    ids = np.array([[1, 2, 3, 4], [4, 3, 2, 1]])
    P = viz.attention_weights(model, ids)
    assert P.shape == (2, 2, 2, 4, 4) and model.training                         # mode restored
    np.testing.assert_allclose(P[1], viz.attention_weights(model, ids[1]), atol=1e-6)
    np.testing.assert_array_equal(P[0, :, :, 0, 0], 1.0)                          # the first token sees itself
    with pytest.raises(ValueError, match="block_size=16"):
        viz.attention_weights(model, np.zeros(17, int))
    with pytest.raises(ValueError, match="integer token ids"):
        viz.attention_weights(model, np.zeros(3))


def test_token_labels_make_whitespace_visible():
    from npgpt.tokenizer import CharTokenizer
    tok = CharTokenizer(CHARS)
    assert viz.token_labels(tok, tok.encode("O R\n")) == ["O", "\u2423", "R", "\u21b5"]


# ---- npgpt attention ----------------------------------------------------------------------------

@pytest.fixture
def ckpt_dir(tmp_path):
    model = tiny_gpt(block_size=64)
    save_checkpoint(str(tmp_path / "ckpt.npz"),
                    {"model": model.state_dict(), "model_config": model.config.to_dict(),
                     "meta": {"tokenizer": "char", "chars": CHARS, "vocab_size": len(CHARS)}})
    return tmp_path


def test_cli_attention_writes_a_png(ckpt_dir, capsys):
    pytest.importorskip("matplotlib")
    assert main(["attention", "--out_dir", str(ckpt_dir), "--text", "ROMEO: But soft"]) == 0
    png = ckpt_dir / "attention.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 layers x 2 heads over 15 tokens" in capsys.readouterr().out
    (ckpt_dir / "t.txt").write_text("JULIET:\nO")
    assert main(["attention", "--out_dir", str(ckpt_dir), "--text", f"FILE:{ckpt_dir / 't.txt'}",
                 "--png", str(ckpt_dir / "j.png")]) == 0
    assert (ckpt_dir / "j.png").stat().st_size > 1000


def test_cli_attention_errors_are_one_line(ckpt_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cases = [
        (["--out_dir", str(tmp_path / "none")], "no checkpoint at"),
        (["--out_dir", str(ckpt_dir), "--text", "ROMEO " * 11], "66 tokens but the model sees at most block_size=64"),
        (["--out_dir", str(ckpt_dir), "--text", ""], "no tokens"),
        (["--out_dir", str(ckpt_dir), "--text", "xyz"], "not in the vocabulary"),
    ]
    for argv, message in cases:
        assert main(["attention"] + argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("npgpt attention: error:")


def test_cli_attention_without_matplotlib_names_the_fix(ckpt_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)                       # as if not installed
    assert main(["attention", "--out_dir", str(ckpt_dir)]) == 2
    assert 'pip install -e ".[plot]"' in capsys.readouterr().err
