"""What an op costs and what the machine can do: FLOPs and bytes moved of each op from its shapes
(``op_cost``), and the peak FLOP/s of the active backend (``peak_flops``: a measured GEMM on the CPU,
the data-sheet dense peak of a known GPU). ``npgpt.profiler`` divides the one by the other per op, and
training's log line divides the model's FLOPs by the peak for MFU. The counts are stated in
docs/profile.md.
"""
import functools
import math
import time

import numpy as np

from . import backend

__all__ = ["GPU_PEAKS_TFLOPS", "gemm_probe", "peak_flops", "ELEMENTWISE_FLOPS", "SHAPE_OPS",
           "ADAMW_FLOPS_PER_PARAM", "ADAMW_PASSES", "op_cost"]


# ---- the machine's peak -----------------------------------------------------------------------------

# dense TFLOP/s from the vendors' data sheets: (fp16/bf16 tensor cores, TF32 tensor cores, FP32 without
# tensor cores); matched against the device name in this order, else a GEMM probe
GPU_PEAKS_TFLOPS = [("H200", (989.4, 494.7, 66.9)), ("H100 PCIe", (756.0, 378.0, 51.2)),
                    ("H100", (989.4, 494.7, 66.9)), ("A100", (312.0, 156.0, 19.5))]


def gemm_probe(dtype="float32", n=None, repeats=None):
    """FLOP/s of the best of ``repeats`` (n, n) @ (n, n) products on the active backend, after one
    warm-up; all-ones operands (no random stream is touched). NumPy uses the current BLAS threads."""
    xp = backend.xp
    n = n or (1024 if xp is np else 4096)
    repeats = repeats or (3 if xp is np else 10)
    a = xp.ones((n, n), dtype=dtype)
    b = xp.ones((n, n), dtype=dtype)
    out = xp.empty((n, n), dtype=dtype)
    xp.matmul(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        backend.synchronize()
        t = time.perf_counter()
        xp.matmul(a, b, out=out)
        backend.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


@functools.lru_cache(maxsize=None)
def _peak(backend_name, dtype, tf32):
    if backend_name == "numpy":
        probe = "float64" if dtype == "float64" else "float32"   # NumPy has no float16 BLAS
        return gemm_probe(probe), f"measured {probe} GEMM (1024x1024, best of 3)"
    xp = backend.xp
    name = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    column = {"float16": 0, "float32": 1 if tf32 else 2}.get(dtype)
    for key, peaks in GPU_PEAKS_TFLOPS:
        if key in name and column is not None:
            kind = ("fp16 tensor-core", "TF32 tensor-core", "FP32")[column]
            return peaks[column] * 1e12, f"{name}: {kind} dense peak (data sheet)"
    return gemm_probe(dtype), f"{name}: measured {dtype} GEMM (4096x4096, best of 10)"


def peak_flops(dtype="float32", tf32=False):
    """(FLOP/s, where the number comes from) for the active backend computing in ``dtype``: a
    measured GEMM on the CPU; the device's dense peak on a known GPU (fp16, TF32 or FP32), else a
    measured GEMM. Measured once per process and backend (about 0.1 s on the CPU)."""
    return _peak(backend.name, str(np.dtype(dtype)), bool(tf32))


# ---- FLOPs and bytes of an op, from its shapes -------------------------------------------------------

# (forward, backward) FLOPs per element of the op's largest operand; documented in docs/profile.md
ELEMENTWISE_FLOPS = {
    "add": (1, 0), "sub": (1, 1), "mul": (1, 2), "div": (1, 3), "neg": (1, 1), "pow": (2, 4),
    "exp": (1, 1), "log": (1, 1), "tanh": (1, 3), "sqrt": (1, 2), "relu": (1, 1), "abs": (1, 1),
    "sum": (1, 0), "mean": (1, 1), "max": (1, 1), "var": (3, 4), "dropout": (1, 1),
    "gelu": (8, 10), "layer_norm": (7, 11), "softmax": (5, 4), "cross_entropy": (4, 3),
}
SHAPE_OPS = {"reshape", "transpose", "getitem", "concatenate", "stack", "where", "masked_fill"}
ADAMW_FLOPS_PER_PARAM = 18      # norm 2, unscale/clip 1, m 3, v 4, denominator 3, update 3, decay 2
ADAMW_PASSES = 8                # arrays of N moved: the gradient read twice (norm, update); weights, m, v
                                # read and written


def _bytes(arrays):
    return sum(a.nbytes for a in arrays)


def op_cost(op, out, parents):
    """(forward FLOPs, backward FLOPs, forward bytes, backward bytes) of one op from its output array
    and its parent Tensors. Bytes: the inputs read and the output written forward; dout, the saved
    inputs and the input gradients backward (intermediates, e.g. attention scores, not counted)."""
    arrays = [p.data for p in parents]
    fwd_bytes = _bytes(arrays) + out.nbytes
    bwd_bytes = out.nbytes + _bytes(arrays) + _bytes(p.data for p in parents if p.requires_grad)
    if op == "linear":                                         # x (N, Cin) @ W (Cin, Cout)
        x, w = parents[0], parents[1]
        flops = 2 * (x.size // w.shape[0]) * w.shape[0] * w.shape[1]
        return flops, 2 * flops, fwd_bytes, bwd_bytes
    if op == "attention":                                      # q (B, NH, Tq, hs), k and v (B, NH, Tk, hs)
        q, k = parents[0], parents[1]
        flops = 4 * (q.size // q.shape[-1]) * k.shape[-2] * q.shape[-1]   # Q K^T and P V
        return flops, 2 * flops, fwd_bytes, bwd_bytes
    if op == "matmul":                                         # (..., M, K) @ (..., K, N)
        flops = 2 * out.size * parents[0].shape[-1]
        return flops, 2 * flops, fwd_bytes, bwd_bytes
    if op == "embedding":                                      # rows gathered, scatter-added back
        return 0, out.size, 2 * out.nbytes, out.nbytes + parents[0].data.nbytes
    if op in SHAPE_OPS:
        xp = backend.get_array_module(out)
        view = len(arrays) == 1 and xp.may_share_memory(out, arrays[0])
        return 0, 0, 0 if view else fwd_bytes, out.nbytes + _bytes(p.data for p in parents if p.requires_grad)
    fwd, bwd = ELEMENTWISE_FLOPS.get(op, (0, 0))
    n = max([out.size] + [a.size for a in arrays])
    return fwd * n, bwd * n, fwd_bytes, bwd_bytes
