/* HF tokenizer.json loader (tests and ds4-tokbench build the tokenizer from
 * the DeepSeek V3 tokenizer.json plus the known V4 special ids, since no V4
 * file is available; the engine itself loads from GGUF). */
#include "text/tokenizer_internal.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#define MAX_JSON_BYTES (256u << 20)

static char *read_file(const char *path, size_t *len, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) { snprintf(err, errlen, "%s: cannot open", path); return NULL; }
    char *buf = NULL;
    long n = -1;
    if (fseek(f, 0, SEEK_END) == 0) n = ftell(f);
    if (n < 0 || (unsigned long)n > MAX_JSON_BYTES || fseek(f, 0, SEEK_SET) != 0) {
        snprintf(err, errlen, "%s: unreadable or larger than %u bytes", path, MAX_JSON_BYTES);
    } else if (!(buf = malloc((size_t)n + 1))) {
        snprintf(err, errlen, "%s: out of memory", path);
    } else if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
        snprintf(err, errlen, "%s: short read", path);
        free(buf);
        buf = NULL;
    } else {
        buf[n] = 0;
        *len = (size_t)n;
    }
    fclose(f);
    return buf;
}

static cJSON *parse_file(const char *path, char *err, size_t errlen) {
    size_t len;
    char *buf = read_file(path, &len, err, errlen);
    if (!buf) return NULL;
    cJSON *j = cJSON_ParseWithLength(buf, len);
    free(buf);
    if (!j) snprintf(err, errlen, "%s: not valid JSON", path);
    return j;
}

/* Puts a copy of s at id, replacing what was there. */
static int set_token(char **tok, uint32_t n, double id, const char *s, const char *path, char *err, size_t errlen) {
    if (!(id >= 0 && id < n) || (double)(uint32_t)id != id) {
        snprintf(err, errlen, "%s: token id %g is out of range", path, id);
        return -1;
    }
    char *c = strdup(s);
    if (!c) { snprintf(err, errlen, "%s: out of memory", path); return -1; }
    free(tok[(uint32_t)id]);
    tok[(uint32_t)id] = c;
    return 0;
}

ds4_tokenizer *tok_load_hf_json(const char *path, const char *overlay, uint32_t n_vocab, char *err, size_t errlen) {
    ds4_tokenizer *t = NULL;
    char **tok = NULL, **mer = NULL;
    uint32_t n = 0, n_mer = 0;
    cJSON *ov = NULL, *j = parse_file(path, err, errlen);
    if (!j) return NULL;
    if (overlay && !(ov = parse_file(overlay, err, errlen))) goto done;

    cJSON *model = cJSON_GetObjectItemCaseSensitive(j, "model");
    cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    cJSON *added = cJSON_GetObjectItemCaseSensitive(j, "added_tokens");
    cJSON *known = ov ? cJSON_GetObjectItemCaseSensitive(ov, "known_ids") : NULL;
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges)) {
        snprintf(err, errlen, "%s: no model.vocab object / model.merges array", path);
        goto done;
    }
    if (ov && !cJSON_IsObject(known)) {
        snprintf(err, errlen, "%s: no known_ids object", overlay);
        goto done;
    }
    /* The vocabulary size: the largest id anywhere, or n_vocab. */
    double max_id = (double)n_vocab - 1;
    cJSON *it;
    cJSON_ArrayForEach(it, vocab) if (cJSON_IsNumber(it) && it->valuedouble > max_id) max_id = it->valuedouble;
    cJSON_ArrayForEach(it, added) {
        cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        if (cJSON_IsNumber(id) && id->valuedouble > max_id) max_id = id->valuedouble;
    }
    cJSON_ArrayForEach(it, known) if (cJSON_IsNumber(it) && it->valuedouble > max_id) max_id = it->valuedouble;
    if (!(max_id >= 0 && max_id < (1 << 24))) {
        snprintf(err, errlen, "%s: token ids up to %g are not plausible", path, max_id);
        goto done;
    }
    n = (uint32_t)max_id + 1;
    tok = calloc(n, sizeof *tok);
    if (!tok) { snprintf(err, errlen, "%s: out of memory", path); goto done; }
    cJSON_ArrayForEach(it, vocab) {
        if (!cJSON_IsNumber(it)) { snprintf(err, errlen, "%s: vocab entry is not a number", path); goto done; }
        if (set_token(tok, n, it->valuedouble, it->string, path, err, errlen)) goto done;
    }
    cJSON_ArrayForEach(it, added) {
        cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        cJSON *content = cJSON_GetObjectItemCaseSensitive(it, "content");
        if (!cJSON_IsNumber(id) || !cJSON_IsString(content)) {
            snprintf(err, errlen, "%s: added_tokens entry without id/content", path);
            goto done;
        }
        if (set_token(tok, n, id->valuedouble, content->valuestring, path, err, errlen)) goto done;
    }
    cJSON_ArrayForEach(it, known) {
        if (!cJSON_IsNumber(it)) { snprintf(err, errlen, "%s: known_ids value is not a number", overlay); goto done; }
        if (set_token(tok, n, it->valuedouble, it->string, overlay, err, errlen)) goto done;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (tok[i]) continue;
        if (i < 128000) { snprintf(err, errlen, "%s: no token with id %u", path, i); goto done; }
        char name[64];
        snprintf(name, sizeof name, "<｜place▁holder▁no▁%u｜>", i - 128000);
        if (set_token(tok, n, i, name, path, err, errlen)) goto done;
    }

    /* Merges: "a b" strings, or [a, b] pairs joined here with one space. */
    n_mer = (uint32_t)cJSON_GetArraySize(merges);
    mer = calloc(n_mer ? n_mer : 1, sizeof *mer);
    if (!mer) { snprintf(err, errlen, "%s: out of memory", path); goto done; }
    uint32_t r = 0;
    cJSON_ArrayForEach(it, merges) {
        if (cJSON_IsString(it)) {
            mer[r] = strdup(it->valuestring);
        } else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 && cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
            const char *a = cJSON_GetArrayItem(it, 0)->valuestring, *b = cJSON_GetArrayItem(it, 1)->valuestring;
            size_t la = strlen(a), lb = strlen(b);
            if ((mer[r] = malloc(la + lb + 2))) {
                memcpy(mer[r], a, la);
                mer[r][la] = ' ';
                memcpy(mer[r] + la + 1, b, lb + 1);
            }
        } else {
            snprintf(err, errlen, "%s: merge %u is neither \"a b\" nor [a, b]", path, r);
            goto done;
        }
        if (!mer[r]) { snprintf(err, errlen, "%s: out of memory", path); goto done; }
        r++;
    }
    t = ds4_tokenizer_new((const char *const *)tok, NULL, n, (const char *const *)mer, NULL, n_mer, err, errlen);

done:
    if (tok) for (uint32_t i = 0; i < n; i++) free(tok[i]);
    if (mer) for (uint32_t i = 0; i < n_mer; i++) free(mer[i]);
    free(tok);
    free(mer);
    cJSON_Delete(j);
    cJSON_Delete(ov);
    return t;
}
