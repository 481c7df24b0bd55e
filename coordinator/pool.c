/* pool.c — connections from the coordinator to its workers: handshake, load, heartbeats, steps.
 *
 * Why it is shaped this way: the workers of a group run collectives among themselves, so one
 * dead worker breaks every other worker's data plane. The pool therefore treats the group as
 * one unit: a worker that fails after LoadModel was sent takes the whole group down (every
 * connection is closed, the in-flight step fails with a sentence naming the worker), and the
 * group is re-formed from scratch (connect, Challenge/Hello, LoadModel to all) once every
 * worker answers again. Before LoadModel a worker may come and go on its own.
 *
 * Each worker connection walks DOWN → CONNECTING → HANDSHAKE → CONNECTED → LOADING → UP. One
 * periodic tick drives heartbeats and every timeout (connect/handshake, heartbeat, load, step,
 * the start-up deadline), so no timer outlives the state that armed it.
 *
 * What it must never do: block the event loop, trust a byte a worker sends (every frame is
 * length-checked by the rpc decoder and unpacked by protobuf-c, every field range-checked), call
 * a step callback twice, or exit the process.
 */
#include "coordinator/clog.h"
#include "coordinator/pool.h"

#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>

#include "common/err.h"
#include "common/rpc.h"

#define HANDSHAKE_TIMEOUT_S 5.0
#define BACKOFF_MIN_S 0.05
#define BACKOFF_MAX_S 1.0
#define TICK_MS 100
#define PREAUTH_MAX_FRAME (64u << 10) /* until the worker's HelloReply accepted us */

/* ---- types ---------------------------------------------------------------------------- */

typedef enum { W_DOWN, W_CONNECTING, W_HANDSHAKE, W_CONNECTED, W_LOADING, W_UP } wstate;

static const char *const wstate_names[] = {"down",      "connecting", "handshake",
                                           "connected", "loading",    "up"};

typedef struct worker {
    pool *p;
    int rank;
    char *addr, *host;
    int port;
    wstate st;
    struct bufferevent *bev;  /* NULL while DOWN */
    rpc_decoder *dec;
    int hello_sent;
    double attempt_start;     /* when the current connection attempt began */
    double retry_at;          /* DOWN: next attempt (monotonic s) */
    double backoff_s;
    double last_rx;           /* last frame received (0 = never) */
    double last_hb_tx;
    double load_start;
    uint64_t hb_seq;
    uint64_t fingerprint;
    char backend[32];
    uint64_t load_done, load_total, weight_bytes, steps_done;
    uint32_t kv_blocks_total, snap_cost, kv_blocks_used;  /* LoadProgress / Stats */
    uint64_t kv_block_bytes;
    int owes_step;            /* a StepResult for the current step is outstanding */
    Duet__StepResult *step_res;
    char error[512];          /* last problem, for status; "" when none */
    double step_ms[64];       /* ring of the last step round trips (ms), for step_ms_p50 */
    int n_step_ms;
} worker;

struct pool {
    struct event_base *base;
    pool_cfg cfg;
    char *token;
    worker *w;
    int n;
    pool_state state;
    int ever_ready;
    int fatal_sent;
    uint64_t fingerprint;
    double start_time;
    struct event *tick;
    pool_event_cb cb;
    void *cb_arg;
    int pct_logged;           /* last progress decile logged, -1 none */
    /* the step in flight */
    int step_active;
    uint64_t step_id;
    double step_start;
    pool_step_cb step_cb;
    void *step_arg;
};

/* ---- small helpers -------------------------------------------------------------------- */


/* Splits "host:port" / "[v6]:port". */
static int split_addr(const char *a, char **host, int *port, char *err, size_t errlen) {
    const char *colon = strrchr(a, ':');
    if (!colon || colon == a || !colon[1])
        return duet_err(err, errlen, DUET_EINVAL,
                        "worker address '%s' is not HOST:PORT (e.g. 10.0.0.2:7100)", a);
    char *end;
    long v = strtol(colon + 1, &end, 10);
    if (*end || v < 1 || v > 65535)
        return duet_err(err, errlen, DUET_EINVAL,
                        "worker address '%s': port must be a number in 1..65535", a);
    const char *h = a;
    size_t hl = (size_t)(colon - a);
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    *host = xmalloc(hl + 1);
    memcpy(*host, h, hl);
    (*host)[hl] = 0;
    *port = (int)v;
    return 0;
}

static void set_up_metric(pool *p, int rank, int up) {
    if (!p->cfg.metrics) return;
    char l[32];
    snprintf(l, sizeof l, "worker=\"w%d\"", rank);
    metrics_set(p->cfg.metrics, "worker_up", l, up);
}

static void emit(pool *p, pool_event ev, const char *msg) {
    if (p->cb) p->cb(p->cb_arg, ev, msg);
}

/* ---- connection lifetime ---------------------------------------------------------------- */

static void read_cb(struct bufferevent *bev, void *arg);
static void event_cb(struct bufferevent *bev, short what, void *arg);

static void close_conn(worker *w) {
    if (w->st == W_UP) set_up_metric(w->p, w->rank, 0);
    if (w->bev) {
        bufferevent_free(w->bev);
        w->bev = NULL;
    }
    if (w->dec) {
        rpc_decoder_free(w->dec);
        w->dec = NULL;
    }
    if (w->step_res) {
        duet__step_result__free_unpacked(w->step_res, NULL);
        w->step_res = NULL;
    }
    w->owes_step = 0;
    w->hello_sent = 0;
    w->load_done = w->load_total = 0;
}

/* Down, next attempt after delay seconds. */
static void set_down(worker *w, double delay) {
    close_conn(w);
    w->st = W_DOWN;
    w->retry_at = coord_now_s() + delay;
}

static void start_connect(worker *w) {
    pool *p = w->p;
    w->bev = bufferevent_socket_new(p->base, -1, BEV_OPT_CLOSE_ON_FREE);
    w->dec = rpc_decoder_new(PREAUTH_MAX_FRAME);
    w->st = W_CONNECTING;
    w->attempt_start = coord_now_s();
    w->last_rx = 0;
    bufferevent_setcb(w->bev, read_cb, NULL, event_cb, w);
    bufferevent_enable(w->bev, EV_READ | EV_WRITE);
    /* NULL dns base: names resolve synchronously (addresses in a cluster file are IPs or
     * /etc/hosts names, so this does not stall the loop in practice). */
    if (bufferevent_socket_connect_hostname(w->bev, NULL, AF_UNSPEC, w->host, w->port) < 0) {
        snprintf(w->error, sizeof w->error, "cannot connect to %s: %s", w->addr,
                 strerror(errno));
        set_down(w, w->backoff_s);
    }
}

static void fail_step(pool *p, const char *msg) {
    if (!p->step_active) return;
    p->step_active = 0;
    pool_step_cb cb = p->step_cb;
    void *arg = p->step_arg;
    p->step_cb = NULL;
    for (int i = 0; i < p->n; i++) {
        p->w[i].owes_step = 0;
        if (p->w[i].step_res) {
            duet__step_result__free_unpacked(p->w[i].step_res, NULL);
            p->w[i].step_res = NULL;
        }
    }
    if (cb) cb(arg, 0, NULL, msg);
}

/* A start-up problem that retrying cannot fix (or the deadline passed). */
static void fatal(pool *p, const char *msg) {
    if (p->fatal_sent) return;
    p->fatal_sent = 1; /* the caller logs msg (POOL_EV_FATAL) */
    for (int i = 0; i < p->n; i++) {
        close_conn(&p->w[i]);
        p->w[i].st = W_DOWN;
        p->w[i].retry_at = INFINITY;
    }
    p->state = POOL_FAILED;
    fail_step(p, msg);
    emit(p, POOL_EV_FATAL, msg);
}

/* The group is broken: close every connection, fail the step, re-form when all are back.
 * w (may be NULL) is the worker to blame; it retries with backoff, the others at once. */
static void group_fail(pool *p, worker *w, const char *msg) {
    coord_log("%s", msg);
    if (w) snprintf(w->error, sizeof w->error, "%s", msg);
    for (int i = 0; i < p->n; i++) {
        worker *x = &p->w[i];
        if (x == w) {
            x->backoff_s = BACKOFF_MIN_S;
            set_down(x, BACKOFF_MIN_S);
        } else if (x->st != W_DOWN) {
            set_down(x, 0);
        }
    }
    p->state = p->ever_ready ? POOL_DEGRADED : POOL_STARTING;
    p->pct_logged = -1;
    fail_step(p, msg);
    emit(p, POOL_EV_DOWN, msg);
}

/* One worker failed; whether that breaks the group depends on how far it got. */
static void worker_fail(worker *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void worker_fail(worker *w, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pool *p = w->p;
    if (w->st >= W_LOADING) {
        group_fail(p, w, msg);
        return;
    }
    /* Not yet part of a formed group: only this worker retries. Log only when the reason
     * changes, so a worker that is simply not up yet does not flood the log. */
    if (strcmp(w->error, msg) != 0) coord_log("%s (retrying)", msg);
    snprintf(w->error, sizeof w->error, "%s", msg);
    w->backoff_s = w->backoff_s <= 0 ? BACKOFF_MIN_S : fmin(w->backoff_s * 2, BACKOFF_MAX_S);
    set_down(w, w->backoff_s);
}

static int send_msg(worker *w, int type, const ProtobufCMessage *m) {
    char err[256];
    size_t len;
    uint8_t *buf = rpc_frame_pack(type, m, RPC_MAX_FRAME, &len, err, sizeof err);
    if (!buf) {
        worker_fail(w, "worker w%d (%s): %s", w->rank, w->addr, err);
        return -1;
    }
    bufferevent_write(w->bev, buf, len);
    free(buf);
    return 0;
}

/* ---- group formation -------------------------------------------------------------------- */

static void maybe_load(pool *p) {
    for (int i = 0; i < p->n; i++)
        if (p->w[i].st != W_CONNECTED) return;
    coord_log("all %d workers handshaken (model fingerprint %016llx); sending LoadModel", p->n,
         (unsigned long long)p->fingerprint);
    Duet__LoadModel lm = DUET__LOAD_MODEL__INIT;
    lm.max_seqs = p->cfg.max_seqs;
    lm.max_seq_len = p->cfg.max_seq_len;
    lm.block_size = p->cfg.block_size;
    p->pct_logged = -1;
    double t = coord_now_s();
    for (int i = 0; i < p->n; i++) {
        worker *w = &p->w[i];
        w->st = W_LOADING;
        w->load_start = t;
        w->load_done = w->load_total = 0;
    }
    for (int i = 0; i < p->n; i++) {
        worker *w = &p->w[i];
        if (w->st != W_LOADING) return; /* a send failure re-formed the group */
        if (send_msg(w, RPC_LOAD_MODEL, &lm.base)) return;
    }
}

static void log_progress(pool *p, int final) {
    /* a percentage means something only once every loading worker has told its total */
    for (int i = 0; i < p->n && !final; i++)
        if (p->w[i].st == W_LOADING && !p->w[i].load_total) return;
    uint64_t done, total;
    pool_load_progress(p, &done, &total);
    if (!total) return;
    int pct = (int)(100.0 * (double)done / (double)total);
    int dec = pct / 10;
    if (dec <= p->pct_logged && (!final || dec == 10)) return;
    p->pct_logged = dec;
    coord_log("loading: %d%% (%.1f of %.1f MiB over %d workers)", pct, (double)done / 1048576.0,
         (double)total / 1048576.0, p->n);
}

static void maybe_ready(pool *p) {
    for (int i = 0; i < p->n; i++)
        if (p->w[i].st != W_UP) return;
    log_progress(p, 1);
    p->state = POOL_READY;
    p->ever_ready = 1;
    uint64_t bytes = 0;
    for (int i = 0; i < p->n; i++) {
        bytes += p->w[i].weight_bytes;
        p->w[i].error[0] = 0;
        p->w[i].backoff_s = BACKOFF_MIN_S;
    }
    char msg[256];
    snprintf(msg, sizeof msg, "group ready: %d workers, %.1f MiB of weights", p->n,
             (double)bytes / 1048576.0);
    coord_log("%s", msg);
    emit(p, POOL_EV_READY, msg);
}

/* ---- frames from a worker ------------------------------------------------------------ */

static void on_challenge(worker *w, const uint8_t *buf, size_t len) {
    pool *p = w->p;
    Duet__Challenge *c = duet__challenge__unpack(NULL, len, buf);
    if (!c) {
        worker_fail(w, "worker w%d (%s) sent a malformed Challenge", w->rank, w->addr);
        return;
    }
    if (c->protocol_version != RPC_PROTOCOL_VERSION || c->nonce.len < 16) {
        char msg[256];
        if (c->protocol_version != RPC_PROTOCOL_VERSION)
            snprintf(msg, sizeof msg,
                     "worker w%d (%s) speaks protocol version %u, this coordinator %u: run the "
                     "same duet build on every node",
                     w->rank, w->addr, c->protocol_version, RPC_PROTOCOL_VERSION);
        else
            snprintf(msg, sizeof msg, "worker w%d (%s) sent a %zu-byte nonce (need >= 16)",
                     w->rank, w->addr, c->nonce.len);
        duet__challenge__free_unpacked(c, NULL);
        if (!p->ever_ready) fatal(p, msg);
        else worker_fail(w, "%s", msg);
        return;
    }
    uint8_t proof[RPC_PROOF_BYTES];
    rpc_auth_proof(p->token, c->nonce.data, c->nonce.len, proof);
    duet__challenge__free_unpacked(c, NULL);
    Duet__Hello h = DUET__HELLO__INIT;
    h.protocol_version = RPC_PROTOCOL_VERSION;
    h.auth_proof.data = proof;
    h.auth_proof.len = sizeof proof;
    h.rank = (uint32_t)w->rank;
    h.world_size = (uint32_t)p->n;
    h.model_fingerprint = p->fingerprint;
    w->hello_sent = 1;
    send_msg(w, RPC_HELLO, &h.base);
}

static void on_hello_reply(worker *w, const uint8_t *buf, size_t len) {
    pool *p = w->p;
    Duet__HelloReply *r = duet__hello_reply__unpack(NULL, len, buf);
    if (!r) {
        worker_fail(w, "worker w%d (%s) sent a malformed HelloReply", w->rank, w->addr);
        return;
    }
    char msg[600];
    msg[0] = 0;
    if (!r->ok) {
        snprintf(msg, sizeof msg, "worker w%d (%s) refused the handshake: %s", w->rank, w->addr,
                 r->error && r->error[0] ? r->error : "(no reason given)");
    } else if (r->rank != (uint32_t)w->rank || r->world_size != (uint32_t)p->n) {
        snprintf(msg, sizeof msg,
                 "worker at %s is rank %u of %u, but --workers lists it as rank %d of %d: list "
                 "the workers in rank order",
                 w->addr, r->rank, r->world_size, w->rank, p->n);
    } else if (p->fingerprint && r->model_fingerprint != p->fingerprint) {
        snprintf(msg, sizeof msg,
                 "worker w%d (%s) has model fingerprint %016llx, expected %016llx: every worker "
                 "must serve the same checkpoint",
                 w->rank, w->addr, (unsigned long long)r->model_fingerprint,
                 (unsigned long long)p->fingerprint);
    }
    if (msg[0]) {
        duet__hello_reply__free_unpacked(r, NULL);
        /* Before the first start these cannot fix themselves: stop with the reason. */
        if (!p->ever_ready) fatal(p, msg);
        else worker_fail(w, "%s", msg);
        return;
    }
    if (!p->fingerprint) p->fingerprint = r->model_fingerprint;
    w->fingerprint = r->model_fingerprint;
    snprintf(w->backend, sizeof w->backend, "%s", r->backend ? r->backend : "");
    coord_log("worker w%d (%s) handshaken: backend %s, model %s", w->rank, w->addr, w->backend,
         r->model_path ? r->model_path : "?");
    duet__hello_reply__free_unpacked(r, NULL);
    w->st = W_CONNECTED;
    w->error[0] = 0;
    rpc_decoder_set_max(w->dec, RPC_MAX_FRAME);
    maybe_load(p);
}

static void on_progress(worker *w, const uint8_t *buf, size_t len) {
    pool *p = w->p;
    Duet__LoadProgress *m = duet__load_progress__unpack(NULL, len, buf);
    if (!m) {
        worker_fail(w, "worker w%d (%s) sent a malformed LoadProgress", w->rank, w->addr);
        return;
    }
    w->load_done = m->bytes_done;
    w->load_total = m->bytes_total;
    if (m->done) {
        if (!m->ok) {
            char msg[600];
            snprintf(msg, sizeof msg, "worker w%d (%s) could not load the model: %s", w->rank,
                     w->addr, m->error && m->error[0] ? m->error : "(no reason given)");
            duet__load_progress__free_unpacked(m, NULL);
            if (!p->ever_ready) fatal(p, msg);
            else worker_fail(w, "%s", msg);
            return;
        }
        w->weight_bytes = m->rank_weight_bytes;
        w->kv_blocks_total = m->kv_blocks_total;
        w->snap_cost = m->snapshot_block_cost;
        w->kv_block_bytes = m->kv_block_bytes;
        w->kv_blocks_used = 0;
        w->load_done = w->load_total;
        w->st = W_UP;
        set_up_metric(p, w->rank, 1);
        duet__load_progress__free_unpacked(m, NULL);
        maybe_ready(p);
        return;
    }
    duet__load_progress__free_unpacked(m, NULL);
    log_progress(p, 0);
}

static void on_step_result(worker *w, const uint8_t *buf, size_t len) {
    pool *p = w->p;
    Duet__StepResult *r = duet__step_result__unpack(NULL, len, buf);
    if (!r) {
        worker_fail(w, "worker w%d (%s) sent a malformed StepResult", w->rank, w->addr);
        return;
    }
    if (!p->step_active || !w->owes_step || r->step_id != p->step_id) {
        unsigned long long got = (unsigned long long)r->step_id;
        duet__step_result__free_unpacked(r, NULL);
        worker_fail(w, "worker w%d (%s) answered step %llu, which is not in flight", w->rank,
                    w->addr, got);
        return;
    }
    if (!r->ok) {
        char msg[600];
        snprintf(msg, sizeof msg, "worker w%d (%s) failed step %llu: %s", w->rank, w->addr,
                 (unsigned long long)r->step_id, r->error && r->error[0] ? r->error : "?");
        duet__step_result__free_unpacked(r, NULL);
        worker_fail(w, "%s", msg);
        return;
    }
    w->owes_step = 0;
    w->step_ms[w->steps_done % 64] = (coord_now_s() - p->step_start) * 1000.0;
    if (p->cfg.metrics) {
        char l[32];
        snprintf(l, sizeof l, "worker=\"w%d\"", w->rank);
        metrics_observe(p->cfg.metrics, "worker_step_seconds", l,
                        w->step_ms[w->steps_done % 64] / 1000.0);
    }
    if (w->n_step_ms < 64) w->n_step_ms++;
    w->steps_done++;
    w->step_res = r;
    for (int i = 0; i < p->n; i++)
        if (p->w[i].owes_step) return;
    /* Every worker answered: hand rank 0's result over; free the others first so that the
     * callback may start the next step. */
    Duet__StepResult *res0 = p->w[0].step_res;
    p->w[0].step_res = NULL;
    for (int i = 1; i < p->n; i++) {
        duet__step_result__free_unpacked(p->w[i].step_res, NULL);
        p->w[i].step_res = NULL;
    }
    p->step_active = 0;
    pool_step_cb cb = p->step_cb;
    void *arg = p->step_arg;
    p->step_cb = NULL;
    if (cb) cb(arg, 1, res0, NULL);
    duet__step_result__free_unpacked(res0, NULL);
}

static void on_stats(worker *w, const uint8_t *buf, size_t len) {
    Duet__Stats *s = duet__stats__unpack(NULL, len, buf);
    if (!s) {
        worker_fail(w, "worker w%d (%s) sent malformed Stats", w->rank, w->addr);
        return;
    }
    if (s->rank_weight_bytes) w->weight_bytes = s->rank_weight_bytes;
    w->kv_blocks_used = s->kv_blocks_used;
    duet__stats__free_unpacked(s, NULL);
}

/* Returns 0 to go on reading, -1 when the connection was closed. */
static int on_frame(worker *w, int type, const uint8_t *buf, size_t len) {
    struct bufferevent *bev = w->bev;
    w->last_rx = coord_now_s();
    int expected;
    switch (w->st) {
    case W_HANDSHAKE: expected = w->hello_sent ? RPC_HELLO_REPLY : RPC_CHALLENGE; break;
    case W_LOADING: expected = RPC_LOAD_PROGRESS; break;
    case W_UP: expected = RPC_STEP_RESULT; break;
    default: expected = -1; break;
    }
    if (type == RPC_STATS && w->st >= W_CONNECTED) {
        on_stats(w, buf, len);
    } else if (type != expected) {
        worker_fail(w, "worker w%d (%s) sent an unexpected %s frame while %s", w->rank, w->addr,
                    rpc_type_name(type), wstate_names[w->st]);
    } else {
        switch (type) {
        case RPC_CHALLENGE: on_challenge(w, buf, len); break;
        case RPC_HELLO_REPLY: on_hello_reply(w, buf, len); break;
        case RPC_LOAD_PROGRESS: on_progress(w, buf, len); break;
        case RPC_STEP_RESULT: on_step_result(w, buf, len); break;
        default: break;
        }
    }
    return w->bev == bev ? 0 : -1;
}

static void read_cb(struct bufferevent *bev, void *arg) {
    worker *w = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    uint8_t chunk[65536];
    char err[256];
    while (w->bev == bev && evbuffer_get_length(in) > 0) {
        int n = evbuffer_remove(in, chunk, sizeof chunk);
        if (n <= 0) break;
        if (rpc_decoder_feed(w->dec, chunk, (size_t)n, err, sizeof err)) {
            worker_fail(w, "worker w%d (%s) sent a bad frame: %s", w->rank, w->addr, err);
            return;
        }
        int type;
        const uint8_t *payload;
        size_t len;
        while (rpc_decoder_next(w->dec, &type, &payload, &len) == 1)
            if (on_frame(w, type, payload, len)) return;
    }
}

static void event_cb(struct bufferevent *bev, short what, void *arg) {
    worker *w = arg;
    if (what & BEV_EVENT_CONNECTED) {
        int fd = bufferevent_getfd(bev);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        w->st = W_HANDSHAKE;
        return;
    }
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
        int e = EVUTIL_SOCKET_ERROR();
        int dns = bufferevent_socket_get_dns_error(bev);
        char why[256];
        if (dns)
            snprintf(why, sizeof why, "cannot resolve host '%s': %s", w->host,
                     evutil_gai_strerror(dns));
        else if (w->st == W_CONNECTING)
            snprintf(why, sizeof why, "cannot connect: %s", evutil_socket_error_to_string(e));
        else if (what & BEV_EVENT_EOF)
            snprintf(why, sizeof why, "closed the connection");
        else
            snprintf(why, sizeof why, "connection error: %s", evutil_socket_error_to_string(e));
        if (w->st == W_UP && w->owes_step)
            worker_fail(w, "worker w%d (%s) %s during step %llu", w->rank, w->addr, why,
                        (unsigned long long)w->p->step_id);
        else if (w->st == W_CONNECTING)
            worker_fail(w, "worker w%d (%s) %s", w->rank, w->addr, why);
        else
            worker_fail(w, "worker w%d (%s) %s while %s", w->rank, w->addr, why,
                        wstate_names[w->st]);
    }
}

/* ---- the tick: heartbeats and timeouts ---------------------------------------------- */

static void tick_cb(evutil_socket_t fd, short what, void *arg) {
    pool *p = arg;
    double t = coord_now_s();
    if (p->state == POOL_FAILED) return;
    /* start-up deadline: every worker must have answered the handshake */
    if (!p->ever_ready && p->cfg.connect_timeout_s > 0 &&
        t - p->start_time > p->cfg.connect_timeout_s) {
        for (int i = 0; i < p->n; i++) {
            worker *w = &p->w[i];
            if (w->st < W_CONNECTED) {
                char msg[900], last[600];
                if (w->error[0])
                    snprintf(last, sizeof last, "%s", w->error);
                else
                    snprintf(last, sizeof last, "worker w%d (%s) is still %s", w->rank, w->addr,
                             wstate_names[w->st]);
                snprintf(msg, sizeof msg,
                         "%s; gave up after --connect-timeout %.0f s: start the workers first, "
                         "check the address and the firewall",
                         last, p->cfg.connect_timeout_s);
                fatal(p, msg);
                return;
            }
        }
    }
    if (p->step_active && p->cfg.step_timeout_s > 0 &&
        t - p->step_start > p->cfg.step_timeout_s) {
        /* Name every worker that owes the answer with how long it has been silent: a worker
         * waiting in a collective still answers heartbeats, the stuck one does not. Blame the
         * most silent one. */
        char list[600];
        size_t len = 0;
        worker *blame = NULL;
        list[0] = 0;
        for (int i = 0; i < p->n; i++) {
            worker *w = &p->w[i];
            if (!w->owes_step) continue;
            if (!blame || w->last_rx < blame->last_rx) blame = w;
            if (len < sizeof list)
                len += (size_t)snprintf(list + len, sizeof list - len,
                                        "%sw%d (%s, last message %.1f s ago)", len ? ", " : "",
                                        w->rank, w->addr, t - w->last_rx);
        }
        if (blame) {
            worker_fail(blame, "step %llu was not answered within %.1f s by %s",
                        (unsigned long long)p->step_id, p->cfg.step_timeout_s, list);
            return;
        }
    }
    for (int i = 0; i < p->n; i++) {
        worker *w = &p->w[i];
        switch (w->st) {
        case W_DOWN:
            if (t >= w->retry_at) start_connect(w);
            break;
        case W_CONNECTING:
        case W_HANDSHAKE:
            if (t - w->attempt_start > HANDSHAKE_TIMEOUT_S) {
                worker_fail(w, "worker w%d (%s) did not complete the handshake within %.0f s",
                            w->rank, w->addr, HANDSHAKE_TIMEOUT_S);
                return;
            }
            break;
        case W_LOADING:
            if (p->cfg.load_timeout_s > 0 && t - w->load_start > p->cfg.load_timeout_s) {
                worker_fail(w, "worker w%d (%s) did not finish loading within %.0f s", w->rank,
                            w->addr, p->cfg.load_timeout_s);
                return;
            }
            break;
        case W_CONNECTED:
        case W_UP:
            /* A worker busy with a step may not answer heartbeats; the step timeout covers
             * it then. */
            if (!w->owes_step && w->last_rx > 0 && t - w->last_rx > p->cfg.heartbeat_timeout_s) {
                worker_fail(w, "worker w%d (%s) sent nothing for %.1f s (heartbeat timeout)",
                            w->rank, w->addr, t - w->last_rx);
                return;
            }
            if (t - w->last_hb_tx >= p->cfg.heartbeat_s) {
                Duet__Heartbeat hb = DUET__HEARTBEAT__INIT;
                hb.seq = ++w->hb_seq;
                hb.sent_us = (uint64_t)(t * 1e6);
                w->last_hb_tx = t;
                if (send_msg(w, RPC_HEARTBEAT, &hb.base)) return;
            }
            break;
        }
    }
}

/* ---- public API ----------------------------------------------------------------------- */

int pool_new(struct event_base *base, const pool_cfg *cfg, pool_event_cb cb, void *cb_arg,
             pool **out, char *err, size_t errlen) {
    *out = NULL;
    if (cfg->n_workers < 1 || cfg->n_workers > 4096)
        return duet_err(err, errlen, DUET_EINVAL, "--workers: give 1 to 4096 worker addresses");
    if (!cfg->token || strlen(cfg->token) < 16)
        return duet_err(err, errlen, DUET_EINVAL, "the auth token must be at least 16 bytes");
    if (cfg->max_seqs < 1 || cfg->max_seq_len < 1)
        return duet_err(err, errlen, DUET_EINVAL, "max_seqs and max_seq_len must be positive");
    pool *p = xcalloc(1, sizeof *p);
    p->base = base;
    p->cfg = *cfg;
    if (p->cfg.heartbeat_s <= 0) p->cfg.heartbeat_s = 1;
    if (p->cfg.heartbeat_timeout_s <= 0) p->cfg.heartbeat_timeout_s = 5;
    p->cfg.addrs = NULL;
    p->cfg.token = NULL;
    p->token = xstrdup(cfg->token);
    p->n = cfg->n_workers;
    p->w = xcalloc((size_t)p->n, sizeof *p->w);
    p->fingerprint = cfg->fingerprint;
    p->pct_logged = -1;
    for (int i = 0; i < p->n; i++) {
        worker *w = &p->w[i];
        w->p = p;
        w->rank = i;
        w->addr = xstrdup(cfg->addrs[i]);
        w->st = W_DOWN;
        w->backoff_s = BACKOFF_MIN_S;
        int rc = split_addr(w->addr, &w->host, &w->port, err, errlen);
        if (rc) {
            pool_free(p);
            return rc;
        }
        for (int j = 0; j < i; j++)
            if (!strcmp(p->w[j].addr, w->addr)) {
                int r2 = duet_err(err, errlen, DUET_EINVAL,
                                  "--workers lists %s twice (ranks %d and %d)", w->addr, j, i);
                pool_free(p);
                return r2;
            }
    }
    p->state = POOL_STARTING;
    p->start_time = coord_now_s();
    p->tick = event_new(base, -1, EV_PERSIST, tick_cb, p);
    struct timeval tv = {0, TICK_MS * 1000};
    event_add(p->tick, &tv);
    p->cb = cb;
    p->cb_arg = cb_arg;
    for (int i = 0; i < p->n; i++) set_up_metric(p, i, 0);
    for (int i = 0; i < p->n; i++) start_connect(&p->w[i]);
    *out = p;
    return 0;
}

void pool_free(pool *p) {
    if (!p) return;
    if (p->tick) event_free(p->tick);
    for (int i = 0; i < p->n; i++) {
        close_conn(&p->w[i]);
        free(p->w[i].addr);
        free(p->w[i].host);
    }
    free(p->w);
    free(p->token);
    free(p);
}

pool_state pool_get_state(const pool *p) { return p->state; }

const char *pool_state_name(pool_state s) {
    switch (s) {
    case POOL_STARTING: return "starting";
    case POOL_READY: return "ready";
    case POOL_DEGRADED: return "degraded";
    case POOL_FAILED: return "failed";
    }
    return "?";
}

int pool_can_step(const pool *p) { return p->state == POOL_READY && !p->step_active; }

int pool_step(pool *p, Duet__StepPlan *plan, pool_step_cb cb, void *arg, char *err,
              size_t errlen) {
    if (p->state != POOL_READY)
        return duet_err(err, errlen, DUET_EINVAL, "the worker group is not ready (%s)",
                        pool_state_name(p->state));
    if (p->step_active)
        return duet_err(err, errlen, DUET_EINVAL, "step %llu is still in flight",
                        (unsigned long long)p->step_id);
    plan->step_id = p->step_id + 1;
    size_t len;
    uint8_t *buf = rpc_frame_pack(RPC_STEP_PLAN, &plan->base, RPC_MAX_FRAME, &len, err, errlen);
    if (!buf) return DUET_ENOMEM;
    p->step_id++;
    p->step_active = 1;
    p->step_start = coord_now_s();
    p->step_cb = cb;
    p->step_arg = arg;
    for (int i = 0; i < p->n; i++) p->w[i].owes_step = 1;
    for (int i = 0; i < p->n; i++) bufferevent_write(p->w[i].bev, buf, len);
    free(buf);
    return 0;
}

void pool_release(pool *p, const uint64_t *seq_ids, size_t n) {
    if (!n) return;
    Duet__Release r = DUET__RELEASE__INIT;
    r.n_seq_ids = n;
    r.seq_ids = (uint64_t *)seq_ids;
    for (int i = 0; i < p->n; i++) {
        worker *w = &p->w[i];
        if (w->st == W_UP && send_msg(w, RPC_RELEASE, &r.base)) return;
    }
}

void pool_release_blocks(pool *p, const uint64_t *block_ids, size_t n) {
    if (!n) return;
    Duet__Release r = DUET__RELEASE__INIT;
    r.n_block_ids = n;
    r.block_ids = (uint64_t *)block_ids;
    for (int i = 0; i < p->n; i++) {
        worker *w = &p->w[i];
        if (w->st == W_UP && send_msg(w, RPC_RELEASE, &r.base)) return;
    }
}

void pool_kv_budget(const pool *p, uint32_t *blocks, uint32_t *snap_cost, uint64_t *block_bytes) {
    *blocks = UINT32_MAX;
    *snap_cost = 1;
    *block_bytes = 0;
    for (int i = 0; i < p->n; i++) {
        const worker *w = &p->w[i];
        if (w->kv_blocks_total < *blocks) *blocks = w->kv_blocks_total;
        if (w->snap_cost > *snap_cost) *snap_cost = w->snap_cost;
        if (w->kv_block_bytes > *block_bytes) *block_bytes = w->kv_block_bytes;
    }
    if (*blocks == UINT32_MAX) *blocks = 0;
}

void pool_kick(pool *p) {
    double t = coord_now_s();
    for (int i = 0; i < p->n; i++)
        if (p->w[i].st == W_DOWN && p->w[i].retry_at != INFINITY) {
            p->w[i].retry_at = t;
            p->w[i].backoff_s = BACKOFF_MIN_S;
        }
}

void pool_load_progress(const pool *p, uint64_t *done, uint64_t *total) {
    *done = *total = 0;
    for (int i = 0; i < p->n; i++) {
        const worker *w = &p->w[i];
        if (w->st == W_LOADING || w->st == W_UP) {
            *done += w->st == W_UP ? w->load_total : w->load_done;
            *total += w->load_total;
        }
    }
}

uint64_t pool_fingerprint(const pool *p) { return p->fingerprint; }

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

json_t *pool_workers_json(const pool *p) {
    json_t *arr = json_array();
    double t = coord_now_s();
    for (int i = 0; i < p->n; i++) {
        const worker *w = &p->w[i];
        char name[16];
        snprintf(name, sizeof name, "w%d", i);
        json_t *o = json_object();
        json_object_set_new(o, "name", json_string(name));
        json_object_set_new(o, "addr", json_string(w->addr));
        json_object_set_new(o, "rank", json_integer(i));
        json_object_set_new(o, "state", json_string(wstate_names[w->st]));
        json_object_set_new(o, "last_heartbeat_ms",
                            w->st >= W_CONNECTED && w->last_rx > 0
                                ? json_integer((json_int_t)((t - w->last_rx) * 1000))
                                : json_null());
        json_object_set_new(o, "rank_weight_bytes", json_integer((json_int_t)w->weight_bytes));
        json_object_set_new(o, "steps_done", json_integer((json_int_t)w->steps_done));
        if (w->n_step_ms) {
            double v[64];
            memcpy(v, w->step_ms, sizeof v);
            qsort(v, (size_t)w->n_step_ms, sizeof *v, cmp_double);
            json_object_set_new(o, "step_ms_p50", json_real(v[w->n_step_ms / 2]));
        } else {
            json_object_set_new(o, "step_ms_p50", json_null());
        }
        json_object_set_new(o, "backend", json_string(w->backend));
        json_object_set_new(o, "kv_blocks_used", json_integer((json_int_t)w->kv_blocks_used));
        json_object_set_new(o, "kv_blocks_total", json_integer((json_int_t)w->kv_blocks_total));
        if (w->st == W_LOADING && w->load_total)
            json_object_set_new(o, "load_percent",
                                json_real(100.0 * (double)w->load_done / (double)w->load_total));
        json_object_set_new(o, "error", w->error[0] ? json_string(w->error) : json_null());
        json_array_append_new(arr, o);
    }
    return arr;
}
