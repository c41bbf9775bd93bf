"""Sharded token splits: ``train_000000.bin``, ``train_000001.bin``, ... of a fixed token count, indexed
in ``meta.json``, written one at a time so an interrupted ``npgpt prepare`` resumes at the last
finished shard, and read back as one stream.

The index is ``meta["shards"] = {"train": [{"file", "tokens", "task", "offset"}, ...], "val": [...]}``.
``task`` / ``offset`` say where the shard's last token came from in prepare's deterministic stream of
work items (see ``npgpt/prepare.py``): the shard ends after ``offset`` ids of task ``task`` (for this
split), so a restart re-encodes from the earliest unfinished task and drops the ids already on disk.
``meta["complete"]`` is false until the last (shorter) shards and the token counts are written.

Every file is written under a temporary name, synced and renamed (a shard when it is full,
meta.json by ``atomic_write``), so a kill leaves either the old or the new version of it, never a
torn one; a shard is in the index only once it is whole on disk.
"""
import json
import os

import numpy as np

__all__ = ["shard_name", "atomic_write", "write_meta", "ShardWriter", "ShardedTokens"]


def shard_name(split, index):
    """``train_000003.bin`` for split "train", shard 3."""
    return f"{split}_{index:06d}.bin"


def atomic_write(path, write):
    """Call ``write(f)`` on a temporary file, flush it to disk and rename it to ``path``."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_meta(out_dir, meta):
    """meta.json, atomically: a reader sees the previous index or the new one."""
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))


class ShardWriter:
    """Cuts one split's stream of ids into shards of ``shard_tokens`` ids. ``add(ids, task, end)``
    appends the ids of work item ``task`` (``end``: how far into that task's ids for this split they
    reach) to the open shard's temporary file; a shard that fills is closed, renamed to its name and
    its index record appended to ``records`` (the caller then writes meta.json). ``finish()`` does
    so for the last, shorter shard. Nothing is held in memory: RSS does not grow with the shard size."""

    def __init__(self, out_dir, split, dtype, shard_tokens, records):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, np.dtype(dtype), shard_tokens
        self.records = records                      # the split's list in meta["shards"], extended in place
        self.file, self.filled = None, 0            # the shard being filled (a .tmp file) and its ids

    def add(self, ids, task, end):
        """Append ``ids`` (the ids of task ``task`` for this split up to position ``end``); returns
        the number of shards finished by them."""
        finished, start = 0, end - len(ids)
        while len(ids):
            take = min(len(ids), self.shard_tokens - self.filled)
            if self.file is None:
                self.file = open(self._path() + ".tmp", "wb")
            ids[:take].astype(self.dtype).tofile(self.file)
            self.filled += take
            ids, start = ids[take:], start + take
            if self.filled == self.shard_tokens:
                self._flush(task, start)
                finished += 1
        return finished

    def finish(self, task, end):
        """Write the partly filled last shard (if any); returns the number of shards written."""
        if self.filled:
            self._flush(task, end)
            return 1
        return 0

    def close(self):
        """Drop the unfinished shard's temporary file (after an error)."""
        if self.file is not None:
            self.file.close()
            os.remove(self.file.name)
            self.file = None

    def _path(self):
        return os.path.join(self.out_dir, shard_name(self.split, len(self.records)))

    def _flush(self, task, offset):
        """Close the filled shard: to disk (fsync), renamed to its final name, indexed."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.file.name, self._path())
        self.records.append({"file": os.path.basename(self._path()), "tokens": int(self.filled), "task": task,
                             "offset": offset})
        self.file, self.filled = None, 0


class ShardedTokens:
    """A split stored as shards, read as one flat array of token ids: ``len(data)``, ``data[i:j]`` (an
    ndarray, crossing shard boundaries), ``data[i]`` and ``np.asarray(data)`` (the whole split, e.g. for
    ``DeviceBatches``). Each shard is memory-mapped, so a batch costs only the pages it touches.

    ``paths`` and ``counts``: the shard files and their token counts, in order."""

    def __init__(self, paths, counts, dtype):
        self.dtype = np.dtype(dtype)
        self.itemsize = self.dtype.itemsize
        self.paths = list(paths)
        self.shards = [np.memmap(p, dtype=self.dtype, mode="r") if n else np.empty(0, self.dtype)
                       for p, n in zip(self.paths, counts)]
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in self.shards])]).astype(np.int64)  # (S+1,)
        self.size = int(self.starts[-1])
        self.nbytes = self.size * self.itemsize
        self.shape = (self.size,)
        self.ndim = 1

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            if step != 1:
                return self[start:stop][::step]
            if stop <= start:
                return np.empty(0, self.dtype)
            first = int(np.searchsorted(self.starts, start, side="right")) - 1
            last = int(np.searchsorted(self.starts, stop, side="left")) - 1     # shard holding stop - 1
            pieces = [self.shards[s][max(start - self.starts[s], 0):min(stop, self.starts[s + 1]) - self.starts[s]]
                      for s in range(first, last + 1)]
            return np.array(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)
        index = int(key)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {key} out of range for a split of {self.size} tokens")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.shards[shard][index - self.starts[shard]]

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(self.shards) if self.shards else np.empty(0, self.dtype)
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __repr__(self):
        return f"ShardedTokens({self.size} tokens in {len(self.shards)} shards, {self.dtype.name})"
