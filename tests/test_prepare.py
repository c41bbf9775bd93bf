"""npgpt prepare: char and BPE data files round-trip to the input text; chunking is invisible."""
import json
import os

import numpy as np
import pytest

from npgpt import prepare as prep
from npgpt.cli import main
from npgpt.tokenizer import get_encoding, load_tokenizer_from_meta

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n\nAll:\n  Speak, speak.\n" * 30


def read_all(d):
    meta = json.load(open(os.path.join(d, "meta.json")))
    ids = np.concatenate([np.fromfile(os.path.join(d, f"{s}.bin"), dtype=meta["dtype"]) for s in ("train", "val")])
    return meta, ids


def test_char_prepare_round_trip(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    meta = prep.prepare(str(tmp_path / "a.txt"), str(tmp_path / "out"), progress=False)
    meta2, ids = read_all(tmp_path / "out")
    assert meta == meta2
    assert meta["chars"] == sorted(set(TEXT)) and meta["dtype"] == "uint16"
    assert meta["train_tokens"] == int(len(TEXT) * 0.9) and meta["train_tokens"] + meta["val_tokens"] == len(TEXT)
    assert load_tokenizer_from_meta(meta).decode(ids.tolist()) == TEXT


def test_bpe_prepare_documents_chunks_and_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 200)  # force many chunks
    docs = [TEXT, "Second doc  \n\n  with spaces\n", TEXT[:500]]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.txt").write_text(docs[0])
    with open(tmp_path / "d" / "2.jsonl", "w") as f:
        for d in docs[1:]:
            f.write(json.dumps({"text": d}) + "\n")
    meta = prep.prepare(str(tmp_path / "d"), str(tmp_path / "out"), tokenizer="gpt2", workers=2, progress=False)
    _, ids = read_all(tmp_path / "out")
    enc = get_encoding("gpt2")
    assert ids.tolist() == enc.encode("<|endoftext|>".join(docs), allowed_special="all")
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"


def test_chunk_cuts_keep_pretokens():
    prep_chunk = prep.CHUNK_CHARS
    try:
        prep.CHUNK_CHARS = 64
        text = ("word \n\n\nMORE   \n  x\n" * 40)
        chunks = list(prep._chunks(iter([text])))
        assert "".join(chunks) == text and len(chunks) > 3
        enc = get_encoding("gpt2")
        assert sum((enc.encode_ordinary(c) for c in chunks), []) == enc.encode_ordinary(text)
    finally:
        prep.CHUNK_CHARS = prep_chunk


def test_uint32_for_big_vocab(tmp_path, monkeypatch):
    class Big:  # a tokenizer whose vocabulary does not fit uint16
        n_vocab, eot_token, chars = 70000, None, ["a", "b", "c"]

        def encode(self, text):
            return [69999] * len(text)
    import npgpt.tokenizer as tk
    monkeypatch.setattr(tk, "CharTokenizer", lambda chars: Big())
    (tmp_path / "a.txt").write_text("abc" * 10)
    meta = prep.prepare(str(tmp_path / "a.txt"), str(tmp_path / "o"), progress=False)
    _, ids = read_all(tmp_path / "o")
    assert meta["dtype"] == "uint32" and (ids == 69999).all()


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .txt or .jsonl"):
        prep.prepare(str(tmp_path / "missing.txt"), str(tmp_path / "o"), progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        prep.prepare(str(tmp_path / "empty.txt"), str(tmp_path / "o"), progress=False)
    (tmp_path / "a.txt").write_text("abc")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        prep.prepare(str(tmp_path / "a.txt"), str(tmp_path / "o"), tokenizer="nope", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="'text' field"):
        prep.prepare(str(tmp_path / "bad.jsonl"), str(tmp_path / "o"), progress=False)


def test_cli_prepare_tokenize_train_tokenizer(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT)
    assert main(["prepare", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o")]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["tokenize", "Hello world"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "15496 995" and "Hello |  world" in out
    assert main(["tokenize", "--decode", "15496", "11"]) == 0
    assert capsys.readouterr().out.strip() == "Hello,"
    assert main(["tokenize", "--decode", "abc"]) == 2
    assert main(["train-tokenizer", str(tmp_path / "a.txt"), "--vocab-size", "300", "--out", str(tmp_path / "t.json")]) == 0
    assert main(["tokenize", "--tokenizer", str(tmp_path / "t.json"), "Speak"]) == 0
    assert main(["train-tokenizer", str(tmp_path / "a.txt"), "--vocab-size", "10", "--out", str(tmp_path / "t.json")]) == 2
    assert main(["prepare", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
