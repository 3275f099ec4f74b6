/* Importance matrix files in llama.cpp's legacy binary format:
 *   i32 n_entries
 *   n_entries x { i32 name_len; name; i32 ncall; i32 n_values; f32 values[n_values] }
 *   optional trailer: i32 chunks; i32 dataset_len; dataset
 * Entries are keyed by GGUF tensor name; a routed-expert tensor has
 * n_in x n_expert values (expert-major), anything else n_in. Every count is
 * checked against the file size before it sizes anything. */
#ifndef DS4_CONVERT_IMATRIX_H
#define DS4_CONVERT_IMATRIX_H
#include <stddef.h>
#include <stdint.h>

#include "gguf/gguf.h"

typedef struct {
    char *name;
    int32_t ncall;
    uint32_t n;
    float *values;
} imatrix_entry;

typedef struct {
    imatrix_entry *e;
    uint32_t n;
    int32_t chunks;            /* -1 when the trailer is absent */
    char *dataset;             /* NULL when absent */
} imatrix;

imatrix *imatrix_load(const char *path, char *err, size_t errlen);
void imatrix_free(imatrix *m);
const imatrix_entry *imatrix_find(const imatrix *m, const char *name);
/* quantize.imatrix.* keys of the published imatrix files (spec §2.1). */
void imatrix_write_meta(const imatrix *m, const char *path, gguf_writer *w);

#endif
