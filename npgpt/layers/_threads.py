"""Elementwise and row-wise NumPy work split over a small thread pool.

NumPy ufuncs release the GIL, so a large array cut into one block of rows per thread runs the
blocks concurrently. Every element or row is computed by the same code as in one call, so results
are bit-identical with and without threads. The pool size and the size below which threads do not
pay are tuning constants (``layers/tuning.py``); CuPy arrays always run in one call.

Inside ``serial()`` a thread runs its kernels itself, in one call: the threads of ``npgpt/replicas.py``
each compute their own block of the batch, so the cores are already shared out.
"""
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .tuning import tuned

__all__ = ["run_chunked", "serial"]

_POOL = None
_CPUS = os.cpu_count() or 1   # read once
_local = threading.local()    # .serial: this thread runs its kernels in one call


@contextlib.contextmanager
def serial():
    """Inside, ``run_chunked`` in this thread calls its kernel once, on the whole arrays."""
    old, _local.serial = getattr(_local, "serial", False), True
    try:
        yield
    finally:
        _local.serial = old


def run_chunked(kernel, *arrays):
    """kernel(*arrays) for arrays that share their first axis, where the kernel treats each index
    of that axis on its own (elementwise, or row by row) and writes its results in place.
    Large NumPy arrays (at least ``threads_min_elements``) are cut into one block of that axis per
    thread; the blocks run concurrently."""
    global _POOL
    first = arrays[0]
    if (not isinstance(first, np.ndarray) or first.size < tuned(np, "threads_min_elements")
            or getattr(_local, "serial", False)):
        kernel(*arrays)
        return
    n_threads = min(tuned(np, "threads"), _CPUS)
    n = first.shape[0]
    if min(n_threads, n) < 2:
        kernel(*arrays)
        return
    if _POOL is None or _POOL._max_workers != n_threads:
        _POOL = ThreadPoolExecutor(n_threads, thread_name_prefix="npgpt-elementwise")
    cuts = [n * i // n_threads for i in range(n_threads + 1)]
    jobs = [_POOL.submit(kernel, *(a[lo:hi] for a in arrays)) for lo, hi in zip(cuts[:-1], cuts[1:])]
    for job in jobs:
        job.result()
