"""Issue 18, bad inputs: every user mistake below ends in exit status 2 and exactly one line on stderr,
``npgpt <cmd>: error: ...`` (no traceback); commands that would overwrite a checkpoint refuse unless
``--overwrite`` and leave the original byte for byte; LoRA checkpoints from ``finetune-instruct``
are read by sample, eval and convert."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import npgpt
from npgpt.checkpoint import save_checkpoint
from npgpt.cli import main
from npgpt.data import DataError, check_split_length, load_meta, load_split

CHARS = ["\n"] + [chr(c) for c in range(32, 127)]          # every character the Alpaca template uses
META = {"tokenizer": "char", "chars": CHARS, "vocab_size": len(CHARS), "dtype": "uint16"}


def tiny_gpt(seed=0, block_size=16):
    npgpt.backend.seed(seed)
    return npgpt.GPT(npgpt.GPTConfig(vocab_size=len(CHARS), n_layer=1, n_embd=16, n_head=2, block_size=block_size))


def save_run_like(out_dir, model, **extra):
    """A checkpoint in the layout ``npgpt train`` writes (train_helpers.save_run), minus the optimizer."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "ckpt.npz")
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.config.to_dict(), "meta": META,
                           "iter_num": 0, "best_val_loss": 9.9, **extra})
    return path


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    save_run_like(str(d), tiny_gpt(), train_config={"out_dir": str(d)})
    return str(d)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A checkpoint saved as ``finetune-instruct --lora_r 2`` saves it (finetune_cmd._instruct)."""
    from npgpt.finetune import instruct as I
    from npgpt.lora import apply_lora
    from npgpt.tokenizer import CharTokenizer
    d = tmp_path_factory.mktemp("lora")
    gpt = tiny_gpt(1, block_size=192)                # room for the Alpaca prompt in characters
    apply_lora(gpt, "attn.c_attn,attn.c_proj", 2, 16.0, 0.0)
    for name, p in gpt.named_parameters():           # adapters away from their zero init
        if name.endswith("lora_B"):
            p.data[...] = np.random.default_rng(0).normal(0, 0.2, p.data.shape)
    save_checkpoint(os.path.join(d, "ckpt.npz"), {
        "model": gpt.state_dict(), "model_config": gpt.config.to_dict(), "meta": META,
        "lora_config": gpt._lora_config, I.CHAT_KEY: I.chat_template(CharTokenizer(CHARS))})
    return str(d)


def one_error(capsys, cmd):
    """The single stderr line, checked to be ``npgpt CMD: error: ...``."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"npgpt {cmd}: error:"), err
    assert "Traceback" not in err
    return lines[0]


def fails(capsys, cmd, argv, *needles):
    assert main([cmd, *argv]) == 2
    line = one_error(capsys, cmd)
    for n in needles:
        assert n in line, line
    return line


# ---- prepared data: meta.json and the .bin splits ----------------------------------------------------

def write_data(d, meta=META, train=None, val=None, dtype=np.uint16):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "meta.json"), "w") as f:
        f.write(meta if isinstance(meta, str) else json.dumps(meta))
    rng = np.random.default_rng(0)
    for name, ids in (("train", train), ("val", val)):
        ids = rng.integers(0, len(CHARS), 200).astype(dtype) if ids is None else ids
        with open(os.path.join(d, f"{name}.bin"), "wb") as f:
            f.write(ids.tobytes() if isinstance(ids, np.ndarray) else ids)
    return str(d)


BAD_DATA = {
    "invalid_json": (dict(meta="{not json"), "not valid JSON"),
    "not_an_object": (dict(meta="[1, 2]"), "JSON object"),
    "missing_vocab_size": (dict(meta={k: v for k, v in META.items() if k != "vocab_size"}), "vocab_size"),
    "wrong_vocab_size": (dict(meta={**META, "vocab_size": 50}), "vocab_size"),
    "gpt2_vocab_size": (dict(meta={"tokenizer": "gpt2", "vocab_size": 100, "dtype": "uint16"}), "50257"),
    "char_without_chars": (dict(meta={"tokenizer": "char", "vocab_size": 5, "dtype": "uint16"}), "chars"),
    "bad_dtype": (dict(meta={**META, "dtype": "float32"}), "dtype"),
    "uint16_too_small": (dict(meta={"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint8"}), "dtype"),
    "odd_length": (dict(train=b"\x01\x00\x02"), "multiple of 2"),
    "empty_val": (dict(val=b""), "val.bin"),
    "one_token": (dict(val=np.array([1], np.uint16)), "val.bin"),
    "id_out_of_range": (dict(train=np.array([1, 2, 500, 3], np.uint16)), "500"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_clear_error(tmp_path, case):
    kwargs, needle = BAD_DATA[case]
    d = write_data(tmp_path / "d", **kwargs)
    with pytest.raises(DataError) as e:
        load_meta(d)
        load_split(d, "train")
        load_split(d, "val")
    assert needle in str(e.value) and "npgpt prepare" in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("case", ["invalid_json", "odd_length", "empty_val", "id_out_of_range"])
def test_train_on_bad_data_exits_2(tmp_path, capsys, case):
    kwargs, needle = BAD_DATA[case]
    d = write_data(tmp_path / "d", **kwargs)
    fails(capsys, "train", [f"--data={d}", f"--out_dir={tmp_path / 'o'}", "--max_iters=1", "--n_layer=1",
                            "--n_embd=16", "--n_head=2", "--block_size=8", "--progress=false"], needle)


def test_good_data_loads(tmp_path):
    d = write_data(tmp_path / "d")
    assert load_meta(d)["vocab_size"] == len(CHARS)
    assert len(load_split(d, "train")) == 200


def test_meta_without_dtype_reads_as_uint16(tmp_path):
    d = write_data(tmp_path / "d", meta={k: v for k, v in META.items() if k != "dtype"})
    assert load_split(d, "val").dtype == np.uint16


def test_check_split_length():
    check_split_length(np.zeros(9, np.uint16), 8, "train")
    with pytest.raises(DataError, match="block_size"):
        check_split_length(np.zeros(8, np.uint16), 8, "val")


def test_missing_split_is_file_not_found(tmp_path):
    d = write_data(tmp_path / "d")
    os.remove(os.path.join(d, "val.bin"))
    with pytest.raises(FileNotFoundError, match="npgpt prepare"):
        load_split(d, "val")


# ---- overwriting checkpoints ----------------------------------------------------------------------

def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_convert_to_ckpt_refuses_to_overwrite(tmp_path, capsys, ckpt_dir):
    target = tmp_path / "t"
    original = save_run_like(str(target), tiny_gpt(5))
    before = _bytes(original)
    fails(capsys, "convert", ["--from_ckpt", ckpt_dir, "--to_ckpt", str(target)], "--overwrite")
    assert _bytes(original) == before
    assert main(["convert", "--from_ckpt", ckpt_dir, "--to_ckpt", str(target), "--overwrite"]) == 0
    assert _bytes(original) != before


def test_convert_to_hf_refuses_to_overwrite(tmp_path, capsys, ckpt_dir):
    assert main(["convert", "--from_ckpt", ckpt_dir, "--to_hf", str(tmp_path / "hf")]) == 0
    weights = tmp_path / "hf" / "model.safetensors"
    before = _bytes(weights)
    fails(capsys, "convert", ["--from_ckpt", ckpt_dir, "--to_hf", str(tmp_path / "hf")], "--overwrite")
    assert _bytes(weights) == before
    assert main(["convert", "--from_ckpt", ckpt_dir, "--to_hf", str(tmp_path / "hf"), "--overwrite"]) == 0


@pytest.mark.parametrize("flag", ["--to_hf", "--to_ckpt"])
def test_convert_onto_a_file(tmp_path, capsys, ckpt_dir, flag):
    f = tmp_path / "f.txt"
    f.write_text("keep me")
    fails(capsys, "convert", ["--from_ckpt", ckpt_dir, flag, str(f)], "not a directory")
    assert f.read_text() == "keep me"


FT = ["--init_from", "scratch", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--max_iters", "0"]


def test_finetune_instruct_refuses_to_overwrite_ckpt(tmp_path, capsys):
    original = save_run_like(str(tmp_path / "o"), tiny_gpt())
    before = _bytes(original)
    fails(capsys, "finetune-instruct", FT + ["--out_dir", str(tmp_path / "o")], "ckpt.npz", "--overwrite")
    assert _bytes(original) == before


def test_finetune_classify_refuses_to_overwrite_classifier(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "classifier.npz").write_bytes(b"precious")
    fails(capsys, "finetune-classify", FT + ["--out_dir", str(out)], "classifier.npz", "--overwrite")
    assert (out / "classifier.npz").read_bytes() == b"precious"


def test_finetune_overwrite_flag_is_accepted(tmp_path):
    from npgpt.cli import build_parser
    for cmd in ("finetune-instruct", "finetune-classify"):
        assert build_parser().parse_args([cmd, "--overwrite"]).overwrite


# ---- LoRA checkpoints are read everywhere ------------------------------------------------------------

def test_lora_checkpoint_samples_merged(lora_dir, capsys):
    from npgpt.loading import load_model
    from npgpt.lora import merge_lora
    model, ckpt = load_model(lora_dir)
    assert not any(k.endswith("lora_A") for k in model.state_dict())
    assert main(["sample", "--out_dir", lora_dir, "--start", "ab", "--max_new_tokens", "3", "--no_stream"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    # the merged weights give the adapted model's logits
    from npgpt.lora import apply_lora
    ref = tiny_gpt(1, block_size=192)
    apply_lora(ref, "attn.c_attn,attn.c_proj", 2, 16.0, 0.0)
    ref.load_state_dict(ckpt["model"])
    merge_lora(ref)
    x = np.array([[1, 2, 3]])
    assert np.allclose(model.eval()(x)[0].data, ref.eval()(x)[0].data, atol=1e-5)


def test_lora_checkpoint_evaluates(lora_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world, hello there " * 4)
    assert main(["eval", "--out_dir", lora_dir, "--text", str(text), "--json", "--no_progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]["tokens"] > 0


def test_lora_checkpoint_converts(lora_dir, tmp_path):
    assert main(["convert", "--from_ckpt", lora_dir, "--to_ckpt", str(tmp_path / "w")]) == 0
    assert main(["convert", "--from_ckpt", lora_dir, "--to_hf", str(tmp_path / "hf")]) == 0
    assert main(["chat", "--out_dir", str(tmp_path / "w"), "--prompt", "hi", "--max_new_tokens", "2",
                 "--no_stream"]) == 0     # the chat template travels with the weights


# ---- prompts and text files ---------------------------------------------------------------------------

def _bad_files(tmp_path):
    binary = tmp_path / "bin.dat"
    binary.write_bytes(b"\x00\xff\xfe\x80" * 8)
    return {"missing": (str(tmp_path / "nope.txt"), "not found"), "binary": (str(binary), "not UTF-8 text"),
            "directory": (str(tmp_path), "is a directory")}


@pytest.mark.parametrize("case", ["missing", "binary", "directory"])
def test_sample_start_file(tmp_path, capsys, ckpt_dir, case):
    path, needle = _bad_files(tmp_path)[case]
    fails(capsys, "sample", ["--out_dir", ckpt_dir, "--start", f"FILE:{path}", "--max_new_tokens", "1"], needle)


@pytest.mark.parametrize("case", ["missing", "binary", "directory"])
def test_eval_text_file(tmp_path, capsys, ckpt_dir, case):
    path, needle = _bad_files(tmp_path)[case]
    fails(capsys, "eval", ["--out_dir", ckpt_dir, "--text", path], needle)


@pytest.mark.parametrize("rows", ['{"context": "a", "choices": ["b"]}\n', "not json\n", "",
                                  '{"context": "a", "choices": ["b", "c"], "label": 7}\n'])
def test_eval_mc_malformed(tmp_path, capsys, ckpt_dir, rows):
    f = tmp_path / "mc.jsonl"
    f.write_text(rows)
    fails(capsys, "eval", ["--out_dir", ckpt_dir, "--mc", str(f)])


def test_eval_mc_directory(tmp_path, capsys, ckpt_dir):
    fails(capsys, "eval", ["--out_dir", ckpt_dir, "--mc", str(tmp_path)])


def test_chat_empty_prompt(capsys, lora_dir):
    fails(capsys, "chat", ["--out_dir", lora_dir, "--prompt", "  "], "empty")
    fails(capsys, "sample", ["--out_dir", lora_dir, "--instruct", ""], "empty")


def test_chat_stdin_at_end_and_closed(lora_dir, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))    # npgpt importable
    base = [sys.executable, "-m", "npgpt.cli", "chat", "--out_dir", lora_dir, "--max_new_tokens", "2"]
    r = subprocess.run(base, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""                          # end of input: nothing to answer
    r = subprocess.run(base, input="hi\n\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    r = subprocess.run(base, capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: os.close(0))                   # stdin closed: `npgpt chat <&-`
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("npgpt chat: error:"), r.stderr


def test_finetune_instruct_overwrite_replaces(tmp_path):
    original = save_run_like(str(tmp_path / "o"), tiny_gpt())
    before = _bytes(original)
    data = tmp_path / "tiny.json"
    data.write_text(json.dumps([{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(10)]))
    assert main(["finetune-instruct", *FT, "--data", str(data), "--max_eval", "1", "--max_new_tokens", "1",
                 "--block_size", "192", "--batch_size", "1", "--test_frac", "0.2",
                 "--out_dir", str(tmp_path / "o"), "--overwrite"]) == 0
    assert _bytes(original) != before


def test_eval_checkpoint_without_meta(tmp_path, capsys):
    model = tiny_gpt()
    save_checkpoint(str(tmp_path / "ckpt.npz"), {"model": model.state_dict(), "model_config": model.config.to_dict()})
    text = tmp_path / "t.txt"
    text.write_text("hello")
    fails(capsys, "eval", ["--out_dir", str(tmp_path), "--text", str(text)], "no 'meta'")
