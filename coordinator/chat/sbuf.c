/* sbuf.c — growable byte buffer (see sbuf.h). Must never leave `p` unterminated. */
#include "coordinator/chat/sbuf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"

static void reserve(chat_sb *b, size_t extra) {
    size_t need = b->len + extra + 1;
    if (need <= b->cap) return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

void chat_sb_put(chat_sb *b, const char *s, size_t n) {
    reserve(b, n);
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void chat_sb_puts(chat_sb *b, const char *s) { chat_sb_put(b, s, strlen(s)); }

void chat_sb_putc(chat_sb *b, char c) { chat_sb_put(b, &c, 1); }

void chat_sb_printf(chat_sb *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0) return;
    reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void chat_sb_consume(chat_sb *b, size_t n) {
    if (n >= b->len) {
        chat_sb_clear(b);
        return;
    }
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
    b->p[b->len] = '\0';
}

void chat_sb_clear(chat_sb *b) {
    b->len = 0;
    if (b->p) b->p[0] = '\0';
}

void chat_sb_free(chat_sb *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

char *chat_sb_take(chat_sb *b, size_t *len) {
    reserve(b, 0);
    char *p = b->p;
    if (len) *len = b->len;
    b->p = NULL;
    b->len = b->cap = 0;
    return p;
}
