/* Sampler: greedy rule, determinism, empirical distributions against a
 * straightforward reference (full sort), top-p prefix, log-probabilities. */
#include "ds4.h"
#include "test.h"

#include <math.h>
#include <time.h>

static uint64_t rs = 0x2545F4914F6CDD1Dull;
static double urand(void) {
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return (double)(rs >> 11) * 0x1.0p-53;
}

/* Greedy over vocabularies wider than the argmax's 8 lanes: ties across
 * lanes and the tail, NaN anywhere, every value −inf or NaN; against the
 * plain definition (lowest id of the largest non-NaN value). */
static int32_t ref_argmax(const float *l, uint32_t n) {
    int32_t best = -1;
    for (uint32_t i = 0; i < n; i++)
        if (!isnan(l[i]) && (best < 0 || l[i] > l[best])) best = (int32_t)i;
    return best < 0 ? 0 : best;
}

static void test_greedy_wide(void) {
    enum { N = 1003 };   /* 125 lanes-wide steps and a tail of 3 */
    static float l[N];
    ds4_sampling sp = {.temperature = 0, .top_p = 1, .seed = 1};
    ds4_sampler *s = ds4_sampler_new(&sp, N);
    REQUIRE(s, "sampler");
    uint32_t x = 12345;
    int bad = 0;
    for (int trial = 0; trial < 200; trial++) {
        for (int i = 0; i < N; i++) {
            x = x * 1664525u + 1013904223u;
            l[i] = (float)(x >> 24) / 16.0f;   /* 256 levels: many ties */
            if ((x & 0xff) < 3) l[i] = NAN;
            if (trial % 7 == 0 && (x & 0x3ff) < 2) l[i] = INFINITY;
        }
        if (trial % 5 == 1) l[N - 1] = 1000.0f;   /* the max in the tail */
        if (ds4_sample(s, l, true) != ref_argmax(l, N)) bad++;
    }
    CHECK(bad == 0, "wide argmax == reference (%d of 200 differ)", bad);
    for (int i = 0; i < N; i++) l[i] = NAN;
    CHECK(ds4_sample(s, l, true) == 0, "all NaN: id 0");
    l[700] = -INFINITY;
    l[900] = -INFINITY;
    CHECK(ds4_sample(s, l, true) == 700, "NaN and -inf: the first -inf");
    ds4_sampler_free(s);
}

static void test_greedy_ties_and_nan(void) {
    float l[] = {1, 3, 3, 2};
    ds4_sampling sp = {.temperature = 0, .top_p = 1, .seed = 1};
    ds4_sampler *s = ds4_sampler_new(&sp, 4);
    REQUIRE(s, "sampler");
    CHECK(ds4_sample(s, l, false) == 1, "T=0 is argmax, lowest id on ties");
    ds4_sampler_free(s);
    sp.temperature = 1;
    s = ds4_sampler_new(&sp, 4);
    CHECK(ds4_sample(s, l, true) == 1, "greedy flag forces argmax");
    float n[] = {NAN, 1, 2, NAN};
    CHECK(ds4_sample(s, n, true) == 2, "NaN is never the argmax");
    for (int i = 0; i < 100; i++) CHECK(ds4_sample(s, n, false) != 0 && ds4_sample(s, n, false) != 3, "NaN never sampled");
    ds4_sampler_free(s);
    CHECK(ds4_sampler_new(&sp, 0) == NULL, "empty vocabulary refused");
    /* Out-of-range settings still pick a valid token. */
    ds4_sampling odd[] = {{.temperature = 1, .top_p = 1, .min_p = 7, .seed = 1},
                          {.temperature = INFINITY, .top_p = 1, .seed = 1},
                          {.temperature = 1, .top_p = NAN, .top_k = -3, .min_p = NAN, .seed = 1}};
    float mixed[] = {-INFINITY, 1, 2, -INFINITY};
    for (size_t c = 0; c < sizeof odd / sizeof *odd; c++) {
        s = ds4_sampler_new(&odd[c], 4);
        for (int i = 0; i < 50; i++) {
            int32_t t = ds4_sample(s, mixed, false);
            CHECK(t == 1 || t == 2, "case %zu: token %d", c, t);
            if (c == 0) CHECK(t == 2, "min_p > 1 keeps only the best");
        }
        ds4_sampler_free(s);
    }
}

static void test_defaults(void) {
    for (int t = 0; t < 2; t++) {
        ds4_sampling d = ds4_sampling_defaults(t);
        CHECK(d.temperature == 1.0f && d.top_p == 1.0f && d.top_k == 0 && d.min_p == 0.05f, "defaults (thinking=%d)", t);
    }
}

static void test_seeded_determinism(void) {
    enum { V = 1000 };
    float *l = malloc(sizeof *l * V);
    for (int i = 0; i < V; i++) l[i] = (float)(urand() * 8);
    ds4_sampling sp = {.temperature = 1, .top_p = 0.95f, .top_k = 0, .min_p = 0, .seed = 42};
    ds4_sampler *a = ds4_sampler_new(&sp, V), *b = ds4_sampler_new(&sp, V);
    sp.seed = 43;
    ds4_sampler *c = ds4_sampler_new(&sp, V);
    int same = 0, diff = 0;
    for (int i = 0; i < 500; i++) {
        int32_t x = ds4_sample(a, l, false), y = ds4_sample(b, l, false), z = ds4_sample(c, l, false);
        same += x == y;
        diff += x != z;
    }
    CHECK(same == 500, "same seed, same tokens (%d/500)", same);
    CHECK(diff > 400, "another seed, other tokens (%d/500 differ)", diff);
    ds4_sampler_free(a);
    ds4_sampler_free(b);
    ds4_sampler_free(c);
    free(l);
}

/* Reference: the distribution the sampler must draw from (see sampler.c). */
static void reference(const float *l, int n, const ds4_sampling *sp, double *q) {
    int idx[64];
    double p[64], z = 0, mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = fmax(mx, l[i] / sp->temperature);
    for (int i = 0; i < n; i++) z += p[i] = exp(l[i] / sp->temperature - mx);
    for (int i = 0; i < n; i++) idx[i] = i;
    for (int i = 0; i < n; i++) /* selection sort by p desc, id asc */
        for (int j = i + 1; j < n; j++)
            if (p[idx[j]] > p[idx[i]] || (p[idx[j]] == p[idx[i]] && idx[j] < idx[i])) { int t = idx[i]; idx[i] = idx[j]; idx[j] = t; }
    int keep = sp->top_k > 0 && sp->top_k < n ? sp->top_k : n;
    double zk = 0;
    for (int i = 0; i < keep; i++) zk += p[idx[i]];
    if (sp->top_p < 1) {
        double cum = 0;
        int i = 0;
        while (i < keep && (i == 0 || cum < sp->top_p * zk)) cum += p[idx[i++]];
        keep = i;
    }
    double pmax = p[idx[0]], zs = 0;
    for (int i = 0; i < n; i++) q[i] = 0;
    for (int i = 0; i < keep; i++)
        if (p[idx[i]] >= sp->min_p * pmax) zs += q[idx[i]] = p[idx[i]];
    for (int i = 0; i < n; i++) q[i] /= zs;
}

static void check_distribution(const ds4_sampling *sp, const char *what) {
    enum { V = 8, N = 200000 };
    const float l[V] = {2.0f, 1.5f, 1.4f, 0.3f, -0.5f, 1.0f, -2.0f, 0.9f};
    double q[V], f[V] = {0};
    reference(l, V, sp, q);
    ds4_sampler *s = ds4_sampler_new(sp, V);
    for (int i = 0; i < N; i++) f[ds4_sample(s, l, false)] += 1.0 / N;
    ds4_sampler_free(s);
    for (int i = 0; i < V; i++) {
        /* 5 standard deviations of a frequency over N draws, plus exact zeros */
        double tol = 5 * sqrt(q[i] * (1 - q[i]) / N) + 1e-9;
        CHECK(fabs(f[i] - q[i]) <= tol, "%s: token %d freq %.4f want %.4f", what, i, f[i], q[i]);
    }
}

static void test_distributions(void) {
    ds4_sampling sp = {.temperature = 0.7f, .top_p = 1, .top_k = 0, .min_p = 0, .seed = 7};
    check_distribution(&sp, "temperature");
    sp = (ds4_sampling){.temperature = 1, .top_p = 1, .top_k = 3, .min_p = 0, .seed = 8};
    check_distribution(&sp, "top-k");
    sp = (ds4_sampling){.temperature = 1, .top_p = 0.7f, .top_k = 0, .min_p = 0, .seed = 9};
    check_distribution(&sp, "top-p");
    sp = (ds4_sampling){.temperature = 1.3f, .top_p = 1, .top_k = 0, .min_p = 0.3f, .seed = 10};
    check_distribution(&sp, "min-p");
    sp = (ds4_sampling){.temperature = 0.9f, .top_p = 0.9f, .top_k = 5, .min_p = 0.1f, .seed = 11};
    check_distribution(&sp, "combined");
}

static void test_top_p_minimal_prefix(void) {
    /* probabilities 0.5, 0.3, 0.15, 0.05 */
    float l[] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    ds4_sampling sp = {.temperature = 1, .top_p = 0.79f, .seed = 3};
    ds4_sampler *s = ds4_sampler_new(&sp, 4);
    int seen[4] = {0};
    for (int i = 0; i < 20000; i++) seen[ds4_sample(s, l, false)]++;
    ds4_sampler_free(s);
    CHECK(seen[0] && seen[1] && !seen[2] && !seen[3], "top_p 0.79 keeps {0,1}: %d %d %d %d", seen[0], seen[1], seen[2], seen[3]);
    sp.top_p = 0.81f;
    s = ds4_sampler_new(&sp, 4);
    memset(seen, 0, sizeof seen);
    for (int i = 0; i < 20000; i++) seen[ds4_sample(s, l, false)]++;
    ds4_sampler_free(s);
    CHECK(seen[0] && seen[1] && seen[2] && !seen[3], "top_p 0.81 keeps {0,1,2}: %d %d %d %d", seen[0], seen[1], seen[2], seen[3]);
    sp.top_p = 0;
    s = ds4_sampler_new(&sp, 4);
    for (int i = 0; i < 100; i++) CHECK(ds4_sample(s, l, false) == 0, "top_p 0 keeps only the best");
    ds4_sampler_free(s);
}

static int cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Full vocabulary: correct sets and fast enough to run per token. */
static void test_full_vocab(void) {
    enum { V = 129280 };
    float *l = malloc(sizeof *l * V), *sorted = malloc(sizeof *l * V);
    for (int i = 0; i < V; i++) l[i] = (float)(urand() * 20 - 10);
    memcpy(sorted, l, sizeof *l * V);
    qsort(sorted, V, sizeof *sorted, cmp_desc);
    ds4_sampling sp = {.temperature = 1, .top_p = 1, .top_k = 40, .min_p = 0, .seed = 5};
    ds4_sampler *s = ds4_sampler_new(&sp, V);
    for (int i = 0; i < 200; i++) {
        int32_t t = ds4_sample(s, l, false);
        CHECK(l[t] >= sorted[39], "top-k 40 drew a token outside the top 40");
    }
    ds4_sampler_free(s);

    sp = (ds4_sampling){.temperature = 1, .top_p = 0.9f, .top_k = 0, .min_p = 0, .seed = 6};
    s = ds4_sampler_new(&sp, V);
    clock_t t0 = clock();
    for (int i = 0; i < 50; i++) ds4_sample(s, l, false);
    double per = (double)(clock() - t0) / CLOCKS_PER_SEC / 50;
    CHECK(per < 0.05, "top-p over the full vocabulary took %.1f ms per token", per * 1e3);
    ds4_sampler_free(s);
    free(l);
    free(sorted);
}

/* The min-p-only path (the server's default: T 1, min_p 0.05, no top-k or
 * top-p) at the full vocabulary, draw for draw: the tokens of fixed seeds
 * over peaked logits with NaN, ±inf and ties, for several temperatures and
 * min_p values (0: every finite logit survives; above 1: only the best),
 * hashed. The expected digest and first draws were taken from the sampler
 * as it was before its min-p path read the logits in place (one pass for
 * the max, survivors by a compare, commit of session 7): that change must
 * not move a single draw. */
static void test_min_p_draws(void) {
    enum { V = 129280 };
    float *l = malloc(sizeof *l * V);
    uint64_t x = 99;
    for (int i = 0; i < V; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        l[i] = (float)((int)(x >> 40) % 4096) / 512.0f - 4.0f;   /* 4096 levels: ties */
        if (i % 4999 == 11) l[i] += 14.0f + (float)(i % 3);       /* a few peaks */
        if (i % 7919 == 5) l[i] = NAN;
        if (i % 10007 == 3) l[i] = -INFINITY;
    }
    static const float T[] = {1.0f, 0.7f, 1.3f, 0.05f}, MP[] = {0.05f, 0.0f, 0.3f, 1.5f};
    uint64_t h = 0xcbf29ce484222325ull;
    int32_t first[4];
    for (int a = 0; a < 4; a++)
        for (int b = 0; b < 4; b++) {
            ds4_sampling sp = {.temperature = T[a], .top_p = 1, .top_k = 0, .min_p = MP[b], .seed = (uint64_t)(7 + 4 * a + b)};
            ds4_sampler *s = ds4_sampler_new(&sp, V);
            for (int i = 0; i < 40; i++) {
                int32_t t = ds4_sample(s, l, false);
                if (a == 0 && i == 0) first[b] = t;
                h = (h ^ (uint64_t)(uint32_t)t) * 0x100000001b3ull;
            }
            ds4_sampler_free(s);
        }
    l[123] = INFINITY;   /* an infinite logit: the argmax, as greedy */
    ds4_sampling sp = {.temperature = 1, .top_p = 1, .min_p = 0.05f, .seed = 1};
    ds4_sampler *s = ds4_sampler_new(&sp, V);
    CHECK(ds4_sample(s, l, false) == 123, "+inf logit wins");
    ds4_sampler_free(s);
    CHECK(h == 0x82b54d6f321fe85bull && first[0] == 89993 && first[1] == 114988 && first[2] == 10009 && first[3] == 10009,
          "draws moved: digest %016llx, first %d %d %d %d", (unsigned long long)h, first[0], first[1], first[2], first[3]);
    free(l);
}

static void test_top_logprobs(void) {
    enum { V = 1000 };
    float l[V], shifted[V];
    for (int i = 0; i < V; i++) l[i] = (float)(urand() * 10), shifted[i] = l[i] + 10000.0f;
    l[17] = l[18] = 12.0f; /* a tie at the top: lower id first */
    shifted[17] = shifted[18] = 10012.0f;
    int32_t ids[V], ids2[V];
    float lp[V], lp2[V];
    REQUIRE(ds4_top_logprobs(l, V, V, ids, lp) == V, "k = n");
    double sum = 0;
    for (int i = 0; i < V; i++) sum += exp(lp[i]);
    CHECK(fabs(sum - 1) < 1e-4, "probabilities sum to %.6f", sum);
    CHECK(ids[0] == 17 && ids[1] == 18, "tie order %d %d", ids[0], ids[1]);
    for (int i = 1; i < V; i++) CHECK(lp[i] <= lp[i - 1], "descending at %d", i);
    /* Shift invariance (large logits do not overflow). Float spacing at 1e4
     * is ~1e-3, so near-equal logits may swap: compare values by rank. */
    REQUIRE(ds4_top_logprobs(shifted, V, 20, ids2, lp2) == 20, "k = 20");
    CHECK(ids2[0] == 17 && ids2[1] == 18, "shifted tie order");
    for (int i = 0; i < 20; i++) CHECK(fabsf(lp2[i] - lp[i]) < 2e-3f, "shifted rank %d: %f vs %f", i, lp2[i], lp[i]);
    CHECK(ds4_top_logprobs(l, V, 0, ids, lp) == 0, "k = 0");
}

int main(void) {
    RUN(test_greedy_ties_and_nan);
    RUN(test_greedy_wide);
    RUN(test_defaults);
    RUN(test_seeded_determinism);
    RUN(test_distributions);
    RUN(test_top_p_minimal_prefix);
    RUN(test_full_vocab);
    RUN(test_min_p_draws);
    RUN(test_top_logprobs);
    TEST_END();
}
