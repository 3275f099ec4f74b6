/* Session pool: N resident sessions, routed by shared prefix, backed by the
 * disk checkpoint store (docs/kv-cache.md).
 *
 * The routing policy is ds4_pool_choose, a pure function of what each slot
 * holds; the pool object applies it: spill the victim to disk, bring the
 * chosen session to the longest prefix of the prompt it can get (its own
 * tokens, or a disk checkpoint when that is longer), and save checkpoints at
 * aligned frontiers. One thread uses a pool at a time (the server's worker). */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds4.h"

static size_t common_prefix(const int32_t *a, size_t na, const int32_t *b, size_t nb) {
    size_t n = 0, m = na < nb ? na : nb;
    while (n < m && a[n] == b[n]) n++;
    return n;
}

ds4_pool_choice ds4_pool_choose(const ds4_pool_slot_info *slots, int n_slots, const int32_t *prompt,
                                size_t n_prompt, size_t min_share, size_t min_spill) {
    ds4_pool_choice c = {.slot = -1};
    if (n_slots <= 0) return c;
    /* 1. Follow-up of a conversation: the prompt repeats everything the slot
     *    held, or at least the slot's whole previous prompt (the client
     *    re-rendered the reply differently, e.g. dropped old reasoning, or
     *    asks again). What is cut is that stale reply: no spill. */
    int best = -1;
    size_t best_lcp = 0;
    for (int i = 0; i < n_slots; i++) {
        const ds4_pool_slot_info *s = &slots[i];
        if (!s->n) continue;
        size_t l = common_prefix(s->ids, s->n, prompt, n_prompt);
        bool follow = l == s->n || (s->n_prompt && l >= s->n_prompt);
        if (follow && (best < 0 || l > best_lcp || (l == best_lcp && s->idle_s < slots[best].idle_s))) {
            best = i;
            best_lcp = l;
        }
    }
    if (best >= 0) return (ds4_pool_choice){best, best_lcp, false};
    /* 2. A free slot: a side request or a new conversation never displaces
     *    one that is resident while there is room. */
    for (int i = 0; i < n_slots; i++)
        if (!slots[i].n) return (ds4_pool_choice){i, 0, false};
    /* 3. Full: the slot sharing the longest prefix (a rewind or branch of
     *    it) when that share is substantial, else the least valuable slot. */
    for (int i = 0; i < n_slots; i++) {
        size_t l = common_prefix(slots[i].ids, slots[i].n, prompt, n_prompt);
        if (best < 0 || l > best_lcp) { best = i; best_lcp = l; }
    }
    if (best_lcp < min_share || best_lcp == 0) {
        double low = 0;
        for (int i = 0; i < n_slots; i++) {
            const ds4_pool_slot_info *s = &slots[i];
            double v = ds4_kv_value(s->n, s->uses, s->idle_s);
            if (i == 0 || v < low) { low = v; best = i; }
        }
        best_lcp = common_prefix(slots[best].ids, slots[best].n, prompt, n_prompt);
    }
    c.slot = best;
    c.reuse = best_lcp;
    c.spill = min_spill && slots[best].n - best_lcp >= min_spill;
    return c;
}
