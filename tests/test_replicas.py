"""Data parallelism over CPU threads (npgpt/replicas.py): the summed block gradients (R1)-(R2) equal one
pass over the whole batch, ignored targets weigh nothing, dropout masks follow the per-block seeds,
and the pieces it rests on (row blocks, serial kernels, BLAS thread limits, thread-local generators)."""
import threading

import numpy as np
import pytest
from hypothesis import given, strategies as st

import npgpt
from npgpt import backend
from npgpt.engine import Tensor
from npgpt.layers import _threads
from npgpt.layers.tuning import TUNING
from npgpt.replicas import ThreadReplicas, row_blocks
from npgpt.threads import blas_threads, get_threads, set_threads
from npgpt.train import TrainConfig, train

from test_train import make_char_data

V = 11


def pair(dropout=0.0, seed=0):
    """Two GPTs with equal weights, each with a flat AdamW: one for a plain pass, one for replicas."""
    backend.seed(seed)
    cfg = npgpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=V, dropout=dropout)
    a, b = npgpt.GPT(cfg), npgpt.GPT(cfg)
    b.load_state_dict(a.state_dict())
    make = lambda m: m.configure_optimizer(1e-3, 0.1, (0.9, 0.95), flat=True)
    return a, make(a), b, make(b)


def batch(B=5, T=8, seed=1):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    y[0, :6] = -100                          # blocks with different numbers of counted targets
    y[3] = -100
    return x, y


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_the_summed_block_gradients_are_the_whole_batch_gradient(f64, n):
    a, opt_a, b, opt_b = pair()
    x, y = batch()
    _, loss = a(x, y)
    opt_a.backward(loss * 0.5)
    with ThreadReplicas(b, opt_b, n) as rep:
        got = rep.forward_backward(x, y, scale=0.5)
        rep.reduce()
    assert isinstance(got, Tensor) and got.shape == ()
    np.testing.assert_allclose(got.item(), loss.item(), rtol=1e-13)
    np.testing.assert_allclose(opt_b.flat.grad, opt_a.flat.grad, rtol=1e-10, atol=1e-15)
    assert all(not g.any() for g in rep.grads[1:])              # zeroed once added


def test_gradient_accumulation_steps_and_the_optimizer_step(f64):
    a, opt_a, b, opt_b = pair()
    batches = [batch(seed=s) for s in (1, 2)]
    it = iter(batches)
    for x, y in batches:
        opt_a.backward(a(x, y)[1] * 0.5)
    opt_a.step()
    with ThreadReplicas(b, opt_b, 2) as rep:
        rep.train_step(lambda: next(it), accumulation_steps=2)
    np.testing.assert_allclose(opt_b.flat.data, opt_a.flat.data, rtol=1e-12, atol=1e-15)
    assert not opt_b.flat.grad.any()                            # zero_grad after the step


def test_every_target_ignored_gives_a_zero_loss_and_gradient(f64):
    a, opt_a, b, opt_b = pair()
    x, _ = batch()
    y = np.full_like(x, -100)
    with ThreadReplicas(b, opt_b, 2) as rep:
        assert rep.forward_backward(x, y).item() == a(x, y)[1].item() == 0.0
        rep.reduce()
        assert rep.loss(x, y) == 0.0
    assert not opt_b.flat.grad.any()


def test_dropout_masks_come_from_one_seed_per_block(f64):
    """Oracle: the blocks run one after the other on the plain model, each under a Generator of the
    seed the replicas draw for it from backend.rng()."""
    a, opt_a, b, opt_b = pair(dropout=0.3)
    x, y = batch(B=4)
    backend.seed(7)
    seeds = backend.rng().integers(0, 2 ** 63, size=2)
    w = [(y[lo:hi] != -100).sum() / (y != -100).sum() for lo, hi in row_blocks(4, 2)]
    for (lo, hi), s, wb in zip(row_blocks(4, 2), seeds, w):
        with backend.thread_rng(np.random.default_rng(s)):
            opt_a.backward(a(x[lo:hi], y[lo:hi])[1] * wb)
    backend.seed(7)
    with ThreadReplicas(b, opt_b, 2) as rep:
        rep.forward_backward(x, y)
        rep.reduce()
    np.testing.assert_allclose(opt_b.flat.grad, opt_a.flat.grad, rtol=1e-10, atol=1e-15)


def test_evaluation_follows_the_models_mode(f64):
    a, _, b, opt_b = pair(dropout=0.5)
    x, y = batch()
    a.eval(), b.eval()
    with ThreadReplicas(b, opt_b, 3) as rep:
        np.testing.assert_allclose(rep.loss(x, y), a(x, y)[1].item(), rtol=1e-13)
        assert all(not r.training for r in rep.replicas)
        b.train()
        rep.forward_backward(x, y)
        assert all(r.training for r in rep.replicas)


def test_replicas_share_the_weights_the_optimizer_updates(f64):
    _, _, b, opt_b = pair()
    with ThreadReplicas(b, opt_b, 2) as rep:
        rep.train_step(lambda: batch())
        for p, q in zip(b.parameters(), rep.replicas[1].parameters()):
            assert p is not q and p.data is q.data
            assert np.shares_memory(q.grad, rep.grads[1])


def test_bad_arguments_are_refused(f64):
    a, opt_a, _, _ = pair()
    with pytest.raises(ValueError, match="n >= 2"):
        ThreadReplicas(a, opt_a, 1)
    with pytest.raises(TypeError, match="flat=True"):
        ThreadReplicas(a, a.configure_optimizer(1e-3, 0.1, (0.9, 0.95)), 2)
    with pytest.raises(ValueError, match="thread_split"):
        TrainConfig(thread_split="rows")


@given(B=st.integers(1, 40), n=st.integers(1, 9))
def test_row_blocks_cover_the_rows_evenly(B, n):
    blocks = row_blocks(B, n)
    assert len(blocks) == min(B, n) and blocks[0][0] == 0 and blocks[-1][1] == B
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(blocks, blocks[1:]))
    sizes = [hi - lo for lo, hi in blocks]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_serial_runs_the_kernel_in_the_calling_thread(monkeypatch):
    monkeypatch.setitem(TUNING["numpy"], "threads", 2)
    seen = []
    x = np.zeros(1 << 19, np.float32)
    kernel = lambda a: seen.append(threading.current_thread())
    _threads.run_chunked(kernel, x)
    assert len(seen) == 2 and threading.current_thread() not in seen   # the pool's two threads
    seen.clear()
    with _threads.serial():
        _threads.run_chunked(kernel, x)
    assert seen == [threading.current_thread()]


def test_blas_threads_is_restored():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    count = lambda: [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    before = count()
    with blas_threads(1):
        assert set(count()) <= {1}
    assert count() == before


def test_thread_rng_is_this_threads_own():
    mine, others = np.random.default_rng(1), []
    with backend.thread_rng(mine):
        t = threading.Thread(target=lambda: others.append(backend.rng()))
        t.start(), t.join()
        assert backend.rng() is mine
    assert others[0] is not mine and backend.rng() is not mine


def test_a_run_with_replicas_matches_one_without(tmp_path):
    """float64, so the two runs may differ only by the order of additions."""
    data = make_char_data(str(tmp_path / "data"))
    before, logs, runs = get_threads(), {"batch": [], "ops": []}, {}
    try:
        for split in logs:
            runs[split] = train(TrainConfig(data=data, out_dir=str(tmp_path / split), n_layer=2, n_head=2, n_embd=16,
                                            block_size=16, batch_size=4, max_iters=12, lr_decay_iters=12,
                                            warmup_iters=2, eval_interval=6, eval_iters=2, log_interval=1,
                                            progress=False, dtype="float64", threads=2, thread_split=split),
                                log=logs[split].append)
    finally:
        set_threads(before or 1)
    said = lambda split: any("block of a batch's rows" in line for line in logs[split])
    assert said("batch") and not said("ops")
    np.testing.assert_allclose(runs["batch"]["losses"], runs["ops"]["losses"], rtol=1e-9)
    np.testing.assert_allclose(runs["batch"]["val_loss"], runs["ops"]["val_loss"], rtol=1e-9)


def test_an_error_in_a_worker_thread_reaches_the_caller(f64):
    _, _, b, opt_b = pair()
    x, y = batch(B=4)
    y[3, 0] = V + 5                                             # out of range, in the second thread's block
    with ThreadReplicas(b, opt_b, 2) as rep:
        with pytest.raises(ValueError, match="targets must lie in"):
            rep.forward_backward(x, y)
