"""The output directory of a training run and the run's guards: one writer at a time (a lock file
holding pid and host; a stale one is replaced), leftover temporary files removed, a checkpoint never
overwritten unless asked, SIGTERM handled like Ctrl-C, and a check that weights are finite before
they are saved.
"""
import json
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager

from . import backend
from .checkpoint import CheckpointError, remove_orphan_temporaries
from .loading import CKPT_NAME

__all__ = ["LOCK_NAME", "TrainingDiverged", "OutDirLocked", "OutDirLock", "prepare_out_dir", "remove_if_empty",
           "sigterm_as_interrupt", "all_finite"]

LOCK_NAME = "train.lock"    # {"pid", "host"} of the run writing to out_dir


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights became inf/nan: the run stopped without saving them."""


class OutDirLocked(RuntimeError):
    """Another ``npgpt train`` is writing to this out_dir."""


# ---- the output directory: its lock, leftovers, and what a run may overwrite -------------------------

def _pid_alive(pid):
    """Whether process ``pid`` runs on this host (signal 0 checks without sending anything)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process
        return True
    except (OverflowError, OSError):
        return False
    return True


class OutDirLock:
    """``out_dir/train.lock``, created atomically (O_CREAT | O_EXCL) with this process's pid and host:
    a second writer fails with ``OutDirLocked``; a lock whose process is gone (same host, pid not
    running) is stale and replaced with a message. ``release()`` removes it."""

    def __init__(self, out_dir, log=print):
        self.path, self.held = os.path.join(out_dir, LOCK_NAME), False
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or holder.get("host") != me["host"] or _pid_alive(holder.get("pid")):
                    who = "another npgpt train" if holder is None else \
                        f"another npgpt train (pid {holder.get('pid')} on {holder.get('host')})"
                    raise OutDirLocked(f"{out_dir} is in use by {who}; wait for it to finish or choose another "
                                       f"--out_dir (if that run is gone, delete {self.path})") from None
                log(f"removing the stale lock {self.path} (pid {holder.get('pid')} is not running)")
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise OutDirLocked(f"could not lock {out_dir}: {self.path} keeps reappearing (another run starting?)")

    def _holder(self):
        """The lock's {"pid", "host"}; an unreadable one counts as stale after 5 s (a writer fills it at
        once), as held before."""
        try:
            with open(self.path) as f:
                holder = json.load(f)
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                return holder
        except FileNotFoundError:
            return {"pid": -1, "host": socket.gethostname()}          # released meanwhile: stale, retry
        except (OSError, ValueError):
            pass
        try:
            old = time.time() - os.path.getmtime(self.path) > 5
        except OSError:
            old = True
        return {"pid": -1, "host": socket.gethostname()} if old else None

    def release(self):
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def prepare_out_dir(cfg, log=print):
    """Create ``cfg.out_dir`` if needed and lock it; remove orphan temporary files of a killed save;
    refuse to start a new run (scratch or init_from=PATH) over an existing checkpoint unless
    ``cfg.overwrite``. Returns (lock, created: whether this call made the directory)."""
    created = not os.path.isdir(cfg.out_dir)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create out_dir {cfg.out_dir}: {e.strerror or e}") from None
    lock = OutDirLock(cfg.out_dir, log)
    try:
        removed = remove_orphan_temporaries(cfg.out_dir)
        if removed:
            log(f"removed {len(removed)} temporary file(s) left in {cfg.out_dir} by an interrupted save: "
                f"{' '.join(removed)}")
        ckpt = os.path.join(cfg.out_dir, CKPT_NAME)
        if cfg.init_from != "resume" and os.path.exists(ckpt) and not cfg.overwrite:
            raise ValueError(f"{cfg.out_dir} already holds a checkpoint ({ckpt}); continue it with "
                             f"--init_from=resume, replace it with --overwrite, or choose another --out_dir")
    except BaseException:
        lock.release()
        raise
    return lock, created


def remove_if_empty(directory):
    """Remove ``directory`` when it holds nothing (a failed run that created it leaves no empty folder)."""
    try:
        if os.path.isdir(directory) and not os.listdir(directory):
            os.rmdir(directory)
    except OSError:
        pass


@contextmanager
def sigterm_as_interrupt():
    """While inside, SIGTERM raises KeyboardInterrupt (as Ctrl-C: a clean exit that saves nothing half
    written); the previous handler comes back after. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def all_finite(arrays):
    """Whether every array in the iterable holds only finite numbers."""
    for a in arrays:
        xp = backend.get_array_module(a)
        if not bool(xp.isfinite(a).all()):
            return False
    return True
