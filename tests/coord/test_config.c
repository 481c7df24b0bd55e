/* test_config.c — the coordinator's config file parser and reload diff (coordinator/config.c):
 * defaults, a good file, unknown keys, wrong types, ranges, flags over the file, and which keys
 * a reload applies or reports as restart-only. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coordinator/config.h"

static char g_path[64];

static const char *write_file(const char *text) {
    snprintf(g_path, sizeof g_path, "/tmp/duet-test-config-%d.json", (int)getpid());
    FILE *f = fopen(g_path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
    return g_path;
}

/* Loads text; returns 0 or -1 with err. */
static int load(const char *text, duet_config *c, char *err, size_t n) {
    int rc = ccfg_load(c, write_file(text), NULL, err, n);
    unlink(g_path);
    return rc;
}

START_TEST(defaults_are_the_spec_defaults) {
    duet_config c;
    char err[512];
    ck_assert_int_eq(ccfg_load(&c, NULL, NULL, err, sizeof err), 0);
    ck_assert(c.max_waiting == 256 && c.max_n == 8 && c.sse_keepalive_s == 15);
    ck_assert(c.default_max_tokens_chat == 16384 && c.default_max_tokens_cmpl == 16);
    ck_assert(c.default_temperature == 1.0 && c.default_top_p == 1.0 && c.default_min_p == 0);
    ck_assert(c.default_thinking == 1 && c.default_thinking_budget == -1);
    ck_assert_int_eq(c.reasoning_field, CFG_REASONING_CONTENT);
    ck_assert_int_eq(c.tool_stream, CFG_TOOL_STREAM_INCREMENTAL);
    ck_assert_uint_eq(c.model_aliases.n, 1);
    ck_assert_str_eq(c.model_aliases.v[0], "deepseek-v4-flash");
    ck_assert(c.stall_timeout_s == 30 && c.step_timeout_s == 120 && c.drain_grace_s == 30);
    ck_assert(c.worker_recover_timeout_s == 30 && c.health_generate_timeout_s == 20);
    ck_assert(!c.strict_request_fields && !c.accept_any_model && !c.cors_origins.n);
    ccfg_free(&c);
}
END_TEST

START_TEST(good_file) {
    duet_config c;
    char err[512];
    int rc = load("{\"listen\": \"127.0.0.1:8000\", \"workers\": [\"10.0.0.2:7100\", "
                  "\"10.0.0.3:7100\"], \"api_keys\": [\"sk-a\", \"sk-b\"], \"max_waiting\": 3,"
                  " \"max_model_len\": 8192.0, \"default_max_tokens\": {\"chat\": 100, "
                  "\"completions\": 7}, \"max_n\": 4, \"default_temperature\": 0.6, "
                  "\"default_thinking\": false, \"default_thinking_budget\": 64, "
                  "\"reasoning_field\": \"both\", \"tool_stream\": \"buffered\", "
                  "\"model_aliases\": [], \"accept_any_model\": true, "
                  "\"strict_request_fields\": true, \"sse_keepalive_s\": 0.5, "
                  "\"cors_origins\": [\"*\"], \"block_size\": 384, \"drain_grace_s\": null}",
                  &c, err, sizeof err);
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert_str_eq(c.listen, "127.0.0.1:8000");
    ck_assert_uint_eq(c.workers.n, 2);
    ck_assert_str_eq(c.workers.v[1], "10.0.0.3:7100");
    ck_assert_uint_eq(c.api_keys.n, 2);
    ck_assert(c.max_waiting == 3 && c.max_model_len == 8192 && c.max_n == 4);
    ck_assert(c.default_max_tokens_chat == 100 && c.default_max_tokens_cmpl == 7);
    ck_assert(c.default_temperature == 0.6 && !c.default_thinking);
    ck_assert(c.default_thinking_budget == 64);
    ck_assert_int_eq(c.reasoning_field, CFG_REASONING_BOTH);
    ck_assert_int_eq(c.tool_stream, CFG_TOOL_STREAM_BUFFERED);
    ck_assert_uint_eq(c.model_aliases.n, 0);
    ck_assert(c.accept_any_model && c.strict_request_fields && c.sse_keepalive_s == 0.5);
    ck_assert(c.block_size == 384 && c.cors_origins.n == 1);
    ccfg_free(&c);
}
END_TEST

START_TEST(unknown_key_is_named) {
    duet_config c;
    char err[512];
    ck_assert_int_eq(load("{\"max_waiting\": 3, \"max_wating\": 4}", &c, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "unknown key \"max_wating\""));
    ck_assert_ptr_nonnull(strstr(err, "config file /tmp/duet-test-config-"));
    ccfg_free(&c); /* empty after a failure: freeing is fine */
}
END_TEST

START_TEST(wrong_types_are_named) {
    static const struct {
        const char *text, *needle;
    } cases[] = {
        {"{\"max_waiting\": \"10\"}", "key \"max_waiting\" must be an integer"},
        {"{\"max_waiting\": 1.5}", "key \"max_waiting\" must be an integer"},
        {"{\"strict_request_fields\": 1}", "key \"strict_request_fields\" must be true or false"},
        {"{\"listen\": 8000}", "key \"listen\" must be a non-empty string"},
        {"{\"api_keys\": \"sk\"}", "key \"api_keys\" must be an array of strings"},
        {"{\"api_keys\": [\"sk\", 3]}", "key \"api_keys\" must be an array of non-empty strings"},
        {"{\"reasoning_field\": \"thoughts\"}", "key \"reasoning_field\" must be one of"},
        {"{\"tool_stream\": true}", "key \"tool_stream\" must be one of"},
        {"{\"default_max_tokens\": {\"chat\": 0}}", "key \"default_max_tokens\""},
        {"{\"default_max_tokens\": {\"embeddings\": 5}}", "key \"default_max_tokens\""},
        {"{\"sse_keepalive_s\": \"15\"}", "key \"sse_keepalive_s\" must be a number"},
        {"[1, 2]", "must hold one JSON object"},
        {"{\"max_waiting\": 3,}", "config file"},
        {"{\"max_waiting\": 3, \"max_waiting\": 4}", "duplicate"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        duet_config c;
        char err[512] = "";
        ck_assert_int_eq(load(cases[i].text, &c, err, sizeof err), -1);
        ck_assert_msg(strstr(err, cases[i].needle), "%s: got \"%s\"", cases[i].text, err);
    }
}
END_TEST

START_TEST(ranges) {
    static const char *const bad[] = {
        "{\"max_n\": 0}", "{\"max_n\": 65}", "{\"default_temperature\": 2.5}",
        "{\"default_top_p\": 0}", "{\"default_min_p\": -0.1}", "{\"block_size\": 200}",
        "{\"block_size\": 64}", "{\"max_body_bytes\": 10}", "{\"sse_keepalive_s\": -1}",
        "{\"default_thinking_budget\": -1}", "{\"max_num_seqs\": 0}",
        "{\"stall_timeout_s\": 0}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        duet_config c;
        char err[512] = "";
        ck_assert_msg(load(bad[i], &c, err, sizeof err) == -1, "%s accepted", bad[i]);
        char key[64];
        sscanf(bad[i], "{\"%63[^\"]", key);
        char want[80];
        snprintf(want, sizeof want, "\"%s\"", key);
        ck_assert_msg(strstr(err, want), "%s: the error names the key: %s", bad[i], err);
    }
    duet_config c;
    char err[512];
    ck_assert_int_eq(load("{\"sse_keepalive_s\": 0, \"max_waiting\": 0, \"default_temperature\""
                          ": 0, \"default_thinking_budget\": 0}", &c, err, sizeof err), 0);
    ck_assert(c.sse_keepalive_s == 0 && c.max_waiting == 0 && c.default_thinking_budget == 0);
    ccfg_free(&c);
}
END_TEST

START_TEST(flags_win_over_the_file) {
    duet_config c;
    char err[512];
    json_t *flags = json_pack("{s:i, s:s}", "max_waiting", 9, "workers", "a:1,b:2");
    int rc = ccfg_load(&c, write_file("{\"max_waiting\": 3, \"max_n\": 2}"), flags, err,
                       sizeof err);
    unlink(g_path);
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert(c.max_waiting == 9 && c.max_n == 2);
    ck_assert_uint_eq(c.workers.n, 2);
    ck_assert_str_eq(c.workers.v[0], "a:1");
    ccfg_free(&c);
    json_decref(flags);
    ck_assert_int_eq(ccfg_load(&c, "/nonexistent/duet.json", NULL, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "/nonexistent/duet.json"));
}
END_TEST

static int has(json_t *a, const char *k) {
    size_t i;
    json_t *v;
    json_array_foreach(a, i, v) if (!strcmp(json_string_value(v), k)) return 1;
    return 0;
}

START_TEST(reload_diff) {
    duet_config old, neu;
    char err[512];
    ck_assert_int_eq(load("{\"max_waiting\": 3, \"listen\": \"127.0.0.1:1\", \"block_size\": "
                          "256, \"api_keys\": [\"a\"]}", &old, err, sizeof err), 0);
    ck_assert_int_eq(load("{\"max_waiting\": 5, \"listen\": \"127.0.0.1:2\", \"block_size\": "
                          "512, \"api_keys\": [\"b\"], \"default_max_tokens\": 9}",
                          &neu, err, sizeof err), 0);
    json_t *applied = json_array(), *restart = json_array();
    ccfg_diff(&old, &neu, applied, restart);
    ck_assert(has(applied, "max_waiting") && has(applied, "api_keys") &&
              has(applied, "default_max_tokens"));
    ck_assert_uint_eq(json_array_size(applied), 3);
    ck_assert(has(restart, "listen") && has(restart, "block_size"));
    ck_assert_uint_eq(json_array_size(restart), 2);
    /* restart-only keys keep running with the old value */
    ck_assert_str_eq(neu.listen, "127.0.0.1:1");
    ck_assert(neu.block_size == 256 && neu.max_waiting == 5);
    json_decref(applied);
    json_decref(restart);
    ccfg_free(&old);
    ccfg_free(&neu);
}
END_TEST

static const char *g_example; /* deploy/duet.json.example (argv[1]) */

START_TEST(shipped_example_parses) {
    if (!g_example) return;
    duet_config c;
    char err[512];
    ck_assert_msg(ccfg_load(&c, g_example, NULL, err, sizeof err) == 0, "%s", err);
    ck_assert(c.default_thinking_budget == -1 && c.max_num_seqs == 16);
    ccfg_free(&c);
}
END_TEST

int main(int argc, char **argv) {
    g_example = argc > 1 ? argv[1] : NULL;
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("config");
    tcase_add_test(tc, defaults_are_the_spec_defaults);
    tcase_add_test(tc, good_file);
    tcase_add_test(tc, unknown_key_is_named);
    tcase_add_test(tc, wrong_types_are_named);
    tcase_add_test(tc, ranges);
    tcase_add_test(tc, flags_win_over_the_file);
    tcase_add_test(tc, reload_diff);
    tcase_add_test(tc, shipped_example_parses);
    suite_add_tcase(s, tc);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}
