/* ds4-convert on the oracle checkpoint (tests/fixtures/oracle): layout,
 * metadata, values decoded independently of the converter, the q2/q4 mixes,
 * an imatrix, and refusals of broken checkpoints with a clear message. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gguf/gguf.h"
#include "model/model.h"
#include "quant/quant.h"
#include "test.h"

static char fix[1024], tmp[256];

/* ---- a small safetensors lookup of our own (not the converter's) ---- */

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) { free(b); b = NULL; }
    fclose(f);
    if (b) b[n] = 0;
    if (len) *len = (size_t)n;
    return b;
}

typedef struct { char *blob; const uint8_t *data; uint64_t nbytes; char dtype[16]; int ndim; int64_t shape[2]; } raw_t;

/* Tensor NAME of the fixture: its bytes (inside blob, which the caller frees). */
static int raw_get(const char *name, raw_t *r) {
    char path[1200];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", fix);
    char *idx = slurp(path, NULL);
    cJSON *j = cJSON_Parse(idx);
    free(idx);
    cJSON *file = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "weight_map"), name);
    if (!file) { cJSON_Delete(j); return -1; }
    snprintf(path, sizeof path, "%s/%s", fix, file->valuestring);
    cJSON_Delete(j);
    size_t len;
    r->blob = slurp(path, &len);
    if (!r->blob) return -1;
    uint64_t hl;
    memcpy(&hl, r->blob, 8);
    cJSON *h = cJSON_ParseWithLength(r->blob + 8, hl);
    cJSON *t = cJSON_GetObjectItem(h, name);
    snprintf(r->dtype, sizeof r->dtype, "%s", cJSON_GetObjectItem(t, "dtype")->valuestring);
    cJSON *sh = cJSON_GetObjectItem(t, "shape");
    r->shape[0] = cJSON_GetArrayItem(sh, 0)->valueint;
    r->ndim = cJSON_GetArraySize(sh);
    r->shape[1] = r->ndim > 1 ? cJSON_GetArrayItem(sh, 1)->valueint : 1;
    cJSON *off = cJSON_GetObjectItem(t, "data_offsets");
    r->data = (const uint8_t *)r->blob + 8 + hl + (uint64_t)cJSON_GetArrayItem(off, 0)->valuedouble;
    r->nbytes = (uint64_t)(cJSON_GetArrayItem(off, 1)->valuedouble - cJSON_GetArrayItem(off, 0)->valuedouble);
    cJSON_Delete(h);
    return 0;
}

/* Format definitions written out longhand (spec §2.6, §3.3). */
static double e4m3(uint8_t b) {
    int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    double v = e == 0 ? m / 8.0 * pow(2, -6) : (1 + m / 8.0) * pow(2, e - 7);
    return s ? -v : v;
}
static double e2m1(int nib) {
    static const double mag[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
    return (nib & 8 ? -1 : 1) * mag[nib & 7];
}
static double ue8m0(uint8_t e) { return pow(2, (int)e - 127); }

static int run_convert(const char *args, const char *dir, const char *out, char *log, size_t logn) {
    char cmd[4096], logpath[512];
    snprintf(logpath, sizeof logpath, "%s/convert.log", tmp);
    snprintf(cmd, sizeof cmd, "'%s/ds4-convert' --quiet %s '%s' '%s' 2>'%s'", test_env("DS4_BIN", "build/bin"), args, dir,
             out, logpath);
    int rc = system(cmd);
    char *l = slurp(logpath, NULL);
    snprintf(log, logn, "%s", l ? l : "");
    free(l);
    return rc;
}

static gguf_file *f32_file(void) {
    static char out[512];
    static int done;
    char log[2048];
    snprintf(out, sizeof out, "%s/f32.gguf", tmp);
    if (!done && run_convert("--mix f32", fix, out, log, sizeof log) != 0) {
        fprintf(stderr, "  convert: %s\n", log);
        return NULL;
    }
    done = 1;
    char err[512];
    gguf_file *g = gguf_open(out, err, sizeof err);
    if (!g) fprintf(stderr, "  %s\n", err);
    return g;
}

static const float *tensor_f32(gguf_file *g, const char *name, const gguf_tensor **t) {
    *t = gguf_find_tensor(g, name);
    return *t && (*t)->type == GGML_F32 ? (const float *)(*t)->data : NULL;
}

/* Layout, keys and tokenizer of the f32 conversion; the model loader of
 * src/model accepts it. */
static void test_f32_layout_and_keys(void) {
    gguf_file *g = f32_file();
    REQUIRE(g, "f32 conversion failed");
    ds4_hparams hp;
    char err[512];
    REQUIRE(ds4_hparams_read(&hp, g, err, sizeof err) == 0, "%s", err);
    CHECK(hp.n_layer == 5 && hp.n_embd == 256 && hp.n_vocab == 512 && hp.n_head == 8 && hp.head_dim == 128, "hyperparameters read back");
    CHECK(hp.n_expert == 8 && hp.n_expert_used == 4 && hp.n_hash_layer == 3 && hp.idx_top_k == 16, "hyperparameters read back");
    CHECK(hp.compress_ratio[2] == 4 && hp.compress_ratio[3] == 128 && hp.compress_ratio[5] == 0, "hyperparameters read back");
    CHECK(fabsf(hp.yarn_factor - 16) < 1e-6f && hp.yarn_orig_ctx == 65536 && fabsf(hp.swiglu_clamp[4] - 10) < 1e-6f, "hyperparameters read back");
    int n = ds4_layout(&hp, DS4_MIX_F32, false, NULL, 0);
    ds4_tensor_spec *sp = calloc((size_t)n, sizeof *sp);
    ds4_layout(&hp, DS4_MIX_F32, false, sp, n);
    CHECK(gguf_n_tensors(g) == n, "%lld tensors, layout has %d", (long long)gguf_n_tensors(g), n);
    for (int i = 0; i < n && i < gguf_n_tensors(g); i++) {
        const gguf_tensor *t = gguf_tensor_at(g, i);
        CHECK(gguf_str_eq(t->name, sp[i].name) && t->type == sp[i].type && t->dims[0] == sp[i].dims[0] &&
              t->dims[1] == sp[i].dims[1], "tensor %d is %.*s, layout says %s", i, (int)t->name.len, t->name.ptr,
              sp[i].name);
    }
    free(sp);
    int64_t k = gguf_find_key(g, "tokenizer.ggml.tokens");
    CHECK(k >= 0 && gguf_arr_len(g, k) == 512, "hyperparameters read back");
    gguf_str s;
    CHECK(k >= 0 && gguf_arr_get_str(g, k, 0, &s) && gguf_str_eq(s, "<｜begin▁of▁sentence｜>"), "BOS spelling");
    CHECK(k >= 0 && gguf_arr_get_str(g, k, 3, &s) && gguf_str_eq(s, "Ā"), "byte 0 is token 3 in the oracle vocab");
    uint64_t v;
    CHECK(gguf_key_u64(g, "tokenizer.ggml.eos_token_id", &v) && v == 1, "EOS id");
    gguf_close(g);
    ds4_model m;
    char path[512];
    snprintf(path, sizeof path, "%s/f32.gguf", tmp);
    CHECK(ds4_model_load(&m, path, err, sizeof err) == 0, "model load: %s", err);
    ds4_model_free(&m);
}

/* Values: each source format decoded here by its definition and compared
 * with the converted f32 tensor, bit for bit. */
static void test_f32_values(void) {
    gguf_file *g = f32_file();
    REQUIRE(g, "f32 conversion failed");
    const gguf_tensor *t;
    raw_t w = {0}, sc = {0};

    /* FP8 E4M3 + UE8M0 128x128 block scales: layer 1 wq_b [1024, 128]. */
    const float *q = tensor_f32(g, "blk.1.attn_q_b.weight", &t);
    REQUIRE(q && raw_get("layers.1.attn.wq_b.weight", &w) == 0 && raw_get("layers.1.attn.wq_b.scale", &sc) == 0, "FP8 wq_b and its scale");
    CHECK(!strcmp(w.dtype, "F8_E4M3") && !strcmp(sc.dtype, "F8_E8M0"), "source dtypes");
    int bad = 0;
    for (int64_t r = 0; r < w.shape[0]; r++)
        for (int64_t c = 0; c < w.shape[1]; c++)
            bad += (double)q[r * w.shape[1] + c] !=
                   e4m3(w.data[r * w.shape[1] + c]) * ue8m0(sc.data[(r / 128) * sc.shape[1] + c / 128]);
    CHECK(bad == 0, "%d FP8 values differ", bad);
    free(w.blob); free(sc.blob);

    /* Packed FP4 + UE8M0 per-32 scales: expert 5 of layer 3's w2 [256, 256]
     * lands at expert-major offset 5 * 256 * 256 of ffn_down_exps. */
    q = tensor_f32(g, "blk.3.ffn_down_exps.weight", &t);
    REQUIRE(q && raw_get("layers.3.ffn.experts.5.w2.weight", &w) == 0 &&
            raw_get("layers.3.ffn.experts.5.w2.scale", &sc) == 0, "FP4 expert and its scale");
    CHECK(!strcmp(w.dtype, "I8") && t->dims[2] == 8, "expert count");
    int64_t cols = 2 * w.shape[1];
    bad = 0;
    for (int64_t r = 0; r < w.shape[0]; r++)
        for (int64_t c = 0; c < cols; c++) {
            uint8_t byte = w.data[r * w.shape[1] + c / 2];
            double want = e2m1(c % 2 ? byte >> 4 : byte & 15) * ue8m0(sc.data[r * (cols / 32) + c / 32]);
            bad += (double)q[(5 * w.shape[0] + r) * cols + c] != want;
        }
    CHECK(bad == 0, "%d FP4 values differ", bad);
    free(w.blob); free(sc.blob);

    /* BF16 embedding, F16 kv norm, F32 ape ([R, W] -> dims [W, R]). */
    q = tensor_f32(g, "token_embd.weight", &t);
    REQUIRE(q && raw_get("embed.weight", &w) == 0 && !strcmp(w.dtype, "BF16"), "BF16 embedding");
    bad = 0;
    for (int64_t i = 0; i < w.shape[0] * w.shape[1]; i++) {
        uint32_t u = (uint32_t)(w.data[2 * i] | w.data[2 * i + 1] << 8) << 16;
        float f;
        memcpy(&f, &u, 4);
        bad += q[i] != f;
    }
    CHECK(bad == 0 && t->dims[0] == 256 && t->dims[1] == 512, "%d BF16 values differ", bad);
    free(w.blob);
    q = tensor_f32(g, "blk.2.attn_kv_a_norm.weight", &t);
    REQUIRE(q && raw_get("layers.2.attn.kv_norm.weight", &w) == 0 && !strcmp(w.dtype, "F16"), "F16 kv norm");
    bad = 0;
    for (int64_t i = 0; i < w.shape[0]; i++) bad += q[i] != ds4_f16_to_f32((uint16_t)(w.data[2 * i] | w.data[2 * i + 1] << 8));
    CHECK(bad == 0, "%d F16 values differ", bad);
    free(w.blob);
    q = tensor_f32(g, "blk.3.attn_compressor_ape.weight", &t);
    REQUIRE(q && raw_get("layers.3.attn.compressor.ape", &w) == 0 && !strcmp(w.dtype, "F32"), "F32 ape");
    CHECK(t->dims[0] == 128 && t->dims[1] == 128 && !memcmp(q, w.data, 128 * 128 * 4), "hyperparameters read back");
    free(w.blob);

    /* I64 hash table [V, k] -> I32 [k, V]. */
    t = gguf_find_tensor(g, "blk.1.ffn_gate_tid2eid.weight");
    REQUIRE(t && t->type == GGML_I32 && raw_get("layers.1.ffn.gate.tid2eid", &w) == 0 && !strcmp(w.dtype, "I64"), "I64 hash table");
    CHECK(t->dims[0] == 4 && t->dims[1] == 512, "hyperparameters read back");
    bad = 0;
    for (int64_t i = 0; i < 512 * 4; i++) {
        int64_t a;
        int32_t b;
        memcpy(&a, w.data + 8 * i, 8);
        memcpy(&b, (const char *)t->data + 4 * i, 4);
        bad += a != b;
    }
    CHECK(bad == 0, "%d hash entries differ", bad);
    free(w.blob);
    CHECK(gguf_find_tensor(g, "blk.3.exp_probs_b.bias") && !gguf_find_tensor(g, "blk.2.exp_probs_b.bias"), "router bias only on non-hash layers");
    CHECK(!gguf_find_tensor(g, "blk.3.ffn_gate_tid2eid.weight") && gguf_find_tensor(g, "blk.4.indexer.proj.weight"), "hash table / indexer presence");
    gguf_close(g);
}

/* q2 / q4: published types, and each quantised tensor close to the f32 one
 * by the format's own precision (Q8_0 ~0.5%, Q4_K ~5%, IQ2_XXS/Q2_K ~30%
 * relative RMS error on these Gaussian-like weights). */
static void check_mix(const char *mix, ds4_mix m) {
    char out[512], log[2048], err[512];
    snprintf(out, sizeof out, "%s/%s.gguf", tmp, mix + 6);
    REQUIRE(run_convert(mix, fix, out, log, sizeof log) == 0, "%s", log);
    ds4_model model;
    REQUIRE(ds4_model_load(&model, out, err, sizeof err) == 0, "%s: %s", out, err);
    ds4_model_free(&model);
    gguf_file *q = gguf_open(out, err, sizeof err), *f = f32_file();
    REQUIRE(q && f, "%s", err);
    ds4_hparams hp;
    REQUIRE(ds4_hparams_read(&hp, q, err, sizeof err) == 0, "%s", err);
    int n = ds4_layout(&hp, m, false, NULL, 0);
    ds4_tensor_spec *sp = calloc((size_t)n, sizeof *sp);
    ds4_layout(&hp, m, false, sp, n);
    for (int i = 0; i < n; i++) {
        const gguf_tensor *tq = gguf_find_tensor(q, sp[i].name), *tf = gguf_find_tensor(f, sp[i].name);
        REQUIRE(tq && tf && tq->type == sp[i].type, "%s", sp[i].name);
        if (tq->type == GGML_I32 || tq->type == GGML_F32) {
            CHECK(!memcmp(tq->data, tf->data, tf->nbytes), "%s differs", sp[i].name);
            continue;
        }
        uint64_t n0 = tq->dims[0], rows = tf->nbytes / (4 * n0), rb = ggml_row_bytes(tq->type, n0);
        float *x = malloc(n0 * sizeof *x);
        double se = 0, ss = 0;
        for (uint64_t r = 0; r < rows; r++) {
            ds4_dequant_row(tq->type, (const char *)tq->data + r * rb, x, (int64_t)n0);
            const float *ref = (const float *)tf->data + r * n0;
            for (uint64_t j = 0; j < n0; j++) { se += (x[j] - ref[j]) * (x[j] - ref[j]); ss += ref[j] * ref[j]; }
        }
        free(x);
        double rel = sqrt(se / ss), bound = tq->type == GGML_F16 ? 1e-3 : tq->type == GGML_Q8_0 ? 0.01
                                          : tq->type == GGML_Q4_K ? 0.08 : 0.40;
        CHECK(rel < bound, "%s (%s): relative RMS error %.4f >= %.3g", sp[i].name, ggml_type_name(tq->type), rel, bound);
    }
    free(sp);
    gguf_close(q);
    gguf_close(f);
}
static void test_q2_mix(void) { check_mix("--mix q2", DS4_MIX_Q2); }
static void test_q4_mix(void) { check_mix("--mix q4", DS4_MIX_Q4); }

/* An imatrix (llama.cpp legacy format) for one expert tensor: recorded in
 * the metadata and it changes that tensor's quantisation only. (q4: its
 * Q4_K experts weigh errors by importance like IQ2_XXS does, and it
 * converts ten times faster than q2.) */
static void test_imatrix(void) {
    char im[512], out[512], base[512], log[2048], err[512], args[700];
    snprintf(im, sizeof im, "%s/test.imatrix", tmp);
    FILE *f = fopen(im, "wb");
    REQUIRE(f, "hyperparameters read back");
    const char *name = "blk.3.ffn_gate_exps.weight";
    int32_t n = 1, len = (int32_t)strlen(name), ncall = 10, nval = 256 * 8;
    fwrite(&n, 4, 1, f);
    fwrite(&len, 4, 1, f);
    fwrite(name, 1, (size_t)len, f);
    fwrite(&ncall, 4, 1, f);
    fwrite(&nval, 4, 1, f);
    for (int i = 0; i < nval; i++) {
        float v = (i % 7 == 0) ? 1000.0f : 1.0f;   /* a few columns matter a lot */
        fwrite(&v, 4, 1, f);
    }
    int32_t chunks = 3, dlen = 4;
    fwrite(&chunks, 4, 1, f);
    fwrite(&dlen, 4, 1, f);
    fwrite("test", 1, 4, f);
    fclose(f);
    snprintf(out, sizeof out, "%s/q4-imatrix.gguf", tmp);
    snprintf(base, sizeof base, "%s/q4.gguf", tmp);
    snprintf(args, sizeof args, "--mix q4 --imatrix '%s'", im);
    REQUIRE(run_convert(args, fix, out, log, sizeof log) == 0, "%s", log);
    if (access(base, F_OK)) REQUIRE(run_convert("--mix q4", fix, base, log, sizeof log) == 0, "%s", log);
    gguf_file *a = gguf_open(out, err, sizeof err), *b = gguf_open(base, err, sizeof err);
    REQUIRE(a && b, "%s", err);
    gguf_str s;
    uint64_t v;
    CHECK(gguf_key_str(a, "quantize.imatrix.file", &s) && gguf_str_eq(s, "test.imatrix"), "imatrix file key");
    CHECK(gguf_key_u64(a, "quantize.imatrix.entries_count", &v) && v == 1, "imatrix entries key");
    CHECK(gguf_key_u64(a, "quantize.imatrix.chunks_count", &v) && v == 3, "imatrix chunks key");
    CHECK(gguf_key_str(a, "quantize.imatrix.dataset", &s) && gguf_str_eq(s, "test"), "imatrix dataset key");
    const gguf_tensor *ta = gguf_find_tensor(a, name), *tb = gguf_find_tensor(b, name);
    CHECK(ta && tb && memcmp(ta->data, tb->data, ta->nbytes) != 0, "the imatrix did not change %s", name);
    ta = gguf_find_tensor(a, "blk.3.ffn_up_exps.weight");
    tb = gguf_find_tensor(b, "blk.3.ffn_up_exps.weight");
    CHECK(ta && tb && memcmp(ta->data, tb->data, ta->nbytes) == 0, "tensors without an entry changed");
    gguf_close(a);
    gguf_close(b);
    /* An entry name with a control byte (here a newline) is refused by
     * position, not quoted into the message. */
    f = fopen(im, "r+b");
    REQUIRE(f, "reopen %s", im);
    fseek(f, 8 + 3, SEEK_SET);   /* count, name length, then "blk" */
    fputc('\n', f);
    fclose(f);
    CHECK(run_convert(args, fix, out, log, sizeof log) != 0 && strstr(log, "entry 0: the name has a NUL or control byte"),
          "%s", log);
    /* A truncated imatrix is refused. */
    if (truncate(im, 30) == 0)
        CHECK(run_convert(args, fix, out, log, sizeof log) != 0 && strstr(log, "truncated"), "%s", log);
}

/* ---- broken checkpoints ---------------------------------------------- */

/* Copy the fixture to DIR, replacing the first `from` by `to` in file
 * `which` (NULL: no change). In a shard the replacement must lie in the
 * JSON header, whose u64 length prefix follows a change of length. */
static int broken_copy(const char *dir, const char *which, const char *from, const char *to) {
    static const char *files[] = {"config.json", "tokenizer.json", "model.safetensors.index.json",
                                  "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
    mkdir(dir, 0755);
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char src[1200], dst[1200];
        size_t len;
        snprintf(src, sizeof src, "%s/%s", fix, files[i]);
        snprintf(dst, sizeof dst, "%s/%s", dir, files[i]);
        char *b = slurp(src, &len);
        if (!b) return -1;
        if (which && !strcmp(which, files[i])) {
            char *p = memmem(b, len, from, strlen(from));
            size_t fl = strlen(from), tl = strlen(to);
            char *nb = p ? malloc(len - fl + tl) : NULL;
            if (!nb) { free(b); return -1; }
            size_t at = (size_t)(p - b);
            memcpy(nb, b, at);
            memcpy(nb + at, to, tl);
            memcpy(nb + at + tl, p + fl, len - at - fl);
            free(b);
            b = nb;
            len = len - fl + tl;
            size_t nl = strlen(files[i]);
            if (nl > 12 && !strcmp(files[i] + nl - 12, ".safetensors")) {
                uint64_t h;
                memcpy(&h, b, 8);
                h = h - fl + tl;
                memcpy(b, &h, 8);
            }
        }
        FILE *f = fopen(dst, "wb");
        if (!f) { free(b); return -1; }
        fwrite(b, 1, len, f);
        fclose(f);
        free(b);
    }
    return 0;
}

static void expect_refusal(const char *what, const char *which, const char *from, const char *to, const char *msg) {
    char dir[512], out[600], log[2048];
    snprintf(dir, sizeof dir, "%s/broken", tmp);
    REQUIRE(broken_copy(dir, which, from, to) == 0, "%s: could not build the broken copy", what);
    snprintf(out, sizeof out, "%s/broken.gguf", tmp);
    int rc = run_convert("--mix f32", dir, out, log, sizeof log);
    CHECK(rc != 0, "%s: accepted", what);
    CHECK(strstr(log, msg) != NULL, "%s: message lacks \"%s\": %s", what, msg, log);
    CHECK(access(out, F_OK) != 0, "%s: a partial output file was left behind", what);
}

static void test_refusals(void) {
    expect_refusal("missing tensor", "model-00001-of-00002.safetensors", "\"layers.0.attn.wq_a.weight\"",
                   "\"layers.0.attn.wq_X.weight\"", "missing tensor layers.0.attn.wq_a.weight");
    expect_refusal("unknown dtype", "model-00001-of-00002.safetensors", "\"F8_E4M3\"", "\"F8_E5M2\"",
                   "unsupported dtype F8_E5M2");
    expect_refusal("wrong shape", "config.json", "\"q_lora_rank\": 128", "\"q_lora_rank\": 256",
                   "expected [256, 256]");
    expect_refusal("bad config", "config.json", "\"head_dim\": 128", "\"head_dim\": 100",
                   "config.json");
    expect_refusal("scale missing", "model-00001-of-00002.safetensors", "\"layers.0.attn.wq_b.scale\"",
                   "\"layers.0.attn.wq_b.scalX\"", "FP8 tensor layers.0.attn.wq_b.weight has no .scale");
    expect_refusal("bad shard reference", "model.safetensors.index.json", "model-00002-of-00002.safetensors",
                   "model-00009-of-00002.safetensors", "model-00009-of-00002.safetensors");
    /* A shard whose JSON header is garbage. */
    expect_refusal("corrupt header", "model-00002-of-00002.safetensors", "{\"", "\x7f\x7f", "not a JSON object");
    /* Seen while writing fuzz_safetensors: sizes that are no whole numbers were
     * truncated (24.5 rows read as 24) or, as strings, read as 0. */
    expect_refusal("fractional dimension", "model-00002-of-00002.safetensors", "\"shape\":[24,1024]",
                   "\"shape\":[24.5,1024]", "layers.2.hc_attn_fn: dimension 0 is not a whole number");
    expect_refusal("offset as a string", "model-00002-of-00002.safetensors", "\"data_offsets\":[0,98304]",
                   "\"data_offsets\":[\"0\",98304]", "layers.2.hc_attn_fn: data_offsets are not [begin, end]");
    /* A shard named "." (the directory itself) got as far as mmap. */
    expect_refusal("shard is a directory", "model.safetensors.index.json", "model-00002-of-00002.safetensors", ".",
                   "/.: not a regular file");
    /* Found by fuzz_safetensors: a name with a newline (JSON "\n") went
     * into the one-line error message as it was. */
    expect_refusal("newline in a name", "model-00002-of-00002.safetensors", "\"layers.2.hc_attn_fn\"",
                   "\"layers.2.hc\\nattn_fn\"", "a tensor name holds a control character");
}


/* The MTP block: a checkpoint with mtp.0.* tensors (made here from layer 4,
 * a non-hash window-less layer's worth of tensors, and the global HC head)
 * converts with --mtp into a file the model loader binds, each tensor equal
 * to the main-file tensor converted from the same source bytes. */
static void add_mtp(cJSON *hdr, cJSON *wm, FILE *data, uint64_t *off, const char *dst, const char *src) {
    raw_t r = {0};
    if (raw_get(src, &r)) return;
    cJSON *e = cJSON_AddObjectToObject(hdr, dst);
    cJSON_AddStringToObject(e, "dtype", r.dtype);
    double shape[2] = {(double)r.shape[0], (double)r.shape[1]};
    cJSON_AddItemToObject(e, "shape", cJSON_CreateDoubleArray(shape, r.ndim));
    double offs[2] = {(double)*off, (double)(*off + r.nbytes)};
    cJSON_AddItemToObject(e, "data_offsets", cJSON_CreateDoubleArray(offs, 2));
    fwrite(r.data, 1, r.nbytes, data);
    *off += r.nbytes;
    cJSON_AddStringToObject(wm, dst, "mtp.safetensors");
    free(r.blob);
}

static void test_mtp(void) {
    char dir[512], path[700], log[2048], err[512];
    snprintf(dir, sizeof dir, "%s/with-mtp", tmp);
    REQUIRE(broken_copy(dir, "config.json", "\"num_nextn_predict_layers\": 0", "\"num_nextn_predict_layers\": 1") == 0,
            "copy with num_nextn_predict_layers 1");
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    char *text = slurp(path, NULL);
    cJSON *idx = cJSON_Parse(text), *wm = cJSON_GetObjectItem(idx, "weight_map");
    free(text);
    cJSON *hdr = cJSON_CreateObject();
    char dpath[700];
    snprintf(dpath, sizeof dpath, "%s/mtp.data", tmp);
    FILE *data = fopen(dpath, "wb");
    REQUIRE(idx && wm && data, "index and data files");
    uint64_t off = 0;
    cJSON *names = cJSON_Duplicate(wm, 1);
    for (cJSON *e = names->child; e; e = e->next) {
        const char *n = e->string;
        if (strncmp(n, "layers.4.", 9) || strstr(n, "compressor") || strstr(n, "indexer")) continue;
        char dst[256];
        snprintf(dst, sizeof dst, "mtp.0.%s", n + 9);
        add_mtp(hdr, wm, data, &off, dst, n);
    }
    cJSON_Delete(names);
    static const char *extra[][2] = {
        {"mtp.0.e_proj.weight", "layers.4.ffn.shared_experts.w1.weight"},
        {"mtp.0.e_proj.scale", "layers.4.ffn.shared_experts.w1.scale"},
        {"mtp.0.h_proj.weight", "layers.4.ffn.shared_experts.w3.weight"},
        {"mtp.0.h_proj.scale", "layers.4.ffn.shared_experts.w3.scale"},
        {"mtp.0.enorm.weight", "layers.4.ffn_norm.weight"}, {"mtp.0.hnorm.weight", "layers.4.attn_norm.weight"},
        {"mtp.0.norm.weight", "norm.weight"}, {"mtp.0.hc_head_fn", "hc_head_fn"},
        {"mtp.0.hc_head_base", "hc_head_base"}, {"mtp.0.hc_head_scale", "hc_head_scale"},
    };
    for (size_t i = 0; i < sizeof extra / sizeof *extra; i++) add_mtp(hdr, wm, data, &off, extra[i][0], extra[i][1]);
    fclose(data);
    /* mtp.safetensors = u64 header length | header | data. */
    char *h = cJSON_PrintUnformatted(hdr);
    uint64_t hl = strlen(h);
    snprintf(path, sizeof path, "%s/mtp.safetensors", dir);
    FILE *f = fopen(path, "wb");
    size_t dlen;
    char *d = slurp(dpath, &dlen);
    REQUIRE(f && d, "mtp shard");
    fwrite(&hl, 8, 1, f);
    fwrite(h, 1, hl, f);
    fwrite(d, 1, dlen, f);
    fclose(f);
    free(d);
    free(h);
    cJSON_Delete(hdr);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    h = cJSON_Print(idx);
    f = fopen(path, "wb");
    REQUIRE(f, "index");
    fputs(h, f);
    fclose(f);
    free(h);
    cJSON_Delete(idx);

    char main_out[700], mtp_out[700], args[800];
    snprintf(main_out, sizeof main_out, "%s/mtp-main.gguf", tmp);
    snprintf(mtp_out, sizeof mtp_out, "%s/mtp.gguf", tmp);
    snprintf(args, sizeof args, "--mix f32 --mtp '%s'", mtp_out);
    REQUIRE(run_convert(args, dir, main_out, log, sizeof log) == 0, "%s", log);
    ds4_model m;
    REQUIRE(ds4_model_load(&m, main_out, err, sizeof err) == 0, "%s", err);
    CHECK(ds4_model_load_mtp(&m, mtp_out, err, sizeof err) == 0, "MTP load: %s", err);
    ds4_model_free(&m);
    gguf_file *a = gguf_open(mtp_out, err, sizeof err), *b = gguf_open(main_out, err, sizeof err);
    REQUIRE(a && b, "%s", err);
    static const char *same[][2] = {
        {"mtp.0.attn_q_a.weight", "blk.4.attn_q_a.weight"}, {"mtp.0.ffn_down_exps.weight", "blk.4.ffn_down_exps.weight"},
        {"mtp.0.exp_probs_b.bias", "blk.4.exp_probs_b.bias"}, {"mtp.0.e_proj.weight", "blk.4.ffn_gate_shexp.weight"},
        {"mtp.0.hc_head_fn.weight", "output_hc_fn.weight"}, {"mtp.0.norm.weight", "output_norm.weight"},
    };
    for (size_t i = 0; i < sizeof same / sizeof *same; i++) {
        const gguf_tensor *ta = gguf_find_tensor(a, same[i][0]), *tb = gguf_find_tensor(b, same[i][1]);
        CHECK(ta && tb && ta->nbytes == tb->nbytes && !memcmp(ta->data, tb->data, ta->nbytes), "%s != %s",
              same[i][0], same[i][1]);
    }
    CHECK(gguf_find_key(a, "tokenizer.ggml.tokens") < 0, "the MTP file carries no vocabulary");
    gguf_close(a);
    gguf_close(b);
    /* Asking for the MTP block of a checkpoint without one is an error. */
    CHECK(run_convert(args, fix, main_out, log, sizeof log) != 0 && strstr(log, "num_nextn_predict_layers"), "%s", log);
}

int main(void) {
    snprintf(fix, sizeof fix, "%s/tests/fixtures/oracle", test_env("DS4_ROOT", "."));
    snprintf(tmp, sizeof tmp, "/tmp/ds4-convert-XXXXXX");
    if (!mkdtemp(tmp)) { printf("0 passed, 1 failed\n"); return 1; }
    RUN(test_f32_layout_and_keys);
    RUN(test_f32_values);
    RUN(test_q2_mix);
    RUN(test_q4_mix);
    RUN(test_imatrix);
    RUN(test_refusals);
    RUN(test_mtp);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmp);
    TEST_END();
}
