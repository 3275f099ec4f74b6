/* ds4-synth internals shared by its source files. */
#ifndef DS4_SYNTH_H
#define DS4_SYNTH_H
#include <stdbool.h>
#include <stdint.h>

#include "gguf/gguf.h"

typedef struct {
    char **tok;          /* n token strings (byte-level BPE spelling) */
    int32_t *type;       /* 1 normal, 3 control */
    uint32_t n;
    char **merge;        /* "a b", in rank order */
    uint64_t n_merge;
} synth_vocab;

/* cutoff 0: the V4 layout (129280 ids). cutoff > 0: the BPE tokens below
 * cutoff reachable through kept merges, then the V4 specials appended. */
int synth_vocab_load(synth_vocab *v, const char *path, uint32_t cutoff, char *err, size_t errlen);
void synth_vocab_write(const synth_vocab *v, gguf_writer *w);
void synth_vocab_free(synth_vocab *v);

#endif
