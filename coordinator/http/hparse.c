/* hparse.c — request bodies of the generation endpoints → a validated greq (server-api §3.1,
 * §3.2–3.4, §5), and chat messages → prompt ids.
 *
 * Why: every client mistake must become a 400 naming the field (never a 5xx, never a silently
 * different answer), and both endpoints share most fields; keeping validation in one file
 * keeps the rules (null = absent, 10.0 is an integer, ranges inclusive) in one place. Fields
 * that would change the output and are not implemented are refused (§2), never dropped.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "common/err.h"
#include "coordinator/chat/encoder.h"
#include "coordinator/clog.h"
#include "coordinator/http/hint.h"

/* ---- typed field access: null equals absent (§2) ------------------------------------------ */

json_t *field(json_t *o, const char *k) {
    json_t *v = json_object_get(o, k);
    return json_is_null(v) ? NULL : v;
}

/* 0 absent, 1 set, -1 error. Integers may be written 10 or 10.0. */
int get_int(apierr *e, json_t *o, const char *k, long long lo, long long hi, long long *out) {
    json_t *v = field(o, k);
    if (!v) return 0;
    long long x;
    if (json_is_integer(v)) x = json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
             fabs(json_real_value(v)) < 9.2e18)
        x = (long long)json_real_value(v);
    else return fail(e, 400, "invalid_type", k, "\"%s\" must be an integer", k);
    if (x < lo || x > hi)
        return fail(e, 400, "invalid_value", k, "\"%s\" must be between %lld and %lld (got %lld)",
                    k, lo, hi, x);
    *out = x;
    return 1;
}

int get_num(apierr *e, json_t *o, const char *k, double lo, double hi, int lo_open,
            double *out) {
    json_t *v = field(o, k);
    if (!v) return 0;
    if (!json_is_number(v)) return fail(e, 400, "invalid_type", k, "\"%s\" must be a number", k);
    double x = json_number_value(v);
    if (!(x <= hi && (lo_open ? x > lo : x >= lo)))
        return fail(e, 400, "invalid_value", k, "\"%s\" must be in %s%g, %g] (got %g)", k,
                    lo_open ? "(" : "[", lo, hi, x);
    *out = x;
    return 1;
}

int get_bool(apierr *e, json_t *o, const char *k, bool *out) {
    json_t *v = field(o, k);
    if (!v) return 0;
    if (!json_is_boolean(v))
        return fail(e, 400, "invalid_type", k, "\"%s\" must be a boolean", k);
    *out = json_is_true(v);
    return 1;
}

int get_str(apierr *e, json_t *o, const char *k, const char **out) {
    json_t *v = field(o, k);
    if (!v) return 0;
    if (!json_is_string(v)) return fail(e, 400, "invalid_type", k, "\"%s\" must be a string", k);
    *out = json_string_value(v);
    return 1;
}

int is_model(const http_server *s, const char *m) {
    if (!strcmp(m, s->model_id)) return 1;
    for (size_t i = 0; i < s->n_aliases; i++)
        if (!strcmp(m, s->aliases[i])) return 1;
    return 0;
}

/* model: absent/"" = served; the served id or an alias (model_aliases); anything with
 * accept_any_model; else 404. */
int check_model(const http_server *s, apierr *e, json_t *body, const char **model) {
    const char *m = NULL;
    if (get_str(e, body, "model", &m) < 0) return -1;
    if (!m || !*m) {
        *model = s->model_id;
        return 0;
    }
    if (!is_model(s, m) && !s->accept_any_model)
        return fail(e, 404, "model_not_found", "model",
                    "the model \"%s\" does not exist; this server serves \"%s\"", m, s->model_id);
    *model = m;
    return 0;
}

void greq_free(greq *g) {
    free(g->bias_ids);
    free(g->bias_vals);
    for (size_t i = 0; i < g->n_stop; i++) free(g->stop[i]);
    free(g->stop_ids);
    free(g->named);
    for (size_t i = 0; i < g->n_tools; i++) free(g->tool_names[i]);
    free(g->tool_names);
    free(g->tool_noargs);
    for (size_t i = 0; i < g->n_prompts; i++) tok_ids_free(&g->prompts[i]);
    for (size_t i = 0; g->echo_text && i < g->n_prompts; i++) free(g->echo_text[i]);
    free(g->echo_text);
    free(g->echo_len);
    free(g->prompts);
    memset(g, 0, sizeof *g);
}

/* Fields that would change the output and are not implemented (§2). */
static int refuse_unimplemented(apierr *e, json_t *b, int chat) {
    static const char *const always[] = {"functions", "function_call", "prompt_logprobs",
                                         "audio", NULL};
    for (int i = 0; always[i]; i++)
        if (field(b, always[i]))
            return fail(e, 400, "unsupported_parameter", always[i],
                        "\"%s\" is not supported by this server", always[i]);
    if (json_is_true(field(b, "continue_final_message")))
        return fail(e, 400, "unsupported_parameter", "continue_final_message",
                    "\"continue_final_message\" is not supported yet");
    json_t *m = field(b, "modalities");
    if (m) {
        size_t i;
        json_t *v;
        if (!json_is_array(m))
            return fail(e, 400, "invalid_type", "modalities", "\"modalities\" must be an array");
        json_array_foreach(m, i, v) {
            if (!json_is_string(v) || strcmp(json_string_value(v), "text"))
                return fail(e, 400, "unsupported_value", "modalities",
                            "only the \"text\" modality is supported");
        }
    }
    if (!chat) {
        const char *suffix = NULL;
        if (get_str(e, b, "suffix", &suffix) < 0) return -1;
        if (suffix && *suffix)
            return fail(e, 400, "unsupported_parameter", "suffix", "\"suffix\" is not supported");
        bool echo = false;
        if (get_bool(e, b, "echo", &echo) < 0) return -1;
        if (echo && field(b, "logprobs"))
            return fail(e, 400, "unsupported_value", "echo",
                        "\"echo\" together with \"logprobs\" needs prompt logprobs, which are not "
                        "supported yet");
    }
    return 0;
}

/* Top-level fields each endpoint knows (used, refused, or listed as ignored in §3.1 / §5). */
static const char *const KNOWN_COMMON[] = {
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "stop",
    "stop_token_ids", "n", "best_of", "logprobs", "user", "ignore_eos", "min_tokens",
    "skip_special_tokens", "include_stop_str_in_output", "return_token_ids", "priority",
    "functions", "function_call", "prompt_logprobs", "continue_final_message", "audio",
    "modalities", "service_tier", "store", "metadata", "prediction", "web_search_options",
    "cache_prompt", "cache_salt", "chat_template", "add_generation_prompt", "echo", "documents",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "suffix", NULL};
static const char *const KNOWN_CHAT[] = {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
    "parallel_tool_calls", "response_format", "reasoning_effort", "thinking",
    "chat_template_kwargs", "thinking_token_budget", "include_reasoning", NULL};
static const char *const KNOWN_CMPL[] = {"prompt", NULL};

static int in_list(const char *const *l, const char *k) {
    for (; *l; l++)
        if (!strcmp(*l, k)) return 1;
    return 0;
}

/* Unknown top-level fields (§2): a 400 with strict_request_fields, else ignored and logged once
 * per name at info level (at most 256 names are remembered; later ones are not logged). */
static int check_unknown(http_server *s, apierr *e, json_t *b, int chat) {
    const char *k;
    json_t *v;
    json_object_foreach(b, k, v) {
        if (in_list(KNOWN_COMMON, k) || in_list(chat ? KNOWN_CHAT : KNOWN_CMPL, k)) continue;
        if (s->strict_fields)
            return fail(e, 400, "unsupported_parameter", k,
                        "unknown field \"%.64s\" (this server refuses unknown fields: "
                        "strict_request_fields is on)", k);
        size_t i;
        for (i = 0; i < s->n_seen_unknown && strncmp(s->seen_unknown[i], k, 64); i++) {
        }
        if (i < s->n_seen_unknown || s->n_seen_unknown >= 256) continue;
        s->seen_unknown = xrealloc(s->seen_unknown, (s->n_seen_unknown + 1) * sizeof *s->seen_unknown);
        char name[80];
        snprintf(name, sizeof name, "%.64s", k);
        s->seen_unknown[s->n_seen_unknown++] = xstrdup(name);
        utf8_clean(name);
        coord_log("info: %s request field \"%s\" is unknown and ignored (logged once per name)",
                  chat ? "chat" : "completions", name);
    }
    return 0;
}

/* stop: a string or up to 16 strings of at most 256 bytes; empty ones are skipped. */
static int parse_stop(apierr *e, json_t *b, greq *g) {
    json_t *stop = field(b, "stop");
    if (!stop) return 0;
    if (json_is_string(stop)) {
        if (json_string_length(stop) > 256 ||
            memchr(json_string_value(stop), 0, json_string_length(stop)))
            return fail(e, 400, "invalid_value", "stop",
                        "\"stop\" must be at most 256 bytes (and hold no NUL)");
        if (json_string_length(stop)) g->stop[g->n_stop++] = xstrdup(json_string_value(stop));
        return 0;
    }
    if (!json_is_array(stop) || json_array_size(stop) > MAX_STOP)
        return fail(e, 400, "invalid_value", "stop",
                    "\"stop\" must be a string or an array of at most 16 strings");
    size_t i;
    json_t *v;
    json_array_foreach(stop, i, v) {
        if (!json_is_string(v) || json_string_length(v) > 256 ||
            memchr(json_string_value(v), 0, json_string_length(v)))
            return fail(e, 400, "invalid_value", "stop",
                        "\"stop\" entries must be strings of at most 256 bytes");
        if (json_string_length(v)) g->stop[g->n_stop++] = xstrdup(json_string_value(v));
    }
    return 0;
}

static int parse_stop_ids(const http_server *s, apierr *e, json_t *b, greq *g) {
    json_t *a = field(b, "stop_token_ids");
    if (!a) return 0;
    if (!json_is_array(a) || json_array_size(a) > MAX_STOP_IDS)
        return fail(e, 400, "invalid_type", "stop_token_ids",
                    "\"stop_token_ids\" must be an array of at most %d token ids", MAX_STOP_IDS);
    g->stop_ids = xmalloc((json_array_size(a) + 1) * sizeof *g->stop_ids);
    size_t i;
    json_t *v;
    json_array_foreach(a, i, v) {
        if (!json_is_integer(v))
            return fail(e, 400, "invalid_type", "stop_token_ids",
                        "\"stop_token_ids\"[%zu] must be an integer token id", i);
        if (json_integer_value(v) < 0 || json_integer_value(v) >= s->vocab)
            return fail(e, 400, "invalid_value", "stop_token_ids",
                        "\"stop_token_ids\"[%zu] = %lld is not a token id in [0, %d)", i,
                        (long long)json_integer_value(v), s->vocab);
        g->stop_ids[g->n_stop_ids++] = (int32_t)json_integer_value(v);
    }
    return 0;
}

/* logit_bias: {"tokenId": -100..100}, at most 1024 entries, ids < vocab. */
static int parse_bias(const http_server *s, apierr *e, json_t *b, greq *g) {
    json_t *o = field(b, "logit_bias");
    if (!o) return 0;
    if (!json_is_object(o))
        return fail(e, 400, "invalid_type", "logit_bias",
                    "\"logit_bias\" must be an object {\"token id\": bias}");
    if (json_object_size(o) > MAX_BIAS)
        return fail(e, 400, "invalid_value", "logit_bias",
                    "\"logit_bias\" has %zu entries; at most %d are allowed",
                    json_object_size(o), MAX_BIAS);
    size_t n = json_object_size(o);
    g->bias_ids = xmalloc((n + 1) * sizeof *g->bias_ids);
    g->bias_vals = xmalloc((n + 1) * sizeof *g->bias_vals);
    const char *k;
    json_t *v;
    size_t i = 0;
    json_object_foreach(o, k, v) {
        char *end = NULL;
        long long id = strtoll(k, &end, 10);
        if (!*k || *end || k[0] == '+' || k[0] == ' ' || id < 0 || id >= s->vocab)
            return fail(e, 400, "invalid_value", "logit_bias",
                        "\"logit_bias\" key \"%.40s\" is not a token id in [0, %d)", k,
                        s->vocab);
        if (!json_is_number(v))
            return fail(e, 400, "invalid_type", "logit_bias",
                        "\"logit_bias\"[\"%.40s\"] must be a number", k);
        double x = json_number_value(v);
        if (!(x >= -100 && x <= 100))
            return fail(e, 400, "invalid_value", "logit_bias",
                        "\"logit_bias\"[\"%.40s\"] must be in [-100, 100] (got %g)", k, x);
        g->bias_ids[i] = (int32_t)id;
        g->bias_vals[i++] = (float)x;
    }
    g->p.bias_ids = g->bias_ids;
    g->p.bias_values = g->bias_vals;
    g->p.n_bias = (int)i;
    return 0;
}

/* Sampling fields, max_tokens, n, logprobs, stream options: both endpoints. */
static int parse_common(http_server *s, apierr *e, json_t *b, greq *g) {
    eng_params *p = &g->p;
    double temp = s->def_temperature, top_p = s->def_top_p, min_p = s->def_min_p, rep = 1,
           pres = 0, freq = 0;
    long long top_k = 0, seed = 0, prio = 0;
    if (get_num(e, b, "temperature", 0, 2, 0, &temp) < 0 ||
        get_num(e, b, "top_p", 0, 1, 1, &top_p) < 0 ||
        get_int(e, b, "top_k", -1, s->vocab, &top_k) < 0 ||
        get_num(e, b, "min_p", 0, 1, 0, &min_p) < 0 ||
        get_num(e, b, "repetition_penalty", 0, 2, 1, &rep) < 0 ||
        get_num(e, b, "presence_penalty", -2, 2, 0, &pres) < 0 ||
        get_num(e, b, "frequency_penalty", -2, 2, 0, &freq) < 0 ||
        get_int(e, b, "priority", INT32_MIN + 1LL, INT32_MAX, &prio) < 0)
        return -1;
    int has_seed = get_int(e, b, "seed", INT64_MIN, INT64_MAX, &seed);
    if (has_seed < 0) return -1;
    if (!has_seed && getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed)
        seed = (long long)time(NULL);
    p->temperature = temp < 1e-5 ? 0.0f : (float)temp;
    p->top_p = (float)top_p;
    p->top_k = top_k < 0 ? 0 : (int)top_k;
    p->min_p = (float)min_p;
    p->repetition_penalty = (float)rep;
    p->presence_penalty = (float)pres;
    p->frequency_penalty = (float)freq;
    p->seed = (uint64_t)seed;
    p->priority = (int)prio;
    long long mct = 0;
    int has_mct = g->chat ? get_int(e, b, "max_completion_tokens", 1, INT32_MAX, &mct) : 0;
    if (has_mct < 0) return -1;
    int has_mt = get_int(e, b, "max_tokens", 1, INT32_MAX, &g->max_tokens);
    if (has_mt < 0) return -1;
    if (has_mct) g->max_tokens = mct;
    else if (!has_mt) g->max_tokens = g->chat ? s->def_max_chat : s->def_max_cmpl;
    if (get_int(e, b, "min_tokens", 0, g->max_tokens, &g->min_tokens) < 0) {
        if (!strcmp(e->code, "invalid_value"))
            fail(e, 400, "invalid_value", "min_tokens",
                 "\"min_tokens\" must be between 0 and max_tokens (%lld)", g->max_tokens);
        return -1;
    }
    long long n = 1, best_of = 0;
    if (get_int(e, b, "n", 1, s->max_n, &n) < 0) return -1;
    int has_bo = get_int(e, b, "best_of", 1, s->max_n, &best_of);
    if (has_bo < 0) return -1;
    if (has_bo && best_of != n)
        return fail(e, 400, "invalid_value", "best_of",
                    "\"best_of\" must equal \"n\" (%lld); ranking several samples is not "
                    "supported", n);
    g->n = (int)n;
    g->stream = g->ignore_eos = g->include_stop = g->return_token_ids = false;
    g->skip_special = true;
    if (get_bool(e, b, "stream", &g->stream) < 0 ||
        get_bool(e, b, "ignore_eos", &g->ignore_eos) < 0 ||
        get_bool(e, b, "skip_special_tokens", &g->skip_special) < 0 ||
        get_bool(e, b, "include_stop_str_in_output", &g->include_stop) < 0 ||
        get_bool(e, b, "return_token_ids", &g->return_token_ids) < 0)
        return -1;
    g->n_logprobs = -1;
    if (g->chat) {
        long long tlp = 0;
        bool lp = false;
        if (get_bool(e, b, "logprobs", &lp) < 0) return -1;
        int has_tlp = get_int(e, b, "top_logprobs", 0, ENG_MAX_TOP_LOGPROBS, &tlp);
        if (has_tlp < 0) return -1;
        if (has_tlp && !lp)
            return fail(e, 400, "invalid_value", "top_logprobs",
                        "\"top_logprobs\" requires \"logprobs\": true");
        g->logprobs = lp;
        if (lp) g->n_logprobs = (int)tlp;
    } else {
        long long lp = 0;
        int has = get_int(e, b, "logprobs", 0, ENG_MAX_TOP_LOGPROBS, &lp);
        if (has < 0) return -1;
        g->logprobs = has > 0;
        if (has) g->n_logprobs = (int)lp;
    }
    p->n_logprobs = g->n_logprobs;
    bool echo = false;
    if (!g->chat && get_bool(e, b, "echo", &echo) < 0) return -1;
    g->echo = echo;
    json_t *so = field(b, "stream_options");
    if (so) {
        if (!g->stream)
            return fail(e, 400, "invalid_value", "stream_options",
                        "\"stream_options\" is only allowed with \"stream\": true");
        if (!json_is_object(so))
            return fail(e, 400, "invalid_type", "stream_options",
                        "\"stream_options\" must be an object");
        bool iu = false, cu = false;
        if (get_bool(e, so, "include_usage", &iu) < 0)
            return fail(e, 400, "invalid_type", "stream_options.include_usage",
                        "\"stream_options.include_usage\" must be a boolean");
        if (get_bool(e, so, "continuous_usage_stats", &cu) < 0)
            return fail(e, 400, "invalid_type", "stream_options.continuous_usage_stats",
                        "\"stream_options.continuous_usage_stats\" must be a boolean");
        g->include_usage = iu;
        g->continuous_usage = cu;
    }
    if (parse_stop(e, b, g) || parse_stop_ids(s, e, b, g) || parse_bias(s, e, b, g)) return -1;
    return 0;
}

/* Every prompt id must exist in the model; the prompt must leave room for min_tokens + 1. */
static int check_prompt(http_server *s, apierr *e, tok_ids_t *ids, long long min_tokens,
                        const char *param) {
    if (ids->n == 0) return fail(e, 400, "invalid_value", param, "the prompt is empty (0 tokens)");
    for (size_t i = 0; i < ids->n; i++)
        if (s->fold_ids && ids->v[i] >= s->vocab) ids->v[i] %= s->vocab;
    for (size_t i = 0; i < ids->n; i++)
        if (ids->v[i] < 0 || ids->v[i] >= s->vocab)
            return fail(e, 400, "invalid_value", param,
                        "prompt token id %d (at index %zu) is outside the model's vocabulary "
                        "[0, %d)",
                        (int)ids->v[i], i, s->vocab);
    if ((long long)ids->n >= s->max_model_len)
        return fail(e, 400, "context_length_exceeded", param,
                    "the prompt has %zu tokens, but this model's maximum context length is %d "
                    "tokens (prompt and completion together)",
                    ids->n, s->max_model_len);
    if ((long long)ids->n + min_tokens > s->max_model_len)
        return fail(e, 400, "context_length_exceeded", param,
                    "the prompt has %zu tokens and min_tokens is %lld, but this model's maximum "
                    "context length is %d tokens",
                    ids->n, min_tokens, s->max_model_len);
    return 0;
}

static int name_ok(const char *name) {
    size_t nl = strlen(name);
    int ok = nl >= 1 && nl <= 64;
    for (size_t k = 0; ok && k < nl; k++) {
        char ch = name[k];
        ok = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
             ch == '_' || ch == '.' || ch == ':' || ch == '-';
    }
    return ok;
}

/* A strict tool (or additionalProperties false) without properties: its arguments are {}. */
static bool no_args(json_t *fn) {
    json_t *params = field(fn, "parameters");
    json_t *props = params ? field(params, "properties") : NULL;
    if (props && (!json_is_object(props) || json_object_size(props))) return false;
    return json_is_true(field(fn, "strict")) ||
           (params && json_is_false(json_object_get(params, "additionalProperties")));
}

/* tools and tool_choice (§3.3). */
static int parse_tools(apierr *e, json_t *b, greq *g) {
    json_t *tools = field(b, "tools");
    size_t i;
    json_t *t;
    if (tools) {
        if (!json_is_array(tools))
            return fail(e, 400, "invalid_type", "tools", "\"tools\" must be an array");
        if (json_array_size(tools) > 128)
            return fail(e, 400, "invalid_value", "tools", "at most 128 tools are allowed");
        g->tool_names = xcalloc(json_array_size(tools) + 1, sizeof *g->tool_names);
        g->tool_noargs = xcalloc(json_array_size(tools) + 1, sizeof *g->tool_noargs);
        json_array_foreach(tools, i, t) {
            char param[64];
            snprintf(param, sizeof param, "tools[%zu]", i);
            const char *type = json_string_value(json_object_get(t, "type"));
            json_t *fn = json_object_get(t, "function");
            if (!type || strcmp(type, "function") || !json_is_object(fn) ||
                !json_is_string(json_object_get(fn, "name")))
                return fail(e, 400, "invalid_value", param,
                            "%s must be {\"type\":\"function\",\"function\":{\"name\":...}}",
                            param);
            /* the name goes inside a DSML attribute: 1-64 of [A-Za-z0-9_.:-], unique */
            const char *name = json_string_value(json_object_get(fn, "name"));
            snprintf(param, sizeof param, "tools[%zu].function.name", i);
            if (!name_ok(name))
                return fail(e, 400, "invalid_value", param,
                            "a tool name must be 1 to 64 characters from A-Z a-z 0-9 _ . : -");
            for (size_t k = 0; k < g->n_tools; k++)
                if (!strcmp(name, g->tool_names[k]))
                    return fail(e, 400, "invalid_value", param,
                                "the tool name \"%s\" is declared twice", name);
            json_t *pa = field(fn, "parameters");
            if (pa && !json_is_object(pa)) {
                snprintf(param, sizeof param, "tools[%zu].function.parameters", i);
                return fail(e, 400, "invalid_type", param, "%s must be an object", param);
            }
            json_t *st = field(fn, "strict");
            if (st && !json_is_boolean(st)) {
                snprintf(param, sizeof param, "tools[%zu].function.strict", i);
                return fail(e, 400, "invalid_type", param, "%s must be a boolean", param);
            }
            g->tool_noargs[g->n_tools] = no_args(fn);
            g->tool_names[g->n_tools++] = xstrdup(name);
        }
    }
    g->tool_choice = g->n_tools ? TC_AUTO : TC_NONE;
    json_t *tc = field(b, "tool_choice");
    if (!tc) return 0;
    const char *ts = json_string_value(tc);
    if (ts && !strcmp(ts, "none")) {
        g->tool_choice = TC_NONE;
    } else if (ts && (!strcmp(ts, "auto") || !strcmp(ts, "required"))) {
        if (!strcmp(ts, "required")) {
            if (!g->n_tools)
                return fail(e, 400, "invalid_value", "tool_choice",
                            "\"tool_choice\": \"required\" needs \"tools\"");
            g->tool_choice = TC_REQUIRED;
        }
    } else if (json_is_object(tc)) {
        const char *type = json_string_value(json_object_get(tc, "type"));
        json_t *fn = json_object_get(tc, "function");
        const char *name = json_is_object(fn) ? json_string_value(json_object_get(fn, "name"))
                                              : NULL;
        if (!type || strcmp(type, "function") || !name)
            return fail(e, 400, "invalid_value", "tool_choice",
                        "a named \"tool_choice\" must be {\"type\":\"function\",\"function\":"
                        "{\"name\":\"...\"}}");
        size_t k;
        for (k = 0; k < g->n_tools; k++)
            if (!strcmp(g->tool_names[k], name)) break;
        if (k == g->n_tools)
            return fail(e, 400, "invalid_value", "tool_choice.function.name",
                        "\"tool_choice\" names the function \"%.64s\", which is not in \"tools\"",
                        name);
        g->tool_choice = TC_NAMED;
        g->named = xstrdup(name);
    } else {
        return fail(e, 400, "invalid_value", "tool_choice",
                    "\"tool_choice\" must be \"none\", \"auto\", \"required\" or "
                    "{\"type\":\"function\",\"function\":{\"name\":...}}");
    }
    return 0;
}

/* Chat messages → prompt ids (shared by chat completions and chat-form tokenize). */
int render_chat(http_server *s, apierr *e, json_t *b, tok_ids_t *ids, bool *thinking_out,
                int *n_tools_out, const char **effort_out) {
    json_t *msgs = json_object_get(b, "messages");
    if (!msgs || json_is_null(msgs))
        return fail(e, 400, "missing_required_parameter", "messages",
                    "\"messages\" is required");
    if (!json_is_array(msgs))
        return fail(e, 400, "invalid_type", "messages", "\"messages\" must be an array");
    if (json_array_size(msgs) == 0)
        return fail(e, 400, "invalid_value", "messages",
                    "\"messages\" must contain at least one message");
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m) {
        char param[96];
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (!json_is_object(m))
            return fail(e, 400, "invalid_type", param, "%s must be an object", param);
        const char *role = json_string_value(json_object_get(m, "role"));
        snprintf(param, sizeof param, "messages[%zu].role", i);
        if (!role) return fail(e, 400, "invalid_type", param, "%s must be a string", param);
        if (!strcmp(role, "function"))
            return fail(e, 400, "invalid_value", param,
                        "the \"function\" role is not supported; use \"tool\"");
        if (i + 1 == json_array_size(msgs) && !strcmp(role, "assistant"))
            return fail(e, 400, "invalid_value", param,
                        "the last message must not be an assistant message (prefix "
                        "continuation is not supported yet)");
        json_t *content = json_object_get(m, "content");
        if (json_is_array(content)) {
            size_t j;
            json_t *part;
            json_array_foreach(content, j, part) {
                const char *type = json_string_value(json_object_get(part, "type"));
                if (!type || strcmp(type, "text")) {
                    snprintf(param, sizeof param, "messages[%zu].content[%zu].type", i, j);
                    return fail(e, 400, "unsupported_value", param,
                                "only text content parts are supported (got \"%s\")",
                                type ? type : "?");
                }
            }
        }
    }
    greq tg = {0};
    int rc = parse_tools(e, b, &tg);
    greq_free(&tg);
    if (rc) return -1;
    json_t *tools = field(b, "tools");
    json_t *rf = field(b, "response_format");
    if (rf) {
        const char *t = json_is_object(rf) ? json_string_value(json_object_get(rf, "type")) : NULL;
        if (!t || (strcmp(t, "text") && strcmp(t, "json_object") && strcmp(t, "json_schema")))
            return fail(e, 400, "invalid_value", "response_format",
                        "\"response_format.type\" must be text, json_object or json_schema");
        if (!strcmp(t, "json_schema")) {
            json_t *js = json_object_get(rf, "json_schema");
            if (!json_is_object(js) || !json_is_string(json_object_get(js, "name")) ||
                !json_is_object(json_object_get(js, "schema")))
                return fail(e, 400, "invalid_value", "response_format.json_schema",
                            "\"response_format.json_schema\" needs \"name\" (a string) and "
                            "\"schema\" (an object)");
        }
        if (!strcmp(t, "text")) rf = NULL;
    }
    /* thinking (§3.4): thinking.type, then kwargs, then reasoning_effort none, then
     * default_thinking */
    bool thinking = s->def_thinking;
    int decided = 0;
    json_t *th = field(b, "thinking");
    if (th) {
        const char *t = json_is_object(th) ? json_string_value(json_object_get(th, "type")) : NULL;
        if (!t || (strcmp(t, "enabled") && strcmp(t, "disabled")))
            return fail(e, 400, "invalid_value", "thinking",
                        "\"thinking.type\" must be \"enabled\" or \"disabled\"");
        thinking = !strcmp(t, "enabled");
        decided = 1;
    }
    json_t *kw = field(b, "chat_template_kwargs");
    if (kw && !json_is_object(kw))
        return fail(e, 400, "invalid_type", "chat_template_kwargs",
                    "\"chat_template_kwargs\" must be an object");
    bool kb = false;
    if (!decided && kw) {
        int r1 = get_bool(e, kw, "thinking", &kb);
        if (r1 < 0) return -1;
        if (r1 > 0) {
            thinking = kb;
            decided = 1;
        } else {
            int r2 = get_bool(e, kw, "enable_thinking", &kb);
            if (r2 < 0) return -1;
            if (r2 > 0) {
                thinking = kb;
                decided = 1;
            }
        }
    }
    const char *effort = NULL;
    if (get_str(e, b, "reasoning_effort", &effort) < 0) return -1;
    if (!effort && kw) {
        json_t *v = field(kw, "reasoning_effort");
        if (v && !json_is_string(v))
            return fail(e, 400, "invalid_type", "chat_template_kwargs.reasoning_effort",
                        "\"reasoning_effort\" must be a string");
        effort = json_string_value(v);
    }
    enc_effort eff = ENC_EFFORT_LOW;
    if (effort) {
        if (!strcmp(effort, "none")) {
            if (!decided) thinking = false;
        } else if (!strcmp(effort, "minimal") || !strcmp(effort, "low") ||
                   !strcmp(effort, "medium")) {
            eff = ENC_EFFORT_LOW;
        } else if (!strcmp(effort, "high") || !strcmp(effort, "xhigh")) {
            eff = ENC_EFFORT_HIGH;
        } else if (!strcmp(effort, "max")) {
            eff = s->max_model_len >= 393216 ? ENC_EFFORT_MAX : ENC_EFFORT_HIGH;
        } else {
            return fail(e, 400, "invalid_value", "reasoning_effort",
                        "\"reasoning_effort\" must be none, minimal, low, medium, high, xhigh "
                        "or max");
        }
    }
    bool drop = true;
    if (kw && get_bool(e, kw, "drop_thinking", &drop) < 0) return -1;
    enc_request er;
    enc_request_init(&er);
    er.messages = msgs;
    er.tools = tools;
    er.response_format = rf;
    er.thinking = thinking;
    er.effort = eff;
    er.flavour = ENC_FLAVOUR_0731;
    er.drop_thinking = drop;
    er.developer_as_system = true;
    char *text = NULL;
    size_t len = 0;
    char err[400];
    if (enc_render(&er, &text, &len, err, sizeof err))
        return fail(e, 400, "invalid_value", "messages", "%s", err);
    rc = tok_encode(s->tok, text, len, ids);
    free(text);
    if (rc)
        return fail(e, 400, "context_length_exceeded", "messages",
                    "the rendered prompt is too long to tokenize");
    *thinking_out = thinking;
    *effort_out = !thinking ? "none"
                  : eff == ENC_EFFORT_MAX ? "max"
                  : eff == ENC_EFFORT_HIGH ? "high"
                                           : "low";
    *n_tools_out = tools ? (int)json_array_size(tools) : 0;
    return 0;
}

static void ids_push(tok_ids_t *ids, int32_t v) {
    if (ids->n == ids->cap) {
        ids->cap = ids->cap ? 2 * ids->cap : 64;
        ids->v = xrealloc(ids->v, ids->cap * sizeof *ids->v);
    }
    ids->v[ids->n++] = v;
}

/* One completions prompt: a string or an array of token ids. */
static int one_prompt(http_server *s, apierr *e, json_t *pr, size_t k, tok_ids_t *ids) {
    char param[40];
    snprintf(param, sizeof param, "prompt");
    if (json_is_string(pr)) {
        if (tok_encode(s->tok, json_string_value(pr), json_string_length(pr), ids))
            return fail(e, 400, "context_length_exceeded", param,
                        "prompt %zu is too long to tokenize", k);
        return 0;
    }
    if (!json_is_array(pr))
        return fail(e, 400, "invalid_type", param,
                    "\"prompt\" must be a string, an array of strings, an array of token ids or "
                    "an array of token-id arrays");
    size_t i;
    json_t *v;
    json_array_foreach(pr, i, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > INT32_MAX)
            return fail(e, 400, "invalid_type", param,
                        "\"prompt\"[%zu] is not a token id (an integer >= 0)", i);
        ids_push(ids, (int32_t)json_integer_value(v));
    }
    return 0;
}

/* prompt: string, [string...], [int...] or [[int...]...]; at most 64 prompts. */
/* echo: the prompt's text as a client sees generated text (the same incremental decoder:
 * special tokens spelled out, a broken UTF-8 tail as U+FFFD), so the JSON is always valid.
 * Taken before check_prompt folds test ids (--fold-prompt-ids). */
static void echo_text(const http_server *s, const tok_ids_t *pr, char **out, size_t *len) {
    tok_stream_t *ts = tok_stream_new(s->tok, 0);
    chat_sb sb = {0};
    size_t n;
    for (size_t i = 0; i < pr->n; i++) {
        const char *t = tok_stream_put(ts, pr->v[i], &n);
        if (n) chat_sb_put(&sb, t, n);
    }
    const char *t = tok_stream_flush(ts, &n);
    if (n) chat_sb_put(&sb, t, n);
    tok_stream_free(ts);
    *out = sb.p ? sb.p : xstrdup("");
    *len = sb.len;
}

static int completion_prompts(http_server *s, apierr *e, json_t *b, greq *g) {
    json_t *pr = json_object_get(b, "prompt");
    if (!pr || json_is_null(pr))
        return fail(e, 400, "missing_required_parameter", "prompt", "\"prompt\" is required");
    int multi = json_is_array(pr) && json_array_size(pr) > 0 &&
                (json_is_string(json_array_get(pr, 0)) || json_is_array(json_array_get(pr, 0)));
    size_t np = multi ? json_array_size(pr) : 1;
    if (np > MAX_CHOICES)
        return fail(e, 400, "invalid_value", "prompt", "at most %d prompts are allowed",
                    MAX_CHOICES);
    if (np * (size_t)g->n > MAX_CHOICES)
        return fail(e, 400, "invalid_value", "n",
                    "prompts x n is %zu; at most %d choices per request are allowed",
                    np * (size_t)g->n, MAX_CHOICES);
    g->prompts = xcalloc(np, sizeof *g->prompts);
    if (g->echo) {
        g->echo_text = xcalloc(np, sizeof *g->echo_text);
        g->echo_len = xcalloc(np, sizeof *g->echo_len);
    }
    for (size_t k = 0; k < np; k++) {
        g->n_prompts++;
        json_t *one = multi ? json_array_get(pr, k) : pr;
        if (multi && !json_is_string(one) && !json_is_array(one))
            return fail(e, 400, "invalid_type", "prompt",
                        "\"prompt\"[%zu] must be a string or an array of token ids", k);
        if (one_prompt(s, e, one, k, &g->prompts[k])) return -1;
        if (g->echo && g->prompts[k].n)
            echo_text(s, &g->prompts[k], &g->echo_text[k], &g->echo_len[k]);
        if (check_prompt(s, e, &g->prompts[k], g->min_tokens, "prompt")) return -1;
    }
    return 0;
}

int parse_generation(http_server *s, apierr *e, json_t *b, int chat, greq *g) {
    memset(g, 0, sizeof *g);
    g->chat = chat;
    g->budget = -1;
    eng_params_init(&g->p);
    if (check_model(s, e, b, &g->model) || refuse_unimplemented(e, b, chat) ||
        check_unknown(s, e, b, chat) || parse_common(s, e, b, g))
        return -1;
    if (!chat) return completion_prompts(s, e, b, g);
    if (parse_tools(e, b, g)) return -1;
    bool ptc = true, inc_r = true;
    if (get_bool(e, b, "parallel_tool_calls", &ptc) < 0 ||
        get_bool(e, b, "include_reasoning", &inc_r) < 0)
        return -1;
    g->parallel_tool_calls = ptc;
    g->include_reasoning = inc_r;
    long long budget = -1;
    int hb = get_int(e, b, "thinking_token_budget", 0, INT32_MAX, &budget);
    if (hb < 0) return -1;
    json_t *th = field(b, "thinking");
    if (!hb && th && json_is_object(th)) {
        hb = get_int(e, th, "budget_tokens", 0, INT32_MAX, &budget);
        if (hb < 0) {
            char m[sizeof e->msg];
            snprintf(m, sizeof m, "\"thinking.%s", e->msg + 1);
            return fail(e, 400, e->code, "thinking.budget_tokens", "%s", m);
        }
    }
    g->budget = hb ? budget : s->def_budget;
    g->prompts = xcalloc(1, sizeof *g->prompts);
    g->n_prompts = 1;
    int n_tools = 0;
    bool thinking = true;
    if (render_chat(s, e, b, &g->prompts[0], &thinking, &n_tools, &g->effort) ||
        check_prompt(s, e, &g->prompts[0], g->min_tokens, "messages"))
        return -1;
    g->thinking = thinking;
    return 0;
}
