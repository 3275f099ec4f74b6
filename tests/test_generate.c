/* ds4_generate on the tiny model: forced token scripts drive the real
 * sampler, detokenizer, stop logic and DSML parser; prefix reuse, limits,
 * cancellation and errors. */
#include "ds4.h"
#include "test.h"

static ds4_engine *E;
static ds4_session *S;
static const ds4_tokenizer *T;

typedef struct {
    char content[512], reasoning[512], tool_name[64], tool_args[256];
    int n_tool_begin, n_events, cancel_after;
} sink;

static void on_event(void *ud, const ds4_event *ev) {
    sink *k = ud;
    k->n_events++;
    char *dst = ev->kind == DS4_EV_CONTENT ? k->content : ev->kind == DS4_EV_REASONING ? k->reasoning
              : ev->kind == DS4_EV_TOOL_ARGS ? k->tool_args : NULL;
    size_t cap = ev->kind == DS4_EV_TOOL_ARGS ? sizeof k->tool_args : sizeof k->content;
    if (dst && strlen(dst) + ev->len < cap) strncat(dst, ev->text, ev->len);
    if (ev->kind == DS4_EV_TOOL_BEGIN) { k->n_tool_begin++; snprintf(k->tool_name, sizeof k->tool_name, "%s", ev->name); }
}

static bool cancel_cb(void *ud) {
    sink *k = ud;
    return k->cancel_after > 0 && k->n_events >= k->cancel_after;
}

/* BOS <User> text <Assistant> </think> (or <think>) */
static ds4_tokens prompt_for(const char *text, bool thinking) {
    ds4_chat_msg m = {.role = DS4_ROLE_USER, .content = text};
    ds4_chat c = {.msgs = &m, .n_msgs = 1, .think = thinking ? DS4_THINK_HIGH : DS4_THINK_NONE, .ctx = 4096,
                  .add_generation_prompt = true};
    ds4_rendered r;
    ds4_tokens t = {0};
    char err[128];
    if (ds4_chat_render(&c, &r, err, sizeof err) == 0) ds4_tokenize_rendered(T, &r, &t);
    ds4_rendered_free(&r);
    return t;
}

static int gen(const char *user, const char *script, ds4_gen_params *p, sink *k, ds4_gen_result *r) {
    ds4_tokens pr = prompt_for(user, p->thinking), forced = {0};
    if (script) ds4_tokenize_special(T, script, strlen(script), &forced);
    p->engine = E;
    p->on_event = on_event;
    p->ud = k;
    p->cancelled = cancel_cb;
    p->forced = forced.ids;
    p->n_forced = forced.n;
    p->sampling = ds4_sampling_defaults(p->thinking);
    char err[256];
    int rc = ds4_generate(S, pr.ids, pr.n, p, r, err, sizeof err);
    ds4_tokens_free(&pr);
    ds4_tokens_free(&forced);
    return rc;
}

#define EOS "<｜end▁of▁sentence｜>"

static void test_plain_text_and_eos(void) {
    sink k = {0};
    ds4_gen_params p = {0};
    ds4_gen_result r;
    REQUIRE(gen("Hi", "Hello there!" EOS, &p, &k, &r) == 0);
    CHECK(r.finish == DS4_FINISH_STOP, "finish %d", r.finish);
    CHECK(strcmp(r.text, "Hello there!") == 0, "text '%s'", r.text);
    CHECK(strcmp(k.content, "Hello there!") == 0, "events '%s'", k.content);
    CHECK(r.len == strlen(r.text));
    CHECK(r.n_prompt >= 5 && r.n_gen >= 2, "n_prompt %zu n_gen %zu", r.n_prompt, r.n_gen);
    ds4_gen_result_free(&r);
}

static void test_stop_strings(void) {
    const char *stops[] = {"zzz", "lo th"};   /* spans a token boundary */
    sink k = {0};
    ds4_gen_params p = {.stop = stops, .n_stop = 2};
    ds4_gen_result r;
    REQUIRE(gen("Hi", "Hello there!" EOS, &p, &k, &r) == 0);
    CHECK(r.finish == DS4_FINISH_STOP);
    CHECK(strcmp(r.text, "Hel") == 0, "text '%s'", r.text);
    CHECK(strcmp(k.content, "Hel") == 0, "no event text past the stop: '%s'", k.content);
    ds4_gen_result_free(&r);
}

static void test_max_tokens(void) {
    sink k = {0};
    ds4_gen_params p = {.max_tokens = 3};
    ds4_gen_result r;
    REQUIRE(gen("Hi", "word word word word word" EOS, &p, &k, &r) == 0);
    CHECK(r.finish == DS4_FINISH_LENGTH);
    CHECK(r.n_gen == 3, "n_gen %zu", r.n_gen);
    CHECK(strcmp(r.text, "word word word") == 0, "text '%s'", r.text);
    CHECK(ds4_session_len(S) == r.n_prompt + 3, "session %zu, prompt %zu", ds4_session_len(S), r.n_prompt);
    ds4_gen_result_free(&r);
}

/* Generation until the context is full: every token shown (and counted)
 * is in the session, none is sampled that could not be evaluated. */
static void test_context_full(void) {
    char err[256];
    ds4_session *full = ds4_session_new(E, 64, err, sizeof err);
    REQUIRE(full, "%s", err);
    ds4_session *keep = S;
    S = full;
    sink k = {0};
    ds4_gen_params p = {0};
    ds4_gen_result r;
    char script[1024] = "";
    for (int i = 0; i < 100; i++) strcat(script, "word ");
    int rc = gen("Hi", script, &p, &k, &r);
    S = keep;
    CHECK(rc == 0 && r.finish == DS4_FINISH_LENGTH, "rc %d finish %d", rc, r.finish);
    CHECK(ds4_session_len(full) == 64, "session %zu", ds4_session_len(full));
    CHECK(r.n_prompt + r.n_gen == 64, "prompt %zu + generated %zu", r.n_prompt, r.n_gen);
    size_t len = 0;
    char *held = ds4_kv_text(T, ds4_session_tokens(full) + r.n_prompt, ds4_session_len(full) - r.n_prompt, &len);
    CHECK(held && len == r.len && !memcmp(held, r.text, len), "session tail '%s' vs text '%s'", held, r.text);
    CHECK(!strcmp(k.content, r.text), "events '%s'", k.content);
    free(held);
    ds4_gen_result_free(&r);
    ds4_session_free(full);
}

static void test_prefix_reuse(void) {
    sink k = {0};
    ds4_gen_params p = {0};
    ds4_gen_result r;
    REQUIRE(gen("Reuse me", "Sure." EOS, &p, &k, &r) == 0);
    size_t held = ds4_session_len(S);
    CHECK(held == r.n_prompt + r.n_gen - 1, "the session holds all but the last sampled token: %zu", held);
    size_t n_prompt = r.n_prompt;
    ds4_gen_result_free(&r);
    /* The same prompt again: all of it is reused. */
    REQUIRE(gen("Reuse me", "Sure." EOS, &p, &k, &r) == 0);
    CHECK(r.n_cached == n_prompt, "n_cached %zu of %zu", r.n_cached, n_prompt);
    ds4_gen_result_free(&r);
    /* A different prompt shares only BOS <User>. */
    REQUIRE(gen("Other", "x" EOS, &p, &k, &r) == 0);
    CHECK(r.n_cached == 2, "n_cached %zu", r.n_cached);
    ds4_gen_result_free(&r);
}

static void test_thinking_tool_call(void) {
    sink k = {0};
    ds4_gen_params p = {.thinking = true, .tools = true};
    ds4_gen_result r;
    const char *script = "Plan.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
                         "<｜DSML｜parameter name=\"a\" string=\"false\">[1,2]</｜DSML｜parameter>\n"
                         "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" "ignored after the block";
    REQUIRE(gen("Call f", script, &p, &k, &r) == 0);
    CHECK(r.finish == DS4_FINISH_TOOL_CALLS, "finish %d", r.finish);
    CHECK(strcmp(k.reasoning, "Plan.") == 0, "reasoning '%s'", k.reasoning);
    CHECK(k.n_tool_begin == 1 && strcmp(k.tool_name, "f") == 0);
    CHECK(strcmp(k.tool_args, "{\"a\":[1,2]}") == 0, "args '%s'", k.tool_args);
    CHECK(!strstr(r.text, "ignored"), "stopped at the block end");
    ds4_gen_result_free(&r);
}

static void test_unterminated_block(void) {
    sink k = {0};
    ds4_gen_params p = {.tools = true};
    ds4_gen_result r;
    REQUIRE(gen("x", "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">" EOS, &p, &k, &r) == 0);
    CHECK(r.finish == DS4_FINISH_ERROR, "finish %d", r.finish);
    ds4_gen_result_free(&r);
}

static void test_cancel(void) {
    sink k = {.cancel_after = 2};
    ds4_gen_params p = {0};
    ds4_gen_result r;
    REQUIRE(gen("x", "one two three four five six" EOS, &p, &k, &r) == 0);
    CHECK(r.finish == DS4_FINISH_CANCELLED, "finish %d", r.finish);
    CHECK(r.n_gen < 6, "stopped early: %zu", r.n_gen);
    ds4_gen_result_free(&r);
}

static void test_prompt_too_long(void) {
    ds4_tokens t = {0};
    for (uint32_t i = 0; i < ds4_session_ctx(S); i++) ds4_tokens_push(&t, 100);
    ds4_gen_params p = {.engine = E, .sampling = ds4_sampling_defaults(false)};
    ds4_gen_result r;
    char err[256] = "";
    CHECK(ds4_generate(S, t.ids, t.n, &p, &r, err, sizeof err) == -1);
    CHECK(strstr(err, "context") != NULL, "err '%s'", err);
    ds4_gen_result_free(&r);
    ds4_tokens_free(&t);
}

int main(void) {
    const char *path = test_env("DS4_TINY", "build/tiny.gguf");
    char err[512];
    ds4_engine_params ep = {.model_path = path, .backend = DS4_BACKEND_CPU, .n_threads = 1};
    E = ds4_engine_open(&ep, err, sizeof err);
    if (!E) { printf("cannot open %s: %s (run make test / ds4-synth)\n0 passed, 1 failed\n", path, err); return 1; }
    T = ds4_engine_tokenizer(E);
    S = ds4_session_new(E, 512, err, sizeof err);
    if (!S) { printf("session: %s\n0 passed, 1 failed\n", err); return 1; }
    RUN(test_plain_text_and_eos);
    RUN(test_stop_strings);
    RUN(test_max_tokens);
    RUN(test_context_full);
    RUN(test_prefix_reuse);
    RUN(test_thinking_tool_call);
    RUN(test_unterminated_block);
    RUN(test_cancel);
    RUN(test_prompt_too_long);
    ds4_session_free(S);
    ds4_engine_close(E);
    TEST_END();
}
