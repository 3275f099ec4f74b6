/* Chat rendering: the official DeepSeek V4 encoding (prompt.md §2.2–2.5).
 *
 * The renderer writes the prompt bytes and, beside them, the byte offset of
 * every control token it places itself (BOS, EOS, <｜User｜>, <｜Assistant｜>,
 * <think>, </think>, and ｜DSML｜ in the tools block and in tool-call blocks).
 * Message text is written without offsets, so a user who types a control
 * token spelling gets plain text (ds4_tokenize_rendered honours this).
 *
 * Steps, as in the official encoder:
 *   1. merge: tool results and user texts that follow a (merged) user turn
 *      join it as blocks; there is no tool role in the prompt;
 *   2. sort the tool results of each user turn into the call order of the
 *      latest assistant message with tool calls (unknown ids count as 0);
 *   3. reasoning retention: with tool definitions everything is kept;
 *      otherwise, in thinking mode, reasoning before the last user turn is
 *      dropped and developer messages there are removed;
 *   4. BOS, the Think Max prefix, then each message and its transition. */
#include "ds4.h"
#include "json_text.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char BOS[] = "<｜begin▁of▁sentence｜>";
static const char EOS[] = "<｜end▁of▁sentence｜>";
static const char USER[] = "<｜User｜>";
static const char ASSISTANT[] = "<｜Assistant｜>";
static const char THINK[] = "<think>";
static const char THINK_END[] = "</think>";
static const char DSML[] = "｜DSML｜";

/* DeepSeek recommends Think Max only with at least this much context;
 * below it max is rendered as high (no prefix). */
enum { THINK_MAX_MIN_CTX = 393216 };

static const char THINK_MAX_PREFIX[] =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

/* The official tools block (§2.5). Control bytes stand for the control tokens
 * it contains (\1 ｜DSML｜, \2 <think>, \3 </think>) and \4 for the schema
 * lines, so the special offsets come out of the same walk as the text. */
static const char TOOLS_TEMPLATE[] =
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    "\"<\1tool_calls>\" block like the following:\n\n"
    "<\1tool_calls>\n"
    "<\1invoke name=\"$TOOL_NAME\">\n"
    "<\1parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</\1parameter>\n"
    "...\n"
    "</\1invoke>\n"
    "<\1invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</\1invoke>\n"
    "</\1tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
    "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by \2), you MUST output your complete reasoning inside "
    "\2...\3 BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after \3 with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "\4\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";

/* ---- output ------------------------------------------------------------- */

static void put(ds4_rendered *r, const char *s, size_t n) {
    if (r->len + n + 1 > r->cap) {
        size_t cap = r->cap ? r->cap : 256;
        while (cap < r->len + n + 1) cap *= 2;
        char *t = realloc(r->text, cap);
        if (!t) abort(); /* out of memory */
        r->text = t;
        r->cap = cap;
    }
    memcpy(r->text + r->len, s, n);
    r->len += n;
    r->text[r->len] = 0;
}
static void puts_(ds4_rendered *r, const char *s) { put(r, s, strlen(s)); }

static void mark(ds4_rendered *r, size_t off) {
    if (r->n_special == r->special_cap) {
        size_t cap = r->special_cap ? r->special_cap * 2 : 32;
        size_t *t = realloc(r->special_off, cap * sizeof *t);
        if (!t) abort();
        r->special_off = t;
        r->special_cap = cap;
    }
    r->special_off[r->n_special++] = off;
}

static void special(ds4_rendered *r, const char *tok) {
    mark(r, r->len);
    puts_(r, tok);
}

/* A DSML block (replayed or canonical): ｜DSML｜ is a control token where it
 * names a tag, i.e. right after "<" or "</". */
static void put_dsml_block(ds4_rendered *r, const char *blk) {
    size_t base = r->len, dl = strlen(DSML);
    puts_(r, blk);
    for (const char *s = blk; (s = strstr(s, DSML)); s += dl) {
        size_t at = (size_t)(s - blk);
        if ((at >= 1 && blk[at - 1] == '<') || (at >= 2 && blk[at - 2] == '<' && blk[at - 1] == '/'))
            mark(r, base + at);
    }
}

/* ---- messages after merging --------------------------------------------- */

typedef struct { bool tool; const char *text, *id; } block;

typedef struct {
    ds4_role role;          /* SYSTEM, USER (merged), ASSISTANT or DEVELOPER */
    const ds4_chat_msg *m;  /* source message; NULL for the inserted system */
    block *blocks;          /* USER: texts and tool results in order */
    int nb, cap;
    bool tools;             /* the tools block is attached here */
} item;

static const char *str_or_empty(const char *s) { return s ? s : ""; }

static void add_block(item *it, bool tool, const char *text, const char *id) {
    if (it->nb == it->cap) {
        it->cap = it->cap ? it->cap * 2 : 4;
        block *b = realloc(it->blocks, (size_t)it->cap * sizeof *b);
        if (!b) abort();
        it->blocks = b;
    }
    it->blocks[it->nb++] = (block){tool, str_or_empty(text), id};
}

/* Position of id in the calls of msg (last match, like a Python dict built
 * in order), 0 when absent. */
static int call_order(const ds4_chat_msg *msg, const char *id) {
    int pos = 0;
    for (int k = 0; msg && id && k < msg->n_tool_calls; k++)
        if (msg->tool_calls[k].id && *msg->tool_calls[k].id && !strcmp(msg->tool_calls[k].id, id)) pos = k;
    return pos;
}

static bool has_call_ids(const ds4_chat_msg *msg) {
    for (int k = 0; k < msg->n_tool_calls; k++)
        if (msg->tool_calls[k].id && *msg->tool_calls[k].id) return true;
    return false;
}

/* Stable sort of the tool-result blocks by call order; text blocks keep
 * their slots. */
static void sort_results(item *it, const ds4_chat_msg *calls) {
    int nt = 0;
    for (int i = 0; i < it->nb; i++) nt += it->blocks[i].tool;
    if (nt < 2) return;
    block *t = malloc((size_t)nt * sizeof *t);
    if (!t) abort();
    nt = 0;
    for (int i = 0; i < it->nb; i++)
        if (it->blocks[i].tool) t[nt++] = it->blocks[i];
    for (int i = 1; i < nt; i++) { /* insertion sort: stable, n is tiny */
        block b = t[i];
        int key = call_order(calls, b.id), j = i;
        while (j > 0 && call_order(calls, t[j - 1].id) > key) { t[j] = t[j - 1]; j--; }
        t[j] = b;
    }
    for (int i = 0, k = 0; i < it->nb; i++)
        if (it->blocks[i].tool) it->blocks[i] = t[k++];
    free(t);
}

static void put_tools_block(ds4_rendered *r, const ds4_sbuf *schemas) {
    for (const char *s = TOOLS_TEMPLATE; *s; s++) {
        switch (*s) {
        case '\1': special(r, DSML); break;
        case '\2': special(r, THINK); break;
        case '\3': special(r, THINK_END); break;
        case '\4': put(r, schemas->p ? schemas->p : "", schemas->n); break;
        default: put(r, s, 1);
        }
    }
}

static void put_calls(ds4_rendered *r, const ds4_chat_msg *m) {
    /* Exact replay (§5.5) when every call of the message carries the same
     * sampled block; otherwise the canonical rendering of the arguments. */
    const char *raw = m->tool_calls[0].raw_dsml;
    for (int k = 1; raw && k < m->n_tool_calls; k++)
        if (!m->tool_calls[k].raw_dsml || strcmp(m->tool_calls[k].raw_dsml, raw)) raw = NULL;
    if (raw) {
        put_dsml_block(r, raw);
        return;
    }
    char *blk = ds4_dsml_render_calls(m->tool_calls, m->n_tool_calls);
    put_dsml_block(r, blk);
    free(blk);
}

int ds4_chat_render(const ds4_chat *chat, ds4_rendered *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    if (err && errlen) err[0] = 0;
    if (chat->n_msgs < 0 || chat->n_tools < 0 || (chat->n_msgs && !chat->msgs) || (chat->n_tools && !chat->tools)) {
        snprintf(err, errlen, "chat: bad message or tool count");
        return -1;
    }

    /* Schema lines first: a bad schema fails before anything is built. */
    ds4_sbuf schemas = {0};
    for (int t = 0; t < chat->n_tools; t++) {
        const char *j = str_or_empty(chat->tools[t].json);
        if (t) ds4_sbuf_putc(&schemas, '\n');
        if (ds4_json_format(j, strlen(j), DS4_JSON_PYTHON, &schemas)) {
            snprintf(err, errlen, "chat: tool %d (%s): schema is not valid JSON", t, str_or_empty(chat->tools[t].name));
            ds4_sbuf_free(&schemas);
            return -1;
        }
    }

    /* 1. Merge. One extra slot for an inserted system message. */
    item *it = calloc((size_t)chat->n_msgs + 1, sizeof *it);
    if (!it) abort();
    int n = 0;
    for (int i = 0; i < chat->n_msgs; i++) {
        const ds4_chat_msg *m = &chat->msgs[i];
        switch (m->role) {
        case DS4_ROLE_TOOL:
        case DS4_ROLE_USER: {
            bool tool = m->role == DS4_ROLE_TOOL;
            if (!(n && it[n - 1].role == DS4_ROLE_USER)) it[n++] = (item){.role = DS4_ROLE_USER, .m = m};
            add_block(&it[n - 1], tool, m->content, tool ? m->tool_call_id : NULL);
            break;
        }
        case DS4_ROLE_SYSTEM:
        case DS4_ROLE_ASSISTANT:
        case DS4_ROLE_DEVELOPER: it[n++] = (item){.role = m->role, .m = m}; break;
        default:
            snprintf(err, errlen, "chat: message %d has an unknown role %d", i, (int)m->role);
            for (int k = 0; k < n; k++) free(it[k].blocks);
            free(it);
            ds4_sbuf_free(&schemas);
            return -1;
        }
    }

    /* Tools live in the leading system/developer message; without one an
     * empty system message carries them (what vLLM and proxies send). */
    if (chat->n_tools) {
        if (!(n && (it[0].role == DS4_ROLE_SYSTEM || it[0].role == DS4_ROLE_DEVELOPER))) {
            memmove(it + 1, it, (size_t)n * sizeof *it);
            it[0] = (item){.role = DS4_ROLE_SYSTEM};
            n++;
        }
        it[0].tools = true;
    }

    /* 2. Sort tool results by the latest assistant's call order. */
    const ds4_chat_msg *calls = NULL;
    for (int i = 0; i < n; i++) {
        if (it[i].role == DS4_ROLE_ASSISTANT && it[i].m->n_tool_calls > 0 && it[i].m->tool_calls)
            calls = has_call_ids(it[i].m) ? it[i].m : NULL;
        else if (it[i].role == DS4_ROLE_USER && calls)
            sort_results(&it[i], calls);
    }

    /* 3. Reasoning retention. */
    bool thinking = chat->think != DS4_THINK_NONE;
    bool drop = chat->n_tools == 0;
    int last_user = -1;
    for (int i = 0; i < n; i++)
        if (it[i].role == DS4_ROLE_USER || it[i].role == DS4_ROLE_DEVELOPER) last_user = i;
    if (thinking && drop) {
        int k = 0;
        for (int i = 0; i < n; i++) {
            if (it[i].role == DS4_ROLE_DEVELOPER && i < last_user) { free(it[i].blocks); continue; }
            it[k++] = it[i];
        }
        n = k;
        last_user = -1;
        for (int i = 0; i < n; i++)
            if (it[i].role == DS4_ROLE_USER || it[i].role == DS4_ROLE_DEVELOPER) last_user = i;
    }

    /* 4. Render. */
    special(out, BOS);
    if (thinking && chat->think == DS4_THINK_MAX && chat->ctx >= THINK_MAX_MIN_CTX) puts_(out, THINK_MAX_PREFIX);
    for (int i = 0; i < n; i++) {
        const ds4_chat_msg *m = it[i].m;
        switch (it[i].role) {
        case DS4_ROLE_SYSTEM:
            puts_(out, str_or_empty(m ? m->content : NULL));
            if (it[i].tools) { puts_(out, "\n\n"); put_tools_block(out, &schemas); }
            break;
        case DS4_ROLE_DEVELOPER:
            special(out, USER);
            puts_(out, str_or_empty(m->content));
            if (it[i].tools) { puts_(out, "\n\n"); put_tools_block(out, &schemas); }
            break;
        case DS4_ROLE_USER:
            special(out, USER);
            for (int b = 0; b < it[i].nb; b++) {
                if (b) puts_(out, "\n\n");
                if (it[i].blocks[b].tool) puts_(out, "<tool_result>");
                puts_(out, it[i].blocks[b].text);
                if (it[i].blocks[b].tool) puts_(out, "</tool_result>");
            }
            break;
        case DS4_ROLE_ASSISTANT:
            if (thinking && (!drop || i > last_user)) {
                puts_(out, str_or_empty(m->reasoning));
                special(out, THINK_END);
            }
            puts_(out, str_or_empty(m->content));
            if (m->n_tool_calls > 0 && m->tool_calls) put_calls(out, m);
            special(out, EOS);
            break;
        default: break;
        }
        /* Transition: a user/developer turn followed by the assistant (or
         * ending the prompt, when a generation prompt is wanted). */
        if (it[i].role != DS4_ROLE_USER && it[i].role != DS4_ROLE_DEVELOPER) continue;
        if (i + 1 < n ? it[i + 1].role != DS4_ROLE_ASSISTANT : !chat->add_generation_prompt) continue;
        special(out, ASSISTANT);
        special(out, thinking && (!drop || i >= last_user) ? THINK : THINK_END);
    }

    for (int i = 0; i < n; i++) free(it[i].blocks);
    free(it);
    ds4_sbuf_free(&schemas);
    return 0;
}

void ds4_rendered_free(ds4_rendered *r) {
    free(r->text);
    free(r->special_off);
    memset(r, 0, sizeof *r);
}
