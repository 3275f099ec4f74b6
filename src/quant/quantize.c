/* Quantisers: f32 rows -> Q8_0, Q2_K, Q4_K, IQ2_XXS blocks (spec model.md §8),
 * plus the plain F32/F16 conversions. Our own algorithms, all deterministic
 * (no randomness, no dependence on threads; only default-rounding float math).
 *
 * Every quantiser minimises a weighted squared error Σ w_i (x_i − x̂_i)² per
 * block, where x̂ is exactly what the dequantiser in quant.c will produce.
 * w = importance when given; otherwise w = σ² + x² with σ² the mean x² of
 * the sub-block: extra precision for the large weights that dominate dot
 * products, without giving up on small ones (pure x² weighting cost IQ2_XXS
 * 0.34 -> 0.51 relative RMS on Gaussian data). A sub-block whose weights are
 * all zero falls back to w = 1.
 *
 * Measured on N(0,1) data (tests/test_quant.c asserts bounds with margin),
 * relative RMS error ‖x − x̂‖/‖x‖: Q8_0 0.54 % (≈ step/√12 with step =
 * max|x|/127 per 32), Q4_K 7.2 %, Q2_K 28 %, IQ2_XXS 34 %. Throughput on
 * one core (test_quant --bench, CPU time): Q8_0 ≈ 1.2 GB/s, Q2_K/Q4_K
 * ≈ 30–35 MB/s, IQ2_XXS ≈ 20 MB/s of f32 input. */
#include "quant/quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void wr32(uint8_t *p, uint32_t v) {
    for (int k = 0; k < 4; k++) p[k] = (uint8_t)(v >> 8 * k);
}

/* Round to nearest (halves up) and clamp to [lo, hi]; NaN -> lo. Clamping in
 * float first keeps the int conversion defined for any input. */
static int qround(float v, int lo, int hi) {
    if (!(v > (float)lo)) return lo;
    if (v >= (float)hi) return hi;
    return (int)floorf(v + 0.5f);
}

/* Weights for n elements: importance, or σ² + x², or 1 if those are all zero. */
static void make_weights(const float *x, const float *imp, int n, float *w) {
    float sum = 0, s2 = 0;
    for (int i = 0; i < n; i++) s2 += x[i] * x[i];
    s2 /= n;
    for (int i = 0; i < n; i++) {
        w[i] = imp ? imp[i] : s2 + x[i] * x[i];
        if (!(w[i] >= 0) || isinf(w[i])) w[i] = 0; /* negative/nan/inf importance means nothing */
        sum += w[i];
    }
    if (!(sum > 0))
        for (int i = 0; i < n; i++) w[i] = 1;
}

/* ---- Q8_0 --------------------------------------------------------------
 * d = max|x|/127 (stored as f16), q = round(x/d). Error per element is at
 * most d/2 (plus the f16 rounding of d), i.e. ≤ max|x|/254 per 32-block. */
static void quant_q8_0(const float *x, uint8_t *b) {
    float amax = 0;
    for (int k = 0; k < 32; k++) amax = fmaxf(amax, fabsf(x[k]));
    const uint16_t dh = ds4_f32_to_f16(amax / 127.0f);
    const float d = ds4_f16_to_f32(dh);
    wr16(b, dh);
    for (int k = 0; k < 32; k++) b[2 + k] = (uint8_t)(int8_t)(d > 0 ? qround(x[k] / d, -127, 127) : 0);
}

/* ---- K-quants: x̂ = dl·q − ml, q ∈ [0, nmax] --------------------------- */

/* Weighted least squares for (s, m) with q fixed: x ≈ s·q − m, m ≥ 0.
 * Returns the weighted error, or INFINITY when no positive scale fits. */
static float lsq_scale_min(int n, const float *x, const float *w, const uint8_t *q, float *ps, float *pm) {
    float W = 0, Q = 0, X = 0, QQ = 0, QX = 0;
    for (int i = 0; i < n; i++) {
        W += w[i]; Q += w[i] * q[i]; X += w[i] * x[i];
        QQ += w[i] * q[i] * q[i]; QX += w[i] * q[i] * x[i];
    }
    const float det = W * QQ - Q * Q;
    if (!(det > 0)) return INFINITY;
    float s = (W * QX - Q * X) / det, b = (X - s * Q) / W; /* x ≈ s q + b */
    if (b > 0) { /* the format only shifts down (m ≥ 0): refit with b = 0 */
        b = 0;
        s = QX / QQ;
    }
    if (!(s > 0)) return INFINITY;
    float err = 0;
    for (int i = 0; i < n; i++) {
        const float e = s * q[i] + b - x[i];
        err += w[i] * e * e;
    }
    *ps = s;
    *pm = -b;
    return err;
}

/* Best continuous (scale, min) of one sub-block. Search: 20 candidate
 * scales spanning (hi − lo)/(0.8·nmax) … /(1.37·nmax) (below 1.0 the top
 * values clip, which pays off when w de-emphasises outliers), each followed
 * by a least-squares refit of (s, m) for its rounding; then two rounds of
 * re-round + refit from the best. O(20·n). */
static void fit_scale_min(int n, int nmax, const float *x, const float *w, float *ps, float *pm) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) { lo = fminf(lo, x[i]); hi = fmaxf(hi, x[i]); }
    if (lo > 0) lo = 0;
    *ps = 0;
    *pm = -lo;
    if (!(hi > lo)) return; /* constant ≤ 0 (or all zero): q = 0, x̂ = −m exactly */
    uint8_t q[32];
    float best = INFINITY, s, m;
    for (int t = 0; t < 20; t++) {
        const float st = (hi - lo) / (nmax * (0.8f + 0.03f * t));
        for (int i = 0; i < n; i++) q[i] = (uint8_t)qround((x[i] - lo) / st, 0, nmax);
        const float e = lsq_scale_min(n, x, w, q, &s, &m);
        if (e < best) { best = e; *ps = s; *pm = m; }
    }
    for (int it = 0; it < 2 && *ps > 0; it++) {
        for (int i = 0; i < n; i++) q[i] = (uint8_t)qround((x[i] + *pm) / *ps, 0, nmax);
        const float e = lsq_scale_min(n, x, w, q, &s, &m);
        if (!(e < best)) break;
        best = e; *ps = s; *pm = m;
    }
}

/* One K-quant super-block: nsub sub-blocks of subn, levels 0..nmax, sub-
 * block scale/min codes 0..lmax. Sub-block (s, m) are fitted freely, then
 * d = max s/lmax and dmin = max m/lmax (f16), and each sub-block picks the
 * best of the 4 neighbouring (sc, mn) code pairs with q re-rounded for the
 * exact dequantised levels. Outputs codes and levels L (one per element). */
static void quant_k_block(const float *x, const float *w, int nsub, int subn, int nmax, int lmax,
                          uint16_t *dh, uint16_t *dminh, uint8_t *sc, uint8_t *mn, uint8_t *L) {
    float s[16], m[16], smax = 0, mmax = 0;
    for (int j = 0; j < nsub; j++) {
        fit_scale_min(subn, nmax, x + j * subn, w + j * subn, &s[j], &m[j]);
        smax = fmaxf(smax, s[j]);
        mmax = fmaxf(mmax, m[j]);
    }
    *dh = ds4_f32_to_f16(smax / lmax);
    *dminh = ds4_f32_to_f16(mmax / lmax);
    const float d = ds4_f16_to_f32(*dh), dmin = ds4_f16_to_f32(*dminh);
    for (int j = 0; j < nsub; j++) {
        const float *xj = x + j * subn, *wj = w + j * subn;
        const int sc0 = d > 0 ? qround(s[j] / d - 0.5f, 0, lmax) : 0;
        const int mn0 = dmin > 0 ? qround(m[j] / dmin - 0.5f, 0, lmax) : 0;
        float best = INFINITY;
        sc[j] = (uint8_t)sc0; /* kept if every error is nan (non-finite input) */
        mn[j] = (uint8_t)mn0;
        memset(L + j * subn, 0, (size_t)subn);
        for (int a = sc0; a <= sc0 + 1 && a <= lmax; a++)
            for (int c = mn0; c <= mn0 + 1 && c <= lmax; c++) {
                const float dl = d * (float)a, ml = dmin * (float)c; /* as deq_q2_k/deq_q4_k */
                uint8_t qq[32];
                float e = 0;
                for (int i = 0; i < subn; i++) {
                    qq[i] = (uint8_t)(dl > 0 ? qround((xj[i] + ml) / dl, 0, nmax) : 0);
                    const float r = fmaf(dl, (float)qq[i], -ml) - xj[i];
                    e += wj[i] * r * r;
                }
                if (e < best) {
                    best = e;
                    sc[j] = (uint8_t)a;
                    mn[j] = (uint8_t)c;
                    memcpy(L + j * subn, qq, (size_t)subn);
                }
            }
    }
}

static void quant_q2_k(const float *x, const float *w, uint8_t *b) {
    uint16_t dh, dminh;
    uint8_t sc[16], mn[16], L[256];
    quant_k_block(x, w, 16, 16, 3, 15, &dh, &dminh, sc, mn, L);
    memset(b, 0, 84);
    for (int j = 0; j < 16; j++) b[j] = (uint8_t)(sc[j] | mn[j] << 4);
    for (int i = 0; i < 256; i++) { /* element i: qs[32·(i/128) + i%32], bits 2·((i%128)/32) */
        const int r = i % 128;
        b[16 + 32 * (i / 128) + r % 32] |= (uint8_t)(L[i] << 2 * (r / 32));
    }
    wr16(b + 80, dh);
    wr16(b + 82, dminh);
}

static void quant_q4_k(const float *x, const float *w, uint8_t *b) {
    uint16_t dh, dminh;
    uint8_t sc[8], mn[8], L[256];
    quant_k_block(x, w, 8, 32, 15, 63, &dh, &dminh, sc, mn, L);
    wr16(b, dh);
    wr16(b + 2, dminh);
    uint8_t *s = b + 4;
    for (int j = 0; j < 4; j++) { /* inverse of q4k_scale_min in quant.c */
        s[j] = (uint8_t)(sc[j] | (sc[j + 4] >> 4) << 6);
        s[j + 4] = (uint8_t)(mn[j] | (mn[j + 4] >> 4) << 6);
        s[j + 8] = (uint8_t)((sc[j + 4] & 15) | (mn[j + 4] & 15) << 4);
    }
    for (int i = 0; i < 128; i++) { /* qs[32c + k]: low nibble element 64c+k, high 64c+32+k */
        const int c = i / 32, k = i % 32;
        b[16 + i] = (uint8_t)(L[64 * c + k] | L[64 * c + 32 + k] << 4);
    }
}

/* ---- IQ2_XXS ------------------------------------------------------------
 * x̂ of element k of 8-group l in sub-block b = db_b · G[g_l][k] · sign, with
 * db_b = d·(0.5 + ls_b)/4, G the 256-entry grid and an even number of minus
 * signs per group.
 *
 * For a group with magnitudes a = |x|, weights w and scale s, the error of
 * grid entry g with the signs of x is E = C − 2s·A_g + s²·B_g, where
 * C = Σ w a², A_g = Σ w a G_g, B_g = Σ w G_g². If x has an odd number of
 * negatives one sign must flip; flipping element k costs 2·w_k a_k G_gk in
 * A_g, so the best flip is the k minimising that (independent of s). A_g, B_g
 * are tabulated once per group (256·8 MACs); after that the best entry at any
 * scale is argmax_g (2A_g − s·B_g): 2 flops per entry, so searching scales is
 * cheap and every candidate is scored exactly (no nearest-neighbour guess).
 *
 * Search: (1) per sub-block, 10 scales s = max|a|/43 · (0.6 … 1.77) plus one
 * least-squares refinement for the chosen entries; (2) super-block d from the
 * largest sub-block scale with ls = 15 mapped to 31/31 … 28/31 of it (4 tries,
 * d rounded to f16), each sub-block taking the better of the two ls codes
 * around its ideal scale; (3) encode entries at the chosen db. (Denser
 * searches, 24 scales or 6 d tries, changed the error by < 0.1 %.)
 * Cost ≈ 2.5k flops per element, all over contiguous 256-wide arrays;
 * ≈ 20 MB/s of f32 input on one core. */

typedef struct {
    float A[4][256], B[4][256], C[4];
    float wa[4][8];   /* w·|x| per element, to pick the flipped sign at encode time */
    uint8_t neg[4];   /* sign bits of x */
    float amax;
} iq2_sub;

static void iq2_tabulate(const float G[8][256], const float *x, const float *w, iq2_sub *t) {
    t->amax = 0;
    for (int l = 0; l < 4; l++) {
        float wa[8], ww[8];
        int neg = 0;
        t->C[l] = 0;
        for (int k = 0; k < 8; k++) {
            const float a = fabsf(x[8 * l + k]);
            wa[k] = t->wa[l][k] = w[8 * l + k] * a;
            ww[k] = w[8 * l + k];
            t->C[l] += wa[k] * a;
            t->amax = fmaxf(t->amax, a);
            if (x[8 * l + k] < 0) neg |= 1 << k;
        }
        t->neg[l] = (uint8_t)neg;
        float *restrict A = t->A[l], *restrict B = t->B[l]; /* restrict: lets -O2 vectorise over g */
        for (int g = 0; g < 256; g++) A[g] = B[g] = 0;
        for (int k = 0; k < 8; k++)
            for (int g = 0; g < 256; g++) {
                A[g] += wa[k] * G[k][g];
                B[g] += ww[k] * G[k][g] * G[k][g];
            }
        if (__builtin_popcount(neg) & 1) { /* pay for the cheapest flip (which one: iq2_flip) */
            float mn[256];
            for (int g = 0; g < 256; g++) mn[g] = wa[0] * G[0][g];
            for (int k = 1; k < 8; k++)
                for (int g = 0; g < 256; g++) {
                    const float c = wa[k] * G[k][g];
                    mn[g] = c < mn[g] ? c : mn[g];
                }
            for (int g = 0; g < 256; g++) A[g] -= 2 * mn[g];
        }
    }
}

/* Sign bits for entry g of group l: the signs of x, plus (odd parity) a flip
 * of the element with the smallest w·|x|·G, the first such one as in
 * iq2_tabulate's min (same products, so the same choice). */
static int iq2_signs(const iq2_sub *t, const float G[8][256], int l, int g) {
    int signs = t->neg[l];
    if (__builtin_popcount(signs) & 1) {
        int kmin = 0;
        float mn = t->wa[l][0] * G[0][g];
        for (int k = 1; k < 8; k++) {
            const float c = t->wa[l][k] * G[k][g];
            if (c < mn) { mn = c; kmin = k; }
        }
        signs ^= 1 << kmin; /* now even parity */
    }
    return signs;
}

/* max_g (2A_g − s·B_g) of group l, and its argmax when wanted. */
static float iq2_best(const iq2_sub *t, int l, float s, int *arg) {
    const float *A = t->A[l], *B = t->B[l];
    float best = -INFINITY;
    if (!arg) { /* 8 running maxima so the loop vectorises (max is exact, order-free) */
        float m[8];
        for (int k = 0; k < 8; k++) m[k] = -INFINITY;
        for (int g = 0; g < 256; g += 8)
            for (int k = 0; k < 8; k++) {
                const float v = 2 * A[g + k] - s * B[g + k];
                m[k] = v > m[k] ? v : m[k];
            }
        for (int k = 0; k < 8; k++) best = m[k] > best ? m[k] : best;
        return best;
    }
    float v[256], m[8]; /* stored once, so the max and the search see the same values */
    for (int g = 0; g < 256; g++) v[g] = 2 * A[g] - s * B[g];
    for (int k = 0; k < 8; k++) m[k] = -INFINITY;
    for (int g = 0; g < 256; g += 8)
        for (int k = 0; k < 8; k++) m[k] = v[g + k] > m[k] ? v[g + k] : m[k];
    for (int k = 0; k < 8; k++) best = m[k] > best ? m[k] : best;
    for (int g = 0; g < 256; g++)
        if (v[g] == best) { *arg = g; break; }
    return best;
}

/* Weighted error of a sub-block at scale s (best entries). */
static float iq2_err(const iq2_sub *t, float s) {
    float e = 0;
    for (int l = 0; l < 4; l++) e += t->C[l] - s * iq2_best(t, l, s, NULL);
    return e;
}

/* Best continuous scale of a sub-block (step 1). */
static float iq2_sub_scale(const iq2_sub *t) {
    if (!(t->amax > 0)) return 0;
    float best = INFINITY, sb = 0;
    for (int i = 0; i < 10; i++) {
        const float s = t->amax / 43.0f * (0.6f + 0.13f * i);
        const float e = iq2_err(t, s);
        if (e < best) { best = e; sb = s; }
    }
    float sa = 0, sbb = 0; /* least squares for the entries chosen at sb */
    for (int l = 0; l < 4; l++) {
        int g = 0;
        iq2_best(t, l, sb, &g);
        sa += t->A[l][g];
        sbb += t->B[l][g];
    }
    if (sbb > 0 && sa > 0) {
        const float s = sa / sbb;
        if (iq2_err(t, s) < best) sb = s;
    }
    return sb;
}

static float iq2_db(float d, int ls) { return d * (0.5f + (float)ls) * 0.25f; } /* as deq_iq2_xxs */

static void quant_iq2_xxs(const float G[8][256], const float *x, const float *w, uint8_t *b, iq2_sub *t) {
    float s[8], smax = 0;
    for (int ib = 0; ib < 8; ib++) {
        iq2_tabulate(G, x + 32 * ib, w + 32 * ib, &t[ib]);
        s[ib] = iq2_sub_scale(&t[ib]);
        smax = fmaxf(smax, s[ib]);
    }
    memset(b, 0, 66);
    if (!(smax > 0)) return; /* all zero: d = 0 */
    uint16_t best_dh = 0;
    int best_ls[8] = {0};
    float best = INFINITY;
    for (int c = 31; c >= 28; c--) {
        /* ls = 15 gives db = d·31/8, so d = 8·smax/c puts smax at code 15·(c/31) */
        const uint16_t dh = ds4_f32_to_f16(8.0f * smax / (float)c);
        const float d = ds4_f16_to_f32(dh);
        if (!(d > 0) || isinf(d)) continue;
        float tot = 0;
        int ls[8];
        for (int ib = 0; ib < 8; ib++) {
            const int lo = qround((8.0f * s[ib] / d - 1.0f) * 0.5f - 0.5f, 0, 15);
            float be = INFINITY;
            ls[ib] = lo;
            for (int k = lo; k <= lo + 1 && k <= 15; k++) {
                const float e = iq2_err(&t[ib], iq2_db(d, k));
                if (e < be) { be = e; ls[ib] = k; }
            }
            tot += be;
        }
        if (tot < best) {
            best = tot;
            best_dh = dh;
            memcpy(best_ls, ls, sizeof ls);
        }
    }
    wr16(b, best_dh);
    const float d = ds4_f16_to_f32(best_dh);
    for (int ib = 0; ib < 8; ib++) {
        const float db = iq2_db(d, best_ls[ib]);
        uint32_t A = 0, B = (uint32_t)best_ls[ib] << 28;
        for (int l = 0; l < 4; l++) {
            int g = 0;
            iq2_best(&t[ib], l, db, &g);
            const int signs = iq2_signs(&t[ib], G, l, g);
            A |= (uint32_t)g << 8 * l;
            B |= (uint32_t)(signs & 127) << 7 * l; /* bit 7 is implied by parity */
        }
        wr32(b + 2 + 8 * ib, A);
        wr32(b + 6 + 8 * ib, B);
    }
}

/* ---- entry point --------------------------------------------------------- */

void ds4_quantize_row(ggml_type type, const float *x, void *out, int64_t n, const float *importance) {
    uint8_t *o = out;
    if ((type != GGML_F32 && type != GGML_F16 && type != GGML_Q8_0 && type != GGML_Q2_K &&
         type != GGML_Q4_K && type != GGML_IQ2_XXS) || n < 0 || n % ggml_block_elems(type) != 0) {
        fprintf(stderr, "ds4 quant: quantize: type %d with %lld elements is not supported\n", (int)type,
                (long long)n);
        abort();
    }
    switch (type) {
    case GGML_F32: memcpy(out, x, (size_t)n * 4); return;
    case GGML_F16:
        for (int64_t i = 0; i < n; i++) wr16(o + 2 * i, ds4_f32_to_f16(x[i]));
        return;
    case GGML_Q8_0:
        for (int64_t i = 0; i < n; i += 32) quant_q8_0(x + i, o + i / 32 * 34);
        return;
    default: break;
    }
    float w[256];
    if (type == GGML_IQ2_XXS) {
        float G[8][256]; /* grid transposed to floats: G[k][g] = byte k of entry g */
        for (int g = 0; g < 256; g++)
            for (int k = 0; k < 8; k++) G[k][g] = (float)((ds4_iq2xxs_grid[g] >> 8 * k) & 255);
        iq2_sub *t = malloc(8 * sizeof *t);
        if (!t) {
            fprintf(stderr, "ds4 quant: out of memory\n");
            abort();
        }
        for (int64_t i = 0; i < n; i += 256) {
            for (int s = 0; s < 8; s++) /* weights per 32 so an all-zero sub-block falls back alone */
                make_weights(x + i + 32 * s, importance ? importance + i + 32 * s : NULL, 32, w + 32 * s);
            quant_iq2_xxs((const float(*)[256])G, x + i, w, o + i / 256 * 66, t);
        }
        free(t);
        return;
    }
    const int sub = type == GGML_Q2_K ? 16 : 32;
    for (int64_t i = 0; i < n; i += 256) {
        for (int s = 0; s < 256; s += sub)
            make_weights(x + i + s, importance ? importance + i + s : NULL, sub, w + s);
        if (type == GGML_Q2_K) quant_q2_k(x + i, w, o + i / 256 * 84);
        else quant_q4_k(x + i, w, o + i / 256 * 144);
    }
}
