/* CPU reference: numeric building blocks against hand-computed values, then
 * the tiny model: chunked prefill vs token-by-token decode (bit-identical),
 * thread-count and run-to-run determinism, state facts (compressed rows,
 * indexer subset), sane logits, truncation, and the MTP block. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cpu/cpu.h"
#include "quant/quant.h"
#include "test.h"

/* ---- building blocks ------------------------------------------------------------- */

static void test_e4m3(void) {
    CHECK(cpu_e4m3_round(1.0f) == 1.0f);
    CHECK(cpu_e4m3_round(1.0625f) == 1.0f, "tie 8.5 quanta -> even 8");
    CHECK(cpu_e4m3_round(1.1875f) == 1.25f, "tie 9.5 quanta -> even 10");
    CHECK(cpu_e4m3_round(-1.1875f) == -1.25f);
    CHECK(cpu_e4m3_round(1.2f) == 1.25f);
    CHECK(cpu_e4m3_round(448.0f) == 448.0f);
    CHECK(cpu_e4m3_round(440.0f) == 448.0f, "[256,512) has quantum 32");
    CHECK(cpu_e4m3_round(0x1p-6f) == 0x1p-6f, "smallest normal");
    CHECK(cpu_e4m3_round(2.5f * 0x1p-9f) == 2.0f * 0x1p-9f, "subnormal tie -> even");
    CHECK(cpu_e4m3_round(3.5f * 0x1p-9f) == 4.0f * 0x1p-9f, "subnormal tie -> even");
    CHECK(cpu_e4m3_round(0x1p-10f) == 0.0f, "half the smallest subnormal -> 0");
    CHECK(cpu_e4m3_round(0.6f * 0x1p-9f) == 0x1p-9f);
}

static void test_fp8_sim(void) {
    float x[128] = {0};
    x[0] = 1.0f; x[1] = 0.3f; x[2] = -0.3f; x[63] = 0.001f;   /* block 0: amax 1 -> s = 2^-8 */
    x[64] = 1e-6f;                                             /* block 1: amax floor 1e-4 -> s = 2^-22 */
    cpu_fp8_sim(x, 128);
    CHECK(x[0] == 1.0f);
    CHECK(x[1] == 0.3125f, "0.3·256 = 76.8 -> 80 (quantum 8) -> %g", x[1]);
    CHECK(x[2] == -0.3125f);
    CHECK(x[63] == 0x1p-10f, "0.001·256 = 0.256 -> 0.25 -> %g", x[63]);
    CHECK(x[64] == 4.0f * 0x1p-22f, "1e-6·2^22 = 4.19 -> 4 -> %g", x[64]);
    CHECK(x[5] == 0.0f);
    /* A block whose max is exactly 448·2^k keeps it (scale exactly 2^k). */
    float y[64];
    for (int i = 0; i < 64; i++) y[i] = (i % 7) * 0.5f;
    y[10] = 448.0f * 4;
    cpu_fp8_sim(y, 64);
    CHECK(y[10] == 1792.0f && y[2] == 1.0f, "%g %g", y[10], y[2]);
    CHECK(cpu_pow2_ceil(1.0f) == 1.0f && cpu_pow2_ceil(1.0001f) == 2.0f && cpu_pow2_ceil(0.3f) == 0.5f);
}

static void test_e2m1_fp4(void) {
    float in[] = {0.25f, 0.26f, 0.74f, 0.75f, 1.25f, 1.3f, 1.75f, 2.5f, 2.6f, 3.5f, 5.0f, 5.01f, 6.0f, -2.6f, -0.1f};
    float want[] = {0, 0.5f, 0.5f, 1, 1, 1.5f, 2, 2, 3, 4, 4, 6, 6, -3, -0.0f};
    for (size_t i = 0; i < sizeof in / sizeof *in; i++)
        CHECK(cpu_e2m1_round(in[i]) == want[i], "%g -> %g, want %g", in[i], cpu_e2m1_round(in[i]), want[i]);
    /* e0 -> Hadamard gives 128 × 1/sqrt(128) = 0.0884; s = 2^-6, 5.66 -> 6 -> 0.09375. */
    float x[128] = {1.0f};
    cpu_fp4_sim(x, 128);
    int ok = 1;
    for (int i = 0; i < 128; i++) ok &= x[i] == 0.09375f;
    CHECK(ok, "x[0] = %g", x[0]);
}

static void test_hadamard(void) {
    enum { N = 128 };
    static float h[N][N];
    for (int i = 0; i < N; i++) {
        memset(h[i], 0, sizeof h[i]);
        h[i][i] = 1;
        cpu_hadamard(h[i], N);
    }
    double worst = 0;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            double d = 0;
            for (int k = 0; k < N; k++) d += (double)h[i][k] * h[j][k];
            worst = fmax(worst, fabs(d - (i == j)));
        }
    CHECK(worst < 1e-6, "H·Hᵀ deviates from I by %g", worst);
    CHECK(fabsf(h[0][5] - 0.08838835f) < 1e-7 && h[1][1] < 0 && h[1][0] > 0, "Sylvester order");
    float v[N];
    for (int i = 0; i < N; i++) v[i] = (float)(i % 5) - 2.0f;
    float w[N];
    memcpy(w, v, sizeof v);
    cpu_hadamard(w, N);
    cpu_hadamard(w, N);   /* normalised Sylvester H is its own inverse */
    double e = 0;
    for (int i = 0; i < N; i++) e = fmax(e, fabs(w[i] - v[i]));
    CHECK(e < 1e-5, "H·H·v != v (%g)", e);
}

static void test_yarn(void) {
    ds4_hparams hp;
    ds4_hparams_flash(&hp);
    double f[32], p[32];
    int lo, hi;
    cpu_rope_freqs(&hp, true, f, &lo, &hi);
    cpu_rope_freqs(&hp, false, p, NULL, NULL);
    CHECK(lo == 15 && hi == 25, "lo %d hi %d", lo, hi);
    CHECK(f[0] == 1.0 && p[0] == 1.0);
    CHECK(fabs(f[15] - pow(160000, -15.0 / 32)) < 1e-15, "pair 15 keeps θ");
    CHECK(fabs(f[25] - pow(160000, -25.0 / 32) / 16) < 1e-15, "pair 25 uses θ/16");
    CHECK(fabs(f[31] - pow(160000, -31.0 / 32) / 16) < 1e-15);
    double t20 = pow(160000, -20.0 / 32);
    CHECK(fabs(f[20] - (t20 * 0.5 + t20 / 16 * 0.5)) < 1e-15, "pair 20 blends halfway");
    CHECK(fabs(p[16] - pow(10000, -0.5)) < 1e-15, "window layers: plain base 1e4");
    float x[2] = {1, 0};
    double one = 1.0;
    cpu_rope(x, 1, &one, 1, false);
    CHECK(fabsf(x[0] - cosf(1)) < 1e-7 && fabsf(x[1] - sinf(1)) < 1e-7, "interleaved pair rotation");
    cpu_rope(x, 1, &one, 1, true);
    CHECK(fabsf(x[0] - 1) < 1e-7 && fabsf(x[1]) < 1e-7, "inverse rotation");
}

static void test_sinkhorn(void) {
    float mix[24], scale[3] = {0.5f, 0.5f, 0.5f}, base[24] = {0};
    uint32_t s = 7;
    for (int i = 0; i < 24; i++) { s = s * 1103515245u + 12345u; mix[i] = (float)((s >> 9) % 2000) / 250.0f - 4.0f; }
    float pre[4], post[4], C[16];
    cpu_hc_coeffs(mix, scale, base, 4, 20, 1e-6f, pre, post, C);
    for (int a = 0; a < 4; a++) {
        float r = 0, c = 0;
        for (int b = 0; b < 4; b++) { r += C[a * 4 + b]; c += C[b * 4 + a]; }
        CHECK(fabsf(c - 1) < 1e-5, "column %d sums to %g", a, c);
        CHECK(fabsf(r - 1) < 1e-3, "row %d sums to %g", a, r);
        float sp = 1 / (1 + expf(-mix[a] * 0.5f));
        CHECK(pre[a] == sp + 1e-6f, "pre = sigmoid + eps");
        CHECK(post[a] > 0 && post[a] < 2);
    }
    /* One iteration = softmax rows + eps, then one column pass. */
    float z[24] = {0};
    cpu_hc_coeffs(z, scale, base, 4, 1, 1e-6f, pre, post, C);
    CHECK(fabsf(C[0] - (0.25f + 1e-6f) / (1.0f + 4e-6f + 1e-6f)) < 1e-7, "%g", C[0]);
    CHECK(pre[0] == 0.5f + 1e-6f && post[0] == 1.0f);
}

static void test_router_swiglu(void) {
    CHECK(fabsf(cpu_router_score(0) - sqrtf(logf(2))) < 1e-7);
    CHECK(cpu_router_score(30) == sqrtf(30), "z > 20: softplus = z");
    CHECK(fabsf(cpu_router_score(-30) - sqrtf(expf(-30))) < 1e-12f, "z < -20: softplus = e^z");
    CHECK(fabsf(cpu_router_score(1) - sqrtf(log1pf(expf(1)))) < 1e-7);
    float s10 = 1 / (1 + expf(-10.0f));
    CHECK(cpu_swiglu(20, 20, 10) == 10 * s10 * 10, "gate and up clamp at 10");
    CHECK(cpu_swiglu(2, -20, 10) == 2 * (1 / (1 + expf(-2.0f))) * -10, "up clamps below at -10");
    CHECK(cpu_swiglu(-20, 1, 10) == -20 * (1 / (1 + expf(20.0f))), "gate has no lower clamp");
}

static void test_attend_sink(void) {
    float q[2] = {1, 0}, k1[2] = {1, 0}, k2[2] = {0, 1}, sc[2], o[2];
    const float *rows[2] = {k1, k2};
    cpu_attend(q, rows, 2, 2, 1.0f, 0.0f, sc, o);
    float e = expf(-1.0f), den = 1 + e + e;   /* scores 1, 0; sink 0; max 1 */
    CHECK(fabsf(o[0] - 1 / den) < 1e-6 && fabsf(o[1] - e / den) < 1e-6, "%g %g", o[0], o[1]);
    cpu_attend(q, rows, 2, 2, 1.0f, -INFINITY, sc, o);   /* no sink: plain softmax */
    CHECK(fabsf(o[0] - 1 / (1 + e)) < 1e-6);
    cpu_attend(q, rows, 2, 2, 1.0f, 50.0f, sc, o);       /* a huge sink swallows the mass */
    CHECK(fabsf(o[0]) < 1e-6 && fabsf(o[1]) < 1e-6);
}

static void test_topk(void) {
    float s[] = {1, 3, 3, 2, 3, -1};
    int32_t o[6];
    cpu_topk(s, 6, 2, o);
    CHECK(o[0] == 1 && o[1] == 2, "ties: lowest index wins (%d %d)", o[0], o[1]);
    cpu_topk(s, 6, 4, o);
    CHECK(o[0] == 1 && o[1] == 2 && o[2] == 3 && o[3] == 4, "ascending output");
    float n[] = {-5, -2, -3};
    cpu_topk(n, 3, 1, o);
    CHECK(o[0] == 1, "negative scores rank by value");
}

/* ---- tiny model -------------------------------------------------------------------- */

#define NTOK 300

static ds4_model model;
static bool have_model, have_mtp;
static int32_t ids[NTOK];
static float *ref;           /* NTOK × vocab: token-by-token decode, 2 threads */

static void load_tiny(void) {
    static char path[256], mtp[280];
    bool generated;
    if (test_tiny_model(path, sizeof path, &generated)) return;
    char err[512];
    if (ds4_model_load(&model, path, err, sizeof err)) { fprintf(stderr, "%s\n", err); return; }
    have_model = true;
    snprintf(mtp, sizeof mtp, "%.*s-mtp.gguf", (int)(strlen(path) - 5), path);
    have_mtp = !access(mtp, R_OK) && !ds4_model_load_mtp(&model, mtp, err, sizeof err);
    if (generated) test_tiny_remove(path);
    uint32_t x = 12345;
    for (int i = 0; i < NTOK; i++) { x = x * 1664525u + 1013904223u; ids[i] = (int32_t)((x >> 8) % model.hp.n_vocab); }
}

/* Evaluate ids with the given chunk schedule (cycled), all logits. */
static int run(int threads, const int *sched, int n_sched, float *out, cpu_state **keep, cpu_backend **keep_be) {
    char err[256];
    cpu_backend *be = cpu_backend_new(&model, threads, err, sizeof err);
    if (!be) { fprintf(stderr, "%s\n", err); return -1; }
    cpu_state *st = cpu_state_new(be, 1024, err, sizeof err);
    int rc = st ? 0 : -1;
    for (int i = 0, k = 0; !rc && i < NTOK; k++) {
        int c = sched[k % n_sched];
        if (c > NTOK - i) c = NTOK - i;
        rc = cpu_eval(be, st, ids + i, (size_t)c, out + (size_t)i * model.hp.n_vocab, true, NULL, err, sizeof err);
        i += c;
    }
    if (rc) fprintf(stderr, "%s\n", err);
    if (keep && !rc) { *keep = st; *keep_be = be; return 0; }
    cpu_state_free(st);
    cpu_backend_free(be);
    return rc;
}

static size_t first_diff(const float *a, const float *b) {
    size_t n = (size_t)NTOK * model.hp.n_vocab;
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], 4)) return i / model.hp.n_vocab;
    return SIZE_MAX;
}

static void test_decode_reference(void) {
    REQUIRE(have_model, "tiny model missing");
    ref = malloc((size_t)NTOK * model.hp.n_vocab * sizeof(float));
    int one = 1;
    REQUIRE(run(2, &one, 1, ref, NULL, NULL) == 0);
    /* Logits finite and non-degenerate at every position. */
    uint32_t V = model.hp.n_vocab;
    int bad = -1;
    for (int p = 0; p < NTOK && bad < 0; p++) {
        const float *l = ref + (size_t)p * V;
        double s = 0, s2 = 0;
        for (uint32_t v = 0; v < V; v++) {
            if (!isfinite(l[v])) { bad = p; break; }
            s += l[v]; s2 += (double)l[v] * l[v];
        }
        double sd = sqrt(s2 / V - (s / V) * (s / V));
        if (sd < 0.1 || sd > 100) bad = p;
    }
    CHECK(bad < 0, "logits at position %d are not finite or degenerate", bad);
    CHECK(memcmp(ref, ref + V, V * sizeof(float)) != 0, "positions give different logits");
}

static void test_chunked_equals_decode(void) {
    REQUIRE(ref);
    float *out = malloc((size_t)NTOK * model.hp.n_vocab * sizeof(float));
    struct { const char *name; int threads; int sched[4]; int n; } cases[] = {
        {"whole", 1, {NTOK}, 1}, {"129", 1, {129}, 1}, {"64", 1, {64}, 1},
        {"3 and 7, 3 threads", 3, {3, 7}, 2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        REQUIRE(run(cases[i].threads, cases[i].sched, cases[i].n, out, NULL, NULL) == 0);
        size_t d = first_diff(ref, out);
        CHECK(d == SIZE_MAX, "chunks %s differ from decode first at position %zu", cases[i].name, d);
    }
    free(out);
}

static void test_state_facts_and_repeat(void) {
    REQUIRE(ref);
    float *out = malloc((size_t)NTOK * model.hp.n_vocab * sizeof(float));
    int whole = NTOK;
    cpu_state *st = NULL;
    cpu_backend *be = NULL;
    REQUIRE(run(1, &whole, 1, out, &st, &be) == 0);
    CHECK(first_diff(ref, out) == SIZE_MAX, "second whole run differs");
    int n4 = 0, n128 = 0;
    for (uint32_t l = 0; l < model.hp.n_layer; l++) {
        uint32_t nc, ni, sel, vis;
        cpu_state_rows(st, (int)l, &nc, &ni);
        cpu_state_last_selection(st, (int)l, &sel, &vis);
        int r = model.hp.compress_ratio[l];
        if (r == 4) {
            n4++;
            CHECK(nc == NTOK / 4 && ni == NTOK / 4, "layer %u rows %u/%u", l, nc, ni);
            CHECK(vis == NTOK / 4 && sel == model.hp.idx_top_k && sel < vis, "layer %u: indexer picks %u of %u", l, sel, vis);
        } else if (r == 128) {
            n128++;
            CHECK(nc == NTOK / 128 && ni == 0, "layer %u rows %u", l, nc);
        } else {
            CHECK(nc == 0 && ni == 0);
        }
    }
    CHECK(n4 >= 1 && n128 >= 1, "tiny has both compressed layer kinds");
    cpu_state_free(st);
    cpu_backend_free(be);
    free(out);
}

/* Truncate inside the slack equals a fresh run to that point; too far back is refused. */
static void test_truncate(void) {
    REQUIRE(ref);
    char err[256];
    uint32_t V = model.hp.n_vocab;
    cpu_backend *be = cpu_backend_new(&model, 2, err, sizeof err);
    cpu_state *st = cpu_state_new(be, 1024, err, sizeof err);
    float *l = malloc(V * sizeof(float));
    REQUIRE(cpu_eval(be, st, ids, 300, l, false, NULL, err, sizeof err) == 0);
    CHECK(cpu_truncate(be, st, 100, err, sizeof err) == -1 && strstr(err, "not exact"), "%s", err);
    CHECK(cpu_state_len(st) == 300);
    REQUIRE(cpu_truncate(be, st, 201, err, sizeof err) == 0, "%s", err);   /* 201: inside a 4- and a 128-block */
    REQUIRE(cpu_eval(be, st, ids + 201, 30, l, false, NULL, err, sizeof err) == 0);
    CHECK(!memcmp(l, ref + (size_t)230 * V, V * sizeof(float)), "continuing after truncate differs from a fresh run");
    REQUIRE(cpu_truncate(be, st, 0, err, sizeof err) == 0);
    REQUIRE(cpu_eval(be, st, ids, 5, l, false, NULL, err, sizeof err) == 0);
    CHECK(!memcmp(l, ref + (size_t)4 * V, V * sizeof(float)), "after reset");
    free(l);
    cpu_state_free(st);
    cpu_backend_free(be);
}

static void test_export_import(void) {
    REQUIRE(ref);
    char err[256];
    uint32_t V = model.hp.n_vocab;
    cpu_backend *be = cpu_backend_new(&model, 1, err, sizeof err);
    cpu_state *a = cpu_state_new(be, 1024, err, sizeof err), *b = cpu_state_new(be, 1024, err, sizeof err);
    float *l = malloc(V * sizeof(float));
    REQUIRE(cpu_eval(be, a, ids, 262, l, false, NULL, err, sizeof err) == 0);   /* 262 % 4 = 2, % 128 = 6 */
    ds4_kv_host h;
    REQUIRE(cpu_export(be, a, &h, err, sizeof err) == 0);
    CHECK(h.layers[0].n_raw == ds4_kv_keep_raw(&model.hp), "raw rows kept %u", h.layers[0].n_raw);
    REQUIRE(cpu_import(be, b, &h, err, sizeof err) == 0, "%s", err);
    REQUIRE(cpu_eval(be, b, ids + 262, 38, l, false, NULL, err, sizeof err) == 0);
    CHECK(!memcmp(l, ref + (size_t)299 * V, V * sizeof(float)), "restored state continues differently");
    h.layers[2].n_comp--;   /* inconsistent counts are refused */
    CHECK(cpu_import(be, b, &h, err, sizeof err) == -1);
    ds4_kv_host_free(&h);
    free(l);
    cpu_state_free(a);
    cpu_state_free(b);
    cpu_backend_free(be);
}

/* The diagnostic switches (cpu/cpu.h): DS4_DIAG_EXACT_KV leaves KV rows off
 * the f16 grid; without the QAT roundings a 1e-7 input perturbation stays
 * ~1e-6 in the logits of 20 tokens (with them, it grows to ~1e-3 on tiny). */
static int off_f16_grid(const ds4_kv_host *h, uint32_t hd) {
    int off = 0;
    for (uint32_t i = 0; i < h->layers[0].n_raw * hd; i++) off += h->layers[0].raw[i] != ds4_round_f16(h->layers[0].raw[i]);
    return off;
}

static double rel_max(const float *a, const float *b, size_t n) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) { d = fmax(d, fabs((double)a[i] - b[i])); r = fmax(r, fabs((double)b[i])); }
    return d / r;
}

static void test_diagnostics(void) {
    REQUIRE(ref);
    char err[256];
    uint32_t V = model.hp.n_vocab, hd = model.hp.head_dim;
    float *l[2] = {malloc(V * sizeof(float)), malloc(V * sizeof(float))};
    int off[2];
    setenv("DS4_DIAG_EXACT_KV", "1", 1);
    for (int k = 0; k < 2; k++) {
        if (k) setenv("DS4_DIAG_PERTURB", "1e-7", 1);
        cpu_backend *be = cpu_backend_new(&model, 1, err, sizeof err);
        cpu_state *st = cpu_state_new(be, 256, err, sizeof err);
        ds4_kv_host h;
        REQUIRE(cpu_eval(be, st, ids, 20, l[k], false, NULL, err, sizeof err) == 0 &&
                cpu_export(be, st, &h, err, sizeof err) == 0, "%s", err);
        off[k] = off_f16_grid(&h, hd);
        ds4_kv_host_free(&h);
        cpu_state_free(st);
        cpu_backend_free(be);
    }
    unsetenv("DS4_DIAG_EXACT_KV");
    unsetenv("DS4_DIAG_PERTURB");
    CHECK(off[0] > 0, "exact KV: raw rows stay off the f16 grid");
    CHECK(memcmp(l[0], ref + (size_t)19 * V, V * sizeof(float)) != 0, "exact KV changes the logits");
    double r = rel_max(l[1], l[0], V);
    CHECK(r > 0 && r < 1e-4, "perturbed vs exact-KV logits: rel %g", r);
    /* Switches off again: the release path, rows on the f16 grid. */
    cpu_backend *be = cpu_backend_new(&model, 1, err, sizeof err);
    cpu_state *st = cpu_state_new(be, 256, err, sizeof err);
    ds4_kv_host h;
    REQUIRE(cpu_eval(be, st, ids, 20, l[0], false, NULL, err, sizeof err) == 0 &&
            cpu_export(be, st, &h, err, sizeof err) == 0, "%s", err);
    CHECK(off_f16_grid(&h, hd) == 0 && !memcmp(l[0], ref + (size_t)19 * V, V * sizeof(float)));
    ds4_kv_host_free(&h);
    cpu_state_free(st);
    cpu_backend_free(be);
    free(l[0]); free(l[1]);
}

static void test_mtp(void) {
    REQUIRE(ref);
    if (!have_mtp) { fprintf(stderr, "  (no MTP file: skipped)\n"); return; }
    char err[256];
    uint32_t V = model.hp.n_vocab;
    size_t hw = (size_t)model.hp.hc_count * model.hp.n_embd;
    cpu_backend *be = cpu_backend_new(&model, 2, err, sizeof err);
    cpu_state *st = cpu_state_new(be, 256, err, sizeof err);
    float *h = malloc(hw * 4), *h1 = malloc(hw * 4), *h2 = malloc(hw * 4);
    float *l = malloc(V * 4), *d[3], *e = malloc(V * 4);
    REQUIRE(cpu_eval(be, st, ids, 20, l, false, h, err, sizeof err) == 0);
    CHECK(!memcmp(l, ref + (size_t)19 * V, V * 4), "hc_last does not disturb logits");
    cpu_mtp *m = cpu_mtp_new(be, err, sizeof err);
    REQUIRE(m, "%s", err);
    for (int k = 0; k < 3; k++) d[k] = malloc(V * 4);
    /* Recursive drafting: each step feeds the previous output state. */
    REQUIRE(cpu_mtp_draft(be, m, h, ids[19], d[0], h1, err, sizeof err) == 0);
    REQUIRE(cpu_mtp_draft(be, m, h1, 7, d[1], h2, err, sizeof err) == 0);
    REQUIRE(cpu_mtp_draft(be, m, h2, 9, d[2], NULL, err, sizeof err) == 0);
    CHECK(cpu_mtp_len(m) == 3);
    double s = 0, s2 = 0;
    bool fin = true;
    for (uint32_t v = 0; v < V; v++) { fin &= isfinite(d[2][v]) != 0; s += d[2][v]; s2 += (double)d[2][v] * d[2][v]; }
    CHECK(fin && sqrt(s2 / V - (s / V) * (s / V)) > 0.1, "draft logits degenerate");
    CHECK(memcmp(d[0], d[1], V * 4) != 0);
    /* Roll back the last two drafts and redo them: same bits. */
    REQUIRE(cpu_mtp_truncate(m, 1, err, sizeof err) == 0);
    REQUIRE(cpu_mtp_draft(be, m, h1, 7, e, NULL, err, sizeof err) == 0);
    CHECK(!memcmp(e, d[1], V * 4), "redrafting after rollback differs");
    /* A fresh MTP state reproduces the first draft. */
    cpu_mtp *m2 = cpu_mtp_new(be, err, sizeof err);
    REQUIRE(cpu_mtp_draft(be, m2, h, ids[19], e, NULL, err, sizeof err) == 0);
    CHECK(!memcmp(e, d[0], V * 4), "MTP not deterministic");
    cpu_mtp_free(m2);
    cpu_mtp_free(m);
    for (int k = 0; k < 3; k++) free(d[k]);
    free(h); free(h1); free(h2); free(l); free(e);
    cpu_state_free(st);
    cpu_backend_free(be);
}

static void test_bad_input(void) {
    REQUIRE(have_model);
    char err[256];
    cpu_backend *be = cpu_backend_new(&model, 1, err, sizeof err);
    cpu_state *st = cpu_state_new(be, 8, err, sizeof err);
    int32_t bad = (int32_t)model.hp.n_vocab;
    CHECK(cpu_eval(be, st, &bad, 1, NULL, false, NULL, err, sizeof err) == -1 && strstr(err, "out of range"));
    int32_t nine[9] = {0};
    CHECK(cpu_eval(be, st, nine, 9, NULL, false, NULL, err, sizeof err) == -1 && strstr(err, "context full"));
    CHECK(cpu_state_len(st) == 0);
    CHECK(cpu_state_new(be, 0, err, sizeof err) == NULL);
    CHECK(cpu_state_new(be, model.hp.ctx_max + 1, err, sizeof err) == NULL);
    cpu_state_free(st);
    cpu_backend_free(be);
}

int main(void) {
    RUN(test_e4m3);
    RUN(test_fp8_sim);
    RUN(test_e2m1_fp4);
    RUN(test_hadamard);
    RUN(test_yarn);
    RUN(test_sinkhorn);
    RUN(test_router_swiglu);
    RUN(test_attend_sink);
    RUN(test_topk);
    load_tiny();
    RUN(test_decode_reference);
    RUN(test_chunked_equals_decode);
    RUN(test_state_facts_and_repeat);
    RUN(test_truncate);
    RUN(test_export_import);
    RUN(test_diagnostics);
    RUN(test_mtp);
    RUN(test_bad_input);
    free(ref);
    if (have_model) ds4_model_free(&model);
    TEST_END();
}
