/* config.c — the key table, the JSON config parser and the reload diff (see config.h).
 *
 * Why: one table row per key (type, range, reloadable) keeps parsing, the error sentences and
 * the reload classification in step; docs/config.md is written from the same rows.
 */
#include "coordinator/config.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"

typedef enum {
    T_STR,    /* char * */
    T_STRS,   /* ccfg_strs: array of strings (a comma-separated string too when comma = 1) */
    T_NUM,    /* double in [lo, hi] */
    T_INT,    /* double holding an integer in [lo, hi] */
    T_BOOL,   /* int 0/1 */
    T_ENUM,   /* int: index into names */
    T_MAXTOK, /* default_max_tokens: an integer (both endpoints) or {"chat":N,"completions":N} */
    T_BUDGET  /* default_thinking_budget: an integer >= 0 */
} ktype;

typedef struct {
    const char *name;
    ktype type;
    size_t off;
    double lo, hi;
    int reload;
    const char *const *names; /* T_ENUM */
    int comma;                /* T_STRS: "a,b" accepted */
} key;

static const char *const REASONING_NAMES[] = {"reasoning_content", "reasoning", "both", NULL};
static const char *const TOOL_STREAM_NAMES[] = {"incremental", "buffered", NULL};

#define O(f) offsetof(duet_config, f)
#define BIG 1e7
static const key KEYS[] = {
    /* restart-only */
    {"listen", T_STR, O(listen), 0, 0, 0, NULL, 0},
    {"admin_socket", T_STR, O(admin_socket), 0, 0, 0, NULL, 0},
    {"workers", T_STRS, O(workers), 0, 0, 0, NULL, 1},
    {"auth_token_file", T_STR, O(auth_token_file), 0, 0, 0, NULL, 0},
    {"model_fingerprint", T_STR, O(model_fingerprint), 0, 0, 0, NULL, 0},
    {"tokenizer", T_STR, O(tokenizer), 0, 0, 0, NULL, 0},
    {"served_model_name", T_STR, O(served_model_name), 0, 0, 0, NULL, 0},
    {"vocab_size", T_INT, O(vocab_size), 2, 1 << 24, 0, NULL, 0},
    {"fold_prompt_ids", T_BOOL, O(fold_prompt_ids), 0, 0, 0, NULL, 0},
    {"max_model_len", T_INT, O(max_model_len), 1, 1 << 30, 0, NULL, 0},
    {"max_num_seqs", T_INT, O(max_num_seqs), 1, 65536, 0, NULL, 0},
    {"block_size", T_INT, O(block_size), 128, 1 << 20, 0, NULL, 0},
    {"step_timeout_s", T_NUM, O(step_timeout_s), 0, BIG, 0, NULL, 0},
    {"heartbeat_timeout_s", T_NUM, O(heartbeat_timeout_s), 0.1, BIG, 0, NULL, 0},
    {"connect_timeout_s", T_NUM, O(connect_timeout_s), 0, BIG, 0, NULL, 0},
    {"load_timeout_s", T_NUM, O(load_timeout_s), 0, BIG, 0, NULL, 0},
    {"metrics_vllm_names", T_BOOL, O(metrics_vllm_names), 0, 0, 0, NULL, 0},
    /* reloadable */
    {"api_keys", T_STRS, O(api_keys), 0, 0, 1, NULL, 0},
    {"api_key_file", T_STR, O(api_key_file), 0, 0, 1, NULL, 0},
    {"max_body_bytes", T_INT, O(max_body_bytes), 1024, 1 << 30, 1, NULL, 0},
    {"max_waiting", T_INT, O(max_waiting), 0, 1 << 20, 1, NULL, 0},
    {"max_num_batched_tokens", T_INT, O(max_num_batched_tokens), 1, 1 << 24, 1, NULL, 0},
    {"max_n", T_INT, O(max_n), 1, 64, 1, NULL, 0},
    {"default_max_tokens", T_MAXTOK, 0, 1, 2147483647.0, 1, NULL, 0},
    {"default_temperature", T_NUM, O(default_temperature), 0, 2, 1, NULL, 0},
    {"default_top_p", T_NUM, O(default_top_p), 1e-9, 1, 1, NULL, 0},
    {"default_min_p", T_NUM, O(default_min_p), 0, 1, 1, NULL, 0},
    {"default_thinking", T_BOOL, O(default_thinking), 0, 0, 1, NULL, 0},
    {"default_thinking_budget", T_BUDGET, O(default_thinking_budget), 0, 2147483647.0, 1, NULL,
     0},
    {"reasoning_field", T_ENUM, O(reasoning_field), 0, 0, 1, REASONING_NAMES, 0},
    {"tool_stream", T_ENUM, O(tool_stream), 0, 0, 1, TOOL_STREAM_NAMES, 0},
    {"model_aliases", T_STRS, O(model_aliases), 0, 0, 1, NULL, 0},
    {"accept_any_model", T_BOOL, O(accept_any_model), 0, 0, 1, NULL, 0},
    {"strict_request_fields", T_BOOL, O(strict_request_fields), 0, 0, 1, NULL, 0},
    {"cors_origins", T_STRS, O(cors_origins), 0, 0, 1, NULL, 0},
    {"sse_keepalive_s", T_NUM, O(sse_keepalive_s), 0, BIG, 1, NULL, 0},
    {"stall_timeout_s", T_NUM, O(stall_timeout_s), 0.1, BIG, 1, NULL, 0},
    {"worker_recover_timeout_s", T_NUM, O(worker_recover_timeout_s), 0, BIG, 1, NULL, 0},
    {"health_generate_timeout_s", T_NUM, O(health_generate_timeout_s), 0.1, BIG, 1, NULL, 0},
    {"drain_grace_s", T_NUM, O(drain_grace_s), 0, BIG, 1, NULL, 0},
    {"metrics_require_auth", T_BOOL, O(metrics_require_auth), 0, 0, 1, NULL, 0},
    {NULL, 0, 0, 0, 0, 0, NULL, 0}};

static void strs_free(ccfg_strs *s) {
    for (size_t i = 0; i < s->n; i++) free(s->v[i]);
    free(s->v);
    s->v = NULL;
    s->n = 0;
}

static void strs_push(ccfg_strs *s, const char *v, size_t n) {
    s->v = xrealloc(s->v, (s->n + 2) * sizeof *s->v);
    char *d = xmalloc(n + 1);
    memcpy(d, v, n);
    d[n] = 0;
    s->v[s->n++] = d;
    s->v[s->n] = NULL;
}

static void strs_copy(ccfg_strs *dst, const ccfg_strs *src) {
    strs_free(dst);
    for (size_t i = 0; i < src->n; i++) strs_push(dst, src->v[i], strlen(src->v[i]));
}

void ccfg_init(duet_config *c) {
    memset(c, 0, sizeof *c);
    c->served_model_name = xstrdup("deepseek-v4-flash");
    c->vocab_size = 129280;
    c->max_model_len = 4096;
    c->max_num_seqs = 8;
    c->block_size = 256;
    c->step_timeout_s = 120;
    c->heartbeat_timeout_s = 5;
    c->connect_timeout_s = 60;
    c->load_timeout_s = 600;
    c->max_body_bytes = 32 << 20;
    c->max_waiting = 256;
    c->max_num_batched_tokens = 2048;
    c->max_n = 8;
    c->default_max_tokens_chat = 16384;
    c->default_max_tokens_cmpl = 16;
    c->default_temperature = 1.0;
    c->default_top_p = 1.0;
    c->default_min_p = 0.0;
    c->default_thinking = 1;
    c->default_thinking_budget = -1;
    strs_push(&c->model_aliases, "deepseek-v4-flash", 17);
    c->sse_keepalive_s = 15;
    c->stall_timeout_s = 30;
    c->worker_recover_timeout_s = 30;
    c->health_generate_timeout_s = 20;
    c->drain_grace_s = 30;
}

void ccfg_free(duet_config *c) {
    for (const key *k = KEYS; k->name; k++) {
        if (k->type == T_STR) {
            char **p = (char **)((char *)c + k->off);
            free(*p);
            *p = NULL;
        } else if (k->type == T_STRS) {
            strs_free((ccfg_strs *)((char *)c + k->off));
        }
    }
}

static const char *type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER:
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* An integer in [lo, hi] (10 and 10.0 both count). */
static int get_integer(const json_t *v, double lo, double hi, double *out) {
    if (!json_is_number(v)) return -1;
    double x = json_number_value(v);
    if (x != floor(x) || !(x >= lo && x <= hi)) return -1;
    *out = x;
    return 0;
}

static int set_key(duet_config *c, const key *k, json_t *v, const char *origin, char *err,
                   size_t errlen) {
    void *p = (char *)c + k->off;
    switch (k->type) {
    case T_STR:
        if (!json_is_string(v) || !json_string_length(v)) {
            snprintf(err, errlen, "%s: key \"%s\" must be a non-empty string (got %s)", origin,
                     k->name, type_name(v));
            return -1;
        }
        free(*(char **)p);
        *(char **)p = xstrdup(json_string_value(v));
        return 0;
    case T_STRS: {
        ccfg_strs tmp = {0};
        if (k->comma && json_is_string(v)) {
            const char *s = json_string_value(v);
            while (*s) {
                const char *e = strchr(s, ',');
                size_t n = e ? (size_t)(e - s) : strlen(s);
                if (n) strs_push(&tmp, s, n);
                s += n + (e != NULL);
            }
        } else if (json_is_array(v)) {
            size_t i;
            json_t *x;
            json_array_foreach(v, i, x) {
                if (!json_is_string(x) || !json_string_length(x)) {
                    strs_free(&tmp);
                    snprintf(err, errlen,
                             "%s: key \"%s\" must be an array of non-empty strings (element %zu "
                             "is %s)",
                             origin, k->name, i, type_name(x));
                    return -1;
                }
                strs_push(&tmp, json_string_value(x), json_string_length(x));
            }
        } else {
            snprintf(err, errlen, "%s: key \"%s\" must be an array of strings%s (got %s)",
                     origin, k->name, k->comma ? " or a comma-separated string" : "",
                     type_name(v));
            return -1;
        }
        strs_free(p);
        *(ccfg_strs *)p = tmp;
        return 0;
    }
    case T_NUM: {
        double x = json_is_number(v) ? json_number_value(v) : NAN;
        if (!(x >= k->lo && x <= k->hi)) {
            snprintf(err, errlen, "%s: key \"%s\" must be a number in [%g, %g] (got %s)", origin,
                     k->name, k->lo, k->hi, json_is_number(v) ? "an out-of-range number"
                                                              : type_name(v));
            return -1;
        }
        *(double *)p = x;
        return 0;
    }
    case T_INT:
    case T_BUDGET:
        if (get_integer(v, k->lo, k->hi, (double *)p)) {
            snprintf(err, errlen, "%s: key \"%s\" must be an integer in [%.0f, %.0f] (got %s)",
                     origin, k->name, k->lo, k->hi,
                     json_is_number(v) ? "a number out of range or with a fraction"
                                       : type_name(v));
            return -1;
        }
        if (!strcmp(k->name, "block_size") && fmod(*(double *)p, 128) != 0) {
            snprintf(err, errlen,
                     "%s: key \"block_size\" must be a multiple of 128 (every compression "
                     "window must close on a block boundary)",
                     origin);
            return -1;
        }
        return 0;
    case T_BOOL:
        if (!json_is_boolean(v)) {
            snprintf(err, errlen, "%s: key \"%s\" must be true or false (got %s)", origin,
                     k->name, type_name(v));
            return -1;
        }
        *(int *)p = json_is_true(v);
        return 0;
    case T_ENUM: {
        const char *s = json_string_value(v);
        for (int i = 0; s && k->names[i]; i++)
            if (!strcmp(s, k->names[i])) {
                *(int *)p = i;
                return 0;
            }
        char list[160] = "";
        for (int i = 0; k->names[i]; i++) {
            size_t l = strlen(list);
            snprintf(list + l, sizeof list - l, "%s\"%s\"", i ? ", " : "", k->names[i]);
        }
        snprintf(err, errlen, "%s: key \"%s\" must be one of %s", origin, k->name, list);
        return -1;
    }
    case T_MAXTOK: {
        double chat = c->default_max_tokens_chat, cmpl = c->default_max_tokens_cmpl;
        int ok = 1;
        if (json_is_number(v)) {
            ok = !get_integer(v, k->lo, k->hi, &chat);
            cmpl = chat;
        } else if (json_is_object(v)) {
            const char *kk;
            json_t *x;
            json_object_foreach(v, kk, x) {
                if (!strcmp(kk, "chat")) ok &= !get_integer(x, k->lo, k->hi, &chat);
                else if (!strcmp(kk, "completions")) ok &= !get_integer(x, k->lo, k->hi, &cmpl);
                else ok = 0;
            }
        } else {
            ok = 0;
        }
        if (!ok) {
            snprintf(err, errlen,
                     "%s: key \"default_max_tokens\" must be an integer >= 1 or "
                     "{\"chat\": N, \"completions\": N}",
                     origin);
            return -1;
        }
        c->default_max_tokens_chat = chat;
        c->default_max_tokens_cmpl = cmpl;
        return 0;
    }
    }
    return 0;
}

int ccfg_apply(duet_config *c, json_t *obj, const char *origin, char *err, size_t errlen) {
    const char *name;
    json_t *v;
    json_object_foreach(obj, name, v) {
        const key *k;
        for (k = KEYS; k->name && strcmp(k->name, name); k++) {
        }
        if (!k->name) {
            char safe[80];
            snprintf(safe, sizeof safe, "%.64s", name);
            for (char *q = safe; *q; q++)
                if ((unsigned char)*q < 0x20 || (unsigned char)*q >= 0x7f) *q = '?';
            snprintf(err, errlen, "%s: unknown key \"%s\" (docs/config.md lists the keys)",
                     origin, safe);
            return -1;
        }
        if (json_is_null(v)) { /* null equals absent */
            if (k->type == T_BUDGET) c->default_thinking_budget = -1;
            continue;
        }
        if (set_key(c, k, v, origin, err, errlen)) return -1;
    }
    return 0;
}

int ccfg_read_file(const char *path, json_t **out, char *err, size_t errlen) {
    json_error_t je;
    *out = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!*out) {
        snprintf(err, errlen, "config file %s: %s (line %d, column %d)", path, je.text, je.line,
                 je.column);
        return -1;
    }
    if (!json_is_object(*out)) {
        json_decref(*out);
        *out = NULL;
        snprintf(err, errlen, "config file %s: must hold one JSON object {\"key\": value, ...}",
                 path);
        return -1;
    }
    return 0;
}

int ccfg_load(duet_config *out, const char *path, json_t *flags, char *err, size_t errlen) {
    ccfg_init(out);
    if (path) {
        json_t *f;
        char origin[300];
        snprintf(origin, sizeof origin, "config file %s", path);
        if (ccfg_read_file(path, &f, err, errlen)) goto fail;
        int rc = ccfg_apply(out, f, origin, err, errlen);
        json_decref(f);
        if (rc) goto fail;
    }
    if (flags && ccfg_apply(out, flags, "flags", err, errlen)) goto fail;
    return 0;
fail:
    ccfg_free(out);
    memset(out, 0, sizeof *out);
    return -1;
}

static int key_equal(const duet_config *a, const duet_config *b, const key *k) {
    const void *pa = (const char *)a + k->off, *pb = (const char *)b + k->off;
    switch (k->type) {
    case T_STR: {
        const char *x = *(char *const *)pa, *y = *(char *const *)pb;
        return (!x && !y) || (x && y && !strcmp(x, y));
    }
    case T_STRS: {
        const ccfg_strs *x = pa, *y = pb;
        if (x->n != y->n) return 0;
        for (size_t i = 0; i < x->n; i++)
            if (strcmp(x->v[i], y->v[i])) return 0;
        return 1;
    }
    case T_NUM:
    case T_INT:
    case T_BUDGET: return *(const double *)pa == *(const double *)pb;
    case T_BOOL:
    case T_ENUM: return *(const int *)pa == *(const int *)pb;
    case T_MAXTOK:
        return a->default_max_tokens_chat == b->default_max_tokens_chat &&
               a->default_max_tokens_cmpl == b->default_max_tokens_cmpl;
    }
    return 1;
}

static void key_copy(duet_config *dst, const duet_config *src, const key *k) {
    void *pd = (char *)dst + k->off;
    const void *ps = (const char *)src + k->off;
    switch (k->type) {
    case T_STR: {
        const char *s = *(char *const *)ps;
        free(*(char **)pd);
        *(char **)pd = s ? xstrdup(s) : NULL;
        break;
    }
    case T_STRS: strs_copy(pd, ps); break;
    case T_NUM:
    case T_INT:
    case T_BUDGET: *(double *)pd = *(const double *)ps; break;
    case T_BOOL:
    case T_ENUM: *(int *)pd = *(const int *)ps; break;
    case T_MAXTOK:
        dst->default_max_tokens_chat = src->default_max_tokens_chat;
        dst->default_max_tokens_cmpl = src->default_max_tokens_cmpl;
        break;
    }
}

void ccfg_diff(const duet_config *old, duet_config *neu, json_t *applied, json_t *restart) {
    for (const key *k = KEYS; k->name; k++) {
        if (key_equal(old, neu, k)) continue;
        if (k->reload) {
            json_array_append_new(applied, json_string(k->name));
        } else {
            json_array_append_new(restart, json_string(k->name));
            key_copy(neu, old, k);
        }
    }
}
