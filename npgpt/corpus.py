r"""Corpus reading for ``npgpt prepare``: files -> a stream of documents, nothing unpacked to disk.

Formats (a suffix picks the reader; ``expand_inputs`` lists what it finds)::

    .txt        one document (kept as written, ``\r\n`` included)
    .jsonl      one document per non-blank line: a JSON object, its ``text_key`` field
    .parquet    one document per row: its text ``column`` (needs ``pyarrow``)
    .tar        every member in a known format, in archive order (members may be archives)

each of ``.txt``, ``.jsonl`` and ``.tar`` optionally compressed: ``.gz``, ``.xz``, ``.bz2`` (standard
library) or ``.zst`` (needs ``zstandard``), e.g. ``train.jsonl.zst`` (The Pile), ``data.tar.xz``.
A compressed file with no inner suffix (OpenWebText's ``urlsf_subset00-1_data.xz``) is a tar
archive when its content starts with a tar header, otherwise one text document. So OpenWebText's
``openwebtext.tar`` (a tar of ``.xz`` files, each a tar of ``.txt`` documents) reads as is.

Everything streams: compressed files are decompressed as they are read, tar archives are read in
stream mode (``r|``), JSONL line by line, Parquet by row batches; at most one document is held
(``iter_document_pieces`` does not even hold that: a ``.txt`` document comes 1 MB at a time).

Rows can be selected by ``filters``, strings ``"key=value"`` whose key may be dotted into nested
objects: The Pile's rows are ``{"text": ..., "meta": {"pile_set_name": "Wikipedia (en)"}}``, so
``meta.pile_set_name=Wikipedia (en)`` keeps its Wikipedia. Filters on one key are alternatives
(OR), filters on different keys must all hold (AND).

``is_validation(text, fraction)`` splits by document hash: a document's side depends only on its
text, so the split is the same on every run, machine and resume, whatever the order or subset
of files, and duplicate documents never straddle train and validation.
"""
import bz2
import codecs
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import tarfile

__all__ = ["expand_inputs", "iter_documents", "iter_document_pieces", "is_validation",
           "parse_filters", "FORMATS", "InputNotFound"]

PIECE_BYTES = 1 << 20                  # a .txt document is read this many bytes at a time
COMPRESSIONS = (".gz", ".xz", ".bz2", ".zst")
KINDS = (".txt", ".jsonl", ".parquet", ".tar")
FORMATS = (".txt, .jsonl, .parquet, .tar, each but .parquet optionally compressed (.gz, .xz, .bz2, "
           ".zst), and a bare compressed file holding text or a tar archive (OpenWebText's .xz)")
_INSTALL = 'pip install -e ".[corpora]"'


class InputNotFound(FileNotFoundError, ValueError):
    """No corpus file at a path, directory or glob (both a FileNotFoundError and a ValueError)."""


def _format(name):
    """(kind, compression) of a file name: kind in ".txt" ".jsonl" ".parquet" ".tar", or "sniff"
    (a bare compressed file: tar or text, decided by its content); None when not a corpus file.

    >>> _format("train.jsonl.zst"), _format("a.tgz"), _format("urlsf_subset00-1_data.xz")
    (('.jsonl', '.zst'), ('.tar', '.gz'), ('sniff', '.xz'))
    """
    lower = name.lower()
    if lower.endswith(".tgz"):
        return ".tar", ".gz"
    compression = next((c for c in COMPRESSIONS if lower.endswith(c)), "")
    stem = lower[:len(lower) - len(compression)]
    kind = next((k for k in KINDS if stem.endswith(k)), None)
    if kind == ".parquet" and compression:     # Parquet compresses inside; a reader needs to seek
        return None
    if kind is None and compression:
        kind = "sniff"
    return (kind, compression) if kind else None


# ----------------------------------------------------------------------------------- listing files

def expand_inputs(inputs):
    """The corpus files named by ``inputs`` (a path, directory or glob, or a list of them), in order:
    a directory contributes its corpus files found recursively, sorted; a glob its sorted matches.

    Raises InputNotFound (a FileNotFoundError and ValueError) when an item names no corpus file, and
    ValueError for a file named explicitly in an unknown format; both messages list ``FORMATS``.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for item in map(str, inputs):
        if os.path.isfile(item):
            if _format(os.path.basename(item)) is None:
                raise ValueError(f"{item}: unknown corpus format; npgpt prepare reads {FORMATS}")
            found = [item]
        else:
            pattern = os.path.join(item, "**", "*") if os.path.isdir(item) else item
            found = sorted(f for f in glob.glob(pattern, recursive=True)
                           if os.path.isfile(f) and _format(os.path.basename(f)) is not None)
        if not found:
            raise InputNotFound(f"no .txt or .jsonl (or other corpus) input found at {item!r}: give a file, "
                                f"a directory or a glob such as 'data/*.jsonl.zst'; npgpt prepare reads {FORMATS}")
        files += found
    return files


# -------------------------------------------------------------------------------- opening streams

def _decompress(raw, compression):
    """A binary stream of the decompressed bytes of the binary stream ``raw``."""
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == ".xz":
        return lzma.LZMAFile(raw)
    if compression == ".bz2":
        return bz2.BZ2File(raw)
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"reading .zst files needs the zstandard package: {_INSTALL}") from None
        # files may hold several frames (zstd -T, concatenation) and use long windows (zstd --long=31)
        reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
            raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)
    return raw


class _Prepend(io.RawIOBase):
    """A stream that gives ``head`` and then the rest of ``stream`` (to peek at a stream that cannot seek)."""

    def __init__(self, head, stream):
        self.head, self.stream = head, stream

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self.head[:len(buffer)] if self.head else self.stream.read(len(buffer))
        self.head = self.head[len(data):]
        buffer[:len(data)] = data
        return len(data)

    def close(self):
        self.stream.close()
        super().close()


def _sniff_tar(stream):
    """(is a tar archive?, an equivalent stream) from the first 512 bytes (a tar header has
    "ustar" at offset 257; GNU and POSIX tar write it)."""
    head = b""
    while len(head) < 512:
        more = stream.read(512 - len(head))
        if not more:
            break
        head += more
    return head[257:262] == b"ustar", io.BufferedReader(_Prepend(head, stream))


# -------------------------------------------------------------------------------- reading documents

def parse_filters(filters):
    """``["meta.pile_set_name=Wikipedia (en)", ...]`` -> {("meta", "pile_set_name"): {"Wikipedia (en)"}}."""
    if isinstance(filters, str):
        filters = [filters]
    parsed = {}
    for item in filters or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"filter {item!r} is not key=value, e.g. 'meta.pile_set_name=Wikipedia (en)'")
        parsed.setdefault(tuple(key.strip().split(".")), set()).add(value)
    return parsed


_MISSING = object()


def _lookup(row, keys):
    """row[k1][k2]... for the dotted key ``keys`` (a tuple), or _MISSING."""
    for key in keys:
        if not isinstance(row, dict) or key not in row:
            return _MISSING
        row = row[key]
    return row


def _matches(row, filters):
    for keys, values in filters.items():
        value = _lookup(row, keys)
        if value is _MISSING or (value if isinstance(value, str) else json.dumps(value)) not in values:
            return False
    return True


def _row_text(row, text_key, where):
    text = _lookup(row, tuple(text_key.split(".")))
    if not isinstance(text, str):
        problem = f"no {text_key!r} field" if text is _MISSING else f"{text_key!r} is not a string"
        keys = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where}: {problem} (the row has {keys}); name the text field with --text_key")
    return text


def _txt_pieces(stream, name):
    """A text document as pieces of ~PIECE_BYTES, decoded strictly (an error names the line)."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    while True:
        block = stream.read(PIECE_BYTES)
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            line += block[:e.start].count(b"\n")
            raise ValueError(f"{name}:{line}: not UTF-8 text ({e.reason}); convert it, e.g. "
                             f"iconv -f latin1 -t utf-8, or leave the file out") from None
        line += text.count("\n")
        if text:
            yield text
        if not block:
            return


def _jsonl_rows(stream, name, text_key, filters):
    for number, raw in enumerate(stream, 1):
        where = f"{name}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 ({e.reason})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON line ({e.msg}); a .jsonl file holds one JSON object "
                             f"per line") from None
        if _matches(row, filters):
            yield iter([_row_text(row, text_key, where)])


def _parquet_rows(path, column, filters):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading .parquet files needs the pyarrow package: {_INSTALL}") from None
    with pq.ParquetFile(path) as table:
        names = table.schema_arrow.names
        columns = list(dict.fromkeys([column.split(".")[0]] + [keys[0] for keys in filters]))
        for name in columns:
            if name not in names:
                raise ValueError(f"{path}: no column {name!r}; its columns are {names} (choose the text "
                                 f"with --text_key)")
        number = 0
        for batch in table.iter_batches(columns=columns, batch_size=1024):   # only the columns needed
            for row in batch.to_pylist():
                number += 1
                if _matches(row, filters):
                    yield iter([_row_text(row, column, f"{path}: row {number}")])


def _documents(raw, name, kind, compression, text_key, filters):
    """Per document, an iterator of its text pieces, from the binary stream ``raw`` of file/member ``name``."""
    with raw:                                   # a decompressor given a file object leaves it open
        stream = _decompress(raw, compression)
        if kind == "sniff":
            is_tar, stream = _sniff_tar(stream)
            kind = ".tar" if is_tar else ".txt"
        with stream:
            yield from _read(stream, name, kind, text_key, filters)


def _read(stream, name, kind, text_key, filters):
    """Per document, an iterator of its text pieces, from the decompressed binary ``stream``."""
    if kind == ".txt":
        if filters:
            raise ValueError(f"{name}: --filter selects JSONL/Parquet rows by their fields, and a "
                             f"text file has none; leave the text files out or drop the filter")
        yield _txt_pieces(stream, name)
    elif kind == ".jsonl":
        yield from _jsonl_rows(stream, name, text_key, filters)
    elif kind == ".tar":
        with tarfile.open(fileobj=stream, mode="r|") as tar:   # stream mode: members in order, no seeking
            for member in tar:
                form = _format(member.name)
                if not member.isfile() or form is None:
                    continue                    # directories, links, README and other non-corpus files
                if form[0] == ".parquet":
                    raise ValueError(f"{name}:{member.name}: Parquet inside a tar archive cannot be "
                                     f"streamed; extract it first")
                yield from _documents(tar.extractfile(member), f"{name}:{member.name}", *form,
                                      text_key, filters)


def iter_document_pieces(paths, text_key="text", filters=(), column=None):
    """Yield, per document of ``paths`` (as from ``expand_inputs``), an iterator of its text pieces;
    consume each before asking for the next document (the files are streams).

    A ``.txt`` document comes ~1 MB at a time; a JSONL/Parquet row is one piece. Arguments as for
    ``iter_documents``.
    """
    filters = parse_filters(filters)
    for path in map(str, paths):
        form = _format(os.path.basename(path))
        if form is None:
            raise ValueError(f"{path}: unknown corpus format; npgpt prepare reads {FORMATS}")
        if form[0] == ".parquet":
            yield from _parquet_rows(path, column or text_key, filters)
        else:
            yield from _documents(open(path, "rb"), path, *form, text_key, filters)


def iter_documents(paths, text_key="text", filters=(), column=None):
    """Yield each document of ``paths`` (as from ``expand_inputs``) as one string, in file order.

    text_key: the (possibly dotted) JSONL field holding the text. column: the Parquet text column
    (default: ``text_key``). filters: ``"key=value"`` strings, keys dotted into the row, e.g.
    ``"meta.pile_set_name=Wikipedia (en)"``; a row is kept when, for every key, its value is one of
    those given (non-string values compare as JSON: ``meta.year=2020``, ``flag=true``).

    Raises ValueError naming the file and line for text that is not UTF-8, a line that is not JSON
    or a row without the text field; ImportError naming the extra to install for .zst/.parquet.
    """
    for pieces in iter_document_pieces(paths, text_key, filters, column):
        yield "".join(pieces)


# -------------------------------------------------------------------------------- validation split

def is_validation(text, fraction):
    """Whether the document ``text`` belongs to the validation split holding ``fraction`` of documents.

    The first 8 bytes of the BLAKE2b hash of its UTF-8 bytes, read as a number in [0, 1), are compared
    with ``fraction``: the same answer on every run and machine, for about ``fraction`` of documents.
    """
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0 ** 64
