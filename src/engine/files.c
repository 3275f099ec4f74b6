/* GGUF-level entry points that need no backend: --inspect and the tokenizer
 * of a model file (for --dump-tokens). */
#include <stdio.h>

#include "ds4.h"
#include "gguf/gguf.h"
#include "model/model.h"

int ds4_inspect_file(const char *path, uint64_t ctx, FILE *out, char *err, size_t errlen)
{
    ds4_model m;
    if (ds4_model_load(&m, path, err, errlen)) return -1;
    ds4_model_inspect(&m, ctx, out);
    ds4_model_free(&m);
    return 0;
}

ds4_tokenizer *ds4_tokenizer_open(const char *path, char *err, size_t errlen)
{
    gguf_file *f = gguf_open(path, err, errlen);
    if (!f) return NULL;
    /* The tokenizer copies what it needs, so the mapping can go. */
    ds4_tokenizer *t = ds4_tokenizer_from_gguf(f, err, errlen);
    gguf_close(f);
    return t;
}
