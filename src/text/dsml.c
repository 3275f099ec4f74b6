/* Streaming DSML recogniser and the whole-text output parser (prompt.md §3).
 *
 * One state machine serves both: ds4_parse_output() feeds the whole text to
 * it in one chunk and collects the events, so the streaming view and the
 * final parse can never disagree (the tests check chunking invariance).
 *
 * The parser keeps every fed byte in `buf`; `pos` is the first byte not yet
 * reported. Each state reports what can no longer change and holds back only
 * what could still turn out to be syntax: a partial `</think>`, a partial
 * tool-start marker with the whitespace before it, a partial closing tag, a
 * partial `&entity;`, or a partial UTF-8 sequence.
 *
 * Tolerance (§3.4): the block may start with `<｜DSML｜tool_calls>`,
 * `<DSML｜tool_calls>` (first bar missing) or plain `<tool_calls>`; tags inside
 * a DSML block may use either DSML spelling; whitespace between tags is
 * skipped; attributes are found by searching `name="` / `string="`; a missing
 * string attribute means "true". Entities &amp; &lt; &gt; &quot; &apos; are
 * decoded in string values and attribute values. Not supported: ds4's nested
 * parameters (a parameter body made of parameters); such a body is a string.
 *
 * Arguments are reported as compact JSON: `{`, `"key":`, string values
 * escaped as they arrive, string="false" values as they validate, `}`.
 * Whatever is reported is a prefix of valid JSON (invalid UTF-8 becomes
 * U+FFFD, raw control characters are escaped).
 *
 * Failure: a structural error, or a block still open at ds4_dsml_finish(),
 * turns the block (from the whitespace before it) back into CONTENT, so
 * CONTENT always concatenates to ds4_parse_output()'s content. If no TOOL
 * event was sent for it, recognition resumes after its start marker; else
 * the rest is content, and since the sent TOOL events cannot be retracted,
 * ds4_dsml_failed() reports true and the caller should end with
 * DS4_FINISH_ERROR. */
#include "ds4.h"
#include "json_text.h"

#include <stdlib.h>
#include <string.h>

enum {
    ST_REASON,  /* inside <think>: reasoning until </think> */
    ST_SEARCH,  /* content, watching for a tool-start marker */
    ST_PLAIN,   /* content, no recognition (tools off, after a failure) */
    ST_BLOCK,   /* between invokes: expect <invoke …> or </tool_calls> */
    ST_INVOKE,  /* between parameters: expect <parameter …> or </invoke> */
    ST_STR,     /* string="true" value body */
    ST_JSON,    /* string="false" value body */
    ST_AFTER,   /* after </tool_calls>: trailing whitespace is dropped */
};

/* A tag longer than this without '>' is not DSML: fail instead of holding
 * the rest of the generation back. */
enum { MAX_TAG = 4096 };
/* Nesting bound of a string="false" value (bounded state, hostile input). */
enum { JSON_MAX_DEPTH = 128 };

/* JSON validator states for string="false" values. */
enum {
    J_VALUE,     /* a value must follow */
    J_ARR_FIRST, /* after '[': a value or ']' */
    J_OBJ_FIRST, /* after '{': a key or '}' */
    J_OBJ_KEY,   /* after ',' in an object: a key */
    J_COLON,     /* after a key */
    J_AFTER,     /* after a value inside a container: ',' or the close */
    J_DONE,      /* the top-level value is complete */
    J_STR,       /* inside a string */
    J_NUM,       /* inside a number (held until it ends) */
    J_LIT,       /* inside true/false/null (held until complete) */
};

static const char THINK_END[] = "</think>";

typedef struct { const char *s; bool xml; } marker;
static const marker MARKERS[] = {
    {"<｜DSML｜tool_calls>", false},
    {"<DSML｜tool_calls>", false},
    {"<tool_calls>", true},
};
enum { N_MARKERS = sizeof MARKERS / sizeof MARKERS[0], MAX_MARKER = sizeof "<｜DSML｜tool_calls>" - 1 };

/* Tag-name prefixes accepted inside a DSML block ("" only in XML blocks). */
static const char *const DSML_PREFIX[] = {"｜DSML｜", "DSML｜"};
enum { N_PREFIX = sizeof DSML_PREFIX / sizeof DSML_PREFIX[0] };

static const struct { const char *ent; char c; } ENTITIES[] = {
    {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''},
};

struct ds4_dsml {
    bool thinking, tools;
    ds4_event_fn fn;
    void *ud;
    ds4_sbuf buf;
    size_t pos;       /* first byte not yet reported */
    size_t scan;      /* resume point for marker searches */
    int st;
    bool xml;         /* the open block uses plain XML tag names */
    size_t ws_start;  /* start of the whitespace before the block */
    size_t raw_start, raw_end;
    size_t marker_end; /* just past the block's start marker */
    size_t held_marker; /* bytes of a partial start marker held in ST_SEARCH */
    int n_calls;      /* invokes opened so far */
    int n_params;     /* parameters in the open invoke */
    bool tool_events; /* TOOL_* events were sent for the open block */
    bool begun;       /* TOOL_BEGIN sent for an invoke tag not yet closed by '>' */
    bool done, unterminated, failed;
    /* ST_JSON: an incremental JSON validator (see step_json). */
    size_t vstart;    /* value start, for the string fallback */
    bool vemitted;    /* bytes of this value were already reported */
    int jst;          /* J_* state */
    bool jkey;        /* the open string is an object key */
    int jnum;         /* number sub-state */
    const char *jlit; /* literal being matched (true/false/null) */
    size_t jtok;      /* start of the held number/literal token */
    int jdepth;
    char jstack[JSON_MAX_DEPTH]; /* open containers: '{' or '[' */
    ds4_sbuf tmp;
};

static bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

static void emit(ds4_dsml *p, ds4_event_kind kind, const char *s, size_t n) {
    if (!n && (kind == DS4_EV_REASONING || kind == DS4_EV_CONTENT || kind == DS4_EV_TOOL_ARGS)) return;
    ds4_event ev = {kind, p->n_calls, s, n, NULL};
    p->fn(p->ud, &ev);
}

/* Report buf[pos, end) as text of the given kind. */
static void emit_upto(ds4_dsml *p, ds4_event_kind kind, size_t end) {
    if (end <= p->pos) return;
    emit(p, kind, p->buf.p + p->pos, end - p->pos);
    p->pos = end;
}

/* Back `end` (== buffer end) off an incomplete trailing UTF-8 sequence. */
static size_t utf8_safe_end(const ds4_dsml *p, size_t from, size_t end) {
    for (size_t k = 1; k <= 3 && end >= from + k; k++) {
        const unsigned char *u = (const unsigned char *)p->buf.p + end - k;
        if (*u >= 0xC0) return ds4_utf8_seq(u, k) == 0 ? end - k : end;
        if (*u < 0x80) break;
    }
    return end;
}

/* Longest proper prefix of m that ends s[0, n). */
static size_t partial_suffix(const char *s, size_t n, const char *m) {
    size_t ml = strlen(m);
    for (size_t k = ml - 1 < n ? ml - 1 : n; k > 0; k--)
        if (!memcmp(s + n - k, m, k)) return k;
    return 0;
}

/* 1: s starts with m; 0: s is a proper prefix of m (need more); -1: no. */
static int match_at(const char *s, size_t n, const char *m) {
    size_t ml = strlen(m);
    if (n >= ml) return memcmp(s, m, ml) ? -1 : 1;
    return memcmp(s, m, n) ? -1 : 0;
}

static void args(ds4_dsml *p, const char *s, size_t n) {
    p->tool_events = true;
    emit(p, DS4_EV_TOOL_ARGS, s, n);
}

/* Give up on the open block: it is content again. When no tool event was
 * sent for it (e.g. "<tool_calls>" mentioned in prose) the search goes on
 * after its start marker; otherwise the rest of the output is content. */
static void abandon(ds4_dsml *p, bool unterminated) {
    p->failed |= p->tool_events;
    p->unterminated |= unterminated;
    p->begun = false;
    if (!p->tool_events && !unterminated) {
        emit(p, DS4_EV_CONTENT, p->buf.p + p->ws_start, p->marker_end - p->ws_start);
        p->pos = p->scan = p->marker_end;
        p->st = ST_SEARCH;
        return;
    }
    p->pos = p->ws_start;
    p->st = ST_PLAIN;
}

/* Entity-decode s[0, n) into out. */
static void decode_entities(ds4_sbuf *out, const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (s[i] == '&') {
            bool hit = false;
            for (size_t e = 0; e < sizeof ENTITIES / sizeof ENTITIES[0]; e++)
                if (match_at(s + i, n - i, ENTITIES[e].ent) == 1) {
                    ds4_sbuf_putc(out, ENTITIES[e].c);
                    i += strlen(ENTITIES[e].ent);
                    hit = true;
                    break;
                }
            if (hit) continue;
        }
        ds4_sbuf_putc(out, s[i++]);
    }
}

/* Value of attr (e.g. `name="`) inside a tag, entity-decoded into out. */
static bool tag_attr(const char *tag, size_t n, const char *attr, ds4_sbuf *out) {
    size_t al = strlen(attr);
    for (size_t i = 0; i + al <= n; i++) {
        if (memcmp(tag + i, attr, al)) continue;
        const char *v = tag + i + al, *q = memchr(v, '"', n - i - al);
        if (!q) return false;
        out->n = 0;
        decode_entities(out, v, (size_t)(q - v));
        ds4_sbuf_put(out, "", 0); /* keep p non-NULL and terminated */
        return true;
    }
    return false;
}

/* Is tag[0, n) (without its '>') `<[/]PREFIX word …`? *attrs receives the
 * offset just past the word, where attributes start. */
static bool tag_is(const ds4_dsml *p, const char *tag, size_t n, bool closing, const char *word, size_t *attrs) {
    size_t i = 1;
    if (closing != (n > 1 && tag[1] == '/')) return false;
    if (closing) i++;
    if (!p->xml) {
        size_t k;
        for (k = 0; k < N_PREFIX; k++) {
            size_t pl = strlen(DSML_PREFIX[k]);
            if (n - i >= pl && !memcmp(tag + i, DSML_PREFIX[k], pl)) { i += pl; break; }
        }
        if (k == N_PREFIX) return false;
    }
    size_t wl = strlen(word);
    if (n - i < wl || memcmp(tag + i, word, wl)) return false;
    i += wl;
    if (i < n && !is_ws(tag[i])) return false;
    if (closing)
        for (size_t j = i; j < n; j++)
            if (!is_ws(tag[j])) return false;
    *attrs = i;
    return true;
}

/* Closing `</…parameter>` at s: 1 full (len in *len), 0 partial, -1 no. */
static int param_close(const ds4_dsml *p, const char *s, size_t n, size_t *len) {
    int best = -1;
    static const char *const dsml[] = {"</｜DSML｜parameter>", "</DSML｜parameter>"};
    static const char *const xml[] = {"</parameter>"};
    const char *const *c = p->xml ? xml : dsml;
    int nc = p->xml ? 1 : 2;
    for (int k = 0; k < nc; k++) {
        int m = match_at(s, n, c[k]);
        if (m == 1) { *len = strlen(c[k]); return 1; }
        if (m == 0) best = 0;
    }
    return best;
}

/* TOOL_BEGIN for the invoke whose name is in p->tmp, and its "{". */
static void begin_call(ds4_dsml *p) {
    p->tool_events = true;
    p->begun = true;
    ds4_event ev = {DS4_EV_TOOL_BEGIN, p->n_calls, NULL, 0, p->tmp.p};
    p->fn(p->ud, &ev);
    args(p, "{", 1);
}

/* One step of ST_BLOCK / ST_INVOKE: read one tag. Returns false when it
 * needs more input. */
static bool step_tag(ds4_dsml *p, bool final) {
    const char *b = p->buf.p;
    size_t len = p->buf.n;
    while (p->pos < len && is_ws(b[p->pos])) p->pos++;
    if (p->pos == len) {
        if (final) { abandon(p, true); return true; }
        return false;
    }
    if (b[p->pos] != '<') { abandon(p, false); return true; }
    const char *gt = memchr(b + p->pos, '>', len - p->pos);
    size_t at;
    if (!gt && p->st == ST_BLOCK && !p->begun && tag_is(p, b + p->pos, len - p->pos, false, "invoke", &at) &&
        tag_attr(b + p->pos + at, len - p->pos - at, "name=\"", &p->tmp)) {
        /* The name is complete: announce the call before the tag ends. */
        begin_call(p);
        return false;
    }
    if (!gt) {
        if (len - p->pos > MAX_TAG) abandon(p, false);
        else if (final) abandon(p, true);
        else return false;
        return true;
    }
    const char *tag = b + p->pos;
    size_t n = (size_t)(gt - tag);
    size_t next = p->pos + n + 1;
    if (p->st == ST_BLOCK) {
        if (tag_is(p, tag, n, false, "invoke", &at)) {
            if (!tag_attr(tag + at, n - at, "name=\"", &p->tmp)) { abandon(p, false); return true; }
            if (!p->begun) begin_call(p);
            p->begun = false;
            p->n_params = 0;
            p->st = ST_INVOKE;
        } else if (tag_is(p, tag, n, true, "tool_calls", &at)) {
            p->raw_end = next;
            p->done = true;
            p->st = ST_AFTER;
        } else {
            abandon(p, false);
            return true;
        }
    } else {
        if (tag_is(p, tag, n, false, "parameter", &at)) {
            if (!tag_attr(tag + at, n - at, "name=\"", &p->tmp)) { abandon(p, false); return true; }
            ds4_sbuf kv = {0};
            bool is_str = true;
            if (p->n_params++) ds4_sbuf_putc(&kv, ',');
            ds4_sbuf_putc(&kv, '"');
            ds4_json_escape(&kv, p->tmp.p, p->tmp.n);
            ds4_sbuf_puts(&kv, "\":");
            if (tag_attr(tag + at, n - at, "string=\"", &p->tmp)) is_str = strcmp(p->tmp.p, "false") != 0;
            if (is_str) ds4_sbuf_putc(&kv, '"');
            args(p, kv.p, kv.n);
            ds4_sbuf_free(&kv);
            p->st = is_str ? ST_STR : ST_JSON;
            p->vstart = next;
            p->vemitted = false;
            p->jst = J_VALUE;
            p->jdepth = 0;
        } else if (tag_is(p, tag, n, true, "invoke", &at)) {
            args(p, "}", 1);
            emit(p, DS4_EV_TOOL_END, NULL, 0);
            p->n_calls++;
            p->st = ST_BLOCK;
        } else {
            abandon(p, false);
            return true;
        }
    }
    p->pos = next;
    return true;
}

/* Escape buf[pos, end) as JSON string text and report it. */
static void str_flush(ds4_dsml *p, size_t end) {
    if (end <= p->pos) return;
    ds4_sbuf e = {0};
    ds4_json_escape(&e, p->buf.p + p->pos, end - p->pos);
    args(p, e.p, e.n);
    ds4_sbuf_free(&e);
    p->pos = end;
}

static bool step_str(ds4_dsml *p, bool final) {
    const char *b = p->buf.p;
    size_t len = p->buf.n;
    for (size_t i = p->pos; i < len; i++) {
        if (b[i] == '<') {
            size_t cl;
            int m = param_close(p, b + i, len - i, &cl);
            if (m == 1) {
                str_flush(p, i);
                args(p, "\"", 1);
                p->pos = i + cl;
                p->st = ST_INVOKE;
                return true;
            }
            if (m == 0) { str_flush(p, i); goto hold; }
        } else if (b[i] == '&') {
            int m = -1;
            size_t e;
            for (e = 0; e < sizeof ENTITIES / sizeof ENTITIES[0]; e++) {
                int r = match_at(b + i, len - i, ENTITIES[e].ent);
                if (r == 1) { m = 1; break; }
                if (r == 0) m = 0;
            }
            if (m == 1) {
                str_flush(p, i);
                ds4_sbuf e1 = {0};
                ds4_json_escape(&e1, &ENTITIES[e].c, 1);
                args(p, e1.p, e1.n);
                ds4_sbuf_free(&e1);
                p->pos = i + strlen(ENTITIES[e].ent);
                i = p->pos - 1;
                continue;
            }
            if (m == 0) { str_flush(p, i); goto hold; }
        }
    }
    str_flush(p, utf8_safe_end(p, p->pos, len));
hold:
    if (final) abandon(p, true);
    return final;
}

/* Number sub-states: 0 after '-', 1 after a leading 0, 2 in integer digits,
 * 3 after '.', 4 in fraction digits, 5 after e/E, 6 after the exponent sign,
 * 7 in exponent digits. A number may end in 1, 2, 4 or 7. */
static int num_next(int st, char c) {
    bool digit = c >= '0' && c <= '9';
    switch (st) {
    case 0: return c == '0' ? 1 : digit ? 2 : -1;
    case 1: return c == '.' ? 3 : c == 'e' || c == 'E' ? 5 : -1;
    case 2: return digit ? 2 : c == '.' ? 3 : c == 'e' || c == 'E' ? 5 : -1;
    case 3: case 4: return digit ? 4 : st == 4 && (c == 'e' || c == 'E') ? 5 : -1;
    case 5: return c == '+' || c == '-' ? 6 : digit ? 7 : -1;
    default: return digit ? 7 : -1;
    }
}
static bool num_final(int st) { return st == 1 || st == 2 || st == 4 || st == 7; }

static void json_value_done(ds4_dsml *p) { p->jst = p->jdepth ? J_AFTER : J_DONE; }

/* Consume one byte outside strings/tokens. Returns false when it cannot
 * continue the value. Accepted bytes go to out (whitespace is dropped, so
 * the arguments come out compact). */
static bool json_byte(ds4_dsml *p, size_t i, ds4_sbuf *out) {
    char c = p->buf.p[i];
    if (is_ws(c)) return true;
    switch (p->jst) {
    case J_OBJ_FIRST:
    case J_OBJ_KEY:
        if (c == '}' && p->jst == J_OBJ_FIRST) break;
        if (c != '"') return false;
        p->jst = J_STR;
        p->jkey = true;
        ds4_sbuf_putc(out, c);
        return true;
    case J_COLON:
        if (c != ':') return false;
        p->jst = J_VALUE;
        ds4_sbuf_putc(out, c);
        return true;
    case J_AFTER:
        if (c == ',') {
            p->jst = p->jstack[p->jdepth - 1] == '{' ? J_OBJ_KEY : J_VALUE;
            ds4_sbuf_putc(out, c);
            return true;
        }
        break;
    case J_DONE: return false;
    case J_ARR_FIRST:
        if (c == ']') break;
        p->jst = J_VALUE;
        /* fall through */
    case J_VALUE:
        if (c == '{' || c == '[') {
            if (p->jdepth == JSON_MAX_DEPTH) return false;
            p->jstack[p->jdepth++] = c;
            p->jst = c == '{' ? J_OBJ_FIRST : J_ARR_FIRST;
            ds4_sbuf_putc(out, c);
            return true;
        }
        if (c == '"') {
            p->jst = J_STR;
            p->jkey = false;
            ds4_sbuf_putc(out, c);
            return true;
        }
        p->jtok = i;
        if (c == '-' || (c >= '0' && c <= '9')) {
            p->jst = J_NUM;
            p->jnum = c == '-' ? 0 : num_next(0, c);
            return true;
        }
        p->jlit = c == 't' ? "true" : c == 'f' ? "false" : c == 'n' ? "null" : NULL;
        p->jst = J_LIT;
        return p->jlit != NULL;
    default: return false;
    }
    /* c closes a container: it must match the innermost one. */
    if (!p->jdepth || (c == '}') != (p->jstack[p->jdepth - 1] == '{') || (c != '}' && c != ']')) return false;
    p->jdepth--;
    ds4_sbuf_putc(out, c);
    json_value_done(p);
    return true;
}

/* Bytes of a string (at i, inside J_STR) that can be decided now: returns
 * the bytes consumed, 0 to wait for more input, -1 on invalid JSON. Invalid
 * UTF-8 becomes U+FFFD and raw control characters are escaped, so what is
 * reported is always valid JSON. */
static long json_str_bytes(ds4_dsml *p, size_t i, ds4_sbuf *out) {
    const unsigned char *u = (const unsigned char *)p->buf.p + i;
    size_t n = p->buf.n - i;
    if (u[0] == '"') {
        ds4_sbuf_putc(out, '"');
        if (p->jkey) p->jst = J_COLON;
        else json_value_done(p);
        return 1;
    }
    if (u[0] == '\\') {
        if (n < 2) return 0;
        if (strchr("\"\\/bfnrt", u[1]) && u[1]) { ds4_sbuf_put(out, u, 2); return 2; }
        if (u[1] != 'u') return -1;
        if (n < 6) return 0;
        for (int k = 2; k < 6; k++)
            if (!strchr("0123456789abcdefABCDEF", u[k]) || !u[k]) return -1;
        unsigned cp = (unsigned)strtoul((const char[]){(char)u[2], (char)u[3], (char)u[4], (char)u[5], 0}, NULL, 16);
        if (cp >= 0xD800 && cp < 0xDC00) {
            /* A high surrogate must be followed by a low one. */
            if (n < 12) {
                if (match_at((const char *)u + 6, n - 6, "\\u") >= 0) return 0;
            } else if (u[6] == '\\' && u[7] == 'u' && (u[8] == 'd' || u[8] == 'D') && strchr("cdefCDEF", u[9]) && u[9] &&
                       strchr("0123456789abcdefABCDEF", u[10]) && u[10] && strchr("0123456789abcdefABCDEF", u[11]) && u[11]) {
                ds4_sbuf_put(out, u, 12);
                return 12;
            }
            ds4_sbuf_puts(out, "\\ufffd");
            return 6;
        }
        if (cp >= 0xDC00 && cp < 0xE000) { ds4_sbuf_puts(out, "\\ufffd"); return 6; }
        ds4_sbuf_put(out, u, 6);
        return 6;
    }
    if (u[0] < 0x80) {
        ds4_json_escape(out, (const char *)u, 1); /* raw control characters */
        return 1;
    }
    int l = ds4_utf8_seq(u, n);
    if (l == 0) return 0;
    if (l < 0) { ds4_sbuf_puts(out, "\xEF\xBF\xBD"); return 1; }
    ds4_sbuf_put(out, u, (size_t)l);
    return l;
}

/* A string="false" value, streamed as it is validated (§3.5 JSON_PARAM):
 * structure and strings are reported byte by byte (compact: whitespace
 * outside strings dropped); numbers and literals when they end. The closing
 * tag counts only outside strings. A value whose very first token is not
 * JSON (e.g. a bare word) is reported as a JSON string instead, which is
 * decidable before anything of it was sent; invalid JSON after that is a
 * structural error. */
static bool step_json(ds4_dsml *p, bool final) {
    const char *b = p->buf.p;
    size_t len = p->buf.n, i = p->pos;
    ds4_sbuf out = {0};
    bool ok = true, closed = false;
    size_t cl = 0;
    while (i < len) {
        if (p->jst == J_STR) {
            long k = json_str_bytes(p, i, &out);
            if (k == 0) break;
            if (k < 0) { ok = false; break; }
            i += (size_t)k;
            continue;
        }
        char c = b[i];
        if (p->jst == J_LIT) {
            size_t at = i - p->jtok;
            if (c != p->jlit[at]) { ok = false; break; }
            i++;
            if (!p->jlit[at + 1]) { ds4_sbuf_puts(&out, p->jlit); json_value_done(p); }
            continue;
        }
        if (p->jst == J_NUM) {
            int nx = num_next(p->jnum, c);
            if (nx >= 0) { p->jnum = nx; i++; continue; }
            if (!num_final(p->jnum)) { ok = false; break; }
            ds4_sbuf_put(&out, b + p->jtok, i - p->jtok);
            json_value_done(p);
            /* c is looked at again in the new state */
        }
        if (c == '<') {
            int m = param_close(p, b + i, len - i, &cl);
            if (m == 0) break;
            if (m == 1) { closed = true; break; }
        }
        if (!json_byte(p, i, &out)) { ok = false; break; }
        i++;
    }
    if (closed && p->jst != J_DONE) {
        /* An empty value is an empty string; anything else unfinished is
         * invalid. */
        bool empty = p->jst == J_VALUE && !p->jdepth && !p->vemitted && !out.n;
        if (!empty) ok = false;
        else ds4_sbuf_puts(&out, "\"\"");
    }
    if (!ok) {
        ds4_sbuf_free(&out);
        if (!p->vemitted && p->jdepth == 0 && (p->jst == J_NUM || p->jst == J_LIT || p->jst == J_VALUE)) {
            /* Nothing of the value was reported: read it as a string. */
            args(p, "\"", 1);
            p->pos = p->vstart;
            p->st = ST_STR;
        } else abandon(p, false);
        return true;
    }
    if (out.n) {
        args(p, out.p, out.n);
        p->vemitted = true;
    }
    ds4_sbuf_free(&out);
    p->pos = i;
    if (closed) {
        p->pos = i + cl;
        p->st = ST_INVOKE;
        return true;
    }
    if (final) abandon(p, true);
    return final;
}

static bool step_search(ds4_dsml *p, bool final) {
    const char *b = p->buf.p;
    size_t len = p->buf.n, from = p->scan > p->pos ? p->scan : p->pos;
    size_t best = len;
    int which = -1;
    for (int m = 0; m < N_MARKERS; m++) {
        const char *hit = memmem(b + from, len - from, MARKERS[m].s, strlen(MARKERS[m].s));
        if (hit && (size_t)(hit - b) < best) { best = (size_t)(hit - b); which = m; }
    }
    p->held_marker = 0;
    if (which >= 0) {
        size_t ws = best;
        while (ws > p->pos && is_ws(b[ws - 1])) ws--;
        emit_upto(p, DS4_EV_CONTENT, ws);
        p->ws_start = ws;
        /* The "\n\n" before the marker belongs to the block (§3.1). */
        p->raw_start = best >= ws + 2 && b[best - 2] == '\n' && b[best - 1] == '\n' ? best - 2 : best;
        p->xml = MARKERS[which].xml;
        p->pos = p->marker_end = best + strlen(MARKERS[which].s);
        p->tool_events = false;
        p->st = ST_BLOCK;
        return true;
    }
    if (final) {
        emit_upto(p, DS4_EV_CONTENT, len);
        return false;
    }
    size_t hold = 0;
    for (int m = 0; m < N_MARKERS; m++) {
        size_t h = partial_suffix(b + p->pos, len - p->pos, MARKERS[m].s);
        if (h > hold) hold = h;
    }
    p->held_marker = hold;
    size_t end = len - hold;
    while (end > p->pos && is_ws(b[end - 1])) end--; /* maybe the "\n\n" of a block */
    if (end == len) end = utf8_safe_end(p, p->pos, end);
    emit_upto(p, DS4_EV_CONTENT, end);
    p->scan = len >= MAX_MARKER ? len - MAX_MARKER + 1 : 0;
    return false;
}

static bool step(ds4_dsml *p, bool final) {
    const char *b = p->buf.p;
    size_t len = p->buf.n;
    switch (p->st) {
    case ST_REASON: {
        size_t from = p->scan > p->pos ? p->scan : p->pos;
        const char *hit = memmem(b + from, len - from, THINK_END, sizeof THINK_END - 1);
        if (hit) {
            emit_upto(p, DS4_EV_REASONING, (size_t)(hit - b));
            p->pos = (size_t)(hit - b) + sizeof THINK_END - 1;
            p->st = p->tools ? ST_SEARCH : ST_PLAIN;
            return true;
        }
        size_t end = final ? len : len - partial_suffix(b + p->pos, len - p->pos, THINK_END);
        if (!final && end == len) end = utf8_safe_end(p, p->pos, end);
        emit_upto(p, DS4_EV_REASONING, end);
        p->scan = len >= sizeof THINK_END ? len - (sizeof THINK_END - 2) : 0;
        return false;
    }
    case ST_SEARCH: return step_search(p, final);
    case ST_PLAIN:
        emit_upto(p, DS4_EV_CONTENT, final ? len : utf8_safe_end(p, p->pos, len));
        return false;
    case ST_AFTER: {
        /* Whitespace after the block is dropped unless real text follows,
         * in which case it is all content. */
        size_t i = p->pos;
        while (i < len && is_ws(b[i])) i++;
        if (i < len) { p->st = ST_PLAIN; return true; }
        if (final) p->pos = len;
        return false;
    }
    case ST_BLOCK:
    case ST_INVOKE: return step_tag(p, final);
    case ST_STR: return step_str(p, final);
    case ST_JSON: return step_json(p, final);
    }
    return false;
}

ds4_dsml *ds4_dsml_new(bool thinking, bool tools, ds4_event_fn fn, void *ud) {
    ds4_dsml *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->thinking = thinking;
    p->tools = tools;
    p->fn = fn;
    p->ud = ud;
    p->st = thinking ? ST_REASON : tools ? ST_SEARCH : ST_PLAIN;
    ds4_sbuf_put(&p->buf, "", 0);
    return p;
}

void ds4_dsml_free(ds4_dsml *p) {
    if (!p) return;
    ds4_sbuf_free(&p->buf);
    ds4_sbuf_free(&p->tmp);
    free(p);
}

void ds4_dsml_feed(ds4_dsml *p, const char *text, size_t len) {
    ds4_sbuf_put(&p->buf, text, len);
    while (step(p, false)) {}
}

void ds4_dsml_finish(ds4_dsml *p) {
    while (step(p, true)) {}
}

bool ds4_dsml_structural(const ds4_dsml *p) {
    switch (p->st) {
    case ST_BLOCK:
    case ST_INVOKE: return true;
    case ST_JSON: return p->jst != J_STR;
    /* A held "<｜" or longer is a start marker in the making; a lone "<" is
     * too common in ordinary text to force greedy sampling on. */
    case ST_SEARCH: return p->held_marker >= 4;
    default: return false;
    }
}

bool ds4_dsml_calls_done(const ds4_dsml *p) { return p->done; }
bool ds4_dsml_unterminated(const ds4_dsml *p) { return p->unterminated; }
bool ds4_dsml_failed(const ds4_dsml *p) { return p->failed; }

/* ---- whole-text parse ---------------------------------------------------- */

typedef struct {
    ds4_sbuf reasoning, content;
    ds4_sbuf *args;
    char **names;
    int n, cap;
    bool oom;
} collector;

static void collect(void *ud, const ds4_event *ev) {
    collector *c = ud;
    switch (ev->kind) {
    case DS4_EV_REASONING: ds4_sbuf_put(&c->reasoning, ev->text, ev->len); break;
    case DS4_EV_CONTENT: ds4_sbuf_put(&c->content, ev->text, ev->len); break;
    case DS4_EV_TOOL_BEGIN:
        if (c->n == c->cap) {
            int cap = c->cap ? c->cap * 2 : 4;
            ds4_sbuf *a = realloc(c->args, sizeof *a * (size_t)cap);
            if (a) c->args = a;
            char **nm = realloc(c->names, sizeof *nm * (size_t)cap);
            if (nm) c->names = nm;
            if (!a || !nm) { c->oom = true; return; }
            c->cap = cap;
        }
        c->args[c->n] = (ds4_sbuf){0};
        c->names[c->n] = strdup(ev->name);
        c->n++;
        break;
    case DS4_EV_TOOL_ARGS:
        if (c->n) ds4_sbuf_put(&c->args[c->n - 1], ev->text, ev->len);
        break;
    case DS4_EV_TOOL_END: break;
    }
}

int ds4_parse_output(const char *text, size_t len, bool thinking, bool tools, ds4_parsed *out) {
    memset(out, 0, sizeof *out);
    collector c = {0};
    ds4_dsml *p = ds4_dsml_new(thinking, tools, collect, &c);
    if (!p) return -1;
    ds4_dsml_feed(p, text, len);
    ds4_dsml_finish(p);
    int rc = c.oom ? -1 : 0;
    /* Calls count only when their block closed; otherwise the block is
     * already part of the content. */
    bool keep = p->done && !c.oom;
    if (keep && c.n) out->calls = calloc((size_t)c.n, sizeof *out->calls);
    if (keep && c.n && !out->calls) rc = -1;
    for (int i = 0; i < c.n; i++) {
        if (keep && out->calls) {
            out->calls[i].name = c.names[i];
            out->calls[i].arguments = ds4_sbuf_take(&c.args[i]);
            char *raw = malloc(p->raw_end - p->raw_start + 1);
            if (raw) {
                memcpy(raw, p->buf.p + p->raw_start, p->raw_end - p->raw_start);
                raw[p->raw_end - p->raw_start] = 0;
            } else rc = -1;
            out->calls[i].raw_dsml = raw;
        } else {
            free(c.names[i]);
            ds4_sbuf_free(&c.args[i]);
        }
    }
    if (keep && out->calls) out->n_calls = c.n;
    free(c.args);
    free(c.names);
    out->reasoning = ds4_sbuf_take(&c.reasoning);
    out->content = ds4_sbuf_take(&c.content);
    ds4_dsml_free(p);
    return rc;
}

void ds4_parsed_free(ds4_parsed *p) {
    for (int i = 0; i < p->n_calls; i++) {
        free((char *)p->calls[i].id);
        free((char *)p->calls[i].name);
        free((char *)p->calls[i].arguments);
        free((char *)p->calls[i].raw_dsml);
    }
    free(p->calls);
    free(p->reasoning);
    free(p->content);
    memset(p, 0, sizeof *p);
}

/* ---- canonical rendering (JSON arguments -> DSML, official encoder) ------ */

typedef struct { ds4_sbuf out; int count; } param_writer;

/* Client text inside a canonical block (tool names, keys, values) must never
 * read as DSML structure: a "<" that starts "<｜DSML｜" or "</｜DSML｜" is
 * written as "&lt;" in text (the parser decodes it back) or "\u003c" inside
 * JSON values (still the same JSON). Otherwise a value could close its
 * parameter and inject structure, and the renderer would mark the spelling as
 * a control token. The official encoder writes such values raw; no real tool
 * argument is expected to contain the spelling. */
static void put_client(ds4_sbuf *o, const char *s, size_t n, bool json) {
    static const char tag[] = "<｜DSML｜", ctag[] = "</｜DSML｜";
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '<') continue;
        bool open = n - i >= sizeof tag - 1 && !memcmp(s + i, tag, sizeof tag - 1);
        bool close = n - i >= sizeof ctag - 1 && !memcmp(s + i, ctag, sizeof ctag - 1);
        if (!open && !close) continue;
        ds4_sbuf_put(o, s + start, i - start);
        ds4_sbuf_puts(o, json ? "\\u003c" : "&lt;");
        start = i + 1;
    }
    ds4_sbuf_put(o, s + start, n - start);
}

static void put_param(void *ud, const char *key, size_t klen, bool is_str, const char *val, size_t vlen) {
    param_writer *w = ud;
    ds4_sbuf *o = &w->out;
    if (w->count++) ds4_sbuf_putc(o, '\n'); /* parameters are joined with "\n" */
    ds4_sbuf_puts(o, "<｜DSML｜parameter name=\"");
    put_client(o, key, klen, false);
    ds4_sbuf_puts(o, is_str ? "\" string=\"true\">" : "\" string=\"false\">");
    put_client(o, val, vlen, !is_str);
    ds4_sbuf_puts(o, "</｜DSML｜parameter>");
}

char *ds4_dsml_render_calls(const ds4_tool_call *calls, int n) {
    ds4_sbuf o = {0};
    ds4_sbuf_puts(&o, "\n\n<｜DSML｜tool_calls>\n");
    for (int i = 0; i < n; i++) {
        if (i) ds4_sbuf_putc(&o, '\n');
        ds4_sbuf_puts(&o, "<｜DSML｜invoke name=\"");
        const char *name = calls[i].name ? calls[i].name : "";
        put_client(&o, name, strlen(name), false);
        ds4_sbuf_puts(&o, "\">\n");
        const char *a = calls[i].arguments && *calls[i].arguments ? calls[i].arguments : "{}";
        param_writer w = {{0}, 0};
        if (ds4_json_object_members(a, strlen(a), put_param, &w) < 0) {
            /* Not a JSON object: one string parameter with the raw text. */
            w.out.n = w.count = 0;
            put_param(&w, "arguments", 9, true, a, strlen(a));
        }
        /* A call without parameters keeps the official empty line. */
        ds4_sbuf_put(&o, w.out.p ? w.out.p : "", w.out.n);
        ds4_sbuf_free(&w.out);
        ds4_sbuf_puts(&o, "\n</｜DSML｜invoke>");
    }
    ds4_sbuf_puts(&o, "\n</｜DSML｜tool_calls>");
    return ds4_sbuf_take(&o);
}
