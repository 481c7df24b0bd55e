/* sbuf.h — a growable byte buffer shared by the chat encoder and the output parser.
 *
 * Why: both halves of coordinator/chat build text piece by piece (prompts, argument JSON,
 * held-back output). This keeps that one idiom in one place. It must never return NULL or
 * a buffer without a terminating NUL: `p` is always NUL-terminated once anything was put,
 * and allocation failure aborts through xrealloc (common/err.h).
 */
#ifndef DUET_CHAT_SBUF_H
#define DUET_CHAT_SBUF_H

#include <stddef.h>

typedef struct {
    char *p;    /* bytes, NUL-terminated when p != NULL (the NUL is not counted in len) */
    size_t len; /* bytes used */
    size_t cap; /* bytes allocated */
} chat_sb;

void chat_sb_put(chat_sb *b, const char *s, size_t n);
void chat_sb_puts(chat_sb *b, const char *s);
void chat_sb_putc(chat_sb *b, char c);
void chat_sb_printf(chat_sb *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Drops the first n bytes (n <= len), keeping the rest. */
void chat_sb_consume(chat_sb *b, size_t n);
void chat_sb_clear(chat_sb *b);
void chat_sb_free(chat_sb *b);
/* Hands over the NUL-terminated contents (never NULL; "" when empty) and resets b. */
char *chat_sb_take(chat_sb *b, size_t *len);

#endif
