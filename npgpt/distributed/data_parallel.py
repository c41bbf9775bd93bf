"""Data-parallel training: N ranks, one model each, one gradient average per optimizer step.

With N ranks, gradient accumulation A and micro-batch b, one step sees N A b sequences. Rank r's
k-th micro-batch is the one a single process with accumulation N A would draw as micro-step
k N + r (``rank_batches``): every rank draws the whole single-process stream and keeps its share,
so the random-generator states stay equal on all ranks and a checkpoint resumes on any N. Each
rank scales its loss by 1/(A N) before backward; the sum over ranks of the accumulated gradients,

    g = sum_r sum_k  dL(batch k N + r) / dw  /  (A N)                    (D1)

is then the single process's mean gradient, up to the order of the additions (with N A a power of
two the scalings are exact, so 2 ranks x A=1 equal 1 process x A=2 bit for bit in float64). The
sum is taken in buckets as backward completes them (``buckets.py``): an all-reduce each, or with
ZeRO-1 a reduce-scatter each and an all-gather of the weights after the sharded update (``zero.py``).

``DataParallel(opt, comm, ...)`` wraps a ``FlatAdamW`` and keeps its interface (``backward``, ``step``,
``zero_grad``, ``set_lr``, state dicts; everything else is the wrapped optimizer's), so
``train_helpers.train_step`` drives it unchanged.
"""
from .. import backend
from ..engine import Tensor
from .buckets import BUCKET_BYTES, BucketPlan, GradientReadiness
from .zero import ZeroShards

__all__ = ["DataParallel", "rank_batches", "last_micro_batch_loss", "rank0_decides", "sum_over_ranks"]


class DataParallel:
    """``opt`` (a ``FlatAdamW``) stepped in step on every rank of ``comm``.

    ``accumulation_steps``: backward calls per step (the last arms the bucket hooks); ``zero``: ZeRO-1
    (shard the moments and fp32 masters) or plain all-reduce; ``bucket_bytes``: gradient bytes per
    collective (default ``BUCKET_BYTES``). At construction rank 0's weights are broadcast, so every rank
    starts from them.
    ``comm.seconds`` adds up the time spent waiting for collectives."""

    def __init__(self, opt, comm, accumulation_steps=1, zero=True, bucket_bytes=None):
        self.opt, self.comm, self.accumulation_steps = opt, comm, int(accumulation_steps)
        flat = opt.flat
        comm.broadcast(flat.data, root=0)                       # one starting point (C4)
        if opt.mixed:
            comm.broadcast(opt.master, root=0)
        elements = max(1, (bucket_bytes or BUCKET_BYTES) // flat.grad.dtype.itemsize)
        self.plan = BucketPlan(flat.offsets, [p.size for p in flat.params], flat.size, comm.size, elements)
        self.shards = ZeroShards(opt, self.plan, comm) if zero else None
        self.readiness = GradientReadiness(self.plan, flat.params, self._launch)
        self.inv_world = 1.0 / comm.size
        self._micro, self._handles = 0, []

    def __getattr__(self, name):          # param_groups, grad_norm, mixed, loss_scale, ... of the optimizer
        return getattr(self.opt, name)

    def backward(self, loss):
        """The wrapped backward of ``loss`` / N (D1); on the step's last micro-batch the buckets start
        as backward completes them."""
        self._micro += 1
        if self._micro == self.accumulation_steps:
            self.readiness.arm(loss)
        self.opt.backward(loss * self.inv_world)

    def _launch(self, b):
        if self.shards is not None:
            self._handles += self.shards.reduce(b)
        else:
            lo, hi = self.plan.buckets[b]
            self._handles.append(self.comm.allreduce(self.opt.flat.grad[lo:hi], overlap=True))

    def step(self):
        """Finish the gradient sum, then the update: the wrapped step, or ZeRO-1's sharded one."""
        self.readiness.flush()
        self.comm.wait(self._handles)
        self._handles, self._micro = [], 0
        if self.shards is not None:
            self.shards.step()
        else:
            self.opt.step()

    def zero_grad(self):
        self.opt.zero_grad()

    def set_lr(self, lr):
        self.opt.set_lr(lr)

    def state_dict(self):
        """The whole optimizer's state dict (gathered under ZeRO: every rank must call it)."""
        return self.shards.state_dict() if self.shards is not None else self.opt.state_dict()

    def load_state_dict(self, sd):
        return self.shards.load_state_dict(sd) if self.shards is not None else self.opt.load_state_dict(sd)

    def master_state_dict(self, model):
        if self.shards is not None:
            return self.shards.master_state_dict(model)
        return self.opt.master_state_dict(model)

    def memory_note(self):
        """One line on the optimizer state this rank holds."""
        if self.shards is None:
            held = sum(a.nbytes for a in (self.opt.exp_avg, self.opt.exp_avg_sq)) + (
                self.opt.master.nbytes if self.opt.mixed else 0)
            return (f"data parallel on {self.comm.size} ranks ({self.comm.name}), ZeRO off: optimizer state "
                    f"{held / 2**20:.1f} MiB per rank, {len(self.plan.buckets)} gradient bucket(s)")
        mine, full = self.shards.state_bytes()
        return (f"data parallel on {self.comm.size} ranks ({self.comm.name}), ZeRO-1: optimizer state "
                f"{mine / 2**20:.1f} MiB per rank (unsharded {full / 2**20:.1f} MiB), "
                f"{len(self.plan.buckets)} gradient bucket(s)")


def rank_batches(comm, draw, skip=None):
    """``next_batch()`` for this rank: of each run of N consecutive draws of the single-process stream
    ``draw()`` it returns draw number ``comm.rank`` and throws the others away (``skip()``, when
    given, advances the stream by one draw without building the batch)."""
    skip = skip or draw

    def next_batch():
        batch = None
        for q in range(comm.size):
            if q == comm.rank:
                batch = draw()
            else:
                skip()
        return batch
    return next_batch


def last_micro_batch_loss(comm, loss):
    """The loss one process would report for this step (its last micro-batch, N A - 1, which is rank
    N-1's last), on every rank; ``loss`` itself without ``comm``."""
    if comm is None:
        return loss
    buf = backend.xp.reshape(loss.data, (1,)).copy()
    comm.broadcast(buf, root=comm.size - 1)
    return Tensor(buf.reshape(()))


def rank0_decides(comm, flag):
    """Rank 0's ``flag`` on every rank (a decision from a clock must be the same everywhere)."""
    return flag if comm is None else comm.bcast_object(bool(flag), root=0)


def sum_over_ranks(comm, value):
    """A 0-d array or number summed over the ranks, as a Python float (in float64)."""
    buf = backend.xp.asarray(value, dtype="float64").reshape(1).copy()
    comm.allreduce(buf)
    return float(buf[0])
