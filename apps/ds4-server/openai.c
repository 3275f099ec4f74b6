/* OpenAI Chat Completions, legacy Completions and the model list
 * (prompt.md §5.2). */
#include "server.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    bool completions;             /* /v1/completions shapes */
    char *id, *model;
    long created;
    bool include_usage;
    char **call_ids; int n_calls;
} oa_state;

static void oa_free(void *p) {
    oa_state *st = p;
    if (!st) return;
    for (int i = 0; i < st->n_calls; i++) free(st->call_ids[i]);
    free(st->call_ids);
    free(st->id);
    free(st->model);
    free(st);
}

static oa_state *oa_new(const chat_req *c, bool completions) {
    oa_state *st = calloc(1, sizeof *st);
    if (!st) return NULL;
    st->completions = completions;
    st->id = new_id(completions ? "cmpl-" : "chatcmpl-");
    st->model = strdup(c->model);
    st->created = (long)time(NULL);
    st->include_usage = c->include_usage;
    return st;
}

/* Id of streamed call i, made when its header is first seen. */
static const char *call_id(oa_state *st, int i, const char *prefix) {
    while (st->n_calls <= i) {
        char **p = realloc(st->call_ids, sizeof *p * (size_t)(st->n_calls + 1));
        if (!p) return "";
        st->call_ids = p;
        st->call_ids[st->n_calls++] = new_id(prefix);
    }
    return st->call_ids[i] ? st->call_ids[i] : "";
}

static cJSON *usage_json(const job *j) {
    cJSON *u = cJSON_CreateObject();
    cJSON_AddNumberToObject(u, "prompt_tokens", (double)j->res.n_prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", (double)j->res.n_gen);
    cJSON_AddNumberToObject(u, "total_tokens", (double)(j->res.n_prompt + j->res.n_gen));
    cJSON *d = cJSON_AddObjectToObject(u, "prompt_tokens_details");
    cJSON_AddNumberToObject(d, "cached_tokens", (double)j->res.n_cached);
    return u;
}

/* One streamed chunk around a choice delta (chat) or text (completions). */
static cJSON *chunk(const oa_state *st, cJSON *delta_or_text, const char *finish) {
    cJSON *c = cJSON_CreateObject();
    cJSON_AddStringToObject(c, "id", st->id);
    cJSON_AddStringToObject(c, "object", st->completions ? "text_completion" : "chat.completion.chunk");
    cJSON_AddNumberToObject(c, "created", (double)st->created);
    cJSON_AddStringToObject(c, "model", st->model);
    cJSON *choices = cJSON_AddArrayToObject(c, "choices");
    if (delta_or_text) {
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddNumberToObject(ch, "index", 0);
        cJSON_AddItemToObject(ch, st->completions ? "text" : "delta", delta_or_text);
        cJSON_AddNullToObject(ch, "logprobs");
        if (finish) cJSON_AddStringToObject(ch, "finish_reason", finish); else cJSON_AddNullToObject(ch, "finish_reason");
        cJSON_AddItemToArray(choices, ch);
    }
    return c;
}

static void oa_event(job *j, const ds4_event *ev) {
    oa_state *st = j->proto;
    if (st->completions) {
        if (ev->kind == DS4_EV_CONTENT) sse_json(j->out, NULL, chunk(st, json_strn(ev->text, ev->len), NULL));
        return;   /* reasoning and tool calls have no completions shape */
    }
    cJSON *d = cJSON_CreateObject();
    switch (ev->kind) {
    case DS4_EV_REASONING: cJSON_AddItemToObject(d, "reasoning_content", json_strn(ev->text, ev->len)); break;
    case DS4_EV_CONTENT: cJSON_AddItemToObject(d, "content", json_strn(ev->text, ev->len)); break;
    case DS4_EV_TOOL_BEGIN:
    case DS4_EV_TOOL_ARGS: {
        cJSON *tc = cJSON_CreateObject(), *fn = cJSON_CreateObject();
        cJSON_AddNumberToObject(tc, "index", ev->index);
        if (ev->kind == DS4_EV_TOOL_BEGIN) {
            cJSON_AddStringToObject(tc, "id", call_id(st, ev->index, "call_"));
            cJSON_AddStringToObject(tc, "type", "function");
            cJSON_AddStringToObject(fn, "name", ev->name ? ev->name : "");
            cJSON_AddStringToObject(fn, "arguments", "");
        } else {
            cJSON_AddItemToObject(fn, "arguments", json_strn(ev->text, ev->len));
        }
        cJSON_AddItemToObject(tc, "function", fn);
        cJSON_AddItemToArray(cJSON_AddArrayToObject(d, "tool_calls"), tc);
        break;
    }
    case DS4_EV_TOOL_END: cJSON_Delete(d); return;
    }
    sse_json(j->out, NULL, chunk(st, d, NULL));
}

static void oa_finish(job *j) {
    oa_state *st = j->proto;
    if (!j->out) return;          /* non-streaming: the connection thread answers */
    gen_output o;
    gen_output_parse(j, &o);
    /* Streamed ids -> the blocks just sampled, for exact replay next turn. */
    int n = o.n_calls < st->n_calls ? o.n_calls : st->n_calls;
    gen_output rem = o;
    rem.n_calls = n;
    remember_calls(j->S, st->call_ids, &rem);
    gen_output_free(&o);
    if (j->rc == 0 && j->res.finish == DS4_FINISH_CANCELLED) return;   /* the client left */
    if (j->rc != 0) {
        cJSON *e = cJSON_CreateObject(), *root = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "message", j->err);
        cJSON_AddStringToObject(e, "type", "server_error");
        cJSON_AddItemToObject(root, "error", e);
        sse_json(j->out, NULL, root);
    } else {
        cJSON *last = st->completions ? cJSON_CreateString("") : cJSON_CreateObject();
        sse_json(j->out, NULL, chunk(st, last, finish_openai(j->res.finish)));
        if (st->include_usage) {
            cJSON *u = chunk(st, NULL, NULL);
            cJSON_AddItemToObject(u, "usage", usage_json(j));
            sse_json(j->out, NULL, u);
        }
    }
    sse_write(j->out, "data: [DONE]\n\n", 14);
}

static const job_ops oa_ops = {NULL, oa_event, oa_finish};

/* Queue the job; stream it, or wait and answer with the whole result. */
static enum MHD_Result oa_run(srv *S, struct MHD_Connection *conn, chat_req *c, ds4_tokens *prompt, bool completions) {
    job *j = chat_job(S, c, prompt, conn);
    oa_state *st = j ? oa_new(c, completions) : NULL;
    if (!st) { job_unref(j); return send_error(conn, PROTO_OPENAI, 500, "server_error", NULL, "out of memory"); }
    j->ops = &oa_ops;
    j->proto = st;
    j->proto_free = oa_free;
    if (j->out) {
        /* The role chunk goes out first, before any queueing: clients see
         * the stream open at once. */
        if (!completions) {
            cJSON *d = cJSON_CreateObject();
            cJSON_AddStringToObject(d, "role", "assistant");
            cJSON_AddStringToObject(d, "content", "");
            sse_json(j->out, NULL, chunk(st, d, NULL));
        }
    }
    bool ready;
    enum MHD_Result ret = run_job(S, conn, j, PROTO_OPENAI, &ready);
    if (!ready) return ret;
    gen_output o;
    gen_output_parse(j, &o);
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "id", st->id);
    cJSON_AddStringToObject(root, "object", completions ? "text_completion" : "chat.completion");
    cJSON_AddNumberToObject(root, "created", (double)st->created);
    cJSON_AddStringToObject(root, "model", st->model);
    cJSON *ch = cJSON_CreateObject();
    cJSON_AddNumberToObject(ch, "index", 0);
    if (completions) {
        cJSON_AddStringToObject(ch, "text", o.content);
        if (o.reasoning && *o.reasoning) cJSON_AddStringToObject(ch, "reasoning_content", o.reasoning);
        cJSON_AddNullToObject(ch, "logprobs");
    } else {
        cJSON *m = cJSON_AddObjectToObject(ch, "message");
        cJSON_AddStringToObject(m, "role", "assistant");
        if (*o.content || !o.n_calls) cJSON_AddStringToObject(m, "content", o.content);
        else cJSON_AddNullToObject(m, "content");
        if (o.reasoning && *o.reasoning) cJSON_AddStringToObject(m, "reasoning_content", o.reasoning);
        if (o.n_calls) {
            cJSON *tcs = cJSON_AddArrayToObject(m, "tool_calls");
            for (int i = 0; i < o.n_calls; i++) {
                cJSON *tc = cJSON_CreateObject(), *fn = cJSON_CreateObject();
                cJSON_AddStringToObject(tc, "id", call_id(st, i, "call_"));
                cJSON_AddStringToObject(tc, "type", "function");
                cJSON_AddStringToObject(fn, "name", o.calls[i].name);
                cJSON_AddStringToObject(fn, "arguments", o.calls[i].arguments);
                cJSON_AddItemToObject(tc, "function", fn);
                cJSON_AddItemToArray(tcs, tc);
            }
            remember_calls(S, st->call_ids, &o);
        }
    }
    cJSON_AddStringToObject(ch, "finish_reason", finish_openai(j->res.finish));
    cJSON_AddItemToArray(cJSON_AddArrayToObject(root, "choices"), ch);
    cJSON_AddItemToObject(root, "usage", usage_json(j));
    gen_output_free(&o);
    job_unref(j);
    return send_json(conn, MHD_HTTP_OK, root);
}

static enum MHD_Result bad_request(struct MHD_Connection *conn, chat_req *c, const char *msg) {
    enum MHD_Result r = send_error(conn, PROTO_OPENAI, MHD_HTTP_BAD_REQUEST, "invalid_request_error", NULL, msg);
    chat_free(c);
    return r;
}

static enum MHD_Result tokenize_and_run(srv *S, struct MHD_Connection *conn, chat_req *c, bool completions) {
    char msg[256];
    ds4_tokens prompt;
    int st = chat_tokenize(S, c, &prompt, msg, sizeof msg);
    if (st) {
        enum MHD_Result r = send_error(conn, PROTO_OPENAI, (unsigned)st, st == 400 ? "invalid_request_error" : "server_error",
                                       st == 400 && strstr(msg, "context length") ? "context_length_exceeded" : NULL, msg);
        chat_free(c);
        return r;
    }
    enum MHD_Result r = oa_run(S, conn, c, &prompt, completions);
    chat_free(c);
    return r;
}

static int parse_messages(srv *S, chat_req *c, const cJSON *msgs, char *msg, size_t msglen) {
    if (!cJSON_IsArray(msgs) || !cJSON_GetArraySize(msgs)) { snprintf(msg, msglen, "messages must be a non-empty array"); return -1; }
    const cJSON *it;
    cJSON_ArrayForEach(it, msgs) {
        const char *role = json_str(it, "role");
        if (!role) { snprintf(msg, msglen, "every message needs a role"); return -1; }
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(it, "content");
        ds4_chat_msg *m;
        if (strcmp(role, "system") == 0) m = chat_add_msg(c, DS4_ROLE_SYSTEM);
        else if (strcmp(role, "developer") == 0) m = chat_add_msg(c, DS4_ROLE_DEVELOPER);
        else if (strcmp(role, "user") == 0) m = chat_add_msg(c, DS4_ROLE_USER);
        else if (strcmp(role, "assistant") == 0) m = chat_add_msg(c, DS4_ROLE_ASSISTANT);
        else if (strcmp(role, "tool") == 0 || strcmp(role, "function") == 0) m = chat_add_msg(c, DS4_ROLE_TOOL);
        else { snprintf(msg, msglen, "unknown role \"%.40s\"", role); return -1; }
        if (!m) { snprintf(msg, msglen, "out of memory"); return -1; }
        if (check_content(content, "messages[].content", msg, msglen) != 0) return -1;
        m->content = json_text(&c->ar, content);
        if (m->role == DS4_ROLE_TOOL) m->tool_call_id = ar_strdup(&c->ar, json_str(it, "tool_call_id"));
        if (m->role != DS4_ROLE_ASSISTANT) continue;
        const char *rc = json_str(it, "reasoning_content");
        if (!rc) rc = json_str(it, "reasoning");
        m->reasoning = ar_strdup(&c->ar, rc);
        const cJSON *tc, *tcs = cJSON_GetObjectItemCaseSensitive(it, "tool_calls");
        if (check_list(tcs, "messages[].tool_calls", msg, msglen) != 0) return -1;
        cJSON_ArrayForEach(tc, tcs) {
            const cJSON *fn = cJSON_GetObjectItemCaseSensitive(tc, "function");
            if (!json_str(fn, "name")) { snprintf(msg, msglen, "tool_calls[].function.name is required"); return -1; }
            chat_add_call(c, m, S, json_str(tc, "id"), json_str(fn, "name"), cJSON_GetObjectItemCaseSensitive(fn, "arguments"));
        }
    }
    return 0;
}

/* tools + tool_choice: "none" drops the tools block; "auto" keeps them all;
 * "required" forces a call of one of them, a named function a call of that
 * one (force_tool_call; all schemas stay in the prompt). */
static int parse_tools(srv *S, chat_req *c, const cJSON *root, char *msg, size_t msglen) {
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(root, "tools");
    const cJSON *choice = cJSON_GetObjectItemCaseSensitive(root, "tool_choice");
    if (check_list(tools, "tools", msg, msglen) != 0) return -1;
    if (check_openai_choice(choice, msg, msglen) != 0) return -1;
    if (cJSON_IsString(choice) && strcmp(choice->valuestring, "none") == 0) return 0;
    const char *only = NULL;
    if (cJSON_IsObject(choice)) {
        const char *type = json_str(choice, "type");
        only = json_str(cJSON_GetObjectItemCaseSensitive(choice, "function"), "name");
        if (!only && type && strcmp(type, "function") == 0) { snprintf(msg, msglen, "tool_choice: function.name is required"); return -1; }
    }
    const cJSON *t;
    cJSON_ArrayForEach(t, tools) {
        cJSON *fn = cJSON_GetObjectItemCaseSensitive(t, "function");
        const char *name = json_str(fn, "name");
        if (!name) { snprintf(msg, msglen, "tools[].function.name is required"); return -1; }
        chat_add_tool(c, name, fn);
    }
    if (only || (cJSON_IsString(choice) && strcmp(choice->valuestring, "required") == 0))
        return force_tool_call(S, c, only, msg, msglen);
    return 0;
}

enum MHD_Result openai_chat(srv *S, struct MHD_Connection *conn, cJSON *root) {
    chat_req c;
    chat_init(&c);
    char msg[256];
    static const char *const max_keys[] = {"max_completion_tokens", "max_tokens", NULL};
    if (parse_common(S, &c, root, true, max_keys, cJSON_GetObjectItemCaseSensitive(root, "reasoning_effort"), "stop", msg, sizeof msg) != 0 ||
        select_script(S, conn, &c, msg, sizeof msg) != 0 ||
        parse_messages(S, &c, cJSON_GetObjectItemCaseSensitive(root, "messages"), msg, sizeof msg) != 0 ||
        parse_tools(S, &c, root, msg, sizeof msg) != 0)
        return bad_request(conn, &c, msg);
    return tokenize_and_run(S, conn, &c, false);
}

/* The raw prompt becomes one user turn under ds4's fixed system line
 * (prompt.md §2.6). Thinking is off unless asked for: a completion is
 * expected to continue with visible text. */
enum MHD_Result openai_completions(srv *S, struct MHD_Connection *conn, cJSON *root) {
    chat_req c;
    chat_init(&c);
    char msg[256];
    static const char *const max_keys[] = {"max_tokens", NULL};
    if (parse_common(S, &c, root, false, max_keys, cJSON_GetObjectItemCaseSensitive(root, "reasoning_effort"), "stop", msg, sizeof msg) != 0 ||
        select_script(S, conn, &c, msg, sizeof msg) != 0)
        return bad_request(conn, &c, msg);
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    if (cJSON_IsArray(p) && cJSON_GetArraySize(p) == 1) p = p->child;
    if (!cJSON_IsString(p)) return bad_request(conn, &c, "prompt must be a string");
    chat_add_msg(&c, DS4_ROLE_SYSTEM)->content = "You are a helpful assistant";
    chat_add_msg(&c, DS4_ROLE_USER)->content = ar_strdup(&c.ar, p->valuestring);
    return tokenize_and_run(S, conn, &c, true);
}

static cJSON *model_obj(const char *id) {
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", id);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", 0);
    cJSON_AddStringToObject(m, "owned_by", "ds4");
    return m;
}

enum MHD_Result openai_models(srv *S, struct MHD_Connection *conn, const char *id) {
    /* The served model under its name, plus the DeepSeek API aliases that
     * pick the thinking mode (§5.1). */
    const char *names[] = {S->cfg.model_name, "deepseek-chat", "deepseek-reasoner"};
    if (id) {
        for (size_t i = 0; i < 3; i++)
            if (strcmp(id, names[i]) == 0) return send_json(conn, MHD_HTTP_OK, model_obj(id));
        return send_error(conn, PROTO_OPENAI, MHD_HTTP_NOT_FOUND, "invalid_request_error", "model_not_found", "no such model");
    }
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(root, "data");
    for (size_t i = 0; i < 3; i++) cJSON_AddItemToArray(data, model_obj(names[i]));
    return send_json(conn, MHD_HTTP_OK, root);
}
