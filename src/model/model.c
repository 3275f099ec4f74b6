/* Model loading: read + validate hyperparameters, bind every tensor of the
 * layout by name, check dims and types exactly, reject anything unexpected.
 * Also parameter/KV accounting (spec §7.2, §9) and the --inspect report. */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "util/errf.h"

/* A file claiming the published shape must carry the published values of
 * every key (ds4 refuses any difference, spec §1.1). */
static int check_flash_values(const ds4_hparams *hp, char *err, size_t n) {
    ds4_hparams fl;
    ds4_hparams_flash(&fl);
#define U(field, key) if (hp->field != fl.field) \
        return ds4_errf(err, n, "deepseek4." key ": %u, the published model has %u", (unsigned)hp->field, (unsigned)fl.field)
#define FL(field, key) if (hp->field != fl.field) \
        return ds4_errf(err, n, "deepseek4." key ": %g, the published model has %g", (double)hp->field, (double)fl.field)
    U(n_vocab, "vocab_size"); U(n_head, "attention.head_count"); U(head_dim, "attention.key_length");
    U(rope_dim, "rope.dimension_count"); U(q_lora, "attention.q_lora_rank");
    U(o_groups, "attention.output_group_count"); U(o_lora, "attention.output_lora_rank");
    U(n_expert, "expert_count"); U(n_expert_used, "expert_used_count");
    U(expert_ff, "expert_feed_forward_length"); U(n_hash_layer, "hash_layer_count");
    U(expert_weights_norm, "expert_weights_norm"); U(window, "attention.sliding_window");
    U(idx_n_head, "attention.indexer.head_count"); U(idx_head_dim, "attention.indexer.key_length");
    U(idx_top_k, "attention.indexer.top_k"); U(hc_count, "hyper_connection.count");
    U(hc_sinkhorn_iters, "hyper_connection.sinkhorn_iterations");
    U(yarn_orig_ctx, "rope.scaling.original_context_length");
    FL(expert_weights_scale, "expert_weights_scale"); FL(hc_eps, "hyper_connection.epsilon");
    FL(rms_eps, "attention.layer_norm_rms_epsilon"); FL(rope_base, "rope.freq_base");
    FL(compress_rope_base, "attention.compress_rope_freq_base"); FL(yarn_factor, "rope.scaling.factor");
    FL(yarn_beta_fast, "rope.scaling.yarn_beta_fast"); FL(yarn_beta_slow, "rope.scaling.yarn_beta_slow");
#undef U
#undef FL
    for (uint32_t l = 0; l < fl.n_layer; l++) {
        if (hp->compress_ratio[l] != fl.compress_ratio[l])
            return ds4_errf(err, n, "deepseek4.attention.compress_ratios[%u]: %d, the published model has %d",
                        l, hp->compress_ratio[l], fl.compress_ratio[l]);
        if (hp->swiglu_clamp[l] != fl.swiglu_clamp[l])
            return ds4_errf(err, n, "deepseek4.swiglu_clamp_exp[%u]: %g, the published model has %g",
                        l, hp->swiglu_clamp[l], fl.swiglu_clamp[l]);
    }
    return 0;
}

static bool is_float(ggml_type t) { return t == GGML_F32 || t == GGML_F16; }
static bool is_expert_quant(ggml_type t) { return t == GGML_IQ2_XXS || t == GGML_Q2_K || t == GGML_Q4_K; }

/* Which stored type may fill a slot. `strict` = published file: exactly the
 * published type (experts: the q2 or the q4 type of that tensor). Otherwise
 * test/reduced files may hold any float weight as F32 or F16 and experts in
 * any supported format; the hash table is always I32. */
static bool type_ok(const ds4_tensor_spec *s, ggml_type found, bool strict, bool mtp) {
    if (s->kind == DS4_TK_TID2EID) return found == GGML_I32;
    if (s->kind == DS4_TK_EXPERT) {
        if (mtp) return is_expert_quant(found) || (!strict && is_float(found));
        if (strict) return found == s->type || found == GGML_Q4_K;   /* q2 layout + q4 alternative */
        return is_expert_quant(found) || is_float(found);
    }
    if (found == s->type) return true;
    if (mtp && s->type == GGML_F32 && s->kind != DS4_TK_NORM && s->kind != DS4_TK_ZERO &&
        s->kind != DS4_TK_HC_SCALE)
        return found == GGML_F16;  /* spec §2.5: "F16 or F32 (ds4 accepts both)" */
    return !strict && is_float(found);
}

static void dims_str(char *buf, size_t n, const uint64_t *d, uint32_t nd) {
    int k = snprintf(buf, n, "[%llu", (unsigned long long)d[0]);
    for (uint32_t i = 1; i < nd && k > 0 && (size_t)k < n; i++)
        k += snprintf(buf + k, n - (size_t)k, ", %llu", (unsigned long long)d[i]);
    if (k > 0 && (size_t)k < n) snprintf(buf + k, n - (size_t)k, "]");
}

/* Bind specs[0..n) from f into base (a ds4_model or ds4_layer array). */
static int bind(const gguf_file *f, const ds4_hparams *hp, ds4_tensor_spec *specs, int n,
                ds4_model *m, bool strict, bool mtp, char *err, size_t errlen) {
    const char *path = gguf_path(f);
    for (int i = 0; i < n; i++) {
        ds4_tensor_spec *s = &specs[i];
        const gguf_tensor *t = gguf_find_tensor(f, s->name);
        if (!t) return ds4_errf(err, errlen, "%s: missing tensor %s", path, s->name);
        uint32_t nd = t->n_dims > s->n_dims ? t->n_dims : s->n_dims;
        for (uint32_t k = 0; k < GGUF_MAX_DIMS; k++) {
            uint64_t want = k < 3 ? s->dims[k] : 1;
            if (t->dims[k] != want) {
                char a[96], b[96];
                dims_str(a, sizeof a, s->dims, s->n_dims);
                dims_str(b, sizeof b, t->dims, nd);
                return ds4_errf(err, errlen, "%s: tensor %s: dims %s, expected %s", path, s->name, b, a);
            }
        }
        if (!type_ok(s, t->type, strict, mtp))
            return ds4_errf(err, errlen, "%s: tensor %s: type %s, expected %s%s", path, s->name,
                        ggml_type_name(t->type), ggml_type_name(s->type),
                        strict ? " (published layout)" : "");
        if (t->dims[0] % ggml_block_elems(t->type))
            return ds4_errf(err, errlen, "%s: tensor %s: row of %llu is not a multiple of the %s block",
                        path, s->name, (unsigned long long)t->dims[0], ggml_type_name(t->type));
        if (s->kind == DS4_TK_TID2EID) {
            /* Every routed id must name an expert: a bad id would index past
             * the expert tensors. */
            const int32_t *ids = t->data;
            uint64_t cnt = t->dims[0] * t->dims[1];
            for (uint64_t j = 0; j < cnt; j++)
                if (ids[j] < 0 || (uint32_t)ids[j] >= hp->n_expert)
                    return ds4_errf(err, errlen, "%s: tensor %s: token %llu routes to expert %d, expert_count is %u",
                                path, s->name, (unsigned long long)(j / t->dims[0]), ids[j], hp->n_expert);
        }
        ds4_tensor *dst = s->layer < 0 ? (ds4_tensor *)((char *)m + s->field)
                        : (ds4_tensor *)((char *)(mtp ? &m->mtp : &m->layers[s->layer]) + s->field);
        dst->data = t->data;
        dst->type = t->type;
        dst->ne[0] = (int64_t)t->dims[0];
        dst->ne[1] = (int64_t)t->dims[1];
        dst->ne[2] = (int64_t)t->dims[2];
        dst->row_bytes = ggml_row_bytes(t->type, t->dims[0]);
        dst->name = s->name;
        s->type = t->type;   /* from here on the layout records what is stored */
    }
    /* Every spec matched a distinct name, so a larger count means extras. */
    if (gguf_n_tensors(f) != n) {
        for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
            gguf_str nm = gguf_tensor_at(f, i)->name;
            bool known = false;
            for (int j = 0; j < n && !known; j++)
                known = gguf_str_eq(nm, specs[j].name);
            if (!known)
                return ds4_errf(err, errlen, "%s: unexpected tensor %.*s (not in the DeepSeek V4 layout)",
                            path, (int)(nm.len > 200 ? 200 : nm.len), nm.ptr);
        }
    }
    return 0;
}

static ds4_tensor_spec *make_layout(const ds4_hparams *hp, bool mtp, int *n) {
    *n = ds4_layout_max(hp, mtp);
    ds4_tensor_spec *s = calloc((size_t)*n, sizeof *s);
    if (s) ds4_layout(hp, DS4_MIX_Q2, mtp, s, *n);
    return s;
}

int ds4_model_load(ds4_model *m, const char *path, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    char gerr[512];
    m->gguf = gguf_open(path, gerr, sizeof gerr);
    if (!m->gguf) return ds4_errf(err, errlen, "%s", gerr);
    int rc = ds4_hparams_read(&m->hp, m->gguf, gerr, sizeof gerr);
    if (rc) {
        ds4_errf(err, errlen, "%s: %s", path, gerr);
        goto bad;
    }
    m->is_full_shape = ds4_hparams_is_flash_shape(&m->hp);
    if (m->is_full_shape && check_flash_values(&m->hp, gerr, sizeof gerr)) {
        ds4_errf(err, errlen, "%s: claims the published 43-layer shape but %s", path, gerr);
        goto bad;
    }
    m->layout = make_layout(&m->hp, false, &m->n_layout);
    if (!m->layout) {
        ds4_errf(err, errlen, "%s: out of memory", path);
        goto bad;
    }
    for (uint32_t l = 0; l < m->hp.n_layer; l++) {
        m->layers[l].ratio = m->hp.compress_ratio[l];
        m->layers[l].hash = l < m->hp.n_hash_layer;
    }
    if (bind(m->gguf, &m->hp, m->layout, m->n_layout, m, m->is_full_shape, false, err, errlen)) goto bad;
    return 0;
bad:
    ds4_model_free(m);
    return -1;
}

int ds4_model_load_mtp(ds4_model *m, const char *path, char *err, size_t errlen) {
    char gerr[512];
    if (!m->gguf) return ds4_errf(err, errlen, "%s: load the main model first", path);
    if (m->mtp_gguf) return ds4_errf(err, errlen, "%s: an MTP file is already loaded", path);
    if (m->hp.n_mtp == 0) return ds4_errf(err, errlen, "%s: the main model declares no MTP block (nextn_predict_layers = 0)", path);
    gguf_file *f = gguf_open(path, gerr, sizeof gerr);
    if (!f) return ds4_errf(err, errlen, "%s", gerr);
    /* The MTP file's metadata is not validated by ds4 (spec §11.4): shapes
     * come from the main model, and the tensors must match them. */
    int n;
    ds4_tensor_spec *s = make_layout(&m->hp, true, &n);
    memset(&m->mtp, 0, sizeof m->mtp);
    m->mtp.ratio = 0;
    m->mtp.hash = false;
    if (!s || bind(f, &m->hp, s, n, m, m->is_full_shape, true, err, errlen)) {
        if (!s) ds4_errf(err, errlen, "%s: out of memory", path);
        memset(&m->mtp, 0, sizeof m->mtp);
        free(s);
        gguf_close(f);
        return -1;
    }
    m->mtp_gguf = f;
    m->mtp_layout = s;
    m->n_mtp_layout = n;
    return 0;
}

void ds4_model_free(ds4_model *m) {
    if (m->mtp_gguf) gguf_close(m->mtp_gguf);
    if (m->gguf) gguf_close(m->gguf);
    free(m->layout);
    free(m->mtp_layout);
    memset(m, 0, sizeof *m);
}

static uint64_t elems(const ds4_tensor_spec *s) { return s->dims[0] * s->dims[1] * s->dims[2]; }
static uint64_t bytes(const ds4_tensor_spec *s) { return ggml_row_bytes(s->type, s->dims[0]) * s->dims[1] * s->dims[2]; }

/* Parameters from tensor shapes; the hash tables hold expert ids, not
 * weights (spec §9.1). */
uint64_t ds4_model_param_count(const ds4_model *m) {
    uint64_t p = 0;
    for (int i = 0; i < m->n_layout; i++)
        if (m->layout[i].kind != DS4_TK_TID2EID) p += elems(&m->layout[i]);
    return p;
}

uint64_t ds4_model_weight_bytes(const ds4_model *m) {
    uint64_t b = 0;
    for (int i = 0; i < m->n_layout; i++) b += bytes(&m->layout[i]);
    for (int i = 0; i < m->n_mtp_layout; i++) b += bytes(&m->mtp_layout[i]);
    return b;
}

/* Spec §7.2, f32 rows as ds4 stores them: floor(ctx/R) compressed rows of
 * head_dim per compressed layer, plus floor(ctx/4) indexer rows of
 * idx_head_dim on ratio-4 layers; fixed raw windows; compressor frontiers
 * (kv and gate) of coff·R rows × coff·width, coff = 2 for ratio 4. */
void ds4_model_kv_parts(const ds4_hparams *hp, uint64_t ctx, ds4_kv_parts *p) {
    memset(p, 0, sizeof *p);
    const uint64_t f = sizeof(float), hd = hp->head_dim, ih = hp->idx_head_dim;
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        uint64_t r = (uint64_t)hp->compress_ratio[l];
        p->raw_window += (uint64_t)hp->window * hd * f;
        if (r == 0) continue;
        uint64_t coff = r == 4 ? 2 : 1;
        p->compressed += ctx / r * hd * f;
        p->frontier += 2 * (coff * r) * (coff * hd) * f;
        if (r == 4) {
            p->compressed += ctx / 4 * ih * f;
            p->frontier += 2 * (2 * 4) * (2 * ih) * f;
        }
    }
}

uint64_t ds4_model_kv_bytes(const ds4_hparams *hp, uint64_t ctx) {
    ds4_kv_parts p;
    ds4_model_kv_parts(hp, ctx, &p);
    return p.compressed + p.raw_window + p.frontier;
}

/* Rough decode working set: logits (+ a sorted copy for sampling), HC
 * streams and sublayer temporaries, routed-expert activations, attention
 * scores over window + selected/compressed rows, indexer scores over every
 * ratio-4 compressed row. Prefill batches multiply the activation part. */
static uint64_t scratch_bytes(const ds4_hparams *hp, uint64_t ctx) {
    uint64_t fl = 2ull * hp->n_vocab + 16ull * hp->hc_count * hp->n_embd +
                  4ull * hp->n_expert_used * hp->expert_ff +
                  (uint64_t)hp->n_head * (hp->window + hp->idx_top_k + ctx / 8) +
                  (uint64_t)hp->idx_n_head * (ctx / 4 + 1);
    return fl * sizeof(float);
}

static const char *human(char *buf, size_t n, double b) {
    static const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (b >= 1024 && i < 4) { b /= 1024; i++; }
    snprintf(buf, n, i ? "%.2f %s" : "%.0f %s", b, u[i]);
    return buf;
}

void ds4_model_inspect(const ds4_model *m, uint64_t ctx, FILE *out) {
    const ds4_hparams *hp = &m->hp;
    char a[32];
    fprintf(out, "file: %s (%llu bytes)\n", gguf_path(m->gguf), (unsigned long long)gguf_file_size(m->gguf));
    fprintf(out, "architecture: deepseek4%s\n", m->is_full_shape ? " (published DeepSeek V4 Flash shape)" : " (reduced shape)");
    fprintf(out, "shape: %u layers, embd %u, vocab %u, heads %u x %u (rope %u), q_lora %u, "
                 "output %u groups x %u, experts %u (%u used, %u shared, ff %u), hc %u, window %u, "
                 "indexer %u x %u top %u, context %u\n",
            hp->n_layer, hp->n_embd, hp->n_vocab, hp->n_head, hp->head_dim, hp->rope_dim, hp->q_lora,
            hp->o_groups, hp->o_lora, hp->n_expert, hp->n_expert_used, hp->n_expert_shared, hp->expert_ff,
            hp->hc_count, hp->window, hp->idx_n_head, hp->idx_head_dim, hp->idx_top_k, hp->ctx_max);
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        const ds4_layer *L = &m->layers[l];
        fprintf(out, "layer %u: ratio %d, %s, %s\n", l, L->ratio,
                L->ratio == 0 ? "window only" : L->ratio == 4 ? "compressor + indexer" : "compressor",
                L->hash ? "hash-routed" : "biased top-k");
    }
    /* Count and bytes per stored type, main file then MTP. */
    for (int pass = 0; pass < 2; pass++) {
        const ds4_tensor_spec *s = pass ? m->mtp_layout : m->layout;
        int n = pass ? m->n_mtp_layout : m->n_layout;
        if (!n) continue;
        static const ggml_type types[] = {GGML_F32, GGML_F16, GGML_Q8_0, GGML_Q2_K, GGML_Q4_K, GGML_IQ2_XXS, GGML_I32};
        fprintf(out, "%s: %d tensors:", pass ? "mtp mix" : "quant mix", n);
        for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
            int cnt = 0;
            uint64_t by = 0;
            for (int i = 0; i < n; i++)
                if (s[i].type == types[t]) { cnt++; by += bytes(&s[i]); }
            if (cnt) fprintf(out, " %s %d (%s)", ggml_type_name(types[t]), cnt, human(a, sizeof a, (double)by));
        }
        fputc('\n', out);
    }
    uint64_t params = ds4_model_param_count(m);
    fprintf(out, "parameters: %llu (%.2f B)\n", (unsigned long long)params, params / 1e9);
    ds4_kv_parts kv;
    ds4_model_kv_parts(hp, ctx, &kv);
    uint64_t w = ds4_model_weight_bytes(m), k = kv.compressed + kv.raw_window + kv.frontier, sc = scratch_bytes(hp, ctx);
    char h[7][24];
    fprintf(out, "memory at context %llu: weights %s + KV %s (compressed %s, windows %s, frontiers %s) + scratch %s = %s\n",
            (unsigned long long)ctx, human(h[0], 24, (double)w), human(h[1], 24, (double)k),
            human(h[2], 24, (double)kv.compressed), human(h[3], 24, (double)kv.raw_window),
            human(h[4], 24, (double)kv.frontier), human(h[5], 24, (double)sc), human(h[6], 24, (double)(w + k + sc)));
}
