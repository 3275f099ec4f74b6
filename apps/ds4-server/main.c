/* ds4-server: OpenAI- and Anthropic-compatible HTTP server for DeepSeek V4
 * Flash. Options, startup, signal handling and an orderly shutdown. */
#include "server.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void usage(FILE *f) {
    fprintf(f,
"usage: ds4-server -m MODEL.gguf [options]\n"
"\n"
"Serves one model over HTTP:\n"
"  POST /v1/chat/completions  /v1/completions  /v1/responses  (OpenAI)\n"
"  POST /v1/messages  /v1/messages/count_tokens             (Anthropic)\n"
"  GET  /v1/models  /v1/models/{id}  /health\n"
"(the /v1 prefix is optional). One request is generated at a time; the\n"
"others wait in a bounded queue. A conversation's next request reuses the\n"
"KV state of its longest common token prefix (docs/clients.md).\n"
"\n"
"options:\n"
"  -m, --model FILE     GGUF model (required)\n"
"  --host ADDR          numeric IPv4/IPv6 address to listen on (default 127.0.0.1)\n"
"  --port N             TCP port (default 8000)\n"
"  --ctx N              context size in tokens (default 32768, at most the model's)\n"
"  --sessions N         resident KV sessions, one per concurrent conversation; a\n"
"                       request goes to the session holding its longest prefix.\n"
"                       Default: as many as fit in 80%% of the free memory of the\n"
"                       backend's device (GPU memory after the weights; CPU:\n"
"                       available RAM less the weights), 1 to 8; the choice and\n"
"                       its numbers are logged. A larger N than fits is refused.\n"
"  --kv-disk-dir DIR    keep KV checkpoints of long prompts on disk, so restarts,\n"
"                       evicted conversations and rewinds resume without a full\n"
"                       prefill (docs/kv-cache.md); each checkpoint also keeps the\n"
"                       tool-call ids its text replays\n"
"  --kv-disk-space MB   disk budget for those checkpoints (default 16384)\n"
"  --kv-align N         checkpoint granularity in tokens; shorter prompts are\n"
"                       never checkpointed (default 2048)\n"
"  --threads N          CPU threads (default: DS4_THREADS or all cores)\n"
"  --cpu | --cuda       backend (default: CUDA when built with it and a GPU exists)\n"
"  --api-key KEY        require 'Authorization: Bearer KEY' or 'x-api-key: KEY'\n"
"                       (also read from DS4_API_KEY; /health stays open)\n"
"  --cors               allow cross-origin browser requests (Access-Control-Allow-*)\n"
"  --model-name NAME    model id reported by /v1/models (default deepseek-v4-flash)\n"
"  --queue N            requests allowed to wait; beyond it 503 (default 16)\n"
"  --keepalive S        seconds between SSE keepalive comments (default 5)\n"
"  --timeout S          drop connections idle or sending headers this long (default 30)\n"
"  --max-body BYTES     largest request body, else 413 (default 33554432)\n"
"  --trace FILE         log rendered prompts, cache decisions and parsed tool calls\n"
"  --test-script FILE   diagnostic for tests: named token scripts ('=== NAME' lines\n"
"                       start each); a request with header 'X-DS4-Test-Script: NAME'\n"
"                       has that text forced through the sampler, and every request\n"
"                       waits for its KV checkpoints to be written. Never in production.\n"
"  -h, --help           this text\n"
"\n"
"Requests choose thinking with 'thinking', 'think', 'reasoning_effort',\n"
"'output_config.effort', 'reasoning.effort' or the model names deepseek-chat\n"
"(off) / deepseek-reasoner (on); thinking is on by default except for\n"
"/v1/completions. SIGINT/SIGTERM stop accepting, cancel queued and running\n"
"requests, checkpoint the sessions (with --kv-disk-dir) and exit 0.\n");
}

static long num_arg(const char *opt, const char *v, long lo, long hi) {
    char *end;
    errno = 0;
    long n = v ? strtol(v, &end, 10) : 0;
    if (!v || errno || *end || n < lo || n > hi) {
        fprintf(stderr, "ds4-server: %s needs a number in [%ld, %ld]\n", opt, lo, hi);
        exit(2);
    }
    return n;
}

/* '=== NAME' starts a script; its text runs to the next such line, without
 * the newline that precedes it. Specials are written by their spelling. */
static int load_scripts(srv *S, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "ds4-server: %s: %s\n", path, strerror(errno)); return -1; }
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    char line[4096];
    char *name = NULL;
    int rc = 0;
    for (bool eof = false; !eof;) {
        eof = !fgets(line, sizeof line, f);
        if (!eof && strncmp(line, "=== ", 4) != 0) { fputs(line, mem); continue; }
        fflush(mem);
        if (name) {
            if (len && text[len - 1] == '\n') len--;
            S->script_names = realloc(S->script_names, sizeof *S->script_names * (size_t)(S->n_scripts + 1));
            S->scripts = realloc(S->scripts, sizeof *S->scripts * (size_t)(S->n_scripts + 1));
            memset(&S->scripts[S->n_scripts], 0, sizeof *S->scripts);
            if (ds4_tokenize_special(S->tok, text, len, &S->scripts[S->n_scripts]) != 0) rc = -1;
            S->script_names[S->n_scripts++] = name;
        }
        if (eof) break;
        line[strcspn(line, "\r\n")] = 0;
        name = strdup(line + 4);
        fseek(mem, 0, SEEK_SET);
        len = 0;
    }
    fclose(mem);
    free(text);
    fclose(f);
    return rc;
}

/* Checkpoint extra data: the tool-call ids whose exact block is in text, so
 * a restored prefix still replays its calls byte for byte. */
static int checkpoint_tools(void *ud, const char *text, size_t text_len, const int32_t *ids, size_t n,
                            uint8_t **blob, size_t *len) {
    srv *S = ud;
    return toolmap_encode_for(S->tools, text, text_len, blob, len);
}

/* With --kv-disk-dir the tool map outlives the process inside the
 * checkpoints: every save carries the entries its text replays. Prompts are
 * rendered (with the exact blocks) before any checkpoint is consulted, so
 * all of them are merged at startup, oldest first (recency restored). A
 * crash loses only the calls no checkpoint holds yet. */
#define TOOLMAP_MAX_BYTES (64u << 20)

static void merge_extra(void *ud, const uint8_t *blob, size_t len) {
    srv *S = ud;
    if (toolmap_merge(S->tools, blob, len) != 0) srv_trace(S, "tool map: a checkpoint's entries are unreadable\n");
}

int main(int argc, char **argv) {
    srv S;
    memset(&S, 0, sizeof S);
    srv_config *cfg = &S.cfg;
    cfg->host = "127.0.0.1";
    cfg->port = 8000;
    cfg->ctx = 32768;
    cfg->queue_max = 16;
    cfg->keepalive_s = 5;
    cfg->timeout_s = 30;
    cfg->max_body = 32u << 20;
    cfg->model_name = "deepseek-v4-flash";
    cfg->sessions = 0;      /* 0: from free memory and --ctx, after the weights are loaded */
    cfg->kv_space_mb = 16384;
    cfg->api_key = getenv("DS4_API_KEY");
    if (cfg->api_key && !*cfg->api_key) cfg->api_key = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "--cpu")) cfg->backend = DS4_BACKEND_CPU;
        else if (!strcmp(a, "--cuda")) cfg->backend = DS4_BACKEND_CUDA;
        else if (!strcmp(a, "--cors")) cfg->cors = true;
        else if (!v) { fprintf(stderr, "ds4-server: unknown option or missing value: %s\n", a); usage(stderr); return 2; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) cfg->model_path = argv[++i];
        else if (!strcmp(a, "--host")) cfg->host = argv[++i];
        else if (!strcmp(a, "--port")) cfg->port = (int)num_arg(a, argv[++i], 0, 65535);
        else if (!strcmp(a, "--ctx")) cfg->ctx = (uint32_t)num_arg(a, argv[++i], 16, UINT32_MAX);
        else if (!strcmp(a, "--sessions")) cfg->sessions = (int)num_arg(a, argv[++i], 1, 64);
        else if (!strcmp(a, "--kv-align")) cfg->kv_align = (int)num_arg(a, argv[++i], 16, 1 << 20);
        else if (!strcmp(a, "--kv-disk-dir")) cfg->kv_dir = argv[++i];
        else if (!strcmp(a, "--kv-disk-space")) cfg->kv_space_mb = (uint64_t)num_arg(a, argv[++i], 1, 1L << 30);
        else if (!strcmp(a, "--threads")) cfg->threads = (int)num_arg(a, argv[++i], 1, 1024);
        else if (!strcmp(a, "--api-key")) cfg->api_key = argv[++i];
        else if (!strcmp(a, "--model-name")) cfg->model_name = argv[++i];
        else if (!strcmp(a, "--queue")) cfg->queue_max = (int)num_arg(a, argv[++i], 1, 4096);
        else if (!strcmp(a, "--keepalive")) cfg->keepalive_s = (int)num_arg(a, argv[++i], 1, 3600);
        else if (!strcmp(a, "--timeout")) cfg->timeout_s = (int)num_arg(a, argv[++i], 2, 86400);
        else if (!strcmp(a, "--max-body")) cfg->max_body = (size_t)num_arg(a, argv[++i], 1024, 1L << 32);
        else if (!strcmp(a, "--trace")) cfg->trace_path = argv[++i];
        else if (!strcmp(a, "--test-script")) cfg->test_script = argv[++i];
        else { fprintf(stderr, "ds4-server: unknown option: %s\n", a); usage(stderr); return 2; }
    }
    if (!cfg->model_path) { fprintf(stderr, "ds4-server: -m MODEL.gguf is required\n"); usage(stderr); return 2; }
    if (cfg->keepalive_s >= cfg->timeout_s) {
        /* The stream callback blocks up to keepalive_s and MHD counts that
         * time against the connection timeout. */
        fprintf(stderr, "ds4-server: --keepalive must be shorter than --timeout\n");
        return 2;
    }

    /* Signals are taken by sigwait in main only; SIGPIPE from a vanished
     * client must not kill the process. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    char err[512];
    ds4_engine_params ep = {.model_path = cfg->model_path, .backend = cfg->backend, .n_threads = cfg->threads};
    S.eng = ds4_engine_open(&ep, err, sizeof err);
    if (!S.eng) { fprintf(stderr, "ds4-server: %s\n", err); return 1; }
    S.tok = ds4_engine_tokenizer(S.eng);
    uint32_t ctx_max = ds4_engine_ctx_max(S.eng);
    if (ctx_max && cfg->ctx > ctx_max) cfg->ctx = ctx_max;
    /* Sessions: asked of the backend once the weights are in place, so the
     * free memory it reports is what sessions can really take. */
    uint64_t per_session = 0, mem_free = 0;
    if (ds4_engine_session_bytes(S.eng, cfg->ctx, &per_session, err, sizeof err) != 0 ||
        ds4_engine_mem_free(S.eng, &mem_free, err, sizeof err) != 0) {
        fprintf(stderr, "ds4-server: %s\n", err);
        ds4_engine_close(S.eng);
        return 1;
    }
    char fit[320];
    int n_sessions = ds4_pool_sessions_for(cfg->sessions, mem_free, per_session, cfg->ctx, fit, sizeof fit);
    if (n_sessions < 0) {
        fprintf(stderr, "ds4-server: --sessions %d: %s\n", cfg->sessions, fit);
        ds4_engine_close(S.eng);
        return 1;
    }
    fprintf(stderr, "ds4-server: sessions: %s\n", fit);
    cfg->sessions = n_sessions;
    pthread_mutex_init(&S.trace_mu, NULL);
    S.tools = toolmap_new(4096);
    int rc = 1;
    if (cfg->trace_path && !(S.trace = fopen(cfg->trace_path, "a"))) {
        fprintf(stderr, "ds4-server: --trace %s: %s\n", cfg->trace_path, strerror(errno));
        goto out;
    }
    if (cfg->kv_dir) {
        char id[65];
        if (ds4_kv_model_id(S.eng, id, err, sizeof err) != 0) { fprintf(stderr, "ds4-server: %s\n", err); goto out; }
        ds4_kvstore_params kp = {.dir = cfg->kv_dir, .space_bytes = cfg->kv_space_mb << 20, .model_id = id, .log = S.trace};
        if (!(S.store = ds4_kvstore_open(&kp, err, sizeof err))) { fprintf(stderr, "ds4-server: %s\n", err); goto out; }
    }
    ds4_pool_params pp = {.n_slots = cfg->sessions, .ctx = cfg->ctx, .store = S.store, .align = (size_t)cfg->kv_align,
                          .extra_fn = checkpoint_tools, .ud = &S, .log = S.trace};
    if (!(S.pool = ds4_pool_new(S.eng, &pp, err, sizeof err))) { fprintf(stderr, "ds4-server: %s\n", err); goto out; }
    if (S.store) {
        size_t n = ds4_kvstore_extras(S.store, TOOLMAP_MAX_BYTES, merge_extra, &S);
        srv_trace(&S, "tool map: entries of %zu checkpoints loaded\n", n);
    }
    if (cfg->test_script && load_scripts(&S, cfg->test_script) != 0) goto out;
    if (!S.tools || worker_start(&S) != 0) { fprintf(stderr, "ds4-server: cannot start the worker\n"); goto out; }
    S.daemon = http_start(&S, err, sizeof err);
    if (!S.daemon) { fprintf(stderr, "ds4-server: %s\n", err); worker_stop(&S); goto out; }
    fprintf(stderr, "ds4-server: %s backend, ctx %u, %d session%s%s%s, listening on http://%s:%d\n",
            ds4_engine_backend_name(S.eng), cfg->ctx, cfg->sessions, cfg->sessions == 1 ? "" : "s",
            cfg->kv_dir ? ", KV checkpoints in " : "", cfg->kv_dir ? cfg->kv_dir : "", cfg->host, cfg->port);

    int sig = 0;
    sigwait(&sigs, &sig);
    fprintf(stderr, "ds4-server: %s, shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    /* Stop accepting, end every job (their streams close and their waiting
     * connection threads answer), then let MHD join its threads. */
    MHD_socket ls = MHD_quiesce_daemon(S.daemon);
    worker_stop(&S);
    http_drain(2000);
    MHD_stop_daemon(S.daemon);
    if (ls != MHD_INVALID_SOCKET) close(ls);
    if (S.store && ds4_pool_spill_all(S.pool, err, sizeof err) != 0) fprintf(stderr, "ds4-server: checkpoint: %s\n", err);
    rc = 0;
out:
    if (S.trace) fclose(S.trace);
    for (int i = 0; i < S.n_scripts; i++) { free(S.script_names[i]); ds4_tokens_free(&S.scripts[i]); }
    free(S.script_names);
    free(S.scripts);
    toolmap_free(S.tools);
    if (S.pool) ds4_pool_free(S.pool);
    if (S.store) ds4_kvstore_close(S.store);
    ds4_engine_close(S.eng);
    return rc;
}
