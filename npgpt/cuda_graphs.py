"""CUDA Graphs for training: record the forward and backward of one micro-batch once, replay it.

On a small model the GPU waits for Python: each of the ~hundreds of kernels of a step costs ~10 µs
of CPU to launch, more than many of them take to run (RESULTS.md: 24 ms of dispatch in a 25 ms
step). A CUDA graph is the recorded sequence of those launches with their arguments and buffers;
``graph.launch()`` replays all of it for the cost of one launch. That needs a step that never waits
for the host (npgpt's training step is sync-free: ``backend.forbid_sync`` tests it) and fixed shapes
and buffers. What is recorded and what is not:

    recorded   forward, loss, backward of one micro-batch (scaled by 1/accumulation_steps and by the
               loss scale), its gradients added into the flat gradient buffer
    per replay the batch is copied into the graph's static input buffers, the current loss scale
               into its static scale, and the loss copied out of its static output (tiny copies)
    not        the optimizer step and zero_grad (a handful of launches): the learning rate and
               weight-decay factor reach the AdamW kernel as host scalars that change every step
               (warmup + cosine), and FlatAdamW rebinds its loss scale each step, so a recorded
               step would replay stale values. They run eagerly after the replays.

Memory: everything the recorded work allocates comes from a private CuPy memory pool kept with the
graph, so no other allocation can take (and have overwritten by a replay) a buffer the graph uses.
Kernels are compiled and caches filled by one eager warm-up micro-step first (its gradients are
zeroed); the graph is captured on a side stream and replayed on the current one. Dropout draws from
``backend.rng()``, whose generator state lives on the device, so replays draw fresh masks (checked
by the GPU test); a run with graphs is not bit-identical to one without (the warm-up's extra draws).

The knob ``TrainConfig.cuda_graphs``: "off", "on" (CuPy only: on NumPy it is refused, there are no
graphs) or "auto" = ``AUTO``, False until a GPU benchmark shows graphs faster (benchmarks/RESULTS.md,
"GPU work prepared without a GPU"). Nothing here has run on a GPU yet.
"""
from . import backend
from .engine import Tensor

__all__ = ["MODES", "AUTO", "use_graphs", "GraphedMicroStep", "graphed_train_step"]

MODES = ("auto", "on", "off")
AUTO = False        # "auto" records graphs: off until measured on a GPU (module docstring)


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


class GraphedMicroStep:
    """Forward + backward of one micro-batch of ``model`` recorded as a CUDA graph.

    ``step(x, y)`` copies the batch (B, T) into the static inputs, replays the graph (the gradients of
    loss / accumulation_steps, times the loss scale under fp16, are added into ``opt``'s flat gradient
    buffer) and returns a fresh copy of the loss (0-d, on the device). Built from one example batch,
    whose shape and dtype every later batch must have."""

    def __init__(self, model, opt, accumulation_steps, x, y):
        xp = backend.xp
        if xp.__name__ != "cupy":
            raise ValueError("CUDA graphs need the CuPy backend (backend.use('cupy'))")
        if not hasattr(opt, "flat"):
            raise TypeError("CUDA graphs need the flat optimizer (FlatAdamW: its gradients live in one buffer)")
        self.model, self.opt, self.inv_accumulation = model, opt, 1.0 / accumulation_steps
        self.x, self.y = xp.array(x), xp.array(y)            # (B, T) static inputs
        self.scale = xp.array(opt._scale) if opt.scaled else None   # static loss scale (FlatAdamW's)
        self._micro_step()                                   # warm-up: compile kernels, fill caches
        opt.zero_grad()
        backend.synchronize()
        self.pool = xp.cuda.MemoryPool()                     # the graph's own memory
        stream = xp.cuda.Stream(non_blocking=True)
        stream.wait_event(xp.cuda.get_current_stream().record())
        with xp.cuda.using_allocator(self.pool.malloc), stream:
            stream.begin_capture()
            try:
                self.loss = self._micro_step()               # recorded, not run
            finally:
                self.graph = stream.end_capture()
        stream.synchronize()

    def _micro_step(self):
        """loss of the static batch, and its backward through the optimizer's scaling."""
        loss = self.model(self.x, self.y)[1]
        saved = self.opt._scale
        if self.scale is not None:
            self.opt._scale = self.scale                     # read from the static buffer at replay
        try:
            self.opt.backward(loss * self.inv_accumulation)
        finally:
            self.opt._scale = saved
        return loss.data

    def step(self, x, y):
        xp = backend.xp
        self.x[...] = x                                      # device copies (host batches are uploaded)
        self.y[...] = y
        if self.scale is not None:
            self.scale[...] = self.opt._scale
        self.graph.launch(stream=xp.cuda.get_current_stream())
        return self.loss.copy()


def graphed_train_step(mode, model, opt, next_batch, accumulation_steps=1):
    """``step() -> loss Tensor``, ``train_helpers.train_step``'s twin with the micro-batches replayed
    from a CUDA graph (recorded on the first call), when ``use_graphs(mode)``; None otherwise (then
    the caller runs its plain step). The optimizer step and zero_grad run eagerly after the replays."""
    if not use_graphs(mode):
        return None
    recorded = []

    def step():
        for _ in range(accumulation_steps):
            x, y = next_batch()
            if not recorded:
                recorded.append(GraphedMicroStep(model, opt, accumulation_steps, x, y))
            loss = recorded[0].step(x, y)
        opt.step()
        opt.zero_grad()
        return Tensor(loss)
    return step
