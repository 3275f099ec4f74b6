/* GGUF v3 container: an mmap-backed reader that never trusts the file, and a
 * streaming writer used by ds4-synth and ds4-convert.
 *
 * Reader contract: gguf_open() either returns a fully validated file or NULL
 * with a one-line message "FILE: offset N: what is wrong" in err. Validated
 * means every count, length and offset was checked against the file size
 * before use; tensor data ranges lie inside the file, are aligned, and do not
 * overlap; tensor types are known and dims do not overflow. No allocation is
 * ever sized by an unchecked count. Tensor data is never copied: pointers
 * point into the mapping, which stays valid until gguf_close(). Since every
 * tensor's bytes lie inside the file, each dim and nbytes is below the file
 * size and so fits an int64_t. */
#ifndef DS4_GGUF_H
#define DS4_GGUF_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Metadata value types (GGUF spec). */
typedef enum {
    GGUF_U8 = 0, GGUF_I8 = 1, GGUF_U16 = 2, GGUF_I16 = 3, GGUF_U32 = 4, GGUF_I32 = 5,
    GGUF_F32 = 6, GGUF_BOOL = 7, GGUF_STRING = 8, GGUF_ARRAY = 9, GGUF_U64 = 10,
    GGUF_I64 = 11, GGUF_F64 = 12,
    GGUF_TYPE_INVALID = -1, /* returned for an absent key or a non-array */
} gguf_vtype;

/* ggml tensor types this engine knows. Any other id is rejected at open. */
typedef enum {
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q8_0 = 8, GGML_Q2_K = 10, GGML_Q4_K = 12,
    GGML_IQ2_XXS = 16, GGML_I32 = 26,
} ggml_type;

#define GGUF_MAX_DIMS 4

/* A string inside the mapping: not NUL-terminated. */
typedef struct { const char *ptr; uint64_t len; } gguf_str;

typedef struct {
    gguf_str name;
    uint32_t n_dims;
    uint64_t dims[GGUF_MAX_DIMS]; /* dims[0] is contiguous; unused dims are 1 */
    ggml_type type;
    uint64_t offset;              /* relative to the data section */
    uint64_t nbytes;
    const void *data;             /* inside the mapping */
} gguf_tensor;

typedef struct gguf_file gguf_file;

/* Open and validate. err gets "path: offset N: message" on failure (N = the
 * byte offset of the offending field), or "path: cannot open: ..." when the
 * file cannot be read at all. Only GGUF v3 is accepted. */
gguf_file *gguf_open(const char *path, char *err, size_t errlen);
/* Same over a caller-owned buffer (fuzzing, tests); label names it in errors.
 * The buffer is not copied and must outlive the gguf_file. */
gguf_file *gguf_open_mem(const void *buf, size_t len, const char *label, char *err, size_t errlen);
void gguf_close(gguf_file *f);

const char *gguf_path(const gguf_file *f);
uint64_t gguf_file_size(const gguf_file *f);
uint32_t gguf_version(const gguf_file *f);
uint32_t gguf_alignment(const gguf_file *f);
const void *gguf_base(const gguf_file *f); /* start of the mapping */

/* Metadata. Keys are looked up by exact name (hashed); index -1 = absent.
 * Every getter accepts any index and returns false / 0 / GGUF_TYPE_INVALID
 * when it is out of range. Duplicate keys are rejected at open. */
int64_t gguf_n_kv(const gguf_file *f);
int64_t gguf_find_key(const gguf_file *f, const char *key);
gguf_str gguf_key_name(const gguf_file *f, int64_t i);
gguf_vtype gguf_kv_type(const gguf_file *f, int64_t i);
/* Scalars: any integer/bool type converts to the integer getters and any
 * numeric type to the float getter; return false when the type does not
 * convert (or the value does not fit) rather than guessing. gguf_get_bool
 * takes only bool values; bool is not numeric for gguf_get_f64. */
bool gguf_get_u64(const gguf_file *f, int64_t i, uint64_t *out);
bool gguf_get_i64(const gguf_file *f, int64_t i, int64_t *out);
bool gguf_get_f64(const gguf_file *f, int64_t i, double *out);
bool gguf_get_bool(const gguf_file *f, int64_t i, bool *out);
bool gguf_get_str(const gguf_file *f, int64_t i, gguf_str *out);
/* Arrays (of any item type, nested arrays included). gguf_arr_get_i64/f64
 * read fixed-width items with the scalar conversions above. */
gguf_vtype gguf_arr_type(const gguf_file *f, int64_t i);
uint64_t gguf_arr_len(const gguf_file *f, int64_t i);
bool gguf_arr_get_i64(const gguf_file *f, int64_t i, uint64_t j, int64_t *out);
bool gguf_arr_get_f64(const gguf_file *f, int64_t i, uint64_t j, double *out);
bool gguf_arr_get_str(const gguf_file *f, int64_t i, uint64_t j, gguf_str *out); /* O(1) */
/* Nested array element j of array i, as its own (type, len) for inspection. */
bool gguf_arr_get_arr(const gguf_file *f, int64_t i, uint64_t j, gguf_vtype *type, uint64_t *len);

/* Convenience: look up + convert in one step (false if absent or wrong type). */
bool gguf_key_u64(const gguf_file *f, const char *key, uint64_t *out);
bool gguf_key_f64(const gguf_file *f, const char *key, double *out);
bool gguf_key_str(const gguf_file *f, const char *key, gguf_str *out);
bool gguf_str_eq(gguf_str s, const char *c);

/* Tensors, in file order. */
int64_t gguf_n_tensors(const gguf_file *f);
const gguf_tensor *gguf_tensor_at(const gguf_file *f, int64_t i);
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name); /* hashed, O(1) */

/* Type facts (block elements, block bytes, name), 0/NULL for unknown ids. */
uint32_t ggml_block_elems(uint32_t type);
uint32_t ggml_block_bytes(uint32_t type);
const char *ggml_type_name(uint32_t type);
/* Bytes of one row of n elements; 0 when n is not a multiple of the block
 * size or the type is unknown. */
uint64_t ggml_row_bytes(uint32_t type, uint64_t n);

/* ---- Writer -----------------------------------------------------------
 * Collect metadata and tensor descriptions, then gguf_writer_begin() writes
 * the header and computes every tensor's absolute file offset; tensor bytes
 * are then written with gguf_writer_write_tensor() in any order and from
 * several threads (pwrite at the tensor's own offset), which is what lets
 * ds4-synth fill 87 GB at disk speed. gguf_writer_finish() checks that every
 * tensor was written in full and closes the file. Keys and tensors keep the
 * order in which they were added.
 *
 * Errors in the collecting calls (out of memory, a bad tensor shape, ...)
 * are remembered and reported by gguf_writer_begin(); duplicate keys or
 * tensor names are reported there too. A file with tensors ends exactly at
 * the last tensor's last byte (no trailing padding). */
typedef struct gguf_writer gguf_writer;

/* alignment: 0 means the default 32; anything other than 32 is recorded as
 * the first key, general.alignment (u32), so do not set that key yourself.
 * NULL only when out of memory. */
gguf_writer *gguf_writer_new(uint32_t alignment);
/* Also abandons a begun but unfinished file: it is closed and removed. */
void gguf_writer_free(gguf_writer *w);
void gguf_set_u32(gguf_writer *w, const char *key, uint32_t v);
void gguf_set_i32(gguf_writer *w, const char *key, int32_t v);
void gguf_set_u64(gguf_writer *w, const char *key, uint64_t v);
void gguf_set_f32(gguf_writer *w, const char *key, float v);
void gguf_set_bool(gguf_writer *w, const char *key, bool v);
void gguf_set_str(gguf_writer *w, const char *key, const char *v);
void gguf_set_arr_i32(gguf_writer *w, const char *key, const int32_t *v, uint64_t n);
void gguf_set_arr_f32(gguf_writer *w, const char *key, const float *v, uint64_t n);
/* Strings are copied; lens may be NULL for NUL-terminated strings. */
void gguf_set_arr_str(gguf_writer *w, const char *key, const char *const *v, const uint64_t *lens, uint64_t n);
/* Raw escape hatch for tests that need odd encodings (nested arrays, other
 * scalar widths): value bytes exactly as they appear after the type field. */
void gguf_set_raw(gguf_writer *w, const char *key, gguf_vtype type, const void *bytes, uint64_t nbytes);

/* Returns the tensor's index, or -1 (remembered error) for an unknown type,
 * n_dims outside 1..4, a zero dim, dims[0] not a multiple of the type's
 * block, or a size that overflows. dims[0] contiguous. */
int64_t gguf_add_tensor(gguf_writer *w, const char *name, ggml_type type, uint32_t n_dims, const uint64_t *dims);
uint64_t gguf_writer_tensor_bytes(const gguf_writer *w, int64_t i);

/* Write header to path (created/truncated; file pre-sized to its final
 * length). Returns 0 or -1 with err set. */
int gguf_writer_begin(gguf_writer *w, const char *path, char *err, size_t errlen);
/* Write [off, off+n) of tensor i's bytes; thread-safe for distinct ranges.
 * Returns 0, or -1 with the reason kept for gguf_writer_error()/finish. */
int gguf_writer_write_tensor(gguf_writer *w, int64_t i, uint64_t off, const void *data, uint64_t n);
/* Checks that every tensor got exactly its byte count, fsyncs and closes.
 * On any failure (including an earlier write error) the file is removed,
 * so a half-written model never looks valid. Returns 0 or -1 with err. */
int gguf_writer_finish(gguf_writer *w, char *err, size_t errlen);
/* The first error recorded so far (without the path), or NULL. Call it when
 * no other thread is writing. */
const char *gguf_writer_error(const gguf_writer *w);

#endif
