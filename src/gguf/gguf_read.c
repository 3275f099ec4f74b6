/* GGUF v3 reader (spec model.md §2.1). The file is mapped read-only and
 * parsed once, front to back, by a cursor that checks every read against the
 * bytes left; everything the getters later touch was validated here, so they
 * never recheck the file. Arrays that grow with parsed entries are doubled as
 * entries arrive, never pre-sized by a count read from the file, so a hostile
 * count costs at most a few bytes of allocation per byte of file. */
#include "gguf/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC 0x46554747u /* "GGUF" read as a little-endian u32 */
#define GGUF_DEFAULT_ALIGN 32
/* Arrays of arrays are legal at any depth; the walk recurses, so it needs a
 * bound. Real files never nest at all. */
#define GGUF_MAX_NEST 8
/* Smallest possible records, used to bound n_kv and n_tensors by the bytes
 * left: a key is a u64 length + at least 1 byte + u32 type + a value of at
 * least 1 byte; a tensor info is a u64 length + 1 byte + u32 n_dims + one u64
 * dim + u32 type + u64 offset. */
#define MIN_KV_BYTES 14u
#define MIN_TENSOR_INFO_BYTES 33u

typedef struct {
    gguf_str name;           /* first member: the name index reads it by stride */
    gguf_vtype type;
    const uint8_t *val;      /* value bytes, right after the type field */
    /* Arrays only. */
    gguf_vtype item_type;
    uint64_t n_items;
    const uint8_t *items;    /* first item */
    uint64_t *item_off;      /* string/array items: byte offset of item j from
                              * items (O(1) access); NULL for fixed-size items */
} kv_entry;

/* Open-addressing hash from a name to its entry index. Slots hold index + 1
 * (0 = empty); the table is at most half full, so probing ends. Names are
 * read from the entries themselves (a gguf_str at base + k * stride). */
typedef struct {
    int64_t *slot;
    uint64_t mask;
    const uint8_t *base;
    size_t stride;
} name_index;

struct gguf_file {
    char *path;
    const uint8_t *base;
    uint64_t size;
    bool mapped;
    uint32_t version, alignment;
    uint64_t data_start;
    int64_t n_kv, n_tensors;
    kv_entry *kv;
    gguf_tensor *tensors;
    name_index kv_index, tensor_index;
};

/* ---- little-endian scalars -------------------------------------------- */

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t le64(const uint8_t *p) { return le32(p) | (uint64_t)le32(p + 4) << 32; }

/* Encoded size of a scalar value type; 0 for string, array and unknown ids. */
static uint64_t scalar_size(uint32_t t) {
    switch (t) {
    case GGUF_U8: case GGUF_I8: case GGUF_BOOL: return 1;
    case GGUF_U16: case GGUF_I16: return 2;
    case GGUF_U32: case GGUF_I32: case GGUF_F32: return 4;
    case GGUF_U64: case GGUF_I64: case GGUF_F64: return 8;
    default: return 0;
    }
}

/* Smallest encoding of one value of type t (a string is at least its length
 * field, an array at least its item type and count). */
static uint64_t min_value_size(uint32_t t) {
    if (t == GGUF_STRING) return 8;
    if (t == GGUF_ARRAY) return 12;
    return scalar_size(t);
}

static const char *vtype_name(uint32_t t) {
    static const char *names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32",
                                  "bool", "string", "array", "u64", "i64", "f64"};
    return t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}

/* Integer value (bool counts as 0/1) at p: 1 = unsigned in *u, 2 = signed in
 * *s, 0 = not an integer type. */
static int int_value(const uint8_t *p, uint32_t t, uint64_t *u, int64_t *s) {
    switch (t) {
    case GGUF_U8: case GGUF_BOOL: *u = p[0]; return 1;
    case GGUF_U16: *u = le16(p); return 1;
    case GGUF_U32: *u = le32(p); return 1;
    case GGUF_U64: *u = le64(p); return 1;
    case GGUF_I8: *s = (int8_t)p[0]; return 2;
    case GGUF_I16: *s = (int16_t)le16(p); return 2;
    case GGUF_I32: *s = (int32_t)le32(p); return 2;
    case GGUF_I64: *s = (int64_t)le64(p); return 2;
    default: return 0;
    }
}

static bool as_u64(const uint8_t *p, uint32_t t, uint64_t *out) {
    uint64_t u; int64_t s;
    switch (int_value(p, t, &u, &s)) {
    case 1: *out = u; return true;
    case 2: if (s < 0) return false; *out = (uint64_t)s; return true;
    default: return false;
    }
}

static bool as_i64(const uint8_t *p, uint32_t t, int64_t *out) {
    uint64_t u; int64_t s;
    switch (int_value(p, t, &u, &s)) {
    case 1: if (u > INT64_MAX) return false; *out = (int64_t)u; return true;
    case 2: *out = s; return true;
    default: return false;
    }
}

static bool as_f64(const uint8_t *p, uint32_t t, double *out) {
    uint64_t u; int64_t s;
    if (t == GGUF_F32) { uint32_t b = le32(p); float v; memcpy(&v, &b, 4); *out = v; return true; }
    if (t == GGUF_F64) { uint64_t b = le64(p); double v; memcpy(&v, &b, 8); *out = v; return true; }
    if (t == GGUF_BOOL) return false; /* a flag is not a number */
    switch (int_value(p, t, &u, &s)) {
    case 1: *out = (double)u; return true;
    case 2: *out = (double)s; return true;
    default: return false;
    }
}

/* ---- name index --------------------------------------------------------- */

static uint64_t hash_bytes(const char *s, uint64_t n) {
    uint64_t h = 0xcbf29ce484222325u; /* FNV-1a */
    for (uint64_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 0x100000001b3u;
    return h;
}

static const gguf_str *index_name(const name_index *ix, int64_t k) {
    return (const gguf_str *)(const void *)(ix->base + (size_t)k * ix->stride);
}

static bool index_init(name_index *ix, int64_t n, const void *base, size_t stride) {
    uint64_t cap = 2;
    while (cap < 2 * (uint64_t)n) cap *= 2;
    ix->slot = calloc(cap, sizeof *ix->slot);
    ix->mask = cap - 1;
    ix->base = base;
    ix->stride = stride;
    return ix->slot != NULL;
}

static int64_t index_find(const name_index *ix, const char *s, uint64_t len) {
    if (!ix->slot) return -1;
    for (uint64_t h = hash_bytes(s, len) & ix->mask;; h = (h + 1) & ix->mask) {
        int64_t v = ix->slot[h];
        if (!v) return -1;
        const gguf_str *n = index_name(ix, v - 1);
        if (n->len == len && memcmp(n->ptr, s, len) == 0) return v - 1;
    }
}

/* Adds entry k; returns -1, or the index of an earlier entry of that name. */
static int64_t index_add(name_index *ix, int64_t k) {
    const gguf_str *name = index_name(ix, k);
    for (uint64_t h = hash_bytes(name->ptr, name->len) & ix->mask;; h = (h + 1) & ix->mask) {
        int64_t v = ix->slot[h];
        if (!v) { ix->slot[h] = k + 1; return -1; }
        const gguf_str *n = index_name(ix, v - 1);
        if (n->len == name->len && memcmp(n->ptr, name->ptr, name->len) == 0) return v - 1;
    }
}

/* ---- parse cursor and errors -------------------------------------------- */

typedef struct {
    const uint8_t *b;
    uint64_t size, pos;
    const char *label;
    char *err;
    size_t errlen;
} cursor;

static void set_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Records "label: offset N: message" and returns false. */
static bool fail_at(cursor *c, uint64_t off, const char *fmt, ...) {
    if (!c->err || !c->errlen) return false;
    int n = snprintf(c->err, c->errlen, "%s: offset %" PRIu64 ": ", c->label, off);
    if (n >= 0 && (size_t)n < c->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err + n, c->errlen - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return false;
}

/* A name from the file, made safe for a one-line message: printable ASCII
 * as is, anything else as \xNN, long names cut. */
#define QUOTE_MAX 48
typedef struct { char s[QUOTE_MAX * 4 + 4]; } quoted;
static quoted quote(gguf_str s) {
    quoted q;
    size_t o = 0;
    for (uint64_t i = 0; i < s.len && i < QUOTE_MAX; i++) {
        uint8_t ch = (uint8_t)s.ptr[i];
        if (ch >= 0x20 && ch < 0x7f && ch != '\\' && ch != '\'') q.s[o++] = (char)ch;
        else o += (size_t)sprintf(q.s + o, "\\x%02x", ch);
    }
    if (s.len > QUOTE_MAX) { memcpy(q.s + o, "...", 3); o += 3; }
    q.s[o] = 0;
    return q;
}

static uint64_t left(const cursor *c) { return c->size - c->pos; }

static bool need(cursor *c, uint64_t n, const char *what) {
    if (left(c) >= n) return true;
    return fail_at(c, c->pos, "file ends inside %s (%" PRIu64 " bytes needed, %" PRIu64 " left)",
                   what, n, left(c));
}

static bool rd_u32(cursor *c, const char *what, uint32_t *v) {
    if (!need(c, 4, what)) return false;
    *v = le32(c->b + c->pos);
    c->pos += 4;
    return true;
}

static bool rd_u64(cursor *c, const char *what, uint64_t *v) {
    if (!need(c, 8, what)) return false;
    *v = le64(c->b + c->pos);
    c->pos += 8;
    return true;
}

static bool rd_str(cursor *c, const char *what, gguf_str *s) {
    uint64_t at = c->pos, len;
    if (!rd_u64(c, what, &len)) return false;
    if (len > left(c))
        return fail_at(c, at, "%s length %" PRIu64 " exceeds the %" PRIu64 " bytes left",
                       what, len, left(c));
    s->ptr = (const char *)c->b + c->pos;
    s->len = len;
    c->pos += len;
    return true;
}

/* Returns p grown to hold n elements of el bytes (doubling), or NULL with p
 * untouched. */
static void *grow(void *p, uint64_t *cap, uint64_t n, size_t el) {
    if (n <= *cap) return p;
    uint64_t nc = *cap ? *cap * 2 : 16;
    if (nc < n) nc = n;
    void *q = realloc(p, nc * el);
    if (q) *cap = nc;
    return q;
}

/* ---- metadata values ------------------------------------------------------ */

static bool skip_value(cursor *c, uint32_t t, int depth, const char *key);

/* Reads an array's item type and count; the count is bounded by the bytes
 * left at its smallest item size, so no later loop or allocation can be
 * driven past the end of the file. depth = nesting level of this array. */
static bool array_head(cursor *c, int depth, const char *key, uint32_t *item, uint64_t *count) {
    uint64_t at = c->pos;
    if (!rd_u32(c, "array item type", item)) return false;
    if (*item > GGUF_F64) return fail_at(c, at, "key '%s': unknown array item type %" PRIu32, key, *item);
    if (*item == GGUF_ARRAY && depth >= GGUF_MAX_NEST)
        return fail_at(c, at, "key '%s': arrays nested deeper than %d levels", key, GGUF_MAX_NEST);
    at = c->pos;
    if (!rd_u64(c, "array length", count)) return false;
    uint64_t min = min_value_size(*item);
    if (*count > left(c) / min)
        return fail_at(c, at, "key '%s': array of %" PRIu64 " %s items cannot fit in the %" PRIu64
                       " bytes left", key, *count, vtype_name(*item), left(c));
    return true;
}

/* Walks count items of type item, validating each. With offs, records each
 * item's position relative to the first (for O(1) element access). */
static bool array_items(cursor *c, uint32_t item, uint64_t count, int depth, const char *key,
                        uint64_t **offs) {
    uint64_t sz = scalar_size(item);
    if (sz && item != GGUF_BOOL) { /* fixed width: the bound above already checked */
        c->pos += count * sz;
        return true;
    }
    uint64_t start = c->pos, cap = 0;
    for (uint64_t j = 0; j < count; j++) {
        if (offs) {
            uint64_t *o = grow(*offs, &cap, j + 1, sizeof *o);
            if (!o) return fail_at(c, c->pos, "key '%s': out of memory indexing %" PRIu64 " items", key, count);
            *offs = o;
            o[j] = c->pos - start;
        }
        if (!skip_value(c, item, depth + 1, key)) return false;
    }
    return true;
}

static bool skip_value(cursor *c, uint32_t t, int depth, const char *key) {
    if (t == GGUF_STRING) {
        gguf_str s;
        return rd_str(c, "string value", &s);
    }
    if (t == GGUF_ARRAY) {
        uint32_t item;
        uint64_t count;
        return array_head(c, depth, key, &item, &count) && array_items(c, item, count, depth, key, NULL);
    }
    if (!need(c, scalar_size(t), "value")) return false;
    /* A bool byte other than 0/1 is corruption, not a truthy value. */
    if (t == GGUF_BOOL && c->b[c->pos] > 1)
        return fail_at(c, c->pos, "key '%s': bool value %u is not 0 or 1", key, c->b[c->pos]);
    c->pos += scalar_size(t);
    return true;
}

static bool parse_kv(cursor *c, kv_entry *e) {
    if (!rd_str(c, "key", &e->name)) return false;
    uint64_t at = c->pos - e->name.len - 8;
    if (e->name.len == 0) return fail_at(c, at, "empty key name");
    quoted q = quote(e->name);
    uint32_t t;
    at = c->pos;
    if (!rd_u32(c, "value type", &t)) return false;
    if (t > GGUF_F64) return fail_at(c, at, "key '%s': unknown value type %" PRIu32, q.s, t);
    e->type = (gguf_vtype)t;
    e->val = c->b + c->pos;
    if (t != GGUF_ARRAY) return skip_value(c, t, 0, q.s);
    uint32_t item;
    if (!array_head(c, 1, q.s, &item, &e->n_items)) return false;
    e->item_type = (gguf_vtype)item;
    e->items = c->b + c->pos;
    bool variable = item == GGUF_STRING || item == GGUF_ARRAY;
    return array_items(c, item, e->n_items, 1, q.s, variable ? &e->item_off : NULL);
}

/* general.alignment decides where tensor data may start, so it is checked
 * as soon as it is read. */
static bool apply_alignment(cursor *c, const kv_entry *e, uint32_t *align) {
    uint64_t at = (uint64_t)(e->val - c->b), v;
    if (!as_u64(e->val, e->type, &v) || e->type == GGUF_BOOL)
        return fail_at(c, at, "general.alignment must be an unsigned integer, not %s", vtype_name(e->type));
    if (v == 0 || (v & (v - 1)) || v > UINT32_MAX)
        return fail_at(c, at, "general.alignment %" PRIu64 " is not a nonzero power of two below 2^32", v);
    *align = (uint32_t)v;
    return true;
}

/* ---- tensors ---------------------------------------------------------------- */

/* File positions of a tensor info's name and offset fields, for errors
 * found after the info was read. */
typedef struct { uint64_t name_at, offset_at; } tensor_where;

static bool parse_tensor(cursor *c, uint32_t align, gguf_tensor *t, tensor_where *w) {
    uint64_t at = c->pos;
    w->name_at = at;
    if (!rd_str(c, "tensor name", &t->name)) return false;
    if (t->name.len == 0) return fail_at(c, at, "empty tensor name");
    quoted q = quote(t->name);
    at = c->pos;
    if (!rd_u32(c, "tensor n_dims", &t->n_dims)) return false;
    if (t->n_dims == 0 || t->n_dims > GGUF_MAX_DIMS)
        return fail_at(c, at, "tensor '%s': n_dims %" PRIu32 " is not in 1..%d", q.s, t->n_dims, GGUF_MAX_DIMS);
    uint64_t dims_at = c->pos, elems = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->dims[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        at = c->pos;
        if (!rd_u64(c, "tensor dims", &t->dims[d])) return false;
        if (t->dims[d] == 0) return fail_at(c, at, "tensor '%s': dims[%" PRIu32 "] is zero", q.s, d);
        if (elems > UINT64_MAX / t->dims[d])
            return fail_at(c, at, "tensor '%s': element count overflows 64 bits at dims[%" PRIu32 "]", q.s, d);
        elems *= t->dims[d];
    }
    uint32_t type;
    at = c->pos;
    if (!rd_u32(c, "tensor type", &type)) return false;
    uint32_t be = ggml_block_elems(type), bb = ggml_block_bytes(type);
    if (!be) return fail_at(c, at, "tensor '%s': unknown ggml type %" PRIu32, q.s, type);
    t->type = (ggml_type)type;
    if (t->dims[0] % be)
        return fail_at(c, dims_at, "tensor '%s': dims[0] %" PRIu64 " is not a multiple of the %s block (%" PRIu32 ")",
                       q.s, t->dims[0], ggml_type_name(type), be);
    if (elems / be > UINT64_MAX / bb)
        return fail_at(c, at, "tensor '%s': byte size overflows 64 bits", q.s);
    t->nbytes = elems / be * bb;
    w->offset_at = c->pos;
    if (!rd_u64(c, "tensor offset", &t->offset)) return false;
    if (t->offset % align)
        return fail_at(c, w->offset_at, "tensor '%s': data offset %" PRIu64 " is not a multiple of the alignment %" PRIu32,
                       q.s, t->offset, align);
    return true;
}

typedef struct { uint64_t offset; int64_t i; } tensor_pos;

static int cmp_pos(const void *a, const void *b) {
    const tensor_pos *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

/* Data ranges: inside the file, and pairwise disjoint (checked on the ranges
 * sorted by offset, where only neighbours can overlap first). */
static bool check_tensor_data(cursor *c, gguf_file *f, const tensor_where *where) {
    uint64_t data_size = f->size > f->data_start ? f->size - f->data_start : 0;
    for (int64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        if (t->offset > data_size || t->nbytes > data_size - t->offset)
            return fail_at(c, where[i].offset_at, "tensor '%s': data (%" PRIu64 " bytes at data offset %" PRIu64
                           ") runs past the end of the file (data section holds %" PRIu64 " bytes)",
                           quote(t->name).s, t->nbytes, t->offset, data_size);
    }
    if (f->n_tensors < 2) return true;
    tensor_pos *p = malloc((size_t)f->n_tensors * sizeof *p);
    if (!p) return fail_at(c, c->pos, "out of memory checking tensor overlap");
    for (int64_t i = 0; i < f->n_tensors; i++) p[i] = (tensor_pos){f->tensors[i].offset, i};
    qsort(p, (size_t)f->n_tensors, sizeof *p, cmp_pos);
    bool ok = true;
    for (int64_t k = 1; k < f->n_tensors && ok; k++) {
        const gguf_tensor *a = &f->tensors[p[k - 1].i], *b = &f->tensors[p[k].i];
        if (a->offset + a->nbytes > b->offset) /* both in bounds: no overflow */
            ok = fail_at(c, where[p[k].i].offset_at, "tensor '%s': data overlaps tensor '%s'",
                         quote(b->name).s, quote(a->name).s);
    }
    free(p);
    return ok;
}

/* ---- open / close ------------------------------------------------------------ */

static bool parse(cursor *c, gguf_file *f) {
    uint32_t magic;
    if (!rd_u32(c, "magic", &magic)) return false;
    if (magic != GGUF_MAGIC)
        return fail_at(c, 0, "bad magic 0x%08" PRIx32 " (not a GGUF file)", magic);
    if (!rd_u32(c, "version", &f->version)) return false;
    if (f->version != 3) return fail_at(c, 4, "unsupported GGUF version %" PRIu32 " (only 3 is supported)", f->version);
    uint64_t n_tensors, n_kv;
    if (!rd_u64(c, "n_tensors", &n_tensors) || !rd_u64(c, "n_kv", &n_kv)) return false;
    if (n_tensors > left(c) / MIN_TENSOR_INFO_BYTES)
        return fail_at(c, 8, "n_tensors %" PRIu64 " cannot fit in the %" PRIu64 " bytes left", n_tensors, left(c));
    if (n_kv > (left(c) - n_tensors * MIN_TENSOR_INFO_BYTES) / MIN_KV_BYTES)
        return fail_at(c, 16, "n_kv %" PRIu64 " cannot fit in the %" PRIu64 " bytes left", n_kv, left(c));

    uint64_t cap = 0;
    f->alignment = GGUF_DEFAULT_ALIGN;
    for (uint64_t i = 0; i < n_kv; i++) {
        kv_entry *kv = grow(f->kv, &cap, i + 1, sizeof *kv);
        if (!kv) return fail_at(c, c->pos, "out of memory");
        f->kv = kv;
        kv_entry *e = &kv[i];
        memset(e, 0, sizeof *e);
        f->n_kv = (int64_t)i + 1; /* counted before parsing so close() frees item_off */
        if (!parse_kv(c, e)) return false;
        if (gguf_str_eq(e->name, "general.alignment") && !apply_alignment(c, e, &f->alignment)) return false;
    }
    if (!index_init(&f->kv_index, f->n_kv, f->kv, sizeof *f->kv)) return fail_at(c, c->pos, "out of memory");
    for (int64_t i = 0; i < f->n_kv; i++)
        if (index_add(&f->kv_index, i) >= 0)
            return fail_at(c, (uint64_t)((const uint8_t *)f->kv[i].name.ptr - c->b) - 8,
                           "duplicate key '%s'", quote(f->kv[i].name).s);

    /* Tensor infos; where each name and offset field sits is kept for errors. */
    uint64_t tcap = 0, wcap = 0;
    tensor_where *where = NULL;
    bool ok = true;
    for (uint64_t i = 0; i < n_tensors && ok; i++) {
        gguf_tensor *t = grow(f->tensors, &tcap, i + 1, sizeof *t);
        if (t) f->tensors = t;
        tensor_where *w = grow(where, &wcap, i + 1, sizeof *w);
        if (w) where = w;
        if (!t || !w) {
            ok = fail_at(c, c->pos, "out of memory");
            break;
        }
        memset(&t[i], 0, sizeof t[i]);
        ok = parse_tensor(c, f->alignment, &t[i], &w[i]);
        f->n_tensors = (int64_t)i + 1;
    }
    if (ok && !index_init(&f->tensor_index, f->n_tensors, f->tensors, sizeof *f->tensors))
        ok = fail_at(c, c->pos, "out of memory");
    for (int64_t i = 0; ok && i < f->n_tensors; i++)
        if (index_add(&f->tensor_index, i) >= 0)
            ok = fail_at(c, where[i].name_at, "duplicate tensor name '%s'", quote(f->tensors[i].name).s);
    if (ok) {
        /* Data starts at the next multiple of the alignment (no overflow:
         * pos <= size and alignment < 2^32). */
        f->data_start = (c->pos + f->alignment - 1) / f->alignment * f->alignment;
        ok = check_tensor_data(c, f, where);
    }
    for (int64_t i = 0; ok && i < f->n_tensors; i++)
        f->tensors[i].data = c->b + f->data_start + f->tensors[i].offset;
    free(where);
    return ok;
}

gguf_file *gguf_open_mem(const void *buf, size_t len, const char *label, char *err, size_t errlen) {
    static const uint8_t empty[1];
    if (err && errlen) err[0] = 0;
    gguf_file *f = calloc(1, sizeof *f);
    char *path = strdup(label ? label : "(memory)");
    if (!f || !path) {
        free(f);
        free(path);
        set_err(err, errlen, "%s: out of memory", label ? label : "(memory)");
        return NULL;
    }
    f->path = path;
    f->base = len ? buf : empty; /* never NULL, so pointer arithmetic stays defined */
    f->size = len;
    cursor c = {f->base, len, 0, path, err, errlen};
    if (!parse(&c, f)) {
        gguf_close(f);
        return NULL;
    }
    return f;
}

gguf_file *gguf_open(const char *path, char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        set_err(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        set_err(err, errlen, "%s: not a regular file", path);
        close(fd);
        return NULL;
    }
    size_t size = (size_t)st.st_size;
    void *map = NULL;
    if (size) {
        map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) {
            set_err(err, errlen, "%s: mmap: %s", path, strerror(errno));
            close(fd);
            return NULL;
        }
    }
    close(fd); /* the mapping keeps the file */
    gguf_file *f = gguf_open_mem(map, size, path, err, errlen);
    if (!f) {
        if (map) munmap(map, size);
        return NULL;
    }
    f->mapped = map != NULL;
    return f;
}

void gguf_close(gguf_file *f) {
    if (!f) return;
    for (int64_t i = 0; i < f->n_kv; i++) free(f->kv[i].item_off);
    free(f->kv);
    free(f->tensors);
    free(f->kv_index.slot);
    free(f->tensor_index.slot);
    if (f->mapped) munmap((void *)f->base, f->size);
    free(f->path);
    free(f);
}

/* ---- getters ------------------------------------------------------------------ */

const char *gguf_path(const gguf_file *f) { return f->path; }
uint64_t gguf_file_size(const gguf_file *f) { return f->size; }
uint32_t gguf_version(const gguf_file *f) { return f->version; }
uint32_t gguf_alignment(const gguf_file *f) { return f->alignment; }
const void *gguf_base(const gguf_file *f) { return f->base; }
int64_t gguf_n_kv(const gguf_file *f) { return f->n_kv; }

int64_t gguf_find_key(const gguf_file *f, const char *key) {
    return index_find(&f->kv_index, key, strlen(key));
}

static const kv_entry *kv_at(const gguf_file *f, int64_t i) {
    return i >= 0 && i < f->n_kv ? &f->kv[i] : NULL;
}

gguf_str gguf_key_name(const gguf_file *f, int64_t i) {
    const kv_entry *e = kv_at(f, i);
    return e ? e->name : (gguf_str){NULL, 0};
}

gguf_vtype gguf_kv_type(const gguf_file *f, int64_t i) {
    const kv_entry *e = kv_at(f, i);
    return e ? e->type : GGUF_TYPE_INVALID;
}

bool gguf_get_u64(const gguf_file *f, int64_t i, uint64_t *out) {
    const kv_entry *e = kv_at(f, i);
    return e && as_u64(e->val, e->type, out);
}

bool gguf_get_i64(const gguf_file *f, int64_t i, int64_t *out) {
    const kv_entry *e = kv_at(f, i);
    return e && as_i64(e->val, e->type, out);
}

bool gguf_get_f64(const gguf_file *f, int64_t i, double *out) {
    const kv_entry *e = kv_at(f, i);
    return e && as_f64(e->val, e->type, out);
}

bool gguf_get_bool(const gguf_file *f, int64_t i, bool *out) {
    const kv_entry *e = kv_at(f, i);
    if (!e || e->type != GGUF_BOOL) return false;
    *out = e->val[0] != 0;
    return true;
}

bool gguf_get_str(const gguf_file *f, int64_t i, gguf_str *out) {
    const kv_entry *e = kv_at(f, i);
    if (!e || e->type != GGUF_STRING) return false;
    out->len = le64(e->val);
    out->ptr = (const char *)e->val + 8;
    return true;
}

static const kv_entry *arr_at(const gguf_file *f, int64_t i) {
    const kv_entry *e = kv_at(f, i);
    return e && e->type == GGUF_ARRAY ? e : NULL;
}

gguf_vtype gguf_arr_type(const gguf_file *f, int64_t i) {
    const kv_entry *e = arr_at(f, i);
    return e ? e->item_type : GGUF_TYPE_INVALID;
}

uint64_t gguf_arr_len(const gguf_file *f, int64_t i) {
    const kv_entry *e = arr_at(f, i);
    return e ? e->n_items : 0;
}

/* Element j of a fixed-width array, or NULL. */
static const uint8_t *arr_fixed(const gguf_file *f, int64_t i, uint64_t j, uint32_t *type) {
    const kv_entry *e = arr_at(f, i);
    if (!e || j >= e->n_items || e->item_off) return NULL;
    *type = e->item_type;
    return e->items + j * scalar_size(e->item_type);
}

bool gguf_arr_get_i64(const gguf_file *f, int64_t i, uint64_t j, int64_t *out) {
    uint32_t t;
    const uint8_t *p = arr_fixed(f, i, j, &t);
    return p && as_i64(p, t, out);
}

bool gguf_arr_get_f64(const gguf_file *f, int64_t i, uint64_t j, double *out) {
    uint32_t t;
    const uint8_t *p = arr_fixed(f, i, j, &t);
    return p && as_f64(p, t, out);
}

bool gguf_arr_get_str(const gguf_file *f, int64_t i, uint64_t j, gguf_str *out) {
    const kv_entry *e = arr_at(f, i);
    if (!e || e->item_type != GGUF_STRING || j >= e->n_items) return false;
    const uint8_t *p = e->items + e->item_off[j];
    out->len = le64(p);
    out->ptr = (const char *)p + 8;
    return true;
}

bool gguf_arr_get_arr(const gguf_file *f, int64_t i, uint64_t j, gguf_vtype *type, uint64_t *len) {
    const kv_entry *e = arr_at(f, i);
    if (!e || e->item_type != GGUF_ARRAY || j >= e->n_items) return false;
    const uint8_t *p = e->items + e->item_off[j];
    *type = (gguf_vtype)le32(p);
    *len = le64(p + 4);
    return true;
}

bool gguf_key_u64(const gguf_file *f, const char *key, uint64_t *out) {
    return gguf_get_u64(f, gguf_find_key(f, key), out);
}

bool gguf_key_f64(const gguf_file *f, const char *key, double *out) {
    return gguf_get_f64(f, gguf_find_key(f, key), out);
}

bool gguf_key_str(const gguf_file *f, const char *key, gguf_str *out) {
    return gguf_get_str(f, gguf_find_key(f, key), out);
}

bool gguf_str_eq(gguf_str s, const char *c) {
    size_t n = strlen(c);
    return s.len == n && (n == 0 || memcmp(s.ptr, c, n) == 0);
}

int64_t gguf_n_tensors(const gguf_file *f) { return f->n_tensors; }

const gguf_tensor *gguf_tensor_at(const gguf_file *f, int64_t i) {
    return i >= 0 && i < f->n_tensors ? &f->tensors[i] : NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name) {
    return gguf_tensor_at(f, index_find(&f->tensor_index, name, strlen(name)));
}
