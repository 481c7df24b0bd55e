/* test_sample.c — unit tests of the rank-0 sampler (worker/worker_sample.c).
 *
 * Why: sampling must be reproducible (a pure function of logits, parameters, seed and
 * position), must honour greedy/top-k/top-p/min-p exactly at their edges, and must never
 * return an id outside the vocabulary, even for NaN or -inf logits.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>

#include "worker/worker_sample.h"

#define V 64

static void ramp(float *x) {
    for (int i = 0; i < V; i++) x[i] = (float)((i * 37) % V) * 0.1f; /* max at id with 37i%64=63 */
}

static int argmax(const float *x) {
    int b = 0;
    for (int i = 1; i < V; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

START_TEST(greedy_is_argmax) {
    float x[V];
    ramp(x);
    worker_sample_params p = {0};
    float lp;
    int32_t ids[3];
    float lps[3];
    int32_t t = worker_sample(x, V, &p, 5, &lp, 3, ids, lps);
    ck_assert_int_eq(t, argmax(x));
    ck_assert_int_eq(ids[0], t);
    ck_assert(lps[0] >= lps[1] && lps[1] >= lps[2]);
    /* log-softmax: sum of exp over the vocabulary is 1 */
    double z = 0;
    for (int i = 0; i < V; i++) z += exp(x[i] - x[t]);
    ck_assert_double_eq_tol(lp, -log(z), 1e-5);
}
END_TEST

START_TEST(top_k_1_and_tiny_top_p_are_greedy) {
    float x[V];
    ramp(x);
    for (uint64_t seed = 0; seed < 50; seed++) {
        worker_sample_params p = {.temperature = 5.0f, .top_k = 1, .seed = seed};
        ck_assert_int_eq(worker_sample(x, V, &p, seed, NULL, 0, NULL, NULL), argmax(x));
        worker_sample_params q = {.temperature = 5.0f, .top_p = 1e-6f, .seed = seed};
        ck_assert_int_eq(worker_sample(x, V, &q, seed, NULL, 0, NULL, NULL), argmax(x));
        worker_sample_params r = {.temperature = 5.0f, .min_p = 1.0f, .seed = seed};
        ck_assert_int_eq(worker_sample(x, V, &r, seed, NULL, 0, NULL, NULL), argmax(x));
    }
}
END_TEST

START_TEST(seeded_and_position_dependent) {
    float x[V];
    for (int i = 0; i < V; i++) x[i] = 0; /* uniform: every draw is possible */
    worker_sample_params p = {.temperature = 1.0f, .seed = 1234};
    int same = 1, hist[V] = {0};
    for (uint64_t pos = 0; pos < 4000; pos++) {
        int32_t a = worker_sample(x, V, &p, pos, NULL, 0, NULL, NULL);
        int32_t b = worker_sample(x, V, &p, pos, NULL, 0, NULL, NULL);
        ck_assert_int_eq(a, b); /* deterministic */
        ck_assert(a >= 0 && a < V);
        hist[a]++;
        if (pos && a != worker_sample(x, V, &p, pos - 1, NULL, 0, NULL, NULL)) same = 0;
    }
    ck_assert(!same); /* positions draw differently */
    for (int i = 0; i < V; i++) ck_assert_msg(hist[i] > 20 && hist[i] < 120, "id %d: %d", i, hist[i]);
    /* top-k 4 keeps exactly the four largest */
    ramp(x);
    worker_sample_params k = {.temperature = 100.0f, .top_k = 4, .seed = 9};
    int top[4], nt = 0;
    float y[V];
    for (int i = 0; i < V; i++) y[i] = x[i];
    for (int r = 0; r < 4; r++) {
        int b = argmax(y);
        top[nt++] = b;
        y[b] = -INFINITY;
    }
    for (uint64_t pos = 0; pos < 500; pos++) {
        int32_t t = worker_sample(x, V, &k, pos, NULL, 0, NULL, NULL);
        ck_assert(t == top[0] || t == top[1] || t == top[2] || t == top[3]);
    }
}
END_TEST

START_TEST(nan_and_inf_logits) {
    float x[V];
    for (int i = 0; i < V; i++) x[i] = NAN;
    worker_sample_params p = {.temperature = 1.0f, .seed = 3};
    int32_t t = worker_sample(x, V, &p, 0, NULL, 0, NULL, NULL);
    ck_assert(t >= 0 && t < V);
    for (int i = 0; i < V; i++) x[i] = -INFINITY;
    x[17] = 2.0f;
    x[3] = NAN;
    float lp;
    ck_assert_int_eq(worker_sample(x, V, &p, 1, &lp, 0, NULL, NULL), 17);
    ck_assert_float_eq_tol(lp, 0.0f, 1e-6f);
}
END_TEST

int main(void) {
    Suite *s = suite_create("sample");
    TCase *t = tcase_create("sample");
    tcase_add_test(t, greedy_is_argmax);
    tcase_add_test(t, top_k_1_and_tiny_top_p_are_greedy);
    tcase_add_test(t, seeded_and_position_dependent);
    tcase_add_test(t, nan_and_inf_logits);
    suite_add_tcase(s, t);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}
