/* ds4-server internals shared by its files.
 *
 *   http.c       libmicrohttpd glue: body limits, routing, auth, CORS, SSE channel
 *   worker.c     the job queue and the one inference thread that owns the sessions
 *   toolmap.c    tool-call id -> exact sampled DSML block (bounded LRU)
 *   request.c    what every protocol shares: thinking/sampling/stop fields,
 *                rendering and tokenizing a conversation, error bodies, ids
 *   openai.c     /v1/chat/completions, /v1/completions, /v1/models
 *   anthropic.c  /v1/messages
 *   responses.c  /v1/responses
 *   main.c       options, startup, signals, shutdown
 *
 * Threads: MHD runs one thread per connection; those threads parse requests,
 * render and tokenize prompts, and stream bytes out. A single worker thread
 * runs ds4_generate for one job at a time and formats stream events. */
#ifndef DS4_SERVER_H
#define DS4_SERVER_H
#include "ds4.h"

#include <cjson/cJSON.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>

typedef struct {
    const char *host, *model_path, *api_key, *trace_path, *test_script, *model_name, *kv_dir;
    int port, threads, queue_max, keepalive_s, timeout_s, sessions, kv_align;
    uint64_t kv_space_mb;
    uint32_t ctx;
    ds4_backend_kind backend;
    bool cors;
    size_t max_body;
} srv_config;

/* ---- toolmap.c ---- */
typedef struct toolmap toolmap;
toolmap *toolmap_new(size_t cap);
void toolmap_free(toolmap *m);
void toolmap_put(toolmap *m, const char *id, const char *raw_dsml);
/* A malloc'd copy of the block for id, or NULL. */
char *toolmap_get(toolmap *m, const char *id);
/* The entries whose block occurs in text (every entry when text is NULL),
 * oldest first, as a ds4_kv_map_encode blob (what a KV checkpoint of that
 * text needs to replay its tool calls). 0 or -1. */
int toolmap_encode_for(toolmap *m, const char *text, size_t len, uint8_t **blob, size_t *blob_len);
/* Put every entry of such a blob (a restored checkpoint's). 0 or -1. */
int toolmap_merge(toolmap *m, const uint8_t *blob, size_t len);

/* ---- SSE channel (http.c) ----
 * The worker appends bytes; the connection thread drains them through an MHD
 * callback response and sends ": keepalive" comments while nothing comes. */
typedef struct sse sse;
sse *sse_new(int keepalive_s);
void sse_write(sse *s, const char *data, size_t n);
/* "event: NAME\n" (when name) + "data: JSON\n\n"; takes ownership of data. */
void sse_json(sse *s, const char *event, cJSON *data);
void sse_close(sse *s);          /* producer: nothing more will come */
bool sse_gone(sse *s);           /* the client went away */
void sse_unref(sse *s);

/* ---- jobs and the worker (worker.c) ---- */
typedef struct job job;
typedef struct srv srv;

/* A protocol's hooks, called on the worker thread. start: just before
 * generation (the cache estimate is known); event: a DSML event of a
 * streaming job; finish: generation ended (j->res, j->rc filled). */
typedef struct {
    void (*start)(job *j);
    void (*event)(job *j, const ds4_event *ev);
    void (*finish)(job *j);
} job_ops;

struct job {
    srv *S;
    ds4_tokens prompt;
    ds4_gen_params gp;
    char **stop; int n_stop;
    int32_t *forced; size_t n_forced;   /* owned copy */
    sse *out;                     /* streaming jobs */
    const job_ops *ops;
    void *proto;                  /* protocol state, freed by proto_free */
    void (*proto_free)(void *);
    size_t est_cached;            /* prompt tokens the session already holds */
    const ds4_pool_lease *lease;  /* its session while generating (worker only) */
    ds4_gen_result res;
    int rc;
    char err[256];
    int fd;                       /* dup of the client socket: disconnect probe */
    atomic_bool cancel;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
    int refs;
};

job *job_new(srv *S);
void job_unref(job *j);
/* Queue a job (takes a reference). -1 when the queue is full, -2 when the
 * server is stopping. */
int job_submit(job *j);
void job_wait(job *j);
bool job_cancelled(job *j);

struct srv {
    srv_config cfg;
    ds4_engine *eng;
    ds4_pool *pool;               /* resident sessions; worker only */
    ds4_kvstore *store;           /* disk checkpoints (--kv-disk-dir) or NULL */
    const ds4_tokenizer *tok;
    toolmap *tools;
    FILE *trace;
    pthread_mutex_t trace_mu;
    /* --test-script: named forced-token scripts */
    char **script_names; ds4_tokens *scripts; int n_scripts;
    /* queue */
    pthread_mutex_t qmu;
    pthread_cond_t qcv;
    job **queue; int q_head, q_len;
    job *running;
    bool stopping;
    /* Thinking without tools, per session slot: the client's view of the
     * slot's last turn (reasoning dropped) and the live length it stands
     * for. Worker only. */
    struct think_alias {
        ds4_tokens visible;
        size_t real;
        uint64_t hash;            /* of the slot's tokens: still the same content? */
        bool ok;
    } *alias;
    pthread_t worker;
    struct MHD_Daemon *daemon;
};

int worker_start(srv *S);
/* Stop: refuse new jobs, cancel queued and running ones, join the thread. */
void worker_stop(srv *S);
void srv_trace(srv *S, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- request.c ---- */
typedef enum { PROTO_OPENAI, PROTO_ANTHROPIC } proto_kind;

/* Strings and arrays that live as long as one request's parse. */
typedef struct arena_blk arena_blk;
typedef struct { arena_blk *head; } arena;
void *ar_alloc(arena *a, size_t n);
char *ar_strdup(arena *a, const char *s);
char *ar_strndup(arena *a, const char *s, size_t n);
void ar_free(arena *a);

/* A conversation being assembled from any protocol's request. */
typedef struct {
    arena ar;
    ds4_chat_msg *msgs; int n_msgs, cap_msgs;
    ds4_tool_def *tools; int n_tools, cap_tools;
    bool thinking;
    ds4_think think;
    bool explicit_thinking;
    ds4_sampling sampling;
    int max_tokens;
    const char **stop; int n_stop;
    bool stream, include_usage;
    const char *model;
    const int32_t *forced; size_t n_forced;
    ds4_tokens force_buf;         /* owns forced when tool_choice built it */
} chat_req;

void chat_init(chat_req *c);
void chat_free(chat_req *c);
ds4_chat_msg *chat_add_msg(chat_req *c, ds4_role role);
void chat_add_tool(chat_req *c, const char *name, cJSON *schema);
/* Tool calls of an assistant message: arguments text, raw DSML by id. */
ds4_tool_call *chat_add_call(chat_req *c, ds4_chat_msg *m, srv *S, const char *id, const char *name, cJSON *args);

/* Content as text: a string, or an array whose string items and "text"
 * fields are concatenated with no separator. NULL when absent. */
char *json_text(arena *a, const cJSON *v);
const char *json_str(const cJSON *o, const char *key);
/* Type checks of request fields, -1 with msg naming the field (what):
 * content is absent, null, a string or an array of strings and part
 * objects; a list is absent, null or an array. A value of another type is
 * refused, not read as no content or no tools. */
int check_content(const cJSON *v, const char *what, char *msg, size_t msglen);
int check_list(const cJSON *v, const char *what, char *msg, size_t msglen);
/* tool_choice of Chat Completions and Responses: absent, null, "none",
 * "auto", "required" or an object. */
int check_openai_choice(const cJSON *choice, char *msg, size_t msglen);

/* The shared request fields (model, stream, thinking, sampling, stop,
 * max tokens). effort: this protocol's effort field (may be NULL).
 * Returns -1 with msg on a bad value. */
int parse_common(srv *S, chat_req *c, const cJSON *root, bool default_thinking, const char *const *max_keys,
                 const cJSON *effort, const char *stop_key, char *msg, size_t msglen);
/* A JSON string from len bytes (event text is not NUL-terminated). */
cJSON *json_strn(const char *s, size_t n);
/* Pick the forced script named by the X-DS4-Test-Script header. */
int select_script(srv *S, struct MHD_Connection *conn, chat_req *c, char *msg, size_t msglen);
/* tool_choice that demands a call: "required"/"any" (name NULL) or a named
 * tool. Forces the opening of a DSML tool block (and the name) as the first
 * generated tokens, after an immediate </think> in thinking mode (see the
 * comment in request.c); any test script continues after it. -1 with msg when no
 * tool (or not that one) was offered. Call after the tools were added. */
int force_tool_call(srv *S, chat_req *c, const char *name, char *msg, size_t msglen);
/* Render and tokenize. Returns 0, or an HTTP status with msg. */
int chat_tokenize(srv *S, chat_req *c, ds4_tokens *out, char *msg, size_t msglen);
/* Build a job from a tokenized request; the tokens move into it. */
job *chat_job(srv *S, chat_req *c, ds4_tokens *prompt, struct MHD_Connection *conn);
/* Queue the job. A streaming job, a full queue, a cancelled or failed job:
 * the response is sent here, the job released, *ready stays false and the
 * result is returned. Otherwise (a finished non-streaming job) *ready is true
 * and the caller renders j's result and releases j. */
enum MHD_Result run_job(srv *S, struct MHD_Connection *conn, job *j, proto_kind pk, bool *ready);
/* The answer to a cancelled non-streaming job: the server is shutting down
 * (the client reads it) or the client left (nobody does). */
enum MHD_Result send_cancelled(struct MHD_Connection *conn, proto_kind pk);

/* Final parse of a finished generation (thinking without </think>: all of
 * it is reasoning). Registers tool ids -> raw DSML. */
typedef struct {
    char *reasoning, *content;
    ds4_tool_call *calls; int n_calls;
    ds4_parsed raw;
} gen_output;
void gen_output_parse(job *j, gen_output *o);
void gen_output_free(gen_output *o);
void remember_calls(srv *S, char *const *ids, const gen_output *o);

/* "prefix" + 32 hex digits, malloc'd. */
char *new_id(const char *prefix);
const char *finish_openai(ds4_finish f);
const char *finish_anthropic(ds4_finish f);

/* ---- http.c ---- */
enum MHD_Result send_json(struct MHD_Connection *conn, unsigned status, cJSON *body);
enum MHD_Result send_error(struct MHD_Connection *conn, proto_kind pk, unsigned status,
                           const char *type, const char *code, const char *msg);
enum MHD_Result send_sse(struct MHD_Connection *conn, sse *s);
struct MHD_Daemon *http_start(srv *S, char *err, size_t errlen);
/* Wait (at most max_ms) until no stream response is open. */
void http_drain(int max_ms);

/* ---- protocol handlers ---- */
enum MHD_Result openai_chat(srv *S, struct MHD_Connection *conn, cJSON *root);
enum MHD_Result openai_completions(srv *S, struct MHD_Connection *conn, cJSON *root);
enum MHD_Result openai_models(srv *S, struct MHD_Connection *conn, const char *id);
enum MHD_Result anthropic_messages(srv *S, struct MHD_Connection *conn, cJSON *root);
enum MHD_Result anthropic_count_tokens(srv *S, struct MHD_Connection *conn, cJSON *root);
enum MHD_Result responses_create(srv *S, struct MHD_Connection *conn, cJSON *root);
#endif
