/* Private to src/text: Unicode character classes, UTF-8 helpers and the
 * DeepSeek three-stage pre-tokenizer (prompt.md §1.3). Tests include it to
 * check pre-tokenizer pieces directly. */
#ifndef DS4_TEXT_PRETOK_H
#define DS4_TEXT_PRETOK_H
#include <stddef.h>
#include <stdint.h>

/* Class bits of one character. L/M/N/P/S are Unicode general-category groups
 * (from utf8proc); WS is the Unicode White_Space list; the rest are the
 * literal sets the regexes name. An invalid UTF-8 byte is a one-byte
 * character with no class bits. */
enum {
    TC_L = 1 << 0, TC_M = 1 << 1, TC_N = 1 << 2, TC_P = 1 << 3, TC_S = 1 << 4,
    TC_WS = 1 << 5,
    TC_CJK = 1 << 6,     /* [一-龥぀-ゟ゠-ヿ]: U+4E00..U+9FA5, U+3040..U+30FF */
    TC_CRLF = 1 << 7,    /* \r or \n */
    TC_SPACE = 1 << 8,   /* U+0020 only */
    TC_APUNCT = 1 << 9,  /* ASCII punctuation [!"#$%&'()*+,\-./:;<=>?@[\\\]^_`{|}~] */
    TC_ALPHA = 1 << 10,  /* [A-Za-z] */
};

/* Class bits of code point cp. */
uint16_t tok_char_class(uint32_t cp);

/* Length of the valid UTF-8 sequence at s[0..n) (1..4), 0 if s[0] starts no
 * valid sequence, or -k if the k = n bytes present are a valid but
 * incomplete prefix (more bytes could complete it). Rejects overlongs,
 * surrogates and code points above U+10FFFF. */
int tok_utf8_seq(const uint8_t *s, size_t n, uint32_t *cp);

/* Splits text into pre-tokenizer pieces, calling fn for each non-empty piece
 * in order; the pieces concatenate to exactly the input. */
typedef void (*tok_piece_fn)(void *ud, const char *piece, size_t len);
void tok_pretokenize(const char *text, size_t len, tok_piece_fn fn, void *ud);

#endif
