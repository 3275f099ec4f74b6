/* The one way errors are reported across the library: a message formatted
 * into the caller's buffer (every fallible call takes `char *err, size_t
 * errlen`) and -1 returned, so `return ds4_errf(err, errlen, "...", ...);`
 * reads as what it does. err may be NULL or errlen 0 (message dropped). */
#ifndef DS4_UTIL_ERRF_H
#define DS4_UTIL_ERRF_H
#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif
int ds4_errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* s[0, n) holds no NUL and no ASCII control byte (bytes >= 0x80, UTF-8,
 * pass): text from a file that may be quoted in a one-line message. */
bool ds4_one_line(const char *s, size_t n);
#ifdef __cplusplus
}
#endif

#endif
