/* test_worker.c — integration tests of the real duet-worker binary over real loopback sockets.
 *
 * Why: the worker's promises are about processes and sockets — it listens before any
 * coordinator exists, refuses wrong tokens, versions, ranks, world sizes and models with a
 * logged reason and keeps serving, survives garbage, computes the same logits as the engine
 * in-process, and exits 0 on SIGTERM. So each test starts the binary (argv[1]) on a free port
 * with the tiny checkpoint (argv[2]) and speaks the protocol through tests/rpc/rpc_client.
 * Every wait is a poll() on a socket or pipe with a deadline; nothing sleeps.
 */
#include <check.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "common/err.h"
#include "tests/rpc/rpc_client.h"
#include "worker/model.h"

static const char *worker_bin, *model_dir;
static char token_path[256], bad_mode_path[256], tmpdir[128];
static const char *TOKEN = "test-token-0123456789abcdef";
#define T_MS 30000 /* generous deadline for anything the worker must do (ASan build) */

/* ---- fixtures ---------------------------------------------------------------------------- */

static void start(wproc *w, const char *extra1, const char *extra2) {
    const char *argv[16] = {"--rank", "0", "--world-size", "1", "--model", model_dir,
                            "--auth-token-file", token_path, "--listen", "127.0.0.1:0",
                            "--threads", "1", extra1, extra2, NULL};
    ck_assert_int_eq(wproc_start(w, worker_bin, argv, T_MS), 0);
    ck_assert_int_gt(w->port, 0);
}

static void stop_ok(wproc *w) {
    int st = wproc_stop(w, SIGTERM, T_MS);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "worker exit status %d", st);
}

static uint64_t model_fingerprint(void) {
    static uint64_t fp;
    if (!fp) {
        char err[512];
        be *b = be_cpu_create(1);
        dv4_model *m;
        ck_assert_msg(dv4_load(model_dir, b, NULL, &m, err, sizeof err) == 0, "%s", err);
        fp = dv4_fingerprint(m);
        dv4_free(m);
        b->ops->destroy(b);
    }
    return fp;
}

/* Connects and completes a correct handshake; asserts it was accepted. */
static void connect_ok(rcli *c, const wproc *w) {
    ck_assert_int_eq(rcli_connect(c, w->port, T_MS), 0);
    Duet__HelloReply *r = rcli_handshake(c, TOKEN, RPC_PROTOCOL_VERSION, 0, 1, 0, T_MS);
    ck_assert_ptr_nonnull(r);
    ck_assert_msg(r->ok, "handshake refused: %s", r->error);
    ck_assert_uint_eq(r->model_fingerprint, model_fingerprint());
    ck_assert_str_eq(r->backend, "cpu");
    duet__hello_reply__free_unpacked(r, NULL);
}

static void load_ok(rcli *c, int expect_start) {
    Duet__LoadModel lm = DUET__LOAD_MODEL__INIT;
    lm.max_seqs = 4;
    lm.max_seq_len = 64;
    ck_assert_int_eq(rcli_send(c, RPC_LOAD_MODEL, &lm.base), 0);
    Duet__LoadProgress *p = rcli_expect(c, RPC_LOAD_PROGRESS, T_MS);
    ck_assert_ptr_nonnull(p);
    if (expect_start) ck_assert(!p->done);
    uint64_t last = 0;
    while (!p->done) { /* start, then per-layer progress: monotonic, within the total */
        ck_assert(p->ok);
        ck_assert_uint_ge(p->bytes_done, last);
        ck_assert_uint_le(p->bytes_done, p->bytes_total);
        last = p->bytes_done;
        duet__load_progress__free_unpacked(p, NULL);
        p = rcli_expect(c, RPC_LOAD_PROGRESS, T_MS);
        ck_assert_ptr_nonnull(p);
    }
    ck_assert_msg(p->done && p->ok, "LoadModel failed: %s", p->error);
    ck_assert_uint_gt(p->rank_weight_bytes, 0);
    duet__load_progress__free_unpacked(p, NULL);
}

/* Sends one StepPlan of a single chunk and returns the result. */
static Duet__StepResult *step1(rcli *c, uint64_t step, uint64_t seq, uint32_t pos,
                               const int32_t *ids, size_t n, int sample, float temp,
                               uint64_t seed, int ret_logits) {
    Duet__SamplingParams sp = DUET__SAMPLING_PARAMS__INIT;
    sp.temperature = temp;
    sp.seed = seed;
    sp.n_logprobs = 3;
    Duet__SeqChunk ch = DUET__SEQ_CHUNK__INIT;
    ch.seq_id = seq;
    ch.start_pos = pos;
    ch.token_ids = (int32_t *)ids;
    ch.n_token_ids = n;
    ch.sample = sample;
    ch.sampling = &sp;
    ch.return_logits = ret_logits;
    Duet__SeqChunk *chs[1] = {&ch};
    Duet__StepPlan p = DUET__STEP_PLAN__INIT;
    p.step_id = step;
    p.chunks = chs;
    p.n_chunks = 1;
    ck_assert_int_eq(rcli_send(c, RPC_STEP_PLAN, &p.base), 0);
    Duet__StepResult *r = rcli_expect(c, RPC_STEP_RESULT, T_MS);
    ck_assert_ptr_nonnull(r);
    ck_assert_uint_eq(r->step_id, step);
    return r;
}

static Duet__Stats *heartbeat(rcli *c, uint64_t seq) {
    Duet__Heartbeat hb = DUET__HEARTBEAT__INIT;
    hb.seq = seq;
    ck_assert_int_eq(rcli_send(c, RPC_HEARTBEAT, &hb.base), 0);
    Duet__Stats *s = rcli_expect(c, RPC_STATS, T_MS);
    ck_assert_ptr_nonnull(s);
    ck_assert_uint_eq(s->seq, seq);
    return s;
}

static double max_rel_err(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > num) num = d;
        if (fabs(b[i]) > den) den = fabs(b[i]);
    }
    return den > 0 ? num / den : num;
}

/* ---- (a) handshake, load, steps, logits equal the in-process engine ---------------------- */

START_TEST(step_matches_engine) {
    wproc w;
    start(&w, NULL, NULL);
    rcli c;
    connect_ok(&c, &w);
    /* a StepPlan before LoadModel is an error result, not a crash */
    const int32_t ids[5] = {1, 2, 3, 4, 5};
    Duet__StepResult *r = step1(&c, 1, 7, 0, ids, 5, 1, 0, 0, 0);
    ck_assert(!r->ok);
    ck_assert_ptr_nonnull(strstr(r->error, "LoadModel"));
    duet__step_result__free_unpacked(r, NULL);
    load_ok(&c, 1);

    /* in-process reference on the same checkpoint, same thread count */
    char err[512];
    be *b = be_cpu_create(1);
    dv4_model *m;
    ck_assert_int_eq(dv4_load(model_dir, b, NULL, &m, err, sizeof err), 0);
    const int vocab = dv4_cfg(m)->vocab_size;
    dv4_seq *s;
    ck_assert_int_eq(dv4_seq_new(m, 64, &s, err, sizeof err), 0);
    float *ref = xmalloc((size_t)5 * vocab * sizeof *ref);
    dv4_chunk ch = {s, ids, 5, DV4_LOGITS_ALL};
    ck_assert_int_eq(dv4_forward(m, &ch, 1, ref, err, sizeof err), 0);

    r = step1(&c, 2, 7, 0, ids, 5, 1, 0, 0, 1);
    ck_assert_msg(r->ok, "%s", r->error);
    ck_assert_uint_eq(r->n_results, 1);
    Duet__SeqResult *q = r->results[0];
    ck_assert_uint_eq(q->seq_id, 7);
    ck_assert_uint_eq(q->n_logits, (size_t)5 * vocab);
    double e = max_rel_err(q->logits, ref, (size_t)5 * vocab);
    ck_assert_msg(e <= 1e-6, "prefill logits differ from the engine: rel err %g", e);
    /* greedy = argmax of the last row; logprob is its log-softmax */
    const float *last = ref + (size_t)4 * vocab;
    int best = 0;
    for (int i = 1; i < vocab; i++)
        if (last[i] > last[best]) best = i;
    ck_assert_int_eq(q->token_id, best);
    ck_assert(q->logprob <= 0 && q->logprob > -30);
    ck_assert_uint_eq(q->n_top_ids, 3);
    ck_assert_int_eq(q->top_ids[0], best);
    ck_assert_float_eq_tol(q->top_logprobs[0], q->logprob, 1e-6);
    int32_t next = q->token_id;
    duet__step_result__free_unpacked(r, NULL);

    /* decode one position: the worker's sequence state must match the engine's */
    dv4_chunk ch2 = {s, &next, 1, DV4_LOGITS_ALL};
    ck_assert_int_eq(dv4_forward(m, &ch2, 1, ref, err, sizeof err), 0);
    r = step1(&c, 3, 7, 5, &next, 1, 1, 0, 0, 1);
    ck_assert_msg(r->ok, "%s", r->error);
    e = max_rel_err(r->results[0]->logits, ref, (size_t)vocab);
    ck_assert_msg(e <= 1e-6, "decode logits differ from the engine: rel err %g", e);
    duet__step_result__free_unpacked(r, NULL);
    free(ref);
    dv4_seq_free(m, s);
    dv4_free(m);
    b->ops->destroy(b);

    /* a wrong start position is an error naming the sequence; state is unchanged */
    r = step1(&c, 4, 7, 3, ids, 1, 1, 0, 0, 0);
    ck_assert(!r->ok);
    ck_assert_ptr_nonnull(strstr(r->error, "seq 7"));
    duet__step_result__free_unpacked(r, NULL);
    /* unknown sequence not at 0; token outside the vocabulary */
    r = step1(&c, 5, 99, 4, ids, 1, 1, 0, 0, 0);
    ck_assert(!r->ok);
    ck_assert_ptr_nonnull(strstr(r->error, "seq 99"));
    duet__step_result__free_unpacked(r, NULL);
    const int32_t bad_id = 1 << 30;
    r = step1(&c, 6, 8, 0, &bad_id, 1, 1, 0, 0, 0);
    ck_assert(!r->ok);
    ck_assert_ptr_nonnull(strstr(r->error, "vocabulary"));
    duet__step_result__free_unpacked(r, NULL);

    /* seeded sampling is deterministic: same seed and prompt, two sequences, same token */
    int32_t tok[2];
    for (int k = 0; k < 2; k++) {
        r = step1(&c, 10 + (uint64_t)k, 20 + (uint64_t)k, 0, ids, 5, 1, 1.0f, 42, 0);
        ck_assert_msg(r->ok, "%s", r->error);
        tok[k] = r->results[0]->token_id;
        ck_assert(tok[k] >= 0 && tok[k] < vocab);
        duet__step_result__free_unpacked(r, NULL);
    }
    ck_assert_int_eq(tok[0], tok[1]);

    /* 4 slots (LoadModel max_seqs): one more sequence fits, the next is refused */
    r = step1(&c, 12, 30, 0, ids, 2, 0, 0, 0, 0);
    ck_assert_msg(r->ok, "%s", r->error);
    ck_assert_int_eq(r->results[0]->token_id, -1); /* sample = false */
    duet__step_result__free_unpacked(r, NULL);
    r = step1(&c, 13, 31, 0, ids, 2, 0, 0, 0, 0);
    ck_assert(!r->ok);
    ck_assert_ptr_nonnull(strstr(r->error, "no free sequence slot"));
    duet__step_result__free_unpacked(r, NULL);
    /* past max_seq_len (64) */
    static const int32_t many[63] = {0};
    r = step1(&c, 14, 30, 2, many, 63, 0, 0, 0, 0);
    ck_assert(!r->ok);
    ck_assert_ptr_nonnull(strstr(r->error, "max_seq_len"));
    duet__step_result__free_unpacked(r, NULL);

    Duet__Stats *st = heartbeat(&c, 77);
    ck_assert_uint_eq(st->live_seqs, 4);
    ck_assert_uint_ge(st->steps_done, 4);
    ck_assert_uint_gt(st->rank_weight_bytes, 0);
    duet__stats__free_unpacked(st, NULL);
    /* Release goes through the job queue; an empty plan after it orders the heartbeat */
    uint64_t rel_ids[5] = {7, 20, 21, 30, 12345 /* unknown ids are ignored */};
    Duet__Release rel = DUET__RELEASE__INIT;
    rel.seq_ids = rel_ids;
    rel.n_seq_ids = 5;
    ck_assert_int_eq(rcli_send(&c, RPC_RELEASE, &rel.base), 0);
    Duet__StepPlan empty = DUET__STEP_PLAN__INIT;
    empty.step_id = 50;
    ck_assert_int_eq(rcli_send(&c, RPC_STEP_PLAN, &empty.base), 0);
    r = rcli_expect(&c, RPC_STEP_RESULT, T_MS);
    ck_assert_ptr_nonnull(r);
    ck_assert(r->ok);
    duet__step_result__free_unpacked(r, NULL);
    st = heartbeat(&c, 78);
    ck_assert_uint_eq(st->live_seqs, 0);
    duet__stats__free_unpacked(st, NULL);

    /* Shutdown: the worker exits 0 on its own */
    Duet__Shutdown sd = DUET__SHUTDOWN__INIT;
    sd.reason = "test over";
    ck_assert_int_eq(rcli_send(&c, RPC_SHUTDOWN, &sd.base), 0);
    ck_assert(rcli_wait_closed(&c, T_MS));
    rcli_close(&c);
    int code = wproc_stop(&w, 0, T_MS);
    ck_assert_msg(WIFEXITED(code) && WEXITSTATUS(code) == 0, "exit status %d", code);
    ck_assert_ptr_nonnull(strstr(w.log, "Shutdown from"));
}
END_TEST

/* ---- (a2) prefix blocks, KV budget and sampling masks through the real worker ----------- */

/* Sends LoadModel and returns the final LoadProgress (caller frees). */
static Duet__LoadProgress *load_with(rcli *c, uint32_t max_seqs, uint32_t max_len,
                                     uint32_t block) {
    Duet__LoadModel lm = DUET__LOAD_MODEL__INIT;
    lm.max_seqs = max_seqs;
    lm.max_seq_len = max_len;
    lm.block_size = block;
    ck_assert_int_eq(rcli_send(c, RPC_LOAD_MODEL, &lm.base), 0);
    Duet__LoadProgress *p;
    while ((p = rcli_expect(c, RPC_LOAD_PROGRESS, T_MS)) && !p->done)
        duet__load_progress__free_unpacked(p, NULL);
    ck_assert_ptr_nonnull(p);
    return p;
}

/* The tiny model's KV sizes at block size B and dtype dt (what the worker must report);
 * returns its vocabulary size. */
static int tiny_kv_sizes(int B, dv4_kv_dtype dt, dv4_kv_sizes *z) {
    char err[512];
    dv4_config c;
    ck_assert_msg(cfg_load(model_dir, &c, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(dv4_kv_sizes_of(&c, B, dt, z, err, sizeof err), 0);
    return c.vocab_size;
}

/* A chunk of a plan: positions [start, start + n) of tokens. */
typedef struct {
    uint64_t seq;
    uint32_t start, n;
    int sample, logits;
    const uint64_t *restore;
    size_t n_restore;
    const uint64_t *save_ids;
    const uint32_t *save_ends;
    size_t n_save;
    Duet__SamplingParams *sp;
} tchunk;

/* Sends one StepPlan of these chunks (ids from tokens[]) and drop_blocks, returns the result.
 * A restored chunk carries tokens[0, start) as its history. */
static Duet__StepResult *plan(rcli *c, uint64_t step, const int32_t *tokens, const tchunk *t,
                              size_t n, const uint64_t *drops, size_t n_drops) {
    Duet__SeqChunk ch[4], *chs[4];
    Duet__BlockSave bs[4][4], *bsp[4][4];
    ck_assert_uint_le(n, 4);
    for (size_t i = 0; i < n; i++) {
        duet__seq_chunk__init(&ch[i]);
        chs[i] = &ch[i];
        ch[i].seq_id = t[i].seq;
        ch[i].start_pos = t[i].start;
        ch[i].token_ids = (int32_t *)tokens + t[i].start;
        ch[i].n_token_ids = t[i].n;
        ch[i].sample = t[i].sample;
        ch[i].return_logits = t[i].logits;
        ch[i].sampling = t[i].sp;
        ch[i].restore_blocks = (uint64_t *)t[i].restore;
        ch[i].n_restore_blocks = t[i].n_restore;
        if (t[i].n_restore) {
            ch[i].history = (int32_t *)tokens;
            ch[i].n_history = t[i].start;
        }
        ck_assert_uint_le(t[i].n_save, 4);
        for (size_t k = 0; k < t[i].n_save; k++) {
            duet__block_save__init(&bs[i][k]);
            bs[i][k].block_id = t[i].save_ids[k];
            bs[i][k].end_pos = t[i].save_ends[k];
            bsp[i][k] = &bs[i][k];
        }
        ch[i].save_blocks = bsp[i];
        ch[i].n_save_blocks = t[i].n_save;
    }
    Duet__StepPlan p = DUET__STEP_PLAN__INIT;
    p.step_id = step;
    p.chunks = chs;
    p.n_chunks = n;
    p.drop_blocks = (uint64_t *)drops;
    p.n_drop_blocks = n_drops;
    ck_assert_int_eq(rcli_send(c, RPC_STEP_PLAN, &p.base), 0);
    Duet__StepResult *r = rcli_expect(c, RPC_STEP_RESULT, 4 * T_MS); /* prefills: ASan is slow */
    ck_assert_ptr_nonnull(r);
    ck_assert_uint_eq(r->step_id, step);
    return r;
}

static void expect_fail(Duet__StepResult *r, const char *needle) {
    ck_assert(!r->ok);
    ck_assert_msg(strstr(r->error, needle), "expected '%s' in: %s", needle, r->error);
    duet__step_result__free_unpacked(r, NULL);
}

/* kv_blocks_used, cached_blocks and live_seqs from a heartbeat */
static void expect_stats(rcli *c, uint64_t hb, uint32_t used, uint32_t cached, uint32_t live) {
    Duet__Stats *st = heartbeat(c, hb);
    ck_assert_uint_eq(st->kv_blocks_used, used);
    ck_assert_uint_eq(st->cached_blocks, cached);
    ck_assert_uint_eq(st->live_seqs, live);
    duet__stats__free_unpacked(st, NULL);
}

static void same_logits(const Duet__SeqResult *a, size_t a_row, const Duet__SeqResult *b,
                        size_t b_row, size_t rows, int vocab, const char *what) {
    ck_assert_uint_ge(a->n_logits, (a_row + rows) * vocab);
    ck_assert_uint_ge(b->n_logits, (b_row + rows) * vocab);
    ck_assert_msg(!memcmp(a->logits + a_row * vocab, b->logits + b_row * vocab,
                          rows * vocab * sizeof(float)), "%s: logits differ", what);
}

START_TEST(prefix_blocks_and_budget) {
    enum { B = 128, L = 260 }; /* few tokens: the sanitizer build computes slowly */
    wproc w;
    start(&w, "--kv-memory-mb", "4");
    rcli c;
    connect_ok(&c, &w);
    /* refusals: a block size that is not a multiple of 128; a budget too small for max_seqs */
    Duet__LoadProgress *lp = load_with(&c, 4, 4096, 100);
    ck_assert(!lp->ok);
    ck_assert_ptr_nonnull(strstr(lp->error, "multiple of 128"));
    duet__load_progress__free_unpacked(lp, NULL);
    lp = load_with(&c, 11, 4096, B);
    ck_assert(!lp->ok);
    ck_assert_ptr_nonnull(strstr(lp->error, "--kv-memory-mb"));
    duet__load_progress__free_unpacked(lp, NULL);
    lp = load_with(&c, 6, 4096, B);
    ck_assert_msg(lp->ok, "%s", lp->error);
    /* the budget: (4 MiB - 6 × fixed state) / block bytes */
    dv4_kv_sizes z;
    const int vocab = tiny_kv_sizes(B, DV4_KV_F32, &z);
    const uint32_t total = (uint32_t)(((4u << 20) - 6 * z.fixed_bytes) / z.block_bytes);
    const uint32_t cost = (uint32_t)((z.block_bytes + z.resume_bytes + z.block_bytes - 1) /
                                     z.block_bytes);
    ck_assert_uint_eq(lp->kv_blocks_total, total);
    ck_assert_uint_eq(lp->snapshot_block_cost, cost);
    ck_assert_uint_eq(lp->kv_block_bytes, z.block_bytes);
    duet__load_progress__free_unpacked(lp, NULL);
    ck_assert(wproc_wait_log(&w, "KV budget 4.0 MiB", T_MS));

    int32_t tok[4096];
    for (int i = 0; i < 4096; i++) tok[i] = (int32_t)((i * 7919 + 13) % vocab);

    /* seq 1 saves blocks 1001 (end 128) and 1002 (end 256), both inside long chunks; seq 11,
     * a short prompt, shares the first step (one pass for it, two for seq 1) */
    const uint64_t s1[1] = {1001}, s2[1] = {1002};
    const uint32_t e1[1] = {128}, e2[1] = {256};
    tchunk a[2] = {{.seq = 1, .start = 0, .n = 150, .logits = 1, .save_ids = s1,
                    .save_ends = e1, .n_save = 1},
                   {.seq = 11, .start = 0, .n = 20, .sample = 1, .logits = 1}};
    Duet__StepResult *r1 = plan(&c, 1, tok, a, 2, NULL, 0);
    ck_assert_msg(r1->ok, "%s", r1->error);
    ck_assert_int_ge(r1->results[1]->token_id, 0);
    tchunk a2 = {.seq = 1, .start = 150, .n = L - 150, .logits = 1, .save_ids = s2,
                 .save_ends = e2, .n_save = 1};
    Duet__StepResult *r2 = plan(&c, 2, tok, &a2, 1, NULL, 0);
    ck_assert_msg(r2->ok, "%s", r2->error);
    /* 3 (seq 1) + 1 (seq 11) live blocks, 2 cached */
    expect_stats(&c, 1, 3 + 1 + 2 * cost, 2, 2);

    /* the cold reference: seq 2, the same L tokens in one chunk without saves; seq 12: the
     * short prompt alone */
    tchunk cold[2] = {{.seq = 2, .start = 0, .n = L, .logits = 1},
                      {.seq = 12, .start = 0, .n = 20, .sample = 1, .logits = 1}};
    Duet__StepResult *rc = plan(&c, 3, tok, cold, 1, NULL, 0);
    ck_assert_msg(rc->ok, "%s", rc->error);
    same_logits(r1->results[0], 0, rc->results[0], 0, 150, vocab, "interior save, piece 1+2");
    same_logits(r2->results[0], 0, rc->results[0], 150, L - 150, vocab, "second chunk");
    Duet__StepResult *r12 = plan(&c, 4, tok, &cold[1], 1, NULL, 0);
    ck_assert_msg(r12->ok, "%s", r12->error);
    same_logits(r1->results[1], 0, r12->results[0], 0, 20, vocab, "batched beside a 2-pass seq");
    ck_assert_int_eq(r1->results[1]->token_id, r12->results[0]->token_id);
    duet__step_result__free_unpacked(r12, NULL);
    Duet__Release rel = DUET__RELEASE__INIT;
    uint64_t r_ids[1] = {12};
    rel.seq_ids = r_ids;
    rel.n_seq_ids = 1;
    ck_assert_int_eq(rcli_send(&c, RPC_RELEASE, &rel.base), 0); /* frees a slot */
    /* restore 2 blocks then the tail; restore 1 block then the tail: identical to cold */
    const uint64_t chain[2] = {1001, 1002};
    tchunk rs[2] = {{.seq = 5, .start = 256, .n = L - 256, .logits = 1, .restore = chain,
                     .n_restore = 2},
                    {.seq = 6, .start = 128, .n = L - 128, .logits = 1, .restore = chain,
                     .n_restore = 1}};
    Duet__StepResult *rr = plan(&c, 5, tok, rs, 2, NULL, 0);
    ck_assert_msg(rr->ok, "%s", rr->error);
    same_logits(rr->results[0], 0, rc->results[0], 256, L - 256, vocab, "restored 2 blocks");
    same_logits(rr->results[1], 0, rc->results[0], 128, L - 128, vocab, "restored 1 block");
    duet__step_result__free_unpacked(rr, NULL);
    duet__step_result__free_unpacked(r1, NULL);
    duet__step_result__free_unpacked(r2, NULL);
    duet__step_result__free_unpacked(rc, NULL);
    uint32_t used = 3 + 1 + 3 + 3 + 3 + 2 * cost; /* seqs 1, 11, 2, 5, 6 */
    expect_stats(&c, 2, used, 2, 5);
    Duet__StepResult *e;

    /* refused steps change nothing: unknown restore id, saving an existing id, a restore with
     * a wrong start, too many KV blocks, masks that leave nothing */
    const uint64_t unknown[1] = {9999};
    tchunk bad = {.seq = 7, .start = 128, .n = 10, .restore = unknown, .n_restore = 1};
    expect_fail(plan(&c, 7, tok, &bad, 1, NULL, 0), "restore block 9999");
    bad = (tchunk){.seq = 7, .start = 100, .n = 10, .restore = chain, .n_restore = 1};
    expect_fail(plan(&c, 8, tok, &bad, 1, NULL, 0), "start_pos 100");
    bad = (tchunk){.seq = 7, .start = 0, .n = 150, .save_ids = s1, .save_ends = e1, .n_save = 1};
    expect_fail(plan(&c, 9, tok, &bad, 1, NULL, 0), "already cached");
    bad = (tchunk){.seq = 7, .start = 0, .n = 150, .save_ids = unknown, .save_ends = e2,
                   .n_save = 1};
    expect_fail(plan(&c, 10, tok, &bad, 1, NULL, 0), "ends at 256");
    uint32_t room = total - used; /* a new sequence one block larger than what is left */
    bad = (tchunk){.seq = 7, .start = 0, .n = (room + 1) * B};
    ck_assert_uint_le(bad.n, 4096);
    char want[64];
    snprintf(want, sizeof want, "kv_blocks_total = %u", total);
    expect_fail(plan(&c, 11, tok, &bad, 1, NULL, 0), want);
    int32_t banned[2] = {3, 4}, allowed[2] = {4, 3};
    Duet__SamplingParams sp = DUET__SAMPLING_PARAMS__INIT;
    sp.banned_ids = banned;
    sp.n_banned_ids = 2;
    sp.allowed_ids = allowed;
    sp.n_allowed_ids = 2;
    bad = (tchunk){.seq = 7, .start = 0, .n = 5, .sample = 1, .sp = &sp};
    expect_fail(plan(&c, 12, tok, &bad, 1, NULL, 0), "no token");
    expect_stats(&c, 3, used, 2, 5);
    /* the worker keeps serving; sampling params reach the sampler: banning the greedy token
     * changes the choice */
    tchunk g = {.seq = 5, .start = L, .n = 1, .sample = 1};
    Duet__StepResult *gr = plan(&c, 14, tok, &g, 1, NULL, 0);
    ck_assert_msg(gr->ok, "%s", gr->error);
    int32_t greedy = gr->results[0]->token_id;
    duet__step_result__free_unpacked(gr, NULL);
    Duet__SamplingParams ban = DUET__SAMPLING_PARAMS__INIT;
    ban.banned_ids = &greedy;
    ban.n_banned_ids = 1;
    g = (tchunk){.seq = 6, .start = L, .n = 1, .sample = 1, .sp = &ban};
    gr = plan(&c, 15, tok, &g, 1, NULL, 0);
    ck_assert_msg(gr->ok, "%s", gr->error);
    ck_assert_int_ne(gr->results[0]->token_id, greedy);
    ck_assert_int_ge(gr->results[0]->token_id, 0);
    duet__step_result__free_unpacked(gr, NULL);

    /* drop_blocks and Release.block_ids free their units; a dropped block cannot be restored */
    rel = (Duet__Release)DUET__RELEASE__INIT;
    uint64_t rs_ids[2] = {7 /* never started: ignored */, 6};
    rel.seq_ids = rs_ids;
    rel.n_seq_ids = 2;
    ck_assert_int_eq(rcli_send(&c, RPC_RELEASE, &rel.base), 0);
    const uint64_t drop[2] = {1002, 4242 /* unknown: ignored */};
    e = plan(&c, 16, tok, NULL, 0, drop, 2);
    ck_assert(e->ok);
    duet__step_result__free_unpacked(e, NULL);
    expect_stats(&c, 5, 3 + 1 + 3 + 3 + cost, 1, 4); /* seqs 1, 11, 2, 5 (at L + 1) */
    bad = (tchunk){.seq = 8, .start = 256, .n = 1, .restore = chain, .n_restore = 2};
    expect_fail(plan(&c, 17, tok, &bad, 1, NULL, 0), "restore block 1002");
    rel = (Duet__Release)DUET__RELEASE__INIT;
    rel.block_ids = (uint64_t *)chain;
    rel.n_block_ids = 1;
    ck_assert_int_eq(rcli_send(&c, RPC_RELEASE, &rel.base), 0);
    e = plan(&c, 18, tok, NULL, 0, NULL, 0);
    ck_assert(e->ok);
    duet__step_result__free_unpacked(e, NULL);
    expect_stats(&c, 6, 3 + 1 + 3 + 3, 0, 4);

    /* a new coordinator: every sequence and cached block is gone */
    tchunk again = {.seq = 20, .start = 0, .n = B, .save_ids = s1, .save_ends = e1, .n_save = 1};
    e = plan(&c, 19, tok, &again, 1, NULL, 0);
    ck_assert_msg(e->ok, "%s", e->error);
    duet__step_result__free_unpacked(e, NULL);
    expect_stats(&c, 7, 3 + 1 + 3 + 3 + 1 + cost, 1, 5);
    rcli_close(&c);
    ck_assert(wproc_wait_log(&w, "the coordinator disconnected", T_MS));
    connect_ok(&c, &w);
    e = plan(&c, 20, tok, NULL, 0, NULL, 0); /* runs after the dropping job */
    ck_assert(e->ok);
    duet__step_result__free_unpacked(e, NULL);
    expect_stats(&c, 8, 0, 0, 0);
    rcli_close(&c);
    stop_ok(&w);
}
END_TEST

/* ---- (b) a wrong token is refused; the worker then accepts the right one ----------------- */

START_TEST(wrong_token_then_correct) {
    wproc w;
    start(&w, NULL, NULL);
    rcli c;
    ck_assert_int_eq(rcli_connect(&c, w.port, T_MS), 0);
    Duet__HelloReply *r =
        rcli_handshake(&c, "not-the-token-0123456789", RPC_PROTOCOL_VERSION, 0, 1, 0, T_MS);
    ck_assert_ptr_nonnull(r);
    ck_assert(!r->ok);
    ck_assert_ptr_nonnull(strstr(r->error, "authentication failed"));
    ck_assert_uint_eq(r->model_fingerprint, 0); /* nothing about the model to strangers */
    duet__hello_reply__free_unpacked(r, NULL);
    ck_assert(rcli_wait_closed(&c, T_MS));
    rcli_close(&c);
    ck_assert(wproc_wait_log(&w, "authentication failed", T_MS));
    connect_ok(&c, &w);
    Duet__Stats *st = heartbeat(&c, 1);
    duet__stats__free_unpacked(st, NULL);
    rcli_close(&c);
    stop_ok(&w);
}
END_TEST

/* ---- (c) wrong version, rank, world size, fingerprint; a second coordinator -------------- */

START_TEST(mismatches_rejected) {
    wproc w;
    start(&w, NULL, NULL);
    struct {
        uint32_t version, rank, world;
        uint64_t fp;
        const char *reply, *log;
    } cases[] = {
        {RPC_PROTOCOL_VERSION + 1, 0, 1, 0, "protocol version 2", "protocol version 2"},
        {RPC_PROTOCOL_VERSION, 1, 1, 0, "rank mismatch", "rank mismatch"},
        {RPC_PROTOCOL_VERSION, 0, 2, 0, "world size mismatch", "world size mismatch"},
        {RPC_PROTOCOL_VERSION, 0, 1, model_fingerprint() ^ 1, "fingerprint mismatch",
         "fingerprint mismatch"},
    };
    rcli c;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        ck_assert_int_eq(rcli_connect(&c, w.port, T_MS), 0);
        Duet__HelloReply *r = rcli_handshake(&c, TOKEN, cases[i].version, cases[i].rank,
                                             cases[i].world, cases[i].fp, T_MS);
        ck_assert_ptr_nonnull(r);
        ck_assert(!r->ok);
        ck_assert_msg(strstr(r->error, cases[i].reply), "case %zu: reply '%s'", i, r->error);
        duet__hello_reply__free_unpacked(r, NULL);
        ck_assert(rcli_wait_closed(&c, T_MS));
        rcli_close(&c);
        ck_assert_msg(wproc_wait_log(&w, cases[i].log, T_MS), "case %zu not logged", i);
    }
    /* the right fingerprint is accepted; a second authenticated coordinator is refused */
    ck_assert_int_eq(rcli_connect(&c, w.port, T_MS), 0);
    Duet__HelloReply *r =
        rcli_handshake(&c, TOKEN, RPC_PROTOCOL_VERSION, 0, 1, model_fingerprint(), T_MS);
    ck_assert_ptr_nonnull(r);
    ck_assert(r->ok);
    duet__hello_reply__free_unpacked(r, NULL);
    rcli c2;
    ck_assert_int_eq(rcli_connect(&c2, w.port, T_MS), 0);
    r = rcli_handshake(&c2, TOKEN, RPC_PROTOCOL_VERSION, 0, 1, 0, T_MS);
    ck_assert_ptr_nonnull(r);
    ck_assert(!r->ok);
    ck_assert_ptr_nonnull(strstr(r->error, "another coordinator"));
    duet__hello_reply__free_unpacked(r, NULL);
    ck_assert(rcli_wait_closed(&c2, T_MS));
    rcli_close(&c2);
    ck_assert(wproc_wait_log(&w, "another coordinator", T_MS));

    /* the first coordinator still works; after it leaves, a new one is accepted, the model
     * stays loaded, and the old sequences are gone */
    load_ok(&c, 1);
    const int32_t ids[3] = {3, 4, 5};
    Duet__StepResult *sr = step1(&c, 1, 5, 0, ids, 3, 1, 0, 0, 0);
    ck_assert(sr->ok);
    duet__step_result__free_unpacked(sr, NULL);
    rcli_close(&c);
    ck_assert(wproc_wait_log(&w, "the coordinator disconnected", T_MS));
    connect_ok(&c, &w);
    load_ok(&c, 1);
    ck_assert(wproc_wait_log(&w, "already loaded", T_MS));
    sr = step1(&c, 2, 5, 3, ids, 1, 1, 0, 0, 0);
    ck_assert(!sr->ok);
    ck_assert_ptr_nonnull(strstr(sr->error, "seq 5 is not known"));
    duet__step_result__free_unpacked(sr, NULL);
    rcli_close(&c);
    stop_ok(&w);
}
END_TEST

/* ---- (d) garbage, oversized, unknown type, bad protobuf: that connection only ------------ */

START_TEST(garbage_closes_only_that_connection) {
    wproc w;
    start(&w, NULL, NULL);
    rcli good;
    connect_ok(&good, &w); /* an authenticated coordinator that must survive all of this */
    uint8_t oversized[5], unknown[6] = {2, 0, 0, 0, 200, 0}, zero[5] = {0, 0, 0, 0, 2};
    rpc_frame_header(oversized, RPC_HELLO, RPC_MAX_FRAME); /* length = max + 1 */
    uint8_t bad_pb[8] = {0}, heartbeat_first[5], big_hello[5];
    rpc_frame_header(big_hello, RPC_HELLO, 100000); /* fine later, too big before auth */
    rpc_frame_header(bad_pb, RPC_HELLO, 3);
    bad_pb[5] = 0xff, bad_pb[6] = 0xff, bad_pb[7] = 0xff; /* truncated varint key */
    rpc_frame_header(heartbeat_first, RPC_HEARTBEAT, 0);
    const char *http = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    struct {
        const void *bytes;
        size_t n;
        const char *log;
    } cases[] = {
        {http, strlen(http), "exceeds the maximum"},
        {oversized, sizeof oversized, "exceeds the maximum"},
        {unknown, sizeof unknown, "unknown message type 200"},
        {zero, sizeof zero, "length 0"},
        {big_hello, sizeof big_hello, "exceeds the maximum of 65536 bytes"},
        {bad_pb, sizeof bad_pb, "malformed Hello"},
        {heartbeat_first, sizeof heartbeat_first, "expected Hello as the first message"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        rcli c;
        ck_assert_int_eq(rcli_connect(&c, w.port, T_MS), 0);
        ck_assert_int_eq(rcli_send_raw(&c, cases[i].bytes, cases[i].n), 0);
        ck_assert_msg(rcli_wait_closed(&c, T_MS), "case %zu: connection not closed", i);
        rcli_close(&c);
        ck_assert_msg(wproc_wait_log(&w, cases[i].log, T_MS), "case %zu: '%s' not logged", i,
                      cases[i].log);
    }
    /* the coordinator was untouched */
    Duet__Stats *st = heartbeat(&good, 9);
    duet__stats__free_unpacked(st, NULL);
    /* garbage from the authenticated coordinator closes it; a new one is then accepted */
    ck_assert_int_eq(rcli_send_raw(&good, unknown, sizeof unknown), 0);
    ck_assert(rcli_wait_closed(&good, T_MS));
    rcli_close(&good);
    ck_assert(wproc_wait_log(&w, "unknown message type 200", T_MS));
    /* a malformed StepPlan payload from a coordinator closes that connection too */
    connect_ok(&good, &w);
    ck_assert_int_eq(rcli_send_raw(&good, bad_pb, 5), 0); /* header only... */
    uint8_t bad_plan[8];
    rpc_frame_header(bad_plan, RPC_STEP_PLAN, 3);
    bad_plan[5] = 0xff, bad_plan[6] = 0xff, bad_plan[7] = 0xff;
    rcli_close(&good); /* ...then hang up mid-frame: a partial frame is just dropped */
    connect_ok(&good, &w);
    ck_assert_int_eq(rcli_send_raw(&good, bad_plan, sizeof bad_plan), 0);
    ck_assert(rcli_wait_closed(&good, T_MS));
    rcli_close(&good);
    ck_assert(wproc_wait_log(&w, "malformed StepPlan", T_MS));
    connect_ok(&good, &w);
    load_ok(&good, 1);
    rcli_close(&good);
    stop_ok(&w);
}
END_TEST

/* ---- (e) SIGTERM, Hello timeout, refusals at start-up ------------------------------------ */

START_TEST(sigterm_exits_zero) {
    wproc w;
    start(&w, NULL, NULL);
    rcli c;
    connect_ok(&c, &w);
    load_ok(&c, 1);
    int st = wproc_stop(&w, SIGTERM, T_MS);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
    ck_assert_ptr_nonnull(strstr(w.log, "SIGTERM received"));
    ck_assert(rcli_wait_closed(&c, T_MS));
    rcli_close(&c);
}
END_TEST

START_TEST(hello_timeout_closes) {
    wproc w;
    start(&w, "--hello-timeout-ms", "300");
    rcli c;
    ck_assert_int_eq(rcli_connect(&c, w.port, T_MS), 0);
    Duet__Challenge *ch = rcli_expect(&c, RPC_CHALLENGE, T_MS);
    ck_assert_ptr_nonnull(ch);
    ck_assert_uint_eq(ch->nonce.len, RPC_NONCE_BYTES);
    ck_assert_uint_eq(ch->protocol_version, RPC_PROTOCOL_VERSION);
    duet__challenge__free_unpacked(ch, NULL);
    ck_assert(rcli_wait_closed(&c, T_MS));
    rcli_close(&c);
    ck_assert(wproc_wait_log(&w, "no Hello within 300 ms", T_MS));
    connect_ok(&c, &w);
    rcli_close(&c);
    stop_ok(&w);
}
END_TEST

static void start_fails(const char *const *argv, const char *msg, int want_code) {
    wproc w;
    ck_assert_int_ne(wproc_start(&w, worker_bin, argv, T_MS), 0);
    int st = wproc_stop(&w, 0, T_MS);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == want_code, "exit status %d", st);
    ck_assert_msg(strstr(w.log, msg), "expected '%s' in: %s", msg, w.log);
}

START_TEST(startup_refusals) {
    const char *open_token[] = {"--rank", "0", "--world-size", "1", "--model", model_dir,
                                "--auth-token-file", bad_mode_path, "--listen", "127.0.0.1:0",
                                NULL};
    start_fails(open_token, "chmod 600", 1);
    const char *no_model[] = {"--rank", "0", "--world-size", "1", "--model", "/nonexistent/m",
                              "--auth-token-file", token_path, "--listen", "127.0.0.1:0",
                              NULL};
    start_fails(no_model, "cannot start", 1);
    const char *bad_rank[] = {"--rank", "2", "--world-size", "2", "--model", model_dir,
                              "--auth-token-file", token_path, NULL};
    start_fails(bad_rank, "must be below --world-size", 2);
    const char *no_peers[] = {"--rank", "0", "--world-size", "2", "--model", model_dir,
                              "--auth-token-file", token_path, NULL};
    start_fails(no_peers, "--peers", 2);
    const char *cuda[] = {"--rank", "0", "--world-size", "1", "--model", model_dir,
                          "--auth-token-file", token_path, "--backend", "tpu", NULL};
    start_fails(cuda, "--backend tpu is not available", 2);
    const char *kv[] = {"--rank", "0", "--world-size", "1", "--model", model_dir,
                        "--auth-token-file", token_path, "--kv-dtype", "fp16", NULL};
    start_fails(kv, "use f32 (the default), bf16 or fp8", 2);
    const char *ds[] = {"--rank", "0", "--world-size", "1", "--model", model_dir,
                        "--auth-token-file", token_path, "--device-sampling", "maybe", NULL};
    start_fails(ds, "--device-sampling 'maybe' must be auto, on or off", 2);
}
END_TEST

/* --kv-dtype bf16 / fp8: the worker reports that dtype's block sizes (the coordinator budgets
 * from them) and serves a step on that state. */
static void kv_dtype_budget(const char *name, dv4_kv_dtype dt) {
    enum { B = 128 };
    wproc w;
    start(&w, "--kv-dtype", name);
    rcli c;
    connect_ok(&c, &w);
    Duet__LoadProgress *lp = load_with(&c, 6, 4096, B);
    ck_assert_msg(lp->ok, "%s", lp->error);
    dv4_kv_sizes h, f;
    const int vocab = tiny_kv_sizes(B, dt, &h);
    tiny_kv_sizes(B, DV4_KV_F32, &f);
    ck_assert_uint_eq(lp->kv_block_bytes, h.block_bytes);
    if (dt == DV4_KV_BF16) ck_assert_uint_eq(2 * lp->kv_block_bytes, f.block_bytes);
    else ck_assert_uint_lt(2 * lp->kv_block_bytes, f.block_bytes);
    ck_assert_uint_eq(lp->kv_blocks_total, (uint32_t)(((1024ull << 20) - 6 * h.fixed_bytes) /
                                                      h.block_bytes));
    duet__load_progress__free_unpacked(lp, NULL);
    int32_t tok[40];
    for (int i = 0; i < 40; i++) tok[i] = (int32_t)((i * 7919 + 13) % vocab);
    tchunk a = {.seq = 1, .start = 0, .n = 40, .sample = 1, .logits = 1};
    Duet__StepResult *r = plan(&c, 1, tok, &a, 1, NULL, 0);
    ck_assert_msg(r->ok, "%s", r->error);
    ck_assert_int_ge(r->results[0]->token_id, 0);
    duet__step_result__free_unpacked(r, NULL);
    rcli_close(&c);
    stop_ok(&w);
}

START_TEST(kv_dtype_bf16_budget) { kv_dtype_budget("bf16", DV4_KV_BF16); }
END_TEST
START_TEST(kv_dtype_fp8_budget) { kv_dtype_budget("fp8", DV4_KV_FP8); }
END_TEST

/* ---- device sampling (--device-sampling) ------------------------------------------------- */

enum { DS_SEQS = 3, DS_STEPS = 8, DS_PROMPT = 10 };
typedef struct {
    int32_t id[DS_SEQS][DS_STEPS];
    float lp[DS_SEQS][DS_STEPS];
    int32_t top[DS_SEQS][DS_STEPS][3];
    float logit0[DS_SEQS]; /* the first logit of the last returned row (seq 3 returns logits) */
} ds_run;

/* One StepPlan with a chunk per sequence q: tok[q] + start[q], n[q] ids; sampling sp[q];
 * logits returned for seq 3. */
static Duet__StepResult *ds_step(rcli *c, uint64_t step, int32_t (*tok)[DS_PROMPT + DS_STEPS],
                                 const uint32_t *start, const uint32_t *n,
                                 Duet__SamplingParams *sp) {
    Duet__SeqChunk ch[DS_SEQS], *chs[DS_SEQS];
    for (int q = 0; q < DS_SEQS; q++) {
        duet__seq_chunk__init(&ch[q]);
        chs[q] = &ch[q];
        ch[q].seq_id = (uint64_t)q + 1;
        ch[q].start_pos = start[q];
        ch[q].token_ids = tok[q] + start[q];
        ch[q].n_token_ids = n[q];
        ch[q].sample = 1;
        ch[q].sampling = &sp[q];
        ch[q].return_logits = q == 2;
    }
    Duet__StepPlan p = DUET__STEP_PLAN__INIT;
    p.step_id = step;
    p.chunks = chs;
    p.n_chunks = DS_SEQS;
    ck_assert_int_eq(rcli_send(c, RPC_STEP_PLAN, &p.base), 0);
    Duet__StepResult *r = rcli_expect(c, RPC_STEP_RESULT, 4 * T_MS);
    ck_assert_ptr_nonnull(r);
    ck_assert_msg(r->ok, "%s", r->error);
    ck_assert_uint_eq(r->n_results, DS_SEQS);
    return r;
}

/* A worker started with --device-sampling `mode` decodes three sequences together for
 * DS_STEPS steps: greedy; temperature 0.8 with top_k 20 and min_p 0.05; temperature 1 with
 * top_p 0.9, logit_bias (a row the host must shape) and logits returned at every step. */
static void ds_decode(const char *mode, ds_run *o) {
    wproc w;
    start(&w, "--device-sampling", mode);
    rcli c;
    connect_ok(&c, &w);
    load_ok(&c, 1);
    dv4_kv_sizes z;
    const int vocab = tiny_kv_sizes(256, DV4_KV_F32, &z);
    int32_t tok[DS_SEQS][DS_PROMPT + DS_STEPS];
    Duet__SamplingParams sp[DS_SEQS];
    int32_t bias_id = 17;
    float bias_v = 2.5f;
    for (int q = 0; q < DS_SEQS; q++) {
        for (int i = 0; i < DS_PROMPT; i++) tok[q][i] = (int32_t)((i * 7919 + 13 * q + 5) % vocab);
        duet__sampling_params__init(&sp[q]);
        sp[q].n_logprobs = 3;
        sp[q].seed = 100 + (uint64_t)q;
    }
    sp[1].temperature = 0.8f, sp[1].top_k = 20, sp[1].min_p = 0.05f;
    sp[2].temperature = 1.0f, sp[2].top_p = 0.9f;
    sp[2].bias_ids = &bias_id, sp[2].bias_values = &bias_v;
    sp[2].n_bias_ids = sp[2].n_bias_values = 1;
    for (int s = 0; s < DS_STEPS; s++) {
        uint32_t start[DS_SEQS], n[DS_SEQS];
        for (int q = 0; q < DS_SEQS; q++) {
            start[q] = s ? (uint32_t)(DS_PROMPT + s - 1) : 0;
            n[q] = s ? 1 : DS_PROMPT;
        }
        Duet__StepResult *r = ds_step(&c, (uint64_t)s + 1, tok, start, n, sp);
        for (int q = 0; q < DS_SEQS; q++) {
            const Duet__SeqResult *x = r->results[q];
            ck_assert_int_ge(x->token_id, 0);
            ck_assert_uint_eq(x->n_top_ids, 3);
            o->id[q][s] = x->token_id;
            o->lp[q][s] = x->logprob;
            memcpy(o->top[q][s], x->top_ids, sizeof o->top[q][s]);
            if (q == 2) o->logit0[q] = x->logits[x->n_logits - (size_t)vocab];
            if (s + 1 < DS_STEPS) tok[q][DS_PROMPT + s] = x->token_id;
        }
        duet__step_result__free_unpacked(r, NULL);
    }
    rcli_close(&c);
    stop_ok(&w);
}

START_TEST(device_sampling_matches_host) {
    ds_run host, dev;
    ds_decode("off", &host);
    ds_decode("on", &dev);
    for (int q = 0; q < DS_SEQS; q++)
        for (int s = 0; s < DS_STEPS; s++) {
            ck_assert_msg(host.id[q][s] == dev.id[q][s], "seq %d step %d: host drew %d, device "
                          "%d", q + 1, s, host.id[q][s], dev.id[q][s]);
            ck_assert_msg(fabsf(host.lp[q][s] - dev.lp[q][s]) <= 1e-5f, "seq %d step %d: "
                          "logprob %g vs %g", q + 1, s, host.lp[q][s], dev.lp[q][s]);
            ck_assert(!memcmp(host.top[q][s], dev.top[q][s], sizeof host.top[q][s]));
        }
    ck_assert(host.logit0[2] == dev.logit0[2]); /* returned logits are still downloaded */
}
END_TEST

/* ---- world size 2: tensor + expert parallelism across two real workers ------------------- */

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t l = sizeof a;
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&a, &l), 0);
    close(fd);
    return ntohs(a.sin_port);
}

START_TEST(two_ranks_match_one_process) {
    char peers[64];
    snprintf(peers, sizeof peers, "127.0.0.1:%d,127.0.0.1:%d", free_port(), free_port());
    wproc w[2];
    rcli c[2];
    for (int r = 0; r < 2; r++) {
        const char *argv[] = {"--rank", r ? "1" : "0", "--world-size", "2", "--model", model_dir,
                              "--auth-token-file", token_path, "--listen", "127.0.0.1:0",
                              "--threads", "1", "--peers", peers, NULL};
        ck_assert_int_eq(wproc_start(&w[r], worker_bin, argv, T_MS), 0);
    }
    for (int r = 0; r < 2; r++) {
        ck_assert_int_eq(rcli_connect(&c[r], w[r].port, T_MS), 0);
        Duet__HelloReply *h =
            rcli_handshake(&c[r], TOKEN, RPC_PROTOCOL_VERSION, (uint32_t)r, 2, 0, T_MS);
        ck_assert_ptr_nonnull(h);
        ck_assert_msg(h->ok, "rank %d: %s", r, h->error);
        ck_assert_uint_eq(h->rank, (uint32_t)r);
        duet__hello_reply__free_unpacked(h, NULL);
    }
    /* both LoadModels must be in flight together: the data plane forms between them */
    Duet__LoadModel lm = DUET__LOAD_MODEL__INIT;
    lm.max_seqs = 2;
    lm.max_seq_len = 32;
    for (int r = 0; r < 2; r++) ck_assert_int_eq(rcli_send(&c[r], RPC_LOAD_MODEL, &lm.base), 0);
    uint64_t bytes[2];
    for (int r = 0; r < 2; r++) {
        Duet__LoadProgress *p;
        while ((p = rcli_expect(&c[r], RPC_LOAD_PROGRESS, T_MS)) && !p->done)
            duet__load_progress__free_unpacked(p, NULL);
        ck_assert_ptr_nonnull(p);
        ck_assert_msg(p->ok, "rank %d: %s", r, p->error);
        bytes[r] = p->rank_weight_bytes;
        duet__load_progress__free_unpacked(p, NULL);
    }

    char err[512];
    be *b = be_cpu_create(1);
    dv4_model *m;
    ck_assert_int_eq(dv4_load(model_dir, b, NULL, &m, err, sizeof err), 0);
    ck_assert_uint_lt(bytes[0], dv4_rank_weight_bytes(m)); /* each rank holds a part */
    const int vocab = dv4_cfg(m)->vocab_size;
    dv4_seq *s;
    ck_assert_int_eq(dv4_seq_new(m, 32, &s, err, sizeof err), 0);
    const int32_t ids[6] = {9, 8, 7, 6, 5, 4};
    float *ref = xmalloc((size_t)6 * vocab * sizeof *ref);
    dv4_chunk ch = {s, ids, 6, DV4_LOGITS_ALL};
    ck_assert_int_eq(dv4_forward(m, &ch, 1, ref, err, sizeof err), 0);

    Duet__SeqChunk k = DUET__SEQ_CHUNK__INIT;
    Duet__SamplingParams sp = DUET__SAMPLING_PARAMS__INIT;
    k.seq_id = 1;
    k.token_ids = (int32_t *)ids;
    k.n_token_ids = 6;
    k.sample = 1;
    k.sampling = &sp;
    k.return_logits = 1;
    Duet__SeqChunk *ks[1] = {&k};
    Duet__StepPlan plan = DUET__STEP_PLAN__INIT;
    plan.step_id = 1;
    plan.chunks = ks;
    plan.n_chunks = 1;
    for (int r = 0; r < 2; r++) ck_assert_int_eq(rcli_send(&c[r], RPC_STEP_PLAN, &plan.base), 0);
    Duet__StepResult *res[2];
    for (int r = 0; r < 2; r++) {
        res[r] = rcli_expect(&c[r], RPC_STEP_RESULT, T_MS);
        ck_assert_ptr_nonnull(res[r]);
        ck_assert_msg(res[r]->ok, "rank %d: %s", r, res[r]->error);
    }
    ck_assert_uint_eq(res[1]->n_results, 0); /* only rank 0 answers with tokens */
    ck_assert_uint_eq(res[0]->n_results, 1);
    ck_assert_uint_eq(res[0]->results[0]->n_logits, (size_t)6 * vocab);
    double e = max_rel_err(res[0]->results[0]->logits, ref, (size_t)6 * vocab);
    ck_assert_msg(e <= 1e-4, "2-rank logits differ from one process: rel err %g", e);
    for (int r = 0; r < 2; r++) duet__step_result__free_unpacked(res[r], NULL);
    free(ref);
    dv4_seq_free(m, s);
    dv4_free(m);
    b->ops->destroy(b);
    for (int r = 0; r < 2; r++) {
        rcli_close(&c[r]);
        stop_ok(&w[r]);
    }
}
END_TEST

/* A rank whose peers never come: LoadModel fails after --comm-timeout-ms with a sentence and
 * the worker keeps serving; while a load waits, SIGTERM waits for it and a second SIGTERM
 * exits at once. */
START_TEST(missing_peer) {
    char peers[64];
    snprintf(peers, sizeof peers, "127.0.0.1:%d,127.0.0.1:%d", free_port(), free_port());
    wproc w;
    const char *argv[] = {"--rank", "0", "--world-size", "2", "--model", model_dir,
                          "--auth-token-file", token_path, "--listen", "127.0.0.1:0",
                          "--peers", peers, "--comm-timeout-ms", "400", NULL};
    ck_assert_int_eq(wproc_start(&w, worker_bin, argv, T_MS), 0);
    rcli c;
    ck_assert_int_eq(rcli_connect(&c, w.port, T_MS), 0);
    Duet__HelloReply *h = rcli_handshake(&c, TOKEN, RPC_PROTOCOL_VERSION, 0, 2, 0, T_MS);
    ck_assert_ptr_nonnull(h);
    ck_assert(h->ok);
    duet__hello_reply__free_unpacked(h, NULL);
    Duet__LoadModel lm = DUET__LOAD_MODEL__INIT;
    ck_assert_int_eq(rcli_send(&c, RPC_LOAD_MODEL, &lm.base), 0);
    Duet__LoadProgress *p;
    while ((p = rcli_expect(&c, RPC_LOAD_PROGRESS, T_MS)) && !p->done)
        duet__load_progress__free_unpacked(p, NULL);
    ck_assert_ptr_nonnull(p);
    ck_assert(!p->ok);
    ck_assert_uint_gt(strlen(p->error), 10);
    duet__load_progress__free_unpacked(p, NULL);
    Duet__Stats *st = heartbeat(&c, 5);
    ck_assert_uint_eq(st->rank_weight_bytes, 0);
    duet__stats__free_unpacked(st, NULL);
    rcli_close(&c);
    stop_ok(&w);

    const char *argv2[] = {"--rank", "0", "--world-size", "2", "--model", model_dir,
                           "--auth-token-file", token_path, "--listen", "127.0.0.1:0",
                           "--peers", peers, "--comm-timeout-ms", "600000", NULL};
    ck_assert_int_eq(wproc_start(&w, worker_bin, argv2, T_MS), 0);
    ck_assert_int_eq(rcli_connect(&c, w.port, T_MS), 0);
    h = rcli_handshake(&c, TOKEN, RPC_PROTOCOL_VERSION, 0, 2, 0, T_MS);
    ck_assert_ptr_nonnull(h);
    duet__hello_reply__free_unpacked(h, NULL);
    ck_assert_int_eq(rcli_send(&c, RPC_LOAD_MODEL, &lm.base), 0);
    ck_assert(wproc_wait_log(&w, "LoadModel from", T_MS));
    kill(w.pid, SIGTERM);
    ck_assert(wproc_wait_log(&w, "signal again to exit at once", T_MS));
    int code = wproc_stop(&w, SIGTERM, T_MS);
    ck_assert_msg(WIFEXITED(code) && WEXITSTATUS(code) == 1, "exit status %d", code);
    ck_assert_ptr_nonnull(strstr(w.log, "exiting at once"));
    rcli_close(&c);
}
END_TEST

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: test_worker DUET_WORKER_BINARY MODEL_DIR\n");
        return 2;
    }
    worker_bin = argv[1];
    model_dir = argv[2];
    snprintf(tmpdir, sizeof tmpdir, "/tmp/duet-worker-test-XXXXXX");
    if (!mkdtemp(tmpdir)) return 1;
    snprintf(token_path, sizeof token_path, "%s/token", tmpdir);
    snprintf(bad_mode_path, sizeof bad_mode_path, "%s/token-open", tmpdir);
    FILE *f = fopen(token_path, "w");
    fprintf(f, "%s\n", TOKEN);
    fclose(f);
    chmod(token_path, 0600);
    f = fopen(bad_mode_path, "w");
    fprintf(f, "%s\n", TOKEN);
    fclose(f);
    chmod(bad_mode_path, 0644);

    Suite *s = suite_create("worker-rpc");
    TCase *t = tcase_create("worker");
    tcase_set_timeout(t, 240);
    tcase_add_test(t, step_matches_engine);
    tcase_add_test(t, prefix_blocks_and_budget);
    tcase_add_test(t, wrong_token_then_correct);
    tcase_add_test(t, mismatches_rejected);
    tcase_add_test(t, garbage_closes_only_that_connection);
    tcase_add_test(t, sigterm_exits_zero);
    tcase_add_test(t, hello_timeout_closes);
    tcase_add_test(t, startup_refusals);
    tcase_add_test(t, kv_dtype_bf16_budget);
    tcase_add_test(t, kv_dtype_fp8_budget);
    tcase_add_test(t, device_sampling_matches_host);
    tcase_add_test(t, two_ranks_match_one_process);
    tcase_add_test(t, missing_peer);
    suite_add_tcase(s, t);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    unlink(token_path);
    unlink(bad_mode_path);
    rmdir(tmpdir);
    return failed ? 1 : 0;
}
