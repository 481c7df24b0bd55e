/* rpcsrv.h — the worker's RPC server: one libuv loop that accepts one authenticated
 * coordinator and executes its LoadModel / StepPlan / Release / Heartbeat / Shutdown messages.
 *
 * Why: duet-worker is headless; everything it does is driven through this server. The loop
 * thread only parses, authenticates and answers; model loading and forward passes run on a
 * libuv work thread, one job at a time in arrival order, so heartbeats are answered while a
 * step computes. This header must never expose libuv or protobuf types to its callers.
 */
#ifndef DUET_RPCSRV_H
#define DUET_RPCSRV_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *listen;      /* "HOST:PORT"; port 0 picks a free one (printed when ready) */
    int rank, world;
    const char *model_dir;
    const char *backend;     /* "cpu" or "cuda" */
    int device;              /* cuda: device ordinal */
    double gpu_mem_fraction; /* cuda: cap on device memory, fraction of the total (0, 1] */
    const char *token;       /* shared auth token (never logged) */
    const char *const *peers; /* [world] data-plane "host:port" per rank, or NULL if world 1 */
    int threads;             /* compute threads of the cpu backend; <= 0: all cores */
    int max_seqs;            /* default sequence slots (LoadModel may override) */
    int max_seq_len;         /* default tokens per sequence (LoadModel may override) */
    int kv_memory_mb;        /* KV state budget (sequences + cached prefix blocks), MiB; on
                                cuda also clamped to what the device has left after weights */
    int kv_dtype;            /* dv4_kv_dtype of the sequences' KV state (0 = f32, 1 = bf16, 2 = fp8) */
    int device_sampling;     /* rank 0 draws on the device (backend op `sample`): -1 auto (on
                                for cuda, off for cpu, whose draws stay worker_sample's), 0
                                off, 1 on (where the backend has the op) */
    int hello_timeout_ms;    /* a connection must send Hello within this time */
    int comm_timeout_ms;     /* data-plane formation timeout */
    uint64_t fingerprint;    /* ck_fingerprint of the checkpoint, computed at start-up */
    uint64_t ckpt_bytes;     /* payload bytes of the whole checkpoint */
} rpcsrv_config;

/* Listens, prints "duet-worker[R] listening on HOST:PORT" on stdout, and serves until a
 * Shutdown message, SIGTERM or SIGINT. Returns 0 after a clean stop, or a negative DUET_E*
 * code with err set if it could not start (bad address, port in use). */
int rpcsrv_run(const rpcsrv_config *cfg, char *err, size_t errlen);

/* One log line on stderr: "<UTC time> duet-worker[rank] <message>". Thread-safe. */
void rpcsrv_log(int rank, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
