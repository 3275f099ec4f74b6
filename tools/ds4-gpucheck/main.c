/* ds4-gpucheck: the CUDA backend against the CPU reference, on a GPU machine.
 *
 *   ds4-gpucheck --kernels                 kernel checks on fresh random inputs
 *   ds4-gpucheck --mm-bench                prefill GEMM TFLOP/s at the model's shapes
 *   ds4-gpucheck --mv-bench [--mv-only S]  decode matvec GB/s at the model's shapes (names containing S)
 *   ds4-gpucheck --attn-bench              TFLOP/s of the prefill attention / indexer kernels
 *   ds4-gpucheck --model FILE [--tokens N] [--ctx C] [--bench T]
 *                                          whole-model comparison (+ decode timing)
 *
 * Kernel checks: every output is poisoned (NaN) before the kernel runs, the
 * error is ‖out − ref‖/‖ref‖ against the CPU reference function (src/quant,
 * src/cpu) on the same inputs, and a NaN anywhere fails. Bounds: 1e-5 for f32
 * dot products in another order, exact for the QAT simulations and the top-k
 * selection (same formulas, same ties rule).
 *
 * Model checks (random token ids): per-position logits CUDA vs CPU and argmax
 * agreement, per-layer state after the prompt (which component drifts first),
 * decode (f32 matvecs) vs the chunked prefill (f16 tensor-core products),
 * prefill in uneven pieces vs one chunk, rewind, graphs vs eager launches
 * (bit-identical: the kernels are deterministic), and snapshots crossing
 * backends in both directions.
 * Not part of the CI suite: CI has no GPU. Exit status 0 only if all pass. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu/cpu.h"
#include "ds4.h"
#include "quant/quant.h"

#ifndef DS4_CUDA
/* A CPU-only build (no nvcc) still builds every program: this one says why it
 * cannot run. */
int main(void) {
    fprintf(stderr, "ds4-gpucheck: built without CUDA (make CUDA=1 with nvcc present)\n");
    return 1;
}
#else
#include "cuda/cuda.h"

static int n_pass, n_fail;

static void verdict(const char *what, bool ok, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
#include <stdarg.h>
static void verdict(const char *what, bool ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%-4s %-44s ", ok ? "ok" : "FAIL", what);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    if (ok) n_pass++; else n_fail++;
}

/* ---- randomness: xorshift, seeded per run (printed) -------------------------- */
static uint64_t rs;
static uint64_t rnd(void) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return rs; }
static float frand(void) { return (float)((rnd() >> 11) * 0x1p-53 * 2.0 - 1.0); }

/* ‖a − b‖ / ‖b‖ in double; NaN in a (or b) gives NaN, which fails every bound. */
static double rel_err(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(b[i])) return NAN;
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}
static bool within(double e, double bound) { return !isnan(e) && e <= bound; }

/* ---- kernel checks ------------------------------------------------------------------ */

static void check_matvec(int type, const char *name, int64_t n_in, int64_t rows) {
    char err[256], what[64];
    uint64_t rb = ggml_row_bytes((uint32_t)type, (uint64_t)n_in);
    uint8_t *w = malloc(rb * rows);
    float *src = malloc(n_in * sizeof(float)), *x = malloc(n_in * sizeof(float));
    float *y = malloc(rows * sizeof(float)), *ref = malloc(rows * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < n_in; i++) src[i] = frand();
        ds4_quantize_row((ggml_type)type, src, w + r * rb, n_in, NULL);
    }
    for (int64_t i = 0; i < n_in; i++) x[i] = frand();
    for (int64_t r = 0; r < rows; r++) ref[r] = ds4_dot_row((ggml_type)type, w + r * rb, x, n_in);
    snprintf(what, sizeof what, "matvec %s %lldx%lld", name, (long long)rows, (long long)n_in);
    if (ds4_cuda_test_matvec(type, w, n_in, rows, x, y, err, sizeof err)) verdict(what, false, "%s", err);
    else {
        double e = rel_err(y, ref, rows);
        verdict(what, within(e, 1e-5), "rel %.3g (bound 1e-5)", e);
    }
    free(w); free(src); free(x); free(y); free(ref);
}

/* attn_q_a and attn_kv as decode launches them: two Q8_0 matrices of one x
 * in one launch (k_mv_q8x), each row against the CPU's dot. */
static void check_matvec2(int64_t n_in, int64_t ra, int64_t rb) {
    char err[256], what[64];
    uint64_t rowb = ggml_row_bytes(GGML_Q8_0, (uint64_t)n_in);
    uint8_t *w = malloc(rowb * (ra + rb));
    float *src = malloc(n_in * sizeof(float)), *x = malloc(n_in * sizeof(float));
    float *y = malloc((ra + rb) * sizeof(float)), *ref = malloc((ra + rb) * sizeof(float));
    for (int64_t r = 0; r < ra + rb; r++) {
        for (int64_t i = 0; i < n_in; i++) src[i] = frand();
        ds4_quantize_row(GGML_Q8_0, src, w + r * rowb, n_in, NULL);
    }
    for (int64_t i = 0; i < n_in; i++) x[i] = frand();
    for (int64_t r = 0; r < ra + rb; r++) ref[r] = ds4_dot_row(GGML_Q8_0, w + r * rowb, x, n_in);
    snprintf(what, sizeof what, "matvec2 Q8_0 (%lld+%lld)x%lld", (long long)ra, (long long)rb, (long long)n_in);
    if (ds4_cuda_test_matvec2(w, ra, w + ra * rowb, rb, n_in, x, y, y + ra, err, sizeof err)) verdict(what, false, "%s", err);
    else {
        double ea = rel_err(y, ref, ra), eb = rel_err(y + ra, ref + ra, rb);
        verdict(what, within(ea, 1e-5) && within(eb, 1e-5), "rel %.3g / %.3g (bound 1e-5)", ea, eb);
    }
    free(w); free(src); free(x); free(y); free(ref);
}

/* Decode's q_b launch with k_qa_kv's work (k_qb) against the old launches
 * (k_qa_kv, then q_b) on the same inputs: every output bit-identical (q_b's
 * rows, the normed q_a, the K=V row, the whole ring: its other slots stay
 * poisoned), and the old path's q_b rows near the CPU's dots of its normed
 * q_a (a check that both did not fail alike). */
static void check_qb(int64_t rows, int64_t ql, int64_t hd, int rd, uint32_t pos, uint32_t keep) {
    char err[256], what[80];
    uint64_t rowb = ggml_row_bytes(GGML_Q8_0, (uint64_t)ql);
    size_t rn = (size_t)keep * hd;
    uint8_t *w = malloc(rowb * rows);
    float *src = malloc(ql * sizeof(float)), *in = malloc((2 * ql + 2 * hd) * sizeof(float));
    float *o = malloc((2 * (rows + ql + hd + rn) + rows) * sizeof(float));
    double *freq = malloc((rd / 2) * sizeof(double));
    float *qr = in, *kr = in + ql, *qw = kr + hd, *kw = qw + ql;
    float *yr = o, *qar = yr + rows, *kvr = qar + ql, *ringr = kvr + hd;
    float *y = ringr + rn, *qa = y + rows, *kv = qa + ql, *ring = kv + hd, *cpu = ring + rn;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < ql; i++) src[i] = frand();
        ds4_quantize_row(GGML_Q8_0, src, w + r * rowb, ql, NULL);
    }
    for (int64_t i = 0; i < ql; i++) { qr[i] = 3.0f * frand(); qw[i] = 1.0f + 0.5f * frand(); }
    for (int64_t i = 0; i < hd; i++) { kr[i] = 2.0f * frand(); kw[i] = 1.0f + 0.5f * frand(); }
    for (int k = 0; k < rd / 2; k++) freq[k] = pow(10000.0, -2.0 * k / rd);
    snprintf(what, sizeof what, "qb %lldx%lld hd %lld rd %d pos %u keep %u", (long long)rows, (long long)ql,
             (long long)hd, rd, pos, keep);
    if (ds4_cuda_test_qb(w, rows, ql, hd, rd, qr, kr, qw, kw, freq, pos, 1e-6f, keep, yr, qar, kvr, ringr, y, qa, kv,
                         ring, err, sizeof err)) {
        verdict(what, false, "%s", err);
    } else {
        bool ey = !memcmp(y, yr, rows * sizeof(float)), eq = !memcmp(qa, qar, ql * sizeof(float));
        bool ek = !memcmp(kv, kvr, hd * sizeof(float)), er = !memcmp(ring, ringr, rn * sizeof(float));
        bool slot = !memcmp(ring + (size_t)(pos % keep) * hd, kv, hd * sizeof(float)), nan = true;
        for (size_t i = 0; i < rn; i++) nan = nan && (i / hd == pos % keep ? !isnan(ring[i]) : isnan(ring[i]));
        for (int64_t r = 0; r < rows; r++) cpu[r] = ds4_dot_row(GGML_Q8_0, w + r * rowb, qar, ql);
        double e0 = rel_err(yr, cpu, rows);
        verdict(what, ey && eq && ek && er && slot && nan && within(e0, 1e-5),
                "q_b %s, q_a %s, kv %s, ring %s (slot %s, others %s); old q_b vs cpu %.3g (1e-5)", ey ? "same" : "DIFFERS",
                eq ? "same" : "DIFFERS", ek ? "same" : "DIFFERS", er ? "same" : "DIFFERS", slot ? "= kv" : "WRONG",
                nan ? "NaN" : "WRITTEN", e0);
    }
    free(w); free(src); free(in); free(o); free(freq);
}

/* Decode's F16 products of one layer (k_mv_f16x): nseg matrices of two
 * inputs in one launch, each row against the CPU's dot. */
static void check_matvec_f16x(int nseg, const int64_t *rows, const int *xi, int64_t n0, int64_t n1) {
    char err[256], what[96];
    uint16_t *w[6];
    int64_t tot = 0, nn[2] = {n0, n1};
    float *x[2] = {malloc(n0 * sizeof(float)), malloc((n1 ? n1 : 1) * sizeof(float))};
    for (int i = 0; i < 2; i++)
        for (int64_t k = 0; k < nn[i]; k++) x[i][k] = frand();
    for (int i = 0; i < nseg; i++) {
        int64_t n = nn[xi[i]];
        w[i] = malloc(rows[i] * n * 2);
        for (int64_t k = 0; k < rows[i] * n; k++) w[i][k] = ds4_f32_to_f16(frand());
        tot += rows[i];
    }
    float *y = malloc(tot * sizeof(float)), *ref = malloc(tot * sizeof(float));
    for (int i = 0, o = 0; i < nseg; o += (int)rows[i], i++)
        for (int64_t r = 0; r < rows[i]; r++)
            ref[o + r] = ds4_dot_row(GGML_F16, w[i] + r * nn[xi[i]], x[xi[i]], nn[xi[i]]);
    snprintf(what, sizeof what, "matvec f16x %d matrices, %lld rows of %lld / %lld", nseg, (long long)tot,
             (long long)n0, (long long)n1);
    if (ds4_cuda_test_matvec_f16x(nseg, (const uint16_t *const *)w, rows, xi, x[0], n0, x[1], n1, y, err, sizeof err))
        verdict(what, false, "%s", err);
    else {
        double e = 0;
        for (int i = 0, o = 0; i < nseg; o += (int)rows[i], i++) {
            double ei = rel_err(y + o, ref + o, rows[i]);
            e = isnan(ei) || ei > e ? ei : e;
        }
        verdict(what, within(e, 1e-5), "worst matrix rel %.3g (bound 1e-5)", e);
    }
    for (int i = 0; i < nseg; i++) free(w[i]);
    free(x[0]); free(x[1]); free(y); free(ref);
}

/* `bytes` of GGUF blocks of Q8_0 / Q2_K / IQ2_XXS with random quant bytes
 * (every bit pattern is a valid quant, sign or grid index) and finite
 * scales (Q2_K: d and dmin) in [2^-8, 2^-7): no quantiser run, so the
 * full-size expert shapes take no CPU time to build. */
static void rand_blocks(int type, uint8_t *w, uint64_t bytes) {
    int bb = type == GGML_Q8_0 ? 34 : type == GGML_IQ2_XXS ? 66 : 84, ho = type == GGML_Q2_K ? 80 : 0;
    for (uint64_t i = 0; i < bytes; i++) w[i] = (uint8_t)rnd();
    for (uint64_t b = 0; b < bytes / bb; b++)
        for (int k = 0; k < (type == GGML_Q2_K ? 2 : 1); k++) {
            uint16_t h = ds4_f32_to_f16((1.0f + (float)(rnd() & 1023) / 1024.0f) * 0x1p-8f);
            memcpy(w + b * bb + ho + 2 * k, &h, 2);
        }
}

/* One Q8_0 matrix times grouped x as decode launches it (matvec_g:
 * attn_output_a's 8 groups, attn_output_b, the LM head) with the k_mv_rp
 * variant nr (NR + 10·KS, + 100 without the L2 prefetch; 0: the backend's
 * choice), each row against the CPU's dot; run twice, the second run must
 * equal the first bit for bit (split-K sums in a fixed order). */
static void check_matvec_g(int64_t n_in, int64_t rows, int groups, const int *nrs, int n_nr) {
    char err[256], what[80];
    uint64_t rb = ggml_row_bytes(GGML_Q8_0, (uint64_t)n_in);
    uint8_t *w = malloc(rb * rows);
    float *x = malloc(groups * n_in * sizeof(float)), *ref = malloc(rows * sizeof(float));
    float *y = malloc(rows * sizeof(float)), *y2 = malloc(rows * sizeof(float));
    rand_blocks(GGML_Q8_0, w, rb * rows);
    for (int64_t i = 0; i < groups * n_in; i++) x[i] = frand();
    for (int64_t r = 0; r < rows; r++) ref[r] = ds4_dot_row(GGML_Q8_0, w + r * rb, x + r / (rows / groups) * n_in, n_in);
    for (int k = 0; k < n_nr; k++) {
        snprintf(what, sizeof what, "matvec_g Q8_0 %lldx%lld, %d groups, nr %d", (long long)rows, (long long)n_in, groups,
                 nrs[k]);
        if (ds4_cuda_test_matvec_g(GGML_Q8_0, w, n_in, rows, groups, x, y, nrs[k], err, sizeof err) ||
            ds4_cuda_test_matvec_g(GGML_Q8_0, w, n_in, rows, groups, x, y2, nrs[k], err, sizeof err)) {
            verdict(what, false, "%s", err);
            continue;
        }
        double e = rel_err(y, ref, rows);
        bool same = !memcmp(y, y2, rows * sizeof(float));
        verdict(what, within(e, 1e-5) && same, "rel %.3g (bound 1e-5), runs %s", e, same ? "identical" : "DIFFER");
    }
    free(w); free(x); free(ref); free(y); free(y2);
}

/* Routed slots as the decode step runs them (6 of E experts): glu = the
 * gate+up pair with swiglu·ew (clamp 10 is hit: |dots| reach ~15), else the
 * down projection with an x per slot. */
static void check_matvec_slots(int type, const char *name, int64_t n_in, int64_t rows, int E, int used, bool glu,
                               int nr, bool wide) {
    char err[256], what[96];
    uint64_t rb = ggml_row_bytes((uint32_t)type, (uint64_t)n_in), slab = rb * rows;
    int64_t nx = glu ? n_in : used * n_in;
    uint8_t *wg = malloc(slab * E), *wu = glu ? malloc(slab * E) : NULL;
    float *x = malloc(nx * sizeof(float)), ew[16], *y = malloc(used * rows * sizeof(float));
    float *ref = malloc(used * rows * sizeof(float));
    int32_t eid[16];
    const float clamp = 10.0f;
    rand_blocks(type, wg, slab * E);
    if (glu) rand_blocks(type, wu, slab * E);
    /* wide: magnitudes over 2^±12 around 100 (k_mv_tc's f16 hi + lo of x·2^k) */
    for (int64_t i = 0; i < nx; i++) x[i] = frand() * (wide ? 100.0f * ldexpf(1.0f, (int)(rnd() % 25) - 12) : 1.0f);
    for (int i = 0; i < used; i++) {
        bool dup;
        do {
            eid[i] = (int32_t)(rnd() % (uint64_t)E);
            dup = false;
            for (int k = 0; k < i; k++) dup |= eid[k] == eid[i];
        } while (dup);
        ew[i] = 0.5f + 0.5f * frand();
    }
    for (int i = 0; i < used; i++)
        for (int64_t r = 0; r < rows; r++) {
            uint64_t o = (uint64_t)eid[i] * slab + r * rb;
            float g = ds4_dot_row((ggml_type)type, wg + o, glu ? x : x + i * n_in, n_in);
            ref[i * rows + r] = glu ? cpu_swiglu(g, ds4_dot_row((ggml_type)type, wu + o, x, n_in), clamp) * ew[i] : g;
        }
    snprintf(what, sizeof what, "matvec %s %s %d slots %lldx%lld nr %d%s", name, glu ? "glu" : "down", used,
             (long long)rows, (long long)n_in, nr, wide ? " wide x" : "");
    if (ds4_cuda_test_matvec_slots(type, wg, wu, n_in, rows, E, used, eid, ew, clamp, x, y, nr, err, sizeof err))
        verdict(what, false, "%s", err);
    else {
        double e = rel_err(y, ref, used * rows);
        verdict(what, within(e, 1e-5), "rel %.3g (bound 1e-5)", e);
    }
    free(wg); free(wu); free(x); free(y); free(ref);
}

/* Decode's router launch with the shared expert's gate+up as extra blocks
 * (sh), and the shared down after it, against the CPU: routing as
 * ffn_sublayer (biased top-`used`, ids in choice order, normalised scaled
 * weights), sg = swiglu of the CPU dots, y = the CPU's down rows times the
 * GPU's sg (so y's bound sees only the down launch). Random F16 router rows
 * and bias, Q8_0 blocks as rand_blocks; x in [-1, 1]. */
static void check_router(int E, int used, int64_t n_in, int64_t ff, bool sh) {
    char err[256], what[96];
    uint64_t rr = ggml_row_bytes(GGML_F16, (uint64_t)n_in), rg = ggml_row_bytes(GGML_Q8_0, (uint64_t)n_in);
    uint64_t rd = ggml_row_bytes(GGML_Q8_0, (uint64_t)ff);
    uint16_t *wr = malloc(rr * E);
    uint8_t *wg = malloc(rg * ff), *wu = malloc(rg * ff), *wd = malloc(rd * n_in);
    float *x = malloc(n_in * sizeof(float)), *bias = malloc(E * sizeof(float)), *sc = malloc(E * sizeof(float));
    float *sg = malloc(ff * sizeof(float)), *sref = malloc(ff * sizeof(float));
    float *y = malloc(n_in * sizeof(float)), *yref = malloc(n_in * sizeof(float)), ew[64], eref[64];
    int32_t eid[64], iref[64];
    const float clamp = 10.0f, wscale = 1.5f;
    for (int64_t i = 0; i < (int64_t)(rr / 2) * E; i++) wr[i] = ds4_f32_to_f16(frand() * 0.05f);
    for (int e = 0; e < E; e++) bias[e] = 0.1f * frand();
    for (int64_t i = 0; i < n_in; i++) x[i] = frand();
    rand_blocks(GGML_Q8_0, wg, rg * ff);
    rand_blocks(GGML_Q8_0, wu, rg * ff);
    rand_blocks(GGML_Q8_0, wd, rd * n_in);
    for (int e = 0; e < E; e++) sc[e] = cpu_router_score(ds4_dot_row(GGML_F16, (const uint8_t *)wr + e * rr, x, n_in));
    float sum = 0;
    for (int i = 0; i < used; i++) {
        int32_t best = -1;
        float bv = 0;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int k = 0; k < i; k++) taken |= iref[k] == e;
            if (!taken && (best < 0 || sc[e] + bias[e] > bv)) { best = e; bv = sc[e] + bias[e]; }
        }
        iref[i] = best;
        sum += sc[best];
    }
    for (int i = 0; i < used; i++) eref[i] = sc[iref[i]] / fmaxf(sum, 0x1p-14f) * wscale;
    for (int64_t r = 0; r < ff; r++)
        sref[r] = cpu_swiglu(ds4_dot_row(GGML_Q8_0, wg + r * rg, x, n_in), ds4_dot_row(GGML_Q8_0, wu + r * rg, x, n_in), clamp);
    snprintf(what, sizeof what, "router %d of %d x %lld%s", used, E, (long long)n_in, sh ? "" : " (no shared expert)");
    if (sh) snprintf(what + strlen(what), sizeof what - strlen(what), " + shared Q8_0 %lldx%lld", (long long)ff, (long long)n_in);
    if (ds4_cuda_test_router_shared(wr, E, used, bias, true, wscale, sh ? wg : NULL, wu, wd, ff, n_in, x, clamp, eid, ew,
                                    sg, y, err, sizeof err)) {
        verdict(what, false, "%s", err);
    } else {
        int bad = 0;
        for (int i = 0; i < used; i++) bad += eid[i] != iref[i];
        double ee = bad ? NAN : rel_err(ew, eref, used), es = 0, ey = 0;
        if (sh) {
            for (int64_t r = 0; r < n_in; r++) yref[r] = ds4_dot_row(GGML_Q8_0, wd + r * rd, sg, ff);
            es = rel_err(sg, sref, ff);
            ey = rel_err(y, yref, n_in);
        }
        verdict(what, within(ee, 1e-5) && within(es, 1e-5) && within(ey, 1e-5),
                "%d ids differ, ew rel %.3g, sg rel %.3g, y rel %.3g (bound 1e-5)", bad, ee, es, ey);
    }
    free(wr); free(wg); free(wu); free(wd); free(x); free(bias); free(sc); free(sg); free(sref); free(y); free(yref);
}

static void check_qat(int n, bool fp4) {
    char err[256], what[64];
    float *x = malloc(n * sizeof(float)), *ref = malloc(n * sizeof(float));
    for (int i = 0; i < n; i++) x[i] = ref[i] = frand() * (float)(1 << (rnd() % 12)) * 0.01f;
    if (fp4) cpu_fp4_sim(ref, n); else cpu_fp8_sim(ref, n);
    snprintf(what, sizeof what, "%s simulation n=%d", fp4 ? "hadamard+fp4" : "fp8 e4m3", n);
    if (ds4_cuda_test_qat(x, n, fp4, err, sizeof err)) verdict(what, false, "%s", err);
    else {
        int diff = 0;
        for (int i = 0; i < n; i++) diff += !(x[i] == ref[i]);
        verdict(what, diff == 0, "%d of %d values differ (bound 0), rel %.3g", diff, n, rel_err(x, ref, n));
    }
    free(x); free(ref);
}

static void check_topk(int64_t n, int64_t k, bool ties) {
    char err[256], what[64];
    float *s = malloc(n * sizeof(float));
    int32_t *got = malloc(k * sizeof(int32_t)), *ref = malloc(k * sizeof(int32_t));
    /* ties: few distinct values (and signed zeros), so the k-th score is shared. */
    for (int64_t i = 0; i < n; i++) s[i] = ties ? (float)((int)(rnd() % 7) - 3) * (rnd() & 1 ? 1.0f : -1.0f) : frand();
    cpu_topk(s, n, k, ref);
    snprintf(what, sizeof what, "topk %lld of %lld%s", (long long)k, (long long)n, ties ? " (ties)" : "");
    if (ds4_cuda_test_topk(s, n, k, got, err, sizeof err)) verdict(what, false, "%s", err);
    else {
        int64_t diff = 0;
        for (int64_t i = 0; i < k; i++) diff += got[i] != ref[i];
        verdict(what, diff == 0, "%lld of %lld indices differ", (long long)diff, (long long)k);
    }
    free(s); free(got); free(ref);
}

/* eval_top's argmax against the sampler's on rows made to catch the rule's
 * edges: ties of the maximum across blocks (lowest id wins), NaN never
 * winning, all NaN (0), only -inf. The row's kept copy must be exact. */
static void check_top(int n, const char *kind) {
    char err[256], what[64];
    float *x = malloc(n * sizeof(float)), *keep = malloc(n * sizeof(float));
    for (int i = 0; i < n; i++) {
        float r = frand();
        if (!strcmp(kind, "random")) x[i] = r * 30.0f;
        else if (!strcmp(kind, "ties")) x[i] = (float)(rnd() % 5);          /* the max 4 held by ~n/5 ids */
        else if (!strcmp(kind, "nan")) x[i] = rnd() % 3 ? NAN : r;          /* NaN and finite, mixed */
        else if (!strcmp(kind, "all nan")) x[i] = NAN;
        else x[i] = i % 7 ? -INFINITY : NAN;                                /* "-inf": NaN first, then -inf */
    }
    if (!strcmp(kind, "ties")) x[n - 1] = 4.0f, x[n / 2 + 3] = 4.0f;
    int32_t top = -2, ref = ds4_argmax(x, (uint32_t)n);
    snprintf(what, sizeof what, "eval_top argmax of %d (%s)", n, kind);
    if (ds4_cuda_test_top(x, n, keep, &top, err, sizeof err)) verdict(what, false, "%s", err);
    else verdict(what, top == ref && !memcmp(x, keep, n * sizeof(float)), "argmax %d, sampler's %d; copy %s", top,
                 ref, memcmp(x, keep, n * sizeof(float)) ? "differs" : "exact");
    free(x); free(keep);
}

static void check_hc(int hc) {
    char err[256], what[64];
    int mw = (2 + hc) * hc;
    float mix[(2 + 16) * 16], base[(2 + 16) * 16], scale[3] = {0.5f + frand() * 0.1f, 0.5f, 0.5f};
    float p[16], q[16], c[256], rp[16], rq[16], rc[256];
    for (int i = 0; i < mw; i++) { mix[i] = frand() * 3; base[i] = frand() * 0.1f; }
    cpu_hc_coeffs(mix, scale, base, hc, 20, 1e-6f, rp, rq, rc);
    snprintf(what, sizeof what, "hc coefficients + sinkhorn hc=%d", hc);
    if (ds4_cuda_test_hc_coeffs(mix, scale, base, hc, 20, 1e-6f, p, q, c, err, sizeof err)) verdict(what, false, "%s", err);
    else {
        double e = fmax(rel_err(p, rp, hc), fmax(rel_err(q, rq, hc), rel_err(c, rc, hc * hc)));
        verdict(what, within(e, 1e-5), "rel %.3g (bound 1e-5)", e);
    }
}

/* Decode's fused HC step (k_hc_step) against forward.c's formulas: the
 * post of y (+ the routed slots) with the coefficients of the previous
 * mixer outputs, the mixer outputs over rms, collapse and norm. Run twice
 * from the same inputs: the second run must repeat the first bit for bit
 * (the arrival counter resets itself, the partials are summed in a fixed
 * order). */
static void check_hc_step(int hc, int64_t d, int wtype, bool post, bool eout, bool head) {
    char err[256], what[96];
    int64_t zw = hc * d, mw = head ? hc : (2 + hc) * hc, nc = (2 + hc) * hc;
    int used = eout ? 6 : 0;
    const float he = 1e-6f, re = 1e-6f;
    uint64_t rb = ggml_row_bytes((uint32_t)wtype, (uint64_t)zw);
    uint8_t *w = malloc(rb * mw);
    float *src = malloc(zw * sizeof(float)), *X = malloc(zw * sizeof(float)), *Xr = malloc(zw * sizeof(float));
    float *Xg[2] = {malloc(zw * sizeof(float)), malloc(zw * sizeof(float))}, *nrm[2] = {malloc(d * sizeof(float)),
          malloc(d * sizeof(float))};
    float *y = malloc(d * sizeof(float)), *e = malloc((used + 1) * d * sizeof(float)), *nw = malloc(d * sizeof(float));
    float *h = malloc(d * sizeof(float)), *rn = malloc(d * sizeof(float));
    float scale[3] = {0.5f + frand() * 0.1f, 0.5f, 0.5f}, pscale[3] = {0.5f + frand() * 0.1f, 0.5f, 0.5f};
    float base[24], pbase[24], pm[24], pc[24], m[24], ref[24], mout[2][24];
    for (int64_t r = 0; r < mw; r++) {   /* mixer outputs / rms of order 1 */
        for (int64_t i = 0; i < zw; i++) src[i] = frand() * 0.02f;
        ds4_quantize_row((ggml_type)wtype, src, w + r * rb, zw, NULL);
    }
    for (int64_t i = 0; i < zw; i++) Xr[i] = X[i] = frand();
    for (int64_t k = 0; k < d; k++) { y[k] = frand(); nw[k] = 1.0f + frand() * 0.1f; }
    for (int64_t i = 0; i < used * d; i++) e[i] = frand() * 0.5f;
    for (int i = 0; i < nc; i++) { base[i] = frand() * 0.1f; pbase[i] = frand() * 0.1f; pm[i] = frand() * 3; }
    cpu_hc_coeffs(pm, pscale, pbase, hc, 20, he, pc, pc + hc, pc + 2 * hc);   /* the post's coefficients */
    if (post)
        for (int64_t k = 0; k < d; k++) {
            float yk = y[k];
            if (eout) {
                float a = 0;
                for (int i = 0; i < used; i++) a += e[i * d + k];
                yk = a + yk;
            }
            for (int c = 0; c < hc; c++) {
                float v = pc[hc + c] * yk;
                for (int a = 0; a < hc; a++) v += pc[2 * hc + a * hc + c] * X[a * d + k];
                Xr[c * d + k] = v;
            }
        }
    double ss = 0;
    for (int64_t i = 0; i < zw; i++) ss += (double)Xr[i] * Xr[i];
    float rms = (float)sqrt(ss / (double)zw + re);
    for (int64_t r = 0; r < mw; r++) m[r] = ds4_dot_row((ggml_type)wtype, w + r * rb, Xr, zw) / rms;
    for (int a = 0; a < hc; a++) ref[a] = 1.0f / (1.0f + expf(-(m[a] * scale[0] + base[a]))) + he;   /* pre */
    for (int64_t k = 0; k < d; k++) {
        float a = 0;
        for (int i = 0; i < hc; i++) a += ref[i] * Xr[i * d + k];
        h[k] = a;
    }
    cpu_rmsnorm(h, nw, d, re, rn);
    snprintf(what, sizeof what, "hc step hc=%d d=%lld %s%s%s", hc, (long long)d, wtype == GGML_F16 ? "F16" : "F32",
             post ? (eout ? " post+moe" : " post") : "", head ? " head" : "");
    int rc = 0;
    for (int run = 0; run < 2 && !rc; run++) {
        memcpy(Xg[run], X, zw * sizeof(float));
        rc = ds4_cuda_test_hc_step(hc, d, wtype, w, scale, base, 20, he, re, nw, Xg[run], post ? pm : NULL, pscale,
                                   pbase, y, eout ? e : NULL, used, head, mout[run], nrm[run], err, sizeof err);
    }
    if (rc) verdict(what, false, "%s", err);
    else {
        double er = fmax(rel_err(nrm[0], rn, d), rel_err(Xg[0], Xr, zw));
        if (!head) er = fmax(er, rel_err(mout[0], m, nc));
        bool same = !memcmp(Xg[0], Xg[1], zw * sizeof(float)) && !memcmp(nrm[0], nrm[1], d * sizeof(float)) &&
                    (head || !memcmp(mout[0], mout[1], nc * sizeof(float)));
        verdict(what, within(er, 1e-5) && same, "rel %.3g (bound 1e-5), second run %s", er,
                same ? "bit-identical" : "DIFFERS");
    }
    free(w); free(src); free(X); free(Xr); free(Xg[0]); free(Xg[1]); free(nrm[0]); free(nrm[1]);
    free(y); free(e); free(nw); free(h); free(rn);
}

/* ---- mm (prefill GEMM) checks --------------------------------------------------------
 * Against double-precision dot products of the dequantised rows
 * (ds4_dequant_row): the kernels round x and the weights to f16 once each,
 * so the bound is 1e-3 per token row (measured ≈ 2–4e-4). */

#define MM_BOUND 1e-3

/* rows × n quantised random rows of `type`, each scaled by 2^(−4…3) (vary:
 * false: all in [−1, 1]). */
static uint8_t *mm_weights(int type, int64_t n, int64_t rows, bool vary) {
    uint64_t rb = ggml_row_bytes((uint32_t)type, (uint64_t)n);
    uint8_t *w = malloc(rb * rows);
    float *src = malloc(n * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        float sc = vary ? ldexpf(1.0f, (int)(rnd() % 8) - 4) : 1.0f;
        for (int64_t i = 0; i < n; i++) src[i] = frand() * sc;
        ds4_quantize_row((ggml_type)type, src, w + r * rb, n, NULL);
    }
    free(src);
    return w;
}
static double mm_dot(const float *w, const float *x, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)w[i] * x[i];
    return s;
}
/* max over rows of ‖a − ref‖/‖ref‖ (a zero ref row must come out exactly zero). */
static double mm_err(const float *a, const double *ref, int64_t rows, int64_t n) {
    double worst = 0;
    for (int64_t t = 0; t < rows; t++) {
        double num = 0, den = 0;
        for (int64_t i = 0; i < n; i++) {
            double v = a[t * n + i];
            if (isnan(v)) return NAN;
            num += (v - ref[t * n + i]) * (v - ref[t * n + i]);
            den += ref[t * n + i] * ref[t * n + i];
        }
        double e = den > 0 ? sqrt(num / den) : num > 0 ? INFINITY : 0;
        if (e > worst) worst = e;
    }
    return worst;
}

static void check_mm_dense(int type, const char *name, int64_t K, int64_t M, int64_t r0, int64_t nr, int64_t T) {
    char err[256], what[80];
    uint64_t rb = ggml_row_bytes((uint32_t)type, (uint64_t)K);
    int64_t ldx = K + 32 + 3;   /* the test entry reads columns 32 … 32+K−1 of each row */
    uint8_t *w = mm_weights(type, K, M, true);
    float *x = malloc(T * ldx * sizeof(float)), *y = malloc(T * nr * sizeof(float)), *wr = malloc(K * sizeof(float));
    double *ref = malloc(T * nr * sizeof(double));
    for (int64_t t = 0; t < T; t++) {   /* rows of very different magnitudes; row 3 all zero */
        float sc = t == 3 ? 0.0f : ldexpf(1.0f, (int)(rnd() % 40) - 20);
        for (int64_t i = 0; i < ldx; i++) x[t * ldx + i] = frand() * sc;
    }
    for (int64_t r = 0; r < nr; r++) {
        ds4_dequant_row((ggml_type)type, w + (r0 + r) * rb, wr, K);
        for (int64_t t = 0; t < T; t++) ref[t * nr + r] = mm_dot(wr, x + t * ldx + 32, K);
    }
    snprintf(what, sizeof what, "mm dense %s K=%lld rows %lld+%lld/%lld T=%lld", name, (long long)K, (long long)r0,
             (long long)nr, (long long)M, (long long)T);
    if (ds4_cuda_test_mm_dense(type, w, K, M, r0, nr, x, ldx, T, y, err, sizeof err)) verdict(what, false, "%s", err);
    else {
        double e = mm_err(y, ref, T, nr);
        verdict(what, within(e, MM_BOUND), "rel %.3g (bound %g)", e, MM_BOUND);
    }
    free(w); free(x); free(y); free(wr); free(ref);
}

static float mm_swiglu(double g, double u, float clamp) {
    g = fmin(g, clamp);
    u = u > clamp ? clamp : u < -clamp ? -clamp : u;
    return (float)(g / (1.0 + exp(-g)) * u);
}

/* E experts, T tokens × used slots; skew: slot 0 of every token is expert E−1. */
static void check_mm_experts(int tgu, int td, const char *name, int64_t d, int64_t ff, int E, int used, int64_t T,
                             bool skew) {
    char err[256], what[80];
    int64_t n = T * used;
    uint64_t rgu = ggml_row_bytes((uint32_t)tgu, (uint64_t)d), rd = ggml_row_bytes((uint32_t)td, (uint64_t)ff);
    uint8_t *wg = mm_weights(tgu, d, ff * E, false), *wu = mm_weights(tgu, d, ff * E, false), *wd = mm_weights(td, ff, d * E, true);
    int32_t *eid = malloc(n * sizeof(int32_t)), *perm = malloc(n * sizeof(int32_t)), *pref = malloc(n * sizeof(int32_t));
    float *ew = malloc(n * sizeof(float)), *x = malloc(T * d * sizeof(float)), *gin = malloc(n * ff * sizeof(float));
    float *g = malloc(n * ff * sizeof(float)), *out = malloc(n * d * sizeof(float));
    float *wr = malloc((d > ff ? d : ff) * sizeof(float)), *wr2 = malloc(d * sizeof(float));
    double *gref = malloc(n * ff * sizeof(double)), *oref = malloc(n * d * sizeof(double));
    /* gate and up of rms ≈ 1 (as after the FFN norm), clamp 2: some of
     * both clamped, most not */
    float clamp = 2.0f, xsc = 2.0f / sqrtf((float)d);
    for (int64_t t = 0; t < T; t++)
        for (int i = 0; i < used; i++) {   /* distinct experts per token */
            int e, dup;
            do {
                e = skew && i == 0 ? E - 1 : (int)(rnd() % (uint64_t)E);
                dup = 0;
                for (int k = 0; k < i; k++) dup |= eid[t * used + k] == e;
            } while (dup);
            eid[t * used + i] = e;
            ew[t * used + i] = 0.1f + 0.9f * fabsf(frand());
        }
    for (int64_t i = 0; i < T * d; i++) x[i] = frand() * xsc * 1.7f;
    for (int64_t i = 0; i < n * ff; i++) gin[i] = frand();
    int64_t j = 0;   /* the stable sort by expert */
    for (int e = 0; e < E; e++)
        for (int64_t a = 0; a < n; a++)
            if (eid[a] == e) pref[j++] = (int32_t)a;
    for (j = 0; j < n; j++) {
        int64_t a = pref[j], t = a / used, e = eid[a];
        for (int64_t f = 0; f < ff; f++) {
            ds4_dequant_row((ggml_type)tgu, wg + (e * ff + f) * rgu, wr, d);
            ds4_dequant_row((ggml_type)tgu, wu + (e * ff + f) * rgu, wr2, d);
            gref[j * ff + f] = mm_swiglu(mm_dot(wr, x + t * d, d), mm_dot(wr2, x + t * d, d), clamp) * (double)ew[a];
        }
        for (int64_t r = 0; r < d; r++) {
            ds4_dequant_row((ggml_type)td, wd + (e * d + r) * rd, wr, ff);
            oref[a * d + r] = mm_dot(wr, gin + j * ff, ff);
        }
    }
    snprintf(what, sizeof what, "mm experts %s d=%lld ff=%lld E=%d x%d T=%lld%s", name, (long long)d, (long long)ff, E,
             used, (long long)T, skew ? " skew" : "");
    if (ds4_cuda_test_mm_experts(tgu, wg, wu, td, wd, d, ff, E, used, T, eid, ew, clamp, x, gin, perm, g, out, err,
                                 sizeof err))
        verdict(what, false, "%s", err);
    else {
        int64_t bad = 0;
        for (j = 0; j < n; j++) bad += perm[j] != pref[j];
        double eg = mm_err(g, gref, n, ff), eo = mm_err(out, oref, n, d);
        verdict(what, !bad && within(eg, MM_BOUND) && within(eo, MM_BOUND),
                "order %lld wrong, glu rel %.3g, down rel %.3g (bound %g)", (long long)bad, eg, eo, MM_BOUND);
    }
    free(wg); free(wu); free(wd); free(eid); free(perm); free(pref); free(ew); free(x); free(gin); free(g);
    free(out); free(wr); free(wr2); free(gref); free(oref);
}

/* mm_prep: every value within half an f16 ulp (relative 2^-11; subnormal f16: 2^-14·xs
 * absolute near zero) of x = xh·xs, the row max in [2^13, 2^14] (rounding); a zero
 * row gives xs 0, a NaN anywhere in a row gives xs NaN. K from the
 * one-float4-a-thread path to the 8-float4 one; ldx = K + 4 keeps float4
 * rows, K + 3 takes the two-pass kernel. */
static void check_mm_prep(int64_t K, int64_t pad) {
    char err[256], what[80];
    const int64_t T = 5, ldx = K + pad;
    float *x = malloc(T * ldx * sizeof(float)), *xs = malloc(T * sizeof(float));
    uint16_t *xh = malloc(T * K * sizeof(uint16_t));
    for (int64_t t = 0; t < T; t++) {   /* row 3 zero, row 4 one NaN at its end */
        float sc = t == 3 ? 0.0f : ldexpf(1.0f, (int)(rnd() % 60) - 30);
        for (int64_t i = 0; i < ldx; i++) x[t * ldx + i] = frand() * sc;
    }
    x[4 * ldx + K - 1] = NAN;
    snprintf(what, sizeof what, "mm prep K=%lld ldx=%lld", (long long)K, (long long)ldx);
    if (ds4_cuda_test_mm_prep(x, ldx, T, K, xh, xs, err, sizeof err)) {
        verdict(what, false, "%s", err);
    } else {
        double worst = 0;
        bool ok = xs[3] == 0.0f && isnan(xs[4]);
        for (int64_t t = 0; t < 3; t++) {
            double m = 0;
            for (int64_t i = 0; i < K; i++) {
                double v = ds4_f16_to_f32(xh[t * K + i]);
                double e = fabs(v * xs[t] - x[t * ldx + i]) / (fabs((double)x[t * ldx + i]) + 0x1p-14 * xs[t]);
                if (e > worst) worst = e;
                if (fabs(v) > m) m = fabs(v);
            }
            ok = ok && m >= 8192.0 && m <= 16384.0;   /* the max may round up to 2^14 */
        }
        verdict(what, ok && worst <= 0x1p-11, "max rel %.3g (bound %.3g), zero row xs %g, NaN row xs %g", worst, 0x1p-11,
                xs[3], xs[4]);
    }
    free(x); free(xs); free(xh);
}

/* mm_dense_groups: G groups of gl rows, group g reading columns g·K … of x. */
static void check_mm_groups(int type, const char *name, int64_t K, int64_t G, int64_t gl, int64_t T) {
    char err[256], what[80];
    uint64_t rb = ggml_row_bytes((uint32_t)type, (uint64_t)K);
    const int64_t M = G * gl, ldx = G * K;
    uint8_t *w = mm_weights(type, K, M, true);
    float *x = malloc(T * ldx * sizeof(float)), *y = malloc(T * M * sizeof(float)), *wr = malloc(K * sizeof(float));
    double *ref = malloc(T * M * sizeof(double));
    for (int64_t i = 0; i < T * ldx; i++) x[i] = frand();
    for (int64_t r = 0; r < M; r++) {
        ds4_dequant_row((ggml_type)type, w + r * rb, wr, K);
        for (int64_t t = 0; t < T; t++) ref[t * M + r] = mm_dot(wr, x + t * ldx + (r / gl) * K, K);
    }
    snprintf(what, sizeof what, "mm groups %s K=%lld %lldx%lld rows T=%lld", name, (long long)K, (long long)G,
             (long long)gl, (long long)T);
    if (ds4_cuda_test_mm_groups(type, w, K, G, gl, x, T, y, err, sizeof err)) verdict(what, false, "%s", err);
    else {
        double e = mm_err(y, ref, T, M);
        verdict(what, e <= 1e-3, "rel %.3g (bound 1e-3)", e);
    }
    free(w); free(x); free(y); free(wr); free(ref);
}

static void mm_checks(void) {
    check_mm_groups(GGML_Q8_0, "Q8_0", 512, 4, 256, 200);   /* one launch, 128-token tiles */
    check_mm_groups(GGML_Q8_0, "Q8_0", 256, 3, 100, 7);     /* groups not of whole tiles: one launch each */
    check_mm_prep(100, 4);
    check_mm_prep(5000, 4);
    check_mm_prep(12000, 4);
    check_mm_prep(32768, 4);
    check_mm_prep(5000, 3);
    static const struct { int type; const char *name; } T[] = {
        {GGML_F32, "F32"}, {GGML_F16, "F16"}, {GGML_Q8_0, "Q8_0"},
        {GGML_Q2_K, "Q2_K"}, {GGML_Q4_K, "Q4_K"}, {GGML_IQ2_XXS, "IQ2_XXS"},
    };
    for (size_t i = 0; i < sizeof T / sizeof *T; i++) {
        check_mm_dense(T[i].type, T[i].name, 256, 37, 0, 37, 1);
        check_mm_dense(T[i].type, T[i].name, 512, 300, 5, 290, 7);      /* partial row and token tiles, r0 > 0 */
        check_mm_dense(T[i].type, T[i].name, 1024, 1000, 130, 700, 300);
    }
    check_mm_dense(GGML_Q8_0, "Q8_0", 96, 130, 0, 130, 9);   /* K not a multiple of the 64-wide step */
    check_mm_dense(GGML_Q8_0, "Q8_0", 256, 4200, 40, 4150, 1000);   /* grid big enough for 128-token tiles */
    check_mm_dense(GGML_Q2_K, "Q2_K", 256, 4200, 40, 4150, 1000);
    check_mm_experts(GGML_IQ2_XXS, GGML_Q2_K, "IQ2_XXS/Q2_K", 512, 256, 16, 3, 100, false);
    check_mm_experts(GGML_IQ2_XXS, GGML_Q2_K, "IQ2_XXS/Q2_K", 512, 256, 16, 3, 150, true);   /* 150 > 2 tiles */
    /* the formats swapped: both k_mmx decoders in both modes; 2–3 tiles an expert */
    check_mm_experts(GGML_Q2_K, GGML_IQ2_XXS, "Q2_K/IQ2_XXS", 768, 512, 6, 2, 200, false);
    check_mm_experts(GGML_Q4_K, GGML_Q4_K, "Q4_K/Q4_K", 256, 512, 8, 2, 70, false);
    check_mm_experts(GGML_Q8_0, GGML_Q8_0, "Q8_0/Q8_0", 256, 256, 5, 2, 7, false);
    check_mm_experts(GGML_F16, GGML_F16, "F16/F16", 256, 256, 4, 4, 1, true);
}

/* ---- attn: chunk attention and indexer scores (src/cuda/attn.cuh) ---------------------- */

#define AT_H 64
#define AT_HD 512
#define AT_RD 64
#define AT_WIN 128
#define AT_TOPK 512

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

static float *rand_rows(int64_t n, float amp, bool f16) {
    float *x = malloc((n ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = f16 ? ds4_round_f16(frand() * amp) : frand() * amp;
    return x;
}

/* Random FP4-simulated vectors of length d (Hadamard + FP4, as the indexer's q and rows). */
static float *rand_fp4(int64_t n, int64_t d) {
    float *x = rand_rows(n * d, 2.0f, false);
    for (int64_t i = 0; i < n; i++) cpu_fp4_sim(x + i * d, d);
    return x;
}

/* One compressor case for check_comp_idx: random products, ring and ape. */
typedef struct {
    ds4_cuda_comp_case c;
    float *pk, *pg, *norm, *rkv, *rg, *rows, *rkv0, *rg0;
    uint16_t *ape;
} comp_data;
static void comp_data_new(comp_data *d, int D, int R, int lanes, uint32_t keep, bool indexer, uint32_t pos) {
    int64_t W = (int64_t)lanes * D, nrow = ((int64_t)pos + 1) / R + 1;
    d->pk = rand_rows(W, 1.5f, false);
    d->pg = rand_rows(W, 2.0f, false);
    d->norm = rand_rows(D, 1.0f, false);
    d->rkv = rand_rows(keep * W, 1.5f, false);
    d->rg = rand_rows(keep * W, 2.0f, false);
    d->rkv0 = malloc(keep * W * sizeof(float));
    d->rg0 = malloc(keep * W * sizeof(float));
    memcpy(d->rkv0, d->rkv, keep * W * sizeof(float));
    memcpy(d->rg0, d->rg, keep * W * sizeof(float));
    d->rows = malloc(nrow * D * sizeof(float));
    d->ape = malloc((size_t)R * W * 2);
    for (int64_t i = 0; i < R * W; i++) d->ape[i] = ds4_f32_to_f16(frand() * 0.5f);
    ds4_cuda_comp_case c = {D, R, lanes, keep, indexer, d->pk, d->pg, d->ape, d->norm, d->rkv, d->rg, d->rows};
    d->c = c;
}
static void comp_data_free(comp_data *d) {
    free(d->pk); free(d->pg); free(d->norm); free(d->rkv); free(d->rg); free(d->rows); free(d->rkv0); free(d->rg0);
    free(d->ape);
}
/* Spec §4.5 for the token at pos on the ring before it (d->rkv0, d->rg0):
 * the emitted row (if pos completes a block) into out, softmax pooling in
 * double; then this token's slot of the ring. Returns whether it emits. */
static bool comp_ref(const comp_data *d, uint32_t pos, int rd, const double *freq, float eps, float *out, float *rkv,
                     float *rg) {
    const ds4_cuda_comp_case *c = &d->c;
    int W = c->lanes * c->D, D = c->D, R = c->R;
    uint32_t slot = pos % c->keep;
    bool emit = (pos + 1) % (uint32_t)R == 0;
    memcpy(rkv, d->rkv0, (size_t)c->keep * W * sizeof(float));
    memcpy(rg, d->rg0, (size_t)c->keep * W * sizeof(float));
    for (int j = 0; j < W; j++) {
        rkv[(size_t)slot * W + j] = d->pk[j];
        rg[(size_t)slot * W + j] = d->pg[j] + ds4_f16_to_f32(d->ape[(size_t)(pos % R) * W + j]);
    }
    if (!emit) return false;
    int64_t b = ((int64_t)pos + 1) / R - 1, bR = b * R, off = c->lanes == 2 ? D : 0;
    float *pool = malloc(D * sizeof(float));
    for (int j = 0; j < D; j++) {   /* the ring after the store holds every input of the block */
        double m = -INFINITY, den = 0, acc = 0;
        for (int pass = 0; pass < 2; pass++)
            for (int64_t t = c->lanes == 2 && b > 0 ? bR - R : bR; t < bR + R; t++) {
                int col = t < bR ? j : (int)off + j;
                double g = rg[(size_t)(t % c->keep) * W + col], k = rkv[(size_t)(t % c->keep) * W + col];
                if (!pass) m = g > m ? g : m;
                else { double e = exp(g - m); den += e; acc += e * k; }
            }
        pool[j] = (float)(acc / den);
    }
    cpu_rmsnorm(pool, d->norm, D, eps, out);
    cpu_rope(out + D - rd, rd / 2, freq, bR, false);
    if (c->indexer) cpu_fp4_sim(out, D);
    else cpu_fp8_sim(out, D - rd);
    for (int j = 0; j < D; j++) out[j] = ds4_round_f16(out[j]);
    free(pool);
    return true;
}
/* k_comp_idx (decode: the compressor steps of a layer and the indexer's
 * query heads in one launch) vs spec §4.5 / §4.6 on the CPU: ring slots
 * exactly; the emitted row (f16) within 2e-3 of the reference, at most 1 %
 * of its values further (an FP8/FP4 step: the GPU's expf and f32 pooling
 * move values across rounding boundaries); heads (cpu_rope + cpu_fp4_sim)
 * at most 0.2 % of values off (a contracted rope product can cross an FP4
 * boundary), weights exactly. The second case is the indexer's (D 128,
 * R 4) when the first is R 4: both ring layouts in one launch. */
static void check_comp_idx(int D, int R, uint32_t pos, int ih) {
    char err[256], what[96];
    const int rd = AT_RD, ihd = 128, lanes = R == 4 ? 2 : 1;
    const uint32_t keep = R == 4 ? 8 : (uint32_t)R;
    const float eps = 1e-6f, wscale = 1.0f / 90.5f;
    double freq[AT_RD / 2];
    for (int k = 0; k < rd / 2; k++) freq[k] = pow(10000.0, -2.0 * k / rd);
    comp_data d[2];
    int nc = R == 4 ? 2 : 1;
    comp_data_new(&d[0], D, R, lanes, keep, false, pos);
    if (nc == 2) comp_data_new(&d[1], ihd, 4, 2, 8, true, pos);
    float *iq = rand_rows((int64_t)ih * ihd, 2.0f, false), *iw = rand_rows(ih ? ih : 1, 1.0f, false);
    float *qref = malloc((size_t)(ih ? ih : 1) * ihd * sizeof(float)), *wref = malloc((ih ? ih : 1) * sizeof(float));
    memcpy(qref, iq, (size_t)ih * ihd * sizeof(float));
    for (int h = 0; h < ih; h++) {
        cpu_rope(qref + (size_t)h * ihd + ihd - rd, rd / 2, freq, pos, false);
        cpu_fp4_sim(qref + (size_t)h * ihd, ihd);
        wref[h] = iw[h] * wscale;
    }
    snprintf(what, sizeof what, "comp+idx heads D %d R %d pos %u heads %d", D, R, pos, ih);
    if (ds4_cuda_test_comp_idx(&d[0].c, nc == 2 ? &d[1].c : NULL, pos, rd, freq, eps, ih, ihd, iq, iw, wscale, err,
                               sizeof err)) {
        verdict(what, false, "%s", err);
    } else {
        int64_t ring_diff = 0, far = 0, qdiff = 0, wdiff = 0, nrow = 0, nan = 0;
        double worst = 0;
        for (int i = 0; i < nc; i++) {
            const ds4_cuda_comp_case *c = &d[i].c;
            int64_t W = (int64_t)c->lanes * c->D;
            float *row = malloc(c->D * sizeof(float)), *rkv = malloc(c->keep * W * sizeof(float));
            float *rg = malloc(c->keep * W * sizeof(float));
            bool emit = comp_ref(&d[i], pos, rd, freq, eps, row, rkv, rg);
            for (int64_t k = 0; k < c->keep * W; k++) ring_diff += !(c->rkv[k] == rkv[k]) + !(c->rg[k] == rg[k]);
            if (emit) {
                const float *got = c->rows + (((int64_t)pos + 1) / c->R - 1) * c->D;
                double amax = 0;
                for (int j = 0; j < c->D; j++) amax = fabs(row[j]) > amax ? fabs(row[j]) : amax;
                for (int j = 0; j < c->D; j++) {
                    double e = fabs((double)got[j] - row[j]) / amax;
                    nan += isnan(got[j]);
                    if (e > 2e-3) far++;
                    else if (e > worst) worst = e;
                }
                nrow += c->D;
            }
            free(row); free(rkv); free(rg);
        }
        for (int64_t k = 0; k < (int64_t)ih * ihd; k++) qdiff += !(iq[k] == qref[k]);
        for (int h = 0; h < ih; h++) wdiff += !(iw[h] == wref[h]);
        bool ok = ring_diff == 0 && nan == 0 && far * 100 <= nrow && qdiff * 500 <= (int64_t)ih * ihd && wdiff == 0;
        verdict(what, ok, "ring %lld differ (bound 0); row values %lld, %lld NaN, %lld beyond 2e-3 of max (bound 1 %%), "
                "others within %.2g; heads %lld of %lld differ (bound 0.2 %%), weights %lld", (long long)ring_diff,
                (long long)nrow, (long long)nan, (long long)far, worst, (long long)qdiff, (long long)ih * ihd,
                (long long)wdiff);
    }
    for (int i = 0; i < nc; i++) comp_data_free(&d[i]);
    free(iq); free(iw); free(qref); free(wref);
}

/* attn_chunk (f32 = false: H 64, hd 512; f16 products, bound 1e-3) or the
 * f32 attention of decode (f32 = true: any H, hd; bound 1e-5) vs cpu_attend
 * + inverse cpu_rope (attn_task's row order) on random inputs with f16-exact
 * rows; the CPU reference covers up to ~24 tokens (its cost), the NaN check
 * every output. */
static void check_attn_g(bool f32, int H, int hd, int ratio, uint32_t p0, int64_t T, uint32_t keep_raw) {
    char err[256], what[96];
    const int rd = AT_RD;
    const int64_t topk = AT_TOPK, ncomp = ratio > 0 ? ((int64_t)p0 + T) / ratio : 0;
    float *q = rand_rows(T * H * hd, 1.7f, false), *kvc = rand_rows(T * hd, 1.7f, true);
    float *raw = rand_rows((int64_t)keep_raw * hd, 1.7f, true), *comp = rand_rows(ncomp * hd, 1.7f, true);
    float *o = malloc(T * H * hd * sizeof(float)), *ref = malloc((size_t)hd * sizeof(float));
    float *sc = malloc((AT_WIN + topk + ncomp) * sizeof(float)), *sinks = malloc(H * sizeof(float));
    const float **rows = malloc((AT_WIN + topk + ncomp) * sizeof(*rows));
    int32_t *sel = ratio == 4 ? malloc(T * topk * sizeof(int32_t)) : NULL, *perm = malloc((ncomp + 1) * sizeof(int32_t));
    double freq[AT_RD / 2];
    for (int k = 0; k < rd / 2; k++) freq[k] = pow(10000.0, -2.0 * k / rd);
    for (int h = 0; h < H; h++) sinks[h] = frand() * 2;
    int64_t n_sel = 0;
    for (int64_t t = 0; sel && t < T; t++) {   /* a random ascending topk-subset where the indexer selects */
        int64_t nvis = ((int64_t)p0 + t + 1) / 4;
        if (nvis <= topk) continue;
        n_sel++;
        for (int64_t i = 0; i < nvis; i++) perm[i] = (int32_t)i;
        for (int64_t i = 0; i < topk; i++) {
            int64_t j = i + (int64_t)(rnd() % (uint64_t)(nvis - i));
            int32_t x = perm[i]; perm[i] = perm[j]; perm[j] = x;
        }
        qsort(perm, (size_t)topk, sizeof *perm, cmp_i32);   /* ascending, as cpu_topk */
        memcpy(sel + t * topk, perm, topk * sizeof(int32_t));
    }
    const float scale = 1.0f / sqrtf((float)hd);
    if (f32) snprintf(what, sizeof what, "attn f32 H %d hd %d ratio %d p0 %u T %lld%s", H, hd, ratio, p0, (long long)T,
                      n_sel ? " (sel)" : "");
    else snprintf(what, sizeof what, "attn ratio %d p0 %u T %lld%s", ratio, p0, (long long)T, n_sel ? " (some selected)" : "");
    if (f32 ? ds4_cuda_test_attn_f32(q, kvc, raw, keep_raw, AT_WIN, comp, ncomp, sel, ratio, topk, sinks, H, hd, rd,
                                     freq, scale, p0, T, o, err, sizeof err)
            : ds4_cuda_test_attn(q, kvc, raw, keep_raw, AT_WIN, comp, ncomp, sel, ratio, topk, sinks, H, hd, rd, freq,
                                 scale, p0, T, o, err, sizeof err)) {
        verdict(what, false, "%s", err);
    } else {
        double num = 0, den = 0, amax = 0;
        int64_t nan = 0, step = T > 24 ? T / 23 : 1;
        for (int64_t i = 0; i < T * H * hd; i++) nan += isnan(o[i]);
        for (int64_t k = 0;; k++) {   /* tokens 0, step, 2·step, …, and always the last */
            int64_t t = k * step < T ? k * step : T - 1, p = p0 + t, nr = 0;
            for (int64_t pos = p >= AT_WIN - 1 ? p - (AT_WIN - 1) : 0; pos <= p; pos++)
                rows[nr++] = pos >= p0 ? kvc + (pos - p0) * hd : raw + (pos % keep_raw) * hd;
            int64_t nc = ratio > 0 ? (p + 1) / ratio : 0;
            if (ratio == 4 && nc > topk) for (int64_t c = 0; c < topk; c++) rows[nr++] = comp + sel[t * topk + c] * hd;
            else for (int64_t c = 0; c < nc; c++) rows[nr++] = comp + c * hd;
            for (int h = 0; h < H; h++) {
                cpu_attend(q + (t * H + h) * hd, rows, nr, hd, scale, sinks[h], sc, ref);
                cpu_rope(ref + hd - rd, rd / 2, freq, p, true);
                const float *g = o + (t * H + h) * hd;
                for (int j = 0; j < hd; j++) {
                    double d = (double)g[j] - ref[j];
                    num += d * d;
                    den += (double)ref[j] * ref[j];
                    amax = fmax(amax, fabs(d));
                }
            }
            if (t == T - 1) break;
        }
        double e = nan ? NAN : sqrt(num / den), bound = f32 ? 1e-5 : 1e-3;
        verdict(what, within(e, bound), "rel %.3g, max abs %.3g (bound %g), %lld NaN", e, amax, bound, (long long)nan);
    }
    free(q); free(kvc); free(raw); free(comp); free(o); free(ref); free(sc); free(rows); free(sel); free(perm);
    free(sinks);
}
static void check_attn(int ratio, uint32_t p0, int64_t T, uint32_t keep_raw) {
    check_attn_g(false, AT_H, AT_HD, ratio, p0, T, keep_raw);
}

/* idx_scores_chunk (f32 = false: ih 64, ihd 128) or the decode kernel
 * (f32 = true: any ih, ihd) vs idx_task's formula (ds4_dot_f32, heads summed
 * in ascending order) on FP4-simulated q and rows: the scores must be the
 * same bits, so the top-512 selections are the same. */
static void check_idx_g(bool f32, int ih, int ihd, uint32_t p0, int64_t T) {
    char err[256], what[80];
    const int64_t nrows = ((int64_t)p0 + T) / 4, ld = nrows + 3;
    float *iq = rand_fp4(T * ih, ihd), *rows = rand_fp4(nrows, ihd), *iw = rand_rows(T * ih, 1.0f / 90.5f, false);
    float *got = malloc(T * ld * sizeof(float)), *ref = malloc((nrows ? nrows : 1) * sizeof(float));
    int32_t *sa = malloc(AT_TOPK * sizeof(int32_t)), *sb = malloc(AT_TOPK * sizeof(int32_t));
    if (f32) snprintf(what, sizeof what, "idx scores f32 ih %d ihd %d p0 %u T %lld", ih, ihd, p0, (long long)T);
    else snprintf(what, sizeof what, "idx scores p0 %u T %lld", p0, (long long)T);
    if (f32 ? ds4_cuda_test_idx_scores_f32(iq, iw, rows, nrows, p0, T, ih, ihd, got, ld, err, sizeof err)
            : ds4_cuda_test_idx_scores(iq, iw, rows, nrows, p0, T, ih, ihd, got, ld, err, sizeof err)) {
        verdict(what, false, "%s", err);
    } else {
        int64_t diff = 0, nan = 0, seldiff = 0, ntop = 0, n = 0;
        for (int64_t t = 0; t < T; t++) {
            int64_t nvis = ((int64_t)p0 + t + 1) / 4;
            for (int64_t c = 0; c < nvis; c++) {
                const float *q = iq + t * ih * ihd, *w = iw + t * ih;
                float s = 0;
                for (int h = 0; h < ih; h++) s += w[h] * fmaxf(0.0f, ds4_dot_f32(q + h * ihd, rows + c * ihd, ihd));
                ref[c] = s;
                float g = got[t * ld + c];
                nan += isnan(g);
                diff += !(g == s);
                n++;
            }
            if (nvis > AT_TOPK) {   /* selection on the GPU's scores vs the CPU's */
                ntop++;
                cpu_topk(ref, nvis, AT_TOPK, sa);
                cpu_topk(got + t * ld, nvis, AT_TOPK, sb);
                for (int64_t i = 0, j = 0; i < AT_TOPK; i++) {   /* both ascending: count a's not in b */
                    while (j < AT_TOPK && sb[j] < sa[i]) j++;
                    seldiff += !(j < AT_TOPK && sb[j] == sa[i]);
                }
            }
        }
        verdict(what, diff == 0 && nan == 0, "%lld of %lld scores differ (bound 0), %lld NaN, %lld of %lld top-%d "
                "selections differ", (long long)diff, (long long)n, (long long)nan, (long long)seldiff,
                (long long)(ntop * AT_TOPK), AT_TOPK);
    }
    free(iq); free(rows); free(iw); free(got); free(ref); free(sa); free(sb);
}
static void check_idx(uint32_t p0, int64_t T) { check_idx_g(false, 64, 128, p0, T); }

/* --attn-bench: TFLOP/s of the chunk kernels at T = 2048 (median of 10). */
static void attn_bench(void) {
    static const struct { bool idx; int ratio; uint32_t p0; } B[] = {
        {false, 4, 2048}, {false, 4, 14336}, {false, 128, 14336}, {false, 0, 14336}, {true, 4, 14336},
    };
    for (size_t i = 0; i < sizeof B / sizeof *B; i++) {
        char err[256];
        double ms, fl;
        if (ds4_cuda_bench_attn(B[i].idx, B[i].ratio, B[i].p0, 2048, 10, &ms, &fl, err, sizeof err)) {
            printf("bench: %s\n", err);
            n_fail++;
            continue;
        }
        printf("%-8s ratio %3d p0 %5u T 2048: %8.3f ms  %6.1f TFLOP/s (%.1f GFLOP)\n", B[i].idx ? "indexer" : "attn",
               B[i].ratio, B[i].p0, ms, fl / ms * 1e-9, fl * 1e-9);
    }
}

static void kernel_checks(void) {
    static const struct { int type; const char *name; } T[] = {
        {GGML_F32, "F32"}, {GGML_F16, "F16"}, {GGML_Q8_0, "Q8_0"},
        {GGML_Q2_K, "Q2_K"}, {GGML_Q4_K, "Q4_K"}, {GGML_IQ2_XXS, "IQ2_XXS"},
    };
    for (size_t i = 0; i < sizeof T / sizeof *T; i++) {
        check_matvec(T[i].type, T[i].name, 256, 37);
        check_matvec(T[i].type, T[i].name, 4096, 67);     /* block-per-row path */
        check_matvec(T[i].type, T[i].name, 2048, 1029);   /* warp-per-row path, long rows */
        check_matvec(T[i].type, T[i].name, 1024, 4098);   /* Q8_0: 4 rows a warp, a partial last warp */
    }
    check_matvec(GGML_Q8_0, "Q8_0", 4096, 1024);   /* attn_q_a: one row a warp, 8 pieces a lane in flight */
    check_matvec(GGML_Q8_0, "Q8_0", 4096, 512);    /* attn_kv */
    check_matvec2(4096, 1024, 512);                 /* attn_q_a + attn_kv: one launch, a lane's whole row share in flight */
    check_matvec2(9984, 3001, 77);                  /* ring: 20 pieces a lane, partial last piece round, more rows than warps */
    check_matvec2(64, 5, 3);                        /* fewer pieces than lanes, a partial block */
    check_qb(32768, 1024, 512, 64, 2047, 128);      /* decode's q_b + k_qa_kv: the model's shapes (NR 4, prefetch) */
    check_qb(32768, 1024, 512, 64, 77, 1);          /* one ring slot */
    check_qb(2052, 512, 256, 32, 5000, 7);          /* NR 2, a partial row group, a ring walk */
    check_qb(1024, 128, 128, 64, 3, 300);           /* the tiny model's (NR 1; the old q_b is k_mv_sx) */
    check_qb(100, 352, 160, 32, 9, 16);             /* q_a of 2¾ float4 groups, a K=V row of two FP8 blocks */
    {   /* decode's F16 products: a ratio-4 layer (compressor kv, gate; indexer compressor kv, gate; indexer
         * proj; indexer q_b of q_a), a ratio-128 layer, the tiny model's, odd widths with partial pieces */
        static const int64_t r4[] = {1024, 1024, 256, 256, 64, 8192}, r128[] = {512, 512}, rt[] = {256, 256, 128, 128, 4, 512};
        static const int64_t ro[] = {3, 70, 1, 5};
        static const int x4[] = {0, 0, 0, 0, 0, 1}, x0[] = {0, 0, 0, 0}, xo[] = {0, 1, 0, 1};
        check_matvec_f16x(6, r4, x4, 4096, 1024);
        check_matvec_f16x(2, r128, x0, 4096, 0);
        check_matvec_f16x(6, rt, x4, 256, 128);
        check_matvec_f16x(4, ro, xo, 264, 72);
    }
    /* the decode shapes, each kernel variant (nr: ds4_cuda_mv_bench) */
    static const int nrs[] = {0, 1, 2, 4, -1, -2, -4, -8, -16, -32};
    for (size_t i = 0; i < sizeof nrs / sizeof *nrs; i++) {
        if (nrs[i] == 4 || nrs[i] == -4) continue;
        check_matvec_slots(GGML_IQ2_XXS, "IQ2_XXS", 4096, 2048, 16, 6, true, nrs[i], false);   /* routed gate+up */
        check_matvec_slots(GGML_IQ2_XXS, "IQ2_XXS", 256, 40, 5, 3, true, nrs[i], false);       /* partial last block */
    }
    for (size_t i = 0; i < sizeof nrs / sizeof *nrs; i++) {
        check_matvec_slots(GGML_Q2_K, "Q2_K", 2048, 4096, 16, 6, false, nrs[i], false);   /* routed down */
        check_matvec_slots(GGML_Q2_K, "Q2_K", 512, 38, 5, 3, false, nrs[i], false);   /* slabs stay 16-byte multiples */
    }
    for (int nr = -2; nr <= 2; nr++) check_matvec_slots(GGML_Q8_0, "Q8_0", 4096, 2048, 1, 1, true, nr, false);   /* shared expert */
    /* dense Q8_0 through k_mv_rp: every rows-a-warp / split-K / prefetch variant at out_a, out_b and shared down,
     * then odd shapes (partial row groups and blocks, 3 groups) */
    static const int rps[] = {0, 1, 2, 4, 14, 24, 44, 12, 42, 104, 144};
    check_matvec_g(4096, 8192, 8, rps, (int)(sizeof rps / sizeof *rps));   /* attn_output_a */
    check_matvec_g(8192, 4096, 1, rps, (int)(sizeof rps / sizeof *rps));   /* attn_output_b */
    check_matvec_g(2048, 4096, 1, rps, 1);                                  /* shared down */
    check_matvec_g(768, 3 * 36, 3, rps, (int)(sizeof rps / sizeof *rps));
    check_matvec_g(256, 37, 1, rps, (int)(sizeof rps / sizeof *rps));
    /* k_mv_tc on the other pairings (the model's files could hold them) and an x of wide range */
    check_matvec_slots(GGML_Q2_K, "Q2_K", 4096, 2048, 16, 6, true, 0, false);
    check_matvec_slots(GGML_IQ2_XXS, "IQ2_XXS", 2048, 4096, 16, 6, false, 0, false);
    check_matvec_slots(GGML_IQ2_XXS, "IQ2_XXS", 4096, 64, 4, 2, true, -16, true);
    check_matvec_slots(GGML_IQ2_XXS, "IQ2_XXS", 4096, 256, 4, 2, false, -16, true);
    check_matvec_slots(GGML_Q2_K, "Q2_K", 2048, 512, 4, 2, false, -16, true);
    check_router(256, 6, 4096, 2048, true);    /* the model's shape: one warp a row pair, or a ring */
    check_router(256, 6, 4096, 6144, true);    /* more row pairs than warps: the ring */
    check_router(64, 4, 256, 96, true);        /* few pairs, short rows (fewer pieces than lanes) */
    check_router(256, 6, 4096, 2048, false);   /* the router alone */
    check_qat(448, false);
    check_qat(64, false);
    check_qat(128, true);
    check_qat(512, true);
    check_topk(5000, 512, false);
    check_topk(5000, 512, true);
    check_topk(75, 16, true);
    check_topk(100000, 512, false);
    check_topk(520, 512, false);   /* decode just past 2K: a key a thread */
    check_topk(520, 512, true);
    check_topk(2600, 512, true);
    check_top(129280, "random");
    check_top(8013, "random");
    check_top(129280, "ties");
    check_top(129280, "nan");
    check_top(100, "all nan");
    check_top(129280, "-inf");
    check_top(31, "random");    /* fewer logits than threads of one block */
    check_hc(4);
    check_hc_step(4, 4096, GGML_F16, true, true, false);    /* the full model's attention step */
    check_hc_step(4, 4096, GGML_F16, true, false, false);   /* its FFN step */
    check_hc_step(4, 4096, GGML_F16, false, false, true);   /* the head */
    check_hc_step(4, 256, GGML_F32, false, false, false);   /* tiny width, F32 mixer, layer 0 */
    check_hc_step(2, 384, GGML_F16, true, true, false);
    mm_checks();
    check_attn(0, 0, 5, 128);
    check_attn(0, 500, 300, 192);        /* ring wrap, keep_raw > window */
    check_attn(4, 0, 300, 128);          /* every compressed row visible */
    check_attn(4, 2046, 10, 128);        /* (p+1)/4 crosses topk: 511 … 514 */
    check_attn(4, 3000, 1, 128);
    check_attn(128, 1000, 300, 128);
    check_attn(128, 0, 300, 160);
    /* decode (T 1) before and past the window, ring wrap, compressed rows
     * below and above top-k (selection); short chunks (models without
     * attn_chunk); the tiny model's shape */
    check_attn_g(true, AT_H, AT_HD, 0, 5, 1, 128);
    check_attn_g(true, AT_H, AT_HD, 0, 700, 1, 192);
    check_attn_g(true, AT_H, AT_HD, 4, 2047, 1, 128);
    check_attn_g(true, AT_H, AT_HD, 4, 2051, 1, 128);
    check_attn_g(true, AT_H, AT_HD, 4, 32767, 1, 128);
    check_attn_g(true, AT_H, AT_HD, 128, 300, 1, 128);
    check_attn_g(true, AT_H, AT_HD, 128, 40000, 1, 160);
    check_attn_g(true, AT_H, AT_HD, 4, 2040, 20, 160);
    check_attn_g(true, 8, 128, 4, 200, 37, 160);
    check_attn_g(true, 8, 128, 128, 1000, 5, 128);
    /* decode's compressor steps + indexer heads (k_comp_idx): emitting and not, first block, ring wrap */
    check_comp_idx(512, 4, 151, 64);
    check_comp_idx(512, 4, 3, 64);
    check_comp_idx(512, 4, 2050, 0);
    check_comp_idx(512, 128, 1023, 0);
    check_comp_idx(512, 128, 1000, 0);
    check_comp_idx(128, 4, 299, 4);   /* the tiny model's shape */
    check_idx(2046, 64);
    check_idx(14336, 12);
    check_idx(0, 5);
    check_idx_g(true, 64, 128, 32767, 1);   /* decode at 32K: 8192 rows */
    check_idx_g(true, 64, 128, 2050, 3);
    check_idx_g(true, 4, 128, 300, 9);      /* the tiny model's shape */
    check_idx_g(true, 72, 64, 1000, 1);     /* heads past 64: warps take two groups */
    /* last, so the checks above keep their random inputs */
    check_hc(3);   /* the register Sinkhorn's guards (hc < 4) */
    check_hc(1);
    check_hc(8);   /* hc > 4: the one-thread generic path */
    check_hc_step(1, 512, GGML_F32, true, true, false);   /* one stream: 2 blocks, one Gram entry */
}

/* --mm-bench: the prefill GEMM at the model's shapes, T = 2048 tokens. */
static int mm_bench(void) {
    static const struct { const char *what; int type; int64_t K, M; int mode; } S[] = {
        {"q_a 4096->1024", GGML_Q8_0, 4096, 1024, 0},
        {"q_b 1024->32768", GGML_Q8_0, 1024, 32768, 0},
        {"kv 4096->512", GGML_Q8_0, 4096, 512, 0},
        {"out_a group 4096->1024", GGML_Q8_0, 4096, 1024, 0},
        {"shared up 4096->2048", GGML_Q8_0, 4096, 2048, 0},
        {"shared down 2048->4096", GGML_Q8_0, 2048, 4096, 0},
        {"lm head 4096->129280", GGML_Q8_0, 4096, 129280, 0},
        {"q_b F16 1024->32768", GGML_F16, 1024, 32768, 0},
        {"q_b Q4_K 1024->32768", GGML_Q4_K, 1024, 32768, 0},
        {"experts gate+up 4096->2048", GGML_IQ2_XXS, 4096, 2048, 1},
        {"experts down 2048->4096", GGML_Q2_K, 2048, 4096, 2},
        {"experts gate+up 4096->2048", GGML_Q4_K, 4096, 2048, 1},
        {"experts down 2048->4096", GGML_Q4_K, 2048, 4096, 2},
        {"out_a 8 groups 4096->1024", GGML_Q8_0, 4096, 8192, 4},
        {"prep f32->f16 K=4096", GGML_F16, 4096, 1, 3},
        {"prep f32->f16 K=16384", GGML_F16, 16384, 1, 3},
        {"prep f32->f16 K=32768", GGML_F16, 32768, 1, 3},
    };
    const int64_t T = 2048;
    int rc = 0;
    for (size_t i = 0; i < sizeof S / sizeof *S; i++) {
        char err[256];
        double ms;
        if (ds4_cuda_mm_bench(S[i].type, S[i].K, S[i].M, T, S[i].mode, 256, 6, 20, rnd(), &ms, err, sizeof err)) {
            printf("%-28s %-8s %s\n", S[i].what, ggml_type_name((uint32_t)S[i].type), err);
            rc = 1;
            continue;
        }
        if (S[i].mode == 3) {   /* f32 read, f16 written */
            printf("%-28s %-8s T=%lld  %8.3f ms  %6.0f GB/s\n", S[i].what, "f32", (long long)T, ms, 6.0 * T * S[i].K / ms * 1e-6);
            fflush(stdout);
            continue;
        }
        /* dense (and groups) 2·T·M·K; experts 2·(T·used)·M·K per matrix, gate and up both */
        double fl = 2.0 * T * S[i].M * S[i].K * (S[i].mode == 1 || S[i].mode == 2 ? 6.0 : 1.0) * (S[i].mode == 1 ? 2.0 : 1.0);
        printf("%-28s %-8s T=%lld  %8.3f ms  %6.1f TFLOP/s\n", S[i].what, ggml_type_name((uint32_t)S[i].type),
               (long long)T, ms, fl / ms * 1e-9);
        fflush(stdout);
    }
    return rc;
}

/* --mv-bench: the decode matvecs at the model's shapes, each rows-a-warp
 * choice (nr 0 = the backend's own), weights read from DRAM. GB/s = weight
 * bytes / time. */
static int mv_bench(const char *only) {
    static const struct { const char *what; int type; int64_t K, M; int slots, groups; bool glu; } S[] = {
        {"routed gate+up 4096->2048", GGML_IQ2_XXS, 4096, 2048, 6, 1, true},
        {"routed down 2048->4096", GGML_Q2_K, 2048, 4096, 6, 1, false},
        {"q_a 4096->1024", GGML_Q8_0, 4096, 1024, 1, 1, false},
        {"kv 4096->512", GGML_Q8_0, 4096, 512, 1, 1, false},
        {"shared gate+up 4096->2048", GGML_Q8_0, 4096, 2048, 1, 1, true},
        {"shared down 2048->4096", GGML_Q8_0, 2048, 4096, 1, 1, false},
        {"q_b 1024->32768", GGML_Q8_0, 1024, 32768, 1, 1, false},
        {"out_a 8 x (4096->1024)", GGML_Q8_0, 4096, 8192, 1, 8, false},
        {"out_b 8192->4096", GGML_Q8_0, 8192, 4096, 1, 1, false},
        {"lm head 4096->129280", GGML_Q8_0, 4096, 129280, 1, 1, false},
    };
    /* the dense Q8_0 shapes on k_mv_rp: NR 4 with KS 1, 2, 4, each with and without the L2 prefetch */
    static const int rp[] = {0, 14, 24, 44, 114, 124, 144};
    int rc = 0;
    for (size_t i = 0; i < sizeof S / sizeof *S; i++) {
        if (only && !strstr(S[i].what, only)) continue;
        bool dense = S[i].type == GGML_Q8_0 && S[i].M >= 4096 && !S[i].glu;
        int k = 0;
        for (int nr = dense ? rp[0] : S[i].type == GGML_Q8_0 ? (S[i].glu ? -2 : -4) : -32;
             dense ? k < (int)(sizeof rp / sizeof *rp) : nr <= 4;
             nr = dense ? (++k < (int)(sizeof rp / sizeof *rp) ? rp[k] : 0)
                        : nr == -1 ? 0 : nr == -8 ? (S[i].glu ? -2 : -4) : nr < 0 ? nr / 2 : nr ? 2 * nr : 1) {
            char err[256];
            double us;
            double bytes = (double)ggml_row_bytes((uint32_t)S[i].type, (uint64_t)S[i].K) * S[i].M * S[i].slots * (S[i].glu ? 2 : 1);
            if (ds4_cuda_mv_bench(S[i].type, S[i].K, S[i].M, S[i].slots, S[i].groups, S[i].glu, nr, 20, rnd(), &us, err,
                                  sizeof err)) {
                printf("%-28s %-8s %s\n", S[i].what, ggml_type_name((uint32_t)S[i].type), err);
                rc = 1;
                continue;
            }
            printf("mv %-26s %-8s nr %d  %8.2f us  %6.0f GB/s\n", S[i].what, ggml_type_name((uint32_t)S[i].type), nr, us,
                   bytes / us * 1e-3);
            fflush(stdout);
        }
    }
    return rc;
}

/* ---- whole model ---------------------------------------------------------------------- */

typedef struct {
    const ds4_backend_ops *ops;
    void *be;
} bk;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int argmax(const float *v, int64_t n) {
    int b = 0;
    for (int64_t i = 1; i < n; i++) if (v[i] > v[b]) b = (int)i;
    return b;
}

/* Logits of positions [0, n) (all_logits) on a fresh state. */
static void *run_fresh(bk *b, uint32_t ctx, const int32_t *ids, size_t n, float *logits, char *err, size_t errlen) {
    void *st = b->ops->state_new(b->be, ctx, err, errlen);
    if (!st) return NULL;
    if (b->ops->eval(b->be, st, ids, n, logits, true, err, errlen)) { b->ops->state_free(b->be, st); return NULL; }
    return st;
}

/* Release path (QAT simulations on) or DS4_DIAG_EXACT_KV=1 (off). */
static bool g_qat = true;

static double arr_err(const float *a, const float *b, size_t n) { return n ? rel_err(a, b, (int64_t)n) : 0; }

/* Per-layer state comparison after the free-running prompt: the worst
 * component names where drift starts. A diagnostic more than a gate: a
 * position whose discrete choices flipped (see compare_logits) writes rows
 * that differ as a whole in every later layer, so deep layers reach a few
 * 1e-2 on the tiny model (seen: 2.2e-2 in layer 4 of 6 after 300 tokens)
 * while every teacher-forced step agrees to ~1e-6. The bound (1e-1) catches
 * a broken component (wrong rows are O(1) off), NaN and unwritten rows. */
static void compare_states(const ds4_kv_host *g, const ds4_kv_host *c, const ds4_hparams *hp) {
    for (uint32_t l = 0; l < c->n_layer; l++) {
        const ds4_kv_layer_host *a = &g->layers[l], *b = &c->layers[l];
        bool same = a->lo_raw == b->lo_raw && a->n_raw == b->n_raw && a->n_comp == b->n_comp &&
                    a->n_cpend == b->n_cpend && a->n_idx == b->n_idx && a->n_ipend == b->n_ipend;
        if (!same) { verdict("state layout", false, "layer %u: row counts differ", l); continue; }
        size_t W = ds4_comp_lanes(hp->compress_ratio[l]) * hp->head_dim, Wi = 2 * hp->idx_head_dim;
        double e[6] = {arr_err(a->raw, b->raw, (size_t)a->n_raw * hp->head_dim),
                       arr_err(a->comp, b->comp, (size_t)a->n_comp * hp->head_dim),
                       arr_err(a->ckv, b->ckv, (size_t)a->n_cpend * W), arr_err(a->cgate, b->cgate, (size_t)a->n_cpend * W),
                       arr_err(a->idx, b->idx, (size_t)a->n_idx * hp->idx_head_dim),
                       arr_err(a->ikv, b->ikv, (size_t)a->n_ipend * Wi)};
        char what[64];
        snprintf(what, sizeof what, "state layer %u (ratio %d)", l, hp->compress_ratio[l]);
        double worst = 0;
        for (int i = 0; i < 6; i++) worst = isnan(e[i]) || e[i] > worst ? e[i] : worst;
        /* QAT on: whole FP8/FP4 steps; off: f16 products and the flipped
         * choices of a few positions (see compare_chunked) */
        double bound = g_qat ? 0.3 : 3e-2;
        verdict(what, within(worst, bound), "raw %.2g comp %.2g ckv %.2g cgate %.2g idx %.2g ikv %.2g (bound %.0e)", e[0],
                e[1], e[2], e[3], e[4], e[5], bound);
    }
}

static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* CUDA vs CPU logits over n positions. The two differ by f32 rounding, which
 * the model's discrete steps can amplify at a few positions: FP8/FP4/f16
 * roundings at a boundary, a near-tied router or indexer choice. So the check
 * is: median error small, at most 2% of positions above `bound`, no NaN, and
 * the same argmax wherever the CPU's top two are apart by more than 1% of the
 * logit scale. The worst position is named. */
static bool compare_logits_flips(const char *what, const float *g, const float *c, size_t n, uint32_t V, double bound,
                                 size_t flips) {
    double *e = malloc(n * sizeof(double)), worst = 0;
    size_t mism = 0, hard = 0, over = 0, wpos = 0;
    bool nan = false;
    for (size_t t = 0; t < n; t++) {
        e[t] = rel_err(g + t * V, c + t * V, V);
        if (isnan(e[t])) { nan = true; e[t] = INFINITY; }
        if (e[t] > worst) { worst = e[t]; wpos = t; }
        over += e[t] > bound;
        int ag = argmax(g + t * V, V), ac = argmax(c + t * V, V);
        if (ag != ac) {
            mism++;
            float top = c[t * V + ac], second = -INFINITY, scale = 0;
            for (uint32_t i = 0; i < V; i++) {
                if ((int)i != ac && c[t * V + i] > second) second = c[t * V + i];
                scale = fmaxf(scale, fabsf(c[t * V + i]));
            }
            hard += top - second > 1e-2f * scale;
        }
    }
    qsort(e, n, sizeof *e, cmp_dbl);
    double med = e[n / 2];
    bool ok = !nan && med <= bound / 4 && over * 50 <= n + 50 * flips && hard <= flips;
    verdict(what, ok, "median rel %.2g, max %.2g at position %zu, %zu of %zu over %.0e; argmax differs at %zu (%zu beyond near-ties)%s",
            med, worst, wpos, over, n, bound, mism, hard, nan ? "; NaN" : "");
    free(e);
    return ok;
}

static bool compare_logits(const char *what, const float *g, const float *c, size_t n, uint32_t V, double bound) {
    return compare_logits_flips(what, g, c, n, V, bound, 0);
}

/* Comparisons that involve the chunked prefill, whose products round their
 * operands to f16 (~2.5e-4 relative per product, mm.cuh). With the QAT
 * simulations on, the FP8/FP4/f16 roundings of KV rows and indexer queries
 * sit on boundaries that such differences cross, and every crossing moves a
 * value by a whole FP8/FP4 step, so logits drift by ~1e-2 (measured on the
 * tiny and 4-layer flash-q2 models: median 1.6e-2 after 200–300 tokens; any
 * two implementations that do not round identically do the same). Those
 * runs report, and fail on NaN or a median above 5e-2 only. The same
 * comparisons under DS4_DIAG_EXACT_KV=1 (no QAT roundings) are the gate of
 * the chunk path (run.sh tinyx, flash4x): the strict bounds, except that
 * the discrete choices left — router top-6, indexer top-512 — still flip
 * where two candidates are within f16 rounding, and such a position then
 * differs as a whole (measured: 2–3% of positions above 2e-2, 1% of argmax
 * beyond near-ties, on tiny and 4-layer flash-q2); up to 2% of positions,
 * and at least one, may (the 4-layer check has 40 positions: one flip in 40
 * made it fail on several random seeds this session, main's build too;
 * the f32 decode path flips ~1000× less often: one-step checks). */
static void compare_chunked(const char *what, const float *g, const float *c, size_t n, uint32_t V) {
    if (!g_qat) { compare_logits_flips(what, g, c, n, V, 2e-2, (n + 49) / 50); return; }
    double *e = malloc(n * sizeof(double));
    bool nan = false;
    for (size_t t = 0; t < n; t++) {
        e[t] = rel_err(g + t * V, c + t * V, V);
        if (isnan(e[t])) { nan = true; e[t] = INFINITY; }
    }
    qsort(e, n, sizeof *e, cmp_dbl);
    verdict(what, !nan && e[n / 2] <= 5e-2, "median rel %.2g, max %.2g%s (QAT on: drift, bound 5e-2 on the median; "
            "strict under DS4_DIAG_EXACT_KV=1)", e[n / 2], e[n - 1], nan ? "; NaN" : "");
    free(e);
}

/* Error of one step without accumulated drift: at positions pos[0 … np)
 * (ascending) the CPU's state after t tokens is imported into CUDA and both
 * evaluate token t. Returns the verdict. */
static bool one_step_checks(const char *what, bk *cpu, bk *gpu, uint32_t ctx, const int32_t *ids, const size_t *pos,
                            size_t np, uint32_t V) {
    char err[512];
    void *sc = cpu->ops->state_new(cpu->be, ctx, err, sizeof err), *sg = gpu->ops->state_new(gpu->be, ctx, err, sizeof err);
    float *a = malloc((np + 1) * V * sizeof(float)), *b = malloc((np + 1) * V * sizeof(float));
    size_t k = 0, done = 0;
    bool ok = sc && sg;
    for (; ok && k < np; k++) {
        size_t t = pos[k];
        ds4_kv_host h;
        ok = !cpu->ops->eval(cpu->be, sc, ids + done, t - done, NULL, false, err, sizeof err) &&
             !cpu->ops->export_state(cpu->be, sc, &h, err, sizeof err);
        if (!ok) break;
        ok = !gpu->ops->import_state(gpu->be, sg, &h, err, sizeof err) &&
             !gpu->ops->eval(gpu->be, sg, ids + t, 1, b + k * V, false, err, sizeof err) &&
             !cpu->ops->eval(cpu->be, sc, ids + t, 1, a + k * V, false, err, sizeof err);
        done = t + 1;
        ds4_kv_host_free(&h);
    }
    bool pass = ok;
    if (!ok) verdict(what, false, "%s", err);
    /* With the QAT roundings on, one sampled position may still cross an
     * FP8 boundary: the two backends' K=V rows differ by f32 rounding, and a
     * value that lands on the other side moves by a whole FP8 step, which
     * moves that position's logits by ≈ 1e-3 (2 of ≈ 10 random seeds in
     * session 5: 1.1e-3 and 1.6e-3, medians ≈ 3e-6). One such position is
     * allowed; under DS4_DIAG_EXACT_KV=1 none is. */
    else pass = compare_logits_flips(what, b, a, np, V, 1e-3, g_qat ? 1 : 0);
    if (sc) cpu->ops->state_free(cpu->be, sc);
    if (sg) gpu->ops->state_free(gpu->be, sg);
    free(a); free(b);
    return pass;
}

static int model_checks(const char *path, size_t n_tok, uint32_t ctx, int bench) {
    char err[512];
    ds4_model m;
    memset(&m, 0, sizeof m);
    double t0 = now();
    if (ds4_model_load(&m, path, err, sizeof err)) { fprintf(stderr, "ds4-gpucheck: %s\n", err); return 1; }
    const ds4_hparams *hp = &m.hp;
    uint32_t V = hp->n_vocab;
    g_qat = !cpu_diag_exact_kv();
    if (!g_qat) printf("DS4_DIAG_EXACT_KV: no QAT roundings in either backend (strict bounds on the chunk path)\n");
    printf("model %s: %u layers, n_embd %u, vocab %u, %.2f GiB of weights (load %.1fs)\n", path, hp->n_layer,
           hp->n_embd, V, ds4_model_weight_bytes(&m) / 1073741824.0, now() - t0);
    bk cpu = {&ds4_backend_cpu, NULL}, gpu = {&ds4_backend_cuda, NULL};
    t0 = now();
    if (!(gpu.be = gpu.ops->create(&m, 0, err, sizeof err))) { verdict("cuda create", false, "%s", err); return 1; }
    printf("cuda create + upload: %.2fs\n", now() - t0);
    if (!(cpu.be = cpu.ops->create(&m, 0, err, sizeof err))) { fprintf(stderr, "cpu: %s\n", err); return 1; }
    if (ctx < n_tok + 64) ctx = (uint32_t)n_tok + 64;

    int32_t *ids = malloc((n_tok + 64) * sizeof(int32_t));
    for (size_t i = 0; i < n_tok + 64; i++) ids[i] = (int32_t)(rnd() % V);
    float *lc = malloc(n_tok * V * sizeof(float)), *lg = malloc(n_tok * V * sizeof(float));
    float *a = malloc(V * sizeof(float)), *b = malloc(V * sizeof(float)), *c = malloc(V * sizeof(float));
    for (size_t i = 0; i < n_tok * V; i++) lg[i] = NAN;   /* poisoned: every position must be written */

    t0 = now();
    void *sc = run_fresh(&cpu, ctx, ids, n_tok, lc, err, sizeof err);
    double tc = now() - t0;
    if (!sc) { fprintf(stderr, "cpu eval: %s\n", err); return 1; }
    t0 = now();
    void *sg = run_fresh(&gpu, ctx, ids, n_tok, lg, err, sizeof err);
    double tg = now() - t0;
    if (!sg) { verdict("cuda eval", false, "%s", err); return 1; }
    printf("prefill %zu tokens: cpu %.2fs, cuda %.2fs (chunked, all logits)\n", n_tok, tc, tg);
    compare_chunked("logits cuda (chunked prefill) vs cpu, every position", lg, lc, n_tok, V);
    /* One decode step (f32 matvecs) from the CPU's state: no accumulated
     * drift, so the strict bound holds with QAT on too. */
    {
        size_t stride = n_tok / 12 ? n_tok / 12 : 1, sp[13], k = 0;
        for (size_t t = stride - 1; t < n_tok && k < 13; t += stride) sp[k++] = t;
        one_step_checks("one step from the cpu state (sampled positions)", &cpu, &gpu, ctx, ids, sp, k, V);
    }

    /* Graph replay vs eager launches: the same kernels, so the same bits. */
    bk eager = {&ds4_backend_cuda, NULL};
    setenv("DS4_CUDA_GRAPHS", "0", 1);
    eager.be = eager.ops->create(&m, 0, err, sizeof err);
    unsetenv("DS4_CUDA_GRAPHS");
    if (!eager.be) verdict("cuda create (eager)", false, "%s", err);
    else {
        float *le = malloc(n_tok * V * sizeof(float));
        t0 = now();
        void *se = run_fresh(&eager, ctx, ids, n_tok, le, err, sizeof err);
        double te = now() - t0;
        size_t diff = 0;
        for (size_t i = 0; se && i < n_tok * V; i++) diff += le[i] != lg[i];
        verdict("cuda graphs == eager launches", se && diff == 0, "%zu of %zu logits differ; eager prefill %.2fs",
                diff, n_tok * V, te);
        if (se) eager.ops->state_free(eager.be, se);
        free(le);
    }

    ds4_kv_host hg, hc;
    if (gpu.ops->export_state(gpu.be, sg, &hg, err, sizeof err)) { verdict("cuda export", false, "%s", err); return 1; }
    if (cpu.ops->export_state(cpu.be, sc, &hc, err, sizeof err)) { fprintf(stderr, "cpu export: %s\n", err); return 1; }
    compare_states(&hg, &hc, hp);

    /* Decode (one token per call: f32 matvecs, CUDA graphs) vs the chunked
     * prefill (f16 tensor-core products): the same function to f16 operand
     * rounding, so the free-running bounds of the CPU comparison apply. */
    {
        float *ld = malloc(n_tok * V * sizeof(float));
        void *s2 = gpu.ops->state_new(gpu.be, ctx, err, sizeof err);
        bool ok = s2 != NULL;
        for (size_t t = 0; ok && t < n_tok; t++) ok = !gpu.ops->eval(gpu.be, s2, ids + t, 1, ld + t * V, false, err, sizeof err);
        if (!ok) verdict("cuda decode vs chunked prefill", false, "%s", err);
        else compare_chunked("cuda decode vs chunked prefill, every position", ld, lg, n_tok, V);
        if (s2) gpu.ops->state_free(gpu.be, s2);
        /* eval_top (greedy decode: the logits stay on the device) runs the
         * same kernels as eval, so its argmax is the sampler's on eval's
         * logits and its kept logits are those bit for bit: every decode
         * step, then the whole prompt as chunks. */
        float *kept = malloc(V * sizeof(float)), *last = malloc(V * sizeof(float));
        size_t bad_top = 0, bad_kept = 0;
        int32_t top = -1;
        s2 = gpu.ops->state_new(gpu.be, ctx, err, sizeof err);
        ok = s2 != NULL;
        for (size_t t = 0; ok && t < n_tok; t++) {
            ok = !gpu.ops->eval_top(gpu.be, s2, ids + t, 1, &top, err, sizeof err) &&
                 !gpu.ops->last_logits(gpu.be, s2, kept, err, sizeof err);
            bad_top += ok && top != ds4_argmax(ld + t * V, V);
            bad_kept += ok && memcmp(kept, ld + t * V, V * sizeof(float)) != 0;
        }
        void *s3 = ok ? gpu.ops->state_new(gpu.be, ctx, err, sizeof err) : NULL;
        ok = s3 && !gpu.ops->truncate(gpu.be, s2, 0, err, sizeof err) &&
             !gpu.ops->eval_top(gpu.be, s2, ids, n_tok, &top, err, sizeof err) &&
             !gpu.ops->last_logits(gpu.be, s2, kept, err, sizeof err) &&
             !gpu.ops->eval(gpu.be, s3, ids, n_tok, last, false, err, sizeof err);
        bool chunk_same = ok && top == ds4_argmax(last, V) && !memcmp(kept, last, V * sizeof(float));
        if (!ok) verdict("cuda eval_top", false, "%s", err);
        else verdict("cuda eval_top == eval: argmax and kept logits, every decode step and a prefill",
                     bad_top == 0 && bad_kept == 0 && chunk_same, "%zu of %zu argmax differ, %zu kept rows not bit-equal; prefill %s",
                     bad_top, n_tok, bad_kept, chunk_same ? "same" : "differs");
        if (s2) gpu.ops->state_free(gpu.be, s2);
        if (s3) gpu.ops->state_free(gpu.be, s3);
        free(kept); free(last);
        /* Chunk boundaries: the prompt in uneven pieces (ring stores after and
         * during a chunk, compressor blocks spanning pieces) must give what one
         * chunk gave; reported bit for bit, judged by the same bounds. */
        size_t cuts[] = {1, 37, 100, 130, 300, 301};
        s2 = gpu.ops->state_new(gpu.be, ctx, err, sizeof err);
        ok = s2 != NULL;
        size_t done = 0;
        for (size_t i = 0; ok && done < n_tok; i++) {
            size_t k = i < sizeof cuts / sizeof *cuts ? cuts[i] : n_tok;
            if (k > n_tok - done) k = n_tok - done;
            ok = !gpu.ops->eval(gpu.be, s2, ids + done, k, ld + done * V, true, err, sizeof err);
            done += k;
        }
        size_t diff = 0;
        for (size_t i = 0; ok && i < n_tok * V; i++) diff += ld[i] != lg[i];
        if (!ok) verdict("cuda prefill in pieces vs one chunk", false, "%s", err);
        else {
            char what[128];
            snprintf(what, sizeof what, "cuda prefill in pieces 1,37,100,130,300,… vs one chunk (%zu of %zu logits not bit-equal)",
                     diff, n_tok * V);
            compare_chunked(what, ld, lg, n_tok, V);
        }
        if (s2) gpu.ops->state_free(gpu.be, s2);
        free(ld);
    }
    /* Rewind: truncate by a few tokens and re-evaluate them (a chunk of 8). */
    {
        size_t back = n_tok > 8 ? 8 : n_tok - 1;
        bool ok = !gpu.ops->truncate(gpu.be, sg, (uint32_t)(n_tok - back), err, sizeof err) &&
                  !gpu.ops->eval(gpu.be, sg, ids + n_tok - back, back, a, false, err, sizeof err);
        size_t diff = 0;
        for (uint32_t i = 0; ok && i < V; i++) diff += a[i] != lg[(n_tok - 1) * V + i];
        if (!ok) verdict("cuda truncate + re-eval", false, "%s", err);
        else {
            char what[96];
            snprintf(what, sizeof what, "cuda truncate 8 + re-eval (%zu of %u logits not bit-equal)", diff, V);
            compare_chunked(what, a, lg + (n_tok - 1) * V, 1, V);
        }
    }
    /* Snapshots across backends: CUDA's exported state imported by both
     * backends, then the CPU's by CUDA, and one token (decode) from each:
     * the same state in, so the strict one-step bound holds. */
    {
        const int32_t *more = ids + n_tok;
        void *x = cpu.ops->state_new(cpu.be, ctx, err, sizeof err), *y = gpu.ops->state_new(gpu.be, ctx, err, sizeof err);
        bool ok = x && y && !cpu.ops->import_state(cpu.be, x, &hg, err, sizeof err) &&
                  !gpu.ops->import_state(gpu.be, y, &hg, err, sizeof err) &&
                  !cpu.ops->eval(cpu.be, x, more, 1, a, false, err, sizeof err) &&
                  !gpu.ops->eval(gpu.be, y, more, 1, b, false, err, sizeof err);
        if (!ok) verdict("snapshot cuda -> cpu", false, "%s", err);
        else compare_logits("snapshot cuda -> cpu + cuda, one step", a, b, 1, V, 1e-3);
        ok = ok && !gpu.ops->truncate(gpu.be, y, 0, err, sizeof err) &&
             !gpu.ops->import_state(gpu.be, y, &hc, err, sizeof err) &&
             !gpu.ops->eval(gpu.be, y, more, 1, c, false, err, sizeof err) &&
             !cpu.ops->eval(cpu.be, sc, more, 1, a, false, err, sizeof err);
        if (!ok) verdict("snapshot cpu -> cuda", false, "%s", err);
        else compare_logits("snapshot cpu -> cuda, one step", c, a, 1, V, 1e-3);
        if (x) cpu.ops->state_free(cpu.be, x);
        if (y) gpu.ops->state_free(gpu.be, y);
    }
    ds4_kv_host_free(&hg);
    ds4_kv_host_free(&hc);

    if (bench > 0) {
        for (int pass = 0; pass < 2; pass++) {
            /* Decode speed: one token per eval (each call ends with a device
             * sync), after a prompt of n_tok tokens; 4 warm-up steps. */
            bk *g = pass == 0 ? &gpu : &eager;
            if (!g->be) continue;
            void *s3 = g->ops->state_new(g->be, ctx + (uint32_t)bench + 8, err, sizeof err);
            if (s3 && !g->ops->eval(g->be, s3, ids, n_tok, NULL, false, err, sizeof err)) {
                double tb = 0;
                for (int i = 0; i < bench + 4; i++) {
                    int32_t tok = argmax(a, V);
                    if (i == 4) tb = now();
                    if (g->ops->eval(g->be, s3, &tok, 1, a, false, err, sizeof err)) break;
                }
                double dt = now() - tb;
                printf("decode (%s): %d tokens after a %zu-token prompt: %.3f ms/token, %.1f tok/s\n",
                       pass == 0 ? "graphs" : "eager", bench, n_tok, 1e3 * dt / bench, bench / dt);
            } else fprintf(stderr, "bench: %s\n", err);
            if (s3) g->ops->state_free(g->be, s3);
        }
    }
    if (eager.be) eager.ops->destroy(eager.be);
    gpu.ops->state_free(gpu.be, sg);
    cpu.ops->state_free(cpu.be, sc);
    gpu.ops->destroy(gpu.be);
    cpu.ops->destroy(cpu.be);
    ds4_model_free(&m);
    free(ids); free(lc); free(lg); free(a); free(b); free(c);
    return 0;
}

/* GPU only, no checks: load, upload, evaluate n_tok tokens (for profilers),
 * then time `bench` decode steps at that context. */
static int profile_run(const char *path, size_t n_tok, int bench) {
    char err[512];
    ds4_model m;
    memset(&m, 0, sizeof m);
    if (ds4_model_load(&m, path, err, sizeof err)) { fprintf(stderr, "ds4-gpucheck: %s\n", err); return 1; }
    void *be = ds4_backend_cuda.create(&m, 0, err, sizeof err), *st = NULL;
    float *lg = malloc(m.hp.n_vocab * sizeof(float));
    int32_t *ids = malloc(n_tok * sizeof(int32_t));
    for (size_t i = 0; i < n_tok; i++) ids[i] = (int32_t)(rnd() % m.hp.n_vocab);
    double t0 = now();
    int rc = !be || !(st = ds4_backend_cuda.state_new(be, (uint32_t)n_tok + 2 * bench + 8, err, sizeof err)) ||
             ds4_backend_cuda.eval(be, st, ids, n_tok, lg, false, err, sizeof err);
    if (rc) fprintf(stderr, "ds4-gpucheck: %s\n", err);
    else printf("profile run: %zu tokens in %.3fs, argmax %d\n", n_tok, now() - t0, argmax(lg, m.hp.n_vocab));
    if (!rc && bench > 0) {
        /* A profiler started with --profile-from-start off sees the decode
         * steps only (the prompt was a prefill chunk). */
        ds4_cuda_profiler(true);
        double t_am = 0;
        t0 = now();
        for (int i = 0; i < bench && !rc; i++) {
            double ta = now();
            int32_t tok = argmax(lg, m.hp.n_vocab);
            t_am += now() - ta;
            rc = ds4_backend_cuda.eval(be, st, &tok, 1, lg, false, err, sizeof err);
        }
        ds4_cuda_profiler(false);
        double dt = now() - t0;
        printf("decode: %d tokens at context %zu: %.3f ms/token, %.1f tok/s\n", bench, n_tok, 1e3 * dt / bench,
               bench / dt);
        /* Where the host's share of a step goes: the same steps without the
         * logits (no head graph, no copy to the host) and the host argmax. */
        int32_t tok = argmax(lg, m.hp.n_vocab);
        t0 = now();
        for (int i = 0; i < bench && !rc; i++) rc = ds4_backend_cuda.eval(be, st, &tok, 1, NULL, false, err, sizeof err);
        double dn = now() - t0;
        if (!rc)
            printf("decode host share: body only (no logits) %.3f ms/token; host argmax %.1f us/token\n",
                   1e3 * dn / bench, 1e6 * t_am / bench);
    }
    if (st) ds4_backend_cuda.state_free(be, st);
    if (be) ds4_backend_cuda.destroy(be);
    ds4_model_free(&m);
    free(lg); free(ids);
    return rc;
}

static void usage(FILE *f) {
    fprintf(f, "usage: ds4-gpucheck [--kernels] [--mm-bench] [--mv-bench [--mv-only S]] [--attn-bench] [--model FILE [--tokens N] [--ctx C] [--bench T] [--profile]] [--seed S]\n"
               "  --profile  evaluate N tokens on the GPU only, no checks (run under ncu)\n");
}

int main(int argc, char **argv) {
    bool kernels = false, abench = false;
    const char *model = NULL;
    size_t n_tok = 300;
    uint32_t ctx = 0;
    int bench = 0;
    bool profile = false, mmb = false, mvb = false;
    const char *mv_only = NULL;
    rs = (uint64_t)time(NULL) * 2654435761u | 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--kernels")) kernels = true;
        else if (!strcmp(a, "--mm-bench")) mmb = true;
        else if (!strcmp(a, "--mv-bench")) mvb = true;
        else if (!strcmp(a, "--mv-only") && v) { mv_only = v; i++; }
        else if (!strcmp(a, "--attn-bench")) abench = true;
        else if (!strcmp(a, "--profile")) profile = true;
        else if (!strcmp(a, "--model") && v) { model = v; i++; }
        else if (!strcmp(a, "--tokens") && v) { n_tok = strtoul(v, NULL, 10); i++; }
        else if (!strcmp(a, "--ctx") && v) { ctx = (uint32_t)strtoul(v, NULL, 10); i++; }
        else if (!strcmp(a, "--bench") && v) { bench = atoi(v); i++; }
        else if (!strcmp(a, "--seed") && v) { rs = strtoull(v, NULL, 10) | 1; i++; }
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else { usage(stderr); return 2; }
    }
    if ((!kernels && !model && !mmb && !mvb && !abench) || n_tok < 2 || n_tok > 100000) { usage(stderr); return 2; }
    if (!ds4_backend_cuda.available()) {
        fprintf(stderr, "ds4-gpucheck: no CUDA device available\n");
        return 1;
    }
    if (profile) return model ? profile_run(model, n_tok, bench) : 2;
    if (mmb) return mm_bench();
    if (mvb) return mv_bench(mv_only);
    printf("seed %llu\n", (unsigned long long)rs);
    if (kernels) kernel_checks();
    if (abench) attn_bench();
    if (model && model_checks(model, n_tok, ctx, bench)) n_fail++;
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
#endif
