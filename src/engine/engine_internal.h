/* Engine internals shared by engine.c, session.c and generate.c. */
#ifndef DS4_ENGINE_INTERNAL_H
#define DS4_ENGINE_INTERNAL_H
#include "ds4.h"
#include "engine/backend.h"
#include "model/model.h"
#include "util/errf.h"

struct ds4_engine {
    ds4_model model;
    bool model_loaded;
    ds4_tokenizer *tok;
    const ds4_backend_ops *ops;
    void *be;                   /* the backend's context */
    bool verbose;               /* per-eval tok/s on stderr */
};

struct ds4_session {
    ds4_engine *e;
    void *st;                   /* backend state */
    uint32_t ctx;
    int32_t *ids;               /* tokens held, ctx capacity */
    size_t n;
    float *logits;              /* n_vocab: next-token logits, once in_host */
    bool has_logits;
    bool in_host;               /* logits copied out of the backend (eval_top keeps them there) */
    int32_t top;                /* ds4_argmax of the logits, valid with has_logits */
};

const ds4_model *ds4_engine_model(const ds4_engine *e);

#endif
