/* ds4-convert: Hugging Face DeepSeek V4 checkpoint -> ds4 GGUF.
 *
 *   ds4-convert [--mix f32|q2|q4] [--imatrix FILE] [--tokenizer FILE] [--mtp MTP.gguf]
 *               [--threads N] CKPT_DIR OUT.gguf
 *
 * The output's tensor names, dims, types and order come from ds4_layout()
 * (src/model), the deepseek4.* keys from ds4_hparams_write(), so a converted
 * file and a published one (or a ds4-synth one) cannot drift apart. Each
 * GGUF tensor is filled from its HF source (spec model.md §2.3-2.4, §2.6):
 * decoded row by row to f32 (FP8/FP4/BF16/F16/F32) and re-encoded in the
 * target type. Memory stays bounded by one output chunk plus, for IQ2_XXS
 * without an imatrix, one expert matrix's column importance. */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "hf.h"
#include "imatrix.h"
#include "quant/quant.h"
#include "safetensors.h"

#define CHUNK_BYTES (4u << 20)   /* output written in pieces of about this size */

/* GGUF suffix of a block tensor -> DeepSeek name under "layers.N." ("%d" =
 * expert index for the three routed-expert tensors). Spec §2.4. */
static const struct { const char *gguf, *hf; } LAYER_MAP[] = {
    {"hc_attn_fn.weight", "hc_attn_fn"},
    {"hc_attn_scale.weight", "hc_attn_scale"},
    {"hc_attn_base.weight", "hc_attn_base"},
    {"attn_norm.weight", "attn_norm.weight"},
    {"attn_q_a.weight", "attn.wq_a.weight"},
    {"attn_q_a_norm.weight", "attn.q_norm.weight"},
    {"attn_q_b.weight", "attn.wq_b.weight"},
    {"attn_kv.weight", "attn.wkv.weight"},
    {"attn_kv_a_norm.weight", "attn.kv_norm.weight"},
    {"attn_sinks.weight", "attn.attn_sink"},
    {"attn_output_a.weight", "attn.wo_a.weight"},
    {"attn_output_b.weight", "attn.wo_b.weight"},
    {"attn_compressor_ape.weight", "attn.compressor.ape"},
    {"attn_compressor_kv.weight", "attn.compressor.wkv.weight"},
    {"attn_compressor_gate.weight", "attn.compressor.wgate.weight"},
    {"attn_compressor_norm.weight", "attn.compressor.norm.weight"},
    {"indexer.attn_q_b.weight", "attn.indexer.wq_b.weight"},
    {"indexer.proj.weight", "attn.indexer.weights_proj.weight"},
    {"indexer_compressor_ape.weight", "attn.indexer.compressor.ape"},
    {"indexer_compressor_kv.weight", "attn.indexer.compressor.wkv.weight"},
    {"indexer_compressor_gate.weight", "attn.indexer.compressor.wgate.weight"},
    {"indexer_compressor_norm.weight", "attn.indexer.compressor.norm.weight"},
    {"hc_ffn_fn.weight", "hc_ffn_fn"},
    {"hc_ffn_scale.weight", "hc_ffn_scale"},
    {"hc_ffn_base.weight", "hc_ffn_base"},
    {"ffn_norm.weight", "ffn_norm.weight"},
    {"ffn_gate_inp.weight", "ffn.gate.weight"},
    {"exp_probs_b.bias", "ffn.gate.bias"},
    {"ffn_gate_tid2eid.weight", "ffn.gate.tid2eid"},
    {"ffn_gate_exps.weight", "ffn.experts.%d.w1.weight"},
    {"ffn_up_exps.weight", "ffn.experts.%d.w3.weight"},
    {"ffn_down_exps.weight", "ffn.experts.%d.w2.weight"},
    {"ffn_gate_shexp.weight", "ffn.shared_experts.w1.weight"},
    {"ffn_up_shexp.weight", "ffn.shared_experts.w3.weight"},
    {"ffn_down_shexp.weight", "ffn.shared_experts.w2.weight"},
};
static const struct { const char *gguf, *hf; } GLOBAL_MAP[] = {
    {"token_embd.weight", "embed.weight"},
    {"output_hc_fn.weight", "hc_head_fn"},
    {"output_hc_base.weight", "hc_head_base"},
    {"output_hc_scale.weight", "hc_head_scale"},
    {"output_norm.weight", "norm.weight"},
    {"output.weight", "head.weight"},
};

/* The MTP block's own tensors (spec §2.5), under "mtp.0." on both sides. */
static const struct { const char *gguf, *hf; } MTP_MAP[] = {
    {"e_proj.weight", "e_proj.weight"},
    {"h_proj.weight", "h_proj.weight"},
    {"enorm.weight", "enorm.weight"},
    {"hnorm.weight", "hnorm.weight"},
    {"norm.weight", "norm.weight"},
    {"hc_head_fn.weight", "hc_head_fn"},
    {"hc_head_base.weight", "hc_head_base"},
    {"hc_head_scale.weight", "hc_head_scale"},
};

static void usage(FILE *f) {
    fprintf(f,
        "usage: ds4-convert [options] CHECKPOINT_DIR OUT.gguf\n"
        "Converts a Hugging Face DeepSeek V4 checkpoint (config.json, tokenizer.json,\n"
        "safetensors shards) into a ds4 GGUF with the published names, keys and order.\n"
        "  --mix f32|q2|q4   tensor types: all float (f32, for tests), or the published\n"
        "                    q2 / q4 mixes (default q2)\n"
        "  --imatrix FILE    importance matrix (llama.cpp .dat) for the routed experts\n"
        "  --tokenizer FILE  tokenizer.json to use (default CHECKPOINT_DIR/tokenizer.json)\n"
        "  --mtp FILE        also write the MTP draft block (mtp.0.*) to FILE\n"
        "  --threads N       encoding threads (default: all online CPUs)\n"
        "  --quiet           no progress bar\n");
}

typedef enum { PROGRESS_OFF, PROGRESS_BAR, PROGRESS_LINES } progress_mode;

typedef struct {
    uint64_t total, done;
    double t0, last;
    progress_mode mode;
    int decile;                /* last 10% step printed in PROGRESS_LINES */
} progress;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void progress_draw(progress *p, const char *name, bool final) {
    if (p->mode == PROGRESS_OFF) return;
    double t = now();
    double frac = p->total ? (double)p->done / p->total : 1.0, el = t - p->t0;
    double eta = frac > 0 ? el / frac - el : 0;
    if (p->mode == PROGRESS_LINES) {
        /* Not a terminal (a log file): one line per 10%. */
        int decile = (int)(frac * 10);
        if (final || decile <= p->decile) return;
        p->decile = decile;
        fprintf(stderr, "ds4-convert: %3d%%  %.3f/%.3f GB  %ds elapsed, ETA %ds\n", 10 * decile, p->done / 1e9,
                p->total / 1e9, (int)el, (int)eta);
        return;
    }
    if (!final && t - p->last < 0.2) return;
    p->last = t;
    char bar[31];
    int fill = (int)(frac * 30);
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = 0;
    fprintf(stderr, "\r[%s] %5.1f%% %8.3f/%.3f GB  %s %02d:%02d  %-34.34s", bar, 100 * frac, p->done / 1e9,
            p->total / 1e9, final ? "took" : "ETA ", (int)(final ? el : eta) / 60, (int)(final ? el : eta) % 60,
            final ? "" : name);
    if (final) fputc('\n', stderr);
    fflush(stderr);
}

typedef struct {
    gguf_writer *w;
    int64_t idx;               /* tensor index in the writer */
    uint64_t off;              /* bytes of this tensor written so far */
    uint8_t *buf;
    uint64_t fill, cap;
    progress *prog;
    const char *name;
} sink;

static int sink_flush(sink *s, char *err, size_t errlen) {
    if (!s->fill) return 0;
    if (gguf_writer_write_tensor(s->w, s->idx, s->off, s->buf, s->fill)) {
        const char *why = gguf_writer_error(s->w);
        snprintf(err, errlen, "writing %s: %s", s->name, why ? why : "write failed");
        return -1;
    }
    s->off += s->fill;
    s->prog->done += s->fill;
    s->fill = 0;
    progress_draw(s->prog, s->name, false);
    return 0;
}

/* Room for n more bytes (flushing first when needed). */
static uint8_t *sink_reserve(sink *s, uint64_t n, char *err, size_t errlen) {
    if (s->fill + n > s->cap && sink_flush(s, err, errlen)) return NULL;
    if (n > s->cap) {
        uint8_t *nb = realloc(s->buf, n);
        if (!nb) { snprintf(err, errlen, "out of memory"); return NULL; }
        s->buf = nb;
        s->cap = n;
    }
    uint8_t *p = s->buf + s->fill;
    s->fill += n;
    return p;
}

/* Encode one row of floats as `type` into out (ggml_row_bytes(type, n)). */
static void encode_row(ggml_type type, const float *x, void *out, uint64_t n, const float *imp) {
    if (type == GGML_F32) memcpy(out, x, n * sizeof *x);
    else ds4_quantize_row(type, x, out, (int64_t)n, imp);
}

#define MAX_THREADS 64

typedef struct {
    const st_ckpt *ck;
    const ds4_hparams *hp;
    const imatrix *im;
    progress prog;
    int n_threads;
    float *rows[MAX_THREADS];  /* one decoded row per thread */
    float *imp;                /* importance of one matrix's columns */
} conv;

/* Rows [r0, r0+nr) of one source, decoded and encoded by n_threads threads
 * on disjoint row ranges. Row encoding is independent per row, so the bytes
 * do not depend on the thread count. */
typedef struct {
    const st_weight *w;
    ggml_type type;
    uint64_t r0, r1, n0, rb;
    const float *imp;
    float *row;
    uint8_t *out;              /* bytes of row r0 of this job */
    uint64_t base;             /* first row of the whole batch (out's origin) */
    uint64_t bad_row, n_bad;
} rows_job;

static void *rows_work(void *arg) {
    rows_job *j = arg;
    for (uint64_t r = j->r0; r < j->r1; r++) {
        uint64_t bad = st_weight_row(j->w, r, j->row);
        if (bad) { j->bad_row = r; j->n_bad = bad; return NULL; }
        encode_row(j->type, j->row, j->out + (r - j->base) * j->rb, j->n0, j->imp);
    }
    return NULL;
}

static int encode_rows(conv *c, const st_weight *w, ggml_type type, uint64_t r0, uint64_t nr, uint64_t n0,
                       uint64_t rb, const float *imp, uint8_t *out, char *err, size_t errlen) {
    rows_job jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int nt = c->n_threads;
    if ((uint64_t)nt > nr) nt = (int)nr;
    for (int t = 0; t < nt; t++)
        jobs[t] = (rows_job){w, type, r0 + nr * t / nt, r0 + nr * (t + 1) / nt, n0, rb, imp, c->rows[t], out, r0, 0, 0};
    int started = 0;
    for (int t = 1; t < nt; t++, started++)
        if (pthread_create(&tid[t], NULL, rows_work, &jobs[t])) break;
    rows_work(&jobs[0]);
    for (int t = 1; t <= started; t++) pthread_join(tid[t], NULL);
    for (int t = started + 1; t < nt; t++) rows_work(&jobs[t]);   /* threads that could not start */
    for (int t = 0; t < nt; t++)
        if (jobs[t].n_bad)
            return snprintf(err, errlen, "%s: %s row %llu has %llu non-finite values", w->w->file, w->w->name,
                            (unsigned long long)jobs[t].bad_row, (unsigned long long)jobs[t].n_bad), -1;
    return 0;
}

/* The DeepSeek source name of a GGUF tensor (expert index e for "%d"). */
static int hf_name(const char *gguf, int e, char *out, size_t n) {
    for (size_t i = 0; i < sizeof GLOBAL_MAP / sizeof *GLOBAL_MAP; i++)
        if (!strcmp(gguf, GLOBAL_MAP[i].gguf)) { snprintf(out, n, "%s", GLOBAL_MAP[i].hf); return 0; }
    /* "blk.N." -> "layers.N."; the MTP block keeps its "mtp.0." prefix. */
    char prefix[32];
    int layer, used = 0;
    if (sscanf(gguf, "blk.%d.%n", &layer, &used) == 1 && used) snprintf(prefix, sizeof prefix, "layers.%d.", layer);
    else if (!strncmp(gguf, "mtp.0.", 6)) { used = 6; snprintf(prefix, sizeof prefix, "mtp.0."); }
    else return -1;
    for (size_t i = 0; i < sizeof LAYER_MAP / sizeof *LAYER_MAP; i++)
        if (!strcmp(gguf + used, LAYER_MAP[i].gguf)) {
            char suffix[128];
            snprintf(suffix, sizeof suffix, LAYER_MAP[i].hf, e);
            snprintf(out, n, "%s%s", prefix, suffix);
            return 0;
        }
    if (used != 6) return -1;
    for (size_t i = 0; i < sizeof MTP_MAP / sizeof *MTP_MAP; i++)
        if (!strcmp(gguf + used, MTP_MAP[i].gguf)) { snprintf(out, n, "mtp.0.%s", MTP_MAP[i].hf); return 0; }
    return -1;
}

/* Fill one GGUF tensor. Its dims are [n0, n1] (or [n0, n1, E] for routed
 * experts, filled expert by expert from E separate HF matrices); each HF
 * source is [n1, n0] (HF stores [out, in], GGUF lists dims innermost first),
 * so rows map to rows without transposition. */
static int convert_tensor(conv *c, const ds4_tensor_spec *sp, sink *s, char *err, size_t errlen) {
    const uint64_t n0 = sp->dims[0], n1 = sp->n_dims > 1 ? sp->dims[1] : 1;
    const uint64_t n_src = sp->n_dims > 2 ? sp->dims[2] : 1;
    const uint64_t rb = ggml_row_bytes(sp->type, n0);
    const imatrix_entry *ie = c->im ? imatrix_find(c->im, sp->name) : NULL;
    if (ie && ie->n != n0 && ie->n != n0 * n_src)
        return snprintf(err, errlen, "imatrix entry %s has %u values, expected %llu or %llu", sp->name, ie->n,
                        (unsigned long long)n0, (unsigned long long)(n0 * n_src)), -1;
    for (uint64_t e = 0; e < n_src; e++) {
        char name[256];
        if (hf_name(sp->name, (int)e, name, sizeof name))
            return snprintf(err, errlen, "no Hugging Face source known for %s", sp->name), -1;
        st_weight w;
        if (st_weight_get(c->ck, name, &w, err, errlen)) return -1;
        /* Expected HF shape: [n1, n0], or [n0] for a 1-D GGUF tensor. */
        bool one_d = sp->n_dims == 1;
        if (w.cols != n0 || w.rows != n1 || (one_d ? w.w->ndim != 1 : w.w->ndim != 2)) {
            char want[64];
            if (one_d) snprintf(want, sizeof want, "[%llu]", (unsigned long long)n0);
            else snprintf(want, sizeof want, "[%llu, %llu]", (unsigned long long)n1, (unsigned long long)n0);
            return snprintf(err, errlen, "%s: tensor %s has shape [%llu%s%llu], expected %s (for %s)", w.w->file, name,
                            (unsigned long long)w.w->shape[0], w.w->ndim > 1 ? ", " : "",
                            w.w->ndim > 1 ? (unsigned long long)w.w->shape[1] : 0ull, want, sp->name), -1;
        }
        if (sp->type == GGML_I32) {
            /* Hash routing table: expert ids, checked against the expert count. */
            if (w.kind != ST_W_INT)
                return snprintf(err, errlen, "%s: %s must be an integer tensor (I64/I32), not %s", w.w->file, name,
                                st_dtype_name(w.w->dtype)), -1;
            for (uint64_t r = 0; r < n1; r++) {
                uint8_t *o = sink_reserve(s, rb, err, errlen);
                if (!o) return -1;
                for (uint64_t i = 0; i < n0; i++) {
                    int64_t v = st_weight_int(&w, r * n0 + i);
                    if (v < 0 || v >= (int64_t)c->hp->n_expert)
                        return snprintf(err, errlen, "%s: %s[%llu][%llu] = %lld is not an expert id (0..%u)", w.w->file,
                                        name, (unsigned long long)r, (unsigned long long)i, (long long)v,
                                        c->hp->n_expert - 1), -1;
                    int32_t v32 = (int32_t)v;
                    memcpy(o + 4 * i, &v32, 4);
                }
            }
            continue;
        }
        if (w.kind == ST_W_INT)
            return snprintf(err, errlen, "%s: %s is an integer tensor, expected floats", w.w->file, name), -1;
        /* Importance: the imatrix entry when given; for IQ2_XXS without one,
         * the per-column sum of squares of this matrix (what the published
         * legacy files used, spec §8), which needs a first pass. */
        const float *imp = NULL;
        if (ie) {
            const float *v = ie->values + (ie->n == n0 ? 0 : e * n0);
            for (uint64_t i = 0; i < n0; i++) c->imp[i] = ie->ncall > 0 ? v[i] / ie->ncall : v[i];
            imp = c->imp;
        } else if (sp->type == GGML_IQ2_XXS) {
            memset(c->imp, 0, n0 * sizeof *c->imp);
            for (uint64_t r = 0; r < n1; r++) {
                st_weight_row(&w, r, c->rows[0]);
                for (uint64_t i = 0; i < n0; i++) c->imp[i] += c->rows[0][i] * c->rows[0][i];
            }
            imp = c->imp;
        }
        /* Batches of whole rows of about one output chunk. */
        const uint64_t batch = rb >= CHUNK_BYTES ? 1 : CHUNK_BYTES / rb;
        for (uint64_t r = 0; r < n1; r += batch) {
            uint64_t nr = n1 - r < batch ? n1 - r : batch;
            uint8_t *o = sink_reserve(s, nr * rb, err, errlen);
            if (!o || encode_rows(c, &w, sp->type, r, nr, n0, rb, imp, o, err, errlen)) return -1;
        }
    }
    return sink_flush(s, err, errlen);
}

static uint32_t file_type(ds4_mix mix) {
    /* llama.cpp LLAMA_FTYPE ids, informational (ds4 does not read the key):
     * ALL_F32 0, MOSTLY_Q4_K_M 15, MOSTLY_IQ2_XXS 19 (as ds4-synth writes). */
    return mix == DS4_MIX_F32 ? 0 : mix == DS4_MIX_Q4 ? 15 : 19;
}

typedef struct {
    const char *dir, *tok_path, *imatrix_path, *mix_s;
    ds4_mix mix;
    uint32_t bos, eos;
    bool quiet;
    int n_threads;
} opts;

/* Write one GGUF: the main file (mtp = false) or the MTP draft block. The
 * MTP file carries the deepseek4.* keys but no tokenizer (spec §2.5: it
 * reuses the main file's embedding, head and vocabulary). */
static int write_file(const opts *o, const st_ckpt *ck, const ds4_hparams *hp, const imatrix *im, bool mtp,
                      const char *out, char *err, size_t errlen) {
    int rc = -1;
    int n = ds4_layout(hp, o->mix, mtp, NULL, 0);
    ds4_tensor_spec *specs = calloc((size_t)n, sizeof *specs);
    int64_t *widx = calloc((size_t)n, sizeof *widx);
    gguf_writer *w = gguf_writer_new(32);
    conv c = {.ck = ck, .hp = hp, .im = im, .n_threads = o->n_threads};
    sink s = {0};
    if (!specs || !widx || !w) { snprintf(err, errlen, "out of memory"); goto out; }
    ds4_layout(hp, o->mix, mtp, specs, n);

    /* Every tensor the layout names must exist before a byte is written
     * (shapes and dtypes are checked as each one is converted; a failure
     * then removes the partial file). */
    for (int i = 0; i < n; i++) {
        char name[256];
        if (hf_name(specs[i].name, 0, name, sizeof name)) {
            snprintf(err, errlen, "no Hugging Face source known for %s", specs[i].name);
            goto out;
        }
        if (!st_find(ck, name)) {
            snprintf(err, errlen, "%s: missing tensor %s (needed for %s)", o->dir, name, specs[i].name);
            goto out;
        }
    }

    ds4_hparams_write(hp, w);
    gguf_set_str(w, "general.name", mtp ? "DeepSeek V4 MTP (ds4-convert)" : "DeepSeek V4 (ds4-convert)");
    gguf_set_u32(w, "general.file_type", file_type(o->mix));
    if (!mtp && hf_write_tokenizer(o->tok_path, hp->n_vocab, o->bos, o->eos, w, err, errlen)) goto out;
    if (im) imatrix_write_meta(im, o->imatrix_path, w);

    uint64_t total = 0, max_n0 = 0;
    for (int i = 0; i < n; i++) {
        widx[i] = gguf_add_tensor(w, specs[i].name, specs[i].type, specs[i].n_dims, specs[i].dims);
        total += gguf_writer_tensor_bytes(w, widx[i]);
        if (specs[i].dims[0] > max_n0) max_n0 = specs[i].dims[0];
    }
    if (gguf_writer_begin(w, out, err, errlen)) goto out;

    for (int t = 0; t < c.n_threads; t++)
        if (!(c.rows[t] = malloc(max_n0 * sizeof *c.rows[t]))) { snprintf(err, errlen, "out of memory"); goto out; }
    c.imp = malloc(max_n0 * sizeof *c.imp);
    s.buf = malloc(CHUNK_BYTES);
    s.cap = CHUNK_BYTES;
    if (!c.imp || !s.buf) { snprintf(err, errlen, "out of memory"); goto out; }
    c.prog = (progress){.total = total, .t0 = now(),
                        .mode = o->quiet ? PROGRESS_OFF : isatty(2) ? PROGRESS_BAR : PROGRESS_LINES};
    s.w = w;
    s.prog = &c.prog;
    for (int i = 0; i < n; i++) {
        s.idx = widx[i];
        s.off = 0;
        s.name = specs[i].name;
        if (convert_tensor(&c, &specs[i], &s, err, errlen)) {
            if (c.prog.mode == PROGRESS_BAR) fputc('\n', stderr);
            goto out;
        }
    }
    progress_draw(&c.prog, "", true);
    if (gguf_writer_finish(w, err, errlen)) goto out;
    fprintf(stderr, "ds4-convert: wrote %s: %d tensors, %.3f GB of tensor data (mix %s%s)\n", out, n, total / 1e9,
            o->mix_s, im ? ", imatrix" : "");
    rc = 0;
out:
    gguf_writer_free(w);   /* removes a begun, unfinished file */
    free(s.buf);
    for (int t = 0; t < MAX_THREADS; t++) free(c.rows[t]);
    free(c.imp);
    free(specs);
    free(widx);
    return rc;
}

int main(int argc, char **argv) {
    opts o = {.mix_s = "q2"};
    const char *out = NULL, *mtp_out = NULL;
    long threads = sysconf(_SC_NPROCESSORS_ONLN);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--mix") && i + 1 < argc) o.mix_s = argv[++i];
        else if (!strcmp(a, "--imatrix") && i + 1 < argc) o.imatrix_path = argv[++i];
        else if (!strcmp(a, "--tokenizer") && i + 1 < argc) o.tok_path = argv[++i];
        else if (!strcmp(a, "--mtp") && i + 1 < argc) mtp_out = argv[++i];
        else if (!strcmp(a, "--quiet")) o.quiet = true;
        else if (!strcmp(a, "--threads") && i + 1 < argc) {
            char *end;
            threads = strtol(argv[++i], &end, 10);
            if (*end || threads < 1) { fprintf(stderr, "ds4-convert: --threads needs a positive count\n"); return 2; }
        }
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (a[0] == '-' && a[1]) { fprintf(stderr, "ds4-convert: unknown option %s\n", a); usage(stderr); return 2; }
        else if (!o.dir) o.dir = a;
        else if (!out) out = a;
        else { usage(stderr); return 2; }
    }
    if (!o.dir || !out) { usage(stderr); return 2; }
    if (!strcmp(o.mix_s, "f32")) o.mix = DS4_MIX_F32;
    else if (!strcmp(o.mix_s, "q2")) o.mix = DS4_MIX_Q2;
    else if (!strcmp(o.mix_s, "q4")) o.mix = DS4_MIX_Q4;
    else { fprintf(stderr, "ds4-convert: --mix must be f32, q2 or q4 (got %s)\n", o.mix_s); return 2; }
    o.n_threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : (int)threads;

    char err[1024], path[4096], tok[4096];
    int rc = 1;
    ds4_hparams hp;
    st_ckpt *ck = NULL;
    imatrix *im = NULL;
    snprintf(path, sizeof path, "%s/config.json", o.dir);
    if (hf_read_config(path, &hp, &o.bos, &o.eos, err, sizeof err)) goto fail;
    if (mtp_out && hp.n_mtp == 0) {
        snprintf(err, sizeof err, "%.900s: num_nextn_predict_layers is 0, so there is no MTP block to convert", path);
        goto fail;
    }
    if (!o.tok_path) {
        snprintf(tok, sizeof tok, "%s/tokenizer.json", o.dir);
        o.tok_path = tok;
    }
    if (!(ck = st_open_dir(o.dir, err, sizeof err))) goto fail;
    if (o.imatrix_path && !(im = imatrix_load(o.imatrix_path, err, sizeof err))) goto fail;
    if (write_file(&o, ck, &hp, im, false, out, err, sizeof err)) goto fail;
    if (mtp_out && write_file(&o, ck, &hp, im, true, mtp_out, err, sizeof err)) goto fail;
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "ds4-convert: %s\n", err);
done:
    imatrix_free(im);
    st_close(ck);
    return rc;
}
