/* test_golden.c — the CPU forward pass against golden logits from transformers.
 *
 * Why: the CPU backend is the reference for every other backend, so it must itself agree with
 * an independent implementation. The fixtures (tests/golden/fixtures/, made by
 * tools/golden/make_golden.py from DeepseekV4ForCausalLM in fp32) hold the tokens, logits at
 * selected positions, the argmax at every position and the top-1/top-2 margin. The model is the
 * tiny random checkpoint that tools/mkmodel writes deterministically (seed 1) at build time.
 * The cases and the acceptance rule live in golden_cases.c (shared with the GPU test); the
 * bf16-KV and FP8-KV passes (prefill600, decode300) use their looser rules, GOLDEN_TOL_BF16_KV
 * and GOLDEN_TOL_FP8_KV.
 *
 * usage: test_golden MODEL_DIR FIXTURE_DIR
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "tests/golden/golden_cases.h"
#include "worker/model.h"

static const char *g_model, *g_fix;
static be *g_be;
static dv4_model *g_m;
static golden G;

static void setup(void) {
    char err[512];
    g_be = be_cpu_create(getenv("DUET_THREADS") ? atoi(getenv("DUET_THREADS")) : 0);
    ck_assert_msg(dv4_load(g_model, g_be, NULL, &g_m, err, sizeof err) == 0, "load: %s", err);
    G = (golden){g_m, g_fix, "golden", 0};
}

static void teardown(void) {
    dv4_free(g_m);
    g_be->ops->destroy(g_be);
}

/* ---- the cases of spec §6 ----------------------------------------------------------------- */

START_TEST(prefill600) { ck_assert_int_eq(golden_chunked(&G, "prefill600", "prefill600", 0), 0); }
END_TEST

START_TEST(chunk37) { ck_assert_int_eq(golden_chunked(&G, "chunk37", "chunk37", 37), 0); }
END_TEST

START_TEST(hash) { ck_assert_int_eq(golden_chunked(&G, "hash", "hash", 0), 0); }
END_TEST

/* chunk sizes the fixtures do not cover, against the full-prefill reference */
START_TEST(odd_chunks) {
    static const int sizes[] = {1, 3, 8, 129};
    static const char *labels[] = {"chunk1", "chunk3", "chunk8", "chunk129"};
    ck_assert_int_eq(golden_chunked(&G, "prefill600", labels[_i], sizes[_i]), 0);
}
END_TEST

START_TEST(decode300) { ck_assert_int_eq(golden_decode300(&G), 0); }
END_TEST

/* prefill600 and decode300 with KV dtype dt under its looser rule: a model of its own, since
 * the KV dtype is fixed once sequences exist. */
static int kv_dtype_pass(dv4_kv_dtype dt, const char *tag, double tol) {
    char err[512];
    dv4_model *m;
    ck_assert_msg(dv4_load(g_model, g_be, NULL, &m, err, sizeof err) == 0, "load: %s", err);
    ck_assert_msg(dv4_set_kv_dtype(m, dt, err, sizeof err) == 0, "%s", err);
    golden g = {m, g_fix, tag, tol};
    int fails = golden_chunked(&g, "prefill600", "prefill600", 0) + golden_decode300(&g);
    dv4_free(m);
    return fails;
}

/* bf16 KV state (rings, compressed entries, indexer keys) under GOLDEN_TOL_BF16_KV */
START_TEST(bf16_kv) { ck_assert_int_eq(kv_dtype_pass(DV4_KV_BF16, "golden-bf16kv", GOLDEN_TOL_BF16_KV), 0); }
END_TEST

/* FP8 KV rows (rings, compressed entries; keys bf16) under GOLDEN_TOL_FP8_KV */
START_TEST(fp8_kv) { ck_assert_int_eq(kv_dtype_pass(DV4_KV_FP8, "golden-fp8kv", GOLDEN_TOL_FP8_KV), 0); }
END_TEST

/* Two sequences of different lengths in the same steps. */
START_TEST(batch2) { ck_assert_int_eq(golden_batch2(&G), 0); }
END_TEST

static dv4_seq *seq_new(int cap) {
    char err[256];
    dv4_seq *s;
    ck_assert_msg(dv4_seq_new(g_m, cap, &s, err, sizeof err) == 0, "%s", err);
    return s;
}

/* Bad input to the forward pass is refused with a sentence, and nothing changes. */
START_TEST(bad_chunks) {
    char err[256];
    dv4_seq *s = seq_new(4);
    int32_t ids[5] = {1, 2, 3, 4, 5};
    dv4_chunk big = {s, ids, 5, DV4_LOGITS_LAST};
    ck_assert_int_ne(dv4_forward(g_m, &big, 1, NULL, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "capacity") != NULL, "%s", err);
    int32_t bad = dv4_cfg(g_m)->vocab_size;
    dv4_chunk oov = {s, &bad, 1, DV4_LOGITS_LAST};
    ck_assert_int_ne(dv4_forward(g_m, &oov, 1, NULL, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "outside") != NULL, "%s", err);
    dv4_chunk twice[2] = {{s, ids, 1, DV4_LOGITS_NONE}, {s, ids + 1, 1, DV4_LOGITS_NONE}};
    ck_assert_int_ne(dv4_forward(g_m, twice, 2, NULL, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "same sequence") != NULL, "%s", err);
    ck_assert_int_eq(dv4_seq_pos(s), 0);
    dv4_seq_free(g_m, s);
}
END_TEST

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL_DIR FIXTURE_DIR\n", argv[0]);
        return 2;
    }
    g_model = argv[1];
    g_fix = argv[2];
    Suite *s = suite_create("golden");
    TCase *tc = tcase_create("cases");
    tcase_set_timeout(tc, 600);
    tcase_add_unchecked_fixture(tc, setup, teardown);
    tcase_add_test(tc, prefill600);
    tcase_add_test(tc, decode300);
    tcase_add_test(tc, chunk37);
    tcase_add_loop_test(tc, odd_chunks, 0, 4);
    tcase_add_test(tc, batch2);
    tcase_add_test(tc, hash);
    tcase_add_test(tc, bad_chunks);
    tcase_add_test(tc, bf16_kv);
    tcase_add_test(tc, fp8_kv);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
