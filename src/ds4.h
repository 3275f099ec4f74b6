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
    const char *raw_dsml;       /* exact sampled DSML block for replay, or NULL.
                                 * A block holds all calls of its message: the
                                 * renderer replays it when every call of the
                                 * message carries the same bytes. */
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

/* Overwrites *out (free it with ds4_rendered_free, also after an error).
 * Tools attach to a leading system/developer message, or to an empty system
 * message inserted first. Errors: unknown role, a tool schema that is not
 * valid JSON. */
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
    const char *text; size_t len;   /* valid during the callback only */
    const char *name;               /* TOOL_BEGIN; valid during the callback only */
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
/* True if a block was abandoned (structural error or unterminated) after
 * TOOL_* events were sent for it. Its raw bytes were then re-reported as
 * CONTENT (CONTENT always concatenates to ds4_parse_output()'s content), but
 * the tool events cannot be retracted: finish with DS4_FINISH_ERROR. */
bool ds4_dsml_failed(const ds4_dsml *p);

/* Authoritative parse of a whole generation (prompt.md §3.4, tolerant).
 * Runs the same recogniser as the streaming API, so both always agree:
 * reasoning = text before the first </think> (all of it when thinking and no
 * </think> came); content = the rest minus the tool block and the whitespace
 * before it; calls only when the block closed, each with the block's exact
 * bytes (from its "\n\n" through </…tool_calls>) as raw_dsml and compact
 * JSON arguments. Returns -1 only on allocation failure. */
typedef struct {
    char *reasoning, *content;
    ds4_tool_call *calls; int n_calls;   /* strings owned by the result */
} ds4_parsed;
int ds4_parse_output(const char *text, size_t len, bool thinking, bool tools, ds4_parsed *out);
void ds4_parsed_free(ds4_parsed *p);
/* JSON arguments -> canonical DSML block, official encoder bytes: "\n\n"
 * <｜DSML｜tool_calls> … </｜DSML｜tool_calls> (for unknown tool-call ids).
 * Strings raw with string="true", other values Python-json style; arguments
 * that are not a JSON object become one string parameter "arguments". */
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
/* Pick the next token; greedy (or temperature <= 0) forces argmax, lowest id
 * on ties. Otherwise: softmax of logits/T; top-k; top-p = shortest prefix of
 * the top-k set reaching top_p of its mass; min-p keeps p >= min_p * p_max;
 * draw from the survivors (xoshiro256** seeded from seed: same seed, same
 * tokens). NaN logits are never picked. */
int32_t ds4_sample(ds4_sampler *s, const float *logits, bool greedy);
/* The greedy choice: lowest id of the largest non-NaN logit (0 if all NaN). */
int32_t ds4_argmax(const float *logits, uint32_t n);
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
/* Memory for resident sessions (ds4-server --sessions): the bytes a fresh
 * session of ctx tokens allocates (backend state at full capacity, its
 * token list and logits; measured by creating one and freeing it), and
 * the bytes the backend's device can still give (CPU: MemAvailable, within
 * a cgroup limit, less the mapped weights; CUDA: free device memory after
 * the weight upload, less a margin). 0, or -1 with err. */
int ds4_engine_session_bytes(ds4_engine *e, uint32_t ctx, uint64_t *bytes, char *err, size_t errlen);
int ds4_engine_mem_free(ds4_engine *e, uint64_t *bytes, char *err, size_t errlen);

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
/* NULL while the session is empty. Decode leaves the logits in the
 * backend (on a GPU: in device memory); the first call after an eval copies
 * them to the host. A greedy step needs only ds4_session_argmax. */
const float *ds4_session_logits(const ds4_session *s);
/* ds4_argmax of the next-token logits without copying them out (the backend
 * computed it); -1 while the session is empty. */
int32_t ds4_session_argmax(const ds4_session *s);
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

/* ---- KV checkpoints and session pool (src/engine/kvstore.c, pool.c) ----
 * Sessions that survive: checkpoints of session state on disk, keyed by the
 * rendered prompt bytes they cover, and several resident sessions routed by
 * shared prefix. Format and policies: docs/kv-cache.md. */

/* One checkpoint. For ds4_kvstore_save every field is the caller's; a lookup
 * result owns one allocation behind all pointers (ds4_kv_checkpoint_free). */
typedef struct {
    const char *text; size_t text_len;          /* rendered bytes covered: the key */
    const int32_t *ids; size_t n_ids;           /* their token ids (n_ids >= 1) */
    const uint8_t *session; size_t session_len; /* ds4_session_save() of exactly ids */
    const uint8_t *extra; size_t extra_len;     /* opaque (the tool-call id -> DSML map) */
    void *mem_;
} ds4_kv_checkpoint;
void ds4_kv_checkpoint_free(ds4_kv_checkpoint *c);

typedef struct {
    const char *dir;            /* created if missing (one level) */
    uint64_t space_bytes;       /* budget for checkpoint files in dir */
    const char *model_id;       /* files of another id are ignored (ds4_kv_model_id) */
    FILE *log;                  /* one line per skipped/removed file; NULL = stderr */
} ds4_kvstore_params;

typedef struct ds4_kvstore ds4_kvstore;
/* Takes DIR/.lock (flock, exclusive; held until close, dropped by the
 * kernel if the process dies): a second store on the directory, in any
 * process, fails with "kv dir DIR is in use by another ds4-server (pid N)".
 * Scans dir: validates every *.kv header (magic, version, model, lengths vs
 * file size, header checksum), removes corrupt ones and temp files left by
 * dead writers, logs and ignores the rest (other versions/models, foreign
 * files). Bodies are verified when loaded. NULL + err if dir is unusable. */
ds4_kvstore *ds4_kvstore_open(const ds4_kvstore_params *p, char *err, size_t errlen);
void ds4_kvstore_close(ds4_kvstore *st);
/* Durably writes cp (temp file, fsync, rename, fsync dir), replacing a
 * checkpoint with the same text. Makes room by deleting the least valuable
 * checkpoints (ds4_kv_value; least recently used among equals), never one
 * worth more than cp. Returns 0 saved, 1 not saved by policy (bigger than
 * the budget, or everything kept is worth more; err says which), -1 on bad
 * input or an I/O error. */
int ds4_kvstore_save(ds4_kvstore *st, const ds4_kv_checkpoint *cp, char *err, size_t errlen);
/* The checkpoint whose text is the longest prefix of text[0, len) (and, when
 * ids != NULL, whose ids are a prefix of ids[0, n_ids)), loaded and verified,
 * holding at most max_ids tokens (rewind: pass the point to restore at or
 * before). A file that fails verification is logged, removed, and the next
 * best tried. Returns 1 with *out filled, 0 when nothing matches. */
int ds4_kvstore_best_at_or_before(ds4_kvstore *st, const char *text, size_t len, const int32_t *ids,
                                  size_t n_ids, size_t max_ids, ds4_kv_checkpoint *out);
/* A checkpoint the caller loaded and cannot use (the engine refused its
 * session state): its file is removed with one log line, so no later lookup
 * reads it again. A newer file of the same text is left alone. */
void ds4_kvstore_discard(ds4_kvstore *st, const ds4_kv_checkpoint *cp, const char *why);
/* Same with no max_ids bound. */
int ds4_kvstore_lookup(ds4_kvstore *st, const char *text, size_t len, const int32_t *ids, size_t n_ids,
                       ds4_kv_checkpoint *out);
/* Token count of what best_at_or_before would try first, from the index
 * alone (no I/O, nothing verified); 0 when nothing matches. */
size_t ds4_kvstore_probe(ds4_kvstore *st, const char *text, size_t len, const int32_t *ids, size_t n_ids,
                         size_t max_ids);
/* A checkpoint for exactly this text is indexed (no I/O). */
bool ds4_kvstore_contains(ds4_kvstore *st, const char *text, size_t len);
size_t ds4_kvstore_count(ds4_kvstore *st);
/* Every indexed checkpoint's extra blob (at most max_len bytes), oldest
 * checkpoint first, checked against the digest in its header; the session
 * state is not read. fn's blob is valid during the call. Returns how many
 * were given; damaged ones are logged and skipped. */
size_t ds4_kvstore_extras(ds4_kvstore *st, size_t max_len, void (*fn)(void *ud, const uint8_t *extra, size_t len),
                          void *ud);
uint64_t ds4_kvstore_bytes(ds4_kvstore *st);
/* Eviction value: tokens × (1 + hits) / (1 + idle hours). Higher is kept. */
double ds4_kv_value(uint64_t n_ids, uint64_t hits, double idle_s);
/* Model id for ds4_kvstore_params: hex SHA-256 of an empty session's
 * snapshot, which carries the snapshot version and the model fingerprint
 * (shape + weight sample). out gets 65 bytes. */
int ds4_kv_model_id(ds4_engine *e, char out[65], char *err, size_t errlen);
/* The bytes ids spell (concatenated token bytes: for a tokenized rendered
 * prompt, exactly its rendered prefix). malloc'd, NUL-terminated. */
char *ds4_kv_text(const ds4_tokenizer *t, const int32_t *ids, size_t n, size_t *len);
/* Checkpoint lengths for a session going from `from` tokens (already
 * covered) to `stable` tokens (the part later requests are expected to
 * repeat, e.g. the prompt before its generation suffix): every multiple of
 * `every` in (from, stable], plus the last multiple of `align` <= stable
 * (the prompt trimmed so appended text still hits). every is rounded up to a
 * multiple of align. Ascending; returns the count (at most cap written). */
size_t ds4_kv_save_points(size_t from, size_t stable, size_t align, size_t every, size_t *out, size_t cap);

/* A string map (tool-call id -> raw DSML) as an extra blob: u32 count, then
 * per entry u32 length + bytes of the key, the same for the value. */
int ds4_kv_map_encode(const char *const *keys, const char *const *vals, size_t n, uint8_t **blob, size_t *len);
/* Calls fn per entry (strings valid during the call). A malformed blob
 * (bad lengths, trailing bytes, a NUL inside a string) returns -1 before
 * any call. */
int ds4_kv_map_decode(const uint8_t *blob, size_t len, void (*fn)(void *ud, const char *key, const char *val),
                      void *ud);

/* Session pool: routing as a pure function of what the slots hold. */
typedef struct {
    const int32_t *ids; size_t n;   /* tokens held; n = 0: empty slot */
    size_t n_prompt;                /* how many of them the last request's prompt had */
    double idle_s;                  /* since the slot was last used */
    uint64_t uses;
} ds4_pool_slot_info;

typedef struct {
    int slot;
    size_t reuse;       /* prompt tokens the slot already holds (common prefix) */
    bool spill;         /* the slot's content is worth saving before it is cut */
} ds4_pool_choice;

/* 1. A slot holding the whole previous prompt of its conversation (common
 *    prefix >= its n_prompt, or all it holds) takes the request: longest wins.
 * 2. Otherwise a free slot, so a side request never evicts a conversation.
 * 3. Otherwise the slot sharing the longest prefix (on a tie the shorter)
 *    when that is at least min_share tokens, else the least valuable
 *    (ds4_kv_value(n, uses, idle)).
 * spill: the chosen slot loses at least min_spill tokens. */
ds4_pool_choice ds4_pool_choose(const ds4_pool_slot_info *slots, int n_slots, const int32_t *prompt,
                                size_t n_prompt, size_t min_share, size_t min_spill);

/* The pool object: n_slots sessions of one engine plus the disk store. */
typedef struct {
    int n_slots;                /* resident sessions (--sessions), >= 1 */
    uint32_t ctx;               /* context of each session */
    ds4_kvstore *store;         /* disk checkpoints (--kv-disk-dir), or NULL */
    size_t align;               /* checkpoint alignment in tokens; 0 = 2048 */
    size_t every;               /* frontier spacing in tokens; 0 = 4 × align */
    /* Caller data kept with a checkpoint of ids[0, n), whose bytes are text
     * (the server: the tool-call ids whose raw DSML occurs in text, through
     * ds4_kv_map_encode). *blob is malloc'd; NULL fn = no extra data.
     * Non-zero return: saved without extra. */
    int (*extra_fn)(void *ud, const char *text, size_t text_len, const int32_t *ids, size_t n, uint8_t **blob,
                    size_t *len);
    void *ud;
    FILE *log;                  /* one line per routing/checkpoint decision; NULL = quiet */
    /* Tests: called on the checkpoint writer thread (with ud) before each
     * checkpoint of n tokens is written; blocking here holds the write.
     * NULL in normal use. */
    void (*on_write)(void *ud, size_t n);
} ds4_pool_params;

/* How many resident sessions of per_session bytes fit when free bytes are
 * free: floor(0.8 · free / per_session); the fifth left over is for prefill
 * scratch. requested = 0 picks that, clamped to [1, 8], and says so in msg
 * ("4 (free 61.2 GiB, 6.1 GiB each at ctx 65536)"). requested > 0 is
 * returned when it fits; otherwise -1 and msg names the numbers. */
#define DS4_POOL_MAX_DEFAULT 8
int ds4_pool_sessions_for(int requested, uint64_t free, uint64_t per_session, uint32_t ctx, char *msg,
                          size_t msglen);
typedef struct ds4_pool ds4_pool;
ds4_pool *ds4_pool_new(ds4_engine *e, const ds4_pool_params *p, char *err, size_t errlen);
/* With a store, the pool starts a checkpoint writer thread: every
 * checkpoint below is a snapshot taken on the caller's thread (the session
 * keeps changing) and handed to the writer, which writes it durably
 * (ds4_kvstore_save) while the caller goes on. At most one snapshot waits
 * beyond the one being written; a further hand-over blocks until the
 * writer takes the waiting one (bounded memory). A prompt that a snapshot
 * still with the writer would serve waits for it in ds4_pool_acquire.
 * Frees the sessions after the writer has written everything handed over;
 * call ds4_pool_spill_all first on a clean shutdown. */
void ds4_pool_free(ds4_pool *p);
ds4_session *ds4_pool_session(ds4_pool *p, int slot);

typedef struct {
    int slot;
    ds4_session *session;       /* holds a prefix of the prompt (maybe empty) */
    size_t n_memory;            /* prompt tokens kept from the resident session */
    size_t n_disk;              /* prompt tokens restored from a checkpoint (0: none) */
    bool spilled;               /* the slot's previous content was checkpointed first */
    uint8_t *extra; size_t extra_len;  /* restored checkpoint's extra blob (caller frees) */
} ds4_pool_lease;

/* Route a prompt (ds4_pool_choose with min_share = min_spill = align),
 * spill the chosen slot if it is about to lose a valuable prefix, then bring
 * its session to the longest prefix of the prompt available: its own tokens
 * (truncated when exact) or the best disk checkpoint, whichever is longer.
 * ds4_generate on lease->session then prefills only the rest. -1 + err when
 * the session could not even be emptied. */
int ds4_pool_acquire(ds4_pool *p, const int32_t *prompt, size_t n, ds4_pool_lease *out, char *err,
                     size_t errlen);
/* Optional, before ds4_generate: evaluate the prompt up to each save point
 * (ds4_kv_save_points from the session's length to n_stable) and checkpoint
 * there. n_stable: prompt tokens later requests will repeat (the prompt
 * without its generation suffix). A failed save is logged, not an error.
 * Returns 0, 1 cancelled by progress, -1 when evaluation failed. */
int ds4_pool_prefill(ds4_pool *p, const ds4_pool_lease *l, const int32_t *prompt, size_t n_stable,
                     ds4_progress_fn progress, void *ud, char *err, size_t errlen);
/* During ds4_generate, between tokens (ds4_gen_params.on_step): when the
 * session has just reached a multiple of `every` (the frontiers a prefill
 * of the same text saves), checkpoint it, so a crash or an eviction in a
 * long answer loses at most `every` tokens. O(1) between frontiers. */
void ds4_pool_step(ds4_pool *p, const ds4_pool_lease *l);
/* After ds4_generate: n_prompt tokens of the session were the prompt.
 * Checkpoints the whole session when it grew by `every` since its last one. */
void ds4_pool_release(ds4_pool *p, const ds4_pool_lease *l, size_t n_prompt);
/* Checkpoint a slot's whole content: snapshot now, handed to the writer (no-op
 * when short, already on disk, or already handed over). -1: no snapshot. */
int ds4_pool_checkpoint(ds4_pool *p, int slot, char *err, size_t errlen);
/* Clean shutdown: checkpoint every slot and wait until all is written
 * (ds4_pool_flush). */
int ds4_pool_spill_all(ds4_pool *p, char *err, size_t errlen);
/* Wait until every checkpoint handed over so far is written (or failed).
 * -1 + err (the first failure) when a write failed since the last flush;
 * each failure was also logged when it happened. */
int ds4_pool_flush(ds4_pool *p, char *err, size_t errlen);

/* ---- Generation driver (src/engine/generate.c) -------------------------
 * One loop shared by the CLI and the server: reuse the session's longest
 * exact prefix of the prompt, prefill the rest, then sample token by token,
 * detokenize (UTF-8 safe), apply stop strings, run the DSML parser and report
 * events. Sampling is greedy inside DSML structure (prompt.md §3.5). */
typedef enum {
    DS4_FINISH_STOP, DS4_FINISH_LENGTH, DS4_FINISH_TOOL_CALLS, DS4_FINISH_ERROR, DS4_FINISH_CANCELLED,
} ds4_finish;

typedef struct {
    const ds4_engine *engine;   /* the session's engine: tokenizer, vocab size */
    ds4_sampling sampling;
    int max_tokens;             /* <= 0: until the context is full */
    bool thinking;              /* the prompt ended with <think> */
    bool tools;                 /* recognise DSML tool calls */
    const char *const *stop; int n_stop;  /* stop strings on decoded text */
    ds4_event_fn on_event; void *ud;      /* reasoning/content/tool events */
    ds4_progress_fn on_prefill;           /* prefill progress / cancellation */
    bool (*cancelled)(void *ud);          /* polled between tokens */
    /* Diagnostic for deterministic tests: generated token i < n_forced gets a
     * logit far above every other, so the real sampler, detokenizer, stop
     * logic and DSML parser produce this exact sequence. NULL in normal use. */
    const int32_t *forced; size_t n_forced;
    FILE *trace;                          /* cache decisions, finish (may be NULL) */
    /* Called after each generated token was evaluated (the session holds
     * the prompt and every token so far, with logits): periodic work such as
     * checkpoints (ds4_pool_step). NULL = none. */
    void (*on_step)(void *ud);
} ds4_gen_params;

typedef struct {
    ds4_finish finish;
    size_t n_prompt, n_cached, n_gen;     /* n_cached: prompt tokens reused;
                                             n_gen counts every sampled token, EOS included */
    double prefill_s, gen_s;
    char *text; size_t len;               /* the raw generated text (owned) */
} ds4_gen_result;

/* Returns 0 with r filled (finish says why it ended: a stop string or EOS
 * -> STOP, max_tokens or a full context -> LENGTH, a complete tool-call
 * block -> TOOL_CALLS, a tool block left open or abandoned after its events
 * went out -> ERROR, cancellation -> CANCELLED), or -1 with err when the
 * prompt is empty or does not fit the context, or the engine fails
 * (r->finish = ERROR). r->text is always allocated; free it with
 * ds4_gen_result_free.
 *
 * Prefix reuse: the session is truncated to its longest common prefix with
 * the prompt; when the engine cannot rewind that far exactly, the session
 * restarts from empty (the trace says which). Stop strings: the text is cut
 * before the earliest match and nothing after it reaches the parser; the
 * last (longest stop - 1) bytes are held back until they cannot start one.
 * The session keeps the prompt and every evaluated token. The token that
 * ended generation by itself (EOS, the one completing a stop string or a
 * tool block) is sampled but not evaluated: the next prompt, which replays
 * the turn and closes it with EOS, extends the session from exactly there.
 * A generation cut by max_tokens or by a full context ends with every
 * sampled token evaluated (the context is checked before sampling), so the
 * session holds all the text that was shown and n_gen counts exactly it. */
int ds4_generate(ds4_session *s, const int32_t *prompt, size_t n_prompt, const ds4_gen_params *p,
                 ds4_gen_result *r, char *err, size_t errlen);
void ds4_gen_result_free(ds4_gen_result *r);

/* ---- Files without an engine (src/engine/files.c) ----------------------
 * What the CLI needs before (or instead of) loading weights onto a backend. */
/* `ds4 --inspect`: validate a GGUF and print its layout, parameter count,
 * file size and memory needs for ctx tokens. 0, or -1 with err set. */
int ds4_inspect_file(const char *path, uint64_t ctx, FILE *out, char *err, size_t errlen);
/* The tokenizer of a GGUF alone (no weights bound). */
ds4_tokenizer *ds4_tokenizer_open(const char *path, char *err, size_t errlen);

#endif
