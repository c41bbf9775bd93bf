"""Keep freed array memory in the process, so a training step does not page-fault its activations in
again every step.

Why. NumPy takes each array's memory from C ``malloc``. glibc serves a large request (above its
*mmap threshold*, 128 KiB at start, growing to at most 32 MiB) with a fresh ``mmap`` and gives it back
to the kernel on ``free``; a block freed at the top of the heap is also given back once more than the
*trim threshold* is free. A training step allocates every activation and gradient anew and frees
them when the graph is dropped, so every step the kernel unmaps tens of megabytes, then maps and
zero-fills them again on first touch, one page fault per 4 KiB page. Measured on the baby model
(benchmarks/RESULTS.md, "The allocator"): about 11,800 page faults and 44 ms of kernel time per
step (a quarter of the step), against ~30 faults for PyTorch, whose CPU allocator keeps its memory.

What. ``mallopt(M_MMAP_THRESHOLD, 1 GiB)`` serves arrays up to 1 GiB from the heap, and
``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)`` keeps freed heap memory in the process, so the next step
reuses the same pages. The cost: the process keeps the memory of its largest step until it exits
(its peak, which it reached anyway). ``mallopt(M_ARENA_MAX, 1)``: every thread allocates from that one
heap, so memory one thread frees is reused by the others (``replicas.py`` runs a step on several
threads; with glibc's default arena per thread each kept its own freed memory, and the small-config
step's peak varied from 710 to 1,062 MB between identical runs, against 849 MB every time with one
arena: benchmarks/RESULTS.md). Only glibc (Linux) has these knobs; elsewhere nothing changes.
``NPGPT_KEEP_MEMORY=0`` turns it off.
"""
import ctypes
import os

__all__ = ["keep_freed_memory", "kept"]

M_TRIM_THRESHOLD = -1        # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 1 << 30     # arrays up to 1 GiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1   # the largest int: freed heap memory stays in the process

_kept = None


def keep_freed_memory():
    """Apply the three ``mallopt`` settings once (glibc only; ``NPGPT_KEEP_MEMORY=0``: never); returns
    whether they are in effect."""
    global _kept
    if _kept is not None:
        return _kept
    _kept = False
    if os.environ.get("NPGPT_KEEP_MEMORY", "1") == "0" or not _glibc():
        return _kept
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return _kept
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) \
        and bool(mallopt(M_ARENA_MAX, 1))
    return _kept


def _glibc():
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def kept():
    """Whether ``keep_freed_memory`` is in effect."""
    return bool(_kept)
