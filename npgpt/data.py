"""Token data on disk and random training batches.

``npgpt prepare`` (``npgpt/prepare.py``) writes ``train.bin`` / ``val.bin`` (flat uint16 or uint32
token ids) and ``meta.json``; here they are memory-mapped, so a corpus larger than RAM costs only the
pages a batch touches. A batch is B random windows of T+1 consecutive tokens: x = first T,
y = the same shifted by one (next-token targets).

What is read is checked, and a bad file is one ``DataError`` (a ValueError) naming the file and the
fix (re-run ``npgpt prepare``): ``meta.json`` must be a JSON object with an integer ``vocab_size``
that agrees with its tokenizer (``len(chars)`` for characters, 50257 for GPT-2) and a ``dtype`` of
uint16 or uint32 wide enough for it (absent: uint16, as nanoGPT's files); a ``.bin`` must hold a
whole number of ids, at least 2 of them, all below ``vocab_size``. The id check reads the whole file
when it is at most ``FULL_ID_CHECK_BYTES`` (a max over 256 MiB takes well under a second) and
``ID_CHECK_SAMPLES`` evenly spread 1 MiB slices of a larger one: a full pass over a corpus larger
than RAM at every start would cost more than it saves (``npgpt prepare`` writes in-range ids).
"""
import contextlib
import json
import os

import numpy as np

from . import backend

__all__ = ["DataError", "load_meta", "check_meta", "load_split", "check_split_length", "get_batch",
           "DeviceBatches", "fits_on_device", "device_bytes", "bundled_corpus_path", "ensure_prepared"]

DEVICE_FRACTION = 0.5   # a split goes to the GPU only when it takes at most this share of free memory
FULL_ID_CHECK_BYTES = 256 << 20     # .bin files up to this size have every id checked against vocab_size
ID_CHECK_SAMPLES = 16               # larger ones: this many evenly spaced 1 MiB slices
SPLIT_DTYPES = ("uint16", "uint32")
GPT2_VOCAB_SIZE = 50257


class DataError(ValueError):
    """A prepared data directory is corrupt or inconsistent (meta.json, train.bin, val.bin)."""


def bundled_corpus_path():
    """The public-domain Shakespeare text shipped in the package (5 MB, ASCII)."""
    return os.path.join(os.path.dirname(__file__), "data", "shakespeare.txt")


def _redo(data_dir):
    return f"re-run npgpt prepare --input FILES --out_dir {data_dir}"


def load_meta(data_dir):
    """The ``meta.json`` of a prepared data directory, checked (see the module docstring)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: prepare the data first "
                                f"(npgpt prepare --input FILE --out_dir {data_dir})")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): {_redo(data_dir)}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not a file: {_redo(data_dir)}") from None
    check_meta(meta, path, data_dir)
    return meta


def check_meta(meta, path="meta.json", data_dir="DIR"):
    """Raise DataError unless ``meta`` is a consistent meta dict: vocab_size a positive int that the
    tokenizer agrees with, dtype uint16/uint32 wide enough for it."""
    fix = _redo(data_dir)
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(meta).__name__}: {fix}")
    vocab_size = meta.get("vocab_size")
    if "vocab_size" not in meta:
        raise DataError(f"{path} has no 'vocab_size' (keys {sorted(meta)}): {fix}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise DataError(f"{path}: vocab_size must be a positive integer, got {vocab_size!r}: {fix}")
    kind = meta.get("tokenizer", "char")
    if kind == "char":
        chars = meta.get("chars")
        if not isinstance(chars, list):
            raise DataError(f"{path}: a char-level meta needs its 'chars' list: {fix}")
        if len(chars) != vocab_size:
            raise DataError(f"{path}: vocab_size is {vocab_size} but 'chars' holds {len(chars)} characters: {fix}")
    elif kind == "gpt2":
        if vocab_size != GPT2_VOCAB_SIZE:
            raise DataError(f"{path}: vocab_size is {vocab_size} but the gpt2 tokenizer has {GPT2_VOCAB_SIZE}: {fix}")
    elif not isinstance(kind, str) or not os.path.isfile(kind):
        raise DataError(f"{path}: tokenizer {kind!r} is neither 'char', 'gpt2' nor an existing tokenizer file: "
                        f"{fix} --tokenizer char|gpt2|FILE")
    dtype = meta.get("dtype", "uint16")
    if dtype not in SPLIT_DTYPES:
        raise DataError(f"{path}: dtype must be one of {', '.join(SPLIT_DTYPES)}, got {dtype!r}: {fix}")
    if vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"{path}: dtype {dtype} cannot hold ids of a {vocab_size}-token vocabulary: {fix}")


def load_split(data_dir, split):
    """Memory-map ``{split}.bin`` ("train" or "val") as a flat array of token ids, checked against
    ``meta.json``: a whole number of ids, at least 2, all below vocab_size (DataError otherwise).
    A sharded directory (meta.json lists "shards", ``npgpt.shards``) gives a ``ShardedTokens``: one
    stream over the memory-mapped shards with what training uses of an array (``len``, slices
    ``data[i:j]`` across shard boundaries, ``np.asarray(data)``)."""
    meta = load_meta(data_dir)
    if "shards" in meta:
        return _load_shards(meta, data_dir, split)
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {_redo(data_dir)}")
    if not os.path.isfile(path):
        raise DataError(f"{path} is not a file: {_redo(data_dir)}")
    dtype = np.dtype(meta.get("dtype", "uint16"))
    nbytes = os.path.getsize(path)
    if nbytes % dtype.itemsize:
        raise DataError(f"{path} holds {nbytes} bytes, not a multiple of {dtype.itemsize} ({dtype.name} ids, as "
                        f"meta.json says): it is truncated or from another preparation: {_redo(data_dir)}")
    if nbytes // dtype.itemsize < 2:
        raise DataError(f"{path} holds {nbytes // dtype.itemsize} tokens; a split needs at least 2 (a next-token "
                        f"target): give more text or another --val_fraction: {_redo(data_dir)}")
    data = np.memmap(path, dtype=dtype, mode="r")
    _check_ids(data, meta["vocab_size"], path, data_dir)
    return data


def _load_shards(meta, data_dir, split):
    """A sharded split (``npgpt.shards``) as one ``ShardedTokens`` stream, checked as a .bin is: every
    indexed shard present with its token count, at least 2 tokens, ids below vocab_size."""
    from .shards import ShardedTokens
    index = os.path.join(data_dir, "meta.json")
    if meta.get("complete") is False:
        raise DataError(f"{data_dir} holds an unfinished npgpt prepare (interrupted): re-run the same npgpt prepare "
                        f"command to resume it at its last finished shard")
    records = meta["shards"].get(split) if isinstance(meta["shards"], dict) else None
    if not isinstance(records, list):
        raise DataError(f"{index}: 'shards' has no list for the {split} split: {_redo(data_dir)}")
    dtype = np.dtype(meta.get("dtype", "uint16"))
    paths = []
    for record in records:
        path = os.path.join(data_dir, str(record.get("file")))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} (a shard listed in {index}) not found: {_redo(data_dir)}")
        if os.path.getsize(path) != record.get("tokens", -1) * dtype.itemsize:
            raise DataError(f"{path} holds {os.path.getsize(path)} bytes, but {index} lists {record.get('tokens')} "
                            f"{dtype.name} ids: it is truncated or from another preparation: {_redo(data_dir)}")
        paths.append(path)
    data = ShardedTokens(paths, [r["tokens"] for r in records], dtype)
    if len(data) < 2:
        raise DataError(f"the {split} shards of {data_dir} hold {len(data)} tokens; a split needs at least 2: "
                        f"give more text or another --val_fraction: {_redo(data_dir)}")
    _check_ids(data, meta["vocab_size"], os.path.join(data_dir, f"{split}_*.bin"), data_dir)
    return data


def _check_ids(data, vocab_size, path, data_dir):
    """Every id of ``data`` below ``vocab_size``: all of them for a file of at most
    FULL_ID_CHECK_BYTES, else ID_CHECK_SAMPLES evenly spaced slices of 1 MiB."""
    if data.nbytes <= FULL_ID_CHECK_BYTES:
        chunks = [data[0:len(data)]]                        # (a ShardedTokens slice: one array)
    else:
        width = (1 << 20) // data.itemsize
        starts = np.linspace(0, len(data) - width, ID_CHECK_SAMPLES).astype(np.int64)
        chunks = [data[s:s + width] for s in starts]
    top = max(int(c.max()) for c in chunks)
    if top >= vocab_size:
        raise DataError(f"{path} holds token id {top}, but meta.json's vocab_size is {vocab_size}: the split and "
                        f"meta.json come from different preparations: {_redo(data_dir)}")


def check_split_length(data, block_size, name="train"):
    """Raise DataError unless the split ``data`` holds a window of ``block_size`` + 1 tokens (an
    input of block_size and its next-token targets), which ``get_batch`` draws."""
    if len(data) < block_size + 1:
        raise DataError(f"the {name} split has {len(data)} tokens, too few for block_size {block_size} (it needs "
                        f"block_size + 1): use --block_size={max(1, len(data) - 1)} or less, or prepare more text")


def get_batch(data, batch_size, block_size, rng):
    """x, y of shape (B, T) (int64, on the active backend): random windows of ``data`` and their
    next tokens. ``rng`` is a ``numpy.random.Generator`` (the host draws the offsets)."""
    n = len(data) - block_size
    if n < 1:
        raise ValueError(f"the data has {len(data)} tokens, too few for block_size {block_size}: "
                         f"use a smaller block_size or more text")
    ix = rng.integers(0, n, size=batch_size)                              # (B,)
    if isinstance(data, np.ndarray):                                      # arrays and memmaps: one gather
        win = np.asarray(data[ix[:, None] + np.arange(block_size + 1)], dtype=np.int64)   # (B, T+1)
    else:                                                                  # e.g. shards.ShardedTokens: slices
        win = np.stack([np.asarray(data[i:i + block_size + 1]) for i in ix]).astype(np.int64)
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
    os.makedirs(os.path.dirname(os.path.abspath(data_dir)), exist_ok=True)
    with _exclusive(os.path.abspath(data_dir) + ".lock"):    # two runs started together prepare once
        if os.path.exists(os.path.join(data_dir, "meta.json")):
            return load_meta(data_dir)
        print(f"preparing {inputs or 'the bundled Shakespeare'} into {data_dir} ({tokenizer}-level) ...")
        return prepare(inputs or [bundled_corpus_path()], data_dir, tokenizer=tokenizer)


@contextlib.contextmanager
def _exclusive(path):
    """Hold an exclusive lock on the file ``path`` (POSIX ``flock``; elsewhere no lock), removing it after."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)          # waits while another process prepares
        try:
            yield
        finally:
            try:
                os.remove(path)
            except OSError:
                pass
            fcntl.flock(f, fcntl.LOCK_UN)
