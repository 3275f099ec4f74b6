/* Disk KV checkpoints: an index of DIR/<sha256(text)>.kv files (format in
 * engine/kvstore.h, policies in docs/kv-cache.md).
 *
 * Trust model: nothing read from disk is believed until checked. Opening
 * reads only headers (a checkpoint of a long prompt is gigabytes), so each
 * header carries its own checksum and exact lengths; the body checksum is
 * verified when a lookup loads the file. Writes go through a temp file,
 * fsync and rename, so a reader (this or another process) sees the old file
 * or the complete new one, never a torn one. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "ds4.h"
#include "engine/kvstore.h"
#include "util/errf.h"

/* The directory's lock file (not a checkpoint; never scanned). */
#define LOCK_NAME ".lock"

typedef struct {
    uint8_t key[32], tok[32];
    uint8_t xsum[16];               /* of the extra blob (header) */
    uint64_t text_len, n_ids, session_len, extra_len;
    uint64_t created, last_hit, hits;
    uint64_t file_bytes;
} kv_entry;

struct ds4_kvstore {
    /* mu guards the index and is held for no more than an index update or
     * one lookup's reads; save_mu makes saves one at a time and is held
     * across the (seconds-long) write, so a lookup never waits for a
     * write in progress. Order: save_mu before mu. */
    pthread_mutex_t mu, save_mu;
    char *dir;
    int dir_fd, lock_fd;            /* lock_fd: DIR/.lock, flock'ed while open */
    uint64_t space, used;
    uint8_t model[32];
    FILE *log;
    kv_entry *e; size_t n, cap;
    unsigned seq;                   /* temp file names (under save_mu) */
};

/* ---- small helpers -------------------------------------------------------------- */

static void logf_(ds4_kvstore *st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_(ds4_kvstore *st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    /* One line even when other threads write to the same trace file:
     * the FILE lock spans the three calls. */
    flockfile(st->log);
    fputs("ds4: kv-cache: ", st->log);
    vfprintf(st->log, fmt, ap);
    fputc('\n', st->log);
    funlockfile(st->log);
    fflush(st->log);
    va_end(ap);
}

static void sha256(const void *p, size_t n, uint8_t out[32]) {
    EVP_Digest(p, n, out, NULL, EVP_sha256(), NULL);
}

static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint64_t get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

static void hex(const uint8_t k[32], char out[65]) {
    for (int i = 0; i < 32; i++) sprintf(out + 2 * i, "%02x", k[i]);
}

static void entry_name(const uint8_t key[32], char out[72]) {
    hex(key, out);
    strcpy(out + 64, ".kv");
}

/* Token ids hash over their little-endian bytes (x86/ARM hosts: the memory). */
static void ids_hash(const int32_t *ids, size_t n, uint8_t out[32]) { sha256(ids, n * 4, out); }

/* Exact file size for these lengths, or 0 on overflow. */
static uint64_t file_size(uint64_t text_len, uint64_t n_ids, uint64_t session_len, uint64_t extra_len) {
    uint64_t s = KV_HEADER_BYTES, t;
    if (n_ids > UINT64_MAX / 4) return 0;
    if (__builtin_add_overflow(s, n_ids * 4, &t)) return 0;
    if (__builtin_add_overflow(t, text_len, &s)) return 0;
    if (__builtin_add_overflow(s, session_len, &t)) return 0;
    if (__builtin_add_overflow(t, extra_len, &s)) return 0;
    return s;
}

static void meta_check(const uint8_t key[32], uint64_t last_hit, uint64_t hits, uint8_t out[8]) {
    uint8_t b[48], d[32];
    memcpy(b, key, 32);
    put64(b + 32, last_hit);
    put64(b + 40, hits);
    sha256(b, sizeof b, d);
    memcpy(out, d, 8);
}

static void meta_encode(const kv_entry *e, uint8_t m[24]) {
    put64(m, e->last_hit);
    put64(m + 8, e->hits);
    meta_check(e->key, e->last_hit, e->hits, m + 16);
}

static uint64_t now_s(void) { return (uint64_t)time(NULL); }

double ds4_kv_value(uint64_t n_ids, uint64_t hits, double idle_s) {
    /* Reuse saves prefill proportional to the prefix length, and a prefix that
     * was hit before is likely to be hit again; interest fades with idle time
     * (hyperbolically: a long agent prefix idle for a day still outranks a
     * fresh short side prompt). */
    if (idle_s < 0) idle_s = 0;
    return (double)n_ids * (double)(1 + hits) / (1.0 + idle_s / 3600.0);
}

static double entry_value(const kv_entry *e, uint64_t now) {
    uint64_t last = e->last_hit > e->created ? e->last_hit : e->created;
    return ds4_kv_value(e->n_ids, e->hits, now > last ? (double)(now - last) : 0.0);
}

/* ---- header parsing --------------------------------------------------------------- */

typedef enum { HDR_OK, HDR_CORRUPT, HDR_FOREIGN } hdr_status;

/* Fills e from a header; `why` says what was wrong. CORRUPT: our format and
 * version but damaged (safe to delete). FOREIGN: someone else's file, another
 * version or another model (left alone). */
static hdr_status parse_header(const ds4_kvstore *st, const uint8_t *h, uint64_t actual_size, kv_entry *e,
                               const char **why) {
    if (memcmp(h, KV_MAGIC, 8)) { *why = "not a ds4 checkpoint (bad magic)"; return HDR_FOREIGN; }
    uint32_t ver = get32(h + KV_OFF_VERSION);
    uint8_t sum[32];
    sha256(h, KV_OFF_HDRSUM, sum);
    bool sum_ok = !memcmp(sum, h + KV_OFF_HDRSUM, 32);
    /* A version field that fails the checksum is damage, not a newer writer. */
    if (ver != KV_VERSION && sum_ok) { *why = "other format version"; return HDR_FOREIGN; }
    if (!sum_ok) { *why = "header checksum mismatch"; return HDR_CORRUPT; }
    if (get32(h + 12) != KV_HEADER_BYTES) {
        *why = "bad header size";
        return HDR_CORRUPT;
    }
    if (memcmp(h + KV_OFF_MODEL, st->model, 32)) { *why = "made by another model"; return HDR_FOREIGN; }
    memcpy(e->key, h + KV_OFF_KEY, 32);
    memcpy(e->tok, h + KV_OFF_TOKHASH, 32);
    memcpy(e->xsum, h + KV_OFF_EXTRASUM, sizeof e->xsum);
    e->text_len = get64(h + KV_OFF_LENS);
    e->n_ids = get64(h + KV_OFF_LENS + 8);
    e->session_len = get64(h + KV_OFF_LENS + 16);
    e->extra_len = get64(h + KV_OFF_LENS + 24);
    e->created = get64(h + KV_OFF_CREATED);
    e->file_bytes = file_size(e->text_len, e->n_ids, e->session_len, e->extra_len);
    if (!e->file_bytes || e->file_bytes != actual_size || e->n_ids == 0) {
        *why = "truncated or lengths inconsistent with the file size";
        return HDR_CORRUPT;
    }
    uint8_t chk[8];
    const uint8_t *m = h + KV_OFF_META;
    meta_check(e->key, get64(m), get64(m + 8), chk);
    if (!memcmp(chk, m + 16, 8)) {
        e->last_hit = get64(m);
        e->hits = get64(m + 8);
    } else {
        e->last_hit = e->hits = 0;      /* torn metadata update: counters only */
    }
    return HDR_OK;
}

static bool read_full(int fd, void *buf, size_t n, uint64_t off) {
    uint8_t *p = buf;
    while (n) {
        ssize_t r = pread(fd, p, n > (1u << 30) ? (1u << 30) : n, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return false;
        p += r; n -= (size_t)r; off += (uint64_t)r;
    }
    return true;
}

static bool write_full(int fd, const void *buf, size_t n) {
    const uint8_t *p = buf;
    while (n) {
        ssize_t r = write(fd, p, n > (1u << 30) ? (1u << 30) : n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return false;
        p += r; n -= (size_t)r;
    }
    return true;
}

/* Defined with save below; open uses it to trim to a lowered budget. */
static bool plan_eviction(ds4_kvstore *st, uint64_t need, double worth, const kv_entry *replaced, bool *victim);

/* ---- index ---------------------------------------------------------------------- */

static kv_entry *find_key(ds4_kvstore *st, const uint8_t key[32]) {
    for (size_t i = 0; i < st->n; i++)
        if (!memcmp(st->e[i].key, key, 32)) return &st->e[i];
    return NULL;
}

static int index_add(ds4_kvstore *st, const kv_entry *e) {
    if (st->n == st->cap) {
        size_t c = st->cap ? st->cap * 2 : 16;
        kv_entry *q = realloc(st->e, c * sizeof *q);
        if (!q) return -1;
        st->e = q; st->cap = c;
    }
    st->e[st->n++] = *e;
    st->used += e->file_bytes;
    return 0;
}

static void index_drop(ds4_kvstore *st, kv_entry *e) {
    st->used -= e->file_bytes;
    *e = st->e[--st->n];
}

/* Remove a checkpoint file and its index entry. */
static void remove_entry(ds4_kvstore *st, kv_entry *e) {
    char name[72];
    entry_name(e->key, name);
    if (unlinkat(st->dir_fd, name, 0) && errno != ENOENT) logf_(st, "cannot remove %s: %s", name, strerror(errno));
    index_drop(st, e);
}

static bool is_hex_name(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
    return true;
}

/* ".<64 hex>.<pid>.<seq>.tmp": a writer's temp file. Returns its pid or 0. */
static long temp_pid(const char *name) {
    size_t n = strlen(name);
    if (n < 1 + 64 + 1 + 1 + 1 + 1 + 4 || name[0] != '.' || strcmp(name + n - 4, ".tmp")) return 0;
    if (!is_hex_name(name + 1, 64) || name[65] != '.') return 0;
    char *end;
    long pid = strtol(name + 66, &end, 10);
    return *end == '.' && pid > 0 ? pid : 0;
}

/* A checkpoint file for reading. O_NONBLOCK: a FIFO under a checkpoint's
 * name would block open() forever; this way it opens, and the S_ISREG check
 * of the startup scan (or the size checks after it) refuses it. */
static int open_checkpoint(const ds4_kvstore *st, const char *name) {
    return openat(st->dir_fd, name, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
}

static void scan_one(ds4_kvstore *st, const char *name) {
    if (!strcmp(name, LOCK_NAME)) return;
    size_t n = strlen(name);
    long pid = temp_pid(name);
    if (pid) {
        /* Left by a writer that died mid-save (never renamed: never trusted).
         * A live writer, possibly another server on this dir, keeps its file,
         * unless it is a day old (its pid was reused by something else). */
        struct stat tb;
        bool stale = !fstatat(st->dir_fd, name, &tb, 0) && time(NULL) - tb.st_mtime > 86400;
        if (pid == (long)getpid() || stale || (kill((pid_t)pid, 0) && errno == ESRCH)) {
            logf_(st, "removing %s (temp file of an interrupted save)", name);
            unlinkat(st->dir_fd, name, 0);
        }
        return;
    }
    if (n != 64 + 3 || strcmp(name + 64, ".kv") || !is_hex_name(name, 64)) {
        logf_(st, "ignoring %s (not a checkpoint file name)", name);
        return;
    }
    int fd = open_checkpoint(st, name);
    struct stat sb;
    uint8_t h[KV_HEADER_BYTES];
    if (fd < 0 || fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
        logf_(st, "ignoring %s (cannot open as a regular file)", name);
        if (fd >= 0) close(fd);
        return;
    }
    kv_entry e = {0};
    const char *why = "shorter than a header";
    hdr_status s = HDR_CORRUPT;
    if ((uint64_t)sb.st_size >= KV_HEADER_BYTES && read_full(fd, h, sizeof h, 0))
        s = parse_header(st, h, (uint64_t)sb.st_size, &e, &why);
    else if (sb.st_size >= 8 && read_full(fd, h, 8, 0) && memcmp(h, KV_MAGIC, 8)) {
        s = HDR_FOREIGN;    /* short, and not even our magic: not ours to delete */
        why = "not a ds4 checkpoint (bad magic)";
    }
    close(fd);
    char want[72];
    if (s == HDR_OK) {
        entry_name(e.key, want);
        if (strcmp(want, name)) { s = HDR_CORRUPT; why = "key does not match the file name"; }
    }
    if (s == HDR_OK && find_key(st, e.key)) return;
    if (s == HDR_OK) {
        if (index_add(st, &e)) logf_(st, "ignoring %s (out of memory)", name);
        return;
    }
    if (s == HDR_CORRUPT) {
        logf_(st, "removing %s (%s)", name, why);
        unlinkat(st->dir_fd, name, 0);
    } else {
        logf_(st, "ignoring %s (%s)", name, why);
    }
}

/* Over budget at open (the budget was lowered): lowest value goes first. */
static void trim(ds4_kvstore *st) {
    bool *victim = calloc(st->n + 1, sizeof *victim);
    uint64_t before = st->used;
    if (!victim) return;
    plan_eviction(st, 0, HUGE_VAL, NULL, victim);
    for (size_t i = st->n; i-- > 0;)      /* from the end: dropping moves the last entry */
        if (victim[i]) remove_entry(st, &st->e[i]);
    free(victim);
    logf_(st, "%llu bytes of checkpoints over the %llu-byte budget: trimmed to %llu", (unsigned long long)before,
          (unsigned long long)st->space, (unsigned long long)st->used);
}

/* One server per directory: the budget is enforced over the files one
 * process indexed, and its evictions unlink files another process may be
 * about to load. flock belongs to the open file: the kernel drops it when
 * the holder exits, however it exits, so a crash never leaves the
 * directory locked. The pid written inside only names the holder. */
static int lock_dir(ds4_kvstore *st, char *err, size_t errlen) {
    st->lock_fd = openat(st->dir_fd, LOCK_NAME, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (st->lock_fd < 0) return ds4_errf(err, errlen, "kv-cache: cannot open %s/%s: %s", st->dir, LOCK_NAME, strerror(errno));
    if (flock(st->lock_fd, LOCK_EX | LOCK_NB)) {
        if (errno != EWOULDBLOCK) return ds4_errf(err, errlen, "kv-cache: cannot lock %s/%s: %s", st->dir, LOCK_NAME, strerror(errno));
        char buf[32] = "";
        ssize_t n = pread(st->lock_fd, buf, sizeof buf - 1, 0);
        long pid = n > 0 ? strtol(buf, NULL, 10) : 0;
        if (pid > 0) return ds4_errf(err, errlen, "kv dir %s is in use by another ds4-server (pid %ld)", st->dir, pid);
        return ds4_errf(err, errlen, "kv dir %s is in use by another ds4-server", st->dir);
    }
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%ld\n", (long)getpid());
    if (ftruncate(st->lock_fd, 0) || pwrite(st->lock_fd, buf, (size_t)n, 0) != n)
        logf_(st, "cannot write the pid into %s/%s: %s", st->dir, LOCK_NAME, strerror(errno));
    return 0;
}

ds4_kvstore *ds4_kvstore_open(const ds4_kvstore_params *p, char *err, size_t errlen) {
    if (!p->dir || !*p->dir || !p->model_id) { ds4_errf(err, errlen, "kv-cache: no directory or model id"); return NULL; }
    if (mkdir(p->dir, 0755) && errno != EEXIST) {
        ds4_errf(err, errlen, "kv-cache: cannot create %s: %s", p->dir, strerror(errno));
        return NULL;
    }
    ds4_kvstore *st = calloc(1, sizeof *st);
    if (!st || !(st->dir = strdup(p->dir))) {
        free(st);
        ds4_errf(err, errlen, "kv-cache: out of memory");
        return NULL;
    }
    pthread_mutex_init(&st->mu, NULL);
    pthread_mutex_init(&st->save_mu, NULL);
    st->log = p->log ? p->log : stderr;
    st->space = p->space_bytes;
    sha256(p->model_id, strlen(p->model_id), st->model);
    st->lock_fd = -1;
    st->dir_fd = open(p->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (st->dir_fd < 0) {
        ds4_errf(err, errlen, "kv-cache: cannot open directory %s: %s", p->dir, strerror(errno));
        ds4_kvstore_close(st);
        return NULL;
    }
    if (lock_dir(st, err, errlen)) { ds4_kvstore_close(st); return NULL; }
    DIR *d = fdopendir(dup(st->dir_fd));
    if (!d) {
        ds4_errf(err, errlen, "kv-cache: cannot open directory %s: %s", p->dir, strerror(errno));
        ds4_kvstore_close(st);
        return NULL;
    }
    struct dirent *de;
    while ((de = readdir(d)))
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) scan_one(st, de->d_name);
    closedir(d);
    if (st->used > st->space) trim(st);
    return st;
}

void ds4_kvstore_close(ds4_kvstore *st) {
    if (!st) return;
    if (st->lock_fd >= 0) close(st->lock_fd);   /* releases the flock */
    if (st->dir_fd >= 0) close(st->dir_fd);
    pthread_mutex_destroy(&st->mu);
    pthread_mutex_destroy(&st->save_mu);
    free(st->dir);
    free(st->e);
    free(st);
}

/* ---- save ----------------------------------------------------------------------- */


typedef struct { double value; uint64_t last; size_t idx; } ranked;

/* Lowest value first; among equals the least recently used. */
static int cmp_ranked(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->value != y->value) return x->value < y->value ? -1 : 1;
    return x->last < y->last ? -1 : x->last > y->last;
}

/* Choose victims so that used - freed + need <= space, lowest value first,
 * never one worth more than `worth` (the new checkpoint). Marks them in
 * victim[] (one worth the same may go: the newer of equals is kept);
 * returns false when the budget cannot be met that way. */
static bool plan_eviction(ds4_kvstore *st, uint64_t need, double worth, const kv_entry *replaced, bool *victim) {
    uint64_t used = st->used - (replaced ? replaced->file_bytes : 0);
    if (used + need <= st->space) return true;
    ranked *r = malloc((st->n + 1) * sizeof *r);
    if (!r) return false;
    size_t m = 0;
    uint64_t now = now_s();
    for (size_t i = 0; i < st->n; i++)
        if (&st->e[i] != replaced) {
            const kv_entry *e = &st->e[i];
            r[m++] = (ranked){entry_value(e, now), e->last_hit > e->created ? e->last_hit : e->created, i};
        }
    qsort(r, m, sizeof *r, cmp_ranked);
    for (size_t k = 0; k < m && used + need > st->space; k++) {
        if (r[k].value > worth) break;
        victim[r[k].idx] = true;
        used -= st->e[r[k].idx].file_bytes;
    }
    free(r);
    return used + need <= st->space;
}

static int write_checkpoint(ds4_kvstore *st, const ds4_kv_checkpoint *cp, const kv_entry *e, char *err,
                            size_t errlen) {
    char name[72], tmp[128];
    entry_name(e->key, name);
    snprintf(tmp, sizeof tmp, ".%.64s.%ld.%u.tmp", name, (long)getpid(), st->seq++);
    int fd = openat(st->dir_fd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return ds4_errf(err, errlen, "kv-cache: cannot create %s/%s: %s", st->dir, tmp, strerror(errno));

    uint8_t h[KV_HEADER_BYTES] = {0};
    memcpy(h, KV_MAGIC, 8);
    put32(h + KV_OFF_VERSION, KV_VERSION);
    put32(h + 12, KV_HEADER_BYTES);
    memcpy(h + KV_OFF_MODEL, st->model, 32);
    memcpy(h + KV_OFF_KEY, e->key, 32);
    memcpy(h + KV_OFF_TOKHASH, e->tok, 32);
    put64(h + KV_OFF_LENS, e->text_len);
    put64(h + KV_OFF_LENS + 8, e->n_ids);
    put64(h + KV_OFF_LENS + 16, e->session_len);
    put64(h + KV_OFF_LENS + 24, e->extra_len);
    put64(h + KV_OFF_CREATED, e->created);
    uint8_t xs[32];
    sha256(cp->extra_len ? cp->extra : (const void *)"", cp->extra_len, xs);
    memcpy(h + KV_OFF_EXTRASUM, xs, KV_OFF_HDRSUM - KV_OFF_EXTRASUM);

    /* Body checksum in one pass over the pieces, written after the header. */
    const void *part[4] = {cp->ids, cp->text, cp->session, cp->extra};
    size_t plen[4] = {cp->n_ids * 4, cp->text_len, cp->session_len, cp->extra_len};
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok = md && EVP_DigestInit_ex(md, EVP_sha256(), NULL) && lseek(fd, KV_HEADER_BYTES, SEEK_SET) >= 0;
    for (int i = 0; i < 4 && ok; i++)
        if (plen[i]) ok = EVP_DigestUpdate(md, part[i], plen[i]) && write_full(fd, part[i], plen[i]);
    ok = ok && EVP_DigestFinal_ex(md, h + KV_OFF_BODYSUM, NULL);
    EVP_MD_CTX_free(md);
    sha256(h, KV_OFF_HDRSUM, h + KV_OFF_HDRSUM);
    meta_encode(e, h + KV_OFF_META);
    ok = ok && pwrite(fd, h, sizeof h, 0) == (ssize_t)sizeof h;
    /* Data durable before the name points at it: after a power cut the name
     * holds the old file or the whole new one. */
    ok = ok && fsync(fd) == 0;
    int saved_errno = errno;
    close(fd);
    if (!ok || renameat(st->dir_fd, tmp, st->dir_fd, name)) {
        if (ok) saved_errno = errno;
        unlinkat(st->dir_fd, tmp, 0);
        return ds4_errf(err, errlen, "kv-cache: writing %s/%s failed: %s", st->dir, name, strerror(saved_errno));
    }
    fsync(st->dir_fd);      /* the rename itself */
    return 0;
}

int ds4_kvstore_save(ds4_kvstore *st, const ds4_kv_checkpoint *cp, char *err, size_t errlen) {
    if (!cp->ids || cp->n_ids == 0 || (cp->text_len && !cp->text) || (cp->session_len && !cp->session) ||
        (cp->extra_len && !cp->extra))
        return ds4_errf(err, errlen, "kv-cache: checkpoint without tokens");
    kv_entry e = {.text_len = cp->text_len, .n_ids = cp->n_ids, .session_len = cp->session_len,
                  .extra_len = cp->extra_len};
    e.file_bytes = file_size(e.text_len, e.n_ids, e.session_len, e.extra_len);
    if (!e.file_bytes) return ds4_errf(err, errlen, "kv-cache: checkpoint lengths overflow");
    sha256(cp->text_len ? cp->text : "", cp->text_len, e.key);
    ids_hash(cp->ids, cp->n_ids, e.tok);
    e.created = e.last_hit = now_s();

    pthread_mutex_lock(&st->save_mu);
    pthread_mutex_lock(&st->mu);
    int rc = 0;
    kv_entry *old = find_key(st, e.key);
    if (old) {
        /* Same text again (a re-save at shutdown, a spill): keep its history. */
        e.hits = old->hits;
        e.created = old->created;
    }
    bool *victim = calloc(st->n + 1, sizeof *victim);
    uint8_t (*keys)[32] = malloc((st->n + 1) * sizeof *keys);
    size_t n_victims = 0;
    if (!victim || !keys) {
        rc = ds4_errf(err, errlen, "kv-cache: out of memory");
    } else if (e.file_bytes > st->space) {
        ds4_errf(err, errlen, "kv-cache: checkpoint of %llu bytes exceeds the %llu-byte budget",
             (unsigned long long)e.file_bytes, (unsigned long long)st->space);
        rc = 1;
    } else if (!plan_eviction(st, e.file_bytes, ds4_kv_value(e.n_ids, e.hits, 0), old, victim)) {
        ds4_errf(err, errlen, "kv-cache: no room: every kept checkpoint is worth more than this one (%zu tokens)",
             cp->n_ids);
        rc = 1;
    } else {
        /* Victims by key: the index moves entries as it shrinks. */
        for (size_t i = 0; i < st->n; i++)
            if (victim[i]) memcpy(keys[n_victims++], st->e[i].key, 32);
    }
    /* The write runs without mu: lookups go on meanwhile and see the old
     * index (never the file being written: it is indexed only once durable).
     * They can only shrink the index (a damaged or vanished file is
     * dropped), and only saves add to it (save_mu), so the plan stays
     * within the budget. */
    pthread_mutex_unlock(&st->mu);
    if (rc == 0 && (rc = write_checkpoint(st, cp, &e, err, errlen)) == 0) {
        pthread_mutex_lock(&st->mu);
        /* Evict only once the new file is durable. The rename already
         * replaced the old file of the same text (found again by key: a
         * lookup may have dropped it meanwhile). */
        if ((old = find_key(st, e.key))) index_drop(st, old);
        for (size_t k = 0; k < n_victims; k++) {
            kv_entry *v = find_key(st, keys[k]);
            if (v) remove_entry(st, v);
        }
        if (index_add(st, &e)) rc = ds4_errf(err, errlen, "kv-cache: out of memory");
        pthread_mutex_unlock(&st->mu);
    }
    free(victim);
    free(keys);
    pthread_mutex_unlock(&st->save_mu);
    return rc;
}

/* ---- lookup --------------------------------------------------------------------- */

static int cmp_size(const void *a, const void *b) {
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

/* Clears match[i] unless entry i's text is a prefix of text and (when ids
 * are given) its ids a prefix of ids; lengths were checked by the caller.
 * Hashes every needed prefix length in one pass over each array. */
static bool mark_matches(ds4_kvstore *st, const char *text, const int32_t *ids, bool *match) {
    size_t *ord = malloc((st->n + 1) * sizeof *ord * 2);
    EVP_MD_CTX *md = EVP_MD_CTX_new(), *fin = EVP_MD_CTX_new();
    bool ok = ord && md && fin;
    for (int pass = 0; pass < 2 && ok; pass++) {
        /* pass 0: text prefixes; pass 1: token prefixes. Sort (length, index)
         * pairs so the running digest only moves forward. */
        size_t m = 0;
        for (size_t i = 0; i < st->n; i++) {
            kv_entry *e = &st->e[i];
            if (!match[i]) continue;
            uint64_t l = pass == 0 ? e->text_len : e->n_ids;
            ord[2 * m] = (size_t)l;
            ord[2 * m + 1] = i;
            m++;
        }
        if (pass == 1 && !ids) break;
        qsort(ord, m, 2 * sizeof *ord, cmp_size);
        ok = EVP_DigestInit_ex(md, EVP_sha256(), NULL);
        size_t at = 0;
        for (size_t k = 0; k < m && ok; k++) {
            size_t l = ord[2 * k];
            kv_entry *e = &st->e[ord[2 * k + 1]];
            if (l > at)
                ok = pass == 0 ? EVP_DigestUpdate(md, text + at, l - at)
                               : EVP_DigestUpdate(md, ids + at, (l - at) * 4);
            at = l;
            uint8_t d[32];
            ok = ok && EVP_MD_CTX_copy_ex(fin, md) && EVP_DigestFinal_ex(fin, d, NULL);
            if (memcmp(d, pass == 0 ? e->key : e->tok, 32)) match[ord[2 * k + 1]] = false;
        }
    }
    free(ord);
    EVP_MD_CTX_free(md);
    EVP_MD_CTX_free(fin);
    return ok;
}

/* Read and verify one file. 1 ok, 0 gone (another process evicted it),
 * -1 bad (logged). */
static int load_entry(ds4_kvstore *st, const kv_entry *e, ds4_kv_checkpoint *out) {
    char name[72];
    entry_name(e->key, name);
    int fd = open_checkpoint(st, name);
    if (fd < 0) {
        if (errno == ENOENT) return 0;
        logf_(st, "cannot open %s: %s", name, strerror(errno));
        return -1;
    }
    struct stat sb;
    uint8_t h[KV_HEADER_BYTES];
    kv_entry f = {0};
    const char *why = "truncated";
    uint8_t *body = NULL;
    uint64_t nb = e->file_bytes - KV_HEADER_BYTES;
    int rc = -1;
    if (fstat(fd, &sb) || (uint64_t)sb.st_size < KV_HEADER_BYTES || !read_full(fd, h, sizeof h, 0) ||
        parse_header(st, h, (uint64_t)sb.st_size, &f, &why) != HDR_OK) {
        logf_(st, "removing %s (%s)", name, why);
        goto out;
    }
    /* Replaced since indexed (another writer, same text): take its lengths. */
    if (memcmp(f.key, e->key, 32) || memcmp(f.tok, e->tok, 32) || f.file_bytes != e->file_bytes) {
        logf_(st, "skipping %s (changed on disk since it was indexed)", name);
        rc = 0;
        goto out;
    }
    if (nb > SIZE_MAX || !(body = malloc(nb ? (size_t)nb : 1))) {
        logf_(st, "skipping %s (cannot allocate %llu bytes)", name, (unsigned long long)nb);
        rc = 0;
        goto out;
    }
    uint8_t d[32];
    if (!read_full(fd, body, (size_t)nb, KV_HEADER_BYTES)) {
        logf_(st, "removing %s (read failed: truncated?)", name);
        goto out;
    }
    sha256(body, (size_t)nb, d);
    if (memcmp(d, h + KV_OFF_BODYSUM, 32)) {
        logf_(st, "removing %s (body checksum mismatch)", name);
        goto out;
    }
    /* ids first: 4-aligned in the malloc'd body. */
    out->ids = (const int32_t *)body;
    out->n_ids = (size_t)f.n_ids;
    out->text = (const char *)body + f.n_ids * 4;
    out->text_len = (size_t)f.text_len;
    out->session = body + f.n_ids * 4 + f.text_len;
    out->session_len = (size_t)f.session_len;
    out->extra = out->session + f.session_len;
    out->extra_len = (size_t)f.extra_len;
    out->mem_ = body;
    body = NULL;
    rc = 1;
out:
    free(body);
    close(fd);
    return rc;
}

int ds4_kvstore_best_at_or_before(ds4_kvstore *st, const char *text, size_t len, const int32_t *ids,
                                  size_t n_ids, size_t max_ids, ds4_kv_checkpoint *out) {
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&st->mu);
    int found = 0;
    bool *match = calloc(st->n + 1, sizeof *match);
    if (!match) goto done;
    for (size_t i = 0; i < st->n; i++) {
        const kv_entry *e = &st->e[i];
        match[i] = e->text_len <= len && e->n_ids <= max_ids && (!ids || e->n_ids <= n_ids);
    }
    if (!mark_matches(st, text, ids, match)) goto done;
    for (;;) {
        /* Longest first: most tokens, then most text. */
        size_t best = SIZE_MAX;
        for (size_t i = 0; i < st->n; i++)
            if (match[i] && (best == SIZE_MAX || st->e[i].n_ids > st->e[best].n_ids ||
                             (st->e[i].n_ids == st->e[best].n_ids && st->e[i].text_len > st->e[best].text_len)))
                best = i;
        if (best == SIZE_MAX) break;
        kv_entry *e = &st->e[best];
        int r = load_entry(st, e, out);
        /* Hashes matched; the bytes must too (a stale index must not lie). */
        if (r == 1 && (memcmp(out->text, text, out->text_len) || (ids && memcmp(out->ids, ids, out->n_ids * 4)))) {
            ds4_kv_checkpoint_free(out);
            r = 0;
        }
        if (r == 1) {
            e->hits++;
            e->last_hit = now_s();
            uint8_t m[24];
            meta_encode(e, m);
            char name[72];
            entry_name(e->key, name);
            int fd = openat(st->dir_fd, name, O_WRONLY | O_CLOEXEC);
            if (fd >= 0) {
                /* Best effort, no fsync: losing it only loses the counters. */
                if (pwrite(fd, m, sizeof m, KV_OFF_META) != (ssize_t)sizeof m) logf_(st, "cannot update %s", name);
                close(fd);
            }
            found = 1;
            break;
        }
        /* Drop it from the index (and from disk when it is damaged); entry
         * `best` is replaced by the last one, so move its match flag too. */
        if (r < 0) remove_entry(st, e); else index_drop(st, e);
        match[best] = match[st->n];
    }
done:
    free(match);
    pthread_mutex_unlock(&st->mu);
    return found;
}

void ds4_kvstore_discard(ds4_kvstore *st, const ds4_kv_checkpoint *cp, const char *why) {
    uint8_t key[32], tok[32];
    sha256(cp->text_len ? cp->text : "", cp->text_len, key);
    ids_hash(cp->ids, cp->n_ids, tok);
    pthread_mutex_lock(&st->mu);
    kv_entry *e = find_key(st, key);
    /* Only the file that was loaded: a newer one of the same text stays. */
    if (e && !memcmp(e->tok, tok, 32) &&
        e->file_bytes == file_size(cp->text_len, cp->n_ids, cp->session_len, cp->extra_len)) {
        char name[72];
        entry_name(key, name);
        logf_(st, "removing %s (%zu tokens: refused by the engine: %s)", name, cp->n_ids, why);
        remove_entry(st, e);
    }
    pthread_mutex_unlock(&st->mu);
}

size_t ds4_kvstore_probe(ds4_kvstore *st, const char *text, size_t len, const int32_t *ids, size_t n_ids,
                         size_t max_ids) {
    pthread_mutex_lock(&st->mu);
    size_t best = 0;
    bool *match = calloc(st->n + 1, sizeof *match);
    if (match) {
        for (size_t i = 0; i < st->n; i++) {
            const kv_entry *e = &st->e[i];
            match[i] = e->text_len <= len && e->n_ids <= max_ids && (!ids || e->n_ids <= n_ids);
        }
        if (mark_matches(st, text, ids, match))
            for (size_t i = 0; i < st->n; i++)
                if (match[i] && st->e[i].n_ids > best) best = (size_t)st->e[i].n_ids;
    }
    free(match);
    pthread_mutex_unlock(&st->mu);
    return best;
}

int ds4_kvstore_lookup(ds4_kvstore *st, const char *text, size_t len, const int32_t *ids, size_t n_ids,
                       ds4_kv_checkpoint *out) {
    return ds4_kvstore_best_at_or_before(st, text, len, ids, n_ids, SIZE_MAX, out);
}

bool ds4_kvstore_contains(ds4_kvstore *st, const char *text, size_t len) {
    uint8_t k[32];
    sha256(len ? text : "", len, k);
    pthread_mutex_lock(&st->mu);
    bool r = find_key(st, k) != NULL;
    pthread_mutex_unlock(&st->mu);
    return r;
}

static int cmp_created(const void *a, const void *b) {
    const kv_entry *x = a, *y = b;
    return x->created < y->created ? -1 : x->created > y->created;
}

size_t ds4_kvstore_extras(ds4_kvstore *st, size_t max_len, void (*fn)(void *ud, const uint8_t *extra, size_t len),
                          void *ud) {
    pthread_mutex_lock(&st->mu);
    /* A copy of the index: the callback may run long, and order is by age. */
    kv_entry *es = st->n ? malloc(st->n * sizeof *es) : NULL;
    size_t n = es ? st->n : 0, given = 0;
    if (n) memcpy(es, st->e, n * sizeof *es);
    pthread_mutex_unlock(&st->mu);
    if (n) qsort(es, n, sizeof *es, cmp_created);   /* es is NULL for an empty index: UB even for 0 items */
    for (size_t i = 0; i < n; i++) {
        const kv_entry *e = &es[i];
        if (!e->extra_len || e->extra_len > max_len) continue;
        char name[72];
        entry_name(e->key, name);
        int fd = open_checkpoint(st, name);
        uint8_t *x = fd >= 0 ? malloc((size_t)e->extra_len) : NULL;
        uint8_t d[32];
        /* The blob is the file's tail; its own digest (in the verified
         * header) vouches for it without reading the session state. */
        bool ok = x && read_full(fd, x, (size_t)e->extra_len, e->file_bytes - e->extra_len);
        if (ok) sha256(x, (size_t)e->extra_len, d);
        if (ok && !memcmp(d, e->xsum, sizeof e->xsum)) {
            fn(ud, x, (size_t)e->extra_len);
            given++;
        } else if (fd >= 0) {
            logf_(st, "skipping the extra data of %s (unreadable or checksum mismatch)", name);
        }
        free(x);
        if (fd >= 0) close(fd);
    }
    free(es);
    return given;
}

size_t ds4_kvstore_count(ds4_kvstore *st) {
    pthread_mutex_lock(&st->mu);
    size_t n = st->n;
    pthread_mutex_unlock(&st->mu);
    return n;
}

uint64_t ds4_kvstore_bytes(ds4_kvstore *st) {
    pthread_mutex_lock(&st->mu);
    uint64_t n = st->used;
    pthread_mutex_unlock(&st->mu);
    return n;
}

void ds4_kv_checkpoint_free(ds4_kv_checkpoint *c) {
    if (!c) return;
    free(c->mem_);
    memset(c, 0, sizeof *c);
}

/* ---- helpers for callers -------------------------------------------------------- */

int ds4_kv_model_id(ds4_engine *e, char out[65], char *err, size_t errlen) {
    ds4_session *s = ds4_session_new(e, 1, err, errlen);
    if (!s) return -1;
    uint8_t *buf = NULL;
    size_t n = 0;
    int rc = ds4_session_save(s, &buf, &n);
    ds4_session_free(s);
    if (rc) return ds4_errf(err, errlen, "kv-cache: cannot snapshot an empty session");
    uint8_t d[32];
    sha256(buf, n, d);
    free(buf);
    hex(d, out);
    return 0;
}

char *ds4_kv_text(const ds4_tokenizer *t, const int32_t *ids, size_t n, size_t *len) {
    size_t cap = 256, used = 0;
    char *p = malloc(cap);
    for (size_t i = 0; i < n && p; i++) {
        size_t k = ds4_token_bytes(t, ids[i], p + used, cap - used - 1);
        if (used + k + 1 > cap) {
            while (used + k + 1 > cap) cap *= 2;
            char *q = realloc(p, cap);
            if (!q) { free(p); return NULL; }
            p = q;
            ds4_token_bytes(t, ids[i], p + used, cap - used - 1);
        }
        used += k;
    }
    if (!p) return NULL;
    p[used] = 0;
    *len = used;
    return p;
}

size_t ds4_kv_save_points(size_t from, size_t stable, size_t align, size_t every, size_t *out, size_t cap) {
    if (align == 0) return 0;
    if (every < align) every = align;
    every = (every + align - 1) / align * align;
    size_t n = 0;
    for (size_t p = (from / every + 1) * every; p <= stable && p > from; p += every) {
        if (n < cap) out[n] = p;
        n++;
    }
    /* The trimmed prompt: the last aligned point, if not already listed. */
    size_t last = stable / align * align;
    if (last > from && last % every) {
        if (n < cap) out[n] = last;
        n++;
    }
    return n;
}

/* ---- string map blobs ------------------------------------------------------------ */

int ds4_kv_map_encode(const char *const *keys, const char *const *vals, size_t n, uint8_t **blob, size_t *len) {
    size_t total = 4;
    for (size_t i = 0; i < n; i++) {
        size_t kl = strlen(keys[i]), vl = strlen(vals[i]);
        if (kl > UINT32_MAX || vl > UINT32_MAX || n > UINT32_MAX) return -1;
        total += 8 + kl + vl;
    }
    uint8_t *b = malloc(total), *q = b;
    if (!b) return -1;
    put32(q, (uint32_t)n);
    q += 4;
    for (size_t i = 0; i < n; i++) {
        const char *str[2] = {keys[i], vals[i]};
        for (int k = 0; k < 2; k++) {
            size_t l = strlen(str[k]);
            put32(q, (uint32_t)l);
            memcpy(q + 4, str[k], l);
            q += 4 + l;
        }
    }
    *blob = b;
    *len = total;
    return 0;
}

/* Walks the entries; with fn NULL only validates. Strings are bounded by the
 * blob and may not contain NUL (they come back as C strings). */
static int map_walk(const uint8_t *b, size_t len, void (*fn)(void *, const char *, const char *), void *ud) {
    if (len < 4) return -1;
    uint32_t n = get32(b);
    size_t at = 4;
    for (uint32_t i = 0; i < n; i++) {
        char *str[2] = {NULL, NULL};
        for (int k = 0; k < 2; k++) {
            if (len - at < 4) return -1;
            uint32_t l = get32(b + at);
            at += 4;
            if (l > len - at || memchr(b + at, 0, l)) return -1;
            if (fn) {
                if (!(str[k] = malloc((size_t)l + 1))) { free(str[0]); return -1; }
                memcpy(str[k], b + at, l);
                str[k][l] = 0;
            }
            at += l;
        }
        if (fn) fn(ud, str[0], str[1]);
        free(str[0]);
        free(str[1]);
    }
    return at == len ? 0 : -1;
}

int ds4_kv_map_decode(const uint8_t *blob, size_t len, void (*fn)(void *ud, const char *key, const char *val),
                      void *ud) {
    /* Validate all of it first: a malformed blob delivers nothing. */
    if (map_walk(blob, len, NULL, NULL)) return -1;
    return map_walk(blob, len, fn, ud);
}
