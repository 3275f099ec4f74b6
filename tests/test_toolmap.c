/* ds4-server's tool-call id -> raw DSML map: lookups, replacement, LRU
 * eviction at the bound. The server file is compiled in directly (it is not
 * part of the library). */
#include "../apps/ds4-server/toolmap.c"
#include "test.h"

static void test_put_get(void) {
    toolmap *m = toolmap_new(4);
    REQUIRE(m);
    toolmap_put(m, "call_a", "\n\n<block a>");
    char *r = toolmap_get(m, "call_a");
    CHECK(r && strcmp(r, "\n\n<block a>") == 0, "got %s", r ? r : "(null)");
    free(r);
    CHECK(toolmap_get(m, "call_b") == NULL);
    CHECK(toolmap_get(m, NULL) == NULL);
    toolmap_put(m, "call_a", "replaced");
    r = toolmap_get(m, "call_a");
    CHECK(r && strcmp(r, "replaced") == 0);
    free(r);
    toolmap_put(m, NULL, "x");   /* ignored */
    toolmap_free(m);
}

static void test_lru_eviction(void) {
    toolmap *m = toolmap_new(3);
    REQUIRE(m);
    toolmap_put(m, "1", "one");
    toolmap_put(m, "2", "two");
    toolmap_put(m, "3", "three");
    free(toolmap_get(m, "1"));          /* 1 becomes the most recent */
    toolmap_put(m, "4", "four");        /* evicts 2, the least recent */
    char *r;
    CHECK((r = toolmap_get(m, "2")) == NULL); free(r);
    CHECK((r = toolmap_get(m, "1")) != NULL); free(r);
    CHECK((r = toolmap_get(m, "3")) != NULL); free(r);
    CHECK((r = toolmap_get(m, "4")) != NULL); free(r);
    CHECK(m->n == 3, "size %zu", m->n);
    toolmap_free(m);
}

static void test_many(void) {
    /* Far more ids than the bound: the size stays at the bound, the newest survive. */
    toolmap *m = toolmap_new(100);
    REQUIRE(m);
    char id[32], raw[32];
    for (int i = 0; i < 10000; i++) {
        snprintf(id, sizeof id, "call_%d", i);
        snprintf(raw, sizeof raw, "raw %d", i);
        toolmap_put(m, id, raw);
    }
    CHECK(m->n == 100, "size %zu", m->n);
    char *r = toolmap_get(m, "call_9999");
    CHECK(r && strcmp(r, "raw 9999") == 0);
    free(r);
    CHECK((r = toolmap_get(m, "call_9899")) == NULL); free(r);
    CHECK((r = toolmap_get(m, "call_9900")) != NULL); free(r);
    toolmap_free(m);
}

int main(void) {
    RUN(test_put_get);
    RUN(test_lru_eviction);
    RUN(test_many);
    TEST_END();
}
