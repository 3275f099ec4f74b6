/* Per-token kernels of the attention sublayer (spec §4.4–§4.6): norms and
 * the Q/KV rows, the compressors, the indexer and its top-k, and attention
 * over the raw window and compressed rows (decode; generic shapes of a
 * chunk — the real model's chunks use attn.cuh). */
#ifndef DS4_CUDA_ATTEND_CUH
#define DS4_CUDA_ATTEND_CUH
#include "cuda/kernels.cuh"
#include "cuda/matvec.cuh"   /* row_dot: the compressor products */

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

/* The K=V row after its RMSNorm (sv: hd floats of shared memory, normed):
 * RoPE on the last rd values (thread k < rd/2 rotates pair k with its
 * angle's (c, sn); blk_rope's arithmetic), FP8 on the rest (blk_fp8: at
 * most 4 values a thread), f16 rounding, stored to kv and, when out is
 * given, the raw-ring slot. k_qa_kv's and k_qb's side block: one code, so
 * one rounding of every expression. */
__device__ __forceinline__ void kv_tail(float *sv, int hd, int rd, float c, float sn, float *kv, float *out) {
    if ((int)threadIdx.x < rd / 2) {
        float *x = sv + hd - rd + 2 * threadIdx.x, x0 = x[0], x1 = x[1];
        x[0] = x0 * c - x1 * sn;
        x[1] = x0 * sn + x1 * c;
    }
    __syncthreads();
    if (d_qat) blk_fp8(sv, hd - rd);
    for (int k = threadIdx.x; k < hd; k += blockDim.x) {
        float v = d_qat ? round_f16(sv[k]) : sv[k];
        kv[k] = v;
        if (out) out[k] = v;
    }
}

/* The attention's two single-vector norms of the chunk in one launch (grid
 * 2n; a block a multiple of 32 threads, ≥ hd/4 for blk_fp8 and ≥ rd/2):
 * block t < n the q_a row of token t (k_rmsnorm's arithmetic, in place),
 * block n + t its K=V row, in place: weighted RMSNorm, RoPE (blk_rope's
 * arithmetic; thread k rotates pair k with its angle computed before
 * pdl_wait — positions are step inputs, not the previous kernel's output),
 * FP8 on the non-RoPE part, f16 rounding; also written into the raw-ring
 * slot when ring is given (the caller knows whether the chunk is short
 * enough that no slot it overwrites is still read by its tokens). Each was a
 * launch of one block a token: a few µs of one SM in decode. Dynamic shared
 * memory: hd floats. */
__global__ void k_qa_kv(float *qa, const float *qw, int ql, float *kv, const float *kw, int hd, int rd,
                        const double *freq, const dstep *st, float eps, float *ring, uint32_t keep, int n) {
    extern __shared__ float sv[];
    __shared__ double shd[32];
    int64_t t = (int64_t)blockIdx.x - n;   /* ≥ 0: a K=V row */
    float c = 1, sn = 0;
    if (t >= 0 && (int)threadIdx.x < rd / 2) {
        double ang = (double)st[t].pos * freq[threadIdx.x];
        c = (float)cos(ang);
        sn = (float)sin(ang);
    }
    pdl_wait();
    if (t < 0) {
        t = blockIdx.x;
        rmsnorm_vec(qa + t * ql, qw, ql, eps, qa + t * ql, shd);
        return;
    }
    kv += t * hd;
    for (int k = threadIdx.x; k < hd; k += blockDim.x) sv[k] = kv[k];
    __syncthreads();
    blk_rmsnorm(sv, hd, kw, eps, shd);
    kv_tail(sv, hd, rd, c, sn, kv, ring ? ring + (size_t)(st[t].pos % keep) * hd : NULL);
}

/* Decode's q_b product with k_qa_kv's work for its one token done inside
 * the same launch, in parallel, instead of a launch before it (k_qa_kv:
 * ~5 µs of two blocks on the chain q_a → q_b). qr: the raw q_a (k_mv_q8x's
 * output). Every block norms qr itself as it loads it: rmsnorm_vec's
 * arithmetic with the sums of squares in the order of k_qa_kv's block of
 * ≥ ql/4 threads (each 32 consecutive float4 by a warp tree, then those
 * sums by a warp tree; absent terms are exact zeros in both), so the values
 * are k_qa_kv's bit for bit. Matvec blocks 1 … put them into shared memory
 * (sx_swz layout as k_mv_sx: a warp's 16-byte reads hit the 8 bank groups)
 * and are k_mv_rp<RP_Q8, NR, false, 1> on them: the same pieces in the same
 * order, so q_b's sums equal k_mv_rp's (and k_mv_sx's) bits; their weights
 * go into L2 (pf) or their first pieces into registers before pdl_wait,
 * and with k_mv_q8x as the predecessor that starts earlier than behind
 * k_qa_kv. Block 0 writes the normed q_a to qa (the indexer's idx_q_b reads
 * it) and finishes the K=V row as k_qa_kv's second block (RMSNorm in the
 * same tree order, kv_tail) into kv and the ring slot; it is the first
 * block dispatched, so its serial work overlaps the matvec. The K=V row is
 * thus written by the attention's immediate predecessor in window-only
 * layers: k_att_split copies a chunk's own rows after its wait. Shapes:
 * qb_fits (cuda.cu). Dynamic shared memory max(ql, hd) floats. */
#define QB_GW 2   /* 32-float4 groups of q_a a warp (registers): ql ≤ 128·MV_WARPS·QB_GW */
template <int NR>
__global__ void __launch_bounds__(32 * MV_WARPS)
k_qb(const uint8_t *__restrict__ W, int64_t rows, const float *qr, const float *qw, int ql, float *qa,
     float *__restrict__ y, float *kv, const float *kw, int hd, int rd, const double *freq, const dstep *st, float eps,
     float *ring, uint32_t keep, bool pf) {
    typedef rp_fmt<RP_Q8> fm;
    extern __shared__ float4 qbs[];
    __shared__ double shd[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nq = ql / 4, ng = (nq + 31) / 32;
    const bool side = blockIdx.x == 0;
    const int64_t r0 = (((int64_t)blockIdx.x - 1) * MV_WARPS + warp) * NR;   /* k_mv_rp's row group, block − 1 */
    const int64_t nb = ql / fm::EB, np = nb * fm::PB;
    const bool mv = !side && r0 < rows, pre = mv && !pf;
    if (mv && pf && !lane) {   /* k_mv_rp's prefetch of the row group's payload and headers */
        const int64_t n = rows - r0 < NR ? rows - r0 : NR;
        const uint64_t h0 = (uint64_t)(rows * nb * fm::PAY + r0 * nb * fm::HL) & ~(uint64_t)15;
        const uint64_t hend = (uint64_t)(rows * nb * (fm::PAY + fm::HL)) & ~(uint64_t)15;
        uint64_t h1 = ((uint64_t)(rows * nb * fm::PAY + (r0 + n) * nb * fm::HL) + 15) & ~(uint64_t)15;
        h1 = h1 < hend ? h1 : hend;
        l2_prefetch(W + r0 * nb * fm::PAY, (uint64_t)(n * nb * fm::PAY));
        if (h1 > h0) l2_prefetch(W + h0, h1 - h0);
    }
    const uint8_t *pl[NR], *hp[NR];
#pragma unroll
    for (int i = 0; i < NR; i++) {
        int64_t r = r0 + i < rows ? r0 + i : rows - 1;
        r = r < 0 ? 0 : r;   /* block 0 */
        pl[i] = W + r * nb * fm::PAY;
        hp[i] = W + rows * nb * fm::PAY + r * nb * fm::HL;
    }
    constexpr int UNR = NR == 1 ? 4 : 2;   /* k_mv_rp's pieces in flight a lane */
    uint4 wq[UNR][NR];
    unsigned short wh[UNR][NR];
    if (pre)
#pragma unroll
        for (int u = 0; u < UNR; u++)
            if (lane + 32 * u < np)
#pragma unroll
                for (int i = 0; i < NR; i++) {
                    wq[u][i] = ((const uint4 *)pl[i])[lane + 32 * u];
                    wh[u][i] = ((const unsigned short *)hp[i])[(lane + 32 * u) >> 1];
                }
    float c = 1, sn = 0;   /* block 0: the row's RoPE angle of pair threadIdx.x (a step input) */
    if (side && (int)threadIdx.x < rd / 2) {
        double ang = (double)st[0].pos * freq[threadIdx.x];
        c = (float)cos(ang);
        sn = (float)sin(ang);
    }
    float4 wv[QB_GW], v[QB_GW];
#pragma unroll
    for (int g = 0; g < QB_GW; g++) {
        const int f = 32 * (warp + MV_WARPS * g) + lane;
        wv[g] = f < nq ? ((const float4 *)qw)[f] : make_float4(0, 0, 0, 0);
    }
    pdl_wait();
#pragma unroll
    for (int g = 0; g < QB_GW; g++) {   /* sumsq_part's terms of float4 f, summed over its group of 32 */
        const int f = 32 * (warp + MV_WARPS * g) + lane;
        v[g] = f < nq ? ((const float4 *)qr)[f] : make_float4(0, 0, 0, 0);
        double a = 0, b = 0;
        a += (double)v[g].x * v[g].x + (double)v[g].y * v[g].y;
        b += (double)v[g].z * v[g].z + (double)v[g].w * v[g].w;
        const double s = warp_sum_d(a + b);
        if (!lane && warp + MV_WARPS * g < ng) shd[warp + MV_WARPS * g] = s;
    }
    __syncthreads();
    const float r = (float)(1.0 / sqrt(warp_sum_d(lane < ng ? shd[lane] : 0.0) / (double)ql + eps));
#pragma unroll
    for (int g = 0; g < QB_GW; g++) {
        const int f = 32 * (warp + MV_WARPS * g) + lane;
        if (f >= nq) continue;
        const float4 o = make_float4(v[g].x * r * wv[g].x, v[g].y * r * wv[g].y, v[g].z * r * wv[g].z,
                                     v[g].w * r * wv[g].w);
        if (side) ((float4 *)qa)[f] = o;
        else qbs[sx_swz<RP_Q8>(f)] = o;
    }
    __syncthreads();   /* qbs complete; shd read by every warp */
    if (side) {   /* the K=V row: blk_rmsnorm's terms, k_qa_kv's order (a thread an element there) */
        float *sv = (float *)qbs;
        const int gk = (hd + 31) / 32;
        for (int k = threadIdx.x; k < hd; k += blockDim.x) sv[k] = kv[k];
        __syncthreads();
        for (int g = warp; g < gk; g += MV_WARPS) {
            const int k = 32 * g + lane;
            const double s = warp_sum_d(k < hd ? (double)sv[k] * sv[k] : 0.0);
            if (!lane) shd[g] = s;
        }
        __syncthreads();
        const float rk = (float)(1.0 / sqrt(warp_sum_d(lane < gk ? shd[lane] : 0.0) / (double)hd + eps));
        for (int k = threadIdx.x; k < hd; k += blockDim.x) sv[k] = sv[k] * rk * kw[k];
        __syncthreads();
        kv_tail(sv, hd, rd, c, sn, kv, ring ? ring + (size_t)(st[0].pos % keep) * hd : NULL);
        return;
    }
    if (r0 >= rows) return;
    float acc[NR];
#pragma unroll
    for (int i = 0; i < NR; i++) acc[i] = 0;
    int64_t p = lane;
    if (pre)   /* the preloaded pieces first: the loop's order */
#pragma unroll
        for (int u = 0; u < UNR; u++, p += 32)
            if (p < np) {
                float4 xv[4];
#pragma unroll
                for (int i = 0; i < 4; i++) xv[i] = qbs[sx_swz<RP_Q8>(4 * (int)p + i)];
#pragma unroll
                for (int i = 0; i < NR; i++) acc[i] += q8_piece(wq[u][i], wh[u][i], xv);
            }
#pragma unroll UNR
    for (; p < np; p += 32) {
        float4 xv[4];
#pragma unroll
        for (int i = 0; i < 4; i++) xv[i] = qbs[sx_swz<RP_Q8>(4 * (int)p + i)];
#pragma unroll
        for (int i = 0; i < NR; i++)
            acc[i] += q8_piece(((const uint4 *)pl[i])[p], ((const unsigned short *)hp[i])[p >> 1], xv);
    }
#pragma unroll
    for (int i = 0; i < NR; i++) acc[i] = warp_sum(acc[i]);
    if (lane) return;
    mv_store<NR, false>(acc, r0, rows, y, 0, 0, NULL, 0);
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
 * chunk never overwrites inputs a block still needs. bi: the block's index
 * among the chunk's emissions (blockIdx.x of k_comp_emit). */
#define COMP_B 8   /* positions whose inputs an emission loads together */
__device__ void comp_emit_block(const float *pk, const float *pg, int ape_type, const uint8_t *ape, uint64_t ape_rb,
                                const float *kv, const float *gate, uint32_t keep, int R, int lanes, int D,
                                const dstep *st, int64_t T, const float *norm_w, const double *freq, int rd, float eps,
                                bool indexer, float *out, int64_t bi) {
    extern __shared__ float sv[];
    __shared__ double shd[32];
    uint64_t p0 = st[0].pos, b = p0 / (uint64_t)R + (uint64_t)bi;
    if ((b + 1) * (uint64_t)R > p0 + (uint64_t)T) return;   /* not completed in this chunk (uniform per block) */
    int W = lanes * D;
    uint64_t bR = b * R;
    bool prev = lanes == 2 && b > 0;
    int off = lanes == 2 ? D : 0;
    /* The block's positions in ascending order (lane a of the previous
     * block, then this block's lane b), COMP_B at a time: their inputs are
     * loaded together (pointers first, then the loads, then ape where the
     * position is in the chunk), so a column costs a few memory round trips,
     * not one per position (decode's R = 4 emission step: 24 → 17 µs, a
     * step without emission 5). The arithmetic and its order are the
     * per-position loop's. */
    const uint64_t q0 = prev ? bR - R : bR, nq = bR + R - q0;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float m = -INFINITY, den = 0, acc = 0;
        for (int pass = 0; pass < 2; pass++)
            for (uint64_t i0 = 0; i0 < nq; i0 += COMP_B) {
                const float *gp[COMP_B], *kp[COMP_B];
                float g[COMP_B], k[COMP_B];
#pragma unroll
                for (int i = 0; i < COMP_B; i++) {
                    uint64_t q = q0 + (i0 + i < nq ? i0 + i : nq - 1);   /* past the end: a real input, unused */
                    int c = q < bR ? j : off + j;
                    bool in = q >= p0;
                    gp[i] = in ? pg + (q - p0) * W + c : gate + (q % keep) * W + c;
                    kp[i] = in ? pk + (q - p0) * W + c : kv + (q % keep) * W + c;
                }
#pragma unroll
                for (int i = 0; i < COMP_B; i++) { g[i] = *gp[i]; if (pass) k[i] = *kp[i]; }
#pragma unroll
                for (int i = 0; i < COMP_B; i++) {
                    uint64_t q = q0 + i0 + i;
                    if (i0 + i < nq && q >= p0) g[i] += deq_one(ape_type, ape + (q % R) * ape_rb, q < bR ? j : off + j);
                }
#pragma unroll
                for (int i = 0; i < COMP_B; i++) {
                    if (i0 + i >= nq) break;
                    if (!pass) { m = fmaxf(m, g[i]); continue; }
                    float w = expf(g[i] - m);
                    den += w; acc += w * k[i];
                }
            }
        sv[j] = acc / den;
    }
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
                    out, blockIdx.x);
}

/* ---- decode: the compressors' and the indexer's products and row steps ------
 * One decode token of a layer with a compressor runs, besides attention,
 * up to six F16 products of two inputs (spec §4.5, §4.6): the attention
 * compressor's kv and gate (normed input n), on ratio-4 layers also the
 * indexer compressor's kv and gate, indexer.proj (n) and indexer.attn_q_b
 * (the normed q_a), 38 MB on a ratio-4 layer of the real model. They are
 * independent, so k_mv_f16x takes them all in one launch: a warp a row
 * (rows of every matrix in one sequence), a lane's pieces (8 halves, the
 * chunks lane, lane+32, …) summed in order with fmaf and then warp_sum —
 * k_matvec's arithmetic, so its rows have k_matvec's bits. As k_mv_q8x,
 * the first F16X_D pieces of a lane are loaded BEFORE pdl_wait (weights are
 * constants: they travel while the previous kernel runs), then the stream
 * walks as a ring (the piece F16X_D later goes into the stage just used);
 * both inputs in shared memory. The grid is at most the blocks resident at
 * once; more rows walk on (a warp's rows gridDim·SX_WARPS apart). */
#define F16X_SEGS 6
#define F16X_D 8
struct f16x_set {
    const uint8_t *w[F16X_SEGS];   /* F16 rows of n[xi[s]] values, 2·n bytes each */
    float *y[F16X_SEGS];
    int32_t end[F16X_SEGS];        /* rows of segments 0 … s together */
    int32_t xi[F16X_SEGS];         /* the segment's input: 0 or 1 */
    int32_t nseg;                  /* 1 … F16X_SEGS */
    const float *x[2];
    int32_t n[2];                  /* inputs of x[0], x[1]: multiples of 8 (n[1] = 0: no second input) */
};
struct f16x_row {
    const uint4 *w;   /* the row's pieces */
    float *y;         /* its output */
    int xo, nch, ppl; /* its input's offset in shared memory, pieces, pieces a lane */
};
/* Row r (< the set's rows) of the sequence: segment by the ends (ascending),
 * fields picked by constant indices (no local copy of the parameters). */
__device__ __forceinline__ f16x_row f16x_at(const f16x_set &a, int64_t r) {
    const uint8_t *w = a.w[0];
    float *y = a.y[0];
    int64_t r0 = 0;
    int xi = a.xi[0];
#pragma unroll
    for (int i = 1; i < F16X_SEGS; i++)
        if (i < a.nseg && r >= a.end[i - 1]) { w = a.w[i]; y = a.y[i]; r0 = a.end[i - 1]; xi = a.xi[i]; }
    f16x_row o;
    int n = xi ? a.n[1] : a.n[0];
    o.w = (const uint4 *)(w + (uint64_t)(r - r0) * (uint64_t)n * 2);
    o.y = y + (r - r0);
    o.xo = xi ? a.n[0] : 0;
    o.nch = n / 8;
    o.ppl = (o.nch + 31) / 32;
    return o;
}
__global__ void __launch_bounds__(32 * SX_WARPS, 2) k_mv_f16x(f16x_set a) {
    extern __shared__ float4 fxs[];
    const int lane = threadIdx.x & 31;
    int64_t rows = a.end[0];
#pragma unroll
    for (int i = 1; i < F16X_SEGS; i++)
        if (i < a.nseg) rows = a.end[i];
    const int64_t gstride = (int64_t)gridDim.x * SX_WARPS, rbase = (int64_t)blockIdx.x * SX_WARPS + (threadIdx.x >> 5);
    /* the load stream: row rl, piece jl (F16X_D tasks ahead of the compute) */
    int64_t rl = rbase;
    int jl = 0;
    f16x_row L = f16x_at(a, rl < rows ? rl : 0);
    const f16x_row C0 = L;
    uint4 w[F16X_D];
#pragma unroll
    for (int d = 0; d < F16X_D; d++) {
        if (rl >= rows) break;
        int p = lane + 32 * jl;
        if (p < L.nch) w[d] = __ldg(L.w + p);
        if (++jl == L.ppl) { jl = 0; rl += gstride; if (rl < rows) L = f16x_at(a, rl); }
    }
    pdl_wait();   /* the inputs are earlier kernels' outputs */
    float *xs = (float *)fxs;
    for (int q = threadIdx.x; q < a.n[0] / 4; q += blockDim.x) fxs[q] = ((const float4 *)a.x[0])[q];
    for (int q = threadIdx.x; q < a.n[1] / 4; q += blockDim.x) fxs[a.n[0] / 4 + q] = ((const float4 *)a.x[1])[q];
    __syncthreads();
    /* the compute stream: row r, piece j */
    int64_t r = rbase;
    int j = 0;
    f16x_row C = C0;
    float acc = 0;
    while (r < rows) {
#pragma unroll
        for (int d = 0; d < F16X_D; d++) {
            if (r >= rows) break;
            int p = lane + 32 * j;
            if (p < C.nch) {   /* chunk_fma's order: elements 8p … 8p+7 */
                const float4 *xp = (const float4 *)(xs + C.xo) + 2 * p;
                float4 x0 = xp[0], x1 = xp[1];
                float2 f0 = __half22float2(*(const __half2 *)&w[d].x), f1 = __half22float2(*(const __half2 *)&w[d].y);
                float2 f2 = __half22float2(*(const __half2 *)&w[d].z), f3 = __half22float2(*(const __half2 *)&w[d].w);
                acc = fmaf(f0.x, x0.x, acc); acc = fmaf(f0.y, x0.y, acc); acc = fmaf(f1.x, x0.z, acc); acc = fmaf(f1.y, x0.w, acc);
                acc = fmaf(f2.x, x1.x, acc); acc = fmaf(f2.y, x1.y, acc); acc = fmaf(f3.x, x1.z, acc); acc = fmaf(f3.y, x1.w, acc);
            }
            /* stage d is free: the task F16X_D later goes there */
            if (rl < rows) {
                int pl = lane + 32 * jl;
                if (pl < L.nch) w[d] = __ldg(L.w + pl);
                if (++jl == L.ppl) { jl = 0; rl += gstride; if (rl < rows) L = f16x_at(a, rl); }
            }
            if (++j < C.ppl) continue;
            /* the row is complete */
            acc = warp_sum(acc);
            if (!lane) *C.y = acc;
            acc = 0;
            j = 0;
            r += gstride;
            if (r < rows) C = f16x_at(a, r);
        }
    }
}

/* The compressor's two products of one decode x (comp_kv and comp_gate:
 * same type and shape) in one launch, blockIdx.y picking the matrix: twice
 * the blocks of one k_matvec / k_matvec_wide (whose arithmetic each half
 * keeps: a block per row when wide, else a warp per row). Decode's ratio-128
 * layers: their 2 × 512 rows take 5.9 µs here against 10.5 in k_mv_f16x
 * (H100, nsys, PDL off; 128 blocks of k_mv_f16x for 1024 rows). */
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

/* One decode token's compressor step (spec §4.5) in one block: the
 * emission of the block it completes, if any (comp_emit_block), then its
 * kv and gate + ape[pos % R] into their ring slot (k_comp_store's
 * arithmetic). The barrier keeps the order of the chunk's two launches:
 * every ring read of the emission is done before the slot is overwritten. */
struct comp_job {
    const float *pk, *pg;          /* the token's kv and gate products (W = lanes·D each) */
    const uint8_t *ape;
    uint64_t ape_rb;
    int ape_type, R, lanes, D;
    float *kv, *gate;              /* ring of the last keep positions */
    uint32_t keep;
    const float *norm_w;
    float *out;                    /* compressed rows */
    bool indexer;
};
__device__ void comp_one_block(const comp_job &c, const dstep *st, const double *freq, int rd, float eps) {
    comp_emit_block(c.pk, c.pg, c.ape_type, c.ape, c.ape_rb, c.kv, c.gate, c.keep, c.R, c.lanes, c.D, st, 1, c.norm_w,
                    freq, rd, eps, c.indexer, c.out, 0);
    __syncthreads();
    int W = c.lanes * c.D;
    int64_t pos = st[0].pos;
    uint32_t slot = (uint32_t)(pos % c.keep);
    for (int k8 = threadIdx.x; k8 < W / 8; k8 += blockDim.x) {
        float v[8];
        deq_chunk(c.ape_type, c.ape + (uint64_t)(pos % c.R) * c.ape_rb, k8, v);
        for (int k = 0; k < 8; k++) {
            c.kv[(size_t)slot * W + 8 * k8 + k] = c.pk[8 * k8 + k];
            c.gate[(size_t)slot * W + 8 * k8 + k] = c.pg[8 * k8 + k] + v[k];
        }
    }
}

/* Indexer query head g (ihd values) of the token at pos: RoPE on the tail,
 * Hadamard + FP4 (spec §4.6); its weight *w scaled. One block, ihd floats
 * of dynamic shared memory. */
__device__ void idx_head(float *g, float *w, int ihd, int rd, const double *freq, int64_t pos, float wscale) {
    extern __shared__ float sv[];
    for (int k = threadIdx.x; k < ihd; k += blockDim.x) sv[k] = g[k];
    __syncthreads();
    blk_rope(sv + ihd - rd, rd / 2, freq, pos, false);
    if (d_qat) blk_fp4(sv, ihd);
    for (int k = threadIdx.x; k < ihd; k += blockDim.x) g[k] = sv[k];
    if (threadIdx.x == 0) *w *= wscale;
}

/* a or b field by field: one copy of the step's code, and no local-memory
 * copy of a parameter struct (as `blockIdx.x ? b : a` made). */
__device__ __forceinline__ comp_job comp_pick(const comp_job &a, const comp_job &b, bool second) {
    comp_job c;
    c.pk = second ? b.pk : a.pk;
    c.pg = second ? b.pg : a.pg;
    c.ape = second ? b.ape : a.ape;
    c.ape_rb = second ? b.ape_rb : a.ape_rb;
    c.ape_type = second ? b.ape_type : a.ape_type;
    c.R = second ? b.R : a.R;
    c.lanes = second ? b.lanes : a.lanes;
    c.D = second ? b.D : a.D;
    c.kv = second ? b.kv : a.kv;
    c.gate = second ? b.gate : a.gate;
    c.keep = second ? b.keep : a.keep;
    c.norm_w = second ? b.norm_w : a.norm_w;
    c.out = second ? b.out : a.out;
    c.indexer = second ? b.indexer : a.indexer;
    return c;
}

/* What follows k_mv_f16x for a decode token, one launch: block 0 the
 * attention compressor's step, block 1 the indexer compressor's (ncomp 2),
 * blocks ncomp … ncomp+ih−1 the indexer's query heads (ih 0: no selection
 * this step). Independent blocks (each writes only its own rows), so three
 * launches become one. Blocks of ≥ 32 threads, max(D, ihd) floats of
 * dynamic shared memory. */
__global__ void k_comp_idx(comp_job a, comp_job b, int ncomp, float *iq, float *iw, int ihd, int rd,
                           const double *freq, const dstep *st, float eps, float wscale) {
    pdl_wait();
    if ((int)blockIdx.x < ncomp) comp_one_block(comp_pick(a, b, blockIdx.x == 1), st, freq, rd, eps);
    else {
        int h = (int)blockIdx.x - ncomp;
        idx_head(iq + (int64_t)h * ihd, iw + h, ihd, rd, freq, st[0].pos, wscale);
    }
}

/* ---- indexer (spec §4.6) ------------------------------------------------------ */

/* Indexer query heads of a chunk: block per (head, token), idx_head's step. */
__global__ void k_idx_heads(float *iq, float *iw, int ihd, int rd, const double *freq, const dstep *st, float wscale) {
    pdl_wait();
    int64_t i = (int64_t)blockIdx.y * gridDim.x + blockIdx.x;
    idx_head(iq + i * ihd, iw + i, ihd, rd, freq, st[blockIdx.y].pos, wscale);
}

/* score_c = Σ_h w_h · max(0, q_h · k_c) for the (pos+1)/4 visible rows of
 * token blockIdx.y (scores at score + blockIdx.y·ld), as the CPU's idx_task:
 * each product w_h·max(0, dot) rounded once, heads summed in ascending order
 * (the chunk kernel k_idx_chunk does the same), so the top-k sees the CPU's
 * scores. Tiles of 32 rows copied to shared memory (cp.async, row stride
 * ihd + 4 floats: a quarter-warp's 16-byte reads of 8 rows hit distinct
 * banks), a row per lane; warp w takes heads 8w … 8w+7 (and 64 on, … where
 * ih > 64) with q broadcast from shared memory (the token's ih·ihd q values
 * copied with the first tile: read from L1/L2 a head at a time, each step's
 * 8 loads were a round trip, 13.5 µs at 2K), all 8 loads of a step issued
 * together (no early exit between them); the products meet in shared memory
 * and lanes of warp 0 sum them. Fixed grid over the state's capacity
 * (decode graphs replay at every position), blocks loop over tiles. 256
 * threads, idx_scores_smem(ih, ihd) bytes of dynamic shared memory (57 KB at
 * ih 64, ihd 128). */
#define IDX_TILE 32
#define IDX_HPT 8
__host__ __device__ constexpr size_t idx_scores_smem(int ih, int ihd) {
    return (size_t)IDX_TILE * (ihd + 4) * sizeof(float) + (size_t)ih * ihd * sizeof(float) +
           (size_t)IDX_TILE * (ih + 1) * sizeof(float);
}
__global__ void __launch_bounds__(256) k_idx_scores(const float *iq, const float *iw, const float *rows, const dstep *st,
                                                    int ih, int ihd, float *score, int64_t ld) {
    pdl_wait();
    extern __shared__ float4 ixs_sm[];
    const int KS = ihd / 4 + 1, lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int groups = (ih + IDX_HPT - 1) / IDX_HPT;
    float4 *srow = ixs_sm;                          /* IDX_TILE × KS */
    float4 *qs = ixs_sm + IDX_TILE * KS;            /* ih × ihd/4: the token's q */
    float *se = (float *)(qs + ih * (ihd / 4));      /* IDX_TILE × (ih + 1): row lane's product of head h at lane·(ih+1) + h */
    const int64_t nrows = (st[blockIdx.y].pos + 1) / 4;
    const float4 *q4 = (const float4 *)(iq + (int64_t)blockIdx.y * ih * ihd), *r4 = (const float4 *)rows;
    iw += (int64_t)blockIdx.y * ih;
    score += (int64_t)blockIdx.y * ld;
    if ((int64_t)blockIdx.x * IDX_TILE < nrows)   /* q with the first tile's rows (cp.async.wait_all below) */
        for (int i = threadIdx.x; i < ih * (ihd / 4); i += blockDim.x) att_cp16(qs + i, q4 + i);
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
            int qh[IDX_HPT];   /* heads past ih read the last one, results unused: no branch */
            const int hb = g * IDX_HPT;
#pragma unroll
            for (int j = 0; j < IDX_HPT; j++) {
                acc[j] = 0;
                qh[j] = (hb + j < ih ? hb + j : ih - 1) * (ihd / 4);
            }
#pragma unroll 2
            for (int c = 0; c < ihd / 4; c++) {
                float4 x = srow[lane * KS + c];
#pragma unroll
                for (int j = 0; j < IDX_HPT; j++) {
                    float4 y = qs[qh[j] + c];   /* same address in every lane: a broadcast */
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
 * T and how many keys equal to T to take; with a key a thread, a bitwise
 * search by block-wide counts instead), then one ordered pass that keeps
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
    uint32_t T, need_eq;
    if (seg <= 1) {
        /* A key a thread (n ≤ 1024: contexts up to 4K): T, the k-th best key,
         * by a bitwise search from the top bit, one block-wide count a bit
         * (__syncthreads_count) instead of four histogram passes. */
        const bool has = a0 < a1;
        uint32_t t = 0;
        for (int bit = 31; bit >= 0; bit--) {
            uint32_t c = t | 1u << bit;
            if ((int64_t)__syncthreads_count(has && kr[0] >= c) >= k) t = c;
        }
        T = t;
        need_eq = (uint32_t)k - (uint32_t)__syncthreads_count(has && kr[0] > t);
    } else {
        if (tid == 0) { s_prefix = 0; s_need = (uint32_t)k; }
        uint32_t mask = 0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
            __syncthreads();
            const uint32_t pre = s_prefix;
            for (int64_t j0 = 0; j0 < seg; j0 += TOPK_KPT)   /* the same trip counts in every lane */
#pragma unroll
                for (int j = 0; j < TOPK_KPT; j++) {
                    if (j0 + j >= seg) break;   /* seg is the block's: every lane leaves together (seg < TOPK_KPT) */
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
        T = s_prefix;
        need_eq = s_need;
    }
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
 * head) the unnormalised output to part and (m, l) to ml.
 * Before pdl_wait (under programmatic launch: while q_b still runs) a block
 * derives its span and the query RoPE angles (step inputs) and starts the
 * copy of its first tile when that tile is raw-window rows only, except the
 * chunk's own rows (positions ≥ p0): ring rows of earlier steps were written
 * ≥ 2 launches back, and a kernel starts only after its predecessor passed
 * its own wait, i.e. after the launch before that completed. The chunk's
 * rows (decode: k_qb, the predecessor in window-only layers), compressed
 * rows and the indexer's selection: after the wait. */
template <int NV>
__global__ void __launch_bounds__(32 * ATT_HG, 3)
k_att_split(const float *q, float qeps, const float *kvc, const float *raw, uint32_t keep_raw, const dstep *st0,
            const dstep *st, uint32_t window, const float *comp, const int32_t *selbuf, int ratio, int64_t topk, int H,
            int rd, const double *freq, float scale, float *part, float *ml) {
    extern __shared__ float4 att_sm[];
    __shared__ float2 qcs[64 * NV];   /* (cos, sin) of the query's RoPE pair k (rd/2 ≤ hd/2 pairs) */
    constexpr int hd = 128 * NV, C = 32 * NV, TILE = ATT_TILE_FLOATS / hd < 32 ? ATT_TILE_FLOATS / hd : 32;
    float4 *srow = att_sm;   /* TILE × C */
    float *sp = (float *)(att_sm + TILE * C), *salpha = sp + ATT_HG * TILE;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, h0 = blockIdx.x * ATT_HG, S = gridDim.y;
    const int64_t t = blockIdx.z;
    const att_span a = att_rows(st0, st, t, window, ratio, topk, selbuf);
    const int ns = att_nsplit(a.n, S), s = blockIdx.y;
    const int64_t r0 = s * a.n / ns, r1 = (s + 1) * a.n / ns;
    /* warp w copies rows w, w + 8, … of a tile (cp.async: every copy in flight at once, no registers),
     * those of index in [ra, rb) */
    auto copy_tile = [&](int64_t rt, int nt, int64_t ra, int64_t rb) {
#pragma unroll
        for (int k = 0; k < TILE / ATT_HG; k++)
            if (wid + k * ATT_HG < nt && rt + wid + k * ATT_HG >= ra && rt + wid + k * ATT_HG < rb) {
                const float4 *row = att_row(a, rt + wid + k * ATT_HG, kvc, raw, keep_raw, comp, hd);
#pragma unroll
                for (int i = 0; i < NV; i++) att_cp16(srow + (wid + k * ATT_HG) * C + lane + 32 * i, row + lane + 32 * i);
            }
    };
    const int nt0 = r1 - r0 < TILE ? (int)(r1 - r0) : TILE;
    const bool early = s < ns && r0 + nt0 <= a.nraw;
    /* rows below a.p0 − a.lo (≤ 0 when the chunk covers the window) are ring rows of earlier steps: those go early */
    if (early) copy_tile(r0, nt0, r0, a.p0 - a.lo);
    if (qeps >= 0 && s < ns)
        for (int k = threadIdx.x; k < rd / 2; k += blockDim.x) {
            double ang = (double)a.pos * freq[k];
            qcs[k] = make_float2((float)cos(ang), (float)sin(ang));
        }
    pdl_wait();
    if (s >= ns) return;   /* k_att_combine reads slices < ns only */
    __syncthreads();       /* qcs */
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
                float2 cs = qcs[k];
                float x0 = v.x, x1 = v.y;
                v.x = x0 * cs.x - x1 * cs.y;
                v.y = x0 * cs.y + x1 * cs.x;
                cs = qcs[k + 1];
                x0 = v.z; x1 = v.w;
                v.z = x0 * cs.x - x1 * cs.y;
                v.w = x0 * cs.y + x1 * cs.x;
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
        if (!early || rt != r0) copy_tile(rt, nt, rt, rt + nt);
        else copy_tile(rt, nt, a.p0 - a.lo, rt + nt);   /* the chunk's own rows of the early tile */
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

/* Grid (H, tokens), hd/4 threads, att_combine_smem(hd) bytes of dynamic
 * shared memory: the slices of (token, head) in ascending order with the
 * head's sink (as cpu_attend: max over scores and sink, den = e^(sink−M) +
 * Σ l·e^(m−M)), then inverse RoPE on the tail (blk_rope's arithmetic: rd %
 * 4 = 0, so thread c's float4 holds whole pairs). The span, the sink and
 * the RoPE angles come before pdl_wait (step inputs and weights); after it
 * every slice's partial output is copied to shared memory (cp.async, thread
 * c its own float4 of each) together with the slices' (m, l): one round
 * trip for any slice count (16 partials a round trip in registers took 3
 * on a ratio-4 layer's 48 slices: 6.9 µs against 3.7 on a plain layer's
 * 16, H100 nsys). */
__host__ __device__ constexpr size_t att_combine_smem(int hd) {
    return (size_t)ATT_SPLITS * (hd + 4) * sizeof(float);   /* partials (hd a slice), then (m, l) of each */
}
__global__ void k_att_combine(const float *part, const float *ml, const dstep *st0, const dstep *st, uint32_t window,
                              int ratio, int64_t topk, const float *sinks, int hd, int rd, const double *freq,
                              int splits, float *o) {
    extern __shared__ float4 acb_sm[];
    float4 *ps = acb_sm;                                  /* slice s: ps[s·hd/4 … ] */
    float *sm = (float *)(acb_sm + splits * (hd / 4)), *sl = sm + splits;
    const int h = blockIdx.x, H = gridDim.x, c = threadIdx.x;
    const int64_t t = blockIdx.y;
    const att_span a = att_rows(st0, st, t, window, ratio, topk, NULL);
    const int ns = att_nsplit(a.n, splits);
    const int64_t base = t * splits * H + h;   /* slice s of head h: base + s·H */
    const float sink = sinks[h];
    const int e = 4 * c - (hd - rd);   /* ≥ 0: pairs e/2, e/2 + 1 of the tail */
    float c0 = 1, sn0 = 0, c1 = 1, sn1 = 0;
    if (e >= 0) {
        double ang = -((double)a.pos * freq[e / 2]);
        c0 = (float)cos(ang); sn0 = (float)sin(ang);
        ang = -((double)a.pos * freq[e / 2 + 1]);
        c1 = (float)cos(ang); sn1 = (float)sin(ang);
    }
    pdl_wait();
    for (int s = 0; s < ns; s++) att_cp16(ps + s * (hd / 4) + c, (const float4 *)(part + (base + s * H) * hd) + c);
    for (int s = c; s < ns; s += blockDim.x) {
        sm[s] = ml[(base + s * H) * 2];
        sl[s] = ml[(base + s * H) * 2 + 1];
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncthreads();
    float M = sink;
    for (int s = 0; s < ns; s++) M = fmaxf(M, sm[s]);
    float den = expf(sink - M);
    float4 acc = make_float4(0, 0, 0, 0);
    for (int s = 0; s < ns; s++) {
        float f = expf(sm[s] - M);
        float4 v = ps[s * (hd / 4) + c];
        den += sl[s] * f;
        acc.x = fmaf(f, v.x, acc.x); acc.y = fmaf(f, v.y, acc.y);
        acc.z = fmaf(f, v.z, acc.z); acc.w = fmaf(f, v.w, acc.w);
    }
    float inv = 1.0f / den;
    float4 r = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
    if (e >= 0) {
        float x0 = r.x, x1 = r.y;
        r.x = x0 * c0 - x1 * sn0;
        r.y = x0 * sn0 + x1 * c0;
        x0 = r.z; x1 = r.w;
        r.z = x0 * c1 - x1 * sn1;
        r.w = x0 * sn1 + x1 * c1;
    }
    ((float4 *)(o + (t * H + h) * hd))[c] = r;
}

#endif
