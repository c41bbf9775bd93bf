"""Who this process is in a parallel launch, read from the launcher's environment (no MPI import).

``mpiexec -n N`` (MPICH's Hydra, Open MPI) and ``srun`` (Slurm) start N copies of one command and tell
each its rank through environment variables. Reading them first lets a single process (``npgpt
train`` on its own) stay exactly what it was: no ``mpi4py`` import, no communicator, no extra work.
The local rank (which GPU a process takes) comes later from MPI itself (``COMM_TYPE_SHARED``), which
is right under every launcher.

    world_from_env()        -> World(rank=1, size=2, launcher="MPICH (Hydra)")   under mpiexec -n 2
                            -> World(rank=0, size=1, launcher=None)              a plain process
"""
import os
from dataclasses import dataclass

__all__ = ["World", "world_from_env", "LAUNCH_VARIABLES"]

# (launcher, rank variable, size variable), tried in this order. Slurm's size is the *step's* task
# count (set by srun only): a batch script itself sees SLURM_NTASKS=N but is one process.
LAUNCH_VARIABLES = (
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("MPICH (Hydra)", "PMI_RANK", "PMI_SIZE"),
    ("PMIx", "PMIX_RANK", "PMIX_SIZE"),
    ("Slurm (srun)", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
)


@dataclass(frozen=True)
class World:
    """This process's place in the launch: ``rank`` in [0, ``size``), and the launcher that set it
    (None for a plain process, whose world is ``World(0, 1, None)``)."""
    rank: int = 0
    size: int = 1
    launcher: str = None

    @property
    def parallel(self):
        return self.size > 1


def world_from_env(environ=None):
    """The ``World`` that the first launcher found in ``environ`` (default ``os.environ``) describes.
    Raises ValueError when its variables are not integers or the rank lies outside [0, size)."""
    environ = os.environ if environ is None else environ
    for launcher, rank_var, size_var in LAUNCH_VARIABLES:
        if rank_var in environ and size_var in environ:
            try:
                rank, size = int(environ[rank_var]), int(environ[size_var])
            except ValueError:
                raise ValueError(f"{rank_var}={environ[rank_var]!r} and {size_var}={environ[size_var]!r} "
                                 f"({launcher}) must be integers") from None
            if not 0 <= rank < size:
                raise ValueError(f"{rank_var}={rank} lies outside [0, {size_var}={size}) ({launcher})")
            return World(rank, size, launcher)
    return World()
