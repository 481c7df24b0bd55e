/* test_metrics.c — the Prometheus registry (coordinator/metrics.c): exposition text, label
 * handling, histogram buckets, vLLM mirrors and unknown names. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/metrics.h"

static char *render(metrics *m) {
    size_t n;
    char *s = metrics_render(m, &n);
    ck_assert_uint_eq(strlen(s), n);
    return s;
}

START_TEST(counters_exist_at_zero_and_count) {
    metrics *m = metrics_new("tiny \"x\"", 0);
    char *s = render(m);
    ck_assert_ptr_nonnull(strstr(s, "# TYPE duet:prompt_tokens_total counter\n"));
    ck_assert_ptr_nonnull(strstr(s, "duet:prompt_tokens_total{model_name=\"tiny \\\"x\\\"\"} 0\n"));
    ck_assert_ptr_null(strstr(s, "vllm:"));
    free(s);
    metrics_inc(m, "prompt_tokens_total", NULL, 12);
    metrics_inc(m, "prompt_tokens_total", "", 3);
    metrics_inc(m, "prompt_tokens_total", NULL, -5); /* counters never go down */
    metrics_inc(m, "request_success_total", "finished_reason=\"stop\"", 1);
    metrics_set(m, "kv_cache_usage_perc", NULL, 0.25);
    s = render(m);
    ck_assert_ptr_nonnull(strstr(s, "duet:prompt_tokens_total{model_name=\"tiny \\\"x\\\"\"} 15\n"));
    ck_assert_ptr_nonnull(strstr(
        s, "duet:request_success_total{model_name=\"tiny \\\"x\\\"\",finished_reason=\"stop\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(s, "duet:kv_cache_usage_perc{model_name=\"tiny \\\"x\\\"\"} 0.25\n"));
    free(s);
    metrics_free(m);
}
END_TEST

START_TEST(histogram_buckets_are_cumulative) {
    metrics *m = metrics_new("m", 0);
    metrics_observe(m, "time_to_first_token_seconds", NULL, 0.003);
    metrics_observe(m, "time_to_first_token_seconds", NULL, 0.2);
    metrics_observe(m, "time_to_first_token_seconds", NULL, 5000);
    metrics_observe(m, "request_prompt_tokens", NULL, 3);
    char *s = render(m);
    ck_assert_ptr_nonnull(strstr(s, "duet:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"0.005\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(s, "duet:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"0.25\"} 2\n"));
    ck_assert_ptr_nonnull(strstr(s, "duet:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"1280\"} 2\n"));
    ck_assert_ptr_nonnull(strstr(s, "duet:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"+Inf\"} 3\n"));
    ck_assert_ptr_nonnull(strstr(s, "duet:time_to_first_token_seconds_count{model_name=\"m\"} 3\n"));
    ck_assert_ptr_nonnull(strstr(s, "duet:request_prompt_tokens_bucket{model_name=\"m\",le=\"2\"} 0\n"));
    ck_assert_ptr_nonnull(strstr(s, "duet:request_prompt_tokens_bucket{model_name=\"m\",le=\"4\"} 1\n"));
    free(s);
    metrics_free(m);
}
END_TEST

START_TEST(vllm_mirrors_and_unknown_names) {
    metrics *m = metrics_new("m", 1);
    metrics_inc(m, "http_requests_total", "handler=\"/v1/models\",method=\"GET\",status=\"200\"", 1);
    metrics_inc(m, "no_such_family", NULL, 1);     /* ignored, logged once */
    metrics_set(m, "prompt_tokens_total", NULL, 9); /* wrong type: ignored */
    metrics_inc(m, "requests_rejected_total", "reason=\"draining\"", 2);
    char *s = render(m);
    ck_assert_ptr_nonnull(strstr(s, "vllm:prompt_tokens_total{model_name=\"m\"} 0\n"));
    ck_assert_ptr_nonnull(strstr(s, "\nhttp_requests_total{model_name=\"m\",handler=\"/v1/models\""));
    ck_assert_ptr_nonnull(strstr(s, "duet:http_requests_total{model_name=\"m\",handler="));
    ck_assert_ptr_null(strstr(s, "vllm:requests_rejected_total"));
    ck_assert_ptr_null(strstr(s, "no_such_family"));
    free(s);
    metrics_free(m);
}
END_TEST

int main(void) {
    Suite *s = suite_create("metrics");
    TCase *tc = tcase_create("registry");
    tcase_add_test(tc, counters_exist_at_zero_and_count);
    tcase_add_test(tc, histogram_buckets_are_cumulative);
    tcase_add_test(tc, vllm_mirrors_and_unknown_names);
    suite_add_tcase(s, tc);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}
