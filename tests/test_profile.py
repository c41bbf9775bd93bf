"""The profiler: rows that add up to the step, FLOPs by the formulas, the command, MFU in the log."""
import json
import statistics
from types import SimpleNamespace

import numpy as np
import pytest

from npgpt import backend
from npgpt.checkpoint import save_checkpoint
from npgpt.cli import main
from npgpt.engine import Tensor
from npgpt.model import GPT, GPTConfig
from npgpt.nn import Module
from npgpt.profiler import Profiler, gemm_probe, peak_flops, profile_steps
from npgpt.train import TrainConfig
from npgpt.train_helpers import RunLog, make_optimizer

B, T, C, NH, L, V = 4, 32, 64, 2, 2, 40
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=2", "--steps=2"]


def tiny_run(xp, steps=3):
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=NH, n_embd=C))
    opt = make_optimizer(model.parameters(), 1e-3, 0.1, (0.9, 0.99), grad_clip=1.0)
    rng = np.random.default_rng(0)

    def batch():
        ids = backend.to_device(rng.integers(0, V, (B, T + 1)))
        return ids[:, :-1], ids[:, 1:]
    return model, profile_steps(model, opt, batch, steps=steps)


def test_rows_add_up_to_the_profiled_step(xp):
    _, report = tiny_run(xp)
    for rows, wall, overhead in zip(report.profiled_steps, report.walls, report.overheads):
        every_row = sum(r.seconds for r in rows.values())
        assert every_row + overhead == pytest.approx(wall, rel=1e-6)     # the regions tile the step
    # the op rows (all but "other": the forward's tail, the backward's graph walk) cover the step
    coverage = statistics.median(sum(r.seconds for r in rows.values() if r.is_op) / (wall - overhead)
                                 for rows, wall, overhead in
                                 zip(report.profiled_steps, report.walls, report.overheads))
    assert 0.9 <= coverage <= 1.0 + 1e-9
    assert report.op_sum_s > 0 and report.step_s > 0 and report.ratio > 0


def test_rows_name_layers_and_ops_and_count_flops_by_the_formulas(xp):
    model, report = tiny_run(xp, steps=1)
    rows = {(r.layer, r.op): r for r in report.rows}
    c_attn = rows[("h.0.attn.c_attn", "linear")]
    assert (c_attn.calls, c_attn.fwd_flops, c_attn.bwd_flops) == (1, 2 * B * T * C * 3 * C, 4 * B * T * C * 3 * C)
    attention = rows[("h.1.attn", "attention")]
    assert attention.fwd_flops == 4 * B * NH * T * T * (C // NH) and attention.bwd_flops == 2 * attention.fwd_flops
    lm_head = rows[("GPT", "linear")]
    assert lm_head.fwd_flops == 2 * B * T * C * V
    assert rows[("h.0.attn", "getitem")].calls == 3                    # q, k, v
    assert rows[("h.0", "add")].calls == 2                             # the two residuals
    for key in [("wte", "embedding"), ("h.0.mlp", "gelu"), ("GPT", "cross_entropy"), ("optimizer", "step"),
                ("optimizer", "zero_grad"), ("data", "batch")]:
        assert key in rows, key
    assert all(r.fwd_s >= 0 and r.bwd_s >= 0 for r in report.rows if r.is_op)
    # bytes: inputs read + output written, forward; the linear moves x, W, b and y
    x_bytes, w_bytes, b_bytes, y_bytes = 4 * B * T * C, 4 * C * 3 * C, 4 * 3 * C, 4 * B * T * 3 * C
    assert c_attn.fwd_bytes == x_bytes + w_bytes + b_bytes + y_bytes
    assert report.mfu == pytest.approx(model.estimate_flops_per_token() * B * T / report.step_s / report.peak)
    text = report.table("share") + report.by_op() + report.summary()
    assert "h.0.attn.c_attn" in text and "sum of the op times" in text and "MFU" in text


def test_profiler_puts_the_functions_back():
    call, from_op = Module.__dict__["__call__"], Tensor.__dict__["from_op"]
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=NH, n_embd=C))
    with pytest.raises(RuntimeError):
        with Profiler(model):
            assert Module.__dict__["__call__"] is not call
            raise RuntimeError("boom")
    assert Module.__dict__["__call__"] is call and Tensor.__dict__["from_op"] is from_op
    # outside a region nothing is recorded and gradients are unchanged
    a = Tensor(np.ones(3, np.float32), requires_grad=True)
    with Profiler(model) as prof:
        (a * 2.0).sum().backward()
    assert prof.steps == [] and np.array_equal(a.grad, np.full(3, 2.0, np.float32))


def test_peak_is_measured_once_and_leaves_the_random_streams_alone():
    backend.seed(5)
    state = backend.rng().bit_generator.state
    np_state = np.random.get_state()[1].copy()
    assert gemm_probe("float32", n=64, repeats=2) > 0
    peak, source = peak_flops("float32")
    assert peak > 0 and "GEMM" in source and peak_flops("float32")[0] == peak   # cached
    assert backend.rng().bit_generator.state == state and np.array_equal(np.random.get_state()[1], np_state)


def test_command_on_a_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # no data/shakespeare_char/meta.json: vocab 65
    assert main(["profile", *TINY, "--sort", "share"]) == 0
    out = capsys.readouterr().out
    for text in ["h.0.attn.c_attn", "linear", "attention", "optimizer", "per op over all layers",
                 "sum of the op times", "measured step", "ratio", "MFU", "config (vocab 65"]:
        assert text in out, text


def _tiny_checkpoint(tmp_path):
    """An out_dir with a ckpt.npz as ``npgpt train`` writes it (the fields profile reads)."""
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=NH, n_embd=C))
    save_checkpoint(str(tmp_path / "ckpt.npz"), {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                                 "train_config": {"batch_size": 3}})
    return str(tmp_path)


def test_command_on_a_checkpoint(tmp_path, capsys):
    out_dir = _tiny_checkpoint(tmp_path)
    assert main(["profile", "--out_dir", out_dir, "--steps=1"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "h.1.attn.c_proj" in out and f"batch 3 x {T} tokens" in out   # its run's batch
    assert main(["profile", "--out_dir", out_dir, "--steps=1", "--batch_size=2", "--block_size=8"]) == 0
    assert "batch 2 x 8 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--out_dir", "no-such-dir"], "no checkpoint"),
    (["--n_layer=0"], "n_layer"),
    (["--no_such_key=1"], "unknown key"),
    (["--steps=0"], "--steps"),
    (["--vocab_size", "0"], "--vocab_size"),
    (["--config", "missing.toml"], "not found"),
])
def test_command_errors_are_one_clear_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("npgpt profile: error:") and message in err


def test_command_refuses_to_reshape_a_checkpoint(tmp_path, capsys):
    out_dir = _tiny_checkpoint(tmp_path)
    assert main(["profile", "--out_dir", out_dir, "--n_layer=3"]) == 2
    assert "fixes the model" in capsys.readouterr().err
    assert main(["profile", "--out_dir", out_dir, "--block_size=64"]) == 2
    assert "exceeds" in capsys.readouterr().err


def test_run_log_writes_mfu(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), log_interval=1, max_iters=1, progress=False)
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=NH, n_embd=C))
    run_log = RunLog(cfg, 0, print, model)
    opt = SimpleNamespace(grad_norm=0.5, mixed=False)
    run_log.step(1, Tensor(np.float32(2.0)), 1e-3, opt)
    run_log.close()
    record = json.loads(open(tmp_path / "log.jsonl").read())
    tokens_per_s = record["tokens_per_s"]
    assert record["mfu"] == pytest.approx(model.estimate_flops_per_token() * tokens_per_s / peak_flops("float32")[0])
    no_model = RunLog(cfg, 0, print)                 # without a model: no MFU, as before
    no_model.step(1, Tensor(np.float32(2.0)), 1e-3, opt)
    no_model.close()
    assert "mfu" not in json.loads(open(tmp_path / "log.jsonl").read().splitlines()[-1])


def test_command_without_a_gpu_says_how_to_get_one(capsys):
    if backend.is_cupy_available():
        pytest.skip("a GPU is present")
    assert main(["profile", "--device=cuda"]) == 2
    assert "CuPy" in capsys.readouterr().err
