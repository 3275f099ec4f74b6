/* Tokenizer metadata for synthetic files: the DeepSeek V3 byte-level BPE
 * (tokenizer.json) laid out as V4 (spec model.md §12, prompt.md §1.5), or a
 * reduced prefix-closed subset of it for the tiny preset. */
#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "synth.h"
#include "util/errf.h"

/* V4 special tokens known from public sources (prompt.md §1.5,
 * shared/data/tokenizer/deepseek-v4-special-tokens.json); the rest of
 * 128000..129279 is unknown and filled with V3-style placeholders. */
static const struct { uint32_t id; const char *text; } v4_specials[] = {
    {0, "<｜begin▁of▁sentence｜>"}, {1, "<｜end▁of▁sentence｜>"},
    {128803, "<｜User｜>"}, {128804, "<｜Assistant｜>"},
    {128821, "<think>"}, {128822, "</think>"}, {128825, "｜DSML｜"},
    {128828, "<｜latest_reminder｜>"}, {128829, "<｜action｜>"}, {128830, "<｜query｜>"},
    {128831, "<｜authority｜>"}, {128832, "<｜domain｜>"}, {128836, "<｜title｜>"},
    {128845, "<｜read_url｜>"}, {129279, "<｜image｜>"},
};
#define N_SPECIALS (sizeof v4_specials / sizeof v4_specials[0])
#define BPE_IDS 128000u        /* V3 BPE ids 0..127999 (0..2 are its added tokens) */
#define V4_VOCAB 129280u

static char *dup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* string -> id over the BPE vocabulary (open addressing, FNV-1a): merges
 * are resolved 127k times, cJSON's object lookup is linear. */
typedef struct { const char **key; uint32_t *id; uint32_t mask; } smap;

static uint32_t hash(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

static int64_t smap_get(const smap *m, const char *s, size_t n) {
    for (uint32_t i = hash(s, n) & m->mask;; i = (i + 1) & m->mask) {
        if (!m->key[i]) return -1;
        if (strlen(m->key[i]) == n && !memcmp(m->key[i], s, n)) return m->id[i];
    }
}

static void smap_put(smap *m, const char *s, uint32_t id) {
    uint32_t i = hash(s, strlen(s)) & m->mask;
    while (m->key[i]) i = (i + 1) & m->mask;
    m->key[i] = s;
    m->id[i] = id;
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long n = ftell(f);
        /* tokenizer.json is ~8 MB; refuse anything absurd. */
        if (n > 0 && n < (256L << 20) && fseek(f, 0, SEEK_SET) == 0 && (buf = malloc((size_t)n + 1))) {
            if (fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); buf = NULL; }
            else { buf[n] = 0; *len = (size_t)n; }
        }
    }
    fclose(f);
    return buf;
}

/* Number of UTF-8 code points (the byte-level alphabet maps each byte to one). */
static size_t codepoints(const char *s) {
    size_t n = 0;
    for (; *s; s++) n += ((uint8_t)*s & 0xC0) != 0x80;
    return n;
}

void synth_vocab_free(synth_vocab *v) {
    for (uint32_t i = 0; i < v->n; i++) free(v->tok[i]);
    for (uint64_t i = 0; i < v->n_merge; i++) free(v->merge[i]);
    free(v->tok);
    free(v->type);
    free(v->merge);
    memset(v, 0, sizeof *v);
}

int synth_vocab_load(synth_vocab *v, const char *path, uint32_t cutoff, char *err, size_t errlen) {
    memset(v, 0, sizeof *v);
    size_t len = 0;
    char *text = slurp(path, &len);
    if (!text) return ds4_errf(err, errlen, "%s: cannot read tokenizer.json", path);
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges)) {
        cJSON_Delete(root);
        return ds4_errf(err, errlen, "%s: not a BPE tokenizer.json (model.vocab / model.merges missing)", path);
    }
    int rc = -1;
    const char **by_id = calloc(BPE_IDS, sizeof *by_id);
    bool *keep = calloc(BPE_IDS, sizeof *keep);
    int n_merges = cJSON_GetArraySize(merges);
    bool *keep_merge = calloc((size_t)n_merges + 1, sizeof *keep_merge);
    smap map = {calloc(1u << 18, sizeof(char *)), calloc(1u << 18, sizeof(uint32_t)), (1u << 18) - 1};
    if (!by_id || !keep || !keep_merge || !map.key || !map.id) { ds4_errf(err, errlen, "out of memory"); goto out; }

    cJSON *it;
    cJSON_ArrayForEach(it, vocab) {
        double id = cJSON_IsNumber(it) ? it->valuedouble : -1;
        if (id < 0 || id >= BPE_IDS || id != (uint32_t)id || by_id[(uint32_t)id]) {
            ds4_errf(err, errlen, "%s: vocab entry \"%s\": id outside 0..%u or duplicated", path, it->string, BPE_IDS - 1);
            goto out;
        }
        by_id[(uint32_t)id] = it->string;
        smap_put(&map, it->string, (uint32_t)id);
    }
    for (uint32_t i = 0; i < BPE_IDS; i++)
        if (!by_id[i]) { ds4_errf(err, errlen, "%s: vocab has no id %u", path, i); goto out; }

    /* Full layout: every BPE token and merge. Reduced: keep the added
     * tokens 0..2 and every single-symbol (byte) token, then walk merges in
     * rank order keeping those whose parts are kept and whose result id is
     * below the cutoff — the kept set is closed under the kept merges, so any
     * text still tokenizes (down to bytes at worst). */
    uint32_t lim = cutoff ? cutoff : BPE_IDS;
    for (uint32_t i = 0; i < BPE_IDS; i++)
        keep[i] = !cutoff || i < 3 || codepoints(by_id[i]) == 1;
    int mi = 0;
    cJSON_ArrayForEach(it, merges) {
        const char *s = cJSON_GetStringValue(it);
        const char *sp = s ? strchr(s, ' ') : NULL;
        if (!sp || strchr(sp + 1, ' ')) { ds4_errf(err, errlen, "%s: merge %d is not \"a b\"", path, mi); goto out; }
        char joined[512];
        size_t la = (size_t)(sp - s), lb = strlen(sp + 1);
        if (la + lb >= sizeof joined) { ds4_errf(err, errlen, "%s: merge %d too long", path, mi); goto out; }
        memcpy(joined, s, la);
        memcpy(joined + la, sp + 1, lb + 1);
        int64_t a = smap_get(&map, s, la), b = smap_get(&map, sp + 1, lb), r = smap_get(&map, joined, la + lb);
        if (a < 0 || b < 0 || r < 0) { ds4_errf(err, errlen, "%s: merge %d (\"%s\") uses a token not in the vocab", path, mi, s); goto out; }
        if (!cutoff || (keep[a] && keep[b] && (uint32_t)r < lim)) {
            keep_merge[mi] = true;
            keep[r] = true;
            v->n_merge++;
        }
        mi++;
    }

    uint32_t n_bpe = 0;
    for (uint32_t i = 0; i < BPE_IDS; i++) n_bpe += keep[i];
    /* Full: ids 0..129279 (V4 embedding rows). Reduced: kept tokens in
     * their original order, then the V4 specials other than BOS/EOS. */
    v->n = cutoff ? n_bpe + (uint32_t)N_SPECIALS - 2 : V4_VOCAB;
    v->tok = calloc(v->n, sizeof *v->tok);
    v->type = calloc(v->n, sizeof *v->type);
    v->merge = calloc(v->n_merge ? v->n_merge : 1, sizeof *v->merge);
    if (!v->tok || !v->type || !v->merge) { ds4_errf(err, errlen, "out of memory"); goto out; }
    uint32_t k = 0;
    for (uint32_t i = 0; i < BPE_IDS; i++) {
        if (!keep[i]) continue;
        v->tok[k] = dup(by_id[i]);
        v->type[k] = i < 3 ? 3 : 1;   /* 3 = control (BOS, EOS, pad), 1 = normal */
        k++;
    }
    for (uint32_t id = BPE_IDS; !cutoff && id < V4_VOCAB; id++) {
        char ph[64];
        snprintf(ph, sizeof ph, "<｜place▁holder▁no▁%u｜>", id - BPE_IDS);
        v->tok[id] = dup(ph);
        v->type[id] = 3;
    }
    for (size_t s = 0; s < N_SPECIALS; s++) {
        uint32_t id = v4_specials[s].id;
        if (id < 3) continue;   /* BOS/EOS are already ids 0/1 of the V3 vocab */
        if (cutoff) id = k++;
        free(v->tok[id]);
        v->tok[id] = dup(v4_specials[s].text);
        v->type[id] = 3;
    }
    if (strcmp(v->tok[0], v4_specials[0].text) || strcmp(v->tok[1], v4_specials[1].text)) {
        ds4_errf(err, errlen, "%s: ids 0/1 are not BOS/EOS", path);
        goto out;
    }
    uint64_t m = 0;
    mi = 0;
    cJSON_ArrayForEach(it, merges) {
        if (keep_merge[mi++]) v->merge[m++] = dup(cJSON_GetStringValue(it));
    }
    for (uint32_t i = 0; i < v->n; i++)
        if (!v->tok[i]) { ds4_errf(err, errlen, "out of memory"); goto out; }
    for (uint64_t i = 0; i < v->n_merge; i++)
        if (!v->merge[i]) { ds4_errf(err, errlen, "out of memory"); goto out; }
    rc = 0;
out:
    free(by_id);
    free(keep);
    free(keep_merge);
    free(map.key);
    free(map.id);
    cJSON_Delete(root);
    if (rc) synth_vocab_free(v);
    return rc;
}

void synth_vocab_write(const synth_vocab *v, gguf_writer *w) {
    gguf_set_str(w, "tokenizer.ggml.model", "gpt2");
    gguf_set_str(w, "tokenizer.ggml.pre", "joyai-llm");
    gguf_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)v->tok, NULL, v->n);
    gguf_set_arr_i32(w, "tokenizer.ggml.token_type", v->type, v->n);
    gguf_set_arr_str(w, "tokenizer.ggml.merges", (const char *const *)v->merge, NULL, v->n_merge);
    gguf_set_u32(w, "tokenizer.ggml.bos_token_id", 0);
    gguf_set_u32(w, "tokenizer.ggml.eos_token_id", 1);
    /* V4 tokenizer_config: pad_token is EOS; no automatic BOS/EOS. */
    gguf_set_u32(w, "tokenizer.ggml.padding_token_id", 1);
    gguf_set_bool(w, "tokenizer.ggml.add_bos_token", false);
    gguf_set_bool(w, "tokenizer.ggml.add_eos_token", false);
}
