"""Communicators: the collectives data-parallel training needs, on MPI (NumPy ranks) or NCCL (GPUs).

Every collective sums (the data-parallel mean is taken by scaling each rank's loss by 1/N before
backward) and works on contiguous 1-D arrays of the active backend, mostly views of the flat
gradient or weight buffer (``optim.flat.FlatParameters``). With N ranks and a buffer x_r on rank r:

    allreduce(x)              x_r <- sum_q x_q                              (C1) every rank, whole buffer
    reduce_scatter(x, out)    out_r <- sum_q x_q[r c : (r+1) c],  c = len(x) / N      (C2)
    allgather(x)              x[q c : (q+1) c] <- rank q's own chunk, on every rank   (C3) in place
    broadcast(x, root)        x_r <- x_root                                 (C4)

(C1) = (C2) then (C3): this is how ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models") keeps the same communication volume as plain data
parallelism while each rank updates only its chunk. A ring moves 2 (N-1)/N of the buffer's bytes per
rank for (C1) and (N-1)/N for each of (C2) and (C3) (Patarasuk & Yuan 2009).

``overlap=True`` starts the collective without waiting (MPI's nonblocking ``I*`` calls; for NCCL
the side stream of ``nccl.py``) and returns a handle for ``wait``; otherwise it is complete (MPI) or
ordered on the compute stream (NCCL) when the call returns. Host-side agreement (a flag, an object)
always goes through MPI. Here: the base class, ``MPICommunicator`` (NumPy buffers) and ``mpi()``,
the one place that imports mpi4py.
"""
import time

__all__ = ["Communicator", "MPICommunicator", "LaunchError", "mpi"]

MPI_FIX = 'pip install -e ".[mpi]"   (mpi4py and the mpich wheel, which ships mpiexec)'


class LaunchError(ValueError):
    """A parallel launch that cannot work (mpi4py missing, more ranks than GPUs on a node, mpiexec of
    another MPI than mpi4py's): one message naming the fix."""


def mpi(world):
    """The mpi4py ``MPI`` module (initializing MPI), or LaunchError when it is missing or when MPI's
    world does not match the launcher's (an ``mpiexec`` of one MPI starting a mpi4py built for another:
    every process then sees a world of one)."""
    try:
        from mpi4py import MPI     # the one mpi4py import; a single process never reaches it
    except ImportError as e:
        raise LaunchError(f"{world.launcher} started {world.size} ranks but mpi4py is not installed ({e}); "
                          f"install it with {MPI_FIX}") from None
    size = MPI.COMM_WORLD.Get_size()
    if size != world.size:
        raise LaunchError(f"{world.launcher} started {world.size} ranks but MPI sees {size}: mpi4py is built for "
                          f"another MPI than this launcher's; use the mpiexec of the MPI mpi4py was built for "
                          f"(with the mpich wheel: python -m pip show -f mpich; under Slurm: srun --mpi=pmi2)")
    return MPI


class Communicator:
    """What the training loop and the optimizer call; ``rank``, ``size``, ``local_rank`` (this process's
    place on its node: which GPU it takes) and ``local_size``; ``name`` ("mpi" or "nccl").
    ``seconds`` adds up the time spent waiting for collectives (the benchmark reads it)."""

    name = "?"

    def __init__(self, MPI):
        self.MPI = MPI
        self.world = MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        node = self.world.Split_type(MPI.COMM_TYPE_SHARED)           # the ranks sharing this node
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.seconds = 0.0

    # ---- host-side agreement (always MPI) ---------------------------------------------------------
    def bcast_object(self, obj, root=0):
        """``obj`` of rank ``root`` on every rank (any picklable value)."""
        return self.world.bcast(obj, root=root)

    def allreduce_min(self, value):
        """The smallest of the ranks' Python numbers."""
        return self.world.allreduce(value, op=self.MPI.MIN)

    def barrier(self):
        self.world.Barrier()

    def abort(self, code=1):
        """End every rank of the job now (MPI_Abort: the launcher kills the others)."""
        self.world.Abort(code)

    # ---- device collectives (subclasses) ----------------------------------------------------------
    def allreduce(self, buf, out=None, overlap=False):
        raise NotImplementedError

    def reduce_scatter(self, buf, out, overlap=False):
        raise NotImplementedError

    def allgather(self, buf, overlap=False):
        raise NotImplementedError

    def broadcast(self, buf, root=0):
        raise NotImplementedError

    def wait(self, handles):
        raise NotImplementedError


class MPICommunicator(Communicator):
    """(C1)-(C4) on NumPy arrays with MPI. Nonblocking calls return MPI requests; MPICH makes progress
    on them inside later MPI calls (and in ``wait``), so on the CPU they mostly run at the step."""

    name = "mpi"

    def allreduce(self, buf, out=None, overlap=False):
        send = self.MPI.IN_PLACE if out is None else buf
        recv = buf if out is None else out
        if overlap:
            return self.world.Iallreduce(send, recv, op=self.MPI.SUM)
        self._timed(self.world.Allreduce, send, recv, op=self.MPI.SUM)

    def reduce_scatter(self, buf, out, overlap=False):
        if buf.size != out.size * self.size:
            raise ValueError(f"reduce_scatter of {buf.size} elements into chunks of {out.size} on {self.size} ranks")
        if overlap:
            return self.world.Ireduce_scatter_block(buf, out, op=self.MPI.SUM)
        self._timed(self.world.Reduce_scatter_block, buf, out, op=self.MPI.SUM)

    def allgather(self, buf, overlap=False):
        if buf.size % self.size:
            raise ValueError(f"allgather of {buf.size} elements on {self.size} ranks (not a multiple)")
        if overlap:
            return self.world.Iallgather(self.MPI.IN_PLACE, buf)
        self._timed(self.world.Allgather, self.MPI.IN_PLACE, buf)

    def broadcast(self, buf, root=0):
        self._timed(self.world.Bcast, buf, root=root)

    def wait(self, handles):
        handles = [h for h in handles if h is not None]
        if handles:
            self._timed(self.MPI.Request.Waitall, handles)

    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        fn(*args, **kwargs)
        self.seconds += time.perf_counter() - start

