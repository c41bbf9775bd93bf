"""BPE training: hand-derived known answers (Wikipedia's "aaabdaaabac", ties), the incremental trainer
equals the recount-everything reference trainer (``train_bpe_reference``), trained vocabularies encode
like tiktoken and like a naive merge-order encoder, save/load in both formats, the Hugging Face
vocab.json + merges.txt format (with HF `tokenizers` as oracle), the character tokenizer and
load_tokenizer_from_meta."""
import collections
import json
import os

import pytest
import regex
from hypothesis import given, settings, strategies as st

import npgpt
from npgpt.data import bundled_corpus_path
from npgpt.tokenizer import (GPT2_PATTERN, GPT4_PATTERN, BasicTokenizer, CharTokenizer, RegexTokenizer,
                             bytes_to_unicode, get_encoding, load_hf_bpe, load_tokenizer, load_tokenizer_from_meta,
                             train_bpe_reference)
from npgpt.tokenizer.reference import merge

# tiktoken's own cl100k_base pattern (tiktoken_ext/openai_public.py), the oracle for our GPT-4 pattern
CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
              r"""\s*[\r\n]|\s+(?!\S)|\s""")
SMALL_TEXT = st.text(alphabet="abc d'\n1é", min_size=1, max_size=120)


def corpus(n):
    return open(bundled_corpus_path(), encoding="utf-8").read()[:n]


# ---- known answers, derived by hand from the BPE definition ---------------------------------------

def test_wikipedia_example():
    # aaabdaaabac: pair counts aa=4 (overlapping occurrences counted), ab=2, the rest 1, so aa -> Z (256),
    # replaced left to right: Z a b d Z a b a c. Now ab=2 and Za=2 tie; the tie goes to the smaller pair,
    # (97, 98) < (256, 97): ab -> Y (257): Z Y d Z Y a c. Then ZY=2 -> X (258): X d X a c.
    tok = BasicTokenizer().train("aaabdaaabac", 256 + 3)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.decode(tok.encode("aaabdaaabac")) == "aaabdaaabac"
    assert tok.vocab[258] == b"aaab"


def test_ties_go_to_the_smallest_pair():
    # "abcd": every pair occurs once. (a,b) is smallest -> 256: [256 c d]; (256,c) and (c,d) tie once
    # more, (99, 100) < (256, 99) -> 257: [256 257]; finally (256, 257) -> 258.
    assert BasicTokenizer().train("abcd", 259).merges == [(97, 98), (99, 100), (256, 257)]


def test_training_stops_when_no_pair_is_left():
    tok = RegexTokenizer().train("ab ab", 300, special_tokens=["<|endoftext|>"])
    # pre-tokens "ab", " ab": merges (a,b) count 2 -> 256, then (" ", 256) -> 257, then nothing repeats
    assert tok.merges == [(97, 98), (32, 256)]
    assert tok.special_tokens == {"<|endoftext|>": 258} and tok.n_vocab == 259 and tok.eot_token == 258


def test_special_tokens_are_cut_out_of_the_training_text():
    # with the special cut out, the pre-tokens are "ab", "ab", "x": one merge (a, b) (count 2), then
    # no pair is left; left in, "<|endoftext|>" would contribute pairs such as (<, |) and (|, >).
    tok = RegexTokenizer().train("ab<|endoftext|>ab<|endoftext|>x", 300, special_tokens=["<|endoftext|>"])
    assert tok.merges == [(97, 98)] and tok.special_tokens == {"<|endoftext|>": 257}


def test_training_on_safe_chunks_equals_training_on_the_whole(monkeypatch):
    from npgpt import prepare as prep
    monkeypatch.setattr(prep, "CHUNK_CHARS", 500)
    text = corpus(30_000)
    chunks = list(prep._chunks(iter([text])))
    assert len(chunks) > 20
    assert RegexTokenizer().train_from_iterator(chunks, 500).merges == RegexTokenizer().train(text, 500).merges


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least"):
        RegexTokenizer().train("abc", 256, special_tokens=["<|endoftext|>"])


# ---- the incremental trainer against the minbpe-style reference ----------------------------------

def test_reference_helpers_doctests():
    import doctest
    from npgpt.tokenizer import reference
    result = doctest.testmod(reference)
    assert result.attempted >= 4 and result.failed == 0


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN, None], ids=["gpt2", "gpt4", "basic"])
@given(text=st.one_of(SMALL_TEXT, st.text(alphabet="aab", max_size=60)), n=st.integers(1, 40))
def test_incremental_training_equals_reference(pattern, text, n):
    """Runs such as "aaaa" check the overlapping-pair rule; the alphabet forces many ties."""
    tok = RegexTokenizer(pattern).train(text, 256 + n) if pattern else BasicTokenizer().train(text, 256 + n)
    pieces = regex.findall(pattern, text) if pattern else [text]
    assert tok.merges == train_bpe_reference(collections.Counter(p.encode() for p in pieces), n)


def test_incremental_training_equals_reference_on_corpus():
    text = corpus(20_000)
    tok = RegexTokenizer().train(text, 256 + 150)
    words = collections.Counter(p.encode() for p in regex.findall(GPT2_PATTERN, text))
    assert tok.merges == train_bpe_reference(words, 150)


# ---- trained vocabularies encode correctly ----------------------------------------------------------

def naive_encode(tok, text):
    """minbpe's encode: per pre-token, repeatedly merge the adjacent pair that was learned first."""
    merge_id = {pair: 256 + k for k, pair in enumerate(tok.merges)}
    out = []
    for piece in (regex.findall(tok.pattern, text) if tok.pattern else [text]):
        ids = list(piece.encode())
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: merge_id.get(p, float("inf")))
            if pair not in merge_id:
                break
            ids = merge(ids, pair, merge_id[pair])
        out += ids
    return out


@settings(max_examples=15)
@given(train=SMALL_TEXT, text=SMALL_TEXT, n=st.integers(1, 60))
def test_trained_encode_equals_merge_order_encode(train, text, n):
    tok = RegexTokenizer().train(train * 3, 256 + n)
    assert tok.encode_ordinary(text) == naive_encode(tok, text)
    assert tok.decode(tok.encode_ordinary(text)) == text


@pytest.mark.parametrize("pattern, tiktoken_pattern", [("gpt2", "r50k"), ("gpt4", "cl100k")])
def test_trained_vocab_encodes_like_tiktoken(pattern, tiktoken_pattern):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken_ext.openai_public import r50k_pat_str
    text = corpus(200_000)
    tok = RegexTokenizer(pattern).train(text[:100_000], 1000)
    ref = tiktoken.Encoding("ours", pat_str=r50k_pat_str if tiktoken_pattern == "r50k" else CL100K_PAT,
                            mergeable_ranks={b: i for i, b in tok.vocab.items()}, special_tokens={})
    probe = text[100_000:] + "\n\n  x.\n\n123456 don'T 🤖 \r\n\t end  "
    assert tok.encode_ordinary(probe) == ref.encode_ordinary(probe) == naive_encode(tok, probe)


def test_save_load_round_trip(tmp_path):
    text = corpus(100_000)
    tok = RegexTokenizer("gpt2").train(text, 600, special_tokens=["<|endoftext|>"])
    assert tok.n_vocab == 600 and tok.eot_token == 599 and len(tok.merges) == 343
    sample = text[5000:7000] + "<|endoftext|>"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample and ids[-1] == 599 and len(ids) < len(sample) / 2
    for name in ("t.json", "t.tiktoken"):
        tok.save(str(tmp_path / name))
        back = load_tokenizer(str(tmp_path / name))
        assert back.merges == tok.merges and back.pattern == tok.pattern and back.encode(sample) == ids
    saved = json.load(open(tmp_path / "t.json"))
    assert saved["merges"][0] == list(tok.merges[0]) and saved["special_tokens"] == {"<|endoftext|>": 599}
    basic = BasicTokenizer().train("hello hello world", 262)
    basic.save(str(tmp_path / "b.json"))
    assert load_tokenizer(str(tmp_path / "b.json")).encode("hello world") == basic.encode("hello world")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not an npgpt tokenizer"):
        load_tokenizer(str(tmp_path / "x.json"))
    foreign = load_tokenizer(os.path.join(os.path.dirname(npgpt.__file__), "assets", "gpt2.tiktoken"))
    with pytest.raises(ValueError, match="save it as .tiktoken"):
        foreign.save(str(tmp_path / "g.json"))


# ---- Hugging Face vocab.json + merges.txt ------------------------------------------------------------

def test_hf_format_from_gpt2_ranks(tmp_path):
    enc = get_encoding("gpt2")
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("A")] == "A" and table[ord(" ")] == "\u0120"
    vocab = {"".join(table[b] for b in tok): i for tok, i in enc.mergeable_ranks.items()}
    vocab["<|endoftext|>"] = 50256
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    hf = load_hf_bpe(str(tmp_path / "vocab.json"))
    text = corpus(30_000) + " 🤖 é"
    assert hf.encode_ordinary(text) == enc.encode_ordinary(text) and hf.eot_token == 50256


def test_hf_trained_model_encodes_like_hf(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = corpus(150_000)
    hf.train_from_iterator([text[:100_000]], trainer)
    vocab_json, merges_txt = hf.model.save(str(tmp_path))
    ours = load_hf_bpe(vocab_json, merges_txt)
    probe = text[100_000:] + " 🤖 don't  \n\n x"
    assert ours.encode_ordinary(probe) == hf.encode(probe).ids
    lines = open(merges_txt, encoding="utf-8").read().splitlines()
    with open(tmp_path / "bad.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(lines + ["Ġzz qq"]) + "\n")
    n_merges = sum(not ln.startswith("#version") for ln in lines)
    with pytest.raises(ValueError, match=f"merge {n_merges + 1} 'Ġzz qq' is not two tokens"):
        load_hf_bpe(vocab_json, str(tmp_path / "bad.txt"))
    with open(tmp_path / "swapped.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(lines[:1] + lines[2:3] + lines[1:2] + lines[3:]) + "\n")     # merges 1 and 2 swapped
    with pytest.raises(ValueError, match="do not follow the merge order"):
        load_hf_bpe(vocab_json, str(tmp_path / "swapped.txt"))


# ---- characters ---------------------------------------------------------------------------------------

def test_char_tokenizer():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"] and tok.n_vocab == 8 and tok.eot_token is None
    assert tok.encode("hold") == [3, 5, 4, 1] and tok.decode([3, 5, 4, 1]) == "hold"
    with pytest.raises(ValueError, match="'xyz'"):
        tok.encode("xyz")
    assert load_tokenizer_from_meta({"tokenizer": "char", "chars": tok.chars}).encode("he") == [3, 2]
    assert load_tokenizer_from_meta({"tokenizer": "gpt2"}) is get_encoding("gpt2")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer_from_meta({"tokenizer": "nonsense"})
