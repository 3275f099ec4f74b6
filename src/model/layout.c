/* The tensor table (spec §2.3–2.5): names, dims, published types, in order.
 *
 * Order: the §2.3 globals first, then blk.0 … blk.N-1, each block in the
 * §2.4 row order. Spec §12 records that a synthetic file written in exactly
 * this order loads in antirez/ds4 @8d57664 and passes its strict layout
 * validation; ds4 binds by name, so the order only has to match for
 * byte-identical regeneration. The converter's own emission order could not
 * be read (antirez/ds4 only carries a V4.1 planner, a different layout). The MTP file (§2.5) lists the block tensors
 * in §2.4 order followed by its own eight. */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "model/model.h"

typedef struct {
    ds4_tensor_spec *out;
    int cap, n;
    int layer;
    const char *prefix;        /* "blk.N." / "mtp.0." / "" */
} lay;

static void add(lay *L, const char *suffix, ggml_type type, ds4_tensor_kind kind, size_t field,
                uint32_t n_dims, uint64_t d0, uint64_t d1, uint64_t d2) {
    if (L->out && L->n < L->cap) {
        ds4_tensor_spec *s = &L->out[L->n];
        memset(s, 0, sizeof *s);
        snprintf(s->name, sizeof s->name, "%s%s", L->prefix, suffix);
        s->n_dims = n_dims;
        s->dims[0] = d0;
        s->dims[1] = n_dims > 1 ? d1 : 1;
        s->dims[2] = n_dims > 2 ? d2 : 1;
        s->type = type;
        s->kind = kind;
        s->layer = L->layer;
        s->field = (uint32_t)field;
    }
    L->n++;
}

#define F(field) offsetof(ds4_layer, field)
#define G(field) offsetof(ds4_model, field)

/* Type of a "float" slot: the published one, or F32 in the all-float mix. */
static ggml_type ft(ds4_mix mix, ggml_type published) { return mix == DS4_MIX_F32 ? GGML_F32 : published; }

/* One transformer block. ratio/hash decide the optional tensors; mtp adds
 * nothing here (its extra tensors follow the block). */
static void block(lay *L, const ds4_hparams *hp, ds4_mix mix, int ratio, bool hash, bool mtp) {
    const uint64_t d = hp->n_embd, hc = hp->hc_count, mixw = (2 + hc) * hc;
    const uint64_t hd = hp->head_dim, hq = (uint64_t)hp->n_head * hd;
    const uint64_t grp_in = (uint64_t)hp->n_head / hp->o_groups * hd, grp_out = (uint64_t)hp->o_groups * hp->o_lora;
    const uint64_t ff = hp->expert_ff, ne = hp->n_expert;
    ggml_type f16 = ft(mix, GGML_F16), q8 = ft(mix, GGML_Q8_0), f32 = GGML_F32;
    /* The published MTP file keeps HC mixers and the router in F32 (its name
     * says "F32"; spec §2.5 leaves F16 allowed) and Q4_K experts. */
    ggml_type mtp_f = mtp ? ft(mix, GGML_F32) : f16;
    ggml_type eg, ed;
    if (mix == DS4_MIX_F32) eg = ed = GGML_F32;
    else if (mix == DS4_MIX_Q4 || mtp) eg = ed = GGML_Q4_K;
    else { eg = GGML_IQ2_XXS; ed = GGML_Q2_K; }

    add(L, "hc_attn_fn.weight", mtp_f, DS4_TK_HC_FN, F(hc_attn_fn), 2, hc * d, mixw, 0);
    add(L, "hc_attn_scale.weight", f32, DS4_TK_HC_SCALE, F(hc_attn_scale), 1, 3, 0, 0);
    add(L, "hc_attn_base.weight", f32, DS4_TK_ZERO, F(hc_attn_base), 1, mixw, 0, 0);
    add(L, "attn_norm.weight", f32, DS4_TK_NORM, F(attn_norm), 1, d, 0, 0);
    add(L, "attn_q_a.weight", q8, DS4_TK_MATRIX, F(attn_q_a), 2, d, hp->q_lora, 0);
    add(L, "attn_q_a_norm.weight", f32, DS4_TK_NORM, F(attn_q_a_norm), 1, hp->q_lora, 0, 0);
    add(L, "attn_q_b.weight", q8, DS4_TK_MATRIX, F(attn_q_b), 2, hp->q_lora, hq, 0);
    add(L, "attn_kv.weight", q8, DS4_TK_MATRIX, F(attn_kv), 2, d, hd, 0);
    add(L, "attn_kv_a_norm.weight", f32, DS4_TK_NORM, F(attn_kv_a_norm), 1, hd, 0, 0);
    add(L, "attn_sinks.weight", f32, DS4_TK_ZERO, F(attn_sinks), 1, hp->n_head, 0, 0);
    add(L, "attn_output_a.weight", q8, DS4_TK_MATRIX, F(attn_output_a), 2, grp_in, grp_out, 0);
    add(L, "attn_output_b.weight", q8, DS4_TK_MATRIX, F(attn_output_b), 2, grp_out, d, 0);
    if (ratio != 0) {
        /* ratio 4 compresses two overlapping lanes (coff = 2), others one. */
        uint64_t w = (ratio == 4 ? 2 : 1) * hd;
        add(L, "attn_compressor_ape.weight", f16, DS4_TK_MATRIX, F(comp_ape), 2, w, (uint64_t)ratio, 0);
        add(L, "attn_compressor_kv.weight", f16, DS4_TK_MATRIX, F(comp_kv), 2, d, w, 0);
        add(L, "attn_compressor_gate.weight", f16, DS4_TK_MATRIX, F(comp_gate), 2, d, w, 0);
        add(L, "attn_compressor_norm.weight", f32, DS4_TK_NORM, F(comp_norm), 1, hd, 0, 0);
    }
    if (ratio == 4) {
        uint64_t ih = hp->idx_head_dim, iw = 2 * ih;
        add(L, "indexer.attn_q_b.weight", f16, DS4_TK_MATRIX, F(idx_q_b), 2, hp->q_lora, (uint64_t)hp->idx_n_head * ih, 0);
        add(L, "indexer.proj.weight", f16, DS4_TK_MATRIX, F(idx_proj), 2, d, hp->idx_n_head, 0);
        add(L, "indexer_compressor_ape.weight", f16, DS4_TK_MATRIX, F(idx_comp_ape), 2, iw, 4, 0);
        add(L, "indexer_compressor_kv.weight", f16, DS4_TK_MATRIX, F(idx_comp_kv), 2, d, iw, 0);
        add(L, "indexer_compressor_gate.weight", f16, DS4_TK_MATRIX, F(idx_comp_gate), 2, d, iw, 0);
        add(L, "indexer_compressor_norm.weight", f32, DS4_TK_NORM, F(idx_comp_norm), 1, ih, 0, 0);
    }
    add(L, "hc_ffn_fn.weight", mtp_f, DS4_TK_HC_FN, F(hc_ffn_fn), 2, hc * d, mixw, 0);
    add(L, "hc_ffn_scale.weight", f32, DS4_TK_HC_SCALE, F(hc_ffn_scale), 1, 3, 0, 0);
    add(L, "hc_ffn_base.weight", f32, DS4_TK_ZERO, F(hc_ffn_base), 1, mixw, 0, 0);
    add(L, "ffn_norm.weight", f32, DS4_TK_NORM, F(ffn_norm), 1, d, 0, 0);
    add(L, "ffn_gate_inp.weight", mtp_f, DS4_TK_MATRIX, F(ffn_gate_inp), 2, d, ne, 0);
    if (hash)
        add(L, "ffn_gate_tid2eid.weight", GGML_I32, DS4_TK_TID2EID, F(tid2eid), 2, hp->n_expert_used, hp->n_vocab, 0);
    else
        add(L, "exp_probs_b.bias", f32, DS4_TK_ZERO, F(exp_probs_b), 1, ne, 0, 0);
    add(L, "ffn_gate_exps.weight", eg, DS4_TK_EXPERT, F(gate_exps), 3, d, ff, ne);
    add(L, "ffn_up_exps.weight", eg, DS4_TK_EXPERT, F(up_exps), 3, d, ff, ne);
    add(L, "ffn_down_exps.weight", ed, DS4_TK_EXPERT, F(down_exps), 3, ff, d, ne);
    uint64_t sff = ff * hp->n_expert_shared;
    add(L, "ffn_gate_shexp.weight", q8, DS4_TK_MATRIX, F(gate_shexp), 2, d, sff, 0);
    add(L, "ffn_up_shexp.weight", q8, DS4_TK_MATRIX, F(up_shexp), 2, d, sff, 0);
    add(L, "ffn_down_shexp.weight", q8, DS4_TK_MATRIX, F(down_shexp), 2, sff, d, 0);
}

int ds4_layout(const ds4_hparams *hp, ds4_mix mix, bool mtp_file, ds4_tensor_spec *out, int cap) {
    lay L = {out, cap, 0, -1, ""};
    const uint64_t d = hp->n_embd, hc = hp->hc_count;
    ggml_type f16 = ft(mix, GGML_F16);
    char prefix[32];
    if (mtp_file) {
        L.layer = (int)hp->n_layer;
        L.prefix = "mtp.0.";
        block(&L, hp, mix, 0, false, true);
        ggml_type q8 = ft(mix, GGML_Q8_0), f32 = GGML_F32;
        add(&L, "e_proj.weight", q8, DS4_TK_MATRIX, F(e_proj), 2, d, d, 0);
        add(&L, "h_proj.weight", q8, DS4_TK_MATRIX, F(h_proj), 2, d, d, 0);
        add(&L, "enorm.weight", f32, DS4_TK_NORM, F(enorm), 1, d, 0, 0);
        add(&L, "hnorm.weight", f32, DS4_TK_NORM, F(hnorm), 1, d, 0, 0);
        add(&L, "norm.weight", f32, DS4_TK_NORM, F(norm), 1, d, 0, 0);
        add(&L, "hc_head_fn.weight", f32, DS4_TK_HC_FN, F(hc_head_fn), 2, hc * d, hc, 0);
        add(&L, "hc_head_base.weight", f32, DS4_TK_ZERO, F(hc_head_base), 1, hc, 0, 0);
        add(&L, "hc_head_scale.weight", f32, DS4_TK_HC_SCALE, F(hc_head_scale), 1, 1, 0, 0);
        return L.n;
    }
    add(&L, "token_embd.weight", f16, DS4_TK_MATRIX, G(tok_embd), 2, d, hp->n_vocab, 0);
    add(&L, "output_hc_fn.weight", f16, DS4_TK_HC_FN, G(out_hc_fn), 2, hc * d, hc, 0);
    add(&L, "output_hc_base.weight", GGML_F32, DS4_TK_ZERO, G(out_hc_base), 1, hc, 0, 0);
    add(&L, "output_hc_scale.weight", GGML_F32, DS4_TK_HC_SCALE, G(out_hc_scale), 1, 1, 0, 0);
    add(&L, "output_norm.weight", GGML_F32, DS4_TK_NORM, G(out_norm), 1, d, 0, 0);
    add(&L, "output.weight", ft(mix, GGML_Q8_0), DS4_TK_MATRIX, G(output), 2, d, hp->n_vocab, 0);
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        snprintf(prefix, sizeof prefix, "blk.%u.", l);
        L.layer = (int)l;
        L.prefix = prefix;
        block(&L, hp, mix, hp->compress_ratio[l], l < hp->n_hash_layer, false);
    }
    return L.n;
}

int ds4_layout_max(const ds4_hparams *hp, bool mtp_file) {
    return ds4_layout(hp, DS4_MIX_Q2, mtp_file, NULL, 0);
}
