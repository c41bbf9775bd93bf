"""How many CPU threads the NumPy backend uses: the BLAS library's (matrix products) and npgpt's own
pool for elementwise work (``layers/_threads.py``), set together.

Why a default that looks at the machine: a BLAS thread that finds its core taken by another process
is not descheduled politely; the others spin waiting for it at every product. Measured here
(benchmarks/RESULTS.md, "CPU threads on a busy machine"): with one of two cores held by another
process, a 2-thread training step runs several times slower than a 1-thread one. So the default is the
number of cores this process may run on minus the cores other processes keep busy (the 1-minute load
average, read once at start), at least 1.

    threads = max(1, cores - round(load average))        cores = len(os.sched_getaffinity(0))

``NPGPT_THREADS`` or ``--threads`` (any command; ``npgpt train --threads N`` is a knob) overrides it.
The BLAS limit goes through ``threadpoolctl`` (OpenBLAS, MKL or BLIS, whichever NumPy loaded).
"""
import os

__all__ = ["cores", "default_threads", "set_threads", "get_threads", "use_threads"]

_current = None


def cores():
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                          # macOS, Windows
        return os.cpu_count() or 1


def default_threads():
    """(threads, why): ``NPGPT_THREADS`` if set, else the cores not kept busy by other processes."""
    env = os.environ.get("NPGPT_THREADS")
    if env:
        return _check(env, "NPGPT_THREADS"), "NPGPT_THREADS"
    n = cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):               # no load average on this platform
        return n, f"{n} cores"
    free = max(1, min(n, n - round(busy)))
    return free, f"{n} cores, load average {busy:.1f}"


def _check(value, what):
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a whole number of threads >= 1, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{what} must be >= 1 (0 or unset: choose from the machine), got {n}")
    return n


def set_threads(n):
    """Use ``n`` threads for BLAS products and for npgpt's elementwise pool; returns n."""
    global _current
    n = _check(n, "threads")
    from .layers.tuning import TUNING
    TUNING["numpy"]["threads"] = n
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                              # the pool still follows n; BLAS keeps its own
        pass
    else:
        threadpool_limits(n, user_api="blas")       # applied now, kept until changed
    _current = n
    return n


def get_threads():
    """The thread count set last (None before any ``set_threads``)."""
    return _current


def use_threads(n=0):
    """``set_threads(n)``, or with n = 0 (or None) the ``default_threads()``; returns (n, why)."""
    if n:
        return set_threads(n), "asked for"
    n, why = default_threads()
    return set_threads(n), why
