"""GPT-2 BPE encode throughput vs tiktoken, and BPE training vs Hugging Face tokenizers, side by side,
single thread, on the bundled 5 MB Shakespeare.

    python benchmarks/bench_tokenizer.py [--vocab-size 8192] [--repeat 3]

Encode: cold (fresh per-pre-token cache) and warm (cache filled by an earlier run), MB/s, with a
byte-exact check of the ids. Training: seconds to learn an 8,192-token vocabulary.
"""
import argparse
import os
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")      # tokenizers / tiktoken thread pools: one thread
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from npgpt.data import bundled_corpus_path  # noqa: E402
from npgpt.tokenizer import Encoding, GPT2_PATTERN, RegexTokenizer, get_encoding, load_tiktoken_bpe  # noqa: E402
from npgpt.tokenizer.loading import ASSETS  # noqa: E402


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    text = open(bundled_corpus_path()).read()
    mb = len(text.encode()) / 1e6
    ranks_path = os.path.join(ASSETS, "gpt2.tiktoken")

    def cold():
        return Encoding("gpt2", GPT2_PATTERN, load_tiktoken_bpe(ranks_path), {"<|endoftext|>": 50256})
    encs = [cold() for _ in range(args.repeat)]
    t_cold, ours = best(lambda: encs.pop().encode_ordinary(text), args.repeat)
    enc = get_encoding("gpt2")
    enc.encode_ordinary(text)
    t_warm, _ = best(lambda: enc.encode_ordinary(text), args.repeat)
    print(f"corpus {mb:.2f} MB, {len(ours):,} GPT-2 tokens")
    print(f"{'encode':24s} {'seconds':>8s} {'MB/s':>7s}")
    print(f"{'npgpt (cold cache)':24s} {t_cold:8.3f} {mb / t_cold:7.2f}")
    print(f"{'npgpt (warm cache)':24s} {t_warm:8.3f} {mb / t_warm:7.2f}")
    try:
        import tiktoken
        import tiktoken.load
        from tiktoken_ext.openai_public import r50k_pat_str
        ref = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=tiktoken.load.load_tiktoken_bpe(ranks_path),
                                special_tokens={"<|endoftext|>": 50256})
        t_tk, theirs = best(lambda: ref.encode_ordinary(text), args.repeat)
        print(f"{'tiktoken':24s} {t_tk:8.3f} {mb / t_tk:7.2f}")
        print(f"byte-exact: {ours == theirs}; ratio npgpt/tiktoken MB/s: cold {t_tk / t_cold:.2f}x, "
              f"warm {t_tk / t_warm:.2f}x (target >= 0.5x)")
    except ImportError:
        print("(tiktoken not installed: no encode comparison)")

    t_ours, tok = best(lambda: RegexTokenizer("gpt2").train(text, args.vocab_size), 1)
    print(f"\n{'train vocab ' + str(args.vocab_size):24s} {'seconds':>8s}")
    print(f"{'npgpt RegexTokenizer':24s} {t_ours:8.2f}")
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        t_hf, _ = best(lambda: hf.train_from_iterator([text], trainer), 1)
        print(f"{'HF tokenizers BpeTrainer':24s} {t_hf:8.2f}")
        print(f"ratio npgpt/HF time: {t_ours / t_hf:.2f}x (target <= 5x)")
    except ImportError:
        print("(tokenizers not installed: no training comparison)")


if __name__ == "__main__":
    main()
