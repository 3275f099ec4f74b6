/* Anthropic Messages (prompt.md §5.3): /v1/messages, plain and streamed. */
#include "server.h"

#include <stdlib.h>
#include <string.h>

typedef enum { BLK_NONE, BLK_THINKING, BLK_TEXT, BLK_TOOL } blk_kind;

typedef struct {
    char *id, *model;
    blk_kind open;                /* the content block being streamed */
    int n_blocks;                 /* blocks started so far (next index) */
    bool visible;                 /* a text or tool_use block was sent */
    char **call_ids; int n_calls;
} an_state;

static void an_free(void *p) {
    an_state *st = p;
    if (!st) return;
    for (int i = 0; i < st->n_calls; i++) free(st->call_ids[i]);
    free(st->call_ids);
    free(st->id);
    free(st->model);
    free(st);
}

static const char *tool_id(an_state *st, int i) {
    while (st->n_calls <= i) {
        char **p = realloc(st->call_ids, sizeof *p * (size_t)(st->n_calls + 1));
        if (!p) return "";
        st->call_ids = p;
        st->call_ids[st->n_calls++] = new_id("toolu_");
    }
    return st->call_ids[i] ? st->call_ids[i] : "";
}

/* input_tokens counts only what was not read from the cache, as Anthropic does. */
static void add_usage(cJSON *u, size_t n_prompt, size_t cached, size_t out) {
    cJSON_AddNumberToObject(u, "input_tokens", (double)(n_prompt - cached));
    cJSON_AddNumberToObject(u, "cache_creation_input_tokens", 0);
    cJSON_AddNumberToObject(u, "cache_read_input_tokens", (double)cached);
    cJSON_AddNumberToObject(u, "output_tokens", (double)out);
}

static cJSON *typed(const char *type) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", type);
    return o;
}

static void block_stop(job *j) {
    an_state *st = j->proto;
    if (st->open == BLK_NONE) return;
    if (st->open == BLK_THINKING) {
        /* Clients send thinking blocks back with their signature; ours is
         * the message id (nothing is verified on replay). */
        cJSON *e = typed("content_block_delta"), *d = typed("signature_delta");
        cJSON_AddNumberToObject(e, "index", st->n_blocks - 1);
        cJSON_AddStringToObject(d, "signature", st->id);
        cJSON_AddItemToObject(e, "delta", d);
        sse_json(j->out, "content_block_delta", e);
    }
    cJSON *e = typed("content_block_stop");
    cJSON_AddNumberToObject(e, "index", st->n_blocks - 1);
    sse_json(j->out, "content_block_stop", e);
    st->open = BLK_NONE;
}

static void block_start(job *j, blk_kind kind, cJSON *block) {
    an_state *st = j->proto;
    block_stop(j);
    cJSON *e = typed("content_block_start");
    cJSON_AddNumberToObject(e, "index", st->n_blocks++);
    cJSON_AddItemToObject(e, "content_block", block);
    sse_json(j->out, "content_block_start", e);
    st->open = kind;
    if (kind != BLK_THINKING) st->visible = true;
}

static void delta(job *j, const char *type, const char *key, const char *text, size_t len) {
    an_state *st = j->proto;
    cJSON *e = typed("content_block_delta"), *d = typed(type);
    cJSON_AddNumberToObject(e, "index", st->n_blocks - 1);
    cJSON_AddItemToObject(d, key, json_strn(text, len));
    cJSON_AddItemToObject(e, "delta", d);
    sse_json(j->out, "content_block_delta", e);
}

static void an_start(job *j) {
    an_state *st = j->proto;
    if (!j->out) return;
    cJSON *e = typed("message_start"), *m = typed("message");
    cJSON_AddStringToObject(m, "id", st->id);
    cJSON_AddStringToObject(m, "role", "assistant");
    cJSON_AddStringToObject(m, "model", st->model);
    cJSON_AddArrayToObject(m, "content");
    cJSON_AddNullToObject(m, "stop_reason");
    cJSON_AddNullToObject(m, "stop_sequence");
    add_usage(cJSON_AddObjectToObject(m, "usage"), j->prompt.n, j->est_cached, 0);
    cJSON_AddItemToObject(e, "message", m);
    sse_json(j->out, "message_start", e);
}

static void an_event(job *j, const ds4_event *ev) {
    an_state *st = j->proto;
    switch (ev->kind) {
    case DS4_EV_REASONING:
        if (st->open != BLK_THINKING) {
            cJSON *b = typed("thinking");
            cJSON_AddStringToObject(b, "thinking", "");
            cJSON_AddStringToObject(b, "signature", "");
            block_start(j, BLK_THINKING, b);
        }
        delta(j, "thinking_delta", "thinking", ev->text, ev->len);
        break;
    case DS4_EV_CONTENT:
        if (st->open != BLK_TEXT) {
            cJSON *b = typed("text");
            cJSON_AddStringToObject(b, "text", "");
            block_start(j, BLK_TEXT, b);
        }
        delta(j, "text_delta", "text", ev->text, ev->len);
        break;
    case DS4_EV_TOOL_BEGIN: {
        cJSON *b = typed("tool_use");
        cJSON_AddStringToObject(b, "id", tool_id(st, ev->index));
        cJSON_AddStringToObject(b, "name", ev->name ? ev->name : "");
        cJSON_AddObjectToObject(b, "input");
        block_start(j, BLK_TOOL, b);
        break;
    }
    case DS4_EV_TOOL_ARGS:
        if (st->open == BLK_TOOL) delta(j, "input_json_delta", "partial_json", ev->text, ev->len);
        break;
    case DS4_EV_TOOL_END:
        block_stop(j);
        break;
    }
}

static void an_finish(job *j) {
    an_state *st = j->proto;
    if (!j->out) return;
    gen_output o;
    gen_output_parse(j, &o);
    gen_output rem = o;
    rem.n_calls = o.n_calls < st->n_calls ? o.n_calls : st->n_calls;
    remember_calls(j->S, st->call_ids, &rem);
    gen_output_free(&o);
    if (j->rc == 0 && j->res.finish == DS4_FINISH_CANCELLED) return;   /* the client left */
    if (j->rc != 0 || j->res.finish == DS4_FINISH_ERROR) {
        /* An engine failure, or a tool block whose start already went out
         * and never closed: the partial tool_use cannot be taken back, so
         * the stream ends in an error event rather than a normal stop. */
        block_stop(j);
        cJSON *e = typed("error"), *err = typed("api_error");
        cJSON_AddStringToObject(err, "message", j->err[0] ? j->err : "generation failed");
        cJSON_AddItemToObject(e, "error", err);
        sse_json(j->out, "error", e);
        return;
    }
    block_stop(j);
    if (!st->visible) {
        /* Only reasoning came out: an empty text block, as in the plain reply. */
        cJSON *b = typed("text");
        cJSON_AddStringToObject(b, "text", "");
        block_start(j, BLK_TEXT, b);
        block_stop(j);
    }
    cJSON *e = typed("message_delta"), *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "stop_reason", finish_anthropic(j->res.finish));
    cJSON_AddNullToObject(d, "stop_sequence");
    cJSON_AddItemToObject(e, "delta", d);
    add_usage(cJSON_AddObjectToObject(e, "usage"), j->res.n_prompt, j->res.n_cached, j->res.n_gen);
    sse_json(j->out, "message_delta", e);
    sse_json(j->out, "message_stop", typed("message_stop"));
}

static const job_ops an_ops = {an_start, an_event, an_finish};

/* system: a string or text blocks joined with "\n"; blocks that are client
 * metadata ("x-anthropic-…") are not instructions and are dropped. */
static char *system_text(arena *a, const cJSON *sys) {
    if (cJSON_IsString(sys)) return ar_strdup(a, sys->valuestring);
    if (!cJSON_IsArray(sys)) return NULL;
    size_t n = 0;
    const cJSON *b;
    cJSON_ArrayForEach(b, sys) { const char *t = json_str(b, "text"); if (t) n += strlen(t) + 1; }
    char *out = ar_alloc(a, n + 1), *p = out;
    if (!out) return NULL;
    cJSON_ArrayForEach(b, sys) {
        const char *t = json_str(b, "text");
        if (!t || strncmp(t, "x-anthropic-", 12) == 0) continue;
        if (p != out) *p++ = '\n';
        size_t k = strlen(t);
        memcpy(p, t, k);
        p += k;
    }
    *p = 0;
    return out;
}

/* Append text to a message's content (blocks concatenate, no separator). */
static void append(arena *a, const char **dst, const char *s) {
    if (!s) return;
    if (!*dst) { *dst = ar_strdup(a, s); return; }
    size_t n1 = strlen(*dst), n2 = strlen(s);
    char *p = ar_alloc(a, n1 + n2 + 1);
    if (!p) return;
    memcpy(p, *dst, n1);
    memcpy(p + n1, s, n2 + 1);
    *dst = p;
}

static int parse_messages(srv *S, chat_req *c, const cJSON *root, char *msg, size_t msglen) {
    const cJSON *system = cJSON_GetObjectItemCaseSensitive(root, "system");
    if (check_content(system, "system", msg, msglen) != 0) return -1;
    char *sys = system_text(&c->ar, system);
    if (sys && *sys) chat_add_msg(c, DS4_ROLE_SYSTEM)->content = sys;
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (!cJSON_IsArray(msgs) || !cJSON_GetArraySize(msgs)) { snprintf(msg, msglen, "messages: a non-empty array is required"); return -1; }
    const cJSON *it;
    cJSON_ArrayForEach(it, msgs) {
        const char *role = json_str(it, "role");
        bool user = role && strcmp(role, "user") == 0;
        if (!user && !(role && strcmp(role, "assistant") == 0)) { snprintf(msg, msglen, "messages: role must be user or assistant"); return -1; }
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(it, "content");
        if (cJSON_IsString(content)) {
            chat_add_msg(c, user ? DS4_ROLE_USER : DS4_ROLE_ASSISTANT)->content = ar_strdup(&c->ar, content->valuestring);
            continue;
        }
        if (!cJSON_IsArray(content)) { snprintf(msg, msglen, "messages: content must be a string or an array of blocks"); return -1; }
        /* A user turn's tool results become tool messages (in order), its
         * text one user message after them; an assistant turn is one message. */
        ds4_chat_msg *m = NULL;
        const cJSON *b;
        cJSON_ArrayForEach(b, content) {
            const char *type = json_str(b, "type");
            if (!type) continue;
            if (user && strcmp(type, "tool_result") == 0) {
                ds4_chat_msg *t = chat_add_msg(c, DS4_ROLE_TOOL);
                if (!t) return -1;
                t->tool_call_id = ar_strdup(&c->ar, json_str(b, "tool_use_id"));
                const cJSON *res = cJSON_GetObjectItemCaseSensitive(b, "content");
                if (check_content(res, "tool_result content", msg, msglen) != 0) return -1;
                const char *tx = json_text(&c->ar, res);
                t->content = tx ? tx : "";
                m = NULL;   /* text after a result starts a new user message */
                continue;
            }
            if (!m) { m = chat_add_msg(c, user ? DS4_ROLE_USER : DS4_ROLE_ASSISTANT); if (!m) return -1; }
            if (strcmp(type, "text") == 0) append(&c->ar, &m->content, json_str(b, "text"));
            else if (!user && strcmp(type, "thinking") == 0) append(&c->ar, &m->reasoning, json_str(b, "thinking"));
            else if (!user && strcmp(type, "tool_use") == 0) {
                if (!json_str(b, "name")) { snprintf(msg, msglen, "tool_use blocks need a name"); return -1; }
                chat_add_call(c, m, S, json_str(b, "id"), json_str(b, "name"), cJSON_GetObjectItemCaseSensitive(b, "input"));
            }
            /* images, documents, redacted thinking: not representable, skipped */
        }
    }
    return 0;
}

/* Tools are schema lines as sent (name, description, input_schema);
 * tool_choice none drops them, auto keeps all, any forces a call of one of
 * them, {"type":"tool"} a call of that one (force_tool_call; all schemas
 * stay in the prompt). */
static int parse_tools(srv *S, chat_req *c, const cJSON *root, char *msg, size_t msglen) {
    const cJSON *choice = cJSON_GetObjectItemCaseSensitive(root, "tool_choice");
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(root, "tools");
    if (check_list(tools, "tools", msg, msglen) != 0) return -1;
    const char *ct = json_str(choice, "type");
    bool tool = ct && strcmp(ct, "tool") == 0;
    if ((choice && !cJSON_IsNull(choice) && !ct) ||
        (ct && !tool && strcmp(ct, "auto") != 0 && strcmp(ct, "any") != 0 && strcmp(ct, "none") != 0)) {
        snprintf(msg, msglen, "tool_choice.type must be \"auto\", \"any\", \"tool\" or \"none\"");
        return -1;
    }
    if (ct && strcmp(ct, "none") == 0) return 0;
    const char *only = tool ? json_str(choice, "name") : NULL;
    if (tool && !only) { snprintf(msg, msglen, "tool_choice: a name is required with type \"tool\""); return -1; }
    const cJSON *t;
    cJSON_ArrayForEach(t, tools) {
        const char *name = json_str(t, "name");
        /* Server-side tools (web search…) have no input_schema: not ours to run. */
        if (!name || !cJSON_GetObjectItemCaseSensitive(t, "input_schema")) continue;
        /* cache_control is a hint to Anthropic's cache, not part of the schema. */
        cJSON *copy = cJSON_Duplicate(t, true);
        cJSON_DeleteItemFromObjectCaseSensitive(copy, "cache_control");
        chat_add_tool(c, name, copy);
        cJSON_Delete(copy);
    }
    if (only || (ct && strcmp(ct, "any") == 0)) return force_tool_call(S, c, only, msg, msglen);
    return 0;
}

/* The whole request parsed and rendered as for /v1/messages. */
static int parse_request(srv *S, struct MHD_Connection *conn, chat_req *c, cJSON *root, ds4_tokens *prompt,
                         unsigned *status, char *msg, size_t msglen) {
    static const char *const max_keys[] = {"max_tokens", NULL};
    const cJSON *effort = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "output_config"), "effort");
    *status = MHD_HTTP_BAD_REQUEST;
    if (parse_common(S, c, root, true, max_keys, effort, "stop_sequences", msg, msglen) != 0 ||
        select_script(S, conn, c, msg, msglen) != 0 ||
        parse_messages(S, c, root, msg, msglen) != 0 || parse_tools(S, c, root, msg, msglen) != 0)
        return -1;
    int st = chat_tokenize(S, c, prompt, msg, msglen);
    if (st) { *status = (unsigned)st; return -1; }
    return 0;
}

static enum MHD_Result request_error(struct MHD_Connection *conn, unsigned status, const char *msg) {
    return send_error(conn, PROTO_ANTHROPIC, status, status == 400 ? "invalid_request_error" : "api_error", NULL, msg);
}

/* Token count of the prompt the request would produce (Claude Code asks). */
enum MHD_Result anthropic_count_tokens(srv *S, struct MHD_Connection *conn, cJSON *root) {
    chat_req c;
    chat_init(&c);
    char msg[256];
    ds4_tokens prompt;
    unsigned status;
    enum MHD_Result ret;
    if (parse_request(S, conn, &c, root, &prompt, &status, msg, sizeof msg) != 0) {
        ret = request_error(conn, status, msg);
    } else {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddNumberToObject(r, "input_tokens", (double)prompt.n);
        ds4_tokens_free(&prompt);
        ret = send_json(conn, MHD_HTTP_OK, r);
    }
    chat_free(&c);
    return ret;
}

enum MHD_Result anthropic_messages(srv *S, struct MHD_Connection *conn, cJSON *root) {
    chat_req c;
    chat_init(&c);
    char msg[256];
    ds4_tokens prompt;
    unsigned status;
    enum MHD_Result ret;
    if (parse_request(S, conn, &c, root, &prompt, &status, msg, sizeof msg) != 0) {
        ret = request_error(conn, status, msg);
        chat_free(&c);
        return ret;
    }
    job *j = chat_job(S, &c, &prompt, conn);
    an_state *st = j ? calloc(1, sizeof *st) : NULL;
    if (st) { st->id = new_id("msg_"); st->model = strdup(c.model); }
    chat_free(&c);
    if (!st) { job_unref(j); return send_error(conn, PROTO_ANTHROPIC, 500, "api_error", NULL, "out of memory"); }
    j->ops = &an_ops;
    j->proto = st;
    j->proto_free = an_free;
    bool ready;
    ret = run_job(S, conn, j, PROTO_ANTHROPIC, &ready);
    if (!ready) return ret;
    gen_output o;
    gen_output_parse(j, &o);
    cJSON *r = typed("message");
    cJSON_AddStringToObject(r, "id", st->id);
    cJSON_AddStringToObject(r, "role", "assistant");
    cJSON_AddStringToObject(r, "model", st->model);
    cJSON *content = cJSON_AddArrayToObject(r, "content");
    if (o.reasoning && *o.reasoning) {
        cJSON *b = typed("thinking");
        cJSON_AddStringToObject(b, "thinking", o.reasoning);
        cJSON_AddStringToObject(b, "signature", st->id);
        cJSON_AddItemToArray(content, b);
    }
    if (*o.content || !o.n_calls) {
        cJSON *b = typed("text");
        cJSON_AddStringToObject(b, "text", o.content);
        cJSON_AddItemToArray(content, b);
    }
    for (int i = 0; i < o.n_calls; i++) {
        cJSON *b = typed("tool_use");
        cJSON_AddStringToObject(b, "id", tool_id(st, i));
        cJSON_AddStringToObject(b, "name", o.calls[i].name);
        cJSON *input = cJSON_Parse(o.calls[i].arguments);
        cJSON_AddItemToObject(b, "input", input ? input : cJSON_CreateObject());
        cJSON_AddItemToArray(content, b);
    }
    remember_calls(S, st->call_ids, &o);
    cJSON_AddStringToObject(r, "stop_reason", finish_anthropic(j->res.finish));
    cJSON_AddNullToObject(r, "stop_sequence");
    add_usage(cJSON_AddObjectToObject(r, "usage"), j->res.n_prompt, j->res.n_cached, j->res.n_gen);
    gen_output_free(&o);
    job_unref(j);
    return send_json(conn, MHD_HTTP_OK, r);
}
