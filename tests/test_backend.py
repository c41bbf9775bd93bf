"""The backend switch, dtype default, RNG and the numpy/cupy helpers."""
import contextlib
import subprocess
import sys

import numpy as np
import pytest

from npgpt import backend, Tensor


def test_use_unknown_backend():
    with pytest.raises(ValueError, match="numpy"):
        backend.use("tpu")


@pytest.mark.skipif(backend.is_cupy_available(), reason="a GPU is present")
def test_cupy_without_gpu_raises_one_clear_error():
    with pytest.raises(backend.BackendError, match="install CuPy"):
        backend.use("cupy")
    assert backend.name == "numpy"


@pytest.mark.skipif(backend.is_cupy_available(), reason="a GPU is present")
def test_env_variable_selects_backend():
    code = "import npgpt"
    r = subprocess.run([sys.executable, "-c", code], env={"NPGPT_BACKEND": "cupy", "PATH": ""},
                       capture_output=True, text=True)
    assert r.returncode != 0 and "install CuPy" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import npgpt; print(npgpt.backend.name)"],
                       env={"NPGPT_BACKEND": "numpy"}, capture_output=True, text=True)
    assert r.stdout.strip() == "numpy"


def test_array_module_and_to_numpy(xp):
    a = xp.ones(3)
    assert backend.get_array_module(a) is xp
    assert backend.get_array_module(Tensor(a)) is xp
    assert isinstance(backend.to_numpy(Tensor(a)), np.ndarray)
    assert isinstance(backend.to_device(np.ones(2)), xp.ndarray)


def test_default_dtype(xp):
    assert backend.get_default_dtype() == np.float32
    with backend.default_dtype("float64"):
        assert Tensor([1.0]).dtype == np.float64
    assert Tensor([1.0]).dtype == np.float32
    with pytest.raises(ValueError, match="float"):
        backend.set_default_dtype(np.int32)


def test_seeded_rng_is_reproducible(xp):
    a = backend.seed(123).standard_normal(5)
    b = backend.seed(123).standard_normal(5)
    assert (backend.to_numpy(a) == backend.to_numpy(b)).all()
    assert backend.get_array_module(backend.rng().random(2)) is xp


def test_scatter_add_accumulates_repeats(xp):
    a = xp.zeros(3)
    backend.scatter_add(a, xp.asarray([0, 0, 2]), xp.asarray([1.0, 2.0, 5.0]))
    assert backend.to_numpy(a).tolist() == [3.0, 0.0, 5.0]


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("lead", [(2, 3), ()])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_bmm_equals_matmul_of_transposes(xp, dtype, trans_a, trans_b, lead, direct):
    """backend.bmm (one cuBLAS strided-batched GEMM on CuPy; inside ``backend.capturing()`` through
    npgpt's own handle, npgpt/cublas.py) against a float64 NumPy product, batched and 2-D, then
    accumulated into an ``out`` with alpha."""
    rng = np.random.default_rng(0)
    M, K, N = 7, 5, 3
    a = rng.standard_normal(lead + ((K, M) if trans_a else (M, K)))
    b = rng.standard_normal(lead + ((N, K) if trans_b else (K, N)))
    A = a.swapaxes(-1, -2) if trans_a else a
    B = b.swapaxes(-1, -2) if trans_b else b
    ad, bd = xp.asarray(a.astype(dtype)), xp.asarray(b.astype(dtype))
    with backend.capturing() if direct else contextlib.nullcontext():
        out = backend.bmm(ad, bd, trans_a, trans_b)
        acc = xp.ones(lead + (M, N), dtype)
        backend.bmm(ad, bd, trans_a, trans_b, out=acc, alpha=0.5, accumulate=True)
    assert out.shape == lead + (M, N) and out.dtype == np.dtype(dtype)
    ref = np.matmul(A.astype(dtype).astype(np.float64), B.astype(dtype).astype(np.float64))
    tol = {"float16": 2e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(backend.to_numpy(out).astype(np.float64), ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(backend.to_numpy(acc).astype(np.float64), 1 + 0.5 * ref, rtol=tol, atol=tol)
