/* CPU reference forward pass (spec model.md §4–§6) and its session state (§7).
 *
 * A chunk of n tokens is processed layer-major: every projection is one
 * matmul over the chunk (each weight row dequantised once, dotted with all n
 * activations by cpu_dot), routed experts are grouped by expert. A chunk of 1
 * is decode. Because the per-row dot routine and every accumulation order are
 * the same for any chunk size and any thread count, chunked prefill, decode
 * and any threading give bit-identical logits.
 *
 * State per layer (logical layout in engine/backend.h):
 *  - raw ring of keep_raw = window + slack K=V rows, position p in slot
 *    p % keep_raw. Rows of the current chunk live in the chunk's own buffer
 *    until the layer's attention is done, so the ring never needs room for a
 *    whole chunk;
 *  - compressed rows (ctx/R + 2 capacity, as ds4), indexer rows;
 *  - compressor input rings (kv, gate+ape; W f32 per position) holding the
 *    frontier plus slack. Emitting block b reads positions (b−1)R … bR+R−1.
 * KV rows (raw, compressed, indexer) are stored as f32 values rounded through
 * f16 — ds4's convention (spec §7.1, §10 row 7) — and are rounded when
 * created, so the token that writes a row already attends to the rounded one.
 * Compressor inputs stay unrounded f32 like ds4's frontier. */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu.h"
#include "ds4.h"
#include "quant/quant.h"
#include "util/errf.h"

#define CPU_CHUNK 256          /* tokens per internal sub-chunk (bounds scratch) */
#define MAX_HC 16

typedef struct {
    int ratio, lanes;
    uint32_t W, Wi;             /* attention / indexer compressor widths */
    float *raw;                 /* keep_raw × head_dim */
    uint32_t lo_raw;            /* oldest raw position held */
    float *comp;                /* cap_comp × head_dim */
    uint32_t n_comp, cap_comp;
    float *ckv, *cgate;         /* keep_c × W */
    uint32_t keep_c, lo_c;
    float *idx;                 /* cap_comp × idx_head_dim */
    uint32_t n_idx;
    float *ikv, *igate;         /* keep_i × Wi */
    uint32_t keep_i, lo_i;
    uint32_t last_sel, last_vis; /* indexer selection of the last token (tests) */
} layer_state;

struct cpu_state {
    cpu_backend *be;
    uint32_t ctx, n, keep_raw;
    int n_layer;
    layer_state *L;
    float *last;                /* eval_top's logits (n_vocab), made on first use */
};

struct cpu_mtp {
    cpu_backend *be;
    uint32_t n, keep_raw;
    layer_state L;
};

struct cpu_backend {
    const ds4_model *m;
    const ds4_hparams *hp;
    cpu_pool *pool;
    double *freq_plain, *freq_yarn;
    bool qat;                   /* false only under the DS4_DIAG_EXACT_KV diagnostic */
    float perturb;              /* DS4_DIAG_PERTURB diagnostic (0: off) */
    pthread_mutex_t mu;         /* one eval at a time: the pool is shared */
};

/* ---- helpers ---------------------------------------------------------------- */

static const float *F(const ds4_tensor *t) { return (const float *)t->data; }

typedef struct {
    ggml_type type;
    const uint8_t *w;
    int64_t n_in;
    const float *x;
    int64_t ldx, xg_rows, xg_stride;    /* row r reads x + (r / xg_rows)·xg_stride */
    int64_t n_tok;
    float *y;
    int64_t ldy;
} mm_job;

static void mm_task(void *c, int64_t r0, int64_t r1, int tid) {
    mm_job *j = c;
    while (r0 < r1) {   /* one call per x group the range touches */
        int64_t g = j->xg_rows ? r0 / j->xg_rows : 0;
        int64_t end = j->xg_rows && (g + 1) * j->xg_rows < r1 ? (g + 1) * j->xg_rows : r1;
        ds4_matmul_rows(j->type, j->w, j->n_in, r0, end, j->x + g * j->xg_stride, j->n_tok, j->ldx, j->y, j->ldy);
        r0 = end;
    }
}

/* y[t·ldy + r] = W[r] · x[t·ldx …] for every row r of T (expert e of a 3-D
 * tensor), t < n. Threads split rows. */
static void matmul(cpu_backend *be, const ds4_tensor *T, int64_t e, const float *x, int64_t ldx, int64_t n,
                   float *y, int64_t ldy) {
    mm_job j = {T->type, (const uint8_t *)T->data + (uint64_t)e * (uint64_t)T->ne[1] * T->row_bytes,
                T->ne[0], x, ldx, 0, 0, n, y, ldy};
    cpu_pool_run(be->pool, T->ne[1], mm_task, &j);
}

/* ---- scratch for one sub-chunk ------------------------------------------------ */

typedef struct {
    float *X, *mix, *pre, *post, *comb, *h, *nrm, *qa, *q, *o, *kv, *low, *y;
    float *ck, *cg, *ik, *ig, *iq, *iw, *isc, *rl, *ew, *eout, *xe, *ge, *ue, *de, *sg, *su, *ape;
    int32_t *sel, *nsel, *eid, *etok;
    float *att;                 /* per thread: att_len scores */
    const float **rows;         /* per thread: att_len row pointers */
    int64_t att_len;
} scratch;

static void scratch_free(scratch *s) {
    float **f[] = {&s->X, &s->mix, &s->pre, &s->post, &s->comb, &s->h, &s->nrm, &s->qa, &s->q, &s->o, &s->kv,
                   &s->low, &s->y, &s->ck, &s->cg, &s->ik, &s->ig, &s->iq, &s->iw, &s->isc, &s->rl, &s->ew,
                   &s->eout, &s->xe, &s->ge, &s->ue, &s->de, &s->sg, &s->su, &s->ape, &s->att};
    for (size_t i = 0; i < sizeof f / sizeof *f; i++) { free(*f[i]); *f[i] = NULL; }
    free(s->sel); free(s->nsel); free(s->eid); free(s->etok); free(s->rows);
}

static uint32_t max_comp_width(const ds4_hparams *hp) {
    uint32_t w = 1;
    for (uint32_t l = 0; l < hp->n_layer; l++)
        if (hp->compress_ratio[l] > 0) {
            uint32_t x = ds4_comp_lanes(hp->compress_ratio[l]) * hp->head_dim;
            if (x > w) w = x;
        }
    return w;
}

/* Buffers for a sub-chunk of cap tokens. max_comp_rows: the most compressed
 * rows one query can see; max_idx_rows: the most indexer rows to score. */
static int scratch_init(scratch *s, cpu_backend *be, int cap, uint32_t max_comp_rows, uint32_t max_idx_rows) {
    const ds4_hparams *hp = be->hp;
    memset(s, 0, sizeof *s);
    size_t n = (size_t)cap, d = hp->n_embd, hc = hp->hc_count, hd = hp->head_dim, H = hp->n_head;
    size_t ff = hp->expert_ff, used = hp->n_expert_used, ihd = hp->idx_head_dim, ih = hp->idx_n_head;
    size_t ffs = (size_t)be->m->layers[0].gate_shexp.ne[1];
    if (be->m->mtp_gguf && (size_t)be->m->mtp.gate_shexp.ne[1] > ffs) ffs = (size_t)be->m->mtp.gate_shexp.ne[1];
    size_t cw = max_comp_width(hp);
    size_t apew = cw > 2 * ihd ? cw : 2 * ihd;   /* ape row of either compressor */
    size_t topk = hp->idx_top_k;
    s->att_len = hp->window + max_comp_rows;
    int T = cpu_pool_threads(be->pool);
#define A(p, cnt) if (!((p) = malloc(((size_t)(cnt) + 1) * sizeof *(p)))) goto oom
    A(s->X, n * hc * d); A(s->mix, n * (2 + hc) * hc); A(s->pre, n * hc); A(s->post, n * hc);
    A(s->comb, n * hc * hc); A(s->h, n * d); A(s->nrm, n * d); A(s->qa, n * hp->q_lora);
    A(s->q, n * H * hd); A(s->o, n * H * hd); A(s->kv, n * hd); A(s->low, n * hp->o_groups * hp->o_lora);
    A(s->y, n * d); A(s->ck, n * cw); A(s->cg, n * cw); A(s->ik, n * 2 * ihd); A(s->ig, n * 2 * ihd);
    A(s->iq, n * ih * ihd); A(s->iw, n * ih); A(s->isc, (size_t)max_idx_rows); A(s->rl, n * hp->n_expert);
    size_t ue = used > hc ? used : hc;   /* MTP fusion reuses xe/de for hc streams */
    A(s->ew, n * used); A(s->eout, n * used * d); A(s->xe, n * ue * d); A(s->ge, n * used * ff);
    A(s->ue, n * used * ff); A(s->de, n * ue * d); A(s->sg, n * ffs); A(s->su, n * ffs); A(s->ape, apew);
    A(s->sel, n * topk); A(s->nsel, n); A(s->eid, n * used); A(s->etok, n * used);
    A(s->att, (size_t)T * s->att_len); A(s->rows, (size_t)T * s->att_len);
#undef A
    return 0;
oom:
    scratch_free(s);
    return -1;
}

/* ---- hyper-connections (spec §4.2, §4.3) --------------------------------------- */

/* Mixer outputs of n tokens' HC states, divided by rms(z) (spec §4.2). */
static void hc_mix(cpu_backend *be, const ds4_tensor *fn, const float *X, int n, float *mix) {
    const ds4_hparams *hp = be->hp;
    int64_t zw = (int64_t)hp->hc_count * hp->n_embd, mw = fn->ne[1];
    matmul(be, fn, 0, X, zw, n, mix, mw);
    for (int t = 0; t < n; t++) {
        const float *z = X + t * zw;
        double ss = 0;
        for (int64_t i = 0; i < zw; i++) ss += (double)z[i] * z[i];
        float rms = (float)sqrt(ss / (double)zw + hp->rms_eps);
        for (int64_t i = 0; i < mw; i++) mix[t * mw + i] /= rms;
    }
}

static void hc_pre(cpu_backend *be, scratch *s, const ds4_tensor *fn, const ds4_tensor *scale,
                   const ds4_tensor *base, int n) {
    const ds4_hparams *hp = be->hp;
    int hc = (int)hp->hc_count;
    int64_t d = hp->n_embd, mw = (2 + hc) * hc;
    hc_mix(be, fn, s->X, n, s->mix);
    for (int t = 0; t < n; t++) {
        float *pre = s->pre + t * hc;
        cpu_hc_coeffs(s->mix + t * mw, F(scale), F(base), hc, (int)hp->hc_sinkhorn_iters, hp->hc_eps, pre,
                      s->post + t * hc, s->comb + t * hc * hc);
        const float *X = s->X + t * hc * d;
        float *h = s->h + t * d;
        for (int64_t k = 0; k < d; k++) {
            float a = 0;
            for (int i = 0; i < hc; i++) a += pre[i] * X[i * d + k];
            h[k] = a;
        }
    }
}

/* X'_c = post_c·y + Σ_a C[a][c]·X_a (Cᵀ applied to the old streams). */
static void hc_post(const ds4_hparams *hp, scratch *s, int n) {
    int hc = (int)hp->hc_count;
    int64_t d = hp->n_embd;
    for (int t = 0; t < n; t++) {
        float *X = s->X + t * hc * d;
        const float *post = s->post + t * hc, *C = s->comb + t * hc * hc, *y = s->y + t * d;
        for (int64_t k = 0; k < d; k++) {
            float old[MAX_HC];
            for (int a = 0; a < hc; a++) old[a] = X[a * d + k];
            for (int c = 0; c < hc; c++) {
                float v = post[c] * y[k];
                for (int a = 0; a < hc; a++) v += C[a * hc + c] * old[a];
                X[c * d + k] = v;
            }
        }
    }
}

/* ---- compressor (spec §4.5) ---------------------------------------------------------- */

/* Pool block b from the input ring (kv, gate: keep × W), then norm, RoPE at
 * the block's first position, QAT (FP8 for attention rows, Hadamard+FP4 for
 * indexer rows) and the f16 rounding of stored rows. */
static void comp_emit(const ds4_hparams *hp, const float *kv, const float *gate, uint32_t keep, int R, int lanes,
                      int D, uint32_t b, const float *norm_w, const double *freq, bool indexer, bool qat,
                      float *out) {
    int W = lanes * D;
    uint64_t bR = (uint64_t)b * R;
    bool prev = lanes == 2 && b > 0;
    int off = lanes == 2 ? D : 0;   /* current block uses lane "b" when overlapping */
    for (int j = 0; j < D; j++) {
        float m = -INFINITY;
        if (prev) for (uint64_t t = bR - R; t < bR; t++) m = fmaxf(m, gate[(t % keep) * W + j]);
        for (uint64_t t = bR; t < bR + R; t++) m = fmaxf(m, gate[(t % keep) * W + off + j]);
        float den = 0, acc = 0;
        if (prev)
            for (uint64_t t = bR - R; t < bR; t++) {
                float w = expf(gate[(t % keep) * W + j] - m);
                den += w; acc += w * kv[(t % keep) * W + j];
            }
        for (uint64_t t = bR; t < bR + R; t++) {
            float w = expf(gate[(t % keep) * W + off + j] - m);
            den += w; acc += w * kv[(t % keep) * W + off + j];
        }
        out[j] = acc / den;
    }
    cpu_rmsnorm(out, norm_w, D, hp->rms_eps, out);
    int rd = (int)hp->rope_dim;
    cpu_rope(out + D - rd, rd / 2, freq, (int64_t)bR, false);
    if (!qat) return;
    if (indexer) cpu_fp4_sim(out, D);
    else cpu_fp8_sim(out, D - rd);
    for (int j = 0; j < D; j++) out[j] = ds4_round_f16(out[j]);
}

/* Project n tokens through one compressor (kv, gate + ape), then walk them in
 * order: store each in the ring, emit a row when it completes a block. */
static void compress_chunk(cpu_backend *be, scratch *s, const ds4_tensor *tkv, const ds4_tensor *tgate,
                           const ds4_tensor *ape, const ds4_tensor *norm, int R, int lanes, int D, float *pk,
                           float *pg, float *rkv, float *rg, uint32_t keep, uint32_t *lo, float *rows,
                           uint32_t *n_rows, uint32_t p0, int n, const double *freq, bool indexer) {
    int W = lanes * D;
    matmul(be, tkv, 0, s->nrm, be->hp->n_embd, n, pk, W);
    matmul(be, tgate, 0, s->nrm, be->hp->n_embd, n, pg, W);
    for (int t = 0; t < n; t++) {
        uint32_t p = p0 + (uint32_t)t, slot = p % keep;
        ds4_dequant_row(ape->type, (const uint8_t *)ape->data + (uint64_t)(p % R) * ape->row_bytes, s->ape, W);
        for (int j = 0; j < W; j++) {
            rkv[(size_t)slot * W + j] = pk[(size_t)t * W + j];
            rg[(size_t)slot * W + j] = pg[(size_t)t * W + j] + s->ape[j];
        }
        if ((p + 1) % R == 0) {
            uint32_t b = (p + 1) / R - 1;
            comp_emit(be->hp, rkv, rg, keep, R, lanes, D, b, F(norm), freq, indexer, be->qat, rows + (size_t)b * D);
            *n_rows = b + 1;
        }
    }
    uint32_t end = p0 + (uint32_t)n;
    if (end > keep && end - keep > *lo) *lo = end - keep;
}

/* ---- attention sublayer (spec §4.4, §4.6) ----------------------------------------- */

typedef struct {
    cpu_backend *be;
    scratch *s;
    layer_state *ls;
    const ds4_layer *L;
    uint32_t p0, keep_raw;
    const double *freq;
    int t;                      /* indexer: current token */
} attn_ctx;

/* score_c = Σ_h wI_h · max(0, qI_h · k_c) for rows c of token a->t. */
static void idx_task(void *c, int64_t r0, int64_t r1, int tid) {
    attn_ctx *a = c;
    const ds4_hparams *hp = a->be->hp;
    int64_t ih = hp->idx_n_head, ihd = hp->idx_head_dim;
    const float *q = a->s->iq + a->t * ih * ihd, *w = a->s->iw + a->t * ih;
    for (int64_t r = r0; r < r1; r++) {
        const float *k = a->ls->idx + r * ihd;
        float sc = 0;
        for (int64_t h = 0; h < ih; h++) sc += w[h] * fmaxf(0.0f, ds4_dot_f32(q + h * ihd, k, ihd));
        a->s->isc[r] = sc;
    }
}

static void attn_task(void *c, int64_t i0, int64_t i1, int tid) {
    attn_ctx *a = c;
    const ds4_hparams *hp = a->be->hp;
    scratch *s = a->s;
    layer_state *ls = a->ls;
    int64_t H = hp->n_head, hd = hp->head_dim, rd = hp->rope_dim, W = hp->window;
    float *sc = s->att + tid * s->att_len;
    const float **rows = s->rows + tid * s->att_len;
    float scale = (float)(1.0 / sqrt((double)hd));
    for (int64_t i = i0; i < i1; i++) {
        int64_t t = i / H, h = i % H;
        int64_t p = a->p0 + t;
        int64_t nr = 0;
        for (int64_t pos = p >= W - 1 ? p - (W - 1) : 0; pos <= p; pos++)
            rows[nr++] = pos >= a->p0 ? s->kv + (pos - a->p0) * hd : ls->raw + (pos % a->keep_raw) * hd;
        if (ls->ratio == 4) {
            for (int32_t k = 0; k < s->nsel[t]; k++) rows[nr++] = ls->comp + (int64_t)s->sel[t * hp->idx_top_k + k] * hd;
        } else if (ls->ratio > 0) {
            for (int64_t k = 0; k < (p + 1) / ls->ratio; k++) rows[nr++] = ls->comp + k * hd;
        }
        float *o = s->o + (t * H + h) * hd;
        cpu_attend(s->q + (t * H + h) * hd, rows, nr, hd, scale, F(&a->L->attn_sinks)[h], sc, o);
        cpu_rope(o + hd - rd, (int)rd / 2, a->freq, p, true);
    }
}

static void attn_sublayer(cpu_backend *be, scratch *s, const ds4_layer *L, layer_state *ls, uint32_t keep_raw,
                          uint32_t p0, int n) {
    const ds4_hparams *hp = be->hp;
    int64_t d = hp->n_embd, H = hp->n_head, hd = hp->head_dim, rd = hp->rope_dim, ql = hp->q_lora;
    const double *freq = ls->ratio ? be->freq_yarn : be->freq_plain;
    float eps = hp->rms_eps;

    hc_pre(be, s, &L->hc_attn_fn, &L->hc_attn_scale, &L->hc_attn_base, n);
    for (int t = 0; t < n; t++) cpu_rmsnorm(s->h + t * d, F(&L->attn_norm), d, eps, s->nrm + t * d);

    matmul(be, &L->attn_q_a, 0, s->nrm, d, n, s->qa, ql);
    for (int t = 0; t < n; t++) cpu_rmsnorm(s->qa + t * ql, F(&L->attn_q_a_norm), ql, eps, s->qa + t * ql);
    matmul(be, &L->attn_q_b, 0, s->qa, ql, n, s->q, H * hd);
    matmul(be, &L->attn_kv, 0, s->nrm, d, n, s->kv, hd);
    for (int t = 0; t < n; t++) {
        int64_t p = p0 + t;
        for (int64_t h = 0; h < H; h++) {
            float *q = s->q + (t * H + h) * hd;
            cpu_rmsnorm(q, NULL, hd, eps, q);
            cpu_rope(q + hd - rd, (int)rd / 2, freq, p, false);
        }
        float *kv = s->kv + t * hd;
        cpu_rmsnorm(kv, F(&L->attn_kv_a_norm), hd, eps, kv);
        cpu_rope(kv + hd - rd, (int)rd / 2, freq, p, false);
        if (!be->qat) continue;
        cpu_fp8_sim(kv, hd - rd);
        for (int64_t j = 0; j < hd; j++) kv[j] = ds4_round_f16(kv[j]);
    }

    attn_ctx a = {be, s, ls, L, p0, keep_raw, freq, 0};
    if (ls->ratio) {
        compress_chunk(be, s, &L->comp_kv, &L->comp_gate, &L->comp_ape, &L->comp_norm, ls->ratio, ls->lanes,
                       (int)hd, s->ck, s->cg, ls->ckv, ls->cgate, ls->keep_c, &ls->lo_c, ls->comp, &ls->n_comp,
                       p0, n, freq, false);
    }
    if (ls->ratio == 4) {
        int64_t ih = hp->idx_n_head, ihd = hp->idx_head_dim, topk = hp->idx_top_k;
        compress_chunk(be, s, &L->idx_comp_kv, &L->idx_comp_gate, &L->idx_comp_ape, &L->idx_comp_norm, 4, 2,
                       (int)ihd, s->ik, s->ig, ls->ikv, ls->igate, ls->keep_i, &ls->lo_i, ls->idx, &ls->n_idx,
                       p0, n, freq, true);
        matmul(be, &L->idx_q_b, 0, s->qa, ql, n, s->iq, ih * ihd);
        matmul(be, &L->idx_proj, 0, s->nrm, d, n, s->iw, ih);
        float wscale = (float)(1.0 / sqrt((double)ihd * (double)ih));
        for (int t = 0; t < n; t++) {
            for (int64_t h = 0; h < ih; h++) {
                float *q = s->iq + (t * ih + h) * ihd;
                cpu_rope(q + ihd - rd, (int)rd / 2, freq, p0 + t, false);
                if (be->qat) cpu_fp4_sim(q, ihd);
            }
            for (int64_t h = 0; h < ih; h++) s->iw[t * ih + h] *= wscale;
            uint32_t nvis = (p0 + t + 1) / 4;
            int32_t *sel = s->sel + t * topk;
            if (nvis <= topk) {
                for (uint32_t c = 0; c < nvis; c++) sel[c] = (int32_t)c;
                s->nsel[t] = (int32_t)nvis;
            } else {
                a.t = t;
                cpu_pool_run(be->pool, nvis, idx_task, &a);
                cpu_topk(s->isc, nvis, topk, sel);
                s->nsel[t] = (int32_t)topk;
            }
            ls->last_sel = (uint32_t)s->nsel[t];
            ls->last_vis = nvis;
        }
    }

    cpu_pool_run(be->pool, (int64_t)n * H, attn_task, &a);

    /* The chunk's rows join the ring only now: attention read them from s->kv. */
    for (int t = 0; t < n; t++)
        memcpy(ls->raw + ((p0 + t) % keep_raw) * hd, s->kv + t * hd, hd * sizeof(float));
    uint32_t end = p0 + (uint32_t)n;
    if (end > keep_raw && end - keep_raw > ls->lo_raw) ls->lo_raw = end - keep_raw;

    /* Grouped low-rank output: group g's rows read heads g·H/G … concatenated. */
    int64_t G = hp->o_groups, gl = hp->o_lora;
    mm_job j = {L->attn_output_a.type, L->attn_output_a.data, L->attn_output_a.ne[0], s->o, H * hd, gl, (H / G) * hd, n, s->low, G * gl};
    cpu_pool_run(be->pool, G * gl, mm_task, &j);
    matmul(be, &L->attn_output_b, 0, s->low, G * gl, n, s->y, d);
    hc_post(hp, s, n);
}

/* ---- MoE sublayer (spec §4.7) ------------------------------------------------------- */

static void ffn_sublayer(cpu_backend *be, scratch *s, const ds4_layer *L, float clamp, const int32_t *ids, int n) {
    const ds4_hparams *hp = be->hp;
    int64_t d = hp->n_embd, E = hp->n_expert, used = hp->n_expert_used, ff = hp->expert_ff;
    float eps = hp->rms_eps;

    hc_pre(be, s, &L->hc_ffn_fn, &L->hc_ffn_scale, &L->hc_ffn_base, n);
    for (int t = 0; t < n; t++) cpu_rmsnorm(s->h + t * d, F(&L->ffn_norm), d, eps, s->nrm + t * d);

    matmul(be, &L->ffn_gate_inp, 0, s->nrm, d, n, s->rl, E);
    for (int t = 0; t < n; t++) {
        float *sc = s->rl + t * E;
        for (int64_t e = 0; e < E; e++) sc[e] = cpu_router_score(sc[e]);
        int32_t *eid = s->eid + t * used;
        if (L->tid2eid.data) {
            const int32_t *row = (const int32_t *)((const uint8_t *)L->tid2eid.data + (uint64_t)ids[t] * L->tid2eid.row_bytes);
            for (int64_t i = 0; i < used; i++) eid[i] = row[i];
        } else {
            /* Biased scores choose; lowest index wins ties. used is small. */
            const float *bias = L->exp_probs_b.data ? F(&L->exp_probs_b) : NULL;
            for (int64_t i = 0; i < used; i++) {
                int32_t best = -1;
                float bv = 0;
                for (int64_t e = 0; e < E; e++) {
                    bool taken = false;
                    for (int64_t k = 0; k < i; k++) taken |= eid[k] == e;
                    if (taken) continue;
                    float v = sc[e] + (bias ? bias[e] : 0.0f);
                    if (best < 0 || v > bv) { best = (int32_t)e; bv = v; }
                }
                eid[i] = best;
            }
        }
        float sum = 0;
        for (int64_t i = 0; i < used; i++) sum += sc[eid[i]];
        if (hp->expert_weights_norm) sum = fmaxf(sum, 0x1p-14f);
        for (int64_t i = 0; i < used; i++)
            s->ew[t * used + i] = (hp->expert_weights_norm ? sc[eid[i]] / sum : sc[eid[i]]) * hp->expert_weights_scale;
    }

    /* Routed experts, grouped: every (token, slot) choosing expert e at once. */
    for (int64_t e = 0; e < E; e++) {
        int64_t m = 0;
        for (int64_t k = 0; k < n * used; k++)
            if (s->eid[k] == e) s->etok[m++] = (int32_t)k;
        if (!m) continue;
        for (int64_t i = 0; i < m; i++) memcpy(s->xe + i * d, s->nrm + (s->etok[i] / used) * d, d * sizeof(float));
        matmul(be, &L->gate_exps, e, s->xe, d, m, s->ge, ff);
        matmul(be, &L->up_exps, e, s->xe, d, m, s->ue, ff);
        for (int64_t i = 0; i < m; i++) {
            float w = s->ew[s->etok[i]];
            for (int64_t k = 0; k < ff; k++) s->ge[i * ff + k] = cpu_swiglu(s->ge[i * ff + k], s->ue[i * ff + k], clamp) * w;
        }
        matmul(be, &L->down_exps, e, s->ge, ff, m, s->de, d);
        for (int64_t i = 0; i < m; i++) memcpy(s->eout + s->etok[i] * d, s->de + i * d, d * sizeof(float));
    }

    int64_t ffs = L->gate_shexp.ne[1];
    matmul(be, &L->gate_shexp, 0, s->nrm, d, n, s->sg, ffs);
    matmul(be, &L->up_shexp, 0, s->nrm, d, n, s->su, ffs);
    for (int64_t i = 0; i < n * ffs; i++) s->sg[i] = cpu_swiglu(s->sg[i], s->su[i], clamp);
    matmul(be, &L->down_shexp, 0, s->sg, ffs, n, s->y, d);
    /* y = Σ routed (slot order) + shared: the routed sum first, fixed order. */
    for (int t = 0; t < n; t++)
        for (int64_t k = 0; k < d; k++) {
            float a = 0;
            for (int64_t i = 0; i < used; i++) a += s->eout[(t * used + i) * d + k];
            s->y[t * d + k] = a + s->y[t * d + k];
        }
    hc_post(hp, s, n);
}

/* ---- output head (spec §4.8) ------------------------------------------------------ */

static void head(cpu_backend *be, scratch *s, const ds4_tensor *fn, const ds4_tensor *scale, const ds4_tensor *base,
                 const ds4_tensor *norm, int t0, int n, float *logits) {
    const ds4_hparams *hp = be->hp;
    int hc = (int)hp->hc_count;
    int64_t d = hp->n_embd;
    hc_mix(be, fn, s->X + (int64_t)t0 * hc * d, n, s->mix);
    for (int t = 0; t < n; t++) {
        const float *X = s->X + (int64_t)(t0 + t) * hc * d;
        float pre[MAX_HC];
        for (int a = 0; a < hc; a++)
            pre[a] = 1.0f / (1.0f + expf(-(s->mix[t * fn->ne[1] + a] * F(scale)[0] + F(base)[a]))) + hp->hc_eps;
        float *h = s->h + t * d;
        for (int64_t k = 0; k < d; k++) {
            float a = 0;
            for (int i = 0; i < hc; i++) a += pre[i] * X[i * d + k];
            h[k] = a;
        }
        cpu_rmsnorm(h, F(norm), d, hp->rms_eps, s->nrm + t * d);
    }
    matmul(be, &be->m->output, 0, s->nrm, d, n, logits, hp->n_vocab);
}

/* ---- backend ------------------------------------------------------------------------- */

cpu_backend *cpu_backend_new(const ds4_model *m, int n_threads, char *err, size_t errlen) {
    const ds4_hparams *hp = &m->hp;
    /* Shape facts this implementation relies on (all true of the real model). */
    const char *bad = NULL;
    if (hp->n_head_kv != 1) bad = "head_count_kv must be 1 (shared K=V)";
    else if (hp->rope_dim % 2 || hp->rope_dim >= hp->head_dim || (hp->head_dim - hp->rope_dim) % 64)
        bad = "head_dim - rope_dim must be a positive multiple of 64 (FP8 blocks)";
    else if (hp->idx_head_dim % 32 || (hp->idx_head_dim & (hp->idx_head_dim - 1)) || hp->idx_head_dim <= hp->rope_dim)
        bad = "indexer head dim must be a power of two, multiple of 32, above rope_dim";
    else if (!hp->o_groups || hp->n_head % hp->o_groups) bad = "head_count must be a multiple of output groups";
    else if (hp->hc_count < 1 || hp->hc_count > MAX_HC) bad = "hyper_connection.count out of range";
    else if (!hp->n_expert_used || hp->n_expert_used > hp->n_expert) bad = "expert_used_count out of range";
    else if (!hp->window) bad = "sliding_window must be positive";
    if (bad) { ds4_errf(err, errlen, "cpu backend: %s", bad); return NULL; }
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        const ds4_layer *L = &m->layers[l];
        int r = hp->compress_ratio[l];
        if (r < 0 || (r == 4) != (L->idx_q_b.data != NULL) || (r != 0) != (L->comp_kv.data != NULL)) {
            ds4_errf(err, errlen, "cpu backend: layer %u: compress ratio %d does not match its tensors", l, r);
            return NULL;
        }
        if (L->tid2eid.data) {
            /* Hash tables index expert tensors: check every id once. */
            const int32_t *ids = L->tid2eid.data;
            for (uint64_t i = 0; i < (uint64_t)hp->n_vocab * hp->n_expert_used; i++)
                if (ids[i] < 0 || (uint32_t)ids[i] >= hp->n_expert) {
                    ds4_errf(err, errlen, "cpu backend: layer %u: tid2eid entry %llu = %d is not an expert", l,
                         (unsigned long long)i, ids[i]);
                    return NULL;
                }
        }
    }
    cpu_backend *be = calloc(1, sizeof *be);
    if (!be) { ds4_errf(err, errlen, "cpu backend: out of memory"); return NULL; }
    be->m = m;
    be->hp = hp;
    be->pool = cpu_pool_new(cpu_default_threads(n_threads));
    be->freq_plain = malloc(hp->rope_dim / 2 * sizeof(double));
    be->freq_yarn = malloc(hp->rope_dim / 2 * sizeof(double));
    if (!be->pool || !be->freq_plain || !be->freq_yarn) {
        cpu_backend_free(be);
        ds4_errf(err, errlen, "cpu backend: out of memory");
        return NULL;
    }
    cpu_rope_freqs(hp, false, be->freq_plain, NULL, NULL);
    cpu_rope_freqs(hp, true, be->freq_yarn, NULL, NULL);
    be->qat = !cpu_diag_exact_kv();
    be->perturb = cpu_diag_perturb();
    if (!be->qat || be->perturb != 0)
        fprintf(stderr, "cpu backend: DIAGNOSTIC mode (%s%s%g)\n", be->qat ? "" : "exact KV, ", "perturb ", be->perturb);
    pthread_mutex_init(&be->mu, NULL);
    return be;
}

void cpu_backend_free(cpu_backend *be) {
    if (!be) return;
    if (be->pool) { cpu_pool_free(be->pool); pthread_mutex_destroy(&be->mu); }
    free(be->freq_plain);
    free(be->freq_yarn);
    free(be);
}

int cpu_backend_threads(const cpu_backend *be) { return cpu_pool_threads(be->pool); }

/* ---- state ------------------------------------------------------------------------------ */

static void layer_state_free(layer_state *ls) {
    free(ls->raw); free(ls->comp); free(ls->ckv); free(ls->cgate);
    free(ls->idx); free(ls->ikv); free(ls->igate);
    memset(ls, 0, sizeof *ls);
}

static int layer_state_init(layer_state *ls, const ds4_hparams *hp, int ratio, uint32_t keep_raw, uint32_t ctx) {
    memset(ls, 0, sizeof *ls);
    size_t hd = hp->head_dim, ihd = hp->idx_head_dim;
    ls->ratio = ratio;
    ls->lanes = (int)ds4_comp_lanes(ratio);
    if (!(ls->raw = calloc((size_t)keep_raw * hd, sizeof(float)))) return -1;
    if (!ratio) return 0;
    ls->W = (uint32_t)ls->lanes * hp->head_dim;
    ls->cap_comp = ctx / (uint32_t)ratio + 2;
    ls->keep_c = ds4_kv_keep_comp(hp, ratio);
    if (!(ls->comp = calloc((size_t)ls->cap_comp * hd, sizeof(float))) ||
        !(ls->ckv = calloc((size_t)ls->keep_c * ls->W, sizeof(float))) ||
        !(ls->cgate = calloc((size_t)ls->keep_c * ls->W, sizeof(float)))) return -1;
    if (ratio != 4) return 0;
    ls->Wi = 2 * hp->idx_head_dim;
    ls->keep_i = ds4_kv_keep_comp(hp, 4);
    if (!(ls->idx = calloc((size_t)ls->cap_comp * ihd, sizeof(float))) ||
        !(ls->ikv = calloc((size_t)ls->keep_i * ls->Wi, sizeof(float))) ||
        !(ls->igate = calloc((size_t)ls->keep_i * ls->Wi, sizeof(float)))) return -1;
    return 0;
}

cpu_state *cpu_state_new(cpu_backend *be, uint32_t ctx, char *err, size_t errlen) {
    const ds4_hparams *hp = be->hp;
    if (ctx < 1 || ctx > hp->ctx_max) {
        ds4_errf(err, errlen, "context %u out of range 1…%u", ctx, hp->ctx_max);
        return NULL;
    }
    cpu_state *st = calloc(1, sizeof *st);
    if (!st || !(st->L = calloc(hp->n_layer, sizeof *st->L))) {
        free(st);
        ds4_errf(err, errlen, "out of memory for session state");
        return NULL;
    }
    st->be = be;
    st->ctx = ctx;
    st->keep_raw = ds4_kv_keep_raw(hp);
    st->n_layer = (int)hp->n_layer;
    for (int l = 0; l < st->n_layer; l++)
        if (layer_state_init(&st->L[l], hp, hp->compress_ratio[l], st->keep_raw, ctx)) {
            cpu_state_free(st);
            ds4_errf(err, errlen, "out of memory for session state (ctx %u)", ctx);
            return NULL;
        }
    return st;
}

void cpu_state_free(cpu_state *st) {
    if (!st) return;
    for (int l = 0; l < st->n_layer; l++) layer_state_free(&st->L[l]);
    free(st->L);
    free(st->last);
    free(st);
}

uint32_t cpu_state_len(const cpu_state *st) { return st->n; }

void cpu_state_bytes(const cpu_state *st, uint64_t *in_use, uint64_t *allocated) {
    const ds4_hparams *hp = st->be->hp;
    uint64_t u = 0, a = 0, hd = hp->head_dim, ihd = hp->idx_head_dim;
    for (int l = 0; l < st->n_layer; l++) {
        const layer_state *ls = &st->L[l];
        u += (st->n - ls->lo_raw) * hd;
        a += st->keep_raw * hd;
        if (!ls->ratio) continue;
        u += ls->n_comp * hd + 2ull * (st->n - ls->lo_c) * ls->W;
        a += ls->cap_comp * hd + 2ull * ls->keep_c * ls->W;
        if (ls->ratio != 4) continue;
        u += ls->n_idx * ihd + 2ull * (st->n - ls->lo_i) * ls->Wi;
        a += ls->cap_comp * ihd + 2ull * ls->keep_i * ls->Wi;
    }
    *in_use = u * sizeof(float);
    *allocated = a * sizeof(float);
}

void cpu_state_rows(const cpu_state *st, int il, uint32_t *n_comp, uint32_t *n_idx) {
    *n_comp = st->L[il].n_comp;
    *n_idx = st->L[il].n_idx;
}

void cpu_state_last_selection(const cpu_state *st, int il, uint32_t *selected, uint32_t *visible) {
    *selected = st->L[il].last_sel;
    *visible = st->L[il].last_vis;
}

/* Largest compressed-row count one query of this state can see. */
static uint32_t max_visible_comp(const ds4_hparams *hp, uint32_t ctx) {
    uint32_t m = 0;
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        int r = hp->compress_ratio[l];
        uint32_t v = r == 4 ? hp->idx_top_k : r > 0 ? ctx / (uint32_t)r + 1 : 0;
        if (v > m) m = v;
    }
    return m;
}

int cpu_eval(cpu_backend *be, cpu_state *st, const int32_t *ids, size_t n, float *logits, bool all_logits,
             float *hc_last, char *err, size_t errlen) {
    const ds4_hparams *hp = be->hp;
    const ds4_model *m = be->m;
    if (n == 0) return 0;
    if (n > st->ctx - st->n) return ds4_errf(err, errlen, "context full: %u + %zu tokens > %u", st->n, n, st->ctx);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= hp->n_vocab)
            return ds4_errf(err, errlen, "token id %d out of range (vocab %u)", ids[i], hp->n_vocab);
    scratch s;
    int cap = n < CPU_CHUNK ? (int)n : CPU_CHUNK;
    if (scratch_init(&s, be, cap, max_visible_comp(hp, st->ctx), st->ctx / 4 + 2))
        return ds4_errf(err, errlen, "out of memory for a %d-token chunk", cap);
    pthread_mutex_lock(&be->mu);
    int64_t d = hp->n_embd, hc = hp->hc_count;
    for (size_t t0 = 0; t0 < n; t0 += (size_t)cap) {
        int c = n - t0 < (size_t)cap ? (int)(n - t0) : cap;
        uint32_t p0 = st->n;
        for (int t = 0; t < c; t++) {
            float *X = s.X + t * hc * d;
            const ds4_tensor *te = &m->tok_embd;
            ds4_dequant_row(te->type, (const uint8_t *)te->data + (uint64_t)ids[t0 + t] * te->row_bytes, X, d);
            if (be->perturb != 0) cpu_diag_perturb_row(X, d, p0 + (uint32_t)t, be->perturb);
            for (int64_t a = 1; a < hc; a++) memcpy(X + a * d, X, d * sizeof(float));
        }
        for (int l = 0; l < st->n_layer; l++) {
            attn_sublayer(be, &s, &m->layers[l], &st->L[l], st->keep_raw, p0, c);
            ffn_sublayer(be, &s, &m->layers[l], hp->swiglu_clamp[l], ids + t0, c);
        }
        st->n += (uint32_t)c;
        if (logits && all_logits)
            head(be, &s, &m->out_hc_fn, &m->out_hc_scale, &m->out_hc_base, &m->out_norm, 0, c,
                 logits + t0 * hp->n_vocab);
        else if (logits && t0 + (size_t)c == n)
            head(be, &s, &m->out_hc_fn, &m->out_hc_scale, &m->out_hc_base, &m->out_norm, c - 1, 1, logits);
        if (hc_last && t0 + (size_t)c == n) memcpy(hc_last, s.X + (c - 1) * hc * d, hc * d * sizeof(float));
    }
    pthread_mutex_unlock(&be->mu);
    scratch_free(&s);
    return 0;
}

/* The rules of src/engine/backend.h applied to this backend's layer state. */
static const char *layer_missing(const ds4_hparams *hp, const layer_state *ls, uint32_t n) {
    return ds4_kv_missing(hp, ls->ratio, ls->lanes, ls->lo_raw, ls->lo_c, ls->lo_i, n);
}

static void layer_truncate(layer_state *ls, uint32_t n) {
    ds4_kv_truncate_counts(ls->ratio, n, &ls->lo_raw, &ls->lo_c, &ls->lo_i, &ls->n_comp, &ls->n_idx);
}

int cpu_truncate(cpu_backend *be, cpu_state *st, uint32_t n, char *err, size_t errlen) {
    if (n > st->n) return ds4_errf(err, errlen, "cannot truncate %u tokens to %u", st->n, n);
    if (n == st->n) return 0;
    if (n > 0)
        for (int l = 0; l < st->n_layer; l++) {
            const char *miss = layer_missing(be->hp, &st->L[l], n);
            if (miss)
                return ds4_errf(err, errlen, "truncate %u -> %u is not exact: layer %d no longer holds the %s (exact rewinds are up to %u tokens)",
                            st->n, n, l, miss, ds4_kv_slack(be->hp) + 1);
        }
    for (int l = 0; l < st->n_layer; l++) layer_truncate(&st->L[l], n);
    st->n = n;
    return 0;
}

/* ---- export / import (logical layout of engine/backend.h) ------------------------ */

static float *ring_out(const float *ring, uint32_t keep, size_t w, uint32_t lo, uint32_t n) {
    float *o = malloc(((size_t)(n - lo) * w + 1) * sizeof(float));
    if (!o) return NULL;
    for (uint32_t p = lo; p < n; p++) memcpy(o + (size_t)(p - lo) * w, ring + (size_t)(p % keep) * w, w * sizeof(float));
    return o;
}

static float *dup_rows(const float *src, size_t cnt) {
    float *o = malloc((cnt + 1) * sizeof(float));
    if (o && cnt) memcpy(o, src, cnt * sizeof(float));
    return o;
}

int cpu_export(cpu_backend *be, const cpu_state *st, ds4_kv_host *out, char *err, size_t errlen) {
    const ds4_hparams *hp = be->hp;
    memset(out, 0, sizeof *out);
    out->n_tokens = st->n;
    out->n_layer = (uint32_t)st->n_layer;
    if (!(out->layers = calloc((size_t)st->n_layer, sizeof *out->layers))) goto oom;
    for (int l = 0; l < st->n_layer; l++) {
        const layer_state *ls = &st->L[l];
        ds4_kv_layer_host *o = &out->layers[l];
        o->lo_raw = ls->lo_raw; o->n_raw = st->n - ls->lo_raw;
        if (!(o->raw = ring_out(ls->raw, st->keep_raw, hp->head_dim, ls->lo_raw, st->n))) goto oom;
        if (!ls->ratio) continue;
        o->n_comp = ls->n_comp;
        if (!(o->comp = dup_rows(ls->comp, (size_t)ls->n_comp * hp->head_dim))) goto oom;
        o->lo_comp = ls->lo_c; o->n_cpend = st->n - ls->lo_c;
        if (!(o->ckv = ring_out(ls->ckv, ls->keep_c, ls->W, ls->lo_c, st->n)) ||
            !(o->cgate = ring_out(ls->cgate, ls->keep_c, ls->W, ls->lo_c, st->n))) goto oom;
        if (ls->ratio != 4) continue;
        o->n_idx = ls->n_idx;
        if (!(o->idx = dup_rows(ls->idx, (size_t)ls->n_idx * hp->idx_head_dim))) goto oom;
        o->lo_idx = ls->lo_i; o->n_ipend = st->n - ls->lo_i;
        if (!(o->ikv = ring_out(ls->ikv, ls->keep_i, ls->Wi, ls->lo_i, st->n)) ||
            !(o->igate = ring_out(ls->igate, ls->keep_i, ls->Wi, ls->lo_i, st->n))) goto oom;
    }
    return 0;
oom:
    ds4_kv_host_free(out);
    return ds4_errf(err, errlen, "out of memory exporting the session state");
}

static void ring_in(float *ring, uint32_t keep, size_t w, uint32_t lo, uint32_t n, const float *src) {
    for (uint32_t p = lo; p < n; p++) memcpy(ring + (size_t)(p % keep) * w, src + (size_t)(p - lo) * w, w * sizeof(float));
}

int cpu_import(cpu_backend *be, cpu_state *st, const ds4_kv_host *in, char *err, size_t errlen) {
    const ds4_hparams *hp = be->hp;
    uint32_t n = in->n_tokens;
    if (in->n_layer != (uint32_t)st->n_layer) return ds4_errf(err, errlen, "snapshot has %u layers, model %d", in->n_layer, st->n_layer);
    if (n > st->ctx) return ds4_errf(err, errlen, "snapshot holds %u tokens, session context is %u", n, st->ctx);
    /* Validate everything before touching the state. */
    for (int l = 0; l < st->n_layer; l++) {
        const layer_state *ls = &st->L[l];
        const ds4_kv_layer_host *o = &in->layers[l];
        uint32_t R = (uint32_t)ls->ratio;
        bool ok = o->lo_raw <= n && o->n_raw == n - o->lo_raw && o->n_raw <= st->keep_raw;
        if (R) ok = ok && o->n_comp == n / R && o->lo_comp <= n && o->n_cpend == n - o->lo_comp && o->n_cpend <= ls->keep_c;
        else ok = ok && !o->n_comp && !o->n_cpend;
        if (R == 4) ok = ok && o->n_idx == n / 4 && o->lo_idx <= n && o->n_ipend == n - o->lo_idx && o->n_ipend <= ls->keep_i;
        else ok = ok && !o->n_idx && !o->n_ipend;
        if (!ok) return ds4_errf(err, errlen, "snapshot layer %d: row counts do not fit %u tokens", l, n);
        layer_state probe = *ls;
        probe.lo_raw = o->lo_raw; probe.lo_c = o->lo_comp; probe.lo_i = o->lo_idx;
        const char *miss = layer_missing(hp, &probe, n);
        if (miss) return ds4_errf(err, errlen, "snapshot layer %d lacks the %s needed to continue", l, miss);
    }
    for (int l = 0; l < st->n_layer; l++) {
        layer_state *ls = &st->L[l];
        const ds4_kv_layer_host *o = &in->layers[l];
        ls->lo_raw = o->lo_raw;
        ring_in(ls->raw, st->keep_raw, hp->head_dim, o->lo_raw, n, o->raw);
        ls->last_sel = ls->last_vis = 0;
        if (!ls->ratio) continue;
        ls->n_comp = o->n_comp;
        if (o->n_comp) memcpy(ls->comp, o->comp, (size_t)o->n_comp * hp->head_dim * sizeof(float));
        ls->lo_c = o->lo_comp;
        ring_in(ls->ckv, ls->keep_c, ls->W, o->lo_comp, n, o->ckv);
        ring_in(ls->cgate, ls->keep_c, ls->W, o->lo_comp, n, o->cgate);
        if (ls->ratio != 4) continue;
        ls->n_idx = o->n_idx;
        if (o->n_idx) memcpy(ls->idx, o->idx, (size_t)o->n_idx * hp->idx_head_dim * sizeof(float));
        ls->lo_i = o->lo_idx;
        ring_in(ls->ikv, ls->keep_i, ls->Wi, o->lo_idx, n, o->ikv);
        ring_in(ls->igate, ls->keep_i, ls->Wi, o->lo_idx, n, o->igate);
    }
    st->n = n;
    return 0;
}

/* ---- MTP (spec §6) --------------------------------------------------------------------- */

cpu_mtp *cpu_mtp_new(cpu_backend *be, char *err, size_t errlen) {
    if (!be->m->mtp_gguf) { ds4_errf(err, errlen, "no MTP block loaded"); return NULL; }
    cpu_mtp *m = calloc(1, sizeof *m);
    if (!m) { ds4_errf(err, errlen, "out of memory"); return NULL; }
    m->be = be;
    m->keep_raw = ds4_kv_keep_raw(be->hp);
    if (layer_state_init(&m->L, be->hp, 0, m->keep_raw, 1)) {
        cpu_mtp_free(m);
        ds4_errf(err, errlen, "out of memory");
        return NULL;
    }
    return m;
}

void cpu_mtp_free(cpu_mtp *m) {
    if (!m) return;
    layer_state_free(&m->L);
    free(m);
}

uint32_t cpu_mtp_len(const cpu_mtp *m) { return m->n; }

int cpu_mtp_draft(cpu_backend *be, cpu_mtp *mt, const float *hin, int32_t tok, float *logits, float *h_out,
                  char *err, size_t errlen) {
    const ds4_hparams *hp = be->hp;
    const ds4_model *m = be->m;
    const ds4_layer *L = &m->mtp;
    if (tok < 0 || (uint32_t)tok >= hp->n_vocab) return ds4_errf(err, errlen, "token id %d out of range", tok);
    if (mt->n == UINT32_MAX) return ds4_errf(err, errlen, "MTP window position overflow");
    scratch s;
    if (scratch_init(&s, be, 1, 0, 1)) return ds4_errf(err, errlen, "out of memory");
    pthread_mutex_lock(&be->mu);
    int64_t d = hp->n_embd, hc = hp->hc_count;
    /* Input fusion: u = e_proj·RMSNorm(emb; enorm) broadcast to every stream,
     * plus h_proj·RMSNorm(H_a; hnorm) per stream. */
    const ds4_tensor *te = &m->tok_embd;
    ds4_dequant_row(te->type, (const uint8_t *)te->data + (uint64_t)tok * te->row_bytes, s.h, d);
    cpu_rmsnorm(s.h, F(&L->enorm), d, hp->rms_eps, s.nrm);
    matmul(be, &L->e_proj, 0, s.nrm, d, 1, s.y, d);
    for (int64_t a = 0; a < hc; a++) cpu_rmsnorm(hin + a * d, F(&L->hnorm), d, hp->rms_eps, s.xe + a * d);
    matmul(be, &L->h_proj, 0, s.xe, d, hc, s.de, d);
    for (int64_t a = 0; a < hc; a++)
        for (int64_t k = 0; k < d; k++) s.X[a * d + k] = s.y[k] + s.de[a * d + k];
    attn_sublayer(be, &s, L, &mt->L, mt->keep_raw, mt->n, 1);
    ffn_sublayer(be, &s, L, hp->swiglu_clamp[hp->n_layer], &tok, 1);
    mt->n++;
    if (logits) head(be, &s, &L->hc_head_fn, &L->hc_head_scale, &L->hc_head_base, &L->norm, 0, 1, logits);
    if (h_out) memcpy(h_out, s.X, hc * d * sizeof(float));
    pthread_mutex_unlock(&be->mu);
    scratch_free(&s);
    return 0;
}

int cpu_mtp_truncate(cpu_mtp *m, uint32_t n, char *err, size_t errlen) {
    if (n > m->n) return ds4_errf(err, errlen, "cannot roll the MTP window %u forward to %u", m->n, n);
    if (n > 0 && layer_missing(m->be->hp, &m->L, n))
        return ds4_errf(err, errlen, "MTP rollback %u -> %u is not exact: window rows are gone", m->n, n);
    layer_truncate(&m->L, n);
    m->n = n;
    return 0;
}

/* ---- vtable --------------------------------------------------------------------------- */

static bool cpu_available(void) { return true; }
static void *v_create(const ds4_model *m, int n_threads, char *err, size_t errlen) { return cpu_backend_new(m, n_threads, err, errlen); }
static void v_destroy(void *be) { cpu_backend_free(be); }
static void *v_state_new(void *be, uint32_t ctx, char *err, size_t errlen) { return cpu_state_new(be, ctx, err, errlen); }
static void v_state_free(void *be, void *st) { cpu_state_free(st); }
static void v_state_bytes(void *be, const void *st, uint64_t *in_use, uint64_t *allocated) {
    cpu_state_bytes(st, in_use, allocated);
}
static int v_eval(void *be, void *st, const int32_t *ids, size_t n, float *logits, bool all, char *err, size_t errlen) {
    return cpu_eval(be, st, ids, n, logits, all, NULL, err, errlen);
}
/* The CPU's logits are in host memory anyway: eval_top keeps them in the
 * state so that sessions use one path on every backend. */
static int v_eval_top(void *be, void *st, const int32_t *ids, size_t n, int32_t *top, char *err, size_t errlen) {
    cpu_state *cs = st;
    uint32_t V = cs->be->hp->n_vocab;
    if (!cs->last && !(cs->last = malloc((size_t)V * sizeof(float)))) return ds4_errf(err, errlen, "out of memory for logits");
    if (cpu_eval(be, st, ids, n, cs->last, false, NULL, err, errlen)) return -1;
    *top = ds4_argmax(cs->last, V);
    return 0;
}
static int v_last_logits(void *be, const void *st, float *out, char *err, size_t errlen) {
    const cpu_state *cs = st;
    if (!cs->last) return ds4_errf(err, errlen, "no logits kept (no eval_top yet)");
    memcpy(out, cs->last, (size_t)cs->be->hp->n_vocab * sizeof(float));
    return 0;
}
static int v_truncate(void *be, void *st, uint32_t n, char *err, size_t errlen) { return cpu_truncate(be, st, n, err, errlen); }
static int v_export(void *be, const void *st, ds4_kv_host *out, char *err, size_t errlen) { return cpu_export(be, st, out, err, errlen); }
static int v_import(void *be, void *st, const ds4_kv_host *in, char *err, size_t errlen) { return cpu_import(be, st, in, err, errlen); }

/* Host memory sessions can take: MemAvailable, bounded by a cgroup v2
 * limit (containers), less the mapped weight files. MemAvailable counts
 * the weights' cached pages as reclaimable, and when they are not cached
 * yet they will be: either way they are not there for sessions. */
static int v_mem_free(void *be, uint64_t *bytes, char *err, size_t errlen) {
    const ds4_model *m = ((const cpu_backend *)be)->m;
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    unsigned long long kb = 0;
    bool found = false;
    while (f && !found && fgets(line, sizeof line, f)) found = sscanf(line, "MemAvailable: %llu kB", &kb) == 1;
    if (f) fclose(f);
    if (!found) return ds4_errf(err, errlen, "cannot read MemAvailable from /proc/meminfo");
    uint64_t avail = (uint64_t)kb << 10;
    unsigned long long max = 0, cur = 0;
    FILE *fm = fopen("/sys/fs/cgroup/memory.max", "r"), *fc = fopen("/sys/fs/cgroup/memory.current", "r");
    /* "max" (no limit) fails the scan. */
    if (fm && fc && fscanf(fm, "%llu", &max) == 1 && fscanf(fc, "%llu", &cur) == 1 && max > cur && max - cur < avail)
        avail = max - cur;
    if (fm) fclose(fm);
    if (fc) fclose(fc);
    uint64_t weights = gguf_file_size(m->gguf) + (m->mtp_gguf ? gguf_file_size(m->mtp_gguf) : 0);
    *bytes = avail > weights ? avail - weights : 0;
    return 0;
}

static uint32_t v_eval_step(void *be) { return CPU_CHUNK; }

const ds4_backend_ops ds4_backend_cpu = {
    "cpu", cpu_available, v_create, v_destroy, v_state_new, v_state_free, v_state_bytes, v_eval, v_truncate, v_export, v_import,
    v_mem_free, v_eval_step, NULL, NULL,   /* host memory: malloc / free */
    v_eval_top, v_last_logits,
};
