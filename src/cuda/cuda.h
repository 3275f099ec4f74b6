/* CUDA backend (spec model.md §3–§7 on one GPU).
 *
 * The backend itself is reached through the vtable ds4_backend_cuda
 * (engine/backend.h). This header adds the kernel-level entry points that
 * tools/ds4-gpucheck compares against the CPU reference: each uploads its
 * inputs, poisons the output with NaN, runs the very kernel the forward pass
 * uses, and downloads the result. All return 0, or -1 with a message. */
#ifndef DS4_CUDA_H
#define DS4_CUDA_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "engine/backend.h"

extern const ds4_backend_ops ds4_backend_cuda;

/* y[r] = dot(row r of w, x) for rows < n_rows, rows of n_in values of `type`. */
int ds4_cuda_test_matvec(int type, const void *w, int64_t n_in, int64_t n_rows, const float *x, float *y,
                         char *err, size_t errlen);
/* x (n values, n ≤ 1024, multiple of 64 / power of two) through the FP8
 * (fp4 = false) or Hadamard+FP4 (fp4 = true) simulation, in place. */
int ds4_cuda_test_qat(float *x, int n, bool fp4, char *err, size_t errlen);
/* Indices of the k best of n scores (higher wins, lowest index on ties),
 * ascending: the indexer's selection. */
int ds4_cuda_test_topk(const float *score, int64_t n, int64_t k, int32_t *out, char *err, size_t errlen);
/* HC coefficients (pre hc, post hc, comb hc×hc) from raw mixer outputs
 * already divided by rms (as cpu_hc_coeffs). */
int ds4_cuda_test_hc_coeffs(const float *mix, const float *scale, const float *base, int hc, int iters, float eps,
                            float *pre, float *post, float *comb, char *err, size_t errlen);

/* ---- attn (prefill attention, src/cuda/attn.cuh) ----
 * attn_chunk on host inputs: q T×H×hd, kvc T×hd (the chunk's rows), raw ring
 * keep_raw×hd, comp n_comp×hd, sel T×topk (NULL unless ratio 4), sinks H,
 * freq rd/2 doubles; o T×H×hd. H 64, hd 512, rd 64 only. */
int ds4_cuda_test_attn(const float *q, const float *kvc, const float *raw, uint32_t keep_raw, uint32_t window,
                       const float *comp, int64_t n_comp, const int32_t *sel, int ratio, int64_t topk,
                       const float *sinks, int H, int hd, int rd, const double *freq, float scale, uint32_t p0,
                       int64_t T, float *o, char *err, size_t errlen);
/* idx_scores_chunk on host inputs: iq T×ih×ihd, iw T×ih, rows n_rows×ihd;
 * score T×ld (entries c ≥ (p0+t+1)/4 are left as NaN). ih 64, ihd 128 only. */
int ds4_cuda_test_idx_scores(const float *iq, const float *iw, const float *rows, int64_t n_rows, uint32_t p0,
                             int64_t T, int ih, int ihd, float *score, int64_t ld, char *err, size_t errlen);
/* Median ms of `reps` launches of attn_chunk (idx false; ratio 0/4/128,
 * window 128, topk 512) or idx_scores_chunk (idx true) at T tokens from p0
 * on random device data, and the flop count of one launch. */
int ds4_cuda_bench_attn(bool idx, int ratio, uint32_t p0, int64_t T, int reps, double *ms, double *flops,
                        char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
