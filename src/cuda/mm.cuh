/* Prefill matrix products: a chunk of T tokens times a quantised weight
 * matrix on the tensor cores (mma.sync m16n8k16, f16 inputs, f32
 * accumulation), and the routed experts of a chunk grouped by expert.
 *
 * Precision. Activations: each token row is scaled by a power of two so its
 * largest magnitude lies in [2^13, 2^14) and rounded to f16 once (mm_prep);
 * the scale comes back in the epilogue (exact). Weights: dequantised inside
 * the kernel, 16 weights per thread and step, to f16 in shared memory, each
 * its exact value rounded once (block scales applied in f32 first; Q2_K and
 * IQ2_XXS through 4-entry tables of such values). f16 keeps 11 bits:
 * ‖err‖/‖y‖ ≈ 2–4e-4 per token row against double on random data, 5–7e-4
 * after swiglu (ds4-gpucheck --kernels). The other option, exact small
 * integers in f16 with the block scales applied to partial sums, needs an
 * f32 rescale of every accumulator each 16–32 weights (IQ2_XXS, Q8_0) plus
 * a Σx term per sub-block for the K-quant minimums; rounded f16 weights cost
 * the same few instructions for every format and keep one kernel.
 *
 * Routed experts in IQ2_XXS / Q2_K (the model's) take k_mmx below: the
 * quantised bytes staged in shared memory, each warp dequantising its own
 * rows straight into mma registers (1.6–1.9× k_mm, H100).
 *
 * Tiles (k_mm): a block computes 128 weight rows × BN tokens (BN = 128 dense, 64
 * for experts: ~48 tokens per expert at T = 2048) in K steps of BK (64
 * dense; 128 experts: +6–12 % on Q2_K/Q4_K, −5 % on IQ2_XXS, H100). Token
 * rows arrive by cp.async; the weight units of the next step are loaded to
 * registers while the tensor cores work on this one, then dequantised into
 * the other shared buffer (two buffers, one barrier a step).
 *
 * Preconditions (callers): K a multiple of the format's block (32 Q8_0,
 * 256 K-quants/IQ2_XXS, 16 F16/F32); xh 16-byte aligned and ldx a multiple
 * of 8 halves (cp.async moves 16 bytes); K past the last full step is
 * zero-filled. Weights as uploaded by the backend (Q8_0/IQ2_XXS/Q2_K
 * repacked per slab, see matvec.cuh; F16/F32/Q4_K as in the file).
 * Results are deterministic: every output element is written once by one
 * thread after a fixed-order accumulation; no atomics. */
#ifndef DS4_CUDA_MM_CUH
#define DS4_CUDA_MM_CUH

/* Shared rows are BK + 8 halves: 16 bytes past a multiple of 128 puts the
 * 8 rows of an ldmatrix on distinct banks. */
#define MM_DBM 128             /* weight rows per block: dense */
#define MM_EBM 128             /* experts (256 rows at one block an SM measured 5–25 % slower) */
#define MM_THREADS 256
#define MM_EBN 64              /* token tile of the expert kernels */
#define MM_DBN 128             /* token tile of the dense kernel */

enum { MF_F32, MF_F16, MF_Q8, MF_Q2K, MF_Q4K, MF_IQ2 };
enum { MM_DENSE, MM_GLU, MM_DOWN };

/* ---- activations ---------------------------------------------------------------- */

/* A row's scale from each thread's partial max |x| and non-finite flag:
 * the block's max and flag (through sm, sbad: 32 each), then
 * sc = 2^(14−E) with max = f·2^E, f ∈ [0.5, 1), or 0 when the row is below
 * 2^-100 or bad; E and the block's flag come back for xs. */
__device__ __forceinline__ float prep_scale(float m, int bad, float *sm, int *sbad, int *Ep, int *badp) {
    m = warp_max(m);
    bad = __any_sync(0xffffffffu, bad);
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (!lane) { sm[wid] = m; sbad[wid] = bad; }
    __syncthreads();
    if (threadIdx.x < 32) {
        int nw = blockDim.x >> 5;
        m = lane < nw ? sm[lane] : 0.0f;
        bad = lane < nw ? sbad[lane] : 0;
        m = warp_max(m);
        bad = __any_sync(0xffffffffu, bad);
        if (!lane) { sm[0] = m; sbad[0] = bad; }
    }
    __syncthreads();
    m = sm[0];
    bad = sbad[0];
    int E = 0;
    float sc = 0;
    if (!bad && m >= 0x1p-100f) {
        frexpf(m, &E);
        sc = ldexpf(1.0f, 14 - E);
    }
    *badp = bad;
    *Ep = E;
    return sc;
}

/* One block per row: max |x|, then x · 2^(14−E) in f16 where max = f·2^E,
 * f ∈ [0.5, 1). Rows below 2^-100 count as zero (their scale would leave
 * f32); a non-finite value makes xs NaN, so the products show it. */
__global__ void k_mm_prep(const float *__restrict__ x, int64_t ldx, int64_t K, __half *__restrict__ xh,
                          float *__restrict__ xs) {
    __shared__ float sm[32];
    __shared__ int sbad[32];
    const float *row = x + blockIdx.x * ldx;
    float m = 0;
    int bad = 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        float a = fabsf(row[k]);
        bad |= !(a <= 3.4e38f);
        m = fmaxf(m, a);
    }
    int E;
    float sc = prep_scale(m, bad, sm, sbad, &E, &bad);
    __half *out = xh + blockIdx.x * K;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) out[k] = __float2half_rn(row[k] * sc);
    if (!threadIdx.x) xs[blockIdx.x] = bad ? __int_as_float(0x7fc00000) : sc > 0 ? ldexpf(1.0f, E - 14) : 0.0f;
}

/* The same with the row held in registers (NV float4 a thread): k_mm_prep
 * reads a row twice, and rows of 64–128 KB (K = 16384, 32768 at T = 2048)
 * come back from DRAM the second time (ncu: twice the bytes). */
template <int NV>
__global__ void __launch_bounds__(1024) k_mm_prep_r(const float *__restrict__ x, int64_t ldx, int64_t K,
                                                    __half *__restrict__ xh, float *__restrict__ xs) {
    __shared__ float sm[32];
    __shared__ int sbad[32];
    const float4 *row = (const float4 *)(x + blockIdx.x * ldx);
    const int K4 = (int)(K / 4);
    float4 v[NV];
    float m = 0;
    int bad = 0;
#pragma unroll
    for (int i = 0; i < NV; i++) {
        int k = threadIdx.x + i * blockDim.x;
        v[i] = k < K4 ? row[k] : make_float4(0, 0, 0, 0);
        float a = fabsf(v[i].x), b = fabsf(v[i].y), c = fabsf(v[i].z), d = fabsf(v[i].w);
        bad |= !(a <= 3.4e38f) | !(b <= 3.4e38f) | !(c <= 3.4e38f) | !(d <= 3.4e38f);   /* fmaxf drops NaN */
        m = fmaxf(m, fmaxf(fmaxf(a, b), fmaxf(c, d)));
    }
    int E;
    float sc = prep_scale(m, bad, sm, sbad, &E, &bad);
    __half2 *out = (__half2 *)(xh + blockIdx.x * K);
#pragma unroll
    for (int i = 0; i < NV; i++) {
        int k = threadIdx.x + i * blockDim.x;
        if (k < K4) {
            out[2 * k] = __floats2half2_rn(v[i].x * sc, v[i].y * sc);
            out[2 * k + 1] = __floats2half2_rn(v[i].z * sc, v[i].w * sc);
        }
    }
    if (!threadIdx.x) xs[blockIdx.x] = bad ? __int_as_float(0x7fc00000) : sc > 0 ? ldexpf(1.0f, E - 14) : 0.0f;
}

static void mm_prep(cudaStream_t s, const float *x, int64_t ldx, int64_t T, int64_t K, __half *xh, float *xs) {
    if (T <= 0) return;
    /* float4 rows (K, ldx multiples of 4, x 16-byte aligned) up to 8 float4 a
     * thread of 1024: the row stays in registers; else two passes. */
    int64_t K4 = K / 4;
    if (K % 4 || ldx % 4 || (uintptr_t)x % 16 || K4 > 8 * 1024) {
        k_mm_prep<<<(unsigned)T, 256, 0, s>>>(x, ldx, K, xh, xs);
        return;
    }
    int nv = K4 <= 1024 ? 1 : K4 <= 2048 ? 2 : K4 <= 4096 ? 4 : 8;
    unsigned th = (unsigned)((K4 + nv - 1) / nv + 31) / 32 * 32;
    if (nv == 1) k_mm_prep_r<1><<<(unsigned)T, th, 0, s>>>(x, ldx, K, xh, xs);
    else if (nv == 2) k_mm_prep_r<2><<<(unsigned)T, th, 0, s>>>(x, ldx, K, xh, xs);
    else if (nv == 4) k_mm_prep_r<4><<<(unsigned)T, th, 0, s>>>(x, ldx, K, xh, xs);
    else k_mm_prep_r<8><<<(unsigned)T, th, 0, s>>>(x, ldx, K, xh, xs);
}

/* ---- weight units: 16 consecutive weights of one row ---------------------------- */

/* A unit's raw bytes, loaded one pipeline step ahead. */
template <int F> struct mm_raw {
    uint4 q[F == MF_F32 ? 4 : F == MF_F16 ? 2 : 1];
    uint32_t h, h2;
};

/* Row r of a slab of M rows × K: pl = its quants, hd = its block headers
 * (repacked formats; unused otherwise). */
template <int F>
__device__ __forceinline__ void mm_row(const uint8_t *slab, int64_t K, int64_t M, uint64_t rb, int64_t r,
                                       const uint8_t **pl, const uint8_t **hd) {
    if constexpr (F == MF_Q8) {
        int64_t nb = K / 32;
        *pl = slab + r * nb * 32;
        *hd = slab + M * nb * 32 + r * nb * 2;
    } else if constexpr (F == MF_IQ2) {
        int64_t nb = K / 256;
        *pl = slab + r * nb * 64;
        *hd = slab + M * nb * 64 + r * nb * 2;
    } else if constexpr (F == MF_Q2K) {
        int64_t nb = K / 256;
        *pl = slab + r * nb * 80;
        *hd = slab + M * nb * 80 + r * nb * 4;
    } else {
        *pl = slab + r * rb;
        *hd = NULL;
    }
}

/* Raw bytes of the unit at weights k … k+15 (k a multiple of 16). */
template <int F>
__device__ __forceinline__ void mm_load(const uint8_t *pl, const uint8_t *hd, int64_t k, mm_raw<F> &u) {
    if constexpr (F == MF_Q8) {
        u.q[0] = *(const uint4 *)(pl + k);
        u.h = ((const unsigned short *)hd)[k >> 5];
    } else if constexpr (F == MF_IQ2) {   /* the unit's 32-weight group: 4 grid indices, signs | scale */
        uint2 g = *(const uint2 *)(pl + (k >> 5) * 8);
        u.q[0] = make_uint4(g.x, g.y, 0, 0);
        u.h = ((const unsigned short *)hd)[k >> 8];
    } else if constexpr (F == MF_Q2K) {   /* weights 128h + 32s + 16half + i: quant byte 32h + 16half + i, shift 2s */
        const uint8_t *blk = pl + (k >> 8) * 80;
        int e = (int)(k & 255), h = e >> 7, s = (e >> 5) & 3, half = (e >> 4) & 1;
        u.q[0] = *(const uint4 *)(blk + 16 + 32 * h + 16 * half);
        u.h = ((const uint32_t *)hd)[k >> 8];
        u.h2 = blk[8 * h + 2 * s + half];
    } else if constexpr (F == MF_Q4K) {   /* 64-weight chunk cc: bytes 32cc…, low nibbles then high */
        const uint8_t *blk = pl + (k >> 8) * 144;
        int e = (int)(k & 255), cc = e >> 6, j = e >> 5;
        u.q[0] = *(const uint4 *)(blk + 16 + 32 * cc + (e & 16));
        u.h = *(const uint32_t *)blk;
        const uint8_t *s = blk + 4;
        int sc, mn;
        if (j < 4) { sc = s[j] & 63; mn = s[j + 4] & 63; }
        else { sc = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4; mn = (s[j + 4] >> 4) | (s[j] >> 6) << 4; }
        u.h2 = (uint32_t)sc | (uint32_t)mn << 8;
    } else if constexpr (F == MF_F16) {
        const uint4 *p = (const uint4 *)(pl + 2 * k);
        u.q[0] = p[0]; u.q[1] = p[1];
    } else {
        const uint4 *p = (const uint4 *)(pl + 4 * k);
        u.q[0] = p[0]; u.q[1] = p[1]; u.q[2] = p[2]; u.q[3] = p[3];
    }
}

__device__ __forceinline__ __half2 mm_h2(uint32_t v) { return *(__half2 *)&v; }
__device__ __forceinline__ uint32_t mm_u(__half2 v) { return *(uint32_t *)&v; }
/* Bytes 0,1 (sel 0x4140) or 2,3 (0x4342) of w as the halves 1024 + byte:
 * 0x64XX is 1024 + XX exactly, so subtracting 1024 leaves the byte. */
__device__ __forceinline__ __half2 mm_b2h(uint32_t w, uint32_t sel) { return mm_h2(__byte_perm(w, 0x64646464u, sel)); }

/* The unit as 16 halves (8 words, weight order). */
template <int F>
__device__ __forceinline__ void mm_deq(const mm_raw<F> &u, int64_t k, const uint32_t *tab, uint32_t *o) {
    if constexpr (F == MF_Q8) {   /* int8 + 128 as 1024 + b, minus 1152: exact, then one rounding by d */
        const __half2 k1152 = __float2half2_rn(1152.0f);
        __half2 d = __half2half2(__ushort_as_half((unsigned short)u.h));
        const uint32_t w[4] = {u.q[0].x ^ 0x80808080u, u.q[0].y ^ 0x80808080u, u.q[0].z ^ 0x80808080u,
                               u.q[0].w ^ 0x80808080u};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            o[2 * i] = mm_u(__hmul2(__hsub2(mm_b2h(w[i], 0x4140), k1152), d));
            o[2 * i + 1] = mm_u(__hmul2(__hsub2(mm_b2h(w[i], 0x4342), k1152), d));
        }
    } else if constexpr (F == MF_IQ2) {
        /* Weights are ±{8, 25, 43}·db: the three products, rounded once, sit
         * in a 4-half table; tab[grid entry] holds byte-permute selectors
         * picking each pair's halves, sgn[signs] the sign bits to flip. */
        uint32_t A = u.q[0].x, B = u.q[0].y;
        float db = __half2float(__ushort_as_half((unsigned short)u.h)) * (0.5f + u2f(B >> 28)) * 0.25f;
        uint32_t t01 = mm_u(__floats2half2_rn(8.0f * db, 25.0f * db)), t23 = mm_u(__floats2half2_rn(43.0f * db, 0.0f));
        int l0 = (int)(k >> 3) & 2;   /* the unit is half l0/2 of the group: grid entries l0, l0 + 1 */
#pragma unroll
        for (int l = 0; l < 2; l++) {
            uint2 sel = ((const uint2 *)tab)[(A >> 8 * (l0 + l)) & 255];
            uint4 sg = ((const uint4 *)tab)[128 + ((B >> 7 * (l0 + l)) & 127)];
            o[4 * l + 0] = __byte_perm(t01, t23, sel.x) ^ sg.x;
            o[4 * l + 1] = __byte_perm(t01, t23, sel.x >> 16) ^ sg.y;
            o[4 * l + 2] = __byte_perm(t01, t23, sel.y) ^ sg.z;
            o[4 * l + 3] = __byte_perm(t01, t23, sel.y >> 16) ^ sg.w;
        }
    } else if constexpr (F == MF_Q2K) {
        /* dl·q − ml for the 4 values of q, in f32 and rounded once, as a
         * 4-half table; a pair's selector is 2q0, 2q0+1, 2q1, 2q1+1 in
         * nibbles: q·34 + 0x1010 (q0 in bits 0–1, q1 in bits 8–9). */
        float d = __half2float(__ushort_as_half((unsigned short)u.h));
        float dm = __half2float(__ushort_as_half((unsigned short)(u.h >> 16)));
        float dl = d * u2f(u.h2 & 15), nml = -dm * u2f(u.h2 >> 4);
        uint32_t t01 = mm_u(__floats2half2_rn(nml, dl + nml)), t23 = mm_u(__floats2half2_rn(fmaf(2.0f, dl, nml), fmaf(3.0f, dl, nml)));
        uint32_t sh = 2 * (uint32_t)((k >> 5) & 3);
        const uint32_t w[4] = {u.q[0].x, u.q[0].y, u.q[0].z, u.q[0].w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint32_t t = (w[i] >> sh) & 0x03030303u;
            o[2 * i] = __byte_perm(t01, t23, t * 34 + 0x1010);
            o[2 * i + 1] = __byte_perm(t01, t23, (t >> 16) * 34 + 0x1010);
        }
    } else if constexpr (F == MF_Q4K) {   /* dl·q − ml in f32, one rounding to f16 */
        float d = __half2float(__ushort_as_half((unsigned short)u.h));
        float dm = __half2float(__ushort_as_half((unsigned short)(u.h >> 16)));
        float dl = d * u2f(u.h2 & 255), nml = -dm * u2f(u.h2 >> 8);
        uint32_t sh = 4 * (uint32_t)((k >> 5) & 1);
        const uint32_t w[4] = {u.q[0].x, u.q[0].y, u.q[0].z, u.q[0].w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint32_t t = (w[i] >> sh) & 0x0F0F0F0Fu;
            o[2 * i] = mm_u(__floats2half2_rn(fmaf(dl, byte2f(t, 0), nml), fmaf(dl, byte2f(t, 1), nml)));
            o[2 * i + 1] = mm_u(__floats2half2_rn(fmaf(dl, byte2f(t, 2), nml), fmaf(dl, byte2f(t, 3), nml)));
        }
    } else if constexpr (F == MF_F16) {
        o[0] = u.q[0].x; o[1] = u.q[0].y; o[2] = u.q[0].z; o[3] = u.q[0].w;
        o[4] = u.q[1].x; o[5] = u.q[1].y; o[6] = u.q[1].z; o[7] = u.q[1].w;
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            o[2 * i] = mm_u(__floats2half2_rn(__uint_as_float(u.q[i].x), __uint_as_float(u.q[i].y)));
            o[2 * i + 1] = mm_u(__floats2half2_rn(__uint_as_float(u.q[i].z), __uint_as_float(u.q[i].w)));
        }
    }
}

/* ---- tensor-core primitives -------------------------------------------------------- */

__device__ __forceinline__ void mm_cp16(void *dst, const void *src, bool ok) {
    unsigned sa = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void mm_ldsm4(const __half *p, uint32_t *r) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void mm_mma(float *c, const uint32_t *a, const uint32_t *b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* ---- the kernel ------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *w, *w2;     /* slab (expert 0's for MM_GLU / MM_DOWN); w2: the up slab */
    int64_t K, M;
    uint64_t rb, estride;      /* GGUF row bytes; bytes between experts */
    int64_t r0, nr;            /* MM_DENSE: rows r0 … r0+nr−1 */
    int64_t gl, gspan;         /* MM_DENSE groups: row r reads x from column (r / gl)·gspan (gl 0: none) */
    const __half *x;
    const float *xs;
    int64_t ldx, T;
    float *y;
    int64_t ldy;
    const int32_t *perm;       /* experts: sorted position → assignment */
    const int4 *tile;          /* experts: (expert, first position, count) */
    const int32_t *ntile;
    int used;
    const float *ew;
    float clamp;
} mm_args;

/* Step kt's loads: this thread's weight units into registers, its token
 * chunks by cp.async into b (rows without a token, and K past the end, read
 * as zeros). */
template <int F, int BN, int BK, int NU, int NC>
__device__ __forceinline__ void mm_load_step(const mm_args &p, const uint8_t *const *pl, const uint8_t *const *hd,
                                             int ks, int64_t kt, mm_raw<F> *raw, __half *b, const int64_t *roff,
                                             int tid) {
    constexpr int LDS = BK + 8;
    int64_t k = kt * BK + 16 * ks;
#pragma unroll
    for (int i = 0; i < NU; i++)
        if (k < p.K) mm_load<F>(pl[i], hd[i], k, raw[i]);
#pragma unroll
    for (int i = 0; i < NC; i++) {
        int c = tid + i * MM_THREADS, n = c / (BK / 8), part = c % (BK / 8);
        int64_t kc = kt * BK + 8 * part, off = roff[n];
        bool ok = off >= 0 && kc < p.K;
        mm_cp16(b + n * LDS + 8 * part, ok ? p.x + off + kc : p.x, ok);
    }
    asm volatile("cp.async.commit_group;\n");
}
/* The units of step kt, dequantised into the weight buffer a (row
 * (tid + 256i)/(BK/16), weights 16·ks …). */
template <int F, int BK, int NU>
__device__ __forceinline__ void mm_store_step(const mm_raw<F> *raw, int ks, int64_t kt, int64_t K, const uint32_t *tab,
                                              __half *a, int tid) {
    constexpr int LDS = BK + 8;
    int64_t k = kt * BK + 16 * ks;
#pragma unroll
    for (int i = 0; i < NU; i++) {
        uint32_t o[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (k < K) mm_deq<F>(raw[i], k, tab, o);
        uint4 *d = (uint4 *)(a + ((tid + MM_THREADS * i) / (BK / 16)) * LDS + 16 * ks);
        d[0] = make_uint4(o[0], o[1], o[2], o[3]);
        d[1] = make_uint4(o[4], o[5], o[6], o[7]);
    }
}

/* A block = (BM weight rows: tile bm, BN tokens: tile bt). Dense: bt is
 * blockIdx.x, so the blocks running together share weight tiles (each
 * weight byte leaves HBM about once; the f16 tokens stay in L2); experts:
 * bm is blockIdx.x, the blocks of one expert tile run together. WM warps
 * along M, 8/WM along N. MM_GLU: each warp's first MI/2 m16 tiles hold gate
 * rows, the last MI/2 the up rows of the same features, so the epilogue has
 * both in one thread; a block then covers BM/2 features. */
template <int F, int BM, int BN, int WM, int BK, int MODE>
__global__ void __launch_bounds__(MM_THREADS, 2) k_mm(const mm_args p) {
    constexpr int WN = 8 / WM, WTM = BM / WM, WTN = BN / WN, MI = WTM / 16, NI = WTN / 8, LDS = BK + 8;
    constexpr int NU = BM * BK / 16 / MM_THREADS;      /* weight units per thread per step */
    constexpr int NC = BN * BK / 8 / MM_THREADS;       /* 16-byte token chunks per thread per step */
    static_assert(NI % 2 == 0 && NU >= 1 && MM_THREADS % (BK / 16) == 0, "tile shape");
    extern __shared__ __align__(16) uint8_t mm_smem[];
    __half *sA = (__half *)mm_smem;                        /* [2][BM][LDS] */
    __half *sB = sA + 2 * BM * LDS;                        /* [2][BN][LDS] */
    int64_t *roff = (int64_t *)(sB + 2 * BN * LDS);        /* token row offset in x, −1: none */
    float *rsc = (float *)(roff + BN);                     /* its scale */
    int32_t *rasg = (int32_t *)(rsc + BN);                 /* experts: its assignment */
    uint32_t *tab = (uint32_t *)(rasg + BN);               /* IQ2_XXS: 256 selector pairs, 128 sign masks (4 KB) */

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp % WM, wn = warp / WM;
    const int64_t bm = MODE == MM_DENSE ? blockIdx.y : blockIdx.x, bt = MODE == MM_DENSE ? blockIdx.x : blockIdx.y;
    int64_t j0, cnt, e = 0;
    if (MODE == MM_DENSE) {
        j0 = bt * BN;
        cnt = p.T - j0 < BN ? p.T - j0 : BN;
    } else {
        if (bt >= *p.ntile) return;
        int4 tl = p.tile[bt];
        e = tl.x; j0 = tl.y; cnt = tl.z;
    }
    for (int n = tid; n < BN; n += MM_THREADS) {
        int64_t off = -1, row = 0;
        int32_t a = 0;
        if (n < cnt) {
            if (MODE == MM_DENSE) row = j0 + n;
            else if (MODE == MM_GLU) { a = p.perm[j0 + n]; row = a / p.used; }
            else { a = p.perm[j0 + n]; row = j0 + n; }
            off = row * p.ldx;
            if (MODE == MM_DENSE && p.gl) off += (p.r0 + bm * BM) / p.gl * p.gspan;   /* a tile lies in one group */
        }
        roff[n] = off;
        rsc[n] = off >= 0 ? p.xs[row] : 0.0f;
        rasg[n] = a;
    }
    if (F == MF_IQ2)
        for (int i = tid; i < 256; i += MM_THREADS) {
            /* grid entry i: bytes 8 / 25 / 43 (the grid's only magnitudes) →
             * table halves 0 / 1 / 2, as selectors per weight pair */
            uint64_t g = d_iq2_grid[i];
            uint32_t sel[2] = {0, 0};
            for (int j = 0; j < 8; j++) {
                uint32_t m = (uint32_t)(g >> 8 * j) & 255, h = m == 8 ? 0 : m == 25 ? 1 : 2;
                sel[j >> 2] |= (2 * h | (2 * h + 1) << 4) << 8 * (j & 3);
            }
            tab[2 * i] = sel[0];
            tab[2 * i + 1] = sel[1];
            if (i < 128) {   /* ksigns: 7 bits + parity; sign bit of each half */
                uint32_t sg = (uint32_t)i | (__popc(i) & 1) << 7;
                for (int q = 0; q < 4; q++) tab[512 + 4 * i + q] = ((sg >> 2 * q) & 1) << 15 | ((sg >> (2 * q + 1)) & 1) << 31;
            }
        }

    /* This thread's weight units: rows (tid + 256i)/(BK/16), 16 weights at 16·ks of each step. */
    const uint8_t *pl[NU], *hd[NU];
    const int ks = tid % (BK / 16);
#pragma unroll
    for (int i = 0; i < NU; i++) {
        int a = (tid + MM_THREADS * i) / (BK / 16);
        const uint8_t *slab = p.w + e * p.estride;
        int64_t r, last;
        if (MODE == MM_GLU) {
            int loc = a % WTM;
            if (loc >= WTM / 2) slab = p.w2 + e * p.estride;
            r = bm * (BM / 2) + (a / WTM) * (WTM / 2) + loc % (WTM / 2);
            last = p.M - 1;
        } else if (MODE == MM_DENSE) {
            r = p.r0 + bm * BM + a;
            last = p.r0 + p.nr - 1;
        } else {
            r = bm * BM + a;
            last = p.M - 1;
        }
        mm_row<F>(slab, p.K, p.M, p.rb, r < last ? r : last, &pl[i], &hd[i]);   /* past the end: repeat the last row */
    }
    __syncthreads();

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NI; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[i][j][c] = 0.0f;

    const int64_t nk = (p.K + BK - 1) / BK;
    mm_raw<F> raw[NU];
    mm_load_step<F, BN, BK, NU, NC>(p, pl, hd, ks, 0, raw, sB, roff, tid);
    mm_store_step<F, BK, NU>(raw, ks, 0, p.K, tab, sA, tid);
    /* Experts: tokens this warp's columns hold; fragments past them (an
     * expert's short tile) skip their loads and mma. (Dense tiles are full
     * but the last; the check there cost registers.) */
    const int live = MODE == MM_DENSE ? WTN : (int)cnt - wn * WTN;
    for (int64_t kt = 0; kt < nk; kt++) {
        const int buf = (int)(kt & 1);
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        __syncthreads();   /* step kt in both buffers; everyone is past step kt−1, whose buffers refill now */
        if (kt + 1 < nk) mm_load_step<F, BN, BK, NU, NC>(p, pl, hd, ks, kt + 1, raw, sB + (buf ^ 1) * BN * LDS, roff, tid);
        const __half *a = sA + buf * BM * LDS + (wm * WTM) * LDS;
        const __half *b = sB + buf * BN * LDS + (wn * WTN) * LDS;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[MI][4], bf[NI][2];
#pragma unroll
            for (int i = 0; i < MI; i++) mm_ldsm4(a + (i * 16 + (lane & 15)) * LDS + kk + (lane >> 4) * 8, af[i]);
#pragma unroll
            for (int j = 0; j < NI; j += 2) {
                if (j * 8 >= live) break;
                uint32_t r[4];
                mm_ldsm4(b + (j * 8 + (lane & 7) + (lane >> 4) * 8) * LDS + kk + ((lane >> 3) & 1) * 8, r);
                bf[j][0] = r[0]; bf[j][1] = r[1]; bf[j + 1][0] = r[2]; bf[j + 1][1] = r[3];
            }
#pragma unroll
            for (int j = 0; j < NI; j++) {
                if (j * 8 >= live) break;
#pragma unroll
                for (int i = 0; i < MI; i++) mm_mma(acc[i][j], af[i], bf[j]);
            }
        }
        if (kt + 1 < nk) mm_store_step<F, BK, NU>(raw, ks, kt + 1, p.K, tab, sA + (buf ^ 1) * BM * LDS, tid);
    }

    /* Epilogue: c of tile (i, j) is row gid + 8·(c/2), token 2·tig + c%2. */
    const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int i = 0; i < (MODE == MM_GLU ? MI / 2 : MI); i++)
#pragma unroll
        for (int j = 0; j < NI; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int n = wn * WTN + j * 8 + 2 * tig + (c & 1), ra = i * 16 + gid + 8 * (c >> 1);
                if (n >= cnt) continue;
                float v = acc[i][j][c] * rsc[n];
                if (MODE == MM_DENSE) {
                    int64_t r = p.r0 + bm * BM + wm * WTM + ra;
                    if (r < p.r0 + p.nr) p.y[(j0 + n) * p.ldy + (r - p.r0)] = v;
                } else if (MODE == MM_DOWN) {
                    int64_t r = bm * BM + wm * WTM + ra;
                    if (r < p.M) p.y[(int64_t)rasg[n] * p.ldy + r] = v;
                } else {
                    int64_t f = bm * (BM / 2) + wm * (WTM / 2) + ra;
                    float u = acc[i + MI / 2][j][c] * rsc[n];
                    if (f < p.M) p.y[(j0 + n) * p.ldy + f] = swiglu(v, u, p.clamp) * (p.ew ? p.ew[rasg[n]] : 1.0f);
                }
            }
}

/* ---- routed experts on IQ2_XXS / Q2_K: weights dequantised into registers ------------ */

/* The model's expert formats take a second kernel. k_mm moves every weight
 * through shared memory as f16 (dequant store, then ldmatrix), and ncu put
 * its limit there (MIO throttle, shared pipe busiest). Here the quantised
 * bytes are staged (cp.async, 4–8× fewer bytes than f16) and each warp
 * dequantises its own 32 weight rows straight into mma A fragments: no
 * weight is dequantised twice, and shared memory carries the token rows,
 * the quants and two small tables.
 *
 * K order inside an mma. The sum over k does not care which k a fragment
 * slot stands for, as long as A and B agree. In a K step of 128 the thread
 * of quad index tig takes weights 32·tig … 32·tig + 31 of its rows (one
 * IQ2_XXS group, one Q2_K sub-block pair): in mma k-step 2e (2e+1) its
 * fragment slots k = 2tig, 2tig+1, 2tig+8, 2tig+9 hold weights 32·tig + 8e
 * + 0…3 (4…7). So one thread decodes 8 consecutive weights of a row at a
 * time (an IQ2_XXS grid entry, 8 Q2_K quant bytes) into the A registers of
 * two k-steps, and reads the matching 8 token values with one 16-byte
 * load. Block: 8 warps × 32 rows (two m16 tiles) × 64 tokens (eight n8
 * tiles; 64 accumulators a thread); B traffic is one 16-byte load per four
 * mma. */
#define MX_BM 256              /* weight rows a block: 8 warps × 32 */
#define MX_BK 128              /* K step: half a 256-weight block */

/* 16-byte chunk c of token row n (16 chunks a row, 256 bytes): a k-step
 * reads chunk 4·tig + e of rows 2p, 2p+1 in one phase of 8 lanes; the XOR
 * puts those 8 chunks on 8 distinct 16-byte bank groups. */
__device__ __forceinline__ int mx_swz(int n, int c) { return c ^ ((c >> 2) & 2) ^ (n & 1); }

/* prmt on the low 16 bits of s as they are (__byte_perm masks them first:
 * one more instruction a word; our selectors never set a nibble's top bit). */
__device__ __forceinline__ uint32_t mx_prmt(uint32_t a, uint32_t b, uint32_t s) {
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
    return d;
}

__device__ __forceinline__ void mx_cp8(void *dst, const void *src) {   /* .cg moves 16 bytes only */
    unsigned sa = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(sa), "l"(src));
}

/* Local weight row a (0 … 255) of block bm: its slab and row. MM_GLU: warp
 * w's rows 32w … 32w+15 are gate features 16w …, the next 16 the up rows of
 * the same features. Rows past M repeat the last. */
template <int MODE>
__device__ __forceinline__ int64_t mx_row(const mm_args &p, int64_t e, int64_t bm, int a, const uint8_t **slab) {
    *slab = (MODE == MM_GLU && (a & 16) ? p.w2 : p.w) + e * p.estride;
    int64_t r = MODE == MM_GLU ? bm * (MX_BM / 2) + (a >> 5) * 16 + (a & 15) : bm * MX_BM + a;
    return r < p.M ? r : p.M - 1;
}

/* The two mma k-steps of one entry: o[i] = 8 weights (4 words) of row
 * gid + 8i (i = 0, 1: m16 tile 0; 2, 3: tile 1); the tokens of n8 tile j
 * from this lane's 16-byte chunk xl of the stage's token rows. */
__device__ __forceinline__ void mx_round(float (*acc)[8][4], const uint32_t (*o)[4], const uint8_t *xl, int nj) {
    const uint32_t a00[4] = {o[0][0], o[1][0], o[0][1], o[1][1]}, a10[4] = {o[2][0], o[3][0], o[2][1], o[3][1]};
    const uint32_t a01[4] = {o[0][2], o[1][2], o[0][3], o[1][3]}, a11[4] = {o[2][2], o[3][2], o[2][3], o[3][3]};
#pragma unroll
    for (int j = 0; j < 8; j++) {
        if (j >= nj) break;
        uint4 b = *(const uint4 *)(xl + j * 8 * 256);
        const uint32_t b0[2] = {b.x, b.y}, b1[2] = {b.z, b.w};
        mm_mma(acc[0][j], a00, b0);
        mm_mma(acc[1][j], a10, b0);
        mm_mma(acc[0][j], a01, b1);
        mm_mma(acc[1][j], a11, b1);
    }
}

template <int F, int MODE>
__global__ void __launch_bounds__(MM_THREADS, 2) k_mmx(const mm_args p) {
    constexpr int BN = MM_EBN;
    constexpr int XS = BN * 256, QS = MX_BM * 32, SS = F == MF_Q2K ? MX_BM * 8 : 0, HS = MX_BM * 4;
    constexpr int STAGE = XS + QS + SS + HS;
    extern __shared__ __align__(16) uint8_t mm_smem[];
    int64_t *roff = (int64_t *)(mm_smem + 2 * STAGE);      /* token row offset in x, −1: none */
    float *rsc = (float *)(roff + BN);                      /* its scale */
    int32_t *rasg = (int32_t *)(rsc + BN);                  /* its assignment */
    uint32_t *codes = (uint32_t *)(rasg + BN);              /* IQ2_XXS: [256 grid entries][32 lanes] */
    uint4 *signs = (uint4 *)(codes + 256 * 32);             /* IQ2_XXS: [128 sign patterns][8 copies] */

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const int64_t bm = blockIdx.x, bt = blockIdx.y;
    if (bt >= *p.ntile) return;
    const int4 tl = p.tile[bt];
    const int64_t e = tl.x, j0 = tl.y;
    const int cnt = tl.z;
    for (int n = tid; n < BN; n += MM_THREADS) {
        int64_t off = -1, row = 0;
        int32_t a = 0;
        if (n < cnt) {
            a = p.perm[j0 + n];
            row = MODE == MM_GLU ? a / p.used : j0 + n;
            off = row * p.ldx;
        }
        roff[n] = off;
        rsc[n] = off >= 0 ? p.xs[row] : 0.0f;
        rasg[n] = a;
    }
    if (F == MF_IQ2) {
        /* codes: grid entry i's 8 magnitudes 8 / 25 / 43 as 2-bit codes 0 / 1 / 2,
         * weight j at bit 8(j%4) + 2(j/4), so (w >> 2h) & 0x03030303 holds the
         * codes of weights 4h … 4h+3 one a byte; one copy per lane (bank = lane).
         * signs: ksigns pattern i (7 bits, parity bit 7) as the sign bits of the
         * 4 half pairs; 8 copies (a phase of a 16-byte load is 8 lanes). */
        for (int i = tid; i < 256; i += MM_THREADS) {   /* copy l at lane (l + i) % 32: stores on distinct banks */
            uint64_t g = d_iq2_grid[i];
            uint32_t w = 0;
            for (int j = 0; j < 8; j++) {
                uint32_t m = (uint32_t)(g >> 8 * j) & 255;
                w |= (m == 8 ? 0u : m == 25 ? 1u : 2u) << (8 * (j & 3) + 2 * (j >> 2));
            }
            for (int l = 0; l < 32; l++) codes[32 * i + ((l + i) & 31)] = w;
        }
        for (int i = tid; i < 128; i += MM_THREADS) {
            uint32_t sg = (uint32_t)i | (__popc(i) & 1) << 7, m[4];
            for (int q = 0; q < 4; q++) m[q] = ((sg >> 2 * q) & 1) << 15 | ((sg >> (2 * q + 1)) & 1) << 31;
            for (int l = 0; l < 8; l++) signs[8 * i + ((l + i) & 7)] = make_uint4(m[0], m[1], m[2], m[3]);
        }
    }

    /* This thread's loads: payload rows a0 = tid >> 1 and a0 + 128 (one slab:
     * bit 4 of the row picks it), 16 bytes at 16·(tid & 1) of a step's 32
     * each; the scales and header of row as = one of the two. Repacked slab
     * (kernels.cuh): payload rows of nb blocks, PAY bytes each, then headers. */
    constexpr int PAY = F == MF_IQ2 ? 64 : 80, HL = F == MF_IQ2 ? 2 : 4;
    const uint8_t *slab;
    const int64_t r0 = mx_row<MODE>(p, e, bm, tid >> 1, &slab), r1 = mx_row<MODE>(p, e, bm, 128 + (tid >> 1), &slab);
    const int qhalf = 16 * (tid & 1), as = (tid >> 1) + 128 * (tid & 1);
    const int64_t nb = p.K / 256, rs = tid & 1 ? r1 : r0;
    const uint8_t *hp = slab + p.M * nb * PAY + rs * nb * HL;
    __syncthreads();   /* roff, tables */

    auto load = [&](int64_t kt, int st) {
        uint8_t *sx = mm_smem + st * STAGE, *sq = sx + XS, *ss = sq + QS;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int c = tid + MM_THREADS * i, n = c >> 4, part = c & 15;
            int64_t off = roff[n];
            bool ok = off >= 0;
            mm_cp16(sx + n * 256 + 16 * mx_swz(n, part), ok ? p.x + off + kt * MX_BK + 8 * part : p.x, ok);
        }
        /* IQ2_XXS: groups 4kt … 4kt+3, 8 bytes each; Q2_K: quant bytes of half kt & 1 of block kt >> 1 */
        const int64_t so = F == MF_IQ2 ? 32 * kt : 80 * (kt >> 1) + 16 + 32 * (kt & 1);
#pragma unroll
        for (int i = 0; i < 2; i++)
            mm_cp16(sq + 32 * ((tid >> 1) + 128 * i) + qhalf, slab + (i ? r1 : r0) * nb * PAY + so + qhalf, true);
        if (F == MF_Q2K) mx_cp8(ss + 8 * as, slab + rs * nb * PAY + 80 * (kt >> 1) + 8 * (kt & 1));
        asm volatile("cp.async.commit_group;\n");
    };
    /* Headers (2 bytes IQ2_XXS: no cp.async that small) by plain loads one step ahead. */
    auto header = [&](int64_t kt) -> uint32_t {
        return F == MF_IQ2 ? (uint32_t)((const unsigned short *)hp)[kt >> 1] : ((const uint32_t *)hp)[kt >> 1];
    };

    float acc[2][8][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[i][j][c] = 0.0f;

    const int64_t nk = p.K / MX_BK;
    const int nj = (cnt + 7) >> 3;   /* n8 tiles holding tokens; the others skip their loads and mma */
    load(0, 0);
    ((uint32_t *)(mm_smem + XS + QS + SS))[as] = header(0);
    /* This lane's token chunk for entry e: row 8j + gid, chunk 4·tig + e (swizzled). */
    const int xl0 = gid * 256 + 64 * tig, xm = (tig & 2) | (gid & 1);
    for (int64_t kt = 0; kt < nk; kt++) {
        const int st = (int)(kt & 1);
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        __syncthreads();   /* step kt staged; everyone is past step kt−1, whose stage refills now */
        uint32_t hnext = 0;
        if (kt + 1 < nk) {
            load(kt + 1, st ^ 1);
            hnext = header(kt + 1);
        }
        const uint8_t *sx = mm_smem + st * STAGE, *sq = sx + XS, *ss = sq + QS;
        const uint32_t *sh = (const uint32_t *)(ss + SS);
        if constexpr (F == MF_IQ2) {
            /* Group tig of each row: 4 grid indices, 4 × 7 sign bits, scale in
             * the top 4 bits; its weights ±{8, 25, 43}·db rounded once, as a
             * 4-half table t01, t23. */
            uint2 g[4];
            uint32_t t01[4], t23[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int R = 32 * warp + 8 * i + gid;
                g[i] = *(const uint2 *)(sq + 32 * R + 8 * tig);
                float db = __half2float(__ushort_as_half((unsigned short)sh[R])) * (0.5f + u2f(g[i].y >> 28)) * 0.25f;
                t01[i] = mm_u(__floats2half2_rn(8.0f * db, 25.0f * db));
                t23[i] = mm_u(__floats2half2_rn(43.0f * db, 0.0f));
            }
#pragma unroll
            for (int en = 0; en < 4; en++) {
                uint32_t o[4][4];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    /* the entry's signs: byte offset 7-bit pattern · 128 (8 copies of 16 bytes) */
                    uint32_t si = en == 0 ? g[i].y << 7 : g[i].y >> (7 * en - 7);
                    uint4 sg = *(const uint4 *)((const uint8_t *)signs + (si & 0x3F80u) + 16 * (lane & 7));
                    /* a pair's selector from its two codes c: nibbles 2c, 2c+1 each,
                     * c·34 + 0x10 a byte (no carry: c ≤ 2) */
                    uint32_t w = codes[((g[i].x >> 8 * en) & 255) * 32 + lane];
                    uint32_t lo = (w & 0x03030303u) * 34 + 0x10101010u, hi = ((w >> 2) & 0x03030303u) * 34 + 0x10101010u;
                    uint4 se = make_uint4(lo, lo >> 16, hi, hi >> 16);
                    o[i][0] = mx_prmt(t01[i], t23[i], se.x) ^ sg.x;
                    o[i][1] = mx_prmt(t01[i], t23[i], se.y) ^ sg.y;
                    o[i][2] = mx_prmt(t01[i], t23[i], se.z) ^ sg.z;
                    o[i][3] = mx_prmt(t01[i], t23[i], se.w) ^ sg.w;
                }
                mx_round(acc, o, sx + xl0 + 16 * (en ^ xm), nj);
            }
        } else {
            /* Q2_K, half h = kt & 1 of a 256-weight block: this thread's 32
             * weights are sub-blocks 2·tig, 2·tig+1 of the half (quant shift
             * 2·tig), 16 weights each; their dl·q − ml for q = 0…3, in f32 and
             * rounded once, as a 4-half table; a pair's selector is q·34 +
             * 0x10 in each byte (nibbles 2q, 2q+1). */
            float d[4], dm[4];
            uint32_t sc[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int R = 32 * warp + 8 * i + gid;
                uint32_t hw = sh[R];
                d[i] = __half2float(__ushort_as_half((unsigned short)hw));
                dm[i] = __half2float(__ushort_as_half((unsigned short)(hw >> 16)));
                sc[i] = *(const unsigned short *)(ss + 8 * R + 2 * tig);
            }
            const int sh2 = 2 * tig;
#pragma unroll
            for (int half = 0; half < 2; half++) {
                uint32_t t01[4], t23[4];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    uint32_t b = sc[i] >> 8 * half;
                    float dl = d[i] * u2f(b & 15), nml = -dm[i] * u2f((b >> 4) & 15);
                    t01[i] = mm_u(__floats2half2_rn(nml, dl + nml));
                    t23[i] = mm_u(__floats2half2_rn(fmaf(2.0f, dl, nml), fmaf(3.0f, dl, nml)));
                }
#pragma unroll
                for (int en = 2 * half; en < 2 * half + 2; en++) {
                    uint32_t o[4][4];
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        uint2 w = *(const uint2 *)(sq + 32 * (32 * warp + 8 * i + gid) + 8 * en);
                        uint32_t lo = ((w.x >> sh2) & 0x03030303u) * 34 + 0x10101010u;
                        uint32_t hi = ((w.y >> sh2) & 0x03030303u) * 34 + 0x10101010u;
                        o[i][0] = mx_prmt(t01[i], t23[i], lo);
                        o[i][1] = mx_prmt(t01[i], t23[i], lo >> 16);
                        o[i][2] = mx_prmt(t01[i], t23[i], hi);
                        o[i][3] = mx_prmt(t01[i], t23[i], hi >> 16);
                    }
                    mx_round(acc, o, sx + xl0 + 16 * (en ^ xm), nj);
                }
            }
        }
        if (kt + 1 < nk) ((uint32_t *)(mm_smem + (st ^ 1) * STAGE + XS + QS + SS))[as] = hnext;
    }

    /* Epilogue: c of acc[i][j] is row gid + 8·(c/2) of m16 tile i, token 8j + 2·tig + c%2. */
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int n = 8 * j + 2 * tig + (c & 1), ra = gid + 8 * (c >> 1);
            if (n >= cnt) continue;
            if (MODE == MM_GLU) {
                int64_t f = bm * (MX_BM / 2) + 16 * warp + ra;
                if (f < p.M)
                    p.y[(j0 + n) * p.ldy + f] = swiglu(acc[0][j][c] * rsc[n], acc[1][j][c] * rsc[n], p.clamp) *
                                                (p.ew ? p.ew[rasg[n]] : 1.0f);
            } else {
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    int64_t r = bm * MX_BM + 32 * warp + 16 * i + ra;
                    if (r < p.M) p.y[(int64_t)rasg[n] * p.ldy + r] = acc[i][j][c] * rsc[n];
                }
            }
        }
}

template <int F, int MODE>
static void mmx_launch_f(cudaStream_t s, dim3 g, const mm_args *a) {
    size_t smem = (size_t)2 * (MM_EBN * 256 + MX_BM * (32 + (F == MF_Q2K ? 8 : 0) + 4)) + (size_t)MM_EBN * 16 +
                  (F == MF_IQ2 ? 256 * 32 * 4 + 128 * 8 * 16 : 0);
    static bool attr;   /* per instantiation: above 48 KB needs the opt-in */
    if (!attr) {
        cudaFuncSetAttribute(k_mmx<F, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        attr = true;
    }
    k_mmx<F, MODE><<<g, MM_THREADS, smem, s>>>(*a);
}

/* ---- launches ------------------------------------------------------------------------ */

static int mm_fmt(uint32_t type) {
    switch (type) {
    case GT_F32: return MF_F32;
    case GT_F16: return MF_F16;
    case GT_Q8_0: return MF_Q8;
    case GT_Q2_K: return MF_Q2K;
    case GT_Q4_K: return MF_Q4K;
    case GT_IQ2_XXS: return MF_IQ2;
    default: return -1;
    }
}

static int mm_sms(void) {
    static int n;
    if (!n) {
        int dev = 0;
        cudaGetDevice(&dev);
        if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) || n < 1) n = 132;
    }
    return n;
}

template <int F, int BM, int BN, int WM, int BK, int MODE>
static void mm_launch_f(cudaStream_t s, dim3 g, const mm_args *a) {
    size_t smem = (size_t)2 * (BM + BN) * (BK + 8) * sizeof(__half) + (size_t)BN * (8 + 4 + 4) + 4096;
    static bool attr;   /* per instantiation: above 48 KB needs the opt-in */
    if (!attr) {
        cudaFuncSetAttribute(k_mm<F, BM, BN, WM, BK, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        attr = true;
    }
    k_mm<F, BM, BN, WM, BK, MODE><<<g, MM_THREADS, smem, s>>>(*a);
}

template <int BM, int BN, int WM, int BK, int MODE>
static void mm_launch(cudaStream_t s, uint32_t type, dim3 g, const mm_args *a) {
    switch (mm_fmt(type)) {
    case MF_F32: mm_launch_f<MF_F32, BM, BN, WM, BK, MODE>(s, g, a); break;
    case MF_F16: mm_launch_f<MF_F16, BM, BN, WM, BK, MODE>(s, g, a); break;
    case MF_Q8: mm_launch_f<MF_Q8, BM, BN, WM, BK, MODE>(s, g, a); break;
    case MF_Q2K: mm_launch_f<MF_Q2K, BM, BN, WM, BK, MODE>(s, g, a); break;
    case MF_Q4K: mm_launch_f<MF_Q4K, BM, BN, WM, BK, MODE>(s, g, a); break;
    case MF_IQ2: mm_launch_f<MF_IQ2, BM, BN, WM, BK, MODE>(s, g, a); break;
    default: fprintf(stderr, "ds4: mm: unsupported weight type %u\n", type); abort();   /* a caller bug */
    }
}

/* x[t][k] ≈ xh[t·K + k] · xs[t] (mm_prep above). */
typedef struct {
    uint32_t type;
    const uint8_t *w;          /* device address of the slab (expert 0's for 3-D tensors) */
    int64_t K, M;
    uint64_t rb;               /* GGUF row bytes */
} mm_w;

static void mm_dense_run(cudaStream_t s, const mm_w *W, int64_t r0, int64_t nr, const __half *xh, const float *xs,
                         int64_t ldx, int64_t T, float *y, int64_t ldy, int64_t gl, int64_t gspan) {
    if (T <= 0 || nr <= 0) return;
    mm_args a;
    memset(&a, 0, sizeof a);
    a.w = W->w; a.K = W->K; a.M = W->M; a.rb = W->rb; a.r0 = r0; a.nr = nr; a.gl = gl; a.gspan = gspan;
    a.x = xh; a.xs = xs; a.ldx = ldx; a.T = T; a.y = y; a.ldy = ldy;
    /* 64-token tiles only where 128 would leave half the SMs idle: measured
     * on an H100, 64 wins at 64 blocks of 128 (4096→512, T = 2048) and loses
     * at 128–256 (4096→1024, 4096→2048). */
    int64_t mt = (nr + MM_DBM - 1) / MM_DBM;
    if (2 * mt * ((T + MM_DBN - 1) / MM_DBN) > mm_sms())
        mm_launch<MM_DBM, MM_DBN, 2, 64, MM_DENSE>(s, W->type, dim3((unsigned)((T + MM_DBN - 1) / MM_DBN), (unsigned)mt), &a);
    else
        mm_launch<MM_DBM, MM_EBN, 4, 64, MM_DENSE>(s, W->type, dim3((unsigned)((T + MM_EBN - 1) / MM_EBN), (unsigned)mt), &a);
}

/* y[t·ldy + (r − r0)] = Σ_k W[r][k] · x[t][k] for r0 ≤ r < r0+nr, t < T. */
static void mm_dense(cudaStream_t s, const mm_w *W, int64_t r0, int64_t nr, const __half *xh, const float *xs,
                     int64_t ldx, int64_t T, float *y, int64_t ldy) {
    mm_dense_run(s, W, r0, nr, xh, xs, ldx, T, y, ldy, 0, 0);
}

/* G groups of gl rows of W (M = G·gl): y[t·ldy + r] = Σ_k W[r][k] ·
 * x[t][(r / gl)·gspan + k] (the attention output: group g reads heads
 * g·H/G …). One launch where every 128-row tile lies in one group (gl a
 * multiple of 128; measured 8 × 84 µs as separate launches at 128 blocks
 * each, H100, T = 2048), else one launch a group. */
static void mm_dense_groups(cudaStream_t s, const mm_w *W, int64_t G, int64_t gl, const __half *xh, const float *xs,
                            int64_t ldx, int64_t gspan, int64_t T, float *y, int64_t ldy) {
    if (gl % MM_DBM) {
        for (int64_t g = 0; g < G; g++) mm_dense(s, W, g * gl, gl, xh + g * gspan, xs, ldx, T, y + g * gl, ldy);
        return;
    }
    mm_dense_run(s, W, 0, G * gl, xh, xs, ldx, T, y, ldy, gl, gspan);
}

/* ---- routed experts ---------------------------------------------------------------- */

typedef struct {
    int64_t T_max, T;          /* capacity; tokens of the last build */
    int used, E;
    int32_t *perm;             /* T_max·used: sorted position j → assignment a */
    int4 *tile;                /* (expert, first position, count, 0) per MM_EBN-token tile */
    int32_t *ntile;            /* device: tiles of the last build */
    int ntile_max;             /* host bound for the last build: grid height */
} mm_route;

/* Tiles of at most MM_EBN tokens of one expert: Σ_e ceil(c_e / BN) ≤ n/BN + (experts hit). */
static int mm_tile_bound(int64_t n, int E) { return (int)(n / MM_EBN + (n < E ? n : E)); }

/* E ≤ MM_MAX_E: k_mm_route keeps 34 ints per expert in the default 48 KB of shared memory. */
#define MM_MAX_E 352
static cudaError_t mm_route_alloc(mm_route *r, int64_t T_max, int used, int E) {
    memset(r, 0, sizeof *r);
    if (T_max < 0 || used < 1 || E < 1 || E > MM_MAX_E || T_max * used > INT32_MAX) return cudaErrorInvalidValue;
    r->T_max = T_max; r->used = used; r->E = E;
    int64_t n = T_max * used;
    cudaError_t e;
    if ((e = cudaMalloc((void **)&r->perm, (size_t)(n > 0 ? n : 1) * sizeof(int32_t))) ||
        (e = cudaMalloc((void **)&r->tile, (size_t)(mm_tile_bound(n, E) + 1) * sizeof(int4))) ||
        (e = cudaMalloc((void **)&r->ntile, sizeof(int32_t)))) {
        cudaFree(r->perm); cudaFree(r->tile);
        memset(r, 0, sizeof *r);
    }
    return e;
}
static void mm_route_free(mm_route *r) {
    cudaFree(r->perm); cudaFree(r->tile); cudaFree(r->ntile);
    memset(r, 0, sizeof *r);
}

/* One block of 1024 threads: counting sort by expert, stable (ties by a).
 * Counts and offsets come from a shared histogram (sums: order-free). The
 * place of assignment a is off[e] + (earlier chunks' count of e) + (count
 * in earlier warps of this chunk) + (rank among equal lanes of its warp,
 * __match_any_sync): every term is a count, so the order is fixed.
 * Dynamic shared memory: (32 + 2)·E ints. Out-of-range experts are left out. */
__global__ void __launch_bounds__(1024) k_mm_route(const int32_t *__restrict__ eid, int64_t n, int E,
                                                   int32_t *__restrict__ perm, int4 *__restrict__ tile,
                                                   int32_t *__restrict__ ntile) {
    extern __shared__ int rs_sm[];
    int *wc = rs_sm, *off = rs_sm + 32 * E, *run = off + E;   /* wc[w·E + e]: chunk count of e in warp w */
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    for (int i = tid; i < E; i += 1024) { off[i] = 0; run[i] = 0; }
    __syncthreads();
    for (int64_t a = tid; a < n; a += 1024) {
        int e = eid[a];
        if (e >= 0 && e < E) atomicAdd(&off[e], 1);
    }
    __syncthreads();
    if (!tid) {   /* exclusive scan and the tile list: E steps, a few µs */
        int s = 0, nt = 0;
        for (int i = 0; i < E; i++) {
            int c = off[i];
            off[i] = s;
            for (int j = 0; j < c; j += MM_EBN) tile[nt++] = make_int4(i, s + j, c - j < MM_EBN ? c - j : MM_EBN, 0);
            s += c;
        }
        *ntile = nt;
    }
    __syncthreads();
    for (int64_t base = 0; base < n; base += 1024) {
        for (int i = tid; i < 32 * E; i += 1024) wc[i] = 0;
        __syncthreads();
        int64_t a = base + tid;
        int e = a < n ? eid[a] : -1;
        bool ok = e >= 0 && e < E;
        unsigned m = __match_any_sync(0xffffffffu, ok ? e : -1);
        int rank = __popc(m & ((1u << lane) - 1));
        if (ok && rank == 0) wc[w * E + e] = __popc(m);
        __syncthreads();
        if (ok) {
            int pos = off[e] + run[e] + rank;
            for (int v = 0; v < w; v++) pos += wc[v * E + e];
            perm[pos] = (int32_t)a;
        }
        __syncthreads();
        for (int i = tid; i < E; i += 1024)
            for (int v = 0; v < 32; v++) run[i] += wc[v * E + i];
        __syncthreads();
    }
}

static void mm_route_build(cudaStream_t s, mm_route *r, const int32_t *eid, int64_t T) {
    if (T < 0 || T > r->T_max) {   /* a caller bug: the buffers are sized for T_max */
        fprintf(stderr, "ds4: mm: %lld tokens for a route of %lld\n", (long long)T, (long long)r->T_max);
        abort();
    }
    r->T = T;
    r->ntile_max = mm_tile_bound(T * r->used, r->E);
    k_mm_route<<<1, 1024, (size_t)(32 + 2) * r->E * sizeof(int), s>>>(eid, T * r->used, r->E, r->perm, r->tile,
                                                                      r->ntile);
}

/* g[j·ff + f] = swiglu(Wg_e[f]·x_t, Wu_e[f]·x_t, clamp) · ew[a] (ew NULL: · 1), j-th sorted assignment a = (t, e). */
static void mm_experts_glu(cudaStream_t s, const mm_w *Wg, const mm_w *Wu, const __half *xh, const float *xs,
                           int64_t ldx, const mm_route *r, const float *ew, float clamp, float *g) {
    if (r->ntile_max <= 0) return;
    mm_args a;
    memset(&a, 0, sizeof a);
    a.w = Wg->w; a.w2 = Wu->w; a.K = Wg->K; a.M = Wg->M; a.rb = Wg->rb; a.estride = Wg->rb * (uint64_t)Wg->M;
    a.x = xh; a.xs = xs; a.ldx = ldx; a.T = r->T; a.y = g; a.ldy = Wg->M;
    a.perm = r->perm; a.tile = r->tile; a.ntile = r->ntile; a.used = r->used; a.ew = ew; a.clamp = clamp;
    if (Wg->type == GT_IQ2_XXS || Wg->type == GT_Q2_K) {   /* the model's formats: k_mmx */
        dim3 gx((unsigned)((Wg->M + MX_BM / 2 - 1) / (MX_BM / 2)), (unsigned)r->ntile_max);
        if (Wg->type == GT_IQ2_XXS) mmx_launch_f<MF_IQ2, MM_GLU>(s, gx, &a);
        else mmx_launch_f<MF_Q2K, MM_GLU>(s, gx, &a);
        return;
    }
    dim3 gr((unsigned)((Wg->M + MM_EBM / 2 - 1) / (MM_EBM / 2)), (unsigned)r->ntile_max);
    mm_launch<MM_EBM, MM_EBN, 4, 128, MM_GLU>(s, Wg->type, gr, &a);
}

/* out[a·ldo + r] = Σ_f Wd_e[r][f] · g[j][f]; gh rows in sorted order (mm_prep of g, stride ff). */
static void mm_experts_down(cudaStream_t s, const mm_w *Wd, const __half *gh, const float *gs, const mm_route *r,
                            float *out, int64_t ldo) {
    if (r->ntile_max <= 0) return;
    mm_args a;
    memset(&a, 0, sizeof a);
    a.w = Wd->w; a.K = Wd->K; a.M = Wd->M; a.rb = Wd->rb; a.estride = Wd->rb * (uint64_t)Wd->M;
    a.x = gh; a.xs = gs; a.ldx = Wd->K; a.T = r->T; a.y = out; a.ldy = ldo;
    a.perm = r->perm; a.tile = r->tile; a.ntile = r->ntile; a.used = r->used;
    if (Wd->type == GT_IQ2_XXS || Wd->type == GT_Q2_K) {
        dim3 gx((unsigned)((Wd->M + MX_BM - 1) / MX_BM), (unsigned)r->ntile_max);
        if (Wd->type == GT_IQ2_XXS) mmx_launch_f<MF_IQ2, MM_DOWN>(s, gx, &a);
        else mmx_launch_f<MF_Q2K, MM_DOWN>(s, gx, &a);
        return;
    }
    dim3 gr((unsigned)((Wd->M + MM_EBM - 1) / MM_EBM), (unsigned)r->ntile_max);
    mm_launch<MM_EBM, MM_EBN, 4, 128, MM_DOWN>(s, Wd->type, gr, &a);
}

#endif
