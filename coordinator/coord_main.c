/* coord_main.c — `duet-coordinator`: main, flags, the admin socket's commands and signals.
 *
 * Why: this is the head-node process of the worker-first launch. Workers are started first and
 * listen; the coordinator connects to all of them (coordinator/pool.c), loads the model, and
 * serves. Generation — scheduling, KV blocks, the prefix cache, preemption, the canary, drain —
 * is the engine's business (coordinator/engine/sched.c, coordinator/engine/kvm.c); it is reachable through the
 * HTTP API (--listen, coordinator/http) and the admin socket's `generate` command (a
 * testing/debug command: token ids in, token ids and optionally logits out), both through the
 * same engine. This file only wires them together: flags, the metrics registry shared by the
 * engine, the pool and the HTTP front, the admin dispatch, signals and the tick.
 *
 * What it must never do: crash or exit on a bad request or a failing worker (only a start-up
 * problem that cannot fix itself — deadline, auth, fingerprint — ends the process, with the
 * reason), or shut the workers down when it exits (they belong to their own service).
 *
 *   duet-coordinator [--config FILE] --workers H:P[,H:P...] --auth-token-file F
 *                    [--admin-socket PATH]
 *                    [--model-fingerprint HEX] [--connect-timeout S] [--max-seq-len L]
 *                    [--max-num-seqs N (alias --max-seqs)] [--max-num-batched-tokens N]
 *                    [--max-waiting N] [--block-size B] [--step-timeout S]
 *                    [--heartbeat-timeout S] [--drain-grace S] [--worker-recover-timeout S]
 *                    [--load-timeout S] [--metrics-vllm-names] [--metrics-require-auth]
 *                    [--stall-timeout S] [--health-generate-timeout S] [--sse-keepalive S]
 *                    [--listen HOST:PORT --tokenizer tokenizer.json [--api-key-file F]
 *                     [--max-body-bytes N] [--vocab-size N] [--served-model-name NAME]
 *                     [--fold-prompt-ids]]
 * --vocab-size is the model's vocabulary (prompt ids at or above it are refused with a 400;
 * the real model's is the tokenizer's, 129280). --fold-prompt-ids is for tests on the tiny
 * model (vocabulary 1024): prompt ids at or above --vocab-size become id % vocab-size.
 * --config FILE: a JSON object of the keys of docs/config.md (coordinator/config.h); every
 * flag is one of those keys and wins over the file. `reload` (admin) and SIGHUP re-read it.
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
#include "coordinator/config.h"
#include "coordinator/http/engine.h"
#include "coordinator/http/http.h"
#include "coordinator/metrics.h"
#include "coordinator/pool.h"
#include "coordinator/engine/sched.h"

#ifndef DUET_VERSION
#define DUET_VERSION "0.1.0"
#endif
#include "duet_commit.h" /* DUET_COMMIT, generated (coordinator/duet_commit.h.in) */

/* ---- state ---------------------------------------------------------------------------- */

typedef struct drain_wait {
    struct drain_wait *next;
    admin_req *r;
} drain_wait;

typedef struct {
    struct event_base *base;
    pool *pool;
    sched *eng;
    metrics *metrics;
    admin *adm;
    http_server *http;         /* NULL without --listen */
    int max_seq_len;
    drain_wait *drain_waits;
    int exit_when_drained, signals;
    int exit_code;
    uint64_t next_gen;         /* admin generate ids: gen-<n> */
    double start_time;
    double drain_grace_s, recover_timeout_s;
    struct event *tick, *sig_term, *sig_int, *sig_hup;
    duet_config cfg;           /* what is running (restart-only keys as started) */
    const char *config_path;   /* --config, or NULL */
    json_t *flags;             /* the flags as config keys: they win over the file on reload */
} coord;

static json_t *do_reload(coord *c, char *err, size_t errlen);

/* ---- admin `generate`: an engine sink that answers the admin request -------------------- */

/* One admin generate request: n choices (sequences) whose results are collected, answered
 * once every choice has ended. Owned by itself: freed when the last choice ends. */
typedef struct {
    admin_req *r;
    char rid[32];
    int n, n_ended, n_prompt;
    int return_logits;
    struct admin_choice {
        json_t *ids, *logits;   /* generated ids; logits rows (return_logits) */
        const char *finish;     /* static string; NULL = failed */
        int cached_tokens;
        char code[32], msg[700];
    } *ch;
} admin_gen;

typedef struct {
    admin_gen *g;
    int i;
} admin_choice_ref;

static int ag_token(void *user, const eng_token *t) {
    admin_choice_ref *cr = user;
    struct admin_choice *c = &cr->g->ch[cr->i];
    json_array_append_new(c->ids, json_integer(t->id));
    c->cached_tokens = t->cached_tokens;
    return 0;
}

static void ag_logits(void *user, const float *row, size_t vocab) {
    admin_choice_ref *cr = user;
    json_t *a = json_array();
    for (size_t v = 0; v < vocab; v++) /* JSON has no NaN/Inf: those become null */
        json_array_append_new(a, isfinite(row[v]) ? json_real(row[v]) : json_null());
    json_array_append_new(cr->g->ch[cr->i].logits, a);
}

static int ag_connected(void *user) {
    admin_choice_ref *cr = user;
    return admin_req_connected(cr->g->r);
}

static void ag_free(admin_gen *g) {
    for (int i = 0; i < g->n; i++) {
        json_decref(g->ch[i].ids);
        json_decref(g->ch[i].logits);
    }
    free(g->ch);
    free(g);
}

static json_t *choice_json(admin_gen *g, int i) {
    struct admin_choice *c = &g->ch[i];
    json_t *o = json_pack("{s:O, s:s, s:i, s:i}", "token_ids", c->ids, "finish_reason",
                          c->finish, "prompt_tokens", g->n_prompt, "cached_tokens",
                          c->cached_tokens);
    if (g->return_logits) json_object_set(o, "logits", c->logits);
    return o;
}

static void ag_end(void *user, const char *finish, const char *code, const char *msg) {
    admin_choice_ref *cr = user;
    admin_gen *g = cr->g;
    struct admin_choice *c = &g->ch[cr->i];
    c->finish = finish;
    if (!finish) {
        snprintf(c->code, sizeof c->code, "%s", code ? code : "internal");
        snprintf(c->msg, sizeof c->msg, "%s", msg ? msg : "failed");
    }
    free(cr);
    if (++g->n_ended < g->n) return;
    for (int i = 0; i < g->n; i++) /* any failure fails the command */
        if (!g->ch[i].finish) {
            admin_reply_err(g->r, g->ch[i].code, "%s", g->ch[i].msg);
            ag_free(g);
            return;
        }
    json_t *res = choice_json(g, 0);
    json_object_set_new(res, "request_id", json_string(g->rid));
    if (g->n > 1) {
        json_t *arr = json_array();
        for (int i = 0; i < g->n; i++) json_array_append_new(arr, choice_json(g, i));
        json_object_set_new(res, "choices", arr);
    }
    admin_reply_ok(g->r, res);
    ag_free(g);
}

/* {"cmd":"generate","prompt_ids":[...],"max_tokens":16,"return_logits":false,
 *  "temperature":0,"seed":S,"n":1,"priority":0}: n choices (RNG streams 0..n-1) of one prompt;
 * the result is choice 0's fields, plus "choices" when n > 1. */
static void cmd_generate(coord *c, admin_req *r, json_t *req) {
    json_t *ids = json_object_get(req, "prompt_ids");
    json_t *mt = json_object_get(req, "max_tokens");
    json_t *rl = json_object_get(req, "return_logits");
    json_t *temp = json_object_get(req, "temperature");
    json_t *seed = json_object_get(req, "seed");
    json_t *nn = json_object_get(req, "n");
    json_t *prio = json_object_get(req, "priority");
    if (!json_is_array(ids) || json_array_size(ids) == 0) {
        sched_note_rejected(c->eng);
        admin_reply_err(r, "bad_request", "\"prompt_ids\" must be a non-empty array of token ids");
        return;
    }
    if (mt && (!json_is_integer(mt) || json_integer_value(mt) < 1)) {
        sched_note_rejected(c->eng);
        admin_reply_err(r, "bad_request", "\"max_tokens\" must be an integer >= 1");
        return;
    }
    if ((rl && !json_is_boolean(rl)) || (temp && (!json_is_number(temp) ||
                                                  json_number_value(temp) < 0)) ||
        (seed && (!json_is_integer(seed) || json_integer_value(seed) < 0)) ||
        (nn && (!json_is_integer(nn) || json_integer_value(nn) < 1 ||
                json_integer_value(nn) > 256)) ||
        (prio && (!json_is_integer(prio) || json_integer_value(prio) < -1000000 ||
                  json_integer_value(prio) > 1000000))) {
        sched_note_rejected(c->eng);
        admin_reply_err(r, "bad_request",
                        "\"return_logits\" must be a boolean, \"temperature\" a number >= 0, "
                        "\"seed\" an integer >= 0, \"n\" an integer in 1..256, \"priority\" an "
                        "integer in -1000000..1000000");
        return;
    }
    size_t n = json_array_size(ids);
    long long max_tokens = mt ? json_integer_value(mt) : 16;
    if ((long long)n + max_tokens > c->max_seq_len) {
        sched_note_rejected(c->eng);
        admin_reply_err(r, "bad_request",
                        "prompt (%zu tokens) + max_tokens (%lld) exceeds --max-seq-len %d", n,
                        max_tokens, c->max_seq_len);
        return;
    }
    int32_t *prompt = xmalloc(n * sizeof *prompt);
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(ids, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > INT32_MAX) {
            free(prompt);
            sched_note_rejected(c->eng);
            admin_reply_err(r, "bad_request", "prompt_ids[%zu] is not a token id (an integer >= 0)",
                            i);
            return;
        }
        prompt[i] = (int32_t)json_integer_value(v);
    }
    admin_gen *g = xcalloc(1, sizeof *g);
    g->r = r;
    g->n = nn ? (int)json_integer_value(nn) : 1;
    g->n_prompt = (int)n;
    g->return_logits = rl && json_is_true(rl);
    g->ch = xcalloc((size_t)g->n, sizeof *g->ch);
    snprintf(g->rid, sizeof g->rid, "gen-%llu", (unsigned long long)++c->next_gen);
    eng_params p;
    eng_params_init(&p);
    p.prompt = prompt;
    p.n_prompt = (int)n;
    p.max_tokens = (int)max_tokens;
    p.temperature = temp ? (float)json_number_value(temp) : 0.0f;
    p.seed = seed ? (uint64_t)json_integer_value(seed) : c->next_gen;
    p.priority = prio ? (int)json_integer_value(prio) : 0;
    p.request_id = g->rid;
    int submitted = 0;
    for (int i = 0; i < g->n; i++) {
        g->ch[i].ids = json_array();
        g->ch[i].logits = json_array();
    }
    for (int i = 0; i < g->n; i++) {
        admin_choice_ref *cr = xcalloc(1, sizeof *cr);
        cr->g = g;
        cr->i = i;
        eng_sink sink = {.on_token = ag_token, .on_end = ag_end, .connected = ag_connected,
                         .user = cr};
        p.choice = (uint32_t)i;
        const char *code = "internal";
        char msg[300];
        if (sched_submit(c->eng, &p, &sink, g->return_logits ? ag_logits : NULL, &code, msg,
                         sizeof msg)) {
            free(cr);
            if (!submitted) { /* nothing in flight: refuse the command as a whole */
                admin_reply_err(r, code, "%s", msg);
                ag_free(g);
                free(prompt);
                return;
            }
            /* some choices run: this one fails, the answer comes when they end */
            cr = xcalloc(1, sizeof *cr);
            cr->g = g;
            cr->i = i;
            ag_end(cr, NULL, code, msg);
            continue;
        }
        submitted++;
    }
    free(prompt);
}

/* ---- admin commands ------------------------------------------------------------------- */

static json_t *status_json(coord *c, int verbose) {
    double t = coord_now_s();
    char fp[32];
    snprintf(fp, sizeof fp, "%016llx", (unsigned long long)pool_fingerprint(c->pool));
    uint64_t done, total;
    pool_load_progress(c->pool, &done, &total);
    json_t *s = json_object();
    json_object_set_new(s, "state", json_string(sched_state(c->eng)));
    json_object_set_new(s, "version", json_string(DUET_VERSION));
    json_object_set_new(s, "commit", json_string(DUET_COMMIT));
    json_object_set_new(s, "uptime_s", json_integer((json_int_t)(t - c->start_time)));
    json_object_set_new(s, "pool", json_string(pool_state_name(pool_get_state(c->pool))));
    json_object_set_new(s, "model", json_pack("{s:s, s:i}", "fingerprint", fp, "max_model_len",
                                              c->max_seq_len));
    json_object_set_new(s, "loading",
                        json_pack("{s:I, s:I, s:f}", "bytes_done", (json_int_t)done,
                                  "bytes_total", (json_int_t)total, "percent",
                                  total ? 100.0 * (double)done / (double)total : 0.0));
    json_object_set_new(s, "workers", pool_workers_json(c->pool));
    sched_status(c->eng, s, verbose);
    return s;
}

static void answer_drain_waits(coord *c) {
    while (c->drain_waits) {
        drain_wait *d = c->drain_waits;
        c->drain_waits = d->next;
        admin_reply_ok(d->r, json_pack("{s:s, s:i}", "state", sched_state(c->eng), "in_flight",
                                       sched_in_flight(c->eng)));
        free(d);
    }
}

/* The engine drained (draining and nothing in flight). */
static void on_drained(void *arg) {
    coord *c = arg;
    answer_drain_waits(c);
    if (c->exit_when_drained) {
        c->exit_when_drained = 0; /* once */
        coord_log("drained; exiting");
        event_base_loopbreak(c->base);
    }
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
        if (json_is_true(wait) && sched_in_flight(c->eng)) {
            drain_wait *d = xcalloc(1, sizeof *d);
            d->r = r;
            d->next = c->drain_waits;
            c->drain_waits = d;
            sched_set_draining(c->eng, 1, to ? json_number_value(to) : 0);
        } else {
            sched_set_draining(c->eng, 1, to ? json_number_value(to) : 0);
            admin_reply_ok(r, json_pack("{s:s, s:i}", "state", sched_state(c->eng), "in_flight",
                                        sched_in_flight(c->eng)));
        }
    } else if (!strcmp(cmd, "resume")) {
        sched_set_draining(c->eng, 0, 0);
        c->exit_when_drained = 0;
        answer_drain_waits(c);
        admin_reply_ok(r, json_pack("{s:s}", "state", sched_state(c->eng)));
    } else if (!strcmp(cmd, "reload")) {
        char err[1024];
        json_t *res = do_reload(c, err, sizeof err);
        if (!res) {
            coord_log("reload refused (nothing applied): %s", err);
            admin_reply_err(r, "bad_request", "reload refused, nothing applied: %s", err);
            return;
        }
        admin_reply_ok(r, res);
    } else if (!strcmp(cmd, "generate")) {
        cmd_generate(c, r, req);
    } else if (!strcmp(cmd, "abort")) {
        const char *id = json_string_value(json_object_get(req, "request_id"));
        if (!id) {
            admin_reply_err(r, "bad_request", "abort: \"request_id\" must be a string");
            return;
        }
        if (sched_abort(c->eng, id)) admin_reply_err(r, "not_found", "no request %s is in flight", id);
        else admin_reply_ok(r, NULL);
    } else if (!strcmp(cmd, "flush-prefix-cache")) {
        uint64_t tokens, bytes;
        sched_flush_prefix_cache(c->eng, &tokens, &bytes);
        admin_reply_ok(r, json_pack("{s:I, s:I}", "freed_tokens", (json_int_t)tokens,
                                    "freed_bytes", (json_int_t)bytes));
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
        sched_pool_event(c->eng, ev);
        break;
    case POOL_EV_DOWN: /* the pool logged msg */
        coord_log("not ready: re-forming the worker group (requests wait up to %.0f s)",
                  c->recover_timeout_s);
        sched_pool_event(c->eng, ev);
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
    (void)what;
    if (sig == SIGHUP) {
        coord_log("SIGHUP: reload");
        char err[1024];
        json_t *res = do_reload(c, err, sizeof err);
        if (!res) coord_log("reload refused (nothing applied): %s", err);
        json_decref(res);
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
    sched_set_draining(c->eng, 1, c->drain_grace_s);
}

static void tick_cb(evutil_socket_t fd, short what, void *arg) {
    coord *c = arg;
    (void)fd;
    (void)what;
    sched_tick(c->eng);
}

/* ---- main ---------------------------------------------------------------------------- */

static void usage(FILE *f) {
    fprintf(f,
            "usage: duet-coordinator [--config FILE] --workers H:P[,H:P...] --auth-token-file F\n"
            "         [--admin-socket PATH] [--model-fingerprint HEX] [--connect-timeout S]\n"
            "         [--max-seq-len L] [--max-num-seqs N] [--max-num-batched-tokens N]\n"
            "         [--max-waiting N] [--block-size B] [--step-timeout S]\n"
            "         [--heartbeat-timeout S] [--drain-grace S] [--worker-recover-timeout S]\n"
            "         [--load-timeout S] [--metrics-vllm-names] [--metrics-require-auth]\n"
            "         [--stall-timeout S] [--health-generate-timeout S] [--sse-keepalive S]\n"
            "         [--listen HOST:PORT --tokenizer PATH [--api-key-file F]\n"
            "          [--max-body-bytes N] [--vocab-size N] [--served-model-name NAME]\n"
            "          [--fold-prompt-ids]]\n"
            "Connects to the workers (rank order), loads the model and serves the admin socket\n"
            "(duetctl), and with --listen the OpenAI-compatible HTTP API. --config FILE is a JSON\n"
            "object of the keys in docs/config.md (flags win over it). SIGTERM drains then exits;\n"
            "a second signal exits now; SIGHUP reloads (re-reads FILE and the API key file).\n");
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

/* The http_cfg of a configuration (strings borrowed from cfg). */
static void http_cfg_of(const duet_config *cfg, http_cfg *hc) {
    http_cfg_init(hc);
    hc->listen = cfg->listen;
    hc->tokenizer_path = cfg->tokenizer;
    hc->api_key_file = cfg->api_key_file;
    hc->api_keys = (const char *const *)cfg->api_keys.v;
    hc->n_api_keys = cfg->api_keys.n;
    hc->max_body_bytes = (size_t)cfg->max_body_bytes;
    hc->max_model_len = (int)cfg->max_model_len;
    hc->vocab_size = (int)cfg->vocab_size;
    hc->fold_prompt_ids = cfg->fold_prompt_ids;
    hc->model_id = cfg->served_model_name;
    hc->version = DUET_VERSION;
    hc->commit = DUET_COMMIT;
    hc->metrics_require_auth = cfg->metrics_require_auth;
    hc->stall_timeout_s = cfg->stall_timeout_s;
    hc->health_generate_timeout_s = cfg->health_generate_timeout_s;
    hc->sse_keepalive_s = cfg->sse_keepalive_s;
    hc->strict_request_fields = cfg->strict_request_fields;
    hc->cors_origins = (const char *const *)cfg->cors_origins.v;
    hc->n_cors_origins = cfg->cors_origins.n;
    hc->tool_stream_buffered = cfg->tool_stream == CFG_TOOL_STREAM_BUFFERED;
    hc->reasoning_field = cfg->reasoning_field == CFG_REASONING        ? HTTP_REASONING
                          : cfg->reasoning_field == CFG_REASONING_BOTH ? HTTP_REASONING_BOTH
                                                                       : HTTP_REASONING_CONTENT;
    hc->default_max_tokens_chat = (long long)cfg->default_max_tokens_chat;
    hc->default_max_tokens_cmpl = (long long)cfg->default_max_tokens_cmpl;
    hc->max_n = (int)cfg->max_n;
    hc->default_temperature = cfg->default_temperature;
    hc->default_top_p = cfg->default_top_p;
    hc->default_min_p = cfg->default_min_p;
    hc->default_thinking = cfg->default_thinking;
    hc->default_thinking_budget = (long long)cfg->default_thinking_budget;
    hc->model_aliases = (const char *const *)cfg->model_aliases.v;
    hc->n_model_aliases = cfg->model_aliases.n;
    hc->no_model_aliases = cfg->model_aliases.n == 0;
    hc->accept_any_model = cfg->accept_any_model;
}

/* reload (admin `reload`, SIGHUP): re-read the config file (and the API key file), apply the
 * reloadable keys, list the restart-only keys that changed, reconnect workers that are down.
 * All or nothing: a broken file or key file changes nothing. Returns the result object, or
 * NULL with err. */
static json_t *do_reload(coord *c, char *err, size_t errlen) {
    duet_config nc;
    if (ccfg_load(&nc, c->config_path, c->flags, err, errlen)) return NULL;
    json_t *applied = json_array(), *restart = json_array();
    ccfg_diff(&c->cfg, &nc, applied, restart);
    if (c->http) {
        http_cfg hc;
        http_cfg_of(&nc, &hc);
        int keys_changed = 0;
        if (http_reconfigure(c->http, &hc, &keys_changed, err, errlen)) {
            ccfg_free(&nc);
            json_decref(applied);
            json_decref(restart);
            return NULL;
        }
        int listed = 0;
        size_t i;
        json_t *v;
        json_array_foreach(applied, i, v) {
            const char *k = json_string_value(v);
            listed |= !strcmp(k, "api_keys") || !strcmp(k, "api_key_file");
        }
        if (keys_changed && !listed) /* same file, new content */
            json_array_append_new(applied, json_string(nc.api_key_file ? "api_key_file"
                                                                       : "api_keys"));
    }
    sched_reconfigure(c->eng, (int)nc.max_waiting, (int)nc.max_num_batched_tokens,
                      nc.worker_recover_timeout_s, nc.stall_timeout_s);
    c->drain_grace_s = nc.drain_grace_s;
    c->recover_timeout_s = nc.worker_recover_timeout_s;
    ccfg_free(&c->cfg);
    c->cfg = nc;
    pool_kick(c->pool);
    char *a = json_dumps(applied, JSON_COMPACT), *r = json_dumps(restart, JSON_COMPACT);
    coord_log("reload: applied %s, restart required %s; reconnecting workers that are down",
              a ? a : "?", r ? r : "?");
    free(a);
    free(r);
    return json_pack("{s:o, s:o, s:o}", "applied", applied, "restart_required", restart,
                     "workers", pool_workers_json(c->pool));
}

/* Flags as config keys (a flag wins over the file; kept for every reload). */
static void flag_num(json_t *f, const char *key, double v) {
    json_object_set_new(f, key, v == floor(v) && fabs(v) < 9e15 ? json_integer((json_int_t)v)
                                                                : json_real(v));
}

int main(int argc, char **argv) {
    const char *config_path = NULL;
    json_t *flags = json_object();
    double v = 0;
    static const struct option opts[] = {
        {"config", required_argument, 0, 'C'},
        {"workers", required_argument, 0, 'w'},
        {"auth-token-file", required_argument, 0, 'a'},
        {"admin-socket", required_argument, 0, 's'},
        {"model-fingerprint", required_argument, 0, 'f'},
        {"connect-timeout", required_argument, 0, 'c'},
        {"max-seq-len", required_argument, 0, 'L'},
        {"max-seqs", required_argument, 0, 'n'},
        {"max-num-seqs", required_argument, 0, 'n'},
        {"max-num-batched-tokens", required_argument, 0, 'b'},
        {"max-waiting", required_argument, 0, 'W'},
        {"block-size", required_argument, 0, 'S'},
        {"metrics-vllm-names", no_argument, 0, 'v'},
        {"metrics-require-auth", no_argument, 0, 'm'},
        {"stall-timeout", required_argument, 0, 'z'},
        {"health-generate-timeout", required_argument, 0, 'G'},
        {"sse-keepalive", required_argument, 0, 'k'},
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
#define NUMFLAG(ch, opt, key, lo, hi)                                                        \
    case ch:                                                                                 \
        bad = parse_num(opt, optarg, lo, hi, &v);                                            \
        if (!bad) flag_num(flags, key, v);                                                   \
        break;
#define STRFLAG(ch, key)                                                                     \
    case ch: json_object_set_new(flags, key, json_string(optarg)); break;
        switch (o) {
        case 'C': config_path = optarg; break;
        STRFLAG('w', "workers")
        STRFLAG('a', "auth_token_file")
        STRFLAG('s', "admin_socket")
        STRFLAG('f', "model_fingerprint")
        NUMFLAG('c', "--connect-timeout", "connect_timeout_s", 0, 1e7)
        NUMFLAG('L', "--max-seq-len", "max_model_len", 1, 1 << 30)
        NUMFLAG('n', "--max-num-seqs", "max_num_seqs", 1, 65536)
        NUMFLAG('b', "--max-num-batched-tokens", "max_num_batched_tokens", 1, 1 << 24)
        NUMFLAG('W', "--max-waiting", "max_waiting", 0, 1 << 20)
        case 'S':
            bad = parse_num("--block-size", optarg, 128, 1 << 20, &v);
            if (!bad && fmod(v, 128) != 0) {
                fprintf(stderr, "duet-coordinator: --block-size: %g is not a multiple of 128 "
                                "(every compression window must close on a block boundary)\n",
                        v);
                bad = 1;
            }
            if (!bad) flag_num(flags, "block_size", v);
            break;
        case 'v': json_object_set_new(flags, "metrics_vllm_names", json_true()); break;
        case 'm': json_object_set_new(flags, "metrics_require_auth", json_true()); break;
        NUMFLAG('z', "--stall-timeout", "stall_timeout_s", 0.1, 1e7)
        NUMFLAG('G', "--health-generate-timeout", "health_generate_timeout_s", 0.1, 1e7)
        NUMFLAG('k', "--sse-keepalive", "sse_keepalive_s", 0, 1e7)
        NUMFLAG('T', "--step-timeout", "step_timeout_s", 0, 1e7)
        NUMFLAG('H', "--heartbeat-timeout", "heartbeat_timeout_s", 0.1, 1e7)
        NUMFLAG('g', "--drain-grace", "drain_grace_s", 0, 1e7)
        NUMFLAG('r', "--worker-recover-timeout", "worker_recover_timeout_s", 0, 1e7)
        NUMFLAG('l', "--load-timeout", "load_timeout_s", 0, 1e7)
        STRFLAG('P', "listen")
        STRFLAG('K', "tokenizer")
        STRFLAG('A', "api_key_file")
        NUMFLAG('B', "--max-body-bytes", "max_body_bytes", 1024, 1 << 30)
        NUMFLAG('V', "--vocab-size", "vocab_size", 2, 1 << 24)
        STRFLAG('M', "served_model_name")
        case 'F': json_object_set_new(flags, "fold_prompt_ids", json_true()); break;
        case 'h': usage(stdout); json_decref(flags); return 0;
        default: usage(stderr); json_decref(flags); return 2;
        }
#undef NUMFLAG
#undef STRFLAG
        if (bad) {
            json_decref(flags);
            return 2;
        }
    }
    char err[1024];
    duet_config cfg;
    if (optind != argc) {
        usage(stderr);
        json_decref(flags);
        return 2;
    }
    if (ccfg_load(&cfg, config_path, flags, err, sizeof err)) {
        fprintf(stderr, "duet-coordinator: %s\n", err);
        json_decref(flags);
        return 2;
    }
    int rc = 0;
    char **addrs = NULL;
    char token[512];
    memset(token, 0, sizeof token);
    coord c;
    memset(&c, 0, sizeof c);
    if (!cfg.workers.n || !cfg.auth_token_file) {
        usage(stderr);
        rc = 2;
        goto early;
    }
    if (cfg.listen && !cfg.tokenizer) {
        fprintf(stderr, "duet-coordinator: --listen needs --tokenizer PATH (the model's "
                        "tokenizer.json)\n");
        rc = 2;
        goto early;
    }
    if (!cfg.listen && (cfg.tokenizer || cfg.api_key_file || cfg.api_keys.n)) {
        fprintf(stderr, "duet-coordinator: --tokenizer and --api-key-file only make sense with "
                        "--listen HOST:PORT\n");
        rc = 2;
        goto early;
    }
    uint64_t fingerprint = 0;
    if (cfg.model_fingerprint) {
        char *end;
        fingerprint = strtoull(cfg.model_fingerprint, &end, 16);
        if (end == cfg.model_fingerprint || *end || !fingerprint) {
            fprintf(stderr, "duet-coordinator: --model-fingerprint: '%s' is not a non-zero hex "
                            "number\n", cfg.model_fingerprint);
            rc = 2;
            goto early;
        }
    }
    if (rpc_read_token_file(cfg.auth_token_file, token, sizeof token, err, sizeof err)) {
        fprintf(stderr, "duet-coordinator: %s\n", err);
        rc = 2;
        goto early;
    }
    char path[256];
    const char *sock = cfg.admin_socket;
    if (!sock) {
        if (admin_default_path(path, sizeof path, err, sizeof err)) {
            fprintf(stderr, "duet-coordinator: %s\n", err);
            rc = 2;
            goto early;
        }
        sock = path;
    }
    addrs = cfg.workers.v;
    signal(SIGPIPE, SIG_IGN);
    c.base = event_base_new();
    c.cfg = cfg;
    c.config_path = config_path;
    c.flags = flags;
    c.max_seq_len = (int)cfg.max_model_len;
    c.recover_timeout_s = cfg.worker_recover_timeout_s;
    c.drain_grace_s = cfg.drain_grace_s;
    c.start_time = coord_now_s();
    c.metrics = metrics_new(cfg.served_model_name, cfg.metrics_vllm_names);
    if (config_path) coord_log("config %s", config_path);
    if (admin_open(c.base, sock, admin_cb, &c, &c.adm, err, sizeof err)) {
        fprintf(stderr, "duet-coordinator: %s\n", err);
        rc = 2;
        goto out;
    }
    coord_log("admin socket %s", sock);
    pool_cfg pc = {.addrs = (const char *const *)addrs,
                   .n_workers = (int)cfg.workers.n,
                   .token = token,
                   .fingerprint = fingerprint,
                   .connect_timeout_s = cfg.connect_timeout_s,
                   .heartbeat_s = 1,
                   .heartbeat_timeout_s = cfg.heartbeat_timeout_s,
                   .step_timeout_s = cfg.step_timeout_s,
                   .load_timeout_s = cfg.load_timeout_s,
                   .max_seqs = (uint32_t)cfg.max_num_seqs,
                   .max_seq_len = (uint32_t)cfg.max_model_len,
                   .block_size = (uint32_t)cfg.block_size,
                   .metrics = c.metrics};
    if (pool_new(c.base, &pc, pool_cb, &c, &c.pool, err, sizeof err)) {
        fprintf(stderr, "duet-coordinator: %s\n", err);
        rc = 2;
        goto out;
    }
    sched_cfg sc = {.max_num_seqs = (int)cfg.max_num_seqs,
                    .max_waiting = (int)cfg.max_waiting,
                    .max_batched_tokens = (int)cfg.max_num_batched_tokens,
                    .block_size = (uint32_t)cfg.block_size,
                    .max_seq_len = (int)cfg.max_model_len,
                    .recover_timeout_s = cfg.worker_recover_timeout_s,
                    .stall_timeout_s = cfg.stall_timeout_s,
                    .drained = on_drained,
                    .drained_arg = &c};
    c.eng = sched_new(c.pool, c.metrics, &sc);
    if (cfg.listen) {
        eng_api api = sched_api(c.eng);
        http_cfg hc;
        http_cfg_of(&cfg, &hc);
        hc.metrics = c.metrics;
        if (http_open(c.base, &hc, &api, &c.http, err, sizeof err)) {
            fprintf(stderr, "duet-coordinator: %s\n", err);
            rc = 2;
            goto out;
        }
    }
    coord_log("connecting to %zu workers", cfg.workers.n);
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
    while (c.drain_waits) {
        drain_wait *d = c.drain_waits;
        c.drain_waits = d->next;
        admin_reply_ok(d->r, json_pack("{s:s, s:i}", "state", "drained", "in_flight", 0));
        free(d);
    }
    sched_free(c.eng); /* ends every request: before the HTTP front goes */
    http_free(c.http);
    pool_free(c.pool);
    metrics_free(c.metrics);
    admin_close(c.adm);
    if (c.tick) event_free(c.tick);
    if (c.sig_term) event_free(c.sig_term);
    if (c.sig_int) event_free(c.sig_int);
    if (c.sig_hup) event_free(c.sig_hup);
    event_base_free(c.base);
    ccfg_free(&c.cfg);
    json_decref(flags);
    memset(token, 0, sizeof token);
    return rc;
early:
    ccfg_free(&cfg);
    json_decref(flags);
    return rc;
}
