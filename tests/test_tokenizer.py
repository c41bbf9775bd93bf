"""GPT-2 BPE: byte-exact parity with tiktoken (oracle) on many kinds of text, round trips, special-token
rules, HF file format, BPE training known answers and equality with a naive trainer."""
import collections
import json
import os

import pytest
import regex
from hypothesis import given, strategies as st

from npgpt.tokenizer import (get_encoding, GPT2_PATTERN, BasicTokenizer, RegexTokenizer, CharTokenizer, load_tokenizer,
                             bytes_to_unicode, load_hf_bpe, load_tokenizer_from_meta)
from npgpt.data import bundled_corpus_path

ENC = get_encoding("gpt2")
ASSET = os.path.join(os.path.dirname(__file__), "..", "npgpt", "assets", "gpt2.tiktoken")
COVERED = collections.Counter()


@pytest.fixture(scope="module")
def ref():
    """tiktoken's GPT-2 encoder built from the same ranks file with tiktoken's own loader and pattern."""
    tiktoken = pytest.importorskip("tiktoken")
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str
    return tiktoken.Encoding("gpt2-ref", pat_str=r50k_pat_str, mergeable_ranks=tiktoken.load.load_tiktoken_bpe(ASSET),
                             special_tokens={"<|endoftext|>": 50256})


def check(ref, text):
    ours = ENC.encode_ordinary(text)
    assert ours == ref.encode_ordinary(text), repr(text[:80])
    COVERED["texts"] += 1
    COVERED["tokens"] += len(ours)


SAMPLES = [
    "Hello world", "It's, we'll, you're, I'd, they've, she'S, I'M", "def f(x):\n    return x ** 2  # square\n",
    "class A:\n\tpass\r\n\r\n", "trailing spaces   \n   leading", "\n\n\n\n\nmany newlines\n\n", "   ", "",
    "3.14159 1234567890 ١٢٣ ๑๒๓", "Ünïcödé façade naïve", "日本語のテキスト、中文文本。", "Привет, мир! Ελληνικά",
    "مرحبا بالعالم", "emoji 🤖🎉👩‍👩‍👧 flags 🇫🇷", "combining e\u0301 a\u0308 \u0915\u094d\u0937", "tabs\t\t\tand\u00a0nbsp",
    "<|endoftext|> as plain text", "a" * 300, " " * 50 + "x", "x\u2028y\u2029z\x00\x7f",
]


def test_parity_known_texts(ref):
    for s in SAMPLES:
        check(ref, s)


def test_parity_python_source(ref):
    import npgpt.engine as m
    check(ref, open(m.__file__).read())


def test_parity_corpus_chunk(ref):
    text = open(bundled_corpus_path()).read()
    check(ref, text[:400_000])
    check(ref, text[-200_000:])


@pytest.mark.slow
def test_parity_whole_corpus(ref):
    check(ref, open(bundled_corpus_path()).read())


@given(st.text())
def test_parity_hypothesis_text(ref, s):
    check(ref, s)


@given(st.binary(max_size=200))
def test_parity_hypothesis_bytes(ref, b):
    check(ref, b.decode("utf-8", errors="replace"))


@given(st.text(alphabet=st.sampled_from(" \t\n\r\x0bab'1.é🤖"), max_size=60))
def test_parity_whitespace_and_contractions(ref, s):
    check(ref, s)


@given(st.text())
def test_round_trip(s):
    assert ENC.decode(ENC.encode_ordinary(s)) == s


def test_known_ids_and_properties():
    # GPT-2's well-known ids: "Hello" 15496, " world" 995, "," 11; <|endoftext|> 50256
    assert ENC.encode("Hello world") == [15496, 995]
    assert ENC.n_vocab == 50257 and ENC.eot_token == 50256
    assert ENC.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert ENC.encode_batch(["Hello", " world"]) == [[15496], [995]]


def test_disallowed_special_raises_like_tiktoken(ref):
    with pytest.raises(ValueError, match="disallowed special token"):
        ENC.encode("hi <|endoftext|>")
    with pytest.raises(ValueError):
        ref.encode("hi <|endoftext|>")
    s = "a<|endoftext|>b"
    assert ENC.encode(s, allowed_special="all") == ref.encode(s, allowed_special="all")
    assert ENC.encode(s, disallowed_special=()) == ref.encode(s, disallowed_special=())


def test_decode_partial_utf8_replaces():
    ids = ENC.encode("🤖")
    assert len(ids) > 1
    assert ENC.decode(ids[:1]) == ENC.decode_bytes(ids[:1]).decode("utf-8", errors="replace")
    assert "\ufffd" in ENC.decode(ids[:1])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ENC.decode([50257])


def test_hf_vocab_merges_format(tmp_path, ref):
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("A")] == "A" and table[ord(" ")] == "\u0120"
    vocab = {"".join(table[b] for b in tok): i for tok, i in ENC.mergeable_ranks.items()}
    vocab["<|endoftext|>"] = 50256
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = ["#version: 0.2"]
    for tok, i in sorted(ENC.mergeable_ranks.items(), key=lambda kv: kv[1])[256:1256]:
        for k in range(1, len(tok)):
            if tok[:k] in ENC.mergeable_ranks and tok[k:] in ENC.mergeable_ranks:
                merges.append("".join(table[b] for b in tok[:k]) + " " + "".join(table[b] for b in tok[k:]))
                break
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n")
    enc = load_hf_bpe(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    text = open(bundled_corpus_path()).read()[:20000]
    assert enc.encode_ordinary(text) == ref.encode_ordinary(text)
    assert enc.eot_token == 50256


# ---- training ------------------------------------------------------------------------------------

def test_wikipedia_example():
    # aaabdaaabac: pairs aa=4 (overlapping), so aa -> Z(256): ZabdZabac. Then ab and Za both occur twice;
    # the tie goes to the smaller pair (97, 98) < (256, 97): ab -> Y(257): ZYdZYac. Then ZY -> X(258): XdXac.
    tok = BasicTokenizer().train("aaabdaaabac", 256 + 3)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.decode(tok.encode("aaabdaaabac")) == "aaabdaaabac"


def naive_train(words, num_merges):
    """minbpe-style reference: recount every pair after every merge; ties to the smallest pair."""
    words = {tuple(w): c for w, c in words.items()}
    merges = []
    for k in range(num_merges):
        counts = collections.Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                counts[p] += c
        if not counts:
            break
        best = max(counts.values())
        pair = min(p for p, c in counts.items() if c == best)
        merges.append(pair)
        new = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(256 + k)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        words = new
    return merges


@given(st.text(alphabet="abc d'\n1", min_size=1, max_size=120), st.integers(1, 30))
def test_incremental_training_equals_naive(text, n):
    tok = RegexTokenizer().train(text, 256 + n)
    words = collections.Counter(p.encode() for p in regex.findall(GPT2_PATTERN, text))
    assert tok.merges == naive_train(words, n)


def test_trained_tokenizer_round_trip_and_save_load(tmp_path):
    text = open(bundled_corpus_path()).read()[:100_000]
    tok = RegexTokenizer("gpt2").train(text, 600, special_tokens=["<|endoftext|>"])
    assert tok.n_vocab == 600 and tok.eot_token == 599
    sample = text[5000:7000] + "<|endoftext|>"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample and ids[-1] == 599 and len(ids) < len(sample) / 2
    for name in ("t.json", "t.tiktoken"):
        tok.save(str(tmp_path / name))
        back = load_tokenizer(str(tmp_path / name))
        assert back.encode(sample) == ids
    t4 = RegexTokenizer("gpt4").train(text, 400)
    assert t4.decode(t4.encode(text[:3000])) == text[:3000]


def test_char_tokenizer():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world")) and tok.n_vocab == 8
    assert tok.decode(tok.encode("hold")) == "hold"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("xyz")
    assert load_tokenizer_from_meta({"tokenizer": "char", "chars": tok.chars}).encode("he") == tok.encode("he")
    assert load_tokenizer_from_meta({"tokenizer": "gpt2"}) is ENC


def test_parity_coverage_report(ref):
    """Runs last in this module: reports how much text the parity checks covered."""
    print(f"\nparity vs tiktoken: {COVERED['texts']} texts, {COVERED['tokens']} tokens")
    assert COVERED["texts"] > 50
