"""CUDA Graphs for training (``npgpt.cuda_graphs``): the switch everywhere, and that FlatAdamW on NumPy
is not capturable (and keeps its plain step); on a GPU only, a replayed whole step (or micro-step)
gives the eager step's losses and weights, follows new batches, the loss scale (skipped steps
included) and the learning-rate schedule, keeps FlatAdamW's device state in the same buffers, and
draws fresh dropout masks."""
import numpy as np
import pytest

from npgpt import GPT, GPTConfig, backend, cuda_graphs
from npgpt.train import TrainConfig, train
from test_train import tiny_cfg


def test_switch():
    assert cuda_graphs.AUTO is True                              # measured faster on an H200
    assert cuda_graphs.WHOLE_STEP is True                        # when graphs are on: the whole step
    assert not cuda_graphs.use_graphs("off", "cupy")
    assert cuda_graphs.use_graphs("auto", "cupy")
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
    with pytest.raises(ValueError, match="CuPy"):
        cuda_graphs.GraphedStep(model, opt, 1, [(x, x)])


def test_numpy_flat_adamw_is_not_capturable_and_steps_as_before():
    """On NumPy nothing is recorded: no device copies of lr, ``step()`` = ``load_hyperparameters()``
    (a no-op) + ``step_on_device()``, and the state is rebound (fresh arrays), as before."""
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    opt = model.configure_optimizer(1e-2, 0.1, flat=True, max_grad_norm=1.0)
    assert not opt.capturable and opt._device_hyper is None
    x = np.random.default_rng(0).integers(0, 11, (2, 8))
    t_before = opt._t
    opt.backward(model(x, x)[1])
    opt.step()
    assert opt._t is not t_before and int(opt._t) == 1 and opt.step_count == 1
    assert len(opt.step_buffers()) == 9                          # fp32: no master copy


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


def _pair(cp, dtype, dropout=0.0, **opt_kw):
    """Two identical models with identical flat optimizers (fp16 mixed precision or float32)."""
    out = []
    for _ in range(2):
        backend.seed(0)
        model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=dropout,
                              vocab_multiple=64))
        out.append((model, model.configure_optimizer(1e-3, 0.1, dtype=dtype, flat=True, max_grad_norm=1.0,
                                                          **opt_kw)))
    return out


@pytest.mark.cupy
@pytest.mark.parametrize("dtype", ["float16", None])
@pytest.mark.parametrize("whole", [True, False])
def test_replay_equals_eager_steps(cp, dtype, whole, monkeypatch):
    """Five steps with a changing learning rate: graphed (2 micro-batches each; the whole step, or the
    micro-steps with an eager optimizer step) and eager give the same losses and weights, up to the
    ordering-free rounding of identical kernels (exactly, in practice)."""
    monkeypatch.setattr(cuda_graphs, "WHOLE_STEP", whole)
    (m_eager, o_eager), (m_graph, o_graph) = _pair(cp, dtype)
    assert o_graph.capturable
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
    assert o_graph.step_count == o_eager.step_count == 5 and int(o_graph._t) == int(o_eager._t)
    assert o_graph.loss_scale == o_eager.loss_scale
    np.testing.assert_allclose(float(o_graph.grad_norm), float(o_eager.grad_norm), rtol=1e-3)
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


@pytest.mark.cupy
def test_whole_step_follows_skipped_steps_and_the_loss_scale(cp):
    """fp16 with a loss scale so large that the first steps overflow: the replayed whole step skips
    them and halves the scale exactly as the eager step does (the scale lives on the device)."""
    (m_eager, o_eager), (m_graph, o_graph) = _pair(cp, "float16", init_scale=2.0 ** 40)
    rng = np.random.default_rng(2)
    batches = [tuple(cp.asarray(rng.integers(0, 50, (4, 16))) for _ in range(2)) for _ in range(8)]
    it = iter(batches)
    step = cuda_graphs.graphed_train_step("on", m_graph, o_graph, lambda: next(it), 1)
    for x, y in batches:
        o_eager.backward(m_eager(x, y)[1])
        o_eager.step()
        o_eager.zero_grad()
        step()
    assert o_eager.skipped_steps > 0
    assert (o_graph.skipped_steps, o_graph.loss_scale) == (o_eager.skipped_steps, o_eager.loss_scale)
    for (name, a), (_, b) in zip(m_eager.named_parameters(), m_graph.named_parameters()):
        np.testing.assert_allclose(backend.to_numpy(a.data).astype(np.float32),
                                   backend.to_numpy(b.data).astype(np.float32), atol=1e-3, err_msg=name)


@pytest.mark.cupy
def test_flat_adamw_device_state_stays_in_its_buffers(cp):
    """On CuPy the step and load_state_dict write the scaler state, t, the norm and the learning
    rates into the same 0-d arrays (what a recorded graph reads), without a host sync."""
    (model, opt), _ = _pair(cp, "float16")
    buffers = [opt._scale, opt._good, opt._skipped, opt._t, opt.grad_norm] + [a for h in opt._device_hyper for a in h]
    x = cp.asarray(np.random.default_rng(3).integers(0, 50, (4, 16)))
    with backend.forbid_sync():
        for lr in (1e-3, 2e-3):
            opt.set_lr(lr)
            opt.backward(model(x, x)[1])
            opt.step()
            opt.zero_grad()
    assert float(opt._device_hyper[0][0]) == 2e-3
    opt.load_state_dict(opt.state_dict())
    after = [opt._scale, opt._good, opt._skipped, opt._t, opt.grad_norm] + [a for h in opt._device_hyper for a in h]
    assert all(a is b for a, b in zip(buffers, after)) and int(opt._t) == 2
