"""Optimizer checkpoints written before the optimizers became ``npgpt/optim/`` (2026-11-29) still
load: the moments and steps land where the file says, and the next step is the one the old code
took. The files and the script that wrote them (against the old tree) are in tests/data/."""
from pathlib import Path

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, backend
from npgpt.checkpoint import load_checkpoint, save_checkpoint

DATA = Path(__file__).parent / "data"


def _load(name):
    ckpt = load_checkpoint(DATA / f"ckpt_2026-11-29_{name}.npz")
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return ckpt, model


def _flat_optimizer(model, ckpt):
    return model.configure_optimizer(ckpt["lr"], 0.1, (0.9, 0.95), flat=True, dtype=ckpt["dtype"],
                                     max_grad_norm=1.0)


def _in_group_order(model, opt):
    """(name, parameter) in the optimizer's order: the order of its state dicts."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for g in opt.param_groups for p in g["params"]]


def _assert_weights(model_state, expected):
    for name, w in expected.items():
        np.testing.assert_array_equal(backend.to_numpy(model_state[name]), w, err_msg=name)


def test_old_per_parameter_adamw_checkpoint_loads_and_steps_as_before():
    ckpt, model = _load("adamw")
    opt = model.configure_optimizer(ckpt["lr"], 0.1, (0.9, 0.95))
    opt.load_state_dict(ckpt["optimizer"])
    saved = ckpt["optimizer"]["state"]
    assert opt.step_count == 3
    for (name, p), s in zip(_in_group_order(model, opt), saved):
        state = opt.state[id(p)]
        assert state["step"] == (2 if name == "transformer.h.0.ln_1.bias" else 3), name   # it missed a step
        for k in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(backend.to_numpy(state[k]), s[k], err_msg=name)
    for name, p in model.named_parameters():
        p.grad = backend.to_device(ckpt["next_grads"][name].copy())
    opt.step()
    _assert_weights(model.state_dict(), ckpt["next_model"])


@pytest.mark.parametrize("name", ["flat", "flat_fp16"])
def test_old_flat_checkpoint_loads_and_steps_as_before(name):
    ckpt, model = _load(name)
    opt = _flat_optimizer(model, ckpt)
    saved = ckpt["optimizer"]
    opt.load_state_dict(saved)
    assert opt.step_count == saved["step"] == 4
    assert int(opt._t) == saved["t"] == (3 if name == "flat_fp16" else 4)     # fp16: one step skipped
    assert opt.loss_scale == saved["scaler"]["scale"] and opt.skipped_steps == saved["scaler"]["skipped"]
    assert int(opt._good) == saved["scaler"]["good"]
    np.testing.assert_array_equal(backend.to_numpy(opt.exp_avg), saved["exp_avg"])
    np.testing.assert_array_equal(backend.to_numpy(opt.exp_avg_sq), saved["exp_avg_sq"])
    for n, p in model.named_parameters():
        p.grad[...] = backend.to_device(ckpt["next_grads"][n])      # as the old backward left them
    opt.step()
    _assert_weights(opt.master_state_dict(model), ckpt["next_model"])
    assert opt.state_dict()["scaler"]["scale"] == (512.0 if name == "flat_fp16" else 1.0)


def test_old_flat_checkpoint_loads_into_per_parameter_adamw():
    ckpt, model = _load("flat")
    opt = model.configure_optimizer(ckpt["lr"], 0.1, (0.9, 0.95))
    opt.load_state_dict(ckpt["optimizer"])
    saved, start = ckpt["optimizer"], 0
    for n, p in _in_group_order(model, opt):
        state = opt.state[id(p)]
        assert state["step"] == saved["t"]
        for k in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(backend.to_numpy(state[k]).reshape(-1), saved[k][start:start + p.size],
                                          err_msg=n)
        start += p.size
    assert start == saved["exp_avg"].size


def test_old_per_parameter_checkpoint_loads_into_flat_adamw():
    ckpt, model = _load("adamw")
    opt = model.configure_optimizer(ckpt["lr"], 0.1, (0.9, 0.95), flat=True)
    opt.load_state_dict(ckpt["optimizer"])
    saved = ckpt["optimizer"]["state"]
    assert int(opt._t) == 3 and opt.step_count == 3
    for k in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(backend.to_numpy(getattr(opt, k)),
                                      np.concatenate([s[k].reshape(-1) for s in saved]))


@pytest.mark.parametrize("kind", ["adamw", "flat"])
def test_todays_state_dicts_share_one_format(kind, tmp_path):
    """AdamW and FlatAdamW write the same per-parameter format, so each loads the other's."""
    ckpt, model = _load("adamw" if kind == "adamw" else "flat")
    opt = (model.configure_optimizer(ckpt["lr"], 0.1, (0.9, 0.95)) if kind == "adamw"
           else _flat_optimizer(model, ckpt))
    opt.load_state_dict(ckpt["optimizer"])
    sd = opt.state_dict()
    assert set(sd) >= {"step", "param_groups", "state"} and len(sd["state"]) == len(list(model.parameters()))
    save_checkpoint(tmp_path / "opt.npz", {"optimizer": sd})
    sd = load_checkpoint(tmp_path / "opt.npz")["optimizer"]
    _, other_model = _load("adamw")
    other = (other_model.configure_optimizer(ckpt["lr"], 0.1, (0.9, 0.95), flat=True) if kind == "adamw"
             else other_model.configure_optimizer(ckpt["lr"], 0.1, (0.9, 0.95)))
    other.load_state_dict(sd)
    round_trip = other.state_dict()
    for a, b in zip(sd["state"], round_trip["state"]):
        if kind == "adamw":          # FlatAdamW holds one t: the parameter that missed a step takes it
            a = {**a, "step": max(s.get("step", 0) for s in sd["state"])}
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k])
