/* encoder.c — DeepSeek-V4 prompt encoder (see encoder.h; model spec §5.4).
 *
 * Shape: (1) validate each OpenAI message and convert it into an internal message, merging
 * tool results and consecutive user texts into user "blocks" exactly like the official
 * merge_tool_messages; (2) sort tool results into the order of the preceding assistant's
 * tool_calls ids; (3) attach request-level tools / response_format to the first system message;
 * (4) apply the drop rule; (5) render message by message with the official transitions.
 * It must never abort on user input and never reorder JSON keys.
 */
#include "coordinator/chat/encoder.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "coordinator/chat/pyjson.h"
#include "coordinator/chat/sbuf.h"

#define ENC_BOS "<｜begin▁of▁sentence｜>"
#define ENC_EOS "<｜end▁of▁sentence｜>"
#define ENC_USER "<｜User｜>"
#define ENC_ASSISTANT "<｜Assistant｜>"
#define ENC_REMINDER "<｜latest_reminder｜>"
#define ENC_THINK "<think>"
#define ENC_THINK_END "</think>"
#define ENC_DSML "｜DSML｜"

static const char ENC_P_ABS[] =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption "
    "is left unchecked.\n\n";

static const char ENC_P_BEYOND[] =
    "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: "
    "exhaustively decompose the problem into its most fundamental components, trace every "
    "causal chain to its root, and resolve the underlying cause rather than any surface "
    "symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple "
    "angles and are certain that no assumption remains unchecked and no error remains "
    "undiscovered.\n\n";

static const char ENC_TOOLS_HEAD[] =
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke "
    "tools by writing a \"<" ENC_DSML "tool_calls>\" block like the following:\n\n"
    "<" ENC_DSML "tool_calls>\n"
    "<" ENC_DSML "invoke name=\"$TOOL_NAME\">\n"
    "<" ENC_DSML "parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</"
    ENC_DSML "parameter>\n"
    "...\n"
    "</" ENC_DSML "invoke>\n"
    "<" ENC_DSML "invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</" ENC_DSML "invoke>\n"
    "</" ENC_DSML "tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other "
    "types (numbers, booleans, arrays, objects), pass the value in JSON format and set "
    "`string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by " ENC_THINK "), you MUST output your complete "
    "reasoning inside " ENC_THINK "..." ENC_THINK_END " BEFORE any tool calls or final "
    "response.\n\n"
    "Otherwise, output directly after " ENC_THINK_END " with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n";

static const char ENC_TOOLS_TAIL[] =
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
    "tool calls.\n";

static const char ENC_RFORMAT_HEAD[] =
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

static const char *const ENC_TASKS[] = {"action", "query", "authority",
                                        "domain", "title", "read_url"};
static const char *const ENC_TASK_TOKENS[] = {"<｜action｜>", "<｜query｜>",
                                              "<｜authority｜>", "<｜domain｜>",
                                              "<｜title｜>", "<｜read_url｜>"};
#define ENC_N_TASKS 6

/* ---------------------------------------------------------------- internal messages */

enum { R_SYSTEM, R_DEVELOPER, R_USER, R_ASSISTANT, R_REMINDER, R_TOOL };

typedef struct {
    int is_tool;
    char *text; /* owned, NUL-terminated */
    size_t len;
    const char *tool_id; /* borrowed; "" when absent */
} eblock;

typedef struct {
    int role;
    size_t src;  /* index in the request's messages (for error messages) */
    char *text;  /* owned content (not for users: they use blocks) */
    size_t text_len;
    char *reasoning; /* owned or NULL */
    size_t reasoning_len;
    const json_t *tool_calls; /* borrowed validated array or NULL */
    const json_t *tools;      /* borrowed array or NULL */
    const json_t *rformat;    /* borrowed schema value or NULL */
    int task;                 /* index into ENC_TASKS, -1 = none */
    eblock *blocks;
    size_t nblocks;
} emsg;

typedef struct {
    emsg *v;
    size_t n, cap;
    json_t *owned_schema; /* {"type": "object"} made for json_object; decref'd at the end */
} emlist;

void enc_request_init(enc_request *req) {
    memset(req, 0, sizeof *req);
    req->thinking = true;
    req->effort = ENC_EFFORT_LOW;
    req->flavour = ENC_FLAVOUR_0731;
    req->drop_thinking = true;
}

const char *enc_effort_prefix(enc_flavour flavour, enc_effort effort) {
    if (flavour == ENC_FLAVOUR_PREVIEW) return effort == ENC_EFFORT_MAX ? ENC_P_ABS : "";
    if (effort == ENC_EFFORT_HIGH) return ENC_P_ABS;
    if (effort == ENC_EFFORT_MAX) return ENC_P_BEYOND;
    return "";
}

int enc_effort_parse(const char *s, enc_effort *out) {
    if (s && !strcmp(s, "low")) *out = ENC_EFFORT_LOW;
    else if (s && !strcmp(s, "high")) *out = ENC_EFFORT_HIGH;
    else if (s && !strcmp(s, "max")) *out = ENC_EFFORT_MAX;
    else return DUET_EINVAL;
    return 0;
}

static emsg *emlist_push(emlist *l, int role, size_t src) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 8;
        l->v = xrealloc(l->v, l->cap * sizeof *l->v);
    }
    emsg *m = &l->v[l->n++];
    memset(m, 0, sizeof *m);
    m->role = role;
    m->src = src;
    m->task = -1;
    return m;
}

static void emsg_free(emsg *m) {
    free(m->text);
    free(m->reasoning);
    for (size_t i = 0; i < m->nblocks; i++) free(m->blocks[i].text);
    free(m->blocks);
}

static void emlist_free(emlist *l) {
    for (size_t i = 0; i < l->n; i++) emsg_free(&l->v[i]);
    free(l->v);
    json_decref(l->owned_schema);
    memset(l, 0, sizeof *l);
}

static void emsg_add_block(emsg *m, int is_tool, char *text, size_t len, const char *id) {
    m->blocks = xrealloc(m->blocks, (m->nblocks + 1) * sizeof *m->blocks);
    m->blocks[m->nblocks++] = (eblock){is_tool, text, len, id ? id : ""};
}

/* ---------------------------------------------------------------- validation helpers */

/* content: string | null | [{"type":"text","text":S}...] → owned text, parts joined by sep. */
static int get_text(const json_t *c, const char *sep, const char *path, char **out,
                    size_t *out_len, char *err, size_t errlen) {
    chat_sb b = {0};
    *out = NULL;
    if (!c || json_is_null(c)) {
        /* absent or null content renders as "" */
    } else if (json_is_string(c)) {
        chat_sb_put(&b, json_string_value(c), json_string_length(c));
    } else if (json_is_array(c)) {
        for (size_t j = 0; j < json_array_size(c); j++) {
            const json_t *part = json_array_get(c, j);
            const json_t *type = json_is_object(part) ? json_object_get(part, "type") : NULL;
            const json_t *txt = json_is_object(part) ? json_object_get(part, "text") : NULL;
            if (!json_is_string(type) || strcmp(json_string_value(type), "text") != 0) {
                chat_sb_free(&b);
                return duet_err(err, errlen, DUET_EINVAL,
                                "%s[%zu].type: only {\"type\":\"text\",\"text\":...} content "
                                "parts are supported",
                                path, j);
            }
            if (!json_is_string(txt)) {
                chat_sb_free(&b);
                return duet_err(err, errlen, DUET_EINVAL, "%s[%zu].text: expected a string",
                                path, j);
            }
            if (j) chat_sb_puts(&b, sep);
            chat_sb_put(&b, json_string_value(txt), json_string_length(txt));
        }
    } else {
        return duet_err(err, errlen, DUET_EINVAL,
                        "%s: expected a string, null or an array of text parts", path);
    }
    *out = chat_sb_take(&b, out_len);
    return 0;
}

/* tools: [{"type":"function","function":{"name":S,...}}...] */
static int check_tools(const json_t *tools, const char *path, char *err, size_t errlen) {
    if (!json_is_array(tools))
        return duet_err(err, errlen, DUET_EINVAL, "%s: expected an array of tools", path);
    for (size_t k = 0; k < json_array_size(tools); k++) {
        const json_t *t = json_array_get(tools, k);
        if (!json_is_object(t))
            return duet_err(err, errlen, DUET_EINVAL, "%s[%zu]: expected an object", path, k);
        const json_t *type = json_object_get(t, "type");
        if (type && (!json_is_string(type) || strcmp(json_string_value(type), "function")))
            return duet_err(err, errlen, DUET_EINVAL,
                            "%s[%zu].type: only \"function\" tools are supported", path, k);
        const json_t *fn = json_object_get(t, "function");
        if (!json_is_object(fn))
            return duet_err(err, errlen, DUET_EINVAL, "%s[%zu].function: expected an object",
                            path, k);
        const json_t *name = json_object_get(fn, "name");
        if (!json_is_string(name) || json_string_length(name) == 0)
            return duet_err(err, errlen, DUET_EINVAL,
                            "%s[%zu].function.name: expected a non-empty string", path, k);
    }
    return 0;
}

static int check_tool_calls(const json_t *tcs, size_t i, char *err, size_t errlen) {
    if (!json_is_array(tcs))
        return duet_err(err, errlen, DUET_EINVAL,
                        "messages[%zu].tool_calls: expected an array", i);
    for (size_t j = 0; j < json_array_size(tcs); j++) {
        const json_t *tc = json_array_get(tcs, j);
        const json_t *fn = json_is_object(tc) ? json_object_get(tc, "function") : NULL;
        if (!json_is_object(fn))
            return duet_err(err, errlen, DUET_EINVAL,
                            "messages[%zu].tool_calls[%zu].function: expected an object", i, j);
        const json_t *id = json_object_get(tc, "id");
        if (id && !json_is_string(id) && !json_is_null(id))
            return duet_err(err, errlen, DUET_EINVAL,
                            "messages[%zu].tool_calls[%zu].id: expected a string", i, j);
        const json_t *name = json_object_get(fn, "name");
        if (!json_is_string(name) || json_string_length(name) == 0)
            return duet_err(err, errlen, DUET_EINVAL,
                            "messages[%zu].tool_calls[%zu].function.name: expected a non-empty "
                            "string",
                            i, j);
        const json_t *args = json_object_get(fn, "arguments");
        if (!json_is_string(args) && !json_is_object(args))
            return duet_err(err, errlen, DUET_EINVAL,
                            "messages[%zu].tool_calls[%zu].function.arguments: expected a JSON "
                            "string holding an object",
                            i, j);
    }
    return 0;
}

static int parse_task(const json_t *t, size_t i, int *out, char *err, size_t errlen) {
    *out = -1;
    if (!t || json_is_null(t)) return 0;
    for (int k = 0; json_is_string(t) && k < ENC_N_TASKS; k++)
        if (!strcmp(json_string_value(t), ENC_TASKS[k])) {
            *out = k;
            return 0;
        }
    return duet_err(err, errlen, DUET_EINVAL,
                    "messages[%zu].task: expected one of action, query, authority, domain, "
                    "title, read_url",
                    i);
}

static int parse_role(const json_t *m, size_t i, bool dev_as_sys, int *role, char *err,
                      size_t errlen) {
    const json_t *r = json_object_get(m, "role");
    if (!json_is_string(r))
        return duet_err(err, errlen, DUET_EINVAL, "messages[%zu].role: missing or not a string",
                        i);
    const char *s = json_string_value(r);
    if (!strcmp(s, "system")) *role = R_SYSTEM;
    else if (!strcmp(s, "developer")) *role = dev_as_sys ? R_SYSTEM : R_DEVELOPER;
    else if (!strcmp(s, "user")) *role = R_USER;
    else if (!strcmp(s, "assistant")) *role = R_ASSISTANT;
    else if (!strcmp(s, "tool")) *role = R_TOOL;
    else if (!strcmp(s, "latest_reminder")) *role = R_REMINDER;
    else
        return duet_err(err, errlen, DUET_EINVAL, "messages[%zu].role: unknown role '%.40s'", i,
                        s);
    return 0;
}

/* ---------------------------------------------------------------- step 1: convert + merge */

static int convert_assistant(emsg *e, const json_t *m, size_t i, char *err, size_t errlen) {
    const json_t *rc = json_object_get(m, "reasoning_content");
    if (!rc || json_is_null(rc)) rc = json_object_get(m, "reasoning");
    if (rc && !json_is_null(rc)) {
        if (!json_is_string(rc))
            return duet_err(err, errlen, DUET_EINVAL,
                            "messages[%zu].reasoning_content: expected a string", i);
        e->reasoning = xmalloc(json_string_length(rc) + 1);
        memcpy(e->reasoning, json_string_value(rc), json_string_length(rc) + 1);
        e->reasoning_len = json_string_length(rc);
    }
    const json_t *tcs = json_object_get(m, "tool_calls");
    if (tcs && !json_is_null(tcs)) {
        int rc2 = check_tool_calls(tcs, i, err, errlen);
        if (rc2) return rc2;
        e->tool_calls = tcs;
    }
    return 0;
}

static int convert_one(emlist *l, const json_t *m, size_t i, int role, char *err,
                       size_t errlen) {
    char path[48];
    snprintf(path, sizeof path, "messages[%zu].content", i);
    char *text = NULL;
    size_t len = 0;
    int rc = get_text(json_object_get(m, "content"), role == R_TOOL ? "\n\n" : "\n", path, &text,
                      &len, err, errlen);
    if (rc) return rc;
    int task;
    if ((rc = parse_task(json_object_get(m, "task"), i, &task, err, errlen))) {
        free(text);
        return rc;
    }
    emsg *last = l->n ? &l->v[l->n - 1] : NULL;
    if (role == R_TOOL) {
        const json_t *id = json_object_get(m, "tool_call_id");
        if (id && !json_is_string(id) && !json_is_null(id)) {
            free(text);
            return duet_err(err, errlen, DUET_EINVAL,
                            "messages[%zu].tool_call_id: expected a string", i);
        }
        if (!last || last->role != R_USER) last = emlist_push(l, R_USER, i);
        emsg_add_block(last, 1, text, len, json_is_string(id) ? json_string_value(id) : "");
        return 0;
    }
    if (role == R_USER) {
        if (!last || last->role != R_USER || last->task >= 0) {
            last = emlist_push(l, R_USER, i);
            last->task = task;
        }
        emsg_add_block(last, 0, text, len, NULL);
        return 0;
    }
    emsg *e = emlist_push(l, role, i);
    e->text = text;
    e->text_len = len;
    e->task = task;
    const json_t *tools = json_object_get(m, "tools");
    if (tools && !json_is_null(tools)) {
        snprintf(path, sizeof path, "messages[%zu].tools", i);
        if ((rc = check_tools(tools, path, err, errlen))) return rc;
        e->tools = tools;
    }
    const json_t *rf = json_object_get(m, "response_format");
    if (rf && !json_is_null(rf)) e->rformat = rf;
    if (role == R_DEVELOPER && len == 0)
        return duet_err(err, errlen, DUET_EINVAL,
                        "messages[%zu].content: a developer message needs non-empty content", i);
    if (role == R_ASSISTANT) return convert_assistant(e, m, i, err, errlen);
    return 0;
}

/* A tool message must follow an assistant with tool_calls (other tool messages between). */
static int check_tool_order(const json_t *msgs, size_t i, bool dev_as_sys, char *err,
                            size_t errlen) {
    for (size_t k = i; k-- > 0;) {
        const json_t *m = json_array_get(msgs, k);
        int role;
        if (parse_role(m, k, dev_as_sys, &role, err, errlen)) return DUET_EINVAL;
        if (role == R_TOOL) continue;
        const json_t *tcs = json_object_get(m, "tool_calls");
        if (role == R_ASSISTANT && json_is_array(tcs) && json_array_size(tcs) > 0) return 0;
        break;
    }
    return duet_err(err, errlen, DUET_EINVAL,
                    "messages[%zu]: a tool message must follow an assistant message that has "
                    "tool_calls",
                    i);
}

static int convert_all(const enc_request *req, emlist *l, char *err, size_t errlen) {
    const json_t *msgs = req->messages;
    if (!json_is_array(msgs) || json_array_size(msgs) == 0)
        return duet_err(err, errlen, DUET_EINVAL, "messages: expected a non-empty array");
    for (size_t i = 0; i < json_array_size(msgs); i++) {
        const json_t *m = json_array_get(msgs, i);
        if (!json_is_object(m))
            return duet_err(err, errlen, DUET_EINVAL, "messages[%zu]: expected an object", i);
        int role, rc;
        if ((rc = parse_role(m, i, req->developer_as_system, &role, err, errlen))) return rc;
        if (role == R_TOOL &&
            (rc = check_tool_order(msgs, i, req->developer_as_system, err, errlen)))
            return rc;
        if ((rc = convert_one(l, m, i, role, err, errlen))) return rc;
    }
    return 0;
}

/* ---------------------------------------------------------------- step 2: sort tool results */

static const char *tc_id(const json_t *tc) {
    const json_t *id = json_object_get(tc, "id");
    if (json_is_string(id) && json_string_length(id)) return json_string_value(id);
    id = json_object_get(json_object_get(tc, "function"), "id");
    if (json_is_string(id) && json_string_length(id)) return json_string_value(id);
    return "";
}

/* Position of id in the order map (last assistant's tool_calls; later duplicates win), else 0
 * — the official sort key. */
static size_t order_key(const json_t *order, const char *id) {
    size_t key = 0;
    for (size_t j = 0; *id && j < json_array_size(order); j++)
        if (!strcmp(tc_id(json_array_get(order, j)), id)) key = j;
    return key;
}

static int order_nonempty(const json_t *order) {
    for (size_t j = 0; j < json_array_size(order); j++)
        if (*tc_id(json_array_get(order, j))) return 1;
    return 0;
}

static void sort_blocks(emsg *m, const json_t *order) {
    size_t ntool = 0;
    for (size_t i = 0; i < m->nblocks; i++) ntool += m->blocks[i].is_tool;
    if (ntool < 2 || !order_nonempty(order)) return;
    eblock *tools = xmalloc(ntool * sizeof *tools);
    size_t k = 0;
    for (size_t i = 0; i < m->nblocks; i++)
        if (m->blocks[i].is_tool) tools[k++] = m->blocks[i];
    for (size_t i = 1; i < ntool; i++) { /* stable insertion sort by key */
        eblock b = tools[i];
        size_t kb = order_key(order, b.tool_id), j = i;
        while (j > 0 && order_key(order, tools[j - 1].tool_id) > kb) {
            tools[j] = tools[j - 1];
            j--;
        }
        tools[j] = b;
    }
    k = 0;
    for (size_t i = 0; i < m->nblocks; i++)
        if (m->blocks[i].is_tool) m->blocks[i] = tools[k++];
    free(tools);
}

static void sort_tool_results(emlist *l) {
    const json_t *order = NULL;
    for (size_t i = 0; i < l->n; i++) {
        emsg *m = &l->v[i];
        if (m->role == R_ASSISTANT && m->tool_calls && json_array_size(m->tool_calls))
            order = m->tool_calls;
        else if (m->role == R_USER && order)
            sort_blocks(m, order);
    }
}

/* ---------------------------------------------------------------- step 3: attach tools */

static int attach_request_extras(const enc_request *req, emlist *l, char *err,
                                 size_t errlen) {
    const json_t *schema = NULL;
    const json_t *rf = req->response_format;
    if (rf && !json_is_null(rf)) {
        const json_t *type = json_is_object(rf) ? json_object_get(rf, "type") : NULL;
        const char *t = json_is_string(type) ? json_string_value(type) : "";
        if (!strcmp(t, "json_object")) {
            l->owned_schema = json_pack("{s:s}", "type", "object");
            schema = l->owned_schema;
        } else if (!strcmp(t, "json_schema")) {
            schema = json_object_get(json_object_get(rf, "json_schema"), "schema");
            if (!json_is_object(schema))
                return duet_err(err, errlen, DUET_EINVAL,
                                "response_format.json_schema.schema: expected an object");
        } else if (strcmp(t, "text") != 0) {
            return duet_err(err, errlen, DUET_EINVAL,
                            "response_format.type: expected \"text\", \"json_object\" or "
                            "\"json_schema\"");
        }
    }
    const json_t *tools = req->tools;
    if (tools && json_is_null(tools)) tools = NULL;
    if (tools) {
        int rc = check_tools(tools, "tools", err, errlen);
        if (rc) return rc;
        if (json_array_size(tools) == 0) tools = NULL;
    }
    if (!tools && !schema) return 0;
    size_t s = 0;
    while (s < l->n && l->v[s].role != R_SYSTEM) s++;
    if (s == l->n) { /* insert an empty system message at index 0 (vLLM's behaviour) */
        emlist_push(l, R_SYSTEM, 0);
        emsg tmp = l->v[l->n - 1];
        memmove(&l->v[1], &l->v[0], (l->n - 1) * sizeof *l->v);
        l->v[0] = tmp;
        l->v[0].text = chat_sb_take(&(chat_sb){0}, &l->v[0].text_len);
        s = 0;
    }
    emsg *sys = &l->v[s];
    if (tools && sys->tools)
        return duet_err(err, errlen, DUET_EINVAL,
                        "tools: given both in the request and on messages[%zu]; give them once",
                        sys->src);
    if (schema && sys->rformat)
        return duet_err(err, errlen, DUET_EINVAL,
                        "response_format: given both in the request and on messages[%zu]",
                        sys->src);
    if (tools) sys->tools = tools;
    if (schema) sys->rformat = schema;
    return 0;
}

/* ---------------------------------------------------------------- step 4: drop rule */

static long last_user_index(const emlist *l) {
    for (size_t i = l->n; i-- > 0;)
        if (l->v[i].role == R_USER || l->v[i].role == R_DEVELOPER) return (long)i;
    return -1;
}

static void apply_drop(emlist *l) {
    long last = last_user_index(l);
    size_t w = 0;
    for (size_t i = 0; i < l->n; i++) {
        emsg *m = &l->v[i];
        if ((long)i < last && m->role == R_DEVELOPER) {
            emsg_free(m);
            continue;
        }
        if ((long)i < last && m->role == R_ASSISTANT) {
            free(m->reasoning);
            m->reasoning = NULL;
            m->reasoning_len = 0;
        }
        l->v[w++] = *m;
    }
    l->n = w;
}

/* ---------------------------------------------------------------- step 5: render */

static int render_tools(chat_sb *o, const json_t *tools, char *err, size_t errlen) {
    chat_sb_puts(o, "\n\n");
    chat_sb_puts(o, ENC_TOOLS_HEAD);
    for (size_t k = 0; k < json_array_size(tools); k++) {
        if (k) chat_sb_putc(o, '\n');
        int rc = chat_pyjson_dumps(o, json_object_get(json_array_get(tools, k), "function"),
                                   err, errlen);
        if (rc) return rc;
    }
    chat_sb_puts(o, ENC_TOOLS_TAIL);
    return 0;
}

static int render_extras(chat_sb *o, const emsg *m, char *err, size_t errlen) {
    int rc = 0;
    if (m->tools && json_array_size(m->tools) && (rc = render_tools(o, m->tools, err, errlen)))
        return rc;
    if (m->rformat) {
        chat_sb_puts(o, "\n\n");
        chat_sb_puts(o, ENC_RFORMAT_HEAD);
        rc = chat_pyjson_dumps(o, m->rformat, err, errlen);
    }
    return rc;
}

static int render_param(chat_sb *o, const char *key, const json_t *v, char *err,
                        size_t errlen) {
    chat_sb_puts(o, "<" ENC_DSML "parameter name=\"");
    chat_sb_puts(o, key);
    chat_sb_printf(o, "\" string=\"%s\">", json_is_string(v) ? "true" : "false");
    if (json_is_string(v)) {
        chat_sb_put(o, json_string_value(v), json_string_length(v));
    } else {
        int rc = chat_pyjson_dumps(o, v, err, errlen);
        if (rc) return rc;
    }
    chat_sb_puts(o, "</" ENC_DSML "parameter>");
    return 0;
}

/* arguments: parsed JSON object, or the whole raw string as one parameter "arguments". */
static int render_invoke(chat_sb *o, const json_t *tc, char *err, size_t errlen) {
    const json_t *fn = json_object_get(tc, "function");
    const json_t *args = json_object_get(fn, "arguments");
    json_t *parsed = NULL;
    if (json_is_string(args)) {
        parsed = json_loadb(json_string_value(args), json_string_length(args),
                            JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
        if (!json_is_object(parsed)) {
            json_decref(parsed);
            parsed = json_pack("{sO}", "arguments", (json_t *)args);
        }
        args = parsed;
    }
    chat_sb_puts(o, "<" ENC_DSML "invoke name=\"");
    chat_sb_puts(o, json_string_value(json_object_get(fn, "name")));
    chat_sb_puts(o, "\">\n");
    const char *key;
    json_t *val;
    int first = 1, rc = 0;
    json_object_foreach((json_t *)args, key, val) {
        if (!first) chat_sb_putc(o, '\n');
        first = 0;
        if ((rc = render_param(o, key, val, err, errlen))) break;
    }
    chat_sb_puts(o, "\n</" ENC_DSML "invoke>");
    json_decref(parsed);
    return rc;
}

static int render_assistant(chat_sb *o, const emlist *l, size_t i, bool thinking, bool drop,
                            long last_user, char *err, size_t errlen) {
    const emsg *m = &l->v[i];
    bool prev_task = i > 0 && l->v[i - 1].task >= 0;
    if (thinking && !prev_task && (!drop || (long)i > last_user)) {
        if (m->reasoning) chat_sb_put(o, m->reasoning, m->reasoning_len);
        chat_sb_puts(o, ENC_THINK_END);
    }
    chat_sb_put(o, m->text, m->text_len);
    if (m->tool_calls && json_array_size(m->tool_calls)) {
        chat_sb_puts(o, "\n\n<" ENC_DSML "tool_calls>\n");
        for (size_t j = 0; j < json_array_size(m->tool_calls); j++) {
            if (j) chat_sb_putc(o, '\n');
            int rc = render_invoke(o, json_array_get(m->tool_calls, j), err, errlen);
            if (rc) return rc;
        }
        chat_sb_puts(o, "\n</" ENC_DSML "tool_calls>");
    }
    chat_sb_puts(o, ENC_EOS);
    return 0;
}

static void render_user(chat_sb *o, const emsg *m) {
    chat_sb_puts(o, ENC_USER);
    for (size_t b = 0; b < m->nblocks; b++) {
        if (b) chat_sb_puts(o, "\n\n");
        if (m->blocks[b].is_tool) chat_sb_puts(o, "<tool_result>");
        chat_sb_put(o, m->blocks[b].text, m->blocks[b].len);
        if (m->blocks[b].is_tool) chat_sb_puts(o, "</tool_result>");
    }
}

static void render_transition(chat_sb *o, const emlist *l, size_t i, bool thinking, bool drop,
                              long last_user) {
    const emsg *m = &l->v[i];
    if (i + 1 < l->n && l->v[i + 1].role != R_ASSISTANT && l->v[i + 1].role != R_REMINDER)
        return;
    if (m->task >= 0) {
        if (strcmp(ENC_TASKS[m->task], "action") != 0) {
            chat_sb_puts(o, ENC_TASK_TOKENS[m->task]);
        } else {
            chat_sb_puts(o, ENC_ASSISTANT);
            chat_sb_puts(o, thinking ? ENC_THINK : ENC_THINK_END);
            chat_sb_puts(o, ENC_TASK_TOKENS[m->task]);
        }
    } else if (m->role == R_USER || m->role == R_DEVELOPER) {
        chat_sb_puts(o, ENC_ASSISTANT);
        bool think = thinking && (!drop || (long)i >= last_user);
        chat_sb_puts(o, think ? ENC_THINK : ENC_THINK_END);
    }
}

static int render_all(chat_sb *o, const enc_request *req, const emlist *l, bool drop,
                      char *err, size_t errlen) {
    long last_user = last_user_index(l);
    chat_sb_puts(o, ENC_BOS);
    if (req->thinking) chat_sb_puts(o, enc_effort_prefix(req->flavour, req->effort));
    for (size_t i = 0; i < l->n; i++) {
        const emsg *m = &l->v[i];
        int rc = 0;
        switch (m->role) {
        case R_SYSTEM:
            chat_sb_put(o, m->text, m->text_len);
            rc = render_extras(o, m, err, errlen);
            break;
        case R_DEVELOPER:
            chat_sb_puts(o, ENC_USER);
            chat_sb_put(o, m->text, m->text_len);
            rc = render_extras(o, m, err, errlen);
            break;
        case R_USER: render_user(o, m); break;
        case R_REMINDER:
            chat_sb_puts(o, ENC_REMINDER);
            chat_sb_put(o, m->text, m->text_len);
            break;
        case R_ASSISTANT:
            rc = render_assistant(o, l, i, req->thinking, drop, last_user, err, errlen);
            break;
        }
        if (rc) return rc;
        render_transition(o, l, i, req->thinking, drop, last_user);
    }
    return 0;
}

int enc_render(const enc_request *req, char **out_text, size_t *out_len, char *err,
               size_t errlen) {
    *out_text = NULL;
    if (out_len) *out_len = 0;
    emlist l = {0};
    int rc = convert_all(req, &l, err, errlen);
    if (!rc) rc = attach_request_extras(req, &l, err, errlen);
    if (rc) {
        emlist_free(&l);
        return rc;
    }
    sort_tool_results(&l);
    bool drop = req->drop_thinking;
    for (size_t i = 0; i < l.n; i++)
        if (l.v[i].tools && json_array_size(l.v[i].tools)) drop = false;
    if (req->thinking && drop) apply_drop(&l);
    chat_sb o = {0};
    rc = render_all(&o, req, &l, drop, err, errlen);
    emlist_free(&l);
    if (rc) {
        chat_sb_free(&o);
        return rc;
    }
    *out_text = chat_sb_take(&o, out_len);
    return 0;
}
