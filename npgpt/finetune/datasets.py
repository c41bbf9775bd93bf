"""Fine-tuning data: the bundled works, genre passages, user (text, label) files, instruction sets,
and padding of variable-length token sequences into one batch.

The bundled ``npgpt/data/shakespeare_works.jsonl`` holds 42 public-domain works, one JSON object a
line: ``work`` (an id), ``title``, ``genre`` (comedy, tragedy, history or poem) and ``text``.
Everything here is deterministic given its ``seed``.
"""
import csv
import json
import os
import re

import numpy as np

__all__ = ["bundled_works_path", "load_works", "split_works", "passages", "genre_passages",
           "classification_split", "load_labeled", "instruction_examples", "split_examples", "pad_batch"]

FRONT_MATTER_CHARS = 1500   # title page and cast list at the start of each work, skipped


def bundled_works_path():
    """Path of the bundled ``shakespeare_works.jsonl``."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "shakespeare_works.jsonl")


def load_works(path=None):
    """The works as a list of dicts (``work``, ``title``, ``genre``, ``text``), in file order."""
    path = path or bundled_works_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; pass the path of a JSONL file of works")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_works(works, test_frac=0.2, seed=0):
    """(train_ids, test_ids): a split of the works by ``work`` id, stratified by genre.

    Each genre puts round(test_frac * n) of its n works (at least one, at most n - 1) in the test
    set, chosen by a seeded permutation of the sorted ids, so no work is on both sides.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for genre in sorted({w["genre"] for w in works}):
        ids = sorted(w["work"] for w in works if w["genre"] == genre)
        k = min(max(1, int(round(test_frac * len(ids)))), len(ids) - 1) if len(ids) > 1 else 0
        order = rng.permutation(len(ids))
        test += [ids[i] for i in order[:k]]
        train += [ids[i] for i in order[k:]]
    return sorted(train), sorted(test)


def passages(text, encode, min_tokens=100, max_tokens=300, skip_chars=FRONT_MATTER_CHARS):
    """Consecutive whole lines of ``text`` grouped into passages of min_tokens..max_tokens tokens.

    Lines are added until the next one would pass ``max_tokens``; a group shorter than
    ``min_tokens`` is dropped (a single over-long line is cut to ``max_tokens`` characters' worth).
    """
    lines = [ln.rstrip() for ln in text[skip_chars:].split("\n")]
    out, group, n_tokens = [], [], 0
    for ln in lines:
        k = len(encode(ln + "\n"))
        if group and n_tokens + k > max_tokens:
            if n_tokens >= min_tokens:
                out.append("\n".join(group))
            group, n_tokens = [], 0
        if k > max_tokens:
            continue
        group.append(ln)
        n_tokens += k
    if group and n_tokens >= min_tokens:
        out.append("\n".join(group))
    return [p.strip("\n") for p in out if len(encode(p.strip("\n"))) >= min_tokens]


def genre_passages(works, encode, min_tokens=100, max_tokens=300, per_work=None, seed=0):
    """Examples ``{"text", "label", "work"}`` (label = the work's genre): the passages of every work,
    at most ``per_work`` from each (a seeded random choice, kept in text order)."""
    rng = np.random.default_rng(seed)
    out = []
    for w in works:
        found = passages(w["text"], encode, min_tokens, max_tokens)
        if per_work is not None and len(found) > per_work:
            keep = np.sort(rng.choice(len(found), per_work, replace=False))
            found = [found[i] for i in keep]
        out += [{"text": p, "label": w["genre"], "work": w["work"]} for p in found]
    return out


def classification_split(examples, by="work", test_frac=0.2, seed=0, works=None):
    """(train, test) lists of examples. ``by="work"``: whole works go to one side (stratified by
    genre with ``split_works``, needs ``works``); ``by="passage"``: a seeded shuffle of the passages,
    so the same work appears on both sides."""
    if by == "work":
        if works is None:
            raise ValueError("a split by work needs the list of works (works=...)")
        _, test_ids = split_works(works, test_frac, seed)
        test_ids = set(test_ids)
        return ([e for e in examples if e["work"] not in test_ids],
                [e for e in examples if e["work"] in test_ids])
    if by == "passage":
        order = np.random.default_rng(seed).permutation(len(examples))
        k = int(round(test_frac * len(examples)))
        test = set(order[:k].tolist())
        return ([e for i, e in enumerate(examples) if i not in test],
                [e for i, e in enumerate(examples) if i in test])
    raise ValueError(f"split must be 'work' or 'passage', got {by!r}")


def load_labeled(path, text_key="text", label_key="label"):
    """(text, label) examples from a CSV with a header row or a JSONL file (one object a line),
    as dicts ``{"text", "label", "work"}`` (``work`` = the row number)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; give a CSV (header text,label) or JSONL of {{text, label}}")
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".csv"):
            rows = list(csv.DictReader(f))
        else:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {i + 1} is not JSON ({e}); use one object per line") from None
    if not rows:
        raise ValueError(f"{path} holds no examples")
    missing = [i for i, r in enumerate(rows) if text_key not in r or label_key not in r]
    if missing:
        raise ValueError(f"{path}: row {missing[0] + 1} lacks '{text_key}' or '{label_key}' "
                         f"(got keys {sorted(rows[missing[0]])})")
    return [{"text": str(r[text_key]), "label": str(r[label_key]), "work": i} for i, r in enumerate(rows)]


# ---- instruction data ---------------------------------------------------------------------------

_SPEAKER = re.compile(r"^([A-Z][A-Z '\-]*[A-Z])\.$")
_NOT_SPEAKERS = ("ACT", "SCENE", "PERSONS", "EPILOGUE", "PROLOGUE", "INDUCTION", "THE ", "SONG", "CHORUS")


def _speeches(text):
    """[(speaker, [lines])] of a play in the ``NAME.`` / lines / blank-line layout."""
    out, speaker, lines = [], None, []
    for raw in text[FRONT_MATTER_CHARS:].split("\n"):
        s = raw.strip()
        m = _SPEAKER.match(s) if raw == s else None
        if m and not s.startswith(_NOT_SPEAKERS):
            if speaker and lines:
                out.append((speaker, lines))
            speaker, lines = m.group(1).title(), []
        elif not s:
            if speaker and lines:
                out.append((speaker, lines))
            speaker, lines = None, []
        elif speaker and not s.startswith("["):
            lines.append(s)
    return out


def _verse_lines(text, min_chars=30, max_chars=70):
    """Lines of running text (not stage directions, speaker tags or headings) of moderate length."""
    out = []
    for raw in text[FRONT_MATTER_CHARS:].split("\n"):
        s = raw.strip()
        if min_chars <= len(s) <= max_chars and not s.startswith("[") and not _SPEAKER.match(s) \
                and not s.isupper() and re.fullmatch(r"[A-Za-z ,.;:!?'\-]+", s):
            out.append(s)
    return out


def instruction_examples(works, n_per_task=200, seed=0):
    """Alpaca-style examples ``{"instruction", "input", "output", "task"}`` built by fixed rules:

    - ``work``:     "Which work is this line from?"  a line -> the work's title
    - ``genre``:    "Which genre is this line from?"  a line -> comedy / tragedy / history / poem
    - ``speaker``:  "Who speaks next?"  "NAME: first line of a speech" -> the next speaker's name
    - ``continue``: "Continue the line."  the first half of a line -> the rest of it
    - ``reverse``:  "Reverse these words."  3-6 words -> the same words in reverse order

    ``n_per_task`` examples of each, drawn with a seeded generator (works chosen uniformly).
    """
    rng = np.random.default_rng(seed)
    lines = {w["work"]: _verse_lines(w["text"]) for w in works}
    plays = [w for w in works if len(_speeches(w["text"])) > 50]
    speeches = {w["work"]: _speeches(w["text"]) for w in plays}
    with_lines = [w for w in works if lines[w["work"]]]
    out = []

    def pick_line():
        w = with_lines[rng.integers(len(with_lines))]
        work_lines = lines[w["work"]]
        return w, work_lines[rng.integers(len(work_lines))]

    for _ in range(n_per_task):
        w, line = pick_line()
        out.append({"instruction": "Which work is this line from?", "input": line, "output": w["title"],
                    "task": "work"})
    for _ in range(n_per_task):
        w, line = pick_line()
        out.append({"instruction": "Which genre is this line from?", "input": line, "output": w["genre"],
                    "task": "genre"})
    for _ in range(n_per_task if plays else 0):
        w = plays[rng.integers(len(plays))]
        work_speeches = speeches[w["work"]]
        i = int(rng.integers(len(work_speeches) - 1))
        speaker, speech = work_speeches[i]
        out.append({"instruction": "Who speaks next?", "input": f"{speaker}: {speech[0]}",
                    "output": work_speeches[i + 1][0], "task": "speaker"})
    for _ in range(n_per_task):
        _, line = pick_line()
        words = line.split()
        cut = max(1, len(words) // 2)
        out.append({"instruction": "Continue the line.", "input": " ".join(words[:cut]),
                    "output": " ".join(words[cut:]), "task": "continue"})
    for _ in range(n_per_task):
        _, line = pick_line()
        words = re.findall(r"[A-Za-z']+", line)
        k = int(rng.integers(3, 7))
        j = int(rng.integers(max(1, len(words) - k + 1)))
        words = words[j:j + k]
        out.append({"instruction": "Reverse these words.", "input": " ".join(words),
                    "output": " ".join(reversed(words)), "task": "reverse"})
    return out


def split_examples(examples, test_frac=0.1, seed=0):
    """(train, test): a seeded shuffle of ``examples`` cut at ``test_frac``."""
    order = np.random.default_rng(seed).permutation(len(examples))
    k = int(round(test_frac * len(examples)))
    return [examples[i] for i in order[k:]], [examples[i] for i in order[:k]]


# ---- batches -------------------------------------------------------------------------------------

def pad_batch(seqs, pad_id=0, max_len=None):
    """Right-pad token lists to the longest one (or cut to ``max_len``, keeping the start).

    Returns ids (B, T) int64 and lengths (B,) int64, the number of real tokens of each row.
    """
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    seqs = [list(s)[:max_len] if max_len else list(s) for s in seqs]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("cannot pad an empty sequence: every example needs at least one token")
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)   # (B, T)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return ids, np.array([len(s) for s in seqs], dtype=np.int64)
