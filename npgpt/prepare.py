r"""Data preparation: text -> token ids in ``train.bin`` / ``val.bin`` (or shards) + ``meta.json``.

Inputs are a file, a directory or a glob of corpus files, read as a stream of documents by
``npgpt.corpus`` (a ``.txt`` file is one document, a ``.jsonl`` line one document, its ``text``
field; also Parquet, tar and compressed files). Nothing holds the corpus at once: a
document is read 1 MB at a time and re-cut into chunks at *safe points*, where both GPT-2's and
GPT-4's pre-tokenizers (``npgpt.tokenizer.encoding``) end a pre-token whatever follows:

- between a letter and a line break: letters end there, and only punctuation pulls the line
  breaks after it into its pre-token (GPT-4's `` ?[^\s\p{L}\p{N}]++[\r\n]*``);
- after a lone ``\n`` between two non-spaces: the ``\n`` is one pre-token in both patterns, and a
  longer whitespace run is not (GPT-2's ``\s+(?!\S)`` leaves the run's last character to the
  next word, so a run cut at its end would tokenize differently).

Matching never looks behind, so the text after a safe point tokenizes as it does within the whole,
and encoding chunk by chunk gives exactly the ids of whole documents (a hypothesis test checks
this). A document with no safe point is kept whole.

BPE of inputs over a few MB runs on all cores (``npgpt.encode_pool``: a process pool fed ~1 MB
tasks, at most 2 a worker in flight, results taken in order), so memory does not grow with the
corpus; smaller inputs are encoded in-process, and so are characters, by a vectorized lookup.
``<|endoftext|>`` separates the documents of a split when the tokenizer has it (the char tokenizer
has none). Ids are uint16, or uint32 when they can exceed 65,535.

Two layouts (``npgpt.data.load_split`` reads both):

- ``shard_tokens=0`` (default, small corpora): ``train.bin`` and ``val.bin``; the first
  ``1 - val_fraction`` of the tokens trains, the rest validates (position split).
- ``shard_tokens=N``: ``train_000000.bin``, ... of N tokens, each written as soon as it fills and
  indexed in meta.json (``npgpt.shards``); rerunning an interrupted command resumes after the last
  finished shard and ends with the same bytes. Whole documents are split by a stable hash of their
  text (``corpus.is_validation``: the split never changes across runs, orders and resumes); one
  ``.txt`` file, one document, keeps a position split, cut at the chunk nearest ``1 - val_fraction``
  of its bytes.
"""
import json
import os
import re

import numpy as np
import regex

from . import corpus, encode_pool
from .corpus import is_validation
from .shards import ShardWriter, write_meta
from .threads import default_threads

__all__ = ["prepare", "list_inputs", "iter_documents", "iter_chunks", "is_validation"]

CHUNK_CHARS = 1 << 20
_SAFE_CUT = regex.compile(r"(?<=\p{L})(?=[\r\n])|(?<=\S\n)(?=\S)")   # see the module docstring


def list_inputs(inputs):
    """The corpus files named by ``inputs`` (paths, directories or globs), in order
    (``npgpt.corpus.expand_inputs``: .txt, .jsonl, .parquet, .tar, compressed or not)."""
    return corpus.expand_inputs(inputs)


def iter_documents(files, text_key="text", filters=(), column=None):
    """Yield, per document, an iterator of its text pieces (a .txt document comes 1 MB at a time):
    ``npgpt.corpus.iter_document_pieces``."""
    return corpus.iter_document_pieces(files, text_key, filters, column)


def _chunks(pieces):
    """Re-cut a stream of text pieces into ~CHUNK_CHARS chunks at safe points (module docstring)."""
    buf, searched = "", 0                               # no safe point in buf before `searched`
    for piece in pieces:
        buf += piece
        while len(buf) > CHUNK_CHARS:
            m = _SAFE_CUT.search(buf, max(CHUNK_CHARS // 2, searched))
            if m is None:                               # no safe point yet: read on (a point at the
                searched = len(buf)                     # very end needs the next character)
                break
            yield buf[:m.start()]
            buf, searched = buf[m.start():], 0
    if buf:
        yield buf


def iter_chunks(files):
    """All documents of ``files`` as ~CHUNK_CHARS chunks cut at safe points (for training a tokenizer
    without holding the corpus); a chunk never spans two documents."""
    for doc in iter_documents(files):
        yield from _chunks(doc)


def _tasks(files, eot, splitter=None, read=None):
    """Lists of work items of ~CHUNK_CHARS characters in all: (split, text chunk), and (split, None)
    where ``<|endoftext|>`` goes between two documents of one split (omitted when ``eot`` is None).
    ``splitter(chunk, split)`` -> 0 (train) or 1 (val) is asked for every chunk, with ``split`` None
    for a document's first chunk and that chunk's answer after; without it every item is split 0."""
    task, size, started = [], 0, [False, False]
    for doc in (read or iter_documents)(files):
        split = None
        for chunk in _chunks(doc):
            first = split is None
            split = splitter(chunk, split) if splitter else 0
            if first:
                if started[split] and eot is not None:
                    task.append((split, None))
                started[split] = True
            task.append((split, chunk))
            size += len(chunk)
            if size >= CHUNK_CHARS:
                yield task
                task, size = [], 0
    if task:
        yield task


def _hash_splitter(fraction):
    """Split by document hash: a document's first chunk (the whole of any document under CHUNK_CHARS,
    so nearly every web document) decides, and its other chunks follow."""
    return lambda chunk, split: int(is_validation(chunk, fraction)) if split is None else split


def _position_splitter(fraction, total_bytes):
    """Split by position in the input: chunks starting past ``1 - fraction`` of the input bytes
    validate (so the cut falls at the chunk boundary nearest that point, whatever the tokenizer)."""
    seen = [0]

    def splitter(chunk, split):
        start = seen[0]
        seen[0] += len(chunk.encode("utf-8", errors="surrogatepass"))
        return int(start >= (1 - fraction) * total_bytes)
    return splitter


def _encode_task(task, tok=None):
    """([train ids, val ids] as uint32 arrays, UTF-8 bytes covered) of one task; None items become
    ``<|endoftext|>``. In a pool worker ``tok`` is the worker's (``encode_pool.worker_tokenizer``)."""
    tok = tok or encode_pool.worker_tokenizer()
    eot = np.asarray([tok.eot_token if tok.eot_token is not None else 0], dtype=np.uint32)
    pieces, nbytes = ([], []), 0
    for split, item in task:
        if item is None:
            pieces[split].append(eot)
            continue
        if hasattr(tok, "encode_array"):                    # characters: a vectorized lookup
            pieces[split].append(tok.encode_array(item).astype(np.uint32))
        else:
            pieces[split].append(np.asarray(tok.encode_ordinary(item), dtype=np.uint32))
        nbytes += len(item.encode("utf-8", errors="surrogatepass"))
    return [np.concatenate(p) if p else np.empty(0, np.uint32) for p in pieces], nbytes


def _encode_in_order(tasks, tok, tokenizer, workers, parallel, skip=0):
    """``encode_pool.encode_in_order`` of ``_encode_task`` (looked up here at each call)."""
    return encode_pool.encode_in_order(tasks, _encode_task, tok, tokenizer, workers, parallel, skip)


def _char_vocabulary(files, read):
    """The sorted distinct characters of all inputs (a first streaming pass)."""
    chars = set()
    for doc in read(files):
        for piece in doc:
            chars.update(piece)
    return sorted(chars)


def _split_tail(src, dst, offset):
    """Move the bytes of file ``src`` from ``offset`` on into a new file ``dst`` (16 MB at a time)."""
    with open(src, "r+b") as f:
        f.seek(offset)
        with open(dst, "wb") as g:
            while True:
                block = f.read(1 << 24)
                if not block:
                    break
                g.write(block)
        f.truncate(offset)


def prepare(inputs, out_dir, tokenizer="char", val_fraction=0.1, workers=None, progress=True,
            shard_tokens=0, split="auto", text_key="text", filters=(), column=None):
    """Tokenize ``inputs`` into ``out_dir``; returns the meta dict (also written to meta.json).

    inputs: a path, directory or glob (or a list of them) of corpus files (``npgpt.corpus``: .txt,
    .jsonl, .parquet, .tar, optionally compressed); text_key, filters, column select the text and the
    rows of JSONL/Parquet documents (``corpus.iter_documents``).
    tokenizer: "char" (vocabulary = the sorted characters of the input, no eot), "gpt2", or the path
    of a tokenizer saved by ``RegexTokenizer.save``. workers: processes for BPE (default: the cores other processes leave free).
    shard_tokens: 0 writes train.bin / val.bin; N > 0 writes shards of N tokens (``npgpt.shards``),
    each as it fills, and resumes an interrupted run of the same command at its last finished shard.
    split: "position" (the first ``1 - val_fraction`` trains), "hash" (whole documents by a stable
    hash of their text; sharded only) or "auto": hash for a sharded corpus of more than one .txt file
    or of .jsonl documents, else position.
    meta: tokenizer, vocab_size, dtype, train_tokens, val_tokens, inputs (+ chars for "char"; + shards,
    split, shard_tokens, complete for shards).
    """
    from .tokenizer import CharTokenizer, tokenizer_from_name
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if split not in ("auto", "position", "hash"):
        raise ValueError(f"split must be auto, position or hash, got {split!r}")
    if shard_tokens < 0 or (split == "hash" and not shard_tokens):
        raise ValueError(f"shard_tokens must be >= 0 (0: train.bin/val.bin) and > 0 for the hash split, got "
                         f"{shard_tokens}: give --shard_tokens N, e.g. 100000000")
    files = list_inputs(inputs)

    def read(paths):
        return iter_documents(paths, text_key, filters, column)
    if tokenizer == "char":
        tok = CharTokenizer(_char_vocabulary(files, read))
        if tok.n_vocab == 0:
            raise ValueError(f"the input {inputs!r} is empty")
        meta = {"tokenizer": "char", "chars": tok.chars}
    else:
        try:
            tok = tokenizer_from_name(tokenizer)
        except (FileNotFoundError, ValueError) as e:     # e names the problem and the choices
            raise ValueError(f"{e} (or 'char', the default: one id per character of the input)") from None
        meta = {"tokenizer": tokenizer if tokenizer == "gpt2" else os.path.abspath(tokenizer)}
    dtype = np.uint16 if tok.n_vocab <= 1 << 16 else np.uint32
    total = sum(os.path.getsize(f) for f in files)
    workers = workers or default_threads()[0]      # the cores other processes leave free
    parallel = encode_pool.use_pool(tokenizer, workers, total)   # small inputs: faster in-process
    meta.update({"vocab_size": tok.n_vocab, "dtype": np.dtype(dtype).name,
                 "inputs": [os.path.abspath(f) for f in files]})
    if (text_key, tuple(filters), column) != ("text", (), None):
        meta.update({"text_key": text_key, "filters": list(filters), "column": column})
    if tok.eot_token is not None:
        meta["eot_token"] = tok.eot_token
    bar = None
    if progress:
        from tqdm.auto import tqdm       # B/s (unit_scale: MB/s) and the ETA from total input bytes
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing ({meta['tokenizer']})")
    os.makedirs(out_dir, exist_ok=True)
    try:
        if shard_tokens:
            if split == "auto":        # one text file is one document: only a position split divides it
                one_text = len(files) == 1 and re.search(r"\.txt(\.gz|\.xz|\.bz2|\.zst)?$", files[0].lower())
                split = "position" if one_text else "hash"
            meta.update({"split": split, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
                         "chunk_chars": CHUNK_CHARS, "input_bytes": [os.path.getsize(f) for f in files]})
            return _write_shards(files, read, out_dir, tok, tokenizer, meta, workers, parallel, bar, total)
        return _write_single(files, read, out_dir, tok, tokenizer, meta, val_fraction, workers, parallel, bar,
                             inputs)
    finally:
        if bar is not None:
            bar.update(bar.total - bar.n)
            bar.close()


def _write_single(files, read, out_dir, tok, tokenizer, meta, val_fraction, workers, parallel, bar, inputs):
    """train.bin / val.bin: all ids in one file, whose tail (the last ``val_fraction``) moves to val.bin.
    Written under temporary names and renamed at the end, so a failed run leaves an earlier dataset whole."""
    dtype = np.dtype(meta["dtype"])
    paths = {k: os.path.join(out_dir, f"{k}.tmp") for k in ("train.bin", "val.bin", "meta.json")}
    n = 0
    try:
        with open(paths["train.bin"], "wb") as f:
            for _, ids, nbytes in _encode_in_order(_tasks(files, tok.eot_token, read=read), tok, tokenizer, workers, parallel):
                ids[0].astype(dtype).tofile(f)
                n += len(ids[0])
                if bar is not None:
                    bar.update(min(nbytes, bar.total - bar.n))
        if n < 2:
            raise ValueError(f"the input {inputs!r} has {n} tokens: at least 2 are needed for a train/val split")
        n_train = int(n * (1 - val_fraction))
        _split_tail(paths["train.bin"], paths["val.bin"], n_train * dtype.itemsize)
        meta.update({"train_tokens": n_train, "val_tokens": n - n_train})
        with open(paths["meta.json"], "w") as f:
            json.dump(meta, f, indent=1)
        for name, tmp in paths.items():
            os.replace(tmp, os.path.join(out_dir, name))
    finally:
        for tmp in paths.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return meta


_RESUME_KEYS = ("tokenizer", "vocab_size", "dtype", "inputs", "input_bytes", "split", "val_fraction",
                "shard_tokens", "chunk_chars", "chars", "text_key", "filters", "column")


def _resumable(out_dir, meta):
    """The shard index of an unfinished prepare of the same inputs and settings in ``out_dir``, or None."""
    try:
        with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("complete") is not False or "shards" not in old:
        return None
    if any(old.get(k) != meta.get(k) for k in _RESUME_KEYS):
        return None
    for records in old["shards"].values():             # every indexed shard whole on disk
        for r in records:
            path = os.path.join(out_dir, r["file"])
            if not os.path.isfile(path) or os.path.getsize(path) != r["tokens"] * np.dtype(meta["dtype"]).itemsize:
                return None
    return old["shards"]


def _write_shards(files, read, out_dir, tok, tokenizer, meta, workers, parallel, bar, total):
    """Shards of ``meta["shard_tokens"]`` ids per split, each written (atomically) as it fills, with
    meta.json's index rewritten after it; an unfinished run of the same settings is resumed."""
    shards = _resumable(out_dir, meta)
    resumed = shards is not None
    if not resumed:
        shards = {"train": [], "val": []}
    # where each split's finished shards end: (task, offset into that task's ids of the split)
    ends = [(r[-1]["task"], r[-1]["offset"]) if r else (0, 0) for r in (shards["train"], shards["val"])]
    skip = min(t for t, _ in ends)                      # tasks before this one are all on disk
    meta.update({"complete": False, "shards": shards})
    writers = [ShardWriter(out_dir, name, meta["dtype"], meta["shard_tokens"], shards[name])
               for name in ("train", "val")]
    if not resumed:
        write_meta(out_dir, meta)          # marks the directory unfinished before any shard is written
    if meta["split"] == "hash":
        splitter = _hash_splitter(meta["val_fraction"])
    else:
        splitter = _position_splitter(meta["val_fraction"], total)
    last = 0
    try:
        for t, ids, nbytes in _encode_in_order(_tasks(files, tok.eot_token, splitter, read), tok, tokenizer,
                                               workers, parallel, skip):
            last = t
            if ids is not None:
                finished = 0
                for s, writer in enumerate(writers):       # drop the ids the finished shards hold
                    done_task, done_offset = ends[s]
                    keep = ids[s] if t > done_task else ids[s][done_offset:] if t == done_task else ids[s][:0]
                    finished += writer.add(keep, t, len(ids[s]))
                if finished:
                    write_meta(out_dir, meta)
            if bar is not None:
                bar.update(min(nbytes, bar.total - bar.n))
        for writer in writers:
            writer.finish(last + 1, 0)
    finally:
        for writer in writers:
            writer.close()
    counts = {name: sum(r["tokens"] for r in shards[name]) for name in ("train", "val")}
    for name, n in counts.items():
        if n < 2:
            raise ValueError(f"the {name} split has {n} tokens: at least 2 are needed; the {meta['split']} split "
                             f"puts whole documents in val, so give more documents or a larger --val_fraction"
                             if meta["split"] == "hash" else
                             f"the {name} split has {n} tokens: at least 2 are needed: give more text")
    meta.update({"train_tokens": counts["train"], "val_tokens": counts["val"], "complete": True})
    write_meta(out_dir, meta)
    return meta
