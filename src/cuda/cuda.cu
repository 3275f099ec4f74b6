/* CUDA backend: weights resident on the GPU in their quantised form, the
 * session state (raw ring, compressed rows, compressor frontiers, indexer)
 * in device memory with the CPU backend's ring layout.
 *
 * Structure (why it is shaped this way):
 *  - Weights: the mmap'd GGUF's tensor data is one contiguous span; it is
 *    uploaded once, in bounded chunks through two pinned staging buffers
 *    (double-buffered), and a tensor's device address is its offset in that
 *    span. No full host copy, no per-tensor allocations.
 *  - One forward pass over a chunk of n tokens, layer by layer, as the CPU
 *    reference's cpu_eval: every op of spec §4 is a kernel (kernels.cuh
 *    and the files it names) that takes the chunk's tokens along a grid
 *    dimension, on one stream.
 *  - Decode is the chunk of one token: matrix products are bandwidth-bound
 *    f32 matvecs on the quantised weights, the token id and position live in
 *    device memory and the routed experts are chosen on the device, so one
 *    captured CUDA graph replays every step with no host round trip until
 *    the logits.
 *  - Prefill takes chunks of up to `chunk` tokens: matrix products run on
 *    the tensor cores (mm.cuh: f16 copies of the activations, weights
 *    dequantised tile by tile, f32 accumulation), routed experts as one
 *    product per expert over the tokens that chose it. Launched eagerly:
 *    a chunk is long enough that launch gaps do not matter.
 *  - State bookkeeping (lo_raw, n_comp, lo_c, …) stays on the host and mirrors
 *    src/cpu/forward.c exactly, so export/import/truncate share its rules and
 *    a snapshot moves between backends bit for bit. */
#include <cuda_profiler_api.h>
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
#include "cuda/matvec.cuh"
#include "cuda/hc.cuh"
#include "cuda/attend.cuh"
#include "cuda/moe.cuh"
#include "cuda/mm.cuh"
#include "cuda/attn.cuh"
#include "util/errf.h"

#define STAGE_BYTES (64u << 20)   /* upload chunk: bounds pinned host memory to 2 × 64 MiB */
#define VRAM_MARGIN (256ull << 20) /* left free for the CUDA context, cuBLAS-free but safe */
/* Prefill chunk: tokens taken layer by layer together. 2048 makes every
 * expert see ~48 tokens per weight pass (256 experts, 6 per token), so the
 * routed products are no longer bound by weight reads; ~0.8 MB of scratch a
 * token. Halved at load until it fits beside the weights (≥ MIN_CHUNK). */
#define MAX_CHUNK 2048
#define MIN_CHUNK 64
#define HEAD_ROWS 16               /* logits rows per head pass (all_logits) */
#define ROW_BUDGET (16u << 20)     /* floats of a session's chunk score scratch (indexer, attention) */

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
    float *att;                  /* att_rows × n_head × att_len attention slices (att_len = ATT_SPLITS·(hd + 2)) */
    int64_t att_len, att_rows;
    float *isc;                  /* isc_rows × isc_ld indexer scores (isc_ld = ctx/4 + 2) */
    int64_t isc_ld, isc_rows;
    void *a16;                   /* attn_chunk's f16 row copies (attn_scratch_bytes for ctx) */
    cudaGraphExec_t body[2];     /* one token's layers: [select] = indexer picks top-k */
    float *last;                 /* eval_top's logits (n_vocab), kept for last_logits */
} gpu_state;

typedef struct {
    const ds4_model *m;
    const ds4_hparams *hp;
    const uint8_t *hbase;        /* host address of the weight span */
    uint8_t *dbase;              /* its device copy */
    uint64_t span;
    cudaStream_t s;
    double *freq_plain, *freq_yarn;   /* device, rope_dim/2 each */
    /* chunk scratch: `chunk` tokens of each (decode uses the first) */
    int64_t chunk;
    float *X, *mix, *coef, *h, *nrm, *qa, *q, *o, *low, *y, *kvc, *ck, *cg, *ik, *ig, *iq, *iw, *rl, *ew, *eout, *ge,
        *sg, *su, *rms, *logits;
    int32_t *eid, *sel;
    __half *xh[2], *gh;          /* f16 activations of chunk products (prep) */
    float *xs[2], *gs;
    mm_route route;
    /* The real model's shapes have tensor-core chunk kernels (attn.cuh);
     * other shapes (tiny test models) take the generic per-head kernels. */
    bool fast_attn, fast_idx;
    bool hc_fused;               /* decode's fused HC step fits the shape (hc_fusable) */
    dstep *step, *hstep;         /* device step inputs of a chunk; pinned host copy */
    float *top_v;                /* eval_top: the blocks' best values (TOP_BLOCKS) */
    int32_t *top_i, *htop;       /* their indices, then the argmax (TOP_BLOCKS + 1); pinned host copy */
    bool graphs;                 /* capture decode as CUDA graphs (DS4_CUDA_GRAPHS=0: eager) */
    cudaGraphExec_t head_exec;
} gpu_backend;

/* Every forward-pass kernel is launched with programmatic stream
 * serialisation (see pdl_wait in kernels.cuh), also inside captured graphs.
 * DS4_CUDA_PDL=0 launches them the ordinary way (diagnostic). */
static bool g_pdl = true;
template <typename... P, typename... A>
static void launch(void (*k)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, A... args) {
    cudaLaunchConfig_t c = {};
    cudaLaunchAttribute at;
    c.gridDim = grid;
    c.blockDim = block;
    c.dynamicSmemBytes = smem;
    c.stream = s;
    at.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at.val.programmaticStreamSerializationAllowed = 1;
    c.attrs = &at;
    c.numAttrs = g_pdl ? 1 : 0;
    cudaLaunchKernelEx(&c, k, (P)args...);
}

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

/* Widest input of a chunk product: the HC state (hc·d) or o (H·hd). */
static uint64_t act_width(const ds4_hparams *hp) {
    uint64_t a = (uint64_t)hp->hc_count * hp->n_embd, b = (uint64_t)hp->n_head * hp->head_dim;
    return a > b ? a : b;
}
/* Bytes of the f16 activation copies of a chunk of T tokens (prep slots 0
 * and 1, the routed hidden gh), then their f32 row scales (xs[0], xs[1], gs);
 * cuda_create lays them out in this order. */
static uint64_t act_bytes(const ds4_hparams *hp, uint64_t T) {
    uint64_t used = hp->n_expert_used;
    return (2 * act_width(hp) + used * hp->expert_ff) * T * sizeof(__half) + (2 + used) * T * sizeof(float);
}

/* Scratch floats of a chunk of `chunk` tokens (per token as the CPU's
 * scratch; logits HEAD_ROWS rows), in 256-byte aligned pieces (float4 loads
 * stay aligned). */
static uint64_t scratch_floats(const ds4_model *m, int64_t chunk, uint64_t *counts) {
    const ds4_hparams *hp = &m->hp;
    uint64_t d = hp->n_embd, hc = hp->hc_count, hd = hp->head_dim, H = hp->n_head, ff = hp->expert_ff;
    uint64_t used = hp->n_expert_used, ihd = hp->idx_head_dim, ih = hp->idx_n_head, cw = max_comp_width(hp);
    uint64_t ffs = (uint64_t)m->layers[0].gate_shexp.ne[1], T = (uint64_t)chunk;
    uint64_t c[] = {hc * d, (2 + hc) * hc, (2 + hc) * hc, d, d, hp->q_lora, H * hd, H * hd,
                    (uint64_t)hp->o_groups * hp->o_lora, d, hd, cw, cw, 2 * ihd, 2 * ihd, ih * ihd, ih, hp->n_expert,
                    used, used * d, used * ff, ffs, ffs, 1};
    uint64_t tot = 0;
    for (size_t i = 0; i < sizeof c / sizeof *c; i++) {
        uint64_t r = (c[i] * T + 63) / 64 * 64;
        if (counts) counts[i] = r;
        tot += r;
    }
    uint64_t lg = ((uint64_t)HEAD_ROWS * hp->n_vocab + 63) / 64 * 64;
    if (counts) counts[sizeof c / sizeof *c] = lg;
    return tot + lg;
}
#define N_SCRATCH 25

static void backend_free(gpu_backend *be) {
    if (!be) return;
    cudaFree(be->dbase);
    cudaFree(be->X);
    cudaFree(be->eid);
    cudaFree(be->xh[0]);
    mm_route_free(&be->route);
    cudaFree(be->freq_plain);
    cudaFree(be->step);
    if (be->hstep) cudaFreeHost(be->hstep);
    cudaFree(be->top_v);
    cudaFree(be->top_i);
    if (be->htop) cudaFreeHost(be->htop);
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
 * offset and length (matvec.cuh, rp_fmt). */
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

/* Rewrite one slab (rows of n_in weights of a repacked type) at d into
 * k_mv_rp's layout, through tmp (at least the slab's bytes), on stream s. */
static cudaError_t repack_slab(cudaStream_t s, uint32_t type, uint8_t *d, uint8_t *tmp, int64_t n_in, int64_t rows) {
    int bb, ho, hl, eb;
    rp_geom(type, &bb, &ho, &hl, &eb);
    int64_t nblocks = rows * (n_in / eb);
    cudaError_t e = cudaMemcpyAsync(tmp, d, (uint64_t)nblocks * bb, cudaMemcpyDeviceToDevice, s);
    if (e) return e;
    launch(k_repack, (unsigned)((nblocks + 255) / 256), 256, 0, s, tmp, d, nblocks, bb, ho, hl);
    return cudaGetLastError();
}

/* Rewrite every uploaded Q8_0 / IQ2_XXS / Q2_K slab into k_mv_rp's layout
 * (matvec.cuh) through one scratch slab on the device: payloads first,
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
        uint64_t slab = t->row_bytes * (uint64_t)t->ne[1];
        for (int64_t x = 0; x < (t->ne[2] > 1 ? t->ne[2] : 1) && !e; x++)
            e = repack_slab(be->s, t->type, (uint8_t *)DW(be, t) + x * slab, tmp, t->ne[0], t->ne[1]);
    }
    if (!e) e = cudaStreamSynchronize(be->s);
    cudaFree(tmp);
    return e ? ds4_errf(err, errlen, "cuda: weight repack failed: %s", cudaGetErrorString(e)) : 0;
}

/* k_hc_step's grid barrier holds only while all nb of its blocks are
 * resident at once (see hc_grid_barrier). */
static bool hs_coresident(int64_t nb) {
    int dev, sms, per;
    return cudaGetDevice(&dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess &&
           cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, k_hc_step, HS_BLOCK, 0) == cudaSuccess &&
           (int64_t)sms * per >= nb;
}

/* Decode takes the fused HC step (k_hc_step: the previous sublayer's post,
 * mixer, coefficients, collapse and norm in one launch) where its shape
 * allows: hc ≤ 4 and a power of two (3 mixer rows a warp, a slice of whole
 * warps per stream), F16/F32 mixers, n_embd ≤ HS_MAX_D and a multiple of a
 * block's positions, and all its blocks resident at once. The post of a
 * sublayer is then left to the next sublayer's step (the last layer's FFN
 * launches its own: the head is a separate graph, and a chunk's head does
 * not follow a decode body). */
static bool hc_fusable(const gpu_backend *be) {
    const ds4_hparams *hp = be->hp;
    int64_t hc = hp->hc_count, kb = hc ? HS_THREADS / hc : 0;
    if ((hc != 1 && hc != 2 && hc != 4) || hp->n_embd % kb || hp->n_embd > HS_MAX_D || !hs_coresident(hp->n_embd / kb))
        return false;
    const ds4_model *m = be->m;
    bool ok = m->out_hc_fn.type == GGML_F16 || m->out_hc_fn.type == GGML_F32;
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        const ds4_layer *L = &m->layers[l];
        ok = ok && (L->hc_attn_fn.type == GGML_F16 || L->hc_attn_fn.type == GGML_F32) &&
             (L->hc_ffn_fn.type == GGML_F16 || L->hc_ffn_fn.type == GGML_F32);
    }
    return ok;
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
    uint64_t counts[N_SCRATCH], hb = 0, scr = 0;
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(0) != cudaSuccess || cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
        ds4_errf(err, errlen, "cuda backend: cannot query the GPU");
        backend_free(be);
        return NULL;
    }
    /* Refuse before uploading anything, saying how much is missing (the
     * repack's scratch slab is freed before the first step, but must fit).
     * The prefill chunk shrinks first: a smaller one only costs speed. */
    uint64_t need = 0;
    for (be->chunk = MAX_CHUNK; be->chunk >= MIN_CHUNK; be->chunk /= 2) {
        hb = act_bytes(hp, (uint64_t)be->chunk);
        scr = scratch_floats(m, be->chunk, counts) * sizeof(float) + hb;
        need = be->span + scr + VRAM_MARGIN + max_rp_slab(m);
        if (need <= free_b) break;
    }
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
        cudaMalloc((void **)&be->X, scr - hb) != cudaSuccess ||
        cudaMalloc((void **)&be->xh[0], hb) != cudaSuccess ||
        cudaMalloc((void **)&be->eid, (size_t)be->chunk * (hp->n_expert_used + hp->idx_top_k) * sizeof(int32_t)) != cudaSuccess ||
        mm_route_alloc(&be->route, be->chunk, (int)hp->n_expert_used, (int)hp->n_expert) != cudaSuccess ||
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
                              &be->y, &be->kvc, &be->ck, &be->cg, &be->ik, &be->ig, &be->iq, &be->iw, &be->rl,
                              &be->ew, &be->eout, &be->ge, &be->sg, &be->su, &be->rms, &be->logits};
    float *p = be->X;
    for (int i = 0; i < N_SCRATCH; i++) { *dst[i] = p; p += counts[i]; }
    /* the f16 pieces in act_bytes' order */
    uint64_t T = (uint64_t)be->chunk, kmax = act_width(hp), gw = (uint64_t)hp->n_expert_used * hp->expert_ff;
    be->xh[1] = be->xh[0] + kmax * T;
    be->gh = be->xh[1] + kmax * T;
    be->xs[0] = (float *)(be->gh + gw * T);
    be->xs[1] = be->xs[0] + T;
    be->gs = be->xs[1] + T;
    be->sel = be->eid + be->chunk * hp->n_expert_used;
    if (cudaMalloc((void **)&be->step, (size_t)be->chunk * sizeof(dstep)) != cudaSuccess ||
        cudaMallocHost((void **)&be->hstep, (size_t)be->chunk * sizeof(dstep)) != cudaSuccess ||
        cudaMalloc((void **)&be->top_v, TOP_BLOCKS * sizeof(float)) != cudaSuccess ||
        cudaMalloc((void **)&be->top_i, (TOP_BLOCKS + 1) * sizeof(int32_t)) != cudaSuccess ||
        cudaMallocHost((void **)&be->htop, sizeof(int32_t)) != cudaSuccess) {
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
    const char *g = getenv("DS4_CUDA_GRAPHS"), *pdl = getenv("DS4_CUDA_PDL");
    be->graphs = !(g && !strcmp(g, "0"));
    g_pdl = !(pdl && !strcmp(pdl, "0"));
    be->fast_attn = hp->n_head == AT_H && hp->head_dim == AT_HD && hp->rope_dim == AT_RD;
    be->fast_idx = hp->idx_n_head == IX_H && hp->idx_head_dim == IX_D;
    be->hc_fused = hc_fusable(be);
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
    cudaFree(st->a16);
    cudaFree(st->last);
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

/* Dynamic shared memory of k_att_split: a row tile plus the weights of its
 * heads (33 KB at hd 512). */
static size_t att_split_smem(int hd) {
    int tile = ATT_TILE_FLOATS / hd < 32 ? ATT_TILE_FLOATS / hd : 32;
    return (size_t)(tile * hd + ATT_HG * tile + ATT_HG) * sizeof(float);
}

/* Shared-memory limits of the decode attention and indexer kernels for
 * these head dims; set outside any graph capture (state creation, tests). */
static void att_setup(int hd, int ih, int ihd) {
    int a = (int)att_split_smem(hd);
    cudaFuncSetAttribute(k_att_split<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, a);
    cudaFuncSetAttribute(k_att_split<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, a);
    cudaFuncSetAttribute(k_att_split<3>, cudaFuncAttributeMaxDynamicSharedMemorySize, a);
    cudaFuncSetAttribute(k_att_split<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, a);
    cudaFuncSetAttribute(k_att_split<5>, cudaFuncAttributeMaxDynamicSharedMemorySize, a);
    cudaFuncSetAttribute(k_att_split<6>, cudaFuncAttributeMaxDynamicSharedMemorySize, a);
    cudaFuncSetAttribute(k_att_split<7>, cudaFuncAttributeMaxDynamicSharedMemorySize, a);
    cudaFuncSetAttribute(k_att_split<8>, cudaFuncAttributeMaxDynamicSharedMemorySize, a);
    cudaFuncSetAttribute(k_idx_scores, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)idx_scores_smem(ih, ihd));
    cudaFuncSetAttribute(k_att_combine, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)att_combine_smem(hd));
}

static void *cuda_state_new(void *b, uint32_t ctx, char *err, size_t errlen) {
    gpu_backend *be = (gpu_backend *)b;
    const ds4_hparams *hp = be->hp;
    if (ctx < 1 || ctx > hp->ctx_max) { ds4_errf(err, errlen, "context %u out of range 1…%u", ctx, hp->ctx_max); return NULL; }
    uint32_t keep_raw = ds4_kv_keep_raw(hp);
    uint64_t need = 0;
    for (uint32_t l = 0; l < hp->n_layer; l++) need += layer_bytes(hp, hp->compress_ratio[l], keep_raw, ctx);
    /* Scratch of a chunk's attention (per token and head the slices' partial
     * outputs and (max, sum), see attend) and indexer scores, in batches of
     * rows tokens that fit ROW_BUDGET floats (a decode step uses one row). */
    int64_t att_len = ATT_SPLITS * ((int64_t)hp->head_dim + 2), isc_ld = ctx / 4 + 2, per_att = (int64_t)hp->n_head * att_len;
    int64_t att_rows = ROW_BUDGET / per_att, isc_rows = ROW_BUDGET / isc_ld;
    att_rows = att_rows < 1 ? 1 : att_rows > be->chunk ? be->chunk : att_rows;
    isc_rows = isc_rows < 1 ? 1 : isc_rows > be->chunk ? be->chunk : isc_rows;
    if (be->fast_attn) att_rows = 1;   /* chunks take attn_chunk: slices of decode only */
    uint64_t a16 = be->fast_attn ? attn_scratch_bytes(keep_raw, ctx, be->chunk, 4) : 0;
    need += (uint64_t)(att_rows * per_att + isc_rows * isc_ld + hp->n_vocab) * sizeof(float) + a16;
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
    att_setup((int)hp->head_dim, (int)hp->idx_n_head, (int)hp->idx_head_dim);
    st->ctx = ctx;
    st->keep_raw = keep_raw;
    st->n_layer = (int)hp->n_layer;
    st->att_len = att_len;
    st->att_rows = att_rows;
    st->isc_ld = isc_ld;
    st->isc_rows = isc_rows;
    bool ok = zalloc(&st->att, (uint64_t)(att_rows * per_att)) == cudaSuccess &&
              zalloc(&st->isc, (uint64_t)(isc_rows * isc_ld)) == cudaSuccess &&
              (!a16 || cudaMalloc(&st->a16, a16) == cudaSuccess) &&
              zalloc(&st->last, hp->n_vocab) == cudaSuccess;
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
    uint64_t hd = hp->head_dim, ihd = hp->idx_head_dim, u = 0;
    uint64_t a = (uint64_t)(st->att_rows * hp->n_head * st->att_len + st->isc_rows * st->isc_ld) +
                 (st->a16 ? attn_scratch_bytes(st->keep_raw, st->ctx, be->chunk, 4) / sizeof(float) : 0);
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

/* A prefill chunk: longer eval calls are cut into chunks anyway. */
static uint32_t cuda_eval_step(void *b) { return (uint32_t)((gpu_backend *)b)->chunk; }

/* Page-locked: a decode step's logits (n_vocab floats) come back by one DMA. */
static void *cuda_host_alloc(void *b, size_t bytes) {
    void *p = NULL;
    return cudaHostAlloc(&p, bytes, cudaHostAllocDefault) == cudaSuccess ? p : NULL;
}
static void cuda_host_free(void *b, void *p) {
    if (p) cudaFreeHost(p);
}

/* ---- the forward pass over a chunk of n tokens (decode: n = 1) ----------------------------- */

/* Rows below this many take a block each (k_matvec_wide): with a warp per
 * row they would leave most of the GPU idle. */
#define WIDE_ROWS 1024

/* Blocks of `kernel` (threads a block, smem bytes of dynamic shared memory)
 * that are resident on the whole GPU at once. The persistent and one-wave
 * launches size their grids by it at every launch, so the answers are kept
 * by (device, kernel, smem, threads): the occupancy query costs
 * microseconds, and one kernel may be launched with several sizes (k_mv_q8x:
 * q_a + kv and the shared down). */
template <typename K>
static int sx_fit(K kernel, int64_t smem, int threads = 32 * SX_WARPS) {
    static struct { int dev, threads, fit; const void *k; int64_t smem; } memo[64];
    static int n_memo;
    int dev = 0, sms = 1, per = 0;
    cudaGetDevice(&dev);
    for (int i = 0; i < n_memo; i++)
        if (memo[i].k == (const void *)kernel && memo[i].dev == dev && memo[i].smem == smem && memo[i].threads == threads)
            return memo[i].fit;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, kernel, threads, (size_t)smem);
    int fit = (per > 0 ? per : 1) * sms;
    if (n_memo < 64) {
        memo[n_memo].dev = dev;
        memo[n_memo].threads = threads;
        memo[n_memo].fit = fit;
        memo[n_memo].k = (const void *)kernel;
        memo[n_memo++].smem = smem;
    }
    return fit;
}

/* Matvec on a repacked format, any shape. IQ2_XXS / Q2_K (the routed
 * experts) with one x: k_mv_tc (tensor cores; 2 warps a task of 2 row tiles,
 * nr −8 / −16 / −32 = 1 / 2 / 4 warps; H100 --mv-bench: gate+up 23.7 / 20.0
 * / 21.4 µs, down 13.1 / 11.9 / 13.5 against k_mv_sx's 26.1 and 15.2).
 * Otherwise k_mv_sx (x in shared memory, persistent warps) where x fits in
 * shared memory and is not grouped: the Q8_0 matrices under 4096 rows
 * (attention inputs, shared-expert gate+up) and IQ2_XXS / Q2_K rows too long
 * for k_mv_tc's shared memory, as many blocks as are resident at once (no
 * waves): 2 rows a warp on IQ2_XXS gate+up (4 rows read per step), 4 on
 * Q2_K, 1 on Q8_0 (8 / 4 pieces in flight a lane) — the fastest of 1, 2, 4
 * in ds4-gpucheck --mv-bench (H100: routed gate+up 26.2 µs, routed down
 * 15.3, attn_q_a 5.7, against 44.8, 19.5, 6.7 for k_mv_rp's choice).
 * Otherwise k_mv_rp (the large Q8_0 matrices, grouped x): rows per warp 4
 * where the grid still has ≥ 1024 warps, fewer below, 2 for GLU pairs;
 * xg_rows must stay a multiple of the rows per warp (a warp's rows share one
 * x). Split-K (KS 4 warps a row group) on dense Q8_0 grids of ≥ 4096 row
 * groups (the LM head: 187 against 200 µs in --mv-bench, H100), KS 2 on
 * ungrouped ones under 1024 row groups (attn_output_b: 16.4 against 20.0 µs
 * in --mv-bench; decode body 0.620 / 0.625 → 0.604 / 0.606 ms on the 4-layer
 * file at 2K, H100). That split made the body slower while k_hc_step needed
 * half an SM's registers (it found them only beside ~2 blocks of k_mv_rp);
 * since its 66-register rewrite it wins. The grouped attn_output_a stays at
 * KS 1 (KS 2 there: within the noise). L2
 * prefetch before pdl_wait where the grid has more than one wave and one
 * wave's bytes stay ≤ RP_PF_MAX (q_b: 15.5 against 17.2 µs; the LM head with
 * KS 4); one-wave grids prefetching everything (35.6 MB at once) or big
 * waves were slower (out_b 25.7, LM head with KS 1 240 µs). nr forces a
 * kernel and its rows per warp (ds4_cuda_mv_bench: 1, 2, 4 = k_mv_rp, + 10·KS
 * its split, + 100 no prefetch; −1, −2, −4 = k_mv_sx, GLU up to 2, −8 … −32 =
 * k_mv_tc; 0 = the rules above). pre: k_mv_tc's early reads (eid, x: see
 * k_mv_tc). */
#define RP_SX_MAX 40000   /* bytes of x (+ run sums) k_mv_sx keeps in shared memory at most (48 KB without opt-in) */
#define RP_PF_MAX (16 << 20)   /* bytes one wave of k_mv_rp may prefetch into L2 (50 MB, two partitions) */
#define TC_SMEM_MAX (160 << 10)   /* k_mv_tc's shared memory at most (one block an SM; 227 KB with opt-in) */
template <int F>
static void launch_rpf(cudaStream_t s, const uint8_t *W, const uint8_t *W2, int64_t n_in, int64_t rows, const float *x,
                       int64_t xg_rows, int64_t xg_stride, float *y, const int32_t *eid, uint64_t estride,
                       int64_t x_slot, int64_t y_slot, int slots, const float *ew, float clamp, int nr, int pre) {
    if constexpr (F != RP_Q8) {
        int64_t tsm = tc_smem(F, n_in);
        if (!nr && !xg_rows && tsm <= TC_SMEM_MAX) nr = -16;
        if (nr <= -8) {
            int64_t ntask = (rows + (W2 ? 15 : 31)) / (W2 ? 16 : 32);
#define MVTC(KS, GLU)                                                                                              \
    do {                                                                                                           \
        /* above 48 KB: opted into before the query and the launch */                                           \
        cudaFuncSetAttribute(k_mv_tc<F, KS, GLU>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)tsm);          \
        int fit = sx_fit(k_mv_tc<F, KS, GLU>, tsm, 32 * TC_WARPS);                                                 \
        int64_t bx = fit / slots > 1 ? fit / slots : 1;                                                            \
        launch(k_mv_tc<F, KS, GLU>, dim3((unsigned)(ntask < bx ? ntask : bx), (unsigned)slots), 32 * TC_WARPS,     \
               (size_t)tsm, s, W, W2, n_in, rows, x, y, eid, estride, x_slot, y_slot, ew, clamp, pre);             \
    } while (0)
            if (W2) { if (nr == -8) MVTC(1, true); else if (nr == -32) MVTC(4, true); else MVTC(2, true); }
            else if (nr == -8) MVTC(1, false);
            else if (nr == -32) MVTC(4, false);
            else MVTC(2, false);
#undef MVTC
            return;
        }
    }
    int64_t sm = sx_smem(F, n_in);
    if (!nr && !xg_rows && sm <= RP_SX_MAX && (F != RP_Q8 || rows < 4096))
        nr = F == RP_Q8 ? -1 : F == RP_Q2K && !W2 ? -4 : -2;
    if (nr < 0) {
        int64_t groups = (rows - nr * SX_WARPS - 1) / (-nr * SX_WARPS);
#define MVSX(NR, GLU)                                                                                        \
    do {                                                                                                     \
        int fit = sx_fit(k_mv_sx<F, NR, GLU>, sm);                                                           \
        int64_t bx = fit / slots > 1 ? fit / slots : 1;                                                      \
        launch(k_mv_sx<F, NR, GLU>, dim3((unsigned)(groups < bx ? groups : bx), (unsigned)slots), 32 * SX_WARPS, \
               (size_t)sm, s, W, W2, n_in, rows, x, y, eid, estride, x_slot, y_slot, ew, clamp);             \
    } while (0)
        if (W2) { if (nr == -2) MVSX(2, true); else MVSX(1, true); }
        else if (nr == -4) MVSX(4, false);
        else if (nr == -2) MVSX(2, false);
        else MVSX(1, false);
#undef MVSX
        return;
    }
    /* k_mv_rp: nr = NR + 10·KS (+ 100: no L2 prefetch) forces a variant */
    bool pf = nr < 100;
    int ks = nr % 100 / 10;
    nr %= 10;
    if (!nr) {
        nr = rows >= 4096 ? 4 : rows >= 2048 ? 2 : 1;
        int cap = W2 || F == RP_Q2K ? 2 : 4;
        if (nr > cap) nr = cap;
    }
    while (xg_rows && xg_rows % nr) nr /= 2;
    if (F != RP_Q8 || W2) ks = 1;
    else if (!ks) {
        int64_t ng = (rows + nr * MV_WARPS - 1) / (nr * MV_WARPS) * slots;
        ks = ng >= 4096 ? 4 : !xg_rows && ng < 1024 ? 2 : 1;
    }
    dim3 grid((unsigned)((rows * ks + nr * MV_WARPS - 1) / (nr * MV_WARPS)), (unsigned)slots);
    const int64_t nblk = (int64_t)grid.x * slots;
    const int64_t bb = (int64_t)(MV_WARPS / ks) * nr * (n_in / rp_fmt<F>::EB) * (rp_fmt<F>::PAY + rp_fmt<F>::HL) * (W2 ? 2 : 1);
#define MVRP(NR, GLU, KS)                                                                                          \
    do {                                                                                                           \
        int fit = sx_fit(k_mv_rp<F, NR, GLU, KS>, 0, 32 * MV_WARPS);                                               \
        launch(k_mv_rp<F, NR, GLU, KS>, grid, 32 * MV_WARPS, 0, s, W, W2, n_in, rows, x, xg_rows, xg_stride, y, eid, \
               estride, x_slot, y_slot, ew, clamp, pf && nblk > fit && fit * bb <= RP_PF_MAX);                     \
    } while (0)
#define MVRPK(KS) do { if (nr == 4) MVRP(4, false, KS); else if (nr == 2) MVRP(2, false, KS); else MVRP(1, false, KS); } while (0)
    if (W2) { if (nr == 4) MVRP(4, true, 1); else if (nr == 2) MVRP(2, true, 1); else MVRP(1, true, 1); }
    else if constexpr (F == RP_Q8) { if (ks == 4) MVRPK(4); else if (ks == 2) MVRPK(2); else MVRPK(1); }
    else MVRPK(1);
#undef MVRPK
#undef MVRP
}
static void launch_rp(uint32_t type, cudaStream_t s, const uint8_t *W, const uint8_t *W2, int64_t n_in, int64_t rows,
                      const float *x, int64_t xg_rows, int64_t xg_stride, float *y, const int32_t *eid, uint64_t estride,
                      int64_t x_slot, int64_t y_slot, int slots, const float *ew, float clamp, int nr = 0,
                      int pre = 0) {
    if (type == GGML_Q8_0)
        launch_rpf<RP_Q8>(s, W, W2, n_in, rows, x, xg_rows, xg_stride, y, eid, estride, x_slot, y_slot, slots, ew, clamp,
                          nr, pre);
    else if (type == GGML_IQ2_XXS)
        launch_rpf<RP_IQ2>(s, W, W2, n_in, rows, x, xg_rows, xg_stride, y, eid, estride, x_slot, y_slot, slots, ew, clamp,
                           nr, pre);
    else
        launch_rpf<RP_Q2K>(s, W, W2, n_in, rows, x, xg_rows, xg_stride, y, eid, estride, x_slot, y_slot, slots, ew, clamp,
                           nr, pre);
}

/* Two Q8_0 matrices of one x (n_in inputs; ra and rb rows) in one launch:
 * k_mv_q8x, decode's attn_q_a and attn_kv. Grid: a warp a row, at most the
 * blocks resident at once (more rows walk as a ring). */
static bool q8x_fits(const ds4_tensor *A, const ds4_tensor *B) {
    return A->type == GGML_Q8_0 && B->type == GGML_Q8_0 && A->ne[0] == B->ne[0] && A->ne[0] % 32 == 0 &&
           A->ne[0] * 4 <= RP_SX_MAX;   /* x in shared memory, as k_mv_sx */
}
static void launch_q8x(cudaStream_t s, const uint8_t *Wa, int64_t ra, float *ya, const uint8_t *Wb, int64_t rb,
                       float *yb, int64_t n_in, const float *x) {
    int64_t sm = n_in * 4, need = (ra + rb + SX_WARPS - 1) / SX_WARPS;
    int fit = sx_fit(k_mv_q8x, sm);
    launch(k_mv_q8x, dim3((unsigned)(need < fit ? need : fit)), 32 * SX_WARPS, (size_t)sm, s, Wa, ra, ya, Wb, rb,
           yb, n_in, x);
}

/* Decode's q_b with k_qa_kv's work (k_qb): a Q8_0 q_b of ql inputs (q_a in
 * QB_GW float4 a lane), one row group a warp as launch_rpf's k_mv_rp with
 * KS 1 (its choice below 4096 row groups; below 4096 rows it takes k_mv_sx,
 * whose sums are k_mv_rp's), the K=V row's sum tree ≤ 32 warps of one
 * element, its RoPE pairs a thread each and its FP8 part ≤ 4 values a thread
 * (blk_fp8) in a block of 32·MV_WARPS. */
static bool qb_fits(const ds4_tensor *T, int64_t ql, int64_t hd, int64_t rd) {
    const int64_t bt = 32 * MV_WARPS;
    return T->type == GGML_Q8_0 && T->ne[0] == ql && ql % 32 == 0 && ql <= 4 * bt * QB_GW &&
           (T->ne[1] + 4 * MV_WARPS - 1) / (4 * MV_WARPS) < 4096 && hd <= 1024 && rd % 2 == 0 && rd <= hd &&
           rd / 2 <= bt && hd - rd <= 4 * bt;
}
static void launch_qb(cudaStream_t s, const uint8_t *W, int64_t rows, const float *qr, const float *qw, int64_t ql,
                      float *qa, float *y, float *kv, const float *kw, int64_t hd, int64_t rd, const double *freq,
                      const dstep *st, float eps, float *ring, uint32_t keep) {
    const int nr = rows >= 4096 ? 4 : rows >= 2048 ? 2 : 1;   /* launch_rpf's rows a warp */
    const int64_t sm = (ql > hd ? ql : hd) * (int64_t)sizeof(float), groups = (rows + nr * MV_WARPS - 1) / (nr * MV_WARPS);
    const int64_t bb = (int64_t)MV_WARPS * nr * (ql / 32) * 34;   /* a block's weight bytes */
#define QB(NR)                                                                                                  \
    do {                                                                                                        \
        int fit = sx_fit(k_qb<NR>, sm, 32 * MV_WARPS);                                                          \
        launch(k_qb<NR>, dim3((unsigned)(1 + groups)), 32 * MV_WARPS, (size_t)sm, s, W, rows, qr, qw, (int)ql, qa, y, \
               kv, kw, (int)hd, (int)rd, freq, st, eps, ring, keep, groups > fit && fit * bb <= RP_PF_MAX);       \
    } while (0)
    if (nr == 4) QB(4);
    else if (nr == 2) QB(2);
    else QB(1);
#undef QB
}

/* Decode's router (k_router_mv: logits + routing, one launch). With Sg, the
 * shared expert's gate+up (Q8_0 gate and up of srows × n_in; sh_fits) into
 * sy as extra blocks of the same launch: as many as are resident beside the
 * router's at once, one warp a row pair where that many fit. */
static bool sh_fits(const ds4_tensor *g, const ds4_tensor *u) {
    return q8x_fits(g, u) && g->ne[1] == u->ne[1];
}
static void launch_router(cudaStream_t s, int wtype, const uint8_t *W, uint64_t rb, int64_t n_in, const float *x,
                          float *logit, int E, int used, const uint8_t *tid2eid, uint64_t t2e_rb, const dstep *st,
                          const float *bias, bool norm, float wscale, int32_t *eid, float *ew, const uint8_t *Sg,
                          const uint8_t *Su, int64_t srows, float *sy, float clamp) {
    int64_t nrb = (E + RT_ROWS - 1) / RT_ROWS, nsb = 0, sm = ROUTER_SMEM(E);
    if (Sg) {
        if (n_in * 4 > sm) sm = n_in * 4;
        int64_t need = (srows + RT_THREADS / 32 - 1) / (RT_THREADS / 32), room = sx_fit(k_router_mv, sm, RT_THREADS) - nrb;
        nsb = need < room ? need : room > 1 ? room : 1;
    }
    launch(k_router_mv, (unsigned)(nrb + nsb), RT_THREADS, (size_t)sm, s, wtype, W, rb, n_in, x, logit, E, used, tid2eid,
           t2e_rb, st, bias, norm, wscale, eid, ew, Sg, Su, srows, sy, clamp);
}

/* y = T·x (one token); x grouped as k_matvec (xg_rows = 0: one x). */
static void matvec_g(gpu_backend *be, const ds4_tensor *T, const float *x, int64_t xg_rows, int64_t xg_stride, float *y) {
    if (repacked(T->type)) {
        launch_rp(T->type, be->s, DW(be, T), NULL, T->ne[0], T->ne[1], x, xg_rows, xg_stride, y, NULL, 0, 0, 0, 1, NULL, 0);
        return;
    }
    if (!xg_rows && T->ne[1] < WIDE_ROWS && T->ne[0] >= 2048) {
        launch(k_matvec_wide, (unsigned)T->ne[1], 256, 0, be->s, (int)T->type, DW(be, T), T->row_bytes, T->ne[0], x, y);
        return;
    }
    launch(k_matvec, dim3((unsigned)((T->ne[1] + MV_WARPS - 1) / MV_WARPS), 1), 32 * MV_WARPS, 0, be->s,
        (int)T->type, DW(be, T), T->row_bytes, T->ne[0], T->ne[1], x, xg_rows, xg_stride, y, NULL, 0, 0, 0);
}
static void matvec(gpu_backend *be, const ds4_tensor *T, const float *x, float *y) { matvec_g(be, T, x, 0, 0, y); }

/* Every routed slot at once: slot i multiplies expert eid[i]'s matrix
 * (decode's down: the router ran at least two launches back, pre 1). */
static void matvec_experts(gpu_backend *be, const ds4_tensor *T, const float *x, int64_t x_slot, float *y,
                           int64_t y_slot) {
    int used = (int)be->hp->n_expert_used;
    uint64_t estride = T->row_bytes * (uint64_t)T->ne[1];
    if (repacked(T->type)) {
        launch_rp(T->type, be->s, DW(be, T), NULL, T->ne[0], T->ne[1], x, 0, 0, y, be->eid, estride, x_slot, y_slot, used,
                  NULL, 0, 0, 1);
        return;
    }
    launch(k_matvec, dim3((unsigned)((T->ne[1] + MV_WARPS - 1) / MV_WARPS), used), 32 * MV_WARPS, 0, be->s,
        (int)T->type, DW(be, T), T->row_bytes, T->ne[0], T->ne[1], x, 0, 0, y, be->eid, estride, x_slot, y_slot);
}

/* y = swiglu(Tg·x, Tu·x) · (ew ? ew[slot] : 1) in one launch: routed slots
 * (routed = true: expert eid[slot] of 3-D tensors; decode runs them with
 * the router and x's producer at least two launches back, pre 2) or the
 * shared expert. */
static void glu(gpu_backend *be, const ds4_tensor *Tg, const ds4_tensor *Tu, bool routed, const float *x, float *y,
                float clamp) {
    int slots = routed ? (int)be->hp->n_expert_used : 1;
    const int32_t *eid = routed ? be->eid : NULL;
    const float *ew = routed ? be->ew : NULL;
    uint64_t estride = Tg->row_bytes * (uint64_t)Tg->ne[1];
    int64_t rows = Tg->ne[1];
    if (repacked(Tg->type)) {   /* the loader gives gate and up the same type */
        launch_rp(Tg->type, be->s, DW(be, Tg), DW(be, Tu), Tg->ne[0], rows, x, 0, 0, y, eid, estride, 0, rows, slots, ew,
                  clamp, 0, routed ? 2 : 0);
        return;
    }
    launch(k_matvec_glu, dim3((unsigned)((rows + MV_WARPS - 1) / MV_WARPS), slots), 32 * MV_WARPS, 0, be->s,
        (int)Tg->type, DW(be, Tg), DW(be, Tu), Tg->row_bytes, Tg->ne[0], rows, x, y, eid, estride, rows, ew, clamp);
}

/* Chunk products go through f16 copies of the activations (mm_prep) into
 * two slots, so an activation that feeds several matrices (the normed h feeds
 * up to eight) is converted once: slot 0 holds the layer input's norm, slot 1
 * the second-level activation (q_a's output, o, the shared expert's hidden). */
static void prep(gpu_backend *be, int slot, const float *x, int64_t n, int64_t K) {
    if (n > 1) mm_prep(be->s, x, K, n, K, be->xh[slot], be->xs[slot]);
}
static mm_w mmw(const gpu_backend *be, const ds4_tensor *T) {
    mm_w w = {(uint32_t)T->type, DW(be, T), T->ne[0], T->ne[1], T->row_bytes};
    return w;
}
/* y[t·ldy + r] = T·x_t for the chunk's n tokens: one token reads x through
 * the decode matvecs, more the prepared slot through the tensor cores. */
static void mul(gpu_backend *be, const ds4_tensor *T, int slot, const float *x, int64_t n, float *y, int64_t ldy) {
    if (n == 1) { matvec(be, T, x, y); return; }
    mm_w w = mmw(be, T);
    mm_dense(be->s, &w, 0, T->ne[1], be->xh[slot], be->xs[slot], T->ne[0], n, y, ldy);
}

static unsigned nthreads(int64_t n) { return n >= 1024 ? 1024 : (unsigned)((n + 31) / 32 * 32); }
static dim3 per_tok(int64_t len, int64_t n) { return dim3((unsigned)((len + 255) / 256), (unsigned)n); }

/* HC collapse of the n states at X, normed by `norm`, into be->nrm
 * (coefficients into be->coef unless head). A chunk computes each token's
 * rms once (k_rms_rows) and its mixer outputs as one product; k_hc_rows
 * then finishes a token a block, norm included, where the shape allows. */
static void hc_pre(gpu_backend *be, const float *X, int64_t n, const ds4_tensor *fn, const ds4_tensor *scale,
                   const ds4_tensor *base, const ds4_tensor *norm, bool head) {
    const ds4_hparams *hp = be->hp;
    int64_t d = hp->n_embd, zw = (int64_t)hp->hc_count * d;
    const float *rms = NULL;
    if (n > 1) {
        prep(be, 0, X, n, zw);
        launch(k_rms_rows, (unsigned)n, 1024, 0, be->s, X, zw, hp->rms_eps, be->rms);
        rms = be->rms;
    }
    mul(be, fn, 0, X, n, be->mix, fn->ne[1]);
    if (n > 1 && be->hc_fused) {
        launch(k_hc_rows, (unsigned)n, HS_THREADS, 0, be->s, X, d, (int)hp->hc_count,
               (const float *)be->mix, (int)fn->ne[1], rms, DF(be, scale), DF(be, base), (int)hp->hc_sinkhorn_iters,
               hp->hc_eps, hp->rms_eps, DF(be, norm), head ? NULL : be->coef, be->nrm);
        return;
    }
    /* Every block derives the token's coefficients (one warp's Sinkhorn):
     * decode spreads the token over n_embd/256 blocks to fill the GPU, a
     * chunk has blocks enough and takes 1024 threads, 4× fewer Sinkhorns. */
    unsigned bs = n > 1 ? 1024 : 256;
    launch(k_hc_pre, dim3((unsigned)((d + bs - 1) / bs), (unsigned)n), bs, 0, be->s, X, d, (int)hp->hc_count, be->mix,
           (int)fn->ne[1], DF(be, scale), DF(be, base), (int)hp->hc_sinkhorn_iters, hp->hc_eps, hp->rms_eps, head,
           head ? NULL : be->coef, be->h, rms);
    launch(k_rmsnorm, (unsigned)n, 1024, 0, be->s, be->h, DF(be, norm), (int)d, hp->rms_eps, be->nrm, d);
}

/* X ← the HC post of the sublayer output be->y (+ the routed slots' be->eout
 * when eout: the FFN's moe sum), coefficients from be->coef, or with
 * pscale (one decode token after k_hc_step) from its mixer outputs in
 * be->mix and the sublayer's pscale, pbase. */
static void hc_post(gpu_backend *be, int64_t n, bool eout, const ds4_tensor *pscale, const ds4_tensor *pbase) {
    const ds4_hparams *hp = be->hp;
    launch(k_hc_post, per_tok(hp->n_embd, n), 256, 0, be->s, be->X, hp->n_embd, (int)hp->hc_count,
           (const float *)be->coef, (const float *)be->y, eout ? (const float *)be->eout : NULL, (int)hp->n_expert_used,
           pscale ? (const float *)be->mix : NULL, pscale ? DF(be, pscale) : NULL, pbase ? DF(be, pbase) : NULL,
           (int)hp->hc_sinkhorn_iters, hp->hc_eps);
}

/* One token's state X: with pscale, the HC post of the pending sublayer
 * output (be->y; eout: + the routed slots) with that sublayer's
 * coefficients (from its mixer outputs in be->mix and its pscale, pbase);
 * then be->nrm = the normed collapse for the next sublayer, whose mixer
 * outputs over rms replace be->mix (not for the head: pre only). */
static void hc_step(gpu_backend *be, float *X, const ds4_tensor *fn, const ds4_tensor *scale, const ds4_tensor *base,
                    const ds4_tensor *norm, bool head, const ds4_tensor *pscale, const ds4_tensor *pbase, bool eout) {
    const ds4_hparams *hp = be->hp;
    int64_t d = hp->n_embd, hc = hp->hc_count;
    launch(k_hc_step, (unsigned)(d / (HS_THREADS / hc)), HS_BLOCK, 0, be->s, X, d, (int)hc,
           pscale ? (const float *)be->mix : NULL, pscale ? DF(be, pscale) : NULL, pbase ? DF(be, pbase) : NULL,
           (const float *)be->y, eout ? (const float *)be->eout : NULL, (int)hp->n_expert_used, (int)fn->type,
           DW(be, fn), fn->row_bytes, (int)fn->ne[1], DF(be, scale), DF(be, base), (int)hp->hc_sinkhorn_iters,
           hp->hc_eps, hp->rms_eps, DF(be, norm), head ? NULL : be->mix, be->nrm);
}

/* One compressor over the chunk: project (from slot 0 = the normed input),
 * emit the rows of every block the chunk completes, then store the inputs
 * the next chunk needs in the ring (after the emission read them). Decode
 * takes comp_decode instead where the shapes fit. */
static void compress(gpu_backend *be, int64_t n, const ds4_tensor *tkv, const ds4_tensor *tgate, const ds4_tensor *ape,
                     const ds4_tensor *norm, int R, int lanes, int D, float *pk, float *pg, float *rkv, float *rg,
                     uint32_t keep, float *rows, const double *freq, bool indexer) {
    const ds4_hparams *hp = be->hp;
    int W = lanes * D;
    mul(be, tkv, 0, be->nrm, n, pk, W);
    mul(be, tgate, 0, be->nrm, n, pg, W);
    launch(k_comp_emit, (unsigned)(n / R + 1), nthreads(D), D * sizeof(float), be->s,
        pk, pg, (int)ape->type, DW(be, ape), ape->row_bytes, rkv, rg, keep, R, lanes, D, be->step, n, DF(be, norm), freq,
        (int)hp->rope_dim, hp->rms_eps, indexer, rows);
    int64_t ns = n < (int64_t)keep ? n : (int64_t)keep;
    launch(k_comp_store, dim3((unsigned)((W / 8 + 127) / 128), (unsigned)ns), 128, 0, be->s,
        pk, pg, (int)ape->type, DW(be, ape), ape->row_bytes, W, R, be->step, n, rkv, rg, keep);
}

/* Attention of c tokens of a chunk (st0: the chunk's first step, st: the
 * first of these c; q, o, sel from that token) without tensor cores: f32
 * like the CPU's cpu_attend, which decode must match closely. Slices of the
 * rows per head group (k_att_split), merged per head (k_att_combine); part
 * holds c × ATT_SPLITS × H × (hd + 2) floats. qeps ≥ 0: q holds q_b's raw
 * heads, which k_att_split norms (eps qeps) and ropes (rd % 4 = 0); < 0: q
 * is ready (k_q_heads). */
static void attend(cudaStream_t s, const float *q, float qeps, float *o, const float *kvc, const float *raw,
                   uint32_t keep_raw, const dstep *st0, const dstep *st, uint32_t window, const float *comp,
                   const int32_t *sel, int ratio, int64_t topk, const float *sinks, int H, int hd, int rd,
                   const double *freq, float scale, int64_t c, float *part) {
    size_t smem = att_split_smem(hd);
    float *ml = part + c * ATT_SPLITS * H * hd;
    dim3 grid((unsigned)((H + ATT_HG - 1) / ATT_HG), ATT_SPLITS, (unsigned)c);
    switch (hd / 128) {   /* cuda_create: hd a multiple of 128, ≤ 1024 */
#define ATT_NV(NV) case NV: launch(k_att_split<NV>, grid, 32 * ATT_HG, smem, s, q, qeps, kvc, raw, keep_raw, st0, st, \
                                   window, comp, sel, ratio, topk, H, rd, freq, scale, part, ml); break;
    ATT_NV(1) ATT_NV(2) ATT_NV(3) ATT_NV(4) ATT_NV(5) ATT_NV(6) ATT_NV(7) ATT_NV(8)
#undef ATT_NV
    }
    launch(k_att_combine, dim3((unsigned)H, (unsigned)c), (unsigned)(hd / 4), att_combine_smem(hd), s,
           part, ml, st0, st, window, ratio, topk, sinks, hd, rd, freq, ATT_SPLITS, o);
}

/* Scores and top-k of the chunk's n tokens (queries in be->iq, weights in
 * be->iw, ready), in sub-batches of the state's score rows. A token with no
 * more visible rows than top_k skips the selection (k_topk leaves,
 * attention takes every row). */
static void idx_select(gpu_backend *be, gpu_state *st, gpu_layer *ls, int64_t n, uint32_t p0) {
    const ds4_hparams *hp = be->hp;
    int64_t ih = hp->idx_n_head, ihd = hp->idx_head_dim, topk = hp->idx_top_k;
    cudaStream_t s = be->s;
    /* k_idx_scores: a tile of rows per block up to the state's capacity, at most ~2 blocks per SM (132) */
    int64_t nb = (st->isc_ld + IDX_TILE - 1) / IDX_TILE;
    nb = nb < 264 ? nb : 264;
    for (int64_t t0 = 0; t0 < n; t0 += st->isc_rows) {
        int64_t c = n - t0 < st->isc_rows ? n - t0 : st->isc_rows;
        if (n > 1 && be->fast_idx)
            idx_scores_chunk(s, be->iq + t0 * ih * ihd, be->iw + t0 * ih, ls->idx, p0 + (uint32_t)t0, c, (int)ih,
                             (int)ihd, st->isc, st->isc_ld);
        else
            launch(k_idx_scores, dim3((unsigned)nb, (unsigned)c), 256, idx_scores_smem((int)ih, (int)ihd), s,
                   be->iq + t0 * ih * ihd, be->iw + t0 * ih, ls->idx, be->step + t0, (int)ih, (int)ihd, st->isc,
                   st->isc_ld);
        launch(k_topk, (unsigned)c, 1024, 0, s, st->isc, be->step + t0, 0, topk, be->sel + t0 * topk, st->isc_ld);
    }
}

/* Indexer of a ratio-4 layer for the chunk: its compressor, then (select)
 * the queries, their weights, scores and top-k for every token. */
static void indexer(gpu_backend *be, gpu_state *st, const ds4_layer *L, gpu_layer *ls, int64_t n, uint32_t p0,
                    bool select, const double *freq) {
    const ds4_hparams *hp = be->hp;
    int64_t ih = hp->idx_n_head, ihd = hp->idx_head_dim, rd = hp->rope_dim;
    compress(be, n, &L->idx_comp_kv, &L->idx_comp_gate, &L->idx_comp_ape, &L->idx_comp_norm, 4, 2, (int)ihd, be->ik,
             be->ig, ls->ikv, ls->igate, ls->keep_i, ls->idx, freq, true);
    if (!select) return;
    mul(be, &L->idx_q_b, 1, be->qa, n, be->iq, ih * ihd);
    mul(be, &L->idx_proj, 0, be->nrm, n, be->iw, ih);
    float wscale = (float)(1.0 / sqrt((double)ihd * (double)ih));
    launch(k_idx_heads, dim3((unsigned)ih, (unsigned)n), nthreads(ihd), ihd * sizeof(float), be->s, be->iq, be->iw,
           (int)ihd, (int)rd, freq, be->step, wscale);
    idx_select(be, st, ls, n, p0);
}

/* Appends matrix T (F16, x[xi]'s width) with output y to the set of one
 * k_mv_f16x launch; false where it does not fit that kernel. */
static bool f16x_add(const gpu_backend *be, f16x_set *a, const ds4_tensor *T, int xi, float *y) {
    if (a->nseg == F16X_SEGS || T->type != GGML_F16 || T->ne[0] != a->n[xi] || a->n[xi] % 8 ||
        T->row_bytes != 2 * (uint64_t)T->ne[0] || !DW(be, T))
        return false;
    int32_t r0 = a->nseg ? a->end[a->nseg - 1] : 0;
    a->w[a->nseg] = DW(be, T);
    a->y[a->nseg] = y;
    a->end[a->nseg] = r0 + (int32_t)T->ne[1];
    a->xi[a->nseg] = xi;
    a->nseg++;
    return true;
}
/* k_mv_f16x over the set: a warp a row, at most the blocks resident at once. */
static void launch_f16x(cudaStream_t s, const f16x_set *a) {
    int64_t sm = (int64_t)(a->n[0] + a->n[1]) * 4, need = (a->end[a->nseg - 1] + SX_WARPS - 1) / SX_WARPS;
    int fit = sx_fit(k_mv_f16x, sm);
    launch(k_mv_f16x, dim3((unsigned)(need < fit ? need : fit)), 32 * SX_WARPS, (size_t)sm, s, *a);
}
static comp_job comp_job_of(const gpu_backend *be, const ds4_tensor *ape, const ds4_tensor *norm, int R, int lanes,
                            int D, float *pk, float *pg, float *rkv, float *rg, uint32_t keep, float *rows, bool indexer) {
    comp_job c = {pk, pg, DW(be, ape), ape->row_bytes, (int)ape->type, R, lanes, D, rkv, rg, keep, DF(be, norm), rows,
                  indexer};
    return c;
}

/* A decode token's compressors and, on ratio-4 layers, its indexer: the
 * products in one launch (ratio 4: every F16 product of both, after q_a's
 * norm, in k_mv_f16x; ratio 128: k_matvec_two, faster on its 1024 rows),
 * both compressor steps and the query heads in one k_comp_idx, then
 * (select) scores and top-k — 2 + 2 launches where compress() + indexer()
 * take 9. False, before any launch, where the shapes do not fit (the chunk
 * path runs). */
static bool comp_decode(gpu_backend *be, gpu_state *st, const ds4_layer *L, gpu_layer *ls, uint32_t p0, bool select,
                        const double *freq) {
    const ds4_hparams *hp = be->hp;
    int64_t hd = hp->head_dim, ih = hp->idx_n_head, ihd = hp->idx_head_dim;
    bool idx = ls->ratio == 4, sel = idx && select;
    const ds4_tensor *tkv = &L->comp_kv, *tg = &L->comp_gate;
    if (idx) {
        f16x_set a = {};
        a.x[0] = be->nrm;
        a.n[0] = (int32_t)hp->n_embd;
        if (sel) { a.x[1] = be->qa; a.n[1] = (int32_t)hp->q_lora; }
        /* rows of n_embd inputs first, then idx_q_b's of q_lora */
        if (!f16x_add(be, &a, tkv, 0, be->ck) || !f16x_add(be, &a, tg, 0, be->cg) ||
            !f16x_add(be, &a, &L->idx_comp_kv, 0, be->ik) || !f16x_add(be, &a, &L->idx_comp_gate, 0, be->ig))
            return false;
        if (sel && (!f16x_add(be, &a, &L->idx_proj, 0, be->iw) || !f16x_add(be, &a, &L->idx_q_b, 1, be->iq))) return false;
        if ((int64_t)(a.n[0] + a.n[1]) * 4 > RP_SX_MAX) return false;
        launch_f16x(be->s, &a);
    } else {
        if (tkv->type != tg->type || repacked(tkv->type) || tkv->row_bytes != tg->row_bytes || tkv->ne[0] != tg->ne[0] ||
            tkv->ne[1] != tg->ne[1])
            return false;
        int64_t r = tkv->ne[1];
        bool wide = r < WIDE_ROWS && tkv->ne[0] >= 2048;   /* matvec_g's choice of kernel */
        launch(k_matvec_two, dim3((unsigned)(wide ? r : (r + MV_WARPS - 1) / MV_WARPS), 2), wide ? 256 : 32 * MV_WARPS,
               0, be->s, (int)tkv->type, DW(be, tkv), DW(be, tg), tkv->row_bytes, tkv->ne[0], r,
               (const float *)be->nrm, be->ck, be->cg, wide);
    }
    comp_job c = comp_job_of(be, &L->comp_ape, &L->comp_norm, ls->ratio, ls->lanes, (int)hd, be->ck, be->cg, ls->ckv,
                             ls->cgate, ls->keep_c, ls->comp, false);
    comp_job ci = {};
    if (idx)
        ci = comp_job_of(be, &L->idx_comp_ape, &L->idx_comp_norm, 4, 2, (int)ihd, be->ik, be->ig, ls->ikv, ls->igate,
                         ls->keep_i, ls->idx, true);
    int ncomp = idx ? 2 : 1;
    int64_t dmax = hd > ihd ? hd : ihd;
    float wscale = (float)(1.0 / sqrt((double)ihd * (double)ih));
    launch(k_comp_idx, (unsigned)(ncomp + (sel ? ih : 0)), nthreads(dmax), dmax * sizeof(float), be->s, c, ci, ncomp,
           be->iq, be->iw, (int)ihd, (int)hp->rope_dim, freq, (const dstep *)be->step, hp->rms_eps, wscale);
    if (sel) idx_select(be, st, ls, 1, p0);
    return true;
}

/* Attention sublayer of the chunk at be->step (positions p0 … p0+n−1; p0
 * is read on the device where a decode graph must replay at any position).
 * `select`: some token of the chunk has more visible indexer rows than
 * top_k (a property of the decode graph variant, not of a layer). */
static void attn_layer(gpu_backend *be, gpu_state *st, const ds4_layer *L, gpu_layer *ls, int64_t n, uint32_t p0,
                       bool select) {
    const ds4_hparams *hp = be->hp;
    int64_t d = hp->n_embd, H = hp->n_head, hd = hp->head_dim, rd = hp->rope_dim, ql = hp->q_lora;
    const double *freq = ls->ratio ? be->freq_yarn : be->freq_plain;
    float eps = hp->rms_eps;
    cudaStream_t s = be->s;

    bool fused = n == 1 && be->hc_fused;
    if (fused) {   /* the previous layer's FFN post (and moe sum) is pending, except before layer 0 */
        const ds4_layer *P = L == be->m->layers ? NULL : L - 1;
        hc_step(be, be->X, &L->hc_attn_fn, &L->hc_attn_scale, &L->hc_attn_base, &L->attn_norm, false,
                P ? &P->hc_ffn_scale : NULL, P ? &P->hc_ffn_base : NULL, true);
    } else {
        hc_pre(be, be->X, n, &L->hc_attn_fn, &L->hc_attn_scale, &L->hc_attn_base, &L->attn_norm, false);
    }
    prep(be, 0, be->nrm, n, d);
    /* q_a and the K=V rows (one token: one launch, both read nrm). A chunk
     * of at most keep_raw − window + 1 tokens overwrites only ring slots of
     * positions before every window it reads, so its rows go straight into
     * the ring; a longer one is stored after attention. Projected before q_b
     * so that q_a's norm and the rows' post-processing share one launch: a
     * chunk's k_qa_kv, or decode's q_b launch (k_qb) itself, which then reads
     * the raw q_a from row 1 of the chunk scratch (a decode step uses row 0;
     * the scratch holds ≥ MIN_CHUNK rows) and writes the normed one to row 0. */
    bool direct = n + hp->window - 1 <= st->keep_raw, qb = n == 1 && qb_fits(&L->attn_q_b, ql, hd, rd);
    float *qraw = qb ? be->qa + ql : be->qa;
    if (n == 1 && q8x_fits(&L->attn_q_a, &L->attn_kv)) {
        launch_q8x(s, DW(be, &L->attn_q_a), ql, qraw, DW(be, &L->attn_kv), hd, be->kvc, d, be->nrm);
    } else {
        mul(be, &L->attn_q_a, 0, be->nrm, n, qraw, ql);
        mul(be, &L->attn_kv, 0, be->nrm, n, be->kvc, hd);
    }
    if (qb) {
        launch_qb(s, DW(be, &L->attn_q_b), L->attn_q_b.ne[1], qraw, DF(be, &L->attn_q_a_norm), ql, be->qa, be->q, be->kvc,
                  DF(be, &L->attn_kv_a_norm), hd, rd, freq, (const dstep *)be->step, eps, direct ? ls->raw : NULL,
                  st->keep_raw);
    } else {
        launch(k_qa_kv, (unsigned)(2 * n), nthreads(ql > hd ? ql : hd), hd * sizeof(float), s, be->qa,
               DF(be, &L->attn_q_a_norm), (int)ql, be->kvc, DF(be, &L->attn_kv_a_norm), (int)hd, (int)rd, freq,
               (const dstep *)be->step, eps, direct ? ls->raw : NULL, st->keep_raw, (int)n);
        prep(be, 1, be->qa, n, ql);
        mul(be, &L->attn_q_b, 1, be->qa, n, be->q, H * hd);
    }
    /* Query heads: k_att_split norms and ropes its own (rd % 4 = 0), the
     * chunk kernels (attn_chunk) read them finished. */
    bool chunk = n > 1 && be->fast_attn, qfused = !chunk && rd % 4 == 0;
    if (!qfused)
        launch(k_q_heads, dim3((unsigned)((H + QH_HEADS - 1) / QH_HEADS), (unsigned)n), 32 * QH_HEADS, rd * sizeof(float),
               s, be->q, (int)H, (int)hd, (int)rd, freq, be->step, eps);
    if (ls->ratio && !(n == 1 && comp_decode(be, st, L, ls, p0, select, freq))) {
        compress(be, n, &L->comp_kv, &L->comp_gate, &L->comp_ape, &L->comp_norm, ls->ratio, ls->lanes, (int)hd, be->ck,
                 be->cg, ls->ckv, ls->cgate, ls->keep_c, ls->comp, freq, false);
        if (ls->ratio == 4) indexer(be, st, L, ls, n, p0, select, freq);
    }
    float scale = (float)(1.0 / sqrt((double)hd));
    if (chunk)
        attn_chunk(s, be->q, be->kvc, ls->raw, st->keep_raw, hp->window, ls->comp, be->sel, ls->ratio,
                   (int64_t)hp->idx_top_k, DF(be, &L->attn_sinks), (int)H, (int)hd, (int)rd, freq, scale, p0, n, be->o,
                   st->a16);
    else for (int64_t t0 = 0; t0 < n; t0 += st->att_rows) {
        int64_t c = n - t0 < st->att_rows ? n - t0 : st->att_rows;
        attend(s, be->q + t0 * H * hd, qfused ? eps : -1.0f, be->o + t0 * H * hd, be->kvc, ls->raw, st->keep_raw, be->step, be->step + t0,
               hp->window, ls->comp, be->sel + t0 * hp->idx_top_k, ls->ratio, (int64_t)hp->idx_top_k,
               DF(be, &L->attn_sinks), (int)H, (int)hd, (int)rd, freq, scale, c, st->att);
    }
    if (!direct) {
        int64_t ns = n < (int64_t)st->keep_raw ? n : (int64_t)st->keep_raw;
        launch(k_raw_store, (unsigned)ns, 128, 0, s, be->kvc, (int)hd, be->step, n, ls->raw, st->keep_raw);
    }

    /* Grouped low-rank output: group g's rows read heads g·H/G … concatenated. */
    int64_t G = hp->o_groups, gl = hp->o_lora, span = (H / G) * hd;
    if (n == 1) {
        matvec_g(be, &L->attn_output_a, be->o, gl, span, be->low);
    } else {
        prep(be, 1, be->o, n, H * hd);
        mm_w w = mmw(be, &L->attn_output_a);
        mm_dense_groups(s, &w, G, gl, be->xh[1], be->xs[1], H * hd, span, n, be->low, G * gl);
    }
    prep(be, 1, be->low, n, G * gl);
    mul(be, &L->attn_output_b, 1, be->low, n, be->y, d);
    if (!fused) hc_post(be, n, false, NULL, NULL);   /* fused: in the FFN's HC step */
}

static void ffn_layer(gpu_backend *be, const ds4_layer *L, int64_t n, float clamp) {
    const ds4_hparams *hp = be->hp;
    int64_t d = hp->n_embd, E = hp->n_expert, used = hp->n_expert_used, ff = hp->expert_ff;
    int64_t ffs = L->gate_shexp.ne[1];
    cudaStream_t s = be->s;
    bool fused = n == 1 && be->hc_fused;
    if (fused) {   /* with the attention's post */
        hc_step(be, be->X, &L->hc_ffn_fn, &L->hc_ffn_scale, &L->hc_ffn_base, &L->ffn_norm, false, &L->hc_attn_scale,
                &L->hc_attn_base, false);
    } else {
        hc_pre(be, be->X, n, &L->hc_ffn_fn, &L->hc_ffn_scale, &L->hc_ffn_base, &L->ffn_norm, false);
    }
    prep(be, 0, be->nrm, n, d);
    const ds4_tensor *ri = &L->ffn_gate_inp;
    const float *bias = L->exp_probs_b.data ? DF(be, &L->exp_probs_b) : NULL;
    /* decode: the shared expert's gate+up rides in the router launch where it fits */
    bool sh = false;
    if (n == 1 && (ri->type == GGML_F16 || ri->type == GGML_F32) && d % 8 == 0 && d <= RT_MAX_IN) {
        sh = sh_fits(&L->gate_shexp, &L->up_shexp);
        launch_router(s, (int)ri->type, DW(be, ri), ri->row_bytes, d, be->nrm, be->rl, (int)E, (int)used,
                      DW(be, &L->tid2eid), L->tid2eid.row_bytes, be->step, bias, hp->expert_weights_norm,
                      hp->expert_weights_scale, be->eid, be->ew, sh ? DW(be, &L->gate_shexp) : NULL,
                      sh ? DW(be, &L->up_shexp) : NULL, ffs, be->sg, clamp);
    } else {
        mul(be, ri, 0, be->nrm, n, be->rl, E);
        launch(k_router, (unsigned)n, 256, ROUTER_SMEM(E), s, be->rl, (int)E, (int)used, DW(be, &L->tid2eid),
               L->tid2eid.row_bytes, be->step, bias, hp->expert_weights_norm, hp->expert_weights_scale, be->eid, be->ew);
    }
    if (n == 1) {
        /* The shared expert first: the routed products then find the routing
         * and x written two launches back and start before their wait
         * (k_mv_tc's pre). The shared down as k_mv_q8x: its weights are in
         * flight before its wait, beside the router launch's tail. */
        const ds4_tensor *sd = &L->down_shexp;
        if (!sh) glu(be, &L->gate_shexp, &L->up_shexp, false, be->nrm, be->sg, clamp);
        if (q8x_fits(sd, sd)) launch_q8x(s, DW(be, sd), sd->ne[1], be->y, DW(be, sd), 0, NULL, sd->ne[0], be->sg);
        else matvec(be, sd, be->sg, be->y);
        glu(be, &L->gate_exps, &L->up_exps, true, be->nrm, be->ge, clamp);
        matvec_experts(be, &L->down_exps, be->ge, ff, be->eout, d);
    } else {
        /* Routed: assignments sorted by expert, each expert's tokens one
         * product; ge rows in sorted order, eout rows by (token, slot). */
        mm_w wg = mmw(be, &L->gate_exps), wu = mmw(be, &L->up_exps), wd = mmw(be, &L->down_exps);
        mm_route_build(s, &be->route, be->eid, n);
        mm_experts_glu(s, &wg, &wu, be->xh[0], be->xs[0], d, &be->route, be->ew, clamp, be->ge);
        mm_prep(s, be->ge, ff, n * used, ff, be->gh, be->gs);
        mm_experts_down(s, &wd, be->gh, be->gs, &be->route, be->eout, d);
        mul(be, &L->gate_shexp, 0, be->nrm, n, be->sg, ffs);
        mul(be, &L->up_shexp, 0, be->nrm, n, be->su, ffs);
        launch(k_swiglu, (unsigned)((n * ffs + 255) / 256), 256, 0, s, be->sg, be->su, n * ffs, clamp);
        prep(be, 1, be->sg, n, ffs);
        mul(be, &L->down_shexp, 1, be->sg, n, be->y, d);
    }
    /* fused decode: the moe sum and post go into the next layer's HC step */
    if (!fused) hc_post(be, n, true, NULL, NULL);
    else if (L == be->m->layers + hp->n_layer - 1) hc_post(be, n, true, &L->hc_ffn_scale, &L->hc_ffn_base);
}

/* Logits of the n states at X into be->logits (n ≤ HEAD_ROWS). */
static void head(gpu_backend *be, const float *X, int64_t n) {
    const ds4_model *m = be->m;
    const ds4_hparams *hp = be->hp;
    if (n == 1 && be->hc_fused) {
        hc_step(be, (float *)X, &m->out_hc_fn, &m->out_hc_scale, &m->out_hc_base, &m->out_norm, true, NULL, NULL,
                false);
    } else {
        hc_pre(be, X, n, &m->out_hc_fn, &m->out_hc_scale, &m->out_hc_base, &m->out_norm, true);
    }
    prep(be, 0, be->nrm, n, hp->n_embd);
    mul(be, &m->output, 0, be->nrm, n, be->logits, hp->n_vocab);
}

/* Host counters once the state holds end positions (what the kernels just
 * did: every block completed by then has been emitted). */
static void book(gpu_state *st, uint32_t end) {
    for (int l = 0; l < st->n_layer; l++) {
        gpu_layer *ls = &st->L[l];
        if (end > st->keep_raw && end - st->keep_raw > ls->lo_raw) ls->lo_raw = end - st->keep_raw;
        if (!ls->ratio) continue;
        ls->n_comp = end / (uint32_t)ls->ratio;
        if (end > ls->keep_c && end - ls->keep_c > ls->lo_c) ls->lo_c = end - ls->keep_c;
        if (ls->ratio != 4) continue;
        ls->n_idx = end / 4;
        if (end > ls->keep_i && end - ls->keep_i > ls->lo_i) ls->lo_i = end - ls->keep_i;
    }
}

/* Every kernel of a chunk's layers (embedding → last FFN). */
static void launch_body(gpu_backend *be, gpu_state *st, int64_t n, uint32_t p0, bool select) {
    const ds4_hparams *hp = be->hp;
    const ds4_tensor *te = &be->m->tok_embd;
    launch(k_embed, dim3((unsigned)((hp->n_embd / 8 + 127) / 128), (unsigned)n), 128, 0, be->s,
        (int)te->type, DW(be, te), te->row_bytes, be->step, hp->n_embd, be->X, (int)hp->hc_count);
    for (int l = 0; l < st->n_layer; l++) {
        attn_layer(be, st, &be->m->layers[l], &st->L[l], n, p0, select);
        ffn_layer(be, &be->m->layers[l], n, hp->swiglu_clamp[l]);
    }
}

/* Decode: capture (once) and launch a graph of one token's body (what =
 * select) or of the head (what = 2); eager launches when graphs are off. */
static cudaError_t run_graph(gpu_backend *be, cudaGraphExec_t *exec, gpu_state *st, int what) {
    if (!be->graphs) {
        if (what == 2) head(be, be->X, 1); else launch_body(be, st, 1, st->n, what == 1);
        return cudaGetLastError();
    }
    if (!*exec) {
        cudaGraph_t g;
        cudaError_t e = cudaStreamBeginCapture(be->s, cudaStreamCaptureModeThreadLocal);
        if (e) return e;
        if (what == 2) head(be, be->X, 1); else launch_body(be, st, 1, st->n, what == 1);
        e = cudaStreamEndCapture(be->s, &g);
        if (e) return e;
        e = cudaGraphInstantiate(exec, g, 0);
        cudaGraphDestroy(g);
        if (e) { *exec = NULL; return e; }
    }
    return cudaGraphLaunch(*exec, be->s);
}

/* eval_top's argmax of one row x of n logits into pi[TOP_BLOCKS], the row
 * copied into keep on the way (pv, pi: TOP_BLOCKS partials). */
static void launch_top(cudaStream_t s, const float *x, int n, float *keep, float *pv, int32_t *pi) {
    launch(k_top_part, TOP_BLOCKS, TOP_THREADS, 0, s, x, n, keep, pv, pi);
    launch(k_top_final, 1, TOP_BLOCKS, 0, s, pv, pi, pi + TOP_BLOCKS);
}

/* One token (decode: the captured graphs) or chunks of up to be->chunk
 * tokens, each layer by layer over the whole chunk (prefill). The last
 * token's logits go to the host (logits), or stay in st->last with their
 * argmax in *top (eval_top); neither: the body alone (diagnostics). */
static int eval_chunks(gpu_backend *be, gpu_state *st, const int32_t *ids, size_t n, float *logits, bool all_logits,
                       int32_t *top, char *err, size_t errlen) {
    const ds4_hparams *hp = be->hp;
    if (n == 0) return 0;
    if (n > st->ctx - st->n) return ds4_errf(err, errlen, "context full: %u + %zu tokens > %u", st->n, n, st->ctx);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= hp->n_vocab)
            return ds4_errf(err, errlen, "token id %d out of range (vocab %u)", ids[i], hp->n_vocab);
    int64_t zw = (int64_t)hp->hc_count * hp->n_embd;
    for (size_t t0 = 0; t0 < n; t0 += (size_t)be->chunk) {
        int64_t c = n - t0 < (size_t)be->chunk ? (int64_t)(n - t0) : be->chunk;
        uint32_t p0 = st->n;
        /* The step inputs of the chunk; the pinned buffer is rewritten only
         * after the previous chunk's copy ran (the stream is idle here). */
        for (int64_t t = 0; t < c; t++) {
            be->hstep[t].pos = p0 + (uint32_t)t;
            be->hstep[t].tok = ids[t0 + t];
        }
        CK(cudaMemcpyAsync(be->step, be->hstep, c * sizeof(dstep), cudaMemcpyHostToDevice, be->s));
        bool select = (p0 + c) / 4 > hp->idx_top_k;
        if (c == 1) CK(run_graph(be, &st->body[select], st, select));
        else launch_body(be, st, c, p0, select);
        CK(cudaGetLastError());
        book(st, p0 + (uint32_t)c);
        st->n += (uint32_t)c;
        /* Logits of the last token, or of every token in HEAD_ROWS batches. */
        bool want = (logits || top) && (all_logits || t0 + (size_t)c == n);
        for (int64_t h0 = all_logits ? 0 : c - 1; want && h0 < c; h0 += HEAD_ROWS) {
            int64_t nh = c - h0 < HEAD_ROWS ? c - h0 : HEAD_ROWS;
            if (c == 1) CK(run_graph(be, &be->head_exec, NULL, 2));
            else head(be, be->X + h0 * zw, nh);
            if (logits) {
                CK(cudaMemcpyAsync(logits + (all_logits ? (t0 + h0) * hp->n_vocab : 0), be->logits,
                                   nh * hp->n_vocab * sizeof(float), cudaMemcpyDeviceToHost, be->s));
                continue;
            }
            /* eval_top (never all_logits: one row): 4 bytes come back. */
            launch_top(be->s, be->logits, (int)hp->n_vocab, st->last, be->top_v, be->top_i);
            CK(cudaMemcpyAsync(be->htop, be->top_i + TOP_BLOCKS, sizeof(int32_t), cudaMemcpyDeviceToHost, be->s));
        }
        CK(cudaStreamSynchronize(be->s));
        if (want && !logits) *top = *be->htop;
    }
    CK(cudaGetLastError());
    return 0;
}

static int cuda_eval(void *b, void *st, const int32_t *ids, size_t n, float *logits, bool all_logits, char *err,
                     size_t errlen) {
    return eval_chunks((gpu_backend *)b, (gpu_state *)st, ids, n, logits, all_logits, NULL, err, errlen);
}

static int cuda_eval_top(void *b, void *st, const int32_t *ids, size_t n, int32_t *top, char *err, size_t errlen) {
    return eval_chunks((gpu_backend *)b, (gpu_state *)st, ids, n, NULL, false, top, err, errlen);
}

static int cuda_last_logits(void *b, const void *stp, float *out, char *err, size_t errlen) {
    gpu_backend *be = (gpu_backend *)b;
    const gpu_state *st = (const gpu_state *)stp;
    CK(cudaMemcpyAsync(out, st->last, be->hp->n_vocab * sizeof(float), cudaMemcpyDeviceToHost, be->s));
    CK(cudaStreamSynchronize(be->s));
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
    cuda_mem_free, cuda_eval_step, cuda_host_alloc, cuda_host_free, cuda_eval_top, cuda_last_logits,
};

/* ---- kernel checks for tools/ds4-gpucheck ------------------------------------------------- */

extern "C" void ds4_cuda_profiler(bool on) {
    if (on) cudaProfilerStart(); else cudaProfilerStop();
}

static void poison(void *d, size_t bytes) { cudaMemset(d, 0xff, bytes); }   /* 0xffffffff is a NaN */

/* cudaMalloc + upload of `bytes` (at least one element so a NULL-free pointer exists). */
static cudaError_t at_upload(void **d, const void *h, size_t bytes) {
    cudaError_t e = cudaMalloc(d, bytes ? bytes : 16);
    if (!e && h && bytes) e = cudaMemcpy(*d, h, bytes, cudaMemcpyHostToDevice);
    return e;
}

static bool tables_loaded;

static int iq2_tables(void) {
    if (tables_loaded) return 0;
    cudaError_t e = cudaMemcpyToSymbol(d_iq2_grid, ds4_iq2xxs_grid, sizeof ds4_iq2xxs_grid);
    if (!e) e = cudaMemcpyToSymbol(d_iq2_signs, ds4_ksigns_iq2xs, sizeof ds4_ksigns_iq2xs);
    tables_loaded = !e;
    return e ? -1 : 0;
}

/* n slabs of M rows × K of `type` (host, GGUF layout) on the device, repacked
 * slab by slab as at upload. */
static cudaError_t test_upload(uint32_t type, const void *w, int64_t K, int64_t M, int64_t n, uint8_t **dw) {
    uint64_t slab = ggml_row_bytes(type, (uint64_t)K) * (uint64_t)M;
    cudaError_t e;
    *dw = NULL;
    if ((e = cudaMalloc((void **)dw, slab * n)) || (e = cudaMemcpy(*dw, w, slab * n, cudaMemcpyHostToDevice))) return e;
    if (!repacked(type)) return cudaSuccess;
    uint8_t *tmp = NULL;
    if ((e = cudaMalloc((void **)&tmp, slab))) return e;
    for (int64_t i = 0; i < n && !e; i++)
        if (!(e = repack_slab(0, type, *dw + i * slab, tmp, K, M))) e = cudaDeviceSynchronize();
    cudaFree(tmp);
    return e;
}

extern "C" int ds4_cuda_test_matvec(int type, const void *w, int64_t n_in, int64_t n_rows, const float *x, float *y,
                                    char *err, size_t errlen) {
    uint64_t rb = ggml_row_bytes((uint32_t)type, (uint64_t)n_in);
    if (!rb || n_in % 8) return ds4_errf(err, errlen, "matvec: bad type %d / row %lld", type, (long long)n_in);
    if (iq2_tables()) return ds4_errf(err, errlen, "matvec: iq2 tables");
    uint8_t *dw = NULL;
    float *dx = NULL, *dy = NULL;
    int rc = -1;
    cudaError_t e;
    if ((e = test_upload((uint32_t)type, w, n_in, n_rows, 1, &dw)) || (e = cudaMalloc((void **)&dx, n_in * sizeof(float))) ||
        (e = cudaMalloc((void **)&dy, n_rows * sizeof(float))) ||
        (e = cudaMemcpy(dx, x, n_in * sizeof(float), cudaMemcpyHostToDevice))) goto out;
    poison(dy, n_rows * sizeof(float));
    if (repacked((uint32_t)type)) {   /* repacked by test_upload, as at upload */
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

/* Two Q8_0 matrices of one x as decode's q_a + kv launch (k_mv_q8x). */
extern "C" int ds4_cuda_test_matvec2(const void *wa, int64_t ra, const void *wb, int64_t rb, int64_t n_in,
                                     const float *x, float *ya, float *yb, char *err, size_t errlen) {
    if (n_in < 32 || n_in % 32 || n_in * 4 > RP_SX_MAX || ra < 1 || rb < 1)
        return ds4_errf(err, errlen, "matvec2: bad shape %lld, %lld + %lld rows", (long long)n_in, (long long)ra,
                        (long long)rb);
    uint8_t *da = NULL, *db = NULL;
    float *dx = NULL, *dy = NULL;
    cudaError_t e;
    if ((e = test_upload(GGML_Q8_0, wa, n_in, ra, 1, &da)) || (e = test_upload(GGML_Q8_0, wb, n_in, rb, 1, &db)) ||
        (e = cudaMalloc((void **)&dx, n_in * sizeof(float))) || (e = cudaMalloc((void **)&dy, (ra + rb) * sizeof(float))) ||
        (e = cudaMemcpy(dx, x, n_in * sizeof(float), cudaMemcpyHostToDevice)))
        goto out;
    poison(dy, (ra + rb) * sizeof(float));
    launch_q8x(0, da, ra, dy, db, rb, dy + ra, n_in, dx);
    if (!(e = cudaGetLastError()) && !(e = cudaMemcpy(ya, dy, ra * sizeof(float), cudaMemcpyDeviceToHost)))
        e = cudaMemcpy(yb, dy + ra, rb * sizeof(float), cudaMemcpyDeviceToHost);
out:
    cudaFree(da); cudaFree(db); cudaFree(dx); cudaFree(dy);
    return e ? ds4_errf(err, errlen, "matvec2: %s", cudaGetErrorString(e)) : 0;
}

/* Decode's q_b launch with k_qa_kv's work (k_qb) against the launches it
 * replaces (k_qa_kv for one token, then q_b through launch_rp), on the same
 * inputs, every output poisoned before each path. *_ref: the old path. */
extern "C" int ds4_cuda_test_qb(const void *w, int64_t rows, int64_t ql, int64_t hd, int rd, const float *qraw,
                                const float *kvraw, const float *qw, const float *kw, const double *freq, uint32_t pos,
                                float eps, uint32_t keep, float *y_ref, float *qa_ref, float *kv_ref, float *ring_ref,
                                float *y, float *qa, float *kv, float *ring, char *err, size_t errlen) {
    ds4_tensor T = {};
    T.type = GGML_Q8_0;
    T.ne[0] = ql;
    T.ne[1] = rows;
    if (rows < 1 || keep < 1 || !qb_fits(&T, ql, hd, rd))
        return ds4_errf(err, errlen, "qb: bad shape %lld x %lld, hd %lld, rd %d", (long long)rows, (long long)ql,
                        (long long)hd, rd);
    uint8_t *dw = NULL;
    float *dq = NULL, *dqa = NULL, *dkv = NULL, *dy = NULL, *dr = NULL, *dn[2] = {NULL, NULL};
    void *df = NULL, *ds = NULL;
    dstep hs = {pos, 0};
    size_t rbytes = (size_t)keep * hd * sizeof(float), fs = sizeof(float);
    float *outs[2][4] = {{y_ref, qa_ref, kv_ref, ring_ref}, {y, qa, kv, ring}};
    cudaError_t e;
    if ((e = test_upload(GGML_Q8_0, w, ql, rows, 1, &dw)) || (e = at_upload((void **)&dq, qraw, ql * fs)) ||
        (e = at_upload((void **)&dqa, NULL, ql * fs)) || (e = at_upload((void **)&dkv, NULL, hd * fs)) ||
        (e = at_upload((void **)&dy, NULL, rows * fs)) || (e = at_upload((void **)&dr, NULL, rbytes)) ||
        (e = at_upload((void **)&dn[0], qw, ql * fs)) || (e = at_upload((void **)&dn[1], kw, hd * fs)) ||
        (e = at_upload(&df, freq, (rd / 2) * sizeof(double))) || (e = at_upload(&ds, &hs, sizeof hs)))
        goto out;
    for (int path = 0; path < 2 && !e; path++) {
        poison(dqa, ql * fs);
        poison(dy, rows * fs);
        poison(dr, rbytes);
        if ((e = cudaMemcpy(dkv, kvraw, hd * fs, cudaMemcpyHostToDevice))) break;
        if (path == 0) {   /* attn_layer's path before k_qb: q_a normed into its own buffer, then q_b */
            if ((e = cudaMemcpy(dqa, dq, ql * fs, cudaMemcpyDeviceToDevice))) break;
            launch(k_qa_kv, 2u, nthreads(ql > hd ? ql : hd), hd * fs, 0, dqa, (const float *)dn[0], (int)ql, dkv,
                   (const float *)dn[1], (int)hd, rd, (const double *)df, (const dstep *)ds, eps, dr, keep, 1);
            launch_rp(GGML_Q8_0, 0, dw, NULL, ql, rows, dqa, 0, 0, dy, NULL, 0, 0, 0, 1, NULL, 0);
        } else {
            launch_qb(0, dw, rows, dq, dn[0], ql, dqa, dy, dkv, dn[1], hd, rd, (const double *)df, (const dstep *)ds, eps,
                      dr, keep);
        }
        float **o = outs[path];
        if ((e = cudaGetLastError()) || (e = cudaMemcpy(o[0], dy, rows * fs, cudaMemcpyDeviceToHost)) ||
            (e = cudaMemcpy(o[1], dqa, ql * fs, cudaMemcpyDeviceToHost)) ||
            (e = cudaMemcpy(o[2], dkv, hd * fs, cudaMemcpyDeviceToHost)))
            break;
        e = cudaMemcpy(o[3], dr, rbytes, cudaMemcpyDeviceToHost);
    }
out:
    cudaFree(dw); cudaFree(dq); cudaFree(dqa); cudaFree(dkv); cudaFree(dy); cudaFree(dr);
    cudaFree(dn[0]); cudaFree(dn[1]); cudaFree(df); cudaFree(ds);
    return e ? ds4_errf(err, errlen, "qb: %s", cudaGetErrorString(e)) : 0;
}

/* One repacked matrix times grouped x through launch_rp, as matvec_g. */
extern "C" int ds4_cuda_test_matvec_g(int type, const void *w, int64_t n_in, int64_t rows, int groups, const float *x,
                                      float *y, int nr, char *err, size_t errlen) {
    if (!repacked((uint32_t)type) || !ggml_row_bytes((uint32_t)type, (uint64_t)n_in) || groups < 1 || rows % groups)
        return ds4_errf(err, errlen, "matvec_g: bad type %d / shape", type);
    uint8_t *dw = NULL;
    float *dx = NULL, *dy = NULL;
    cudaError_t e;
    if ((e = test_upload((uint32_t)type, w, n_in, rows, 1, &dw)) ||
        (e = cudaMalloc((void **)&dx, groups * n_in * sizeof(float))) || (e = cudaMalloc((void **)&dy, rows * sizeof(float))) ||
        (e = cudaMemcpy(dx, x, groups * n_in * sizeof(float), cudaMemcpyHostToDevice)))
        goto out;
    poison(dy, rows * sizeof(float));
    launch_rp((uint32_t)type, 0, dw, NULL, n_in, rows, dx, groups > 1 ? rows / groups : 0, n_in, dy, NULL, 0, 0, 0, 1,
              NULL, 0, nr);
    if (!(e = cudaGetLastError())) e = cudaMemcpy(y, dy, rows * sizeof(float), cudaMemcpyDeviceToHost);
out:
    cudaFree(dw); cudaFree(dx); cudaFree(dy);
    return e ? ds4_errf(err, errlen, "matvec_g: %s", cudaGetErrorString(e)) : 0;
}

/* Routed slots as the decode step launches them (glu() / matvec_experts()):
 * E slabs of rows × n_in, slot i multiplies expert eid[i]. */
extern "C" int ds4_cuda_test_matvec_slots(int type, const void *wg, const void *wu, int64_t n_in, int64_t rows, int E,
                                          int used, const int32_t *eid, const float *ew, float clamp, const float *x,
                                          float *y, int nr, char *err, size_t errlen) {
    uint64_t slab = ggml_row_bytes((uint32_t)type, (uint64_t)n_in) * (uint64_t)rows;
    if (!repacked((uint32_t)type) || !slab || E < 1 || used < 1 || used > E)
        return ds4_errf(err, errlen, "matvec slots: bad type %d / shape", type);
    for (int i = 0; i < used; i++)
        if (eid[i] < 0 || eid[i] >= E) return ds4_errf(err, errlen, "matvec slots: expert id %d", eid[i]);
    if (iq2_tables()) return ds4_errf(err, errlen, "matvec slots: iq2 tables");
    uint8_t *dg = NULL, *du = NULL;
    float *dx = NULL, *dy = NULL, *dew = NULL;
    int32_t *deid = NULL;
    int64_t nx = wu ? n_in : used * n_in;   /* GLU: one x for every slot; down: x per slot */
    cudaError_t e;
    if ((e = test_upload((uint32_t)type, wg, n_in, rows, E, &dg)) ||
        (wu && (e = test_upload((uint32_t)type, wu, n_in, rows, E, &du))) ||
        (e = cudaMalloc((void **)&dx, nx * sizeof(float))) || (e = cudaMalloc((void **)&dy, used * rows * sizeof(float))) ||
        (e = cudaMalloc((void **)&dew, used * sizeof(float))) || (e = cudaMalloc((void **)&deid, used * sizeof(int32_t))) ||
        (e = cudaMemcpy(dx, x, nx * sizeof(float), cudaMemcpyHostToDevice)) ||
        (e = cudaMemcpy(dew, ew, used * sizeof(float), cudaMemcpyHostToDevice)) ||
        (e = cudaMemcpy(deid, eid, used * sizeof(int32_t), cudaMemcpyHostToDevice)))
        goto out;
    poison(dy, used * rows * sizeof(float));
    launch_rp((uint32_t)type, 0, dg, du, n_in, rows, dx, 0, 0, dy, deid, slab, wu ? 0 : n_in, rows, used, wu ? dew : NULL,
              clamp, nr, wu ? 2 : 1);   /* k_mv_tc's early reads as decode runs them (glu, matvec_experts) */
    if (!(e = cudaGetLastError())) e = cudaMemcpy(y, dy, used * rows * sizeof(float), cudaMemcpyDeviceToHost);
out:
    cudaFree(dg); cudaFree(du); cudaFree(dx); cudaFree(dy); cudaFree(dew); cudaFree(deid);
    return e ? ds4_errf(err, errlen, "matvec slots: %s", cudaGetErrorString(e)) : 0;
}

/* The router launch (+ the shared expert's gate+up) and the shared down, as
 * ffn_layer launches them for one token. */
extern "C" int ds4_cuda_test_router_shared(const void *wr, int E, int used, const float *bias, bool norm, float wscale,
                                           const void *wg, const void *wu, const void *wd, int64_t ff, int64_t n_in,
                                           const float *x, float clamp, int32_t *eid, float *ew, float *sg, float *y,
                                           char *err, size_t errlen) {
    if (E < 1 || used < 1 || used > E || used > 64 || n_in < 32 || n_in % 32 || n_in > RT_MAX_IN ||
        (wg && (ff < 1 || ff % 32 || ff * 4 > RP_SX_MAX || n_in * 4 > RP_SX_MAX)))
        return ds4_errf(err, errlen, "router: bad shape E %d used %d, %lld x %lld", E, used, (long long)ff,
                        (long long)n_in);
    uint64_t rb = ggml_row_bytes(GGML_F16, (uint64_t)n_in);
    uint8_t *dr = NULL, *dg = NULL, *du = NULL, *dd = NULL;
    float *df = NULL;
    int32_t *deid = NULL;
    dstep *dst = NULL;
    dstep st0 = {0, 0};
    /* floats: x n_in | sg ff | y n_in | logits E | bias E | ew used (x, sg, y are read as float4: 16-byte aligned) */
    int64_t nf = n_in + 2 * E + used + ff + n_in;
    cudaError_t e;
    if ((e = cudaMalloc((void **)&dr, rb * E)) || (e = cudaMemcpy(dr, wr, rb * E, cudaMemcpyHostToDevice)) ||
        (wg && ((e = test_upload(GGML_Q8_0, wg, n_in, ff, 1, &dg)) || (e = test_upload(GGML_Q8_0, wu, n_in, ff, 1, &du)) ||
                (e = test_upload(GGML_Q8_0, wd, ff, n_in, 1, &dd)))) ||
        (e = cudaMalloc((void **)&df, nf * sizeof(float))) || (e = cudaMalloc((void **)&deid, used * sizeof(int32_t))) ||
        (e = cudaMalloc((void **)&dst, sizeof st0)) || (e = cudaMemcpy(dst, &st0, sizeof st0, cudaMemcpyHostToDevice)))
        goto out;
    {
        float *dx = df, *dsg = dx + n_in, *dy = dsg + ff, *dl = dy + n_in, *db = dl + E, *dew = db + E;
        if ((e = cudaMemcpy(dx, x, n_in * sizeof(float), cudaMemcpyHostToDevice)) ||
            (bias && (e = cudaMemcpy(db, bias, E * sizeof(float), cudaMemcpyHostToDevice))))
            goto out;
        poison(dsg, (ff + n_in + E) * sizeof(float));   /* sg, y, logits */
        poison(dew, used * sizeof(float));
        poison(deid, used * sizeof(int32_t));
        launch_router(0, GGML_F16, dr, rb, n_in, dx, dl, E, used, NULL, 0, dst, bias ? db : NULL, norm, wscale, deid, dew,
                      dg, du, ff, dsg, clamp);
        if (wg) launch_q8x(0, dd, n_in, dy, dd, 0, NULL, ff, dsg);
        if ((e = cudaGetLastError()) || (e = cudaMemcpy(eid, deid, used * sizeof(int32_t), cudaMemcpyDeviceToHost)) ||
            (e = cudaMemcpy(ew, dew, used * sizeof(float), cudaMemcpyDeviceToHost)))
            goto out;
        if (wg && !(e = cudaMemcpy(sg, dsg, ff * sizeof(float), cudaMemcpyDeviceToHost)))
            e = cudaMemcpy(y, dy, n_in * sizeof(float), cudaMemcpyDeviceToHost);
    }
out:
    cudaFree(dr); cudaFree(dg); cudaFree(du); cudaFree(dd); cudaFree(df); cudaFree(deid); cudaFree(dst);
    return e ? ds4_errf(err, errlen, "router: %s", cudaGetErrorString(e)) : 0;
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

extern "C" int ds4_cuda_test_top(const float *x, int n, float *keep, int32_t *top, char *err, size_t errlen) {
    float *dx = NULL, *dk = NULL, *pv = NULL;
    int32_t *pi = NULL;
    cudaError_t e;
    if (!(e = cudaMalloc((void **)&dx, n * sizeof(float))) && !(e = cudaMalloc((void **)&dk, n * sizeof(float))) &&
        !(e = cudaMalloc((void **)&pv, TOP_BLOCKS * sizeof(float))) &&
        !(e = cudaMalloc((void **)&pi, (TOP_BLOCKS + 1) * sizeof(int32_t))) &&
        !(e = cudaMemcpy(dx, x, n * sizeof(float), cudaMemcpyHostToDevice))) {
        cudaMemset(dk, 0xff, n * sizeof(float));              /* NaN: an unwritten copy is visible */
        cudaMemset(pi + TOP_BLOCKS, 0xff, sizeof(int32_t));   /* −1: so is an unwritten result */
        launch_top(0, dx, n, dk, pv, pi);   /* as eval_top launches it */
        if (!(e = cudaGetLastError()) && !(e = cudaMemcpy(keep, dk, n * sizeof(float), cudaMemcpyDeviceToHost)))
            e = cudaMemcpy(top, pi + TOP_BLOCKS, sizeof(int32_t), cudaMemcpyDeviceToHost);
    }
    cudaFree(dx); cudaFree(dk); cudaFree(pv); cudaFree(pi);
    return e ? ds4_errf(err, errlen, "top: %s", cudaGetErrorString(e)) : 0;
}

extern "C" int ds4_cuda_test_topk(const float *score, int64_t n, int64_t k, int32_t *out, char *err, size_t errlen) {
    if (k < 1 || k > n) return ds4_errf(err, errlen, "topk: bad k %lld of %lld", (long long)k, (long long)n);
    float *ds = NULL;
    int32_t *dout = NULL;
    cudaError_t e;
    if (!(e = cudaMalloc((void **)&ds, n * sizeof(float))) && !(e = cudaMalloc((void **)&dout, k * sizeof(int32_t))) &&
        !(e = cudaMemcpy(ds, score, n * sizeof(float), cudaMemcpyHostToDevice))) {
        cudaMemset(dout, 0xff, k * sizeof(int32_t));   /* −1: an unwritten slot is visible */
        k_topk<<<1, 1024>>>(ds, NULL, n, k, dout, 0);
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

extern "C" int ds4_cuda_test_hc_step(int hc, int64_t d, int wtype, const void *w, const float *scale, const float *base,
                                     int iters, float hc_eps, float rms_eps, const float *nw, float *X, const float *pm,
                                     const float *pscale, const float *pbase, const float *y, const float *eout,
                                     int used, bool head, float *mout, float *nrm, char *err, size_t errlen) {
    int64_t zw = (int64_t)hc * d, mw = head ? hc : (2 + hc) * hc, nc = (2 + hc) * hc;
    if ((hc != 1 && hc != 2 && hc != 4) || d % (HS_THREADS / hc) || d > HS_MAX_D ||
        (wtype != GGML_F16 && wtype != GGML_F32) || used < 0 || used > 64)
        return ds4_errf(err, errlen, "hc_step: bad shape");
    if (!hs_coresident(d / (HS_THREADS / hc))) return ds4_errf(err, errlen, "hc_step: blocks not co-resident");
    uint64_t rb = ggml_row_bytes((uint32_t)wtype, (uint64_t)zw);
    /* one allocation: W | nw d | X zw | y d | eout used·d | nrm d | scale 3 | base nc | pm nc | mout nc |
     * pscale 3 | pbase nc (the vectors read as float4 first: d is a multiple of 64, so they stay 16-byte aligned) */
    size_t nf = d + zw + d + (size_t)used * d + d + 3 + 3 * nc + 3 + nc;
    uint8_t *dw = NULL;
    cudaError_t e = cudaMalloc((void **)&dw, rb * mw + nf * sizeof(float));
    if (e) return ds4_errf(err, errlen, "hc_step: %s", cudaGetErrorString(e));
    float *dn = (float *)(dw + rb * mw), *dX = dn + d, *dy = dX + zw, *de = dy + d, *dr = de + used * d, *ds = dr + d,
          *db = ds + 3, *dpm = db + nc, *dc = dpm + nc, *dps = dc + nc, *dpb = dps + 3;
    struct { void *dst; const void *src; size_t bytes; } in[] = {
        {dw, w, rb * mw}, {ds, scale, 3 * sizeof(float)}, {db, base, mw * sizeof(float)}, {dn, nw, d * sizeof(float)},
        {dX, X, zw * sizeof(float)}, {dpm, pm, pm ? nc * sizeof(float) : 0}, {dps, pscale, pm ? 3 * sizeof(float) : 0},
        {dpb, pbase, pm ? nc * sizeof(float) : 0}, {dy, y, pm ? d * sizeof(float) : 0},
        {de, eout, eout ? used * d * sizeof(float) : 0}};
    for (size_t i = 0; !e && i < sizeof in / sizeof *in; i++)
        if (in[i].bytes) e = cudaMemcpy(in[i].dst, in[i].src, in[i].bytes, cudaMemcpyHostToDevice);
    if (!e) {
        poison(dc, nc * sizeof(float));
        poison(dr, d * sizeof(float));
        k_hc_step<<<(unsigned)(d / (HS_THREADS / hc)), HS_BLOCK>>>(
            dX, d, hc, pm ? dpm : NULL, dps, dpb, dy, eout ? de : NULL, used, wtype, dw, rb, (int)mw, ds, db, iters,
            hc_eps, rms_eps, dn, head ? NULL : dc, dr);
        if (!(e = cudaGetLastError()) && !(e = cudaMemcpy(X, dX, zw * sizeof(float), cudaMemcpyDeviceToHost)) &&
            !(e = cudaMemcpy(nrm, dr, d * sizeof(float), cudaMemcpyDeviceToHost)) && !head)
            e = cudaMemcpy(mout, dc, nc * sizeof(float), cudaMemcpyDeviceToHost);
    }
    cudaFree(dw);
    return e ? ds4_errf(err, errlen, "hc_step: %s", cudaGetErrorString(e)) : 0;
}

/* ---- mm tests ---- */

extern "C" int ds4_cuda_test_mm_prep(const float *x, int64_t ldx, int64_t T, int64_t K, uint16_t *xh, float *xs,
                                     char *err, size_t errlen) {
    if (T < 1 || K < 1 || ldx < K) return ds4_errf(err, errlen, "mm_prep: bad shape");
    float *dx = NULL, *dxs = NULL;
    __half *dxh = NULL;
    cudaError_t e;
    if (!(e = cudaMalloc((void **)&dx, T * ldx * sizeof(float))) && !(e = cudaMalloc((void **)&dxs, T * sizeof(float))) &&
        !(e = cudaMalloc((void **)&dxh, T * K * sizeof(__half))) &&
        !(e = cudaMemcpy(dx, x, T * ldx * sizeof(float), cudaMemcpyHostToDevice))) {
        poison(dxh, T * K * sizeof(__half));
        poison(dxs, T * sizeof(float));
        mm_prep(0, dx, ldx, T, K, dxh, dxs);
        if (!(e = cudaGetLastError()) && !(e = cudaMemcpy(xh, dxh, T * K * sizeof(__half), cudaMemcpyDeviceToHost)))
            e = cudaMemcpy(xs, dxs, T * sizeof(float), cudaMemcpyDeviceToHost);
    }
    cudaFree(dx); cudaFree(dxs); cudaFree(dxh);
    return e ? ds4_errf(err, errlen, "mm_prep: %s", cudaGetErrorString(e)) : 0;
}

extern "C" int ds4_cuda_test_mm_groups(int type, const void *w, int64_t K, int64_t G, int64_t gl, const float *x,
                                       int64_t T, float *y, char *err, size_t errlen) {
    uint64_t rb = ggml_row_bytes((uint32_t)type, (uint64_t)K);
    if (!rb || mm_fmt((uint32_t)type) < 0 || K % 32 || G < 1 || gl < 1 || T < 1)
        return ds4_errf(err, errlen, "mm_groups: bad type %d / shape", type);
    if (iq2_tables()) return ds4_errf(err, errlen, "mm_groups: iq2 tables");
    const int64_t M = G * gl, ldx = G * K;
    uint8_t *dw = NULL;
    float *dx = NULL, *dy = NULL, *dxs = NULL;
    __half *dxh = NULL;
    cudaError_t e;
    if (!(e = test_upload((uint32_t)type, w, K, M, 1, &dw)) && !(e = cudaMalloc((void **)&dx, T * ldx * sizeof(float))) &&
        !(e = cudaMalloc((void **)&dy, T * M * sizeof(float))) && !(e = cudaMalloc((void **)&dxs, T * sizeof(float))) &&
        !(e = cudaMalloc((void **)&dxh, T * ldx * sizeof(__half))) &&
        !(e = cudaMemcpy(dx, x, T * ldx * sizeof(float), cudaMemcpyHostToDevice))) {
        poison(dy, T * M * sizeof(float));
        mm_w W = {(uint32_t)type, dw, K, M, rb};
        mm_prep(0, dx, ldx, T, ldx, dxh, dxs);
        mm_dense_groups(0, &W, G, gl, dxh, dxs, ldx, K, T, dy, M);
        if (!(e = cudaGetLastError())) e = cudaMemcpy(y, dy, T * M * sizeof(float), cudaMemcpyDeviceToHost);
    }
    cudaFree(dw); cudaFree(dx); cudaFree(dy); cudaFree(dxs); cudaFree(dxh);
    return e ? ds4_errf(err, errlen, "mm_groups: %s", cudaGetErrorString(e)) : 0;
}

extern "C" int ds4_cuda_test_mm_dense(int type, const void *w, int64_t K, int64_t M, int64_t r0, int64_t nr,
                                      const float *x, int64_t ldx, int64_t T, float *y, char *err, size_t errlen) {
    const int64_t lead = 32;   /* the product reads xh + lead with row stride K + lead: ldx > K, an offset start */
    uint64_t rb = ggml_row_bytes((uint32_t)type, (uint64_t)K);
    if (!rb || mm_fmt((uint32_t)type) < 0 || K % 32 || ldx < K + lead || r0 < 0 || nr < 1 || r0 + nr > M || T < 1)
        return ds4_errf(err, errlen, "mm_dense: bad type %d / shape", type);
    if (iq2_tables()) return ds4_errf(err, errlen, "mm_dense: iq2 tables");
    uint8_t *dw = NULL;
    float *dx = NULL, *dy = NULL, *dxs = NULL;
    __half *dxh = NULL;
    cudaError_t e;
    if (!(e = test_upload((uint32_t)type, w, K, M, 1, &dw)) && !(e = cudaMalloc((void **)&dx, T * ldx * sizeof(float))) &&
        !(e = cudaMalloc((void **)&dy, T * nr * sizeof(float))) && !(e = cudaMalloc((void **)&dxs, T * sizeof(float))) &&
        !(e = cudaMalloc((void **)&dxh, T * (K + lead) * sizeof(__half))) &&
        !(e = cudaMemcpy(dx, x, T * ldx * sizeof(float), cudaMemcpyHostToDevice))) {
        poison(dy, T * nr * sizeof(float));
        mm_w W = {(uint32_t)type, dw, K, M, rb};
        mm_prep(0, dx, ldx, T, K + lead, dxh, dxs);
        mm_dense(0, &W, r0, nr, dxh + lead, dxs, K + lead, T, dy, nr);
        if (!(e = cudaGetLastError())) e = cudaMemcpy(y, dy, T * nr * sizeof(float), cudaMemcpyDeviceToHost);
    }
    cudaFree(dw); cudaFree(dx); cudaFree(dy); cudaFree(dxs); cudaFree(dxh);
    return e ? ds4_errf(err, errlen, "mm_dense: %s", cudaGetErrorString(e)) : 0;
}

extern "C" int ds4_cuda_test_mm_experts(int tgu, const void *wg, const void *wu, int td, const void *wd, int64_t d,
                                        int64_t ff, int E, int used, int64_t T, const int32_t *eid, const float *ew,
                                        float clamp, const float *x, const float *gin, int32_t *perm, float *g,
                                        float *out, char *err, size_t errlen) {
    if (mm_fmt((uint32_t)tgu) < 0 || mm_fmt((uint32_t)td) < 0 || d % 256 || ff % 256 || E < 1 || used < 1 || T < 1)
        return ds4_errf(err, errlen, "mm_experts: bad types / shape");
    if (iq2_tables()) return ds4_errf(err, errlen, "mm_experts: iq2 tables");
    int64_t n = T * used;
    uint8_t *dg = NULL, *du = NULL, *dd = NULL;
    float *dx = NULL, *dxs = NULL, *dew = NULL, *dgo = NULL, *dgi = NULL, *dgs = NULL, *dout = NULL;
    __half *dxh = NULL, *dgh = NULL;
    int32_t *deid = NULL;
    mm_route r;
    memset(&r, 0, sizeof r);
    cudaError_t e;
    if (!(e = test_upload((uint32_t)tgu, wg, d, ff, E, &dg)) && !(e = test_upload((uint32_t)tgu, wu, d, ff, E, &du)) &&
        !(e = test_upload((uint32_t)td, wd, ff, d, E, &dd)) && !(e = cudaMalloc((void **)&dx, T * d * sizeof(float))) &&
        !(e = cudaMalloc((void **)&dxs, T * sizeof(float))) && !(e = cudaMalloc((void **)&dxh, T * d * sizeof(__half))) &&
        !(e = cudaMalloc((void **)&dew, n * sizeof(float))) && !(e = cudaMalloc((void **)&deid, n * sizeof(int32_t))) &&
        !(e = cudaMalloc((void **)&dgo, n * ff * sizeof(float))) && !(e = cudaMalloc((void **)&dgi, n * ff * sizeof(float))) &&
        !(e = cudaMalloc((void **)&dgs, n * sizeof(float))) && !(e = cudaMalloc((void **)&dgh, n * ff * sizeof(__half))) &&
        !(e = cudaMalloc((void **)&dout, n * d * sizeof(float))) && !(e = mm_route_alloc(&r, T, used, E)) &&
        !(e = cudaMemcpy(dx, x, T * d * sizeof(float), cudaMemcpyHostToDevice)) &&
        !(e = cudaMemcpy(dew, ew, n * sizeof(float), cudaMemcpyHostToDevice)) &&
        !(e = cudaMemcpy(deid, eid, n * sizeof(int32_t), cudaMemcpyHostToDevice)) &&
        !(e = cudaMemcpy(dgi, gin, n * ff * sizeof(float), cudaMemcpyHostToDevice))) {
        poison(dgo, n * ff * sizeof(float));
        poison(dout, n * d * sizeof(float));
        poison(r.perm, n * sizeof(int32_t));
        mm_w Wg = {(uint32_t)tgu, dg, d, ff, ggml_row_bytes((uint32_t)tgu, (uint64_t)d)};
        mm_w Wu = {(uint32_t)tgu, du, d, ff, Wg.rb};
        mm_w Wd = {(uint32_t)td, dd, ff, d, ggml_row_bytes((uint32_t)td, (uint64_t)ff)};
        mm_prep(0, dx, d, T, d, dxh, dxs);
        mm_route_build(0, &r, deid, T);
        mm_experts_glu(0, &Wg, &Wu, dxh, dxs, d, &r, dew, clamp, dgo);
        mm_prep(0, dgi, ff, n, ff, dgh, dgs);
        mm_experts_down(0, &Wd, dgh, dgs, &r, dout, d);
        if (!(e = cudaGetLastError()) && !(e = cudaMemcpy(perm, r.perm, n * sizeof(int32_t), cudaMemcpyDeviceToHost)) &&
            !(e = cudaMemcpy(g, dgo, n * ff * sizeof(float), cudaMemcpyDeviceToHost)))
            e = cudaMemcpy(out, dout, n * d * sizeof(float), cudaMemcpyDeviceToHost);
    }
    cudaFree(dg); cudaFree(du); cudaFree(dd); cudaFree(dx); cudaFree(dxs); cudaFree(dxh); cudaFree(dew);
    cudaFree(deid); cudaFree(dgo); cudaFree(dgi); cudaFree(dgs); cudaFree(dgh); cudaFree(dout);
    if (r.perm) mm_route_free(&r);
    return e ? ds4_errf(err, errlen, "mm_experts: %s", cudaGetErrorString(e)) : 0;
}

/* Random weights in place (bench): every 16-bit word that holds an f16
 * scale (repacked headers past hdr in each slab, Q4_K's d|dmin, all of F16)
 * gets a finite value, F32 gets values in [−1, 1], quant bytes stay random. */
__global__ void k_mm_rand(uint8_t *p, uint64_t words, int fmt, uint64_t slab, uint64_t hdr, uint64_t seed) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= words) return;
    uint64_t h = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    h ^= h >> 31; h *= 0xBF58476D1CE4E5B9ull; h ^= h >> 29;
    uint32_t v = (uint32_t)h;
    if (fmt == MF_F32) { ((float *)p)[i] = (float)(int32_t)v * 0x1p-31f; return; }
    for (int k = 0; k < 2; k++) {
        uint64_t o = (4 * i + 2 * k) % slab;
        bool sc = fmt == MF_F16 || (fmt == MF_Q4K ? o % 144 < 4 : o >= hdr);
        float f = ((h >> (32 + 16 * k)) & 0xffff) * 0x1p-16f;   /* [0, 1) */
        if (sc) v = (v & ~(0xffffu << 16 * k)) |
                    (uint32_t)__half_as_ushort(__float2half_rn(fmt == MF_F16 ? 2 * f - 1 : (0.5f + f) * 0x1p-8f)) << 16 * k;
    }
    ((uint32_t *)p)[i] = v;
}
__global__ void k_mm_randf(float *p, uint64_t n, uint64_t seed) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint64_t h = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    h ^= h >> 31; h *= 0xBF58476D1CE4E5B9ull; h ^= h >> 29;
    p[i] = (float)(int32_t)(uint32_t)h * 0x1p-31f;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

extern "C" int ds4_cuda_mm_bench(int type, int64_t K, int64_t M, int64_t T, int mode, int E, int used, int iters,
                                 uint64_t seed, double *ms, char *err, size_t errlen) {
    int fmt = mm_fmt((uint32_t)type);
    uint64_t rb = ggml_row_bytes((uint32_t)type, (uint64_t)K);
    if (fmt < 0 || !rb || K % 256 || M < 1 || T < 1 || iters < 1 || iters > 1000 || mode < 0 || mode > 4 ||
        (mode == 4 && M % 8) ||
        ((mode == 1 || mode == 2) && (E < 1 || used < 1 || used > E)))
        return ds4_errf(err, errlen, "mm_bench: bad arguments");
    if (iq2_tables()) return ds4_errf(err, errlen, "mm_bench: iq2 tables");
    const bool ex = mode == 1 || mode == 2;
    int nw = mode == 1 ? 2 : 1, ns = ex ? E : 1;
    int64_t n = ex ? T * used : T, xrows = mode == 2 ? n : T, xw = mode == 4 ? 8 * K : K;   /* mode 4: 8 groups */
    uint64_t slab = rb * (uint64_t)M, hdr = 0;
    if (repacked((uint32_t)type)) {
        int bb, ho, hl, eb;
        rp_geom((uint32_t)type, &bb, &ho, &hl, &eb);
        hdr = (uint64_t)M * (K / eb) * (bb - hl);
    }
    uint8_t *w = NULL;
    float *x = NULL, *xs = NULL, *y = NULL, *ew = NULL;
    __half *xh = NULL;
    int32_t *eid = NULL, *heid = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    mm_route r;
    memset(&r, 0, sizeof r);
    cudaError_t e;
    if ((e = cudaMalloc((void **)&w, slab * ns * nw)) || (e = cudaMalloc((void **)&x, xrows * xw * sizeof(float))) ||
        (e = cudaMalloc((void **)&xs, xrows * sizeof(float))) || (e = cudaMalloc((void **)&xh, xrows * xw * sizeof(__half))) ||
        (e = cudaMalloc((void **)&y, n * M * sizeof(float))) || (e = cudaMalloc((void **)&ew, n * sizeof(float))) ||
        (e = cudaMalloc((void **)&eid, n * sizeof(int32_t))) || (e = cudaEventCreate(&e0)) || (e = cudaEventCreate(&e1)) ||
        (ex && (e = mm_route_alloc(&r, T, used, E))))
        goto out;
    for (int i = 0; i < ns * nw; i++) {
        uint64_t words = slab / 4;
        k_mm_rand<<<(unsigned)((words + 255) / 256), 256>>>(w + i * slab, words, fmt, slab, hdr, seed + 77 * i);
    }
    k_mm_randf<<<(unsigned)((xrows * xw + 255) / 256), 256>>>(x, xrows * xw, seed ^ 0x1234);
    k_mm_randf<<<(unsigned)((n + 255) / 256), 256>>>(ew, n, seed ^ 0x777);
    mm_prep(0, x, xw, xrows, xw, xh, xs);
    if (ex) {   /* uniform routing, `used` distinct experts per token */
        heid = (int32_t *)malloc(n * sizeof(int32_t));
        uint64_t s = seed | 1;
        for (int64_t tk = 0; tk < T; tk++)
            for (int i = 0; i < used; i++) {
                int ex, dup;
                do {
                    s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                    ex = (int)(s % (uint64_t)E);
                    dup = 0;
                    for (int k = 0; k < i; k++) dup |= heid[tk * used + k] == ex;
                } while (dup);
                heid[tk * used + i] = ex;
            }
        if ((e = cudaMemcpy(eid, heid, n * sizeof(int32_t), cudaMemcpyHostToDevice))) goto out;
        mm_route_build(0, &r, eid, T);
    }
    {
        mm_w W = {(uint32_t)type, w, K, M, rb}, W2 = {(uint32_t)type, w + slab * ns, K, M, rb};
        float *tm = (float *)malloc(iters * sizeof(float));
        for (int it = -3; it < iters && !e; it++) {
            cudaEventRecord(e0, 0);
            if (mode == 0) mm_dense(0, &W, 0, M, xh, xs, K, T, y, M);
            else if (mode == 1) mm_experts_glu(0, &W, &W2, xh, xs, K, &r, ew, 10.0f, y);
            else if (mode == 2) mm_experts_down(0, &W, xh, xs, &r, y, M);
            else if (mode == 3) mm_prep(0, x, K, T, K, xh, xs);
            else mm_dense_groups(0, &W, 8, M / 8, xh, xs, xw, K, T, y, M);
            cudaEventRecord(e1, 0);
            if (!(e = cudaEventSynchronize(e1)) && !(e = cudaGetLastError()) && it >= 0) cudaEventElapsedTime(&tm[it], e0, e1);
        }
        if (!e) {
            qsort(tm, iters, sizeof *tm, cmp_float);
            *ms = tm[iters / 2];
        }
        free(tm);
    }
out:
    cudaFree(w); cudaFree(x); cudaFree(xs); cudaFree(xh); cudaFree(y); cudaFree(ew); cudaFree(eid);
    free(heid);
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (r.perm) mm_route_free(&r);
    return e ? ds4_errf(err, errlen, "mm_bench: %s", cudaGetErrorString(e)) : 0;
}

/* Mean µs of one decode matvec launch (launch_rp) on random repacked
 * weights: `slots` slots of rows × n_in (glu: gate and up pairs, one x),
 * nr rows a warp (0: the backend's choice). Each timed run walks ≥ 256 MB
 * of distinct weight sets back to back, so every launch reads from DRAM
 * (not the 50 MB L2), as in a decode step; median of `iters` runs. */
extern "C" int ds4_cuda_mv_bench(int type, int64_t n_in, int64_t rows, int slots, int groups, bool glu, int nr,
                                 int iters, uint64_t seed, double *us, char *err, size_t errlen) {
    uint64_t slab = ggml_row_bytes((uint32_t)type, (uint64_t)n_in) * (uint64_t)rows;
    if (!repacked((uint32_t)type) || !slab || n_in % 256 || slots < 1 || iters < 1 || iters > 1000 || groups < 1 ||
        rows % groups || (groups > 1 && (slots > 1 || glu)))
        return ds4_errf(err, errlen, "mv_bench: bad arguments");
    if (iq2_tables()) return ds4_errf(err, errlen, "mv_bench: iq2 tables");
    int bb, ho, hl, eb;
    rp_geom((uint32_t)type, &bb, &ho, &hl, &eb);
    uint64_t hdr = (uint64_t)rows * (n_in / eb) * (bb - hl), call = slab * slots * (glu ? 2 : 1);
    int sets = (int)((256ull << 20) / call) + 1, E = sets * slots;
    uint8_t *w = NULL;
    float *x = NULL, *y = NULL, *ew = NULL;
    int32_t *eid = NULL, *heid = (int32_t *)malloc(E * sizeof(int32_t));
    float *tm = (float *)malloc(iters * sizeof(float));
    cudaEvent_t e0 = NULL, e1 = NULL;
    cudaError_t e;
    if ((e = cudaMalloc((void **)&w, slab * E * (glu ? 2 : 1))) ||
        (e = cudaMalloc((void **)&x, slots * groups * n_in * sizeof(float))) || (e = cudaMalloc((void **)&y, slots * rows * sizeof(float))) ||
        (e = cudaMalloc((void **)&ew, slots * sizeof(float))) || (e = cudaMalloc((void **)&eid, E * sizeof(int32_t))) ||
        (e = cudaEventCreate(&e0)) || (e = cudaEventCreate(&e1)))
        goto out;
    for (int i = 0; i < E * (glu ? 2 : 1); i++)
        k_mm_rand<<<(unsigned)((slab / 4 + 255) / 256), 256>>>(w + i * slab, slab / 4, mm_fmt((uint32_t)type), slab, hdr,
                                                             seed + 77 * i);
    k_mm_randf<<<(unsigned)((slots * groups * n_in + 255) / 256), 256>>>(x, slots * groups * n_in, seed ^ 0x1234);
    k_mm_randf<<<1, 256>>>(ew, slots, seed ^ 0x777);
    for (int i = 0; i < E; i++) heid[i] = i;
    if ((e = cudaMemcpy(eid, heid, E * sizeof(int32_t), cudaMemcpyHostToDevice))) goto out;
    for (int it = -2; it < iters && !e; it++) {
        cudaEventRecord(e0, 0);
        for (int j = 0; j < sets; j++) {
            if (slots == 1 && !glu)   /* a dense matrix, as matvec() */
                launch_rp((uint32_t)type, 0, w + j * slab, NULL, n_in, rows, x, groups > 1 ? rows / groups : 0, n_in, y,
                          NULL, 0, 0, 0, 1, NULL, 0, nr);
            else
                launch_rp((uint32_t)type, 0, w, glu ? w + slab * E : NULL, n_in, rows, x, 0, 0, y, eid + j * slots, slab,
                          glu ? 0 : n_in, rows, slots, glu ? ew : NULL, 10.0f, nr);
        }
        cudaEventRecord(e1, 0);
        if (!(e = cudaEventSynchronize(e1)) && !(e = cudaGetLastError()) && it >= 0) {
            cudaEventElapsedTime(&tm[it], e0, e1);
            tm[it] *= 1000.0f / sets;
        }
    }
    if (!e) {
        qsort(tm, iters, sizeof *tm, cmp_float);
        *us = tm[iters / 2];
    }
out:
    cudaFree(w); cudaFree(x); cudaFree(y); cudaFree(ew); cudaFree(eid);
    free(heid); free(tm);
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    return e ? ds4_errf(err, errlen, "mv_bench: %s", cudaGetErrorString(e)) : 0;
}

/* ---- attn tests ---- */

extern "C" int ds4_cuda_test_attn(const float *q, const float *kvc, const float *raw, uint32_t keep_raw,
                                  uint32_t window, const float *comp, int64_t n_comp, const int32_t *sel, int ratio,
                                  int64_t topk, const float *sinks, int H, int hd, int rd, const double *freq,
                                  float scale, uint32_t p0, int64_t T, float *o, char *err, size_t errlen) {
    if (T < 1 || H != AT_H || hd != AT_HD || rd != AT_RD || keep_raw < window)
        return ds4_errf(err, errlen, "attn: unsupported shape T %lld H %d hd %d rd %d", (long long)T, H, hd, rd);
    size_t fs = sizeof(float);
    void *d[9] = {0};
    cudaError_t e;
    if (!(e = at_upload(&d[8], NULL, attn_scratch_bytes(keep_raw, p0, T, ratio))) &&
        !(e = at_upload(&d[0], q, T * H * hd * fs)) && !(e = at_upload(&d[1], kvc, T * hd * fs)) &&
        !(e = at_upload(&d[2], raw, (size_t)keep_raw * hd * fs)) && !(e = at_upload(&d[3], comp, n_comp * hd * fs)) &&
        !(e = at_upload(&d[4], sel, sel ? T * topk * sizeof(int32_t) : 0)) && !(e = at_upload(&d[5], sinks, H * fs)) &&
        !(e = at_upload(&d[6], freq, rd / 2 * sizeof(double))) && !(e = at_upload(&d[7], NULL, T * H * hd * fs))) {
        poison(d[7], T * H * hd * fs);
        attn_chunk(0, (float *)d[0], (float *)d[1], (float *)d[2], keep_raw, window, (float *)d[3], (int32_t *)d[4],
                   ratio, topk, (float *)d[5], H, hd, rd, (double *)d[6], scale, p0, T, (float *)d[7], d[8]);
        if (!(e = cudaGetLastError()) && !(e = cudaDeviceSynchronize()))
            e = cudaMemcpy(o, d[7], T * H * hd * fs, cudaMemcpyDeviceToHost);
    }
    for (int i = 0; i < 9; i++) cudaFree(d[i]);
    return e ? ds4_errf(err, errlen, "attn: %s", cudaGetErrorString(e)) : 0;
}

extern "C" int ds4_cuda_test_attn_f32(const float *q, const float *kvc, const float *raw, uint32_t keep_raw,
                                      uint32_t window, const float *comp, int64_t n_comp, const int32_t *sel, int ratio,
                                      int64_t topk, const float *sinks, int H, int hd, int rd, const double *freq,
                                      float scale, uint32_t p0, int64_t T, float *o, char *err, size_t errlen) {
    if (T < 1 || T > 64 || H < 1 || hd < 128 || hd > 1024 || hd % 128 || rd % 4 || rd >= hd || keep_raw < window)
        return ds4_errf(err, errlen, "attn f32: unsupported shape T %lld H %d hd %d rd %d", (long long)T, H, hd, rd);
    size_t fs = sizeof(float);
    dstep hs[64];
    for (int64_t t = 0; t < T; t++) hs[t] = {p0 + (uint32_t)t, 0};
    void *d[10] = {0};
    cudaError_t e;
    if (!(e = at_upload(&d[8], NULL, T * ATT_SPLITS * H * (hd + 2) * fs)) && !(e = at_upload(&d[9], hs, T * sizeof(dstep))) &&
        !(e = at_upload(&d[0], q, T * H * hd * fs)) && !(e = at_upload(&d[1], kvc, T * hd * fs)) &&
        !(e = at_upload(&d[2], raw, (size_t)keep_raw * hd * fs)) && !(e = at_upload(&d[3], comp, n_comp * hd * fs)) &&
        !(e = at_upload(&d[4], sel, sel ? T * topk * sizeof(int32_t) : 0)) && !(e = at_upload(&d[5], sinks, H * fs)) &&
        !(e = at_upload(&d[6], freq, rd / 2 * sizeof(double))) && !(e = at_upload(&d[7], NULL, T * H * hd * fs))) {
        poison(d[7], T * H * hd * fs);
        poison(d[8], T * ATT_SPLITS * H * (hd + 2) * fs);
        att_setup(hd, IX_H, IX_D);
        attend(0, (float *)d[0], -1.0f, (float *)d[7], (float *)d[1], (float *)d[2], keep_raw, (dstep *)d[9], (dstep *)d[9],
               window, (float *)d[3], (int32_t *)d[4], ratio, topk, (float *)d[5], H, hd, rd, (double *)d[6], scale, T,
               (float *)d[8]);
        if (!(e = cudaGetLastError()) && !(e = cudaDeviceSynchronize()))
            e = cudaMemcpy(o, d[7], T * H * hd * fs, cudaMemcpyDeviceToHost);
    }
    for (int i = 0; i < 10; i++) cudaFree(d[i]);
    return e ? ds4_errf(err, errlen, "attn f32: %s", cudaGetErrorString(e)) : 0;
}

extern "C" int ds4_cuda_test_idx_scores(const float *iq, const float *iw, const float *rows, int64_t n_rows,
                                        uint32_t p0, int64_t T, int ih, int ihd, float *score, int64_t ld, char *err,
                                        size_t errlen) {
    if (T < 1 || ih != IX_H || ihd != IX_D || ld < ((int64_t)p0 + T) / 4 || n_rows < ((int64_t)p0 + T) / 4)
        return ds4_errf(err, errlen, "idx: unsupported shape T %lld ih %d ihd %d", (long long)T, ih, ihd);
    size_t fs = sizeof(float);
    void *d[4] = {0};
    cudaError_t e;
    if (!(e = at_upload(&d[0], iq, T * ih * ihd * fs)) && !(e = at_upload(&d[1], iw, T * ih * fs)) &&
        !(e = at_upload(&d[2], rows, n_rows * ihd * fs)) && !(e = at_upload(&d[3], NULL, T * ld * fs))) {
        poison(d[3], T * ld * fs);
        idx_scores_chunk(0, (float *)d[0], (float *)d[1], (float *)d[2], p0, T, ih, ihd, (float *)d[3], ld);
        if (!(e = cudaGetLastError()) && !(e = cudaDeviceSynchronize()))
            e = cudaMemcpy(score, d[3], T * ld * fs, cudaMemcpyDeviceToHost);
    }
    for (int i = 0; i < 4; i++) cudaFree(d[i]);
    return e ? ds4_errf(err, errlen, "idx: %s", cudaGetErrorString(e)) : 0;
}

extern "C" int ds4_cuda_test_idx_scores_f32(const float *iq, const float *iw, const float *rows, int64_t n_rows,
                                            uint32_t p0, int64_t T, int ih, int ihd, float *score, int64_t ld,
                                            char *err, size_t errlen) {
    if (T < 1 || T > 64 || ih < 1 || ihd < 4 || ihd % 4 || ld < ((int64_t)p0 + T) / 4 || n_rows < ((int64_t)p0 + T) / 4)
        return ds4_errf(err, errlen, "idx f32: unsupported shape T %lld ih %d ihd %d", (long long)T, ih, ihd);
    size_t fs = sizeof(float);
    dstep hs[64];
    for (int64_t t = 0; t < T; t++) hs[t] = {p0 + (uint32_t)t, 0};
    void *d[5] = {0};
    cudaError_t e;
    if (!(e = at_upload(&d[0], iq, T * ih * ihd * fs)) && !(e = at_upload(&d[1], iw, T * ih * fs)) &&
        !(e = at_upload(&d[2], rows, n_rows * ihd * fs)) && !(e = at_upload(&d[3], NULL, T * ld * fs)) &&
        !(e = at_upload(&d[4], hs, T * sizeof(dstep)))) {
        poison(d[3], T * ld * fs);
        int64_t nb = (ld + IDX_TILE - 1) / IDX_TILE;   /* as indexer(): a capacity of ld rows */
        att_setup(128, ih, ihd);
        k_idx_scores<<<dim3((unsigned)(nb < 264 ? nb : 264), (unsigned)T), 256, idx_scores_smem(ih, ihd)>>>(
            (float *)d[0], (float *)d[1], (float *)d[2], (dstep *)d[4], ih, ihd, (float *)d[3], ld);
        if (!(e = cudaGetLastError()) && !(e = cudaDeviceSynchronize()))
            e = cudaMemcpy(score, d[3], T * ld * fs, cudaMemcpyDeviceToHost);
    }
    for (int i = 0; i < 5; i++) cudaFree(d[i]);
    return e ? ds4_errf(err, errlen, "idx f32: %s", cudaGetErrorString(e)) : 0;
}

/* The F16 products of a decode layer as comp_decode launches them
 * (k_mv_f16x): nseg matrices of rows[i] × n[xi[i]] (host F16 bits), y the
 * outputs concatenated. */
extern "C" int ds4_cuda_test_matvec_f16x(int nseg, const uint16_t *const *w, const int64_t *rows, const int *xi,
                                         const float *x0, int64_t n0, const float *x1, int64_t n1, float *y, char *err,
                                         size_t errlen) {
    if (nseg < 1 || nseg > F16X_SEGS || n0 < 8 || n0 % 8 || n1 < 0 || n1 % 8 || (n0 + n1) * 4 > RP_SX_MAX)
        return ds4_errf(err, errlen, "matvec f16x: bad shape");
    f16x_set a = {};
    a.n[0] = (int32_t)n0;
    a.n[1] = (int32_t)n1;
    uint8_t *dw[F16X_SEGS] = {0};
    float *dx = NULL, *dy = NULL;
    int64_t tot = 0;
    cudaError_t e = cudaSuccess;
    for (int i = 0; i < nseg; i++) {
        if (rows[i] < 1 || (xi[i] != 0 && xi[i] != 1) || (xi[i] && !n1))
            return ds4_errf(err, errlen, "matvec f16x: bad segment %d", i);
        tot += rows[i];
    }
    if ((e = cudaMalloc((void **)&dx, (n0 + n1) * sizeof(float))) || (e = cudaMalloc((void **)&dy, tot * sizeof(float))) ||
        (e = cudaMemcpy(dx, x0, n0 * sizeof(float), cudaMemcpyHostToDevice)) ||
        (n1 && (e = cudaMemcpy(dx + n0, x1, n1 * sizeof(float), cudaMemcpyHostToDevice))))
        goto out;
    a.x[0] = dx;
    a.x[1] = n1 ? dx + n0 : NULL;
    for (int i = 0; i < nseg && !e; i++) {
        size_t bytes = (size_t)rows[i] * (xi[i] ? n1 : n0) * 2;
        if (!(e = cudaMalloc((void **)&dw[i], bytes))) e = cudaMemcpy(dw[i], w[i], bytes, cudaMemcpyHostToDevice);
        a.w[i] = dw[i];
        a.y[i] = dy + (a.nseg ? a.end[a.nseg - 1] : 0);
        a.end[i] = (int32_t)((a.nseg ? a.end[a.nseg - 1] : 0) + rows[i]);
        a.xi[i] = xi[i];
        a.nseg++;
    }
    if (e) goto out;
    poison(dy, tot * sizeof(float));
    launch_f16x(0, &a);
    if (!(e = cudaGetLastError())) e = cudaMemcpy(y, dy, tot * sizeof(float), cudaMemcpyDeviceToHost);
out:
    for (int i = 0; i < F16X_SEGS; i++) cudaFree(dw[i]);
    cudaFree(dx); cudaFree(dy);
    return e ? ds4_errf(err, errlen, "matvec f16x: %s", cudaGetErrorString(e)) : 0;
}

/* k_comp_idx as comp_decode launches it for the token at pos: compressor
 * steps a and (b != NULL) b, then ih query heads (ih 0: none); rings, rows
 * and heads updated in place. */
extern "C" int ds4_cuda_test_comp_idx(ds4_cuda_comp_case *a, ds4_cuda_comp_case *b, uint32_t pos, int rd,
                                      const double *freq, float eps, int ih, int ihd, float *iq, float *iw,
                                      float wscale, char *err, size_t errlen) {
    ds4_cuda_comp_case *cs[2] = {a, b};
    comp_job job[2] = {};
    void *d[18] = {0};   /* 7 a case, freq, step, heads */
    int nd = 0, D = 0;
    size_t fs = sizeof(float);
    dstep hs = {pos, 0};
    cudaError_t e = cudaSuccess;
    for (int i = 0; i < 2 && cs[i] && !e; i++) {
        ds4_cuda_comp_case *c = cs[i];
        int64_t W = (int64_t)c->lanes * c->D, nrow = ((int64_t)pos + 1) / c->R + 1;
        if (c->D % 8 || c->D > 1024 || rd > c->D || !c->keep || (c->lanes != 1 && c->lanes != 2) || c->R < 1)
            return ds4_errf(err, errlen, "comp idx: bad case %d", i);
        if ((e = at_upload(&d[nd], c->pk, W * fs)) || (e = at_upload(&d[nd + 1], c->pg, W * fs)) ||
            (e = at_upload(&d[nd + 2], c->ape, (size_t)c->R * W * 2)) || (e = at_upload(&d[nd + 3], c->norm_w, c->D * fs)) ||
            (e = at_upload(&d[nd + 4], c->rkv, c->keep * W * fs)) || (e = at_upload(&d[nd + 5], c->rg, c->keep * W * fs)) ||
            (e = at_upload(&d[nd + 6], NULL, nrow * c->D * fs)))
            break;
        poison(d[nd + 6], nrow * c->D * fs);
        job[i] = {(float *)d[nd], (float *)d[nd + 1], (uint8_t *)d[nd + 2], (uint64_t)W * 2, GT_F16, c->R, c->lanes,
                  c->D, (float *)d[nd + 4], (float *)d[nd + 5], c->keep, (float *)d[nd + 3], (float *)d[nd + 6],
                  c->indexer};
        nd += 7;
        D = c->D > D ? c->D : D;
    }
    if (!e && !(e = at_upload(&d[14], freq, (rd / 2) * sizeof(double))) && !(e = at_upload(&d[15], &hs, sizeof hs)) &&
        (!ih || (!(e = at_upload(&d[16], iq, (size_t)ih * ihd * fs)) && !(e = at_upload(&d[17], iw, ih * fs))))) {
        int ncomp = b ? 2 : 1;
        D = ihd > D ? ihd : D;
        k_comp_idx<<<(unsigned)(ncomp + ih), nthreads(D), D * fs>>>(job[0], job[1], ncomp, (float *)d[16],
                                                                   (float *)d[17], ihd, rd, (const double *)d[14],
                                                                   (const dstep *)d[15], eps, wscale);
        e = cudaGetLastError();
        for (int i = 0; i < ncomp && !e; i++) {
            ds4_cuda_comp_case *c = cs[i];
            size_t Wb = (size_t)c->lanes * c->D * fs;
            int64_t nrow = ((int64_t)pos + 1) / c->R + 1;
            if (!(e = cudaMemcpy(c->rkv, job[i].kv, c->keep * Wb, cudaMemcpyDeviceToHost)) &&
                !(e = cudaMemcpy(c->rg, job[i].gate, c->keep * Wb, cudaMemcpyDeviceToHost)))
                e = cudaMemcpy(c->rows, job[i].out, nrow * c->D * fs, cudaMemcpyDeviceToHost);
        }
        if (!e && ih && !(e = cudaMemcpy(iq, d[16], (size_t)ih * ihd * fs, cudaMemcpyDeviceToHost)))
            e = cudaMemcpy(iw, d[17], ih * fs, cudaMemcpyDeviceToHost);
    }
    for (int i = 0; i < 18; i++) cudaFree(d[i]);
    return e ? ds4_errf(err, errlen, "comp idx: %s", cudaGetErrorString(e)) : 0;
}

/* Uniform values in (−amp, amp) from a hash of (seed, i), optionally f16-rounded. */
__global__ void k_at_fill(float *x, int64_t n, uint32_t seed, float amp, bool f16) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        uint64_t h = ((uint64_t)seed << 40 ^ (uint64_t)i) * 0x9E3779B97F4A7C15ull;
        h ^= h >> 29; h *= 0xBF58476D1CE4E5B9ull; h ^= h >> 32;
        float v = ((float)(h >> 40) * 0x1p-24f * 2.0f - 1.0f) * amp;
        x[i] = f16 ? round_f16(v) : v;
    }
}
/* Selection rows for the bench: topk indices spread over the visible rows. */
__global__ void k_at_fill_sel(int32_t *sel, int64_t T, int64_t topk, uint32_t p0) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < T * topk; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / topk, k = i % topk, nvis = ((int64_t)p0 + t + 1) / 4;
        sel[i] = (int32_t)(nvis > topk ? k * nvis / topk : k);
    }
}

static int cmp_f(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Median time over `reps` launches (after 2 warm-ups) of attn_chunk (idx =
 * false: H 64, hd 512, rd 64, window 128, topk 512) or idx_scores_chunk, on
 * random device data; flops = 4·Σ_t H·rows_t·hd resp. 2·Σ_t ih·ihd·rows_t. */
extern "C" int ds4_cuda_bench_attn(bool idx, int ratio, uint32_t p0, int64_t T, int reps, double *ms, double *flops,
                                   char *err, size_t errlen) {
    const int H = AT_H, hd = AT_HD, rd = AT_RD, window = 128, keep = 128, ih = IX_H, ihd = IX_D;
    const int64_t topk = 512, ncomp = ratio > 0 ? ((int64_t)p0 + T) / ratio : 0, nidx = ((int64_t)p0 + T) / 4;
    if (T < 1 || reps < 1 || reps > 100) return ds4_errf(err, errlen, "bench: bad T %lld reps %d", (long long)T, reps);
    size_t fs = sizeof(float);
    void *d[9] = {0};
    float tm[100];
    cudaEvent_t ev[2] = {0, 0};
    cudaError_t e;
    if (!(e = at_upload(&d[0], NULL, T * H * hd * fs)) && !(e = at_upload(&d[1], NULL, T * hd * fs)) &&
        !(e = at_upload(&d[2], NULL, (size_t)keep * hd * fs)) && !(e = at_upload(&d[3], NULL, (idx ? nidx * ihd : ncomp * hd) * fs)) &&
        !(e = at_upload(&d[4], NULL, T * topk * sizeof(int32_t))) && !(e = at_upload(&d[5], NULL, H * fs)) &&
        !(e = at_upload(&d[6], NULL, rd / 2 * sizeof(double))) && !(e = at_upload(&d[7], NULL, T * H * hd * fs)) &&
        !(e = at_upload(&d[8], NULL, attn_scratch_bytes(keep, p0, T, ratio))) &&
        !(e = cudaEventCreate(&ev[0])) && !(e = cudaEventCreate(&ev[1]))) {
        double fr[AT_RD / 2];
        for (int k = 0; k < rd / 2; k++) fr[k] = pow(10000.0, -2.0 * k / rd);
        cudaMemcpy(d[6], fr, sizeof fr, cudaMemcpyHostToDevice);
        k_at_fill<<<256, 256>>>((float *)d[0], T * H * hd, 1, 1.7f, false);
        k_at_fill<<<256, 256>>>((float *)d[1], T * hd, 2, 1.7f, true);
        k_at_fill<<<256, 256>>>((float *)d[2], (int64_t)keep * hd, 3, 1.7f, true);
        /* the indexer reads q (T×ih×ihd) from d[0], w (T×ih) from d[1], rows from d[3] */
        k_at_fill<<<256, 256>>>((float *)d[3], idx ? nidx * ihd : ncomp * hd, 4, 1.7f, true);
        k_at_fill<<<1, 64>>>((float *)d[5], H, 5, 2.0f, false);
        k_at_fill_sel<<<256, 256>>>((int32_t *)d[4], T, topk, p0);
        float *score = (float *)d[7];   /* T × nidx ≤ T × H × hd */
        int r = 0;
        for (int i = 0; i < reps + 2 && !e; i++) {
            cudaEventRecord(ev[0]);
            if (idx) idx_scores_chunk(0, (float *)d[0], (float *)d[1], (float *)d[3], p0, T, ih, ihd, score, nidx);
            else attn_chunk(0, (float *)d[0], (float *)d[1], (float *)d[2], keep, window, (float *)d[3],
                            (int32_t *)d[4], ratio, topk, (float *)d[5], H, hd, rd, (double *)d[6],
                            1.0f / sqrtf((float)hd), p0, T, (float *)d[7], d[8]);
            cudaEventRecord(ev[1]);
            if (!(e = cudaEventSynchronize(ev[1])) && !(e = cudaGetLastError()) && i >= 2)
                cudaEventElapsedTime(&tm[r++], ev[0], ev[1]);
        }
        if (!e) {
            qsort(tm, r, sizeof *tm, cmp_f);
            *ms = tm[r / 2];
            double f = 0;
            for (int64_t t = 0; t < T; t++) {
                int64_t p = p0 + t, nw = p < window ? p + 1 : window, nc = ratio > 0 ? (p + 1) / ratio : 0;
                if (ratio == 4 && nc > topk) nc = topk;
                f += idx ? 2.0 * ih * ihd * (double)((p + 1) / 4) : 4.0 * H * hd * (double)(nw + nc);
            }
            *flops = f;
        }
    }
    if (ev[0]) cudaEventDestroy(ev[0]);
    if (ev[1]) cudaEventDestroy(ev[1]);
    for (int i = 0; i < 9; i++) cudaFree(d[i]);
    return e ? ds4_errf(err, errlen, "bench: %s", cudaGetErrorString(e)) : 0;
}
