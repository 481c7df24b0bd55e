/* test_pretok_onig.c — the hand-written pre-tokenizer vs the real regexes run by libonig.
 *
 * Why: encode.c re-implements the three Split(Isolated) regexes of spec §5.2 by hand for speed.
 * HF tokenizers runs them with Oniguruma; this test runs them with libonig too (same engine,
 * same leftmost-first backtracking) on random text and requires identical pieces. Characters
 * are drawn from long-assigned code points so that the Unicode data of libonig and utf8proc
 * agree (newer code points are covered by live_check.py against HF itself).
 *
 * Never: depend on tokenizer.json (the pre-tokenizer needs no vocabulary); skip.
 */
#include <check.h>
#include <oniguruma.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "coordinator/tokenizer/tok_internal.h"

static const char *const RE[3] = {
    "\\p{N}{1,3}",
    "[\xe4\xb8\x80-\xe9\xbe\xa5\xe3\x81\x80-\xe3\x82\x9f\xe3\x82\xa0-\xe3\x83\xbf]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
};

typedef struct { size_t off, len; } span_t;
typedef struct { span_t *v; size_t n, cap; } spans_t;

static void spans_push(spans_t *s, size_t off, size_t len)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 64;
        s->v = xrealloc(s->v, s->cap * sizeof *s->v);
    }
    s->v[s->n++] = (span_t){off, len};
}

/* Split(Isolated) of every piece of in by re: matches and the gaps between them. */
static void onig_split(regex_t *re, OnigRegion *rg, const uint8_t *s, const spans_t *in,
                       spans_t *out)
{
    out->n = 0;
    for (size_t i = 0; i < in->n; i++) {
        const uint8_t *a = s + in->v[i].off, *end = a + in->v[i].len;
        const uint8_t *p = a, *gap = a;
        while (p < end) {
            int r = onig_search(re, a, end, p, end, rg, ONIG_OPTION_NONE);
            if (r < 0)
                break;
            const uint8_t *ms = a + rg->beg[0], *me = a + rg->end[0];
            ck_assert_msg(me > ms, "empty regex match");
            if (ms > gap)
                spans_push(out, (size_t)(gap - s), (size_t)(ms - gap));
            spans_push(out, (size_t)(ms - s), (size_t)(me - ms));
            p = gap = me;
        }
        if (end > gap)
            spans_push(out, (size_t)(gap - s), (size_t)(end - gap));
    }
}

typedef struct { const uint8_t *base; spans_t *out; } collect_t;

static void collect(const uint8_t *piece, size_t len, void *ctx)
{
    collect_t *c = ctx;
    spans_push(c->out, (size_t)(piece - c->base), len);
}

/* Long-assigned code points of every class the regexes care about. */
static const uint32_t POOL[] = {
    ' ', ' ', ' ', '\t', '\n', '\r', 0x0B, 0x0C, 0x85, 0xA0, 0x1680, 0x2003, 0x2028, 0x2029,
    0x202F, 0x3000, 0x01, 0x1F, 0x7F, 0x200B, 0x200D, 0xFEFF, 0xE000,
    '0', '1', '7', '9', 0xB2, 0xBD, 0x0660, 0x0967, 0x2460, 0x2167, 0xFF11, 0x3007, 0x1D7D8,
    'a', 'b', 'z', 'A', 'Q', 'Z', 0xE9, 0xDF, 0x0101, 0x03B1, 0x0416, 0x05D0, 0x0627, 0x0915,
    0x0E01, 0x10D0, 0xAC00, 0x1100, 0x3131, 0x01C5, 0x02B0, 0x1D400,
    0x0301, 0x0308, 0x0327, 0x093F, 0x0E49, 0x20E3, 0x0488, 0xFE0F,
    0x4E00, 0x4E2D, 0x9FA5, 0x9FA6, 0x9FCC, 0x3400, 0x3041, 0x3099, 0x309B, 0x309D, 0x30A0,
    0x30A2, 0x30FB, 0x30FC, 0x30FF, 0xFF71, 0xF900,
    '!', '"', '#', '$', '%', '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/', ':', ';', '<',
    '=', '>', '?', '@', '[', '\\', ']', '^', '_', '`', '{', '|', '}', '~',
    0xA1, 0xA7, 0xAB, 0xB6, 0xBF, 0x2014, 0x2026, 0x3001, 0x3002, 0x300C, 0xFF01, 0xFF5C,
    0x2581, 0x20AC, 0xA2, 0x2211, 0x2192, 0x2605, 0x1F600, 0x1F44D, 0x1F3FD, 0x00A9, 0x02C6,
};

static size_t put_utf8(uint8_t *o, uint32_t c)
{
    if (c < 0x80) { o[0] = (uint8_t)c; return 1; }
    if (c < 0x800) { o[0] = (uint8_t)(0xC0 | c >> 6); o[1] = (uint8_t)(0x80 | (c & 0x3F)); return 2; }
    if (c < 0x10000) {
        o[0] = (uint8_t)(0xE0 | c >> 12); o[1] = (uint8_t)(0x80 | ((c >> 6) & 0x3F));
        o[2] = (uint8_t)(0x80 | (c & 0x3F));
        return 3;
    }
    o[0] = (uint8_t)(0xF0 | c >> 18); o[1] = (uint8_t)(0x80 | ((c >> 12) & 0x3F));
    o[2] = (uint8_t)(0x80 | ((c >> 6) & 0x3F)); o[3] = (uint8_t)(0x80 | (c & 0x3F));
    return 4;
}

START_TEST(pretok_matches_onig)
{
    ck_assert_int_eq(onig_initialize((OnigEncoding[]){ONIG_ENCODING_UTF8}, 1), ONIG_NORMAL);
    regex_t *re[3];
    OnigErrorInfo einfo;
    for (int k = 0; k < 3; k++) {
        int r = onig_new(&re[k], (const UChar *)RE[k], (const UChar *)RE[k] + strlen(RE[k]),
                         ONIG_OPTION_NONE, ONIG_ENCODING_UTF8, ONIG_SYNTAX_DEFAULT, &einfo);
        ck_assert_msg(r == ONIG_NORMAL, "onig_new failed for regex %d", k);
    }
    OnigRegion *rg = onig_region_new();
    tok_t *t = xcalloc(1, sizeof *t); /* the pre-tokenizer only uses the scratch arrays */
    spans_t a = {0}, b = {0}, ours = {0};
    uint8_t buf[4 * 200];
    unsigned seed = 4242;
    size_t npool = sizeof POOL / sizeof POOL[0], pieces = 0;
    for (int round = 0; round < 20000; round++) {
        size_t n = 0, nch = 1 + (size_t)(rand_r(&seed) % 60);
        for (size_t i = 0; i < nch; i++) {
            uint32_t c = POOL[rand_r(&seed) % npool];
            size_t rep = rand_r(&seed) % 4 == 0 ? 1 + (size_t)(rand_r(&seed) % 5) : 1;
            for (size_t r = 0; r < rep && n + 4 <= sizeof buf; r++)
                n += put_utf8(buf + n, c);
        }
        a.n = 0;
        spans_push(&a, 0, n);
        onig_split(re[0], rg, buf, &a, &b);
        onig_split(re[1], rg, buf, &b, &a);
        onig_split(re[2], rg, buf, &a, &b);
        ours.n = 0;
        collect_t c = {buf, &ours};
        tok_pretokenize(t, buf, n, collect, &c);
        int same = ours.n == b.n;
        for (size_t i = 0; same && i < b.n; i++)
            same = ours.v[i].off == b.v[i].off && ours.v[i].len == b.v[i].len;
        if (!same) {
            fprintf(stderr, "round %d: text bytes:", round);
            for (size_t i = 0; i < n; i++)
                fprintf(stderr, " %02x", buf[i]);
            fprintf(stderr, "\n  onig pieces %zu, ours %zu\n", b.n, ours.n);
        }
        ck_assert_msg(same, "round %d: pre-tokenizer pieces differ from libonig", round);
        pieces += b.n;
    }
    ck_assert_uint_gt(pieces, 100000);
    free(a.v);
    free(b.v);
    free(ours.v);
    free(t->sc_cls);
    free(t->sc_off);
    free(t);
    onig_region_free(rg, 1);
    for (int k = 0; k < 3; k++)
        onig_free(re[k]);
    onig_end();
}
END_TEST

int main(void)
{
    Suite *s = suite_create("tokenizer-onig");
    TCase *tc = tcase_create("pretok");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, pretok_matches_onig);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
