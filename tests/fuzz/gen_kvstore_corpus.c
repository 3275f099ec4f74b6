/* Writes the seed corpus of fuzz_kvstore (tests/fuzz/corpus/kvstore/):
 * checkpoint files written by ds4_kvstore_save for fuzz_kvstore's model id,
 * each behind a flags byte of 0 (seal everything): one with a tool-call map
 * as its extra data, one of a single token with empty text and nothing
 * else, one with two map entries; plus a bare map blob for the decoder.
 * The seeds are committed; regenerate with
 *   make CUDA=0 build/libds4.a && cc -std=c11 -D_GNU_SOURCE -Isrc tests/fuzz/gen_kvstore_corpus.c \
 *     build/libds4.a -o /tmp/gen -lm -lpthread -lcjson -lutf8proc -lcrypto && /tmp/gen tests/fuzz/corpus/kvstore */
#include "ds4.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *out_dir;

static void write_seed(const char *name, const uint8_t *flag, const uint8_t *b, size_t n) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", out_dir, name);
    FILE *f = fopen(p, "wb");
    if (!f || (flag && fwrite(flag, 1, 1, f) != 1) || fwrite(b, 1, n, f) != n || fclose(f)) { perror(p); exit(1); }
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s DIR\n", argv[0]); return 2; }
    out_dir = argv[1];
    char tmp[] = "/tmp/ds4_gen_kv.XXXXXX", err[512];
    if (!mkdtemp(tmp)) { perror(tmp); return 1; }
    ds4_kvstore_params p = {.dir = tmp, .space_bytes = 1 << 20, .model_id = "fuzz-model"};
    ds4_kvstore *st = ds4_kvstore_open(&p, err, sizeof err);
    if (!st) { fprintf(stderr, "%s\n", err); return 1; }

    const char *k1[] = {"call_1"}, *v1[] = {"<｜DSML｜invoke name=\"f\">x</｜DSML｜invoke>"};
    const char *k2[] = {"a", "call_2"}, *v2[] = {"b", "<｜DSML｜invoke name=\"g\"></｜DSML｜invoke>"};
    uint8_t *m1, *m2, sess[64];
    size_t l1, l2;
    if (ds4_kv_map_encode(k1, v1, 1, &m1, &l1) || ds4_kv_map_encode(k2, v2, 2, &m2, &l2)) return 1;
    for (size_t i = 0; i < sizeof sess; i++) sess[i] = (uint8_t)(i * 37);
    static const int32_t ids[] = {1, 2, 3, 4, 5};
    ds4_kv_checkpoint cps[] = {
        {.text = "Hello", .text_len = 5, .ids = ids, .n_ids = 2, .session = sess, .session_len = 24,
         .extra = m1, .extra_len = l1},
        {.text = "", .text_len = 0, .ids = ids, .n_ids = 1},
        {.text = "The quick brown fox", .text_len = 19, .ids = ids, .n_ids = 5, .session = sess,
         .session_len = 64, .extra = m2, .extra_len = l2},
    };
    for (size_t i = 0; i < sizeof cps / sizeof *cps; i++)
        if (ds4_kvstore_save(st, &cps[i], err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
    ds4_kvstore_close(st);

    /* Each file behind a zero flags byte, named by its text length. */
    DIR *d = opendir(tmp);
    struct dirent *de;
    while (d && (de = readdir(d))) {
        char path[600];
        snprintf(path, sizeof path, "%s/%s", tmp, de->d_name);
        size_t len = strlen(de->d_name);
        if (len > 3 && !strcmp(de->d_name + len - 3, ".kv")) {
            FILE *f = fopen(path, "rb");
            static uint8_t buf[4096];
            size_t n = f ? fread(buf, 1, sizeof buf, f) : 0;
            if (f) fclose(f);
            uint64_t tl = 0;
            for (int i = 7; i >= 0; i--) tl = tl << 8 | buf[112 + i];
            char name[64];
            snprintf(name, sizeof name, "text%llu.kv", (unsigned long long)tl);
            write_seed(name, (const uint8_t[]){0}, buf, n);
        }
        unlink(path);
    }
    if (d) closedir(d);
    rmdir(tmp);
    write_seed("map2.blob", NULL, m2, l2);
    free(m1);
    free(m2);
    return 0;
}
