/* Sessions: KV state + token list + next-token logits, and snapshots.
 *
 * Snapshot format, version 2 (all little-endian; written and read here for
 * every backend, from the logical state of engine/backend.h, so the bytes do
 * not depend on the backend that produced them):
 *
 *   u8[8]  magic "DS4SNAP\0"
 *   u32    version = 2
 *   u64    fingerprint: FNV-1a 64 over the shape-defining hparams (layers,
 *          dims, vocab, heads, window, ratios, indexer, HC) and the first
 *          256 bytes of token_embd, output and output_norm data — a snapshot
 *          of another model (or the same shape with other weights) is refused
 *   u32    n_layer, head_dim, idx_head_dim, n_vocab, window (for messages)
 *   u32    n_tokens, has_logits
 *   i32    ids[n_tokens]
 *   f32    logits[n_vocab]                       (only if has_logits)
 *   per layer ℓ = 0 … n_layer−1:
 *     u32  lo_raw, n_raw, n_comp, lo_comp, n_cpend, n_idx, lo_idx, n_ipend
 *     f32  raw[n_raw × head_dim]                 positions lo_raw …, oldest first
 *     f32  comp[n_comp × head_dim]
 *     f32  ckv[n_cpend × W], cgate[n_cpend × W]  W = lanes(R) × head_dim
 *     f32  idx[n_idx × idx_head_dim]
 *     f32  ikv[n_ipend × 2·idx_head_dim], igate[same]
 *   u64    checksum of every preceding byte: FNV-1a 64 over little-endian
 *          64-bit words (the last < 8 bytes one by one)
 *
 * Loading checks magic, version, fingerprint, every count against the bytes
 * left (before allocating), the checksum, and the backend's own consistency
 * rules (row counts vs n_tokens, enough window and frontier to continue). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds4.h"
#include "engine/engine_internal.h"

#define SNAP_MAGIC "DS4SNAP"
#define SNAP_VERSION 2u   /* 2: word-wise checksum (1: byte-wise FNV-1a) */

ds4_session *ds4_session_new(ds4_engine *e, uint32_t ctx, char *err, size_t errlen) {
    const ds4_hparams *hp = &e->model.hp;
    if (ctx == 0 || ctx > hp->ctx_max) {
        ds4_errf(err, errlen, "context %u out of range 1…%u", ctx, hp->ctx_max);
        return NULL;
    }
    ds4_session *s = calloc(1, sizeof *s);
    if (!s) { ds4_errf(err, errlen, "out of memory"); return NULL; }
    s->e = e;
    s->ctx = ctx;
    s->ids = malloc((size_t)ctx * sizeof *s->ids);
    size_t lb = (size_t)hp->n_vocab * sizeof *s->logits;
    s->logits = e->ops->host_alloc ? e->ops->host_alloc(e->be, lb) : malloc(lb);
    if (!s->ids || !s->logits) {
        ds4_errf(err, errlen, "out of memory for a %u-token session", ctx);
        ds4_session_free(s);
        return NULL;
    }
    if (!(s->st = e->ops->state_new(e->be, ctx, err, errlen))) { ds4_session_free(s); return NULL; }
    if (e->verbose) {
        uint64_t used, alloc;
        e->ops->state_bytes(e->be, s->st, &used, &alloc);
        fprintf(stderr, "ds4: session ctx %u: KV state %.1f MiB on %s (spec §7.2 accounting: %.1f MiB)\n", ctx,
                (double)alloc / (1 << 20), e->ops->name, (double)ds4_model_kv_bytes(hp, ctx) / (1 << 20));
    }
    return s;
}

void ds4_session_free(ds4_session *s) {
    if (!s) return;
    if (s->st) s->e->ops->state_free(s->e->be, s->st);
    free(s->ids);
    if (s->e->ops->host_free) s->e->ops->host_free(s->e->be, s->logits);
    else free(s->logits);
    free(s);
}

uint32_t ds4_session_ctx(const ds4_session *s) { return s->ctx; }
size_t ds4_session_len(const ds4_session *s) { return s->n; }
const int32_t *ds4_session_tokens(const ds4_session *s) { return s->ids; }

/* The logits of the last eval stay in the backend until asked for: on a GPU
 * a greedy step then brings back the token alone, not n_vocab floats. The
 * copy fills a cache and does not change the session's value (the last eval
 * fixed the logits), hence a const session. */
const float *ds4_session_logits(const ds4_session *s) {
    if (!s->has_logits) return NULL;
    if (!s->in_host) {
        ds4_session *m = (ds4_session *)s;
        char err[256];
        if (s->e->ops->last_logits(s->e->be, s->st, m->logits, err, sizeof err)) {
            fprintf(stderr, "ds4: logits: %s\n", err);
            return NULL;
        }
        m->in_host = true;
    }
    return s->logits;
}

int32_t ds4_session_argmax(const ds4_session *s) { return s->has_logits ? s->top : -1; }

uint64_t ds4_session_kv_bytes(const ds4_session *s) {
    uint64_t used, alloc;
    s->e->ops->state_bytes(s->e->be, s->st, &used, &alloc);
    return used;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int ds4_session_eval(ds4_session *s, const int32_t *ids, size_t n, float *all_logits,
                     ds4_progress_fn progress, void *ud, char *err, size_t errlen) {
    ds4_engine *e = s->e;
    uint32_t V = e->model.hp.n_vocab;
    if (n == 0) return 0;
    if (n > s->ctx - s->n) return ds4_errf(err, errlen, "context full: %zu + %zu tokens > %u", s->n, n, s->ctx);
    double t0 = now_s();
    size_t done = 0, step = e->ops->eval_step(e->be);
    while (done < n) {
        /* progress and cancellation between the backend's own batches */
        size_t c = n - done < step ? n - done : step;
        if (all_logits ? e->ops->eval(e->be, s->st, ids + done, c, all_logits + done * V, true, err, errlen)
                       : e->ops->eval_top(e->be, s->st, ids + done, c, &s->top, err, errlen))
            return -1;
        memcpy(s->ids + s->n, ids + done, c * sizeof *ids);
        s->n += c;
        done += c;
        s->has_logits = true;
        s->in_host = all_logits != NULL;
        if (all_logits) {
            memcpy(s->logits, all_logits + (done - 1) * V, (size_t)V * sizeof(float));
            s->top = ds4_argmax(s->logits, V);
        }
        if (progress && !progress(ud, done, n) && done < n) {
            ds4_errf(err, errlen, "cancelled after %zu of %zu tokens", done, n);
            return 1;
        }
    }
    /* Prefill speed per eval; decode speed (one token per eval) would flood
     * the output, so generation reports it once, in its summary line. */
    if (e->verbose && n > 1) {
        double dt = now_s() - t0;
        fprintf(stderr, "ds4: prefill %zu tokens in %.3f s (%.2f tok/s)\n", n, dt, dt > 0 ? (double)n / dt : 0.0);
    }
    return 0;
}

int ds4_session_truncate(ds4_session *s, size_t n, char *err, size_t errlen) {
    ds4_engine *e = s->e;
    if (n > s->n) return ds4_errf(err, errlen, "cannot truncate %zu tokens to %zu", s->n, n);
    if (n == s->n) return 0;
    if (n == 0) {
        if (e->ops->truncate(e->be, s->st, 0, err, errlen)) return -1;
        s->n = 0;
        s->has_logits = false;
        return 0;
    }
    /* Keep n−1 positions and re-evaluate token n−1: the logits after it are
     * part of the session, and this recomputes exactly the state of n. */
    if (e->ops->truncate(e->be, s->st, (uint32_t)(n - 1), err, errlen)) return -1;
    s->n = n - 1;
    s->has_logits = false;
    int32_t last = s->ids[n - 1];
    return ds4_session_eval(s, &last, 1, NULL, NULL, NULL, err, errlen) ? -1 : 0;
}

/* ---- snapshot ------------------------------------------------------------------ */

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) { h ^= b[i]; h *= 0x100000001b3ull; }
    return h;
}
#define FNV0 0xcbf29ce484222325ull

/* The snapshot checksum: FNV-1a's step on 8-byte words. A server takes a
 * snapshot (hundreds of MB at 30k tokens) on the request path, and the
 * byte-wise loop (one dependent multiply a byte) cost ~0.6 s of it at
 * 470 MB; a word a multiply is 8× less. Each step is a bijection of the
 * running value, so any change to one word changes the result. */
static uint64_t fnv_words(const void *p, size_t n) {
    const uint8_t *b = p;
    uint64_t h = FNV0, w;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        memcpy(&w, b + i, 8);   /* the snapshot is little-endian, as the hosts we build for */
        h = (h ^ w) * 0x100000001b3ull;
    }
    return fnv(h, b + i, n - i);
}

static uint64_t fingerprint(const ds4_model *m) {
    const ds4_hparams *hp = &m->hp;
    uint32_t f[] = {hp->n_layer, hp->n_embd, hp->n_vocab, hp->n_head, hp->head_dim, hp->rope_dim, hp->q_lora,
                    hp->o_groups, hp->o_lora, hp->n_expert, hp->n_expert_used, hp->expert_ff, hp->window,
                    hp->idx_n_head, hp->idx_head_dim, hp->idx_top_k, hp->hc_count};
    uint64_t h = fnv(FNV0, f, sizeof f);
    h = fnv(h, hp->compress_ratio, (hp->n_layer + 1) * sizeof hp->compress_ratio[0]);
    const ds4_tensor *ts[] = {&m->tok_embd, &m->output, &m->out_norm};
    for (size_t i = 0; i < 3; i++) {
        uint64_t nb = ts[i]->row_bytes * (uint64_t)(ts[i]->ne[1] ? ts[i]->ne[1] : 1);
        h = fnv(h, ts[i]->data, nb < 256 ? nb : 256);
    }
    return h;
}

typedef struct { uint8_t *p; size_t n, cap; bool oom; } wbuf;

static void put(wbuf *w, const void *src, size_t n) {
    if (w->oom || n == 0) return;   /* absent arrays are NULL with n = 0 */
    if (w->n + n > w->cap) {
        size_t c = w->cap ? w->cap : 4096;
        while (c < w->n + n) c *= 2;
        uint8_t *q = realloc(w->p, c);
        if (!q) { w->oom = true; return; }
        w->p = q; w->cap = c;
    }
    memcpy(w->p + w->n, src, n);
    w->n += n;
}
static void put32(wbuf *w, uint32_t v) { put(w, &v, 4); }   /* x86/ARM hosts: little-endian */

int ds4_session_save(const ds4_session *s, uint8_t **buf, size_t *len) {
    const ds4_engine *e = s->e;
    const ds4_hparams *hp = &e->model.hp;
    ds4_kv_host h;
    char err[256];
    const float *logits = ds4_session_logits(s);
    if (s->has_logits && !logits) return -1;
    if (e->ops->export_state(e->be, s->st, &h, err, sizeof err)) return -1;
    wbuf w = {0};
    put(&w, SNAP_MAGIC, 8);
    put32(&w, SNAP_VERSION);
    uint64_t fp = fingerprint(&e->model);
    put(&w, &fp, 8);
    put32(&w, hp->n_layer); put32(&w, hp->head_dim); put32(&w, hp->idx_head_dim); put32(&w, hp->n_vocab);
    put32(&w, hp->window);
    put32(&w, (uint32_t)s->n); put32(&w, s->has_logits);
    put(&w, s->ids, s->n * sizeof *s->ids);
    if (s->has_logits) put(&w, logits, (size_t)hp->n_vocab * sizeof(float));
    for (uint32_t l = 0; l < h.n_layer; l++) {
        const ds4_kv_layer_host *o = &h.layers[l];
        size_t W = ds4_comp_lanes(hp->compress_ratio[l]) * (size_t)hp->head_dim, Wi = 2 * (size_t)hp->idx_head_dim;
        uint32_t c[8] = {o->lo_raw, o->n_raw, o->n_comp, o->lo_comp, o->n_cpend, o->n_idx, o->lo_idx, o->n_ipend};
        put(&w, c, sizeof c);
        put(&w, o->raw, (size_t)o->n_raw * hp->head_dim * 4);
        put(&w, o->comp, (size_t)o->n_comp * hp->head_dim * 4);
        put(&w, o->ckv, (size_t)o->n_cpend * W * 4);
        put(&w, o->cgate, (size_t)o->n_cpend * W * 4);
        put(&w, o->idx, (size_t)o->n_idx * hp->idx_head_dim * 4);
        put(&w, o->ikv, (size_t)o->n_ipend * Wi * 4);
        put(&w, o->igate, (size_t)o->n_ipend * Wi * 4);
    }
    ds4_kv_host_free(&h);
    uint64_t sum = fnv_words(w.p, w.n);
    put(&w, &sum, 8);
    if (w.oom) { free(w.p); return -1; }
    *buf = w.p;
    *len = w.n;
    return 0;
}

typedef struct { const uint8_t *p; size_t n, off; } rbuf;

static bool get(rbuf *r, void *dst, size_t n) {
    if (n > r->n - r->off) return false;
    memcpy(dst, r->p + r->off, n);
    r->off += n;
    return true;
}

/* Read cnt rows of w floats into a fresh array; refuses before allocating
 * when the bytes are not there (so a corrupt count cannot size a huge malloc). */
static bool get_rows(rbuf *r, uint32_t cnt, size_t w, float **out) {
    size_t left = r->n - r->off;
    if (w && cnt > left / 4 / w) return false;
    size_t nb = (size_t)cnt * w * 4;
    *out = malloc(nb ? nb : 1);
    return *out && get(r, *out, nb);
}

int ds4_session_load(ds4_session *s, const uint8_t *buf, size_t len, char *err, size_t errlen) {
    ds4_engine *e = s->e;
    const ds4_hparams *hp = &e->model.hp;
    rbuf r = {buf, len, 0};
    char magic[8];
    uint32_t ver = 0, dims[5], n, has_logits;
    uint64_t fp, sum;
    if (len < 8 + 8 || !get(&r, magic, 8) || memcmp(magic, SNAP_MAGIC, 8))
        return ds4_errf(err, errlen, "not a ds4 session snapshot (bad magic)");
    memcpy(&sum, buf + len - 8, 8);
    if (fnv_words(buf, len - 8) != sum)
        return ds4_errf(err, errlen, "snapshot is corrupt or truncated (checksum mismatch, %zu bytes)", len);
    r.n = len - 8;
    if (!get(&r, &ver, 4) || ver != SNAP_VERSION)
        return ds4_errf(err, errlen, "snapshot version %u not supported (expected %u)", ver, SNAP_VERSION);
    if (!get(&r, &fp, 8) || !get(&r, dims, sizeof dims) || !get(&r, &n, 4) || !get(&r, &has_logits, 4))
        return ds4_errf(err, errlen, "snapshot header truncated");
    if (fp != fingerprint(&e->model))
        return ds4_errf(err, errlen,
                               "snapshot is from another model (layers %u, head_dim %u, vocab %u; this model: %u, %u, %u)",
                               dims[0], dims[1], dims[3], hp->n_layer, hp->head_dim, hp->n_vocab);
    /* Same fingerprint, so these are this model's: anything else is damage
     * (a save of the loaded state would not give these bytes back). */
    if (dims[0] != hp->n_layer || dims[1] != hp->head_dim || dims[2] != hp->idx_head_dim || dims[3] != hp->n_vocab ||
        dims[4] != hp->window)
        return ds4_errf(err, errlen, "snapshot header inconsistent (dimensions do not match its model fingerprint)");
    if (n > s->ctx) return ds4_errf(err, errlen, "snapshot holds %u tokens, session context is %u", n, s->ctx);
    if (has_logits > 1 || (n > 0) != (has_logits == 1))
        return ds4_errf(err, errlen, "snapshot header inconsistent (logits flag)");
    int32_t *ids = NULL;
    float *logits = NULL;
    ds4_kv_host h = {0};
    int rc = -1;
    if ((size_t)n > (r.n - r.off) / 4 || !(ids = malloc((size_t)n * 4 + 4)) || !get(&r, ids, (size_t)n * 4)) {
        ds4_errf(err, errlen, "snapshot truncated in token ids");
        goto out;
    }
    for (uint32_t i = 0; i < n; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= hp->n_vocab) {
            ds4_errf(err, errlen, "snapshot token %u has id %d outside the vocabulary", i, ids[i]);
            goto out;
        }
    if (has_logits && !get_rows(&r, 1, hp->n_vocab, &logits)) {
        ds4_errf(err, errlen, "snapshot truncated in logits");
        goto out;
    }
    h.n_tokens = n;
    h.n_layer = hp->n_layer;
    if (!(h.layers = calloc(hp->n_layer, sizeof *h.layers))) { ds4_errf(err, errlen, "out of memory"); goto out; }
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        ds4_kv_layer_host *o = &h.layers[l];
        size_t W = ds4_comp_lanes(hp->compress_ratio[l]) * (size_t)hp->head_dim, Wi = 2 * (size_t)hp->idx_head_dim;
        uint32_t c[8];
        if (!get(&r, c, sizeof c)) { ds4_errf(err, errlen, "snapshot truncated at layer %u", l); goto out; }
        o->lo_raw = c[0]; o->n_raw = c[1]; o->n_comp = c[2]; o->lo_comp = c[3];
        o->n_cpend = c[4]; o->n_idx = c[5]; o->lo_idx = c[6]; o->n_ipend = c[7];
        /* A layer without a compressor (ratio 0) or without an indexer (ratio
         * other than 4) writes zeros there; anything else is not a snapshot
         * of this model, and a backend that ignores those fields would load
         * it and then save different bytes. */
        int R = hp->compress_ratio[l];
        if ((!R && (c[2] || c[3] || c[4])) || (R != 4 && (c[5] || c[6] || c[7]))) {
            ds4_errf(err, errlen, "snapshot layer %u: %s fields set on a layer without one", l,
                     !R && (c[2] || c[3] || c[4]) ? "compressor" : "indexer");
            goto out;
        }
        if (!get_rows(&r, o->n_raw, hp->head_dim, &o->raw) || !get_rows(&r, o->n_comp, hp->head_dim, &o->comp) ||
            !get_rows(&r, o->n_cpend, W, &o->ckv) || !get_rows(&r, o->n_cpend, W, &o->cgate) ||
            !get_rows(&r, o->n_idx, hp->idx_head_dim, &o->idx) || !get_rows(&r, o->n_ipend, Wi, &o->ikv) ||
            !get_rows(&r, o->n_ipend, Wi, &o->igate)) {
            ds4_errf(err, errlen, "snapshot truncated or inconsistent at layer %u", l);
            goto out;
        }
    }
    if (r.off != r.n) { ds4_errf(err, errlen, "snapshot has %zu trailing bytes", r.n - r.off); goto out; }
    if (e->ops->import_state(e->be, s->st, &h, err, errlen)) goto out;
    memcpy(s->ids, ids, (size_t)n * 4);
    s->n = n;
    s->has_logits = has_logits;
    s->in_host = true;
    if (has_logits) {
        memcpy(s->logits, logits, (size_t)hp->n_vocab * 4);
        s->top = ds4_argmax(s->logits, hp->n_vocab);
    }
    rc = 0;
out:
    free(ids);
    free(logits);
    ds4_kv_host_free(&h);
    return rc;
}
