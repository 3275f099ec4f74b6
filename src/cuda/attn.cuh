/* Prefill attention and indexer scores for a chunk of T tokens on tensor
 * cores (spec model.md §4.4, §4.6; CPU reference: attn_task / idx_task in
 * src/cpu/forward.c).
 *
 * Attention: all 64 heads of a token share every row (MQA, K = V), so one
 * block per token computes S = q·rowsᵀ as a [64 × 512]·[512 × 32] product per
 * tile of 32 rows, an online softmax (flash style: running max m, running
 * denominator l, no score buffer) and O += P·rows with the same tile. Operands
 * are f16 with f32 accumulation (mma.sync m16n8k16). Rows are f16-exact
 * already (QAT rounding; under DS4_DIAG_EXACT_KV they are rounded here, 2⁻¹²
 * relative), q and P are rounded to f16 (≤ 2⁻¹² relative each): the output
 * is within ≈ 3e-4 (relative, L2) of cpu_attend on random data.
 *
 * Indexer: FP4-simulated q and rows are exact in bf16 and their products and
 * 128-term sums are exact in f32 (2-bit mantissas, block scales a few powers
 * of two apart), so the dot products equal the CPU's bit for bit; the head
 * sum Σ_h w_h·max(0, dot) is then done in ascending h with separately
 * rounded multiply and add, as the CPU (C11, no contraction): identical
 * scores, hence identical top-k selections. */
#ifndef DS4_CUDA_ATTN_CUH
#define DS4_CUDA_ATTN_CUH
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <stdio.h>

/* ---- warp-level tensor-core primitives ------------------------------------------------ */

__device__ __forceinline__ uint32_t at_smem(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* Four 8×8 b16 matrices; lane l supplies the row address of matrix l/8. */
__device__ __forceinline__ void at_ldsm4(uint32_t r[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at_smem(p)));
}
__device__ __forceinline__ void at_ldsm4t(uint32_t r[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at_smem(p)));
}
/* d += a·b, m16n8k16, f16 operands, f32 accumulators. */
__device__ __forceinline__ void at_mma_f16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void at_mma_bf16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void at_cp16(void *dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(at_smem(dst)), "l"(src));
}
__device__ __forceinline__ void at_cp_wait(void) { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
__device__ __forceinline__ uint32_t at_h2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *(uint32_t *)&h;
}
__device__ __forceinline__ uint32_t at_bf2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *(uint32_t *)&h;
}

/* ---- attention ------------------------------------------------------------------------ */

#define AT_H 64                 /* query heads: one block holds all of them */
#define AT_HD 512               /* head_dim = K = V row length */
#define AT_RD 64                /* rope_dim */
#define AT_N 32                 /* rows per tile */
#define AT_ST 3                 /* row tiles in flight (cp.async stages) */
#define AT_WARPS 16
#define AT_QS (AT_HD + 8)       /* f16 stride of q / row tiles: +16 B puts ldmatrix's 8 rows in distinct banks */
#define AT_SS 40                /* f32 stride of the partial scores (32 + 8: float2 stores spread over banks) */
#define AT_PS (AT_N + 8)        /* f16 stride of P */
#define AT_MAXWIN 128           /* bounds of the row table in shared memory */
#define AT_MAXSEL 512
#define AT_SMEM (AT_H * AT_QS * 2 + AT_ST * AT_N * AT_QS * 2 + 4 * AT_H * AT_SS * 4 + AT_H * AT_PS * 2 + AT_H * 4 + \
                 AT_RD * 4 + (AT_MAXWIN + AT_MAXSEL) * 4)

/* f16 copies of every row the chunk can read, in one scratch array:
 * [ring: keep_raw rows][chunk: T rows][compressed: (p0+T)/ratio rows]. The
 * copy is exact (rows are f16 values, QAT) and halves what every token reads. */
static size_t attn_scratch_bytes(uint32_t keep_raw, uint32_t p0, int64_t T, int ratio) {
    int64_t ncomp = ratio > 0 ? ((int64_t)p0 + T) / ratio : 0;
    return (size_t)(keep_raw + T + ncomp) * AT_HD * sizeof(__half);
}

__global__ void k_attn_rows16(const float *__restrict__ src, __half *__restrict__ dst, int64_t n4) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
        float4 v = ((const float4 *)src)[i];
        ((uint2 *)dst)[i] = make_uint2(at_h2(v.x, v.y), at_h2(v.z, v.w));
    }
}

/* One block of 16 warps per token. Per tile of 32 rows:
 *   load   cp.async of f16 rows AT_ST−1 tiles ahead (rows past the end are
 *          zeroed: P = 0 must not meet a NaN);
 *   S      warp (hg, kq) computes heads 16hg…16hg+15 × 32 rows over dims
 *          128kq…128kq+127 (A reused over 4 n-tiles); the 4 partial sums
 *          meet in shared memory, added in kq order;
 *   soft   8 threads per head: scale, mask, running max, P (f16), l;
 *   PV     warp (hg, dq) owns O for its 16 heads × dims 128dq…128dq+127
 *          (64 f32 registers), rescales by exp(m_old − m_new) and adds P·V.
 * The sink only enters the denominator: m starts at sink, l at 1. */
__global__ void __launch_bounds__(AT_WARPS * 32, 1)
k_attn_chunk(const float *__restrict__ q, const __half *__restrict__ rows16, uint32_t keep_raw, uint32_t window,
             const int32_t *selbuf, int ratio, int64_t topk, const float *sinks, const double *freq, float scale,
             uint32_t p0, int64_t T, float *__restrict__ o) {
    extern __shared__ __align__(16) unsigned char at_sm[];
    __half *sq = (__half *)at_sm;                          /* AT_H × AT_QS */
    __half *sk = sq + AT_H * AT_QS;                        /* AT_ST × AT_N × AT_QS */
    float *ss = (float *)(sk + AT_ST * AT_N * AT_QS);      /* 4 × AT_H × AT_SS partial scores */
    __half *sp = (__half *)(ss + 4 * AT_H * AT_SS);        /* AT_H × AT_PS */
    float *salpha = (float *)(sp + AT_H * AT_PS);          /* AT_H: rescale, then 1/l */
    float *srope = salpha + AT_H;                          /* AT_RD/2 (cos, sin) pairs */
    int32_t *srow = (int32_t *)(srope + AT_RD);            /* rows16 index of window / selected rows */

    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, qd = lane & 3;
    const int64_t t = blockIdx.x, p = (int64_t)p0 + t;
    const int64_t lo = p >= (int64_t)window - 1 ? p - (window - 1) : 0, nwin = p - lo + 1;
    int64_t ncomp = ratio > 0 ? (p + 1) / ratio : 0;
    const int32_t *sel = NULL;
    if (ratio == 4 && ncomp > topk) { ncomp = topk; sel = selbuf + t * topk; }   /* the indexer's choice */
    const int64_t n = nwin + ncomp, ntiles = (n + AT_N - 1) / AT_N;
    const int64_t ctab = sel ? n : nwin, comp0 = keep_raw + T - nwin;   /* rows past the table: all compressed rows */

    /* Row table in attn_task's order: window rows (ring slot or chunk row),
     * then the indexer's selection; built once so the tile loads below read
     * no global index and do no 64-bit modulo. */
    for (int r = tid; r < ctab; r += AT_WARPS * 32) {
        int64_t pos = lo + r;
        srow[r] = (int32_t)(r < nwin ? (pos >= (int64_t)p0 ? keep_raw + (pos - p0) : pos % keep_raw)
                                     : keep_raw + T + sel[r - nwin]);
    }
    __syncthreads();

    /* tile j into stage j % AT_ST: thread owns 16-byte chunks tid + 512i, i < 4 (row tid/64 + 8i) */
#define AT_LOAD(j)                                                                                            \
    if ((j) < ntiles)                                                                                          \
        for (int i = 0; i < AT_N / 8; i++) {                                                                   \
            int rr = (tid >> 6) + 8 * i, c8 = (tid & 63) * 8;                                                 \
            int64_t r = (int64_t)(j) * AT_N + rr;                                                             \
            __half *dst = sk + ((j) % AT_ST * AT_N + rr) * AT_QS + c8;                                         \
            if (r < n) at_cp16(dst, rows16 + (int64_t)(r < ctab ? srow[r] : comp0 + r) * AT_HD + c8);         \
            else *(uint4 *)dst = make_uint4(0, 0, 0, 0);                                                       \
        }                                                                                                      \
    asm volatile("cp.async.commit_group;\n" ::: "memory");

    for (int j = 0; j < AT_ST - 1; j++) { AT_LOAD(j); }
    {   /* q → f16; inverse-RoPE table for this position (double angle, as cpu_rope) */
        const float4 *q4 = (const float4 *)(q + t * AT_H * AT_HD);
#pragma unroll 8   /* independent loads in flight */
        for (int i = tid; i < AT_H * AT_HD / 4; i += AT_WARPS * 32) {
            float4 v = q4[i];
            int h = i / (AT_HD / 4), d = (i % (AT_HD / 4)) * 4;
            *(uint2 *)(sq + h * AT_QS + d) = make_uint2(at_h2(v.x, v.y), at_h2(v.z, v.w));
        }
        if (tid < AT_RD / 2) {
            double ang = -((double)p * freq[tid]);
            srope[2 * tid] = (float)cos(ang);
            srope[2 * tid + 1] = (float)sin(ang);
        }
    }

    const int hg = w & 3, kq = w >> 2;   /* S: head group, dim quarter; PV: head group, dim quarter */
    float acc[16][4];
#pragma unroll
    for (int i = 0; i < 16; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0;
    /* softmax state of head tid/8, identical in its 8 threads */
    const int sh = tid >> 3, sub = tid & 7;
    const float sl2 = scale * 1.44269504088896341f;   /* scores in log2 units: exp2 below */
    float m = sinks[sh] * 1.44269504088896341f, l = 1.0f;

    for (int64_t j = 0; j < ntiles; j++) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(AT_ST - 2) : "memory");
        __syncthreads();   /* tile j landed; tile j−1's PV is done with its stage, sp and salpha */
        AT_LOAD(j + AT_ST - 1);
        const __half *kt = sk + (j % AT_ST) * AT_N * AT_QS;

        {   /* S partial: 16 heads × 32 rows over 128 dims */
            float s[4][4];
#pragma unroll
            for (int i = 0; i < 4; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0;
#pragma unroll
            for (int kk = 0; kk < 8; kk++) {
                int d0 = kq * 128 + kk * 16;
                uint32_t a[4], b[4];
                at_ldsm4(a, sq + (hg * 16 + (lane & 15)) * AT_QS + d0 + (lane >> 4) * 8);
#pragma unroll
                for (int np = 0; np < 2; np++) {
                    at_ldsm4(b, kt + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * AT_QS + d0 + ((lane >> 3) & 1) * 8);
                    at_mma_f16(s[2 * np], a, b[0], b[1]);
                    at_mma_f16(s[2 * np + 1], a, b[2], b[3]);
                }
            }
            float *dst = ss + (kq * AT_H + hg * 16 + g) * AT_SS + 2 * qd;
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                *(float2 *)(dst + nt * 8) = make_float2(s[nt][0], s[nt][1]);
                *(float2 *)(dst + 8 * AT_SS + nt * 8) = make_float2(s[nt][2], s[nt][3]);
            }
        }
        __syncthreads();

        {   /* online softmax: head sh, columns 4sub…4sub+3 */
            float v[4], mx = -INFINITY;
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int col = 4 * sub + c;
                const float *src = ss + sh * AT_SS + col;
                float x = ((src[0] + src[AT_H * AT_SS]) + src[2 * AT_H * AT_SS]) + src[3 * AT_H * AT_SS];
                v[c] = j * AT_N + col < n ? x * sl2 : -INFINITY;
                mx = fmaxf(mx, v[c]);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            float mn = fmaxf(m, mx), alpha = exp2f(m - mn), sum = 0;
            __half ph[4];
#pragma unroll
            for (int c = 0; c < 4; c++) {
                ph[c] = __float2half_rn(exp2f(v[c] - mn));
                sum += __half2float(ph[c]);   /* l sums the weights P·V actually uses */
            }
            __half2 p01 = __halves2half2(ph[0], ph[1]), p23 = __halves2half2(ph[2], ph[3]);
            *(uint2 *)(sp + sh * AT_PS + 4 * sub) = make_uint2(*(uint32_t *)&p01, *(uint32_t *)&p23);
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            sum += __shfl_xor_sync(0xffffffffu, sum, 4);
            l = l * alpha + sum;
            m = mn;
            if (!sub) salpha[sh] = alpha;
        }
        __syncthreads();

        {   /* O = O·alpha + P·V for 16 heads × 128 dims */
            float a0 = salpha[hg * 16 + g], a8 = salpha[hg * 16 + g + 8];
#pragma unroll
            for (int i = 0; i < 16; i++) { acc[i][0] *= a0; acc[i][1] *= a0; acc[i][2] *= a8; acc[i][3] *= a8; }
#pragma unroll
            for (int ks = 0; ks < 2; ks++) {
                uint32_t a[4];
                at_ldsm4(a, sp + (hg * 16 + (lane & 15)) * AT_PS + ks * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int nb = 0; nb < 8; nb++) {
                    uint32_t b[4];
                    at_ldsm4t(b, kt + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * AT_QS + kq * 128 + nb * 16 +
                                     (lane >> 4) * 8);
                    at_mma_f16(acc[2 * nb], a, b[0], b[1]);
                    at_mma_f16(acc[2 * nb + 1], a, b[2], b[3]);
                }
            }
        }
    }
#undef AT_LOAD
    __syncthreads();
    if (!sub) salpha[sh] = 1.0f / l;
    __syncthreads();
    /* out = O · (1/l) (as cpu_attend), then inverse RoPE of dims hd−rd… at p */
    const int h0 = hg * 16 + g;
    const float i0 = salpha[h0], i8 = salpha[h0 + 8];
#pragma unroll
    for (int nt = 0; nt < 16; nt++) {
        int d = kq * 128 + nt * 8 + 2 * qd;
        float x[4] = {acc[nt][0] * i0, acc[nt][1] * i0, acc[nt][2] * i8, acc[nt][3] * i8};
        if (d >= AT_HD - AT_RD) {
            float c = srope[d - (AT_HD - AT_RD)], sn = srope[d - (AT_HD - AT_RD) + 1];
            for (int e = 0; e < 4; e += 2) {   /* no contraction: cpu_rope rounds each product */
                float x0 = x[e], x1 = x[e + 1];
                x[e] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, sn));
                x[e + 1] = __fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, c));
            }
        }
        float *dst = o + (t * AT_H + h0) * AT_HD + d;
        *(float2 *)dst = make_float2(x[0], x[1]);
        *(float2 *)(dst + 8 * AT_HD) = make_float2(x[2], x[3]);
    }
}

/* scratch: attn_scratch_bytes(keep_raw, p0, T, ratio) bytes of device memory
 * (the f16 row copies; overwritten on every call). */
static void attn_chunk(cudaStream_t s, const float *q, const float *kvc, const float *raw, uint32_t keep_raw,
                       uint32_t window, const float *comp, const int32_t *sel, int ratio, int64_t topk,
                       const float *sinks, int H, int hd, int rd, const double *freq, float scale, uint32_t p0,
                       int64_t T, float *o, void *scratch) {
    if (H != AT_H || hd != AT_HD || rd != AT_RD || keep_raw < window || window < 1 || window > AT_MAXWIN ||
        (ratio == 4 && (topk < 1 || topk > AT_MAXSEL))) {
        /* shapes are compile-time: the model has exactly these */
        fprintf(stderr, "attn_chunk: unsupported shape H %d hd %d rd %d keep_raw %u window %u topk %lld\n", H, hd,
                rd, keep_raw, window, (long long)topk);
        return;
    }
    if (T <= 0) return;
    static bool attr_set;
    if (!attr_set) {
        cudaFuncSetAttribute(k_attn_chunk, cudaFuncAttributeMaxDynamicSharedMemorySize, AT_SMEM);
        attr_set = true;
    }
    __half *r16 = (__half *)scratch;
    int64_t ncomp = ratio > 0 ? ((int64_t)p0 + T) / ratio : 0;
    /* ring slots never written yet hold whatever the state holds: converted
     * anyway, never read (positions < 0 do not exist) */
    k_attn_rows16<<<256, 256, 0, s>>>(raw, r16, (int64_t)keep_raw * AT_HD / 4);
    k_attn_rows16<<<256, 256, 0, s>>>(kvc, r16 + (int64_t)keep_raw * AT_HD, T * AT_HD / 4);
    if (ncomp) k_attn_rows16<<<256, 256, 0, s>>>(comp, r16 + (keep_raw + T) * AT_HD, ncomp * AT_HD / 4);
    k_attn_chunk<<<(unsigned)T, AT_WARPS * 32, AT_SMEM, s>>>(q, r16, keep_raw, window, sel, ratio, topk, sinks, freq,
                                                             scale, p0, T, o);
}

/* ---- indexer scores ------------------------------------------------------------------- */

#define IX_H 64                 /* indexer heads */
#define IX_D 128                /* indexer head_dim */
#define IX_TOK 4                /* tokens per block: 256 query rows, 32 per warp */
#define IX_N 64                 /* compressed rows per tile */
#define IX_KS (IX_D + 8)        /* bf16 stride of the row tile (+16 B: ldmatrix rows in distinct banks) */
#define IX_ES 68                /* f32 stride of the weighted products: 8q + g hits distinct banks */
#define IX_SMEM (IX_N * IX_KS * 2 + IX_TOK * IX_N * IX_ES * 4)

/* Block = IX_TOK consecutive tokens, looping over every tile of rows any of
 * them sees. Warp w owns token w/2, heads 32(w&1)…+31 as two m16 tiles whose
 * bf16 A fragments stay in registers for the whole loop. Products
 * w_h·max(0, dot) go to shared memory, then thread (token, row) sums the 64
 * heads in ascending order. */
__global__ void __launch_bounds__(256, 1)
k_idx_chunk(const float *__restrict__ iq, const float *__restrict__ iw, const float *__restrict__ rows, uint32_t p0,
            int64_t T, float *__restrict__ score, int64_t ld) {
    extern __shared__ __align__(16) unsigned char ix_sm[];
    __nv_bfloat16 *sk = (__nv_bfloat16 *)ix_sm;          /* IX_N × IX_KS */
    float *se = (float *)(sk + IX_N * IX_KS);            /* IX_TOK × IX_N × IX_ES */
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, qd = lane & 3;
    const int64_t t0 = (int64_t)blockIdx.x * IX_TOK;
    const int64_t tw = t0 + (w >> 1);                     /* this warp's token */
    const int64_t tl = T - 1 < t0 + IX_TOK - 1 ? T - 1 : t0 + IX_TOK - 1;
    const int64_t nrows = ((int64_t)p0 + tl + 1) / 4;     /* rows the block's last token sees */

    uint32_t a[2][8][4];   /* [m-tile][k-step] A fragments: rows g, g+8; dims 2qd, 2qd+8 */
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int ks = 0; ks < 8; ks++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int h = 32 * (w & 1) + 16 * mt + g + (e & 1) * 8, d = ks * 16 + 2 * qd + (e >> 1) * 8;
                float2 v = tw < T ? *(const float2 *)(iq + (tw * IX_H + h) * IX_D + d) : make_float2(0, 0);
                a[mt][ks][e] = at_bf2(v.x, v.y);
            }
    float wt[2][2];        /* w_h of this thread's four heads */
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
        for (int e = 0; e < 2; e++)
            wt[mt][e] = tw < T ? iw[tw * IX_H + 32 * (w & 1) + 16 * mt + g + 8 * e] : 0.0f;

    for (int64_t c0 = 0; c0 < nrows; c0 += IX_N) {
        __syncthreads();   /* the previous tile's sk and se are consumed */
        for (int i = tid; i < IX_N * IX_D / 4; i += 256) {
            int rr = i / (IX_D / 4), d = (i % (IX_D / 4)) * 4;
            float4 v = c0 + rr < nrows ? *(const float4 *)(rows + (c0 + rr) * IX_D + d) : make_float4(0, 0, 0, 0);
            *(uint2 *)(sk + rr * IX_KS + d) = make_uint2(at_bf2(v.x, v.y), at_bf2(v.z, v.w));
        }
        __syncthreads();
        float acc[2][8][4];
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int nt = 0; nt < 8; nt++) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0;
#pragma unroll
        for (int ks = 0; ks < 8; ks++)
#pragma unroll
            for (int np = 0; np < 4; np++) {
                uint32_t b[4];
                at_ldsm4(b, sk + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * IX_KS + ks * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    at_mma_bf16(acc[mt][2 * np], a[mt][ks], b[0], b[1]);
                    at_mma_bf16(acc[mt][2 * np + 1], a[mt][ks], b[2], b[3]);
                }
            }
        /* se[token][row][head] = w_h · max(0, dot), rounded once (as the CPU's product) */
        float *base = se + (w >> 1) * IX_N * IX_ES + 32 * (w & 1) + g;
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                int c = nt * 8 + 2 * qd;
                float *e0 = base + c * IX_ES + 16 * mt;
                e0[0] = __fmul_rn(wt[mt][0], fmaxf(0.0f, acc[mt][nt][0]));
                e0[IX_ES] = __fmul_rn(wt[mt][0], fmaxf(0.0f, acc[mt][nt][1]));
                e0[8] = __fmul_rn(wt[mt][1], fmaxf(0.0f, acc[mt][nt][2]));
                e0[IX_ES + 8] = __fmul_rn(wt[mt][1], fmaxf(0.0f, acc[mt][nt][3]));
            }
        __syncthreads();
        {
            int tk = tid >> 6, c = tid & 63;
            int64_t t = t0 + tk, cg = c0 + c;
            if (t < T && cg < ((int64_t)p0 + t + 1) / 4) {
                const float4 *e = (const float4 *)(se + (tk * IX_N + c) * IX_ES);
                float sc = 0;
#pragma unroll
                for (int i = 0; i < IX_H / 4; i++) {   /* ascending h, one rounding per add */
                    float4 v = e[i];
                    sc = __fadd_rn(sc, v.x); sc = __fadd_rn(sc, v.y); sc = __fadd_rn(sc, v.z); sc = __fadd_rn(sc, v.w);
                }
                score[t * ld + cg] = sc;
            }
        }
    }
}

static void idx_scores_chunk(cudaStream_t s, const float *iq, const float *iw, const float *rows, uint32_t p0,
                             int64_t T, int ih, int ihd, float *score, int64_t ld) {
    if (ih != IX_H || ihd != IX_D) {
        fprintf(stderr, "idx_scores_chunk: unsupported shape ih %d ihd %d\n", ih, ihd);
        return;
    }
    if (T <= 0) return;
    static bool attr_set;
    if (!attr_set) {
        cudaFuncSetAttribute(k_idx_chunk, cudaFuncAttributeMaxDynamicSharedMemorySize, IX_SMEM);
        attr_set = true;
    }
    k_idx_chunk<<<(unsigned)((T + IX_TOK - 1) / IX_TOK), 256, IX_SMEM, s>>>(iq, iw, rows, p0, T, score, ld);
}

#endif
