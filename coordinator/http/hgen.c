/* hgen.c — the bridge from a validated request (greq) to the engine (engine.h): one engine
 * sequence per choice, their sinks, their constraints, and the request's lifetime.
 *
 * Why: the engine knows token ids and sequences; the API promises n choices, stop strings and
 * stop token ids, min_tokens, thinking budgets and forced tool calls. Everything that turns
 * those promises into per-token decisions lives here: on_token feeds the detokenizer and the
 * output parser and decides "stop"; constrain hands the engine forced tokens (the tool-block
 * opener tokenized exactly as the encoder renders it, so a replayed turn hits the prefix
 * cache; `</think>` at the budget; EOS after a closed block), allowed ids (declared tool names
 * only) and banned ids (EOS and stop ids before min_tokens, the DSML marker with tool_choice
 * none). With --fold-prompt-ids (the tiny test model) forced/allowed ids above the model's
 * vocabulary are folded into it and mapped back when the engine returns them, so the parser
 * still sees the real token.
 *
 * Lifetime: the hreq lives until every submitted choice has had its on_end and the submit loop
 * is over; the answer is written when the last choice ends (streams write each choice's finish
 * chunk as it ends). A client that goes away is noticed at step boundaries (connected(): the
 * socket is closed) or by evhttp's close callback; every choice is then aborted.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/bufferevent.h>
#include <event2/keyvalq_struct.h>

#include "common/err.h"
#include "coordinator/clog.h"
#include "coordinator/http/hgen.h"

static void ids_push(tok_ids_t *ids, int32_t v) {
    if (ids->n == ids->cap) {
        ids->cap = ids->cap ? 2 * ids->cap : 16;
        ids->v = xrealloc(ids->v, ids->cap * sizeof *ids->v);
    }
    ids->v[ids->n++] = v;
}

static int32_t fold(const http_server *s, int32_t id) {
    return s->fold_ids && id >= s->vocab ? id % s->vocab : id;
}

static void hreq_free(hreq *h) {
    for (int i = 0; i < h->n_choices; i++) {
        hchoice *c = &h->c[i];
        if (c->ts) tok_stream_free(c->ts);
        if (c->op) op_free(c->op);
        chat_sb_free(&c->text);
        free(c->echo);
        json_decref(c->lp);
        json_decref(c->lp_pending);
        json_decref(c->ids_all);
        json_decref(c->ids_pending);
        tok_ids_free(&c->fq);
        tok_ids_free(&c->given);
        tok_ids_free(&c->expect);
        tok_ids_free(&c->allowed);
        tok_ids_free(&c->allowed_real);
        free(c->alive);
    }
    for (size_t k = 0; k < h->n_paths; k++) tok_ids_free(&h->paths[k].ids);
    free(h->paths);
    tok_ids_free(&h->close_ids);
    free(h->c);
    if (h->pending) evbuffer_free(h->pending);
    if (h->ka) event_free(h->ka);
    greq_free(&h->g);
    free(h->model);
    free(h);
}

static int dead(const hreq *h) { return h->gone || h->refused || h->failed || h->done; }

/* ---- tool forcing -------------------------------------------------------------------------- */

static void encode_str(http_server *s, const char *text, tok_ids_t *out) {
    tok_encode(s->tok, text, strlen(text), out);
}

/* One path per declared name (required) or the named one: the opener, the name and ">\n",
 * and for a tool without arguments the closed invoke (and, when only one call is allowed,
 * the closed block) — each tokenized as one string, as the encoder renders the turn. */
static void build_paths(hreq *h) {
    greq *g = &h->g;
    if (g->tool_choice != TC_REQUIRED && g->tool_choice != TC_NAMED) return;
    h->paths = xcalloc(g->n_tools, sizeof *h->paths);
    int single = g->tool_choice == TC_NAMED || !g->parallel_tool_calls;
    for (size_t k = 0; k < g->n_tools; k++) {
        if (g->tool_choice == TC_NAMED && strcmp(g->tool_names[k], g->named)) continue;
        chat_sb t = {0};
        chat_sb_printf(&t, "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"%s\">\n",
                       g->tool_names[k]);
        tpath *p = &h->paths[h->n_paths++];
        if (g->tool_noargs[k]) {
            chat_sb_puts(&t, "\n</｜DSML｜invoke>");
            p->noargs = 1;
            if (single) {
                chat_sb_puts(&t, "\n</｜DSML｜tool_calls>");
                p->closes = 1;
            }
        }
        encode_str(h->s, t.p, &p->ids);
        chat_sb_free(&t);
    }
    encode_str(h->s, "\n</｜DSML｜tool_calls>", &h->close_ids);
}

static void force(hchoice *c, const int32_t *ids, size_t n) {
    for (size_t i = 0; i < n; i++) ids_push(&c->fq, ids[i]);
}

/* The tool path chosen so far: narrows the live paths by the token at tpos. */
static void path_step(hchoice *c, int32_t id) {
    hreq *h = c->h;
    int any = 0;
    for (size_t k = 0; k < h->n_paths; k++) {
        if (!c->alive[k]) continue;
        const tok_ids_t *p = &h->paths[k].ids;
        if (c->tpos < p->n && p->v[c->tpos] == id) any = 1;
        else c->alive[k] = 0;
    }
    c->tpos++;
    if (!any) { /* cannot happen under the engine's constraints; give up forcing */
        c->tphase = 3;
        return;
    }
    for (size_t k = 0; k < h->n_paths; k++) {
        if (c->alive[k] && h->paths[k].ids.n == c->tpos) {
            c->tsel = (int)k;
            c->tphase = h->paths[k].noargs ? 3 : 2;
            if (h->paths[k].closes) {
                int32_t eos = EOS_ID;
                force(c, &eos, 1);
                c->tphase = 4;
            }
            return;
        }
    }
}

/* Looks for closing tags in the last decoded bytes. */
static void watch_tail(hchoice *c, const char *t, size_t n) {
    if (!n) return;
    if (n >= sizeof c->tail) {
        memcpy(c->tail, t + n - (sizeof c->tail - 1), sizeof c->tail - 1);
        c->tail_len = sizeof c->tail - 1;
    } else {
        if (c->tail_len + n >= sizeof c->tail) {
            size_t drop = c->tail_len + n - (sizeof c->tail - 1);
            memmove(c->tail, c->tail + drop, c->tail_len - drop);
            c->tail_len -= drop;
        }
        memcpy(c->tail + c->tail_len, t, n);
        c->tail_len += n;
    }
    c->tail[c->tail_len] = 0;
    hreq *h = c->h;
    if (c->tphase != 2 && c->tphase != 3) return;
    int32_t eos = EOS_ID;
    if (strstr(c->tail, "</｜DSML｜tool_calls>")) {
        force(c, &eos, 1);
        c->tphase = 4;
        c->tail_len = 0;
    } else if (c->tphase == 2 && strstr(c->tail, "</｜DSML｜invoke>")) {
        c->tail_len = 0;
        c->tphase = 3;
        if (h->g.tool_choice == TC_NAMED || !h->g.parallel_tool_calls) {
            force(c, h->close_ids.v, h->close_ids.n);
            force(c, &eos, 1);
            c->tphase = 4;
        }
    }
}

/* ---- engine sink --------------------------------------------------------------------------- */

static void constrain(void *user, eng_constraint *ec) {
    hchoice *c = user;
    hreq *h = c->h;
    http_server *s = h->s;
    greq *g = &h->g;
    if (dead(h)) return;
    /* thinking budget: force </think> once the budget is spent */
    if (!c->fq.n && g->thinking && c->in_reasoning && g->budget >= 0 && !c->budget_done &&
        c->reasoning_tokens >= g->budget && s->think_close >= 0) {
        c->budget_done = 1;
        force(c, &s->think_close, 1);
    }
    /* tool_choice required / named: the opener and the name, once reasoning is over */
    if (!c->fq.n && h->n_paths && !c->in_reasoning && c->tphase == 0) {
        c->tphase = 1;
        c->tpos = 0;
        c->alive = xcalloc(h->n_paths, 1);
        memset(c->alive, 1, h->n_paths);
    }
    c->allowed.n = c->allowed_real.n = 0;
    if (!c->fq.n && c->tphase == 1) {
        /* the run every live path agrees on is forced; at a fork the next ids are allowed */
        for (size_t pos = c->tpos;; pos++) {
            int32_t tok = -1;
            int agree = 1, ended = 0;
            for (size_t k = 0; k < h->n_paths; k++) {
                if (!c->alive[k]) continue;
                if (pos >= h->paths[k].ids.n) {
                    ended = 1;
                    break;
                }
                if (tok < 0) tok = h->paths[k].ids.v[pos];
                else if (tok != h->paths[k].ids.v[pos]) agree = 0;
            }
            if (ended || tok < 0 || !agree) break;
            ids_push(&c->fq, tok);
        }
        if (!c->fq.n) {
            for (size_t k = 0; k < h->n_paths; k++) {
                if (!c->alive[k] || c->tpos >= h->paths[k].ids.n) continue;
                int32_t tok = h->paths[k].ids.v[c->tpos];
                size_t j;
                for (j = 0; j < c->allowed_real.n && c->allowed_real.v[j] != tok; j++) {
                }
                if (j < c->allowed_real.n) continue;
                ids_push(&c->allowed_real, tok);
                ids_push(&c->allowed, fold(s, tok));
            }
        }
    }
    if (c->fq.n) {
        c->given.n = 0;
        for (size_t i = 0; i < c->fq.n; i++) {
            ids_push(&c->given, fold(s, c->fq.v[i]));
            ids_push(&c->expect, c->fq.v[i]);
        }
        c->fq.n = 0;
        ec->forced = c->given.v;
        ec->n_forced = (int)c->given.n;
        return;
    }
    if (c->allowed.n) {
        ec->allowed = c->allowed.v;
        ec->n_allowed = (int)c->allowed.n;
    }
    c->n_banned = 0;
    if (c->n_out < g->min_tokens) {
        c->banned[c->n_banned++] = EOS_ID;
        for (size_t i = 0; i < g->n_stop_ids; i++) c->banned[c->n_banned++] = g->stop_ids[i];
    }
    if (g->chat && g->tool_choice == TC_NONE && s->dsml >= 0 && s->dsml < s->vocab)
        c->banned[c->n_banned++] = s->dsml;
    if (c->n_banned) {
        ec->banned = c->banned;
        ec->n_banned = c->n_banned;
    }
}

static int structural(const http_server *s, int32_t id) {
    return id == EOS_ID || id == s->bos || id == s->think_open || id == s->think_close ||
           id == s->dsml;
}

static int on_token(void *user, const eng_token *tk) {
    hchoice *c = user;
    hreq *h = c->h;
    http_server *s = h->s;
    greq *g = &h->g;
    int32_t id = tk->id;
    c->n_out++;
    if (tk->cached_tokens > c->cached) c->cached = tk->cached_tokens;
    if (tk->forced && c->expect_pos < c->expect.n) {
        id = c->expect.v[c->expect_pos++];
        if (c->expect_pos == c->expect.n) c->expect.n = c->expect_pos = 0;
    } else if (c->allowed_real.n) { /* map a folded allowed id back to the real one */
        for (size_t j = 0; j < c->allowed.n; j++)
            if (c->allowed.v[j] == id) {
                id = c->allowed_real.v[j];
                break;
            }
        c->allowed.n = c->allowed_real.n = 0;
    }
    if (dead(h)) return 0; /* the engine aborts it at the step boundary */
    c->has_last = 1;
    c->last_id = id;
    c->last_lp = tk->forced ? 0.0f : tk->logprob;
    c->last_ntop = tk->forced ? 0 : tk->n_top;
    if (c->last_ntop > ENG_MAX_TOP_LOGPROBS) c->last_ntop = ENG_MAX_TOP_LOGPROBS;
    for (int k = 0; k < c->last_ntop; k++) {
        c->last_top[k] = tk->top_ids[k];
        c->last_toplp[k] = tk->top_logprobs[k];
    }
    if (g->return_token_ids) {
        json_array_append_new(c->ids_all, json_integer(id));
        if (c->ids_pending) json_array_append_new(c->ids_pending, json_integer(id));
    }
    if (g->stream) sse_start(c);
    int stop = 0;
    for (size_t i = 0; i < g->n_stop_ids; i++)
        if (id == g->stop_ids[i] && c->n_out > g->min_tokens - 1) {
            c->stop_tok = id;
            stop = 1;
        }
    if (g->chat) {
        if (c->in_reasoning) {
            c->reasoning_tokens++;
            if (id == s->think_close) c->in_reasoning = 0;
        }
        if (!stop) {
            size_t n = 0;
            const char *t;
            if (!(g->skip_special && tok_is_special(s->tok, id) && !structural(s, id))) {
                t = tok_stream_put(c->ts, id, &n);
                if (n) op_feed(c->op, t, n);
            } else {
                t = tok_id_to_token(s->tok, id);
                n = t ? strlen(t) : 0;
            }
            if (c->tphase == 1) path_step(c, id);
            else watch_tail(c, t, n);
            stop = op_stopped(c->op) || (c->stopf && c->stop_idx >= 0);
        }
    } else {
        if (g->logprobs) cmpl_logprob(c, tk, id);
        if (!stop && id == EOS_ID && !g->ignore_eos) {
            stop = 1;
        } else if (!stop) {
            size_t n;
            const char *t = tok_stream_put(c->ts, id, &n);
            stop = cmpl_add(c, t, n, 0);
        }
    }
    if (g->stream) sse_flush(h);
    return stop;
}

static int on_connected(void *user) {
    hchoice *c = user;
    hreq *h = c->h;
    if (dead(h) || !h->req) return 0;
    struct evhttp_connection *ec = evhttp_request_get_connection(h->req);
    if (!ec) {
        h->gone = 1;
        return 0;
    }
    evutil_socket_t fd = bufferevent_getfd(evhttp_connection_get_bufferevent(ec));
    if (fd < 0) return 1;
    char b;
    ssize_t r = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        h->gone = 1;
        coord_log("http %s: the client went away; aborting", h->rid);
        return 0;
    }
    return 1;
}

/* evhttp's close callback: the connection died (a write failed, or it is being freed). */
static void on_conn_close(struct evhttp_connection *ec, void *arg) {
    (void)ec;
    hreq *h = arg;
    if (!h->gone && !h->done) coord_log("http %s: the connection closed; aborting", h->rid);
    h->gone = 1;
    /* still queued on the connection: evhttp frees it with the connection */
    if (h->req && evhttp_request_get_connection(h->req)) h->req = NULL;
}

/* Ends the SSE body now (a failure mid-stream): no callback may touch h->req afterwards. */
static void end_stream(hreq *h) {
    if (h->req) {
        struct evhttp_connection *ec = evhttp_request_get_connection(h->req);
        if (ec) evhttp_connection_set_closecb(ec, NULL, NULL);
        evhttp_send_reply_end(h->req);
    }
    h->req = NULL;
    h->done = 1;
}

/* A choice ended: flush what it held, decide its finish, write its finish chunk. */
static void choice_done(hchoice *c) {
    hreq *h = c->h;
    http_server *s = h->s;
    size_t n;
    const char *t = tok_stream_flush(c->ts, &n);
    if (!c->finish) { /* failure after admission: the whole request fails */
        if (!h->failed && !h->refused && !h->done) {
            h->failed = 1;
            h->status = !strcmp(h->code, "no_workers") ? 503 : 500;
            if (h->sse_open && !h->gone) {
                sse_error(h);
                sse_flush(h);
                end_stream(h);
            }
        }
        return;
    }
    if (h->refused || h->failed || h->done) return;
    op_end end = !strcmp(c->finish, "length") ? OP_END_LENGTH
                 : !strcmp(c->finish, "abort") ? OP_END_ABORT
                                               : OP_END_STOP;
    if (h->g.chat) {
        if (n) op_feed(c->op, t, n);
        c->res = op_finish(c->op, end);
        if (c->stopf) chat_stop_add(c, NULL, 0, 1);
        if (s->m && c->res->parse_failures)
            metrics_inc(s->m, "tool_call_parse_failures_total", NULL,
                        (double)c->res->parse_failures);
        if (s->m && c->res->repairs)
            metrics_inc(s->m, "tool_call_repairs_total", NULL, (double)c->res->repairs);
    } else {
        cmpl_add(c, t, n, 1);
    }
    const char *fr = h->gone ? "abort" : choice_finish(c);
    if (s->m) {
        char lab[64];
        snprintf(lab, sizeof lab, "finished_reason=\"%s\"", fr);
        metrics_inc(s->m, "request_success_total", lab, 1);
    }
    if (h->g.stream && !h->gone) {
        sse_finish_choice(c, fr, stop_reason_json(c));
        sse_flush(h);
    }
}

static void request_done(hreq *h) {
    struct evhttp_request *req = h->req;
    if (req) {
        struct evhttp_connection *ec = evhttp_request_get_connection(req);
        if (ec) evhttp_connection_set_closecb(ec, NULL, NULL);
    }
    if (h->gone || !req) {
        if (req && !h->done) evhttp_send_reply_end(req); /* frees a request whose connection died */
    } else if (h->refused || (h->failed && !h->sse_open)) {
        apierr e;
        fail(&e, h->status ? h->status : 500, h->code, NULL, "%s", h->msg);
        send_err(h->s, req, &e, h->rid);
    } else if (!h->done) {
        if (h->g.stream) {
            sse_end(h);
            sse_flush(h);
            evhttp_send_reply_end(req);
        } else {
            answer_json(h);
        }
    }
    h->done = 1;
    hreq_free(h);
}

static void on_end(void *user, const char *finish, const char *code, const char *msg) {
    hchoice *c = user;
    hreq *h = c->h;
    http_server *s = h->s;
    c->ended = 1;
    c->finish = finish;
    h->n_ended++;
    if (!finish) {
        if (!h->failed && !h->refused) {
            snprintf(h->code, sizeof h->code, "%s",
                     code && *code ? (!strcmp(code, "internal") ? "internal_error" : code)
                                   : "internal_error");
            snprintf(h->msg, sizeof h->msg, "%s", msg ? msg : "");
        }
        if (s->m) {
            char lab[64];
            snprintf(lab, sizeof lab, "code=\"%s\"", h->code);
            metrics_inc(s->m, "request_errors_total", lab, 1);
        }
        coord_log("http %s: choice %d failed after %d tokens: %s: %s", h->rid, c->index,
                  c->n_out, code ? code : "?", msg ? msg : "");
    }
    if (!h->in_submit) choice_done(c);
    if (finish && h->n_ended == h->n_submitted && !h->in_submit) {
        long long out = 0;
        for (int i = 0; i < h->n_choices; i++) out += h->c[i].n_out;
        coord_log("http %s: %s, %d choice(s), %lld completion tokens, %s, %.0f ms", h->rid,
                  h->g.chat ? "chat" : "completion", h->n_choices, out,
                  h->gone ? "client gone" : "done", (coord_now_s() - h->t0) * 1000);
    }
    if (h->n_ended == h->n_submitted && !h->in_submit) request_done(h);
}

/* ---- submission ---------------------------------------------------------------------------- */

/* SSE keep-alive (§3.8): headers are out, no token yet (queued or prefilling): an SSE comment
 * every sse_keepalive_s keeps proxies and clients with read timeouts from giving up. The timer
 * stops at the first token (sse_start) and is freed with the request. */
static void keepalive_cb(evutil_socket_t fd, short what, void *arg) {
    (void)fd;
    (void)what;
    hreq *h = arg;
    int any = 0;
    for (int i = 0; i < h->n_choices; i++) any |= h->c[i].started;
    if (any || h->done || h->gone || !h->req || !h->sse_open) {
        event_del(h->ka);
        return;
    }
    evbuffer_add_printf(h->pending, ": keep-alive\n\n");
    sse_flush(h);
}

void generate(http_server *s, struct evhttp_request *req, const char *rid, greq *g) {
    hreq *h = xcalloc(1, sizeof *h);
    h->s = s;
    h->req = req;
    h->g = *g;
    memset(g, 0, sizeof *g);
    g = &h->g;
    snprintf(h->rid, sizeof h->rid, "%s", rid);
    snprintf(h->id, sizeof h->id, "%s-%s", g->chat ? "chatcmpl" : "cmpl", rid);
    h->model = xstrdup(g->model);
    g->model = h->model;
    h->created = (long long)time(NULL);
    h->t0 = coord_now_s();
    h->pending = evbuffer_new();
    h->buffered = s->tool_stream_buffered;
    h->reasoning_field = s->reasoning_field;
    h->n_choices = (int)g->n_prompts * g->n;
    h->c = xcalloc((size_t)h->n_choices, sizeof *h->c);
    build_paths(h);
    for (int i = 0; i < h->n_choices; i++) {
        hchoice *c = &h->c[i];
        c->h = h;
        c->index = i;
        c->prompt_idx = i / g->n;
        if (g->echo) { /* owned copy: streaming frees it once sent */
            c->echo_len = g->echo_len[c->prompt_idx];
            c->echo = xmalloc(c->echo_len + 1);
            memcpy(c->echo, g->echo_text[c->prompt_idx], c->echo_len + 1);
        }
        c->stop_idx = -1;
        c->stop_tok = -1;
        c->tsel = -1;
        c->in_reasoning = g->chat && g->thinking;
        hresp_init_choice(c);
        if (g->chat) {
            op_config oc;
            op_config_init(&oc);
            oc.thinking = g->thinking;
            oc.tool_choice = g->tool_choice == TC_NONE       ? OP_TOOLS_NONE
                             : g->tool_choice == TC_REQUIRED ? OP_TOOLS_REQUIRED
                             : g->tool_choice == TC_NAMED    ? OP_TOOLS_NAMED
                                                             : OP_TOOLS_AUTO;
            oc.named_tool = g->named;
            oc.tool_names = (const char *const *)g->tool_names;
            oc.n_tool_names = g->n_tools;
            oc.parallel_tool_calls = g->parallel_tool_calls;
            oc.ignore_eos = g->ignore_eos;
            /* with min_tokens the stop strings are matched by chat_stop_add instead: the
             * parser would match them from the first token */
            c->stopf = g->min_tokens > 0 && g->n_stop > 0;
            oc.stop = (const char *const *)g->stop;
            oc.n_stop = c->stopf ? 0 : g->n_stop;
            oc.include_stop_str = g->include_stop;
            oc.buffered = s->tool_stream_buffered;
            oc.emit = op_emit;
            oc.emit_user = c;
            c->op = op_new(&oc);
            c->ts = tok_stream_new(s->tok, 0); /* the parser needs structural spellings */
        } else {
            c->ts = tok_stream_new(s->tok, g->skip_special);
        }
    }
    h->in_submit = 1;
    for (int i = 0; i < h->n_choices; i++) {
        hchoice *c = &h->c[i];
        const tok_ids_t *pr = &g->prompts[c->prompt_idx];
        eng_params p = g->p;
        p.prompt = pr->v;
        p.n_prompt = (int)pr->n;
        long long mt = g->max_tokens;
        if (mt > s->max_model_len - (long long)pr->n) mt = s->max_model_len - (long long)pr->n;
        p.max_tokens = (int)mt;
        p.choice = (uint32_t)(i % g->n);
        p.request_id = h->rid;
        eng_sink sink = {.on_token = on_token, .constrain = constrain, .on_end = on_end,
                         .connected = on_connected, .user = c};
        const char *code = "internal_error";
        char msg[300] = "";
        if (s->api.submit(s->api.ctx, &p, &sink, &code, msg, sizeof msg)) {
            h->refused = 1;
            h->status = 503;
            snprintf(h->code, sizeof h->code, "%s", code ? code : "internal_error");
            snprintf(h->msg, sizeof h->msg, "%s", msg[0] ? msg : "the request was not admitted");
            if (!strcmp(h->code, "internal") || !strcmp(h->code, "internal_error")) {
                h->status = 500;
                snprintf(h->code, sizeof h->code, "internal_error");
            }
            if (s->m) {
                char lab[64];
                snprintf(lab, sizeof lab, "reason=\"%s\"",
                         !strcmp(h->code, "server_draining")     ? "draining"
                         : !strcmp(h->code, "server_overloaded") ? "overloaded"
                                                                 : h->code);
                metrics_inc(s->m, "requests_rejected_total", lab, 1);
            }
            break;
        }
        c->submitted = 1;
        h->n_submitted++;
    }
    h->in_submit = 0;
    /* endings that happened inside submit (immediate failures) */
    for (int i = 0; i < h->n_choices; i++)
        if (h->c[i].ended) choice_done(&h->c[i]);
    if (g->stream && !h->refused && !h->failed) {
        struct evkeyvalq *hd = evhttp_request_get_output_headers(req);
        evhttp_add_header(hd, "Content-Type", "text/event-stream");
        evhttp_add_header(hd, "Cache-Control", "no-cache");
        evhttp_add_header(hd, "X-Accel-Buffering", "no");
        evhttp_add_header(hd, "X-Request-Id", h->rid);
        if (g->effort) evhttp_add_header(hd, "X-Duet-Reasoning-Effort", g->effort);
        note_http(s, req, 200);
        evhttp_send_reply_start(req, 200, "OK");
        h->sse_open = 1;
        sse_flush(h);
        int any = 0;
        for (int i = 0; i < h->n_choices; i++) any |= h->c[i].started;
        if (s->sse_keepalive_s > 0 && !any && h->n_ended < h->n_submitted) {
            h->ka = event_new(s->base, -1, EV_PERSIST, keepalive_cb, h);
            struct timeval tv = {(time_t)s->sse_keepalive_s,
                                 (suseconds_t)((s->sse_keepalive_s -
                                                (double)(time_t)s->sse_keepalive_s) * 1e6)};
            if (h->ka) event_add(h->ka, &tv);
        }
    }
    if (h->n_ended == h->n_submitted) {
        request_done(h);
        return;
    }
    evhttp_connection_set_closecb(evhttp_request_get_connection(req), on_conn_close, h);
}
