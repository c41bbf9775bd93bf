"""cuBLAS called directly (ctypes), with npgpt's own handle: the GEMMs a CUDA graph can record.

CuPy's cuBLAS wrappers refuse to run while a stream is being captured into a CUDA graph: its
``setStream`` raises "calling cuBLAS API during stream capture is currently unsupported" before every
call, although cuBLAS itself supports capture (cuBLAS documentation, "CUDA Graphs Support") when the
handle works in a workspace its user owns. So ``backend.bmm`` sends its GEMMs here while
``backend.capturing()`` is active (``npgpt/cuda_graphs.py`` records a training step inside it):

    one handle per device, created once, with a fixed 32 MiB workspace (``cublasSetWorkspace``: no
    allocation inside a recorded graph; 32 MiB is what the cuBLAS documentation suggests for Hopper),
    the stream set on each call (``cublasSetStream``: the capturing stream), then
    ``cublasGemmStridedBatchedEx`` with the same arguments ``backend.bmm`` gives CuPy's wrapper.

The library is the libcublas CuPy has already loaded (found in ``/proc/self/maps``), so both use one
copy. This module imports no cupy: it sees device pointers and the stream as integers, and the
workspace comes from the ``allocate`` callback ``backend`` passes in.
"""
import ctypes
import ctypes.util
import os

__all__ = ["gemm_strided_batched", "WORKSPACE_BYTES"]

WORKSPACE_BYTES = 32 << 20
_lib = None
_handles = {}          # device id -> (cublasHandle_t, the workspace array kept alive)


def _library_path():
    """The libcublas already mapped into this process (CuPy's), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                if os.path.basename(path).startswith("libcublas.so"):
                    return path
    except OSError:
        pass
    return None


def _load():
    global _lib
    if _lib is not None:
        return _lib
    names = [_library_path(), "libcublas.so.13", "libcublas.so.12", "libcublas.so.11",
             ctypes.util.find_library("cublas")]
    for name in names:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise RuntimeError("npgpt.cublas: libcublas could not be loaded (tried CuPy's copy, libcublas.so.13/12/11)")
    p, i, i64, vp = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(p)]
    lib.cublasSetStream_v2.argtypes = [p, p]
    lib.cublasSetWorkspace_v2.argtypes = [p, p, ctypes.c_size_t]
    lib.cublasGemmStridedBatchedEx.argtypes = [
        p, i, i, i, i, i, vp,           # handle, transa, transb, m, n, k, alpha
        vp, i, i, i64,                  # A, Atype, lda, strideA
        vp, i, i, i64,                  # B, Btype, ldb, strideB
        vp, vp, i, i, i64,              # beta, C, Ctype, ldc, strideC
        i, i, i]                        # batchCount, computeType, algo
    for f in (lib.cublasCreate_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2,
              lib.cublasGemmStridedBatchedEx):
        f.restype = ctypes.c_int
    _lib = lib
    return lib


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"cuBLAS {what} failed with status {status}")


def handle(device, allocate):
    """This device's handle (created on first use, with its workspace from ``allocate(nbytes)``,
    a device array whose ``.data.ptr`` is the address)."""
    if device not in _handles:
        lib = _load()
        h = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(h)), "cublasCreate")
        workspace = allocate(WORKSPACE_BYTES)
        _check(lib.cublasSetWorkspace_v2(h, ctypes.c_void_p(workspace.data.ptr), WORKSPACE_BYTES),
               "cublasSetWorkspace")
        _handles[device] = (h, workspace)
    return _handles[device][0]


def gemm_strided_batched(device, stream, allocate, op_a, op_b, m, n, k, alpha, a, a_type, lda, stride_a,
                         b, b_type, ldb, stride_b, beta, c, c_type, ldc, stride_c, batch, compute,
                         double=False):
    """``cublasGemmStridedBatchedEx`` on ``stream`` (an integer cudaStream_t): column-major
    C_i = alpha op(A_i) op(B_i) + beta C_i for i < batch, pointers and strides in elements as cuBLAS
    takes them; alpha and beta are host scalars, float32 (double when ``double``: 64F compute).
    Algorithm: CUBLAS_GEMM_DEFAULT."""
    lib = _load()
    h = handle(device, allocate)
    _check(lib.cublasSetStream_v2(h, ctypes.c_void_p(stream)), "cublasSetStream")
    scalar = ctypes.c_double if double else ctypes.c_float
    al, be = scalar(alpha), scalar(beta)
    _check(lib.cublasGemmStridedBatchedEx(
        h, op_a, op_b, m, n, k, ctypes.byref(al), ctypes.c_void_p(a), a_type, lda, stride_a,
        ctypes.c_void_p(b), b_type, ldb, stride_b, ctypes.byref(be), ctypes.c_void_p(c), c_type, ldc,
        stride_c, batch, compute, -1), "cublasGemmStridedBatchedEx")
