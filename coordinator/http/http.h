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
    const char *api_key_file;   /* NULL = no key; else one key per line ('#' lines skipped) */
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
                                   reads from eng_api.health) */
    int metrics_vllm_names;     /* own registry only: also "vllm:" names */
    int metrics_require_auth;   /* GET /metrics behind the API key */
    double stall_timeout_s;     /* readiness "progress" check; 0 = 30 */
    double health_generate_timeout_s; /* GET /health/generate; 0 = 20 */
} http_cfg;

/* Loads the tokenizer and the API keys, binds and listens. Refuses a non-loopback address
 * without an API key file. Logs "http listening on HOST:PORT". On failure err says why. */
int http_open(struct event_base *base, const http_cfg *cfg, const eng_api *api,
              http_server **out, char *err, size_t errlen);
/* Closes the listener and every connection; NULL is fine. Call after every engine request has
 * ended (the engine answers pending ones at shutdown). */
void http_free(http_server *s);

#endif
