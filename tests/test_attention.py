"""The two attention implementations of ``npgpt.layers.attention`` (materialized) and
``npgpt.layers.attention_chunked`` (query blocks, causal): the chunked path against the materialized
one and against ``attention_reference`` (composed from engine primitives) in float64 (forward and the
gradients of q, k and v), its float64 gradcheck, float16 against a float64 reference, the causal mask,
the dispatch rule, the GEMM wrapper and the CUDA kernels' contract.

Timing on NumPy (2 cores, B=8, NH=6, hs=64, float32): python tests/test_attention.py [T ...]
"""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npgpt import Tensor, backend, gradcheck
from npgpt.backend import to_numpy
from npgpt.layers import _cuda, attention, attention_chunked, tuning

seeds = st.integers(0, 2**32 - 1)


def normal(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape)


reference = attention.attention_reference      # from engine primitives: the float64 oracle


def chunked(block_q):
    return lambda q, k, v: attention.attention_chunked(q, k, v, block_q=block_q)


def run(fn, arrays, dout):
    """fn(*Tensors) and the gradients of sum(dout * out), all as NumPy arrays."""
    ts = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(backend.get_array_module(out.data).asarray(dout, dtype=out.dtype))
    return [to_numpy(out.data)] + [to_numpy(t.grad) for t in ts]


def qkv(xp, seed, B, NH, Tq, Tk, hs, dtype=np.float64):
    q = xp.asarray(normal(seed, B, NH, Tq, hs), dtype=dtype)
    k = xp.asarray(normal(seed + 1, B, NH, Tk, hs), dtype=dtype)
    v = xp.asarray(normal(seed + 2, B, NH, Tk, hs), dtype=dtype)
    return [q, k, v], normal(seed + 3, B, NH, Tq, hs)


def assert_all_close(got, want, tol, names=("out", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)


# ---- chunked == materialized == composed (float64) -----------------------------------------------

SHAPES = {  # B, NH, Tq, Tk, hs, block_q
    "odd T, 5 blocks": (2, 3, 37, 37, 5, 8),
    "T=1": (1, 2, 1, 1, 3, 4),
    "Tq<Tk (KV cache)": (2, 2, 5, 13, 6, 2),
    "Tq<Tk one block": (1, 2, 3, 10, 4, 16),
    "hs=7, T=64": (1, 1, 64, 64, 7, 16),
    "block = T": (2, 1, 17, 17, 3, 17),
    "block 1": (1, 2, 9, 9, 4, 1),
    "block > T": (1, 1, 6, 6, 3, 100),
}


@pytest.mark.parametrize("name", SHAPES)
def test_chunked_matches_materialized_and_reference(xp, name):
    B, NH, Tq, Tk, hs, bq = SHAPES[name]
    arrays, dout = qkv(xp, 0, B, NH, Tq, Tk, hs)
    got = run(chunked(bq), arrays, dout)
    assert got[0].dtype == np.float64
    assert_all_close(got, run(attention.attention_materialized, arrays, dout), 1e-12)
    assert_all_close(got, run(reference, arrays, dout), 1e-12)


@given(B=st.integers(1, 2), NH=st.integers(1, 3), Tq=st.integers(1, 12), extra=st.integers(0, 5),
       hs=st.integers(1, 9), block_q=st.integers(1, 14), seed=seeds)
def test_chunked_property(xp, B, NH, Tq, extra, hs, block_q, seed):
    arrays, dout = qkv(xp, seed, B, NH, Tq, Tq + extra, hs)
    assert_all_close(run(chunked(block_q), arrays, dout), run(attention.attention_materialized, arrays, dout), 1e-11)


@pytest.mark.parametrize("Tq,Tk,block_q", [(5, 5, 2), (3, 6, 2), (4, 4, 4)])
def test_chunked_gradcheck(xp, Tq, Tk, block_q):
    arrays, _ = qkv(xp, 7, 2, 2, Tq, Tk, 3)
    assert gradcheck(chunked(block_q), arrays)


def test_chunked_partial_grads(xp):
    """Only some inputs need gradients: each one is still right, the others stay None."""
    arrays, dout = qkv(xp, 3, 1, 2, 7, 7, 3)
    full = run(chunked(3), arrays, dout)
    for need in ([False, False, True], [True, False, False], [False, True, False]):
        ts = [Tensor(a, requires_grad=r) for a, r in zip(arrays, need)]
        attention.attention_chunked(*ts, block_q=3).backward(xp.asarray(dout))
        for t, r, want in zip(ts, need, full[1:]):
            assert (t.grad is None) != r
            if r:
                np.testing.assert_allclose(to_numpy(t.grad), want, atol=1e-12)


def test_chunked_kv_cache_rows(xp):
    """Queries for the last positions against all keys (Tq < Tk) = those rows of full attention."""
    arrays, _ = qkv(xp, 5, 2, 2, 11, 11, 4)
    q, k, v = arrays
    full = to_numpy(attention.attention_chunked(Tensor(q), Tensor(k), Tensor(v), block_q=3).data)
    for Tq in (1, 4, 10):
        last = attention.attention_chunked(Tensor(q[:, :, 11 - Tq:]), Tensor(k), Tensor(v), block_q=3)
        np.testing.assert_allclose(to_numpy(last.data), full[:, :, 11 - Tq:], atol=1e-14)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        attention.attention_chunked(Tensor(q), Tensor(k[:, :, :4]), Tensor(v[:, :, :4]))


@pytest.mark.parametrize("impl", ["chunked", "materialized"])
def test_future_tokens_do_not_leak(xp, impl, monkeypatch):
    """Perturbing the keys and values of positions >= t leaves the outputs of earlier queries
    bit-identical, and their gradients reach no key or value at >= t. Fails if the mask is off by one
    in either direction (in the forward or in the backward's recomputed P)."""
    monkeypatch.setattr(attention, "_impl", impl)
    for kind in ("numpy", "cupy"):
        monkeypatch.setitem(tuning.TUNING[kind], "attention_chunked_min_t", 1)
    B, NH, T, hs, t = 2, 2, 13, 4, 6
    (q, k, v), _ = qkv(xp, 11, B, NH, T, T, hs)
    fn = attention.scaled_dot_product_attention
    base = to_numpy(fn(Tensor(q), Tensor(k), Tensor(v)).data)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, t:] += 5.0
    v2[:, :, t:] -= 3.0
    moved = to_numpy(fn(Tensor(q), Tensor(k2), Tensor(v2)).data)
    np.testing.assert_array_equal(moved[:, :, :t], base[:, :, :t])
    assert (np.abs(moved[:, :, t:] - base[:, :, t:]) > 1e-3).all(axis=-1).all()   # every later row moves
    ts = [Tensor(a, requires_grad=True) for a in (q, k, v)]
    dout = np.zeros((B, NH, T, hs))
    dout[:, :, :t] = normal(1, B, NH, t, hs)
    fn(*ts).backward(xp.asarray(dout))
    dq, dk, dv = (to_numpy(x.grad) for x in ts)
    np.testing.assert_array_equal(dk[:, :, t:], 0.0)
    np.testing.assert_array_equal(dv[:, :, t:], 0.0)
    np.testing.assert_array_equal(dq[:, :, t:], 0.0)
    assert (np.abs(dv[:, :, t - 1]) > 0).all()                                     # key t-1 is seen


def test_known_answers_chunked(xp):
    """The first query sees only the first key; with all keys equal every query averages the values."""
    (q, k, v), _ = qkv(xp, 2, 1, 2, 9, 9, 3)
    out = to_numpy(attention.attention_chunked(Tensor(q), Tensor(k), Tensor(v), block_q=4).data)
    np.testing.assert_allclose(out[:, :, 0], to_numpy(v)[:, :, 0], atol=1e-15)
    k_same = xp.broadcast_to(k[:, :, :1], k.shape).copy()
    out = to_numpy(attention.attention_chunked(Tensor(q), Tensor(k_same), Tensor(v), block_q=4).data)
    want = np.cumsum(to_numpy(v), axis=2) / np.arange(1, 10)[:, None]
    np.testing.assert_allclose(out, want, atol=1e-13)


# ---- dtypes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [chunked(4), chunked(None), attention.attention_materialized],
                         ids=["chunked", "chunked auto block", "materialized"])
def test_float32_preserved(xp, fn):
    arrays, dout = qkv(xp, 0, 2, 2, 9, 9, 4, dtype=np.float32)
    got = run(fn, arrays, dout)
    assert all(g.dtype == np.float32 for g in got)
    want = run(reference, [a.astype(np.float64) for a in arrays], dout)
    assert_all_close(got, want, 2e-5)


@pytest.mark.parametrize("fn", [chunked(8), attention.attention_materialized], ids=["chunked", "materialized"])
@pytest.mark.parametrize("Tq,Tk", [(40, 40), (5, 29)])
def test_float16_against_float64(xp, fn, Tq, Tk):
    """float16 in, float16 out and gradients, float32 scores: within float16 rounding of the float64
    answer on the same (rounded) inputs."""
    arrays, dout = qkv(xp, 4, 2, 3, Tq, Tk, 24, dtype=np.float16)
    got = run(fn, arrays, dout)
    assert all(g.dtype == np.float16 for g in got)
    want = run(reference, [a.astype(np.float64) for a in arrays], dout.astype(np.float16))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert np.isfinite(a).all(), name
        err = np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-3)
        assert err < 3e-3, (name, err)         # measured ~5e-4 (float16 eps ~1e-3)


def test_float16_attention_in_both_paths_agree(xp):
    arrays, dout = qkv(xp, 9, 1, 2, 33, 33, 16, dtype=np.float16)
    a, b = run(chunked(5), arrays, dout), run(attention.attention_materialized, arrays, dout)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=1e-2, atol=1e-2)


# ---- dispatch ------------------------------------------------------------------------------------

def _spy(monkeypatch):
    calls = []
    real = attention.attention_chunked
    monkeypatch.setattr(attention, "attention_chunked",
                        lambda *a, **kw: calls.append("chunked") or real(*a, **kw))
    real_m = attention.attention_materialized
    monkeypatch.setattr(attention, "attention_materialized",
                        lambda *a, **kw: calls.append("materialized") or real_m(*a, **kw))
    return calls


def test_dispatch(monkeypatch):
    calls = _spy(monkeypatch)
    T = tuning.tuned(np, "attention_chunked_min_t")
    t = max(T - 1, 1)
    big = [Tensor(np.zeros((1, 1, T, 2), np.float32))] * 3
    small = [Tensor(np.zeros((1, 1, t, 2), np.float32))] * 3
    mask = np.ones((T, T), bool)
    sdpa = attention.scaled_dot_product_attention
    sdpa(*big)
    sdpa(*small)
    sdpa(*big, attn_mask=mask)
    sdpa(*big, dropout_p=0.1)
    sdpa(*big, is_causal=False)
    expect = ["chunked", "materialized" if T > 1 else "chunked"] + ["materialized"] * 3
    assert calls == expect
    calls.clear()
    old = attention.set_impl("materialized")
    try:
        sdpa(*big)
        attention.set_impl("chunked")
        sdpa(*small)
        sdpa(*small, attn_mask=np.ones((t, t), bool))       # chunked cannot: falls back
    finally:
        attention.set_impl(old)
    assert calls == ["materialized", "chunked", "materialized"]
    with pytest.raises(ValueError, match="materialized"):
        attention.set_impl("flashy")


def test_block_rows(monkeypatch):
    monkeypatch.delenv("NPGPT_ATTENTION_BLOCK_Q", raising=False)
    for BH, Tq, Tk in [(48, 1024, 1024), (48, 256, 256), (1, 5, 5), (4096, 4096, 4096), (1, 100000, 100000)]:
        n = attention_chunked.block_rows(BH, Tq, Tk, np)
        assert 1 <= n <= Tq and (n == Tq or n % 16 == 0)
    monkeypatch.setenv("NPGPT_ATTENTION_BLOCK_Q", "24")
    assert attention_chunked.block_rows(48, 100, 100, np) == 24
    assert attention_chunked.block_rows(48, 10, 10, np) == 10


def test_blocks_cover_the_queries_once():
    for Tq, Tk, n in [(37, 37, 8), (5, 13, 2), (1, 1, 4), (16, 20, 16)]:
        blocks = attention_chunked.query_blocks(Tq, Tk, n)
        assert [i for i0, i1, _ in blocks for i in range(i0, i1)] == list(range(Tq))
        assert all(end == i1 + Tk - Tq and end <= Tk for _, i1, end in blocks)


# ---- backend.bmm ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,out_dtype", [("float16", "float16"), ("float16", "float32"),
                                             ("float32", "float32"), ("float64", "float64")])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
def test_gemm_on_views(xp, dtype, out_dtype, trans_a, trans_b):
    """backend.bmm (cuBLAS gemmStridedBatchedEx on CuPy) on row-slices of (B, NH, T, hs) arrays, into a
    fresh array and into an ``out`` view (plain, scaled, accumulated), against float64 matmul."""
    rng = np.random.default_rng(0)
    big_a = rng.standard_normal((2, 3, 20, 6))
    big_b = rng.standard_normal((2, 3, 20, 6))
    a = big_a[:, :, 2:9]                                             # (2, 3, 7, 6)
    if trans_a:
        b = big_b[:, :, 5:12] if not trans_b else None               # op(a) (6, 7) @ b (7, 6)
    else:
        b = big_b[:, :, 4:10] if not trans_b else big_b[:, :, 1:12]  # (6, 6) or (11, 6)^T
    A = a.swapaxes(-1, -2) if trans_a else a
    B = b.swapaxes(-1, -2) if trans_b else b
    lo = lambda x: x.astype(dtype).astype(np.float64)               # noqa: E731  (the operands as rounded)
    want = np.matmul(lo(A), lo(B))
    da, db = (xp.asarray(x.astype(dtype)) for x in (big_a, big_b))
    a_dev, b_dev = da[:, :, 2:9], (db[:, :, 5:12] if trans_a else db[:, :, 4:10] if not trans_b else db[:, :, 1:12])
    tol = {"float16": 1e-2, "float32": 1e-5, "float64": 1e-12}[dtype if out_dtype != "float16" else "float16"]
    got = backend.bmm(a_dev, b_dev, trans_a, trans_b, dtype=out_dtype)
    assert got.dtype == np.dtype(out_dtype) and got.shape == want.shape
    np.testing.assert_allclose(to_numpy(got).astype(np.float64), want, rtol=tol, atol=tol)
    buf = xp.asarray(rng.standard_normal((2, 3, want.shape[-2] + 5, want.shape[-1])), dtype=out_dtype)
    before = to_numpy(buf).astype(np.float64)
    out = buf[:, :, 3:3 + want.shape[-2]]
    backend.bmm(a_dev, b_dev, trans_a, trans_b, out=out, alpha=0.5, accumulate=True)
    after = to_numpy(buf).astype(np.float64)
    np.testing.assert_allclose(after[:, :, 3:3 + want.shape[-2]], before[:, :, 3:3 + want.shape[-2]] + 0.5 * want,
                               rtol=tol, atol=3 * tol)
    np.testing.assert_array_equal(after[:, :, :3], before[:, :, :3])                 # rows around: untouched
    np.testing.assert_array_equal(after[:, :, 3 + want.shape[-2]:], before[:, :, 3 + want.shape[-2]:])
    backend.bmm(a_dev, b_dev, trans_a, trans_b, out=out)
    np.testing.assert_allclose(to_numpy(out).astype(np.float64), want, rtol=tol, atol=tol)


def test_gemm_matches_matmul_cupy_fp16(xp):
    """On CuPy the cuBLAS path and cupy.matmul (which computes >= 3-D float16 in float32) agree."""
    if xp is np:
        pytest.skip("compares cuBLAS with cupy.matmul")
    rng = np.random.default_rng(1)
    a = xp.asarray(rng.standard_normal((4, 6, 64, 64)), dtype=np.float16)
    b = xp.asarray(rng.standard_normal((4, 6, 64, 128)), dtype=np.float16)
    np.testing.assert_allclose(to_numpy(backend.bmm(a, b)).astype(np.float32),
                               to_numpy(xp.matmul(a, b)).astype(np.float32), rtol=2e-3, atol=2e-2)


def test_batch_layout():
    x = np.zeros((2, 3, 10, 4), np.float32)
    assert backend._batch_layout(x) == (4, 40)
    assert backend._batch_layout(x[:, :, 2:7]) == (4, 40)
    assert backend._batch_layout(x[:1, :1]) == (4, 0)
    assert backend._batch_layout(x.swapaxes(-1, -2)) is None                  # columns not unit-stride
    qkv_ = np.zeros((2, 10, 3, 3, 4), np.float32).transpose(2, 0, 3, 1, 4)
    assert backend._batch_layout(qkv_[0]) is None                             # (B, NH) not one stride
    assert backend._batch_layout(np.zeros((3, 2, 5, 4)).transpose(1, 0, 2, 3)) is None


# ---- the CUDA kernels: their contract, checked on NumPy by a twin -------------------------------

class KernelTwin:
    """NumPy twin of ``attention_chunked.block_softmax_forward_cuda/_backward_cuda`` with the kernels'
    flat indexing (row w = bh*n + r, key c visible when c <= r + L - n, lse/D entry bh*Tq + i0 + r).
    Used to run attention_chunked.py's kernel branch on NumPy, and compared with the real kernels on
    CuPy."""

    @staticmethod
    def _rows(S, lse, i0):
        n, L = S.shape[-2:]
        Tq = lse.shape[-1]
        w = np.arange(S.size // L)
        bh, r = w // n, w % n
        visible = np.arange(L)[None, :] <= (r + L - n)[:, None]             # (R, L)
        return visible, bh * Tq + i0 + r

    @classmethod
    def block_softmax_forward_cuda(cls, S, P, lse, i0):
        xp = backend.get_array_module(S)
        visible, idx = cls._rows(S, lse, i0)
        s = xp.where(xp.asarray(visible), S.reshape(len(idx), -1), -np.inf)
        m = s.max(axis=1, keepdims=True)
        e = xp.exp(s - m)
        lsum = e.sum(axis=1, keepdims=True)
        P.reshape(len(idx), -1)[...] = (e / lsum).astype(P.dtype)
        lse.reshape(-1)[xp.asarray(idx)] = (m + xp.log(lsum))[:, 0]
        return P

    @classmethod
    def block_softmax_backward_cuda(cls, S, dP, lse, D, P, dS, i0):
        xp = backend.get_array_module(S)
        visible, idx = cls._rows(S, lse, i0)
        R = len(idx)
        ix = xp.asarray(idx)
        p = xp.where(xp.asarray(visible), xp.exp(S.reshape(R, -1) - lse.reshape(-1)[ix][:, None]), 0.0)
        ds = p * (dP.reshape(R, -1) - D.reshape(-1)[ix][:, None])
        P.reshape(R, -1)[...] = p.astype(P.dtype)
        dS.reshape(R, -1)[...] = ds.astype(dS.dtype)
        return P, dS


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_kernel_branch_with_twin(dtype, monkeypatch):
    """attention_chunked.py's kernel branch (buffers, in-place aliasing, lse/D indexing) run on NumPy
    with the twin in place of the CUDA kernels: same answers as the array branch. The kernel output
    buffers are filled with NaN, so an element the twin would leave unwritten shows."""
    arrays, dout = qkv(np, 6, 2, 3, 23, 27, 5, dtype=dtype)
    plain = run(chunked(6), arrays, dout)
    monkeypatch.setattr(attention_chunked, "_use_cuda_kernels", lambda xp, dt: True)
    monkeypatch.setattr(attention_chunked, "block_softmax_forward_cuda", KernelTwin.block_softmax_forward_cuda)
    monkeypatch.setattr(attention_chunked, "block_softmax_backward_cuda", KernelTwin.block_softmax_backward_cuda)
    monkeypatch.setattr(_cuda, "empty", lambda xp, shape, dt: xp.full(shape, np.nan, dt))
    with_kernels = run(chunked(6), arrays, dout)
    tol = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2}[dtype]
    for a, b in zip(with_kernels, plain):
        assert a.dtype == np.dtype(dtype)
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("n,L,i0,Tq", [(5, 9, 3, 8), (1, 1, 0, 1), (40, 40, 0, 40), (7, 70, 10, 17)])
def test_kernels_match_twin(xp, dtype, n, L, i0, Tq):
    """The CUDA kernels (CuPy only) against the twin, including P written into S in place."""
    if xp is np:
        pytest.skip("CUDA kernels")
    acc = _cuda.acc_dtype(dtype)
    rng = np.random.default_rng(n * 100 + L)
    S = xp.asarray(rng.standard_normal((2, 3, n, L)) * 4, dtype=acc)
    lse_k, lse_t = xp.full((2, 3, Tq), np.nan, acc), xp.full((2, 3, Tq), np.nan, acc)
    in_place = np.dtype(dtype) == acc                      # P written over (a copy of) S
    S_k = S.copy()
    P_k = S_k if in_place else xp.full(S.shape, np.nan, dtype)
    P_t = xp.full(S.shape, np.nan, dtype)
    attention_chunked.block_softmax_forward_cuda(S_k, P_k, lse_k, i0)
    KernelTwin.block_softmax_forward_cuda(S, P_t, lse_t, i0)
    tol = 1e-3 if dtype == "float16" else 1e-5 if acc == np.float32 else 1e-12
    np.testing.assert_allclose(to_numpy(P_k).astype(np.float64), to_numpy(P_t).astype(np.float64), atol=tol)
    np.testing.assert_allclose(to_numpy(lse_k)[..., i0:i0 + n], to_numpy(lse_t)[..., i0:i0 + n], rtol=tol, atol=tol)
    assert np.isnan(to_numpy(lse_k)[..., :i0]).all() and np.isnan(to_numpy(lse_k)[..., i0 + n:]).all()
    dP = xp.asarray(rng.standard_normal(S.shape), dtype=acc)
    D = xp.asarray(rng.standard_normal((2, 3, Tq)), dtype=acc)
    lse = lse_t.copy()
    outs = [(xp.full(S.shape, np.nan, dtype), xp.full(S.shape, np.nan, dtype)) for _ in range(2)]
    attention_chunked.block_softmax_backward_cuda(S, dP, lse, D, *outs[0], i0)
    KernelTwin.block_softmax_backward_cuda(S, dP, lse, D, *outs[1], i0)
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_allclose(to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64), rtol=tol, atol=tol)


def test_cupy_kernels_and_array_code_agree(xp, monkeypatch):
    """On CuPy the whole chunked path with kernels on and off (NPGPT_CUDA_KERNELS=0), float32 and float16."""
    if xp is np:
        pytest.skip("CUDA kernels")
    for dtype, tol in (("float32", 1e-5), ("float16", 1e-2)):
        arrays, dout = qkv(xp, 8, 2, 3, 70, 75, 32, dtype=dtype)
        monkeypatch.setenv("NPGPT_CUDA_KERNELS", "1")
        a = run(chunked(16), arrays, dout)
        monkeypatch.setenv("NPGPT_CUDA_KERNELS", "0")
        b = run(chunked(16), arrays, dout)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=tol, atol=tol)


# ---- timing (not a test) -------------------------------------------------------------------------

def _bench(Ts=(256, 1024), reps=5, B=8, NH=6, hs=64):
    import time
    impls = {"materialized": attention.attention_materialized, "chunked": attention.attention_chunked}
    for T in Ts:
        (q, k, v), dout = qkv(np, 0, B, NH, T, T, hs, dtype=np.float32)
        dout = dout.astype(np.float32)
        best = {name: [math.inf, math.inf] for name in impls}
        for _ in range(reps + 1):                            # interleaved; the first round warms up
            for name, fn in impls.items():
                ts = [Tensor(a, requires_grad=True) for a in (q, k, v)]
                t0 = time.perf_counter()
                out = fn(*ts)
                t1 = time.perf_counter()
                out.backward(dout)
                t2 = time.perf_counter()
                best[name] = [min(best[name][0], t1 - t0), min(best[name][1], t2 - t1)]
        for name, (f, b) in best.items():
            print(f"T={T:5d} {name:13s} forward {f * 1e3:7.1f} ms  backward {b * 1e3:7.1f} ms")


if __name__ == "__main__":
    import sys
    _bench(tuple(int(a) for a in sys.argv[1:]) or (256, 1024))
