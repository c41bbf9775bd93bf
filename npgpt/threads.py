"""How many CPU threads the NumPy backend uses: the BLAS library's (matrix products) and npgpt's own
pool for elementwise work (``layers/_threads.py``), set together.

Why a default that looks at the machine: a BLAS thread that finds its core taken by another process
is not descheduled politely; the others spin waiting for it at every product. Measured here
(benchmarks/RESULTS.md, "CPU threads on a busy machine"): with one of two cores held by another
process, a 2-thread training step runs several times slower than a 1-thread one. So the default is the
number of cores this process may run on minus the cores other processes keep busy right now (their
non-idle share over 0.1 s in ``/proc/stat``, measured once at start; the 1-minute load average where
there is none), at least 1.

    threads = max(1, cores - round(busy cores))        cores = len(os.sched_getaffinity(0))

``NPGPT_THREADS`` or ``--threads`` (any command; ``npgpt train --threads N`` is a knob) overrides it.
The BLAS limit goes through ``threadpoolctl`` (OpenBLAS, MKL or BLIS, whichever NumPy loaded).
"""
import contextlib
import os
import time

__all__ = ["ThreadsError", "cores", "default_threads", "set_threads", "get_threads", "use_threads", "blas_threads"]

_current = None
_blas = None          # threadpoolctl's controllers of the loaded BLAS libraries (_blas_libraries)


class ThreadsError(ValueError):
    """A thread count that is not a whole number >= 1 (from --threads or NPGPT_THREADS)."""


def cores():
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                          # macOS, Windows
        return os.cpu_count() or 1


def default_threads():
    """(threads, why): ``NPGPT_THREADS`` if set, else the cores not kept busy by other processes."""
    env = os.environ.get("NPGPT_THREADS")
    if env:                                          # (a parallel launch sets it, and says why)
        return _check(env, "NPGPT_THREADS"), os.environ.get("NPGPT_THREADS_WHY", "NPGPT_THREADS")
    n = cores()
    busy, how = busy_cores()
    if busy is None:
        return n, f"{n} cores"
    free = max(1, min(n, n - round(busy)))
    return free, f"{n} cores, {busy:.1f} busy {how}"


def busy_cores(window=0.1):
    """(cores kept busy by other processes, how it was measured), or (None, why not).

    On Linux: the share of non-idle time of this process's CPUs in ``/proc/stat`` over ``window``
    seconds, times their number, less what this process itself used meanwhile (it sleeps, but its
    BLAS workers spin for ~0.1 s after a product: a second run in one process must not count them).
    This is what is busy now; the 1-minute load average, used where there is no ``/proc/stat``, lags
    by a minute (a benchmark that just ended still counts) and is the fallback."""
    try:
        ids = sorted(os.sched_getaffinity(0))
        before, own, t = _cpu_times(ids), time.process_time(), time.perf_counter()
        time.sleep(window)
        after, own, t = _cpu_times(ids), time.process_time() - own, time.perf_counter() - t
        total = sum(a - b for a, b in zip(after[0], before[0]))
        idle = sum(a - b for a, b in zip(after[1], before[1]))
        if total > 0:
            return max(0.0, len(ids) * (1.0 - idle / total) - own / t), "now"
    except (AttributeError, OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0], "(1-minute load average)"
    except (AttributeError, OSError):                # no load average on this platform
        return None, "unknown"


def _cpu_times(ids):
    """(total, idle + iowait) jiffies of each CPU in ``ids``, from /proc/stat."""
    wanted, total, idle = {f"cpu{i}" for i in ids}, [], []
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name in wanted:
                values = [int(v) for v in fields[:8]]     # user nice system idle iowait irq softirq steal
                total.append(sum(values))
                idle.append(values[3] + values[4])
    if len(total) != len(ids):
        raise ValueError("not every CPU of the affinity mask is in /proc/stat")
    return total, idle


def _check(value, what):
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ThreadsError(f"{what} must be a whole number of threads >= 1, got {value!r}") from None
    if n < 1:
        raise ThreadsError(f"{what} must be >= 1 (0 or unset: choose from the machine), got {n}")
    return n


def set_threads(n):
    """Use ``n`` threads for BLAS products and for npgpt's elementwise pool; returns n."""
    global _current
    n = _check(n, "threads")
    from .layers.tuning import TUNING
    TUNING["numpy"]["threads"] = n
    for lib in _blas_libraries(rescan=True):         # applied now, kept until changed
        lib.set_num_threads(n)
    _current = n
    return n


def _blas_libraries(rescan=False):
    """threadpoolctl's controllers of the BLAS libraries loaded now (found again with ``rescan``, else
    the list found last); none without threadpoolctl, and then the pool still follows the thread
    count while BLAS keeps its own."""
    global _blas
    if _blas is None or rescan:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _blas = []
        else:
            _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas


@contextlib.contextmanager
def blas_threads(n):
    """Inside, BLAS products use ``n`` threads; the previous count afterwards. A ctypes call each way
    (~1 us), so it may wrap every training step (``npgpt/replicas.py``: one thread per replica)."""
    libs = _blas_libraries()
    old = [lib.num_threads for lib in libs]
    for lib in libs:
        lib.set_num_threads(n)
    try:
        yield
    finally:
        for lib, k in zip(libs, old):
            lib.set_num_threads(k)


def get_threads():
    """The thread count set last (None before any ``set_threads``)."""
    return _current


def use_threads(n=0):
    """``set_threads(n)``, or with n = 0 (or None) the ``default_threads()``; returns (n, why)."""
    if n:
        return set_threads(n), "asked for"
    n, why = default_threads()
    return set_threads(n), why
