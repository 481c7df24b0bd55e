/* worker_sample.c — masks, logit bias, penalties, greedy, temperature, top-k, top-p and min-p
 * sampling (worker_sample.h).
 *
 * Why: rank 0 turns logits into tokens; the draw is a pure function of (logits, params, token
 * counts, seed, stream, position) so that steps are reproducible and batch-independent. Must
 * never read outside logits[vocab], never return an id outside [0, vocab), never depend on
 * global random state, and never spend O(vocab × history) on penalties (the counts are kept
 * per distinct id). With default parameters (stream 0, no penalties or masks) it draws exactly
 * what the sampler before penalties drew.
 */
#include "worker/worker_sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* ---- counts ------------------------------------------------------------------------------ */

static uint32_t slot_of(const worker_counts *c, int32_t id) {
    uint32_t h = (uint32_t)id * 0x9E3779B1u, mask = c->cap - 1;
    for (uint32_t i = h & mask;; i = (i + 1) & mask)
        if (c->id[i] == id || c->id[i] < 0) return i;
}

static void counts_grow(worker_counts *c) {
    worker_counts o = *c;
    c->cap = o.cap ? 2 * o.cap : 64;
    c->id = xmalloc((size_t)c->cap * sizeof *c->id);
    c->all = xcalloc((size_t)c->cap, sizeof *c->all);
    c->gen = xcalloc((size_t)c->cap, sizeof *c->gen);
    memset(c->id, 0xff, (size_t)c->cap * sizeof *c->id);
    for (uint32_t i = 0; i < o.cap; i++)
        if (o.id[i] >= 0) {
            uint32_t s = slot_of(c, o.id[i]);
            c->id[s] = o.id[i], c->all[s] = o.all[i], c->gen[s] = o.gen[i];
        }
    free(o.id);
    free(o.all);
    free(o.gen);
}

void worker_counts_update(worker_counts *c, const int32_t *ids, size_t n_ids,
                          uint32_t prompt_len) {
    if (prompt_len != c->prompt_len || n_ids < c->folded) { /* recount from scratch */
        if (c->cap) memset(c->id, 0xff, (size_t)c->cap * sizeof *c->id);
        c->n = 0;
        c->folded = 0;
        c->prompt_len = prompt_len;
    }
    for (size_t i = c->folded; i < n_ids; i++) {
        if (2 * (c->n + 1) > c->cap) counts_grow(c);
        uint32_t s = slot_of(c, ids[i]);
        if (c->id[s] < 0) {
            c->id[s] = ids[i], c->all[s] = c->gen[s] = 0;
            c->n++;
        }
        c->all[s]++;
        if (i >= prompt_len) c->gen[s]++;
    }
    c->folded = n_ids;
}

void worker_counts_free(worker_counts *c) {
    free(c->id);
    free(c->all);
    free(c->gen);
    *c = (worker_counts){0};
}

/* ---- checks ------------------------------------------------------------------------------ */

static int ids_in_vocab(const char *what, const int32_t *ids, int n, int vocab, char *err,
                        size_t errlen) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab)
            return duet_err(err, errlen, DUET_EINVAL, "%s id %d (index %d) is outside the "
                            "vocabulary [0, %d)", what, ids[i], i, vocab);
    return 0;
}

int worker_sample_check(const worker_sample_params *p, int vocab, char *err, size_t errlen) {
    int rc = ids_in_vocab("logit_bias", p->bias_ids, p->n_bias, vocab, err, errlen);
    if (!rc) rc = ids_in_vocab("banned", p->banned_ids, p->n_banned, vocab, err, errlen);
    if (!rc) rc = ids_in_vocab("allowed", p->allowed_ids, p->n_allowed, vocab, err, errlen);
    if (rc) return rc;
    for (int i = 0; i < p->n_bias; i++)
        if (!isfinite(p->bias_values[i]))
            return duet_err(err, errlen, DUET_EINVAL, "logit_bias value for id %d is not a "
                            "finite number", p->bias_ids[i]);
    /* something must survive the masks: an allowed id that is not banned, or (no allowed
     * list) fewer distinct banned ids than the vocabulary */
    int left = 0;
    if (p->n_allowed > 0) {
        for (int i = 0; i < p->n_allowed && !left; i++) {
            int banned = 0;
            for (int j = 0; j < p->n_banned && !banned; j++)
                banned = p->banned_ids[j] == p->allowed_ids[i];
            left = !banned;
        }
    } else if (p->n_banned < vocab) {
        left = 1;
    } else {
        unsigned char *seen = xcalloc((size_t)vocab, 1);
        int distinct = 0;
        for (int j = 0; j < p->n_banned; j++)
            if (!seen[p->banned_ids[j]]) seen[p->banned_ids[j]] = 1, distinct++;
        free(seen);
        left = distinct < vocab;
    }
    if (!left)
        return duet_err(err, errlen, DUET_EINVAL, "the allowed and banned token masks leave no "
                        "token that may be drawn (%d allowed, %d banned)", p->n_allowed,
                        p->n_banned);
    return 0;
}

/* ---- sampling ---------------------------------------------------------------------------- */

/* counter-based: (seed, stream, position) → one uniform draw; stream 0 adds nothing */
double worker_sample_u01(uint64_t seed, uint32_t stream, uint64_t pos) {
    uint64_t sx = stream;
    uint64_t st = seed ^ (pos * 0xD1B54A32D192ED03ull) ^ (sx ? splitmix64(&sx) : 0);
    return (double)(splitmix64(&st) >> 11) * 0x1.0p-53;
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

static void cswap(cand *a, cand *b) {
    cand t = *a;
    *a = *b;
    *b = t;
}

/* c[0..k) = the k first of c[0..n) in cand_cmp order, sorted; the rest after them in some
 * order that depends only on the input. Quickselect (median of three, Lomuto on a strict total
 * order), then a sort of the prefix: O(n + k log k) where a full sort of the vocabulary (129280
 * candidates, ~10 ms) per sampled token stalled big batches. */
static void sorted_prefix(cand *c, int n, int k) {
    if (k <= 0) return;
    if (k > n) k = n;
    int lo = 0, hi = n - 1;
    while (k < n && lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (cand_cmp(&c[mid], &c[lo]) < 0) cswap(&c[mid], &c[lo]);
        if (cand_cmp(&c[hi], &c[lo]) < 0) cswap(&c[hi], &c[lo]);
        if (cand_cmp(&c[hi], &c[mid]) < 0) cswap(&c[hi], &c[mid]);
        cswap(&c[mid], &c[hi]); /* pivot (the median) at hi */
        int st = lo;
        for (int i = lo; i < hi; i++)
            if (cand_cmp(&c[i], &c[hi]) < 0) cswap(&c[i], &c[st++]);
        cswap(&c[st], &c[hi]); /* c[lo..st) before the pivot, c[st] = pivot */
        if (st == k - 1 || st == k) break;
        if (st < k) lo = st + 1;
        else hi = st - 1;
    }
    qsort(c, (size_t)k, sizeof *c, cand_cmp);
}

/* The candidates in cand_cmp order, sorted on demand: at(i) extends the sorted prefix (x4) when
 * i is past it, so truncation and the draw usually sort a few hundred of them. */
typedef struct {
    cand *c;
    int n, m; /* candidates; sorted prefix */
} ranked;

static const cand *rank_at(ranked *r, int i) {
    if (i >= r->m) {
        int m = r->m * 4 > i + 1 ? r->m * 4 : i + 1;
        r->m = m < r->n ? m : r->n;
        sorted_prefix(r->c, r->n, r->m);
    }
    return &r->c[i];
}

/* probability weight of candidate value v at temperature T, relative to the max c0 */
static double weight(float v, double c0, double T) { return exp(((double)v - c0) / T); }

/* The n_top largest raw logits, descending, ties → lower id (one pass, n_top <= 20). */
static void raw_top(const float *logits, int vocab, int n_top, cand *top) {
    int n = 0;
    for (int i = 0; i < vocab; i++) {
        float v = clean(logits[i]);
        if (n == n_top && !(v > top[n - 1].v)) continue;
        int k = n < n_top ? n++ : n - 1;
        while (k > 0 && top[k - 1].v < v) top[k] = top[k - 1], k--;
        top[k] = (cand){v, i};
    }
}

/* Masks, bias and penalties applied to a copy of the logits (x[vocab]); masked[i] = 1 for ids
 * that may not be drawn (NULL when there are no masks). */
static void shape(float *x, unsigned char **masked, int vocab, const worker_sample_params *p,
                  const worker_counts *cnt) {
    *masked = NULL;
    if (p->n_allowed > 0 || p->n_banned > 0) {
        unsigned char *m = xmalloc((size_t)vocab);
        memset(m, p->n_allowed > 0, (size_t)vocab);
        for (int i = 0; i < p->n_allowed; i++) m[p->allowed_ids[i]] = 0;
        for (int i = 0; i < p->n_banned; i++) m[p->banned_ids[i]] = 1;
        for (int i = 0; i < vocab; i++)
            if (m[i]) x[i] = -INFINITY;
        *masked = m;
    }
    for (int i = 0; i < p->n_bias; i++) x[p->bias_ids[i]] += p->bias_values[i];
    if (!cnt) return;
    float r = p->repetition_penalty;
    int rep = r > 0 && r != 1.0f, pres = p->presence_penalty != 0 || p->frequency_penalty != 0;
    if (!rep && !pres) return;
    for (uint32_t s = 0; s < cnt->cap; s++) {
        int32_t id = cnt->id[s];
        if (id < 0 || id >= vocab) continue;
        if (rep && cnt->all[s]) x[id] = x[id] > 0 ? x[id] / r : x[id] * r;
        if (pres && cnt->gen[s])
            x[id] -= p->presence_penalty + p->frequency_penalty * (float)cnt->gen[s];
    }
}

int32_t worker_sample(const float *logits, int vocab, const worker_sample_params *p,
                      const worker_counts *counts, uint64_t pos, float *logprob, int n_top,
                      int32_t *top_ids, float *top_logprobs, char *err, size_t errlen) {
    /* raw log-softmax normaliser (a pass of exp over the vocabulary: only for logprobs) */
    double lse = 0;
    if (logprob || n_top > 0) {
        float rmx = -INFINITY;
        for (int i = 0; i < vocab; i++)
            if (clean(logits[i]) > rmx) rmx = clean(logits[i]);
        double z = 0;
        if (isfinite(rmx))
            for (int i = 0; i < vocab; i++) z += exp((double)clean(logits[i]) - rmx);
        lse = isfinite(rmx) ? rmx + log(z) : 0;
    }

    float *x = xmalloc((size_t)vocab * sizeof *x);
    for (int i = 0; i < vocab; i++) x[i] = clean(logits[i]);
    unsigned char *masked;
    shape(x, &masked, vocab, p, counts);

    /* greedy: argmax over the ids that may be drawn, ties → lowest id */
    int32_t chosen = -1;
    float mx = -INFINITY;
    for (int i = 0; i < vocab; i++)
        if (!(masked && masked[i]) && (chosen < 0 || x[i] > mx)) chosen = i, mx = x[i];
    if (chosen < 0) {
        free(x);
        free(masked);
        duet_err(err, errlen, DUET_EINVAL, "the token masks leave nothing that may be drawn");
        return -1;
    }
    if (p->temperature >= 1e-5f && isfinite(mx)) {
        cand *c = xmalloc((size_t)vocab * sizeof *c);
        int n = 0;
        for (int i = 0; i < vocab; i++)
            if (!(masked && masked[i])) c[n++] = (cand){x[i], i};
        ranked r = {c, n, 0};
        if (p->top_k > 0 && p->top_k < n) n = p->top_k;
        rank_at(&r, n < 64 ? n - 1 : 63);
        /* probabilities at this temperature over the kept candidates (rank 0 is the max);
         * sums over all of them when nothing cuts them (tot, sum) run in the candidates'
         * order, a fixed function of the logits */
        double c0 = c[0].v, T = p->temperature, sum = 0;
        if (p->top_p > 0 && p->top_p < 1) {
            double s = 0, tot = 0;
            if (n < r.n)
                for (int i = 0; i < n; i++) tot += weight(rank_at(&r, i)->v, c0, T);
            else
                for (int i = 0; i < n; i++) tot += weight(c[i].v, c0, T);
            int k = 0;
            while (k < n) {
                s += weight(rank_at(&r, k)->v, c0, T);
                k++;
                if (s >= p->top_p * tot) break;
            }
            n = k;
        }
        if (p->min_p > 0 && p->min_p <= 1) {
            int k = 1; /* the weight of rank 0 is 1 */
            while (k < n && weight(rank_at(&r, k)->v, c0, T) >= p->min_p) k++;
            n = k;
        }
        if (n < r.n)
            for (int i = 0; i < n; i++) sum += weight(rank_at(&r, i)->v, c0, T);
        else
            for (int i = 0; i < n; i++) sum += weight(c[i].v, c0, T);
        double u = worker_sample_u01(p->seed, p->stream, pos) * sum;
        chosen = -1;
        double acc = 0;
        for (int i = 0; i < n; i++) {
            acc += weight(rank_at(&r, i)->v, c0, T);
            if (u < acc) {
                chosen = rank_at(&r, i)->id;
                break;
            }
        }
        if (chosen < 0) chosen = rank_at(&r, n - 1)->id;
        free(c);
    }
    free(x);
    free(masked);
    if (logprob) *logprob = (float)((double)clean(logits[chosen]) - lse);
    if (n_top > 0) {
        if (n_top > vocab) n_top = vocab;
        cand *top = xmalloc((size_t)n_top * sizeof *top);
        raw_top(logits, vocab, n_top, top);
        for (int i = 0; i < n_top; i++) {
            top_ids[i] = top[i].id;
            top_logprobs[i] = (float)((double)top[i].v - lse);
        }
        free(top);
    }
    return chosen;
}

void worker_sample_rank(const float *logits, int vocab, int k, int32_t *ids, float *vals) {
    if (k > vocab) k = vocab;
    if (k <= 0) return;
    cand *c = xmalloc((size_t)vocab * sizeof *c);
    for (int i = 0; i < vocab; i++) c[i] = (cand){clean(logits[i]), i};
    sorted_prefix(c, vocab, k);
    for (int i = 0; i < k; i++) ids[i] = c[i].id, vals[i] = c[i].v;
    free(c);
}
