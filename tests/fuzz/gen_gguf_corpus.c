/* Writes the seed corpus of fuzz_gguf (tests/fuzz/corpus/gguf/): a few small
 * valid files covering every value type, nested and string arrays, every
 * tensor type and a non-default alignment, plus broken variants (truncated,
 * overlapping tensors) so the fuzzer starts next to the error paths too.
 * The seeds are committed; regenerate with
 *   cc -std=c11 -D_GNU_SOURCE -Isrc tests/fuzz/gen_gguf_corpus.c src/gguf/gguf_*.c -o /tmp/gen \
 *     && /tmp/gen tests/fuzz/corpus/gguf */
#include "gguf/gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *dir;

static const char *out(const char *name) {
    static char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return p;
}

/* Writes every tensor with a byte pattern and finishes; exits on error. */
static void finish(gguf_writer *w, const char *name) {
    char err[512];
    if (gguf_writer_begin(w, out(name), err, sizeof err) != 0) { fprintf(stderr, "%s\n", err); exit(1); }
    for (int64_t i = 0; gguf_writer_tensor_bytes(w, i); i++) {
        uint64_t n = gguf_writer_tensor_bytes(w, i);
        uint8_t *b = malloc(n);
        for (uint64_t k = 0; k < n; k++) b[k] = (uint8_t)(k * 13 + (uint64_t)i);
        gguf_writer_write_tensor(w, i, 0, b, n);
        free(b);
    }
    if (gguf_writer_finish(w, err, sizeof err) != 0) { fprintf(stderr, "%s\n", err); exit(1); }
    gguf_writer_free(w);
}

/* Copies the first n bytes of file src to dst (n = 0: all but the last 5). */
static void truncated(const char *src, const char *dst, long n) {
    FILE *in = fopen(out(src), "rb");
    if (!in) exit(1);
    uint8_t buf[65536];
    size_t len = fread(buf, 1, sizeof buf, in);
    fclose(in);
    FILE *o = fopen(out(dst), "wb");
    if (!o) exit(1);
    fwrite(buf, 1, n ? (size_t)n : len - 5, o);
    fclose(o);
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s DIR\n", argv[0]); return 2; }
    dir = argv[1];

    /* Every metadata kind and every tensor type. */
    gguf_writer *w = gguf_writer_new(0);
    gguf_set_str(w, "general.architecture", "deepseek4");
    gguf_set_u32(w, "deepseek4.block_count", 2);
    gguf_set_i32(w, "i32", -7);
    gguf_set_u64(w, "u64", 1234567890123ull);
    gguf_set_f32(w, "deepseek4.attention.layer_norm_rms_epsilon", 1e-6f);
    gguf_set_bool(w, "deepseek4.norm", true);
    uint8_t i16[2] = {0xfe, 0xff}, f64[8] = {0, 0, 0, 0, 0, 0, 0xf0, 0x3f};
    gguf_set_raw(w, "i16", GGUF_I16, i16, 2);
    gguf_set_raw(w, "f64", GGUF_F64, f64, 8);
    int32_t ratios[] = {0, 0, 4, 128, 0};
    gguf_set_arr_i32(w, "deepseek4.compress_ratios", ratios, 5);
    float fl[] = {1.0f, -2.5f};
    gguf_set_arr_f32(w, "floats", fl, 2);
    const char *tok[] = {"<｜begin▁of▁sentence｜>", "a", "b", "ab", "\xc4\xa0the"};
    gguf_set_arr_str(w, "tokenizer.ggml.tokens", tok, NULL, 5);
    const char *merges[] = {"a b", "\xc4\xa0 t"};
    gguf_set_arr_str(w, "tokenizer.ggml.merges", merges, NULL, 2);
    uint8_t nested[] = {9, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0,  /* array of 2 arrays */
                        0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5,  /* [u8 5] */
                        8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 'x'}; /* ["x"] */
    gguf_set_raw(w, "nested", GGUF_ARRAY, nested, sizeof nested);
    uint64_t d1[] = {8}, d2[] = {32, 2}, d3[] = {256, 1, 2}, d4[] = {256, 1, 1, 1}, d5[] = {3};
    gguf_add_tensor(w, "output_norm.weight", GGML_F32, 1, d1);
    gguf_add_tensor(w, "token_embd.weight", GGML_F16, 1, d1);
    gguf_add_tensor(w, "output.weight", GGML_Q8_0, 2, d2);
    gguf_add_tensor(w, "blk.0.ffn_down_exps.weight", GGML_Q2_K, 3, d3);
    gguf_add_tensor(w, "blk.0.ffn_up_exps.weight", GGML_Q4_K, 1, d4);
    gguf_add_tensor(w, "blk.0.ffn_gate_exps.weight", GGML_IQ2_XXS, 4, d4);
    gguf_add_tensor(w, "blk.0.ffn_gate_tid2eid", GGML_I32, 1, d5);
    finish(w, "full.gguf");

    /* Non-default alignment, one tensor. */
    w = gguf_writer_new(64);
    gguf_set_str(w, "general.name", "aligned");
    gguf_add_tensor(w, "t", GGML_Q8_0, 1, d2);
    finish(w, "align64.gguf");

    /* Metadata only. */
    w = gguf_writer_new(0);
    gguf_set_u32(w, "k", 1);
    gguf_set_arr_str(w, "s", merges, NULL, 2);
    finish(w, "kv_only.gguf");

    /* Broken: truncated inside the tensor data and inside the metadata. */
    truncated("full.gguf", "bad_truncated_data.gguf", 0);
    truncated("full.gguf", "bad_truncated_kv.gguf", 200);
    return 0;
}
