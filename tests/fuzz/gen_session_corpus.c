/* Writes the seed corpus of fuzz_session (tests/fuzz/corpus/session/):
 * snapshots of the tiny model (seed 1, whose fingerprint fuzz_session's
 * engine has) after 0, 1 and 5 tokens: an empty state without logits, one
 * token (raw rows and compressor inputs only), and one past the first
 * ratio-4 block (compressed attention and indexer rows too). The 1-token
 * one gets the low bits of its first logit adjusted until its checksum's top
 * 12 bits are zero: fuzz_session then also evaluates a token after loading
 * it, so every run exercises that once. The seeds are committed; regenerate
 * with
 *   make CUDA=0 build/libds4.a && cc -std=c11 -D_GNU_SOURCE -Isrc tests/fuzz/gen_session_corpus.c \
 *     build/libds4.a -o /tmp/gen -lm -lpthread -lcjson -lutf8proc -lcrypto \
 *     && /tmp/gen TINY.gguf tests/fuzz/corpus/session */
#include "ds4.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The snapshot trailer (src/engine/session.c): FNV-1a 64 over 8-byte words. */
static uint64_t checksum(const uint8_t *b, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull, w;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) { memcpy(&w, b + i, 8); h = (h ^ w) * 0x100000001b3ull; }
    for (; i < n; i++) { h ^= b[i]; h *= 0x100000001b3ull; }
    return h;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s TINY.gguf DIR\n", argv[0]); return 2; }
    char err[512];
    ds4_engine_params p = {.model_path = argv[1], .backend = DS4_BACKEND_CPU, .n_threads = 1};
    ds4_engine *e = ds4_engine_open(&p, err, sizeof err);
    if (!e) { fprintf(stderr, "%s\n", err); return 1; }
    static const int32_t ids[] = {17, 300, 4000, 5, 77};
    static const size_t lens[] = {0, 1, 5};
    for (size_t k = 0; k < sizeof lens / sizeof *lens; k++) {
        ds4_session *s = ds4_session_new(e, 64, err, sizeof err);
        uint8_t *buf;
        size_t len;
        if (!s || ds4_session_eval(s, ids, lens[k], NULL, NULL, NULL, err, sizeof err) ||
            ds4_session_save(s, &buf, &len)) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        /* Bytes 52, 53: the low half of logit 0 (after the 48-byte header and one id). */
        for (uint32_t v = 0; lens[k] == 1 && v < 65536; v++) {
            buf[52] = (uint8_t)v;
            buf[53] = (uint8_t)(v >> 8);
            uint64_t h = checksum(buf, len - 8);
            memcpy(buf + len - 8, &h, 8);
            if (h >> 52 == 0) break;
        }
        char path[512];
        snprintf(path, sizeof path, "%s/tokens%zu.snap", argv[2], lens[k]);
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(buf, 1, len, f) != len || fclose(f)) { perror(path); return 1; }
        printf("%s: %zu bytes\n", path, len);
        free(buf);
        ds4_session_free(s);
    }
    ds4_engine_close(e);
    return 0;
}
