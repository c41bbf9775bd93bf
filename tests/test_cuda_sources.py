"""Every CUDA source in npgpt compiles with nvcc for sm_80 and sm_90, without a GPU.

Each kernel's source is registered with ``npgpt.layers._cuda.register_source`` when its module is
imported; this test imports every module of the package, turns each registered source into the
translation unit CuPy would compile (``_cuda.cuda_source``) for each storage dtype, and runs
``nvcc -ptx`` on it. A typo in a kernel therefore fails here, on a machine with nvcc and no GPU.
Skipped when nvcc is not on the PATH.
"""
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

import npgpt
from npgpt.layers import _cuda

NVCC = shutil.which("nvcc")
ARCHS = ("sm_80", "sm_90")
DTYPES = ("float16", "float32", "float64")


def _import_all():
    for mod in pkgutil.walk_packages(npgpt.__path__, "npgpt."):
        importlib.import_module(mod.name)


def test_every_kernel_goes_through_the_registry():
    """No module builds a CuPy kernel except through ``_cuda`` (so the registry sees every source),
    and each registered name is unique."""
    root = os.path.dirname(npgpt.__file__)
    offenders = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not name.endswith(".py") or path == _cuda.__file__:
                continue
            with open(path, encoding="utf-8") as f:
                if re.search(r"\.(RawKernel|ElementwiseKernel|ReductionKernel|RawModule)\(", f.read()):
                    offenders.append(os.path.relpath(path, root))
    assert offenders == [], f"build CUDA kernels through npgpt.layers._cuda: {offenders}"
    _import_all()
    names = [e["name"] for e in _cuda.SOURCES]
    assert len(names) == len(set(names)), names
    helpers = {e["name"] for e in _cuda.SOURCES if e["kind"] == "raw" and not e.get("needs")}
    for entry in _cuda.SOURCES:                    # what a source needs is a raw source that needs nothing
        assert set(entry.get("needs", ())) <= helpers, (entry["name"], entry["needs"])
    assert {"layer_norm", "cross_entropy"} <= set(names) and any("gelu" in n for n in names)


def _compile(args):
    path, arch = args
    r = subprocess.run([NVCC, "-ptx", f"-arch={arch}", "--std=c++17", path, "-o", os.devnull],
                       capture_output=True, text=True)
    return path, arch, r.returncode, r.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on the PATH")
def test_every_cuda_source_compiles(tmp_path):
    _import_all()
    assert _cuda.SOURCES, "no CUDA source registered"
    jobs = []
    raw = sorted((e for e in _cuda.SOURCES if e["kind"] == "raw"), key=lambda e: bool(e.get("needs")))
    for dtype in DTYPES:   # all RawKernel sources in one translation unit per dtype (one PRELUDE), helpers first
        path = tmp_path / f"raw_{dtype}.cu"
        path.write_text(_cuda.cuda_source(dict(kind="raw", source=""), dtype) + "".join(e["source"] for e in raw))
        jobs += [(str(path), arch) for arch in ARCHS]
    for entry in _cuda.SOURCES:
        if entry["kind"] == "raw":
            continue
        for dtype in entry.get("dtypes", DTYPES):
            path = tmp_path / f"{entry['name']}_{dtype}.cu"
            path.write_text(_cuda.cuda_source(entry, dtype))
            jobs += [(str(path), arch) for arch in ARCHS]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        failures = [f"{os.path.basename(p)} ({arch}):\n{err}" for p, arch, rc, err in pool.map(_compile, jobs) if rc]
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on the PATH")
def test_a_kernel_typo_fails_to_compile(tmp_path):
    """The check can fail: a registered source with a typo does not compile."""
    entry = dict(next(e for e in _cuda.SOURCES if e["kind"] == "raw"))
    entry["source"] = entry["source"].replace("__syncthreads()", "__syncthread()", 1).replace("return", "retrun", 1)
    path = tmp_path / "typo.cu"
    path.write_text(_cuda.cuda_source(entry, "float32"))
    assert _compile((str(path), "sm_90"))[2] != 0
