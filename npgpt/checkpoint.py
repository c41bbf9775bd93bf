"""Checkpoints: nested dicts of arrays and plain values in one ``.npz`` file, written atomically.

Arrays are stored as npz members (no pickle: ``allow_pickle=False`` on load, so a checkpoint
cannot run code); everything else (numbers, strings, lists, RNG states) goes into one JSON member.
A save writes a temporary file in the same directory, fsyncs it and renames it over the target,
so a crash mid-save leaves the previous checkpoint intact; a failed write (a full disk) is one
``CheckpointError`` and leaves no temporary file. A crash that kills the process outright (kill -9,
power loss) may leave a ``.tmp-*.npz`` beside the target: ``remove_orphan_temporaries`` deletes them.
"""
import errno
import glob
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np

from . import backend

__all__ = ["save_checkpoint", "copy_checkpoint", "load_checkpoint", "CheckpointError", "remove_orphan_temporaries"]

_SEP = "/"
TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".npz"   # the temporary files of an atomic write


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not an npgpt checkpoint."""


def _split(obj, prefix, arrays):
    """Replace arrays in a nested structure by references, collecting them into ``arrays``."""
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{prefix}{k}{_SEP}", arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}{i}{_SEP}", arrays) for i, v in enumerate(obj)]
    if hasattr(obj, "shape") and hasattr(obj, "dtype") and not isinstance(obj, np.generic):
        key = prefix.rstrip(_SEP)
        arrays[key] = backend.to_numpy(obj)
        return {"__array__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _join(obj, arrays):
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return arrays[obj["__array__"]]
        return {k: _join(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, arrays) for v in obj]
    return obj


def save_checkpoint(path, obj):
    """Write ``obj`` (nested dicts/lists of arrays and JSON values) to ``path`` atomically."""
    arrays = {}
    meta = _split(obj, "", arrays)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    _write_atomically(path, lambda f: np.savez(f, **arrays))


def copy_checkpoint(src, dst):
    """Copy the checkpoint file ``src`` to ``dst`` atomically (``best.npz`` from a fresh ``ckpt.npz``)."""
    with open(src, "rb") as f_src:
        _write_atomically(dst, lambda f: shutil.copyfileobj(f_src, f, 1 << 20))


def _write_atomically(path, write):
    """``write(f)`` into a temporary file beside ``path``, fsync, rename it over ``path``, fsync the
    directory: a crash leaves either the old file or the new one, never a partial one."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=d)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)  # make the rename itself durable
        finally:
            os.close(dfd)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):     # ENOSPC, EDQUOT, EIO...: one line; the previous file is untouched
            hint = "; free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise CheckpointError(f"could not write {path}: {e.strerror or e} (the previous file, if any, is "
                                  f"intact{hint})") from e
        raise


def remove_orphan_temporaries(directory):
    """Delete the ``.tmp-*.npz`` files an atomic write left in ``directory`` when its process was
    killed mid-save; returns their names. Call it only while no other process writes there."""
    removed = []
    for tmp in sorted(glob.glob(os.path.join(glob.escape(directory), TMP_PREFIX + "*" + TMP_SUFFIX))):
        try:
            os.remove(tmp)
            removed.append(os.path.basename(tmp))
        except OSError:
            pass
    return removed


def load_checkpoint(path):
    """Read a checkpoint written by ``save_checkpoint``; arrays come back as NumPy arrays."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first (npgpt train --out_dir ...)")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not an npgpt checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not an npgpt checkpoint (not a zip/npz file: another kind of file, "
                              f"or a truncated or corrupt copy)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable npgpt checkpoint (truncated or corrupt?): {e}") from e
    if "__meta__" not in arrays:
        raise CheckpointError(f"{path} is an .npz file but not an npgpt checkpoint (no __meta__ entry)")
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    return _join(meta, arrays)
