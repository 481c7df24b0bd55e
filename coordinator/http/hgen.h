/* hgen.h — one generation request while it runs: shared by the engine bridge (hgen.c) and the
 * answer writer (hresp.c).
 *
 * Why: a request with n choices (or several completion prompts) is several engine sequences
 * that end at different times but answer as one HTTP response; hgen.c drives the sequences
 * (sinks, constraints, lifetime) and hresp.c turns what they produced into JSON or SSE. Both
 * need the same per-request (hreq) and per-choice (hchoice) state, and only they do.
 */
#ifndef DUET_HTTP_HGEN_H
#define DUET_HTTP_HGEN_H

#include <event2/buffer.h>

#include "coordinator/http/hint.h"

typedef struct { /* a forced-token path for tool_choice required/named (one per tool name) */
    tok_ids_t ids;
    int noargs; /* the path closes the invoke itself ({} arguments) */
    int closes; /* the path closes the tool block: only EOS may follow */
} tpath;

typedef struct hreq hreq;

typedef struct hchoice {
    hreq *h;
    int index, prompt_idx;
    int submitted, ended;
    const char *finish; /* the engine's finish; NULL after a failure */
    int n_out, reasoning_tokens, in_reasoning, cached;
    int started; /* SSE: the role chunk was sent (chat) */
    tok_stream_t *ts;
    op_parser *op;
    const op_result *res;
    /* completions text and stop strings */
    chat_sb text;
    size_t released, stop_from;
    char *echo;        /* completions with echo: the prompt's text (sent before any generated
                          text; NULL once sent when streaming, or without echo) */
    size_t echo_len;
    int stop_idx;      /* the matched stop string, or -1 */
    int32_t stop_tok;  /* the matched stop token id, or -1 */
    /* logprobs: chat = array of content entries; completions = {tokens, token_logprobs, ...} */
    json_t *lp, *lp_pending;
    json_t *ids_all, *ids_pending; /* return_token_ids */
    /* the token being processed, and the last one (logprob attribution of released text) */
    int has_cur, has_last;
    int32_t last_id;
    float last_lp;
    int last_ntop;
    int32_t last_top[ENG_MAX_TOP_LOGPROBS];
    float last_toplp[ENG_MAX_TOP_LOGPROBS];
    /* constraints (eng_sink.constrain) */
    tok_ids_t fq;              /* forced ids queued (real ids) */
    tok_ids_t given, expect;   /* handed to the engine (folded) / expected back (real) */
    size_t expect_pos;
    tok_ids_t allowed, allowed_real;
    int32_t banned[MAX_STOP_IDS + 2];
    int n_banned;
    int tphase; /* tool forcing: 0 not started, 1 choosing the path, 2 in a call (free
                   arguments), 3 after a call, 4 block closed (EOS forced) */
    size_t tpos;
    unsigned char *alive; /* [n_paths] */
    int tsel;             /* the chosen path */
    char tail[96];        /* the last decoded bytes (closing tags are looked for here) */
    size_t tail_len;
    int budget_done;
    int stopf;     /* chat with min_tokens and stop strings: stop strings are matched here on
                      the content the parser releases (text/released/stop_from/stop_idx), not by
                      the parser, so that content of the first min_tokens tokens is skipped */
    char bt_id[64], bt_name[80]; /* tool_stream=buffered: the header of the call being sent */
} hchoice;

struct hreq {
    http_server *s;
    struct evhttp_request *req; /* NULL once evhttp freed it (its connection died) */
    greq g;
    char rid[65], id[80];
    char *model;
    long long created;
    double t0;
    hchoice *c;
    int n_choices, n_submitted, n_ended;
    int sse_open;  /* the SSE headers were sent */
    int in_submit; /* inside the submit loop: endings are answered afterwards */
    int gone;      /* the client went away */
    int refused;   /* a later choice was refused admission: 503 once all ended */
    int failed;    /* a choice failed after admission */
    int done;      /* the answer is complete (stream ended or body sent) */
    int status;    /* refused/failed: the error to answer */
    char code[40], msg[600];
    struct evbuffer *pending; /* SSE bytes for the next flush */
    struct event *ka;         /* SSE keep-alive timer while no token has been sent */
    int buffered, reasoning_field; /* policy at admission (a reload does not change them) */
    tpath *paths;
    size_t n_paths;
    tok_ids_t close_ids; /* "\n</｜DSML｜tool_calls>" */
};

/* hresp.c */
void op_emit(void *user, const op_event *ev);
int cmpl_add(hchoice *c, const char *t, size_t n, int at_end);
/* Chat stop filter (hchoice.stopf): content released by the parser; at_end flushes. */
void chat_stop_add(hchoice *c, const char *t, size_t n, int at_end);
void cmpl_logprob(hchoice *c, const eng_token *t, int32_t id);
void sse_start(hchoice *c);
void sse_flush(hreq *h);
void sse_finish_choice(hchoice *c, const char *finish, json_t *stop_reason);
void sse_error(hreq *h);
void sse_end(hreq *h);
void answer_json(hreq *h);
json_t *stop_reason_json(const hchoice *c);
void hresp_init_choice(hchoice *c);
const char *choice_finish(const hchoice *c);

#endif
