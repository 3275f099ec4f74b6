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

__global__ void k_test_hc(const float *mix, const float *scale, const float *base, int hc, int iters, float eps,
                          float *out) {
    pdl_wait();
    if ((hc & (hc - 1)) == 0 && hc * hc <= 32) hc_coeffs_warp(mix, scale, base, hc, iters, eps, out, out + hc, out + 2 * hc);
    else if (threadIdx.x == 0) hc_coeffs(mix, scale, base, hc, iters, eps, out, out + hc, out + 2 * hc);
}

#endif
