/* test_sample_op.c — the CPU backend's `sample` op (worker/be_cpu.c, the reference of the
 * device sampler) against worker_sample, the host sampler.
 *
 * Why: the worker sends rows without shaping to the op when device sampling is on, and a CUDA
 * op is checked only against this one; so this one must draw what worker_sample draws. Greedy
 * ids must be equal always; sampled ids must be equal unless the op says `fallback` (the cut or
 * the walk left its BE_SAMPLE_RANKED ranked candidates), which must stay rare on peaked logits
 * like a language model's and must never happen when top_k <= BE_SAMPLE_RANKED; logprobs and
 * top logprobs must agree to 1e-5 (both sum in double, in different orders). A row's draw must
 * not depend on the other rows of the call (batch independence).
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker/backend.h"
#include "worker/worker_sample.h"

static uint64_t rs = 88172645463325252ull;
static uint64_t rnd(void) {
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return rs;
}
static double unif(void) { return (double)(rnd() >> 11) * 0x1.0p-53; }
static float gauss(void) { return (float)(sqrt(-2 * log(unif() + 1e-300)) * cos(6.283185307179586 * unif())); }

/* logits[V] of a peaked kind: 0 Gaussian × scale, 1 the same rounded to 0.5 (many ties), 2 with
 * NaN and -inf entries, 3 flat (every value equal) */
static void make_row(float *x, int V, int kind, float scale) {
    for (int i = 0; i < V; i++) x[i] = scale * gauss();
    if (kind == 1)
        for (int i = 0; i < V; i++) x[i] = roundf(2 * x[i]) / 2;
    if (kind == 2)
        for (int i = 0; i < V; i += 7) x[i] = (i / 7) % 2 ? NAN : -INFINITY;
    if (kind == 3)
        for (int i = 0; i < V; i++) x[i] = 0.25f;
}

typedef struct {
    float temp, top_p, min_p;
    int top_k;
} pset;

static const pset PS[] = {
    {0, 0, 0, 0},        {0, 0.9f, 0, 40},    {1, 0, 0, 0},       {0.7f, 0, 0, 0},
    {1, 0.9f, 0, 0},     {0.8f, 0.95f, 0, 0}, {1, 0, 0, 50},      {0.6f, 0, 0, 1},
    {1, 0, 0.05f, 0},    {1.2f, 0.8f, 0.1f, 0}, {1, 0.5f, 0, 20}, {0.9f, 0, 0, 1024},
    {1, 0, 0, 5000},     {1, 0.9f, 0, 5000},  {1, 0, 0.02f, 3000}, {1e-6f, 0.9f, 0, 0},
    {1, 0.995f, 0, 0},   {2, 0, 0.3f, 0},
};
enum { NPS = sizeof PS / sizeof *PS };

/* worker_sample's draw, logprob and top logprobs for one row */
static int32_t host_draw(const float *x, int V, const pset *p, uint64_t seed, uint64_t pos,
                         float *lp, int nt, int32_t *ti, float *tl) {
    worker_sample_params sp = {.temperature = p->temp, .top_p = p->top_p, .top_k = p->top_k,
                               .min_p = p->min_p, .seed = seed};
    char err[200];
    return worker_sample(x, V, &sp, NULL, pos, lp, nt, ti, tl, err, sizeof err);
}

static be_sample_req req_of(const pset *p, int row, uint64_t seed, uint64_t pos, int nt) {
    return (be_sample_req){.row = row, .temperature = p->temp, .top_p = p->top_p,
                           .min_p = p->min_p, .top_k = p->top_k, .n_top = nt,
                           .u01 = worker_sample_u01(seed, 0, pos)};
}

/* Every parameter set on `rows` random rows of one kind, all in one op call. Rows whose top_k
 * exceeds BE_SAMPLE_RANKED (but not V) with no min_p must fall back (their cut or sum needs
 * the unranked candidates); of the others, those that could (top_k off) are counted in
 * *could and their fallbacks in *fb. */
static void check_kind(be *b, int V, int kind, float scale, int rows, int *fb, int *could) {
    int n = rows * NPS;
    float *x = malloc((size_t)n * V * sizeof *x);
    be_sample_req *rq = malloc((size_t)n * sizeof *rq);
    be_sample_res *rr = malloc((size_t)n * sizeof *rr);
    for (int i = 0; i < n; i++) {
        make_row(x + (size_t)i * V, V, kind, scale);
        /* request i reads row n-1-i: the row index is honoured */
        rq[i] = req_of(&PS[i % NPS], n - 1 - i, 1000 + (uint64_t)i, (uint64_t)i * 3, 5 + i % 16);
    }
    b->ops->sample(b, x, V, n, rq, rr);
    for (int i = 0; i < n; i++) {
        const pset *p = &PS[i % NPS];
        const float *row = x + (size_t)(n - 1 - i) * V;
        float lp, tl[20];
        int32_t ti[20];
        int nt = rq[i].n_top;
        int32_t id = host_draw(row, V, p, 1000 + (uint64_t)i, (uint64_t)i * 3, &lp, nt, ti, tl);
        int greedy = !(p->temp >= 1e-5f);
        int must = !greedy && p->top_k > BE_SAMPLE_RANKED && p->top_k < V && !(p->min_p > 0);
        int may = !greedy && !must && !(p->top_k > 0 && p->top_k <= BE_SAMPLE_RANKED);
        *could += may;
        ck_assert_msg(!must || rr[i].fallback, "kind %d row %d: top_k %d must fall back", kind,
                      i, p->top_k);
        ck_assert_int_eq(rr[i].n_top, nt);
        for (int k = 0; k < nt; k++) {
            ck_assert_int_eq(rr[i].top_ids[k], ti[k]);
            ck_assert(fabsf(rr[i].top_logprobs[k] - tl[k]) <= 1e-5f ||
                      (isinf(tl[k]) && rr[i].top_logprobs[k] == tl[k]));
        }
        if (rr[i].fallback) {
            ck_assert_msg(may || must, "kind %d row %d: fallback with top_k %d temp %g", kind,
                          i, p->top_k, p->temp);
            *fb += may;
            if (getenv("SAMPLE_OP_VERBOSE")) printf("fallback: kind %d set %d\n", kind, i % NPS);
            continue;
        }
        ck_assert_msg(rr[i].id == id, "kind %d row %d (temp %g top_k %d top_p %g min_p %g): op "
                      "drew %d, worker_sample %d", kind, i, p->temp, p->top_k, p->top_p,
                      p->min_p, rr[i].id, id);
        ck_assert(fabsf(rr[i].logprob - lp) <= 1e-5f || (isinf(lp) && rr[i].logprob == lp));
    }
    /* batch independence: each request alone draws what it drew in the batch */
    for (int i = 0; i < n; i += 7) {
        be_sample_res one;
        b->ops->sample(b, x, V, 1, &rq[i], &one);
        ck_assert_int_eq(one.fallback, rr[i].fallback);
        if (!one.fallback) ck_assert_int_eq(one.id, rr[i].id);
    }
    free(x);
    free(rq);
    free(rr);
}

START_TEST(op_matches_worker_sample) {
    be *b = be_cpu_create(2);
    ck_assert_ptr_nonnull(b->ops->sample);
    int fb = 0, could = 0;
    check_kind(b, 20000, 0, 6.0f, 6, &fb, &could);
    check_kind(b, 20000, 1, 6.0f, 3, &fb, &could);
    check_kind(b, 20000, 2, 6.0f, 3, &fb, &could);
    printf("sample op: %d of %d rows without top_k fell back (peaked logits)\n", fb, could);
    ck_assert_int_le(fb, could / 20);
    b->ops->destroy(b);
}
END_TEST

/* small vocabularies (V < BE_SAMPLE_RANKED: everything is ranked, nothing falls back), flat
 * rows (every id ties), a full-size row */
START_TEST(op_edges) {
    be *b = be_cpu_create(2);
    int fb = 0, could = 0;
    check_kind(b, 300, 0, 2.0f, 4, &fb, &could);
    check_kind(b, 64, 1, 1.0f, 4, &fb, &could);
    check_kind(b, 1000, 2, 1.0f, 2, &fb, &could);
    check_kind(b, 1000, 3, 1.0f, 2, &fb, &could);
    ck_assert_int_eq(fb, 0);
    check_kind(b, 129280, 0, 6.0f, 1, &fb, &could);
    b->ops->destroy(b);
}
END_TEST

int main(void) {
    Suite *s = suite_create("sample-op");
    TCase *t = tcase_create("cpu");
    tcase_set_timeout(t, 300);
    tcase_add_test(t, op_matches_worker_sample);
    tcase_add_test(t, op_edges);
    suite_add_tcase(s, t);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}
