/* test_golden.c — the CPU forward pass against golden logits from transformers.
 *
 * Why: the CPU backend is the reference for every other backend, so it must itself agree with
 * an independent implementation. The fixtures (tests/golden/fixtures/, made by
 * tools/golden/make_golden.py from DeepseekV4ForCausalLM in fp32) hold the tokens, logits at
 * selected positions, the argmax at every position and the top-1/top-2 margin. The model is the
 * tiny random checkpoint that tools/mkmodel writes deterministically (seed 1) at build time.
 *
 * Acceptance (issue "engine core"): relative L2 error of logits ≤ 1e-4 for every case, and the
 * same argmax at every position (positions whose reference margin is below 1e-4 of the logit
 * range are reported; a near-tie there is allowed to flip, and none is expected).
 *
 * usage: test_golden MODEL_DIR FIXTURE_DIR
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/safetensors.h"
#include "worker/model.h"

static const char *g_model, *g_fix;
static be *g_be;
static dv4_model *g_m;
static int V;

#define TOL_REL_L2 1e-4

static void setup(void) {
    char err[512];
    g_be = be_cpu_create(getenv("DUET_THREADS") ? atoi(getenv("DUET_THREADS")) : 0);
    ck_assert_msg(dv4_load(g_model, g_be, NULL, &g_m, err, sizeof err) == 0, "load: %s", err);
    V = dv4_cfg(g_m)->vocab_size;
}

static void teardown(void) {
    dv4_free(g_m);
    g_be->ops->destroy(g_be);
}

/* ---- fixtures ---------------------------------------------------------------------------- */

typedef struct {
    st_set *st;
    int T, S;
    int32_t *tokens;
    const int64_t *sel_pos, *argmax;
    const float *sel_logits, *margin;
} fixture;

static const st_tensor *need(st_set *s, const char *name, const char *suffix, st_dtype dt) {
    char full[64];
    snprintf(full, sizeof full, "%s%s", name, suffix);
    const st_tensor *t = st_find(s, full);
    ck_assert_msg(t != NULL, "fixture tensor %s missing", full);
    ck_assert_msg(t->dtype == dt, "fixture tensor %s has dtype %s", full, st_dtype_name(t->dtype));
    return t;
}

static void fixture_open(fixture *f, const char *cas, const char *suffix) {
    char path[1024], err[512];
    snprintf(path, sizeof path, "%s/%s.safetensors", g_fix, cas);
    memset(f, 0, sizeof *f);
    ck_assert_msg(st_open(path, &f->st, err, sizeof err) == 0, "fixture %s: %s", path, err);
    const st_tensor *tok = need(f->st, "tokens", suffix, ST_I64);
    const st_tensor *sp = need(f->st, "sel_pos", suffix, ST_I64);
    const st_tensor *sl = need(f->st, "sel_logits", suffix, ST_F32);
    const st_tensor *am = need(f->st, "argmax", suffix, ST_I64);
    const st_tensor *mg = need(f->st, "margin", suffix, ST_F32);
    f->T = (int)tok->shape[0];
    f->S = (int)sp->shape[0];
    ck_assert_int_eq(sl->shape[0], f->S);
    ck_assert_int_eq(sl->shape[1], V);
    ck_assert_int_eq(am->shape[0], f->T);
    f->tokens = xmalloc((size_t)f->T * sizeof *f->tokens);
    const int64_t *t64 = tok->data;
    for (int i = 0; i < f->T; i++) f->tokens[i] = (int32_t)t64[i];
    f->sel_pos = sp->data;
    f->sel_logits = sl->data;
    f->argmax = am->data;
    f->margin = mg->data;
}

static void fixture_close(fixture *f) {
    free(f->tokens);
    st_close(f->st);
}

/* Compares logits [T, V] of every position with the fixture. */
static void compare(const char *label, const fixture *f, const float *logits) {
    double num = 0, den = 0, worst = 0, range = 0;
    for (int i = 0; i < f->S; i++) {
        int p = (int)f->sel_pos[i];
        ck_assert_int_lt(p, f->T);
        const float *a = logits + (size_t)p * V, *r = f->sel_logits + (size_t)i * V;
        double rn = 0, rd = 0;
        for (int v = 0; v < V; v++) {
            double d = (double)a[v] - r[v];
            rn += d * d;
            rd += (double)r[v] * r[v];
            if (fabs(r[v]) > range) range = fabs(r[v]);
        }
        num += rn;
        den += rd;
        if (sqrt(rn / rd) > worst) worst = sqrt(rn / rd);
    }
    double rel = sqrt(num / den);
    int flips = 0, near = 0;
    for (int p = 0; p < f->T; p++) {
        int a = 0;
        const float *row = logits + (size_t)p * V;
        for (int v = 1; v < V; v++)
            if (row[v] > row[a]) a = v;
        if (a != (int)f->argmax[p]) {
            if (f->margin[p] < 1e-4 * range) near++;
            else flips++;
        }
    }
    printf("golden %-10s rel_l2 %.3e  worst_row %.3e  argmax_flips %d  near_tie_flips %d\n",
           label, rel, worst, flips, near);
    ck_assert_msg(rel <= TOL_REL_L2, "%s: relative L2 error %.3e > %.1e", label, rel, TOL_REL_L2);
    ck_assert_msg(worst <= 10 * TOL_REL_L2, "%s: worst row %.3e", label, worst);
    ck_assert_msg(flips == 0, "%s: argmax differs at %d positions with a clear margin", label,
                  flips);
}

static dv4_seq *seq_new(int cap) {
    char err[256];
    dv4_seq *s;
    ck_assert_msg(dv4_seq_new(g_m, cap, &s, err, sizeof err) == 0, "%s", err);
    return s;
}

static void run(dv4_seq *s, const int32_t *ids, int n, dv4_logits_mode mode, float *out) {
    char err[256];
    dv4_chunk ch = {s, ids, n, mode};
    ck_assert_msg(dv4_forward(g_m, &ch, 1, out, err, sizeof err) == 0, "%s", err);
}

/* Runs the fixture's tokens in chunks of `chunk` (0 = one prefill) and compares. */
static void run_chunked(const char *cas, const char *label, int chunk) {
    fixture f;
    fixture_open(&f, cas, "");
    float *logits = xmalloc((size_t)f.T * V * sizeof *logits);
    dv4_seq *s = seq_new(f.T);
    if (chunk <= 0) chunk = f.T;
    for (int i = 0; i < f.T; i += chunk) {
        int n = f.T - i < chunk ? f.T - i : chunk;
        run(s, f.tokens + i, n, DV4_LOGITS_ALL, logits + (size_t)i * V);
    }
    ck_assert_int_eq(dv4_seq_pos(s), f.T);
    compare(label, &f, logits);
    dv4_seq_free(g_m, s);
    free(logits);
    fixture_close(&f);
}

/* ---- the cases of spec §6 ----------------------------------------------------------------- */

START_TEST(prefill600) { run_chunked("prefill600", "prefill600", 0); }
END_TEST

START_TEST(chunk37) { run_chunked("chunk37", "chunk37", 37); }
END_TEST

START_TEST(hash) { run_chunked("hash", "hash", 0); }
END_TEST

/* chunk sizes the fixtures do not cover, against the full-prefill reference */
START_TEST(odd_chunks) {
    static const int sizes[] = {1, 3, 8, 129};
    run_chunked("prefill600", sizes[_i] == 1 ? "chunk1" : sizes[_i] == 3 ? "chunk3"
                                              : sizes[_i] == 8 ? "chunk8" : "chunk129",
                sizes[_i]);
}
END_TEST

START_TEST(decode300) {
    fixture f;
    fixture_open(&f, "decode300", "");
    ck_assert_int_gt(f.T, 300);
    float *logits = xmalloc((size_t)f.T * V * sizeof *logits);
    dv4_seq *s = seq_new(f.T);
    run(s, f.tokens, 300, DV4_LOGITS_ALL, logits);
    for (int p = 300; p < f.T; p++) run(s, f.tokens + p, 1, DV4_LOGITS_LAST, logits + (size_t)p * V);
    compare("decode300", &f, logits);
    dv4_seq_free(g_m, s);
    free(logits);
    fixture_close(&f);
}
END_TEST

/* Two sequences of different lengths in the same steps: first as one batch of two whole
 * prompts, then interleaved chunked prefill (chunks of 50 and 37 sharing steps). */
START_TEST(batch2) {
    fixture f[2];
    fixture_open(&f[0], "batch2", "0");
    fixture_open(&f[1], "batch2", "1");
    float *lg[2], *both = xmalloc((size_t)(f[0].T + f[1].T) * V * sizeof *both);
    dv4_seq *s[2] = {seq_new(f[0].T), seq_new(f[1].T)};
    for (int k = 0; k < 2; k++) lg[k] = xmalloc((size_t)f[k].T * V * sizeof *lg[k]);
    char err[256];
    dv4_chunk ch[2] = {{s[0], f[0].tokens, f[0].T, DV4_LOGITS_ALL},
                       {s[1], f[1].tokens, f[1].T, DV4_LOGITS_ALL}};
    ck_assert_msg(dv4_forward(g_m, ch, 2, both, err, sizeof err) == 0, "%s", err);
    compare("batch2.a", &f[0], both);
    compare("batch2.b", &f[1], both + (size_t)f[0].T * V);
    for (int k = 0; k < 2; k++) {
        dv4_seq_free(g_m, s[k]);
        s[k] = seq_new(f[k].T);
    }
    static const int csz[2] = {50, 37};
    int done[2] = {0, 0};
    while (done[0] < f[0].T || done[1] < f[1].T) {
        dv4_chunk c2[2];
        int n = 0, which[2];
        for (int k = 0; k < 2; k++) {
            if (done[k] >= f[k].T) continue;
            int len = f[k].T - done[k] < csz[k] ? f[k].T - done[k] : csz[k];
            c2[n] = (dv4_chunk){s[k], f[k].tokens + done[k], len, DV4_LOGITS_ALL};
            which[n++] = k;
        }
        ck_assert_msg(dv4_forward(g_m, c2, n, both, err, sizeof err) == 0, "%s", err);
        size_t off = 0;
        for (int j = 0; j < n; j++) {
            int k = which[j];
            memcpy(lg[k] + (size_t)done[k] * V, both + off, (size_t)c2[j].n * V * sizeof *both);
            off += (size_t)c2[j].n * V;
            done[k] += c2[j].n;
        }
    }
    compare("batch2.ia", &f[0], lg[0]);
    compare("batch2.ib", &f[1], lg[1]);
    for (int k = 0; k < 2; k++) {
        dv4_seq_free(g_m, s[k]);
        free(lg[k]);
        fixture_close(&f[k]);
    }
    free(both);
}
END_TEST

/* Bad input to the forward pass is refused with a sentence, and nothing changes. */
START_TEST(bad_chunks) {
    char err[256];
    dv4_seq *s = seq_new(4);
    int32_t ids[5] = {1, 2, 3, 4, 5};
    dv4_chunk big = {s, ids, 5, DV4_LOGITS_LAST};
    ck_assert_int_ne(dv4_forward(g_m, &big, 1, NULL, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "capacity") != NULL, "%s", err);
    int32_t bad = V;
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
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
