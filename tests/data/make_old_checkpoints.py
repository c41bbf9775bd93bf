"""Write the optimizer checkpoints of tests/test_optim_checkpoints.py with the code as it was on
2026-11-29, before the optimizers became the package ``npgpt/optim/`` (commit 39bd1a1).

Run it against that tree (the imports below no longer exist afterwards)::

    cd <checkout of 39bd1a1> && PYTHONPATH=. python <this repo>/tests/data/make_old_checkpoints.py <this repo>/tests/data

Each file holds a tiny GPT's weights, its optimizer's state dict in the format of that day, the
gradients of one more step and the weights the old code computed from them, so a test can check
that today's code loads the state and takes the same step.
"""
import sys
from pathlib import Path

import numpy as np

from npgpt import GPT, GPTConfig, backend
from npgpt.checkpoint import save_checkpoint

CONFIG = dict(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0)
LR = 3e-3


def batch(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))


def model():
    backend.seed(0)
    return GPT(GPTConfig(**CONFIG))


def per_parameter_adamw(out):
    """The per-parameter AdamW of configure_optimizer; the layer-norm bias of block 0 misses one step."""
    m = model()
    opt = m.configure_optimizer(LR, 0.1, (0.9, 0.95))
    names = dict((id(p), n) for n, p in m.named_parameters())
    for s in range(3):
        _, loss = m(*batch(s))
        loss.backward()
        if s == 1:
            for n, p in m.named_parameters():
                if n == "transformer.h.0.ln_1.bias":
                    p.grad = None
        opt.step()
        opt.zero_grad()
    state, weights = opt.state_dict(), m.state_dict()
    _, loss = m(*batch(3))
    loss.backward()
    grads = {names[id(p)]: p.grad.copy() for p in m.parameters()}
    opt.step()
    save_checkpoint(out / "ckpt_2026-11-29_adamw.npz", {
        "config": CONFIG, "lr": LR, "model": weights, "optimizer": state,
        "next_grads": grads, "next_model": m.state_dict()})


def flat_adamw(out, dtype):
    """FlatAdamW (clipping at 1.0); in float16 with one skipped (inf) step, so the scaler has moved."""
    m = model()
    opt = m.configure_optimizer(LR, 0.1, (0.9, 0.95), flat=True, dtype=dtype, max_grad_norm=1.0,
                                **({"init_scale": 2.0 ** 10} if dtype else {}))
    for s in range(4):
        _, loss = m(*batch(s))
        opt.backward(loss)
        if dtype and s == 2:
            opt.flat.grad[3] = np.inf
        opt.step()
        opt.zero_grad()
    state, weights = opt.state_dict(), opt.master_state_dict(m)
    _, loss = m(*batch(4))
    opt.backward(loss)
    grads = {n: p.grad.copy() for n, p in m.named_parameters()}    # as backward left them (scaled)
    opt.step()
    name = "flat_fp16" if dtype else "flat"
    save_checkpoint(out / f"ckpt_2026-11-29_{name}.npz", {
        "config": CONFIG, "lr": LR, "dtype": dtype, "model": weights, "optimizer": state,
        "next_grads": grads, "next_model": opt.master_state_dict(m)})


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    per_parameter_adamw(out)
    flat_adamw(out, None)
    flat_adamw(out, "float16")
