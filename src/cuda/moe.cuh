/* MoE kernels (spec §3.6, §4.7): the router (decode: with the shared
 * expert's gate+up in its launch) and the shared expert's swiglu of a chunk. */
#ifndef DS4_CUDA_MOE_CUH
#define DS4_CUDA_MOE_CUH
#include "cuda/matvec.cuh"   /* q8_reg, q8x_fetch, sx_swz: the shared expert's Q8_0 blocks */

/* ---- MoE (spec §3.6, §4.7) ----------------------------------------------------- */

__device__ __forceinline__ float router_score(float z) {
    float sp = z > 20.0f ? z : z < -20.0f ? expf(z) : log1pf(expf(z));
    return sqrtf(sp);
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

/* The shared expert's gate+up of one decode token (Q8_0, repacked): y[r] =
 * swiglu(Wg[r]·x, Wu[r]·x), on blocks blk of nblk of the router launch
 * below. Its weights do not depend on the routing, so they ride there: the
 * router alone is latency-bound (2 MB), this fills the GPU beside it, and
 * one launch of the FFN chain goes. As in k_mv_q8x, a warp owns a row pair
 * (gate r, up r) at a time and its lane's first SH_D tasks (a 16-weight
 * piece of both rows) are loaded BEFORE pdl_wait, while the HC step still
 * runs: at 4096 inputs half of a lane's share of the pair (8 of 16 pieces
 * of 16 bytes; 8 MB of the 17.8 in flight with one warp a pair, and 79
 * registers leave 3 blocks an SM); the rest, and more pairs than warps,
 * walk on as a ring. x in shared memory as k_mv_sx (sx_swz). A row is its
 * lane's pieces summed in order, then warp_sum. */
#define SH_D 4
__device__ __forceinline__ void sh_pair(const q8_reg &g, const q8_reg &u, const float4 *xs, int64_t p, float &ag,
                                        float &au) {
    int q0 = 4 * (int)p;
    float4 x0 = xs[sx_swz<RP_Q8>(q0)], x1 = xs[sx_swz<RP_Q8>(q0 + 1)];
    float4 x2 = xs[sx_swz<RP_Q8>(q0 + 2)], x3 = xs[sx_swz<RP_Q8>(q0 + 3)];
    float t = dot4_i8(g.q.x, x0, 0.0f);
    t = dot4_i8(g.q.y, x1, t);
    t = dot4_i8(g.q.z, x2, t);
    t = dot4_i8(g.q.w, x3, t);
    ag += __half2float(__ushort_as_half((unsigned short)g.d)) * t;
    t = dot4_i8(u.q.x, x0, 0.0f);
    t = dot4_i8(u.q.y, x1, t);
    t = dot4_i8(u.q.z, x2, t);
    t = dot4_i8(u.q.w, x3, t);
    au += __half2float(__ushort_as_half((unsigned short)u.d)) * t;
}
__device__ void sh_glu(const uint8_t *__restrict__ Wg, const uint8_t *__restrict__ Wu, int64_t rows, int64_t n_in,
                       const float *__restrict__ x, float *__restrict__ y, float clamp, int64_t blk, int64_t nblk) {
    extern __shared__ float4 xs[];
    const int lane = threadIdx.x & 31;
    const int64_t nb = n_in / 32, np = 2 * nb, ppl = (np + 31) / 32;
    const int64_t gstride = nblk * (blockDim.x >> 5);
    const int64_t rbase = blk * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int64_t ntask = rbase < rows ? (rows - rbase + gstride - 1) / gstride * ppl : 0;
    int64_t rl = rbase, jl = 0;   /* the load stream's position, SH_D tasks ahead of the compute */
    q8_reg wg[SH_D], wu[SH_D];
#pragma unroll
    for (int d = 0; d < SH_D; d++) {
        if (d < ntask) {
            q8x_fetch(Wg, rows, Wg, 0, nb, rl, lane + 32 * jl, np, wg[d]);
            q8x_fetch(Wu, rows, Wu, 0, nb, rl, lane + 32 * jl, np, wu[d]);
        }
        if (++jl == ppl) { jl = 0; rl += gstride; }
    }
    pdl_wait();   /* x is the HC step's normed output */
    for (int q = threadIdx.x; q < n_in / 4; q += blockDim.x) xs[sx_swz<RP_Q8>(q)] = ((const float4 *)x)[q];
    __syncthreads();
    float ag = 0, au = 0;
    int64_t r = rbase, j = 0;   /* the compute stream's position */
    for (int64_t t0 = 0; t0 < ntask; t0 += SH_D) {
#pragma unroll
        for (int d = 0; d < SH_D; d++) {
            if (t0 + d >= ntask) break;
            int64_t p = lane + 32 * j;
            if (p < np) sh_pair(wg[d], wu[d], xs, p, ag, au);
            /* stage d is free: the task SH_D later goes there */
            if (t0 + SH_D + d < ntask) {
                q8x_fetch(Wg, rows, Wg, 0, nb, rl, lane + 32 * jl, np, wg[d]);
                q8x_fetch(Wu, rows, Wu, 0, nb, rl, lane + 32 * jl, np, wu[d]);
            }
            if (++jl == ppl) { jl = 0; rl += gstride; }
            if (++j < ppl) continue;
            /* the pair is complete */
            ag = warp_sum(ag);
            au = warp_sum(au);
            if (!lane) y[r] = swiglu(ag, au, clamp);
            ag = au = 0;
            j = 0;
            r += gstride;
        }
    }
}

/* Decode's router in one launch: the logits W·x (E rows of F16/F32, RT_ROWS
 * rows a block, RT_THREADS / RT_ROWS threads a row summed in warp order;
 * n_in ≤ RT_MAX_IN, the weights in registers, loaded before pdl_wait as in
 * k_hc_step), then the router block that arrives last (counter as in
 * k_hc_step) routes. With Sg, the blocks before the router's last
 * ⌈E / RT_ROWS⌉ compute the shared expert's gate+up into sy (sh_glu;
 * dynamic shared memory: the larger of ROUTER_SMEM(E) and n_in floats). */
#define RT_THREADS 256
#define RT_ROWS 2
#define RT_C 4                 /* 8-weight chunks a thread */
#define RT_MAX_IN (8 * RT_C * RT_THREADS / RT_ROWS)
__device__ unsigned d_rt_count;
__global__ void __launch_bounds__(RT_THREADS)
k_router_mv(int wtype, const uint8_t *__restrict__ W, uint64_t rb, int64_t n_in, const float *x, float *logit, int E,
            int used, const uint8_t *tid2eid, uint64_t t2e_rb, const dstep *st, const float *bias, bool norm,
            float wscale, int32_t *eid, float *ew, const uint8_t *__restrict__ Sg, const uint8_t *__restrict__ Su,
            int64_t srows, float *__restrict__ sy, float clamp) {
    __shared__ float part[RT_THREADS / 32];
    __shared__ bool last;
    /* the shared expert's blocks first: blocks are dispatched in index order,
     * and under PDL those resident before the wait are the ones whose loads
     * overlap the HC step; the shared expert is the longer part */
    const unsigned nrb = (unsigned)(E + RT_ROWS - 1) / RT_ROWS, nsb = gridDim.x - nrb;
    if (blockIdx.x < nsb) {
        sh_glu(Sg, Su, srows, n_in, x, sy, clamp, blockIdx.x, nsb);
        return;
    }
    const int tpr = RT_THREADS / RT_ROWS, wpr = tpr / 32;
    int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    int64_t r = (int64_t)(blockIdx.x - nsb) * RT_ROWS + tid / tpr;
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
        last = atomicAdd(&d_rt_count, 1u) == nrb - 1;
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

#endif
