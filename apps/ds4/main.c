/* ds4 — command-line front end: one-shot prompts, an interactive chat REPL,
 * and the diagnostics the tests and oracle scripts use (--inspect,
 * --dump-tokens, --dump-logits, --dump-logprobs). Everything goes through
 * the public API in ds4.h. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ds4.h"
#include "cli.h"

static void usage(FILE *out)
{
    fprintf(out,
"usage: ds4 [options]                 chat REPL (no -p)\n"
"       ds4 -p TEXT [options]         one-shot prompt, streams the answer\n"
"       ds4 --inspect -m FILE         print the model's layout and memory needs\n"
"\n"
"model and backend:\n"
"  -m, --model FILE       GGUF model (default ./ds4flash.gguf)\n"
"      --mtp FILE         optional MTP GGUF\n"
"      --ctx N            context size in tokens (default 32768)\n"
"      --cpu | --cuda     force a backend (default: CUDA when built with it and a GPU is present)\n"
"      --threads N        CPU threads (default: DS4_THREADS or all cores)\n"
"  -v, --verbose          timing and backend details on stderr\n"
"prompt:\n"
"  -p, --prompt TEXT      user message (one-shot mode)\n"
"      --prompt-file F    read the user message from a file\n"
"      --system TEXT      system prompt\n"
"      --think | --nothink | --think-max\n"
"                         reasoning mode (default --think; --think-max needs --ctx >= 393216,\n"
"                         below that it runs as --think)\n"
"sampling:\n"
"  -n, --max-tokens N     tokens to generate (default: until EOS or the context is full)\n"
"      --temp T           temperature (0 = greedy)   --top-p P   --top-k K   --min-p P\n"
"      --seed S           sampler seed (default 0)\n"
"                         defaults: T 1.0, top-p 1.0, top-k off, min-p 0.05 (spec prompt.md §5.1)\n"
"diagnostics:\n"
"      --inspect          print architecture, per-layer kinds, quant mix, parameters,\n"
"                         file size and the memory estimate for --ctx\n"
"      --dump-tokens      tokenize the prompt (-p/--prompt-file, special spellings\n"
"                         recognised) and print id and piece per token; no model run\n"
"      --tokens LIST      comma-separated token ids to evaluate (or --tokens-file F,\n"
"                         whitespace/comma separated)\n"
"      --dump-logits OUT  with --tokens: write f32 logits of every position\n"
"                         (n_tokens x n_vocab, little-endian) to OUT\n"
"      --dump-logprobs F  greedy continuation of the prompt (-n tokens) written as JSON\n"
"                         with the top alternatives of each step\n"
"      --logprobs-top-k K alternatives per step for --dump-logprobs (default 5)\n"
"  -h, --help             this text\n"
"\n"
"REPL commands: /help /think /think-max /nothink /ctx N /read FILE /system TEXT\n"
"               /save FILE /load FILE /quit   (Ctrl+C stops a reply, Ctrl+D quits)\n");
}

enum {
    OPT_MTP = 256, OPT_CTX, OPT_CPU, OPT_CUDA, OPT_THREADS, OPT_PROMPT_FILE, OPT_SYSTEM,
    OPT_THINK, OPT_NOTHINK, OPT_THINK_MAX, OPT_TEMP, OPT_TOP_P, OPT_TOP_K, OPT_MIN_P, OPT_SEED,
    OPT_INSPECT, OPT_DUMP_TOKENS, OPT_TOKENS, OPT_TOKENS_FILE, OPT_DUMP_LOGITS,
    OPT_DUMP_LOGPROBS, OPT_LOGPROBS_K,
};

static const struct option long_opts[] = {
    {"model", required_argument, 0, 'm'},      {"mtp", required_argument, 0, OPT_MTP},
    {"ctx", required_argument, 0, OPT_CTX},    {"cpu", no_argument, 0, OPT_CPU},
    {"cuda", no_argument, 0, OPT_CUDA},        {"threads", required_argument, 0, OPT_THREADS},
    {"verbose", no_argument, 0, 'v'},          {"prompt", required_argument, 0, 'p'},
    {"prompt-file", required_argument, 0, OPT_PROMPT_FILE},
    {"system", required_argument, 0, OPT_SYSTEM},
    {"think", no_argument, 0, OPT_THINK},      {"nothink", no_argument, 0, OPT_NOTHINK},
    {"think-max", no_argument, 0, OPT_THINK_MAX},
    {"max-tokens", required_argument, 0, 'n'}, {"temp", required_argument, 0, OPT_TEMP},
    {"top-p", required_argument, 0, OPT_TOP_P},{"top-k", required_argument, 0, OPT_TOP_K},
    {"min-p", required_argument, 0, OPT_MIN_P},{"seed", required_argument, 0, OPT_SEED},
    {"inspect", no_argument, 0, OPT_INSPECT},  {"dump-tokens", no_argument, 0, OPT_DUMP_TOKENS},
    {"tokens", required_argument, 0, OPT_TOKENS},
    {"tokens-file", required_argument, 0, OPT_TOKENS_FILE},
    {"dump-logits", required_argument, 0, OPT_DUMP_LOGITS},
    {"dump-logprobs", required_argument, 0, OPT_DUMP_LOGPROBS},
    {"logprobs-top-k", required_argument, 0, OPT_LOGPROBS_K},
    {"help", no_argument, 0, 'h'},             {0, 0, 0, 0},
};

/* Strict number parsing: the whole argument must be a number in range. */
static int parse_long(const char *opt, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "ds4: %s expects an integer in [%ld, %ld], got '%s'\n", opt, lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_float(const char *opt, const char *s, float lo, float hi, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "ds4: %s expects a number in [%g, %g], got '%s'\n", opt, lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    cli_opts o;
    memset(&o, 0, sizeof o);
    o.model = "ds4flash.gguf";
    o.ctx = 32768;
    o.think = DS4_THINK_HIGH;
    o.max_tokens = -1;
    o.logprobs_k = 5;
    o.sampling = ds4_sampling_defaults(true);
    long l;
    int c;
    while ((c = getopt_long(argc, argv, "m:p:n:vh", long_opts, NULL)) != -1) {
        switch (c) {
        case 'm': o.model = optarg; break;
        case OPT_MTP: o.mtp = optarg; break;
        case OPT_CTX: if (parse_long("--ctx", optarg, 16, 1L << 20, &l)) return 2; o.ctx = (uint32_t)l; break;
        case OPT_CPU: o.backend = DS4_BACKEND_CPU; break;
        case OPT_CUDA: o.backend = DS4_BACKEND_CUDA; break;
        case OPT_THREADS: if (parse_long("--threads", optarg, 1, 1024, &l)) return 2; o.threads = (int)l; break;
        case 'v': o.verbose = true; break;
        case 'p': o.prompt = optarg; break;
        case OPT_PROMPT_FILE: o.prompt_file = optarg; break;
        case OPT_SYSTEM: o.system = optarg; break;
        case OPT_THINK: o.think = DS4_THINK_HIGH; break;
        case OPT_NOTHINK: o.think = DS4_THINK_NONE; break;
        case OPT_THINK_MAX: o.think = DS4_THINK_MAX; break;
        case 'n': if (parse_long("-n", optarg, 0, 1L << 20, &l)) return 2; o.max_tokens = (int)l; break;
        case OPT_TEMP: if (parse_float("--temp", optarg, 0, 100, &o.sampling.temperature)) return 2; break;
        case OPT_TOP_P: if (parse_float("--top-p", optarg, 0, 1, &o.sampling.top_p)) return 2; break;
        case OPT_TOP_K: if (parse_long("--top-k", optarg, 0, 1L << 20, &l)) return 2; o.sampling.top_k = (int)l; break;
        case OPT_MIN_P: if (parse_float("--min-p", optarg, 0, 1, &o.sampling.min_p)) return 2; break;
        case OPT_SEED: {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(optarg, &end, 10);
            if (errno || end == optarg || *end || optarg[0] == '-') { fprintf(stderr, "ds4: --seed expects an unsigned integer, got '%s'\n", optarg); return 2; }
            o.sampling.seed = v;
            break;
        }
        case OPT_INSPECT: o.inspect = true; break;
        case OPT_DUMP_TOKENS: o.dump_tokens = true; break;
        case OPT_TOKENS: o.tokens = optarg; break;
        case OPT_TOKENS_FILE: o.tokens_file = optarg; break;
        case OPT_DUMP_LOGITS: o.dump_logits = optarg; break;
        case OPT_DUMP_LOGPROBS: o.dump_logprobs = optarg; break;
        case OPT_LOGPROBS_K: if (parse_long("--logprobs-top-k", optarg, 1, 100, &l)) return 2; o.logprobs_k = (int)l; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "ds4: unexpected argument '%s' (the prompt goes after -p)\n", argv[optind]);
        return 2;
    }
    if (o.prompt && o.prompt_file) {
        fprintf(stderr, "ds4: give either -p or --prompt-file, not both\n");
        return 2;
    }
    if ((o.tokens || o.tokens_file) && !o.dump_logits) {
        fprintf(stderr, "ds4: --tokens/--tokens-file go with --dump-logits OUT\n");
        return 2;
    }
    if (o.dump_logits && !(o.tokens || o.tokens_file)) {
        fprintf(stderr, "ds4: --dump-logits needs --tokens or --tokens-file\n");
        return 2;
    }

    if (o.inspect) return cli_inspect(&o);
    if (o.dump_tokens) return cli_dump_tokens(&o);
    if (o.dump_logits) return cli_dump_logits(&o);
    if (o.dump_logprobs) return cli_dump_logprobs(&o);
    if (o.prompt || o.prompt_file) return cli_oneshot(&o);
    return cli_repl(&o);
}
