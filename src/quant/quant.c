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
#include <pthread.h>
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

#ifdef DS4_QUANT_AVX2
/* IQ2_XXS value tables, built once: grid entry g as 8 floats, and the 128
 * sign patterns of ksigns as f32 sign-bit masks — so a group of 8 values is
 * two loads, a xor and a product (no byte unpacking, no branch). */
static _Alignas(32) float iq2_gridf[256][8];
static _Alignas(32) uint32_t iq2_signm[128][8];
static pthread_once_t iq2_once = PTHREAD_ONCE_INIT;
static void iq2_build(void) {
    for (int g = 0; g < 256; g++)
        for (int k = 0; k < 8; k++) iq2_gridf[g][k] = (float)((ds4_iq2xxs_grid[g] >> 8 * k) & 255);
    for (int s = 0; s < 128; s++)
        for (int k = 0; k < 8; k++) iq2_signm[s][k] = (uint32_t)((ds4_ksigns_iq2xs[s] >> k) & 1) << 31;
}

#endif

/* Shapes come from validated GGUF headers, so a mismatch here is a caller
 * bug: fail loudly instead of reading past a row. */
static void check_row(ggml_type t, int64_t n, const char *who) {
    if (!is_weight_type(t) || n < 0 || n % ggml_block_elems(t) != 0) {
        fprintf(stderr, "ds4 quant: %s: type %d with %lld elements is not supported\n", who,
                (int)t, (long long)n);
        abort();
    }
#ifdef DS4_QUANT_AVX2
    if (t == GGML_IQ2_XXS) pthread_once(&iq2_once, iq2_build);
#endif
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
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

/* ---- per-block dequantisers (the single source of dequantised values) - */

#ifdef DS4_QUANT_AVX2
/* AVX2 block kernels. Each produces its block 32 elements at a time in four
 * registers (elements 0-7, 8-15, 16-23, 24-31 of the chunk) and hands them
 * to put32, which either stores them (dequantisation) or multiplies them
 * into the 32 lanes (a fused dot) — so a dot never writes its weights to
 * memory and both uses get the very same values. Every value is computed by
 * the same single-rounding operation as the portable code below (a product,
 * or one fma), so the two paths agree bit for bit. */

static inline __attribute__((always_inline)) void put32(acc32 *a, const float *x, acc32 *a2, const float *x2,
                                                       float *out, int64_t off, __m256 v0, __m256 v1, __m256 v2,
                                                       __m256 v3) {
    if (out) {
        _mm256_storeu_ps(out + off, v0);
        _mm256_storeu_ps(out + off + 8, v1);
        _mm256_storeu_ps(out + off + 16, v2);
        _mm256_storeu_ps(out + off + 24, v3);
        return;
    }
    a->a0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + off), a->a0);
    a->a1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + off + 8), a->a1);
    a->a2 = _mm256_fmadd_ps(v2, _mm256_loadu_ps(x + off + 16), a->a2);
    a->a3 = _mm256_fmadd_ps(v3, _mm256_loadu_ps(x + off + 24), a->a3);
    if (a2) { /* a second token's lanes, same values (prefill) */
        a2->a0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x2 + off), a2->a0);
        a2->a1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x2 + off + 8), a2->a1);
        a2->a2 = _mm256_fmadd_ps(v2, _mm256_loadu_ps(x2 + off + 16), a2->a2);
        a2->a3 = _mm256_fmadd_ps(v3, _mm256_loadu_ps(x2 + off + 24), a2->a3);
    }
}

/* Weights stream from DRAM once per token, and the decoding work between
 * loads is long enough that the hardware prefetcher falls behind (a Q8_0
 * matvec over 285 MB read 4.3 GB/s without, 9 GB/s with this on the 2-core
 * dev box): ask for the bytes 4 KiB ahead (rows are contiguous, so this
 * runs into the next row; a prefetch past the end cannot fault). */
static inline void prefetch_ahead(const uint8_t *p) { _mm_prefetch((const char *)((uintptr_t)p + 4096), _MM_HINT_T0); }

/* A block's f16 scale. F16C converts exactly like f16_to_f32 for all 65536
 * inputs (test_quant checks), without its branches. */
static inline float f16_scale(const uint8_t *p) {
#ifdef __F16C__
    return _cvtsh_ss(rd16(p));
#else
    return f16_to_f32(rd16(p));
#endif
}

/* Q8_0, 32 elements: d·q, one product each (vpmovsxbd widens 8 bytes
 * straight from memory). */
static inline __attribute__((always_inline)) void blk_q8_0(const uint8_t *b, acc32 *a, const float *x, acc32 *a2,
                                                          const float *x2, float *out) {
    const __m256 d = _mm256_set1_ps(f16_scale(b));
#define Q8(o) _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + (o))))))
    put32(a, x, a2, x2, out, 0, Q8(0), Q8(8), Q8(16), Q8(24));
#undef Q8
}

/* Q2_K, 256 elements. Bit plane s (shift 2s) of qs[32h .. 32h+31] holds the
 * 32 consecutive elements 128h + 32s + k; each 16 of them share a scale, so
 * a 16-sub-block has only four values, t[q] = fma(dl, q, −ml): they are
 * computed once (one fma each, as per element in the portable code) and
 * picked by vpermps. vpermps reads three index bits, (q >> 2s) & 7, so the
 * table repeats its four values in entries 4..7 instead of masking. */
static inline __attribute__((always_inline)) void blk_q2_k(const uint8_t *b, acc32 *a, const float *x, acc32 *a2,
                                                          const float *x2, float *out) {
    const uint8_t *qs = b + 16;
    const __m256 d = _mm256_set1_ps(f16_scale(b + 80)), dmin = _mm256_set1_ps(f16_scale(b + 82));
    const __m256 q4 = _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3), neg = _mm256_set1_ps(-0.0f);
    /* all 16 scales dl = d·(sc & 15) and negated mins −(dmin·(sc >> 4)) at once */
    float dl[16], nml[16];
    const __m128i sc = _mm_loadu_si128((const __m128i *)b);
    const __m128i lo = _mm_and_si128(sc, _mm_set1_epi8(15)), hi = _mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(15));
    for (int k = 0; k < 2; k++) {
        const __m128i l8 = k ? _mm_srli_si128(lo, 8) : lo, h8 = k ? _mm_srli_si128(hi, 8) : hi;
        _mm256_storeu_ps(dl + 8 * k, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(l8))));
        _mm256_storeu_ps(nml + 8 * k, _mm256_xor_ps(_mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(h8))), neg));
    }
    for (int h = 0; h < 2; h++) {
        const uint8_t *q = qs + 32 * h; /* widened once, used by all four bit planes */
        const __m256i Q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
        const __m256i Q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));
        const __m256i Q2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16)));
        const __m256i Q3 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 24)));
        /* Unrolled so the shifts take immediates: the shift-by-register form
         * also occupies the shuffle port, which vpermps already saturates. */
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++) {
            const int j = 8 * h + 2 * s; /* sub-blocks j (elements 0-15) and j+1 (16-31) */
            const __m256 t0 = _mm256_fmadd_ps(_mm256_broadcast_ss(dl + j), q4, _mm256_broadcast_ss(nml + j));
            const __m256 t1 = _mm256_fmadd_ps(_mm256_broadcast_ss(dl + j + 1), q4, _mm256_broadcast_ss(nml + j + 1));
            put32(a, x, a2, x2, out, 128 * h + 32 * s, _mm256_permutevar8x32_ps(t0, _mm256_srli_epi32(Q0, 2 * s)),
                  _mm256_permutevar8x32_ps(t0, _mm256_srli_epi32(Q1, 2 * s)),
                  _mm256_permutevar8x32_ps(t1, _mm256_srli_epi32(Q2, 2 * s)),
                  _mm256_permutevar8x32_ps(t1, _mm256_srli_epi32(Q3, 2 * s)));
        }
    }
}

/* Q4_K, 256 elements: chunk c of 64 = low nibbles of qs[32c..] (scale 2c)
 * then high nibbles (scale 2c+1); each value one fma, dl·q − ml. */
static inline __attribute__((always_inline)) void blk_q4_k(const uint8_t *b, acc32 *a, const float *x, acc32 *a2,
                                                          const float *x2, float *out) {
    const uint8_t *scales = b + 4, *qs = b + 16;
    /* All 8 scales dl = d·sc and negated mins −(dmin·mn) at once. The 6-bit
     * fields (see the portable q4k_scale_min), four bytes per u32: j < 4 are the low 6 bits
     * of bytes 0-3 (scales) and 4-7 (mins); j >= 4 take their low nibble
     * from bytes 8-11 and their top 2 bits from bits 6-7 of bytes 0-3 / 4-7. */
    const uint32_t s0 = rd32(scales), s1 = rd32(scales + 4), s2 = rd32(scales + 8);
    const uint64_t sc = (s0 & 0x3f3f3f3fu) | (uint64_t)((s2 & 0x0f0f0f0fu) | (s0 >> 6 & 0x03030303u) << 4) << 32;
    const uint64_t mn = (s1 & 0x3f3f3f3fu) | (uint64_t)((s2 >> 4 & 0x0f0f0f0fu) | (s1 >> 6 & 0x03030303u) << 4) << 32;
    float dl[8], nml[8];
    _mm256_storeu_ps(dl, _mm256_mul_ps(_mm256_set1_ps(f16_scale(b)),
                                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc)))));
    _mm256_storeu_ps(nml, _mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(f16_scale(b + 2)),
                                                      _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                                          _mm_cvtsi64_si128((long long)mn)))),
                                        _mm256_set1_ps(-0.0f)));
    const __m256i m15 = _mm256_set1_epi32(15);
    for (int c = 0; c < 4; c++) {
        const uint8_t *q = qs + 32 * c; /* widened once, used by both nibbles */
        const __m256i Q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
        const __m256i Q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));
        const __m256i Q2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16)));
        const __m256i Q3 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 24)));
#pragma GCC unroll 2 /* immediate shifts (see Q2_K) */
        for (int h = 0; h < 2; h++) {
            const __m256 d = _mm256_broadcast_ss(dl + 2 * c + h), m = _mm256_broadcast_ss(nml + 2 * c + h);
#define Q4(Q) _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(Q, 4 * h), m15)), m)
            put32(a, x, a2, x2, out, 64 * c + 32 * h, Q4(Q0), Q4(Q1), Q4(Q2), Q4(Q3));
#undef Q4
        }
    }
}

/* IQ2_XXS, 256 elements: 8 sub-blocks of 32, each two u32 (4 grid indices;
 * 4×7 sign bits + 4-bit scale); each value db·(±m), one product. The index
 * and scale arithmetic of all 8 sub-blocks is done in vectors first (it
 * would otherwise be most of the work): table offsets in bytes (index · 32)
 * and db = d·(0.5 + ls)·0.25, evaluated in that order as in the portable
 * code. */
static inline __attribute__((always_inline)) void blk_iq2_xxs(const uint8_t *b, acc32 *a, const float *x, acc32 *a2,
                                                          const float *x2, float *out) {
    const __m256 lo = _mm256_loadu_ps((const float *)(b + 2)), hi = _mm256_loadu_ps((const float *)(b + 34));
    /* u32 pairs (A_ib, B_ib) -> A_0..A_7 and B_0..B_7: the shuffle yields
     * sub-blocks 0 1 4 5 2 3 6 7, the 64-bit permute restores the order */
    const __m256i A = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(lo, hi, 0x88)), 0xd8);
    const __m256i B = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(lo, hi, 0xdd)), 0xd8);
    _Alignas(32) float db[8];
    /* off[l][ib]: grid offset in the low 16 bits, sign offset in the high 16
     * (one load per group of 8 instead of two: loads are the bottleneck) */
    _Alignas(32) uint32_t off[4][8];
    _mm256_store_ps(db, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(f16_scale(b)),
                                                    _mm256_add_ps(_mm256_set1_ps(0.5f),
                                                                  _mm256_cvtepi32_ps(_mm256_srli_epi32(B, 28)))),
                                      _mm256_set1_ps(0.25f)));
    const __m256i gm = _mm256_set1_epi32(255 << 5), sm = _mm256_set1_epi32(127 << 21);
#define OFF(l, ga, sa) _mm256_store_si256((__m256i *)off[l], _mm256_or_si256(_mm256_and_si256(ga, gm), _mm256_and_si256(sa, sm)))
    OFF(0, _mm256_slli_epi32(A, 5), _mm256_slli_epi32(B, 21));
    OFF(1, _mm256_srli_epi32(A, 3), _mm256_slli_epi32(B, 14));
    OFF(2, _mm256_srli_epi32(A, 11), _mm256_slli_epi32(B, 7));
    OFF(3, _mm256_srli_epi32(A, 19), B);
#undef OFF
    const char *grid = (const char *)iq2_gridf, *sign = (const char *)iq2_signm;
    for (int ib = 0; ib < 8; ib++) {
        const __m256 d = _mm256_broadcast_ss(db + ib);
#define IQ(l) _mm256_mul_ps(d, _mm256_xor_ps(_mm256_load_ps((const float *)(grid + (off[l][ib] & 0xffff))), \
                                             _mm256_load_ps((const float *)(sign + (off[l][ib] >> 16)))))
        put32(a, x, a2, x2, out, 32 * ib, IQ(0), IQ(1), IQ(2), IQ(3));
#undef IQ
    }
}

static void deq_q8_0(const uint8_t *restrict b, float *restrict v) { blk_q8_0(b, NULL, NULL, NULL, NULL, v); }
static void deq_q2_k(const uint8_t *restrict b, float *restrict v) { blk_q2_k(b, NULL, NULL, NULL, NULL, v); }
static void deq_q4_k(const uint8_t *restrict b, float *restrict v) { blk_q4_k(b, NULL, NULL, NULL, NULL, v); }
static void deq_iq2_xxs(const uint8_t *restrict b, float *restrict v) { blk_iq2_xxs(b, NULL, NULL, NULL, NULL, v); }
#else
/* Portable dequantisers: the reference forms of the values above. */

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


/* Q8_0, 32 elements: x = d·q. */
static void deq_q8_0(const uint8_t *restrict b, float *restrict v) {
    const float d = f16_to_f32(rd16(b));
    const int8_t *q = (const int8_t *)(b + 2);
    for (int k = 0; k < 32; k++) v[k] = d * (float)q[k];
}

/* Q2_K, 256 elements: element 128h + 32s + 16half + k is bit plane s of
 * qs[32h + 16half + k]; sub-block (of 16) j = 8h + 2s + half has scale
 * d·(sc & 15) and min dmin·(sc >> 4); value fma(dl, q, −ml). */
static void deq_q2_k(const uint8_t *restrict b, float *restrict v) {
    const uint8_t *sc = b, *qs = b + 16;
    const float d = f16_to_f32(rd16(b + 80)), dmin = f16_to_f32(rd16(b + 82));
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int half = 0; half < 2; half++) {
                const int j = 8 * h + 2 * s + half;
                const float dl = d * (float)(sc[j] & 15), ml = dmin * (float)(sc[j] >> 4);
                const uint8_t *q = qs + 32 * h + 16 * half;
                for (int k = 0; k < 16; k++) v[16 * j + k] = fmaf(dl, (float)((q[k] >> 2 * s) & 3), -ml);
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
            for (int k = 0; k < 32; k++) v[64 * c + 32 * h + k] = fmaf(dl, (float)((qs[32 * c + k] >> 4 * h) & 15), -ml);
        }
}

/* IQ2_XXS, 256 elements: 8 sub-blocks of 32, each two u32 (grid indices;
 * 4×7 sign bits + 4-bit scale). Magnitude × sign is an exact small integer
 * in float, so each value is one rounding, db · (±m). */
static void deq_iq2_xxs(const uint8_t *restrict b, float *restrict v) {
    const float d = f16_to_f32(rd16(b));
    for (int ib = 0; ib < 8; ib++) {
        const uint32_t A = rd32(b + 2 + 8 * ib), B = rd32(b + 6 + 8 * ib);
        const float db = d * (0.5f + (float)(B >> 28)) * 0.25f;
        for (int l = 0; l < 4; l++) {
            const uint64_t g = ds4_iq2xxs_grid[(A >> 8 * l) & 255];
            const uint8_t sg = ds4_ksigns_iq2xs[(B >> 7 * l) & 127];
            for (int k = 0; k < 8; k++) {
                const float m = (float)((g >> 8 * k) & 255);
                v[32 * ib + 8 * l + k] = db * ((sg >> k) & 1 ? -m : m);
            }
        }
    }
}
#endif

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
    for (int64_t i = 0; i < n; i += be, p += bb) {
#ifdef DS4_QUANT_AVX2
        prefetch_ahead(p);
#endif
        deq_block(type, p, out + i);
    }
}

/* Fold the lanes (after adding a ragged tail of n < 32 elements to lanes
 * 0..n-1, which continues the "lane = i mod 32" rule). */
static inline __attribute__((always_inline)) float acc_finish(const acc32 *a, const float *w, const float *x, int64_t n) {
#ifdef DS4_QUANT_AVX2
    if (n == 0) { /* the same fold in registers: each step adds lane j+s into lane j */
        const __m256 b = _mm256_add_ps(_mm256_add_ps(a->a0, a->a2), _mm256_add_ps(a->a1, a->a3)); /* 16, 8 */
        const __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));      /* 4 */
        const __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));                                      /* 2 */
        return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));                                  /* 1 */
    }
#endif
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

/* ds4_dot_row after check_row (the row loops check once, not per row). */
static float dot_row(ggml_type type, const void *row, const float *x, int64_t n) {
    const uint8_t *p = row;
    if (type == GGML_F32) return ds4_dot_f32(row, x, n);
    acc32 acc;
    acc_zero(&acc);
    float v[256];
    int64_t i = 0;
#if defined(DS4_QUANT_AVX2) && defined(__F16C__)
    if (type == GGML_F16) { /* whole 32s converted in registers, then a tail */
        for (; i + 32 <= n; i += 32, p += 64) {
            prefetch_ahead(p);
            put32(&acc, x, NULL, NULL, NULL, i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
                  _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16))),
                  _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 32))),
                  _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 48))));
        }
        deq_f16(p, v, n - i);
        return acc_finish(&acc, v, x + i, n - i);
    }
#else
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
#endif
    /* One loop per format, so its block kernel is inlined and the
     * accumulator registers are not spilled around a call per block. AVX2:
     * the kernel multiplies its values straight into the lanes; portable:
     * dequantise the block, then the same fmas. */
#ifdef DS4_QUANT_AVX2
#define DOT_BLOCKS(blk, deq, be, bb)                                                  \
    for (; i < n; i += (be), p += (bb)) {                                             \
        prefetch_ahead(p);                                                            \
        blk(p, &acc, x + i, NULL, NULL, NULL);                                        \
    }
#else
#define DOT_BLOCKS(blk, deq, be, bb)                                                  \
    for (; i < n; i += (be), p += (bb)) {                                             \
        deq(p, v);                                                                    \
        for (int c = 0; c < (be); c += 32) acc_fma32(&acc, v + c, x + i + c);         \
    }
#endif
    switch (type) {
    case GGML_Q8_0: DOT_BLOCKS(blk_q8_0, deq_q8_0, 32, 34); break;
    case GGML_Q2_K: DOT_BLOCKS(blk_q2_k, deq_q2_k, 256, 84); break;
    case GGML_Q4_K: DOT_BLOCKS(blk_q4_k, deq_q4_k, 256, 144); break;
    default: DOT_BLOCKS(blk_iq2_xxs, deq_iq2_xxs, 256, 66); break; /* check_row admitted only these */
    }
#undef DOT_BLOCKS
    return acc_finish(&acc, x, x, 0);
}

float ds4_dot_row(ggml_type type, const void *row, const float *x, int64_t n) {
    check_row(type, n, "dot");
    return dot_row(type, row, x, n);
}

void ds4_matvec_rows(ggml_type type, const void *w, int64_t n_in, int64_t r0, int64_t r1,
                     const float *x, float *y) {
    check_row(type, n_in, "matvec");
    const size_t rb = (size_t)ggml_row_bytes(type, (uint64_t)n_in);
    for (int64_t r = r0; r < r1; r++) y[r] = dot_row(type, (const uint8_t *)w + (size_t)r * rb, x, n_in);
}

#ifdef DS4_QUANT_AVX2
/* ds4_dot_row for two tokens at once (a block-quantised type): each block
 * is decoded once and its values go into both tokens' lanes, each token's
 * fma sequence exactly the one ds4_dot_row runs. */
static void dot_row2(ggml_type type, const uint8_t *p, const float *x0, const float *x1, int64_t n, float *y0,
                     float *y1) {
    acc32 a, b;
    acc_zero(&a);
    acc_zero(&b);
    int64_t i = 0;
#define DOT2_BLOCKS(blk, be, bb)                                                      \
    for (; i < n; i += (be), p += (bb)) {                                             \
        prefetch_ahead(p);                                                            \
        blk(p, &a, x0 + i, &b, x1 + i, NULL);                                         \
    }
    switch (type) {
    case GGML_Q8_0: DOT2_BLOCKS(blk_q8_0, 32, 34); break;
    case GGML_Q2_K: DOT2_BLOCKS(blk_q2_k, 256, 84); break;
    case GGML_Q4_K: DOT2_BLOCKS(blk_q4_k, 256, 144); break;
    default: DOT2_BLOCKS(blk_iq2_xxs, 256, 66); break; /* the caller admits only these */
    }
#undef DOT2_BLOCKS
    *y0 = acc_finish(&a, x0, x0, 0);
    *y1 = acc_finish(&b, x1, x1, 0);
}

/* Two ordered dots sharing one weight vector: each token keeps its own
 * lane chains, exactly as ds4_dot_f32 builds them, but interleaving two
 * tokens gives the core eight independent fma chains instead of four (one
 * dot alone is bound by fma latency) and loads each weight once for both. */
static void dot2_f32(const float *w, const float *x0, const float *x1, int64_t n, float *y0, float *y1) {
    acc32 a, b;
    acc_zero(&a);
    acc_zero(&b);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc_fma32(&a, w + i, x0 + i);
        acc_fma32(&b, w + i, x1 + i);
    }
    *y0 = acc_finish(&a, w + i, x0 + i, n - i);
    *y1 = acc_finish(&b, w + i, x1 + i, n - i);
}
#endif

void ds4_matmul_rows(ggml_type type, const void *w, int64_t n_in, int64_t r0, int64_t r1,
                     const float *x, int64_t n_tok, int64_t x_stride, float *y, int64_t y_stride) {
    check_row(type, n_in, "matmul");
    const size_t rb = (size_t)ggml_row_bytes(type, (uint64_t)n_in);
    if (n_tok == 1) { /* decode: the fused dot, no dequantised copy */
        ds4_matvec_rows(type, w, n_in, r0, r1, x, y);
        return;
    }
#ifdef DS4_QUANT_AVX2
    /* Block-quantised weights: each block is decoded once per token pair,
     * straight into both tokens' lanes (no dequantised copy: decoding from
     * the compact blocks beats re-reading a float copy from L2 on the dev
     * box for any token count). Rows go MM_FUSED_ROWS at a time, so a token
     * pair's activations stay in L1 while they meet every row of the tile. */
    if (type != GGML_F32 && type != GGML_F16) {
        enum { MM_FUSED_ROWS = 16 };
        for (int64_t r = r0; r < r1; r += MM_FUSED_ROWS) {
            const int64_t re = r1 - r < MM_FUSED_ROWS ? r1 : r + MM_FUSED_ROWS;
            int64_t t = 0;
            for (; t + 2 <= n_tok; t += 2)
                for (int64_t k = r; k < re; k++)
                    dot_row2(type, (const uint8_t *)w + (size_t)k * rb, x + t * x_stride, x + (t + 1) * x_stride,
                             n_in, &y[t * y_stride + k], &y[(t + 1) * y_stride + k]);
            if (t < n_tok) /* an odd last token */
                for (int64_t k = r; k < re; k++)
                    y[t * y_stride + k] = dot_row(type, (const uint8_t *)w + (size_t)k * rb, x + t * x_stride, n_in);
        }
        return;
    }
#endif
    /* F32/F16 (and every type on the portable path): dequantise each row
     * once; ds4_dot_f32 over it runs the very fma sequence ds4_dot_row runs,
     * so prefill equals decode bit for bit. Rows go MM_ROWS at a time, so one
     * token pair's activations stay in L1 while they meet every row. */
    enum { MM_ROWS = 4 };
    float *buf = type == GGML_F32 ? NULL : malloc((size_t)n_in * MM_ROWS * sizeof *buf);
    for (int64_t r = r0; r < r1; r += MM_ROWS) {
        const int nr = r1 - r < MM_ROWS ? (int)(r1 - r) : MM_ROWS;
        const float *wr[MM_ROWS];
        for (int k = 0; k < nr; k++) {
            const void *row = (const uint8_t *)w + (size_t)(r + k) * rb;
            wr[k] = row;
            if (type == GGML_F32) continue;
            if (!buf) { /* no scratch: same results, one dequantisation per token */
                for (int64_t t = 0; t < n_tok; t++)
                    y[t * y_stride + r + k] = dot_row(type, row, x + t * x_stride, n_in);
                continue;
            }
            ds4_dequant_row(type, row, buf + k * n_in, n_in);
            wr[k] = buf + k * n_in;
        }
        if (type != GGML_F32 && !buf) continue;
        int64_t t = 0;
#ifdef DS4_QUANT_AVX2
        for (; t + 2 <= n_tok; t += 2)
            for (int k = 0; k < nr; k++)
                dot2_f32(wr[k], x + t * x_stride, x + (t + 1) * x_stride, n_in, &y[t * y_stride + r + k],
                         &y[(t + 1) * y_stride + r + k]);
#endif
        for (; t < n_tok; t++)
            for (int k = 0; k < nr; k++) y[t * y_stride + r + k] = ds4_dot_f32(wr[k], x + t * x_stride, n_in);
    }
    free(buf);
}
