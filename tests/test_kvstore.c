/* Disk KV checkpoints (no model needed: session blobs are opaque bytes here):
 * longest-prefix lookup, rewind bound, persistence across reopen, budget
 * eviction order, the corruption suite (every byte flipped, truncations,
 * other version / model, foreign and temp files), concurrent writer and
 * reader processes, extras read at startup by their own digest, and the
 * pure helpers (save points, value). */
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <dirent.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "ds4.h"
#include "engine/kvstore.h"
#include "test.h"

static char root[128];
static int dir_seq;
static FILE *logf;          /* the store's log, read back by the tests */

/* A fresh empty directory per test. */
static void new_dir(char *out, size_t cap) {
    snprintf(out, cap, "%.128s/d%d", root, dir_seq++);
    mkdir(out, 0755);
}

static ds4_kvstore *open_store(const char *dir, uint64_t space, const char *model) {
    char err[256] = "";
    rewind(logf);
    if (ftruncate(fileno(logf), 0)) return NULL;
    ds4_kvstore_params p = {.dir = dir, .space_bytes = space, .model_id = model, .log = logf};
    ds4_kvstore *st = ds4_kvstore_open(&p, err, sizeof err);
    if (!st) fprintf(stderr, "open: %s\n", err);
    return st;
}

/* What the store logged since open_store (or the last call). */
static char logbuf[8192];
static const char *logged(void) {
    fflush(logf);
    long n = ftell(logf);
    rewind(logf);
    size_t k = fread(logbuf, 1, n > 0 && (size_t)n < sizeof logbuf ? (size_t)n : sizeof logbuf - 1, logf);
    logbuf[k] = 0;
    return logbuf;
}

/* A synthetic checkpoint: `n` tokens whose text is the decimal ids joined
 * by spaces ("7 8 9 "), and a session blob of `blob` bytes derived from seed. */
typedef struct {
    int32_t ids[4096];
    char text[32768];
    uint8_t *sess;
    uint8_t extra[16];
    ds4_kv_checkpoint cp;
} fixture;

static void make_cp(fixture *f, const int32_t *ids, size_t n, size_t blob, uint8_t seed) {
    size_t len = 0;
    for (size_t i = 0; i < n; i++) {
        f->ids[i] = ids[i];
        len += (size_t)snprintf(f->text + len, sizeof f->text - len, "%d ", ids[i]);
    }
    free(f->sess);
    f->sess = malloc(blob);
    for (size_t i = 0; i < blob; i++) f->sess[i] = (uint8_t)(seed + i * 7);
    memset(f->extra, seed, sizeof f->extra);
    f->cp = (ds4_kv_checkpoint){.text = f->text, .text_len = len, .ids = f->ids, .n_ids = n, .session = f->sess,
                                .session_len = blob, .extra = f->extra, .extra_len = sizeof f->extra};
}

/* Conversation token stream: ids 0..n-1 shifted by `conv`. */
static int32_t conv_ids[4096];
static const int32_t *conv(int c) {
    for (int i = 0; i < 4096; i++) conv_ids[i] = c * 10000 + i;
    return conv_ids;
}

static char *path_of(const char *dir, const ds4_kv_checkpoint *cp) {
    static char p[512];
    uint8_t k[32];
    EVP_Digest(cp->text, cp->text_len, k, NULL, EVP_sha256(), NULL);
    int n = snprintf(p, sizeof p, "%s/", dir);
    for (int i = 0; i < 32; i++) n += snprintf(p + n, sizeof p - (size_t)n, "%02x", k[i]);
    snprintf(p + n, sizeof p - (size_t)n, ".kv");
    return p;
}

static size_t dir_bytes(const char *dir, int *n_files) {
    DIR *d = opendir(dir);
    size_t total = 0;
    *n_files = 0;
    struct dirent *de;
    char p[512];
    while (d && (de = readdir(d))) {
        if (de->d_name[0] == '.' && (!de->d_name[1] || de->d_name[1] == '.')) continue;
        if (!strcmp(de->d_name, ".lock")) continue;   /* the store's lock, not a checkpoint */
        struct stat sb;
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        if (!stat(p, &sb)) { total += (size_t)sb.st_size; (*n_files)++; }
    }
    if (d) closedir(d);
    return total;
}

static bool file_exists(const char *p) { return access(p, F_OK) == 0; }

/* ---- lookup ----------------------------------------------------------------- */

static void test_round_trip_longest_prefix(void) {
    char dir[256];
    new_dir(dir, sizeof dir);
    ds4_kvstore *st = open_store(dir, 1 << 20, "model-A");
    REQUIRE(st);
    static fixture f;
    char err[256];
    const size_t lens[] = {10, 40, 25};   /* three prefixes of one conversation */
    for (int i = 0; i < 3; i++) {
        make_cp(&f, conv(1), lens[i], 100 + lens[i], (uint8_t)lens[i]);
        CHECK(ds4_kvstore_save(st, &f.cp, err, sizeof err) == 0, "%s", err);
    }
    make_cp(&f, conv(2), 30, 64, 2);       /* another conversation */
    CHECK(ds4_kvstore_save(st, &f.cp, err, sizeof err) == 0, "%s", err);
    CHECK(ds4_kvstore_count(st) == 4);

    /* A prompt extending the 40-token prefix: the 40 one, every byte back. */
    static fixture q;
    make_cp(&q, conv(1), 60, 1, 0);
    ds4_kv_checkpoint out;
    REQUIRE(ds4_kvstore_lookup(st, q.text, q.cp.text_len, q.ids, 60, &out) == 1);
    CHECK(out.n_ids == 40 && !memcmp(out.ids, conv(1), 40 * 4));
    CHECK(out.text_len == 40 * 6 && !memcmp(out.text, q.text, out.text_len));
    CHECK(out.session_len == 140 && out.session[0] == 40 && out.session[139] == (uint8_t)(40 + 139 * 7));
    CHECK(out.extra_len == 16 && out.extra[15] == 40);
    CHECK(((uintptr_t)out.ids & 3) == 0, "ids aligned");
    ds4_kv_checkpoint_free(&out);
    CHECK(ds4_kvstore_probe(st, q.text, q.cp.text_len, q.ids, 60, SIZE_MAX) == 40);

    /* Rewind: at or before 30 tokens -> the 25 one; before 9 -> nothing. */
    REQUIRE(ds4_kvstore_best_at_or_before(st, q.text, q.cp.text_len, q.ids, 60, 30, &out) == 1);
    CHECK(out.n_ids == 25);
    ds4_kv_checkpoint_free(&out);
    CHECK(ds4_kvstore_best_at_or_before(st, q.text, q.cp.text_len, q.ids, 60, 9, &out) == 0 && !out.mem_);

    /* The text matches but the ids differ from token 30 on (another
     * tokenization of the same bytes): only the 25 one is a token prefix. */
    int32_t ids2[60];
    memcpy(ids2, q.ids, sizeof ids2);
    ids2[30] = -5;
    REQUIRE(ds4_kvstore_lookup(st, q.text, q.cp.text_len, ids2, 60, &out) == 1);
    CHECK(out.n_ids == 25);
    ds4_kv_checkpoint_free(&out);
    /* Without ids only the text decides. */
    REQUIRE(ds4_kvstore_lookup(st, q.text, q.cp.text_len, NULL, 0, &out) == 1);
    CHECK(out.n_ids == 40);
    ds4_kv_checkpoint_free(&out);

    /* A prompt diverging inside the 10-token prefix: nothing. Exact text of
     * the 10-token one: itself. */
    make_cp(&q, conv(3), 50, 1, 0);
    CHECK(ds4_kvstore_lookup(st, q.text, q.cp.text_len, q.ids, 50, &out) == 0);
    make_cp(&q, conv(1), 10, 1, 0);
    CHECK(ds4_kvstore_contains(st, q.text, q.cp.text_len));
    REQUIRE(ds4_kvstore_lookup(st, q.text, q.cp.text_len, q.ids, 10, &out) == 1);
    CHECK(out.n_ids == 10);
    ds4_kv_checkpoint_free(&out);
    uint64_t bytes = ds4_kvstore_bytes(st);
    int nf;
    CHECK(bytes == dir_bytes(dir, &nf) && nf == 4, "index bytes %llu", (unsigned long long)bytes);
    ds4_kvstore_close(st);

    /* Persisted: a new store on the directory finds the same, and the hit
     * counters survived (the 40 one was hit twice, the 10 one once). */
    st = open_store(dir, 1 << 20, "model-A");
    REQUIRE(st);
    CHECK(ds4_kvstore_count(st) == 4 && ds4_kvstore_bytes(st) == bytes);
    CHECK(logged()[0] == 0, "clean directory logs nothing: %s", logbuf);
    make_cp(&q, conv(2), 31, 1, 0);
    REQUIRE(ds4_kvstore_lookup(st, q.text, q.cp.text_len, q.ids, 31, &out) == 1);
    CHECK(out.n_ids == 30 && out.session_len == 64 && out.session[1] == 2 + 7);
    ds4_kv_checkpoint_free(&out);
    FILE *fp = fopen(path_of(dir, &f.cp), "rb");   /* f holds conv 2's checkpoint */
    uint8_t h[KV_HEADER_BYTES];
    REQUIRE(fp && fread(h, 1, sizeof h, fp) == sizeof h);
    fclose(fp);
    uint64_t hits = 0;
    memcpy(&hits, h + KV_OFF_META + 8, 8);
    CHECK(hits == 1, "hits persisted in place: %llu", (unsigned long long)hits);
    ds4_kvstore_close(st);
}

static void test_replace_same_text(void) {
    char dir[256];
    new_dir(dir, sizeof dir);
    ds4_kvstore *st = open_store(dir, 1 << 20, "m");
    REQUIRE(st);
    static fixture f;
    char err[256];
    make_cp(&f, conv(1), 20, 100, 1);
    CHECK(ds4_kvstore_save(st, &f.cp, err, sizeof err) == 0);
    make_cp(&f, conv(1), 20, 300, 9);
    CHECK(ds4_kvstore_save(st, &f.cp, err, sizeof err) == 0);
    CHECK(ds4_kvstore_count(st) == 1);
    ds4_kv_checkpoint out;
    REQUIRE(ds4_kvstore_lookup(st, f.text, f.cp.text_len, f.ids, 20, &out) == 1);
    CHECK(out.session_len == 300 && out.session[0] == 9);
    ds4_kv_checkpoint_free(&out);
    int nf;
    CHECK(dir_bytes(dir, &nf) == ds4_kvstore_bytes(st) && nf == 1);
    /* Refused input. */
    ds4_kv_checkpoint bad = {.text = "x", .text_len = 1};
    CHECK(ds4_kvstore_save(st, &bad, err, sizeof err) == -1 && err[0]);
    ds4_kvstore_close(st);
}

/* ---- eviction ---------------------------------------------------------------- */

static void test_budget_eviction(void) {
    char dir[256];
    new_dir(dir, sizeof dir);
    /* Blobs of 8 bytes per token: the long agent prefix (2000 tokens) is
     * ~25 KB, side prompts (100 tokens) ~1.5 KB; the budget holds the long
     * one plus a handful of side prompts. */
    const uint64_t space = 50000;
    ds4_kvstore *st = open_store(dir, space, "m");
    REQUIRE(st);
    static fixture f, q;
    char err[256];
    make_cp(&f, conv(0), 2000, 2000 * 8, 1);
    REQUIRE(ds4_kvstore_save(st, &f.cp, err, sizeof err) == 0, "%s", err);
    char *long_path = strdup(path_of(dir, &f.cp));
    for (int c = 1; c <= 30; c++) {
        make_cp(&q, conv(c), 100, 100 * 8, (uint8_t)c);
        CHECK(ds4_kvstore_save(st, &q.cp, err, sizeof err) == 0, "side %d: %s", c, err);
        CHECK(ds4_kvstore_bytes(st) <= space);
        int nf;
        CHECK(dir_bytes(dir, &nf) <= space && (size_t)nf == ds4_kvstore_count(st));
    }
    CHECK(file_exists(long_path), "long agent prefix kept");
    /* The newest side prompts are kept, the oldest went first. */
    make_cp(&q, conv(30), 100, 1, 0);
    CHECK(ds4_kvstore_contains(st, q.text, q.cp.text_len));
    make_cp(&q, conv(1), 100, 1, 0);
    CHECK(!ds4_kvstore_contains(st, q.text, q.cp.text_len));
    size_t sides = ds4_kvstore_count(st) - 1;
    CHECK(sides >= 5 && sides <= 10, "%zu side prompts kept", sides);

    /* Bigger than the whole budget: refused by policy. */
    make_cp(&q, conv(40), 100, (size_t)space, 1);
    CHECK(ds4_kvstore_save(st, &q.cp, err, sizeof err) == 1 && strstr(err, "budget"));
    /* A mid-size prompt that would need the long prefix gone: refused, the
     * long prefix stays (it is worth more). */
    make_cp(&q, conv(41), 1000, 20000, 1);
    CHECK(ds4_kvstore_save(st, &q.cp, err, sizeof err) == 1 && strstr(err, "worth more"), "%s", err);
    CHECK(file_exists(long_path));
    free(long_path);
    ds4_kvstore_close(st);

    /* A smaller budget at reopen trims at once, lowest value first. */
    st = open_store(dir, 36000, "m");
    REQUIRE(st);
    CHECK(ds4_kvstore_bytes(st) <= 36000 && ds4_kvstore_count(st) == 2, "%zu", ds4_kvstore_count(st));
    CHECK(ds4_kvstore_contains(st, f.text, f.cp.text_len));
    CHECK(strstr(logged(), "trimmed"), "%s", logbuf);
    int nf;
    CHECK(dir_bytes(dir, &nf) == ds4_kvstore_bytes(st));
    ds4_kvstore_close(st);
}

static void test_value(void) {
    CHECK(ds4_kv_value(1000, 0, 0) == 1000);
    CHECK(ds4_kv_value(1000, 1, 0) == 2000);
    CHECK(ds4_kv_value(1000, 0, 3600) == 500);
    CHECK(ds4_kv_value(1000, 0, -5) == 1000);
    /* A long agent prefix idle for a day beats a fresh short side prompt. */
    CHECK(ds4_kv_value(30000, 0, 86400) > ds4_kv_value(500, 0, 0));
}

/* ---- corruption -------------------------------------------------------------- */

/* One valid checkpoint (and a shorter valid one of the same conversation)
 * in a fresh dir; returns the longer one's path. */
static fixture cf, cf_short;
static char *setup_pair(char *dir, size_t cap) {
    new_dir(dir, cap);
    ds4_kvstore *st = open_store(dir, 1 << 20, "m");
    if (!st) return NULL;
    char err[256];
    make_cp(&cf_short, conv(7), 20, 50, 3);
    make_cp(&cf, conv(7), 40, 300, 5);
    int rc = ds4_kvstore_save(st, &cf_short.cp, err, sizeof err) | ds4_kvstore_save(st, &cf.cp, err, sizeof err);
    ds4_kvstore_close(st);
    return rc ? NULL : strdup(path_of(dir, &cf.cp));
}

static bool patch(const char *path, long off, uint8_t xor_mask) {
    FILE *fp = fopen(path, "r+b");
    if (!fp) return false;
    int c = (fseek(fp, off, SEEK_SET), fgetc(fp));
    bool ok = c != EOF && fseek(fp, off, SEEK_SET) == 0 && fputc(c ^ xor_mask, fp) != EOF;
    fclose(fp);
    return ok;
}

/* After damage, a new store must never return the long checkpoint: the
 * lookup falls back to the short one. Returns which n_ids it got. */
static size_t lookup_after(const char *dir) {
    ds4_kvstore *st = open_store(dir, 1 << 20, "m");
    if (!st) return 999;
    ds4_kv_checkpoint out;
    size_t got = 0;
    if (ds4_kvstore_lookup(st, cf.text, cf.cp.text_len, cf.ids, 40, &out) == 1) {
        got = out.n_ids;
        if (out.n_ids == 40 && (out.session_len != 300 || memcmp(out.session, cf.sess, 300))) got = 998;
        ds4_kv_checkpoint_free(&out);
    }
    ds4_kvstore_close(st);
    return got;
}

/* Every byte of the file flipped in turn (the file rewritten from memory
 * each time): the long checkpoint is never served damaged. */
static void test_flip_every_byte(void) {
    char dir[256];
    char *path = setup_pair(dir, sizeof dir);
    REQUIRE(path);
    FILE *fp = fopen(path, "rb");
    REQUIRE(fp);
    static uint8_t good[4096], bad[4096];
    size_t n = fread(good, 1, sizeof good, fp);
    fclose(fp);
    REQUIRE(n > KV_HEADER_BYTES && n < sizeof good);
    int misbehaved = 0;
    for (size_t off = 0; off < n; off++) {
        memcpy(bad, good, n);
        bad[off] ^= 0x10;
        fp = fopen(path, "wb");
        REQUIRE(fp && fwrite(bad, 1, n, fp) == n);
        fclose(fp);
        size_t got = lookup_after(dir);
        /* The mutable counters are outside the checksums: a damaged block
         * resets them and the checkpoint stays valid. Anything else: the
         * long checkpoint is refused (logged), the short one still serves. */
        bool meta = off >= KV_OFF_META && off < KV_HEADER_BYTES;
        if (meta ? got != 40 : got != 20) {
            misbehaved++;
            fprintf(stderr, "  byte %zu flipped: lookup gave %zu\n", off, got);
        } else if (!meta && !strstr(logged(), "ds4: kv-cache:")) {
            misbehaved++;
            fprintf(stderr, "  byte %zu flipped: nothing logged\n", off);
        }
    }
    CHECK(misbehaved == 0, "%d of %zu positions misbehaved", misbehaved, n);
    free(path);
}

/* A body flip is caught at load and the file removed. */
static void test_flip_body_removes(void) {
    char dir[256];
    char *path = setup_pair(dir, sizeof dir);
    REQUIRE(path);
    REQUIRE(patch(path, KV_HEADER_BYTES + 200, 0x01));
    CHECK(lookup_after(dir) == 20);
    CHECK(strstr(logged(), "body checksum mismatch"), "%s", logbuf);
    CHECK(!file_exists(path), "corrupt file removed");
    free(path);
}

static void test_truncation(void) {
    const long at[] = {0, 1, 100, 255, 256, 300, 600, -1};
    for (size_t i = 0; i < sizeof at / sizeof at[0]; i++) {
        char dir[256];
        char *path = setup_pair(dir, sizeof dir);
        REQUIRE(path);
        struct stat sb;
        REQUIRE(stat(path, &sb) == 0);
        off_t len = at[i] < 0 ? sb.st_size - 1 : at[i];
        REQUIRE(truncate(path, len) == 0);
        CHECK(lookup_after(dir) == 20, "truncated at %ld", (long)len);
        CHECK(strstr(logged(), "removing"), "truncated at %ld: %s", (long)len, logbuf);
        CHECK(!file_exists(path));
        free(path);
    }
    /* Grown by a byte: lengths no longer match the size. */
    char dir[256];
    char *path = setup_pair(dir, sizeof dir);
    REQUIRE(path);
    FILE *fp = fopen(path, "ab");
    fputc(0, fp);
    fclose(fp);
    CHECK(lookup_after(dir) == 20);
    free(path);
}

/* Rewrite a header field and re-seal the header checksum: a well-formed
 * file of another version or model. */
static void reseal(const char *path, long off, const void *bytes, size_t n) {
    FILE *fp = fopen(path, "r+b");
    uint8_t h[KV_HEADER_BYTES];
    if (!fp || fread(h, 1, sizeof h, fp) != sizeof h) { if (fp) fclose(fp); return; }
    memcpy(h + off, bytes, n);
    EVP_Digest(h, KV_OFF_HDRSUM, h + KV_OFF_HDRSUM, NULL, EVP_sha256(), NULL);
    fseek(fp, 0, SEEK_SET);
    fwrite(h, 1, sizeof h, fp);
    fclose(fp);
}

static void test_other_version_and_model(void) {
    char dir[256];
    char *path = setup_pair(dir, sizeof dir);
    REQUIRE(path);
    uint32_t v2 = KV_VERSION + 1;
    reseal(path, KV_OFF_VERSION, &v2, 4);
    CHECK(lookup_after(dir) == 20);
    CHECK(strstr(logged(), "other format version"), "%s", logbuf);
    CHECK(file_exists(path), "a newer writer's file is left alone");
    free(path);

    /* Another model's files: ignored, kept, and found again by that model. */
    path = setup_pair(dir, sizeof dir);
    REQUIRE(path);
    ds4_kvstore *st = open_store(dir, 1 << 20, "model-B");
    REQUIRE(st);
    CHECK(ds4_kvstore_count(st) == 0);
    CHECK(strstr(logged(), "another model"), "%s", logbuf);
    ds4_kv_checkpoint out;
    CHECK(ds4_kvstore_lookup(st, cf.text, cf.cp.text_len, cf.ids, 40, &out) == 0);
    ds4_kvstore_close(st);
    CHECK(file_exists(path) && lookup_after(dir) == 40);

    /* Same model id string, but the header's model hash rewritten (a file
     * copied in from elsewhere) with a valid checksum. */
    uint8_t other[32] = {1};
    reseal(path, KV_OFF_MODEL, other, 32);
    CHECK(lookup_after(dir) == 20 && file_exists(path));
    free(path);
}

static void test_foreign_and_temp_files(void) {
    char dir[256];
    char *path = setup_pair(dir, sizeof dir);
    REQUIRE(path);
    char p[600];
    snprintf(p, sizeof p, "%s/README.txt", dir);
    FILE *fp = fopen(p, "w");
    fputs("not a checkpoint\n", fp);
    fclose(fp);
    /* Named like a checkpoint, content foreign. */
    char fake[600];
    snprintf(fake, sizeof fake, "%s/%064d.kv", dir, 0);
    fp = fopen(fake, "w");
    for (int i = 0; i < 40; i++) fputs("DS4KVCQ garbage ", fp);
    fclose(fp);
    /* Temp files: one of a dead writer (a reaped child's pid), one of a live
     * process (our parent) that may still be writing. */
    pid_t child = fork();
    if (child == 0) _exit(0);
    waitpid(child, NULL, 0);
    char dead[600], live[600];
    const char *base = strrchr(path, '/') + 1;
    snprintf(dead, sizeof dead, "%s/.%.64s.%d.0.tmp", dir, base, (int)child);
    snprintf(live, sizeof live, "%s/.%.64s.%d.0.tmp", dir, base, (int)getppid());
    fp = fopen(dead, "w"); fputs("half", fp); fclose(fp);
    fp = fopen(live, "w"); fputs("half", fp); fclose(fp);
    /* A live pid's temp file two days old: the pid was reused, remove. */
    char old_tmp[600];
    snprintf(old_tmp, sizeof old_tmp, "%s/.%.64s.%d.1.tmp", dir, base, (int)getppid());
    fp = fopen(old_tmp, "w"); fputs("half", fp); fclose(fp);
    struct timespec two_days[2] = {{time(NULL) - 172800, 0}, {time(NULL) - 172800, 0}};
    utimensat(AT_FDCWD, old_tmp, two_days, 0);

    /* A FIFO named like a checkpoint: its blocking open() hung the scan
     * (the alarm turns a hang into a failure). */
    char fifo[600];
    snprintf(fifo, sizeof fifo, "%s/%064d.kv", dir, 1);
    REQUIRE(mkfifo(fifo, 0644) == 0);

    alarm(20);
    CHECK(lookup_after(dir) == 40, "valid files still served");
    alarm(0);
    const char *l = logged();
    CHECK(strstr(l, "cannot open as a regular file"), "%s", l);
    CHECK(file_exists(fifo), "a FIFO is left alone");
    unlink(fifo);
    CHECK(strstr(l, "README.txt"), "%s", l);
    CHECK(strstr(l, "bad magic"), "%s", l);
    CHECK(strstr(l, "interrupted save"), "%s", l);
    CHECK(file_exists(p) && file_exists(fake), "foreign files left alone");
    CHECK(!file_exists(dead), "dead writer's temp file removed");
    CHECK(file_exists(live), "live writer's temp file kept");
    CHECK(!file_exists(old_tmp), "day-old temp file removed");
    unlink(live);
    free(path);

    /* An unusable directory is an error, not a crash. */
    char err[256] = "";
    ds4_kvstore_params bad = {.dir = p, .space_bytes = 1, .model_id = "m", .log = logf};
    CHECK(ds4_kvstore_open(&bad, err, sizeof err) == NULL && err[0]);
}

/* ---- one server per directory ------------------------------------------------ */

/* DIR/.lock: a second store on the directory, in this process or another,
 * is refused with the holder's pid; closing, or the holder dying without
 * closing, frees it. Two stores would each enforce the budget over their
 * own index and unlink files the other is about to load. */
static void test_dir_lock(void) {
    char dir[256], err[256] = "";
    new_dir(dir, sizeof dir);
    ds4_kvstore *st = open_store(dir, 1 << 20, "m");
    REQUIRE(st);
    CHECK(logged()[0] == 0, "the lock file is not logged as a foreign file: %s", logbuf);
    ds4_kvstore_params p = {.dir = dir, .space_bytes = 1 << 20, .model_id = "m", .log = logf};
    char want[400];
    snprintf(want, sizeof want, "kv dir %s is in use by another ds4-server (pid %d)", dir, (int)getpid());
    CHECK(ds4_kvstore_open(&p, err, sizeof err) == NULL && !strcmp(err, want), "'%s'", err);
    /* Another process: refused, naming this one. */
    int fds[2];
    REQUIRE(pipe(fds) == 0);
    pid_t child = fork();
    if (child == 0) {
        char cerr[256] = "";
        ds4_kvstore *w = ds4_kvstore_open(&p, cerr, sizeof cerr);
        ssize_t k = write(fds[1], cerr, strlen(cerr) + 1);
        _exit(w == NULL && k > 0 ? 0 : 1);
    }
    char got[256] = "";
    ssize_t k = read(fds[0], got, sizeof got - 1);
    int status = -1;
    waitpid(child, &status, 0);
    close(fds[0]);
    close(fds[1]);
    CHECK(k > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0 && !strcmp(got, want), "child: '%s'", got);
    ds4_kvstore_close(st);
    /* Closed: free again. A holder that dies without closing frees it too. */
    st = open_store(dir, 1 << 20, "m");
    CHECK(st != NULL);
    ds4_kvstore_close(st);
    child = fork();
    if (child == 0) _exit(open_store(dir, 1 << 20, "m") ? 0 : 1);   /* exits holding it */
    waitpid(child, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    st = open_store(dir, 1 << 20, "m");
    CHECK(st != NULL, "a dead holder's lock is gone");
    ds4_kvstore_close(st);
}

/* A file whose checksums hold but whose session the engine refuses: the
 * caller discards it, it is removed with one log line and never read again;
 * a newer file of the same text is not touched by a stale discard. */
static void test_discard(void) {
    char dir[256], err[256];
    new_dir(dir, sizeof dir);
    ds4_kvstore *st = open_store(dir, 1 << 20, "m");
    REQUIRE(st);
    static fixture f;
    make_cp(&f, conv(5), 30, 100, 1);
    REQUIRE(ds4_kvstore_save(st, &f.cp, err, sizeof err) == 0, "%s", err);
    const char *path = path_of(dir, &f.cp);   /* static buffer */
    ds4_kv_checkpoint out;
    REQUIRE(ds4_kvstore_lookup(st, f.text, f.cp.text_len, f.ids, 30, &out) == 1);
    ds4_kvstore_discard(st, &out, "bad magic");
    ds4_kv_checkpoint_free(&out);
    const char *l = logged();
    CHECK(strstr(l, "(30 tokens: refused by the engine: bad magic)") && strchr(l, '\n') == l + strlen(l) - 1,
          "one line: %s", l);
    CHECK(!file_exists(path) && ds4_kvstore_count(st) == 0);
    CHECK(ds4_kvstore_lookup(st, f.text, f.cp.text_len, f.ids, 30, &out) == 0);
    /* Loaded, then replaced by a newer save of the same text (other blob
     * size): discarding the old copy leaves the new file. */
    REQUIRE(ds4_kvstore_save(st, &f.cp, err, sizeof err) == 0);
    REQUIRE(ds4_kvstore_lookup(st, f.text, f.cp.text_len, f.ids, 30, &out) == 1);
    make_cp(&f, conv(5), 30, 200, 2);
    REQUIRE(ds4_kvstore_save(st, &f.cp, err, sizeof err) == 0);
    ds4_kvstore_discard(st, &out, "stale");
    ds4_kv_checkpoint_free(&out);
    CHECK(file_exists(path) && ds4_kvstore_count(st) == 1);
    ds4_kvstore_close(st);
}

/* ---- save points ------------------------------------------------------------- */

static void test_save_points(void) {
    size_t p[16];
    /* A 5000-token first prompt, stable up to 4990: aligned at 2048 every
     * 2048 -> 2048, 4096 (4096 is also the trimmed prompt). */
    CHECK(ds4_kv_save_points(0, 4990, 2048, 2048, p, 16) == 2 && p[0] == 2048 && p[1] == 4096);
    /* Frontiers every 8192 and the trimmed prompt at the last 2048 boundary. */
    size_t n = ds4_kv_save_points(0, 20000, 2048, 8192, p, 16);
    CHECK(n == 3 && p[0] == 8192 && p[1] == 16384 && p[2] == 18432, "%zu", n);
    /* Already covered up to 16384 (the session or a checkpoint holds it). */
    n = ds4_kv_save_points(16384, 20000, 2048, 8192, p, 16);
    CHECK(n == 1 && p[0] == 18432);
    /* Covered up to the trimmed point: nothing. Short prompts: nothing. */
    CHECK(ds4_kv_save_points(18432, 20000, 2048, 8192, p, 16) == 0);
    CHECK(ds4_kv_save_points(0, 2047, 2048, 8192, p, 16) == 0);
    /* Exactly on a boundary: included once. */
    n = ds4_kv_save_points(0, 16384, 2048, 8192, p, 16);
    CHECK(n == 2 && p[0] == 8192 && p[1] == 16384);
    /* every not a multiple of align is rounded up; cap bounds the writes. */
    n = ds4_kv_save_points(0, 10000, 1000, 2500, p, 1);
    CHECK(n == 4 && p[0] == 3000, "%zu", n);
    CHECK(ds4_kv_save_points(0, 10000, 0, 100, p, 16) == 0);
}

static int map_n;
static char map_seen[256];
static void map_cb(void *ud, const char *k, const char *v) {
    (void)ud;
    map_n++;
    size_t l = strlen(map_seen);
    snprintf(map_seen + l, sizeof map_seen - l, "%s=%s;", k, v);
}

static void test_map_blob(void) {
    const char *keys[] = {"call_1", "call_2", ""};
    const char *vals[] = {"\n\n<｜DSML｜tool_calls>x</｜DSML｜tool_calls>", "y", "empty key"};
    uint8_t *b = NULL;
    size_t len = 0;
    REQUIRE(ds4_kv_map_encode(keys, vals, 3, &b, &len) == 0);
    CHECK(len == 4 + 3 * 8 + 6 + strlen(vals[0]) + 6 + 1 + 0 + 9);
    map_n = 0;
    map_seen[0] = 0;
    CHECK(ds4_kv_map_decode(b, len, map_cb, NULL) == 0 && map_n == 3);
    CHECK(strstr(map_seen, "call_2=y;") && strstr(map_seen, "=empty key;"), "%s", map_seen);
    /* Every truncation, a trailing byte, a length pointing past the end, an
     * embedded NUL: refused with no callback. */
    map_n = 0;
    for (size_t cut = 0; cut < len; cut++) CHECK(ds4_kv_map_decode(b, cut, map_cb, NULL) == -1, "cut %zu", cut);
    uint8_t *big = malloc(len + 1);
    memcpy(big, b, len);
    big[len] = 0;
    CHECK(ds4_kv_map_decode(big, len + 1, map_cb, NULL) == -1);
    memcpy(big, b, len);
    big[4] = 0xff;                          /* first key length: huge */
    CHECK(ds4_kv_map_decode(big, len, map_cb, NULL) == -1);
    memcpy(big, b, len);
    big[8] = 0;                             /* NUL inside "call_1" */
    CHECK(ds4_kv_map_decode(big, len, map_cb, NULL) == -1);
    memcpy(big, b, len);
    big[0] = 0xff;                          /* count beyond the entries */
    CHECK(ds4_kv_map_decode(big, len, map_cb, NULL) == -1);
    CHECK(map_n == 0);
    free(big);
    free(b);
    REQUIRE(ds4_kv_map_encode(NULL, NULL, 0, &b, &len) == 0 && len == 4);
    CHECK(ds4_kv_map_decode(b, len, map_cb, NULL) == 0 && map_n == 0);
    free(b);
}

/* Extras at startup: each checkpoint's blob, checked by its own digest;
 * a damaged one is skipped with a log line, the other still given. */
static int n_extras;
static uint8_t extras_seen[2];
static void on_extra(void *ud, const uint8_t *x, size_t n) {
    if (n == 16 && n_extras < 2) extras_seen[n_extras] = x[0];
    n_extras++;
}

static void test_extras(void) {
    char dir[256], err[256];
    new_dir(dir, sizeof dir);
    ds4_kvstore *st = open_store(dir, 1 << 20, "model-A");
    REQUIRE(st);
    /* An empty store gives nothing (found by fuzz_kvstore: the empty index
     * went to qsort as a NULL base, undefined behaviour UBSan reports). */
    n_extras = 0;
    CHECK(ds4_kvstore_extras(st, 1 << 20, on_extra, NULL) == 0 && n_extras == 0);
    static fixture f;
    make_cp(&f, conv(1), 30, 500, 0x11);
    REQUIRE(ds4_kvstore_save(st, &f.cp, err, sizeof err) == 0);
    char first[512];
    snprintf(first, sizeof first, "%s", path_of(dir, &f.cp));
    make_cp(&f, conv(2), 40, 500, 0x22);
    REQUIRE(ds4_kvstore_save(st, &f.cp, err, sizeof err) == 0);
    ds4_kvstore_close(st);

    st = open_store(dir, 1 << 20, "model-A");
    REQUIRE(st);
    n_extras = 0;
    CHECK(ds4_kvstore_extras(st, 1 << 20, on_extra, NULL) == 2 && n_extras == 2);
    CHECK((extras_seen[0] == 0x11 && extras_seen[1] == 0x22) || (extras_seen[0] == 0x22 && extras_seen[1] == 0x11));
    n_extras = 0;
    CHECK(ds4_kvstore_extras(st, 15, on_extra, NULL) == 0 && n_extras == 0, "over max_len: skipped");
    ds4_kvstore_close(st);

    /* The last byte of the first file is its extra blob's. */
    struct stat sb;
    REQUIRE(stat(first, &sb) == 0);
    REQUIRE(patch(first, sb.st_size - 1, 0x80));
    st = open_store(dir, 1 << 20, "model-A");
    REQUIRE(st);
    n_extras = 0;
    CHECK(ds4_kvstore_extras(st, 1 << 20, on_extra, NULL) == 1 && n_extras == 1 && extras_seen[0] == 0x22);
    CHECK(strstr(logged(), "checksum mismatch"), "%s", logbuf);
    ds4_kvstore_close(st);
}

int main(void) {
    snprintf(root, sizeof root, "/tmp/ds4_test_kvstore_%d", (int)getpid());
    mkdir(root, 0755);
    logf = tmpfile();
    if (!logf) return 1;
    RUN(test_round_trip_longest_prefix);
    RUN(test_replace_same_text);
    RUN(test_budget_eviction);
    RUN(test_value);
    RUN(test_flip_every_byte);
    RUN(test_flip_body_removes);
    RUN(test_truncation);
    RUN(test_other_version_and_model);
    RUN(test_foreign_and_temp_files);
    RUN(test_dir_lock);
    RUN(test_discard);
    RUN(test_save_points);
    RUN(test_map_blob);
    RUN(test_extras);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", root);
    if (system(cmd)) fprintf(stderr, "cannot remove %s\n", root);
    TEST_END();
}
