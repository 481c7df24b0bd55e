/* rpcsrv.c — the worker's RPC server (rpcsrv.h): accept, authenticate, execute, answer.
 *
 * Why it is shaped this way: one libuv loop owns every socket; it never computes. Messages
 * that touch the model (LoadModel, StepPlan, Release, and dropping a lost coordinator's
 * sequences) become jobs that run one at a time, in arrival order, on a libuv work thread; the
 * loop answers Heartbeat and Shutdown at once. Connections: any number may be in the handshake
 * (up to MAX_CONNS); each gets a fresh nonce (Challenge) and must send a valid Hello within
 * hello_timeout_ms; only one authenticated coordinator at a time — a second one that
 * authenticates is told "another coordinator is connected" and closed. When the coordinator
 * goes away its sequences and cached prefix blocks are freed but the loaded model is kept, so
 * a reconnecting coordinator with the same fingerprint can skip the reload (LoadModel answers
 * at once). What a step does to sequence state (checks, KV accounting, prefix blocks,
 * sampling) lives in stepexec.c; this file sizes the KV budget at LoadModel.
 *
 * What it must never do: trust a byte from the network (every frame goes through the rpc
 * decoder and protobuf-c's unpacker; every id, position and size is checked before use), let a
 * bad connection harm another, log the token, or touch the model from the loop thread while a
 * job is running.
 */
#include "worker/rpcsrv.h"
#ifdef DUET_HAVE_CUDA
#include "kernels/be_cuda.h"
#endif

#include <arpa/inet.h>
#include <inttypes.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "common/err.h"
#include "common/rpc.h"
#include "proto/duet.pb-c.h"
#include "worker/comm.h"
#include "worker/model.h"
#include "worker/stepexec.h"

#define MAX_CONNS 8          /* open connections (the coordinator + handshakes in progress) */
#define CLOSE_GRACE_MS 2000  /* how long a closing connection may take to flush its last reply */
/* Frames before authentication are small (a Hello is ~60 bytes): an unauthenticated peer can
 * make the worker buffer at most this much. The full RPC_MAX_FRAME applies after Hello, to
 * frames whose header arrives after the HelloReply was earned. */
#define HANDSHAKE_MAX_FRAME (64u << 10)

/* ---- logging ----------------------------------------------------------------------------- */

void rpcsrv_log(int rank, const char *fmt, ...) {
    char msg[1024], ts[40];
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    struct tm tm;
    gmtime_r(&t.tv_sec, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s.%03ldZ duet-worker[%d] %s\n", ts, t.tv_nsec / 1000000, rank, msg);
    fflush(stderr);
}

/* ---- state ------------------------------------------------------------------------------- */

typedef struct wk wk;

enum { C_CHALLENGED, C_READY };

typedef struct conn {
    uv_tcp_t tcp;            /* first: the handle's data points back here anyway */
    uv_timer_t timer;        /* Hello deadline, then the close grace period */
    uv_shutdown_t shut;
    wk *w;
    uint64_t id;
    char peer[80];
    rpc_decoder *dec;
    int state;
    int closing;
    int open_handles;        /* tcp + timer; freed when both close callbacks ran */
    uint8_t nonce[RPC_NONCE_BYTES];
    char rbuf[64 * 1024];
    struct conn *next;
} conn;

typedef enum { J_LOAD, J_STEP, J_RELEASE, J_DROP } job_kind;

typedef struct job {
    uv_work_t work;
    wk *w;
    job_kind kind;
    uint64_t conn_id;        /* reply goes to this connection if it is still the coordinator */
    Duet__LoadModel *load;
    Duet__StepPlan *plan;
    Duet__Release *release;
    /* results, built on the work thread */
    int rc;
    char err[512];
    Duet__StepResult res;
    sx_result out;                   /* what res.results point into */
    struct job *next;
} job;

struct wk {
    const rpcsrv_config *cfg;
    uv_loop_t loop;
    uv_tcp_t server;
    uv_signal_t sigterm, sigint;
    uv_async_t progress;        /* the loading thread's "more bytes loaded" wake-up */
    _Atomic uint64_t load_done; /* checkpoint bytes covered by the running LoadModel */
    int load_pct_logged;
    conn *conns;
    int n_conns;
    conn *coord;
    uint64_t next_id;
    int stopping;
    /* engine: touched by the work thread while a job runs, by the loop only when none does */
    be *b;
    comm *cm;
    atomic_int comm_stale;      /* set when the coordinator left: peers may have died and
                                   restarted, so the next LoadModel re-forms the data plane */
    dv4_model *model;
    sx sx;                      /* sequences, cached prefix blocks, the KV budget */
    int max_seqs, max_seq_len;  /* of the last successful LoadModel */
    uint64_t kv_budget;         /* bytes of KV state (sx), from --kv-memory-mb and the device */
    _Atomic uint64_t steps_done;
    _Atomic uint64_t rank_weight_bytes;
    /* job queue */
    job *q_head, *q_tail;
    job *running;
};

#define LOG(w, ...) rpcsrv_log((w)->cfg->rank, __VA_ARGS__)

static void conn_close(conn *c, const char *why);
static void job_start_next(wk *w);
static void maybe_finish(wk *w);

/* ---- sending ----------------------------------------------------------------------------- */

typedef struct {
    uv_write_t req;
    uint8_t *buf;
} wreq;

static void on_written(uv_write_t *req, int status) {
    wreq *r = (wreq *)req;
    free(r->buf);
    free(r);
    (void)status; /* a failed write shows up as a read error / EOF on the same connection */
}

/* Queues one frame. Returns 0, or a negative DUET_E* code with err set (message too large). */
static int conn_send(conn *c, int type, const ProtobufCMessage *msg, char *err, size_t errlen) {
    if (c->closing) return 0;
    size_t n;
    uint8_t *f = rpc_frame_pack(type, msg, RPC_MAX_FRAME, &n, err, errlen);
    if (!f) return DUET_ENOMEM;
    wreq *r = xmalloc(sizeof *r);
    r->buf = f;
    uv_buf_t b = uv_buf_init((char *)f, (unsigned)n);
    int rc = uv_write(&r->req, (uv_stream_t *)&c->tcp, &b, 1, on_written);
    if (rc) {
        free(f);
        free(r);
        conn_close(c, uv_strerror(rc));
    }
    return 0;
}

/* ---- connections ------------------------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h) {
    conn *c = h->data;
    if (--c->open_handles == 0) {
        wk *w = c->w;
        rpc_decoder_free(c->dec);
        free(c);
        maybe_finish(w);
    }
}

static void on_grace_over(uv_timer_t *t) {
    conn *c = t->data;
    if (!uv_is_closing((uv_handle_t *)&c->tcp)) uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
}

static void on_shutdown_done(uv_shutdown_t *req, int status) {
    conn *c = req->data;
    (void)status;
    if (!uv_is_closing((uv_handle_t *)&c->tcp)) uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    if (!uv_is_closing((uv_handle_t *)&c->timer)) {
        uv_timer_stop(&c->timer);
        uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    }
}

static void drop_coordinator_state(wk *w);

/* Closes a connection after flushing what was queued (bounded by CLOSE_GRACE_MS). `why` is
 * logged; NULL = quietly. Safe to call twice. */
static void conn_close(conn *c, const char *why) {
    if (c->closing) return;
    wk *w = c->w;
    c->closing = 1;
    for (conn **p = &w->conns; *p; p = &(*p)->next)
        if (*p == c) {
            *p = c->next;
            break;
        }
    w->n_conns--;
    if (why) LOG(w, "closing connection from %s: %s", c->peer, why);
    uv_read_stop((uv_stream_t *)&c->tcp);
    if (w->coord == c) {
        w->coord = NULL;
        drop_coordinator_state(w);
    }
    uv_timer_stop(&c->timer);
    c->shut.data = c;
    if (uv_shutdown(&c->shut, (uv_stream_t *)&c->tcp, on_shutdown_done) == 0) {
        uv_timer_start(&c->timer, on_grace_over, CLOSE_GRACE_MS, 0);
    } else {
        uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
        uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    }
}

/* Rejects a connection during the handshake: logs the reason, answers HelloReply{ok=false},
 * closes. Identity fields are only filled for peers that proved the token. */
static void reject(conn *c, int authenticated, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void reject(conn *c, int authenticated, const char *fmt, ...) {
    wk *w = c->w;
    char why[512], err[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    LOG(w, "rejecting connection from %s: %s", c->peer, why);
    Duet__HelloReply r = DUET__HELLO_REPLY__INIT;
    r.ok = 0;
    r.error = why;
    if (authenticated) {
        r.rank = (uint32_t)w->cfg->rank;
        r.world_size = (uint32_t)w->cfg->world;
        r.model_fingerprint = w->cfg->fingerprint;
        r.backend = (char *)w->cfg->backend;
        r.model_path = (char *)w->cfg->model_dir;
    }
    conn_send(c, RPC_HELLO_REPLY, &r.base, err, sizeof err);
    conn_close(c, NULL);
}

static void on_hello_timeout(uv_timer_t *t) {
    conn *c = t->data;
    if (c->state == C_CHALLENGED && !c->closing) {
        char why[96];
        snprintf(why, sizeof why, "no Hello within %d ms", c->w->cfg->hello_timeout_ms);
        conn_close(c, why);
    }
}

/* ---- jobs -------------------------------------------------------------------------------- */

static void job_free(job *j) {
    if (j->load) duet__load_model__free_unpacked(j->load, NULL);
    if (j->plan) duet__step_plan__free_unpacked(j->plan, NULL);
    if (j->release) duet__release__free_unpacked(j->release, NULL);
    sx_result_free(&j->out);
    free(j);
}

static void enqueue(wk *w, job *j) {
    j->w = w;
    j->work.data = j;
    if (w->q_tail)
        w->q_tail->next = j;
    else
        w->q_head = j;
    w->q_tail = j;
    job_start_next(w);
}

/* The coordinator went away: its queued work is void; its sequences are freed (by a job, so
 * this never races a running step). The model stays loaded. */
static void drop_coordinator_state(wk *w) {
    if (w->cfg->world > 1) atomic_store(&w->comm_stale, 1);
    while (w->q_head) {
        job *j = w->q_head;
        w->q_head = j->next;
        job_free(j);
    }
    w->q_tail = NULL;
    if (w->stopping) return;
    job *d = xcalloc(1, sizeof *d);
    d->kind = J_DROP;
    enqueue(w, d);
}

/* Work thread: LoadModel. Keeps an already loaded model (same files, same fingerprint). */
/* Loading thread: remember how far the load got and wake the loop (uv_async coalesces). */
static void on_load_progress(uint64_t done, uint64_t total, void *ctx) {
    wk *w = ctx;
    (void)total;
    atomic_store(&w->load_done, done);
    uv_async_send(&w->progress);
}

/* The compute backend named by --backend. cuda: refuse cleanly, before any weight is
 * allocated, when this rank's share of the checkpoint cannot fit under the memory cap (on
 * unified-memory machines the cap also respects the host's available memory). */
static int make_backend(wk *w, char *err, size_t errlen) {
    const rpcsrv_config *cfg = w->cfg;
#ifdef DUET_HAVE_CUDA
    if (!strcmp(cfg->backend, "cuda")) {
        be *b = be_cuda_create(cfg->device, cfg->gpu_mem_fraction, err, errlen);
        if (!b) return DUET_EINVAL;
        int rc = be_cuda_fits(b, (size_t)(cfg->ckpt_bytes / (uint64_t)cfg->world), err, errlen);
        if (rc) {
            b->ops->destroy(b);
            return rc;
        }
        w->b = b;
        return 0;
    }
#endif
    (void)err;
    (void)errlen;
    w->b = be_cpu_create(cfg->threads);
    return 0;
}

/* Tokens per step the activation margin is sized for (the coordinator's default
 * max-num-batched-tokens is 2048), and the device memory kept for backend workspaces. */
#define ACT_MARGIN_TOKENS 4096
#define WORKSPACE_MARGIN (512ull << 20)

/* Bytes of KV state this rank may hold: --kv-memory-mb; on CUDA at most what is left under the
 * device cap after the weights, minus activations of an ACT_MARGIN_TOKENS-token step and
 * WORKSPACE_MARGIN. A note on a clamp goes to the log. */
static uint64_t kv_budget(wk *w) {
    uint64_t budget = (uint64_t)w->cfg->kv_memory_mb << 20;
#ifdef DUET_HAVE_CUDA
    if (!strcmp(w->cfg->backend, "cuda")) {
        uint64_t cap = be_cuda_mem_cap(w->b), used = be_cuda_mem_used(w->b);
        uint64_t margin = dv4_step_scratch_bytes(dv4_cfg(w->model), ACT_MARGIN_TOKENS) +
                          WORKSPACE_MARGIN;
        uint64_t left = cap > used + margin ? cap - used - margin : 0;
        if (left < budget) {
            LOG(w, "KV budget clamped from --kv-memory-mb %d to %.1f MiB: device cap %.1f MiB, "
                "%.1f MiB in use after the weights, %.1f MiB kept for activations and "
                "workspaces", w->cfg->kv_memory_mb, left / 1048576.0, cap / 1048576.0,
                used / 1048576.0, margin / 1048576.0);
            budget = left;
        }
    }
#endif
    return budget;
}

static int run_load(wk *w, job *j) {
    const rpcsrv_config *cfg = w->cfg;
    int max_seqs = j->load->max_seqs ? (int)j->load->max_seqs : cfg->max_seqs;
    int max_len = j->load->max_seq_len ? (int)j->load->max_seq_len : cfg->max_seq_len;
    if (max_seqs <= 0 || max_seqs > 65536)
        return duet_err(j->err, sizeof j->err, DUET_EINVAL,
                        "max_seqs %d is outside [1, 65536]", max_seqs);
    if (max_len <= 0 || max_len > (1 << 24))
        return duet_err(j->err, sizeof j->err, DUET_EINVAL,
                        "max_seq_len %d is outside [1, 16777216]", max_len);
    int block = j->load->block_size ? (int)j->load->block_size : 256;
    if (j->load->block_size > (1u << 20) || block % 128)
        return duet_err(j->err, sizeof j->err, DUET_EINVAL,
                        "block_size %u is not a multiple of 128 (every CSA and HCA window must "
                        "close on a block boundary); use 128, 256, 512, ...",
                        j->load->block_size);
    /* The data plane is formed anew for every coordinator: a peer may have died and come back
     * since (its old sockets are dead even if this rank never noticed). Loaded weights stay. */
    if (cfg->world > 1 && (!w->cm || atomic_exchange(&w->comm_stale, 0))) {
        comm_destroy(w->cm);
        w->cm = NULL;
        int rc = comm_tcp_create(cfg->rank, cfg->world, cfg->peers, cfg->comm_timeout_ms, &w->cm,
                                 j->err, sizeof j->err);
        if (rc) return rc;
        if (w->model) dv4_set_comm(w->model, w->cm);
    }
    if (!w->model) {
        if (!w->b) {
            int rc = make_backend(w, j->err, sizeof j->err);
            if (rc) return rc;
        }
        dv4_shard shard = {cfg->rank, cfg->world, w->cm};
        atomic_store(&w->load_done, 0);
        int rc = dv4_load_ex(cfg->model_dir, w->b, &shard, on_load_progress, w, &w->model, j->err,
                             sizeof j->err);
        if (rc) return rc;
        if (dv4_fingerprint(w->model) != cfg->fingerprint) {
            dv4_free(w->model);
            w->model = NULL;
            return duet_err(j->err, sizeof j->err, DUET_EINVAL,
                            "the checkpoint in %s changed on disk since this worker started "
                            "(fingerprint %016" PRIx64 " at start-up); restart the worker",
                            cfg->model_dir, cfg->fingerprint);
        }
        atomic_store(&w->rank_weight_bytes, dv4_rank_weight_bytes(w->model));
    }
    /* a LoadModel starts from empty sequence and prefix-block state, so the KV dtype (which
     * the block sizes below depend on) can be set here */
    sx_clear(&w->sx);
    int rc = dv4_set_kv_dtype(w->model, (dv4_kv_dtype)cfg->kv_dtype, j->err, sizeof j->err);
    if (rc) return rc;
    uint64_t budget = kv_budget(w);
    rc = sx_configure(&w->sx, w->model, cfg->rank, block, max_seqs, max_len, budget, j->err,
                          sizeof j->err);
    if (rc) return rc;
    int want = cfg->device_sampling < 0 ? !strcmp(cfg->backend, "cuda") : cfg->device_sampling;
    w->sx.dev_sample = want && w->b->ops->sample;
    if (cfg->rank == 0)
        rpcsrv_log(cfg->rank, "sampling on the %s%s", w->sx.dev_sample ? "device" : "host",
                   want && !w->sx.dev_sample ? " (the backend has no sample op)" : "");
    w->max_seqs = max_seqs;
    w->max_seq_len = max_len;
    w->kv_budget = budget;
    return 0;
}

/* Work thread: StepPlan (stepexec.c). A forward pass that fails after the checks is a failed
 * collective, and a comm is unusable after an error (comm.h): drop every sequence and cached
 * block and the data plane (weights stay loaded); the next LoadModel forms it again. */
static int run_step(wk *w, job *j) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = sx_step(&w->sx, j->plan, &j->out, j->err, sizeof j->err);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (rc == DUET_EIO) {
        sx_clear(&w->sx);
        if (w->cfg->world > 1) {
            size_t l = strlen(j->err);
            snprintf(j->err + l, sizeof j->err - l,
                     " (the data plane is down; send LoadModel to re-form it)");
            comm_destroy(w->cm);
            w->cm = NULL;
        }
    }
    if (rc) return rc;
    j->res.compute_us = (uint64_t)((t1.tv_sec - t0.tv_sec) * 1000000LL +
                                   (t1.tv_nsec - t0.tv_nsec) / 1000);
    atomic_fetch_add(&w->steps_done, 1);
    j->res.n_results = j->out.n;
    j->res.results = j->out.ptrs;
    return 0;
}

static void job_work(uv_work_t *req) {
    job *j = req->data;
    wk *w = j->w;
    switch (j->kind) {
    case J_LOAD: j->rc = run_load(w, j); break;
    case J_STEP: j->rc = run_step(w, j); break;
    case J_RELEASE: sx_release(&w->sx, j->release); break;
    case J_DROP: sx_clear(&w->sx); break; /* every sequence and cached block */
    }
}

/* Loop thread: forward the loading thread's progress to the coordinator and the log. Nothing
 * is sent once the load job has finished (its done message is the last LoadProgress). */
static void on_progress_async(uv_async_t *h) {
    wk *w = h->data;
    if (!w->running || w->running->kind != J_LOAD) return;
    uint64_t done = atomic_load(&w->load_done), total = w->cfg->ckpt_bytes;
    int pct = total ? (int)(done * 100 / total) : 0;
    if (pct >= w->load_pct_logged + 10 || pct == 100) {
        LOG(w, "loading: %d%% of %" PRIu64 " checkpoint bytes", pct, total);
        w->load_pct_logged = pct;
    }
    conn *c = w->coord && !w->coord->closing ? w->coord : NULL;
    if (!c) return;
    Duet__LoadProgress m = DUET__LOAD_PROGRESS__INIT;
    m.bytes_done = done;
    m.bytes_total = total;
    m.ok = 1;
    m.error = "";
    char err[256];
    conn_send(c, RPC_LOAD_PROGRESS, &m.base, err, sizeof err);
}

static void job_done(uv_work_t *req, int status) {
    job *j = req->data;
    wk *w = j->w;
    w->running = NULL;
    conn *c = w->coord && w->coord->id == j->conn_id && !w->coord->closing ? w->coord : NULL;
    char err[256];
    if (j->kind == J_LOAD) {
        if (j->rc)
            LOG(w, "LoadModel failed: %s", j->err);
        else
            LOG(w, "model loaded: %" PRIu64 " bytes of weights on this rank, %d sequence slots "
                "of %d tokens; KV budget %.1f MiB = %u blocks of %d tokens (%" PRIu64 " bytes "
                "each) after the sequences' fixed state; a cached prefix block costs %u blocks",
                atomic_load(&w->rank_weight_bytes), w->max_seqs, w->max_seq_len,
                w->kv_budget / 1048576.0, w->sx.blocks_total, w->sx.block,
                w->sx.block_bytes, w->sx.snap_cost);
        if (c) {
            Duet__LoadProgress m = DUET__LOAD_PROGRESS__INIT;
            m.done = 1;
            m.ok = j->rc == 0;
            m.error = j->rc ? j->err : "";
            m.bytes_total = w->cfg->ckpt_bytes;
            m.bytes_done = j->rc ? 0 : w->cfg->ckpt_bytes;
            m.rank_weight_bytes = atomic_load(&w->rank_weight_bytes);
            if (!j->rc) {
                m.kv_blocks_total = w->sx.blocks_total;
                m.snapshot_block_cost = w->sx.snap_cost;
                m.kv_block_bytes = w->sx.block_bytes;
            }
            conn_send(c, RPC_LOAD_PROGRESS, &m.base, err, sizeof err);
        }
    } else if (j->kind == J_STEP && c) {
        j->res.step_id = j->plan->step_id;
        j->res.ok = j->rc == 0;
        if (j->rc) {
            j->res.error = j->err;
            j->res.n_results = 0;
        }
        if (conn_send(c, RPC_STEP_RESULT, &j->res.base, err, sizeof err)) {
            Duet__StepResult e = DUET__STEP_RESULT__INIT;
            e.step_id = j->plan->step_id;
            e.error = err;
            conn_send(c, RPC_STEP_RESULT, &e.base, err, sizeof err);
        }
    }
    (void)status;
    job_free(j);
    job_start_next(w);
    maybe_finish(w);
}

static void job_start_next(wk *w) {
    if (w->running || !w->q_head) return;
    job *j = w->q_head;
    w->q_head = j->next;
    if (!w->q_head) w->q_tail = NULL;
    j->next = NULL;
    w->running = j;
    int rc = uv_queue_work(&w->loop, &j->work, job_work, job_done);
    if (rc) { /* cannot happen with a live loop; run inline rather than lose the job */
        job_work(&j->work);
        job_done(&j->work, rc);
    }
}

/* ---- messages ---------------------------------------------------------------------------- */

static void on_hello(conn *c, const uint8_t *p, size_t len) {
    wk *w = c->w;
    const rpcsrv_config *cfg = w->cfg;
    Duet__Hello *h = duet__hello__unpack(NULL, len, p);
    if (!h) {
        reject(c, 0, "malformed Hello (not a valid protobuf message)");
        return;
    }
    if (h->protocol_version != RPC_PROTOCOL_VERSION)
        reject(c, 0, "protocol version %u is not supported; this worker speaks version %u",
               h->protocol_version, RPC_PROTOCOL_VERSION);
    else if (!rpc_auth_check(cfg->token, c->nonce, sizeof c->nonce, h->auth_proof.data,
                             h->auth_proof.len))
        reject(c, 0, "authentication failed: the auth proof does not match this worker's token "
                     "(check --auth-token-file on both sides)");
    else if (h->rank != (uint32_t)cfg->rank)
        reject(c, 1, "rank mismatch: the coordinator expects rank %u, this worker is rank %d",
               h->rank, cfg->rank);
    else if (h->world_size != (uint32_t)cfg->world)
        reject(c, 1, "world size mismatch: the coordinator expects %u ranks, this worker was "
                     "started with --world-size %d", h->world_size, cfg->world);
    else if (h->model_fingerprint && h->model_fingerprint != cfg->fingerprint)
        reject(c, 1, "model fingerprint mismatch: the coordinator expects %016" PRIx64
                     ", this worker serves %s with fingerprint %016" PRIx64,
               h->model_fingerprint, cfg->model_dir, cfg->fingerprint);
    else if (w->coord)
        reject(c, 1, "another coordinator is connected (from %s)", w->coord->peer);
    else if (w->stopping)
        reject(c, 1, "the worker is shutting down");
    else {
        char err[256];
        Duet__HelloReply r = DUET__HELLO_REPLY__INIT;
        r.ok = 1;
        r.error = "";
        r.rank = (uint32_t)cfg->rank;
        r.world_size = (uint32_t)cfg->world;
        r.model_fingerprint = cfg->fingerprint;
        r.backend = (char *)cfg->backend;
        r.model_path = (char *)cfg->model_dir;
        c->state = C_READY;
        w->coord = c;
        rpc_decoder_set_max(c->dec, RPC_MAX_FRAME);
        uv_timer_stop(&c->timer);
        conn_send(c, RPC_HELLO_REPLY, &r.base, err, sizeof err);
        LOG(w, "coordinator connected from %s", c->peer);
    }
    duet__hello__free_unpacked(h, NULL);
}

/* Handles one frame. Returns without touching c if it was closed. */
static void dispatch(conn *c, int type, const uint8_t *p, size_t len) {
    wk *w = c->w;
    char err[256];
    if (c->state == C_CHALLENGED) {
        if (type == RPC_HELLO)
            on_hello(c, p, len);
        else
            reject(c, 0, "expected Hello as the first message, got %s", rpc_type_name(type));
        return;
    }
    job *j;
    switch (type) {
    case RPC_LOAD_MODEL: {
        Duet__LoadModel *m = duet__load_model__unpack(NULL, len, p);
        if (!m) {
            conn_close(c, "malformed LoadModel message");
            return;
        }
        LOG(w, "LoadModel from %s (%s)", c->peer, w->model ? "already loaded" : "loading");
        w->load_pct_logged = -10;
        Duet__LoadProgress pr = DUET__LOAD_PROGRESS__INIT;
        pr.bytes_total = w->cfg->ckpt_bytes;
        pr.ok = 1;
        pr.error = "";
        conn_send(c, RPC_LOAD_PROGRESS, &pr.base, err, sizeof err);
        j = xcalloc(1, sizeof *j);
        j->kind = J_LOAD;
        j->load = m;
        break;
    }
    case RPC_STEP_PLAN: {
        Duet__StepPlan *m = duet__step_plan__unpack(NULL, len, p);
        if (!m) {
            conn_close(c, "malformed StepPlan message");
            return;
        }
        j = xcalloc(1, sizeof *j);
        duet__step_result__init(&j->res);
        j->kind = J_STEP;
        j->plan = m;
        break;
    }
    case RPC_RELEASE: {
        Duet__Release *m = duet__release__unpack(NULL, len, p);
        if (!m) {
            conn_close(c, "malformed Release message");
            return;
        }
        j = xcalloc(1, sizeof *j);
        j->kind = J_RELEASE;
        j->release = m;
        break;
    }
    case RPC_HEARTBEAT: {
        Duet__Heartbeat *m = duet__heartbeat__unpack(NULL, len, p);
        if (!m) {
            conn_close(c, "malformed Heartbeat message");
            return;
        }
        Duet__Stats s = DUET__STATS__INIT;
        s.seq = m->seq;
        s.steps_done = atomic_load(&w->steps_done);
        s.live_seqs = atomic_load(&w->sx.live_seqs);
        s.kv_blocks_used = atomic_load(&w->sx.kv_blocks_used);
        s.cached_blocks = atomic_load(&w->sx.cached_blocks);
        s.rank_weight_bytes = atomic_load(&w->rank_weight_bytes);
        duet__heartbeat__free_unpacked(m, NULL);
        conn_send(c, RPC_STATS, &s.base, err, sizeof err);
        return;
    }
    case RPC_SHUTDOWN: {
        Duet__Shutdown *m = duet__shutdown__unpack(NULL, len, p);
        LOG(w, "Shutdown from %s: %s", c->peer, m && m->reason[0] ? m->reason : "(no reason)");
        if (m) duet__shutdown__free_unpacked(m, NULL);
        w->stopping = 1;
        maybe_finish(w);
        return;
    }
    default: {
        char why[96];
        snprintf(why, sizeof why, "unexpected %s message from the coordinator",
                 rpc_type_name(type));
        conn_close(c, why);
        return;
    }
    }
    j->conn_id = c->id;
    enqueue(w, j);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    conn *c = h->data;
    (void)suggested;
    *buf = uv_buf_init(c->rbuf, sizeof c->rbuf);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    conn *c = s->data;
    (void)buf;
    if (nread == 0 || c->closing) return;
    if (nread < 0) {
        conn_close(c, nread == UV_EOF ? (c == c->w->coord ? "the coordinator disconnected"
                                                          : "the peer disconnected")
                                      : uv_strerror((int)nread));
        return;
    }
    char err[256];
    if (rpc_decoder_feed(c->dec, c->rbuf, (size_t)nread, err, sizeof err)) {
        conn_close(c, err);
        return;
    }
    int type;
    const uint8_t *p;
    size_t len;
    while (!c->closing && rpc_decoder_next(c->dec, &type, &p, &len))
        dispatch(c, type, p, len);
}

static void on_connection(uv_stream_t *server, int status) {
    wk *w = server->data;
    if (status < 0) {
        LOG(w, "accept failed: %s", uv_strerror(status));
        return;
    }
    conn *c = xcalloc(1, sizeof *c);
    c->w = w;
    c->id = ++w->next_id;
    uv_tcp_init(&w->loop, &c->tcp);
    uv_timer_init(&w->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->open_handles = 2;
    c->dec = rpc_decoder_new(HANDSHAKE_MAX_FRAME);
    snprintf(c->peer, sizeof c->peer, "?");
    c->next = w->conns;
    w->conns = c;
    w->n_conns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp)) {
        conn_close(c, "accept failed");
        return;
    }
    struct sockaddr_storage ss;
    int sl = sizeof ss;
    if (!uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl)) {
        char host[64] = "?";
        int port = 0;
        if (ss.ss_family == AF_INET) {
            uv_ip4_name((struct sockaddr_in *)&ss, host, sizeof host);
            port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        } else if (ss.ss_family == AF_INET6) {
            uv_ip6_name((struct sockaddr_in6 *)&ss, host, sizeof host);
            port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
        }
        snprintf(c->peer, sizeof c->peer, "%s:%d", host, port);
    }
    if (w->stopping) {
        conn_close(c, "the worker is shutting down");
        return;
    }
    if (w->n_conns > MAX_CONNS) {
        char why[80];
        snprintf(why, sizeof why, "too many connections are open (at most %d at once)",
                 MAX_CONNS);
        conn_close(c, why);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    rpc_random_nonce(c->nonce);
    Duet__Challenge ch = DUET__CHALLENGE__INIT;
    ch.nonce.data = c->nonce;
    ch.nonce.len = sizeof c->nonce;
    ch.protocol_version = RPC_PROTOCOL_VERSION;
    char err[256];
    conn_send(c, RPC_CHALLENGE, &ch.base, err, sizeof err);
    if (c->closing) return;
    uv_timer_start(&c->timer, on_hello_timeout, (uint64_t)w->cfg->hello_timeout_ms, 0);
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

/* ---- start and stop ---------------------------------------------------------------------- */

static void on_signal(uv_signal_t *s, int signum) {
    wk *w = s->data;
    if (w->stopping && w->running) {
        /* a job cannot be interrupted (e.g. forming the data plane waits for its peers up to
         * --comm-timeout-ms); a second signal is the operator saying "now" */
        LOG(w, "%s received again while a job is running; exiting at once",
            signum == SIGTERM ? "SIGTERM" : "SIGINT");
        _exit(1);
    }
    LOG(w, "%s received; shutting down%s", signum == SIGTERM ? "SIGTERM" : "SIGINT",
        w->running ? " after the running job (signal again to exit at once)" : "");
    w->stopping = 1;
    maybe_finish(w);
}

/* Once stopping: stop listening, close every connection, and when no job runs any more and
 * every connection has closed, close the last handles so uv_run returns. */
static void maybe_finish(wk *w) {
    if (!w->stopping) return;
    if (!uv_is_closing((uv_handle_t *)&w->server)) uv_close((uv_handle_t *)&w->server, NULL);
    while (w->conns) conn_close(w->conns, NULL);
    while (w->q_head) {
        job *j = w->q_head;
        w->q_head = j->next;
        job_free(j);
    }
    w->q_tail = NULL;
    if (w->running) return;
    if (!uv_is_closing((uv_handle_t *)&w->sigterm)) {
        uv_close((uv_handle_t *)&w->sigterm, NULL);
        uv_close((uv_handle_t *)&w->sigint, NULL);
        uv_close((uv_handle_t *)&w->progress, NULL);
    }
}

static int is_loopback(const struct sockaddr *sa) {
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a) ||
               (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
    }
    return 0;
}

/* "HOST:PORT" or "[V6]:PORT" -> resolved address (numeric port). */
static int parse_listen(const char *s, struct sockaddr_storage *out, char *err, size_t errlen) {
    char host[256];
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s || !colon[1])
        return duet_err(err, errlen, DUET_EINVAL, "--listen %s: expected HOST:PORT", s);
    size_t hl = (size_t)(colon - s);
    if (s[0] == '[' && hl >= 2 && s[hl - 1] == ']') s++, hl -= 2;
    if (hl >= sizeof host) return duet_err(err, errlen, DUET_EINVAL, "--listen: host too long");
    memcpy(host, s, hl);
    host[hl] = 0;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < 0 || port > 65535)
        return duet_err(err, errlen, DUET_EINVAL, "--listen: port '%s' is not in 0..65535",
                        colon + 1);
    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    int rc = getaddrinfo(host, colon + 1, &hints, &ai);
    if (rc || !ai)
        return duet_err(err, errlen, DUET_EINVAL, "--listen: cannot resolve host '%s': %s", host,
                        gai_strerror(rc));
    memcpy(out, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    return 0;
}

static void on_walk_close(uv_handle_t *h, void *arg) {
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

int rpcsrv_run(const rpcsrv_config *cfg, char *err, size_t errlen) {
    struct sockaddr_storage addr;
    int rc = parse_listen(cfg->listen, &addr, err, errlen);
    if (rc) return rc;
    wk *w = xcalloc(1, sizeof *w);
    w->cfg = cfg;
    uv_loop_init(&w->loop);
    uv_tcp_init(&w->loop, &w->server);
    w->server.data = w;
    int u = uv_tcp_bind(&w->server, (const struct sockaddr *)&addr, 0);
    if (!u) u = uv_listen((uv_stream_t *)&w->server, 16, on_connection);
    if (u) {
        rc = duet_err(err, errlen, DUET_EIO, "cannot listen on %s: %s", cfg->listen,
                      uv_strerror(u));
        uv_close((uv_handle_t *)&w->server, NULL);
        uv_run(&w->loop, UV_RUN_DEFAULT);
        uv_loop_close(&w->loop);
        free(w);
        return rc;
    }
    uv_async_init(&w->loop, &w->progress, on_progress_async);
    w->progress.data = w;
    uv_signal_init(&w->loop, &w->sigterm);
    uv_signal_init(&w->loop, &w->sigint);
    w->sigterm.data = w->sigint.data = w;
    uv_signal_start(&w->sigterm, on_signal, SIGTERM);
    uv_signal_start(&w->sigint, on_signal, SIGINT);

    struct sockaddr_storage bound;
    int bl = sizeof bound;
    uv_tcp_getsockname(&w->server, (struct sockaddr *)&bound, &bl);
    char host[64] = "?";
    int port = 0;
    if (bound.ss_family == AF_INET6) {
        uv_ip6_name((struct sockaddr_in6 *)&bound, host, sizeof host);
        port = ntohs(((struct sockaddr_in6 *)&bound)->sin6_port);
    } else {
        uv_ip4_name((struct sockaddr_in *)&bound, host, sizeof host);
        port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    }
    if (!is_loopback((struct sockaddr *)&bound))
        LOG(w, "warning: listening on the non-loopback address %s; anyone who can reach it can "
               "attempt to authenticate", host);
    const char *fmt = bound.ss_family == AF_INET6 ? "[%s]:%d" : "%s:%d";
    char where[96];
    snprintf(where, sizeof where, fmt, host, port);
    LOG(w, "listening on %s (world size %d, model %s, fingerprint %016" PRIx64 ", backend %s)",
        where, cfg->world, cfg->model_dir, cfg->fingerprint, cfg->backend);
    printf("duet-worker[%d] listening on %s\n", cfg->rank, where);
    fflush(stdout);

    uv_run(&w->loop, UV_RUN_DEFAULT);

    /* everything was closed by maybe_finish; be defensive about stragglers */
    uv_walk(&w->loop, on_walk_close, NULL);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    uv_loop_close(&w->loop);
    sx_destroy(&w->sx);
    if (w->model) dv4_free(w->model);
    comm_destroy(w->cm);
    if (w->b) w->b->ops->destroy(w->b);
    LOG(w, "stopped");
    free(w);
    return 0;
}
