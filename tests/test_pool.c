/* Session pool: the routing policy as a pure function (scenarios and a
 * simulated interleaving of two conversations with side requests), then the
 * pool object on the tiny model with a disk store: a restart continues with
 * only the suffix prefilled (logits identical to a cold prefill), and two
 * interleaved conversations plus side requests on 2 slots never re-prefill a
 * main conversation. Checkpoints are written by the pool's writer thread:
 * prefill goes on while a write is held, and a third hand-over waits. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ds4.h"
#include "test.h"

/* ---- pure policy ---------------------------------------------------------------- */

static int32_t A[400], B[400], S[400];

static void fill(int32_t *a, int32_t base, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] = base + (int32_t)i;
}

static ds4_pool_slot_info slot_of(const int32_t *ids, size_t n, size_t n_prompt, double idle, uint64_t uses) {
    return (ds4_pool_slot_info){ids, n, n_prompt, idle, uses};
}

static void test_choose_scenarios(void) {
    fill(A, 1000, 400);
    fill(B, 2000, 400);
    fill(S, 3000, 400);
    ds4_pool_slot_info sl[3];
    ds4_pool_choice c;

    /* Continuation: the slot holding a prefix wins over a free slot. */
    sl[0] = slot_of(NULL, 0, 0, 0, 0);
    sl[1] = slot_of(A, 200, 180, 5, 1);
    c = ds4_pool_choose(sl, 2, A, 300, 64, 64);
    CHECK(c.slot == 1 && c.reuse == 200 && !c.spill);

    /* Side request sharing nothing, a slot free: it takes the free one. */
    c = ds4_pool_choose(sl, 2, S, 50, 64, 64);
    CHECK(c.slot == 0 && c.reuse == 0 && !c.spill);

    /* Side request sharing a short head (BOS and a few tokens) with the
     * main conversation: still the free slot. */
    int32_t side[50];
    memcpy(side, A, 5 * sizeof *side);
    fill(side + 5, 5000, 45);
    c = ds4_pool_choose(sl, 2, side, 50, 64, 64);
    CHECK(c.slot == 0);

    /* Follow-up whose rendering dropped the last reply's reasoning: it repeats
     * the slot's whole previous prompt (180) but not the reply: same slot, the
     * stale reply is cut without a spill. */
    int32_t fu[260];
    memcpy(fu, A, 190 * sizeof *fu);
    fill(fu + 190, 7000, 70);
    c = ds4_pool_choose(sl, 2, fu, 260, 64, 64);
    CHECK(c.slot == 1 && c.reuse == 190 && !c.spill);

    /* Regenerate: the same prompt again. */
    c = ds4_pool_choose(sl, 2, A, 180, 64, 64);
    CHECK(c.slot == 1 && c.reuse == 180);

    /* Two conversations sharing a long system prompt (150 tokens): the second
     * does not take over the first's slot while one is free. */
    int32_t b2[300];
    memcpy(b2, A, 150 * sizeof *b2);
    fill(b2 + 150, 8000, 150);
    c = ds4_pool_choose(sl, 2, b2, 300, 64, 64);
    CHECK(c.slot == 0 && c.reuse == 0);

    /* Full pool. A rewind of conversation A (strict prefix inside its
     * prompt): A's slot, spilling the 100 tokens it would cut. */
    sl[0] = slot_of(B, 300, 280, 1, 3);
    c = ds4_pool_choose(sl, 2, A, 100, 64, 64);
    CHECK(c.slot == 1 && c.reuse == 100 && c.spill);
    /* Both slots share the rewound prefix: the one cutting less. */
    sl[0] = slot_of(A, 300, 280, 1, 3);
    c = ds4_pool_choose(sl, 2, A, 100, 64, 64);
    CHECK(c.slot == 1 && c.reuse == 100 && c.spill);
    sl[0] = slot_of(B, 300, 280, 1, 3);
    /* A tiny rewind cuts less than min_spill: no spill. */
    c = ds4_pool_choose(sl, 2, A, 170, 64, 64);
    CHECK(c.slot == 1 && !c.spill);
    /* Sharing only the short head: the least valuable slot (A: shorter, fewer
     * uses, idler), spilled. */
    c = ds4_pool_choose(sl, 2, side, 50, 64, 64);
    CHECK(c.slot == 1 && c.reuse == 5 && c.spill);
    /* A long idle conversation loses to a fresh one of the same size. */
    sl[0] = slot_of(B, 200, 180, 7200, 1);
    sl[1] = slot_of(A, 200, 180, 10, 1);
    c = ds4_pool_choose(sl, 2, S, 50, 64, 64);
    CHECK(c.slot == 0);
    /* A short side slot goes before a main conversation. */
    sl[0] = slot_of(S, 40, 30, 0, 1);
    sl[1] = slot_of(A, 200, 180, 100, 1);
    c = ds4_pool_choose(sl, 2, B, 50, 64, 64);
    CHECK(c.slot == 0 && !c.spill);
    /* Longest follow-up among several. */
    sl[0] = slot_of(A, 100, 100, 0, 1);
    sl[1] = slot_of(A, 200, 200, 0, 1);
    sl[2] = slot_of(NULL, 0, 0, 0, 0);
    c = ds4_pool_choose(sl, 3, A, 300, 64, 64);
    CHECK(c.slot == 1 && c.reuse == 200);
    CHECK(ds4_pool_choose(sl, 0, A, 10, 64, 64).slot == -1);
}

/* Simulation of the server loop over the pure policy: slots hold token
 * lists, a "disk" remembers spilled contents; each request reuses what the
 * chosen slot keeps or the longest spilled prefix. Conversations A and B
 * alternate with unrelated side requests on 2 slots; a main turn must never
 * prefill more than its new tokens. */
#define SIM_MAX 2000
typedef struct { int32_t ids[SIM_MAX]; size_t n, n_prompt; double last; uint64_t uses; } sim_slot;
static sim_slot sim[2];
static int32_t disk[32][SIM_MAX];
static size_t disk_n[32], n_disk;

static size_t lcp(const int32_t *a, size_t na, const int32_t *b, size_t nb) {
    size_t n = 0;
    while (n < na && n < nb && a[n] == b[n]) n++;
    return n;
}

/* Returns tokens prefilled. */
static size_t sim_request(const int32_t *prompt, size_t n, size_t gen, double now) {
    ds4_pool_slot_info info[2];
    for (int i = 0; i < 2; i++)
        info[i] = slot_of(sim[i].ids, sim[i].n, sim[i].n_prompt, now - sim[i].last, sim[i].uses);
    ds4_pool_choice c = ds4_pool_choose(info, 2, prompt, n, 64, 64);
    sim_slot *s = &sim[c.slot];
    if (c.spill && n_disk < 32) {
        memcpy(disk[n_disk], s->ids, s->n * sizeof *s->ids);
        disk_n[n_disk++] = s->n;
    }
    size_t have = c.reuse;
    for (size_t k = 0; k < n_disk; k++)
        if (disk_n[k] <= n && disk_n[k] > have && lcp(disk[k], disk_n[k], prompt, n) == disk_n[k]) have = disk_n[k];
    memcpy(s->ids, prompt, n * sizeof *prompt);
    for (size_t g = 0; g < gen; g++) s->ids[n + g] = 90000 + (int32_t)(n + g);
    s->n = n + gen;
    s->n_prompt = n;
    s->last = now;
    s->uses++;
    return n - have;
}

static void test_simulated_interleaving(void) {
    memset(sim, 0, sizeof sim);
    n_disk = 0;
    int32_t conv[2][SIM_MAX];
    size_t len[2] = {0, 0};
    fill(conv[0], 100000, SIM_MAX);
    fill(conv[1], 200000, SIM_MAX);
    double now = 0;
    int bad = 0;
    for (int turn = 0; turn < 8; turn++) {
        for (int x = 0; x < 2; x++) {
            /* A main turn: everything so far (its last reply included) plus
             * 40 new tokens; the reply is 15 tokens. */
            size_t n = len[x] + (turn ? 40 : 100);   /* first prompt worth a spill */
            size_t pre = sim_request(conv[x], n, 15, now += 10);
            for (size_t g = 0; g < 15; g++) conv[x][n + g] = 90000 + (int32_t)(n + g);
            if (turn > 0 && pre != 40) { bad++; fprintf(stderr, "  turn %d conv %d prefilled %zu\n", turn, x, pre); }
            len[x] = n + 15;
            /* A side request between main turns (title, summary...). */
            int32_t side[30];
            fill(side, 300000 + turn * 100 + x * 50, 30);
            sim_request(side, 30, 5, now += 1);
        }
    }
    CHECK(bad == 0, "%d main turns re-prefilled", bad);
    CHECK(n_disk > 0, "mains were spilled, not dropped");
}

/* ---- pool object on the tiny model --------------------------------------------- */

/* The --sessions rule: floor(0.8 · free / per), default clamped to 1…8,
 * an explicit count refused with the numbers when it does not fit. */
static void test_sessions_for(void) {
    const uint64_t G = 1ull << 30;
    char msg[320];
    CHECK(ds4_pool_sessions_for(0, 40 * G, 6 * G, 65536, msg, sizeof msg) == 5, "%s", msg);   /* 32 / 6 */
    CHECK(!strcmp(msg, "5 (free 40.0 GiB, 6.0 GiB each at ctx 65536)"), "'%s'", msg);
    CHECK(ds4_pool_sessions_for(5, 40 * G, 6 * G, 65536, msg, sizeof msg) == 5, "%s", msg);
    CHECK(ds4_pool_sessions_for(6, 40 * G, 6 * G, 65536, msg, sizeof msg) == -1);
    CHECK(strstr(msg, "6 sessions at ctx 65536 need 36.0 GiB (6.0 GiB each) but 40.0 GiB is free: at most 5 fit"),
          "'%s'", msg);
    /* Nothing fits: the default still tries one (the backend then says why). */
    CHECK(ds4_pool_sessions_for(0, 1 * G, 6 * G, 65536, msg, sizeof msg) == 1, "%s", msg);
    CHECK(ds4_pool_sessions_for(1, 1 * G, 6 * G, 65536, msg, sizeof msg) == -1, "%s", msg);
    CHECK(strstr(msg, "at most 0 fit"), "'%s'", msg);
    /* Plenty: the default stops at 8, an explicit larger count is allowed. */
    CHECK(ds4_pool_sessions_for(0, 1024 * G, 6 * G, 65536, msg, sizeof msg) == DS4_POOL_MAX_DEFAULT, "%s", msg);
    CHECK(ds4_pool_sessions_for(20, 1024 * G, 6 * G, 65536, msg, sizeof msg) == 20, "%s", msg);
    /* Small sessions are shown in MiB, not as "0.0 GiB". */
    ds4_pool_sessions_for(0, 10 * G, 3u << 20, 4096, msg, sizeof msg);
    CHECK(!strcmp(msg, "8 (free 10.0 GiB, 3.0 MiB each at ctx 4096)"), "'%s'", msg);
}

static ds4_engine *eng;
static char model_path[256], root[128];
static bool tmp_model;
static uint32_t V;

static void open_engine(void) {
    if (test_tiny_model(model_path, sizeof model_path, &tmp_model)) return;
    char err[512];
    ds4_engine_params p = {.model_path = model_path, .backend = DS4_BACKEND_CPU, .n_threads = 2};
    eng = ds4_engine_open(&p, err, sizeof err);
    if (!eng) { fprintf(stderr, "%s\n", err); return; }
    V = ds4_engine_n_vocab(eng);
}

static void rand_ids(int32_t *out, size_t n, uint32_t seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        out[i] = (int32_t)((seed >> 8) % V);
    }
}

static ds4_kvstore *open_store(const char *dir, const char *id) {
    char err[256];
    ds4_kvstore_params sp = {.dir = dir, .space_bytes = 256u << 20, .model_id = id};
    ds4_kvstore *st = ds4_kvstore_open(&sp, err, sizeof err);
    if (!st) fprintf(stderr, "%s\n", err);
    return st;
}

/* The server's sequence for one request, with the generation replaced by
 * appending `gen` given tokens (all but the last evaluated, as ds4_generate
 * leaves it). Returns prompt tokens prefilled (not reused), or SIZE_MAX. */
static size_t serve(ds4_pool *pool, const int32_t *prompt, size_t n, const int32_t *gen, size_t n_gen,
                    ds4_pool_lease *l) {
    char err[256];
    if (ds4_pool_acquire(pool, prompt, n, l, err, sizeof err)) { fprintf(stderr, "%s\n", err); return SIZE_MAX; }
    free(l->extra);
    size_t have = ds4_session_len(l->session);
    if (have != l->n_memory + l->n_disk || memcmp(ds4_session_tokens(l->session), prompt, have * 4)) return SIZE_MAX;
    if (ds4_pool_prefill(pool, l, prompt, n - 3, NULL, NULL, err, sizeof err)) return SIZE_MAX;
    size_t at = ds4_session_len(l->session);
    if (at < n && ds4_session_eval(l->session, prompt + at, n - at, NULL, NULL, NULL, err, sizeof err)) return SIZE_MAX;
    if (n_gen > 1 && ds4_session_eval(l->session, gen, n_gen - 1, NULL, NULL, NULL, err, sizeof err)) return SIZE_MAX;
    ds4_pool_release(pool, l, n);
    return n - have;
}

static int extra_calls;
static int extra_fn(void *ud, const char *text, size_t text_len, const int32_t *ids, size_t n, uint8_t **blob,
                    size_t *len) {
    (void)ud;
    size_t tl = 0;
    char *want = ds4_kv_text(ds4_engine_tokenizer(eng), ids, n, &tl);
    if (want && tl == text_len && !memcmp(want, text, tl)) extra_calls++;   /* text is that of ids */
    free(want);
    *blob = malloc(8);
    if (!*blob) return -1;
    memcpy(*blob, "map:", 4);
    uint32_t k = (uint32_t)n;
    memcpy(*blob + 4, &k, 4);
    *len = 8;
    (void)ids;
    return 0;
}

static void test_model_id_and_text(void) {
    REQUIRE(eng);
    char a[65], b[65], err[256];
    REQUIRE(ds4_kv_model_id(eng, a, err, sizeof err) == 0, "%s", err);
    REQUIRE(ds4_kv_model_id(eng, b, err, sizeof err) == 0);
    CHECK(strlen(a) == 64 && !strcmp(a, b));
    const ds4_tokenizer *t = ds4_engine_tokenizer(eng);
    ds4_tokens toks = {0};
    const char *s = "Hello world, checkpoints!";
    REQUIRE(ds4_tokenize(t, s, strlen(s), &toks) == 0);
    size_t len = 0;
    char *txt = ds4_kv_text(t, toks.ids, toks.n, &len);
    CHECK(txt && len == strlen(s) && !strcmp(txt, s));
    free(txt);
    ds4_tokens_free(&toks);
}

static uint64_t meminfo_kb(const char *key) {
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    unsigned long long v = 0;
    size_t kl = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, kl) && line[kl] == ':') { sscanf(line + kl + 1, "%llu", &v); break; }
    if (f) fclose(f);
    return v;
}

/* What the server sizes --sessions with, on the CPU backend. */
static void test_engine_memory(void) {
    REQUIRE(eng);
    char err[256];
    uint64_t a = 0, b = 0, fr = 0;
    REQUIRE(ds4_engine_session_bytes(eng, 4096, &a, err, sizeof err) == 0, "%s", err);
    REQUIRE(ds4_engine_session_bytes(eng, 8192, &b, err, sizeof err) == 0, "%s", err);
    /* Doubling ctx from 4096 adds, with the tiny shape (head_dim 128, index
     * head 128; layers 2 and 4 ratio 4, 3 and 5 ratio 128): 4096 token ids,
     * 1024 compressed + 1024 indexer rows in each ratio-4 layer and 32 rows
     * in each ratio-128 layer, all f32. The window rings do not grow. */
    uint64_t grow = 4096 * 4 + 2 * (1024 + 1024) * 128 * 4 + 2 * 32 * 128 * 4;
    CHECK(b - a == grow, "session bytes %llu -> %llu, grew %llu, expected %llu", (unsigned long long)a,
          (unsigned long long)b, (unsigned long long)(b - a), (unsigned long long)grow);
    /* Token ids and logits at least, and no more than the inspector's whole
     * estimate (weights + KV + scratch at ctx 4096: 19.5 MiB). */
    CHECK(a > 4096 * 4 + (uint64_t)V * 4 && a < (20u << 20), "%llu", (unsigned long long)a);
    REQUIRE(ds4_engine_mem_free(eng, &fr, err, sizeof err) == 0, "%s", err);
    uint64_t total = meminfo_kb("MemTotal") << 10, avail = meminfo_kb("MemAvailable") << 10;
    CHECK(fr > 0 && fr < total, "free %llu of %llu", (unsigned long long)fr, (unsigned long long)total);
    /* MemAvailable less the mapped weights (tiny.gguf, 17.7 MB; no MTP file
     * loaded here), give or take what other processes did meanwhile. */
    int64_t d = (int64_t)avail - (int64_t)fr - 17703680;
    CHECK(d > -(256 << 20) && d < (256 << 20), "free %llu, MemAvailable %llu", (unsigned long long)fr,
          (unsigned long long)avail);
}

static void test_restart_suffix_only(void) {
    REQUIRE(eng);
    char dir[256], id[65], err[256];
    snprintf(dir, sizeof dir, "%s/restart", root);
    REQUIRE(ds4_kv_model_id(eng, id, err, sizeof err) == 0);
    enum { N1 = 200, G = 20, N2 = N1 + G + 30, N3 = N2 + 100 };
    static int32_t p2[N3];
    rand_ids(p2, N3, 7);
    ds4_kvstore *st = open_store(dir, id);
    REQUIRE(st);
    ds4_pool_params pp = {.n_slots = 2, .ctx = 512, .store = st, .align = 64, .every = 128,
                          .extra_fn = extra_fn, .log = getenv("DS4_POOL_LOG") ? stderr : NULL};
    ds4_pool *pool = ds4_pool_new(eng, &pp, err, sizeof err);
    REQUIRE(pool, "%s", err);
    ds4_pool_lease l;
    /* Generated tokens: p2[N1, N1+G); the request ends with G-1 evaluated. */
    CHECK(serve(pool, p2, N1, p2 + N1, G + 1, &l) == N1);
    REQUIRE(ds4_pool_flush(pool, err, sizeof err) == 0, "%s", err);
    /* Prefill frontier at 128, trimmed prompt at 192 (stable = 197). */
    CHECK(ds4_kvstore_count(st) == 2, "%zu checkpoints", ds4_kvstore_count(st));
    CHECK(ds4_pool_spill_all(pool, err, sizeof err) == 0, "%s", err);
    CHECK(ds4_kvstore_count(st) == 3 && extra_calls == 3);
    /* Nothing new to save: a second spill writes nothing. */
    CHECK(ds4_pool_spill_all(pool, err, sizeof err) == 0 && extra_calls == 3);
    ds4_pool_free(pool);
    ds4_kvstore_close(st);

    /* Restart: a new store and pool on the same directory. */
    st = open_store(dir, id);
    REQUIRE(st && ds4_kvstore_count(st) == 3);
    pp.store = st;
    pool = ds4_pool_new(eng, &pp, err, sizeof err);
    REQUIRE(pool);
    REQUIRE(ds4_pool_acquire(pool, p2, N2, &l, err, sizeof err) == 0, "%s", err);
    CHECK(l.n_disk == N1 + G && l.n_memory == 0, "disk %zu memory %zu", l.n_disk, l.n_memory);
    CHECK(l.extra_len == 8 && !memcmp(l.extra, "map:", 4) && *(uint32_t *)(l.extra + 4) == N1 + G);
    free(l.extra);
    /* Only the suffix is left; its logits equal a cold prefill's. */
    REQUIRE(ds4_session_eval(l.session, p2 + N1 + G, N2 - N1 - G, NULL, NULL, NULL, err, sizeof err) == 0);
    ds4_session *cold = ds4_session_new(eng, 512, err, sizeof err);
    REQUIRE(cold);
    REQUIRE(ds4_session_eval(cold, p2, N2, NULL, NULL, NULL, err, sizeof err) == 0);
    CHECK(!memcmp(ds4_session_logits(cold), ds4_session_logits(l.session), V * sizeof(float)),
          "restored + suffix == cold prefill");
    /* A long reply: the slot ends at N3 tokens. */
    REQUIRE(ds4_session_eval(l.session, p2 + N2, N3 - N2, NULL, NULL, NULL, err, sizeof err) == 0);
    ds4_pool_release(pool, &l, N2);

    /* Rewind to 200, further back than the engine can cut exactly (150 >
     * window + 1): the nearest checkpoint at or before it, 192, in the free
     * slot; the 350-token conversation stays resident. */
    REQUIRE(ds4_pool_acquire(pool, p2, 200, &l, err, sizeof err) == 0);
    free(l.extra);
    CHECK(l.slot == 1 && l.n_disk == 192 && l.n_memory == 0, "slot %d disk %zu memory %zu", l.slot, l.n_disk,
          l.n_memory);
    REQUIRE(ds4_session_eval(l.session, p2 + 192, 8, NULL, NULL, NULL, err, sizeof err) == 0);
    REQUIRE(ds4_session_truncate(cold, 0, err, sizeof err) == 0);
    REQUIRE(ds4_session_eval(cold, p2, 200, NULL, NULL, NULL, err, sizeof err) == 0);
    CHECK(!memcmp(ds4_session_logits(cold), ds4_session_logits(l.session), V * sizeof(float)));
    ds4_pool_release(pool, &l, 200);
    /* Rewind to 150 with both slots full: the 200-token slot shares as much
     * and cuts less; 50 back is exact, so it stays in memory, no spill. */
    REQUIRE(ds4_pool_acquire(pool, p2, 150, &l, err, sizeof err) == 0);
    free(l.extra);
    CHECK(l.slot == 1 && l.n_memory == 150 && l.n_disk == 0 && !l.spilled, "slot %d memory %zu disk %zu", l.slot,
          l.n_memory, l.n_disk);
    CHECK(ds4_pool_session(pool, 0) && ds4_session_len(ds4_pool_session(pool, 0)) == N3);
    ds4_session_free(cold);
    ds4_pool_free(pool);
    ds4_kvstore_close(st);
}

/* A checkpoint whose checksums hold but whose session the engine refuses
 * (here: bytes that are no snapshot at all) is removed the first time a
 * prompt matches it, with one log line, and never read again; the prompt
 * is served from scratch. */
static void test_refused_checkpoint_removed(void) {
    REQUIRE(eng);
    char dir[256], id[65], err[256];
    snprintf(dir, sizeof dir, "%s/refused", root);
    REQUIRE(ds4_kv_model_id(eng, id, err, sizeof err) == 0);
    static int32_t ids[100];
    rand_ids(ids, 100, 11);
    FILE *log = tmpfile();
    REQUIRE(log);
    ds4_kvstore_params sp = {.dir = dir, .space_bytes = 1u << 20, .model_id = id, .log = log};
    ds4_kvstore *st = ds4_kvstore_open(&sp, err, sizeof err);
    REQUIRE(st, "%s", err);
    size_t tl = 0;
    char *text = ds4_kv_text(ds4_engine_tokenizer(eng), ids, 64, &tl);
    static const uint8_t junk[256] = {1, 2, 3};
    ds4_kv_checkpoint cp = {.text = text, .text_len = tl, .ids = ids, .n_ids = 64, .session = junk,
                            .session_len = sizeof junk};
    REQUIRE(ds4_kvstore_save(st, &cp, err, sizeof err) == 0, "%s", err);
    free(text);
    ds4_pool_params pp = {.n_slots = 1, .ctx = 256, .store = st, .align = 64};
    ds4_pool *pool = ds4_pool_new(eng, &pp, err, sizeof err);
    REQUIRE(pool, "%s", err);
    ds4_pool_lease l;
    for (int round = 0; round < 2; round++) {
        REQUIRE(ds4_pool_acquire(pool, ids, 100, &l, err, sizeof err) == 0, "%s", err);
        free(l.extra);
        CHECK(l.n_disk == 0 && l.n_memory == 0 && ds4_session_len(l.session) == 0, "round %d: disk %zu", round,
              l.n_disk);
        CHECK(ds4_kvstore_count(st) == 0, "round %d: %zu indexed", round, ds4_kvstore_count(st));
    }
    ds4_pool_free(pool);
    ds4_kvstore_close(st);
    /* One line, naming the engine's reason; the directory holds no .kv file. */
    char buf[1024] = "";
    rewind(log);
    size_t k = fread(buf, 1, sizeof buf - 1, log);
    buf[k] = 0;
    fclose(log);
    CHECK(strstr(buf, "64 tokens: refused by the engine: not a ds4 session snapshot") &&
          strchr(buf, '\n') == buf + k - 1, "log: %s", buf);
    st = open_store(dir, id);
    CHECK(st && ds4_kvstore_count(st) == 0);
    ds4_kvstore_close(st);
}

/* Decoding token by token with ds4_pool_step after each: checkpoints at
 * exactly the multiples of `every`, none in between, none without a store. */
static void test_step_frontiers(void) {
    REQUIRE(eng);
    char dir[256], id[65], err[256];
    snprintf(dir, sizeof dir, "%s/step", root);
    REQUIRE(ds4_kv_model_id(eng, id, err, sizeof err) == 0);
    static int32_t ids[300];
    rand_ids(ids, 300, 11);
    ds4_kvstore *st = open_store(dir, id);
    REQUIRE(st);
    /* every 100 rounds up to the alignment: 128. */
    ds4_pool_params pp = {.n_slots = 1, .ctx = 512, .store = st, .align = 64, .every = 100};
    ds4_pool *pool = ds4_pool_new(eng, &pp, err, sizeof err);
    REQUIRE(pool, "%s", err);
    ds4_pool_lease l;
    REQUIRE(ds4_pool_acquire(pool, ids, 10, &l, err, sizeof err) == 0);
    REQUIRE(ds4_session_eval(l.session, ids, 10, NULL, NULL, NULL, err, sizeof err) == 0);
    size_t counts[300] = {0};
    for (size_t i = 10; i < 300; i++) {
        REQUIRE(ds4_session_eval(l.session, ids + i, 1, NULL, NULL, NULL, err, sizeof err) == 0);
        ds4_pool_step(pool, &l);
        REQUIRE(ds4_pool_flush(pool, err, sizeof err) == 0, "%s", err);
        counts[i] = ds4_kvstore_count(st);
    }
    CHECK(counts[126] == 0 && counts[127] == 1 && counts[254] == 1 && counts[255] == 2 && counts[299] == 2,
          "%zu %zu %zu %zu %zu", counts[126], counts[127], counts[254], counts[255], counts[299]);
    ds4_kv_checkpoint cp;
    size_t tl = 0;
    char *text = ds4_kv_text(ds4_engine_tokenizer(eng), ids, 300, &tl);
    CHECK(ds4_kvstore_best_at_or_before(st, text, tl, ids, 300, 300, &cp) == 1 && cp.n_ids == 256);
    ds4_kv_checkpoint_free(&cp);
    free(text);
    ds4_pool_free(pool);
    ds4_kvstore_close(st);

    pp.store = NULL;
    pool = ds4_pool_new(eng, &pp, err, sizeof err);
    REQUIRE(pool);
    REQUIRE(ds4_pool_acquire(pool, ids, 128, &l, err, sizeof err) == 0);
    REQUIRE(ds4_session_eval(l.session, ids, 128, NULL, NULL, NULL, err, sizeof err) == 0);
    ds4_pool_step(pool, &l);     /* no store: nothing to do, no crash */
    CHECK(ds4_session_len(l.session) == 128);
    ds4_pool_free(pool);
}

static void test_interleaved_two_slots(void) {
    REQUIRE(eng);
    char dir[256], id[65], err[256];
    snprintf(dir, sizeof dir, "%s/interleave", root);
    REQUIRE(ds4_kv_model_id(eng, id, err, sizeof err) == 0);
    ds4_kvstore *st = open_store(dir, id);
    REQUIRE(st);
    ds4_pool_params pp = {.n_slots = 2, .ctx = 1024, .store = st, .align = 64, .every = 256,
                          .log = getenv("DS4_POOL_LOG") ? stderr : NULL};
    ds4_pool *pool = ds4_pool_new(eng, &pp, err, sizeof err);
    REQUIRE(pool, "%s", err);
    static int32_t conv[2][1024];
    size_t len[2] = {0, 0};
    rand_ids(conv[0], 1024, 11);
    rand_ids(conv[1], 1024, 22);
    ds4_pool_lease l;
    int bad = 0, side_slot_free_ok = 1;
    for (int turn = 0; turn < 3; turn++) {
        for (int x = 0; x < 2; x++) {
            size_t first = turn == 0 ? 90 : 30;
            size_t n = len[x] + first;
            size_t pre = serve(pool, conv[x], n, conv[x] + n, 11, &l);
            if (turn > 0 && pre != first) {
                bad++;
                fprintf(stderr, "  turn %d conv %d prefilled %zu of %zu\n", turn, x, pre, n);
            }
            len[x] = n + 10;
            int32_t side[40];
            rand_ids(side, 40, 1000u + (uint32_t)(turn * 2 + x));
            if (serve(pool, side, 40, side, 4, &l) == SIZE_MAX) bad++;
            /* Before conversation B exists, the side request takes the free slot. */
            if (turn == 0 && x == 0 && l.slot == 0) side_slot_free_ok = 0;
        }
    }
    CHECK(bad == 0, "%d main turns re-prefilled", bad);
    CHECK(side_slot_free_ok, "side request used the free slot");
    ds4_pool_free(pool);
    ds4_kvstore_close(st);
}

/* ---- the checkpoint writer ------------------------------------------------------ */

/* A gate the writer's on_write hook waits at until the test opens it. The
 * wait is bounded (10 s) only so that a broken pool fails the test instead
 * of hanging it; a passing run never reaches the bound. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool open, timed_out;
    int entered;                /* writes that reached the hook */
    size_t first_n;             /* tokens of the first one */
} gate;

static gate G0 = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false, false, 0, 0};

static void gate_hook(void *ud, size_t n) {
    gate *g = ud;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 10;
    pthread_mutex_lock(&g->mu);
    if (!g->entered++) g->first_n = n;
    pthread_cond_broadcast(&g->cv);
    while (!g->open && !g->timed_out)
        if (pthread_cond_timedwait(&g->cv, &g->mu, &until) == ETIMEDOUT) g->timed_out = true;
    pthread_mutex_unlock(&g->mu);
}

static void gate_open(gate *g) {
    pthread_mutex_lock(&g->mu);
    g->open = true;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static void gate_reset(gate *g) {
    pthread_mutex_lock(&g->mu);
    g->open = g->timed_out = false;
    g->entered = 0;
    g->first_n = 0;
    pthread_mutex_unlock(&g->mu);
}

/* Prefill with two save points (128 and 192) while the first write is held
 * at the gate: the prefill returns with the whole stable prompt evaluated and
 * nothing on disk yet; opening the gate and flushing writes both. */
static void test_prefill_does_not_wait(void) {
    REQUIRE(eng);
    char dir[256], id[65], err[256];
    snprintf(dir, sizeof dir, "%s/nowait", root);
    REQUIRE(ds4_kv_model_id(eng, id, err, sizeof err) == 0);
    static int32_t ids[200];
    rand_ids(ids, 200, 31);
    ds4_kvstore *st = open_store(dir, id);
    REQUIRE(st);
    gate_reset(&G0);
    ds4_pool_params pp = {.n_slots = 1, .ctx = 512, .store = st, .align = 64, .every = 128,
                          .on_write = gate_hook, .ud = &G0};
    ds4_pool *pool = ds4_pool_new(eng, &pp, err, sizeof err);
    REQUIRE(pool, "%s", err);
    ds4_pool_lease l;
    REQUIRE(ds4_pool_acquire(pool, ids, 200, &l, err, sizeof err) == 0, "%s", err);
    CHECK(ds4_pool_prefill(pool, &l, ids, 197, NULL, NULL, err, sizeof err) == 0, "%s", err);
    CHECK(ds4_session_len(l.session) == 192, "%zu", ds4_session_len(l.session));
    /* Still held: the prefill finished while the writer sat on checkpoint 128. */
    pthread_mutex_lock(&G0.mu);
    while (!G0.entered) pthread_cond_wait(&G0.cv, &G0.mu);
    bool held = !G0.open && !G0.timed_out && G0.first_n == 128;
    pthread_mutex_unlock(&G0.mu);
    CHECK(held, "first write of %zu tokens, timed out %d", G0.first_n, G0.timed_out);
    CHECK(ds4_kvstore_count(st) == 0, "%zu on disk while the write is held", ds4_kvstore_count(st));
    gate_open(&G0);
    CHECK(ds4_pool_flush(pool, err, sizeof err) == 0, "%s", err);
    CHECK(ds4_kvstore_count(st) == 2 && G0.entered == 2, "%zu on disk, %d writes", ds4_kvstore_count(st),
          G0.entered);
    ds4_pool_release(pool, &l, 200);
    ds4_pool_free(pool);
    ds4_kvstore_close(st);
}

/* The pool's log as a pipe the test reads while other threads run. */
static bool log_pipe(FILE **w, FILE **r) {
    int fds[2];
    if (pipe(fds)) return false;
    *w = fdopen(fds[1], "w");
    *r = fdopen(fds[0], "r");
    return *w && *r;
}

/* Reads log lines until one holding `want` (returns 1) or `early` (the
 * waiting thread's own "returned" line: 0, the wait did not happen). */
static int log_until(FILE *r, const char *want, const char *early) {
    char line[512];
    while (fgets(line, sizeof line, r)) {
        if (strstr(line, want)) return 1;
        if (strstr(line, early)) return 0;
    }
    return 0;
}

typedef struct {
    ds4_pool *pool;
    FILE *log;
    int rc;
    bool returned, gate_was_open;   /* under G0.mu */
} third_arg;

static void *third_handover(void *arg) {
    third_arg *a = arg;
    char err[256];
    a->rc = ds4_pool_checkpoint(a->pool, 0, err, sizeof err);
    pthread_mutex_lock(&G0.mu);
    a->returned = true;
    a->gate_was_open = G0.open;
    pthread_cond_broadcast(&G0.cv);
    pthread_mutex_unlock(&G0.mu);
    fputs("test: third hand-over returned\n", a->log);
    fflush(a->log);
    return NULL;
}

/* Backpressure: with the writer held on checkpoint 1 and checkpoint 2
 * queued, a third hand-over waits (its log line comes first, and it does
 * not return) until the writer takes checkpoint 2. Then all three reach
 * the disk, and freeing the pool with one still queued writes it too. */
static void test_backpressure(void) {
    REQUIRE(eng);
    char dir[256], id[65], err[256];
    snprintf(dir, sizeof dir, "%s/backpressure", root);
    REQUIRE(ds4_kv_model_id(eng, id, err, sizeof err) == 0);
    static int32_t ids[256];
    rand_ids(ids, 256, 41);
    ds4_kvstore *st = open_store(dir, id);
    REQUIRE(st);
    FILE *w = NULL, *r = NULL;
    REQUIRE(log_pipe(&w, &r));
    gate_reset(&G0);
    ds4_pool_params pp = {.n_slots = 1, .ctx = 512, .store = st, .align = 64, .on_write = gate_hook, .ud = &G0,
                          .log = w};
    ds4_pool *pool = ds4_pool_new(eng, &pp, err, sizeof err);
    REQUIRE(pool, "%s", err);
    ds4_session *s = ds4_pool_session(pool, 0);
    /* 1: taken by the writer, held at the gate. */
    REQUIRE(ds4_session_eval(s, ids, 64, NULL, NULL, NULL, err, sizeof err) == 0);
    CHECK(ds4_pool_checkpoint(pool, 0, err, sizeof err) == 0, "%s", err);
    pthread_mutex_lock(&G0.mu);
    while (!G0.entered) pthread_cond_wait(&G0.cv, &G0.mu);
    pthread_mutex_unlock(&G0.mu);
    /* 2: queued, returns at once. */
    REQUIRE(ds4_session_eval(s, ids + 64, 64, NULL, NULL, NULL, err, sizeof err) == 0);
    CHECK(ds4_pool_checkpoint(pool, 0, err, sizeof err) == 0, "%s", err);
    /* 3: from another thread, which must wait. */
    REQUIRE(ds4_session_eval(s, ids + 128, 64, NULL, NULL, NULL, err, sizeof err) == 0);
    third_arg a = {pool, w, -1, false, false};
    pthread_t t;
    REQUIRE(pthread_create(&t, NULL, third_handover, &a) == 0);
    CHECK(log_until(r, "checkpoint 192 tokens: waiting for the writer (128 tokens queued)", "third hand-over returned"),
          "the third hand-over did not wait for the writer to take the queued one");
    /* A correct pool cannot return while the gate is shut, whatever the
     * timing; the 100 ms only give a broken one the time to show it. */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += 100000000;
    if (until.tv_nsec >= 1000000000) { until.tv_sec++; until.tv_nsec -= 1000000000; }
    pthread_mutex_lock(&G0.mu);
    while (!a.returned && pthread_cond_timedwait(&G0.cv, &G0.mu, &until) != ETIMEDOUT) {}
    bool early = a.returned;
    pthread_mutex_unlock(&G0.mu);
    CHECK(!early, "the third hand-over returned while the writer was held");
    gate_open(&G0);
    pthread_join(t, NULL);
    CHECK(a.gate_was_open, "returned before the gate opened");
    CHECK(a.rc == 0);
    CHECK(ds4_pool_flush(pool, err, sizeof err) == 0, "%s", err);
    CHECK(ds4_kvstore_count(st) == 3 && G0.entered == 3 && !G0.timed_out, "%zu on disk, %d writes",
          ds4_kvstore_count(st), G0.entered);
    /* Freeing the pool writes what was handed over. */
    REQUIRE(ds4_session_eval(s, ids + 192, 64, NULL, NULL, NULL, err, sizeof err) == 0);
    CHECK(ds4_pool_checkpoint(pool, 0, err, sizeof err) == 0, "%s", err);
    ds4_pool_free(pool);
    CHECK(ds4_kvstore_count(st) == 4, "%zu on disk after free", ds4_kvstore_count(st));
    ds4_kvstore_close(st);
    fclose(w);
    fclose(r);
}

typedef struct {
    ds4_pool *pool;
    const int32_t *prompt;
    size_t n;
    FILE *log;
    ds4_pool_lease l;
    int rc;
} acquire_arg;

static void *acquire_thread(void *arg) {
    acquire_arg *a = arg;
    char err[256];
    a->rc = ds4_pool_acquire(a->pool, a->prompt, a->n, &a->l, err, sizeof err);
    fputs("test: acquire returned\n", a->log);
    fflush(a->log);
    return NULL;
}

/* A conversation spilled by a side request comes back while its spill is
 * still being written (held at the gate): acquire waits for the writer and
 * restores all 200 tokens, not the older 192-token checkpoint the index
 * already has. */
static void test_acquire_waits_for_pending_spill(void) {
    REQUIRE(eng);
    char dir[256], id[65], err[256];
    snprintf(dir, sizeof dir, "%s/pending", root);
    REQUIRE(ds4_kv_model_id(eng, id, err, sizeof err) == 0);
    static int32_t conv[250], side[50];
    rand_ids(conv, 250, 51);
    rand_ids(side, 50, 52);
    ds4_kvstore *st = open_store(dir, id);
    REQUIRE(st);
    FILE *w = NULL, *r = NULL;
    REQUIRE(log_pipe(&w, &r));
    gate_reset(&G0);
    gate_open(&G0);
    ds4_pool_params pp = {.n_slots = 1, .ctx = 512, .store = st, .align = 64, .every = 128, .on_write = gate_hook,
                          .ud = &G0, .log = w};
    ds4_pool *pool = ds4_pool_new(eng, &pp, err, sizeof err);
    REQUIRE(pool, "%s", err);
    ds4_pool_lease l;
    /* Checkpoints 128 and 192 on disk; the session holds 200. */
    CHECK(serve(pool, conv, 200, conv + 200, 1, &l) == 200);
    REQUIRE(ds4_pool_flush(pool, err, sizeof err) == 0, "%s", err);
    REQUIRE(ds4_kvstore_count(st) == 2);
    /* Shut the gate; a 50-token side request spills the 200 (held). */
    gate_reset(&G0);
    CHECK(serve(pool, side, 50, side, 1, &l) == 50 && l.spilled);
    acquire_arg a = {.pool = pool, .prompt = conv, .n = 250, .log = w, .rc = -1};
    pthread_t t;
    REQUIRE(pthread_create(&t, NULL, acquire_thread, &a) == 0);
    CHECK(log_until(r, "slot 0: a checkpoint still with the writer covers more of the prompt", "acquire returned"),
          "acquire did not wait for the checkpoint still with the writer");
    gate_open(&G0);
    pthread_join(t, NULL);
    free(a.l.extra);
    CHECK(a.rc == 0 && a.l.n_disk == 200 && a.l.n_memory == 0, "rc %d, disk %zu, memory %zu", a.rc, a.l.n_disk,
          a.l.n_memory);
    CHECK(!G0.timed_out);
    ds4_pool_release(pool, &a.l, 250);
    ds4_pool_free(pool);
    ds4_kvstore_close(st);
    fclose(w);
    fclose(r);
}

int main(void) {
    RUN(test_choose_scenarios);
    RUN(test_simulated_interleaving);
    RUN(test_sessions_for);
    snprintf(root, sizeof root, "/tmp/ds4_test_pool_%d", (int)getpid());
    mkdir(root, 0755);
    open_engine();
    RUN(test_model_id_and_text);
    RUN(test_engine_memory);
    RUN(test_restart_suffix_only);
    RUN(test_interleaved_two_slots);
    RUN(test_step_frontiers);
    RUN(test_refused_checkpoint_removed);
    RUN(test_prefill_does_not_wait);
    RUN(test_backpressure);
    RUN(test_acquire_waits_for_pending_spill);
    if (eng) ds4_engine_close(eng);
    if (tmp_model) test_tiny_remove(model_path);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", root);
    if (system(cmd)) fprintf(stderr, "cannot remove %s\n", root);
    TEST_END();
}
