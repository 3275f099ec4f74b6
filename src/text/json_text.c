/* Byte buffer and the small JSON reader/printer described in json_text.h. */
#include "json_text.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ds4_sbuf_put(ds4_sbuf *b, const void *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) abort(); /* out of memory: nothing sensible to continue with */
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
void ds4_sbuf_puts(ds4_sbuf *b, const char *s) { ds4_sbuf_put(b, s, strlen(s)); }
void ds4_sbuf_putc(ds4_sbuf *b, char c) { ds4_sbuf_put(b, &c, 1); }
char *ds4_sbuf_take(ds4_sbuf *b) {
    if (!b->p) ds4_sbuf_put(b, "", 0);
    char *p = b->p;
    b->p = NULL;
    b->n = b->cap = 0;
    return p;
}
void ds4_sbuf_free(ds4_sbuf *b) {
    free(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

int ds4_utf8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    int len;
    unsigned lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c < 0x80) return 1;
    if (c < 0xC2) return -1;
    if (c < 0xE0) len = 2;
    else if (c < 0xF0) {
        len = 3;
        if (c == 0xE0) lo = 0xA0;      /* overlong */
        if (c == 0xED) hi = 0x9F;      /* surrogates */
    } else if (c < 0xF5) {
        len = 4;
        if (c == 0xF0) lo = 0x90;      /* overlong */
        if (c == 0xF4) hi = 0x8F;      /* > U+10FFFF */
    } else return -1;
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n) return 0;
        unsigned b = s[i];
        if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return -1;
    }
    return len;
}

void ds4_json_escape(ds4_sbuf *out, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, run = 0; /* run: start of bytes copied verbatim */
    while (i < n) {
        unsigned c = u[i];
        const char *esc = NULL;
        char tmp[8];
        int len = 1;
        if (c >= 0x80) {
            len = ds4_utf8_seq(u + i, n - i);
            if (len > 0) { i += len; continue; }
            esc = "\xEF\xBF\xBD"; /* U+FFFD for a byte that starts no valid sequence */
            len = 1;
        } else if (c == '"') esc = "\\\"";
        else if (c == '\\') esc = "\\\\";
        else if (c == '\n') esc = "\\n";
        else if (c == '\r') esc = "\\r";
        else if (c == '\t') esc = "\\t";
        else if (c == '\b') esc = "\\b";
        else if (c == '\f') esc = "\\f";
        else if (c < 0x20) { snprintf(tmp, sizeof tmp, "\\u%04x", c); esc = tmp; }
        if (!esc) { i++; continue; }
        ds4_sbuf_put(out, s + run, i - run);
        ds4_sbuf_puts(out, esc);
        i += len;
        run = i;
    }
    ds4_sbuf_put(out, s + run, i - run);
}

/* ---- reader ------------------------------------------------------------ */

typedef struct {
    const char *s;
    size_t n, i;
    int depth;
    ds4_json_style style;
} jr;

enum { JSON_MAX_DEPTH = 256 }; /* bounds recursion on hostile input */

static void skip_ws(jr *r) {
    while (r->i < r->n && (r->s[r->i] == ' ' || r->s[r->i] == '\t' || r->s[r->i] == '\n' || r->s[r->i] == '\r')) r->i++;
}

static int hex4(const char *s, unsigned *v) {
    *v = 0;
    for (int k = 0; k < 4; k++) {
        char c = s[k];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        *v = *v * 16 + (unsigned)d;
    }
    return 0;
}

static void put_cp(ds4_sbuf *b, unsigned cp) {
    char t[4];
    size_t n;
    if (cp < 0x80) { t[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { t[0] = (char)(0xC0 | cp >> 6); t[1] = (char)(0x80 | (cp & 63)); n = 2; }
    else if (cp < 0x10000) {
        t[0] = (char)(0xE0 | cp >> 12); t[1] = (char)(0x80 | (cp >> 6 & 63)); t[2] = (char)(0x80 | (cp & 63)); n = 3;
    } else {
        t[0] = (char)(0xF0 | cp >> 18); t[1] = (char)(0x80 | (cp >> 12 & 63));
        t[2] = (char)(0x80 | (cp >> 6 & 63)); t[3] = (char)(0x80 | (cp & 63)); n = 4;
    }
    ds4_sbuf_put(b, t, n);
}

/* Decode a JSON string at r->i (which points at the opening quote) into raw
 * UTF-8 bytes. A lone surrogate escape decodes to U+FFFD (it has no UTF-8). */
static int read_string(jr *r, ds4_sbuf *dec) {
    r->i++;
    while (r->i < r->n) {
        unsigned char c = (unsigned char)r->s[r->i];
        if (c == '"') { r->i++; return 0; }
        if (c < 0x20) return -1;
        if (c != '\\') {
            size_t st = r->i;
            while (r->i < r->n && r->s[r->i] != '"' && r->s[r->i] != '\\' && (unsigned char)r->s[r->i] >= 0x20) r->i++;
            ds4_sbuf_put(dec, r->s + st, r->i - st);
            continue;
        }
        if (r->i + 1 >= r->n) return -1;
        char e = r->s[r->i + 1];
        r->i += 2;
        switch (e) {
        case '"': ds4_sbuf_putc(dec, '"'); break;
        case '\\': ds4_sbuf_putc(dec, '\\'); break;
        case '/': ds4_sbuf_putc(dec, '/'); break;
        case 'b': ds4_sbuf_putc(dec, '\b'); break;
        case 'f': ds4_sbuf_putc(dec, '\f'); break;
        case 'n': ds4_sbuf_putc(dec, '\n'); break;
        case 'r': ds4_sbuf_putc(dec, '\r'); break;
        case 't': ds4_sbuf_putc(dec, '\t'); break;
        case 'u': {
            unsigned cp, lo;
            if (r->i + 4 > r->n || hex4(r->s + r->i, &cp)) return -1;
            r->i += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && r->i + 6 <= r->n && r->s[r->i] == '\\' && r->s[r->i + 1] == 'u' &&
                !hex4(r->s + r->i + 2, &lo) && lo >= 0xDC00 && lo < 0xE000) {
                r->i += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xD800 && cp < 0xE000) cp = 0xFFFD;
            put_cp(dec, cp);
            break;
        }
        default: return -1;
        }
    }
    return -1;
}

/* Python repr() of a double: shortest digits that round-trip, fixed notation
 * for decimal exponents -4..15, otherwise d.ddde+XX. */
static void put_py_float(ds4_sbuf *out, double v) {
    if (isinf(v)) { ds4_sbuf_puts(out, v < 0 ? "-Infinity" : "Infinity"); return; }
    char buf[40], digits[24];
    int prec;
    for (prec = 0; prec < 17; prec++) {
        snprintf(buf, sizeof buf, "%.*e", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    snprintf(buf, sizeof buf, "%.*e", prec, v);
    /* buf: [-]d[.ddd]e[+-]XX */
    const char *p = buf;
    if (*p == '-') { ds4_sbuf_putc(out, '-'); p++; }
    int nd = 0;
    for (; *p && *p != 'e'; p++)
        if (*p != '.') digits[nd++] = *p;
    int e = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    if (e >= -4 && e < 16) {
        int decpt = e + 1; /* digits before the point */
        if (decpt <= 0) {
            ds4_sbuf_puts(out, "0.");
            for (int k = 0; k < -decpt; k++) ds4_sbuf_putc(out, '0');
            ds4_sbuf_put(out, digits, (size_t)nd);
        } else if (decpt >= nd) {
            ds4_sbuf_put(out, digits, (size_t)nd);
            for (int k = nd; k < decpt; k++) ds4_sbuf_putc(out, '0');
            ds4_sbuf_puts(out, ".0");
        } else {
            ds4_sbuf_put(out, digits, (size_t)decpt);
            ds4_sbuf_putc(out, '.');
            ds4_sbuf_put(out, digits + decpt, (size_t)(nd - decpt));
        }
    } else {
        ds4_sbuf_putc(out, digits[0]);
        if (nd > 1) { ds4_sbuf_putc(out, '.'); ds4_sbuf_put(out, digits + 1, (size_t)(nd - 1)); }
        snprintf(buf, sizeof buf, "e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
        ds4_sbuf_puts(out, buf);
    }
}

static int read_number(jr *r, ds4_sbuf *out) {
    size_t st = r->i;
    bool is_float = false;
    if (r->i < r->n && r->s[r->i] == '-') r->i++;
    if (r->i >= r->n) return -1;
    if (r->s[r->i] == '0') r->i++;
    else if (r->s[r->i] >= '1' && r->s[r->i] <= '9') while (r->i < r->n && r->s[r->i] >= '0' && r->s[r->i] <= '9') r->i++;
    else return -1;
    if (r->i < r->n && r->s[r->i] == '.') {
        is_float = true;
        r->i++;
        size_t d = r->i;
        while (r->i < r->n && r->s[r->i] >= '0' && r->s[r->i] <= '9') r->i++;
        if (r->i == d) return -1;
    }
    if (r->i < r->n && (r->s[r->i] == 'e' || r->s[r->i] == 'E')) {
        is_float = true;
        r->i++;
        if (r->i < r->n && (r->s[r->i] == '+' || r->s[r->i] == '-')) r->i++;
        size_t d = r->i;
        while (r->i < r->n && r->s[r->i] >= '0' && r->s[r->i] <= '9') r->i++;
        if (r->i == d) return -1;
    }
    size_t len = r->i - st;
    if (r->style == DS4_JSON_COMPACT) { ds4_sbuf_put(out, r->s + st, len); return 0; }
    if (!is_float) {
        /* Python ints are exact: keep the digits; only "-0" reads back as 0. */
        if (len == 2 && r->s[st] == '-' && r->s[st + 1] == '0') ds4_sbuf_putc(out, '0');
        else ds4_sbuf_put(out, r->s + st, len);
        return 0;
    }
    char tmp[512];
    if (len >= sizeof tmp) {
        /* Absurdly long float literal: strtod on a heap copy. */
        char *h = malloc(len + 1);
        if (!h) return -1;
        memcpy(h, r->s + st, len);
        h[len] = 0;
        put_py_float(out, strtod(h, NULL));
        free(h);
        return 0;
    }
    memcpy(tmp, r->s + st, len);
    tmp[len] = 0;
    put_py_float(out, strtod(tmp, NULL));
    return 0;
}

static int read_value(jr *r, ds4_sbuf *out);

static int read_container(jr *r, ds4_sbuf *out, char close) {
    bool py = r->style == DS4_JSON_PYTHON;
    if (++r->depth > JSON_MAX_DEPTH) return -1;
    ds4_sbuf_putc(out, r->s[r->i++]);
    skip_ws(r);
    if (r->i < r->n && r->s[r->i] == close) { r->i++; ds4_sbuf_putc(out, close); r->depth--; return 0; }
    for (;;) {
        skip_ws(r);
        if (close == '}') {
            if (r->i >= r->n || r->s[r->i] != '"') return -1;
            ds4_sbuf key = {0};
            int rc = read_string(r, &key);
            if (!rc) {
                ds4_sbuf_putc(out, '"');
                ds4_json_escape(out, key.p ? key.p : "", key.n);
                ds4_sbuf_puts(out, py ? "\": " : "\":");
            }
            ds4_sbuf_free(&key);
            if (rc) return -1;
            skip_ws(r);
            if (r->i >= r->n || r->s[r->i] != ':') return -1;
            r->i++;
        }
        if (read_value(r, out)) return -1;
        skip_ws(r);
        if (r->i >= r->n) return -1;
        if (r->s[r->i] == ',') { r->i++; ds4_sbuf_puts(out, py ? ", " : ","); continue; }
        if (r->s[r->i] != close) return -1;
        r->i++;
        ds4_sbuf_putc(out, close);
        r->depth--;
        return 0;
    }
}

static int read_lit(jr *r, const char *lit, ds4_sbuf *out) {
    size_t l = strlen(lit);
    if (r->n - r->i < l || memcmp(r->s + r->i, lit, l)) return -1;
    r->i += l;
    ds4_sbuf_put(out, lit, l);
    return 0;
}

static int read_value(jr *r, ds4_sbuf *out) {
    skip_ws(r);
    if (r->i >= r->n) return -1;
    char c = r->s[r->i];
    if (c == '{') return read_container(r, out, '}');
    if (c == '[') return read_container(r, out, ']');
    if (c == '"') {
        ds4_sbuf dec = {0};
        int rc = read_string(r, &dec);
        if (!rc) {
            ds4_sbuf_putc(out, '"');
            ds4_json_escape(out, dec.p ? dec.p : "", dec.n);
            ds4_sbuf_putc(out, '"');
        }
        ds4_sbuf_free(&dec);
        return rc;
    }
    if (c == 't') return read_lit(r, "true", out);
    if (c == 'f') return read_lit(r, "false", out);
    if (c == 'n') return read_lit(r, "null", out);
    return read_number(r, out);
}

int ds4_json_format(const char *s, size_t n, ds4_json_style style, ds4_sbuf *out) {
    jr r = {s, n, 0, 0, style};
    if (read_value(&r, out)) return -1;
    skip_ws(&r);
    return r.i == n ? 0 : -1;
}

int ds4_json_object_members(const char *s, size_t n, ds4_json_member_fn fn, void *ud) {
    jr r = {s, n, 0, 0, DS4_JSON_PYTHON};
    int count = 0, rc = -1;
    ds4_sbuf key = {0}, val = {0};
    /* Validate first so fn never sees members of an invalid document. */
    rc = ds4_json_format(s, n, DS4_JSON_COMPACT, &val);
    ds4_sbuf_free(&val);
    if (rc) return -1;
    rc = -1;
    skip_ws(&r);
    if (r.i >= n || s[r.i] != '{') return -1;
    r.i++;
    skip_ws(&r);
    if (r.i < n && s[r.i] == '}') { r.i++; goto tail; }
    for (;;) {
        key.n = val.n = 0;
        skip_ws(&r);
        if (r.i >= n || s[r.i] != '"' || read_string(&r, &key)) goto out;
        skip_ws(&r);
        if (r.i >= n || s[r.i] != ':') goto out;
        r.i++;
        skip_ws(&r);
        bool is_str = r.i < n && s[r.i] == '"';
        if (is_str ? read_string(&r, &val) : read_value(&r, &val)) goto out;
        fn(ud, key.p ? key.p : "", key.n, is_str, val.p ? val.p : "", val.n);
        count++;
        skip_ws(&r);
        if (r.i < n && s[r.i] == ',') { r.i++; continue; }
        if (r.i < n && s[r.i] == '}') { r.i++; break; }
        goto out;
    }
tail:
    skip_ws(&r);
    if (r.i == n) rc = count;
out:
    ds4_sbuf_free(&key);
    ds4_sbuf_free(&val);
    return rc;
}
