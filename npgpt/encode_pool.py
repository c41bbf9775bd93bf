"""Encoding ``npgpt prepare``'s tasks on a process pool, in input order, with bounded memory.

A task is ~1 MB of text (``prepare._tasks``); ``encode_in_order`` yields each task's ids in order,
from the calling process or from a pool of workers (forked where possible, so they inherit the
loaded tokenizer; else spawned, loading it by name), with at most 2 tasks a worker in flight, so
memory stays bounded however large the input.

When the pool pays (``use_pool``): each worker starts with a cold per-pre-token cache, and starting
the pool and shipping text and ids between processes cost too, so a small input is faster in one
process; and the pool gains only where the other cores are free. On the 2-core machine, idle, the pool
of 2 was 1.21x faster than one process at 2 MB, 1.19x at 4 MB, 1.45x at 8 MB and 1.71x at 16 MB
(``python benchmarks/bench_prepare.py --crossover 2 4 8 16``, benchmarks/RESULTS.md), so
``POOL_MIN_BYTES`` is 2 MiB (two ~1 MB tasks); with the other core busy one process won at every size,
which is why ``prepare``'s default worker count is the cores left free (``threads.default_threads``).
Characters are a vectorized lookup and never use the pool.
"""
import collections
import multiprocessing

__all__ = ["POOL_MIN_BYTES", "use_pool", "encode_in_order", "worker_tokenizer"]

POOL_MIN_BYTES = 2 << 20          # the pool of 2 won from 2 MB up on an idle 2-core machine (see above)

_worker_tok = None


def use_pool(tokenizer, workers, total_bytes):
    """Whether to encode on a pool of ``workers`` processes: BPE tokenizers (not "char") on more
    than one worker for inputs over POOL_MIN_BYTES."""
    return tokenizer != "char" and workers > 1 and total_bytes > POOL_MIN_BYTES


def _init_worker(name, tok=None):
    """Worker set-up: the parent's tokenizer when forked, else load it by name (spawn)."""
    global _worker_tok
    if tok is None:
        from .tokenizer import tokenizer_from_name
        tok = tokenizer_from_name(name)
    _worker_tok = tok


def worker_tokenizer():
    """The tokenizer of this worker process (set when the pool started it)."""
    return _worker_tok


def _task_bytes(task):
    return sum(len(c.encode("utf-8", errors="surrogatepass")) for _, c in task if c)


def encode_in_order(tasks, encode, tok, tokenizer, workers, parallel, skip=0):
    """Yield (task index, *``encode(task, tok)``) for each task, in order; ``encode`` returns
    ([train ids, val ids], bytes covered). The first ``skip`` tasks are not encoded: (index, None,
    their bytes). With ``parallel``, ``workers`` processes run ``encode(task)`` (a module-level
    function, their tokenizer from ``worker_tokenizer()``) with at most 2 tasks per worker in
    flight (~2 MB of text a worker); ``tokenizer`` is the name a spawned worker loads."""
    if not parallel:
        for t, task in enumerate(tasks):
            yield (t, None, _task_bytes(task)) if t < skip else (t, *encode(task, tok))
        return
    if "fork" in multiprocessing.get_all_start_methods():   # workers inherit the loaded tokenizer
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer, tok))
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,))
    pending = collections.deque()
    try:
        for t, task in enumerate(tasks):
            if t < skip:
                pending.append((t, None, _task_bytes(task)))
            else:
                pending.append((t, pool.apply_async(encode, (task,)), None))
            while len(pending) > 2 * workers or (pending and pending[0][1] is None):
                t0, result, nbytes = pending.popleft()
                yield (t0, None, nbytes) if result is None else (t0, *result.get())
        while pending:
            t0, result, nbytes = pending.popleft()
            yield (t0, None, nbytes) if result is None else (t0, *result.get())
    finally:
        pool.terminate()
