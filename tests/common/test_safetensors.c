/* test_safetensors.c — the safetensors reader rejects every malformed file with a clear sentence.
 *
 * Why: checkpoint headers are untrusted input mapped straight into the worker; each corruption
 * here (truncation, bad lengths, bad JSON, unknown dtypes, size mismatches, out-of-file and
 * overlapping spans, duplicate names, inconsistent index.json) must produce an error naming the
 * file and the problem, and never a crash (the suite runs under ASan/UBSan). Must never leave
 * files behind: every test works in its own temporary directory and removes it.
 */
#include "common/err.h"
#include "common/safetensors.h"

#include <check.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir[64];
static char err[1024];

static void setup(void) {
    snprintf(dir, sizeof dir, "/tmp/duet-st-XXXXXX");
    ck_assert_msg(mkdtemp(dir) != NULL, "cannot create a temporary directory in /tmp");
    err[0] = 0;
}

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static void teardown(void) { nftw(dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS); }

static const char *path_of(const char *name) {
    static char p[4][256];
    static int i;
    i = (i + 1) % 4;
    snprintf(p[i], sizeof p[i], "%s/%s", dir, name);
    return p[i];
}

/* Writes an 8-byte length (hlen_override if nonzero), the header text and `data` bytes of 0x11. */
static void write_raw(const char *name, const char *header, size_t data, uint64_t hlen_override) {
    FILE *f = fopen(path_of(name), "wb");
    ck_assert_ptr_nonnull(f);
    uint64_t n = hlen_override ? hlen_override : strlen(header);
    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)(n >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    for (size_t i = 0; i < data; i++) fputc(0x11, f);
    fclose(f);
}

/* Opens `name` expecting failure; checks the message contains each of the given parts. */
static void expect_error(const char *name, const char *part1, const char *part2) {
    st_set *s = (st_set *)1;
    int rc = st_open(path_of(name), &s, err, sizeof err);
    ck_assert_msg(rc < 0, "opening %s should fail", name);
    ck_assert_ptr_null(s);
    ck_assert_msg(strstr(err, part1), "message \"%s\" lacks \"%s\"", err, part1);
    if (part2) ck_assert_msg(strstr(err, part2), "message \"%s\" lacks \"%s\"", err, part2);
}

/* A valid two-tensor file: a F32 [2,3] (24 B) and b BF16 [4] (8 B). */
static void write_good(const char *name) {
    st_writer *w = st_writer_new();
    float a[6] = {1, 2, 3, 4, 5, 6};
    uint16_t b[4] = {0x3F80, 0x4000, 0x4040, 0x4080};
    int64_t sa[2] = {2, 3}, sb[1] = {4};
    ck_assert_int_eq(st_writer_add(w, "a", ST_F32, 2, sa, a, sizeof a, err, sizeof err), 0);
    ck_assert_int_eq(st_writer_add(w, "b", ST_BF16, 1, sb, b, sizeof b, err, sizeof err), 0);
    ck_assert_int_eq(st_writer_write(w, path_of(name), err, sizeof err), 0);
    st_writer_free(w);
}

START_TEST(roundtrip) {
    st_writer *w = st_writer_new();
    float a[6] = {1, 2, 3, 4, 5, 6};
    uint8_t c[3] = {7, 8, 9};
    int64_t i64[2] = {-5, 1LL << 40};
    int64_t sa[2] = {2, 3}, sc[1] = {3}, si[2] = {1, 2};
    ck_assert_int_eq(st_writer_add(w, "x.a", ST_F32, 2, sa, a, sizeof a, err, sizeof err), 0);
    ck_assert_int_eq(st_writer_add(w, "x.c", ST_F8_E4M3, 1, sc, c, 3, err, sizeof err), 0);
    ck_assert_int_eq(st_writer_add(w, "x.i", ST_I64, 2, si, i64, 16, err, sizeof err), 0);
    ck_assert_int_lt(st_writer_add(w, "x.a", ST_F32, 2, sa, a, sizeof a, err, sizeof err), 0);
    ck_assert_int_lt(st_writer_add(w, "x.bad", ST_F32, 2, sa, a, 5, err, sizeof err), 0);
    ck_assert_uint_eq(st_writer_bytes(w), 24 + 3 + 16);
    ck_assert_int_eq(st_writer_write(w, path_of("model.safetensors"), err, sizeof err), 0);
    st_writer_free(w);
    st_set *s;
    ck_assert_msg(st_open(dir, &s, err, sizeof err) == 0, "%s", err); /* directory form */
    ck_assert_uint_eq(st_count(s), 3);
    ck_assert_uint_eq(st_total_bytes(s), 43);
    const st_tensor *t = st_find(s, "x.a");
    ck_assert_ptr_nonnull(t);
    ck_assert(t->dtype == ST_F32 && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3);
    ck_assert_int_eq(st_numel(t), 6);
    ck_assert(memcmp(t->data, a, sizeof a) == 0);
    t = st_find(s, "x.i");
    ck_assert(t && t->nbytes == 16 && memcmp(t->data, i64, 16) == 0);
    t = st_find(s, "x.c");
    ck_assert(t && t->dtype == ST_F8_E4M3 && memcmp(t->data, c, 3) == 0);
    ck_assert_ptr_null(st_find(s, "x.missing"));
    ck_assert_ptr_nonnull(st_at(s, 2));
    ck_assert_ptr_null(st_at(s, 3));
    st_close(s);
    st_dtype d;
    ck_assert_int_eq(st_dtype_parse("F8_E8M0", &d), 0);
    ck_assert(d == ST_F8_E8M0 && st_dtype_size(d) == 1 && !strcmp(st_dtype_name(ST_BF16), "BF16"));
    ck_assert_int_lt(st_dtype_parse("F7", &d), 0);
}
END_TEST

START_TEST(streaming_writer) {
    st_writer *w = st_writer_new();
    int64_t sh[1] = {4};
    float v[4] = {1, 2, 3, 4};
    ck_assert_int_eq(st_writer_declare(w, "v", ST_F32, 1, sh, err, sizeof err), 0);
    ck_assert_int_eq(st_writer_begin(w, path_of("s.safetensors"), err, sizeof err), 0);
    ck_assert_int_eq(st_writer_stream(w, v, 8, err, sizeof err), 0);
    ck_assert_int_eq(st_writer_stream(w, v + 2, 8, err, sizeof err), 0);
    ck_assert_int_lt(st_writer_stream(w, v, 4, err, sizeof err), 0); /* more than declared */
    ck_assert_int_eq(st_writer_end(w, err, sizeof err), 0);
    st_writer_free(w);
    st_set *s;
    ck_assert_int_eq(st_open(path_of("s.safetensors"), &s, err, sizeof err), 0);
    ck_assert(memcmp(st_find(s, "v")->data, v, 16) == 0);
    st_close(s);
    w = st_writer_new(); /* ending early is an error */
    ck_assert_int_eq(st_writer_declare(w, "v", ST_F32, 1, sh, err, sizeof err), 0);
    ck_assert_int_eq(st_writer_begin(w, path_of("t.safetensors"), err, sizeof err), 0);
    ck_assert_int_lt(st_writer_end(w, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "never written"), "%s", err);
    st_writer_free(w);
}
END_TEST

START_TEST(truncated) {
    write_good("good.safetensors");
    FILE *f = fopen(path_of("good.safetensors"), "rb");
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    f = fopen(path_of("cut.safetensors"), "wb");
    fwrite(buf, 1, n - 4, f); /* drops half of tensor b */
    fclose(f);
    expect_error("cut.safetensors", "cut.safetensors", "tensor b");
    ck_assert(strstr(err, "outside the data area"));
    f = fopen(path_of("tiny.safetensors"), "wb");
    fwrite(buf, 1, 5, f);
    fclose(f);
    expect_error("tiny.safetensors", "tiny.safetensors", "too short");
}
END_TEST

START_TEST(header_length_too_large) {
    write_raw("h.safetensors", "{}", 0, 1000000);
    expect_error("h.safetensors", "h.safetensors", "header length 1000000 exceeds");
}
END_TEST

START_TEST(invalid_json) {
    write_raw("j.safetensors", "{\"a\": {\"dtype\": ", 0, 0);
    expect_error("j.safetensors", "j.safetensors", "not valid JSON");
    write_raw("k.safetensors", "[1, 2]", 0, 0);
    expect_error("k.safetensors", "k.safetensors", "not a JSON object");
}
END_TEST

START_TEST(unknown_dtype) {
    write_raw("d.safetensors", "{\"w\":{\"dtype\":\"F7\",\"shape\":[2],\"data_offsets\":[0,2]}}",
              2, 0);
    expect_error("d.safetensors", "tensor w", "unknown dtype \"F7\"");
}
END_TEST

START_TEST(shape_size_mismatch) {
    write_raw("m.safetensors",
              "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 20, 0);
    expect_error("m.safetensors", "tensor w", "need 24 bytes but data_offsets span 20");
    write_raw("n.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}",
              8, 0);
    expect_error("n.safetensors", "tensor w", "not a non-negative integer");
}
END_TEST

START_TEST(offsets_outside) {
    write_raw("o.safetensors", "{\"w\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[4,12]}}",
              8, 0);
    expect_error("o.safetensors", "tensor w", "outside the data area of 8 bytes");
    write_raw("p.safetensors", "{\"w\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[8,0]}}",
              8, 0);
    expect_error("p.safetensors", "tensor w", "data_offsets");
}
END_TEST

START_TEST(overlapping) {
    write_raw("v.safetensors",
              "{\"a\":{\"dtype\":\"U8\",\"shape\":[6],\"data_offsets\":[0,6]},"
              "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}",
              8, 0);
    expect_error("v.safetensors", "overlapping", "tensors a and b");
}
END_TEST

START_TEST(duplicate_names) {
    write_raw("u.safetensors",
              "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
              "\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}",
              8, 0);
    expect_error("u.safetensors", "u.safetensors", "twice");
}
END_TEST

START_TEST(metadata_ignored) {
    write_raw("md.safetensors",
              "{\"__metadata__\":{\"format\":\"pt\"},"
              "\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}",
              4, 0);
    st_set *s;
    ck_assert_msg(st_open(path_of("md.safetensors"), &s, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(st_count(s), 1);
    st_close(s);
}
END_TEST

static void write_index(const char *weight_map) {
    FILE *f = fopen(path_of("model.safetensors.index.json"), "w");
    fprintf(f, "{\"metadata\":{\"total_size\":32},\"weight_map\":{%s}}", weight_map);
    fclose(f);
}

START_TEST(index_ok_and_errors) {
    write_good("model-00001-of-00002.safetensors");
    write_raw("model-00002-of-00002.safetensors",
              "{\"c\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, 0);
    write_index("\"a\":\"model-00001-of-00002.safetensors\",\"b\":\"model-00001-of-00002.safetensors\","
                "\"c\":\"model-00002-of-00002.safetensors\"");
    st_set *s;
    ck_assert_msg(st_open(dir, &s, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(st_count(s), 3);
    ck_assert(strstr(st_find(s, "c")->file, "model-00002-of-00002"));
    st_close(s);
    /* the index names a shard that does not exist */
    write_index("\"a\":\"model-00001-of-00002.safetensors\",\"b\":\"model-00001-of-00002.safetensors\","
                "\"c\":\"model-00003-of-00003.safetensors\"");
    ck_assert_int_lt(st_open(dir, &s, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "model-00003-of-00003.safetensors") && strstr(err, "does not exist"),
                  "%s", err);
    /* the index maps a name the shard does not hold */
    write_index("\"a\":\"model-00001-of-00002.safetensors\",\"b\":\"model-00001-of-00002.safetensors\","
                "\"c\":\"model-00002-of-00002.safetensors\",\"zz\":\"model-00002-of-00002.safetensors\"");
    ck_assert_int_lt(st_open(dir, &s, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "tensor zz") && strstr(err, "does not hold it"), "%s", err);
    /* a shard holds a name the index does not list */
    write_index("\"a\":\"model-00001-of-00002.safetensors\",\"c\":\"model-00002-of-00002.safetensors\"");
    ck_assert_int_lt(st_open(dir, &s, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "tensor b") && strstr(err, "does not list"), "%s", err);
    /* the index is not JSON */
    FILE *f = fopen(path_of("model.safetensors.index.json"), "w");
    fputs("{oops", f);
    fclose(f);
    ck_assert_int_lt(st_open(dir, &s, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "model.safetensors.index.json") && strstr(err, "not valid JSON"),
                  "%s", err);
}
END_TEST

START_TEST(missing_paths) {
    st_set *s;
    ck_assert_int_lt(st_open(path_of("nope.safetensors"), &s, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "nope.safetensors"), "%s", err);
    ck_assert_int_eq(st_open(dir, &s, err, sizeof err), DUET_ENOTFOUND); /* empty directory */
    ck_assert_msg(strstr(err, "model.safetensors.index.json"), "%s", err);
}
END_TEST

/* Random byte flips in a valid file: every outcome is either a clean open or an error sentence
 * (ASan/UBSan turn any out-of-bounds read into a failure). */
START_TEST(mutations_never_crash) {
    write_good("g.safetensors");
    FILE *f = fopen(path_of("g.safetensors"), "rb");
    uint8_t buf[4096];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    unsigned seed = 99;
    int failures = 0;
    volatile unsigned sink = 0;
    for (int it = 0; it < 400; it++) {
        uint8_t m[4096];
        memcpy(m, buf, n);
        for (int k = 0; k < 1 + it % 3; k++) {
            seed = seed * 1103515245u + 12345u;
            size_t at = (seed >> 8) % (n < 120 ? n : 120); /* mostly the length and header */
            seed = seed * 1103515245u + 12345u;
            m[at] = (uint8_t)(seed >> 16);
        }
        size_t len = n - (it % 5 == 4 ? (size_t)(it % 40) : 0);
        f = fopen(path_of("mut.safetensors"), "wb");
        fwrite(m, 1, len, f);
        fclose(f);
        st_set *s = NULL;
        err[0] = 0;
        if (st_open(path_of("mut.safetensors"), &s, err, sizeof err) == 0) {
            for (size_t i = 0; i < st_count(s); i++) /* spans must be readable */
                for (size_t b = 0; b < st_at(s, i)->nbytes; b++)
                    sink += ((const volatile uint8_t *)st_at(s, i)->data)[b];
            st_close(s);
        } else {
            ck_assert_msg(err[0] != 0, "failure without a message at iteration %d", it);
            failures++;
        }
    }
    (void)sink;
    ck_assert_int_gt(failures, 100); /* most mutations of the header must be caught */
}
END_TEST

int main(void) {
    Suite *s = suite_create("safetensors");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, roundtrip);
    tcase_add_test(tc, streaming_writer);
    tcase_add_test(tc, truncated);
    tcase_add_test(tc, header_length_too_large);
    tcase_add_test(tc, invalid_json);
    tcase_add_test(tc, unknown_dtype);
    tcase_add_test(tc, shape_size_mismatch);
    tcase_add_test(tc, offsets_outside);
    tcase_add_test(tc, overlapping);
    tcase_add_test(tc, duplicate_names);
    tcase_add_test(tc, metadata_ignored);
    tcase_add_test(tc, index_ok_and_errors);
    tcase_add_test(tc, missing_paths);
    tcase_add_test(tc, mutations_never_crash);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
