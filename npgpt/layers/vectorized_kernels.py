"""Vectorized versions of layer norm's and cross-entropy's CUDA kernels: 16 bytes per load and store
(8 float16, 4 float32 or 2 float64 elements, ``VEC`` in ``_cuda.PRELUDE``), several elements per thread.

The math, argument lists and launch shapes are those of the kernels they copy (``layer_norm.py``'s
(N1)-(N7), ``cross_entropy.py``'s (X1)-(X4)); only the memory access differs: a lane reads ``VEC``
consecutive elements with one 128-bit instruction instead of one element per instruction. The
launchers in those two files pick a ``_vec`` kernel when the tuning table asks for it
(``tuning.TUNING["cupy"]["layer_norm_vectorized"]``, ``["cross_entropy_vectorized"]``) and the rows
split into whole vectors (C, or the logits' row stride, a multiple of VEC) with every array 16-byte
aligned (``_cuda.vectorizable``); otherwise the scalar kernels run.

Why a file of their own: they were candidate versions, kept apart as llm.c keeps kernel versions in
``dev/cuda`` until a benchmark picks one. On an H200 (2026-11-30, GPT-2 124M shapes, fp16) they won
(layer norm 0.094 vs 0.135 ms, cross-entropy 2.06 vs 3.58 ms: benchmarks/RESULTS.md, "GPU kernels
measured on the H200"), so both switches are on. They stay in this file because their layers' files
(``layer_norm.py``, ``cross_entropy.py``) would outgrow the 350-line budget with them.
Tested against float64 NumPy on a GPU (``tests/test_vectorized_kernels.py``), compiled with nvcc
without one (``tests/test_cuda_sources.py``).
"""
from . import _cuda

__all__ = ["LAYER_NORM_VEC_SOURCE", "CROSS_ENTROPY_VEC_SOURCE"]


# ---- layer norm: (N1)-(N7) -------------------------------------------------------------------------

LAYER_NORM_VEC_SOURCE = _cuda.register_source("raw", "layer_norm_vectorized", r"""
// npgpt_ln_fwd and npgpt_ln_bwd (layer_norm.py) with 16-byte loads and stores: VEC elements per lane (or per
// column thread) per step. Same arguments; the column sums still go through npgpt_ln_bwd_cols.
extern "C" __global__ void npgpt_ln_fwd_vec(const T* x, const T* w, const T* b, T* y, A* mean, A* rstd,
                                            int N, int C, A eps, int has_w, int has_b) {
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= N) return;
    const T* xr = x + r * C;
    A s = 0, v = 0;
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
        const Vec xv = load_vec(xr + c);
#pragma unroll
        for (int i = 0; i < VEC; i++) s += to_acc(xv.v[i]);
    }
    const A mu = warp_sum(s) / (A)C;
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
        const Vec xv = load_vec(xr + c);
#pragma unroll
        for (int i = 0; i < VEC; i++) { const A d = to_acc(xv.v[i]) - mu; v += d * d; }
    }
    const A rs = (A)1 / sq(warp_sum(v) / (A)C + eps);
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
        const Vec xv = load_vec(xr + c), wv = load_vec((has_w ? w : xr) + c), bv = load_vec((has_b ? b : xr) + c);
        Vec out;
#pragma unroll
        for (int i = 0; i < VEC; i++) {
            A o = (to_acc(xv.v[i]) - mu) * rs;
            if (has_w) o *= to_acc(wv.v[i]);
            if (has_b) o += to_acc(bv.v[i]);
            put(&out.v[i], o);
        }
        store_vec(y + r * C + c, out);
    }
    if (lane == 0) { mean[r] = mu; rstd[r] = rs; }
}

extern "C" __global__ void npgpt_ln_bwd_vec(const T* dout, const T* x, const T* w, const A* mean, const A* rstd,
                                            T* dinp, A* part_dw, A* part_db, int N, int C, int rows_per_block,
                                            int has_w, int need_dinp, int need_dwb) {
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int r0 = blockIdx.x * rows_per_block, r1 = min(r0 + rows_per_block, N);
    if (need_dinp) {
        for (int r = r0 + (threadIdx.x >> 5); r < r1; r += nw) {   // uniform over the warp
            const long long off = (long long)r * C;
            const A mu = mean[r], rs = rstd[r];
            A sg = 0, sgx = 0;
            for (int c = lane * VEC; c < C; c += 32 * VEC) {
                const Vec xv = load_vec(x + off + c), dv = load_vec(dout + off + c), wv = load_vec((has_w ? w : x) + c);
#pragma unroll
                for (int i = 0; i < VEC; i++) {
                    const A g = to_acc(dv.v[i]) * (has_w ? to_acc(wv.v[i]) : (A)1);
                    sg += g;
                    sgx += g * ((to_acc(xv.v[i]) - mu) * rs);
                }
            }
            const A mg = warp_sum(sg) / (A)C, mgx = warp_sum(sgx) / (A)C;
            for (int c = lane * VEC; c < C; c += 32 * VEC) {
                const Vec xv = load_vec(x + off + c), dv = load_vec(dout + off + c), wv = load_vec((has_w ? w : x) + c);
                Vec out;
#pragma unroll
                for (int i = 0; i < VEC; i++) {
                    const A g = to_acc(dv.v[i]) * (has_w ? to_acc(wv.v[i]) : (A)1);
                    put(&out.v[i], (g - mg - (to_acc(xv.v[i]) - mu) * rs * mgx) * rs);
                }
                store_vec(dinp + off + c, out);
            }
        }
    }
    if (need_dwb) {
        for (int c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
            A dw[VEC], db[VEC];
#pragma unroll
            for (int i = 0; i < VEC; i++) dw[i] = db[i] = 0;
            for (int r = r0; r < r1; r++) {
                const Vec xv = load_vec(x + (long long)r * C + c), dv = load_vec(dout + (long long)r * C + c);
                const A mu = mean[r], rs = rstd[r];
#pragma unroll
                for (int i = 0; i < VEC; i++) {
                    const A d = to_acc(dv.v[i]);
                    dw[i] += d * ((to_acc(xv.v[i]) - mu) * rs);
                    db[i] += d;
                }
            }
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                part_dw[(long long)blockIdx.x * C + c + i] = dw[i];
                part_db[(long long)blockIdx.x * C + c + i] = db[i];
            }
        }
    }
}
""")


# ---- cross-entropy: (X1)-(X4), after cross_entropy.py's source (lse_add, lse_merge, ce_kept) ------------

CROSS_ENTROPY_VEC_SOURCE = _cuda.register_source("raw", "cross_entropy_vectorized", r"""
// npgpt_ce_fwd and npgpt_ce_bwd with 16-byte loads (and stores): thread i reads columns [VEC i, VEC i + VEC)
// of each blockDim.x * VEC. Needs the row stride ld % VEC == 0 (then no vector crosses a row's end).
extern "C" __global__ void npgpt_ce_fwd_vec(const T* x, const long long* t, A* lse, A* losses, int V,
                                            long long ignore, int ld) {
    __shared__ A sm[32], ss[32];
    __shared__ A res[2];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const long long r = blockIdx.x;
    const T* xr = x + r * ld;
    A m = neg_inf((A)0), s = 0;
    for (int c = threadIdx.x * VEC; c < V; c += blockDim.x * VEC) {
        const Vec xv = load_vec(xr + c);
#pragma unroll
        for (int i = 0; i < VEC; i++) if (c + i < V) lse_add(m, s, to_acc(xv.v[i]));   // not the padding columns
    }
    for (int o = 16; o > 0; o >>= 1) lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    if (warp == 0) {
        m = lane < nw ? sm[lane] : neg_inf((A)0);
        s = lane < nw ? ss[lane] : (A)0;
        for (int o = 16; o > 0; o >>= 1) lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
        if (lane == 0) { res[0] = m; res[1] = s; }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const A l = res[0] + lg(res[1]);
        const long long tr = t[r];
        lse[r] = l;
        losses[r] = ce_kept(tr, V, ignore) ? l - to_acc(xr[tr]) : (A)0;
    }
}

extern "C" __global__ void npgpt_ce_bwd_vec(const T* x, const long long* t, const A* lse, const A* dloss,
                                            const A* inv_n, T* dx, int V, long long ignore, int ld) {
    const long long r = blockIdx.x;
    const long long tr = t[r];
    const bool kept = ce_kept(tr, V, ignore);
    const A scale = kept ? dloss[0] * inv_n[0] : (A)0;
    const A l = lse[r];
    const T* xr = x + r * ld;
    for (int c = threadIdx.x * VEC; c < ld; c += blockDim.x * VEC) {
        Vec out;
        if (kept) {
            const Vec xv = load_vec(xr + c);
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                const int j = c + i;
                put(&out.v[i], j < V ? (ex(to_acc(xv.v[i]) - l) - (j == tr ? (A)1 : (A)0)) * scale : (A)0);
            }
        } else {
#pragma unroll
            for (int i = 0; i < VEC; i++) put(&out.v[i], (A)0);
        }
        store_vec(dx + r * ld + c, out);
    }
}
""", needs=("cross_entropy",))
