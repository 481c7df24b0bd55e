/* pool.h — the coordinator's connections to its workers (the "worker pool").
 *
 * Why: the coordinator decides and the workers execute; everything between the two goes
 * through here, on the coordinator's libevent loop. The pool connects to every worker with
 * retry and backoff, authenticates (HMAC challenge, common/rpc.h), checks that every worker
 * reports the same model fingerprint and the rank/world it was given, sends LoadModel and
 * follows its progress, sends heartbeats, and dispatches steps: one StepPlan to every worker,
 * one StepResult back from each, the step failing with a sentence naming the worker when any
 * of them errors, disconnects or exceeds the step timeout.
 *
 * The workers of one group run collectives among themselves, so they live and die together:
 * when any worker fails after the group was formed, every worker connection is closed and the
 * whole group is re-formed (reconnect with backoff, new handshake, LoadModel to all) as soon
 * as every worker answers again. The pool never blocks the loop, never decides what to run
 * (that is the caller's business) and never exits the process: fatal start-up problems are
 * reported through the event callback.
 */
#ifndef DUET_COORD_POOL_H
#define DUET_COORD_POOL_H

#include <stddef.h>
#include <stdint.h>

#include <event2/event.h>
#include <jansson.h>

#include "coordinator/metrics.h"
#include "proto/duet.pb-c.h"

typedef struct pool pool;

typedef struct {
    const char *const *addrs;  /* [n_workers] "host:port", rank i = addrs[i] */
    int n_workers;
    const char *token;         /* shared auth token (rpc_read_token_file) */
    uint64_t fingerprint;      /* expected model fingerprint; 0 = learn it from the workers */
    double connect_timeout_s;  /* start-up: every worker must answer within this (0 = forever) */
    double heartbeat_s;        /* interval between heartbeats (1) */
    double heartbeat_timeout_s;/* an idle worker silent this long is down (5) */
    double step_timeout_s;     /* a step not answered by every worker in this time fails (120) */
    double load_timeout_s;     /* LoadModel not done in this time fails the worker (600) */
    uint32_t max_seqs;         /* LoadModel.max_seqs */
    uint32_t max_seq_len;      /* LoadModel.max_seq_len */
    uint32_t block_size;       /* LoadModel.block_size (tokens per KV block; 0 = 256) */
    metrics *metrics;          /* NULL = none; the pool records worker_up, worker_step_seconds */
} pool_cfg;

/* Group state. */
typedef enum {
    POOL_STARTING,  /* never been ready: connecting / handshaking / loading for the first time */
    POOL_READY,     /* every worker handshaken and loaded; steps may run */
    POOL_DEGRADED,  /* was ready; a worker failed; re-forming the group */
    POOL_FAILED     /* start-up failed for good (deadline, auth, fingerprint); see the event */
} pool_state;

typedef enum {
    POOL_EV_READY,   /* the group is (again) ready */
    POOL_EV_DOWN,    /* the group lost a worker; msg says which and why */
    POOL_EV_FATAL    /* start-up cannot succeed (msg says why); the caller should exit */
} pool_event;

typedef void (*pool_event_cb)(void *arg, pool_event ev, const char *msg);

/* Result of one step. ok == 0: msg holds the reason (naming the worker), res is NULL.
 * ok == 1: res is rank 0's StepResult (tokens, logits), valid only during the callback. */
typedef void (*pool_step_cb)(void *arg, int ok, const Duet__StepResult *res, const char *msg);

/* Creates the pool on base and starts connecting at once. cfg strings are copied. */
int pool_new(struct event_base *base, const pool_cfg *cfg, pool_event_cb cb, void *cb_arg,
             pool **out, char *err, size_t errlen);
/* Closes every connection (in-flight step callbacks are not called) and frees the pool. */
void pool_free(pool *p);

pool_state pool_get_state(const pool *p);
const char *pool_state_name(pool_state s);
/* 1 when a step may be started now (ready and no step in flight). */
int pool_can_step(const pool *p);

/* Sends plan (its step_id is overwritten with the pool's counter) to every worker. cb is called
 * exactly once, later, from the loop, unless this returns an error (then never). */
int pool_step(pool *p, Duet__StepPlan *plan, pool_step_cb cb, void *arg, char *err,
              size_t errlen);
/* Frees sequence state on every connected, loaded worker (best effort, no reply). */
void pool_release(pool *p, const uint64_t *seq_ids, size_t n);

/* Frees cached prefix blocks on every connected, loaded worker (admin flush-prefix-cache). */
void pool_release_blocks(pool *p, const uint64_t *block_ids, size_t n);
/* The group's KV budget from the last LoadModel (valid while READY): blocks = the minimum
 * kv_blocks_total over ranks, snap_cost = the maximum snapshot_block_cost, block_bytes = the
 * maximum kv_block_bytes. 0 blocks = a worker reported none (no accounting, no prefix cache). */
void pool_kv_budget(const pool *p, uint32_t *blocks, uint32_t *snap_cost, uint64_t *block_bytes);

/* Retries every down worker now instead of waiting for its backoff (admin `reload`). */
void pool_kick(pool *p);

/* Loading progress over all workers: bytes done and total (0/0 before the first report). */
void pool_load_progress(const pool *p, uint64_t *done, uint64_t *total);
/* Fingerprint the workers agreed on (0 before the first handshake). */
uint64_t pool_fingerprint(const pool *p);

/* JSON array of per-worker objects for `status`:
 * {"name","addr","rank","state","last_heartbeat_ms","rank_weight_bytes","steps_done",
 *  "step_ms_p50" (over the last 64 steps; null before the first), "backend","load_percent"
 *  (while loading), "kv_blocks_used" (last heartbeat), "kv_blocks_total" (LoadProgress),
 *  "error"}. The caller owns the reference. */
json_t *pool_workers_json(const pool *p);

#endif
