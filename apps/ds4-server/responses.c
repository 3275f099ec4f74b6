/* OpenAI Responses API (prompt.md §5.4): /v1/responses, plain and streamed.
 * Stateless: every request carries the whole input (no previous_response_id). */
#include "server.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef enum { IT_NONE, IT_REASONING, IT_MESSAGE, IT_CALL, IT_CUSTOM } item_kind;

typedef struct {
    char *id, *model;
    long created;
    int seq;                      /* sequence_number of the next event */
    /* streaming: the output item being written */
    item_kind open;
    int n_items;                  /* output_index of the next item */
    char *text; size_t len, cap;  /* its text so far (for the .done events) */
    char *call_name;
    /* ids shared by the streamed items and the final response object */
    char *rs_id, *msg_id;
    char **fc_ids, **call_ids; int n_calls;
    cJSON *custom;                /* names of freeform ("custom") tools */
} rs_state;

static void rs_free(void *p) {
    rs_state *st = p;
    if (!st) return;
    for (int i = 0; i < st->n_calls; i++) { free(st->fc_ids[i]); free(st->call_ids[i]); }
    free(st->fc_ids); free(st->call_ids);
    free(st->id); free(st->model); free(st->text); free(st->call_name);
    free(st->rs_id); free(st->msg_id);
    cJSON_Delete(st->custom);
    free(st);
}

static void ensure_call(rs_state *st, int i) {
    while (st->n_calls <= i) {
        char **a = realloc(st->fc_ids, sizeof *a * (size_t)(st->n_calls + 1));
        if (!a) return;
        st->fc_ids = a;
        char **b = realloc(st->call_ids, sizeof *b * (size_t)(st->n_calls + 1));
        if (!b) return;
        st->call_ids = b;
        st->fc_ids[st->n_calls] = new_id("fc_");
        st->call_ids[st->n_calls] = new_id("call_");
        st->n_calls++;
    }
}

static cJSON *typed(const char *type) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", type);
    return o;
}

static cJSON *text_part(const char *type, const char *text) {
    cJSON *p = typed(type);
    cJSON_AddStringToObject(p, "text", text);
    if (strcmp(type, "output_text") == 0) cJSON_AddArrayToObject(p, "annotations");
    return p;
}

static cJSON *reasoning_item(rs_state *st, const char *text) {
    if (!st->rs_id) st->rs_id = new_id("rs_");
    cJSON *it = typed("reasoning");
    cJSON_AddStringToObject(it, "id", st->rs_id);
    cJSON_AddArrayToObject(it, "summary");
    cJSON *c = cJSON_AddArrayToObject(it, "content");
    if (text) cJSON_AddItemToArray(c, text_part("reasoning_text", text));
    return it;
}

static cJSON *message_item(rs_state *st, const char *text, const char *status) {
    if (!st->msg_id) st->msg_id = new_id("msg_");
    cJSON *it = typed("message");
    cJSON_AddStringToObject(it, "id", st->msg_id);
    cJSON_AddStringToObject(it, "status", status);
    cJSON_AddStringToObject(it, "role", "assistant");
    cJSON *c = cJSON_AddArrayToObject(it, "content");
    if (text) cJSON_AddItemToArray(c, text_part("output_text", text));
    return it;
}

static cJSON *call_item(rs_state *st, int i, const char *name, const char *args, const char *status) {
    ensure_call(st, i);
    cJSON *it = typed("function_call");
    cJSON_AddStringToObject(it, "id", i < st->n_calls ? st->fc_ids[i] : "");
    cJSON_AddStringToObject(it, "call_id", i < st->n_calls ? st->call_ids[i] : "");
    cJSON_AddStringToObject(it, "name", name);
    cJSON_AddStringToObject(it, "arguments", args);
    cJSON_AddStringToObject(it, "status", status);
    return it;
}

static bool is_custom(const rs_state *st, const char *name) {
    const cJSON *n;
    cJSON_ArrayForEach(n, st->custom) if (strcmp(n->valuestring, name) == 0) return true;
    return false;
}

/* A freeform tool is offered to the model as a function with one string
 * parameter "input"; its call goes back to the client as that text. */
static char *custom_input(const char *args) {
    cJSON *a = cJSON_Parse(args);
    const char *in = json_str(a, "input");
    char *r = strdup(in ? in : "");
    cJSON_Delete(a);
    return r;
}

static cJSON *custom_item(rs_state *st, int i, const char *name, const char *input, const char *status) {
    ensure_call(st, i);
    cJSON *it = typed("custom_tool_call");
    cJSON_AddStringToObject(it, "id", i < st->n_calls ? st->fc_ids[i] : "");
    cJSON_AddStringToObject(it, "call_id", i < st->n_calls ? st->call_ids[i] : "");
    cJSON_AddStringToObject(it, "name", name);
    cJSON_AddStringToObject(it, "input", input);
    cJSON_AddStringToObject(it, "status", status);
    return it;
}

/* The response object (in_progress with no output, or final). */
static cJSON *response_obj(rs_state *st, const char *status, cJSON *output, const job *j) {
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "id", st->id);
    cJSON_AddStringToObject(r, "object", "response");
    cJSON_AddNumberToObject(r, "created_at", (double)st->created);
    cJSON_AddStringToObject(r, "status", status);
    cJSON_AddStringToObject(r, "model", st->model);
    cJSON_AddItemToObject(r, "output", output ? output : cJSON_CreateArray());
    cJSON_AddNullToObject(r, "error");
    if (j && j->res.finish == DS4_FINISH_LENGTH) {
        cJSON *d = cJSON_AddObjectToObject(r, "incomplete_details");
        cJSON_AddStringToObject(d, "reason", "max_output_tokens");
    } else cJSON_AddNullToObject(r, "incomplete_details");
    cJSON_AddBoolToObject(r, "parallel_tool_calls", true);
    if (j && status[0] != 'i') {
        cJSON *u = cJSON_AddObjectToObject(r, "usage");
        cJSON_AddNumberToObject(u, "input_tokens", (double)j->res.n_prompt);
        cJSON_AddNumberToObject(cJSON_AddObjectToObject(u, "input_tokens_details"), "cached_tokens", (double)j->res.n_cached);
        cJSON_AddNumberToObject(u, "output_tokens", (double)j->res.n_gen);
        cJSON_AddNumberToObject(cJSON_AddObjectToObject(u, "output_tokens_details"), "reasoning_tokens", 0);
        cJSON_AddNumberToObject(u, "total_tokens", (double)(j->res.n_prompt + j->res.n_gen));
    }
    return r;
}

static void emit(job *j, const char *type, cJSON *ev) {
    rs_state *st = j->proto;
    cJSON *e = typed(type);
    cJSON_AddNumberToObject(e, "sequence_number", st->seq++);
    for (cJSON *c = ev ? ev->child : NULL; c; ) {
        cJSON *next = c->next;
        cJSON_AddItemToObject(e, c->string, cJSON_DetachItemViaPointer(ev, c));
        c = next;
    }
    cJSON_Delete(ev);
    sse_json(j->out, type, e);
}

static cJSON *at(rs_state *st, int content) {
    cJSON *e = cJSON_CreateObject();
    const char *item = st->open == IT_REASONING ? st->rs_id : st->open == IT_MESSAGE ? st->msg_id
                     : st->n_calls ? st->fc_ids[st->n_calls - 1] : "";
    cJSON_AddStringToObject(e, "item_id", item ? item : "");
    cJSON_AddNumberToObject(e, "output_index", st->n_items - 1);
    if (content) cJSON_AddNumberToObject(e, "content_index", 0);
    return e;
}

static void text_add(rs_state *st, const char *s, size_t n) {
    if (st->len + n + 1 > st->cap) {
        size_t cap = st->cap ? st->cap * 2 : 1024;
        while (cap < st->len + n + 1) cap *= 2;
        char *p = realloc(st->text, cap);
        if (!p) return;
        st->text = p; st->cap = cap;
    }
    memcpy(st->text + st->len, s, n);
    st->len += n;
    st->text[st->len] = 0;
}

static void item_close(job *j) {
    rs_state *st = j->proto;
    const char *text = st->text ? st->text : "";
    cJSON *e, *item = NULL;
    switch (st->open) {
    case IT_NONE: return;
    case IT_REASONING:
    case IT_MESSAGE: {
        bool r = st->open == IT_REASONING;
        e = at(st, 1);
        cJSON_AddStringToObject(e, "text", text);
        emit(j, r ? "response.reasoning_text.done" : "response.output_text.done", e);
        e = at(st, 1);
        cJSON_AddItemToObject(e, "part", text_part(r ? "reasoning_text" : "output_text", text));
        emit(j, "response.content_part.done", e);
        item = r ? reasoning_item(st, text) : message_item(st, text, "completed");
        break;
    }
    case IT_CALL:
        e = at(st, 0);
        cJSON_AddStringToObject(e, "arguments", text);
        emit(j, "response.function_call_arguments.done", e);
        item = call_item(st, st->n_calls - 1, st->call_name ? st->call_name : "", text, "completed");
        break;
    case IT_CUSTOM: {
        /* Announced only now: its text is the decoded "input" argument,
         * known once the arguments are complete. */
        char *input = custom_input(text);
        const char *name = st->call_name ? st->call_name : "";
        e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "output_index", st->n_items++);
        cJSON_AddItemToObject(e, "item", custom_item(st, st->n_calls - 1, name, "", "in_progress"));
        emit(j, "response.output_item.added", e);
        e = at(st, 0);
        cJSON_AddStringToObject(e, "delta", input);
        emit(j, "response.custom_tool_call_input.delta", e);
        e = at(st, 0);
        cJSON_AddStringToObject(e, "input", input);
        emit(j, "response.custom_tool_call_input.done", e);
        item = custom_item(st, st->n_calls - 1, name, input, "completed");
        free(input);
        break;
    }
    }
    e = cJSON_CreateObject();
    cJSON_AddNumberToObject(e, "output_index", st->n_items - 1);
    cJSON_AddItemToObject(e, "item", item);
    emit(j, "response.output_item.done", e);
    st->open = IT_NONE;
    st->len = 0;
    if (st->text) st->text[0] = 0;
}

static void item_open(job *j, item_kind k, cJSON *item) {
    rs_state *st = j->proto;
    item_close(j);
    st->open = k;
    cJSON *e = cJSON_CreateObject();
    cJSON_AddNumberToObject(e, "output_index", st->n_items++);
    cJSON_AddItemToObject(e, "item", item);
    emit(j, "response.output_item.added", e);
    if (k == IT_CALL) return;
    e = at(st, 1);
    cJSON_AddItemToObject(e, "part", text_part(k == IT_REASONING ? "reasoning_text" : "output_text", ""));
    emit(j, "response.content_part.added", e);
}

static void rs_event(job *j, const ds4_event *ev) {
    rs_state *st = j->proto;
    cJSON *e;
    switch (ev->kind) {
    case DS4_EV_REASONING:
    case DS4_EV_CONTENT: {
        bool r = ev->kind == DS4_EV_REASONING;
        item_kind k = r ? IT_REASONING : IT_MESSAGE;
        if (st->open != k) item_open(j, k, r ? reasoning_item(st, NULL) : message_item(st, NULL, "in_progress"));
        text_add(st, ev->text, ev->len);
        e = at(st, 1);
        cJSON_AddItemToObject(e, "delta", json_strn(ev->text, ev->len));
        emit(j, r ? "response.reasoning_text.delta" : "response.output_text.delta", e);
        break;
    }
    case DS4_EV_TOOL_BEGIN:
        free(st->call_name);
        st->call_name = strdup(ev->name ? ev->name : "");
        if (st->call_name && is_custom(st, st->call_name)) {
            item_close(j);
            ensure_call(st, ev->index);
            st->open = IT_CUSTOM;
            break;
        }
        item_open(j, IT_CALL, call_item(st, ev->index, st->call_name ? st->call_name : "", "", "in_progress"));
        break;
    case DS4_EV_TOOL_ARGS:
        if (st->open == IT_CUSTOM) text_add(st, ev->text, ev->len);
        if (st->open != IT_CALL) break;
        text_add(st, ev->text, ev->len);
        e = at(st, 0);
        cJSON_AddItemToObject(e, "delta", json_strn(ev->text, ev->len));
        emit(j, "response.function_call_arguments.delta", e);
        break;
    case DS4_EV_TOOL_END:
        item_close(j);
        break;
    }
}

/* The final output list, from the authoritative parse. */
static cJSON *final_output(rs_state *st, const gen_output *o) {
    cJSON *out = cJSON_CreateArray();
    if (o->reasoning && *o->reasoning) cJSON_AddItemToArray(out, reasoning_item(st, o->reasoning));
    if (*o->content || !o->n_calls) cJSON_AddItemToArray(out, message_item(st, o->content, "completed"));
    for (int i = 0; i < o->n_calls; i++) {
        if (is_custom(st, o->calls[i].name)) {
            char *input = custom_input(o->calls[i].arguments);
            cJSON_AddItemToArray(out, custom_item(st, i, o->calls[i].name, input, "completed"));
            free(input);
        } else {
            cJSON_AddItemToArray(out, call_item(st, i, o->calls[i].name, o->calls[i].arguments, "completed"));
        }
    }
    return out;
}

/* A failed response names its reason: an engine error, or a tool block
 * that was streamed but never closed. */
static void set_error(cJSON *r, const job *j) {
    if (j->rc == 0 && j->res.finish != DS4_FINISH_ERROR) return;
    cJSON *err = cJSON_CreateObject();
    cJSON_AddStringToObject(err, "code", "server_error");
    cJSON_AddStringToObject(err, "message", j->err[0] ? j->err : "generation failed");
    cJSON_ReplaceItemInObject(r, "error", err);
}

static const char *final_status(const job *j) {
    return j->rc != 0 || j->res.finish == DS4_FINISH_ERROR ? "failed"
         : j->res.finish == DS4_FINISH_LENGTH ? "incomplete" : "completed";
}

static void rs_finish(job *j) {
    rs_state *st = j->proto;
    if (!j->out || (j->rc == 0 && j->res.finish == DS4_FINISH_CANCELLED)) return;   /* the client left */
    item_close(j);
    gen_output o;
    gen_output_parse(j, &o);
    gen_output rem = o;
    rem.n_calls = o.n_calls < st->n_calls ? o.n_calls : st->n_calls;
    remember_calls(j->S, st->call_ids, &rem);
    const char *status = final_status(j);
    cJSON *r = response_obj(st, status, final_output(st, &o), j);
    set_error(r, j);
    gen_output_free(&o);
    cJSON *e = cJSON_CreateObject();
    cJSON_AddItemToObject(e, "response", r);
    emit(j, status[0] == 'c' ? "response.completed" : status[0] == 'i' ? "response.incomplete" : "response.failed", e);
}

static const job_ops rs_ops = {NULL, rs_event, rs_finish};

/* ---- request ---- */

static const char *content_text(arena *a, const cJSON *content) {
    if (cJSON_IsString(content)) return ar_strdup(a, content->valuestring);
    return json_text(a, content);     /* input_text / output_text parts */
}

static int parse_input(srv *S, chat_req *c, const cJSON *root, char *msg, size_t msglen) {
    const char *instr = json_str(root, "instructions");
    if (instr && *instr) chat_add_msg(c, DS4_ROLE_SYSTEM)->content = ar_strdup(&c->ar, instr);
    const cJSON *input = cJSON_GetObjectItemCaseSensitive(root, "input");
    if (cJSON_IsString(input)) { chat_add_msg(c, DS4_ROLE_USER)->content = ar_strdup(&c->ar, input->valuestring); return 0; }
    if (!cJSON_IsArray(input)) { snprintf(msg, msglen, "input must be a string or an array of items"); return -1; }
    const char *reasoning = NULL;     /* a reasoning item waits for its assistant turn */
    ds4_chat_msg *asst = NULL;        /* the assistant turn tool calls attach to */
    const cJSON *it;
    cJSON_ArrayForEach(it, input) {
        const char *type = json_str(it, "type");
        const char *role = json_str(it, "role");
        if (!type || strcmp(type, "message") == 0) {
            if (!role) { snprintf(msg, msglen, "input message without a role"); return -1; }
            ds4_role r = strcmp(role, "assistant") == 0 ? DS4_ROLE_ASSISTANT : strcmp(role, "system") == 0 ? DS4_ROLE_SYSTEM
                       : strcmp(role, "developer") == 0 ? DS4_ROLE_DEVELOPER : DS4_ROLE_USER;
            ds4_chat_msg *m = chat_add_msg(c, r);
            if (!m) return -1;
            const cJSON *content = cJSON_GetObjectItemCaseSensitive(it, "content");
            if (check_content(content, "input[].content", msg, msglen) != 0) return -1;
            m->content = content_text(&c->ar, content);
            if (r == DS4_ROLE_ASSISTANT) { m->reasoning = reasoning; reasoning = NULL; asst = m; }
            else asst = NULL;
        } else if (strcmp(type, "reasoning") == 0) {
            const cJSON *parts = cJSON_GetObjectItemCaseSensitive(it, "content");
            if (!cJSON_GetArraySize(parts)) parts = cJSON_GetObjectItemCaseSensitive(it, "summary");
            reasoning = json_text(&c->ar, parts);
            asst = NULL;
        } else if (strcmp(type, "function_call") == 0 || strcmp(type, "custom_tool_call") == 0) {
            if (!asst) {
                asst = chat_add_msg(c, DS4_ROLE_ASSISTANT);
                if (!asst) return -1;
                asst->reasoning = reasoning;
                reasoning = NULL;
            }
            if (!json_str(it, "name")) { snprintf(msg, msglen, "%s items need a name", type); return -1; }
            if (type[0] == 'f') {
                chat_add_call(c, asst, S, json_str(it, "call_id"), json_str(it, "name"), cJSON_GetObjectItemCaseSensitive(it, "arguments"));
            } else {
                /* A freeform tool's text input is its one string parameter "input". */
                cJSON *args = cJSON_CreateObject();
                cJSON_AddStringToObject(args, "input", json_str(it, "input") ? json_str(it, "input") : "");
                chat_add_call(c, asst, S, json_str(it, "call_id"), json_str(it, "name"), args);
                cJSON_Delete(args);
            }
        } else if (strcmp(type, "function_call_output") == 0 || strcmp(type, "custom_tool_call_output") == 0) {
            ds4_chat_msg *t = chat_add_msg(c, DS4_ROLE_TOOL);
            if (!t) return -1;
            t->tool_call_id = ar_strdup(&c->ar, json_str(it, "call_id"));
            const cJSON *output = cJSON_GetObjectItemCaseSensitive(it, "output");
            if (check_content(output, "input[].output", msg, msglen) != 0) return -1;
            const char *out = content_text(&c->ar, output);
            t->content = out ? out : "";
            asst = NULL;
        } else {
            /* Items of hosted tools (web search, file search…) have no
             * meaning here; a client replaying its history keeps going. */
            srv_trace(S, "responses: input item \"%s\" ignored\n", type);
        }
    }
    return 0;
}

/* Function tools become schema lines ({name, description, parameters});
 * freeform "custom" tools become a function of one string "input" (their
 * names are collected so calls go back as custom_tool_call). Hosted tools
 * (web search…) are not ours to run and are left out. tool_choice works as
 * in Chat Completions. */
static int parse_tools(srv *S, chat_req *c, const cJSON *root, cJSON *custom, char *msg, size_t msglen) {
    const cJSON *choice = cJSON_GetObjectItemCaseSensitive(root, "tool_choice");
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(root, "tools");
    if (check_list(tools, "tools", msg, msglen) != 0) return -1;
    if (check_openai_choice(choice, msg, msglen) != 0) return -1;
    if (cJSON_IsString(choice) && strcmp(choice->valuestring, "none") == 0) return 0;
    const char *only = cJSON_IsObject(choice) ? json_str(choice, "name") : NULL;
    const char *ct = json_str(choice, "type");
    if (!only && ct && (strcmp(ct, "function") == 0 || strcmp(ct, "custom") == 0)) {
        snprintf(msg, msglen, "tool_choice: a name is required with type \"%s\"", ct);
        return -1;
    }
    const cJSON *t;
    cJSON_ArrayForEach(t, tools) {
        const char *type = json_str(t, "type"), *name = json_str(t, "name");
        if (!name || !type || (strcmp(type, "function") != 0 && strcmp(type, "custom") != 0)) continue;
        cJSON *fn = cJSON_CreateObject();
        cJSON_AddStringToObject(fn, "name", name);
        const char *desc = json_str(t, "description");
        if (desc) cJSON_AddStringToObject(fn, "description", desc);
        if (type[0] == 'c') {
            cJSON *p = cJSON_AddObjectToObject(fn, "parameters");
            cJSON_AddStringToObject(p, "type", "object");
            cJSON *in = cJSON_AddObjectToObject(cJSON_AddObjectToObject(p, "properties"), "input");
            cJSON_AddStringToObject(in, "type", "string");
            const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(t, "format");
            const char *def = json_str(fmt, "definition");
            cJSON_AddStringToObject(in, "description", def ? def : "the raw text input");
            cJSON_AddItemToArray(cJSON_AddArrayToObject(p, "required"), cJSON_CreateString("input"));
            cJSON_AddItemToArray(custom, cJSON_CreateString(name));
        } else {
            const cJSON *params = cJSON_GetObjectItemCaseSensitive(t, "parameters");
            if (params) cJSON_AddItemToObject(fn, "parameters", cJSON_Duplicate(params, true));
        }
        chat_add_tool(c, name, fn);
        cJSON_Delete(fn);
    }
    if (only || (cJSON_IsString(choice) && strcmp(choice->valuestring, "required") == 0))
        return force_tool_call(S, c, only, msg, msglen);
    return 0;
}

enum MHD_Result responses_create(srv *S, struct MHD_Connection *conn, cJSON *root) {
    chat_req c;
    chat_init(&c);
    char msg[256];
    static const char *const max_keys[] = {"max_output_tokens", NULL};
    const cJSON *effort = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "reasoning"), "effort");
    enum MHD_Result ret;
    if (json_str(root, "previous_response_id")) {
        snprintf(msg, sizeof msg, "previous_response_id is not supported: send the whole conversation as input");
        goto bad;
    }
    if (parse_common(S, &c, root, true, max_keys, effort, NULL, msg, sizeof msg) != 0 ||
        select_script(S, conn, &c, msg, sizeof msg) != 0 ||
        parse_input(S, &c, root, msg, sizeof msg) != 0)
        goto bad;
    cJSON *custom = cJSON_CreateArray();
    if (parse_tools(S, &c, root, custom, msg, sizeof msg) != 0) { cJSON_Delete(custom); goto bad; }
    ds4_tokens prompt;
    int status = chat_tokenize(S, &c, &prompt, msg, sizeof msg);
    if (status) {
        ret = send_error(conn, PROTO_OPENAI, (unsigned)status, status == 400 ? "invalid_request_error" : "server_error",
                         status == 400 && strstr(msg, "context length") ? "context_length_exceeded" : NULL, msg);
        chat_free(&c);
        cJSON_Delete(custom);
        return ret;
    }
    job *j = chat_job(S, &c, &prompt, conn);
    rs_state *st = j ? calloc(1, sizeof *st) : NULL;
    if (st) { st->id = new_id("resp_"); st->model = strdup(c.model); st->created = (long)time(NULL); st->custom = custom; }
    else cJSON_Delete(custom);
    chat_free(&c);
    if (!st) { job_unref(j); return send_error(conn, PROTO_OPENAI, 500, "server_error", NULL, "out of memory"); }
    j->ops = &rs_ops;
    j->proto = st;
    j->proto_free = rs_free;
    if (j->out) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddItemToObject(e, "response", response_obj(st, "in_progress", NULL, NULL));
        emit(j, "response.created", e);
        e = cJSON_CreateObject();
        cJSON_AddItemToObject(e, "response", response_obj(st, "in_progress", NULL, NULL));
        emit(j, "response.in_progress", e);
    }
    bool ready;
    ret = run_job(S, conn, j, PROTO_OPENAI, &ready);
    if (!ready) return ret;
    gen_output o;
    gen_output_parse(j, &o);
    cJSON *r = response_obj(st, final_status(j), final_output(st, &o), j);
    set_error(r, j);
    remember_calls(S, st->call_ids, &o);
    gen_output_free(&o);
    job_unref(j);
    return send_json(conn, MHD_HTTP_OK, r);
bad:
    ret = send_error(conn, PROTO_OPENAI, MHD_HTTP_BAD_REQUEST, "invalid_request_error", NULL, msg);
    chat_free(&c);
    return ret;
}
