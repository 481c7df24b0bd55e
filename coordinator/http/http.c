/* http.c — the OpenAI-compatible HTTP API of duet-coordinator on libevent's evhttp.
 *
 * Why: see http.h. This file owns the listener, routing, authentication, request validation
 * (every client mistake becomes the OpenAI error object with a 4xx, never a 5xx), the bridge
 * from a validated request to the engine (engine.h), and the answer: one JSON body, or an SSE
 * stream of chunks ending in `data: [DONE]`.
 *
 * Request lifetime (hreq): created when a generation request is admitted, it receives one
 * on_token per generated id and one on_end; it is freed in on_end. A client that goes away is
 * noticed at every step boundary (connected(): a closed socket) or by evhttp's close callback
 * when a write fails; the engine then aborts the sequence at the next step boundary.
 *
 * Limits of this slice (documented in docs/openapi.yaml): n = 1, no logprobs, no penalties /
 * min_p / logit_bias / min_tokens (non-default values are refused with 400, never silently
 * dropped), tool_choice none/auto only (required/named need the grammar mask). A body larger than 4 × max_body_bytes is refused by evhttp itself
 * (413 with its own HTML body); between the limit and that, duet answers the JSON 413.
 */
#include "coordinator/http/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>

#include "common/err.h"
#include "coordinator/chat/encoder.h"
#include "coordinator/chat/outparse.h"
#include "coordinator/chat/sbuf.h"
#include "coordinator/clog.h"
#include "coordinator/tokenizer/tokenizer.h"

#define EOS_ID 1
#define MAX_STOP 16
#define DEFAULT_CHAT_MAX_TOKENS 16384
#define DEFAULT_CMPL_MAX_TOKENS 16

struct http_server {
    struct event_base *base;
    struct evhttp *http;
    eng_api api;
    tok_t *tok;
    char **keys;
    size_t n_keys;
    size_t max_body;
    int max_model_len, vocab;
    int fold_ids; /* testing: prompt ids >= vocab become id % vocab instead of a 400 */
    char *model_id, *version, *commit;
    char fingerprint[64];
    long long created;
    int32_t think_open, think_close, dsml, bos;
};

/* ---- small helpers ----------------------------------------------------------------------- */

typedef struct { /* a client error about to be answered */
    int status;
    const char *type, *code;
    char param[128]; /* "" = null */
    char msg[600];
} apierr;

/* Makes s valid UTF-8 in place: every byte that does not start a complete, well-formed sequence
 * becomes '?' (messages quote client bytes, e.g. a %FF in a path, and snprintf may cut a
 * character; jansson refuses invalid UTF-8). */
static void utf8_clean(char *s) {
    unsigned char *p = (unsigned char *)s;
    while (*p) {
        unsigned c = *p;
        size_t n = c < 0x80 ? 1 : (c >= 0xC2 && c <= 0xDF) ? 2 : (c >= 0xE0 && c <= 0xEF) ? 3
                                : (c >= 0xF0 && c <= 0xF4) ? 4 : 0;
        int ok = n > 0;
        for (size_t i = 1; ok && i < n; i++) ok = (p[i] & 0xC0) == 0x80;
        if (ok && n == 3) {
            unsigned cp = ((c & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6);
            ok = cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF);
        } else if (ok && n == 4) {
            unsigned cp = ((c & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12);
            ok = cp >= 0x10000 && cp <= 0x10FFFF;
        }
        if (!ok) {
            *p++ = '?';
            continue;
        }
        p += n;
    }
}

static int fail(apierr *e, int status, const char *code, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int fail(apierr *e, int status, const char *code, const char *param, const char *fmt,
                ...) {
    e->status = status;
    e->type = status >= 500 ? "server_error"
              : status == 503 ? "service_unavailable"
                              : "invalid_request_error";
    if (status == 503) e->type = "service_unavailable";
    e->code = code;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    utf8_clean(e->msg);
    utf8_clean(e->param);
    return -1;
}

static json_t *err_json(const apierr *e) {
    return json_pack("{s:{s:s, s:s, s:o, s:s}}", "error", "message", e->msg, "type", e->type,
                     "param", e->param[0] ? json_string(e->param) : json_null(), "code",
                     e->code);
}

static void send_json(struct evhttp_request *req, int status, json_t *body, const char *rid) {
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Type", "application/json");
    if (rid) evhttp_add_header(h, "X-Request-Id", rid);
    struct evbuffer *b = evbuffer_new();
    char *s = json_dumps(body, JSON_COMPACT);
    if (s) {
        evbuffer_add(b, s, strlen(s));
        free(s);
    }
    json_decref(body);
    const char *reason = status == 200   ? "OK"
                         : status == 400 ? "Bad Request"
                         : status == 401 ? "Unauthorized"
                         : status == 404 ? "Not Found"
                         : status == 405 ? "Method Not Allowed"
                         : status == 413 ? "Payload Too Large"
                         : status == 503 ? "Service Unavailable"
                         : status == 500 ? "Internal Server Error"
                                         : "Error";
    evhttp_send_reply(req, status, reason, b);
    evbuffer_free(b);
}

static void send_err(struct evhttp_request *req, const apierr *e, const char *rid) {
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    if (e->status == 401) evhttp_add_header(h, "WWW-Authenticate", "Bearer");
    if (e->status == 413) evhttp_add_header(h, "Connection", "close");
    if (e->status == 503) evhttp_add_header(h, "Retry-After", "5");
    send_json(req, e->status, err_json(e), rid);
}

static void random_hex(char *out, size_t nbytes) {
    unsigned char r[32];
    if (nbytes > sizeof r) nbytes = sizeof r;
    if (getrandom(r, nbytes, 0) != (ssize_t)nbytes) {
        uint64_t x = (uint64_t)time(NULL) ^ ((uint64_t)(uintptr_t)out << 16);
        for (size_t i = 0; i < nbytes; i++) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            r[i] = (unsigned char)(x >> 56);
        }
    }
    for (size_t i = 0; i < nbytes; i++) sprintf(out + 2 * i, "%02x", r[i]);
}

/* The client's X-Request-Id if it matches [A-Za-z0-9._-]{1,64}, else 32 random hex chars. */
static void request_id(struct evhttp_request *req, char out[65]) {
    const char *v = evhttp_find_header(evhttp_request_get_input_headers(req), "X-Request-Id");
    size_t n = v ? strlen(v) : 0;
    int ok = n >= 1 && n <= 64;
    for (size_t i = 0; ok && i < n; i++) {
        char ch = v[i];
        ok = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
             ch == '.' || ch == '_' || ch == '-';
    }
    if (ok) memcpy(out, v, n + 1);
    else random_hex(out, 16);
}

/* Constant-time (in the candidate's content) comparison of the presented key with every key. */
static int key_ok(const http_server *s, const char *got) {
    size_t lg = strlen(got);
    int match = 0;
    for (size_t k = 0; k < s->n_keys; k++) {
        const char *key = s->keys[k];
        size_t lk = strlen(key);
        unsigned char d = lg != lk;
        for (size_t i = 0; i < lk; i++) d |= (unsigned char)((i < lg ? got[i] : 0) ^ key[i]);
        match |= d == 0;
    }
    return match;
}

/* ---- typed field access: null equals absent (§2) ------------------------------------------ */

static json_t *field(json_t *o, const char *k) {
    json_t *v = json_object_get(o, k);
    return json_is_null(v) ? NULL : v;
}

/* 0 absent, 1 set, -1 error. Integers may be written 10 or 10.0. */
static int get_int(apierr *e, json_t *o, const char *k, long long lo, long long hi,
                   long long *out) {
    json_t *v = field(o, k);
    if (!v) return 0;
    long long x;
    if (json_is_integer(v)) x = json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
             fabs(json_real_value(v)) < 9.2e18)
        x = (long long)json_real_value(v);
    else return fail(e, 400, "invalid_type", k, "\"%s\" must be an integer", k);
    if (x < lo || x > hi)
        return fail(e, 400, "invalid_value", k, "\"%s\" must be between %lld and %lld (got %lld)",
                    k, lo, hi, x);
    *out = x;
    return 1;
}

static int get_num(apierr *e, json_t *o, const char *k, double lo, double hi, int lo_open,
                   double *out) {
    json_t *v = field(o, k);
    if (!v) return 0;
    if (!json_is_number(v)) return fail(e, 400, "invalid_type", k, "\"%s\" must be a number", k);
    double x = json_number_value(v);
    if (!(x <= hi && (lo_open ? x > lo : x >= lo)))
        return fail(e, 400, "invalid_value", k, "\"%s\" must be in %s%g, %g] (got %g)", k,
                    lo_open ? "(" : "[", lo, hi, x);
    *out = x;
    return 1;
}

static int get_bool(apierr *e, json_t *o, const char *k, bool *out) {
    json_t *v = field(o, k);
    if (!v) return 0;
    if (!json_is_boolean(v))
        return fail(e, 400, "invalid_type", k, "\"%s\" must be a boolean", k);
    *out = json_is_true(v);
    return 1;
}

static int get_str(apierr *e, json_t *o, const char *k, const char **out) {
    json_t *v = field(o, k);
    if (!v) return 0;
    if (!json_is_string(v)) return fail(e, 400, "invalid_type", k, "\"%s\" must be a string", k);
    *out = json_string_value(v);
    return 1;
}

/* model: absent/"" = served; the served id or the alias "deepseek-v4-flash"; else 404. */
static int check_model(const http_server *s, apierr *e, json_t *body, const char **model) {
    const char *m = NULL;
    if (get_str(e, body, "model", &m) < 0) return -1;
    if (!m || !*m) {
        *model = s->model_id;
        return 0;
    }
    if (strcmp(m, s->model_id) && strcmp(m, "deepseek-v4-flash"))
        return fail(e, 404, "model_not_found", "model",
                    "the model \"%s\" does not exist; this server serves \"%s\"", m, s->model_id);
    *model = m;
    return 0;
}

/* ---- generation requests ------------------------------------------------------------------ */

typedef struct hreq {
    http_server *s;
    struct evhttp_request *req; /* NULL once evhttp freed it (its connection died) */
    int chat, stream, include_usage, continuous_usage;
    int thinking, in_reasoning, include_reasoning, ignore_eos, skip_special;
    char rid[65];
    char id[80];
    char *model;
    long long created;
    int n_prompt, n_out, reasoning_tokens;
    int started;   /* SSE: the role chunk (chat) / first chunk was sent */
    int gone;      /* the client went away */
    int in_submit; /* inside eng submit: on_end is recorded, answered afterwards */
    int ended;
    const char *end_finish;
    char end_code[40], end_msg[600];
    tok_stream_t *ts;
    op_parser *op;
    char *stop[MAX_STOP];
    size_t n_stop;
    char **tool_names;
    size_t n_tools;
    struct evbuffer *pending; /* SSE bytes for the next flush */
    chat_sb text;             /* completions: generated text (cut at a matched stop string) */
    size_t released;          /* completions: bytes of text certain (sent when streaming) */
    int stop_idx;             /* completions: the matched stop string, or -1 */
    int include_stop;
    double t0; /* admission (monotonic s) */
    const char *effort; /* chat: the reasoning effort used (X-Duet-Reasoning-Effort) */
} hreq;

static void hreq_free(hreq *h) {
    if (h->ts) tok_stream_free(h->ts);
    if (h->op) op_free(h->op);
    for (size_t i = 0; i < h->n_stop; i++) free(h->stop[i]);
    for (size_t i = 0; i < h->n_tools; i++) free(h->tool_names[i]);
    free(h->tool_names);
    if (h->pending) evbuffer_free(h->pending);
    chat_sb_free(&h->text);
    free(h->model);
    free(h);
}

static json_t *usage_json(const hreq *h) {
    return json_pack("{s:i, s:i, s:i, s:{s:i}, s:{s:i}}", "prompt_tokens", h->n_prompt,
                     "completion_tokens", h->n_out, "total_tokens", h->n_prompt + h->n_out,
                     "prompt_tokens_details", "cached_tokens", 0, "completion_tokens_details",
                     "reasoning_tokens", h->reasoning_tokens);
}

/* A chunk with one choice (choice is stolen), or the usage chunk when choice is NULL. */
static void sse_chunk(hreq *h, json_t *choice) {
    json_t *c = json_pack("{s:s, s:s, s:I, s:s, s:s}", "id", h->id, "object",
                          h->chat ? "chat.completion.chunk" : "text_completion", "created",
                          (json_int_t)h->created, "model", h->model, "system_fingerprint",
                          h->s->fingerprint);
    json_t *choices = json_array();
    if (choice) json_array_append_new(choices, choice);
    json_object_set_new(c, "choices", choices);
    if (!choice) json_object_set_new(c, "usage", usage_json(h));
    else if (h->continuous_usage) json_object_set_new(c, "usage", usage_json(h));
    else if (h->include_usage) json_object_set_new(c, "usage", json_null());
    char *s = json_dumps(c, JSON_COMPACT);
    json_decref(c);
    if (!s) return;
    evbuffer_add_printf(h->pending, "data: %s\n\n", s);
    free(s);
}

static void sse_delta(hreq *h, json_t *delta) {
    sse_chunk(h, json_pack("{s:i, s:o, s:n, s:n}", "index", 0, "delta", delta, "logprobs",
                           "finish_reason"));
}

static void sse_flush(hreq *h) {
    if (evbuffer_get_length(h->pending) == 0) return;
    if (h->req && !h->gone) evhttp_send_reply_chunk(h->req, h->pending);
    evbuffer_drain(h->pending, evbuffer_get_length(h->pending));
}

static void sse_start(hreq *h) {
    if (h->started) return;
    h->started = 1;
    if (h->chat)
        sse_delta(h, json_pack("{s:s, s:s}", "role", "assistant", "content", ""));
}

static void op_emit(void *user, const op_event *ev) {
    hreq *h = user;
    json_t *d;
    switch (ev->kind) {
    case OP_EV_REASONING:
        if (!h->include_reasoning) return;
        d = json_pack("{s:s%}", "reasoning_content", ev->text, ev->len);
        break;
    case OP_EV_CONTENT:
        d = json_pack("{s:s%}", "content", ev->text, ev->len);
        break;
    case OP_EV_TOOL_START:
        d = json_pack("{s:[{s:I, s:s, s:s, s:{s:s, s:s}}]}", "tool_calls", "index",
                      (json_int_t)ev->index, "id", ev->id, "type", "function", "function",
                      "name", ev->name, "arguments", "");
        break;
    default:
        d = json_pack("{s:[{s:I, s:{s:s%}}]}", "tool_calls", "index", (json_int_t)ev->index,
                      "function", "arguments", ev->text, ev->len);
        break;
    }
    if (d) sse_delta(h, d);
}

static int structural(const hreq *h, int32_t id) {
    const http_server *s = h->s;
    return id == EOS_ID || id == s->bos || id == s->think_open || id == s->think_close ||
           id == s->dsml;
}

/* Completions: appends decoded text, looks for a stop string (the earliest match wins; the
 * text is cut before it, or after it with include_stop_str_in_output), and releases what is
 * certain — everything but a trailing proper prefix of a stop string, unless at_end. Streams the
 * released bytes. Returns 1 when a stop string matched (the choice ends). */
static int cmpl_add(hreq *h, const char *t, size_t n, int at_end) {
    if (h->stop_idx >= 0) return 1;
    if (n) chat_sb_put(&h->text, t, n);
    size_t end = h->text.len;
    int hit = 0;
    if (h->n_stop && h->text.len) {
        size_t best = SIZE_MAX, maxl = 0;
        for (size_t i = 0; i < h->n_stop; i++) {
            size_t sl = strlen(h->stop[i]);
            if (sl > maxl) maxl = sl;
            const char *m = memmem(h->text.p + h->released, h->text.len - h->released,
                                   h->stop[i], sl);
            if (m && (size_t)(m - h->text.p) < best) {
                best = (size_t)(m - h->text.p);
                h->stop_idx = (int)i;
            }
        }
        if (h->stop_idx >= 0) {
            hit = 1;
            end = best + (h->include_stop ? strlen(h->stop[h->stop_idx]) : 0);
            h->text.len = end;
            h->text.p[end] = 0;
        } else if (!at_end) {
            size_t k = maxl - 1 < h->text.len - h->released ? maxl - 1 : h->text.len - h->released;
            for (; k > 0; k--) {
                const char *tail = h->text.p + h->text.len - k;
                size_t i;
                for (i = 0; i < h->n_stop; i++)
                    if (strlen(h->stop[i]) > k && !memcmp(h->stop[i], tail, k)) break;
                if (i < h->n_stop) break;
            }
            end = h->text.len - k;
        }
    }
    if (end > h->released) {
        if (h->stream)
            sse_chunk(h, json_pack("{s:i, s:s%, s:n, s:n}", "index", 0, "text",
                                   h->text.p + h->released, end - h->released, "logprobs",
                                   "finish_reason"));
        h->released = end;
    }
    return hit;
}

static int on_token(void *user, const eng_token *tk) {
    hreq *h = user;
    int32_t id = tk->id;
    h->n_out++;
    if (h->gone) return 0; /* the engine aborts it at the step boundary */
    if (h->stream) sse_start(h);
    int stop = 0;
    if (h->chat) {
        if (h->in_reasoning) {
            h->reasoning_tokens++;
            if (id == h->s->think_close) h->in_reasoning = 0;
        }
        if (!(h->skip_special && tok_is_special(h->s->tok, id) && !structural(h, id))) {
            size_t n;
            const char *t = tok_stream_put(h->ts, id, &n);
            if (n) op_feed(h->op, t, n);
        }
        stop = op_stopped(h->op);
    } else {
        if (id == EOS_ID && !h->ignore_eos) {
            stop = 1;
        } else {
            size_t n;
            const char *t = tok_stream_put(h->ts, id, &n);
            stop = cmpl_add(h, t, n, 0);
        }
    }
    if (h->stream) sse_flush(h);
    return stop;
}

static int on_connected(void *user) {
    hreq *h = user;
    if (h->gone || !h->req) return 0;
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
    if (!h->gone) coord_log("http %s: the connection closed; aborting", h->rid);
    h->gone = 1;
    /* still queued on the connection: evhttp frees it with the connection */
    if (h->req && evhttp_request_get_connection(h->req)) h->req = NULL;
}

static void finish_answer(hreq *h) {
    struct evhttp_request *req = h->req;
    if (req) {
        struct evhttp_connection *ec = evhttp_request_get_connection(req);
        if (ec) evhttp_connection_set_closecb(ec, NULL, NULL);
    }
    const char *finish = h->end_finish;
    op_end end = !finish ? OP_END_ABORT
                 : !strcmp(finish, "length") ? OP_END_LENGTH
                 : !strcmp(finish, "abort")  ? OP_END_ABORT
                                             : OP_END_STOP;
    /* remaining text: the detokenizer's held bytes, then the parser's */
    size_t n;
    const char *t = tok_stream_flush(h->ts, &n);
    if (h->chat) {
        if (n) op_feed(h->op, t, n);
    } else {
        int stream = h->stream;
        h->stream = stream && finish; /* no text chunk before an error event */
        cmpl_add(h, t, n, 1);
        h->stream = stream;
    }
    const op_result *res = h->chat ? op_finish(h->op, end) : NULL;
    if (h->gone || !req) {
        if (req) evhttp_send_reply_end(req); /* frees a request whose connection died */
        return;
    }
    if (h->stream) {
        if (!finish) {
            apierr e;
            fail(&e, 500, h->end_code, NULL, "%s", h->end_msg);
            json_t *ej = err_json(&e);
            char *s = json_dumps(ej, JSON_COMPACT);
            json_decref(ej);
            if (s) evbuffer_add_printf(h->pending, "data: %s\n\n", s);
            free(s);
        } else {
            sse_start(h);
            const char *fr = res ? res->finish_reason : finish;
            const char *srs = res ? res->stop_reason
                              : h->stop_idx >= 0 ? h->stop[h->stop_idx] : NULL;
            json_t *sr = srs ? json_string(srs) : json_null();
            if (h->chat)
                sse_chunk(h, json_pack("{s:i, s:{}, s:n, s:s, s:o}", "index", 0, "delta",
                                       "logprobs", "finish_reason", fr, "stop_reason", sr));
            else
                sse_chunk(h, json_pack("{s:i, s:s, s:n, s:s, s:o}", "index", 0, "text", "",
                                       "logprobs", "finish_reason", fr, "stop_reason", sr));
            if (h->include_usage) sse_chunk(h, NULL);
        }
        evbuffer_add_printf(h->pending, "data: [DONE]\n\n");
        sse_flush(h);
        evhttp_send_reply_end(req);
        return;
    }
    if (!finish) {
        apierr e;
        fail(&e, 500, h->end_code, NULL, "%s", h->end_msg);
        if (!strcmp(h->end_code, "no_workers")) fail(&e, 503, "no_workers", NULL, "%s", h->end_msg);
        send_err(req, &e, h->rid);
        return;
    }
    json_t *choice;
    if (h->chat) {
        json_t *msg = json_pack("{s:s, s:n}", "role", "assistant", "refusal");
        json_object_set_new(msg, "content",
                            res->content_len == 0 && res->n_calls
                                ? json_null()
                                : json_stringn(res->content, res->content_len));
        if (h->thinking && h->include_reasoning)
            json_object_set_new(msg, "reasoning_content",
                                json_stringn(res->reasoning, res->reasoning_len));
        if (res->n_calls) {
            json_t *calls = json_array();
            for (size_t i = 0; i < res->n_calls; i++)
                json_array_append_new(
                    calls, json_pack("{s:s, s:s, s:{s:s, s:s%}}", "id", res->calls[i].id, "type",
                                     "function", "function", "name", res->calls[i].name,
                                     "arguments", res->calls[i].arguments,
                                     res->calls[i].arguments_len));
            json_object_set_new(msg, "tool_calls", calls);
        }
        choice = json_pack("{s:i, s:o, s:n, s:s, s:o}", "index", 0, "message", msg, "logprobs",
                           "finish_reason", res->finish_reason, "stop_reason",
                           res->stop_reason ? json_string(res->stop_reason) : json_null());
    } else {
        choice = json_pack("{s:i, s:s%, s:n, s:s, s:o}", "index", 0, "text",
                           h->text.p ? h->text.p : "", h->text.len, "logprobs", "finish_reason",
                           finish, "stop_reason",
                           h->stop_idx >= 0 ? json_string(h->stop[h->stop_idx]) : json_null());
    }
    if (h->effort)
        evhttp_add_header(evhttp_request_get_output_headers(req), "X-Duet-Reasoning-Effort",
                          h->effort);
    json_t *body = json_pack("{s:s, s:s, s:I, s:s, s:s, s:[o], s:o}", "id", h->id, "object",
                             h->chat ? "chat.completion" : "text_completion", "created",
                             (json_int_t)h->created, "model", h->model, "system_fingerprint",
                             h->s->fingerprint, "choices", choice, "usage", usage_json(h));
    send_json(req, 200, body, h->rid);
}

static void on_end(void *user, const char *finish, const char *code, const char *msg) {
    hreq *h = user;
    h->ended = 1;
    h->end_finish = finish;
    snprintf(h->end_code, sizeof h->end_code, "%s", code ? code : "");
    snprintf(h->end_msg, sizeof h->end_msg, "%s", msg ? msg : "");
    if (finish)
        coord_log("http %s: %s, %d prompt + %d completion tokens, finish %s%s, %.0f ms", h->rid,
                  h->chat ? "chat" : "completion", h->n_prompt, h->n_out, finish,
                  h->gone ? " (client gone)" : "", (coord_now_s() - h->t0) * 1000);
    else
        coord_log("http %s: failed after %d completion tokens: %s: %s", h->rid, h->n_out,
                  h->end_code, h->end_msg);
    if (h->in_submit) return; /* answered by the submitter */
    finish_answer(h);
    hreq_free(h);
}

/* Validated request → engine. h is consumed (freed here or in on_end). */
static void submit(http_server *s, hreq *h, struct evhttp_request *req, const int32_t *ids,
                   int n_ids, long long max_tokens, const eng_params *sp) {
    eng_params p = *sp;
    p.prompt = ids;
    p.n_prompt = n_ids;
    if (max_tokens > s->max_model_len - (long long)n_ids) /* clamp to the context */
        max_tokens = s->max_model_len - (long long)n_ids;
    p.max_tokens = (int)max_tokens;
    p.request_id = h->rid;
    h->n_prompt = n_ids;
    h->req = req;
    h->t0 = coord_now_s();
    h->pending = evbuffer_new();
    eng_sink sink = {.on_token = on_token, .on_end = on_end, .connected = on_connected,
                     .user = h};
    const char *code = "internal";
    char msg[300];
    h->in_submit = 1;
    int rc = s->api.submit(s->api.ctx, &p, &sink, &code, msg, sizeof msg);
    h->in_submit = 0;
    if (rc) {
        apierr e;
        fail(&e, 503, code, NULL, "%s", msg);
        send_err(req, &e, h->rid);
        hreq_free(h);
        return;
    }
    if (h->stream && !(h->ended && !h->end_finish)) {
        struct evkeyvalq *hd = evhttp_request_get_output_headers(req);
        evhttp_add_header(hd, "Content-Type", "text/event-stream");
        evhttp_add_header(hd, "Cache-Control", "no-cache");
        evhttp_add_header(hd, "X-Accel-Buffering", "no");
        evhttp_add_header(hd, "X-Request-Id", h->rid);
        if (h->effort) evhttp_add_header(hd, "X-Duet-Reasoning-Effort", h->effort);
        evhttp_send_reply_start(req, 200, "OK");
    } else if (h->stream) {
        h->stream = 0; /* failed before any byte: a plain JSON error */
    }
    evhttp_connection_set_closecb(evhttp_request_get_connection(req), on_conn_close, h);
    if (h->ended) {
        finish_answer(h);
        hreq_free(h);
    }
}

/* ---- request parsing shared by chat and completions --------------------------------------- */

/* Refuses fields that would change the output and are not implemented (§2): set and not at
 * their default → 400 unsupported_parameter. */
static int refuse_unimplemented(apierr *e, json_t *b, int chat) {
    static const char *const always[] = {"functions", "function_call", "prompt_logprobs",
                                         "audio", NULL};
    for (int i = 0; always[i]; i++)
        if (field(b, always[i]))
            return fail(e, 400, "unsupported_parameter", always[i],
                        "\"%s\" is not supported by this server", always[i]);
    if (json_is_true(field(b, "continue_final_message")))
        return fail(e, 400, "unsupported_parameter", "continue_final_message",
                    "\"continue_final_message\" is not supported yet");
    json_t *m = field(b, "modalities");
    if (m) {
        size_t i;
        json_t *v;
        if (!json_is_array(m))
            return fail(e, 400, "invalid_type", "modalities", "\"modalities\" must be an array");
        json_array_foreach(m, i, v) if (!json_is_string(v) ||
                                        strcmp(json_string_value(v), "text")) return fail(
            e, 400, "unsupported_value", "modalities", "only the \"text\" modality is supported");
    }
    static const struct {
        const char *k;
        double def;
    } nums[] = {{"min_p", 0},  {"presence_penalty", 0}, {"frequency_penalty", 0},
                {"repetition_penalty", 1}, {"min_tokens", 0}, {NULL, 0}};
    for (int i = 0; nums[i].k; i++) {
        json_t *v = field(b, nums[i].k);
        if (!v) continue;
        if (!json_is_number(v))
            return fail(e, 400, "invalid_type", nums[i].k, "\"%s\" must be a number", nums[i].k);
        if (json_number_value(v) != nums[i].def)
            return fail(e, 400, "unsupported_parameter", nums[i].k,
                        "\"%s\" is not supported yet (only its default %g)", nums[i].k,
                        nums[i].def);
    }
    static const char *const nonempty[] = {"logit_bias", "stop_token_ids", NULL};
    for (int i = 0; nonempty[i]; i++) {
        json_t *v = field(b, nonempty[i]);
        if (v && (json_is_array(v) ? json_array_size(v) != 0
                              : json_is_object(v) ? json_object_size(v) != 0 : 1))
            return fail(e, 400, "unsupported_parameter", nonempty[i],
                        "\"%s\" is not supported yet", nonempty[i]);
    }
    long long n = 1;
    if (get_int(e, b, "n", 1, 8, &n) < 0) return -1;
    if (n != 1)
        return fail(e, 400, "unsupported_value", "n", "\"n\" > 1 is not supported yet");
    long long bo = 1;
    if (get_int(e, b, "best_of", 1, 8, &bo) < 0) return -1;
    if (bo != n)
        return fail(e, 400, "invalid_value", "best_of", "\"best_of\" must equal \"n\"");
    bool rti = false;
    if (get_bool(e, b, "return_token_ids", &rti) < 0) return -1;
    if (rti)
        return fail(e, 400, "unsupported_parameter", "return_token_ids",
                    "\"return_token_ids\" is not supported yet");
    if (chat) {
        bool lp = false;
        long long tlp = 0;
        if (get_bool(e, b, "logprobs", &lp) < 0) return -1;
        if (get_int(e, b, "top_logprobs", 0, 20, &tlp) < 0) return -1;
        if (tlp && !lp)
            return fail(e, 400, "invalid_value", "top_logprobs",
                        "\"top_logprobs\" requires \"logprobs\": true");
        if (lp)
            return fail(e, 400, "unsupported_parameter", "logprobs",
                        "\"logprobs\" is not supported yet");
    } else {
        long long lp = 0;
        if (get_int(e, b, "logprobs", 0, 20, &lp) < 0) return -1;
        if (field(b, "logprobs"))
            return fail(e, 400, "unsupported_parameter", "logprobs",
                        "\"logprobs\" is not supported yet");
        const char *suffix = NULL;
        if (get_str(e, b, "suffix", &suffix) < 0) return -1;
        if (suffix && *suffix)
            return fail(e, 400, "unsupported_parameter", "suffix", "\"suffix\" is not supported");
        bool echo = false;
        if (get_bool(e, b, "echo", &echo) < 0) return -1;
        if (echo)
            return fail(e, 400, "unsupported_parameter", "echo", "\"echo\" is not supported yet");
    }
    return 0;
}

/* Sampling, max_tokens, stream fields common to both endpoints. */
static int parse_common(http_server *s, apierr *e, json_t *b, hreq *h, eng_params *p,
                        long long *max_tokens) {
    double temp = 1.0, top_p = 1.0;
    long long top_k = 0, seed = 0;
    if (get_num(e, b, "temperature", 0, 2, 0, &temp) < 0) return -1;
    if (get_num(e, b, "top_p", 0, 1, 1, &top_p) < 0) return -1;
    if (get_int(e, b, "top_k", -1, s->vocab, &top_k) < 0) return -1;
    int has_seed = get_int(e, b, "seed", INT64_MIN, INT64_MAX, &seed);
    if (has_seed < 0) return -1;
    if (!has_seed && getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed)
        seed = (long long)time(NULL);
    p->temperature = temp < 1e-5 ? 0.0f : (float)temp;
    p->top_p = (float)top_p;
    p->top_k = top_k < 0 ? 0 : (int)top_k;
    p->seed = (uint64_t)seed;
    long long mct = 0;
    int has_mct = h->chat ? get_int(e, b, "max_completion_tokens", 1, INT32_MAX, &mct) : 0;
    if (has_mct < 0) return -1;
    int has_mt = get_int(e, b, "max_tokens", 1, INT32_MAX, max_tokens);
    if (has_mt < 0) return -1;
    if (has_mct) *max_tokens = mct;
    else if (!has_mt) *max_tokens = h->chat ? DEFAULT_CHAT_MAX_TOKENS : DEFAULT_CMPL_MAX_TOKENS;
    bool stream = false, ignore_eos = false, skip_special = true;
    if (get_bool(e, b, "stream", &stream) < 0 || get_bool(e, b, "ignore_eos", &ignore_eos) < 0 ||
        get_bool(e, b, "skip_special_tokens", &skip_special) < 0)
        return -1;
    h->stream = stream;
    h->ignore_eos = ignore_eos;
    h->skip_special = skip_special;
    json_t *so = field(b, "stream_options");
    if (so) {
        if (!stream)
            return fail(e, 400, "invalid_value", "stream_options",
                        "\"stream_options\" is only allowed with \"stream\": true");
        if (!json_is_object(so))
            return fail(e, 400, "invalid_type", "stream_options",
                        "\"stream_options\" must be an object");
        bool iu = false, cu = false;
        if (get_bool(e, so, "include_usage", &iu) < 0 ||
            get_bool(e, so, "continuous_usage_stats", &cu) < 0) {
            snprintf(e->param, sizeof e->param, "stream_options.%s",
                     field(so, "include_usage") && !json_is_boolean(field(so, "include_usage"))
                         ? "include_usage"
                         : "continuous_usage_stats");
            return -1;
        }
        h->include_usage = iu;
        h->continuous_usage = cu;
    }
    return 0;
}

/* stop: a string or up to 16 strings of at most 256 bytes; empty ones are skipped. */
static int parse_stop(apierr *e, json_t *b, hreq *h) {
    json_t *stop = field(b, "stop");
    if (!stop) return 0;
    if (json_is_string(stop)) {
        if (json_string_length(stop) > 256 || memchr(json_string_value(stop), 0,
                                                     json_string_length(stop)))
            return fail(e, 400, "invalid_value", "stop",
                        "\"stop\" must be at most 256 bytes (and hold no NUL)");
        if (json_string_length(stop)) h->stop[h->n_stop++] = xstrdup(json_string_value(stop));
        return 0;
    }
    if (!json_is_array(stop) || json_array_size(stop) > MAX_STOP)
        return fail(e, 400, "invalid_value", "stop",
                    "\"stop\" must be a string or an array of at most 16 strings");
    size_t i;
    json_t *v;
    json_array_foreach(stop, i, v) {
        if (!json_is_string(v) || json_string_length(v) > 256 ||
            memchr(json_string_value(v), 0, json_string_length(v)))
            return fail(e, 400, "invalid_value", "stop",
                        "\"stop\" entries must be strings of at most 256 bytes");
        if (json_string_length(v)) h->stop[h->n_stop++] = xstrdup(json_string_value(v));
    }
    return 0;
}

/* Every prompt id must exist in the model; the prompt must leave room for one token. */
static int check_prompt(http_server *s, apierr *e, int32_t *ids, size_t n, const char *param) {
    if (n == 0) return fail(e, 400, "invalid_value", param, "the prompt is empty (0 tokens)");
    for (size_t i = 0; i < n; i++)
        if (s->fold_ids && ids[i] >= s->vocab) ids[i] %= s->vocab;
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= s->vocab)
            return fail(e, 400, "invalid_value", param,
                        "prompt token id %d (at index %zu) is outside the model's vocabulary "
                        "[0, %d)",
                        (int)ids[i], i, s->vocab);
    if ((long long)n >= s->max_model_len)
        return fail(e, 400, "context_length_exceeded", param,
                    "the prompt has %zu tokens, but this model's maximum context length is %d "
                    "tokens (prompt and completion together)",
                    n, s->max_model_len);
    return 0;
}

/* Chat messages → prompt ids (shared by chat completions and chat-form tokenize). */
static int render_chat(http_server *s, apierr *e, json_t *b, tok_ids_t *ids, bool *thinking_out,
                       int *n_tools_out, const char **effort_out) {
    json_t *msgs = json_object_get(b, "messages");
    if (!msgs || json_is_null(msgs))
        return fail(e, 400, "missing_required_parameter", "messages",
                    "\"messages\" is required");
    if (!json_is_array(msgs))
        return fail(e, 400, "invalid_type", "messages", "\"messages\" must be an array");
    if (json_array_size(msgs) == 0)
        return fail(e, 400, "invalid_value", "messages",
                    "\"messages\" must contain at least one message");
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m) {
        char param[96];
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (!json_is_object(m))
            return fail(e, 400, "invalid_type", param, "%s must be an object", param);
        const char *role = json_string_value(json_object_get(m, "role"));
        snprintf(param, sizeof param, "messages[%zu].role", i);
        if (!role) return fail(e, 400, "invalid_type", param, "%s must be a string", param);
        if (!strcmp(role, "function"))
            return fail(e, 400, "invalid_value", param,
                        "the \"function\" role is not supported; use \"tool\"");
        if (i + 1 == json_array_size(msgs) && !strcmp(role, "assistant"))
            return fail(e, 400, "invalid_value", param,
                        "the last message must not be an assistant message (prefix "
                        "continuation is not supported yet)");
        json_t *content = json_object_get(m, "content");
        if (json_is_array(content)) {
            size_t j;
            json_t *part;
            json_array_foreach(content, j, part) {
                const char *type = json_string_value(json_object_get(part, "type"));
                if (!type || strcmp(type, "text")) {
                    snprintf(param, sizeof param, "messages[%zu].content[%zu].type", i, j);
                    return fail(e, 400, "unsupported_value", param,
                                "only text content parts are supported (got \"%s\")",
                                type ? type : "?");
                }
            }
        }
    }
    json_t *tools = field(b, "tools");
    if (tools) {
        if (!json_is_array(tools))
            return fail(e, 400, "invalid_type", "tools", "\"tools\" must be an array");
        json_t *t;
        json_array_foreach(tools, i, t) {
            char param[64];
            snprintf(param, sizeof param, "tools[%zu]", i);
            const char *type = json_string_value(json_object_get(t, "type"));
            json_t *fn = json_object_get(t, "function");
            if (!type || strcmp(type, "function") || !json_is_object(fn) ||
                !json_is_string(json_object_get(fn, "name")))
                return fail(e, 400, "invalid_value", param,
                            "%s must be {\"type\":\"function\",\"function\":{\"name\":...}}",
                            param);
            /* the name goes inside a DSML attribute: 1-64 of [A-Za-z0-9_.:-], unique */
            const char *name = json_string_value(json_object_get(fn, "name"));
            size_t nl = strlen(name);
            int ok = nl >= 1 && nl <= 64;
            for (size_t k = 0; ok && k < nl; k++) {
                char ch = name[k];
                ok = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
                     (ch >= '0' && ch <= '9') || ch == '_' || ch == '.' || ch == ':' || ch == '-';
            }
            snprintf(param, sizeof param, "tools[%zu].function.name", i);
            if (!ok)
                return fail(e, 400, "invalid_value", param,
                            "a tool name must be 1 to 64 characters from A-Z a-z 0-9 _ . : -");
            for (size_t k = 0; k < i; k++)
                if (!strcmp(name, json_string_value(json_object_get(
                                      json_object_get(json_array_get(tools, k), "function"),
                                      "name"))))
                    return fail(e, 400, "invalid_value", param,
                                "the tool name \"%s\" is declared twice", name);
        }
    }
    json_t *rf = field(b, "response_format");
    if (rf) {
        const char *t = json_is_object(rf) ? json_string_value(json_object_get(rf, "type")) : NULL;
        if (!t || (strcmp(t, "text") && strcmp(t, "json_object") && strcmp(t, "json_schema")))
            return fail(e, 400, "invalid_value", "response_format",
                        "\"response_format.type\" must be text, json_object or json_schema");
        if (!strcmp(t, "text")) rf = NULL;
    }
    /* thinking (§3.4): thinking.type, then kwargs, then reasoning_effort none, then on */
    bool thinking = true;
    int decided = 0;
    json_t *th = field(b, "thinking");
    if (th) {
        const char *t = json_is_object(th) ? json_string_value(json_object_get(th, "type")) : NULL;
        if (!t || (strcmp(t, "enabled") && strcmp(t, "disabled")))
            return fail(e, 400, "invalid_value", "thinking",
                        "\"thinking.type\" must be \"enabled\" or \"disabled\"");
        thinking = !strcmp(t, "enabled");
        decided = 1;
    }
    json_t *kw = field(b, "chat_template_kwargs");
    if (kw && !json_is_object(kw))
        return fail(e, 400, "invalid_type", "chat_template_kwargs",
                    "\"chat_template_kwargs\" must be an object");
    bool kb = false;
    if (!decided && kw) {
        if (get_bool(e, kw, "thinking", &kb) > 0 || get_bool(e, kw, "enable_thinking", &kb) > 0) {
            thinking = kb;
            decided = 1;
        }
    }
    const char *effort = NULL;
    if (get_str(e, b, "reasoning_effort", &effort) < 0) return -1;
    if (!effort && kw) {
        json_t *v = field(kw, "reasoning_effort");
        if (v && !json_is_string(v))
            return fail(e, 400, "invalid_type", "chat_template_kwargs.reasoning_effort",
                        "\"reasoning_effort\" must be a string");
        effort = json_string_value(v);
    }
    enc_effort eff = ENC_EFFORT_LOW;
    if (effort) {
        if (!strcmp(effort, "none")) {
            if (!decided) thinking = false;
        } else if (!strcmp(effort, "minimal") || !strcmp(effort, "low") ||
                   !strcmp(effort, "medium")) {
            eff = ENC_EFFORT_LOW;
        } else if (!strcmp(effort, "high") || !strcmp(effort, "xhigh")) {
            eff = ENC_EFFORT_HIGH;
        } else if (!strcmp(effort, "max")) {
            eff = s->max_model_len >= 393216 ? ENC_EFFORT_MAX : ENC_EFFORT_HIGH;
        } else {
            return fail(e, 400, "invalid_value", "reasoning_effort",
                        "\"reasoning_effort\" must be none, minimal, low, medium, high, xhigh "
                        "or max");
        }
    }
    bool drop = true;
    if (kw && get_bool(e, kw, "drop_thinking", &drop) < 0) return -1;
    enc_request er;
    enc_request_init(&er);
    er.messages = msgs;
    er.tools = tools;
    er.response_format = rf;
    er.thinking = thinking;
    er.effort = eff;
    er.flavour = ENC_FLAVOUR_0731;
    er.drop_thinking = drop;
    er.developer_as_system = true;
    char *text = NULL;
    size_t len = 0;
    char err[400];
    if (enc_render(&er, &text, &len, err, sizeof err))
        return fail(e, 400, "invalid_value", "messages", "%s", err);
    int rc = tok_encode(s->tok, text, len, ids);
    free(text);
    if (rc)
        return fail(e, 400, "context_length_exceeded", "messages",
                    "the rendered prompt is too long to tokenize");
    *thinking_out = thinking;
    *effort_out = !thinking ? "none"
                  : eff == ENC_EFFORT_MAX ? "max"
                  : eff == ENC_EFFORT_HIGH ? "high"
                                           : "low";
    *n_tools_out = tools ? (int)json_array_size(tools) : 0;
    return 0;
}

/* ---- handlers ------------------------------------------------------------------------------ */

typedef struct {
    http_server *s;
    struct evhttp_request *req;
    char rid[65];
} hctx;

static void handle_chat(hctx *x, json_t *b) {
    http_server *s = x->s;
    apierr e;
    const char *model;
    hreq *h = xcalloc(1, sizeof *h);
    h->s = s;
    h->chat = 1;
    h->stop_idx = -1;
    tok_ids_t ids = {0};
    eng_params p;
    eng_params_init(&p);
    long long max_tokens = 0;
    bool thinking = true;
    int n_tools = 0;
    const char *effort = "low";
    if (check_model(s, &e, b, &model) || refuse_unimplemented(&e, b, 1) ||
        parse_common(s, &e, b, h, &p, &max_tokens) ||
        render_chat(s, &e, b, &ids, &thinking, &n_tools, &effort))
        goto bad;
    /* tool_choice: none / auto (required and named need the grammar mask: later) */
    json_t *tc = field(b, "tool_choice");
    op_config oc;
    op_config_init(&oc);
    oc.tool_choice = n_tools ? OP_TOOLS_AUTO : OP_TOOLS_NONE;
    if (tc) {
        const char *t = json_string_value(tc);
        if (t && !strcmp(t, "none")) oc.tool_choice = OP_TOOLS_NONE;
        else if (t && !strcmp(t, "auto")) {
        } else if ((t && !strcmp(t, "required")) || json_is_object(tc)) {
            fail(&e, 400, "unsupported_value", "tool_choice",
                 "\"tool_choice\" required or a named function is not supported yet (use "
                 "\"auto\" or \"none\")");
            goto bad;
        } else {
            fail(&e, 400, "invalid_value", "tool_choice",
                 "\"tool_choice\" must be \"none\", \"auto\", \"required\" or a function");
            goto bad;
        }
    }
    bool ptc = true, isso = false, inc_r = true;
    if (get_bool(&e, b, "parallel_tool_calls", &ptc) < 0 ||
        get_bool(&e, b, "include_stop_str_in_output", &isso) < 0 ||
        get_bool(&e, b, "include_reasoning", &inc_r) < 0)
        goto bad;
    if (parse_stop(&e, b, h)) goto bad;
    if (check_prompt(s, &e, ids.v, ids.n, "messages")) goto bad;
    json_t *tools = field(b, "tools");
    if (n_tools) {
        h->tool_names = xcalloc((size_t)n_tools, sizeof *h->tool_names);
        for (int i = 0; i < n_tools; i++)
            h->tool_names[h->n_tools++] = xstrdup(json_string_value(json_object_get(
                json_object_get(json_array_get(tools, (size_t)i), "function"), "name")));
    }
    h->thinking = thinking;
    h->effort = effort;
    h->in_reasoning = thinking;
    h->include_reasoning = inc_r;
    h->model = xstrdup(model);
    memcpy(h->rid, x->rid, sizeof h->rid);
    snprintf(h->id, sizeof h->id, "chatcmpl-%s", h->rid);
    h->created = (long long)time(NULL);
    oc.thinking = thinking;
    oc.tool_names = (const char *const *)h->tool_names;
    oc.n_tool_names = h->n_tools;
    oc.parallel_tool_calls = ptc;
    oc.ignore_eos = h->ignore_eos;
    oc.stop = (const char *const *)h->stop;
    oc.n_stop = h->n_stop;
    oc.include_stop_str = isso;
    if (h->stream) {
        oc.emit = op_emit;
        oc.emit_user = h;
    }
    h->op = op_new(&oc);
    h->ts = tok_stream_new(s->tok, 0); /* the parser needs structural spellings */
    submit(s, h, x->req, ids.v, (int)ids.n, max_tokens, &p);
    tok_ids_free(&ids);
    return;
bad:
    tok_ids_free(&ids);
    hreq_free(h);
    send_err(x->req, &e, x->rid);
}

/* prompt: string, [string] (one), [int...] or [[int...]] (one). */
static int completion_prompt(http_server *s, apierr *e, json_t *b, tok_ids_t *ids) {
    json_t *pr = json_object_get(b, "prompt");
    if (!pr || json_is_null(pr))
        return fail(e, 400, "missing_required_parameter", "prompt", "\"prompt\" is required");
    if (json_is_array(pr) && json_array_size(pr) > 0 &&
        (json_is_string(json_array_get(pr, 0)) || json_is_array(json_array_get(pr, 0)))) {
        if (json_array_size(pr) != 1)
            return fail(e, 400, "unsupported_value", "prompt",
                        "several prompts in one request are not supported yet");
        pr = json_array_get(pr, 0);
    }
    if (json_is_string(pr)) {
        if (tok_encode(s->tok, json_string_value(pr), json_string_length(pr), ids))
            return fail(e, 400, "context_length_exceeded", "prompt",
                        "the prompt is too long to tokenize");
        return 0;
    }
    if (!json_is_array(pr))
        return fail(e, 400, "invalid_type", "prompt",
                    "\"prompt\" must be a string, an array of strings, an array of token ids or "
                    "an array of token-id arrays");
    size_t i;
    json_t *v;
    json_array_foreach(pr, i, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > INT32_MAX)
            return fail(e, 400, "invalid_type", "prompt",
                        "\"prompt\"[%zu] is not a token id (an integer >= 0)", i);
        if (ids->n == ids->cap) {
            ids->cap = ids->cap ? 2 * ids->cap : 64;
            ids->v = xrealloc(ids->v, ids->cap * sizeof *ids->v);
        }
        ids->v[ids->n++] = (int32_t)json_integer_value(v);
    }
    return 0;
}

static void handle_completions(hctx *x, json_t *b) {
    http_server *s = x->s;
    apierr e;
    const char *model;
    hreq *h = xcalloc(1, sizeof *h);
    h->s = s;
    h->stop_idx = -1;
    tok_ids_t ids = {0};
    eng_params p;
    eng_params_init(&p);
    long long max_tokens = 0;
    if (check_model(s, &e, b, &model) || refuse_unimplemented(&e, b, 0) ||
        parse_common(s, &e, b, h, &p, &max_tokens) || completion_prompt(s, &e, b, &ids))
        goto bad;
    bool isso = false;
    if (parse_stop(&e, b, h) || get_bool(&e, b, "include_stop_str_in_output", &isso) < 0)
        goto bad;
    h->include_stop = isso;
    if (check_prompt(s, &e, ids.v, ids.n, "prompt")) goto bad;
    h->model = xstrdup(model);
    memcpy(h->rid, x->rid, sizeof h->rid);
    snprintf(h->id, sizeof h->id, "cmpl-%s", h->rid);
    h->created = (long long)time(NULL);
    h->ts = tok_stream_new(s->tok, h->skip_special);
    submit(s, h, x->req, ids.v, (int)ids.n, max_tokens, &p);
    tok_ids_free(&ids);
    return;
bad:
    tok_ids_free(&ids);
    hreq_free(h);
    send_err(x->req, &e, x->rid);
}

static void handle_tokenize(hctx *x, json_t *b) {
    http_server *s = x->s;
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
            char *t;
            size_t n;
            tok_decode(s->tok, &ids.v[i], 1, 0, &t, &n);
            json_array_append_new(ts, json_stringn(t, n));
            free(t);
        }
    }
    json_t *r = json_pack("{s:I, s:i, s:o}", "count", (json_int_t)ids.n, "max_model_len",
                          s->max_model_len, "tokens", toks);
    if (ts) json_object_set_new(r, "token_strs", ts);
    tok_ids_free(&ids);
    send_json(x->req, 200, r, x->rid);
    return;
bad:
    tok_ids_free(&ids);
    send_err(x->req, &e, x->rid);
}

static void handle_detokenize(hctx *x, json_t *b) {
    http_server *s = x->s;
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
    send_json(x->req, 200, json_pack("{s:s%}", "prompt", text, len), x->rid);
    free(text);
    return;
bad:
    send_err(x->req, &e, x->rid);
}

static json_t *model_card(http_server *s, const char *id) {
    int alias = strcmp(id, s->model_id) != 0;
    return json_pack("{s:s, s:s, s:I, s:s, s:s, s:o, s:i}", "id", id, "object", "model",
                     "created", (json_int_t)s->created, "owned_by", "duet", "root", s->model_id,
                     "parent", alias ? json_string(s->model_id) : json_null(), "max_model_len",
                     s->max_model_len);
}

static void handle_ready(hctx *x) {
    http_server *s = x->s;
    const char *st = s->api.state(s->api.ctx);
    int up = s->api.workers_up(s->api.ctx);
    int ok = !strcmp(st, "serving") && up;
    json_t *checks = json_pack("{s:s, s:s}", "state", !strcmp(st, "serving") ? "ok" : st,
                               "workers", up ? "ok" : "the worker group is not up");
    send_json(x->req, ok ? 200 : 503,
              json_pack("{s:s, s:o}", "status", ok ? "ready" : "not_ready", "checks", checks),
              x->rid);
}

/* ---- routing ------------------------------------------------------------------------------- */

enum { R_NONE, R_HEALTH, R_READY, R_VERSION, R_MODELS, R_MODEL, R_TOKENIZE, R_DETOKENIZE,
       R_CHAT, R_CMPL };

static int route(const char *path, const char **model_id) {
    static const struct {
        const char *p;
        int r;
    } t[] = {{"/health", R_HEALTH},         {"/health/ready", R_READY},
             {"/version", R_VERSION},       {"/v1/models", R_MODELS},
             {"/tokenize", R_TOKENIZE},     {"/v1/tokenize", R_TOKENIZE},
             {"/detokenize", R_DETOKENIZE}, {"/v1/detokenize", R_DETOKENIZE},
             {"/v1/chat/completions", R_CHAT}, {"/v1/completions", R_CMPL},
             {NULL, 0}};
    for (int i = 0; t[i].p; i++)
        if (!strcmp(path, t[i].p)) return t[i].r;
    if (!strncmp(path, "/v1/models/", 11) && path[11]) {
        *model_id = path + 11;
        return R_MODEL;
    }
    return R_NONE;
}

static void on_request(struct evhttp_request *req, void *arg) {
    http_server *s = arg;
    hctx x = {.s = s, .req = req};
    request_id(req, x.rid);
    apierr e;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *raw = uri ? evhttp_uri_get_path(uri) : NULL;
    char *path = evhttp_uridecode(raw && *raw ? raw : "/", 0, NULL);
    if (!path) {
        fail(&e, 404, "not_found", NULL, "the path is not valid");
        send_err(req, &e, x.rid);
        return;
    }
    size_t pl = strlen(path);
    if (pl > 1 && path[pl - 1] == '/') path[pl - 1] = 0; /* one trailing slash is ignored */
    const char *mid = NULL;
    int r = route(path, &mid);
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    if (r == R_NONE) {
        fail(&e, 404, "not_found", NULL, "there is no endpoint %s", path);
        goto err;
    }
    int get = r == R_HEALTH || r == R_READY || r == R_VERSION || r == R_MODELS || r == R_MODEL;
    int method_ok = get ? (cmd == EVHTTP_REQ_GET || cmd == EVHTTP_REQ_HEAD) : cmd == EVHTTP_REQ_POST;
    if (!method_ok) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow",
                          get ? "GET, HEAD" : "POST");
        fail(&e, 405, "method_not_allowed", NULL, "%s takes %s", path, get ? "GET" : "POST");
        goto err;
    }
    if (r == R_HEALTH) {
        send_json(req, 200, json_pack("{s:s}", "status", "ok"), x.rid);
        goto done;
    }
    if (r == R_READY) {
        handle_ready(&x);
        goto done;
    }
    if (r == R_VERSION) {
        send_json(req, 200, json_pack("{s:s, s:s, s:s}", "version", s->version, "commit",
                                      s->commit, "model", s->model_id), x.rid);
        goto done;
    }
    if (s->n_keys) {
        const char *a =
            evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
        if (!a || strncasecmp(a, "Bearer ", 7) || !key_ok(s, a + 7)) {
            fail(&e, 401, "invalid_api_key", NULL,
                 a ? "the API key is not valid"
                   : "an API key is required (header \"Authorization: Bearer <key>\")");
            goto err;
        }
    }
    if (r == R_MODELS) {
        json_t *data = json_array();
        json_array_append_new(data, model_card(s, s->model_id));
        if (strcmp(s->model_id, "deepseek-v4-flash"))
            json_array_append_new(data, model_card(s, "deepseek-v4-flash"));
        send_json(req, 200, json_pack("{s:s, s:o}", "object", "list", "data", data), x.rid);
        goto done;
    }
    if (r == R_MODEL) {
        if (strcmp(mid, s->model_id) && strcmp(mid, "deepseek-v4-flash")) {
            fail(&e, 404, "model_not_found", "model", "the model \"%s\" does not exist", mid);
            goto err;
        }
        send_json(req, 200, model_card(s, mid), x.rid);
        goto done;
    }
    /* POST endpoints: the body is JSON whatever the Content-Type */
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    if (len > s->max_body) {
        fail(&e, 413, "request_too_large", NULL,
             "the request body has %zu bytes; the limit is %zu (--max-body-bytes)", len,
             s->max_body);
        goto err;
    }
    const char *body = (const char *)evbuffer_pullup(in, -1);
    json_error_t je;
    json_t *b = json_loadb(body ? body : "", len, 0, &je);
    if (!b) {
        fail(&e, 400, "invalid_json", NULL, "the body is not valid JSON: %s (line %d, column %d)",
             je.text, je.line, je.column);
        goto err;
    }
    if (!json_is_object(b)) {
        json_decref(b);
        fail(&e, 400, "invalid_type", NULL, "the body must be a JSON object");
        goto err;
    }
    switch (r) {
    case R_TOKENIZE: handle_tokenize(&x, b); break;
    case R_DETOKENIZE: handle_detokenize(&x, b); break;
    case R_CHAT: handle_chat(&x, b); break;
    default: handle_completions(&x, b); break;
    }
    json_decref(b);
    goto done;
err:
    send_err(req, &e, x.rid);
done:
    free(path);
}

/* ---- set-up -------------------------------------------------------------------------------- */

static int load_keys(http_server *s, const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "--api-key-file %s: cannot open it: %s", path, strerror(errno));
        return -1;
    }
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        size_t n = strlen(p);
        while (n && (p[n - 1] == '\n' || p[n - 1] == '\r' || p[n - 1] == ' ' || p[n - 1] == '\t'))
            p[--n] = 0;
        if (!n || *p == '#') continue;
        s->keys = xrealloc(s->keys, (s->n_keys + 1) * sizeof *s->keys);
        s->keys[s->n_keys++] = xstrdup(p);
        memset(line, 0, sizeof line);
    }
    fclose(f);
    if (!s->n_keys) {
        snprintf(err, errlen, "--api-key-file %s holds no key (one key per line)", path);
        return -1;
    }
    return 0;
}

static int is_loopback(const char *host) {
    if (!strcmp(host, "localhost") || !strcmp(host, "::1")) return 1;
    struct in_addr a;
    if (inet_pton(AF_INET, host, &a) == 1) return (ntohl(a.s_addr) >> 24) == 127;
    return 0;
}

int http_open(struct event_base *base, const http_cfg *cfg, const eng_api *api,
              http_server **out, char *err, size_t errlen) {
    *out = NULL;
    char host[256];
    const char *colon = strrchr(cfg->listen, ':');
    char *end = NULL;
    long port = colon ? strtol(colon + 1, &end, 10) : -1;
    if (!colon || colon == cfg->listen || !end || *end || end == colon + 1 || port < 0 ||
        port > 65535 || (size_t)(colon - cfg->listen) >= sizeof host) {
        snprintf(err, errlen, "--listen '%s' is not HOST:PORT", cfg->listen);
        return -1;
    }
    memcpy(host, cfg->listen, (size_t)(colon - cfg->listen));
    host[colon - cfg->listen] = 0;
    if (host[0] == '[' && host[strlen(host) - 1] == ']') {
        memmove(host, host + 1, strlen(host));
        host[strlen(host) - 1] = 0;
    }
    if (!is_loopback(host) && !cfg->api_key_file) {
        snprintf(err, errlen,
                 "--listen %s is not a loopback address: refusing to serve the API to the "
                 "network without --api-key-file",
                 cfg->listen);
        return -1;
    }
    http_server *s = xcalloc(1, sizeof *s);
    s->base = base;
    s->api = *api;
    s->max_body = cfg->max_body_bytes;
    s->max_model_len = cfg->max_model_len;
    s->fold_ids = cfg->fold_prompt_ids;
    s->model_id = xstrdup(cfg->model_id);
    s->version = xstrdup(cfg->version);
    s->commit = xstrdup(cfg->commit);
    snprintf(s->fingerprint, sizeof s->fingerprint, "duet-%s-%.7s", cfg->version, cfg->commit);
    s->created = (long long)time(NULL);
    if (cfg->api_key_file && load_keys(s, cfg->api_key_file, err, errlen)) goto fail;
    if (tok_load(cfg->tokenizer_path, &s->tok, err, errlen)) goto fail;
    s->vocab = cfg->vocab_size < (int)tok_vocab_size(s->tok) ? cfg->vocab_size
                                                             : (int)tok_vocab_size(s->tok);
    s->bos = tok_token_to_id(s->tok, "<｜begin▁of▁sentence｜>");
    s->think_open = tok_token_to_id(s->tok, "<think>");
    s->think_close = tok_token_to_id(s->tok, "</think>");
    s->dsml = tok_token_to_id(s->tok, "｜DSML｜");
    s->http = evhttp_new(base);
    /* evhttp refuses bodies far over the limit itself (bounded memory); duet answers the JSON
     * 413 for bodies between the limit and that hard cap */
    size_t hard = cfg->max_body_bytes > ((size_t)1 << 40) ? cfg->max_body_bytes
                                                          : cfg->max_body_bytes * 4 + 65536;
    evhttp_set_max_body_size(s->http, (ev_ssize_t)hard);
    evhttp_set_max_headers_size(s->http, 64 << 10);
    evhttp_set_timeout(s->http, 75);
    evhttp_set_allowed_methods(s->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                            EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                            EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH);
    evhttp_set_gencb(s->http, on_request, s);
    struct evhttp_bound_socket *bs = evhttp_bind_socket_with_handle(s->http, host, (ev_uint16_t)port);
    if (!bs) {
        snprintf(err, errlen, "--listen %s: cannot bind: %s", cfg->listen, strerror(errno));
        goto fail;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    int bound = (int)port;
    if (getsockname(evhttp_bound_socket_get_fd(bs), (struct sockaddr *)&ss, &sl) == 0)
        bound = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                               : ((struct sockaddr_in *)&ss)->sin_port);
    coord_log("http listening on %s:%d (model %s, max_model_len %d%s)", host, bound, s->model_id,
              s->max_model_len, s->n_keys ? ", API key required" : "");
    *out = s;
    return 0;
fail:
    http_free(s);
    return -1;
}

void http_free(http_server *s) {
    if (!s) return;
    if (s->http) evhttp_free(s->http);
    if (s->tok) tok_free(s->tok);
    for (size_t i = 0; i < s->n_keys; i++) {
        memset(s->keys[i], 0, strlen(s->keys[i]));
        free(s->keys[i]);
    }
    free(s->keys);
    free(s->model_id);
    free(s->version);
    free(s->commit);
    free(s);
}
