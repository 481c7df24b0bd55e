/* stepexec.c — one StepPlan over the worker's sequences and cached prefix blocks (stepexec.h).
 *
 * Why it is shaped this way: every check runs before anything changes (drop_blocks aside), so
 * a refused step leaves the state as it was and every rank refuses the same steps (the checks
 * depend only on the plan and on state that all ranks share). A chunk with block saves inside
 * it is cut at those boundaries; pass k runs every sequence's k-th piece through dv4_forward
 * and the blocks ending there are snapshotted after it. Only a sequence's last piece yields
 * its sampling row; with return_logits every piece yields its rows. The CPU forward pass is
 * row-independent, so how a chunk is cut never changes a logit.
 */
#include "worker/stepexec.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/err.h"
#include "common/rpc.h"
#include "worker/pool.h"
#include "worker/worker_sample.h"

#define MAX_TOP_LOGPROBS 20

struct sx_seq {
    int used;
    uint64_t id;
    dv4_seq *s;
    int32_t *ids;          /* [n_ids] token ids of positions [0, pos) (history + chunks) */
    size_t n_ids, cap_ids;
    worker_counts counts;  /* penalties' occurrence counts over ids */
};

/* ---- block_id → snapshot: open addressing, linear probing, backward-shift deletion -------- */

struct sx_snapmap {
    uint64_t *key;
    dv4_snap **val;        /* NULL = empty */
    uint32_t cap, n;       /* cap: a power of two */
};

static uint32_t hash64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (uint32_t)k;
}

static uint32_t map_find(const sx_snapmap *mp, uint64_t key) {
    uint32_t mask = mp->cap - 1, i = hash64(key) & mask;
    while (mp->val[i] && mp->key[i] != key) i = (i + 1) & mask;
    return i;
}

static dv4_snap *map_get(const sx_snapmap *mp, uint64_t key) {
    return mp->cap ? mp->val[map_find(mp, key)] : NULL;
}

static void map_put(sx_snapmap *mp, uint64_t key, dv4_snap *v) {
    if (2 * (mp->n + 1) > mp->cap) {
        sx_snapmap o = *mp;
        mp->cap = o.cap ? 2 * o.cap : 64;
        mp->key = xcalloc(mp->cap, sizeof *mp->key);
        mp->val = xcalloc(mp->cap, sizeof *mp->val);
        mp->n = 0;
        for (uint32_t i = 0; i < o.cap; i++)
            if (o.val[i]) map_put(mp, o.key[i], o.val[i]);
        free(o.key);
        free(o.val);
    }
    uint32_t i = map_find(mp, key);
    mp->key[i] = key;
    mp->val[i] = v;
    mp->n++;
}

/* Removes key; returns its snapshot or NULL. */
static dv4_snap *map_del(sx_snapmap *mp, uint64_t key) {
    if (!mp->cap) return NULL;
    uint32_t mask = mp->cap - 1, i = map_find(mp, key);
    dv4_snap *v = mp->val[i];
    if (!v) return NULL;
    mp->n--;
    for (uint32_t j = i;;) { /* shift later entries of the run back over the hole */
        mp->val[i] = NULL;
        for (;;) {
            j = (j + 1) & mask;
            if (!mp->val[j]) return v;
            uint32_t k = hash64(mp->key[j]) & mask; /* entry j stays if k is in (i, j] */
            if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) continue;
            break;
        }
        mp->key[i] = mp->key[j];
        mp->val[i] = mp->val[j];
        i = j;
    }
}

/* ---- state ------------------------------------------------------------------------------- */

/* blocks a live sequence at position pos holds */
static uint32_t units_of(const sx *x, int64_t pos) {
    return (uint32_t)((pos + x->block - 1) / x->block);
}

static void recount(sx *x) {
    uint32_t live = 0, used = 0;
    for (int i = 0; i < x->n_seqs; i++)
        if (x->seqs[i].used) live++, used += units_of(x, dv4_seq_pos(x->seqs[i].s));
    uint32_t cached = x->snaps ? x->snaps->n : 0;
    atomic_store(&x->live_seqs, live);
    atomic_store(&x->cached_blocks, cached);
    atomic_store(&x->kv_blocks_used, used + cached * x->snap_cost);
}

static void seq_free(sx *x, sx_seq *q) {
    dv4_seq_free(x->m, q->s);
    free(q->ids);
    worker_counts_free(&q->counts);
    *q = (sx_seq){0};
}

static void seq_append(sx_seq *q, const int32_t *ids, size_t n) {
    if (!n) return;
    if (q->n_ids + n > q->cap_ids) {
        q->cap_ids = 2 * (q->n_ids + n) + 64;
        q->ids = xrealloc(q->ids, q->cap_ids * sizeof *q->ids);
    }
    memcpy(q->ids + q->n_ids, ids, n * sizeof *ids);
    q->n_ids += n;
}

static sx_seq *find_seq(sx *x, uint64_t id) {
    for (int i = 0; i < x->n_seqs; i++)
        if (x->seqs[i].used && x->seqs[i].id == id) return &x->seqs[i];
    return NULL;
}

void sx_clear(sx *x) {
    for (int i = 0; i < x->n_seqs; i++)
        if (x->seqs[i].used) seq_free(x, &x->seqs[i]);
    sx_snapmap *mp = x->snaps;
    if (mp) {
        for (uint32_t i = 0; i < mp->cap; i++) dv4_snap_free(x->m, mp->val[i]);
        free(mp->key);
        free(mp->val);
        *mp = (sx_snapmap){0};
    }
    recount(x);
}

void sx_destroy(sx *x) {
    sx_clear(x);
    if (x->spool) pool_destroy(x->spool);
    x->spool = NULL;
    free(x->seqs);
    free(x->snaps);
    x->seqs = NULL;
    x->snaps = NULL;
    x->n_seqs = 0;
    x->m = NULL;
}

int sx_configure(sx *x, dv4_model *m, int rank, int block, int max_seqs, int max_seq_len,
                 uint64_t budget_bytes, char *err, size_t errlen) {
    sx_destroy(x);
    if (!block) block = 256;
    dv4_kv_sizes z;
    int rc = dv4_kv_sizes_of(dv4_cfg(m), block, dv4_get_kv_dtype(m), &z, err, errlen);
    if (rc) return rc;
    const double MiB = 1048576.0;
    uint64_t fixed = (uint64_t)max_seqs * z.fixed_bytes;
    if (budget_bytes < fixed + (uint64_t)max_seqs * z.block_bytes)
        return duet_err(err, errlen, DUET_ENOMEM,
                        "the KV budget of %.1f MiB cannot hold max_seqs = %d sequences of one "
                        "block each (%.2f MiB of fixed state + %.2f MiB per block of %d tokens, "
                        "per sequence); raise --kv-memory-mb (or free device memory) or lower "
                        "max_seqs", budget_bytes / MiB, max_seqs, z.fixed_bytes / MiB,
                        z.block_bytes / MiB, block);
    rc = dv4_set_block_size(m, block, err, errlen);
    if (rc) return rc;
    uint64_t total = (budget_bytes - fixed) / z.block_bytes;
    x->m = m;
    x->rank = rank;
    x->block = block;
    x->max_seq_len = max_seq_len;
    x->blocks_total = total > INT32_MAX ? INT32_MAX : (uint32_t)total;
    /* every page of KV state comes from the model's pool: never more than the budget holds */
    dv4_kv_pool_limit(m, (int)x->blocks_total);
    x->snap_cost = (uint32_t)((z.block_bytes + z.resume_bytes + z.block_bytes - 1) / z.block_bytes);
    x->block_bytes = z.block_bytes;
    x->seqs = xcalloc((size_t)max_seqs, sizeof *x->seqs);
    x->n_seqs = max_seqs;
    x->snaps = xcalloc(1, sizeof *x->snaps);
    recount(x);
    return 0;
}

void sx_release(sx *x, const Duet__Release *r) {
    if (!x->m) return;
    for (size_t i = 0; i < r->n_seq_ids; i++) {
        sx_seq *q = find_seq(x, r->seq_ids[i]);
        if (q) seq_free(x, q);
    }
    for (size_t i = 0; i < r->n_block_ids; i++) dv4_snap_free(x->m, map_del(x->snaps, r->block_ids[i]));
    recount(x);
}

void sx_result_free(sx_result *r) {
    free(r->res);
    free(r->ptrs);
    free(r->logits);
    free(r->top_ids);
    free(r->top_lps);
    *r = (sx_result){0};
}

/* ---- one step ---------------------------------------------------------------------------- */

/* A chunk of the plan, checked. Piece i covers positions [i ? ends[i-1] : start, ends[i]);
 * save[i] is the block id saved after it, or none. */
typedef struct {
    const Duet__SeqChunk *k;
    sx_seq *q;             /* existing sequence, or the slot a new one takes */
    int is_new;
    int start, n;
    int n_pieces;
    int *ends;             /* [n_pieces] */
    uint64_t *save;        /* [n_pieces] */
    int *has_save;         /* [n_pieces] */
    size_t row0, rows;     /* its rows in the step's logits */
    worker_sample_params sp;
    int on_dev;            /* its draw went to the device (dres filled) */
    be_sample_res dres;    /* the device's draw; dres.fallback: draw on the host */
} chunk;

static int fail(char *err, size_t errlen, const Duet__SeqChunk *k, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail(char *err, size_t errlen, const Duet__SeqChunk *k, const char *fmt, ...) {
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (k)
        return duet_err(err, errlen, DUET_EINVAL, "seq %llu: %s", (unsigned long long)k->seq_id,
                        msg);
    return duet_err(err, errlen, DUET_EINVAL, "%s", msg);
}

static void sampling_of(const Duet__SamplingParams *s, worker_sample_params *sp) {
    *sp = (worker_sample_params){0};
    if (!s) return;
    sp->temperature = s->temperature;
    sp->top_p = s->top_p;
    sp->top_k = s->top_k;
    sp->min_p = s->min_p;
    sp->seed = s->seed;
    sp->stream = s->stream;
    sp->repetition_penalty = s->repetition_penalty;
    sp->presence_penalty = s->presence_penalty;
    sp->frequency_penalty = s->frequency_penalty;
    sp->bias_ids = s->bias_ids;
    sp->bias_values = s->bias_values;
    sp->n_bias = (int)s->n_bias_ids;
    sp->banned_ids = s->banned_ids;
    sp->n_banned = (int)s->n_banned_ids;
    sp->allowed_ids = s->allowed_ids;
    sp->n_allowed = (int)s->n_allowed_ids;
}

static int cmp_save(const void *a, const void *b) {
    const Duet__BlockSave *x = *(Duet__BlockSave *const *)a, *y = *(Duet__BlockSave *const *)b;
    return (x->end_pos > y->end_pos) - (x->end_pos < y->end_pos);
}

/* Checks one chunk against the plan and the state; fills c (pieces, sampling). */
static int check_chunk(sx *x, const Duet__StepPlan *p, int i, chunk *c, char *err,
                       size_t errlen) {
    const Duet__SeqChunk *k = p->chunks[i];
    const int vocab = dv4_cfg(x->m)->vocab_size, B = x->block;
    c->k = k;
    c->start = (int)k->start_pos;
    c->n = (int)k->n_token_ids;
    if (k->n_token_ids == 0) return fail(err, errlen, k, "the chunk has no token ids");
    for (size_t t = 0; t < k->n_token_ids; t++)
        if (k->token_ids[t] < 0 || k->token_ids[t] >= vocab)
            return fail(err, errlen, k, "token id %d at index %zu is outside the vocabulary "
                        "[0, %d)", k->token_ids[t], t, vocab);
    for (int q = 0; q < i; q++)
        if (p->chunks[q]->seq_id == k->seq_id)
            return fail(err, errlen, k, "the sequence appears twice in one step");
    if ((uint64_t)k->start_pos + k->n_token_ids > (uint64_t)x->max_seq_len)
        return fail(err, errlen, k, "positions up to %llu exceed max_seq_len %d",
                    (unsigned long long)k->start_pos + k->n_token_ids, x->max_seq_len);
    c->q = find_seq(x, k->seq_id);
    c->is_new = !c->q;
    if (c->q) {
        if (k->start_pos != (uint32_t)dv4_seq_pos(c->q->s))
            return fail(err, errlen, k, "start_pos %u does not match the sequence's position %d",
                        k->start_pos, dv4_seq_pos(c->q->s));
        if (k->n_restore_blocks || k->n_history)
            return fail(err, errlen, k, "restore_blocks and history are only for a new "
                        "sequence; this one is at position %d", dv4_seq_pos(c->q->s));
    } else if (k->n_restore_blocks) {
        if ((uint64_t)k->start_pos != (uint64_t)k->n_restore_blocks * (uint64_t)B)
            return fail(err, errlen, k, "start_pos %u must equal %zu restored blocks × block "
                        "size %d", k->start_pos, k->n_restore_blocks, B);
        for (size_t b = 0; b < k->n_restore_blocks; b++)
            if (!map_get(x->snaps, k->restore_blocks[b]))
                return fail(err, errlen, k, "restore block %llu (index %zu) is not cached on "
                            "this worker (never saved, dropped, or the worker lost its state)",
                            (unsigned long long)k->restore_blocks[b], b);
        if (k->n_history != k->start_pos)
            return fail(err, errlen, k, "history holds %zu token ids; a restored sequence "
                        "needs the %u ids of positions [0, start_pos)", k->n_history,
                        k->start_pos);
        for (size_t t = 0; t < k->n_history; t++)
            if (k->history[t] < 0 || k->history[t] >= vocab)
                return fail(err, errlen, k, "history id %d at index %zu is outside the "
                            "vocabulary [0, %d)", k->history[t], t, vocab);
    } else {
        if (k->start_pos != 0)
            return fail(err, errlen, NULL, "seq %llu is not known to this worker (never "
                        "started, released, or the worker lost its state); start it at "
                        "position 0 or from restore_blocks, not at %u",
                        (unsigned long long)k->seq_id, k->start_pos);
        if (k->n_history)
            return fail(err, errlen, k, "history is only for a sequence restored from blocks");
    }
    /* block saves: sorted by end, each at a block boundary inside the chunk */
    size_t ns = k->n_save_blocks;
    Duet__BlockSave **sv = xmalloc((ns ? ns : 1) * sizeof *sv);
    if (ns) memcpy(sv, k->save_blocks, ns * sizeof *sv);
    qsort(sv, ns, sizeof *sv, cmp_save);
    int rc = 0, end = c->start + c->n;
    c->ends = xmalloc((ns + 1) * sizeof *c->ends);
    c->save = xcalloc(ns + 1, sizeof *c->save);
    c->has_save = xcalloc(ns + 1, sizeof *c->has_save);
    c->n_pieces = 0;
    for (size_t s = 0; s < ns && !rc; s++) {
        uint32_t e = sv[s]->end_pos;
        if (e % (uint32_t)B || e <= (uint32_t)c->start || e > (uint32_t)end)
            rc = fail(err, errlen, k, "block save %llu ends at %u, which is not a multiple of "
                      "the block size %d inside (%d, %d]", (unsigned long long)sv[s]->block_id,
                      e, B, c->start, end);
        else if (s && sv[s - 1]->end_pos == e)
            rc = fail(err, errlen, k, "two block saves end at %u", e);
        else if (map_get(x->snaps, sv[s]->block_id))
            rc = fail(err, errlen, k, "block %llu is already cached; a block id is saved once",
                      (unsigned long long)sv[s]->block_id);
        else {
            c->ends[c->n_pieces] = (int)e;
            c->save[c->n_pieces] = sv[s]->block_id;
            c->has_save[c->n_pieces++] = 1;
        }
    }
    free(sv);
    if (rc) return rc;
    if (!c->n_pieces || c->ends[c->n_pieces - 1] != end) c->ends[c->n_pieces++] = end;
    if (k->sampling && k->sampling->n_bias_ids != k->sampling->n_bias_values)
        return fail(err, errlen, k, "logit_bias has %zu ids but %zu values; send one value per "
                    "id", k->sampling->n_bias_ids, k->sampling->n_bias_values);
    sampling_of(k->sampling, &c->sp);
    if (k->sample) {
        char why[300];
        if (worker_sample_check(&c->sp, vocab, why, sizeof why))
            return fail(err, errlen, k, "%s", why);
    }
    return 0;
}

/* Checks across chunks: block ids saved once in the plan, free slots, the KV budget and the
 * reply size. */
static int check_plan(sx *x, const Duet__StepPlan *p, chunk *c, int n, char *err, size_t errlen) {
    uint32_t saves = 0, fresh = 0, free_slots = 0;
    for (int i = 0; i < n; i++) {
        fresh += (uint32_t)c[i].is_new;
        for (int a = 0; a < c[i].n_pieces; a++) {
            if (!c[i].has_save[a]) continue;
            saves++;
            for (int j = 0; j <= i; j++)
                for (int b = 0; b < (j == i ? a : c[j].n_pieces); b++)
                    if (c[j].has_save[b] && c[j].save[b] == c[i].save[a])
                        return fail(err, errlen, c[i].k, "block %llu is saved twice in one step",
                                    (unsigned long long)c[i].save[a]);
        }
    }
    uint64_t live = 0;
    for (int s = 0; s < x->n_seqs; s++) {
        sx_seq *q = &x->seqs[s];
        if (!q->used) {
            free_slots++;
            continue;
        }
        int in_plan = 0;
        for (int i = 0; i < n && !in_plan; i++) in_plan = c[i].q == q;
        if (!in_plan) live += units_of(x, dv4_seq_pos(q->s));
    }
    if (fresh > free_slots)
        return fail(err, errlen, NULL, "no free sequence slot for the plan's %u new "
                    "sequences (%u of %d slots are free); release finished sequences", fresh,
                    free_slots, x->n_seqs);
    for (int i = 0; i < n; i++) live += units_of(x, (int64_t)c[i].start + c[i].n);
    uint64_t cached = (uint64_t)x->snaps->n + saves, need = live + cached * x->snap_cost;
    if (need > x->blocks_total)
        return fail(err, errlen, NULL, "the step needs %llu KV blocks (%llu for live sequences "
                    "+ %llu cached prefix blocks × %u) but this worker holds kv_blocks_total = "
                    "%u", (unsigned long long)need, (unsigned long long)live,
                    (unsigned long long)cached, x->snap_cost, x->blocks_total);
    const int vocab = dv4_cfg(x->m)->vocab_size;
    size_t rows = 0;
    for (int i = 0; i < n; i++) {
        c[i].row0 = rows;
        c[i].rows = c[i].k->return_logits ? (size_t)c[i].n : c[i].k->sample ? 1 : 0;
        rows += c[i].rows;
    }
    if ((uint64_t)rows * (uint64_t)vocab * sizeof(float) > RPC_MAX_FRAME / 2)
        return fail(err, errlen, NULL, "the plan asks for %zu rows of logits (%d floats each), "
                    "more than one reply frame can carry", rows, vocab);
    return 0;
}

/* Creates the plan's new sequences (fresh or restored) in free slots. On failure frees the
 * ones it made. */
static int create_seqs(sx *x, chunk *c, int n, char *err, size_t errlen) {
    int rc = 0, slot = 0;
    for (int i = 0; i < n && !rc; i++) {
        if (!c[i].is_new) continue;
        while (x->seqs[slot].used) slot++;
        sx_seq *q = &x->seqs[slot];
        const Duet__SeqChunk *k = c[i].k;
        if (k->n_restore_blocks) {
            dv4_snap **chain = xmalloc(k->n_restore_blocks * sizeof *chain);
            for (size_t b = 0; b < k->n_restore_blocks; b++)
                chain[b] = map_get(x->snaps, k->restore_blocks[b]);
            rc = dv4_seq_restore(x->m, x->max_seq_len, chain, (int)k->n_restore_blocks, &q->s,
                                 err, errlen);
            free(chain);
        } else {
            rc = dv4_seq_new(x->m, x->max_seq_len, &q->s, err, errlen);
        }
        if (rc) break;
        q->used = 1;
        q->id = k->seq_id;
        seq_append(q, k->history, k->n_history);
        c[i].q = q;
    }
    if (rc)
        for (int i = 0; i < n; i++)
            if (c[i].is_new && c[i].q) seq_free(x, c[i].q), c[i].q = NULL;
    return rc;
}

/* ---- device sampling ---------------------------------------------------------------------- */

static int has_penalties(const worker_sample_params *sp) {
    return (sp->repetition_penalty > 0 && sp->repetition_penalty != 1.0f) ||
           sp->presence_penalty != 0 || sp->frequency_penalty != 0;
}

/* top logprobs a chunk asks for, capped */
static int n_top_of(const Duet__SeqChunk *k, int vocab) {
    int ntop = k->sampling ? (int)k->sampling->n_logprobs : 0;
    if (ntop > MAX_TOP_LOGPROBS) ntop = MAX_TOP_LOGPROBS;
    return ntop > vocab ? vocab : ntop;
}

/* Whether chunk c's draw goes to the device in the pass that yields its sampling row: rank 0
 * with device sampling on, and parameters that need no shaping of the logits. */
static int draws_on_device(const sx *x, const chunk *c) {
    const worker_sample_params *sp = &c->sp;
    return x->dev_sample && x->rank == 0 && c->k->sample && !has_penalties(sp) && !sp->n_bias &&
           !sp->n_banned && !sp->n_allowed;
}

/* The device requests of one pass over dc[m] (chunk who[j] of c): a request per chunk whose
 * last piece runs in this pass and draws on the device; keep[rows] marks the rows the host
 * needs (return_logits). Returns the number of requests; owner[i] = the chunk of request i. */
static int pass_requests(const sx *x, chunk *c, const dv4_chunk *dc, const int *who, int m,
                         int pass, be_sample_req *req, int *owner, unsigned char *keep) {
    const int vocab = dv4_cfg(x->m)->vocab_size;
    int n = 0, row = 0;
    for (int j = 0; j < m; j++) {
        chunk *ci = &c[who[j]];
        int nr = dc[j].logits == DV4_LOGITS_ALL ? dc[j].n : dc[j].logits == DV4_LOGITS_LAST;
        for (int r = 0; r < nr; r++) keep[row + r] = ci->k->return_logits != 0;
        if (nr && pass == ci->n_pieces - 1 && draws_on_device(x, ci)) {
            const worker_sample_params *sp = &ci->sp;
            req[n] = (be_sample_req){
                .row = row + nr - 1, .temperature = sp->temperature, .top_p = sp->top_p,
                .min_p = sp->min_p, .top_k = sp->top_k, .n_top = n_top_of(ci->k, vocab),
                .u01 = worker_sample_u01(sp->seed, sp->stream,
                                         (uint64_t)ci->start + (uint64_t)ci->n)};
            owner[n++] = who[j];
        }
        row += nr;
    }
    return n;
}

/* The forward passes. Logits rows land in out[c.row0 ...]; snapshots taken after each pass
 * are put into pending[*n_pending] (ids in pending_id). */
static int run_passes(sx *x, chunk *c, int n, float *out, dv4_snap **pending,
                      uint64_t *pending_id, int *n_pending, char *err, size_t errlen) {
    const int vocab = dv4_cfg(x->m)->vocab_size;
    int passes = 0;
    for (int i = 0; i < n; i++) passes = c[i].n_pieces > passes ? c[i].n_pieces : passes;
    dv4_chunk *dc = xcalloc((size_t)n, sizeof *dc);
    int *who = xcalloc((size_t)n, sizeof *who);
    float *buf = NULL;
    size_t buf_rows = 0;
    int rc = 0;
    be_sample_req *req = xcalloc((size_t)n, sizeof *req);
    be_sample_res *res = xcalloc((size_t)n, sizeof *res);
    int *owner = xcalloc((size_t)n, sizeof *owner);
    unsigned char *keep = NULL;
    for (int ps = 0; ps < passes && !rc; ps++) {
        int m = 0;
        for (int i = 0; i < n; i++) {
            if (c[i].n_pieces <= ps) continue;
            int lo = ps ? c[i].ends[ps - 1] : c[i].start, last = ps == c[i].n_pieces - 1;
            dc[m] = (dv4_chunk){c[i].q->s, c[i].k->token_ids + (lo - c[i].start),
                                c[i].ends[ps] - lo,
                                c[i].k->return_logits ? DV4_LOGITS_ALL
                                : c[i].k->sample && last ? DV4_LOGITS_LAST
                                                         : DV4_LOGITS_NONE};
            who[m++] = i;
        }
        size_t rows = (size_t)dv4_logit_rows(dc, m);
        float *dst = out;
        if (passes > 1) { /* one pass: rows are already in plan order */
            if (rows > buf_rows) buf = xrealloc(buf, rows * vocab * sizeof *buf), buf_rows = rows;
            dst = buf;
        }
        keep = xrealloc(keep, rows ? rows : 1);
        dv4_dsample ds = {pass_requests(x, c, dc, who, m, ps, req, owner, keep), req, res, keep};
        rc = dv4_forward_ds(x->m, dc, m, dst, ds.n ? &ds : NULL, err, errlen);
        if (rc) break;
        for (int i = 0; i < ds.n; i++) c[owner[i]].on_dev = 1, c[owner[i]].dres = res[i];
        size_t r = 0;
        for (int j = 0; j < m; j++) {
            chunk *ci = &c[who[j]];
            int lo = ps ? ci->ends[ps - 1] : ci->start;
            size_t nr = dc[j].logits == DV4_LOGITS_ALL ? (size_t)dc[j].n
                      : dc[j].logits == DV4_LOGITS_LAST ? 1 : 0;
            size_t at = ci->row0 + (dc[j].logits == DV4_LOGITS_ALL ? (size_t)(lo - ci->start) : 0);
            if (passes > 1 && nr) memcpy(out + at * vocab, buf + r * vocab, nr * vocab * sizeof *out);
            r += nr;
            if (ci->has_save[ps]) {
                rc = dv4_snap_save(x->m, ci->q->s, &pending[*n_pending], err, errlen);
                if (rc) break;
                pending_id[(*n_pending)++] = ci->save[ps];
            }
        }
    }
    free(buf);
    free(dc);
    free(who);
    free(req);
    free(res);
    free(owner);
    free(keep);
    return rc;
}

/* Rank 0: one chunk's draw (a pure function of its logits, parameters and its own sequence's
 * counts: chunks belong to distinct sequences, so chunks are sampled in parallel). */
typedef struct {
    sx *x;
    chunk *c;
    const float *logits;
    sx_result *out;
    int vocab;
    char (*why)[300]; /* [n]: the reason a draw failed, "" if it did not */
} sample_job;

static void sample_one(void *ctx, int i) {
    sample_job *j = ctx;
    chunk *c = &j->c[i];
    const Duet__SeqChunk *k = c->k;
    Duet__SeqResult *r = &j->out->res[i];
    const float *rows = j->logits + c->row0 * j->vocab;
    if (!k->sample) return;
    const worker_sample_params *sp = &c->sp;
    sx_seq *q = c->q;
    int pen = has_penalties(sp), ntop = n_top_of(k, j->vocab);
    int32_t *ti = j->out->top_ids + (size_t)i * MAX_TOP_LOGPROBS;
    float *tl = j->out->top_lps + (size_t)i * MAX_TOP_LOGPROBS;
    if (c->on_dev && !c->dres.fallback) { /* drawn on the device */
        r->token_id = c->dres.id;
        r->logprob = c->dres.logprob;
        memcpy(ti, c->dres.top_ids, (size_t)ntop * sizeof *ti);
        memcpy(tl, c->dres.top_logprobs, (size_t)ntop * sizeof *tl);
    } else {
        if (pen)
            worker_counts_update(&q->counts, q->ids, q->n_ids,
                                 k->sampling ? k->sampling->prompt_len : 0);
        r->token_id = worker_sample(rows + (c->rows - 1) * j->vocab, j->vocab, sp,
                                    pen ? &q->counts : NULL, (uint64_t)c->start + (uint64_t)c->n,
                                    &r->logprob, ntop, ti, tl, j->why[i], sizeof j->why[i]);
    }
    if (r->token_id < 0) return;
    r->n_top_ids = r->n_top_logprobs = (size_t)ntop;
    r->top_ids = ti;
    r->top_logprobs = tl;
}

/* Rank 0: samples every chunk that asks for it and fills the results: a draw the device made
 * (run_passes, --device-sampling) is taken as it is; two or more host draws run on a pool of
 * threads (a draw over a 129K vocabulary with top-p is ~3 ms: a batch of 128 would
 * otherwise wait ~0.4 s per step on one core). */
static int sample_all(sx *x, chunk *c, int n, float *logits, sx_result *out, char *err,
                      size_t errlen) {
    const int vocab = dv4_cfg(x->m)->vocab_size;
    out->res = xcalloc((size_t)n, sizeof *out->res);
    out->ptrs = xcalloc((size_t)n, sizeof *out->ptrs);
    out->top_ids = xcalloc((size_t)n * MAX_TOP_LOGPROBS, sizeof *out->top_ids);
    out->top_lps = xcalloc((size_t)n * MAX_TOP_LOGPROBS, sizeof *out->top_lps);
    out->n = (size_t)n;
    int n_draw = 0;
    for (int i = 0; i < n; i++) {
        Duet__SeqResult *r = &out->res[i];
        duet__seq_result__init(r);
        out->ptrs[i] = r;
        r->seq_id = c[i].k->seq_id;
        r->token_id = -1;
        n_draw += c[i].k->sample && !(c[i].on_dev && !c[i].dres.fallback); /* host draws */
        if (c[i].k->return_logits) {
            r->n_logits = c[i].rows * (size_t)vocab;
            r->logits = logits + c[i].row0 * vocab;
        }
    }
    char (*why)[300] = xcalloc((size_t)n, sizeof *why);
    sample_job j = {x, c, logits, out, vocab, why};
    if (n_draw >= 2) {
        if (!x->spool) {
            long nc = sysconf(_SC_NPROCESSORS_ONLN);
            x->spool = pool_create(nc > 16 ? 16 : nc < 1 ? 1 : (int)nc);
        }
        pool_for(x->spool, n, sample_one, &j);
    } else {
        for (int i = 0; i < n; i++) sample_one(&j, i);
    }
    int rc = 0;
    for (int i = 0; i < n && !rc; i++)
        if (c[i].k->sample && out->res[i].token_id < 0)
            rc = fail(err, errlen, c[i].k, "%s", why[i]);
    free(why);
    return rc;
}

int sx_step(sx *x, const Duet__StepPlan *p, sx_result *out, char *err, size_t errlen) {
    *out = (sx_result){0};
    if (!x->m) return fail(err, errlen, NULL, "no model is loaded; send LoadModel first");
    /* evicted blocks go first, whatever happens to the chunks: the coordinator forgot them */
    for (size_t i = 0; i < p->n_drop_blocks; i++)
        dv4_snap_free(x->m, map_del(x->snaps, p->drop_blocks[i]));
    recount(x);
    int n = (int)p->n_chunks;
    if (n == 0) return 0;
    if (p->n_chunks > (size_t)x->n_seqs)
        return fail(err, errlen, NULL, "the plan has %zu chunks but this worker has %d sequence "
                    "slots", p->n_chunks, x->n_seqs);
    const int vocab = dv4_cfg(x->m)->vocab_size;
    chunk *c = xcalloc((size_t)n, sizeof *c);
    int rc = 0, n_saves = 0;
    for (int i = 0; i < n && !rc; i++) rc = check_chunk(x, p, i, &c[i], err, errlen);
    if (!rc) rc = check_plan(x, p, c, n, err, errlen);
    for (int i = 0; i < n && !rc; i++) n_saves += c[i].n_pieces;
    if (!rc) rc = create_seqs(x, c, n, err, errlen);
    float *logits = NULL;
    dv4_snap **pending = NULL;
    uint64_t *pending_id = NULL;
    int n_pending = 0;
    if (!rc) {
        size_t rows = n ? c[n - 1].row0 + c[n - 1].rows : 0;
        logits = xmalloc((rows ? rows : 1) * (size_t)vocab * sizeof *logits);
        pending = xcalloc((size_t)n_saves, sizeof *pending);
        pending_id = xcalloc((size_t)n_saves, sizeof *pending_id);
        rc = run_passes(x, c, n, logits, pending, pending_id, &n_pending, err, errlen);
        if (rc) { /* valid input failed in the forward pass: the sequences are half-written */
            for (int i = 0; i < n; i++)
                if (c[i].is_new) seq_free(x, c[i].q);
            for (int i = 0; i < n_pending; i++) dv4_snap_free(x->m, pending[i]);
            rc = DUET_EIO;
        }
    }
    if (!rc) {
        for (int i = 0; i < n_pending; i++) map_put(x->snaps, pending_id[i], pending[i]);
        for (int i = 0; i < n; i++) seq_append(c[i].q, c[i].k->token_ids, c[i].k->n_token_ids);
        if (x->rank == 0) rc = sample_all(x, c, n, logits, out, err, errlen);
        if (!rc && x->rank == 0) out->logits = logits, logits = NULL;
        if (rc) sx_result_free(out);
    }
    free(logits);
    free(pending);
    free(pending_id);
    for (int i = 0; i < n; i++) free(c[i].ends), free(c[i].save), free(c[i].has_save);
    free(c);
    recount(x);
    return rc;
}
