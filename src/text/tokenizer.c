/* Byte-level BPE tokenizer (prompt.md §1).
 *
 * Tables built once at load:
 * - spelling -> id (open addressing), for lookups by exact text;
 * - (left id, right id) -> merge rank, and rank -> merged id, so BPE works
 *   on ids and never builds strings;
 * - each token's output bytes (specials verbatim, BPE tokens through the
 *   inverse byte table);
 * - a byte trie of special spellings for ds4_tokenize_special.
 * Encoding caches the ids of each pre-tokenizer piece: text repeats its
 * pieces (words, indentation) so most pieces skip BPE entirely. */
#include "ds4.h"
#include "text/pretok.h"
#include "text/tokenizer_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ---- Token vectors ----------------------------------------------------- */

void ds4_tokens_push(ds4_tokens *t, int32_t id) {
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        int32_t *ids = realloc(t->ids, cap * sizeof *ids);
        if (!ids) { fputs("ds4: out of memory growing a token vector\n", stderr); abort(); }
        t->ids = ids;
        t->cap = cap;
    }
    t->ids[t->n++] = id;
}

void ds4_tokens_free(ds4_tokens *t) {
    free(t->ids);
    t->ids = NULL;
    t->n = t->cap = 0;
}

/* ---- Hashing ------------------------------------------------------------ */

static uint64_t hash_bytes(const void *p, size_t n) {
    const uint8_t *s = p;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
        s += 8; n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, s, n);
    h = (h ^ w) * 0x94D049BB133111EBull;
    h ^= h >> 29;
    return h;
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDull;
    x ^= x >> 33;
    return x;
}

/* Smallest power of two >= 2n (load factor <= 1/2), at least 16. */
static uint32_t table_size(uint32_t n) {
    uint32_t s = 16;
    while (s < 2 * (uint64_t)n) s <<= 1;
    return s;
}

/* ---- The tokenizer ------------------------------------------------------ */

/* Merge table slot, one word so the table (2 MiB for DeepSeek) stays in
 * cache: left id + 1 (20 bits) | right id + 1 (20 bits) | rank (24 bits);
 * 0 = empty. The merged token is merge_id[rank]. */
#define MAX_TOKENS ((1u << 20) - 1)
#define MAX_MERGES (1u << 24)
#define NO_MERGE UINT32_MAX
typedef struct { int32_t child, sibling, token; uint8_t byte; } trie_node;

/* Piece cache: pieces up to CACHE_MAX_PIECE bytes; when a limit is reached it
 * is simply cleared (bounded memory, no eviction bookkeeping). */
#define CACHE_SLOTS (1u << 16)
#define CACHE_MAX_ENTRIES (CACHE_SLOTS / 2)
#define CACHE_MAX_PIECE 256
#define CACHE_KEY_CAP (4u << 20)
#define CACHE_IDS_CAP (1u << 20)
/* key_len 0 = empty. a, b: the key's words (n <= 16) or its hash (n > 16).
 * ids_off: the id itself when ids_len is 1. */
typedef struct { uint64_t a, b; uint32_t key_len, key_off, ids_off, ids_len; } cache_slot;

struct ds4_tokenizer {
    uint32_t n_vocab;
    char *text;          /* spellings, back to back */
    uint64_t *text_off;  /* n_vocab + 1 */
    char *bytes;         /* output bytes per token */
    uint64_t *bytes_off; /* n_vocab + 1 */
    uint8_t *special;
    uint32_t *vocab_ht, vocab_mask; /* id + 1, 0 = empty */
    uint64_t *merge_ht;
    uint32_t merge_mask;
    int32_t *merge_id;   /* rank -> merged token */
    int32_t byte_id[256];
    trie_node *trie;     /* node 0 is the root */
    uint32_t n_trie;
    bool first_byte[256]; /* bytes a special spelling can start with */
    ds4_special_ids sp;

    pthread_mutex_t mu;  /* guards the cache */
    cache_slot *cache;
    uint32_t cache_n;
    char *cache_keys;
    uint32_t cache_keys_len;
    int32_t *cache_ids;
    uint32_t cache_ids_len;
};

/* GPT-2 byte <-> code point alphabet (prompt.md §1.2). */
static uint32_t byte_cp[256];
static int16_t cp_byte[324]; /* inverse, -1 = not in the table */
static pthread_once_t alphabet_once = PTHREAD_ONCE_INIT;
static void alphabet_init(void) {
    uint32_t next = 256;
    for (int i = 0; i < 324; i++) cp_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        byte_cp[b] = printable ? (uint32_t)b : next++;
        cp_byte[byte_cp[b]] = (int16_t)b;
    }
}

static size_t put_utf8(uint32_t cp, char *o) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

int32_t ds4_token_lookup(const ds4_tokenizer *t, const char *s, size_t len) {
    for (uint32_t i = (uint32_t)hash_bytes(s, len) & t->vocab_mask;; i = (i + 1) & t->vocab_mask) {
        uint32_t v = t->vocab_ht[i];
        if (!v) return -1;
        uint32_t id = v - 1;
        if (t->text_off[id + 1] - t->text_off[id] == len && !memcmp(t->text + t->text_off[id], s, len))
            return (int32_t)id;
    }
}

static inline uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t)(a + 1) << 20 | (uint64_t)(b + 1); }

/* Rank of merging a then b, or NO_MERGE. */
static uint32_t merge_rank(const ds4_tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = pair_key(a, b);
    for (uint32_t i = (uint32_t)hash_u64(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        uint64_t v = t->merge_ht[i];
        if (!v) return NO_MERGE;
        if (v >> 24 == key) return (uint32_t)(v & (MAX_MERGES - 1));
    }
}

void ds4_tokenizer_free(ds4_tokenizer *t) {
    if (!t) return;
    free(t->text); free(t->text_off); free(t->bytes); free(t->bytes_off); free(t->special);
    free(t->vocab_ht); free(t->merge_ht); free(t->merge_id); free(t->trie);
    free(t->cache); free(t->cache_keys); free(t->cache_ids);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

/* The control tokens the engine needs (§1.1), in ds4_special_ids order. */
static const char *const required_names[7] = {
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<think>", "</think>", "｜DSML｜",
};

static bool is_required(const char *s, size_t n) {
    for (int i = 0; i < 7; i++)
        if (strlen(required_names[i]) == n && !memcmp(required_names[i], s, n)) return true;
    return false;
}

#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); ds4_tokenizer_free(t); return NULL; } while (0)

/* Output bytes of a BPE spelling: each code point through the inverse byte
 * table; code points outside it (and invalid UTF-8) are dropped (§1.7). */
static size_t spelling_bytes(const uint8_t *s, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int k = tok_utf8_seq(s + i, n - i, &cp);
        if (k <= 0) { i++; continue; }
        i += (size_t)k;
        if (cp < 324 && cp_byte[cp] >= 0) out[o++] = (char)cp_byte[cp];
    }
    return o;
}

static int trie_add(ds4_tokenizer *t, const uint8_t *s, size_t n, int32_t id, uint32_t *cap) {
    int32_t node = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t c = t->trie[node].child;
        while (c >= 0 && t->trie[c].byte != s[i]) c = t->trie[c].sibling;
        if (c < 0) {
            if (t->n_trie == *cap) {
                uint32_t nc = *cap * 2;
                trie_node *nt = realloc(t->trie, nc * sizeof *nt);
                if (!nt) return -1;
                t->trie = nt;
                *cap = nc;
            }
            c = (int32_t)t->n_trie++;
            t->trie[c] = (trie_node){-1, t->trie[node].child, -1, s[i]};
            t->trie[node].child = c;
        }
        node = c;
    }
    if (t->trie[node].token < 0) t->trie[node].token = id; /* duplicate spelling: first id wins */
    return 0;
}

/* Longest special spelling that starts at s[0..n): its length, id in *id. */
static size_t trie_match(const ds4_tokenizer *t, const uint8_t *s, size_t n, int32_t *id) {
    size_t best = 0;
    int32_t node = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t c = t->trie[node].child;
        while (c >= 0 && t->trie[c].byte != s[i]) c = t->trie[c].sibling;
        if (c < 0) break;
        node = c;
        if (t->trie[node].token >= 0) { best = i + 1; *id = t->trie[node].token; }
    }
    return best;
}

ds4_tokenizer *tok_build(const char *const *tokens, const uint64_t *token_lens, uint32_t n_tokens,
                         const char *const *merges, const uint64_t *merge_lens, uint32_t n_merges,
                         const uint8_t *special, char *err, size_t errlen) {
    pthread_once(&alphabet_once, alphabet_init);
    ds4_tokenizer *t = calloc(1, sizeof *t);
    if (!t) { snprintf(err, errlen, "tokenizer: out of memory"); return NULL; }
    pthread_mutex_init(&t->mu, NULL);
    if (n_tokens < 256 || n_tokens > MAX_TOKENS)
        FAIL("tokenizer: vocabulary of %u tokens (must be 256..%u)", n_tokens, MAX_TOKENS);
    if (n_merges >= MAX_MERGES) FAIL("tokenizer: %u merges (at most %u)", n_merges, MAX_MERGES - 1);
    t->n_vocab = n_tokens;

    /* Spellings and the spelling -> id table. */
    uint64_t total = 0;
    for (uint32_t i = 0; i < n_tokens; i++) {
        if (!tokens[i]) FAIL("tokenizer: token %u is missing", i);
        uint64_t n = token_lens ? token_lens[i] : strlen(tokens[i]);
        if (n == 0 || n > 4096) FAIL("tokenizer: token %u has length %llu", i, (unsigned long long)n);
        total += n;
    }
    t->text = malloc(total ? total : 1);
    t->text_off = malloc((n_tokens + 1) * sizeof *t->text_off);
    t->bytes = malloc(total ? total : 1); /* output bytes are never longer than the spelling */
    t->bytes_off = malloc((n_tokens + 1) * sizeof *t->bytes_off);
    t->special = calloc(n_tokens, 1);
    uint32_t vsize = table_size(n_tokens);
    t->vocab_ht = calloc(vsize, sizeof *t->vocab_ht);
    t->vocab_mask = vsize - 1;
    uint32_t trie_cap = 1024;
    t->trie = malloc(trie_cap * sizeof *t->trie);
    if (!t->text || !t->text_off || !t->bytes || !t->bytes_off || !t->special || !t->vocab_ht || !t->trie)
        FAIL("tokenizer: out of memory");
    t->trie[0] = (trie_node){-1, -1, -1, 0};
    t->n_trie = 1;

    uint64_t off = 0, boff = 0;
    for (uint32_t i = 0; i < n_tokens; i++) {
        uint64_t n = token_lens ? token_lens[i] : strlen(tokens[i]);
        char *s = t->text + off;
        memcpy(s, tokens[i], n);
        t->text_off[i] = off;
        t->bytes_off[i] = boff;
        off += n;
        t->text_off[i + 1] = off;
        if (ds4_token_lookup(t, s, n) < 0) { /* duplicates keep the first id */
            uint32_t h = (uint32_t)hash_bytes(s, n) & t->vocab_mask;
            while (t->vocab_ht[h]) h = (h + 1) & t->vocab_mask;
            t->vocab_ht[h] = i + 1;
        }
        /* The seven required tokens are special whatever the flags say: they
         * must decode verbatim and be matched as control tokens. */
        t->special[i] = special[i] || is_required(s, (size_t)n);
        if (t->special[i]) {
            memcpy(t->bytes + boff, s, n);
            boff += n;
            t->first_byte[(uint8_t)s[0]] = true;
            if (trie_add(t, (const uint8_t *)s, n, (int32_t)i, &trie_cap)) FAIL("tokenizer: out of memory");
        } else {
            boff += spelling_bytes((const uint8_t *)s, n, t->bytes + boff);
        }
        t->bytes_off[i + 1] = boff;
    }

    /* Every byte must have its single-symbol token: BPE starts from them. */
    for (int b = 0; b < 256; b++) {
        char u[4];
        size_t n = put_utf8(byte_cp[b], u);
        t->byte_id[b] = ds4_token_lookup(t, u, n);
        if (t->byte_id[b] < 0) FAIL("tokenizer: no token for byte 0x%02X (spelled U+%04X)", b, byte_cp[b]);
    }

    /* Merges: "left right" -> rank = index. */
    uint32_t msize = table_size(n_merges);
    t->merge_ht = calloc(msize, sizeof *t->merge_ht);
    t->merge_id = malloc((n_merges ? n_merges : 1) * sizeof *t->merge_id);
    if (!t->merge_ht || !t->merge_id) FAIL("tokenizer: out of memory");
    t->merge_mask = msize - 1;
    char *cat = malloc(8192 + 2);
    if (!cat) FAIL("tokenizer: out of memory");
    for (uint32_t r = 0; r < n_merges; r++) {
        const char *m = merges[r];
        uint64_t n = m ? (merge_lens ? merge_lens[r] : strlen(m)) : 0;
        const char *sp = m && n ? memchr(m, ' ', n) : NULL;
        if (!sp || sp == m || sp == m + n - 1 || n > 8192) {
            free(cat);
            FAIL("tokenizer: merge %u is not \"left right\"", r);
        }
        size_t ln = (size_t)(sp - m), rn = (size_t)(n - ln - 1);
        int32_t a = ds4_token_lookup(t, m, ln), b = ds4_token_lookup(t, sp + 1, rn);
        memcpy(cat, m, ln);
        memcpy(cat + ln, sp + 1, rn);
        int32_t ab = ds4_token_lookup(t, cat, ln + rn);
        if (a < 0 || b < 0 || ab < 0) {
            free(cat);
            FAIL("tokenizer: merge %u (\"%.*s\") names a token not in the vocabulary", r, (int)(n > 200 ? 200 : n), m);
        }
        uint64_t key = pair_key(a, b);
        uint32_t h = (uint32_t)hash_u64(key) & t->merge_mask;
        while (t->merge_ht[h] && t->merge_ht[h] >> 24 != key) h = (h + 1) & t->merge_mask;
        if (!t->merge_ht[h]) t->merge_ht[h] = key << 24 | r; /* repeated pair: lowest rank */
        t->merge_id[r] = ab;
    }
    free(cat);

    /* The control tokens the engine needs (§1.1): missing one is an error. */
    int32_t *dst[7] = {&t->sp.bos, &t->sp.eos, &t->sp.user, &t->sp.assistant, &t->sp.think, &t->sp.think_end,
                       &t->sp.dsml};
    for (int i = 0; i < 7; i++) {
        *dst[i] = ds4_token_lookup(t, required_names[i], strlen(required_names[i]));
        if (*dst[i] < 0) FAIL("tokenizer: required token %s is not in the vocabulary", required_names[i]);
    }

    t->cache = calloc(CACHE_SLOTS, sizeof *t->cache);
    t->cache_keys = malloc(CACHE_KEY_CAP);
    t->cache_ids = malloc(CACHE_IDS_CAP * sizeof *t->cache_ids);
    if (!t->cache || !t->cache_keys || !t->cache_ids) FAIL("tokenizer: out of memory");
    return t;
}

/* The array rule (§1.5/§1.7): a token is special when its spelling contains
 * U+FF5C or is <think> / </think>. BPE spellings never contain U+FF5C: the
 * byte-level alphabet only has code points below U+0144. */
ds4_tokenizer *ds4_tokenizer_new(const char *const *tokens, const uint64_t *token_lens, uint32_t n_tokens,
                                 const char *const *merges, const uint64_t *merge_lens, uint32_t n_merges,
                                 char *err, size_t errlen) {
    if (n_tokens > MAX_TOKENS) {
        snprintf(err, errlen, "tokenizer: vocabulary of %u tokens (must be 256..%u)", n_tokens, MAX_TOKENS);
        return NULL;
    }
    uint8_t *special = calloc(n_tokens ? n_tokens : 1, 1);
    if (!special) { snprintf(err, errlen, "tokenizer: out of memory"); return NULL; }
    for (uint32_t i = 0; i < n_tokens; i++) {
        if (!tokens[i]) continue; /* tok_build reports it */
        size_t n = token_lens ? token_lens[i] : strlen(tokens[i]);
        special[i] = memmem(tokens[i], n, "\xEF\xBD\x9C", 3) != NULL || (n == 7 && !memcmp(tokens[i], "<think>", 7)) ||
                     (n == 8 && !memcmp(tokens[i], "</think>", 8));
    }
    ds4_tokenizer *t = tok_build(tokens, token_lens, n_tokens, merges, merge_lens, n_merges, special, err, errlen);
    free(special);
    return t;
}

uint32_t ds4_tokenizer_n_vocab(const ds4_tokenizer *t) { return t->n_vocab; }
const ds4_special_ids *ds4_tokenizer_special(const ds4_tokenizer *t) { return &t->sp; }

/* ---- BPE ---------------------------------------------------------------
 * Symbols form a linked list over the piece's bytes; candidate pairs sit in
 * a min-heap of words rank << 32 | left position, whose integer order is
 * exactly "lowest rank first, leftmost on ties". Entries are checked when
 * popped (lazy deletion): a merge invalidates the pairs around it and pushes
 * the two new ones. An entry is current iff its left symbol is alive and
 * the pair there still has its rank (a rank names exactly one pair).
 * O(n log n) per piece and 36 bytes per input byte, so long runs (a
 * megabyte of spaces) stay bounded. */

#define BPE_MAX_PIECE (1u << 30) /* positions fit in int32; longer pieces are cut */

typedef struct { int32_t id; int32_t prev, next; } sym;

static void heap_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (v >= h[up]) break;
        h[i] = h[up];
        i = up;
    }
    h[i] = v;
}

static uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && h[c + 1] < h[c]) c++;
        if (h[c] >= last) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = last;
    return top;
}

static void push_pair(const ds4_tokenizer *t, const sym *s, uint64_t *h, size_t *nh, int32_t pos) {
    int32_t r = s[pos].next;
    if (r < 0) return;
    uint32_t rank = merge_rank(t, s[pos].id, s[r].id);
    if (rank != NO_MERGE) heap_push(h, nh, (uint64_t)rank << 32 | (uint32_t)pos);
}

/* BPE of one piece (n <= BPE_MAX_PIECE); appends its ids to out. Returns how
 * many it appended. */
static size_t bpe(const ds4_tokenizer *t, const uint8_t *p, size_t n, ds4_tokens *out) {
    sym small_s[64];
    uint64_t small_h[3 * 64];
    sym *s = small_s;
    uint64_t *h = small_h;
    if (n > 64) {
        s = malloc(n * sizeof *s);
        h = malloc(3 * n * sizeof *h); /* n-1 initial pairs + at most 2 per merge */
        if (!s || !h) { fputs("ds4: out of memory in BPE\n", stderr); abort(); }
    }
    for (size_t i = 0; i < n; i++) s[i] = (sym){t->byte_id[p[i]], (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1};
    size_t nh = 0;
    for (size_t i = 0; i + 1 < n; i++) push_pair(t, s, h, &nh, (int32_t)i);
    while (nh) {
        uint64_t v = heap_pop(h, &nh);
        uint32_t rank = (uint32_t)(v >> 32);
        int32_t pos = (int32_t)(uint32_t)v, r = s[pos].next;
        if (s[pos].id < 0 || r < 0 || merge_rank(t, s[pos].id, s[r].id) != rank) continue; /* stale */
        s[pos].id = t->merge_id[rank];
        int32_t nx = s[r].next;
        s[pos].next = nx;
        if (nx >= 0) s[nx].prev = pos;
        s[r].id = -1; /* dead */
        if (s[pos].prev >= 0) push_pair(t, s, h, &nh, s[pos].prev);
        push_pair(t, s, h, &nh, pos);
    }
    size_t k = 0;
    for (int32_t i = 0; i >= 0; i = s[i].next, k++) ds4_tokens_push(out, s[i].id);
    if (s != small_s) { free(s); free(h); }
    return k;
}

/* ---- Piece cache (caller holds t->mu) ------------------------------------
 * A piece of up to 16 bytes is held exactly in two words (key_words): most
 * pieces are short words, so a hit costs a hash and two compares, no
 * memcmp. Longer pieces keep their bytes in the key pool. A piece that is
 * one token keeps the id in the slot itself. */

/* Exact (given n) packing of n <= 16 bytes into two words. The loads overlap
 * for lengths that are not 4/8/16, but together they cover every byte, so
 * two keys of the same length are equal iff their words are. */
static inline void key_words(const uint8_t *p, size_t n, uint64_t *a, uint64_t *b) {
    if (n >= 8) {
        memcpy(a, p, 8);
        memcpy(b, p + n - 8, 8);
    } else if (n >= 4) {
        uint32_t x, y;
        memcpy(&x, p, 4);
        memcpy(&y, p + n - 4, 4);
        *a = x | (uint64_t)y << 32;
        *b = 0;
    } else {
        *a = (uint64_t)p[0] | (uint64_t)p[n / 2] << 8 | (uint64_t)p[n - 1] << 16;
        *b = 0;
    }
}

static void cache_clear(ds4_tokenizer *t) {
    memset(t->cache, 0, CACHE_SLOTS * sizeof *t->cache);
    t->cache_n = t->cache_keys_len = t->cache_ids_len = 0;
}

static void encode_piece(ds4_tokenizer *t, const uint8_t *p, size_t n, ds4_tokens *out) {
    if (n == 1) { ds4_tokens_push(out, t->byte_id[p[0]]); return; }
    if (n > CACHE_MAX_PIECE) {
        /* Not cached. A piece over BPE_MAX_PIECE (a gigabyte of one class,
         * never real text) is encoded in cuts rather than refused. */
        for (; n > BPE_MAX_PIECE; p += BPE_MAX_PIECE, n -= BPE_MAX_PIECE) bpe(t, p, BPE_MAX_PIECE, out);
        bpe(t, p, n, out);
        return;
    }
    uint64_t a, b = 0;
    if (n <= 16) {
        key_words(p, n, &a, &b);
    } else {
        a = hash_bytes(p, n);
    }
    uint32_t i = (uint32_t)hash_u64(a ^ (b * 0x9E3779B97F4A7C15ull) ^ n) & (CACHE_SLOTS - 1);
    for (;; i = (i + 1) & (CACHE_SLOTS - 1)) {
        const cache_slot *c = &t->cache[i];
        if (!c->key_len) break;
        if (c->key_len == n && c->a == a && c->b == b &&
            (n <= 16 || !memcmp(t->cache_keys + c->key_off, p, n))) {
            if (c->ids_len == 1) ds4_tokens_push(out, (int32_t)c->ids_off);
            else for (uint32_t k = 0; k < c->ids_len; k++) ds4_tokens_push(out, t->cache_ids[c->ids_off + k]);
            return;
        }
    }
    size_t before = out->n;
    size_t k = bpe(t, p, n, out);
    size_t key_bytes = n > 16 ? n : 0, id_words = k > 1 ? k : 0;
    if (t->cache_n >= CACHE_MAX_ENTRIES || t->cache_keys_len + key_bytes > CACHE_KEY_CAP ||
        t->cache_ids_len + id_words > CACHE_IDS_CAP) {
        cache_clear(t);
        i = (uint32_t)hash_u64(a ^ (b * 0x9E3779B97F4A7C15ull) ^ n) & (CACHE_SLOTS - 1);
    }
    while (t->cache[i].key_len) i = (i + 1) & (CACHE_SLOTS - 1);
    cache_slot *c = &t->cache[i];
    *c = (cache_slot){a, b, (uint32_t)n, t->cache_keys_len, t->cache_ids_len, (uint32_t)k};
    if (k == 1) c->ids_off = (uint32_t)out->ids[before];
    memcpy(t->cache_keys + t->cache_keys_len, p, key_bytes);
    memcpy(t->cache_ids + t->cache_ids_len, out->ids + before, id_words * sizeof *out->ids);
    t->cache_keys_len += (uint32_t)key_bytes;
    t->cache_ids_len += (uint32_t)id_words;
    t->cache_n++;
}

/* ---- Encoding ------------------------------------------------------------ */

typedef struct { ds4_tokenizer *t; ds4_tokens *out; } piece_ctx;

static void on_piece(void *ud, const char *p, size_t n) {
    piece_ctx *c = ud;
    encode_piece(c->t, (const uint8_t *)p, n, c->out);
}

/* Plain text, the cache lock already held. */
static void encode_span(ds4_tokenizer *t, const char *text, size_t len, ds4_tokens *out) {
    piece_ctx c = {t, out};
    tok_pretokenize(text, len, on_piece, &c);
}

/* The cache is shared by all threads; one lock per call (not per piece)
 * keeps the hot loop free of atomics. Concurrent calls serialize, which is
 * negligible next to inference. The tokenizer object is heap-allocated and
 * never const itself, so dropping const here is well-defined. */
static ds4_tokenizer *lock(const ds4_tokenizer *ct) {
    ds4_tokenizer *t = (ds4_tokenizer *)ct;
    pthread_mutex_lock(&t->mu);
    return t;
}

int ds4_tokenize(const ds4_tokenizer *ct, const char *text, size_t len, ds4_tokens *out) {
    ds4_tokenizer *t = lock(ct);
    encode_span(t, text, len, out);
    pthread_mutex_unlock(&t->mu);
    return 0;
}

int ds4_tokenize_special(const ds4_tokenizer *ct, const char *text, size_t len, ds4_tokens *out) {
    ds4_tokenizer *t = lock(ct);
    const uint8_t *s = (const uint8_t *)text;
    size_t start = 0;
    for (size_t i = 0; i < len;) {
        int32_t id;
        size_t m = t->first_byte[s[i]] ? trie_match(t, s + i, len - i, &id) : 0;
        if (!m) { i++; continue; }
        encode_span(t, text + start, i - start, out); /* BPE never crosses a special */
        ds4_tokens_push(out, id);
        i += m;
        start = i;
    }
    encode_span(t, text + start, len - start, out);
    pthread_mutex_unlock(&t->mu);
    return 0;
}

int ds4_tokenize_rendered(const ds4_tokenizer *ct, const ds4_rendered *r, ds4_tokens *out) {
    /* Validate every offset first so a bad rendering appends nothing. */
    size_t prev = 0;
    for (size_t k = 0; k < r->n_special; k++) {
        size_t o = r->special_off[k];
        int32_t id;
        if (o < prev || o >= r->len || !trie_match(ct, (const uint8_t *)r->text + o, r->len - o, &id)) return -1;
        prev = o + trie_match(ct, (const uint8_t *)r->text + o, r->len - o, &id);
    }
    ds4_tokenizer *t = lock(ct);
    size_t start = 0;
    for (size_t k = 0; k < r->n_special; k++) {
        size_t o = r->special_off[k];
        int32_t id;
        size_t m = trie_match(t, (const uint8_t *)r->text + o, r->len - o, &id);
        encode_span(t, r->text + start, o - start, out);
        ds4_tokens_push(out, id);
        start = o + m;
    }
    encode_span(t, r->text + start, r->len - start, out);
    pthread_mutex_unlock(&t->mu);
    return 0;
}

/* ---- Decoding ------------------------------------------------------------- */

size_t ds4_token_bytes(const ds4_tokenizer *t, int32_t id, char *buf, size_t cap) {
    if (id < 0 || (uint32_t)id >= t->n_vocab) return 0;
    size_t n = (size_t)(t->bytes_off[id + 1] - t->bytes_off[id]);
    memcpy(buf, t->bytes + t->bytes_off[id], n < cap ? n : cap);
    return n;
}

/* Emits the complete UTF-8 of in[0..n) to out, U+FFFD for each byte that can
 * start no valid sequence; an incomplete valid tail (at most 3 bytes) goes
 * back to d->pending unless flushing. Returns the bytes needed (written up
 * to cap). */
static size_t emit_utf8(ds4_detok *d, const uint8_t *in, size_t n, bool flush, char *out, size_t cap) {
    size_t o = 0;
    d->n_pending = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int k = tok_utf8_seq(in + i, n - i, &cp);
        if (k < 0 && !flush) {
            memcpy(d->pending, in + i, (size_t)-k);
            d->n_pending = -k;
            break;
        }
        const uint8_t *src = in + i;
        size_t len = (size_t)k;
        if (k <= 0) { src = (const uint8_t *)"\xEF\xBF\xBD"; len = 3; k = 1; }
        for (size_t j = 0; j < len; j++, o++)
            if (o < cap) out[o] = (char)src[j];
        i += (size_t)k;
    }
    return o;
}

size_t ds4_detok_push(ds4_detok *d, const ds4_tokenizer *t, int32_t id, char *out, size_t cap) {
    if (d->n_pending < 0 || d->n_pending > 3) d->n_pending = 0; /* never trust a corrupted state */
    if (id < 0 || (uint32_t)id >= t->n_vocab) return 0; /* nothing to add; pending stays */
    size_t n = (size_t)(t->bytes_off[id + 1] - t->bytes_off[id]);
    uint8_t small[256];
    uint8_t *buf = n + 3 <= sizeof small ? small : malloc(n + 3);
    if (!buf) { fputs("ds4: out of memory in detokenizer\n", stderr); abort(); }
    memcpy(buf, d->pending, (size_t)d->n_pending);
    memcpy(buf + d->n_pending, t->bytes + t->bytes_off[id], n);
    size_t o = emit_utf8(d, buf, (size_t)d->n_pending + n, false, out, cap);
    if (buf != small) free(buf);
    return o;
}

size_t ds4_detok_flush(ds4_detok *d, char *out, size_t cap) {
    if (d->n_pending < 0 || d->n_pending > 3) d->n_pending = 0;
    uint8_t buf[3];
    size_t n = (size_t)d->n_pending;
    memcpy(buf, d->pending, n);
    return emit_utf8(d, buf, n, true, out, cap);
}
