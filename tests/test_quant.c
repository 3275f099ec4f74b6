/* Weight formats: tables, f16, known-answer dequantisation, fused dots,
 * batched dots, quantiser accuracy. Random data is fresh each run from a
 * printed seed (DS4_SEED=N reproduces a run).
 *
 * `test_quant --bench` also prints single-thread dot and quantiser
 * throughput (not part of the suite). */
#include "test.h"

#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "quant/quant.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

static uint64_t rng_state;
static uint64_t rnd64(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double rnd_unit(void) { return (double)(rnd64() >> 11) * 0x1p-53; }
static float rnd_gauss(void) {
    double u = rnd_unit(), v = rnd_unit();
    return (float)(sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v));
}
static void fill_gauss(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = rnd_gauss();
}

static int64_t elems_of(ggml_type t) { return t == GGML_Q8_0 ? 32 : t == GGML_F32 || t == GGML_F16 ? 1 : 256; }
static int64_t bytes_of(ggml_type t) {
    switch (t) {
    case GGML_F32: return 4;
    case GGML_F16: return 2;
    case GGML_Q8_0: return 34;
    case GGML_Q2_K: return 84;
    case GGML_Q4_K: return 144;
    default: return 66;
    }
}
static size_t row_bytes(ggml_type t, int64_t n) { return (size_t)(n / elems_of(t) * bytes_of(t)); }

static const ggml_type ALL[] = {GGML_F32, GGML_F16, GGML_Q8_0, GGML_Q2_K, GGML_Q4_K, GGML_IQ2_XXS};
static const char *NAME[] = {"F32", "F16", "Q8_0", "Q2_K", "Q4_K", "IQ2_XXS"};

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) {
    for (int k = 0; k < 4; k++) p[k] = (uint8_t)(v >> 8 * k);
}
static float bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* ---- tables ---------------------------------------------------------- */

static void test_iq2_tables(void) {
    int bad_byte = 0, dup = 0;
    for (int g = 0; g < 256; g++) {
        for (int k = 0; k < 8; k++) {
            const int b = (int)(ds4_iq2xxs_grid[g] >> 8 * k & 255);
            if (b != 8 && b != 25 && b != 43) bad_byte++;
        }
        for (int h = 0; h < g; h++) dup += ds4_iq2xxs_grid[g] == ds4_iq2xxs_grid[h];
    }
    CHECK(bad_byte == 0, "%d grid bytes outside {8,25,43}", bad_byte);
    CHECK(dup == 0, "%d duplicate grid entries", dup);
    /* entries as published (first, second, one in the middle, last) */
    CHECK(ds4_iq2xxs_grid[0] == 0x0808080808080808ull, "known answer");
    CHECK(ds4_iq2xxs_grid[1] == 0x080808080808082bull, "known answer");
    CHECK(ds4_iq2xxs_grid[128] == 0x082b2b0808082b08ull, "known answer");
    CHECK(ds4_iq2xxs_grid[132] == 0x1908080808080819ull, "known answer");
    CHECK(ds4_iq2xxs_grid[255] == 0x2b2b2b1908081908ull, "known answer");
    int bad_sign = 0;
    for (int s = 0; s < 128; s++) {
        const int v = ds4_ksigns_iq2xs[s];
        if ((v & 127) != s || __builtin_popcount(v) % 2 != 0) bad_sign++;
    }
    CHECK(bad_sign == 0, "%d ksigns entries break the parity rule", bad_sign);
    for (int ti = 0; ti < 6; ti++) /* this file's block facts agree with the gguf module's */
        CHECK(ggml_row_bytes(ALL[ti], 512) == row_bytes(ALL[ti], 512), "%s", NAME[ti]);
    CHECK(ds4_ksigns_iq2xs[0] == 0 && ds4_ksigns_iq2xs[1] == 129 && ds4_ksigns_iq2xs[3] == 3 &&
          ds4_ksigns_iq2xs[127] == 255, "known answer");
}

/* ---- f16 ------------------------------------------------------------- */

static void test_f16_exhaustive(void) {
    int bad = 0, badnan = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        const float f = ds4_f16_to_f32((uint16_t)h);
        const uint16_t back = ds4_f32_to_f16(f);
        const int isnan16 = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        if (isnan16) {
            badnan += !(isnan(f) && back == (h | 0x200)); /* stays nan, payload kept, quieted */
        } else if (back != h) {
            if (bad++ < 5) fprintf(stderr, "  f16 %04x -> %g -> %04x\n", h, f, back);
        }
        /* value check independent of the bit routine: finite halves are ±m·2^e */
        if (!isnan16 && (h & 0x7c00) != 0x7c00) {
            const int e = (h >> 10) & 31, m = h & 0x3ff;
            double v = e ? ldexp(1024 + m, e - 25) : ldexp(m, -24);
            if (h & 0x8000) v = -v;
            if ((double)f != v || (h == 0x8000 && !signbit(f))) bad++;
        }
    }
    CHECK(bad == 0, "%d halves do not round-trip", bad);
    CHECK(badnan == 0, "%d nan halves mishandled", badnan);
    CHECK(isinf(ds4_f16_to_f32(0x7c00)) && ds4_f16_to_f32(0xfc00) < 0, "known answer");
}

static void test_f16_rounding(void) {
    /* known answers */
    CHECK(ds4_f32_to_f16(1.0f) == 0x3c00, "known answer");
    CHECK(ds4_f32_to_f16(-2.0f) == 0xc000, "known answer");
    CHECK(ds4_f32_to_f16(65504.0f) == 0x7bff, "known answer");
    CHECK(ds4_f32_to_f16(65519.99f) == 0x7bff, "known answer");
    CHECK(ds4_f32_to_f16(65520.0f) == 0x7c00, "known answer");  /* tie, odd mantissa: up to inf */
    CHECK(ds4_f32_to_f16(1e30f) == 0x7c00, "known answer");
    CHECK(ds4_f32_to_f16(-INFINITY) == 0xfc00, "known answer");
    CHECK(ds4_f32_to_f16(0x1p-14f) == 0x0400, "known answer");  /* smallest normal */
    CHECK(ds4_f32_to_f16(0x1p-24f) == 0x0001, "known answer");  /* smallest subnormal */
    CHECK(ds4_f32_to_f16(0x1p-25f) == 0x0000, "known answer");  /* tie to even (0) */
    CHECK(ds4_f32_to_f16(0x1.8p-24f) == 0x0002, "known answer"); /* 1.5 ulp: tie to even (2) */
    CHECK(ds4_f32_to_f16(0x1.000002p-25f) == 0x0001, "known answer");
    CHECK(ds4_f32_to_f16(-0.0f) == 0x8000, "known answer");
    CHECK(ds4_f32_to_f16(1.0f + 0x1p-11f) == 0x3c00, "known answer");            /* tie -> even */
    CHECK(ds4_f32_to_f16(1.0f + 3 * 0x1p-11f) == 0x3c02, "known answer");        /* tie -> even (up) */
    CHECK(ds4_f32_to_f16(0x1.ffep-15f) == 0x0400, "known answer");               /* subnormal rounds up into normal */
    CHECK(isnan(ds4_f16_to_f32(ds4_f32_to_f16(NAN))), "known answer");
    CHECK(ds4_round_f16(0.1f) == 0x1.998p-4f, "%a", ds4_round_f16(0.1f));
    /* every midpoint between neighbouring finite halves goes to the even one,
     * and one float ulp either side goes to the nearer one */
    int bad = 0;
    for (uint32_t h = 0; h < 0x7bff; h++) {
        const float a = ds4_f16_to_f32((uint16_t)h), b = ds4_f16_to_f32((uint16_t)(h + 1));
        const float mid = (float)(((double)a + b) / 2); /* exact: needs 12 bits */
        const uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
        bad += ds4_f32_to_f16(mid) != even;
        bad += ds4_f32_to_f16(nextafterf(mid, 0)) != h;
        bad += ds4_f32_to_f16(nextafterf(mid, INFINITY)) != h + 1;
        bad += ds4_f32_to_f16(-mid) != (even | 0x8000);
    }
    CHECK(bad == 0, "%d midpoint roundings wrong", bad);
#if defined(__F16C__)
    /* the hardware converter as an independent oracle over random floats */
    int hw = 0;
    for (int i = 0; i < 1000000; i++) {
        uint32_t u = (uint32_t)rnd64();
        if (i & 1) u = (u & 0x87ffffffu) | 0x30000000u; /* bias towards the f16 range */
        const float f = bitsf(u);
        if (isnan(f)) continue;
        hw += ds4_f32_to_f16(f) != _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
    }
    CHECK(hw == 0, "%d conversions disagree with F16C", hw);
#endif
}

/* ---- known-answer dequantisation ------------------------------------- */

static void test_kat_q8_0(void) {
    uint8_t b[68];
    float out[64];
    put16(b, 0x3800); /* 0.5 */
    put16(b + 34, 0xbc00); /* -1.0 */
    for (int k = 0; k < 32; k++) { b[2 + k] = (uint8_t)(int8_t)(k - 16); b[36 + k] = (uint8_t)(int8_t)(127 - 8 * k); }
    ds4_dequant_row(GGML_Q8_0, b, out, 64);
    int bad = 0;
    for (int k = 0; k < 32; k++) {
        bad += out[k] != 0.5f * (k - 16);
        bad += out[32 + k] != -(float)(int8_t)(127 - 8 * k);
    }
    CHECK(bad == 0, "known answer");
    CHECK(out[0] == -8.0f && out[31] == 7.5f && out[32] == -127.0f && out[63] == 121.0f, "known answer");
}

/* Q2_K: scales[j] = sc (j+1)&15, mn j%5; qs[m] = 37m+11; d = 0.25, dmin = 0.125. */
static void test_kat_q2_k(void) {
    uint8_t b[84];
    for (int j = 0; j < 16; j++) b[j] = (uint8_t)(((j + 1) & 15) | (j % 5) << 4);
    for (int m = 0; m < 64; m++) b[16 + m] = (uint8_t)(37 * m + 11);
    put16(b + 80, 0x3400);
    put16(b + 82, 0x3000);
    float out[256];
    ds4_dequant_row(GGML_Q2_K, b, out, 256);
    /* by hand: element 0: qs[0]=11 -> q=3, sc=1, mn=0 -> 0.75.
     * element 200: H=1 r=72: qs[40]=211=0b11010011, >>4 &3 = 1; j=12: sc=13 mn=2
     * -> 0.25·13 − 0.125·2 = 3.0.  element 255: qs[63]=(37·63+11)&255=0x24 >>6 = 0;
     * j=15: sc=0, mn=0 -> 0.  element 17: qs[17]=(640)&255=128 -> q=0; j=1: sc=2, mn=1 -> −0.125 */
    CHECK(out[0] == 0.75f, "%g", out[0]);
    CHECK(out[200] == 3.0f, "%g", out[200]);
    CHECK(out[255] == 0.0f, "%g", out[255]);
    CHECK(out[17] == -0.125f, "%g", out[17]);
    int bad = 0; /* every element against the spec's per-element formula */
    for (int i = 0; i < 256; i++) {
        const int H = i / 128, r = i % 128, j = i / 16;
        const int q = (b[16 + 32 * H + r % 32] >> (2 * (r / 32))) & 3;
        const double x = 0.25 * (b[j] & 15) * q - 0.125 * (b[j] >> 4);
        bad += out[i] != (float)x;
    }
    CHECK(bad == 0, "%d elements differ from the spec formula", bad);
}

/* Q4_K: hand-packed 6-bit scales/mins, d = 0.5, dmin = 0.25. */
static void test_kat_q4_k(void) {
    const int sc[8] = {1, 63, 17, 40, 33, 5, 62, 48}, mn[8] = {0, 9, 63, 2, 50, 31, 1, 16};
    uint8_t b[144];
    put16(b, 0x3800);
    put16(b + 2, 0x3400);
    uint8_t *s = b + 4;
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(sc[j] | (sc[j + 4] >> 4) << 6);
        s[j + 4] = (uint8_t)(mn[j] | (mn[j + 4] >> 4) << 6);
        s[j + 8] = (uint8_t)((sc[j + 4] & 15) | (mn[j + 4] & 15) << 4);
    }
    for (int m = 0; m < 128; m++) b[16 + m] = (uint8_t)(29 * m + 5);
    float out[256];
    ds4_dequant_row(GGML_Q4_K, b, out, 256);
    /* by hand: element 0: qs[0]=5 low -> 5; j=0: 0.5·1·5 − 0 = 2.5.
     * element 40: c=0 r=40 -> high nibble of qs[8]=237=0xED -> 14; j=1: sc 63 mn 9
     * -> 0.5·63·14 − 0.25·9 = 441 − 2.25 = 438.75.
     * element 130: c=2 r=2 -> low nibble of qs[66]=(29·66+5)&255=0x7F -> 15; j=4:
     * sc 33 mn 50 -> 247.5 − 12.5 = 235 */
    CHECK(out[0] == 2.5f, "%g", out[0]);
    CHECK(out[40] == 438.75f, "%g", out[40]);
    CHECK(out[130] == 235.0f, "%g", out[130]);
    int bad = 0;
    for (int i = 0; i < 256; i++) {
        const int c = i / 64, r = i % 64, j = i / 32;
        const int byte = b[16 + 32 * c + r % 32], q = r < 32 ? byte & 15 : byte >> 4;
        const double x = 0.5 * sc[j] * q - 0.25 * mn[j];
        bad += out[i] != (float)x;
    }
    CHECK(bad == 0, "%d elements differ from the spec formula", bad);
}

/* IQ2_XXS: d = 1; sub-block 0: groups (grid 1, signs 1), (grid 0, signs 0),
 * (grid 2, signs 64), (grid 255, signs 127), ls = 3; sub-block 5: group 0
 * grid 255, signs 127, ls = 15; everything else index 0. */
static void test_kat_iq2_xxs(void) {
    uint8_t b[66] = {0};
    put16(b, 0x3c00);
    put32(b + 2, 1u | 0u << 8 | 2u << 16 | 255u << 24);
    put32(b + 6, 1u | 0u << 7 | 64u << 14 | 127u << 21 | 3u << 28);
    put32(b + 2 + 40, 255u);
    put32(b + 6 + 40, 127u | 15u << 28);
    float out[256];
    ds4_dequant_row(GGML_IQ2_XXS, b, out, 256);
    const float db0 = 0.875f; /* 1·(0.5+3)/4 */
    /* grid 1 = bytes 43,8,8,8,8,8,8,8; ksigns[1] = 129: elements 0 and 7 negative */
    const float g1[8] = {-43, 8, 8, 8, 8, 8, 8, -8};
    /* grid 2 = 0x0808080808081919: bytes 25,25,8,...; ksigns[64] = 192: 6 and 7 negative */
    const float g2[8] = {25, 25, 8, 8, 8, 8, -8, -8};
    /* grid 255 = 0x2b2b2b1908081908: bytes 8,25,8,8,25,43,43,43; ksigns[127] = 255 */
    const float g255[8] = {-8, -25, -8, -8, -25, -43, -43, -43};
    int bad = 0;
    for (int k = 0; k < 8; k++) {
        bad += out[k] != db0 * g1[k];
        bad += out[8 + k] != db0 * 8;
        bad += out[16 + k] != db0 * g2[k];
        bad += out[24 + k] != db0 * g255[k];
        bad += out[160 + k] != 3.875f * g255[k]; /* ls 15: (0.5+15)/4 */
        bad += out[168 + k] != 3.875f * 8;
        bad += out[32 + k] != 0.125f * 8; /* ls 0: 0.5/4 */
    }
    CHECK(bad == 0, "%d elements wrong", bad);
    CHECK(out[0] == -37.625f && out[7] == -7.0f && out[165] == -166.625f, "known answer");
}

static void test_kat_f16_f32(void) {
    uint8_t h[6];
    put16(h, 0x3c00); put16(h + 2, 0xc100); put16(h + 4, 0x0001);
    float out[3];
    ds4_dequant_row(GGML_F16, h, out, 3);
    CHECK(out[0] == 1.0f && out[1] == -2.5f && out[2] == 0x1p-24f, "known answer");
    const float f[3] = {1.5f, -0.0f, 3e38f};
    ds4_dequant_row(GGML_F32, f, out, 3);
    CHECK(memcmp(out, f, sizeof f) == 0, "known answer");
}

/* ---- dots ------------------------------------------------------------ */

/* The documented order, written out independently: lane i%32 by fmaf, then
 * the pairwise fold. */
static float ref_dot(const float *a, const float *b, int64_t n) {
    float l[32] = {0};
    for (int64_t i = 0; i < n; i++) l[i % 32] = fmaf(a[i], b[i], l[i % 32]);
    for (int s = 16; s >= 1; s >>= 1)
        for (int j = 0; j < s; j++) l[j] += l[j + s];
    return l[0];
}

/* A random row of type t with n elements: quantised Gaussian data, or for
 * variety raw random bytes with the f16 scale fields made finite. */
static void random_row(ggml_type t, uint8_t *row, int64_t n, int raw) {
    float *x = malloc((size_t)n * sizeof *x);
    fill_gauss(x, n);
    if (!raw || t == GGML_F32 || t == GGML_F16) {
        ds4_quantize_row(t, x, row, n, NULL);
    } else {
        const size_t bb = (size_t)bytes_of(t);
        for (size_t i = 0; i < row_bytes(t, n); i++) row[i] = (uint8_t)rnd64();
        for (size_t o = 0; o < row_bytes(t, n); o += bb) { /* d fields: random in ±[2^-8, 2) */
            const uint16_t d = (uint16_t)(0x1c00 + rnd64() % 0x2000) | (rnd64() & 1 ? 0x8000 : 0);
            const int off = t == GGML_Q2_K ? 80 : 0;
            put16(row + o + off, d);
            if (t == GGML_Q2_K || t == GGML_Q4_K) put16(row + o + off + 2, d & 0x7fff);
        }
    }
    free(x);
}

static void test_dot_matches_dequant(void) {
    const int64_t n = 1024;
    uint8_t *row = malloc(row_bytes(GGML_F32, n));
    float *x = malloc(n * sizeof *x), *w = malloc(n * sizeof *w);
    for (int ti = 0; ti < 6; ti++)
        for (int raw = 0; raw < 2; raw++)
            for (int rep = 0; rep < 20; rep++) {
                const ggml_type t = ALL[ti];
                const int64_t m = (t == GGML_F32 || t == GGML_F16) ? n - (rep % 40) : n; /* ragged too */
                random_row(t, row, m, raw);
                fill_gauss(x, m);
                ds4_dequant_row(t, row, w, m);
                const float got = ds4_dot_row(t, row, x, m);
                double exact = 0, mag = 0;
                for (int64_t i = 0; i < m; i++) { exact += (double)w[i] * x[i]; mag += fabs((double)w[i] * x[i]); }
                CHECK(got == ref_dot(w, x, m), "%s: fused %.9g vs ordered dot of dequant %.9g", NAME[ti], got,
                      ref_dot(w, x, m));
                CHECK(got == ds4_dot_f32(w, x, m), "%s", NAME[ti]);
                CHECK(fabs(got - exact) <= 1e-5 * mag, "%s: %.9g vs exact %.9g", NAME[ti], got, exact);
            }
    free(row); free(x); free(w);
}

static void test_matvec_matmul(void) {
    /* n_tok 1 (decode: fused dot) to 6: token pairs and an odd last token;
     * rows [2, 21): a full tile of 16 rows and a partial one */
    const int64_t n_in = 512, rows = 21, xs = n_in + 3, ys = rows + 2;
    for (int64_t n_tok = 1; n_tok <= 6; n_tok++) {
        for (int ti = 0; ti < 6; ti++) {
            const ggml_type t = ALL[ti];
            const int64_t m = t == GGML_F16 ? n_in - 8 : n_in; /* F16 rows need not be 32-aligned */
            const size_t rb = row_bytes(t, m);
            uint8_t *W = malloc(rb * rows);
            for (int r = 0; r < rows; r++) random_row(t, W + r * rb, m, r & 1);
            float *X = malloc((size_t)(xs * n_tok) * sizeof *X), *Y = malloc((size_t)(ys * n_tok) * sizeof *Y);
            fill_gauss(X, xs * n_tok);
            for (int64_t i = 0; i < ys * n_tok; i++) Y[i] = -999.0f;
            ds4_matmul_rows(t, W, m, 2, rows, X, n_tok, xs, Y, ys);
            int bad = 0, touched = 0;
            for (int64_t tk = 0; tk < n_tok; tk++)
                for (int64_t r = 0; r < ys; r++) {
                    const float y = Y[tk * ys + r];
                    if (r >= 2 && r < rows) bad += y != ds4_dot_row(t, W + r * rb, X + tk * xs, m);
                    else touched += y != -999.0f;
                }
            CHECK(bad == 0, "%s x%lld: %d matmul results differ from ds4_dot_row", NAME[ti], (long long)n_tok, bad);
            CHECK(touched == 0, "%s: %d outputs outside [r0,r1) written", NAME[ti], touched);
            float yv[7] = {0};
            ds4_matvec_rows(t, W, m, 1, 6, X, yv);
            bad = yv[0] != 0 || yv[6] != 0;
            for (int r = 1; r < 6; r++) bad += yv[r] != ds4_dot_row(t, W + r * rb, X, m);
            CHECK(bad == 0, "%s: matvec", NAME[ti]);
            free(W); free(X); free(Y);
        }
    }
}

/* ---- quantisers ------------------------------------------------------ */

static double rel_rms(ggml_type t, const float *x, int64_t n, const float *imp, const float *errw) {
    uint8_t *q = malloc(row_bytes(t, n));
    float *y = malloc((size_t)n * sizeof *y);
    ds4_quantize_row(t, x, q, n, imp);
    ds4_dequant_row(t, q, y, n);
    double e = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        const double w = errw ? errw[i] : 1.0;
        e += w * (double)(x[i] - y[i]) * (x[i] - y[i]);
        s += w * (double)x[i] * x[i];
    }
    free(q); free(y);
    return sqrt(e / s);
}

/* measured on N(0,1): F16 0.02 %, Q8_0 0.54 %, Q2_K 27.8 %, Q4_K 7.2 %, IQ2_XXS 34.2 %;
 * bounds leave margin for seed-to-seed spread (well under 1 % absolute) */
static const double BOUND[6] = {0, 0.0005, 0.0065, 0.31, 0.08, 0.38};

static void test_quant_error(void) {
    const int64_t n = 256 * 64;
    float *x = malloc(n * sizeof *x);
    fill_gauss(x, n);
    for (int ti = 0; ti < 6; ti++) {
        const double e = rel_rms(ALL[ti], x, n, NULL, NULL);
        printf("     %-8s rel RMS error %.4f\n", NAME[ti], e);
        if (ALL[ti] == GGML_F32) CHECK(e == 0, "known answer");
        else CHECK(e < BOUND[ti], "%s: %.4f >= %.4f", NAME[ti], e, BOUND[ti]);
        CHECK(e > BOUND[ti] / 10 || ALL[ti] == GGML_F32, "%s: %.5f suspiciously small", NAME[ti], e);
    }
    free(x);
}

/* Scale, sign and offset robustness: tiny and huge magnitudes, a skewed
 * (all positive, offset) distribution and an all-zero row. */
static void test_quant_shapes(void) {
    const int64_t n = 256 * 8;
    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
    uint8_t *q = malloc(row_bytes(GGML_F32, n));
    for (int ti = 2; ti < 6; ti++) {
        const ggml_type t = ALL[ti];
        for (int v = 0; v < 3; v++) {
            const float scale = v == 0 ? 1e-3f : v == 1 ? 300.0f : 1.0f;
            for (int64_t i = 0; i < n; i++) x[i] = v == 2 ? 2.0f + fabsf(rnd_gauss()) : scale * rnd_gauss();
            const double e = rel_rms(t, x, n, NULL, NULL);
            CHECK(e < BOUND[ti] * 1.2, "%s variant %d: %.4f", NAME[ti], v, e);
        }
        memset(x, 0, n * sizeof *x);
        ds4_quantize_row(t, x, q, n, NULL);
        ds4_dequant_row(t, q, y, n);
        int nz = 0;
        for (int64_t i = 0; i < n; i++) nz += y[i] != 0;
        CHECK(nz == 0, "%s: zero row dequantises to %d nonzeros", NAME[ti], nz);
        /* determinism: same input, same bytes */
        fill_gauss(x, n);
        uint8_t *q2 = malloc(row_bytes(t, n));
        ds4_quantize_row(t, x, q, n, x);
        ds4_quantize_row(t, x, q2, n, x);
        CHECK(memcmp(q, q2, row_bytes(t, n)) == 0, "%s not deterministic", NAME[ti]);
        free(q2);
    }
    free(x); free(y); free(q);
}

/* Importance concentrated on a few columns: quantising with it must lower
 * the error measured under that importance. */
static void test_importance(void) {
    const int64_t n = 256 * 32;
    float *x = malloc(n * sizeof *x), *imp = malloc(n * sizeof *imp);
    fill_gauss(x, n);
    for (int64_t i = 0; i < n; i++) imp[i] = (rnd64() % 8 == 0) ? 100.0f : 0.1f;
    for (int ti = 3; ti < 6; ti++) {
        const double plain = rel_rms(ALL[ti], x, n, NULL, imp), weighted = rel_rms(ALL[ti], x, n, imp, imp);
        printf("     %-8s importance-weighted error: plain %.4f, with importance %.4f\n", NAME[ti], plain, weighted);
        CHECK(weighted < 0.85 * plain, "%s: %.4f vs %.4f", NAME[ti], weighted, plain);
    }
    free(x); free(imp);
}

/* IQ2_XXS search is exact per group: at the block's own db, no other grid
 * entry × even sign pattern has a lower weighted error than the one chosen
 * (brute force over all 256 × 128). */
static void test_iq2_group_optimal(void) {
    float x[256], imp[256];
    uint8_t b[66];
    fill_gauss(x, 256);
    for (int i = 0; i < 256; i++) imp[i] = 0.05f + (float)rnd_unit();
    ds4_quantize_row(GGML_IQ2_XXS, x, b, 256, imp);
    const float d = ds4_f16_to_f32((uint16_t)(b[0] | b[1] << 8));
    int worse = 0;
    for (int ib = 0; ib < 8; ib++) {
        const uint8_t *p = b + 2 + 8 * ib;
        const uint32_t A = p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
        const uint32_t B = p[4] | p[5] << 8 | p[6] << 16 | (uint32_t)p[7] << 24;
        const float db = d * (0.5f + (float)(B >> 28)) * 0.25f;
        for (int l = 0; l < 4; l++) {
            const float *xl = x + 32 * ib + 8 * l, *wl = imp + 32 * ib + 8 * l;
            double best = INFINITY, chosen = 0;
            for (int g = 0; g < 256; g++)
                for (int sg = 0; sg < 128; sg++) {
                    double e = 0;
                    for (int k = 0; k < 8; k++) {
                        const float m = (float)((ds4_iq2xxs_grid[g] >> 8 * k) & 255);
                        const float v = db * ((ds4_ksigns_iq2xs[sg] >> k) & 1 ? -m : m);
                        e += wl[k] * (double)(xl[k] - v) * (xl[k] - v);
                    }
                    if (e < best) best = e;
                    if (g == (int)(A >> 8 * l & 255) && sg == (int)(B >> 7 * l & 127)) chosen = e;
                }
            worse += chosen > best * (1 + 1e-4) + 1e-12;
        }
    }
    CHECK(worse == 0, "%d of 32 groups not optimal at their scale", worse);
}

/* K-quants: given the block's scales, every level is the nearest one. */
static void test_kquant_levels_optimal(void) {
    for (int ti = 3; ti <= 4; ti++) {
        const ggml_type t = ALL[ti];
        float x[256], y[256], lv[256][16];
        uint8_t b[144];
        fill_gauss(x, 256);
        ds4_quantize_row(t, x, b, 256, NULL);
        ds4_dequant_row(t, b, y, 256);
        /* the levels available to each element: dequantise the block with
         * that element's code set to each value in turn */
        const int nmax = t == GGML_Q2_K ? 3 : 15;
        for (int q = 0; q <= nmax; q++) {
            uint8_t c[144];
            memcpy(c, b, sizeof c);
            if (t == GGML_Q2_K) for (int m = 0; m < 64; m++) c[16 + m] = (uint8_t)(q * 0x55);
            else for (int m = 0; m < 128; m++) c[16 + m] = (uint8_t)(q * 0x11);
            float z[256];
            ds4_dequant_row(t, c, z, 256);
            for (int i = 0; i < 256; i++) lv[i][q] = z[i];
        }
        int bad = 0;
        for (int i = 0; i < 256; i++)
            for (int q = 0; q <= nmax; q++) bad += fabsf(x[i] - lv[i][q]) < fabsf(x[i] - y[i]) * (1 - 1e-6f);
        CHECK(bad == 0, "%s: %d elements not at their nearest level", NAME[ti], bad);
    }
}

/* Non-finite input must not crash or hang, nor spoil other blocks. */
static void test_quant_nonfinite(void) {
    float x[512], y[512];
    uint8_t q[2048];
    for (int ti = 1; ti < 6; ti++) {
        const ggml_type t = ALL[ti];
        const float bad[3] = {INFINITY, -INFINITY, NAN};
        for (int v = 0; v < 3; v++) {
            fill_gauss(x, 512);
            x[7] = bad[v];
            ds4_quantize_row(t, x, q, 512, NULL);
            ds4_dequant_row(t, q, y, 512);
            double e = 0, s2 = 0;
            for (int i = 256; i < 512; i++) { e += (double)(x[i] - y[i]) * (x[i] - y[i]); s2 += (double)x[i] * x[i]; }
            CHECK(sqrt(e / s2) < BOUND[ti] * 1.5, "%s with %g: clean block error %.4f", NAME[ti], bad[v], sqrt(e / s2));
        }
    }
}

/* Contract violations (a type that is not a weight format, a length that
 * is not whole blocks) abort loudly instead of reading past a row. */
static int aborts(void (*fn)(void)) {
    fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
        const int fd = open("/dev/null", O_WRONLY);
        if (fd >= 0) dup2(fd, 2);
        fn();
        _exit(0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT;
}
static float scratch[512];
static void dot_i32(void) { ds4_dot_row(GGML_I32, scratch, scratch, 4); }
static void dot_ragged(void) { ds4_dot_row(GGML_Q4_K, scratch, scratch, 100); }
static void quant_ragged(void) { ds4_quantize_row(GGML_Q8_0, scratch, scratch + 256, 33, NULL); }
static void dot_ok(void) { ds4_dot_row(GGML_Q8_0, scratch, scratch, 64); }

static void test_contract_aborts(void) {
    CHECK(aborts(dot_i32), "I32 dot did not abort");
    CHECK(aborts(dot_ragged), "Q4_K dot of 100 elements did not abort");
    CHECK(aborts(quant_ragged), "Q8_0 quantise of 33 elements did not abort");
    CHECK(!aborts(dot_ok), "a valid dot aborted");
}

/* ---- throughput (--bench) ---------------------------------------------- */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); /* CPU time: the host is shared */
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void bench(void) {
    const int64_t n_in = 4096, rows = 1024;
    float *x = malloc(n_in * sizeof *x), *y = malloc(rows * 8 * sizeof *y), *X = malloc(8 * n_in * sizeof *X);
    fill_gauss(x, n_in);
    fill_gauss(X, 8 * n_in);
    for (int ti = 0; ti < 6; ti++) {
        const ggml_type t = ALL[ti];
        const size_t rb = row_bytes(t, n_in);
        uint8_t *W = malloc(rb * rows);
        for (int r = 0; r < rows; r++) random_row(t, W + r * rb, n_in, 1);
        double t0 = now();
        int reps = 0;
        while (now() - t0 < 0.5) { ds4_matvec_rows(t, W, n_in, 0, rows, x, y); reps++; }
        const double dt = (now() - t0) / reps;
        t0 = now();
        int mreps = 0;
        while (now() - t0 < 0.5) { ds4_matmul_rows(t, W, n_in, 0, rows, X, 8, n_in, y, rows); mreps++; }
        const double mt = (now() - t0) / mreps;
        printf("%-8s dot %6.2f GB/s of weights (%6.2f GMAC/s); matmul x8 %6.2f GMAC/s\n", NAME[ti],
               rb * rows / dt * 1e-9, n_in * rows / dt * 1e-9, 8.0 * n_in * rows / mt * 1e-9);
        free(W);
    }
    /* Weights far larger than the caches, as in decode: one matvec over
     * 256 MiB of each type (1024 random rows repeated), best of three. */
    for (int ti = 0; ti < 6; ti++) {
        const ggml_type t = ALL[ti];
        const size_t rb = row_bytes(t, n_in), tile = rb * rows;
        const int64_t big_rows = (int64_t)((256u << 20) / rb);
        uint8_t *W = malloc(rb * (size_t)big_rows);
        float *yb = malloc((size_t)big_rows * sizeof *yb);
        for (int r = 0; r < rows; r++) random_row(t, W + r * rb, n_in, 1);
        for (size_t o = tile; o < rb * (size_t)big_rows; o += tile)
            memcpy(W + o, W, o + tile <= rb * (size_t)big_rows ? tile : rb * (size_t)big_rows - o);
        double best = 1e9;
        for (int rep = 0; rep < 3; rep++) {
            const double t0 = now();
            ds4_matvec_rows(t, W, n_in, 0, big_rows, x, yb);
            if (now() - t0 < best) best = now() - t0;
        }
        printf("%-8s dot from DRAM %6.2f GB/s of weights\n", NAME[ti], rb * big_rows / best * 1e-9);
        free(W); free(yb);
    }
    const int64_t nq = 256 * 256;
    float *xq = malloc(nq * sizeof *xq);
    uint8_t *q = malloc(row_bytes(GGML_F32, nq));
    fill_gauss(xq, nq);
    for (int ti = 1; ti < 6; ti++) {
        double t0 = now();
        int reps = 0;
        while (now() - t0 < 0.5) { ds4_quantize_row(ALL[ti], xq, q, nq, NULL); reps++; }
        printf("%-8s quantize %7.2f MB/s of f32 input\n", NAME[ti], 4.0 * nq * reps / (now() - t0) * 1e-6);
    }
    free(x); free(y); free(X); free(xq); free(q);
}

int main(int argc, char **argv) {
    const char *s = getenv("DS4_SEED");
    const uint64_t seed = s && *s ? strtoull(s, NULL, 10) : (uint64_t)time(NULL);
    rng_state = seed;
    printf("seed %llu\n", (unsigned long long)seed);
    if (argc > 1 && !strcmp(argv[1], "--bench")) {
        bench();
        return 0;
    }
    RUN(test_iq2_tables);
    RUN(test_f16_exhaustive);
    RUN(test_f16_rounding);
    RUN(test_kat_q8_0);
    RUN(test_kat_q2_k);
    RUN(test_kat_q4_k);
    RUN(test_kat_iq2_xxs);
    RUN(test_kat_f16_f32);
    RUN(test_dot_matches_dequant);
    RUN(test_matvec_matmul);
    RUN(test_quant_error);
    RUN(test_quant_shapes);
    RUN(test_importance);
    RUN(test_iq2_group_optimal);
    RUN(test_kquant_levels_optimal);
    RUN(test_quant_nonfinite);
    RUN(test_contract_aborts);
    TEST_END();
}
