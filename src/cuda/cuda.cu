/* CUDA backend: weights resident on the GPU in their quantised form, the
 * session state (raw ring, compressed rows, compressor frontiers, indexer)
 * in device memory with the CPU backend's ring layout, one token per step.
 *
 * Structure (why it is shaped this way):
 *  - Weights: the mmap'd GGUF's tensor data is one contiguous span; it is
 *    uploaded once, in bounded chunks through two pinned staging buffers
 *    (double-buffered), and a tensor's device address is its offset in that
 *    span. No full host copy, no per-tensor allocations.
 *  - Decode: every op of spec §4 is one kernel (kernels.cuh) on one stream;
 *    the token id lives in device memory and the routed experts are chosen on
 *    the device (k_router → k_matvec with eid), so a step needs no host round
 *    trip until the logits. Prefill is a loop of steps (correct by
 *    construction; batching is the next step, see tools/gpu/NOTES.md).
 *  - State bookkeeping (lo_raw, n_comp, lo_c, …) stays on the host and mirrors
 *    src/cpu/forward.c exactly, so export/import/truncate share its rules and
 *    a snapshot moves between backends bit for bit. */
#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "cpu/cpu.h"
#include "quant/quant.h"
}
#include "cuda/cuda.h"
#include "cuda/kernels.cuh"
#include "util/errf.h"

#define STAGE_BYTES (64u << 20)   /* upload chunk: bounds pinned host memory to 2 × 64 MiB */
#define STEP_RING 256              /* step inputs in flight before the host waits */
#define VRAM_MARGIN (256ull << 20) /* left free for the CUDA context, cuBLAS-free but safe */

#define CK(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return ds4_errf(err, errlen, "cuda: %s: %s", #call, cudaGetErrorString(e_)); \
    } while (0)

/* ---- backend / state --------------------------------------------------------------- */

typedef struct {
    int ratio, lanes;
    uint32_t W, Wi;
    float *raw;                  /* keep_raw × head_dim */
    uint32_t lo_raw;
    float *comp;                 /* cap_comp × head_dim */
    uint32_t n_comp, cap_comp;
    float *ckv, *cgate;          /* keep_c × W */
    uint32_t keep_c, lo_c;
    float *idx;                  /* cap_comp × idx_head_dim */
    uint32_t n_idx;
    float *ikv, *igate;          /* keep_i × Wi */
    uint32_t keep_i, lo_i;
} gpu_layer;

typedef struct {
    uint32_t ctx, n, keep_raw;
    int n_layer;
    gpu_layer *L;
    float *att;                  /* n_head × att_len scores */
    int64_t att_len;
    float *isc;                  /* indexer scores, ctx/4 + 2 */
    cudaGraphExec_t body[2];     /* one token's layers: [select] = indexer picks top-k */
} gpu_state;

typedef struct {
    const ds4_model *m;
    const ds4_hparams *hp;
    const uint8_t *hbase;        /* host address of the weight span */
    uint8_t *dbase;              /* its device copy */
    uint64_t span;
    cudaStream_t s;
    double *freq_plain, *freq_yarn;   /* device, rope_dim/2 each */
    /* per-token scratch */
    float *X, *mix, *coef, *h, *nrm, *qa, *q, *o, *low, *y, *ck, *cg, *ik, *ig, *iq, *iw, *rl, *ew, *eout, *ge,
        *sg, *logits;
    int32_t *eid, *sel;
    dstep *step, *hstep;         /* device step inputs; pinned host ring of STEP_RING */
    bool graphs;                 /* capture decode as CUDA graphs (DS4_CUDA_GRAPHS=0: eager) */
    cudaGraphExec_t head_exec;
} gpu_backend;

/* Device address of a bound tensor (NULL when absent). */
static const uint8_t *DW(const gpu_backend *be, const ds4_tensor *t) {
    return t->data ? be->dbase + ((const uint8_t *)t->data - be->hbase) : NULL;
}
static const float *DF(const gpu_backend *be, const ds4_tensor *t) { return (const float *)DW(be, t); }

static uint64_t tensor_bytes(const ds4_tensor *t) {
    return t->row_bytes * (uint64_t)t->ne[1] * (uint64_t)(t->ne[2] > 0 ? t->ne[2] : 1);
}

static const ds4_tensor *spec_tensor(const ds4_model *m, const ds4_tensor_spec *s) {
    return s->layer < 0 ? (const ds4_tensor *)((const char *)m + s->field)
                        : (const ds4_tensor *)((const char *)&m->layers[s->layer] + s->field);
}

static bool cuda_available(void) {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
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

/* Scratch floats of one decode step (sizes as the CPU's scratch for n = 1). */
static uint64_t scratch_floats(const ds4_model *m, uint64_t *counts) {
    const ds4_hparams *hp = &m->hp;
    uint64_t d = hp->n_embd, hc = hp->hc_count, hd = hp->head_dim, H = hp->n_head, ff = hp->expert_ff;
    uint64_t used = hp->n_expert_used, ihd = hp->idx_head_dim, ih = hp->idx_n_head, cw = max_comp_width(hp);
    if (cw < hd) cw = hd;       /* ck also holds the token's K=V row */
    uint64_t ffs = (uint64_t)m->layers[0].gate_shexp.ne[1];
    uint64_t c[] = {hc * d, (2 + hc) * hc, (2 + hc) * hc, d, d, hp->q_lora, H * hd, H * hd,
                    (uint64_t)hp->o_groups * hp->o_lora, d, cw, cw, 2 * ihd, 2 * ihd, ih * ihd, ih, hp->n_expert,
                    used, used * d, used * ff, ffs, hp->n_vocab};
    uint64_t tot = 0;
    for (size_t i = 0; i < sizeof c / sizeof *c; i++) {
        uint64_t r = (c[i] + 63) / 64 * 64;   /* 256-byte aligned pieces: float4 loads stay aligned */
        if (counts) counts[i] = r;
        tot += r;
    }
    return tot;
}
#define N_SCRATCH 22

static void backend_free(gpu_backend *be) {
    if (!be) return;
    cudaFree(be->dbase);
    cudaFree(be->X);
    cudaFree(be->eid);
    cudaFree(be->freq_plain);
    cudaFree(be->step);
    if (be->hstep) cudaFreeHost(be->hstep);
    if (be->head_exec) cudaGraphExecDestroy(be->head_exec);
    if (be->s) cudaStreamDestroy(be->s);
    free(be);
}

/* Upload [hbase, hbase+span) through two pinned buffers: memcpy into one while
 * the other's async copy runs. */
static int upload_span(gpu_backend *be, char *err, size_t errlen) {
    uint8_t *stage[2] = {NULL, NULL};
    cudaEvent_t done[2] = {NULL, NULL};
    int rc = -1;
    for (int i = 0; i < 2; i++) {
        if (cudaMallocHost((void **)&stage[i], STAGE_BYTES) != cudaSuccess ||
            cudaEventCreateWithFlags(&done[i], cudaEventDisableTiming) != cudaSuccess) {
            ds4_errf(err, errlen, "cuda: cannot allocate %u MiB of pinned staging memory", STAGE_BYTES >> 20);
            goto out;
        }
    }
    for (uint64_t off = 0, k = 0; off < be->span; off += STAGE_BYTES, k++) {
        int b = (int)(k & 1);
        uint64_t len = be->span - off < STAGE_BYTES ? be->span - off : STAGE_BYTES;
        if (cudaEventSynchronize(done[b]) != cudaSuccess) { ds4_errf(err, errlen, "cuda: staging wait failed"); goto out; }
        memcpy(stage[b], be->hbase + off, len);   /* pages in the mmap'd file once */
        if (cudaMemcpyAsync(be->dbase + off, stage[b], len, cudaMemcpyHostToDevice, be->s) != cudaSuccess ||
            cudaEventRecord(done[b], be->s) != cudaSuccess) {
            ds4_errf(err, errlen, "cuda: weight upload failed at byte %llu", (unsigned long long)off);
            goto out;
        }
    }
    if (cudaStreamSynchronize(be->s) != cudaSuccess) { ds4_errf(err, errlen, "cuda: weight upload failed"); goto out; }
    rc = 0;
out:
    for (int i = 0; i < 2; i++) {
        if (stage[i]) cudaFreeHost(stage[i]);
        if (done[i]) cudaEventDestroy(done[i]);
    }
    return rc;
}

/* Formats read through k_mv_rp, repacked at upload: block bytes, header
 * offset and length (kernels.cuh, rp_fmt). */
static bool repacked(uint32_t type) { return type == GGML_Q8_0 || type == GGML_IQ2_XXS || type == GGML_Q2_K; }
static void rp_geom(uint32_t type, int *bb, int *ho, int *hl, int *eb) {
    if (type == GGML_Q8_0) { *bb = 34; *ho = 0; *hl = 2; *eb = 32; }
    else if (type == GGML_IQ2_XXS) { *bb = 66; *ho = 0; *hl = 2; *eb = 256; }
    else { *bb = 84; *ho = 80; *hl = 4; *eb = 256; }
}

/* Bytes of the largest repacked slab (one matrix, or one expert of a 3-D tensor). */
static uint64_t max_rp_slab(const ds4_model *m) {
    uint64_t mx = 0;
    for (int i = 0; i < m->n_layout; i++) {
        const ds4_tensor *t = spec_tensor(m, &m->layout[i]);
        uint64_t slab = t->row_bytes * (uint64_t)t->ne[1];
        if (t->data && repacked(t->type) && slab > mx) mx = slab;
    }
    return mx;
}

/* Rewrite every uploaded Q8_0 / IQ2_XXS / Q2_K slab into k_mv_rp's layout
 * (kernels.cuh) through one scratch slab on the device: payloads first,
 * headers after, the same bytes in the same place, so tensor offsets stay
 * as in the file. */
static int repack_weights(gpu_backend *be, char *err, size_t errlen) {
    const ds4_model *m = be->m;
    uint64_t mx = max_rp_slab(m);
    if (!mx) return 0;
    uint8_t *tmp = NULL;
    CK(cudaMalloc((void **)&tmp, mx));
    cudaError_t e = cudaSuccess;
    for (int i = 0; i < m->n_layout && !e; i++) {
        const ds4_tensor *t = spec_tensor(m, &m->layout[i]);
        if (!t->data || !repacked(t->type)) continue;
        int bb, ho, hl, eb;
        rp_geom(t->type, &bb, &ho, &hl, &eb);
        uint64_t slab = t->row_bytes * (uint64_t)t->ne[1];
        int64_t nblocks = t->ne[1] * (t->ne[0] / eb);
        for (int64_t x = 0; x < (t->ne[2] > 1 ? t->ne[2] : 1) && !e; x++) {
            uint8_t *d = (uint8_t *)DW(be, t) + x * slab;
            e = cudaMemcpyAsync(tmp, d, slab, cudaMemcpyDeviceToDevice, be->s);
            if (!e) {
                k_repack<<<(unsigned)((nblocks + 255) / 256), 256, 0, be->s>>>(tmp, d, nblocks, bb, ho, hl);
                e = cudaGetLastError();
            }
        }
    }
    if (!e) e = cudaStreamSynchronize(be->s);
    cudaFree(tmp);
    return e ? ds4_errf(err, errlen, "cuda: weight repack failed: %s", cudaGetErrorString(e)) : 0;
}

static void *cuda_create(const ds4_model *m, int n_threads, char *err, size_t errlen) {
    const ds4_hparams *hp = &m->hp;
    /* Shape facts the kernels rely on (all true of the real model and tiny). */
    const char *bad = NULL;
    if (hp->n_head_kv != 1) bad = "head_count_kv must be 1";
    else if (hp->head_dim > 1024 || hp->head_dim % 128 || hp->rope_dim % 2 || hp->rope_dim >= hp->head_dim ||
             (hp->head_dim - hp->rope_dim) % 64)
        bad = "head_dim must be a multiple of 128, ≤ 1024, with head_dim − rope_dim a multiple of 64";
    else if (hp->idx_head_dim > 1024 || hp->idx_head_dim % 32 || (hp->idx_head_dim & (hp->idx_head_dim - 1)) ||
             hp->idx_head_dim <= hp->rope_dim)
        bad = "indexer head dim must be a power of two ≤ 1024, multiple of 32, above rope_dim";
    else if (!hp->o_groups || hp->n_head % hp->o_groups) bad = "head_count must be a multiple of output groups";
    else if (hp->hc_count < 1 || hp->hc_count > MAX_HC) bad = "hyper_connection.count out of range";
    else if (!hp->n_expert_used || hp->n_expert_used > 64 || hp->n_expert_used > hp->n_expert)
        bad = "expert_used_count out of range";
    else if (!hp->window) bad = "sliding_window must be positive";
    if (bad) { ds4_errf(err, errlen, "cuda backend: %s", bad); return NULL; }
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        int r = hp->compress_ratio[l];
        const ds4_layer *L = &m->layers[l];
        if (r < 0 || (r == 4) != (L->idx_q_b.data != NULL) || (r != 0) != (L->comp_kv.data != NULL)) {
            ds4_errf(err, errlen, "cuda backend: layer %u: compress ratio %d does not match its tensors", l, r);
            return NULL;
        }
    }
    for (int i = 0; i < m->n_layout; i++) {
        const ds4_tensor *t = spec_tensor(m, &m->layout[i]);
        /* matrices only: 1-D tensors (norms, HC scale of 3) are read as plain f32 */
        /* deq_chunk's wide loads assume 16-byte aligned tensor data (GGUF
         * aligns to 32) and 8-element chunks. */
        if (t->data && t->type != GGML_I32 && t->ne[1] > 1 && (t->ne[0] % 8 || ((uintptr_t)t->data & 15))) {
            ds4_errf(err, errlen, "cuda backend: tensor %s: data must be 16-byte aligned, rows a multiple of 8", t->name);
            return NULL;
        }
        /* Each expert slab of a repacked 3-D tensor is read with 16-byte loads. */
        if (t->data && repacked(t->type) && t->ne[2] > 1 && (t->row_bytes * (uint64_t)t->ne[1]) % 16) {
            ds4_errf(err, errlen, "cuda backend: tensor %s: expert slabs must be a multiple of 16 bytes", t->name);
            return NULL;
        }
    }

    /* The span of tensor data (the main file's tensors; MTP is not run here). */
    const uint8_t *lo = NULL, *hi = NULL;
    for (int i = 0; i < m->n_layout; i++) {
        const ds4_tensor *t = spec_tensor(m, &m->layout[i]);
        if (!t->data) continue;
        const uint8_t *a = (const uint8_t *)t->data, *b = a + tensor_bytes(t);
        if (!lo || a < lo) lo = a;
        if (!hi || b > hi) hi = b;
    }
    if (!lo) { ds4_errf(err, errlen, "cuda backend: model has no tensors"); return NULL; }

    gpu_backend *be = (gpu_backend *)calloc(1, sizeof *be);
    if (!be) { ds4_errf(err, errlen, "cuda backend: out of memory"); return NULL; }
    be->m = m;
    be->hp = hp;
    be->hbase = lo;
    be->span = (uint64_t)(hi - lo);
    uint64_t counts[N_SCRATCH];
    uint64_t scr = scratch_floats(m, counts) * sizeof(float);
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(0) != cudaSuccess || cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
        ds4_errf(err, errlen, "cuda backend: cannot query the GPU");
        backend_free(be);
        return NULL;
    }
    /* Refuse before uploading anything, saying how much is missing (the
     * repack's scratch slab is freed before the first step, but must fit). */
    uint64_t need = be->span + scr + VRAM_MARGIN + max_rp_slab(m);
    if (need > free_b) {
        ds4_errf(err, errlen,
             "cuda backend: need %.1f GiB of GPU memory (weights %.1f GiB + scratch %.1f MiB + %llu MiB margin), "
             "%.1f GiB free of %.1f GiB: %.1f GiB missing",
             need / 1073741824.0, be->span / 1073741824.0, scr / 1048576.0, VRAM_MARGIN >> 20,
             free_b / 1073741824.0, total_b / 1073741824.0, (need - free_b) / 1073741824.0);
        backend_free(be);
        return NULL;
    }
    double fp[512], fy[512];
    int np = (int)hp->rope_dim / 2;
    if (np > 512) { ds4_errf(err, errlen, "cuda backend: rope_dim too large"); backend_free(be); return NULL; }
    cpu_rope_freqs(hp, false, fp, NULL, NULL);
    cpu_rope_freqs(hp, true, fy, NULL, NULL);
    if (cudaStreamCreateWithFlags(&be->s, cudaStreamNonBlocking) != cudaSuccess ||
        cudaMalloc((void **)&be->dbase, be->span) != cudaSuccess ||
        cudaMalloc((void **)&be->X, scr) != cudaSuccess ||
        cudaMalloc((void **)&be->eid, (size_t)(hp->n_expert_used + hp->idx_top_k) * sizeof(int32_t)) != cudaSuccess ||
        cudaMalloc((void **)&be->freq_plain, 2 * (size_t)np * sizeof(double)) != cudaSuccess ||
        cudaMemcpy(be->freq_plain, fp, np * sizeof(double), cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaMemcpy(be->freq_plain + np, fy, np * sizeof(double), cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaMemcpyToSymbol(d_iq2_grid, ds4_iq2xxs_grid, sizeof ds4_iq2xxs_grid) != cudaSuccess ||
        cudaMemcpyToSymbol(d_iq2_signs, ds4_ksigns_iq2xs, sizeof ds4_ksigns_iq2xs) != cudaSuccess) {
        ds4_errf(err, errlen, "cuda backend: device allocation failed: %s", cudaGetErrorString(cudaGetLastError()));
        backend_free(be);
        return NULL;
    }
    be->freq_yarn = be->freq_plain + np;
    float **dst[N_SCRATCH] = {&be->X, &be->mix, &be->coef, &be->h, &be->nrm, &be->qa, &be->q, &be->o, &be->low,
                              &be->y, &be->ck, &be->cg, &be->ik, &be->ig, &be->iq, &be->iw, &be->rl, &be->ew,
                              &be->eout, &be->ge, &be->sg, &be->logits};
    float *p = be->X;
    for (int i = 0; i < N_SCRATCH; i++) { *dst[i] = p; p += counts[i]; }
    be->sel = be->eid + hp->n_expert_used;
    if (cudaMalloc((void **)&be->step, sizeof(dstep)) != cudaSuccess ||
        cudaMallocHost((void **)&be->hstep, STEP_RING * sizeof(dstep)) != cudaSuccess) {
        ds4_errf(err, errlen, "cuda backend: cannot allocate the step buffers");
        backend_free(be);
        return NULL;
    }
    int qat = !cpu_diag_exact_kv();
    if (cudaMemcpyToSymbol(d_qat, &qat, sizeof qat) != cudaSuccess) {
        ds4_errf(err, errlen, "cuda backend: cannot set the QAT switch");
        backend_free(be);
        return NULL;
    }
    if (!qat) fprintf(stderr, "cuda backend: DIAGNOSTIC mode (exact KV)\n");
    const char *g = getenv("DS4_CUDA_GRAPHS");
    be->graphs = !(g && !strcmp(g, "0"));
    if (upload_span(be, err, errlen) || repack_weights(be, err, errlen)) { backend_free(be); return NULL; }
    return be;
}

static void cuda_destroy(void *b) { backend_free((gpu_backend *)b); }

/* ---- state ------------------------------------------------------------------------------ */

static void layer_free(gpu_layer *ls) {
    cudaFree(ls->raw); cudaFree(ls->comp); cudaFree(ls->ckv); cudaFree(ls->cgate);
    cudaFree(ls->idx); cudaFree(ls->ikv); cudaFree(ls->igate);
    memset(ls, 0, sizeof *ls);
}

static void state_free(gpu_state *st) {
    if (!st) return;
    for (int l = 0; st->L && l < st->n_layer; l++) layer_free(&st->L[l]);
    free(st->L);
    for (int i = 0; i < 2; i++)
        if (st->body[i]) cudaGraphExecDestroy(st->body[i]);
    cudaFree(st->att);
    cudaFree(st->isc);
    free(st);
}

static void cuda_state_free(void *be, void *st) { state_free((gpu_state *)st); }

/* Device bytes of one layer's state (same shapes as the CPU's layer_state). */
static uint64_t layer_bytes(const ds4_hparams *hp, int ratio, uint32_t keep_raw, uint32_t ctx) {
    uint64_t hd = hp->head_dim, ihd = hp->idx_head_dim, b = (uint64_t)keep_raw * hd;
    if (ratio) {
        uint64_t cap = ctx / (uint32_t)ratio + 2, W = ds4_comp_lanes(ratio) * hd;
        b += cap * hd + 2 * (uint64_t)ds4_kv_keep_comp(hp, ratio) * W;
        if (ratio == 4) b += cap * ihd + 2 * (uint64_t)ds4_kv_keep_comp(hp, 4) * 2 * ihd;
    }
    return b * sizeof(float);
}

static cudaError_t zalloc(float **p, uint64_t n) {
    cudaError_t e = cudaMalloc((void **)p, (n ? n : 1) * sizeof(float));
    return e == cudaSuccess ? cudaMemset(*p, 0, (n ? n : 1) * sizeof(float)) : e;
}

static void *cuda_state_new(void *b, uint32_t ctx, char *err, size_t errlen) {
    gpu_backend *be = (gpu_backend *)b;
    const ds4_hparams *hp = be->hp;
    if (ctx < 1 || ctx > hp->ctx_max) { ds4_errf(err, errlen, "context %u out of range 1…%u", ctx, hp->ctx_max); return NULL; }
    uint32_t keep_raw = ds4_kv_keep_raw(hp);
    uint64_t need = 0, maxvis = 0;
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        int r = hp->compress_ratio[l];
        need += layer_bytes(hp, r, keep_raw, ctx);
        uint64_t v = r == 4 ? hp->idx_top_k : r > 0 ? ctx / (uint32_t)r + 1 : 0;
        if (v > maxvis) maxvis = v;
    }
    int64_t att_len = hp->window + maxvis;
    need += ((uint64_t)hp->n_head * att_len + ctx / 4 + 2) * sizeof(float);
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) { ds4_errf(err, errlen, "cuda: cannot query the GPU"); return NULL; }
    if (need + VRAM_MARGIN > free_b) {
        ds4_errf(err, errlen, "cuda backend: a %u-token session needs %.1f MiB of GPU memory, %.1f MiB free (%.1f MiB missing)",
             ctx, need / 1048576.0, free_b / 1048576.0, (need + VRAM_MARGIN - free_b) / 1048576.0);
        return NULL;
    }
    gpu_state *st = (gpu_state *)calloc(1, sizeof *st);
    if (!st || !(st->L = (gpu_layer *)calloc(hp->n_layer, sizeof *st->L))) {
        free(st);
        ds4_errf(err, errlen, "out of memory for session state");
        return NULL;
    }
    st->ctx = ctx;
    st->keep_raw = keep_raw;
    st->n_layer = (int)hp->n_layer;
    st->att_len = att_len;
    bool ok = zalloc(&st->att, (uint64_t)hp->n_head * att_len) == cudaSuccess &&
              zalloc(&st->isc, ctx / 4 + 2) == cudaSuccess;
    for (int l = 0; ok && l < st->n_layer; l++) {
        gpu_layer *ls = &st->L[l];
        int r = hp->compress_ratio[l];
        ls->ratio = r;
        ls->lanes = (int)ds4_comp_lanes(r);
        ok = zalloc(&ls->raw, (uint64_t)keep_raw * hp->head_dim) == cudaSuccess;
        if (!ok || !r) continue;
        ls->W = (uint32_t)ls->lanes * hp->head_dim;
        ls->cap_comp = ctx / (uint32_t)r + 2;
        ls->keep_c = ds4_kv_keep_comp(hp, r);
        ok = zalloc(&ls->comp, (uint64_t)ls->cap_comp * hp->head_dim) == cudaSuccess &&
             zalloc(&ls->ckv, (uint64_t)ls->keep_c * ls->W) == cudaSuccess &&
             zalloc(&ls->cgate, (uint64_t)ls->keep_c * ls->W) == cudaSuccess;
        if (!ok || r != 4) continue;
        ls->Wi = 2 * hp->idx_head_dim;
        ls->keep_i = ds4_kv_keep_comp(hp, 4);
        ok = zalloc(&ls->idx, (uint64_t)ls->cap_comp * hp->idx_head_dim) == cudaSuccess &&
             zalloc(&ls->ikv, (uint64_t)ls->keep_i * ls->Wi) == cudaSuccess &&
             zalloc(&ls->igate, (uint64_t)ls->keep_i * ls->Wi) == cudaSuccess;
    }
    if (!ok) {
        state_free(st);
        ds4_errf(err, errlen, "cuda backend: out of GPU memory for a %u-token session", ctx);
        return NULL;
    }
    return st;
}

/* Logical state in use (the rule of engine/backend.h, as cpu_state_bytes)
 * and device memory allocated for it (rings, rows, attention and indexer
 * score scratch). */
static void cuda_state_bytes(void *b, const void *stp, uint64_t *in_use, uint64_t *allocated) {
    const gpu_backend *be = (const gpu_backend *)b;
    const gpu_state *st = (const gpu_state *)stp;
    const ds4_hparams *hp = be->hp;
    uint64_t u = 0, a = (uint64_t)hp->n_head * st->att_len + st->ctx / 4 + 2, hd = hp->head_dim, ihd = hp->idx_head_dim;
    for (int l = 0; l < st->n_layer; l++) {
        const gpu_layer *ls = &st->L[l];
        u += (uint64_t)(st->n - ls->lo_raw) * hd;
        a += (uint64_t)st->keep_raw * hd;
        if (!ls->ratio) continue;
        u += (uint64_t)ls->n_comp * hd + 2ull * (st->n - ls->lo_c) * ls->W;
        a += (uint64_t)ls->cap_comp * hd + 2ull * ls->keep_c * ls->W;
        if (ls->ratio != 4) continue;
        u += (uint64_t)ls->n_idx * ihd + 2ull * (st->n - ls->lo_i) * ls->Wi;
        a += (uint64_t)ls->cap_comp * ihd + 2ull * ls->keep_i * ls->Wi;
    }
    *in_use = u * sizeof(float);
    *allocated = a * sizeof(float);
}

/* Device memory sessions can still take: cudaMemGetInfo's free (the weights
 * are uploaded by now) less the margin cuda_state_new keeps. */
static int cuda_mem_free(void *b, uint64_t *bytes, char *err, size_t errlen) {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) return ds4_errf(err, errlen, "cuda: cannot query the GPU");
    *bytes = free_b > VRAM_MARGIN ? free_b - VRAM_MARGIN : 0;
    return 0;
}

/* ---- one decode step ------------------------------------------------------------------- */

/* Rows below this many take a block each (k_matvec_wide): with a warp per
 * row they would leave most of the GPU idle. */
#define WIDE_ROWS 1024
#define ATT_WARPS 8            /* warps per attention block (one block per head) */

/* Matvec on a repacked format, any shape: rows per warp 4 where the grid
 * still has ≥ 1024 warps, fewer below (a small matrix must still spread
 * over the GPU), 2 for GLU pairs (4 rows read per step). 64-weight pieces
 * (IQ2_XXS, Q2_K) hold 16 float4 of x per lane: Q2_K with 4 rows needs 160
 * registers (3 blocks an SM), with 2 rows 93 (5 blocks), so at most 2 there.
 * xg_rows must stay a multiple of the rows per warp (a warp's rows share one x). */
template <int F>
static void launch_rpf(cudaStream_t s, const uint8_t *W, const uint8_t *W2, int64_t n_in, int64_t rows, const float *x,
                       int64_t xg_rows, int64_t xg_stride, float *y, const int32_t *eid, uint64_t estride,
                       int64_t x_slot, int64_t y_slot, int slots, const float *ew, float clamp) {
    int nr = rows >= 4096 ? 4 : rows >= 2048 ? 2 : 1;
    int cap = W2 || F == RP_Q2K ? 2 : 4;
    if (nr > cap) nr = cap;
    while (xg_rows && xg_rows % nr) nr /= 2;
    dim3 grid((unsigned)((rows + nr * MV_WARPS - 1) / (nr * MV_WARPS)), (unsigned)slots);
#define MVRP(NR, GLU) k_mv_rp<F, NR, GLU><<<grid, 32 * MV_WARPS, 0, s>>>(W, W2, n_in, rows, x, xg_rows, xg_stride, y, \
                                                                     eid, estride, x_slot, y_slot, ew, clamp)
    if (W2) { if (nr == 2) MVRP(2, true); else MVRP(1, true); }
    else if (F != RP_Q2K && nr == 4) MVRP(4, false);
    else if (nr == 2) MVRP(2, false);
    else MVRP(1, false);
#undef MVRP
}
static void launch_rp(uint32_t type, cudaStream_t s, const uint8_t *W, const uint8_t *W2, int64_t n_in, int64_t rows,
                      const float *x, int64_t xg_rows, int64_t xg_stride, float *y, const int32_t *eid, uint64_t estride,
                      int64_t x_slot, int64_t y_slot, int slots, const float *ew, float clamp) {
    if (type == GGML_Q8_0)
        launch_rpf<RP_Q8>(s, W, W2, n_in, rows, x, xg_rows, xg_stride, y, eid, estride, x_slot, y_slot, slots, ew, clamp);
    else if (type == GGML_IQ2_XXS)
        launch_rpf<RP_IQ2>(s, W, W2, n_in, rows, x, xg_rows, xg_stride, y, eid, estride, x_slot, y_slot, slots, ew, clamp);
    else
        launch_rpf<RP_Q2K>(s, W, W2, n_in, rows, x, xg_rows, xg_stride, y, eid, estride, x_slot, y_slot, slots, ew, clamp);
}

/* y = T·x; x grouped as k_matvec (xg_rows = 0: one x). */
static void matvec_g(gpu_backend *be, const ds4_tensor *T, const float *x, int64_t xg_rows, int64_t xg_stride, float *y) {
    if (repacked(T->type)) {
        launch_rp(T->type, be->s, DW(be, T), NULL, T->ne[0], T->ne[1], x, xg_rows, xg_stride, y, NULL, 0, 0, 0, 1, NULL, 0);
        return;
    }
    if (!xg_rows && T->ne[1] < WIDE_ROWS && T->ne[0] >= 2048) {
        k_matvec_wide<<<(unsigned)T->ne[1], 256, 0, be->s>>>((int)T->type, DW(be, T), T->row_bytes, T->ne[0], x, y);
        return;
    }
    k_matvec<<<dim3((unsigned)((T->ne[1] + MV_WARPS - 1) / MV_WARPS), 1), 32 * MV_WARPS, 0, be->s>>>(
        (int)T->type, DW(be, T), T->row_bytes, T->ne[0], T->ne[1], x, xg_rows, xg_stride, y, NULL, 0, 0, 0);
}
static void matvec(gpu_backend *be, const ds4_tensor *T, const float *x, float *y) { matvec_g(be, T, x, 0, 0, y); }

/* Every routed slot at once: slot i multiplies expert eid[i]'s matrix. */
static void matvec_experts(gpu_backend *be, const ds4_tensor *T, const float *x, int64_t x_slot, float *y,
                           int64_t y_slot) {
    int used = (int)be->hp->n_expert_used;
    uint64_t estride = T->row_bytes * (uint64_t)T->ne[1];
    if (repacked(T->type)) {
        launch_rp(T->type, be->s, DW(be, T), NULL, T->ne[0], T->ne[1], x, 0, 0, y, be->eid, estride, x_slot, y_slot, used,
                  NULL, 0);
        return;
    }
    k_matvec<<<dim3((unsigned)((T->ne[1] + MV_WARPS - 1) / MV_WARPS), used), 32 * MV_WARPS, 0, be->s>>>(
        (int)T->type, DW(be, T), T->row_bytes, T->ne[0], T->ne[1], x, 0, 0, y, be->eid, estride, x_slot, y_slot);
}

/* y = swiglu(Tg·x, Tu·x) · (ew ? ew[slot] : 1) in one launch: routed slots
 * (routed = true: expert eid[slot] of 3-D tensors) or the shared expert. */
static void glu(gpu_backend *be, const ds4_tensor *Tg, const ds4_tensor *Tu, bool routed, const float *x, float *y,
                float clamp) {
    int slots = routed ? (int)be->hp->n_expert_used : 1;
    const int32_t *eid = routed ? be->eid : NULL;
    const float *ew = routed ? be->ew : NULL;
    uint64_t estride = Tg->row_bytes * (uint64_t)Tg->ne[1];
    int64_t rows = Tg->ne[1];
    if (repacked(Tg->type)) {   /* the loader gives gate and up the same type */
        launch_rp(Tg->type, be->s, DW(be, Tg), DW(be, Tu), Tg->ne[0], rows, x, 0, 0, y, eid, estride, 0, rows, slots, ew,
                  clamp);
        return;
    }
    k_matvec_glu<<<dim3((unsigned)((rows + MV_WARPS - 1) / MV_WARPS), slots), 32 * MV_WARPS, 0, be->s>>>(
        (int)Tg->type, DW(be, Tg), DW(be, Tu), Tg->row_bytes, Tg->ne[0], rows, x, y, eid, estride, rows, ew, clamp);
}

static unsigned nthreads(int64_t n) { return n >= 1024 ? 1024 : (unsigned)((n + 31) / 32 * 32); }

static void hc_pre(gpu_backend *be, const ds4_tensor *fn, const ds4_tensor *scale, const ds4_tensor *base, bool head) {
    const ds4_hparams *hp = be->hp;
    matvec(be, fn, be->X, be->mix);
    k_hc_pre<<<(unsigned)((hp->n_embd + 255) / 256), 256, 0, be->s>>>(be->X, hp->n_embd, (int)hp->hc_count, be->mix, (int)fn->ne[1], DF(be, scale),
                                   DF(be, base), (int)hp->hc_sinkhorn_iters, hp->hc_eps, hp->rms_eps, head,
                                   head ? NULL : be->coef, be->h);
}

static void hc_post(gpu_backend *be) {
    const ds4_hparams *hp = be->hp;
    k_hc_post<<<(unsigned)((hp->n_embd + 255) / 256), 256, 0, be->s>>>(be->X, hp->n_embd, (int)hp->hc_count, be->coef, be->y);
}

/* One compressor: project, store the position's inputs in the ring, emit a
 * row when the position completes a block (k_comp_emit decides on the device;
 * the host's counters follow in book_token). */
static void compress(gpu_backend *be, const ds4_tensor *tkv, const ds4_tensor *tgate, const ds4_tensor *ape,
                     const ds4_tensor *norm, int R, int lanes, int D, float *pk, float *pg, float *rkv, float *rg,
                     uint32_t keep, float *rows, const double *freq, bool indexer) {
    const ds4_hparams *hp = be->hp;
    int W = lanes * D;
    matvec(be, tkv, be->nrm, pk);
    matvec(be, tgate, be->nrm, pg);
    k_comp_store<<<(unsigned)((W / 8 + 127) / 128), 128, 0, be->s>>>(pk, pg, (int)ape->type, DW(be, ape), ape->row_bytes,
                                                                   W, R, be->step, rkv, rg, keep);
    k_comp_emit<<<1, nthreads(D), D * sizeof(float), be->s>>>(rkv, rg, keep, R, lanes, D, be->step, DF(be, norm), freq,
                                                               (int)hp->rope_dim, hp->rms_eps, indexer, rows);
}

/* Attention sublayer of the token at be->step. `select`: the indexer picks
 * top-k rows ((pos+1)/4 > top_k; the same for every ratio-4 layer, so it is
 * a property of the step's graph variant, not of a layer). */
static void attn_layer(gpu_backend *be, gpu_state *st, const ds4_layer *L, gpu_layer *ls, bool select) {
    const ds4_hparams *hp = be->hp;
    int64_t d = hp->n_embd, H = hp->n_head, hd = hp->head_dim, rd = hp->rope_dim, ql = hp->q_lora;
    const double *freq = ls->ratio ? be->freq_yarn : be->freq_plain;
    float eps = hp->rms_eps;
    cudaStream_t s = be->s;

    hc_pre(be, &L->hc_attn_fn, &L->hc_attn_scale, &L->hc_attn_base, false);
    k_rmsnorm<<<1, 1024, 0, s>>>(be->h, DF(be, &L->attn_norm), (int)d, eps, be->nrm, 0);
    matvec(be, &L->attn_q_a, be->nrm, be->qa);
    k_rmsnorm<<<1, 1024, 0, s>>>(be->qa, DF(be, &L->attn_q_a_norm), (int)ql, eps, be->qa, 0);
    matvec(be, &L->attn_q_b, be->qa, be->q);
    k_q_heads<<<(unsigned)H, nthreads(hd), hd * sizeof(float), s>>>(be->q, (int)hd, (int)rd, freq, be->step, eps);
    /* K=V row straight into its ring slot: the slot held position pos − keep_raw,
     * outside every window, so attention below reads the new row from the ring. */
    matvec(be, &L->attn_kv, be->nrm, be->ck);
    k_kv_row<<<1, nthreads(hd), hd * sizeof(float), s>>>(be->ck, DF(be, &L->attn_kv_a_norm), (int)hd, (int)rd, freq,
                                                        be->step, eps, ls->raw, st->keep_raw);
    if (ls->ratio)
        compress(be, &L->comp_kv, &L->comp_gate, &L->comp_ape, &L->comp_norm, ls->ratio, ls->lanes, (int)hd, be->ck,
                 be->cg, ls->ckv, ls->cgate, ls->keep_c, ls->comp, freq, false);
    if (ls->ratio == 4) {
        int64_t ih = hp->idx_n_head, ihd = hp->idx_head_dim, topk = hp->idx_top_k;
        compress(be, &L->idx_comp_kv, &L->idx_comp_gate, &L->idx_comp_ape, &L->idx_comp_norm, 4, 2, (int)ihd, be->ik,
                 be->ig, ls->ikv, ls->igate, ls->keep_i, ls->idx, freq, true);
        if (select) {
            matvec(be, &L->idx_q_b, be->qa, be->iq);
            matvec(be, &L->idx_proj, be->nrm, be->iw);
            float wscale = (float)(1.0 / sqrt((double)ihd * (double)ih));
            k_idx_heads<<<(unsigned)ih, nthreads(ihd), ihd * sizeof(float), s>>>(be->iq, be->iw, (int)ihd, (int)rd,
                                                                                  freq, be->step, wscale);
            k_idx_scores<<<264, 256, 0, s>>>(be->iq, be->iw, ls->idx, be->step, (int)ih, (int)ihd, st->isc);
            k_topk<<<1, 1024, 0, s>>>(st->isc, be->step, 0, topk, be->sel);
        }
    }
    k_attend<<<(unsigned)H, 32 * ATT_WARPS, (1 + ATT_WARPS) * hd * sizeof(float), s>>>(be->q, be->o, ls->raw, st->keep_raw, be->step, hp->window,
                                                             ls->comp, be->sel, ls->ratio, (int64_t)hp->idx_top_k,
                                                             DF(be, &L->attn_sinks), (int)hd, (int)rd, freq,
                                                             (float)(1.0 / sqrt((double)hd)), st->att, st->att_len);

    /* Grouped low-rank output: group g's rows read heads g·H/G … concatenated. */
    int64_t G = hp->o_groups, gl = hp->o_lora;
    matvec_g(be, &L->attn_output_a, be->o, gl, (H / G) * hd, be->low);
    matvec(be, &L->attn_output_b, be->low, be->y);
    hc_post(be);
}

static void ffn_layer(gpu_backend *be, const ds4_layer *L, float clamp) {
    const ds4_hparams *hp = be->hp;
    int64_t d = hp->n_embd, E = hp->n_expert, used = hp->n_expert_used, ff = hp->expert_ff;
    cudaStream_t s = be->s;
    hc_pre(be, &L->hc_ffn_fn, &L->hc_ffn_scale, &L->hc_ffn_base, false);
    k_rmsnorm<<<1, 1024, 0, s>>>(be->h, DF(be, &L->ffn_norm), (int)d, hp->rms_eps, be->nrm, 0);
    matvec(be, &L->ffn_gate_inp, be->nrm, be->rl);
    k_router<<<1, 256, E * (sizeof(float) + 1), s>>>(be->rl, (int)E, (int)used, DW(be, &L->tid2eid), L->tid2eid.row_bytes,
                                               &be->step->tok, L->exp_probs_b.data ? DF(be, &L->exp_probs_b) : NULL,
                                               hp->expert_weights_norm, hp->expert_weights_scale, be->eid, be->ew);
    glu(be, &L->gate_exps, &L->up_exps, true, be->nrm, be->ge, clamp);
    matvec_experts(be, &L->down_exps, be->ge, ff, be->eout, d);
    glu(be, &L->gate_shexp, &L->up_shexp, false, be->nrm, be->sg, clamp);
    matvec(be, &L->down_shexp, be->sg, be->y);
    k_moe_sum<<<(unsigned)((d + 255) / 256), 256, 0, s>>>(be->eout, (int)used, d, be->y);
    hc_post(be);
}

static void head(gpu_backend *be) {
    const ds4_model *m = be->m;
    const ds4_hparams *hp = be->hp;
    hc_pre(be, &m->out_hc_fn, &m->out_hc_scale, &m->out_hc_base, true);
    k_rmsnorm<<<1, 1024, 0, be->s>>>(be->h, DF(be, &m->out_norm), (int)hp->n_embd, hp->rms_eps, be->nrm, 0);
    matvec(be, &m->output, be->nrm, be->logits);
}

/* Host counters after the token at pos (what the kernels just did). */
static void book_token(gpu_state *st, uint32_t pos) {
    uint32_t end = pos + 1;
    for (int l = 0; l < st->n_layer; l++) {
        gpu_layer *ls = &st->L[l];
        if (end > st->keep_raw && end - st->keep_raw > ls->lo_raw) ls->lo_raw = end - st->keep_raw;
        if (!ls->ratio) continue;
        if (end % (uint32_t)ls->ratio == 0) ls->n_comp = end / (uint32_t)ls->ratio;
        if (end > ls->keep_c && end - ls->keep_c > ls->lo_c) ls->lo_c = end - ls->keep_c;
        if (ls->ratio != 4) continue;
        if (end % 4 == 0) ls->n_idx = end / 4;
        if (end > ls->keep_i && end - ls->keep_i > ls->lo_i) ls->lo_i = end - ls->keep_i;
    }
}

/* Every kernel of one token's layers (embedding → last FFN). */
static void launch_body(gpu_backend *be, gpu_state *st, bool select) {
    const ds4_hparams *hp = be->hp;
    const ds4_tensor *te = &be->m->tok_embd;
    k_embed<<<(unsigned)((hp->n_embd / 8 + 127) / 128), 128, 0, be->s>>>((int)te->type, DW(be, te), te->row_bytes,
                                                                        &be->step->tok, hp->n_embd, be->X,
                                                                        (int)hp->hc_count);
    for (int l = 0; l < st->n_layer; l++) {
        attn_layer(be, st, &be->m->layers[l], &st->L[l], select);
        ffn_layer(be, &be->m->layers[l], hp->swiglu_clamp[l]);
    }
}

/* Capture (once) and launch a graph; eager launches when graphs are off. */
static cudaError_t run_graph(gpu_backend *be, cudaGraphExec_t *exec, gpu_state *st, int what) {
    if (!be->graphs) {
        if (what == 2) head(be); else launch_body(be, st, what == 1);
        return cudaGetLastError();
    }
    if (!*exec) {
        cudaGraph_t g;
        cudaError_t e = cudaStreamBeginCapture(be->s, cudaStreamCaptureModeThreadLocal);
        if (e) return e;
        if (what == 2) head(be); else launch_body(be, st, what == 1);
        e = cudaStreamEndCapture(be->s, &g);
        if (e) return e;
        e = cudaGraphInstantiate(exec, g, 0);
        cudaGraphDestroy(g);
        if (e) { *exec = NULL; return e; }
    }
    return cudaGraphLaunch(*exec, be->s);
}

static int cuda_eval(void *b, void *stp, const int32_t *ids, size_t n, float *logits, bool all_logits, char *err,
                     size_t errlen) {
    gpu_backend *be = (gpu_backend *)b;
    gpu_state *st = (gpu_state *)stp;
    const ds4_hparams *hp = be->hp;
    if (n == 0) return 0;
    if (n > st->ctx - st->n) return ds4_errf(err, errlen, "context full: %u + %zu tokens > %u", st->n, n, st->ctx);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= hp->n_vocab)
            return ds4_errf(err, errlen, "token id %d out of range (vocab %u)", ids[i], hp->n_vocab);
    for (size_t t = 0; t < n; t++) {
        uint32_t pos = st->n;
        /* Step inputs go through a pinned ring; a full lap waits for the
         * stream so a slot is never rewritten before its copy ran. */
        size_t k = t % STEP_RING;
        if (k == 0 && t) CK(cudaStreamSynchronize(be->s));
        be->hstep[k].pos = pos;
        be->hstep[k].tok = ids[t];
        CK(cudaMemcpyAsync(be->step, &be->hstep[k], sizeof(dstep), cudaMemcpyHostToDevice, be->s));
        bool select = (pos + 1) / 4 > hp->idx_top_k;
        CK(run_graph(be, &st->body[select], st, select));
        book_token(st, pos);
        st->n++;
        if (logits && (all_logits || t + 1 == n)) {
            CK(run_graph(be, &be->head_exec, NULL, 2));
            CK(cudaMemcpyAsync(logits + (all_logits ? t * hp->n_vocab : 0), be->logits, hp->n_vocab * sizeof(float),
                               cudaMemcpyDeviceToHost, be->s));
        }
    }
    CK(cudaStreamSynchronize(be->s));
    CK(cudaGetLastError());
    return 0;
}

/* ---- truncate / export / import (rules of src/engine/backend.h) -------------------------- */

static const char *layer_missing(const ds4_hparams *hp, const gpu_layer *ls, uint32_t n) {
    return ds4_kv_missing(hp, ls->ratio, ls->lanes, ls->lo_raw, ls->lo_c, ls->lo_i, n);
}

static void layer_truncate(gpu_layer *ls, uint32_t n) {
    ds4_kv_truncate_counts(ls->ratio, n, &ls->lo_raw, &ls->lo_c, &ls->lo_i, &ls->n_comp, &ls->n_idx);
}

static int cuda_truncate(void *b, void *stp, uint32_t n, char *err, size_t errlen) {
    gpu_backend *be = (gpu_backend *)b;
    gpu_state *st = (gpu_state *)stp;
    if (n > st->n) return ds4_errf(err, errlen, "cannot truncate %u tokens to %u", st->n, n);
    if (n == st->n) return 0;
    if (n > 0)
        for (int l = 0; l < st->n_layer; l++) {
            const char *miss = layer_missing(be->hp, &st->L[l], n);
            if (miss)
                return ds4_errf(err, errlen,
                            "truncate %u -> %u is not exact: layer %d no longer holds the %s (exact rewinds are up to %u tokens)",
                            st->n, n, l, miss, ds4_kv_slack(be->hp) + 1);
        }
    for (int l = 0; l < st->n_layer; l++) layer_truncate(&st->L[l], n);
    st->n = n;
    return 0;
}

/* Positions lo … n−1 of a device ring (keep slots of w floats) to host, oldest first. */
static float *ring_out(const float *dring, uint32_t keep, size_t w, uint32_t lo, uint32_t n) {
    float *o = (float *)malloc(((size_t)(n - lo) * w + 1) * sizeof(float));
    if (!o) return NULL;
    for (uint32_t p = lo; p < n; p++)
        if (cudaMemcpy(o + (size_t)(p - lo) * w, dring + (size_t)(p % keep) * w, w * sizeof(float),
                       cudaMemcpyDeviceToHost) != cudaSuccess) { free(o); return NULL; }
    return o;
}

static float *rows_out(const float *d, size_t cnt) {
    float *o = (float *)malloc((cnt + 1) * sizeof(float));
    if (o && cnt && cudaMemcpy(o, d, cnt * sizeof(float), cudaMemcpyDeviceToHost) != cudaSuccess) { free(o); return NULL; }
    return o;
}

static int cuda_export(void *b, const void *stp, ds4_kv_host *out, char *err, size_t errlen) {
    gpu_backend *be = (gpu_backend *)b;
    const gpu_state *st = (const gpu_state *)stp;
    const ds4_hparams *hp = be->hp;
    memset(out, 0, sizeof *out);
    out->n_tokens = st->n;
    out->n_layer = (uint32_t)st->n_layer;
    if (!(out->layers = (ds4_kv_layer_host *)calloc((size_t)st->n_layer, sizeof *out->layers))) goto oom;
    for (int l = 0; l < st->n_layer; l++) {
        const gpu_layer *ls = &st->L[l];
        ds4_kv_layer_host *o = &out->layers[l];
        o->lo_raw = ls->lo_raw; o->n_raw = st->n - ls->lo_raw;
        if (!(o->raw = ring_out(ls->raw, st->keep_raw, hp->head_dim, ls->lo_raw, st->n))) goto oom;
        if (!ls->ratio) continue;
        o->n_comp = ls->n_comp;
        if (!(o->comp = rows_out(ls->comp, (size_t)ls->n_comp * hp->head_dim))) goto oom;
        o->lo_comp = ls->lo_c; o->n_cpend = st->n - ls->lo_c;
        if (!(o->ckv = ring_out(ls->ckv, ls->keep_c, ls->W, ls->lo_c, st->n)) ||
            !(o->cgate = ring_out(ls->cgate, ls->keep_c, ls->W, ls->lo_c, st->n))) goto oom;
        if (ls->ratio != 4) continue;
        o->n_idx = ls->n_idx;
        if (!(o->idx = rows_out(ls->idx, (size_t)ls->n_idx * hp->idx_head_dim))) goto oom;
        o->lo_idx = ls->lo_i; o->n_ipend = st->n - ls->lo_i;
        if (!(o->ikv = ring_out(ls->ikv, ls->keep_i, ls->Wi, ls->lo_i, st->n)) ||
            !(o->igate = ring_out(ls->igate, ls->keep_i, ls->Wi, ls->lo_i, st->n))) goto oom;
    }
    return 0;
oom:
    ds4_kv_host_free(out);
    return ds4_errf(err, errlen, "cuda backend: out of memory (or a copy failed) exporting the session state");
}

static cudaError_t ring_in(float *dring, uint32_t keep, size_t w, uint32_t lo, uint32_t n, const float *src) {
    for (uint32_t p = lo; p < n; p++) {
        cudaError_t e = cudaMemcpy(dring + (size_t)(p % keep) * w, src + (size_t)(p - lo) * w, w * sizeof(float),
                                   cudaMemcpyHostToDevice);
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}

static int cuda_import(void *b, void *stp, const ds4_kv_host *in, char *err, size_t errlen) {
    gpu_backend *be = (gpu_backend *)b;
    gpu_state *st = (gpu_state *)stp;
    const ds4_hparams *hp = be->hp;
    uint32_t n = in->n_tokens;
    if (in->n_layer != (uint32_t)st->n_layer) return ds4_errf(err, errlen, "snapshot has %u layers, model %d", in->n_layer, st->n_layer);
    if (n > st->ctx) return ds4_errf(err, errlen, "snapshot holds %u tokens, session context is %u", n, st->ctx);
    for (int l = 0; l < st->n_layer; l++) {
        const gpu_layer *ls = &st->L[l];
        const ds4_kv_layer_host *o = &in->layers[l];
        uint32_t R = (uint32_t)ls->ratio;
        bool ok = o->lo_raw <= n && o->n_raw == n - o->lo_raw && o->n_raw <= st->keep_raw;
        if (R) ok = ok && o->n_comp == n / R && o->lo_comp <= n && o->n_cpend == n - o->lo_comp && o->n_cpend <= ls->keep_c;
        else ok = ok && !o->n_comp && !o->n_cpend;
        if (R == 4) ok = ok && o->n_idx == n / 4 && o->lo_idx <= n && o->n_ipend == n - o->lo_idx && o->n_ipend <= ls->keep_i;
        else ok = ok && !o->n_idx && !o->n_ipend;
        if (!ok) return ds4_errf(err, errlen, "snapshot layer %d: row counts do not fit %u tokens", l, n);
        gpu_layer probe = *ls;
        probe.lo_raw = o->lo_raw; probe.lo_c = o->lo_comp; probe.lo_i = o->lo_idx;
        const char *miss = layer_missing(hp, &probe, n);
        if (miss) return ds4_errf(err, errlen, "snapshot layer %d lacks the %s needed to continue", l, miss);
    }
    for (int l = 0; l < st->n_layer; l++) {
        gpu_layer *ls = &st->L[l];
        const ds4_kv_layer_host *o = &in->layers[l];
        ls->lo_raw = o->lo_raw;
        CK(ring_in(ls->raw, st->keep_raw, hp->head_dim, o->lo_raw, n, o->raw));
        if (!ls->ratio) continue;
        ls->n_comp = o->n_comp;
        if (o->n_comp) CK(cudaMemcpy(ls->comp, o->comp, (size_t)o->n_comp * hp->head_dim * sizeof(float), cudaMemcpyHostToDevice));
        ls->lo_c = o->lo_comp;
        CK(ring_in(ls->ckv, ls->keep_c, ls->W, o->lo_comp, n, o->ckv));
        CK(ring_in(ls->cgate, ls->keep_c, ls->W, o->lo_comp, n, o->cgate));
        if (ls->ratio != 4) continue;
        ls->n_idx = o->n_idx;
        if (o->n_idx) CK(cudaMemcpy(ls->idx, o->idx, (size_t)o->n_idx * hp->idx_head_dim * sizeof(float), cudaMemcpyHostToDevice));
        ls->lo_i = o->lo_idx;
        CK(ring_in(ls->ikv, ls->keep_i, ls->Wi, o->lo_idx, n, o->ikv));
        CK(ring_in(ls->igate, ls->keep_i, ls->Wi, o->lo_idx, n, o->igate));
    }
    st->n = n;
    return 0;
}

extern "C" const ds4_backend_ops ds4_backend_cuda = {
    "cuda", cuda_available, cuda_create, cuda_destroy, cuda_state_new, cuda_state_free, cuda_state_bytes, cuda_eval,
    cuda_truncate,
    cuda_export, cuda_import,
    cuda_mem_free,
};

/* ---- kernel checks for tools/ds4-gpucheck ------------------------------------------------- */

static void poison(void *d, size_t bytes) { cudaMemset(d, 0xff, bytes); }   /* 0xffffffff is a NaN */

static bool tables_loaded;

extern "C" int ds4_cuda_test_matvec(int type, const void *w, int64_t n_in, int64_t n_rows, const float *x, float *y,
                                    char *err, size_t errlen) {
    uint64_t rb = ggml_row_bytes((uint32_t)type, (uint64_t)n_in);
    if (!rb || n_in % 8) return ds4_errf(err, errlen, "matvec: bad type %d / row %lld", type, (long long)n_in);
    if (!tables_loaded) {
        CK(cudaMemcpyToSymbol(d_iq2_grid, ds4_iq2xxs_grid, sizeof ds4_iq2xxs_grid));
        CK(cudaMemcpyToSymbol(d_iq2_signs, ds4_ksigns_iq2xs, sizeof ds4_ksigns_iq2xs));
        tables_loaded = true;
    }
    uint8_t *dw = NULL;
    float *dx = NULL, *dy = NULL;
    int rc = -1;
    cudaError_t e;
    if ((e = cudaMalloc((void **)&dw, rb * n_rows)) || (e = cudaMalloc((void **)&dx, n_in * sizeof(float))) ||
        (e = cudaMalloc((void **)&dy, n_rows * sizeof(float))) ||
        (e = cudaMemcpy(dw, w, rb * n_rows, cudaMemcpyHostToDevice)) ||
        (e = cudaMemcpy(dx, x, n_in * sizeof(float), cudaMemcpyHostToDevice))) goto out;
    poison(dy, n_rows * sizeof(float));
    if (repacked((uint32_t)type)) {   /* repacked first, as at upload */
        int bb, ho, hl, eb;
        rp_geom((uint32_t)type, &bb, &ho, &hl, &eb);
        int64_t nblocks = n_rows * (n_in / eb);
        uint8_t *tmp = NULL;
        if ((e = cudaMalloc((void **)&tmp, rb * n_rows)) ||
            (e = cudaMemcpy(tmp, dw, rb * n_rows, cudaMemcpyDeviceToDevice))) { cudaFree(tmp); goto out; }
        k_repack<<<(unsigned)((nblocks + 255) / 256), 256>>>(tmp, dw, nblocks, bb, ho, hl);
        e = cudaDeviceSynchronize();
        cudaFree(tmp);
        if (e) goto out;
        launch_rp((uint32_t)type, 0, dw, NULL, n_in, n_rows, dx, 0, 0, dy, NULL, 0, 0, 0, 1, NULL, 0);
    } else if (n_rows < WIDE_ROWS && n_in >= 2048)   /* the same choice as matvec() */
        k_matvec_wide<<<(unsigned)n_rows, 256>>>(type, dw, rb, n_in, dx, dy);
    else
        k_matvec<<<dim3((unsigned)((n_rows + MV_WARPS - 1) / MV_WARPS), 1), 32 * MV_WARPS>>>(type, dw, rb, n_in, n_rows,
                                                                                          dx, 0, 0, dy, NULL, 0, 0, 0);
    if ((e = cudaGetLastError()) || (e = cudaMemcpy(y, dy, n_rows * sizeof(float), cudaMemcpyDeviceToHost))) goto out;
    rc = 0;
out:
    if (rc) ds4_errf(err, errlen, "matvec: %s", cudaGetErrorString(e));
    cudaFree(dw); cudaFree(dx); cudaFree(dy);
    return rc;
}

extern "C" int ds4_cuda_test_qat(float *x, int n, bool fp4, char *err, size_t errlen) {
    if (n < 64 || n > 1024 || n % 64 || (fp4 && (n & (n - 1)))) return ds4_errf(err, errlen, "qat: bad n %d", n);
    float *d = NULL;
    CK(cudaMalloc((void **)&d, n * sizeof(float)));
    cudaError_t e = cudaMemcpy(d, x, n * sizeof(float), cudaMemcpyHostToDevice);
    if (!e) { k_test_qat<<<1, nthreads(n), n * sizeof(float)>>>(d, n, fp4); e = cudaGetLastError(); }
    if (!e) e = cudaMemcpy(x, d, n * sizeof(float), cudaMemcpyDeviceToHost);
    cudaFree(d);
    return e ? ds4_errf(err, errlen, "qat: %s", cudaGetErrorString(e)) : 0;
}

extern "C" int ds4_cuda_test_topk(const float *score, int64_t n, int64_t k, int32_t *out, char *err, size_t errlen) {
    if (k < 1 || k > n) return ds4_errf(err, errlen, "topk: bad k %lld of %lld", (long long)k, (long long)n);
    float *ds = NULL;
    int32_t *dout = NULL;
    cudaError_t e;
    if (!(e = cudaMalloc((void **)&ds, n * sizeof(float))) && !(e = cudaMalloc((void **)&dout, k * sizeof(int32_t))) &&
        !(e = cudaMemcpy(ds, score, n * sizeof(float), cudaMemcpyHostToDevice))) {
        cudaMemset(dout, 0xff, k * sizeof(int32_t));   /* −1: an unwritten slot is visible */
        k_topk<<<1, 1024>>>(ds, NULL, n, k, dout);
        if (!(e = cudaGetLastError())) e = cudaMemcpy(out, dout, k * sizeof(int32_t), cudaMemcpyDeviceToHost);
    }
    cudaFree(ds); cudaFree(dout);
    return e ? ds4_errf(err, errlen, "topk: %s", cudaGetErrorString(e)) : 0;
}

extern "C" int ds4_cuda_test_hc_coeffs(const float *mix, const float *scale, const float *base, int hc, int iters,
                                       float eps, float *pre, float *post, float *comb, char *err, size_t errlen) {
    if (hc < 1 || hc > MAX_HC) return ds4_errf(err, errlen, "hc: bad count %d", hc);
    int mw = (2 + hc) * hc;
    float *d = NULL;
    CK(cudaMalloc((void **)&d, (3 * mw + 3) * sizeof(float)));
    float *dm = d, *ds = d + mw, *db = d + mw + 3, *dout = d + 2 * mw + 3;
    cudaError_t e;
    if (!(e = cudaMemcpy(dm, mix, mw * sizeof(float), cudaMemcpyHostToDevice)) &&
        !(e = cudaMemcpy(ds, scale, 3 * sizeof(float), cudaMemcpyHostToDevice)) &&
        !(e = cudaMemcpy(db, base, mw * sizeof(float), cudaMemcpyHostToDevice))) {
        poison(dout, mw * sizeof(float));
        k_test_hc<<<1, 32>>>(dm, ds, db, hc, iters, eps, dout);   /* the path k_hc_pre takes */
        float h[(2 + MAX_HC) * MAX_HC];
        if (!(e = cudaGetLastError()) && !(e = cudaMemcpy(h, dout, mw * sizeof(float), cudaMemcpyDeviceToHost))) {
            memcpy(pre, h, hc * sizeof(float));
            memcpy(post, h + hc, hc * sizeof(float));
            memcpy(comb, h + 2 * hc, hc * hc * sizeof(float));
        }
    }
    cudaFree(d);
    return e ? ds4_errf(err, errlen, "hc: %s", cudaGetErrorString(e)) : 0;
}
