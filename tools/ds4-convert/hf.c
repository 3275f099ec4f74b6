/* config.json and tokenizer.json of a DeepSeek V4 checkpoint (see hf.h). */
#include "hf.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "util/errf.h"

/* Files here are small JSON documents (tokenizer.json of the real model is
 * ~8 MB); the cap bounds the allocation for a wrong path. */
static cJSON *read_json(const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) { ds4_errf(err, errlen, "%s: %s", path, strerror(errno)); return NULL; }
    const size_t max = 256u << 20;
    char *buf = malloc(max + 1);
    size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
    fclose(f);
    if (!buf || n > max) {
        free(buf);
        ds4_errf(err, errlen, "%s: %s", path, buf ? "larger than 256 MB" : "out of memory");
        return NULL;
    }
    cJSON *j = cJSON_ParseWithLength(buf, n);
    free(buf);
    if (!j) ds4_errf(err, errlen, "%s: not valid JSON", path);
    return j;
}

typedef struct { cJSON *root; const char *path; char *err; size_t errlen; int rc; } cfg;

/* A non-negative integer key; `dflt` < 0 means required. */
static uint32_t get_u32(cfg *c, cJSON *obj, const char *key, int64_t dflt) {
    cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) {
        if (dflt < 0 && !c->rc) c->rc = ds4_errf(c->err, c->errlen, "%s: required key %s missing", c->path, key);
        return dflt < 0 ? 0 : (uint32_t)dflt;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 4294967295.0 ||
        v->valuedouble != floor(v->valuedouble)) {
        if (!c->rc) c->rc = ds4_errf(c->err, c->errlen, "%s: %s is not a non-negative integer", c->path, key);
        return 0;
    }
    return (uint32_t)v->valuedouble;
}

static float get_f32(cfg *c, cJSON *obj, const char *key, double dflt, bool required) {
    cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) {
        if (required && !c->rc) c->rc = ds4_errf(c->err, c->errlen, "%s: required key %s missing", c->path, key);
        return (float)dflt;
    }
    if (!cJSON_IsNumber(v)) {
        if (!c->rc) c->rc = ds4_errf(c->err, c->errlen, "%s: %s is not a number", c->path, key);
        return 0;
    }
    return (float)v->valuedouble;
}

int hf_read_config(const char *path, ds4_hparams *hp, uint32_t *bos, uint32_t *eos, char *err, size_t errlen) {
    cJSON *j = read_json(path, err, errlen);
    if (!j) return -1;
    cfg c = {j, path, err, errlen, 0};
    memset(hp, 0, sizeof *hp);
    hp->n_layer = get_u32(&c, j, "num_hidden_layers", -1);
    hp->n_embd = get_u32(&c, j, "hidden_size", -1);
    hp->n_vocab = get_u32(&c, j, "vocab_size", -1);
    hp->n_head = get_u32(&c, j, "num_attention_heads", -1);
    hp->n_head_kv = get_u32(&c, j, "num_key_value_heads", 1);
    hp->head_dim = get_u32(&c, j, "head_dim", -1);
    hp->rope_dim = get_u32(&c, j, "qk_rope_head_dim", -1);
    hp->q_lora = get_u32(&c, j, "q_lora_rank", -1);
    hp->o_groups = get_u32(&c, j, "o_groups", -1);
    hp->o_lora = get_u32(&c, j, "o_lora_rank", -1);
    hp->n_expert = get_u32(&c, j, "n_routed_experts", -1);
    hp->n_expert_used = get_u32(&c, j, "num_experts_per_tok", -1);
    hp->n_expert_shared = get_u32(&c, j, "n_shared_experts", 1);
    hp->expert_ff = get_u32(&c, j, "moe_intermediate_size", -1);
    hp->n_hash_layer = get_u32(&c, j, "num_hash_layers", 0);
    cJSON *norm = cJSON_GetObjectItemCaseSensitive(j, "norm_topk_prob");
    hp->expert_weights_norm = norm ? cJSON_IsTrue(norm) : true;
    hp->expert_weights_scale = get_f32(&c, j, "routed_scaling_factor", 1.0, true);
    hp->window = get_u32(&c, j, "sliding_window", -1);
    hp->idx_n_head = get_u32(&c, j, "index_n_heads", -1);
    hp->idx_head_dim = get_u32(&c, j, "index_head_dim", -1);
    hp->idx_top_k = get_u32(&c, j, "index_topk", -1);
    hp->hc_count = get_u32(&c, j, "hc_mult", -1);
    hp->hc_sinkhorn_iters = get_u32(&c, j, "hc_sinkhorn_iters", -1);
    hp->hc_eps = get_f32(&c, j, "hc_eps", 0, true);
    hp->rms_eps = get_f32(&c, j, "rms_norm_eps", 0, true);
    hp->rope_base = get_f32(&c, j, "rope_theta", 0, true);
    hp->compress_rope_base = get_f32(&c, j, "compress_rope_theta", 0, true);
    hp->ctx_max = get_u32(&c, j, "max_position_embeddings", -1);
    hp->n_mtp = get_u32(&c, j, "num_nextn_predict_layers", 0);
    *bos = get_u32(&c, j, "bos_token_id", 0);
    *eos = get_u32(&c, j, "eos_token_id", 1);
    cJSON *rs = cJSON_GetObjectItemCaseSensitive(j, "rope_scaling");
    if (!cJSON_IsObject(rs)) {
        if (!c.rc) c.rc = ds4_errf(err, errlen, "%s: rope_scaling object missing (YaRN parameters)", path);
    } else {
        cJSON *ty = cJSON_GetObjectItemCaseSensitive(rs, "type");
        if (!ty) ty = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
        if (!cJSON_IsString(ty) || strcmp(ty->valuestring, "yarn"))
            if (!c.rc) c.rc = ds4_errf(err, errlen, "%s: rope_scaling.type must be \"yarn\"", path);
        hp->yarn_factor = get_f32(&c, rs, "factor", 0, true);
        hp->yarn_orig_ctx = get_u32(&c, rs, "original_max_position_embeddings", -1);
        hp->yarn_beta_fast = get_f32(&c, rs, "beta_fast", 32, false);
        hp->yarn_beta_slow = get_f32(&c, rs, "beta_slow", 1, false);
    }
    cJSON *sf = cJSON_GetObjectItemCaseSensitive(j, "scoring_func");
    if (sf && (!cJSON_IsString(sf) || strcmp(sf->valuestring, "sqrtsoftplus")))
        if (!c.rc) c.rc = ds4_errf(err, errlen, "%s: scoring_func must be \"sqrtsoftplus\" (the only router ds4 runs)", path);
    float clamp = get_f32(&c, j, "swiglu_limit", 0, true);
    /* compress_ratios: one per layer, optionally one more for the MTP slot
     * (the published config has 44 entries for 43 layers). */
    cJSON *cr = cJSON_GetObjectItemCaseSensitive(j, "compress_ratios");
    int ncr = cJSON_IsArray(cr) ? cJSON_GetArraySize(cr) : -1;
    if (!c.rc && hp->n_layer > DS4_MAX_LAYERS)
        c.rc = ds4_errf(err, errlen, "%s: num_hidden_layers %u exceeds %d", path, hp->n_layer, DS4_MAX_LAYERS);
    if (!c.rc && (ncr != (int)hp->n_layer && ncr != (int)hp->n_layer + 1))
        c.rc = ds4_errf(err, errlen, "%s: compress_ratios must list num_hidden_layers (%u) or one more entries", path,
                    hp->n_layer);
    for (int l = 0; !c.rc && l < ncr; l++) {
        cJSON *v = cJSON_GetArrayItem(cr, l);
        if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 65536 || v->valuedouble != floor(v->valuedouble))
            c.rc = ds4_errf(err, errlen, "%s: compress_ratios[%d] is not a ratio", path, l);
        else
            hp->compress_ratio[l] = (int32_t)v->valuedouble;
    }
    for (uint32_t l = 0; !c.rc && l <= hp->n_layer; l++) hp->swiglu_clamp[l] = clamp;
    cJSON_Delete(j);
    if (c.rc) return -1;
    char why[256];
    if (ds4_hparams_validate(hp, why, sizeof why)) return ds4_errf(err, errlen, "%s: %s", path, why);
    return 0;
}

/* ---- tokenizer ---------------------------------------------------------- */

int hf_write_tokenizer(const char *path, uint32_t n_vocab, uint32_t bos, uint32_t eos, gguf_writer *w,
                       char *err, size_t errlen) {
    cJSON *j = read_json(path, err, errlen);
    if (!j) return -1;
    int rc = -1;
    char **tok = calloc(n_vocab, sizeof *tok);
    int32_t *type = calloc(n_vocab, sizeof *type);
    char **mer = NULL;
    int n_mer = 0;
    cJSON *model = cJSON_GetObjectItemCaseSensitive(j, "model");
    cJSON *vocab = model ? cJSON_GetObjectItemCaseSensitive(model, "vocab") : NULL;
    cJSON *merges = model ? cJSON_GetObjectItemCaseSensitive(model, "merges") : NULL;
    cJSON *added = cJSON_GetObjectItemCaseSensitive(j, "added_tokens");
    if (!tok || !type) { ds4_errf(err, errlen, "out of memory"); goto out; }
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges)) {
        ds4_errf(err, errlen, "%s: not a BPE tokenizer.json (model.vocab / model.merges missing)", path);
        goto out;
    }
    /* token_type: 1 normal, 3 control (special added tokens), 4 user-defined. */
    for (cJSON *e = vocab->child; e; e = e->next) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= n_vocab) {
            ds4_errf(err, errlen, "%s: token %s has id outside 0..%u", path, e->string, n_vocab - 1);
            goto out;
        }
        uint32_t id = (uint32_t)e->valuedouble;
        if (tok[id]) { ds4_errf(err, errlen, "%s: id %u used twice (%s, %s)", path, id, tok[id], e->string); goto out; }
        tok[id] = strdup(e->string);
        type[id] = 1;
    }
    for (cJSON *e = added ? added->child : NULL; e; e = e->next) {
        cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id"), *ct = cJSON_GetObjectItemCaseSensitive(e, "content");
        cJSON *sp = cJSON_GetObjectItemCaseSensitive(e, "special");
        if (!cJSON_IsNumber(id) || !cJSON_IsString(ct) || id->valuedouble < 0 || id->valuedouble >= n_vocab) {
            ds4_errf(err, errlen, "%s: added_tokens entry without a valid id/content (ids 0..%u)", path, n_vocab - 1);
            goto out;
        }
        uint32_t i = (uint32_t)id->valuedouble;
        if (tok[i] && strcmp(tok[i], ct->valuestring)) {
            ds4_errf(err, errlen, "%s: id %u is both %s and %s", path, i, tok[i], ct->valuestring);
            goto out;
        }
        free(tok[i]);
        tok[i] = strdup(ct->valuestring);
        type[i] = cJSON_IsTrue(sp) ? 3 : 4;
    }
    for (uint32_t i = 0; i < n_vocab; i++) {
        if (tok[i]) continue;
        char buf[64];
        snprintf(buf, sizeof buf, "<｜place▁holder▁no▁%u｜>", i);
        tok[i] = strdup(buf);
        type[i] = 3;
    }
    for (uint32_t i = 0; i < n_vocab; i++)
        if (!tok[i]) { ds4_errf(err, errlen, "out of memory"); goto out; }
    /* Merges: "a b" strings, or [a, b] pairs in newer tokenizer.json files. */
    n_mer = cJSON_GetArraySize(merges);
    mer = calloc((size_t)n_mer + 1, sizeof *mer);
    if (!mer) { ds4_errf(err, errlen, "out of memory"); goto out; }
    for (int i = 0; i < n_mer; i++) {
        cJSON *m = cJSON_GetArrayItem(merges, i);
        if (cJSON_IsString(m)) {
            mer[i] = strdup(m->valuestring);
        } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 && cJSON_IsString(cJSON_GetArrayItem(m, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(m, 1))) {
            const char *a = cJSON_GetArrayItem(m, 0)->valuestring, *b = cJSON_GetArrayItem(m, 1)->valuestring;
            size_t n = strlen(a) + strlen(b) + 2;
            if ((mer[i] = malloc(n))) snprintf(mer[i], n, "%s %s", a, b);
        } else {
            ds4_errf(err, errlen, "%s: merges[%d] is neither \"a b\" nor [a, b]", path, i);
            goto out;
        }
        if (!mer[i]) { ds4_errf(err, errlen, "out of memory"); goto out; }
    }
    if (bos >= n_vocab || eos >= n_vocab) {
        ds4_errf(err, errlen, "%s: bos/eos ids %u/%u outside the vocabulary", path, bos, eos);
        goto out;
    }
    gguf_set_str(w, "tokenizer.ggml.model", "gpt2");
    gguf_set_str(w, "tokenizer.ggml.pre", "joyai-llm");
    gguf_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)tok, NULL, n_vocab);
    gguf_set_arr_i32(w, "tokenizer.ggml.token_type", type, n_vocab);
    gguf_set_arr_str(w, "tokenizer.ggml.merges", (const char *const *)mer, NULL, (uint64_t)n_mer);
    gguf_set_u32(w, "tokenizer.ggml.bos_token_id", bos);
    gguf_set_u32(w, "tokenizer.ggml.eos_token_id", eos);
    gguf_set_bool(w, "tokenizer.ggml.add_bos_token", false);
    gguf_set_bool(w, "tokenizer.ggml.add_eos_token", false);
    rc = 0;
out:
    for (uint32_t i = 0; tok && i < n_vocab; i++) free(tok[i]);
    for (int i = 0; mer && i < n_mer; i++) free(mer[i]);
    free(tok);
    free(type);
    free(mer);
    cJSON_Delete(j);
    return rc;
}
