/* libFuzzer harness for the GGUF reader: any input either opens or fails
 * with a one-line "fuzz: offset N: ..." message; an opened file is walked
 * through every getter, touching every string and the first and last byte
 * of every tensor, so ASan sees any range the reader validated wrongly
 * (libFuzzer's input buffer is exactly `size` bytes). Invariants that must
 * hold for every valid file are checked with abort(). */
#include "gguf/gguf.h"

#include <stdlib.h>
#include <string.h>

static volatile uint64_t sink; /* keeps the reads from being optimised away */

static void touch(const void *p, uint64_t n) {
    const uint8_t *b = p;
    if (n) sink += b[0] + b[n - 1];
}

/* Name lookups must find exactly what iteration finds (when the name has no
 * NUL, which a C-string lookup cannot express). */
static void check_lookup(gguf_str name, int64_t i, int64_t (*find)(const gguf_file *, const char *),
                         const gguf_file *f) {
    if (memchr(name.ptr, 0, name.len)) return;
    char *c = malloc(name.len + 1);
    if (!c) return;
    memcpy(c, name.ptr, name.len);
    c[name.len] = 0;
    if (find(f, c) != i) abort();
    free(c);
}

static int64_t find_tensor_index(const gguf_file *f, const char *name) {
    const gguf_tensor *t = gguf_find_tensor(f, name);
    return t ? t - gguf_tensor_at(f, 0) : -1;
}

static void walk_kv(const gguf_file *f, int64_t i) {
    gguf_str s;
    uint64_t u;
    int64_t v;
    double d;
    bool b;
    gguf_str name = gguf_key_name(f, i);
    touch(name.ptr, name.len);
    check_lookup(name, i, gguf_find_key, f);
    gguf_vtype t = gguf_kv_type(f, i);
    sink += gguf_get_u64(f, i, &u) + gguf_get_i64(f, i, &v) + gguf_get_f64(f, i, &d) + gguf_get_bool(f, i, &b);
    if (gguf_get_str(f, i, &s)) touch(s.ptr, s.len);
    if (t != GGUF_ARRAY) {
        if (gguf_arr_len(f, i) != 0 || gguf_arr_type(f, i) != GGUF_TYPE_INVALID) abort();
        return;
    }
    uint64_t n = gguf_arr_len(f, i);
    for (uint64_t j = 0; j < n; j++) {
        gguf_vtype it;
        uint64_t len;
        sink += gguf_arr_get_i64(f, i, j, &v) + gguf_arr_get_f64(f, i, j, &d);
        if (gguf_arr_get_str(f, i, j, &s)) touch(s.ptr, s.len);
        if (gguf_arr_get_arr(f, i, j, &it, &len)) sink += it + len;
    }
    /* One past the end must be refused by every element getter. */
    gguf_vtype it;
    if (gguf_arr_get_i64(f, i, n, &v) || gguf_arr_get_f64(f, i, n, &d) || gguf_arr_get_str(f, i, n, &s) ||
        gguf_arr_get_arr(f, i, n, &it, &u))
        abort();
}

static void walk_tensor(const gguf_file *f, int64_t i, const uint8_t *lo, const uint8_t *hi) {
    const gguf_tensor *t = gguf_tensor_at(f, i);
    if (!t || t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS) abort();
    check_lookup(t->name, i, find_tensor_index, f);
    /* Size is rows of ggml_row_bytes, and the data lies inside the input. */
    uint64_t size = ggml_row_bytes(t->type, t->dims[0]);
    for (int d = 1; d < GGUF_MAX_DIMS; d++) size *= t->dims[d];
    if (!size || size != t->nbytes || t->offset % gguf_alignment(f)) abort();
    const uint8_t *p = t->data;
    if (p < lo || p > hi || t->nbytes > (uint64_t)(hi - p)) abort();
    touch(p, t->nbytes);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[512];
    gguf_file *f = gguf_open_mem(data, size, "fuzz", err, sizeof err);
    if (!f) {
        if (strncmp(err, "fuzz: offset ", 13) != 0 || strchr(err, '\n')) abort();
        return 0;
    }
    uint32_t a = gguf_alignment(f);
    if (gguf_version(f) != 3 || !a || (a & (a - 1)) || gguf_file_size(f) != size) abort();
    for (int64_t i = 0; i < gguf_n_kv(f); i++) walk_kv(f, i);
    for (int64_t i = 0; i < gguf_n_tensors(f); i++) walk_tensor(f, i, data, data + size);
    if (gguf_kv_type(f, gguf_n_kv(f)) != GGUF_TYPE_INVALID || gguf_tensor_at(f, gguf_n_tensors(f))) abort();
    gguf_close(f);
    return 0;
}
