/* test_outparse.c — the streaming output parser: results, split independence, no leaks.
 *
 * Why: the parser sees generated text in arbitrary pieces; the same text must give the same
 * reasoning / content / tool calls however it is split, markup must never leak, and a
 * reported call must always carry valid JSON. Each case in the table is run whole, split at
 * every byte position, one byte at a time, and under seeded random splits; every run is
 * checked against the expected fields and the invariants. Must never depend on timing.
 */
#include <check.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "coordinator/chat/outparse.h"
#include "coordinator/chat/sbuf.h"

#define DSML "｜DSML｜"
#define EOS "<｜end▁of▁sentence｜>"
#define TC_OPEN "\n\n<" DSML "tool_calls>\n"
#define TC_CLOSE "</" DSML "tool_calls>"
#define INV(name) "<" DSML "invoke name=\"" name "\">\n"
#define INV_END "</" DSML "invoke>"
#define PAR(k, s, v) "<" DSML "parameter name=\"" k "\" string=\"" s "\">" v "</" DSML "parameter>\n"

/* ------------------------------------------------------------ event capture */

#define MAXC 8

typedef struct {
    chat_sb reasoning, content;
    chat_sb args[MAXC];
    char ids[MAXC][64];
    char names[MAXC][64];
    size_t n_starts, n_arg_events[MAXC];
    int order_violation; /* reasoning after content/tool, or args before start */
    int saw_content_or_tool;
    int id_counter;
} capture;

static void cap_emit(void *user, const op_event *ev) {
    capture *c = user;
    ck_assert(ev->kind == OP_EV_TOOL_START || ev->len > 0);
    switch (ev->kind) {
    case OP_EV_REASONING:
        if (c->saw_content_or_tool) c->order_violation = 1;
        chat_sb_put(&c->reasoning, ev->text, ev->len);
        break;
    case OP_EV_CONTENT:
        c->saw_content_or_tool = 1;
        chat_sb_put(&c->content, ev->text, ev->len);
        break;
    case OP_EV_TOOL_START:
        c->saw_content_or_tool = 1;
        ck_assert_uint_eq(ev->index, c->n_starts);
        ck_assert_uint_lt(ev->index, MAXC);
        snprintf(c->ids[ev->index], 64, "%s", ev->id);
        snprintf(c->names[ev->index], 64, "%s", ev->name);
        c->n_starts++;
        break;
    case OP_EV_TOOL_ARGS:
        if (ev->index >= c->n_starts) c->order_violation = 1;
        ck_assert_uint_lt(ev->index, MAXC);
        chat_sb_put(&c->args[ev->index], ev->text, ev->len);
        c->n_arg_events[ev->index]++;
        break;
    }
}

static void cap_id(void *user, char *out, size_t outlen) {
    capture *c = user;
    snprintf(out, outlen, "call_%d", c->id_counter++);
}

static void cap_free(capture *c) {
    chat_sb_free(&c->reasoning);
    chat_sb_free(&c->content);
    for (int i = 0; i < MAXC; i++) chat_sb_free(&c->args[i]);
}

/* ------------------------------------------------------------ cases */

typedef struct {
    const char *name;
    const char *text;
    bool thinking;
    op_tool_choice choice;
    bool parallel_off, ignore_eos, declared; /* declared: tool_names = {get_weather, get_time} */
    op_end end;
    /* expected */
    const char *reasoning, *content, *finish;
    size_t n_calls;
    const char *call_names[3], *call_args[3];
    size_t parse_failures, repairs;
    bool required_unmet;
    const char *stop[3]; /* stop strings (NULL-terminated list) */
    bool include_stop;
    const char *stop_reason;
} pcase;

static const char *const DECLARED[] = {"get_weather", "get_time"};

static const pcase CASES[] = {
    {.name = "spec 5.6 thinking single turn",
     .text = "Simple arithmetic.</think>2 + 2 = 4." EOS, .thinking = true,
     .reasoning = "Simple arithmetic.", .content = "2 + 2 = 4.", .finish = "stop"},
    {.name = "spec 5.6 tool round trip",
     .text = "The user wants to know the weather in Beijing. I should use the get_weather "
             "tool.</think>" TC_OPEN INV("get_weather") PAR("location", "true", "Beijing")
                 PAR("unit", "true", "celsius") INV_END "\n" TC_CLOSE EOS,
     .thinking = true, .declared = true,
     .reasoning = "The user wants to know the weather in Beijing. I should use the get_weather "
                  "tool.",
     .content = "", .finish = "tool_calls", .n_calls = 1, .call_names = {"get_weather"},
     .call_args = {"{\"location\": \"Beijing\", \"unit\": \"celsius\"}"}},
    {.name = "spec 5.6 answer after tool result",
     .text = "Got the weather data.</think>The weather in Beijing is sunny." EOS,
     .thinking = true, .reasoning = "Got the weather data.",
     .content = "The weather in Beijing is sunny.", .finish = "stop"},
    {.name = "chat mode content then two calls, non-string values",
     .text = "Let me check.\n" TC_OPEN INV("get_weather") PAR("location", "true", "Oslo")
                 PAR("days", "false", "3") PAR("opts", "false", "{\"a\": [1, 2.5, null]}")
                     PAR("flag", "false", "true") INV_END "\n" INV("get_time") "\n" INV_END
                         "\n" TC_CLOSE EOS,
     .content = "Let me check.\n", .finish = "tool_calls", .n_calls = 2,
     .call_names = {"get_weather", "get_time"},
     .call_args = {"{\"location\": \"Oslo\", \"days\": 3, \"opts\": {\"a\": [1, 2.5, null]}, "
                   "\"flag\": true}",
                   "{}"}},
    {.name = "string escaping and raw markup-like text in values",
     .text = TC_OPEN INV("f") PAR("s", "true", "a \"q\" \\ <b> </x>\n\ttab \x01 é 温")
                 INV_END "\n" TC_CLOSE EOS,
     .content = "", .finish = "tool_calls", .n_calls = 1, .call_names = {"f"},
     .call_args = {"{\"s\": \"a \\\"q\\\" \\\\ <b> </x>\\n\\ttab \\u0001 é 温\"}"}},
    {.name = "string=false not JSON is repaired into a string",
     .text = TC_OPEN INV("f") PAR("x", "false", "abc") PAR("y", "false", "") PAR("z", "false",
                 "[1,") INV_END "\n" TC_CLOSE EOS,
     .content = "", .finish = "tool_calls", .n_calls = 1, .call_names = {"f"},
     .call_args = {"{\"x\": \"abc\", \"y\": \"\", \"z\": \"[1,\"}"}, .repairs = 3},
    {.name = "duplicate key: later parameter skipped",
     .text = TC_OPEN INV("f") PAR("a", "true", "1") PAR("a", "false", "2") PAR("b", "true", "3")
                 INV_END TC_CLOSE EOS,
     .content = "", .finish = "tool_calls", .n_calls = 1, .call_names = {"f"},
     .call_args = {"{\"a\": \"1\", \"b\": \"3\"}"}},
    {.name = "truncated mid-call keeps completed calls, finish length",
     .text = TC_OPEN INV("get_time") "\n" INV_END "\n" INV("get_weather")
                 "<" DSML "parameter name=\"location\" string=\"true\">Ber",
     .declared = true, .end = OP_END_LENGTH, .content = "", .finish = "length", .n_calls = 1,
     .call_names = {"get_time"}, .call_args = {"{}"}},
    {.name = "truncated inside the only call: no calls",
     .text = "Sure." TC_OPEN INV("get_weather") PAR("location", "false", "{\"a\": 1"),
     .end = OP_END_LENGTH, .content = "Sure.", .finish = "length", .repairs = 1},
    {.name = "truncated in reasoning",
     .text = "thinking about it <", .thinking = true, .end = OP_END_LENGTH,
     .reasoning = "thinking about it <", .content = "", .finish = "length"},
    {.name = "unfinished opener at the end is dropped",
     .text = "Answer.\n\n<" DSML "tool_ca", .end = OP_END_LENGTH, .content = "Answer.",
     .finish = "length"},
    {.name = "held newlines and '<' released at EOS",
     .text = "a <b\n\n" EOS, .content = "a <b\n\n", .finish = "stop"},
    {.name = "unknown tag in block: parse failure, earlier call kept",
     .text = TC_OPEN INV("get_time") "\n" INV_END "\n<" DSML "foo>\n" INV("get_weather") INV_END
                 TC_CLOSE EOS,
     .content = "", .finish = "tool_calls", .n_calls = 1, .call_names = {"get_time"},
     .call_args = {"{}"}, .parse_failures = 1},
    {.name = "DSML marker inside a value: invoke dropped",
     .text = TC_OPEN INV("f") "<" DSML "parameter name=\"a\" string=\"true\">x<" DSML
                 "invoke name=\"g\">" EOS,
     .content = "", .finish = "stop", .parse_failures = 1},
    {.name = "bad parameter header: invoke dropped",
     .text = TC_OPEN INV("f") "<" DSML "parameter name=\"a\" string=\"maybe\">x</" DSML
                 "parameter>\n" INV_END TC_CLOSE EOS,
     .content = "", .finish = "stop", .parse_failures = 1},
    {.name = "DSML marker inside a parameter name: invoke dropped",
     .text = TC_OPEN INV("f") PAR("a" DSML "b", "true", "x") INV_END TC_CLOSE EOS,
     .content = "", .finish = "stop", .parse_failures = 1},
    {.name = "text after the block is dropped",
     .text = TC_OPEN INV("f") INV_END "\n" TC_CLOSE "trailing words" EOS,
     .content = "", .finish = "tool_calls", .n_calls = 1, .call_names = {"f"},
     .call_args = {"{}"}},
    {.name = "undeclared tool name dropped without deltas",
     .text = TC_OPEN INV("rm_rf") PAR("p", "true", "/") INV_END "\n" INV("get_time") INV_END
                 "\n" TC_CLOSE EOS,
     .declared = true, .content = "", .finish = "tool_calls", .n_calls = 1,
     .call_names = {"get_time"}, .call_args = {"{}"}},
    {.name = "tool_choice none: block consumed, no calls",
     .text = "Hi" TC_OPEN INV("get_time") INV_END TC_CLOSE EOS, .choice = OP_TOOLS_NONE,
     .content = "Hi\n\n", .finish = "stop"},
    {.name = "parallel_tool_calls false: second invoke dropped",
     .text = TC_OPEN INV("get_time") INV_END "\n" INV("get_weather") PAR("location", "true", "x")
                 INV_END "\n" TC_CLOSE EOS,
     .parallel_off = true, .content = "", .finish = "tool_calls", .n_calls = 1,
     .call_names = {"get_time"}, .call_args = {"{}"}},
    {.name = "required without a call",
     .text = "no tools today" EOS, .choice = OP_TOOLS_REQUIRED, .content = "no tools today",
     .finish = "stop", .required_unmet = true},
    {.name = "tool block opened inside reasoning",
     .text = "I will call it." TC_OPEN INV("get_time") INV_END "\n" TC_CLOSE EOS,
     .thinking = true, .reasoning = "I will call it.", .content = "", .finish = "tool_calls",
     .n_calls = 1, .call_names = {"get_time"}, .call_args = {"{}"}},
    {.name = "EOS inside a value drops the open call",
     .text = TC_OPEN INV("f") "<" DSML "parameter name=\"a\" string=\"true\">abc" EOS "more",
     .content = "", .finish = "stop"},
    {.name = "ignore_eos: EOS invisible, text continues",
     .text = "one" EOS " two" EOS " three", .ignore_eos = true, .content = "one two three",
     .finish = "stop"},
    {.name = "text after EOS ignored",
     .text = "done" EOS "ignored", .content = "done", .finish = "stop"},
    {.name = "structural spellings removed from content",
     .text = "r<think>1</think>c</think>2<｜begin▁of▁sentence｜>3" DSML "4" EOS,
     .thinking = true, .reasoning = "r1", .content = "c234", .finish = "stop"},
    {.name = "invalid UTF-8 becomes U+FFFD",
     .text = "a\xff" "b\xe6\x97" "c\xf0\x9f\x98\x80" EOS,
     .content = "a\xEF\xBF\xBD" "b\xEF\xBF\xBD" "c\xf0\x9f\x98\x80", .finish = "stop"},
    {.name = "incomplete UTF-8 at the end becomes U+FFFD",
     .text = "x\xe6\x97", .end = OP_END_LENGTH, .content = "x\xEF\xBF\xBD", .finish = "length"},
    {.name = "whitespace-tolerant structure without the official newlines",
     .text = "<" DSML "tool_calls>  <" DSML "invoke  name=\"f\" ><" DSML
             "parameter name=\"k\"  string=\"false\" > 7 </" DSML "parameter></" DSML
             "invoke></" DSML "tool_calls>" EOS,
     .content = "", .finish = "tool_calls", .n_calls = 1, .call_names = {"f"},
     .call_args = {"{\"k\":  7 }"}},
    {.name = "a removal never spells a marker across the gap",
     .text = "a</think</think>>b<<｜e<｜begin▁of▁sentence｜>nd▁of▁sentence｜>c" EOS,
     .content = "a</thinkb<<｜ec", .finish = "stop"},
    {.name = "ignored EOS inside a value is invisible",
     .text = TC_OPEN INV("f") PAR("s", "true", "x" EOS "y</think>z") INV_END TC_CLOSE "tail" EOS,
     .ignore_eos = true, .content = "", .finish = "tool_calls", .n_calls = 1,
     .call_names = {"f"}, .call_args = {"{\"s\": \"xyz\"}"}},
    {.name = "stop string ends content",
     .text = "Hello world STOP more" EOS, .stop = {"STOP"}, .content = "Hello world ",
     .finish = "stop", .stop_reason = "STOP"},
    {.name = "stop string kept with include_stop_str",
     .text = "Hello world STOP more", .stop = {"STOP"}, .include_stop = true,
     .content = "Hello world STOP", .finish = "stop", .stop_reason = "STOP"},
    {.name = "stop strings never match in reasoning or arguments",
     .text = "think STOP</think>ans" TC_OPEN INV("f") PAR("s", "true", "a STOP b") INV_END
                 TC_CLOSE EOS,
     .thinking = true, .stop = {"STOP", "ans"}, .reasoning = "think STOP", .content = "",
     .finish = "stop", .stop_reason = "ans"},
    {.name = "overlapping stop strings: earliest decided match",
     .text = "xabce abcd" EOS, .stop = {"abcd", "bc"}, .content = "xa", .finish = "stop",
     .stop_reason = "bc"},
    {.name = "stop string that starts like markup",
     .text = "a</b>c\n\nd" TC_OPEN INV("f") INV_END TC_CLOSE EOS, .stop = {"</b", "\n\n<"},
     .content = "a", .finish = "stop", .stop_reason = "</b"},
    {.name = "opener preferred to a stop string prefix of it",
     .text = "a" TC_OPEN INV("f") INV_END TC_CLOSE EOS, .stop = {"\n\n<"}, .content = "a",
     .finish = "tool_calls", .n_calls = 1, .call_names = {"f"}, .call_args = {"{}"}},
    {.name = "abort",
     .text = "partial", .end = OP_END_ABORT, .content = "partial", .finish = "abort"},
};
#define N_CASES (sizeof CASES / sizeof CASES[0])

/* ------------------------------------------------------------ running */

static bool has_markup(const char *s, size_t n) {
    return memmem(s, n, DSML, strlen(DSML)) || memmem(s, n, "</think>", 8) ||
           memmem(s, n, EOS, strlen(EOS));
}

static void check_json_object(const char *s, size_t n, const char *what) {
    json_error_t je;
    json_t *v = json_loadb(s, n, JSON_ALLOW_NUL, &je);
    ck_assert_msg(json_is_object(v), "%s: arguments are not a JSON object: %.*s (%s)", what,
                  (int)n, s, je.text);
    json_decref(v);
}

/* Runs c->text split at the given cut positions (sorted, may repeat) and checks everything. */
static void run_split(const pcase *c, const size_t *cuts, size_t ncuts, const char *how) {
    capture cap = {0};
    op_config cfg;
    op_config_init(&cfg);
    cfg.thinking = c->thinking;
    cfg.tool_choice = c->choice;
    cfg.parallel_tool_calls = !c->parallel_off;
    cfg.ignore_eos = c->ignore_eos;
    size_t n_stop = 0;
    while (n_stop < 3 && c->stop[n_stop]) n_stop++;
    cfg.stop = c->stop;
    cfg.n_stop = n_stop;
    cfg.include_stop_str = c->include_stop;
    if (c->declared) {
        cfg.tool_names = DECLARED;
        cfg.n_tool_names = 2;
    }
    cfg.emit = cap_emit;
    cfg.emit_user = &cap;
    cfg.gen_id = cap_id;
    cfg.id_user = &cap;
    op_parser *p = op_new(&cfg);
    size_t len = strlen(c->text), prev = 0;
    for (size_t i = 0; i <= ncuts; i++) {
        size_t at = i < ncuts ? cuts[i] : len;
        op_feed(p, c->text + prev, at - prev);
        prev = at;
    }
    const op_result *r = op_finish(p, c->end);
    const char *exp_reasoning = c->reasoning ? c->reasoning : "";
    ck_assert_msg(!strcmp(r->reasoning, exp_reasoning), "%s [%s]: reasoning '%s' != '%s'",
                  c->name, how, r->reasoning, exp_reasoning);
    ck_assert_msg(!strcmp(r->content, c->content), "%s [%s]: content '%s' != '%s'", c->name, how,
                  r->content, c->content);
    ck_assert_msg(!strcmp(r->finish_reason, c->finish), "%s [%s]: finish %s != %s", c->name, how,
                  r->finish_reason, c->finish);
    ck_assert_msg(r->n_calls == c->n_calls, "%s [%s]: %zu calls, want %zu", c->name, how,
                  r->n_calls, c->n_calls);
    ck_assert_uint_eq(r->parse_failures, c->parse_failures);
    ck_assert_uint_eq(r->repairs, c->repairs);
    ck_assert_int_eq(r->required_unmet, c->required_unmet);
    ck_assert_msg((!r->stop_reason && !c->stop_reason) ||
                      (r->stop_reason && c->stop_reason && !strcmp(r->stop_reason, c->stop_reason)),
                  "%s [%s]: stop_reason %s", c->name, how, r->stop_reason ? r->stop_reason : "-");
    /* streamed deltas equal the final fields */
    ck_assert_uint_eq(cap.reasoning.len, r->reasoning_len);
    ck_assert(!cap.reasoning.len || !memcmp(cap.reasoning.p, r->reasoning, r->reasoning_len));
    ck_assert_uint_eq(cap.content.len, r->content_len);
    ck_assert(!cap.content.len || !memcmp(cap.content.p, r->content, r->content_len));
    ck_assert_int_eq(cap.order_violation, 0);
    ck_assert(!has_markup(r->content, r->content_len));
    ck_assert(!has_markup(r->reasoning, r->reasoning_len));
    for (size_t k = 0; k < r->n_calls; k++) {
        const op_call *oc = &r->calls[k];
        ck_assert_msg(!strcmp(oc->name, c->call_names[k]), "%s: call %zu name %s", c->name, k,
                      oc->name);
        ck_assert_msg(!strcmp(oc->arguments, c->call_args[k]), "%s [%s]: args %s != %s",
                      c->name, how, oc->arguments, c->call_args[k]);
        check_json_object(oc->arguments, oc->arguments_len, c->name);
        ck_assert(!has_markup(oc->arguments, oc->arguments_len));
        /* the streamed call with the same id carries the same name and arguments */
        size_t s = 0;
        while (s < cap.n_starts && strcmp(cap.ids[s], oc->id)) s++;
        ck_assert_msg(s < cap.n_starts, "%s: call %s never announced", c->name, oc->id);
        ck_assert_str_eq(cap.names[s], oc->name);
        ck_assert_uint_eq(cap.args[s].len, oc->arguments_len);
        ck_assert(!memcmp(cap.args[s].p, oc->arguments, oc->arguments_len));
    }
    op_free(p);
    cap_free(&cap);
}

START_TEST(test_case_whole_and_every_split) {
    const pcase *c = &CASES[_i];
    size_t len = strlen(c->text);
    run_split(c, NULL, 0, "whole");
    for (size_t at = 0; at <= len; at++) {
        char how[32];
        snprintf(how, sizeof how, "split@%zu", at);
        run_split(c, &at, 1, how);
    }
    size_t *cuts = xmalloc((len + 1) * sizeof *cuts);
    for (size_t i = 0; i < len; i++) cuts[i] = i;
    run_split(c, cuts, len, "bytewise");
    unsigned seed = 12345u + (unsigned)_i;
    for (int iter = 0; iter < 40; iter++) {
        size_t n = 0, at = 0;
        while (at < len) {
            at += 1 + (size_t)(rand_r(&seed) % 9);
            if (at < len) cuts[n++] = at;
        }
        run_split(c, cuts, n, "random");
    }
    free(cuts);
}
END_TEST

/* ------------------------------------------------------------ streaming shape */

typedef struct {
    chat_sb args;
    size_t n_start, n_args, valid_prefixes;
} shape;

static void shape_emit(void *user, const op_event *ev) {
    shape *s = user;
    if (ev->kind == OP_EV_TOOL_START) s->n_start++;
    if (ev->kind != OP_EV_TOOL_ARGS) return;
    s->n_args++;
    chat_sb_put(&s->args, ev->text, ev->len);
    json_t *v = json_loadb(s->args.p, s->args.len, 0, NULL);
    if (v) s->valid_prefixes++;
    json_decref(v);
}

static const char SHAPE_TEXT[] = TC_OPEN INV("f") PAR("a", "true", "x y z")
    PAR("b", "false", "[1, 2]") INV_END "\n" TC_CLOSE EOS;

START_TEST(test_incremental_no_valid_proper_prefix) {
    shape s = {0};
    op_config cfg;
    op_config_init(&cfg);
    cfg.emit = shape_emit;
    cfg.emit_user = &s;
    op_parser *p = op_new(&cfg);
    for (size_t i = 0; i < sizeof SHAPE_TEXT - 1; i++) op_feed(p, SHAPE_TEXT + i, 1);
    const op_result *r = op_finish(p, OP_END_STOP);
    ck_assert_uint_eq(r->n_calls, 1);
    ck_assert_uint_eq(s.n_start, 1);
    ck_assert_uint_gt(s.n_args, 3); /* really incremental */
    ck_assert_uint_eq(s.valid_prefixes, 1); /* only the complete arguments parse */
    ck_assert_str_eq(s.args.p, "{\"a\": \"x y z\", \"b\": [1, 2]}");
    ck_assert(!strncmp(r->calls[0].id, "call_", 5));
    ck_assert_uint_eq(strlen(r->calls[0].id), 29);
    op_free(p);
    chat_sb_free(&s.args);
}
END_TEST

START_TEST(test_buffered_one_delta_per_call) {
    shape s = {0};
    op_config cfg;
    op_config_init(&cfg);
    cfg.buffered = true;
    cfg.emit = shape_emit;
    cfg.emit_user = &s;
    op_parser *p = op_new(&cfg);
    for (size_t i = 0; i < sizeof SHAPE_TEXT - 1; i++) op_feed(p, SHAPE_TEXT + i, 1);
    const op_result *r = op_finish(p, OP_END_STOP);
    ck_assert_uint_eq(r->n_calls, 1);
    ck_assert_uint_eq(s.n_start, 1);
    ck_assert_uint_eq(s.n_args, 1);
    ck_assert_str_eq(s.args.p, r->calls[0].arguments);
    op_free(p);
    chat_sb_free(&s.args);
}
END_TEST

START_TEST(test_buffered_truncated_call_never_sent) {
    shape s = {0};
    op_config cfg;
    op_config_init(&cfg);
    cfg.buffered = true;
    cfg.emit = shape_emit;
    cfg.emit_user = &s;
    op_parser *p = op_new(&cfg);
    static const char t[] = TC_OPEN INV("f") PAR("a", "true", "x");
    op_feed(p, t, sizeof t - 1);
    const op_result *r = op_finish(p, OP_END_LENGTH);
    ck_assert_uint_eq(r->n_calls, 0);
    ck_assert_uint_eq(s.n_start, 0);
    ck_assert_uint_eq(s.n_args, 0);
    ck_assert_str_eq(r->finish_reason, "length");
    ck_assert_uint_eq(r->dropped_invokes, 1);
    op_free(p);
    chat_sb_free(&s.args);
}
END_TEST

START_TEST(test_holdback_released_when_decided) {
    /* "\n\n" is held while a tool block may start, and released by the next token */
    capture cap = {0};
    op_config cfg;
    op_config_init(&cfg);
    cfg.emit = cap_emit;
    cfg.emit_user = &cap;
    op_parser *p = op_new(&cfg);
    op_feed(p, "Hello\n\n", 7);
    ck_assert_uint_eq(cap.content.len, 5);
    op_feed(p, "World", 5);
    ck_assert_uint_eq(cap.content.len, 12);
    op_feed(p, " <", 2);
    ck_assert_uint_eq(cap.content.len, 13);
    op_feed(p, "b>", 2);
    ck_assert_str_eq(cap.content.p, "Hello\n\nWorld <b>");
    ck_assert(!op_eos_seen(p));
    op_feed(p, EOS, strlen(EOS));
    ck_assert(op_eos_seen(p));
    op_finish(p, OP_END_STOP);
    /* tool_choice none: no newline holdback */
    op_free(p);
    cap_free(&cap);
    memset(&cap, 0, sizeof cap);
    cfg.tool_choice = OP_TOOLS_NONE;
    p = op_new(&cfg);
    op_feed(p, "Hi\n\n", 4);
    ck_assert_uint_eq(cap.content.len, 4);
    op_free(p);
    cap_free(&cap);
}
END_TEST

START_TEST(test_named_choice) {
    op_config cfg;
    op_config_init(&cfg);
    cfg.tool_choice = OP_TOOLS_NAMED;
    cfg.named_tool = "get_time";
    op_parser *p = op_new(&cfg);
    static const char t[] = TC_OPEN INV("get_weather") INV_END "\n" INV("get_time") INV_END "\n"
        INV("get_time") INV_END "\n" TC_CLOSE EOS;
    op_feed(p, t, sizeof t - 1);
    const op_result *r = op_finish(p, OP_END_STOP);
    ck_assert_uint_eq(r->n_calls, 1);
    ck_assert_str_eq(r->calls[0].name, "get_time");
    ck_assert_uint_eq(r->dropped_invokes, 2);
    ck_assert(!r->required_unmet);
    ck_assert_str_eq(r->finish_reason, "tool_calls");
    ck_assert_ptr_eq(op_finish(p, OP_END_LENGTH), r); /* idempotent */
    ck_assert_str_eq(r->finish_reason, "tool_calls");
    op_free(p);
}
END_TEST

static Suite *outparse_suite(void) {
    Suite *s = suite_create("chat_outparse");
    TCase *tc = tcase_create("outparse");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_case_whole_and_every_split, 0, (int)N_CASES);
    tcase_add_test(tc, test_incremental_no_valid_proper_prefix);
    tcase_add_test(tc, test_buffered_one_delta_per_call);
    tcase_add_test(tc, test_buffered_truncated_call_never_sent);
    tcase_add_test(tc, test_holdback_released_when_decided);
    tcase_add_test(tc, test_named_choice);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(outparse_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
