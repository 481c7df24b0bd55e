/* comm_tcp.c — the TCP backend of comm.h: a full mesh of sockets between worker ranks.
 *
 * Why: CPU workers, tests and CI need a data plane with no special hardware. Every rank holds
 * one socket per peer; each collective is an exchange in which all sends and receives progress
 * together under poll(), so no ordering of large messages can deadlock. Reductions sum the
 * ranks' buffers in rank order 0..N-1 on every rank, so every rank ends with bit-identical
 * values — the ranks' replicated state (the residual streams) must never drift apart.
 * Any peer failure or timeout makes the comm unusable; the caller re-forms it.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/err.h"
#include "worker/comm.h"

enum { HANDSHAKE_MAGIC = 0x64756574 /* "duet" */ };

typedef struct {
    comm base;
    int *fd;          /* [world], -1 for self */
    int io_timeout_ms;
    int broken;
    float *scratch;   /* reduction buffers: [world][n] */
    size_t scratch_n;
} comm_tcp;

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int split_hostport(const char *s, char *host, size_t hcap, char *port, size_t pcap) {
    const char *c = strrchr(s, ':');
    if (!c || c == s || !c[1] || (size_t)(c - s) >= hcap || strlen(c + 1) >= pcap) return -1;
    memcpy(host, s, (size_t)(c - s));
    host[c - s] = 0;
    strcpy(port, c + 1);
    return 0;
}

static struct addrinfo *resolve(const char *hp, int passive, char *err, size_t errlen) {
    char host[256], port[16];
    if (split_hostport(hp, host, sizeof host, port, sizeof port))
        return duet_err(err, errlen, DUET_EINVAL, "peer address '%s' is not HOST:PORT", hp), NULL;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = passive ? AI_PASSIVE : 0}, *ai = NULL;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc) duet_err(err, errlen, DUET_EINVAL, "peer address '%s': %s", hp, gai_strerror(rc));
    return rc ? NULL : ai;
}

static void tune(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* Blocking-with-deadline exact read/write on a non-blocking fd. */
static int io_all(int fd, void *buf, size_t n, int writing, int64_t deadline) {
    uint8_t *p = buf;
    while (n) {
        ssize_t k = writing ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (k > 0) {
            p += k;
            n -= (size_t)k;
            continue;
        }
        if (k == 0 && !writing) return DUET_EIO;
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return DUET_EIO;
        int left = (int)(deadline - now_ms());
        if (left <= 0) return DUET_EIO;
        struct pollfd pf = {fd, writing ? POLLOUT : POLLIN, 0};
        poll(&pf, 1, left);
    }
    return 0;
}

/* ---- mesh formation ---------------------------------------------------------------------- */

static int listen_on(const char *hp, char *err, size_t errlen) {
    struct addrinfo *ai = resolve(hp, 1, err, errlen);
    if (!ai) return DUET_EINVAL;
    int fd = socket(ai->ai_family, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) || listen(fd, 64)) {
        int e = errno;
        if (fd >= 0) close(fd);
        freeaddrinfo(ai);
        return duet_err(err, errlen, DUET_EIO, "data plane: cannot listen on %s: %s", hp,
                        strerror(e));
    }
    freeaddrinfo(ai);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static int connect_to(const char *hp, int64_t deadline, char *err, size_t errlen) {
    for (;;) {
        struct addrinfo *ai = resolve(hp, 0, err, errlen);
        if (!ai) return DUET_EINVAL;
        int fd = socket(ai->ai_family, SOCK_STREAM, 0);
        int ok = fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) == 0;
        int e = errno;
        freeaddrinfo(ai);
        if (ok) return fd;
        if (fd >= 0) close(fd);
        if (now_ms() >= deadline)
            return duet_err(err, errlen, DUET_EIO, "data plane: cannot reach peer %s: %s", hp,
                            strerror(e));
        struct timespec ts = {0, 50 * 1000000}; /* retry pace while the peer starts */
        nanosleep(&ts, NULL);
    }
}

static void tcp_destroy(comm *c) {
    comm_tcp *t = (comm_tcp *)c;
    for (int i = 0; i < c->world; i++)
        if (t->fd[i] >= 0) close(t->fd[i]);
    free(t->fd);
    free(t->scratch);
    free(t);
}

/* ---- exchange: every rank sends sbuf[j] to j and receives rbuf[j] from j at once ---------- */

static int exchange(comm_tcp *t, const uint8_t *const *sbuf, const size_t *slen,
                    uint8_t *const *rbuf, const size_t *rlen, char *err, size_t errlen) {
    int W = t->base.world, me = t->base.rank;
    if (t->broken) return duet_err(err, errlen, DUET_EIO, "data plane is broken after an earlier error");
    size_t *sent = xcalloc((size_t)W, sizeof *sent), *got = xcalloc((size_t)W, sizeof *got);
    struct pollfd *pf = xcalloc((size_t)W, sizeof *pf);
    int64_t last = now_ms();
    int rc = 0;
    for (;;) {
        int n = 0, idle = 1;
        for (int j = 0; j < W; j++) {
            if (j == me) continue;
            short ev = (short)((sent[j] < slen[j] ? POLLOUT : 0) | (got[j] < rlen[j] ? POLLIN : 0));
            if (!ev) continue;
            pf[n++] = (struct pollfd){t->fd[j], ev, 0};
        }
        if (!n) break;
        int left = (int)(last + t->io_timeout_ms - now_ms());
        if (left <= 0 || poll(pf, (nfds_t)n, left) < 0) {
            if (left > 0 && errno == EINTR) continue;
            rc = duet_err(err, errlen, DUET_EIO,
                          "data plane: rank %d heard nothing from its peers for %d ms", me,
                          t->io_timeout_ms);
            break;
        }
        for (int j = 0; j < W && !rc; j++) {
            if (j == me) continue;
            if (sent[j] < slen[j]) {
                ssize_t k = send(t->fd[j], sbuf[j] + sent[j], slen[j] - sent[j], MSG_NOSIGNAL);
                if (k > 0) sent[j] += (size_t)k, idle = 0;
                else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                    rc = duet_err(err, errlen, DUET_EIO, "data plane: send to rank %d failed: %s",
                                  j, strerror(errno));
            }
            if (!rc && got[j] < rlen[j]) {
                ssize_t k = recv(t->fd[j], rbuf[j] + got[j], rlen[j] - got[j], 0);
                if (k > 0) got[j] += (size_t)k, idle = 0;
                else if (k == 0)
                    rc = duet_err(err, errlen, DUET_EIO, "data plane: rank %d closed the connection", j);
                else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                    rc = duet_err(err, errlen, DUET_EIO, "data plane: receive from rank %d failed: %s",
                                  j, strerror(errno));
            }
        }
        if (rc) break;
        if (!idle) last = now_ms();
    }
    if (rc) t->broken = 1;
    free(sent);
    free(got);
    free(pf);
    return rc;
}

static int tcp_allreduce(comm *c, float *buf, size_t n, char *err, size_t errlen) {
    comm_tcp *t = (comm_tcp *)c;
    int W = c->world, me = c->rank;
    if (W == 1 || n == 0) return 0;
    if (t->scratch_n < n) {
        free(t->scratch);
        t->scratch = xmalloc((size_t)W * n * sizeof *t->scratch);
        t->scratch_n = n;
    }
    const uint8_t **s = xmalloc((size_t)W * sizeof *s);
    uint8_t **r = xmalloc((size_t)W * sizeof *r);
    size_t *len = xmalloc((size_t)W * sizeof *len);
    for (int j = 0; j < W; j++) {
        s[j] = (const uint8_t *)buf;
        r[j] = (uint8_t *)(t->scratch + (size_t)j * n);
        len[j] = j == me ? 0 : n * sizeof(float);
    }
    int rc = exchange(t, s, len, r, len, err, errlen);
    if (!rc) {
        memcpy(t->scratch + (size_t)me * n, buf, n * sizeof *buf);
        for (size_t i = 0; i < n; i++) { /* rank order: identical on every rank */
            float acc = t->scratch[i];
            for (int j = 1; j < W; j++) acc += t->scratch[(size_t)j * n + i];
            buf[i] = acc;
        }
    }
    free(s);
    free(r);
    free(len);
    return rc;
}

static int tcp_allgather(comm *c, const void *send, size_t bytes, void *recv, char *err,
                         size_t errlen) {
    int W = c->world, me = c->rank;
    memcpy((uint8_t *)recv + (size_t)me * bytes, send, bytes);
    if (W == 1) return 0;
    const uint8_t **s = xmalloc((size_t)W * sizeof *s);
    uint8_t **r = xmalloc((size_t)W * sizeof *r);
    size_t *len = xmalloc((size_t)W * sizeof *len);
    for (int j = 0; j < W; j++) {
        s[j] = send;
        r[j] = (uint8_t *)recv + (size_t)j * bytes;
        len[j] = j == me ? 0 : bytes;
    }
    int rc = exchange((comm_tcp *)c, s, len, r, len, err, errlen);
    free(s);
    free(r);
    free(len);
    return rc;
}

static int tcp_alltoallv(comm *c, const void *send, const size_t *send_bytes,
                         const size_t *send_off, void *recv, const size_t *recv_bytes,
                         const size_t *recv_off, char *err, size_t errlen) {
    int W = c->world, me = c->rank;
    memcpy((uint8_t *)recv + recv_off[me], (const uint8_t *)send + send_off[me], send_bytes[me]);
    if (W == 1) return 0;
    const uint8_t **s = xmalloc((size_t)W * sizeof *s);
    uint8_t **r = xmalloc((size_t)W * sizeof *r);
    size_t *sl = xmalloc((size_t)W * sizeof *sl), *rl = xmalloc((size_t)W * sizeof *rl);
    for (int j = 0; j < W; j++) {
        s[j] = (const uint8_t *)send + send_off[j];
        r[j] = (uint8_t *)recv + recv_off[j];
        sl[j] = j == me ? 0 : send_bytes[j];
        rl[j] = j == me ? 0 : recv_bytes[j];
    }
    int rc = exchange((comm_tcp *)c, s, sl, r, rl, err, errlen);
    free(s);
    free(r);
    free(sl);
    free(rl);
    return rc;
}

static int tcp_broadcast(comm *c, void *buf, size_t bytes, int root, char *err, size_t errlen) {
    int W = c->world, me = c->rank;
    if (W == 1) return 0;
    const uint8_t **s = xmalloc((size_t)W * sizeof *s);
    uint8_t **r = xmalloc((size_t)W * sizeof *r);
    size_t *sl = xcalloc((size_t)W, sizeof *sl), *rl = xcalloc((size_t)W, sizeof *rl);
    for (int j = 0; j < W; j++) {
        s[j] = buf;
        r[j] = buf;
        if (me == root && j != me) sl[j] = bytes;
        if (me != root && j == root) rl[j] = bytes;
    }
    int rc = exchange((comm_tcp *)c, s, sl, r, rl, err, errlen);
    free(s);
    free(r);
    free(sl);
    free(rl);
    return rc;
}

static const struct comm_ops tcp_ops = {
    .allreduce_sum = tcp_allreduce,
    .allgather = tcp_allgather,
    .alltoallv = tcp_alltoallv,
    .broadcast = tcp_broadcast,
    .destroy = tcp_destroy,
};

int comm_tcp_create(int rank, int world, const char *const *peers, int timeout_ms, comm **out,
                    char *err, size_t errlen) {
    *out = NULL;
    if (world < 1 || rank < 0 || rank >= world)
        return duet_err(err, errlen, DUET_EINVAL, "data plane: rank %d is outside world size %d",
                        rank, world);
    comm_tcp *t = xcalloc(1, sizeof *t);
    t->base.ops = &tcp_ops;
    t->base.rank = rank;
    t->base.world = world;
    t->io_timeout_ms = timeout_ms > 0 ? timeout_ms : 60000;
    t->fd = xmalloc((size_t)world * sizeof *t->fd);
    for (int i = 0; i < world; i++) t->fd[i] = -1;
    if (world == 1) {
        *out = &t->base;
        return 0;
    }
    int64_t deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 60000);
    int lfd = -1, rc = 0;
    if (rank < world - 1) { /* higher ranks connect to us */
        lfd = listen_on(peers[rank], err, errlen);
        if (lfd < 0) rc = lfd;
    }
    /* connect to every lower rank and introduce ourselves */
    for (int j = 0; j < rank && !rc; j++) {
        int fd = connect_to(peers[j], deadline, err, errlen);
        if (fd < 0) { rc = fd; break; }
        tune(fd);
        uint32_t hello[3] = {HANDSHAKE_MAGIC, (uint32_t)rank, (uint32_t)world};
        if (io_all(fd, hello, sizeof hello, 1, deadline)) {
            close(fd);
            rc = duet_err(err, errlen, DUET_EIO, "data plane: handshake with rank %d failed", j);
            break;
        }
        t->fd[j] = fd;
    }
    /* accept every higher rank */
    for (int need = world - 1 - rank; need > 0 && !rc;) {
        int left = (int)(deadline - now_ms());
        struct pollfd pf = {lfd, POLLIN, 0};
        if (left <= 0 || poll(&pf, 1, left) <= 0) {
            rc = duet_err(err, errlen, DUET_EIO,
                          "data plane: rank %d waited %d ms for %d higher rank(s) to connect",
                          rank, timeout_ms, need);
            break;
        }
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) continue;
        tune(fd);
        uint32_t hello[3];
        if (io_all(fd, hello, sizeof hello, 0, now_ms() + 5000) || hello[0] != HANDSHAKE_MAGIC ||
            hello[2] != (uint32_t)world || hello[1] <= (uint32_t)rank ||
            hello[1] >= (uint32_t)world || t->fd[hello[1]] >= 0) {
            fprintf(stderr, "duet data plane[%d]: refused a connection that is not a peer of "
                            "this world\n", rank);
            close(fd);
            continue;
        }
        t->fd[hello[1]] = fd;
        need--;
    }
    if (lfd >= 0) close(lfd);
    if (rc) {
        tcp_destroy(&t->base);
        return rc;
    }
    *out = &t->base;
    return 0;
}
