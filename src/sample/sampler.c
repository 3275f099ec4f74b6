/* Token sampling: greedy, temperature, top-k, top-p, min-p (prompt.md §5.1).
 *
 * Definition (tests pin it): with p the softmax of logits/T over the whole
 * vocabulary,
 *   top-k keeps the k most likely tokens (ties: lower id first);
 *   top-p keeps the shortest most-likely-first prefix of those whose mass,
 *         renormalised over the top-k set, reaches top_p;
 *   min-p keeps tokens with p >= min_p * p_max.
 * Both cuts keep a most-likely-first prefix, so their order does not matter.
 * The draw is from the survivors, renormalised.
 *
 * Cost for a 129280-entry vocabulary: one pass for the max and weights; top-k
 * is a quickselect; top-p sorts only a growing head (64, 256, ... tokens)
 * until it holds enough mass; with neither, no sorting at all. */
#include "ds4.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct ds4_sampler {
    ds4_sampling p;
    uint32_t n;
    uint64_t rng[4];   /* xoshiro256** state */
    float *v;          /* scaled logits */
    float *w;          /* exp(v - max), unnormalised probabilities */
    int32_t *idx;
    float *run_max;    /* max_value of each RUN logits, from the max pass */
};

/* Logits per run_max entry: the min-p path skips runs whose max is cut. */
#define RUN 64

ds4_sampling ds4_sampling_defaults(bool thinking) {
    /* DeepSeek's hosted values; thinking mode forces them, non-thinking
     * uses them as defaults (§5.1), hence the same numbers for both. */
    (void)thinking;
    return (ds4_sampling){.temperature = 1.0f, .top_p = 1.0f, .top_k = 0, .min_p = 0.05f, .seed = 0};
}

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next_u64(uint64_t s[4]) {
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

/* Uniform in [0, 1) with 53 random bits. */
static double next_unit(uint64_t s[4]) { return (double)(next_u64(s) >> 11) * 0x1.0p-53; }

ds4_sampler *ds4_sampler_new(const ds4_sampling *sp, uint32_t n_vocab) {
    if (!sp || n_vocab == 0) return NULL;
    ds4_sampler *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->p = *sp;
    s->n = n_vocab;
    uint64_t x = sp->seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
    s->v = malloc(sizeof *s->v * n_vocab);
    s->w = malloc(sizeof *s->w * n_vocab);
    s->idx = malloc(sizeof *s->idx * n_vocab);
    s->run_max = malloc(sizeof *s->run_max * (n_vocab / RUN + 1));
    if (!s->v || !s->w || !s->idx || !s->run_max) { ds4_sampler_free(s); return NULL; }
    return s;
}

void ds4_sampler_free(ds4_sampler *s) {
    if (!s) return;
    free(s->v);
    free(s->w);
    free(s->idx);
    free(s->run_max);
    free(s);
}

/* a ranks before b: higher value, then lower id. */
static inline bool before(const float *v, int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); }

static inline void swap32(int32_t *a, int32_t *b) { int32_t t = *a; *a = *b; *b = t; }

/* Rearrange idx[0, n) so its first k entries are the k best (any order). */
static void select_top(const float *v, int32_t *idx, size_t n, size_t k) {
    size_t lo = 0, hi = n;
    while (hi - lo > 1 && k > lo && k < hi) {
        size_t mid = lo + (hi - lo) / 2;
        /* median of three as pivot, moved to hi-1 */
        if (before(v, idx[mid], idx[lo])) swap32(&idx[mid], &idx[lo]);
        if (before(v, idx[hi - 1], idx[lo])) swap32(&idx[hi - 1], &idx[lo]);
        if (before(v, idx[mid], idx[hi - 1])) swap32(&idx[mid], &idx[hi - 1]);
        int32_t pivot = idx[hi - 1];
        size_t store = lo;
        for (size_t i = lo; i < hi - 1; i++)
            if (before(v, idx[i], pivot)) swap32(&idx[i], &idx[store++]);
        swap32(&idx[store], &idx[hi - 1]);
        if (store == k) break;
        if (store > k) hi = store;
        else lo = store + 1;
    }
}

static int cmp_rank(const void *a, const void *b, void *v) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return before(v, x, y) ? -1 : before(v, y, x) ? 1 : 0;
}

static void sort_head(const float *v, int32_t *idx, size_t k) {
    qsort_r(idx, k, sizeof *idx, cmp_rank, (void *)v);
}

/* The largest non-NaN value (−inf when none). The running maxima in 8
 * independent lanes vectorise (a compare and a select, NaN never entering
 * since every comparison with it is false). */
static float max_value(const float *x, uint32_t n) {
    float m[8];
    for (int j = 0; j < 8; j++) m[j] = -INFINITY;
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
    float best = -INFINITY;
    for (int j = 0; j < 8; j++) best = m[j] > best ? m[j] : best;
    for (; i < n; i++) best = x[i] > best ? x[i] : best;
    return best;
}

/* The lowest id of the largest non-NaN logit (0 when every logit is NaN).
 * Two passes instead of one compare-and-remember loop: max_value, then the
 * first id holding that value. Decode greedy-samples 129 280 logits a
 * token: ≈ 16 µs instead of ≈ 115 µs for the scalar loop on the build
 * machine. */
int32_t ds4_argmax(const float *logits, uint32_t n) {
    float best = max_value(logits, n);
    for (uint32_t i = 0; i < n; i++)
        if (logits[i] == best) return (int32_t)i;
    return 0; /* every logit NaN */
}

/* max_value of the logits, keeping each RUN's in run_max: one read of the
 * vocabulary serves both the max and the min-p cut below. */
static float max_by_runs(ds4_sampler *s, const float *logits) {
    float best = -INFINITY;
    for (uint32_t r = 0, i0 = 0; i0 < s->n; r++, i0 += RUN) {
        float m = max_value(logits + i0, s->n - i0 < RUN ? s->n - i0 : RUN);
        s->run_max[r] = m;
        best = m > best ? m : best;
    }
    return best;
}

/* Only min-p (the defaults): the survivors v_i = logits_i / T >= cutoff in
 * id order, weights exp(v_i − mx), without a pass that writes v for the
 * whole vocabulary. A division by T > 0 is monotonic after rounding too, so
 * the survivors are the logits at or above some threshold: `lo` lies a
 * little below it (1e-5 relative, far more than a rounding), a run whose
 * max is under lo is skipped whole (with peaked logits, nearly all), and
 * the logits of the other runs are tested exactly as v_i >= cutoff. NaN and
 * −inf are never >= lo. Returns the survivor count. */
static size_t min_p_survivors(ds4_sampler *s, const float *logits, float T, float mx, float cutoff) {
    uint32_t n = s->n;
    size_t m = 0;
    float c = cutoff * T, lo = isfinite(c) ? c - fabsf(c) * 1e-5f - 1e-30f : -INFINITY;
    for (uint32_t r = 0, i0 = 0; i0 < n; r++, i0 += RUN) {
        if (s->run_max[r] < lo) continue;
        for (uint32_t i = i0, e = n - i0 < RUN ? n : i0 + RUN; i < e; i++) {
            float v = logits[i] / T;
            if (v >= cutoff) {
                s->w[i] = expf(v - mx);
                s->idx[m++] = (int32_t)i;
            }
        }
    }
    return m;
}

int32_t ds4_sample(ds4_sampler *s, const float *logits, bool greedy) {
    const ds4_sampling *p = &s->p;
    uint32_t n = s->n;
    if (greedy || !(p->temperature > 0)) return ds4_argmax(logits, n);

    /* max(logits_i / T) = (max logits_i) / T: division by T > 0 rounds
     * monotonically. NaN logits (and what overflows to ±inf) never win. */
    float mx = max_by_runs(s, logits) / p->temperature;
    if (!isfinite(mx)) return ds4_argmax(logits, n); /* nothing finite to weigh */
    /* min-p as a cut on scaled logits: p_i >= min_p * p_max <=> v_i - max >= log(min_p). */
    float cutoff = p->min_p > 0 ? mx + logf(p->min_p) : -INFINITY;
    if (cutoff > mx) cutoff = mx; /* min_p > 1: the best token still survives */

    size_t k = p->top_k > 0 && (uint32_t)p->top_k < n ? (size_t)p->top_k : n;
    bool cut_p = p->top_p < 1; /* top_p <= 0 keeps just the most likely token */
    size_t m = 0;              /* survivors: idx[0, m) */
    if (k == n && !cut_p) {
        /* Only min-p: no order needed, and no exp for what it removes. */
        m = min_p_survivors(s, logits, p->temperature, mx, cutoff);
    } else {
        for (uint32_t i = 0; i < n; i++) {
            float x = logits[i] / p->temperature;
            s->v[i] = isnan(x) ? -INFINITY : x;
            s->idx[i] = (int32_t)i;
        }
        if (k < n) select_top(s->v, s->idx, n, k);
        for (size_t i = 0; i < k; i++) s->w[s->idx[i]] = expf(s->v[s->idx[i]] - mx);
        m = k;
        if (cut_p) {
            /* top-p needs the mass of the whole top-k set, then a sorted
             * head that grows until it holds top_p of it. */
            double z = 0;
            for (size_t i = 0; i < k; i++) z += s->w[s->idx[i]];
            double target = p->top_p * z;
            for (size_t head = k < 64 ? k : 64;; head = head * 4 < k ? head * 4 : k) {
                select_top(s->v, s->idx, k, head);
                sort_head(s->v, s->idx, head);
                double cum = 0;
                size_t i = 0;
                while (i < head && (i == 0 || cum < target)) cum += s->w[s->idx[i++]];
                if (cum >= target || head == k) { m = i; break; }
            }
        }
        /* min-p on the survivors (the best token always passes). */
        size_t kept = 0;
        for (size_t i = 0; i < m; i++)
            if (s->v[s->idx[i]] >= cutoff) s->idx[kept++] = s->idx[i];
        m = kept;
    }

    double total = 0;
    for (size_t i = 0; i < m; i++) total += s->w[s->idx[i]];
    double u = next_unit(s->rng) * total;
    for (size_t i = 0; i < m; i++) {
        u -= s->w[s->idx[i]];
        if (u < 0) return s->idx[i];
    }
    return s->idx[m - 1]; /* rounding left u at >= 0: the last survivor */
}

int ds4_top_logprobs(const float *logits, uint32_t n_vocab, int k, int32_t *ids, float *logprobs) {
    if (k <= 0 || n_vocab == 0) return 0;
    if ((uint32_t)k > n_vocab) k = (int)n_vocab;
    float *v = malloc(sizeof *v * n_vocab);
    int32_t *idx = malloc(sizeof *idx * n_vocab);
    if (!v || !idx) { free(v); free(idx); return -1; }
    float mx = -INFINITY;
    for (uint32_t i = 0; i < n_vocab; i++) {
        v[i] = isnan(logits[i]) ? -INFINITY : logits[i];
        if (v[i] > mx) mx = v[i];
        idx[i] = (int32_t)i;
    }
    /* log-softmax as v - (max + log sum exp(v - max)): no overflow. */
    double sum = 0;
    if (isfinite(mx))
        for (uint32_t i = 0; i < n_vocab; i++) sum += exp((double)v[i] - mx);
    double lse = isfinite(mx) ? mx + log(sum) : 0;
    select_top(v, idx, n_vocab, (size_t)k);
    sort_head(v, idx, (size_t)k);
    for (int i = 0; i < k; i++) {
        ids[i] = idx[i];
        logprobs[i] = isfinite(mx) ? (float)((double)v[idx[i]] - lse) : -INFINITY;
    }
    free(v);
    free(idx);
    return k;
}
