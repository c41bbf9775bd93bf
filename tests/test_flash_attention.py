"""FlashAttention-2 (``npgpt.layers.flash_attention``): the NumPy emulation of the tensor-core kernels,
with their tiles and loops, against the materialized attention, the float64 reference written from
(A1)-(A8) and float64 finite differences; its float16 rounding against float64; the causal tile
skipping; the dispatch switch; the kernels' resources under nvcc; and (on a GPU only) the CUDA
kernels against float64 NumPy.
"""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npgpt import Tensor, gradcheck
from npgpt.backend import to_numpy
from npgpt.layers import _cuda, attention
from npgpt.layers import flash_attention as fa
from npgpt.layers import flash_attention_cuda as fa_cuda
from npgpt.layers import flash_attention_cuda_backward as fa_cuda_bwd

NVCC = shutil.which("nvcc")


def inputs(seed, B, NH, Tq, Tk, hs, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, NH, T, hs)).astype(dtype) for T in (Tq, Tk, Tk))
    return q, k, v, rng.normal(size=(B, NH, Tq, hs)).astype(dtype)


def tiled(q, k, v, dout, br, bc, br_bwd=None):
    y, lse = fa.flash_attention_tiled_forward(q, k, v, br, bc)
    return (y, lse) + fa.flash_attention_tiled_backward(q, k, v, y, lse, dout, br_bwd or br, bc)


def materialized(q, k, v, dout):
    """attention.py's materialized path (the one every other attention test trusts) and its grads."""
    ts = [Tensor(a, requires_grad=True) for a in (q, k, v)]
    out = attention.attention_materialized(*ts)
    out.backward(dout)
    return [to_numpy(out.data)] + [to_numpy(t.grad) for t in ts]


def close(got, want, tol, names=("y", "lse", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(to_numpy(a).astype(np.float64), b, rtol=tol, atol=tol, err_msg=name)


SHAPES = {   # B, NH, Tq, Tk, hs, BR, BC
    "kernel tiles, T=200": (1, 2, 200, 200, 16, 64, 64),
    "odd T, many tiles": (2, 3, 37, 37, 8, 8, 8),
    "BR != BC": (1, 2, 45, 45, 4, 16, 8),
    "BR < BC": (1, 1, 45, 45, 4, 4, 16),
    "Tq < Tk (KV cache)": (2, 2, 5, 13, 6, 4, 4),
    "T = 1": (1, 1, 1, 1, 3, 64, 64),
    "tiles of 1": (1, 1, 7, 7, 2, 1, 1),
    "tile > T": (1, 1, 6, 6, 3, 100, 100),
}


@pytest.mark.parametrize("name", SHAPES)
def test_tiled_matches_reference_and_materialized(name):
    B, NH, Tq, Tk, hs, br, bc = SHAPES[name]
    q, k, v, dout = inputs(0, B, NH, Tq, Tk, hs)
    want = fa.flash_attention_reference(q, k, v, dout)
    got = tiled(q, k, v, dout, br, bc)
    assert all(a.dtype == np.float64 for a in got)
    close(got, want, 1e-12)
    mat = materialized(q, k, v, dout)
    close([got[0]] + list(got[2:]), mat, 1e-12, names=("y", "dq", "dk", "dv"))


@given(B=st.integers(1, 2), NH=st.integers(1, 2), Tq=st.integers(1, 20), extra=st.integers(0, 6),
       hs=st.integers(1, 8), br=st.integers(1, 24), bc=st.integers(1, 24), br_bwd=st.integers(1, 24),
       seed=st.integers(0, 2**32 - 1))
def test_tiled_property(B, NH, Tq, extra, hs, br, bc, br_bwd, seed):
    """Any tile sizes (forward and backward separately), any Tq <= Tk: the same numbers as the reference."""
    q, k, v, dout = inputs(seed, B, NH, Tq, Tq + extra, hs)
    close(tiled(q, k, v, dout, br, bc, br_bwd), fa.flash_attention_reference(q, k, v, dout), 1e-11)


def test_reference_is_attention():
    """The float64 reference itself: rows of P sum to 1, lse = log sum e^S, y of T=1 is v, and it
    agrees with attention_reference (engine primitives with autograd)."""
    q, k, v, dout = inputs(1, 1, 2, 9, 9, 4)
    y, lse, dq, dk, dv = fa.flash_attention_reference(q, k, v, dout)
    np.testing.assert_allclose(y[..., 0, :], v[..., 0, :], atol=1e-15)      # row 0 sees only key 0
    S0 = (q[..., -1:, :] * k).sum(-1) / 2.0                                  # last row sees all keys
    np.testing.assert_allclose(lse[..., -1], np.log(np.exp(S0).sum(-1)), rtol=1e-13)
    ts = [Tensor(a, requires_grad=True) for a in (q, k, v)]
    out = attention.attention_reference(*ts)
    out.backward(dout)
    close([out.data, ts[0].grad, ts[1].grad, ts[2].grad], [y, dq, dk, dv], 1e-12, names=("y", "dq", "dk", "dv"))


def test_graph_node_gradcheck(f64):
    """``flash_attention`` as a graph node (the emulation on NumPy) against float64 central differences."""
    q, k, v, _ = inputs(2, 1, 2, 11, 11, 3)
    assert gradcheck(fa.flash_attention, [Tensor(a, requires_grad=True) for a in (q, k, v)])


def test_float16_against_float64():
    """float16 in: the kernels' roundings (P, dS to float16 before the products, float32 accumulation)
    stay within float16 accuracy of the float64 answer, and the dtypes are the kernels'."""
    q, k, v, dout = inputs(3, 2, 2, 130, 130, 64, np.float16)
    got = tiled(q, k, v, dout, fa_cuda.BLOCK, fa_cuda.BLOCK, fa_cuda_bwd.backward_block_rows(64))
    assert [a.dtype for a in got] == [np.float16, np.float32, np.float16, np.float16, np.float16]
    want = fa.flash_attention_reference(*(a.astype(np.float64) for a in (q, k, v, dout)))
    for name, a, b in zip(("y", "lse", "dq", "dk", "dv"), got, want):
        err = np.abs(a.astype(np.float64) - b).max() / np.abs(b).max()
        assert err < 1e-2, (name, err)


def test_causal_tiles_are_skipped():
    """(F5)/(F6): query tile i meets key tiles 0..i (square tiles, Tq = Tk), so a T = 4 tiles run does
    1 + 2 + 3 + 4 = 10 of 16 tile products; with Tq < Tk the offset shifts the diagonal."""
    assert [len(fa.key_tiles(q0, 64, 256, 256, 64)) for q0 in range(0, 256, 64)] == [1, 2, 3, 4]
    assert [list(fa.query_tiles_from(k0, 256, 256, 64)) for k0 in (0, 192)] == [[0, 64, 128, 192], [192]]
    assert list(fa.key_tiles(0, 4, 4, 12, 4)) == [0, 1, 2]        # Tq < Tk: row 3 sees key 11
    assert list(fa.query_tiles_from(8, 4, 12, 4)) == [0]          # key 8 is seen from row 0 on
    assert list(fa.key_tiles(64, 64, 100, 100, 64)) == [0, 1]     # the last tile is partial


def test_dispatch_is_on_by_default_and_off_on_numpy():
    """"auto" picks the kernels (measured faster); "flash" on NumPy falls back to the existing path."""
    assert fa.AUTO is True
    q, k, v, _ = inputs(4, 1, 1, 8, 8, 64, np.float16)
    assert not fa.use_flash(q, k, v, forced=True)              # NumPy arrays: no kernel
    old = attention.set_impl("flash")
    try:
        ts = [Tensor(a.astype(np.float64)) for a in (q, k, v)]
        out = attention.scaled_dot_product_attention(*ts)
        assert out._op == "attention"
        np.testing.assert_allclose(out.data, fa.flash_attention_reference(*(t.data for t in ts), ts[0].data)[0],
                                   atol=1e-12)
    finally:
        attention.set_impl(old)
    with pytest.raises(ValueError, match="flash"):
        attention.set_impl("flashy")


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on the PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_fit_without_spills(tmp_path, arch):
    """ptxas: every flash kernel uses < 48 KiB of static shared memory (no opt-in needed), at most 255
    registers and spills none (a spill in the inner loop would cost more than it saves)."""
    kernels, smem = {}, []
    for direction in ("forward", "backward"):    # each as the launcher compiles it: helpers + its kernels
        entry = next(e for e in _cuda.SOURCES if e["name"] == f"flash_attention_{direction}")
        src = tmp_path / f"fa_{direction}.cu"
        src.write_text(_cuda.cuda_source(entry, "float16"))
        r = subprocess.run([NVCC, "-cubin", f"-arch={arch}", "--std=c++17", "--resource-usage", str(src),
                            "-o", os.devnull], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        info = re.findall(r"Function properties for (\w+)\n.*?(\d+) bytes spill stores.*?\n.*?Used (\d+) registers"
                          r".*?(?:(\d+) bytes smem)?", r.stdout + r.stderr)
        kernels.update({name: (int(spill), int(regs)) for name, spill, regs, _ in info})
        smem += [int(x) for x in re.findall(r"(\d+) bytes smem", r.stdout + r.stderr)]
    names = {f"npgpt_flash_{d}_{hs}" for d in ("fwd", "bwd") for hs in fa_cuda.HEAD_SIZES}
    assert names <= set(kernels), sorted(kernels)
    assert all(spill == 0 and regs <= 255 for spill, regs in kernels.values()), kernels
    assert smem and max(smem) < 48 * 1024, smem


# ---- the CUDA kernels (need a GPU) ---------------------------------------------------------------

# ``cp``: the CuPy kernel fixture of conftest.py


def kernel_error(cp, B, NH, Tq, Tk, hs, seed=0, strided=False):
    """Max error of the kernels' (y, lse, dq, dk, dv) relative to each float64 answer's largest value."""
    q, k, v, dout = inputs(seed, B, NH, Tq, Tk, hs, np.float16)
    if strided:   # q, k, v as views of one (B, T, 3, NH, hs) projection, as the model hands them over
        qkv = cp.asarray(np.stack([q, k, v], 0).transpose(1, 3, 0, 2, 4).copy())   # (B, T, 3, NH, hs)
        arrays = [qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]
    else:
        arrays = [cp.asarray(a) for a in (q, k, v)]
    assert fa_cuda.kernel_applies(*arrays)
    scale = 1.0 / np.sqrt(hs)
    y, lse = fa_cuda.flash_forward_cuda(*arrays, scale)
    grads = fa_cuda_bwd.flash_backward_cuda(*arrays, y, lse, cp.asarray(dout), scale)
    want = fa.flash_attention_reference(*(a.astype(np.float64) for a in (q, k, v, dout)))
    # relative to the answer's largest value; absolute where the answer is exactly 0 (T = 1: one key,
    # softmax 1, so dq = dk = 0)
    return {name: float(np.abs(to_numpy(a).astype(np.float64) - b).max() / (np.abs(b).max() or 1.0))
            for name, a, b in zip(("y", "lse", "dq", "dk", "dv"), (y, lse) + tuple(grads), want)}


@pytest.mark.cupy
@pytest.mark.parametrize("hs", fa_cuda.HEAD_SIZES)
@pytest.mark.parametrize("T", [1, 17, 64, 100, 256])
def test_kernels_against_float64(cp, hs, T):
    err = kernel_error(cp, 2, 3, T, T, hs)
    assert all(e < 1e-2 for e in err.values()), err


@pytest.mark.cupy
@pytest.mark.parametrize("Tq,Tk", [(1, 80), (30, 130), (64, 200)])
def test_kernels_kv_cache_shapes(cp, Tq, Tk):
    err = kernel_error(cp, 1, 2, Tq, Tk, 64)
    assert all(e < 1e-2 for e in err.values()), err


@pytest.mark.cupy
def test_kernels_read_strided_qkv(cp):
    err = kernel_error(cp, 2, 4, 96, 96, 64, strided=True)
    assert all(e < 1e-2 for e in err.values()), err


@pytest.mark.cupy
def test_flash_in_the_model_path(cp):
    """scaled_dot_product_attention with NPGPT_ATTENTION=flash runs the kernels (float16) and agrees
    with the chunked path; a float32 input falls back to the existing path."""
    q, k, v, dout = inputs(5, 2, 2, 128, 128, 64, np.float16)
    results = {}
    for impl in ("flash", "chunked"):
        old = attention.set_impl(impl)
        try:
            ts = [Tensor(cp.asarray(a), requires_grad=True) for a in (q, k, v)]
            out = attention.scaled_dot_product_attention(*ts)
            out.backward(cp.asarray(dout))
            results[impl] = [to_numpy(out.data)] + [to_numpy(t.grad) for t in ts]
        finally:
            attention.set_impl(old)
    for a, b in zip(results["flash"], results["chunked"]):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-2, rtol=2e-2)
    assert not fa.use_flash(cp.asarray(q, dtype=np.float32), cp.asarray(k, dtype=np.float32),
                            cp.asarray(v, dtype=np.float32), forced=True)
