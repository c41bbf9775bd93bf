"""npgpt prepare vs a nanoGPT-style tiktoken prepare: MB/s, peak RSS, and projections to large corpora.

    python benchmarks/bench_prepare.py --mb 100 [--mb 1000] [--cores 2] [--dir /tmp/bench_prepare]
    python benchmarks/bench_prepare.py --crossover 1 2 4 8 16 [--repeat 3]

Makes a synthetic corpus of ~200 .txt documents (the bundled Shakespeare, cut and repeated; under
``--dir``, never in the repository), then times on the same files and cores
  1. ``npgpt prepare --tokenizer gpt2 --shard_tokens 100M`` (a subprocess: all cores, bounded memory),
  2. nanoGPT's ``data/openwebtext/prepare.py`` recipe: tiktoken's GPT-2 (built from the shipped
     ``npgpt/assets/gpt2.tiktoken``: ``tiktoken.get_encoding`` would download), ``encode_ordinary_batch``
     over all documents with ``num_threads=cores``, eot appended, uint16 written (a subprocess),
and prints MB/s of each, the ratio, their peak RSS (``ru_maxrss`` of the child and its workers: the
largest single process) and, from the measured bytes per token and MB/s, time and disk for all of
OpenWebText (~9.0B GPT-2 tokens) and The Pile (~825 GB of text) on ``--cores`` and on 64 cores,
assuming linear scaling with cores (the work is independent ~1 MB tasks).

``--crossover MB ...`` instead times, for each corpus size, ``npgpt prepare --tokenizer gpt2`` (train.bin /
val.bin) in one process (``--workers 1``) and on a pool of ``--cores`` workers forced on whatever the size
(``encode_pool.POOL_MIN_BYTES = 0``), alternating, median of ``--repeat`` runs each: where the pool starts
to pay is where ``encode_pool.POOL_MIN_BYTES`` belongs.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "npgpt", "data", "shakespeare.txt")
N_DOCS = 200

TIKTOKEN_PREPARE = r'''
import base64, glob, os, sys
import numpy as np, tiktoken
src, out, cores = sys.argv[1], sys.argv[2], int(sys.argv[3])
ranks = {}
for line in open(os.path.join(sys.argv[4], "npgpt", "assets", "gpt2.tiktoken"), "rb"):
    if line.strip():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
enc = tiktoken.Encoding(name="gpt2", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                        mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
files = sorted(glob.glob(os.path.join(src, "*.txt")))
with open(out, "wb") as f:
    for i in range(0, len(files), 4 * cores):          # nanoGPT maps documents in batches over processes
        docs = [open(p, encoding="utf-8").read() for p in files[i:i + 4 * cores]]
        for ids in enc.encode_ordinary_batch(docs, num_threads=cores):
            ids.append(enc.eot_token)
            np.array(ids, dtype=np.uint16).tofile(f)
'''


def make_corpus(directory, megabytes):
    """~``megabytes`` MB of text in N_DOCS .txt files (Shakespeare repeated, each file starting at another
    line so documents differ); reused when already there."""
    os.makedirs(directory, exist_ok=True)
    text = open(SHAKESPEARE, encoding="utf-8").read()
    lines = text.splitlines(keepends=True)
    per_doc = int(megabytes * 1_000_000) // N_DOCS
    for d in range(N_DOCS):
        path = os.path.join(directory, f"doc_{d:04d}.txt")
        if os.path.exists(path) and os.path.getsize(path) >= per_doc:
            continue
        start = (d * 7919) % len(lines)
        rotated = "".join(lines[start:] + lines[:start])
        with open(path, "w", encoding="utf-8") as f:
            written = 0
            while written < per_doc:
                piece = rotated[:per_doc - written]
                f.write(piece)
                written += len(piece)
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def run_measured(cmd):
    """(seconds, peak RSS in MB of the largest process among the command and its workers): the command
    runs under a small Python wrapper whose RUSAGE_CHILDREN covers exactly that process tree."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t0 = time.perf_counter()
    peak_kb = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True,
                             cwd=ROOT).stdout.split()[-1]
    return time.perf_counter() - t0, int(peak_kb) / 1024


PREPARE_WITH_POOL_FROM = ("import sys; from npgpt import encode_pool; encode_pool.POOL_MIN_BYTES = int(sys.argv[1]); "
                          "from npgpt.cli import main; main(sys.argv[2:])")


def crossover(sizes, cores, directory, repeat):
    """Seconds of prepare in one process and on a forced pool of ``cores`` workers, per size in MB."""
    print(f"{'MB':>6} {'1 process s':>12} {f'pool of {cores} s':>12} {'speed-up':>9}   (medians of {repeat}, "
          f"load {os.getloadavg()[0]:.1f})")
    for mb in sizes:
        corpus = os.path.join(directory, f"corpus_{mb:g}mb")
        nbytes = make_corpus(corpus, mb)
        times = {1: [], cores: []}
        for _ in range(repeat):
            for workers in times:
                out = os.path.join(directory, f"out_crossover_{workers}")
                cmd = [sys.executable, "-c", PREPARE_WITH_POOL_FROM, "0", "prepare", "--input", corpus, "--out_dir",
                       out, "--tokenizer", "gpt2", "--workers", str(workers), "--no_progress"]
                times[workers].append(run_measured(cmd)[0])
        one, pool = sorted(times[1])[repeat // 2], sorted(times[cores])[repeat // 2]
        print(f"{nbytes / 1e6:6.2f} {one:12.2f} {pool:12.2f} {one / pool:8.2f}x", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100, help="corpus size in MB (default 100)")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--dir", default="/tmp/bench_prepare")
    ap.add_argument("--skip_tiktoken", action="store_true")
    ap.add_argument("--crossover", type=float, nargs="+", metavar="MB", help="one process vs the pool at these sizes")
    ap.add_argument("--repeat", type=int, default=3, help="runs per size and setting for --crossover")
    args = ap.parse_args()
    if args.crossover:
        return crossover(args.crossover, args.cores, args.dir, args.repeat)
    corpus = os.path.join(args.dir, f"corpus_{args.mb}mb")
    nbytes = make_corpus(corpus, args.mb)
    out = os.path.join(args.dir, f"out_{args.mb}mb")
    if os.path.exists(os.path.join(out, "meta.json")):
        os.remove(os.path.join(out, "meta.json"))        # a fresh run, not a resume
    seconds, rss = run_measured([sys.executable, "-m", "npgpt.cli", "prepare", "--input", corpus, "--out_dir", out,
                                 "--tokenizer", "gpt2", "--shard_tokens", "100000000", "--workers", str(args.cores),
                                 "--no_progress"])
    meta = json.load(open(os.path.join(out, "meta.json")))
    tokens = meta["train_tokens"] + meta["val_tokens"]
    result = {"corpus_mb": nbytes / 1e6, "cores": args.cores, "tokens": tokens, "bytes_per_token": nbytes / tokens,
              "npgpt_s": seconds, "npgpt_mb_s": nbytes / 1e6 / seconds, "npgpt_peak_rss_mb": rss}
    if not args.skip_tiktoken:
        seconds, rss = run_measured([sys.executable, "-c", TIKTOKEN_PREPARE, corpus,
                                     os.path.join(args.dir, f"tiktoken_{args.mb}mb.bin"), str(args.cores), ROOT])
        result.update({"tiktoken_s": seconds, "tiktoken_mb_s": nbytes / 1e6 / seconds, "tiktoken_peak_rss_mb": rss,
                       "npgpt_over_tiktoken": result["npgpt_mb_s"] / (nbytes / 1e6 / seconds)})
    # projections, assuming linear scaling with cores (independent ~1 MB tasks): OpenWebText from its
    # known token count at the measured tokens/s, The Pile from its known size at the measured MB/s;
    # disk = 2 bytes a token (uint16); token counts of The Pile use the measured bytes/token
    tokens_per_core = tokens / result["npgpt_s"] / args.cores
    mb_per_core = result["npgpt_mb_s"] / args.cores
    pile_tokens = 825e9 / result["bytes_per_token"]
    for cores in (args.cores, 64):
        result[f"OpenWebText (9.0B tokens) on {cores} cores"] = (
            f"{9.0e9 / (tokens_per_core * cores) / 3600:.2f} h, 18 GB of uint16 shards")
        result[f"The Pile (825 GB) on {cores} cores"] = (
            f"{825e3 / (mb_per_core * cores) / 3600:.2f} h, {pile_tokens / 1e9:.0f}B tokens, "
            f"{2 * pile_tokens / 1e9:.0f} GB of uint16 shards")
    for k, v in result.items():
        print(f"{k:>40}: {v:.3f}" if isinstance(v, float) else f"{k:>40}: {v}")


if __name__ == "__main__":
    main()
