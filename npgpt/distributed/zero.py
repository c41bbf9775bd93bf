"""ZeRO-1: each of N ranks keeps 1/N of the optimizer state and updates 1/N of the weights
(Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
stage 1 "P_os"; llm.c's ``zero_stage=1`` does the same).

Plain data parallelism keeps on every rank the AdamW moments m, v (and, under fp16, the float32
master weights w): with P parameters that is 8P bytes (16P bytes with fp32 masters from fp16), all of
it identical on every rank. ZeRO-1 gives rank r only its chunks (``buckets.BucketPlan.own_chunks``):

    g_r  = reduce_scatter(g)          (Z1) the summed gradient of my chunks only (``comm.py`` (C2))
    |g|^2 = allreduce(sum(g_r^2))     (Z2) the global norm from the chunks' partial sums
    w_r <- AdamW(w_r, g_r, m_r, v_r)  (Z3) ``adamw.py`` (0)-(5) on my chunks, clipping as (M1)-(M5)
    w   = allgather(w_r)              (Z4) every rank gets every updated weight (C3)

(Z1) + (Z4) move as many bytes as the all-reduce they replace, so communication stays the same
while state memory per rank drops from 8P (or 16P) bytes to 8P/N (16P/N) plus the shard of the
gradient (P/N elements). Bucket tails (fewer than N elements each) are all-reduced and updated by
every rank; the norm counts them on rank 0 only.

Here ``ZeroShards(opt, plan, comm)`` takes over a ``FlatAdamW``'s state (keeping only its chunks)
and steps it; state dicts gather the full state, in ``FlatAdamW``'s format, so a checkpoint written
with any N resumes on any N.
"""
import numpy as np

from ..layers import _cuda
from ..optim.adamw import adamw_kernel, adamw_update, group_scalars, scalar
from ..optim.clip import sum_of_squares
from ..optim.mixed_precision import FlatAdamW

__all__ = ["ZeroShards"]


class ZeroShards:
    """The shard of a ``FlatAdamW`` (``opt``) that this rank keeps under ZeRO-1.

    Shard layout (S elements): my chunk of each bucket in launch order, then every bucket tail.
    ``grad`` (S,): the reduced gradient there; ``exp_avg``, ``exp_avg_sq`` (S,) and, under fp16,
    ``master`` (S,) float32. ``segments``: (group index, flat lo, flat hi, shard lo) runs that lie
    in one param group, the unit the update works on."""

    def __init__(self, opt, plan, comm):
        self.opt, self.plan, self.comm, self.xp = opt, plan, comm, opt.xp
        xp, flat = opt.xp, opt.flat
        pieces = plan.own_chunks(comm.rank)
        self.main_size = sum(hi - lo for lo, hi in pieces)
        pieces += plan.tails()
        self.pieces, starts, at = pieces, [], 0
        for lo, hi in pieces:
            starts.append(at)
            at += hi - lo
        self.size = at
        self.slot = {}                                          # flat lo of a piece -> its shard lo
        for (lo, _), start in zip(pieces, starts):
            self.slot[lo] = start
        self.segments = []
        for (lo, hi), start in zip(pieces, starts):
            for gi, sl in enumerate(flat.group_slices):
                a, b = max(lo, sl.start), min(hi, sl.stop)
                if a < b:
                    self.segments.append((gi, a, b, start + a - lo))
        take = self._take
        self.exp_avg, self.exp_avg_sq = take(opt.exp_avg), take(opt.exp_avg_sq)
        self.master = take(opt.master) if opt.mixed else None
        self.grad = xp.zeros(self.size, dtype=flat.grad.dtype)
        self.scratch = xp.empty(self.size, dtype=opt.exp_avg.dtype)
        self.full_bytes = sum(a.nbytes for a in (opt.exp_avg, opt.exp_avg_sq)) + (opt.master.nbytes if opt.mixed else 0)
        opt.exp_avg = opt.exp_avg_sq = None                      # the full state is freed
        if opt.mixed:
            opt.master = None

    def _take(self, full):
        """My pieces of a full (N,) array, concatenated: (S,)."""
        return self.xp.concatenate([full[lo:hi] for lo, hi in self.pieces]) if self.pieces else full[:0].copy()

    def _full(self, shard, dtype=None):
        """The (N,) array whose pieces the ranks hold in ``shard``: own pieces placed, chunks all-gathered."""
        full = self.xp.zeros(self.plan.total, dtype=dtype or shard.dtype)
        for (lo, hi) in self.pieces:
            full[lo:hi] = shard[self.slot[lo]:self.slot[lo] + hi - lo]
        for b, (lo, _) in enumerate(self.plan.buckets):
            c = self.plan.chunk(b)
            if c:
                self.comm.allgather(full[lo:lo + self.plan.world_size * c])
        return full

    def state_bytes(self):
        """(bytes of AdamW moments and fp32 masters on this rank, bytes the unsharded optimizer holds);
        besides these a rank keeps ``grad`` (S,), its shard of the reduced gradient."""
        mine = sum(a.nbytes for a in (self.exp_avg, self.exp_avg_sq)) + (
            self.master.nbytes if self.master is not None else 0)
        return mine, self.full_bytes

    # ---- (Z1): called by the data-parallel wrapper as buckets complete --------------------------
    def reduce(self, b, overlap=True):
        """Start (Z1) for bucket b: its chunks reduce-scattered into my shard, its tail all-reduced."""
        lo, hi = self.plan.buckets[b]
        n, c, grad = self.plan.world_size, self.plan.chunk(b), self.opt.flat.grad
        handles = []
        if c:
            mine = lo + self.comm.rank * c
            handles.append(self.comm.reduce_scatter(grad[lo:lo + n * c], self.grad[self.slot[mine]:self.slot[mine] + c],
                                                    overlap=overlap))
        if lo + n * c < hi:
            t = lo + n * c
            handles.append(self.comm.allreduce(grad[t:hi], self.grad[self.slot[t]:self.slot[t] + hi - t],
                                               overlap=overlap))
        return handles

    # ---- (Z2)-(Z4) ----------------------------------------------------------------------------------
    def step(self):
        """``FlatAdamW.step`` on my shard ((M1)-(M5) with (Z2)), then (Z4)."""
        opt, xp, comm = self.opt, self.xp, self.comm
        opt.step_count += 1
        S = opt._scale
        if opt.scaled or opt.max_grad_norm > 0:
            squares = sum_of_squares(self.grad[:self.main_size])                         # (Z2), my chunks
            if comm.rank == 0 and self.size > self.main_size:
                squares = squares + sum_of_squares(self.grad[self.main_size:])          # the tails, once
            squares = xp.reshape(squares, (1,)).astype(squares.dtype)                    # a buffer of its own
            comm.allreduce(squares)
            norm_scaled = xp.sqrt(squares[0])                                            # (M1)
            ok = xp.isfinite(norm_scaled)                                                # (M2)
            opt.grad_norm = norm = norm_scaled / S                                       # (M3)
            clip = xp.minimum(1.0, opt.max_grad_norm / (norm + 1e-6)) if opt.max_grad_norm > 0 else 1.0
            grad_scale = xp.where(ok, clip / S, 0.0)                                     # (M4)
        else:
            ok, grad_scale = xp.asarray(True), xp.asarray(1.0)
        if not opt.dynamic:
            ok = xp.asarray(True)
        opt._t = opt._t + ok.astype(np.int64)                                           # (M5)
        t = xp.maximum(opt._t, 1).astype(np.float64)
        dtype = self.exp_avg.dtype
        use_kernel = xp is not np and _cuda.enabled() and opt.cuda_kernel is not False and dtype == np.float32
        if not use_kernel and not bool(ok):                 # every rank sees the same ok: all skip
            opt._update_scale(ok)
            return
        args = []
        for group in opt.param_groups:
            b1, b2 = group["betas"]
            args.append(dict(group_scalars(group), grad_scale=scalar(grad_scale, dtype),
                             step_size=scalar(group["lr"] / (1.0 - xp.power(b1, t)), dtype),
                             bias_correction2_sqrt=scalar(xp.sqrt(1.0 - xp.power(b2, t)), dtype)))
        data = opt.flat.data
        for gi, lo, hi, s in self.segments:                                             # (Z3)
            e = s + hi - lo
            param = data[lo:hi]
            master = self.master[s:e] if self.master is not None else param
            if use_kernel:
                adamw_kernel(xp, self.grad[s:e], master, self.exp_avg[s:e], self.exp_avg_sq[s:e], param,
                             apply=ok, **args[gi])
                continue
            adamw_update(master, self.grad[s:e], self.exp_avg[s:e], self.exp_avg_sq[s:e], self.scratch[s:e],
                         **args[gi])
            if self.master is not None:
                param[...] = master
        for b, (lo, _) in enumerate(self.plan.buckets):                                 # (Z4)
            c = self.plan.chunk(b)
            if c:
                comm.allgather(data[lo:lo + self.plan.world_size * c])
        opt._update_scale(ok)

    # ---- checkpoints: the full state, gathered (every rank must call these together) ----------
    def _with_full_state(self, fn):
        opt = self.opt
        opt.exp_avg, opt.exp_avg_sq = self._full(self.exp_avg), self._full(self.exp_avg_sq)
        if self.master is not None:
            opt.master = self._full(self.master)
        try:
            return fn()
        finally:
            opt.exp_avg = opt.exp_avg_sq = None
            if self.master is not None:
                opt.master = None

    def state_dict(self):
        """``FlatAdamW.state_dict()`` of the whole optimizer (the moments gathered from every rank)."""
        return self._with_full_state(lambda: FlatAdamW.state_dict(self.opt))

    def master_state_dict(self, model):
        """``FlatAdamW.master_state_dict``: under fp16 the float32 masters gathered from every rank."""
        if self.master is None:
            return FlatAdamW.master_state_dict(self.opt, model)
        return self._with_full_state(lambda: FlatAdamW.master_state_dict(self.opt, model))

    def load_state_dict(self, sd):
        """Load a full state dict (written with any number of ranks) and keep my pieces of it."""
        opt, xp = self.opt, self.xp
        opt.exp_avg, opt.exp_avg_sq = xp.zeros(self.plan.total, self.exp_avg.dtype), xp.zeros(self.plan.total,
                                                                                            self.exp_avg.dtype)
        try:
            FlatAdamW.load_state_dict(opt, sd)
            self.exp_avg, self.exp_avg_sq = self._take(opt.exp_avg), self._take(opt.exp_avg_sq)
        finally:
            opt.exp_avg = opt.exp_avg_sq = None
