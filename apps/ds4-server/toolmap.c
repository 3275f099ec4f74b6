/* Tool-call id -> the exact DSML block the model sampled (prompt.md §5.5).
 *
 * Clients send tool calls back as JSON; re-rendering them canonically would
 * change the prompt bytes and lose the live KV prefix. Remembering the block
 * by id lets the renderer replay it verbatim. Bounded: least recently used
 * entries go first, so a long-running server cannot grow without limit. */
#include "server.h"

#include <stdlib.h>
#include <string.h>

typedef struct entry {
    char *id, *raw;
    struct entry *hnext;          /* hash chain */
    struct entry *prev, *next;    /* LRU list, most recent at head */
} entry;

struct toolmap {
    pthread_mutex_t mu;
    entry **buckets; size_t n_buckets;
    entry *head, *tail;
    size_t n, cap;
};

static size_t hash(const char *s) {
    size_t h = 1469598103934665603u;   /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211u;
    return h;
}

toolmap *toolmap_new(size_t cap) {
    toolmap *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->cap = cap;
    m->n_buckets = cap * 2 + 1;       /* load factor <= 0.5 */
    m->buckets = calloc(m->n_buckets, sizeof *m->buckets);
    if (!m->buckets) { free(m); return NULL; }
    pthread_mutex_init(&m->mu, NULL);
    return m;
}

static void lru_unlink(toolmap *m, entry *e) {
    if (e->prev) e->prev->next = e->next; else m->head = e->next;
    if (e->next) e->next->prev = e->prev; else m->tail = e->prev;
    e->prev = e->next = NULL;
}

static void lru_push(toolmap *m, entry *e) {
    e->next = m->head;
    if (m->head) m->head->prev = e;
    m->head = e;
    if (!m->tail) m->tail = e;
}

static entry **find(toolmap *m, const char *id) {
    entry **pp = &m->buckets[hash(id) % m->n_buckets];
    while (*pp && strcmp((*pp)->id, id) != 0) pp = &(*pp)->hnext;
    return pp;
}

static void drop(toolmap *m, entry *e) {
    entry **pp = find(m, e->id);
    *pp = e->hnext;
    lru_unlink(m, e);
    free(e->id); free(e->raw); free(e);
    m->n--;
}

void toolmap_put(toolmap *m, const char *id, const char *raw) {
    if (!id || !raw) return;
    pthread_mutex_lock(&m->mu);
    entry **pp = find(m, id);
    if (*pp) drop(m, *pp);
    if (m->n >= m->cap && m->tail) drop(m, m->tail);
    entry *e = calloc(1, sizeof *e);
    if (e && (e->id = strdup(id)) && (e->raw = strdup(raw))) {
        pp = find(m, id);
        e->hnext = *pp;
        *pp = e;
        lru_push(m, e);
        m->n++;
    } else if (e) {
        free(e->id); free(e);
    }
    pthread_mutex_unlock(&m->mu);
}

char *toolmap_get(toolmap *m, const char *id) {
    if (!id) return NULL;
    pthread_mutex_lock(&m->mu);
    entry *e = *find(m, id);
    char *r = NULL;
    if (e) {
        lru_unlink(m, e);
        lru_push(m, e);
        r = strdup(e->raw);
    }
    pthread_mutex_unlock(&m->mu);
    return r;
}

int toolmap_encode_for(toolmap *m, const char *text, size_t len, uint8_t **blob, size_t *blob_len) {
    pthread_mutex_lock(&m->mu);
    const char **keys = malloc(sizeof *keys * (m->n + 1)), **vals = malloc(sizeof *vals * (m->n + 1));
    size_t n = 0;
    /* Oldest first: merging the blob back in order restores the recency. */
    for (entry *e = m->tail; keys && vals && e; e = e->prev)
        if (!text || memmem(text, len, e->raw, strlen(e->raw))) { keys[n] = e->id; vals[n] = e->raw; n++; }
    int rc = keys && vals ? ds4_kv_map_encode(keys, vals, n, blob, blob_len) : -1;
    pthread_mutex_unlock(&m->mu);
    free(keys);
    free(vals);
    return rc;
}

static void merge_one(void *ud, const char *key, const char *val) { toolmap_put(ud, key, val); }

int toolmap_merge(toolmap *m, const uint8_t *blob, size_t len) {
    return ds4_kv_map_decode(blob, len, merge_one, m);
}

void toolmap_free(toolmap *m) {
    if (!m) return;
    while (m->head) drop(m, m->head);
    free(m->buckets);
    pthread_mutex_destroy(&m->mu);
    free(m);
}
