"""Where a training step's time goes: per layer and op, forward and backward time, FLOPs, bytes
moved, achieved FLOP/s against the machine's peak, and each op's share of the step (``npgpt profile``).

The model's code is not touched. Inside ``Profiler`` two functions are wrapped from outside and put
back on exit:

- ``Module.__call__`` keeps a stack of module paths, so each op knows its layer (``h.0.attn.c_attn``);
- ``Tensor.from_op``, through which every primitive op and fused layer makes its output. An op's
  forward time is the wall time since the previous op finished (so it includes the Python that
  prepared its call); its ``_backward`` closure is wrapped to time the backward.

On CuPy the GPU is synchronized at every mark: slower, but each op is charged its own kernels. The
profiler's own bookkeeping is timed and left out. What no op covers (the end of the forward after
the last op, the engine's graph walk in backward) is the row "other". The data, the optimizer step
and ``zero_grad`` are rows of their own, so the rows add up to the whole step.

FLOPs and bytes come from the shapes (``costs.op_cost``; the counts are stated in docs/profile.md). The
peak is a measured float32 GEMM on the CPU and the device's dense peak on a GPU (``peak_flops``),
which training's log also divides by for MFU.
"""
import contextlib
import statistics
import time
from dataclasses import dataclass

import numpy as np

from . import backend
from .costs import (ADAMW_FLOPS_PER_PARAM, ADAMW_PASSES, ELEMENTWISE_FLOPS, gemm_probe, op_cost,
                    peak_flops)
from .engine import Tensor
from .nn import Module

__all__ = ["Profiler", "Row", "Report", "profile_steps", "op_cost", "peak_flops", "gemm_probe",
           "named_modules", "ELEMENTWISE_FLOPS", "ADAMW_FLOPS_PER_PARAM"]


# ---- recording ------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the table: an op in a layer (or a phase of the step), summed over its calls."""
    layer: str
    op: str
    calls: int = 0
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    fwd_bytes: float = 0.0
    bwd_bytes: float = 0.0
    is_op: bool = True            # False for "other": the time no op covers

    @property
    def seconds(self):
        return self.fwd_s + self.bwd_s

    @property
    def flops(self):
        return self.fwd_flops + self.bwd_flops

    @property
    def bytes(self):
        return self.fwd_bytes + self.bwd_bytes


def named_modules(model, prefix=""):
    """(path, module) for ``model`` and every module below it: ("", model), ("transformer.wte", ...)."""
    yield prefix, model
    for name, child in model.named_children():
        yield from named_modules(child, f"{prefix}.{name}" if prefix else name)


def _now():
    backend.synchronize()
    return time.perf_counter()


class Profiler:
    """Context manager that records steps of ``model``: ``with Profiler(model) as prof:``, then per
    step ``with prof.step():`` holding ``with prof.region(layer, op):`` blocks. A region named
    "forward" or "backward" records each op inside it as its own row; any other region is one row.
    ``prof.steps`` holds one ``{(layer, op): Row}`` per step, ``prof.walls`` each step's wall time and
    ``prof.overheads`` the profiler's own time in it."""

    def __init__(self, model):
        self.paths = {id(m): path.removeprefix("transformer.") or type(model).__name__
                      for path, m in named_modules(model)}
        self.steps, self.walls, self.overheads = [], [], []
        self._stack, self._rows, self._mark, self._edge = [type(model).__name__], None, None, None
        self._charged = self._overhead = 0.0

    # -- the two wrappers
    def __enter__(self):
        self._call, self._from_op = Module.__dict__["__call__"], Tensor.__dict__["from_op"]
        profiler, call, from_op = self, self._call, self._from_op.__func__

        def module_call(module, *args, **kwargs):
            profiler._stack.append(profiler.paths.get(id(module), profiler._stack[-1]))
            try:
                return call(module, *args, **kwargs)
            finally:
                profiler._stack.pop()

        def recorded_from_op(cls, data, parents, backward, op=""):
            out = from_op(cls, data, parents, backward, op)
            if profiler._mark is not None:
                profiler._record(out, data, parents, op or "op")
            return out

        Module.__call__, Tensor.from_op = module_call, classmethod(recorded_from_op)
        return self

    def __exit__(self, *exc):
        Module.__call__, Tensor.from_op = self._call, self._from_op
        return False

    def _record(self, out, data, parents, op):
        t = _now()                                                 # the op's forward ends here
        row = self._row(self._stack[-1], op)
        row.calls += 1
        row.fwd_s += t - self._mark
        self._charged += t - self._mark
        fwd_flops, bwd_flops, fwd_bytes, bwd_bytes = op_cost(op, data, parents)
        row.fwd_flops += fwd_flops
        row.fwd_bytes += fwd_bytes
        if out._backward is not None:
            out._backward = self._timed_backward(out._backward, row, bwd_flops, bwd_bytes)
        self._mark = time.perf_counter()
        self._overhead += self._mark - t

    def _timed_backward(self, backward, row, flops, nbytes):
        def timed(dout):
            t0 = _now()
            backward(dout)
            t1 = _now()
            row.bwd_s += t1 - t0
            row.bwd_flops += flops
            row.bwd_bytes += nbytes
            self._charged += t1 - t0
            self._overhead += time.perf_counter() - t1
        return timed

    def _row(self, layer, op):
        key = (layer, op)
        if key not in self._rows:
            self._rows[key] = Row(layer, op)
        return self._rows[key]

    # -- steps and regions
    @contextlib.contextmanager
    def step(self):
        """One step: its rows, wall time (to the end of its last region) and profiler overhead are
        appended on exit."""
        self._rows, self._overhead = {}, 0.0
        self._edge = t0 = _now()
        yield
        self.walls.append(self._edge - t0)
        self.steps.append(self._rows)
        self.overheads.append(self._overhead)
        self._edge = None

    @contextlib.contextmanager
    def region(self, layer, op="", flops=0.0, nbytes=0.0):
        """A phase of the step, starting where the previous one ended (so the regions tile the step).
        "forward"/"backward": each op its own row, the rest "other"; any other name: one row
        (layer, op) with the given FLOPs and bytes."""
        self._charged, overhead0 = 0.0, self._overhead
        self._mark = t0 = _now() if self._edge is None else self._edge
        try:
            yield
        finally:
            end = _now()
            wall, self._mark = end - t0, None
            if self._edge is not None:
                self._edge = end
            rest = wall - self._charged - (self._overhead - overhead0)
            if layer in ("forward", "backward"):
                row = self._row("other", f"{layer} outside ops")
                row.is_op = False
                row.fwd_s += rest if layer == "forward" else 0.0
                row.bwd_s += rest if layer == "backward" else 0.0
            else:
                row = self._row(layer, op)
                row.calls += 1
                row.fwd_s += rest
                row.fwd_flops += flops
                row.fwd_bytes += nbytes


# ---- a profiled training step, and the report -------------------------------------------------------

def _no_region(*args, **kwargs):
    return contextlib.nullcontext()


def _train_step(model, opt, batch, region):
    """``train_helpers.train_step`` with one micro-batch, cut into regions."""
    n = opt.flat.data.size
    flops, nbytes = ADAMW_FLOPS_PER_PARAM * n, ADAMW_PASSES * opt.master.nbytes
    with region("data", "batch"):
        x, y = batch()
    with region("forward"):
        _, loss = model(x, y)
    with region("backward"):
        opt.backward(loss)
    with region("optimizer", "step", flops, nbytes):
        opt.step()
    with region("optimizer", "zero_grad", 0, opt.flat.grad.nbytes):
        opt.zero_grad()


def profile_steps(model, opt, batch, steps=5, warmup=1, dtype="float32", tf32=False):
    """Profile training steps of ``model`` with ``opt`` (a ``FlatAdamW``) on ``batch() -> (x, y)``:
    ``warmup`` plain steps, then ``steps`` plain steps timed whole and ``steps`` profiled ones,
    alternating (so both see the same machine). Returns a ``Report``."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    peak, peak_source = peak_flops(dtype, tf32)
    tokens = int(np.prod(batch()[0].shape))                 # B * T
    model.train()
    for _ in range(warmup):
        _train_step(model, opt, batch, _no_region)
    prof, plain = Profiler(model), []
    for _ in range(steps):
        with prof, prof.step():
            _train_step(model, opt, batch, prof.region)
        t0 = _now()
        _train_step(model, opt, batch, _no_region)
        plain.append(_now() - t0)
    return Report(prof, plain, peak, peak_source, tokens, model.estimate_flops_per_token() * tokens)


class Report:
    """The rows and the plain steps, both as means over the steps, and the peak.

    Means, not medians: the rows' means add up to the mean profiled step exactly, and on a busy
    machine a sum of per-row medians is an undisturbed step, lower than the median plain step."""

    def __init__(self, prof, plain_steps, peak, peak_source, tokens, model_flops):
        self.profiled_steps, self.walls, self.overheads = prof.steps, prof.walls, prof.overheads
        self.plain_steps, self.step_s = plain_steps, statistics.fmean(plain_steps)
        self.peak, self.peak_source, self.tokens, self.model_flops = peak, peak_source, tokens, model_flops
        self.rows = []
        for key, row in prof.steps[0].items():
            runs = [s[key] for s in prof.steps if key in s]
            self.rows.append(Row(row.layer, row.op, row.calls, statistics.fmean(r.fwd_s for r in runs),
                                 statistics.fmean(r.bwd_s for r in runs), row.fwd_flops, row.bwd_flops,
                                 row.fwd_bytes, row.bwd_bytes, row.is_op))

    @property
    def total_s(self):
        """The sum of every row, "other" included: the profiled step less the profiler's own time."""
        return sum(r.seconds for r in self.rows)

    @property
    def op_sum_s(self):
        """The sum of the op rows (everything but "other")."""
        return sum(r.seconds for r in self.rows if r.is_op)

    @property
    def ratio(self):
        return self.op_sum_s / self.step_s

    @property
    def mfu(self):
        """Model FLOPs (6N + 12LHQT per token) per measured step over the peak, as nanoGPT's MFU."""
        return self.model_flops / self.step_s / self.peak

    def table(self, sort="order"):
        """The table as text: one line per (layer, op), in execution order or by share of the step."""
        rows = sorted(self.rows, key=lambda r: -r.seconds) if sort == "share" else \
            [r for r in self.rows if r.is_op] + [r for r in self.rows if not r.is_op]
        return _format(rows, self.total_s, self.peak)

    def by_op(self):
        """The same columns summed per op over all layers, by share of the step."""
        totals = {}
        for r in self.rows:
            layer = r.layer if r.layer in ("data", "optimizer", "other") else "all layers"
            total = totals.setdefault((layer, r.op), Row(layer, r.op, is_op=r.is_op))
            for f in ("calls", "fwd_s", "bwd_s", "fwd_flops", "bwd_flops", "fwd_bytes", "bwd_bytes"):
                setattr(total, f, getattr(total, f) + getattr(r, f))
        return _format(sorted(totals.values(), key=lambda r: -r.seconds), self.total_s, self.peak)

    def summary(self):
        """The sum of the op times against the measured step, the check, and the step's MFU."""
        ok = abs(self.ratio - 1) <= 0.10
        counted = sum(r.flops for r in self.rows)
        return "\n".join([
            f"sum of the op times   {1e3 * self.op_sum_s:9.2f} ms   (mean of {len(self.walls)} profiled "
            f"steps; not included: \"other\" {1e3 * (self.total_s - self.op_sum_s):.2f} ms, the profiler's own "
            f"{1e3 * statistics.fmean(self.overheads):.2f} ms)",
            f"measured step         {1e3 * self.step_s:9.2f} ms   (mean of {len(self.plain_steps)} steps "
            f"without the profiler; fastest {1e3 * min(self.plain_steps):.2f}, slowest "
            f"{1e3 * max(self.plain_steps):.2f})",
            f"ratio {self.ratio:.3f}: " + ("the op times add up to within 10 % of the measured step (ok)" if ok else
                                          "the op times are NOT within 10 % of the measured step (a busy "
                                          "machine? try more --steps)"),
            f"FLOPs per step: {self.model_flops / 1e9:.3f} GFLOP by 6N + 12LHQT per token, "
            f"{counted / 1e9:.3f} GFLOP counted in the table",
            f"MFU {100 * self.mfu:.2f} % ({self.tokens} tokens per step, {self.tokens / self.step_s:,.0f} "
            f"tokens/s, peak {self.peak / 1e12:.3f} TFLOP/s: {self.peak_source})"])


def _format(rows, total_s, peak):
    head = (f"{'layer':<18} {'op':<22} {'calls':>5} {'fwd ms':>8} {'bwd ms':>8} {'MFLOP':>10} {'MB':>9} "
            f"{'GFLOP/s':>8} {'% peak':>6} {'GB/s':>6} {'% step':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r.seconds
        rate = r.flops / s / 1e9 if s > 0 and r.flops else None
        bandwidth = r.bytes / s / 1e9 if s > 0 and r.bytes else None
        lines.append(
            f"{r.layer[:18]:<18} {r.op[:22]:<22} {r.calls if r.is_op else '':>5} {1e3 * r.fwd_s:8.3f} "
            f"{1e3 * r.bwd_s:8.3f} {r.flops / 1e6:10.2f} {r.bytes / 1e6:9.2f} "
            f"{_opt(rate, '8.2f'):>8} {_opt(rate and 1e11 * rate / peak, '6.1f'):>6} "
            f"{_opt(bandwidth, '6.1f'):>6} {100 * s / total_s:6.1f}")
    return "\n".join(lines)


def _opt(value, spec):
    return "" if value is None else format(value, spec)
