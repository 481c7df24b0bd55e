/* engine.h — the narrow interface between the HTTP front (coordinator/http) and the
 * coordinator's generation engine (scheduler, KV manager, worker pool).
 *
 * Why: the HTTP layer must not know how steps are batched, how KV blocks are cached, how workers
 * fail or recover, or how the admin socket works; the engine must not know about HTTP, JSON
 * bodies, tokenizers or SSE. This header is the only thing they share: a request is token ids +
 * sampling parameters in, one callback per generated token and exactly one end callback out.
 * One engine request is one sequence (one choice); a request with n > 1 choices is n submits
 * with the same prompt and choice = 0..n-1 (they share the prompt's KV through the prefix cache).
 *
 * Lifetime rules: after eng_api.submit succeeds the engine calls sink.on_token zero or more times
 * and then sink.on_end exactly once (also at shutdown); after on_end it never touches the sink
 * again. sink.connected is polled at every step boundary; returning 0 cancels the request (it
 * then ends with finish "abort"). All callbacks run on the coordinator's event loop.
 */
#ifndef DUET_HTTP_ENGINE_H
#define DUET_HTTP_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#define ENG_MAX_TOP_LOGPROBS 20

/* One generated token. */
typedef struct {
    int32_t id;
    int forced;              /* 1: came from eng_constraint.forced (not sampled; no logprobs) */
    float logprob;           /* log-softmax of the raw logits at id (when n_logprobs >= 0) */
    int n_top;               /* alternatives below (0 unless requested) */
    const int32_t *top_ids;  /* [n_top], most likely first */
    const float *top_logprobs;
    int cached_tokens;       /* prompt tokens this sequence took from the prefix cache */
} eng_token;

/* What the sink wants for the next token of its sequence; asked before every step that will
 * sample it (after the prompt, and after every token). All arrays stay owned by the sink and
 * must stay valid until the next call to constrain or on_end. */
typedef struct {
    const int32_t *forced;   /* [n_forced]: these tokens come next, without sampling; the engine
                                passes each to on_token (forced = 1) as a generated token, then
                                asks again. They count against max_tokens. */
    int n_forced;
    const int32_t *allowed;  /* [n_allowed]: when n_allowed > 0, only these may be drawn */
    int n_allowed;
    const int32_t *banned;   /* [n_banned]: never drawn (min_tokens, tool_choice none) */
    int n_banned;
} eng_constraint;

typedef struct {
    /* one generated token; return 1 to end the sequence now with finish "stop" (EOS, stop
     * string, stop token), 0 to go on */
    int (*on_token)(void *user, const eng_token *t);
    /* optional (NULL = never constrained); fills *c (zeroed by the engine before the call) */
    void (*constrain)(void *user, eng_constraint *c);
    /* the end: finish is "stop", "length" or "abort"; or finish NULL and code (worker_failure,
     * no_workers, internal) + msg (a sentence) for a failure after admission */
    void (*on_end)(void *user, const char *finish, const char *code, const char *msg);
    /* 0 once the client has gone away */
    int (*connected)(void *user);
    void *user;
} eng_sink;

typedef struct {
    const int32_t *prompt; /* [n_prompt] ids, each < the model's vocabulary (checked by caller);
                              copied */
    int n_prompt;
    int max_tokens;        /* >= 1; n_prompt + max_tokens <= max_model_len (caller clamps) */
    float temperature;     /* 0 = greedy (ties → lowest id) */
    float top_p;           /* (0, 1]; 1 = off */
    int top_k;             /* 0 = off */
    float min_p;           /* [0, 1]; 0 = off */
    float repetition_penalty;               /* (0, 2]; 1 = off; prompt + generated */
    float presence_penalty, frequency_penalty; /* [-2, 2]; 0 = off; generated only */
    const int32_t *bias_ids; /* [n_bias] logit_bias; copied */
    const float *bias_values;
    int n_bias;
    uint64_t seed;
    uint32_t choice;       /* choice index: the RNG stream (seed, choice, position) */
    int n_logprobs;        /* -1: no logprobs; 0..20: the chosen token's logprob and this many
                              alternatives in every eng_token */
    int priority;          /* lower runs first; ties FIFO (health probes use INT32_MIN) */
    const char *request_id; /* the HTTP request id (<rid>), for status and abort; copied */
} eng_params;

/* Sets every field of p to its default (greedy off: temperature 1, top_p 1, penalties off,
 * n_logprobs -1, priority 0). */
static inline void eng_params_init(eng_params *p) {
    *p = (eng_params){0};
    p->temperature = 1.0f;
    p->top_p = 1.0f;
    p->repetition_penalty = 1.0f;
    p->n_logprobs = -1;
}

/* What readiness (/health/ready, server-api §8) needs from the engine. */
typedef struct {
    const char *state;      /* "starting", "serving", "draining", "drained" or "degraded" */
    int workers_up;         /* every worker connected, loaded and heartbeating (< 5 s) */
    int warm;               /* the canary after the last (re)connect completed */
    int running, waiting;
    double last_step_age_s; /* since the last completed step; -1 = never */
    double last_success_age_s; /* since a request last completed; -1 = never */
    double last_failure_age_s; /* since a request last failed with worker_failure,
                                  internal or no_workers; -1 = never */
} eng_health;

typedef struct {
    void *ctx;
    /* Admits a request. Returns 0, or -1 with *code (server_draining, server_overloaded,
     * no_workers) and a sentence in msg when admission is refused. */
    int (*submit)(void *ctx, const eng_params *p, const eng_sink *sink, const char **code,
                  char *msg, size_t msglen);
    /* state, workers, warmup, queue and progress: everything readiness and the gauges need */
    void (*health)(void *ctx, eng_health *out);
} eng_api;

#endif
