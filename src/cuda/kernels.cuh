/* Device code of the CUDA backend: this file holds what every kernel file
 * shares (type codes, the decode step inputs, programmatic dependent launch,
 * aligned loads and integer→float tricks, per-format dequantisation, warp
 * and block reductions, the QAT simulations); the kernels live by concern in
 * matvec.cuh (decode matvecs), hc.cuh (hyper-connections), attend.cuh (the
 * attention sublayer's per-token kernels), moe.cuh (router), mm.cuh (chunk
 * products on the tensor cores) and attn.cuh (chunk attention). Each kernel
 * mirrors a CPU reference routine (src/cpu, src/quant) operation by
 * operation; only accumulation orders differ (tree reductions instead of
 * sequential sums), so results agree to f32 rounding.
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
#include <limits.h>
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
__device__ __forceinline__ float swiglu(float g, float u, float clamp) {
    g = fminf(g, clamp);
    u = u > clamp ? clamp : u < -clamp ? -clamp : u;
    return g * sigmoidf_d(g) * u;
}

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

/* ---- eval_top: the greedy token without the logits leaving the device ---------- */

/* ds4_argmax's rule (src/sample/sampler.c): the largest non-NaN value, the
 * lowest index on ties; NaN never wins. True when (bv, bi) beats (av, ai). */
__device__ __forceinline__ bool top_beats(float bv, int bi, float av, int ai) {
    return !isnan(bv) && (isnan(av) || bv > av || (bv == av && bi < ai));
}

/* The block's best (value, index) into thread 0's v, i. blockDim.x: a
 * multiple of 32, at most 1024. */
__device__ void top_block(float *v, int *i) {
    __shared__ float sv[32];
    __shared__ int si[32];
    for (int o = 16; o; o >>= 1) {
        float ov = __shfl_down_sync(~0u, *v, o);
        int oi = __shfl_down_sync(~0u, *i, o);
        if (top_beats(ov, oi, *v, *i)) { *v = ov; *i = oi; }
    }
    int w = threadIdx.x / 32, nw = blockDim.x / 32;
    if ((threadIdx.x & 31) == 0) { sv[w] = *v; si[w] = *i; }
    __syncthreads();
    if (w) return;
    *v = threadIdx.x < nw ? sv[threadIdx.x] : NAN;
    *i = threadIdx.x < nw ? si[threadIdx.x] : INT_MAX;
    for (int o = 16; o; o >>= 1) {
        float ov = __shfl_down_sync(~0u, *v, o);
        int oi = __shfl_down_sync(~0u, *i, o);
        if (top_beats(ov, oi, *v, *i)) { *v = ov; *i = oi; }
    }
}

/* Two passes over one row of n logits, so that the 517 KB row is read by
 * TOP_BLOCKS SMs at once (one block alone would take ~100 µs on its own
 * load latency). Pass 1: each block's best of a strided share, and the
 * row's copy into keep (the state's kept logits, for last_logits). */
#define TOP_BLOCKS 128
#define TOP_THREADS 256
__global__ void __launch_bounds__(TOP_THREADS) k_top_part(const float *x, int n, float *keep, float *pv, int *pi) {
    pdl_wait();
    float bv = NAN;
    int bi = INT_MAX;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = x[i];
        keep[i] = v;
        if (top_beats(v, i, bv, bi)) { bv = v; bi = i; }
    }
    top_block(&bv, &bi);
    if (threadIdx.x == 0) { pv[blockIdx.x] = bv; pi[blockIdx.x] = bi; }
}

/* Pass 2 (one block of TOP_BLOCKS threads): the best of the blocks' bests;
 * 0 when every logit is NaN, as on the host. */
__global__ void __launch_bounds__(TOP_BLOCKS) k_top_final(const float *pv, const int *pi, int32_t *top) {
    pdl_wait();
    float v = pv[threadIdx.x];
    int i = pi[threadIdx.x];
    top_block(&v, &i);
    if (threadIdx.x == 0) *top = i == INT_MAX ? 0 : i;
}

/* ---- test-only wrapper ---------------------------------------------------------- */

__global__ void k_test_qat(float *x, int n, bool fp4) {
    pdl_wait();
    extern __shared__ float sv[];
    for (int k = threadIdx.x; k < n; k += blockDim.x) sv[k] = x[k];
    __syncthreads();
    if (fp4) blk_fp4(sv, n);
    else blk_fp8(sv, n);
    for (int k = threadIdx.x; k < n; k += blockDim.x) x[k] = sv[k];
}

#endif
