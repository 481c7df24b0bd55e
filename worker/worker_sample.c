/* worker_sample.c — greedy, temperature, top-k, top-p and min-p sampling (worker_sample.h).
 *
 * Why: rank 0 turns logits into tokens; the draw is a pure function of (logits, params, seed,
 * position) so that steps are reproducible. Must never read outside logits[vocab], never
 * return an id outside [0, vocab), and never depend on global random state.
 */
#include "worker/worker_sample.h"

#include <math.h>
#include <stdlib.h>

#include "common/err.h"

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

typedef struct {
    float v;
    int32_t id;
} cand;

/* descending by value, ties by ascending id (a total order: deterministic under qsort) */
static int cand_cmp(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->v > y->v) return -1;
    if (x->v < y->v) return 1;
    return (x->id > y->id) - (x->id < y->id);
}

static float clean(float v) { return isnan(v) ? -INFINITY : v; }

int32_t worker_sample(const float *logits, int vocab, const worker_sample_params *p, uint64_t pos,
                      float *logprob, int n_top, int32_t *top_ids, float *top_logprobs) {
    /* raw log-softmax normaliser */
    int32_t best = 0;
    float mx = -INFINITY;
    for (int i = 0; i < vocab; i++)
        if (clean(logits[i]) > mx) mx = clean(logits[i]), best = i;
    double z = 0;
    if (isfinite(mx))
        for (int i = 0; i < vocab; i++) z += exp((double)clean(logits[i]) - mx);
    double lse = isfinite(mx) ? mx + log(z) : 0;

    int32_t chosen = best;
    cand *c = NULL;
    int need_sort = n_top > 0 || (p->temperature >= 1e-5f && isfinite(mx));
    if (need_sort) {
        c = xmalloc((size_t)vocab * sizeof *c);
        for (int i = 0; i < vocab; i++) c[i] = (cand){clean(logits[i]), i};
        qsort(c, (size_t)vocab, sizeof *c, cand_cmp);
    }
    if (p->temperature >= 1e-5f && isfinite(mx)) {
        int n = vocab;
        if (p->top_k > 0 && p->top_k < n) n = p->top_k;
        /* probabilities at this temperature over the kept candidates (c[0] is the max) */
        double *pr = xmalloc((size_t)n * sizeof *pr), sum = 0;
        for (int i = 0; i < n; i++) {
            pr[i] = exp(((double)c[i].v - c[0].v) / p->temperature);
            sum += pr[i];
        }
        if (p->min_p > 0 && p->min_p <= 1) {
            int k = 1;
            while (k < n && pr[k] / pr[0] >= p->min_p) k++;
            n = k;
        }
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
        sum = 0;
        for (int i = 0; i < n; i++) sum += pr[i];
        uint64_t st = p->seed ^ (pos * 0xD1B54A32D192ED03ull);
        double u = (double)(splitmix64(&st) >> 11) * 0x1.0p-53 * sum;
        chosen = c[n - 1].id;
        double acc = 0;
        for (int i = 0; i < n; i++) {
            acc += pr[i];
            if (u < acc) {
                chosen = c[i].id;
                break;
            }
        }
        free(pr);
    }
    if (logprob) *logprob = (float)((double)clean(logits[chosen]) - lse);
    for (int i = 0; i < n_top && i < vocab; i++) {
        top_ids[i] = c[i].id;
        top_logprobs[i] = (float)((double)c[i].v - lse);
    }
    free(c);
    return chosen;
}
