/* hops.c — the endpoints that are not generation: tokenize/detokenize (§7), model cards (§6),
 * version, readiness and the generation probe (§8), and the Prometheus scrape (§10).
 *
 * Why: these answer operators and harnesses rather than chat clients, and each is small; they
 * share the rule that they never block the event loop and never fail on a client's input.
 * Readiness looks at progress (engine health: steps, canary, recent failures), not just at the
 * process answering — the ops lesson of a lane that stayed "up" while refusing every request.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>

#include "common/err.h"
#include "coordinator/clog.h"
#include "coordinator/http/hint.h"

void handle_tokenize(http_server *s, struct evhttp_request *req, const char *rid, json_t *b) {
    apierr e;
    const char *model, *prompt = NULL;
    tok_ids_t ids = {0};
    bool strs = false, add_special = true;
    if (check_model(s, &e, b, &model) || get_bool(&e, b, "return_token_strs", &strs) < 0 ||
        get_bool(&e, b, "add_special_tokens", &add_special) < 0)
        goto bad;
    if (field(b, "messages")) {
        bool th;
        int nt;
        const char *eff;
        if (render_chat(s, &e, b, &ids, &th, &nt, &eff)) goto bad;
    } else {
        if (get_str(&e, b, "prompt", &prompt) < 0) goto bad;
        if (!prompt) {
            fail(&e, 400, "missing_required_parameter", "prompt",
                 "\"prompt\" (a string) or \"messages\" is required");
            goto bad;
        }
        if (tok_encode(s->tok, prompt, json_string_length(field(b, "prompt")), &ids)) {
            fail(&e, 400, "invalid_value", "prompt", "the prompt is too long to tokenize");
            goto bad;
        }
    }
    json_t *toks = json_array();
    json_t *ts = strs ? json_array() : NULL;
    for (size_t i = 0; i < ids.n; i++) {
        json_array_append_new(toks, json_integer(ids.v[i]));
        if (ts) {
            char tb[256];
            size_t tn = token_bytes(s, ids.v[i], tb, sizeof tb);
            json_array_append_new(ts, token_string(tb, tn));
        }
    }
    json_t *r = json_pack("{s:I, s:i, s:o}", "count", (json_int_t)ids.n, "max_model_len",
                          s->max_model_len, "tokens", toks);
    if (ts) json_object_set_new(r, "token_strs", ts);
    tok_ids_free(&ids);
    send_json(s, req, 200, r, rid);
    return;
bad:
    tok_ids_free(&ids);
    send_err(s, req, &e, rid);
}

void handle_detokenize(http_server *s, struct evhttp_request *req, const char *rid, json_t *b) {
    apierr e;
    const char *model;
    if (check_model(s, &e, b, &model)) goto bad;
    json_t *t = json_object_get(b, "tokens");
    if (!t || json_is_null(t)) {
        fail(&e, 400, "missing_required_parameter", "tokens", "\"tokens\" is required");
        goto bad;
    }
    if (!json_is_array(t)) {
        fail(&e, 400, "invalid_type", "tokens", "\"tokens\" must be an array of token ids");
        goto bad;
    }
    size_t n = json_array_size(t), i;
    int32_t *ids = xmalloc((n ? n : 1) * sizeof *ids);
    json_t *v;
    long long vs = (long long)tok_vocab_size(s->tok);
    json_array_foreach(t, i, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= vs) {
            free(ids);
            fail(&e, 400, "invalid_value", "tokens",
                 "\"tokens\"[%zu] is not a token id in [0, %lld)", i, vs);
            goto bad;
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    char *text;
    size_t len;
    tok_decode(s->tok, ids, n, 0, &text, &len);
    free(ids);
    send_json(s, req, 200, json_pack("{s:s%}", "prompt", text, len), rid);
    free(text);
    return;
bad:
    send_err(s, req, &e, rid);
}

static json_t *model_card(http_server *s, const char *id) {
    int alias = strcmp(id, s->model_id) != 0;
    return json_pack("{s:s, s:s, s:I, s:s, s:s, s:o, s:i}", "id", id, "object", "model",
                     "created", (json_int_t)s->created, "owned_by", "duet", "root", s->model_id,
                     "parent", alias ? json_string(s->model_id) : json_null(), "max_model_len",
                     s->max_model_len);
}

void handle_models(http_server *s, struct evhttp_request *req, const char *rid, const char *id) {
    if (id) {
        if (!is_model(s, id)) {
            apierr e;
            fail(&e, 404, "model_not_found", "model", "the model \"%s\" does not exist", id);
            send_err(s, req, &e, rid);
            return;
        }
        send_json(s, req, 200, model_card(s, id), rid);
        return;
    }
    json_t *data = json_array();
    json_array_append_new(data, model_card(s, s->model_id));
    for (size_t i = 0; i < s->n_aliases; i++)
        if (strcmp(s->model_id, s->aliases[i]))
            json_array_append_new(data, model_card(s, s->aliases[i]));
    send_json(s, req, 200, json_pack("{s:s, s:o}", "object", "list", "data", data), rid);
}

void handle_version(http_server *s, struct evhttp_request *req, const char *rid) {
    send_json(s, req, 200, json_pack("{s:s, s:s, s:s}", "version", s->version, "commit",
                                     s->commit, "model", s->model_id), rid);
}

/* The engine's health (eng_api.health is required: http_open checks it). */
static void health(http_server *s, eng_health *h) {
    memset(h, 0, sizeof *h);
    h->last_step_age_s = h->last_success_age_s = h->last_failure_age_s = -1;
    s->api.health(s->api.ctx, h);
}

void handle_ready(http_server *s, struct evhttp_request *req, const char *rid) {
    eng_health hh;
    health(s, &hh);
    int ok = 1;
    char state[64], workers[80], warm[80], progress[80], refusing[120];
    if (!strcmp(hh.state, "serving")) snprintf(state, sizeof state, "ok");
    else snprintf(state, sizeof state, "%s", hh.state), ok = 0;
    if (hh.workers_up) snprintf(workers, sizeof workers, "ok");
    else snprintf(workers, sizeof workers, "a worker is disconnected or silent"), ok = 0;
    if (hh.warm) snprintf(warm, sizeof warm, "ok");
    else snprintf(warm, sizeof warm, "the canary generation has not completed"), ok = 0;
    double stall = s->stall_timeout_s > 0 ? s->stall_timeout_s : 30;
    if (hh.running + hh.waiting > 0 &&
        (hh.last_step_age_s < 0 || hh.last_step_age_s > stall)) {
        if (hh.last_step_age_s < 0)
            snprintf(progress, sizeof progress, "requests are waiting and no step has completed");
        else snprintf(progress, sizeof progress, "no step for %.0f s", hh.last_step_age_s);
        ok = 0;
    } else {
        snprintf(progress, sizeof progress, "ok");
    }
    if (hh.last_failure_age_s >= 0 && hh.last_failure_age_s <= 60 &&
        (hh.last_success_age_s < 0 || hh.last_success_age_s > 60)) {
        snprintf(refusing, sizeof refusing,
                 "requests failed in the last 60 s and none completed");
        ok = 0;
    } else {
        snprintf(refusing, sizeof refusing, "ok");
    }
    json_t *checks = json_pack("{s:s, s:s, s:s, s:s, s:s}", "state", state, "workers", workers,
                               "warmup", warm, "progress", progress, "refusing", refusing);
    send_json(s, req, ok ? 200 : 503,
              json_pack("{s:s, s:o}", "status", ok ? "ready" : "not_ready", "checks", checks),
              rid);
}

/* ---- /health/generate: one shared 1-token probe --------------------------------------------- */

struct probe {
    http_server *s;
    struct evhttp_request **w; /* waiting callers (NULL = gone) */
    size_t nw, capw;
    struct event *timer;
    int answered, ended, in_submit;
    int32_t prompt[4];
};

static void probe_answer(probe *p, int ok, const char *why) {
    if (p->answered) return;
    p->answered = 1;
    for (size_t i = 0; i < p->nw; i++) {
        struct evhttp_request *r = p->w[i];
        if (!r) continue;
        struct evhttp_connection *ec = evhttp_request_get_connection(r);
        if (ec) evhttp_connection_set_closecb(ec, NULL, NULL);
        send_json(p->s, r, ok ? 200 : 503,
                  ok ? json_pack("{s:s}", "status", "ok")
                     : json_pack("{s:s, s:s}", "status", "unhealthy", "reason", why),
                  NULL);
        p->w[i] = NULL;
    }
}

static void probe_release(probe *p) {
    if (!p->answered || !p->ended || p->in_submit) return;
    if (p->s->probe == p) p->s->probe = NULL;
    if (p->timer) event_free(p->timer);
    free(p->w);
    free(p);
}

static void probe_waiter_gone(struct evhttp_connection *ec, void *arg) {
    probe *p = arg;
    for (size_t i = 0; i < p->nw; i++)
        if (p->w[i] && evhttp_request_get_connection(p->w[i]) == ec) p->w[i] = NULL;
}

static int probe_token(void *user, const eng_token *t) {
    (void)user;
    (void)t;
    return 1;
}

static int probe_connected(void *user) { return !((probe *)user)->answered; }

static void probe_end(void *user, const char *finish, const char *code, const char *msg) {
    probe *p = user;
    p->ended = 1;
    char why[400];
    snprintf(why, sizeof why, "the probe generation failed: %s: %s", code ? code : "?",
             msg ? msg : "");
    utf8_clean(why);
    probe_answer(p, finish != NULL && strcmp(finish, "abort"), why);
    probe_release(p);
}

static void probe_timeout(evutil_socket_t fd, short ev, void *arg) {
    (void)fd;
    (void)ev;
    probe *p = arg;
    char why[120];
    snprintf(why, sizeof why, "the probe generation did not complete within %.0f s",
             p->s->health_generate_timeout_s > 0 ? p->s->health_generate_timeout_s : 20);
    probe_answer(p, 0, why);
    probe_release(p);
}

static void probe_wait(probe *p, struct evhttp_request *req) {
    if (p->nw == p->capw) {
        p->capw = p->capw ? 2 * p->capw : 4;
        p->w = xrealloc(p->w, p->capw * sizeof *p->w);
    }
    p->w[p->nw++] = req;
    struct evhttp_connection *ec = evhttp_request_get_connection(req);
    if (ec) evhttp_connection_set_closecb(ec, probe_waiter_gone, p);
}

void handle_generate_probe(http_server *s, struct evhttp_request *req, const char *rid) {
    eng_health hh;
    health(s, &hh);
    if (hh.last_success_age_s >= 0 && hh.last_success_age_s <= 5) {
        send_json(s, req, 200, json_pack("{s:s}", "status", "ok"), rid);
        return;
    }
    if (s->probe) {
        if (s->probe->answered) {
            send_json(s, req, 503,
                      json_pack("{s:s, s:s}", "status", "unhealthy", "reason",
                                "the previous probe generation has not ended yet"),
                      rid);
            return;
        }
        probe_wait(s->probe, req);
        return;
    }
    probe *p = xcalloc(1, sizeof *p);
    p->s = s;
    for (int i = 0; i < 4; i++) p->prompt[i] = (int32_t)((i * 97 + 1) % s->vocab);
    if (s->bos >= 0 && s->bos < s->vocab) p->prompt[0] = s->bos;
    eng_params ep;
    eng_params_init(&ep);
    ep.prompt = p->prompt;
    ep.n_prompt = 4;
    ep.max_tokens = 1;
    ep.temperature = 0;
    ep.priority = INT32_MIN;
    ep.request_id = "health-generate";
    eng_sink sink = {.on_token = probe_token, .on_end = probe_end, .connected = probe_connected,
                     .user = p};
    const char *code = "internal_error";
    char msg[300] = "";
    s->probe = p;
    p->answered = 0;
    probe_wait(p, req);
    p->in_submit = 1;
    int rc = s->api.submit(s->api.ctx, &ep, &sink, &code, msg, sizeof msg);
    p->in_submit = 0;
    if (rc) {
        char why[400];
        snprintf(why, sizeof why, "the probe was not admitted: %s: %s", code ? code : "?", msg);
        utf8_clean(why);
        probe_answer(p, 0, why);
        p->ended = 1;
        probe_release(p);
        return;
    }
    if (p->ended) { /* answered inside submit */
        probe_release(p);
        return;
    }
    double t = s->health_generate_timeout_s > 0 ? s->health_generate_timeout_s : 20;
    struct timeval tv = {(time_t)t, (suseconds_t)((t - (double)(time_t)t) * 1e6)};
    p->timer = evtimer_new(s->base, probe_timeout, p);
    evtimer_add(p->timer, &tv);
}

void probe_free(http_server *s) {
    probe *p = s->probe;
    if (!p) return;
    p->answered = 1;
    p->ended = 1;
    probe_release(p);
}

/* ---- /metrics -------------------------------------------------------------------------------- */

void handle_metrics(http_server *s, struct evhttp_request *req, const char *rid) {
    (void)rid;
    eng_health hh;
    health(s, &hh);
    metrics_set(s->m, "num_requests_running", NULL, hh.running);
    metrics_set(s->m, "num_requests_waiting", NULL, hh.waiting);
    static const char *const states[] = {"starting", "serving", "draining", "drained",
                                         "degraded", NULL};
    for (int i = 0; states[i]; i++) {
        char lab[40];
        snprintf(lab, sizeof lab, "state=\"%s\"", states[i]);
        metrics_set(s->m, "server_state", lab, !strcmp(states[i], hh.state));
    }
    note_http(s, req, 200);
    size_t len = 0;
    char *txt = metrics_render(s->m, &len);
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Type", "text/plain; version=0.0.4; charset=utf-8");
    struct evbuffer *b = evbuffer_new();
    evbuffer_add(b, txt, len);
    free(txt);
    evhttp_send_reply(req, 200, "OK", b);
    evbuffer_free(b);
}
