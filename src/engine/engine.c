/* Engine: the model, its tokenizer and a compute backend (ds4.h "Engine and
 * sessions"). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds4.h"
#include "engine/engine_internal.h"
#ifdef DS4_CUDA
#include "cuda/cuda.h"
#endif

/* Backends, preferred first. The CUDA backend hooks in here: when src/cuda
 * defines `const ds4_backend_ops ds4_backend_cuda` (its available() telling
 * whether a GPU is present), declare it in backend.h and list it first under
 * #ifdef DS4_CUDA. AUTO then picks it when a GPU exists, CPU otherwise. */
static const ds4_backend_ops *const registry[] = {
#ifdef DS4_CUDA
    &ds4_backend_cuda,
#endif
    &ds4_backend_cpu,
};

const ds4_backend_ops *ds4_backend_find(int kind) {
    for (size_t i = 0; i < sizeof registry / sizeof *registry; i++) {
        const ds4_backend_ops *b = registry[i];
        bool match = kind == DS4_BACKEND_AUTO || (kind == DS4_BACKEND_CPU && !strcmp(b->name, "cpu")) ||
                     (kind == DS4_BACKEND_CUDA && !strcmp(b->name, "cuda"));
        if (match && b->available()) return b;
    }
    return NULL;
}

void ds4_kv_host_free(ds4_kv_host *h) {
    if (!h) return;
    for (uint32_t l = 0; h->layers && l < h->n_layer; l++) {
        ds4_kv_layer_host *o = &h->layers[l];
        free(o->raw); free(o->comp); free(o->ckv); free(o->cgate);
        free(o->idx); free(o->ikv); free(o->igate);
    }
    free(h->layers);
    memset(h, 0, sizeof *h);
}

ds4_engine *ds4_engine_open(const ds4_engine_params *p, char *err, size_t errlen) {
    if (!p || !p->model_path) { ds4_errf(err, errlen, "no model path"); return NULL; }
    ds4_engine *e = calloc(1, sizeof *e);
    if (!e) { ds4_errf(err, errlen, "out of memory"); return NULL; }
    e->verbose = p->verbose;
    if (ds4_model_load(&e->model, p->model_path, err, errlen)) { free(e); return NULL; }
    e->model_loaded = true;
    if (p->mtp_path && ds4_model_load_mtp(&e->model, p->mtp_path, err, errlen)) goto fail;
    if (!(e->tok = ds4_tokenizer_from_gguf(e->model.gguf, err, errlen))) goto fail;
    if (ds4_tokenizer_n_vocab(e->tok) != e->model.hp.n_vocab) {
        ds4_errf(err, errlen, "%s: tokenizer has %u tokens, model vocab_size is %u", p->model_path,
                        ds4_tokenizer_n_vocab(e->tok), e->model.hp.n_vocab);
        goto fail;
    }
    e->ops = ds4_backend_find(p->backend);
    if (!e->ops) {
        ds4_errf(err, errlen, p->backend == DS4_BACKEND_CUDA
                                         ? "CUDA backend not available (not built in, or no GPU found)"
                                         : "no usable backend");
        goto fail;
    }
    if (!(e->be = e->ops->create(&e->model, p->n_threads, err, errlen))) goto fail;
    return e;
fail:
    ds4_engine_close(e);
    return NULL;
}

void ds4_engine_close(ds4_engine *e) {
    if (!e) return;
    if (e->be) e->ops->destroy(e->be);
    if (e->tok) ds4_tokenizer_free(e->tok);
    if (e->model_loaded) ds4_model_free(&e->model);
    free(e);
}

const ds4_tokenizer *ds4_engine_tokenizer(const ds4_engine *e) { return e->tok; }
const char *ds4_engine_backend_name(const ds4_engine *e) { return e->ops->name; }
uint32_t ds4_engine_n_vocab(const ds4_engine *e) { return e->model.hp.n_vocab; }
uint32_t ds4_engine_ctx_max(const ds4_engine *e) { return e->model.hp.ctx_max; }

void ds4_engine_inspect(const ds4_engine *e, uint64_t ctx, FILE *out) {
    ds4_model_inspect(&e->model, ctx, out);
    fprintf(out, "backend: %s\n", e->ops->name);
}

const ds4_model *ds4_engine_model(const ds4_engine *e) { return &e->model; }

uint64_t ds4_engine_weight_bytes_per_token(const ds4_engine *e) {
    /* Tensors of the main file: the embedding is a row lookup; a routed
     * expert tensor (…_exps) is read for n_expert_used of its n_expert
     * experts. */
    const ds4_hparams *hp = &e->model.hp;
    const gguf_file *f = e->model.gguf;
    uint64_t total = 0;
    for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        gguf_str nm = t->name;
        if (gguf_str_eq(nm, "token_embd.weight")) continue;
        bool exps = nm.len > 12 && !memcmp(nm.ptr + nm.len - 12, "_exps.weight", 12);
        total += exps ? t->nbytes / hp->n_expert * hp->n_expert_used : t->nbytes;
    }
    return total;
}

int ds4_engine_session_bytes(ds4_engine *e, uint32_t ctx, uint64_t *bytes, char *err, size_t errlen) {
    /* Measured, not modelled: the backend reports what it allocated, so the
     * answer tracks every backend's layout (rings, compressed rows, score
     * scratch) without a second copy of its arithmetic. */
    ds4_session *s = ds4_session_new(e, ctx, err, errlen);
    if (!s) return -1;
    uint64_t in_use = 0, allocated = 0;
    e->ops->state_bytes(e->be, s->st, &in_use, &allocated);
    *bytes = allocated + (uint64_t)ctx * sizeof *s->ids + (uint64_t)e->model.hp.n_vocab * sizeof *s->logits;
    ds4_session_free(s);
    return 0;
}

int ds4_engine_mem_free(ds4_engine *e, uint64_t *bytes, char *err, size_t errlen) {
    return e->ops->mem_free(e->be, bytes, err, errlen);
}
