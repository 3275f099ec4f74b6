/* Weight formats of the published DS4 GGUFs (spec model.md §8): F32, F16,
 * Q8_0, Q2_K, Q4_K, IQ2_XXS, I32 — dequantisation, fused row dot products,
 * and quantisers (so tools can write q2/q4 files from float weights).
 *
 * The CPU reference multiplies weights by f32 activations: every dot product
 * below dequantises a row on the fly and accumulates in f32 in a fixed order,
 * so results do not depend on threading. (antirez/ds4 instead quantises
 * activations to Q8_0/Q8_K for integer dots — spec §10 row 6; the GPU backend
 * may do the same, and is checked against these within its precision.) */
#ifndef DS4_QUANT_H
#define DS4_QUANT_H
#include <stddef.h>
#include <stdint.h>

#include "gguf/gguf.h"

/* IEEE half <-> float, round to nearest even, subnormals and inf/nan kept. */
float ds4_f16_to_f32(uint16_t h);
uint16_t ds4_f32_to_f16(float f);
/* Round a float through f16 and back (used for KV rows, spec §7.1). */
float ds4_round_f16(float f);

/* Rows: `type` is F32, F16, Q8_0, Q2_K, Q4_K or IQ2_XXS and n a multiple of
 * its block size (1, 32 or 256). Shapes come from validated GGUF headers, so
 * anything else is a caller bug: it aborts with a message. */

/* n elements of a row of `type` -> f32. */
void ds4_dequant_row(ggml_type type, const void *row, float *out, int64_t n);

/* sum_i dequant(row)[i] * x[i], f32 accumulation in a fixed order:
 * element i goes into lane i mod 32 by fmaf (lanes start at +0), then the
 * lanes fold pairwise (j += j+16, +8, +4, +2, +1). Identical bits with or
 * without AVX2, and exactly ds4_dot_f32(dequant(row), x). */
float ds4_dot_row(ggml_type type, const void *row, const float *x, int64_t n);

/* The same ordered dot over two f32 vectors (any n). */
float ds4_dot_f32(const float *a, const float *b, int64_t n);

/* y[r] = dot(row r, x) for rows [r0, r1) of a row-major weight with n_in
 * columns (rows of ggml_row_bytes(type, n_in) bytes). y is indexed by the
 * absolute row r, so threads given disjoint [r0, r1) share one y. */
void ds4_matvec_rows(ggml_type type, const void *w, int64_t n_in, int64_t r0, int64_t r1,
                     const float *x, float *y);

/* Batched form for prefill: for t < n_tok and r in [r0, r1),
 * y[t*y_stride + r] = ds4_dot_row(row r, x + t*x_stride) bit for bit; each
 * weight row is dequantised once and reused for every token. */
void ds4_matmul_rows(ggml_type type, const void *w, int64_t n_in, int64_t r0, int64_t r1,
                     const float *x, int64_t n_tok, int64_t x_stride, float *y, int64_t y_stride);

/* Quantise n floats into `type` blocks (deterministic). importance (n
 * values, may be NULL) weights the squared error the K-quants and IQ2_XXS
 * minimise per block; without it the weight is σ² + x² (σ² = mean x² of the
 * sub-block: emphasis on large weights without ignoring small ones). F32/F16
 * are plain conversions (f16: round to nearest even). Non-finite input gives
 * garbage in its own block only, never a crash.
 * Relative RMS error on N(0,1) data: Q8_0 0.54 %, Q4_K 7.2 %, Q2_K 28 %,
 * IQ2_XXS 34 %. */
void ds4_quantize_row(ggml_type type, const float *x, void *out, int64_t n, const float *importance);

/* IQ2_XXS tables (public definition, llama.cpp ggml-common.h), as numbers. */
extern const uint64_t ds4_iq2xxs_grid[256];
extern const uint8_t ds4_ksigns_iq2xs[128];

#endif
