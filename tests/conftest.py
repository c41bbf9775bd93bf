"""Shared fixtures: the ``xp`` fixture runs a test on NumPy, and on CuPy when a GPU is present; ``cp``
runs a CUDA-kernel test on CuPy only."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import npgpt
from npgpt import backend
from npgpt.layers import _cuda

settings.register_profile("npgpt", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("quick", max_examples=5, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# NPGPT_HYPOTHESIS_PROFILE=quick for short device runs, =thorough for a deep local run
settings.load_profile(os.environ.get("NPGPT_HYPOTHESIS_PROFILE", "npgpt"))

_BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.cupy)]


@pytest.fixture(params=_BACKENDS)
def xp(request):
    """The array module of the backend under test (numpy, or cupy when a GPU is usable).

    The backend is switched for the duration of the test and restored afterwards, with the
    default dtype and the RNG."""
    if request.param == "cupy" and not backend.is_cupy_available():
        pytest.skip("cupy backend: CuPy or a CUDA GPU is not available")
    old_name, old_dtype = backend.name, backend.get_default_dtype()
    mod = backend.use(request.param)
    backend.seed(0)
    try:
        yield mod
    finally:
        backend.use(old_name)
        backend.set_default_dtype(old_dtype)


@pytest.fixture(scope="session")
def tiktoken_ref():
    """tiktoken's GPT-2 encoder built from npgpt's shipped ranks file with tiktoken's own loader and its
    own pattern (``get_encoding`` would download): the oracle of the tokenizer tests."""
    tiktoken = pytest.importorskip("tiktoken")
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str
    asset = os.path.join(os.path.dirname(npgpt.__file__), "assets", "gpt2.tiktoken")
    return tiktoken.Encoding("gpt2-ref", pat_str=r50k_pat_str, mergeable_ranks=tiktoken.load.load_tiktoken_bpe(asset),
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture
def f64():
    """Run the test with float64 as the default dtype (for finite-difference checks)."""
    with backend.default_dtype(np.float64):
        yield


@pytest.fixture
def kernel_launches(monkeypatch):
    """The names of the RawKernels launched during the test, in order (``_cuda.raw_kernel`` spied)."""
    names = []
    raw_kernel = _cuda.raw_kernel

    def spy(xp, name, dtype, source):
        names.append(name)
        return raw_kernel(xp, name, dtype, source)
    monkeypatch.setattr(_cuda, "raw_kernel", spy)
    return names


@pytest.fixture
def cp(monkeypatch):
    """CuPy as the backend with the CUDA kernels on and every kernel output buffer starting as NaN (so
    an element a kernel forgets to write fails the comparison); skipped without a usable GPU."""
    if not backend.is_cupy_available():
        pytest.skip("cupy backend: CuPy or a CUDA GPU is not available")
    old = backend.name
    mod = backend.use("cupy")
    monkeypatch.delenv("NPGPT_CUDA_KERNELS", raising=False)
    monkeypatch.setattr(_cuda, "ENABLED", True)
    monkeypatch.setattr(_cuda, "empty", lambda xp, shape, dtype: xp.full(shape, np.nan, dtype))
    try:
        yield mod
    finally:
        backend.use(old)
