/* ds4 REPL: a multi-turn chat that keeps one live session.
 *
 * The session's token list IS the transcript: each turn appends only the new
 * user turn (<｜User｜>…<｜Assistant｜><think>|</think>) to what the session
 * already holds, so only that suffix is prefilled. Generated reasoning stays
 * in the transcript (as antirez/ds4's CLI does; prompt.md §2.6), which is
 * what keeps every turn a pure extension of the KV state. A reply that did not
 * end in EOS (Ctrl+C, length) is closed with EOS so the next turn starts from
 * a well-formed transcript. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <editline/readline.h>

#include "cli.h"

static volatile sig_atomic_t g_interrupt;

static void on_sigint(int sig)
{
    (void)sig;
    g_interrupt = 1;
}

static bool gen_cancelled(void *ud)
{
    (void)ud;
    return g_interrupt != 0;
}

static bool prefill_progress(void *ud, size_t done, size_t total)
{
    return cli_prefill_progress(ud, done, total) && g_interrupt == 0;
}

typedef struct {
    const cli_opts *o;
    ds4_engine *e;
    ds4_session *s;
    uint32_t ctx;
    ds4_think think;
    char *system;
} repl;

static const char *think_name(ds4_think t)
{
    return t == DS4_THINK_NONE ? "nothink" : t == DS4_THINK_MAX ? "think-max" : "think";
}

static void repl_help(void)
{
    puts("/help          this list\n"
         "/think         reason before answering (default)\n"
         "/think-max     maximum reasoning effort (needs /ctx >= 393216, else /think;\n"
         "               its prefix goes at the start of a conversation: takes effect after /system)\n"
         "/nothink       answer directly\n"
         "/ctx N         new context size (the conversation is kept when it fits)\n"
         "/read FILE     send the file's contents as your next message\n"
         "/system TEXT   start a new conversation with this system prompt\n"
         "/save FILE     save the conversation and its KV state\n"
         "/load FILE     restore a conversation saved with /save\n"
         "/quit          leave (also Ctrl+D)\n"
         "Ctrl+C stops a reply and keeps the conversation.");
}

/* Tokens of the next user turn: a whole prompt for the first turn, otherwise
 * the same rendering minus its BOS (the transcript already has it). */
static int turn_tokens(repl *r, const char *user, ds4_tokens *out)
{
    const ds4_tokenizer *tok = ds4_engine_tokenizer(r->e);
    bool first = ds4_session_len(r->s) == 0;
    ds4_tokens t = {0};
    if (cli_chat_tokens(tok, first ? r->system : NULL, user, r->think, r->ctx, &t)) return -1;
    size_t skip = (!first && t.n && t.ids[0] == ds4_tokenizer_special(tok)->bos) ? 1 : 0;
    const int32_t *have = ds4_session_tokens(r->s);
    size_t n_have = ds4_session_len(r->s);
    for (size_t i = 0; i < n_have; i++) ds4_tokens_push(out, have[i]);
    for (size_t i = skip; i < t.n; i++) ds4_tokens_push(out, t.ids[i]);
    ds4_tokens_free(&t);
    return 0;
}

/* Back to the first n tokens of the conversation: an exact truncate when the
 * engine can (short rewinds), else the kept tokens are read in again. */
static void rollback(repl *r, size_t n)
{
    char err[512];
    if (!ds4_session_truncate(r->s, n, err, sizeof err)) {
        puts("(turn dropped; conversation unchanged)");
        return;
    }
    ds4_tokens keep = {0};
    for (size_t i = 0; i < n; i++) ds4_tokens_push(&keep, ds4_session_tokens(r->s)[i]);
    ds4_session *s = ds4_session_new(r->e, r->ctx, err, sizeof err);
    if (s && n) fprintf(stderr, "(turn dropped; re-reading the %zu-token conversation)\n", n);
    if (s && n && ds4_session_eval(s, keep.ids, keep.n, NULL, NULL, NULL, err, sizeof err)) {
        ds4_session_free(s);
        s = NULL;
    }
    if (!s) fprintf(stderr, "error: cannot restore the conversation (%s); starting a new one\n", err);
    else { ds4_session_free(r->s); r->s = s; }
    if (!s) { ds4_session_truncate(r->s, 0, err, sizeof err); }
    ds4_tokens_free(&keep);
}

static void repl_turn(repl *r, const char *user)
{
    ds4_tokens prompt = {0};
    if (turn_tokens(r, user, &prompt)) return;
    if (prompt.n >= r->ctx) {
        fprintf(stderr, "the conversation (%zu tokens) no longer fits the context (%u): use /ctx N or /system to restart\n",
                prompt.n, r->ctx);
        ds4_tokens_free(&prompt);
        return;
    }
    const ds4_tokenizer *tok = ds4_engine_tokenizer(r->e);
    cli_printer pr = { .tty = isatty(STDOUT_FILENO) };
    ds4_gen_params gp = {
        .engine = r->e, .sampling = r->o->sampling, .max_tokens = r->o->max_tokens,
        .thinking = r->think != DS4_THINK_NONE, .on_event = cli_print_event, .ud = &pr,
        .on_prefill = prefill_progress, .cancelled = gen_cancelled,
    };
    ds4_gen_result res = {0};
    char err[512];
    size_t n_before = ds4_session_len(r->s);
    g_interrupt = 0;
    int rc = ds4_generate(r->s, prompt.ids, prompt.n, &gp, &res, err, sizeof err);
    cli_print_end(&pr);
    if (rc) fprintf(stderr, "error: %s\n", err);
    else cli_print_stats(&res);
    ds4_gen_result_free(&res);
    g_interrupt = 0;
    /* Stopped before the user turn was fully read (Ctrl+C during prefill, or
     * an error): the half-read turn must not stay in the conversation. */
    if (ds4_session_len(r->s) < prompt.n) {
        rollback(r, n_before);
        ds4_tokens_free(&prompt);
        return;
    }
    ds4_tokens_free(&prompt);
    /* Close an unfinished reply so the transcript stays well-formed. */
    size_t n = ds4_session_len(r->s);
    int32_t eos = ds4_tokenizer_special(tok)->eos;
    if (n && ds4_session_tokens(r->s)[n - 1] != eos && n < r->ctx) {
        if (ds4_session_eval(r->s, &eos, 1, NULL, NULL, NULL, err, sizeof err))
            fprintf(stderr, "error: %s\n", err);
    }
}

static int new_session(repl *r, uint32_t ctx, bool keep)
{
    char err[512];
    ds4_session *s = ds4_session_new(r->e, ctx, err, sizeof err);
    if (!s) { fprintf(stderr, "error: %s\n", err); return -1; }
    if (keep && r->s && ds4_session_len(r->s)) {
        size_t n = ds4_session_len(r->s);
        if (n >= ctx) {
            fprintf(stderr, "error: the conversation has %zu tokens; it does not fit %u\n", n, ctx);
            ds4_session_free(s);
            return -1;
        }
        if (ds4_session_eval(s, ds4_session_tokens(r->s), n, NULL, NULL, NULL, err, sizeof err)) {
            fprintf(stderr, "error: %s\n", err);
            ds4_session_free(s);
            return -1;
        }
    }
    if (r->s) ds4_session_free(r->s);
    r->s = s;
    r->ctx = ctx;
    return 0;
}

static void save_session(repl *r, const char *path)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    if (ds4_session_save(r->s, &buf, &len)) { fprintf(stderr, "error: cannot snapshot the session\n"); return; }
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, len, f) != len || fclose(f)) fprintf(stderr, "error: cannot write %s: %s\n", path, strerror(errno));
    else printf("saved %zu tokens (%zu bytes) to %s\n", ds4_session_len(r->s), len, path);
    free(buf);
}

static void load_session(repl *r, const char *path)
{
    size_t len;
    char *buf = cli_read_file(path, &len);
    if (!buf) return;
    char err[512];
    if (ds4_session_load(r->s, (const uint8_t *)buf, len, err, sizeof err)) fprintf(stderr, "error: %s\n", err);
    else printf("loaded %zu tokens from %s\n", ds4_session_len(r->s), path);
    free(buf);
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t') s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r')) s[--n] = 0;
    return s;
}

/* Returns false on /quit. */
static bool repl_command(repl *r, char *line)
{
    char *cmd = line, *arg = strchr(line, ' ');
    if (arg) { *arg++ = 0; arg = trim(arg); } else arg = "";
    if (!strcmp(cmd, "/quit") || !strcmp(cmd, "/exit")) return false;
    if (!strcmp(cmd, "/help")) repl_help();
    else if (!strcmp(cmd, "/think")) r->think = DS4_THINK_HIGH;
    else if (!strcmp(cmd, "/nothink")) r->think = DS4_THINK_NONE;
    else if (!strcmp(cmd, "/think-max")) {
        r->think = DS4_THINK_MAX;
        if (r->ctx < 393216) puts("note: think-max needs /ctx >= 393216; running as /think");
    } else if (!strcmp(cmd, "/ctx")) {
        char *end;
        long v = strtol(arg, &end, 10);
        if (!*arg || *end || v < 16 || v > (1L << 20)) fprintf(stderr, "usage: /ctx N (16 .. 1048576)\n");
        else if (!new_session(r, (uint32_t)v, true)) printf("context %u\n", r->ctx);
    } else if (!strcmp(cmd, "/system")) {
        free(r->system);
        r->system = *arg ? strdup(arg) : NULL;
        if (!new_session(r, r->ctx, false)) puts("new conversation");
    } else if (!strcmp(cmd, "/read")) {
        if (!*arg) { fprintf(stderr, "usage: /read FILE\n"); return true; }
        char *text = cli_read_file(arg, NULL);
        if (text) { repl_turn(r, text); free(text); }
    } else if (!strcmp(cmd, "/save")) {
        if (*arg) save_session(r, arg); else fprintf(stderr, "usage: /save FILE\n");
    } else if (!strcmp(cmd, "/load")) {
        if (*arg) load_session(r, arg); else fprintf(stderr, "usage: /load FILE\n");
    } else {
        fprintf(stderr, "unknown command %s (try /help)\n", cmd);
    }
    return true;
}

int cli_repl(const cli_opts *o)
{
    repl r = { .o = o, .think = o->think, .system = o->system ? strdup(o->system) : NULL };
    r.e = cli_open_engine(o);
    if (!r.e) { free(r.system); return 1; }
    if (new_session(&r, o->ctx, false)) { ds4_engine_close(r.e); free(r.system); return 1; }

    /* No SA_RESTART: Ctrl+C must interrupt a blocked read at the prompt too. */
    struct sigaction sa = { .sa_handler = on_sigint };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);

    char hist[4096] = "";
    const char *home = getenv("HOME");
    if (home) { snprintf(hist, sizeof hist, "%s/.ds4_history", home); read_history(hist); }
    printf("ds4 chat — %s backend, context %u, mode %s. /help for commands, Ctrl+D to quit.\n",
           ds4_engine_backend_name(r.e), r.ctx, think_name(r.think));
    for (;;) {
        g_interrupt = 0;
        char *line = readline("> ");
        if (!line) {
            if (g_interrupt) { putchar('\n'); continue; }   /* Ctrl+C at the prompt */
            putchar('\n');
            break;                                          /* Ctrl+D */
        }
        char *t = trim(line);
        if (*t) add_history(t);
        bool go = true;
        if (*t == '/') go = repl_command(&r, t);
        else if (*t) repl_turn(&r, t);
        free(line);
        if (!go) break;
    }
    if (*hist) write_history(hist);
    ds4_session_free(r.s);
    ds4_engine_close(r.e);
    free(r.system);
    return 0;
}
