"""NCCL smoke test on the GPU(s) at hand: the communicator, all-reduce, reduce-scatter and all-gather on
device buffers (checked against NumPy), one data-parallel training step (plain and ZeRO-1) against the
single-process step, and the bandwidth of a large all-reduce.

    python benchmarks/nccl_smoke.py [--json out.json]            one GPU, one rank (no mpiexec needed)
    mpiexec -n 2 python benchmarks/nccl_smoke.py                 one rank per GPU (needs mpi4py)

With one rank NCCL's collectives are local copies, so the bandwidth printed is a copy bandwidth, not a
link's; with N ranks it prints NCCL's "bus bandwidth" (2 (N-1)/N x bytes / time for an all-reduce).
Without mpi4py a one-rank run bootstraps the communicator with a stand-in for MPI's world (below).
Every check prints PASS or FAIL and the script exits 1 if any failed.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npgpt import backend  # noqa: E402


class OneRankMPI:
    """Just enough of mpi4py's ``MPI`` for a communicator of one process (no mpi4py installed)."""
    COMM_TYPE_SHARED, MIN, SUM = 0, min, sum

    class _World:
        def Get_rank(self): return 0
        def Get_size(self): return 1
        def Split_type(self, _): return self
        def Free(self): pass
        def bcast(self, obj, root=0): return obj
        def allreduce(self, value, op=None): return value
        def Barrier(self): pass
        def Abort(self, code=1): os._exit(code)

    COMM_WORLD = _World()

    @staticmethod
    def Get_processor_name():
        return os.uname().nodename


def communicator():
    from npgpt.distributed import connect
    from npgpt.distributed.nccl import NCCLCommunicator
    comm = connect("cuda")                     # under mpiexec: MPI bootstraps NCCL, GPU = local rank
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError:
            MPI = OneRankMPI
        comm = NCCLCommunicator(MPI)
    return comm


def check(results, name, fn):
    try:
        detail = fn()
        results[name] = {"ok": True, **(detail or {})}
        print(f"PASS {name} {detail or ''}", flush=True)
    except Exception as e:                      # a smoke test reports every failure and goes on
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)


def collectives(comm):
    cp, n, r = backend.xp, comm.size, comm.rank
    host = [np.arange(8 * n, dtype=np.float32) * (q + 1) for q in range(n)]    # rank q's buffer
    total = sum(host)

    def allreduce():
        buf = cp.asarray(host[r])
        comm.allreduce(buf)
        np.testing.assert_array_equal(cp.asnumpy(buf), total)
        out = cp.empty_like(buf)
        comm.wait([comm.allreduce(cp.asarray(host[r]), out, overlap=True)])        # the side stream
        np.testing.assert_array_equal(cp.asnumpy(out), total)

    def reduce_scatter():
        out = cp.empty(8, cp.float32)
        comm.reduce_scatter(cp.asarray(host[r]), out)
        np.testing.assert_array_equal(cp.asnumpy(out), total[8 * r:8 * (r + 1)])

    def allgather():
        buf = cp.zeros(8 * n, cp.float32)
        buf[8 * r:8 * (r + 1)] = r + 1
        comm.allgather(buf)
        np.testing.assert_array_equal(cp.asnumpy(buf), np.repeat(np.arange(1, n + 1), 8).astype(np.float32))

    def broadcast():
        buf = cp.full(4, float(r), cp.float64)
        comm.broadcast(buf, root=n - 1)
        np.testing.assert_array_equal(cp.asnumpy(buf), np.full(4, n - 1.0))
    return [("allreduce", allreduce), ("reduce_scatter", reduce_scatter), ("allgather", allgather),
            ("broadcast", broadcast)]


def training_step(comm, zero):
    """Three data-parallel steps (every rank the same micro-batch, so the mean gradient is one rank's)
    against three plain FlatAdamW steps of an identical model."""
    from npgpt import GPT, GPTConfig
    from npgpt.distributed import DataParallel
    from npgpt.train_helpers import make_optimizer, train_step
    cp = backend.xp

    def build():
        backend.seed(0)
        model = GPT(GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=64))
        return model, make_optimizer(model.parameters(), 1e-3, 0.1, (0.9, 0.95), grad_clip=1.0)
    idx = cp.asarray(np.random.default_rng(0).integers(0, 96, (4, 32)))
    plain_model, plain = build()
    dp_model, opt = build()
    opt = DataParallel(opt, comm, 1, zero=zero, bucket_bytes=64 * 1024)          # several buckets
    for _ in range(3):
        train_step(plain, lambda: plain_model(idx, idx)[1])
        train_step(opt, lambda: dp_model(idx, idx)[1])
    worst = max(float(cp.abs(a.data - b.data).max()) for a, b in zip(plain_model.parameters(), dp_model.parameters()))
    assert worst < 1e-5, f"weights differ by {worst}"
    return {"max_weight_difference": worst, "buckets": len(opt.plan.buckets), "note": opt.memory_note()}


def bandwidth(comm, mib=256, reps=10):
    cp = backend.xp
    buf = cp.ones(mib * 2**20 // 4, cp.float32)
    comm.allreduce(buf)                                  # warm-up (NCCL sets up its channels)
    cp.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        comm.allreduce(buf)
    cp.cuda.Device().synchronize()
    seconds = (time.perf_counter() - start) / reps
    algbw = buf.nbytes / seconds / 1e9
    return {"MiB": mib, "ms": round(1e3 * seconds, 3), "algbw_GBps": round(algbw, 1),
            "busbw_GBps": round(algbw * 2 * (comm.size - 1) / comm.size, 1) if comm.size > 1 else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {}
    try:
        comm = communicator()
    except Exception as e:
        print(f"FAIL communicator: {type(e).__name__}: {e}")
        sys.exit(1)
    cp = backend.xp
    results["communicator"] = {"ok": True, "ranks": comm.size, "rank": comm.rank,
                               "gpu": cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode(),
                               "nccl_version": comm.nccl.get_version()}
    print(f"PASS communicator {results['communicator']}", flush=True)
    for name, fn in collectives(comm):
        check(results, name, fn)
    check(results, "train_step_allreduce", lambda: training_step(comm, zero=False))
    check(results, "train_step_zero1", lambda: training_step(comm, zero=True))
    check(results, "bandwidth_allreduce_256MiB", lambda: bandwidth(comm))
    if args.json and comm.rank == 0:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()
