/* Weight formats: f16 conversion, block dequantisation and fused dots
 * (spec model.md §8). Quantisers live in quantize.c.
 *
 * Summation order (the contract every dot here keeps, see quant.h): element
 * i of a row is multiplied into lane i mod 32 with one fused multiply-add
 * (fmaf, single rounding), lanes start at +0, and the 32 lanes are folded
 * pairwise at the end (lane j += lane j+16, then +8, +4, +2, +1). The AVX2
 * path keeps the 32 lanes in four ymm registers; the portable path runs the
 * same fmaf sequence in a float[32], so both give identical bits. Dequantised
 * values are produced by the same per-block functions that ds4_dequant_row
 * uses, so dot(row, x) == ds4_dot_f32(dequant(row), x) exactly. */
#include "quant/quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
/* -DDS4_QUANT_SCALAR builds the portable path (same bits) for testing. */
#if defined(__AVX2__) && defined(__FMA__) && !defined(DS4_QUANT_SCALAR)
#define DS4_QUANT_AVX2 1
#endif
#if defined(DS4_QUANT_AVX2) || (defined(__F16C__) && !defined(DS4_QUANT_SCALAR))
#include <immintrin.h>
#endif

/* ---- f16 ------------------------------------------------------------- */

static uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* static inline so the block dequantisers inline it (no call per block) */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 0x3ff;
    if (exp == 31) /* inf / nan: payload moves to the top of the f32 mantissa */
        return bits_f32(sign | 0x7f800000u | man << 13);
    if (exp == 0) { /* zero / subnormal: man·2^-24, exact in f32 */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_f32(sign | (exp + 112) << 23 | man << 13); /* rebias 15 -> 127 */
}

float ds4_f16_to_f32(uint16_t h) { return f16_to_f32(h); }

uint16_t ds4_f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)(x >> 16 & 0x8000);
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) /* nan: keep the top payload bits, force quiet so it stays nan */
        return sign | 0x7e00 | (uint16_t)(a >> 13 & 0x3ff);
    if (a >= 0x477ff000u) /* >= 65520 (halfway 65504..65536, odd mantissa) -> inf */
        return sign | 0x7c00;
    if (a >= 0x38800000u) { /* normal half (>= 2^-14): rebias, round 13 dropped bits */
        uint32_t r = a - (112u << 23), h = r >> 13, rem = r & 0x1fff;
        if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++; /* carry may bump the exponent: correct */
        return sign | (uint16_t)h;
    }
    uint32_t e = a >> 23;
    if (e < 102) /* < 2^-25: below half the smallest subnormal */
        return sign;
    /* subnormal: value / 2^-24 = mant · 2^(e-126), rounded to nearest even;
     * 1024 is the smallest normal's encoding, so overflow is correct too. */
    uint32_t mant = (a & 0x7fffff) | 0x800000, shift = 126 - e;
    uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    return sign | (uint16_t)q;
}

float ds4_round_f16(float f) { return ds4_f16_to_f32(ds4_f32_to_f16(f)); }

/* ---- row checks ----------------------------------------------------- */

/* The weight formats computed here (I32 is a type of the file, not of dots). */
static int is_weight_type(ggml_type t) {
    return t == GGML_F32 || t == GGML_F16 || t == GGML_Q8_0 || t == GGML_Q2_K || t == GGML_Q4_K ||
           t == GGML_IQ2_XXS;
}

/* Shapes come from validated GGUF headers, so a mismatch here is a caller
 * bug: fail loudly instead of reading past a row. */
static void check_row(ggml_type t, int64_t n, const char *who) {
    if (!is_weight_type(t) || n < 0 || n % ggml_block_elems(t) != 0) {
        fprintf(stderr, "ds4 quant: %s: type %d with %lld elements is not supported\n", who,
                (int)t, (long long)n);
        abort();
    }
}

/* ---- per-block dequantisers (the single source of dequantised values) - */

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Q8_0, 32 elements: x = d·q. */
static void deq_q8_0(const uint8_t *restrict b, float *restrict v) {
    const float d = f16_to_f32(rd16(b));
    const int8_t *q = (const int8_t *)(b + 2);
    for (int k = 0; k < 32; k++) v[k] = d * (float)q[k];
}

/* Eight K-quant values o[k] = dl·((p[k] >> shift) & mask) − ml, one fma
 * each; the AVX2 form computes the same fma per lane. */
static inline void deq8_k(const uint8_t *restrict p, int shift, int mask, float dl, float ml, float *restrict o) {
#ifdef DS4_QUANT_AVX2
    __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    q = _mm256_and_si256(_mm256_srl_epi32(q, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(mask));
    _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(dl), _mm256_cvtepi32_ps(q), _mm256_set1_ps(-ml)));
#else
    for (int k = 0; k < 8; k++) o[k] = fmaf(dl, (float)((p[k] >> shift) & mask), -ml);
#endif
}

/* Q2_K, 256 elements. Bit plane s (shift 2s) of qs[32h .. 32h+31] holds the
 * 32 consecutive elements 128h + 32s + k; each 16 of them share a scale. */
static void deq_q2_k(const uint8_t *restrict b, float *restrict v) {
    const uint8_t *sc = b, *qs = b + 16;
    const float d = f16_to_f32(rd16(b + 80)), dmin = f16_to_f32(rd16(b + 82));
    float dl[16], ml[16]; /* all 16 sub-block scales at once (vectorises) */
    for (int j = 0; j < 16; j++) {
        dl[j] = d * (float)(sc[j] & 15);
        ml[j] = dmin * (float)(sc[j] >> 4);
    }
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int half = 0; half < 2; half++) {
                const int j = 8 * h + 2 * s + half; /* sub-block of 16 = element / 16 */
                const uint8_t *q = qs + 32 * h + 16 * half;
                deq8_k(q, 2 * s, 3, dl[j], ml[j], v + 16 * j);
                deq8_k(q + 8, 2 * s, 3, dl[j], ml[j], v + 16 * j + 8);
            }
}

/* Q4_K 6-bit scale/min j of 8, packed in 12 bytes (§8). */
static void q4k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4;
        *mn = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    }
}

/* Q4_K, 256 elements: chunk c of 64 = low nibbles of qs[32c..] then high. */
static void deq_q4_k(const uint8_t *restrict b, float *restrict v) {
    const float d = f16_to_f32(rd16(b)), dmin = f16_to_f32(rd16(b + 2));
    const uint8_t *scales = b + 4, *qs = b + 16;
    for (int c = 0; c < 4; c++)
        for (int h = 0; h < 2; h++) {
            int sc, mn;
            q4k_scale_min(scales, 2 * c + h, &sc, &mn);
            const float dl = d * (float)sc, ml = dmin * (float)mn;
            for (int k = 0; k < 32; k += 8) deq8_k(qs + 32 * c + k, 4 * h, 15, dl, ml, v + 64 * c + 32 * h + k);
        }
}

/* IQ2_XXS, 256 elements: 8 sub-blocks of 32, each two u32 (grid indices;
 * 4×7 sign bits + 4-bit scale). Magnitude × sign is an exact small integer
 * in float, so each value is one rounding, db · (±m), on either path. */
static void deq_iq2_xxs(const uint8_t *restrict b, float *restrict v) {
    const float d = f16_to_f32(rd16(b));
#ifdef DS4_QUANT_AVX2
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 minus = _mm256_set1_ps(-0.0f);
#endif
    for (int ib = 0; ib < 8; ib++) {
        const uint32_t A = rd32(b + 2 + 8 * ib), B = rd32(b + 6 + 8 * ib);
        const float db = d * (0.5f + (float)(B >> 28)) * 0.25f;
        for (int l = 0; l < 4; l++) {
            const uint64_t g = ds4_iq2xxs_grid[(A >> 8 * l) & 255];
            const uint8_t sg = ds4_ksigns_iq2xs[(B >> 7 * l) & 127];
            float *o = v + 32 * ib + 8 * l;
#ifdef DS4_QUANT_AVX2
            /* bytes -> 8 floats; sign bit k set -> flip the float's sign */
            const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)g)));
            const __m256i neg = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(sg), bit), bit);
            const __m256 sm = _mm256_xor_ps(m, _mm256_and_ps(_mm256_castsi256_ps(neg), minus));
            _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_set1_ps(db), sm));
#else
            for (int k = 0; k < 8; k++) {
                const float m = (float)((g >> 8 * k) & 255);
                o[k] = db * ((sg >> k) & 1 ? -m : m);
            }
#endif
        }
    }
}

/* F16 run of n (any n): conversion is exact, so F16C and the bit routine
 * agree bit for bit. */
static void deq_f16(const uint8_t *p, float *v, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__) && !defined(DS4_QUANT_SCALAR)
    for (; i + 8 <= n; i += 8, p += 16)
        _mm256_storeu_ps(v + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
#endif
    for (; i < n; i++, p += 2) v[i] = f16_to_f32(rd16(p));
}

/* Quantised block kinds: one block -> its elements. */
static void deq_block(ggml_type t, const uint8_t *b, float *v) {
    switch (t) {
    case GGML_Q8_0: deq_q8_0(b, v); break;
    case GGML_Q2_K: deq_q2_k(b, v); break;
    case GGML_Q4_K: deq_q4_k(b, v); break;
    case GGML_IQ2_XXS: deq_iq2_xxs(b, v); break;
    default: abort(); /* unreachable: check_row admitted only these */
    }
}

void ds4_dequant_row(ggml_type type, const void *row, float *out, int64_t n) {
    check_row(type, n, "dequant");
    const uint8_t *p = row;
    switch (type) {
    case GGML_F32: memcpy(out, row, (size_t)n * 4); return;
    case GGML_F16: deq_f16(p, out, n); return;
    default: break;
    }
    const int64_t be = ggml_block_elems(type), bb = ggml_block_bytes(type);
    for (int64_t i = 0; i < n; i += be, p += bb) deq_block(type, p, out + i);
}

/* ---- the 32-lane accumulator ------------------------------------------ */

#ifdef DS4_QUANT_AVX2
/* Four named registers (not an array) so -O2 keeps them out of memory. */
typedef struct { __m256 a0, a1, a2, a3; } acc32;
static inline void acc_zero(acc32 *a) { a->a0 = a->a1 = a->a2 = a->a3 = _mm256_setzero_ps(); }
/* lanes 0..31 += w[0..31]·x[0..31] (one fma each) */
static inline void acc_fma32(acc32 *a, const float *w, const float *x) {
    a->a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w), _mm256_loadu_ps(x), a->a0);
    a->a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), _mm256_loadu_ps(x + 8), a->a1);
    a->a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 16), _mm256_loadu_ps(x + 16), a->a2);
    a->a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 24), _mm256_loadu_ps(x + 24), a->a3);
}
static inline void acc_store(const acc32 *a, float lanes[32]) {
    _mm256_storeu_ps(lanes, a->a0);
    _mm256_storeu_ps(lanes + 8, a->a1);
    _mm256_storeu_ps(lanes + 16, a->a2);
    _mm256_storeu_ps(lanes + 24, a->a3);
}
#else
typedef struct { float v[32]; } acc32;
static inline void acc_zero(acc32 *a) {
    for (int j = 0; j < 32; j++) a->v[j] = 0.0f;
}
static inline void acc_fma32(acc32 *a, const float *w, const float *x) {
    for (int j = 0; j < 32; j++) a->v[j] = fmaf(w[j], x[j], a->v[j]);
}
static inline void acc_store(const acc32 *a, float lanes[32]) { memcpy(lanes, a->v, sizeof a->v); }
#endif

/* Fold the lanes (after adding a ragged tail of n < 32 elements to lanes
 * 0..n-1, which continues the "lane = i mod 32" rule). */
static float acc_finish(const acc32 *a, const float *w, const float *x, int64_t n) {
    float l[32];
    acc_store(a, l);
    for (int64_t j = 0; j < n; j++) l[j] = fmaf(w[j], x[j], l[j]);
    for (int s = 16; s >= 1; s >>= 1)
        for (int j = 0; j < s; j++) l[j] += l[j + s];
    return l[0];
}

float ds4_dot_f32(const float *a, const float *b, int64_t n) {
    acc32 acc;
    acc_zero(&acc);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) acc_fma32(&acc, a + i, b + i);
    return acc_finish(&acc, a + i, b + i, n - i);
}

float ds4_dot_row(ggml_type type, const void *row, const float *x, int64_t n) {
    check_row(type, n, "dot");
    const uint8_t *p = row;
    if (type == GGML_F32) return ds4_dot_f32(row, x, n);
    acc32 acc;
    acc_zero(&acc);
    float v[256];
    int64_t i = 0;
    if (type == GGML_F16) { /* any n: 256 at a time, whole 32s, then a tail */
        for (; i < n; i += 256, p += 512) {
            const int64_t m = n - i < 256 ? n - i : 256;
            deq_f16(p, v, m);
            int64_t c = 0;
            for (; c + 32 <= m; c += 32) acc_fma32(&acc, v + c, x + i + c);
            if (c < m) return acc_finish(&acc, v + c, x + i + c, m - c);
        }
        return acc_finish(&acc, v, x, 0);
    }
    /* One loop per format, so its dequantiser is inlined and the accumulator
     * registers are not spilled around a call per block. */
#define DOT_BLOCKS(deq, be, bb)                                                       \
    for (; i < n; i += (be), p += (bb)) {                                             \
        deq(p, v);                                                                    \
        for (int c = 0; c < (be); c += 32) acc_fma32(&acc, v + c, x + i + c);         \
    }
    switch (type) {
    case GGML_Q8_0: DOT_BLOCKS(deq_q8_0, 32, 34); break;
    case GGML_Q2_K: DOT_BLOCKS(deq_q2_k, 256, 84); break;
    case GGML_Q4_K: DOT_BLOCKS(deq_q4_k, 256, 144); break;
    default: DOT_BLOCKS(deq_iq2_xxs, 256, 66); break; /* check_row admitted only these */
    }
#undef DOT_BLOCKS
    return acc_finish(&acc, v, x, 0);
}

void ds4_matvec_rows(ggml_type type, const void *w, int64_t n_in, int64_t r0, int64_t r1,
                     const float *x, float *y) {
    check_row(type, n_in, "matvec");
    const size_t rb = (size_t)ggml_row_bytes(type, (uint64_t)n_in);
    for (int64_t r = r0; r < r1; r++) y[r] = ds4_dot_row(type, (const uint8_t *)w + (size_t)r * rb, x, n_in);
}

void ds4_matmul_rows(ggml_type type, const void *w, int64_t n_in, int64_t r0, int64_t r1,
                     const float *x, int64_t n_tok, int64_t x_stride, float *y, int64_t y_stride) {
    check_row(type, n_in, "matmul");
    const size_t rb = (size_t)ggml_row_bytes(type, (uint64_t)n_in);
    /* Dequantise each row once; ds4_dot_f32 over it runs the very fma
     * sequence ds4_dot_row runs, so prefill equals decode bit for bit. */
    float *buf = type == GGML_F32 ? NULL : malloc((size_t)n_in * sizeof *buf);
    for (int64_t r = r0; r < r1; r++) {
        const void *row = (const uint8_t *)w + (size_t)r * rb;
        const float *wr = row;
        if (type != GGML_F32) {
            if (!buf) { /* no scratch: same results, one dequantisation per token */
                for (int64_t t = 0; t < n_tok; t++)
                    y[t * y_stride + r] = ds4_dot_row(type, row, x + t * x_stride, n_in);
                continue;
            }
            ds4_dequant_row(type, row, buf, n_in);
            wr = buf;
        }
        for (int64_t t = 0; t < n_tok; t++) y[t * y_stride + r] = ds4_dot_f32(wr, x + t * x_stride, n_in);
    }
    free(buf);
}
