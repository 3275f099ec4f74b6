/* What the three protocols share: the request fields with the same meaning
 * everywhere (prompt.md §5.1), turning a conversation into prompt tokens,
 * queueing the job, and the final parse of what the model wrote. */
#include "server.h"

#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

/* ---- arena ---------------------------------------------------------- */

struct arena_blk { arena_blk *next; max_align_t data[]; };

void *ar_alloc(arena *a, size_t n) {
    arena_blk *b = calloc(1, sizeof *b + n + 1);
    if (!b) return NULL;
    b->next = a->head;
    a->head = b;
    return b->data;
}

char *ar_strndup(arena *a, const char *s, size_t n) {
    char *p = ar_alloc(a, n + 1);
    if (p) { memcpy(p, s, n); p[n] = 0; }
    return p;
}

char *ar_strdup(arena *a, const char *s) { return s ? ar_strndup(a, s, strlen(s)) : NULL; }

void ar_free(arena *a) {
    while (a->head) { arena_blk *n = a->head->next; free(a->head); a->head = n; }
}

/* ---- conversation --------------------------------------------------- */

void chat_init(chat_req *c) { memset(c, 0, sizeof *c); }
void chat_free(chat_req *c) { ar_free(&c->ar); free(c->msgs); free(c->tools); ds4_tokens_free(&c->force_buf); }

ds4_chat_msg *chat_add_msg(chat_req *c, ds4_role role) {
    if (c->n_msgs == c->cap_msgs) {
        int cap = c->cap_msgs ? c->cap_msgs * 2 : 16;
        ds4_chat_msg *m = realloc(c->msgs, sizeof *m * (size_t)cap);
        if (!m) return NULL;
        c->msgs = m; c->cap_msgs = cap;
    }
    ds4_chat_msg *m = &c->msgs[c->n_msgs++];
    memset(m, 0, sizeof *m);
    m->role = role;
    return m;
}

void chat_add_tool(chat_req *c, const char *name, cJSON *schema) {
    char *js = cJSON_PrintUnformatted(schema);
    if (!js || !name) { free(js); return; }
    if (c->n_tools == c->cap_tools) {
        int cap = c->cap_tools ? c->cap_tools * 2 : 8;
        ds4_tool_def *t = realloc(c->tools, sizeof *t * (size_t)cap);
        if (!t) { free(js); return; }
        c->tools = t; c->cap_tools = cap;
    }
    c->tools[c->n_tools].name = ar_strdup(&c->ar, name);
    c->tools[c->n_tools].json = ar_strdup(&c->ar, js);
    c->n_tools++;
    free(js);
}

ds4_tool_call *chat_add_call(chat_req *c, ds4_chat_msg *m, srv *S, const char *id, const char *name, cJSON *args) {
    /* Calls of one message are contiguous: grow a copy in the arena. */
    ds4_tool_call *calls = ar_alloc(&c->ar, sizeof *calls * (size_t)(m->n_tool_calls + 1));
    if (!calls) return NULL;
    if (m->n_tool_calls) memcpy(calls, m->tool_calls, sizeof *calls * (size_t)m->n_tool_calls);
    ds4_tool_call *tc = &calls[m->n_tool_calls];
    memset(tc, 0, sizeof *tc);
    tc->id = ar_strdup(&c->ar, id);
    tc->name = ar_strdup(&c->ar, name ? name : "");
    /* OpenAI sends arguments as a JSON string, Anthropic input as an object. */
    if (cJSON_IsString(args)) tc->arguments = ar_strdup(&c->ar, args->valuestring);
    else if (args) { char *js = cJSON_PrintUnformatted(args); tc->arguments = ar_strdup(&c->ar, js ? js : "{}"); free(js); }
    else tc->arguments = "{}";
    char *raw = toolmap_get(S->tools, id);
    if (raw) { tc->raw_dsml = ar_strdup(&c->ar, raw); free(raw); }
    m->tool_calls = calls;
    m->n_tool_calls++;
    return tc;
}

const char *json_str(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

char *json_text(arena *a, const cJSON *v) {
    if (!v || cJSON_IsNull(v)) return NULL;
    if (cJSON_IsString(v)) return ar_strdup(a, v->valuestring);
    if (!cJSON_IsArray(v)) return NULL;
    size_t n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, v) {
        const char *s = cJSON_IsString(it) ? it->valuestring : json_str(it, "text");
        if (s) n += strlen(s);
    }
    char *out = ar_alloc(a, n + 1), *p = out;
    if (!out) return NULL;
    cJSON_ArrayForEach(it, v) {
        const char *s = cJSON_IsString(it) ? it->valuestring : json_str(it, "text");
        if (s) { size_t k = strlen(s); memcpy(p, s, k); p += k; }
    }
    *p = 0;
    return out;
}

int check_content(const cJSON *v, const char *what, char *msg, size_t msglen) {
    bool ok = !v || cJSON_IsNull(v) || cJSON_IsString(v) || cJSON_IsArray(v);
    const cJSON *it;
    if (cJSON_IsArray(v)) cJSON_ArrayForEach(it, v) ok &= cJSON_IsString(it) || cJSON_IsObject(it);
    if (ok) return 0;
    snprintf(msg, msglen, "%s must be a string or an array of content parts", what);
    return -1;
}

int check_list(const cJSON *v, const char *what, char *msg, size_t msglen) {
    if (!v || cJSON_IsNull(v) || cJSON_IsArray(v)) return 0;
    snprintf(msg, msglen, "%s must be an array", what);
    return -1;
}

int check_openai_choice(const cJSON *choice, char *msg, size_t msglen) {
    const char *s = cJSON_IsString(choice) ? choice->valuestring : NULL;
    if (!choice || cJSON_IsNull(choice) || cJSON_IsObject(choice) ||
        (s && (strcmp(s, "none") == 0 || strcmp(s, "auto") == 0 || strcmp(s, "required") == 0)))
        return 0;
    snprintf(msg, msglen, "tool_choice must be \"none\", \"auto\", \"required\" or an object");
    return -1;
}

/* ---- shared fields -------------------------------------------------- */

/* Thinking effort names (§5.1): "none" turns thinking off, "max" asks for
 * Think Max, every other known level is normal thinking. */
static int apply_effort(chat_req *c, const cJSON *effort, char *msg, size_t msglen) {
    if (!effort || cJSON_IsNull(effort)) return 0;
    if (!cJSON_IsString(effort)) { snprintf(msg, msglen, "reasoning effort must be a string"); return -1; }
    const char *e = effort->valuestring;
    if (strcmp(e, "none") == 0) { c->thinking = false; return 0; }
    if (strcmp(e, "max") == 0) { c->thinking = true; c->think = DS4_THINK_MAX; return 0; }
    static const char *high[] = {"xhigh", "high", "medium", "low", "minimal"};
    for (size_t i = 0; i < sizeof high / sizeof *high; i++)
        if (strcmp(e, high[i]) == 0) { c->thinking = true; c->think = DS4_THINK_HIGH; return 0; }
    snprintf(msg, msglen, "unknown reasoning effort \"%.40s\" (none, minimal, low, medium, high, xhigh, max)", e);
    return -1;
}

/* A numeric field: absent/null keeps dflt; any other non-number is an error. */
static int num_field(const cJSON *o, const char *key, float *v, char *msg, size_t msglen) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!x || cJSON_IsNull(x)) return 0;
    if (!cJSON_IsNumber(x)) { snprintf(msg, msglen, "%s must be a number", key); return -1; }
    *v = (float)x->valuedouble;
    return 0;
}

#define MAX_STOPS 16
#define MAX_STOP_LEN 256

cJSON *json_strn(const char *s, size_t n) {
    char *t = malloc(n + 1);
    if (!t) return cJSON_CreateString("");
    memcpy(t, s, n);
    t[n] = 0;
    cJSON *v = cJSON_CreateString(t);
    free(t);
    return v;
}

int parse_common(srv *S, chat_req *c, const cJSON *root, bool default_thinking, const char *const *max_keys,
                 const cJSON *effort, const char *stop_key, char *msg, size_t msglen) {
    /* A value of the wrong type is an error, not the default: "stream":
     * "true" answered as one JSON body would break the client that asked. */
    const cJSON *mv = cJSON_GetObjectItemCaseSensitive(root, "model"), *sv = cJSON_GetObjectItemCaseSensitive(root, "stream");
    if (mv && !cJSON_IsNull(mv) && !cJSON_IsString(mv)) { snprintf(msg, msglen, "model must be a string"); return -1; }
    if (sv && !cJSON_IsNull(sv) && !cJSON_IsBool(sv)) { snprintf(msg, msglen, "stream must be a boolean"); return -1; }
    const char *model = json_str(root, "model");
    c->model = ar_strdup(&c->ar, model ? model : S->cfg.model_name);
    c->stream = cJSON_IsTrue(sv);
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    c->include_usage = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(so, "include_usage"));

    /* Thinking: on by default; the model aliases decide when no explicit
     * field does; then the explicit fields; then the effort level. */
    c->thinking = default_thinking;
    c->think = DS4_THINK_HIGH;
    if (model && strcmp(model, "deepseek-chat") == 0) c->thinking = false;
    if (model && strcmp(model, "deepseek-reasoner") == 0) c->thinking = true;
    const cJSON *th = cJSON_GetObjectItemCaseSensitive(root, "thinking");
    if (!th) th = cJSON_GetObjectItemCaseSensitive(root, "think");
    if (cJSON_IsBool(th)) c->thinking = cJSON_IsTrue(th);
    else if (cJSON_IsObject(th)) {
        const char *type = json_str(th, "type");
        if (type && strcmp(type, "disabled") == 0) c->thinking = false;
        else if (type && (strcmp(type, "enabled") == 0 || strcmp(type, "adaptive") == 0)) c->thinking = true;
        else { snprintf(msg, msglen, "thinking.type must be \"enabled\" or \"disabled\""); return -1; }
    } else if (th && !cJSON_IsNull(th)) { snprintf(msg, msglen, "thinking must be a boolean or an object"); return -1; }
    if (apply_effort(c, effort, msg, msglen) != 0) return -1;

    /* Thinking mode samples as DeepSeek's service does, ignoring client
     * values; without thinking the client's values apply (§5.1). */
    c->sampling = ds4_sampling_defaults(c->thinking);
    ds4_sampling client = c->sampling;
    float top_k = (float)client.top_k;
    if (num_field(root, "temperature", &client.temperature, msg, msglen) || num_field(root, "top_p", &client.top_p, msg, msglen) ||
        num_field(root, "top_k", &top_k, msg, msglen) || num_field(root, "min_p", &client.min_p, msg, msglen))
        return -1;
    if (!c->thinking) {
        client.top_k = top_k < 0 ? 0 : top_k > 1e6f ? 1000000 : (int)top_k;
        c->sampling = client;
    }
    const cJSON *seed = cJSON_GetObjectItemCaseSensitive(root, "seed");
    if (cJSON_IsNumber(seed)) {
        if (seed->valuedouble < 0 || seed->valuedouble >= 1.8e19) { snprintf(msg, msglen, "seed must be a non-negative integer"); return -1; }
        c->sampling.seed = (uint64_t)seed->valuedouble;
    } else if (seed && !cJSON_IsNull(seed)) {
        snprintf(msg, msglen, "seed must be a non-negative integer");
        return -1;
    } else if (getrandom(&c->sampling.seed, sizeof c->sampling.seed, 0) != sizeof c->sampling.seed)
        c->sampling.seed = (uint64_t)time(NULL);
    if (c->sampling.temperature < 0 || c->sampling.top_p <= 0 || c->sampling.top_p > 1 || c->sampling.min_p < 0 || c->sampling.min_p > 1) {
        snprintf(msg, msglen, "sampling parameters out of range");
        return -1;
    }

    c->max_tokens = 0;
    for (int i = 0; max_keys[i]; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, max_keys[i]);
        if (!v || cJSON_IsNull(v)) continue;
        if (!cJSON_IsNumber(v) || v->valuedouble < 1) { snprintf(msg, msglen, "%s must be a positive integer", max_keys[i]); return -1; }
        c->max_tokens = v->valuedouble > 1e9 ? 1000000000 : (int)v->valuedouble;
        break;
    }

    const cJSON *st = stop_key ? cJSON_GetObjectItemCaseSensitive(root, stop_key) : NULL;
    if (st && !cJSON_IsNull(st)) {
        int n = cJSON_IsString(st) ? 1 : cJSON_IsArray(st) ? cJSON_GetArraySize(st) : -1;
        if (n < 0 || n > MAX_STOPS) { snprintf(msg, msglen, "%s: a string or up to %d strings", stop_key, MAX_STOPS); return -1; }
        c->stop = ar_alloc(&c->ar, sizeof *c->stop * (size_t)(n + 1));
        const cJSON *it = cJSON_IsString(st) ? st : st->child;
        for (int i = 0; i < n; i++, it = it->next) {
            if (!cJSON_IsString(it) || strlen(it->valuestring) > MAX_STOP_LEN) {
                snprintf(msg, msglen, "%s: each entry a string of at most %d bytes", stop_key, MAX_STOP_LEN);
                return -1;
            }
            if (*it->valuestring) c->stop[c->n_stop++] = ar_strdup(&c->ar, it->valuestring);
        }
    }
    return 0;
}

int select_script(srv *S, struct MHD_Connection *conn, chat_req *c, char *msg, size_t msglen) {
    const char *name = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-DS4-Test-Script");
    if (!name) return 0;
    for (int i = 0; i < S->n_scripts; i++) {
        if (strcmp(S->script_names[i], name) == 0) {
            c->forced = S->scripts[i].ids;
            c->n_forced = S->scripts[i].n;
            return 0;
        }
    }
    snprintf(msg, msglen, "no test script named \"%.60s\" (see --test-script)", name);
    return -1;
}

/* A named tool is forced by its name alone: every tool stays in the
 * prompt, so the tools block, and the KV prefix, are the same as in the
 * conversation's other turns.
 *
 * A forced call must start the model's visible output. In thinking mode
 * the prompt ends with <think>, and the block could only follow the model's
 * own </think>, at a point nobody can predict; so </think> is forced first
 * (an empty reasoning). Rendering the turn without thinking instead would
 * change how the whole history renders (<think> transitions become
 * </think>): the live KV prefix would be lost now and again on the next
 * turn. With </think> forced, the turn as the client sends it back renders
 * to exactly the tokens the session holds. */
int force_tool_call(srv *S, chat_req *c, const char *name, char *msg, size_t msglen) {
    bool known = !name && c->n_tools;
    for (int i = 0; name && i < c->n_tools; i++) known |= strcmp(c->tools[i].name, name) == 0;
    if (!known) {
        snprintf(msg, msglen, name ? "tool_choice names \"%.60s\", which is not among the tools"
                                   : "tool_choice requires a tool call, but no tools were given", name);
        return -1;
    }
    char head[512];
    const char *close = c->thinking ? "</think>" : "";
    int n = name ? snprintf(head, sizeof head, "%s\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"%s\">\n", close, name)
                 : snprintf(head, sizeof head, "%s\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"", close);
    /* The name goes between forced quotes: nothing that would end them or
     * spell a control token (U+FF5C is in every DSML/special spelling). */
    if (n < 0 || (size_t)n >= sizeof head || (name && (strpbrk(name, "\"<>\n") || strstr(name, "｜")))) {
        snprintf(msg, msglen, "tool_choice: unusable tool name");
        return -1;
    }
    ds4_tokens t = {0};
    if (ds4_tokenize_special(S->tok, head, (size_t)n, &t) != 0) {
        ds4_tokens_free(&t);
        snprintf(msg, msglen, "tool_choice: cannot tokenize the forced call");
        return -1;
    }
    /* A test script (X-DS4-Test-Script) then forces what follows. */
    for (size_t i = 0; i < c->n_forced; i++) ds4_tokens_push(&t, c->forced[i]);
    ds4_tokens_free(&c->force_buf);
    c->force_buf = t;
    c->forced = t.ids;
    c->n_forced = t.n;
    return 0;
}

int chat_tokenize(srv *S, chat_req *c, ds4_tokens *out, char *msg, size_t msglen) {
    ds4_chat chat = {
        .msgs = c->msgs, .n_msgs = c->n_msgs,
        .tools = c->tools, .n_tools = c->n_tools,
        .think = c->thinking ? c->think : DS4_THINK_NONE,
        .ctx = S->cfg.ctx,
        .add_generation_prompt = true,
    };
    ds4_rendered r = {0};
    char err[256] = "";
    if (ds4_chat_render(&chat, &r, err, sizeof err) != 0) {
        snprintf(msg, msglen, "cannot render the conversation: %s", err);
        ds4_rendered_free(&r);
        return MHD_HTTP_BAD_REQUEST;
    }
    memset(out, 0, sizeof *out);
    int rc = ds4_tokenize_rendered(S->tok, &r, out);
    if (S->trace) srv_trace(S, "---- prompt (%zu bytes, thinking %d, %d tools)\n%.*s\n----\n",
                            r.len, c->thinking, c->n_tools, (int)r.len, r.text);
    ds4_rendered_free(&r);
    if (rc != 0) { snprintf(msg, msglen, "cannot tokenize the prompt"); ds4_tokens_free(out); return MHD_HTTP_INTERNAL_SERVER_ERROR; }
    uint32_t ctx = S->cfg.ctx;
    if (out->n >= ctx) {
        snprintf(msg, msglen, "This model's maximum context length is %u tokens. However, your messages resulted in %zu tokens.", ctx, out->n);
        ds4_tokens_free(out);
        return MHD_HTTP_BAD_REQUEST;
    }
    return 0;
}

job *chat_job(srv *S, chat_req *c, ds4_tokens *prompt, struct MHD_Connection *conn) {
    job *j = job_new(S);
    if (!j) return NULL;
    j->prompt = *prompt;
    memset(prompt, 0, sizeof *prompt);
    j->gp.sampling = c->sampling;
    j->gp.max_tokens = c->max_tokens;
    j->gp.thinking = c->thinking;
    j->gp.tools = c->n_tools > 0;
    if (c->n_forced && (j->forced = malloc(sizeof *j->forced * c->n_forced))) {
        memcpy(j->forced, c->forced, sizeof *j->forced * c->n_forced);
        j->n_forced = c->n_forced;
    } else if (c->n_forced) {
        job_unref(j);
        return NULL;
    }
    if (c->n_stop) {
        j->stop = calloc((size_t)c->n_stop, sizeof *j->stop);
        for (int i = 0; j->stop && i < c->n_stop; i++) if ((j->stop[i] = strdup(c->stop[i]))) j->n_stop++;
    }
    if (c->stream) j->out = sse_new(S->cfg.keepalive_s);
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    /* Our own descriptor for the disconnect probe, valid even after MHD closes its own. */
    if (ci) j->fd = dup(ci->connect_fd);
    return j;
}

enum MHD_Result run_job(srv *S, struct MHD_Connection *conn, job *j, proto_kind pk, bool *ready) {
    *ready = false;
    int rc = job_submit(j);
    if (rc != 0) {
        job_unref(j);
        return send_error(conn, pk, MHD_HTTP_SERVICE_UNAVAILABLE, pk == PROTO_ANTHROPIC ? "overloaded_error" : "server_error",
                          "server_busy", rc == -2 ? "server shutting down" : "server busy: request queue full, retry later");
    }
    if (j->out) {
        enum MHD_Result ret = send_sse(conn, j->out);
        job_unref(j);
        return ret;
    }
    job_wait(j);
    if (j->res.finish == DS4_FINISH_CANCELLED) { job_unref(j); return send_cancelled(conn, pk); }
    if (j->rc != 0) {
        enum MHD_Result ret = send_error(conn, pk, 500, pk == PROTO_ANTHROPIC ? "api_error" : "server_error", NULL, j->err);
        job_unref(j);
        return ret;
    }
    *ready = true;
    return MHD_YES;
}

enum MHD_Result send_cancelled(struct MHD_Connection *conn, proto_kind pk) {
    return send_error(conn, pk, MHD_HTTP_SERVICE_UNAVAILABLE, pk == PROTO_ANTHROPIC ? "overloaded_error" : "server_error",
                      "cancelled", "request cancelled: the server is shutting down");
}

/* ---- results -------------------------------------------------------- */

/* A thinking generation that never closed its reasoning (length, cancel)
 * parses as all reasoning, no content (§4). */
void gen_output_parse(job *j, gen_output *o) {
    memset(o, 0, sizeof *o);
    const char *text = j->res.text ? j->res.text : "";
    if (ds4_parse_output(text, j->res.len, j->gp.thinking, j->gp.tools, &o->raw) != 0) {
        memset(&o->raw, 0, sizeof o->raw);
        o->content = (char *)text;
        return;
    }
    o->reasoning = o->raw.reasoning;
    o->content = o->raw.content ? o->raw.content : "";
    o->calls = o->raw.calls;
    o->n_calls = o->raw.n_calls;
}

void gen_output_free(gen_output *o) { ds4_parsed_free(&o->raw); }

void remember_calls(srv *S, char *const *ids, const gen_output *o) {
    for (int i = 0; i < o->n_calls; i++) {
        if (!ids[i] || !o->calls[i].raw_dsml) continue;
        toolmap_put(S->tools, ids[i], o->calls[i].raw_dsml);
        srv_trace(S, "tool call %s: %s %s\n", ids[i], o->calls[i].name, o->calls[i].arguments);
    }
}

char *new_id(const char *prefix) {
    unsigned char r[16];
    if (getrandom(r, sizeof r, 0) != sizeof r) {
        /* No entropy source: a counter is still unique within the process. */
        static atomic_uint_fast64_t ctr;
        uint64_t v = atomic_fetch_add(&ctr, 1) ^ (uint64_t)time(NULL) << 20;
        memcpy(r, &v, 8); memcpy(r + 8, &v, 8);
    }
    size_t pl = strlen(prefix);
    char *id = malloc(pl + 33);
    if (!id) return NULL;
    memcpy(id, prefix, pl);
    for (int i = 0; i < 16; i++) snprintf(id + pl + 2 * i, 3, "%02x", r[i]);
    return id;
}

const char *finish_openai(ds4_finish f) {
    switch (f) {
    case DS4_FINISH_STOP: return "stop";
    case DS4_FINISH_LENGTH: return "length";
    case DS4_FINISH_TOOL_CALLS: return "tool_calls";
    case DS4_FINISH_CANCELLED: return "stop";
    default: return "error";
    }
}

const char *finish_anthropic(ds4_finish f) {
    switch (f) {
    case DS4_FINISH_LENGTH: return "max_tokens";
    case DS4_FINISH_TOOL_CALLS: return "tool_use";
    default: return "end_turn";
    }
}
