/* DeepSeek V4 Flash model binding: hyperparameters from the `deepseek4.*`
 * GGUF keys, tensors bound by name and checked against those hyperparameters.
 *
 * One table (ds4_layout) says which tensors a file of a given shape and quant
 * mix holds, in the published order, with their dims and types. The loader
 * validates against it, ds4-synth writes it, ds4-convert fills it — so the
 * three cannot drift apart. Shapes are never assumed: a reduced model (fewer
 * layers, smaller dims, fewer experts) loads when self-consistent; a file that
 * claims the real model's shape must match the published layout exactly. */
#ifndef DS4_MODEL_H
#define DS4_MODEL_H
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "gguf/gguf.h"

#define DS4_MAX_LAYERS 128

typedef struct {
    uint32_t n_layer;          /* deepseek4.block_count (43) */
    uint32_t n_embd;           /* embedding_length (4096) */
    uint32_t n_vocab;          /* vocab_size (129280) */
    uint32_t n_head;           /* attention.head_count (64) */
    uint32_t n_head_kv;        /* attention.head_count_kv (1) */
    uint32_t head_dim;         /* attention.key_length == value_length (512) */
    uint32_t rope_dim;         /* rope.dimension_count (64): tail of each head */
    uint32_t q_lora;           /* attention.q_lora_rank (1024) */
    uint32_t o_groups;         /* attention.output_group_count (8) */
    uint32_t o_lora;           /* attention.output_lora_rank (1024) */
    uint32_t n_expert;         /* expert_count (256) */
    uint32_t n_expert_used;    /* expert_used_count (6) */
    uint32_t n_expert_shared;  /* expert_shared_count (1) */
    uint32_t expert_ff;        /* expert_feed_forward_length (2048) */
    uint32_t n_hash_layer;     /* hash_layer_count (3) */
    bool     expert_weights_norm;   /* true */
    float    expert_weights_scale;  /* 1.5 */
    float    swiglu_clamp[DS4_MAX_LAYERS + 1]; /* 10 per layer (+ MTP slot) */
    uint32_t window;           /* attention.sliding_window (128) */
    int32_t  compress_ratio[DS4_MAX_LAYERS + 1]; /* per layer, [n_layer] = MTP slot */
    uint32_t idx_n_head;       /* attention.indexer.head_count (64) */
    uint32_t idx_head_dim;     /* attention.indexer.key_length (128) */
    uint32_t idx_top_k;        /* attention.indexer.top_k (512) */
    uint32_t hc_count;         /* hyper_connection.count (4) */
    uint32_t hc_sinkhorn_iters;/* hyper_connection.sinkhorn_iterations (20) */
    float    hc_eps;           /* hyper_connection.epsilon (1e-6) */
    float    rms_eps;          /* attention.layer_norm_rms_epsilon (1e-6) */
    float    rope_base;        /* rope.freq_base (1e4): window-only layers, MTP */
    float    compress_rope_base; /* attention.compress_rope_freq_base (1.6e5) */
    float    yarn_factor;      /* rope.scaling.factor (16) */
    uint32_t yarn_orig_ctx;    /* rope.scaling.original_context_length (65536) */
    float    yarn_beta_fast;   /* 32 */
    float    yarn_beta_slow;   /* 1 */
    uint32_t ctx_max;          /* context_length (1048576) */
    uint32_t n_mtp;            /* nextn_predict_layers (1) */
} ds4_hparams;

/* A bound tensor: a view into the mapped GGUF. ne[0] is contiguous; a 2-D
 * weight is ne[1] rows of ne[0] values, row_bytes apart; a 3-D expert tensor
 * is ne[2] experts of ne[1] rows. data == NULL means "absent in this layer". */
typedef struct {
    const void *data;
    ggml_type type;
    int64_t ne[3];
    uint64_t row_bytes;
    const char *name;          /* owned by the GGUF mapping's tensor table */
} ds4_tensor;

typedef struct {
    int ratio;                 /* 0, 4 or other (128 in the real model) */
    bool hash;                 /* routed by tid2eid (layers < n_hash_layer) */
    /* attention */
    ds4_tensor hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm;
    ds4_tensor attn_q_a, attn_q_a_norm, attn_q_b, attn_kv, attn_kv_a_norm, attn_sinks;
    ds4_tensor attn_output_a, attn_output_b;
    /* attention compressor (ratio != 0) */
    ds4_tensor comp_ape, comp_kv, comp_gate, comp_norm;
    /* indexer (ratio == 4) */
    ds4_tensor idx_q_b, idx_proj, idx_comp_ape, idx_comp_kv, idx_comp_gate, idx_comp_norm;
    /* ffn */
    ds4_tensor hc_ffn_fn, hc_ffn_scale, hc_ffn_base, ffn_norm, ffn_gate_inp;
    ds4_tensor exp_probs_b;    /* absent on hash layers */
    ds4_tensor tid2eid;        /* hash layers only: [n_used, n_vocab] I32 */
    ds4_tensor gate_exps, up_exps, down_exps;   /* [in, out, n_expert] */
    ds4_tensor gate_shexp, up_shexp, down_shexp;
    /* MTP block only (spec §2.5) */
    ds4_tensor e_proj, h_proj, enorm, hnorm, norm, hc_head_fn, hc_head_base, hc_head_scale;
} ds4_layer;

typedef struct {
    gguf_file *gguf;
    gguf_file *mtp_gguf;       /* NULL unless an MTP file was loaded */
    ds4_hparams hp;
    ds4_tensor tok_embd, out_hc_fn, out_hc_base, out_hc_scale, out_norm, output;
    ds4_layer layers[DS4_MAX_LAYERS];
    ds4_layer mtp;             /* valid when mtp_gguf != NULL */
    bool is_full_shape;        /* claims the published 43-layer shape */
    /* The layout the tensors were bound against (names of bound tensors
     * point into it); owned by the model. */
    struct ds4_tensor_spec *layout, *mtp_layout;
    int n_layout, n_mtp_layout;
} ds4_model;

/* Published quant mixes. F32 = every weight float (oracle/test files). */
typedef enum { DS4_MIX_Q2, DS4_MIX_Q4, DS4_MIX_F32 } ds4_mix;

/* What a tensor holds, so a writer can pick realistic values (spec §12) and
 * the loader can decide which types a test file may substitute. */
typedef enum {
    DS4_TK_MATRIX,    /* projection: Q8_0 / F16 published, random */
    DS4_TK_HC_FN,     /* hyper-connection mixer (F16), random, smaller */
    DS4_TK_NORM,      /* RMSNorm weight, 1 */
    DS4_TK_HC_SCALE,  /* hyper-connection scale, 0.5 */
    DS4_TK_ZERO,      /* HC base, attention sink, router bias: 0 */
    DS4_TK_EXPERT,    /* routed experts: IQ2_XXS / Q2_K / Q4_K published */
    DS4_TK_TID2EID,   /* hash routing table (I32 expert ids) */
} ds4_tensor_kind;

typedef struct ds4_tensor_spec {
    char name[64];
    uint32_t n_dims;
    uint64_t dims[3];
    ggml_type type;
    ds4_tensor_kind kind;
    int layer;                 /* -1 global, 0..n_layer-1, n_layer = MTP block */
    uint32_t field;            /* offsetof the ds4_tensor in ds4_layer (layer >= 0) or ds4_model */
} ds4_tensor_spec;

/* The published hyperparameters (43 layers, …) and the tiny test shape that
 * exercises every layer kind within a few hundred tokens. */
void ds4_hparams_flash(ds4_hparams *hp);
void ds4_hparams_tiny(ds4_hparams *hp);
/* Write every deepseek4.* key with the published GGUF types (spec §1.1). */
void ds4_hparams_write(const ds4_hparams *hp, gguf_writer *w);

/* Tensors of a main file (mtp_file = false) or an MTP file (true), in
 * published order. Returns the count; fills out[] when out != NULL. */
int ds4_layout(const ds4_hparams *hp, ds4_mix mix, bool mtp_file, ds4_tensor_spec *out, int cap);

/* Read the deepseek4.* keys (accepting the encodings ds4 accepts) and
 * validate them; -1 with a message naming the offending key. */
int ds4_hparams_read(ds4_hparams *hp, const gguf_file *f, char *err, size_t errlen);
int ds4_hparams_validate(const ds4_hparams *hp, char *err, size_t errlen);
/* True when block_count and embedding_length are the published model's: the
 * file then claims the real shape and must match it exactly (every key at
 * its published value, published tensor types). */
bool ds4_hparams_is_flash_shape(const ds4_hparams *hp);
/* Tensor count of ds4_layout (the same for every mix), for sizing out[]. */
int ds4_layout_max(const ds4_hparams *hp, bool mtp_file);
/* KV accounting split as in spec §7.2 (bytes, f32 rows). */
typedef struct {
    uint64_t compressed;       /* attention + indexer compressed rows, floor(ctx/R) each */
    uint64_t raw_window;       /* n_layer rings of window x head_dim */
    uint64_t frontier;         /* compressor kv+gate frontiers */
} ds4_kv_parts;
void ds4_model_kv_parts(const ds4_hparams *hp, uint64_t ctx, ds4_kv_parts *parts);
/* Bytes of tensor data in the main file (and in the MTP file when loaded). */
uint64_t ds4_model_weight_bytes(const ds4_model *m);

/* Load + validate. Returns 0, or -1 with a message naming the first mismatch. */
int ds4_model_load(ds4_model *m, const char *path, char *err, size_t errlen);
int ds4_model_load_mtp(ds4_model *m, const char *path, char *err, size_t errlen);
void ds4_model_free(ds4_model *m);

/* Total parameters of the main model (284 332 240 471 for the real one). */
uint64_t ds4_model_param_count(const ds4_model *m);
/* Bytes of KV/session state for a context (spec §7.2 accounting). */
uint64_t ds4_model_kv_bytes(const ds4_hparams *hp, uint64_t ctx);
/* `ds4 --inspect` report. */
void ds4_model_inspect(const ds4_model *m, uint64_t ctx, FILE *out);

#endif
