/* hresp.c — what a generation request answers: SSE chunks (server-api §3.8, §5) and the
 * non-streaming JSON bodies (§3.6, §3.7, §5), logprobs and usage included.
 *
 * Why: the shapes are where strict clients break (openai-node's stream helper, the AI SDK's
 * zod schemas, benchmarks indexing choices[0]); keeping every chunk and body builder here, apart
 * from the engine bridge, makes the rules checkable in one place: one choice per chunk, deltas
 * with only the keys they have, a separate empty finish chunk per choice, the usage chunk only
 * with include_usage, and logprob entries whose bytes join to the content.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>

#include "coordinator/http/hgen.h"

static json_t *usage_json(const hreq *h) {
    long long prompt = 0, out = 0, cached = 0, reasoning = 0;
    for (size_t k = 0; k < h->g.n_prompts; k++) prompt += (long long)h->g.prompts[k].n;
    for (int i = 0; i < h->n_choices; i++) {
        out += h->c[i].n_out;
        reasoning += h->c[i].reasoning_tokens;
        if (h->c[i].index % h->g.n == 0) cached += h->c[i].cached;
    }
    return json_pack("{s:I, s:I, s:I, s:{s:I}, s:{s:I}}", "prompt_tokens", (json_int_t)prompt,
                     "completion_tokens", (json_int_t)out, "total_tokens",
                     (json_int_t)(prompt + out), "prompt_tokens_details", "cached_tokens",
                     (json_int_t)cached, "completion_tokens_details", "reasoning_tokens",
                     (json_int_t)reasoning);
}

/* A chunk with one choice (stolen), or the usage chunk when choice is NULL. */
static void sse_chunk(hreq *h, json_t *choice) {
    json_t *c = json_pack("{s:s, s:s, s:I, s:s, s:s}", "id", h->id, "object",
                          h->g.chat ? "chat.completion.chunk" : "text_completion", "created",
                          (json_int_t)h->created, "model", h->model, "system_fingerprint",
                          h->s->fingerprint);
    json_t *choices = json_array();
    if (choice) json_array_append_new(choices, choice);
    json_object_set_new(c, "choices", choices);
    if (!choice || h->g.continuous_usage) json_object_set_new(c, "usage", usage_json(h));
    else if (h->g.include_usage) json_object_set_new(c, "usage", json_null());
    char *s = json_dumps(c, JSON_COMPACT);
    json_decref(c);
    if (!s) return;
    evbuffer_add_printf(h->pending, "data: %s\n\n", s);
    free(s);
}

/* Adds the pending token ids (return_token_ids) to a streamed choice object. */
static void take_ids(hchoice *c, json_t *choice) {
    if (!c->ids_pending) return;
    json_object_set_new(choice, "token_ids", c->ids_pending);
    c->ids_pending = json_array();
}

static void sse_delta(hchoice *c, json_t *delta, json_t *logprobs) {
    json_t *ch = json_pack("{s:i, s:o, s:o, s:n}", "index", c->index, "delta", delta, "logprobs",
                           logprobs ? logprobs : json_null(), "finish_reason");
    take_ids(c, ch);
    sse_chunk(c->h, ch);
}

void sse_flush(hreq *h) {
    if (evbuffer_get_length(h->pending) == 0) return;
    if (h->req && !h->gone && h->sse_open && !h->done) evhttp_send_reply_chunk(h->req, h->pending);
    else if (h->sse_open || h->gone || h->done) evbuffer_drain(h->pending, evbuffer_get_length(h->pending));
}

void sse_start(hchoice *c) {
    if (c->started) return;
    c->started = 1;
    if (c->h->ka) event_del(c->h->ka); /* the first token: no more keep-alive comments */
    if (!c->h->g.chat) return;
    json_t *ch = json_pack("{s:i, s:{s:s, s:s}, s:n, s:n}", "index", c->index, "delta", "role",
                           "assistant", "content", "", "logprobs", "finish_reason");
    if (c->h->g.return_token_ids) {
        json_t *p = json_array();
        const tok_ids_t *pr = &c->h->g.prompts[c->prompt_idx];
        for (size_t i = 0; i < pr->n; i++) json_array_append_new(p, json_integer(pr->v[i]));
        json_object_set_new(ch, "prompt_token_ids", p);
    }
    sse_chunk(c->h, ch);
}

/* A chat logprob entry for released content bytes, attributed to the token being fed (or the
 * last one, for bytes released at the end). */
static json_t *chat_entry(hchoice *c, const char *b, size_t n) {
    const http_server *s = c->h->s;
    json_t *top = json_array();
    for (int k = 0; k < c->last_ntop; k++) {
        char tb[256];
        size_t tn = token_bytes(s, c->last_top[k], tb, sizeof tb);
        json_array_append_new(top, json_pack("{s:o, s:f, s:o}", "token", token_string(tb, tn),
                                             "logprob", (double)c->last_toplp[k], "bytes",
                                             bytes_array(tb, tn)));
    }
    return json_pack("{s:o, s:f, s:o, s:o}", "token", token_string(b, n), "logprob",
                     (double)(c->has_last ? c->last_lp : 0.0f), "bytes", bytes_array(b, n),
                     "top_logprobs", top);
}

void op_emit(void *user, const op_event *ev) {
    hchoice *c = user;
    hreq *h = c->h;
    json_t *d, *lp = NULL;
    switch (ev->kind) {
    case OP_EV_REASONING:
        if (!h->g.include_reasoning || !h->g.stream) return;
        d = json_object();
        if (h->reasoning_field != HTTP_REASONING)
            json_object_set_new(d, "reasoning_content", json_stringn(ev->text, ev->len));
        if (h->reasoning_field != HTTP_REASONING_CONTENT)
            json_object_set_new(d, "reasoning", json_stringn(ev->text, ev->len));
        break;
    case OP_EV_CONTENT:
        if (c->stopf) { /* stop strings (after min_tokens) are matched first */
            chat_stop_add(c, ev->text, ev->len, 0);
            return;
        }
        if (h->g.logprobs) {
            json_t *entry = chat_entry(c, ev->text, ev->len);
            json_array_append(c->lp, entry);
            if (h->g.stream) lp = json_pack("{s:[o]}", "content", entry);
            else json_decref(entry);
        }
        if (!h->g.stream) return;
        d = json_pack("{s:s%}", "content", ev->text, ev->len);
        break;
    case OP_EV_TOOL_START:
        if (!h->g.stream) return;
        if (h->buffered) { /* sent with its arguments (one delta) when the invoke closes */
            snprintf(c->bt_id, sizeof c->bt_id, "%s", ev->id);
            snprintf(c->bt_name, sizeof c->bt_name, "%s", ev->name);
            return;
        }
        d = json_pack("{s:[{s:I, s:s, s:s, s:{s:s, s:s}}]}", "tool_calls", "index",
                      (json_int_t)ev->index, "id", ev->id, "type", "function", "function",
                      "name", ev->name, "arguments", "");
        break;
    default:
        if (!h->g.stream) return;
        if (h->buffered)
            d = json_pack("{s:[{s:I, s:s, s:s, s:{s:s, s:s%}}]}", "tool_calls", "index",
                          (json_int_t)ev->index, "id", c->bt_id, "type", "function", "function",
                          "name", c->bt_name, "arguments", ev->text, ev->len);
        else
            d = json_pack("{s:[{s:I, s:{s:s%}}]}", "tool_calls", "index", (json_int_t)ev->index,
                          "function", "arguments", ev->text, ev->len);
        break;
    }
    if (!d) {
        json_decref(lp);
        return;
    }
    sse_start(c);
    sse_delta(c, d, lp);
}

/* Completions: one token's logprob record, text_offset = where its text starts. */
void cmpl_logprob(hchoice *c, const eng_token *t, int32_t id) {
    const http_server *s = c->h->s;
    char tb[256];
    size_t tn = token_bytes(s, id, tb, sizeof tb);
    json_t *top = json_object();
    for (int k = 0; k < t->n_top && k < ENG_MAX_TOP_LOGPROBS; k++) {
        char ab[256];
        size_t an = token_bytes(s, t->top_ids[k], ab, sizeof ab);
        json_t *key = token_string(ab, an);
        if (!json_object_get(top, json_string_value(key)))
            json_object_set_new(top, json_string_value(key), json_real(t->top_logprobs[k]));
        json_decref(key);
    }
    json_t *targets[2] = {c->lp, c->h->g.stream ? c->lp_pending : NULL};
    for (int i = 0; i < 2; i++) {
        json_t *o = targets[i];
        if (!o) continue;
        json_array_append_new(json_object_get(o, "tokens"), token_string(tb, tn));
        json_array_append_new(json_object_get(o, "token_logprobs"), json_real(t->logprob));
        json_array_append(json_object_get(o, "top_logprobs"), top);
        json_array_append_new(json_object_get(o, "text_offset"),
                              json_integer((json_int_t)c->text.len));
    }
    json_decref(top);
}

static json_t *cmpl_lp_new(void) {
    return json_pack("{s:[], s:[], s:[], s:[]}", "tokens", "token_logprobs", "top_logprobs",
                     "text_offset");
}

static json_t *take_cmpl_lp(hchoice *c) {
    if (!c->h->g.logprobs) return json_null();
    json_t *lp = c->lp_pending;
    c->lp_pending = cmpl_lp_new();
    return lp;
}

/* Appends decoded text to c->text and looks for a stop string (the earliest match wins; the
 * text is cut before it, or after it with include_stop_str_in_output; text added before
 * min_tokens tokens exist is not searched). Returns the end of what is certain: everything
 * but a trailing proper prefix of a stop string, unless at_end. *hit: a stop string matched. */
static size_t stop_scan(hchoice *c, const char *t, size_t n, int at_end, int *hit) {
    hreq *h = c->h;
    if (n) chat_sb_put(&c->text, t, n);
    if (c->n_out < h->g.min_tokens) c->stop_from = c->text.len;
    size_t end = c->text.len;
    *hit = 0;
    size_t from = c->released > c->stop_from ? c->released : c->stop_from;
    if (h->g.n_stop && c->text.len > from) {
        size_t best = SIZE_MAX, maxl = 0;
        for (size_t i = 0; i < h->g.n_stop; i++) {
            size_t sl = strlen(h->g.stop[i]);
            if (sl > maxl) maxl = sl;
            const char *m = memmem(c->text.p + from, c->text.len - from, h->g.stop[i], sl);
            if (m && (size_t)(m - c->text.p) < best) {
                best = (size_t)(m - c->text.p);
                c->stop_idx = (int)i;
            }
        }
        if (c->stop_idx >= 0) {
            *hit = 1;
            end = best + (h->g.include_stop ? strlen(h->g.stop[c->stop_idx]) : 0);
            c->text.len = end;
            c->text.p[end] = 0;
        } else if (!at_end) {
            size_t avail = c->text.len - from;
            size_t k = maxl - 1 < avail ? maxl - 1 : avail;
            for (; k > 0; k--) {
                const char *tail = c->text.p + c->text.len - k;
                size_t i;
                for (i = 0; i < h->g.n_stop; i++)
                    if (strlen(h->g.stop[i]) > k && !memcmp(h->g.stop[i], tail, k)) break;
                if (i < h->g.n_stop) break;
            }
            end = c->text.len - k;
        }
    }
    return end;
}

/* Completions: stop_scan, then streams the released bytes. Returns 1 when a stop string
 * matched. */
int cmpl_add(hchoice *c, const char *t, size_t n, int at_end) {
    hreq *h = c->h;
    if (c->stop_idx >= 0) return 1;
    int hit;
    size_t end = stop_scan(c, t, n, at_end, &hit);
    if (h->g.stream && c->echo && (end > c->released || at_end)) {
        /* echo: the prompt's text is the choice's first text chunk */
        json_t *ch = json_pack("{s:i, s:s%, s:n, s:n}", "index", c->index, "text", c->echo,
                               c->echo_len, "logprobs", "finish_reason");
        sse_chunk(h, ch);
        free(c->echo);
        c->echo = NULL;
    }
    if (end > c->released) {
        if (h->g.stream) {
            json_t *ch = json_pack("{s:i, s:s%, s:o, s:n}", "index", c->index, "text",
                                   c->text.p + c->released, end - c->released, "logprobs",
                                   take_cmpl_lp(c), "finish_reason");
            take_ids(c, ch);
            sse_chunk(h, ch);
        }
        c->released = end;
    }
    return hit;
}

/* Chat content through the stop filter: released bytes become content deltas (and logprob
 * entries); after a match nothing more is content. c->text is the choice's content. */
void chat_stop_add(hchoice *c, const char *t, size_t n, int at_end) {
    hreq *h = c->h;
    if (c->stop_idx >= 0) return;
    int hit;
    size_t end = stop_scan(c, t, n, at_end, &hit);
    if (end <= c->released) return;
    const char *b = c->text.p + c->released;
    size_t len = end - c->released;
    c->released = end;
    json_t *lp = NULL;
    if (h->g.logprobs) {
        json_t *entry = chat_entry(c, b, len);
        json_array_append(c->lp, entry);
        if (h->g.stream) lp = json_pack("{s:[o]}", "content", entry);
        else json_decref(entry);
    }
    if (!h->g.stream) return;
    sse_start(c);
    sse_delta(c, json_pack("{s:s%}", "content", b, len), lp);
}

json_t *stop_reason_json(const hchoice *c) {
    if (c->stop_tok >= 0) return json_integer(c->stop_tok);
    if (c->res && c->res->stop_reason) return json_string(c->res->stop_reason);
    if (c->stop_idx >= 0) return json_string(c->h->g.stop[c->stop_idx]);
    return json_null();
}

const char *choice_finish(const hchoice *c) {
    if (c->res) return c->res->finish_reason;
    return c->finish ? c->finish : "abort";
}

void sse_finish_choice(hchoice *c, const char *finish, json_t *stop_reason) {
    sse_start(c);
    json_t *ch;
    if (c->h->g.chat)
        ch = json_pack("{s:i, s:{}, s:n, s:s, s:o}", "index", c->index, "delta", "logprobs",
                       "finish_reason", finish, "stop_reason", stop_reason);
    else
        ch = json_pack("{s:i, s:s, s:o, s:s, s:o}", "index", c->index, "text", "", "logprobs",
                       take_cmpl_lp(c), "finish_reason", finish, "stop_reason", stop_reason);
    take_ids(c, ch);
    sse_chunk(c->h, ch);
}

void sse_error(hreq *h) {
    apierr e;
    fail(&e, 500, h->code, NULL, "%s", h->msg);
    json_t *ej = err_json(&e);
    char *s = json_dumps(ej, JSON_COMPACT);
    json_decref(ej);
    if (s) evbuffer_add_printf(h->pending, "data: %s\n\n", s);
    free(s);
    evbuffer_add_printf(h->pending, "data: [DONE]\n\n");
}

void sse_end(hreq *h) {
    if (h->g.include_usage) sse_chunk(h, NULL);
    evbuffer_add_printf(h->pending, "data: [DONE]\n\n");
}

static json_t *ids_json(const int32_t *v, size_t n) {
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(a, json_integer(v[i]));
    return a;
}

static json_t *chat_choice(hchoice *c) {
    const op_result *res = c->res;
    json_t *msg = json_pack("{s:s, s:n}", "role", "assistant", "refusal");
    const char *content = c->stopf ? (c->text.p ? c->text.p : "") : res->content;
    size_t content_len = c->stopf ? c->text.len : res->content_len;
    json_object_set_new(msg, "content",
                        content_len == 0 && res->n_calls ? json_null()
                                                         : json_stringn(content, content_len));
    if (c->h->g.thinking && c->h->g.include_reasoning) {
        if (c->h->reasoning_field != HTTP_REASONING)
            json_object_set_new(msg, "reasoning_content",
                                json_stringn(res->reasoning, res->reasoning_len));
        if (c->h->reasoning_field != HTTP_REASONING_CONTENT)
            json_object_set_new(msg, "reasoning",
                                json_stringn(res->reasoning, res->reasoning_len));
    }
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
    json_t *lp = c->h->g.logprobs ? json_pack("{s:O}", "content", c->lp) : json_null();
    return json_pack("{s:i, s:o, s:o, s:s, s:o}", "index", c->index, "message", msg, "logprobs",
                     lp, "finish_reason", choice_finish(c), "stop_reason",
                     stop_reason_json(c));
}

static json_t *cmpl_choice(hchoice *c) {
    chat_sb all = {0}; /* echo: prompt text + generated text */
    if (c->echo) chat_sb_put(&all, c->echo, c->echo_len);
    if (c->text.len) chat_sb_put(&all, c->text.p, c->text.len);
    json_t *text = json_stringn(all.p ? all.p : "", all.len);
    chat_sb_free(&all);
    return json_pack("{s:i, s:o, s:o, s:s, s:o}", "index", c->index, "text", text, "logprobs",
                     c->h->g.logprobs ? json_incref(c->lp) : json_null(), "finish_reason",
                     choice_finish(c), "stop_reason", stop_reason_json(c));
}

/* The non-streaming body: every choice in index order, usage summed. */
void answer_json(hreq *h) {
    json_t *choices = json_array();
    for (int i = 0; i < h->n_choices; i++) {
        hchoice *c = &h->c[i];
        json_t *ch = h->g.chat ? chat_choice(c) : cmpl_choice(c);
        if (h->g.return_token_ids) json_object_set(ch, "token_ids", c->ids_all);
        json_array_append_new(choices, ch);
    }
    if (h->g.effort)
        evhttp_add_header(evhttp_request_get_output_headers(h->req), "X-Duet-Reasoning-Effort",
                          h->g.effort);
    json_t *body = json_pack("{s:s, s:s, s:I, s:s, s:s, s:o, s:o}", "id", h->id, "object",
                             h->g.chat ? "chat.completion" : "text_completion", "created",
                             (json_int_t)h->created, "model", h->model, "system_fingerprint",
                             h->s->fingerprint, "choices", choices, "usage", usage_json(h));
    if (h->g.return_token_ids) {
        if (h->g.n_prompts == 1)
            json_object_set_new(body, "prompt_token_ids",
                                ids_json(h->g.prompts[0].v, h->g.prompts[0].n));
        else {
            json_t *all = json_array();
            for (size_t k = 0; k < h->g.n_prompts; k++)
                json_array_append_new(all, ids_json(h->g.prompts[k].v, h->g.prompts[k].n));
            json_object_set_new(body, "prompt_token_ids", all);
        }
    }
    send_json(h->s, h->req, 200, body, h->rid);
}

void hresp_init_choice(hchoice *c) {
    hreq *h = c->h;
    if (h->g.logprobs) {
        c->lp = h->g.chat ? json_array() : cmpl_lp_new();
        c->lp_pending = h->g.chat ? NULL : cmpl_lp_new();
    }
    if (h->g.return_token_ids) {
        c->ids_all = json_array();
        c->ids_pending = h->g.stream ? json_array() : NULL;
    }
}
