/* libFuzzer harness for the streaming DSML parser.
 *
 * Input: byte 0 = flags (bit 0 thinking, bit 1 tools), byte 1 = chunking
 * seed, the rest = generated text. The text is fed in pseudo-random chunks
 * (1..16 bytes) and the invariants below must hold; any violation aborts.
 * tests/test_dsml.c also includes this file and runs dsml_check() on random
 * inputs, so the invariants are exercised on every test run.
 *
 * Invariants:
 *  - the streamed reasoning/content/calls equal ds4_parse_output() (which
 *    sees the text in one chunk): chunking never changes the result;
 *  - every byte is accounted for: reasoning is the text before the first
 *    </think> (all of it if none); after it the text is content, except, when
 *    a block closed, the block's raw bytes, the whitespace before it, and a
 *    whitespace-only tail;
 *  - when calls_done, every call's arguments are a valid JSON object. */
#include "ds4.h"

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *reasoning, *content;
    size_t nr, nc;
    char *args[64];
    size_t na[64];
    int n_calls;
    int open;        /* index of the open call, -1 outside */
    int order_bad;   /* events out of order */
} dsml_stream;

static void dsml_cat(char **s, size_t *n, const char *t, size_t l) {
    char *p = realloc(*s, *n + l + 1);
    if (!p) abort();
    memcpy(p + *n, t, l);
    *n += l;
    p[*n] = 0;
    *s = p;
}

static void dsml_on_event(void *ud, const ds4_event *ev) {
    dsml_stream *s = ud;
    switch (ev->kind) {
    case DS4_EV_REASONING: dsml_cat(&s->reasoning, &s->nr, ev->text, ev->len); break;
    case DS4_EV_CONTENT: dsml_cat(&s->content, &s->nc, ev->text, ev->len); break;
    case DS4_EV_TOOL_BEGIN:
        if (s->open != -1 || ev->index != s->n_calls || !ev->name) s->order_bad = 1;
        if (s->n_calls < 64) s->args[s->n_calls] = NULL, s->na[s->n_calls] = 0;
        s->open = ev->index;
        s->n_calls++;
        break;
    case DS4_EV_TOOL_ARGS:
        if (s->open != ev->index) s->order_bad = 1;
        else if (s->open < 64) dsml_cat(&s->args[s->open], &s->na[s->open], ev->text, ev->len);
        break;
    case DS4_EV_TOOL_END:
        if (s->open != ev->index) s->order_bad = 1;
        s->open = -1;
        break;
    }
}

static int dsml_is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

static int dsml_eq(const char *a, size_t na, const char *b, size_t nb) { return na == nb && (!na || !memcmp(a, b, na)); }

/* Returns NULL when every invariant holds, else what failed. */
static const char *dsml_check(const uint8_t *data, size_t size) {
    if (size < 2) return NULL;
    bool thinking = data[0] & 1, tools = data[0] & 2;
    uint32_t rng = data[1] * 2654435761u + 1;
    const char *text = (const char *)data + 2;
    size_t len = size - 2;
    const char *why = NULL;

    dsml_stream s = {0};
    s.open = -1;
    ds4_dsml *p = ds4_dsml_new(thinking, tools, dsml_on_event, &s);
    for (size_t at = 0; at < len;) {
        rng = rng * 1103515245u + 12345u;
        size_t n = 1 + (rng >> 16) % 16;
        if (n > len - at) n = len - at;
        ds4_dsml_feed(p, text + at, n);
        at += n;
    }
    ds4_dsml_finish(p);
    bool done = ds4_dsml_calls_done(p), failed = ds4_dsml_failed(p);

    ds4_parsed r;
    if (ds4_parse_output(text, len, thinking, tools, &r)) { why = "parse_output failed"; goto out; }
    if (s.order_bad) { why = "tool events out of order"; goto out; }
    /* ds4_parsed strings end at a NUL byte: compare only NUL-free text. */
    if (memchr(text, 0, len)) goto out;
    if (!dsml_eq(s.reasoning, s.nr, r.reasoning, strlen(r.reasoning))) { why = "streamed reasoning != parse"; goto out; }
    if (!dsml_eq(s.content, s.nc, r.content, strlen(r.content))) { why = "streamed content != parse"; goto out; }
    if (done && !failed && r.n_calls != s.n_calls) { why = "call count differs"; goto out; }
    for (int i = 0; done && i < r.n_calls && i < 64; i++) {
        cJSON *j = cJSON_Parse(r.calls[i].arguments);
        bool ok = j && cJSON_IsObject(j);
        cJSON_Delete(j);
        if (!ok) { why = "arguments are not a JSON object"; goto out; }
        if (!dsml_eq(s.args[i], s.na[i], r.calls[i].arguments, strlen(r.calls[i].arguments))) {
            why = "streamed arguments != parse";
            goto out;
        }
    }

    /* Byte accounting. */
    size_t rs = 0, after = 0;
    if (thinking) {
        const char *e = memmem(text, len, "</think>", 8);
        rs = e ? (size_t)(e - text) : len;
        after = e ? rs + 8 : len;
    }
    if (!dsml_eq(r.reasoning, strlen(r.reasoning), text, rs)) { why = "reasoning is not the text before </think>"; goto out; }
    const char *R = text + after;
    size_t nR = len - after, nc = strlen(r.content);
    if (!done) {
        if (!dsml_eq(r.content, nc, R, nR)) why = "content is not the text after reasoning";
        goto out;
    }
    if (r.n_calls) { /* (a block without invokes has no raw bytes to check) */
        const char *raw = r.calls[0].raw_dsml;
        const char *b = memmem(R, nR, raw, strlen(raw));
        if (!b) { why = "raw block not in text"; goto out; }
        size_t pre = (size_t)(b - R);
        while (pre > 0 && dsml_is_ws(R[pre - 1])) pre--;
        const char *tail = b + strlen(raw);
        size_t nt = nR - (size_t)(tail - R), k = 0;
        while (k < nt && dsml_is_ws(tail[k])) k++;
        if (nc < pre || memcmp(r.content, R, pre)) { why = "content before block"; goto out; }
        if (k == nt ? nc != pre : !dsml_eq(r.content + pre, nc - pre, tail, nt)) why = "content after block";
    }
out:
    for (int i = 0; i < s.n_calls && i < 64; i++) free(s.args[i]);
    free(s.reasoning);
    free(s.content);
    ds4_parsed_free(&r); /* zeroed by ds4_parse_output even when it fails */
    ds4_dsml_free(p);
    return why;
}

#ifndef DSML_CHECK_ONLY
#include <stdio.h>
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *why = dsml_check(data, size);
    if (why) {
        fprintf(stderr, "dsml invariant violated: %s\n", why);
        abort();
    }
    return 0;
}
#endif
