"""What every CUDA kernel of npgpt shares: the switch, the dtype table, the CUDA prelude, the one
kernel cache and the launch helpers. The kernels themselves live beside the math they compute (each
layer file in ``npgpt/layers/``, the AdamW update in ``npgpt/optim/``).

cupy is reached only through the arrays' module (``xp.RawKernel`` ...), so ``npgpt.backend`` stays its
only importer. Each kernel is compiled once per storage dtype, on first use, and cached here.
Every kernel computes in float32 for float16 and float32 arrays and in float64 for float64 ones.

One switch for every kernel: ``NPGPT_CUDA_KERNELS=0`` (read at every call) or ``_cuda.ENABLED = False``
makes the layers and the optimizer run their plain array code on CuPy instead (A/B benchmarks, or a
fallback). On NumPy nothing here runs.

Every CUDA source is registered with ``register_source`` when its module is imported, so a test can
compile all of them with ``nvcc -ptx`` on a machine without a GPU (``tests/test_cuda_sources.py``).
"""
import os

import numpy as np

from .tuning import TUNING

__all__ = ["ENABLED", "enabled", "use_cuda_kernels", "supports", "acc_dtype", "empty", "cdiv", "i32",
           "vector_width", "vectorizable", "vectorized_applies", "grid_stride", "contiguous", "PRELUDE",
           "raw_kernel", "elementwise_kernel", "register_source", "SOURCES", "cuda_source"]

ENABLED = True
# storage dtype -> (C type T, accumulation type A)
TYPES = {np.dtype(np.float16): ("__half", "float"), np.dtype(np.float32): ("float", "float"),
         np.dtype(np.float64): ("double", "double")}


def enabled():
    """True unless ``_cuda.ENABLED`` is False or the environment variable NPGPT_CUDA_KERNELS is "0"."""
    return ENABLED and os.environ.get("NPGPT_CUDA_KERNELS", "1").strip() != "0"


def supports(*dtypes):
    """True when the kernels handle arrays of all these dtypes (float16, float32, float64)."""
    return all(np.dtype(d) in TYPES for d in dtypes)


def use_cuda_kernels(xp, *arrays):
    """Run a layer's CUDA kernels: CuPy arrays of one supported dtype, none empty, kernels switched on."""
    return (xp is not np and enabled() and supports(arrays[0].dtype)
            and all(a.dtype == arrays[0].dtype and a.size for a in arrays))


def acc_dtype(dtype):
    """The dtype the kernels compute and keep statistics in: float64 for float64, else float32."""
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def empty(xp, shape, dtype):
    """Every kernel output buffer comes from here (tests fill them with NaN to catch unwritten elements)."""
    return xp.empty(shape, dtype)


def cdiv(a, b):
    """ceil(a / b) for positive integers."""
    return -(-a // b)


def i32(n):
    """n as a kernel's ``int`` argument (checked to fit)."""
    assert 0 <= n < 2**31, n
    return np.int32(n)


def vector_width(dtype):
    """Elements of ``dtype`` in one 16-byte load: the kernels' VEC (8 float16, 4 float32, 2 float64)."""
    return 16 // np.dtype(dtype).itemsize


def vectorizable(C, *arrays):
    """The ``_vec`` kernels may run: rows of C elements split into 16-byte vectors (C % VEC == 0) and
    every array starting on a 16-byte boundary (a view may not)."""
    return C % vector_width(arrays[0].dtype) == 0 and all(a.data.ptr % 16 == 0 for a in arrays)


def vectorized_applies(switch, C, *arrays):
    """A layer's ``_vec`` kernel runs for these (N, C) / (C,) arrays: the tuning table's ``switch`` is on
    for CuPy, kernels enabled, one float dtype, all C-contiguous, C % VEC == 0, 16-byte aligned."""
    a = arrays[0]
    return (not isinstance(a, np.ndarray) and enabled() and TUNING["cupy"][switch] and supports(a.dtype)
            and all(x.dtype == a.dtype and x.flags.c_contiguous for x in arrays) and vectorizable(C, *arrays))


def grid_stride(n, threads=256, max_blocks=132 * 16):
    """(grid, block) of a grid-stride loop over n items: a few waves of an H100/H200 (132 SMs) at most."""
    return (max(1, min(cdiv(n, threads), max_blocks)),), (threads,)


def contiguous(xp, a, dtype=None):
    """a as a C-contiguous array (of ``dtype`` when given); no copy when it already is one."""
    a = a if dtype is None else a.astype(dtype, copy=False)
    return xp.ascontiguousarray(a)


# Prepended to every RawKernel source: T is the storage type, A the accumulation type.
PRELUDE = r"""
#include <cuda_fp16.h>
typedef %(T)s T;
typedef %(A)s A;
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ void put(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(double* p, double v) { *p = v; }
__device__ __forceinline__ float ex(float v) { return expf(v); }
__device__ __forceinline__ double ex(double v) { return exp(v); }
__device__ __forceinline__ float lg(float v) { return logf(v); }
__device__ __forceinline__ double lg(double v) { return log(v); }
__device__ __forceinline__ float sq(float v) { return sqrtf(v); }
__device__ __forceinline__ double sq(double v) { return sqrt(v); }
__device__ __forceinline__ float neg_inf(float) { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ double neg_inf(double) { return -__longlong_as_double(0x7ff0000000000000LL); }
__device__ __forceinline__ float nan_of(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double nan_of(double) { return __longlong_as_double(0x7ff8000000000000LL); }

// 16 bytes of T in one load or store (8 halves, 4 floats, 2 doubles); p must be 16-byte aligned.
constexpr int VEC = 16 / sizeof(T);
struct __align__(16) Vec { T v[VEC]; };
__device__ __forceinline__ Vec load_vec(const T* p) {
    Vec r;
    *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
    return r;
}
__device__ __forceinline__ void store_vec(T* p, const Vec& r) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

template <typename V> __device__ __forceinline__ V warp_sum(V v) {   // every lane gets the sum
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it. sh: 33 slots.
template <typename V> __device__ V block_sum(V v, V* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        V w = lane < nw ? sh[lane] : (V)0;
        w = warp_sum(w);
        if (lane == 0) sh[32] = w;
    }
    __syncthreads();
    v = sh[32];
    __syncthreads();   // sh may be reused by the caller right away
    return v;
}
"""

_CACHE = {}      # the one kernel cache: (kind, name, dtype key) -> compiled CuPy kernel
SOURCES = []     # every registered CUDA source, for the nvcc compile test


def register_source(kind, name, source, **spec):
    """Record a CUDA source so ``tests/test_cuda_sources.py`` compiles it. kind: "raw" (a RawKernel
    source compiled with PRELUDE for each storage dtype) or "elementwise" (an ElementwiseKernel:
    ``spec`` holds in_params, out_params and ``types``, the dtypes of its type placeholders other
    than T). ``dtypes``: the storage dtypes it is built for (default float16, float32, float64).
    ``needs``: names of raw sources (which need nothing themselves) that this one is compiled after,
    e.g. shared device helpers: the launcher passes their text + this source to ``raw_kernel``.
    Returns ``source``."""
    SOURCES.append(dict(kind=kind, name=name, source=source, **spec))
    return source


def raw_kernel(xp, name, dtype, source):
    """The RawKernel ``name`` of ``source`` (PRELUDE prepended) for storage dtype ``dtype``, built once."""
    key = ("raw", name, np.dtype(dtype))
    k = _CACHE.get(key)
    if k is None:
        T, A = TYPES[np.dtype(dtype)]
        k = _CACHE[key] = xp.RawKernel(PRELUDE % {"T": T, "A": A} + source, name, options=("--std=c++17",))
    return k


def elementwise_kernel(xp, name, in_params, out_params, body, key=()):
    """The CuPy ElementwiseKernel ``name`` (``in_params`` / ``out_params`` as CuPy writes them),
    built once per ``key`` (what varies between builds of the same name, e.g. the accumulation type)."""
    cache_key = ("elementwise", name, key)
    k = _CACHE.get(cache_key)
    if k is None:
        k = _CACHE[cache_key] = xp.ElementwiseKernel(in_params, out_params, body, name)
    return k


# ---- for the compile test: the plain CUDA a kernel becomes --------------------------------------

_C_TYPES = {"float16": "__half", "float32": "float", "float64": "double", "int64": "long long",
            "int32": "int", "bool": "bool"}


def cuda_source(entry, dtype):
    """Complete CUDA source (one translation unit) for a registered entry and storage dtype, as
    nvcc compiles it: RawKernels with PRELUDE (and the sources it ``needs``); an ElementwiseKernel as
    a grid-stride loop over its elements with the typed parameters CuPy would declare (``T`` = the
    storage type)."""
    T, A = TYPES[np.dtype(dtype)]
    if entry["kind"] == "raw":
        needed = [next(e["source"] for e in SOURCES if e["name"] == n) for n in entry.get("needs", ())]
        return PRELUDE % {"T": T, "A": A} + "".join(needed) + entry["source"]
    types = {"T": T, **{k: _C_TYPES.get(v, v) for k, v in entry.get("types", {}).items()}}
    args, loads = [], []
    for params, is_out in ((entry["in_params"], False), (entry["out_params"], True)):
        for p in params.split(","):
            words = p.split()
            raw = words[0] == "raw"
            ctype, pname = (words[1], words[2]) if raw else (words[0], words[1])
            c = types.get(ctype, _C_TYPES.get(ctype, ctype))
            if raw:
                args.append(f"{'' if is_out else 'const '}{c}* {pname}")
            elif is_out:
                args.append(f"{c}* {pname}_array")
                loads.append(f"{c}& {pname} = {pname}_array[i];")
            else:
                args.append(f"const {c}* {pname}_array")
                loads.append(f"const {c} {pname} = {pname}_array[i];")
    typedefs = "".join(f"typedef {c} {n};\n" for n, c in types.items() if n.isidentifier() and len(n) <= 2)
    return ("#include <cuda_fp16.h>\n" + typedefs
            + f'extern "C" __global__ void {entry["name"]}({", ".join(args)}, long long n) {{\n'
            + "  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;"
            + " i += (long long)gridDim.x * blockDim.x) {\n    "
            + "\n    ".join(loads) + "\n" + entry["source"] + "\n  }\n}\n")
