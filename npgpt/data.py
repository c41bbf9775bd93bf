"""Token data on disk and random training batches.

``npgpt prepare`` (``npgpt/prepare.py``) writes ``train.bin`` / ``val.bin`` (flat uint16 or uint32
token ids) and ``meta.json``; here they are memory-mapped, so a corpus larger than RAM costs only the
pages a batch touches. A batch is B random windows of T+1 consecutive tokens: x = first T,
y = the same shifted by one (next-token targets).
"""
import json
import os

import numpy as np

from . import backend

__all__ = ["load_meta", "load_split", "get_batch", "DeviceBatches", "fits_on_device", "device_bytes",
           "bundled_corpus_path", "ensure_prepared"]

DEVICE_FRACTION = 0.5   # a split goes to the GPU only when it takes at most this share of free memory


def bundled_corpus_path():
    """The public-domain Shakespeare text shipped in the package (5 MB, ASCII)."""
    return os.path.join(os.path.dirname(__file__), "data", "shakespeare.txt")


def load_meta(data_dir):
    """The ``meta.json`` of a prepared data directory."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: prepare the data first "
                                f"(npgpt prepare --input FILE --out_dir {data_dir})")
    with open(path) as f:
        return json.load(f)


def load_split(data_dir, split):
    """Memory-map ``{split}.bin`` ("train" or "val") as a flat array of token ids."""
    meta = load_meta(data_dir)
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: re-run npgpt prepare for {data_dir}")
    return np.memmap(path, dtype=np.dtype(meta.get("dtype", "uint16")), mode="r")


def get_batch(data, batch_size, block_size, rng):
    """x, y of shape (B, T) (int64, on the active backend): random windows of ``data`` and their
    next tokens. ``rng`` is a ``numpy.random.Generator`` (the host draws the offsets)."""
    n = len(data) - block_size
    if n < 1:
        raise ValueError(f"the data has {len(data)} tokens, too few for block_size {block_size}: "
                         f"use a smaller block_size or more text")
    ix = rng.integers(0, n, size=batch_size)                              # (B,)
    win = np.stack([np.asarray(data[i:i + block_size + 1]) for i in ix])   # (B, T+1)
    win = win.astype(np.int64)
    return backend.to_device(win[:, :-1]), backend.to_device(win[:, 1:])  # (B, T), (B, T)


class DeviceBatches:
    """Random batches drawn on the GPU from a split copied to GPU memory once, so a training step
    makes no host-to-device copy. ``DeviceBatches(data, B, T, seed)()`` -> x, y (B, T) int64 on the
    active backend, like ``get_batch``, with the offsets drawn by the backend's Generator.
    (A split is held as int32: ``device_bytes`` = 4 bytes a token, so a 1B-token corpus would not
    fit; ``npgpt train`` then draws batches on the host with ``get_batch``: see ``fits_on_device``.)"""

    def __init__(self, data, batch_size, block_size, seed):
        xp = backend.xp
        self.n = len(data) - block_size                    # valid window starts: [0, n)
        if self.n < 1:
            raise ValueError(f"the data has {len(data)} tokens, too few for block_size {block_size}")
        self.data = xp.asarray(np.asarray(data, dtype=np.int32))   # (N,) on the device
        self.window = xp.arange(block_size + 1)                    # (T+1,)
        self.batch_size = batch_size
        self.rng = xp.random.default_rng(seed)

    def __call__(self):
        ix = (self.rng.random(self.batch_size) * self.n).astype(np.int64)   # (B,) uniform starts
        win = self.data[ix[:, None] + self.window].astype(np.int64)         # (B, T+1)
        return win[:, :-1], win[:, 1:]


def device_bytes(data):
    """Bytes ``DeviceBatches`` would take on the GPU for the split ``data`` (int32 ids)."""
    return 4 * len(data)


def fits_on_device(nbytes, free_bytes, fraction=DEVICE_FRACTION):
    """Whether a split of ``nbytes`` should be copied to the GPU, whose free memory is ``free_bytes``:
    only when it takes at most ``fraction`` of it, leaving the rest to the model, its activations
    and the optimizer. E.g. fits_on_device(4e9, 10e9) is True, fits_on_device(6e9, 10e9) False."""
    return nbytes <= fraction * free_bytes


def ensure_prepared(data_dir, inputs=None, tokenizer="char"):
    """Prepare ``inputs`` (default: the bundled Shakespeare) into ``data_dir`` unless it already holds
    a prepared dataset; returns its meta."""
    if os.path.exists(os.path.join(data_dir, "meta.json")):
        return load_meta(data_dir)
    from .prepare import prepare
    print(f"preparing {inputs or 'the bundled Shakespeare'} into {data_dir} ({tokenizer}-level) ...")
    return prepare(inputs or [bundled_corpus_path()], data_dir, tokenizer=tokenizer)
