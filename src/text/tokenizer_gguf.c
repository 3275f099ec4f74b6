/* Tokenizer from GGUF metadata (prompt.md §1.1): tokenizer.ggml.tokens,
 * tokenizer.ggml.merges and, when present, tokenizer.ggml.token_type (3
 * control and 4 user-defined are the special/added tokens). Kept apart from
 * tokenizer.c so programs that never open a GGUF do not link the reader. */
#include "gguf/gguf.h"
#include "text/tokenizer_internal.h"

#include <stdlib.h>

/* Pointers and lengths of a string array, straight into the mapping. */
static int str_array(const gguf_file *f, const char *key, uint64_t max, const char ***s, uint64_t **lens,
                     uint32_t *n, char *err, size_t errlen) {
    int64_t k = gguf_find_key(f, key);
    if (k < 0 || gguf_kv_type(f, k) != GGUF_ARRAY || gguf_arr_type(f, k) != GGUF_STRING) {
        snprintf(err, errlen, "%s: %s is missing or not an array of strings", gguf_path(f), key);
        return -1;
    }
    uint64_t len = gguf_arr_len(f, k);
    if (len > max) {
        snprintf(err, errlen, "%s: %s has %llu entries (at most %llu)", gguf_path(f), key, (unsigned long long)len,
                 (unsigned long long)max);
        return -1;
    }
    *s = malloc((len ? len : 1) * sizeof **s);
    *lens = malloc((len ? len : 1) * sizeof **lens);
    if (!*s || !*lens) { snprintf(err, errlen, "%s: out of memory", gguf_path(f)); return -1; }
    for (uint64_t i = 0; i < len; i++) {
        gguf_str v;
        if (!gguf_arr_get_str(f, k, i, &v)) {
            snprintf(err, errlen, "%s: %s[%llu] is unreadable", gguf_path(f), key, (unsigned long long)i);
            return -1;
        }
        (*s)[i] = v.ptr;
        (*lens)[i] = v.len;
    }
    *n = (uint32_t)len;
    return 0;
}

ds4_tokenizer *ds4_tokenizer_from_gguf(const struct gguf_file *f, char *err, size_t errlen) {
    const char **tok = NULL, **mer = NULL;
    uint64_t *tok_len = NULL, *mer_len = NULL;
    uint8_t *special = NULL;
    uint32_t n_tok = 0, n_mer = 0;
    ds4_tokenizer *t = NULL;
    if (str_array(f, "tokenizer.ggml.tokens", 1u << 24, &tok, &tok_len, &n_tok, err, errlen) ||
        str_array(f, "tokenizer.ggml.merges", 1u << 24, &mer, &mer_len, &n_mer, err, errlen))
        goto done;
    special = calloc(n_tok ? n_tok : 1, 1);
    if (!special) { snprintf(err, errlen, "%s: out of memory", gguf_path(f)); goto done; }
    int64_t k = gguf_find_key(f, "tokenizer.ggml.token_type");
    if (k >= 0) {
        if (gguf_kv_type(f, k) != GGUF_ARRAY || gguf_arr_len(f, k) != n_tok) {
            snprintf(err, errlen, "%s: tokenizer.ggml.token_type is not an array of %u entries", gguf_path(f), n_tok);
            goto done;
        }
        for (uint32_t i = 0; i < n_tok; i++) {
            int64_t ty;
            if (!gguf_arr_get_i64(f, k, i, &ty)) {
                snprintf(err, errlen, "%s: tokenizer.ggml.token_type[%u] is not an integer", gguf_path(f), i);
                goto done;
            }
            special[i] = ty == 3 || ty == 4;
        }
        t = tok_build(tok, tok_len, n_tok, mer, mer_len, n_mer, special, err, errlen);
    } else {
        /* No types: the spelling rule of ds4_tokenizer_new. */
        t = ds4_tokenizer_new(tok, tok_len, n_tok, mer, mer_len, n_mer, err, errlen);
    }
done:
    free(tok); free(tok_len); free(mer); free(mer_len); free(special);
    return t;
}
