/* http.h — the coordinator's OpenAI-compatible HTTP API (spec/server-api.md), on evhttp.
 *
 * Why: clients (OpenAI SDKs, curl, benchmarks) talk HTTP/SSE; the engine talks token ids. This
 * module is the translation: it validates requests (§2, §3.1, §5, §9), renders chat prompts
 * (coordinator/chat/encoder.h), tokenizes, submits to the engine (engine.h), turns generated ids
 * back into text (tokenizer stream) and chat deltas (coordinator/chat/outparse.h), and answers
 * as JSON or SSE. It runs on the coordinator's event loop and must never crash, block, or answer
 * a client mistake with a 5xx.
 *
 * Endpoints: GET /health, /health/ready, /health/generate, /metrics, /version,
 * /v1/models[/{id}]; POST /tokenize, /detokenize (and /v1/...), /v1/chat/completions and
 * /v1/completions (JSON and SSE). docs/openapi.yaml describes them.
 */
#ifndef DUET_HTTP_H
#define DUET_HTTP_H

#include <stddef.h>

#include <event2/event.h>

#include "coordinator/http/engine.h"
#include "coordinator/metrics.h"

typedef struct http_server http_server;

typedef struct {
    const char *listen;         /* "HOST:PORT" (port 0 = any; the bound port is logged) */
    const char *tokenizer_path; /* tokenizer.json */
    const char *api_key_file;   /* NULL = no key file; else one key per line ('#' lines skipped) */
    const char *const *api_keys; /* [n_api_keys] more keys (config api_keys; copied) */
    size_t n_api_keys;
    size_t max_body_bytes;      /* larger request bodies get 413 */
    int max_model_len;          /* context limit (prompt + generated) */
    int vocab_size;             /* the model's vocabulary: prompt ids must be below it */
    int fold_prompt_ids;        /* testing with a small-vocabulary model: prompt ids >= vocab_size
                                   become id % vocab_size instead of a 400 */
    const char *model_id;       /* the served model id */
    const char *version, *commit;
    /* optional (zero = default) */
    metrics *metrics;           /* the coordinator's registry (borrowed); NULL: http keeps its own
                                   (then /metrics shows only what http records + the gauges it
                                   sets from eng_api.health at each scrape) */
    int metrics_vllm_names;     /* own registry only: also "vllm:" names */
    int metrics_require_auth;   /* GET /metrics behind the API key */
    double stall_timeout_s;     /* readiness "progress" check; 0 = 30 */
    double health_generate_timeout_s; /* GET /health/generate; 0 = 20 */
    /* request policy (server-api §11; all reloadable through http_reconfigure) */
    double sse_keepalive_s;     /* ": keep-alive" comment period before the first token; 0 off */
    int strict_request_fields;  /* unknown top-level request fields → 400 */
    const char *const *cors_origins; /* [n_cors_origins] allowed Origins ("*" = any); 0 = CORS off */
    size_t n_cors_origins;
    int tool_stream_buffered;   /* tool_stream=buffered: each call sent whole when it closes */
    int reasoning_field;        /* HTTP_REASONING_* */
    long long default_max_tokens_chat, default_max_tokens_cmpl; /* 0 = 16384 / 16 */
    int max_n;                  /* n at most; 0 = 8 */
    double default_temperature, default_top_p, default_min_p; /* < 0 = 1.0 / 1.0 / 0.0 */
    int default_thinking;       /* 1 on (the spec's default), 0 off; -1 = on */
    long long default_thinking_budget; /* -1 none (0 would be "no reasoning at all") */
    const char *const *model_aliases; /* [n_model_aliases]; NULL with 0 = {"deepseek-v4-flash"} */
    size_t n_model_aliases;
    int no_model_aliases;       /* 1: model_aliases is really empty (not the default) */
    int accept_any_model;       /* any "model" value is served (echoed back as sent) */
} http_cfg;

enum { HTTP_REASONING_CONTENT = 0, HTTP_REASONING = 1, HTTP_REASONING_BOTH = 2 };

/* Sets every field to its default (zero/NULL, and the -1 markers above). */
void http_cfg_init(http_cfg *cfg);

/* Loads the tokenizer and the API keys, binds and listens. Refuses a non-loopback address
 * without an API key file. Logs "http listening on HOST:PORT". On failure err says why. */
int http_open(struct event_base *base, const http_cfg *cfg, const eng_api *api,
              http_server **out, char *err, size_t errlen);
/* Applies the reloadable part of cfg to a running server (server-api §12 reload): API keys
 * (the key file is re-read), max_body_bytes, metrics_require_auth, the timeouts and the request
 * policy. listen, tokenizer_path, vocab, model_id and max_model_len are ignored (restart-only).
 * All or nothing: on failure (the key file cannot be read or holds no key) nothing changes and
 * err says why. *keys_changed tells whether the set of accepted keys differs. Requests already
 * admitted keep the settings they were parsed with. */
int http_reconfigure(http_server *s, const http_cfg *cfg, int *keys_changed, char *err,
                     size_t errlen);
/* Closes the listener and every connection; NULL is fine. Call after every engine request has
 * ended (the engine answers pending ones at shutdown). */
void http_free(http_server *s);

#endif
