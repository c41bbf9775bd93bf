"""Data parallelism over CPU threads inside one process: each thread runs the forward and backward
pass of its own block of the batch's rows, on its own replica of the model.

Why. NumPy runs one operation at a time, so a second core helps a training step only inside each
operation: BLAS splits a matrix product, npgpt's pool (``layers/_threads.py``) splits elementwise
work. A small model's operations are too small to split well, and BLAS's idle worker keeps spinning
on the core the pool wants: on the 2-core machine of ``benchmarks/RESULTS.md`` the baby step ran
only 1.1-1.2x faster on two threads than on one. Threads that each own part of the batch run whole
operations side by side instead; every NumPy call releases the GIL while it computes, so only the
Python between the calls (a few percent of a step) takes turns. Each replica thread runs BLAS and
its elementwise work in one thread.

The math. The loss is the mean cross-entropy over the N counted targets (those not equal to
``ignore_index``). Cut the rows into blocks b holding N_b counted targets, with block means L_b:

    (R1)  L = (1/N) sum_i l_i = sum_b (N_b / N) L_b
    (R2)  dL/dθ = sum_b (N_b / N) dL_b/dθ

Replica b backpropagates (N_b / N) L_b into its own gradient buffer, laid out like the optimizer's
flat one (``optim/flat.py``); the buffers are added into the optimizer's after the last block (R2).
The result is the full batch's gradient up to the order of float additions (it is not bit-identical
to one pass over the whole batch, but it is the same from run to run and across resumes).

Replicas share the weight arrays (each parameter's ``.data`` is the same view of the flat buffer, so
the optimizer's in-place update reaches all of them) and hold their own Parameter objects, whose
gradients are views of their own buffers. Dropout: before each step the main thread draws one seed
per block from ``backend.rng()`` (which checkpoints save), and block b's thread draws its masks from
a Generator of that seed (``backend.thread_rng``), so the masks do not depend on thread timing.

Shapes: idx and targets (B, T) integer arrays; blocks of rows [lo, hi), as equal as possible.
"""
import copy
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from . import backend
from .engine import Tensor, no_grad
from .layers._threads import serial
from .threads import blas_threads

__all__ = ["ThreadReplicas", "row_blocks", "IGNORE_INDEX"]

IGNORE_INDEX = -100          # F.cross_entropy's default: such targets are not counted in (R1)


def row_blocks(B, n):
    """[lo, hi) of n blocks of B rows whose sizes differ by at most one; fewer
    blocks when B < n."""
    n = max(1, min(n, B))
    cuts = [B * i // n for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class ThreadReplicas:
    """``n`` threads, each with a replica of ``model``, computing a step's loss and gradient by (R1)-(R2).

    model: a ``GPT`` (or any Module called as ``model(idx, targets) -> (logits, loss)``) whose
    parameters are all in ``opt.flat`` (``configure_optimizer(flat=True)``), on NumPy.
    ``forward_backward`` adds one micro-batch's gradient into ``opt.flat.grad``; ``loss`` evaluates
    without gradients; ``close`` ends the threads. The replicas follow ``model.training``.
    """

    def __init__(self, model, opt, n):
        flat = getattr(opt, "flat", None)
        if flat is None:
            raise TypeError("ThreadReplicas needs a flat optimizer: model.configure_optimizer(..., flat=True)")
        if backend.get_array_module(flat.data) is not np:
            raise ValueError("ThreadReplicas runs on the CPU (NumPy); on CuPy one GPU computes the whole batch")
        if int(n) < 2:
            raise ValueError(f"ThreadReplicas needs n >= 2 threads, got {n}")
        params = list(model.parameters())
        if {id(p) for p in params} != {id(p) for p in flat.params}:
            raise ValueError("every parameter of the model must be in the optimizer's flat buffer, and only those")
        self.model, self.opt, self.n = model, opt, int(n)
        self.grads = [flat.grad] + [np.zeros_like(flat.grad) for _ in range(self.n - 1)]   # (N,) each
        self.replicas = [model] + [self._replica(model, flat, g) for g in self.grads[1:]]
        self._pool = ThreadPoolExecutor(self.n - 1, thread_name_prefix="npgpt-replica")
        self._pending = False            # a replica buffer holds gradient not yet added to flat.grad

    @staticmethod
    def _replica(model, flat, grad):
        """A deep copy of ``model`` whose parameters share ``.data`` with the model's and have
        gradients bound to views of ``grad`` (laid out as ``flat.grad``)."""
        memo = {}
        for p, off in zip(flat.params, flat.offsets):
            memo[id(p.data)] = p.data                                          # the same weights
            memo[id(p.grad)] = grad[off:off + p.size].reshape(p.shape)         # its own gradient
        return copy.deepcopy(model, memo)

    def close(self):
        """End the worker threads (the replicas' gradients must have been added: ``reduce``)."""
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the work of one step ----------------------------------------------------------------------
    def _run(self, job, idx, targets, extra):
        """job(replica, idx block, targets block, *extra[b]) for every block, block 0 on this thread;
        returns the results in block order."""
        blocks = row_blocks(idx.shape[0], self.n)
        with blas_threads(1):
            futures = [self._pool.submit(self._in_thread, job, self.replicas[b], idx[lo:hi], targets[lo:hi],
                                         *extra[b]) for b, (lo, hi) in enumerate(blocks) if b]
            lo, hi = blocks[0]
            try:
                first = self._in_thread(job, self.replicas[0], idx[lo:hi], targets[lo:hi], *extra[0])
            finally:
                wait(futures)            # no thread still computing once this returns or raises
            return [first] + [f.result() for f in futures]

    @staticmethod
    def _in_thread(job, replica, idx, targets, *extra):
        with serial():
            return job(replica, idx, targets, *extra)

    def _weights(self, targets):
        """N_b / N of (R1) for each block (0 for all when no target counts, as the loss is then 0)."""
        counts = [int((targets[lo:hi] != IGNORE_INDEX).sum()) for lo, hi in row_blocks(targets.shape[0], self.n)]
        total = sum(counts)
        return [c / total if total else 0.0 for c in counts]

    def _sync_mode(self):
        for r in self.replicas[1:]:
            if r.training != self.model.training:
                r.train(self.model.training)

    def forward_backward(self, idx, targets, scale=1.0):
        """The loss of one micro-batch, idx and targets (B, T), as a 0-d Tensor (no graph), and
        ``scale`` times its gradient (R2) added to the optimizer's (``scale``: 1/accumulation steps).
        The loss scale of a mixed-precision optimizer is applied by its ``backward``."""
        self._sync_mode()
        weights = self._weights(targets)
        dropout = getattr(getattr(self.model, "config", None), "dropout", 0.0) > 0 and self.model.training
        seeds = backend.rng().integers(0, 2 ** 63, size=len(weights)) if dropout else [None] * len(weights)
        losses = self._run(self._block_step, idx, targets, [(w * scale, s) for w, s in zip(weights, seeds)])
        self._pending = True
        return Tensor(_weighted_mean(weights, losses))

    def _block_step(self, replica, idx, targets, weight, seed):
        gen = np.random.default_rng(seed) if seed is not None else None
        with backend.thread_rng(gen):
            _, loss = replica(idx, targets)
            if weight:                                     # a block without counted targets adds nothing
                self.opt.backward(loss * weight)
        return loss.data

    def reduce(self):
        """Add the replicas' gradients into the optimizer's (R2) and zero them; call before ``opt.step()``."""
        if self._pending:
            for g in self.grads[1:]:
                self.grads[0] += g
                g.fill(0)
            self._pending = False

    def train_step(self, next_batch, accumulation_steps=1):
        """``train_helpers.train_step`` with each micro-batch (``next_batch()`` -> idx, targets) cut
        over the replicas: the gradients of ``accumulation_steps`` micro-batches, each scaled by
        1/accumulation_steps, then (R2), the optimizer's step (clipping, fp16 skips) and zeroed
        gradients. Returns the last micro-batch's loss as a 0-d Tensor."""
        for _ in range(accumulation_steps):
            loss = self.forward_backward(*next_batch(), scale=1.0 / accumulation_steps)
        self.reduce()
        self.opt.step()
        self.opt.zero_grad()
        return loss

    def loss(self, idx, targets):
        """The mean loss (R1) of idx and targets (B, T) without gradients, as a 0-d array."""
        self._sync_mode()
        weights = self._weights(targets)
        with no_grad():
            losses = self._run(lambda replica, x, t: replica(x, t)[1].data, idx, targets, [()] * len(weights))
        return _weighted_mean(weights, losses)


def _weighted_mean(weights, losses):
    """(R1): sum_b (N_b / N) L_b, a 0-d array of the block losses' dtype (0 when no target counts:
    every block loss is then 0)."""
    return sum(w * l for w, l in zip(weights, losses)).astype(losses[0].dtype)
