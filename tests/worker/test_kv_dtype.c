/* test_kv_dtype.c — bf16 and fp8 KV state against f32 KV state (tiny model, CPU backend).
 *
 * Why: bf16 KV (duet-worker --kv-dtype bf16) rounds every stored ring value, compressed entry
 * and indexer key to bf16 and widens it on read; fp8 stores rings and compressed entries as FP8
 * rows (common/formats.h: e4m3 nope dims with a scale per 64, bf16 RoPE dims) and indexer keys
 * as bf16; the math stays f32. Each must change the logits only by that rounding (a prefill of
 * 400 tokens and 40 decode steps; measured numbers and bounds below), and the block accounting
 * (what the coordinator budgets blocks from) must follow the stored bytes exactly.
 * Bit-exact invariances (chunking, batching, prefix restore) per dtype are test_invariance's,
 * run with KV_DTYPE bf16 and fp8.
 *
 * usage: test_kv_dtype MODEL_DIR
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/formats.h"
#include "worker/model.h"

static const char *g_model;

enum { N = 400, STEPS = 40 }; /* prompt (crosses CSA, HCA and ring bounds); decode steps */
/* Bounds, measured (tiny model, seed-1 weights) and given margin: most rows move by the rounding
 * alone (bf16: median row 2.6e-3, rel L2 3.1e-2, argmax 437/440; fp8 (3 mantissa bits): median
 * 2.8e-2, rel L2 1.1e-1, worst 0.90, argmax 399/440 — the model here has random weights and no
 * KV QAT; V4 is trained with the FP8 round trip of its nope dims, which fp8 rows reproduce
 * exactly); a few move far where the indexer's top-16
 * set changes (scores of rounded keys reorder near-equal entries: the tiny model's CSA layers
 * pick 16 of up to 110), which dominates the overall relative L2. */
typedef struct {
    dv4_kv_dtype dt;
    double median_max, rel_max, worst_max;
    int argmax_pct; /* rows whose argmax must stay */
} bounds;
static const bounds BF16 = {DV4_KV_BF16, 1e-2, 1e-1, 1.5, 95};
static const bounds FP8 = {DV4_KV_FP8, 6e-2, 2.5e-1, 1.5, 85};

/* Logits [N + STEPS, V] of a prefill of ids[0, N) then STEPS single-token decode steps, on a
 * freshly loaded model with KV dtype dt. */
static float *run_model(dv4_kv_dtype dt, const int32_t *ids, int *V) {
    char err[512];
    be *b = be_cpu_create(2);
    dv4_model *m;
    ck_assert_msg(dv4_load(g_model, b, NULL, &m, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(dv4_set_kv_dtype(m, dt, err, sizeof err) == 0, "%s", err);
    *V = dv4_cfg(m)->vocab_size;
    float *lg = xmalloc((size_t)(N + STEPS) * *V * sizeof *lg);
    dv4_seq *s;
    ck_assert(dv4_seq_new(m, 4096, &s, err, sizeof err) == 0);
    dv4_chunk pre = {s, ids, N, DV4_LOGITS_ALL};
    ck_assert_msg(dv4_forward(m, &pre, 1, lg, err, sizeof err) == 0, "%s", err);
    for (int i = 0; i < STEPS; i++) {
        dv4_chunk one = {s, ids + N + i, 1, DV4_LOGITS_LAST};
        ck_assert_msg(dv4_forward(m, &one, 1, lg + (size_t)(N + i) * *V, err, sizeof err) == 0,
                      "%s", err);
    }
    dv4_seq_free(m, s);
    dv4_free(m);
    b->ops->destroy(b);
    return lg;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int argmax(const float *x, int n) {
    int a = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[a]) a = i;
    return a;
}

/* dt's logits against f32 KV's within the bounds */
static void near_f32(const bounds *bd) {
    int32_t ids[N + STEPS];
    for (int i = 0; i < N + STEPS; i++) ids[i] = (int32_t)((i * 7919 + 13) % 1000);
    int V, V2;
    float *ref = run_model(DV4_KV_F32, ids, &V), *got = run_model(bd->dt, ids, &V2);
    ck_assert_int_eq(V, V2);
    int rows = N + STEPS, same = 0;
    double num = 0, den = 0, worst = 0, *row_err = xmalloc((size_t)rows * sizeof *row_err);
    for (int r = 0; r < rows; r++) {
        const float *a = got + (size_t)r * V, *e = ref + (size_t)r * V;
        double rn = 0, rd = 0;
        for (int v = 0; v < V; v++) {
            rn += ((double)a[v] - e[v]) * ((double)a[v] - e[v]);
            rd += (double)e[v] * e[v];
        }
        num += rn;
        den += rd;
        row_err[r] = sqrt(rn / rd);
        if (!(row_err[r] <= worst)) worst = row_err[r]; /* a NaN is the worst */
        same += argmax(a, V) == argmax(e, V);
    }
    double rel = sqrt(num / den);
    qsort(row_err, (size_t)rows, sizeof *row_err, cmp_double);
    double median = row_err[rows / 2];
    const char *name = dv4_kv_dtype_name(bd->dt);
    printf("%s KV vs f32 KV, %d rows: rel_l2 %.3e  median_row %.3e  worst_row %.3e  argmax "
           "equal %d/%d\n", name, rows, rel, median, worst, same, rows);
    ck_assert_msg(num > 0, "%s KV gave bit-identical logits: the dtype was not applied", name);
    ck_assert_msg(median <= bd->median_max, "median row error %.3e above %.0e", median,
                  bd->median_max);
    ck_assert_msg(rel <= bd->rel_max, "relative L2 %.3e above %.0e", rel, bd->rel_max);
    ck_assert_msg(worst <= bd->worst_max, "worst row %.3e above %.1f", worst, bd->worst_max);
    ck_assert_msg(same * 100 >= rows * bd->argmax_pct, "argmax equal on only %d of %d rows", same,
                  rows);
    free(ref);
    free(got);
    free(row_err);
}

START_TEST(bf16_logits_near_f32) { near_f32(&BF16); }
END_TEST
START_TEST(fp8_logits_near_f32) { near_f32(&FP8); }
END_TEST

/* bf16 halves exactly the ring, entry and key bytes; the f32 carries are unchanged. */
START_TEST(bf16_sizes_are_half) {
    char err[512];
    dv4_config c;
    ck_assert_msg(cfg_load(g_model, &c, err, sizeof err) == 0, "%s", err);
    dv4_kv_sizes f, h;
    ck_assert_int_eq(dv4_kv_sizes_of(&c, 256, DV4_KV_F32, &f, err, sizeof err), 0);
    ck_assert_int_eq(dv4_kv_sizes_of(&c, 256, DV4_KV_BF16, &h, err, sizeof err), 0);
    uint64_t ring_el = 0, grow_el = 0; /* per layer: ring; per block: entries + keys */
    for (int i = 0; i < c.num_hidden_layers; i++) {
        int r = cfg_ratio(&c, i);
        ring_el += (uint64_t)c.sliding_window * c.head_dim;
        if (r) grow_el += (uint64_t)(256 / r) * c.head_dim;
        if (r == 4) grow_el += (uint64_t)(256 / 4) * c.index_head_dim;
    }
    ck_assert_uint_gt(grow_el, 0);
    ck_assert_uint_eq(f.block_bytes, grow_el * 4);
    ck_assert_uint_eq(h.block_bytes, grow_el * 2);
    ck_assert_uint_eq(f.resume_bytes - h.resume_bytes, ring_el * 2);
    ck_assert_uint_eq(f.fixed_bytes - h.fixed_bytes, ring_el * 2);
    /* fp8: rings and entries in FP8 rows of head_dim, keys bf16 */
    dv4_kv_sizes q;
    ck_assert_int_eq(dv4_kv_sizes_of(&c, 256, DV4_KV_FP8, &q, err, sizeof err), 0);
    uint64_t rows_ring = 0, rows_ent = 0, keys = 0;
    for (int i = 0; i < c.num_hidden_layers; i++) {
        int r = cfg_ratio(&c, i);
        rows_ring += (uint64_t)c.sliding_window;
        if (r) rows_ent += (uint64_t)(256 / r);
        if (r == 4) keys += (uint64_t)(256 / 4);
    }
    uint64_t rb = fmt_kv_fp8_row_bytes(c.head_dim);
    ck_assert_uint_eq(q.block_bytes, rows_ent * rb + keys * c.index_head_dim * 2);
    ck_assert_uint_eq(f.resume_bytes - q.resume_bytes, rows_ring * (c.head_dim * 4 - rb));
    ck_assert_uint_eq(f.fixed_bytes - q.fixed_bytes, rows_ring * (c.head_dim * 4 - rb));
    printf("tiny model, B = 256: block %llu -> %llu B, resume %llu -> %llu B, fixed %llu -> "
           "%llu B (f32 -> bf16)\n", (unsigned long long)f.block_bytes,
           (unsigned long long)h.block_bytes, (unsigned long long)f.resume_bytes,
           (unsigned long long)h.resume_bytes, (unsigned long long)f.fixed_bytes,
           (unsigned long long)h.fixed_bytes);
    printf("tiny model, B = 256, fp8: block %llu B, resume %llu B, fixed %llu B\n",
           (unsigned long long)q.block_bytes, (unsigned long long)q.resume_bytes,
           (unsigned long long)q.fixed_bytes);
}
END_TEST

/* fp8 rows need 64 RoPE dims and a head dim of 64 more than a multiple of 64: other configs are
 * refused by the sizes (what the worker budgets from) with a sentence. */
START_TEST(fp8_refused_for_unfit_rows) {
    char err[512];
    dv4_config c;
    ck_assert_msg(cfg_load(g_model, &c, err, sizeof err) == 0, "%s", err);
    dv4_kv_sizes z;
    ck_assert_int_eq(dv4_kv_sizes_of(&c, 256, DV4_KV_FP8, &z, err, sizeof err), 0);
    c.head_dim = 100;
    ck_assert_int_eq(dv4_kv_sizes_of(&c, 256, DV4_KV_FP8, &z, err, sizeof err), DUET_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "fp8 KV rows need 64 RoPE dims"));
    ck_assert_int_eq(dv4_kv_sizes_of(&c, 256, DV4_KV_BF16, &z, err, sizeof err), 0);
}
END_TEST

/* Only f32, bf16 and fp8 are accepted, by name and by value. */
START_TEST(bad_dtypes_refused) {
    char err[512];
    dv4_kv_dtype dt = DV4_KV_F32;
    ck_assert_int_eq(dv4_kv_dtype_parse("fp16", &dt, err, sizeof err), DUET_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "use f32 (the default), bf16 or fp8"));
    ck_assert_int_eq(dv4_kv_dtype_parse("fp8", &dt, err, sizeof err), 0);
    ck_assert_int_eq(dt, DV4_KV_FP8);
    ck_assert_str_eq(dv4_kv_dtype_name(dt), "fp8");
    ck_assert_int_eq(dv4_kv_dtype_parse("bf16", &dt, err, sizeof err), 0);
    ck_assert_int_eq(dt, DV4_KV_BF16);
    ck_assert_str_eq(dv4_kv_dtype_name(dt), "bf16");
    be *b = be_cpu_create(1);
    dv4_model *m;
    ck_assert_msg(dv4_load(g_model, b, NULL, &m, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(dv4_get_kv_dtype(m), DV4_KV_F32);
    ck_assert_int_eq(dv4_set_kv_dtype(m, (dv4_kv_dtype)7, err, sizeof err), DUET_EINVAL);
    ck_assert_int_eq(dv4_get_kv_dtype(m), DV4_KV_F32);
    dv4_free(m);
    b->ops->destroy(b);
}
END_TEST

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: test_kv_dtype MODEL_DIR\n");
        return 2;
    }
    g_model = argv[1];
    Suite *s = suite_create("kv_dtype");
    TCase *t = tcase_create("kv_dtype");
    tcase_set_timeout(t, 600);
    tcase_add_test(t, bf16_logits_near_f32);
    tcase_add_test(t, fp8_logits_near_f32);
    tcase_add_test(t, bf16_sizes_are_half);
    tcase_add_test(t, bad_dtypes_refused);
    tcase_add_test(t, fp8_refused_for_unfit_rows);
    suite_add_tcase(s, t);
    SRunner *r = srunner_create(s);
    srunner_set_fork_status(r, CK_NOFORK);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}
