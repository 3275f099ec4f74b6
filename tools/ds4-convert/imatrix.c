/* llama.cpp legacy imatrix reader (see imatrix.h). */
#include "imatrix.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/errf.h"

typedef struct { const uint8_t *p; size_t n, off; } rd;

static int take(rd *r, void *out, size_t n) {
    if (n > r->n - r->off) return -1;
    memcpy(out, r->p + r->off, n);
    r->off += n;
    return 0;
}

static void *fail(imatrix *m, char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    imatrix_free(m);
    return NULL;
}

imatrix *imatrix_load(const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) return fail(NULL, err, errlen, "%s: %s", path, strerror(errno));
    /* Real imatrix files are tens of MB; 4 GB bounds the read. */
    uint8_t *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            if (cap >= (4ull << 30)) { fclose(f); free(buf); return fail(NULL, err, errlen, "%s: larger than 4 GB", path); }
            cap = cap ? 2 * cap : 1 << 20;
            uint8_t *nb = realloc(buf, cap);
            if (!nb) { fclose(f); free(buf); return fail(NULL, err, errlen, "%s: out of memory", path); }
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (!got) break;
    }
    fclose(f);
    rd r = {buf, n, 0};
    imatrix *m = calloc(1, sizeof *m);
    int32_t count;
    if (!m) { free(buf); return fail(NULL, err, errlen, "out of memory"); }
    m->chunks = -1;
    /* Each entry takes at least 12 bytes, which bounds the entry count. */
    if (take(&r, &count, 4) || count <= 0 || (size_t)count > n / 12) {
        free(buf);
        return fail(m, err, errlen, "%s: not a llama.cpp imatrix file (bad entry count)", path);
    }
    m->e = calloc((size_t)count, sizeof *m->e);
    if (!m->e) { free(buf); return fail(m, err, errlen, "out of memory"); }
    for (int32_t i = 0; i < count; i++) {
        int32_t len, ncall, nval;
        if (take(&r, &len, 4) || len <= 0 || len > 4096 || (size_t)len > n - r.off) goto trunc;
        imatrix_entry *e = &m->e[m->n++];
        e->name = calloc((size_t)len + 1, 1);
        if (!e->name || take(&r, e->name, (size_t)len)) goto trunc;
        /* Names are tensor names, quoted in messages: a NUL would cut one
         * short (and match another tensor), a newline would break a message. */
        if (!ds4_one_line(e->name, (size_t)len)) {
            free(buf);
            return fail(m, err, errlen, "%s: entry %u: the name has a NUL or control byte", path, m->n - 1);
        }
        if (take(&r, &ncall, 4) || take(&r, &nval, 4) || nval <= 0 || (size_t)nval > (n - r.off) / 4) goto trunc;
        e->ncall = ncall;
        e->n = (uint32_t)nval;
        e->values = malloc((size_t)nval * 4);
        if (!e->values || take(&r, e->values, (size_t)nval * 4)) goto trunc;
        for (int32_t k = 0; k < nval; k++)
            if (!isfinite(e->values[k]) || e->values[k] < 0) {
                free(buf);
                return fail(m, err, errlen, "%s: entry %s has a negative or non-finite value", path, e->name);
            }
    }
    int32_t chunks, dlen = 0;
    if (!take(&r, &chunks, 4)) {
        m->chunks = chunks;
        if (!take(&r, &dlen, 4) && dlen > 0 && (size_t)dlen <= n - r.off && (m->dataset = calloc((size_t)dlen + 1, 1)))
            take(&r, m->dataset, (size_t)dlen);
        /* Copied into the GGUF's metadata as a string. */
        if (m->dataset && !ds4_one_line(m->dataset, (size_t)dlen)) {
            free(buf);
            return fail(m, err, errlen, "%s: the dataset name has a NUL or control byte", path);
        }
    }
    free(buf);
    return m;
trunc:
    free(buf);
    return fail(m, err, errlen, "%s: truncated or malformed at byte %zu (entry %u)", path, r.off, m->n);
}

void imatrix_free(imatrix *m) {
    if (!m) return;
    for (uint32_t i = 0; i < m->n; i++) { free(m->e[i].name); free(m->e[i].values); }
    free(m->e);
    free(m->dataset);
    free(m);
}

const imatrix_entry *imatrix_find(const imatrix *m, const char *name) {
    for (uint32_t i = 0; i < m->n; i++)
        if (!strcmp(m->e[i].name, name)) return &m->e[i];
    return NULL;
}

void imatrix_write_meta(const imatrix *m, const char *path, gguf_writer *w) {
    const char *base = strrchr(path, '/');
    gguf_set_str(w, "quantize.imatrix.file", base ? base + 1 : path);
    gguf_set_u64(w, "quantize.imatrix.entries_count", m->n);
    if (m->dataset) gguf_set_str(w, "quantize.imatrix.dataset", m->dataset);
    if (m->chunks >= 0) gguf_set_u64(w, "quantize.imatrix.chunks_count", (uint64_t)m->chunks);
}
