/* Decode matvecs (one token, f32 x, quantised weights read in place): the
 * generic per-format kernels, the embedding lookup, and the specialised
 * kernels on the weights the upload repacks (Q8_0, IQ2_XXS, Q2_K). */
#ifndef DS4_CUDA_MATVEC_CUH
#define DS4_CUDA_MATVEC_CUH
#include "cuda/kernels.cuh"

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

/* A Q8_0 piece (16 quants w, the f16 bits h of their block's scale) · xv[0 … 3]. */
__device__ __forceinline__ float q8_piece(uint4 w, unsigned short h, const float4 *xv) {
    float s = dot4_i8(w.x, xv[0], 0.0f);
    s = dot4_i8(w.y, xv[1], s);
    s = dot4_i8(w.z, xv[2], s);
    s = dot4_i8(w.w, xv[3], s);
    return __half2float(__ushort_as_half(h)) * s;
}

/* Piece p of one row · its x piece xv (EP/4 float4). pl, hd: the row's
 * payload and headers. sx (Q2_K): Σ of each 16-weight run of xv. */
template <int F>
__device__ __forceinline__ float rp_piece(const uint8_t *pl, const uint8_t *hd, int64_t p, const float4 *xv,
                                          const float *sx, const uint64_t *grid) {
    if constexpr (F == RP_Q8) {
        return q8_piece(((const uint4 *)pl)[p], ((const unsigned short *)hd)[p >> 1], xv);
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

/* A warp's NR rows of one row group from their sums (GLU: gate sums, then
 * up sums; written as swiglu(g, u) · ew[slot] when ew), rows past the end
 * not written: the store of k_mv_rp and k_mv_sx. */
template <int NR, bool GLU>
__device__ __forceinline__ void mv_store(const float *acc, int64_t r0, int64_t rows, float *y, int slot,
                                         int64_t y_slot, const float *ew, float clamp) {
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

/* Bulk prefetch of bytes [p, p + n) into L2 (sm_90: one instruction a
 * range, no registers held; p and n multiples of 16). */
__device__ __forceinline__ void l2_prefetch(const uint8_t *p, uint64_t n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (n) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"((uint32_t)n) : "memory");
#endif
}

/* y[slot·y_slot + r] for NR consecutive rows per warp, which share each x
 * load. GLU: W2 is the up matrix of the same shape; the warp computes gate
 * and up rows together and writes swiglu(g, u) · (ew ? ew[slot] : 1), so the
 * pair takes one launch and no separate swiglu pass. eid/estride/x_slot and
 * x grouping (xg_rows, a multiple of NR) as k_matvec. Rows past the end
 * repeat the last row (loads stay in bounds) and are not written.
 * KS warps share a row group (split-K: warp kw takes pieces lane + 32·(kw +
 * KS·j)), their sums added in warp order through shared memory (fixed
 * order: deterministic): KS× the blocks, each with KS× fewer bytes.
 * pf (ignored with eid): before pdl_wait each row group's weights (payload
 * and headers, contiguous for NR consecutive rows) are prefetched into L2 —
 * they are constants, so under programmatic launch the resident blocks
 * stream them while the previous kernel still runs (q_b behind k_qa_kv's two
 * blocks), and each block has its whole share in flight at once instead of
 * UNR pieces a lane. The launcher asks for it only where a wave's share
 * stays in L2 until read (launch_rpf). */
template <int F, int NR, bool GLU, int KS>
__global__ void __launch_bounds__(32 * MV_WARPS)
k_mv_rp(const uint8_t *__restrict__ W, const uint8_t *__restrict__ W2, int64_t n_in, int64_t rows,
        const float *__restrict__ x, int64_t xg_rows, int64_t xg_stride, float *__restrict__ y,
        const int32_t *__restrict__ eid, uint64_t estride, int64_t x_slot, int64_t y_slot,
        const float *__restrict__ ew, float clamp, bool pf) {
    static_assert(KS == 1 || (MV_WARPS % KS == 0 && MV_WARPS / KS <= 2), "split-K row groups a block: named barriers 1, 2");
    typedef rp_fmt<F> fm;
    constexpr int M = GLU ? 2 * NR : NR;
    const int slot = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, grp = warp / KS, kw = warp % KS;
    const int64_t r0 = ((int64_t)blockIdx.x * (MV_WARPS / KS) + grp) * NR;
    const int64_t nb = n_in / fm::EB, np = nb * fm::PB;
    if (pf && !eid && !kw && !lane && r0 < rows) {
        const int64_t n = rows - r0 < NR ? rows - r0 : NR;
        /* headers: rounded out to 16 bytes, inside the matrix's header area */
        const uint64_t h0 = (uint64_t)(rows * nb * fm::PAY + r0 * nb * fm::HL) & ~(uint64_t)15;
        const uint64_t hend = (uint64_t)(rows * nb * (fm::PAY + fm::HL)) & ~(uint64_t)15;
        uint64_t h1 = ((uint64_t)(rows * nb * fm::PAY + (r0 + n) * nb * fm::HL) + 15) & ~(uint64_t)15;
        h1 = h1 < hend ? h1 : hend;
#pragma unroll
        for (int m = 0; m < (GLU ? 2 : 1); m++) {
            const uint8_t *mat = m ? W2 : W;
            l2_prefetch(mat + r0 * nb * fm::PAY, (uint64_t)(n * nb * fm::PAY));
            if (h1 > h0) l2_prefetch(mat + h0, h1 - h0);
        }
    }
    if (eid) pdl_wait();   /* the expert ids are the router's output */
    const uint64_t eoff = eid ? (uint64_t)eid[slot] * estride : 0;
    const uint8_t *pl[M], *hd[M];
#pragma unroll
    for (int i = 0; i < M; i++) {
        const uint8_t *mat = (i < NR ? W : W2) + eoff;
        int64_t r = r0 + i % NR < rows ? r0 + i % NR : rows - 1;
        pl[i] = mat + r * nb * fm::PAY;
        hd[i] = mat + rows * nb * fm::PAY + r * nb * fm::HL;
    }
    /* Q8_0 pieces are small: several in flight per lane (4 with one row a
     * warp, as on the 512–1024-row attention inputs: those warps are few).
     * Without pf the first UNR pieces of each row are loaded into registers
     * here, before the wait when there are no expert ids: a one-wave grid
     * (attn_output_a behind the attention combine) then has a quarter of its
     * bytes on the way while the previous kernel runs, and nothing more is
     * held than the unrolled loop holds anyway. */
    constexpr int UNR = F == RP_Q8 ? (NR == 1 ? 4 : 2) : 1;
    const bool pre = F == RP_Q8 && !pf && r0 < rows;
    uint4 wq[F == RP_Q8 ? UNR : 1][M];
    unsigned short wh[F == RP_Q8 ? UNR : 1][M];
    if constexpr (F == RP_Q8) {
        if (pre) {
#pragma unroll
            for (int u = 0; u < UNR; u++) {
                const int64_t p = lane + 32 * (kw + KS * u);
                if (p < np)
#pragma unroll
                    for (int i = 0; i < M; i++) {
                        wq[u][i] = ((const uint4 *)pl[i])[p];
                        wh[u][i] = ((const unsigned short *)hd[i])[p >> 1];
                    }
            }
        }
    }
    if (!eid) pdl_wait();
    __shared__ uint64_t grid[F == RP_IQ2 ? 256 : 1];
    __shared__ float red[KS > 1 ? MV_WARPS * M : 1];
    if (F == RP_IQ2) {   /* the 2 KB grid in shared memory: random 8-byte gathers */
        for (int i = threadIdx.x; i < 256; i += blockDim.x) grid[i] = d_iq2_grid[i];
        __syncthreads();
    }
    if (r0 >= rows) return;   /* the whole row group: its KS warps leave together */
    const float *xx = x + slot * x_slot + (xg_rows ? (r0 / xg_rows) * xg_stride : 0);
    float acc[M];
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = 0;
    int64_t p = lane + 32 * kw;
    if constexpr (F == RP_Q8) {
        if (pre) {   /* the preloaded pieces first: the loop's order */
#pragma unroll
            for (int u = 0; u < UNR; u++, p += 32 * KS)
                if (p < np) {
                    float4 xv[4];
                    float sx[4];
                    rp_x<F>(xx, p, xv, sx);
#pragma unroll
                    for (int i = 0; i < M; i++) acc[i] += q8_piece(wq[u][i], wh[u][i], xv);
                }
        }
    }
#pragma unroll UNR
    for (; p < np; p += 32 * KS) {
        float4 xv[fm::EP / 4];
        float sx[4];
        rp_x<F>(xx, p, xv, sx);
#pragma unroll
        for (int i = 0; i < M; i++) acc[i] += rp_piece<F>(pl[i], hd[i], p, xv, sx, grid);
    }
#pragma unroll
    for (int i = 0; i < M; i++) acc[i] = warp_sum(acc[i]);
    if (KS > 1) {   /* the group's warps in order, on its own named barrier (1 + grp: another group may have left) */
        if (!lane)
#pragma unroll
            for (int i = 0; i < M; i++) red[warp * M + i] = acc[i];
        if (grp) asm volatile("bar.sync 2, %0;" ::"n"(32 * KS) : "memory");
        else asm volatile("bar.sync 1, %0;" ::"n"(32 * KS) : "memory");
        if (kw) return;
#pragma unroll
        for (int i = 0; i < M; i++) {
            acc[i] = red[warp * M + i];
            for (int w = 1; w < KS; w++) acc[i] += red[(warp + w) * M + i];
        }
    }
    if (lane) return;
    mv_store<NR, GLU>(acc, r0, rows, y, slot, y_slot, ew, clamp);
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
            if (!lane) mv_store<NR, GLU>(acc, r0, rows, y, slot, y_slot, ew, clamp);
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
 * split-K partials, block max, Q2_K: x as f32 (staged once, see k_mv_tc). */
__host__ __device__ constexpr int64_t tc_tab(int F) { return F == RP_IQ2 ? 256 * 16 * 8 + 128 * 16 * 8 : 0; }
__host__ __device__ constexpr int64_t tc_zero(int F, int64_t n_in) {
    return (tc_tab(F) + n_in * 4 + (F == RP_Q2K ? n_in / 4 : 0) + 127) / 128 * 128 + 64;
}
__host__ __device__ constexpr int64_t tc_xs(int F, int64_t n_in) {
    return (tc_zero(F, n_in) + 1024 + 64 + TC_WARPS * 128 * 4 + TC_WARPS * 4 + 15) / 16 * 16;
}
__host__ __device__ constexpr int64_t tc_smem(int F, int64_t n_in) { return tc_xs(F, n_in) + (F == RP_Q2K ? n_in * 4 : 0); }
/* float4s of x a thread loads at once when Q2_K stages it (n_in ≤ 4·TC_XR·32·TC_WARPS = 6144 in one round) */
#define TC_XR 4

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
 * tc_smem(F, n_in). pre: what was written before the previous kernel (by a
 * launch at least two back in the stream, complete once the previous one
 * has passed its own pdl_wait, i.e. before this grid is scheduled) and so
 * may be read before pdl_wait: 0 nothing, 1 eid (the first weight blocks
 * are then in flight while the previous kernel ends), 2 eid and x (x is
 * staged too). Decode's routed gate+up runs with 2, its down with 1 (the
 * shared expert's launches stand between the router and them); those reads
 * go through L2 (__ldcg), the point where the earlier grid's writes are
 * known to be visible. */
template <int F, int KS, bool GLU>
__global__ void __launch_bounds__(32 * TC_WARPS, 1)
k_mv_tc(const uint8_t *__restrict__ W, const uint8_t *__restrict__ W2, int64_t n_in, int64_t rows,
        const float *__restrict__ x, float *__restrict__ y, const int32_t *__restrict__ eid, uint64_t estride,
        int64_t x_slot, int64_t y_slot, const float *__restrict__ ew, float clamp, int pre) {
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
    if (!pre) pdl_wait();
    constexpr int NG = TC_WARPS / KS;
    const int slot = blockIdx.y, grp = warp / KS, kw = warp % KS;
    const uint64_t eoff = eid ? (uint64_t)__ldcg(eid + slot) * estride : 0;
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
    if (pre == 1) pdl_wait();   /* x is the previous kernel's output */
    const float *xg = x + slot * x_slot;
    /* S = 2^(10 − ⌊log2 max|x|⌋), clamped: max|x|·S in [2^10, 2^11). Q2_K
     * (the routed down) stages x in shared memory first, TC_XR loads a
     * thread in flight at once, and builds fragments and run sums from it:
     * the plain loops below wait one L2 round trip an iteration, ~6 in turn
     * before the first mma (H100 nsys: down 12.45 → 12.15 µs). IQ2_XXS keeps
     * the plain loops: staged the same way its gate+up measured slower
     * (23.7 → 24.9 µs; registers 146 → 136, cause not isolated). */
    float4 *xs = (float4 *)(tsm + tc_xs(F, n_in));
    float mx = 0;
    if constexpr (F == RP_Q2K)
        for (int64_t q0 = tid; q0 < n_in / 4; q0 += TC_XR * (int64_t)blockDim.x) {
            float4 v[TC_XR];
#pragma unroll
            for (int u = 0; u < TC_XR; u++) {
                int64_t q = q0 + u * (int64_t)blockDim.x;
                v[u] = q < n_in / 4 ? __ldcg((const float4 *)xg + q) : make_float4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < TC_XR; u++) {
                int64_t q = q0 + u * (int64_t)blockDim.x;
                if (q < n_in / 4) xs[q] = v[u];
                mx = fmaxf(mx, fmaxf(fmaxf(fabsf(v[u].x), fabsf(v[u].y)), fmaxf(fabsf(v[u].z), fabsf(v[u].w))));
            }
        }
    else
        for (int64_t q = tid; q < n_in / 4; q += blockDim.x) {
            float4 v = __ldcg((const float4 *)xg + q);
            mx = fmaxf(mx, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
        }
    for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (!lane) bmax[warp] = mx;
    __syncthreads();   /* bmax (and xs) complete */
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
            v = __ldcg((const float4 *)(xg + 256 * b + 64 * tt + 4 * j));
        } else {   /* run (j >> 2) of chunk tt: weights 128(tt>>1) + 32(j>>2) + 16(tt&1) + 4(j&3) + (0, 2 | 1, 3) */
            float4 u = xs[64 * b + 32 * (tt >> 1) + 8 * (j >> 2) + 4 * (tt & 1) + (j & 3)];
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
                const float4 *q = xs + 64 * b + 4 * (8 * (tt >> 1) + 2 * s + (tt & 1));
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
    if (pre == 2) pdl_wait();   /* before the first store: y may still be read by the previous kernel */

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

#endif
