"""npgpt.corpus: every format (plain, compressed, tar, nested tar, Parquet) streams the same documents
as the plain texts, in order and with the same GPT-2 ids; Pile-style filters; clear errors; a stable
document-hash validation split."""
import bz2
import gzip
import io
import json
import lzma
import tarfile

import pytest

from npgpt import corpus
from npgpt.tokenizer import get_encoding

DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n\nAll:\n  Speak, speak.\r\n",
    "Ünïcödé — 日本語のテキスト 🙂 and 'quotes' don't break it.\n",
    "",                                              # an empty document stays a document
    "Last one, without a final newline",
]
PILE = [{"text": d, "meta": {"pile_set_name": s}} for d, s in
        zip(DOCS, ["Wikipedia (en)", "ArXiv", "Wikipedia (en)", "Github"])]


def jsonl_bytes(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def tar_bytes(members, mode="w"):
    """A tar archive (bytes) of {name: bytes}, in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:
        info = tarfile.TarInfo("docs")                 # a directory entry is skipped
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def txt_members(suffix="", compress=lambda b: b):
    return {f"docs/{i:03d}.txt{suffix}": compress(d.encode()) for i, d in enumerate(DOCS)}


def zstd_compress(data):
    return pytest.importorskip("zstandard").ZstdCompressor().compress(data)


def write(path, data):
    path.write_bytes(data)
    return [str(path)]


# name -> a function (tmp_path) -> the paths of a corpus holding DOCS
CORPORA = {
    "txt": lambda d: sum((write(d / f"{i}.txt", t.encode()) for i, t in enumerate(DOCS)), []),
    "jsonl": lambda d: write(d / "a.jsonl", jsonl_bytes({"text": t} for t in DOCS)),
    "jsonl.gz": lambda d: write(d / "a.jsonl.gz", gzip.compress(jsonl_bytes({"text": t} for t in DOCS))),
    "jsonl.xz": lambda d: write(d / "a.jsonl.xz", lzma.compress(jsonl_bytes({"text": t} for t in DOCS))),
    "jsonl.bz2": lambda d: write(d / "a.jsonl.bz2", bz2.compress(jsonl_bytes({"text": t} for t in DOCS))),
    "jsonl.zst": lambda d: write(d / "a.jsonl.zst", zstd_compress(jsonl_bytes({"text": t} for t in DOCS))),
    "tar of txt": lambda d: write(d / "a.tar", tar_bytes(txt_members())),
    "tar.gz of txt": lambda d: write(d / "a.tar.gz", tar_bytes(txt_members(), "w:gz")),
    "tar of txt.xz": lambda d: write(d / "a.tar", tar_bytes(txt_members(".xz", lzma.compress))),
    "tar of jsonl.zst": lambda d: write(d / "a.tar", tar_bytes(
        {"x/a.jsonl.zst": zstd_compress(jsonl_bytes({"text": t} for t in DOCS))})),
    # OpenWebText: subsets are .xz files holding a tar of .txt documents, all inside one .tar
    "xz of tar (OpenWebText subset)": lambda d: write(d / "urlsf_subset00-1_data.xz",
                                                      lzma.compress(tar_bytes(txt_members()))),
    "tar of xz of tar (openwebtext.tar)": lambda d: write(d / "openwebtext.tar", tar_bytes({
        "openwebtext/urlsf_subset00-1_data.xz": lzma.compress(tar_bytes(dict(list(txt_members().items())[:2]))),
        "openwebtext/urlsf_subset00-2_data.xz": lzma.compress(tar_bytes(dict(list(txt_members().items())[2:]))),
        "openwebtext/README": b"not a corpus file: skipped"})),
    "bare .gz of text, then .txt": lambda d: write(d / "0.gz", gzip.compress(DOCS[0].encode())) + sum(
        (write(d / f"{i}.txt", t.encode()) for i, t in enumerate(DOCS) if i), []),
}


def parquet_corpus(d):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "content": DOCS}), d / "a.parquet", row_group_size=2)
    return [str(d / "a.parquet")]


@pytest.mark.parametrize("name", list(CORPORA))
def test_every_format_gives_the_plain_documents_and_ids(tmp_path, name):
    paths = CORPORA[name](tmp_path)
    docs = list(corpus.iter_documents(corpus.expand_inputs(paths)))
    assert docs == DOCS
    enc = get_encoding("gpt2")
    assert [enc.encode_ordinary(d) for d in docs] == [enc.encode_ordinary(d) for d in DOCS]


def test_parquet_column(tmp_path):
    paths = parquet_corpus(tmp_path)
    assert list(corpus.iter_documents(paths, column="content")) == DOCS
    assert list(corpus.iter_documents(paths, text_key="content")) == DOCS      # column defaults to text_key
    with pytest.raises(ValueError, match=r"no column 'text'.*'content'"):
        list(corpus.iter_documents(paths))


def test_parquet_filter_on_a_column(tmp_path):
    paths = parquet_corpus(tmp_path)
    assert list(corpus.iter_documents(paths, column="content", filters=["id=1", "id=3"])) == [DOCS[1], DOCS[3]]


def test_pile_filters_dotted_keys(tmp_path):
    path = tmp_path / "00.jsonl.zst"
    path.write_bytes(zstd_compress(jsonl_bytes(PILE)))
    wiki = ["meta.pile_set_name=Wikipedia (en)"]
    assert list(corpus.iter_documents([path], filters=wiki)) == [DOCS[0], DOCS[2]]
    either = wiki + ["meta.pile_set_name=Github"]            # one key, two values: either
    assert list(corpus.iter_documents([path], filters=either)) == [DOCS[0], DOCS[2], DOCS[3]]
    both = wiki + ["meta.missing=x"]                         # two keys: both must hold
    assert list(corpus.iter_documents([path], filters=both)) == []
    with pytest.raises(ValueError, match="key=value"):
        list(corpus.iter_documents([path], filters=["meta.pile_set_name"]))


def test_zst_with_several_frames_and_a_long_window(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    rows = [jsonl_bytes([{"text": t}]) for t in DOCS]
    long_window = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(
        window_log=28, enable_ldm=True)).compressobj()          # no size known: a 256 MB window,
    last = long_window.compress(b"".join(rows[2:])) + long_window.flush()   # above zstd's default limit
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(r) for r in rows[:2]) + last)
    assert list(corpus.iter_documents([path])) == DOCS


def test_text_key_and_non_string_filters(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes([{"body": {"content": "x"}, "year": 2020, "ok": True},
                                  {"body": {"content": "y"}, "year": 2021, "ok": False}]))
    assert list(corpus.iter_documents([path], text_key="body.content")) == ["x", "y"]
    assert list(corpus.iter_documents([path], text_key="body.content", filters=["year=2021"])) == ["y"]
    assert list(corpus.iter_documents([path], text_key="body.content", filters="ok=true")) == ["x"]


def test_pieces_stream_a_large_text_document(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_BYTES", 7)
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(DOCS[1].encode()))
    (pieces,) = [list(p) for p in corpus.iter_document_pieces([tmp_path / "a.txt.xz"])]
    assert len(pieces) > 3 and "".join(pieces) == DOCS[1]       # split mid-character, decoded whole


def test_expand_inputs_directories_globs_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jsonl.gz", "a.txt", "sub/c.tar.xz", "sub/d.parquet", "notes.md", "sub/e.json"]:
        (tmp_path / name).write_bytes(b"")
    expected = [str(tmp_path / n) for n in ["a.txt", "b.jsonl.gz", "sub/c.tar.xz", "sub/d.parquet"]]
    assert corpus.expand_inputs(tmp_path) == expected
    assert corpus.expand_inputs([str(tmp_path / "sub" / "*"), str(tmp_path / "a.txt")]) == expected[2:] + expected[:1]
    with pytest.raises(ValueError, match=r"notes\.md: unknown corpus format.*\.zst"):
        corpus.expand_inputs(tmp_path / "notes.md")
    with pytest.raises(FileNotFoundError, match="no .txt or .jsonl"):
        corpus.expand_inputs(tmp_path / "nothing*.txt")
    with pytest.raises(ValueError, match="nothing"):        # InputNotFound is a ValueError too
        corpus.expand_inputs(tmp_path / "nothing")


def test_clear_errors_name_file_and_line(tmp_path):
    bad_text = tmp_path / "a.txt.gz"
    bad_text.write_bytes(gzip.compress(b"one\ntwo\nthr\xffee\n"))
    with pytest.raises(ValueError, match=r"a\.txt\.gz:3: not UTF-8"):
        list(corpus.iter_documents([bad_text]))
    rows = tmp_path / "a.jsonl"
    rows.write_bytes(jsonl_bytes([{"text": "a"}, {"content": "b"}]))
    with pytest.raises(ValueError, match=r"a\.jsonl:2: no 'text' field .*'content'.*--text_key"):
        list(corpus.iter_documents([rows]))
    rows.write_bytes(b'{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: not a JSON line"):
        list(corpus.iter_documents([rows]))
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes({"in/x.jsonl": jsonl_bytes([{"text": "a"}, {"txt": "b"}])}))
    with pytest.raises(ValueError, match=r"a\.tar:in/x\.jsonl:2: no 'text'"):
        list(corpus.iter_documents([archive]))
    with pytest.raises(ValueError, match="--filter"):
        list(corpus.iter_documents(CORPORA["txt"](tmp_path), filters=["a=b"]))


def test_missing_optional_package_names_the_extra(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_optional(name, *args, **kwargs):
        if name in ("zstandard", "pyarrow.parquet", "pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optional)
    (tmp_path / "a.jsonl.zst").write_bytes(b"")
    (tmp_path / "a.parquet").write_bytes(b"")
    for name in ["a.jsonl.zst", "a.parquet"]:
        with pytest.raises(ImportError, match=r'pip install -e "\.\[corpora\]"'):
            list(corpus.iter_documents([tmp_path / name]))


def test_is_validation_stable_and_about_the_fraction():
    docs = [f"document number {i}\n" for i in range(20000)]
    picked = [corpus.is_validation(d, 0.1) for d in docs]
    assert abs(sum(picked) / len(docs) - 0.1) < 0.01          # ~5 standard deviations
    assert picked == [corpus.is_validation(d, 0.1) for d in docs]
    # pinned: the split must not change across versions, runs or machines
    assert [i for i in range(20) if corpus.is_validation(f"document number {i}\n", 0.3)] == PINNED
    assert not any(corpus.is_validation(d, 0.0) for d in docs[:100])
    assert all(corpus.is_validation(d, 1.0) for d in docs[:100])
    # a larger fraction keeps every document of a smaller one (growing the split moves nothing back)
    assert all(corpus.is_validation(d, 0.2) for d, p in zip(docs, picked) if p)


PINNED = [1, 8, 16]
