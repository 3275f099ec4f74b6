/* Hyper-connection kernels (spec §4.2, §4.3, §4.8): coefficients and
 * Sinkhorn, the collapse before a sublayer, the post after it, and decode's
 * fused HC step. */
#ifndef DS4_CUDA_HC_CUH
#define DS4_CUDA_HC_CUH
#include "cuda/kernels.cuh"

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

/* 1/x by the SFU alone (≤ 1 ulp; x ≥ eps: no subnormal), one instruction
 * without the range check and slow-path branch of a rounded reciprocal. */
__device__ __forceinline__ float rcp_sfu(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

/* The same coefficients by one thread with the matrix in registers (hc ≤ 4,
 * entries past hc guarded so everything stays in registers): sums in the
 * CPU's left-to-right order, each division by a row or column sum a product
 * with the SFU reciprocal of the sum (≤ 2 ulp from the CPU's quotient). A
 * normalisation is then 4 dependent adds, one SFU op and a product for all
 * 4 lines at once (≈ 40 cycles), where the warp version it replaces spent
 * ≈ 2 shuffle rounds and a full division a step (measured ≈ 5 µs for the 20
 * iterations without PDL), and rounded reciprocals (a range check and
 * branch each) serialise the 4 lines (≈ 10 µs). pre may be NULL (a post
 * needs only post and comb). */
__device__ __forceinline__ void hc_coeffs_reg(const float *mix, const float *scale, const float *base, int hc,
                                              int iters, float eps, float *pre, float *post, float *comb) {
    float C[4][4];
#pragma unroll
    for (int a = 0; a < 4; a++)
        if (a < hc) {
            if (pre) pre[a] = sigmoidf_d(mix[a] * scale[0] + base[a]) + eps;
            post[a] = 2.0f * sigmoidf_d(mix[hc + a] * scale[1] + base[hc + a]);
        }
#pragma unroll
    for (int a = 0; a < 4; a++) {
        float m = -INFINITY;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            bool in = a < hc && c < hc;
            C[a][c] = in ? mix[2 * hc + a * hc + c] * scale[2] + base[2 * hc + a * hc + c] : 0.0f;
            if (in) m = fmaxf(m, C[a][c]);
        }
#pragma unroll
        for (int c = 0; c < 4; c++)
            if (a < hc && c < hc) C[a][c] = expf(C[a][c] - m);
        float r = rcp_sfu(C[a][0] + C[a][1] + C[a][2] + C[a][3]);
#pragma unroll
        for (int c = 0; c < 4; c++)
            if (a < hc && c < hc) C[a][c] = C[a][c] * r + eps;
    }
    /* Entries past hc hold +0 and stay +0 (their row's or column's factor
     * is 0, not 1/eps): adding them leaves every sum of the positive entries
     * unchanged, so the sums need no guards (a select per term would double
     * the chain, a branch per line would serialise the 4 independent lines).
     * The first term starts the sum: the CPU's 0 + c0 is c0. */
    for (int it = 0; it < iters; it++) {
        if (it > 0)
#pragma unroll
            for (int a = 0; a < 4; a++) {
                float r = rcp_sfu(C[a][0] + C[a][1] + C[a][2] + C[a][3] + eps);
                r = a < hc ? r : 0.0f;
#pragma unroll
                for (int c = 0; c < 4; c++) C[a][c] *= r;
            }
#pragma unroll
        for (int c = 0; c < 4; c++) {
            float r = rcp_sfu(C[0][c] + C[1][c] + C[2][c] + C[3][c] + eps);
            r = c < hc ? r : 0.0f;
#pragma unroll
            for (int a = 0; a < 4; a++) C[a][c] *= r;
        }
    }
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int c = 0; c < 4; c++)
            if (a < hc && c < hc) comb[a * hc + c] = C[a][c];
}

/* The coefficients of an HC step from its mixer outputs over rms (pm, mw
 * floats, hc ≤ 4) into c (shared), called by ONE WARP BEFORE pdl_wait: pm
 * was written by a launch at least two before this one, and a kernel
 * starts only once its predecessor has passed its own pdl_wait, i.e. once
 * the launch before that one has completed — so pm is complete (read
 * through L2: no stale L1 line). The Sinkhorn then overlaps the previous
 * kernel instead of lengthening the step that produced pm. The lanes load
 * pm, pbase and pscale together (one round trip instead of a chain of
 * them), lane 0 derives the coefficients. mp: 2·mw + 3 floats of shared
 * scratch. The caller syncs the block before reading c. */
#define HC_EARLY_SCRATCH (2 * 24 + 3)   /* 2·mw + 3 floats, mw ≤ 24 (hc ≤ 4) */
__device__ __forceinline__ void hc_coeffs_early(const float *pm, const float *pscale, const float *pbase, int hc,
                                                int iters, float eps, float *mp, float *c) {
    int lane = threadIdx.x & 31, nc = (2 + hc) * hc;
    if (lane < nc) {
        mp[lane] = __ldcg(pm + lane);
        mp[nc + lane] = __ldg(pbase + lane);
    }
    if (lane < 3) mp[2 * nc + lane] = __ldg(pscale + lane);
    __syncwarp();
    if (lane == 0) hc_coeffs_reg(mp, mp + 2 * nc, mp + nc, hc, iters, eps, NULL, c + hc, c + 2 * hc);
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
    if (head) {
        if (threadIdx.x < hc) c[threadIdx.x] = sigmoidf_d(m[threadIdx.x] * scale[0] + base[threadIdx.x]) + hc_eps;
    } else if (threadIdx.x == 0) {
        if (hc <= 4) hc_coeffs_reg(m, scale, base, hc, iters, hc_eps, c, c + hc, c + 2 * hc);
        else hc_coeffs(m, scale, base, hc, iters, hc_eps, c, c + hc, c + 2 * hc);
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

#define HS_THREADS 256         /* k_hc_step: a slice's threads; k_hc_rows: a token's block */
#define HS_BLOCK (HS_THREADS + 32)   /* k_hc_step: + the warp that derives the post's coefficients */
#define HS_ROWS 3              /* mixer rows per warp: mw ≤ 8 · 3 */
#define HS_MAX_D 4096          /* the collapse in registers: HS_Q float4 positions a thread */
#define HS_MAX_BLOCKS 64       /* HS_MAX_D / the narrowest slice (hc = 4: 64 positions) */
#define HS_PAIRS 10            /* Gram entries of hc ≤ 4 streams: hc·(hc+1)/2 */
#define HS_SUMS 4              /* partial sums a warp after the barrier: ⌈(24 + 10) / 9⌉ */
__device__ unsigned d_hs_count, d_hs_gen;
__device__ float d_hs_part[HS_MAX_BLOCKS * HS_ROWS * 8];
__device__ double d_hs_gram[HS_MAX_BLOCKS * HS_PAIRS];

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
 * over rms (m, shared) and hc_load's registers: pre as hc_coeffs_reg
 * computes it, in every thread; with coef, all coefficients (Sinkhorn) by
 * thread 0 into coef (c: shared scratch); h = Σ pre_a·X_a and
 * nrm = rmsnorm(h)·nw with k_rmsnorm's arithmetic. */
__device__ __forceinline__ void hc_finish(const hc_regs &g, int64_t d, int hc, const float *m, const float *scale,
                                          const float *base, int iters, float hc_eps, float rms_eps, float *coef,
                                          float *nrm, float *c, double *shd) {
    float pre[4];
#pragma unroll
    for (int i = 0; i < 4; i++) pre[i] = i < hc ? sigmoidf_d(m[i] * scale[0] + base[i]) + hc_eps : 0.0f;
    if (coef && threadIdx.x == 0) {
        hc_coeffs_reg(m, scale, base, hc, iters, hc_eps, c, c + hc, c + 2 * hc);
        for (int i = 0; i < (2 + hc) * hc; i++) coef[i] = c[i];
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

/* Gram entry j of hc streams (upper triangle, row by row: (0,0), (0,1), …,
 * (1,1), …) → its streams c1 ≤ c2. */
__device__ __forceinline__ void hc_pair(int j, int hc, int &c1, int &c2) {
    c1 = 0;
    while (j >= hc - c1) { j -= hc - c1; c1++; }
    c2 = c1 + j;
}

/* Every block of k_hc_step waits here until all nb have arrived (their
 * partials visible). Deadlock-free only while all nb blocks are resident
 * together: hc_fusable checks that they fit the GPU at once (occupancy at
 * create), and under programmatic dependent launch nothing can take their
 * place first — the successor launches only once every block of this grid
 * has passed pdl_wait (i.e. is resident), and the predecessor's blocks
 * finish without waiting on ours. The generation is read before arriving
 * (it can only move once every block has arrived); the last block resets
 * the counter for the next launch (one launch at a time: one stream, and a
 * step's barrier lies after its pdl_wait). Thread 0 only; the caller syncs
 * the block before and after. */
__device__ __forceinline__ void hc_grid_barrier(unsigned nb) {
    unsigned gen = *(volatile unsigned *)&d_hs_gen;
    __threadfence();
    if (atomicAdd(&d_hs_count, 1u) == nb - 1) {
        d_hs_count = 0;
        __threadfence();
        *(volatile unsigned *)&d_hs_gen = gen + 1;
    } else {
        while (*(volatile unsigned *)&d_hs_gen == gen) {}
    }
    __threadfence();
}

/* One decode token's whole hyper-connection step in one launch, instead of
 * up to five (the moe sum, k_hc_post, the mixer's k_matvec_wide, k_hc_pre,
 * k_rmsnorm), each of which left most of the GPU idle for a few µs:
 *  1. post (pm != NULL): this block's slice of X ← post_c·y + Σ_a comb[a][c]·X_a
 *     with the previous sublayer's output y (+ Σ_slot eout, slot order: the
 *     FFN's moe sum), k_hc_post's arithmetic, and its coefficients, derived
 *     from its mixer outputs pm (with its pscale, pbase) by hc_coeffs_early
 *     on the block's last warp before pdl_wait, while the other warps load
 *     the post's inputs (without PDL both overlap instead of adding up);
 *  2. split-K mixer: the mw mixer rows (F16 or F32) dotted with the block's
 *     slice of the flattened state, and the slice's Gram matrix of the
 *     streams G_cc' = Σ_k X_c[k]·X_c'[k] (double), as per-block partials;
 *  3. a grid barrier (hc_grid_barrier), then EVERY block sums the partials
 *     in block order — the same fixed order in every block and every run, so
 *     all blocks hold bit-identical sums and runs repeat bit for bit — and
 *     finishes its own slice: rms from the trace of G, pre from the mixer
 *     sums, h = Σ pre_c·X_c, and its norm from Σh² = Σ_cc' pre_c·pre_c'·G_cc'
 *     (no second barrier for the norm: the exact Σh², where the CPU sums the
 *     squares of the f32-rounded h — rounding apart); block 0 writes the
 *     mixer outputs over rms to mout (not for the head: mw = hc) for the
 *     next post. (The previous version let the last block finish alone:
 *     80 KiB of X through one SM and a block-wide norm; layer 0's step,
 *     no post, went 10.3 → 9.2 µs without PDL on the H100. Exchanging the
 *     partials as tagged 8-byte words polled by every thread, NCCL-LL
 *     style, instead of this barrier measured 2–3.5 µs slower a step.)
 * Grid: d / KB blocks of HS_BLOCK, KB = 256 / hc: block b owns positions
 * k ∈ [b·KB, b·KB + KB) of every stream, i.e. 256 values of X, thread i < 256
 * value X_{i/KB}[b·KB + i % KB]; for the mixer, lane l of warp w < 8 the 8
 * values of stream l / (KB/8) at b·KB + 8·(l % (KB/8)) and the rows w, w + 8,
 * w + 16 (hc ≤ 4: mw ≤ 24); for the Gram matrix, thread i position i % KB
 * and the entries j ≡ i / KB (mod hc); d ≤ HS_MAX_D. The partials and the
 * barrier are device globals: one launch at a time uses them. */
__global__ void __launch_bounds__(HS_BLOCK)
k_hc_step(float *X, int64_t d, int hc, const float *pm, const float *pscale, const float *pbase, const float *y,
          const float *eout, int used, int wtype, const uint8_t *__restrict__ W, uint64_t rb, int mw,
          const float *scale, const float *base, int iters, float hc_eps, float rms_eps, const float *nw, float *mout,
          float *nrm) {
    __shared__ __align__(16) float xs[HS_THREADS];
    __shared__ float ms[HS_ROWS * 8], mp[HC_EARLY_SCRATCH], c[(2 + MAX_HC) * MAX_HC];
    __shared__ double gw[HS_THREADS / 32][HS_ROWS], gs[HS_PAIRS];
    int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5, nb = gridDim.x;
    bool slice = tid < HS_THREADS;   /* warps 0–7; warp 8 derives the post's coefficients */
    int kb = HS_THREADS / hc, per = kb / 8, a = lane / per, np = hc * (hc + 1) / 2;
    int64_t k0 = (int64_t)blockIdx.x * kb, col = a * d + k0 + 8 * (lane % per);
    /* The mixer weights do not depend on the previous kernel: their loads
     * are issued before pdl_wait and overlap its tail (the one exception to
     * waiting first: nothing is written, and nobody returns, before it). */
    float4 wa[HS_ROWS], wb[HS_ROWS];
#pragma unroll
    for (int j = 0; j < HS_ROWS; j++)
        if (slice && wid + 8 * j < mw) ld8w(wtype, W + (uint64_t)(wid + 8 * j) * rb, col / 8, &wa[j], &wb[j]);
    if (pm && !slice) hc_coeffs_early(pm, pscale, pbase, hc, iters, hc_eps, mp, c);
    pdl_wait();
    /* 1: the inputs of this thread's X_ci[k] in registers (and what the
     * step's end needs, so no load waits behind the barrier: threads i < KB
     * end it at position k0 + i, with pre's scale and base) */
    int ci = tid / kb;
    int64_t k = k0 + tid % kb;
    float yk = 0, old[4] = {0, 0, 0, 0}, nwk = 0, sc0 = 0, bs[4] = {0, 0, 0, 0};
    if (slice) {
        if (pm) {
            yk = y[k];
            if (eout) {   /* slot order; 8 loads in flight at a time */
                float acc = 0;
                for (int i0 = 0; i0 < used; i0 += 8) {
                    float e[8];
#pragma unroll
                    for (int j = 0; j < 8; j++) e[j] = i0 + j < used ? eout[(int64_t)(i0 + j) * d + k] : 0.0f;
#pragma unroll
                    for (int j = 0; j < 8; j++)
                        if (i0 + j < used) acc += e[j];
                }
                yk = acc + yk;
            }
#pragma unroll
            for (int i = 0; i < 4; i++)   /* hc ≤ 4; guards keep it in registers */
                if (i < hc) old[i] = X[i * d + k];
        } else {
            old[0] = X[ci * d + k];
        }
        if (tid < kb) {
            nwk = __ldg(nw + k);
            sc0 = __ldg(scale);
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (i < hc) bs[i] = __ldg(base + i);
        }
    }
    __syncthreads();   /* c ready; every old X read before any is overwritten */
    if (slice) {
        float v = old[0];
        if (pm) {
            const float *post = c + hc, *C = c + 2 * hc;
            v = post[ci] * yk;
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (i < hc) v += C[i * hc + ci] * old[i];
            X[ci * d + k] = v;
        }
        xs[tid] = v;
    }
    __syncthreads();
    /* 2: per-block partials of the mixer dots and of the Gram matrix */
    if (slice) {
        const float4 *xp = (const float4 *)(xs + a * kb + 8 * (lane % per));
        float4 x0 = xp[0], x1 = xp[1];
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
        /* a group of KB/32 warps per j mod hc: ≤ ⌈(hc+1)/2⌉ ≤ HS_ROWS entries a warp */
        int g = tid / kb, p = tid % kb;
#pragma unroll
        for (int i = 0; i < HS_ROWS; i++) {
            int j = g + hc * i, c1, c2;
            if (j >= np) break;
            hc_pair(j, hc, c1, c2);
            double q = warp_sum_d((double)xs[c1 * kb + p] * xs[c2 * kb + p]);
            if (!lane) gw[wid][i] = q;
        }
    }
    __syncthreads();
    if (tid < np) {   /* the group's warps in order */
        int g = tid % hc, i = tid / hc, wg = kb / 32;
        double s = 0;
        for (int w = g * wg; w < (g + 1) * wg; w++) s += gw[w][i];
        d_hs_gram[tid * nb + blockIdx.x] = s;
    }
    __syncthreads();
    if (tid == 0) hc_grid_barrier((unsigned)nb);
    __syncthreads();
    /* 3: the sums every block needs (block 0 also the other mixer rows for
     * mout): value v = mixer row v (v < nv) or Gram entry v − nv, warp
     * v % 9; each lane adds blocks lane and lane + 32, then the warp's tree.
     * All loads first (one L2 round trip), through L2: other SMs wrote them. */
    bool wm = mout && blockIdx.x == 0;
    int nv = wm ? mw : hc;
    float pf[HS_SUMS][2];
    double pd[HS_SUMS][2];
#pragma unroll
    for (int i = 0; i < HS_SUMS; i++) {
        int v = wid + (HS_BLOCK / 32) * i;
        pf[i][0] = pf[i][1] = 0.0f;
        pd[i][0] = pd[i][1] = 0.0;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int b = lane + 32 * h;
            if (b >= nb) continue;
            if (v < nv) pf[i][h] = __ldcg(d_hs_part + v * nb + b);
            else if (v < nv + np) pd[i][h] = __ldcg(d_hs_gram + (v - nv) * nb + b);
        }
    }
#pragma unroll
    for (int i = 0; i < HS_SUMS; i++) {
        int v = wid + (HS_BLOCK / 32) * i;
        if (v < nv) {
            float s = warp_sum(pf[i][0] + pf[i][1]);
            if (!lane) ms[v] = s;
        } else if (v < nv + np) {
            double s = warp_sum_d(pd[i][0] + pd[i][1]);
            if (!lane) gs[v - nv] = s;
        }
    }
    __syncthreads();
    if (tid >= kb) return;
    /* 4: rms, pre, the norm's Σh² and this block's slice of nrm */
    double tr = 0;
    for (int i = 0; i < hc; i++) tr += gs[i * hc - i * (i - 1) / 2];   /* G_ii: Σx² of stream i */
    float rms = (float)sqrt(tr / (double)(hc * d) + rms_eps);
    if (wm && tid < mw) mout[tid] = ms[tid] / rms;   /* the next post derives its coefficients from these */
    float pre[4];
#pragma unroll
    for (int i = 0; i < 4; i++) pre[i] = i < hc ? sigmoidf_d(ms[i] / rms * sc0 + bs[i]) + hc_eps : 0.0f;
    double hh = 0;
    int j = 0;
#pragma unroll
    for (int c1 = 0; c1 < 4; c1++)
#pragma unroll
        for (int c2 = c1; c2 < 4; c2++)
            if (c2 < hc) {
                double t = (double)pre[c1] * pre[c2] * gs[j++];
                hh += c1 == c2 ? t : 2.0 * t;
            }
    float r = (float)(1.0 / sqrt(hh / (double)d + rms_eps)), h = 0;
#pragma unroll
    for (int i = 0; i < 4; i++)
        if (i < hc) h += pre[i] * xs[i * kb + tid];
    nrm[k0 + tid] = h * r * nwk;
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
    __shared__ float mp[HC_EARLY_SCRATCH], cs[(2 + MAX_HC) * MAX_HC];
    if (pm && threadIdx.x < 32) hc_coeffs_early(pm, pscale, pbase, hc, iters, hc_eps, mp, cs);
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

__global__ void k_test_hc(const float *mix, const float *scale, const float *base, int hc, int iters, float eps,
                          float *out) {
    pdl_wait();
    if (threadIdx.x > 0) return;
    if (hc <= 4) hc_coeffs_reg(mix, scale, base, hc, iters, eps, out, out + hc, out + 2 * hc);
    else hc_coeffs(mix, scale, base, hc, iters, eps, out, out + hc, out + 2 * hc);
}

#endif
