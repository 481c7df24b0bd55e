/* duetctl.c — the operator's command line for a running duet-coordinator (admin socket).
 *
 * Why: drain before maintenance, resume after, reload, look at the workers — without HTTP and
 * without a network port. It speaks the line-delimited JSON of spec/server-api.md §12: one
 * request line out, one response line back, printed for humans or raw (--json).
 * Exit codes: 0 ok, 1 the server answered ok:false, 2 usage error or socket unreachable.
 * It must never hang on connect (the socket is local: connect fails or succeeds at once) and
 * never guess: an unknown command is a usage error, not a request.
 *
 *   duetctl [-s SOCKET] [--json] status [-v] | drain [--timeout S] [--wait] | resume | reload
 *           | abort REQUEST_ID | flush-prefix-cache
 *           | generate [--max-tokens N] [--logits] [--temperature T] [--seed S] ID [ID...]
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <jansson.h>

#include "common/err.h"
#include "coordinator/admin.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: duetctl [-s SOCKET] [--json] COMMAND [ARGS]\n"
            "commands:\n"
            "  status [-v]                     server state, workers, queue, counters\n"
            "  drain [--timeout S] [--wait]    stop admitting; in-flight requests finish\n"
            "  resume                          admit requests again\n"
            "  reload                          reconnect workers that are down\n"
            "  abort REQUEST_ID                end one request at the next step\n"
            "  flush-prefix-cache              drop unused prefix-cache entries\n"
            "  generate [--max-tokens N] [--logits] [--temperature T] [--seed S] ID...\n"
            "                                  (testing/debug) generate from token ids\n"
            "The socket defaults to /run/duet/admin.sock, $XDG_RUNTIME_DIR/duet/admin.sock or\n"
            "/tmp/duet-UID/admin.sock (the coordinator's --admin-socket default).\n"
            "Exit: 0 ok, 1 the server refused, 2 usage error or socket unreachable.\n");
}

static int usage_err(const char *fmt, const char *arg) {
    fprintf(stderr, "duetctl: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n(duetctl --help for usage)\n");
    return 2;
}

/* ---- transport --------------------------------------------------------------------------- */

static int connect_sock(const char *path) {
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sa.sun_path) {
        fprintf(stderr, "duetctl: socket path %s is too long\n", path);
        return -1;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        fprintf(stderr,
                "duetctl: cannot connect to %s: %s (is duet-coordinator running? pass its "
                "--admin-socket with -s)\n",
                path, strerror(errno));
        if (fd >= 0) close(fd);
        return -1;
    }
    return fd;
}

/* Sends one request line and reads one response line. */
static json_t *roundtrip(int fd, json_t *req) {
    char *line = json_dumps(req, JSON_COMPACT);
    size_t len = strlen(line);
    line = realloc(line, len + 2);
    if (!line) return NULL;
    line[len++] = '\n';
    for (size_t off = 0; off < len;) {
        ssize_t w = write(fd, line + off, len - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            fprintf(stderr, "duetctl: cannot send the request: %s\n", strerror(errno));
            free(line);
            return NULL;
        }
        off += (size_t)w;
    }
    free(line);
    size_t cap = 65536, n = 0;
    char *buf = xmalloc(cap);
    for (;;) {
        if (n + 1 >= cap) buf = xrealloc(buf, cap *= 2);
        ssize_t r = read(fd, buf + n, cap - n - 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            fprintf(stderr, "duetctl: the coordinator closed the connection without an answer\n");
            free(buf);
            return NULL;
        }
        char *nl = memchr(buf + n, '\n', (size_t)r);
        n += (size_t)r;
        if (nl) {
            json_error_t je;
            json_t *resp = json_loadb(buf, (size_t)(nl - buf), 0, &je);
            if (!resp || !json_is_object(resp))
                fprintf(stderr, "duetctl: the answer is not a JSON object: %s\n", je.text);
            free(buf);
            return resp;
        }
    }
}

/* ---- human output ------------------------------------------------------------------------- */

static void print_status(json_t *r) {
    json_t *ls = json_object_get(r, "last_step_age_ms");
    printf("state: %s   uptime %lld s   last step %s", json_string_value(json_object_get(r, "state")),
           (long long)json_integer_value(json_object_get(r, "uptime_s")),
           json_is_integer(ls) ? "" : "never");
    if (json_is_integer(ls)) printf("%lld ms ago", (long long)json_integer_value(ls));
    printf("\n");
    json_t *m = json_object_get(r, "model");
    printf("model: fingerprint %s, max_model_len %lld\n",
           json_string_value(json_object_get(m, "fingerprint")),
           (long long)json_integer_value(json_object_get(m, "max_model_len")));
    json_t *l = json_object_get(r, "loading");
    double total = (double)json_integer_value(json_object_get(l, "bytes_total"));
    if (total > 0)
        printf("loading: %.0f%% (%.1f of %.1f MiB)\n",
               json_number_value(json_object_get(l, "percent")),
               (double)json_integer_value(json_object_get(l, "bytes_done")) / 1048576.0,
               total / 1048576.0);
    printf("workers:\n");
    size_t i;
    json_t *w;
    json_array_foreach(json_object_get(r, "workers"), i, w) {
        json_t *hb = json_object_get(w, "last_heartbeat_ms");
        json_t *e = json_object_get(w, "error");
        printf("  %-4s %-22s %-10s", json_string_value(json_object_get(w, "name")),
               json_string_value(json_object_get(w, "addr")),
               json_string_value(json_object_get(w, "state")));
        if (json_is_integer(hb)) printf(" heartbeat %lld ms ago", (long long)json_integer_value(hb));
        printf(" weights %.1f MiB, %lld steps",
               (double)json_integer_value(json_object_get(w, "rank_weight_bytes")) / 1048576.0,
               (long long)json_integer_value(json_object_get(w, "steps_done")));
        json_t *p50 = json_object_get(w, "step_ms_p50");
        if (json_is_number(p50)) printf(", step p50 %.1f ms", json_number_value(p50));
        if (json_is_string(e)) printf("\n       last error: %s", json_string_value(e));
        printf("\n");
    }
    json_t *q = json_object_get(r, "queue");
    printf("queue: %lld running, %lld waiting (max %lld running, %lld waiting)\n",
           (long long)json_integer_value(json_object_get(q, "running")),
           (long long)json_integer_value(json_object_get(q, "waiting")),
           (long long)json_integer_value(json_object_get(q, "max_running")),
           (long long)json_integer_value(json_object_get(q, "max_waiting")));
    json_t *kv = json_object_get(r, "kv"), *pc = json_object_get(r, "prefix_cache");
    if (json_integer_value(json_object_get(kv, "capacity_tokens")) > 0)
        printf("kv: %.1f%% used (%lld of %lld tokens, blocks of %lld)\n",
               100.0 * json_number_value(json_object_get(kv, "usage_perc")),
               (long long)json_integer_value(json_object_get(kv, "used_tokens")),
               (long long)json_integer_value(json_object_get(kv, "capacity_tokens")),
               (long long)json_integer_value(json_object_get(kv, "block_size")));
    else if (kv)
        printf("kv: the workers report no KV budget (prefix cache off)\n");
    if (pc)
        printf("prefix cache: hit rate %.1f%%, %lld entries, %lld tokens cached\n",
               100.0 * json_number_value(json_object_get(pc, "hit_rate")),
               (long long)json_integer_value(json_object_get(pc, "entries")),
               (long long)json_integer_value(json_object_get(pc, "cached_tokens")));
    json_t *c = json_object_get(r, "counters");
    printf("requests: %lld completed, %lld failed, %lld aborted, %lld rejected, %lld preempted\n",
           (long long)json_integer_value(json_object_get(c, "completed")),
           (long long)json_integer_value(json_object_get(c, "failed")),
           (long long)json_integer_value(json_object_get(c, "aborted")),
           (long long)json_integer_value(json_object_get(c, "rejected")),
           (long long)json_integer_value(json_object_get(c, "preempted")));
    json_t *reqs = json_object_get(r, "requests");
    if (json_is_array(reqs)) {
        printf("in flight:\n");
        json_array_foreach(reqs, i, w)
            printf("  %-10s %-8s prompt %lld, generated %lld of %lld\n",
                   json_string_value(json_object_get(w, "request_id")),
                   json_string_value(json_object_get(w, "state")),
                   (long long)json_integer_value(json_object_get(w, "prompt_tokens")),
                   (long long)json_integer_value(json_object_get(w, "generated")),
                   (long long)json_integer_value(json_object_get(w, "max_tokens")));
    }
}

static void print_human(const char *cmd, json_t *r) {
    if (!strcmp(cmd, "status")) {
        print_status(r);
    } else if (!strcmp(cmd, "drain") || !strcmp(cmd, "resume")) {
        json_t *n = json_object_get(r, "in_flight");
        printf("state: %s", json_string_value(json_object_get(r, "state")));
        if (json_is_integer(n)) printf(", %lld in flight", (long long)json_integer_value(n));
        printf("\n");
    } else if (!strcmp(cmd, "reload")) {
        size_t i;
        json_t *w;
        printf("reload: reconnecting workers that are down\n");
        json_array_foreach(json_object_get(r, "workers"), i, w)
            printf("  %-4s %-22s %s\n", json_string_value(json_object_get(w, "name")),
                   json_string_value(json_object_get(w, "addr")),
                   json_string_value(json_object_get(w, "state")));
    } else if (!strcmp(cmd, "generate")) {
        size_t i;
        json_t *v;
        printf("%s (%s):", json_string_value(json_object_get(r, "request_id")),
               json_string_value(json_object_get(r, "finish_reason")));
        json_array_foreach(json_object_get(r, "token_ids"), i, v)
            printf(" %lld", (long long)json_integer_value(v));
        printf("\n");
        json_t *lg = json_object_get(r, "logits");
        if (json_is_array(lg)) printf("(%zu logit rows; --json prints them)\n", json_array_size(lg));
    } else if (!strcmp(cmd, "flush-prefix-cache")) {
        printf("freed %lld tokens\n",
               (long long)json_integer_value(json_object_get(r, "freed_tokens")));
    } else {
        printf("ok\n");
    }
}

/* ---- commands ------------------------------------------------------------------------------ */

static int parse_double(const char *s, double *out) {
    char *end;
    *out = strtod(s, &end);
    return end != s && !*end;
}

/* Builds the request for argv (command and its arguments); NULL after printing a usage error. */
static json_t *build_request(int argc, char **argv) {
    const char *cmd = argv[0];
    json_t *req = json_pack("{s:i, s:s}", "id", 1, "cmd", cmd);
    optind = 1;
    if (!strcmp(cmd, "status")) {
        static const struct option o[] = {{"verbose", no_argument, 0, 'v'}, {0, 0, 0, 0}};
        int c;
        while ((c = getopt_long(argc, argv, "v", o, NULL)) != -1) {
            if (c != 'v') goto bad;
            json_object_set_new(req, "verbose", json_true());
        }
    } else if (!strcmp(cmd, "drain")) {
        static const struct option o[] = {
            {"timeout", required_argument, 0, 't'}, {"wait", no_argument, 0, 'w'}, {0, 0, 0, 0}};
        int c;
        double v;
        while ((c = getopt_long(argc, argv, "t:w", o, NULL)) != -1) {
            if (c == 't') {
                if (!parse_double(optarg, &v) || v < 0) {
                    usage_err("drain --timeout: '%s' is not a number of seconds >= 0", optarg);
                    json_decref(req);
                    return NULL;
                }
                json_object_set_new(req, "timeout_s", json_real(v));
            } else if (c == 'w') {
                json_object_set_new(req, "wait", json_true());
            } else {
                goto bad;
            }
        }
    } else if (!strcmp(cmd, "abort")) {
        if (argc != 2) goto bad;
        json_object_set_new(req, "request_id", json_string(argv[1]));
        optind = 2;
    } else if (!strcmp(cmd, "generate")) {
        static const struct option o[] = {{"max-tokens", required_argument, 0, 'n'},
                                          {"logits", no_argument, 0, 'l'},
                                          {"temperature", required_argument, 0, 't'},
                                          {"seed", required_argument, 0, 's'},
                                          {0, 0, 0, 0}};
        int c;
        double v;
        while ((c = getopt_long(argc, argv, "n:lt:s:", o, NULL)) != -1) {
            if (c == 'l') {
                json_object_set_new(req, "return_logits", json_true());
                continue;
            }
            if (c != 'n' && c != 't' && c != 's') goto bad;
            if (!parse_double(optarg, &v) || v < 0 || (c != 't' && v != (double)(long long)v)) {
                usage_err("generate: '%s' is not a valid number for this option", optarg);
                json_decref(req);
                return NULL;
            }
            json_object_set_new(req, c == 'n' ? "max_tokens" : c == 't' ? "temperature" : "seed",
                                c == 't' ? json_real(v) : json_integer((json_int_t)v));
        }
        json_t *ids = json_array();
        for (; optind < argc; optind++) {
            char *s = argv[optind];
            while (*s) {
                while (*s == ' ' || *s == ',') s++;
                if (!*s) break;
                char *end;
                long long id = strtoll(s, &end, 10);
                if (end == s || id < 0) {
                    json_decref(ids);
                    json_decref(req);
                    usage_err("generate: '%s' is not a token id", s);
                    return NULL;
                }
                json_array_append_new(ids, json_integer(id));
                s = end;
            }
        }
        if (!json_array_size(ids)) {
            json_decref(ids);
            json_decref(req);
            usage_err("generate: give the prompt's token ids%s", "");
            return NULL;
        }
        json_object_set_new(req, "prompt_ids", ids);
    } else if (strcmp(cmd, "resume") && strcmp(cmd, "reload") &&
               strcmp(cmd, "flush-prefix-cache")) {
        json_decref(req);
        usage_err("unknown command '%s'", cmd);
        return NULL;
    }
    if (optind != argc) goto bad;
    return req;
bad:
    json_decref(req);
    usage_err("bad arguments for '%s'", cmd);
    return NULL;
}

int main(int argc, char **argv) {
    const char *sock = NULL;
    int raw = 0;
    static const struct option opts[] = {{"socket", required_argument, 0, 's'},
                                         {"json", no_argument, 0, 'j'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "+s:jh", opts, NULL)) != -1) {
        switch (o) {
        case 's': sock = optarg; break;
        case 'j': raw = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return 2;
    }
    char **cargv = argv + optind;
    int cargc = argc - optind;
    const char *cmd = cargv[0];
    json_t *req = build_request(cargc, cargv);
    if (!req) return 2;
    char path[256], err[256];
    if (!sock) {
        if (admin_default_path(path, sizeof path, err, sizeof err)) {
            fprintf(stderr, "duetctl: %s\n", err);
            json_decref(req);
            return 2;
        }
        sock = path;
    }
    int fd = connect_sock(sock);
    if (fd < 0) {
        json_decref(req);
        return 2;
    }
    json_t *resp = roundtrip(fd, req);
    close(fd);
    json_decref(req);
    if (!resp) return 2;
    int rc;
    if (json_is_true(json_object_get(resp, "ok"))) {
        json_t *result = json_object_get(resp, "result");
        if (raw) {
            char *s = json_dumps(result, JSON_COMPACT | JSON_REAL_PRECISION(9));
            printf("%s\n", s);
            free(s);
        } else {
            print_human(cmd, result);
        }
        rc = 0;
    } else {
        json_t *e = json_object_get(resp, "error");
        if (raw) {
            char *s = json_dumps(e, JSON_COMPACT);
            printf("%s\n", s);
            free(s);
        }
        fprintf(stderr, "duetctl: %s: %s\n", json_string_value(json_object_get(e, "code")),
                json_string_value(json_object_get(e, "message")));
        rc = 1;
    }
    json_decref(resp);
    return rc;
}
