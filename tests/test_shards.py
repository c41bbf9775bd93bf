"""Sharded prepare: shards of a fixed token count read back as one stream (slices across boundaries),
the document-hash split, resume after a crash or SIGKILL to the same bytes, and training on a sharded
directory giving the same run as on train.bin / val.bin."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npgpt import prepare as prep
from npgpt import shards
from npgpt.data import DataError, load_split
from npgpt.tokenizer import get_encoding
from npgpt.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n  Speak, speak.\n"
DOCS = [f"Document {i}: " + TEXT * (1 + i % 5) for i in range(40)]


def write_docs(d, docs=DOCS):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "docs.jsonl"), "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return str(d)


def shard_bytes(d):
    meta = json.load(open(os.path.join(d, "meta.json")))
    return {r["file"]: open(os.path.join(d, r["file"]), "rb").read() for s in ("train", "val")
            for r in meta["shards"][s]}


def sharded_copy(single_dir, out_dir, sizes):
    """The train.bin / val.bin of ``single_dir`` re-cut by hand into shards of ``sizes`` tokens."""
    meta = json.load(open(os.path.join(single_dir, "meta.json")))
    os.makedirs(out_dir, exist_ok=True)
    meta["shards"] = {}
    for split in ("train", "val"):
        ids = np.fromfile(os.path.join(single_dir, f"{split}.bin"), dtype=meta["dtype"])
        cuts = np.cumsum([0] + [sizes] * (len(ids) // sizes) + [len(ids) % sizes])
        meta["shards"][split] = []
        for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            ids[a:b].tofile(os.path.join(out_dir, shards.shard_name(split, k)))
            meta["shards"][split].append({"file": shards.shard_name(split, k), "tokens": int(b - a)})
    meta["complete"] = True
    json.dump(meta, open(os.path.join(out_dir, "meta.json"), "w"))
    return str(out_dir)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=6), st.integers(-40, 40), st.integers(-40, 40))
def test_sharded_tokens_slices_cross_boundaries(tmp_path_factory, sizes, i, j):
    d = tmp_path_factory.mktemp("s")
    whole = np.arange(sum(sizes), dtype=np.uint16) * 3
    paths, start = [], 0
    for k, n in enumerate(sizes):
        paths.append(str(d / f"train_{k:06d}.bin"))
        whole[start:start + n].tofile(paths[-1])
        start += n
    data = shards.ShardedTokens(paths, sizes, "uint16")
    assert len(data) == len(whole) and data.nbytes == whole.nbytes
    assert np.array_equal(data[i:j], whole[i:j]) and data[i:j].dtype == np.uint16
    assert np.array_equal(data[i:j:2], whole[i:j:2])
    assert np.array_equal(np.asarray(data), whole) and np.asarray(data, dtype=np.int32).dtype == np.int32
    if -len(whole) <= i < len(whole):
        assert data[i] == whole[i]


def test_hash_split_shards_decode_to_the_documents(tmp_path):
    meta = prep.prepare(write_docs(tmp_path / "in"), str(tmp_path / "o"), tokenizer="gpt2", shard_tokens=300,
                        val_fraction=0.25, progress=False)
    assert meta["split"] == "hash" and meta["complete"] and meta["shard_tokens"] == 300
    enc = get_encoding("gpt2")
    for split in ("train", "val"):
        records = meta["shards"][split]
        assert [r["tokens"] for r in records[:-1]] == [300] * (len(records) - 1) and 0 < records[-1]["tokens"] <= 300
        data = load_split(str(tmp_path / "o"), split)
        assert len(data) == meta[f"{split}_tokens"]
        expected = [d for d in DOCS if prep.is_validation(d, 0.25) == (split == "val")]
        assert enc.decode(np.asarray(data).tolist()) == "<|endoftext|>".join(expected)
    assert 0 < meta["val_tokens"] < meta["train_tokens"]
    # stable: the same documents in another order and more documents keep their split
    prep.prepare(write_docs(tmp_path / "in2", DOCS[::-1] + ["new " + TEXT]), str(tmp_path / "o2"),
                 tokenizer="gpt2", shard_tokens=300, val_fraction=0.25, progress=False)
    val2 = enc.decode(np.asarray(load_split(str(tmp_path / "o2"), "val")).tolist()).split("<|endoftext|>")
    assert set(val2) - {"new " + TEXT} == {d for d in DOCS if prep.is_validation(d, 0.25)}


def test_one_text_file_keeps_the_position_split(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT * 200)
    old = prep.CHUNK_CHARS
    prep.CHUNK_CHARS = 500
    try:
        meta = prep.prepare(str(tmp_path / "a.txt"), str(tmp_path / "o"), tokenizer="gpt2", shard_tokens=1000,
                            progress=False)
    finally:
        prep.CHUNK_CHARS = old
    assert meta["split"] == "position"
    ids = np.concatenate([np.asarray(load_split(str(tmp_path / "o"), s)) for s in ("train", "val")])
    assert ids.tolist() == get_encoding("gpt2").encode_ordinary(TEXT * 200)
    assert 0.85 < meta["train_tokens"] / len(ids) < 0.95


def test_crash_mid_prepare_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    src = write_docs(tmp_path / "in")
    kw = dict(tokenizer="gpt2", shard_tokens=200, val_fraction=0.3, progress=False, workers=1)
    monkeypatch.setattr(prep, "CHUNK_CHARS", 400)            # many tasks
    straight = prep.prepare(src, str(tmp_path / "a"), **kw)
    flush, calls = shards.ShardWriter._flush, []

    def crash_on_the_fifth(self, task, offset):
        calls.append(task)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        flush(self, task, offset)
    monkeypatch.setattr(shards.ShardWriter, "_flush", crash_on_the_fifth)
    with pytest.raises(RuntimeError, match="simulated"):
        prep.prepare(src, str(tmp_path / "b"), **kw)
    monkeypatch.setattr(shards.ShardWriter, "_flush", flush)
    partial = json.load(open(tmp_path / "b" / "meta.json"))
    assert partial["complete"] is False and sum(map(len, partial["shards"].values())) == 4
    with pytest.raises(DataError, match="resume"):
        load_split(str(tmp_path / "b"), "train")
    encoded = []
    encode = prep._encode_task
    monkeypatch.setattr(prep, "_encode_task", lambda task, tok=None: encoded.append(1) or encode(task, tok))
    resumed = prep.prepare(src, str(tmp_path / "b"), **kw)
    assert resumed == straight and shard_bytes(tmp_path / "b") == shard_bytes(tmp_path / "a")
    n_tasks = sum(1 for _ in prep._tasks(prep.list_inputs(src), 50256))
    assert 0 < len(encoded) < n_tasks                        # the finished shards' tasks were not re-encoded


def test_sigkill_after_the_first_shard_resumes_to_the_same_bytes(tmp_path):
    src = write_docs(tmp_path / "in", DOCS * 3)
    script = ("import sys, time; from npgpt import prepare as prep, shards\n"
              "prep.CHUNK_CHARS = 400\n"
              "flush = shards.ShardWriter._flush\n"
              "def slow(self, *a):\n    flush(self, *a); time.sleep(0.3)\n"
              "shards.ShardWriter._flush = slow if sys.argv[3] == 'slow' else flush\n"
              "prep.prepare(sys.argv[1], sys.argv[2], tokenizer='char', shard_tokens=2000, progress=False)\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-c", script, src, str(tmp_path / "a"), "fast"], check=True, env=env)
    proc = subprocess.Popen([sys.executable, "-c", script, src, str(tmp_path / "b"), "slow"], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if json.load(open(tmp_path / "b" / "meta.json"))["shards"]["train"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert json.load(open(tmp_path / "b" / "meta.json"))["complete"] is False
    subprocess.run([sys.executable, "-c", script, src, str(tmp_path / "b"), "fast"], check=True, env=env)
    assert shard_bytes(tmp_path / "b") == shard_bytes(tmp_path / "a")
    assert json.load(open(tmp_path / "b" / "meta.json")) == json.load(open(tmp_path / "a" / "meta.json"))


def test_training_on_shards_equals_training_on_single_files(tmp_path):
    from test_train import tiny_cfg          # tests/ is on sys.path (pytest prepends a test file's folder)
    single = tiny_cfg(tmp_path / "a")
    sharded_dir = sharded_copy(single.data, tmp_path / "sharded", 97)
    assert isinstance(load_split(single.data, "train"), np.memmap)          # the single-file layout still loads
    data = load_split(sharded_dir, "train")
    assert isinstance(data, shards.ShardedTokens) and len(data.shards) > 10
    assert np.array_equal(np.asarray(data), load_split(single.data, "train"))
    r_single = train(single, log=lambda *_: None)
    r_sharded = train(tiny_cfg(tmp_path / "b", data=sharded_dir), log=lambda *_: None)
    assert r_sharded["losses"] == r_single["losses"] and r_sharded["val_loss"] == r_single["val_loss"]


def test_sharded_load_errors(tmp_path):
    from test_train import make_char_data
    d = sharded_copy(make_char_data(str(tmp_path / "single")), tmp_path / "s", 500)
    os.remove(os.path.join(d, "val_000000.bin"))
    with pytest.raises(FileNotFoundError, match="val_000000.bin"):
        load_split(d, "val")
    with open(os.path.join(d, "train_000000.bin"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match="truncated"):
        load_split(d, "train")
    with pytest.raises(ValueError, match="shard_tokens"):
        prep.prepare(str(tmp_path), str(tmp_path / "o"), split="hash")


def test_cli_sharded_prepare_with_a_filter(tmp_path, capsys):
    from npgpt.cli import main
    rows = [{"text": d, "meta": {"keep": i % 2}} for i, d in enumerate(DOCS)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["prepare", "--input", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "o"), "--tokenizer",
                 "gpt2", "--shard_tokens", "500", "--val_fraction", "0.3", "--filter", "meta.keep=1",
                 "--no_progress"]) == 0
    assert "shards (hash split)" in capsys.readouterr().out
    enc = get_encoding("gpt2")
    docs = {t for s in ("train", "val")
            for t in enc.decode(np.asarray(load_split(str(tmp_path / "o"), s)).tolist()).split("<|endoftext|>")}
    assert docs == set(DOCS[1::2])


def test_sampled_id_check_spans_shards(tmp_path, monkeypatch):
    import npgpt.data as data_module
    monkeypatch.setattr(data_module, "FULL_ID_CHECK_BYTES", 0)      # the sampled check of large splits
    d = tmp_path / "s"
    d.mkdir()
    ids = np.arange(700_000, dtype=np.uint32) % 50257
    ids[0] = 50257                                                   # out of range, in the first sample
    sizes = [300_000, 300_000, 100_000]
    records = []
    for k, (a, n) in enumerate(zip(np.cumsum([0] + sizes[:-1]), sizes)):
        ids[a:a + n].astype(np.uint16).tofile(d / shards.shard_name("train", k))
        records.append({"file": shards.shard_name("train", k), "tokens": n})
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "complete": True,
            "shards": {"train": records, "val": records[2:]}}
    (d / "meta.json").write_text(json.dumps(meta))
    assert len(load_split(str(d), "val")) == 100_000        # smaller than one 1 MiB sample: checked whole
    with pytest.raises(DataError, match="token id 50257"):
        load_split(str(d), "train")
