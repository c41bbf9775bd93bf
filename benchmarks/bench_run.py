"""A whole training run: ``npgpt train``'s loop vs a nanoGPT-shaped PyTorch eager loop, same data, same
knobs, same thread count, side by side in one run, with a per-phase breakdown of each.

    python benchmarks/bench_run.py [--iters 600] [--threads 2] [--repeats 1] [--eval_interval 200]
                                   [--thread_split batch|ops]

Both loops: the prepared character-level Shakespeare (``npgpt prepare``'s default, in a temporary
directory), batches drawn from the memory-mapped split every step, warmup + cosine learning rate,
AdamW with decay on matrices only, global-norm clipping at 1.0, the loss read on the host every
``log_interval`` (10) steps, an evaluation of ``eval_iters`` batches per split every ``eval_interval``.
Model: 4 layers, 4 heads, 128 wide, context 64, batch 12, no biases (nanoGPT's README CPU knobs).

Each framework runs in a fresh subprocess with ``OMP/OPENBLAS/MKL_NUM_THREADS`` set; the reported wall
time is the process's own (imports, model, data, loop), as a user sees it. The phase breakdown wraps
each phase in a ``perf_counter`` pair (NumPy and PyTorch on the CPU are synchronous, so the pairs
measure the work): batch, forward, backward, clip, optimizer (the rest of the step and zeroing the
gradients), eval, logging (loss read, log record and progress bar), other (the loop's own overhead).
The npgpt run is ``npgpt.train.train`` itself, with the phases timed by wrapping its pieces. With
``thread_split=batch`` (its default: each thread the forward and backward of its rows, ``npgpt/replicas.py``)
the two passes run inside the threads and are timed together as "forward+backward"; the gradients' sum
over the threads counts as optimizer.
"""
import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                # run from a checkout without installing

PHASES = ("batch", "forward", "backward", "forward+backward", "clip", "optimizer", "eval", "logging", "other")
KNOBS = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, bias=False, dropout=0.0,
             learning_rate=1e-3, warmup_iters=100, min_lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1,
             grad_clip=1.0, eval_iters=20, log_interval=10)


class Phases:
    """Seconds spent per phase; ``with phases("forward"):`` adds to one. A phase inside another counts
    as its own and is taken out of the outer one (clip inside the optimizer's step), except inside
    "eval", which keeps its forward passes."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.stack = []

    @contextlib.contextmanager
    def __call__(self, name):
        if self.stack and self.stack[-1] == "eval":
            yield
            return
        self.stack.append(name)
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.stack.pop()
            self.seconds[name] += dt
            if self.stack and self.stack[-1] != "loop":
                self.seconds[self.stack[-1]] -= dt

    def wrap(self, owner, attr, name):
        """Time every call of ``owner.attr`` as phase ``name``."""
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            with self(name):
                return original(*args, **kwargs)
        setattr(owner, attr, timed)


def run_npgpt(data_dir, iters, eval_interval, phases, threads, thread_split):
    """``npgpt.train.train`` with its pieces wrapped in phase timers; returns the final val loss."""
    import npgpt.train as train_module
    from npgpt import train_helpers
    from npgpt.model import GPT
    from npgpt.optim import mixed_precision
    from npgpt.optim.mixed_precision import FlatAdamW
    from npgpt.replicas import ThreadReplicas
    out = tempfile.mkdtemp(prefix="bench-run-npgpt-")
    phases.wrap(train_helpers, "get_batch", "batch")
    if thread_split == "batch":          # both passes inside the threads: one phase, timed from the main thread
        phases.wrap(ThreadReplicas, "forward_backward", "forward+backward")
        phases.wrap(ThreadReplicas, "reduce", "optimizer")
    else:
        phases.wrap(GPT, "forward", "forward")
        phases.wrap(FlatAdamW, "backward", "backward")
    phases.wrap(mixed_precision, "global_grad_norm", "clip")
    phases.wrap(FlatAdamW, "step", "optimizer")           # minus clip below (clip runs inside the step)
    phases.wrap(FlatAdamW, "zero_grad", "optimizer")
    phases.wrap(train_module, "estimate_loss", "eval")
    phases.wrap(train_module.RunLog, "step", "logging")
    cfg = train_module.TrainConfig(data=data_dir, out_dir=out, max_iters=iters, lr_decay_iters=iters,
                                   eval_interval=eval_interval, progress=True, threads=threads,
                                   thread_split=thread_split, **KNOBS)
    with phases("loop"):
        result = train_module.train(cfg, log=lambda *a: None)
    return result["val_loss"]


def run_torch(data_dir, iters, eval_interval, phases, threads):
    """A nanoGPT-shaped PyTorch eager loop (nanoGPT's train.py, CPU, compile off); final val loss."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_gpt import TorchGPT
    from types import SimpleNamespace
    torch.set_num_threads(threads)
    torch.manual_seed(1337)
    k = KNOBS
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    conf = SimpleNamespace(vocab_size=meta["vocab_size"], block_size=k["block_size"], n_layer=k["n_layer"],
                           n_head=k["n_head"], n_embd=k["n_embd"], bias=k["bias"], dropout=k["dropout"])
    dtype = np.dtype(meta.get("dtype", "uint16"))

    def get_batch(split):            # nanoGPT: a fresh memmap per batch, then torch.stack of slices
        data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=dtype, mode="r")
        ix = torch.randint(len(data) - k["block_size"], (k["batch_size"],))
        x = torch.stack([torch.from_numpy(data[i:i + k["block_size"]].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + k["block_size"]].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(it):                  # nanoGPT's warmup + cosine
        if it < k["warmup_iters"]:
            return k["learning_rate"] * (it + 1) / (k["warmup_iters"] + 1)
        if it > iters:
            return k["min_lr"]
        ratio = (it - k["warmup_iters"]) / (iters - k["warmup_iters"])
        return k["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (k["learning_rate"] - k["min_lr"])

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {}
        for split in ("train", "val"):
            losses = torch.zeros(k["eval_iters"])
            for i in range(k["eval_iters"]):
                losses[i] = model(*get_batch(split))[1].item()
            out[split] = losses.mean().item()
        model.train()
        return out

    with phases("loop"):
        model = TorchGPT(conf)
        opt = model.configure_optimizer(k["learning_rate"], k["weight_decay"], (k["beta1"], k["beta2"]))
        bar = tqdm(total=iters, unit="it", dynamic_ncols=True)
        losses, it = {}, 0
        while True:
            for g in opt.param_groups:
                g["lr"] = get_lr(it)
            if it % eval_interval == 0 or it == iters:
                with phases("eval"):
                    losses = estimate_loss()
            if it >= iters:
                break
            with phases("batch"):
                x, y = get_batch("train")
            with phases("forward"):
                _, loss = model(x, y)
            with phases("backward"):
                loss.backward()
            with phases("clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), k["grad_clip"])
            with phases("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
            it += 1
            with phases("logging"):
                bar.update(1)
                if it % k["log_interval"] == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
    return losses["val"]


def child(framework, data_dir, iters, eval_interval, threads, thread_split):
    t0 = time.perf_counter()
    phases = Phases()
    if framework == "npgpt":
        val = run_npgpt(data_dir, iters, eval_interval, phases, threads, thread_split)
    else:
        val = run_torch(data_dir, iters, eval_interval, phases, threads)
    s = phases.seconds
    s["other"] = s.pop("loop") - sum(s[p] for p in PHASES if p != "other")
    s["forward+backward"] += s["forward"] + s["backward"]          # the sum, for either way of timing
    return {"val": val, "phases": {p: s[p] for p in PHASES}, "in_process": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--eval_interval", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each framework, alternating; medians")
    ap.add_argument("--thread_split", choices=["batch", "ops"], default="batch",
                    help="npgpt train's thread_split: batch (its default) or ops")
    ap.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.iters, args.eval_interval, args.threads,
                               args.thread_split)))
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("bench_run.py compares against PyTorch: pip install torch")
    from npgpt.data import ensure_prepared
    data_dir = os.path.join(tempfile.mkdtemp(prefix="bench-run-data-"), "shakespeare_char")
    ensure_prepared(data_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"{args.iters} iterations, eval every {args.eval_interval} ({KNOBS['eval_iters']} batches a split), "
          f"{args.threads} threads (npgpt thread_split={args.thread_split}), "
          f"load average before: {os.getloadavg()[0]:.2f}")
    runs = defaultdict(list)
    for _ in range(args.repeats):
        for fw in ("npgpt", "torch"):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", fw, data_dir,
                                  "--iters", str(args.iters), "--eval_interval", str(args.eval_interval),
                                  "--threads", str(args.threads), "--thread_split", args.thread_split],
                                 env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if out.returncode:
                print(out.stderr)
                raise SystemExit(1)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["wall"] = wall
            runs[fw].append(res)
            print(f"  {fw:6s} process wall {wall:6.1f} s, val {res['val']:.4f}")

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])
    med = {fw: {"wall": median([r["wall"] for r in rs]), "val": median([r["val"] for r in rs]),
                **{p: median([r["phases"][p] for r in rs]) for p in PHASES}} for fw, rs in runs.items()}
    print(f"\n{'phase (ms/iter)':16s} {'npgpt':>8s} {'torch':>8s} {'ratio':>6s}")
    for p in PHASES:
        a, b = (1e3 * med[fw][p] / args.iters for fw in ("npgpt", "torch"))
        print(f"{p:16s} {a:8.2f} {b:8.2f} {a / b if b > 1e-9 else float('nan'):6.2f}")
    a, b = med["npgpt"]["wall"], med["torch"]["wall"]
    print(f"{'process wall s':16s} {a:8.1f} {b:8.1f} {a / b:6.2f}")
    print(f"val loss: npgpt {med['npgpt']['val']:.4f}, torch {med['torch']['val']:.4f}")
    print(f"whole run npgpt/torch: {a / b:.2f}x (load average after: {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
