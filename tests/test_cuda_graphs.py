"""CUDA Graphs for training (``npgpt.cuda_graphs``): the switch everywhere; on a GPU only, a replayed
micro-step gives the eager step's loss and gradients, follows new batches, the loss scale and the
learning rate schedule, and draws fresh dropout masks."""
import numpy as np
import pytest

from npgpt import GPT, GPTConfig, backend, cuda_graphs
from npgpt.train import TrainConfig, train
from test_train import tiny_cfg


def test_switch():
    assert cuda_graphs.AUTO is False                             # off until measured on a GPU
    assert not cuda_graphs.use_graphs("off", "cupy")
    assert not cuda_graphs.use_graphs("auto", "cupy")
    assert cuda_graphs.use_graphs("on", "cupy")
    assert not cuda_graphs.use_graphs("auto", "numpy")
    assert not cuda_graphs.use_graphs("off", "numpy")
    with pytest.raises(ValueError, match="device=cuda"):
        cuda_graphs.use_graphs("on", "numpy")
    with pytest.raises(ValueError, match="cuda_graphs"):
        cuda_graphs.use_graphs("sometimes", "cupy")


def test_auto_follows_the_flag(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "AUTO", True)
    assert cuda_graphs.use_graphs("auto", "cupy") and not cuda_graphs.use_graphs("auto", "numpy")


def test_train_config_refuses_graphs_on_the_cpu():
    with pytest.raises(ValueError, match="cuda_graphs=on needs device=cuda"):
        TrainConfig(device="cpu", cuda_graphs="on")
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        TrainConfig(cuda_graphs="yes")
    assert TrainConfig().cuda_graphs == "auto"


def test_numpy_training_is_unchanged_by_the_knob(tmp_path):
    """On the CPU "auto" and "off" are the same run, loss for loss."""
    a = train(tiny_cfg(tmp_path / "a", max_iters=4, cuda_graphs="auto"), log=lambda *_: None)
    b = train(tiny_cfg(tmp_path / "b", max_iters=4, cuda_graphs="off"), log=lambda *_: None)
    assert a["losses"] == b["losses"]


def test_graphed_step_refuses_numpy():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    opt = model.configure_optimizer(flat=True)
    x = np.zeros((2, 8), np.int64)
    with pytest.raises(ValueError, match="CuPy"):
        cuda_graphs.GraphedMicroStep(model, opt, 1, x, x)


# ---- on a GPU ------------------------------------------------------------------------------------

@pytest.fixture
def cp():
    if not backend.is_cupy_available():
        pytest.skip("cupy backend: CuPy or a CUDA GPU is not available")
    old, old_dtype = backend.name, backend.get_default_dtype()
    mod = backend.use("cupy")
    try:
        yield mod
    finally:
        backend.use(old)
        backend.set_default_dtype(old_dtype)


def _pair(cp, dtype, dropout=0.0):
    """Two identical models with identical flat optimizers (fp16 mixed precision or float32)."""
    out = []
    for _ in range(2):
        backend.seed(0)
        model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=dropout,
                              vocab_multiple=64))
        out.append((model, model.configure_optimizer(1e-3, 0.1, dtype=dtype, max_grad_norm=1.0)))
    return out


@pytest.mark.cupy
@pytest.mark.parametrize("dtype", ["float16", None])
def test_replay_equals_eager_steps(cp, dtype):
    """Five steps with a changing learning rate: graphed (2 micro-batches each) and eager give the same
    losses and weights, up to the ordering-free rounding of identical kernels (exactly, in practice)."""
    (m_eager, o_eager), (m_graph, o_graph) = _pair(cp, dtype)
    rng = np.random.default_rng(0)
    batches = [tuple(cp.asarray(rng.integers(0, 50, (4, 16))) for _ in range(2)) for _ in range(10)]
    it_eager, it_graph = iter(batches), iter(batches)
    step = cuda_graphs.graphed_train_step("on", m_graph, o_graph, lambda: next(it_graph), 2)
    for i in range(5):
        lr = 1e-3 * (i + 1)
        o_eager.set_lr(lr)
        o_graph.set_lr(lr)
        for _ in range(2):
            x, y = next(it_eager)
            last = m_eager(x, y)[1]
            o_eager.backward(last * 0.5)
        o_eager.step()
        o_eager.zero_grad()
        loss = step()
        np.testing.assert_allclose(float(loss.data), float(last.data), rtol=1e-2)
    for (name, a), (_, b) in zip(m_eager.named_parameters(), m_graph.named_parameters()):
        np.testing.assert_allclose(backend.to_numpy(a.data).astype(np.float32),
                                   backend.to_numpy(b.data).astype(np.float32), atol=1e-3, err_msg=name)


@pytest.mark.cupy
def test_replays_draw_fresh_dropout(cp):
    """The same batch replayed twice with dropout gives two different losses (fresh masks)."""
    (_, _), (model, opt) = _pair(cp, None, dropout=0.5)
    x = cp.asarray(np.random.default_rng(1).integers(0, 50, (4, 16)))
    graphed = cuda_graphs.GraphedMicroStep(model, opt, 1, x, x)
    a, b = float(graphed.step(x, x)), float(graphed.step(x, x))
    assert a != b
