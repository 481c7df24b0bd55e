/* sched.h — the coordinator's generation engine: waiting queue, step scheduler, KV manager and
 * prefix cache use, canary, drain, engine metrics (docs/design/kv-and-scheduling.md).
 *
 * Why: every request, from the HTTP front (coordinator/http/engine.h) or the admin socket's
 * `generate`, becomes one sequence here; this module alone decides which sequences run in which
 * step, what each worker holds (through coordinator/engine/kvm.h) and when a request ends. It talks to
 * the workers only through coordinator/pool.h and never knows about HTTP, JSON bodies or the
 * admin protocol (status pieces are returned as JSON objects for the caller to place).
 *
 * Step policy (decode-delay bound): each step first gives every running decode its next token
 * (plus any forced tokens), then fills the rest of --max-num-batched-tokens with prefill chunks
 * (running prefills first, then new admissions by (priority, arrival)). A long prompt is cut
 * into chunks, so a running decode waits at most ONE step between two of its tokens, and that
 * step carries at most max(--max-num-batched-tokens, number of running decodes) tokens.
 */
#ifndef DUET_COORD_ENGINE_SCHED_H
#define DUET_COORD_ENGINE_SCHED_H

#include <stddef.h>
#include <stdint.h>

#include <event2/event.h>
#include <jansson.h>

#include "coordinator/http/engine.h"
#include "coordinator/metrics.h"
#include "coordinator/pool.h"

typedef struct sched sched;

typedef struct {
    int max_num_seqs;          /* running sequences at most (--max-num-seqs) */
    int max_waiting;           /* queued requests at most; more → server_overloaded */
    int max_batched_tokens;    /* tokens per step (--max-num-batched-tokens) */
    uint32_t block_size;       /* B (--block-size) */
    int max_seq_len;           /* prompt + generated at most */
    double recover_timeout_s;  /* a queued request waits this long for workers, then no_workers */
    double stall_timeout_s;    /* not used for decisions; reported by health (30) */
    /* called (once per transition) when draining and nothing is in flight any more */
    void (*drained)(void *arg);
    void *drained_arg;
} sched_cfg;

/* Optional per-token extra for the admin `generate` command: the logits row the token was
 * sampled from ([vocab] floats, valid during the call). */
typedef void (*sched_logits_fn)(void *user, const float *row, size_t vocab);

/* Reload (server-api §12): the limits that can change while serving. max_waiting applies to
 * the next admission (requests already queued stay), max_batched_tokens to the next step,
 * recover_timeout_s to requests queued from now on; running requests are not touched. */
void sched_reconfigure(sched *s, int max_waiting, int max_batched_tokens,
                       double recover_timeout_s, double stall_timeout_s);

/* m may be NULL (no metrics). p must outlive the scheduler. */
sched *sched_new(pool *p, metrics *m, const sched_cfg *cfg);
/* Ends every request (on_end with code internal, "the coordinator is shutting down"). */
void sched_free(sched *s);

/* The engine interface for the HTTP front; ctx = s. */
eng_api sched_api(sched *s);
/* eng_api.submit plus logits: logits != NULL asks the workers for logits and hands the row of
 * every sampled token to it before on_token. */
int sched_submit(sched *s, const eng_params *p, const eng_sink *sink, sched_logits_fn logits,
                 const char **code, char *msg, size_t msglen);

/* Events from the pool (pool_event_cb): READY resets the KV manager to the group's budget and
 * runs the canary; DOWN requeues sequences the failed step did not hold. */
void sched_pool_event(sched *s, pool_event ev);
/* Periodic (the coordinator's tick): queued requests' recover deadline, drain deadline,
 * disconnected clients, gauges. */
void sched_tick(sched *s);

/* Drain: on = 1 stops admission (submit → server_draining); timeout_s > 0 aborts whatever is
 * still in flight after it. on = 0 resumes. */
void sched_set_draining(sched *s, int on, double timeout_s);
int sched_draining(const sched *s);
int sched_in_flight(const sched *s);   /* running + waiting (the canary excluded) */
/* Aborts every request at the next step boundary (finish "abort"). */
void sched_abort_all(sched *s);
/* Aborts the request whose id matches (<rid>, chatcmpl-<rid>, cmpl-<rid>); -1 = none. */
int sched_abort(sched *s, const char *request_id);
/* Drops every prefix-cache entry no step in flight restores; tokens and worker bytes freed. */
void sched_flush_prefix_cache(sched *s, uint64_t *freed_tokens, uint64_t *freed_bytes);
/* A request refused before reaching the engine (admin bad_request) counts as rejected. */
void sched_note_rejected(sched *s);
const char *sched_state(sched *s);

/* Adds the engine's status fields to obj (server-api §12): queue, kv, prefix_cache, counters,
 * last_step_age_ms, last_step_ms, warm, step_overhead, and with verbose the request list. */
void sched_status(sched *s, json_t *obj, int verbose);

#endif
