/* libFuzzer harness for disk KV checkpoints (src/engine/kvstore.c, format
 * in engine/kvstore.h) and the tool-call map blob they carry as their extra
 * data (ds4_kv_map_decode, what the server's toolmap_merge parses).
 *
 * Input: one flags byte, then the bytes of a checkpoint file. The file's
 * digests are SHA-256, which a fuzzer cannot forge, so the harness seals
 * the file as a writer would (model, key, token and body digests, extra
 * digest, header checksum, metadata check) except where a flag bit says
 * to leave that field as the input has it (each check then gets its
 * turn), writes it under its key's name (or a wrong one) in a scratch
 * directory, opens a store there, looks it up by its own text and ids and
 * reads its extras. Invariants, each an abort():
 *   - at most one checkpoint is indexed, and a lookup's result is exactly
 *     the file's body (ids, text, session, extra) at the header's lengths;
 *   - a file that is fully sealed, well-formed (magic, version, header
 *     size, lengths = file size, n_ids > 0) is indexed and loads;
 *   - the extra blob handed over (always, for such a file) is the file's
 *     tail; a map blob that decodes re-encodes to the same bytes. The map
 *     decoder also gets the raw input itself. */
#include "ds4.h"
#include "engine/kvstore.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MODEL_ID "fuzz-model"

enum {  /* flags: fields left as given */
    RAW_MODEL = 1, RAW_KEYS = 2, RAW_BODYSUM = 4, RAW_EXTRASUM = 8, RAW_HDRSUM = 16, RAW_META = 32,
    WRONG_NAME = 64,
};

static char dir[64];
static FILE *devnull;

static void cleanup(void) {
    char p[128];
    snprintf(p, sizeof p, "%s/.lock", dir);
    unlink(p);
    rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    snprintf(dir, sizeof dir, "/tmp/ds4_fuzz_kv.XXXXXX");
    if (!mkdtemp(dir) || !(devnull = fopen("/dev/null", "w"))) abort();
    atexit(cleanup);
    return 0;
}

static void sha(const void *p, size_t n, uint8_t out[32]) { EVP_Digest(p, n, out, NULL, EVP_sha256(), NULL); }
static uint64_t rd64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = v << 8 | p[i]; return v; }

/* ---- the map blob: decode, re-encode, compare -------------------------------- */

typedef struct { char **k, **v; size_t n; } pairs;

static void collect(void *ud, const char *key, const char *val) {
    pairs *p = ud;
    p->k = realloc(p->k, (p->n + 1) * sizeof *p->k);
    p->v = realloc(p->v, (p->n + 1) * sizeof *p->v);
    p->k[p->n] = strdup(key);
    p->v[p->n] = strdup(val);
    p->n++;
}

static void check_map(const uint8_t *b, size_t len) {
    pairs p = {0};
    if (ds4_kv_map_decode(b, len, collect, &p) == 0) {
        uint8_t *e;
        size_t elen;
        if (ds4_kv_map_encode((const char *const *)p.k, (const char *const *)p.v, p.n, &e, &elen) || elen != len ||
            memcmp(e, b, len))
            abort();
        free(e);
    } else if (p.n) {
        abort();   /* a malformed blob delivers nothing */
    }
    for (size_t i = 0; i < p.n; i++) { free(p.k[i]); free(p.v[i]); }
    free(p.k);
    free(p.v);
}

/* ---- the checkpoint file ------------------------------------------------------ */

typedef struct { const uint8_t *tail; size_t len; size_t calls; } extra_want;

static void got_extra(void *ud, const uint8_t *x, size_t len) {
    extra_want *w = ud;
    if (len != w->len || memcmp(x, w->tail, len)) abort();
    w->calls++;
    check_map(x, len);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    check_map(data, size);
    if (size < 1) return 0;
    unsigned flags = data[0];
    size_t n = size - 1;
    uint8_t *f = malloc(n ? n : 1);
    memcpy(f, data + 1, n);

    /* Seal what the header's lengths allow. */
    bool fits = false;
    uint64_t tl = 0, ni = 0, sl = 0, xl = 0;
    if (n >= KV_HEADER_BYTES) {
        const uint8_t *L = f + KV_OFF_LENS;
        tl = rd64(L); ni = rd64(L + 8); sl = rd64(L + 16); xl = rd64(L + 24);
        uint64_t body = n - KV_HEADER_BYTES;
        fits = ni <= body / 4 && tl <= body - ni * 4 && sl <= body - ni * 4 - tl && xl == body - ni * 4 - tl - sl;
        uint8_t d[32];
        if (!(flags & RAW_MODEL)) sha(MODEL_ID, strlen(MODEL_ID), f + KV_OFF_MODEL);
        if (fits && !(flags & RAW_KEYS)) {
            sha(f + KV_HEADER_BYTES + ni * 4, tl, f + KV_OFF_KEY);
            sha(f + KV_HEADER_BYTES, ni * 4, f + KV_OFF_TOKHASH);
        }
        if (!(flags & RAW_BODYSUM)) sha(f + KV_HEADER_BYTES, body, f + KV_OFF_BODYSUM);
        if (fits && !(flags & RAW_EXTRASUM)) {
            sha(f + n - xl, xl, d);
            memcpy(f + KV_OFF_EXTRASUM, d, KV_OFF_HDRSUM - KV_OFF_EXTRASUM);
        }
        if (!(flags & RAW_HDRSUM)) sha(f, KV_OFF_HDRSUM, f + KV_OFF_HDRSUM);
        if (!(flags & RAW_META)) {
            uint8_t b[48];
            memcpy(b, f + KV_OFF_KEY, 32);
            memcpy(b + 32, f + KV_OFF_META, 16);
            sha(b, sizeof b, d);
            memcpy(f + KV_OFF_META + 16, d, 8);
        }
    }

    char name[160], hexkey[65] = "";
    for (int i = 0; i < 32; i++) sprintf(hexkey + 2 * i, "%02x", n >= KV_HEADER_BYTES ? f[KV_OFF_KEY + i] : 0);
    if (flags & WRONG_NAME) hexkey[0] = hexkey[0] == 'a' ? 'b' : 'a';
    snprintf(name, sizeof name, "%s/%s.kv", dir, hexkey);
    FILE *w = fopen(name, "wb");
    if (!w || fwrite(f, 1, n, w) != n || fclose(w)) abort();

    char err[512];
    ds4_kvstore_params p = {.dir = dir, .space_bytes = 1ull << 40, .model_id = MODEL_ID, .log = devnull};
    ds4_kvstore *st = ds4_kvstore_open(&p, err, sizeof err);
    if (!st) { fprintf(stderr, "fuzz_kvstore: %s\n", err); abort(); }
    size_t count = ds4_kvstore_count(st);
    if (count > 1) abort();
    bool sealed = !(flags & (RAW_MODEL | RAW_KEYS | RAW_BODYSUM | RAW_EXTRASUM | RAW_HDRSUM | WRONG_NAME));
    bool well_formed = fits && ni > 0 && !memcmp(f, KV_MAGIC, 8) && rd64(f + KV_OFF_VERSION) ==
                       ((uint64_t)KV_HEADER_BYTES << 32 | KV_VERSION);
    if (sealed && well_formed && count != 1) abort();

    if (fits) {
        const int32_t *ids = (const int32_t *)(f + KV_HEADER_BYTES);   /* malloc'd: 4-aligned */
        const char *text = (const char *)f + KV_HEADER_BYTES + ni * 4;
        size_t probe = ds4_kvstore_probe(st, text, tl, ids, ni, SIZE_MAX);
        extra_want xw = {f + n - xl, xl, 0};
        size_t given = ds4_kvstore_extras(st, SIZE_MAX, got_extra, &xw);
        if (given != xw.calls || given > count || (sealed && well_formed && xl && given != 1)) abort();
        ds4_kv_checkpoint cp;
        int found = ds4_kvstore_lookup(st, text, tl, ids, ni, &cp);
        if (found) {
            if (!count || probe != ni || cp.n_ids != ni || cp.text_len != tl || cp.session_len != sl ||
                cp.extra_len != xl || memcmp(cp.ids, ids, ni * 4) || memcmp(cp.text, text, tl) ||
                memcmp(cp.session, text + tl, sl) || memcmp(cp.extra, text + tl + sl, xl))
                abort();
            ds4_kv_checkpoint_free(&cp);
        } else if (sealed && well_formed) {
            abort();
        }
    }
    ds4_kvstore_close(st);
    unlink(name);
    free(f);
    return 0;
}
