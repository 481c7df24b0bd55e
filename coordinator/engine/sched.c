/* sched.c — the generation engine behind sched.h: one sequence per request, one step in flight.
 *
 * Why this shape: the workers run one StepPlan at a time, so the whole engine is a loop of
 * "build a plan from the current state → send → apply the result" on the event loop, with every
 * decision (who runs, how many tokens, which blocks are restored, saved, dropped, who is
 * preempted) taken while building the plan and every consequence (tokens, ends, cache commits)
 * applied when the result arrives. A request's memory (prompt + generated ids, hash chain,
 * copies of its parameters) is owned by its `seq` and freed in one place, seq_end.
 *
 * Token model of a sequence: toks = prompt + generated (forced included); pos = how many of
 * them the workers' state has processed. The next chunk always starts at pos and covers at most
 * toks[pos..n_toks); it samples when it reaches n_toks. A decode is a sequence with exactly one
 * unprocessed token (the one it sampled last); anything else is a prefill (a new prompt, or a
 * preempted sequence recomputing prompt + generated). Preemption keeps toks and sets pos = 0, so
 * the recomputation ends where it stopped and samples the same position with the same RNG
 * stream: outputs are unchanged.
 */
#include "coordinator/engine/sched.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/err.h"
#include "coordinator/clog.h"
#include "coordinator/engine/kvm.h"

#define OVH_RING 256

static const int32_t CANARY_PROMPT[] = {1, 2, 3, 4, 5, 6, 7, 8};

typedef struct seq {
    struct seq *next;          /* running or waiting list */
    eng_sink sink;
    sched_logits_fn logits_fn;
    char *rid;
    int canary;
    /* tokens: [n_toks] of cap_toks; prompt = the first n_prompt */
    int32_t *toks;
    int n_toks, cap_toks, n_prompt, n_out, max_tokens;
    /* sampling: the submitted parameters; prompt and request_id cleared, bias arrays owned */
    eng_params prm;
    int32_t *bias_ids;
    float *bias_values;
    /* the constraint asked for the chunk being built (owned by the sink) */
    eng_constraint con;
    /* queue */
    int priority;
    uint64_t arrival;
    double deadline;           /* waiting while the group is down: no_workers after this */
    /* worker state */
    uint64_t seq_id;           /* fresh per admission: 0 = not admitted */
    int pos;
    uint32_t held;             /* KV blocks (kvm) */
    uint64_t *hashes;          /* chain hashes of full blocks computed so far */
    int n_hashes, cap_hashes;
    int cached_tokens;         /* prompt tokens restored at the first admission */
    int admitted_once;
    /* the step in flight */
    int in_step, step_len, step_sample;
    int abort;
    /* times (monotonic s) */
    double t_arrival, t_admitted, t_first, t_last;
} seq;

/* One chunk of the step being built / in flight. */
typedef struct {
    seq *q;
    uint64_t *restore;          /* [n_restore] cached blocks a fresh admission starts from */
    uint32_t n_restore;
    Duet__BlockSave *saves;     /* [n_saves] blocks this chunk writes into the cache */
    int n_saves;
} plan_item;

typedef struct {
    double coord_us, wall_us, compute_us;
    int n_seqs, decode_only;
} ovh;

struct sched {
    pool *pool;
    metrics *m;
    sched_cfg cfg;
    kvm *kv;
    seq *running, *waiting;
    int n_running, n_waiting;
    uint64_t next_seq_id, next_arrival;
    int draining;
    double drain_deadline;
    int warm, canary_queued;
    uint64_t completed, failed, aborted, rejected, preemptions;
    double last_step_time, last_step_ms, last_success, last_failure;
    /* the step in flight */
    plan_item *plan;
    int n_plan, cap_plan;
    int plan_tokens, plan_decode_only;
    double step_sent, build_us;
    ovh ring[OVH_RING];
    uint64_t n_ovh;
    int drained_told;
};

static double wall_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int in_flight(const sched *s) {
    int n = s->n_running + s->n_waiting;
    for (const seq *q = s->running; q; q = q->next) n -= q->canary;
    for (const seq *q = s->waiting; q; q = q->next) n -= q->canary;
    return n;
}

/* ---- metrics ------------------------------------------------------------------------------ */

static void minc(sched *s, const char *f, double v) {
    if (s->m) metrics_inc(s->m, f, NULL, v);
}
static void mobs(sched *s, const char *f, double v) {
    if (s->m) metrics_observe(s->m, f, NULL, v);
}

const char *sched_state(sched *s) {
    if (s->draining) return in_flight(s) ? "draining" : "drained";
    switch (pool_get_state(s->pool)) {
    case POOL_READY: return "serving";
    case POOL_STARTING: return "starting";
    default: return "degraded";
    }
}

/* KV usage; the gauges that health() reports (running, waiting, server_state) are set from it
 * by the HTTP front at every scrape, so they are never stale. */
static void update_gauges(sched *s) {
    if (!s->m) return;
    kvm_stats k;
    kvm_get_stats(s->kv, &k);
    metrics_set(s->m, "kv_cache_usage_perc", NULL,
                k.blocks_total ? (double)k.used_blocks / k.blocks_total : 0.0);
}

/* ---- lists -------------------------------------------------------------------------------- */

static void unlink_seq(seq **head, seq *q) {
    for (seq **pp = head; *pp; pp = &(*pp)->next)
        if (*pp == q) {
            *pp = q->next;
            q->next = NULL;
            return;
        }
}

static void append(seq **head, seq *q) {
    seq **pp = head;
    while (*pp) pp = &(*pp)->next;
    q->next = NULL;
    *pp = q;
}

/* Waiting queue order: (priority, arrival). */
static void enqueue(sched *s, seq *q) {
    seq **pp = &s->waiting;
    while (*pp && ((*pp)->priority < q->priority ||
                   ((*pp)->priority == q->priority && (*pp)->arrival < q->arrival)))
        pp = &(*pp)->next;
    q->next = *pp;
    *pp = q;
    s->n_waiting++;
}

/* ---- ending a request (the one place a seq is freed) ----------------------------------- */

static void check_drained(sched *s);

static void seq_free(seq *q) {
    free(q->rid);
    free(q->toks);
    free(q->bias_ids);
    free(q->bias_values);
    free(q->hashes);
    free(q);
}

/* Removes q from its list, frees its worker state and KV units, answers the sink, frees q.
 * finish != NULL: a normal end; else code + msg. */
static void seq_end(sched *s, seq *q, int running, const char *finish, const char *code,
                    const char *msg) {
    if (running) {
        unlink_seq(&s->running, q);
        s->n_running--;
        if (q->seq_id) pool_release(s->pool, &q->seq_id, 1);
        kvm_seq_free(s->kv, &q->held);
    } else {
        unlink_seq(&s->waiting, q);
        s->n_waiting--;
    }
    double t = coord_now_s();
    if (!q->canary) {
        if (finish) {
            if (!strcmp(finish, "abort")) s->aborted++;
            else {
                s->completed++;
                s->last_success = t;
            }
            mobs(s, "e2e_request_latency_seconds", t - q->t_arrival);
            mobs(s, "request_prompt_tokens", q->n_prompt);
            mobs(s, "request_generation_tokens", q->n_out);
            if (q->t_first > 0) mobs(s, "request_decode_time_seconds", t - q->t_first);
        } else {
            s->failed++;
            s->last_failure = t;
        }
    } else if (finish && strcmp(finish, "abort")) {
        s->warm = 1;
        coord_log("canary done: warm");
    } else if (!finish) {
        coord_log("canary failed: %s", msg);
    }
    if (q->canary) s->canary_queued = 0;
    q->sink.on_end(q->sink.user, finish, code, msg);
    seq_free(q);
    check_drained(s);
}

static void check_drained(sched *s) {
    if (!s->draining || in_flight(s)) {
        s->drained_told = 0;
        return;
    }
    if (s->drained_told) return;
    s->drained_told = 1;
    if (s->cfg.drained) s->cfg.drained(s->cfg.drained_arg);
}

/* ---- tokens ------------------------------------------------------------------------------- */

static void push_tok(seq *q, int32_t id) {
    if (q->n_toks == q->cap_toks)
        q->toks = xrealloc(q->toks, (size_t)(q->cap_toks = q->cap_toks * 2 + 8) * sizeof *q->toks);
    q->toks[q->n_toks++] = id;
}

/* Hash of full block k (0-based) of q's tokens; every earlier one is computed on the way. */
static uint64_t seq_hash(sched *s, seq *q, int k) {
    uint32_t B = kvm_block_size(s->kv);
    if (k >= q->cap_hashes)
        q->hashes = xrealloc(q->hashes, (size_t)(q->cap_hashes = k + 16) * sizeof *q->hashes);
    while (q->n_hashes <= k) {
        uint64_t parent = q->n_hashes ? q->hashes[q->n_hashes - 1] : 0;
        q->hashes[q->n_hashes] =
            kvm_chain_hash(parent, q->toks + (size_t)q->n_hashes * B, B);
        q->n_hashes++;
    }
    return q->hashes[k];
}

/* A generated token (sampled: t != NULL from the worker; forced: id). Returns 1 when the
 * sequence ended (q is freed). */
static int deliver(sched *s, seq *q, int32_t id, int forced, const Duet__SeqResult *r) {
    double t = coord_now_s();
    push_tok(q, id);
    q->n_out++;
    minc(s, "generation_tokens_total", 1);
    if (!q->canary) {
        if (q->n_out == 1) {
            q->t_first = t;
            mobs(s, "time_to_first_token_seconds", t - q->t_arrival);
            mobs(s, "request_prefill_time_seconds", t - q->t_admitted);
        } else {
            mobs(s, "inter_token_latency_seconds", t - q->t_last);
        }
    }
    q->t_last = t;
    eng_token et = {.id = id, .forced = forced, .cached_tokens = q->cached_tokens};
    if (r && !forced) {
        et.logprob = r->logprob;
        if (q->prm.n_logprobs > 0) {
            size_t n = r->n_top_ids < r->n_top_logprobs ? r->n_top_ids : r->n_top_logprobs;
            et.n_top = (int)(n < (size_t)q->prm.n_logprobs ? n : (size_t)q->prm.n_logprobs);
            et.top_ids = r->top_ids;
            et.top_logprobs = r->top_logprobs;
        }
    }
    int stop = q->sink.on_token(q->sink.user, &et);
    if (stop) seq_end(s, q, 1, "stop", NULL, NULL);
    else if (q->n_out >= q->max_tokens) seq_end(s, q, 1, "length", NULL, NULL);
    else return 0;
    return 1;
}

/* Asks the sink what comes next; appends forced tokens (each delivered, then asks again).
 * Returns 1 when the sequence ended (q freed). q is in the running list. */
static int ask_constraint(sched *s, seq *q) {
    for (;;) {
        q->con = (eng_constraint){0};
        if (!q->sink.constrain) return 0;
        q->sink.constrain(q->sink.user, &q->con);
        if (q->con.n_forced <= 0) return 0;
        int n = q->con.n_forced;
        const int32_t *f = q->con.forced;
        for (int i = 0; i < n; i++)
            if (deliver(s, q, f[i], 1, NULL)) return 1;
    }
}

/* ---- preemption --------------------------------------------------------------------------- */

/* Back to the waiting queue with nothing on the workers; toks are kept. */
static void requeue(sched *s, seq *q, int release) {
    unlink_seq(&s->running, q);
    s->n_running--;
    if (release && q->seq_id) pool_release(s->pool, &q->seq_id, 1);
    kvm_seq_free(s->kv, &q->held);
    q->seq_id = 0;
    q->pos = 0;
    q->in_step = 0;
    q->deadline = coord_now_s() + s->cfg.recover_timeout_s;
    enqueue(s, q);
}

/* Units for q's chunk up to new_pos: evict cache, then preempt the most recently admitted
 * running sequence without a chunk in this plan (possibly q itself). Returns 0 when q may run,
 * 1 when q was preempted or ended. */
static int reserve(sched *s, seq *q, int new_pos) {
    while (kvm_seq_grow(s->kv, &q->held, (uint32_t)new_pos)) {
        seq *victim = NULL;
        for (seq *x = s->running; x; x = x->next)
            if (!x->in_step) victim = x;
        if (victim == q && s->n_plan == 0 && s->n_running == 1) {
            kvm_stats k;
            kvm_get_stats(s->kv, &k);
            char m[300];
            snprintf(m, sizeof m,
                     "the sequence needs %u KV blocks of %u tokens but the workers hold %u: "
                     "lower max_tokens or give the workers more KV memory",
                     (unsigned)((new_pos + k.block_size - 1) / k.block_size), k.block_size,
                     k.blocks_total);
            seq_end(s, q, 1, NULL, "internal", m);
            return 1;
        }
        s->preemptions++;
        minc(s, "num_preemptions_total", 1);
        requeue(s, victim, 1);
        if (victim == q) return 1;
    }
    return 0;
}

/* ---- building a step --------------------------------------------------------------------- */

static void fill_sampling(const seq *q, Duet__SamplingParams *sp) {
    const eng_params *p = &q->prm;
    duet__sampling_params__init(sp);
    sp->temperature = p->temperature;
    sp->top_p = p->top_p;
    sp->top_k = p->top_k;
    sp->min_p = p->min_p;
    sp->seed = p->seed;
    sp->stream = p->choice;
    sp->n_logprobs = p->n_logprobs > 0 ? (uint32_t)p->n_logprobs : 0;
    sp->repetition_penalty = p->repetition_penalty;
    sp->presence_penalty = p->presence_penalty;
    sp->frequency_penalty = p->frequency_penalty;
    sp->prompt_len = (uint32_t)q->n_prompt;
    sp->n_bias_ids = sp->n_bias_values = (size_t)p->n_bias;
    sp->bias_ids = q->bias_ids;
    sp->bias_values = q->bias_values;
    if (!q->step_sample) return; /* the constraint is for the sampled position only */
    sp->n_banned_ids = (size_t)(q->con.n_banned > 0 ? q->con.n_banned : 0);
    sp->banned_ids = (int32_t *)q->con.banned;
    sp->n_allowed_ids = (size_t)(q->con.n_allowed > 0 ? q->con.n_allowed : 0);
    sp->allowed_ids = (int32_t *)q->con.allowed;
}

static int is_running(const sched *s, const seq *q) {
    for (const seq *x = s->running; x; x = x->next)
        if (x == q) return 1;
    return 0;
}

/* Block saves for the chunk [pos, pos + len): every block boundary it crosses whose hash is
 * not cached yet gets a pending entry (when units allow). */
static void plan_saves(sched *s, plan_item *it) {
    seq *q = it->q;
    if (!kvm_enabled(s->kv)) return;
    int B = (int)kvm_block_size(s->kv), end = q->pos + q->step_len;
    for (int b = (q->pos / B + 1) * B; b <= end; b += B) {
        int k = b / B - 1;
        uint64_t h = seq_hash(s, q, k), parent = k ? seq_hash(s, q, k - 1) : 0, id;
        if (!kvm_save(s->kv, parent, h, &id)) continue;
        if (!it->saves) it->saves = xcalloc((size_t)(end - q->pos) / (size_t)B + 1, sizeof *it->saves);
        Duet__BlockSave *bs = &it->saves[it->n_saves++];
        duet__block_save__init(bs);
        bs->block_id = id;
        bs->end_pos = (uint32_t)b;
    }
}

/* Decides q's chunk within *budget tokens (a decode gets at least 1 even past the budget).
 * admission: a fresh admission (no preemption for it; restore = its cached chain). Returns 1
 * when q got a chunk (pushed onto the plan), 0 when not (q ended, was preempted, or — for an
 * admission — no units: q is then still in the running list, untouched). */
static int plan_seq(sched *s, seq *q, int *budget, int admission, uint64_t *restore,
                    uint32_t n_restore) {
    int room = *budget > 0 ? *budget : 1;
    if (q->n_toks - q->pos <= room && ask_constraint(s, q)) return 0; /* ended */
    int remaining = q->n_toks - q->pos;
    int len = remaining < room ? remaining : room;
    if (admission) {
        if (kvm_seq_grow(s->kv, &q->held, (uint32_t)(q->pos + len))) return 0;
    } else if (reserve(s, q, q->pos + len)) {
        return 0;
    }
    q->in_step = 1;
    q->step_len = len;
    q->step_sample = q->pos + len == q->n_toks;
    *budget -= len;
    s->plan_tokens += len;
    if (remaining > 1 || q->n_out == 0) s->plan_decode_only = 0;
    if (s->n_plan == s->cap_plan)
        s->plan = xrealloc(s->plan, (size_t)(s->cap_plan = s->cap_plan * 2 + 16) * sizeof *s->plan);
    plan_item *it = &s->plan[s->n_plan++];
    *it = (plan_item){.q = q, .restore = restore, .n_restore = n_restore};
    plan_saves(s, it);
    return 1;
}

static void step_done(void *arg, int ok, const Duet__StepResult *res, const char *msg);
static void fail_plan(sched *s, const char *code, const char *msg);

static void clear_plan(sched *s) {
    for (int i = 0; i < s->n_plan; i++) {
        free(s->plan[i].restore);
        free(s->plan[i].saves);
    }
    s->n_plan = 0;
}

/* Admits the head of the waiting queue through the prefix cache. 1 = admitted with a chunk,
 * 0 = stop admitting for this step. */
static int admit_one(sched *s, int *budget) {
    seq *q = s->waiting;
    uint32_t B = kvm_block_size(s->kv);
    uint32_t maxb = (uint32_t)(q->n_toks - 1) / B;
    uint64_t *hs = xmalloc((maxb + 1) * sizeof *hs), *ids = xmalloc((maxb + 1) * sizeof *ids);
    uint32_t hit = kvm_lookup(s->kv, q->toks, (uint32_t)q->n_toks, hs, ids);
    /* the next block is being computed in this very step (the other choices of an n > 1
     * request, or a resend racing its original): wait one step and take it from the cache */
    if (s->n_plan && !q->canary &&
        kvm_next_pending(s->kv, q->toks, (uint32_t)q->n_toks, hit ? hs[hit - 1] : 0, hit)) {
        free(hs);
        free(ids);
        return 0;
    }
    if ((int)hit > q->n_hashes) { /* the lookup computed the same chain */
        if ((int)hit > q->cap_hashes)
            q->hashes = xrealloc(q->hashes, (size_t)(q->cap_hashes = (int)hit + 16) *
                                                sizeof *q->hashes);
        memcpy(q->hashes, hs, hit * sizeof *hs);
        q->n_hashes = (int)hit;
    }
    free(hs);
    s->waiting = q->next;
    s->n_waiting--;
    append(&s->running, q);
    s->n_running++;
    q->seq_id = ++s->next_seq_id;
    q->pos = (int)(hit * B);
    if (!plan_seq(s, q, budget, 1, hit ? ids : NULL, hit)) {
        free(ids);
        if (!is_running(s, q)) return 1; /* ended by forced tokens: go on admitting */
        if (s->n_plan == 0 && s->n_running == 1) {
            kvm_stats k;
            kvm_get_stats(s->kv, &k);
            char m[300];
            snprintf(m, sizeof m,
                     "the request needs more KV blocks than the workers hold (%u blocks of %u "
                     "tokens): shorten the prompt or give the workers more KV memory",
                     k.blocks_total, k.block_size);
            seq_end(s, q, 1, NULL, "internal", m);
            return 1;
        }
        /* no units now: back to the head of the queue */
        unlink_seq(&s->running, q);
        s->n_running--;
        q->seq_id = 0;
        q->pos = 0;
        q->next = s->waiting;
        s->waiting = q;
        s->n_waiting++;
        return 0;
    }
    if (!hit) free(ids);
    q->cached_tokens = q->admitted_once ? q->cached_tokens : (int)(hit * B);
    if (!q->canary) { /* the canary's prompt would only blur the hit rate */
        kvm_note_query(s->kv, (uint64_t)q->n_toks, (uint64_t)hit * B);
        minc(s, "prefix_cache_queries_total", q->n_toks);
        minc(s, "prefix_cache_hits_total", (double)hit * B);
    }
    double t = coord_now_s();
    q->t_admitted = t;
    if (!q->admitted_once) {
        q->admitted_once = 1;
        if (!q->canary) {
            mobs(s, "request_queue_time_seconds", t - q->t_arrival);
            minc(s, "prompt_tokens_total", q->n_prompt);
        }
    }
    return 1;
}

/* Reaps cancelled requests, then builds and sends the next step when the pool is free. */
static void schedule(sched *s) {
    if (s->n_plan) return; /* a step is in flight */
    for (seq *q = s->waiting, *nx; q; q = nx) {
        nx = q->next;
        if (q->abort || !q->sink.connected(q->sink.user)) seq_end(s, q, 0, "abort", NULL, NULL);
    }
    for (seq *q = s->running, *nx; q; q = nx) {
        nx = q->next;
        if (q->abort || !q->sink.connected(q->sink.user)) seq_end(s, q, 1, "abort", NULL, NULL);
    }
    update_gauges(s);
    if (!pool_can_step(s->pool) || (!s->running && !s->waiting)) return;
    double t0 = coord_now_s();
    int budget = s->cfg.max_batched_tokens;
    s->plan_tokens = 0;
    s->plan_decode_only = 1;
    /* 1. decodes, 2. running prefills, each in admission order. Sequences may be preempted or
     * end while planning: walk a snapshot and check membership. */
    int n0 = s->n_running, k = 0;
    seq **snap = xmalloc((size_t)(n0 ? n0 : 1) * sizeof *snap);
    for (seq *q = s->running; q; q = q->next) snap[k++] = q;
    for (int phase = 0; phase < 2; phase++)
        for (int i = 0; i < n0; i++) {
            seq *q = snap[i];
            if (!q || !is_running(s, q)) {
                snap[i] = NULL;
                continue;
            }
            if (q->in_step) continue;
            int decode = q->n_out > 0 && q->n_toks - q->pos == 1;
            if (decode != (phase == 0) || (phase == 1 && budget <= 0)) continue;
            plan_seq(s, q, &budget, 0, NULL, 0);
        }
    free(snap);
    /* 3. admissions by (priority, arrival) */
    while (s->waiting && s->n_running < s->cfg.max_num_seqs && budget > 0)
        if (!admit_one(s, &budget)) break;
    if (!s->n_plan) {
        kvm_step_end(s->kv, 1); /* nothing planned: release lookup pins */
        update_gauges(s);
        return;
    }
    /* pack */
    int n = s->n_plan;
    Duet__SeqChunk *ch = xcalloc((size_t)n, sizeof *ch);
    Duet__SeqChunk **cp = xmalloc((size_t)n * sizeof *cp);
    Duet__SamplingParams *sp = xcalloc((size_t)n, sizeof *sp);
    size_t n_saves = 0;
    for (int i = 0; i < n; i++) n_saves += (size_t)s->plan[i].n_saves;
    Duet__BlockSave **save_ptrs = xmalloc((n_saves ? n_saves : 1) * sizeof *save_ptrs);
    size_t si = 0;
    for (int i = 0; i < n; i++) {
        plan_item *it = &s->plan[i];
        seq *q = it->q;
        duet__seq_chunk__init(&ch[i]);
        ch[i].seq_id = q->seq_id;
        ch[i].start_pos = (uint32_t)q->pos;
        ch[i].n_token_ids = (size_t)q->step_len;
        ch[i].token_ids = q->toks + q->pos;
        ch[i].sample = q->step_sample;
        fill_sampling(q, &sp[i]);
        ch[i].sampling = &sp[i];
        ch[i].return_logits = q->logits_fn && q->step_sample;
        if (it->n_restore) {
            ch[i].n_restore_blocks = it->n_restore;
            ch[i].restore_blocks = it->restore;
            ch[i].n_history = (size_t)q->pos;
            ch[i].history = q->toks;
        }
        if (it->n_saves) {
            ch[i].n_save_blocks = (size_t)it->n_saves;
            ch[i].save_blocks = save_ptrs + si;
            for (int j = 0; j < it->n_saves; j++) save_ptrs[si++] = &it->saves[j];
        }
        cp[i] = &ch[i];
    }
    Duet__StepPlan plan = DUET__STEP_PLAN__INIT;
    plan.n_chunks = (size_t)n;
    plan.chunks = cp;
    uint64_t *drops = NULL;
    plan.n_drop_blocks = kvm_take_drops(s->kv, &drops);
    plan.drop_blocks = drops;
    char err[300];
    s->step_sent = coord_now_s();
    int rc = pool_step(s->pool, &plan, step_done, s, err, sizeof err);
    free(ch);
    free(cp);
    free(sp);
    free(save_ptrs);
    free(drops);
    s->build_us = (coord_now_s() - t0) * 1e6;
    update_gauges(s);
    if (rc) fail_plan(s, "internal", err);
}

/* ---- applying a step's result -------------------------------------------------------------- */

static const Duet__SeqResult *find_result(const Duet__StepResult *res, int i, uint64_t id) {
    if ((size_t)i < res->n_results && res->results[i]->seq_id == id) return res->results[i];
    for (size_t j = 0; j < res->n_results; j++)
        if (res->results[j]->seq_id == id) return res->results[j];
    return NULL;
}

/* Every sequence of the step ends with code: the step failed or could not be sent. */
static void fail_plan(sched *s, const char *code, const char *msg) {
    kvm_step_end(s->kv, 0);
    for (int i = 0; i < s->n_plan; i++) s->plan[i].q->in_step = 0;
    for (int i = 0; i < s->n_plan; i++) seq_end(s, s->plan[i].q, 1, NULL, code, msg);
    clear_plan(s);
    update_gauges(s);
}

static void step_done(void *arg, int ok, const Duet__StepResult *res, const char *msg) {
    sched *s = arg;
    double t0 = coord_now_s();
    int n = s->n_plan;
    plan_item *items = s->plan;
    /* the items stay valid below; new plans are not built until n_plan is 0 again */
    if (!ok) {
        char m[700];
        snprintf(m, sizeof m, "the step failed: %s", msg);
        fail_plan(s, "worker_failure", m);
        return;
    }
    kvm_step_end(s->kv, 1);
    double wall = t0 - s->step_sent;
    s->last_step_time = t0;
    s->last_step_ms = wall * 1000;
    if (s->m) {
        metrics_observe(s->m, "iteration_tokens_total", NULL, s->plan_tokens);
        metrics_set(s->m, "last_step_timestamp_seconds", NULL, wall_now());
    }
    for (int i = 0; i < n; i++) {
        seq *q = items[i].q;
        q->in_step = 0;
        q->pos += q->step_len;
        if (!q->step_sample) continue;
        const Duet__SeqResult *r = find_result(res, i, q->seq_id);
        char m[300];
        m[0] = 0;
        if (!r || r->token_id < 0)
            snprintf(m, sizeof m, "worker w0 returned no token for sequence %llu",
                     (unsigned long long)q->seq_id);
        else if (q->logits_fn &&
                 (r->n_logits == 0 || r->n_logits % (size_t)q->step_len != 0))
            snprintf(m, sizeof m,
                     "worker w0 returned %zu logits for a %d-token chunk of sequence %llu",
                     r->n_logits, q->step_len, (unsigned long long)q->seq_id);
        if (m[0]) {
            seq_end(s, q, 1, NULL, "internal", m);
            continue;
        }
        if (q->logits_fn) {
            size_t vocab = r->n_logits / (size_t)q->step_len;
            q->logits_fn(q->sink.user, r->logits + (size_t)(q->step_len - 1) * vocab, vocab);
        }
        deliver(s, q, r->token_id, 0, r);
    }
    clear_plan(s);
    double t1 = coord_now_s();
    ovh *o = &s->ring[s->n_ovh++ % OVH_RING];
    *o = (ovh){.coord_us = s->build_us + (t1 - t0) * 1e6,
               .wall_us = wall * 1e6,
               .compute_us = (double)res->compute_us,
               .n_seqs = n,
               .decode_only = s->plan_decode_only};
    schedule(s);
}

/* ---- the canary ------------------------------------------------------------------------------ */

static int canary_token(void *user, const eng_token *t) {
    (void)user;
    (void)t;
    return 0;
}
static void canary_end(void *user, const char *finish, const char *code, const char *msg) {
    (void)user;
    (void)finish;
    (void)code;
    (void)msg;
}
static int canary_connected(void *user) {
    (void)user;
    return 1;
}

static seq *seq_new(sched *s, const eng_params *p, const eng_sink *sink);

static void start_canary(sched *s) {
    if (s->canary_queued) return;
    eng_params p;
    eng_params_init(&p);
    p.prompt = CANARY_PROMPT;
    p.n_prompt = (int)(sizeof CANARY_PROMPT / sizeof *CANARY_PROMPT);
    p.max_tokens = 1;
    p.temperature = 0;
    p.priority = INT_MIN;
    p.request_id = "canary";
    eng_sink k = {.on_token = canary_token, .on_end = canary_end,
                  .connected = canary_connected, .user = s};
    seq *q = seq_new(s, &p, &k);
    q->canary = 1;
    s->canary_queued = 1;
    enqueue(s, q);
}

/* ---- public ------------------------------------------------------------------------------- */

sched *sched_new(pool *p, metrics *m, const sched_cfg *cfg) {
    sched *s = xcalloc(1, sizeof *s);
    s->pool = p;
    s->m = m;
    s->cfg = *cfg;
    if (s->cfg.max_batched_tokens < 1) s->cfg.max_batched_tokens = 2048;
    if (s->cfg.max_num_seqs < 1) s->cfg.max_num_seqs = 1;
    s->kv = kvm_new(cfg->block_size);
    update_gauges(s);
    return s;
}

void sched_free(sched *s) {
    if (!s) return;
    s->cfg.drained = NULL;
    clear_plan(s);
    for (seq *q = s->running; q; q = q->next) q->in_step = 0;
    while (s->waiting) seq_end(s, s->waiting, 0, NULL, "internal", "the coordinator is shutting down");
    while (s->running) {
        seq *q = s->running;
        q->seq_id = 0; /* nothing to release: the workers keep their own state */
        seq_end(s, q, 1, NULL, "internal", "the coordinator is shutting down");
    }
    free(s->plan);
    kvm_free(s->kv);
    free(s);
}

static seq *seq_new(sched *s, const eng_params *p, const eng_sink *sink) {
    seq *q = xcalloc(1, sizeof *q);
    q->sink = *sink;
    q->rid = xstrdup(p->request_id ? p->request_id : "");
    q->cap_toks = p->n_prompt + (p->max_tokens < 64 ? p->max_tokens : 64) + 1;
    q->toks = xmalloc((size_t)q->cap_toks * sizeof *q->toks);
    memcpy(q->toks, p->prompt, (size_t)p->n_prompt * sizeof *q->toks);
    q->n_toks = q->n_prompt = p->n_prompt;
    q->max_tokens = p->max_tokens;
    int room = s->cfg.max_seq_len - p->n_prompt;
    if (q->max_tokens > room) q->max_tokens = room;
    if (q->max_tokens < 1) q->max_tokens = 1;
    q->prm = *p;
    q->prm.prompt = NULL;
    q->prm.request_id = NULL;
    if (p->n_bias > 0) {
        q->bias_ids = xmalloc((size_t)p->n_bias * sizeof *q->bias_ids);
        q->bias_values = xmalloc((size_t)p->n_bias * sizeof *q->bias_values);
        memcpy(q->bias_ids, p->bias_ids, (size_t)p->n_bias * sizeof *q->bias_ids);
        memcpy(q->bias_values, p->bias_values, (size_t)p->n_bias * sizeof *q->bias_values);
    } else {
        q->prm.n_bias = 0;
    }
    q->prm.bias_ids = q->bias_ids;
    q->prm.bias_values = q->bias_values;
    q->priority = p->priority;
    q->arrival = ++s->next_arrival;
    q->t_arrival = coord_now_s();
    q->deadline = q->t_arrival + s->cfg.recover_timeout_s;
    return q;
}

int sched_submit(sched *s, const eng_params *p, const eng_sink *sink, sched_logits_fn logits,
                 const char **code, char *msg, size_t msglen) {
    if (s->draining) {
        s->rejected++;
        *code = "server_draining";
        snprintf(msg, msglen, "the server is draining and admits no new requests");
        return -1;
    }
    if (pool_get_state(s->pool) == POOL_FAILED) {
        s->rejected++;
        *code = "no_workers";
        snprintf(msg, msglen, "the worker group could not be started");
        return -1;
    }
    if (s->n_waiting - (s->waiting && s->waiting->canary) >= s->cfg.max_waiting) {
        s->rejected++;
        *code = "server_overloaded";
        snprintf(msg, msglen,
                 "the server is overloaded: %d requests are already waiting (--max-waiting %d); "
                 "retry later",
                 s->n_waiting, s->cfg.max_waiting);
        return -1;
    }
    if (!p->prompt || p->n_prompt < 1) {
        s->rejected++;
        *code = "internal";
        snprintf(msg, msglen, "the request has no prompt tokens");
        return -1;
    }
    seq *q = seq_new(s, p, sink);
    q->logits_fn = logits;
    enqueue(s, q);
    schedule(s);
    return 0;
}

static int api_submit(void *ctx, const eng_params *p, const eng_sink *sink, const char **code,
                      char *msg, size_t msglen) {
    return sched_submit(ctx, p, sink, NULL, code, msg, msglen);
}

static void api_health(void *ctx, eng_health *h) {
    sched *s = ctx;
    double t = coord_now_s();
    *h = (eng_health){.state = sched_state(s),
                      .workers_up = pool_get_state(s->pool) == POOL_READY,
                      .warm = s->warm,
                      .running = s->n_running,
                      .waiting = s->n_waiting,
                      .last_step_age_s = s->last_step_time > 0 ? t - s->last_step_time : -1,
                      .last_success_age_s = s->last_success > 0 ? t - s->last_success : -1,
                      .last_failure_age_s = s->last_failure > 0 ? t - s->last_failure : -1};
}

void sched_reconfigure(sched *s, int max_waiting, int max_batched_tokens,
                       double recover_timeout_s, double stall_timeout_s) {
    s->cfg.max_waiting = max_waiting < 0 ? 0 : max_waiting;
    s->cfg.max_batched_tokens = max_batched_tokens < 1 ? 2048 : max_batched_tokens;
    s->cfg.recover_timeout_s = recover_timeout_s;
    s->cfg.stall_timeout_s = stall_timeout_s;
}

eng_api sched_api(sched *s) {
    return (eng_api){.ctx = s, .submit = api_submit, .health = api_health};
}

void sched_pool_event(sched *s, pool_event ev) {
    if (ev == POOL_EV_READY) {
        uint32_t blocks, cost;
        uint64_t bytes;
        pool_kv_budget(s->pool, &blocks, &cost, &bytes);
        kvm_reset(s->kv, blocks, cost, bytes);
        if (blocks)
            coord_log("KV budget: %u blocks of %u tokens (%.1f MiB each), a cached block costs %u",
                      blocks, kvm_block_size(s->kv), (double)bytes / 1048576.0, cost);
        else
            coord_log("the workers report no KV budget: prefix cache off, no KV accounting");
        s->warm = 0;
        start_canary(s);
        schedule(s);
    } else if (ev == POOL_EV_DOWN) {
        /* the group's state is gone: sequences not failed with the step recompute later */
        s->warm = 0;
        while (s->running) requeue(s, s->running, 0);
        kvm_reset(s->kv, 0, 1, 0);
        update_gauges(s);
    }
}

void sched_tick(sched *s) {
    double t = coord_now_s();
    if (s->draining && s->drain_deadline > 0 && t > s->drain_deadline) {
        coord_log("drain timeout: aborting %d requests", in_flight(s));
        s->drain_deadline = 0;
        sched_abort_all(s);
    }
    if (pool_get_state(s->pool) != POOL_READY)
        for (seq *q = s->waiting, *nx; q; q = nx) {
            nx = q->next;
            if (t > q->deadline)
                seq_end(s, q, 0, NULL, "no_workers",
                        "no healthy worker group within --worker-recover-timeout; see duetctl "
                        "status for the workers' errors");
        }
    schedule(s);
    check_drained(s);
}

void sched_set_draining(sched *s, int on, double timeout_s) {
    if (on && !s->draining) coord_log("draining: %d requests in flight", in_flight(s));
    if (!on && s->draining) coord_log("resuming admission");
    s->draining = on;
    s->drain_deadline = on && timeout_s > 0 ? coord_now_s() + timeout_s : 0;
    s->drained_told = 0;
    update_gauges(s);
    if (on) check_drained(s);
}

int sched_draining(const sched *s) { return s->draining; }
int sched_in_flight(const sched *s) { return in_flight(s); }

void sched_abort_all(sched *s) {
    for (seq *q = s->waiting, *nx; q; q = nx) {
        nx = q->next;
        if (!q->canary) seq_end(s, q, 0, "abort", NULL, NULL);
    }
    for (seq *q = s->running; q; q = q->next) q->abort = !q->canary;
    schedule(s);
    check_drained(s);
}

static int rid_matches(const seq *q, const char *want) {
    if (q->canary) return 0;
    if (!strcmp(q->rid, want)) return 1;
    if (!strncmp(want, "chatcmpl-", 9)) return !strcmp(q->rid, want + 9);
    if (!strncmp(want, "cmpl-", 5)) return !strcmp(q->rid, want + 5);
    return 0;
}

int sched_abort(sched *s, const char *request_id) {
    int found = 0;
    for (seq *q = s->running; q; q = q->next)
        if (rid_matches(q, request_id)) q->abort = found = 1;
    for (seq *q = s->waiting; q; q = q->next)
        if (rid_matches(q, request_id)) q->abort = found = 1;
    if (!found) return -1;
    schedule(s); /* waiting ones end now, running ones at the step boundary */
    return 0;
}

void sched_flush_prefix_cache(sched *s, uint64_t *freed_tokens, uint64_t *freed_bytes) {
    uint64_t *ids;
    size_t n = kvm_flush(s->kv, &ids);
    kvm_stats k;
    kvm_get_stats(s->kv, &k);
    pool_release_blocks(s->pool, ids, n);
    free(ids);
    *freed_tokens = (uint64_t)n * k.block_size;
    *freed_bytes = (uint64_t)n * k.snap_cost * k.block_bytes;
    if (n) coord_log("flush-prefix-cache: dropped %zu cached blocks", n);
    update_gauges(s);
}

void sched_note_rejected(sched *s) { s->rejected++; }

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The coordinator's own time per step over the recent steps of the most frequent kind (batch
 * size, decode-only or not) in the ring: the steady state the overhead benchmark reads. */
static json_t *overhead_json(const sched *s) {
    size_t n = s->n_ovh < OVH_RING ? (size_t)s->n_ovh : OVH_RING;
    if (!n) return json_null();
    const ovh *last = NULL;
    int best = 0;
    for (size_t i = 0; i < n; i++) {
        int cnt = 0;
        for (size_t j = 0; j < n; j++)
            cnt += s->ring[j].n_seqs == s->ring[i].n_seqs &&
                   s->ring[j].decode_only == s->ring[i].decode_only;
        if (cnt > best) {
            best = cnt;
            last = &s->ring[i];
        }
    }
    double c[OVH_RING], w[OVH_RING], d[OVH_RING], sum = 0;
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        const ovh *o = &s->ring[i];
        if (o->n_seqs != last->n_seqs || o->decode_only != last->decode_only) continue;
        c[m] = o->coord_us;
        w[m] = o->wall_us;
        d[m] = o->wall_us - o->compute_us;
        sum += o->coord_us;
        m++;
    }
    qsort(c, m, sizeof *c, cmp_double);
    qsort(w, m, sizeof *w, cmp_double);
    qsort(d, m, sizeof *d, cmp_double);
    return json_pack("{s:i, s:i, s:b, s:f, s:f, s:f, s:f}", "steps", (int)m, "seqs", last->n_seqs,
                     "decode_only", last->decode_only, "coord_us_p50", c[m / 2], "coord_us_mean",
                     sum / (double)m, "wall_us_p50", w[m / 2], "wall_minus_compute_us_p50",
                     d[m / 2]);
}

void sched_status(sched *s, json_t *o, int verbose) {
    double t = coord_now_s();
    json_object_set_new(o, "last_step_age_ms",
                        s->last_step_time > 0
                            ? json_integer((json_int_t)((t - s->last_step_time) * 1000))
                            : json_null());
    json_object_set_new(o, "last_step_ms",
                        s->last_step_time > 0 ? json_real(s->last_step_ms) : json_null());
    json_object_set_new(o, "warm", json_boolean(s->warm));
    json_object_set_new(o, "queue", json_pack("{s:i, s:i, s:i, s:i, s:i}", "running",
                                              s->n_running, "waiting", s->n_waiting,
                                              "max_running", s->cfg.max_num_seqs, "max_waiting",
                                              s->cfg.max_waiting, "max_num_batched_tokens",
                                              s->cfg.max_batched_tokens));
    kvm_stats k;
    kvm_get_stats(s->kv, &k);
    json_object_set_new(
        o, "kv",
        json_pack("{s:f, s:I, s:I, s:i, s:I, s:i}", "usage_perc",
                  k.blocks_total ? (double)k.used_blocks / k.blocks_total : 0.0, "used_tokens",
                  (json_int_t)k.used_blocks * k.block_size, "capacity_tokens",
                  (json_int_t)k.blocks_total * k.block_size, "block_size", (int)k.block_size,
                  "live_tokens", (json_int_t)k.live_blocks * k.block_size, "snapshot_block_cost",
                  (int)k.snap_cost));
    json_object_set_new(
        o, "prefix_cache",
        json_pack("{s:f, s:I, s:i, s:I, s:I, s:I}", "hit_rate",
                  k.queries ? (double)k.hits / (double)k.queries : 0.0, "cached_tokens",
                  (json_int_t)k.entries * k.block_size, "entries", (int)k.entries,
                  "queried_tokens", (json_int_t)k.queries, "hit_tokens", (json_int_t)k.hits,
                  "evictions", (json_int_t)k.evictions));
    json_object_set_new(o, "counters",
                        json_pack("{s:I, s:I, s:I, s:I, s:I}", "completed",
                                  (json_int_t)s->completed, "failed", (json_int_t)s->failed,
                                  "aborted", (json_int_t)s->aborted, "rejected",
                                  (json_int_t)s->rejected, "preempted",
                                  (json_int_t)s->preemptions));
    json_object_set_new(o, "step_overhead", overhead_json(s));
    if (verbose) {
        json_t *reqs = json_array();
        for (int pass = 0; pass < 2; pass++)
            for (seq *q = pass ? s->waiting : s->running; q; q = q->next) {
                if (q->canary) continue;
                json_array_append_new(
                    reqs, json_pack("{s:s, s:s, s:i, s:i, s:i, s:i, s:i}", "request_id", q->rid,
                                    "state", pass ? "waiting" : "running", "prompt_tokens",
                                    q->n_prompt, "generated", q->n_out, "max_tokens",
                                    q->max_tokens, "cached_tokens", q->cached_tokens,
                                    "priority", q->priority));
            }
        json_object_set_new(o, "requests", reqs);
    }
}
