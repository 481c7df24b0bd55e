/* test_cluster.c — the cluster end to end: real duet-worker and duet-coordinator processes on
 * loopback, driven through the admin socket and duetctl.
 *
 * Why: the pool, the admin socket and the workers only prove themselves together, over real
 * sockets, with real process deaths. Each case starts its own processes in a fresh temporary
 * directory, waits on pipes, sockets and pids with deadlines (never on sleeps), and kills
 * whatever it started when it ends. Cases (argv[1] picks one; meson runs each as a test):
 *   equivalence  1, 2 and 4 workers: prompt logits vs the transformers fixture, greedy tokens
 *                vs the single-process duet-generate, two concurrent requests batched
 *   batching     7 requests of different lengths on 3 sequence slots: each as if alone
 *   auth         wrong token / wrong fingerprint / no worker: the coordinator exits with the reason
 *   recover      kill -9 a worker mid-step (prefill): clear error, degraded, recovers by itself
 *   recover-idle kill -9 a worker between requests: degraded, recovers when it is back
 *   hung         SIGSTOP a worker: step timeout mid-generation, heartbeat timeout when idle,
 *                recovery after SIGCONT
 *   drain        drain lets the in-flight request finish and refuses new ones; resume
 *   admin        socket permissions, stale socket, bad lines, limits, duetctl exit codes
 *   deploy       deploy/duet-cluster.sh: start-cluster (2 workers), generate, status, stop
 *   protocol     a scripted fake worker in this process: garbage frames, the handshake bytes,
 *                LoadModel and progress, the canary, heartbeats, StepPlans, a wrong step id,
 *                a wrong rank
 *   prefix       prefix-cache hits give logits identical to cold prefills (same prompt, agent-
 *                style resend with a changed tail), hit counters, flush-prefix-cache frees units,
 *                n = 3 choices share the prompt's prefill
 *   preempt      a KV budget too small for all sequences: preemption, outputs as if alone
 *   chunking     --max-num-batched-tokens 64: chunked prefill gives duet-generate's tokens
 *   overload     --max-waiting: a full queue refuses with server_overloaded
 * It must never leave a process behind (children die with the test: PR_SET_PDEATHSIG).
 *
 *   test_cluster CASE WORKER COORDINATOR DUETCTL GENERATE MODEL_DIR FIXTURE SCRIPT BUILD_ROOT
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "common/err.h"
#include "common/rpc.h"
#include "common/safetensors.h"
#include "proto/duet.pb-c.h"

static const char *g_worker, *g_coord, *g_ctl, *g_generate, *g_model, *g_fixture;
static const char *g_script, *g_build; /* deploy/duet-cluster.sh, the meson build root */

#define MAX_PROCS 16
static pid_t g_pids[MAX_PROCS];
static int g_npids;
static char g_root[200];  /* one temporary directory per run, removed by main */
static char g_dir[256];   /* per-test directory inside it */
static char g_token[300]; /* token file path */
static char g_sock[300];  /* admin socket path */

/* ---- time, processes ------------------------------------------------------------------- */

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* A poll interval for state polling with a deadline (not synchronisation: the deadline is). */
static void pause_ms(int ms) {
    struct timespec ts = {0, (long)ms * 1000000L};
    nanosleep(&ts, NULL);
}

/* Starts argv[0] with stdout to a pipe (*out_fd) or to log, stderr to log. */
static pid_t spawn(char *const argv[], int *out_fd, const char *log) {
    int p[2] = {-1, -1};
    if (out_fd) ck_assert_int_eq(pipe2(p, O_CLOEXEC), 0);
    pid_t parent = getpid();
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127);
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
        if (fd >= 0) {
            dup2(fd, 2);
            if (!out_fd) dup2(fd, 1);
        }
        if (out_fd) dup2(p[1], 1);
        execv(argv[0], argv);
        _exit(127);
    }
    if (out_fd) {
        close(p[1]);
        *out_fd = p[0];
    }
    ck_assert_int_lt(g_npids, MAX_PROCS);
    g_pids[g_npids++] = pid;
    return pid;
}

static void forget_pid(pid_t pid) {
    for (int i = 0; i < g_npids; i++)
        if (g_pids[i] == pid) g_pids[i] = g_pids[--g_npids];
}

/* Waits for pid to exit within timeout_ms; returns its wait status, or -1 on timeout. */
static int wait_exit(pid_t pid, int timeout_ms) {
    int pfd = (int)syscall(SYS_pidfd_open, pid, 0);
    double end = now_ms() + timeout_ms;
    int st;
    for (;;) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            if (pfd >= 0) close(pfd);
            forget_pid(pid);
            return st;
        }
        double left = end - now_ms();
        if (left <= 0) break;
        if (pfd >= 0) {
            struct pollfd q = {pfd, POLLIN, 0};
            poll(&q, 1, (int)left);
        } else {
            pause_ms(10);
        }
    }
    if (pfd >= 0) close(pfd);
    return -1;
}

static void kill_all(void) {
    for (int i = 0; i < g_npids; i++) kill(g_pids[i], SIGKILL);
    for (int i = 0; i < g_npids; i++) waitpid(g_pids[i], NULL, 0);
    g_npids = 0;
}

/* Reads one line from fd within timeout_ms (byte at a time: these are short lines). */
static int read_line(int fd, char *buf, size_t cap, int timeout_ms) {
    double end = now_ms() + timeout_ms;
    size_t n = 0;
    while (n + 1 < cap) {
        int left = (int)(end - now_ms());
        if (left <= 0) return -1;
        struct pollfd q = {fd, POLLIN, 0};
        if (poll(&q, 1, left) <= 0) continue;
        char ch;
        ssize_t r = read(fd, &ch, 1);
        if (r <= 0) return -1;
        if (ch == '\n') break;
        buf[n++] = ch;
    }
    buf[n] = 0;
    return 0;
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return xstrdup("");
    char *s = xmalloc(1 << 20);
    size_t n = fread(s, 1, (1 << 20) - 1, f);
    s[n] = 0;
    fclose(f);
    return s;
}

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t l = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &l);
    close(fd);
    return ntohs(a.sin_port);
}

/* ---- fixtures: temp dir, token, workers, coordinator ------------------------------------ */

static void setup(void) {
    snprintf(g_dir, sizeof g_dir, "%s/case-XXXXXX", g_root);
    ck_assert_ptr_nonnull(mkdtemp(g_dir));
    snprintf(g_token, sizeof g_token, "%s/token", g_dir);
    FILE *f = fopen(g_token, "w");
    fprintf(f, "test-token-%08x-0123456789abcdef\n", (unsigned)getpid());
    fclose(f);
    chmod(g_token, 0600);
    snprintf(g_sock, sizeof g_sock, "%s/admin/admin.sock", g_dir);
}

static void teardown(void) { kill_all(); }

/* Removes the run's directory (also after a failed case, whose teardown does not run), after
 * killing what the deploy script started (recorded in its pid files). */
static void remove_root(void) {
    char cmd[600];
    snprintf(cmd, sizeof cmd,
             "for f in '%s'/*/state/*.pid; do [ -f \"$f\" ] && kill -9 \"$(cat \"$f\")\" "
             "2>/dev/null; done; true",
             g_root);
    if (system(cmd) != 0) fprintf(stderr, "could not stop the deploy script's processes\n");
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_root);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_root);
}

typedef struct {
    pid_t pid;
    int out;
    char addr[64];
    char log[300];
    int rank;
} worker_proc;

/* Starts worker `rank` of `world` listening on port (0 = any) with extra arguments (NULL-ended,
 * may be NULL) and waits for its line. */
static void start_worker_ex(worker_proc *w, int rank, int world, const char *peers, int port,
                            const char *token, const char *const *extra) {
    char listen[64], rk[16], ws[16];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
    snprintf(rk, sizeof rk, "%d", rank);
    snprintf(ws, sizeof ws, "%d", world);
    snprintf(w->log, sizeof w->log, "%s/worker%d.log", g_dir, rank);
    char *argv[20];
    int a = 0;
    argv[a++] = (char *)g_worker;
    argv[a++] = "--listen"; argv[a++] = listen;
    argv[a++] = "--rank"; argv[a++] = rk;
    argv[a++] = "--world-size"; argv[a++] = ws;
    argv[a++] = "--model"; argv[a++] = (char *)g_model;
    argv[a++] = "--backend"; argv[a++] = "cpu";
    argv[a++] = "--auth-token-file"; argv[a++] = (char *)token;
    argv[a++] = "--threads"; argv[a++] = "1";
    if (peers) {
        argv[a++] = "--peers";
        argv[a++] = (char *)peers;
    }
    for (int i = 0; extra && extra[i] && a < 19; i++) argv[a++] = (char *)extra[i];
    argv[a] = NULL;
    w->rank = rank;
    w->pid = spawn(argv, &w->out, w->log);
    char line[256];
    int rc = read_line(w->out, line, sizeof line, 60000);
    char *log = rc ? slurp(w->log) : NULL;
    ck_assert_msg(rc == 0, "worker %d printed no 'listening on' line within 60 s; its log:\n%s",
                  rank, log);
    const char *at = strstr(line, "listening on ");
    ck_assert_msg(at != NULL, "worker %d: unexpected first line '%s'", rank, line);
    snprintf(w->addr, sizeof w->addr, "%s", at + strlen("listening on "));
}

static void start_worker(worker_proc *w, int rank, int world, const char *peers, int port,
                         const char *token) {
    start_worker_ex(w, rank, world, peers, port, token, NULL);
}

static void start_workers(worker_proc *ws, int n, char *peers, size_t cap) {
    peers[0] = 0;
    for (int i = 0; i < n; i++) {
        size_t l = strlen(peers);
        snprintf(peers + l, cap - l, "%s127.0.0.1:%d", i ? "," : "", free_port());
    }
    for (int i = 0; i < n; i++) start_worker(&ws[i], i, n, n > 1 ? peers : NULL, 0, g_token);
}

static char g_clog[300];

static pid_t start_coord(const worker_proc *ws, int n, const char *const *extra) {
    static char list[1024];
    list[0] = 0;
    for (int i = 0; i < n; i++) {
        size_t l = strlen(list);
        snprintf(list + l, sizeof list - l, "%s%s", i ? "," : "", ws[i].addr);
    }
    snprintf(g_clog, sizeof g_clog, "%s/coordinator.log", g_dir);
    char *argv[32];
    int a = 0;
    argv[a++] = (char *)g_coord;
    argv[a++] = "--workers"; argv[a++] = list;
    argv[a++] = "--auth-token-file"; argv[a++] = g_token;
    argv[a++] = "--admin-socket"; argv[a++] = g_sock;
    argv[a++] = "--connect-timeout"; argv[a++] = "30";
    for (int i = 0; extra && extra[i]; i++) argv[a++] = (char *)extra[i];
    argv[a] = NULL;
    return spawn(argv, NULL, g_clog);
}

/* ---- admin client ------------------------------------------------------------------------ */

typedef struct {
    int fd;
    char *buf;
    size_t len, cap;
} aconn;

static int aconn_open(aconn *c, const char *path) {
    memset(c, 0, sizeof *c);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) return -1;
    memcpy(sa.sun_path, path, strlen(path) + 1);
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    c->cap = 1 << 16;
    c->buf = xmalloc(c->cap);
    return 0;
}

static void aconn_close(aconn *c) {
    if (c->fd >= 0) close(c->fd);
    free(c->buf);
    c->fd = -1;
    c->buf = NULL;
}

static void aconn_send_raw(aconn *c, const char *s, size_t n) {
    while (n) {
        ssize_t w = write(c->fd, s, n);
        ck_assert_int_gt(w, 0);
        s += w;
        n -= (size_t)w;
    }
}

static void aconn_send(aconn *c, json_t *req) {
    char *s = json_dumps(req, JSON_COMPACT);
    aconn_send_raw(c, s, strlen(s));
    aconn_send_raw(c, "\n", 1);
    free(s);
    json_decref(req);
}

/* Reads one response line within timeout_ms; NULL on timeout or EOF. */
static json_t *aconn_recv(aconn *c, int timeout_ms) {
    double end = now_ms() + timeout_ms;
    for (;;) {
        char *nl = memchr(c->buf, '\n', c->len);
        if (nl) {
            size_t l = (size_t)(nl - c->buf);
            json_t *r = json_loadb(c->buf, l, 0, NULL);
            memmove(c->buf, nl + 1, c->len - l - 1);
            c->len -= l + 1;
            ck_assert_msg(r != NULL, "the coordinator sent a line that is not JSON");
            return r;
        }
        int left = (int)(end - now_ms());
        if (left <= 0) return NULL;
        struct pollfd q = {c->fd, POLLIN, 0};
        if (poll(&q, 1, left) <= 0) continue;
        if (c->len + 65536 > c->cap) c->buf = xrealloc(c->buf, c->cap *= 2);
        ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
        if (r <= 0) return NULL;
        c->len += (size_t)r;
    }
}

static json_t *call(json_t *req, int timeout_ms) {
    aconn c;
    if (aconn_open(&c, g_sock)) {
        json_decref(req);
        return NULL;
    }
    aconn_send(&c, req);
    json_t *r = aconn_recv(&c, timeout_ms);
    aconn_close(&c);
    return r;
}

static json_t *status(void) { return call(json_pack("{s:s}", "cmd", "status"), 10000); }

static const char *jstr(json_t *o, const char *path1, const char *path2) {
    json_t *v = json_object_get(o, path1);
    if (path2) v = json_object_get(v, path2);
    return json_string_value(v);
}

/* Polls status until state == want (deadline timeout_ms). Returns the last status. */
static json_t *wait_state(const char *want, int timeout_ms) {
    double end = now_ms() + timeout_ms;
    for (;;) {
        json_t *s = status();
        const char *st = s ? jstr(s, "result", "state") : NULL;
        if (st && !strcmp(st, want)) return s;
        if (now_ms() > end) {
            char *log = slurp(g_clog);
            char *d = s ? json_dumps(s, JSON_COMPACT) : xstrdup("(no answer)");
            ck_abort_msg("state did not become '%s' within %d ms; last status %s\ncoordinator "
                         "log:\n%s",
                         want, timeout_ms, d, log);
        }
        json_decref(s);
        pause_ms(50);
    }
}

/* Polls status until the canary after the last (re)connect completed ("warm"). */
static void wait_warm(int timeout_ms) {
    double end = now_ms() + timeout_ms;
    for (;;) {
        json_t *s = status();
        int warm = s && json_is_true(json_object_get(json_object_get(s, "result"), "warm"));
        json_decref(s);
        if (warm) return;
        ck_assert_msg(now_ms() < end, "the canary did not complete within %d ms", timeout_ms);
        pause_ms(20);
    }
}

/* One worker (rank 0 of 1) and a coordinator with extra flags (NULL-terminated, may be NULL),
 * serving and past its canary. */
static pid_t start_serving(worker_proc *w, const char *const *extra) {
    start_worker(w, 0, 1, NULL, 0, g_token);
    pid_t cp = start_coord(w, 1, extra);
    json_decref(wait_state("serving", 60000));
    wait_warm(60000);
    return cp;
}

static json_t *gen_req(const int32_t *ids, int n, int max_tokens, int logits) {
    json_t *a = json_array();
    for (int i = 0; i < n; i++) json_array_append_new(a, json_integer(ids[i]));
    return json_pack("{s:s, s:o, s:i, s:b}", "cmd", "generate", "prompt_ids", a, "max_tokens",
                     max_tokens, "return_logits", logits);
}

/* Token ids of a generate result as a string "a b c". */
static void tokens_str(json_t *resp, char *out, size_t cap) {
    json_t *ids = json_object_get(json_object_get(resp, "result"), "token_ids");
    size_t i, n = 0;
    json_t *v;
    out[0] = 0;
    json_array_foreach(ids, i, v) n += (size_t)snprintf(out + n, n < cap ? cap - n : 0, "%s%lld",
                                                         i ? " " : "", (long long)json_integer_value(v));
}

/* r (consumed) is a successful generate answer whose token ids are `want` (tokens_str form). */
static void expect_tokens(json_t *r, const char *want) {
    char got[4096];
    ck_assert(r && json_is_true(json_object_get(r, "ok")));
    tokens_str(r, got, sizeof got);
    ck_assert_str_eq(got, want);
    json_decref(r);
}

/* The single-process golden path: duet-generate's greedy tokens. */
static void golden_tokens(const int32_t *ids, int n, int n_new, char *out, size_t cap) {
    char *prompt = xmalloc((size_t)n * 12 + 1);
    size_t l = 0;
    prompt[0] = 0;
    for (int i = 0; i < n; i++) l += (size_t)sprintf(prompt + l, "%s%d", i ? " " : "", ids[i]);
    char nn[16], log[300];
    snprintf(nn, sizeof nn, "%d", n_new);
    snprintf(log, sizeof log, "%s/generate.log", g_dir);
    char *argv[] = {(char *)g_generate, "--model", (char *)g_model, "--prompt", prompt, "-n", nn,
                    NULL};
    int fd;
    pid_t pid = spawn(argv, &fd, log);
    char line[4096];
    ck_assert_int_eq(read_line(fd, line, sizeof line, 120000), 0);
    close(fd);
    ck_assert_int_eq(wait_exit(pid, 60000), 0);
    ck_assert_msg(!strncmp(line, "generated: ", 11), "duet-generate printed '%s'", line);
    size_t ll = strlen(line + 11);
    ck_assert_uint_lt(ll, cap);
    memcpy(out, line + 11, ll + 1);
    free(prompt);
}

/* The coordinator's log must hold no sanitizer report (UBSan does not change the exit code). */
static void assert_clean_log(const char *log) {
    ck_assert_msg(!strstr(log, "Sanitizer") && !strstr(log, "runtime error:"),
                  "the coordinator log holds a sanitizer report:\n%s", log);
}

/* Stops the coordinator with SIGTERM and checks that it exits 0 (sanitizers clean). */
static void stop_coord(pid_t pid) {
    kill(pid, SIGTERM);
    int st = wait_exit(pid, 30000);
    char *log = slurp(g_clog);
    ck_assert_msg(st == 0, "the coordinator did not exit 0 after SIGTERM (status %d); log:\n%s",
                  st, log);
    assert_clean_log(log);
    free(log);
}

/* ---- the fixture ------------------------------------------------------------------------ */

#define FIX_POS 255 /* prompt = tokens[0..255]: spans two ratio-128 compression windows */

typedef struct {
    st_set *st;
    int32_t prompt[FIX_POS + 1];
    const float *row; /* [vocab] transformers logits at FIX_POS */
    int vocab;
    int argmax;
} fixture;

static void fixture_load(fixture *f) {
    char err[512];
    ck_assert_msg(st_open(g_fixture, &f->st, err, sizeof err) == 0, "%s", err);
    const st_tensor *tok = st_find(f->st, "tokens"), *sp = st_find(f->st, "sel_pos"),
                    *sl = st_find(f->st, "sel_logits"), *am = st_find(f->st, "argmax");
    ck_assert(tok && sp && sl && am && tok->dtype == ST_I64 && sl->dtype == ST_F32);
    const int64_t *t = tok->data, *pos = sp->data, *amx = am->data;
    for (int i = 0; i <= FIX_POS; i++) f->prompt[i] = (int32_t)t[i];
    f->vocab = (int)sl->shape[1];
    f->row = NULL;
    for (int64_t i = 0; i < sp->shape[0]; i++)
        if (pos[i] == FIX_POS) f->row = (const float *)sl->data + i * f->vocab;
    ck_assert_msg(f->row != NULL, "the fixture has no logits for position %d", FIX_POS);
    f->argmax = (int)amx[FIX_POS];
}

static double rel_l2(json_t *row, const float *ref, int n) {
    ck_assert_int_eq((int)json_array_size(row), n);
    double num = 0, den = 0;
    for (int v = 0; v < n; v++) {
        double d = json_number_value(json_array_get(row, (size_t)v)) - ref[v];
        num += d * d;
        den += (double)ref[v] * ref[v];
    }
    return sqrt(num / den);
}

/* ---- equivalence ------------------------------------------------------------------------- */

#define N_NEW 8

static const int32_t SHORT_A[] = {0, 128, 256, 384, 512, 640, 768, 896};
static const int32_t SHORT_B[] = {5, 17, 300, 301, 999, 42};

static double rel_l2_json(json_t *row, json_t *ref) {
    size_t n = json_array_size(ref);
    ck_assert_uint_eq(json_array_size(row), n);
    double num = 0, den = 0;
    for (size_t v = 0; v < n; v++) {
        double x = json_number_value(json_array_get(row, v));
        double y = json_number_value(json_array_get(ref, v));
        num += (x - y) * (x - y);
        den += y * y;
    }
    return sqrt(num / den);
}

/* The same prompt on 1, 2 and 4 workers (one after the other, in this one case, so that the
 * 1-worker logits of every step are the reference for the others). */
START_TEST(equivalence) {
    static const int worlds[] = {1, 2, 4};
    fixture f;
    fixture_load(&f);
    char golden[1024], golden_a[1024], golden_b[1024];
    golden_tokens(f.prompt, FIX_POS + 1, N_NEW, golden, sizeof golden);
    golden_tokens(SHORT_A, 8, N_NEW, golden_a, sizeof golden_a);
    golden_tokens(SHORT_B, 6, N_NEW, golden_b, sizeof golden_b);
    json_t *ref = NULL; /* the 1-worker logits, [N_NEW][vocab] */

    for (int wi = 0; wi < 3; wi++) {
        int world = worlds[wi];
        worker_proc ws[4];
        char peers[512];
        start_workers(ws, world, peers, sizeof peers);
        pid_t cp = start_coord(ws, world, NULL);
        json_decref(wait_state("serving", 60000));

        json_t *r = call(gen_req(f.prompt, FIX_POS + 1, N_NEW, 1), 300000);
        ck_assert_msg(r != NULL, "world %d: no answer to generate", world);
        char *d = json_dumps(r, JSON_COMPACT);
        ck_assert_msg(json_is_true(json_object_get(r, "ok")), "world %d: generate failed: %.500s",
                      world, d);
        free(d);
        json_t *res = json_object_get(r, "result");
        json_t *logits = json_object_get(res, "logits");
        ck_assert_int_eq((int)json_array_size(logits), N_NEW);
        double rel = rel_l2(json_array_get(logits, 0), f.row, f.vocab);
        printf("world %d: prompt-last logits vs transformers: rel L2 %.3e\n", world, rel);
        ck_assert_msg(rel <= 1e-5, "world %d: relative L2 error %.3e > 1e-5 against the fixture",
                      world, rel);
        if (!ref) {
            ref = json_incref(logits);
        } else {
            for (int i = 0; i < N_NEW; i++) {
                double e = rel_l2_json(json_array_get(logits, (size_t)i),
                                       json_array_get(ref, (size_t)i));
                printf("world %d: step %d logits vs 1 worker: rel L2 %.3e\n", world, i, e);
                ck_assert_msg(e <= 1e-5, "world %d, step %d: logits differ from 1 worker by "
                              "rel L2 %.3e > 1e-5", world, i, e);
            }
        }
        char toks[1024];
        tokens_str(r, toks, sizeof toks);
        printf("world %d: tokens %s (duet-generate %s)\n", world, toks, golden);
        ck_assert_int_eq(
            json_integer_value(json_array_get(json_object_get(res, "token_ids"), 0)), f.argmax);
        ck_assert_str_eq(toks, golden);
        json_decref(r);

        /* two requests at once: batched into the same steps, each as if alone */
        aconn a, b;
        ck_assert_int_eq(aconn_open(&a, g_sock), 0);
        ck_assert_int_eq(aconn_open(&b, g_sock), 0);
        aconn_send(&a, gen_req(SHORT_A, 8, N_NEW, 0));
        aconn_send(&b, gen_req(SHORT_B, 6, N_NEW, 0));
        json_t *ra = aconn_recv(&a, 120000), *rb = aconn_recv(&b, 120000);
        ck_assert(ra && rb);
        tokens_str(ra, toks, sizeof toks);
        ck_assert_str_eq(toks, golden_a);
        tokens_str(rb, toks, sizeof toks);
        ck_assert_str_eq(toks, golden_b);
        json_decref(ra);
        json_decref(rb);
        aconn_close(&a);
        aconn_close(&b);
        stop_coord(cp);
        kill_all(); /* the workers */
    }
    json_decref(ref);
    st_close(f.st);
}
END_TEST

/* ---- continuous batching: more requests than sequence slots, joining and leaving ------------ */

START_TEST(batching) {
    worker_proc w;
    const char *extra[] = {"--max-seqs", "3", NULL};
    pid_t cp = start_serving(&w, extra);
    enum { N = 7 }; /* at most 8 admin connections: 7 + the status probe */
    int32_t prompts[N][12];
    int plen[N], maxt[N];
    char solo[N][512], got[512];
    for (int i = 0; i < N; i++) { /* different lengths: sequences join and leave mid-flight */
        plen[i] = 1 + (i * 5) % 12;
        maxt[i] = 2 + (i * 7) % 9;
        for (int k = 0; k < plen[i]; k++) prompts[i][k] = (int32_t)((i * 131 + k * 17) % 1024);
        json_t *r = call(gen_req(prompts[i], plen[i], maxt[i], 0), 60000);
        ck_assert(r && json_is_true(json_object_get(r, "ok")));
        tokens_str(r, solo[i], sizeof solo[i]);
        json_decref(r);
    }
    aconn c[N];
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(aconn_open(&c[i], g_sock), 0);
        aconn_send(&c[i], gen_req(prompts[i], plen[i], maxt[i], 0));
    }
    json_t *s = call(json_pack("{s:s, s:b}", "cmd", "status", "verbose", 1), 10000);
    json_t *q = json_object_get(json_object_get(s, "result"), "queue");
    ck_assert_int_le(json_integer_value(json_object_get(q, "running")), 3);
    json_decref(s);
    for (int i = 0; i < N; i++) {
        json_t *r = aconn_recv(&c[i], 60000);
        ck_assert_msg(r && json_is_true(json_object_get(r, "ok")), "request %d failed", i);
        tokens_str(r, got, sizeof got);
        ck_assert_msg(!strcmp(got, solo[i]), "request %d batched gave '%s', alone '%s'", i, got,
                      solo[i]);
        json_decref(r);
        aconn_close(&c[i]);
    }
    s = status();
    json_t *cnt = json_object_get(json_object_get(s, "result"), "counters");
    ck_assert_int_eq(json_integer_value(json_object_get(cnt, "completed")), 2 * N);
    json_decref(s);
    stop_coord(cp);
}
END_TEST

/* ---- the deploy script ------------------------------------------------------------------------- */

static int run_ctl(const char *const *args, char *out, size_t cap);

/* Reads a child's output from fd until EOF (at most cap-1 bytes, NUL-terminated) within
 * timeout_ms, then reaps it; returns its exit status. */
static int collect(pid_t pid, int fd, char *out, size_t cap, int timeout_ms, const char *what) {
    size_t n = 0;
    double end = now_ms() + timeout_ms;
    for (;;) {
        int left = (int)(end - now_ms());
        ck_assert_msg(left > 0, "%s did not finish within %d ms", what, timeout_ms);
        struct pollfd q = {fd, POLLIN, 0};
        if (poll(&q, 1, left) <= 0) continue;
        ssize_t r = read(fd, out + n, cap - n - 1);
        if (r <= 0) break;
        n += (size_t)r;
        if (n + 1 >= cap) break;
    }
    out[n] = 0;
    close(fd);
    int st = wait_exit(pid, 30000);
    ck_assert(st != -1 && WIFEXITED(st));
    return WEXITSTATUS(st);
}

/* Runs prefix + args (NULL-terminated lists) with output into out and stderr into
 * g_dir/logname; returns its exit status. */
static int run_cmd(const char *const *prefix, const char *const *args, const char *what,
                   const char *logname, int timeout_ms, char *out, size_t cap) {
    char *argv[24];
    int a = 0;
    for (int i = 0; prefix[i]; i++) argv[a++] = (char *)prefix[i];
    for (int i = 0; args[i]; i++) {
        ck_assert_int_lt(a, 23);
        argv[a++] = (char *)args[i];
    }
    argv[a] = NULL;
    char log[300];
    snprintf(log, sizeof log, "%s/%s", g_dir, logname);
    int fd;
    pid_t pid = spawn(argv, &fd, log);
    return collect(pid, fd, out, cap, timeout_ms, what);
}

/* Runs the deploy script with args; returns its exit status; output into out. */
static int run_script(const char *env, const char *const *args, char *out, size_t cap) {
    const char *prefix[] = {"/bin/bash", g_script, "--env", env, NULL};
    return run_cmd(prefix, args, "duet-cluster.sh", "script.log", 120000, out, cap);
}

static pid_t read_pid(const char *state, const char *name) {
    char path[400];
    snprintf(path, sizeof path, "%s/%s.pid", state, name);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int pid = -1;
    if (fscanf(f, "%d", &pid) != 1) pid = -1;
    fclose(f);
    return pid;
}

START_TEST(deploy) {
    char env[320], state[320], sock[320], out[16384];
    snprintf(env, sizeof env, "%s/duet.env", g_dir);
    snprintf(state, sizeof state, "%s/state", g_dir);
    snprintf(sock, sizeof sock, "%s/adm/admin.sock", g_dir);
    FILE *f = fopen(env, "w");
    fprintf(f,
            "DUET_BIN=%s\nDUET_MODEL=%s\nDUET_TOKEN_FILE=%s\n"
            "DUET_WORKERS=127.0.0.1:%d,127.0.0.1:%d\nDUET_PEERS=127.0.0.1:%d,127.0.0.1:%d\n"
            "DUET_STATE_DIR=%s\nDUET_ADMIN_SOCKET=%s\nDUET_START_TIMEOUT=60\n"
            "DUET_DRAIN_GRACE=5\nDUET_WORKER_ARGS=\"--threads 1\"\n",
            g_build, g_model, g_token, free_port(), free_port(), free_port(), free_port(), state,
            sock);
    fclose(f);
    const char *start[] = {"start-cluster", NULL};
    int rc = run_script(env, start, out, sizeof out);
    ck_assert_msg(rc == 0, "start-cluster failed (%d):\n%s", rc, out);
    ck_assert_msg(strstr(out, "coordinator: serving"), "start-cluster printed:\n%s", out);
    pid_t pids[3] = {read_pid(state, "worker0"), read_pid(state, "worker1"),
                     read_pid(state, "coordinator")};
    for (int i = 0; i < 3; i++) ck_assert_int_eq(kill(pids[i], 0), 0);
    /* starting again starts nothing new */
    rc = run_script(env, start, out, sizeof out);
    ck_assert_int_eq(rc, 0);
    ck_assert_msg(strstr(out, "already running"), "second start-cluster printed:\n%s", out);
    ck_assert_int_eq(read_pid(state, "coordinator"), pids[2]);

    char golden[512];
    golden_tokens(SHORT_A, 8, N_NEW, golden, sizeof golden);
    char n_new[8];
    snprintf(n_new, sizeof n_new, "%d", N_NEW);
    const char *gen[] = {"-s", sock, "generate", "--max-tokens", n_new,
                         "0 128 256 384 512 640 768 896", NULL};
    ck_assert_int_eq(run_ctl(gen, out, sizeof out), 0);
    ck_assert_msg(strstr(out, golden) != NULL, "generate printed '%s', expected tokens %s", out,
                  golden);
    const char *st[] = {"status", NULL};
    ck_assert_int_eq(run_script(env, st, out, sizeof out), 0);
    ck_assert_msg(strstr(out, "worker1: running") && strstr(out, "state: serving"), "status:\n%s",
                  out);
    const char *logs[] = {"logs", "worker", "1", NULL};
    ck_assert_int_eq(run_script(env, logs, out, sizeof out), 0);
    ck_assert_msg(strstr(out, "listening on"), "logs worker 1:\n%s", out);

    const char *stop[] = {"stop", NULL};
    ck_assert_int_eq(run_script(env, stop, out, sizeof out), 0);
    for (int i = 0; i < 3; i++)
        ck_assert_msg(kill(pids[i], 0) != 0, "process %d still runs after stop:\n%s", pids[i],
                      out);
    ck_assert_int_eq(read_pid(state, "coordinator"), -1);
    char clog[400];
    snprintf(clog, sizeof clog, "%s/coordinator.log", state);
    char *log = slurp(clog);
    ck_assert_msg(strstr(log, "drained; exiting"), "the coordinator did not drain:\n%s", log);
    assert_clean_log(log);
    free(log);
}
END_TEST

/* ---- start-up failures ------------------------------------------------------------------ */

static void expect_exit_with(pid_t cp, const char *what, const char *needle) {
    int st = wait_exit(cp, 30000);
    char *log = slurp(g_clog);
    ck_assert_msg(st != -1, "%s: the coordinator is still running after 30 s; log:\n%s", what,
                  log);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) != 0,
                  "%s: the coordinator should exit non-zero (status %d)", what, st);
    ck_assert_msg(strstr(log, needle) != NULL, "%s: the log does not say '%s':\n%s", what,
                  needle, log);
    assert_clean_log(log);
    free(log);
}

START_TEST(auth) {
    /* a worker with another token refuses the coordinator; the coordinator says why */
    char other[320];
    snprintf(other, sizeof other, "%s/other-token", g_dir);
    FILE *fp = fopen(other, "w");
    fprintf(fp, "a-completely-different-token-0000\n");
    fclose(fp);
    chmod(other, 0600);
    worker_proc w;
    start_worker(&w, 0, 1, NULL, 0, other);
    pid_t cp = start_coord(&w, 1, NULL);
    expect_exit_with(cp, "wrong token", "refused the handshake");
    char *log = slurp(g_clog);
    ck_assert_msg(strstr(log, w.addr) != NULL, "the reason should name the worker:\n%s", log);
    free(log);
    kill(w.pid, SIGKILL);
    wait_exit(w.pid, 10000);

    /* the right token but another model fingerprint */
    start_worker(&w, 0, 1, NULL, 0, g_token);
    const char *fpx[] = {"--model-fingerprint", "123456789abcdef", NULL};
    unlink(g_clog);
    cp = start_coord(&w, 1, fpx);
    expect_exit_with(cp, "wrong fingerprint", "w0");
    log = slurp(g_clog);
    ck_assert_msg(strstr(log, "fingerprint") != NULL, "the reason should be the fingerprint:\n%s",
                  log);
    free(log);

    /* nobody listening: the start-up deadline */
    worker_proc ghost;
    snprintf(ghost.addr, sizeof ghost.addr, "127.0.0.1:%d", free_port());
    const char *fast[] = {"--connect-timeout", "1", NULL};
    unlink(g_clog);
    double t0 = now_ms();
    cp = start_coord(&ghost, 1, fast);
    expect_exit_with(cp, "no worker", "gave up after --connect-timeout");
    ck_assert_double_lt(now_ms() - t0, 15000);
}
END_TEST

/* ---- kill a worker mid-generation, recover ---------------------------------------------- */

static int generated_so_far(void) {
    json_t *s = call(json_pack("{s:s, s:b}", "cmd", "status", "verbose", 1), 10000);
    json_t *reqs = json_object_get(json_object_get(s, "result"), "requests");
    int n = json_is_array(reqs) && json_array_size(reqs)
                ? (int)json_integer_value(json_object_get(json_array_get(reqs, 0), "generated"))
                : -1;
    json_decref(s);
    return n;
}

START_TEST(recover) {
    worker_proc ws[2];
    char peers[256];
    start_workers(ws, 2, peers, sizeof peers);
    const char *extra[] = {"--step-timeout", "20", NULL};
    pid_t cp = start_coord(ws, 2, extra);
    json_decref(wait_state("serving", 60000));
    wait_warm(60000); /* the canary's step comes first: steps_done counts it */
    json_t *r = call(gen_req(SHORT_A, 8, N_NEW, 0), 120000);
    ck_assert(r && json_is_true(json_object_get(r, "ok")));
    char before[1024], after[1024];
    tokens_str(r, before, sizeof before);
    json_decref(r);
    json_t *s0 = status();
    for (size_t i = 0; i < 2; i++) {
        json_t *wj = json_array_get(json_object_get(json_object_get(s0, "result"), "workers"), i);
        ck_assert_msg(json_number_value(json_object_get(wj, "step_ms_p50")) > 0,
                      "worker %zu has no step_ms_p50 after a generation", i);
        ck_assert_int_eq(json_integer_value(json_object_get(wj, "steps_done")), N_NEW + 1);
    }
    json_decref(s0);

    /* a long generation; kill -9 worker 1 while its first step (a 3000-token prefill, seconds
     * long even without sanitizers, so both workers are surely inside it) is in flight. A kill
     * between two steps is the recover-idle case. */
    aconn a;
    ck_assert_int_eq(aconn_open(&a, g_sock), 0);
    static int32_t long_prompt[3000];
    for (int i = 0; i < 3000; i++) long_prompt[i] = (int32_t)((i * 37) % 1024);
    aconn_send(&a, gen_req(long_prompt, 3000, 1000, 0));
    double end = now_ms() + 60000;
    while (generated_so_far() < 0) { /* admitted: its prefill step was sent at once */
        ck_assert_msg(now_ms() < end, "the long generation did not start within 60 s");
        pause_ms(5);
    }
    int port1 = atoi(strrchr(ws[1].addr, ':') + 1);
    double t_kill = now_ms();
    kill(ws[1].pid, SIGKILL);
    ck_assert_int_ne(wait_exit(ws[1].pid, 10000), -1);
    r = aconn_recv(&a, 30000);
    double waited = now_ms() - t_kill;
    ck_assert_msg(r != NULL, "the in-flight generate got no answer within 30 s of the kill");
    char *d = json_dumps(r, JSON_COMPACT);
    printf("after kill (%.0f ms): %s\n", waited, d);
    ck_assert_msg(!json_is_true(json_object_get(r, "ok")), "generate should fail: %s", d);
    ck_assert_str_eq(jstr(r, "error", "code"), "worker_failure");
    ck_assert_msg(strstr(jstr(r, "error", "message"), "w1") != NULL ||
                      strstr(jstr(r, "error", "message"), "w0") != NULL,
                  "the error should name a worker: %s", d);
    free(d);
    json_decref(r);
    aconn_close(&a);

    /* degraded, the dead worker shown down, while it is away */
    json_t *s = status();
    ck_assert_str_eq(jstr(s, "result", "state"), "degraded");
    json_t *w1 = json_array_get(json_object_get(json_object_get(s, "result"), "workers"), 1);
    const char *w1st = json_string_value(json_object_get(w1, "state"));
    ck_assert_msg(!strcmp(w1st, "down") || !strcmp(w1st, "connecting"),
                  "w1 should be down, is %s", w1st);
    ck_assert(json_is_string(json_object_get(w1, "error")));
    json_decref(s);
    /* a request now waits for the group instead of failing at once */
    aconn q;
    ck_assert_int_eq(aconn_open(&q, g_sock), 0);
    aconn_send(&q, gen_req(SHORT_A, 8, N_NEW, 0));

    /* bring it back on the same port: the coordinator re-forms the group by itself */
    start_worker(&ws[1], 1, 2, peers, port1, g_token);
    json_decref(wait_state("serving", 90000));
    r = aconn_recv(&q, 120000);
    ck_assert_msg(r && json_is_true(json_object_get(r, "ok")),
                  "the request queued during the outage should succeed");
    tokens_str(r, after, sizeof after);
    ck_assert_str_eq(after, before);
    json_decref(r);
    aconn_close(&q);
    r = call(gen_req(SHORT_A, 8, N_NEW, 0), 120000);
    expect_tokens(r, before);
    stop_coord(cp);
}
END_TEST

/* ---- a hung worker (SIGSTOP): step timeout, heartbeat timeout, recovery ------------------- */

static void expect_worker_error(json_t *s, int rank, const char *needle) {
    json_t *w = json_array_get(json_object_get(json_object_get(s, "result"), "workers"),
                               (size_t)rank);
    const char *e = json_string_value(json_object_get(w, "error"));
    ck_assert_msg(e && strstr(e, needle), "worker %d's error should mention '%s': %s", rank,
                  needle, e ? e : "(none)");
}

START_TEST(hung) {
    worker_proc ws[2];
    char peers[256];
    start_workers(ws, 2, peers, sizeof peers);
    const char *extra[] = {"--step-timeout", "3", "--heartbeat-timeout", "2", NULL};
    pid_t cp = start_coord(ws, 2, extra);
    json_decref(wait_state("serving", 60000));
    json_t *r = call(gen_req(SHORT_A, 8, N_NEW, 0), 120000);
    ck_assert(r && json_is_true(json_object_get(r, "ok")));
    char before[1024];
    tokens_str(r, before, sizeof before);
    json_decref(r);

    /* mid-generation: the step times out */
    aconn a;
    ck_assert_int_eq(aconn_open(&a, g_sock), 0);
    aconn_send(&a, gen_req(SHORT_A, 8, 3000, 0));
    double end = now_ms() + 60000;
    while (generated_so_far() < 4) {
        ck_assert_msg(now_ms() < end, "the long generation did not start within 60 s");
        pause_ms(20);
    }
    double t0 = now_ms();
    kill(ws[1].pid, SIGSTOP);
    r = aconn_recv(&a, 30000);
    double waited = now_ms() - t0;
    ck_assert_msg(r != NULL, "no answer within 30 s of stopping a worker");
    ck_assert_str_eq(jstr(r, "error", "code"), "worker_failure");
    ck_assert_msg(strstr(jstr(r, "error", "message"), "not answered within 3.0 s") != NULL,
                  "expected a step timeout: %s", jstr(r, "error", "message"));
    printf("step timeout: %s\n", jstr(r, "error", "message"));
    ck_assert_msg(waited < 10000, "the step failed only after %.0f ms (timeout 3 s)", waited);
    json_decref(r);
    aconn_close(&a);
    json_t *s = status();
    ck_assert_str_eq(jstr(s, "result", "state"), "degraded");
    json_decref(s);
    kill(ws[1].pid, SIGCONT);
    json_decref(wait_state("serving", 60000));
    r = call(gen_req(SHORT_A, 8, N_NEW, 0), 120000);
    expect_tokens(r, before);

    /* idle: the heartbeat times out */
    kill(ws[1].pid, SIGSTOP);
    t0 = now_ms();
    s = wait_state("degraded", 15000);
    ck_assert_msg(now_ms() - t0 < 8000, "degraded only after %.0f ms (heartbeat timeout 2 s)",
                  now_ms() - t0);
    expect_worker_error(s, 1, "heartbeat timeout");
    json_decref(s);
    kill(ws[1].pid, SIGCONT);
    json_decref(wait_state("serving", 60000));
    r = call(gen_req(SHORT_A, 8, N_NEW, 0), 120000);
    expect_tokens(r, before);
    stop_coord(cp);
}
END_TEST

/* ---- kill -9 a worker while the group is idle ------------------------------------------------ *
 * Rank 0 took no part in a collective when rank 1 died, so nothing told it that its data plane
 * is broken: when the group is re-formed, its LoadModel must re-form the data plane with the new
 * rank 1 rather than answer "already loaded", or the group never becomes ready. */

START_TEST(recover_idle) {
    worker_proc ws[2];
    char peers[256];
    start_workers(ws, 2, peers, sizeof peers);
    pid_t cp = start_coord(ws, 2, NULL);
    json_decref(wait_state("serving", 60000));
    json_t *r = call(gen_req(SHORT_A, 8, N_NEW, 0), 120000);
    ck_assert(r && json_is_true(json_object_get(r, "ok")));
    char before[1024];
    tokens_str(r, before, sizeof before);
    json_decref(r);
    int port1 = atoi(strrchr(ws[1].addr, ':') + 1);
    kill(ws[1].pid, SIGKILL);
    ck_assert_int_ne(wait_exit(ws[1].pid, 10000), -1);
    json_t *s = wait_state("degraded", 10000);
    expect_worker_error(s, 1, "w1");
    json_decref(s);
    start_worker(&ws[1], 1, 2, peers, port1, g_token);
    json_decref(wait_state("serving", 60000));
    r = call(gen_req(SHORT_A, 8, N_NEW, 0), 120000);
    expect_tokens(r, before);
    stop_coord(cp);
}
END_TEST

/* ---- the protocol, against a scripted fake worker ------------------------------------------ */

static int fake_listen(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    ck_assert_int_eq(listen(fd, 8), 0);
    socklen_t l = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &l);
    *port = ntohs(a.sin_port);
    return fd;
}

static int fake_accept(int lfd, int timeout_ms) {
    struct pollfd q = {lfd, POLLIN, 0};
    ck_assert_msg(poll(&q, 1, timeout_ms) == 1, "the coordinator did not connect within %d ms",
                  timeout_ms);
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    ck_assert_int_ge(fd, 0);
    return fd;
}

static void fake_send_raw(int fd, const void *p, size_t n) {
    ck_assert_int_eq(write(fd, p, n), (ssize_t)n);
}

static void fake_send(int fd, int type, const ProtobufCMessage *m) {
    char err[200];
    size_t len;
    uint8_t *buf = rpc_frame_pack(type, m, RPC_MAX_FRAME, &len, err, sizeof err);
    ck_assert_ptr_nonnull(buf);
    fake_send_raw(fd, buf, len);
    free(buf);
}

/* Reads the next frame (skipping heartbeats when skip_hb, which it answers with Stats).
 * Returns the type; *payload is malloc'd. */
static int fake_recv(int fd, rpc_decoder *dec, uint8_t **payload, size_t *len, int skip_hb,
                     int *n_hb) {
    double end = now_ms() + 10000;
    char err[200];
    for (;;) {
        int type;
        const uint8_t *p;
        size_t l;
        while (rpc_decoder_next(dec, &type, &p, &l) == 1) {
            if (skip_hb && type == RPC_HEARTBEAT) {
                Duet__Heartbeat *hb = duet__heartbeat__unpack(NULL, l, p);
                ck_assert_ptr_nonnull(hb);
                Duet__Stats st = DUET__STATS__INIT;
                st.seq = hb->seq;
                duet__heartbeat__free_unpacked(hb, NULL);
                if (n_hb) (*n_hb)++;
                fake_send(fd, RPC_STATS, &st.base);
                continue;
            }
            *payload = xmalloc(l ? l : 1);
            memcpy(*payload, p, l);
            *len = l;
            return type;
        }
        int left = (int)(end - now_ms());
        ck_assert_msg(left > 0, "the coordinator sent no frame within 10 s");
        struct pollfd q = {fd, POLLIN, 0};
        if (poll(&q, 1, left) <= 0) continue;
        uint8_t buf[65536];
        ssize_t r = read(fd, buf, sizeof buf);
        ck_assert_msg(r > 0, "the coordinator closed the connection unexpectedly");
        ck_assert_int_eq(rpc_decoder_feed(dec, buf, (size_t)r, err, sizeof err), 0);
    }
}

/* The coordinator must close fd within timeout_ms. */
static void fake_expect_closed(int fd, int timeout_ms, const char *what) {
    double end = now_ms() + timeout_ms;
    for (;;) {
        int left = (int)(end - now_ms());
        ck_assert_msg(left > 0, "%s: the coordinator kept the connection open", what);
        struct pollfd q = {fd, POLLIN, 0};
        if (poll(&q, 1, left) <= 0) continue;
        char b[4096];
        ssize_t r = read(fd, b, sizeof b);
        if (r <= 0) break;
    }
    close(fd);
}

/* Challenge → Hello (checked) → HelloReply with the given rank. */
static void fake_handshake(int fd, rpc_decoder *dec, uint32_t rank, uint64_t fp) {
    uint8_t nonce[RPC_NONCE_BYTES];
    rpc_random_nonce(nonce);
    Duet__Challenge ch = DUET__CHALLENGE__INIT;
    ch.nonce.data = nonce;
    ch.nonce.len = sizeof nonce;
    ch.protocol_version = RPC_PROTOCOL_VERSION;
    fake_send(fd, RPC_CHALLENGE, &ch.base);
    uint8_t *p;
    size_t l;
    ck_assert_int_eq(fake_recv(fd, dec, &p, &l, 0, NULL), RPC_HELLO);
    Duet__Hello *h = duet__hello__unpack(NULL, l, p);
    free(p);
    ck_assert_ptr_nonnull(h);
    char token[512], err[200];
    ck_assert_int_eq(rpc_read_token_file(g_token, token, sizeof token, err, sizeof err), 0);
    ck_assert_msg(rpc_auth_check(token, nonce, sizeof nonce, h->auth_proof.data,
                                 h->auth_proof.len) == 1,
                  "the Hello's auth proof is not HMAC-SHA256(token, nonce)");
    ck_assert_uint_eq(h->protocol_version, RPC_PROTOCOL_VERSION);
    ck_assert_uint_eq(h->rank, 0);
    ck_assert_uint_eq(h->world_size, 1);
    duet__hello__free_unpacked(h, NULL);
    Duet__HelloReply r = DUET__HELLO_REPLY__INIT;
    r.ok = 1;
    r.rank = rank;
    r.world_size = 1;
    r.model_fingerprint = fp;
    r.backend = "fake";
    r.model_path = "/nowhere";
    fake_send(fd, RPC_HELLO_REPLY, &r.base);
}

static Duet__StepPlan *fake_plan(int fd, rpc_decoder *dec, int *n_hb) {
    uint8_t *p;
    size_t l;
    int t = fake_recv(fd, dec, &p, &l, 1, n_hb);
    while (t == RPC_RELEASE) { /* finished sequences are released between steps */
        free(p);
        t = fake_recv(fd, dec, &p, &l, 1, n_hb);
    }
    ck_assert_msg(t == RPC_STEP_PLAN, "expected a StepPlan, got %s", rpc_type_name(t));
    Duet__StepPlan *plan = duet__step_plan__unpack(NULL, l, p);
    free(p);
    ck_assert_ptr_nonnull(plan);
    return plan;
}

/* A successful one-sequence StepResult: token for seq. */
static void fake_answer(int fd, uint64_t step_id, uint64_t seq, int32_t token) {
    Duet__SeqResult sr = DUET__SEQ_RESULT__INIT;
    sr.seq_id = seq;
    sr.token_id = token;
    Duet__SeqResult *srp = &sr;
    Duet__StepResult res = DUET__STEP_RESULT__INIT;
    res.step_id = step_id;
    res.ok = 1;
    res.n_results = 1;
    res.results = &srp;
    fake_send(fd, RPC_STEP_RESULT, &res.base);
}

START_TEST(protocol) {
    int port;
    int lfd = fake_listen(&port);
    worker_proc fake;
    snprintf(fake.addr, sizeof fake.addr, "127.0.0.1:%d", port);
    const char *extra[] = {"--max-seqs", "3", "--max-seq-len", "512", NULL};
    pid_t cp = start_coord(&fake, 1, extra);

    /* garbage: an oversized length, an unknown type, a malformed Challenge. Each connection is
     * closed, and the coordinator comes back */
    int c = fake_accept(lfd, 10000);
    const uint8_t huge[5] = {0xff, 0xff, 0xff, 0x7f, RPC_CHALLENGE};
    fake_send_raw(c, huge, sizeof huge);
    fake_expect_closed(c, 5000, "oversized frame");
    c = fake_accept(lfd, 5000);
    const uint8_t unknown[6] = {2, 0, 0, 0, 99, 0};
    fake_send_raw(c, unknown, sizeof unknown);
    fake_expect_closed(c, 5000, "unknown frame type");
    c = fake_accept(lfd, 5000);
    const uint8_t bad[8] = {4, 0, 0, 0, RPC_CHALLENGE, 0xff, 0xff, 0xff};
    fake_send_raw(c, bad, sizeof bad);
    fake_expect_closed(c, 5000, "malformed Challenge");
    json_t *s = status();
    ck_assert_str_eq(jstr(s, "result", "state"), "starting");
    json_decref(s);

    /* the real thing */
    c = fake_accept(lfd, 5000);
    rpc_decoder *dec = rpc_decoder_new(RPC_MAX_FRAME);
    fake_handshake(c, dec, 0, 0xabcULL);
    uint8_t *p;
    size_t l;
    ck_assert_int_eq(fake_recv(c, dec, &p, &l, 1, NULL), RPC_LOAD_MODEL);
    Duet__LoadModel *lm = duet__load_model__unpack(NULL, l, p);
    free(p);
    ck_assert_ptr_nonnull(lm);
    ck_assert_uint_eq(lm->max_seqs, 3);
    ck_assert_uint_eq(lm->max_seq_len, 512);
    duet__load_model__free_unpacked(lm, NULL);
    Duet__LoadProgress pr = DUET__LOAD_PROGRESS__INIT;
    pr.bytes_done = 50;
    pr.bytes_total = 100;
    fake_send(c, RPC_LOAD_PROGRESS, &pr.base);
    double end = now_ms() + 10000;
    for (;;) { /* progress shows in status */
        s = status();
        double pct = json_number_value(json_object_get(
            json_object_get(json_object_get(s, "result"), "loading"), "percent"));
        json_decref(s);
        if (pct == 50.0) break;
        ck_assert_msg(now_ms() < end, "status never showed 50%% loaded");
        pause_ms(20);
    }
    pr.bytes_done = 100;
    pr.done = 1;
    pr.ok = 1;
    pr.rank_weight_bytes = 1234;
    fake_send(c, RPC_LOAD_PROGRESS, &pr.base);
    s = wait_state("serving", 10000);
    json_t *res = json_object_get(s, "result");
    ck_assert_str_eq(jstr(json_object_get(res, "model"), "fingerprint", NULL), "0000000000000abc");
    ck_assert_int_eq(json_integer_value(json_object_get(
                         json_array_get(json_object_get(res, "workers"), 0), "rank_weight_bytes")),
                     1234);
    json_decref(s);

    /* the canary: a 1-token greedy generation right after the group became ready; the fake
     * worker reports no KV budget, so the plan carries no cache fields */
    int n_hb = 0;
    Duet__StepPlan *plan = fake_plan(c, dec, &n_hb);
    ck_assert_uint_eq(plan->n_chunks, 1);
    ck_assert(plan->chunks[0]->sample);
    ck_assert_uint_eq(plan->chunks[0]->n_restore_blocks, 0);
    ck_assert_uint_eq(plan->chunks[0]->n_save_blocks, 0);
    ck_assert_float_eq(plan->chunks[0]->sampling->temperature, 0);
    fake_answer(c, plan->step_id, plan->chunks[0]->seq_id, 1);
    duet__step_plan__free_unpacked(plan, NULL);
    end = now_ms() + 10000;
    for (;;) { /* warm once the canary's token came back */
        s = status();
        int warm = json_is_true(json_object_get(json_object_get(s, "result"), "warm"));
        json_decref(s);
        if (warm) break;
        ck_assert_msg(now_ms() < end, "status never showed warm after the canary");
        pause_ms(20);
    }

    /* a generate becomes StepPlans: prefill, then one decode token */
    aconn a;
    ck_assert_int_eq(aconn_open(&a, g_sock), 0);
    const int32_t prompt[] = {3, 4, 5};
    aconn_send(&a, gen_req(prompt, 3, 4, 0));
    plan = fake_plan(c, dec, &n_hb);
    ck_assert_uint_eq(plan->n_chunks, 1);
    Duet__SeqChunk *ch = plan->chunks[0];
    ck_assert_uint_eq(ch->start_pos, 0);
    ck_assert_uint_eq(ch->n_token_ids, 3);
    ck_assert_int_eq(ch->token_ids[2], 5);
    ck_assert(ch->sample);
    uint64_t seq = ch->seq_id;
    Duet__SeqResult sr = DUET__SEQ_RESULT__INIT;
    sr.seq_id = seq;
    sr.token_id = 7;
    Duet__SeqResult *srp = &sr;
    Duet__StepResult res1 = DUET__STEP_RESULT__INIT;
    res1.step_id = plan->step_id;
    res1.ok = 1;
    res1.n_results = 1;
    res1.results = &srp;
    fake_send(c, RPC_STEP_RESULT, &res1.base);
    uint64_t step1 = plan->step_id;
    duet__step_plan__free_unpacked(plan, NULL);
    plan = fake_plan(c, dec, &n_hb);
    ck_assert_uint_eq(plan->step_id, step1 + 1);
    ck_assert_uint_eq(plan->chunks[0]->seq_id, seq);
    ck_assert_uint_eq(plan->chunks[0]->start_pos, 3);
    ck_assert_uint_eq(plan->chunks[0]->n_token_ids, 1);
    ck_assert_int_eq(plan->chunks[0]->token_ids[0], 7);
    /* idle heartbeats: at least one since the handshake (1 s interval) */
    end = now_ms() + 5000;
    while (n_hb == 0) {
        ck_assert_msg(now_ms() < end, "no Heartbeat within 5 s");
        uint8_t *q;
        size_t ql;
        int t = fake_recv(c, dec, &q, &ql, 0, NULL);
        free(q);
        if (t == RPC_HEARTBEAT) n_hb++;
    }
    /* a reply for a step that is not in flight: the step fails, the connection closes */
    res1.step_id = plan->step_id + 100;
    fake_send(c, RPC_STEP_RESULT, &res1.base);
    duet__step_plan__free_unpacked(plan, NULL);
    json_t *r = aconn_recv(&a, 10000);
    ck_assert_ptr_nonnull(r);
    ck_assert_str_eq(jstr(r, "error", "code"), "worker_failure");
    ck_assert_msg(strstr(jstr(r, "error", "message"), "not in flight") != NULL, "%s",
                  jstr(r, "error", "message"));
    json_decref(r);
    aconn_close(&a);
    fake_expect_closed(c, 5000, "wrong step id");
    rpc_decoder_free(dec);
    s = status();
    ck_assert_str_eq(jstr(s, "result", "state"), "degraded");
    json_decref(s);

    /* after the first start a wrong rank is not fatal: the worker is retried */
    c = fake_accept(lfd, 5000);
    dec = rpc_decoder_new(RPC_MAX_FRAME);
    fake_handshake(c, dec, 3, 0xabcULL);
    fake_expect_closed(c, 5000, "wrong rank");
    rpc_decoder_free(dec);
    c = fake_accept(lfd, 5000);
    s = status();
    const char *e = json_string_value(json_object_get(
        json_array_get(json_object_get(json_object_get(s, "result"), "workers"), 0), "error"));
    ck_assert_msg(e && strstr(e, "rank 3 of 1"), "w0's error: %s", e ? e : "(none)");
    json_decref(s);
    /* and a different model fingerprint is refused too */
    dec = rpc_decoder_new(RPC_MAX_FRAME);
    fake_handshake(c, dec, 0, 0xdefULL);
    fake_expect_closed(c, 5000, "other fingerprint");
    rpc_decoder_free(dec);
    c = fake_accept(lfd, 5000);
    close(c);
    stop_coord(cp);
    close(lfd);
}
END_TEST

/* ---- drain / resume ----------------------------------------------------------------------- */

static int run_ctl(const char *const *args, char *out, size_t cap) {
    const char *prefix[] = {g_ctl, NULL};
    return run_cmd(prefix, args, "duetctl", "duetctl.log", 30000, out, cap);
}

START_TEST(drain) {
    worker_proc w;
    pid_t cp = start_serving(&w, NULL);

    /* a client that goes away cancels its request at the next step */
    aconn a;
    ck_assert_int_eq(aconn_open(&a, g_sock), 0);
    aconn_send(&a, gen_req(SHORT_A, 8, 3000, 0));
    double end = now_ms() + 60000;
    while (generated_so_far() < 2) {
        ck_assert_msg(now_ms() < end, "the generation did not start within 60 s");
        pause_ms(20);
    }
    aconn_close(&a);
    end = now_ms() + 10000;
    for (;;) {
        json_t *s = status();
        json_t *res = json_object_get(s, "result");
        int running = (int)json_integer_value(json_object_get(json_object_get(res, "queue"),
                                                               "running"));
        int aborted = (int)json_integer_value(json_object_get(json_object_get(res, "counters"),
                                                               "aborted"));
        json_decref(s);
        if (running == 0 && aborted == 1) break;
        ck_assert_msg(now_ms() < end, "a disconnected client's request still runs after 10 s");
        pause_ms(20);
    }

    ck_assert_int_eq(aconn_open(&a, g_sock), 0);
    aconn_send(&a, gen_req(SHORT_A, 8, 120, 0));
    end = now_ms() + 60000;
    while (generated_so_far() < 2) {
        ck_assert_msg(now_ms() < end, "the generation did not start within 60 s");
        pause_ms(20);
    }
    char out[8192];
    const char *drain_args[] = {"-s", g_sock, "drain", NULL};
    ck_assert_int_eq(run_ctl(drain_args, out, sizeof out), 0);
    ck_assert_msg(strstr(out, "draining") != NULL, "duetctl drain printed: %s", out);

    json_t *r = call(gen_req(SHORT_A, 8, 4, 0), 10000);
    ck_assert(r && !json_is_true(json_object_get(r, "ok")));
    ck_assert_str_eq(jstr(r, "error", "code"), "server_draining");
    json_decref(r);
    const char *gen_args[] = {"-s", g_sock, "generate", "--max-tokens", "2", "1 2 3", NULL};
    ck_assert_int_eq(run_ctl(gen_args, out, sizeof out), 1); /* ok:false → 1 */

    /* the in-flight request finishes in full */
    r = aconn_recv(&a, 120000);
    ck_assert(r && json_is_true(json_object_get(r, "ok")));
    ck_assert_int_eq((int)json_array_size(json_object_get(json_object_get(r, "result"),
                                                          "token_ids")), 120);
    ck_assert_str_eq(jstr(json_object_get(r, "result"), "finish_reason", NULL), "length");
    json_decref(r);
    aconn_close(&a);
    json_decref(wait_state("drained", 10000));

    const char *resume_args[] = {"-s", g_sock, "--json", "resume", NULL};
    ck_assert_int_eq(run_ctl(resume_args, out, sizeof out), 0);
    json_t *j = json_loads(out, 0, NULL);
    ck_assert_msg(j && !strcmp(jstr(j, "state", NULL), "serving"), "resume --json: %s", out);
    json_decref(j);
    ck_assert_int_eq(run_ctl(gen_args, out, sizeof out), 0);
    ck_assert_msg(strstr(out, "(length):") != NULL, "duetctl generate printed: %s", out);

    /* drain --wait with nothing in flight answers drained at once */
    const char *wait_args[] = {"-s", g_sock, "--json", "drain", "--wait", "--timeout", "5", NULL};
    ck_assert_int_eq(run_ctl(wait_args, out, sizeof out), 0);
    ck_assert_msg(strstr(out, "\"drained\"") != NULL, "drain --wait printed: %s", out);
    const char *resume2[] = {"-s", g_sock, "resume", NULL};
    ck_assert_int_eq(run_ctl(resume2, out, sizeof out), 0);

    /* drain --timeout: what is still running after it ends with finish_reason "abort" */
    ck_assert_int_eq(aconn_open(&a, g_sock), 0);
    aconn_send(&a, gen_req(SHORT_A, 8, 3000, 0));
    end = now_ms() + 60000;
    while (generated_so_far() < 2) {
        ck_assert_msg(now_ms() < end, "the generation did not start within 60 s");
        pause_ms(20);
    }
    const char *to_args[] = {"-s", g_sock, "--json", "drain", "--timeout", "1", "--wait", NULL};
    double t0 = now_ms();
    ck_assert_int_eq(run_ctl(to_args, out, sizeof out), 0);
    ck_assert_msg(strstr(out, "\"drained\"") != NULL, "drain --timeout --wait printed: %s", out);
    ck_assert_double_lt(now_ms() - t0, 10000);
    r = aconn_recv(&a, 10000);
    ck_assert(r && json_is_true(json_object_get(r, "ok")));
    ck_assert_str_eq(jstr(json_object_get(r, "result"), "finish_reason", NULL), "abort");
    ck_assert_int_lt((int)json_array_size(json_object_get(json_object_get(r, "result"),
                                                          "token_ids")), 3000);
    json_decref(r);
    aconn_close(&a);
    ck_assert_int_eq(run_ctl(resume2, out, sizeof out), 0);

    /* SIGHUP reloads and keeps serving */
    kill(cp, SIGHUP);
    json_decref(wait_state("serving", 10000));

    /* SIGTERM: the in-flight request finishes, then the coordinator exits 0 */
    ck_assert_int_eq(aconn_open(&a, g_sock), 0);
    aconn_send(&a, gen_req(SHORT_A, 8, 40, 0));
    end = now_ms() + 60000;
    while (generated_so_far() < 2) {
        ck_assert_msg(now_ms() < end, "the generation did not start within 60 s");
        pause_ms(20);
    }
    stop_coord(cp);
    r = aconn_recv(&a, 10000);
    char *rd = r ? json_dumps(r, JSON_COMPACT) : xstrdup("(nothing)");
    ck_assert_msg(r && json_is_true(json_object_get(r, "ok")),
                  "the request in flight at SIGTERM should complete; got %.300s", rd);
    free(rd);
    ck_assert_int_eq((int)json_array_size(json_object_get(json_object_get(r, "result"),
                                                          "token_ids")), 40);
    json_decref(r);
    aconn_close(&a);
}
END_TEST

/* ---- the scheduler: prefix cache, preemption, chunking, queue limit ------------------------ */

/* A successful generate's result object (the caller owns the whole response *resp). */
static json_t *gen_ok(json_t *req, json_t **resp) {
    json_t *r = call(req, 300000);
    char *d = r ? json_dumps(r, JSON_COMPACT) : xstrdup("(no answer)");
    ck_assert_msg(r && json_is_true(json_object_get(r, "ok")), "generate failed: %.600s", d);
    free(d);
    *resp = r;
    return json_object_get(r, "result");
}

static json_int_t status_int(const char *obj, const char *field) {
    json_t *s = status();
    ck_assert_ptr_nonnull(s);
    json_int_t v = json_integer_value(json_object_get(json_object_get(json_object_get(s, "result"),
                                                                      obj), field));
    json_decref(s);
    return v;
}

/* The workers must report a KV budget (a worker without block accounting disables the cache:
 * nothing to test then). */
static void require_kv_budget(void) {
    json_int_t cap = status_int("kv", "capacity_tokens");
    ck_assert_msg(cap > 0, "the worker reports no KV budget (capacity_tokens 0)");
}

#define PFX_LEN 600 /* 4 full blocks of 128 and a tail */

/* Prefix hits give logits identical to a cold prefill: the same prompt twice, then an agent-
 * style resend (long shared prefix, changed tail) against its own cold run after a flush. */
START_TEST(prefix) {
    worker_proc w;
    const char *extra[] = {"--block-size", "128", NULL};
    pid_t cp = start_serving(&w, extra);
    require_kv_budget();
    static int32_t p1[PFX_LEN], p2[PFX_LEN];
    for (int i = 0; i < PFX_LEN; i++) p1[i] = p2[i] = (int32_t)((i * 37 + 11) % 1024);
    for (int i = 520; i < PFX_LEN; i++) p2[i] = (int32_t)((i * 53 + 7) % 1024); /* new tail */

    json_t *ra, *rb, *rc, *rd;
    json_t *cold = gen_ok(gen_req(p1, PFX_LEN, 4, 1), &ra);
    ck_assert_int_eq(json_integer_value(json_object_get(cold, "cached_tokens")), 0);
    ck_assert_int_eq(status_int("prefix_cache", "hit_tokens"), 0);
    ck_assert_int_ge(status_int("prefix_cache", "entries"), 4);
    json_t *warm = gen_ok(gen_req(p1, PFX_LEN, 4, 1), &rb);
    ck_assert_int_eq(json_integer_value(json_object_get(warm, "cached_tokens")), 512);
    ck_assert_msg(json_equal(json_object_get(cold, "logits"), json_object_get(warm, "logits")),
                  "logits after a prefix hit differ from the cold prefill");
    ck_assert(json_equal(json_object_get(cold, "token_ids"), json_object_get(warm, "token_ids")));
    ck_assert_int_eq(status_int("prefix_cache", "hit_tokens"), 512);

    /* agent-style resend: the first 520 tokens shared, so 4 blocks (512 tokens) hit */
    json_t *agent = gen_ok(gen_req(p2, PFX_LEN, 4, 1), &rc);
    ck_assert_int_eq(json_integer_value(json_object_get(agent, "cached_tokens")), 512);
    ck_assert_int_eq(status_int("prefix_cache", "hit_tokens"), 1024);
    ck_assert_int_eq(status_int("prefix_cache", "queried_tokens"), 3 * PFX_LEN);
    json_t *s = status();
    double rate = json_number_value(json_object_get(
        json_object_get(json_object_get(s, "result"), "prefix_cache"), "hit_rate"));
    printf("prefix: hit rate after cold, same, agent-style: %.3f (1024 of %d tokens)\n", rate,
           3 * PFX_LEN);
    ck_assert(fabs(rate - 1024.0 / (3 * PFX_LEN)) < 1e-6);
    json_decref(s);

    /* flush frees every cached block; the agent prompt run cold matches its cached run */
    char out[4096];
    ck_assert_int_eq(status_int("prefix_cache", "entries"), 4);
    ck_assert_int_gt(status_int("kv", "used_tokens"), 0);
    const char *flush_args[] = {"-s", g_sock, "--json", "flush-prefix-cache", NULL};
    ck_assert_int_eq(run_ctl(flush_args, out, sizeof out), 0);
    json_t *f = json_loads(out, 0, NULL);
    /* 4 blocks: both prompts share blocks 0-3 and neither fills a fifth */
    ck_assert_msg(f && json_integer_value(json_object_get(f, "freed_tokens")) == 4 * 128 &&
                      json_integer_value(json_object_get(f, "freed_bytes")) > 0,
                  "flush-prefix-cache printed %s", out);
    json_decref(f);
    ck_assert_int_eq(status_int("prefix_cache", "entries"), 0);
    ck_assert_int_eq(status_int("kv", "used_tokens"), 0);
    json_t *agent_cold = gen_ok(gen_req(p2, PFX_LEN, 4, 1), &rd);
    ck_assert_int_eq(json_integer_value(json_object_get(agent_cold, "cached_tokens")), 0);
    ck_assert_msg(json_equal(json_object_get(agent, "logits"), json_object_get(agent_cold, "logits")),
                  "the agent-style prompt's logits with a prefix hit differ from a cold run");
    /* n = 3 choices of a new prompt: choices 1 and 2 wait one step for choice 0's blocks and
     * take them from the cache (greedy: all three the same tokens) */
    static int32_t p3[PFX_LEN];
    for (int i = 0; i < PFX_LEN; i++) p3[i] = (int32_t)((i * 71 + 3) % 1024);
    json_t *req3 = gen_req(p3, PFX_LEN, 3, 0), *re;
    json_object_set_new(req3, "n", json_integer(3));
    json_t *three = json_object_get(gen_ok(req3, &re), "choices");
    ck_assert_uint_eq(json_array_size(three), 3);
    ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(three, 0), "cached_tokens")), 0);
    for (size_t i = 1; i < 3; i++) {
        json_t *ch = json_array_get(three, i);
        ck_assert_int_eq(json_integer_value(json_object_get(ch, "cached_tokens")), 512);
        ck_assert(json_equal(json_object_get(ch, "token_ids"),
                             json_object_get(json_array_get(three, 0), "token_ids")));
    }
    json_decref(ra);
    json_decref(rb);
    json_decref(rc);
    json_decref(rd);
    json_decref(re);
    stop_coord(cp);
}
END_TEST

/* A KV budget too small for every sequence at once: sequences are preempted and recomputed,
 * and every output equals the request run alone. */
START_TEST(preempt) {
    worker_proc w;
    const char *wextra[] = {"--kv-memory-mb", "2", NULL};
    start_worker_ex(&w, 0, 1, NULL, 0, g_token, wextra);
    const char *extra[] = {"--block-size", "128", "--max-num-seqs", "4", NULL};
    pid_t cp = start_coord(&w, 1, extra);
    json_decref(wait_state("serving", 60000));
    wait_warm(60000);
    require_kv_budget();
    json_int_t cap = status_int("kv", "capacity_tokens");
    enum { N = 4, PLEN = 100, GEN = 200 };
    /* alone, each fits (3 blocks); together (12 blocks) they cannot */
    ck_assert_msg(cap >= 3 * 128 && cap < N * 3 * 128,
                  "capacity %lld tokens does not make this test meaningful", (long long)cap);
    int32_t prompts[N][PLEN];
    char solo[N][4096], got[4096];
    for (int i = 0; i < N; i++) {
        for (int k = 0; k < PLEN; k++) prompts[i][k] = (int32_t)((i * 211 + k * 13) % 1024);
        json_t *r = call(gen_req(prompts[i], PLEN, GEN, 0), 120000);
        ck_assert(r && json_is_true(json_object_get(r, "ok")));
        tokens_str(r, solo[i], sizeof solo[i]);
        json_decref(r);
    }
    const char *flush_args[] = {"-s", g_sock, "flush-prefix-cache", NULL};
    ck_assert_int_eq(run_ctl(flush_args, got, sizeof got), 0); /* no hits: recompute all */
    aconn c[N];
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(aconn_open(&c[i], g_sock), 0);
        aconn_send(&c[i], gen_req(prompts[i], PLEN, GEN, 0));
    }
    for (int i = 0; i < N; i++) {
        json_t *r = aconn_recv(&c[i], 120000);
        char *d = r ? json_dumps(r, JSON_COMPACT) : xstrdup("(none)");
        ck_assert_msg(r && json_is_true(json_object_get(r, "ok")), "request %d: %.300s", i, d);
        free(d);
        tokens_str(r, got, sizeof got);
        ck_assert_msg(!strcmp(got, solo[i]), "request %d under preemption gave\n%s\nalone\n%s", i,
                      got, solo[i]);
        json_decref(r);
        aconn_close(&c[i]);
    }
    json_int_t pre = status_int("counters", "preempted");
    printf("preempt: %lld preemptions with capacity %lld tokens\n", (long long)pre,
           (long long)cap);
    ck_assert_int_gt(pre, 0);
    ck_assert_int_eq(status_int("kv", "live_tokens"), 0); /* every sequence's blocks freed */
    stop_coord(cp);
}
END_TEST

/* --max-num-batched-tokens cuts a long prompt into chunks: tokens identical to one prefill
 * (duet-generate's), and a decode running meanwhile is unaffected. */
START_TEST(chunking) {
    worker_proc w;
    const char *extra[] = {"--max-num-batched-tokens", "64", "--block-size", "128", NULL};
    pid_t cp = start_serving(&w, extra);
    static int32_t p[300];
    for (int i = 0; i < 300; i++) p[i] = (int32_t)((i * 29 + 3) % 1024);
    char golden[1024], golden_a[1024];
    golden_tokens(p, 300, N_NEW, golden, sizeof golden);
    golden_tokens(SHORT_A, 8, 40, golden_a, sizeof golden_a);
    expect_tokens(call(gen_req(p, 300, N_NEW, 0), 120000), golden);
    /* a decode in flight while the long prompt is prefilled in 64-token chunks */
    const char *flush_args[] = {"-s", g_sock, "flush-prefix-cache", NULL};
    char out[256];
    ck_assert_int_eq(run_ctl(flush_args, out, sizeof out), 0);
    aconn a, b;
    ck_assert_int_eq(aconn_open(&a, g_sock), 0);
    ck_assert_int_eq(aconn_open(&b, g_sock), 0);
    aconn_send(&a, gen_req(SHORT_A, 8, 40, 0));
    aconn_send(&b, gen_req(p, 300, N_NEW, 0));
    json_t *ra = aconn_recv(&a, 120000), *rb = aconn_recv(&b, 120000);
    expect_tokens(ra, golden_a);
    expect_tokens(rb, golden);
    aconn_close(&a);
    aconn_close(&b);
    stop_coord(cp);
}
END_TEST

/* --max-waiting: a full waiting queue refuses with server_overloaded at once. */
START_TEST(overload) {
    worker_proc w;
    const char *extra[] = {"--max-num-seqs", "1", "--max-waiting", "1", NULL};
    pid_t cp = start_serving(&w, extra);
    aconn a, b;
    ck_assert_int_eq(aconn_open(&a, g_sock), 0);
    ck_assert_int_eq(aconn_open(&b, g_sock), 0);
    aconn_send(&a, gen_req(SHORT_A, 8, 3000, 0)); /* runs */
    aconn_send(&b, gen_req(SHORT_B, 6, 4, 0));    /* waits (one slot) */
    double end = now_ms() + 60000;
    while (status_int("queue", "waiting") < 1 || status_int("queue", "running") < 1) {
        ck_assert_msg(now_ms() < end, "the queue never held one running and one waiting");
        pause_ms(10);
    }
    json_t *r = call(gen_req(SHORT_B, 6, 4, 0), 10000);
    ck_assert(r && !json_is_true(json_object_get(r, "ok")));
    ck_assert_str_eq(jstr(r, "error", "code"), "server_overloaded");
    ck_assert_msg(strstr(jstr(r, "error", "message"), "--max-waiting 1") != NULL, "%s",
                  jstr(r, "error", "message"));
    json_decref(r);
    ck_assert_int_eq(status_int("counters", "rejected"), 1);
    /* end the long one: the waiting one runs and completes */
    json_t *ab = call(json_pack("{s:s, s:s}", "cmd", "abort", "request_id", "gen-1"), 10000);
    ck_assert(ab && json_is_true(json_object_get(ab, "ok")));
    json_decref(ab);
    r = aconn_recv(&a, 30000);
    ck_assert_str_eq(jstr(json_object_get(r, "result"), "finish_reason", NULL), "abort");
    json_decref(r);
    r = aconn_recv(&b, 30000);
    ck_assert(r && json_is_true(json_object_get(r, "ok")));
    json_decref(r);
    aconn_close(&a);
    aconn_close(&b);
    stop_coord(cp);
}
END_TEST

/* ---- admin socket ------------------------------------------------------------------------ */

START_TEST(admin) {
    worker_proc w;
    pid_t cp = start_serving(&w, NULL);

    struct stat st;
    char dir[320];
    snprintf(dir, sizeof dir, "%s/admin", g_dir);
    ck_assert_int_eq(stat(dir, &st), 0);
    ck_assert_int_eq(st.st_mode & 0777, 0700);
    ck_assert_int_eq(lstat(g_sock, &st), 0);
    ck_assert(S_ISSOCK(st.st_mode));
    ck_assert_int_eq(st.st_mode & 0777, 0600);

    /* bad lines get bad_request and the connection stays usable; answers keep the id */
    aconn c;
    ck_assert_int_eq(aconn_open(&c, g_sock), 0);
    static const char *const bad[] = {"{not json", "[1,2]", "{\"id\":7}", "\"status\""};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        aconn_send_raw(&c, bad[i], strlen(bad[i]));
        aconn_send_raw(&c, "\n", 1);
        json_t *r = aconn_recv(&c, 10000);
        ck_assert_msg(r != NULL, "no answer to bad line '%s'", bad[i]);
        ck_assert(!json_is_true(json_object_get(r, "ok")));
        ck_assert_str_eq(jstr(r, "error", "code"), "bad_request");
        json_decref(r);
    }
    aconn_send(&c, json_pack("{s:s, s:s}", "id", "x1", "cmd", "no-such-thing"));
    json_t *r = aconn_recv(&c, 10000);
    ck_assert_str_eq(jstr(r, "error", "code"), "unknown_command");
    ck_assert_str_eq(jstr(r, "id", NULL), "x1");
    json_decref(r);
    /* two requests in one write: two answers, in order */
    const char *two = "{\"id\":1,\"cmd\":\"status\"}\n{\"id\":2,\"cmd\":\"reload\"}\n";
    aconn_send_raw(&c, two, strlen(two));
    r = aconn_recv(&c, 10000);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "id")), 1);
    ck_assert_str_eq(jstr(r, "result", "state"), "serving");
    json_decref(r);
    r = aconn_recv(&c, 10000);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "id")), 2);
    ck_assert(json_is_array(json_object_get(json_object_get(r, "result"), "workers")));
    json_decref(r);

    /* a client that half-closes after its lines still gets every answer, then EOF */
    aconn h;
    ck_assert_int_eq(aconn_open(&h, g_sock), 0);
    aconn_send_raw(&h, two, strlen(two));
    shutdown(h.fd, SHUT_WR);
    for (int k = 1; k <= 2; k++) {
        r = aconn_recv(&h, 10000);
        ck_assert_msg(r != NULL, "half-closed client: answer %d missing", k);
        ck_assert_int_eq(json_integer_value(json_object_get(r, "id")), k);
        json_decref(r);
    }
    ck_assert_ptr_null(aconn_recv(&h, 10000));
    aconn_close(&h);

    /* at most 8 connections: the 9th is refused (c is the first) */
    aconn more[8];
    for (int i = 0; i < 7; i++) ck_assert_int_eq(aconn_open(&more[i], g_sock), 0);
    /* make sure all 8 are accepted before the 9th: each answers a status */
    for (int i = 0; i < 7; i++) {
        aconn_send(&more[i], json_pack("{s:s}", "cmd", "status"));
        json_t *x = aconn_recv(&more[i], 10000);
        ck_assert(x && json_is_true(json_object_get(x, "ok")));
        json_decref(x);
    }
    ck_assert_int_eq(aconn_open(&more[7], g_sock), 0);
    r = aconn_recv(&more[7], 10000);
    ck_assert_msg(r != NULL, "the 9th connection should get an answer before being closed");
    ck_assert_str_eq(jstr(r, "error", "code"), "conflict");
    json_decref(r);
    ck_assert_ptr_null(aconn_recv(&more[7], 10000)); /* closed */
    aconn_close(&more[7]);
    for (int i = 0; i < 7; i++) aconn_close(&more[i]);

    /* a line over 64 KiB: bad_request, then the connection is closed */
    char *big = xmalloc(70000);
    memset(big, ' ', 70000);
    aconn_send_raw(&c, big, 70000);
    free(big);
    r = aconn_recv(&c, 10000);
    ck_assert(r != NULL);
    ck_assert_str_eq(jstr(r, "error", "code"), "bad_request");
    json_decref(r);
    ck_assert_ptr_null(aconn_recv(&c, 10000));
    aconn_close(&c);

    /* duetctl: human and --json status, exit codes */
    char out[16384];
    const char *s1[] = {"-s", g_sock, "status", NULL};
    ck_assert_int_eq(run_ctl(s1, out, sizeof out), 0);
    ck_assert_msg(strstr(out, "state: serving") && strstr(out, w.addr), "status: %s", out);
    const char *s2[] = {"-s", g_sock, "--json", "status", "-v", NULL};
    ck_assert_int_eq(run_ctl(s2, out, sizeof out), 0);
    json_t *j = json_loads(out, 0, NULL);
    ck_assert_msg(j && json_is_array(json_object_get(j, "requests")), "status --json: %s", out);
    ck_assert_str_eq(jstr(json_array_get(json_object_get(j, "workers"), 0), "state", NULL), "up");
    json_decref(j);
    const char *s3[] = {"-s", g_sock, "reload", NULL};
    ck_assert_int_eq(run_ctl(s3, out, sizeof out), 0);
    const char *s4[] = {"-s", g_sock, "abort", "gen-999", NULL};
    ck_assert_int_eq(run_ctl(s4, out, sizeof out), 1);
    const char *s5[] = {"-s", g_sock, "frobnicate", NULL};
    ck_assert_int_eq(run_ctl(s5, out, sizeof out), 2);
    char nosock[320];
    snprintf(nosock, sizeof nosock, "%s/nothing.sock", g_dir);
    const char *s6[] = {"-s", nosock, "status", NULL};
    ck_assert_int_eq(run_ctl(s6, out, sizeof out), 2);

    /* a second coordinator on the same socket refuses to start and leaves it alone */
    char clog1[300];
    snprintf(clog1, sizeof clog1, "%s", g_clog);
    snprintf(g_clog, sizeof g_clog, "%s/coordinator2.log", g_dir);
    pid_t cp2 = start_coord(&w, 1, NULL);
    int st2 = wait_exit(cp2, 30000);
    ck_assert(st2 != -1 && WIFEXITED(st2) && WEXITSTATUS(st2) != 0);
    char *log = slurp(g_clog);
    ck_assert_msg(strstr(log, "another coordinator is listening") != NULL, "%s", log);
    free(log);
    snprintf(g_clog, sizeof g_clog, "%s", clog1);
    json_decref(wait_state("serving", 10000));

    /* kill -9 leaves a stale socket file; the next coordinator removes it and serves */
    kill(cp, SIGKILL);
    ck_assert_int_ne(wait_exit(cp, 10000), -1);
    ck_assert_int_eq(lstat(g_sock, &st), 0);
    cp = start_coord(&w, 1, NULL);
    json_decref(wait_state("serving", 60000));
    stop_coord(cp);
    ck_assert_int_ne(lstat(g_sock, &st), 0); /* removed on exit */

    /* no --admin-socket: coordinator and duetctl agree on the default (§12 order) */
    char xdg[320], def[400];
    snprintf(xdg, sizeof xdg, "%s/xdg", g_dir);
    ck_assert_int_eq(mkdir(xdg, 0700), 0);
    setenv("XDG_RUNTIME_DIR", xdg, 1);
    struct stat rd;
    if (stat("/run/duet", &rd) == 0 && S_ISDIR(rd.st_mode) && access("/run/duet", W_OK) == 0)
        snprintf(def, sizeof def, "/run/duet/admin.sock");
    else
        snprintf(def, sizeof def, "%s/duet/admin.sock", xdg);
    char *argv[] = {(char *)g_coord, "--workers", w.addr, "--auth-token-file", g_token, NULL};
    cp = spawn(argv, NULL, g_clog);
    double end = now_ms() + 30000;
    const char *s7[] = {"status", NULL};
    while (run_ctl(s7, out, sizeof out) != 0) {
        ck_assert_msg(now_ms() < end, "duetctl without -s never reached the coordinator");
        pause_ms(50);
    }
    ck_assert_int_eq(lstat(def, &st), 0);
    ck_assert(S_ISSOCK(st.st_mode));
    stop_coord(cp);
}
END_TEST

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: test_cluster CASE WORKER COORDINATOR DUETCTL GENERATE MODEL "
                        "FIXTURE SCRIPT BUILD_ROOT\n");
        return 2;
    }
    g_script = argv[8];
    g_build = argv[9];
    g_worker = argv[2];
    g_coord = argv[3];
    g_ctl = argv[4];
    g_generate = argv[5];
    g_model = argv[6];
    g_fixture = argv[7];
    signal(SIGPIPE, SIG_IGN);
    snprintf(g_root, sizeof g_root, "/tmp/duet-cluster-XXXXXX");
    if (!mkdtemp(g_root)) {
        perror("mkdtemp");
        return 1;
    }
    Suite *s = suite_create("cluster");
    TCase *tc = tcase_create(argv[1]);
    tcase_set_timeout(tc, 900);
    tcase_add_checked_fixture(tc, setup, teardown);
    if (!strcmp(argv[1], "equivalence")) tcase_add_test(tc, equivalence);
    else if (!strcmp(argv[1], "auth")) tcase_add_test(tc, auth);
    else if (!strcmp(argv[1], "recover")) tcase_add_test(tc, recover);
    else if (!strcmp(argv[1], "recover-idle")) tcase_add_test(tc, recover_idle);
    else if (!strcmp(argv[1], "hung")) tcase_add_test(tc, hung);
    else if (!strcmp(argv[1], "protocol")) tcase_add_test(tc, protocol);
    else if (!strcmp(argv[1], "batching")) tcase_add_test(tc, batching);
    else if (!strcmp(argv[1], "deploy")) tcase_add_test(tc, deploy);
    else if (!strcmp(argv[1], "drain")) tcase_add_test(tc, drain);
    else if (!strcmp(argv[1], "admin")) tcase_add_test(tc, admin);
    else if (!strcmp(argv[1], "prefix")) tcase_add_test(tc, prefix);
    else if (!strcmp(argv[1], "preempt")) tcase_add_test(tc, preempt);
    else if (!strcmp(argv[1], "chunking")) tcase_add_test(tc, chunking);
    else if (!strcmp(argv[1], "overload")) tcase_add_test(tc, overload);
    else {
        fprintf(stderr, "test_cluster: unknown case %s\n", argv[1]);
        return 2;
    }
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    remove_root();
    return failed ? 1 : 0;
}
