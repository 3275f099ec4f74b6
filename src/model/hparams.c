/* deepseek4.* hyperparameters: published values, the tiny test shape, GGUF
 * write (types of spec §1.1) and read (the encodings antirez/ds4 accepts),
 * and a self-consistency check that names the offending key. */
#include <math.h>
#include <stdarg.h>
#include <string.h>

#include "model/model.h"
#include "util/errf.h"

#define KEY(s) "deepseek4." s

/* Fields shared by both presets: the real model's values (spec §1.1). */
static void common(ds4_hparams *hp) {
    memset(hp, 0, sizeof *hp);
    hp->n_head_kv = 1;
    hp->rope_dim = 64;
    hp->n_expert_shared = 1;
    hp->n_hash_layer = 3;
    hp->expert_weights_norm = true;
    hp->expert_weights_scale = 1.5f;
    hp->window = 128;
    hp->hc_count = 4;
    hp->hc_sinkhorn_iters = 20;
    hp->hc_eps = 1e-6f;
    hp->rms_eps = 1e-6f;
    hp->rope_base = 10000.0f;
    hp->compress_rope_base = 160000.0f;
    hp->yarn_factor = 16.0f;
    hp->yarn_orig_ctx = 65536;
    hp->yarn_beta_fast = 32.0f;
    hp->yarn_beta_slow = 1.0f;
    hp->n_mtp = 1;
}

void ds4_hparams_flash(ds4_hparams *hp) {
    common(hp);
    hp->n_layer = 43;
    hp->n_embd = 4096;
    hp->n_vocab = 129280;
    hp->n_head = 64;
    hp->head_dim = 512;
    hp->q_lora = 1024;
    hp->o_groups = 8;
    hp->o_lora = 1024;
    hp->n_expert = 256;
    hp->n_expert_used = 6;
    hp->expert_ff = 2048;
    hp->idx_n_head = 64;
    hp->idx_head_dim = 128;
    hp->idx_top_k = 512;
    hp->ctx_max = 1048576;
    /* Spec §1.2: 0 for layers 0,1; 4 on even, 128 on odd layers >= 2; the
     * MTP slot (index 43) is 0. */
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        hp->compress_ratio[l] = l < 2 ? 0 : (l % 2 == 0 ? 4 : 128);
        hp->swiglu_clamp[l] = 10.0f;
    }
    hp->compress_ratio[hp->n_layer] = 0;
    hp->swiglu_clamp[hp->n_layer] = 10.0f;
}

/* TINY.md: every layer kind within a few hundred tokens; every row length a
 * multiple of 256. n_vocab is the reduced vocabulary ds4-synth builds from
 * the V3 tokenizer (8000 BPE ids + 13 V4 specials); the synth overwrites it
 * with the count it actually built. */
void ds4_hparams_tiny(ds4_hparams *hp) {
    static const int32_t ratios[7] = {0, 0, 4, 128, 4, 128, 0};
    common(hp);
    hp->n_layer = 6;
    hp->n_embd = 256;
    hp->n_vocab = 8013;
    hp->n_head = 8;
    hp->head_dim = 128;
    hp->q_lora = 128;
    hp->o_groups = 2;
    hp->o_lora = 64;
    hp->n_expert = 16;
    hp->n_expert_used = 4;
    hp->expert_ff = 256;
    hp->idx_n_head = 4;
    hp->idx_head_dim = 128;
    hp->idx_top_k = 16;
    hp->ctx_max = 65536;
    for (uint32_t l = 0; l <= hp->n_layer; l++) {
        hp->compress_ratio[l] = ratios[l];
        hp->swiglu_clamp[l] = 10.0f;
    }
}

void ds4_hparams_write(const ds4_hparams *hp, gguf_writer *w) {
    gguf_set_str(w, "general.architecture", "deepseek4");
    gguf_set_u32(w, KEY("context_length"), hp->ctx_max);
    gguf_set_u32(w, KEY("block_count"), hp->n_layer);
    gguf_set_u32(w, KEY("embedding_length"), hp->n_embd);
    gguf_set_u32(w, KEY("vocab_size"), hp->n_vocab);
    gguf_set_u32(w, KEY("attention.head_count"), hp->n_head);
    gguf_set_u32(w, KEY("attention.head_count_kv"), hp->n_head_kv);
    gguf_set_u32(w, KEY("attention.key_length"), hp->head_dim);
    gguf_set_u32(w, KEY("attention.value_length"), hp->head_dim);
    gguf_set_u32(w, KEY("rope.dimension_count"), hp->rope_dim);
    gguf_set_u32(w, KEY("attention.q_lora_rank"), hp->q_lora);
    gguf_set_u32(w, KEY("attention.output_group_count"), hp->o_groups);
    gguf_set_u32(w, KEY("attention.output_lora_rank"), hp->o_lora);
    gguf_set_u32(w, KEY("expert_count"), hp->n_expert);
    gguf_set_u32(w, KEY("expert_used_count"), hp->n_expert_used);
    gguf_set_u32(w, KEY("expert_shared_count"), hp->n_expert_shared);
    gguf_set_u32(w, KEY("expert_feed_forward_length"), hp->expert_ff);
    gguf_set_u32(w, KEY("hash_layer_count"), hp->n_hash_layer);
    gguf_set_u32(w, KEY("expert_gating_func"), 4); /* sqrt(softplus) */
    gguf_set_bool(w, KEY("expert_weights_norm"), hp->expert_weights_norm);
    gguf_set_f32(w, KEY("expert_weights_scale"), hp->expert_weights_scale);
    gguf_set_arr_f32(w, KEY("swiglu_clamp_exp"), hp->swiglu_clamp, hp->n_layer);
    gguf_set_u32(w, KEY("attention.sliding_window"), hp->window);
    /* n_layer + 1 entries: the last is the MTP block's slot (spec §1.2). */
    gguf_set_arr_i32(w, KEY("attention.compress_ratios"), hp->compress_ratio, hp->n_layer + 1);
    gguf_set_u32(w, KEY("attention.indexer.head_count"), hp->idx_n_head);
    gguf_set_u32(w, KEY("attention.indexer.key_length"), hp->idx_head_dim);
    gguf_set_u32(w, KEY("attention.indexer.top_k"), hp->idx_top_k);
    gguf_set_u32(w, KEY("hyper_connection.count"), hp->hc_count);
    gguf_set_u32(w, KEY("hyper_connection.sinkhorn_iterations"), hp->hc_sinkhorn_iters);
    gguf_set_f32(w, KEY("hyper_connection.epsilon"), hp->hc_eps);
    gguf_set_f32(w, KEY("attention.layer_norm_rms_epsilon"), hp->rms_eps);
    gguf_set_f32(w, KEY("rope.freq_base"), hp->rope_base);
    gguf_set_f32(w, KEY("attention.compress_rope_freq_base"), hp->compress_rope_base);
    gguf_set_str(w, KEY("rope.scaling.type"), "yarn");
    gguf_set_f32(w, KEY("rope.scaling.factor"), hp->yarn_factor);
    gguf_set_u32(w, KEY("rope.scaling.original_context_length"), hp->yarn_orig_ctx);
    gguf_set_f32(w, KEY("rope.scaling.yarn_beta_fast"), hp->yarn_beta_fast);
    gguf_set_f32(w, KEY("rope.scaling.yarn_beta_slow"), hp->yarn_beta_slow);
    gguf_set_u32(w, KEY("nextn_predict_layers"), hp->n_mtp);
}

/* ---- reading ------------------------------------------------------------ */

typedef struct {
    const gguf_file *f;
    char *err;
    size_t n;
} rd;

static int64_t need(rd *r, const char *key) {
    int64_t i = gguf_find_key(r->f, key);
    if (i < 0) ds4_errf(r->err, r->n, "missing required key %s", key);
    return i;
}

/* Integer keys: u32 as written by the converter, u64 also accepted. */
static int get_u32(rd *r, const char *key, uint32_t *out) {
    int64_t i = need(r, key);
    if (i < 0) return -1;
    gguf_vtype t = gguf_kv_type(r->f, i);
    uint64_t v;
    if ((t != GGUF_U32 && t != GGUF_U64) || !gguf_get_u64(r->f, i, &v))
        return ds4_errf(r->err, r->n, "%s: expected u32, found type %d", key, (int)t);
    if (v > UINT32_MAX) return ds4_errf(r->err, r->n, "%s: value %llu out of range", key, (unsigned long long)v);
    *out = (uint32_t)v;
    return 0;
}

/* Float keys: f32 as written; f64, i32 and u32 accepted like ds4's required_f32. */
static int get_f32(rd *r, const char *key, float *out) {
    int64_t i = need(r, key);
    if (i < 0) return -1;
    gguf_vtype t = gguf_kv_type(r->f, i);
    double v;
    if ((t != GGUF_F32 && t != GGUF_F64 && t != GGUF_I32 && t != GGUF_U32) || !gguf_get_f64(r->f, i, &v))
        return ds4_errf(r->err, r->n, "%s: expected f32, found type %d", key, (int)t);
    if (!isfinite(v)) return ds4_errf(r->err, r->n, "%s: value is not finite", key);
    *out = (float)v;
    return 0;
}

static int get_bool(rd *r, const char *key, bool *out) {
    int64_t i = need(r, key);
    if (i < 0) return -1;
    if (gguf_kv_type(r->f, i) != GGUF_BOOL || !gguf_get_bool(r->f, i, out))
        return ds4_errf(r->err, r->n, "%s: expected bool, found type %d", key, (int)gguf_kv_type(r->f, i));
    return 0;
}

/* An array of at least `min` numbers of one of the two item types. */
static int64_t get_arr(rd *r, const char *key, gguf_vtype a, gguf_vtype b, uint64_t min) {
    int64_t i = need(r, key);
    if (i < 0) return -1;
    if (gguf_kv_type(r->f, i) != GGUF_ARRAY)
        return ds4_errf(r->err, r->n, "%s: expected an array, found type %d", key, (int)gguf_kv_type(r->f, i));
    gguf_vtype t = gguf_arr_type(r->f, i);
    if (t != a && t != b) return ds4_errf(r->err, r->n, "%s: unexpected array item type %d", key, (int)t);
    if (gguf_arr_len(r->f, i) < min)
        return ds4_errf(r->err, r->n, "%s: %llu entries, need %llu (one per layer)", key,
                    (unsigned long long)gguf_arr_len(r->f, i), (unsigned long long)min);
    return i;
}

int ds4_hparams_read(ds4_hparams *hp, const gguf_file *f, char *err, size_t errlen) {
    rd r = {f, err, errlen};
    memset(hp, 0, sizeof *hp);
    gguf_str arch;
    int64_t ai = need(&r, "general.architecture");
    if (ai < 0) return -1;
    if (!gguf_get_str(f, ai, &arch) || !gguf_str_eq(arch, "deepseek4"))
        return ds4_errf(err, errlen, "general.architecture: not \"deepseek4\"");

    struct { const char *key; uint32_t *dst; } u32s[] = {
        {KEY("block_count"), &hp->n_layer},
        {KEY("embedding_length"), &hp->n_embd},
        {KEY("vocab_size"), &hp->n_vocab},
        {KEY("attention.head_count"), &hp->n_head},
        {KEY("attention.head_count_kv"), &hp->n_head_kv},
        {KEY("attention.key_length"), &hp->head_dim},
        {KEY("rope.dimension_count"), &hp->rope_dim},
        {KEY("attention.q_lora_rank"), &hp->q_lora},
        {KEY("attention.output_group_count"), &hp->o_groups},
        {KEY("attention.output_lora_rank"), &hp->o_lora},
        {KEY("expert_count"), &hp->n_expert},
        {KEY("expert_used_count"), &hp->n_expert_used},
        {KEY("expert_shared_count"), &hp->n_expert_shared},
        {KEY("expert_feed_forward_length"), &hp->expert_ff},
        {KEY("hash_layer_count"), &hp->n_hash_layer},
        {KEY("attention.sliding_window"), &hp->window},
        {KEY("attention.indexer.head_count"), &hp->idx_n_head},
        {KEY("attention.indexer.key_length"), &hp->idx_head_dim},
        {KEY("attention.indexer.top_k"), &hp->idx_top_k},
        {KEY("hyper_connection.count"), &hp->hc_count},
        {KEY("hyper_connection.sinkhorn_iterations"), &hp->hc_sinkhorn_iters},
        {KEY("rope.scaling.original_context_length"), &hp->yarn_orig_ctx},
        {KEY("context_length"), &hp->ctx_max},
    };
    for (size_t k = 0; k < sizeof u32s / sizeof u32s[0]; k++)
        if (get_u32(&r, u32s[k].key, u32s[k].dst)) return -1;
    struct { const char *key; float *dst; } f32s[] = {
        {KEY("expert_weights_scale"), &hp->expert_weights_scale},
        {KEY("hyper_connection.epsilon"), &hp->hc_eps},
        {KEY("attention.layer_norm_rms_epsilon"), &hp->rms_eps},
        {KEY("rope.freq_base"), &hp->rope_base},
        {KEY("attention.compress_rope_freq_base"), &hp->compress_rope_base},
        {KEY("rope.scaling.factor"), &hp->yarn_factor},
        {KEY("rope.scaling.yarn_beta_fast"), &hp->yarn_beta_fast},
        {KEY("rope.scaling.yarn_beta_slow"), &hp->yarn_beta_slow},
    };
    for (size_t k = 0; k < sizeof f32s / sizeof f32s[0]; k++)
        if (get_f32(&r, f32s[k].key, f32s[k].dst)) return -1;
    if (get_bool(&r, KEY("expert_weights_norm"), &hp->expert_weights_norm)) return -1;

    /* K and V share one head (MQA with K = V): the two keys must agree. */
    uint32_t vlen;
    if (get_u32(&r, KEY("attention.value_length"), &vlen)) return -1;
    if (vlen != hp->head_dim)
        return ds4_errf(err, errlen, "%s: %u differs from attention.key_length %u",
                    KEY("attention.value_length"), vlen, hp->head_dim);

    /* Expert groups are not used by V4 Flash; ds4 requires 0 or absent. */
    static const char *const zero_keys[] = {KEY("expert_group_count"), KEY("expert_group_used_count")};
    for (int k = 0; k < 2; k++) {
        uint64_t v;
        if (gguf_find_key(f, zero_keys[k]) >= 0 && (!gguf_key_u64(f, zero_keys[k], &v) || v != 0))
            return ds4_errf(err, errlen, "%s: must be 0 or absent (no expert groups)", zero_keys[k]);
    }
    /* Optional: nextn_predict_layers (ds4 does not read it). */
    uint64_t nmtp = 1;
    if (gguf_find_key(f, KEY("nextn_predict_layers")) >= 0 &&
        (!gguf_key_u64(f, KEY("nextn_predict_layers"), &nmtp) || nmtp > 1))
        return ds4_errf(err, errlen, "%s: expected 0 or 1", KEY("nextn_predict_layers"));
    hp->n_mtp = (uint32_t)nmtp;

    if (hp->n_layer < 1 || hp->n_layer > DS4_MAX_LAYERS)
        return ds4_errf(err, errlen, "%s: %u layers, supported 1..%d", KEY("block_count"), hp->n_layer, DS4_MAX_LAYERS);

    int64_t ci = get_arr(&r, KEY("swiglu_clamp_exp"), GGUF_F32, GGUF_F64, hp->n_layer);
    if (ci < 0) return -1;
    for (uint32_t l = 0; l <= hp->n_layer; l++) {
        double v;
        /* The published array has one entry per layer; the MTP slot reuses
         * the last layer's clamp unless the file carries an extra entry. */
        uint64_t j = l < gguf_arr_len(f, ci) ? l : hp->n_layer - 1;
        if (!gguf_arr_get_f64(f, ci, j, &v))
            return ds4_errf(err, errlen, "%s[%llu]: unreadable", KEY("swiglu_clamp_exp"), (unsigned long long)j);
        hp->swiglu_clamp[l] = (float)v;
    }
    int64_t ri = get_arr(&r, KEY("attention.compress_ratios"), GGUF_I32, GGUF_U32, hp->n_layer);
    if (ri < 0) return -1;
    for (uint32_t l = 0; l <= hp->n_layer; l++) {
        int64_t v = 0;
        /* Entry n_layer is the MTP slot; a file without it has no compressed MTP. */
        if (l < gguf_arr_len(f, ri) && !gguf_arr_get_i64(f, ri, l, &v))
            return ds4_errf(err, errlen, "%s[%u]: unreadable", KEY("attention.compress_ratios"), l);
        if (v < 0 || v > (1 << 20))
            return ds4_errf(err, errlen, "%s[%u]: %lld out of range", KEY("attention.compress_ratios"), l, (long long)v);
        hp->compress_ratio[l] = (int32_t)v;
    }

    /* A tokenizer token list, when present, must cover the embedding rows. */
    int64_t ti = gguf_find_key(f, "tokenizer.ggml.tokens");
    if (ti >= 0 && (gguf_kv_type(f, ti) != GGUF_ARRAY || gguf_arr_len(f, ti) != hp->n_vocab))
        return ds4_errf(err, errlen, "tokenizer.ggml.tokens: %llu tokens but %s is %u",
                    (unsigned long long)(gguf_kv_type(f, ti) == GGUF_ARRAY ? gguf_arr_len(f, ti) : 0),
                    KEY("vocab_size"), hp->n_vocab);
    int64_t gi = gguf_find_key(f, KEY("expert_gating_func"));
    uint64_t gating;
    if (gi >= 0 && (!gguf_key_u64(f, KEY("expert_gating_func"), &gating) || gating != 4))
        return ds4_errf(err, errlen, "%s: only 4 (sqrt(softplus)) is supported", KEY("expert_gating_func"));
    return ds4_hparams_validate(hp, err, errlen);
}

static bool pow2(uint64_t v) { return v && !(v & (v - 1)); }

/* Bounds keep every derived size (tensor dims, parameter counts, KV bytes)
 * far from overflow: a width above 2^20 or a count above 2^24 is not a DS4. */
#define DIM_MAX (1u << 20)
#define COUNT_MAX (1u << 24)

int ds4_hparams_validate(const ds4_hparams *hp, char *err, size_t n) {
    struct { const char *key; uint32_t v, max; } pos[] = {
        {KEY("block_count"), hp->n_layer, DS4_MAX_LAYERS},
        {KEY("embedding_length"), hp->n_embd, DIM_MAX},
        {KEY("vocab_size"), hp->n_vocab, COUNT_MAX},
        {KEY("attention.head_count"), hp->n_head, 4096},
        {KEY("attention.key_length"), hp->head_dim, DIM_MAX},
        {KEY("rope.dimension_count"), hp->rope_dim, DIM_MAX},
        {KEY("attention.q_lora_rank"), hp->q_lora, DIM_MAX},
        {KEY("attention.output_group_count"), hp->o_groups, 4096},
        {KEY("attention.output_lora_rank"), hp->o_lora, DIM_MAX},
        {KEY("expert_count"), hp->n_expert, 65536},
        {KEY("expert_used_count"), hp->n_expert_used, 65536},
        {KEY("expert_feed_forward_length"), hp->expert_ff, DIM_MAX},
        {KEY("attention.sliding_window"), hp->window, DIM_MAX},
        {KEY("attention.indexer.head_count"), hp->idx_n_head, 4096},
        {KEY("attention.indexer.key_length"), hp->idx_head_dim, DIM_MAX},
        {KEY("attention.indexer.top_k"), hp->idx_top_k, COUNT_MAX},
        {KEY("hyper_connection.count"), hp->hc_count, 64},
        {KEY("hyper_connection.sinkhorn_iterations"), hp->hc_sinkhorn_iters, 1000},
        {KEY("rope.scaling.original_context_length"), hp->yarn_orig_ctx, UINT32_MAX},
        {KEY("context_length"), hp->ctx_max, UINT32_MAX},
    };
    for (size_t k = 0; k < sizeof pos / sizeof pos[0]; k++)
        if (pos[k].v == 0 || pos[k].v > pos[k].max)
            return ds4_errf(err, n, "%s: %u, must be in 1..%u", pos[k].key, pos[k].v, pos[k].max);

    /* The layout has one K=V projection [n_embd, head_dim] and one shared
     * expert of expert_ff rows: other counts would need other tensors. */
    if (hp->n_head_kv != 1)
        return ds4_errf(err, n, "%s: %u, only 1 (shared K=V head) is supported", KEY("attention.head_count_kv"), hp->n_head_kv);
    if (hp->n_expert_shared != 1)
        return ds4_errf(err, n, "%s: %u, only 1 is supported", KEY("expert_shared_count"), hp->n_expert_shared);
    /* RoPE rotates interleaved pairs in the tail of each head; the non-RoPE
     * part is FP8-simulated in blocks of 64 (spec §3.3). */
    if (hp->rope_dim % 2 || hp->rope_dim >= hp->head_dim)
        return ds4_errf(err, n, "%s: %u must be even and below attention.key_length %u",
                    KEY("rope.dimension_count"), hp->rope_dim, hp->head_dim);
    if ((hp->head_dim - hp->rope_dim) % 64)
        return ds4_errf(err, n, "%s: %u minus rope.dimension_count %u is not a multiple of 64 (FP8 blocks)",
                    KEY("attention.key_length"), hp->head_dim, hp->rope_dim);
    /* Indexer keys: Hadamard rotation needs a power of two, FP4 simulation
     * blocks of 32 (spec §3.4), and the RoPE tail must fit. */
    if (!pow2(hp->idx_head_dim) || hp->idx_head_dim % 32 || hp->idx_head_dim <= hp->rope_dim)
        return ds4_errf(err, n, "%s: %u must be a power of two, a multiple of 32 and above rope.dimension_count %u",
                    KEY("attention.indexer.key_length"), hp->idx_head_dim, hp->rope_dim);
    if (hp->n_head % hp->o_groups)
        return ds4_errf(err, n, "%s: %u does not divide attention.head_count %u",
                    KEY("attention.output_group_count"), hp->o_groups, hp->n_head);
    if (hp->n_expert_used > hp->n_expert)
        return ds4_errf(err, n, "%s: %u exceeds expert_count %u", KEY("expert_used_count"), hp->n_expert_used, hp->n_expert);
    if (hp->n_hash_layer > hp->n_layer)
        return ds4_errf(err, n, "%s: %u exceeds block_count %u", KEY("hash_layer_count"), hp->n_hash_layer, hp->n_layer);
    struct { const char *key; float v; } fpos[] = {
        {KEY("expert_weights_scale"), hp->expert_weights_scale},
        {KEY("hyper_connection.epsilon"), hp->hc_eps},
        {KEY("attention.layer_norm_rms_epsilon"), hp->rms_eps},
        {KEY("rope.freq_base"), hp->rope_base},
        {KEY("attention.compress_rope_freq_base"), hp->compress_rope_base},
        {KEY("rope.scaling.yarn_beta_fast"), hp->yarn_beta_fast},
        {KEY("rope.scaling.yarn_beta_slow"), hp->yarn_beta_slow},
    };
    for (size_t k = 0; k < sizeof fpos / sizeof fpos[0]; k++)
        if (!(fpos[k].v > 0) || !isfinite(fpos[k].v))
            return ds4_errf(err, n, "%s: %g, must be positive", fpos[k].key, fpos[k].v);
    if (!(hp->yarn_factor >= 1) || !isfinite(hp->yarn_factor))
        return ds4_errf(err, n, "%s: %g, must be >= 1", KEY("rope.scaling.factor"), hp->yarn_factor);
    for (uint32_t l = 0; l <= hp->n_layer; l++) {
        if (!(hp->swiglu_clamp[l] > 0) || !isfinite(hp->swiglu_clamp[l]))
            return ds4_errf(err, n, "%s[%u]: %g, must be positive", KEY("swiglu_clamp_exp"), l, hp->swiglu_clamp[l]);
        int32_t r = hp->compress_ratio[l];
        /* 4 is the overlapping two-lane compressor; other ratios use one lane
         * and must be a power of two so row boundaries are cheap (spec §4.5). */
        if (r != 0 && r != 4 && !(r >= 8 && pow2((uint32_t)r)))
            return ds4_errf(err, n, "%s[%u]: %d, must be 0, 4 or a power of two >= 8",
                        KEY("attention.compress_ratios"), l, r);
    }
    if (hp->compress_ratio[hp->n_layer] != 0)
        return ds4_errf(err, n, "%s[%u]: the MTP slot must be 0 (the MTP block has no compressor)",
                    KEY("attention.compress_ratios"), hp->n_layer);
    return 0;
}

bool ds4_hparams_is_flash_shape(const ds4_hparams *hp) {
    ds4_hparams fl;
    ds4_hparams_flash(&fl);
    return hp->n_layer == fl.n_layer && hp->n_embd == fl.n_embd;
}
