"""Array backend: NumPy on the CPU or CuPy on an NVIDIA GPU, chosen by one switch.

This is the only module in npgpt that imports cupy. Everything else asks for the array module
with ``get_array_module(x)`` (the module that owns array ``x``) or ``backend.xp`` (the active one),
in the spirit of DeZero's ``get_array_module``: NumPy and CuPy share one API, so the engine, the
layers and the optimizers are written once.

Choose the backend with ``npgpt.backend.use("numpy" | "cupy")`` or the environment variable
``NPGPT_BACKEND`` (read at import). The default float dtype (float32 for training, float64 for
gradient checks) is set with ``set_default_dtype`` or the ``default_dtype`` context manager.

On import, host memory freed by NumPy arrays is kept in the process for the next step's arrays
(``allocator.py``: without it a training step page-faults all its activations in again).
"""
import contextlib
import os
import threading

import numpy as np

from .allocator import keep_freed_memory

__all__ = [
    "use", "name", "xp", "get_xp", "get_array_module", "to_numpy", "to_device", "is_cupy_available",
    "get_default_dtype", "set_default_dtype", "default_dtype", "seed", "rng", "thread_rng", "scatter_add",
    "set_tf32", "tf32_enabled", "synchronize", "forbid_sync", "bmm", "capturing", "is_capturing", "BackendError",
]


class BackendError(RuntimeError):
    """The requested array backend cannot be used on this machine."""


_CUPY_FIX = ('install CuPy for your CUDA version (pip install -e ".[gpu]", or cupy-cuda11x / '
             'cupy-cuda13x to match `nvidia-smi`) on a machine with an NVIDIA GPU, '
             'or use the NumPy backend: npgpt.backend.use("numpy") / NPGPT_BACKEND=numpy')

_cupy = None          # the cupy module once it has been imported successfully
xp = np               # the active array module; read it as `backend.xp`, never copy it at import
name = "numpy"        # "numpy" or "cupy"
_dtype = np.dtype(np.float32)
_rng = None           # the active backend's random Generator, created by seed()/rng()
_local = threading.local()   # .rng: this thread's own Generator inside ``thread_rng`` (else _rng)
_tf32 = False         # float32 matrix products on TF32 tensor cores (CuPy only)
_capturing = False    # inside ``capturing()``: bmm's GEMMs go through npgpt.cublas (recordable)


def _import_cupy():
    """Import cupy and check that a GPU is usable, or raise one BackendError naming the fix."""
    global _cupy
    if _cupy is not None:
        return _cupy
    try:
        import cupy  # the one cupy import in the package
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        raise BackendError(f"the cupy backend needs CuPy, which could not be imported ({e}); "
                           f"to fix: {_CUPY_FIX}") from e
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise BackendError(f"CuPy is installed but no CUDA GPU is usable ({e}); to fix: {_CUPY_FIX}") from e
    if n < 1:
        raise BackendError(f"CuPy is installed but found no CUDA GPU; to fix: {_CUPY_FIX}")
    _cupy = cupy
    _apply_tf32()
    return cupy


def _apply_tf32():
    linalg = _cupy._core._routines_linalg
    mode = linalg.COMPUTE_TYPE_TF32 if _tf32 else linalg.COMPUTE_TYPE_DEFAULT
    linalg.set_compute_type(np.float32, mode)


def set_tf32(enabled=True):
    """Run float32 matrix products on the GPU's TF32 tensor cores (10-bit mantissa inputs, float32
    accumulation; about 3e-4 relative error) or not (the default). No effect on NumPy. CuPy applies
    this to 2-D products (``dot``/``matmul`` via cuBLAS gemmEx), which is where the linear layers run."""
    global _tf32
    _tf32 = bool(enabled)
    if _cupy is not None:
        _apply_tf32()


def tf32_enabled():
    """Whether ``set_tf32`` is on (float32 GEMMs round their inputs to TF32)."""
    return _tf32


def is_capturing():
    """Inside ``capturing()``: a CUDA graph is being recorded, so work launched now runs only at replay."""
    return _capturing


def forbid_sync():
    """Context manager: on CuPy, any operation that waits for the GPU (a device-to-host copy,
    ``.item()``, ``float()`` of a device array) raises ``cupyx.DeviceSynchronized`` inside it; used by
    tests to prove a training step never stalls on the host. A no-op on NumPy."""
    if _cupy is None or xp is np:
        return contextlib.nullcontext()
    import cupyx  # part of the cupy install
    return cupyx.allow_synchronize(False)


def synchronize():
    """Wait until the GPU has finished all queued work (for timing); no-op on NumPy."""
    if _cupy is not None:
        _cupy.cuda.get_current_stream().synchronize()


def is_cupy_available():
    """True when CuPy imports and sees at least one GPU (never raises)."""
    try:
        _import_cupy()
        return True
    except BackendError:
        return False


def use(backend):
    """Switch the active backend to ``"numpy"`` (CPU) or ``"cupy"`` (GPU); returns the array module.

    Tensors created afterwards live on the new backend; existing arrays are not moved
    (use ``to_device``). Raises BackendError if cupy is asked for but cannot run here.
    """
    global xp, name, _rng
    if backend in ("numpy", "cpu", "np"):
        xp, name = np, "numpy"
    elif backend in ("cupy", "cuda", "gpu", "cp"):
        xp, name = _import_cupy(), "cupy"
    else:
        raise ValueError(f"unknown backend {backend!r}: use 'numpy' (CPU) or 'cupy' (NVIDIA GPU)")
    _rng = None
    return xp


def get_xp():
    """The active array module (numpy or cupy)."""
    return xp


def _unwrap(x):
    """The array inside a Tensor (duck-typed: backend does not import the engine); arrays pass through.
    (A CuPy array also has a ``.data`` attribute, its memory pointer, hence the explicit check.)"""
    if isinstance(x, np.ndarray) or (_cupy is not None and isinstance(x, _cupy.ndarray)):
        return x
    return x.data if hasattr(x, "requires_grad") else x


def get_array_module(*arrays):
    """The array module (numpy or cupy) that owns the given arrays (or Tensors); numpy for scalars."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(_unwrap(a), _cupy.ndarray):
                return _cupy
    return np


def to_numpy(x):
    """A NumPy copy/view of an array or Tensor on any backend (device arrays are copied to host)."""
    x = _unwrap(x)
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def to_device(x, dtype=None):
    """``x`` as an array of the active backend (host arrays are copied to the GPU under cupy)."""
    if isinstance(x, xp.ndarray) and (dtype is None or x.dtype == dtype):
        return x
    if xp is np:
        return np.asarray(to_numpy(x), dtype=dtype)
    return xp.asarray(x, dtype=dtype)


def get_default_dtype():
    """The float dtype new Tensors and parameters get (float32 unless changed)."""
    return _dtype


def set_default_dtype(dtype):
    """Set the default float dtype: float16, float32 (training) or float64 (gradient checks)."""
    global _dtype
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"the default dtype must be a float dtype, not {dtype}")
    _dtype = dtype


@contextlib.contextmanager
def default_dtype(dtype):
    """Temporarily use ``dtype`` as the default float dtype: ``with default_dtype("float64"): ...``."""
    old = _dtype
    set_default_dtype(dtype)
    try:
        yield
    finally:
        set_default_dtype(old)


def seed(s):
    """Seed the active backend's random Generator (and return it)."""
    global _rng
    _rng = xp.random.default_rng(s)
    return _rng


def rng():
    """The active backend's random Generator (``numpy.random.Generator`` or CuPy's); seeded with 0 if
    unseeded. Inside ``thread_rng(g)``, this thread's ``g``."""
    own = getattr(_local, "rng", None)
    if own is not None:
        return own
    if _rng is None:
        seed(0)
    return _rng


@contextlib.contextmanager
def thread_rng(generator):
    """Inside, ``rng()`` called from this thread returns ``generator``: threads that draw at once
    (dropout in ``npgpt/replicas.py``) each read their own stream, so the draws do not depend on
    which thread runs first."""
    old, _local.rng = getattr(_local, "rng", None), generator
    try:
        yield generator
    finally:
        _local.rng = old


def scatter_add(a, indices, values):
    """In place ``a[indices] += values`` where repeated indices accumulate (unbuffered, like ``np.add.at``)."""
    if get_array_module(a) is np:
        np.add.at(a, indices, values)
    else:
        import cupyx  # noqa: F401  (part of the cupy install)
        cupyx.scatter_add(a, indices, values)
    return a


_CUDA_R = {np.dtype(np.float16): 2, np.dtype(np.float32): 0}   # cudaDataType: CUDA_R_16F, CUDA_R_32F


def _batch_layout(x):
    """(ld, batch stride) in elements when ``x`` (..., R, C) is a cuBLAS strided batch: unit stride
    along C, rows ld apart, and the leading axes one evenly strided run of matrices; else None."""
    item = x.itemsize
    if x.strides[-1] != item and x.shape[-1] > 1:
        return None
    ld = x.strides[-2] // item if x.shape[-2] > 1 else x.shape[-1]
    if ld < x.shape[-1] or x.strides[-2] % item:
        return None
    lead = [(n, s) for n, s in zip(x.shape[:-2], x.strides[:-2]) if n > 1]
    if not lead:
        return ld, 0
    for (n_out, s_out), (n_in, s_in) in zip(lead[:-1], lead[1:]):
        if s_out != s_in * n_in:
            return None
    if lead[-1][1] <= 0 or lead[-1][1] % item:
        return None
    return ld, lead[-1][1] // item


def bmm(a, b, trans_a=False, trans_b=False, out=None, dtype=None, alpha=1.0, accumulate=False):
    """Batched matrix product over the leading axes: alpha * op(a) @ op(b), op = swap of the last two
    axes when ``trans_a`` / ``trans_b``.  a (..., M, K) [or (..., K, M)], b (..., K, N) [or (..., N, K)]
    -> (..., M, N).

    Into ``out`` (``+=`` when ``accumulate``; ``out`` may be a view such as dk[:, :, :end]) or a new
    array of ``dtype`` (default a's). float16 operands are multiplied with float32 accumulation
    and the result is rounded once to the output dtype, so float16 inputs may give float32 results.
    On CuPy, float16/float32 with equal leading axes run as ONE cuBLAS ``gemmStridedBatchedEx``
    straight on the (strided) views, on the tensor cores (TF32 for float32 after ``set_tf32``);
    ``cupy.matmul`` on >= 3-D float16 arrays instead converts them to float32 and loses the tensor
    cores (RESULTS.md, "Tuning constants").
    Otherwise ``xp.matmul``.
    """
    xp = get_array_module(a, b)
    dtype = np.dtype(dtype or a.dtype) if out is None else out.dtype
    if xp is not np:
        c = _cublas_bmm(a, b, trans_a, trans_b, out, dtype, alpha, accumulate)
        if c is not None:
            return c
    A = a.swapaxes(-1, -2) if trans_a else a
    B = b.swapaxes(-1, -2) if trans_b else b
    if A.dtype == np.float16:                                # NumPy float16 matmul has no BLAS and
        A, B = A.astype(np.float32), B.astype(np.float32)    # rounds every partial sum: widen
    if xp is np and out is not None and not accumulate and alpha == 1.0 and out.dtype == A.dtype:
        return np.matmul(A, B, out=out)
    r = xp.matmul(A, B)
    if alpha != 1.0:
        r *= alpha
    if out is None:
        return r if r.dtype == dtype else r.astype(dtype)
    if accumulate:
        out += r
    else:
        out[...] = r
    return out


@contextlib.contextmanager
def capturing():
    """While a CUDA graph records (``npgpt/cuda_graphs.py``): ``bmm`` runs its GEMMs through
    ``npgpt.cublas`` (its own cuBLAS handle and workspace), since CuPy's cuBLAS calls refuse stream
    capture. Enter it before the capture begins: the handle and its workspace are made here."""
    global _capturing
    if _cupy is not None:
        from . import cublas
        cublas.handle(_cupy.cuda.Device().id, _workspace)
    old, _capturing = _capturing, True
    try:
        yield
    finally:
        _capturing = old


def _workspace(nbytes):
    return _cupy.empty(nbytes, np.uint8)


def _cublas_bmm(a, b, trans_a, trans_b, out, dtype, alpha, accumulate):
    """The CuPy fast path of ``bmm``: the result (``out`` or a new array), or None when it does
    not apply (other dtypes, broadcasting, an ``out`` that is not one strided batch)."""
    if a.dtype != b.dtype or a.dtype not in _CUDA_R or dtype not in _CUDA_R or a.ndim < 2 or b.ndim != a.ndim \
            or a.shape[:-2] != b.shape[:-2] or (out is not None and out.shape[:-2] != a.shape[:-2]):
        return None
    M, K = (a.shape[-1], a.shape[-2]) if trans_a else a.shape[-2:]
    N = b.shape[-2] if trans_b else b.shape[-1]
    if (b.shape[-1] if trans_b else b.shape[-2]) != K or 0 in (M, N, K):
        return None
    c = _cupy.empty(a.shape[:-2] + (M, N), dtype) if out is None else out
    if c.shape[-2:] != (M, N):
        return None
    la, lb, lc = _batch_layout(a), _batch_layout(b), _batch_layout(c)
    if la is None:
        a = _cupy.ascontiguousarray(a)
        la = _batch_layout(a)
    if lb is None:
        b = _cupy.ascontiguousarray(b)
        lb = _batch_layout(b)
    if lc is None:
        return None                                          # out is not one strided batch
    batch = int(np.prod(a.shape[:-2]))
    # cuBLAS is column-major, where a row-major (r, c) buffer with row stride ld is the column-major
    # (c, r) matrix with leading dimension ld, i.e. its transpose: compute C^T = op(B)^T op(A)^T.
    op_a, op_b = int(trans_a), int(trans_b)
    ab_type, c_type = _CUDA_R[a.dtype], _CUDA_R[np.dtype(dtype)]
    compute = 77 if (a.dtype == np.float32 and _tf32) else 68  # CUBLAS_COMPUTE_32F(_FAST_TF32)
    beta = 1.0 if accumulate else 0.0
    if _capturing:                                           # recordable: npgpt's own handle
        from . import cublas
        cublas.gemm_strided_batched(
            _cupy.cuda.Device().id, _cupy.cuda.get_current_stream().ptr, _workspace, op_b, op_a, N, M, K,
            alpha, b.data.ptr, ab_type, lb[0], lb[1], a.data.ptr, ab_type, la[0], la[1], beta,
            c.data.ptr, c_type, lc[0], lc[1], batch, compute)
        return c
    alpha_h = np.array(alpha, np.float32)                    # host scalars, float32 for 32F compute
    beta_h = np.array(beta, np.float32)
    _cupy.cuda.cublas.gemmStridedBatchedEx(
        _cupy.cuda.device.get_cublas_handle(), op_b, op_a, N, M, K, alpha_h.ctypes.data,
        b.data.ptr, ab_type, lb[0], lb[1], a.data.ptr, ab_type, la[0], la[1], beta_h.ctypes.data,
        c.data.ptr, c_type, lc[0], lc[1], batch, compute, -1)  # -1: CUBLAS_GEMM_DEFAULT
    return c


keep_freed_memory()
_env = os.environ.get("NPGPT_BACKEND")
if _env:
    use(_env.strip().lower())
