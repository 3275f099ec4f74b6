/* libFuzzer harness for ds4-convert's safetensors reader
 * (tools/ds4-convert/safetensors.c; the Makefile links that one source in):
 * the input is one shard, u64 header length | JSON header | tensor data,
 * as a Hugging Face checkpoint ships it, parsed in place by st_open_mem.
 * Invariants, each an abort():
 *   refused -> NULL with a one-line message naming the shard;
 *   opened  -> tensors sorted by name, each found by st_find, at most
 *              ST_MAX_DIMS dims, its bytes = elements x dtype size and inside
 *              the data section (first and last byte touched, so ASan sees a
 *              bad range); every tensor st_weight_get accepts has a storage
 *              size that matches its kind and shape, and every row of it
 *              decodes (ASan checks each read of the weight and its scale). */
#include "../../tools/ds4-convert/safetensors.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

static volatile uint64_t sink;

static unsigned dtype_size(st_dtype t) {
    switch (t) {
    case ST_F32: case ST_I32: return 4;
    case ST_F16: case ST_BF16: return 2;
    case ST_I64: return 8;
    default: return 1;
    }
}

static void check_weight(const st_ckpt *c, const st_tensor *t) {
    char err[512];
    st_weight w;
    if (st_weight_get(c, t->name, &w, err, sizeof err)) {
        if (!err[0] || strchr(err, '\n')) abort();
        return;
    }
    if (w.w != t || t->ndim < 1 || t->ndim > 2) abort();
    uint64_t elems = w.rows * w.cols, es = dtype_size(t->dtype);
    switch (w.kind) {
    case ST_W_PLAIN: case ST_W_INT: if (elems * es != t->nbytes) abort(); break;
    case ST_W_FP8: if (elems != t->nbytes || !w.scale) abort(); break;
    case ST_W_FP4: if (elems != 2 * t->nbytes || w.cols % 32 || !w.scale) abort(); break;
    }
    float *row = malloc((w.cols ? w.cols : 1) * sizeof *row);
    for (uint64_t r = 0; r < w.rows; r++) sink += st_weight_row(&w, r, row);
    free(row);
    if (w.kind == ST_W_INT)
        for (uint64_t i = 0; i < elems; i++) sink += (uint64_t)st_weight_int(&w, i);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[512];
    st_ckpt *c = st_open_mem(data, size, "fuzz", err, sizeof err);
    if (!c) {
        if ((strncmp(err, "fuzz: ", 6) && strcmp(err, "out of memory")) || strchr(err, '\n')) abort();
        return 0;
    }
    for (size_t i = 0; i < st_count(c); i++) {
        const st_tensor *t = st_at(c, i);
        if (!t || st_find(c, t->name) != t || (i && strcmp(st_at(c, i - 1)->name, t->name) >= 0)) abort();
        if (t->ndim < 0 || t->ndim > ST_MAX_DIMS) abort();
        uint64_t n = dtype_size(t->dtype);
        for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
        if (n != t->nbytes || t->data < data + 8 || t->data > data + size || t->nbytes > (uint64_t)(data + size - t->data))
            abort();
        if (t->nbytes) sink += t->data[0] + t->data[t->nbytes - 1];
        check_weight(c, t);
    }
    if (st_at(c, st_count(c))) abort();
    st_close(c);
    return 0;
}
