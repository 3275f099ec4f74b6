/* GGUF container: writer -> reader round trips (every value type, nested and
 * string arrays, tensor placement under default and custom alignment),
 * writer misuse, and a broken-file suite in which every case asserts the
 * reader's exact one-line error, including every truncation of a valid file. */
#include "gguf/gguf.h"
#include "test.h"

/* CHECK(cond) without a message expands to an empty format string. */
#pragma GCC diagnostic ignored "-Wformat-zero-length"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char tmpdir[64];

static const char *tmp_path(const char *name) {
    static char p[4][128];
    static int k;
    k = (k + 1) % 4;
    snprintf(p[k], sizeof p[k], "%s/%s", tmpdir, name);
    return p[k];
}

static uint8_t *slurp(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    fseek(fp, 0, SEEK_END);
    *len = (size_t)ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *p = malloc(*len ? *len : 1);
    if (p && fread(p, 1, *len, fp) != *len) { free(p); p = NULL; }
    fclose(fp);
    return p;
}

/* ---- hand-built files for the broken-input suite ----------------------- */

typedef struct { uint8_t p[4096]; size_t n; } bytes;

static void b8(bytes *b, uint8_t v) { b->p[b->n++] = v; }
static void b32(bytes *b, uint32_t v) { for (int i = 0; i < 4; i++) b8(b, (uint8_t)(v >> 8 * i)); }
static void b64(bytes *b, uint64_t v) { for (int i = 0; i < 8; i++) b8(b, (uint8_t)(v >> 8 * i)); }
static void bstr(bytes *b, const char *s) {
    b64(b, strlen(s));
    memcpy(b->p + b->n, s, strlen(s));
    b->n += strlen(s);
}
static void bzeros(bytes *b, size_t n) { memset(b->p + b->n, 0, n); b->n += n; }
static void bhdr(bytes *b, uint64_t n_tensors, uint64_t n_kv) {
    b->n = 0;
    b32(b, 0x46554747);
    b32(b, 3);
    b64(b, n_tensors);
    b64(b, n_kv);
}
static void btensor(bytes *b, const char *name, uint32_t nd, const uint64_t *dims, uint32_t type, uint64_t off) {
    bstr(b, name);
    b32(b, nd);
    for (uint32_t d = 0; d < nd; d++) b64(b, dims[d]);
    b32(b, type);
    b64(b, off);
}

static void expect_err(const bytes *b, const char *want) {
    char err[512] = "";
    gguf_file *f = gguf_open_mem(b->p, b->n, "t.gguf", err, sizeof err);
    CHECK(f == NULL && strcmp(err, want) == 0, "\n       got  '%s'\n       want '%s'", f ? "(opened)" : err, want);
    gguf_close(f);
}

static gguf_file *expect_ok(const bytes *b) {
    char err[512] = "";
    gguf_file *f = gguf_open_mem(b->p, b->n, "t.gguf", err, sizeof err);
    CHECK(f != NULL, "unexpected error: %s", err);
    return f;
}

/* ---- tests ---------------------------------------------------------------- */

static void test_type_facts(void) {
    struct { uint32_t t, elems, bytes; const char *name; } want[] = {
        {GGML_F32, 1, 4, "F32"}, {GGML_F16, 1, 2, "F16"}, {GGML_Q8_0, 32, 34, "Q8_0"},
        {GGML_Q2_K, 256, 84, "Q2_K"}, {GGML_Q4_K, 256, 144, "Q4_K"},
        {GGML_IQ2_XXS, 256, 66, "IQ2_XXS"}, {GGML_I32, 1, 4, "I32"},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        CHECK(ggml_block_elems(want[i].t) == want[i].elems, "type %u", want[i].t);
        CHECK(ggml_block_bytes(want[i].t) == want[i].bytes, "type %u", want[i].t);
        CHECK(ggml_type_name(want[i].t) && strcmp(ggml_type_name(want[i].t), want[i].name) == 0, "type %u", want[i].t);
    }
    uint32_t unknown[] = {2, 3, 9, 11, 13, 30, 1000, UINT32_MAX};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++)
        CHECK(!ggml_block_elems(unknown[i]) && !ggml_block_bytes(unknown[i]) && !ggml_type_name(unknown[i]),
              "type %u should be unknown", unknown[i]);
    CHECK(ggml_row_bytes(GGML_Q4_K, 4096) == 16 * 144);
    CHECK(ggml_row_bytes(GGML_Q8_0, 4096) == 128 * 34);
    CHECK(ggml_row_bytes(GGML_IQ2_XXS, 2048) == 8 * 66);
    CHECK(ggml_row_bytes(GGML_F16, 7) == 14);
    CHECK(ggml_row_bytes(GGML_Q8_0, 33) == 0, "not a whole block");
    CHECK(ggml_row_bytes(30, 32) == 0, "unknown type");
}

typedef struct { gguf_writer *w; int64_t first, step, n; const uint8_t *const *data; } write_job;

/* Writes tensors first, first+step, ... each in two halves, back half first. */
static void *write_some(void *arg) {
    write_job *j = arg;
    for (int64_t i = j->first; i < j->n; i += j->step) {
        uint64_t nb = gguf_writer_tensor_bytes(j->w, i), h = nb / 2;
        if (gguf_writer_write_tensor(j->w, i, h, j->data[i] + h, nb - h) != 0 ||
            gguf_writer_write_tensor(j->w, i, 0, j->data[i], h) != 0)
            return (void *)1;
    }
    return NULL;
}

/* Tensor shapes covering every type, 1..4 dims, and sizes that are not a
 * multiple of the alignment (so padding is exercised). */
static const struct { const char *name; ggml_type type; uint32_t nd; uint64_t dims[4]; uint64_t nbytes; } shapes[] = {
    {"blk.0.attn_norm.weight", GGML_F32, 2, {8, 3}, 96},
    {"token_embd.weight", GGML_F16, 1, {5}, 10},
    {"output.weight", GGML_Q8_0, 2, {64, 3}, 6 * 34},
    {"blk.0.ffn_down_exps.weight", GGML_Q2_K, 3, {256, 2, 2}, 4 * 84},
    {"blk.0.ffn_up_exps.weight", GGML_Q4_K, 1, {512}, 2 * 144},
    {"blk.0.ffn_gate_exps.weight", GGML_IQ2_XXS, 4, {256, 1, 1, 2}, 2 * 66},
    {"blk.0.ffn_gate_tid2eid", GGML_I32, 2, {3, 2}, 24},
};
#define N_SHAPES (sizeof shapes / sizeof shapes[0])

/* Writes a file using every setter, the shapes above (4 threads), then
 * checks everything through the reader. */
static void roundtrip(uint32_t alignment) {
    const char *path = tmp_path("rt.gguf");
    gguf_writer *w = gguf_writer_new(alignment);
    REQUIRE(w);
    gguf_set_str(w, "general.architecture", "deepseek4");
    gguf_set_u32(w, "k.u32", 4000000000u);
    gguf_set_i32(w, "k.i32", -5);
    gguf_set_u64(w, "k.u64", UINT64_MAX);
    gguf_set_f32(w, "k.f32", 1.5f);
    gguf_set_bool(w, "k.bool", true);
    uint8_t u8 = 200, i8 = 0x80, u16[2] = {0x34, 0x12}, i16[2] = {0xff, 0xff};
    uint8_t i64[8] = {0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}; /* -2 */
    double f64v = -0.25;
    uint8_t f64[8];
    memcpy(f64, &f64v, 8); /* x86 is little-endian, as the format */
    gguf_set_raw(w, "k.u8", GGUF_U8, &u8, 1);
    gguf_set_raw(w, "k.i8", GGUF_I8, &i8, 1);
    gguf_set_raw(w, "k.u16", GGUF_U16, u16, 2);
    gguf_set_raw(w, "k.i16", GGUF_I16, i16, 2);
    gguf_set_raw(w, "k.i64", GGUF_I64, i64, 8);
    gguf_set_raw(w, "k.f64", GGUF_F64, f64, 8);
    int32_t ai[] = {0, -1, 2147483647};
    float af[] = {0.5f, -3.0f};
    gguf_set_arr_i32(w, "a.i32", ai, 3);
    gguf_set_arr_f32(w, "a.f32", af, 2);
    const char *strs[] = {"hello", "", "a\0b", "\xc4\xa0world"};
    uint64_t lens[] = {5, 0, 3, 7};
    gguf_set_arr_str(w, "a.str", strs, lens, 4);
    gguf_set_arr_str(w, "a.str0", strs, NULL, 2);
    /* [[7, 8] as u16, [] as string, [["x"]] ] : arrays nested two deep */
    bytes n = {.n = 0};
    b32(&n, GGUF_ARRAY); b64(&n, 3);
    b32(&n, GGUF_U16); b64(&n, 2); b8(&n, 7); b8(&n, 0); b8(&n, 8); b8(&n, 0);
    b32(&n, GGUF_STRING); b64(&n, 0);
    b32(&n, GGUF_ARRAY); b64(&n, 1); b32(&n, GGUF_STRING); b64(&n, 1); bstr(&n, "x");
    gguf_set_raw(w, "a.nested", GGUF_ARRAY, n.p, n.n);
    bytes bo = {.n = 0};
    b32(&bo, GGUF_BOOL); b64(&bo, 3); b8(&bo, 1); b8(&bo, 0); b8(&bo, 1);
    gguf_set_raw(w, "a.bool", GGUF_ARRAY, bo.p, bo.n);

    uint8_t *data[N_SHAPES];
    for (size_t i = 0; i < N_SHAPES; i++) {
        CHECK(gguf_add_tensor(w, shapes[i].name, shapes[i].type, shapes[i].nd, shapes[i].dims) == (int64_t)i);
        CHECK(gguf_writer_tensor_bytes(w, (int64_t)i) == shapes[i].nbytes, "%s", shapes[i].name);
        data[i] = malloc(shapes[i].nbytes);
        for (uint64_t k = 0; k < shapes[i].nbytes; k++) data[i][k] = (uint8_t)(i * 31 + k * 7 + 1);
    }
    char err[512];
    REQUIRE(gguf_writer_begin(w, path, err, sizeof err) == 0, "%s", err);
    pthread_t th[4];
    write_job jobs[4];
    for (int k = 0; k < 4; k++) {
        jobs[k] = (write_job){w, k, 4, (int64_t)N_SHAPES, (const uint8_t *const *)data};
        pthread_create(&th[k], NULL, write_some, &jobs[k]);
    }
    for (int k = 0; k < 4; k++) {
        void *rc;
        pthread_join(th[k], &rc);
        CHECK(rc == NULL, "thread %d: %s", k, gguf_writer_error(w));
    }
    CHECK(gguf_writer_finish(w, err, sizeof err) == 0, "%s", err);
    gguf_writer_free(w);

    gguf_file *f = gguf_open(path, err, sizeof err);
    REQUIRE(f, "%s", err);
    uint32_t al = alignment ? alignment : 32;
    CHECK(gguf_version(f) == 3);
    CHECK(gguf_alignment(f) == al);
    CHECK(strcmp(gguf_path(f), path) == 0);
    CHECK(gguf_n_kv(f) == 18 + (al != 32), "n_kv %lld", (long long)gguf_n_kv(f));
    uint64_t u;
    int64_t s;
    double d;
    bool bv;
    gguf_str str;
    if (al != 32) {
        CHECK(gguf_find_key(f, "general.alignment") == 0, "added first");
        CHECK(gguf_key_u64(f, "general.alignment", &u) && u == al);
        CHECK(gguf_kv_type(f, 0) == GGUF_U32);
    }
    CHECK(gguf_key_str(f, "general.architecture", &str) && gguf_str_eq(str, "deepseek4"));
    CHECK(gguf_str_eq(gguf_key_name(f, gguf_find_key(f, "k.u32")), "k.u32"));
    CHECK(gguf_key_u64(f, "k.u32", &u) && u == 4000000000u);
    CHECK(gguf_kv_type(f, gguf_find_key(f, "k.u32")) == GGUF_U32);
    CHECK(!gguf_key_u64(f, "k.i32", &u), "negative does not convert to u64");
    CHECK(gguf_get_i64(f, gguf_find_key(f, "k.i32"), &s) && s == -5);
    CHECK(gguf_key_f64(f, "k.i32", &d) && d == -5.0);
    CHECK(gguf_key_u64(f, "k.u64", &u) && u == UINT64_MAX);
    CHECK(!gguf_get_i64(f, gguf_find_key(f, "k.u64"), &s), "2^64-1 does not fit i64");
    CHECK(gguf_key_f64(f, "k.f32", &d) && d == 1.5);
    CHECK(!gguf_key_u64(f, "k.f32", &u), "float is not an integer");
    CHECK(gguf_get_bool(f, gguf_find_key(f, "k.bool"), &bv) && bv);
    CHECK(gguf_key_u64(f, "k.bool", &u) && u == 1, "bool converts to integers");
    CHECK(!gguf_key_f64(f, "k.bool", &d), "bool is not numeric");
    CHECK(!gguf_get_bool(f, gguf_find_key(f, "k.u8"), &bv), "only bool is bool");
    CHECK(gguf_key_u64(f, "k.u8", &u) && u == 200);
    CHECK(gguf_get_i64(f, gguf_find_key(f, "k.i8"), &s) && s == -128);
    CHECK(gguf_key_u64(f, "k.u16", &u) && u == 0x1234);
    CHECK(gguf_get_i64(f, gguf_find_key(f, "k.i16"), &s) && s == -1);
    CHECK(gguf_get_i64(f, gguf_find_key(f, "k.i64"), &s) && s == -2);
    CHECK(gguf_key_f64(f, "k.f64", &d) && d == -0.25);
    CHECK(!gguf_key_str(f, "k.u8", &str), "not a string");
    CHECK(!gguf_key_u64(f, "general.architecture", &u), "string is not an integer");

    int64_t a = gguf_find_key(f, "a.i32");
    CHECK(gguf_kv_type(f, a) == GGUF_ARRAY && gguf_arr_type(f, a) == GGUF_I32 && gguf_arr_len(f, a) == 3);
    for (uint64_t j = 0; j < 3; j++) CHECK(gguf_arr_get_i64(f, a, j, &s) && s == ai[j], "a.i32[%llu]", (unsigned long long)j);
    CHECK(!gguf_arr_get_i64(f, a, 3, &s), "past the end");
    CHECK(gguf_arr_get_f64(f, a, 1, &d) && d == -1.0);
    CHECK(!gguf_arr_get_str(f, a, 0, &str), "not a string array");
    a = gguf_find_key(f, "a.f32");
    CHECK(gguf_arr_type(f, a) == GGUF_F32 && gguf_arr_len(f, a) == 2);
    CHECK(gguf_arr_get_f64(f, a, 0, &d) && d == 0.5);
    CHECK(gguf_arr_get_f64(f, a, 1, &d) && d == -3.0);
    CHECK(!gguf_arr_get_i64(f, a, 0, &s), "float items are not integers");
    a = gguf_find_key(f, "a.str");
    CHECK(gguf_arr_type(f, a) == GGUF_STRING && gguf_arr_len(f, a) == 4);
    for (uint64_t j = 0; j < 4; j++)
        CHECK(gguf_arr_get_str(f, a, j, &str) && str.len == lens[j] && memcmp(str.ptr, strs[j], lens[j]) == 0,
              "a.str[%llu]", (unsigned long long)j);
    CHECK(!gguf_arr_get_str(f, a, 4, &str));
    CHECK(!gguf_arr_get_i64(f, a, 0, &s), "strings are not integers");
    a = gguf_find_key(f, "a.str0");
    CHECK(gguf_arr_len(f, a) == 2 && gguf_arr_get_str(f, a, 1, &str) && str.len == 0);
    CHECK(gguf_arr_get_str(f, a, 0, &str) && gguf_str_eq(str, "hello"));
    a = gguf_find_key(f, "a.nested");
    gguf_vtype it;
    CHECK(gguf_arr_type(f, a) == GGUF_ARRAY && gguf_arr_len(f, a) == 3);
    CHECK(gguf_arr_get_arr(f, a, 0, &it, &u) && it == GGUF_U16 && u == 2);
    CHECK(gguf_arr_get_arr(f, a, 1, &it, &u) && it == GGUF_STRING && u == 0);
    CHECK(gguf_arr_get_arr(f, a, 2, &it, &u) && it == GGUF_ARRAY && u == 1);
    CHECK(!gguf_arr_get_arr(f, a, 3, &it, &u));
    CHECK(!gguf_arr_get_i64(f, a, 0, &s), "nested arrays are not scalars");
    a = gguf_find_key(f, "a.bool");
    CHECK(gguf_arr_type(f, a) == GGUF_BOOL && gguf_arr_len(f, a) == 3);
    CHECK(gguf_arr_get_i64(f, a, 0, &s) && s == 1 && gguf_arr_get_i64(f, a, 1, &s) && s == 0);
    CHECK(gguf_find_key(f, "missing") == -1 && gguf_find_key(f, "") == -1 && gguf_find_key(f, "k.u3") == -1);
    CHECK(gguf_kv_type(f, -1) == GGUF_TYPE_INVALID && gguf_kv_type(f, 1000) == GGUF_TYPE_INVALID);
    CHECK(gguf_arr_type(f, gguf_find_key(f, "k.u8")) == GGUF_TYPE_INVALID && gguf_arr_len(f, 0) == 0);
    CHECK(gguf_key_name(f, -1).ptr == NULL && !gguf_get_u64(f, -1, &u));

    CHECK(gguf_n_tensors(f) == (int64_t)N_SHAPES);
    const uint8_t *base = gguf_base(f);
    uint64_t end = 0, prev_end = 0;
    for (size_t i = 0; i < N_SHAPES; i++) {
        const gguf_tensor *t = gguf_tensor_at(f, (int64_t)i);
        REQUIRE(t);
        CHECK(gguf_find_tensor(f, shapes[i].name) == t, "%s", shapes[i].name);
        CHECK(gguf_str_eq(t->name, shapes[i].name));
        CHECK(t->type == shapes[i].type && t->n_dims == shapes[i].nd && t->nbytes == shapes[i].nbytes, "%s", shapes[i].name);
        for (uint32_t k = 0; k < 4; k++)
            CHECK(t->dims[k] == (k < shapes[i].nd ? shapes[i].dims[k] : 1), "%s dims[%u]", shapes[i].name, k);
        CHECK(t->offset % al == 0 && t->offset >= prev_end, "%s offset %llu", shapes[i].name, (unsigned long long)t->offset);
        /* Tight layout: each tensor starts at the first aligned offset after the previous. */
        CHECK(t->offset == (prev_end + al - 1) / al * al, "%s", shapes[i].name);
        CHECK((uintptr_t)t->data % al == 0, "mapping is page-aligned, so data is aligned");
        CHECK((const uint8_t *)t->data - base == (ptrdiff_t)((const uint8_t *)gguf_tensor_at(f, 0)->data - base + t->offset));
        CHECK(memcmp(t->data, data[i], t->nbytes) == 0, "%s data", shapes[i].name);
        prev_end = t->offset + t->nbytes;
        end = (uint64_t)((const uint8_t *)t->data - base) + t->nbytes;
        free(data[i]);
    }
    CHECK(gguf_file_size(f) == end, "file ends at the last tensor's last byte");
    CHECK(((const uint8_t *)gguf_tensor_at(f, 0)->data - base) % al == 0, "data section aligned");
    CHECK(gguf_find_tensor(f, "nope") == NULL && gguf_tensor_at(f, -1) == NULL && gguf_tensor_at(f, (int64_t)N_SHAPES) == NULL);
    gguf_close(f);
    unlink(path);
}

static void test_roundtrip_default_alignment(void) { roundtrip(0); }
static void test_roundtrip_alignment_256(void) { roundtrip(256); }
static void test_roundtrip_alignment_8(void) { roundtrip(8); }

static void test_writer_errors(void) {
    char err[512];
    const char *path = tmp_path("bad.gguf");
    uint64_t d8[] = {8}, d33[] = {33}, d0[] = {8, 0}, d5[] = {1, 1, 1, 1, 1};

    gguf_writer *w;
    struct { const char *want; int setup; } cases[] = {
        {"duplicate key 'a'", 0}, {"duplicate tensor name 't'", 1},
        {"tensor 'q': dims[0] 33 is not a multiple of the Q8_0 block (32)", 2},
        {"tensor 'z': dims[1] is zero", 3}, {"tensor 'n': n_dims 5 is not in 1..4", 4},
        {"tensor 'u': unknown ggml type 30", 5}, {"alignment 3 is not a power of two", 6},
        {"duplicate key 'general.alignment'", 7}, /* gguf_writer_new(64) already set it */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        w = gguf_writer_new(cases[c].setup == 6 ? 3 : cases[c].setup == 7 ? 64 : 32);
        gguf_set_u32(w, "a", 1);
        switch (cases[c].setup) {
        case 0: gguf_set_str(w, "a", "again"); break;
        case 1: gguf_add_tensor(w, "t", GGML_F32, 1, d8); gguf_add_tensor(w, "t", GGML_F32, 1, d8); break;
        case 2: CHECK(gguf_add_tensor(w, "q", GGML_Q8_0, 1, d33) == -1); break;
        case 3: CHECK(gguf_add_tensor(w, "z", GGML_F32, 2, d0) == -1); break;
        case 4: CHECK(gguf_add_tensor(w, "n", GGML_F32, 5, d5) == -1); break;
        case 5: CHECK(gguf_add_tensor(w, "u", (ggml_type)30, 1, d8) == -1); break;
        case 7: gguf_set_u32(w, "general.alignment", 64); break;
        default: break;
        }
        char want[600];
        snprintf(want, sizeof want, "%s: %s", path, cases[c].want);
        CHECK(gguf_writer_begin(w, path, err, sizeof err) == -1 && strcmp(err, want) == 0,
              "\n       got  '%s'\n       want '%s'", err, want);
        CHECK(access(path, F_OK) != 0, "no file is created for a rejected writer");
        gguf_writer_free(w);
    }

    /* Misuse and short or doubled writes are caught, and a failed file is
     * removed. Each round checks the first error recorded. */
    uint64_t d8b[] = {8};
    struct { uint64_t off, n; int64_t idx; const char *want; } rounds[] = {
        {16, 0, 0, "tensor 't': 16 of 32 bytes written"},
        {16, 17, 0, "tensor 't': write of 17 bytes at 16 exceeds its 32 bytes"},
        {0, 32, 0, "tensor 't': 48 of 32 bytes written"}, /* the same range twice */
        {0, 1, 1, "tensor index 1 out of range"},
    };
    for (size_t r = 0; r < sizeof rounds / sizeof rounds[0]; r++) {
        w = gguf_writer_new(0);
        gguf_add_tensor(w, "t", GGML_F32, 1, d8b);
        REQUIRE(gguf_writer_begin(w, path, err, sizeof err) == 0, "%s", err);
        uint8_t buf[64] = {0};
        CHECK(gguf_writer_write_tensor(w, 0, 0, buf, 16) == 0);
        int rc = gguf_writer_write_tensor(w, rounds[r].idx, rounds[r].off, buf, rounds[r].n);
        CHECK((rc == 0) == (r == 0 || r == 2), "round %zu rc %d", r, rc);
        char want[600];
        snprintf(want, sizeof want, "%s: %s", path, rounds[r].want);
        CHECK(gguf_writer_finish(w, err, sizeof err) == -1 && strcmp(err, want) == 0,
              "\n       got  '%s'\n       want '%s'", err, want);
        CHECK(access(path, F_OK) != 0, "failed file removed");
        gguf_writer_free(w);
    }
    /* Abandoned after begin: free removes the file. */
    w = gguf_writer_new(0);
    REQUIRE(gguf_writer_begin(w, path, err, sizeof err) == 0, "%s", err);
    CHECK(access(path, F_OK) == 0);
    gguf_writer_free(w);
    CHECK(access(path, F_OK) != 0);
    /* Unwritable path. */
    w = gguf_writer_new(0);
    CHECK(gguf_writer_begin(w, "/nonexistent/dir/x.gguf", err, sizeof err) == -1 &&
          strcmp(err, "/nonexistent/dir/x.gguf: cannot create: No such file or directory") == 0, "got '%s'", err);
    gguf_writer_free(w);
}

static void test_open_errors(void) {
    char err[512];
    CHECK(!gguf_open("/nonexistent.gguf", err, sizeof err) &&
          strcmp(err, "/nonexistent.gguf: cannot open: No such file or directory") == 0, "%s", err);
    char want[600];
    snprintf(want, sizeof want, "%s: not a regular file", tmpdir);
    CHECK(!gguf_open(tmpdir, err, sizeof err) && strcmp(err, want) == 0, "%s", err);
    const char *path = tmp_path("empty.gguf");
    FILE *fp = fopen(path, "wb");
    REQUIRE(fp);
    fclose(fp);
    snprintf(want, sizeof want, "%s: offset 0: file ends inside magic (4 bytes needed, 0 left)", path);
    CHECK(!gguf_open(path, err, sizeof err) && strcmp(err, want) == 0, "%s", err);
    unlink(path);
    /* errlen 0 / NULL err must not be written. */
    CHECK(!gguf_open_mem("GGUF", 4, "x", NULL, 0));
}

static void test_header_errors(void) {
    bytes b;
    bhdr(&b, 0, 0);
    b.p[3] = 'X';
    expect_err(&b, "t.gguf: offset 0: bad magic 0x58554747 (not a GGUF file)");
    bhdr(&b, 0, 0);
    b.p[4] = 2;
    expect_err(&b, "t.gguf: offset 4: unsupported GGUF version 2 (only 3 is supported)");
    bhdr(&b, 0, 0);
    b.p[4] = 0; b.p[7] = 3; /* a big-endian v3 file reads as version 0x03000000 */
    expect_err(&b, "t.gguf: offset 4: unsupported GGUF version 50331648 (only 3 is supported)");
    bhdr(&b, 1000000000000000000u, 0);
    expect_err(&b, "t.gguf: offset 8: n_tensors 1000000000000000000 cannot fit in the 0 bytes left");
    bhdr(&b, 3, 0);
    bzeros(&b, 98); /* 3 tensor infos need >= 99 bytes */
    expect_err(&b, "t.gguf: offset 8: n_tensors 3 cannot fit in the 98 bytes left");
    bhdr(&b, 0, UINT64_MAX);
    bzeros(&b, 100);
    expect_err(&b, "t.gguf: offset 16: n_kv 18446744073709551615 cannot fit in the 100 bytes left");
    bhdr(&b, 0, 0);
    gguf_file *f = expect_ok(&b);
    CHECK(!f || (gguf_n_kv(f) == 0 && gguf_n_tensors(f) == 0 && gguf_alignment(f) == 32));
    gguf_close(f);
    b.n = 10;
    expect_err(&b, "t.gguf: offset 8: file ends inside n_tensors (8 bytes needed, 2 left)");
}

static void test_kv_errors(void) {
    bytes b;
    /* Key record: length at 24, name at 32, type at 32+len, value after. */
    bhdr(&b, 0, 1);
    b64(&b, (uint64_t)1 << 40);
    bzeros(&b, 20);
    expect_err(&b, "t.gguf: offset 24: key length 1099511627776 exceeds the 20 bytes left");
    bhdr(&b, 0, 1);
    bstr(&b, "");
    bzeros(&b, 8);
    expect_err(&b, "t.gguf: offset 24: empty key name");
    bhdr(&b, 0, 1);
    bstr(&b, "a\n'");
    b32(&b, 13);
    bzeros(&b, 4);
    expect_err(&b, "t.gguf: offset 35: key 'a\\x0a\\x27': unknown value type 13");
    bhdr(&b, 0, 1);
    bstr(&b, "a");
    b32(&b, GGUF_STRING);
    b64(&b, 100);
    bzeros(&b, 99);
    expect_err(&b, "t.gguf: offset 37: string value length 100 exceeds the 99 bytes left");
    bhdr(&b, 0, 1);
    bstr(&b, "a");
    b32(&b, GGUF_BOOL);
    b8(&b, 2);
    expect_err(&b, "t.gguf: offset 37: key 'a': bool value 2 is not 0 or 1");
    bhdr(&b, 0, 1);
    bstr(&b, "a");
    b32(&b, GGUF_ARRAY);
    b32(&b, 99);
    b64(&b, 0);
    expect_err(&b, "t.gguf: offset 37: key 'a': unknown array item type 99");
    bhdr(&b, 0, 1);
    bstr(&b, "a");
    b32(&b, GGUF_ARRAY);
    b32(&b, GGUF_U32);
    b64(&b, (uint64_t)1 << 62);
    bzeros(&b, 40);
    expect_err(&b, "t.gguf: offset 41: key 'a': array of 4611686018427387904 u32 items cannot fit in the 40 bytes left");
    /* 6 strings need at least 48 bytes. */
    bhdr(&b, 0, 1);
    bstr(&b, "a");
    b32(&b, GGUF_ARRAY);
    b32(&b, GGUF_STRING);
    b64(&b, 6);
    bzeros(&b, 47);
    expect_err(&b, "t.gguf: offset 41: key 'a': array of 6 string items cannot fit in the 47 bytes left");
    /* A string inside a string array longer than the file. */
    bhdr(&b, 0, 1);
    bstr(&b, "a");
    b32(&b, GGUF_ARRAY);
    b32(&b, GGUF_STRING);
    b64(&b, 2);
    bstr(&b, "ok");
    b64(&b, 1000);
    bzeros(&b, 10);
    expect_err(&b, "t.gguf: offset 59: string value length 1000 exceeds the 10 bytes left");
    /* A bad bool deep inside a nested array is still found. */
    bhdr(&b, 0, 1);
    bstr(&b, "a");
    b32(&b, GGUF_ARRAY);
    b32(&b, GGUF_ARRAY);
    b64(&b, 1);
    b32(&b, GGUF_BOOL);
    b64(&b, 2);
    b8(&b, 1);
    b8(&b, 5);
    expect_err(&b, "t.gguf: offset 62: key 'a': bool value 5 is not 0 or 1");
    /* Nesting: 8 array levels are fine, a 9th is refused at the 8th head. */
    for (int levels = 8; levels <= 9; levels++) {
        bhdr(&b, 0, 1);
        bstr(&b, "a");
        b32(&b, GGUF_ARRAY);
        for (int l = 1; l < levels; l++) { b32(&b, GGUF_ARRAY); b64(&b, 1); }
        b32(&b, GGUF_U8);
        b64(&b, 1);
        b8(&b, 7);
        if (levels == 8) gguf_close(expect_ok(&b));
        else expect_err(&b, "t.gguf: offset 121: key 'a': arrays nested deeper than 8 levels");
    }
    /* Duplicate key: the second record, at 38, is named. */
    bhdr(&b, 0, 2);
    bstr(&b, "a");
    b32(&b, GGUF_U8);
    b8(&b, 1);
    bstr(&b, "a");
    b32(&b, GGUF_U8);
    b8(&b, 2);
    expect_err(&b, "t.gguf: offset 38: duplicate key 'a'");
}

static void test_alignment_errors(void) {
    bytes b;
    struct { uint32_t type; uint64_t v; const char *want; } cases[] = {
        {GGUF_U32, 48, "t.gguf: offset 53: general.alignment 48 is not a nonzero power of two below 2^32"},
        {GGUF_U32, 0, "t.gguf: offset 53: general.alignment 0 is not a nonzero power of two below 2^32"},
        {GGUF_U64, (uint64_t)1 << 32, "t.gguf: offset 53: general.alignment 4294967296 is not a nonzero power of two below 2^32"},
        {GGUF_I32, 0xffffffc0u, "t.gguf: offset 53: general.alignment must be an unsigned integer, not i32"},
        {GGUF_F32, 0x42800000u, "t.gguf: offset 53: general.alignment must be an unsigned integer, not f32"},
        {GGUF_BOOL, 1, "t.gguf: offset 53: general.alignment must be an unsigned integer, not bool"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        bhdr(&b, 0, 1);
        bstr(&b, "general.alignment");
        b32(&b, cases[c].type);
        if (cases[c].type == GGUF_U64) b64(&b, cases[c].v);
        else if (cases[c].type == GGUF_BOOL) b8(&b, (uint8_t)cases[c].v);
        else b32(&b, (uint32_t)cases[c].v);
        expect_err(&b, cases[c].want);
    }
    /* A valid non-default alignment governs tensor offsets. */
    uint64_t d[] = {8};
    bhdr(&b, 1, 1);
    bstr(&b, "general.alignment");
    b32(&b, GGUF_U32);
    b32(&b, 64);
    btensor(&b, "w", 1, d, GGML_F32, 32);
    expect_err(&b, "t.gguf: offset 82: tensor 'w': data offset 32 is not a multiple of the alignment 64");
    b.n -= 8;
    b64(&b, 0);
    bzeros(&b, 128 - b.n + 32); /* header ends at 90, data at 128 */
    gguf_file *f = expect_ok(&b);
    if (f) {
        CHECK(gguf_alignment(f) == 64);
        CHECK((const uint8_t *)gguf_tensor_at(f, 0)->data - b.p == 128);
    }
    gguf_close(f);
}

static void test_tensor_errors(void) {
    bytes b;
    /* One tensor info at 24: name "w" (24..33), n_dims at 33, dims at 37. */
    uint64_t d1[] = {8}, d2[] = {4, 0}, dbig[] = {(uint64_t)1 << 32, (uint64_t)1 << 32}, d62[] = {(uint64_t)1 << 62};
    uint64_t d33[] = {33}, d5[] = {1, 1, 1, 1, 1};
    bhdr(&b, 1, 0);
    btensor(&b, "w", 5, d5, GGML_F32, 0);
    expect_err(&b, "t.gguf: offset 33: tensor 'w': n_dims 5 is not in 1..4");
    bhdr(&b, 1, 0);
    btensor(&b, "w", 0, d1, GGML_F32, 0);
    bzeros(&b, 8);
    expect_err(&b, "t.gguf: offset 33: tensor 'w': n_dims 0 is not in 1..4");
    bhdr(&b, 1, 0);
    btensor(&b, "w", 2, d2, GGML_F32, 0);
    expect_err(&b, "t.gguf: offset 45: tensor 'w': dims[1] is zero");
    bhdr(&b, 1, 0);
    btensor(&b, "w", 2, dbig, GGML_F32, 0);
    expect_err(&b, "t.gguf: offset 45: tensor 'w': element count overflows 64 bits at dims[1]");
    bhdr(&b, 1, 0);
    btensor(&b, "w", 1, d62, GGML_F32, 0);
    expect_err(&b, "t.gguf: offset 45: tensor 'w': byte size overflows 64 bits");
    bhdr(&b, 1, 0);
    btensor(&b, "w", 1, d1, 30, 0);
    expect_err(&b, "t.gguf: offset 45: tensor 'w': unknown ggml type 30");
    bhdr(&b, 1, 0);
    btensor(&b, "w", 1, d33, GGML_Q8_0, 0);
    expect_err(&b, "t.gguf: offset 37: tensor 'w': dims[0] 33 is not a multiple of the Q8_0 block (32)");
    bhdr(&b, 1, 0);
    btensor(&b, "w", 1, d1, GGML_F32, 16);
    expect_err(&b, "t.gguf: offset 49: tensor 'w': data offset 16 is not a multiple of the alignment 32");
    bhdr(&b, 1, 0);
    btensor(&b, "", 1, d1, GGML_F32, 0);
    bzeros(&b, 8); /* so that n_tensors 1 is plausible */
    expect_err(&b, "t.gguf: offset 24: empty tensor name");
    /* Out of bounds: header ends at 57, data at 64; 32 bytes needed, 31 there. */
    bhdr(&b, 1, 0);
    btensor(&b, "w", 1, d1, GGML_F32, 0);
    bzeros(&b, 7 + 31);
    expect_err(&b, "t.gguf: offset 49: tensor 'w': data (32 bytes at data offset 0) runs past the end of the file "
                   "(data section holds 31 bytes)");
    bzeros(&b, 1);
    gguf_file *f = expect_ok(&b);
    gguf_close(f);
    /* An offset so large that offset + size wraps is out of bounds, not a wrap. */
    bhdr(&b, 1, 0);
    btensor(&b, "w", 1, d1, GGML_F32, UINT64_MAX - 31);
    bzeros(&b, 7 + 32);
    expect_err(&b, "t.gguf: offset 49: tensor 'w': data (32 bytes at data offset 18446744073709551584) runs past the "
                   "end of the file (data section holds 32 bytes)");
    /* Two tensors "w" (info 24..57, offset field 49) and "v" (57..90, offset
     * field 82); data at 96. */
    uint64_t d16[] = {16};
    bhdr(&b, 2, 0);
    btensor(&b, "w", 1, d16, GGML_F32, 32);
    btensor(&b, "v", 1, d16, GGML_F32, 0);
    bzeros(&b, 6 + 96);
    expect_err(&b, "t.gguf: offset 49: tensor 'w': data overlaps tensor 'v'");
    bhdr(&b, 2, 0);
    btensor(&b, "w", 1, d16, GGML_F32, 0);
    btensor(&b, "v", 1, d16, GGML_F32, 0);
    bzeros(&b, 6 + 96);
    expect_err(&b, "t.gguf: offset 82: tensor 'v': data overlaps tensor 'w'");
    bhdr(&b, 2, 0);
    btensor(&b, "w", 1, d16, GGML_F32, 0);
    btensor(&b, "w", 1, d16, GGML_F32, 64);
    bzeros(&b, 6 + 128);
    expect_err(&b, "t.gguf: offset 57: duplicate tensor name 'w'");
    /* Alignment 1 allows a one-byte overlap: F16 [3] at 0..6 and at 5. Infos
     * follow the 33-byte alignment key; "b"'s offset field is at 115 and
     * the data section starts right after the infos, at 123. */
    uint64_t d3[] = {3};
    for (uint64_t off = 5; off <= 6; off++) {
        bhdr(&b, 2, 1);
        bstr(&b, "general.alignment");
        b32(&b, GGUF_U32);
        b32(&b, 1);
        btensor(&b, "a", 1, d3, GGML_F16, 0);
        btensor(&b, "b", 1, d3, GGML_F16, off);
        bzeros(&b, 12);
        if (off == 5) expect_err(&b, "t.gguf: offset 115: tensor 'b': data overlaps tensor 'a'");
        else {
            f = expect_ok(&b);
            CHECK(f && gguf_find_tensor(f, "b")->data == b.p + 129, "touching ranges are fine");
            gguf_close(f);
        }
    }
    bhdr(&b, 2, 0);
    btensor(&b, "w", 1, d16, GGML_F32, 64);
    btensor(&b, "v", 1, d16, GGML_F32, 0);
    bzeros(&b, 6 + 128);
    f = expect_ok(&b);
    if (f) {
        CHECK(gguf_find_tensor(f, "v")->data == b.p + 96 && gguf_find_tensor(f, "w")->data == b.p + 160);
        CHECK(gguf_find_tensor(f, "w")->dims[1] == 1 && gguf_find_tensor(f, "w")->n_dims == 1);
    }
    gguf_close(f);
}

/* A small valid file (metadata of every kind, two tensors) cut at every
 * length must fail cleanly with a one-line located error. */
static void test_every_truncation(void) {
    const char *path = tmp_path("trunc.gguf");
    gguf_writer *w = gguf_writer_new(64);
    gguf_set_str(w, "s", "str");
    gguf_set_u32(w, "u", 7);
    gguf_set_bool(w, "b", false);
    const char *strs[] = {"x", "yz"};
    gguf_set_arr_str(w, "as", strs, NULL, 2);
    bytes n = {.n = 0};
    b32(&n, GGUF_ARRAY); b64(&n, 1); b32(&n, GGUF_I8); b64(&n, 2); b8(&n, 1); b8(&n, 0xff);
    gguf_set_raw(w, "an", GGUF_ARRAY, n.p, n.n);
    uint64_t d[] = {32, 2};
    gguf_add_tensor(w, "q", GGML_Q8_0, 2, d);
    gguf_add_tensor(w, "f", GGML_F16, 1, d);
    char err[512];
    REQUIRE(gguf_writer_begin(w, path, err, sizeof err) == 0, "%s", err);
    uint8_t data[68];
    memset(data, 0x5a, sizeof data);
    gguf_writer_write_tensor(w, 0, 0, data, 68);
    gguf_writer_write_tensor(w, 1, 0, data, 64);
    REQUIRE(gguf_writer_finish(w, err, sizeof err) == 0, "%s", err);
    gguf_writer_free(w);
    size_t len;
    uint8_t *full = slurp(path, &len);
    REQUIRE(full);
    gguf_file *f = gguf_open_mem(full, len, "t.gguf", err, sizeof err);
    CHECK(f != NULL, "%s", err);
    gguf_close(f);
    int bad = 0;
    for (size_t k = 0; k < len; k++) {
        /* An exact-size copy, so any read past the prefix is a sanitizer error. */
        uint8_t *p = malloc(k ? k : 1);
        memcpy(p, full, k);
        err[0] = 0;
        f = gguf_open_mem(p, k, "t.gguf", err, sizeof err);
        unsigned long long off = ~0ull;
        bool shaped = sscanf(err, "t.gguf: offset %llu: ", &off) == 1 && off <= k && !strchr(err, '\n');
        if (f || !shaped) {
            if (bad++ < 5) CHECK(0, "prefix %zu: %s", k, f ? "opened" : err);
        }
        gguf_close(f);
        free(p);
    }
    CHECK(bad == 0, "%d bad prefixes of %zu", bad, len);
    free(full);
    unlink(path);
}

/* The real file's shape: a 129280-entry token array and 1328 tensors must
 * open in milliseconds (hashing, O(1) string index, no per-item work
 * beyond one pass). */
static void test_open_speed(void) {
    const char *path = tmp_path("big.gguf");
    enum { N_TOK = 129280, N_T = 1328 };
    gguf_writer *w = gguf_writer_new(32);
    char (*tok)[16] = malloc(N_TOK * sizeof *tok);
    const char **ptr = malloc(N_TOK * sizeof *ptr);
    REQUIRE(tok && ptr);
    for (int i = 0; i < N_TOK; i++) {
        snprintf(tok[i], sizeof tok[i], "tok%d", i);
        ptr[i] = tok[i];
    }
    gguf_set_arr_str(w, "tokenizer.ggml.tokens", ptr, NULL, N_TOK);
    char name[64];
    uint64_t d[] = {32};
    for (int i = 0; i < N_T; i++) {
        snprintf(name, sizeof name, "blk.%d.t%d.weight", i / 31, i % 31);
        gguf_add_tensor(w, name, GGML_Q8_0, 1, d);
    }
    char err[512];
    REQUIRE(gguf_writer_begin(w, path, err, sizeof err) == 0, "%s", err);
    uint8_t blk[34];
    for (int i = 0; i < N_T; i++) {
        memset(blk, i & 0xff, sizeof blk);
        gguf_writer_write_tensor(w, i, 0, blk, sizeof blk);
    }
    REQUIRE(gguf_writer_finish(w, err, sizeof err) == 0, "%s", err);
    gguf_writer_free(w);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    gguf_file *f = gguf_open(path, err, sizeof err);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    REQUIRE(f, "%s", err);
    double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
    printf("     open: %.2f ms (%d strings, %d tensors)\n", ms, N_TOK, N_T);
    /* Typically a few ms; the bound leaves room for a loaded shared machine. */
    CHECK(ms < 200, "open took %.1f ms", ms);
    int64_t k = gguf_find_key(f, "tokenizer.ggml.tokens");
    gguf_str s;
    CHECK(gguf_arr_len(f, k) == N_TOK);
    int bad = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < N_TOK; i++)
        bad += !gguf_arr_get_str(f, k, (uint64_t)i, &s) || !gguf_str_eq(s, tok[i]);
    for (int i = 0; i < N_T; i++) {
        snprintf(name, sizeof name, "blk.%d.t%d.weight", i / 31, i % 31);
        const gguf_tensor *t = gguf_find_tensor(f, name);
        bad += !t || t != gguf_tensor_at(f, i) || ((const uint8_t *)t->data)[33] != (i & 0xff);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
    printf("     all lookups: %.2f ms\n", ms);
    CHECK(bad == 0, "%d lookups wrong", bad);
    CHECK(ms < 200, "lookups took %.1f ms", ms);
    gguf_close(f);
    unlink(path);
    free(tok);
    free(ptr);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/ds4-test-gguf-XXXXXX");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 1; }
    RUN(test_type_facts);
    RUN(test_roundtrip_default_alignment);
    RUN(test_roundtrip_alignment_256);
    RUN(test_roundtrip_alignment_8);
    RUN(test_writer_errors);
    RUN(test_open_errors);
    RUN(test_header_errors);
    RUN(test_kv_errors);
    RUN(test_alignment_errors);
    RUN(test_tensor_errors);
    RUN(test_every_truncation);
    RUN(test_open_speed);
    rmdir(tmpdir);
    TEST_END();
}
