/* Read-only view of a Hugging Face safetensors checkpoint (one file or
 * shards listed by model.safetensors.index.json), memory-mapped, never
 * trusted: every header length, offset, shape and dtype is checked against
 * the file before a byte of tensor data is touched.
 *
 * On top of the raw tensors, st_weight decodes the storage formats DeepSeek
 * V4 ships (spec model.md §2.6) row by row into f32:
 *   plain  F32 / F16 / BF16;
 *   FP8    F8_E4M3 weight + ".scale" with one scale per 128x128 block;
 *   FP4    packed E2M1 (I8/U8, two values per byte, low nibble first)
 *          + ".scale" with one scale per 32 consecutive inputs.
 * Scales may be F8_E8M0 / U8 (UE8M0 exponent bytes: 2^(e-127)), F32 or BF16. */
#ifndef DS4_CONVERT_SAFETENSORS_H
#define DS4_CONVERT_SAFETENSORS_H
#include <stddef.h>
#include <stdint.h>

typedef enum {
    ST_F32, ST_F16, ST_BF16, ST_F8_E4M3, ST_F8_E8M0, ST_I8, ST_U8, ST_I32, ST_I64,
} st_dtype;

#define ST_MAX_DIMS 4

typedef struct {
    char *name;
    st_dtype dtype;
    int ndim;
    uint64_t shape[ST_MAX_DIMS];
    const uint8_t *data;       /* inside the shard's mapping */
    uint64_t nbytes;
    const char *file;          /* shard path, for messages */
} st_tensor;

typedef struct st_ckpt st_ckpt;

/* Open DIR/model.safetensors.index.json and its shards, or DIR/model.safetensors.
 * NULL with err = one line naming the file and the problem. */
st_ckpt *st_open_dir(const char *dir, char *err, size_t errlen);
/* One shard already in memory (buf[0, len), the caller's until st_close),
 * named `name` in messages: the parser alone, for tests and fuzzing. */
st_ckpt *st_open_mem(const uint8_t *buf, size_t len, const char *name, char *err, size_t errlen);
void st_close(st_ckpt *c);
size_t st_count(const st_ckpt *c);
const st_tensor *st_at(const st_ckpt *c, size_t i);
const st_tensor *st_find(const st_ckpt *c, const char *name);   /* NULL if absent */
const char *st_dtype_name(st_dtype t);

typedef enum { ST_W_PLAIN, ST_W_FP8, ST_W_FP4, ST_W_INT } st_wkind;

/* A logical matrix rows x cols (a 1-D tensor is 1 x n). */
typedef struct {
    const st_tensor *w, *scale;
    st_wkind kind;
    uint64_t rows, cols;
} st_weight;

/* Resolve NAME (its ".scale" companion found by replacing a trailing
 * ".weight") and classify the storage. -1 with err on a missing tensor, an
 * unsupported dtype, a missing/misshapen scale or more than 2 dims. */
int st_weight_get(const st_ckpt *c, const char *name, st_weight *out, char *err, size_t errlen);
/* Decode row r into out[cols]. Returns the number of non-finite values
 * produced (NaN codes, E8M0 0xFF), so the caller can refuse the tensor. */
uint64_t st_weight_row(const st_weight *w, uint64_t r, float *out);
/* Integer tensors (I32/I64): element i as int64. */
int64_t st_weight_int(const st_weight *w, uint64_t i);

#endif
