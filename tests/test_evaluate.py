"""Evaluation: strided perplexity (known answers, window coverage), bits per byte, multiple choice, ``npgpt eval``."""
import json
import math
import types

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, backend
from npgpt import evaluate as ev
from npgpt.checkpoint import save_checkpoint
from npgpt.cli import main
from npgpt.tokenizer import CharTokenizer

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n" * 3
CHARS = sorted(set(TEXT + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!?;:.,\"'"))


def char_model(block_size=16, seed=0, **kw):
    backend.use("numpy")
    backend.seed(seed)
    cfg = dict(vocab_size=len(CHARS), block_size=block_size, n_layer=2, n_head=2, n_embd=16, **kw)
    return GPT(GPTConfig(**cfg)).eval()


def full_context_nll(model, ids):
    """Sum of -log p(t_i | t_0..t_{i-1}) for i >= 1 in one forward pass (text fits one window)."""
    logits = model(np.asarray(ids[:-1])[None])[0].data[0].astype(np.float64)   # (T, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -float(logp[np.arange(len(ids) - 1), ids[1:]].sum())


@pytest.mark.parametrize("n,bs,stride", [(2, 4, 2), (10, 4, 2), (10, 4, 4), (10, 4, 1), (9, 4, 3), (5, 8, 4),
                                         (100, 16, 7), (17, 16, 8)])
def test_every_prediction_scored_exactly_once(n, bs, stride):
    counts = np.zeros(n, int)
    for b, e, n_new in ev.strided_windows(n, bs, stride):
        assert 0 < e - b <= bs and 0 < n_new <= e - b
        counts[e - n_new + 1:e + 1] += 1               # targets ids[b+1:e+1], the last n_new scored
        # every scored target sees at least bs - stride tokens of context, or all of them
        first_scored = e - n_new + 1
        assert first_scored - b >= min(bs - stride + 1, first_scored)
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="stride"):
        ev.strided_windows(10, 4, 5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ev.strided_windows(1, 4, 2)


def test_uniform_logits_give_perplexity_vocab_size():
    # wte = 0 makes every logit x . wte_v = 0, so p = 1/V everywhere: loss ln V, perplexity V
    m = char_model()
    for p in m.parameters():
        p.data[...] = 0
    ids = CharTokenizer(CHARS).encode(TEXT)
    r = ev.perplexity(m, ids, stride=5)
    V = len(CHARS)
    assert r["tokens"] == len(ids) - 1
    assert r["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert r["ppl"] == pytest.approx(V, rel=1e-5)


def test_strided_equals_full_context_when_the_text_fits():
    m = char_model(block_size=64)
    ids = CharTokenizer(CHARS).encode(TEXT[:60])
    want = full_context_nll(m, ids)
    for stride in (1, 7, 32, 64):
        r = ev.perplexity(m, ids, stride=stride)
        assert r["tokens"] == 59
        assert r["nll"] == pytest.approx(want, rel=1e-5)


def test_batched_windows_equal_one_at_a_time():
    m = char_model()
    ids = CharTokenizer(CHARS).encode(TEXT)
    one = ev.perplexity(m, ids, stride=5, batch_size=1)
    many = ev.perplexity(m, ids, stride=5, batch_size=8)
    assert one["tokens"] == many["tokens"] == len(ids) - 1
    assert many["nll"] == pytest.approx(one["nll"], rel=1e-5)


def test_stride_equal_block_size_is_disjoint_windows():
    m = char_model(block_size=8)
    ids = CharTokenizer(CHARS).encode(TEXT[:41])      # 40 predictions = 5 windows of 8
    want = sum(full_context_nll(m, ids[i:i + 9]) for i in range(0, 40, 8))
    r = ev.perplexity(m, ids, stride=8)
    assert r["windows"] == 5 and r["nll"] == pytest.approx(want, rel=1e-5)


def test_bits_per_byte_known_case():
    # a uniform model over 256 byte values spends ln 256 nats = 8 bits per byte
    assert ev.bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0)
    assert ev.bits_per_byte(math.log(2), 1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ev.bits_per_byte(1.0, 0)


def test_evaluate_text_counts_bytes_of_the_scored_tokens():
    m = char_model(block_size=64)
    for p in m.parameters():
        p.data[...] = 0
    tok = CharTokenizer(CHARS)
    r = ev.evaluate_text(m, tok, TEXT[:50])
    assert r["bytes"] == 49 and r["tokens"] == 49     # ASCII: one byte per character, the first unscored
    assert r["bpb"] == pytest.approx(math.log2(len(CHARS)), rel=1e-6)


def direct_choice_logprob(model, tok, context, choice):
    ctx, cont = tok.encode(context), tok.encode(choice)
    return full_context_nll(model, ctx + cont) * -1 - (full_context_nll(model, ctx) * -1 if len(ctx) > 1 else 0.0)


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_multiple_choice_picks_highest_likelihood(normalize):
    m = char_model(block_size=64, seed=3)
    tok = CharTokenizer(CHARS)
    items = [{"context": "To be, or not to ", "choices": ["be", "question", "xq", "b"], "label": 0},
             {"context": "whether 'tis ", "choices": ["nobler", "nob", "zzzzzz"], "label": 0}]
    r = ev.multiple_choice(m, tok, items, normalize)
    for item, pred, scores in zip(items, r["predictions"], r["scores"]):
        direct = [direct_choice_logprob(m, tok, item["context"], c) for c in item["choices"]]
        if normalize == "mean":
            direct = [d / len(c) for d, c in zip(direct, item["choices"])]
        np.testing.assert_allclose(scores, direct, rtol=1e-5)
        assert pred == int(np.argmax(direct))
    assert r["accuracy"] == np.mean([p == it["label"] for p, it in zip(r["predictions"], items)])


def test_multiple_choice_crops_long_contexts_to_the_window():
    m = char_model(block_size=16)
    tok = CharTokenizer(CHARS)
    ctx = TEXT[:40]
    got = ev.score_choices(m, tok, ctx, ["be", "xyz"])
    for (ll, n), ch in zip(got, ["be", "xyz"]):
        seq = tok.encode(ctx + ch)[-17:]                # the last 16 inputs predict the choice
        assert n == len(ch)
        want = -full_context_nll(m, seq) + full_context_nll(m, seq[:-len(ch)])
        assert ll == pytest.approx(want, rel=1e-5)


def test_bundled_task_is_well_formed():
    items = ev.load_mc(ev.MC_EXAMPLE)
    assert len(items) >= 20
    assert len({it["label"] for it in items}) > 1      # the right answer is not always in one slot


def test_load_mc_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b"], "label": 0}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        ev.load_mc(str(bad))
    with pytest.raises(ValueError, match="not found"):
        ev.load_mc(str(tmp_path / "nope.jsonl"))


@pytest.fixture
def ckpt_dir(tmp_path):
    m = char_model(block_size=32)
    out = tmp_path / "out"
    save_checkpoint(str(out / "ckpt.npz"), {"model": m.state_dict(), "model_config": m.config.to_dict(),
                                            "meta": {"tokenizer": "char", "chars": CHARS, "vocab_size": len(CHARS)}})
    (tmp_path / "text.txt").write_text(TEXT)
    return tmp_path


def test_cli_eval_text_and_mc(ckpt_dir, capsys):
    rc = main(["eval", "--out_dir", str(ckpt_dir / "out"), "--text", str(ckpt_dir / "text.txt"),
               "--mc", "example", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["text"]["tokens"] == len(TEXT) - 1 and res["text"]["stride"] == 16
    assert 0 <= res["mc"]["accuracy"] <= 1 and res["mc"]["n"] == len(ev.load_mc(ev.MC_EXAMPLE))
    rc = main(["eval", "--out_dir", str(ckpt_dir / "out"), "--text", str(ckpt_dir / "text.txt"), "--stride", "32",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "perplexity" in out and "bits per byte" in out and "tokens/s" in out


@pytest.mark.parametrize("argv,msg", [
    ([], "nothing to evaluate"),
    (["--text", "missing.txt"], "not found"),
    (["--text", "{text}", "--stride", "0"], "--stride"),
    (["--text", "{text}", "--stride", "999"], "block_size"),
    (["--mc", "missing.jsonl"], "not found"),
    (["--text", "{text}", "--mc-normalize", "max"], "invalid choice"),
])
def test_cli_eval_bad_arguments(ckpt_dir, capsys, argv, msg):
    argv = [a.replace("{text}", str(ckpt_dir / "text.txt")) for a in argv]
    try:
        rc = main(["eval", "--out_dir", str(ckpt_dir / "out")] + argv)
    except SystemExit as e:             # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc != 0 and msg in err and "Traceback" not in err


def test_cli_eval_missing_checkpoint(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    rc = main(["eval", "--out_dir", str(tmp_path / "none"), "--text", str(tmp_path / "t.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and "no checkpoint" in err
    rc = main(["eval", "--hf", str(tmp_path / "none"), "--text", str(tmp_path / "t.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a directory" in err


# ---- HellaSwag format: acc and acc_norm -------------------------------------------------------------

def hand_ending_logprobs(model, tok, ctx, ending):
    """Log-probabilities of the ending's tokens, from the model's logits and a float64 NumPy
    log-softmax: the ending follows the context after one space, as HellaSwag is scored."""
    ids = tok.encode(ctx + " " + ending)
    n = len(" " + ending)                                        # char tokens of the ending
    logits = model(np.asarray(ids[:-1])[None])[0].data[0].astype(np.float64)     # (T, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    rows = np.arange(len(ids) - n - 1, len(ids) - 1)            # the positions that predict the ending
    return logp[rows, np.asarray(ids)[rows + 1]]


def test_hellaswag_scores_match_a_hand_computation(tmp_path):
    m = char_model(block_size=64, seed=5)
    tok = CharTokenizer(CHARS)
    rows = [{"ctx": "A man sits on a roof. he", "endings": ["is fixing it.", "sings", "eats a very big cake."],
             "label": 0},
            {"ctx_a": "She opens the door.", "ctx_b": "then she", "endings": ["walks in.", "flies."], "label": "1"}]
    path = tmp_path / "hs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = ev.load_mc(str(path))
    assert items[1]["context"] == "She opens the door. Then she"                # ctx_a + " " + ctx_b.capitalize()
    r = ev.multiple_choice(m, tok, items)
    for item, row, loglik, n_tokens, p_sum, p_norm in zip(items, rows, r["loglik"], r["n_tokens"],
                                                          r["predictions_sum"], r["predictions_norm"]):
        hand = [hand_ending_logprobs(m, tok, item["context"], e) for e in row["endings"]]
        np.testing.assert_allclose(loglik, [h.sum() for h in hand], rtol=1e-5)
        assert n_tokens == [len(h) for h in hand] == [len(e) + 1 for e in row["endings"]]
        assert p_sum == int(np.argmax([h.sum() for h in hand]))
        assert p_norm == int(np.argmax([h.mean() for h in hand]))
    assert r["acc"] == np.mean([p == it["label"] for p, it in zip(r["predictions_sum"], items)])
    assert r["acc_norm"] == np.mean([p == it["label"] for p, it in zip(r["predictions_norm"], items)])


class BigramModel:
    """A stand-in language model with known probabilities: logits[b, t] = log P[x[b, t]], row by row
    a next-character distribution, so every score below is a hand computation."""

    def __init__(self, probs, block_size=64):
        self.logits = np.log(probs).astype(np.float32)                    # (V, V)
        self.config = GPTConfig(vocab_size=len(probs), block_size=block_size)
        self.training = False

    def eval(self):
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def __call__(self, x):
        return types.SimpleNamespace(data=self.logits[np.asarray(x)]), None    # (B, T, V)


def test_acc_and_acc_norm_differ_when_lengths_differ():
    # after the context "x": p(" ") = 0.9; after " ": p("a") = 0.5, p("b") = 0.2; after "a": p("a") = 0.5
    tok = CharTokenizer(CHARS)
    V = len(CHARS)
    P = np.full((V, V), 1.0 / V)
    for cur, nxt in [("x", {" ": 0.9}), (" ", {"a": 0.5, "b": 0.2}), ("a", {"a": 0.5})]:
        row = np.full(V, (1 - sum(nxt.values())) / (V - len(nxt)))
        for ch, p in nxt.items():
            row[CHARS.index(ch)] = p
        P[CHARS.index(cur)] = row
    items = [ev.hellaswag_item({"ctx": "x", "endings": ["b", "a" * 8], "label": 1})]
    r = ev.multiple_choice(BigramModel(P), tok, items)
    short, long = math.log(0.9) + math.log(0.2), math.log(0.9) + 8 * math.log(0.5)
    np.testing.assert_allclose(r["loglik"][0], [short, long], rtol=1e-6)
    assert r["n_tokens"] == [[2, 9]]
    assert short > long and short / 2 < long / 9              # the sum prefers "b", the mean "aaaaaaaa"
    assert r["predictions_sum"] == [0] and r["predictions_norm"] == [1]
    assert (r["acc"], r["acc_norm"]) == (0.0, 1.0)
    assert ev.multiple_choice(BigramModel(P), tok, items, "mean")["accuracy"] == 1.0


def test_format_detection_row_by_row(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"context": "To be", "choices": [", or", "x"], "label": 0}) + "\n\n" +
                    json.dumps({"ctx": "To be, or", "endings": ["not", "yes"], "label": 0, "ind": 7}) + "\n" +
                    json.dumps({"ctx_a": "To be.", "ctx_b": "", "endings": ["Or", "And"], "label": 1}) + "\n")
    a, b, c = ev.load_mc(str(path))
    assert a == {"context": "To be", "choices": [", or", "x"], "label": 0, "format": "choices"}
    assert b == {"context": "To be, or", "choices": [" not", " yes"], "label": 0, "format": "hellaswag"}
    assert c["context"] == "To be." and c["label"] == 1                      # empty ctx_b: ctx_a alone
    assert ev.resolve_mc("hellaswag_sample") == ev.HELLASWAG_SAMPLE and ev.resolve_mc("x.jsonl") == "x.jsonl"


@pytest.mark.parametrize("row,msg", [
    ({"ctx": "a", "endings": ["b", "c"], "label": 2}, "label must be an index"),
    ({"ctx": "a", "endings": ["b", "c"], "label": ""}, "unlabeled"),
    ({"ctx": "a", "endings": ["b", "c"]}, "no label"),
    ({"ctx": "a", "endings": ["b"], "label": 0}, "at least 2"),
    ({"ctx": "a", "endings": "b c", "label": 0}, "at least 2"),
    ({"ctx": "a", "endings": ["b", ""], "label": 0}, "non-empty"),
    ({"endings": ["b", "c"], "label": 0}, '"ctx"'),
    ({"ctx": "", "endings": ["b", "c"], "label": 0}, '"ctx"'),
    ({"ctx": "a", "endings": ["b", "c"], "label": True}, "label must be"),
    ({"question": "a", "answers": ["b", "c"], "label": 0}, "HellaSwag"),
    (["a", "b"], "JSON object"),
])
def test_malformed_rows_name_file_line_and_problem(tmp_path, row, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"ctx": "ok", "endings": ["x", "y"], "label": 0}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2") as e:
        ev.load_mc(str(path))
    assert msg in str(e.value)


def test_bundled_hellaswag_sample():
    items = ev.load_mc("hellaswag_sample")
    rows = [json.loads(line) for line in open(ev.HELLASWAG_SAMPLE, encoding="utf-8")]
    assert 8 <= len(items) == len(rows) and all(it["format"] == "hellaswag" for it in items)
    assert {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label"} <= set(rows[0])
    assert all(r["ctx"] == r["ctx_a"] + " " + r["ctx_b"] for r in rows)     # as in the original files
    assert len({it["label"] for it in items}) == 4                         # every slot holds some answers
    tok = CharTokenizer(CHARS)                                              # a char model can read it
    for it in items:
        tok.encode(it["context"] + "".join(it["choices"]))


def test_cli_eval_hellaswag_sample(ckpt_dir, capsys):
    rc = main(["eval", "--out_dir", str(ckpt_dir / "out"), "--mc", "hellaswag_sample", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mc"]
    assert res["n"] == 10 and res["accuracy"] == res["acc"]
    assert res["acc"] == res["correct_sum"] / 10 and res["acc_norm"] == res["correct_norm"] / 10
    rc = main(["eval", "--out_dir", str(ckpt_dir / "out"), "--mc", "hellaswag_sample", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "10 items, acc " in out and "acc_norm" in out
