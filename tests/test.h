/* Minimal test harness shared by every tests/test_*.c.
 *
 * A test is a function; RUN(fn) calls it and counts it as passed when none of
 * its CHECKs failed. Each binary ends with "N passed, N failed" and exits
 * non-zero on any failure; tests/run.sh sums those lines over the suite. */
#ifndef DS4_TEST_H
#define DS4_TEST_H
#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>
#include <stdbool.h>
#include <unistd.h>
#include <string.h>

static int test_passed_, test_failed_, test_cur_failed_;

/* Not printf-attributed on purpose: CHECK(cond) with no message is allowed. */
static inline void test_note_(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
}

#define CHECK(cond, ...) do { \
    if (!(cond)) { \
        test_cur_failed_++; \
        fprintf(stderr, "  FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        test_note_("" __VA_ARGS__); fputc('\n', stderr); \
    } } while (0)

/* Stop the current test early (e.g. a fixture failed to load). */
#define REQUIRE(cond, ...) do { \
    if (!(cond)) { CHECK(cond, __VA_ARGS__); return; } } while (0)

#define RUN(fn) do { \
    test_cur_failed_ = 0; \
    fn(); \
    if (test_cur_failed_) { test_failed_++; printf("FAIL %s\n", #fn); } \
    else { test_passed_++; printf("ok   %s\n", #fn); } \
    fflush(stdout); } while (0)

#define TEST_END() do { \
    printf("%d passed, %d failed\n", test_passed_, test_failed_); \
    return test_failed_ ? 1 : 0; } while (0)

/* Where fixtures live: DS4_TINY (tiny model written by `make test`),
 * DS4_SHARED (the project's shared/ data, default ../shared). */
static inline const char *test_env(const char *name, const char *dflt) {
    const char *v = getenv(name);
    return v && *v ? v : dflt;
}

/* The tiny model (with its -mtp.gguf) an engine test runs on: $DS4_TINY as
 * tests/run.sh writes it, else generated into /tmp for this process, in which
 * case *generated is set and the caller deletes it. 0, or -1 with a message. */
static inline int test_tiny_model(char *path, size_t cap, bool *generated) {
    const char *env = getenv("DS4_TINY");
    *generated = false;
    if (env && !access(env, R_OK)) { snprintf(path, cap, "%s", env); return 0; }
    snprintf(path, cap, "/tmp/ds4_test_tiny_%d.gguf", (int)getpid());
    char cmd[512];
    snprintf(cmd, sizeof cmd, "build/bin/ds4-synth --preset tiny --mtp --seed 1 -o %s >/dev/null 2>&1", path);
    if (system(cmd) != 0) { fprintf(stderr, "cannot generate the tiny model (%s)\n", cmd); return -1; }
    *generated = true;
    return 0;
}

/* Delete a model test_tiny_model generated, with its -mtp.gguf. */
static inline void test_tiny_remove(const char *path) {
    char mtp[600];
    snprintf(mtp, sizeof mtp, "%.*s-mtp.gguf", (int)(strlen(path) - 5), path);
    unlink(path);
    unlink(mtp);
}
#endif
