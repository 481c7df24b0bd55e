/* utf8.c — UTF-8 validation, lossy repair and the streaming detokenizer.
 *
 * Why: token byte strings may end in the middle of a character, and a model may emit byte
 * tokens that never form a valid character. HF decodes the concatenated bytes with Rust's
 * from_utf8_lossy (one U+FFFD per maximal invalid subpart); one state machine here reproduces
 * that both for whole-sequence decoding and for streaming, so the two always agree.
 *
 * It must never: emit a partial or invalid UTF-8 sequence; hold back more than 3 bytes.
 */
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "coordinator/tokenizer/tok_internal.h"

/* ======== byte buffer ======================================================================== */

void tok_buf_put(tok_buf_t *b, const void *src, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1)
            cap *= 2;
        b->p = xrealloc(b->p, cap);
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, src, n);
    b->n += n;
    b->p[b->n] = 0;
}

/* ======== lossy state machine ================================================================ */

static const uint8_t REPL[3] = {0xEF, 0xBF, 0xBD}; /* U+FFFD */

/* Length of a character from its lead byte, or 0 if the byte cannot start one. */
static int lead_len(uint8_t b)
{
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) return 2;
    if (b >= 0xE0 && b <= 0xEF) return 3;
    if (b >= 0xF0 && b <= 0xF4) return 4;
    return 0;
}

/* Whether b may be byte idx (1..3) of a character starting with lead (excludes overlongs,
 * surrogates and code points above U+10FFFF at the second byte, as the Unicode table 3-7). */
static int cont_ok(uint8_t lead, int idx, uint8_t b)
{
    if (idx == 1) {
        if (lead == 0xE0) return b >= 0xA0 && b <= 0xBF;
        if (lead == 0xED) return b >= 0x80 && b <= 0x9F;
        if (lead == 0xF0) return b >= 0x90 && b <= 0xBF;
        if (lead == 0xF4) return b >= 0x80 && b <= 0x8F;
    }
    return b >= 0x80 && b <= 0xBF;
}

void tok_u8_feed(tok_u8_t *s, const uint8_t *src, size_t n, tok_buf_t *out)
{
    size_t i = 0;
    while (i < n) {
        uint8_t b = src[i];
        if (s->n == 0) {
            /* fast path: a run of ASCII */
            size_t j = i;
            while (j < n && src[j] < 0x80)
                j++;
            if (j > i) {
                tok_buf_put(out, src + i, j - i);
                i = j;
                continue;
            }
            int len = lead_len(b);
            if (len == 0) {
                tok_buf_put(out, REPL, 3);
            } else {
                s->pend[0] = b;
                s->n = 1;
                s->need = (uint8_t)len;
            }
            i++;
            continue;
        }
        if (cont_ok(s->pend[0], s->n, b)) {
            s->pend[s->n++] = b;
            if (s->n == s->need) {
                tok_buf_put(out, s->pend, s->n);
                s->n = 0;
            }
            i++;
        } else {
            /* the held bytes are a maximal invalid subpart; b is looked at again afresh */
            tok_buf_put(out, REPL, 3);
            s->n = 0;
        }
    }
}

void tok_u8_flush(tok_u8_t *s, tok_buf_t *out)
{
    if (s->n)
        tok_buf_put(out, REPL, 3);
    s->n = 0;
}

int tok_utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        int len = lead_len(s[i]);
        if (len == 0 || i + (size_t)len > n)
            return 0;
        for (int k = 1; k < len; k++)
            if (!cont_ok(s[i], k, s[i + k]))
                return 0;
        i += (size_t)len;
    }
    return 1;
}

/* ======== streaming detokenizer ============================================================== */

struct tok_stream {
    const tok_t *t;
    int skip_special;
    tok_u8_t u8;
    tok_buf_t out;
};

tok_stream_t *tok_stream_new(const tok_t *t, int skip_special)
{
    tok_stream_t *s = xcalloc(1, sizeof *s);
    s->t = t;
    s->skip_special = skip_special;
    tok_buf_put(&s->out, "", 0);
    return s;
}

const char *tok_stream_put(tok_stream_t *s, int32_t id, size_t *len)
{
    const tok_t *t = s->t;
    s->out.n = 0;
    s->out.p[0] = 0;
    if (id >= 0 && (size_t)id < t->n_ids && t->idflags[id] &&
        !(s->skip_special && (t->idflags[id] & 4)))
        tok_u8_feed(&s->u8, (const uint8_t *)t->dec + t->dec_off[id], t->dec_len[id], &s->out);
    *len = s->out.n;
    return s->out.p;
}

const char *tok_stream_flush(tok_stream_t *s, size_t *len)
{
    s->out.n = 0;
    s->out.p[0] = 0;
    tok_u8_flush(&s->u8, &s->out);
    *len = s->out.n;
    return s->out.p;
}

void tok_stream_free(tok_stream_t *s)
{
    if (!s)
        return;
    free(s->out.p);
    free(s);
}
