/* ds4 — DeepSeek V4 Flash inference engine. The one public header.
 *
 * Programs (ds4, ds4-server, ds4-bench) see only this: an engine (model +
 * tokenizer + backend), sessions (KV state + token list), text tools
 * (tokenizer, chat rendering, DSML parsing, sampling) and a generation
 * driver. Tensors never cross this line. Each section is implemented in the
 * folder named beside it. */
#ifndef DS4_H
#define DS4_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* ---- Token vectors (src/text) ---------------------------------------- */
typedef struct { int32_t *ids; size_t n, cap; } ds4_tokens;
void ds4_tokens_push(ds4_tokens *t, int32_t id);
void ds4_tokens_free(ds4_tokens *t);

/* ---- Tokenizer (src/text/tokenizer.c) ---------------------------------
 * Byte-level BPE with the DeepSeek three-stage pre-tokenizer (prompt.md §1).
 * Built from GGUF metadata (tokenizer.ggml.tokens / merges) or from arrays. */
typedef struct ds4_tokenizer ds4_tokenizer;

/* The control tokens the engine needs, looked up by spelling at load time. */
typedef struct {
    int32_t bos, eos, user, assistant, think, think_end, dsml;
} ds4_special_ids;

/* From GGUF metadata: tokenizer.ggml.tokens / merges, and token_type when
 * present (3 control, 4 user-defined = special; without it the spelling
 * rule below applies). Strings are copied; the file may be closed after.
 * Either way the seven ds4_special_ids spellings are always special. */
struct gguf_file;
ds4_tokenizer *ds4_tokenizer_from_gguf(const struct gguf_file *f, char *err, size_t errlen);
/* From arrays (lens may be NULL for NUL-terminated strings). A token is
 * special when its spelling contains U+FF5C or is <think> / </think>.
 * Errors (NULL + err): a merge naming an unknown token, a missing byte
 * symbol, or one of the seven ds4_special_ids spellings missing. */
ds4_tokenizer *ds4_tokenizer_new(const char *const *tokens, const uint64_t *token_lens, uint32_t n_tokens,
                                 const char *const *merges, const uint64_t *merge_lens, uint32_t n_merges,
                                 char *err, size_t errlen);
void ds4_tokenizer_free(ds4_tokenizer *t);
uint32_t ds4_tokenizer_n_vocab(const ds4_tokenizer *t);
const ds4_special_ids *ds4_tokenizer_special(const ds4_tokenizer *t);
/* Exact spelling -> id, or -1. */
int32_t ds4_token_lookup(const ds4_tokenizer *t, const char *text, size_t len);
/* Plain text -> ids (appended). No specials are matched, nothing is added. */
int ds4_tokenize(const ds4_tokenizer *t, const char *text, size_t len, ds4_tokens *out);
/* Text where every spelling of a known special/added token becomes that token
 * (ds4/vLLM behaviour; used for --dump-tokens and raw prompts). */
int ds4_tokenize_special(const ds4_tokenizer *t, const char *text, size_t len, ds4_tokens *out);
/* Bytes of one token (specials verbatim, BPE tokens through the byte table).
 * Returns the length (0 for an id out of range); writes at most cap bytes. */
size_t ds4_token_bytes(const ds4_tokenizer *t, int32_t id, char *buf, size_t cap);

/* Streaming detokenizer: never emits a broken UTF-8 sequence; an incomplete
 * trailing sequence waits for the next token; flush emits what is left.
 * Start from a zeroed ds4_detok. Bytes that can start no valid sequence (and
 * an incomplete tail at flush) come out as U+FFFD, one per byte. Both return
 * the bytes of output and write at most cap of them (token bytes + 3 held
 * back + U+FFFD expansion: 3 * (token length + 3) always suffices). */
typedef struct { char pending[8]; int n_pending; } ds4_detok;
size_t ds4_detok_push(ds4_detok *d, const ds4_tokenizer *t, int32_t id, char *out, size_t cap);
size_t ds4_detok_flush(ds4_detok *d, char *out, size_t cap);

/* ---- Chat rendering (src/text/chat.c) ---------------------------------
 * The official V4 encoding (prompt.md §2). The renderer writes the exact
 * prompt bytes and records where it placed control tokens, so content that
 * happens to spell a control token stays plain text. */
typedef enum { DS4_ROLE_SYSTEM, DS4_ROLE_USER, DS4_ROLE_ASSISTANT, DS4_ROLE_TOOL, DS4_ROLE_DEVELOPER } ds4_role;
typedef enum { DS4_THINK_NONE, DS4_THINK_HIGH, DS4_THINK_MAX } ds4_think;

typedef struct {
    const char *id;             /* tool-call id (may be NULL) */
    const char *name;
    const char *arguments;      /* JSON text of the arguments object */
    const char *raw_dsml;       /* exact sampled DSML block for replay, or NULL */
} ds4_tool_call;

typedef struct {
    ds4_role role;
    const char *content;        /* may be NULL */
    const char *reasoning;      /* assistant reasoning_content, may be NULL */
    const ds4_tool_call *tool_calls; int n_tool_calls;
    const char *tool_call_id;   /* role TOOL: which call this answers */
} ds4_chat_msg;

typedef struct {
    const char *name;
    const char *json;           /* the function schema object as JSON text */
} ds4_tool_def;

typedef struct {
    const ds4_chat_msg *msgs; int n_msgs;
    const ds4_tool_def *tools; int n_tools;
    ds4_think think;            /* MAX downgrades to HIGH when ctx < 393216 */
    uint32_t ctx;
    bool add_generation_prompt; /* append <｜Assistant｜> + <think>|</think> */
} ds4_chat;

typedef struct {
    char *text; size_t len;          /* exact bytes, specials spelled out */
    size_t *special_off; size_t n_special; /* byte offsets of control tokens */
    size_t cap, special_cap;
} ds4_rendered;

int ds4_chat_render(const ds4_chat *chat, ds4_rendered *out, char *err, size_t errlen);
void ds4_rendered_free(ds4_rendered *r);
/* Rendered prompt -> ids: control tokens exactly where the renderer put them,
 * every other span BPE-encoded on its own. Returns -1 (appending nothing)
 * when an offset is out of order, out of range, or does not start a special
 * spelling; the longest spelling there is taken. */
int ds4_tokenize_rendered(const ds4_tokenizer *t, const ds4_rendered *r, ds4_tokens *out);

/* ---- DSML / output parsing (src/text/dsml.c) --------------------------
 * Feeds on generated text and reports what is certain as it becomes certain:
 * reasoning, visible content, tool calls (header as soon as the name is
 * known, argument JSON incrementally). Malformed structure never loses text:
 * it is reported as content. */
typedef enum {
    DS4_EV_REASONING,   /* text: reasoning bytes */
    DS4_EV_CONTENT,     /* text: visible content bytes */
    DS4_EV_TOOL_BEGIN,  /* index, name (id chosen by the caller) */
    DS4_EV_TOOL_ARGS,   /* index, text: a fragment of the arguments JSON */
    DS4_EV_TOOL_END,    /* index */
} ds4_event_kind;

typedef struct {
    ds4_event_kind kind;
    int index;
    const char *text; size_t len;
    const char *name;
} ds4_event;

typedef void (*ds4_event_fn)(void *ud, const ds4_event *ev);
typedef struct ds4_dsml ds4_dsml;

/* thinking: the output starts inside reasoning (prompt ended with <think>).
 * tools: tool calls are recognised (else DSML is plain content). */
ds4_dsml *ds4_dsml_new(bool thinking, bool tools, ds4_event_fn fn, void *ud);
void ds4_dsml_free(ds4_dsml *p);
void ds4_dsml_feed(ds4_dsml *p, const char *text, size_t len);
/* End of generation: flushes held-back text. */
void ds4_dsml_finish(ds4_dsml *p);
/* True while inside DSML structure (tags, parameter headers, JSON syntax):
 * the sampler should pick greedily there (prompt.md §3.5). */
bool ds4_dsml_structural(const ds4_dsml *p);
/* True once a complete tool_calls block closed (generation should stop). */
bool ds4_dsml_calls_done(const ds4_dsml *p);
/* True if a tool block opened and never closed. */
bool ds4_dsml_unterminated(const ds4_dsml *p);

/* Authoritative parse of a whole generation (prompt.md §3.4, tolerant). */
typedef struct {
    char *reasoning, *content;
    ds4_tool_call *calls; int n_calls;   /* strings owned by the result */
} ds4_parsed;
int ds4_parse_output(const char *text, size_t len, bool thinking, bool tools, ds4_parsed *out);
void ds4_parsed_free(ds4_parsed *p);
/* JSON arguments -> canonical DSML invoke block (for unknown tool-call ids). */
char *ds4_dsml_render_calls(const ds4_tool_call *calls, int n);

/* ---- Sampling (src/sample/sampler.c) ---------------------------------- */
typedef struct {
    float temperature;          /* 0 = greedy */
    float top_p;                /* 1 = off */
    int   top_k;                /* 0 = off */
    float min_p;                /* 0 = off */
    uint64_t seed;
} ds4_sampling;

/* Defaults per prompt.md §5.1 (thinking: T 1.0, top_p 1.0, top_k 0, min_p 0.05). */
ds4_sampling ds4_sampling_defaults(bool thinking);
typedef struct ds4_sampler ds4_sampler;
ds4_sampler *ds4_sampler_new(const ds4_sampling *s, uint32_t n_vocab);
void ds4_sampler_free(ds4_sampler *s);
/* Pick the next token; greedy forces argmax (lowest id on ties). */
int32_t ds4_sample(ds4_sampler *s, const float *logits, bool greedy);
/* Top-k log-probabilities of a logits vector (descending), for --dump-logprobs. */
int ds4_top_logprobs(const float *logits, uint32_t n_vocab, int k, int32_t *ids, float *logprobs);

/* ---- Engine and sessions (src/engine) ---------------------------------- */
typedef enum { DS4_BACKEND_AUTO, DS4_BACKEND_CPU, DS4_BACKEND_CUDA } ds4_backend_kind;

typedef struct {
    const char *model_path;
    const char *mtp_path;       /* optional MTP GGUF */
    ds4_backend_kind backend;   /* AUTO = CUDA when built with it and a GPU exists */
    int n_threads;              /* CPU threads; 0 = DS4_THREADS env or all cores */
    bool verbose;               /* stderr: KV size per session, tok/s per eval */
} ds4_engine_params;

typedef struct ds4_engine ds4_engine;
typedef struct ds4_session ds4_session;

ds4_engine *ds4_engine_open(const ds4_engine_params *p, char *err, size_t errlen);
void ds4_engine_close(ds4_engine *e);
const ds4_tokenizer *ds4_engine_tokenizer(const ds4_engine *e);
const char *ds4_engine_backend_name(const ds4_engine *e);
uint32_t ds4_engine_n_vocab(const ds4_engine *e);
uint32_t ds4_engine_ctx_max(const ds4_engine *e);
/* Human-readable model report (`ds4 --inspect`). */
void ds4_engine_inspect(const ds4_engine *e, uint64_t ctx, FILE *out);
/* Weight bytes one decoded token reads: every tensor but the embedding table,
 * with only n_expert_used routed experts per layer (spec model.md §9.2). */
uint64_t ds4_engine_weight_bytes_per_token(const ds4_engine *e);

/* A session holds the KV state for up to ctx tokens. */
ds4_session *ds4_session_new(ds4_engine *e, uint32_t ctx, char *err, size_t errlen);
void ds4_session_free(ds4_session *s);
uint32_t ds4_session_ctx(const ds4_session *s);
size_t ds4_session_len(const ds4_session *s);
const int32_t *ds4_session_tokens(const ds4_session *s);
/* Evaluate tokens appended at the end of the session; afterwards
 * ds4_session_logits() holds the next-token logits. all_logits, when non-NULL,
 * receives n × n_vocab floats (diagnostics). progress may be NULL; it is called
 * after every backend step (up to 256 tokens); returning false from it cancels
 * (the session then holds the tokens evaluated so far). Returns 0, 1 when
 * cancelled, -1 on error (err says why; the session keeps what completed).
 * Results are bit-identical whatever the split into calls (CPU backend). */
typedef bool (*ds4_progress_fn)(void *ud, size_t done, size_t total);
int ds4_session_eval(ds4_session *s, const int32_t *ids, size_t n, float *all_logits,
                     ds4_progress_fn progress, void *ud, char *err, size_t errlen);
/* NULL while the session is empty. */
const float *ds4_session_logits(const ds4_session *s);
/* Bytes of KV state the session holds now (rows in use, f32). */
uint64_t ds4_session_kv_bytes(const ds4_session *s);
/* Drop tokens after n when that is exact; -1 (with err) when it is not. */
int ds4_session_truncate(ds4_session *s, size_t n, char *err, size_t errlen);
/* Truncation is exact whenever n >= len − (sliding_window + 1), and always
 * for n = 0; the last kept token is re-evaluated so ds4_session_logits() is
 * valid after. */
/* Versioned snapshot of the whole state (same bytes for every backend;
 * format in src/engine/session.c). save mallocs *buf (caller frees). load
 * refuses a corrupt, truncated or other-model snapshot, or one longer than
 * the session's ctx, leaving the session unchanged. */
int ds4_session_save(const ds4_session *s, uint8_t **buf, size_t *len);
int ds4_session_load(ds4_session *s, const uint8_t *buf, size_t len, char *err, size_t errlen);

/* ---- Generation driver (src/engine/generate.c) -------------------------
 * One loop shared by the CLI and the server: reuse the session's longest
 * exact prefix of the prompt, prefill the rest, then sample token by token,
 * detokenize (UTF-8 safe), apply stop strings, run the DSML parser and report
 * events. Sampling is greedy inside DSML structure (prompt.md §3.5). */
typedef enum {
    DS4_FINISH_STOP, DS4_FINISH_LENGTH, DS4_FINISH_TOOL_CALLS, DS4_FINISH_ERROR, DS4_FINISH_CANCELLED,
} ds4_finish;

typedef struct {
    ds4_sampling sampling;
    int max_tokens;             /* <= 0: until the context is full */
    bool thinking;              /* the prompt ended with <think> */
    bool tools;                 /* recognise DSML tool calls */
    const char *const *stop; int n_stop;  /* stop strings on decoded text */
    ds4_event_fn on_event; void *ud;      /* reasoning/content/tool events */
    ds4_progress_fn on_prefill;           /* prefill progress / cancellation */
    bool (*cancelled)(void *ud);          /* polled between tokens */
} ds4_gen_params;

typedef struct {
    ds4_finish finish;
    size_t n_prompt, n_cached, n_gen;     /* n_cached: prompt tokens reused */
    double prefill_s, gen_s;
    char *text; size_t len;               /* the raw generated text (owned) */
} ds4_gen_result;

int ds4_generate(ds4_session *s, const int32_t *prompt, size_t n_prompt, const ds4_gen_params *p,
                 ds4_gen_result *r, char *err, size_t errlen);
void ds4_gen_result_free(ds4_gen_result *r);

#endif
