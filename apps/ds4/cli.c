/* ds4 CLI: one-shot generation and the diagnostics modes. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <utf8proc.h>

#include "cli.h"

ds4_engine *cli_open_engine(const cli_opts *o)
{
    ds4_engine_params p = {
        .model_path = o->model, .mtp_path = o->mtp, .backend = o->backend,
        .n_threads = o->threads, .verbose = o->verbose,
    };
    char err[512];
    ds4_engine *e = ds4_engine_open(&p, err, sizeof err);
    if (!e) fprintf(stderr, "ds4: %s\n", err);
    else if (o->verbose) fprintf(stderr, "ds4: backend %s\n", ds4_engine_backend_name(e));
    return e;
}

char *cli_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "ds4: cannot open %s: %s\n", path, strerror(errno)); return NULL; }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            char *nb = realloc(buf, cap * 2 + 1);
            if (!nb) { free(buf); buf = NULL; break; }
            buf = nb;
            cap *= 2;
        }
    }
    bool bad = ferror(f) || !buf;
    fclose(f);
    if (bad) { fprintf(stderr, "ds4: cannot read %s\n", path); free(buf); return NULL; }
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

int cli_chat_tokens(const ds4_tokenizer *tok, const char *system, const char *user, ds4_think think,
                    uint32_t ctx, ds4_tokens *out)
{
    ds4_chat_msg msgs[2];
    int n = 0;
    if (system) msgs[n++] = (ds4_chat_msg){ .role = DS4_ROLE_SYSTEM, .content = system };
    msgs[n++] = (ds4_chat_msg){ .role = DS4_ROLE_USER, .content = user };
    ds4_chat chat = { .msgs = msgs, .n_msgs = n, .think = think, .ctx = ctx, .add_generation_prompt = true };
    ds4_rendered r = {0};
    char err[256];
    if (ds4_chat_render(&chat, &r, err, sizeof err)) {
        fprintf(stderr, "ds4: cannot render the prompt: %s\n", err);
        return -1;
    }
    int rc = ds4_tokenize_rendered(tok, &r, out);
    ds4_rendered_free(&r);
    if (rc) fprintf(stderr, "ds4: cannot tokenize the prompt\n");
    return rc;
}

/* ---- streaming output -------------------------------------------------- */

void cli_print_event(void *ud, const ds4_event *ev)
{
    cli_printer *p = ud;
    bool reasoning = ev->kind == DS4_EV_REASONING;
    if (reasoning != p->in_reasoning) {
        if (reasoning) fputs(p->tty ? "\033[2m" : "<think>", stdout);
        else fputs(p->tty ? "\033[0m\n" : "</think>", stdout);
        p->in_reasoning = reasoning;
    }
    switch (ev->kind) {
    case DS4_EV_REASONING:
    case DS4_EV_CONTENT:
        fwrite(ev->text, 1, ev->len, stdout);
        p->any_content |= ev->kind == DS4_EV_CONTENT;
        break;
    case DS4_EV_TOOL_BEGIN: printf("\n[tool call %d: %s] ", ev->index, ev->name ? ev->name : "?"); break;
    case DS4_EV_TOOL_ARGS: fwrite(ev->text, 1, ev->len, stdout); break;
    case DS4_EV_TOOL_END: putchar('\n'); break;
    }
    fflush(stdout);
}

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Erase a drawn progress line (it has no newline: the next output would follow it). */
static void progress_erase(cli_printer *p)
{
    if (p->progress_shown) fputs("\r\033[K", stderr);
    p->progress_shown = false;
}

bool cli_prefill_progress(void *ud, size_t done, size_t total)
{
    cli_printer *p = ud;
    double t = mono_s();
    /* The rate counts from the first finished batch: its start is unknown. */
    if (!p->t0) { p->t0 = p->last = t; p->done0 = done; }
    if (!isatty(STDERR_FILENO)) return true;
    if (done >= total) {
        progress_erase(p);
        p->t0 = 0;
        return true;
    }
    /* Short prefills stay silent; a long one redraws at most 4 times a second. */
    if (t - p->t0 < 0.5 || (p->progress_shown && t - p->last < 0.25)) return true;
    fprintf(stderr, "\r\033[Kreading %zu / %zu tokens (%.0f tok/s)", done, total,
            (double)(done - p->done0) / (t - p->t0));
    fflush(stderr);
    p->progress_shown = true;
    p->last = t;
    return true;
}

void cli_print_end(cli_printer *p)
{
    progress_erase(p);   /* a prefill cut short (Ctrl+C, error) */
    if (p->in_reasoning) fputs(p->tty ? "\033[0m" : "</think>", stdout);
    p->in_reasoning = false;
    putchar('\n');
    fflush(stdout);
}

const char *cli_finish_name(ds4_finish f)
{
    switch (f) {
    case DS4_FINISH_STOP: return "stop";
    case DS4_FINISH_LENGTH: return "length";
    case DS4_FINISH_TOOL_CALLS: return "tool_calls";
    case DS4_FINISH_ERROR: return "error";
    case DS4_FINISH_CANCELLED: return "cancelled";
    }
    return "?";
}

void cli_print_stats(const ds4_gen_result *r)
{
    size_t prefilled = r->n_prompt - r->n_cached;
    fprintf(stderr, "[prompt %zu tok (%zu cached), generated %zu tok, prefill %.1f tok/s, gen %.1f tok/s, %s]\n",
            r->n_prompt, r->n_cached, r->n_gen,
            r->prefill_s > 0 ? prefilled / r->prefill_s : 0.0,
            r->gen_s > 0 ? r->n_gen / r->gen_s : 0.0, cli_finish_name(r->finish));
}

/* ---- modes ------------------------------------------------------------- */

int cli_inspect(const cli_opts *o)
{
    char err[512];
    if (ds4_inspect_file(o->model, o->ctx, stdout, err, sizeof err)) {
        fprintf(stderr, "ds4: %s\n", err);
        return 1;
    }
    return 0;
}

static char *prompt_text(const cli_opts *o)
{
    if (o->prompt_file) return cli_read_file(o->prompt_file, NULL);
    if (o->prompt) return strdup(o->prompt);
    fprintf(stderr, "ds4: this mode needs -p TEXT or --prompt-file F\n");
    return NULL;
}

/* Printable piece: bytes as they are when printable UTF-8/ASCII, else \xNN. */
static void print_piece(const char *s, size_t n)
{
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') printf("\\%c", ch);
        else if (ch == '\n') fputs("\\n", stdout);
        else if (ch == '\t') fputs("\\t", stdout);
        else if (ch == '\r') fputs("\\r", stdout);
        else if (ch < 0x20 || ch == 0x7f) printf("\\x%02x", ch);
        else putchar(ch);
    }
    putchar('"');
}

int cli_dump_tokens(const cli_opts *o)
{
    char *text = prompt_text(o);
    if (!text) return 2;
    char err[512];
    ds4_tokenizer *tok = ds4_tokenizer_open(o->model, err, sizeof err);
    if (!tok) { fprintf(stderr, "ds4: %s\n", err); free(text); return 1; }
    ds4_tokens ids = {0};
    int rc = ds4_tokenize_special(tok, text, strlen(text), &ids);
    if (rc) fprintf(stderr, "ds4: tokenization failed\n");
    for (size_t i = 0; !rc && i < ids.n; i++) {
        char buf[256];
        size_t n = ds4_token_bytes(tok, ids.ids[i], buf, sizeof buf);
        printf("%d\t", ids.ids[i]);
        print_piece(buf, n < sizeof buf ? n : sizeof buf);
        putchar('\n');
    }
    if (!rc) fprintf(stderr, "%zu tokens\n", ids.n);
    ds4_tokens_free(&ids);
    ds4_tokenizer_free(tok);
    free(text);
    return rc ? 1 : 0;
}

/* Token ids from "1,2,3" or a file of whitespace/comma separated ids. */
static int parse_token_list(const char *s, ds4_tokens *out)
{
    while (*s) {
        while (*s == ',' || *s == ' ' || *s == '\n' || *s == '\t' || *s == '\r') s++;
        if (!*s) break;
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (errno || end == s || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "ds4: bad token id near '%.20s'\n", s);
            return -1;
        }
        ds4_tokens_push(out, (int32_t)v);
        s = end;
    }
    if (!out->n) { fprintf(stderr, "ds4: no token ids given\n"); return -1; }
    return 0;
}

int cli_dump_logits(const cli_opts *o)
{
    ds4_tokens ids = {0};
    char *list = o->tokens_file ? cli_read_file(o->tokens_file, NULL) : strdup(o->tokens);
    if (!list || parse_token_list(list, &ids)) { free(list); ds4_tokens_free(&ids); return 2; }
    free(list);
    ds4_engine *e = cli_open_engine(o);
    if (!e) { ds4_tokens_free(&ids); return 1; }
    int status = 1;
    uint32_t nv = ds4_engine_n_vocab(e);
    for (size_t i = 0; i < ids.n; i++) {
        if ((uint32_t)ids.ids[i] >= nv) {
            fprintf(stderr, "ds4: token id %d at position %zu is outside the vocabulary (%u)\n", ids.ids[i], i, nv);
            goto done;
        }
    }
    char err[512];
    uint32_t ctx = ids.n + 1 > o->ctx ? (uint32_t)ids.n + 1 : o->ctx;
    ds4_session *s = ds4_session_new(e, ctx, err, sizeof err);
    if (!s) { fprintf(stderr, "ds4: %s\n", err); goto done; }
    float *logits = malloc(ids.n * (size_t)nv * sizeof *logits);
    if (!logits) { fprintf(stderr, "ds4: out of memory for %zu x %u logits\n", ids.n, nv); ds4_session_free(s); goto done; }
    if (ds4_session_eval(s, ids.ids, ids.n, logits, NULL, NULL, err, sizeof err)) {
        fprintf(stderr, "ds4: %s\n", err);
    } else {
        FILE *f = fopen(o->dump_logits, "wb");
        if (!f || fwrite(logits, sizeof *logits, ids.n * (size_t)nv, f) != ids.n * (size_t)nv || fclose(f)) {
            fprintf(stderr, "ds4: cannot write %s: %s\n", o->dump_logits, strerror(errno));
        } else {
            fprintf(stderr, "ds4: wrote %zu x %u f32 logits to %s\n", ids.n, nv, o->dump_logits);
            status = 0;
        }
    }
    free(logits);
    ds4_session_free(s);
done:
    ds4_tokens_free(&ids);
    ds4_engine_close(e);
    return status;
}

/* A token as JSON: "text" is always valid UTF-8 (a token can end inside a
 * multi-byte character; such bytes show as U+FFFD there), "bytes" the exact
 * bytes, so no information is lost and the file always parses. */
static cJSON *json_token(const ds4_tokenizer *tok, int32_t id, float logprob)
{
    char buf[256], text[3 * sizeof buf + 1];
    size_t n = ds4_token_bytes(tok, id, buf, sizeof buf);
    if (n > sizeof buf) n = sizeof buf;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)buf + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k > 0 && cp != 0) { memcpy(text + o, buf + i, (size_t)k); o += (size_t)k; i += (size_t)k; }
        else { memcpy(text + o, "\xEF\xBF\xBD", 3); o += 3; i++; }
    }
    text[o] = 0;
    cJSON *t = cJSON_CreateObject();
    cJSON_AddNumberToObject(t, "id", id);
    cJSON_AddStringToObject(t, "text", text);
    cJSON *bytes = cJSON_AddArrayToObject(t, "bytes");
    for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(bytes, cJSON_CreateNumber((unsigned char)buf[i]));
    cJSON_AddNumberToObject(t, "logprob", logprob);
    return t;
}

int cli_dump_logprobs(const cli_opts *o)
{
    char *text = prompt_text(o);
    if (!text) return 2;
    ds4_engine *e = cli_open_engine(o);
    if (!e) { free(text); return 1; }
    const ds4_tokenizer *tok = ds4_engine_tokenizer(e);
    ds4_tokens prompt = {0};
    int status = 1;
    char err[512];
    ds4_session *s = NULL;
    cJSON *root = NULL;
    int32_t *ids = NULL;
    float *lps = NULL;
    if (cli_chat_tokens(tok, o->system, text, o->think, o->ctx, &prompt)) goto done;
    s = ds4_session_new(e, o->ctx, err, sizeof err);
    if (!s) { fprintf(stderr, "ds4: %s\n", err); goto done; }
    if (ds4_session_eval(s, prompt.ids, prompt.n, NULL, NULL, NULL, err, sizeof err)) {
        fprintf(stderr, "ds4: %s\n", err);
        goto done;
    }
    int steps = o->max_tokens >= 0 ? o->max_tokens : 16;
    int k = o->logprobs_k;
    ids = malloc(k * sizeof *ids);
    lps = malloc(k * sizeof *lps);
    root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "prompt_tokens", (double)prompt.n);
    cJSON *arr = cJSON_AddArrayToObject(root, "steps");
    uint32_t nv = ds4_engine_n_vocab(e);
    for (int i = 0; i < steps && ds4_session_len(s) < o->ctx; i++) {
        const float *logits = ds4_session_logits(s);
        int got = ds4_top_logprobs(logits, nv, k, ids, lps);
        /* Greedy: the argmax is the first entry (lowest id among equals). */
        int32_t pick = ids[0];
        cJSON *step = json_token(tok, pick, lps[0]);
        cJSON *top = cJSON_AddArrayToObject(step, "top");
        for (int j = 0; j < got; j++) cJSON_AddItemToArray(top, json_token(tok, ids[j], lps[j]));
        cJSON_AddItemToArray(arr, step);
        if (pick == ds4_tokenizer_special(tok)->eos) break;
        if (ds4_session_eval(s, &pick, 1, NULL, NULL, NULL, err, sizeof err)) {
            fprintf(stderr, "ds4: %s\n", err);
            goto done;
        }
    }
    char *js = cJSON_Print(root);
    FILE *f = fopen(o->dump_logprobs, "w");
    if (!js || !f || fputs(js, f) < 0 || fputc('\n', f) < 0 || fclose(f)) {
        fprintf(stderr, "ds4: cannot write %s: %s\n", o->dump_logprobs, strerror(errno));
    } else {
        status = 0;
    }
    free(js);
done:
    cJSON_Delete(root);
    free(ids);
    free(lps);
    ds4_tokens_free(&prompt);
    if (s) ds4_session_free(s);
    ds4_engine_close(e);
    free(text);
    return status;
}

int cli_oneshot(const cli_opts *o)
{
    char *text = prompt_text(o);
    if (!text) return 2;
    ds4_engine *e = cli_open_engine(o);
    if (!e) { free(text); return 1; }
    int status = 1;
    char err[512];
    ds4_tokens prompt = {0};
    ds4_session *s = NULL;
    if (cli_chat_tokens(ds4_engine_tokenizer(e), o->system, text, o->think, o->ctx, &prompt)) goto done;
    if (prompt.n >= o->ctx) {
        fprintf(stderr, "ds4: the prompt is %zu tokens; it does not fit --ctx %u\n", prompt.n, o->ctx);
        goto done;
    }
    s = ds4_session_new(e, o->ctx, err, sizeof err);
    if (!s) { fprintf(stderr, "ds4: %s\n", err); goto done; }
    cli_printer pr = { .tty = isatty(STDOUT_FILENO) };
    ds4_gen_params gp = {
        .engine = e, .sampling = o->sampling, .max_tokens = o->max_tokens,
        .thinking = o->think != DS4_THINK_NONE, .on_event = cli_print_event, .ud = &pr,
        .on_prefill = cli_prefill_progress,
    };
    ds4_gen_result r = {0};
    if (ds4_generate(s, prompt.ids, prompt.n, &gp, &r, err, sizeof err)) {
        cli_print_end(&pr);
        fprintf(stderr, "ds4: %s\n", err);
    } else {
        cli_print_end(&pr);
        cli_print_stats(&r);
        status = 0;
    }
    ds4_gen_result_free(&r);
done:
    ds4_tokens_free(&prompt);
    if (s) ds4_session_free(s);
    ds4_engine_close(e);
    free(text);
    return status;
}
