/* test_sample.c — unit tests of the rank-0 sampler (worker/worker_sample.c).
 *
 * Why: sampling must be reproducible (a pure function of logits, parameters, token counts,
 * seed, stream and position), must honour greedy/top-k/top-p/min-p exactly at their edges,
 * must apply masks, logit bias and the three penalties with their documented meanings
 * (repetition over prompt + generated, presence/frequency over generated only), must report
 * logprobs of the RAW logits, and must never return an id outside the vocabulary, even for
 * NaN or -inf logits or masks that leave nothing.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "worker/worker_sample.h"

#define V 64

static void ramp(float *x) {
    for (int i = 0; i < V; i++) x[i] = (float)((i * 37) % V) * 0.1f; /* max at id with 37i%64=63 */
}

/* ---- reference: the sampler as specified, with a full sort of every candidate ------------ */

typedef struct {
    float v;
    int32_t id;
} rcand;

static int rcand_cmp(const void *a, const void *b) { /* value descending, then id ascending */
    const rcand *x = a, *y = b;
    return x->v > y->v ? -1 : x->v < y->v ? 1 : (x->id > y->id) - (x->id < y->id);
}

static uint64_t rmix(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* temperature > 0, no masks, bias or penalties */
static int32_t ref_sample(const float *x, int n, const worker_sample_params *p, uint64_t pos) {
    rcand *c = malloc((size_t)n * sizeof *c);
    for (int i = 0; i < n; i++) c[i] = (rcand){x[i], i};
    qsort(c, (size_t)n, sizeof *c, rcand_cmp);
    if (p->top_k > 0 && p->top_k < n) n = p->top_k;
    double *pr = malloc((size_t)n * sizeof *pr), sum = 0;
    for (int i = 0; i < n; i++) pr[i] = exp(((double)c[i].v - c[0].v) / p->temperature);
    if (p->top_p > 0 && p->top_p < 1) {
        double s = 0, tot = 0;
        for (int i = 0; i < n; i++) tot += pr[i];
        int k = 0;
        while (k < n) {
            s += pr[k++];
            if (s >= p->top_p * tot) break;
        }
        n = k;
    }
    if (p->min_p > 0 && p->min_p <= 1) {
        int k = 1;
        while (k < n && pr[k] / pr[0] >= p->min_p) k++;
        n = k;
    }
    for (int i = 0; i < n; i++) sum += pr[i];
    uint64_t sx = p->stream, st = p->seed ^ (pos * 0xD1B54A32D192ED03ull) ^ (sx ? rmix(&sx) : 0);
    double u = (double)(rmix(&st) >> 11) * 0x1.0p-53 * sum, acc = 0;
    int32_t chosen = c[n - 1].id;
    for (int i = 0; i < n; i++)
        if (u < (acc += pr[i])) {
            chosen = c[i].id;
            break;
        }
    free(pr);
    free(c);
    return chosen;
}

static int argmax(const float *x) {
    int b = 0;
    for (int i = 1; i < V; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

/* one draw without counts, logprobs or errors */
static int32_t draw(const float *x, const worker_sample_params *p, uint64_t pos) {
    return worker_sample(x, V, p, NULL, pos, NULL, 0, NULL, NULL, NULL, 0);
}

static double raw_logprob(const float *x, int id) {
    double mx = -INFINITY, z = 0;
    for (int i = 0; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    for (int i = 0; i < V; i++) z += exp(x[i] - mx);
    return x[id] - mx - log(z);
}

/* The sampler sorts only the prefix it needs (quickselect + growing sorted prefix): it must
 * draw what the full sort draws, over many parameter sets, with ties, on a vocabulary large
 * enough for several selection rounds. (The sums over all candidates when nothing truncates
 * may differ in the last bits from the sorted-order sums; no draw here lands on such a bit.) */
START_TEST(partial_sort_matches_full_sort) {
    enum { NV = 20000 };
    float *x = malloc(NV * sizeof *x);
    uint64_t g = 12345;
    for (int i = 0; i < NV; i++) x[i] = (float)(rmix(&g) % 4000) * 0.005f - 10.0f; /* many ties */
    const float temps[] = {0.3f, 1.0f, 1.7f}, tps[] = {0, 0.3f, 0.9f, 0.999f}, mps[] = {0, 0.05f};
    const int tks[] = {0, 1, 7, 50, 3000};
    int n = 0;
    for (size_t a = 0; a < 3; a++)
        for (size_t b = 0; b < 5; b++)
            for (size_t d = 0; d < 4; d++)
                for (size_t e = 0; e < 2; e++)
                    for (uint64_t pos = 0; pos < 4; pos++) {
                        worker_sample_params p = {0};
                        p.temperature = temps[a], p.top_k = tks[b], p.top_p = tps[d];
                        p.min_p = mps[e], p.seed = 99 + pos, p.stream = (uint32_t)pos;
                        int32_t got = worker_sample(x, NV, &p, NULL, pos * 7, NULL, 0, NULL, NULL,
                                                    NULL, 0);
                        int32_t want = ref_sample(x, NV, &p, pos * 7);
                        ck_assert_msg(got == want, "T %g top_k %d top_p %g min_p %g pos %llu: "
                                      "%d, full sort %d", p.temperature, p.top_k, p.top_p,
                                      p.min_p, (unsigned long long)pos, got, want);
                        n++;
                    }
    ck_assert_int_eq(n, 480);
    free(x);
}
END_TEST

START_TEST(greedy_is_argmax) {
    float x[V];
    ramp(x);
    worker_sample_params p = {0};
    float lp;
    int32_t ids[3];
    float lps[3];
    int32_t t = worker_sample(x, V, &p, NULL, 5, &lp, 3, ids, lps, NULL, 0);
    ck_assert_int_eq(t, argmax(x));
    ck_assert_int_eq(ids[0], t);
    ck_assert(lps[0] >= lps[1] && lps[1] >= lps[2]);
    ck_assert_double_eq_tol(lp, raw_logprob(x, t), 1e-5);
    /* ties → lowest id, for greedy and for the top alternatives */
    for (int i = 0; i < V; i++) x[i] = i % 3 == 1 ? 2.0f : 0.0f;
    ck_assert_int_eq(draw(x, &p, 0), 1);
    int32_t t5[5];
    float l5[5];
    worker_sample(x, V, &p, NULL, 0, &lp, 5, t5, l5, NULL, 0);
    for (int i = 0; i < 5; i++) {
        ck_assert_int_eq(t5[i], 1 + 3 * i);
        ck_assert(l5[i] <= 0);
    }
}
END_TEST

START_TEST(top_k_1_and_tiny_top_p_are_greedy) {
    float x[V];
    ramp(x);
    for (uint64_t seed = 0; seed < 50; seed++) {
        worker_sample_params p = {.temperature = 5.0f, .top_k = 1, .seed = seed};
        ck_assert_int_eq(draw(x, &p, seed), argmax(x));
        worker_sample_params q = {.temperature = 5.0f, .top_p = 1e-6f, .seed = seed};
        ck_assert_int_eq(draw(x, &q, seed), argmax(x));
        worker_sample_params r = {.temperature = 5.0f, .min_p = 1.0f, .seed = seed};
        ck_assert_int_eq(draw(x, &r, seed), argmax(x));
    }
}
END_TEST

START_TEST(seeded_and_position_dependent) {
    float x[V];
    for (int i = 0; i < V; i++) x[i] = 0; /* uniform: every draw is possible */
    worker_sample_params p = {.temperature = 1.0f, .seed = 1234};
    int same = 1, hist[V] = {0};
    for (uint64_t pos = 0; pos < 4000; pos++) {
        int32_t a = draw(x, &p, pos);
        int32_t b = draw(x, &p, pos);
        ck_assert_int_eq(a, b); /* deterministic */
        ck_assert(a >= 0 && a < V);
        hist[a]++;
        if (pos && a != draw(x, &p, pos - 1)) same = 0;
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
        int32_t t = draw(x, &k, pos);
        ck_assert(t == top[0] || t == top[1] || t == top[2] || t == top[3]);
    }
}
END_TEST

START_TEST(nan_and_inf_logits) {
    float x[V];
    for (int i = 0; i < V; i++) x[i] = NAN;
    worker_sample_params p = {.temperature = 1.0f, .seed = 3};
    int32_t t = draw(x, &p, 0);
    ck_assert(t >= 0 && t < V);
    for (int i = 0; i < V; i++) x[i] = -INFINITY;
    x[17] = 2.0f;
    x[3] = NAN;
    float lp;
    ck_assert_int_eq(worker_sample(x, V, &p, NULL, 1, &lp, 0, NULL, NULL, NULL, 0), 17);
    ck_assert_float_eq_tol(lp, 0.0f, 1e-6f);
}
END_TEST

/* Counts of ids[0..n) with the given prompt length. */
static void counts_of(worker_counts *c, const int32_t *ids, size_t n, uint32_t prompt_len) {
    *c = (worker_counts){0};
    worker_counts_update(c, ids, n, prompt_len);
}

START_TEST(repetition_penalty_prompt_and_generated) {
    float x[V];
    for (int i = 0; i < V; i++) x[i] = -5.0f;
    x[10] = 2.0f, x[11] = 1.9f;   /* positive: 2.0 / 1.2 = 1.67 < 1.9 */
    const int32_t hist[3] = {10, 5, 6};
    worker_counts c;
    counts_of(&c, hist, 3, 3);    /* id 10 only in the prompt: repetition still counts it */
    worker_sample_params p = {.repetition_penalty = 1.2f};
    ck_assert_int_eq(worker_sample(x, V, &p, &c, 3, NULL, 0, NULL, NULL, NULL, 0), 11);
    ck_assert_int_eq(draw(x, &p, 3), 10); /* no counts: no penalty */
    p.repetition_penalty = 1.0f;          /* 1 = off */
    ck_assert_int_eq(worker_sample(x, V, &p, &c, 3, NULL, 0, NULL, NULL, NULL, 0), 10);
    /* negative logits are multiplied: -1.0 * 1.2 = -1.2 < -1.1 */
    for (int i = 0; i < V; i++) x[i] = -9.0f;
    x[10] = -1.0f, x[11] = -1.1f;
    p.repetition_penalty = 1.2f;
    ck_assert_int_eq(worker_sample(x, V, &p, &c, 3, NULL, 0, NULL, NULL, NULL, 0), 11);
    /* the logprob is of the raw logits, not the penalised ones */
    float lp;
    worker_sample(x, V, &p, &c, 3, &lp, 0, NULL, NULL, NULL, 0);
    ck_assert_double_eq_tol(lp, raw_logprob(x, 11), 1e-5);
    worker_counts_free(&c);
}
END_TEST

START_TEST(presence_and_frequency_over_generated_only) {
    float x[V];
    for (int i = 0; i < V; i++) x[i] = 0.0f;
    x[20] = 2.0f, x[21] = 1.5f;
    const int32_t in_prompt[2] = {20, 20}, generated[4] = {1, 20, 20, 20};
    worker_counts c;
    worker_sample_params pres = {.presence_penalty = 1.0f};
    counts_of(&c, in_prompt, 2, 2); /* only prompt occurrences: presence does nothing */
    ck_assert_int_eq(worker_sample(x, V, &pres, &c, 2, NULL, 0, NULL, NULL, NULL, 0), 20);
    worker_counts_free(&c);
    counts_of(&c, generated, 4, 1); /* 3 generated occurrences of 20 */
    ck_assert_int_eq(worker_sample(x, V, &pres, &c, 4, NULL, 0, NULL, NULL, NULL, 0), 21);
    /* frequency: 2.0 - 0.2 × 3 = 1.4 < 1.5 → 21; with 2 occurrences 1.6 > 1.5 → 20 */
    worker_sample_params freq = {.frequency_penalty = 0.2f};
    ck_assert_int_eq(worker_sample(x, V, &freq, &c, 4, NULL, 0, NULL, NULL, NULL, 0), 21);
    worker_counts_free(&c);
    counts_of(&c, generated, 3, 1);
    ck_assert_int_eq(worker_sample(x, V, &freq, &c, 3, NULL, 0, NULL, NULL, NULL, 0), 20);
    /* a negative penalty encourages repetition */
    worker_sample_params enc = {.presence_penalty = -2.0f};
    x[5] = 3.0f;
    ck_assert_int_eq(worker_sample(x, V, &enc, &c, 3, NULL, 0, NULL, NULL, NULL, 0), 20);
    worker_counts_free(&c);
}
END_TEST

START_TEST(counts_incremental_equal_recount) {
    int32_t ids[500];
    for (int i = 0; i < 500; i++) ids[i] = (i * 7919) % 97;
    worker_counts inc = {0}, all;
    for (size_t n = 0; n <= 500; n += 37) worker_counts_update(&inc, ids, n, 100);
    worker_counts_update(&inc, ids, 500, 100);
    counts_of(&all, ids, 500, 100);
    ck_assert_uint_eq(inc.n, all.n);
    ck_assert_uint_eq(inc.n, 97);
    uint32_t sum_all = 0, sum_gen = 0;
    for (uint32_t s = 0; s < all.cap; s++) {
        if (all.id[s] < 0) continue;
        sum_all += all.all[s], sum_gen += all.gen[s];
        int found = 0;
        for (uint32_t t = 0; t < inc.cap; t++)
            if (inc.id[t] == all.id[s]) {
                ck_assert_uint_eq(inc.all[t], all.all[s]);
                ck_assert_uint_eq(inc.gen[t], all.gen[s]);
                found = 1;
            }
        ck_assert(found);
    }
    ck_assert_uint_eq(sum_all, 500);
    ck_assert_uint_eq(sum_gen, 400);
    /* a different prompt length recounts */
    worker_counts_update(&inc, ids, 500, 0);
    sum_gen = 0;
    for (uint32_t s = 0; s < inc.cap; s++)
        if (inc.id[s] >= 0) sum_gen += inc.gen[s];
    ck_assert_uint_eq(sum_gen, 500);
    worker_counts_free(&inc);
    worker_counts_free(&all);
}
END_TEST

START_TEST(logit_bias_moves_the_choice_not_the_logprob) {
    float x[V];
    ramp(x);
    int low = 0; /* x[0] = 0: the smallest */
    int32_t bid[1] = {low};
    float bval[1] = {100.0f};
    worker_sample_params p = {.bias_ids = bid, .bias_values = bval, .n_bias = 1};
    float lp;
    int32_t top[2];
    float tl[2];
    ck_assert_int_eq(worker_sample(x, V, &p, NULL, 0, &lp, 2, top, tl, NULL, 0), low);
    ck_assert_double_eq_tol(lp, raw_logprob(x, low), 1e-5);
    ck_assert_int_eq(top[0], argmax(x)); /* alternatives of the raw distribution */
    bval[0] = -100.0f;                    /* a negative bias removes the argmax */
    bid[0] = argmax(x);
    ck_assert_int_ne(draw(x, &p, 0), argmax(x));
    bval[0] = NAN;
    char err[200] = "";
    ck_assert_int_ne(worker_sample_check(&p, V, err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "finite"));
}
END_TEST

START_TEST(banned_and_allowed_masks) {
    float x[V];
    ramp(x);
    int best = argmax(x);
    int32_t ban[1] = {best};
    worker_sample_params p = {.banned_ids = ban, .n_banned = 1};
    int32_t t = draw(x, &p, 0);
    ck_assert_int_ne(t, best);
    float y[V];
    memcpy(y, x, sizeof y);
    y[best] = -INFINITY;
    ck_assert_int_eq(t, argmax(y)); /* the next best */
    p.temperature = 50.0f;
    for (uint64_t pos = 0; pos < 500; pos++) ck_assert_int_ne(draw(x, &p, pos), best);
    /* allowed: only 3 and 7 are ever drawn, both are */
    for (int i = 0; i < V; i++) x[i] = 0;
    int32_t allow[2] = {3, 7};
    worker_sample_params a = {.temperature = 1.0f, .seed = 5, .allowed_ids = allow, .n_allowed = 2};
    int seen3 = 0, seen7 = 0;
    for (uint64_t pos = 0; pos < 200; pos++) {
        int32_t d = draw(x, &a, pos);
        ck_assert(d == 3 || d == 7);
        seen3 |= d == 3, seen7 |= d == 7;
    }
    ck_assert(seen3 && seen7);
    a.temperature = 0; /* greedy among the allowed even when a masked id is larger */
    x[50] = 9.0f, x[7] = 1.0f;
    ck_assert_int_eq(draw(x, &a, 0), 7);
    /* allowed ⊆ banned: nothing left — refused by the check and by the sampler */
    int32_t ban2[2] = {7, 3};
    a.banned_ids = ban2;
    a.n_banned = 2;
    char err[200] = "";
    ck_assert_int_ne(worker_sample_check(&a, V, err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "no token"));
    err[0] = 0;
    ck_assert_int_eq(worker_sample(x, V, &a, NULL, 0, NULL, 0, NULL, NULL, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "nothing"));
    /* ids outside the vocabulary are refused by the check */
    int32_t bad[1] = {V};
    worker_sample_params b = {.allowed_ids = bad, .n_allowed = 1};
    ck_assert_int_ne(worker_sample_check(&b, V, err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "outside the vocabulary"));
    b = (worker_sample_params){.banned_ids = allow, .n_banned = 2};
    ck_assert_int_eq(worker_sample_check(&b, V, err, sizeof err), 0);
}
END_TEST

START_TEST(min_p_keeps_only_likely_tokens) {
    float x[V];
    for (int i = 0; i < V; i++) x[i] = -3.0f;
    x[8] = 1.0f, x[9] = 1.0f - 0.5f; /* p9/p8 = e^-0.5 = 0.61; the rest e^-4 = 0.018 */
    worker_sample_params p = {.temperature = 1.0f, .min_p = 0.5f, .seed = 77};
    int seen8 = 0, seen9 = 0;
    for (uint64_t pos = 0; pos < 400; pos++) {
        int32_t d = draw(x, &p, pos);
        ck_assert_msg(d == 8 || d == 9, "min_p let id %d through", d);
        seen8 |= d == 8, seen9 |= d == 9;
    }
    ck_assert(seen8 && seen9);
    p.min_p = 0.7f; /* now 9 is below 0.7 × p8 */
    for (uint64_t pos = 0; pos < 100; pos++) ck_assert_int_eq(draw(x, &p, pos), 8);
    /* without min_p the tail is drawn sometimes */
    p.min_p = 0;
    int tail = 0;
    for (uint64_t pos = 0; pos < 2000; pos++) tail += draw(x, &p, pos) < 8;
    ck_assert_int_gt(tail, 0);
}
END_TEST

START_TEST(streams_are_independent_and_keyed) {
    float x[V];
    for (int i = 0; i < V; i++) x[i] = 0;
    enum { N = 300 };
    int32_t d[3][N];
    for (uint32_t s = 0; s < 3; s++)
        for (int pos = 0; pos < N; pos++) {
            worker_sample_params p = {.temperature = 1.0f, .seed = 42, .stream = s};
            d[s][pos] = draw(x, &p, (uint64_t)pos);
        }
    for (int a = 0; a < 3; a++)
        for (int b = a + 1; b < 3; b++) {
            int eq = 0;
            for (int pos = 0; pos < N; pos++) eq += d[a][pos] == d[b][pos];
            ck_assert_msg(eq < 25, "streams %d and %d agree at %d of %d positions", a, b, eq, N);
        }
    /* (seed, stream, position) alone decides: other draws in between, other order, same token */
    for (int pos = N - 1; pos >= 0; pos -= 7) {
        worker_sample_params p = {.temperature = 1.0f, .seed = 42, .stream = 2};
        worker_sample_params q = {.temperature = 1.0f, .seed = 43, .stream = 2};
        draw(x, &q, (uint64_t)pos + 1);
        ck_assert_int_eq(draw(x, &p, (uint64_t)pos), d[2][pos]);
    }
    /* another seed gives another sequence */
    int eq = 0;
    for (int pos = 0; pos < N; pos++) {
        worker_sample_params q = {.temperature = 1.0f, .seed = 43, .stream = 0};
        eq += draw(x, &q, (uint64_t)pos) == d[0][pos];
    }
    ck_assert_int_lt(eq, 25);
}
END_TEST

START_TEST(logprobs_are_raw_and_sorted) {
    float x[V];
    for (int i = 0; i < V; i++) x[i] = sinf((float)i * 1.7f) * 3.0f;
    worker_sample_params p = {.temperature = 0.7f, .top_k = 5, .seed = 1, .presence_penalty = 1,
                              .repetition_penalty = 1.3f};
    const int32_t hist[4] = {argmax(x), 2, 3, 4};
    worker_counts c;
    counts_of(&c, hist, 4, 0);
    int32_t top[20];
    float tl[20], lp;
    for (uint64_t pos = 0; pos < 50; pos++) {
        int32_t t = worker_sample(x, V, &p, &c, pos, &lp, 20, top, tl, NULL, 0);
        ck_assert(t >= 0 && t < V);
        ck_assert(lp <= 0);
        ck_assert_double_eq_tol(lp, raw_logprob(x, t), 1e-5);
        for (int i = 0; i < 20; i++) {
            ck_assert(tl[i] <= 0);
            ck_assert_double_eq_tol(tl[i], raw_logprob(x, top[i]), 1e-5);
            if (i) ck_assert(tl[i - 1] >= tl[i]);
        }
        ck_assert_int_eq(top[0], argmax(x)); /* raw top, though penalised for the draw */
    }
    double z = 0;
    for (int i = 0; i < V; i++) z += exp(raw_logprob(x, i));
    ck_assert_double_eq_tol(z, 1.0, 1e-5);
    worker_counts_free(&c);
}
END_TEST

int main(void) {
    Suite *s = suite_create("sample");
    TCase *t = tcase_create("sample");
    tcase_add_test(t, greedy_is_argmax);
    tcase_add_test(t, top_k_1_and_tiny_top_p_are_greedy);
    tcase_add_test(t, seeded_and_position_dependent);
    tcase_add_test(t, nan_and_inf_logits);
    tcase_add_test(t, repetition_penalty_prompt_and_generated);
    tcase_add_test(t, presence_and_frequency_over_generated_only);
    tcase_add_test(t, counts_incremental_equal_recount);
    tcase_add_test(t, logit_bias_moves_the_choice_not_the_logprob);
    tcase_add_test(t, banned_and_allowed_masks);
    tcase_add_test(t, min_p_keeps_only_likely_tokens);
    tcase_add_test(t, streams_are_independent_and_keyed);
    tcase_add_test(t, logprobs_are_raw_and_sorted);
    tcase_add_test(t, partial_sort_matches_full_sort);
    suite_add_tcase(s, t);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}
