/* Backend interface: what the engine asks of a compute backend (CPU reference,
 * CUDA), and the canonical host form of a session's KV state.
 *
 * Every backend keeps the same LOGICAL state (spec model.md §7), so a
 * snapshot written by one restores on another (same format, same counts;
 * the values are each backend's own arithmetic):
 *
 *   per layer
 *     raw     the K=V rows (head_dim f32 each, after RoPE + FP8 simulation,
 *             rounded through f16) of positions lo_raw … n−1: the last
 *             ds4_kv_keep_raw() positions (window + slack), so a rewind of
 *             up to window + 1 tokens stays exact;
 *     comp    every compressed attention row emitted so far, floor(n/R) rows
 *             of head_dim (f16-rounded), R = compress ratio (0: none);
 *     cpend   the attention compressor's per-position inputs — projected kv
 *             (W f32) and gate + ape (W f32), unrounded — of positions
 *             lo_comp … n−1, the last ds4_kv_keep_comp() of them.
 *             This is ds4's "frontier" (partial block and, for ratio 4, the
 *             previous block's lane-a data) plus rewind slack: a block's row
 *             is computed from exactly these inputs, so nothing else is needed.
 *             Positions before the first block simply do not exist (ds4 writes
 *             −inf gates there; same result: weight 0);
 *     idx     indexer compressed rows (ratio 4 only), floor(n/4) × idx_head_dim;
 *     ipend   the indexer compressor's inputs (2·idx_head_dim each), as cpend.
 *
 * The retained windows are part of the state, so every backend tracks lo_*
 * by the same rule: after an eval reaching n,
 * lo = max(lo, n − keep) (keep = ds4_kv_keep_raw / ds4_kv_keep_comp);
 * truncate to n keeps lo (lo = min(lo, n); 0 after truncating to 0); import
 * takes lo from the snapshot.
 *
 * Token ids and next-token logits live in the session (src/engine/session.c),
 * which serialises this struct (format documented there). */
#ifndef DS4_BACKEND_H
#define DS4_BACKEND_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/model.h"

/* Extra positions kept beyond what the next token needs: a rewind (truncate)
 * of up to this many tokens + 1 is always exact. One window's worth. */
static inline uint32_t ds4_kv_slack(const ds4_hparams *hp) { return hp->window; }
/* Raw-ring positions kept per layer. */
static inline uint32_t ds4_kv_keep_raw(const ds4_hparams *hp) { return hp->window + ds4_kv_slack(hp); }
/* Overlapping (two-lane) compression is used exactly by ratio-4 compressors. */
static inline uint32_t ds4_comp_lanes(int ratio) { return ratio == 4 ? 2u : 1u; }
/* Compressor input positions kept: the current block, the previous one for
 * two lanes, plus slack. */
static inline uint32_t ds4_kv_keep_comp(const ds4_hparams *hp, int ratio) {
    return ds4_comp_lanes(ratio) * (uint32_t)ratio + ds4_kv_slack(hp);
}

/* What continuing at position n needs of one layer: raw rows from
 * max(0, n−window+1), compressor inputs from the current block's start (and
 * the previous block's with two lanes). lo_* are the first positions a
 * backend still holds. Returns a description of what is missing, or NULL.
 * Every backend's truncate and import ask this one rule. */
static inline const char *ds4_kv_missing(const ds4_hparams *hp, int ratio, int lanes, uint32_t lo_raw,
                                         uint32_t lo_c, uint32_t lo_i, uint32_t n) {
    uint32_t need = n > hp->window - 1 ? n - (hp->window - 1) : 0;
    if (need < n && need < lo_raw) return "raw window rows";
    if (ratio) {
        uint32_t R = (uint32_t)ratio, bs = n / R * R;
        uint32_t from = lanes == 2 && bs >= R ? bs - R : bs;
        if (from < n && from < lo_c) return "attention compressor frontier";
        if (ratio == 4 && from < n && from < lo_i) return "indexer compressor frontier";
    }
    return NULL;
}

/* The bookkeeping of truncating one layer to n positions: rows past n stop
 * counting; the data itself stays where it is. */
static inline void ds4_kv_truncate_counts(int ratio, uint32_t n, uint32_t *lo_raw, uint32_t *lo_c, uint32_t *lo_i,
                                          uint32_t *n_comp, uint32_t *n_idx) {
    if (n == 0) *lo_raw = *lo_c = *lo_i = 0;
    if (*lo_raw > n) *lo_raw = n;
    if (*lo_c > n) *lo_c = n;
    if (*lo_i > n) *lo_i = n;
    if (ratio) *n_comp = n / (uint32_t)ratio;
    if (ratio == 4) *n_idx = n / 4;
}

typedef struct {
    uint32_t lo_raw, n_raw;     /* raw rows of positions lo_raw … lo_raw+n_raw−1 (= n−1) */
    float *raw;                 /* n_raw × head_dim */
    uint32_t n_comp;            /* compressed rows 0 … n_comp−1 */
    float *comp;                /* n_comp × head_dim */
    uint32_t lo_comp, n_cpend;  /* compressor inputs of positions lo_comp … */
    float *ckv, *cgate;         /* n_cpend × W each */
    uint32_t n_idx;
    float *idx;                 /* n_idx × idx_head_dim */
    uint32_t lo_idx, n_ipend;
    float *ikv, *igate;         /* n_ipend × 2·idx_head_dim each */
} ds4_kv_layer_host;

typedef struct {
    uint32_t n_tokens;          /* positions held */
    uint32_t n_layer;
    ds4_kv_layer_host *layers;  /* n_layer entries; arrays malloc'ed */
} ds4_kv_host;

void ds4_kv_host_free(ds4_kv_host *h);

/* A backend. `be` is the backend's own context, `st` a session's state.
 * eval evaluates n tokens appended at the state's end: logits receives the
 * last token's n_vocab logits, or n × n_vocab when all_logits. truncate keeps
 * the first n positions when that is exact, else −1 with a message naming
 * what is missing. export/import move the logical state (above) to and from
 * host memory; import validates every count against the hparams and ctx. */
typedef struct {
    const char *name;
    bool (*available)(void);                     /* e.g. a GPU is present */
    void *(*create)(const ds4_model *m, int n_threads, char *err, size_t errlen);
    void (*destroy)(void *be);
    void *(*state_new)(void *be, uint32_t ctx, char *err, size_t errlen);
    void (*state_free)(void *be, void *st);
    /* Bytes of the logical state in use (above, f32) and allocated. */
    void (*state_bytes)(void *be, const void *st, uint64_t *in_use, uint64_t *allocated);
    int (*eval)(void *be, void *st, const int32_t *ids, size_t n, float *logits, bool all_logits,
                char *err, size_t errlen);
    int (*truncate)(void *be, void *st, uint32_t n, char *err, size_t errlen);
    int (*export_state)(void *be, const void *st, ds4_kv_host *out, char *err, size_t errlen);
    int (*import_state)(void *be, void *st, const ds4_kv_host *in, char *err, size_t errlen);
    /* Bytes the backend's device can still give to sessions, asked after
     * the weights are in place (how many resident sessions fit). */
    int (*mem_free)(void *be, uint64_t *bytes, char *err, size_t errlen);
    /* Tokens one eval call should take at most: the backend's own batch
     * (a longer call gains nothing), so callers that report progress or
     * check for cancellation between calls lose no speed by splitting. */
    uint32_t (*eval_step)(void *be);
    /* Optional (NULL: malloc / free): host memory eval's logits land in
     * fastest. CUDA: page-locked, so the copy of a decode step's logits is
     * one DMA into it instead of a staged copy through the driver's own
     * pinned buffer. NULL when out of memory. */
    void *(*host_alloc)(void *be, size_t bytes);
    void (*host_free)(void *be, void *p);
    /* eval without copying logits out: the last token's logits stay in the
     * state (on a GPU, in device memory) and *top gets their ds4_argmax, so
     * a greedy decode step brings back only the token. last_logits copies
     * those kept logits to the host; valid after eval_top, until the state's
     * next eval or truncate. */
    int (*eval_top)(void *be, void *st, const int32_t *ids, size_t n, int32_t *top, char *err, size_t errlen);
    int (*last_logits)(void *be, const void *st, float *out, char *err, size_t errlen);
} ds4_backend_ops;

extern const ds4_backend_ops ds4_backend_cpu;

/* Registered backends, preferred first (src/engine/engine.c). */
const ds4_backend_ops *ds4_backend_find(int kind);

#endif
