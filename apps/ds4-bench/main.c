/* ds4-bench: prefill and decode speed at growing context frontiers.
 *
 * Loads the model once and walks one fixed pseudo-random token sequence: it
 * prefills up to --ctx-start, then at every frontier (ctx-start, +step-incr,
 * … ≤ ctx-max) it snapshots the session, times a fixed generation of
 * --gen-tokens tokens (greedy, or --sampled as the server's default
 * requests sample), restores the snapshot (so generation never changes
 * the sequence being walked) and times the prefill of the next interval.
 * One CSV row per frontier. Speed goals live here, never in timed tests. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds4.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void usage(FILE *out)
{
    fprintf(out,
"usage: ds4-bench -m FILE [options]\n"
"  -m, --model FILE     GGUF model (default ./ds4flash.gguf)\n"
"      --cpu | --cuda   backend (default: CUDA when available)\n"
"      --threads N      CPU threads (default: all cores)\n"
"      --ctx-start N    first frontier (default 2048)\n"
"      --ctx-max N      last frontier (default 32768)\n"
"      --step-incr N    distance between frontiers (default 2048)\n"
"      --gen-tokens N   tokens generated at each frontier (default 64)\n"
"      --sampled        generate by sampling with the server's defaults (T 1.0,\n"
"                       min-p 0.05, seed 1): every token's logits then go to the\n"
"                       host sampler; default greedy (only the token comes back)\n"
"      --seed S         seed of the token sequence (default 1)\n"
"  -o, --csv FILE       write the CSV there (default stdout)\n"
"CSV columns: ctx, prefill_tok_s (the interval that reached this frontier),\n"
"gen_tok_s, kv_bytes, weight_bytes_per_token, gen_weight_GB_s (weight bytes\n"
"per token x gen tok/s: the achieved read bandwidth of decode).\n");
}

static long arg_long(const char *opt, const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "ds4-bench: %s expects an integer in [%ld, %ld], got '%s'\n", opt, lo, hi, s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    const char *model = "ds4flash.gguf", *csv = NULL;
    ds4_backend_kind backend = DS4_BACKEND_AUTO;
    int threads = 0;
    long ctx_start = 2048, ctx_max = 32768, step = 2048, gen = 64, seed = 1;
    bool sampled = false;
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'}, {"cpu", no_argument, 0, 'C'},
        {"cuda", no_argument, 0, 'G'}, {"threads", required_argument, 0, 't'},
        {"ctx-start", required_argument, 0, 's'}, {"ctx-max", required_argument, 0, 'x'},
        {"step-incr", required_argument, 0, 'i'}, {"gen-tokens", required_argument, 0, 'g'},
        {"seed", required_argument, 0, 'S'}, {"csv", required_argument, 0, 'o'}, {"sampled", no_argument, 0, 'P'},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "m:o:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'C': backend = DS4_BACKEND_CPU; break;
        case 'G': backend = DS4_BACKEND_CUDA; break;
        case 't': threads = (int)arg_long("--threads", optarg, 1, 1024); break;
        case 's': ctx_start = arg_long("--ctx-start", optarg, 1, 1L << 20); break;
        case 'x': ctx_max = arg_long("--ctx-max", optarg, 1, 1L << 20); break;
        case 'i': step = arg_long("--step-incr", optarg, 1, 1L << 20); break;
        case 'g': gen = arg_long("--gen-tokens", optarg, 0, 1L << 16); break;
        case 'S': seed = arg_long("--seed", optarg, 0, 1L << 30); break;
        case 'o': csv = optarg; break;
        case 'P': sampled = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (ctx_max < ctx_start) { fprintf(stderr, "ds4-bench: --ctx-max is below --ctx-start\n"); return 2; }

    char err[512];
    ds4_engine_params p = { .model_path = model, .backend = backend, .n_threads = threads };
    ds4_engine *e = ds4_engine_open(&p, err, sizeof err);
    if (!e) { fprintf(stderr, "ds4-bench: %s\n", err); return 1; }
    uint32_t nv = ds4_engine_n_vocab(e);
    uint32_t ctx = (uint32_t)(ctx_max + gen + 1);
    ds4_session *s = ds4_session_new(e, ctx, err, sizeof err);
    if (!s) { fprintf(stderr, "ds4-bench: %s\n", err); ds4_engine_close(e); return 1; }
    FILE *out = csv ? fopen(csv, "w") : stdout;
    if (!out) { fprintf(stderr, "ds4-bench: cannot write %s: %s\n", csv, strerror(errno)); return 1; }

    /* The walked sequence: fixed pseudo-random ordinary token ids (a BOS
     * first), identical for every run with the same seed and vocabulary. */
    int32_t *seq = malloc((size_t)ctx_max * sizeof *seq);
    uint64_t x = 0x9e3779b97f4a7c15ull * (uint64_t)(seed + 1);
    uint32_t lo = nv > 1000 ? 100 : 3, span = (nv > 100000 ? 100000 : nv) - lo;
    seq[0] = ds4_tokenizer_special(ds4_engine_tokenizer(e))->bos;
    for (long i = 1; i < ctx_max; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        seq[i] = (int32_t)(lo + x % span);
    }
    uint64_t wbytes = ds4_engine_weight_bytes_per_token(e);
    fprintf(stderr, "ds4-bench: %s backend, %u vocab, %.2f GB weights read per token\n",
            ds4_engine_backend_name(e), nv, wbytes / 1e9);
    fprintf(out, "ctx,prefill_tok_s,gen_tok_s,kv_bytes,weight_bytes_per_token,gen_weight_GB_s\n");
    fflush(out);

    ds4_sampling sp = ds4_sampling_defaults(false);
    sp.seed = 1;
    ds4_sampler *smp = sampled ? ds4_sampler_new(&sp, nv) : NULL;
    int status = 0;
    long done = 0;
    for (long frontier = ctx_start; frontier <= ctx_max; frontier += step) {
        double t0 = now_s();
        if (ds4_session_eval(s, seq + done, (size_t)(frontier - done), NULL, NULL, NULL, err, sizeof err)) {
            fprintf(stderr, "ds4-bench: prefill to %ld: %s\n", frontier, err);
            status = 1;
            break;
        }
        double prefill_tps = (frontier - done) / (now_s() - t0);
        done = frontier;

        uint8_t *snap = NULL;
        size_t snap_len = 0;
        if (gen && ds4_session_save(s, &snap, &snap_len)) {
            fprintf(stderr, "ds4-bench: snapshot failed at %ld\n", frontier);
            status = 1;
            break;
        }
        double gen_tps = 0;
        if (gen) {
            t0 = now_s();
            for (long i = 0; i < gen; i++) {
                int32_t tok = smp ? ds4_sample(smp, ds4_session_logits(s), false) : ds4_session_argmax(s);
                if (ds4_session_eval(s, &tok, 1, NULL, NULL, NULL, err, sizeof err)) {
                    fprintf(stderr, "ds4-bench: decode at %ld: %s\n", frontier + i, err);
                    status = 1;
                    break;
                }
            }
            gen_tps = gen / (now_s() - t0);
            if (!status && ds4_session_load(s, snap, snap_len, err, sizeof err)) {
                fprintf(stderr, "ds4-bench: restore at %ld: %s\n", frontier, err);
                status = 1;
            }
            free(snap);
            if (status) break;
        }
        fprintf(out, "%ld,%.1f,%.2f,%llu,%llu,%.1f\n", frontier, prefill_tps, gen_tps,
                (unsigned long long)ds4_session_kv_bytes(s), (unsigned long long)wbytes,
                wbytes * gen_tps / 1e9);
        fflush(out);
        if (frontier + step > ctx_max) break;
    }
    ds4_sampler_free(smp);
    free(seq);
    if (out != stdout) fclose(out);
    ds4_session_free(s);
    ds4_engine_close(e);
    return status;
}
