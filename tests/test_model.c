/* Model binding: presets, layout table (counts/types/bytes of spec §2, §9,
 * §12), KV accounting (§7.2), ds4-synth round trips (tiny, MTP, full-shape
 * --no-data), and the exact error for each kind of broken file. */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "model/model.h"
#include "quant/quant.h"
#include "test.h"

static char dir[64];
static char synth[PATH_MAX];

static void path_in(char *buf, size_t n, const char *name) { snprintf(buf, n, "%s/%s", dir, name); }

static int run_synth(const char *args) {
    char cmd[PATH_MAX * 2];
    snprintf(cmd, sizeof cmd, "%s %s 2>/dev/null", synth, args);
    return system(cmd);
}

static uint64_t layout_bytes(const ds4_tensor_spec *s, int n) {
    uint64_t b = 0;
    for (int i = 0; i < n; i++) b += ggml_row_bytes(s[i].type, s[i].dims[0]) * s[i].dims[1] * s[i].dims[2];
    return b;
}

static uint64_t layout_params(const ds4_tensor_spec *s, int n) {
    uint64_t p = 0;
    for (int i = 0; i < n; i++)
        if (s[i].kind != DS4_TK_TID2EID) p += s[i].dims[0] * s[i].dims[1] * s[i].dims[2];
    return p;
}

static int count_type(const ds4_tensor_spec *s, int n, ggml_type t) {
    int c = 0;
    for (int i = 0; i < n; i++) c += s[i].type == t;
    return c;
}

static void test_presets_validate(void) {
    ds4_hparams hp;
    char err[256];
    ds4_hparams_flash(&hp);
    CHECK(ds4_hparams_validate(&hp, err, sizeof err) == 0, "%s", err);
    CHECK(ds4_hparams_is_flash_shape(&hp));
    int r4 = 0, r128 = 0, r0 = 0;
    for (uint32_t l = 0; l < hp.n_layer; l++) {
        r0 += hp.compress_ratio[l] == 0;
        r4 += hp.compress_ratio[l] == 4;
        r128 += hp.compress_ratio[l] == 128;
    }
    CHECK(r0 == 2 && r4 == 21 && r128 == 20, "%d %d %d", r0, r4, r128);   /* spec §1.2 */
    CHECK(hp.compress_ratio[43] == 0);
    ds4_hparams_tiny(&hp);
    CHECK(ds4_hparams_validate(&hp, err, sizeof err) == 0, "%s", err);
    CHECK(!ds4_hparams_is_flash_shape(&hp));
    CHECK(hp.n_layer == 6 && hp.compress_ratio[2] == 4 && hp.compress_ratio[3] == 128 && hp.compress_ratio[6] == 0);
}

/* Each inconsistency is reported with the key that causes it. */
static const char *mutate(ds4_hparams *h, int i) {
    switch (i) {
    case 0: h->rope_dim = 128; return "rope.dimension_count: 128 must be even and below attention.key_length 128";
    case 1: h->head_dim = 160; return "attention.key_length: 160 minus rope.dimension_count 64 is not a multiple of 64";
    case 2: h->idx_head_dim = 96; return "attention.indexer.key_length: 96 must be a power of two";
    case 3: h->o_groups = 3; return "attention.output_group_count: 3 does not divide attention.head_count 8";
    case 4: h->n_expert_used = 17; return "expert_used_count: 17 exceeds expert_count 16";
    case 5: h->n_hash_layer = 7; return "hash_layer_count: 7 exceeds block_count 6";
    case 6: h->compress_ratio[2] = 3; return "attention.compress_ratios[2]: 3, must be 0, 4 or a power of two >= 8";
    case 7: h->compress_ratio[6] = 4; return "attention.compress_ratios[6]: the MTP slot must be 0";
    case 8: h->n_head_kv = 2; return "attention.head_count_kv: 2, only 1";
    case 9: h->n_embd = 0; return "embedding_length: 0, must be in 1..";
    case 10: h->rms_eps = 0; return "attention.layer_norm_rms_epsilon: 0, must be positive";
    case 11: h->swiglu_clamp[1] = -1; return "swiglu_clamp_exp[1]: -1, must be positive";
    case 12: h->compress_ratio[3] = 96; return "attention.compress_ratios[3]: 96, must be 0, 4 or a power of two >= 8";
    default: return NULL;
    }
}

static void test_validate_rules(void) {
    const char *want;
    for (int i = 0; (want = mutate(&(ds4_hparams){0}, i)); i++) {
        ds4_hparams hp;
        char err[256] = "";
        ds4_hparams_tiny(&hp);
        mutate(&hp, i);
        CHECK(ds4_hparams_validate(&hp, err, sizeof err) == -1 && strstr(err, want), "case %d: got '%s'", i, err);
    }
}

/* Spec §2.4 count, §12 type counts, §9.1 parameters, §9.2 bytes. */
static void test_layout_flash(void) {
    ds4_hparams hp;
    ds4_hparams_flash(&hp);
    static ds4_tensor_spec s[1400];
    int n = ds4_layout(&hp, DS4_MIX_Q2, false, s, 1400);
    CHECK(n == 1328, "%d", n);
    CHECK(ds4_layout_max(&hp, false) == 1328);
    CHECK(count_type(s, n, GGML_F32) == 492 && count_type(s, n, GGML_F16) == 359 &&
          count_type(s, n, GGML_Q8_0) == 345 && count_type(s, n, GGML_Q2_K) == 43 &&
          count_type(s, n, GGML_IQ2_XXS) == 86 && count_type(s, n, GGML_I32) == 3);
    CHECK(layout_params(s, n) == 284332240471ull, "%llu", (unsigned long long)layout_params(s, n));
    CHECK(layout_bytes(s, n) == 86714775900ull, "%llu", (unsigned long long)layout_bytes(s, n));
    CHECK(!strcmp(s[0].name, "token_embd.weight") && s[0].dims[0] == 4096 && s[0].dims[1] == 129280);
    CHECK(!strcmp(s[5].name, "output.weight") && s[5].type == GGML_Q8_0);
    CHECK(!strcmp(s[6].name, "blk.0.hc_attn_fn.weight") && s[6].dims[0] == 16384 && s[6].dims[1] == 24);
    /* Layer 2 (ratio 4, hash) carries compressor, indexer and tid2eid. */
    bool idx2 = false, tid2 = false, ape2 = false, bias3 = false;
    for (int i = 0; i < n; i++) {
        idx2 |= !strcmp(s[i].name, "blk.2.indexer.attn_q_b.weight") && s[i].dims[1] == 8192 && s[i].type == GGML_F16;
        tid2 |= !strcmp(s[i].name, "blk.2.ffn_gate_tid2eid.weight") && s[i].dims[0] == 6 && s[i].dims[1] == 129280;
        ape2 |= !strcmp(s[i].name, "blk.3.attn_compressor_ape.weight") && s[i].dims[0] == 512 && s[i].dims[1] == 128;
        bias3 |= !strcmp(s[i].name, "blk.3.exp_probs_b.bias") && s[i].dims[0] == 256;
    }
    CHECK(idx2 && tid2 && ape2 && bias3);
    n = ds4_layout(&hp, DS4_MIX_Q4, false, s, 1400);
    CHECK(count_type(s, n, GGML_Q4_K) == 129 && count_type(s, n, GGML_IQ2_XXS) == 0);
    CHECK(layout_bytes(s, n) == 164628167004ull, "%llu", (unsigned long long)layout_bytes(s, n));
    n = ds4_layout(&hp, DS4_MIX_Q2, true, s, 1400);
    CHECK(n == 32, "%d", n);   /* spec §2.5: 32 tensors bound by ds4 */
    CHECK(layout_params(s, n) == 6610048891ull, "%llu", (unsigned long long)layout_params(s, n));
    /* §9.2: Q4_K experts, F32 plain tensors. */
    CHECK(layout_bytes(s, n) == 3807600108ull, "%llu", (unsigned long long)layout_bytes(s, n));
    n = ds4_layout(&hp, DS4_MIX_F32, false, s, 1400);
    CHECK(count_type(s, n, GGML_F32) == 1325 && count_type(s, n, GGML_I32) == 3);
}

/* Spec §7.2 table: compressed rows + fixed parts, f32. */
static void test_kv_bytes(void) {
    ds4_hparams hp;
    ds4_hparams_flash(&hp);
    ds4_kv_parts p;
    ds4_model_kv_parts(&hp, 100000, &p);
    CHECK(p.compressed == 1375989760ull, "%llu", (unsigned long long)p.compressed);
    CHECK(p.raw_window == 11272192ull && p.frontier == 12206080ull);
    CHECK(ds4_model_kv_bytes(&hp, 100000) == 1375989760ull + 11272192 + 12206080);
    ds4_model_kv_parts(&hp, 131072, &p);
    CHECK(p.compressed == 1803550720ull);
    ds4_model_kv_parts(&hp, 1000000, &p);
    CHECK(p.compressed == 13759979520ull);
    ds4_model_kv_parts(&hp, 1048576, &p);
    CHECK(p.compressed == 14428405760ull);
    CHECK(ds4_model_kv_bytes(&hp, 0) == 11272192ull + 12206080);
}

static bool all_f32(const ds4_tensor *t, float v) {
    if (!t->data || t->type != GGML_F32) return false;
    const float *x = t->data;
    for (int64_t i = 0; i < t->ne[0] * t->ne[1]; i++)
        if (x[i] != v) return false;
    return true;
}

static void check_tiny_layers(const ds4_model *m) {
    for (uint32_t l = 0; l < m->hp.n_layer; l++) {
        const ds4_layer *L = &m->layers[l];
        static const int ratio[6] = {0, 0, 4, 128, 4, 128};
        CHECK(L->ratio == ratio[l] && L->hash == (l < 3), "layer %u", l);
        const ds4_tensor *always[] = {&L->hc_attn_fn, &L->hc_attn_scale, &L->hc_attn_base, &L->attn_norm,
            &L->attn_q_a, &L->attn_q_a_norm, &L->attn_q_b, &L->attn_kv, &L->attn_kv_a_norm, &L->attn_sinks,
            &L->attn_output_a, &L->attn_output_b, &L->hc_ffn_fn, &L->hc_ffn_scale, &L->hc_ffn_base,
            &L->ffn_norm, &L->ffn_gate_inp, &L->gate_exps, &L->up_exps, &L->down_exps, &L->gate_shexp,
            &L->up_shexp, &L->down_shexp};
        for (size_t k = 0; k < sizeof always / sizeof always[0]; k++)
            CHECK(always[k]->data != NULL, "layer %u tensor %zu", l, k);
        CHECK((L->comp_kv.data != NULL) == (ratio[l] != 0) && (L->comp_ape.data != NULL) == (ratio[l] != 0));
        CHECK((L->idx_q_b.data != NULL) == (ratio[l] == 4) && (L->idx_comp_norm.data != NULL) == (ratio[l] == 4));
        CHECK((L->tid2eid.data != NULL) == (l < 3) && (L->exp_probs_b.data != NULL) == (l >= 3));
        CHECK(L->e_proj.data == NULL);
        CHECK(all_f32(&L->attn_norm, 1.0f) && all_f32(&L->hc_attn_scale, 0.5f) && all_f32(&L->attn_sinks, 0.0f));
    }
    /* TINY.md shapes and the published q2 types. */
    const ds4_layer *L2 = &m->layers[2], *L3 = &m->layers[3];
    CHECK(L2->attn_output_a.ne[0] == 512 && L2->attn_output_a.ne[1] == 128 && L2->attn_output_a.type == GGML_Q8_0);
    CHECK(L2->comp_kv.ne[1] == 256 && L3->comp_kv.ne[1] == 128 && L3->comp_ape.ne[1] == 128);
    CHECK(L2->idx_comp_kv.ne[1] == 256 && L2->hc_attn_fn.ne[0] == 1024 && L2->hc_attn_fn.ne[1] == 24);
    CHECK(L2->gate_exps.type == GGML_IQ2_XXS && L2->down_exps.type == GGML_Q2_K && L2->gate_exps.ne[2] == 16);
    CHECK(L2->gate_exps.row_bytes == 66 && L2->down_exps.row_bytes == 84);
    CHECK(m->tok_embd.type == GGML_F16 && m->output.type == GGML_Q8_0 && m->output.ne[1] == m->hp.n_vocab);
    /* Hash tables: n_used distinct experts per token, spread over all experts. */
    const int32_t *ids = m->layers[0].tid2eid.data;
    int hits[16] = {0};
    bool distinct = true;
    for (uint32_t t = 0; t < m->hp.n_vocab; t++)
        for (int a = 0; a < 4; a++) {
            hits[ids[t * 4 + a]]++;
            for (int b = 0; b < a; b++) distinct &= ids[t * 4 + a] != ids[t * 4 + b];
        }
    CHECK(distinct);
    for (int e = 0; e < 16; e++) CHECK(hits[e] > 1500 && hits[e] < 2500, "expert %d: %d", e, hits[e]);
}

static bool token_is(const gguf_file *f, uint64_t id, const char *text, int64_t type) {
    int64_t t = gguf_find_key(f, "tokenizer.ggml.tokens"), ty = gguf_find_key(f, "tokenizer.ggml.token_type");
    gguf_str s;
    int64_t tt;
    return t >= 0 && ty >= 0 && gguf_arr_get_str(f, t, id, &s) && gguf_str_eq(s, text) &&
           gguf_arr_get_i64(f, ty, id, &tt) && tt == type;
}

static void test_tiny_roundtrip(void) {
    char p1[128], p2[128], mtp[128], args[512], err[512];
    path_in(p1, sizeof p1, "tiny.gguf");
    path_in(p2, sizeof p2, "tiny2.gguf");
    path_in(mtp, sizeof mtp, "tiny-mtp.gguf");
    snprintf(args, sizeof args, "--preset tiny --mtp --seed 7 --threads 2 -o %s", p1);
    REQUIRE(run_synth(args) == 0, "ds4-synth tiny failed");
    struct stat st;
    REQUIRE(stat(p1, &st) == 0);
    CHECK(st.st_size > 10000000 && st.st_size < 24000000, "tiny is %lld bytes", (long long)st.st_size);
    ds4_model m;
    REQUIRE(ds4_model_load(&m, p1, err, sizeof err) == 0, "%s", err);
    CHECK(!m.is_full_shape);
    CHECK(m.hp.n_vocab == 8013, "%u", m.hp.n_vocab);
    CHECK(m.n_layout == 6 + 6 * 24 + 2 * 10 + 2 * 4, "%d", m.n_layout);
    check_tiny_layers(&m);
    /* Reduced vocabulary: V3 BPE ids 0..7999 (all reachable), then the V4
     * specials of prompt.md §1.5 as control tokens. */
    gguf_str pre;
    uint64_t n_merges = gguf_arr_len(m.gguf, gguf_find_key(m.gguf, "tokenizer.ggml.merges"));
    CHECK(gguf_key_str(m.gguf, "tokenizer.ggml.pre", &pre) && gguf_str_eq(pre, "joyai-llm"));
    CHECK(n_merges == 7741, "%llu merges", (unsigned long long)n_merges);
    CHECK(token_is(m.gguf, 0, "<｜begin▁of▁sentence｜>", 3) && token_is(m.gguf, 1, "<｜end▁of▁sentence｜>", 3));
    CHECK(token_is(m.gguf, 259, "Ġt", 1) && token_is(m.gguf, 8000, "<｜User｜>", 3));
    CHECK(token_is(m.gguf, 8002, "<think>", 3) && token_is(m.gguf, 8003, "</think>", 3) &&
          token_is(m.gguf, 8004, "｜DSML｜", 3) && token_is(m.gguf, 8012, "<｜image｜>", 3));
    REQUIRE(ds4_model_load_mtp(&m, mtp, err, sizeof err) == 0, "%s", err);
    CHECK(m.mtp.e_proj.data && m.mtp.h_proj.data && m.mtp.hc_head_fn.data && m.mtp.exp_probs_b.data);
    CHECK(m.mtp.gate_exps.type == GGML_Q4_K && m.mtp.hc_attn_fn.type == GGML_F32 && m.mtp.comp_kv.data == NULL);
    CHECK(m.mtp.e_proj.ne[0] == 256 && m.mtp.e_proj.ne[1] == 256 && all_f32(&m.mtp.enorm, 1.0f));
    CHECK(m.n_mtp_layout == 32);

    /* The report names the shape, each layer's kind and the exact count. */
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ds4_model_inspect(&m, 300, f);
    fclose(f);
    char want[96];
    snprintf(want, sizeof want, "parameters: %llu (", (unsigned long long)ds4_model_param_count(&m));
    CHECK(strstr(buf, want), "%s", buf);
    CHECK(strstr(buf, "layer 0: ratio 0, window only, hash-routed\n"));
    CHECK(strstr(buf, "layer 2: ratio 4, compressor + indexer, hash-routed\n"));
    CHECK(strstr(buf, "layer 5: ratio 128, compressor, biased top-k\n"));
    CHECK(strstr(buf, "quant mix: 178 tensors:") && strstr(buf, " IQ2_XXS 12 ("), "%s", buf);
    CHECK(strstr(buf, "architecture: deepseek4 (reduced shape)"));
    CHECK(strstr(buf, "memory at context 300: weights "));
    free(buf);
    ds4_model_free(&m);

    /* Same seed, different thread count: identical bytes. */
    snprintf(args, sizeof args, "--preset tiny --seed 7 --threads 1 -o %s", p2);
    REQUIRE(run_synth(args) == 0);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "cmp -s %s %s", p1, p2);
    CHECK(system(cmd) == 0, "output depends on the thread count");
    snprintf(args, sizeof args, "--preset tiny --seed 8 --threads 1 -o %s", p2);
    REQUIRE(run_synth(args) == 0);
    CHECK(system(cmd) != 0, "seed has no effect");
    unlink(p1);
    unlink(p2);
    unlink(mtp);
}

static void test_f32_mix(void) {
    char p[128], args[256], err[512];
    path_in(p, sizeof p, "tiny-f32.gguf");
    snprintf(args, sizeof args, "--preset tiny --mix f32 --layers 3 -o %s", p);
    REQUIRE(run_synth(args) == 0);
    ds4_model m;
    REQUIRE(ds4_model_load(&m, p, err, sizeof err) == 0, "%s", err);
    CHECK(m.hp.n_layer == 3 && m.layers[2].ratio == 4 && m.hp.compress_ratio[3] == 0);
    CHECK(m.layers[2].gate_exps.type == GGML_F32 && m.tok_embd.type == GGML_F32 && m.layers[0].tid2eid.type == GGML_I32);
    ds4_model_free(&m);
    unlink(p);
}

static void test_synth_bad_args(void) {
    char p[128], args[256];
    path_in(p, sizeof p, "bad.gguf");
    snprintf(args, sizeof args, "--preset tiny --tokenizer /nonexistent/tokenizer.json -o %s", p);
    CHECK(WEXITSTATUS(run_synth(args)) == 1);
    snprintf(args, sizeof args, "--preset huge -o %s", p);
    CHECK(WEXITSTATUS(run_synth(args)) == 2);
    snprintf(args, sizeof args, "--preset tiny --layers 7 -o %s", p);
    CHECK(WEXITSTATUS(run_synth(args)) == 2);
    CHECK(access(p, F_OK) != 0, "no output on failure");
}

/* --gain G: only token_embd changes, every value exactly 1/G times the
 * default one (G a power of two: f16 rounding commutes with the scaling
 * except in the subnormal range);
 * --gain 1 is the default file byte for byte; out-of-range values refused. */
static void test_synth_gain(void) {
    char p1[128], p2[128], args[256], err[512];
    path_in(p1, sizeof p1, "gain1.gguf");
    path_in(p2, sizeof p2, "gain4.gguf");
    snprintf(args, sizeof args, "--preset tiny --layers 2 --seed 3 --threads 2 -o %s", p1);
    REQUIRE(run_synth(args) == 0);
    snprintf(args, sizeof args, "--preset tiny --layers 2 --seed 3 --threads 2 --gain 0.25 -o %s", p2);
    REQUIRE(run_synth(args) == 0);
    gguf_file *a = gguf_open(p1, err, sizeof err), *b = gguf_open(p2, err, sizeof err);
    REQUIRE(a && b, "%s", err);
    REQUIRE(gguf_n_tensors(a) == gguf_n_tensors(b));
    int differ = 0;
    for (int64_t i = 0; i < gguf_n_tensors(a); i++) {
        const gguf_tensor *ta = gguf_tensor_at(a, i), *tb = gguf_tensor_at(b, i);
        REQUIRE(ta->nbytes == tb->nbytes && ta->name.len == tb->name.len && !memcmp(ta->name.ptr, tb->name.ptr, ta->name.len));
        if (!memcmp(ta->data, tb->data, ta->nbytes)) continue;
        differ++;
        CHECK(gguf_str_eq(ta->name, "token_embd.weight"), "tensor %lld changed", (long long)i);
    }
    CHECK(differ == 1, "%d tensors changed", differ);
    const gguf_tensor *ea = gguf_find_tensor(a, "token_embd.weight"), *eb = gguf_find_tensor(b, "token_embd.weight");
    REQUIRE(ea && eb && ea->type == GGML_F16);
    uint64_t n = ea->nbytes / 2, bad = 0;
    double ss = 0;
    for (uint64_t k = 0; k < n; k++) {
        uint16_t ha, hb;
        memcpy(&ha, (const uint8_t *)ea->data + 2 * k, 2);
        memcpy(&hb, (const uint8_t *)eb->data + 2 * k, 2);
        float va = ds4_f16_to_f32(ha), vb = ds4_f16_to_f32(hb);
        /* Exact where the default value is a normal f16; a subnormal one
         * (|v| < 2^-14) was rounded to the 2^-24 grid, so within 2^-23·4. */
        bad += fabsf(va) >= 0x1p-14f ? vb != 4.0f * va : fabsf(vb - 4.0f * va) > 0x1p-21f;
        ss += (double)va * va;
    }
    CHECK(bad == 0, "%llu of %llu embedding values are not 4x", (unsigned long long)bad, (unsigned long long)n);
    /* Default spread at the tiny width: 0.02·sqrt(4096/256) = 0.08. */
    CHECK(fabs(sqrt(ss / n) - 0.08) < 0.002, "embedding rms %g", sqrt(ss / n));
    gguf_close(a);
    gguf_close(b);
    snprintf(args, sizeof args, "--preset tiny --layers 2 --seed 3 --threads 1 --gain 1 -o %s", p2);
    REQUIRE(run_synth(args) == 0);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "cmp -s %s %s", p1, p2);
    CHECK(system(cmd) == 0, "--gain 1 differs from the default");
    unlink(p1);
    unlink(p2);
    const char *bad_gain[] = {"0", "-0.5", "1.5", "9e-6", "nan", "0.1x", ""};
    for (size_t k = 0; k < sizeof bad_gain / sizeof *bad_gain; k++) {
        snprintf(args, sizeof args, "--preset tiny --gain '%s' -o %s", bad_gain[k], p1);
        CHECK(WEXITSTATUS(run_synth(args)) == 2, "--gain '%s' accepted", bad_gain[k]);
    }
    CHECK(access(p1, F_OK) != 0, "no output on failure");
}

/* Full published shapes without writing 87 GB: header + sparse hole. */
static void test_flash_nodata(void) {
    char p[128], mtp[128], args[256], err[512];
    path_in(p, sizeof p, "flash.gguf");
    path_in(mtp, sizeof mtp, "flash-mtp.gguf");
    snprintf(args, sizeof args, "--preset flash-q2 --no-data --mtp -o %s", p);
    REQUIRE(run_synth(args) == 0);
    struct stat st;
    REQUIRE(stat(p, &st) == 0);
    CHECK((uint64_t)st.st_size > 86714775900ull && (uint64_t)st.st_blocks * 512 < (64ull << 20),
          "size %lld, allocated %lld", (long long)st.st_size, (long long)st.st_blocks * 512);
    ds4_model m;
    REQUIRE(ds4_model_load(&m, p, err, sizeof err) == 0, "%s", err);
    CHECK(m.is_full_shape && m.n_layout == 1328);
    CHECK(ds4_model_param_count(&m) == 284332240471ull);
    CHECK(ds4_model_weight_bytes(&m) == 86714775900ull);
    CHECK(m.hp.n_vocab == 129280 && m.layers[42].ratio == 4 && m.layers[41].ratio == 128);
    /* V4 layout: specials at their published ids, placeholders elsewhere. */
    CHECK(token_is(m.gguf, 128821, "<think>", 3) && token_is(m.gguf, 128825, "｜DSML｜", 3) &&
          token_is(m.gguf, 128803, "<｜User｜>", 3) && token_is(m.gguf, 128000, "<｜place▁holder▁no▁0｜>", 3) &&
          token_is(m.gguf, 127999, "å±ĭæªĲ", 1) && token_is(m.gguf, 129279, "<｜image｜>", 3));
    REQUIRE(ds4_model_load_mtp(&m, mtp, err, sizeof err) == 0, "%s", err);
    CHECK(ds4_model_weight_bytes(&m) == 86714775900ull + 3807600108ull);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ds4_model_inspect(&m, 100000, f);
    fclose(f);
    CHECK(strstr(buf, "parameters: 284332240471 (284.33 B)"), "%s", buf);
    CHECK(strstr(buf, "quant mix: 1328 tensors: F32 492 (") && strstr(buf, " Q2_K 43 (") ,"%s", buf);
    CHECK(strstr(buf, "(published DeepSeek V4 Flash shape)"));
    free(buf);
    ds4_model_free(&m);
    snprintf(args, sizeof args, "--preset flash-q4 --no-data -o %s", p);
    REQUIRE(run_synth(args) == 0);
    REQUIRE(ds4_model_load(&m, p, err, sizeof err) == 0, "%s", err);
    CHECK(m.is_full_shape && m.layers[0].gate_exps.type == GGML_Q4_K && ds4_model_weight_bytes(&m) == 164628167004ull);
    ds4_model_free(&m);
    unlink(p);
    unlink(mtp);
}

/* ---- broken files ------------------------------------------------------- */

#define NO_BAD_ID INT32_MIN
/* Writes hp + specs (data zero, except tid2eid = token % n_expert with one
 * entry replaced by bad_id unless NO_BAD_ID). nodata: header only, sparse. */
static int write_model(const char *path, const ds4_hparams *hp, const ds4_tensor_spec *s, int n,
                       bool nodata, int32_t bad_id) {
    gguf_writer *w = gguf_writer_new(32);
    char err[256];
    ds4_hparams_write(hp, w);
    for (int i = 0; i < n; i++) gguf_add_tensor(w, s[i].name, s[i].type, s[i].n_dims, s[i].dims);
    if (gguf_writer_begin(w, path, err, sizeof err)) { fprintf(stderr, "%s\n", err); gguf_writer_free(w); return -1; }
    if (nodata) {
        /* The writer unlinks unfinished files: keep this one under a second name. */
        char tmp[256];
        snprintf(tmp, sizeof tmp, "%s.keep", path);
        int rc = link(path, tmp);
        gguf_writer_free(w);
        return rc || rename(tmp, path) ? -1 : 0;
    }
    for (int i = 0; i < n; i++) {
        uint64_t nb = gguf_writer_tensor_bytes(w, i);
        uint8_t *buf = calloc(1, nb);
        if (s[i].kind == DS4_TK_TID2EID) {
            int32_t *ids = (int32_t *)buf;
            for (uint64_t j = 0; j < nb / 4; j++) ids[j] = (int32_t)(j % hp->n_expert);
            if (bad_id != NO_BAD_ID) ids[nb / 4 - 3] = bad_id;
        }
        gguf_writer_write_tensor(w, i, 0, buf, nb);
        free(buf);
    }
    int rc = gguf_writer_finish(w, err, sizeof err);
    gguf_writer_free(w);
    return rc;
}

static ds4_tensor_spec *find(ds4_tensor_spec *s, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (!strcmp(s[i].name, name)) return &s[i];
    return NULL;
}

/* Load must fail with a message containing `want`. */
static void expect_error(const char *path, const char *want) {
    ds4_model m;
    char err[512] = "";
    int rc = ds4_model_load(&m, path, err, sizeof err);
    CHECK(rc == -1 && strstr(err, want), "want '%s', got rc %d '%s'", want, rc, err);
    if (rc == 0) ds4_model_free(&m);
}

/* Replace the first occurrence of `from` in the file by `to` (same length). */
static void patch(const char *path, const void *from, const void *to, size_t len) {
    FILE *f = fopen(path, "r+b");
    REQUIRE(f);
    static uint8_t buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, f);
    uint8_t *hit = memmem(buf, n, from, len);
    CHECK(hit != NULL, "pattern not in header");
    if (hit) {
        fseek(f, hit - buf, SEEK_SET);
        fwrite(to, 1, len, f);
    }
    fclose(f);
}

static void test_broken_files(void) {
    ds4_hparams hp;
    ds4_hparams_tiny(&hp);
    hp.n_vocab = 512;   /* no tokenizer keys in these files; small tables */
    static ds4_tensor_spec s[400];
    int n = ds4_layout(&hp, DS4_MIX_Q2, false, s, 400);
    char p[128], err[512];
    path_in(p, sizeof p, "broken.gguf");

    /* Baseline loads. */
    REQUIRE(write_model(p, &hp, s, n, false, NO_BAD_ID) == 0);
    ds4_model m;
    CHECK(ds4_model_load(&m, p, err, sizeof err) == 0, "%s", err);
    ds4_model_free(&m);

    /* Missing tensor: drop blk.4.indexer.proj.weight. */
    ds4_tensor_spec t[400];
    int k = 0;
    for (int i = 0; i < n; i++)
        if (strcmp(s[i].name, "blk.4.indexer.proj.weight")) t[k++] = s[i];
    REQUIRE(write_model(p, &hp, t, k, false, NO_BAD_ID) == 0);
    expect_error(p, "missing tensor blk.4.indexer.proj.weight");

    /* Wrong dims. */
    memcpy(t, s, sizeof(ds4_tensor_spec) * (size_t)n);
    find(t, n, "blk.1.attn_q_b.weight")->dims[1] = 512;
    REQUIRE(write_model(p, &hp, t, n, false, NO_BAD_ID) == 0);
    expect_error(p, "tensor blk.1.attn_q_b.weight: dims [128, 512], expected [128, 1024]");

    /* Wrong type: a K-quant where Q8_0 (or a float) is expected. */
    memcpy(t, s, sizeof(ds4_tensor_spec) * (size_t)n);
    find(t, n, "blk.0.attn_kv.weight")->type = GGML_Q4_K;
    REQUIRE(write_model(p, &hp, t, n, false, NO_BAD_ID) == 0);
    expect_error(p, "tensor blk.0.attn_kv.weight: type Q4_K, expected Q8_0");

    /* A float where a quant is published is fine in a test file... */
    memcpy(t, s, sizeof(ds4_tensor_spec) * (size_t)n);
    find(t, n, "blk.0.attn_kv.weight")->type = GGML_F16;
    find(t, n, "blk.3.ffn_down_exps.weight")->type = GGML_Q4_K;
    REQUIRE(write_model(p, &hp, t, n, false, NO_BAD_ID) == 0);
    CHECK(ds4_model_load(&m, p, err, sizeof err) == 0, "%s", err);
    CHECK(m.layers[0].attn_kv.type == GGML_F16 && m.layers[0].attn_kv.row_bytes == 512);
    ds4_model_free(&m);
    /* ...but the hash table must be I32. */
    find(t, n, "blk.1.ffn_gate_tid2eid.weight")->type = GGML_F32;
    REQUIRE(write_model(p, &hp, t, n, false, NO_BAD_ID) == 0);
    expect_error(p, "tensor blk.1.ffn_gate_tid2eid.weight: type F32, expected I32");

    /* Unknown extra tensor. */
    memcpy(t, s, sizeof(ds4_tensor_spec) * (size_t)n);
    t[n] = t[n - 1];
    snprintf(t[n].name, sizeof t[n].name, "blk.5.attn_bogus.weight");
    REQUIRE(write_model(p, &hp, t, n + 1, false, NO_BAD_ID) == 0);
    expect_error(p, "unexpected tensor blk.5.attn_bogus.weight");

    /* Presence rules follow the ratios: a compressor on a window-only layer
     * is an unexpected tensor. */
    memcpy(t, s, sizeof(ds4_tensor_spec) * (size_t)n);
    ds4_tensor_spec *c = find(t, n, "blk.2.attn_compressor_norm.weight");
    t[n] = *c;
    snprintf(t[n].name, sizeof t[n].name, "blk.0.attn_compressor_norm.weight");
    REQUIRE(write_model(p, &hp, t, n + 1, false, NO_BAD_ID) == 0);
    expect_error(p, "unexpected tensor blk.0.attn_compressor_norm.weight");

    /* tid2eid naming an expert that does not exist. */
    REQUIRE(write_model(p, &hp, s, n, false, 16) == 0);
    expect_error(p, "tensor blk.0.ffn_gate_tid2eid.weight: token 511 routes to expert 16, expert_count is 16");
    REQUIRE(write_model(p, &hp, s, n, false, -2) == 0);
    expect_error(p, "routes to expert -2");

    /* Missing key: rename it in place (same length, file stays valid). */
    REQUIRE(write_model(p, &hp, s, n, false, NO_BAD_ID) == 0);
    patch(p, "deepseek4.expert_count", "deepseek4.expert_cXunt", 22);
    expect_error(p, "missing required key deepseek4.expert_count");
    /* Wrong key type: u32 (4) -> f32 (6) tag on an integer key. */
    REQUIRE(write_model(p, &hp, s, n, false, NO_BAD_ID) == 0);
    const char key[] = "deepseek4.attention.head_count\x04\x00\x00\x00";
    const char bad[] = "deepseek4.attention.head_count\x06\x00\x00\x00";
    patch(p, key, bad, sizeof key - 1);
    expect_error(p, "deepseek4.attention.head_count: expected u32, found type 6");
    /* Inconsistent value: 3 output groups for 8 heads. */
    REQUIRE(write_model(p, &hp, s, n, false, NO_BAD_ID) == 0);
    const char og[] = "deepseek4.attention.output_group_count\x04\x00\x00\x00\x02\x00\x00\x00";
    const char og3[] = "deepseek4.attention.output_group_count\x04\x00\x00\x00\x03\x00\x00\x00";
    patch(p, og, og3, sizeof og - 1);
    expect_error(p, "deepseek4.attention.output_group_count: 3 does not divide attention.head_count 8");

    /* Full published shape: exact types, and every key at its published value. */
    ds4_hparams fl;
    ds4_hparams_flash(&fl);
    static ds4_tensor_spec f[1400];
    int nf = ds4_layout(&fl, DS4_MIX_Q2, false, f, 1400);
    REQUIRE(write_model(p, &fl, f, nf, true, NO_BAD_ID) == 0);
    CHECK(ds4_model_load(&m, p, err, sizeof err) == 0, "%s", err);
    CHECK(m.is_full_shape);
    ds4_model_free(&m);
    find(f, nf, "blk.7.attn_q_a.weight")->type = GGML_F16;
    REQUIRE(write_model(p, &fl, f, nf, true, NO_BAD_ID) == 0);
    expect_error(p, "tensor blk.7.attn_q_a.weight: type F16, expected Q8_0 (published layout)");
    ds4_layout(&fl, DS4_MIX_Q2, false, f, 1400);
    fl.idx_top_k = 256;
    REQUIRE(write_model(p, &fl, f, nf, true, NO_BAD_ID) == 0);
    expect_error(p, "claims the published 43-layer shape but deepseek4.attention.indexer.top_k: 256, the published model has 512");
    unlink(p);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/ds4-test-model-XXXXXX");
    if (!mkdtemp(dir)) { perror("mkdtemp"); return 1; }
    snprintf(synth, sizeof synth, "%s/ds4-synth", test_env("DS4_BIN", "build/bin"));
    RUN(test_presets_validate);
    RUN(test_validate_rules);
    RUN(test_layout_flash);
    RUN(test_kv_bytes);
    RUN(test_tiny_roundtrip);
    RUN(test_f32_mix);
    RUN(test_synth_bad_args);
    RUN(test_synth_gain);
    RUN(test_flash_nodata);
    RUN(test_broken_files);
    rmdir(dir);
    TEST_END();
}
