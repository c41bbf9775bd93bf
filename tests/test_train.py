"""Training: exact resume, atomic checkpoints, the CLI on a tiny config."""
import json
import os

import numpy as np
import pytest

from npgpt import backend
from npgpt.checkpoint import save_checkpoint, load_checkpoint, CheckpointError
from npgpt.cli import main
from npgpt.data import get_batch, DeviceBatches
from npgpt.train import TrainConfig, train

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


def make_char_data(d, text=TEXT):
    """A tiny char-level dataset of ``text`` written by hand (independent of npgpt prepare)."""
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    os.makedirs(d, exist_ok=True)
    ids[:n].tofile(os.path.join(d, "train.bin"))
    ids[n:].tofile(os.path.join(d, "val.bin"))
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"tokenizer": "char", "vocab_size": len(chars), "chars": chars, "dtype": "uint16",
                   "train_tokens": n, "val_tokens": len(ids) - n}, f)
    return d


def tiny_cfg(tmp_path, **kw):
    """A tiny run. threads=2 pinned: the default counts the cores busy at start (in a test process, BLAS
    threads still spinning from the previous run), and 1 or 2 threads sum the gradient in a different
    order (replicas.py), so runs compared loss for loss must not leave it to the machine."""
    base = dict(data=make_char_data(str(tmp_path / "data")), out_dir=str(tmp_path / "out"), n_layer=2, n_head=2,
                n_embd=16, block_size=16, batch_size=4, max_iters=20, lr_decay_iters=20, warmup_iters=4,
                eval_interval=5, eval_iters=2, log_interval=5, progress=False, learning_rate=3e-3, threads=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("split", ["batch", "ops"])      # 2 threads: replicas.py's threads, or each op split
def test_exact_resume(tmp_path, dropout, split):
    kw = dict(dropout=dropout, thread_split=split)
    straight = train(tiny_cfg(tmp_path / "a", **kw), log=lambda *_: None)
    first = train(tiny_cfg(tmp_path / "b", max_iters=10, **kw), log=lambda *_: None)
    second = train(tiny_cfg(tmp_path / "b", init_from="resume", **kw), log=lambda *_: None)
    assert len(straight["losses"]) == 20
    assert first["losses"] + second["losses"] == straight["losses"]  # bit-identical
    assert straight["val_loss"] == second["val_loss"]


def test_loss_decreases(tmp_path):
    r = train(tiny_cfg(tmp_path, max_iters=60, lr_decay_iters=60, eval_interval=60), log=lambda *_: None)
    assert r["losses"][-1] < r["losses"][0] - 0.5
    rows = [json.loads(l) for l in open(tmp_path / "out" / "log.jsonl")]
    assert any("val_loss" in r for r in rows) and any("tokens_per_s" in r for r in rows)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.npz")
    save_checkpoint(path, {"w": np.arange(3.0), "step": 1})

    def crash(f, **arrays):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": np.zeros(3), "step": 2})
    ck = load_checkpoint(path)
    assert ck["step"] == 1 and ck["w"].tolist() == [0.0, 1.0, 2.0]
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # no temp file left behind


def test_checkpoint_round_trip_and_corrupt_file(tmp_path):
    obj = {"a": {"b": np.ones((2, 2), np.float32), "lst": [1, np.int64(2), "x"]}, "state": {"s": [3, 4]}}
    save_checkpoint(str(tmp_path / "c.npz"), obj)
    back = load_checkpoint(str(tmp_path / "c.npz"))
    assert back["a"]["b"].dtype == np.float32 and back["a"]["lst"] == [1, 2, "x"] and back["state"] == {"s": [3, 4]}
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(str(tmp_path / "bad.npz"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "missing.npz"))


def test_get_batch_shapes_and_shift(xp):
    data = np.arange(100, dtype=np.uint16)
    x, y = get_batch(data, 4, 8, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 8) and backend.get_array_module(x) is xp
    np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(x) + 1)
    with pytest.raises(ValueError, match="too few"):
        get_batch(data[:5], 1, 8, np.random.default_rng(0))


def test_device_batches_are_shifted_windows(xp):
    data = np.arange(1000, dtype=np.uint16)
    sample = DeviceBatches(data, 64, 8, seed=3)
    x, y = sample()
    assert x.shape == y.shape == (64, 8) and backend.get_array_module(x) is xp and x.dtype == np.int64
    x, y = backend.to_numpy(x), backend.to_numpy(y)
    np.testing.assert_array_equal(y, x + 1)                          # next-token targets
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)             # consecutive windows
    assert x.min() >= 0 and y.max() <= 999
    starts = np.concatenate([backend.to_numpy(sample()[0][:, 0]) for _ in range(30)])
    assert len(np.unique(starts)) > 500 and starts.max() <= 1000 - 8 - 1  # spread over all of [0, n)
    again = backend.to_numpy(DeviceBatches(data, 64, 8, seed=3)()[0])
    np.testing.assert_array_equal(again, x)                          # seeded
    with pytest.raises(ValueError, match="too few"):
        DeviceBatches(data[:5], 1, 8, seed=0)


def test_mixed_precision_training_learns_and_resumes_exactly(tmp_path):
    kw = dict(dtype="float16", max_iters=60, lr_decay_iters=60, eval_interval=30)
    straight = train(tiny_cfg(tmp_path / "a", **kw), log=lambda *_: None)
    assert straight["losses"][-1] < straight["losses"][0] - 0.5
    ckpt = load_checkpoint(str(tmp_path / "a" / "out" / "ckpt.npz"))
    assert all(v.dtype == np.float32 for v in ckpt["model"].values())   # fp32 master weights saved
    rows = [json.loads(line) for line in open(tmp_path / "a" / "out" / "log.jsonl")]
    assert any("loss_scale" in r for r in rows)
    train(tiny_cfg(tmp_path / "b", **{**kw, "max_iters": 30}), log=lambda *_: None)
    second = train(tiny_cfg(tmp_path / "b", **kw, init_from="resume"), log=lambda *_: None)
    assert second["losses"] == straight["losses"][30:]


@pytest.mark.cupy
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_training_on_the_gpu(tmp_path, dtype):
    if not backend.is_cupy_available():
        pytest.skip("cupy backend: CuPy or a CUDA GPU is not available")
    old = backend.name
    try:
        r = train(tiny_cfg(tmp_path, device="cuda", dtype=dtype, max_iters=60, lr_decay_iters=60,
                           eval_interval=30), log=lambda *_: None)
    finally:
        backend.use(old)
    assert r["losses"][-1] < r["losses"][0] - 0.5 and np.isfinite(r["val_loss"])


def test_cli_train_and_sample_smoke(tmp_path, capsys):
    data = make_char_data(str(tmp_path / "d"))
    out = str(tmp_path / "o")
    rc = main(["train", f"--data={data}", "--out_dir", out, "--n_layer=1", "--n_head=2", "--n_embd=16",
               "--block_size=16", "--batch_size=2", "--max_iters=6", "--eval_interval=3", "--eval_iters=1",
               "--progress=false"])
    text = capsys.readouterr().out
    assert rc == 0 and "step 3: train loss" in text and "val loss" in text and "sample:" in text
    rc = main(["sample", "--out_dir", out, "--start", "To be", "--max_new_tokens", "20", "--seed", "1"])
    text = capsys.readouterr().out
    assert rc == 0 and text.startswith("To be") and len(text) >= 25


def test_cli_train_rejects_bad_keys_and_values(tmp_path, capsys):
    assert main(["train", "--n_layers=3"]) == 2
    assert "unknown key(s) n_layers" in capsys.readouterr().err
    assert main(["train", "--max_iters=abc"]) == 2
    assert "--max_iters expects int" in capsys.readouterr().err
    assert main(["train", "--init_from=elsewhere"]) == 2
    assert "init_from" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.toml")]) == 2
    (tmp_path / "c.json").write_text(json.dumps({"n_layer": 1, "bogus": 2}))
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["sample", "--out_dir", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
