/* GGUF v3 writer. Metadata is serialised into one growing buffer as it is
 * set (keys keep their order); tensors are described up front, so begin()
 * knows every offset, writes the whole header in one go and pre-sizes the
 * file. Tensor bytes then go straight to their final place with pwrite(),
 * from any number of threads, and per-tensor atomic byte counts let finish()
 * prove that nothing was left as the zeros ftruncate() put there. */
#include "gguf/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define GGUF_MAGIC 0x46554747u
#define GGUF_DEFAULT_ALIGN 32

typedef struct { uint8_t *p; size_t len, cap; } buf;

typedef struct {
    char *name;
    ggml_type type;
    uint32_t n_dims;
    uint64_t dims[GGUF_MAX_DIMS];
    uint64_t nbytes;
    uint64_t offset; /* relative to the data section; set by begin() */
} wtensor;

struct gguf_writer {
    uint32_t alignment;
    buf kv;           /* serialised key/value records, in order */
    char **keys;      /* key names, for the duplicate check */
    uint64_t n_kv, keys_cap;
    wtensor *t;
    int64_t n_t, t_cap;
    /* After begin(). */
    int fd;
    char *path;
    _Atomic uint64_t *written; /* bytes written per tensor */
    uint64_t data_start;
    /* First error, kept until begin()/finish() report it. */
    pthread_mutex_t mu;
    char err[512];
};

static void wfail(gguf_writer *w, const char *fmt, ...) {
    pthread_mutex_lock(&w->mu);
    if (!w->err[0]) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(w->err, sizeof w->err, fmt, ap);
        va_end(ap);
    }
    pthread_mutex_unlock(&w->mu);
}

static bool buf_add(gguf_writer *w, buf *b, const void *p, size_t n) {
    if (n > b->cap - b->len) {
        size_t nc = b->cap ? b->cap : 256;
        while (nc - b->len < n) {
            if (nc > SIZE_MAX / 2) { wfail(w, "out of memory"); return false; }
            nc *= 2;
        }
        uint8_t *q = realloc(b->p, nc);
        if (!q) { wfail(w, "out of memory (metadata of %zu bytes)", nc); return false; }
        b->p = q;
        b->cap = nc;
    }
    if (n) memcpy(b->p + b->len, p, n);
    b->len += n;
    return true;
}

/* Little-endian encoders. */
static bool put_u32(gguf_writer *w, buf *b, uint32_t v) {
    uint8_t e[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    return buf_add(w, b, e, 4);
}
static bool put_u64(gguf_writer *w, buf *b, uint64_t v) {
    return put_u32(w, b, (uint32_t)v) && put_u32(w, b, (uint32_t)(v >> 32));
}
static bool put_str(gguf_writer *w, buf *b, const char *s, uint64_t n) {
    return put_u64(w, b, n) && buf_add(w, b, s, n);
}

gguf_writer *gguf_writer_new(uint32_t alignment) {
    gguf_writer *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->fd = -1;
    pthread_mutex_init(&w->mu, NULL);
    w->alignment = alignment ? alignment : GGUF_DEFAULT_ALIGN;
    if (w->alignment & (w->alignment - 1))
        wfail(w, "alignment %" PRIu32 " is not a power of two", alignment);
    else if (w->alignment != GGUF_DEFAULT_ALIGN)
        gguf_set_u32(w, "general.alignment", w->alignment); /* readers assume 32 otherwise */
    return w;
}

void gguf_writer_free(gguf_writer *w) {
    if (!w) return;
    if (w->fd >= 0) { /* begun, never finished: do not leave a plausible-looking file */
        close(w->fd);
        unlink(w->path);
    }
    free(w->kv.p);
    for (uint64_t i = 0; i < w->n_kv; i++) free(w->keys[i]);
    free(w->keys);
    for (int64_t i = 0; i < w->n_t; i++) free(w->t[i].name);
    free(w->t);
    free(w->written);
    free(w->path);
    pthread_mutex_destroy(&w->mu);
    free(w);
}

/* Starts a record: key string and value type. */
static bool kv_begin(gguf_writer *w, const char *key, gguf_vtype type) {
    if (w->path) { wfail(w, "key '%s' set after gguf_writer_begin", key); return false; }
    if (!*key) { wfail(w, "empty key name"); return false; }
    if (w->n_kv == w->keys_cap) {
        uint64_t nc = w->keys_cap ? w->keys_cap * 2 : 32;
        char **k = realloc(w->keys, nc * sizeof *k);
        if (!k) { wfail(w, "out of memory"); return false; }
        w->keys = k;
        w->keys_cap = nc;
    }
    char *copy = strdup(key);
    if (!copy) { wfail(w, "out of memory"); return false; }
    w->keys[w->n_kv++] = copy;
    return put_str(w, &w->kv, key, strlen(key)) && put_u32(w, &w->kv, (uint32_t)type);
}

void gguf_set_u32(gguf_writer *w, const char *key, uint32_t v) {
    if (kv_begin(w, key, GGUF_U32)) put_u32(w, &w->kv, v);
}

void gguf_set_i32(gguf_writer *w, const char *key, int32_t v) {
    if (kv_begin(w, key, GGUF_I32)) put_u32(w, &w->kv, (uint32_t)v);
}

void gguf_set_u64(gguf_writer *w, const char *key, uint64_t v) {
    if (kv_begin(w, key, GGUF_U64)) put_u64(w, &w->kv, v);
}

static uint32_t f32_bits(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return b;
}

void gguf_set_f32(gguf_writer *w, const char *key, float v) {
    if (kv_begin(w, key, GGUF_F32)) put_u32(w, &w->kv, f32_bits(v));
}

void gguf_set_bool(gguf_writer *w, const char *key, bool v) {
    uint8_t b = v;
    if (kv_begin(w, key, GGUF_BOOL)) buf_add(w, &w->kv, &b, 1);
}

void gguf_set_str(gguf_writer *w, const char *key, const char *v) {
    if (kv_begin(w, key, GGUF_STRING)) put_str(w, &w->kv, v, strlen(v));
}

static bool arr_head(gguf_writer *w, const char *key, gguf_vtype item, uint64_t n) {
    return kv_begin(w, key, GGUF_ARRAY) && put_u32(w, &w->kv, (uint32_t)item) && put_u64(w, &w->kv, n);
}

void gguf_set_arr_i32(gguf_writer *w, const char *key, const int32_t *v, uint64_t n) {
    if (!arr_head(w, key, GGUF_I32, n)) return;
    for (uint64_t j = 0; j < n; j++)
        if (!put_u32(w, &w->kv, (uint32_t)v[j])) return;
}

void gguf_set_arr_f32(gguf_writer *w, const char *key, const float *v, uint64_t n) {
    if (!arr_head(w, key, GGUF_F32, n)) return;
    for (uint64_t j = 0; j < n; j++)
        if (!put_u32(w, &w->kv, f32_bits(v[j]))) return;
}

void gguf_set_arr_str(gguf_writer *w, const char *key, const char *const *v, const uint64_t *lens, uint64_t n) {
    if (!arr_head(w, key, GGUF_STRING, n)) return;
    for (uint64_t j = 0; j < n; j++)
        if (!put_str(w, &w->kv, v[j], lens ? lens[j] : strlen(v[j]))) return;
}

void gguf_set_raw(gguf_writer *w, const char *key, gguf_vtype type, const void *bytes, uint64_t nbytes) {
    if (kv_begin(w, key, type)) buf_add(w, &w->kv, bytes, nbytes);
}

int64_t gguf_add_tensor(gguf_writer *w, const char *name, ggml_type type, uint32_t n_dims, const uint64_t *dims) {
    if (w->path) { wfail(w, "tensor '%s' added after gguf_writer_begin", name); return -1; }
    uint32_t be = ggml_block_elems(type), bb = ggml_block_bytes(type);
    if (!*name) { wfail(w, "empty tensor name"); return -1; }
    if (!be) { wfail(w, "tensor '%s': unknown ggml type %d", name, (int)type); return -1; }
    if (n_dims == 0 || n_dims > GGUF_MAX_DIMS) {
        wfail(w, "tensor '%s': n_dims %" PRIu32 " is not in 1..%d", name, n_dims, GGUF_MAX_DIMS);
        return -1;
    }
    uint64_t elems = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        if (dims[d] == 0) { wfail(w, "tensor '%s': dims[%" PRIu32 "] is zero", name, d); return -1; }
        if (elems > UINT64_MAX / dims[d]) { wfail(w, "tensor '%s': element count overflows", name); return -1; }
        elems *= dims[d];
    }
    if (dims[0] % be) {
        wfail(w, "tensor '%s': dims[0] %" PRIu64 " is not a multiple of the %s block (%" PRIu32 ")",
              name, dims[0], ggml_type_name(type), be);
        return -1;
    }
    if (elems / be > UINT64_MAX / bb) { wfail(w, "tensor '%s': byte size overflows", name); return -1; }
    if (w->n_t == w->t_cap) {
        int64_t nc = w->t_cap ? w->t_cap * 2 : 64;
        wtensor *t = realloc(w->t, (size_t)nc * sizeof *t);
        if (!t) { wfail(w, "out of memory"); return -1; }
        w->t = t;
        w->t_cap = nc;
    }
    wtensor *t = &w->t[w->n_t];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name))) { wfail(w, "out of memory"); return -1; }
    t->type = type;
    t->n_dims = n_dims;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->dims[d] = d < n_dims ? dims[d] : 1;
    t->nbytes = elems / be * bb;
    return w->n_t++;
}

uint64_t gguf_writer_tensor_bytes(const gguf_writer *w, int64_t i) {
    return i >= 0 && i < w->n_t ? w->t[i].nbytes : 0;
}

const char *gguf_writer_error(const gguf_writer *w) {
    return w->err[0] ? w->err : NULL;
}

static int cmp_name(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static const char *key_name(const gguf_writer *w, uint64_t i) { return w->keys[i]; }
static const char *tensor_name(const gguf_writer *w, uint64_t i) { return w->t[i].name; }

/* The first name (in sorted order) occurring twice among name(w, 0..n-1),
 * or NULL. O(n log n): the real file has 1328 tensors. */
static const char *find_duplicate(gguf_writer *w, uint64_t n, const char *(*name)(const gguf_writer *, uint64_t)) {
    if (n < 2) return NULL;
    const char **s = malloc(n * sizeof *s);
    if (!s) { wfail(w, "out of memory"); return NULL; }
    for (uint64_t i = 0; i < n; i++) s[i] = name(w, i);
    qsort(s, n, sizeof *s, cmp_name);
    const char *dup = NULL;
    for (uint64_t i = 1; i < n && !dup; i++)
        if (strcmp(s[i - 1], s[i]) == 0) dup = s[i];
    free(s);
    return dup;
}

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

static int write_all(int fd, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Header image: fixed fields, metadata, tensor infos, zero padding to the
 * data section. Also assigns every tensor's offset; *total gets the final
 * file size. */
static bool build_header(gguf_writer *w, buf *h, uint64_t *total) {
    /* Sizes are kept below 2^62 so offsets, padding and off_t never wrap. */
    const uint64_t limit = (uint64_t)1 << 62;
    uint64_t off = 0;
    for (int64_t i = 0; i < w->n_t; i++) {
        off = align_up(off, w->alignment);
        w->t[i].offset = off;
        if (w->t[i].nbytes > limit - off) { wfail(w, "total tensor size exceeds 2^62 bytes"); return false; }
        off += w->t[i].nbytes;
    }
    if (!put_u32(w, h, GGUF_MAGIC) || !put_u32(w, h, 3) || !put_u64(w, h, (uint64_t)w->n_t) ||
        !put_u64(w, h, w->n_kv) || !buf_add(w, h, w->kv.p, w->kv.len))
        return false;
    for (int64_t i = 0; i < w->n_t; i++) {
        const wtensor *t = &w->t[i];
        if (!put_str(w, h, t->name, strlen(t->name)) || !put_u32(w, h, t->n_dims)) return false;
        for (uint32_t d = 0; d < t->n_dims; d++)
            if (!put_u64(w, h, t->dims[d])) return false;
        if (!put_u32(w, h, (uint32_t)t->type) || !put_u64(w, h, t->offset)) return false;
    }
    w->data_start = align_up(h->len, w->alignment);
    static const uint8_t zeros[64];
    while (h->len < w->data_start) {
        size_t n = w->data_start - h->len;
        if (!buf_add(w, h, zeros, n < sizeof zeros ? n : sizeof zeros)) return false;
    }
    *total = w->data_start + off;
    return true;
}

int gguf_writer_begin(gguf_writer *w, const char *path, char *err, size_t errlen) {
    if (w->path) {
        snprintf(err, errlen, "%s: gguf_writer_begin called twice", path);
        return -1;
    }
    const char *dup = find_duplicate(w, w->n_kv, key_name);
    if (dup) wfail(w, "duplicate key '%s'", dup);
    dup = find_duplicate(w, (uint64_t)w->n_t, tensor_name);
    if (dup) wfail(w, "duplicate tensor name '%s'", dup);
    buf h = {0};
    uint64_t total = 0;
    if (!w->err[0]) build_header(w, &h, &total);
    if (!w->err[0] && !(w->written = calloc((size_t)w->n_t + 1, sizeof *w->written)))
        wfail(w, "out of memory");
    if (w->err[0]) {
        snprintf(err, errlen, "%s: %s", path, w->err);
        free(h.p);
        return -1;
    }
    w->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        snprintf(err, errlen, "%s: cannot create: %s", path, strerror(errno));
        free(h.p);
        return -1;
    }
    if (!(w->path = strdup(path))) {
        snprintf(err, errlen, "%s: out of memory", path);
    } else if (write_all(w->fd, h.p, h.len) != 0) {
        snprintf(err, errlen, "%s: writing the header: %s", path, strerror(errno));
    } else if (ftruncate(w->fd, (off_t)total) != 0) { /* pre-size: tensor writes never extend it */
        snprintf(err, errlen, "%s: cannot size the file to %" PRIu64 " bytes: %s", path, total, strerror(errno));
    } else {
        free(h.p);
        return 0;
    }
    free(h.p);
    close(w->fd);
    w->fd = -1;
    unlink(path);
    return -1;
}

int gguf_writer_write_tensor(gguf_writer *w, int64_t i, uint64_t off, const void *data, uint64_t n) {
    if (w->fd < 0) { wfail(w, "gguf_writer_write_tensor before gguf_writer_begin"); return -1; }
    if (i < 0 || i >= w->n_t) { wfail(w, "tensor index %" PRId64 " out of range", i); return -1; }
    const wtensor *t = &w->t[i];
    if (off > t->nbytes || n > t->nbytes - off) {
        wfail(w, "tensor '%s': write of %" PRIu64 " bytes at %" PRIu64 " exceeds its %" PRIu64 " bytes",
              t->name, n, off, t->nbytes);
        return -1;
    }
    const uint8_t *p = data;
    uint64_t pos = w->data_start + t->offset + off, done = 0;
    while (done < n) {
        ssize_t k = pwrite(w->fd, p + done, (size_t)(n - done), (off_t)(pos + done));
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {
            wfail(w, "tensor '%s': write failed: %s", t->name, k < 0 ? strerror(errno) : "no progress");
            return -1;
        }
        done += (uint64_t)k;
    }
    atomic_fetch_add(&w->written[i], n);
    return 0;
}

int gguf_writer_finish(gguf_writer *w, char *err, size_t errlen) {
    if (w->fd < 0) {
        snprintf(err, errlen, "gguf_writer_finish without a successful gguf_writer_begin");
        return -1;
    }
    /* A count other than nbytes means a range was skipped or written twice. */
    for (int64_t i = 0; i < w->n_t && !w->err[0]; i++) {
        uint64_t got = atomic_load(&w->written[i]);
        if (got != w->t[i].nbytes)
            wfail(w, "tensor '%s': %" PRIu64 " of %" PRIu64 " bytes written", w->t[i].name, got, w->t[i].nbytes);
    }
    if (!w->err[0] && fsync(w->fd) != 0) wfail(w, "fsync: %s", strerror(errno));
    if (close(w->fd) != 0) wfail(w, "close: %s", strerror(errno));
    w->fd = -1;
    if (w->err[0]) {
        snprintf(err, errlen, "%s: %s", w->path, w->err);
        unlink(w->path);
        return -1;
    }
    return 0;
}
