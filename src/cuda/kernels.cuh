/* Device kernels of the CUDA backend, one per operation of the decode path
 * (spec model.md §3–§5). Each mirrors a CPU reference routine (src/cpu,
 * src/quant) operation by operation; only accumulation orders differ (tree
 * reductions instead of sequential sums), so results agree to f32 rounding.
 *
 * Conventions: per-token kernels take the chunk's tokens along blockIdx.y
 * (blockIdx.x for the one-block-per-token ones), token t at dstep st[t]:
 * decode is the chunk of one token, prefill a chunk of up to CHUNK. f32
 * activations; decode matvecs read the weights in their quantised form
 * (chunk products: mm.cuh). A "block helper" works on a shared-memory vector
 * with thread i owning element i (blockDim ≥ n). */
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

/* Programmatic dependent launch (sm_90): the backend launches every kernel
 * with programmatic stream serialisation (launch() in cuda.cu). Each kernel
 * first waits here until its predecessor has completed and its writes are
 * visible — before anything else, early returns included, so completion
 * stays transitive down the stream — and then lets its own successor be
 * launched: the successor's blocks get resident and wait while this kernel
 * runs, so launch latency and prologues overlap work instead of adding
 * gaps between the ~1 500 nodes of a decode step. A no-op for kernels
 * launched the ordinary way. */
__device__ __forceinline__ void pdl_wait(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

/* 16-byte global → shared copy that bypasses registers (sm_80+). */
__device__ __forceinline__ void att_cp16(float4 *dst, const float4 *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((uint32_t)__cvta_generic_to_shared(dst)), "l"(src));
}

/* IQ2_XXS tables, copied from src/quant at backend creation. */
__device__ uint64_t d_iq2_grid[256];
/* 0 only under the DS4_DIAG_EXACT_KV diagnostic (cpu/cpu.h): KV rows and
 * indexer queries skip the QAT simulations and the f16 rounding. */
__device__ int d_qat = 1;
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

/* Small unsigned integer → float without I2F: I2F issues at a quarter of
 * the FP32 rate on sm_90, and decoding 2–8-bit weights is one conversion per
 * weight, so it capped every quantised matvec near 1–1.5 TB/s. 2^23 + v has
 * v in its low mantissa bits; subtracting 2^23 is exact (v < 2^23). */
__device__ __forceinline__ float u2f(uint32_t v) { return __int_as_float(0x4B000000u | v) - 8388608.0f; }
/* Byte k of w as an unsigned value, the same way: one PRMT + one FADD. */
__device__ __forceinline__ float byte2f(uint32_t w, int k) {
    return __int_as_float(__byte_perm(w, 0x4B000000u, 0x7540u | (uint32_t)k)) - 8388608.0f;
}
/* Weights as subnormal floats: the bits of a small integer v (sign in bit
 * 31) are the float ±v·2^-149, so one PRMT turns a quant byte into a float,
 * no FADD. Products with x stay exact only in the normal range, so the x of
 * these formats is scaled by 2^100 first (RP_XS, exact) and the partial sums,
 * ±v·x·2^-49, are scaled back by 2^49 with the block scale: every fma sees
 * the same values times powers of two, so the sums equal the unscaled ones
 * bit for bit (x below ~2^-70, whose products would go subnormal, adds
 * nothing measurable to a dot of O(1) terms). */
#define RP_XS 0x1p100f
#define RP_BACK 0x1p49f
/* Σ_k ((byte k of u) >> 2s & 3) · x_k over 4 weights (Q2_K quants of run s),
 * x scaled by RP_XS: byte k alone in a word is the subnormal weight. */
__device__ __forceinline__ float dot4_u2(uint32_t u, int s, float4 x, float acc) {
    uint32_t t = (u >> 2 * s) & 0x03030303u;
    acc = fmaf(__int_as_float(__byte_perm(t, 0, 0x4440u)), x.x, acc);
    acc = fmaf(__int_as_float(__byte_perm(t, 0, 0x4441u)), x.y, acc);
    acc = fmaf(__int_as_float(__byte_perm(t, 0, 0x4442u)), x.z, acc);
    return fmaf(__int_as_float(__byte_perm(t, 0, 0x4443u)), x.w, acc);
}

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
        float dl = d * u2f(b[j] & 15), ml = dmin * u2f(b[j] >> 4);
        const uint32_t *q = (const uint32_t *)(b + 16 + 32 * h + 16 * half + 8 * sub);
        uint32_t q0 = q[0], q1 = q[1];
        for (int k = 0; k < 4; k++) {
            v[k] = fmaf(dl, u2f((q0 >> (8 * k + 2 * s)) & 3), -ml);
            v[4 + k] = fmaf(dl, u2f((q1 >> (8 * k + 2 * s)) & 3), -ml);
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
        float dl = __half2float(__ushort_as_half((unsigned short)dd)) * u2f((uint32_t)sc);
        float ml = __half2float(__ushort_as_half((unsigned short)(dd >> 16))) * u2f((uint32_t)mn);
        uint2 q = *(const uint2 *)(b + 16 + 32 * cc + k0);   /* 144-byte blocks: 8-byte aligned */
        for (int k = 0; k < 4; k++) {
            v[k] = fmaf(dl, u2f((q.x >> (8 * k + 4 * h)) & 15), -ml);
            v[4 + k] = fmaf(dl, u2f((q.y >> (8 * k + 4 * h)) & 15), -ml);
        }
        return;
    }
    case GT_IQ2_XXS: {
        const uint8_t *b = row + (c >> 5) * 66;
        int e0 = (int)(c & 31) * 8, ib = e0 >> 5, l = (e0 >> 3) & 3;
        uint32_t A = ld_u32h(b + 2 + 8 * ib), B = ld_u32h(b + 6 + 8 * ib);   /* 66-byte blocks: 2-byte aligned */
        float db = ld_f16a(b) * (0.5f + u2f(B >> 28)) * 0.25f;
        uint64_t g = d_iq2_grid[(A >> 8 * l) & 255];
        uint8_t sg = d_iq2_signs[(B >> 7 * l) & 127];
        for (int k = 0; k < 8; k++) {
            float m = byte2f(k < 4 ? (uint32_t)g : (uint32_t)(g >> 32), k & 3);
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

/* Two rows against one x in one loop (gate and up): both rows' loads are
 * in flight together, and x is loaded once for the pair. */
#define ROW_LOOP2(T)                                                                 \
    {                                                                                \
        _Pragma("unroll 2") for (int64_t c = start; c < nch; c += step) {            \
            const float4 *xp = (const float4 *)(x + 8 * c);                          \
            float4 a = xp[0], b = xp[1];                                             \
            float va[8], vb[8];                                                      \
            deq_chunk(T, wa, c, va);                                                 \
            deq_chunk(T, wb, c, vb);                                                 \
            acc.x = fmaf(va[0], a.x, acc.x); acc.x = fmaf(va[1], a.y, acc.x);        \
            acc.x = fmaf(va[2], a.z, acc.x); acc.x = fmaf(va[3], a.w, acc.x);        \
            acc.x = fmaf(va[4], b.x, acc.x); acc.x = fmaf(va[5], b.y, acc.x);        \
            acc.x = fmaf(va[6], b.z, acc.x); acc.x = fmaf(va[7], b.w, acc.x);        \
            acc.y = fmaf(vb[0], a.x, acc.y); acc.y = fmaf(vb[1], a.y, acc.y);        \
            acc.y = fmaf(vb[2], a.z, acc.y); acc.y = fmaf(vb[3], a.w, acc.y);        \
            acc.y = fmaf(vb[4], b.x, acc.y); acc.y = fmaf(vb[5], b.y, acc.y);        \
            acc.y = fmaf(vb[6], b.z, acc.y); acc.y = fmaf(vb[7], b.w, acc.y);        \
        }                                                                            \
        return acc;                                                                  \
    }
__device__ __forceinline__ float2 row_dot2(int type, const uint8_t *wa, const uint8_t *wb, int64_t nch, const float *x,
                                           int start, int step) {
    float2 acc = make_float2(0, 0);
    switch (type) {
    case GT_F32: ROW_LOOP2(GT_F32)
    case GT_F16: ROW_LOOP2(GT_F16)
    case GT_Q8_0: ROW_LOOP2(GT_Q8_0)
    case GT_Q2_K: ROW_LOOP2(GT_Q2_K)
    case GT_Q4_K: ROW_LOOP2(GT_Q4_K)
    case GT_IQ2_XXS: ROW_LOOP2(GT_IQ2_XXS)
    default: return make_float2(__int_as_float(0x7fc00000), __int_as_float(0x7fc00000));
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
    pdl_wait();
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
    pdl_wait();
    __shared__ float sh[32];
    const uint8_t *w = W + (uint64_t)blockIdx.x * rb;
    float acc = block_sum(row_dot(type, w, n_in / 8, x, threadIdx.x, blockDim.x), sh);
    if (threadIdx.x == 0) y[blockIdx.x] = acc;
}

/* Embeddings of the chunk's tokens (ids in device memory): copies × n each. */
__global__ void k_embed(int type, const uint8_t *tab, uint64_t rb, const dstep *st, int64_t n, float *out,
                        int copies) {
    pdl_wait();
    int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n / 8) return;
    float v[8];
    deq_chunk(type, tab + (uint64_t)st[blockIdx.y].tok * rb, c, v);
    out += (int64_t)blockIdx.y * copies * n;
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

/* The coefficients of an HC step from its mixer outputs over rms (pm, mw
 * floats, hc ≤ 4) into c (shared) by warp 0, called BEFORE pdl_wait: pm
 * was written by a launch at least two before this one, and a kernel
 * starts only once its predecessor has passed its own pdl_wait, i.e. once
 * the launch before that one has completed — so pm is complete (read
 * through L2: no stale L1 line). The Sinkhorn then overlaps the previous
 * kernel instead of lengthening the step that produced pm. mp: mw floats
 * of shared scratch. The caller syncs the block before reading c. */
__device__ __forceinline__ void hc_coeffs_early(const float *pm, const float *pscale, const float *pbase, int hc,
                                                int iters, float eps, float *mp, float *c) {
    if (threadIdx.x >= 32) return;
    if (threadIdx.x < (2 + hc) * hc) mp[threadIdx.x] = __ldcg(pm + threadIdx.x);
    __syncwarp();
    hc_coeffs_warp(mp, pscale, pbase, hc, iters, eps, c, c + hc, c + 2 * hc);
}

/* From the mixer outputs (mix, mw raw dots of the flattened state X): divide
 * by rms(X), derive the coefficients into coef = [pre hc | post hc | comb hc²]
 * (head: pre only, spec §4.8), and collapse h = Σ pre_a·X_a. Each block
 * recomputes rms and coefficients (X is 64 KiB, read from L2) and writes
 * its slice of h: no second launch, and the whole GPU shares the work. */
__global__ void k_hc_pre(const float *X, int64_t d, int hc, const float *mix, int mw, const float *scale,
                         const float *base, int iters, float hc_eps, float rms_eps, bool head, float *coef, float *h,
                         const float *rms_pre) {
    pdl_wait();
    __shared__ double shd[32];
    __shared__ float m[(2 + MAX_HC) * MAX_HC], c[(2 + MAX_HC) * MAX_HC];
    int64_t zw = (int64_t)hc * d, t = blockIdx.y;
    X += t * zw;
    mix += t * mw;
    h += t * d;
    if (coef) coef += t * (2 + hc) * hc;
    /* A chunk passes rms(X) per token (k_rms_rows): 16 blocks re-reading
     * each token's 64 KiB from DRAM would cost more than the mixing. */
    float rms = rms_pre ? rms_pre[t] : (float)sqrt(block_sum_d(sumsq_part(X, zw), shd) / (double)zw + rms_eps);
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

/* Weights c·8 … c·8+7 of an F16 or F32 row (16-byte aligned: rows of
 * 16-byte multiples, tensor data 32-byte aligned) as two float4. */
__device__ __forceinline__ void ld8w(int wtype, const uint8_t *row, int64_t c, float4 *a, float4 *b) {
    if (wtype == GT_F16) {
        uint4 u = __ldg((const uint4 *)row + c);
        float2 f0 = __half22float2(*(const __half2 *)&u.x), f1 = __half22float2(*(const __half2 *)&u.y);
        float2 f2 = __half22float2(*(const __half2 *)&u.z), f3 = __half22float2(*(const __half2 *)&u.w);
        *a = make_float4(f0.x, f0.y, f1.x, f1.y);
        *b = make_float4(f2.x, f2.y, f3.x, f3.y);
    } else {
        *a = __ldg((const float4 *)row + 2 * c);
        *b = __ldg((const float4 *)row + 2 * c + 1);
    }
}

#define HS_THREADS 256
#define HS_ROWS 3              /* mixer rows per warp: mw ≤ 8 · 3 */
#define HS_MAX_D 4096          /* the collapse in registers: HS_Q float4 positions a thread */
#define HS_MAX_BLOCKS 64       /* HS_MAX_D / the narrowest slice (hc = 4: 64 positions) */
__device__ unsigned d_hs_count;
__device__ float d_hs_part[HS_MAX_BLOCKS * HS_ROWS * 8];
__device__ double d_hs_ss[HS_MAX_BLOCKS];

/* The collapse's inputs of one token, loaded by a block (HS_THREADS) into
 * registers before they are needed: thread i takes positions q = i + j·HS_THREADS
 * (float4 units, j < HS_Q) of every stream, and their norm weights. X read
 * through L2 (k_hc_step's other blocks wrote it in the same launch). */
#define HS_Q (HS_MAX_D / 4 / HS_THREADS)
struct hc_regs {
    float4 x[HS_Q][4], w[HS_Q];
};
__device__ __forceinline__ void hc_load(const float *X, int64_t d, int hc, const float *nw, hc_regs &g) {
#pragma unroll
    for (int j = 0; j < HS_Q; j++) {
        int64_t q = threadIdx.x + j * HS_THREADS;
        if (q >= d / 4) break;
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (i < hc) g.x[j][i] = __ldcg((const float4 *)(X + i * d) + q);
        g.w[j] = __ldg((const float4 *)nw + q);
    }
}

/* The end of an HC step for one token by one block, from the mixer outputs
 * over rms (m, shared) and hc_load's registers: pre as hc_coeffs_warp
 * computes it, in every thread; with coef, all coefficients (Sinkhorn) on
 * warp 0 into coef (c: shared scratch); h = Σ pre_a·X_a and
 * nrm = rmsnorm(h)·nw with k_rmsnorm's arithmetic. */
__device__ __forceinline__ void hc_finish(const hc_regs &g, int64_t d, int hc, const float *m, const float *scale,
                                          const float *base, int iters, float hc_eps, float rms_eps, float *coef,
                                          float *nrm, float *c, double *shd) {
    int lane = threadIdx.x & 31;
    float pre[4];
#pragma unroll
    for (int i = 0; i < 4; i++) pre[i] = i < hc ? sigmoidf_d(m[i] * scale[0] + base[i]) + hc_eps : 0.0f;
    if (coef && threadIdx.x < 32) {
        hc_coeffs_warp(m, scale, base, hc, iters, hc_eps, c, c + hc, c + 2 * hc);
        __syncwarp();
        for (int i = lane; i < (2 + hc) * hc; i += 32) coef[i] = c[i];
    }
    float4 h[HS_Q];
    double hs = 0;
#pragma unroll
    for (int j = 0; j < HS_Q; j++) {
        if (threadIdx.x + j * HS_THREADS >= d / 4) break;
        float4 acc = make_float4(0, 0, 0, 0);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (i >= hc) break;
            float4 v = g.x[j][i];
            acc.x += pre[i] * v.x; acc.y += pre[i] * v.y; acc.z += pre[i] * v.z; acc.w += pre[i] * v.w;
        }
        h[j] = acc;
        hs += (double)acc.x * acc.x + (double)acc.y * acc.y + (double)acc.z * acc.z + (double)acc.w * acc.w;
    }
    hs = block_sum_d(hs, shd);
    float r = (float)(1.0 / sqrt(hs / (double)d + rms_eps));
#pragma unroll
    for (int j = 0; j < HS_Q; j++) {
        int64_t q = threadIdx.x + j * HS_THREADS;
        if (q >= d / 4) break;
        float4 v = h[j], w = g.w[j];
        ((float4 *)nrm)[q] = make_float4(v.x * r * w.x, v.y * r * w.y, v.z * r * w.z, v.w * r * w.w);
    }
}

/* One decode token's whole hyper-connection step in one launch, instead of
 * up to five (the moe sum, k_hc_post, the mixer's k_matvec_wide, k_hc_pre,
 * k_rmsnorm), each of which left most of the GPU idle for a few µs:
 *  1. post (pm != NULL): this block's slice of X ← post_c·y + Σ_a comb[a][c]·X_a
 *     with the previous sublayer's output y (+ Σ_slot eout, slot order: the
 *     FFN's moe sum), k_hc_post's arithmetic, and its coefficients, derived
 *     from its mixer outputs pm (with its pscale, pbase) by hc_coeffs_early
 *     before pdl_wait;
 *  2. split-K mixer: the mw mixer rows (F16 or F32) dotted with the block's
 *     slice of the flattened state, and its Σx², as per-block partials;
 *  3. the block that arrives last loads the collapse's inputs (hc_load),
 *     sums the partials in block order — a fixed order whichever block that
 *     is (the counter only elects it), so runs are bit-identical — writes
 *     the mixer outputs over rms to mout (not for the head: mw = hc) for the
 *     next post, and ends the step (hc_finish: collapse, norm into nrm).
 * Grid: d / KB blocks of HS_THREADS, KB = 256 / hc: block b owns positions
 * k ∈ [b·KB, b·KB + KB) of every stream, i.e. 256 values of X; lane l of
 * each warp the 8 values of stream l / (KB/8) at b·KB + 8·(l % (KB/8)), warp
 * w the mixer rows w, w + 8, w + 16 (hc ≤ 4: mw ≤ 24); d ≤ HS_MAX_D. The
 * partials and the counter are device globals: one launch at a time uses
 * them (one stream; each launch starts after its predecessor completed,
 * pdl_wait), and the last block resets the counter. */
__global__ void __launch_bounds__(HS_THREADS)
k_hc_step(float *X, int64_t d, int hc, const float *pm, const float *pscale, const float *pbase, const float *y,
          const float *eout, int used, int wtype, const uint8_t *__restrict__ W, uint64_t rb, int mw,
          const float *scale, const float *base, int iters, float hc_eps, float rms_eps, const float *nw, float *mout,
          float *nrm) {
    __shared__ __align__(16) float xs[HS_THREADS];
    __shared__ float m[HS_ROWS * 8], mp[HS_ROWS * 8], c[(2 + MAX_HC) * MAX_HC];
    __shared__ double shd[32];
    __shared__ bool last;
    int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5, nb = gridDim.x;
    int kb = HS_THREADS / hc, per = kb / 8, a = lane / per;
    int64_t k0 = (int64_t)blockIdx.x * kb, col = a * d + k0 + 8 * (lane % per);
    /* The mixer weights do not depend on the previous kernel: their loads
     * are issued before pdl_wait and overlap its tail (the one exception to
     * waiting first: nothing is written, and nobody returns, before it). */
    float4 wa[HS_ROWS], wb[HS_ROWS];
#pragma unroll
    for (int j = 0; j < HS_ROWS; j++)
        if (wid + 8 * j < mw) ld8w(wtype, W + (uint64_t)(wid + 8 * j) * rb, col / 8, &wa[j], &wb[j]);
    if (pm) hc_coeffs_early(pm, pscale, pbase, hc, iters, hc_eps, mp, c);
    pdl_wait();
    __syncthreads();
    {   /* 1: thread i owns X_c[k], c = i / kb, k = k0 + i % kb */
        int ci = tid / kb;
        int64_t k = k0 + tid % kb;
        float v;
        if (pm) {
            float yk = y[k];
            if (eout) {
                float a = 0;
                for (int i = 0; i < used; i++) a += eout[i * d + k];
                yk = a + yk;
            }
            const float *post = c + hc, *C = c + 2 * hc;
            float old[4];   /* hc ≤ 4; unrolled with guards so it stays in registers */
#pragma unroll
            for (int a = 0; a < 4; a++) old[a] = a < hc ? X[a * d + k] : 0.0f;
            v = post[ci] * yk;
#pragma unroll
            for (int a = 0; a < 4; a++)
                if (a < hc) v += C[a * hc + ci] * old[a];
        } else v = X[ci * d + k];
        xs[tid] = v;
        __syncthreads();   /* every old X read before any is overwritten */
        if (pm) X[ci * d + k] = v;
    }
    /* 2: this lane's 8 values (columns col …) of the flattened state */
    const float4 *xp = (const float4 *)(xs + a * kb + 8 * (lane % per));
    float4 x0 = xp[0], x1 = xp[1];
    if (wid == 0) {
        double q = (double)x0.x * x0.x + (double)x0.y * x0.y + (double)x0.z * x0.z + (double)x0.w * x0.w +
                   (double)x1.x * x1.x + (double)x1.y * x1.y + (double)x1.z * x1.z + (double)x1.w * x1.w;
        q = warp_sum_d(q);
        if (!lane) d_hs_ss[blockIdx.x] = q;
    }
#pragma unroll
    for (int j = 0; j < HS_ROWS; j++) {
        int r = wid + 8 * j;
        if (r >= mw) continue;
        float s = wa[j].x * x0.x;
        s = fmaf(wa[j].y, x0.y, s); s = fmaf(wa[j].z, x0.z, s); s = fmaf(wa[j].w, x0.w, s);
        s = fmaf(wb[j].x, x1.x, s); s = fmaf(wb[j].y, x1.y, s); s = fmaf(wb[j].z, x1.z, s); s = fmaf(wb[j].w, x1.w, s);
        s = warp_sum(s);
        if (!lane) d_hs_part[r * nb + blockIdx.x] = s;
    }
    /* 3: the X slice and partials visible device-wide, then count arrivals */
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        last = atomicAdd(&d_hs_count, 1u) == (unsigned)nb - 1;
        if (last) d_hs_count = 0;   /* every block has arrived: ready for the next launch */
    }
    __syncthreads();
    if (!last) return;
    hc_regs g;   /* in flight during the partial sums */
    hc_load(X, d, hc, nw, g);
    int64_t zw = (int64_t)hc * d;
    double ss = 0;
    if (wid == 0) {
        for (int b = lane; b < nb; b += 32) ss += __ldcg(d_hs_ss + b);
        ss = warp_sum_d(ss);
    }
    float mr[HS_ROWS];
#pragma unroll
    for (int j = 0; j < HS_ROWS; j++) {
        int r = wid + 8 * j;
        float s = 0;
        if (r < mw)
            for (int b = lane; b < nb; b += 32) s += __ldcg(d_hs_part + r * nb + b);
        mr[j] = warp_sum(s);
    }
    if (wid == 0 && !lane) shd[0] = ss;
    __syncthreads();
    float rms = (float)sqrt(shd[0] / (double)zw + rms_eps);
#pragma unroll
    for (int j = 0; j < HS_ROWS; j++)
        if (wid + 8 * j < mw && !lane) m[wid + 8 * j] = mr[j] / rms;
    __syncthreads();
    if (mout && tid < mw) mout[tid] = m[tid];   /* the next post derives its coefficients from these */
    hc_finish(g, d, hc, m, scale, base, iters, hc_eps, rms_eps, NULL, nrm, c, shd);
}

/* A chunk's HC collapse, one block (HS_THREADS) per token: the mixer
 * outputs (mix: the chunk product, mw a token) over rms (k_rms_rows), then
 * hc_finish: one Sinkhorn a token (k_hc_pre's blocks each redid it) and the
 * norm fused (no k_rmsnorm pass). Head: mw = hc, coef NULL. */
__global__ void __launch_bounds__(HS_THREADS)
k_hc_rows(const float *X, int64_t d, int hc, const float *mix, int mw, const float *rms, const float *scale,
          const float *base, int iters, float hc_eps, float rms_eps, const float *nw, float *coef, float *nrm) {
    pdl_wait();
    __shared__ float m[HS_ROWS * 8], c[(2 + MAX_HC) * MAX_HC];
    __shared__ double shd[32];
    int64_t t = blockIdx.x;
    hc_regs g;
    hc_load(X + t * hc * d, d, hc, nw, g);
    if (threadIdx.x < mw) m[threadIdx.x] = mix[t * mw + threadIdx.x] / rms[t];
    __syncthreads();
    hc_finish(g, d, hc, m, scale, base, iters, hc_eps, rms_eps, coef ? coef + t * (2 + hc) * hc : NULL, nrm + t * d,
              c, shd);
}

/* rms of each row of n (one block per row), as k_hc_pre computes it. */
__global__ void k_rms_rows(const float *x, int64_t n, float eps, float *rms) {
    pdl_wait();
    __shared__ double shd[32];
    double ss = block_sum_d(sumsq_part(x + blockIdx.x * n, n), shd);
    if (threadIdx.x == 0) rms[blockIdx.x] = (float)sqrt(ss / (double)n + eps);
}

/* X'_c = post_c·y + Σ_a comb[a][c]·X_a; with eout (the FFN), y + Σ_slot
 * eout first, slot order (the moe sum, fused: one launch and one pass less).
 * Coefficients from coef (a token's (2+hc)·hc each), or for one decode
 * token from the mixer outputs pm of k_hc_step (hc_coeffs_early). */
__global__ void k_hc_post(float *X, int64_t d, int hc, const float *coef, const float *y, const float *eout, int used,
                          const float *pm, const float *pscale, const float *pbase, int iters, float hc_eps) {
    __shared__ float mp[HS_ROWS * 8], cs[(2 + MAX_HC) * MAX_HC];
    if (pm) hc_coeffs_early(pm, pscale, pbase, hc, iters, hc_eps, mp, cs);
    pdl_wait();
    __syncthreads();
    int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (k >= d) return;
    X += t * hc * d;
    coef = pm ? cs : coef + t * (2 + hc) * hc;
    y += t * d;
    float yk = y[k];
    if (eout) {
        eout += t * used * d;
        float a = 0;
        for (int i = 0; i < used; i++) a += eout[i * d + k];
        yk = a + yk;
    }
    const float *post = coef + hc, *C = coef + 2 * hc;
    float old[MAX_HC];
    for (int a = 0; a < hc; a++) old[a] = X[a * d + k];
    for (int c = 0; c < hc; c++) {
        float v = post[c] * yk;
        for (int a = 0; a < hc; a++) v += C[a * hc + c] * old[a];
        X[c * d + k] = v;
    }
}

/* ---- norms, Q/KV paths (spec §4.4) ----------------------------------------- */

/* o = v / sqrt(mean(v²) + eps) ⊙ w (w may be NULL) for one vector by one
 * block (n % 4 == 0, v 16-byte aligned), in place or not. */
__device__ void rmsnorm_vec(const float *v, const float *w, int n, float eps, float *o, double *shd) {
    double ss = block_sum_d(sumsq_part(v, n), shd);
    float r = (float)(1.0 / sqrt(ss / (double)n + eps));
    for (int k = threadIdx.x; k < n; k += blockDim.x) o[k] = w ? v[k] * r * w[k] : v[k] * r;
}

/* One vector of n per block (blockIdx.x·stride), in place or to out. */
__global__ void k_rmsnorm(const float *x, const float *w, int n, float eps, float *out, int64_t stride) {
    pdl_wait();
    __shared__ double shd[32];
    rmsnorm_vec(x + blockIdx.x * stride, w, n, eps, out + blockIdx.x * stride, shd);
}

/* Query heads: unweighted RMSNorm, RoPE on the tail. A warp per head,
 * QH_HEADS heads of one token per block (grid: heads / QH_HEADS, tokens):
 * the RoPE angles (double, as the CPU) are computed once per block instead
 * of once per head — with a block per head they were most of this kernel
 * in a prefill chunk. Dynamic shared memory: rope_dim floats. */
#define QH_HEADS 8
__global__ void k_q_heads(float *q, int H, int hd, int rd, const double *freq, const dstep *st, float eps) {
    pdl_wait();
    extern __shared__ float cs[];   /* (cos, sin) of pair k at 2k, 2k+1 */
    int t = blockIdx.y, lane = threadIdx.x & 31, h = blockIdx.x * QH_HEADS + (threadIdx.x >> 5);
    int64_t pos = st[t].pos;
    for (int k = threadIdx.x; k < rd / 2; k += blockDim.x) {
        double ang = (double)pos * freq[k];
        cs[2 * k] = (float)cos(ang);
        cs[2 * k + 1] = (float)sin(ang);
    }
    __syncthreads();
    if (h >= H) return;
    float *g = q + ((int64_t)t * H + h) * hd, *tail = g + hd - rd;
    double ss = 0;
    for (int k = lane; k < hd; k += 32) ss += (double)g[k] * g[k];
    float r = (float)(1.0 / sqrt(warp_sum_d(ss) / (double)hd + eps));
    for (int k = lane; k < hd - rd; k += 32) g[k] = g[k] * r;
    for (int k = lane; k < rd / 2; k += 32) {   /* blk_rope's arithmetic on the normed pair */
        float c = cs[2 * k], s = cs[2 * k + 1], x0 = tail[2 * k] * r, x1 = tail[2 * k + 1] * r;
        tail[2 * k] = x0 * c - x1 * s;
        tail[2 * k + 1] = x0 * s + x1 * c;
    }
}

/* A K=V row at pos by one block (in place): weighted RMSNorm, RoPE, FP8 on
 * the non-RoPE part, f16 rounding; also written into the raw-ring slot when
 * ring is given (the caller knows whether the chunk is short enough that no
 * slot it overwrites is still read by its tokens). sv: hd floats, shared. */
__device__ void kv_row_block(float *kv, const float *w, int hd, int rd, const double *freq, int64_t pos, float eps,
                             float *ring, uint32_t keep, float *sv, double *shd) {
    for (int k = threadIdx.x; k < hd; k += blockDim.x) sv[k] = kv[k];
    __syncthreads();
    blk_rmsnorm(sv, hd, w, eps, shd);
    blk_rope(sv + hd - rd, rd / 2, freq, pos, false);
    if (d_qat) blk_fp8(sv, hd - rd);
    float *out = ring ? ring + (size_t)(pos % keep) * hd : NULL;
    for (int k = threadIdx.x; k < hd; k += blockDim.x) {
        float v = d_qat ? round_f16(sv[k]) : sv[k];
        kv[k] = v;
        if (out) out[k] = v;
    }
}

/* The attention's two single-vector norms of the chunk in one launch (grid
 * 2n; a block a multiple of 32 threads, ≥ hd/4 for blk_fp8): block t < n
 * the q_a row of token t (k_rmsnorm's arithmetic, in place), block n + t
 * its K=V row (kv_row_block). Each was a launch of one block a token: a few
 * µs of one SM in decode. Dynamic shared memory: hd floats. */
__global__ void k_qa_kv(float *qa, const float *qw, int ql, float *kv, const float *kw, int hd, int rd,
                        const double *freq, const dstep *st, float eps, float *ring, uint32_t keep, int n) {
    pdl_wait();
    extern __shared__ float sv[];
    __shared__ double shd[32];
    int64_t t = blockIdx.x;
    if (t < n) {
        rmsnorm_vec(qa + t * ql, qw, ql, eps, qa + t * ql, shd);
        return;
    }
    t -= n;
    kv_row_block(kv + t * hd, kw, hd, rd, freq, st[t].pos, eps, ring, keep, sv, shd);
}

/* Raw-ring store of the chunk's last min(T, keep) rows after its attention
 * (chunks too long for k_kv_row's direct write). Block per row. */
__global__ void k_raw_store(const float *kv, int hd, const dstep *st, int64_t T, float *ring, uint32_t keep) {
    pdl_wait();
    int64_t t = T - 1 - blockIdx.x;
    float *out = ring + (size_t)(st[t].pos % keep) * hd;
    for (int k = threadIdx.x; k < hd; k += blockDim.x) out[k] = kv[t * hd + k];
}

/* ---- compressor (spec §4.5) -------------------------------------------------- */

/* Store the chunk's projected kv and gate + ape[pos % R] in their ring
 * slots, after k_comp_emit read them: only the last keep positions (earlier
 * ones would share slots with them). blockIdx.y = t − (T − min(T, keep)). */
__global__ void k_comp_store(const float *pk, const float *pg, int ape_type, const uint8_t *ape, uint64_t ape_rb,
                             int W, int R, const dstep *st, int64_t T, float *rkv, float *rg, uint32_t keep) {
    pdl_wait();
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int64_t t = T - (int64_t)gridDim.y + blockIdx.y, pos = st[t].pos;
    uint32_t slot = (uint32_t)(pos % keep);
    if (c >= W / 8) return;
    float v[8];
    deq_chunk(ape_type, ape + (uint64_t)(pos % R) * ape_rb, c, v);
    for (int k = 0; k < 8; k++) {
        rkv[(size_t)slot * W + 8 * c + k] = pk[t * W + 8 * c + k];
        rg[(size_t)slot * W + 8 * c + k] = pg[t * W + 8 * c + k] + v[k];
    }
}

/* Element j of row `row` of a small table (ape), any layout deq_chunk reads. */
__device__ __forceinline__ float deq_one(int type, const uint8_t *row, int64_t j) {
    float v[8];
    deq_chunk(type, row, j >> 3, v);
    return v[j & 7];
}

/* Emit the compressed rows of every block the chunk completes (block i of
 * the grid: b = p0/R + i, if (b+1)·R ≤ p0 + T): softmax-gated pooling over
 * the block (and the previous block's lane a for two lanes), norm, RoPE at
 * bR, QAT, f16 (comp_emit of the CPU). A position's inputs come from the
 * chunk's projections (pk, pg + ape) when it is in the chunk, else from the
 * ring (stored with ape): the ring is updated after this kernel, so a long
 * chunk never overwrites inputs a block still needs. Blocks of ≥ D threads. */
__device__ void comp_emit_block(const float *pk, const float *pg, int ape_type, const uint8_t *ape, uint64_t ape_rb,
                                const float *kv, const float *gate, uint32_t keep, int R, int lanes, int D,
                                const dstep *st, int64_t T, const float *norm_w, const double *freq, int rd, float eps,
                                bool indexer, float *out) {
    extern __shared__ float sv[];
    __shared__ double shd[32];
    uint64_t p0 = st[0].pos, b = p0 / (uint64_t)R + blockIdx.x;
    if ((b + 1) * (uint64_t)R > p0 + (uint64_t)T) return;   /* not completed in this chunk (uniform per block) */
    int W = lanes * D;
    uint64_t bR = b * R;
    bool prev = lanes == 2 && b > 0;
    int off = lanes == 2 ? D : 0;
#define CG(q, c) ((q) >= p0 ? pg[((q) - p0) * W + (c)] + deq_one(ape_type, ape + ((q) % R) * ape_rb, (c)) \
                            : gate[((q) % keep) * W + (c)])
#define CK(q, c) ((q) >= p0 ? pk[((q) - p0) * W + (c)] : kv[((q) % keep) * W + (c)])
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float m = -INFINITY;
        if (prev) for (uint64_t t = bR - R; t < bR; t++) m = fmaxf(m, CG(t, j));
        for (uint64_t t = bR; t < bR + R; t++) m = fmaxf(m, CG(t, off + j));
        float den = 0, acc = 0;
        if (prev)
            for (uint64_t t = bR - R; t < bR; t++) {
                float w = expf(CG(t, j) - m);
                den += w; acc += w * CK(t, j);
            }
        for (uint64_t t = bR; t < bR + R; t++) {
            float w = expf(CG(t, off + j) - m);
            den += w; acc += w * CK(t, off + j);
        }
        sv[j] = acc / den;
    }
#undef CG
#undef CK
    __syncthreads();
    blk_rmsnorm(sv, D, norm_w, eps, shd);
    blk_rope(sv + D - rd, rd / 2, freq, (int64_t)bR, false);
    if (d_qat && indexer) blk_fp4(sv, D);
    else if (d_qat) blk_fp8(sv, D - rd);
    for (int j = threadIdx.x; j < D; j += blockDim.x) out[(size_t)b * D + j] = d_qat ? round_f16(sv[j]) : sv[j];
}
__global__ void k_comp_emit(const float *pk, const float *pg, int ape_type, const uint8_t *ape, uint64_t ape_rb,
                            const float *kv, const float *gate, uint32_t keep, int R, int lanes, int D, const dstep *st,
                            int64_t T, const float *norm_w, const double *freq, int rd, float eps, bool indexer,
                            float *out) {
    pdl_wait();
    comp_emit_block(pk, pg, ape_type, ape, ape_rb, kv, gate, keep, R, lanes, D, st, T, norm_w, freq, rd, eps, indexer,
                    out);
}

/* One decode token's compressor step in one block (was k_comp_emit +
 * k_comp_store, two launches of one block each): the emission of the block
 * it completes, if any, then its ring store (k_comp_store's arithmetic).
 * The barrier between them keeps the order of the two launches: every ring
 * read of the emission is done before the token's slot is overwritten.
 * nthreads(D) threads, D floats of dynamic shared memory. */
__global__ void k_comp_one(const float *pk, const float *pg, int ape_type, const uint8_t *ape, uint64_t ape_rb,
                           float *kv, float *gate, uint32_t keep, int R, int lanes, int D, const dstep *st,
                           const float *norm_w, const double *freq, int rd, float eps, bool indexer, float *out) {
    pdl_wait();
    comp_emit_block(pk, pg, ape_type, ape, ape_rb, kv, gate, keep, R, lanes, D, st, 1, norm_w, freq, rd, eps, indexer,
                    out);
    __syncthreads();
    int W = lanes * D;
    int64_t pos = st[0].pos;
    uint32_t slot = (uint32_t)(pos % keep);
    for (int c = threadIdx.x; c < W / 8; c += blockDim.x) {
        float v[8];
        deq_chunk(ape_type, ape + (uint64_t)(pos % R) * ape_rb, c, v);
        for (int k = 0; k < 8; k++) {
            kv[(size_t)slot * W + 8 * c + k] = pk[8 * c + k];
            gate[(size_t)slot * W + 8 * c + k] = pg[8 * c + k] + v[k];
        }
    }
}

/* The compressor's two products of one decode x (comp_kv and comp_gate:
 * same type and shape) in one launch, blockIdx.y picking the matrix: twice
 * the blocks of one k_matvec / k_matvec_wide (whose arithmetic each half
 * keeps: a block per row when wide, else a warp per row). */
__global__ void k_matvec_two(int type, const uint8_t *__restrict__ Wa, const uint8_t *__restrict__ Wb, uint64_t rb,
                             int64_t n_in, int64_t rows, const float *__restrict__ x, float *ya, float *yb, bool wide) {
    pdl_wait();
    const uint8_t *W = blockIdx.y ? Wb : Wa;
    float *y = blockIdx.y ? yb : ya;
    if (wide) {
        __shared__ float sh[32];
        float acc = block_sum(row_dot(type, W + (uint64_t)blockIdx.x * rb, n_in / 8, x, threadIdx.x, blockDim.x), sh);
        if (threadIdx.x == 0) y[blockIdx.x] = acc;
        return;
    }
    int lane = threadIdx.x & 31;
    int64_t r = (int64_t)blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (r >= rows) return;
    float acc = warp_sum(row_dot(type, W + (uint64_t)r * rb, n_in / 8, x, lane, 32));
    if (!lane) y[r] = acc;
}

/* ---- indexer (spec §4.6) ------------------------------------------------------ */

/* Indexer query heads: RoPE on the tail, Hadamard+FP4; weights scaled. Block per (head, token). */
__global__ void k_idx_heads(float *iq, float *iw, int ihd, int rd, const double *freq, const dstep *st, float wscale) {
    pdl_wait();
    extern __shared__ float sv[];
    int64_t pos = st[blockIdx.y].pos;
    iw += (int64_t)blockIdx.y * gridDim.x;
    float *g = iq + ((int64_t)blockIdx.y * gridDim.x + blockIdx.x) * ihd;
    for (int k = threadIdx.x; k < ihd; k += blockDim.x) sv[k] = g[k];
    __syncthreads();
    blk_rope(sv + ihd - rd, rd / 2, freq, pos, false);
    if (d_qat) blk_fp4(sv, ihd);
    for (int k = threadIdx.x; k < ihd; k += blockDim.x) g[k] = sv[k];
    if (threadIdx.x == 0) iw[blockIdx.x] *= wscale;
}

/* score_c = Σ_h w_h · max(0, q_h · k_c) for the (pos+1)/4 visible rows of
 * token blockIdx.y (scores at score + blockIdx.y·ld), as the CPU's idx_task:
 * each product w_h·max(0, dot) rounded once, heads summed in ascending order
 * (the chunk kernel k_idx_chunk does the same), so the top-k sees the CPU's
 * scores. Tiles of 32 rows copied to shared memory (cp.async, row stride
 * ihd + 4 floats: a quarter-warp's 16-byte reads of 8 rows hit distinct
 * banks), a row per lane; warp w takes heads 8w … 8w+7 (and 64 on, … where
 * ih > 64) with q broadcast from L1, all 8 loads of a step issued together
 * (no early exit between them); the products meet in shared memory and
 * lanes of warp 0 sum them. Fixed grid over the state's capacity (decode
 * graphs replay at every position), blocks loop over tiles. 256 threads,
 * idx_scores_smem(ih, ihd) bytes of dynamic shared memory. */
#define IDX_TILE 32
#define IDX_HPT 8
__host__ __device__ constexpr size_t idx_scores_smem(int ih, int ihd) {
    return (size_t)IDX_TILE * (ihd + 4) * sizeof(float) + (size_t)IDX_TILE * (ih + 1) * sizeof(float);
}
__global__ void __launch_bounds__(256) k_idx_scores(const float *iq, const float *iw, const float *rows, const dstep *st,
                                                    int ih, int ihd, float *score, int64_t ld) {
    pdl_wait();
    extern __shared__ float4 ixs_sm[];
    const int KS = ihd / 4 + 1, lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int groups = (ih + IDX_HPT - 1) / IDX_HPT;
    float4 *srow = ixs_sm;                          /* IDX_TILE × KS */
    float *se = (float *)(ixs_sm + IDX_TILE * KS);   /* IDX_TILE × (ih + 1): row lane's product of head h at lane·(ih+1) + h */
    const int64_t nrows = (st[blockIdx.y].pos + 1) / 4;
    const float4 *q4 = (const float4 *)(iq + (int64_t)blockIdx.y * ih * ihd), *r4 = (const float4 *)rows;
    iw += (int64_t)blockIdx.y * ih;
    score += (int64_t)blockIdx.y * ld;
    for (int64_t r0 = (int64_t)blockIdx.x * IDX_TILE; r0 < nrows; r0 += (int64_t)gridDim.x * IDX_TILE) {
        __syncthreads();   /* the previous tile's rows and products are consumed */
        for (int i = threadIdx.x; i < IDX_TILE * (ihd / 4); i += blockDim.x) {
            int rr = i / (ihd / 4), c = i % (ihd / 4);
            int64_t r = r0 + rr < nrows ? r0 + rr : nrows - 1;   /* past the end: a real row, result unused */
            att_cp16(srow + rr * KS + c, r4 + r * (ihd / 4) + c);
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
        __syncthreads();
        for (int g = wid; g < groups; g += nw) {
            float acc[IDX_HPT];
            const float4 *qh[IDX_HPT];   /* heads past ih read the last one, results unused: no branch */
            const int hb = g * IDX_HPT;
#pragma unroll
            for (int j = 0; j < IDX_HPT; j++) {
                acc[j] = 0;
                qh[j] = q4 + (int64_t)(hb + j < ih ? hb + j : ih - 1) * (ihd / 4);
            }
#pragma unroll 2
            for (int c = 0; c < ihd / 4; c++) {
                float4 x = srow[lane * KS + c];
#pragma unroll
                for (int j = 0; j < IDX_HPT; j++) {
                    float4 y = __ldg(qh[j] + c);   /* same address in every lane */
                    acc[j] = fmaf(x.x, y.x, acc[j]); acc[j] = fmaf(x.y, y.y, acc[j]);
                    acc[j] = fmaf(x.z, y.z, acc[j]); acc[j] = fmaf(x.w, y.w, acc[j]);
                }
            }
#pragma unroll
            for (int j = 0; j < IDX_HPT; j++)
                if (hb + j < ih) se[lane * (ih + 1) + hb + j] = __fmul_rn(__ldg(iw + hb + j), fmaxf(0.0f, acc[j]));
        }
        __syncthreads();
        if (wid == 0 && r0 + lane < nrows) {
            float sc = 0;
#pragma unroll 8
            for (int h = 0; h < ih; h++) sc = __fadd_rn(sc, se[lane * (ih + 1) + h]);
            score[r0 + lane] = sc;
        }
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
 * output ascending. One block of 1024 threads; thread i owns the contiguous
 * segment i·seg … of the keys, held in registers while seg ≤ TOPK_KPT (up
 * to 8192 rows, a 32K context), else re-read each pass. Histogram counts are
 * aggregated per warp (__match_any_sync: a layer's scores share their top
 * bits, and per-key shared atomics on one bin serialise); the bin holding
 * the k-th key is found by a warp scan; the output places each segment by
 * one block scan of its (above T, equal to T) counts. */
#define TOPK_KPT 8
__global__ void __launch_bounds__(1024) k_topk(const float *score, const dstep *st, int64_t n_fixed, int64_t k,
                                               int32_t *out, int64_t ld) {
    pdl_wait();
    score += blockIdx.x * ld;   /* block per token of a chunk (ld: score row stride) */
    out += blockIdx.x * k;
    if (st) st += blockIdx.x;
    int64_t n = st ? (int64_t)(st->pos + 1) / 4 : n_fixed;   /* indexer: the visible rows */
    if (st && n <= k) return;   /* every row is attended: no selection */
    __shared__ uint32_t hist[256];
    __shared__ uint32_t s_prefix, s_need;
    __shared__ unsigned long long s_wsum[32];
    const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5, nw = blockDim.x >> 5;
    const int64_t seg = (n + blockDim.x - 1) / blockDim.x, a0 = tid * seg < n ? tid * seg : n,
                  a1 = a0 + seg < n ? a0 + seg : n;
    const bool reg = seg <= TOPK_KPT;
    uint32_t kr[TOPK_KPT];
#pragma unroll
    for (int j = 0; j < TOPK_KPT; j++) kr[j] = reg && a0 + j < a1 ? fkey(score[a0 + j]) : 0;
    /* key j0 + j of this thread's segment (in range: a0 + j0 + j < a1) */
#define TOPK_KEY(j0, j) (reg ? kr[j] : fkey(score[a0 + (j0) + (j)]))
    if (tid == 0) { s_prefix = 0; s_need = (uint32_t)k; }
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        const uint32_t pre = s_prefix;
        for (int64_t j0 = 0; j0 < seg; j0 += TOPK_KPT)   /* the same trip counts in every lane */
#pragma unroll
            for (int j = 0; j < TOPK_KPT; j++) {
                uint32_t b = 256;   /* no count */
                if (a0 + j0 + j < a1) {
                    uint32_t key = TOPK_KEY(j0, j);
                    if ((key & mask) == pre) b = (key >> shift) & 255;
                }
                uint32_t peers = __match_any_sync(0xffffffffu, b);
                if (b < 256 && lane == __ffs(peers) - 1) atomicAdd(&hist[b], (uint32_t)__popc(peers));
            }
        __syncthreads();
        if (wid == 0) {   /* lane l owns bins 255−8l … 248−8l; the bin where the count from the top reaches need */
            const uint32_t need = s_need;
            uint32_t c[8], tot = 0;
#pragma unroll
            for (int j = 0; j < 8; j++) { c[j] = hist[255 - 8 * lane - j]; tot += c[j]; }
            uint32_t inc = tot;
            for (int o = 1; o < 32; o <<= 1) {
                uint32_t v = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += v;
            }
            uint32_t cum = inc - tot;
            if (cum < need && inc >= need) {
                int bin = 255 - 8 * lane;
                for (int j = 0; j < 7 && cum + c[j] < need; j++, bin--) cum += c[j];
                s_need = need - cum;
                s_prefix = pre | (uint32_t)bin << shift;
            }
        }
        mask |= 255u << shift;
        __syncthreads();
    }
    const uint32_t T = s_prefix, need_eq = s_need;
    uint32_t gt = 0, eq = 0;
    for (int64_t j0 = 0; j0 < seg; j0 += TOPK_KPT)
#pragma unroll
        for (int j = 0; j < TOPK_KPT; j++)
            if (a0 + j0 + j < a1) {
                uint32_t key = TOPK_KEY(j0, j);
                gt += key > T;
                eq += key == T;
            }
    /* exclusive prefix of (gt, eq) over threads, both packed in one 64-bit sum (each total ≤ n < 2^32) */
    const unsigned long long v = (unsigned long long)gt << 32 | eq;
    unsigned long long inc = v;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned long long u = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += u;
    }
    if (lane == 31) s_wsum[wid] = inc;
    __syncthreads();
    if (wid == 0) {
        unsigned long long w = lane < nw ? s_wsum[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            unsigned long long u = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += u;
        }
        s_wsum[lane] = w;
    }
    __syncthreads();
    const unsigned long long before = inc - v + (wid ? s_wsum[wid - 1] : 0);
    uint32_t eqb = (uint32_t)before, pos = (uint32_t)(before >> 32) + (eqb < need_eq ? eqb : need_eq);
    for (int64_t j0 = 0; j0 < seg; j0 += TOPK_KPT)
#pragma unroll
        for (int j = 0; j < TOPK_KPT; j++)
            if (a0 + j0 + j < a1) {
                uint32_t key = TOPK_KEY(j0, j);
                if (key > T) out[pos++] = (int32_t)(a0 + j0 + j);
                else if (key == T) {
                    if (eqb < need_eq) out[pos++] = (int32_t)(a0 + j0 + j);
                    eqb++;
                }
            }
#undef TOPK_KEY
}

/* ---- attention (spec §4.4) ---------------------------------------------------- */

/* Split attention (flash-decoding): one K=V row serves every head (MQA), so a
 * block takes ATT_HG heads and one of up to ATT_SPLITS consecutive slices of
 * the visible rows, reads each row of its slice once (tiles in shared
 * memory) and keeps per head a running max, sum and unnormalised output;
 * k_att_combine merges the slices in ascending order (no atomics: the
 * result does not depend on scheduling). The grid is fixed (a decode graph
 * replays at every position); the slice count follows the row count, so a
 * short context takes fewer, fuller slices and the surplus blocks exit. */
#define ATT_HG 8               /* heads per block: one warp each (score and softmax), 256 threads */
#define ATT_SPLITS 48          /* slices per (head group, token): 8 groups × 48 ≈ 3 blocks per SM at H 64 */
#define ATT_MIN_ROWS 8         /* fewest rows worth a slice */
#define ATT_TILE_FLOATS 8192   /* row tile: 32 KB of shared memory */

/* Rows token t of a chunk sees: its raw window lo … pos (rows of the chunk,
 * positions ≥ p0, from kvc, older ones from the ring), then n_comp
 * compressed rows (the indexer's selection when it chose, else all visible). */
struct att_span {
    int64_t pos, p0, lo, nraw, n;
    const int32_t *sel;
};
__device__ __forceinline__ att_span att_rows(const dstep *st0, const dstep *st, int64_t t, uint32_t window, int ratio,
                                             int64_t topk, const int32_t *selbuf) {
    att_span a;
    a.pos = st[t].pos;
    a.p0 = st0->pos;
    int64_t n_comp = ratio > 0 ? (a.pos + 1) / ratio : 0;
    a.sel = NULL;
    if (ratio == 4 && n_comp > topk) { n_comp = topk; a.sel = selbuf + t * topk; }
    a.lo = a.pos >= (int64_t)window - 1 ? a.pos - (window - 1) : 0;
    a.nraw = a.pos - a.lo + 1;
    a.n = a.nraw + n_comp;
    return a;
}
__device__ __forceinline__ const float4 *att_row(const att_span &a, int64_t r, const float *kvc, const float *raw,
                                                 uint32_t keep_raw, const float *comp, int hd) {
    const float *p;
    if (r < a.nraw) {
        int64_t ps = a.lo + r;
        p = ps >= a.p0 ? kvc + (size_t)(ps - a.p0) * hd : raw + (size_t)(ps % keep_raw) * hd;
    } else {
        p = comp + (size_t)(a.sel ? a.sel[r - a.nraw] : r - a.nraw) * hd;
    }
    return (const float4 *)p;
}
/* Slices of a span: ≥ ATT_MIN_ROWS rows each where possible, never empty. */
__device__ __forceinline__ int att_nsplit(int64_t n, int splits) {
    int64_t s = (n + ATT_MIN_ROWS - 1) / ATT_MIN_ROWS;
    return s < 1 ? 1 : s > splits ? splits : (int)s;
}

/* Grid (head groups, ATT_SPLITS, tokens), 32·ATT_HG threads; dynamic shared
 * memory tile·hd + ATT_HG·tile + ATT_HG floats, tile = min(32, 8192/hd)
 * rows; NV = hd/128 float4 per lane per row (a template parameter:
 * registers for exactly the head_dim, so several blocks fit an SM). With
 * qeps ≥ 0 the query heads come straight from q_b and each block finishes
 * its heads first (k_q_heads' unweighted RMSNorm and RoPE on the tail, one
 * launch less a layer; every slice block of a group derives the same
 * values). Warp w scores its head h0+w against the tile (q in registers,
 * rows read as float4 across the warp: head_dim a multiple of 128) and
 * updates that head's running max m and sum l; then every thread adds the
 * weighted rows to its (head, 4 columns) outputs. Writes per (token, slice,
 * head) the unnormalised output to part and (m, l) to ml. */
template <int NV>
__global__ void __launch_bounds__(32 * ATT_HG, 3)
k_att_split(const float *q, float qeps, const float *kvc, const float *raw, uint32_t keep_raw, const dstep *st0,
            const dstep *st, uint32_t window, const float *comp, const int32_t *selbuf, int ratio, int64_t topk, int H,
            int rd, const double *freq, float scale, float *part, float *ml) {
    pdl_wait();
    extern __shared__ float4 att_sm[];
    constexpr int hd = 128 * NV, C = 32 * NV, TILE = ATT_TILE_FLOATS / hd < 32 ? ATT_TILE_FLOATS / hd : 32;
    float4 *srow = att_sm;   /* TILE × C */
    float *sp = (float *)(att_sm + TILE * C), *salpha = sp + ATT_HG * TILE;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, h0 = blockIdx.x * ATT_HG, S = gridDim.y;
    const int64_t t = blockIdx.z;
    const att_span a = att_rows(st0, st, t, window, ratio, topk, selbuf);
    const int ns = att_nsplit(a.n, S), s = blockIdx.y;
    if (s >= ns) return;   /* k_att_combine reads slices < ns only */
    const int64_t r0 = s * a.n / ns, r1 = (s + 1) * a.n / ns;
    const int hw = h0 + wid;   /* this warp's head for the scores */
    float4 qr[NV];
#pragma unroll
    for (int i = 0; i < NV; i++)
        qr[i] = hw < H ? ((const float4 *)(q + (t * H + hw) * (int64_t)hd))[lane + 32 * i]
                                 : make_float4(0, 0, 0, 0);
    if (qeps >= 0 && hw < H) {   /* lane's float4 i: elements e … e+3, e = 4·(lane + 32i); rd % 4 = 0 */
        double ss = 0;
#pragma unroll
        for (int i = 0; i < NV; i++) {
            ss += (double)qr[i].x * qr[i].x; ss += (double)qr[i].y * qr[i].y;
            ss += (double)qr[i].z * qr[i].z; ss += (double)qr[i].w * qr[i].w;
        }
        const float r = (float)(1.0 / sqrt(warp_sum_d(ss) / (double)hd + qeps));
#pragma unroll
        for (int i = 0; i < NV; i++) {
            float4 v = qr[i];
            v.x *= r; v.y *= r; v.z *= r; v.w *= r;
            const int e = 4 * (lane + 32 * i);
            if (e >= hd - rd) {   /* two RoPE pairs, k and k + 1 */
                const int k = (e - (hd - rd)) / 2;
                double ang = (double)a.pos * freq[k];
                float c = (float)cos(ang), sn = (float)sin(ang), x0 = v.x, x1 = v.y;
                v.x = x0 * c - x1 * sn;
                v.y = x0 * sn + x1 * c;
                ang = (double)a.pos * freq[k + 1];
                c = (float)cos(ang); sn = (float)sin(ang); x0 = v.z; x1 = v.w;
                v.z = x0 * c - x1 * sn;
                v.w = x0 * sn + x1 * c;
            }
            qr[i] = v;
        }
    }
    float m = -INFINITY, l = 0;   /* warp wid's head, the same in every lane */
    float4 acc[NV];   /* item i: index threadIdx.x + 256·i of ATT_HG × C (exactly NV a thread) → head idx / C, column idx % C */
#pragma unroll
    for (int i = 0; i < NV; i++) acc[i] = make_float4(0, 0, 0, 0);
    for (int64_t rt = r0; rt < r1; rt += TILE) {
        const int nt = r1 - rt < TILE ? (int)(r1 - rt) : TILE;
        __syncthreads();   /* the previous tile is consumed */
        /* warp w copies rows w, w + 8, … (cp.async: every copy in flight at once, no registers) */
#pragma unroll
        for (int k = 0; k < TILE / ATT_HG; k++)
            if (wid + k * ATT_HG < nt) {
                const float4 *row = att_row(a, rt + wid + k * ATT_HG, kvc, raw, keep_raw, comp, hd);
#pragma unroll
                for (int i = 0; i < NV; i++) att_cp16(srow + (wid + k * ATT_HG) * C + lane + 32 * i, row + lane + 32 * i);
            }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
        __syncthreads();
        if (hw < H) {
            float sc = -INFINITY;   /* lane rr holds row rr's score */
            for (int r4 = 0; r4 < nt; r4 += 4) {   /* 4 rows' warp sums interleaved */
                float d[4] = {0, 0, 0, 0};
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const float4 *row = srow + (r4 + j) * C;   /* rows ≥ nt: stale, discarded */
#pragma unroll
                    for (int i = 0; i < NV; i++) {
                        float4 x = row[lane + 32 * i];
                        d[j] = fmaf(x.x, qr[i].x, d[j]); d[j] = fmaf(x.y, qr[i].y, d[j]);
                        d[j] = fmaf(x.z, qr[i].z, d[j]); d[j] = fmaf(x.w, qr[i].w, d[j]);
                    }
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    float e = warp_sum(d[j]) * scale;
                    if (lane == r4 + j && lane < nt) sc = e;
                }
            }
            float mn = fmaxf(m, warp_max(sc));
            float p = lane < nt ? expf(sc - mn) : 0.0f;
            l = l * expf(m - mn) + warp_sum(p);
            if (!lane) salpha[wid] = expf(m - mn);   /* 0 on the first tile (m = −∞) */
            m = mn;
            if (lane < nt) sp[wid * TILE + lane] = p;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < NV; i++) {
            int idx = threadIdx.x + i * 32 * ATT_HG, h = idx / C, c = idx % C;
            if (h0 + h >= H) continue;
            float al = salpha[h];
            float4 v = acc[i];
            v.x *= al; v.y *= al; v.z *= al; v.w *= al;
#pragma unroll 4
            for (int rr = 0; rr < nt; rr++) {
                float w = sp[h * TILE + rr];
                float4 x = srow[rr * C + c];
                v.x = fmaf(w, x.x, v.x); v.y = fmaf(w, x.y, v.y); v.z = fmaf(w, x.z, v.z); v.w = fmaf(w, x.w, v.w);
            }
            acc[i] = v;
        }
    }
    const int64_t base = (t * S + s) * H;
#pragma unroll
    for (int i = 0; i < NV; i++) {
        int idx = threadIdx.x + i * 32 * ATT_HG, h = idx / C, c = idx % C;
        if (h0 + h < H) ((float4 *)(part + (base + h0 + h) * hd))[c] = acc[i];
    }
    if (!lane && hw < H) { ml[(base + hw) * 2] = m; ml[(base + hw) * 2 + 1] = l; }
}

/* Grid (H, tokens), hd/4 threads, hd + 2·splits floats of shared memory:
 * the slices of (token, head) in ascending order with the head's sink (as
 * cpu_attend: max over scores and sink, den = e^(sink−M) + Σ l·e^(m−M)),
 * then inverse RoPE on the tail. The slices' (m, l) are read once into
 * shared memory, the partial outputs ATT_CB slices at a time (loads in
 * flight together, not one latency per slice). */
#define ATT_CB 16
__global__ void k_att_combine(const float *part, const float *ml, const dstep *st0, const dstep *st, uint32_t window,
                              int ratio, int64_t topk, const float *sinks, int hd, int rd, const double *freq,
                              int splits, float *o) {
    pdl_wait();
    extern __shared__ float sv[];
    float *sm = sv + hd, *sl = sm + splits;
    const int h = blockIdx.x, H = gridDim.x, c = threadIdx.x;
    const int64_t t = blockIdx.y;
    const att_span a = att_rows(st0, st, t, window, ratio, topk, NULL);
    const int ns = att_nsplit(a.n, splits);
    const int64_t base = t * splits * H + h;   /* slice s of head h: base + s·H */
    for (int s = c; s < ns; s += blockDim.x) {
        sm[s] = ml[(base + s * H) * 2];
        sl[s] = ml[(base + s * H) * 2 + 1];
    }
    __syncthreads();
    float sink = sinks[h], M = sink;
    for (int s = 0; s < ns; s++) M = fmaxf(M, sm[s]);
    float den = expf(sink - M);
    float4 acc = make_float4(0, 0, 0, 0);
    for (int s0 = 0; s0 < ns; s0 += ATT_CB) {
        float4 v[ATT_CB];
#pragma unroll
        for (int j = 0; j < ATT_CB; j++)
            if (s0 + j < ns) v[j] = ((const float4 *)(part + (base + (s0 + j) * H) * hd))[c];
#pragma unroll
        for (int j = 0; j < ATT_CB; j++)
            if (s0 + j < ns) {
                float f = expf(sm[s0 + j] - M);
                den += sl[s0 + j] * f;
                acc.x = fmaf(f, v[j].x, acc.x); acc.y = fmaf(f, v[j].y, acc.y);
                acc.z = fmaf(f, v[j].z, acc.z); acc.w = fmaf(f, v[j].w, acc.w);
            }
    }
    float inv = 1.0f / den;
    ((float4 *)sv)[c] = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
    __syncthreads();
    blk_rope(sv + hd - rd, rd / 2, freq, a.pos, true);
    ((float4 *)(o + (t * H + h) * hd))[c] = ((float4 *)sv)[c];
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

/* Router of one token by one block: scores, expert choice (hash row of
 * tid2eid for the token, else biased top-`used` with lowest index on ties:
 * `used` rounds of a warp argmax on warp 0 — no block barriers between
 * rounds), normalised scaled weights. Logits read through L2 (__ldcg:
 * k_router_mv's last block reads what other blocks of its launch wrote).
 * Dynamic shared memory: E floats (scores) + E floats (biased) + E bytes. */
__device__ void router_block(const float *logit, int E, int used, const uint8_t *tid2eid, uint64_t t2e_rb,
                             const int32_t *tok, const float *bias, bool norm, float wscale, int32_t *eid, float *ew) {
    extern __shared__ float ssc[];
    __shared__ int32_t ids[64];
    float *sb = ssc + E;
    uint8_t *taken = (uint8_t *)(sb + E);
    int lane = threadIdx.x & 31;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        ssc[e] = router_score(__ldcg(logit + e));
        sb[e] = ssc[e] + (bias ? bias[e] : 0.0f);
        taken[e] = 0;
    }
    __syncthreads();
    if (tid2eid) {
        if (threadIdx.x < used) ids[threadIdx.x] = ((const int32_t *)(tid2eid + (uint64_t)tok[0] * t2e_rb))[threadIdx.x];
    } else if (threadIdx.x < 32) {
        for (int i = 0; i < used; i++) {
            float v = -INFINITY;
            int best = 0x7fffffff;
            for (int e = lane; e < E; e += 32)
                if (!taken[e] && (best == 0x7fffffff || sb[e] > v)) { v = sb[e]; best = e; }
            /* (value, index) max with the lower index winning ties */
            for (int o = 16; o; o >>= 1) {
                float v2 = __shfl_xor_sync(0xffffffffu, v, o);
                int b2 = __shfl_xor_sync(0xffffffffu, best, o);
                if (b2 != 0x7fffffff && (best == 0x7fffffff || v2 > v || (v2 == v && b2 < best))) { v = v2; best = b2; }
            }
            if (!lane) { ids[i] = best; taken[best] = 1; }
            __syncwarp();
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
#define ROUTER_SMEM(E) ((E) * (2 * sizeof(float) + 1))

/* Router of the chunk's tokens from their logits (one block per token). */
__global__ void k_router(const float *logit, int E, int used, const uint8_t *tid2eid, uint64_t t2e_rb,
                         const dstep *st, const float *bias, bool norm, float wscale, int32_t *eid, float *ew) {
    pdl_wait();
    int64_t t = blockIdx.x;
    router_block(logit + t * E, E, used, tid2eid, t2e_rb, &st[t].tok, bias, norm, wscale, eid + t * used, ew + t * used);
}

/* Decode's router in one launch: the logits W·x (E rows of F16/F32, RT_ROWS
 * rows a block, RT_THREADS / RT_ROWS threads a row summed in warp order;
 * n_in ≤ RT_MAX_IN, the weights in registers, loaded before pdl_wait as in
 * k_hc_step), then the block that arrives last (counter as in k_hc_step)
 * routes. */
#define RT_THREADS 256
#define RT_ROWS 2
#define RT_C 4                 /* 8-weight chunks a thread */
#define RT_MAX_IN (8 * RT_C * RT_THREADS / RT_ROWS)
__device__ unsigned d_rt_count;
__global__ void __launch_bounds__(RT_THREADS)
k_router_mv(int wtype, const uint8_t *__restrict__ W, uint64_t rb, int64_t n_in, const float *x, float *logit, int E,
            int used, const uint8_t *tid2eid, uint64_t t2e_rb, const dstep *st, const float *bias, bool norm,
            float wscale, int32_t *eid, float *ew) {
    __shared__ float part[RT_THREADS / 32];
    __shared__ bool last;
    const int tpr = RT_THREADS / RT_ROWS, wpr = tpr / 32;
    int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    int64_t r = (int64_t)blockIdx.x * RT_ROWS + tid / tpr;
    const uint8_t *w = W + (uint64_t)r * rb;
    float4 wa[RT_C], wb[RT_C];
#pragma unroll
    for (int j = 0; j < RT_C; j++)
        if (r < E && tid % tpr + j * tpr < n_in / 8) ld8w(wtype, w, tid % tpr + j * tpr, &wa[j], &wb[j]);
    pdl_wait();
    float acc = 0;
#pragma unroll
    for (int j = 0; j < RT_C; j++) {
        int64_t c = tid % tpr + j * tpr;
        if (r >= E || c >= n_in / 8) break;
        float4 a = wa[j], b = wb[j], xa = ((const float4 *)x)[2 * c], xb = ((const float4 *)x)[2 * c + 1];
        acc = fmaf(a.x, xa.x, acc); acc = fmaf(a.y, xa.y, acc); acc = fmaf(a.z, xa.z, acc); acc = fmaf(a.w, xa.w, acc);
        acc = fmaf(b.x, xb.x, acc); acc = fmaf(b.y, xb.y, acc); acc = fmaf(b.z, xb.z, acc); acc = fmaf(b.w, xb.w, acc);
    }
    acc = warp_sum(acc);
    if (!lane) part[wid] = acc;
    __syncthreads();
    if (tid % tpr == 0 && r < E) {
        float v = 0;
        for (int i = 0; i < wpr; i++) v += part[wid + i];
        logit[r] = v;
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        last = atomicAdd(&d_rt_count, 1u) == gridDim.x - 1;
        if (last) d_rt_count = 0;
    }
    __syncthreads();
    if (last) router_block(logit, E, used, tid2eid, t2e_rb, &st[0].tok, bias, norm, wscale, eid, ew);
}

/* g = swiglu(g, u) elementwise (a chunk's shared expert: two GEMMs, then this). */
__global__ void k_swiglu(float *g, const float *u, int64_t n, float clamp) {
    pdl_wait();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) g[i] = swiglu(g[i], u[i], clamp);
}

/* ---- matvec on repacked quantised weights ------------------------------------
 * Q8_0 carries ~2/3 of a decode step's weight bytes (attention projections,
 * shared expert, LM head), IQ2_XXS / Q2_K the routed experts. Their GGUF
 * blocks (34, 66, 84 bytes) leave the quants 2- or 4-byte aligned, so the
 * generic path issued many 2–4-byte loads per 8 weights and was bound by
 * load instructions (≈ 1 TB/s on Q8_0, ≈ 0.5 TB/s on the experts). At upload
 * (k_repack) every slab (an R-row matrix, or one expert of a 3-D tensor) is
 * rewritten in place, same bytes: each block's payload (Q8_0, IQ2_XXS: the
 * bytes after the f16 scale; Q2_K: scales + quants, before d|dmin) first,
 * row r's at r·nb·PAY, 16-byte aligned, then the block headers, row r's at
 * R·nb·PAY + r·nb·HL. A lane then takes a 16-byte piece per load: 16 weights
 * (Q8_0) or 64 (IQ2_XXS: two 32-weight groups; Q2_K: 4 runs of 16 weights
 * of one 128-weight half-block, sharing the piece's quant bytes). */
#define RP_Q8 0
#define RP_IQ2 1
#define RP_Q2K 2
template <int F> struct rp_fmt;
template <> struct rp_fmt<RP_Q8> { enum { EB = 32, BB = 34, HO = 0, HL = 2, PAY = 32, PB = 2, EP = 16 }; };
template <> struct rp_fmt<RP_IQ2> { enum { EB = 256, BB = 66, HO = 0, HL = 2, PAY = 64, PB = 4, EP = 64 }; };
template <> struct rp_fmt<RP_Q2K> { enum { EB = 256, BB = 84, HO = 80, HL = 4, PAY = 80, PB = 4, EP = 64 }; };

/* Block i of src (bb bytes, header of hl bytes at ho) → payload at i·(bb−hl),
 * header at nblocks·(bb−hl) + i·hl. Every offset is even: 2-byte copies. */
__global__ void k_repack(const uint8_t *__restrict__ src, uint8_t *__restrict__ dst, int64_t nblocks, int bb, int ho,
                         int hl) {
    pdl_wait();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nblocks) return;
    const unsigned short *b = (const unsigned short *)(src + i * bb);
    unsigned short *pay = (unsigned short *)(dst + i * (bb - hl)), *hdr = (unsigned short *)(dst + nblocks * (bb - hl) + i * hl);
    for (int j = 0, o = 0; j < bb / 2; j++) {
        if (2 * j >= ho && 2 * j < ho + hl) hdr[(2 * j - ho) / 2] = b[j];
        else pay[o++] = b[j];
    }
}

/* Σ_k int8(u byte k) · x_k over 4 weights. Flipping the sign bits makes
 * each byte b + 128 unsigned; as in byte2f, 2^23 + b + 128 minus 2^23 + 128
 * is b exactly. */
__device__ __forceinline__ float dot4_i8(uint32_t u, float4 x, float s) {
    uint32_t w = u ^ 0x80808080u;
#define SB(k) (__int_as_float(__byte_perm(w, 0x4B000000u, 0x7540u | (k))) - 8388736.0f)
    s = fmaf(SB(0), x.x, s);
    s = fmaf(SB(1), x.y, s);
    s = fmaf(SB(2), x.z, s);
    return fmaf(SB(3), x.w, s);
#undef SB
}
/* prmt.b32 with its sign-replicating selectors (a nibble with bit 3 set
 * copies the top bit of the byte it names into all 8 bits). */
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}
/* Σ_k ±grid byte k · x_k over 8 weights, x scaled by RP_XS. s7: the 7 sign
 * bits; the 8th is their parity (the ksigns rule). The signs become bytes
 * 0x80 / 0x00 by one multiply each (copies of s7 at bits 7, 14, 21, 28 never
 * overlap, so bit 8k+7 is sign bit k); then per weight one PRMT builds the
 * subnormal float [grid byte, 0, 0, sign byte] (grid bytes are < 128, so
 * the sign-replicated grid byte is the zero) and one FFMA uses it. */
__device__ __forceinline__ float dot8_iq2(uint64_t g, uint32_t s7, float4 a, float4 b, float s) {
    uint32_t lo = (uint32_t)g, hi = (uint32_t)(g >> 32);
    uint32_t sl = (s7 * 0x10204080u) & 0x80808080u;
    uint32_t sh = (((s7 >> 4) * 0x00204080u) & 0x00808080u) | (uint32_t)__popc(s7) << 31;
    s = fmaf(__int_as_float(prmt(lo, sl, 0x4880u)), a.x, s);
    s = fmaf(__int_as_float(prmt(lo, sl, 0x5991u)), a.y, s);
    s = fmaf(__int_as_float(prmt(lo, sl, 0x6AA2u)), a.z, s);
    s = fmaf(__int_as_float(prmt(lo, sl, 0x7BB3u)), a.w, s);
    s = fmaf(__int_as_float(prmt(hi, sh, 0x4880u)), b.x, s);
    s = fmaf(__int_as_float(prmt(hi, sh, 0x5991u)), b.y, s);
    s = fmaf(__int_as_float(prmt(hi, sh, 0x6AA2u)), b.z, s);
    return fmaf(__int_as_float(prmt(hi, sh, 0x7BB3u)), b.w, s);
}

/* Piece p of one row · its x piece xv (EP/4 float4). pl, hd: the row's
 * payload and headers. sx (Q2_K): Σ of each 16-weight run of xv. */
template <int F>
__device__ __forceinline__ float rp_piece(const uint8_t *pl, const uint8_t *hd, int64_t p, const float4 *xv,
                                          const float *sx, const uint64_t *grid) {
    if constexpr (F == RP_Q8) {
        uint4 w = ((const uint4 *)pl)[p];
        float d = __half2float(((const __half *)hd)[p >> 1]);
        float s = dot4_i8(w.x, xv[0], 0.0f);
        s = dot4_i8(w.y, xv[1], s);
        s = dot4_i8(w.z, xv[2], s);
        s = dot4_i8(w.w, xv[3], s);
        return d * s;
    } else if constexpr (F == RP_IQ2) {
        uint4 w = ((const uint4 *)pl)[p];   /* groups 2(p&3), 2(p&3)+1: (indices, signs|scale) each */
        float d = __half2float(((const __half *)hd)[p >> 2]), acc = 0;
#pragma unroll
        for (int g = 0; g < 2; g++) {
            uint32_t A = g ? w.z : w.x, B = g ? w.w : w.y;
            float t = 0;
#pragma unroll
            for (int l = 0; l < 4; l++)
                t = dot8_iq2(grid[(A >> 8 * l) & 255], (B >> 7 * l) & 127, xv[8 * g + 2 * l], xv[8 * g + 2 * l + 1], t);
            acc = fmaf(d * (0.5f + u2f(B >> 28)) * 0.25f * RP_BACK, t, acc);
        }
        return acc;
    } else {
        int64_t b = p >> 2;
        int u = (int)(p & 3), h = u >> 1, half = u & 1;
        const uint8_t *blk = pl + b * 80;
        uint4 w = *(const uint4 *)(blk + 16 + 16 * u);       /* quant bytes 32h + 16half … +15 */
        uint2 sc2 = *(const uint2 *)(blk + 8 * h);           /* scales 8h … 8h+7 */
        uint32_t dd = ((const uint32_t *)hd)[b];
        float d = __half2float(__ushort_as_half((unsigned short)dd));
        float dmin = __half2float(__ushort_as_half((unsigned short)(dd >> 16))), acc = 0;
#pragma unroll
        for (int s = 0; s < 4; s++) {   /* run s: weights 128h + 32s + 16half + 0…15, scale 8h + 2s + half */
            uint32_t sc = ((s < 2 ? sc2.x : sc2.y) >> (8 * (2 * (s & 1) + half))) & 255;
            float q = 0;
            q = dot4_u2(w.x, s, xv[4 * s + 0], q);
            q = dot4_u2(w.y, s, xv[4 * s + 1], q);
            q = dot4_u2(w.z, s, xv[4 * s + 2], q);
            q = dot4_u2(w.w, s, xv[4 * s + 3], q);
            acc = fmaf(d * u2f(sc & 15) * RP_BACK, q, acc);
            acc = fmaf(-dmin * u2f(sc >> 4) * (1.0f / RP_XS), sx[s], acc);   /* sx: sums of scaled x */
        }
        return acc;
    }
}

/* x piece p of a row: EP floats (Q2_K: the 4 runs of 16 at 32-float steps),
 * scaled by RP_XS for the formats decoded to subnormal weights. */
__device__ __forceinline__ float4 xs4(float4 v) { return make_float4(v.x * RP_XS, v.y * RP_XS, v.z * RP_XS, v.w * RP_XS); }
template <int F>
__device__ __forceinline__ void rp_x(const float *xx, int64_t p, float4 *xv, float *sx) {
    if constexpr (F == RP_Q2K) {
        int64_t e = (p >> 2) * 256 + ((p & 3) >> 1) * 128 + (p & 1) * 16;
#pragma unroll
        for (int s = 0; s < 4; s++) {
            const float4 *q = (const float4 *)(xx + e + 32 * s);
            float t = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) { xv[4 * s + i] = xs4(q[i]); t += (xv[4 * s + i].x + xv[4 * s + i].y) + (xv[4 * s + i].z + xv[4 * s + i].w); }
            sx[s] = t;
        }
    } else {
        const float4 *q = (const float4 *)(xx + rp_fmt<F>::EP * p);
#pragma unroll
        for (int i = 0; i < rp_fmt<F>::EP / 4; i++) xv[i] = F == RP_IQ2 ? xs4(q[i]) : q[i];
    }
}

/* y[slot·y_slot + r] for NR consecutive rows per warp, which share each x
 * load. GLU: W2 is the up matrix of the same shape; the warp computes gate
 * and up rows together and writes swiglu(g, u) · (ew ? ew[slot] : 1), so the
 * pair takes one launch and no separate swiglu pass. eid/estride/x_slot and
 * x grouping (xg_rows, a multiple of NR) as k_matvec. Rows past the end
 * repeat the last row (loads stay in bounds) and are not written. */
template <int F, int NR, bool GLU>
__global__ void __launch_bounds__(32 * MV_WARPS)
k_mv_rp(const uint8_t *__restrict__ W, const uint8_t *__restrict__ W2, int64_t n_in, int64_t rows,
        const float *__restrict__ x, int64_t xg_rows, int64_t xg_stride, float *__restrict__ y,
        const int32_t *__restrict__ eid, uint64_t estride, int64_t x_slot, int64_t y_slot,
        const float *__restrict__ ew, float clamp) {
    pdl_wait();
    typedef rp_fmt<F> fm;
    constexpr int M = GLU ? 2 * NR : NR;
    __shared__ uint64_t grid[F == RP_IQ2 ? 256 : 1];
    if (F == RP_IQ2) {   /* the 2 KB grid in shared memory: random 8-byte gathers */
        for (int i = threadIdx.x; i < 256; i += blockDim.x) grid[i] = d_iq2_grid[i];
        __syncthreads();
    }
    int slot = blockIdx.y, lane = threadIdx.x & 31;
    int64_t r0 = ((int64_t)blockIdx.x * MV_WARPS + (threadIdx.x >> 5)) * NR;
    if (r0 >= rows) return;
    uint64_t eoff = eid ? (uint64_t)eid[slot] * estride : 0;
    const int64_t nb = n_in / fm::EB, np = nb * fm::PB;
    const float *xx = x + slot * x_slot + (xg_rows ? (r0 / xg_rows) * xg_stride : 0);
    const uint8_t *pl[M], *hd[M];
#pragma unroll
    for (int i = 0; i < M; i++) {
        const uint8_t *mat = (i < NR ? W : W2) + eoff;
        int64_t r = r0 + i % NR < rows ? r0 + i % NR : rows - 1;
        pl[i] = mat + r * nb * fm::PAY;
        hd[i] = mat + rows * nb * fm::PAY + r * nb * fm::HL;
    }
    float acc[M];
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = 0;
    /* Q8_0 pieces are small: several in flight per lane (4 with one row a
     * warp, as on the 512–1024-row attention inputs: those warps are few). */
    constexpr int UNR = F == RP_Q8 ? (NR == 1 ? 4 : 2) : 1;
#pragma unroll UNR
    for (int64_t p = lane; p < np; p += 32) {
        float4 xv[fm::EP / 4];
        float sx[4];
        rp_x<F>(xx, p, xv, sx);
#pragma unroll
        for (int i = 0; i < M; i++) acc[i] += rp_piece<F>(pl[i], hd[i], p, xv, sx, grid);
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

/* ---- matvec with x in shared memory, persistent warps ----------------------------
 * k_mv_rp reads a lane's x piece from global memory: lanes' pieces are 64 B
 * (Q8_0) or 256 B apart, so each 16-byte load instruction touches 16–32
 * cache lines (L1 wavefronts) where 4 would carry the bytes, and a 64-weight
 * piece holds 64 registers. Its grid is a warp per row group, so on the
 * routed experts (1 536–3 072 blocks) it runs in 3–5 waves, each paying the
 * whole load latency before any arithmetic. k_mv_sx instead:
 * - copies the slot's x once per block into shared memory (IQ2_XXS, Q2_K:
 *   scaled by RP_XS; Q2_K with the 16-weight run sums) and reads it per 8–16
 *   weights for all of the warp's rows at once. The float4 index q of x is
 *   stored at sx_swz(q): XOR-ing higher index bits into the low three spreads
 *   any 8 consecutive lanes of one load over the 8 16-byte bank groups
 *   (lanes' pieces start 4, 16 or 64 float4 apart; Q2_K's piece runs are at
 *   q = 64b + 32h + 8s + 4half + i, its lane bits being half, h, b&1);
 * - is launched with at most the blocks that fit on the GPU at once; a warp
 *   walks its row groups (NR rows, gridDim.x·SX_WARPS·NR apart) piece by
 *   piece as one stream of tasks, loading the next D tasks' weights while
 *   computing these (the first ones during the x copy).
 * Each row is still the sum over its lane's pieces in order, then warp_sum:
 * the results equal k_mv_rp's bit for bit, whatever the grid. */
#define SX_WARPS 8
template <int F> __device__ __forceinline__ int sx_swz(int q) {
    return F == RP_IQ2 ? q ^ ((q >> 4) & 7) : F == RP_Q2K ? q ^ ((q >> 5) & 3) : q ^ ((q >> 3) & 3);
}
struct sx_reg { uint4 q; uint2 sc; uint32_t hd; };   /* one row's piece: quants, Q2_K scales, header */
template <int F>
__device__ __forceinline__ sx_reg sx_load(const uint8_t *pl, const uint8_t *hd, int64_t p) {
    sx_reg r;
    if constexpr (F == RP_Q2K) {
        const uint8_t *blk = pl + (p >> 2) * 80;
        r.q = *(const uint4 *)(blk + 16 + 16 * (p & 3));
        r.sc = *(const uint2 *)(blk + 8 * ((p & 3) >> 1));
        r.hd = ((const uint32_t *)hd)[p >> 2];
    } else {
        r.q = ((const uint4 *)pl)[p];
        r.hd = ((const unsigned short *)hd)[p / rp_fmt<F>::PB];
    }
    return r;
}
/* acc[i] += piece p of row i, as rp_piece; xs: the swizzled (scaled) x, rs: the run sums. */
template <int F, int M>
__device__ __forceinline__ void sx_piece(const sx_reg *r, int64_t p, const float4 *xs, const float *rs,
                                         const uint64_t *grid, float *acc) {
    float pa[M];
#pragma unroll
    for (int i = 0; i < M; i++) pa[i] = 0;
    if constexpr (F == RP_Q8) {
        int q0 = 4 * (int)p;
        float4 x0 = xs[sx_swz<F>(q0)], x1 = xs[sx_swz<F>(q0 + 1)], x2 = xs[sx_swz<F>(q0 + 2)], x3 = xs[sx_swz<F>(q0 + 3)];
#pragma unroll
        for (int i = 0; i < M; i++) {
            float t = dot4_i8(r[i].q.x, x0, 0.0f);
            t = dot4_i8(r[i].q.y, x1, t);
            t = dot4_i8(r[i].q.z, x2, t);
            t = dot4_i8(r[i].q.w, x3, t);
            pa[i] = __half2float(__ushort_as_half((unsigned short)r[i].hd)) * t;
        }
    } else if constexpr (F == RP_IQ2) {
        int q0 = 16 * (int)p;
#pragma unroll
        for (int g = 0; g < 2; g++) {
            float t[M];
#pragma unroll
            for (int i = 0; i < M; i++) t[i] = 0;
#pragma unroll
            for (int l = 0; l < 4; l++) {
                float4 a = xs[sx_swz<F>(q0 + 8 * g + 2 * l)], b = xs[sx_swz<F>(q0 + 8 * g + 2 * l + 1)];
#pragma unroll
                for (int i = 0; i < M; i++) {
                    uint32_t A = g ? r[i].q.z : r[i].q.x, B = g ? r[i].q.w : r[i].q.y;
                    t[i] = dot8_iq2(grid[(A >> 8 * l) & 255], (B >> 7 * l) & 127, a, b, t[i]);
                }
            }
#pragma unroll
            for (int i = 0; i < M; i++) {
                uint32_t B = g ? r[i].q.w : r[i].q.y;
                float d = __half2float(__ushort_as_half((unsigned short)r[i].hd));
                pa[i] = fmaf(d * (0.5f + u2f(B >> 28)) * 0.25f * RP_BACK, t[i], pa[i]);
            }
        }
    } else {
        int b = (int)(p >> 2), u = (int)(p & 3), h = u >> 1, half = u & 1;
        int q0 = 64 * b + 32 * h + 4 * half;   /* float4 index of run 0 (weights 128h + 16half, 16 of them) */
#pragma unroll
        for (int s = 0; s < 4; s++) {
            float4 x0 = xs[sx_swz<F>(q0 + 8 * s)], x1 = xs[sx_swz<F>(q0 + 8 * s + 1)];
            float4 x2 = xs[sx_swz<F>(q0 + 8 * s + 2)], x3 = xs[sx_swz<F>(q0 + 8 * s + 3)];
            float sum = rs[16 * b + 8 * h + 2 * s + half];
#pragma unroll
            for (int i = 0; i < M; i++) {
                uint32_t sc = ((s < 2 ? r[i].sc.x : r[i].sc.y) >> (8 * (2 * (s & 1) + half))) & 255;
                float d = __half2float(__ushort_as_half((unsigned short)r[i].hd));
                float dmin = __half2float(__ushort_as_half((unsigned short)(r[i].hd >> 16))), q = 0;
                q = dot4_u2(r[i].q.x, s, x0, q);
                q = dot4_u2(r[i].q.y, s, x1, q);
                q = dot4_u2(r[i].q.z, s, x2, q);
                q = dot4_u2(r[i].q.w, s, x3, q);
                pa[i] = fmaf(d * u2f(sc & 15) * RP_BACK, q, pa[i]);
                pa[i] = fmaf(-dmin * u2f(sc >> 4) * (1.0f / RP_XS), sum, pa[i]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] += pa[i];
}
/* Bytes of dynamic shared memory k_mv_sx needs for rows of n_in. */
__host__ __device__ constexpr int64_t sx_smem(int F, int64_t n_in) { return n_in * 4 + (F == RP_Q2K ? n_in / 4 : 0); }

/* One task's weights: piece p of the M rows of the row group at r0 (rows
 * past the end read the last row; pieces past the row are not loaded). */
template <int F, int NR, int M>
__device__ __forceinline__ void sx_fetch(const uint8_t *W, const uint8_t *W2, int64_t rows, int64_t nb, int64_t r0,
                                         int64_t p, int64_t np, sx_reg *w) {
    typedef rp_fmt<F> fm;
    if (p >= np) return;
#pragma unroll
    for (int i = 0; i < M; i++) {
        const uint8_t *mat = i < NR ? W : W2;
        int64_t r = r0 + i % NR < rows ? r0 + i % NR : rows - 1;
        w[i] = sx_load<F>(mat + r * nb * fm::PAY, mat + rows * nb * fm::PAY + r * nb * fm::HL, p);
    }
}

/* k_mv_rp's contract (no x grouping) on SX_WARPS-warp blocks, NR rows a warp,
 * any gridDim.x; dynamic shared memory sx_smem(F, n_in). */
template <int F, int NR, bool GLU>
__global__ void __launch_bounds__(32 * SX_WARPS, 2)
k_mv_sx(const uint8_t *__restrict__ W, const uint8_t *__restrict__ W2, int64_t n_in, int64_t rows,
        const float *__restrict__ x, float *__restrict__ y, const int32_t *__restrict__ eid, uint64_t estride,
        int64_t x_slot, int64_t y_slot, const float *__restrict__ ew, float clamp) {
    pdl_wait();
    typedef rp_fmt<F> fm;
    constexpr int M = GLU ? 2 * NR : NR;
    /* tasks in flight: Q8_0 pieces are 16 weights, so 8 rows' worth a lane */
    constexpr int D = F == RP_Q8 ? (8 / M > 1 ? 8 / M : 1) : 1;
    extern __shared__ float4 xs[];
    __shared__ uint64_t grid[F == RP_IQ2 ? 256 : 1];
    int slot = blockIdx.y, lane = threadIdx.x & 31;
    uint64_t eoff = eid ? (uint64_t)eid[slot] * estride : 0;
    W += eoff;
    if (GLU) W2 += eoff;
    const int64_t nb = n_in / fm::EB, np = nb * fm::PB, ppl = (np + 31) / 32;
    const int64_t gstride = (int64_t)gridDim.x * SX_WARPS * NR;
    const int64_t rbase = ((int64_t)blockIdx.x * SX_WARPS + (threadIdx.x >> 5)) * NR;
    const int64_t ntask = rbase < rows ? (rows - rbase + gstride - 1) / gstride * ppl : 0;
    /* the load stream's position (row group r0l, piece index jl) runs D tasks ahead */
    int64_t r0l = rbase, jl = 0;
    sx_reg w[D][M];
#pragma unroll
    for (int d = 0; d < D; d++) {
        if (d < ntask) sx_fetch<F, NR, M>(W, W2, rows, nb, r0l, lane + 32 * jl, np, w[d]);
        if (++jl == ppl) { jl = 0; r0l += gstride; }
    }
    const float4 *xg = (const float4 *)(x + slot * x_slot);
    for (int q = threadIdx.x; q < n_in / 4; q += blockDim.x) {
        float4 v = xg[q];
        if (F != RP_Q8) v = make_float4(v.x * RP_XS, v.y * RP_XS, v.z * RP_XS, v.w * RP_XS);
        xs[sx_swz<F>(q)] = v;
    }
    if (F == RP_IQ2)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) grid[i] = d_iq2_grid[i];
    __syncthreads();
    float *rs = (float *)(xs + n_in / 4);
    if (F == RP_Q2K) {   /* run sums, summed as rp_x sums them */
        for (int j = threadIdx.x; j < n_in / 16; j += blockDim.x) {
            float t = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float4 v = xs[sx_swz<F>(4 * j + i)];
                t += (v.x + v.y) + (v.z + v.w);
            }
            rs[j] = t;
        }
        __syncthreads();
    }
    float acc[M];
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = 0;
    int64_t r0 = rbase, j = 0;   /* the compute stream's position */
    for (int64_t t0 = 0; t0 < ntask; t0 += D) {
        sx_reg wn[D][M];
#pragma unroll
        for (int d = 0; d < D; d++) {
            if (t0 + D + d < ntask) sx_fetch<F, NR, M>(W, W2, rows, nb, r0l, lane + 32 * jl, np, wn[d]);
            if (++jl == ppl) { jl = 0; r0l += gstride; }
        }
#pragma unroll
        for (int d = 0; d < D; d++) {
            if (t0 + d >= ntask) break;
            int64_t p = lane + 32 * j;
            if (p < np) sx_piece<F, M>(w[d], p, xs, rs, grid, acc);
            if (++j < ppl) continue;
            /* the row group is complete */
#pragma unroll
            for (int i = 0; i < M; i++) acc[i] = warp_sum(acc[i]);
            if (!lane) {
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
#pragma unroll
            for (int i = 0; i < M; i++) acc[i] = 0;
            j = 0;
            r0 += gstride;
        }
#pragma unroll
        for (int d = 0; d < D; d++)
#pragma unroll
            for (int i = 0; i < M; i++) w[d][i] = wn[d][i];
    }
}

/* ---- decode's attn_q_a and attn_kv: two Q8_0 matrices of one x, one launch ----
 * Both read the layer's normed input and are small (1024 and 512 rows of
 * 4096: 6.7 MB together); as two k_mv_sx launches they ran at ≈ 0.47 TB/s
 * (ncu, H200: ≈ 14.5 µs a layer), each paying its DRAM latency after
 * pdl_wait (this kernel in ncu, H100: 9.2 µs for both, 0.73 TB/s — ncu runs
 * it alone, so its loads before the wait overlap nothing there). Here a warp owns one row (rows 0 … ra−1 of Wa, then rb of Wb),
 * and its lane's first Q8X_D pieces (16 weights each) are loaded BEFORE
 * pdl_wait: weights are constants, so under programmatic launch they travel
 * while the previous kernel (the HC step) runs. At 4096 inputs a lane's 8
 * pieces are its whole row share, so the grid (192 blocks, under the 2 a SM
 * that fit) holds all 6.7 MB in flight before the wait. Longer rows or more
 * rows walk on as a ring (the piece D later is loaded into the stage just
 * computed). x in shared memory as k_mv_sx (sx_swz). A row is its lane's
 * pieces summed in order, then warp_sum, as k_mv_sx. */
#define Q8X_D 8
struct q8_reg { uint4 q; uint32_t d; };   /* 16 quants and the f16 bits of their block's scale */
__device__ __forceinline__ void q8x_fetch(const uint8_t *Wa, int64_t ra, const uint8_t *Wb, int64_t rb, int64_t nb,
                                          int64_t r, int64_t p, int64_t np, q8_reg &w) {
    if (p >= np) return;
    const uint8_t *mat = r < ra ? Wa : Wb;
    int64_t R = r < ra ? ra : rb;   /* the slab's rows: its headers follow R payload rows */
    if (r >= ra) r -= ra;
    w.q = ((const uint4 *)(mat + r * nb * 32))[p];
    w.d = ((const unsigned short *)(mat + R * nb * 32 + r * nb * 2))[p >> 1];
}
__global__ void __launch_bounds__(32 * SX_WARPS, 2)
k_mv_q8x(const uint8_t *__restrict__ Wa, int64_t ra, float *__restrict__ ya, const uint8_t *__restrict__ Wb,
         int64_t rb, float *__restrict__ yb, int64_t n_in, const float *__restrict__ x) {
    extern __shared__ float4 xs[];
    const int lane = threadIdx.x & 31;
    const int64_t rows = ra + rb, nb = n_in / 32, np = 2 * nb, ppl = (np + 31) / 32;
    const int64_t gstride = (int64_t)gridDim.x * SX_WARPS;
    const int64_t rbase = (int64_t)blockIdx.x * SX_WARPS + (threadIdx.x >> 5);
    const int64_t ntask = rbase < rows ? (rows - rbase + gstride - 1) / gstride * ppl : 0;
    int64_t rl = rbase, jl = 0;   /* the load stream's position, Q8X_D tasks ahead of the compute */
    q8_reg w[Q8X_D];
#pragma unroll
    for (int d = 0; d < Q8X_D; d++) {
        if (d < ntask) q8x_fetch(Wa, ra, Wb, rb, nb, rl, lane + 32 * jl, np, w[d]);
        if (++jl == ppl) { jl = 0; rl += gstride; }
    }
    pdl_wait();   /* x is the previous kernel's output */
    for (int q = threadIdx.x; q < n_in / 4; q += blockDim.x) xs[sx_swz<RP_Q8>(q)] = ((const float4 *)x)[q];
    __syncthreads();
    float acc = 0;
    int64_t r = rbase, j = 0;   /* the compute stream's position */
    for (int64_t t0 = 0; t0 < ntask; t0 += Q8X_D) {
#pragma unroll
        for (int d = 0; d < Q8X_D; d++) {
            if (t0 + d >= ntask) break;
            int64_t p = lane + 32 * j;
            if (p < np) {
                int q0 = 4 * (int)p;
                float t = dot4_i8(w[d].q.x, xs[sx_swz<RP_Q8>(q0)], 0.0f);
                t = dot4_i8(w[d].q.y, xs[sx_swz<RP_Q8>(q0 + 1)], t);
                t = dot4_i8(w[d].q.z, xs[sx_swz<RP_Q8>(q0 + 2)], t);
                t = dot4_i8(w[d].q.w, xs[sx_swz<RP_Q8>(q0 + 3)], t);
                acc += __half2float(__ushort_as_half((unsigned short)w[d].d)) * t;
            }
            /* stage d is free: the task Q8X_D later goes there */
            if (t0 + Q8X_D + d < ntask) q8x_fetch(Wa, ra, Wb, rb, nb, rl, lane + 32 * jl, np, w[d]);
            if (++jl == ppl) { jl = 0; rl += gstride; }
            if (++j < ppl) continue;
            /* the row is complete */
            acc = warp_sum(acc);
            if (!lane) {
                if (r < ra) ya[r] = acc;
                else yb[r - ra] = acc;
            }
            acc = 0;
            j = 0;
            r += gstride;
        }
    }
}

/* ---- routed-expert matvecs on the tensor cores ------------------------------------
 * k_mv_sx spends ≈ 4.3 instructions a weight (decode + one FFMA each), so
 * the routed experts stay near 1 TB/s. k_mv_tc decodes 8 weights into four
 * f16x2 registers (the A operand of mma.m16n8k16, 16 rows × 16 k) and lets
 * the tensor cores multiply:
 * - Weights as subnormal f16: the bits [v, sign << 7] are ±v·2^-24, exact
 *   for the small integers of both formats (IQ2_XXS grid bytes 8/25/43: one
 *   PRMT per 2 weights from the grid word and a sign word of 0x80 / 0x00
 *   bytes; Q2_K quants: their 2-bit field masked in place, q·4^s·2^-24, one
 *   LOP per 2 weights). Tensor cores take f16 subnormals as they are.
 * - x as two f16 columns hi + lo (22 significant bits), pre-scaled by the
 *   power of two S that puts max|x| in [2^10, 2^11) (no overflow, run sums
 *   of 16 included). Products of f16 are exact in the f32 accumulators; the
 *   tensor core only rounds its sums, so a matvec stays within ~1e-7 of the
 *   f32 reference (ds4-gpucheck bounds it at 1e-5).
 * - The k order inside an mma is free as long as A and B agree, so lane t
 *   of each quad owns its own weights (IQ2_XXS: groups 2t, 2t+1 of every
 *   256-block, the 16 bytes it loads; Q2_K: the 16 quant bytes 16t… and
 *   their 4 runs) and B column 2t / 2t+1 holds x hi / lo only at lane t's
 *   k slots (other entries zero): C columns 2t, 2t+1 are then sums over lane
 *   t's weights alone, in lane t's own accumulators, so the 32-weight group
 *   scale (IQ2_XXS) or 16-weight run scale (Q2_K) is applied by that lane
 *   to its C after the group's mmas. The Q2_K −dmin·m term is one more mma
 *   a block: A = the 16 runs' m, B = the runs' sums of x (hi / lo).
 * - x fragments are laid out in shared memory in mma order: (block, mma,
 *   column) → the 4 f16 a lane needs, so a B load is one conflict-free LDS.64;
 *   lanes whose column is zero read a zero buffer. The IQ2_XXS grid and sign
 *   tables are replicated 16 times (copy = lane & 15) so the random 8-byte
 *   gathers of a half-warp never share a bank.
 * - Persistent 12-warp blocks (1 an SM: ~150 registers a thread, 16 warps
 *   spilled), blockIdx.y = slot. A task is 2 tiles of 16 rows sharing x
 *   (GLU: 16 gate + the 16 up rows; else 32 rows), split over KS warps by
 *   256-blocks (b ≡ kw mod KS; KS 2 measured best), summed in fixed order
 *   (quad shuffles, then the warps in turn): runs stay bit-identical. Tasks
 *   are dealt to blocks round robin (balanced within one task); a warp
 *   loads the next block while decoding this one, the first one while x is
 *   staged. H100 (--mv-bench): routed gate+up 26.1 → 20.0 µs, down 15.2 →
 *   11.9 µs (≈ 1.3–1.4 TB/s; see tools/gpu/NOTES.md "iq2" for why not 2). */
#define TC_WARPS 12
/* Bytes of dynamic shared memory of k_mv_tc; offsets: tables (IQ2_XXS), x
 * fragments, run-sum fragments (Q2_K), zero buffer (64 bytes past a
 * 128-byte line: its bank never meets the 64 bytes a B load reads),
 * split-K partials, block max. */
__host__ __device__ constexpr int64_t tc_tab(int F) { return F == RP_IQ2 ? 256 * 16 * 8 + 128 * 16 * 8 : 0; }
__host__ __device__ constexpr int64_t tc_zero(int F, int64_t n_in) {
    return (tc_tab(F) + n_in * 4 + (F == RP_Q2K ? n_in / 4 : 0) + 127) / 128 * 128 + 64;
}
__host__ __device__ constexpr int64_t tc_smem(int F, int64_t n_in) {
    return tc_zero(F, n_in) + 1024 + 64 + TC_WARPS * 128 * 4 + TC_WARPS * 4;
}

/* d (+)= a·b, m16n8k16, f16 operands, f32 accumulators (zero: d = a·b). */
template <bool ZERO>
__device__ __forceinline__ void tc_mma(float d[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint2 b) {
    if (ZERO)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%10,%11,%12,%13};\n"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y), "f"(0.0f), "f"(0.0f), "f"(0.0f), "f"(0.0f));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y));
}
/* x·S (exact) as f16 hi + lo; c picks one. */
__device__ __forceinline__ uint32_t tc_split2(float a, float b, float S, int c) {
    __half ha = __float2half_rn(a * S), hb = __float2half_rn(b * S);
    if (c) {
        ha = __float2half_rn(a * S - __half2float(ha));
        hb = __float2half_rn(b * S - __half2float(hb));
    }
    return (uint32_t)__half_as_ushort(ha) | (uint32_t)__half_as_ushort(hb) << 16;
}

/* One row's 256-block as lane t holds it: quant bytes, Q2_K scales, header. */
struct tc_reg { uint4 q; uint2 sc; uint32_t hd; };
template <int F>
__device__ __forceinline__ void tc_load(const uint8_t *pl, const uint8_t *hd, int64_t b, int t, tc_reg &r) {
    if constexpr (F == RP_IQ2) {
        r.q = *(const uint4 *)(pl + b * 64 + 16 * t);            /* groups 2t, 2t+1: (indices, signs|scale) each */
        r.hd = ((const unsigned short *)hd)[b];
    } else {
        const uint8_t *blk = pl + b * 80;
        r.q = *(const uint4 *)(blk + 16 + 16 * t);               /* quant bytes 16t … 16t+15 */
        r.sc = *(const uint2 *)(blk + 8 * (t >> 1));             /* scales 8h … 8h+7, h = t >> 1 */
        r.hd = ((const uint32_t *)hd)[b];
    }
}

/* acc[i][h] += lane t's part of block b of row (tile i, half h): rows g, g+8
 * of tile i. xb: the block's x fragments (or the zero buffer), rb: its run
 * sums (Q2_K), tg / ts: this lane's copy of the grid / sign table. */
template <int F>
__device__ __forceinline__ void tc_block(const tc_reg (&w)[2][2], const uint2 *xb, const uint2 *rb, const uint2 *tg,
                                         const uint2 *ts, int t, float (&acc)[2][2]) {
    float c[2][4];
    if constexpr (F == RP_IQ2) {
#pragma unroll
        for (int Q = 0; Q < 2; Q++) {   /* group 2t + Q: mmas 8Q … 8Q+7 */
#pragma unroll
            for (int e = 0; e < 4; e++) {   /* grid entry e: weights 8e … 8e+7, mmas 8Q+2e, +1 */
                uint2 G[2][2], S[2][2];
#pragma unroll
                for (int i = 0; i < 2; i++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        uint32_t A = Q ? w[i][h].q.z : w[i][h].q.x, B = Q ? w[i][h].q.w : w[i][h].q.y;
                        G[i][h] = tg[((A >> 8 * e) & 255) << 4];
                        S[i][h] = ts[((B >> 7 * e) & 127) << 4];
                    }
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {   /* weights 8e + 4hf … +3 */
                    uint2 bx = xb[(8 * Q + 2 * e + hf) * 8];
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        uint32_t g0 = hf ? G[i][0].y : G[i][0].x, s0 = hf ? S[i][0].y : S[i][0].x;
                        uint32_t g1 = hf ? G[i][1].y : G[i][1].x, s1 = hf ? S[i][1].y : S[i][1].x;
                        uint32_t a0 = prmt(g0, s0, 0x5140u), a1 = prmt(g1, s1, 0x5140u);
                        uint32_t a2 = prmt(g0, s0, 0x7362u), a3 = prmt(g1, s1, 0x7362u);
                        if (e == 0 && hf == 0) tc_mma<true>(c[i], a0, a1, a2, a3, bx);
                        else tc_mma<false>(c[i], a0, a1, a2, a3, bx);
                    }
                }
            }
            /* group scale d·(0.5 + s)/4 = d·(2s+1)/8, times 2^24 for the subnormal weights */
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    uint32_t B = Q ? w[i][h].q.w : w[i][h].q.y;
                    float d = __half2float(__ushort_as_half((unsigned short)w[i][h].hd)) * 0x1p21f;
                    float f = u2f((B >> 27) | 1u) * d;
                    acc[i][h] = fmaf(f, c[i][2 * h] + c[i][2 * h + 1], acc[i][h]);
                }
        }
    } else {
        int r = t & 1;
#pragma unroll
        for (int s = 0; s < 4; s++) {   /* run s of lane t's 4: quant bits 2s, 2s+1; mmas 4s … 4s+3 */
            const uint32_t M = 0x00030003u << 2 * s;
#pragma unroll
            for (int m = 0; m < 4; m++) {   /* quant word m: weights 4m … 4m+3 of the run */
                uint2 bx = xb[(4 * s + m) * 8];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    uint32_t u0 = m == 0 ? w[i][0].q.x : m == 1 ? w[i][0].q.y : m == 2 ? w[i][0].q.z : w[i][0].q.w;
                    uint32_t u1 = m == 0 ? w[i][1].q.x : m == 1 ? w[i][1].q.y : m == 2 ? w[i][1].q.z : w[i][1].q.w;
                    /* (weights 4m, 4m+2) and (4m+1, 4m+3) of rows g, g+8 */
                    uint32_t a0 = u0 & M, a1 = u1 & M, a2 = (u0 >> 8) & M, a3 = (u1 >> 8) & M;
                    if (m == 0) tc_mma<true>(c[i], a0, a1, a2, a3, bx);
                    else tc_mma<false>(c[i], a0, a1, a2, a3, bx);
                }
            }
            /* run scale d·sc times 2^24·4^-s (subnormal q·4^s): sc·2^-2s straight from the exponent of the magic */
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    uint32_t v = ((s < 2 ? w[i][h].sc.x : w[i][h].sc.y) >> (8 * (2 * (s & 1) + r))) & 15u;
                    float sc = __int_as_float((0x4B000000u - ((uint32_t)(2 * s) << 23)) | v) - (8388608.0f / (float)(1 << 2 * s));
                    float d = __half2float(__ushort_as_half((unsigned short)w[i][h].hd)) * 0x1p24f;
                    acc[i][h] = fmaf(sc * d, c[i][2 * h] + c[i][2 * h + 1], acc[i][h]);
                }
        }
        /* −dmin·Σ m_run·(Σ x of the run): A = lane t's 4 runs' m (high nibbles, ·16·2^-24), B = run sums */
        uint2 bm = *rb;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            uint32_t a0 = (w[i][0].sc.x >> 8 * r) & 0x00F000F0u, a1 = (w[i][1].sc.x >> 8 * r) & 0x00F000F0u;
            uint32_t a2 = (w[i][0].sc.y >> 8 * r) & 0x00F000F0u, a3 = (w[i][1].sc.y >> 8 * r) & 0x00F000F0u;
            tc_mma<true>(c[i], a0, a1, a2, a3, bm);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float dmin = __half2float(__ushort_as_half((unsigned short)(w[i][h].hd >> 16))) * 0x1p20f;
                acc[i][h] = fmaf(-dmin, c[i][2 * h] + c[i][2 * h + 1], acc[i][h]);
            }
        }
    }
}

/* k_mv_sx's contract on TC_WARPS-warp blocks (IQ2_XXS, Q2_K; x not
 * grouped, n_in a multiple of 256), KS warps a task; dynamic shared memory
 * tc_smem(F, n_in). */
template <int F, int KS, bool GLU>
__global__ void __launch_bounds__(32 * TC_WARPS, 1)
k_mv_tc(const uint8_t *__restrict__ W, const uint8_t *__restrict__ W2, int64_t n_in, int64_t rows,
        const float *__restrict__ x, float *__restrict__ y, const int32_t *__restrict__ eid, uint64_t estride,
        int64_t x_slot, int64_t y_slot, const float *__restrict__ ew, float clamp) {
    typedef rp_fmt<F> fm;
    extern __shared__ __align__(16) uint8_t tsm[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int64_t nb = n_in / 256;
    uint2 *tg = (uint2 *)tsm, *ts = tg + 256 * 16;
    uint2 *xf = (uint2 *)(tsm + tc_tab(F)), *rf = xf + nb * 128, *zb = (uint2 *)(tsm + tc_zero(F, n_in));
    float *red = (float *)(tsm + tc_zero(F, n_in) + 1024 + 64), *bmax = red + TC_WARPS * 128;
    if (F == RP_IQ2) {   /* constant tables: before the wait, beside the previous kernel's tail */
        for (int i = tid; i < 256 * 16; i += blockDim.x) {
            uint64_t v = d_iq2_grid[i >> 4];
            tg[i] = make_uint2((uint32_t)v, (uint32_t)(v >> 32));
        }
        for (int i = tid; i < 128 * 16; i += blockDim.x) {   /* bytes 0x80 / 0x00: the 7 sign bits + parity */
            uint32_t s = (uint32_t)i >> 4;
            ts[i] = make_uint2((s * 0x10204080u) & 0x80808080u,
                               (((s >> 4) * 0x00204080u) & 0x00808080u) | (uint32_t)__popc(s) << 31);
        }
    }
    for (int i = tid; i < 128 + 8; i += blockDim.x) zb[i] = make_uint2(0, 0);
    pdl_wait();
    constexpr int NG = TC_WARPS / KS;
    const int slot = blockIdx.y, grp = warp / KS, kw = warp % KS;
    const uint64_t eoff = eid ? (uint64_t)eid[slot] * estride : 0;
    const uint8_t *Wm = W + eoff, *W2m = GLU ? W2 + eoff : NULL;
    const int64_t tr = GLU ? 16 : 32, ntask = (rows + tr - 1) / tr;
    /* the rows of a task as 32-bit offsets into one matrix (a slab is far below 4 GB) */
    uint32_t po[2][2], ho[2][2];
    auto rows_of = [&](int64_t task) {
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int64_t r = task * tr + (GLU ? 0 : 16 * i) + g + 8 * h;
                r = r < rows ? r : rows - 1;
                po[i][h] = (uint32_t)(r * nb * fm::PAY);
                ho[i][h] = (uint32_t)(rows * nb * fm::PAY + r * nb * fm::HL);
            }
    };
    tc_reg cur[2][2], nxt[2][2];
    auto fetch = [&](int64_t b, tc_reg (&w)[2][2]) {
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const uint8_t *m = GLU && i ? W2m : Wm;
                tc_load<F>(m + po[i][h], m + ho[i][h], b, t, w[i][h]);
            }
    };
    /* the first task's first block is in flight while x is staged */
    int64_t task = blockIdx.x + (int64_t)gridDim.x * grp;
    if (task < ntask) {
        rows_of(task);
        if (kw < nb) fetch(kw, cur);
    }
    const float *xg = x + slot * x_slot;
    /* S = 2^(10 − ⌊log2 max|x|⌋), clamped: max|x|·S in [2^10, 2^11) */
    float mx = 0;
    for (int64_t q = tid; q < n_in / 4; q += blockDim.x) {
        float4 v = ((const float4 *)xg)[q];
        mx = fmaxf(mx, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    }
    for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (!lane) bmax[warp] = mx;
    __syncthreads();
    mx = bmax[0];
    for (int i = 1; i < TC_WARPS; i++) mx = fmaxf(mx, bmax[i]);
    int k = 10 - (int)((__float_as_uint(mx) >> 23) & 255) + 127;
    k = k < -100 ? -100 : k > 100 ? 100 : k;
    const float S = __uint_as_float((uint32_t)(127 + k) << 23), invS = __uint_as_float((uint32_t)(127 - k) << 23);
    /* x fragments: entry (b, j, gg) = the 4 f16 of column gg (lane t = gg/2's weights, hi or lo) in mma j */
    for (int64_t i = tid; i < nb * 128; i += blockDim.x) {
        int64_t b = i >> 7;
        int j = (int)(i >> 3) & 15, gg = (int)i & 7, tt = gg >> 1, c = gg & 1;
        float4 v;
        if (F == RP_IQ2) {   /* weights 64tt + 4j … +3 */
            v = *(const float4 *)(xg + 256 * b + 64 * tt + 4 * j);
        } else {   /* run (j >> 2) of chunk tt: weights 128(tt>>1) + 32(j>>2) + 16(tt&1) + 4(j&3) + (0, 2 | 1, 3) */
            float4 u = *(const float4 *)(xg + 256 * b + 128 * (tt >> 1) + 32 * (j >> 2) + 16 * (tt & 1) + 4 * (j & 3));
            v = make_float4(u.x, u.z, u.y, u.w);
        }
        xf[i] = make_uint2(tc_split2(v.x, v.y, S, c), tc_split2(v.z, v.w, S, c));
    }
    if (F == RP_Q2K)   /* run sums: entry (b, gg) = runs 8h + r + (0, 2 | 4, 6) of lane tt's chunk (h, r) */
        for (int64_t i = tid; i < nb * 8; i += blockDim.x) {
            int64_t b = i >> 3;
            int gg = (int)i & 7, tt = gg >> 1, c = gg & 1;
            float rs[4];
#pragma unroll
            for (int s = 0; s < 4; s++) {
                const float4 *q = (const float4 *)(xg + 256 * b + 16 * (8 * (tt >> 1) + 2 * s + (tt & 1)));
                float a = 0;
#pragma unroll
                for (int l = 0; l < 4; l++) {
                    float4 u = q[l];
                    a += (u.x * S + u.y * S) + (u.z * S + u.w * S);
                }
                rs[s] = a;
            }
            rf[i] = make_uint2(tc_split2(rs[0], rs[1], 1.0f, c), tc_split2(rs[2], rs[3], 1.0f, c));
        }
    __syncthreads();

    const bool own = (g >> 1) == t;   /* this lane's B column holds x at its own k slots */
    const uint2 *tgl = tg + (lane & 15), *tsl = ts + (lane & 15);
    for (bool first = true; task < ntask; task += (int64_t)gridDim.x * NG, first = false) {
        const int64_t r0 = task * tr;
        if (!first) {
            rows_of(task);
            if (kw < nb) fetch(kw, cur);
        }
        float acc[2][2] = {{0, 0}, {0, 0}};
        for (int64_t b = kw; b < nb; b += KS) {
            if (b + KS < nb) fetch(b + KS, nxt);
            tc_block<F>(cur, own ? xf + b * 128 + g : zb, own ? rf + b * 8 + g : zb, tgl, tsl, t, acc);
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) cur[i][h] = nxt[i][h];
        }
        /* the quad's 4 lanes, then the task's KS warps in order */
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                acc[i][h] += __shfl_xor_sync(0xffffffffu, acc[i][h], 1);
                acc[i][h] += __shfl_xor_sync(0xffffffffu, acc[i][h], 2);
            }
        if (KS > 1) {
            if (kw)
#pragma unroll
                for (int q = 0; q < 4; q++) red[warp * 128 + q * 32 + lane] = acc[q >> 1][q & 1];
            asm volatile("bar.sync %0, %1;" ::"r"(1 + grp), "r"(32 * KS) : "memory");
            if (!kw)
                for (int w2 = 1; w2 < KS; w2++)
#pragma unroll
                    for (int q = 0; q < 4; q++) acc[q >> 1][q & 1] += red[(warp + w2) * 128 + q * 32 + lane];
            asm volatile("bar.sync %0, %1;" ::"r"(1 + grp), "r"(32 * KS) : "memory");
        }
        if (kw || t) continue;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            if (GLU) {
                int64_t r = r0 + g + 8 * h;
                if (r < rows) y[slot * y_slot + r] = swiglu(acc[0][h] * invS, acc[1][h] * invS, clamp) * (ew ? ew[slot] : 1.0f);
            } else
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    int64_t r = r0 + 16 * i + g + 8 * h;
                    if (r < rows) y[slot * y_slot + r] = acc[i][h] * invS;
                }
        }
    }
}

/* Gate and up rows of one expert slot in one warp, swiglu · ew[slot] out:
 * the routed experts' pair in one launch (generic formats, k_matvec's loop). */
__global__ void k_matvec_glu(int type, const uint8_t *__restrict__ Wg, const uint8_t *__restrict__ Wu, uint64_t rb,
                             int64_t n_in, int64_t rows, const float *__restrict__ x, float *__restrict__ y,
                             const int32_t *__restrict__ eid, uint64_t estride, int64_t y_slot,
                             const float *__restrict__ ew, float clamp) {
    pdl_wait();
    int slot = blockIdx.y, lane = threadIdx.x & 31;
    int64_t r = (int64_t)blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (r >= rows) return;
    uint64_t off = (eid ? (uint64_t)eid[slot] * estride : 0) + (uint64_t)r * rb;
    float2 gu = row_dot2(type, Wg + off, Wu + off, n_in / 8, x, lane, 32);
    float g = warp_sum(gu.x), u = warp_sum(gu.y);
    if (!lane) y[slot * y_slot + r] = swiglu(g, u, clamp) * (ew ? ew[slot] : 1.0f);
}

/* ---- test-only wrappers ---------------------------------------------------------- */

__global__ void k_test_qat(float *x, int n, bool fp4) {
    pdl_wait();
    extern __shared__ float sv[];
    for (int k = threadIdx.x; k < n; k += blockDim.x) sv[k] = x[k];
    __syncthreads();
    if (fp4) blk_fp4(sv, n);
    else blk_fp8(sv, n);
    for (int k = threadIdx.x; k < n; k += blockDim.x) x[k] = sv[k];
}

__global__ void k_test_hc(const float *mix, const float *scale, const float *base, int hc, int iters, float eps,
                          float *out) {
    pdl_wait();
    if ((hc & (hc - 1)) == 0 && hc * hc <= 32) hc_coeffs_warp(mix, scale, base, hc, iters, eps, out, out + hc, out + 2 * hc);
    else if (threadIdx.x == 0) hc_coeffs(mix, scale, base, hc, iters, eps, out, out + hc, out + 2 * hc);
}

#endif
