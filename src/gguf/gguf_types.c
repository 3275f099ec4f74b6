/* Facts about the ggml tensor types ds4 knows (spec model.md §2.1 and §8):
 * how many elements one block holds and how many bytes it takes. The reader
 * rejects any other type id, so every size computed from these is exact. */
#include "gguf/gguf.h"

typedef struct { uint32_t elems, bytes; const char *name; } type_info;

static const type_info *type_lookup(uint32_t type) {
    /* Indexed by id; ids without a name are unknown. Q8_0: f16 scale + 32
     * int8. Q2_K: 16 B scales + 64 B 2-bit quants + 2 f16. Q4_K: 2 f16 +
     * 12 B scales + 128 B 4-bit quants. IQ2_XXS: f16 + 64 B grid codes. */
    static const type_info tab[] = {
        [GGML_F32]     = {1,   4,   "F32"},
        [GGML_F16]     = {1,   2,   "F16"},
        [GGML_Q8_0]    = {32,  34,  "Q8_0"},
        [GGML_Q2_K]    = {256, 84,  "Q2_K"},
        [GGML_Q4_K]    = {256, 144, "Q4_K"},
        [GGML_IQ2_XXS] = {256, 66,  "IQ2_XXS"},
        [GGML_I32]     = {1,   4,   "I32"},
    };
    if (type >= sizeof tab / sizeof tab[0] || !tab[type].name) return NULL;
    return &tab[type];
}

uint32_t ggml_block_elems(uint32_t type) {
    const type_info *t = type_lookup(type);
    return t ? t->elems : 0;
}

uint32_t ggml_block_bytes(uint32_t type) {
    const type_info *t = type_lookup(type);
    return t ? t->bytes : 0;
}

const char *ggml_type_name(uint32_t type) {
    const type_info *t = type_lookup(type);
    return t ? t->name : NULL;
}

uint64_t ggml_row_bytes(uint32_t type, uint64_t n) {
    const type_info *t = type_lookup(type);
    if (!t || n % t->elems) return 0;
    /* n / elems * bytes cannot overflow for any n the reader accepted (it
     * checked the whole tensor's size); guard anyway for direct callers. */
    uint64_t blocks = n / t->elems;
    if (blocks > UINT64_MAX / t->bytes) return 0;
    return blocks * t->bytes;
}
