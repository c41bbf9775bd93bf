"""Layer-norm and cross-entropy CUDA kernels, scalar vs vectorized (16-byte loads), timed alone on a GPU.

    python benchmarks/bench_kernels_gpu.py [--rows 16384] [--repeat 50] [--json out.json]

GPT-2 124M shapes by default (B*T = 16 x 1024 rows): layer norm forward + backward over C = 768, and
cross-entropy forward + backward over the padded vocabulary 50304, in float16 and float32. Each
kernel pair is timed with CUDA events (median of ``--repeat`` runs after 3 warm-ups) and reported
with its effective bandwidth (bytes the kernels must move / time). The choice it informs is
``npgpt.layers.tuning.TUNING["cupy"]["layer_norm_vectorized"]`` / ``["cross_entropy_vectorized"]``
(off until this shows the vectorized kernels faster; benchmarks/RESULTS.md, "GPU work prepared
without a GPU"). Needs CuPy and a GPU.
"""
import argparse
import json
import sys

import numpy as np

from gpu_probe import timeit     # CUDA-event median after 3 warm-ups (benchmarks/gpu_probe.py)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16 * 1024)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    from npgpt import backend
    if not backend.is_cupy_available():
        sys.exit("bench_kernels_gpu: needs CuPy and a CUDA GPU")
    cp = backend.use("cupy")
    from npgpt.layers import cross_entropy as ce, layer_norm as ln
    rng, N, results = np.random.default_rng(0), args.rows, []
    for dtype in (np.float16, np.float32):
        item = np.dtype(dtype).itemsize
        x, dout = (cp.asarray(rng.normal(size=(N, 768)), dtype=dtype) for _ in range(2))
        w, b = (cp.asarray(rng.normal(size=768), dtype=dtype) for _ in range(2))
        logits = cp.asarray(rng.normal(size=(N, 50304)) * 3, dtype=dtype)
        t, one = cp.asarray(rng.integers(0, 50257, N)), cp.asarray(1.0, dtype=np.float32)
        for vec in (False, True):
            def layer_norm():
                _, mean, rstd = ln.layer_norm_forward_cuda(x, w, b, 1e-5, vectorized=vec)
                ln.layer_norm_backward_cuda(dout, x, w, mean, rstd, vectorized=vec)

            def cross_entropy():
                _, lse, inv_n = ce.cross_entropy_forward_cuda(logits, t, -100, 50257, vectorized=vec)
                ce.cross_entropy_backward_cuda(one, logits, t, lse, inv_n, -100, 50257, vectorized=vec)
            # bytes that must move: LN fwd reads x, writes y; bwd reads x, dout, writes dinp (+ the small rest)
            for name, fn, nbytes in (("layer_norm", layer_norm, 5 * N * 768 * item),
                                     ("cross_entropy", cross_entropy, 3 * N * 50304 * item)):
                s = timeit(fn, args.repeat)
                results.append(dict(kernel=name, dtype=np.dtype(dtype).name, vectorized=vec, seconds=s,
                                    gb_per_s=nbytes / s / 1e9))
                print(f"{name:14s} {np.dtype(dtype).name:8s} {'vectorized' if vec else 'scalar':10s} "
                      f"{s * 1e3:8.3f} ms  {nbytes / s / 1e9:7.0f} GB/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=N, results=results), f, indent=1)


if __name__ == "__main__":
    main()
