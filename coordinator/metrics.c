/* metrics.c — the Prometheus registry behind metrics.h (server-api §10).
 *
 * Why: one table declares every family (name, type, help, buckets, whether vLLM has the same
 * series), so the names in /metrics are exactly the spec's and a caller cannot invent a family
 * by a typo (unknown names are logged once and dropped). Series are created on first use, keyed
 * by their label text; families without extra labels exist from the start so that counters read
 * 0 before the first request (dashboards and rate() need the series to exist).
 */
#include "coordinator/metrics.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "coordinator/clog.h"

typedef enum { M_COUNTER, M_GAUGE, M_HIST } mtype;
typedef enum { B_NONE, B_LATENCY, B_ITL, B_TOKENS } mbuckets;

typedef struct {
    const char *name;   /* without prefix */
    mtype type;
    mbuckets buckets;
    int vllm;           /* 1: also "vllm:<name>" with vllm_names; 2: unprefixed name */
    int labelled;       /* 1: series carry extra labels (none exists until first use) */
    const char *help;
} family_def;

static const family_def FAMILIES[] = {
    {"num_requests_running", M_GAUGE, B_NONE, 1, 0, "Sequences being prefilled or decoded."},
    {"num_requests_waiting", M_GAUGE, B_NONE, 1, 0, "Sequences admitted but not yet scheduled."},
    {"kv_cache_usage_perc", M_GAUGE, B_NONE, 1, 0, "Fraction of KV blocks in use (0-1)."},
    {"prompt_tokens_total", M_COUNTER, B_NONE, 1, 0, "Prompt tokens processed."},
    {"generation_tokens_total", M_COUNTER, B_NONE, 1, 0, "Tokens generated."},
    {"request_success_total", M_COUNTER, B_NONE, 1, 1,
     "Requests finished, by finished_reason (stop, length, tool_calls, abort)."},
    {"num_preemptions_total", M_COUNTER, B_NONE, 1, 0,
     "Sequences preempted for lack of KV blocks (recomputed later)."},
    {"prefix_cache_queries_total", M_COUNTER, B_NONE, 1, 0,
     "Prompt tokens looked up in the prefix cache."},
    {"prefix_cache_hits_total", M_COUNTER, B_NONE, 1, 0,
     "Prompt tokens served from the prefix cache."},
    {"time_to_first_token_seconds", M_HIST, B_LATENCY, 1, 0,
     "Time from arrival to the first generated token."},
    {"inter_token_latency_seconds", M_HIST, B_ITL, 1, 0, "Time between consecutive tokens."},
    {"e2e_request_latency_seconds", M_HIST, B_LATENCY, 1, 0, "Time from arrival to the end."},
    {"request_queue_time_seconds", M_HIST, B_LATENCY, 1, 0, "Time spent waiting for admission."},
    {"request_prefill_time_seconds", M_HIST, B_LATENCY, 1, 0,
     "Time from admission to the first token."},
    {"request_decode_time_seconds", M_HIST, B_LATENCY, 1, 0,
     "Time from the first token to the end."},
    {"request_prompt_tokens", M_HIST, B_TOKENS, 1, 0, "Prompt tokens per request."},
    {"request_generation_tokens", M_HIST, B_TOKENS, 1, 0, "Generated tokens per request."},
    {"iteration_tokens_total", M_HIST, B_TOKENS, 1, 0, "Tokens per engine step."},
    {"spec_decode_num_drafts_total", M_COUNTER, B_NONE, 1, 0, "Speculative draft rounds."},
    {"spec_decode_num_draft_tokens_total", M_COUNTER, B_NONE, 1, 0, "Draft tokens proposed."},
    {"spec_decode_num_accepted_tokens_total", M_COUNTER, B_NONE, 1, 0, "Draft tokens accepted."},
    {"spec_decode_num_accepted_tokens_per_pos_total", M_COUNTER, B_NONE, 1, 1,
     "Draft tokens accepted, by draft position."},
    {"http_requests_total", M_COUNTER, B_NONE, 2, 1,
     "HTTP requests answered, by handler, method and status."},
    {"requests_rejected_total", M_COUNTER, B_NONE, 0, 1,
     "Requests refused before admission, by reason."},
    {"request_errors_total", M_COUNTER, B_NONE, 0, 1, "Requests failed after admission, by code."},
    {"tool_call_parse_failures_total", M_COUNTER, B_NONE, 0, 0,
     "Tool blocks the output parser could not follow."},
    {"tool_call_repairs_total", M_COUNTER, B_NONE, 0, 0,
     "Tool arguments sent as JSON strings because they were not valid JSON."},
    {"last_step_timestamp_seconds", M_GAUGE, B_NONE, 0, 0,
     "Unix time of the last completed engine step."},
    {"server_state", M_GAUGE, B_NONE, 0, 1, "1 for the server's current state."},
    {"build_info", M_GAUGE, B_NONE, 0, 1, "Build information (value 1)."},
    {"worker_up", M_GAUGE, B_NONE, 0, 1, "1 when the worker is connected and loaded."},
    {"worker_step_seconds", M_HIST, B_LATENCY, 0, 1, "Step time as seen per worker."},
};
#define N_FAMILIES (sizeof FAMILIES / sizeof *FAMILIES)

static const double LATENCY_B[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                   5,     10,   20,    40,   80,  160,  320, 640, 1280};
static const double ITL_B[] = {0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                               0.15,  0.2,  0.3,  0.5,  1,    2.5,  5};
#define N_TOKEN_B 21 /* 2^0 .. 2^20 */

typedef struct series {
    struct series *next;
    char *labels;       /* extra label text ("" = none) */
    double value;       /* counter / gauge; histogram: sum */
    uint64_t count;     /* histogram */
    uint64_t *bucket;   /* histogram: [n_buckets] non-cumulative counts */
} series;

struct metrics {
    char *model_label;  /* model_name="..." (escaped) */
    int vllm_names;
    series *fam[N_FAMILIES];
    unsigned char warned[N_FAMILIES + 1];
};

static int n_buckets(mbuckets b) {
    return b == B_LATENCY ? (int)(sizeof LATENCY_B / sizeof *LATENCY_B)
           : b == B_ITL   ? (int)(sizeof ITL_B / sizeof *ITL_B)
           : b == B_TOKENS ? N_TOKEN_B
                           : 0;
}

static double bucket_le(mbuckets b, int i) {
    return b == B_LATENCY ? LATENCY_B[i] : b == B_ITL ? ITL_B[i] : ldexp(1.0, i);
}

static int family_index(metrics *m, const char *name, mtype want) {
    for (size_t i = 0; i < N_FAMILIES; i++)
        if (!strcmp(FAMILIES[i].name, name)) {
            if (FAMILIES[i].type == want) return (int)i;
            break;
        }
    if (!m->warned[N_FAMILIES]) {
        m->warned[N_FAMILIES] = 1;
        coord_log("metrics: unknown metric family or wrong type \"%s\" (ignored; further "
                  "unknown names are not logged)", name);
    }
    return -1;
}

static series *get_series(metrics *m, int f, const char *labels) {
    if (!labels) labels = "";
    series **pp = &m->fam[f];
    for (; *pp; pp = &(*pp)->next)
        if (!strcmp((*pp)->labels, labels)) return *pp;
    series *s = xcalloc(1, sizeof *s);
    s->labels = xstrdup(labels);
    int nb = n_buckets(FAMILIES[f].buckets);
    if (FAMILIES[f].type == M_HIST) s->bucket = xcalloc((size_t)nb, sizeof *s->bucket);
    *pp = s;
    return s;
}

metrics *metrics_new(const char *model_name, int vllm_names) {
    metrics *m = xcalloc(1, sizeof *m);
    m->vllm_names = vllm_names;
    size_t n = strlen(model_name);
    char *esc = xmalloc(2 * n + 1), *o = esc;
    for (size_t i = 0; i < n; i++) {
        char ch = model_name[i];
        if (ch == '\\' || ch == '"') *o++ = '\\';
        if (ch == '\n') {
            *o++ = '\\';
            ch = 'n';
        }
        *o++ = ch;
    }
    *o = 0;
    size_t cap = strlen(esc) + 16;
    m->model_label = xmalloc(cap);
    snprintf(m->model_label, cap, "model_name=\"%s\"", esc);
    free(esc);
    for (size_t i = 0; i < N_FAMILIES; i++)
        if (!FAMILIES[i].labelled) get_series(m, (int)i, "");
    return m;
}

void metrics_free(metrics *m) {
    if (!m) return;
    for (size_t i = 0; i < N_FAMILIES; i++)
        for (series *s = m->fam[i], *nx; s; s = nx) {
            nx = s->next;
            free(s->labels);
            free(s->bucket);
            free(s);
        }
    free(m->model_label);
    free(m);
}

void metrics_inc(metrics *m, const char *family, const char *labels, double v) {
    int f = family_index(m, family, M_COUNTER);
    if (f < 0 || !(v >= 0)) return;
    get_series(m, f, labels)->value += v;
}

void metrics_set(metrics *m, const char *family, const char *labels, double v) {
    int f = family_index(m, family, M_GAUGE);
    if (f < 0) return;
    get_series(m, f, labels)->value = v;
}

void metrics_observe(metrics *m, const char *family, const char *labels, double v) {
    int f = family_index(m, family, M_HIST);
    if (f < 0 || isnan(v)) return;
    series *s = get_series(m, f, labels);
    mbuckets b = FAMILIES[f].buckets;
    int nb = n_buckets(b);
    for (int i = 0; i < nb; i++)
        if (v <= bucket_le(b, i)) {
            s->bucket[i]++;
            break;
        }
    s->count++;
    s->value += v;
}

/* ---- rendering ---------------------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap;
} obuf;

static void put(obuf *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(obuf *o, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(o->p + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        if (n >= 0 && (size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        o->cap = o->cap * 2 + (n > 0 ? (size_t)n : 0) + 256;
        o->p = xrealloc(o->p, o->cap);
    }
}

/* {model_name="...",extra[,le="x"]} */
static void put_labels(obuf *o, const metrics *m, const series *s, const char *le) {
    put(o, "{%s%s%s", m->model_label, s->labels[0] ? "," : "", s->labels);
    if (le) put(o, ",le=\"%s\"", le);
    put(o, "}");
}

static void put_num(obuf *o, double v) {
    if (isinf(v)) put(o, v > 0 ? "+Inf" : "-Inf");
    else if (v == floor(v) && fabs(v) < 1e15) put(o, "%.0f", v);
    else put(o, "%.17g", v);
}

static void render_family(obuf *o, const metrics *m, size_t f, const char *prefix) {
    const family_def *d = &FAMILIES[f];
    const char *type = d->type == M_COUNTER ? "counter" : d->type == M_GAUGE ? "gauge"
                                                                              : "histogram";
    put(o, "# HELP %s%s %s\n# TYPE %s%s %s\n", prefix, d->name, d->help, prefix, d->name, type);
    for (const series *s = m->fam[f]; s; s = s->next) {
        if (d->type != M_HIST) {
            put(o, "%s%s", prefix, d->name);
            put_labels(o, m, s, NULL);
            put(o, " ");
            put_num(o, s->value);
            put(o, "\n");
            continue;
        }
        uint64_t cum = 0;
        int nb = n_buckets(d->buckets);
        for (int i = 0; i < nb; i++) {
            cum += s->bucket[i];
            char le[32];
            snprintf(le, sizeof le, "%g", bucket_le(d->buckets, i));
            put(o, "%s%s_bucket", prefix, d->name);
            put_labels(o, m, s, le);
            put(o, " %llu\n", (unsigned long long)cum);
        }
        put(o, "%s%s_bucket", prefix, d->name);
        put_labels(o, m, s, "+Inf");
        put(o, " %llu\n%s%s_sum", (unsigned long long)s->count, prefix, d->name);
        put_labels(o, m, s, NULL);
        put(o, " ");
        put_num(o, s->value);
        put(o, "\n%s%s_count", prefix, d->name);
        put_labels(o, m, s, NULL);
        put(o, " %llu\n", (unsigned long long)s->count);
    }
}

char *metrics_render(metrics *m, size_t *len) {
    obuf o = {xmalloc(4096), 0, 4096};
    o.p[0] = 0;
    for (size_t f = 0; f < N_FAMILIES; f++) {
        render_family(&o, m, f, "duet:");
        if (m->vllm_names && FAMILIES[f].vllm)
            render_family(&o, m, f, FAMILIES[f].vllm == 2 ? "" : "vllm:");
    }
    *len = o.len;
    return o.p;
}
