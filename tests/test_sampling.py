"""Sampling knobs (top-k 0 / top-p 1 = off, the repetition penalty, validation), text streamed as it is
made (UTF-8 characters split across tokens), ``npgpt sample --stream`` and ``npgpt chat``."""
import io
import math
import os

import numpy as np
import pytest

from npgpt import backend, sampling
from npgpt.backend import to_numpy
from npgpt.checkpoint import save_checkpoint
from npgpt.cli import main
from npgpt.finetune import instruct as I
from npgpt.model import GPT, GPTConfig
from npgpt.sampling import (TextStream, apply_repetition_penalty, check_sampling, sample_from_logits, seen_mask,
                            stream_text)
from npgpt.tokenizer import CharTokenizer, get_encoding

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
SPLIT = "日本語 🤗 naïve"          # GPT-2 cuts 日, 本 and 🤗 inside their UTF-8 bytes


def tiny(**kw):
    return GPT(GPTConfig(**{**TINY, **kw})).eval()


# ---- the knobs --------------------------------------------------------------------------------------

def test_repetition_penalty_by_hand(xp):
    """CTRL: a seen token's logit is divided by p when positive, multiplied by p when not."""
    logits = xp.asarray([[2.0, -1.0, 0.5, 0.0, 3.0],
                         [2.0, -1.0, 0.5, 0.0, 3.0]], dtype=xp.float32)
    seen = seen_mask(xp.asarray([[0, 1, 3, 0], [4, 4, 4, 4]]), 5)
    out = to_numpy(apply_repetition_penalty(logits, seen, 2.0))
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, 0.0, 3.0],
                                     [2.0, -1.0, 0.5, 0.0, 1.5]])
    assert out.dtype == np.float32
    # greedy: row 1's favourite (3.0) was seen, so 2.0 wins after the penalty
    got = sample_from_logits(logits, 0, seen=seen, repetition_penalty=2.0)
    np.testing.assert_array_equal(to_numpy(got), [4, 0])


def test_generate_with_penalty_equals_a_hand_loop(xp):
    """Greedy generation with the penalty = argmax of the full-forward logits, penalised by hand
    over every token so far (prompt included)."""
    backend.seed(1)
    m = tiny(block_size=16)
    prompt = [3, 1, 4, 1, 5]
    got = [int(t[0]) for t in sampling.generate_stream(m, np.asarray(prompt), 8, temperature=0,
                                                       repetition_penalty=1.7)]
    seq = list(prompt)
    for _ in range(8):
        z = to_numpy(m(xp.asarray([seq]))[0].data)[0, -1].astype(np.float64)      # (V,)
        for v in set(seq):
            z[v] = z[v] / 1.7 if z[v] > 0 else z[v] * 1.7
        seq.append(int(z.argmax()))
    assert got == seq[len(prompt):]
    plain = [int(t[0]) for t in sampling.generate_stream(m, np.asarray(prompt), 8, temperature=0)]
    assert len(set(got)) >= len(set(plain))          # the penalty does not make it repeat more


def test_top_k_0_and_top_p_1_are_off(xp):
    backend.seed(2)
    m = tiny()
    prompt = np.asarray([[1, 2, 3]])
    ref = to_numpy(sampling.generate(m, prompt, 12, temperature=1.0, seed=5))
    for knobs in [dict(top_k=0), dict(top_p=1.0), dict(top_k=0, top_p=1.0), dict(top_k=TINY["vocab_size"])]:
        got = to_numpy(sampling.generate(m, prompt, 12, temperature=1.0, seed=5, **knobs))
        np.testing.assert_array_equal(got, ref, err_msg=str(knobs))


@pytest.mark.parametrize("bad, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_p=math.nan), "top_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.2), "repetition_penalty"), (dict(repetition_penalty=math.nan), "repetition_penalty")])
def test_bad_knobs_one_clear_error(bad, name, capsys, tmp_path):
    with pytest.raises(ValueError, match=name):
        check_sampling(**{"temperature": 1.0, **bad})
    flag = f"--{name}"
    for cmd in (["sample", "--out_dir", str(tmp_path)], ["chat", "--out_dir", str(tmp_path), "--prompt", "hi"]):
        assert main(cmd + [flag, str(bad[name])]) == 2
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err and err.count("\n") == 1


# ---- text as it comes ---------------------------------------------------------------------------

def test_text_stream_joins_split_characters():
    enc = get_encoding("gpt2")
    ids = enc.encode(SPLIT)
    assert any("\ufffd" in enc.decode([i]) for i in ids)          # some token ends inside a character
    stream = TextStream(enc)
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces) == SPLIT
    assert not any("\ufffd" in p for p in pieces)
    cut = TextStream(enc)                                            # ends mid-character: as decode does
    assert "".join([cut.push([i]) for i in ids[:2]]) + cut.flush() == enc.decode(ids[:2])
    chars = CharTokenizer(list("ab\n"))
    assert [TextStream(chars).push([i]) for i in [0, 2, 1]] == ["a", "\n", "b"]


def test_stream_text_stops_at_the_end_marker_and_holds_back_its_head(monkeypatch):
    """A two-token end marker ("\\n\\n" for a char model): a lone "\\n" is printed once the next
    token shows it is not the end; the marker itself never is."""
    tok = CharTokenizer(list("abcd\nxyz"))
    script = tok.encode("ab\ncd\n\nxyz")

    def fake_stream(model, idx, n, **_):
        for t in script[:n]:
            yield np.asarray([t])
    monkeypatch.setattr(sampling, "generate_stream", fake_stream)
    pieces = []
    text = stream_text(None, tok, [0], 50, pieces.append, stop=tok.encode("\n\n"))
    assert text == "ab\ncd" and "".join(pieces) == text and "\n\n" not in "".join(pieces)
    assert stream_text(None, tok, [0], 4, stop=tok.encode("\n\n")) == "ab\nc"     # max_new_tokens first
    enc = get_encoding("gpt2")
    script = enc.encode(SPLIT) + [enc.eot_token] + enc.encode("more")
    assert stream_text(None, enc, [0], 50, stop=[enc.eot_token]) == SPLIT


def _save_gpt2_checkpoint(d):
    backend.seed(0)
    m = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=8))
    save_checkpoint(os.path.join(d, "ckpt.npz"), {"model": m.state_dict(), "model_config": m.config.to_dict(),
                                                   "meta": {"tokenizer": "gpt2", "vocab_size": 50257}})
    return m


def test_sample_stream_prints_the_same_text(tmp_path, capsys):
    """``--stream`` and ``--no-stream`` print the same characters, with a prompt GPT-2 splits inside
    characters and a random model whose samples cut characters too (temperature 1, no filter)."""
    _save_gpt2_checkpoint(tmp_path)
    args = ["sample", "--out_dir", str(tmp_path), "--start", SPLIT, "--max_new_tokens", "25", "--temperature", "1",
            "--top_k", "0", "--repetition_penalty", "1.3", "--num_samples", "2"]
    assert main(args + ["--no-stream"]) == 0
    whole = capsys.readouterr().out
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == whole and whole.startswith(SPLIT)
    assert main(args) == 0                          # captured stdout is no terminal: not streamed, same text
    assert capsys.readouterr().out == whole


def test_stream_pieces_come_one_by_one(tmp_path):
    enc = get_encoding("gpt2")
    m = _save_gpt2_checkpoint(tmp_path)
    prompt = enc.encode(SPLIT)
    pieces = []
    text = stream_text(m, enc, prompt, 20, pieces.append, temperature=1.0, seed=3)
    ids = to_numpy(sampling.generate(m, np.asarray(prompt), 20, temperature=1.0, seed=3))
    assert "".join(pieces) == text == enc.decode(ids[len(prompt):].tolist())
    assert len(pieces) > 5


# ---- chat ---------------------------------------------------------------------------------------

EX = {"instruction": "Reverse these words.", "input": "", "output": "not or be to"}
CHARS = sorted(set(I.PROMPT_WITH_INPUT + I.PROMPT_NO_INPUT + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                             " .,:#\n"))


@pytest.fixture(scope="module")
def tuned():
    """A 1-layer char model that has learnt one instruction by heart (greedy answer, then "\\n\\n")."""
    tok = CharTokenizer(CHARS)
    backend.use("numpy")
    backend.seed(0)
    m = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=192, n_layer=1, n_head=2, n_embd=32))
    I.train_instruct(m, [I.encode_instruction(EX, tok)],
                     I.InstructConfig(max_iters=60, batch_size=1, learning_rate=1e-2, warmup_iters=0),
                     log=lambda *_: None)
    assert I.generate_response(m, tok, EX, 40) == EX["output"]
    return m, tok


def _save_like_finetune_instruct(d, m, with_template=True):
    """The checkpoint ``npgpt finetune-instruct --out_dir`` writes (and with the chat template entry)."""
    ckpt = {"model": m.state_dict(), "model_config": m.config.to_dict(),
            "meta": {"tokenizer": "char", "vocab_size": len(CHARS), "chars": CHARS},
            "lora_config": getattr(m, "_lora_config", None)}
    if with_template:
        ckpt[I.CHAT_KEY] = I.chat_template(CharTokenizer(CHARS))
    save_checkpoint(os.path.join(d, "ckpt.npz"), ckpt)


@pytest.mark.parametrize("with_template", [True, False])
def test_chat_answers_and_stops_at_the_end_marker(tuned, tmp_path, capsys, with_template):
    m, _ = tuned
    _save_like_finetune_instruct(tmp_path, m, with_template)
    for stream in ("--stream", "--no-stream"):
        assert main(["chat", "--out_dir", str(tmp_path), "--prompt", EX["instruction"], stream]) == 0
        assert capsys.readouterr().out == EX["output"] + "\n"          # the "\n\n" end marker is not printed
    assert main(["sample", "--out_dir", str(tmp_path), "--instruct", EX["instruction"], "--temperature", "0"]) == 0
    assert capsys.readouterr().out == EX["output"] + "\n"


def test_chat_reads_questions_until_end_of_input(tuned, tmp_path, capsys, monkeypatch):
    m, _ = tuned
    _save_like_finetune_instruct(tmp_path, m)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{EX['instruction']}\n\n{EX['instruction']}\n"))
    assert main(["chat", "--out_dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == (EX["output"] + "\n") * 2


def test_chat_on_a_lora_checkpoint(tuned, tmp_path, capsys):
    """A ``finetune-instruct --lora_r`` checkpoint (base weights + adapters in one state dict) loads
    (``loading.load_model`` merges it) and answers as the adapted model in memory does."""
    from npgpt.lora import apply_lora, lora_parameters
    m, tok = tuned
    lm = GPT(m.config)
    lm.load_state_dict(m.state_dict())
    apply_lora(lm, ["attn.c_attn", "attn.c_proj"], r=2, alpha=4)
    rng = np.random.default_rng(0)
    for name, p in lora_parameters(lm).items():
        if name.endswith("lora_B"):
            p.data[...] = rng.normal(0, 0.02, p.shape).astype(p.dtype)
    lm.eval()
    want = I.generate_response(lm, tok, EX, 40)
    _save_like_finetune_instruct(tmp_path, lm, with_template=False)
    assert main(["chat", "--out_dir", str(tmp_path), "--prompt", EX["instruction"], "--max_new_tokens", "40"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_chat_refuses_a_plain_checkpoint(tmp_path, capsys):
    backend.seed(0)
    m = GPT(GPTConfig(vocab_size=3, block_size=8, n_layer=1, n_head=1, n_embd=4))
    save_checkpoint(os.path.join(tmp_path, "ckpt.npz"), {
        "model": m.state_dict(), "model_config": m.config.to_dict(), "train_config": {},
        "meta": {"tokenizer": "char", "vocab_size": 3, "chars": list("ab\n")}})
    for cmd in (["chat", "--out_dir", str(tmp_path), "--prompt", "hi"], ["chat", "--out_dir", str(tmp_path)],
                ["sample", "--out_dir", str(tmp_path), "--instruct", "hi"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "not instruction-tuned" in err and "npgpt sample" in err and "Traceback" not in err
    assert main(["chat", "--out_dir", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "Traceback" not in capsys.readouterr().err
