/* CPU reference backend: the ground truth every GPU kernel is checked against.
 *
 * Implements spec model.md §3–§7 literally, in f32, with a fixed accumulation
 * order everywhere. Work is split across threads only by independent outputs
 * (weight rows, (token, head) pairs, indexer rows, experts' rows) — a reduction
 * is never split — so results are bit-identical for any thread count, and the
 * same per-row dot routine serves a chunk of 1 (decode) and a chunk of many
 * (prefill), so chunked prefill and token-by-token decode agree exactly.
 *
 * Every dot product is ds4_dot_f32 / ds4_matmul_rows (src/quant): one fixed
 * fma order, identical for a weight row dotted in decode or in prefill.
 * Numeric building blocks are exported (cpu_*) for unit tests. */
#ifndef DS4_CPU_H
#define DS4_CPU_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/backend.h"
#include "model/model.h"

/* ---- Thread pool ---------------------------------------------------------
 * cpu_pool_run(pool, n, fn, ctx) calls fn(ctx, i0, i1, tid) on static
 * contiguous ranges of [0, n), one per thread (tid 0 is the caller), and
 * returns when all are done. */
typedef struct cpu_pool cpu_pool;
typedef void (*cpu_task_fn)(void *ctx, int64_t i0, int64_t i1, int tid);
cpu_pool *cpu_pool_new(int n_threads);
void cpu_pool_free(cpu_pool *p);
int cpu_pool_threads(const cpu_pool *p);
void cpu_pool_run(cpu_pool *p, int64_t n, cpu_task_fn fn, void *ctx);
/* n_threads <= 0: DS4_THREADS from the environment, else all online cores. */
int cpu_default_threads(int n_threads);

/* ---- Numeric building blocks (kernels.c) -------------------------------- */
/* out = v / sqrt(mean(v²) + eps) ⊙ w (w may be NULL: unweighted). Sum of
 * squares in double (ds4). out may alias v. */
void cpu_rmsnorm(const float *v, const float *w, int64_t n, float eps, float *out);
/* E4M3FN round to nearest, ties to even, of a value already clamped to ±448. */
float cpu_e4m3_round(float x);
/* FP8 KV simulation (spec §3.3) on n values (n multiple of 64), in place. */
void cpu_fp8_sim(float *x, int64_t n);
/* E2M1 magnitude rounding of |x| ≤ 6 to {0,.5,1,1.5,2,3,4,6}, ties to the even code. */
float cpu_e2m1_round(float x);
/* Walsh–Hadamard (Sylvester order) times 1/sqrt(n), n a power of two, in place. */
void cpu_hadamard(float *x, int64_t n);
/* Hadamard + FP4 simulation in blocks of 32 (spec §3.4), in place. */
void cpu_fp4_sim(float *x, int64_t n);
/* 2^ceil(log2(v)) for v > 0, computed exactly (frexp, no log2f rounding). */
float cpu_pow2_ceil(float v);
/* RoPE frequencies for rope_dim/2 pairs: plain (base^(-2k/rope_dim)) or with
 * the YaRN blend of spec §3.2 (no magnitude factor). lo/hi (may be NULL)
 * receive the YaRN ramp bounds. */
void cpu_rope_freqs(const ds4_hparams *hp, bool yarn, double *freq, int *lo, int *hi);
/* Rotate interleaved pairs of x[0..2·n_pairs) by ±pos·freq[k]. */
void cpu_rope(float *x, int n_pairs, const double *freq, int64_t pos, bool inverse);
/* HC coefficients from the (2+hc)·hc raw mixer outputs already divided by rms:
 * pre (hc), post (hc), comb (hc×hc, [src][dst]) after Sinkhorn (spec §4.2). */
void cpu_hc_coeffs(const float *mix, const float *scale, const float *base, int hc, int iters,
                   float eps, float *pre, float *post, float *comb);
/* Router score sqrt(softplus(z)) (spec §3.6). */
float cpu_router_score(float z);
/* Clamped SwiGLU (spec §3.6). */
float cpu_swiglu(float g, float u, float clamp);
/* Attention of one query over n rows (value = key) with a sink logit, spec §3.5.
 * scores: n floats of scratch. */
void cpu_attend(const float *q, const float *const *rows, int64_t n, int64_t dim, float scale,
                float sink, float *scores, float *out);
/* Indices of the k best scores (higher wins, lowest index on ties), returned
 * ascending; k <= n. heap: k ints of scratch. */
void cpu_topk(const float *score, int64_t n, int64_t k, int32_t *out);

/* ---- Diagnostics (read once per backend create; never set in normal use) ---
 * They exist to tell numerical sensitivity from a bug when two backends
 * disagree on a deep random model (tools/gpu/NOTES.md "drift"):
 *  DS4_DIAG_EXACT_KV=1   skip the FP8/FP4 QAT simulations and the f16
 *                        rounding of KV / compressed / indexer rows and
 *                        indexer queries (both backends honour it), so the
 *                        only discontinuities left are top-k choices;
 *  DS4_DIAG_PERTURB=eps  (CPU only) scale each embedding value by
 *                        1 ± eps (a fixed hashed sign per position and
 *                        element): a CPU-vs-CPU run shows how the model
 *                        amplifies an f32-rounding-sized difference. */
bool cpu_diag_exact_kv(void);
float cpu_diag_perturb(void);
void cpu_diag_perturb_row(float *x, int64_t n, uint32_t pos, float eps);

/* ---- Backend --------------------------------------------------------------- */
typedef struct cpu_backend cpu_backend;
typedef struct cpu_state cpu_state;

cpu_backend *cpu_backend_new(const ds4_model *m, int n_threads, char *err, size_t errlen);
void cpu_backend_free(cpu_backend *be);
int cpu_backend_threads(const cpu_backend *be);

cpu_state *cpu_state_new(cpu_backend *be, uint32_t ctx, char *err, size_t errlen);
void cpu_state_free(cpu_state *st);
uint32_t cpu_state_len(const cpu_state *st);
/* Bytes of KV state in use (the logical rows of engine/backend.h) and
 * allocated (rings, compressed-row capacity for ctx). */
void cpu_state_bytes(const cpu_state *st, uint64_t *in_use, uint64_t *allocated);

/* Evaluate n tokens at positions len … len+n−1. logits: n_vocab floats for
 * the last token, or n × n_vocab when all_logits (may be NULL). hc_last
 * (may be NULL) receives the final hyper-connection state (hc × n_embd) of
 * the last token, the MTP block's input. */
int cpu_eval(cpu_backend *be, cpu_state *st, const int32_t *ids, size_t n, float *logits, bool all_logits,
             float *hc_last, char *err, size_t errlen);
int cpu_truncate(cpu_backend *be, cpu_state *st, uint32_t n, char *err, size_t errlen);
int cpu_export(cpu_backend *be, const cpu_state *st, ds4_kv_host *out, char *err, size_t errlen);
int cpu_import(cpu_backend *be, cpu_state *st, const ds4_kv_host *in, char *err, size_t errlen);

/* Introspection for tests: rows held by layer il (attention-compressed and
 * indexer), and for the last evaluated token of a ratio-4 layer how many
 * compressed rows the indexer selected out of how many were visible. */
void cpu_state_rows(const cpu_state *st, int il, uint32_t *n_comp, uint32_t *n_idx);
void cpu_state_last_selection(const cpu_state *st, int il, uint32_t *selected, uint32_t *visible);

/* ---- MTP draft block (spec §6) ----------------------------------------------
 * Its own window-only KV (window + slack positions). cpu_mtp_draft fuses the
 * HC state H (hc × n_embd: the main model's last-token state, or the previous
 * draft's h_out) with the embedding of tok at the next MTP position, writes
 * the draft logits and the block's output HC state (h_out may be NULL). */
typedef struct cpu_mtp cpu_mtp;
cpu_mtp *cpu_mtp_new(cpu_backend *be, char *err, size_t errlen);
void cpu_mtp_free(cpu_mtp *m);
uint32_t cpu_mtp_len(const cpu_mtp *m);
int cpu_mtp_draft(cpu_backend *be, cpu_mtp *m, const float *h, int32_t tok, float *logits, float *h_out,
                  char *err, size_t errlen);
/* Roll the MTP window back to n positions (rejected drafts); exact or -1. */
int cpu_mtp_truncate(cpu_mtp *m, uint32_t n, char *err, size_t errlen);

#endif
