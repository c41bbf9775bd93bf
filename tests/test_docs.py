"""Every page of ``docs/`` runs: its code blocks are executed in order, so the pages cannot rot.

A page's ```python blocks share one namespace (like a notebook), run in a temporary directory on the
NumPy backend. Lines of ```bash blocks are ``npgpt ...`` commands (a leading ``$ `` is allowed); each
runs in-process and must exit 0. Output shown to the reader goes in ```text blocks, which are not run.
Relative links must point at files that exist, and the index must list every page.
"""
import os
import re
import shlex

import pytest

from npgpt import backend

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
DOCS = os.path.normpath(os.path.join(ROOT, "docs"))
PAGES = sorted(os.path.relpath(os.path.join(d, f), DOCS)
               for d, _, files in os.walk(DOCS) for f in files if f.endswith(".md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def code_blocks(text):
    """(language, code, line number) of each fenced block, in order."""
    for m in FENCE.finditer(text):
        yield m.group(1).lower(), m.group(2), text.count("\n", 0, m.start()) + 1


def read(page):
    with open(os.path.join(DOCS, page), encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def clean_backend():
    old_name, old_dtype = backend.name, backend.get_default_dtype()
    backend.use("numpy")
    backend.seed(0)
    try:
        yield
    finally:
        backend.use(old_name)
        backend.set_default_dtype(old_dtype)


def test_there_are_pages():
    assert "index.md" in PAGES and len(PAGES) >= 2


@pytest.mark.parametrize("page", PAGES)
def test_page_code_runs(page, tmp_path, monkeypatch, clean_backend):
    from npgpt.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__docs__"}
    for lang, code, line in code_blocks(read(page)):
        where = f"docs/{page}:{line}"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)                      # noqa: S102
        elif lang in ("bash", "sh", "shell", "console"):
            for cmd in code.splitlines():
                cmd = cmd.strip()
                if cmd.startswith("$ "):
                    cmd = cmd[2:]
                if not cmd or cmd.startswith("#"):
                    continue
                argv = shlex.split(cmd, comments=True)
                assert argv[0] == "npgpt", f"{where}: shell blocks in docs/ hold npgpt commands only, got {cmd!r}"
                rc = main(argv[1:])
                assert rc in (0, None), f"{where}: {cmd!r} exited {rc}"
        else:
            assert lang in ("text", "math"), f"{where}: a block is python or bash (run), text (output) or math, got {lang!r}"


@pytest.mark.parametrize("page", PAGES)
def test_page_links_resolve(page):
    base = os.path.dirname(os.path.join(DOCS, page))
    for target in LINK.findall(read(page)):
        if re.match(r"[a-z]+://", target) or target.startswith("#") or target.startswith("mailto:"):
            continue
        path = os.path.normpath(os.path.join(base, target.split("#")[0]))
        assert os.path.exists(path), f"docs/{page}: broken link {target}"


def test_index_lists_every_page():
    index = read("index.md")
    linked = {os.path.normpath(t.split("#")[0]) for t in LINK.findall(index)}
    missing = [p for p in PAGES if p != "index.md" and os.path.normpath(p) not in linked]
    assert not missing, f"docs/index.md does not link {missing}"
