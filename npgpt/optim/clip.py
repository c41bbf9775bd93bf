"""The global gradient norm and clipping to it (PyTorch's ``clip_grad_norm_``).

    norm = sqrt( sum over arrays g of sum(g**2) )                                (1)
    g <- g * max_norm / (norm + 1e-6)   for every g, when norm > max_norm          (2)

``sum_of_squares`` is one pass over an array, accumulated in float32 (float64 for float64 arrays);
on CuPy it is a CUDA kernel: each block adds a grid-stride share, then one block adds the block
sums in a fixed order (deterministic, no atomics). ``global_grad_norm`` is (1) as a 0-d array on
the arrays' device (no host sync), used both by ``clip_grad_norm`` (per-parameter gradients) and
inside ``FlatAdamW.step`` (the one flat gradient buffer).
"""
import numpy as np

from .. import backend
from ..engine import Tensor
from ..layers import _cuda

__all__ = ["sum_of_squares", "global_grad_norm", "clip_grad_norm"]


# ---- CUDA kernel --------------------------------------------------------------------------------

SUM_OF_SQUARES_SOURCE = _cuda.register_source("raw", "sum_of_squares", r"""
// Block b adds x[i]^2 over i = b*blockDim + thread, stepping by the whole grid, into block_sums[b].
extern "C" __global__ void sum_of_squares(const T* x, A* block_sums, long long n) {
    __shared__ A shared[33];
    A sum = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const A value = to_acc(x[i]);
        sum += value * value;
    }
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) block_sums[blockIdx.x] = sum;
}

// One block adds the n block sums in a fixed order into *out.
extern "C" __global__ void add_block_sums(const A* block_sums, A* out, int n) {
    __shared__ A shared[33];
    A sum = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += block_sums[i];
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) *out = sum;
}
""")
THREADS = 256          # per block of the first pass
MAX_BLOCKS = 1024      # block sums the second pass adds (its one block has 1024 threads)


def _sum_of_squares_kernel(xp, x):
    x = _cuda.contiguous(xp, x).reshape(-1)
    acc = _cuda.acc_dtype(x.dtype)
    out = _cuda.empty(xp, (), acc)
    blocks = min(_cuda.cdiv(x.size, THREADS), MAX_BLOCKS)
    first = _cuda.raw_kernel(xp, "sum_of_squares", x.dtype, SUM_OF_SQUARES_SOURCE)
    if blocks == 1:                                   # one block: its sum is the answer
        first((1,), (THREADS,), (x, out, np.int64(x.size)))
        return out
    block_sums = _cuda.empty(xp, (blocks,), acc)
    first((blocks,), (THREADS,), (x, block_sums, np.int64(x.size)))
    _cuda.raw_kernel(xp, "add_block_sums", x.dtype, SUM_OF_SQUARES_SOURCE)(
        (1,), (MAX_BLOCKS,), (block_sums, out, _cuda.i32(blocks)))
    return out


# ---- array code ---------------------------------------------------------------------------------

def sum_of_squares(x):
    """sum(x**2) of an array in one pass, as a 0-d array on its device, accumulated in float32
    (float64 for float64 ``x``)."""
    xp = backend.get_array_module(x)
    if xp is not np and _cuda.enabled() and _cuda.supports(x.dtype) and x.size:
        return _sum_of_squares_kernel(xp, x)
    acc = (x if x.dtype.itemsize >= 4 else x.astype(np.float32)).reshape(-1)
    return xp.asarray(xp.vdot(acc, acc))


def global_grad_norm(grads):
    """(1) as a 0-d array on the gradients' device (reading it as a float synchronizes).

    ``grads``: one array (e.g. a flat gradient buffer): the norm in its accumulation dtype; or a
    list of arrays on one backend: their sums of squares added in float64, the norm in float64.
    """
    if hasattr(grads, "shape"):
        return backend.get_array_module(grads).sqrt(sum_of_squares(grads))
    sums = [sum_of_squares(g) for g in grads]
    modules = {backend.get_array_module(s) for s in sums}
    if len(modules) != 1:
        raise ValueError("global_grad_norm needs gradients on one backend (all numpy or all cupy); "
                         "move the model to one device first" if sums else "global_grad_norm got no arrays")
    xp = modules.pop()
    return xp.sqrt(xp.stack(sums).astype(np.float64).sum())


def clip_grad_norm(params, max_norm):
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``; returns the norm
    before clipping as a Python float (so it synchronizes with the GPU).

    The norm is ``global_grad_norm`` of the gradients (each parameter's sum of squares in one pass,
    the sums added in float64). If it exceeds ``max_norm``, every gradient is multiplied by
    ``max_norm / (norm + 1e-6)`` (2). Parameters without a gradient are ignored. A non-finite norm
    is returned and nothing is scaled.
    """
    if isinstance(params, Tensor):
        params = [params]
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(global_grad_norm(grads))
    if norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g *= coef
    return norm
