"""The backward kernels of ``flash_attention.py``'s FlashAttention-2 ((F6)-(F9) of its docstring) on the
tensor cores, with the device helpers and fragment layouts of ``flash_attention_cuda.py`` (the forward).

Backward (grid: key tiles x B*NH, 4 warps, each warp 16 keys; BC = 64, BR = 64, or 16 for hs=128 so
shared memory stays under 48 KiB): K and V of the tile in shared memory, the dK and dV of its keys in
registers; it walks the query tiles from the diagonal down ((F6)-(F9)), P recomputed from lse, and
adds its share of dQ = dS K / sqrt(hs) to a float32 buffer with atomicAdd; ``npgpt_flash_cast``
rounds that buffer to float16 at the end. D = rowsum(dO * O) comes first (``npgpt_flash_bwd_dot``).

A file of its own only to keep each kernel file short; the NumPy emulation in ``flash_attention.py``
has exactly these tiles and loops.
"""
import numpy as np

from ..backend import get_array_module
from . import _cuda
from ._cuda import cdiv, i32
from .flash_attention_cuda import BLOCK, COMMON_SOURCE, THREADS, readable_qkv

__all__ = ["backward_block_rows", "flash_backward_cuda"]


def backward_block_rows(hs):
    """BR of the backward: 64, or 16 for hs=128 (its K, V, Q, dO and dS tiles then fit in 48 KiB)."""
    return 16 if hs > 64 else 64


_BACKWARD_SOURCE = _cuda.register_source("raw", "flash_attention_backward", r"""
// ---- backward: (F6)-(F9) --------------------------------------------------------------------------
// D[r] = sum_d dO[r, d] O[r, d] (F7), one warp per row of the contiguous (R, HS) arrays.
extern "C" __global__ void npgpt_flash_bwd_dot(const __half* dout, const __half* out, float* D, long long R, int HS) {
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= R) return;
    float s = 0.f;
    for (int c = threadIdx.x & 31; c < HS; c += 32) s += __half2float(dout[r * HS + c]) * __half2float(out[r * HS + c]);
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) D[r] = s;
}

// dq32 (float32, zeroed) += dS K scale; dk, dv (B*NH, Tk, HS) contiguous float16; q, k, v strided as in the
// forward; dout and dq32 (B*NH, Tq, HS), lse and D (B*NH, Tq) contiguous.
template <int HS, int BR>
__device__ void fa_backward(const __half* q, const __half* k, const __half* v, const __half* dout,
                            const float* lse, const float* D, float* dq32, __half* dk, __half* dv,
                            int NH, int Tq, int Tk, FaStrides qs, FaStrides ks, float scale) {
    constexpr int BC = 64, LD = HS + 8, LDS = BR + 8;
    constexpr int NWR = BR / 16, NWC = 4 / NWR, DW = HS / NWC;  // the dQ tile split over the 4 warps
    __shared__ __align__(16) __half Ks[BC * LD];
    __shared__ __align__(16) __half Vs[BC * LD];
    __shared__ __align__(16) __half Qs[BR * LD];
    __shared__ __align__(16) __half dOs[BR * LD];
    __shared__ __align__(16) __half dSs[BC * LDS];         // dS^T of the tile: (keys, queries)
    __shared__ float Ls[BR], Ds[BR];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, off = Tk - Tq, k0 = blockIdx.x * BC, kw = warp * 16;
    const __half* qh = q + (bh / NH) * qs.b + (bh % NH) * qs.h;
    const long long kv_head = (bh / NH) * ks.b + (bh % NH) * ks.h;
    const float scale2 = scale * FA_LOG2E;
    fa_tile_to_shared<BC, HS, LD>(Ks, k + kv_head, ks.t, k0, Tk);
    fa_tile_to_shared<BC, HS, LD>(Vs, v + kv_head, ks.t, k0, Tk);
    float dka[HS / 8][4], dva[HS / 8][4];
#pragma unroll
    for (int dn = 0; dn < HS / 8; dn++)
#pragma unroll
        for (int i = 0; i < 4; i++) dka[dn][i] = dva[dn][i] = 0.f;

    const __half* dout_h = dout + (long long)bh * Tq * HS;
    for (int q0 = max(0, k0 - off) / BR * BR; q0 < Tq; q0 += BR) {   // (F6) tiles at or below the diagonal
        __syncthreads();                                     // the last tile's readers are done
        fa_tile_to_shared<BR, HS, LD>(Qs, qh, qs.t, q0, Tq);
        fa_tile_to_shared<BR, HS, LD>(dOs, dout_h, HS, q0, Tq);
        for (int i = threadIdx.x; i < BR; i += blockDim.x) {
            const bool in = q0 + i < Tq;
            Ls[i] = in ? lse[(long long)bh * Tq + q0 + i] * FA_LOG2E : 0.f;
            Ds[i] = in ? D[(long long)bh * Tq + q0 + i] : 0.f;
        }
        __syncthreads();
        float s[BR / 8][4], dp[BR / 8][4];                   // S^T and dP^T: this warp's 16 keys x BR queries
#pragma unroll
        for (int nt = 0; nt < BR / 8; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) s[nt][i] = dp[nt][i] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HS / 16; kk++) {
            unsigned ak[4], av[4];
            fa_load_a(ak, Ks, LD, kw, kk * 16, g, t);
            fa_load_a(av, Vs, LD, kw, kk * 16, g, t);
#pragma unroll
            for (int nt = 0; nt < BR / 8; nt++) {
                unsigned b[2];
                fa_load_b_rows(b, Qs, LD, nt * 8, kk * 16, g, t);
                fa_mma(s[nt], ak, b);                        // S^T = K Q^T
                fa_load_b_rows(b, dOs, LD, nt * 8, kk * 16, g, t);
                fa_mma(dp[nt], av, b);                       // dP^T = V dO^T
            }
        }
#pragma unroll
        for (int nt = 0; nt < BR / 8; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {                    // (F6) P = e^(S - lse), (F8) dS = P (dP - D)
                const int key = k0 + kw + g + (i >> 1) * 8, qi = nt * 8 + 2 * t + (i & 1);
                const bool seen = q0 + qi < Tq && key < Tk && key <= q0 + qi + off;
                const float p = seen ? exp2f(s[nt][i] * scale2 - Ls[qi]) : 0.f;
                s[nt][i] = p;
                dp[nt][i] = p * (dp[nt][i] - Ds[qi]);
                dSs[(kw + g + (i >> 1) * 8) * LDS + qi] = __float2half_rn(dp[nt][i]);
            }
#pragma unroll
        for (int kk = 0; kk < BR / 16; kk++) {               // (F9) dV += P^T dO, dK += dS^T Q
            unsigned ap[4], ads[4];
            fa_acc_to_a(ap, s, kk);
            fa_acc_to_a(ads, dp, kk);
#pragma unroll
            for (int dn = 0; dn < HS / 8; dn++) {
                unsigned b[2];
                fa_load_b_cols(b, dOs, LD, kk * 16, dn * 8, g, t);
                fa_mma(dva[dn], ap, b);
                fa_load_b_cols(b, Qs, LD, kk * 16, dn * 8, g, t);
                fa_mma(dka[dn], ads, b);
            }
        }
        __syncthreads();                                     // dS^T of all 4 warps is in shared memory
        const int rr = (warp % NWR) * 16, dc = (warp / NWR) * DW;
        float dqa[DW / 8][4];                                // (F9) dQ += dS K: 16 rows x DW dims per warp
#pragma unroll
        for (int dn = 0; dn < DW / 8; dn++) dqa[dn][0] = dqa[dn][1] = dqa[dn][2] = dqa[dn][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++) {
            unsigned a[4];
            fa_load_a_trans(a, dSs, LDS, rr, kk * 16, g, t);
#pragma unroll
            for (int dn = 0; dn < DW / 8; dn++) {
                unsigned b[2];
                fa_load_b_cols(b, Ks, LD, kk * 16, dc + dn * 8, g, t);
                fa_mma(dqa[dn], a, b);
            }
        }
#pragma unroll
        for (int dn = 0; dn < DW / 8; dn++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int row = q0 + rr + g + (i >> 1) * 8;
                if (row < Tq) atomicAdd(dq32 + ((long long)bh * Tq + row) * HS + dc + dn * 8 + 2 * t + (i & 1),
                                        dqa[dn][i] * scale);
            }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {                            // dK = scale dS^T Q, dV = P^T dO
        const int key = k0 + kw + g + h * 8;
        if (key >= Tk) continue;
        const long long base = ((long long)bh * Tk + key) * HS;
#pragma unroll
        for (int dn = 0; dn < HS / 8; dn++) {
            *reinterpret_cast<__half2*>(dk + base + dn * 8 + 2 * t) = __floats2half2_rn(dka[dn][2 * h] * scale, dka[dn][2 * h + 1] * scale);
            *reinterpret_cast<__half2*>(dv + base + dn * 8 + 2 * t) = __floats2half2_rn(dva[dn][2 * h], dva[dn][2 * h + 1]);
        }
    }
}

extern "C" __global__ void npgpt_flash_cast(const float* a, __half* b, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        b[i] = __float2half_rn(a[i]);
}

#define FA_BACKWARD(HS, BR) \
extern "C" __global__ void __launch_bounds__(128) npgpt_flash_bwd_##HS(const __half* q, const __half* k, \
        const __half* v, const __half* dout, const float* lse, const float* D, float* dq32, __half* dk, __half* dv, \
        int NH, int Tq, int Tk, long long qb, long long qh, long long qt, long long kb, long long kh, long long kt, \
        float scale) { \
    fa_backward<HS, BR>(q, k, v, dout, lse, D, dq32, dk, dv, NH, Tq, Tk, FaStrides{qb, qh, qt}, \
                        FaStrides{kb, kh, kt}, scale); }
FA_BACKWARD(32, 64)
FA_BACKWARD(64, 64)
FA_BACKWARD(128, 16)
""", needs=("flash_attention_common",))


def flash_backward_cuda(q, k, v, out, lse, dout, scale):
    """(F6)-(F9) on CuPy: the forward's inputs, its out and lse, and dout (B, NH, Tq, hs) -> (dq, dk,
    dv) float16 contiguous; dq accumulates over the key tiles in float32 and is rounded once."""
    xp = get_array_module(q)
    B, NH, Tq, hs = q.shape
    Tk = k.shape[-2]
    q, k, v, qs, ks = readable_qkv(xp, q, k, v)
    out, dout = xp.ascontiguousarray(out), xp.ascontiguousarray(dout, dtype=np.float16)
    R = B * NH * Tq
    D = _cuda.empty(xp, (B, NH, Tq), np.float32)
    _cuda.raw_kernel(xp, "npgpt_flash_bwd_dot", np.float16, COMMON_SOURCE + _BACKWARD_SOURCE)(
        (cdiv(R, THREADS // 32),), (THREADS,), (dout, out, D, np.int64(R), i32(hs)))
    dq32 = xp.zeros((B, NH, Tq, hs), np.float32)             # the atomicAdd target: zeroed
    dk = _cuda.empty(xp, (B, NH, Tk, hs), np.float16)
    dv = _cuda.empty(xp, (B, NH, Tk, hs), np.float16)
    _cuda.raw_kernel(xp, f"npgpt_flash_bwd_{hs}", np.float16, COMMON_SOURCE + _BACKWARD_SOURCE)(
        (cdiv(Tk, BLOCK), B * NH), (THREADS,),
        (q, k, v, dout, lse, D, dq32, dk, dv, i32(NH), i32(Tq), i32(Tk), *qs, *ks, np.float32(scale)))
    dq = _cuda.empty(xp, (B, NH, Tq, hs), np.float16)
    _cuda.raw_kernel(xp, "npgpt_flash_cast", np.float16, COMMON_SOURCE + _BACKWARD_SOURCE)(
        (min(cdiv(dq.size, 256), 4096),), (256,), (dq32, dq, np.int64(dq.size)))
    return dq, dk, dv
