"""Faults and hostile input in ``npgpt train`` (issue 18): a diverging run never replaces a good
checkpoint, a killed save or a full disk leaves the old one whole, one writer per out_dir, SIGTERM
exits cleanly with a resume hint, and every bad knob is one line on stderr with exit 2."""
import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import npgpt.checkpoint as checkpoint_module
from npgpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from npgpt.cli import main
from npgpt.train import TrainConfig, TrainingDiverged, train
from npgpt.run_dir import LOCK_NAME, OutDirLocked
from npgpt.train_helpers import init_or_resume, load_data, save_run, use_backend

from test_train import tiny_cfg

QUIET = dict(log=lambda *_: None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def good_run(tmp_path, **kw):
    """A finished tiny run of 10 steps (checkpoints at 5 and 10); returns its config."""
    cfg = tiny_cfg(tmp_path, max_iters=10, **kw)
    train(cfg, **QUIET)
    return cfg


def file_bytes(*paths):
    return [open(p, "rb").read() for p in paths]


def cli(capsys, *args):
    """(exit code, stderr lines) of ``npgpt train ARGS --progress=false --no_sample``."""
    rc = main(["train", *args, "--progress=false", "--no_sample"])
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def knobs(cfg, **kw):
    return [f"--data={cfg.data}", f"--out_dir={cfg.out_dir}", "--n_layer=2", "--n_head=2", "--n_embd=16",
            "--block_size=16", "--batch_size=4", "--eval_iters=2"] + [f"--{k}={v}" for k, v in kw.items()]


# ---- divergence ------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # overflow on the way to inf/nan
def test_a_huge_learning_rate_stops_the_run_and_keeps_the_good_checkpoints(tmp_path, capsys):
    cfg = good_run(tmp_path)
    ckpt, best = (os.path.join(cfg.out_dir, n) for n in ("ckpt.npz", "best.npz"))
    before = file_bytes(ckpt, best)
    rc, err = cli(capsys, *knobs(cfg, init_from="resume", learning_rate=1e3, grad_clip=0, eval_interval=10,
                                 max_iters=40, log_interval=1, warmup_iters=0, lr_decay_iters=40))
    assert rc == 1 and len(err) == 1 and "stopped without saving" in err[0] and "iteration 10" in err[0]
    assert file_bytes(ckpt, best) == before                                   # byte-identical
    assert all(np.isfinite(v).all() for v in load_checkpoint(ckpt)["model"].values())
    assert not os.path.exists(os.path.join(cfg.out_dir, LOCK_NAME))          # released on the error


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_nan_loss_stops_before_the_next_save(tmp_path, monkeypatch):
    """(thread_split=ops: the poisoned step is train_step, which replicas.py's threads do not call)"""
    cfg = good_run(tmp_path)
    before = file_bytes(os.path.join(cfg.out_dir, "ckpt.npz"))
    import npgpt.train as train_module
    real = train_module.train_step

    def poisoned(opt, loss_fn, steps):
        loss = real(opt, loss_fn, steps)
        opt.master[...] = np.nan                      # the weights turn nan after this step
        return loss
    monkeypatch.setattr(train_module, "train_step", poisoned)
    with pytest.raises(TrainingDiverged, match="not finite|nan"):
        train(tiny_cfg(tmp_path, init_from="resume", max_iters=20, log_interval=100, thread_split="ops"), **QUIET)
    assert file_bytes(os.path.join(cfg.out_dir, "ckpt.npz")) == before


def test_save_run_refuses_non_finite_weights(tmp_path):
    cfg = tiny_cfg(tmp_path, max_iters=0)
    use_backend(cfg)
    meta, _ = load_data(cfg)
    os.makedirs(cfg.out_dir)
    cfg, model, opt, *_, batch_rng = init_or_resume(cfg, meta, QUIET["log"])
    opt.master[:3] = np.inf
    with pytest.raises(TrainingDiverged):
        save_run(cfg, model, opt, meta, 1, 1.0, {"train": 1.0, "val": 1.0}, batch_rng)
    assert os.listdir(cfg.out_dir) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_knobs_are_refused(tmp_path, capsys, value):
    cfg = tiny_cfg(tmp_path)
    for knob in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
        rc, err = cli(capsys, *knobs(cfg, **{knob: value}))
        assert rc == 2 and len(err) == 1 and knob in err[0]
    assert not os.path.exists(cfg.out_dir)


# ---- killed saves, full disks, garbage files ----------------------------------------------------------

SLOW_SAVE = """
import sys, time
import numpy as np
def slow(f, **arrays):
    f.write(b"PK partial")
    f.flush()
    print("SAVING", flush=True)
    time.sleep(60)
np.savez = slow
from npgpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_a_save_leaves_the_old_checkpoint_and_the_next_run_cleans_up(tmp_path):
    cfg = good_run(tmp_path)
    ckpt = os.path.join(cfg.out_dir, "ckpt.npz")
    before = file_bytes(ckpt)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "train", *knobs(cfg, init_from="resume", max_iters=15,
                                                                              eval_interval=5),
                             "--progress=false", "--no_sample"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        for line in proc.stdout:                                                # wait for the save
            if "SAVING" in line:
                break
        proc.kill()                                                              # kill -9 mid-save
        proc.wait(10)
    finally:
        proc.kill()
    assert file_bytes(ckpt) == before and load_checkpoint(ckpt)["iter_num"] == 10
    assert glob.glob(os.path.join(cfg.out_dir, ".tmp-*.npz"))                  # the orphan
    said = []
    train(tiny_cfg(tmp_path, init_from="resume", max_iters=15), log=said.append)   # the stale lock, the orphan
    assert any("stale lock" in s for s in said) and any("temporary file" in s for s in said)
    assert not glob.glob(os.path.join(cfg.out_dir, ".tmp-*.npz"))
    assert load_checkpoint(ckpt)["iter_num"] == 15


def test_a_full_disk_is_one_line_and_keeps_the_old_checkpoint(tmp_path, capsys, monkeypatch):
    cfg = good_run(tmp_path)
    ckpt = os.path.join(cfg.out_dir, "ckpt.npz")
    before = file_bytes(ckpt)

    def full(f, **arrays):
        f.write(b"PK some bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint_module.np, "savez", full)
    rc, err = cli(capsys, *knobs(cfg, init_from="resume", max_iters=15, eval_interval=5))
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0] and "intact" in err[0]
    monkeypatch.undo()
    assert file_bytes(ckpt) == before
    assert not glob.glob(os.path.join(cfg.out_dir, ".tmp-*"))
    with pytest.raises(CheckpointError, match="No space"):
        monkeypatch.setattr(checkpoint_module.np, "savez", full)
        save_checkpoint(str(tmp_path / "x.npz"), {"w": np.ones(2)})


def test_garbage_is_not_an_npgpt_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a zip/npz file") as e:
        load_checkpoint(str(path))
    assert "pickle" not in str(e.value)


# ---- one writer per out_dir, no silent overwrite ---------------------------------------------------------

def test_a_held_lock_refuses_a_second_writer_and_a_stale_one_is_replaced(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, max_iters=5)
    os.makedirs(cfg.out_dir)
    lock = os.path.join(cfg.out_dir, LOCK_NAME)
    import socket
    with open(lock, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)       # a live writer: this process
    rc, err = cli(capsys, *knobs(cfg, max_iters=5))
    assert rc == 2 and len(err) == 1 and "in use by another npgpt train" in err[0] and str(os.getpid()) in err[0]
    with pytest.raises(OutDirLocked):
        train(cfg, **QUIET)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(lock, "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname()}, f)          # its process is gone
    said = []
    train(cfg, log=said.append)
    assert any("stale lock" in s for s in said) and not os.path.exists(lock)


def test_a_new_run_does_not_overwrite_a_checkpoint_without_overwrite(tmp_path, capsys):
    cfg = good_run(tmp_path)
    before = file_bytes(os.path.join(cfg.out_dir, "ckpt.npz"))
    rc, err = cli(capsys, *knobs(cfg, max_iters=5))
    assert rc == 2 and len(err) == 1 and "--overwrite," in err[0] and "--init_from=resume" in err[0]
    assert file_bytes(os.path.join(cfg.out_dir, "ckpt.npz")) == before
    rc, _ = cli(capsys, *knobs(cfg, max_iters=5), "--overwrite")             # a bare flag, as elsewhere
    assert rc == 0 and load_checkpoint(os.path.join(cfg.out_dir, "ckpt.npz"))["iter_num"] == 5


# ---- SIGTERM --------------------------------------------------------------------------------------

def test_sigterm_exits_cleanly_with_a_resume_hint(tmp_path):
    cfg = tiny_cfg(tmp_path)
    ckpt = os.path.join(cfg.out_dir, "ckpt.npz")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from npgpt.cli import main; sys.exit(main())",
                             "train", *knobs(cfg, max_iters=100000, eval_interval=5, lr_decay_iters=100000),
                             "--progress=false", "--no_sample"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        deadline = time.time() + 60                                          # generous on a busy machine
        while not os.path.exists(ckpt) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert os.path.exists(ckpt), proc.poll()
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, out[-2000:], err[-2000:])
    assert "interrupted at iteration" in out and "--init_from=resume" in out and "Traceback" not in err
    assert load_checkpoint(ckpt)["iter_num"] >= 5
    assert not glob.glob(os.path.join(cfg.out_dir, ".tmp-*")) and not os.path.exists(
        os.path.join(cfg.out_dir, LOCK_NAME))


# ---- bad knobs: one line, exit 2, no traceback, no empty folder ------------------------------------------

@pytest.mark.parametrize("bad", [
    dict(block_size=0), dict(block_size=-5), dict(block_size=100000), dict(n_head=3), dict(dropout=1.5),
    dict(pos="rotary"), dict(weight_decay=-1), dict(beta1=2), dict(grad_clip=-1), dict(seed=-1), dict(min_lr=-1),
    dict(learning_rate=0), dict(max_iters="true"), dict(n_layer=0)])
def test_bad_knobs_are_one_line(tmp_path, capsys, bad):
    cfg = tiny_cfg(tmp_path)
    rc, err = cli(capsys, *knobs(cfg, **bad))
    assert rc == 2 and len(err) == 1 and err[0].startswith("npgpt train: error:"), err
    assert next(iter(bad)) in err[0] or "block_size + 1" in err[0]
    assert not os.path.exists(cfg.out_dir)                                   # no empty folder left


def test_empty_out_dir_and_bad_config_files(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    rc, err = cli(capsys, f"--data={cfg.data}", "--out_dir=")
    assert rc == 2 and len(err) == 1 and "out_dir" in err[0]
    for name, text, needle in [("list.json", "[1, 2]", "list"), ("bool.json", '{"max_iters": true}', "max_iters"),
                               ("broken.json", '{"max_iters": ', "JSON"),
                               ("str.json", '{"dropout": [0.1]}', "dropout")]:
        (tmp_path / name).write_text(text)
        rc, err = cli(capsys, f"--config={tmp_path / name}", *knobs(cfg))
        assert rc == 2 and len(err) == 1 and needle in err[0], (name, err)
    assert TrainConfig(max_iters=5.0).max_iters == 5 and TrainConfig(learning_rate=1).learning_rate == 1.0
    assert TrainConfig(out_dir=tmp_path / "o").out_dir == str(tmp_path / "o")          # a Path is fine


# ---- resume: the data, the architecture and the optimizer knobs ----------------------------------------

def test_resume_on_data_of_another_vocabulary_is_one_error_naming_both(tmp_path, capsys):
    cfg = good_run(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    ids = np.arange(400, dtype=np.uint16) % 5
    ids[:360].tofile(other / "train.bin")
    ids[360:].tofile(other / "val.bin")
    (other / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": 5, "chars": list("abcde"),
                                                 "dtype": "uint16", "train_tokens": 360, "val_tokens": 40}))
    before = file_bytes(os.path.join(cfg.out_dir, "ckpt.npz"))
    rc, err = cli(capsys, *knobs(cfg, init_from="resume", max_iters=15, data=str(other)))
    assert rc == 2 and len(err) == 1 and cfg.data in err[0] and str(other) in err[0] and "fingerprint" in err[0]
    assert file_bytes(os.path.join(cfg.out_dir, "ckpt.npz")) == before
    assert "vocab_fingerprint" in load_checkpoint(os.path.join(cfg.out_dir, "ckpt.npz"))


def test_resume_takes_the_architecture_from_the_checkpoint_and_refuses_a_change(tmp_path, capsys):
    cfg = good_run(tmp_path)
    rc, err = cli(capsys, *knobs(cfg, init_from="resume", max_iters=15, n_layer=3))
    assert rc == 2 and len(err) == 1 and "--n_layer=3" in err[0] and "the checkpoint's: 2" in err[0]
    rc, err = cli(capsys, *knobs(cfg, init_from="resume", max_iters=8))
    assert rc == 2 and "--max_iters=8 is below" in err[0]
    # block_size, n_layer, n_embd... left out: the checkpoint's (the default block_size 64 used to crash)
    r = train(TrainConfig(data=cfg.data, out_dir=cfg.out_dir, init_from="resume", max_iters=12, batch_size=4,
                          eval_iters=2, eval_interval=5, progress=False), **QUIET)
    assert r["iter"] == 12
    saved = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.npz"))
    assert saved["train_config"]["block_size"] == 16 and saved["train_config"]["n_layer"] == 2


def test_resume_applies_changed_optimizer_knobs(tmp_path):
    good_run(tmp_path)
    said = []
    new = tiny_cfg(tmp_path, init_from="resume", max_iters=15, weight_decay=0.05, beta1=0.8, beta2=0.95,
                   dropout=0.1)
    use_backend(new)
    meta, _ = load_data(new)
    new, model, opt, start, *_ = init_or_resume(new, meta, said.append)
    assert start == 10 and model.config.dropout == 0.1
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["betas"] == (0.8, 0.95) for g in opt.param_groups)
    assert any("weight_decay 0.1 -> 0.05" in s for s in said)


def test_plot_skips_a_cut_off_last_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"iter": 0, "train_loss": 3.0, "val_loss": 3.1, "time": 0}\n'
                                   '{"iter": 5, "loss": 2.5, "lr": 0.001}\n{"iter": 10, "lo')
    assert main(["plot", "--out_dir", str(out)]) == 0
    assert "skipped 1 unreadable line" in capsys.readouterr().err and (out / "loss.png").exists()


def test_two_runs_started_together_prepare_the_default_data_once(tmp_path):
    """Two processes that find the default data missing at the same moment: one prepares it, the other
    waits for it (a lock beside the directory), and both read the same files."""
    target = str(tmp_path / "data" / "shakespeare_char")
    code = ("import sys, json; from npgpt.data import ensure_prepared; "
            "print(json.dumps(ensure_prepared(sys.argv[1])['vocab_size']))")
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", code, target], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    vocab = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(vocab) == 1
    assert sum("preparing" in out for out, _ in outs) == 1
    assert not os.path.exists(target + ".lock")
    meta = json.load(open(os.path.join(target, "meta.json")))
    assert str(meta["vocab_size"]) in vocab
