/* Streaming DSML parser and ds4_parse_output (prompt.md §3.4–3.5). */
#include "ds4.h"
#include "test.h"

#define DSML_CHECK_ONLY
#include "fuzz/fuzz_dsml.c" /* dsml_check(): the fuzz invariants, run here on random input */

typedef struct {
    dsml_stream s;
    int begins_at_feed[8]; /* feed count when TOOL_BEGIN i arrived */
    int feeds;
    char names[8][32];
    bool structural_in_string, structural_in_tag;
} rec;

static void on_ev(void *ud, const ds4_event *ev) {
    rec *r = ud;
    if (ev->kind == DS4_EV_TOOL_BEGIN && ev->index < 8) {
        r->begins_at_feed[ev->index] = r->feeds;
        snprintf(r->names[ev->index], sizeof r->names[0], "%s", ev->name);
    }
    dsml_on_event(&r->s, ev);
}

static void rec_free(rec *r) {
    for (int i = 0; i < r->s.n_calls && i < 64; i++) free(r->s.args[i]);
    free(r->s.reasoning);
    free(r->s.content);
}

/* Feed text in chunks of `chunk` bytes (0: all at once). */
static ds4_dsml *feed(rec *r, const char *text, size_t chunk, bool thinking, bool tools) {
    memset(r, 0, sizeof *r);
    r->s.open = -1;
    ds4_dsml *p = ds4_dsml_new(thinking, tools, on_ev, r);
    size_t len = strlen(text);
    for (size_t at = 0; at < len;) {
        size_t n = chunk && chunk < len - at ? chunk : len - at;
        ds4_dsml_feed(p, text + at, n);
        r->feeds++;
        at += n;
    }
    ds4_dsml_finish(p);
    return p;
}

static const char *S(const char *s) { return s ? s : ""; }

#define E5_BLOCK                                                                                                      \
    "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"                                                \
    "<｜DSML｜parameter name=\"location\" string=\"true\">Beijing</｜DSML｜parameter>\n"                               \
    "<｜DSML｜parameter name=\"unit\" string=\"true\">celsius</｜DSML｜parameter>\n"                                   \
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"

static void test_reasoning_then_content(void) {
    for (size_t chunk = 0; chunk < 4; chunk++) {
        rec r;
        ds4_dsml *p = feed(&r, "reasoning text</think>Hi.", chunk, true, false);
        CHECK(!strcmp(S(r.s.reasoning), "reasoning text"), "chunk %zu: %s", chunk, S(r.s.reasoning));
        CHECK(!strcmp(S(r.s.content), "Hi."), "chunk %zu: %s", chunk, S(r.s.content));
        CHECK(!ds4_dsml_calls_done(p) && !ds4_dsml_unterminated(p), "no block");
        ds4_dsml_free(p);
        rec_free(&r);
    }
    /* No </think> at all: everything is reasoning (§4 suggestion). */
    ds4_parsed o;
    REQUIRE(ds4_parse_output("still thinking", 14, true, true, &o) == 0, "parse");
    CHECK(!strcmp(o.reasoning, "still thinking") && !strcmp(o.content, "") && o.n_calls == 0, "got %s|%s", o.reasoning,
          o.content);
    ds4_parsed_free(&o);
}

static void test_e5_call_streamed_bytewise(void) {
    const char *text = "think</think>Let me check." E5_BLOCK;
    rec r;
    ds4_dsml *p = feed(&r, text, 1, true, true);
    CHECK(!strcmp(S(r.s.content), "Let me check."), "content %s", S(r.s.content));
    CHECK(r.s.n_calls == 1 && !strcmp(r.names[0], "get_weather"), "calls %d", r.s.n_calls);
    CHECK(!strcmp(S(r.s.args[0]), "{\"location\":\"Beijing\",\"unit\":\"celsius\"}"), "args %s", S(r.s.args[0]));
    CHECK(ds4_dsml_calls_done(p) && !ds4_dsml_unterminated(p) && !ds4_dsml_failed(p), "done");
    /* TOOL_BEGIN came with the quote that completed the name (feed i
     * carries byte i), before the tag's '>'. */
    const char *q = strstr(text, "get_weather\">") + strlen("get_weather");
    CHECK(r.begins_at_feed[0] == (int)(q - text), "begin at byte %d, name complete at byte %d", r.begins_at_feed[0],
          (int)(q - text));
    ds4_dsml_free(p);
    rec_free(&r);

    ds4_parsed o;
    REQUIRE(ds4_parse_output(text, strlen(text), true, true, &o) == 0, "parse");
    CHECK(!strcmp(o.reasoning, "think") && !strcmp(o.content, "Let me check."), "%s|%s", o.reasoning, o.content);
    REQUIRE(o.n_calls == 1, "n_calls %d", o.n_calls);
    CHECK(!strcmp(o.calls[0].name, "get_weather"), "name");
    CHECK(!strcmp(o.calls[0].arguments, "{\"location\":\"Beijing\",\"unit\":\"celsius\"}"), "args");
    CHECK(!strcmp(o.calls[0].raw_dsml, E5_BLOCK), "raw %s", o.calls[0].raw_dsml);
    ds4_parsed_free(&o);
}

/* What is visible while the text is still arriving. */
static void test_holdback(void) {
    rec r = {0};
    r.s.open = -1;
    ds4_dsml *p = ds4_dsml_new(false, true, on_ev, &r);
    ds4_dsml_feed(p, "Hello\n\n<｜DS", strlen("Hello\n\n<｜DS"));
    CHECK(!strcmp(S(r.s.content), "Hello"), "marker prefix and the newlines are held: %s", S(r.s.content));
    CHECK(ds4_dsml_structural(p), "a held DSML marker is structural");
    ds4_dsml_feed(p, "X", 1);
    CHECK(!strcmp(S(r.s.content), "Hello\n\n<｜DSX"), "not a marker after all: %s", S(r.s.content));
    ds4_dsml_feed(p, " a <", 4);
    CHECK(!strcmp(S(r.s.content), "Hello\n\n<｜DSX a"), "' <' held: %s", S(r.s.content));
    CHECK(!ds4_dsml_structural(p), "a lone '<' is not structural");
    ds4_dsml_feed(p, "b \xC3", 3);
    CHECK(!strcmp(S(r.s.content), "Hello\n\n<｜DSX a <b "), "partial UTF-8 held: %s", S(r.s.content));
    ds4_dsml_feed(p, "\xA9", 1);
    CHECK(!strcmp(S(r.s.content), "Hello\n\n<｜DSX a <b é"), "completed: %s", S(r.s.content));
    ds4_dsml_feed(p, "  ", 2);
    ds4_dsml_finish(p);
    CHECK(!strcmp(S(r.s.content), "Hello\n\n<｜DSX a <b é  "), "finish flushes the whitespace: %s", S(r.s.content));
    ds4_dsml_free(p);
    rec_free(&r);

    /* Reasoning holds a partial </think>; DSML there is just reasoning. */
    memset(&r, 0, sizeof r);
    r.s.open = -1;
    p = ds4_dsml_new(true, true, on_ev, &r);
    const char *t = "x <｜DSML｜tool_calls>\n</th";
    ds4_dsml_feed(p, t, strlen(t));
    CHECK(!strcmp(S(r.s.reasoning), "x <｜DSML｜tool_calls>\n"), "got %s", S(r.s.reasoning));
    ds4_dsml_feed(p, "ink>ok", 6);
    ds4_dsml_finish(p);
    CHECK(!strcmp(S(r.s.reasoning), "x <｜DSML｜tool_calls>\n") && !strcmp(S(r.s.content), "ok"), "%s|%s",
          S(r.s.reasoning), S(r.s.content));
    CHECK(r.s.n_calls == 0 && !ds4_dsml_calls_done(p), "DSML inside reasoning is never parsed");
    ds4_dsml_free(p);
    rec_free(&r);
}

static void test_values(void) {
    const char *text = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f&amp;g\">\n"
                       "<｜DSML｜parameter name=\"s\" string=\"true\">a &amp; b &lt;c&gt; &quot;q&quot; &apos; &bogus; "
                       "</｜DSML｜paramZ \"\\\n\t\x01é</｜DSML｜parameter>\n"
                       "<｜DSML｜parameter name=\"n\" string=\"false\"> [1, {\"k\": \"</｜DSML｜parameter>\"}] "
                       "</｜DSML｜parameter>\n"
                       "<｜DSML｜parameter name=\"bad\" string=\"false\">not json</｜DSML｜parameter>\n"
                       "<｜DSML｜parameter name=\"nostr\">v</｜DSML｜parameter>\n"
                       "</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    const char *want = "{\"s\":\"a & b <c> \\\"q\\\" ' &bogus; </｜DSML｜paramZ \\\"\\\\\\n\\t\\u0001é\","
                       "\"n\":[1,{\"k\":\"</｜DSML｜parameter>\"}],\"bad\":\"not json\",\"nostr\":\"v\"}";
    for (size_t chunk = 0; chunk < 5; chunk++) {
        rec r;
        ds4_dsml *p = feed(&r, text, chunk, false, true);
        CHECK(r.s.n_calls == 1 && !strcmp(r.names[0], "f&g"), "chunk %zu: name %s", chunk, r.names[0]);
        CHECK(!strcmp(S(r.s.args[0]), want), "chunk %zu:\n got %s\nwant %s", chunk, S(r.s.args[0]), want);
        CHECK(ds4_dsml_calls_done(p), "done");
        ds4_dsml_free(p);
        rec_free(&r);
    }
}

#define PARAM_FALSE "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"v\" string=\"false\">"
#define PARAM_END "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"

/* string="false" values stream as they are validated, come out compact,
 * and fall back to a JSON string only while nothing of them was sent. */
static void test_json_values(void) {
    rec r = {0};
    r.s.open = -1;
    ds4_dsml *p = ds4_dsml_new(false, true, on_ev, &r);
    const char *t = PARAM_FALSE " [ 1, {\"a\" : \"x y";
    ds4_dsml_feed(p, t, strlen(t));
    CHECK(!strcmp(S(r.s.args[0]), "{\"v\":[1,{\"a\":\"x y"), "streamed before the close: %s", S(r.s.args[0]));
    ds4_dsml_feed(p, "\"}, 2.5e3 ]" PARAM_END, strlen("\"}, 2.5e3 ]" PARAM_END));
    ds4_dsml_finish(p);
    CHECK(!strcmp(S(r.s.args[0]), "{\"v\":[1,{\"a\":\"x y\"},2.5e3]}"), "got %s", S(r.s.args[0]));
    CHECK(ds4_dsml_calls_done(p), "done");
    ds4_dsml_free(p);
    rec_free(&r);

    static const struct { const char *in, *want; } cases[] = {
        {"-", "\"-\""},                      /* first token not JSON: a string */
        {"1.", "\"1.\""},
        {"nul", "\"nul\""},
        {"", "\"\""},                        /* empty value */
        {"  42 ", "42"},
        {"\"a\nb\x01\"", "\"a\\nb\\u0001\""},  /* raw controls escaped */
        {"\"\\ud83d\\ude00 \\ud800x\"", "\"\\ud83d\\ude00 \\ufffdx\""}, /* lone surrogate */
        {"{\"k\":[true,false,null]}", "{\"k\":[true,false,null]}"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        char text[512], want[256];
        snprintf(text, sizeof text, PARAM_FALSE "%s" PARAM_END, cases[c].in);
        snprintf(want, sizeof want, "{\"v\":%s}", cases[c].want);
        for (size_t chunk = 0; chunk < 3; chunk++) {
            p = feed(&r, text, chunk, false, true);
            CHECK(!strcmp(S(r.s.args[0]), want) && ds4_dsml_calls_done(p), "case %zu chunk %zu: %s", c, chunk,
                  S(r.s.args[0]));
            ds4_dsml_free(p);
            rec_free(&r);
        }
    }
    /* Invalid after part of it was sent: structural error, reported. */
    const char *bad = "Hi" PARAM_FALSE "[1, x]" PARAM_END;
    p = feed(&r, bad, 1, false, true);
    CHECK(ds4_dsml_failed(p) && !ds4_dsml_calls_done(p) && !strcmp(S(r.s.content), bad), "failed: %s", S(r.s.content));
    ds4_dsml_free(p);
    rec_free(&r);
}

/* Invalid UTF-8 inside a string value becomes U+FFFD, however it is split. */
static void test_utf8_in_values(void) {
    const char *text = "<｜DSML｜tool_calls><｜DSML｜invoke name=\"f\"><｜DSML｜parameter name=\"s\">\xE2\x82\xAC \xE2\x82"
                       " \xFF 😀</｜DSML｜parameter></｜DSML｜invoke></｜DSML｜tool_calls>";
    for (size_t chunk = 0; chunk < 4; chunk++) {
        rec r;
        ds4_dsml *p = feed(&r, text, chunk, false, true);
        CHECK(!strcmp(S(r.s.args[0]), "{\"s\":\"€ \xEF\xBF\xBD\xEF\xBF\xBD \xEF\xBF\xBD 😀\"}"), "chunk %zu: %s", chunk,
              S(r.s.args[0]));
        ds4_dsml_free(p);
        rec_free(&r);
    }
}

static void test_structural_flag(void) {
    const char *pre = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"s\" string=\"true\">ab";
    rec r = {0};
    r.s.open = -1;
    ds4_dsml *p = ds4_dsml_new(false, true, on_ev, &r);
    ds4_dsml_feed(p, "text", 4);
    CHECK(!ds4_dsml_structural(p), "plain content is sampled normally");
    ds4_dsml_feed(p, pre, strlen(pre));
    CHECK(!ds4_dsml_structural(p), "string body is sampled normally");
    ds4_dsml_feed(p, "</｜DSML｜parameter>\n", strlen("</｜DSML｜parameter>\n"));
    CHECK(ds4_dsml_structural(p), "between tags: greedy");
    const char *js = "<｜DSML｜parameter name=\"j\" string=\"false\">{\"a\": \"x";
    ds4_dsml_feed(p, js, strlen(js));
    CHECK(!ds4_dsml_structural(p), "inside a JSON string: sampled normally");
    ds4_dsml_feed(p, "\", ", 3);
    CHECK(ds4_dsml_structural(p), "JSON syntax: greedy");
    ds4_dsml_free(p);
    rec_free(&r);
}

static void test_unterminated_and_malformed(void) {
    /* Open invoke at the end: the block becomes content again and the
     * already-sent tool events make it a failure. */
    const char *t1 = "Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"true\">x";
    rec r;
    ds4_dsml *p = feed(&r, t1, 3, false, true);
    CHECK(ds4_dsml_unterminated(p) && ds4_dsml_failed(p) && !ds4_dsml_calls_done(p), "unterminated");
    CHECK(!strcmp(S(r.s.content), t1), "all text is content: %s", S(r.s.content));
    ds4_dsml_free(p);
    rec_free(&r);
    ds4_parsed o;
    REQUIRE(ds4_parse_output(t1, strlen(t1), false, true, &o) == 0, "parse");
    CHECK(o.n_calls == 0 && !strcmp(o.content, t1), "parse: %d calls", o.n_calls);
    ds4_parsed_free(&o);

    /* Garbage right after the start marker: no tool events, not a failure. */
    const char *t2 = "a\n\n<｜DSML｜tool_calls>\nGARBAGE <｜DSML｜tool_calls> more";
    p = feed(&r, t2, 1, false, true);
    CHECK(!ds4_dsml_failed(p) && !ds4_dsml_unterminated(p) && r.s.n_calls == 0, "malformed");
    CHECK(!strcmp(S(r.s.content), t2), "content %s", S(r.s.content));
    ds4_dsml_free(p);
    rec_free(&r);

    /* A marker mentioned in prose does not stop recognition of a real block. */
    const char *t3 = "Use <tool_calls> tags." E5_BLOCK;
    for (size_t chunk = 0; chunk < 3; chunk++) {
        p = feed(&r, t3, chunk, false, true);
        CHECK(ds4_dsml_calls_done(p) && r.s.n_calls == 1 && !strcmp(S(r.s.content), "Use <tool_calls> tags."),
              "chunk %zu: %d calls, content %s", chunk, r.s.n_calls, S(r.s.content));
        ds4_dsml_free(p);
        rec_free(&r);
    }

    /* Tools off: DSML is plain content. */
    p = feed(&r, "x" E5_BLOCK, 0, false, false);
    CHECK(!strcmp(S(r.s.content), "x" E5_BLOCK) && r.s.n_calls == 0, "tools off");
    ds4_dsml_free(p);
    rec_free(&r);
}

static void test_tolerant_variants(void) {
    const char *t1 = "ok<DSML｜tool_calls>  <｜DSML｜invoke name=\"f\"> <DSML｜parameter name=\"a\" string=\"false\">1"
                     "</DSML｜parameter></DSML｜invoke>\n</｜DSML｜tool_calls>";
    const char *t2 = "ok <tool_calls>\n<invoke name=\"f\">\n<parameter name=\"a\" string=\"false\">1</parameter>\n"
                     "</invoke>\n</tool_calls>\n \n";
    const char *ts[] = {t1, t2};
    for (int k = 0; k < 2; k++) {
        ds4_parsed o;
        REQUIRE(ds4_parse_output(ts[k], strlen(ts[k]), false, true, &o) == 0, "parse");
        CHECK(!strcmp(o.content, "ok"), "variant %d content %s", k, o.content);
        CHECK(o.n_calls == 1 && !strcmp(o.calls[0].arguments, "{\"a\":1}"), "variant %d", k);
        ds4_parsed_free(&o);
    }
    /* Text after a closed block is kept as content. */
    const char *t3 = "A" E5_BLOCK "\nB";
    ds4_parsed o;
    REQUIRE(ds4_parse_output(t3, strlen(t3), false, true, &o) == 0, "parse");
    CHECK(!strcmp(o.content, "A\nB") && o.n_calls == 1, "content %s", o.content);
    ds4_parsed_free(&o);
}

/* ---- property test: render random calls, parse them back ---------------- */

static uint64_t rng_state = 88172645463325252ull;
static uint32_t rnd(uint32_t n) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state % n);
}

/* Random text from pieces that cannot form a marker, entity or closing tag
 * (no ';', no '/'), but include '<', '&', quotes, escapes and multibyte. */
static void rand_text(char *out, size_t cap, int maxlen) {
    static const char *pieces[] = {"a", "b", "Z", " ", "\n", "<", "&", "\"", "\\", "é", "😀", "{", "}", "\t", "x<y", "&amp"};
    size_t n = 0;
    int len = (int)rnd((uint32_t)maxlen + 1);
    out[0] = 0;
    for (int i = 0; i < len; i++) {
        const char *pc = pieces[rnd(sizeof pieces / sizeof *pieces)];
        if (n + strlen(pc) + 1 >= cap) break;
        strcpy(out + n, pc);
        n += strlen(pc);
    }
}

static cJSON *rand_value(int depth) {
    char buf[128];
    switch (rnd(depth > 1 ? 5 : 7)) {
    case 0: rand_text(buf, sizeof buf, 12); return cJSON_CreateString(buf);
    case 1: return cJSON_CreateNumber((double)(int)rnd(100000) - 500);
    case 2: return cJSON_CreateBool(rnd(2));
    case 3: return cJSON_CreateNull();
    case 4: rand_text(buf, sizeof buf, 30); return cJSON_CreateString(buf);
    case 5: {
        cJSON *a = cJSON_CreateArray();
        for (int i = rnd(3); i > 0; i--) cJSON_AddItemToArray(a, rand_value(depth + 1));
        return a;
    }
    default: {
        cJSON *o = cJSON_CreateObject();
        for (int i = rnd(3); i > 0; i--) {
            snprintf(buf, sizeof buf, "k%u", rnd(1000));
            if (!cJSON_GetObjectItemCaseSensitive(o, buf)) cJSON_AddItemToObject(o, buf, rand_value(depth + 1));
        }
        return o;
    }
    }
}

static bool json_same(const char *a, const char *b) {
    cJSON *x = cJSON_Parse(a), *y = cJSON_Parse(b);
    bool same = x && y && cJSON_Compare(x, y, true);
    cJSON_Delete(x);
    cJSON_Delete(y);
    return same;
}

static void test_property_roundtrip(void) {
    int bad = 0;
    for (int iter = 0; iter < 300 && bad < 5; iter++) {
        int n = 1 + (int)rnd(3);
        ds4_tool_call calls[3];
        char names[3][16], *args[3];
        for (int c = 0; c < n; c++) {
            snprintf(names[c], sizeof names[c], "fn_%u", rnd(100));
            cJSON *o = cJSON_CreateObject();
            for (int k = rnd(5); k > 0; k--) {
                char key[16];
                snprintf(key, sizeof key, "p%u", rnd(50));
                if (!cJSON_GetObjectItemCaseSensitive(o, key)) cJSON_AddItemToObject(o, key, rand_value(0));
            }
            args[c] = cJSON_PrintUnformatted(o);
            cJSON_Delete(o);
            calls[c] = (ds4_tool_call){.name = names[c], .arguments = args[c]};
        }
        char *blk = ds4_dsml_render_calls(calls, n);
        bool thinking = rnd(2);
        char reasoning[256], content[256], text[8192];
        rand_text(reasoning, sizeof reasoning, 20);
        if (rnd(3) == 0) strcat(reasoning, "<｜DSML｜tool_calls>"); /* never parsed there */
        rand_text(content, sizeof content, 20);
        snprintf(text, sizeof text, "%s%s%s%s", thinking ? reasoning : "", thinking ? "</think>" : "", content, blk);
        /* Expected content: trailing whitespace removed. */
        size_t cl = strlen(content);
        while (cl && strchr(" \t\n", content[cl - 1])) cl--;
        content[cl] = 0;

        ds4_parsed o;
        REQUIRE(ds4_parse_output(text, strlen(text), thinking, true, &o) == 0, "parse");
        bool ok = o.n_calls == n && !strcmp(o.content, content) && (!thinking || !strcmp(o.reasoning, reasoning));
        for (int c = 0; ok && c < n; c++)
            ok = !strcmp(o.calls[c].name, names[c]) && json_same(o.calls[c].arguments, args[c]) &&
                 !strcmp(o.calls[c].raw_dsml, blk);
        /* Streamed in random chunks: same reasoning, content and arguments. */
        for (int rep = 0; ok && rep < 3; rep++) {
            uint8_t in[8192];
            in[0] = (uint8_t)((thinking ? 1 : 0) | 2);
            in[1] = (uint8_t)rnd(256);
            size_t tl = strlen(text);
            memcpy(in + 2, text, tl);
            const char *why = dsml_check(in, tl + 2);
            if (why) { ok = false; fprintf(stderr, "  %s\n", why); }
        }
        if (!ok) {
            bad++;
            CHECK(ok, "iteration %d:\n%s\n-> content %s, %d calls, args0 %s\nwant %s", iter, text, o.content, o.n_calls,
                  o.n_calls ? o.calls[0].arguments : "-", args[0]);
        }
        ds4_parsed_free(&o);
        free(blk);
        for (int c = 0; c < n; c++) free(args[c]);
    }
}

/* Random bytes biased towards DSML pieces: the fuzz invariants hold. */
static void test_fuzz_invariants(void) {
    static const char *pieces[] = {"<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>", "<｜DSML｜invoke name=\"f\">",
                                   "</｜DSML｜invoke>", "<｜DSML｜parameter name=\"a\" string=\"true\">",
                                   "<｜DSML｜parameter name=\"b\" string=\"false\">", "</｜DSML｜parameter>", "\n\n",
                                   "</think>", "&amp;", "&lt", "\"", "{", "}", "[1,", "x", " ", "<", "\xE2\x82", "\xFF",
                                   "<tool_calls>", "<DSML｜tool_calls>", "｜DSML｜"};
    int bad = 0;
    for (int iter = 0; iter < 3000 && bad < 5; iter++) {
        uint8_t in[1024];
        size_t n = 2;
        in[0] = (uint8_t)rnd(4);
        in[1] = (uint8_t)rnd(256);
        for (int k = (int)rnd(30); k > 0; k--) {
            const char *pc = pieces[rnd(sizeof pieces / sizeof *pieces)];
            if (n + strlen(pc) >= sizeof in) break;
            memcpy(in + n, pc, strlen(pc));
            n += strlen(pc);
        }
        const char *why = dsml_check(in, n);
        if (why) {
            bad++;
            CHECK(!why, "iteration %d: %s on %.*s", iter, why, (int)(n - 2), (const char *)in + 2);
        }
    }
}

int main(void) {
    RUN(test_reasoning_then_content);
    RUN(test_e5_call_streamed_bytewise);
    RUN(test_holdback);
    RUN(test_values);
    RUN(test_json_values);
    RUN(test_utf8_in_values);
    RUN(test_structural_flag);
    RUN(test_unterminated_and_malformed);
    RUN(test_tolerant_variants);
    RUN(test_property_roundtrip);
    RUN(test_fuzz_invariants);
    TEST_END();
}
