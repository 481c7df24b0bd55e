/* hint.h — what the files of coordinator/http share, and nothing else includes.
 *
 * Why: http.c was split along its seams (server + routing + auth in http.c; error replies and
 * small helpers in herr.c; request parsing and validation in hparse.c; the engine bridge —
 * sinks, constraints, n choices — in hgen.c; JSON and SSE answers in hresp.c; tokenize, models,
 * health and metrics endpoints in hops.c). They all need the server state and a few types; this
 * header holds exactly those, so the public http.h stays narrow.
 */
#ifndef DUET_HTTP_HINT_H
#define DUET_HTTP_HINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/event.h>
#include <event2/http.h>
#include <jansson.h>

#include "coordinator/chat/outparse.h"
#include "coordinator/chat/sbuf.h"
#include "coordinator/http/engine.h"
#include "coordinator/http/http.h"
#include "coordinator/metrics.h"
#include "coordinator/tokenizer/tokenizer.h"

#define EOS_ID 1
#define MAX_STOP 16
#define MAX_N 8
#define MAX_CHOICES 64 /* prompts x n per request */
#define MAX_BIAS 1024
#define MAX_STOP_IDS 256
#define DEFAULT_CHAT_MAX_TOKENS 16384 /* the defaults of the policy fields in http_server */
#define DEFAULT_CMPL_MAX_TOKENS 16

typedef struct probe probe;

struct http_server {
    struct event_base *base;
    struct evhttp *http;
    eng_api api;
    tok_t *tok;
    char **keys;
    size_t n_keys;
    size_t max_body;
    int max_model_len, vocab;
    int fold_ids; /* testing: ids >= vocab become id % vocab (prompts and forced tokens) */
    char *model_id, *version, *commit;
    char fingerprint[64];
    long long created;
    int32_t think_open, think_close, dsml, bos;
    metrics *m;
    int own_metrics;
    int metrics_require_auth;
    double stall_timeout_s, health_generate_timeout_s;
    probe *probe;          /* the /health/generate probe in flight, or NULL */
    char **seen_unknown;   /* unknown request field names already logged (at most 256) */
    size_t n_seen_unknown;
    /* request policy (http_cfg; replaced by http_reconfigure) */
    double sse_keepalive_s;
    int strict_fields, tool_stream_buffered, reasoning_field, max_n, def_thinking;
    long long def_max_chat, def_max_cmpl, def_budget;
    double def_temperature, def_top_p, def_min_p;
    char **aliases, **cors;
    size_t n_aliases, n_cors;
    int accept_any_model;
};

/* ---- errors and replies (herr.c) ---------------------------------------------------------- */

typedef struct { /* a client error about to be answered */
    int status;
    const char *type, *code;
    char param[128]; /* "" = null */
    char msg[600];
} apierr;

int fail(apierr *e, int status, const char *code, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
json_t *err_json(const apierr *e);
void send_json(http_server *s, struct evhttp_request *req, int status, json_t *body,
               const char *rid);
void send_err(http_server *s, struct evhttp_request *req, const apierr *e, const char *rid);
void note_http(http_server *s, struct evhttp_request *req, int status);
void random_hex(char *out, size_t nbytes);
void request_id(struct evhttp_request *req, char out[65]);
void utf8_clean(char *s);
/* The token's exact bytes (byte-level BPE decoded, or an added token's spelling) into out
 * (at most cap); returns the length. */
size_t token_bytes(const http_server *s, int32_t id, char *out, size_t cap);
/* The logprob "token" string of those bytes: the text when valid UTF-8, else "bytes:\xNN...". */
json_t *token_string(const char *b, size_t n);
json_t *bytes_array(const char *b, size_t n);
/* The route template of a path ("/v1/models/{id}", ...), for metric labels. */
const char *handler_label(const char *path);

/* ---- request parsing (hparse.c) ------------------------------------------------------------ */

json_t *field(json_t *o, const char *k);
int get_int(apierr *e, json_t *o, const char *k, long long lo, long long hi, long long *out);
int get_num(apierr *e, json_t *o, const char *k, double lo, double hi, int lo_open, double *out);
int get_bool(apierr *e, json_t *o, const char *k, bool *out);
int get_str(apierr *e, json_t *o, const char *k, const char **out);
int check_model(const http_server *s, apierr *e, json_t *body, const char **model);
int is_model(const http_server *s, const char *m);

typedef enum { TC_NONE = 0, TC_AUTO, TC_REQUIRED, TC_NAMED } tchoice;

/* Everything validated from a chat or completions body. */
typedef struct {
    int chat;
    const char *model;
    eng_params p; /* sampling fields; prompt/max_tokens/choice set per choice */
    int32_t *bias_ids;
    float *bias_vals;
    long long max_tokens;
    int n;
    bool stream, include_usage, continuous_usage, ignore_eos, skip_special, include_stop;
    bool return_token_ids, include_reasoning, parallel_tool_calls, thinking, logprobs;
    bool echo; /* completions: the prompt's text comes first in each choice's text */
    int n_logprobs; /* -1 none */
    long long min_tokens;
    char *stop[MAX_STOP];
    size_t n_stop;
    int32_t *stop_ids;
    size_t n_stop_ids;
    /* chat */
    const char *effort;
    tchoice tool_choice;
    char *named; /* TC_NAMED */
    char **tool_names;
    bool *tool_noargs; /* strict tool without parameters: arguments are forced to {} */
    size_t n_tools;
    long long budget; /* thinking token budget, -1 none */
    /* prompts: chat has one; completions up to 64 */
    tok_ids_t *prompts;
    size_t n_prompts;
    char **echo_text; /* echo: [n_prompts] each prompt's text (before test-id folding) */
    size_t *echo_len;
} greq;

void greq_free(greq *g);
/* Parses and validates; fills g. 0 or -1 with e set. */
int parse_generation(http_server *s, apierr *e, json_t *b, int chat, greq *g);
/* Chat messages → prompt ids (chat completions and chat-form tokenize). */
int render_chat(http_server *s, apierr *e, json_t *b, tok_ids_t *ids, bool *thinking_out,
                int *n_tools_out, const char **effort_out);

/* ---- generation (hgen.c) ------------------------------------------------------------------- */

void generate(http_server *s, struct evhttp_request *req, const char *rid, greq *g);

/* ---- other endpoints (hops.c) -------------------------------------------------------------- */

void handle_tokenize(http_server *s, struct evhttp_request *req, const char *rid, json_t *b);
void handle_detokenize(http_server *s, struct evhttp_request *req, const char *rid, json_t *b);
void handle_models(http_server *s, struct evhttp_request *req, const char *rid, const char *id);
void handle_version(http_server *s, struct evhttp_request *req, const char *rid);
void handle_ready(http_server *s, struct evhttp_request *req, const char *rid);
void handle_generate_probe(http_server *s, struct evhttp_request *req, const char *rid);
void handle_metrics(http_server *s, struct evhttp_request *req, const char *rid);
void probe_free(http_server *s);

#endif
