/* Device kernels of the CUDA backend, one per operation of the decode path
 * (spec model.md §3–§5). Each mirrors a CPU reference routine (src/cpu,
 * src/quant) operation by operation; only accumulation orders differ (tree
 * reductions instead of sequential sums), so results agree to f32 rounding.
 *
 * Conventions: one token per launch (decode; prefill loops over tokens), f32
 * activations, weights read in their quantised form. A "block helper" works
 * on a shared-memory vector with thread i owning element i (blockDim ≥ n). */
#ifndef DS4_CUDA_KERNELS_CUH
#define DS4_CUDA_KERNELS_CUH
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#define GT_F32 0
#define GT_F16 1
#define GT_Q8_0 8
#define GT_Q2_K 10
#define GT_Q4_K 12
#define GT_IQ2_XXS 16

#define MV_WARPS 4             /* rows per matvec block: one warp per row */
#define MAX_HC 16

/* The decode step's inputs live in device memory, so one captured CUDA graph
 * replays for every position: kernels read the position and token here and
 * derive window bounds, ring slots, block emission and row counts from it. */
typedef struct {
    uint32_t pos;
    int32_t tok;
} dstep;

/* IQ2_XXS tables, copied from src/quant at backend creation. */
__device__ uint64_t d_iq2_grid[256];
__device__ uint8_t d_iq2_signs[128];

/* Aligned little-endian loads: block layouts keep these offsets 2- or
 * 4-byte aligned (tensor data is 32-byte aligned, see cuda_create), so each
 * is one instruction instead of a byte-by-byte gather. */
__device__ __forceinline__ float ld_f16a(const uint8_t *p) { return __half2float(__ushort_as_half(*(const unsigned short *)p)); }
__device__ __forceinline__ uint32_t ld_u32h(const uint8_t *p) {   /* 2-byte aligned */
    const unsigned short *h = (const unsigned short *)p;
    return (uint32_t)h[0] | (uint32_t)h[1] << 16;
}
__device__ __forceinline__ float round_f16(float x) { return __half2float(__float2half_rn(x)); }

/* Elements 8c … 8c+7 of a row, dequantised with the same formulas as
 * src/quant (fmaf(dl, q, −ml) for K-quants). Every supported block size is a
 * multiple of 8, so an 8-wide chunk never straddles two blocks: 32 lanes take
 * 32 consecutive chunks and together cover a 256-element super-block. */
__device__ __forceinline__ void deq_chunk(int type, const uint8_t *row, int64_t c, float *v) {
    switch (type) {
    case GT_F32: {
        const float4 *p = (const float4 *)(row + 32 * c);
        float4 a = p[0], b = p[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        return;
    }
    case GT_F16: {
        uint4 u = *(const uint4 *)(row + 16 * c);   /* one 16-byte load */
        const __half2 *h = (const __half2 *)&u;
        for (int k = 0; k < 4; k++) {
            float2 f = __half22float2(h[k]);
            v[2 * k] = f.x; v[2 * k + 1] = f.y;
        }
        return;
    }
    case GT_Q8_0: {   /* 34-byte blocks: scale and quants 2-byte aligned */
        const uint8_t *b = row + (c >> 2) * 34;
        float d = ld_f16a(b);
        uint32_t lo = ld_u32h(b + 2 + 8 * (c & 3)), hi = ld_u32h(b + 6 + 8 * (c & 3));
        for (int k = 0; k < 4; k++) {
            v[k] = d * (float)(int8_t)(lo >> 8 * k);
            v[4 + k] = d * (float)(int8_t)(hi >> 8 * k);
        }
        return;
    }
    case GT_Q2_K: {
        const uint8_t *b = row + (c >> 5) * 84;
        int e0 = (int)(c & 31) * 8, h = e0 >> 7, s = (e0 >> 5) & 3, half = (e0 >> 4) & 1, sub = (e0 >> 3) & 1;
        int j = 8 * h + 2 * s + half;
        /* 84-byte blocks are 4-byte aligned: d|dmin and each 8 quants as words */
        uint32_t dd = *(const uint32_t *)(b + 80);
        float d = __half2float(__ushort_as_half((unsigned short)dd)), dmin = __half2float(__ushort_as_half((unsigned short)(dd >> 16)));
        float dl = d * (float)(b[j] & 15), ml = dmin * (float)(b[j] >> 4);
        const uint32_t *q = (const uint32_t *)(b + 16 + 32 * h + 16 * half + 8 * sub);
        uint32_t q0 = q[0], q1 = q[1];
        for (int k = 0; k < 4; k++) {
            v[k] = fmaf(dl, (float)((q0 >> (8 * k + 2 * s)) & 3), -ml);
            v[4 + k] = fmaf(dl, (float)((q1 >> (8 * k + 2 * s)) & 3), -ml);
        }
        return;
    }
    case GT_Q4_K: {
        const uint8_t *b = row + (c >> 5) * 144;
        int e0 = (int)(c & 31) * 8, cc = e0 >> 6, h = (e0 >> 5) & 1, k0 = e0 & 31, j = 2 * cc + h;
        const uint8_t *s = b + 4;
        int sc, mn;
        if (j < 4) { sc = s[j] & 63; mn = s[j + 4] & 63; }
        else { sc = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4; mn = (s[j + 4] >> 4) | (s[j] >> 6) << 4; }
        uint32_t dd = *(const uint32_t *)b;
        float dl = __half2float(__ushort_as_half((unsigned short)dd)) * (float)sc;
        float ml = __half2float(__ushort_as_half((unsigned short)(dd >> 16))) * (float)mn;
        uint2 q = *(const uint2 *)(b + 16 + 32 * cc + k0);   /* 144-byte blocks: 8-byte aligned */
        for (int k = 0; k < 4; k++) {
            v[k] = fmaf(dl, (float)((q.x >> (8 * k + 4 * h)) & 15), -ml);
            v[4 + k] = fmaf(dl, (float)((q.y >> (8 * k + 4 * h)) & 15), -ml);
        }
        return;
    }
    case GT_IQ2_XXS: {
        const uint8_t *b = row + (c >> 5) * 66;
        int e0 = (int)(c & 31) * 8, ib = e0 >> 5, l = (e0 >> 3) & 3;
        uint32_t A = ld_u32h(b + 2 + 8 * ib), B = ld_u32h(b + 6 + 8 * ib);   /* 66-byte blocks: 2-byte aligned */
        float db = ld_f16a(b) * (0.5f + (float)(B >> 28)) * 0.25f;
        uint64_t g = d_iq2_grid[(A >> 8 * l) & 255];
        uint8_t sg = d_iq2_signs[(B >> 7 * l) & 127];
        for (int k = 0; k < 8; k++) {
            float m = (float)((g >> 8 * k) & 255);
            v[k] = db * ((sg >> k) & 1 ? -m : m);
        }
        return;
    }
    default:
        for (int k = 0; k < 8; k++) v[k] = __int_as_float(0x7fc00000);   /* unsupported: NaN, never silent */
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Σ v[i]² in double over n floats (n % 4 == 0, v 16-byte aligned), this
 * thread's share: float4 loads, unrolled, so a thread has many loads in
 * flight instead of one latency-bound chain (the first version spent 30 µs
 * per HC mix here). */
__device__ __forceinline__ double sumsq_part(const float *v, int64_t n) {
    const float4 *p = (const float4 *)v;
    double a = 0, b = 0;
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < n / 4; i += blockDim.x) {
        float4 x = p[i];
        a += (double)x.x * x.x + (double)x.y * x.y;
        b += (double)x.z * x.z + (double)x.w * x.w;
    }
    return a + b;
}

/* Block-wide sums/max (any blockDim multiple of 32, ≤ 1024). sh: 32 slots. */
__device__ double block_sum_d(double v, double *sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (!lane) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0;
    return warp_sum_d(v);
}
__device__ float block_sum(float v, float *sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (!lane) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}
__device__ float block_max(float v, float *sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (!lane) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -INFINITY;
    return warp_max(v);
}

/* ---- quantised matvec ---------------------------------------------------------
 * acc += W[row] chunk c · x[8c … 8c+7]. */
__device__ __forceinline__ float chunk_fma(int type, const uint8_t *w, int64_t c, const float *x, float acc) {
    float v[8];
    deq_chunk(type, w, c, v);
    const float4 *xp = (const float4 *)(x + 8 * c);
    float4 a = xp[0], b = xp[1];
    acc = fmaf(v[0], a.x, acc); acc = fmaf(v[1], a.y, acc); acc = fmaf(v[2], a.z, acc); acc = fmaf(v[3], a.w, acc);
    acc = fmaf(v[4], b.x, acc); acc = fmaf(v[5], b.y, acc); acc = fmaf(v[6], b.z, acc); acc = fmaf(v[7], b.w, acc);
    return acc;
}

/* Σ over chunks start, start+step, … < nch of one row: the switch sits
 * outside the loop, so each case is a loop specialised for its format (the
 * constant type folds deq_chunk's switch) and the unrolled loads of several
 * chunks are in flight together. */
#define ROW_LOOP(T)                                                                  \
    {                                                                                \
        _Pragma("unroll 4") for (int64_t c = start; c < nch; c += step) acc = chunk_fma(T, w, c, x, acc); \
        return acc;                                                                  \
    }
__device__ __forceinline__ float row_dot(int type, const uint8_t *w, int64_t nch, const float *x, int start, int step) {
    float acc = 0;
    switch (type) {
    case GT_F32: ROW_LOOP(GT_F32)
    case GT_F16: ROW_LOOP(GT_F16)
    case GT_Q8_0: ROW_LOOP(GT_Q8_0)
    case GT_Q2_K: ROW_LOOP(GT_Q2_K)
    case GT_Q4_K: ROW_LOOP(GT_Q4_K)
    case GT_IQ2_XXS: ROW_LOOP(GT_IQ2_XXS)
    default: return __int_as_float(0x7fc00000);
    }
}

/* y[slot·y_slot + r] = W_e[r] · x, one warp per row, lanes over 8-element
 * chunks, f32 accumulation. blockIdx.y = slot: when eid != NULL the slot's
 * expert eid[slot] picks the weight matrix (estride bytes apart), so every
 * routed expert of a token runs in one launch without the host knowing ids.
 * Row r reads x + slot·x_slot + (r / xg_rows)·xg_stride (grouped output
 * projection, spec §4.4; xg_rows = 0: one x). Unrolled so several chunk
 * loads are in flight per lane (decode is bound by load latency × bytes). */
__global__ void k_matvec(int type, const uint8_t *__restrict__ W, uint64_t rb, int64_t n_in, int64_t rows,
                         const float *__restrict__ x, int64_t xg_rows, int64_t xg_stride, float *__restrict__ y,
                         const int32_t *__restrict__ eid, uint64_t estride, int64_t x_slot, int64_t y_slot) {
    int slot = blockIdx.y, lane = threadIdx.x & 31;
    int64_t r = (int64_t)blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (r >= rows) return;
    const uint8_t *w = W + (eid ? (uint64_t)eid[slot] * estride : 0) + (uint64_t)r * rb;
    const float *xx = x + slot * x_slot + (xg_rows ? (r / xg_rows) * xg_stride : 0);
    float acc = warp_sum(row_dot(type, w, n_in / 8, xx, lane, 32));
    if (!lane) y[slot * y_slot + r] = acc;
}

/* Few long rows (HC mixers: 24 rows of hc·n_embd; router, indexer weights):
 * one block per row so the whole GPU streams the matrix. */
__global__ void k_matvec_wide(int type, const uint8_t *__restrict__ W, uint64_t rb, int64_t n_in,
                              const float *__restrict__ x, float *__restrict__ y) {
    __shared__ float sh[32];
    const uint8_t *w = W + (uint64_t)blockIdx.x * rb;
    float acc = block_sum(row_dot(type, w, n_in / 8, x, threadIdx.x, blockDim.x), sh);
    if (threadIdx.x == 0) y[blockIdx.x] = acc;
}

/* Embedding of a token whose id lives in device memory. */
__global__ void k_embed(int type, const uint8_t *tab, uint64_t rb, const int32_t *tok, int64_t n, float *out,
                        int copies) {
    int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n / 8) return;
    float v[8];
    deq_chunk(type, tab + (uint64_t)tok[0] * rb, c, v);
    for (int a = 0; a < copies; a++)
        for (int k = 0; k < 8; k++) out[a * n + 8 * c + k] = v[k];
}

/* ---- scalar helpers, identical formulas to src/cpu/kernels.c -------------- */

__device__ __forceinline__ float pow2_ceil(float v) {
    int e;
    float m = frexpf(v, &e);
    return ldexpf(1.0f, m == 0.5f ? e - 1 : e);
}
__device__ __forceinline__ float e4m3_round(float x) {
    float a = fabsf(x);
    if (a == 0) return x;
    int e;
    frexpf(a, &e);
    int qexp = a < 0x1p-6f ? -9 : (e - 1) - 3;
    float q = ldexpf(1.0f, qexp);
    return copysignf(rintf(a / q) * q, x);
}
__device__ __forceinline__ float e2m1_round(float x) {
    float a = fabsf(x), r;
    if (a <= 0.25f) r = 0;
    else if (a < 0.75f) r = 0.5f;
    else if (a <= 1.25f) r = 1;
    else if (a < 1.75f) r = 1.5f;
    else if (a <= 2.5f) r = 2;
    else if (a < 3.5f) r = 3;
    else if (a <= 5.0f) r = 4;
    else r = 6;
    return copysignf(r, x);
}
__device__ __forceinline__ float sigmoidf_d(float x) { return 1.0f / (1.0f + expf(-x)); }

/* ---- block helpers on shared vectors (thread i owns element i) -------------- */

/* v ← v / sqrt(mean(v²) + eps) ⊙ w (w may be NULL); sum of squares in double. */
__device__ void blk_rmsnorm(float *v, int n, const float *w, float eps, double *shd) {
    int i = threadIdx.x;
    double ss = 0;
    for (int k = i; k < n; k += blockDim.x) ss += (double)v[k] * v[k];
    ss = block_sum_d(ss, shd);
    float r = (float)(1.0 / sqrt(ss / (double)n + eps));
    __syncthreads();
    for (int k = i; k < n; k += blockDim.x) v[k] = w ? v[k] * r * w[k] : v[k] * r;
    __syncthreads();
}

/* Rotate interleaved pairs of x[0 … 2·np) by ±pos·freq[k] (double angle, as the CPU). */
__device__ void blk_rope(float *x, int np, const double *freq, int64_t pos, bool inverse) {
    for (int k = threadIdx.x; k < np; k += blockDim.x) {
        double ang = (double)pos * freq[k];
        if (inverse) ang = -ang;
        float c = (float)cos(ang), s = (float)sin(ang);
        float x0 = x[2 * k], x1 = x[2 * k + 1];
        x[2 * k] = x0 * c - x1 * s;
        x[2 * k + 1] = x0 * s + x1 * c;
    }
    __syncthreads();
}

/* FP8 E4M3 simulation in blocks of 64 (spec §3.3). */
__device__ void blk_fp8(float *x, int n) {
    float r[4];
    int cnt = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        int b = i & ~63;
        float amax = 0;
        for (int k = 0; k < 64; k++) amax = fmaxf(amax, fabsf(x[b + k]));
        amax = fmaxf(amax, 1e-4f);
        float s = pow2_ceil(amax / 448.0f), v = x[i] / s;
        v = v > 448.0f ? 448.0f : v < -448.0f ? -448.0f : v;
        r[cnt++ & 3] = e4m3_round(v) * s;
    }
    __syncthreads();
    cnt = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = r[cnt++ & 3];
    __syncthreads();
}

/* Walsh–Hadamard ×1/sqrt(n) then FP4 (E2M1) in blocks of 32 (spec §3.4).
 * n a power of two ≤ 2·blockDim. */
__device__ void blk_fp4(float *x, int n) {
    for (int st = 1; st < n; st *= 2) {
        for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
            int i = (t / st) * 2 * st + t % st;
            float a = x[i], c = x[i + st];
            x[i] = a + c;
            x[i + st] = a - c;
        }
        __syncthreads();
    }
    float sc = (float)(1.0 / sqrt((double)n));
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] *= sc;
    __syncthreads();
    float r[4];
    int cnt = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        int b = i & ~31;
        float amax = 0;
        for (int k = 0; k < 32; k++) amax = fmaxf(amax, fabsf(x[b + k]));
        amax = fmaxf(amax, 6.0f * 0x1p-126f);
        float s = pow2_ceil(amax / 6.0f), v = x[i] / s;
        v = v > 6.0f ? 6.0f : v < -6.0f ? -6.0f : v;
        r[cnt++ & 3] = e2m1_round(v) * s;
    }
    __syncthreads();
    cnt = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = r[cnt++ & 3];
    __syncthreads();
}

/* ---- hyper-connections (spec §4.2, §4.3, §4.8) ------------------------------ */

/* cpu_hc_coeffs, by one thread. */
__device__ void hc_coeffs(const float *mix, const float *scale, const float *base, int hc, int iters, float eps,
                          float *pre, float *post, float *comb) {
    for (int a = 0; a < hc; a++) {
        pre[a] = sigmoidf_d(mix[a] * scale[0] + base[a]) + eps;
        post[a] = 2.0f * sigmoidf_d(mix[hc + a] * scale[1] + base[hc + a]);
    }
    for (int a = 0; a < hc; a++) {
        float *row = comb + a * hc, m = -INFINITY, s = 0;
        for (int c = 0; c < hc; c++) {
            row[c] = mix[2 * hc + a * hc + c] * scale[2] + base[2 * hc + a * hc + c];
            m = fmaxf(m, row[c]);
        }
        for (int c = 0; c < hc; c++) { row[c] = expf(row[c] - m); s += row[c]; }
        for (int c = 0; c < hc; c++) row[c] = row[c] / s + eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0)
            for (int a = 0; a < hc; a++) {
                float s = 0;
                for (int c = 0; c < hc; c++) s += comb[a * hc + c];
                for (int c = 0; c < hc; c++) comb[a * hc + c] /= s + eps;
            }
        for (int c = 0; c < hc; c++) {
            float s = 0;
            for (int a = 0; a < hc; a++) s += comb[a * hc + c];
            for (int a = 0; a < hc; a++) comb[a * hc + c] /= s + eps;
        }
    }
}

/* The same coefficients by one warp, lane a·hc + c owning comb[a][c]: row
 * sums over lane groups of hc, column sums over lanes hc apart (xor
 * shuffles), so hc must be a power of two with hc² ≤ 32 (the model's 4).
 * Sums are trees instead of the CPU's left-to-right: f32 rounding apart. */
__device__ void hc_coeffs_warp(const float *mix, const float *scale, const float *base, int hc, int iters, float eps,
                               float *pre, float *post, float *comb) {
    int lane = threadIdx.x & 31, n2 = hc * hc;
    if (lane < hc) {
        pre[lane] = sigmoidf_d(mix[lane] * scale[0] + base[lane]) + eps;
        post[lane] = 2.0f * sigmoidf_d(mix[hc + lane] * scale[1] + base[hc + lane]);
    }
    float v = lane < n2 ? mix[2 * hc + lane] * scale[2] + base[2 * hc + lane] : 0.0f;
    float m = v;
    for (int o = 1; o < hc; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float e = expf(v - m), sum = e;
    for (int o = 1; o < hc; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    v = e / sum + eps;
    for (int it = 0; it < iters; it++) {
        if (it > 0) {
            float rs = v;
            for (int o = 1; o < hc; o <<= 1) rs += __shfl_xor_sync(0xffffffffu, rs, o);
            v /= rs + eps;
        }
        float cs = v;
        for (int o = hc; o < n2; o <<= 1) cs += __shfl_xor_sync(0xffffffffu, cs, o);
        v /= cs + eps;
    }
    if (lane < n2) comb[lane] = v;
}

/* From the mixer outputs (mix, mw raw dots of the flattened state X): divide
 * by rms(X), derive the coefficients into coef = [pre hc | post hc | comb hc²]
 * (head: pre only, spec §4.8), and collapse h = Σ pre_a·X_a. Each block
 * recomputes rms and coefficients (X is 64 KiB, read from L2) and writes
 * its slice of h: no second launch, and the whole GPU shares the work. */
__global__ void k_hc_pre(const float *X, int64_t d, int hc, const float *mix, int mw, const float *scale,
                         const float *base, int iters, float hc_eps, float rms_eps, bool head, float *coef, float *h) {
    __shared__ double shd[32];
    __shared__ float m[(2 + MAX_HC) * MAX_HC], c[(2 + MAX_HC) * MAX_HC];
    int64_t zw = (int64_t)hc * d;
    double ss = block_sum_d(sumsq_part(X, zw), shd);
    float rms = (float)sqrt(ss / (double)zw + rms_eps);
    for (int i = threadIdx.x; i < mw; i += blockDim.x) m[i] = mix[i] / rms;
    __syncthreads();
    bool warp_ok = (hc & (hc - 1)) == 0 && hc * hc <= 32;
    if (head) {
        if (threadIdx.x < hc) c[threadIdx.x] = sigmoidf_d(m[threadIdx.x] * scale[0] + base[threadIdx.x]) + hc_eps;
    } else if (warp_ok) {
        if (threadIdx.x < 32) hc_coeffs_warp(m, scale, base, hc, iters, hc_eps, c, c + hc, c + 2 * hc);
    } else if (threadIdx.x == 0) {
        hc_coeffs(m, scale, base, hc, iters, hc_eps, c, c + hc, c + 2 * hc);
    }
    __syncthreads();
    int nc = head ? hc : (2 + hc) * hc;
    if (coef && blockIdx.x == 0)
        for (int i = threadIdx.x; i < nc; i += blockDim.x) coef[i] = c[i];
    int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (k < d) {
        float a = 0;
        for (int i = 0; i < hc; i++) a += c[i] * X[i * d + k];
        h[k] = a;
    }
}

/* X'_c = post_c·y + Σ_a comb[a][c]·X_a. */
__global__ void k_hc_post(float *X, int64_t d, int hc, const float *coef, const float *y) {
    int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= d) return;
    const float *post = coef + hc, *C = coef + 2 * hc;
    float old[MAX_HC];
    for (int a = 0; a < hc; a++) old[a] = X[a * d + k];
    for (int c = 0; c < hc; c++) {
        float v = post[c] * y[k];
        for (int a = 0; a < hc; a++) v += C[a * hc + c] * old[a];
        X[c * d + k] = v;
    }
}

/* ---- norms, Q/KV paths (spec §4.4) ----------------------------------------- */

/* One vector of n per block (blockIdx.x·stride), in place or to out. */
__global__ void k_rmsnorm(const float *x, const float *w, int n, float eps, float *out, int64_t stride) {
    __shared__ double shd[32];
    const float *v = x + blockIdx.x * stride;
    float *o = out + blockIdx.x * stride;
    double ss = block_sum_d(sumsq_part(v, n), shd);
    float r = (float)(1.0 / sqrt(ss / (double)n + eps));
    for (int k = threadIdx.x; k < n; k += blockDim.x) o[k] = w ? v[k] * r * w[k] : v[k] * r;
}

/* Query heads: unweighted RMSNorm, RoPE on the tail. Block per head, hd threads. */
__global__ void k_q_heads(float *q, int hd, int rd, const double *freq, const dstep *st, float eps) {
    extern __shared__ float sv[];
    int64_t pos = st->pos;
    __shared__ double shd[32];
    float *g = q + (int64_t)blockIdx.x * hd;
    for (int k = threadIdx.x; k < hd; k += blockDim.x) sv[k] = g[k];
    __syncthreads();
    blk_rmsnorm(sv, hd, NULL, eps, shd);
    blk_rope(sv + hd - rd, rd / 2, freq, pos, false);
    for (int k = threadIdx.x; k < hd; k += blockDim.x) g[k] = sv[k];
}

/* The token's K=V row: weighted RMSNorm, RoPE, FP8 on the non-RoPE part,
 * f16 rounding, written straight into its raw-ring slot. One block. */
__global__ void k_kv_row(const float *kv, const float *w, int hd, int rd, const double *freq, const dstep *st,
                         float eps, float *ring, uint32_t keep) {
    extern __shared__ float sv[];
    int64_t pos = st->pos;
    float *out = ring + (size_t)(pos % keep) * hd;
    __shared__ double shd[32];
    for (int k = threadIdx.x; k < hd; k += blockDim.x) sv[k] = kv[k];
    __syncthreads();
    blk_rmsnorm(sv, hd, w, eps, shd);
    blk_rope(sv + hd - rd, rd / 2, freq, pos, false);
    blk_fp8(sv, hd - rd);
    for (int k = threadIdx.x; k < hd; k += blockDim.x) out[k] = round_f16(sv[k]);
}

/* ---- compressor (spec §4.5) -------------------------------------------------- */

/* Store position pos's projected kv and gate + ape[pos % R] in ring slot. */
__global__ void k_comp_store(const float *pk, const float *pg, int ape_type, const uint8_t *ape, uint64_t ape_rb,
                             int W, int R, const dstep *st, float *rkv, float *rg, uint32_t keep) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int64_t pos = st->pos;
    uint32_t slot = (uint32_t)(pos % keep);
    if (c >= W / 8) return;
    float v[8];
    deq_chunk(ape_type, ape + (uint64_t)(pos % R) * ape_rb, c, v);
    for (int k = 0; k < 8; k++) {
        rkv[(size_t)slot * W + 8 * c + k] = pk[8 * c + k];
        rg[(size_t)slot * W + 8 * c + k] = pg[8 * c + k] + v[k];
    }
}

/* Emit compressed row b: softmax-gated pooling over the block (and the
 * previous block's lane a for two lanes), norm, RoPE at bR, QAT, f16. One
 * block of ≥ D threads (comp_emit of the CPU). */
__global__ void k_comp_emit(const float *kv, const float *gate, uint32_t keep, int R, int lanes, int D, const dstep *st,
                            const float *norm_w, const double *freq, int rd, float eps, bool indexer, float *out) {
    extern __shared__ float sv[];
    __shared__ double shd[32];
    uint32_t end = st->pos + 1;
    if (end % (uint32_t)R) return;   /* the position completes no block (uniform: whole block leaves) */
    uint32_t b = end / (uint32_t)R - 1;
    int W = lanes * D;
    uint64_t bR = (uint64_t)b * R;
    bool prev = lanes == 2 && b > 0;
    int off = lanes == 2 ? D : 0;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float m = -INFINITY;
        if (prev) for (uint64_t t = bR - R; t < bR; t++) m = fmaxf(m, gate[(t % keep) * W + j]);
        for (uint64_t t = bR; t < bR + R; t++) m = fmaxf(m, gate[(t % keep) * W + off + j]);
        float den = 0, acc = 0;
        if (prev)
            for (uint64_t t = bR - R; t < bR; t++) {
                float w = expf(gate[(t % keep) * W + j] - m);
                den += w; acc += w * kv[(t % keep) * W + j];
            }
        for (uint64_t t = bR; t < bR + R; t++) {
            float w = expf(gate[(t % keep) * W + off + j] - m);
            den += w; acc += w * kv[(t % keep) * W + off + j];
        }
        sv[j] = acc / den;
    }
    __syncthreads();
    blk_rmsnorm(sv, D, norm_w, eps, shd);
    blk_rope(sv + D - rd, rd / 2, freq, (int64_t)bR, false);
    if (indexer) blk_fp4(sv, D);
    else blk_fp8(sv, D - rd);
    for (int j = threadIdx.x; j < D; j += blockDim.x) out[(size_t)b * D + j] = round_f16(sv[j]);
}

/* ---- indexer (spec §4.6) ------------------------------------------------------ */

/* Indexer query heads: RoPE on the tail, Hadamard+FP4; weights scaled. */
__global__ void k_idx_heads(float *iq, float *iw, int ihd, int rd, const double *freq, const dstep *st, float wscale) {
    extern __shared__ float sv[];
    int64_t pos = st->pos;
    float *g = iq + (int64_t)blockIdx.x * ihd;
    for (int k = threadIdx.x; k < ihd; k += blockDim.x) sv[k] = g[k];
    __syncthreads();
    blk_rope(sv + ihd - rd, rd / 2, freq, pos, false);
    blk_fp4(sv, ihd);
    for (int k = threadIdx.x; k < ihd; k += blockDim.x) g[k] = sv[k];
    if (threadIdx.x == 0) iw[blockIdx.x] *= wscale;
}

/* score_c = Σ_h w_h · max(0, q_h · k_c) for the (pos+1)/4 visible rows, one
 * warp per row over a fixed grid (the row count changes every 4 positions). */
__global__ void k_idx_scores(const float *iq, const float *iw, const float *rows, const dstep *st, int ih, int ihd,
                             float *score) {
    int lane = threadIdx.x & 31;
    int64_t nrows = (st->pos + 1) / 4;
    for (int64_t r = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < nrows;
         r += (int64_t)gridDim.x * (blockDim.x >> 5)) {
        const float *k = rows + r * ihd;
        float sc = 0;
        for (int h = 0; h < ih; h++) {
            float d = 0;
            for (int j = lane; j < ihd; j += 32) d = fmaf(iq[h * ihd + j], k[j], d);
            d = warp_sum(d);
            sc += iw[h] * fmaxf(0.0f, d);
        }
        if (!lane) score[r] = sc;
    }
}

/* Float → unsigned key with the same order (−0 folded into +0, as `>` sees them). */
__device__ __forceinline__ uint32_t fkey(float f) {
    if (f == 0.0f) f = 0.0f;
    uint32_t u = __float_as_uint(f);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

/* Top-k by radix select (4 passes of 8-bit histograms find the k-th best key
 * T and how many keys equal to T to take), then one ordered pass that keeps
 * keys above T and the lowest-indexed ties: the CPU's selection exactly,
 * output ascending. One block of 1024 threads. */
__global__ void k_topk(const float *score, const dstep *st, int64_t n_fixed, int64_t k, int32_t *out) {
    int64_t n = st ? (int64_t)(st->pos + 1) / 4 : n_fixed;   /* indexer: the visible rows */
    if (st && n <= k) return;   /* every row is attended: no selection */
    __shared__ uint32_t hist[256];
    __shared__ uint32_t s_prefix, s_need;
    __shared__ uint32_t wsum_gt[32], wsum_eq[32];
    __shared__ uint32_t s_base, s_eqbase;
    int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    if (tid == 0) { s_prefix = 0; s_need = (uint32_t)k; }
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        uint32_t pre = s_prefix;
        for (int64_t i = tid; i < n; i += blockDim.x) {
            uint32_t key = fkey(score[i]);
            if ((key & mask) == pre) atomicAdd(&hist[(key >> shift) & 255], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            uint32_t need = s_need, cum = 0;
            int bin = 255;
            for (; bin > 0; bin--) {
                if (cum + hist[bin] >= need) break;
                cum += hist[bin];
            }
            s_need = need - cum;
            s_prefix = pre | (uint32_t)bin << shift;
        }
        mask |= 255u << shift;
        __syncthreads();
    }
    uint32_t T = s_prefix, need_eq = s_need;
    if (tid == 0) { s_base = 0; s_eqbase = 0; }
    __syncthreads();
    for (int64_t t0 = 0; t0 < n; t0 += blockDim.x) {
        int64_t i = t0 + tid;
        uint32_t key = i < n ? fkey(score[i]) : 0;
        bool eq = i < n && key == T;
        uint32_t beq = __ballot_sync(0xffffffffu, eq);
        if (!lane) wsum_eq[wid] = __popc(beq);
        __syncthreads();
        uint32_t eq_before = s_eqbase;
        for (int w = 0; w < wid; w++) eq_before += wsum_eq[w];
        eq_before += __popc(beq & ((1u << lane) - 1));
        bool take = i < n && (key > T || (eq && eq_before < need_eq));
        uint32_t bt = __ballot_sync(0xffffffffu, take);
        if (!lane) wsum_gt[wid] = __popc(bt);
        __syncthreads();
        uint32_t pos = s_base;
        for (int w = 0; w < wid; w++) pos += wsum_gt[w];
        pos += __popc(bt & ((1u << lane) - 1));
        if (take) out[pos] = (int32_t)i;
        __syncthreads();
        if (tid == 0) {
            uint32_t tg = 0, te = 0;
            for (int w = 0; w < (int)(blockDim.x >> 5); w++) { tg += wsum_gt[w]; te += wsum_eq[w]; }
            s_base += tg;
            s_eqbase += te;
        }
        __syncthreads();
    }
}

/* ---- attention (spec §4.4) ---------------------------------------------------- */

#define ATT_V4 8               /* float4 per lane per row: head_dim ≤ 32·4·8 = 1024 */

/* One block per head: rows = raw window positions lo … pos (ring) then the
 * compressed rows (the indexer's selection when it chose, else all visible
 * ones). Scores to scr, softmax with the head's sink, weighted sum, inverse
 * RoPE on the tail. Rows are read as float4 across a warp (head_dim a
 * multiple of 128): a warp per row for the scores; for the sum each warp
 * takes every nw-th row and keeps a partial output in registers, so every
 * lane has several independent row loads in flight; partials meet in shared
 * memory at the end. */
__global__ void k_attend(const float *q, float *o, const float *raw, uint32_t keep_raw, const dstep *st, uint32_t window,
                         const float *comp, const int32_t *selbuf, int ratio, int64_t topk, const float *sinks, int hd,
                         int rd, const double *freq, float scale, float *scr, int64_t scr_stride) {
    extern __shared__ float sv[];   /* q (hd), then nw partial outputs (hd each) */
    __shared__ float shf[32];
    int h = blockIdx.x, lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5, nv = hd / 128;
    float *sq = sv, *part = sv + hd, *sc = scr + h * scr_stride;
    int64_t pos = st->pos, n_comp = ratio > 0 ? (pos + 1) / ratio : 0;
    const int32_t *sel = NULL;
    if (ratio == 4 && n_comp > topk) { n_comp = topk; sel = selbuf; }   /* the indexer's choice */
    int64_t lo = pos >= (int64_t)window - 1 ? pos - (window - 1) : 0, nraw = pos - lo + 1, n = nraw + n_comp;
    for (int k = threadIdx.x; k < hd; k += blockDim.x) sq[k] = q[(int64_t)h * hd + k];
    __syncthreads();
    const float4 *q4 = (const float4 *)sq;
#define ATT_ROW(r) ((const float4 *)((r) < nraw ? raw + (size_t)((lo + (r)) % keep_raw) * hd \
                                                : comp + (size_t)(sel ? sel[(r) - nraw] : (r) - nraw) * hd))
    float mloc = -INFINITY;
    for (int64_t r = wid; r < n; r += nw) {
        const float4 *row = ATT_ROW(r);
        float d = 0;
#pragma unroll
        for (int i = 0; i < ATT_V4; i++)
            if (i < nv) {
                float4 a = row[lane + 32 * i], b = q4[lane + 32 * i];
                d = fmaf(a.x, b.x, d); d = fmaf(a.y, b.y, d); d = fmaf(a.z, b.z, d); d = fmaf(a.w, b.w, d);
            }
        d = warp_sum(d) * scale;
        if (!lane) sc[r] = d;
        mloc = fmaxf(mloc, d);
    }
    float sink = sinks[h];
    float m = fmaxf(block_max(mloc, shf), sink);
    __syncthreads();
    float psum = 0;
    for (int64_t r = threadIdx.x; r < n; r += blockDim.x) {
        float w = expf(sc[r] - m);
        sc[r] = w;
        psum += w;
    }
    float den = block_sum(psum, shf) + expf(sink - m);
    __syncthreads();   /* weights visible to every thread */
    float4 acc[ATT_V4];
#pragma unroll
    for (int i = 0; i < ATT_V4; i++) acc[i] = make_float4(0, 0, 0, 0);
    for (int64_t r = wid; r < n; r += nw) {
        const float4 *row = ATT_ROW(r);
        float w = sc[r];
#pragma unroll
        for (int i = 0; i < ATT_V4; i++)
            if (i < nv) {
                float4 a = row[lane + 32 * i];
                acc[i].x = fmaf(w, a.x, acc[i].x); acc[i].y = fmaf(w, a.y, acc[i].y);
                acc[i].z = fmaf(w, a.z, acc[i].z); acc[i].w = fmaf(w, a.w, acc[i].w);
            }
    }
#undef ATT_ROW
#pragma unroll
    for (int i = 0; i < ATT_V4; i++)
        if (i < nv) ((float4 *)(part + wid * hd))[lane + 32 * i] = acc[i];
    __syncthreads();
    float inv = 1.0f / den;
    for (int j = threadIdx.x; j < hd; j += blockDim.x) {
        float a = 0;
        for (int w = 0; w < nw; w++) a += part[w * hd + j];
        sq[j] = a * inv;   /* q is no longer needed: reuse it for the output */
    }
    __syncthreads();
    blk_rope(sq + hd - rd, rd / 2, freq, pos, true);
    for (int k = threadIdx.x; k < hd; k += blockDim.x) o[(int64_t)h * hd + k] = sq[k];
}

/* ---- MoE (spec §3.6, §4.7) ----------------------------------------------------- */

__device__ __forceinline__ float router_score(float z) {
    float sp = z > 20.0f ? z : z < -20.0f ? expf(z) : log1pf(expf(z));
    return sqrtf(sp);
}
__device__ __forceinline__ float swiglu(float g, float u, float clamp) {
    g = fminf(g, clamp);
    u = u > clamp ? clamp : u < -clamp ? -clamp : u;
    return g * sigmoidf_d(g) * u;
}

/* Router: scores, expert choice (hash row of tid2eid for the token, else
 * biased top-`used` with lowest index on ties: `used` rounds of a block
 * argmax), normalised scaled weights. One block; dynamic shared memory E
 * floats + E bytes. */
__global__ void k_router(const float *logit, int E, int used, const uint8_t *tid2eid, uint64_t t2e_rb,
                         const int32_t *tok, const float *bias, bool norm, float wscale, int32_t *eid, float *ew) {
    extern __shared__ float ssc[];
    __shared__ float bv[32];
    __shared__ int bi[32];
    __shared__ int32_t ids[64];
    uint8_t *taken = (uint8_t *)(ssc + E);
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int e = threadIdx.x; e < E; e += blockDim.x) { ssc[e] = router_score(logit[e]); taken[e] = 0; }
    __syncthreads();
    if (tid2eid) {
        if (threadIdx.x < used) ids[threadIdx.x] = ((const int32_t *)(tid2eid + (uint64_t)tok[0] * t2e_rb))[threadIdx.x];
    } else {
        for (int i = 0; i < used; i++) {
            float v = -INFINITY;
            int best = 0x7fffffff;
            for (int e = threadIdx.x; e < E; e += blockDim.x) {
                float x = ssc[e] + (bias ? bias[e] : 0.0f);
                if (!taken[e] && (best == 0x7fffffff || x > v)) { v = x; best = e; }
            }
            /* (value, index) max with the lower index winning ties */
            for (int o = 16; o; o >>= 1) {
                float v2 = __shfl_xor_sync(0xffffffffu, v, o);
                int b2 = __shfl_xor_sync(0xffffffffu, best, o);
                if (b2 != 0x7fffffff && (best == 0x7fffffff || v2 > v || (v2 == v && b2 < best))) { v = v2; best = b2; }
            }
            if (!lane) { bv[wid] = v; bi[wid] = best; }
            __syncthreads();
            if (threadIdx.x == 0) {
                for (int w = 1; w < nw; w++)
                    if (bi[w] != 0x7fffffff && (bi[0] == 0x7fffffff || bv[w] > bv[0] || (bv[w] == bv[0] && bi[w] < bi[0]))) {
                        bv[0] = bv[w]; bi[0] = bi[w];
                    }
                ids[i] = bi[0];
                taken[bi[0]] = 1;
            }
            __syncthreads();
        }
    }
    __syncthreads();
    if (threadIdx.x) return;
    float sum = 0;
    for (int i = 0; i < used; i++) sum += ssc[ids[i]];
    if (norm) sum = fmaxf(sum, 0x1p-14f);
    for (int i = 0; i < used; i++) {
        eid[i] = ids[i];
        ew[i] = (norm ? ssc[ids[i]] / sum : ssc[ids[i]]) * wscale;
    }
}

/* y = Σ_slot routed (slot order) + y (the shared expert's output). */
__global__ void k_moe_sum(const float *eout, int used, int64_t d, float *y) {
    int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= d) return;
    float a = 0;
    for (int i = 0; i < used; i++) a += eout[i * d + k];
    y[k] = a + y[k];
}

/* ---- Q8_0 matvec on the repacked layout ----------------------------------------
 * Q8_0 carries ~2/3 of a decode step's weight bytes (attention projections,
 * shared expert, LM head). GGUF's 34-byte blocks leave the quants only 2-byte
 * aligned, so the generic path issued five 2-byte loads per 8 weights. At
 * upload (k_repack_q8) each R-row matrix is rewritten in place, same bytes:
 * the quants first, row r's n_in bytes at r·n_in (16-byte aligned), then the
 * f16 scales, row r's nb = n_in/32 at R·n_in + 2·r·nb. A lane then takes a
 * 16-weight piece per 16-byte load. */
__global__ void k_repack_q8(const uint8_t *__restrict__ src, uint8_t *__restrict__ dst, int64_t nblocks) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;   /* block r·nb + k: quants go to 32·i */
    if (i >= nblocks) return;
    const unsigned short *b = (const unsigned short *)(src + i * 34);   /* 2-byte aligned */
    unsigned short *q = (unsigned short *)(dst + i * 32);
    for (int j = 0; j < 16; j++) q[j] = b[1 + j];
    ((unsigned short *)(dst + nblocks * 32))[i] = b[0];
}

/* Σ_k int8(u byte k) · x_k over 4 weights. */
__device__ __forceinline__ float dot4_i8(uint32_t u, float4 x, float s) {
    s = fmaf((float)(int8_t)u, x.x, s);
    s = fmaf((float)(int8_t)(u >> 8), x.y, s);
    s = fmaf((float)(int8_t)(u >> 16), x.z, s);
    return fmaf((float)((int32_t)u >> 24), x.w, s);
}

/* y[slot·y_slot + r] for NR consecutive rows per warp, which share each x
 * load (x is re-read from L1 once per NR rows, not per row). GLU: W2 is the
 * up matrix of the same shape; the warp computes gate and up rows together
 * and writes swiglu(g, u) · (ew ? ew[slot] : 1), so the pair takes one
 * launch and k_swiglu none. eid/estride/x_slot as k_matvec; x grouping
 * (xg_rows, a multiple of NR) as k_matvec. Rows past the end repeat the
 * last row (loads stay in bounds) and are not written. */
template <int NR, bool GLU>
__global__ void __launch_bounds__(32 * MV_WARPS)
k_mv_q8(const uint8_t *__restrict__ W, const uint8_t *__restrict__ W2, int64_t n_in, int64_t rows,
        const float *__restrict__ x, int64_t xg_rows, int64_t xg_stride, float *__restrict__ y,
        const int32_t *__restrict__ eid, uint64_t estride, int64_t x_slot, int64_t y_slot,
        const float *__restrict__ ew, float clamp) {
    constexpr int M = GLU ? 2 * NR : NR;
    int slot = blockIdx.y, lane = threadIdx.x & 31;
    int64_t r0 = ((int64_t)blockIdx.x * MV_WARPS + (threadIdx.x >> 5)) * NR;
    if (r0 >= rows) return;
    uint64_t eoff = eid ? (uint64_t)eid[slot] * estride : 0;
    const int64_t nb = n_in / 32, np = n_in / 16;
    const float *xx = x + slot * x_slot + (xg_rows ? (r0 / xg_rows) * xg_stride : 0);
    const uint4 *q[M];
    const __half *sc[M];
#pragma unroll
    for (int i = 0; i < M; i++) {
        const uint8_t *mat = (i < NR ? W : W2) + eoff;
        int64_t r = r0 + i % NR < rows ? r0 + i % NR : rows - 1;
        q[i] = (const uint4 *)(mat + r * n_in);
        sc[i] = (const __half *)(mat + rows * n_in) + r * nb;
    }
    float acc[M];
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = 0;
#pragma unroll 2
    for (int64_t p = lane; p < np; p += 32) {
        uint4 w[M];
        float d[M];
#pragma unroll
        for (int i = 0; i < M; i++) { w[i] = q[i][p]; d[i] = __half2float(sc[i][p >> 1]); }
        const float4 *xp = (const float4 *)(xx + 16 * p);
        float4 x0 = xp[0], x1 = xp[1], x2 = xp[2], x3 = xp[3];
#pragma unroll
        for (int i = 0; i < M; i++) {
            float s = dot4_i8(w[i].x, x0, 0.0f);
            s = dot4_i8(w[i].y, x1, s);
            s = dot4_i8(w[i].z, x2, s);
            s = dot4_i8(w[i].w, x3, s);
            acc[i] = fmaf(d[i], s, acc[i]);
        }
    }
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = warp_sum(acc[i]);
    if (lane) return;
#pragma unroll
    for (int i = 0; i < NR; i++) {
        if (r0 + i >= rows) break;
        float v = acc[i];
        if (GLU) {
            v = swiglu(acc[i], acc[NR + i], clamp);
            if (ew) v *= ew[slot];
        }
        y[slot * y_slot + r0 + i] = v;
    }
}

/* Gate and up rows of one expert slot in one warp, swiglu · ew[slot] out:
 * the routed experts' pair in one launch (generic formats, k_matvec's loop). */
__global__ void k_matvec_glu(int type, const uint8_t *__restrict__ Wg, const uint8_t *__restrict__ Wu, uint64_t rb,
                             int64_t n_in, int64_t rows, const float *__restrict__ x, float *__restrict__ y,
                             const int32_t *__restrict__ eid, uint64_t estride, int64_t y_slot,
                             const float *__restrict__ ew, float clamp) {
    int slot = blockIdx.y, lane = threadIdx.x & 31;
    int64_t r = (int64_t)blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (r >= rows) return;
    uint64_t off = (eid ? (uint64_t)eid[slot] * estride : 0) + (uint64_t)r * rb;
    float g = row_dot(type, Wg + off, n_in / 8, x, lane, 32);
    float u = row_dot(type, Wu + off, n_in / 8, x, lane, 32);
    g = warp_sum(g);
    u = warp_sum(u);
    if (!lane) y[slot * y_slot + r] = swiglu(g, u, clamp) * (ew ? ew[slot] : 1.0f);
}

/* ---- test-only wrappers ---------------------------------------------------------- */

__global__ void k_test_qat(float *x, int n, bool fp4) {
    extern __shared__ float sv[];
    for (int k = threadIdx.x; k < n; k += blockDim.x) sv[k] = x[k];
    __syncthreads();
    if (fp4) blk_fp4(sv, n);
    else blk_fp8(sv, n);
    for (int k = threadIdx.x; k < n; k += blockDim.x) x[k] = sv[k];
}

__global__ void k_test_hc(const float *mix, const float *scale, const float *base, int hc, int iters, float eps,
                          float *out) {
    if ((hc & (hc - 1)) == 0 && hc * hc <= 32) hc_coeffs_warp(mix, scale, base, hc, iters, eps, out, out + hc, out + 2 * hc);
    else if (threadIdx.x == 0) hc_coeffs(mix, scale, base, hc, iters, eps, out, out + hc, out + 2 * hc);
}

#endif
