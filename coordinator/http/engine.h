/* engine.h — the narrow interface between the HTTP front (http.c) and the coordinator's
 * generation engine (coord_main.c).
 *
 * Why: the HTTP layer must not know how steps are batched, how workers fail or recover, or how
 * the admin socket works; the engine must not know about HTTP, JSON bodies or SSE. This header
 * is the only thing they share: a request is token ids + sampling parameters in, one callback
 * per generated token and exactly one end callback out. The scheduler that replaces the simple
 * step loop later keeps this interface.
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

typedef struct {
    /* one generated token; return 1 to end the sequence now with finish "stop" (EOS, stop
     * string), 0 to go on */
    int (*on_token)(void *user, int32_t id);
    /* the end: finish is "stop", "length" or "abort"; or finish NULL and code (worker_failure,
     * no_workers, internal) + msg (a sentence) for a failure after admission */
    void (*on_end)(void *user, const char *finish, const char *code, const char *msg);
    /* 0 once the client has gone away */
    int (*connected)(void *user);
    void *user;
} eng_sink;

typedef struct {
    const int32_t *prompt; /* [n_prompt] ids, each < the model's vocabulary (checked by caller) */
    int n_prompt;
    int max_tokens;        /* >= 1; n_prompt + max_tokens <= max_model_len (caller clamps) */
    float temperature;     /* 0 = greedy */
    float top_p;           /* (0, 1] */
    int top_k;             /* 0 = off */
    uint64_t seed;
    const char *request_id; /* the HTTP request id (<rid>), for status and abort; copied */
} eng_params;

typedef struct {
    void *ctx;
    /* Admits a request. Returns 0, or -1 with *code (server_draining, server_overloaded,
     * no_workers) and a sentence in msg when admission is refused. */
    int (*submit)(void *ctx, const eng_params *p, const eng_sink *sink, const char **code,
                  char *msg, size_t msglen);
    /* "starting", "serving", "draining", "drained" or "degraded" */
    const char *(*state)(void *ctx);
    /* 1 when the worker group is up (every worker connected and loaded) */
    int (*workers_up)(void *ctx);
} eng_api;

#endif
