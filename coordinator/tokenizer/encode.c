/* encode.c — text -> ids: added-token matching, the §5.2 pre-tokenizer, byte-level BPE.
 *
 * Why: the coordinator encodes every prompt, so this is the hot path. The three regex stages
 * of spec §5.2 are implemented by a hand-written matcher that reproduces Oniguruma's
 * leftmost-first, backtracking semantics for exactly these patterns (tests cross-check it
 * against libonig and against HF tokenizers). BPE merges use a pair->rank hash; whole pieces
 * are memoised in a bounded cache.
 *
 * Order of work, as in HF tokenizers: (1) added tokens with normalized=false are split out of
 * the raw text (leftmost, then longest); (2) in the remaining segments, added tokens with
 * normalized=true (the normalizer is empty); (3) each remaining segment is pre-tokenized and
 * every piece is BPE-encoded.
 *
 * It must never: read past the input; apply a merge out of rank order; let the cache change a
 * result (it only memoises pure functions of the piece bytes).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "common/err.h"
#include "coordinator/tokenizer/tok_internal.h"

/* ======== Unicode classes ==================================================================== */

static uint16_t bmp_cls[65536];
static pthread_once_t cls_once = PTHREAD_ONCE_INIT;

/* \s of Oniguruma in UTF-8 mode = the Unicode White_Space property. */
static int is_ws(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

#include "coordinator/tokenizer/unicode_delta.h"

/* The HF class of c from the generated override table, or -1 if utf8proc's category holds. */
static int delta_class(uint32_t c)
{
    size_t lo = 0, hi = sizeof UNICODE_DELTA / sizeof UNICODE_DELTA[0];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < UNICODE_DELTA[mid].lo) hi = mid;
        else if (c > UNICODE_DELTA[mid].hi) lo = mid + 1;
        else return UNICODE_DELTA[mid].cls;
    }
    return -1;
}

/* Class from utf8proc's general category alone (override = -1) or with the L/M/N/P/S bits
 * replaced by an override class. */
static uint16_t class_of(uint32_t c, int override)
{
    uint16_t f = 0;
    switch (override >= 0 ? -1 : (int)utf8proc_category((utf8proc_int32_t)c)) {
    case -1:
        f |= (uint16_t)override; break;
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO:
        f |= TOK_C_L; break;
    case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
        f |= TOK_C_M; break;
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO:
        f |= TOK_C_N; break;
    case UTF8PROC_CATEGORY_PC: case UTF8PROC_CATEGORY_PD: case UTF8PROC_CATEGORY_PS:
    case UTF8PROC_CATEGORY_PE: case UTF8PROC_CATEGORY_PI: case UTF8PROC_CATEGORY_PF:
    case UTF8PROC_CATEGORY_PO:
        f |= TOK_C_P; break;
    case UTF8PROC_CATEGORY_SM: case UTF8PROC_CATEGORY_SC: case UTF8PROC_CATEGORY_SK:
    case UTF8PROC_CATEGORY_SO:
        f |= TOK_C_S; break;
    default: break;
    }
    if (is_ws(c)) f |= TOK_C_WS;
    if (c == '\r' || c == '\n') f |= TOK_C_CRLF;
    if ((c >= 0x4E00 && c <= 0x9FA5) || (c >= 0x3040 && c <= 0x30FF)) f |= TOK_C_CJK;
    if (c < 0x80 && c && strchr("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", (int)c)) f |= TOK_C_APUNCT;
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')) f |= TOK_C_AALPHA;
    if (c == ' ') f |= TOK_C_SPACE;
    return f;
}

static uint16_t compute_class(uint32_t c) { return class_of(c, delta_class(c)); }

uint16_t tok_cp_class_utf8proc(uint32_t cp) { return class_of(cp, -1); }

static void cls_init(void)
{
    for (uint32_t c = 0; c < 65536; c++)
        bmp_cls[c] = compute_class(c);
}

uint16_t tok_cp_class(uint32_t cp)
{
    pthread_once(&cls_once, cls_init);
    return cp < 65536 ? bmp_cls[cp] : compute_class(cp);
}

/* ======== pre-tokenizer ====================================================================== */

#define LM (TOK_C_L | TOK_C_M)
#define PS (TOK_C_P | TOK_C_S)

/* Stage 3 at code point p of [p, b): end of the leftmost-first match, or 0 if none matches.
 * Alternatives, in order:
 *  A1 [ascii punct][A-Za-z]+   A2 [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
 *  A3 ' '?[\p{P}\p{S}]+[\r\n]*  A4 \s*[\r\n]+   A5 \s+(?!\S)   A6 \s+ */
static size_t match3(const uint16_t *c, size_t p, size_t b)
{
    size_t j;
    if ((c[p] & TOK_C_APUNCT) && p + 1 < b && (c[p + 1] & TOK_C_AALPHA)) {
        for (j = p + 2; j < b && (c[j] & TOK_C_AALPHA); j++) {}
        return j;
    }
    int first_ok = !(c[p] & (TOK_C_CRLF | TOK_C_L | PS));
    if (first_ok && p + 1 < b && (c[p + 1] & LM)) {
        for (j = p + 2; j < b && (c[j] & LM); j++) {}
        return j;
    }
    if (c[p] & LM) { /* A2 without the optional first character */
        for (j = p + 1; j < b && (c[j] & LM); j++) {}
        return j;
    }
    size_t q = (c[p] & TOK_C_SPACE) ? p + 1 : p;
    if (q < b && (c[q] & PS)) {
        for (j = q + 1; j < b && (c[j] & PS); j++) {}
        while (j < b && (c[j] & TOK_C_CRLF)) j++;
        return j;
    }
    if (!(c[p] & TOK_C_WS))
        return 0;
    size_t e, last_nl = 0;
    for (e = p; e < b && (c[e] & TOK_C_WS); e++)
        if (c[e] & TOK_C_CRLF) last_nl = e + 1;
    if (last_nl) return last_nl;      /* A4: greedy \s* backs off to the last CR/LF */
    if (e == b) return e;             /* A5: the run ends the piece */
    if (e - p >= 2) return e - 1;     /* A5: leave one space before the non-space */
    return e;                         /* A6 */
}

static void stage3(const uint8_t *s, const uint16_t *c, const uint32_t *off, size_t a,
                   size_t b, tok_piece_fn fn, void *ctx)
{
    size_t gap = a, p = a;
    while (p < b) {
        size_t e = match3(c, p, b);
        if (!e) {
            p++;
            continue;
        }
        if (gap < p)
            fn(s + off[gap], off[p] - off[gap], ctx);
        fn(s + off[p], off[e] - off[p], ctx);
        p = gap = e;
    }
    if (gap < b)
        fn(s + off[gap], off[b] - off[gap], ctx);
}

static void scratch(tok_t *t, size_t n)
{
    if (n + 1 <= t->sc_cap)
        return;
    size_t cap = t->sc_cap ? t->sc_cap : 256;
    while (cap < n + 1)
        cap *= 2;
    free(t->sc_cls);
    free(t->sc_off);
    t->sc_cls = xmalloc(cap * sizeof *t->sc_cls);
    t->sc_off = xmalloc(cap * sizeof *t->sc_off);
    t->sc_cap = cap;
}

void tok_pretokenize(tok_t *t, const uint8_t *s, size_t n, tok_piece_fn fn, void *ctx)
{
    pthread_once(&cls_once, cls_init);
    scratch(t, n);
    uint16_t *c = t->sc_cls;
    uint32_t *off = t->sc_off;
    size_t m = 0;
    for (size_t i = 0; i < n;) { /* input is valid UTF-8 (checked by tok_encode) */
        uint32_t b0 = s[i];
        off[m] = (uint32_t)i;
        if (b0 < 0x80) {
            c[m++] = bmp_cls[b0];
            i++;
        } else if (b0 < 0xE0) {
            c[m++] = bmp_cls[((b0 & 0x1F) << 6) | (s[i + 1] & 0x3F)];
            i += 2;
        } else if (b0 < 0xF0) {
            c[m++] = bmp_cls[((b0 & 0x0F) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3F)];
            i += 3;
        } else {
            uint32_t cp = ((b0 & 0x07) << 18) | ((s[i + 1] & 0x3Fu) << 12) |
                          ((s[i + 2] & 0x3Fu) << 6) | (s[i + 3] & 0x3F);
            c[m++] = compute_class(cp);
            i += 4;
        }
    }
    off[m] = (uint32_t)n;
    /* stages 1+2: \p{N} and the CJK ranges are disjoint, so the final pieces are digit groups
     * of <= 3 (from the left of each run), CJK runs and other runs; stage 3 splits the latter
     * two (it can never match inside a digit group). */
    for (size_t i = 0; i < m;) {
        size_t j = i + 1;
        if (c[i] & TOK_C_N) {
            while (j < m && j - i < 3 && (c[j] & TOK_C_N)) j++;
            fn(s + off[i], off[j] - off[i], ctx);
        } else {
            uint16_t cjk = c[i] & TOK_C_CJK;
            while (j < m && !(c[j] & TOK_C_N) && (c[j] & TOK_C_CJK) == cjk) j++;
            stage3(s, c, off, i, j, fn, ctx);
        }
        i = j;
    }
}

/* ======== BPE ================================================================================ */

void tok_ids_push(tok_ids_t *ids, int32_t id)
{
    if (ids->n == ids->cap) {
        ids->cap = ids->cap ? ids->cap * 2 : 64;
        ids->v = xrealloc(ids->v, ids->cap * sizeof *ids->v);
    }
    ids->v[ids->n++] = id;
}

void tok_ids_free(tok_ids_t *ids)
{
    free(ids->v);
    ids->v = NULL;
    ids->n = ids->cap = 0;
}

static void bpe_scratch(tok_t *t, size_t n)
{
    if (n <= t->bpe_cap)
        return;
    size_t cap = t->bpe_cap ? t->bpe_cap : 256;
    while (cap < n)
        cap *= 2;
    t->bpe_ids = xrealloc(t->bpe_ids, cap * sizeof *t->bpe_ids);
    t->bpe_aux = xrealloc(t->bpe_aux, 2 * cap * sizeof *t->bpe_aux);
    t->bpe_cap = cap;
}

static int32_t pair_rank(const tok_t *t, int32_t l, int32_t r)
{
    const tok_merge_t *m = tok_merge_find(t, l, r);
    return m ? (int32_t)m->rank : INT32_MAX;
}

/* O(n^2) BPE on an array: best for the short pieces that make up almost all text. */
void tok_bpe_simple(tok_t *t, const uint8_t *s, size_t n, tok_ids_t *out)
{
    bpe_scratch(t, n);
    int32_t *id = t->bpe_ids, *rk = t->bpe_aux;
    size_t m = n;
    for (size_t i = 0; i < n; i++)
        id[i] = t->byte_id[s[i]];
    for (size_t i = 0; i + 1 < m; i++)
        rk[i] = pair_rank(t, id[i], id[i + 1]);
    while (m > 1) {
        size_t best = 0;
        for (size_t i = 1; i + 1 < m; i++)
            if (rk[i] < rk[best]) best = i;
        if (rk[best] == INT32_MAX)
            break;
        id[best] = tok_merge_find(t, id[best], id[best + 1])->id;
        memmove(id + best + 1, id + best + 2, (m - best - 2) * sizeof *id);
        memmove(rk + best + 1, rk + best + 2, (m - best >= 3 ? m - best - 3 : 0) * sizeof *rk);
        m--;
        if (best > 0) rk[best - 1] = pair_rank(t, id[best - 1], id[best]);
        if (best + 1 < m) rk[best] = pair_rank(t, id[best], id[best + 1]);
    }
    for (size_t i = 0; i < m; i++)
        tok_ids_push(out, id[i]);
}

typedef struct { uint32_t rank; int32_t pos; } hent_t; /* min-heap on (rank, pos) */

static int hless(hent_t a, hent_t b) { return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos); }

static void hpush(hent_t *h, size_t *n, hent_t e)
{
    size_t i = (*n)++;
    while (i > 0 && hless(e, h[(i - 1) / 2])) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = e;
}

static hent_t hpop(hent_t *h, size_t *n)
{
    hent_t top = h[0], e = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t k = 2 * i + 1;
        if (k >= *n) break;
        if (k + 1 < *n && hless(h[k + 1], h[k])) k++;
        if (!hless(h[k], e)) break;
        h[i] = h[k];
        i = k;
    }
    if (*n) h[i] = e;
    return top;
}

static void hpush_pair(const tok_t *t, hent_t *h, size_t *hn, const int32_t *id, int32_t l, int32_t r)
{
    const tok_merge_t *m = tok_merge_find(t, id[l], id[r]);
    if (m) hpush(h, hn, (hent_t){m->rank, l});
}

/* O(n log n) BPE on a linked list with a heap (HF's algorithm): for long pieces. */
void tok_bpe_heap(tok_t *t, const uint8_t *s, size_t n, tok_ids_t *out)
{
    bpe_scratch(t, n);
    if (t->heap_cap < 3 * n) { /* n-1 initial pairs + at most 2 per merge */
        t->heap = xrealloc(t->heap, 3 * n * sizeof(hent_t));
        t->heap_cap = 3 * n;
    }
    int32_t *id = t->bpe_ids, *prev = t->bpe_aux, *next = t->bpe_aux + t->bpe_cap;
    hent_t *h = t->heap;
    size_t hn = 0;
    for (size_t i = 0; i < n; i++) {
        id[i] = t->byte_id[s[i]];
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    for (size_t i = 0; i + 1 < n; i++)
        hpush_pair(t, h, &hn, id, (int32_t)i, (int32_t)i + 1);
    while (hn) {
        hent_t e = hpop(h, &hn);
        int32_t p = e.pos, q = next[p];
        if (id[p] < 0 || q < 0)
            continue;
        const tok_merge_t *m = tok_merge_find(t, id[p], id[q]);
        if (!m || m->rank != e.rank)
            continue; /* stale entry */
        id[p] = m->id;
        id[q] = -1;
        next[p] = next[q];
        if (next[q] >= 0) prev[next[q]] = p;
        if (prev[p] >= 0) hpush_pair(t, h, &hn, id, prev[p], p);
        if (next[p] >= 0) hpush_pair(t, h, &hn, id, p, next[p]);
    }
    for (int32_t i = 0; i >= 0; i = next[i])
        tok_ids_push(out, id[i]);
}

/* ======== piece cache ======================================================================== */

#define CACHE_MAX_PIECE 64
#define CACHE_SLOTS 65536

static uint64_t piece_hash(const uint8_t *s, size_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    uint64_t w = 0;
    memcpy(&w, s + i, n - i);
    h = (h ^ w) * 0xc4ceb9fe1a85ec53ull;
    return h ^ (h >> 29);
}

static void cache_reset(tok_t *t)
{
    if (!t->cache)
        t->cache = xmalloc(CACHE_SLOTS * sizeof *t->cache);
    t->cache_cap = CACHE_SLOTS;
    memset(t->cache, 0, CACHE_SLOTS * sizeof *t->cache);
    t->cache_n = 0;
    t->cache_bytes.n = 0;
    t->cache_ids_n = 0;
}

typedef struct {
    tok_t *t;
    tok_ids_t *out;
} enc_ctx_t;

static void bpe_piece(const uint8_t *s, size_t n, void *vctx)
{
    enc_ctx_t *x = vctx;
    tok_t *t = x->t;
    if (n == 1) {
        tok_ids_push(x->out, t->byte_id[s[0]]);
        return;
    }
    if (n > CACHE_MAX_PIECE) {
        tok_bpe_heap(t, s, n, x->out);
        return;
    }
    if (t->cache_n >= CACHE_SLOTS / 2 || !t->cache)
        cache_reset(t);
    uint64_t h = piece_hash(s, n);
    size_t i = h & (CACHE_SLOTS - 1);
    for (; t->cache[i].key_len; i = (i + 1) & (CACHE_SLOTS - 1)) {
        tok_cache_ent_t *e = &t->cache[i];
        if (e->hash == h && e->key_len == n && memcmp(t->cache_bytes.p + e->key_off, s, n) == 0) {
            for (uint32_t k = 0; k < e->ids_n; k++)
                tok_ids_push(x->out, t->cache_ids[e->ids_off + k]);
            return;
        }
    }
    size_t start = x->out->n;
    tok_bpe_simple(t, s, n, x->out);
    size_t cnt = x->out->n - start;
    if (t->cache_ids_n + cnt > t->cache_ids_cap) {
        t->cache_ids_cap = t->cache_ids_cap ? t->cache_ids_cap * 2 : 65536;
        t->cache_ids = xrealloc(t->cache_ids, t->cache_ids_cap * sizeof *t->cache_ids);
    }
    memcpy(t->cache_ids + t->cache_ids_n, x->out->v + start, cnt * sizeof(int32_t));
    t->cache[i] = (tok_cache_ent_t){h, (uint32_t)t->cache_bytes.n, (uint32_t)n,
                                    (uint32_t)t->cache_ids_n, (uint32_t)cnt};
    tok_buf_put(&t->cache_bytes, s, n);
    t->cache_ids_n += cnt;
    t->cache_n++;
}

/* ======== added tokens and the encoder =============================================================== */

/* Length of the longest added token of tr starting at s (0 if none); its id in *id. */
static size_t trie_longest(const struct tok_trie *tr, const uint8_t *s, size_t n, int32_t *id)
{
    size_t best = 0;
    int32_t node = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t c = tr->nodes[node].child;
        while (c >= 0 && tr->nodes[c].b != s[i])
            c = tr->nodes[c].sibling;
        if (c < 0)
            break;
        node = c;
        if (tr->nodes[node].id >= 0) {
            best = i + 1;
            *id = tr->nodes[node].id;
        }
    }
    return best;
}

/* Splits [s, s+n) at the added tokens of trie k (leftmost, then longest); gaps go to the next
 * pass (k = 0 -> trie 1 -> pre-tokenizer). */
static void split_added(enc_ctx_t *x, int k, const uint8_t *s, size_t n)
{
    const struct tok_trie *tr = &x->t->trie[k];
    size_t gap = 0;
    for (size_t i = 0; i < n;) {
        int32_t id;
        size_t len;
        if (!tr->first[s[i]] || (len = trie_longest(tr, s + i, n - i, &id)) == 0) {
            i++;
            continue;
        }
        if (gap < i) {
            if (k == 0) split_added(x, 1, s + gap, i - gap);
            else tok_pretokenize(x->t, s + gap, i - gap, bpe_piece, x);
        }
        tok_ids_push(x->out, id);
        i += len;
        gap = i;
    }
    if (gap < n) {
        if (k == 0) split_added(x, 1, s + gap, n - gap);
        else tok_pretokenize(x->t, s + gap, n - gap, bpe_piece, x);
    }
}

static int encode(tok_t *t, const char *text, size_t len, tok_ids_t *out, int added)
{
    const uint8_t *s = (const uint8_t *)text;
    if (len > TOK_MAX_TEXT)
        return DUET_ENOMEM;
    if (!tok_utf8_valid(s, len)) {
        tok_u8_t u8 = {0};
        t->sanit.n = 0;
        tok_u8_feed(&u8, s, len, &t->sanit);
        tok_u8_flush(&u8, &t->sanit);
        s = (const uint8_t *)t->sanit.p;
        len = t->sanit.n;
    }
    enc_ctx_t x = {t, out};
    if (added)
        split_added(&x, 0, s, len);
    else
        tok_pretokenize(t, s, len, bpe_piece, &x);
    return 0;
}

int tok_encode(tok_t *t, const char *text, size_t len, tok_ids_t *out)
{
    return encode(t, text, len, out, 1);
}

int tok_encode_plain(tok_t *t, const char *text, size_t len, tok_ids_t *out)
{
    return encode(t, text, len, out, 0);
}
