"""Data preparation: text files -> flat token-id files ``train.bin`` / ``val.bin`` + ``meta.json``.

Inputs are a file, a directory or a glob of ``.txt`` / ``.jsonl`` files (a ``.jsonl`` line is a
document in its ``text`` field; a ``.txt`` file is one document). Inputs are streamed in chunks
cut between a non-space character and a newline: no GPT-2 pre-token spans such a point (a
whitespace run starts at the newline either way and never reaches a chunk's end), so chunked encoding equals whole-text encoding, and the corpus is
never held in memory at once. BPE chunks are encoded on all cores; ``<|endoftext|>`` separates
documents. The first ``1 - val_fraction`` of the tokens is the training split, the rest validation.
Ids are uint16, or uint32 when the vocabulary exceeds 65,535.
"""
import glob
import json
import multiprocessing
import os

import numpy as np
import regex

__all__ = ["prepare", "list_inputs", "iter_documents"]

CHUNK_CHARS = 1 << 20
_SAFE_CUT = regex.compile(r"(?<=\S)(?=\n)")  # between a non-space character and a newline


def list_inputs(inputs):
    """The .txt/.jsonl files named by ``inputs`` (paths, directories or globs), in sorted order."""
    if isinstance(inputs, str):
        inputs = [inputs]
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "**", "*.txt"), recursive=True)
                           + glob.glob(os.path.join(item, "**", "*.jsonl"), recursive=True))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(glob.glob(item, recursive=True))
        found = [f for f in found if f.endswith((".txt", ".jsonl"))] if not os.path.isfile(item) else found
        if not found:
            raise FileNotFoundError(f"no .txt or .jsonl input found at {item!r}")
        files += found
    return files


def _chunks(text_stream):
    """Cut a stream of text pieces into ~CHUNK_CHARS chunks at safe points (see module docstring)."""
    buf = ""
    for piece in text_stream:
        buf += piece
        while len(buf) > CHUNK_CHARS:
            cut = None
            for m in _SAFE_CUT.finditer(buf, CHUNK_CHARS // 2):
                cut = m.start()
                break
            if cut is None:
                break
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def iter_documents(files):
    """Yield, per document, an iterator of its text pieces (read 1 MB at a time for .txt)."""
    for path in files:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield iter([json.loads(line)["text"]])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{path}:{n}: each line must be a JSON object with a 'text' field") from None
        else:
            def read(p=path):
                with open(p, encoding="utf-8") as f:
                    while True:
                        block = f.read(CHUNK_CHARS)
                        if not block:
                            return
                        yield block
            yield read()


_worker_tok = None


def _init_worker(name):
    global _worker_tok
    from .tokenizer import tokenizer_from_name
    _worker_tok = tokenizer_from_name(name)


def _encode_chunk(chunk):
    """Ids of one chunk; None stands for a document boundary and becomes ``<|endoftext|>``."""
    if chunk is None:
        return np.asarray([_worker_tok.eot_token], dtype=np.uint32)
    return np.asarray(_worker_tok.encode_ordinary(chunk), dtype=np.uint32)


def _tagged_chunks(files, eot):
    """(chunk text or None for a document boundary) over all documents."""
    first = True
    for doc in iter_documents(files):
        if not first and eot is not None:
            yield None
        first = False
        yield from _chunks(doc)


def prepare(inputs, out_dir, tokenizer="char", val_fraction=0.1, workers=None, progress=True):
    """Tokenize ``inputs`` into ``out_dir``/{train,val}.bin and meta.json; returns the meta dict.

    tokenizer: "char" (vocabulary = the sorted characters of the input), "gpt2", or the path of a
    tokenizer saved by ``RegexTokenizer.save``.
    """
    from .tokenizer import CharTokenizer, tokenizer_from_name
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = list_inputs(inputs)
    os.makedirs(out_dir, exist_ok=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True, desc="tokenizing")
    if tokenizer == "char":
        chars = set()
        for doc in iter_documents(files):
            for piece in doc:
                chars.update(piece)
        if not chars:
            raise ValueError(f"the input {inputs!r} is empty")
        tok = CharTokenizer(sorted(chars))
        meta = {"tokenizer": "char", "chars": tok.chars}
        encoded = (np.asarray(tok.encode(c), dtype=np.uint32) for c in _tagged_chunks(files, None))
        pool = None
    else:
        try:
            tok = tokenizer_from_name(tokenizer)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"unknown tokenizer {tokenizer!r}: use 'char', 'gpt2' or a saved tokenizer file ({e})") from None
        meta = {"tokenizer": tokenizer if tokenizer == "gpt2" else os.path.abspath(tokenizer)}
        eot = tok.eot_token
        pool = multiprocessing.get_context("spawn").Pool(workers or os.cpu_count(), _init_worker, (tokenizer,))
        encoded = pool.imap(_encode_chunk, _tagged_chunks(files, eot))   # in order, all cores
    vocab = tok.n_vocab
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    tmp = os.path.join(out_dir, "all.bin.tmp")
    n = 0
    try:
        with open(tmp, "wb") as f:
            for ids in encoded:
                ids.astype(dtype).tofile(f)
                n += len(ids)
                if bar is not None:  # bytes done, approximately (a GPT-2 token is ~3.5 bytes of English)
                    bar.update(int(len(ids) * (1 if tokenizer == "char" else 3.5)))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    if n < 2:
        os.remove(tmp)
        raise ValueError(f"the input {inputs!r} has fewer than 2 tokens")
    n_train = int(n * (1 - val_fraction))
    all_ids = np.memmap(tmp, dtype=dtype, mode="r")
    for name, part in (("train", all_ids[:n_train]), ("val", all_ids[n_train:])):
        with open(os.path.join(out_dir, f"{name}.bin"), "wb") as f:
            for i in range(0, len(part), 1 << 24):
                np.asarray(part[i:i + (1 << 24)]).tofile(f)
    del all_ids
    os.remove(tmp)
    meta.update({"vocab_size": vocab, "dtype": np.dtype(dtype).name, "train_tokens": n_train,
                 "val_tokens": n - n_train, "inputs": files})
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta
