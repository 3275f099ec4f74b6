/* The one way errors are reported across the library: a message formatted
 * into the caller's buffer (every fallible call takes `char *err, size_t
 * errlen`) and -1 returned, so `return ds4_errf(err, errlen, "...", ...);`
 * reads as what it does. err may be NULL or errlen 0 (message dropped). */
#ifndef DS4_UTIL_ERRF_H
#define DS4_UTIL_ERRF_H
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif
int ds4_errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
#ifdef __cplusplus
}
#endif

#endif
