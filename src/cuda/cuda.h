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

#ifdef __cplusplus
}
#endif
#endif
