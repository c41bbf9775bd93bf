"""Data parallelism on the CPU: 2 MPI ranks x 1 thread against 1 process x 2 threads, the same run.

The small config (``npgpt train``'s default: 4 layers, 128 wide, context 64, micro-batch 12) on the bundled
Shakespeare, float32. "The same run": the single process accumulates 2 micro-batches per step, the two ranks
one each, so both take the same optimizer steps on the same global batch of 24 sequences (see
npgpt/distributed/data_parallel.py). Reported: tokens/s (global, the median of the log lines after the
first), the time each rank spends waiting for collectives per step (``Communicator.seconds``), ZeRO-1 on
and off, and the collectives alone on a buffer of the model's size.

    python benchmarks/bench_distributed.py [--iters 60] [--json out.json]
Needs mpi4py and mpiexec (pip install -e ".[mpi]").
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORKER = r"""
import json, sys, time
import numpy as np
import npgpt.train as T
from npgpt import distributed
captured = []
connect = T.distributed.connect
T.distributed.connect = lambda *a: captured.append(connect(*a)) or captured[-1]
iters, out = int(sys.argv[1]), sys.argv[2]
cfg = T.TrainConfig(**json.loads(sys.argv[3]))
result = T.train(cfg, log=lambda *a: None)
comm = captured[0]
row = {"ranks": 1 if comm is None else comm.size, "comm_seconds_per_step": None}
if comm is not None:
    row["comm_seconds_per_step"] = comm.allreduce_min(-comm.seconds) * -1 / iters   # the slowest rank's
    ckpt = np.load(cfg.out_dir + "/ckpt.npz")
    n = sum(ckpt[k].size for k in ckpt.files if k.startswith("model/"))                # the model's size
    buf = np.ones(n, np.float32)
    even = buf[:n - n % comm.size]
    shard = np.empty(even.size // comm.size, np.float32)
    for name, op in (("allreduce", lambda: comm.allreduce(buf)),
                     ("reduce_scatter+allgather", lambda: (comm.reduce_scatter(even, shard), comm.allgather(even)))):
        comm.barrier(); start = time.perf_counter()
        for _ in range(20):
            op()
        row[name + "_ms"] = 1e3 * (time.perf_counter() - start) / 20
    row["buffer_floats"] = n
if comm is None or comm.rank == 0:
    json.dump({**row, "final_loss": result["losses"][-1]}, open(out, "w"))
"""


def run(cfg, ranks, iters, threads, tmp):
    out = os.path.join(tmp, f"row-{ranks}-{cfg['zero']}.json")
    script = os.path.join(tmp, "worker.py")
    with open(script, "w") as f:
        f.write(WORKER)
    cmd = ([shutil.which("mpiexec"), "-n", str(ranks)] if ranks > 1 else []) + [sys.executable, script, str(iters), out,
                                                                                 json.dumps(cfg)]
    env = dict(os.environ, PYTHONPATH=ROOT, NPGPT_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=1800)
    wall = time.time() - start
    rows = [json.loads(line) for line in open(os.path.join(cfg["out_dir"], "log.jsonl"))]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return {**json.load(open(out)), "threads": threads, "zero": cfg["zero"], "wall_s": wall,
            "tokens_per_s": statistics.median(speeds), "steps": iters}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if shutil.which("mpiexec") is None:
        sys.exit("needs mpiexec: pip install -e '.[mpi]'")
    from npgpt.data import ensure_prepared
    data = os.path.join(ROOT, "data", "shakespeare_char")
    ensure_prepared(data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks, accumulation, threads, zero in ((1, 2, 2, True), (2, 1, 1, True), (2, 1, 1, False), (1, 2, 1, True)):
            cfg = dict(data=data, out_dir=os.path.join(tmp, f"out-{ranks}-{threads}-{zero}"), max_iters=args.iters,
                       eval_interval=10 * args.iters, eval_iters=2, log_interval=10, progress=False,
                       gradient_accumulation_steps=accumulation, zero=zero)
            rows.append(run(cfg, ranks, args.iters, threads, tmp))
            r = rows[-1]
            print(f"{r['ranks']} rank(s) x {threads} thread(s), accumulation {accumulation}, zero={zero}: "
                  f"{r['tokens_per_s']:,.0f} tokens/s, final loss {r['final_loss']:.4f}"
                  + (f", waiting in collectives {1e3 * r['comm_seconds_per_step']:.2f} ms/step, "
                     f"allreduce of {r['buffer_floats']:,} floats {r['allreduce_ms']:.2f} ms, reduce-scatter + "
                     f"all-gather {r['reduce_scatter+allgather_ms']:.2f} ms" if r["ranks"] > 1 else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
