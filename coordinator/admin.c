/* admin.c — the admin socket: path rules, permissions, peer check, line-delimited JSON.
 *
 * Why it is shaped this way: spec/server-api.md §12 fixes the transport exactly, so this file
 * is that paragraph in code, and nothing else: what a command does belongs to the handler the
 * coordinator passes in. Requests on one connection are answered strictly in order: while one
 * is being handled (a `drain --wait` or a `generate` may take long) later lines wait in the
 * input buffer. A request outlives its connection when the client goes away mid-request; the
 * handler's late answer is then dropped.
 *
 * What it must never do: answer or even read from a peer that is neither our uid nor root,
 * remove a socket file that still has a listener behind it, follow a symlink for the socket
 * directory, or close a connection because of one malformed line.
 */
#include "coordinator/admin.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/listener.h>

#include "common/err.h"

typedef struct conn {
    admin *a;
    struct bufferevent *bev;  /* NULL once closed */
    int busy;                 /* a request is being handled */
    int in_process;           /* inside process_lines (no recursion) */
    int refused;              /* an over-long line was refused: no more lines, then close */
    int eof;                  /* the client half-closed: answer what it sent, then close */
    int refs;                 /* 1 for the open connection + 1 per pending request */
    struct conn *prev, *next;
} conn;

struct admin_req {
    conn *c;
    json_t *id;
};

struct admin {
    struct event_base *base;
    char *path;
    struct evconnlistener *lis;
    conn *conns;
    int n_conns;
    admin_handler fn;
    void *ctx;
};

/* ---- socket path ------------------------------------------------------------------------ */

int admin_default_path(char *out, size_t cap, char *err, size_t errlen) {
    struct stat st;
    int n;
    if (stat("/run/duet", &st) == 0 && S_ISDIR(st.st_mode) && access("/run/duet", W_OK) == 0) {
        n = snprintf(out, cap, "/run/duet/admin.sock");
    } else {
        const char *xdg = getenv("XDG_RUNTIME_DIR");
        if (xdg && xdg[0] == '/')
            n = snprintf(out, cap, "%s/duet/admin.sock", xdg);
        else
            n = snprintf(out, cap, "/tmp/duet-%u/admin.sock", (unsigned)geteuid());
    }
    if (n < 0 || (size_t)n >= cap)
        return duet_err(err, errlen, DUET_EINVAL, "the default admin socket path is too long");
    return 0;
}

/* The socket's directory: created 0700, or an existing directory of ours that nobody else can
 * write to. */
static int prepare_dir(const char *path, char *err, size_t errlen) {
    char dir[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
    const char *slash = strrchr(path, '/');
    if (!slash) return 0; /* relative name in the cwd */
    size_t dl = (size_t)(slash - path);
    if (dl == 0) return 0;
    memcpy(dir, path, dl);
    dir[dl] = 0;
    if (mkdir(dir, 0700) == 0) return 0;
    if (errno != EEXIST)
        return duet_err(err, errlen, DUET_EIO, "cannot create the admin socket directory %s: %s",
                        dir, strerror(errno));
    struct stat st;
    if (lstat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return duet_err(err, errlen, DUET_EINVAL,
                        "%s is not a directory (a symlink is not accepted): choose another "
                        "--admin-socket",
                        dir);
    if (st.st_uid != geteuid())
        return duet_err(err, errlen, DUET_EINVAL,
                        "the admin socket directory %s belongs to uid %u, not to us (uid %u): "
                        "choose another --admin-socket",
                        dir, (unsigned)st.st_uid, (unsigned)geteuid());
    if (st.st_mode & 0022)
        return duet_err(err, errlen, DUET_EINVAL,
                        "the admin socket directory %s is writable by others (mode %03o): "
                        "chmod 700 it or choose another --admin-socket",
                        dir, (unsigned)(st.st_mode & 0777));
    return 0;
}

static int remove_stale(const char *path, const struct sockaddr_un *sa, char *err,
                        size_t errlen) {
    struct stat st;
    if (lstat(path, &st) != 0) return 0;
    if (!S_ISSOCK(st.st_mode))
        return duet_err(err, errlen, DUET_EINVAL,
                        "%s exists and is not a socket: remove it or choose another "
                        "--admin-socket",
                        path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return duet_err(err, errlen, DUET_EIO, "socket(): %s", strerror(errno));
    int rc = connect(fd, (const struct sockaddr *)sa, sizeof *sa);
    close(fd);
    if (rc == 0)
        return duet_err(err, errlen, DUET_EINVAL,
                        "another coordinator is listening on %s: stop it or choose another "
                        "--admin-socket",
                        path);
    if (unlink(path) != 0 && errno != ENOENT)
        return duet_err(err, errlen, DUET_EIO, "cannot remove the stale socket %s: %s", path,
                        strerror(errno));
    return 0;
}

/* ---- connections ------------------------------------------------------------------------- */

static void conn_unref(conn *c) {
    if (--c->refs == 0) free(c);
}

static void conn_close(conn *c) {
    if (!c->bev) return;
    bufferevent_free(c->bev);
    c->bev = NULL;
    admin *a = c->a;
    if (c->prev) c->prev->next = c->next;
    else a->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    c->prev = c->next = NULL;
    a->n_conns--;
    conn_unref(c);
}

static void write_line(conn *c, json_t *resp) {
    char *s = json_dumps(resp, JSON_COMPACT | JSON_REAL_PRECISION(9));
    if (s && c->bev) {
        bufferevent_write(c->bev, s, strlen(s));
        bufferevent_write(c->bev, "\n", 1);
    }
    free(s);
}

static void send_error(conn *c, json_t *id, const char *code, const char *msg) {
    json_t *e = json_pack("{s:s, s:s}", "code", code, "message", msg);
    json_t *resp = json_pack("{s:O?, s:b, s:o}", "id", id, "ok", 0, "error", e);
    write_line(c, resp);
    json_decref(resp);
}

static void process_lines(conn *c);

static void handle_line(conn *c, const char *line, size_t len) {
    json_error_t je;
    json_t *req = json_loadb(line, len, JSON_REJECT_DUPLICATES, &je);
    if (!req) {
        char msg[300];
        snprintf(msg, sizeof msg, "the request is not valid JSON (column %d: %s)", je.column,
                 je.text);
        send_error(c, NULL, "bad_request", msg);
        return;
    }
    json_t *id = json_object_get(req, "id");
    json_t *cmd = json_object_get(req, "cmd");
    if (!json_is_object(req)) {
        send_error(c, NULL, "bad_request", "a request must be a JSON object");
    } else if (!json_is_string(cmd)) {
        send_error(c, id, "bad_request", "the request has no \"cmd\" string");
    } else {
        admin_req *r = xcalloc(1, sizeof *r);
        r->c = c;
        r->id = id ? json_incref(id) : NULL;
        c->refs++;
        c->busy = 1;
        c->a->fn(c->a->ctx, r, json_string_value(cmd), req);
    }
    json_decref(req);
}

static int has_line(conn *c) {
    struct evbuffer *in = bufferevent_get_input(c->bev);
    return evbuffer_search_eol(in, NULL, NULL, EVBUFFER_EOL_LF).pos >= 0;
}

/* Closes a refused or half-closed connection once nothing is left to answer or to write.
 * May free c. */
static void maybe_close(conn *c) {
    if (!c->bev || c->busy || c->in_process || !(c->refused || c->eof)) return;
    if (!c->refused && has_line(c)) return;
    if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0) conn_close(c);
}

/* Handles complete lines while no request is pending. May free c (maybe_close). */
static void process_lines(conn *c) {
    if (c->in_process) return;
    c->in_process = 1; /* handlers never close c, so c outlives this loop */
    while (c->bev && !c->busy && !c->refused) {
        struct evbuffer *in = bufferevent_get_input(c->bev);
        struct evbuffer_ptr eol = evbuffer_search_eol(in, NULL, NULL, EVBUFFER_EOL_LF);
        if (eol.pos < 0) {
            if (evbuffer_get_length(in) > ADMIN_MAX_LINE) {
                send_error(c, NULL, "bad_request",
                           "request line longer than 65536 bytes; closing the connection");
                /* no resynchronising: close once the reply is written (conn_write_cb) */
                bufferevent_disable(c->bev, EV_READ);
                c->refused = 1;
            }
            break;
        }
        size_t len = (size_t)eol.pos;
        char *line = xmalloc(len + 1);
        evbuffer_remove(in, line, len);
        evbuffer_drain(in, 1);
        line[len] = 0;
        if (len && line[len - 1] == '\r') line[--len] = 0;
        size_t k = 0;
        while (k < len && (line[k] == ' ' || line[k] == '\t')) k++;
        if (len > ADMIN_MAX_LINE)
            send_error(c, NULL, "bad_request", "request line longer than 65536 bytes");
        else if (k < len)
            handle_line(c, line, len);
        free(line);
    }
    c->in_process = 0;
    maybe_close(c);
}

static void conn_read_cb(struct bufferevent *bev, void *arg) { process_lines(arg); }

static void conn_write_cb(struct bufferevent *bev, void *arg) {
    conn *c = arg;
    maybe_close(c);
}

static void conn_event_cb(struct bufferevent *bev, short what, void *arg) {
    conn *c = arg;
    if ((what & BEV_EVENT_TIMEOUT) && c->busy) {
        bufferevent_enable(bev, EV_READ); /* long request: not idle */
        return;
    }
    /* End of input: a client that only half-closed (`nc -N`, socat) still gets every answer;
     * one that closed completely (POLLHUP on a Unix socket) is gone, and its pending request
     * is cancelled. */
    struct pollfd q = {bufferevent_getfd(bev), POLLIN, 0};
    if ((what & BEV_EVENT_EOF) && !(what & BEV_EVENT_ERROR) && poll(&q, 1, 0) >= 0 &&
        !(q.revents & POLLHUP)) {
        c->eof = 1;
        bufferevent_disable(bev, EV_READ);
        maybe_close(c);
        return;
    }
    conn_close(c);
}

static void accept_cb(struct evconnlistener *lis, evutil_socket_t fd, struct sockaddr *sa,
                      int socklen, void *arg) {
    admin *a = arg;
    struct ucred cred;
    socklen_t cl = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) != 0 ||
        (cred.uid != geteuid() && cred.uid != 0)) {
        close(fd); /* not ours: no reply at all */
        return;
    }
    if (a->n_conns >= ADMIN_MAX_CONNS) {
        static const char msg[] =
            "{\"id\":null,\"ok\":false,\"error\":{\"code\":\"conflict\",\"message\":\"too "
            "many admin connections (at most 8)\"}}\n";
        ssize_t w = write(fd, msg, sizeof msg - 1);
        (void)w;
        close(fd);
        return;
    }
    conn *c = xcalloc(1, sizeof *c);
    c->a = a;
    c->refs = 1;
    evutil_make_socket_nonblocking(fd);
    c->bev = bufferevent_socket_new(a->base, fd, BEV_OPT_CLOSE_ON_FREE);
    bufferevent_setcb(c->bev, conn_read_cb, conn_write_cb, conn_event_cb, c);
    struct timeval idle = {ADMIN_IDLE_TIMEOUT_S, 0};
    bufferevent_set_timeouts(c->bev, &idle, NULL);
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
    c->next = a->conns;
    if (a->conns) a->conns->prev = c;
    a->conns = c;
    a->n_conns++;
}

/* ---- public API ------------------------------------------------------------------------ */

int admin_open(struct event_base *base, const char *path, admin_handler fn, void *ctx,
               admin **out, char *err, size_t errlen) {
    *out = NULL;
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (!path || !path[0] || strlen(path) >= sizeof sa.sun_path)
        return duet_err(err, errlen, DUET_EINVAL,
                        "admin socket path '%s' is empty or longer than %zu bytes",
                        path ? path : "", sizeof sa.sun_path - 1);
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int rc = prepare_dir(path, err, errlen);
    if (rc) return rc;
    rc = remove_stale(path, &sa, err, errlen);
    if (rc) return rc;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return duet_err(err, errlen, DUET_EIO, "socket(): %s", strerror(errno));
    mode_t old = umask(0177);
    rc = bind(fd, (struct sockaddr *)&sa, sizeof sa);
    int e = errno;
    umask(old);
    if (rc != 0) {
        close(fd);
        return duet_err(err, errlen, DUET_EIO, "cannot bind the admin socket %s: %s", path,
                        strerror(e));
    }
    if (chmod(path, 0600) != 0 || listen(fd, 16) != 0) {
        e = errno;
        close(fd);
        unlink(path);
        return duet_err(err, errlen, DUET_EIO, "cannot set up the admin socket %s: %s", path,
                        strerror(e));
    }
    admin *a = xcalloc(1, sizeof *a);
    a->base = base;
    a->path = xstrdup(path);
    a->fn = fn;
    a->ctx = ctx;
    a->lis = evconnlistener_new(base, accept_cb, a, LEV_OPT_CLOSE_ON_FREE, -1, fd);
    if (!a->lis) {
        close(fd);
        unlink(path);
        free(a->path);
        free(a);
        return duet_err(err, errlen, DUET_EIO, "cannot listen on the admin socket %s", path);
    }
    *out = a;
    return 0;
}

/* Writes what is still queued for c (the last answers before exit), for at most ~1 s. The
 * bufferevent's output buffer cannot be drained from outside (libevent freezes its front), so
 * the bytes are written from a linearised view. */
static void flush_conn(conn *c) {
    struct evbuffer *out = bufferevent_get_output(c->bev);
    evutil_socket_t fd = bufferevent_getfd(c->bev);
    size_t len = evbuffer_get_length(out), off = 0;
    const unsigned char *p = len ? evbuffer_pullup(out, -1) : NULL;
    for (int spins = 0; fd >= 0 && p && off < len && spins < 100; spins++) {
        struct pollfd q = {fd, POLLOUT, 0};
        if (poll(&q, 1, 10) < 0 && errno != EINTR) break;
        if (q.revents & (POLLERR | POLLHUP)) break;
        if (!(q.revents & POLLOUT)) continue;
        ssize_t w = write(fd, p + off, len - off);
        if (w > 0) off += (size_t)w;
        else if (w < 0 && errno != EAGAIN && errno != EINTR) break;
    }
}

void admin_close(admin *a) {
    if (!a) return;
    evconnlistener_free(a->lis);
    for (conn *c = a->conns; c; c = c->next) flush_conn(c);
    while (a->conns) conn_close(a->conns);
    unlink(a->path);
    free(a->path);
    free(a);
}

const char *admin_path(const admin *a) { return a->path; }

int admin_req_connected(const admin_req *r) { return r->c->bev != NULL; }

static void finish(admin_req *r, json_t *resp) {
    conn *c = r->c;
    write_line(c, resp);
    json_decref(resp);
    json_decref(r->id);
    free(r);
    c->busy = 0;
    int alive = c->bev != NULL;
    if (alive) {
        /* later lines may already be buffered: handle them (not recursively) */
        process_lines(c);
    }
    conn_unref(c);
}

void admin_reply_ok(admin_req *r, json_t *result) {
    if (!result) result = json_object();
    json_t *resp = json_pack("{s:O?, s:b, s:o}", "id", r->id, "ok", 1, "result", result);
    finish(r, resp);
}

void admin_reply_err(admin_req *r, const char *code, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_t *e = json_pack("{s:s, s:s}", "code", code, "message", msg);
    json_t *resp = json_pack("{s:O?, s:b, s:o}", "id", r->id, "ok", 0, "error", e);
    finish(r, resp);
}
