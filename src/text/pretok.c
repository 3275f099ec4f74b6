/* The DeepSeek pre-tokenizer (prompt.md §1.3): three regex Splits with
 * behaviour Isolated, each applied to every piece the previous one produced.
 * The regexes are matched by hand: stage 1 and 2 are single character-class
 * runs; stage 3 tries the six alternatives of the main expression in order at
 * each position (leftmost-first, as Oniguruma does). Where an alternative
 * matches nothing at a position, the character joins the current gap, and
 * gaps are kept as pieces (Isolated keeps both matches and gaps).
 *
 * Characters are decoded on the fly, so no buffer proportional to the input
 * is ever allocated. Categories come from utf8proc, cached in a table for
 * planes 0 and 1 (which hold nearly all text and emoji). */
#include "text/pretok.h"

#include <pthread.h>
#include <string.h>
#include <utf8proc.h>

/* The Unicode White_Space property (what \s means here, prompt.md §1.3). */
static int is_white_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
           cp == 0x205F || cp == 0x3000;
}

static uint16_t compute_class(uint32_t cp) {
    uint16_t c = 0;
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO:
        c |= TC_L; break;
    case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
        c |= TC_M; break;
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO:
        c |= TC_N; break;
    case UTF8PROC_CATEGORY_PC: case UTF8PROC_CATEGORY_PD: case UTF8PROC_CATEGORY_PS:
    case UTF8PROC_CATEGORY_PE: case UTF8PROC_CATEGORY_PI: case UTF8PROC_CATEGORY_PF:
    case UTF8PROC_CATEGORY_PO:
        c |= TC_P; break;
    case UTF8PROC_CATEGORY_SM: case UTF8PROC_CATEGORY_SC: case UTF8PROC_CATEGORY_SK:
    case UTF8PROC_CATEGORY_SO:
        c |= TC_S; break;
    default: break;
    }
    if (is_white_space(cp)) c |= TC_WS;
    if ((cp >= 0x4E00 && cp <= 0x9FA5) || (cp >= 0x3040 && cp <= 0x30FF)) c |= TC_CJK;
    if (cp == '\r' || cp == '\n') c |= TC_CRLF;
    if (cp == ' ') c |= TC_SPACE;
    if (cp && cp < 0x80 && strchr("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", (int)cp)) c |= TC_APUNCT;
    if ((cp >= 'A' && cp <= 'Z') || (cp >= 'a' && cp <= 'z')) c |= TC_ALPHA;
    return c;
}

/* Planes 0-1 cached (256 KiB, filled once per process in a few ms): a
 * table load per character instead of utf8proc's lookup plus the checks
 * above. Other planes are computed per character (rare in text). */
#define CLASS_TABLE_N 0x20000u
static uint16_t class_table[CLASS_TABLE_N];
static pthread_once_t class_once = PTHREAD_ONCE_INIT;
static void class_init(void) {
    for (uint32_t cp = 0; cp < CLASS_TABLE_N; cp++) class_table[cp] = compute_class(cp);
}

uint16_t tok_char_class(uint32_t cp) {
    pthread_once(&class_once, class_init);
    return cp < CLASS_TABLE_N ? class_table[cp] : compute_class(cp);
}

/* Inline here: the pre-tokenizer decodes every non-ASCII char through it. */
static inline int utf8_seq(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t b = s[0];
    int len;
    uint32_t c, min;
    if (b < 0x80) { *cp = b; return 1; }
    if (b >= 0xC2 && b <= 0xDF) { len = 2; c = b & 0x1F; min = 0x80; }
    else if (b >= 0xE0 && b <= 0xEF) { len = 3; c = b & 0x0F; min = 0x800; }
    else if (b >= 0xF0 && b <= 0xF4) { len = 4; c = b & 0x07; min = 0x10000; }
    else return 0; /* continuation byte, C0/C1 overlong lead, or F5..FF */
    for (int i = 1; i < len; i++) {
        /* Truncated: every byte so far passed the checks below, so what
         * we have is a valid prefix. */
        if ((size_t)i >= n) return -i;
        if ((s[i] & 0xC0) != 0x80) return 0;
        c = (c << 6) | (s[i] & 0x3F);
        /* Reject overlongs / surrogates / > U+10FFFF as soon as the second
         * byte decides them, so a prefix is only "incomplete" when valid. */
        if (i == 1) {
            uint32_t hi = c << (6 * (len - 2)); /* smallest value with this prefix */
            uint32_t top = hi | ((1u << (6 * (len - 2))) - 1);
            if (top < min || hi > 0x10FFFF || (len == 3 && hi >= 0xD800 && hi <= 0xDFFF)) return 0;
        }
    }
    *cp = c;
    return len;
}

int tok_utf8_seq(const uint8_t *s, size_t n, uint32_t *cp) { return utf8_seq(s, n, cp); }

/* One character at s[i] (i < e): returns the index after it, sets its class.
 * The class table is ready (tok_pretokenize initialises it once per call). */
static inline size_t next_char(const uint8_t *s, size_t i, size_t e, uint16_t *cls) {
    if (s[i] < 0x80) {
        *cls = class_table[s[i]];
        return i + 1;
    }
    uint32_t cp;
    int n = utf8_seq(s + i, e - i, &cp);
    if (n <= 0) { *cls = 0; return i + 1; } /* invalid byte: a classless char */
    *cls = cp < CLASS_TABLE_N ? class_table[cp] : compute_class(cp);
    return i + (size_t)n;
}

typedef struct {
    const uint8_t *s;
    tok_piece_fn fn;
    void *ud;
} ctx;

/* Longest run of characters with any of the class bits in mask starting at
 * i; returns its end. */
static size_t run_of(const uint8_t *s, size_t i, size_t e, uint16_t mask) {
    while (i < e) {
        uint16_t c;
        size_t j = next_char(s, i, e, &c);
        if (!(c & mask)) break;
        i = j;
    }
    return i;
}

/* Stage 3 at position p (< e): the end of the main expression's match, or p
 * when no alternative matches here. */
static size_t main_match(const uint8_t *s, size_t p, size_t e) {
    uint16_t c0, c1 = 0;
    size_t j = next_char(s, p, e, &c0);
    if (j < e) next_char(s, j, e, &c1);

    /* 1. [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+
     *    one ASCII punctuation char glued to an ASCII letter run. */
    if ((c0 & TC_APUNCT) && (c1 & TC_ALPHA)) return run_of(s, j, e, TC_ALPHA);

    /* 2. [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
     *    With the optional char taken when it qualifies and a letter/mark
     *    follows; otherwise (backtracking) without it. */
    if (!(c0 & (TC_CRLF | TC_L | TC_P | TC_S)) && (c1 & (TC_L | TC_M))) return run_of(s, j, e, TC_L | TC_M);
    if (c0 & (TC_L | TC_M)) return run_of(s, p, e, TC_L | TC_M);

    /* 3. " ?[\p{P}\p{S}]+[\r\n]*"
     *    An optional space, a punctuation/symbol run, trailing CR/LF. */
    if ((c0 & TC_SPACE) && (c1 & (TC_P | TC_S))) return run_of(s, run_of(s, j, e, TC_P | TC_S), e, TC_CRLF);
    if (c0 & (TC_P | TC_S)) return run_of(s, run_of(s, p, e, TC_P | TC_S), e, TC_CRLF);

    if (!(c0 & TC_WS)) return p;
    /* The whitespace run [p, q), its last character's start, and the end of
     * its last CR/LF. */
    size_t q = p, last = p, crlf_end = 0;
    while (q < e) {
        uint16_t c;
        size_t k = next_char(s, q, e, &c);
        if (!(c & TC_WS)) break;
        if (c & TC_CRLF) crlf_end = k;
        last = q;
        q = k;
    }
    /* 4. \s*[\r\n]+
     *    \s* backtracks to the last CR/LF of the run; [\r\n]+ ends after it
     *    (no CR/LF follows inside the run). */
    if (crlf_end) return crlf_end;
    /* 5. \s+(?!\S)
     *    The whole run at the end of the piece; otherwise the run minus its
     *    last char (which then precedes a whitespace char, satisfying the
     *    look-ahead), so the last space joins the next word. */
    if (q == e) return q;
    if (last > p) return last;
    /* 6. \s+  a single whitespace char before a non-space. */
    return q;
}

/* Stage 3: main expression matches and gaps. */
static void stage3(ctx *x, size_t b, size_t e) {
    size_t gap = b, p = b;
    while (p < e) {
        size_t m = main_match(x->s, p, e);
        if (m == p) { /* no match: the char joins the gap */
            uint16_t c;
            p = next_char(x->s, p, e, &c);
            continue;
        }
        if (gap < p) x->fn(x->ud, (const char *)x->s + gap, p - gap);
        x->fn(x->ud, (const char *)x->s + p, m - p);
        p = gap = m;
    }
    if (gap < e) x->fn(x->ud, (const char *)x->s + gap, e - gap);
}

/* Stage 2: [一-龥぀-ゟ゠-ヿ]+ runs and gaps, each passed on to stage 3. */
static void stage2(ctx *x, size_t b, size_t e) {
    size_t gap = b, p = b;
    while (p < e) {
        uint16_t c;
        size_t j = next_char(x->s, p, e, &c);
        if (!(c & TC_CJK)) { p = j; continue; }
        size_t m = run_of(x->s, j, e, TC_CJK);
        if (gap < p) stage3(x, gap, p);
        stage3(x, p, m);
        p = gap = m;
    }
    if (gap < e) stage3(x, gap, e);
}

/* Stage 1: \p{N}{1,3} groups (counted from the left) and gaps. */
void tok_pretokenize(const char *text, size_t len, tok_piece_fn fn, void *ud) {
    pthread_once(&class_once, class_init);
    ctx x = {(const uint8_t *)text, fn, ud};
    size_t gap = 0, p = 0;
    while (p < len) {
        uint16_t c;
        size_t j = next_char(x.s, p, len, &c);
        if (!(c & TC_N)) { p = j; continue; }
        size_t m = j;
        for (int k = 1; k < 3 && m < len; k++) {
            size_t n = next_char(x.s, m, len, &c);
            if (!(c & TC_N)) break;
            m = n;
        }
        if (gap < p) stage2(&x, gap, p);
        stage2(&x, p, m);
        p = gap = m;
    }
    if (gap < len) stage2(&x, gap, len);
}
