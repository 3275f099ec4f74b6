/* The inference worker: one thread owns the session pool and runs one job
 * at a time, in arrival order: route the prompt to a session (and disk
 * checkpoint), generate, report. A bounded queue in front of it turns
 * overload into an immediate 503 instead of unbounded waiting. */
#include "server.h"

#include <poll.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void srv_trace(srv *S, const char *fmt, ...) {
    if (!S->trace) return;
    pthread_mutex_lock(&S->trace_mu);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(S->trace, fmt, ap);
    va_end(ap);
    fflush(S->trace);
    pthread_mutex_unlock(&S->trace_mu);
}

job *job_new(srv *S) {
    job *j = calloc(1, sizeof *j);
    if (!j) return NULL;
    j->S = S;
    j->fd = -1;
    j->refs = 1;
    atomic_init(&j->cancel, false);
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    return j;
}

void job_unref(job *j) {
    if (!j) return;
    pthread_mutex_lock(&j->mu);
    bool last = --j->refs == 0;
    pthread_mutex_unlock(&j->mu);
    if (!last) return;
    if (j->fd >= 0) close(j->fd);
    if (j->proto_free) j->proto_free(j->proto);
    for (int i = 0; i < j->n_stop; i++) free(j->stop[i]);
    free(j->stop);
    free(j->forced);
    ds4_tokens_free(&j->prompt);
    ds4_gen_result_free(&j->res);
    if (j->out) { sse_close(j->out); sse_unref(j->out); }
    pthread_mutex_destroy(&j->mu);
    pthread_cond_destroy(&j->cv);
    free(j);
}

/* The client is gone: an error or a hang-up of both directions on our
 * duplicate of its socket (a reset, after a write reached a closed peer).
 * The end of its sending side alone (EOF, POLLRDHUP) is not: a client may
 * half-close (shutdown(SHUT_WR)) right after its request and still read the
 * answer, and TCP shows that exactly like a close until we write. So a
 * client that closed is found by a write: a stream writes at least every
 * keepalive_s (a failed write ends the SSE response: sse_gone), a
 * non-streaming answer only at its end. Works whether the job is queued,
 * prefilling or generating. */
static bool client_gone(int fd) {
    if (fd < 0) return false;
    struct pollfd p = {.fd = fd, .events = 0};   /* HUP and ERR are always reported */
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLERR | POLLNVAL));
}

bool job_cancelled(job *j) {
    if (atomic_load(&j->cancel)) return true;
    if ((j->out && sse_gone(j->out)) || client_gone(j->fd)) {
        atomic_store(&j->cancel, true);
        return true;
    }
    return false;
}

static bool gen_cancelled(void *ud) { return job_cancelled(ud); }
static bool gen_prefill(void *ud, size_t done, size_t total) { return !job_cancelled(ud); }
/* Between generated tokens: frontier checkpoints of a long answer. */
static void gen_step(void *ud) {
    job *j = ud;
    if (j->lease) ds4_pool_step(j->S->pool, j->lease);
}
static void gen_event(void *ud, const ds4_event *ev) {
    job *j = ud;
    if (j->out && j->ops->event) j->ops->event(j, ev);   /* events only feed streams */
}

int job_submit(job *j) {
    srv *S = j->S;
    pthread_mutex_lock(&S->qmu);
    if (S->stopping || S->q_len >= S->cfg.queue_max) {
        int rc = S->stopping ? -2 : -1;
        pthread_mutex_unlock(&S->qmu);
        return rc;
    }
    pthread_mutex_lock(&j->mu);
    j->refs++;
    pthread_mutex_unlock(&j->mu);
    S->queue[(S->q_head + S->q_len) % S->cfg.queue_max] = j;
    S->q_len++;
    pthread_cond_signal(&S->qcv);
    pthread_mutex_unlock(&S->qmu);
    return 0;
}

void job_wait(job *j) {
    pthread_mutex_lock(&j->mu);
    while (!j->done) pthread_cond_wait(&j->cv, &j->mu);
    pthread_mutex_unlock(&j->mu);
}

static uint64_t hash_ids(const int32_t *ids, size_t n) {
    uint64_t h = 1469598103934665603u;   /* FNV-1a over the ids' bytes */
    const unsigned char *b = (const unsigned char *)ids;
    for (size_t i = 0; i < n * sizeof *ids; i++) h = (h ^ b[i]) * 1099511628211u;
    return h;
}

/* Thinking without tools (prompt.md §5.5): the client sends the last turn
 * back without its reasoning (`</think>answer<EOS>`), while the live KV
 * state holds `<think>reasoning</think>answer`. Matching tokens would
 * discard the whole turn (too far back to rewind exactly, so everything is
 * recomputed). Instead the turn the client shows is remembered as standing
 * for that slot's live content, and a prompt that starts with it continues
 * it: the KV keeps reasoning the official prompt drops, as ds4 does.
 *
 * Fills eff with the prompt to evaluate (the live tokens + the new suffix)
 * and returns the alias used, or NULL (eff empty) when none applies. */
static const struct think_alias *alias_apply(srv *S, const job *j, ds4_tokens *eff) {
    memset(eff, 0, sizeof *eff);
    const struct think_alias *best = NULL;
    int slot = -1;
    for (int i = 0; i < S->cfg.sessions; i++) {
        const struct think_alias *a = &S->alias[i];
        if (!a->ok || a->real < a->visible.n || j->prompt.n <= a->visible.n || (best && best->visible.n >= a->visible.n) ||
            memcmp(j->prompt.ids, a->visible.ids, a->visible.n * sizeof *a->visible.ids) != 0)
            continue;
        ds4_session *s = ds4_pool_session(S->pool, i);
        /* The slot must still hold exactly what the alias was made from. */
        if (ds4_session_len(s) != a->real || hash_ids(ds4_session_tokens(s), a->real) != a->hash) continue;
        if (a->real + (j->prompt.n - a->visible.n) >= S->cfg.ctx) continue;
        best = a;
        slot = i;
    }
    if (!best) return NULL;
    const int32_t *live = ds4_session_tokens(ds4_pool_session(S->pool, slot));
    for (size_t i = 0; i < best->real; i++) ds4_tokens_push(eff, live[i]);
    for (size_t i = best->visible.n; i < j->prompt.n; i++) ds4_tokens_push(eff, j->prompt.ids[i]);
    if (eff->n != best->real + (j->prompt.n - best->visible.n)) { ds4_tokens_free(eff); return NULL; }
    srv_trace(S, "think cache: prompt starts with the last turn as shown (%zu tokens) = slot %d (%zu tokens)\n",
              best->visible.n, slot, best->real);
    return best;
}

/* After a generation in a slot: remember its turn as the client will show
 * it, when it was a complete thinking turn without tools. */
static void alias_record(srv *S, job *j, ds4_session *s, int slot) {
    struct think_alias *a = &S->alias[slot];
    a->ok = false;
    const ds4_special_ids *sp = ds4_tokenizer_special(S->tok);
    if (j->rc != 0 || j->res.finish != DS4_FINISH_STOP || !j->gp.thinking || j->gp.tools || j->n_stop ||
        !j->prompt.n || j->prompt.ids[j->prompt.n - 1] != sp->think || !strstr(j->res.text, "</think>"))
        return;
    gen_output o;
    gen_output_parse(j, &o);
    a->visible.n = 0;
    /* <｜Assistant｜><think> becomes <｜Assistant｜></think> + the answer. */
    for (size_t i = 0; i + 1 < j->prompt.n; i++) ds4_tokens_push(&a->visible, j->prompt.ids[i]);
    ds4_tokens_push(&a->visible, sp->think_end);
    int rc = ds4_tokenize(S->tok, o.content, strlen(o.content), &a->visible);
    gen_output_free(&o);
    if (rc != 0) return;
    a->real = ds4_session_len(s);
    a->hash = hash_ids(ds4_session_tokens(s), a->real);
    a->ok = true;
}

/* A count of reused tokens in the evaluated prompt, in the client's view
 * of it: the live tokens beyond the shown turn (its reasoning) are not its. */
static size_t client_view(const struct think_alias *a, size_t cached) {
    if (!a) return cached;
    if (cached >= a->real) return cached - (a->real - a->visible.n);
    return cached < a->visible.n ? cached : a->visible.n;
}

/* Route to a session, checkpoint on the way, generate, and hand the
 * session back to the pool. */
static void generate_job(srv *S, job *j) {
    ds4_tokens eff;
    const struct think_alias *alias = alias_apply(S, j, &eff);
    const int32_t *ids = eff.n ? eff.ids : j->prompt.ids;
    size_t n = eff.n ? eff.n : j->prompt.n;
    ds4_pool_lease l;
    if (ds4_pool_acquire(S->pool, ids, n, &l, j->err, sizeof j->err) != 0) {
        j->rc = -1;
        j->res.finish = DS4_FINISH_ERROR;
        j->res.text = calloc(1, 1);
        ds4_tokens_free(&eff);
        return;
    }
    if (l.extra) {
        /* Tool calls replayed inside a restored checkpoint: their ids again. */
        if (toolmap_merge(S->tools, l.extra, l.extra_len) != 0) srv_trace(S, "checkpoint tool map unreadable\n");
        free(l.extra);
    }
    j->est_cached = client_view(alias, l.n_memory + l.n_disk);
    if (j->ops->start) j->ops->start(j);
    /* Checkpoints land on the stable part: not the generation prompt
     * (<｜Assistant｜> + <think> or </think>), which the next turn rewrites. */
    size_t stable = j->prompt.n >= 2 ? n - 2 : n;
    int pr = ds4_pool_prefill(S->pool, &l, ids, stable, gen_prefill, j, j->err, sizeof j->err);
    if (pr != 0) {
        j->rc = pr == 1 ? 0 : -1;
        j->res.finish = pr == 1 ? DS4_FINISH_CANCELLED : DS4_FINISH_ERROR;
        j->res.text = calloc(1, 1);
    } else {
        /* The driver writes its cache lines straight to the trace FILE: stdio
         * locks each call, and every line is one call. */
        j->lease = &l;
        j->rc = ds4_generate(l.session, ids, n, &j->gp, &j->res, j->err, sizeof j->err);
        j->lease = NULL;
        if (j->rc != 0) srv_trace(S, "generation failed: %s\n", j->err);
        /* What this request reused is what the lease brought; the tokens
         * ds4_pool_prefill evaluated to checkpoint them were computed now,
         * though the driver then finds them in the session. */
        size_t leased = l.n_memory + l.n_disk;
        j->res.n_cached = client_view(alias, j->res.n_cached < leased ? j->res.n_cached : leased);
    }
    j->res.n_prompt = j->prompt.n;
    ds4_pool_release(S->pool, &l, n);
    if (S->cfg.test_script) {
        /* Tests only (--test-script): every checkpoint of this request is on
         * disk before its answer completes, so a test may kill the server
         * right after it. A real server never waits for the writer here. */
        char ferr[256];
        if (ds4_pool_flush(S->pool, ferr, sizeof ferr) != 0) srv_trace(S, "checkpoint failed: %s\n", ferr);
    }
    ds4_tokens_free(&eff);
    alias_record(S, j, l.session, l.slot);
}

static void run(srv *S, job *j) {
    j->gp.engine = S->eng;
    j->gp.on_event = gen_event;
    j->gp.ud = j;
    j->gp.on_prefill = gen_prefill;
    j->gp.cancelled = gen_cancelled;
    j->gp.stop = (const char *const *)j->stop;
    j->gp.n_stop = j->n_stop;
    j->gp.forced = j->forced;
    j->gp.n_forced = j->n_forced;
    j->gp.trace = S->trace;
    j->gp.on_step = gen_step;
    if (job_cancelled(j)) {
        /* Left while queued (or the server is stopping): nothing to compute. */
        j->res.finish = DS4_FINISH_CANCELLED;
        j->res.text = calloc(1, 1);
        j->rc = 0;
        srv_trace(S, "job cancelled before it started\n");
    } else {
        generate_job(S, j);
    }
    pthread_mutex_lock(&S->qmu);
    bool stopping = S->stopping;
    pthread_mutex_unlock(&S->qmu);
    if (stopping && j->out && j->res.finish == DS4_FINISH_CANCELLED) {
        /* A stream cut by shutdown ends with the protocol's error event
         * rather than just stopping. */
        j->rc = -1;
        snprintf(j->err, sizeof j->err, "server shutting down");
    }
    if (j->ops->finish) j->ops->finish(j);
}

static void *worker_main(void *arg) {
    srv *S = arg;
    for (;;) {
        pthread_mutex_lock(&S->qmu);
        while (!S->q_len && !S->stopping) pthread_cond_wait(&S->qcv, &S->qmu);
        if (!S->q_len) { pthread_mutex_unlock(&S->qmu); break; }
        job *j = S->queue[S->q_head];
        S->q_head = (S->q_head + 1) % S->cfg.queue_max;
        S->q_len--;
        if (S->stopping) atomic_store(&j->cancel, true);
        S->running = j;
        pthread_mutex_unlock(&S->qmu);

        run(S, j);

        pthread_mutex_lock(&S->qmu);
        S->running = NULL;
        pthread_mutex_unlock(&S->qmu);
        if (j->out) sse_close(j->out);
        pthread_mutex_lock(&j->mu);
        j->done = true;
        pthread_cond_broadcast(&j->cv);
        pthread_mutex_unlock(&j->mu);
        job_unref(j);
    }
    return NULL;
}

int worker_start(srv *S) {
    S->queue = calloc((size_t)S->cfg.queue_max, sizeof *S->queue);
    S->alias = calloc((size_t)S->cfg.sessions, sizeof *S->alias);
    if (!S->queue || !S->alias) return -1;
    pthread_mutex_init(&S->qmu, NULL);
    pthread_cond_init(&S->qcv, NULL);
    return pthread_create(&S->worker, NULL, worker_main, S) == 0 ? 0 : -1;
}

void worker_stop(srv *S) {
    pthread_mutex_lock(&S->qmu);
    S->stopping = true;
    /* Queued jobs still pass through the worker (marked cancelled) so that
     * their waiting connection threads are released the usual way. */
    for (int i = 0; i < S->q_len; i++) atomic_store(&S->queue[(S->q_head + i) % S->cfg.queue_max]->cancel, true);
    if (S->running) atomic_store(&S->running->cancel, true);
    pthread_cond_broadcast(&S->qcv);
    pthread_mutex_unlock(&S->qmu);
    pthread_join(S->worker, NULL);
    free(S->queue);
    for (int i = 0; i < S->cfg.sessions; i++) ds4_tokens_free(&S->alias[i].visible);
    free(S->alias);
}
