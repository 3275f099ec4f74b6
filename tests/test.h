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
#endif
