/* test_encoder.c — the DeepSeek-V4 prompt encoder against the official encoder's output.
 *
 * Why: a prompt that differs by one byte from encoding_dsv4.py changes the model's input. The
 * expectations come from the official fixtures (data/official) and from a table of cases whose
 * expected text was produced by running the official encoder (data/enc_cases.json, see
 * data/README.md). This test must never rewrite those files. argv[1] = the data directory.
 */
#include <check.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "coordinator/chat/encoder.h"
#include "coordinator/chat/outparse.h"
#include "coordinator/chat/pyjson.h"

static const char *g_data_dir;
static json_t *g_cases; /* array of {name, request, expected} */

static json_t *load_json(const char *path) {
    json_error_t je;
    json_t *j = json_load_file(path, JSON_DECODE_ANY, &je);
    if (!j) fprintf(stderr, "cannot load %s: %s (line %d)\n", path, je.text, je.line);
    return j;
}

static char *load_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = xmalloc((size_t)n + 1);
    size_t got = fread(s, 1, (size_t)n, f);
    s[got] = '\0';
    fclose(f);
    return s;
}

/* Renders and compares; on mismatch prints the first differing offset with context. */
static void expect_render(const enc_request *req, const char *want, const char *what) {
    char *out = NULL, err[512] = "";
    size_t len = 0;
    int rc = enc_render(req, &out, &len, err, sizeof err);
    ck_assert_msg(rc == 0, "%s: enc_render failed: %s", what, err);
    ck_assert_uint_eq(strlen(out), len);
    if (strcmp(out, want) != 0) {
        size_t i = 0;
        while (out[i] && out[i] == want[i]) i++;
        size_t from = i > 60 ? i - 60 : 0;
        ck_abort_msg("%s: prompt differs at byte %zu\n got: ...%.120s\nwant: ...%.120s", what, i,
                     out + from, want + from);
    }
    free(out);
}

static int render_err(const enc_request *req, char *err, size_t errlen) {
    char *out = NULL;
    size_t len;
    int rc = enc_render(req, &out, &len, err, errlen);
    free(out);
    return rc;
}

/* ------------------------------------------------------------ table from the official encoder */

static void request_from_json(const json_t *r, enc_request *req) {
    enc_request_init(req);
    req->messages = json_object_get(r, "messages");
    req->tools = json_object_get(r, "tools");
    req->response_format = json_object_get(r, "response_format");
    const json_t *v;
    if ((v = json_object_get(r, "thinking"))) req->thinking = json_is_true(v);
    if ((v = json_object_get(r, "drop_thinking"))) req->drop_thinking = json_is_true(v);
    if ((v = json_object_get(r, "effort")))
        ck_assert_int_eq(enc_effort_parse(json_string_value(v), &req->effort), 0);
    if ((v = json_object_get(r, "flavour")))
        req->flavour = strcmp(json_string_value(v), "preview") ? ENC_FLAVOUR_0731
                                                               : ENC_FLAVOUR_PREVIEW;
}

START_TEST(test_case_table) {
    const json_t *c = json_array_get(g_cases, (size_t)_i);
    ck_assert_ptr_nonnull(c);
    enc_request req;
    request_from_json(json_object_get(c, "request"), &req);
    expect_render(&req, json_string_value(json_object_get(c, "expected")),
                  json_string_value(json_object_get(c, "name")));
}
END_TEST

/* ------------------------------------------------------------ official fixtures */

START_TEST(test_official_fixture) {
    int n = _i + 1;
    char path[1024];
    snprintf(path, sizeof path, "%s/official/test_input_%d.json", g_data_dir, n);
    json_t *in = load_json(path);
    ck_assert_msg(in != NULL, "missing fixture %s", path);
    snprintf(path, sizeof path, "%s/official/test_output_%d.txt", g_data_dir, n);
    char *want = load_text(path);
    ck_assert_msg(want != NULL, "missing fixture %s", path);
    enc_request req;
    enc_request_init(&req);
    req.flavour = ENC_FLAVOUR_PREVIEW;
    req.thinking = n != 4; /* the official test runs fixture 4 in chat mode */
    req.messages = json_is_array(in) ? in : json_object_get(in, "messages");
    req.tools = json_is_array(in) ? NULL : json_object_get(in, "tools");
    expect_render(&req, want, path);
    free(want);
    json_decref(in);
}
END_TEST

/* ------------------------------------------------------------ model spec §5.6 worked examples */

START_TEST(test_worked_examples) {
    json_t *m = json_loads("[{\"role\":\"system\",\"content\":\"You are a helpful assistant.\"},"
                           "{\"role\":\"user\",\"content\":\"What is 2+2?\"}]",
                           0, NULL);
    enc_request req;
    enc_request_init(&req);
    req.messages = m;
    expect_render(&req,
                  "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is "
                  "2+2?<｜Assistant｜><think>",
                  "thinking single turn");
    json_decref(m);
    m = json_loads("[{\"role\":\"user\",\"content\":\"Hello\"}]", 0, NULL);
    req.messages = m;
    req.thinking = false;
    expect_render(&req, "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>", "chat mode");
    json_decref(m);
}
END_TEST

/* ------------------------------------------------------------ effort prefixes */

START_TEST(test_effort_prefixes) {
    ck_assert_str_eq(enc_effort_prefix(ENC_FLAVOUR_PREVIEW, ENC_EFFORT_LOW), "");
    ck_assert_str_eq(enc_effort_prefix(ENC_FLAVOUR_PREVIEW, ENC_EFFORT_HIGH), "");
    ck_assert(!strncmp(enc_effort_prefix(ENC_FLAVOUR_PREVIEW, ENC_EFFORT_MAX),
                       "Reasoning Effort: Absolute maximum", 34));
    ck_assert_str_eq(enc_effort_prefix(ENC_FLAVOUR_0731, ENC_EFFORT_LOW), "");
    ck_assert_str_eq(enc_effort_prefix(ENC_FLAVOUR_0731, ENC_EFFORT_HIGH),
                     enc_effort_prefix(ENC_FLAVOUR_PREVIEW, ENC_EFFORT_MAX));
    ck_assert(!strncmp(enc_effort_prefix(ENC_FLAVOUR_0731, ENC_EFFORT_MAX),
                       "Reasoning Effort: Beyond maximum — exhaustive", 46));
    enc_effort e;
    ck_assert_int_eq(enc_effort_parse("medium", &e), DUET_EINVAL);
    ck_assert_int_eq(enc_effort_parse(NULL, &e), DUET_EINVAL);
}
END_TEST

/* ------------------------------------------------------------ developer_as_system */

START_TEST(test_developer_as_system) {
    json_t *m = json_loads("[{\"role\":\"developer\",\"content\":\"Be brief.\"},"
                           "{\"role\":\"user\",\"content\":\"Hi\"}]",
                           0, NULL);
    enc_request req;
    enc_request_init(&req);
    req.messages = m;
    req.developer_as_system = true;
    expect_render(&req, "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜><think>",
                  "developer as system");
    json_decref(m);
}
END_TEST

/* ------------------------------------------------------------ validation errors */

static void expect_error(const char *messages, const char *tools, const char *rf,
                         const char *needle) {
    json_t *m = json_loads(messages, 0, NULL);
    json_t *t = tools ? json_loads(tools, 0, NULL) : NULL;
    json_t *r = rf ? json_loads(rf, 0, NULL) : NULL;
    ck_assert_msg(m != NULL, "bad test JSON %s", messages);
    enc_request req;
    enc_request_init(&req);
    req.messages = m;
    req.tools = t;
    req.response_format = r;
    char err[512] = "";
    int rc = render_err(&req, err, sizeof err);
    ck_assert_int_eq(rc, DUET_EINVAL);
    ck_assert_msg(strstr(err, needle) != NULL, "error '%s' lacks '%s'", err, needle);
    json_decref(m);
    json_decref(t);
    json_decref(r);
}

START_TEST(test_validation_errors) {
    expect_error("[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"bot\",\"content\":\"x\"}]",
                 NULL, NULL, "messages[1].role: unknown role 'bot'");
    expect_error("[{\"content\":\"x\"}]", NULL, NULL, "messages[0].role: missing");
    expect_error("[]", NULL, NULL, "messages: expected a non-empty array");
    expect_error("[{\"role\":\"user\",\"content\":5}]", NULL, NULL,
                 "messages[0].content: expected a string");
    expect_error("[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]", NULL, NULL,
                 "messages[0].content[0].type");
    expect_error("[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"tool\",\"tool_call_id\":\"c\","
                 "\"content\":\"r\"}]",
                 NULL, NULL, "messages[1]: a tool message must follow an assistant");
    expect_error("[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"tool_calls\":"
                 "[{\"function\":{\"name\":\"f\",\"arguments\":5}}]}]",
                 NULL, NULL, "messages[1].tool_calls[0].function.arguments");
    expect_error("[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"tool_calls\":"
                 "[{\"function\":{\"arguments\":\"{}\"}}]}]",
                 NULL, NULL, "messages[1].tool_calls[0].function.name");
    expect_error("[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b\","
                 "\"reasoning_content\":7}]",
                 NULL, NULL, "messages[1].reasoning_content");
    expect_error("[{\"role\":\"user\",\"content\":\"a\",\"task\":\"nap\"}]", NULL, NULL,
                 "messages[0].task");
    expect_error("[{\"role\":\"developer\",\"content\":\"\"}]", NULL, NULL,
                 "messages[0].content: a developer message needs non-empty content");
    expect_error("[{\"role\":\"user\",\"content\":\"a\"}]", "[{\"type\":\"retrieval\"}]", NULL,
                 "tools[0].type");
    expect_error("[{\"role\":\"user\",\"content\":\"a\"}]", "[{\"type\":\"function\","
                 "\"function\":{\"description\":\"x\"}}]", NULL, "tools[0].function.name");
    expect_error("[{\"role\":\"user\",\"content\":\"a\"}]", "{}", NULL, "tools: expected an array");
    expect_error("[{\"role\":\"user\",\"content\":\"a\"}]", NULL, "{\"type\":\"yaml\"}",
                 "response_format.type");
    expect_error("[{\"role\":\"user\",\"content\":\"a\"}]", NULL, "{\"type\":\"json_schema\"}",
                 "response_format.json_schema.schema");
    expect_error("[\"hello\"]", NULL, NULL, "messages[0]: expected an object");
}
END_TEST

/* ------------------------------------------------------------ Python json.dumps compatibility */

static void expect_dumps(const char *json, const char *want) {
    json_t *v = json_loads(json, JSON_DECODE_ANY, NULL);
    ck_assert_msg(v != NULL, "bad JSON %s", json);
    chat_sb sb = {0};
    ck_assert_int_eq(chat_pyjson_dumps(&sb, v, NULL, 0), 0);
    ck_assert_str_eq(sb.p, want);
    chat_sb_free(&sb);
    json_decref(v);
}

START_TEST(test_pyjson) {
    /* expected strings are Python 3 json.dumps(json.loads(x), ensure_ascii=False) */
    expect_dumps("{\"b\":1,\"a\":[true,false,null]}", "{\"b\": 1, \"a\": [true, false, null]}");
    expect_dumps("[1.0, 100.0, 1e16, 1.5e16, 0.0001, 0.00001, 1e-7, -0.0, 0.1, 1e22, 123.456]",
                 "[1.0, 100.0, 1e+16, 1.5e+16, 0.0001, 1e-05, 1e-07, -0.0, 0.1, 1e+22, 123.456]");
    expect_dumps("[9999999999999998.0, 3.141592653589793, 1e308, 5e-324, 2.5e-5]",
                 "[9999999999999998.0, 3.141592653589793, 1e+308, 5e-324, 2.5e-05]");
    expect_dumps("[-9223372036854775808, 0, -0]", "[-9223372036854775808, 0, 0]");
    expect_dumps("\"q\\\" b\\\\ \\n\\r\\t\\b\\f \\u0001\\u001f\\u007f é 温 😀\"",
                 "\"q\\\" b\\\\ \\n\\r\\t\\b\\f \\u0001\\u001f\x7f é 温 😀\"");
    expect_dumps("{}", "{}");
    expect_dumps("[[], {}, [{}]]", "[[], {}, [{}]]");
    expect_dumps("\"a/b\"", "\"a/b\"");
}
END_TEST

/* Python's repr for 710 doubles (random bit patterns and the fixed/exponent switch points),
 * expected strings produced by data/gen_floats.py. */
START_TEST(test_pyjson_floats) {
    char path[1024];
    snprintf(path, sizeof path, "%s/floats.json", g_data_dir);
    json_t *cases = load_json(path);
    ck_assert_msg(json_array_size(cases) > 700, "missing or short %s", path);
    for (size_t i = 0; i < json_array_size(cases); i++) {
        const json_t *c = json_array_get(cases, i);
        json_t *v = json_loads(json_string_value(json_object_get(c, "in")), JSON_DECODE_ANY,
                               NULL);
        ck_assert_msg(json_is_real(v), "case %zu is not a real", i);
        chat_sb sb = {0};
        chat_pyjson_real(&sb, json_real_value(v));
        ck_assert_str_eq(sb.p, json_string_value(json_object_get(c, "want")));
        chat_sb_free(&sb);
        json_decref(v);
    }
    json_decref(cases);
}
END_TEST

/* Model spec §5.6 round trip: the parser's view of the model's tool-call turn, sent back as an
 * OpenAI assistant message with the tool result, renders the official fixture 1 prompt. */
START_TEST(test_tool_round_trip_through_parser) {
    char path[1024];
    snprintf(path, sizeof path, "%s/official/test_input_1.json", g_data_dir);
    json_t *in = load_json(path);
    snprintf(path, sizeof path, "%s/official/test_output_1.txt", g_data_dir);
    char *gold = load_text(path);
    ck_assert(in && gold);
    /* the model's first turn, as generated after the prompt's "<think>" */
    const char *start = strstr(gold, "<｜Assistant｜><think>") + strlen("<｜Assistant｜><think>");
    const char *end = strstr(start, "<｜User｜>");
    op_config cfg;
    op_config_init(&cfg);
    cfg.thinking = true;
    op_parser *p = op_new(&cfg);
    op_feed(p, start, (size_t)(end - start));
    const op_result *r = op_finish(p, OP_END_STOP);
    ck_assert_str_eq(r->finish_reason, "tool_calls");
    ck_assert_uint_eq(r->n_calls, 1);
    ck_assert_str_eq(r->content, "");
    ck_assert_str_eq(r->calls[0].arguments, "{\"location\": \"Beijing\", \"unit\": \"celsius\"}");
    json_t *msgs = json_array();
    json_array_append(msgs, json_array_get(json_object_get(in, "messages"), 0));
    json_array_append(msgs, json_array_get(json_object_get(in, "messages"), 1));
    json_array_append_new(msgs, json_pack("{s:s, s:s, s:[{s:s, s:s, s:{s:s, s:s}}]}", "role",
                                          "assistant", "reasoning_content", r->reasoning,
                                          "tool_calls", "id", r->calls[0].id, "type", "function",
                                          "function", "name", r->calls[0].name, "arguments",
                                          r->calls[0].arguments));
    json_array_append_new(msgs, json_pack("{s:s, s:s, s:s}", "role", "tool", "tool_call_id",
                                          r->calls[0].id, "content",
                                          "{\"temperature\": 22, \"condition\": \"sunny\", "
                                          "\"humidity\": 45}"));
    enc_request req;
    enc_request_init(&req);
    req.flavour = ENC_FLAVOUR_PREVIEW;
    req.messages = msgs;
    req.tools = json_object_get(in, "tools");
    /* expected: the fixture up to and including the transition after the tool result */
    const char *tail = strstr(gold, "</tool_result><｜Assistant｜><think>");
    ck_assert_ptr_nonnull(tail);
    size_t n = (size_t)(tail - gold) + strlen("</tool_result><｜Assistant｜><think>");
    char *want = strndup(gold, n);
    expect_render(&req, want, "round trip");
    free(want);
    op_free(p);
    json_decref(msgs);
    json_decref(in);
    free(gold);
}
END_TEST

static Suite *encoder_suite(void) {
    Suite *s = suite_create("chat_encoder");
    TCase *tc = tcase_create("encoder");
    tcase_add_loop_test(tc, test_case_table, 0, (int)json_array_size(g_cases));
    tcase_add_loop_test(tc, test_official_fixture, 0, 4);
    tcase_add_test(tc, test_worked_examples);
    tcase_add_test(tc, test_effort_prefixes);
    tcase_add_test(tc, test_developer_as_system);
    tcase_add_test(tc, test_validation_errors);
    tcase_add_test(tc, test_pyjson);
    tcase_add_test(tc, test_pyjson_floats);
    tcase_add_test(tc, test_tool_round_trip_through_parser);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s DATA_DIR (tests/chat/data)\n", argv[0]);
        return 1;
    }
    g_data_dir = argv[1];
    char path[1024];
    snprintf(path, sizeof path, "%s/enc_cases.json", g_data_dir);
    g_cases = load_json(path);
    if (!json_is_array(g_cases) || json_array_size(g_cases) == 0) {
        fprintf(stderr, "FAIL: %s must hold a non-empty array of cases\n", path);
        return 1;
    }
    SRunner *sr = srunner_create(encoder_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    json_decref(g_cases);
    return failed ? 1 : 0;
}
