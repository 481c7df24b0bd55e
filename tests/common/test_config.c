/* test_config.c — config.json parsing: HF keys, official short names, defaults, validation.
 *
 * Why: every engine dimension comes from the config; a wrongly mapped short name or a missing
 * range check would size buffers wrongly. Tests read the real tools/mkmodel/tiny.json (path from
 * the environment variable DUET_TINY_CONFIG, set by meson) and hand-written variants. Must never
 * skip: a missing tiny.json is a failure.
 */
#include "common/config.h"
#include "common/err.h"

#include <check.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char err[1024];

static const char *tiny_path(void) {
    const char *p = getenv("DUET_TINY_CONFIG");
    ck_assert_msg(p != NULL, "DUET_TINY_CONFIG is not set; run this test through meson test");
    return p;
}

START_TEST(tiny_values) {
    dv4_config c;
    ck_assert_msg(cfg_load(tiny_path(), &c, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(c.vocab_size, 1024);
    ck_assert_int_eq(c.hidden_size, 256);
    ck_assert_int_eq(c.num_hidden_layers, 6);
    ck_assert_int_eq(c.num_attention_heads, 8);
    ck_assert_int_eq(c.num_key_value_heads, 1);
    ck_assert_int_eq(c.head_dim, 128);
    ck_assert_int_eq(c.qk_rope_head_dim, 64);
    ck_assert_int_eq(c.q_lora_rank, 128);
    ck_assert_int_eq(c.o_groups, 2);
    ck_assert_int_eq(c.o_lora_rank, 64);
    ck_assert_int_eq(c.n_routed_experts, 8);
    ck_assert_int_eq(c.num_experts_per_tok, 2);
    ck_assert_int_eq(c.n_shared_experts, 1);
    ck_assert_int_eq(c.moe_intermediate_size, 128);
    ck_assert_int_eq(c.num_hash_layers, 2);
    ck_assert_int_eq(c.norm_topk_prob, 1);
    ck_assert(c.routed_scaling_factor == 1.5 && c.swiglu_limit == 10.0);
    ck_assert_int_eq(c.sliding_window, 8);
    ck_assert_int_eq(c.n_compress_ratios, 7);
    int want[7] = {0, 4, 128, 4, 128, 0, 0};
    for (int i = 0; i < 7; i++) ck_assert_int_eq(c.compress_ratios[i], want[i]);
    ck_assert_int_eq(cfg_ratio(&c, 2), 128);
    ck_assert_int_eq(cfg_ratio(&c, 100), 0);
    ck_assert(cfg_is_hash_layer(&c, 1) && !cfg_is_hash_layer(&c, 2));
    ck_assert(c.rope_theta == 10000 && c.compress_rope_theta == 160000);
    ck_assert_int_eq(c.has_yarn, 1);
    ck_assert(c.yarn_factor == 16 && c.yarn_beta_fast == 32 && c.yarn_beta_slow == 1);
    ck_assert_int_eq(c.yarn_original_max_pos, 256);
    ck_assert_int_eq(c.index_n_heads, 16);
    ck_assert_int_eq(c.index_head_dim, 128);
    ck_assert_int_eq(c.index_topk, 16);
    ck_assert_int_eq(c.hc_mult, 4);
    ck_assert_int_eq(c.hc_sinkhorn_iters, 20);
    ck_assert(c.hc_eps == 1e-6 && c.rms_norm_eps == 1e-6);
    ck_assert_int_eq(c.num_nextn_predict_layers, 1);
    ck_assert_int_eq(c.max_position_embeddings, 4096);
    ck_assert(c.bos_token_id == 0 && c.eos_token_id == 1 && c.tie_word_embeddings == 0);
    ck_assert(c.expert_fp4 == 1 && c.quant_fp8 == 1 && c.fp4_block == 32);
    ck_assert(c.weight_block_n == 128 && c.weight_block_k == 128);
    ck_assert_int_eq(c.dspark_block_size, 0);
}
END_TEST

static const char *official =
    "{\"vocab_size\": 1024, \"dim\": 256, \"moe_inter_dim\": 128, \"n_layers\": 4,"
    " \"n_hash_layers\": 1, \"n_heads\": 8, \"n_routed_experts\": 16, \"n_shared_experts\": 1,"
    " \"n_activated_experts\": 4, \"score_func\": \"sqrtsoftplus\", \"route_scale\": 2.5,"
    " \"swiglu_limit\": 7.0, \"q_lora_rank\": 128, \"head_dim\": 128, \"rope_head_dim\": 64,"
    " \"norm_eps\": 1e-5, \"o_groups\": 2, \"o_lora_rank\": 64, \"window_size\": 16,"
    " \"compress_ratios\": [0, 4, 128, 0], \"compress_rope_theta\": 160000.0,"
    " \"original_seq_len\": 512, \"rope_theta\": 10000.0, \"rope_factor\": 8, \"beta_fast\": 16,"
    " \"beta_slow\": 2, \"index_n_heads\": 4, \"index_head_dim\": 128, \"index_topk\": 32,"
    " \"hc_mult\": 2, \"hc_sinkhorn_iters\": 10, \"hc_eps\": 1e-6, \"dtype\": \"fp8\","
    " \"scale_fmt\": \"ue8m0\", \"expert_dtype\": \"fp8\", \"n_mtp_layers\": 3}";

START_TEST(official_short_names) {
    dv4_config c;
    ck_assert_msg(cfg_parse(official, strlen(official), &c, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(c.hidden_size, 256);
    ck_assert_int_eq(c.moe_intermediate_size, 128);
    ck_assert_int_eq(c.num_hidden_layers, 4);
    ck_assert_int_eq(c.num_hash_layers, 1);
    ck_assert_int_eq(c.num_attention_heads, 8);
    ck_assert_int_eq(c.num_experts_per_tok, 4);
    ck_assert(c.routed_scaling_factor == 2.5 && c.swiglu_limit == 7.0);
    ck_assert_int_eq(c.qk_rope_head_dim, 64);
    ck_assert_int_eq(c.sliding_window, 16);
    ck_assert(c.has_yarn && c.yarn_factor == 8 && c.yarn_original_max_pos == 512);
    ck_assert(c.yarn_beta_fast == 16 && c.yarn_beta_slow == 2);
    ck_assert(c.rms_norm_eps == 1e-5);
    ck_assert(c.quant_fp8 == 1 && c.expert_fp4 == 0);
    ck_assert_int_eq(c.num_nextn_predict_layers, 3);
    ck_assert_int_eq(c.hc_mult, 2);
    ck_assert_int_eq(c.hc_sinkhorn_iters, 10);
}
END_TEST

START_TEST(defaults_and_dspark) {
    const char *j = "{\"vocab_size\": 130000, \"hidden_size\": 4096, \"num_hidden_layers\": 2,"
                    " \"num_attention_heads\": 64, \"q_lora_rank\": 1024, \"n_routed_experts\": 256,"
                    " \"num_experts_per_tok\": 6, \"moe_intermediate_size\": 2048,"
                    " \"compress_ratios\": [0, 0], \"dspark_block_size\": 5,"
                    " \"dspark_noise_token_id\": 128799, \"dspark_target_layer_ids\": [0, 1],"
                    " \"dspark_markov_rank\": 256}";
    dv4_config c;
    ck_assert_msg(cfg_parse(j, strlen(j), &c, err, sizeof err) == 0, "%s", err);
    ck_assert(c.head_dim == 512 && c.qk_rope_head_dim == 64 && c.o_groups == 8);
    ck_assert(c.o_lora_rank == 1024 && c.sliding_window == 128 && c.index_topk == 512);
    ck_assert(c.hc_mult == 4 && c.hc_sinkhorn_iters == 20 && c.num_hash_layers == 3);
    ck_assert(c.expert_fp4 == 1 && c.quant_fp8 == 0 && c.has_yarn == 0);
    ck_assert(c.swiglu_limit == 10.0 && c.routed_scaling_factor == 1.5);
    ck_assert(c.dspark_block_size == 5 && c.dspark_noise_token_id == 128799);
    ck_assert(c.n_dspark_target_layers == 2 && c.dspark_target_layer_ids[1] == 1);
    ck_assert_int_eq(c.dspark_markov_rank, 256);
}
END_TEST

/* Loads tiny.json, applies one edit (key set to a JSON value, or deleted when value is NULL),
 * parses, and checks the error mentions `needle`. */
static void expect_bad(const char *key, const char *value, const char *needle) {
    json_error_t je;
    json_t *o = json_load_file(tiny_path(), 0, &je);
    ck_assert_msg(o != NULL, "cannot read %s: %s", tiny_path(), je.text);
    if (value) json_object_set_new(o, key, json_loads(value, JSON_DECODE_ANY, &je));
    else json_object_del(o, key);
    char *s = json_dumps(o, 0);
    dv4_config c;
    int rc = cfg_parse(s, strlen(s), &c, err, sizeof err);
    free(s);
    json_decref(o);
    ck_assert_msg(rc < 0, "editing %s should make the config invalid", key);
    ck_assert_msg(strstr(err, needle), "error \"%s\" does not mention \"%s\"", err, needle);
}

START_TEST(missing_and_invalid_keys) {
    expect_bad("hidden_size", NULL, "\"hidden_size\" (or \"dim\") is missing");
    expect_bad("vocab_size", NULL, "\"vocab_size\" is missing");
    expect_bad("compress_ratios", NULL, "compress_ratios");
    expect_bad("hidden_size", "\"big\"", "hidden_size");
    expect_bad("hidden_size", "-4", "hidden_size");
    expect_bad("num_key_value_heads", "2", "num_key_value_heads");
    expect_bad("o_groups", "3", "o_groups");
    expect_bad("qk_rope_head_dim", "128", "qk_rope_head_dim");
    expect_bad("qk_rope_head_dim", "63", "qk_rope_head_dim");
    expect_bad("compress_ratios", "[0, 8, 128, 4, 128, 0]", "compress_ratios");
    expect_bad("compress_ratios", "[0, 4]", "compress_ratios");
    expect_bad("index_head_dim", "96", "index_head_dim");
    expect_bad("hidden_size", "320", "hidden_size");         /* not a multiple of 128 */
    expect_bad("moe_intermediate_size", "144", "moe_intermediate_size");
    expect_bad("num_experts_per_tok", "9", "num_experts_per_tok");
    expect_bad("scoring_func", "\"softmax\"", "softmax");
    expect_bad("expert_dtype", "\"fp2\"", "expert_dtype");
    expect_bad("rope_scaling", "{\"type\": \"linear\"}", "rope_scaling");
    expect_bad("quantization_config", "{\"quant_method\": \"gptq\"}", "quant_method");
    expect_bad("model_type", "\"llama\"", "llama");
    expect_bad("num_hidden_layers", "1000", "num_hidden_layers");
    expect_bad("dspark_target_layer_ids", "[3, 9]", "dspark_target_layer_ids");
    expect_bad("rms_norm_eps", "\"x\"", "rms_norm_eps");
    expect_bad("tie_word_embeddings", "3", "tie_word_embeddings");
    expect_bad("hidden_size", "1e300", "hidden_size");
    expect_bad("head_dim", "127.5", "head_dim");
}
END_TEST

START_TEST(not_json) {
    dv4_config c;
    ck_assert_int_eq(cfg_parse("{\"a\":", 5, &c, err, sizeof err), DUET_EFORMAT);
    ck_assert_msg(strstr(err, "not valid JSON"), "%s", err);
    ck_assert_int_eq(cfg_parse("[1]", 3, &c, err, sizeof err), DUET_EFORMAT);
    ck_assert_int_lt(cfg_load("/nonexistent/config.json", &c, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "/nonexistent/config.json"), "%s", err);
}
END_TEST

int main(void) {
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, tiny_values);
    tcase_add_test(tc, official_short_names);
    tcase_add_test(tc, defaults_and_dspark);
    tcase_add_test(tc, missing_and_invalid_keys);
    tcase_add_test(tc, not_json);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
