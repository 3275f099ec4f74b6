/* The independent oracle: the CPU engine against Hugging Face transformers.
 *
 * tests/fixtures/oracle holds a tiny DeepSeek V4 checkpoint in DeepSeek's own
 * format (FP8/FP4/BF16/F16/F32/I64, two shards) and the logits HF computes
 * for every position of a 300-token sequence, with DeepSeek's FP8 KV and
 * Hadamard+FP4 indexer simulations patched in (golden_patched.f32) and
 * without them (golden_unpatched.f32); tools/ref/make_oracle.py made them.
 * The config has every layer kind: window-only layers, two ratio-4 layers
 * whose indexer keeps 16 of up to 75 compressed rows, a ratio-128 layer with
 * two compressed rows by the end, hash-routed and biased top-k MoE.
 *
 * This test converts the checkpoint with ds4-convert and checks the engine:
 *   --mix f32: for one-shot prefill, chunked prefill and token-by-token
 *     decode, every position within 1e-3 * max|golden| of the golden and with
 *     the golden's argmax (the brief's bound; f32 weights, f32 activations);
 *   and closer to the patched golden than to the unpatched one, which is what
 *     shows that the FP8/FP4 simulations are implemented (they move logits by
 *     up to 28% of max|logit| here, spec §10 rows 1-2);
 *   --mix q2 / q4: KL divergence and top-1 agreement against the f32 file,
 *     with bounds argued beside the checks. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ds4.h"
#include "test.h"

static char fixdir[1024], tmpdir[256];
static int32_t *tokens;
static int n_tok, n_vocab;
static float *golden, *golden16, *golden_un;
/* Positions where rounding KV rows through f16 changes an indexer top-k
 * selection in HF (oracle.json stats.indexer.*.first_f16kv): the f32-KV
 * golden and an f16-KV engine legitimately differ there by a step. */
static int flip[64], n_flip;

static float *read_f32(const char *path, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    float *v = malloc(n * sizeof *v);
    if (v && fread(v, sizeof *v, n, f) != n) { free(v); v = NULL; }
    fclose(f);
    return v;
}

static int load_fixture(void) {
    char path[1200];
    snprintf(fixdir, sizeof fixdir, "%s/tests/fixtures/oracle", test_env("DS4_ROOT", "."));
    snprintf(path, sizeof path, "%s/oracle.json", fixdir);
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    static char buf[1 << 20];
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[len] = 0;
    cJSON *j = cJSON_Parse(buf);
    cJSON *t = cJSON_GetObjectItem(j, "tokens");
    cJSON *idx = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "stats"), "indexer");
    if (!idx) n_flip = -1000;
    for (cJSON *L = idx ? idx->child : NULL; L; L = L->next) {
        cJSON *fl = cJSON_GetObjectItem(L, "first_f16kv");
        int nfl = cJSON_GetArraySize(fl);
        /* first_f16kv is capped at 10 entries: only a complete list is usable. */
        if (nfl != cJSON_GetObjectItem(L, "positions_selection_differs_f16kv")->valueint) n_flip = -1000;
        for (int i = 0; i < nfl && n_flip >= 0 && n_flip < 64; i++) flip[n_flip++] = cJSON_GetArrayItem(fl, i)->valueint;
    }
    n_vocab = cJSON_GetObjectItem(j, "n_vocab") ? cJSON_GetObjectItem(j, "n_vocab")->valueint : 0;
    n_tok = cJSON_GetArraySize(t);
    tokens = malloc(n_tok * sizeof *tokens);
    for (int i = 0; i < n_tok; i++) tokens[i] = cJSON_GetArrayItem(t, i)->valueint;
    cJSON_Delete(j);
    snprintf(path, sizeof path, "%s/golden_patched.f32", fixdir);
    golden = read_f32(path, (size_t)n_tok * n_vocab);
    snprintf(path, sizeof path, "%s/golden_patched_f16kv.f32", fixdir);
    golden16 = read_f32(path, (size_t)n_tok * n_vocab);
    snprintf(path, sizeof path, "%s/golden_unpatched.f32", fixdir);
    golden_un = read_f32(path, (size_t)n_tok * n_vocab);
    return n_tok > 0 && n_vocab > 0 && golden && golden16 && golden_un && n_flip >= 0 ? 0 : -1;
}

static int convert(const char *mix, char *out, size_t n) {
    snprintf(out, n, "%s/oracle-%s.gguf", tmpdir, mix);
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "'%s/ds4-convert' --quiet --mix %s '%s' '%s'", test_env("DS4_BIN", "build/bin"), mix,
             fixdir, out);
    return system(cmd);
}

typedef enum { ONE_SHOT, CHUNKED, DECODE } eval_mode;

/* Logits of every position, or NULL (with the reason printed). */
static float *run_engine(const char *gguf, eval_mode mode) {
    char err[512];
    ds4_engine_params p = {.model_path = gguf, .backend = DS4_BACKEND_CPU, .n_threads = 2};
    ds4_engine *e = ds4_engine_open(&p, err, sizeof err);
    if (!e) { fprintf(stderr, "  engine: %s\n", err); return NULL; }
    ds4_session *s = ds4_session_new(e, 512, err, sizeof err);
    float *out = malloc((size_t)n_tok * n_vocab * sizeof *out);
    int rc = s && out ? 0 : -1;
    /* Chunk sizes chosen to cut across compressor blocks (4, 128) and the
     * 128-row window: 100 | 7 | 93 | rest. */
    static const int chunks[] = {100, 7, 93, 1 << 30};
    for (int pos = 0, k = 0; !rc && pos < n_tok; k++) {
        int n = mode == ONE_SHOT ? n_tok : mode == DECODE ? 1 : chunks[k];
        if (n > n_tok - pos) n = n_tok - pos;
        rc = ds4_session_eval(s, tokens + pos, (size_t)n, out + (size_t)pos * n_vocab, NULL, NULL, err, sizeof err);
        pos += n;
    }
    if (rc) { fprintf(stderr, "  eval: %s\n", s ? err : "session/alloc failed"); free(out); out = NULL; }
    ds4_session_free(s);
    ds4_engine_close(e);
    return out;
}

static int argmax(const float *v, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b]) b = i;
    return b;
}

static bool is_flip(int p) {
    for (int i = 0; i < n_flip; i++)
        if (flip[i] == p) return true;
    return false;
}

/* Per position: max|a-b| / max|ref|. Returns the worst over positions (those
 * in the flip list left out when skip_flips; their worst goes to *flip_worst);
 * counts argmax misses over every position. */
static double worst_rel_ex(const float *a, const float *ref, int *argmax_miss, bool skip_flips, double *flip_worst) {
    double worst = 0;
    *argmax_miss = 0;
    if (flip_worst) *flip_worst = 0;
    for (int p = 0; p < n_tok; p++) {
        const float *x = a + (size_t)p * n_vocab, *r = ref + (size_t)p * n_vocab;
        double d = 0, m = 0;
        for (int i = 0; i < n_vocab; i++) {
            d = fmax(d, fabs((double)x[i] - r[i]));
            m = fmax(m, fabs((double)r[i]));
        }
        double rel = isnan(d) ? INFINITY : d / m;
        *argmax_miss += argmax(x, n_vocab) != argmax(r, n_vocab);
        if (skip_flips && is_flip(p)) { *flip_worst = fmax(*flip_worst, rel); continue; }
        worst = fmax(worst, rel);
    }
    return worst;
}

static double worst_rel(const float *a, const float *ref, int *argmax_miss) {
    return worst_rel_ex(a, ref, argmax_miss, false, NULL);
}

static void check_f32_mode(eval_mode mode, const char *label) {
    char gguf[512];
    REQUIRE(convert("f32", gguf, sizeof gguf) == 0, "ds4-convert --mix f32 failed");
    float *lg = run_engine(gguf, mode);
    REQUIRE(lg, "CPU engine could not evaluate %s (engine missing or failing)", gguf);
    int miss16, miss, miss_un;
    double flip_worst;
    /* 1. ds4's convention (KV rows stored f16-rounded, spec §7.1): the
     *    engine must reproduce HF+patches+f16 KV at every position. */
    double rel16 = worst_rel(lg, golden16, &miss16);
    /* 2. DeepSeek's definition (f32 KV): the same, except at the positions
     *    where f16 KV flips an indexer selection, where only a bounded step
     *    (1e-2) is allowed. */
    double rel = worst_rel_ex(lg, golden, &miss, true, &flip_worst);
    double rel_un = worst_rel(lg, golden_un, &miss_un);
    printf("  %s: worst max|d|/max|ref| %.3g vs HF+patches+f16 KV (argmax misses %d/%d); %.3g vs HF+patches"
           " (%.3g at the %d f16 flip positions, argmax misses %d); %.3g vs unpatched HF\n",
           label, rel16, miss16, n_tok, rel, flip_worst, n_flip, miss, rel_un);
    CHECK(rel16 <= 1e-3, "%s: %.3g > 1e-3 vs HF+patches+f16 KV", label, rel16);
    CHECK(miss16 == 0 && miss == 0, "%s: argmax differs at %d / %d positions", label, miss16, miss);
    CHECK(rel <= 1e-3, "%s: %.3g > 1e-3 vs HF+patches outside f16 flip positions", label, rel);
    CHECK(flip_worst <= 1e-2, "%s: %.3g > 1e-2 at f16 flip positions", label, flip_worst);
    /* The FP8/FP4 simulations move logits by up to 28% of max|logit| here:
     * an engine without them is far from the patched golden. */
    CHECK(rel_un > 10 * rel16, "%s: engine not clearly closer to patched HF (%.3g) than to unpatched (%.3g)", label,
          rel16, rel_un);
    free(lg);
}

static void test_f32_one_shot(void) { check_f32_mode(ONE_SHOT, "one-shot prefill"); }
static void test_f32_chunked(void) { check_f32_mode(CHUNKED, "chunked prefill 100|7|93|100"); }
static void test_f32_decode(void) { check_f32_mode(DECODE, "token-by-token decode"); }

/* Mean and max over positions of KL(p_ref || p_q), and top-1 agreement. */
static void kl_stats(const float *ref, const float *q, double *mean, double *max, int *agree) {
    *mean = *max = 0;
    *agree = 0;
    for (int p = 0; p < n_tok; p++) {
        const float *a = ref + (size_t)p * n_vocab, *b = q + (size_t)p * n_vocab;
        double ma = a[argmax(a, n_vocab)], mb = b[argmax(b, n_vocab)], za = 0, zb = 0;
        for (int i = 0; i < n_vocab; i++) { za += exp(a[i] - ma); zb += exp(b[i] - mb); }
        double kl = 0;
        for (int i = 0; i < n_vocab; i++) {
            double la = a[i] - ma - log(za), lb = b[i] - mb - log(zb);
            kl += exp(la) * (la - lb);
        }
        *mean += kl / n_tok;
        *max = fmax(*max, kl);
        *agree += argmax(a, n_vocab) == argmax(b, n_vocab);
    }
}

static void check_quant(const char *mix, double mean_bound, double agree_bound) {
    char f32[512], q[512];
    REQUIRE(convert("f32", f32, sizeof f32) == 0 && convert(mix, q, sizeof q) == 0, "ds4-convert failed");
    float *a = run_engine(f32, ONE_SHOT), *b = run_engine(q, ONE_SHOT);
    if (!a || !b) { free(a); free(b); REQUIRE(0, "CPU engine could not evaluate the converted files"); }
    double mean, max;
    int agree;
    kl_stats(a, b, &mean, &max, &agree);
    printf("  --mix %s vs f32: KL mean %.4g max %.4g nats, top-1 agreement %d/%d\n", mix, mean, max, agree, n_tok);
    CHECK(mean <= mean_bound, "%s: mean KL %.4g > %.4g", mix, mean, mean_bound);
    CHECK(agree >= agree_bound * n_tok, "%s: top-1 agreement %d/%d below %.0f%%", mix, agree, n_tok, 100 * agree_bound);
    free(a);
    free(b);
}

/* Bounds. The oracle's logits are nearly flat (median top-1 probability
 * 0.12 over 512 tokens), so top-1 flips easily when two candidates are
 * close; the weights are random Gaussians, harder to quantise than trained
 * ones. q4 (Q4_K experts, Q8_0 projections, F16 small tensors) keeps ~4.5
 * bits for the experts; q2 (IQ2_XXS/Q2_K experts) ~2-2.6 bits, an expert
 * output SNR near 10 dB. Measured values are printed above each check; the
 * bounds leave about 2x headroom over them. */
static void test_q4(void) { check_quant("q4", 0.1, 0.60); }
static void test_q2(void) { check_quant("q2", 2.0, 0.08); }

int main(void) {
    if (load_fixture()) {
        fprintf(stderr, "oracle fixture missing under %s\n", fixdir);
        printf("0 passed, 1 failed\n");
        return 1;
    }
    snprintf(tmpdir, sizeof tmpdir, "/tmp/ds4-oracle-XXXXXX");
    if (!mkdtemp(tmpdir)) { printf("0 passed, 1 failed\n"); return 1; }
    RUN(test_f32_one_shot);
    RUN(test_f32_chunked);
    RUN(test_f32_decode);
    RUN(test_q4);
    RUN(test_q2);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmpdir);
    free(tokens);
    free(golden);
    free(golden16);
    free(golden_un);
    TEST_END();
}
