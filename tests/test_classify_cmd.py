"""A saved classifier (``save_classifier`` / ``load_classifier``, LoRA merged) and ``npgpt classify``."""
import json

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, backend
from npgpt.checkpoint import CheckpointError, save_checkpoint
from npgpt.cli import main
from npgpt.finetune import classify as C
from npgpt.lora import apply_lora
from npgpt.tokenizer import CharTokenizer

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ,.!?"))
META = {"tokenizer": "char", "chars": CHARS, "vocab_size": len(CHARS)}
LABELS = ["neg", "pos"]


def tiny_classifier(block_size=16, seed=0):
    backend.use("numpy")
    backend.seed(seed)
    gpt = GPT(GPTConfig(vocab_size=len(CHARS), block_size=block_size, n_layer=1, n_head=2, n_embd=16))
    clf = C.GPTClassifier(gpt, len(LABELS))
    clf.head.weight.data[...] = np.random.default_rng(seed).normal(0, 0.5, clf.head.weight.shape)
    return clf.eval()


def softmax_of(clf, texts):
    """Probabilities computed independently: one text at a time, logits softmaxed in float64."""
    tok = CharTokenizer(CHARS)
    out = []
    for t in texts:
        ids = np.array([tok.encode(t)])
        z = clf(ids, np.array([ids.shape[1]])).data[0].astype(np.float64)
        e = np.exp(z - z.max())
        out.append(e / e.sum())
    return np.array(out)


def with_trained_lora(clf, seed=1):
    apply_lora(clf.gpt, ["attn.c_attn", "attn.c_proj"], r=2, alpha=4.0)
    rng = np.random.default_rng(seed)
    for name, p in clf.named_parameters():
        if name.endswith("lora_B"):
            p.data[...] = rng.normal(0, 0.3, p.shape)        # as if trained: B != 0 changes the outputs
    return clf


FT_CONFIG = {"lora_r": 2, "lora_alpha": 4.0, "lora_targets": ["attn.c_attn", "attn.c_proj"]}


def test_roundtrip_merges_lora_and_keeps_probabilities(tmp_path):
    clf = with_trained_lora(tiny_classifier())
    texts = ["good day", "bad", "a longer text"]
    want = softmax_of(clf, texts)
    C.save_classifier(str(tmp_path / "classifier.npz"), clf, LABELS, META, FT_CONFIG)
    clf2, labels, meta, max_len = C.load_classifier(str(tmp_path))             # the directory works
    assert labels == LABELS and meta == META and max_len == 16
    assert not any("lora" in name for name, _ in clf2.named_parameters())    # plain Linear layers
    probs, counts = C.classify_texts(clf2, CharTokenizer(CHARS), texts, max_len)
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert counts == [len(t) for t in texts] and probs.dtype == np.float64
    assert any(n.endswith("lora_A") for n, _ in clf.named_parameters())       # saving left clf alone


def test_unmerged_lora_checkpoint_still_loads(tmp_path):
    # classifier.npz as finetune-classify wrote it before adapters were merged at save time
    clf = with_trained_lora(tiny_classifier())
    save_checkpoint(str(tmp_path / "classifier.npz"), {
        "model": clf.state_dict(), "model_config": clf.gpt.config.to_dict(), "labels": LABELS, "meta": META,
        "finetune_config": FT_CONFIG, "accuracy": 0.5})
    clf2, labels, _, max_len = C.load_classifier(str(tmp_path / "classifier.npz"))
    probs, _ = C.classify_texts(clf2, CharTokenizer(CHARS), ["hello there"], max_len)
    np.testing.assert_allclose(probs, softmax_of(clf, ["hello there"]), atol=1e-5)


def test_long_texts_are_cut_like_training(tmp_path):
    clf = tiny_classifier(block_size=8)
    tok = CharTokenizer(CHARS)
    text = "this text is longer than eight"
    probs, counts = C.classify_texts(clf, tok, [text], 8)
    assert counts == [len(text)]
    np.testing.assert_allclose(probs, softmax_of(clf, [text[:8]]), atol=1e-6)
    seqs, _ = C.encode_examples([{"text": text, "label": "pos"}], tok.encode, LABELS, 8)
    assert seqs[0] == tok.encode(text[:8])                                     # what training fed the model


@pytest.fixture
def saved(tmp_path):
    clf = tiny_classifier()
    out = tmp_path / "clf"
    C.save_classifier(str(out / "classifier.npz"), clf, LABELS, META)
    return clf, out


def test_cli_prints_label_then_sorted_probabilities(saved, capsys):
    clf, out = saved
    texts = ["good day", "bad day!"]
    assert main(["classify", "--out_dir", str(out), "--text", texts[0], "--text", texts[1]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    want = softmax_of(clf, texts)
    assert len(lines) == 2
    for line, p in zip(lines, want):
        label, *pairs = line.split()
        assert label == LABELS[int(p.argmax())]
        values = [float(pair.split(":")[1]) for pair in pairs]
        assert [pair.split(":")[0] for pair in pairs][0] == label and values == sorted(values, reverse=True)
        assert sorted(values) == pytest.approx(sorted(p), abs=1e-4)


def test_cli_file_json_and_truncation_note(saved, tmp_path, capsys):
    clf, out = saved
    texts = ["good day", "no", "x" * 40]                                      # the last exceeds block_size 16
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    assert main(["classify", "--out_dir", str(out), "--file", str(tmp_path / "in.txt"), "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [r["text"] for r in rows] == texts
    assert [r["truncated"] for r in rows] == [False, False, True] and rows[2]["tokens"] == 40
    want = softmax_of(clf, [t[:16] for t in texts])
    for r, p in zip(rows, want):
        assert [r["probs"][l] for l in LABELS] == pytest.approx(list(p), abs=1e-6)
        assert r["label"] == LABELS[int(p.argmax())]
    assert "text 3 is 40 tokens; classified on its first 16" in captured.err


def test_cli_finetune_classify_then_classify(tmp_path, capsys):
    rows = [{"text": f"{w} is {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
            for i, w in enumerate(["cake", "rain", "sun", "mud", "tea", "fog"] * 2)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rc = main(["finetune-classify", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--max_iters", "2",
               "--batch_size", "4", "--block_size", "16", "--data", str(tmp_path / "d.jsonl"), "--lora_r", "2",
               "--out_dir", str(tmp_path / "o")])
    assert rc == 0 and "npgpt classify --out_dir" in capsys.readouterr().out
    assert main(["classify", "--out_dir", str(tmp_path / "o"), "--text", "tea is good", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["probs"]) == {"neg", "pos"} and sum(r["probs"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("case,msg", [
    ("missing", "no classifier at"),
    ("language_model", "not a classifier"),
    ("unknown_chars", "text 2 has characters the classifier cannot read: 'Z'"),
    ("empty_line", "line 2 is empty"),
    ("missing_file", "not found"),
])
def test_cli_errors_are_one_clear_line(saved, tmp_path, capsys, case, msg):
    clf, out = saved
    argv = ["classify", "--out_dir", str(out), "--text", "fine"]
    if case == "missing":
        argv[2] = str(tmp_path / "nowhere")
    elif case == "language_model":
        lm = tmp_path / "lm"
        save_checkpoint(str(lm / "ckpt.npz"), {"model": clf.gpt.state_dict(), "model_config": clf.gpt.config.to_dict(),
                                               "meta": META})
        argv[2] = str(lm / "ckpt.npz")
    elif case == "unknown_chars":
        argv += ["--text", "Zebra"]
    elif case == "empty_line":
        (tmp_path / "in.txt").write_text("one\n\nthree\n")
        argv = argv[:3] + ["--file", str(tmp_path / "in.txt")]
    elif case == "missing_file":
        argv = argv[:3] + ["--file", str(tmp_path / "none.txt")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and err.startswith("npgpt classify: error:")


def test_load_classifier_refuses_a_language_model(tmp_path):
    clf = tiny_classifier()
    save_checkpoint(str(tmp_path / "ckpt.npz"), {"model": clf.gpt.state_dict(),
                                                 "model_config": clf.gpt.config.to_dict(), "meta": META})
    with pytest.raises(CheckpointError, match="finetune-classify --out_dir"):
        C.load_classifier(str(tmp_path / "ckpt.npz"))
