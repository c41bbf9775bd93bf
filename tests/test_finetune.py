"""Fine-tuning: loss masking, padding, the class head, freezing, data splits and the two CLIs."""
import json
import os

import numpy as np
import pytest

from npgpt import backend
from npgpt import functional as F
from npgpt.cli import main
from npgpt.engine import Tensor
from npgpt.finetune import base as B
from npgpt.finetune import classify as C
from npgpt.finetune import datasets as D
from npgpt.finetune import instruct as I
from npgpt.model import GPT, GPTConfig
from npgpt.optim import AdamW
from npgpt.tokenizer import CharTokenizer

ALPHABET = sorted(set(I.PROMPT_WITH_INPUT + I.PROMPT_NO_INPUT + "abcdefghijklmnopqrstuvwxyz"
                      "ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'-\n"))
TOK = CharTokenizer(ALPHABET)


def tiny_gpt(block_size=320, seed=0, **kw):
    backend.seed(seed)
    cfg = dict(vocab_size=TOK.n_vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


EX = {"instruction": "Reverse these words.", "input": "to be or not", "output": "not or be to"}


# ---- instruction data: masking, padding, collate --------------------------------------------------

def test_prompt_targets_are_masked_and_response_targets_kept():
    x, y = I.encode_instruction(EX, TOK)
    p = TOK.encode(I.format_prompt(EX))
    r = TOK.encode(EX["output"] + I.CHAR_END)
    assert len(x) == len(y) == len(p) + len(r) - 1
    assert y[:len(p) - 1] == [-100] * (len(p) - 1) and y[len(p) - 1:] == r
    assert x == (p + r)[:-1]
    tail = "### Instruction:\nReverse these words.\n\n### Input:\nto be or not\n\n### Response:\n"
    assert I.format_prompt(EX).endswith(tail)
    assert "### Input" not in I.format_prompt({**EX, "input": ""})


def test_loss_ignores_prompt_tokens():
    """Changing prompt characters (same length) changes only masked targets: with the same logits the
    loss and its gradient are identical; the model's gradient is zero on every prompt position."""
    other = {**EX, "instruction": "Reverse those wordz."}
    (_, y1), (_, y2) = I.encode_instruction(EX, TOK), I.encode_instruction(other, TOK)
    assert y1 == y2   # every target that differs is inside the prompt, hence -100 in both
    logits = np.random.default_rng(0).normal(size=(1, len(y1), TOK.n_vocab)).astype(np.float32)
    grads = []
    for y in (y1, y2):
        t = Tensor(logits, requires_grad=True)
        loss = F.cross_entropy(t, np.array([y]))
        loss.backward()
        grads.append((float(loss.item()), t.grad))
    assert grads[0][0] == grads[1][0]
    np.testing.assert_array_equal(grads[0][1], grads[1][1])
    model = tiny_gpt()
    x, y = I.collate([I.encode_instruction(EX, TOK)])
    logits, loss = model(x, y)
    logits.retain_grad()
    loss.backward()
    n_prompt = len(TOK.encode(I.format_prompt(EX))) - 1
    assert np.all(logits.grad[:, :n_prompt] == 0) and np.abs(logits.grad[:, n_prompt:]).sum() > 0
    # the loss is the mean NLL of the response tokens alone
    L = logits.data[0].astype(np.float64)
    logp = L - L.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ys = np.array(y[0])
    want = -np.mean([logp[i, ys[i]] for i in range(len(ys)) if ys[i] != -100])
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5)


def test_padding_does_not_change_the_loss():
    model = tiny_gpt()
    pair = I.encode_instruction(EX, TOK)
    longer = I.encode_instruction({**EX, "output": EX["output"] + " and more words here"}, TOK)
    x1, y1 = I.collate([pair])
    x2, y2 = I.collate([pair, longer])
    assert x2.shape[1] > x1.shape[1]
    pad = x2.shape[1] - x1.shape[1]
    assert np.all(y2[0, -pad:] == -100) and np.all(x2[0, -pad:] == 0)
    _, l1 = model(x1, y1)
    _, l2 = model(x2[:1], y2[:1])      # the same example padded to the longer length
    np.testing.assert_allclose(l1.item(), l2.item(), rtol=1e-6)
    x3 = x2[:1].copy()
    x3[0, -pad:] = 5                    # whatever the pad ids are
    np.testing.assert_allclose(model(x3, y2[:1])[1].item(), l1.item(), rtol=1e-6)


def test_collate_shapes():
    pairs = [I.encode_instruction({**EX, "output": "x" * k}, TOK) for k in (1, 7, 3)]
    X, Y = I.collate(pairs, pad_id=2)
    T = max(len(x) for x, _ in pairs)
    assert X.shape == Y.shape == (3, T) and X.dtype == Y.dtype == np.int64
    for i, (x, y) in enumerate(pairs):
        assert list(X[i, :len(x)]) == x and np.all(X[i, len(x):] == 2) and np.all(Y[i, len(y):] == -100)
    ids, lengths = D.pad_batch([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and lengths.tolist() == [3, 1]
    with pytest.raises(ValueError, match="empty"):
        D.pad_batch([[1], []])


def test_end_marker_uses_eot_when_the_tokenizer_has_one():
    class WithEot(CharTokenizer):
        eot_token = 3
    assert I.end_ids(WithEot(ALPHABET)) == [3]
    assert I.end_ids(TOK) == TOK.encode("\n\n")


# ---- classification ---------------------------------------------------------------------------------

def test_hidden_states_feed_the_lm_head():
    model = tiny_gpt(block_size=16)
    idx = np.random.default_rng(0).integers(0, TOK.n_vocab, (2, 9))
    h = C.hidden_states(model, idx)
    assert h.shape == (2, 9, 16)
    np.testing.assert_allclose(h.data @ model.transformer.wte.weight.data.T, model(idx)[0].data, atol=1e-5)


def test_class_head_reads_the_last_real_token():
    clf = C.GPTClassifier(tiny_gpt(block_size=32), 3).eval()
    seqs = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    ids, lengths = D.pad_batch(seqs)
    z = clf(ids, lengths).data
    other = ids.copy()
    other[1, 2:] = 17                   # different pad content
    np.testing.assert_allclose(clf(other, lengths).data, z, atol=1e-6)
    wider = np.concatenate([ids, np.full((3, 5), 4)], axis=1)   # five more pad columns
    np.testing.assert_allclose(clf(wider, lengths).data, z, atol=1e-6)
    alone = clf(np.array([seqs[1]]), np.array([2])).data
    np.testing.assert_allclose(alone[0], z[1], atol=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        clf(ids, np.array([0, 2, 3]))


def test_freeze_leaves_frozen_parameters_untouched():
    clf = C.GPTClassifier(tiny_gpt(block_size=32), 2)
    n = C.freeze_blocks(clf, 1)
    frozen = {k: p.data.copy() for k, p in clf.named_parameters() if not p.requires_grad}
    assert any(k.startswith("gpt.transformer.h.0.") for k in frozen)
    assert not any(k.startswith(("gpt.transformer.h.1.", "gpt.transformer.ln_f.", "head.")) for k in frozen)
    assert n == sum(p.size for p in clf.parameters() if p.requires_grad)
    params = [p for p in clf.parameters() if p.requires_grad]
    before = [p.data.copy() for p in params]
    opt = AdamW(params, lr=1e-2)
    ids, lengths = D.pad_batch([[1, 2, 3], [4, 5]])
    loss = F.cross_entropy(clf(ids, lengths), np.array([0, 1]))
    loss.backward()
    for k, p in clf.named_parameters():
        assert (p.grad is None) == (k in frozen), k
    opt.step()
    for k, p in clf.named_parameters():
        if k in frozen:
            np.testing.assert_array_equal(p.data, frozen[k])
    assert all(not np.array_equal(p.data, b) for p, b in zip(params, before))


def test_classifier_learns_a_toy_task():
    r = np.random.default_rng(0)
    seqs = [list(r.integers(1, 20, r.integers(3, 12))) for _ in range(40)]
    y = np.array([int(s[-1] >= 10) for s in seqs])
    clf = C.GPTClassifier(tiny_gpt(block_size=16), 2)
    stats = C.train_classifier(clf, seqs, y, C.ClassifyConfig(max_iters=60, batch_size=8, learning_rate=1e-2),
                               log=None)
    ev = C.evaluate_classifier(clf, seqs, y, 2)
    assert stats["losses"][-1] < stats["losses"][0] and ev["accuracy"] >= 0.8
    assert ev["confusion"].sum() == 40 and ev["confusion"].trace() == round(ev["accuracy"] * 40)
    assert C.majority_baseline(np.array([0, 0, 1]), np.array([0, 1, 1, 1])) == 0.25


def test_finetuning_builds_and_steps_the_pretraining_optimizer_also_in_float16():
    """Fine-tuning's optimizer is pretraining's (flat AdamW, weight decay on matrices only, clipping in
    the step); with dtype="float16" the classifier computes in fp16 over float32 master weights."""
    from npgpt.optim import FlatAdamW
    cfg = C.ClassifyConfig(max_iters=60, batch_size=8, learning_rate=1e-2, weight_decay=0.1, dtype="float16")
    opt = B.finetune_optimizer(list(C.GPTClassifier(tiny_gpt(block_size=16), 2).parameters()), cfg)
    assert isinstance(opt, FlatAdamW) and opt.mixed and opt.max_grad_norm == cfg.grad_clip
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])
    assert all(p.ndim < 2 for p in opt.param_groups[1]["params"])
    r = np.random.default_rng(0)
    seqs = [list(r.integers(1, 20, r.integers(3, 12))) for _ in range(40)]
    y = np.array([int(s[-1] >= 10) for s in seqs])
    clf = C.GPTClassifier(tiny_gpt(block_size=16), 2)
    stats = C.train_classifier(clf, seqs, y, cfg, log=None)
    assert clf.head.weight.dtype == np.float16 and np.isfinite(stats["losses"]).all()
    assert np.mean(stats["losses"][-10:]) < np.mean(stats["losses"][:10])
    with pytest.raises(ValueError, match="dtype"):
        C.ClassifyConfig(dtype="bfloat16")


# ---- datasets ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def works():
    return D.load_works()


def test_split_by_work_is_disjoint_and_stratified(works):
    train, test = D.split_works(works, 0.2, seed=0)
    assert not set(train) & set(test) and len(train) + len(test) == len(works) == 42
    genre = {w["work"]: w["genre"] for w in works}
    assert {genre[t] for t in test} == {"comedy", "tragedy", "history", "poem"}
    assert D.split_works(works, 0.2, seed=0) == (train, test)
    examples = D.genre_passages(works, list, 100, 250, per_work=3)
    tr, te = D.classification_split(examples, "work", works=works)
    assert not {e["work"] for e in tr} & {e["work"] for e in te}
    assert all(100 <= len(e["text"]) <= 250 for e in examples)
    tr, te = D.classification_split(examples, "passage", test_frac=0.25)
    assert len(te) == round(0.25 * len(examples)) and {e["work"] for e in tr} & {e["work"] for e in te}


def test_instruction_set_is_deterministic_and_correct(works):
    a = D.instruction_examples(works, 4, seed=1)
    assert a == D.instruction_examples(works, 4, seed=1)
    assert {e["task"] for e in a} == {"work", "genre", "speaker", "continue", "reverse"}
    titles = {w["title"] for w in works}
    for e in a:
        if e["task"] == "reverse":
            assert e["output"].split() == e["input"].split()[::-1]
        if e["task"] == "work":
            assert e["output"] in titles
        assert "\n" not in e["output"]
    tr, te = D.split_examples(a, 0.25)
    assert len(te) == 5 and len(tr) == 15


def test_load_labeled_files(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\n"hello, there",pos\nbad day,neg\n')
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert [(e["text"], e["label"]) for e in D.load_labeled(str(tmp_path / "d.csv"))] == \
        [("hello, there", "pos"), ("bad day", "neg")]
    assert [e["label"] for e in D.load_labeled(str(tmp_path / "d.jsonl"))] == ["1", "0"]
    (tmp_path / "bad.jsonl").write_text('{"txt": "a", "label": 1}\n')
    with pytest.raises(ValueError, match="lacks 'text'"):
        D.load_labeled(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError):
        D.load_labeled(str(tmp_path / "none.csv"))


def test_extend_char_vocab_keeps_old_predictions():
    old = sorted(set("abc de"))
    backend.seed(0)
    model = GPT(GPTConfig(vocab_size=len(old), block_size=8, n_layer=1, n_head=2, n_embd=8)).eval()
    text = "bad cab"
    before = model(np.array([[old.index(c) for c in text]]))[0].data
    meta = B.extend_char_vocab(model, {"tokenizer": "char", "chars": old, "vocab_size": len(old)}, "#x" + text)
    new = meta["chars"]
    assert new == sorted(set(old) | {"#", "x"}) and model.config.vocab_size == len(new)
    after = model(np.array([[new.index(c) for c in text]]))[0].data
    np.testing.assert_allclose(after[..., [new.index(c) for c in old]], before, atol=1e-6)


# ---- command line -----------------------------------------------------------------------------------

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--max_iters", "3", "--batch_size", "4"]


def test_cli_classify_bundled_and_user_data(tmp_path, capsys):
    rc = main(["finetune-classify", *TINY, "--block_size", "64", "--min_tokens", "30", "--max_tokens", "60",
               "--per_work", "2", "--split", "passage", "--lora_r", "2", "--out_dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "test accuracy" in out and "majority-class baseline" in out and "true \\ predicted" in out
    assert os.path.exists(tmp_path / "o" / "classifier.npz") and os.path.exists(tmp_path / "o" / "adapter.npz")
    rows = [{"text": f"{w} is {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
            for i, w in enumerate(["cake", "rain", "sun", "mud", "tea", "fog"] * 3)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rc = main(["finetune-classify", *TINY, "--block_size", "32", "--data", str(tmp_path / "d.jsonl"),
               "--trainable_blocks", "0"])
    assert rc == 0 and "2 classes ['neg', 'pos']" in capsys.readouterr().out


def test_cli_from_a_pretrained_checkpoint(tmp_path, capsys):
    from npgpt.train import TrainConfig, train
    d = tmp_path / "data"
    d.mkdir()
    text = "".join(w["text"][2000:6000] for w in D.load_works()[:3])
    chars = sorted(set(text))
    np.array([chars.index(c) for c in text], dtype=np.uint16).tofile(d / "train.bin")
    np.array([chars.index(c) for c in text[:500]], dtype=np.uint16).tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": len(chars), "chars": chars,
                                             "dtype": "uint16"}))
    train(TrainConfig(data=str(d), out_dir=str(tmp_path / "pre"), n_layer=1, n_head=2, n_embd=16, block_size=32,
                      batch_size=2, max_iters=2, eval_interval=2, eval_iters=1, progress=False, pos="sinusoidal"),
          log=lambda *_: None)
    rc = main(["finetune-instruct", *TINY, "--init_from", str(tmp_path / "pre"), "--n_per_task", "3",
               "--test_frac", "0.34", "--max_eval", "2", "--max_new_tokens", "4", "--block_size", "360",
               "--out_dir", str(tmp_path / "ft")])
    out = capsys.readouterr().out
    assert rc == 0 and "exact match" in out and "loglik/token" in out and " n=" in out
    assert os.path.exists(tmp_path / "ft" / "ckpt.npz")
    rc = main(["finetune-classify", *TINY, "--init_from", str(tmp_path / "pre"), "--min_tokens", "20",
               "--max_tokens", "32", "--per_work", "1"])
    assert rc == 0 and "test accuracy" in capsys.readouterr().out


def test_cli_bad_arguments_give_one_clear_error(tmp_path, capsys):
    assert main(["finetune-classify", "--init_from", str(tmp_path / "nowhere")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["finetune-classify", "--max_iters", "-1"]) == 2
    assert "--max_iters must be positive" in capsys.readouterr().err
    assert main(["finetune-classify", "--data", str(tmp_path / "none.csv")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["finetune-instruct", "--data", str(tmp_path / "none.json")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["finetune-instruct", "--test_frac", "1.5"]) == 2
    assert "--test_frac" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["finetune-classify", "--split", "sideways"])
    assert e.value.code == 2
    assert main(["finetune-instruct", *TINY, "--n_per_task", "2", "--block_size", "50"]) == 2
    assert "raise --block_size" in capsys.readouterr().err
