"""CUDA Graphs for training: record a training step once, replay it.

On a small model the GPU waits for Python: each of the ~hundreds of kernels of a step costs ~10 µs
of CPU to launch, more than many of them take to run (RESULTS.md: 24 ms of dispatch in a 25 ms
step). A CUDA graph is the recorded sequence of those launches with their arguments and buffers;
``graph.launch()`` replays all of it for the cost of one launch. That needs a step that never waits
for the host (npgpt's training step is sync-free: ``backend.forbid_sync`` tests it) and fixed shapes
and buffers. Two granularities:

    whole step  (``GraphedStep``, when ``WHOLE_STEP`` and the optimizer is ``capturable``: FlatAdamW
                on CuPy with its AdamW kernel) the forward and backward of every micro-batch, the
                optimizer step (norm, clipping, inf/nan check, AdamW, loss-scale update) and zero_grad.
                FlatAdamW keeps everything that changes between steps in persistent 0-d device arrays
                updated in place (loss scale, t, counters, norm), and the host values a step needs
                (each group's lr and 1 - lr wd) are written into persistent 0-d arrays just before
                each replay (``load_hyperparameters``, one fill each), so the replays follow the
                learning-rate schedule and the loss scale.
    micro-step  (``GraphedMicroStep``, otherwise) the forward and backward of one micro-batch; the
                optimizer step and zero_grad run eagerly after the replays.

GEMMs: CuPy's cuBLAS calls refuse stream capture, so the recording runs inside
``backend.capturing()``, where ``backend.bmm`` (every matrix product of the model) calls cuBLAS
through npgpt's own handle (``npgpt/cublas.py``).

Per replay the batches are copied into the graph's static input buffers and the loss (the last
micro-batch's) copied out of its static output: tiny copies.

Memory: everything the recorded work allocates comes from a private CuPy memory pool kept with the
graph, so no other allocation can take (and have overwritten by a replay) a buffer the graph uses.
Kernels are compiled and caches filled by one eager warm-up first, whose effects are undone (the
micro-step's gradients zeroed; the whole step's weights, moments, gradients and scaler state
restored from copies); the graph is captured on a side stream and replayed on the current one.
Dropout draws from ``backend.rng()``, whose generator state lives on the device, so replays draw
fresh masks (checked by the GPU test); a run with graphs is not bit-identical to one without (the
warm-up's extra draws), and with dropout > 0 a resumed run draws other masks than an uninterrupted one
(its own warm-up): for bit-exact resume with dropout on a GPU, use ``cuda_graphs=off``.

The knob ``TrainConfig.cuda_graphs``: "off", "on" (CuPy only: on NumPy it is refused, there are no
graphs) or "auto" = ``AUTO``, False until a GPU benchmark shows graphs faster (benchmarks/RESULTS.md,
"GPU kernels measured on the H200"): on. Measured on an H200 (2026-11-30, fp16): the whole step
replayed took GPT-2 124M from 78.5 to 64.3 ms (flash attention) and the small config from 38.0 to
11.1 ms, where the eager step waits for Python's launches.
"""
from . import backend
from .engine import Tensor

__all__ = ["MODES", "AUTO", "WHOLE_STEP", "use_graphs", "GraphedMicroStep", "GraphedStep", "graphed_train_step"]

MODES = ("auto", "on", "off")
AUTO = True         # "auto" records graphs on CuPy: measured faster on an H200 (module docstring)
WHOLE_STEP = True   # graphs on: the whole step where the optimizer is capturable, else the micro-steps


def use_graphs(mode, backend_name=None):
    """Whether a run with ``cuda_graphs=mode`` on ``backend_name`` (default: the active one) records
    its step: "off" never; "on" on CuPy (on NumPy a ValueError says why); "auto" when ``AUTO`` is on
    and the backend is CuPy."""
    if mode not in MODES:
        raise ValueError(f"cuda_graphs must be one of {', '.join(MODES)}, got {mode!r}")
    name = backend_name or backend.name
    if mode == "on" and name != "cupy":
        raise ValueError("cuda_graphs=on needs the GPU backend (device=cuda, CuPy): CUDA graphs record GPU "
                         "kernel launches, and the NumPy backend launches none; use cuda_graphs=off or auto")
    return name == "cupy" and (mode == "on" or (mode == "auto" and AUTO))


def _check(opt):
    xp = backend.xp
    if xp.__name__ != "cupy":
        raise ValueError("CUDA graphs need the CuPy backend (backend.use('cupy'))")
    if not hasattr(opt, "flat"):
        raise TypeError("CUDA graphs need the flat optimizer (FlatAdamW: its gradients live in one buffer)")
    return xp


def _capture(xp, record):
    """``record()`` captured (not run) into a CUDA graph with a private memory pool -> (graph, pool,
    what record returned)."""
    backend.synchronize()
    pool = xp.cuda.MemoryPool()                              # the graph's own memory
    stream = xp.cuda.Stream(non_blocking=True)
    stream.wait_event(xp.cuda.get_current_stream().record())
    with backend.capturing(), xp.cuda.using_allocator(pool.malloc), stream:   # GEMMs: npgpt.cublas
        stream.begin_capture()
        try:
            out = record()
        finally:
            graph = stream.end_capture()
    stream.synchronize()
    return graph, pool, out


class GraphedMicroStep:
    """Forward + backward of one micro-batch of ``model`` recorded as a CUDA graph.

    ``step(x, y)`` copies the batch (B, T) into the static inputs, replays the graph (the gradients of
    loss / accumulation_steps, times the loss scale under fp16, are added into ``opt``'s flat gradient
    buffer) and returns a fresh copy of the loss (0-d, on the device). Built from one example batch,
    whose shape and dtype every later batch must have. The loss scale is read from FlatAdamW's
    persistent device array at replay."""

    def __init__(self, model, opt, accumulation_steps, x, y):
        xp = _check(opt)
        self.model, self.opt, self.inv_accumulation = model, opt, 1.0 / accumulation_steps
        self.x, self.y = xp.array(x), xp.array(y)            # (B, T) static inputs
        self._micro_step()                                   # warm-up: compile kernels, fill caches
        opt.zero_grad()
        self.graph, self.pool, self.loss = _capture(xp, self._micro_step)

    def _micro_step(self):
        """loss of the static batch, and its backward through the optimizer's scaling."""
        loss = self.model(self.x, self.y)[1]
        self.opt.backward(loss * self.inv_accumulation)
        return loss.data

    def step(self, x, y):
        xp = backend.xp
        self.x[...] = x                                      # device copies (host batches are uploaded)
        self.y[...] = y
        self.graph.launch(stream=xp.cuda.get_current_stream())
        return self.loss.copy()


class GraphedStep:
    """A whole training step recorded as one CUDA graph: forward + backward of each of the
    ``accumulation_steps`` micro-batches (loss / accumulation_steps, times the loss scale), then
    ``opt.step_on_device()`` and ``opt.zero_grad()``. ``opt`` must be ``capturable``.

    ``step(batches)`` copies the micro-batches (a list of (x, y), (B, T) each) into the static inputs,
    counts the step and writes the groups' learning rates on the host side (``opt.step_count``,
    ``opt.load_hyperparameters()``), replays, and returns a fresh copy of the last micro-batch's loss."""

    def __init__(self, model, opt, accumulation_steps, batches):
        xp = _check(opt)
        if not opt.capturable:
            raise ValueError("this optimizer's step cannot be recorded (it needs CuPy and the AdamW CUDA kernel: "
                             "NPGPT_CUDA_KERNELS=0 or cuda_kernel=False run array code that branches on the host)")
        if len(batches) != accumulation_steps:
            raise ValueError(f"expected {accumulation_steps} micro-batches, got {len(batches)}")
        self.model, self.opt, self.inv_accumulation = model, opt, 1.0 / accumulation_steps
        self.inputs = [(xp.array(x), xp.array(y)) for x, y in batches]   # static (B, T) inputs
        saved, step_count = [a.copy() for a in opt.step_buffers()], opt.step_count
        opt.load_hyperparameters()
        self._step()                                         # warm-up: compile kernels, fill caches ...
        for a, before in zip(opt.step_buffers(), saved):     # ... and undo it
            a[...] = before
        opt.step_count = step_count
        del saved
        self.graph, self.pool, self.loss = _capture(xp, self._step)

    def _step(self):
        for x, y in self.inputs:
            loss = self.model(x, y)[1]
            self.opt.backward(loss * self.inv_accumulation)
        self.opt.step_on_device()
        self.opt.zero_grad()
        return loss.data

    def step(self, batches):
        xp = backend.xp
        for (x, y), (static_x, static_y) in zip(batches, self.inputs):
            static_x[...] = x
            static_y[...] = y
        self.opt.step_count += 1
        self.opt.load_hyperparameters()                      # lr and decay of this step, into the device
        self.graph.launch(stream=xp.cuda.get_current_stream())
        return self.loss.copy()


def graphed_train_step(mode, model, opt, next_batch, accumulation_steps=1):
    """``step() -> loss Tensor``, ``train_helpers.train_step``'s twin replayed from a CUDA graph
    (recorded on the first call), when ``use_graphs(mode)``; None otherwise (then the caller runs its
    plain step). The whole step when ``WHOLE_STEP`` and ``opt.capturable``; else the micro-batches,
    with the optimizer step and zero_grad run eagerly after the replays."""
    if not use_graphs(mode):
        return None
    recorded = []

    def whole_step():
        batches = [next_batch() for _ in range(accumulation_steps)]
        if not recorded:
            recorded.append(GraphedStep(model, opt, accumulation_steps, batches))
        return Tensor(recorded[0].step(batches))

    def micro_steps():
        for _ in range(accumulation_steps):
            x, y = next_batch()
            if not recorded:
                recorded.append(GraphedMicroStep(model, opt, accumulation_steps, x, y))
            loss = recorded[0].step(x, y)
        opt.step()
        opt.zero_grad()
        return Tensor(loss)
    return whole_step if WHOLE_STEP and getattr(opt, "capturable", False) else micro_steps
