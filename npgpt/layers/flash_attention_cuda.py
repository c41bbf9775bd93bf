"""The CUDA kernels of ``flash_attention.py`` (whose docstring derives (F1)-(F9)): FlashAttention-2
forward and backward on the tensor cores, float16 in, float32 accumulation, causal (end-aligned),
head sizes 32, 64 and 128. A file of its own only to keep ``flash_attention.py`` readable; the NumPy
emulation there has exactly these kernels' tiles and loops.

Tensor cores through ``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`` (inline PTX, sm_80+). The
fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4, t = lane % 4:

    A (16x16, f16)  a0: row g,   cols 2t, 2t+1      a1: row g+8, cols 2t, 2t+1
                    a2: row g,   cols 2t+8, 2t+9    a3: row g+8, cols 2t+8, 2t+9
    B (16x8, f16)   b0: rows 2t, 2t+1 of col g      b1: rows 2t+8, 2t+9 of col g
    C (16x8, f32)   c0, c1: row g, cols 2t, 2t+1    c2, c3: row g+8, cols 2t, 2t+1

(the lower-indexed half in the lower 16 bits of each register). So two C tiles side by side (16x16)
are, element for element, the A fragment of the next product: P = softmax(S) never leaves the
registers between S = Q K^T and O += P V (``acc_to_a``), as in FlashAttention-2.

Forward  (grid: query tiles x B*NH, 4 warps, each warp 16 query rows; BR = 64, BC = 64): Q
fragments stay in registers; K and V tiles of BC keys pass through shared memory; the running max m,
sum l and output O of each row live in registers ((F2)-(F4)); the tiles above the causal diagonal
are never loaded (F5); the last one is masked. Out: O (float16) and lse (float32, natural log).

The backward kernels, which share these helpers, are in ``flash_attention_cuda_backward.py``.
"""
import numpy as np

from ..backend import get_array_module
from . import _cuda
from ._cuda import cdiv, i32

__all__ = ["HEAD_SIZES", "BLOCK", "THREADS", "COMMON_SOURCE", "flash_forward_cuda", "kernel_applies",
           "readable_qkv"]

HEAD_SIZES = (32, 64, 128)
BLOCK = 64                 # BR of the forward, BC of both kernels: 4 warps x 16 rows (or keys)

# The device helpers both directions use: mma, fragment loads, quad reductions, tiles to shared memory.
COMMON_SOURCE = _cuda.register_source("raw", "flash_attention_common", r"""
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f
#define FA_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ void fa_mma(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {          // two floats -> f16x2
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}
__device__ __forceinline__ unsigned fa_pack_h(__half lo, __half hi) {
    __half2 h = __halves2half2(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}
__device__ __forceinline__ unsigned fa_ld32(const __half* p) { return *reinterpret_cast<const unsigned*>(p); }

// A fragment of the 16x16 block at (r0, c0) of a row-major matrix M (leading dimension ld).
__device__ __forceinline__ void fa_load_a(unsigned* a, const __half* M, int ld, int r0, int c0, int g, int t) {
    a[0] = fa_ld32(M + (r0 + g) * ld + c0 + 2 * t);
    a[1] = fa_ld32(M + (r0 + g + 8) * ld + c0 + 2 * t);
    a[2] = fa_ld32(M + (r0 + g) * ld + c0 + 2 * t + 8);
    a[3] = fa_ld32(M + (r0 + g + 8) * ld + c0 + 2 * t + 8);
}
// A fragment of A = M^T, A's 16x16 block at (m0, k0): A[m][k] = M[k][m].
__device__ __forceinline__ void fa_load_a_trans(unsigned* a, const __half* M, int ld, int m0, int k0, int g, int t) {
    const __half* p = M + (k0 + 2 * t) * ld + m0 + g;
    a[0] = fa_pack_h(p[0], p[ld]);
    a[1] = fa_pack_h(p[8], p[ld + 8]);
    a[2] = fa_pack_h(p[8 * ld], p[9 * ld]);
    a[3] = fa_pack_h(p[8 * ld + 8], p[9 * ld + 8]);
}
// B fragment (16x8) with B[k][n] = M[n0 + n][k0 + k]: M row-major, one row per column of B.
__device__ __forceinline__ void fa_load_b_rows(unsigned* b, const __half* M, int ld, int n0, int k0, int g, int t) {
    b[0] = fa_ld32(M + (n0 + g) * ld + k0 + 2 * t);
    b[1] = fa_ld32(M + (n0 + g) * ld + k0 + 2 * t + 8);
}
// B fragment (16x8) with B[k][n] = M[k0 + k][n0 + n]: M row-major, one row per row of B.
__device__ __forceinline__ void fa_load_b_cols(unsigned* b, const __half* M, int ld, int k0, int n0, int g, int t) {
    const __half* p = M + (k0 + 2 * t) * ld + n0 + g;
    b[0] = fa_pack_h(p[0], p[ld]);
    b[1] = fa_pack_h(p[8 * ld], p[9 * ld]);
}
// Two C tiles (16x8 each, columns 16kk .. 16kk+15 of the accumulators c) as the A fragment of k-block kk.
__device__ __forceinline__ void fa_acc_to_a(unsigned* a, const float (*c)[4], int kk) {
    a[0] = fa_pack(c[2 * kk][0], c[2 * kk][1]);
    a[1] = fa_pack(c[2 * kk][2], c[2 * kk][3]);
    a[2] = fa_pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = fa_pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}
__device__ __forceinline__ float fa_quad_max(float v) {     // over the 4 lanes holding one row
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float fa_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
// rows [r0, r0 + R) of one (T, HS) head (row stride ld_g) into shared memory (row stride LD); rows >= T are 0.
template <int R, int HS, int LD>
__device__ __forceinline__ void fa_tile_to_shared(__half* s, const __half* g, long long ld_g, int r0, int T) {
    for (int i = threadIdx.x; i < R * (HS / 8); i += blockDim.x) {
        const int r = i / (HS / 8), c = (i % (HS / 8)) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < T) v = *reinterpret_cast<const uint4*>(g + (r0 + r) * ld_g + c);
        *reinterpret_cast<uint4*>(s + r * LD + c) = v;
    }
}
// Strides (elements) of a (B, NH, T, HS) array: batch, head, row; the last axis is contiguous.
struct FaStrides { long long b, h, t; };
""")

_FORWARD_SOURCE = _cuda.register_source("raw", "flash_attention_forward", r"""
// ---- forward: (F1)-(F5) ---------------------------------------------------------------------------
// q (B, NH, Tq, HS) with strides (elements) qs = {batch, head, row}, k and v (B, NH, Tk, HS) with strides
// ks (the last axis contiguous, every stride a multiple of 8); o (B*NH, Tq, HS) and lse (B*NH, Tq)
// contiguous. Query i sees key j <= i + Tk - Tq.
template <int HS>
__device__ void fa_forward(const __half* q, const __half* k, const __half* v, __half* o, float* lse,
                           int NH, int Tq, int Tk, FaStrides qs, FaStrides ks, float scale) {
    constexpr int BR = 64, BC = 64, LD = HS + 8;
    __shared__ __align__(16) __half Ks[BC * LD];
    __shared__ __align__(16) __half Vs[BC * LD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, off = Tk - Tq;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;        // the longest rows (most tiles) start first
    const int r0 = q0 + warp * 16;                           // this warp's 16 rows
    const __half* qh = q + (bh / NH) * qs.b + (bh % NH) * qs.h;
    const long long kv_head = (bh / NH) * ks.b + (bh % NH) * ks.h;
    const __half *kh = k + kv_head, *vh = v + kv_head;
    const float scale2 = scale * FA_LOG2E;                   // scores in log2 units: e^x = 2^(x log2 e)

    unsigned qf[HS / 16][4];                                 // Q fragments, for the whole loop
#pragma unroll
    for (int kk = 0; kk < HS / 16; kk++) {
        const int ra = r0 + g, rb = r0 + g + 8, c = kk * 16 + 2 * t;
        qf[kk][0] = ra < Tq ? fa_ld32(qh + ra * qs.t + c) : 0u;
        qf[kk][1] = rb < Tq ? fa_ld32(qh + rb * qs.t + c) : 0u;
        qf[kk][2] = ra < Tq ? fa_ld32(qh + ra * qs.t + c + 8) : 0u;
        qf[kk][3] = rb < Tq ? fa_ld32(qh + rb * qs.t + c + 8) : 0u;
    }
    float acc[HS / 8][4];
#pragma unroll
    for (int dn = 0; dn < HS / 8; dn++) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.f;
    float m[2] = {FA_NEG_INF, FA_NEG_INF}, l[2] = {0.f, 0.f};  // rows g and g+8 (log2 units)

    const int last_key = min(q0 + BR, Tq) - 1 + off;         // (F5) the last key any row here sees
    const int n_tiles = min(last_key / BC + 1, (Tk + BC - 1) / BC);
    for (int j = 0; j < n_tiles; j++) {
        const int k0 = j * BC;
        __syncthreads();                                     // the last tile's readers are done
        fa_tile_to_shared<BC, HS, LD>(Ks, kh, ks.t, k0, Tk);
        fa_tile_to_shared<BC, HS, LD>(Vs, vh, ks.t, k0, Tk);
        __syncthreads();
        float s[BC / 8][4];                                  // (F1) S = Q K^T, this warp's 16 x BC
#pragma unroll
        for (int nt = 0; nt < BC / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HS / 16; kk++) {
                unsigned b[2];
                fa_load_b_rows(b, Ks, LD, nt * 8, kk * 16, g, t);
                fa_mma(s[nt], qf[kk], b);
            }
        }
#pragma unroll
        for (int nt = 0; nt < BC / 8; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int row = r0 + g + (i >> 1) * 8, col = k0 + nt * 8 + 2 * t + (i & 1);
                s[nt][i] = (col <= row + off && col < Tk) ? s[nt][i] * scale2 : FA_NEG_INF;   // (F5) mask
            }
#pragma unroll
        for (int h = 0; h < 2; h++) {                        // (F2)-(F3) online softmax of rows g, g+8
            float mx = FA_NEG_INF;
#pragma unroll
            for (int nt = 0; nt < BC / 8; nt++) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
            const float m_new = fmaxf(m[h], fa_quad_max(mx));
            const float base = m_new == FA_NEG_INF ? 0.f : m_new;   // a row that saw only masked keys
            const float alpha = exp2f(m[h] - base);          // e^(m_old - m_new); 0 when m_old = -inf
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < BC / 8; nt++) {
                s[nt][2 * h] = exp2f(s[nt][2 * h] - base);
                s[nt][2 * h + 1] = exp2f(s[nt][2 * h + 1] - base);
                sum += s[nt][2 * h] + s[nt][2 * h + 1];
            }
            l[h] = l[h] * alpha + fa_quad_sum(sum);
            m[h] = m_new;
#pragma unroll
            for (int dn = 0; dn < HS / 8; dn++) { acc[dn][2 * h] *= alpha; acc[dn][2 * h + 1] *= alpha; }
        }
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++) {               // (F4) O += P V, P straight from registers
            unsigned a[4];
            fa_acc_to_a(a, s, kk);
#pragma unroll
            for (int dn = 0; dn < HS / 8; dn++) {
                unsigned b[2];
                fa_load_b_cols(b, Vs, LD, kk * 16, dn * 8, g, t);
                fa_mma(acc[dn], a, b);
            }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {                            // O = acc / l, lse = (m + log2 l) ln 2
        const int row = r0 + g + h * 8;
        if (row >= Tq) continue;
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
        __half* orow = o + ((long long)bh * Tq + row) * HS;
#pragma unroll
        for (int dn = 0; dn < HS / 8; dn++)
            *reinterpret_cast<__half2*>(orow + dn * 8 + 2 * t) = __floats2half2_rn(acc[dn][2 * h] * inv, acc[dn][2 * h + 1] * inv);
        if (t == 0) lse[(long long)bh * Tq + row] = (m[h] + log2f(l[h])) * FA_LN2;
    }
}

// strides: q's (batch, head, row) then k's and v's, in elements
#define FA_FORWARD(HS) \
extern "C" __global__ void __launch_bounds__(128) npgpt_flash_fwd_##HS(const __half* q, const __half* k, \
        const __half* v, __half* o, float* lse, int NH, int Tq, int Tk, long long qb, long long qh, long long qt, \
        long long kb, long long kh, long long kt, float scale) { \
    fa_forward<HS>(q, k, v, o, lse, NH, Tq, Tk, FaStrides{qb, qh, qt}, FaStrides{kb, kh, kt}, scale); }
FA_FORWARD(32)
FA_FORWARD(64)
FA_FORWARD(128)
""", needs=("flash_attention_common",))

THREADS = 128            # 4 warps


def kernel_strides(a):
    """(batch, head, row) strides of a (B, NH, T, hs) float16 array, in elements, when the kernels
    can read it in place (last axis contiguous, 16-byte aligned rows and start), else None."""
    item = a.itemsize
    if a.strides[-1] != item or any(s < 0 or s % (8 * item) for s in a.strides[:-1]) or a.data.ptr % 16:
        return None
    return tuple(np.int64(s // item) for s in a.strides[:-1])


def readable_qkv(xp, q, k, v):
    """q, k, v as the kernels read them, with q's strides and the strides k and v share: the arrays
    themselves when possible (e.g. the q, k, v views of one fused qkv projection), else copies."""
    qs = kernel_strides(q)
    if qs is None:
        q = xp.ascontiguousarray(q)
        qs = kernel_strides(q)
    ks = kernel_strides(k)
    if ks is None or k.strides != v.strides:
        k, v = xp.ascontiguousarray(k), xp.ascontiguousarray(v)
        ks = kernel_strides(k)
    return q, k, v, qs, ks


def kernel_applies(q, k, v):
    """The CUDA kernels take these arrays: CuPy, float16, hs in HEAD_SIZES, equal (B, NH), Tq <= Tk,
    B * NH below the grid's y limit, kernels switched on (NPGPT_CUDA_KERNELS)."""
    xp = get_array_module(q)
    hs = q.shape[-1]
    return (xp is not np and _cuda.enabled() and q.ndim == 4 and hs in HEAD_SIZES
            and q.dtype == k.dtype == v.dtype == np.float16 and k.shape == v.shape
            and k.shape[:2] == q.shape[:2] and k.shape[-1] == hs and 0 < q.shape[-2] <= k.shape[-2]
            and 0 < q.shape[0] * q.shape[1] < 65536)


def flash_forward_cuda(q, k, v, scale):
    """(F1)-(F5) on CuPy: q (B, NH, Tq, hs), k and v (B, NH, Tk, hs) float16, any strides with a
    contiguous last axis -> (out (B, NH, Tq, hs) float16 contiguous, lse (B, NH, Tq) float32, the
    natural log of sum_j e^(S_ij) over the keys row i sees)."""
    xp = get_array_module(q)
    B, NH, Tq, hs = q.shape
    Tk = k.shape[-2]
    q, k, v, qs, ks = readable_qkv(xp, q, k, v)
    out = _cuda.empty(xp, (B, NH, Tq, hs), np.float16)
    lse = _cuda.empty(xp, (B, NH, Tq), np.float32)
    _cuda.raw_kernel(xp, f"npgpt_flash_fwd_{hs}", np.float16, COMMON_SOURCE + _FORWARD_SOURCE)(
        (cdiv(Tq, BLOCK), B * NH), (THREADS,),
        (q, k, v, out, lse, i32(NH), i32(Tq), i32(Tk), *qs, *ks, np.float32(scale)))
    return out, lse
