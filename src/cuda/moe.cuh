/* MoE kernels (spec §3.6, §4.7): the router and the shared expert's
 * swiglu of a chunk. */
#ifndef DS4_CUDA_MOE_CUH
#define DS4_CUDA_MOE_CUH
#include "cuda/kernels.cuh"

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

#endif
