/* safetensors reader: see safetensors.h. A shard is
 *   u64 header_len | header_len bytes of JSON | tensor data
 * with each tensor's data_offsets relative to the end of the header. */
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "quant/quant.h"
#include "util/errf.h"

/* A header larger than this is not a tensor table (the real model's largest
 * shard header is well under 1 MB); refusing it bounds the allocation. */
#define ST_MAX_HEADER (64u << 20)

typedef struct {
    char *path;
    const uint8_t *map;
    size_t size;
    bool mapped;               /* ours to munmap (st_open_mem: the caller's) */
} st_shard;

struct st_ckpt {
    st_shard *shards;
    size_t n_shards;
    st_tensor *t;              /* sorted by name */
    size_t n, cap;
};

static const struct { const char *name; st_dtype t; unsigned size; } DTYPES[] = {
    {"F32", ST_F32, 4}, {"F16", ST_F16, 2}, {"BF16", ST_BF16, 2}, {"F8_E4M3", ST_F8_E4M3, 1},
    {"F8_E8M0", ST_F8_E8M0, 1}, {"I8", ST_I8, 1}, {"U8", ST_U8, 1}, {"I32", ST_I32, 4}, {"I64", ST_I64, 8},
};

const char *st_dtype_name(st_dtype t) {
    for (size_t i = 0; i < sizeof DTYPES / sizeof *DTYPES; i++)
        if (DTYPES[i].t == t) return DTYPES[i].name;
    return "?";
}

static int cmp_tensor(const void *a, const void *b) {
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

static char *read_small(const char *path, size_t max, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) { ds4_errf(err, errlen, "%s: %s", path, strerror(errno)); return NULL; }
    char *buf = malloc(max + 1);
    size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
    fclose(f);
    if (!buf) { ds4_errf(err, errlen, "%s: out of memory", path); return NULL; }
    if (n > max) { free(buf); ds4_errf(err, errlen, "%s: larger than %zu bytes", path, max); return NULL; }
    buf[n] = 0;
    return buf;
}

/* A whole JSON number in [0, max] (a dimension or a data offset): cJSON
 * keeps numbers as doubles, and 2.5 or "7" is no size. */
static bool json_uint(const cJSON *x, uint64_t max, uint64_t *out) {
    if (!cJSON_IsNumber(x) || !(x->valuedouble >= 0) || x->valuedouble > (double)max ||
        x->valuedouble != floor(x->valuedouble))
        return false;
    *out = (uint64_t)x->valuedouble;
    return true;
}

/* No control characters: names and dtypes from a header go into one-line
 * messages (and tensor names into the GGUF), so a newline has no place. */
static bool printable(const char *s) { return ds4_one_line(s, strlen(s)); }

/* Append the tensors of shard sh (its bytes in place). */
static int parse_shard(st_ckpt *c, const st_shard *sh, char *err, size_t errlen) {
    const char *path = sh->path;
    const uint8_t *map = sh->map;
    size_t size = sh->size;
    if (size < 8) return ds4_errf(err, errlen, "%s: not a safetensors file (shorter than its 8-byte header length)", path);
    uint64_t hlen;
    memcpy(&hlen, map, 8);
    if (hlen > ST_MAX_HEADER || hlen > size - 8)
        return ds4_errf(err, errlen, "%s: header length %llu exceeds the file (%zu bytes)", path,
                    (unsigned long long)hlen, size);
    const uint8_t *data = map + 8 + hlen;
    uint64_t data_size = size - 8 - hlen;
    cJSON *h = cJSON_ParseWithLength((const char *)map + 8, (size_t)hlen);
    if (!h || !cJSON_IsObject(h)) {
        cJSON_Delete(h);
        return ds4_errf(err, errlen, "%s: header is not a JSON object", path);
    }
    int rc = 0;
    for (cJSON *e = h->child; e && !rc; e = e->next) {
        if (!strcmp(e->string, "__metadata__")) continue;
        if (!printable(e->string)) {
            rc = ds4_errf(err, errlen, "%s: a tensor name holds a control character", path);
            break;
        }
        cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
        cJSON *sh_ = cJSON_GetObjectItemCaseSensitive(e, "shape");
        cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
        if (!cJSON_IsString(dt) || !cJSON_IsArray(sh_) || !cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2) {
            rc = ds4_errf(err, errlen, "%s: tensor %s: malformed header entry", path, e->string);
            break;
        }
        st_tensor t = {0};
        unsigned esize = 0;
        for (size_t i = 0; i < sizeof DTYPES / sizeof *DTYPES; i++)
            if (!strcmp(dt->valuestring, DTYPES[i].name)) { t.dtype = DTYPES[i].t; esize = DTYPES[i].size; }
        if (!esize) {
            rc = ds4_errf(err, errlen, "%s: tensor %s: unsupported dtype %s", path, e->string,
                          printable(dt->valuestring) ? dt->valuestring : "(with a control character)");
            break;
        }
        int nd = cJSON_GetArraySize(sh_);
        if (nd > ST_MAX_DIMS) {
            rc = ds4_errf(err, errlen, "%s: tensor %s: %d dims (at most %d supported)", path, e->string, nd, ST_MAX_DIMS);
            break;
        }
        t.ndim = nd;
        /* Element count with an overflow guard: every factor is checked
         * against the file size before multiplying. */
        uint64_t count = 1;
        for (int i = 0; i < nd; i++) {
            if (!json_uint(cJSON_GetArrayItem(sh_, i), size, &t.shape[i])) {
                rc = ds4_errf(err, errlen, "%s: tensor %s: dimension %d is not a whole number up to the file size",
                              path, e->string, i);
                break;
            }
            if (t.shape[i] && count > size / t.shape[i]) count = UINT64_MAX;
            else count *= t.shape[i];
        }
        if (rc) break;
        uint64_t b, en;
        if (!json_uint(cJSON_GetArrayItem(off, 0), data_size, &b) ||
            !json_uint(cJSON_GetArrayItem(off, 1), data_size, &en) || en < b) {
            rc = ds4_errf(err, errlen, "%s: tensor %s: data_offsets are not [begin, end] within the %llu data bytes",
                          path, e->string, (unsigned long long)data_size);
            break;
        }
        t.nbytes = en - b;
        if (count == UINT64_MAX || count * esize != t.nbytes) {
            rc = ds4_errf(err, errlen, "%s: tensor %s: %llu bytes of data for its shape and dtype %s", path, e->string,
                      (unsigned long long)t.nbytes, dt->valuestring);
            break;
        }
        t.data = data + b;
        t.file = sh->path;
        t.name = strdup(e->string);
        if (!t.name) { rc = ds4_errf(err, errlen, "out of memory"); break; }
        if (c->n == c->cap) {
            size_t nc = c->cap ? 2 * c->cap : 1024;
            st_tensor *nt = realloc(c->t, nc * sizeof *nt);
            if (!nt) { free(t.name); rc = ds4_errf(err, errlen, "out of memory"); break; }
            c->t = nt;
            c->cap = nc;
        }
        c->t[c->n++] = t;
    }
    cJSON_Delete(h);
    return rc;
}

/* Map one shard and append its tensors. */
static int load_shard(st_ckpt *c, const char *path, char *err, size_t errlen) {
    /* The name comes from the index: it may be a directory ("." is a file
     * name there) or a FIFO, whose blocking open would never return. */
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) return ds4_errf(err, errlen, "%s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
        close(fd);
        return ds4_errf(err, errlen, "%s: not a regular file", path);
    }
    if (sb.st_size < 8) {
        close(fd);
        return ds4_errf(err, errlen, "%s: not a safetensors file (shorter than its 8-byte header length)", path);
    }
    size_t size = (size_t)sb.st_size;
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return ds4_errf(err, errlen, "%s: mmap: %s", path, strerror(errno));
    st_shard *sh = &c->shards[c->n_shards++];
    sh->path = strdup(path);
    sh->map = map;
    sh->size = size;
    sh->mapped = true;
    if (!sh->path) return ds4_errf(err, errlen, "out of memory");
    return parse_shard(c, sh, err, errlen);
}

/* Tensors sorted by name; a name twice is an error. */
static int index_tensors(st_ckpt *c, char *err, size_t errlen) {
    if (c->n) qsort(c->t, c->n, sizeof *c->t, cmp_tensor);   /* c->t is NULL without tensors: UB even for 0 */
    for (size_t i = 1; i < c->n; i++)
        if (!strcmp(c->t[i].name, c->t[i - 1].name))
            return ds4_errf(err, errlen, "%s: tensor %s appears twice (also in %s)", c->t[i].file, c->t[i].name,
                            c->t[i - 1].file);
    return 0;
}

st_ckpt *st_open_mem(const uint8_t *buf, size_t len, const char *name, char *err, size_t errlen) {
    st_ckpt *c = calloc(1, sizeof *c);
    if (!c || !(c->shards = calloc(1, sizeof *c->shards)) || !(c->shards[0].path = strdup(name))) {
        ds4_errf(err, errlen, "out of memory");
        st_close(c);
        return NULL;
    }
    c->n_shards = 1;
    c->shards[0].map = buf;
    c->shards[0].size = len;
    if (parse_shard(c, &c->shards[0], err, errlen) || index_tensors(c, err, errlen)) {
        st_close(c);
        return NULL;
    }
    return c;
}

st_ckpt *st_open_dir(const char *dir, char *err, size_t errlen) {
    st_ckpt *c = calloc(1, sizeof *c);
    char path[4096];
    char **files = NULL;
    size_t n_files = 0;
    if (!c) { ds4_errf(err, errlen, "out of memory"); return NULL; }
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (access(path, F_OK) == 0) {
        char *text = read_small(path, ST_MAX_HEADER, err, errlen);
        if (!text) goto bad;
        cJSON *j = cJSON_Parse(text);
        free(text);
        cJSON *wm = j ? cJSON_GetObjectItemCaseSensitive(j, "weight_map") : NULL;
        if (!cJSON_IsObject(wm)) {
            cJSON_Delete(j);
            ds4_errf(err, errlen, "%s: no weight_map object", path);
            goto bad;
        }
        /* The distinct shard names, in first-seen order. */
        int n_entries = cJSON_GetArraySize(wm);
        files = calloc((size_t)n_entries + 1, sizeof *files);
        if (!files) { cJSON_Delete(j); ds4_errf(err, errlen, "out of memory"); goto bad; }
        for (cJSON *e = wm->child; e; e = e->next) {
            if (!cJSON_IsString(e) || strchr(e->valuestring, '/')) {
                cJSON_Delete(j);
                ds4_errf(err, errlen, "%s: weight_map[%s] is not a file name in the directory", path, e->string);
                goto bad;
            }
            bool seen = false;
            for (size_t i = 0; i < n_files && !seen; i++) seen = !strcmp(files[i], e->valuestring);
            if (!seen) files[n_files++] = strdup(e->valuestring);
        }
        cJSON_Delete(j);
    } else {
        files = calloc(1, sizeof *files);
        if (files) files[n_files++] = strdup("model.safetensors");
    }
    if (!files) { ds4_errf(err, errlen, "out of memory"); goto bad; }
    c->shards = calloc(n_files ? n_files : 1, sizeof *c->shards);
    if (!c->shards) { ds4_errf(err, errlen, "out of memory"); goto bad; }
    for (size_t i = 0; i < n_files; i++) {
        if (!files[i]) { ds4_errf(err, errlen, "out of memory"); goto bad; }
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (load_shard(c, path, err, errlen)) goto bad;
    }
    if (index_tensors(c, err, errlen)) goto bad;
    for (size_t i = 0; i < n_files; i++) free(files[i]);
    free(files);
    return c;
bad:
    for (size_t i = 0; files && i < n_files; i++) free(files[i]);
    free(files);
    st_close(c);
    return NULL;
}

void st_close(st_ckpt *c) {
    if (!c) return;
    for (size_t i = 0; i < c->n; i++) free(c->t[i].name);
    for (size_t i = 0; i < c->n_shards; i++) {
        if (c->shards[i].mapped) munmap((void *)c->shards[i].map, c->shards[i].size);
        free(c->shards[i].path);
    }
    free(c->shards);
    free(c->t);
    free(c);
}

size_t st_count(const st_ckpt *c) { return c->n; }
const st_tensor *st_at(const st_ckpt *c, size_t i) { return i < c->n ? &c->t[i] : NULL; }

const st_tensor *st_find(const st_ckpt *c, const char *name) {
    st_tensor key = {.name = (char *)name};
    if (!c->n) return NULL;   /* bsearch's base must not be NULL either */
    return bsearch(&key, c->t, c->n, sizeof *c->t, cmp_tensor);
}

/* ---- decoding ------------------------------------------------------- */

static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* E4M3FN: bias 7, 3 mantissa bits, no infinities; S.1111.111 is NaN. */
static float e4m3_to_f32(uint8_t b) {
    int e = (b >> 3) & 15, m = b & 7;
    float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf((float)m, -9);
    if (e == 15 && m == 7) v = NAN;
    return (b & 0x80) ? -v : v;
}

/* UE8M0: 2^(e-127); 0xFF is NaN. e = 0 gives 2^-127, a float subnormal. */
static float e8m0_to_f32(uint8_t e) { return e == 255 ? NAN : ldexpf(1.0f, (int)e - 127); }

static const float E2M1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

static float scalar(const st_tensor *t, uint64_t i) {
    const uint8_t *p = t->data;
    switch (t->dtype) {
    case ST_F32: { float f; memcpy(&f, p + 4 * i, 4); return f; }
    case ST_F16: { uint16_t h; memcpy(&h, p + 2 * i, 2); return ds4_f16_to_f32(h); }
    case ST_BF16: { uint16_t h; memcpy(&h, p + 2 * i, 2); return bf16_to_f32(h); }
    case ST_F8_E4M3: return e4m3_to_f32(p[i]);
    case ST_F8_E8M0: case ST_U8: return e8m0_to_f32(p[i]);   /* only used for scales */
    default: return NAN;
    }
}

static bool is_scale_dtype(st_dtype t) {
    return t == ST_F8_E8M0 || t == ST_U8 || t == ST_F32 || t == ST_BF16;
}

int st_weight_get(const st_ckpt *c, const char *name, st_weight *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    const st_tensor *w = st_find(c, name);
    if (!w) return ds4_errf(err, errlen, "missing tensor %s", name);
    if (w->ndim < 1 || w->ndim > 2)
        return ds4_errf(err, errlen, "%s: tensor %s has %d dims (1 or 2 expected)", w->file, name, w->ndim);
    const st_tensor *s = NULL;
    size_t len = strlen(name);
    if (len > 7 && !strcmp(name + len - 7, ".weight")) {
        char sname[512];
        snprintf(sname, sizeof sname, "%.*s.scale", (int)(len - 7), name);
        s = st_find(c, sname);
        if (!s) {
            snprintf(sname, sizeof sname, "%s_scale_inv", name);   /* DeepSeek V3 spelling */
            s = st_find(c, sname);
        }
    }
    out->w = w;
    out->scale = s;
    out->rows = w->ndim == 2 ? w->shape[0] : 1;
    out->cols = w->ndim == 2 ? w->shape[1] : w->shape[0];
    switch (w->dtype) {
    case ST_F32: case ST_F16: case ST_BF16:
        if (s) return ds4_errf(err, errlen, "%s: %s is %s but has a scale tensor %s", w->file, name,
                            st_dtype_name(w->dtype), s->name);
        out->kind = ST_W_PLAIN;
        return 0;
    case ST_I32: case ST_I64:
        out->kind = ST_W_INT;
        return 0;
    case ST_F8_E4M3: {
        if (!s) return ds4_errf(err, errlen, "%s: FP8 tensor %s has no .scale tensor", w->file, name);
        uint64_t br = (out->rows + 127) / 128, bc = (out->cols + 127) / 128;
        if (!is_scale_dtype(s->dtype) || s->ndim != 2 || w->ndim != 2 || s->shape[0] != br || s->shape[1] != bc)
            return ds4_errf(err, errlen, "%s: scale of FP8 tensor %s must be [%llu, %llu] (one per 128x128 block)",
                        s->file, name, (unsigned long long)br, (unsigned long long)bc);
        out->kind = ST_W_FP8;
        return 0;
    }
    case ST_I8: case ST_U8: {
        /* Packed FP4: [rows, cols/2] bytes and one scale per 32 inputs. */
        if (!s || w->ndim != 2)
            return ds4_errf(err, errlen, "%s: %s is %s without a .scale (only packed FP4 is supported)", w->file, name,
                        st_dtype_name(w->dtype));
        out->cols = 2 * w->shape[1];
        if (!is_scale_dtype(s->dtype) || s->ndim != 2 || s->shape[0] != out->rows || out->cols % 32 ||
            s->shape[1] != out->cols / 32)
            return ds4_errf(err, errlen, "%s: scale of FP4 tensor %s must be [%llu, %llu] (one per 32 inputs)", s->file,
                        name, (unsigned long long)out->rows, (unsigned long long)(out->cols / 32));
        out->kind = ST_W_FP4;
        return 0;
    }
    default:
        return ds4_errf(err, errlen, "%s: tensor %s has dtype %s, not a weight format", w->file, name,
                    st_dtype_name(w->dtype));
    }
}

uint64_t st_weight_row(const st_weight *w, uint64_t r, float *out) {
    const uint64_t n = w->cols, base = r * n;
    const uint8_t *p = w->w->data;
    switch (w->kind) {
    case ST_W_PLAIN:
        if (w->w->dtype == ST_F32) memcpy(out, p + 4 * base, n * sizeof *out);
        else
            for (uint64_t i = 0; i < n; i++) out[i] = scalar(w->w, base + i);
        break;
    case ST_W_FP8: {
        /* One scale per 128 columns of this row's 128-row block. */
        const uint8_t *q = p + base;
        const uint64_t sb = (r / 128) * w->scale->shape[1];
        for (uint64_t i0 = 0; i0 < n; i0 += 128) {
            const float sc = scalar(w->scale, sb + i0 / 128);
            const uint64_t i1 = i0 + 128 < n ? i0 + 128 : n;
            for (uint64_t i = i0; i < i1; i++) out[i] = e4m3_to_f32(q[i]) * sc;
        }
        break;
    }
    case ST_W_FP4: {
        /* 32 values (16 bytes) per scale; low nibble = even element. */
        const uint8_t *q = p + r * (n / 2);
        const uint64_t sb = r * (n / 32);
        for (uint64_t b = 0; b < n / 32; b++) {
            const float sc = scalar(w->scale, sb + b);
            for (int k = 0; k < 16; k++) {
                const uint8_t byte = q[16 * b + k];
                const float lo = E2M1[byte & 7] * sc, hi = E2M1[(byte >> 4) & 7] * sc;
                out[32 * b + 2 * k] = (byte & 8) ? -lo : lo;
                out[32 * b + 2 * k + 1] = (byte & 0x80) ? -hi : hi;
            }
        }
        break;
    }
    case ST_W_INT:
        for (uint64_t i = 0; i < n; i++) out[i] = (float)st_weight_int(w, base + i);
        break;
    }
    uint64_t bad = 0;
    for (uint64_t i = 0; i < n; i++) bad += !isfinite(out[i]);
    return bad;
}

int64_t st_weight_int(const st_weight *w, uint64_t i) {
    if (w->w->dtype == ST_I64) { int64_t v; memcpy(&v, w->w->data + 8 * i, 8); return v; }
    int32_t v;
    memcpy(&v, w->w->data + 4 * i, 4);
    return v;
}
