"""Starting and ending a parallel run: connect the ranks, agree on set-up errors, fail together.

Under ``mpiexec -n N`` / ``srun`` every rank runs the same ``npgpt train``. Three rules keep that
from ever hanging or printing N copies of one message:

1. Set-up (``setup_phase``): an error on any rank is shared with one MPI all-reduce at the end of
   the phase; the lowest failing rank raises its error (printed once, as a single process prints
   it) and every other rank exits quietly with status 2. Nobody is inside a collective, so all end.
2. The run (``fail_together``): an exception on any rank prints one message (rank 0's at once, any
   other rank's after ``PEER_GRACE`` seconds, so a failure every rank shares is reported once, by
   rank 0) and calls MPI_Abort (NCCL's communicator is aborted first), which the launcher turns into
   the end of every rank. A rank killed outright is noticed by the launcher itself (MPICH's Hydra,
   Open MPI and Slurm end the job), and ``sys.excepthook`` aborts on anything that escapes.
3. Only rank 0 logs (``rank0_log``), shows the progress bar and writes files.

On the CPU the ranks of a node share its cores: unless ``--threads`` or ``NPGPT_THREADS`` says otherwise,
each takes cores / (ranks on the node) threads.
"""
import os
import sys
import time
import traceback
from contextlib import contextmanager

from .comm import LaunchError, MPICommunicator, mpi
from .env import world_from_env

__all__ = ["connect", "setup_phase", "agree", "rank0_first", "fail_together", "rank0_log", "is_rank0",
           "PEER_GRACE"]

PEER_GRACE = 1.0     # seconds a failing rank > 0 waits for rank 0 to report a failure they share
FORWARD_GRACE = 0.3  # seconds between the message and MPI_Abort, for the launcher to forward the message


def connect(device="cpu"):
    """The communicator of this launch, or None for a single process (then nothing is imported).
    ``device``: "cpu" (MPI on NumPy buffers) or "cuda" (NCCL, GPU ``local_rank`` of this node).
    Raises LaunchError (on rank 0; the others exit quietly) when mpi4py is missing or the node has
    fewer GPUs than ranks."""
    world = world_from_env()
    if not world.parallel:
        return None
    try:
        MPI = mpi(world)
    except LaunchError:
        if world.rank != 0:
            raise SystemExit(2) from None          # rank 0 says it, once
        raise
    comm = MPICommunicator(MPI)
    if device != "cuda" and not os.environ.get("NPGPT_THREADS"):
        # the ranks on a node share its cores: left to itself each would count them all (npgpt/threads.py)
        from ..threads import cores
        os.environ["NPGPT_THREADS"] = str(max(1, cores() // comm.local_size))
        os.environ["NPGPT_THREADS_WHY"] = f"{cores()} cores shared by {comm.local_size} ranks on this node"
    if device == "cuda":
        from .nccl import NCCLCommunicator
        with setup_phase(comm):
            comm = NCCLCommunicator(MPI)
    _abort_on_uncaught(comm)
    return comm


def is_rank0(comm):
    return comm is None or comm.rank == 0


def rank0_log(comm, log):
    """``log`` on rank 0 (or without ``comm``), a function that prints nothing elsewhere."""
    return log if is_rank0(comm) else (lambda *args, **kwargs: None)


def agree(comm, error):
    """End of a set-up phase: if any rank has an ``error``, the lowest such rank raises it and every
    other rank raises SystemExit(2) (quietly); otherwise return. One all-reduce."""
    first = comm.allreduce_min(comm.rank if error is not None else comm.size)
    if first == comm.size:
        return
    if error is not None and comm.rank == first:
        raise error
    raise SystemExit(2)


@contextmanager
def setup_phase(comm):
    """Run the block on every rank, then ``agree`` on its errors (nothing to do without ``comm``)."""
    if comm is None:
        yield
        return
    error = None
    try:
        yield
    except BaseException as e:        # KeyboardInterrupt too: every rank must reach the agreement
        error = e
    agree(comm, error)


def rank0_first(comm, fn, *args):
    """``fn(*args)`` on rank 0, then (once it succeeded) on the others: e.g. preparing the default
    data set, which only one process may write."""
    if comm is None:
        return fn(*args)
    result, error = None, None
    if comm.rank == 0:
        try:
            result = fn(*args)
        except BaseException as e:
            error = e
    agree(comm, error)
    return result if comm.rank == 0 else fn(*args)


def _exit_code_and_message(error, prog):
    """How a single ``npgpt train`` would end on ``error``: (status, message or None for a traceback)."""
    from ..backend import BackendError
    from ..checkpoint import CheckpointError
    from ..run_dir import OutDirLocked, TrainingDiverged
    if isinstance(error, KeyboardInterrupt):
        return 130, f"{prog}: interrupted"
    if isinstance(error, TrainingDiverged):
        return 1, f"{prog}: error: {error}"
    if isinstance(error, (FileNotFoundError, BackendError, CheckpointError, OutDirLocked, ValueError)):
        return 2, f"{prog}: error: {error}"
    if isinstance(error, SystemExit):
        return (error.code if isinstance(error.code, int) else 1), None
    return 1, None


@contextmanager
def fail_together(comm, prog="npgpt train"):
    """Run the block; on any exception print one message and end every rank (see the module doc)."""
    if comm is None:
        yield
        return
    try:
        yield
    except BaseException as error:
        report_and_abort(comm, error, prog)


def report_and_abort(comm, error, prog="npgpt train"):
    code, message = _exit_code_and_message(error, prog)
    if comm.rank != 0:
        time.sleep(PEER_GRACE)             # a failure all ranks share: rank 0 reports it and aborts first
        prefix = f"{prog}: rank {comm.rank} of {comm.size}"
        message = message and message.replace(f"{prog}:", f"{prefix}:", 1)
    text = ""
    if message is None:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        message = f"{prog}: rank {comm.rank} of {comm.size} failed with {type(error).__name__}: {error}"
    if not (isinstance(error, SystemExit) and code == 0):
        text += f"{message}; stopping all {comm.size} ranks\n"
    sys.stdout.flush()
    sys.stderr.write(text)                 # one write: the launcher forwards it before the abort's kill
    sys.stderr.flush()
    time.sleep(FORWARD_GRACE)
    comm.abort(code)


def _abort_on_uncaught(comm):
    """An exception that escapes everything else still ends every rank (not just this one)."""
    default = sys.excepthook

    def hook(kind, value, tb):
        default(kind, value, tb)
        sys.stderr.flush()
        comm.abort(1)
    sys.excepthook = hook
