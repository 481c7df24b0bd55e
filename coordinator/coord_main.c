/* coord_main.c — `duet-coordinator`: the worker pool, the admin socket and a token-id
 * generation engine on one libevent loop.
 *
 * Why: this is the head-node process of the worker-first launch. Workers are started first and
 * listen; the coordinator connects to all of them (coordinator/pool.c), loads the model, and
 * serves. Generation is reachable through the HTTP API (--listen, coordinator/http) and the
 * admin socket's `generate` command (a testing/debug command: token ids in, token ids and
 * optionally logits out); both go through the same engine (coordinator/http/engine.h). Several
 * requests may be in flight; they run one engine step at a time, every
 * step batching all running sequences (a prefill chunk for a new one, one decode token for the
 * others). A worker failure fails every request in the failed step with `worker_failure`; the
 * pool re-forms the group by itself and requests queued meanwhile wait for it (up to
 * --worker-recover-timeout) before failing with `no_workers`.
 *
 * What it must never do: crash or exit on a bad request or a failing worker (only a start-up
 * problem that cannot fix itself — deadline, auth, fingerprint — ends the process, with the
 * reason), or shut the workers down when it exits (they belong to their own service).
 *
 *   duet-coordinator --workers H:P[,H:P...] --auth-token-file F [--admin-socket PATH]
 *                    [--model-fingerprint HEX] [--connect-timeout S] [--max-seq-len L]
 *                    [--max-seqs N] [--step-timeout S] [--heartbeat-timeout S]
 *                    [--drain-grace S] [--worker-recover-timeout S] [--load-timeout S]
 *                    [--listen HOST:PORT --tokenizer tokenizer.json [--api-key-file F]
 *                     [--max-body-bytes N] [--vocab-size N] [--served-model-name NAME]
 *                     [--fold-prompt-ids]]
 * --vocab-size is the model's vocabulary (prompt ids at or above it are refused with a 400;
 * the real model's is the tokenizer's, 129280). --fold-prompt-ids is for tests on the tiny
 * model (vocabulary 1024): prompt ids at or above --vocab-size become id % vocab-size.
 *
 * With --listen the OpenAI-compatible HTTP API (coordinator/http/http.c) runs on the same loop;
 * its requests go through the same engine as `generate` (coordinator/http/engine.h).
 */
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>
#include <jansson.h>

#include "coordinator/clog.h"
#include "common/err.h"
#include "common/rpc.h"
#include "coordinator/admin.h"
#include "coordinator/pool.h"
#include "coordinator/http/engine.h"
#include "coordinator/http/http.h"

#ifndef DUET_VERSION
#define DUET_VERSION "0.1.0"
#endif
#ifndef DUET_COMMIT
#define DUET_COMMIT "unknown"
#endif

/* ---- state ---------------------------------------------------------------------------- */

typedef struct gen {          /* one generate request: admin `generate` (r) or HTTP (sink) */
    struct gen *next;
    admin_req *r;              /* NULL for an HTTP request */
    eng_sink sink;             /* HTTP: token / end callbacks (coordinator/http/engine.h) */
    char *rid;                 /* HTTP: the request id <rid>; admin: NULL (id "gen-<seq>") */
    uint64_t seq_id;
    int32_t *prompt;           /* [n_prompt] */
    int n_prompt;
    int32_t *out;              /* [max_tokens] generated so far: n_out */
    int n_out, max_tokens;
    int return_logits;
    json_t *logits;            /* array of [vocab] rows when return_logits */
    float temperature, top_p;
    int top_k;
    uint64_t seed;
    int in_step;               /* part of the step in flight */
    int abort;                 /* finish at the next step boundary with "abort" */
    double deadline;           /* waiting: fail with no_workers after this (monotonic s) */
} gen;

typedef struct drain_wait {
    struct drain_wait *next;
    admin_req *r;
} drain_wait;

typedef struct {
    struct event_base *base;
    pool *pool;
    admin *adm;
    http_server *http;         /* NULL without --listen */
    gen *running, *waiting;    /* running: admitted (state on workers); waiting: queued */
    int n_running, n_waiting;
    int max_seqs, max_seq_len, max_waiting;
    double recover_timeout_s, drain_grace_s;
    int draining;
    double drain_deadline;     /* 0 = none */
    drain_wait *drain_waits;
    int exit_when_drained, signals;
    int exit_code;
    uint64_t next_seq_id;
    uint64_t completed, failed, aborted, rejected;
    double start_time;
    double step_started;       /* when the step in flight was sent */
    double last_step_time;     /* when the last step completed (0 = never) */
    double last_step_ms;       /* how long it took */
    struct event *tick, *sig_term, *sig_int, *sig_hup;
} coord;


static int in_flight(const coord *c) { return c->n_running + c->n_waiting; }

/* The id duetctl shows and aborts: the HTTP request id, or "gen-<seq>" for admin generate. */
static const char *gen_rid(const gen *g, char *buf, size_t cap) {
    if (g->rid) return g->rid;
    snprintf(buf, cap, "gen-%llu", (unsigned long long)g->seq_id);
    return buf;
}

/* abort's request_id matches <rid>, chatcmpl-<rid> or cmpl-<rid>. */
static int rid_matches(const gen *g, const char *want) {
    char buf[32];
    const char *rid = gen_rid(g, buf, sizeof buf);
    if (!strcmp(rid, want)) return 1;
    if (!g->rid) return 0;
    if (!strncmp(want, "chatcmpl-", 9)) return !strcmp(rid, want + 9);
    if (!strncmp(want, "cmpl-", 5)) return !strcmp(rid, want + 5);
    return 0;
}

static const char *state_name(const coord *c) {
    if (c->draining) return in_flight(c) ? "draining" : "drained";
    switch (pool_get_state(c->pool)) {
    case POOL_READY: return "serving";
    case POOL_STARTING: return "starting";
    default: return "degraded";
    }
}

/* ---- finishing requests ----------------------------------------------------------------- */

static void gen_free(gen *g) {
    free(g->rid);
    free(g->prompt);
    free(g->out);
    json_decref(g->logits);
    free(g);
}

static void check_drained(coord *c);

/* Unlinks g from list *head. */
static void unlink_gen(gen **head, gen *g) {
    for (gen **pp = head; *pp; pp = &(*pp)->next)
        if (*pp == g) {
            *pp = g->next;
            return;
        }
}

static int gen_connected(const gen *g) {
    return g->r ? admin_req_connected(g->r) : g->sink.connected(g->sink.user);
}

/* Answers a failed request (admin error line, or the HTTP sink's end callback). */
static void gen_reply_err(gen *g, const char *code, const char *msg) {
    if (g->r) admin_reply_err(g->r, code, "%s", msg);
    else g->sink.on_end(g->sink.user, NULL, code, msg);
}

static void gen_reply_ok(coord *c, gen *g, const char *finish) {
    (void)c;
    if (!g->r) {
        g->sink.on_end(g->sink.user, finish, NULL, NULL);
        return;
    }
    json_t *ids = json_array();
    for (int i = 0; i < g->n_out; i++) json_array_append_new(ids, json_integer(g->out[i]));
    char rid[32];
    snprintf(rid, sizeof rid, "gen-%llu", (unsigned long long)g->seq_id);
    json_t *res = json_pack("{s:o, s:s, s:i, s:s}", "token_ids", ids, "finish_reason", finish,
                            "prompt_tokens", g->n_prompt, "request_id", rid);
    if (g->return_logits) json_object_set(res, "logits", g->logits);
    admin_reply_ok(g->r, res);
}

/* Removes a running sequence: replies, releases its state on the workers. */
static void finish_running(coord *c, gen *g, const char *finish) {
    unlink_gen(&c->running, g);
    c->n_running--;
    gen_reply_ok(c, g, finish);
    if (!strcmp(finish, "abort")) c->aborted++;
    else c->completed++;
    pool_release(c->pool, &g->seq_id, 1);
    gen_free(g);
}

static void fail_gen(coord *c, gen **list, int *count, gen *g, const char *code,
                     const char *msg) {
    unlink_gen(list, g);
    (*count)--;
    gen_reply_err(g, code, msg);
    c->failed++;
    gen_free(g);
}

/* ---- the engine ------------------------------------------------------------------------ */

static void schedule(coord *c);

static void step_done(void *arg, int ok, const Duet__StepResult *res, const char *msg) {
    coord *c = arg;
    double t = coord_now_s();
    if (!ok) {
        char m[700];
        snprintf(m, sizeof m, "the step failed: %s", msg);
        for (gen *g = c->running, *nx; g; g = nx) {
            nx = g->next;
            if (g->in_step) fail_gen(c, &c->running, &c->n_running, g, "worker_failure", m);
        }
        check_drained(c);
        return;
    }
    c->last_step_time = t;
    c->last_step_ms = (t - c->step_started) * 1000;
    for (gen *g = c->running, *nx; g; g = nx) {
        nx = g->next;
        if (!g->in_step) continue;
        g->in_step = 0;
        const Duet__SeqResult *sr = NULL;
        for (size_t i = 0; i < res->n_results; i++)
            if (res->results[i]->seq_id == g->seq_id) sr = res->results[i];
        int chunk_len = g->n_out == 0 ? g->n_prompt : 1;
        char m[300];
        m[0] = 0;
        if (!sr || sr->token_id < 0)
            snprintf(m, sizeof m, "worker w0 returned no token for sequence %llu",
                     (unsigned long long)g->seq_id);
        else if (g->return_logits &&
                 (sr->n_logits == 0 || sr->n_logits % (size_t)chunk_len != 0))
            snprintf(m, sizeof m,
                     "worker w0 returned %zu logits for a %d-token chunk of sequence %llu",
                     sr->n_logits, chunk_len, (unsigned long long)g->seq_id);
        if (m[0]) {
            unlink_gen(&c->running, g);
            c->n_running--;
            pool_release(c->pool, &g->seq_id, 1);
            gen_reply_err(g, "internal", m);
            c->failed++;
            gen_free(g);
            continue;
        }
        g->out[g->n_out++] = sr->token_id;
        eng_token et = {.id = sr->token_id, .logprob = sr->logprob};
        int stop = !g->r && g->sink.on_token(g->sink.user, &et);
        if (g->return_logits) {
            size_t vocab = sr->n_logits / (size_t)chunk_len;
            const float *row = sr->logits + (size_t)(chunk_len - 1) * vocab;
            json_t *a = json_array();
            for (size_t v = 0; v < vocab; v++) /* JSON has no NaN/Inf: those become null */
                json_array_append_new(a, isfinite(row[v]) ? json_real(row[v]) : json_null());
            json_array_append_new(g->logits, a);
        }
        if (stop) finish_running(c, g, "stop");
        else if (g->n_out >= g->max_tokens) finish_running(c, g, "length");
        else if (g->abort) finish_running(c, g, "abort");
    }
    check_drained(c);
    schedule(c);
}

/* Starts the next step when the pool is free: admits waiting requests, batches every running
 * sequence (prefill for new ones, one decode token for the others). */
static void schedule(coord *c) {
    /* a client that went away cancels its request (at the step boundary when running) */
    for (gen *g = c->waiting, *nx; g; g = nx) {
        nx = g->next;
        if (!gen_connected(g)) {
            unlink_gen(&c->waiting, g);
            c->n_waiting--;
            gen_reply_ok(c, g, "abort"); /* dropped: nobody is listening */
            c->aborted++;
            gen_free(g);
        }
    }
    for (gen *g = c->running; g; g = g->next)
        if (!gen_connected(g)) g->abort = 1;
    /* aborted sequences that are not in a step end now */
    for (gen *g = c->running, *nx; g; g = nx) {
        nx = g->next;
        if (g->abort && !g->in_step) finish_running(c, g, "abort");
    }
    check_drained(c);
    if (!pool_can_step(c->pool)) return;
    while (c->waiting && c->n_running < c->max_seqs) {
        gen *g = c->waiting;
        c->waiting = g->next;
        c->n_waiting--;
        g->next = NULL;
        gen **pp = &c->running; /* append: keeps admission order */
        while (*pp) pp = &(*pp)->next;
        *pp = g;
        c->n_running++;
    }
    if (!c->running) return;
    int n = c->n_running;
    Duet__SeqChunk *chunks = xcalloc((size_t)n, sizeof *chunks);
    Duet__SeqChunk **cp = xcalloc((size_t)n, sizeof *cp);
    Duet__SamplingParams *sp = xcalloc((size_t)n, sizeof *sp);
    int k = 0;
    for (gen *g = c->running; g; g = g->next, k++) {
        Duet__SeqChunk *ch = &chunks[k];
        duet__seq_chunk__init(ch);
        duet__sampling_params__init(&sp[k]);
        sp[k].temperature = g->temperature;
        sp[k].top_p = g->top_p;
        sp[k].top_k = g->top_k;
        sp[k].seed = g->seed;
        ch->seq_id = g->seq_id;
        if (g->n_out == 0) {
            ch->start_pos = 0;
            ch->n_token_ids = (size_t)g->n_prompt;
            ch->token_ids = g->prompt;
        } else {
            ch->start_pos = (uint32_t)(g->n_prompt + g->n_out - 1);
            ch->n_token_ids = 1;
            ch->token_ids = &g->out[g->n_out - 1];
        }
        ch->sample = 1;
        ch->sampling = &sp[k];
        ch->return_logits = g->return_logits;
        cp[k] = ch;
        g->in_step = 1;
    }
    Duet__StepPlan plan = DUET__STEP_PLAN__INIT;
    plan.n_chunks = (size_t)n;
    plan.chunks = cp;
    char err[300];
    c->step_started = coord_now_s();
    int rc = pool_step(c->pool, &plan, step_done, c, err, sizeof err);
    free(chunks);
    free(cp);
    free(sp);
    if (rc) {
        for (gen *g = c->running, *nx; g; g = nx) {
            nx = g->next;
            fail_gen(c, &c->running, &c->n_running, g, "internal", err);
        }
        check_drained(c);
        return;
    }
}

static void check_drained(coord *c) {
    if (!c->draining || in_flight(c)) return;
    while (c->drain_waits) {
        drain_wait *d = c->drain_waits;
        c->drain_waits = d->next;
        admin_reply_ok(d->r, json_pack("{s:s, s:i}", "state", "drained", "in_flight", 0));
        free(d);
    }
    if (c->exit_when_drained) {
        c->exit_when_drained = 0; /* once */
        coord_log("drained; exiting");
        event_base_loopbreak(c->base);
    }
}

/* Ends every request at the next step boundary (drain timeout). */
static void abort_all(coord *c) {
    while (c->waiting) {
        gen *g = c->waiting;
        c->waiting = g->next;
        c->n_waiting--;
        gen_reply_ok(c, g, "abort");
        c->aborted++;
        gen_free(g);
    }
    for (gen *g = c->running; g; g = g->next) g->abort = 1;
    schedule(c);
    check_drained(c);
}

/* ---- admin commands ------------------------------------------------------------------- */

static json_t *status_json(coord *c, int verbose) {
    double t = coord_now_s();
    char fp[32];
    snprintf(fp, sizeof fp, "%016llx", (unsigned long long)pool_fingerprint(c->pool));
    uint64_t done, total;
    pool_load_progress(c->pool, &done, &total);
    json_t *s = json_object();
    json_object_set_new(s, "state", json_string(state_name(c)));
    json_object_set_new(s, "version", json_string(DUET_VERSION));
    json_object_set_new(s, "commit", json_string(DUET_COMMIT));
    json_object_set_new(s, "uptime_s", json_integer((json_int_t)(t - c->start_time)));
    json_object_set_new(s, "last_step_age_ms",
                        c->last_step_time > 0
                            ? json_integer((json_int_t)((t - c->last_step_time) * 1000))
                            : json_null());
    json_object_set_new(s, "last_step_ms",
                        c->last_step_time > 0 ? json_real(c->last_step_ms) : json_null());
    json_object_set_new(s, "pool", json_string(pool_state_name(pool_get_state(c->pool))));
    json_object_set_new(s, "model", json_pack("{s:s, s:i}", "fingerprint", fp, "max_model_len",
                                              c->max_seq_len));
    json_object_set_new(s, "loading",
                        json_pack("{s:I, s:I, s:f}", "bytes_done", (json_int_t)done,
                                  "bytes_total", (json_int_t)total, "percent",
                                  total ? 100.0 * (double)done / (double)total : 0.0));
    json_object_set_new(s, "workers", pool_workers_json(c->pool));
    json_object_set_new(s, "queue", json_pack("{s:i, s:i, s:i, s:i}", "running", c->n_running,
                                              "waiting", c->n_waiting, "max_running",
                                              c->max_seqs, "max_waiting", c->max_waiting));
    json_object_set_new(s, "counters",
                        json_pack("{s:I, s:I, s:I, s:I}", "completed", (json_int_t)c->completed,
                                  "failed", (json_int_t)c->failed, "aborted",
                                  (json_int_t)c->aborted, "rejected", (json_int_t)c->rejected));
    if (verbose) {
        json_t *reqs = json_array();
        for (int pass = 0; pass < 2; pass++)
            for (gen *g = pass ? c->waiting : c->running; g; g = g->next) {
                char buf[32];
                json_array_append_new(
                    reqs, json_pack("{s:s, s:s, s:i, s:i, s:i}", "request_id",
                                    gen_rid(g, buf, sizeof buf), "state",
                                    pass ? "waiting" : "running", "prompt_tokens", g->n_prompt,
                                    "generated", g->n_out, "max_tokens", g->max_tokens));
            }
        json_object_set_new(s, "requests", reqs);
    }
    return s;
}

static void cmd_generate(coord *c, admin_req *r, json_t *req) {
    json_t *ids = json_object_get(req, "prompt_ids");
    json_t *mt = json_object_get(req, "max_tokens");
    json_t *rl = json_object_get(req, "return_logits");
    json_t *temp = json_object_get(req, "temperature");
    json_t *seed = json_object_get(req, "seed");
    if (!json_is_array(ids) || json_array_size(ids) == 0) {
        c->rejected++;
        admin_reply_err(r, "bad_request", "\"prompt_ids\" must be a non-empty array of token ids");
        return;
    }
    if (mt && (!json_is_integer(mt) || json_integer_value(mt) < 1)) {
        c->rejected++;
        admin_reply_err(r, "bad_request", "\"max_tokens\" must be an integer >= 1");
        return;
    }
    if ((rl && !json_is_boolean(rl)) || (temp && (!json_is_number(temp) ||
                                                  json_number_value(temp) < 0)) ||
        (seed && (!json_is_integer(seed) || json_integer_value(seed) < 0))) {
        c->rejected++;
        admin_reply_err(r, "bad_request",
                        "\"return_logits\" must be a boolean, \"temperature\" a number >= 0, "
                        "\"seed\" an integer >= 0");
        return;
    }
    size_t n = json_array_size(ids);
    long long max_tokens = mt ? json_integer_value(mt) : 16;
    if ((long long)n + max_tokens > c->max_seq_len) {
        c->rejected++;
        admin_reply_err(r, "bad_request",
                        "prompt (%zu tokens) + max_tokens (%lld) exceeds --max-seq-len %d", n,
                        max_tokens, c->max_seq_len);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(ids, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > INT32_MAX) {
            c->rejected++;
            admin_reply_err(r, "bad_request", "prompt_ids[%zu] is not a token id (an integer >= 0)",
                            i);
            return;
        }
    }
    if (c->draining) {
        c->rejected++;
        admin_reply_err(r, "server_draining",
                        "the server is draining and admits no new requests (duetctl resume "
                        "reopens admission)");
        return;
    }
    if (pool_get_state(c->pool) == POOL_FAILED) {
        c->rejected++;
        admin_reply_err(r, "no_workers", "the worker group could not be started");
        return;
    }
    if (c->n_waiting >= c->max_waiting) {
        c->rejected++;
        admin_reply_err(r, "server_overloaded", "%d requests are already waiting",
                        c->n_waiting);
        return;
    }
    gen *g = xcalloc(1, sizeof *g);
    g->r = r;
    g->seq_id = ++c->next_seq_id;
    g->n_prompt = (int)n;
    g->prompt = xmalloc(n * sizeof *g->prompt);
    for (size_t i = 0; i < n; i++) g->prompt[i] = (int32_t)json_integer_value(json_array_get(ids, i));
    g->max_tokens = (int)max_tokens;
    g->out = xmalloc((size_t)g->max_tokens * sizeof *g->out);
    g->return_logits = rl && json_is_true(rl);
    g->logits = json_array();
    g->temperature = temp ? (float)json_number_value(temp) : 0.0f;
    g->top_p = 1.0f;
    g->seed = seed ? (uint64_t)json_integer_value(seed) : g->seq_id;
    g->deadline = coord_now_s() + c->recover_timeout_s;
    gen **pp = &c->waiting;
    while (*pp) pp = &(*pp)->next;
    *pp = g;
    c->n_waiting++;
    schedule(c);
}

/* ---- the engine API for the HTTP front (coordinator/http/engine.h) ------------------------ */

static int eng_submit(void *ctx, const eng_params *p, const eng_sink *sink, const char **code,
                      char *msg, size_t msglen) {
    coord *c = ctx;
    if (c->draining) {
        c->rejected++;
        *code = "server_draining";
        snprintf(msg, msglen, "the server is draining and admits no new requests");
        return -1;
    }
    if (pool_get_state(c->pool) == POOL_FAILED) {
        c->rejected++;
        *code = "no_workers";
        snprintf(msg, msglen, "the worker group could not be started");
        return -1;
    }
    if (c->n_waiting >= c->max_waiting) {
        c->rejected++;
        *code = "server_overloaded";
        snprintf(msg, msglen, "%d requests are already waiting", c->n_waiting);
        return -1;
    }
    gen *g = xcalloc(1, sizeof *g);
    g->sink = *sink;
    g->rid = xstrdup(p->request_id ? p->request_id : "");
    g->seq_id = ++c->next_seq_id;
    g->n_prompt = p->n_prompt;
    g->prompt = xmalloc((size_t)p->n_prompt * sizeof *g->prompt);
    memcpy(g->prompt, p->prompt, (size_t)p->n_prompt * sizeof *g->prompt);
    g->max_tokens = p->max_tokens;
    g->out = xmalloc((size_t)g->max_tokens * sizeof *g->out);
    g->logits = json_array();
    g->temperature = p->temperature;
    g->top_p = p->top_p;
    g->top_k = p->top_k;
    g->seed = p->seed;
    g->deadline = coord_now_s() + c->recover_timeout_s;
    gen **pp = &c->waiting;
    while (*pp) pp = &(*pp)->next;
    *pp = g;
    c->n_waiting++;
    schedule(c);
    return 0;
}

static const char *eng_state(void *ctx) { return state_name(ctx); }

static int eng_workers_up(void *ctx) {
    coord *c = ctx;
    return pool_get_state(c->pool) == POOL_READY;
}

static void start_drain(coord *c, double timeout_s) {
    if (!c->draining) coord_log("draining: %d requests in flight", in_flight(c));
    c->draining = 1;
    c->drain_deadline = timeout_s > 0 ? coord_now_s() + timeout_s : 0;
}

static void admin_cb(void *ctx, admin_req *r, const char *cmd, json_t *req) {
    coord *c = ctx;
    if (!strcmp(cmd, "status")) {
        json_t *v = json_object_get(req, "verbose");
        admin_reply_ok(r, status_json(c, json_is_true(v)));
    } else if (!strcmp(cmd, "drain")) {
        json_t *to = json_object_get(req, "timeout_s");
        json_t *wait = json_object_get(req, "wait");
        if ((to && (!json_is_number(to) || json_number_value(to) < 0)) ||
            (wait && !json_is_boolean(wait))) {
            admin_reply_err(r, "bad_request",
                            "drain: \"timeout_s\" must be a number >= 0 and \"wait\" a boolean");
            return;
        }
        start_drain(c, to ? json_number_value(to) : 0);
        if (json_is_true(wait) && in_flight(c)) {
            drain_wait *d = xcalloc(1, sizeof *d);
            d->r = r;
            d->next = c->drain_waits;
            c->drain_waits = d;
        } else {
            admin_reply_ok(r, json_pack("{s:s, s:i}", "state", state_name(c), "in_flight",
                                        in_flight(c)));
        }
        check_drained(c);
    } else if (!strcmp(cmd, "resume")) {
        if (c->draining) coord_log("resuming admission");
        c->draining = 0;
        c->drain_deadline = 0;
        c->exit_when_drained = 0;
        while (c->drain_waits) {
            drain_wait *d = c->drain_waits;
            c->drain_waits = d->next;
            admin_reply_ok(d->r, json_pack("{s:s, s:i}", "state", state_name(c), "in_flight",
                                           in_flight(c)));
            free(d);
        }
        admin_reply_ok(r, json_pack("{s:s}", "state", state_name(c)));
    } else if (!strcmp(cmd, "reload")) {
        coord_log("reload: reconnecting workers that are down");
        pool_kick(c->pool);
        admin_reply_ok(r, json_pack("{s:[], s:[], s:o}", "applied", "restart_required",
                                    "workers", pool_workers_json(c->pool)));
    } else if (!strcmp(cmd, "generate")) {
        cmd_generate(c, r, req);
    } else if (!strcmp(cmd, "abort")) {
        json_t *id = json_object_get(req, "request_id");
        const char *s = json_string_value(id);
        if (!s) {
            admin_reply_err(r, "bad_request", "abort: \"request_id\" must be a string");
            return;
        }
        for (int pass = 0; pass < 2; pass++)
            for (gen *g = pass ? c->waiting : c->running; g; g = g->next) {
                if (!rid_matches(g, s)) continue;
                g->abort = 1;
                if (pass) { /* waiting: ends now */
                    unlink_gen(&c->waiting, g);
                    c->n_waiting--;
                    gen_reply_ok(c, g, "abort");
                    c->aborted++;
                    gen_free(g);
                }
                admin_reply_ok(r, NULL);
                schedule(c);
                check_drained(c);
                return;
            }
        admin_reply_err(r, "not_found", "no request %s is in flight", s);
    } else if (!strcmp(cmd, "flush-prefix-cache")) {
        /* no prefix cache yet: nothing to free */
        admin_reply_ok(r, json_pack("{s:i, s:i}", "freed_tokens", 0, "freed_bytes", 0));
    } else {
        admin_reply_err(r, "unknown_command",
                        "unknown command \"%s\" (status, drain, resume, reload, abort, "
                        "flush-prefix-cache, generate)",
                        cmd);
    }
}

/* ---- pool events, signals, tick -------------------------------------------------------- */

static void pool_cb(void *arg, pool_event ev, const char *msg) {
    coord *c = arg;
    switch (ev) {
    case POOL_EV_READY:
        coord_log("serving");
        schedule(c);
        break;
    case POOL_EV_DOWN: /* the pool logged msg */
        coord_log("not ready: re-forming the worker group (requests wait up to %.0f s)",
              c->recover_timeout_s);
        break;
    case POOL_EV_FATAL:
        coord_log("cannot start: %s", msg);
        c->exit_code = 1;
        event_base_loopbreak(c->base);
        break;
    }
}

static void signal_cb(evutil_socket_t sig, short what, void *arg) {
    coord *c = arg;
    if (sig == SIGHUP) {
        coord_log("SIGHUP: reload");
        pool_kick(c->pool);
        return;
    }
    if (c->signals++ > 0) {
        coord_log("second signal: exiting now");
        event_base_loopbreak(c->base);
        return;
    }
    coord_log("%s: draining (grace %.0f s), then exiting", sig == SIGTERM ? "SIGTERM" : "SIGINT",
          c->drain_grace_s);
    c->exit_when_drained = 1;
    start_drain(c, c->drain_grace_s);
    check_drained(c);
}

static void tick_cb(evutil_socket_t fd, short what, void *arg) {
    coord *c = arg;
    double t = coord_now_s();
    if (c->draining && c->drain_deadline > 0 && t > c->drain_deadline) {
        coord_log("drain timeout: aborting %d requests", in_flight(c));
        c->drain_deadline = 0;
        abort_all(c);
    }
    if (pool_get_state(c->pool) != POOL_READY) {
        for (gen *g = c->waiting, *nx; g; g = nx) {
            nx = g->next;
            if (t > g->deadline)
                fail_gen(c, &c->waiting, &c->n_waiting, g, "no_workers",
                         "no healthy worker group within --worker-recover-timeout; see duetctl "
                         "status for the workers' errors");
        }
        check_drained(c);
    }
    schedule(c);
}

/* ---- main ---------------------------------------------------------------------------- */

static void usage(FILE *f) {
    fprintf(f,
            "usage: duet-coordinator --workers H:P[,H:P...] --auth-token-file F\n"
            "         [--admin-socket PATH] [--model-fingerprint HEX] [--connect-timeout S]\n"
            "         [--max-seq-len L] [--max-seqs N] [--step-timeout S]\n"
            "         [--heartbeat-timeout S] [--drain-grace S] [--worker-recover-timeout S]\n"
            "         [--load-timeout S]\n"
            "         [--listen HOST:PORT --tokenizer PATH [--api-key-file F]\n"
            "          [--max-body-bytes N] [--vocab-size N] [--served-model-name NAME]\n"
            "          [--fold-prompt-ids]]\n"
            "Connects to the workers (rank order), loads the model and serves the admin socket\n"
            "(duetctl), and with --listen the OpenAI-compatible HTTP API. SIGTERM drains then exits; a second signal exits now; SIGHUP reloads.\n");
}

static int parse_num(const char *opt, const char *s, double lo, double hi, double *out) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "duet-coordinator: %s: '%s' is not a number in [%g, %g]\n", opt, s, lo,
                hi);
        return -1;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    const char *workers = NULL, *token_file = NULL, *sock = NULL, *fp_s = NULL;
    const char *listen_addr = NULL, *tok_path = NULL, *key_file = NULL;
    const char *model_name = "deepseek-v4-flash";
    double max_body = 32 << 20, vocab = 129280;
    int fold_ids = 0;
    double connect_timeout = 60, max_seq_len = 4096, max_seqs = 8, step_timeout = 120;
    double hb_timeout = 5, drain_grace = 30, recover = 30, load_timeout = 600;
    static const struct option opts[] = {
        {"workers", required_argument, 0, 'w'},
        {"auth-token-file", required_argument, 0, 'a'},
        {"admin-socket", required_argument, 0, 's'},
        {"model-fingerprint", required_argument, 0, 'f'},
        {"connect-timeout", required_argument, 0, 'c'},
        {"max-seq-len", required_argument, 0, 'L'},
        {"max-seqs", required_argument, 0, 'n'},
        {"step-timeout", required_argument, 0, 'T'},
        {"heartbeat-timeout", required_argument, 0, 'H'},
        {"drain-grace", required_argument, 0, 'g'},
        {"worker-recover-timeout", required_argument, 0, 'r'},
        {"load-timeout", required_argument, 0, 'l'},
        {"listen", required_argument, 0, 'P'},
        {"tokenizer", required_argument, 0, 'K'},
        {"api-key-file", required_argument, 0, 'A'},
        {"max-body-bytes", required_argument, 0, 'B'},
        {"vocab-size", required_argument, 0, 'V'},
        {"served-model-name", required_argument, 0, 'M'},
        {"fold-prompt-ids", no_argument, 0, 'F'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        int bad = 0;
        switch (o) {
        case 'w': workers = optarg; break;
        case 'a': token_file = optarg; break;
        case 's': sock = optarg; break;
        case 'f': fp_s = optarg; break;
        case 'c': bad = parse_num("--connect-timeout", optarg, 0, 1e7, &connect_timeout); break;
        case 'L': bad = parse_num("--max-seq-len", optarg, 1, 1 << 30, &max_seq_len); break;
        case 'n': bad = parse_num("--max-seqs", optarg, 1, 65536, &max_seqs); break;
        case 'T': bad = parse_num("--step-timeout", optarg, 0, 1e7, &step_timeout); break;
        case 'H': bad = parse_num("--heartbeat-timeout", optarg, 0.1, 1e7, &hb_timeout); break;
        case 'g': bad = parse_num("--drain-grace", optarg, 0, 1e7, &drain_grace); break;
        case 'r': bad = parse_num("--worker-recover-timeout", optarg, 0, 1e7, &recover); break;
        case 'l': bad = parse_num("--load-timeout", optarg, 0, 1e7, &load_timeout); break;
        case 'P': listen_addr = optarg; break;
        case 'K': tok_path = optarg; break;
        case 'A': key_file = optarg; break;
        case 'B': bad = parse_num("--max-body-bytes", optarg, 1024, 1 << 30, &max_body); break;
        case 'V': bad = parse_num("--vocab-size", optarg, 2, 1 << 24, &vocab); break;
        case 'M': model_name = optarg; break;
        case 'F': fold_ids = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (bad) return 2;
    }
    if (!workers || !token_file || optind != argc) {
        usage(stderr);
        return 2;
    }
    if (listen_addr && !tok_path) {
        fprintf(stderr, "duet-coordinator: --listen needs --tokenizer PATH (the model's "
                        "tokenizer.json)\n");
        return 2;
    }
    if (!listen_addr && (tok_path || key_file)) {
        fprintf(stderr, "duet-coordinator: --tokenizer and --api-key-file only make sense with "
                        "--listen HOST:PORT\n");
        return 2;
    }
    uint64_t fingerprint = 0;
    if (fp_s) {
        char *end;
        fingerprint = strtoull(fp_s, &end, 16);
        if (end == fp_s || *end || !fingerprint) {
            fprintf(stderr, "duet-coordinator: --model-fingerprint: '%s' is not a non-zero hex "
                            "number\n", fp_s);
            return 2;
        }
    }
    char err[1024];
    char token[512];
    if (rpc_read_token_file(token_file, token, sizeof token, err, sizeof err)) {
        fprintf(stderr, "duet-coordinator: %s\n", err);
        return 2;
    }
    /* split --workers */
    char *wl = xstrdup(workers);
    char **addrs = NULL;
    int n_addrs = 0;
    for (char *save = NULL, *tok = strtok_r(wl, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        addrs = xrealloc(addrs, (size_t)(n_addrs + 1) * sizeof *addrs);
        addrs[n_addrs++] = tok;
    }
    char path[256];
    if (!sock) {
        if (admin_default_path(path, sizeof path, err, sizeof err)) {
            fprintf(stderr, "duet-coordinator: %s\n", err);
            free(addrs);
            free(wl);
            return 2;
        }
        sock = path;
    }
    signal(SIGPIPE, SIG_IGN);
    coord c;
    memset(&c, 0, sizeof c);
    c.base = event_base_new();
    c.max_seqs = (int)max_seqs;
    c.max_seq_len = (int)max_seq_len;
    c.max_waiting = 256;
    c.recover_timeout_s = recover;
    c.drain_grace_s = drain_grace;
    c.start_time = coord_now_s();
    int rc = 0;
    if (admin_open(c.base, sock, admin_cb, &c, &c.adm, err, sizeof err)) {
        fprintf(stderr, "duet-coordinator: %s\n", err);
        rc = 2;
        goto out;
    }
    coord_log("admin socket %s", sock);
    pool_cfg pc = {.addrs = (const char *const *)addrs,
                   .n_workers = n_addrs,
                   .token = token,
                   .fingerprint = fingerprint,
                   .connect_timeout_s = connect_timeout,
                   .heartbeat_s = 1,
                   .heartbeat_timeout_s = hb_timeout,
                   .step_timeout_s = step_timeout,
                   .load_timeout_s = load_timeout,
                   .max_seqs = (uint32_t)max_seqs,
                   .max_seq_len = (uint32_t)max_seq_len};
    if (pool_new(c.base, &pc, pool_cb, &c, &c.pool, err, sizeof err)) {
        fprintf(stderr, "duet-coordinator: %s\n", err);
        rc = 2;
        goto out;
    }
    if (listen_addr) {
        eng_api api = {.ctx = &c, .submit = eng_submit, .state = eng_state,
                       .workers_up = eng_workers_up};
        http_cfg hc = {.listen = listen_addr,
                       .tokenizer_path = tok_path,
                       .api_key_file = key_file,
                       .max_body_bytes = (size_t)max_body,
                       .max_model_len = (int)max_seq_len,
                       .vocab_size = (int)vocab,
                       .fold_prompt_ids = fold_ids,
                       .model_id = model_name,
                       .version = DUET_VERSION,
                       .commit = DUET_COMMIT};
        if (http_open(c.base, &hc, &api, &c.http, err, sizeof err)) {
            fprintf(stderr, "duet-coordinator: %s\n", err);
            rc = 2;
            goto out;
        }
    }
    coord_log("connecting to %d workers: %s", n_addrs, workers);
    c.sig_term = evsignal_new(c.base, SIGTERM, signal_cb, &c);
    c.sig_int = evsignal_new(c.base, SIGINT, signal_cb, &c);
    c.sig_hup = evsignal_new(c.base, SIGHUP, signal_cb, &c);
    event_add(c.sig_term, NULL);
    event_add(c.sig_int, NULL);
    event_add(c.sig_hup, NULL);
    c.tick = event_new(c.base, -1, EV_PERSIST, tick_cb, &c);
    struct timeval tv = {0, 200000};
    event_add(c.tick, &tv);
    event_base_dispatch(c.base);
    rc = c.exit_code;
out:
    /* answer whatever is still pending, then free everything */
    while (c.waiting) {
        gen *g = c.waiting;
        c.waiting = g->next;
        gen_reply_err(g, "internal", "the coordinator is shutting down");
        gen_free(g);
    }
    while (c.running) {
        gen *g = c.running;
        c.running = g->next;
        gen_reply_err(g, "internal", "the coordinator is shutting down");
        gen_free(g);
    }
    while (c.drain_waits) {
        drain_wait *d = c.drain_waits;
        c.drain_waits = d->next;
        admin_reply_ok(d->r, json_pack("{s:s, s:i}", "state", "drained", "in_flight", 0));
        free(d);
    }
    pool_free(c.pool);
    http_free(c.http);
    admin_close(c.adm);
    if (c.tick) event_free(c.tick);
    if (c.sig_term) event_free(c.sig_term);
    if (c.sig_int) event_free(c.sig_int);
    if (c.sig_hup) event_free(c.sig_hup);
    event_base_free(c.base);
    free(addrs);
    free(wl);
    memset(token, 0, sizeof token);
    return rc;
}
