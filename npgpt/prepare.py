r"""Data preparation: text files -> flat token-id files ``train.bin`` / ``val.bin`` + ``meta.json``.

Inputs are a file, a directory or a glob of ``.txt`` / ``.jsonl`` files (a ``.txt`` file is one
document; a ``.jsonl`` line is one document, its ``text`` field). Nothing holds the corpus at once:
files are read 1 MB at a time and re-cut into chunks at *safe points*, where both GPT-2's and
GPT-4's pre-tokenizers (``npgpt.tokenizer.encoding``) end a pre-token whatever follows:

- between a letter and a line break: letters end there, and only punctuation pulls the line
  breaks after it into its pre-token (GPT-4's `` ?[^\s\p{L}\p{N}]++[\r\n]*``);
- after a lone ``\n`` between two non-spaces: the ``\n`` is one pre-token in both patterns, and a
  longer whitespace run is not (GPT-2's ``\s+(?!\S)`` leaves the run's last character to the
  next word, so a run cut at its end would tokenize differently).

Matching never looks behind, so the text after a safe point tokenizes as it does within the whole,
and encoding chunk by chunk gives exactly the ids of whole documents (a hypothesis test checks
this). A document with no safe point is kept whole.

BPE of inputs over ~8 MB runs on all cores (a process pool, forked where possible, fed ~1 MB tasks,
results taken in order); smaller inputs are encoded in-process, and so are characters, by a
vectorized lookup. ``<|endoftext|>`` separates documents when the
tokenizer has it (the char tokenizer has none). The first ``1 - val_fraction`` of the tokens is the
training split, the rest validation. Ids are uint16, or uint32 when they can exceed 65,535.
"""
import glob
import json
import multiprocessing
import os

import numpy as np
import regex

__all__ = ["prepare", "list_inputs", "iter_documents", "iter_chunks"]

CHUNK_CHARS = 1 << 20
_SAFE_CUT = regex.compile(r"(?<=\p{L})(?=[\r\n])|(?<=\S\n)(?=\S)")   # see the module docstring


def list_inputs(inputs):
    """The .txt/.jsonl files named by ``inputs`` (paths, directories or globs), in sorted order."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for item in map(str, inputs):
        if os.path.isfile(item):
            found = [item]
        elif os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "**", "*.txt"), recursive=True)
                           + glob.glob(os.path.join(item, "**", "*.jsonl"), recursive=True))
        else:
            found = [f for f in sorted(glob.glob(item, recursive=True)) if f.endswith((".txt", ".jsonl"))]
        if not found:
            raise FileNotFoundError(f"no .txt or .jsonl input found at {item!r}: give a file, a directory "
                                    f"or a glob such as 'data/*.txt'")
        files += found
    return files


def _read_txt(path):
    with open(path, encoding="utf-8", newline="") as f:    # newline="": keep \r\n as written
        try:
            while True:
                block = f.read(CHUNK_CHARS)
                if not block:
                    return
                yield block
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e})") from None


def iter_documents(files):
    """Yield, per document, an iterator of its text pieces (a .txt file is read 1 MB at a time)."""
    for path in files:
        if not path.endswith(".jsonl"):
            yield _read_txt(path)
            continue
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                    if not isinstance(text, str):
                        raise TypeError
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: each line must be a JSON object with a 'text' string") from None
                yield iter([text])


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


def _tasks(files, eot):
    """Lists of work items of ~CHUNK_CHARS characters in all: text chunks, and None where
    ``<|endoftext|>`` goes between documents (omitted when ``eot`` is None)."""
    task, size, first = [], 0, True
    for doc in iter_documents(files):
        if not first and eot is not None:
            task.append(None)
        first = False
        for chunk in _chunks(doc):
            task.append(chunk)
            size += len(chunk)
            if size >= CHUNK_CHARS:
                yield task
                task, size = [], 0
    if task:
        yield task


_worker_tok = None


def _init_worker(name, tok=None):
    """Worker set-up: the parent's tokenizer when forked, else load it by name (spawn)."""
    global _worker_tok
    if tok is None:
        from .tokenizer import tokenizer_from_name
        tok = tokenizer_from_name(name)
    _worker_tok = tok


def _encode_task(task, tok=None):
    """(uint32 ids, UTF-8 bytes covered) of one task; None items become ``<|endoftext|>``."""
    tok = tok or _worker_tok
    ids, nbytes = [], 0
    for item in task:
        if item is None:
            ids.append(tok.eot_token)
        else:
            ids += tok.encode_ordinary(item)
            nbytes += len(item.encode("utf-8", errors="surrogatepass"))
    return np.asarray(ids, dtype=np.uint32), nbytes


def _char_vocabulary(files):
    """The sorted distinct characters of all inputs (a first streaming pass)."""
    chars = set()
    for doc in iter_documents(files):
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


def prepare(inputs, out_dir, tokenizer="char", val_fraction=0.1, workers=None, progress=True):
    """Tokenize ``inputs`` into ``out_dir``/{train,val}.bin and meta.json; returns the meta dict.

    inputs: a path, directory or glob (or a list of them) of .txt/.jsonl files.
    tokenizer: "char" (vocabulary = the sorted characters of the input, no eot), "gpt2", or the path
    of a tokenizer saved by ``RegexTokenizer.save``. workers: processes for BPE (default: all cores).
    meta: tokenizer, vocab_size, dtype, train_tokens, val_tokens, inputs (+ chars for "char").
    """
    from .tokenizer import CharTokenizer, tokenizer_from_name
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    files = list_inputs(inputs)
    if tokenizer == "char":
        tok = CharTokenizer(_char_vocabulary(files))
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
    workers = workers or os.cpu_count() or 1
    pool = None
    tasks = _tasks(files, tok.eot_token)
    if tokenizer == "char":
        encoded = ((tok.encode_array(c), len(c.encode("utf-8", errors="surrogatepass")))
                   for task in tasks for c in task)
    elif workers > 1 and total > 8 * CHUNK_CHARS:       # below ~8 MB, starting workers costs more
        if "fork" in multiprocessing.get_all_start_methods():   # workers inherit the loaded tokenizer
            pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer, tok))
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,))
        encoded = pool.imap(_encode_task, tasks)    # in order; the task pipe bounds what is read ahead
    else:
        encoded = (_encode_task(t, tok) for t in tasks)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing ({meta['tokenizer']})")
    os.makedirs(out_dir, exist_ok=True)
    # written under temporary names and renamed at the end, so a failed run leaves any earlier
    # dataset in out_dir whole
    paths = {k: os.path.join(out_dir, f"{k}.tmp") for k in ("train.bin", "val.bin", "meta.json")}
    n = 0
    try:
        try:
            with open(paths["train.bin"], "wb") as f:   # all ids first; the tail moves to val.bin below
                for ids, nbytes in encoded:
                    ids.astype(dtype).tofile(f)
                    n += len(ids)
                    if bar is not None:
                        bar.update(min(nbytes, bar.total - bar.n))
        finally:
            if pool is not None:
                pool.terminate()
            if bar is not None:
                bar.update(bar.total - bar.n)
                bar.close()
        if n < 2:
            raise ValueError(f"the input {inputs!r} has {n} tokens: at least 2 are needed for a train/val split")
        n_train = int(n * (1 - val_fraction))
        _split_tail(paths["train.bin"], paths["val.bin"], n_train * np.dtype(dtype).itemsize)
        meta.update({"vocab_size": tok.n_vocab, "dtype": np.dtype(dtype).name, "train_tokens": n_train,
                     "val_tokens": n - n_train, "inputs": [os.path.abspath(f) for f in files]})
        if tok.eot_token is not None:
            meta["eot_token"] = tok.eot_token
        with open(paths["meta.json"], "w") as f:
            json.dump(meta, f, indent=1)
        for name, tmp in paths.items():
            os.replace(tmp, os.path.join(out_dir, name))
    finally:
        for tmp in paths.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return meta
