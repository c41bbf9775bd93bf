"""nanoGPT's README CPU run against ``npgpt train`` with the same knobs, on the same prepared data.

    python benchmarks/bench_nanogpt.py --nanogpt PATH/TO/nanoGPT [--threads 2] [--repeats 1]

nanoGPT's README trains a small character-level Shakespeare model on a CPU with::

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

(the config adds learning_rate 1e-3, min_lr 1e-4, beta2 0.99, warmup_iters 100, eval_interval 250;
train.py's defaults bias=False, weight_decay 0.1, grad_clip 1.0). This script runs exactly that
command in a scratch directory holding a copy of nanoGPT's ``train.py``, ``model.py``,
``configurator.py`` and ``config/``, on npgpt's prepared character-level Shakespeare (the bundled
5 MB corpus, ``train.bin``/``val.bin`` are uint16 as nanoGPT reads them, plus a ``meta.pkl`` with the
vocabulary size), then ``npgpt train`` with the same knobs on the same files. Each is a fresh process
with ``OMP/OPENBLAS/MKL_NUM_THREADS`` (and npgpt's ``--threads``) set; both print a line per step.
Reported: process wall time, iteration time from the logs, and the validation loss at step 2000
(each estimated on 20 random batches, so about +-0.01 of noise). Then both final models are scored on
the same ``--eval_batches`` (500) fixed validation batches, nanoGPT's with its own ``model.py`` and
PyTorch (it is run with ``--always_save_checkpoint=True`` so that its ``ckpt.pt`` holds step 2000),
npgpt's with ``npgpt.loading.load_model``: a comparison of the two models without the sampling noise.
"""
import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KNOBS = ["--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
         "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
CONFIG = ["--learning_rate=1e-3", "--min_lr=1e-4", "--beta2=0.99", "--warmup_iters=100", "--eval_interval=250",
          "--bias=false", "--weight_decay=0.1", "--grad_clip=1.0"]     # what config/ and train.py add
VAL = re.compile(r"step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)")
ITER_MS = re.compile(r"iter (\d+): loss [0-9.]+, time ([0-9.]+)ms")


def nanogpt_workdir(nanogpt, data_dir):
    """A scratch directory laid out as nanoGPT expects (its code, data/shakespeare_char/)."""
    work = tempfile.mkdtemp(prefix="bench-nanogpt-")
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(os.path.join(nanogpt, name), work)
    shutil.copytree(os.path.join(nanogpt, "config"), os.path.join(work, "config"))
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    if meta.get("dtype", "uint16") != "uint16":
        raise SystemExit(f"nanoGPT reads uint16 token files; {data_dir} holds {meta['dtype']}")
    target = os.path.join(work, "data", "shakespeare_char")
    os.makedirs(target)
    for split in ("train", "val"):
        os.symlink(os.path.abspath(os.path.join(data_dir, f"{split}.bin")), os.path.join(target, f"{split}.bin"))
    with open(os.path.join(target, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": meta["vocab_size"]}, f)
    return work


def run(cmd, cwd, env):
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        print(out.stdout[-3000:], out.stderr[-3000:])
        raise SystemExit(f"{cmd[:3]} failed")
    text = out.stdout + out.stderr
    evals = {int(m.group(1)): float(m.group(3)) for m in VAL.finditer(text)}
    iter_ms = [float(m.group(2)) for m in ITER_MS.finditer(text) if int(m.group(1)) > 10]
    iter_ms.sort()
    return {"wall": wall, "val": evals[max(evals)], "last_step": max(evals),
            "iter_ms": iter_ms[len(iter_ms) // 2] if iter_ms else float("nan")}


def fixed_batches(data_dir, n, B=12, T=64, seed=0):
    """n (x, y) validation batches of B windows of T tokens, the same for both frameworks."""
    import numpy as np
    data = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=np.uint16).astype(np.int64)
    starts = np.random.default_rng(seed).integers(0, len(data) - T - 1, (n, B))
    for row in starts:
        idx = row[:, None] + np.arange(T)
        yield data[idx], data[idx + 1]


def score_npgpt(out_dir, batches):
    from npgpt.engine import no_grad
    from npgpt.loading import load_model
    model, _ = load_model(out_dir)
    with no_grad():
        losses = [float(model(x, y)[1].item()) for x, y in batches]
    return sum(losses) / len(losses)


def score_nanogpt(work, out_dir, batches):
    import torch
    sys.path.insert(0, work)
    from model import GPT, GPTConfig                       # nanoGPT's own model.py
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    with torch.no_grad():
        losses = [float(model(torch.from_numpy(x), torch.from_numpy(y))[1]) for x, y in batches]
    return sum(losses) / len(losses), ckpt["iter_num"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", required=True, help="a nanoGPT checkout (train.py, model.py, configurator.py, config/)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each, alternating")
    ap.add_argument("--only", choices=["npgpt", "nanogpt"], help="run one side only")
    ap.add_argument("--eval_batches", type=int, default=500,
                    help="fixed validation batches both final models are scored on (0: skip)")
    args = ap.parse_args()
    from npgpt.data import ensure_prepared
    data_dir = os.path.join(tempfile.mkdtemp(prefix="bench-nanogpt-data-"), "shakespeare_char")
    ensure_prepared(data_dir)
    work = nanogpt_workdir(args.nanogpt, data_dir)
    n = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n, NPGPT_THREADS=n,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    commands = {
        "nanogpt": [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                    *KNOBS, f"--out_dir={os.path.join(work, 'out-nanogpt')}", "--always_save_checkpoint=True"],
        "npgpt": [sys.executable, "-m", "npgpt.cli", "train", f"--data={data_dir}", "--progress=false",
                  f"--out_dir={os.path.join(work, 'out-npgpt')}", "--overwrite", *KNOBS, *CONFIG]}
    print(f"{args.threads} threads, load average before: {os.getloadavg()[0]:.2f}")
    results = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            if args.only and name != args.only:
                continue
            r = run(cmd, work, env)
            results[name].append(r)
            print(f"  {name:8s} wall {r['wall']:6.1f} s, median iteration {r['iter_ms']:6.1f} ms, "
                  f"val loss at step {r['last_step']}: {r['val']:.4f}")
    if all(results.values()):
        a, b = (min(r["wall"] for r in results[k]) for k in ("npgpt", "nanogpt"))
        print(f"best wall npgpt/nanoGPT: {a / b:.2f}x (load average after: {os.getloadavg()[0]:.2f})")
    if all(results.values()) and args.eval_batches:
        batches = list(fixed_batches(data_dir, args.eval_batches))
        ours = score_npgpt(os.path.join(work, "out-npgpt"), batches)
        theirs, step = score_nanogpt(work, os.path.join(work, "out-nanogpt"), batches)
        print(f"val loss of the final models on the same {args.eval_batches} fixed batches: npgpt {ours:.4f}, "
              f"nanoGPT {theirs:.4f} (its checkpoint of step {step})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
