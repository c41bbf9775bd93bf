"""Data-parallel training across processes: MPI on NumPy (CPU ranks), NCCL on CuPy (one GPU per rank),
with ZeRO-1 sharding of the optimizer state.

    mpiexec -n 4 npgpt train ...          every rank runs the same command (srun under Slurm)

    env.py            which rank am I: the launcher's environment (a single process imports no MPI)
    comm.py, nccl.py  the collectives (all-reduce, reduce-scatter, all-gather, broadcast) on MPI / NCCL
    buckets.py        the flat gradient in buckets, launched as backward completes them
    zero.py           ZeRO-1: 1/N of the AdamW moments and fp32 masters per rank
    data_parallel.py  the optimizer wrapper, the data order, the loss and decisions all ranks share
    launch.py         connecting, set-up errors agreed on, failing together (MPI_Abort), rank-0 logging
"""
from .env import World, world_from_env
from .comm import LaunchError
from .launch import agree, connect, fail_together, is_rank0, rank0_first, rank0_log, setup_phase
from .data_parallel import DataParallel, last_micro_batch_loss, rank0_decides, rank_batches, sum_over_ranks

__all__ = ["World", "world_from_env", "LaunchError", "connect", "setup_phase", "agree", "rank0_first",
           "fail_together", "rank0_log", "is_rank0", "DataParallel", "rank_batches", "last_micro_batch_loss",
           "rank0_decides", "sum_over_ranks"]
