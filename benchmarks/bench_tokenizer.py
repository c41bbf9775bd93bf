"""GPT-2 BPE encode throughput vs tiktoken, and BPE training vs Hugging Face ``tokenizers``, side by side in
one run, single thread, on the bundled 5 MB Shakespeare.

    PYTHONPATH=. python benchmarks/bench_tokenizer.py [--vocab-size 8192] [--repeat 3] [--write-results]

Encode: ``encode_ordinary`` of the whole corpus, best of ``--repeat``. "Cold" starts each run from a
fresh Encoding, an empty per-pre-token cache (the fair comparison: tiktoken keeps no cache), and
alternates with tiktoken so that each pair of runs shares the machine's load (the cold ratio is the
median over the pairs); "warm" reuses the cache of an earlier run. The ids are checked byte-exact against tiktoken's. Training: seconds to learn a
``--vocab-size`` vocabulary (256 bytes + merges) from the raw text, ours with GPT-2's pre-tokenizer,
HF's BpeTrainer with its ByteLevel pre-tokenizer (the same GPT-2 regex), both single-threaded.
``--write-results`` replaces the ``## Tokenizer`` section of benchmarks/RESULTS.md.
"""
import argparse
import os
import platform
import subprocess
import sys
import time

os.environ["RAYON_NUM_THREADS"] = "1"               # tokenizers / tiktoken thread pools: one thread
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # a checkout, not installed

from npgpt.data import bundled_corpus_path  # noqa: E402
from npgpt.tokenizer import (Encoding, GPT2_PATTERN, RegexTokenizer, bytes_to_unicode,  # noqa: E402
                             load_tiktoken_bpe)
from npgpt.tokenizer.loading import ASSETS  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def best(fn, repeat):
    """(fastest wall time of ``repeat`` calls, the last result)."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def bench_encode(text, repeat):
    """Rows (name, seconds) and a summary line for encoding ``text``. The cold npgpt run and tiktoken
    alternate, so each pair shares the machine's load; the summary gives the median of their ratios."""
    ranks = load_tiktoken_bpe(os.path.join(ASSETS, "gpt2.tiktoken"))
    warm = Encoding("gpt2", GPT2_PATTERN, ranks, {"<|endoftext|>": 50256})
    warm.encode_ordinary(text)
    t_warm, ours_warm = best(lambda: warm.encode_ordinary(text), repeat)
    try:
        import tiktoken
        import tiktoken.load
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        t_cold, ours = best(lambda: Encoding("gpt2", GPT2_PATTERN, ranks, {"<|endoftext|>": 50256})
                            .encode_ordinary(text), repeat)
        rows = [("npgpt, cold cache", t_cold), ("npgpt, warm cache", t_warm)]
        return rows, f"{len(ours):,} tokens (tiktoken not installed: no comparison)", None
    ref = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, special_tokens={"<|endoftext|>": 50256},
                            mergeable_ranks=tiktoken.load.load_tiktoken_bpe(os.path.join(ASSETS, "gpt2.tiktoken")))
    cold, theirs_times, ratios = [], [], []
    for _ in range(repeat):
        fresh = Encoding("gpt2", GPT2_PATTERN, ranks, {"<|endoftext|>": 50256})   # (built outside the timing,
        t_ours, ours = best(lambda: fresh.encode_ordinary(text), 1)                # as tiktoken's Encoding)
        t_theirs, theirs = best(lambda: ref.encode_ordinary(text), 1)
        cold.append(t_ours)
        theirs_times.append(t_theirs)
        ratios.append(t_theirs / t_ours)
    rows = [("npgpt, cold cache", min(cold)), ("npgpt, warm cache", t_warm),
            (f"tiktoken {tiktoken.__version__}", min(theirs_times))]
    exact = ours == theirs and ours_warm == theirs
    median = sorted(ratios)[len(ratios) // 2]
    summary = (f"{len(ours):,} tokens, byte-exact with tiktoken: {exact}; npgpt/tiktoken throughput: cold "
               f"{median:.2f}x (median of {repeat} alternating pairs: {', '.join(f'{r:.2f}' for r in ratios)}), "
               f"warm {min(theirs_times) / t_warm:.2f}x (target: cold >= 0.8x)")
    return rows, summary, median


def bench_train(text, vocab_size, repeat):
    """Rows (name, seconds) and a summary line for learning a ``vocab_size`` vocabulary."""
    t_ours, tok = best(lambda: RegexTokenizer("gpt2").train(text, vocab_size), repeat)
    rows = [("npgpt RegexTokenizer", t_ours)]
    try:
        import tokenizers
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        return rows, "(tokenizers not installed: no comparison)", None

    def hf_train():
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator([text], trainer)
        return hf
    t_hf, hf = best(hf_train, repeat)
    rows.append((f"HF tokenizers {tokenizers.__version__} BpeTrainer", t_hf))
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    hf_tokens = {bytes(inverse[c] for c in s) for s in hf.get_vocab()}
    shared = len(hf_tokens & set(tok.vocab.values()))
    summary = (f"vocabularies: {len(tok.vocab)} (ours) and {len(hf_tokens)} (HF) tokens, {shared} in common; "
               f"npgpt/HF time: {t_ours / t_hf:.2f}x (target <= 5x)")
    return rows, summary, t_ours / t_hf


def table(title, rows, mb=None):
    lines = [f"| {title} | seconds |" + (" MB/s |" if mb else ""), "|---|---:|" + ("---:|" if mb else "")]
    for name, t in rows:
        lines.append(f"| {name} | {t:.3f} |" + (f" {mb / t:.2f} |" if mb else ""))
    return lines


def write_results(lines):
    """Replace (or append) the ``## Tokenizer`` section of RESULTS.md, leaving other sections alone."""
    old = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    parts, out, skipping = old.splitlines(), [], False
    for line in parts:
        if line.startswith("## "):
            skipping = line.strip() == "## Tokenizer"
            if skipping:
                continue
        if not skipping:
            out.append(line)
    text = "\n".join(out).rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    with open(RESULTS, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3, help="best of N for encoding (training: best of 2)")
    ap.add_argument("--write-results", action="store_true", help="write the ## Tokenizer section of RESULTS.md")
    args = ap.parse_args()
    text = open(bundled_corpus_path(), encoding="utf-8").read()
    mb = len(text.encode("utf-8")) / 1e6
    enc_rows, enc_summary, _ = bench_encode(text, args.repeat)
    train_rows, train_summary, _ = bench_train(text, args.vocab_size, min(args.repeat, 2))
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    lines = ["## Tokenizer", "",
             f"`PYTHONPATH=. python benchmarks/bench_tokenizer.py --write-results` on {date}; machine: "
             f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), Python "
             f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f} (other jobs shared the cores), "
             f"single thread, corpus `npgpt/data/shakespeare.txt` ({mb:.2f} MB). "
             f"Best of {args.repeat} (training: best of {min(args.repeat, 2)}).", ""]
    lines += table("GPT-2 encode (`encode_ordinary`, whole corpus)", enc_rows, mb) + ["", enc_summary, ""]
    lines += table(f"train a {args.vocab_size:,}-token vocabulary", train_rows) + ["", train_summary]
    print("\n".join(lines))
    if args.write_results:
        write_results(lines)
        print(f"\nwrote the ## Tokenizer section of {RESULTS}")


if __name__ == "__main__":
    main()
