"""Training-step time and peak memory: npgpt vs PyTorch eager, same architecture, same AdamW, float32,
same thread count, side by side in one run.

    python benchmarks/bench_train.py [--configs baby small] [--steps 20] [--threads 2] [--repeats 3]
                                     [--thread_split batch|ops]

Prints the median step time (forward + backward + clip + AdamW) of each and the ratio npgpt/torch.
npgpt steps as ``npgpt train`` does: on 2+ threads with ``--thread_split batch`` (the default) each
thread computes the forward and backward of its rows of the batch (``npgpt/replicas.py``); with
``ops`` every operation is split over the threads (BLAS and the elementwise pool), as PyTorch does.
Peak memory is the growth of the process's max RSS after importing the framework, in a fresh
subprocess per framework (model, optimizer state, activations, gradients).
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # a checkout, not installed

CONFIGS = {
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, vocab_size=65),
}


def run_one(framework, name, steps, threads, device="cpu", thread_split="batch"):
    """Time `steps` training steps in this process; returns a dict of results."""
    import resource
    import numpy as np
    c = dict(CONFIGS[name])
    B = c.pop("batch_size")
    rng = np.random.default_rng(0)
    x = rng.integers(0, c["vocab_size"], (B, c["block_size"]))
    y = rng.integers(0, c["vocab_size"], (B, c["block_size"]))
    if framework == "npgpt":
        import npgpt
        from npgpt.threads import set_threads
        set_threads(threads)            # BLAS and the elementwise pool, as torch.set_num_threads
    else:
        import torch
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after the framework's own import
    times = []
    if framework == "npgpt":
        if device == "cuda":
            npgpt.backend.use("cupy")
        model = npgpt.GPT(npgpt.GPTConfig(**c))
        # the optimizer npgpt train uses: flat AdamW, global-norm clipping inside the step
        opt = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), flat=True, max_grad_norm=1.0)
        replicas = None
        if thread_split == "batch" and threads > 1 and device == "cpu":
            from npgpt.replicas import ThreadReplicas
            replicas = ThreadReplicas(model, opt, min(threads, B))
        for _ in range(steps + 3):
            t = time.perf_counter()
            if replicas is not None:
                loss = replicas.train_step(lambda: (x, y))
            else:
                _, loss = model(x, y)
                opt.backward(loss)
                opt.step()
                opt.zero_grad()
            loss.item()
            times.append(time.perf_counter() - t)
    else:
        torch.set_num_threads(threads)
        sys.path.insert(0, os.path.dirname(__file__))
        from torch_gpt import TorchGPT
        dev = torch.device(device)
        torch.set_default_device(dev)
        model = TorchGPT(npgpt_config(c)).to(dev)
        opt = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95))
        xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
        for _ in range(steps + 3):
            t = time.perf_counter()
            _, loss = model(xt, yt)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - t)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"median_ms": 1000 * float(np.median(times[3:])), "peak_mb": (rss1 - rss0) / 1024}


def npgpt_config(c):
    from types import SimpleNamespace
    return SimpleNamespace(bias=True, dropout=0.0, **c)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per framework, alternating")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: npgpt on CuPy vs PyTorch on the GPU")
    ap.add_argument("--thread_split", choices=["batch", "ops"], default="batch",
                    help="npgpt: each thread its rows of the batch (npgpt train's default) or each op split")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], args.child[1], args.steps, args.threads, args.device,
                                 args.thread_split)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    try:
        import torch  # noqa: F401
        frameworks = ["npgpt", "torch"]
    except ImportError:
        frameworks = ["npgpt"]
        print("(torch not installed: npgpt only)")
    print(f"device {args.device}, {args.threads} CPU threads (npgpt thread_split={args.thread_split}), float32, "
          f"{args.steps} timed steps")
    print(f"{'config':8s} {'framework':9s} {'step ms (median)':>17s} {'peak MB':>9s}")
    for name in args.configs:
        res = {fw: [] for fw in frameworks}
        for _ in range(args.repeats):                 # alternating fresh processes
            for fw in frameworks:
                out = subprocess.run([sys.executable, __file__, "--child", fw, name, "--steps", str(args.steps),
                                      "--threads", str(args.threads), "--device", args.device,
                                      "--thread_split", args.thread_split], env=env,
                                     capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr)
                    raise SystemExit(1)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                res[fw].append(r)
                print(f"{name:8s} {fw:9s} {r['median_ms']:17.1f} {r['peak_mb']:9.0f}")
        if "torch" in res:
            med = {fw: sorted(r["median_ms"] for r in rs)[len(rs) // 2] for fw, rs in res.items()}
            mem = {fw: max(r["peak_mb"] for r in rs) for fw, rs in res.items()}
            print(f"{name:8s} ratio npgpt/torch: step {med['npgpt'] / med['torch']:.2f}x (median of {args.repeats}), "
                  f"memory {mem['npgpt'] / max(mem['torch'], 1):.2f}x")

if __name__ == "__main__":
    main()
