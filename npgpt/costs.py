"""What an op costs and what the machine can do: FLOPs and bytes moved of each op from its shapes
(``op_cost``), and the peak FLOP/s of the active backend (``peak_flops``: a measured GEMM on the CPU,
the data-sheet dense peak of a known GPU). ``npgpt.profiler`` divides the one by the other per op, and
training's log line divides the model's FLOPs by the peak for MFU. The counts are stated in
docs/profile.md.
"""
import functools
import math
import re
import time

import numpy as np

from . import backend

__all__ = ["GPU_PEAKS_TFLOPS", "gpu_peak", "device_name", "mfu_peak", "gemm_probe", "peak_flops", "ELEMENTWISE_FLOPS", "SHAPE_OPS",
           "ADAMW_FLOPS_PER_PARAM", "ADAMW_PASSES", "op_cost"]


# ---- the machine's peak -----------------------------------------------------------------------------

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's data sheets and architecture whitepapers, per
# GPU: (fp16/bf16 tensor cores with fp32 accumulation, TF32 tensor cores, FP32 without tensor cores);
# None where the GPU has no such mode. Matched against the device name (a regex, case-insensitive) in
# this order, so more specific names come first. Sources, each halving the sparse figure it prints:
#   H100 SXM / PCIe / NVL, H200, GH200: "NVIDIA H100 Tensor Core GPU" and "NVIDIA H200 Tensor Core
#     GPU" data sheets (SXM: 1,979 / 989 TFLOPS sparse fp16 / TF32; PCIe: 1,513 / 756; NVL: 1,671 / 835)
#   A100 (SXM and PCIe): "NVIDIA A100 Tensor Core GPU" data sheet (312 fp16, 156 TF32, 19.5 FP32)
#   A10: "NVIDIA A10 Tensor Core GPU" data sheet (125 fp16, 62.5 TF32, 31.2 FP32)
#   L4: "NVIDIA L4 Tensor Core GPU" data sheet (242 / 120 sparse fp16 / TF32, 30.3 FP32)
#   L40S: "NVIDIA L40S" data sheet (733 / 366 sparse fp16 / TF32, 91.6 FP32)
#   RTX 4090: "NVIDIA Ada GPU Architecture" whitepaper, appendix: fp16 tensor with FP32 accumulate
#     165.2 (330.3 with fp16 accumulate, not what npgpt's GEMMs use), TF32 82.6, FP32 82.6
#   RTX 3090: "NVIDIA Ampere GA102 GPU Architecture" whitepaper: fp16 with FP32 accumulate 71, TF32 35.6,
#     FP32 35.6
#   V100 SXM2 / PCIe: "NVIDIA Tesla V100" data sheet (125 / 112 tensor, 15.7 / 14 FP32; no TF32)
#   T4: "NVIDIA T4" data sheet (65 fp16 mixed precision, 8.1 FP32; no TF32)
GPU_PEAKS_TFLOPS = [
    ("H200", r"H200", (989.4, 494.7, 66.9)),                       # GH200 too: an H100/H200-class GPU
    ("H100 PCIe", r"H100.*PCIE", (756.0, 378.0, 51.0)),
    ("H100 NVL", r"H100.*NVL", (835.5, 417.5, 60.0)),
    ("H100 SXM", r"H100", (989.4, 494.7, 66.9)),
    ("A100", r"A100", (312.0, 156.0, 19.5)),
    ("A10", r"\bA10\b", (125.0, 62.5, 31.2)),                      # not A10G (no data sheet peak)
    ("L40S", r"L40S", (362.05, 183.0, 91.6)),
    ("L4", r"\bL4\b", (121.0, 60.0, 30.3)),
    ("RTX 4090", r"RTX 4090", (165.2, 82.6, 82.6)),
    ("RTX 3090", r"RTX 3090(?! TI)", (71.0, 35.6, 35.6)),
    ("V100 PCIe", r"V100.*PCIE", (112.0, None, 14.0)),
    ("V100", r"V100", (125.0, None, 15.7)),
    ("T4", r"\bT4\b", (65.0, None, 8.1)),
]
_KINDS = ("fp16 tensor-core", "TF32 tensor-core", "FP32")


def gpu_peak(device_name, dtype="float16", tf32=False):
    """(dense peak FLOP/s or None, where it comes from) of the GPU called ``device_name`` computing in
    ``dtype`` (float16 on the tensor cores; float32 with ``tf32`` on TF32 tensor cores, else FP32
    units), from ``GPU_PEAKS_TFLOPS``. None for a GPU not in the table, a mode it lacks (TF32 before
    Ampere) or float64: the description then says so, and no MFU should be made up from it."""
    column = {"float16": 0, "float32": 1 if tf32 else 2}.get(str(np.dtype(dtype)))
    for label, pattern, peaks in GPU_PEAKS_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            if column is None or peaks[column] is None:
                mode = f"{np.dtype(dtype)}{' TF32' if tf32 else ''}"
                return None, f"{device_name} ({label}): no data-sheet {mode} peak in npgpt.costs.GPU_PEAKS_TFLOPS"
            return peaks[column] * 1e12, f"{device_name} ({label}): {_KINDS[column]} dense peak (data sheet)"
    return None, (f"unknown GPU {device_name!r}: no data-sheet peak in npgpt.costs.GPU_PEAKS_TFLOPS "
                  f"(add its dense peak to report MFU)")


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


def device_name():
    """The active GPU's name as the driver reports it (CuPy backend only)."""
    xp = backend.xp
    name = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


@functools.lru_cache(maxsize=None)
def _peak(backend_name, dtype, tf32):
    if backend_name == "numpy":
        probe = "float64" if dtype == "float64" else "float32"   # NumPy has no float16 BLAS
        return gemm_probe(probe), f"measured {probe} GEMM (1024x1024, best of 3)"
    peak, source = gpu_peak(device_name(), dtype, tf32)
    if peak is not None:
        return peak, source
    return gemm_probe(dtype), f"{source}; measured {dtype} GEMM instead (4096x4096, best of 10)"


def peak_flops(dtype="float32", tf32=False):
    """(FLOP/s, where the number comes from) for the active backend computing in ``dtype``: a
    measured GEMM on the CPU; the device's dense peak on a known GPU (fp16, TF32 or FP32), else a
    measured GEMM (the profiler's yardstick per op). Measured once per process and backend (about
    0.1 s on the CPU). For MFU use ``mfu_peak``, which makes up no peak for an unknown GPU."""
    return _peak(backend.name, str(np.dtype(dtype)), bool(tf32))


def mfu_peak(dtype="float32", tf32=False):
    """(FLOP/s or None, where it comes from): the denominator of MFU. On the CPU the measured GEMM of
    ``peak_flops``; on a GPU its data-sheet dense peak (``gpu_peak``), or None with the reason for a
    GPU (or mode) not in ``GPU_PEAKS_TFLOPS``: then no MFU is reported rather than a made-up one."""
    if backend.name == "numpy":
        return peak_flops(dtype, tf32)
    return gpu_peak(device_name(), dtype, tf32)


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
