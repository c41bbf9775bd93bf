"""npgpt prepare: char and BPE data files decode back to the input documents (joined by
<|endoftext|> for BPE), chunking never changes pre-tokens, the worker pool (forked or spawned, plain
or sharded) writes what one process writes, dtype switch, clear errors, and the CLI."""
import base64
import json
import os

import numpy as np
import pytest
import regex
from hypothesis import given, settings, strategies as st

from npgpt import encode_pool, prepare as prep
from npgpt.cli import main
from npgpt.tokenizer import GPT2_PATTERN, GPT4_PATTERN, CharTokenizer, get_encoding, load_tokenizer_from_meta

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n\nAll:\n  Speak, speak.\r\n" * 30


def read_all(d):
    meta = json.load(open(os.path.join(d, "meta.json")))
    parts = [np.fromfile(os.path.join(d, f"{s}.bin"), dtype=meta["dtype"]) for s in ("train", "val")]
    assert [len(p) for p in parts] == [meta["train_tokens"], meta["val_tokens"]]
    return meta, np.concatenate(parts)


def test_char_prepare_round_trip(tmp_path):
    (tmp_path / "a.txt").write_bytes(TEXT.encode())
    meta = prep.prepare(str(tmp_path / "a.txt"), str(tmp_path / "out"), progress=False)
    meta2, ids = read_all(tmp_path / "out")
    assert meta == meta2
    assert meta["tokenizer"] == "char" and meta["chars"] == sorted(set(TEXT)) and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == len(set(TEXT))
    assert meta["train_tokens"] == int(len(TEXT) * 0.9) and meta["train_tokens"] + meta["val_tokens"] == len(TEXT)
    assert load_tokenizer_from_meta(meta).decode(ids.tolist()) == TEXT
    assert load_tokenizer_from_meta(str(tmp_path / "out")).decode(ids.tolist()) == TEXT


@pytest.mark.parametrize("workers, start", [(1, None), (2, "fork"), (2, "spawn")])
def test_bpe_prepare_documents_chunks_and_workers(tmp_path, monkeypatch, workers, start):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 300)   # many chunks and tasks
    monkeypatch.setattr(encode_pool, "POOL_MIN_BYTES", 0)           # the pool for any input
    if start == "spawn":                            # as where fork is unavailable: workers load by name
        monkeypatch.setattr(encode_pool.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    docs = [TEXT, "Second doc  \n\n  with spaces\n", TEXT[:500], "ünïcödé 🤖 doc"]
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "1.txt").write_bytes(docs[0].encode())
    with open(tmp_path / "d" / "sub" / "2.jsonl", "w") as f:
        for d in docs[1:]:
            f.write(json.dumps({"text": d}) + "\n\n")
    (tmp_path / "d" / "ignored.csv").write_text("not an input")
    meta = prep.prepare(str(tmp_path / "d"), str(tmp_path / "out"), tokenizer="gpt2", workers=workers,
                        val_fraction=0.25, progress=False)
    _, ids = read_all(tmp_path / "out")
    enc = get_encoding("gpt2")
    assert ids.tolist() == enc.encode("<|endoftext|>".join(docs), allowed_special="all")
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16" and meta["eot_token"] == 50256
    assert meta["val_tokens"] == len(ids) - int(len(ids) * 0.75)
    assert load_tokenizer_from_meta(meta).decode(ids.tolist()) == "<|endoftext|>".join(docs)


def test_pool_only_where_it_pays():
    big = encode_pool.POOL_MIN_BYTES + 1
    assert encode_pool.use_pool("gpt2", 2, big) and encode_pool.use_pool("my.json", 2, big)
    assert not encode_pool.use_pool("gpt2", 2, encode_pool.POOL_MIN_BYTES)     # small: in-process
    assert not encode_pool.use_pool("gpt2", 1, big) and not encode_pool.use_pool("char", 2, big)


def test_sharded_prepare_on_the_pool_writes_the_same_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 400)
    for i in range(6):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.txt").write_text(TEXT[i * 50:] + f" doc {i}")
    kw = dict(tokenizer="gpt2", shard_tokens=300, val_fraction=0.3, progress=False)
    one = prep.prepare(str(tmp_path / "in"), str(tmp_path / "one"), workers=1, **kw)
    monkeypatch.setattr(encode_pool, "POOL_MIN_BYTES", 0)
    pool = prep.prepare(str(tmp_path / "in"), str(tmp_path / "pool"), workers=2, **kw)
    assert {k: v for k, v in one.items() if k != "inputs"} == {k: v for k, v in pool.items() if k != "inputs"}
    for name in os.listdir(tmp_path / "one"):
        if name.endswith(".bin"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "pool" / name).read_bytes()


FRAGMENTS = ["ab", "Z", "é", ".", "!", "'s", "1", " ", "  ", "\t", "\n", "\n", "\n\n", "\r\n", "\r", "\u00a0"]


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])
@settings(max_examples=300)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=120).map("".join))
def test_chunk_cuts_keep_pretokens(pattern, text):
    """Pre-tokens of the chunks, concatenated, are the pre-tokens of the whole text."""
    old = prep.CHUNK_CHARS
    prep.CHUNK_CHARS = 8
    try:
        chunks = list(prep._chunks(iter([text[:100], text[100:]])))
    finally:
        prep.CHUNK_CHARS = old
    assert "".join(chunks) == text
    assert sum((regex.findall(pattern, c) for c in chunks), []) == regex.findall(pattern, text)


def test_chunks_are_cut_at_all():
    old = prep.CHUNK_CHARS
    prep.CHUNK_CHARS = 64
    try:
        chunks = list(prep._chunks(iter([TEXT])))
    finally:
        prep.CHUNK_CHARS = old
    assert "".join(chunks) == TEXT and len(chunks) > 20 and max(map(len, chunks)) < 3 * 64


def test_uint32_for_big_vocab(tmp_path):
    # a saved tokenizer: the 256 bytes + <|endoftext|> at id 70000, so ids need uint32
    with open(tmp_path / "big.tiktoken", "wb") as f:
        for b in range(256):
            f.write(base64.b64encode(bytes([b])) + b" %d\n" % b)
    (tmp_path / "big.tiktoken.json").write_text(json.dumps(
        {"type": "RegexTokenizer", "pattern": GPT2_PATTERN, "special_tokens": {"<|endoftext|>": 70000}}))
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("c")
    meta = prep.prepare(str(tmp_path / "*.txt"), str(tmp_path / "o"), tokenizer=str(tmp_path / "big.tiktoken"),
                        progress=False)
    _, ids = read_all(tmp_path / "o")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70001
    assert ids.tolist() == [97, 98, 70000, 99]       # bytes of "ab", eot, "c"


def test_char_tokenizer_array_and_errors():
    tok = CharTokenizer(["b", "a", "\n", "é"])        # any order: ids follow the given list
    assert tok.encode_array("ab\né").tolist() == [1, 0, 2, 3] == tok.encode("ab\né")
    with pytest.raises(ValueError, match="'xz'"):
        tok.encode_array("abxz")
    with pytest.raises(ValueError, match="'xz'"):
        tok.encode("abzx")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([4])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .txt or .jsonl"):
        prep.prepare(str(tmp_path / "missing.txt"), str(tmp_path / "o"), progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        prep.prepare(str(tmp_path / "empty.txt"), str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="2 are needed"):
        prep.prepare(str(tmp_path / "empty.txt"), str(tmp_path / "o"), tokenizer="gpt2", progress=False)
    (tmp_path / "a.txt").write_text("abc")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        prep.prepare(str(tmp_path / "a.txt"), str(tmp_path / "o"), tokenizer="nope", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prep.prepare(str(tmp_path / "a.txt"), str(tmp_path / "o"), val_fraction=1.0, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: .*'text'"):
        prep.prepare(str(tmp_path / "bad.jsonl"), str(tmp_path / "o"), progress=False)
    # a failed run leaves an earlier dataset in the directory whole, and no temporary files
    prep.prepare(str(tmp_path / "a.txt"), str(tmp_path / "o"), progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        prep.prepare(str(tmp_path / "bad.jsonl"), str(tmp_path / "o"), tokenizer="gpt2", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before
    assert sorted(before) == ["meta.json", "train.bin", "val.bin"]
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="not UTF-8"):
        prep.prepare(str(tmp_path / "latin1.txt"), str(tmp_path / "o"), progress=False)


def test_cli_prepare_tokenize_train_tokenizer(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT)
    assert main(["prepare", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o")]) == 0
    assert "train" in capsys.readouterr().out
    assert json.load(open(tmp_path / "o" / "meta.json"))["tokenizer"] == "char"
    assert main(["tokenize", "Hello world"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "15496 995" and "'Hello' | ' world'" in out   # GPT-2's known ids
    assert main(["tokenize", "--decode", "15496", "11"]) == 0
    assert capsys.readouterr().out.strip() == "Hello,"
    assert main(["train-tokenizer", str(tmp_path / "a.txt"), "--vocab-size", "300", "--out", str(tmp_path / "t.json")]) == 0
    assert main(["tokenize", "--tokenizer", str(tmp_path / "t.json"), "Speak"]) == 0
    assert main(["prepare", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o3"),
                 "--tokenizer", str(tmp_path / "t.json")]) == 0
    _, ids = read_all(tmp_path / "o3")
    assert load_tokenizer_from_meta(str(tmp_path / "o3")).decode(ids.tolist()) == TEXT
    capsys.readouterr()
    assert main(["tokenize", "--tokenizer", str(tmp_path / "o"), "Speak"]) == 0      # the char data directory
    chars = sorted(set(TEXT))
    assert capsys.readouterr().out.splitlines()[0] == " ".join(str(chars.index(c)) for c in "Speak")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"text": "Speak!"}) + "\n")
    assert main(["train-tokenizer", str(tmp_path / "docs.jsonl"), "--vocab-size", "280", "--out",
                 str(tmp_path / "t.tiktoken"), "--pattern", "gpt4"]) == 0
    assert main(["tokenize", "--tokenizer", str(tmp_path / "t.tiktoken"), "--decode", "83", "257"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("S")


@pytest.mark.parametrize("argv, message", [
    (["tokenize", "--decode", "abc"], "integer token ids"),
    (["tokenize", "--decode", "99999999"], "not in the vocabulary"),
    (["tokenize", "--tokenizer", "missing.json", "hi"], "unknown tokenizer"),
    (["train-tokenizer", "{tmp}/a.txt", "--vocab-size", "10", "--out", "{tmp}/t.json"], "at least"),
    (["train-tokenizer", "{tmp}/nope.txt", "--vocab-size", "300", "--out", "{tmp}/t.json"], "no .txt"),
    (["prepare", "--input", "{tmp}/nope", "--out", "{tmp}/o2"], "no .txt or .jsonl"),
    (["prepare", "--input", "{tmp}/a.txt", "--out", "{tmp}/o2", "--tokenizer", "bogus"], "unknown tokenizer"),
    (["prepare", "--input", "{tmp}/a.txt", "--out", "{tmp}/o2", "--val-fraction", "2"], "val_fraction"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "a.txt").write_text(TEXT)
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["train-tokenizer", "x.txt", "--out", "t.json"],     # no --vocab-size
                                  ["train-tokenizer", "x.txt", "--vocab-size", "many", "--out", "t.json"],
                                  ["prepare", "--input", "x.txt"],                      # no --out
                                  ["prepare", "--out", "o", "--val-fraction", "half"]])
def test_cli_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
