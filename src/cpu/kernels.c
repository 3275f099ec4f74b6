/* Numeric building blocks of the CPU reference (spec model.md §3, §4.2). */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "cpu/cpu.h"
#include "quant/quant.h"

void cpu_rmsnorm(const float *v, const float *w, int64_t n, float eps, float *out) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)v[i] * v[i];
    float r = (float)(1.0 / sqrt(ss / (double)n + eps));
    if (w) for (int64_t i = 0; i < n; i++) out[i] = v[i] * r * w[i];
    else   for (int64_t i = 0; i < n; i++) out[i] = v[i] * r;
}

float cpu_pow2_ceil(float v) {
    int e;
    float m = frexpf(v, &e);          /* v = m · 2^e, m in [0.5, 1) */
    return ldexpf(1.0f, m == 0.5f ? e - 1 : e);
}

float cpu_e4m3_round(float x) {
    float a = fabsf(x);
    if (a == 0) return x;
    /* Quantum: 2^-9 in the subnormal range (below 2^-6), else 2^(e-3) for
     * a in [2^e, 2^(e+1)): three mantissa bits. x/q and the product are exact
     * (powers of two), rintf rounds half to even in the default mode. */
    int e;
    frexpf(a, &e);                    /* a in [2^(e-1), 2^e) */
    int qexp = a < 0x1p-6f ? -9 : (e - 1) - 3;
    float q = ldexpf(1.0f, qexp);
    return copysignf(rintf(a / q) * q, x);
}

void cpu_fp8_sim(float *x, int64_t n) {
    for (int64_t b = 0; b < n; b += 64) {
        float amax = 0;
        for (int i = 0; i < 64; i++) amax = fmaxf(amax, fabsf(x[b + i]));
        amax = fmaxf(amax, 1e-4f);
        float s = cpu_pow2_ceil(amax / 448.0f);
        for (int i = 0; i < 64; i++) {
            float v = x[b + i] / s;
            v = v > 448.0f ? 448.0f : v < -448.0f ? -448.0f : v;
            x[b + i] = cpu_e4m3_round(v) * s;
        }
    }
}

float cpu_e2m1_round(float x) {
    /* Midpoints between neighbouring codes go to the even code
     * (codes 0..7 = 0, .5, 1, 1.5, 2, 3, 4, 6): 0.25→0, 0.75→1, 1.25→1,
     * 1.75→2, 2.5→2, 3.5→4, 5→4. */
    float a = fabsf(x), r;
    if (a <= 0.25f) r = 0;
    else if (a < 0.75f) r = 0.5f;
    else if (a <= 1.25f) r = 1;
    else if (a < 1.75f) r = 1.5f;
    else if (a <= 2.5f) r = 2;
    else if (a < 3.5f) r = 3;
    else if (a <= 5.0f) r = 4;
    else r = 6;
    return copysignf(r, x);
}

void cpu_hadamard(float *x, int64_t n) {
    for (int64_t st = 1; st < n; st *= 2)
        for (int64_t b = 0; b < n; b += 2 * st)
            for (int64_t i = b; i < b + st; i++) {
                float a = x[i], c = x[i + st];
                x[i] = a + c;
                x[i + st] = a - c;
            }
    float s = (float)(1.0 / sqrt((double)n));
    for (int64_t i = 0; i < n; i++) x[i] *= s;
}

void cpu_fp4_sim(float *x, int64_t n) {
    cpu_hadamard(x, n);
    for (int64_t b = 0; b < n; b += 32) {
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[b + i]));
        amax = fmaxf(amax, 6.0f * 0x1p-126f);
        float s = cpu_pow2_ceil(amax / 6.0f);
        for (int i = 0; i < 32; i++) {
            float v = x[b + i] / s;
            v = v > 6.0f ? 6.0f : v < -6.0f ? -6.0f : v;
            x[b + i] = cpu_e2m1_round(v) * s;
        }
    }
}

void cpu_rope_freqs(const ds4_hparams *hp, bool yarn, double *freq, int *lo, int *hi) {
    int rd = (int)hp->rope_dim, np = rd / 2;
    double base = yarn ? hp->compress_rope_base : hp->rope_base;
    double low = 0, high = 0;
    if (yarn) {
        /* corr(β): the pair index whose wavelength fits β times into the
         * original context (spec §3.2). */
        double lb = 2.0 * log(base);
        double cf = rd * log(hp->yarn_orig_ctx / (2.0 * M_PI * hp->yarn_beta_fast)) / lb;
        double cs = rd * log(hp->yarn_orig_ctx / (2.0 * M_PI * hp->yarn_beta_slow)) / lb;
        low = fmax(0.0, floor(cf));
        high = fmin(rd - 1.0, ceil(cs));
    }
    if (lo) *lo = (int)low;
    if (hi) *hi = (int)high;
    for (int k = 0; k < np; k++) {
        double th = pow(base, -2.0 * k / rd);
        if (!yarn) { freq[k] = th; continue; }
        double span = high - low == 0 ? 0.001 : high - low;
        double r = (k - low) / span;
        r = r < 0 ? 0 : r > 1 ? 1 : r;
        freq[k] = th * (1 - r) + th / hp->yarn_factor * r;
    }
}

void cpu_rope(float *x, int n_pairs, const double *freq, int64_t pos, bool inverse) {
    for (int k = 0; k < n_pairs; k++) {
        double ang = (double)pos * freq[k];
        if (inverse) ang = -ang;
        float c = (float)cos(ang), s = (float)sin(ang);
        float x0 = x[2 * k], x1 = x[2 * k + 1];
        x[2 * k] = x0 * c - x1 * s;
        x[2 * k + 1] = x0 * s + x1 * c;
    }
}

static float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

void cpu_hc_coeffs(const float *mix, const float *scale, const float *base, int hc, int iters,
                   float eps, float *pre, float *post, float *comb) {
    for (int a = 0; a < hc; a++) {
        pre[a] = sigmoidf(mix[a] * scale[0] + base[a]) + eps;
        post[a] = 2.0f * sigmoidf(mix[hc + a] * scale[1] + base[hc + a]);
    }
    /* comb[a*hc + c]: a = source stream (row), c = destination (column). */
    for (int a = 0; a < hc; a++) {
        float *row = comb + a * hc, m = -INFINITY, s = 0;
        for (int c = 0; c < hc; c++) {
            row[c] = mix[2 * hc + a * hc + c] * scale[2] + base[2 * hc + a * hc + c];
            m = fmaxf(m, row[c]);
        }
        for (int c = 0; c < hc; c++) { row[c] = expf(row[c] - m); s += row[c]; }
        for (int c = 0; c < hc; c++) row[c] = row[c] / s + eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0)                         /* row pass: not before the first column pass */
            for (int a = 0; a < hc; a++) {
                float s = 0;
                for (int c = 0; c < hc; c++) s += comb[a * hc + c];
                for (int c = 0; c < hc; c++) comb[a * hc + c] /= s + eps;
            }
        for (int c = 0; c < hc; c++) {
            float s = 0;
            for (int a = 0; a < hc; a++) s += comb[a * hc + c];
            for (int a = 0; a < hc; a++) comb[a * hc + c] /= s + eps;
        }
    }
}

float cpu_router_score(float z) {
    float sp = z > 20.0f ? z : z < -20.0f ? expf(z) : log1pf(expf(z));
    return sqrtf(sp);
}

float cpu_swiglu(float g, float u, float clamp) {
    g = fminf(g, clamp);
    u = u > clamp ? clamp : u < -clamp ? -clamp : u;
    return g * sigmoidf(g) * u;
}

void cpu_attend(const float *q, const float *const *rows, int64_t n, int64_t dim, float scale,
                float sink, float *scores, float *out) {
    float m = sink;
    for (int64_t r = 0; r < n; r++) {
        scores[r] = ds4_dot_f32(q, rows[r], dim) * scale;
        m = fmaxf(m, scores[r]);
    }
    float den = expf(sink - m);
    memset(out, 0, (size_t)dim * sizeof *out);
    for (int64_t r = 0; r < n; r++) {
        float w = expf(scores[r] - m);
        den += w;
        const float *k = rows[r];
        int64_t j = 0;
#ifdef __AVX2__
        /* the same product then sum per element (not fused), 8 at a time */
        const __m256 wv = _mm256_set1_ps(w);
        for (; j + 8 <= dim; j += 8)
            _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_loadu_ps(out + j), _mm256_mul_ps(wv, _mm256_loadu_ps(k + j))));
#endif
        for (; j < dim; j++) out[j] += w * k[j];
    }
    float inv = 1.0f / den;
    for (int64_t j = 0; j < dim; j++) out[j] *= inv;
}

/* a ranks before b: higher score, then lower index. */
static bool better(const float *s, int32_t a, int32_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); }

static void sift_down(const float *s, int32_t *h, int64_t k, int64_t i) {
    /* Min-heap on "better": the root is the worst kept candidate. */
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < k && better(s, h[w], h[l])) w = l;
        if (r < k && better(s, h[w], h[r])) w = r;
        if (w == i) return;
        int32_t t = h[i]; h[i] = h[w]; h[w] = t;
        i = w;
    }
}

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

void cpu_topk(const float *score, int64_t n, int64_t k, int32_t *out) {
    if (k <= 0) return;
    for (int64_t i = 0; i < k; i++) out[i] = (int32_t)i;
    for (int64_t i = k / 2; i-- > 0;) sift_down(score, out, k, i);
    for (int64_t c = k; c < n; c++)
        if (better(score, (int32_t)c, out[0])) { out[0] = (int32_t)c; sift_down(score, out, k, 0); }
    qsort(out, (size_t)k, sizeof *out, cmp_i32);
}

bool cpu_diag_exact_kv(void) {
    const char *v = getenv("DS4_DIAG_EXACT_KV");
    return v && *v && strcmp(v, "0") != 0;
}

float cpu_diag_perturb(void) {
    const char *v = getenv("DS4_DIAG_PERTURB");
    return v ? strtof(v, NULL) : 0.0f;
}

void cpu_diag_perturb_row(float *x, int64_t n, uint32_t pos, float eps) {
    for (int64_t i = 0; i < n; i++) {
        /* splitmix-style hash of (pos, i): a sign independent of the values */
        uint64_t h = ((uint64_t)pos << 32 | (uint64_t)i) * 0x9E3779B97F4A7C15ull;
        h ^= h >> 31;
        x[i] *= 1.0f + ((h >> 17) & 1 ? eps : -eps);
    }
}
