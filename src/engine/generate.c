/* Generation driver: one loop shared by the CLI and the server.
 *
 *   prompt ──► reuse the session's longest exact prefix, prefill the rest
 *          ──► sample ─► detokenize (UTF-8 safe) ─► stop strings ─► DSML parser ─► events
 *                 ▲                                                        │
 *                 └──────────── eval the sampled token ◄───────────────────┘
 *
 * Stop strings are matched on the decoded text before it reaches the DSML
 * parser, so text after a stop string never produces an event. */
#include "ds4.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Growable byte buffer for the generated text. */
typedef struct { char *p; size_t n, cap; } buf;

static int buf_add(buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p; b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

typedef struct {
    const ds4_gen_params *p;
    bool cancelled;           /* the progress callback refused to go on */
} prefill_ctx;

/* Prefill progress: the caller's callback and the cancel poll both stop it. */
static bool prefill_progress(void *ud, size_t done, size_t total) {
    prefill_ctx *c = ud;
    const ds4_gen_params *p = c->p;
    if ((p->cancelled && p->cancelled(p->ud)) ||
        (p->on_prefill && !p->on_prefill(p->ud, done, total))) {
        c->cancelled = true;
        return false;
    }
    return true;
}

static void trace(const ds4_gen_params *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void trace(const ds4_gen_params *p, const char *fmt, ...) {
    if (!p->trace) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(p->trace, fmt, ap);
    va_end(ap);
    fflush(p->trace);
}

/* Bring the session to a prefix of the prompt: keep the longest common
 * prefix. The next-token logits must be those of the last prompt token, so
 * a whole-prompt match is only reused as is when the session ends exactly
 * there with logits (truncating re-evaluates the last kept token, which
 * restores them). Returns the number of tokens kept, or (size_t)-1 with err. */
static size_t reuse_prefix(ds4_session *s, const int32_t *prompt, size_t n_prompt,
                           const ds4_gen_params *p, char *err, size_t errlen) {
    size_t have = ds4_session_len(s);
    const int32_t *toks = ds4_session_tokens(s);
    size_t lcp = 0;
    while (lcp < have && lcp < n_prompt && toks[lcp] == prompt[lcp]) lcp++;
    size_t keep = lcp;
    if (keep == n_prompt && have == n_prompt && !ds4_session_logits(s)) keep = n_prompt - 1;
    if (keep == have) {
        trace(p, "cache: session %zu tokens, prompt %zu, reuse %zu\n", have, n_prompt, keep);
        return keep;
    }
    char terr[256] = "";
    if (ds4_session_truncate(s, keep, terr, sizeof terr) == 0) {
        trace(p, "cache: session %zu tokens, prompt %zu, common %zu, truncated to %zu\n",
              have, n_prompt, lcp, keep);
        return keep;
    }
    /* Not every KV layout can drop an arbitrary suffix (compressed rows):
     * start over rather than keep a state that is not the prompt's. */
    trace(p, "cache: session %zu tokens, prompt %zu, common %zu, truncate refused (%s), reset\n",
          have, n_prompt, lcp, terr);
    if (ds4_session_truncate(s, 0, err, errlen) != 0) return (size_t)-1;
    return 0;
}

typedef struct {
    ds4_session *s;
    const ds4_gen_params *p;
    ds4_dsml *dsml;
    buf text;                 /* every decoded byte (cut at a stop string) */
    size_t fed;               /* bytes of text already given to the parser */
    size_t hold;              /* max stop length - 1: bytes kept back */
} gen_state;

static void feed(gen_state *g, size_t upto) {
    if (upto > g->fed) ds4_dsml_feed(g->dsml, g->text.p + g->fed, upto - g->fed);
    g->fed = upto;
}

/* After new text arrived: true if a stop string matched (text cut before it
 * and everything before it fed). Otherwise feed all but the held-back tail,
 * which could still be the start of a stop string. A match cannot start
 * before `fed`: it would have been complete, and found, a step earlier. */
static bool check_stop(gen_state *g) {
    const ds4_gen_params *p = g->p;
    const char *best = NULL;
    for (int i = 0; i < p->n_stop; i++) {
        size_t sl = strlen(p->stop[i]);
        if (!sl) continue;
        const char *m = memmem(g->text.p + g->fed, g->text.n - g->fed, p->stop[i], sl);
        if (m && (!best || m < best)) best = m;
    }
    if (best) {
        size_t at = (size_t)(best - g->text.p);
        feed(g, at);
        g->text.n = at;
        g->text.p[at] = 0;
        return true;
    }
    size_t upto = g->text.n > g->hold ? g->text.n - g->hold : 0;
    /* Never split a UTF-8 sequence between two feeds. */
    while (upto > g->fed && upto < g->text.n && ((unsigned char)g->text.p[upto] & 0xC0) == 0x80) upto--;
    feed(g, upto);
    return false;
}

static const char *finish_name(ds4_finish f) {
    static const char *n[] = {"stop", "length", "tool_calls", "error", "cancelled"};
    return n[f];
}

int ds4_generate(ds4_session *s, const int32_t *prompt, size_t n_prompt, const ds4_gen_params *p,
                 ds4_gen_result *r, char *err, size_t errlen) {
    memset(r, 0, sizeof *r);
    r->finish = DS4_FINISH_ERROR;
    r->n_prompt = n_prompt;
    if (err && errlen) err[0] = 0;
    uint32_t ctx = ds4_session_ctx(s);
    const char *bad = !p->engine ? "generate: no engine" : n_prompt == 0 ? "empty prompt" : NULL;
    if (bad || n_prompt >= ctx) {
        if (bad) snprintf(err, errlen, "%s", bad);
        else snprintf(err, errlen, "prompt has %zu tokens, the context holds %u", n_prompt, ctx);
        r->text = calloc(1, 1);
        return -1;
    }
    const ds4_tokenizer *tok = ds4_engine_tokenizer(p->engine);
    const int32_t eos = ds4_tokenizer_special(tok)->eos;
    const uint32_t n_vocab = ds4_engine_n_vocab(p->engine);

    gen_state g = {.s = s, .p = p};
    for (int i = 0; i < p->n_stop; i++) {
        size_t sl = strlen(p->stop[i]);
        if (sl > g.hold + 1) g.hold = sl - 1;
    }
    ds4_sampler *sampler = ds4_sampler_new(&p->sampling, n_vocab);
    g.dsml = ds4_dsml_new(p->thinking, p->tools, p->on_event, p->ud);
    float *biased = p->n_forced ? malloc(sizeof(float) * n_vocab) : NULL;
    int rc = -1;
    if (!sampler || !g.dsml || (p->n_forced && !biased)) { snprintf(err, errlen, "out of memory"); goto done; }

    /* ---- prefill ---- */
    double t0 = now_s();
    size_t keep = reuse_prefix(s, prompt, n_prompt, p, err, errlen);
    if (keep == (size_t)-1) goto done;
    r->n_cached = keep;
    prefill_ctx pc = {.p = p};
    if (p->cancelled && p->cancelled(p->ud)) { r->finish = DS4_FINISH_CANCELLED; rc = 0; goto done; }
    if (keep < n_prompt &&
        ds4_session_eval(s, prompt + keep, n_prompt - keep, NULL, prefill_progress, &pc, err, errlen) != 0) {
        if (pc.cancelled) { r->finish = DS4_FINISH_CANCELLED; rc = 0; }
        goto done;
    }
    double t1 = now_s();
    r->prefill_s = t1 - t0;

    /* ---- decode ---- */
    ds4_detok dt = {0};
    char piece[1024];         /* detok needs 3 * (token bytes + 3) at most */
    ds4_finish fin = DS4_FINISH_LENGTH;
    bool cut = false;         /* ended by a stop string: drop what follows it */
    for (;;) {
        if (p->cancelled && p->cancelled(p->ud)) { fin = DS4_FINISH_CANCELLED; break; }
        if (p->max_tokens > 0 && r->n_gen >= (size_t)p->max_tokens) { fin = DS4_FINISH_LENGTH; break; }
        /* A full context ends here, before sampling: a token that cannot be
         * evaluated must not be shown or counted, or the session (the REPL's
         * transcript, the server's next turn) would lack what the user saw. */
        if (ds4_session_len(s) >= ctx) { fin = DS4_FINISH_LENGTH; break; }
        const float *logits;
        bool greedy = p->sampling.temperature <= 0 || ds4_dsml_structural(g.dsml);
        int32_t t = -1;
        if (greedy && r->n_gen >= p->n_forced) {
            /* The backend's argmax: the logits stay where they were
             * computed (on a GPU, in device memory). */
            t = ds4_session_argmax(s);
        } else if ((logits = ds4_session_logits(s))) {
            if (r->n_gen < p->n_forced) {
                /* Far above any real logit but finite, so softmax stays exact. */
                float mx = -INFINITY;
                for (uint32_t i = 0; i < n_vocab; i++) if (logits[i] > mx) mx = logits[i];
                memcpy(biased, logits, sizeof(float) * n_vocab);
                biased[p->forced[r->n_gen]] = mx + 1e4f;
                logits = biased;
            }
            t = ds4_sample(sampler, logits, greedy);
        }
        if (t < 0) { snprintf(err, errlen, "generate: the session has no logits"); goto done; }
        r->n_gen++;
        if (t == eos) { fin = DS4_FINISH_STOP; break; }
        size_t n = ds4_detok_push(&dt, tok, t, piece, sizeof piece);
        if (n > sizeof piece) n = sizeof piece;   /* no real token is over 300 bytes */
        if (buf_add(&g.text, piece, n) != 0) { snprintf(err, errlen, "out of memory"); goto done; }
        if (check_stop(&g)) { fin = DS4_FINISH_STOP; cut = true; break; }
        if (ds4_dsml_calls_done(g.dsml)) { fin = DS4_FINISH_TOOL_CALLS; break; }
        if (ds4_session_eval(s, &t, 1, NULL, NULL, NULL, err, errlen) != 0) goto done;
        if (p->on_step) p->on_step(p->ud);
    }
    if (!cut) {
        /* Not cut by a stop string: the held-back tail and any incomplete
         * UTF-8 sequence are real output. */
        size_t n = ds4_detok_flush(&dt, piece, sizeof piece);
        if (buf_add(&g.text, piece, n < sizeof piece ? n : sizeof piece) != 0) { snprintf(err, errlen, "out of memory"); goto done; }
        feed(&g, g.text.n);
    }
    ds4_dsml_finish(g.dsml);
    /* Streamed tool events cannot be taken back: a block that never closed,
     * or was abandoned after its header went out, fails the generation. */
    if (fin != DS4_FINISH_CANCELLED && (ds4_dsml_unterminated(g.dsml) || ds4_dsml_failed(g.dsml))) fin = DS4_FINISH_ERROR;
    else if (fin == DS4_FINISH_STOP && ds4_dsml_calls_done(g.dsml)) fin = DS4_FINISH_TOOL_CALLS;
    r->finish = fin;
    r->gen_s = now_s() - t1;
    if (fin == DS4_FINISH_ERROR) snprintf(err, errlen, "unterminated tool call");
    trace(p, "finish: %s, %zu prompt (%zu cached), %zu generated, prefill %.3fs, gen %.3fs\n",
          finish_name(fin), n_prompt, r->n_cached, r->n_gen, r->prefill_s, r->gen_s);
    rc = 0;
done:
    r->text = g.text.p ? g.text.p : calloc(1, 1);
    r->len = g.text.n;
    ds4_dsml_free(g.dsml);
    ds4_sampler_free(sampler);
    free(biased);
    return rc;
}

void ds4_gen_result_free(ds4_gen_result *r) {
    free(r->text);
    r->text = NULL;
    r->len = 0;
}
