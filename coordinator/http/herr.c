/* herr.c — error objects, JSON replies and the small byte helpers every endpoint uses.
 *
 * Why: every answer, success or failure, goes through send_json/send_err so that each one gets
 * the same headers (Content-Type, X-Request-Id, Retry-After on 503, WWW-Authenticate on 401)
 * and is counted once in duet:http_requests_total. Errors are the OpenAI object of server-api
 * §9; messages quote client bytes, so they are made valid UTF-8 before jansson sees them.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>

#include "coordinator/http/hint.h"

/* Makes s valid UTF-8 in place: every byte that does not start a complete, well-formed sequence
 * becomes '?' (snprintf may cut a character; jansson refuses invalid UTF-8). */
void utf8_clean(char *s) {
    unsigned char *p = (unsigned char *)s;
    while (*p) {
        unsigned c = *p;
        size_t n = c < 0x80 ? 1 : (c >= 0xC2 && c <= 0xDF) ? 2 : (c >= 0xE0 && c <= 0xEF) ? 3
                                : (c >= 0xF0 && c <= 0xF4) ? 4 : 0;
        int ok = n > 0;
        for (size_t i = 1; ok && i < n; i++) ok = (p[i] & 0xC0) == 0x80;
        if (ok && n == 3) {
            unsigned cp = ((c & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6);
            ok = cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF);
        } else if (ok && n == 4) {
            unsigned cp = ((c & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12);
            ok = cp >= 0x10000 && cp <= 0x10FFFF;
        }
        if (!ok) {
            *p++ = '?';
            continue;
        }
        p += n;
    }
}

int fail(apierr *e, int status, const char *code, const char *param, const char *fmt, ...) {
    e->status = status;
    e->type = status == 503 ? "service_unavailable"
              : status >= 500 ? "server_error"
                              : "invalid_request_error";
    e->code = code;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    utf8_clean(e->msg);
    utf8_clean(e->param);
    return -1;
}

json_t *err_json(const apierr *e) {
    return json_pack("{s:{s:s, s:s, s:o, s:s}}", "error", "message", e->msg, "type", e->type,
                     "param", e->param[0] ? json_string(e->param) : json_null(), "code",
                     e->code);
}

const char *handler_label(const char *path) {
    static const char *const known[] = {
        "/health", "/health/ready", "/health/generate", "/metrics", "/version", "/v1/models",
        "/tokenize", "/v1/tokenize", "/detokenize", "/v1/detokenize", "/v1/chat/completions",
        "/v1/completions", NULL};
    char p[64];
    size_t n = strcspn(path, "?");
    if (n >= sizeof p) return "other";
    memcpy(p, path, n);
    p[n] = 0;
    if (n > 1 && p[n - 1] == '/') p[n - 1] = 0;
    for (int i = 0; known[i]; i++)
        if (!strcmp(p, known[i])) return known[i];
    if (!strncmp(p, "/v1/models/", 11)) return "/v1/models/{id}";
    return "other";
}

void note_http(http_server *s, struct evhttp_request *req, int status) {
    if (!s || !s->m) return;
    const char *uri = evhttp_request_get_uri(req);
    const char *method;
    switch (evhttp_request_get_command(req)) {
    case EVHTTP_REQ_GET: method = "GET"; break;
    case EVHTTP_REQ_POST: method = "POST"; break;
    case EVHTTP_REQ_HEAD: method = "HEAD"; break;
    case EVHTTP_REQ_PUT: method = "PUT"; break;
    case EVHTTP_REQ_DELETE: method = "DELETE"; break;
    case EVHTTP_REQ_OPTIONS: method = "OPTIONS"; break;
    case EVHTTP_REQ_PATCH: method = "PATCH"; break;
    default: method = "OTHER"; break;
    }
    char labels[160];
    snprintf(labels, sizeof labels, "handler=\"%s\",method=\"%s\",status=\"%d\"",
             handler_label(uri ? uri : "/"), method, status);
    metrics_inc(s->m, "http_requests_total", labels, 1);
}

static const char *reason_phrase(int status) {
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Payload Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Error";
    }
}

void send_json(http_server *s, struct evhttp_request *req, int status, json_t *body,
               const char *rid) {
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Type", "application/json");
    if (rid) evhttp_add_header(h, "X-Request-Id", rid);
    struct evbuffer *b = evbuffer_new();
    char *txt = json_dumps(body, JSON_COMPACT);
    if (txt) {
        evbuffer_add(b, txt, strlen(txt));
        free(txt);
    }
    json_decref(body);
    note_http(s, req, status);
    evhttp_send_reply(req, status, reason_phrase(status), b);
    evbuffer_free(b);
}

void send_err(http_server *s, struct evhttp_request *req, const apierr *e, const char *rid) {
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    if (e->status == 401) evhttp_add_header(h, "WWW-Authenticate", "Bearer");
    if (e->status == 413) evhttp_add_header(h, "Connection", "close");
    if (e->status == 503)
        evhttp_add_header(h, "Retry-After", !strcmp(e->code, "server_overloaded") ? "1" : "5");
    send_json(s, req, e->status, err_json(e), rid);
}

void random_hex(char *out, size_t nbytes) {
    unsigned char r[32];
    if (nbytes > sizeof r) nbytes = sizeof r;
    if (getrandom(r, nbytes, 0) != (ssize_t)nbytes) {
        uint64_t x = (uint64_t)time(NULL) ^ ((uint64_t)(uintptr_t)out << 16);
        for (size_t i = 0; i < nbytes; i++) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            r[i] = (unsigned char)(x >> 56);
        }
    }
    for (size_t i = 0; i < nbytes; i++) sprintf(out + 2 * i, "%02x", r[i]);
}

/* The client's X-Request-Id if it matches [A-Za-z0-9._-]{1,64}, else 32 random hex chars. */
void request_id(struct evhttp_request *req, char out[65]) {
    const char *v = evhttp_find_header(evhttp_request_get_input_headers(req), "X-Request-Id");
    size_t n = v ? strlen(v) : 0;
    int ok = n >= 1 && n <= 64;
    for (size_t i = 0; ok && i < n; i++) {
        char ch = v[i];
        ok = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
             ch == '.' || ch == '_' || ch == '-';
    }
    if (ok) memcpy(out, v, n + 1);
    else random_hex(out, 16);
}

/* GPT-2 byte-level alphabet: the code point a byte is spelled with in tokenizer.json. */
static int byte_of_cp(unsigned cp) {
    if ((cp >= 33 && cp <= 126) || (cp >= 161 && cp <= 172) || (cp >= 174 && cp <= 255))
        return (int)cp;
    if (cp < 256 || cp > 323) return -1;
    int k = (int)cp - 256, b;
    for (b = 0; b < 256; b++) {
        if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)) continue;
        if (k-- == 0) return b;
    }
    return -1;
}

size_t token_bytes(const http_server *s, int32_t id, char *out, size_t cap) {
    const char *t = tok_id_to_token(s->tok, id);
    if (!t) return 0;
    size_t n = 0, tl = strlen(t);
    if (tok_is_added(s->tok, id)) {
        n = tl < cap ? tl : cap;
        memcpy(out, t, n);
        return n;
    }
    const unsigned char *p = (const unsigned char *)t;
    while (*p && n < cap) {
        unsigned cp;
        if (*p < 0x80) cp = *p++;
        else if ((*p & 0xE0) == 0xC0 && p[1]) {
            cp = ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
            p += 2;
        } else { /* not a byte-level spelling: give the text itself */
            n = tl < cap ? tl : cap;
            memcpy(out, t, n);
            return n;
        }
        int b = byte_of_cp(cp);
        out[n++] = (char)(b < 0 ? '?' : b);
    }
    return n;
}

static int valid_utf8(const char *b, size_t n) {
    char *tmp = malloc(n + 1);
    if (!tmp) return 0;
    memcpy(tmp, b, n);
    tmp[n] = 0;
    int ok = memchr(b, 0, n) == NULL;
    if (ok) {
        utf8_clean(tmp);
        ok = memcmp(tmp, b, n) == 0;
    }
    free(tmp);
    return ok;
}

json_t *token_string(const char *b, size_t n) {
    if (valid_utf8(b, n)) return json_stringn(b, n);
    chat_sb o = {0};
    chat_sb_puts(&o, "bytes:");
    for (size_t i = 0; i < n; i++) chat_sb_printf(&o, "\\x%02x", (unsigned char)b[i]);
    json_t *j = json_stringn(o.p, o.len);
    chat_sb_free(&o);
    return j;
}

json_t *bytes_array(const char *b, size_t n) {
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(a, json_integer((unsigned char)b[i]));
    return a;
}
