/* Private helpers shared by chat.c and dsml.c: a growable byte buffer and a
 * small JSON reader/printer.
 *
 * Why not cJSON for printing: the official V4 encoder serializes with Python
 * json.dumps(ensure_ascii=False) — ", " / ": " separators, integers exactly as
 * written, floats in Python repr form ("1.0", "1e-05") — and cJSON keeps only
 * a double, which loses the int/float distinction. This reader keeps number
 * lexemes, so both the Python style and the compact style are exact. */
#ifndef DS4_JSON_TEXT_H
#define DS4_JSON_TEXT_H
#include <stdbool.h>
#include <stddef.h>

typedef struct { char *p; size_t n, cap; } ds4_sbuf;

void ds4_sbuf_put(ds4_sbuf *b, const void *s, size_t n);
void ds4_sbuf_puts(ds4_sbuf *b, const char *s);
void ds4_sbuf_putc(ds4_sbuf *b, char c);
/* NUL-terminates and hands the bytes over (never NULL). */
char *ds4_sbuf_take(ds4_sbuf *b);
void ds4_sbuf_free(ds4_sbuf *b);

/* Length of a complete, valid UTF-8 sequence at s (1..4), 0 if the bytes are
 * a valid but incomplete prefix that runs into the end, -1 if invalid. */
int ds4_utf8_seq(const unsigned char *s, size_t n);

/* JSON string body (no quotes) of raw bytes, escaped like Python json.dumps
 * with ensure_ascii=False; invalid UTF-8 bytes become U+FFFD. */
void ds4_json_escape(ds4_sbuf *out, const char *s, size_t n);

typedef enum { DS4_JSON_COMPACT, DS4_JSON_PYTHON } ds4_json_style;

/* Validate one JSON value (surrounding whitespace allowed) and print it in the
 * given style. Returns 0, or -1 on invalid JSON (out may hold a partial
 * print; callers truncate it). */
int ds4_json_format(const char *s, size_t n, ds4_json_style style, ds4_sbuf *out);

/* Walk the members of a JSON object in order. For each member: key decoded,
 * and either the decoded string value (is_str) or the value printed in
 * Python style. Returns the member count, or -1 when s is not a JSON object. */
typedef void (*ds4_json_member_fn)(void *ud, const char *key, size_t klen, bool is_str,
                                   const char *val, size_t vlen);
int ds4_json_object_members(const char *s, size_t n, ds4_json_member_fn fn, void *ud);
#endif
