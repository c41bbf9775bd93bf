"""NCCL on CuPy: the collectives of ``comm.py`` on GPU buffers, one GPU per local rank.

NCCL (NVIDIA Collective Communications Library) runs each collective as a CUDA kernel on a stream,
over NVLink inside a node and InfiniBand / sockets between nodes. Its communicator needs a unique id
that one rank makes and all others receive: MPI broadcasts it (as llm.c does), then every rank calls
``ncclCommInitRank(size, id, rank)``.

Streams: a collective issued with ``overlap=True`` (a gradient bucket, during backward) runs on a
side stream after an event recorded on the compute stream (so it reads finished gradients), and its
handle is an event recorded after it; ``wait`` makes the compute stream wait for those events, so
the host never blocks. Without overlap a collective is queued on the compute stream itself.
CuPy is reached through ``backend.xp`` (``backend.py`` is the one file that imports it).
"""
import time

from .. import backend
from .comm import Communicator, LaunchError

__all__ = ["NCCLCommunicator", "select_gpu"]

NCCL_FIX = ("CuPy finds no NCCL library; install one matching your CUDA (pip install nvidia-nccl-cu12, "
            "or python -m cupyx.tools.install_library --library nccl --cuda 12.x)")


def select_gpu(local_rank, local_size, host=""):
    """Make GPU ``local_rank`` this process's device; LaunchError when the node has fewer GPUs than
    ranks (each rank needs its own)."""
    cp = backend.use("cupy")
    count = cp.cuda.runtime.getDeviceCount()
    if local_size > count:
        raise LaunchError(f"{local_size} ranks share node {host or '?'} but it has {count} GPU(s); start at most "
                          f"{count} ranks per node (mpiexec -n {count}, or --ppn / --ntasks-per-node {count})")
    cp.cuda.Device(local_rank).use()
    return cp


class NCCLCommunicator(Communicator):
    """(C1)-(C4) on CuPy arrays with NCCL; host agreement over MPI (``Communicator``)."""

    name = "nccl"

    def __init__(self, MPI):
        super().__init__(MPI)
        cp = self.cp = select_gpu(self.local_rank, self.local_size, MPI.Get_processor_name())
        nccl = self.nccl = getattr(cp.cuda, "nccl", None)
        if nccl is None or not getattr(cp.cuda, "nccl_enabled", True):
            raise LaunchError(NCCL_FIX)
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.world.bcast(uid, root=0)                      # the id over MPI
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.side = cp.cuda.Stream(non_blocking=True)            # where overlapped buckets run
        self.types = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32,
                      "float64": nccl.NCCL_FLOAT64, "int64": nccl.NCCL_INT64}

    def _type(self, buf):
        try:
            return self.types[buf.dtype.name]
        except KeyError:
            raise TypeError(f"NCCL collectives here take {sorted(self.types)}, not {buf.dtype}") from None

    def _stream(self, overlap):
        """The stream to issue on: the compute stream, or the side stream ordered after it."""
        main = self.cp.cuda.get_current_stream()
        if not overlap:
            return main
        ready = self.cp.cuda.Event(disable_timing=True)
        ready.record(main)
        self.side.wait_event(ready)
        return self.side

    def _handle(self, overlap):
        if not overlap:
            return None
        done = self.cp.cuda.Event(disable_timing=True)
        done.record(self.side)
        return done

    def allreduce(self, buf, out=None, overlap=False):
        out = buf if out is None else out
        stream = self._stream(overlap)
        self.comm.allReduce(buf.data.ptr, out.data.ptr, buf.size, self._type(buf), self.nccl.NCCL_SUM, stream.ptr)
        return self._handle(overlap)

    def reduce_scatter(self, buf, out, overlap=False):
        if buf.size != out.size * self.size:
            raise ValueError(f"reduce_scatter of {buf.size} elements into chunks of {out.size} on {self.size} ranks")
        stream = self._stream(overlap)
        self.comm.reduceScatter(buf.data.ptr, out.data.ptr, out.size, self._type(buf), self.nccl.NCCL_SUM,
                                stream.ptr)
        return self._handle(overlap)

    def allgather(self, buf, overlap=False):
        if buf.size % self.size:
            raise ValueError(f"allgather of {buf.size} elements on {self.size} ranks (not a multiple)")
        chunk = buf.size // self.size
        own = buf[self.rank * chunk:(self.rank + 1) * chunk]     # in place: send = recv + rank * chunk
        stream = self._stream(overlap)
        self.comm.allGather(own.data.ptr, buf.data.ptr, chunk, self._type(buf), stream.ptr)
        return self._handle(overlap)

    def broadcast(self, buf, root=0):
        stream = self._stream(False)
        self.comm.bcast(buf.data.ptr, buf.size, self._type(buf), root, stream.ptr)

    def wait(self, handles):
        main = self.cp.cuda.get_current_stream()
        start = time.perf_counter()
        for event in handles:
            if event is not None:
                main.wait_event(event)
        self.seconds += time.perf_counter() - start

    def abort(self, code=1):
        """Abort NCCL's kernels first (a rank blocked in one would not see MPI_Abort), then MPI."""
        try:
            self.comm.abort()
        finally:
            super().abort(code)
