"""Where a GPU training step's time goes, kernel by kernel: npgpt (CuPy) and PyTorch eager side by side.

    PYTHONPATH=. python benchmarks/gpu_profile.py [--configs gpt2-124m small] [--variants npgpt-flash torch-sdpa]
                                                  [--steps 3] [--top 25] [--json PATH]

Each (config, variant) is built and stepped exactly as ``bench_gpu.py`` measures it (fp16, its model,
batch and optimizer; its ``time_steps`` is swapped for one that records the timed steps). The
recorder is PyTorch's profiler (CUPTI): it sees every kernel launched in the process, CuPy's
included. Printed per run: step wall time, summed kernel time per step (their ratio says whether
the GPU or the host is the bottleneck), time per category (GEMM, attention, npgpt's own kernels,
CuPy elementwise/reduction kernels, PyTorch's kernels, copies) and the top kernels by total time.
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench_gpu  # noqa: E402

RECORDS = {}


def category(name):
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if any(s in n for s in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "sm80_")):
        return "gemm"
    if n.startswith("npgpt_") or n in ("sum_of_squares", "add_block_sums"):
        return "npgpt kernels"
    if n.startswith("cupy_"):
        return "cupy elementwise/reduce"
    if "memcpy" in n or "memset" in n:
        return "copy/set"
    return "other (torch kernels)"


def profiled_time_steps(step, sync, memory, warmup, steps):
    """``bench_gpu.time_steps`` with the timed steps recorded by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t) / steps
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
            k = kernels[e["name"][:120]]
            k[0] += 1
            k[1] += e["dur"] / 1e3 / steps          # ms per step
    RECORDS["last"] = {"wall_ms": wall * 1e3, "kernels": dict(kernels)}
    return [wall] * steps, wall, memory()


def report(label, rec, top):
    kernels = rec["kernels"]
    busy = sum(ms for _, ms in kernels.values())
    print(f"\n## {label}: step {rec['wall_ms']:.1f} ms wall, kernels {busy:.1f} ms/step "
          f"({100 * busy / rec['wall_ms']:.0f}% busy), {sum(c for c, _ in kernels.values())} launches")
    cats = defaultdict(float)
    for name, (_, ms) in kernels.items():
        cats[category(name)] += ms
    for c, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {c:28s} {ms:8.2f} ms")
    print(f"  top {top} kernels (ms/step, launches over the recorded steps):")
    for name, (n, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"    {ms:8.3f}  {n:5d}  {name}")
    return {"wall_ms": rec["wall_ms"], "busy_ms": busy, "categories": dict(cats),
            "top": sorted(((name, n, ms) for name, (n, ms) in kernels.items()), key=lambda r: -r[2])[:80]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["gpt2-124m", "small"], choices=["gpt2-124m", "small"])
    ap.add_argument("--variants", nargs="+", default=["npgpt-flash", "torch-sdpa"],
                    choices=[f for f in bench_gpu.FRAMEWORKS if f != "torch-compile"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json")
    args = ap.parse_args()
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("gpu_profile.py records kernels with PyTorch's profiler: install a CUDA build of torch")
    bench_gpu.time_steps = profiled_time_steps
    run_args = SimpleNamespace(batch=None, accum=1, warmup=2, steps=args.steps, torch_adamw="fused",
                               attention=None)
    out = {}
    for variant in args.variants:
        try:
            measure = (bench_gpu.setup_torch if variant.startswith("torch") else bench_gpu.setup_npgpt)("cuda", "fp16")
        except Exception as e:                         # no GPU, no CuPy, a CPU build of torch: one line
            raise SystemExit(f"gpu_profile.py: {variant} cannot run here: {type(e).__name__}: {e}")
        for name in args.configs:
            try:
                measure(name, variant, run_args)
            except Exception as e:                     # one failed run: say so, go on
                print(f"\n## {name} {variant}: failed: {type(e).__name__}: {e}"[:400])
                continue
            out[f"{name} {variant}"] = report(f"{name} {variant}", RECORDS.pop("last"), args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
