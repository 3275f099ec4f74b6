/* HTTP plumbing on libmicrohttpd: one thread per connection, request bodies
 * collected up to a bound, routing, API key and CORS, JSON replies, and the
 * SSE channel between the worker and a connection thread. */
#include "server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <utf8proc.h>

/* ---- SSE channel ---------------------------------------------------- */

struct sse {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char *buf; size_t len, cap, off;   /* pending bytes: buf[off, len) */
    bool closed, gone, failed;
    int refs, keepalive_s;
};

sse *sse_new(int keepalive_s) {
    sse *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->refs = 1;
    s->keepalive_s = keepalive_s;
    return s;
}

void sse_write(sse *s, const char *data, size_t n) {
    pthread_mutex_lock(&s->mu);
    if (!s->gone && !s->failed) {
        if (s->off && s->off == s->len) s->off = s->len = 0;
        if (s->len + n > s->cap) {
            size_t cap = s->cap ? s->cap : 4096;
            while (cap < s->len + n) cap *= 2;
            char *p = realloc(s->buf, cap);
            if (p) { s->buf = p; s->cap = cap; } else s->failed = true;
        }
        if (!s->failed) { memcpy(s->buf + s->len, data, n); s->len += n; }
    }
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

void sse_json(sse *s, const char *event, cJSON *data) {
    char *js = cJSON_PrintUnformatted(data);
    cJSON_Delete(data);
    if (!js) return;
    size_t n = strlen(js) + (event ? strlen(event) : 0) + 32;
    char *msg = malloc(n);
    if (msg) {
        int k = event ? snprintf(msg, n, "event: %s\ndata: %s\n\n", event, js)
                      : snprintf(msg, n, "data: %s\n\n", js);
        sse_write(s, msg, (size_t)k);
        free(msg);
    }
    free(js);
}

void sse_close(sse *s) {
    pthread_mutex_lock(&s->mu);
    s->closed = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

bool sse_gone(sse *s) {
    pthread_mutex_lock(&s->mu);
    bool g = s->gone;
    pthread_mutex_unlock(&s->mu);
    return g;
}

void sse_unref(sse *s) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    bool last = --s->refs == 0;
    pthread_mutex_unlock(&s->mu);
    if (!last) return;
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s->buf);
    free(s);
}

/* MHD pulls the stream here (connection thread). Waits for data at most
 * keepalive_s, then sends a comment line so proxies and clients see the
 * connection alive during a long prefill; the wait must stay below the MHD
 * connection timeout, which counts the time spent in this callback. */
static ssize_t sse_reader(void *cls, uint64_t pos, char *out, size_t max) {
    sse *s = cls;
    pthread_mutex_lock(&s->mu);
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += s->keepalive_s;
    while (s->off == s->len && !s->closed && !s->failed) {
        if (pthread_cond_timedwait(&s->cv, &s->mu, &dl) == ETIMEDOUT) break;
    }
    ssize_t n;
    if (s->off < s->len) {
        size_t k = s->len - s->off < max ? s->len - s->off : max;
        memcpy(out, s->buf + s->off, k);
        s->off += k;
        n = (ssize_t)k;
    } else if (s->closed || s->failed) {
        n = MHD_CONTENT_READER_END_OF_STREAM;
    } else {
        static const char ka[] = ": keepalive\n\n";
        n = sizeof ka - 1 < max ? (ssize_t)(sizeof ka - 1) : 0;
        memcpy(out, ka, (size_t)n);
    }
    pthread_mutex_unlock(&s->mu);
    return n;
}

/* Streams whose response MHD still holds (drained before shutdown). */
static atomic_int g_open_streams;

/* The response is gone (stream finished or client disconnected). */
static void sse_reader_free(void *cls) {
    sse *s = cls;
    atomic_fetch_sub(&g_open_streams, 1);
    pthread_mutex_lock(&s->mu);
    s->gone = true;
    pthread_mutex_unlock(&s->mu);
    sse_unref(s);
}

/* ---- replies --------------------------------------------------------- */

static bool g_cors;

static void add_common_headers(struct MHD_Response *r) {
    if (g_cors) {
        MHD_add_response_header(r, "Access-Control-Allow-Origin", "*");
        MHD_add_response_header(r, "Access-Control-Allow-Headers", "*");
        MHD_add_response_header(r, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
    }
}

enum MHD_Result send_sse(struct MHD_Connection *conn, sse *s) {
    pthread_mutex_lock(&s->mu);
    s->refs++;
    pthread_mutex_unlock(&s->mu);
    atomic_fetch_add(&g_open_streams, 1);
    struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, sse_reader, s, sse_reader_free);
    if (!r) { sse_reader_free(s); return MHD_NO; }
    MHD_add_response_header(r, "Content-Type", "text/event-stream");
    MHD_add_response_header(r, "Cache-Control", "no-cache");
    add_common_headers(r);
    enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_text(struct MHD_Connection *conn, unsigned status, const char *type, char *text) {
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
    if (!r) { free(text); return MHD_NO; }
    MHD_add_response_header(r, "Content-Type", type);
    add_common_headers(r);
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

enum MHD_Result send_json(struct MHD_Connection *conn, unsigned status, cJSON *body) {
    char *js = cJSON_PrintUnformatted(body);
    cJSON_Delete(body);
    if (!js) return MHD_NO;
    return send_text(conn, status, "application/json", js);
}

/* msg as valid UTF-8 in out (cap >= 4): each invalid byte becomes U+FFFD.
 * Messages quote client text cut to a length ("%.40s"), which can split a
 * character, and header values, which are not checked; cJSON prints bytes
 * as they are, and a client's JSON parser would refuse the whole body. */
static const char *utf8_clean(const char *msg, char *out, size_t cap) {
    size_t o = 0, n = strlen(msg);
    for (size_t i = 0; i < n;) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)msg + i, (utf8proc_ssize_t)(n - i), &cp);
        const char *src = k > 0 ? msg + i : "\xEF\xBF\xBD";
        size_t len = k > 0 ? (size_t)k : 3;
        if (o + len >= cap) break;
        memcpy(out + o, src, len);
        o += len;
        i += k > 0 ? (size_t)k : 1;
    }
    out[o] = 0;
    return out;
}

enum MHD_Result send_error(struct MHD_Connection *conn, proto_kind pk, unsigned status,
                           const char *type, const char *code, const char *msg) {
    char clean[1024];
    msg = utf8_clean(msg, clean, sizeof clean);
    cJSON *root = cJSON_CreateObject(), *e = cJSON_CreateObject();
    if (pk == PROTO_ANTHROPIC) {
        cJSON_AddStringToObject(root, "type", "error");
        cJSON_AddStringToObject(e, "type", type);
        cJSON_AddStringToObject(e, "message", msg);
    } else {
        cJSON_AddStringToObject(e, "message", msg);
        cJSON_AddStringToObject(e, "type", type);
        cJSON_AddNullToObject(e, "param");
        if (code) cJSON_AddStringToObject(e, "code", code); else cJSON_AddNullToObject(e, "code");
    }
    cJSON_AddItemToObject(root, "error", e);
    return send_json(conn, status, root);
}

/* ---- requests -------------------------------------------------------- */

/* Deepest nesting we accept. cJSON itself stops at 1000 levels, recursing
 * on the stack; real API requests nest a few dozen levels at most. */
#define MAX_JSON_DEPTH 128

typedef struct {
    char *body; size_t len, cap;
    bool too_big;
} req_ctx;

/* A JSON string escape \u0000: cJSON keeps strings NUL-terminated, so such a
 * string would silently lose everything after the NUL. Refused instead. An
 * escape is real when an odd number of backslashes precedes the 'u'. */
static bool json_has_nul_escape(const char *s, size_t n) {
    for (size_t i = 0; i + 6 <= n; i++) {
        if (s[i] != '\\' || memcmp(s + i + 1, "u0000", 5)) continue;
        size_t k = 0;
        while (k < i && s[i - 1 - k] == '\\') k++;
        if (k % 2 == 0) return true;   /* s[i] itself starts the escape */
    }
    return false;
}

/* The offset of the first byte where the body stops being UTF-8 text (an
 * invalid or overlong sequence, a surrogate, or a NUL byte, which would cut
 * a cJSON string short like the escape above), or n. Everything the server
 * echoes (model names, error messages) comes from the body and must stay
 * valid UTF-8 in the reply. */
static size_t utf8_bad_at(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned char b = (unsigned char)s[i];
        if (b && b < 0x80) { i++; continue; }  /* ASCII, the common case */
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0 || cp == 0) return i;
        i += (size_t)k;
    }
    return n;
}

static bool json_too_deep(const char *s, size_t n) {
    int depth = 0;
    bool in_str = false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (in_str) {
            if (c == '\\') i++;
            else if (c == '"') in_str = false;
        } else if (c == '"') in_str = true;
        else if (c == '[' || c == '{') { if (++depth > MAX_JSON_DEPTH) return true; }
        else if (c == ']' || c == '}') depth--;
    }
    return false;
}

static bool authorized(srv *S, struct MHD_Connection *conn) {
    const char *key = S->cfg.api_key;
    if (!key) return true;
    const char *x = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "x-api-key");
    if (x && strcmp(x, key) == 0) return true;
    const char *a = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    return a && strncasecmp(a, "Bearer ", 7) == 0 && strcmp(a + 7, key) == 0;
}

static proto_kind proto_of(const char *path) {
    return strcmp(path, "/messages") == 0 || strncmp(path, "/messages/", 10) == 0 ? PROTO_ANTHROPIC : PROTO_OPENAI;
}

static enum MHD_Result route(srv *S, struct MHD_Connection *conn, const char *method, const char *url, req_ctx *rc) {
    if (strcmp(method, "OPTIONS") == 0) {
        /* CORS preflight (browsers); harmless without --cors. */
        return send_text(conn, MHD_HTTP_NO_CONTENT, "text/plain", strdup(""));
    }
    if (strcmp(url, "/health") == 0 && strcmp(method, "GET") == 0)
        return send_text(conn, MHD_HTTP_OK, "application/json", strdup("{\"status\":\"ok\"}"));
    /* Accept both /v1/x and /x: clients differ in whether the base URL ends in /v1. */
    const char *path = strncmp(url, "/v1/", 4) == 0 ? url + 3 : url;
    proto_kind pk = proto_of(path);
    if (!authorized(S, conn))
        return send_error(conn, pk, MHD_HTTP_UNAUTHORIZED, pk == PROTO_ANTHROPIC ? "authentication_error" : "invalid_request_error",
                          "invalid_api_key", "invalid or missing API key");
    if (strcmp(method, "GET") == 0) {
        if (strcmp(path, "/models") == 0) return openai_models(S, conn, NULL);
        if (strncmp(path, "/models/", 8) == 0) return openai_models(S, conn, path + 8);
        return send_error(conn, pk, MHD_HTTP_NOT_FOUND, pk == PROTO_ANTHROPIC ? "not_found_error" : "invalid_request_error", "not_found", "no such endpoint");
    }
    if (strcmp(method, "POST") != 0)
        return send_error(conn, pk, MHD_HTTP_METHOD_NOT_ALLOWED, "invalid_request_error", NULL, "method not allowed");
    enum MHD_Result (*handler)(srv *, struct MHD_Connection *, cJSON *) = NULL;
    if (strcmp(path, "/chat/completions") == 0) handler = openai_chat;
    else if (strcmp(path, "/completions") == 0) handler = openai_completions;
    else if (strcmp(path, "/responses") == 0) handler = responses_create;
    else if (strcmp(path, "/messages") == 0) handler = anthropic_messages;
    else if (strcmp(path, "/messages/count_tokens") == 0) handler = anthropic_count_tokens;
    else return send_error(conn, pk, MHD_HTTP_NOT_FOUND, pk == PROTO_ANTHROPIC ? "not_found_error" : "invalid_request_error", "not_found", "no such endpoint");

    if (rc->too_big) {
        char msg[96];
        snprintf(msg, sizeof msg, "request body larger than %zu bytes", S->cfg.max_body);
        return send_error(conn, pk, MHD_HTTP_CONTENT_TOO_LARGE, "invalid_request_error", "request_too_large", msg);
    }
    if (json_too_deep(rc->body ? rc->body : "", rc->len))
        return send_error(conn, pk, MHD_HTTP_BAD_REQUEST, "invalid_request_error", "invalid_json", "JSON nested too deeply");
    if (json_has_nul_escape(rc->body ? rc->body : "", rc->len))
        return send_error(conn, pk, MHD_HTTP_BAD_REQUEST, "invalid_request_error", "invalid_json",
                          "strings containing NUL (\\u0000) are not supported");
    const char *body = rc->body ? rc->body : "";
    size_t bad = utf8_bad_at(body, rc->len);
    if (bad < rc->len) {
        char msg[96];
        snprintf(msg, sizeof msg, body[bad] ? "request body is not valid UTF-8 (byte %zu)" : "request body contains a NUL byte (byte %zu)", bad);
        return send_error(conn, pk, MHD_HTTP_BAD_REQUEST, "invalid_request_error", "invalid_json", msg);
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, rc->len, &end, false);
    /* cJSON stops after the first value: whatever follows it but
     * whitespace makes the body malformed, not something to ignore. */
    while (root && end < body + rc->len && *end && strchr(" \t\r\n", *end)) end++;
    if (!root || !cJSON_IsObject(root) || end != body + rc->len) {
        cJSON_Delete(root);
        return send_error(conn, pk, MHD_HTTP_BAD_REQUEST, "invalid_request_error", "invalid_json",
                          root && end != body + rc->len ? "request body: more text after the JSON object" : "request body is not a JSON object");
    }
    enum MHD_Result ret = handler(S, conn, root);
    cJSON_Delete(root);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    srv *S = cls;
    req_ctx *rc = *con_cls;
    if (!rc) {
        rc = calloc(1, sizeof *rc);
        if (!rc) return MHD_NO;
        *con_cls = rc;
        /* Answer before reading a byte of the body when the headers already
         * settle it: a missing/wrong API key (no unauthenticated client can
         * make the server buffer bodies) or a declared length over the limit.
         * MHD then discards the body and closes the connection. */
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > S->cfg.max_body) rc->too_big = true;
        if (rc->too_big || (strcmp(method, "OPTIONS") != 0 && strcmp(url, "/health") != 0 && !authorized(S, conn)))
            return route(S, conn, method, url, rc);
        return MHD_YES;
    }
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        /* An undeclared (chunked) body over the limit: stop reading and close
         * the connection instead of draining it for as long as it is sent. */
        if (rc->too_big || rc->len + n > S->cfg.max_body) return MHD_NO;
        if (rc->len + n + 1 > rc->cap) {
            size_t cap = rc->cap ? rc->cap : 4096;
            while (cap < rc->len + n + 1) cap *= 2;
            char *p = realloc(rc->body, cap);
            if (!p) { rc->too_big = true; return MHD_YES; }
            rc->body = p; rc->cap = cap;
        }
        memcpy(rc->body + rc->len, upload, n);
        rc->len += n;
        return MHD_YES;
    }
    return route(S, conn, method, url, rc);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode code) {
    req_ctx *rc = *con_cls;
    if (!rc) return;
    free(rc->body);
    free(rc);
    *con_cls = NULL;
}

void http_drain(int max_ms) {
    /* MHD_stop_daemon closes sockets at once; give finished streams the
     * moment they need to send their last events. */
    for (int waited = 0; atomic_load(&g_open_streams) > 0 && waited < max_ms; waited += 10) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

struct MHD_Daemon *http_start(srv *S, char *err, size_t errlen) {
    g_cors = S->cfg.cors;
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ITC | MHD_USE_ERROR_LOG;
    if (inet_pton(AF_INET, S->cfg.host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)S->cfg.port);
    } else if (inet_pton(AF_INET6, S->cfg.host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)S->cfg.port);
        flags |= MHD_USE_IPv6;
    } else {
        snprintf(err, errlen, "--host %s: not a numeric IPv4 or IPv6 address", S->cfg.host);
        return NULL;
    }
    struct MHD_Daemon *d = MHD_start_daemon(flags, (uint16_t)S->cfg.port, NULL, NULL, on_request, S,
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
        /* Bounds the request line + headers (431 beyond it). */
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024),
        MHD_OPTION_CONNECTION_LIMIT, 256u,
        /* Slow or idle clients are dropped; streams send keepalives well within it. */
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)S->cfg.timeout_s,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, S,
        MHD_OPTION_END);
    if (!d) snprintf(err, errlen, "cannot listen on %s:%d: %s", S->cfg.host, S->cfg.port, strerror(errno));
    return d;
}
