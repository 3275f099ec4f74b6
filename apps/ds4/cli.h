/* Shared state of the ds4 CLI's modes (main.c parses, the rest run). */
#ifndef DS4_CLI_H
#define DS4_CLI_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ds4.h"

typedef struct {
    const char *model, *mtp;
    uint32_t ctx;
    ds4_backend_kind backend;
    int threads;
    bool verbose;
    const char *prompt, *prompt_file, *system;
    ds4_think think;
    int max_tokens;             /* -1: until EOS or context full */
    ds4_sampling sampling;
    bool inspect, dump_tokens;
    const char *tokens, *tokens_file, *dump_logits, *dump_logprobs;
    int logprobs_k;
} cli_opts;

/* Modes; each returns the process exit status. */
int cli_inspect(const cli_opts *o);
int cli_dump_tokens(const cli_opts *o);
int cli_dump_logits(const cli_opts *o);
int cli_dump_logprobs(const cli_opts *o);
int cli_oneshot(const cli_opts *o);
int cli_repl(const cli_opts *o);

/* Helpers shared by the modes (cli.c). */
ds4_engine *cli_open_engine(const cli_opts *o);
/* Whole file into a NUL-terminated buffer; NULL with a message on failure. */
char *cli_read_file(const char *path, size_t *len);
/* Render system + one user message (+ generation prompt) and tokenize. */
int cli_chat_tokens(const ds4_tokenizer *tok, const char *system, const char *user, ds4_think think,
                    uint32_t ctx, ds4_tokens *out);

/* Streams generation events to stdout: reasoning dimmed on a terminal (or
 * wrapped in <think>…</think> when piped), content plain, tool calls marked. */
typedef struct {
    bool tty, in_reasoning, any_content;
    double t0, last;            /* prefill progress: first batch done, last line drawn */
    size_t done0;
    bool progress_shown;
} cli_printer;
void cli_print_event(void *ud, const ds4_event *ev);
/* ds4_gen_params.on_prefill with ud = the printer: on a terminal (stderr),
 * a prefill that runs past half a second shows "reading N / M tokens" on
 * one line, erased when it ends. Always returns true (no cancel). */
bool cli_prefill_progress(void *ud, size_t done, size_t total);
void cli_print_end(cli_printer *p);
/* "prompt N tok (cached C), gen M tok, prefill X tok/s, gen Y tok/s, finish" to stderr. */
void cli_print_stats(const ds4_gen_result *r);
const char *cli_finish_name(ds4_finish f);
#endif
