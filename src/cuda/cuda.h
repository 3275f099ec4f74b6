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

/* Start / stop an attached profiler's collection (ncu --profile-from-start off). */
void ds4_cuda_profiler(bool on);
/* eval_top's two passes over one row x of n logits: *top (ds4_argmax's rule)
 * and keep, the row's copy. */
int ds4_cuda_test_top(const float *x, int n, float *keep, int32_t *top, char *err, size_t errlen);
/* y[r] = dot(row r of w, x) for rows < n_rows, rows of n_in values of `type`. */
int ds4_cuda_test_matvec(int type, const void *w, int64_t n_in, int64_t n_rows, const float *x, float *y,
                         char *err, size_t errlen);
/* Two Q8_0 matrices (GGUF rows: ra, rb rows of n_in) times one x in one
 * launch, as decode's attn_q_a + attn_kv: ya (ra values), yb (rb values). */
int ds4_cuda_test_matvec2(const void *wa, int64_t ra, const void *wb, int64_t rb, int64_t n_in, const float *x,
                          float *ya, float *yb, char *err, size_t errlen);
/* Decode's q_b launch with k_qa_kv's work for one token in it (k_qb)
 * against the two launches it replaces (k_qa_kv, then q_b by launch_rp), on
 * the same inputs with every output poisoned (NaN) before each: w the Q8_0
 * q_b (GGUF rows: rows × ql), qraw the raw q_a (ql), kvraw the raw K=V row
 * (hd), qw / kw their norm weights, RoPE of the row's last rd values at
 * position pos (freq: rd/2 values), ring of keep rows of hd (slot pos %
 * keep written). Outputs y (rows), qa (normed q_a), kv, ring: *_ref the old
 * launches, the others k_qb. */
int ds4_cuda_test_qb(const void *w, int64_t rows, int64_t ql, int64_t hd, int rd, const float *qraw, const float *kvraw,
                     const float *qw, const float *kw, const double *freq, uint32_t pos, float eps, uint32_t keep,
                     float *y_ref, float *qa_ref, float *kv_ref, float *ring_ref, float *y, float *qa, float *kv,
                     float *ring, char *err, size_t errlen);
/* Routed slots as a decode step runs them: E slabs of rows × n_in of a
 * repacked type (Q8_0, Q2_K, IQ2_XXS), slot i < used on expert eid[i].
 * wu != NULL (GLU): y[i·rows + r] = swiglu(g, u, clamp)·ew[i] with g, u the
 * rows of wg, wu times x (n_in values); else y[i·rows + r] = row r of
 * expert eid[i] of wg times x + i·n_in (ew, clamp unused). nr: rows a
 * warp as for ds4_cuda_mv_bench (0: the backend's choice). */
int ds4_cuda_test_matvec_slots(int type, const void *wg, const void *wu, int64_t n_in, int64_t rows, int E, int used,
                               const int32_t *eid, const float *ew, float clamp, const float *x, float *y, int nr,
                               char *err, size_t errlen);
/* One dense matrix of a repacked type (GGUF rows: rows × n_in) times
 * grouped x as decode's matvec_g (attn_output_a): row r reads
 * x + (r / (rows / groups))·n_in (groups 1: one x); nr as for
 * ds4_cuda_mv_bench (0: the backend's choice). */
int ds4_cuda_test_matvec_g(int type, const void *w, int64_t n_in, int64_t rows, int groups, const float *x, float *y,
                           int nr, char *err, size_t errlen);
/* Decode's router launch and the shared expert as ffn_layer runs them: F16
 * router rows wr (E × n_in) times x, biased top-`used` routing (bias: E
 * values or NULL, no hash rows) into eid / ew (norm, wscale as the model's
 * expert_weights_*); with wg, wu, wd (Q8_0 GGUF rows: gate and up ff ×
 * n_in, down n_in × ff) also sg = swiglu(gate·x, up·x) (ff values, clamp;
 * in the router's launch) and y = down·sg (n_in values, the next launch). */
int ds4_cuda_test_router_shared(const void *wr, int E, int used, const float *bias, bool norm, float wscale,
                                const void *wg, const void *wu, const void *wd, int64_t ff, int64_t n_in,
                                const float *x, float clamp, int32_t *eid, float *ew, float *sg, float *y, char *err,
                                size_t errlen);
/* Mean µs of one decode matvec launch on random weights read from DRAM:
 * slots × (rows × n_in) of a repacked type (slots 1, !glu: one dense
 * matrix; groups > 1: x grouped as ds4_cuda_test_matvec_g), glu = gate and
 * up pairs; nr rows a warp: 1, 2, 4 = k_mv_rp (+ 10·KS: KS warps a row
 * group, + 100: no L2 prefetch), −1, −2, −4 = k_mv_sx (IQ2_XXS, Q2_K; GLU
 * up to 2), −8 … −32 = k_mv_tc, 0 = the backend's choice; median of iters
 * runs. */
int ds4_cuda_mv_bench(int type, int64_t n_in, int64_t rows, int slots, int groups, bool glu, int nr, int iters,
                      uint64_t seed, double *us, char *err, size_t errlen);
/* Decode's F16 products (k_mv_f16x): nseg ≤ 6 matrices, matrix i rows[i] ×
 * (xi[i] ? n1 : n0) F16 values against x1 or x0; y the outputs in order. */
int ds4_cuda_test_matvec_f16x(int nseg, const uint16_t *const *w, const int64_t *rows, const int *xi,
                              const float *x0, int64_t n0, const float *x1, int64_t n1, float *y, char *err,
                              size_t errlen);
/* One compressor's decode step (spec §4.5) for ds4_cuda_test_comp_idx. */
typedef struct {
    int D, R, lanes;
    uint32_t keep;              /* ring slots */
    bool indexer;               /* Hadamard + FP4, else FP8 on 0 … D−rd */
    const float *pk, *pg;       /* the token's kv and gate products, lanes·D each */
    const uint16_t *ape;        /* R rows of lanes·D F16 */
    const float *norm_w;        /* D */
    float *rkv, *rg;            /* in/out: keep × lanes·D */
    float *rows;                /* out: ((pos+1)/R + 1) × D, poisoned but the emitted row */
} ds4_cuda_comp_case;
/* Decode's k_comp_idx at pos: steps a and b (b may be NULL), then ih
 * indexer query heads of ihd (RoPE on the last rd, Hadamard + FP4) and
 * their weights × wscale, in place (ih 0: none). */
int ds4_cuda_test_comp_idx(ds4_cuda_comp_case *a, ds4_cuda_comp_case *b, uint32_t pos, int rd, const double *freq,
                           float eps, int ih, int ihd, float *iq, float *iw, float wscale, char *err, size_t errlen);
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
/* Decode's fused HC step (k_hc_step) on one token state X (hc·d, updated
 * in place): with pm, first the post of y (+ Σ of `used` eout rows of d
 * when eout) with the coefficients of mixer outputs pm ((2+hc)·hc, over
 * rms) and pscale, pbase; then the mixer w (F16/F32, mw rows of hc·d:
 * (2+hc)·hc, head: hc), its outputs over rms into mout (not for head), and
 * nrm = rmsnorm(Σ pre_a·X_a)·nw. hc 1, 2 or 4, d ≤ 4096 a multiple of 256/hc. */
int ds4_cuda_test_hc_step(int hc, int64_t d, int wtype, const void *w, const float *scale, const float *base,
                          int iters, float hc_eps, float rms_eps, const float *nw, float *X, const float *pm,
                          const float *pscale, const float *pbase, const float *y, const float *eout, int used,
                          bool head, float *mout, float *nrm, char *err, size_t errlen);

/* ---- mm (prefill GEMM, src/cuda/mm.cuh) ----
 * y[t·nr + (r − r0)] = Σ_k W[r][k]·x[t][k] for the n rows of W (M rows of
 * K, GGUF layout) r0 ≤ r < r0+nr, t < T; x rows at x + t·ldx (ldx ≥ K + 32:
 * the product reads a 32-column-shifted f16 copy, so ldx > K and an offset
 * start are exercised). */
int ds4_cuda_test_mm_dense(int type, const void *w, int64_t K, int64_t M, int64_t r0, int64_t nr, const float *x,
                           int64_t ldx, int64_t T, float *y, char *err, size_t errlen);
/* Grouped product (the attention output): W of G·gl rows × K; x T rows of
 * G·K; y[t·G·gl + r] = Σ_k W[r][k]·x[t][(r / gl)·K + k]. */
int ds4_cuda_test_mm_groups(int type, const void *w, int64_t K, int64_t G, int64_t gl, const float *x, int64_t T,
                            float *y, char *err, size_t errlen);
/* mm_prep of T rows of K at x + t·ldx: xh (T·K f16 bits), xs (T scales). */
int ds4_cuda_test_mm_prep(const float *x, int64_t ldx, int64_t T, int64_t K, uint16_t *xh, float *xs, char *err,
                          size_t errlen);
/* Routed experts of a chunk: wg, wu E slabs of ff × d (type tgu), wd E slabs
 * of d × ff (type td); eid/ew T·used. Out: perm (sorted position → a), g
 * (T·used × ff, sorted rows: swiglu · ew), out (T·used × d: Wd_e · gin[j] at
 * row a; gin given in sorted order). */
int ds4_cuda_test_mm_experts(int tgu, const void *wg, const void *wu, int td, const void *wd, int64_t d, int64_t ff,
                             int E, int used, int64_t T, const int32_t *eid, const float *ew, float clamp,
                             const float *x, const float *gin, int32_t *perm, float *g, float *out, char *err,
                             size_t errlen);
/* Median time (ms, of `iters` after 3 warm-ups) of one product on random
 * weights and activations (never zeros): mode 0 mm_dense M×K, T tokens;
 * mode 1 mm_experts_glu (E experts of M×K gate and up, T tokens × used,
 * uniform routing); mode 2 mm_experts_down (E experts of M×K); mode 3
 * mm_prep of T rows of K (M, E, used unused); mode 4 mm_dense_groups, 8
 * groups of M/8 rows × K, x rows of 8·K. */
int ds4_cuda_mm_bench(int type, int64_t K, int64_t M, int64_t T, int mode, int E, int used, int iters, uint64_t seed,
                      double *ms, char *err, size_t errlen);
/* ---- attn (prefill attention, src/cuda/attn.cuh) ----
 * attn_chunk on host inputs: q T×H×hd, kvc T×hd (the chunk's rows), raw ring
 * keep_raw×hd, comp n_comp×hd, sel T×topk (NULL unless ratio 4), sinks H,
 * freq rd/2 doubles; o T×H×hd. H 64, hd 512, rd 64 only. */
int ds4_cuda_test_attn(const float *q, const float *kvc, const float *raw, uint32_t keep_raw, uint32_t window,
                       const float *comp, int64_t n_comp, const int32_t *sel, int ratio, int64_t topk,
                       const float *sinks, int H, int hd, int rd, const double *freq, float scale, uint32_t p0,
                       int64_t T, float *o, char *err, size_t errlen);
/* The f32 attention of decode (and of chunks without attn_chunk) on host
 * inputs, shapes as ds4_cuda_test_attn but any H, hd a multiple of 128 ≤
 * 1024, rd < hd; T ≤ 64 tokens at positions p0 … p0+T−1. */
int ds4_cuda_test_attn_f32(const float *q, const float *kvc, const float *raw, uint32_t keep_raw, uint32_t window,
                           const float *comp, int64_t n_comp, const int32_t *sel, int ratio, int64_t topk,
                           const float *sinks, int H, int hd, int rd, const double *freq, float scale, uint32_t p0,
                           int64_t T, float *o, char *err, size_t errlen);
/* idx_scores_chunk on host inputs: iq T×ih×ihd, iw T×ih, rows n_rows×ihd;
 * score T×ld (entries c ≥ (p0+t+1)/4 are left as NaN). ih 64, ihd 128 only. */
int ds4_cuda_test_idx_scores(const float *iq, const float *iw, const float *rows, int64_t n_rows, uint32_t p0,
                             int64_t T, int ih, int ihd, float *score, int64_t ld, char *err, size_t errlen);
/* The indexer scores of decode (k_idx_scores, f32, any ih and ihd), same
 * arguments; T ≤ 64. */
int ds4_cuda_test_idx_scores_f32(const float *iq, const float *iw, const float *rows, int64_t n_rows, uint32_t p0,
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
