/* rpc_client.c — blocking test client of the worker protocol and worker process handle
 * (rpc_client.h). Test code only; every wait is poll() with a deadline, never a sleep.
 */
#include "tests/rpc/rpc_client.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/err.h"

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

static int left_ms(long long deadline) {
    long long l = deadline - now_ms();
    return l < 0 ? 0 : (int)l;
}

/* ---- client ------------------------------------------------------------------------------ */

int rcli_connect(rcli *c, int port, int timeout_ms) {
    c->dec = NULL;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (c->fd < 0) return -1;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0) {
        if (errno != EINPROGRESS) goto fail;
        struct pollfd pf = {c->fd, POLLOUT, 0};
        if (poll(&pf, 1, timeout_ms) != 1) goto fail;
        int e = 0;
        socklen_t el = sizeof e;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &e, &el);
        if (e) goto fail;
    }
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) & ~O_NONBLOCK);
    c->dec = rpc_decoder_new(RPC_MAX_FRAME);
    return 0;
fail:
    close(c->fd);
    c->fd = -1;
    return -1;
}

void rcli_close(rcli *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    rpc_decoder_free(c->dec);
    c->dec = NULL;
}

int rcli_send_raw(rcli *c, const void *p, size_t n) {
    const uint8_t *b = p;
    while (n) {
        ssize_t w = send(c->fd, b, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

int rcli_send(rcli *c, int type, const ProtobufCMessage *m) {
    char err[256];
    size_t n;
    uint8_t *f = rpc_frame_pack(type, m, RPC_MAX_FRAME, &n, err, sizeof err);
    if (!f) return -1;
    int rc = rcli_send_raw(c, f, n);
    free(f);
    return rc;
}

int rcli_recv(rcli *c, int timeout_ms, int *type, uint8_t **payload, size_t *len) {
    long long deadline = now_ms() + timeout_ms;
    for (;;) {
        const uint8_t *p;
        if (rpc_decoder_next(c->dec, type, &p, len)) {
            *payload = xmalloc(*len ? *len : 1);
            memcpy(*payload, p, *len);
            return 1;
        }
        struct pollfd pf = {c->fd, POLLIN, 0};
        int r = poll(&pf, 1, left_ms(deadline));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        uint8_t buf[65536];
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n == 0 || (n < 0 && errno == ECONNRESET)) return 0;
        if (n < 0) return -1;
        char err[256];
        if (rpc_decoder_feed(c->dec, buf, (size_t)n, err, sizeof err)) return -1;
    }
}

int rcli_wait_closed(rcli *c, int timeout_ms) {
    long long deadline = now_ms() + timeout_ms;
    for (;;) {
        struct pollfd pf = {c->fd, POLLIN, 0};
        int r = poll(&pf, 1, left_ms(deadline));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return 0;
        uint8_t buf[65536];
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n == 0 || (n < 0 && errno == ECONNRESET)) return 1;
        if (n < 0 && errno != EINTR) return 0;
    }
}

void *rcli_expect(rcli *c, int type, int timeout_ms) {
    int t;
    uint8_t *p;
    size_t n;
    if (rcli_recv(c, timeout_ms, &t, &p, &n) != 1) return NULL;
    void *m = NULL;
    if (t == type) {
        switch (type) {
        case RPC_CHALLENGE: m = duet__challenge__unpack(NULL, n, p); break;
        case RPC_HELLO_REPLY: m = duet__hello_reply__unpack(NULL, n, p); break;
        case RPC_LOAD_PROGRESS: m = duet__load_progress__unpack(NULL, n, p); break;
        case RPC_STEP_RESULT: m = duet__step_result__unpack(NULL, n, p); break;
        case RPC_STATS: m = duet__stats__unpack(NULL, n, p); break;
        default: break;
        }
    } else {
        fprintf(stderr, "rpc_client: expected %s, got %s\n", rpc_type_name(type),
                rpc_type_name(t));
    }
    free(p);
    return m;
}

Duet__HelloReply *rcli_handshake(rcli *c, const char *token, uint32_t version, uint32_t rank,
                                 uint32_t world, uint64_t fingerprint, int timeout_ms) {
    Duet__Challenge *ch = rcli_expect(c, RPC_CHALLENGE, timeout_ms);
    if (!ch) return NULL;
    uint8_t proof[RPC_PROOF_BYTES];
    rpc_auth_proof(token, ch->nonce.data, ch->nonce.len, proof);
    duet__challenge__free_unpacked(ch, NULL);
    Duet__Hello h = DUET__HELLO__INIT;
    h.protocol_version = version;
    h.auth_proof.data = proof;
    h.auth_proof.len = sizeof proof;
    h.rank = rank;
    h.world_size = world;
    h.model_fingerprint = fingerprint;
    if (rcli_send(c, RPC_HELLO, &h.base)) return NULL;
    return rcli_expect(c, RPC_HELLO_REPLY, timeout_ms);
}

/* ---- worker process ---------------------------------------------------------------------- */

static void log_append(wproc *p, const char *b, size_t n) {
    if (n > sizeof p->log - 1) b += n - (sizeof p->log - 1), n = sizeof p->log - 1;
    if (p->log_len + n > sizeof p->log - 1) {
        size_t drop = p->log_len + n - (sizeof p->log - 1);
        memmove(p->log, p->log + drop, p->log_len - drop);
        p->log_len -= drop;
        p->log_seen = p->log_seen > drop ? p->log_seen - drop : 0;
    }
    memcpy(p->log + p->log_len, b, n);
    p->log_len += n;
    p->log[p->log_len] = 0;
}

/* Reads whatever is available on stdout/stderr within timeout. Returns 0 on EOF of both. */
static int pump(wproc *p, int timeout_ms, char *out, size_t *out_len, size_t out_cap) {
    struct pollfd pf[2] = {{p->err_fd, POLLIN, 0}, {p->out_fd, POLLIN, 0}};
    int n = 0;
    if (p->err_fd >= 0) n++;
    if (p->out_fd >= 0) n++;
    if (!n) return 0;
    if (p->err_fd < 0) pf[0].fd = -1;
    if (p->out_fd < 0) pf[1].fd = -1;
    int r = poll(pf, 2, timeout_ms);
    if (r <= 0) return 1;
    char buf[4096];
    for (int i = 0; i < 2; i++) {
        if (pf[i].fd < 0 || !(pf[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        ssize_t k = read(pf[i].fd, buf, sizeof buf);
        if (k <= 0) {
            close(pf[i].fd);
            if (i == 0) p->err_fd = -1; else p->out_fd = -1;
            continue;
        }
        if (i == 0) {
            log_append(p, buf, (size_t)k);
            fwrite(buf, 1, (size_t)k, stderr); /* the worker's log, in the test's log */
        } else if (out) {
            size_t m = (size_t)k < out_cap - 1 - *out_len ? (size_t)k : out_cap - 1 - *out_len;
            memcpy(out + *out_len, buf, m);
            *out_len += m;
            out[*out_len] = 0;
        }
    }
    return 1;
}

int wproc_start(wproc *p, const char *bin, const char *const *argv, int timeout_ms) {
    memset(p, 0, sizeof *p);
    p->out_fd = p->err_fd = -1;
    int o[2], e[2];
    if (pipe2(o, O_CLOEXEC) || pipe2(e, O_CLOEXEC)) return -1;
    int n = 0;
    while (argv[n]) n++;
    const char **av = xcalloc((size_t)n + 2, sizeof *av);
    av[0] = bin;
    for (int i = 0; i < n; i++) av[i + 1] = argv[i];
    p->pid = fork();
    if (p->pid < 0) return -1;
    if (p->pid == 0) {
        dup2(o[1], 1);
        dup2(e[1], 2);
        execv(bin, (char *const *)av);
        _exit(127);
    }
    free(av);
    close(o[1]);
    close(e[1]);
    p->out_fd = o[0];
    p->err_fd = e[0];
    long long deadline = now_ms() + timeout_ms;
    char out[512] = "";
    size_t out_len = 0;
    while (left_ms(deadline) > 0) {
        char *l = strstr(out, "listening on ");
        char *nl = l ? strchr(l, '\n') : NULL;
        if (nl) {
            char *colon = strrchr(l, ':');
            p->port = colon ? atoi(colon + 1) : 0;
            return p->port > 0 ? 0 : -1;
        }
        if (!pump(p, left_ms(deadline), out, &out_len, sizeof out)) break;
    }
    return -1;
}

int wproc_wait_log(wproc *p, const char *needle, int timeout_ms) {
    long long deadline = now_ms() + timeout_ms;
    for (;;) {
        char *hit = strstr(p->log + p->log_seen, needle);
        if (hit) {
            char *nl = strchr(hit, '\n');
            if (nl) {
                p->log_seen = (size_t)(nl + 1 - p->log);
                return 1;
            }
        }
        if (left_ms(deadline) == 0) return 0;
        if (!pump(p, left_ms(deadline), NULL, NULL, 0)) {
            /* EOF: a final check happens on the next loop turn only if data arrived */
            hit = strstr(p->log + p->log_seen, needle);
            return hit != NULL;
        }
    }
}

int wproc_stop(wproc *p, int sig, int timeout_ms) {
    if (p->pid <= 0) return -1;
    if (sig) kill(p->pid, sig);
    long long deadline = now_ms() + timeout_ms;
    /* the pipes reach EOF when the process has exited */
    while ((p->err_fd >= 0 || p->out_fd >= 0) && left_ms(deadline) > 0)
        pump(p, left_ms(deadline), NULL, NULL, 0);
    int st = -1;
    if (p->err_fd >= 0 || p->out_fd >= 0) {
        kill(p->pid, SIGKILL);
        waitpid(p->pid, &st, 0);
        st = -1;
    } else {
        waitpid(p->pid, &st, 0);
    }
    if (p->err_fd >= 0) close(p->err_fd);
    if (p->out_fd >= 0) close(p->out_fd);
    p->err_fd = p->out_fd = -1;
    p->pid = 0;
    return st;
}
