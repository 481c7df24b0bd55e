/* http.c — the OpenAI-compatible HTTP API of duet-coordinator on libevent's evhttp: the
 * listener, routing, authentication and body intake.
 *
 * Why: see http.h. This file decides which handler a request reaches and refuses what no
 * handler should see (unknown paths 404, wrong methods 405 with Allow, missing keys 401, bodies
 * over the limit 413, bodies that are not a JSON object 400); the handlers live in hparse.c +
 * hgen.c + hresp.c (generation), hops.c (everything else). A body larger than 4 x
 * max_body_bytes is refused by evhttp itself (413 with its own HTML body); between the limit
 * and that, duet answers the JSON 413.
 */
#include "coordinator/http/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>

#include "common/err.h"
#include "coordinator/clog.h"
#include "coordinator/http/hint.h"

/* Constant-time (in the candidate's content) comparison of the presented key with every key. */
static int key_ok(const http_server *s, const char *got) {
    size_t lg = strlen(got);
    int match = 0;
    for (size_t k = 0; k < s->n_keys; k++) {
        const char *key = s->keys[k];
        size_t lk = strlen(key);
        unsigned char d = lg != lk;
        for (size_t i = 0; i < lk; i++) d |= (unsigned char)((i < lg ? got[i] : 0) ^ key[i]);
        match |= d == 0;
    }
    return match;
}

/* ---- routing ------------------------------------------------------------------------------- */

enum { R_NONE, R_HEALTH, R_READY, R_GENERATE, R_METRICS, R_VERSION, R_MODELS, R_MODEL,
       R_TOKENIZE, R_DETOKENIZE, R_CHAT, R_CMPL };

static int route(const char *path, const char **model_id) {
    static const struct {
        const char *p;
        int r;
    } t[] = {{"/health", R_HEALTH},         {"/health/ready", R_READY},
             {"/health/generate", R_GENERATE}, {"/metrics", R_METRICS},
             {"/version", R_VERSION},       {"/v1/models", R_MODELS},
             {"/tokenize", R_TOKENIZE},     {"/v1/tokenize", R_TOKENIZE},
             {"/detokenize", R_DETOKENIZE}, {"/v1/detokenize", R_DETOKENIZE},
             {"/v1/chat/completions", R_CHAT}, {"/v1/completions", R_CMPL},
             {NULL, 0}};
    for (int i = 0; t[i].p; i++)
        if (!strcmp(path, t[i].p)) return t[i].r;
    if (!strncmp(path, "/v1/models/", 11) && path[11]) {
        *model_id = path + 11;
        return R_MODEL;
    }
    return R_NONE;
}

static void count_rejected(http_server *s, const apierr *e) {
    if (!s->m || e->status >= 500) return;
    metrics_inc(s->m, "requests_rejected_total",
                !strcmp(e->code, "context_length_exceeded") ? "reason=\"context_length\""
                                                            : "reason=\"invalid\"",
                1);
}

/* CORS (server-api §2; only with cors_origins): an allowed Origin gets the Allow-Origin headers
 * on every answer; OPTIONS on a known path is the preflight, answered 204 without a key.
 * Returns 1 when the request was answered (preflight). */
static int cors(http_server *s, struct evhttp_request *req, enum evhttp_cmd_type cmd, int get) {
    struct evkeyvalq *in = evhttp_request_get_input_headers(req);
    struct evkeyvalq *out = evhttp_request_get_output_headers(req);
    const char *origin = evhttp_find_header(in, "Origin");
    int any = 0, ok = 0;
    for (size_t i = 0; i < s->n_cors; i++) {
        if (!strcmp(s->cors[i], "*")) any = 1;
        else if (origin && !strcmp(s->cors[i], origin)) ok = 1;
    }
    if (origin && (ok || any)) {
        evhttp_add_header(out, "Access-Control-Allow-Origin", ok ? origin : "*");
        if (ok) evhttp_add_header(out, "Vary", "Origin");
        evhttp_add_header(out, "Access-Control-Expose-Headers",
                          "X-Request-Id, X-Duet-Reasoning-Effort, Retry-After");
    }
    if (cmd != EVHTTP_REQ_OPTIONS) return 0;
    const char *methods = get ? "GET, HEAD, OPTIONS" : "POST, OPTIONS";
    evhttp_add_header(out, "Allow", methods);
    if (origin && (ok || any)) {
        evhttp_add_header(out, "Access-Control-Allow-Methods", methods);
        const char *rh = evhttp_find_header(in, "Access-Control-Request-Headers");
        char hdrs[512];
        /* echo what the browser asks for when it is plain header-name text */
        int plain = rh && strlen(rh) < sizeof hdrs;
        for (const char *p = rh; plain && *p; p++)
            plain = (*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
                    (*p >= '0' && *p <= '9') || *p == '-' || *p == '_' || *p == ',' || *p == ' ';
        snprintf(hdrs, sizeof hdrs, "%s",
                 plain && *rh ? rh : "Authorization, Content-Type, X-Request-Id");
        evhttp_add_header(out, "Access-Control-Allow-Headers", hdrs);
        evhttp_add_header(out, "Access-Control-Max-Age", "600");
    }
    evhttp_add_header(out, "Content-Length", "0");
    note_http(s, req, 204);
    evhttp_send_reply(req, 204, "No Content", NULL);
    return 1;
}

static void on_request(struct evhttp_request *req, void *arg) {
    http_server *s = arg;
    char rid[65];
    request_id(req, rid);
    apierr e;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *raw = uri ? evhttp_uri_get_path(uri) : NULL;
    char *path = evhttp_uridecode(raw && *raw ? raw : "/", 0, NULL);
    if (!path) {
        fail(&e, 404, "not_found", NULL, "the path is not valid");
        send_err(s, req, &e, rid);
        return;
    }
    size_t pl = strlen(path);
    if (pl > 1 && path[pl - 1] == '/') path[pl - 1] = 0; /* one trailing slash is ignored */
    const char *mid = NULL;
    int r = route(path, &mid);
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    if (r == R_NONE) {
        fail(&e, 404, "not_found", NULL, "there is no endpoint %s", path);
        goto err;
    }
    int get = r == R_HEALTH || r == R_READY || r == R_GENERATE || r == R_METRICS ||
              r == R_VERSION || r == R_MODELS || r == R_MODEL;
    if (s->n_cors && cors(s, req, cmd, get)) goto done;
    int method_ok = get ? (cmd == EVHTTP_REQ_GET || cmd == EVHTTP_REQ_HEAD) : cmd == EVHTTP_REQ_POST;
    if (!method_ok) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow",
                          get ? "GET, HEAD" : "POST");
        fail(&e, 405, "method_not_allowed", NULL, "%s takes %s", path, get ? "GET" : "POST");
        goto err;
    }
    int open = r == R_HEALTH || r == R_READY || r == R_GENERATE || r == R_VERSION ||
               (r == R_METRICS && !s->metrics_require_auth);
    if (s->n_keys && !open) {
        const char *a =
            evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
        if (!a || strncasecmp(a, "Bearer ", 7) || !key_ok(s, a + 7)) {
            fail(&e, 401, "invalid_api_key", NULL,
                 a ? "the API key is not valid"
                   : "an API key is required (header \"Authorization: Bearer <key>\")");
            goto err;
        }
    }
    switch (r) {
    case R_HEALTH: send_json(s, req, 200, json_pack("{s:s}", "status", "ok"), rid); goto done;
    case R_READY: handle_ready(s, req, rid); goto done;
    case R_GENERATE: handle_generate_probe(s, req, rid); goto done;
    case R_METRICS: handle_metrics(s, req, rid); goto done;
    case R_VERSION: handle_version(s, req, rid); goto done;
    case R_MODELS: handle_models(s, req, rid, NULL); goto done;
    case R_MODEL: handle_models(s, req, rid, mid); goto done;
    default: break;
    }
    /* POST endpoints: the body is JSON whatever the Content-Type */
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    if (len > s->max_body) {
        fail(&e, 413, "request_too_large", NULL,
             "the request body has %zu bytes; the limit is %zu (--max-body-bytes)", len,
             s->max_body);
        goto err;
    }
    const char *body = (const char *)evbuffer_pullup(in, -1);
    json_error_t je;
    json_t *b = json_loadb(body ? body : "", len, JSON_PRESERVE_ORDER, &je);
    if (!b) {
        fail(&e, 400, "invalid_json", NULL, "the body is not valid JSON: %s (line %d, column %d)",
             je.text, je.line, je.column);
        goto err;
    }
    if (!json_is_object(b)) {
        json_decref(b);
        fail(&e, 400, "invalid_type", NULL, "the body must be a JSON object");
        goto err;
    }
    if (r == R_TOKENIZE) {
        handle_tokenize(s, req, rid, b);
    } else if (r == R_DETOKENIZE) {
        handle_detokenize(s, req, rid, b);
    } else {
        greq g;
        if (parse_generation(s, &e, b, r == R_CHAT, &g)) {
            greq_free(&g);
            json_decref(b);
            count_rejected(s, &e);
            goto err;
        }
        generate(s, req, rid, &g);
    }
    json_decref(b);
    goto done;
err:
    send_err(s, req, &e, rid);
done:
    free(path);
}

/* ---- set-up -------------------------------------------------------------------------------- */

/* Reads one key per line ('#' lines and blank lines skipped) appended to *keys (*n of them). */
static int load_keys(const char *path, char ***keys, size_t *n, char *err, size_t errlen) {
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "--api-key-file %s: cannot open it: %s", path, strerror(errno));
        return -1;
    }
    char line[1024];
    size_t before = *n;
    while (fgets(line, sizeof line, f)) {
        char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        size_t len = strlen(p);
        while (len && (p[len - 1] == '\n' || p[len - 1] == '\r' || p[len - 1] == ' ' ||
                       p[len - 1] == '\t'))
            p[--len] = 0;
        if (!len || *p == '#') continue;
        *keys = xrealloc(*keys, (*n + 1) * sizeof **keys);
        (*keys)[(*n)++] = xstrdup(p);
        memset(line, 0, sizeof line);
    }
    fclose(f);
    if (*n == before) {
        snprintf(err, errlen, "--api-key-file %s holds no key (one key per line)", path);
        return -1;
    }
    return 0;
}

static void free_strs(char **v, size_t n, int wipe) {
    for (size_t i = 0; i < n; i++) {
        if (wipe) memset(v[i], 0, strlen(v[i]));
        free(v[i]);
    }
    free(v);
}

static char **dup_strs(const char *const *v, size_t n) {
    char **out = xcalloc(n + 1, sizeof *out);
    for (size_t i = 0; i < n; i++) out[i] = xstrdup(v[i]);
    return out;
}

/* The keys of cfg: the file's, then the inline ones. 0, or -1 with err (nothing allocated). */
static int cfg_keys(const http_cfg *cfg, char ***keys, size_t *n, char *err, size_t errlen) {
    *keys = NULL;
    *n = 0;
    if (cfg->api_key_file && load_keys(cfg->api_key_file, keys, n, err, errlen)) {
        free_strs(*keys, *n, 1);
        *keys = NULL;
        *n = 0;
        return -1;
    }
    for (size_t i = 0; i < cfg->n_api_keys; i++) {
        *keys = xrealloc(*keys, (*n + 1) * sizeof **keys);
        (*keys)[(*n)++] = xstrdup(cfg->api_keys[i]);
    }
    return 0;
}

void http_cfg_init(http_cfg *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->default_temperature = cfg->default_top_p = cfg->default_min_p = -1;
    cfg->default_thinking = -1;
    cfg->default_thinking_budget = -1;
    cfg->sse_keepalive_s = 15;
}

/* The reloadable request policy (no failure possible). */
static void apply_policy(http_server *s, const http_cfg *cfg) {
    s->max_body = cfg->max_body_bytes ? cfg->max_body_bytes : (size_t)32 << 20;
    if (s->http) {
        size_t hard = s->max_body > ((size_t)1 << 40) ? s->max_body : s->max_body * 4 + 65536;
        evhttp_set_max_body_size(s->http, (ev_ssize_t)hard);
    }
    s->stall_timeout_s = cfg->stall_timeout_s;
    s->health_generate_timeout_s = cfg->health_generate_timeout_s;
    s->metrics_require_auth = cfg->metrics_require_auth;
    s->sse_keepalive_s = cfg->sse_keepalive_s > 0 ? cfg->sse_keepalive_s : 0;
    s->strict_fields = cfg->strict_request_fields;
    s->tool_stream_buffered = cfg->tool_stream_buffered;
    s->reasoning_field = cfg->reasoning_field;
    s->def_max_chat = cfg->default_max_tokens_chat > 0 ? cfg->default_max_tokens_chat
                                                       : DEFAULT_CHAT_MAX_TOKENS;
    s->def_max_cmpl = cfg->default_max_tokens_cmpl > 0 ? cfg->default_max_tokens_cmpl
                                                       : DEFAULT_CMPL_MAX_TOKENS;
    s->max_n = cfg->max_n > 0 ? (cfg->max_n > MAX_CHOICES ? MAX_CHOICES : cfg->max_n) : MAX_N;
    s->def_temperature = cfg->default_temperature >= 0 ? cfg->default_temperature : 1.0;
    s->def_top_p = cfg->default_top_p > 0 ? cfg->default_top_p : 1.0;
    s->def_min_p = cfg->default_min_p >= 0 ? cfg->default_min_p : 0.0;
    s->def_thinking = cfg->default_thinking != 0;
    s->def_budget = cfg->default_thinking_budget;
    free_strs(s->aliases, s->n_aliases, 0);
    free_strs(s->cors, s->n_cors, 0);
    if (cfg->n_model_aliases || cfg->no_model_aliases) {
        s->aliases = dup_strs(cfg->model_aliases, cfg->n_model_aliases);
        s->n_aliases = cfg->n_model_aliases;
    } else {
        static const char *const def[] = {"deepseek-v4-flash"};
        s->aliases = dup_strs(def, 1);
        s->n_aliases = 1;
    }
    s->accept_any_model = cfg->accept_any_model;
    s->cors = dup_strs(cfg->cors_origins, cfg->n_cors_origins);
    s->n_cors = cfg->n_cors_origins;
}

int http_reconfigure(http_server *s, const http_cfg *cfg, int *keys_changed, char *err,
                     size_t errlen) {
    char **keys;
    size_t n;
    if (cfg_keys(cfg, &keys, &n, err, errlen)) return -1;
    int changed = n != s->n_keys;
    for (size_t i = 0; !changed && i < n; i++) changed = strcmp(keys[i], s->keys[i]) != 0;
    free_strs(s->keys, s->n_keys, 1);
    s->keys = keys;
    s->n_keys = n;
    if (keys_changed) *keys_changed = changed;
    apply_policy(s, cfg);
    return 0;
}

static int is_loopback(const char *host) {
    if (!strcmp(host, "localhost") || !strcmp(host, "::1")) return 1;
    struct in_addr a;
    if (inet_pton(AF_INET, host, &a) == 1) return (ntohl(a.s_addr) >> 24) == 127;
    return 0;
}

int http_open(struct event_base *base, const http_cfg *cfg, const eng_api *api,
              http_server **out, char *err, size_t errlen) {
    *out = NULL;
    if (!api->submit || !api->health) { /* a programming error, said plainly */
        snprintf(err, errlen, "the HTTP front needs an engine with submit and health");
        return -1;
    }
    char host[256];
    const char *colon = strrchr(cfg->listen, ':');
    char *end = NULL;
    long port = colon ? strtol(colon + 1, &end, 10) : -1;
    if (!colon || colon == cfg->listen || !end || *end || end == colon + 1 || port < 0 ||
        port > 65535 || (size_t)(colon - cfg->listen) >= sizeof host) {
        snprintf(err, errlen, "--listen '%s' is not HOST:PORT", cfg->listen);
        return -1;
    }
    memcpy(host, cfg->listen, (size_t)(colon - cfg->listen));
    host[colon - cfg->listen] = 0;
    if (host[0] == '[' && host[strlen(host) - 1] == ']') {
        memmove(host, host + 1, strlen(host));
        host[strlen(host) - 1] = 0;
    }
    if (!is_loopback(host) && !cfg->api_key_file && !cfg->n_api_keys) {
        snprintf(err, errlen,
                 "--listen %s is not a loopback address: refusing to serve the API to the "
                 "network without --api-key-file (or the config key api_keys)",
                 cfg->listen);
        return -1;
    }
    http_server *s = xcalloc(1, sizeof *s);
    s->base = base;
    s->api = *api;
    s->max_model_len = cfg->max_model_len;
    s->fold_ids = cfg->fold_prompt_ids;
    apply_policy(s, cfg);
    s->m = cfg->metrics;
    if (!s->m) {
        s->m = metrics_new(cfg->model_id, cfg->metrics_vllm_names);
        s->own_metrics = 1;
    }
    {
        char lab[256];
        snprintf(lab, sizeof lab, "version=\"%s\",commit=\"%s\",checkpoint=\"0731\"",
                 cfg->version, cfg->commit);
        utf8_clean(lab);
        metrics_set(s->m, "build_info", lab, 1);
    }
    s->model_id = xstrdup(cfg->model_id);
    s->version = xstrdup(cfg->version);
    s->commit = xstrdup(cfg->commit);
    snprintf(s->fingerprint, sizeof s->fingerprint, "duet-%s-%.7s", cfg->version, cfg->commit);
    s->created = (long long)time(NULL);
    if (cfg_keys(cfg, &s->keys, &s->n_keys, err, errlen)) goto fail;
    if (tok_load(cfg->tokenizer_path, &s->tok, err, errlen)) goto fail;
    s->vocab = cfg->vocab_size < (int)tok_vocab_size(s->tok) ? cfg->vocab_size
                                                             : (int)tok_vocab_size(s->tok);
    s->bos = tok_token_to_id(s->tok, "<｜begin▁of▁sentence｜>");
    s->think_open = tok_token_to_id(s->tok, "<think>");
    s->think_close = tok_token_to_id(s->tok, "</think>");
    s->dsml = tok_token_to_id(s->tok, "｜DSML｜");
    s->http = evhttp_new(base);
    /* evhttp refuses bodies far over the limit itself (bounded memory); duet answers the JSON
     * 413 for bodies between the limit and that hard cap (apply_policy sets it) */
    apply_policy(s, cfg);
    evhttp_set_max_headers_size(s->http, 64 << 10);
    evhttp_set_timeout(s->http, 75);
    evhttp_set_allowed_methods(s->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                            EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                            EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH |
                                            EVHTTP_REQ_TRACE | EVHTTP_REQ_CONNECT);
    evhttp_set_gencb(s->http, on_request, s);
    struct evhttp_bound_socket *bs = evhttp_bind_socket_with_handle(s->http, host, (ev_uint16_t)port);
    if (!bs) {
        snprintf(err, errlen, "--listen %s: cannot bind: %s", cfg->listen, strerror(errno));
        goto fail;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    int bound = (int)port;
    if (getsockname(evhttp_bound_socket_get_fd(bs), (struct sockaddr *)&ss, &sl) == 0)
        bound = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                               : ((struct sockaddr_in *)&ss)->sin_port);
    coord_log("http listening on %s:%d (model %s, max_model_len %d%s)", host, bound, s->model_id,
              s->max_model_len, s->n_keys ? ", API key required" : "");
    *out = s;
    return 0;
fail:
    http_free(s);
    return -1;
}

void http_free(http_server *s) {
    if (!s) return;
    probe_free(s);
    if (s->http) evhttp_free(s->http);
    if (s->own_metrics) metrics_free(s->m);
    if (s->tok) tok_free(s->tok);
    free_strs(s->keys, s->n_keys, 1);
    free_strs(s->aliases, s->n_aliases, 0);
    free_strs(s->cors, s->n_cors, 0);
    free_strs(s->seen_unknown, s->n_seen_unknown, 0);
    free(s->model_id);
    free(s->version);
    free(s->commit);
    free(s);
}
