"""GPT-2 BPE encoding: byte-exact parity with tiktoken (the oracle) on the whole bundled corpus, Python
source, many scripts, emoji, combining marks, whitespace, digits and hypothesis-drawn text; round
trips; tiktoken's special-token rules; the ASCII fast path and block cuts equal the plain regex.

Run with -s to see how many texts and tokens the parity checks covered."""
import collections
import glob
import os
import re

import pytest
import regex
from hypothesis import given, settings, strategies as st

import npgpt
from npgpt.data import bundled_corpus_path
from npgpt.tokenizer import GPT2_PATTERN, get_encoding, load_tokenizer
from npgpt.tokenizer import encoding as encoding_mod
from npgpt.tokenizer.encoding import GPT2_ASCII_PATTERN, pretokenize

ENC = get_encoding("gpt2")
ASSET = os.path.join(os.path.dirname(npgpt.__file__), "assets", "gpt2.tiktoken")
COVERED = collections.Counter()


def check(tiktoken_ref, text):
    ours = ENC.encode_ordinary(text)
    assert ours == tiktoken_ref.encode_ordinary(text), repr(text[:80])
    COVERED["texts"] += 1
    COVERED["tokens"] += len(ours)
    COVERED["chars"] += len(text)


SAMPLES = [
    "Hello world", "It's, we'll, you're, I'd, they've, she'S, I'M, 'tis", "don't'll've",
    "def f(x):\n    return x ** 2  # square\n", "class A:\n\tpass\r\n\r\n", "trailing spaces   \n   leading",
    "\n\n\n\n\nmany newlines\n\n", "   ", "", " ", "\r\n\r\n\r\n", "a\r\n  b\t \t c \n",
    "3.14159 1234567890 00042 ١٢٣ ๑๒๓ ²³ ½ Ⅻ", "Ünïcödé façade naïve", "日本語のテキスト、中文文本。",
    "Привет, мир! Ελληνικά", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "안녕하세요 세계",
    "emoji 🤖🎉👩‍👩‍👧 flags 🇫🇷 skin 👍🏽", "combining e\u0301 a\u0308 \u0915\u094d\u0937 Z\u0336\u0337",
    "tabs\t\t\tand\u00a0nbsp\u2003em\u3000ideographic", "<|endoftext|> as plain text", "a" * 300,
    " " * 50 + "x", "x\u2028y\u2029z\x00\x7f\x1c\x1d\x85", "\ufeffBOM and \ufffd replacement",
]


def test_parity_known_texts(tiktoken_ref):
    for s in SAMPLES:
        check(tiktoken_ref, s)


def test_parity_python_source(tiktoken_ref):
    files = sorted(glob.glob(os.path.join(os.path.dirname(npgpt.__file__), "**", "*.py"), recursive=True))
    assert len(files) > 10
    for path in files:
        check(tiktoken_ref, open(path, encoding="utf-8").read())


def test_parity_whole_corpus(tiktoken_ref):
    text = open(bundled_corpus_path(), encoding="utf-8").read()
    check(tiktoken_ref, text)
    check(tiktoken_ref, text[12345:67890])          # a slice starting mid-word


@given(st.text())
def test_parity_hypothesis_text(tiktoken_ref, s):
    check(tiktoken_ref, s)


@given(st.binary(max_size=300))
def test_parity_hypothesis_bytes(tiktoken_ref, b):
    check(tiktoken_ref, b.decode("utf-8", errors="replace"))      # arbitrary bytes as text (no surrogates)


@given(st.lists(st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\u00a0", "\u3000",
                                 "a", "Bc", "'s", "'", "'LL", "1", "23", ".", "!?", "é", "日", "🤖", "\u0301"]),
                max_size=80).map("".join))
def test_parity_whitespace_digits_contractions(tiktoken_ref, s):
    check(tiktoken_ref, s)


@settings(max_examples=10)
@given(st.lists(st.sampled_from(["word ", "Word", " ", "\n", "\n\n", ".", "é", "日本", "🤖", "  ", "\t", "12"]),
                min_size=200, max_size=600).map("".join))
def test_parity_block_cuts(tiktoken_ref, s):
    """Texts longer than a few blocks (blocks shrunk to 64 characters) with ASCII and non-ASCII blocks."""
    old = encoding_mod._BLOCK_CHARS
    encoding_mod._BLOCK_CHARS = 64
    try:
        check(tiktoken_ref, s)
        assert sum(pretokenize(s), []) == regex.findall(GPT2_PATTERN, s)
    finally:
        encoding_mod._BLOCK_CHARS = old


def test_small_cache_gives_the_same_ids(monkeypatch):
    monkeypatch.setattr(encoding_mod, "_CACHE_MAX", 50)      # the cache empties itself many times
    fresh = encoding_mod.Encoding("gpt2", GPT2_PATTERN, ENC.mergeable_ranks, ENC.special_tokens)
    text = open(bundled_corpus_path(), encoding="utf-8").read()[:60_000]
    assert fresh.encode_ordinary(text) == ENC.encode_ordinary(text) and len(fresh._cache) <= 50


def test_surrogates_like_tiktoken(tiktoken_ref):
    for s in ["lone \ud800 high", "low \udc00", "pair \ud83e\udd16 split", "\udfff"]:
        assert ENC.encode_ordinary(s) == tiktoken_ref.encode_ordinary(s) == ENC.encode(s)


@given(st.text())
def test_round_trip(s):
    assert ENC.decode(ENC.encode_ordinary(s)) == s
    assert ENC.decode_bytes(ENC.encode_ordinary(s)) == s.encode("utf-8")


def test_ascii_pattern_equals_unicode_pattern_on_ascii():
    # the character classes agree on every ASCII character ...
    for c in map(chr, range(128)):
        for uni, asc in [(r"\p{L}", "[A-Za-z]"), (r"\p{N}", "[0-9]"), (r"\s", "[\t\n\x0b\x0c\r ]")]:
            assert bool(regex.fullmatch(uni, c)) == bool(re.fullmatch(asc, c)), (uni, c)
    # ... and so do the whole patterns on every string of two ASCII characters
    pat, asc = regex.compile(GPT2_PATTERN), re.compile(GPT2_ASCII_PATTERN)
    for a in range(128):
        for b in range(128):
            s = chr(a) + chr(b)
            assert pat.findall(s) == asc.findall(s), repr(s)


@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_ascii_pattern_equals_unicode_pattern_hypothesis(s):
    assert re.findall(GPT2_ASCII_PATTERN, s) == regex.findall(GPT2_PATTERN, s)


def test_known_ids_and_properties():
    # GPT-2's well-known ids: "Hello" 15496, " world" 995, "," 11; <|endoftext|> 50256
    assert ENC.encode("Hello world") == [15496, 995] and ENC.encode("Hello,") == [15496, 11]
    assert ENC.n_vocab == 50257 and ENC.eot_token == 50256
    assert ENC.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert ENC.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert ENC.encode_batch(["Hello", " world"]) == [[15496], [995]]
    assert ENC.decode([15496, 11, 995]) == "Hello, world"


def test_special_tokens_like_tiktoken(tiktoken_ref):
    with pytest.raises(ValueError, match="disallowed special token"):
        ENC.encode("hi <|endoftext|>")
    with pytest.raises(ValueError, match="disallowed special token"):
        tiktoken_ref.encode("hi <|endoftext|>")
    with pytest.raises(ValueError, match="disallowed special token"):
        ENC.encode_batch(["fine", "<|endoftext|>"])
    for s in ["a<|endoftext|>b", "<|endoftext|><|endoftext|> x", "<|endoftext|", "x <|endoftext|>\n"]:
        for kw in [dict(allowed_special="all"), dict(disallowed_special=()), dict(allowed_special={"<|endoftext|>"}),
                   dict(allowed_special={"not special"}, disallowed_special=())]:
            assert ENC.encode(s, **kw) == tiktoken_ref.encode(s, **kw), (s, kw)
        assert ENC.encode_batch([s, s], allowed_special="all") == tiktoken_ref.encode_batch([s, s], allowed_special="all")
        batch = ENC.encode_ordinary_batch([s, s[:3]])
        assert batch == tiktoken_ref.encode_ordinary_batch([s, s[:3]]) and ENC.decode_batch(batch) == [s, s[:3]]


def test_decode_partial_utf8_replaces(tiktoken_ref):
    ids = ENC.encode("🤖 é")
    assert len(ids) > 2
    for k in range(len(ids) + 1):
        assert ENC.decode(ids[:k]) == tiktoken_ref.decode(ids[:k])       # U+FFFD for a partial character
        assert ENC.decode_bytes(ids[:k]) == tiktoken_ref.decode_bytes(ids[:k])
    assert "\ufffd" in ENC.decode(ids[:1])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ENC.decode([50257])


def test_tiktoken_file_loads_as_a_tokenizer():
    tok = load_tokenizer(ASSET)                 # ranks whose single bytes are not ids 0..255
    text = open(bundled_corpus_path(), encoding="utf-8").read()[:30000] + " 🤖 é"
    assert tok.encode_ordinary(text) == ENC.encode_ordinary(text) and tok.decode(tok.encode(text)) == text


def test_get_encoding_unknown_name():
    with pytest.raises(ValueError, match="unknown encoding 'gpt5'"):
        get_encoding("gpt5")


def test_parity_coverage_report(tiktoken_ref):
    """Runs last in this module: reports how much text the parity checks above covered."""
    print(f"\nparity vs tiktoken: {COVERED['texts']} texts, {COVERED['chars']:,} characters, "
          f"{COVERED['tokens']:,} tokens, all byte-exact")
    assert COVERED["texts"] > 100 and COVERED["tokens"] > 1_500_000
