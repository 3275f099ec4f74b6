/* Session pool: N resident sessions, routed by shared prefix, backed by the
 * disk checkpoint store (docs/kv-cache.md).
 *
 * The routing policy is ds4_pool_choose, a pure function of what each slot
 * holds; the pool object applies it: spill the victim to disk, bring the
 * chosen session to the longest prefix of the prompt it can get (its own
 * tokens, or a disk checkpoint when that is longer), and save checkpoints at
 * aligned frontiers. One thread uses a pool at a time (the server's worker).
 *
 * Checkpoints are written by a writer thread: the request path only takes
 * the snapshot (ds4_session_save: the session keeps changing, so that part
 * is synchronous) and hands it over; the writer hashes, writes, fsyncs,
 * renames and evicts (ds4_kvstore_save). See "the writer" below. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds4.h"
#include "util/errf.h"

static size_t common_prefix(const int32_t *a, size_t na, const int32_t *b, size_t nb) {
    size_t n = 0, m = na < nb ? na : nb;
    while (n < m && a[n] == b[n]) n++;
    return n;
}

ds4_pool_choice ds4_pool_choose(const ds4_pool_slot_info *slots, int n_slots, const int32_t *prompt,
                                size_t n_prompt, size_t min_share, size_t min_spill) {
    ds4_pool_choice c = {.slot = -1};
    if (n_slots <= 0) return c;
    /* 1. Follow-up of a conversation: the prompt repeats everything the slot
     *    held, or at least the slot's whole previous prompt (the client
     *    re-rendered the reply differently, e.g. dropped old reasoning, or
     *    asks again). What is cut is that stale reply: no spill. */
    int best = -1;
    size_t best_lcp = 0;
    for (int i = 0; i < n_slots; i++) {
        const ds4_pool_slot_info *s = &slots[i];
        if (!s->n) continue;
        size_t l = common_prefix(s->ids, s->n, prompt, n_prompt);
        bool follow = l == s->n || (s->n_prompt && l >= s->n_prompt);
        if (follow && (best < 0 || l > best_lcp || (l == best_lcp && s->idle_s < slots[best].idle_s))) {
            best = i;
            best_lcp = l;
        }
    }
    if (best >= 0) return (ds4_pool_choice){best, best_lcp, false};
    /* 2. A free slot: a side request or a new conversation never displaces
     *    one that is resident while there is room. */
    for (int i = 0; i < n_slots; i++)
        if (!slots[i].n) return (ds4_pool_choice){i, 0, false};
    /* 3. Full: the slot sharing the longest prefix (a rewind or branch of
     *    it) when that share is substantial, else the least valuable slot. */
    for (int i = 0; i < n_slots; i++) {
        /* Equal shares: the slot that loses fewer tokens (likelier an exact cut). */
        size_t l = common_prefix(slots[i].ids, slots[i].n, prompt, n_prompt);
        if (best < 0 || l > best_lcp || (l == best_lcp && slots[i].n < slots[best].n)) { best = i; best_lcp = l; }
    }
    if (best_lcp < min_share || best_lcp == 0) {
        double low = 0;
        for (int i = 0; i < n_slots; i++) {
            const ds4_pool_slot_info *s = &slots[i];
            double v = ds4_kv_value(s->n, s->uses, s->idle_s);
            if (i == 0 || v < low) { low = v; best = i; }
        }
        best_lcp = common_prefix(slots[best].ids, slots[best].n, prompt, n_prompt);
    }
    c.slot = best;
    c.reuse = best_lcp;
    c.spill = min_spill && slots[best].n - best_lcp >= min_spill;
    return c;
}

/* ---- how many sessions fit ----------------------------------------------------- */

/* "6.1 GiB" or, below a GiB, "2.9 MiB" (the tiny test model's sessions). */
static const char *human(uint64_t b, char *buf, size_t cap) {
    if (b >= (1ull << 30)) snprintf(buf, cap, "%.1f GiB", (double)b / (1ull << 30));
    else snprintf(buf, cap, "%.1f MiB", (double)b / (1ull << 20));
    return buf;
}

int ds4_pool_sessions_for(int requested, uint64_t free, uint64_t per, uint32_t ctx, char *msg, size_t msglen) {
    /* A fifth of free memory stays for what a prefill allocates beside the
     * sessions (activations, score scratch, the CUDA context's growth). */
    uint64_t fit = per ? free / 5 * 4 / per : UINT64_MAX;
    char f[32], e[32], t[32];
    human(free, f, sizeof f);
    human(per, e, sizeof e);
    if (requested <= 0) {
        int n = fit < 1 ? 1 : fit > DS4_POOL_MAX_DEFAULT ? DS4_POOL_MAX_DEFAULT : (int)fit;
        snprintf(msg, msglen, "%d (free %s, %s each at ctx %u)", n, f, e, ctx);
        return n;
    }
    if ((uint64_t)requested <= fit) {
        snprintf(msg, msglen, "%d (free %s, %s each at ctx %u)", requested, f, e, ctx);
        return requested;
    }
    human(per * (uint64_t)requested, t, sizeof t);
    snprintf(msg, msglen, "%d sessions at ctx %u need %s (%s each) but %s is free: at most %llu fit "
             "(a fifth of free memory is kept for prefill); lower the sessions or the context",
             requested, ctx, t, e, f, (unsigned long long)fit);
    return -1;
}

/* ---- the pool object ---------------------------------------------------------- */

typedef struct {
    ds4_session *s;
    size_t n_prompt;        /* of the last request */
    size_t saved;           /* length of the last checkpoint of this content */
    double last_used;
    uint64_t uses;
} slot;

/* A snapshot handed to the writer: everything ds4_kvstore_save needs, owned. */
typedef struct {
    char *text; size_t tl;
    int32_t *ids; size_t n;
    uint8_t *blob; size_t blen;
    uint8_t *extra; size_t elen;
} wjob;

struct ds4_pool {
    ds4_engine *e;
    const ds4_tokenizer *tok;
    ds4_pool_params p;
    slot *slots;
    /* The writer (only with a store). One mutex and one condition variable,
     * broadcast on every change: the writer waits for `queued`, a producer
     * for `queued` to empty, a flush for both to empty. */
    pthread_t thread;
    bool running, stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    wjob *queued;               /* handed over, not yet taken: at most one */
    wjob *writing;              /* being written */
    int failed;                 /* a write failed since the last flush */
    char ferr[256];             /* the first such failure */
};

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void plog(ds4_pool *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void plog(ds4_pool *p, const char *fmt, ...) {
    if (!p->p.log) return;
    va_list ap;
    va_start(ap, fmt);
    /* One line even when other threads write to the same trace file:
     * the FILE lock spans the three calls. */
    flockfile(p->p.log);
    fputs("pool: ", p->p.log);
    vfprintf(p->p.log, fmt, ap);
    fputc('\n', p->p.log);
    funlockfile(p->p.log);
    fflush(p->p.log);
    va_end(ap);
}

static void *writer_main(void *arg);

ds4_pool *ds4_pool_new(ds4_engine *e, const ds4_pool_params *prm, char *err, size_t errlen) {
    if (prm->n_slots < 1) { ds4_errf(err, errlen, "pool: need at least one session"); return NULL; }
    ds4_pool *p = calloc(1, sizeof *p);
    if (!p || !(p->slots = calloc((size_t)prm->n_slots, sizeof *p->slots))) {
        free(p);
        ds4_errf(err, errlen, "pool: out of memory");
        return NULL;
    }
    p->e = e;
    p->tok = ds4_engine_tokenizer(e);
    p->p = *prm;
    if (!p->p.align) p->p.align = 2048;
    if (!p->p.every) p->p.every = 4 * p->p.align;
    /* Frontiers are aligned, as ds4_kv_save_points makes them. */
    p->p.every = (p->p.every + p->p.align - 1) / p->p.align * p->p.align;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    for (int i = 0; i < prm->n_slots; i++)
        if (!(p->slots[i].s = ds4_session_new(e, prm->ctx, err, errlen))) { ds4_pool_free(p); return NULL; }
    if (p->p.store) {
        if (pthread_create(&p->thread, NULL, writer_main, p)) {
            ds4_errf(err, errlen, "pool: cannot start the checkpoint writer");
            ds4_pool_free(p);
            return NULL;
        }
        p->running = true;
    }
    return p;
}

void ds4_pool_free(ds4_pool *p) {
    if (!p) return;
    if (p->running) {
        /* The writer empties the queue before it exits: nothing handed
         * over is lost. */
        pthread_mutex_lock(&p->mu);
        p->stop = true;
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
        pthread_join(p->thread, NULL);
    }
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    for (int i = 0; i < p->p.n_slots; i++) ds4_session_free(p->slots[i].s);
    free(p->slots);
    free(p);
}

ds4_session *ds4_pool_session(ds4_pool *p, int i) { return i >= 0 && i < p->p.n_slots ? p->slots[i].s : NULL; }

/* ---- the writer ------------------------------------------------------------------ */

static void wjob_free(wjob *j) {
    if (!j) return;
    free(j->text);
    free(j->ids);
    free(j->blob);
    free(j->extra);
    free(j);
}

static void *writer_main(void *arg) {
    ds4_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->queued && !p->stop) pthread_cond_wait(&p->cv, &p->mu);
        if (!p->queued) break;          /* stopping, and nothing left to write */
        wjob *j = p->writing = p->queued;
        p->queued = NULL;
        pthread_cond_broadcast(&p->cv); /* room for the next snapshot */
        pthread_mutex_unlock(&p->mu);

        if (p->p.on_write) p->p.on_write(p->p.ud, j->n);
        double t0 = mono_s();
        ds4_kv_checkpoint cp = {.text = j->text, .text_len = j->tl, .ids = j->ids, .n_ids = j->n,
                                .session = j->blob, .session_len = j->blen, .extra = j->extra, .extra_len = j->elen};
        char err[256] = "";
        int rc = ds4_kvstore_save(p->p.store, &cp, err, sizeof err);
        /* A failed write (disk full, say) costs a future hit, never this
         * process: one line, as a synchronous save logged it. */
        plog(p, "checkpoint %zu tokens (%zu bytes of state): %s%s%s (writer, %.3f s)", j->n, j->blen,
             rc == 0 ? "saved" : rc == 1 ? "not kept by the budget" : "failed", rc < 0 ? ": " : "",
             rc < 0 ? err : "", mono_s() - t0);

        pthread_mutex_lock(&p->mu);
        if (rc < 0 && !p->failed++) snprintf(p->ferr, sizeof p->ferr, "%s", err);
        p->writing = NULL;
        pthread_cond_broadcast(&p->cv); /* flushes wait for this */
        pthread_mutex_unlock(&p->mu);
        wjob_free(j);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* Snapshot the session (it holds exactly what is saved) and hand it to the
 * writer.
 *
 * Bounded memory: at most ONE snapshot waits beyond the one being written.
 * The producer waits for that place to be free BEFORE it exports the
 * session, so at most two snapshots exist at any time (the one being
 * written and the one queued); a burst of saves is backpressure on the
 * request path, never a growing queue. */
static int hand_over(ds4_pool *p, ds4_session *s, char *err, size_t errlen) {
    size_t n = ds4_session_len(s), tl = 0;
    const int32_t *ids = ds4_session_tokens(s);
    char *text = ds4_kv_text(p->tok, ids, n, &tl);
    if (!text) return ds4_errf(err, errlen, "pool: out of memory");
    if (ds4_kvstore_contains(p->p.store, text, tl)) { free(text); return 0; }
    wjob *j = calloc(1, sizeof *j);
    if (!j || !(j->ids = malloc(n * sizeof *ids))) {
        free(j);
        free(text);
        return ds4_errf(err, errlen, "pool: out of memory");
    }
    j->text = text;
    j->tl = tl;
    j->n = n;
    memcpy(j->ids, ids, n * sizeof *ids);
    pthread_mutex_lock(&p->mu);
    /* The line shows in a trace why a request paused (disk slower than
     * checkpoints come). */
    if (p->queued) plog(p, "checkpoint %zu tokens: waiting for the writer (%zu tokens queued)", n, p->queued->n);
    while (p->queued) pthread_cond_wait(&p->cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
    double t0 = mono_s();
    if (ds4_session_save(s, &j->blob, &j->blen)) {
        wjob_free(j);
        return ds4_errf(err, errlen, "pool: cannot snapshot a %zu-token session", n);
    }
    /* The server's extra data reads its own state: here, not on the writer. */
    if (p->p.extra_fn && p->p.extra_fn(p->p.ud, text, tl, ids, n, &j->extra, &j->elen)) {
        free(j->extra);
        j->extra = NULL;
        j->elen = 0;
    }
    size_t blen = j->blen;          /* j is the writer's once queued */
    pthread_mutex_lock(&p->mu);
    /* One thread hands over (the pool's user), so the place is still free;
     * the loop only keeps the bound true if that ever changes. */
    while (p->queued) pthread_cond_wait(&p->cv, &p->mu);
    p->queued = j;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    /* What the request paid: the snapshot, not the write. */
    plog(p, "checkpoint %zu tokens: snapshot of %zu bytes in %.3f s, handed to the writer", n, blen,
         mono_s() - t0);
    return 0;
}

/* Until the writer has nothing queued or in hand. */
static void wait_idle(ds4_pool *p) {
    pthread_mutex_lock(&p->mu);
    while (p->queued || p->writing) pthread_cond_wait(&p->cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

int ds4_pool_flush(ds4_pool *p, char *err, size_t errlen) {
    if (!p->running) return 0;
    wait_idle(p);
    pthread_mutex_lock(&p->mu);
    int failed = p->failed;
    if (failed) ds4_errf(err, errlen, "%s%s", p->ferr, failed > 1 ? " (and more failed writes)" : "");
    p->failed = 0;
    pthread_mutex_unlock(&p->mu);
    return failed ? -1 : 0;
}

/* A snapshot still with the writer that covers more of the prompt than the
 * slot keeps: its ids are a prefix of the prompt, longer than `have`. */
static bool pending_covers(ds4_pool *p, const int32_t *prompt, size_t n, size_t have) {
    bool r = false;
    pthread_mutex_lock(&p->mu);
    const wjob *js[2] = {p->queued, p->writing};
    for (int k = 0; k < 2; k++)
        if (js[k] && js[k]->n > have && js[k]->n <= n && !memcmp(js[k]->ids, prompt, js[k]->n * sizeof *prompt))
            r = true;
    pthread_mutex_unlock(&p->mu);
    return r;
}

int ds4_pool_checkpoint(ds4_pool *p, int i, char *err, size_t errlen) {
    if (i < 0 || i >= p->p.n_slots) return ds4_errf(err, errlen, "pool: no slot %d", i);
    slot *sl = &p->slots[i];
    size_t n = ds4_session_len(sl->s);
    if (!p->p.store || n < p->p.align || n == sl->saved) return 0;
    if (hand_over(p, sl->s, err, errlen)) return -1;
    /* Handed over, not yet durable: a failed write is not retried for this
     * content (it is logged, and ds4_pool_flush reports it). */
    sl->saved = n;
    return 0;
}

int ds4_pool_spill_all(ds4_pool *p, char *err, size_t errlen) {
    int rc = 0;
    for (int i = 0; i < p->p.n_slots; i++)
        if (ds4_pool_checkpoint(p, i, err, errlen)) rc = -1;
    /* Shutdown: everything on disk before the caller goes on. */
    char ferr[256];
    if (ds4_pool_flush(p, ferr, sizeof ferr) && !rc) {
        ds4_errf(err, errlen, "%s", ferr);
        rc = -1;
    }
    return rc;
}

/* Load the best checkpoint (at most max_ids tokens) into s. Returns its
 * length, 0 when none could be used. */
static size_t restore(ds4_pool *p, ds4_session *s, const char *text, size_t tl, const int32_t *prompt, size_t n,
                      ds4_pool_lease *out) {
    ds4_kv_checkpoint cp;
    while (ds4_kvstore_best_at_or_before(p->p.store, text, tl, prompt, n, n, &cp) == 1) {
        char lerr[256];
        if (ds4_session_load(s, cp.session, cp.session_len, lerr, sizeof lerr) == 0 &&
            ds4_session_len(s) == cp.n_ids) {
            size_t got = cp.n_ids;
            if (cp.extra_len && (out->extra = malloc(cp.extra_len))) {
                memcpy(out->extra, cp.extra, cp.extra_len);
                out->extra_len = cp.extra_len;
            }
            ds4_kv_checkpoint_free(&cp);
            return got;
        }
        /* A verified file whose snapshot the engine refuses (made by a build
         * with another snapshot layout, or a payload the checksums cannot
         * tell is wrong): it would be refused again, and reading it costs
         * what a prefill saves. Drop it, then try the next shorter one. */
        ds4_kvstore_discard(p->p.store, &cp, lerr);
        n = cp.n_ids - 1;
        ds4_kv_checkpoint_free(&cp);
        if (!n) break;
    }
    return 0;
}

int ds4_pool_acquire(ds4_pool *p, const int32_t *prompt, size_t n, ds4_pool_lease *out, char *err,
                     size_t errlen) {
    memset(out, 0, sizeof *out);
    int ns = p->p.n_slots;
    ds4_pool_slot_info *info = calloc((size_t)ns, sizeof *info);
    if (!info) return ds4_errf(err, errlen, "pool: out of memory");
    double now = mono_s();
    for (int i = 0; i < ns; i++) {
        slot *sl = &p->slots[i];
        info[i] = (ds4_pool_slot_info){ds4_session_tokens(sl->s), ds4_session_len(sl->s), sl->n_prompt,
                                       sl->uses ? now - sl->last_used : 0, sl->uses};
    }
    ds4_pool_choice c = ds4_pool_choose(info, ns, prompt, n, p->p.align, p->p.align);
    free(info);
    slot *sl = &p->slots[c.slot];
    ds4_session *s = sl->s;
    size_t had = ds4_session_len(s);
    out->slot = c.slot;
    out->session = s;
    if (c.spill && p->p.store) {
        char serr[256];
        if (ds4_pool_checkpoint(p, c.slot, serr, sizeof serr)) plog(p, "spill failed: %s", serr);
        else out->spilled = true;
    }

    /* A snapshot still being written is not in the store's index yet.
     * When one would serve this prompt better than the slot can, wait for
     * it (a lookup must not miss it); otherwise lookups go on without
     * waiting and only ever see complete, indexed files. */
    if (p->running && pending_covers(p, prompt, n, c.reuse)) {
        plog(p, "slot %d: a checkpoint still with the writer covers more of the prompt: waiting for it", c.slot);
        wait_idle(p);
    }
    size_t mem = c.reuse, tl = 0, disk = 0;
    char *text = p->p.store ? ds4_kv_text(p->tok, prompt, n, &tl) : NULL;
    size_t best_disk = text ? ds4_kvstore_probe(p->p.store, text, tl, prompt, n, n) : 0;
    bool kept = had == mem;
    char terr[256] = "";
    /* Cutting the session back is only tried when the disk cannot do better. */
    if (!kept && best_disk <= mem) kept = ds4_session_truncate(s, mem, terr, sizeof terr) == 0;
    if ((!kept || best_disk > mem) && text) disk = restore(p, s, text, tl, prompt, n, out);
    if (disk) {
        mem = 0;
    } else if (!kept && !(best_disk > mem && ds4_session_truncate(s, mem, terr, sizeof terr) == 0)) {
        mem = 0;
        if (ds4_session_truncate(s, 0, err, errlen)) { free(text); return -1; }
    }
    free(text);
    /* saved names a checkpoint of exactly this content: true after a restore,
     * unknown after a cut (the store's contains check then avoids doubles). */
    if (disk) sl->saved = disk;
    else if (ds4_session_len(s) != had) sl->saved = 0;
    out->n_memory = mem;
    out->n_disk = disk;
    plog(p, "slot %d <- %zu-token prompt: %zu from memory (held %zu), %zu from disk%s, %zu to prefill", c.slot, n,
         mem, had, disk, out->spilled ? ", previous content spilled" : "", n - mem - disk);
    return 0;
}

int ds4_pool_prefill(ds4_pool *p, const ds4_pool_lease *l, const int32_t *prompt, size_t n_stable,
                     ds4_progress_fn progress, void *ud, char *err, size_t errlen) {
    if (!p->p.store) return 0;
    ds4_session *s = l->session;
    size_t have = ds4_session_len(s), pt;
    /* One point at a time: the first save point after what the session holds. */
    while (ds4_kv_save_points(have, n_stable, p->p.align, p->p.every, &pt, 1)) {
        int rc = ds4_session_eval(s, prompt + have, pt - have, NULL, progress, ud, err, errlen);
        if (rc) return rc;
        have = pt;
        /* Only the snapshot is taken here; prefill goes on while the writer
         * writes it. A failed save costs a future hit, not this request. */
        char cerr[256];
        if (ds4_pool_checkpoint(p, l->slot, cerr, sizeof cerr)) plog(p, "checkpoint failed: %s", cerr);
    }
    return 0;
}

void ds4_pool_step(ds4_pool *p, const ds4_pool_lease *l) {
    slot *sl = &p->slots[l->slot];
    size_t n = ds4_session_len(sl->s);
    if (!p->p.store || n % p->p.every || n == sl->saved) return;
    char err[256];
    if (ds4_pool_checkpoint(p, l->slot, err, sizeof err)) plog(p, "checkpoint failed: %s", err);
}

void ds4_pool_release(ds4_pool *p, const ds4_pool_lease *l, size_t n_prompt) {
    slot *sl = &p->slots[l->slot];
    sl->n_prompt = n_prompt;
    sl->last_used = mono_s();
    sl->uses++;
    if (p->p.store && ds4_session_len(sl->s) >= sl->saved + p->p.every) {
        char err[256];
        if (ds4_pool_checkpoint(p, l->slot, err, sizeof err)) plog(p, "checkpoint failed: %s", err);
    }
}
