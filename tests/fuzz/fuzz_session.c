/* libFuzzer harness for session snapshots (ds4_session_load): a snapshot
 * comes from disk or from a client and may be corrupt or hostile.
 *
 * The engine is the tiny model on the CPU backend: $DS4_TINY (tests/run.sh
 * exports it), else one generated here with build/bin/ds4-synth (run from
 * the repository root, as tests/fuzz.sh does). One session of FUZZ_CTX
 * tokens holds a base state (BASE_TOKENS evaluated), saved once as `base`.
 *
 * Each input is loaded twice: as given (almost always refused by the
 * trailing checksum) and resealed, its last 8 bytes replaced by the right
 * checksum, so the fuzzer reaches every check behind it. Invariants, each
 * an abort():
 *   refused  -> -1 with a one-line message, and the session unchanged (its
 *               save still gives `base` byte for byte);
 *   accepted -> 0, the session holds the snapshot's tokens, and saving it
 *               gives back exactly the loaded bytes (every count, row and
 *               float went where the format says); `base` is then reloaded. */
#include "ds4.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FUZZ_CTX 64
#define BASE_TOKENS 3

static ds4_engine *eng;
static ds4_session *sess;
static uint8_t *base;
static size_t base_len;

static void die(const char *what, const char *err) {
    fprintf(stderr, "fuzz_session: %s: %s\n", what, err);
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    char err[512], path[256];
    const char *env = getenv("DS4_TINY");
    bool made = false;
    if (env && !access(env, R_OK)) {
        snprintf(path, sizeof path, "%s", env);
    } else {
        snprintf(path, sizeof path, "/tmp/ds4_fuzz_session_%d.gguf", (int)getpid());
        char cmd[512];
        snprintf(cmd, sizeof cmd, "build/bin/ds4-synth --preset tiny --seed 1 -o %s >/dev/null", path);
        if (system(cmd) != 0) die("cannot generate the tiny model", cmd);
        made = true;
    }
    ds4_engine_params p = {.model_path = path, .backend = DS4_BACKEND_CPU, .n_threads = 1};
    eng = ds4_engine_open(&p, err, sizeof err);
    if (made) unlink(path);   /* mapped: the engine keeps its pages */
    if (!eng) die("engine", err);
    if (!(sess = ds4_session_new(eng, FUZZ_CTX, err, sizeof err))) die("session", err);
    const int32_t ids[BASE_TOKENS] = {1, 2, 3};
    if (ds4_session_eval(sess, ids, BASE_TOKENS, NULL, NULL, NULL, err, sizeof err)) die("eval", err);
    if (ds4_session_save(sess, &base, &base_len)) die("save", "base state");
    return 0;
}

/* The trailer: FNV-1a 64 over little-endian 8-byte words, then the tail
 * bytes one by one (src/engine/session.c). */
static void reseal(uint8_t *b, size_t len) {
    uint64_t h = 0xcbf29ce484222325ull, w;
    size_t i = 0, n = len - 8;
    for (; i + 8 <= n; i += 8) { memcpy(&w, b + i, 8); h = (h ^ w) * 0x100000001b3ull; }
    for (; i < n; i++) { h ^= b[i]; h *= 0x100000001b3ull; }
    memcpy(b + n, &h, 8);
}

static bool saves_as(const uint8_t *want, size_t n) {
    uint8_t *buf;
    size_t len;
    if (ds4_session_save(sess, &buf, &len)) abort();
    bool same = len == n && !memcmp(buf, want, n);
    free(buf);
    return same;
}

static void load_one(const uint8_t *data, size_t size) {
    char err[512] = "";
    int rc = ds4_session_load(sess, data, size, err, sizeof err);
    if (rc == -1) {
        if (!err[0] || strchr(err, '\n') || !saves_as(base, base_len)) abort();
        return;
    }
    if (rc != 0) abort();
    uint32_t n;
    memcpy(&n, data + 40, 4);   /* u32 n_tokens after magic, version, fingerprint, 5 dims */
    if (ds4_session_len(sess) != n || !saves_as(data, size)) abort();
    /* And it goes on: one more token evaluates (the loaded rows are what the
     * next position reads; NaNs in them are values, not errors). An eval
     * takes ~0.4 s under ASan at -O1, ~1000 loads, so only inputs whose
     * checksum (a hash of them) has 12 high zero bits get one: deterministic,
     * 1 in 4096, which keeps the harness at thousands of inputs a second.
     * High bits: a product's low bits depend only on the factors' low bits,
     * so the low bits of this hash ignore most of the input. */
    const int32_t next = 7;
    if (n < FUZZ_CTX && data[size - 1] == 0 && (data[size - 2] & 0xf0) == 0 && ds4_session_eval(sess, &next, 1, NULL, NULL, NULL, err, sizeof err))
        die("eval after a load", err);
    if (ds4_session_load(sess, base, base_len, err, sizeof err)) die("reloading the base state", err);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    load_one(data, size);
    if (size < 16) return 0;
    uint8_t *b = malloc(size);
    memcpy(b, data, size);
    reseal(b, size);
    if (memcmp(b, data, size)) load_one(b, size);
    free(b);
    return 0;
}
