/* err.h — the one error convention of duet.
 *
 * Why: every failure a user can cause must reach them as a sentence they can act on, never a
 * crash. Functions return 0 on success or a negative DUET_E* code, and fill a caller-provided
 * `char *err, size_t errlen` buffer with a human sentence ("tensor layers.3.attn.wq_a.scale:
 * expected shape [8, 32], found [8, 31]"). Out-of-memory is fatal in one place (xmalloc).
 */
#ifndef DUET_ERR_H
#define DUET_ERR_H

#include <stddef.h>

enum {
    DUET_OK = 0,
    DUET_EIO = -1,      /* file could not be opened/read/mapped/written */
    DUET_EFORMAT = -2,  /* malformed input (corrupt file, bad JSON, wrong dtype/shape) */
    DUET_EINVAL = -3,   /* invalid argument or configuration value */
    DUET_ENOMEM = -4,   /* a size limit was exceeded (allocation failures abort) */
    DUET_ENOTFOUND = -5 /* a named thing does not exist */
};

/* Formats into err (if non-NULL) and returns code; lets callers write `return duet_err(...)`. */
int duet_err(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Allocation that never returns NULL: out-of-memory aborts with a message. */
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t sz);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);

#endif
