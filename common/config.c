/* config.c — parse and validate config.json of a deepseek_v4 checkpoint (see config.h).
 *
 * Why: every dimension and constant the engine uses comes from here, so a bad or hostile config
 * must be stopped with a sentence naming the key before any allocation is sized from it. Accepts
 * HF keys (spec §1.1) and the official inference/config.json short names; absent optional keys
 * take their DeepSeek-V4-Flash values. Must never crash on any JSON, never leave a value unchecked
 * that later code uses to size memory.
 */
#include "common/config.h"

#include "common/err.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---- key access -------------------------------------------------------------------------- */

/* Value under `hf` or, if absent, under the official short name `off` (may be NULL). */
static json_t *key2(json_t *o, const char *hf, const char *off, const char **used) {
    json_t *v = json_object_get(o, hf);
    *used = hf;
    if (!v && off) {
        v = json_object_get(o, off);
        if (v) *used = off;
    }
    if (v && json_is_null(v)) v = NULL;
    return v;
}

static int bad_key(char *err, size_t errlen, const char *key, const char *what) {
    return duet_err(err, errlen, DUET_EINVAL, "config.json: \"%s\" %s", key, what);
}

/* Integer key in [lo, hi]; required when def == INT_MIN. */
static int get_int(json_t *o, const char *hf, const char *off, int def, int lo, int hi, int *out,
                   char *err, size_t errlen) {
    const char *k;
    json_t *v = key2(o, hf, off, &k);
    if (!v) {
        if (def == INT_MIN) {
            if (off)
                return duet_err(err, errlen, DUET_EINVAL,
                                "config.json: required key \"%s\" (or \"%s\") is missing", hf, off);
            return duet_err(err, errlen, DUET_EINVAL, "config.json: required key \"%s\" is missing",
                            hf);
        }
        *out = def;
        return 0;
    }
    if (json_is_real(v)) { /* 16.0 is accepted as 16; range first, so the cast is defined */
        double d = json_real_value(v);
        if (d >= lo && d <= hi && d == (double)(int)d) {
            *out = (int)d;
            return 0;
        }
        return duet_err(err, errlen, DUET_EINVAL,
                        "config.json: \"%s\" is %g; expected an integer in [%d, %d]", k, d, lo, hi);
    }
    if (!json_is_integer(v)) return bad_key(err, errlen, k, "must be an integer");
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi)
        return duet_err(err, errlen, DUET_EINVAL,
                        "config.json: \"%s\" is %lld, outside the supported range [%d, %d]", k,
                        (long long)x, lo, hi);
    *out = (int)x;
    return 0;
}

static int get_num(json_t *o, const char *hf, const char *off, double def, double lo, double hi,
                   double *out, char *err, size_t errlen) {
    const char *k;
    json_t *v = key2(o, hf, off, &k);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_number(v)) return bad_key(err, errlen, k, "must be a number");
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi))
        return duet_err(err, errlen, DUET_EINVAL,
                        "config.json: \"%s\" is %g, outside the supported range [%g, %g]", k, x, lo,
                        hi);
    *out = x;
    return 0;
}

static int get_bool(json_t *o, const char *key, int def, int *out, char *err, size_t errlen) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_boolean(v)) return bad_key(err, errlen, key, "must be true or false");
    *out = json_is_true(v);
    return 0;
}

/* Optional string key; *out NULL when absent. */
static int get_str(json_t *o, const char *hf, const char *off, const char **out, char *err,
                   size_t errlen) {
    const char *k;
    json_t *v = key2(o, hf, off, &k);
    *out = NULL;
    if (!v) return 0;
    if (!json_is_string(v)) return bad_key(err, errlen, k, "must be a string");
    *out = json_string_value(v);
    return 0;
}

/* Integer array key into out[max]; *n = count. Required. */
static int get_int_array(json_t *o, const char *key, int *out, int max, int *n, int lo, int hi,
                         char *err, size_t errlen) {
    json_t *a = json_object_get(o, key);
    if (!a) return duet_err(err, errlen, DUET_EINVAL, "config.json: required key \"%s\" is missing",
                            key);
    if (!json_is_array(a)) return bad_key(err, errlen, key, "must be an array of integers");
    if (json_array_size(a) > (size_t)max)
        return duet_err(err, errlen, DUET_EINVAL,
                        "config.json: \"%s\" has %zu entries; at most %d are supported", key,
                        json_array_size(a), max);
    *n = (int)json_array_size(a);
    for (int i = 0; i < *n; i++) {
        json_t *v = json_array_get(a, (size_t)i);
        if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
            return duet_err(err, errlen, DUET_EINVAL,
                            "config.json: \"%s\"[%d] must be an integer in [%d, %d]", key, i, lo,
                            hi);
        out[i] = (int)json_integer_value(v);
    }
    return 0;
}

/* ---- groups of keys ---------------------------------------------------------------------- */

#define TRY(x)                  \
    do {                        \
        int rc_ = (x);          \
        if (rc_) return rc_;    \
    } while (0)

static int parse_dims(json_t *o, dv4_config *c, char *err, size_t errlen) {
    TRY(get_int(o, "vocab_size", NULL, INT_MIN, 2, 1 << 24, &c->vocab_size, err, errlen));
    TRY(get_int(o, "hidden_size", "dim", INT_MIN, 1, 65536, &c->hidden_size, err, errlen));
    TRY(get_int(o, "num_hidden_layers", "n_layers", INT_MIN, 1, CFG_MAX_LAYERS,
                &c->num_hidden_layers, err, errlen));
    TRY(get_int(o, "num_attention_heads", "n_heads", INT_MIN, 1, 1024, &c->num_attention_heads,
                err, errlen));
    TRY(get_int(o, "num_key_value_heads", NULL, 1, 1, 1024, &c->num_key_value_heads, err, errlen));
    TRY(get_int(o, "head_dim", NULL, 512, 2, 4096, &c->head_dim, err, errlen));
    TRY(get_int(o, "qk_rope_head_dim", "rope_head_dim", 64, 2, 4096, &c->qk_rope_head_dim, err,
                errlen));
    TRY(get_int(o, "q_lora_rank", NULL, INT_MIN, 1, 65536, &c->q_lora_rank, err, errlen));
    TRY(get_int(o, "o_groups", NULL, 8, 1, 1024, &c->o_groups, err, errlen));
    TRY(get_int(o, "o_lora_rank", NULL, 1024, 1, 65536, &c->o_lora_rank, err, errlen));
    TRY(get_int(o, "sliding_window", "window_size", 128, 1, 1 << 20, &c->sliding_window, err,
                errlen));
    TRY(get_int_array(o, "compress_ratios", c->compress_ratios, CFG_MAX_LAYERS,
                      &c->n_compress_ratios, 0, 128, err, errlen));
    TRY(get_int(o, "max_position_embeddings", "max_seq_len", 1048576, 1, 1 << 30,
                &c->max_position_embeddings, err, errlen));
    TRY(get_int(o, "index_n_heads", NULL, 64, 1, 1024, &c->index_n_heads, err, errlen));
    TRY(get_int(o, "index_head_dim", NULL, 128, 2, 4096, &c->index_head_dim, err, errlen));
    TRY(get_int(o, "index_topk", NULL, 512, 1, 1 << 20, &c->index_topk, err, errlen));
    TRY(get_int(o, "hc_mult", NULL, 4, 1, 16, &c->hc_mult, err, errlen));
    TRY(get_int(o, "hc_sinkhorn_iters", NULL, 20, 0, 1000, &c->hc_sinkhorn_iters, err, errlen));
    TRY(get_num(o, "hc_eps", NULL, 1e-6, 0, 1, &c->hc_eps, err, errlen));
    TRY(get_num(o, "rms_norm_eps", "norm_eps", 1e-6, 1e-30, 1, &c->rms_norm_eps, err, errlen));
    return 0;
}

static int parse_rope(json_t *o, dv4_config *c, char *err, size_t errlen) {
    TRY(get_num(o, "rope_theta", NULL, 10000, 1, 1e12, &c->rope_theta, err, errlen));
    TRY(get_num(o, "compress_rope_theta", NULL, 160000, 1, 1e12, &c->compress_rope_theta, err,
                errlen));
    json_t *rs = json_object_get(o, "rope_scaling");
    json_t *src = o; /* official short names live at top level */
    c->has_yarn = json_object_get(o, "rope_factor") != NULL;
    if (rs && !json_is_null(rs)) {
        if (!json_is_object(rs)) return bad_key(err, errlen, "rope_scaling", "must be an object");
        const char *type;
        TRY(get_str(rs, "type", "rope_type", &type, err, errlen));
        if (!type || strcmp(type, "yarn"))
            return bad_key(err, errlen, "rope_scaling.type", "must be \"yarn\"");
        c->has_yarn = 1;
        src = rs;
    }
    int yarn_src_is_rs = src == rs && rs;
    TRY(get_num(src, yarn_src_is_rs ? "factor" : "rope_factor", NULL, 16, 1, 1e6, &c->yarn_factor,
                err, errlen));
    TRY(get_int(src, yarn_src_is_rs ? "original_max_position_embeddings" : "original_seq_len",
                NULL, 65536, 1, 1 << 30, &c->yarn_original_max_pos, err, errlen));
    TRY(get_num(src, "beta_fast", NULL, 32, 0, 1e6, &c->yarn_beta_fast, err, errlen));
    TRY(get_num(src, "beta_slow", NULL, 1, 0, 1e6, &c->yarn_beta_slow, err, errlen));
    return 0;
}

static int parse_moe(json_t *o, dv4_config *c, char *err, size_t errlen) {
    TRY(get_int(o, "n_routed_experts", NULL, INT_MIN, 1, 4096, &c->n_routed_experts, err, errlen));
    TRY(get_int(o, "num_experts_per_tok", "n_activated_experts", INT_MIN, 1, 4096,
                &c->num_experts_per_tok, err, errlen));
    TRY(get_int(o, "n_shared_experts", NULL, 1, 0, 64, &c->n_shared_experts, err, errlen));
    TRY(get_int(o, "moe_intermediate_size", "moe_inter_dim", INT_MIN, 1, 65536,
                &c->moe_intermediate_size, err, errlen));
    TRY(get_bool(o, "norm_topk_prob", 1, &c->norm_topk_prob, err, errlen));
    TRY(get_num(o, "routed_scaling_factor", "route_scale", 1.5, 0, 1e6, &c->routed_scaling_factor,
                err, errlen));
    TRY(get_int(o, "num_hash_layers", "n_hash_layers", 3, 0, CFG_MAX_LAYERS, &c->num_hash_layers,
                err, errlen));
    TRY(get_num(o, "swiglu_limit", NULL, 10.0, -1e30, 1e30, &c->swiglu_limit, err, errlen));
    const char *s;
    TRY(get_str(o, "scoring_func", "score_func", &s, err, errlen));
    if (s && strcmp(s, "sqrtsoftplus"))
        return duet_err(err, errlen, DUET_EINVAL,
                        "config.json: scoring function \"%s\" is not supported (only "
                        "\"sqrtsoftplus\")", s);
    TRY(get_str(o, "hidden_act", NULL, &s, err, errlen));
    if (s && strcmp(s, "silu"))
        return bad_key(err, errlen, "hidden_act", "must be \"silu\"");
    TRY(get_str(o, "expert_dtype", NULL, &s, err, errlen));
    if (s && strcmp(s, "fp4") && strcmp(s, "fp8"))
        return bad_key(err, errlen, "expert_dtype", "must be \"fp4\" or \"fp8\"");
    c->expert_fp4 = !s || !strcmp(s, "fp4");
    c->fp4_block = 32;
    return 0;
}

static int parse_quant(json_t *o, dv4_config *c, char *err, size_t errlen) {
    c->quant_fp8 = 0;
    c->weight_block_n = c->weight_block_k = 128;
    json_t *q = json_object_get(o, "quantization_config");
    if (q && !json_is_null(q)) {
        if (!json_is_object(q))
            return bad_key(err, errlen, "quantization_config", "must be an object");
        const char *m;
        TRY(get_str(q, "quant_method", NULL, &m, err, errlen));
        if (!m || strcmp(m, "fp8"))
            return bad_key(err, errlen, "quantization_config.quant_method", "must be \"fp8\"");
        json_t *bs = json_object_get(q, "weight_block_size");
        if (bs) {
            int b[2], n;
            TRY(get_int_array(q, "weight_block_size", b, 2, &n, 1, 4096, err, errlen));
            if (n != 2)
                return bad_key(err, errlen, "quantization_config.weight_block_size",
                               "must have two entries");
            c->weight_block_n = b[0];
            c->weight_block_k = b[1];
        }
        c->quant_fp8 = 1;
        return 0;
    }
    const char *dt;
    TRY(get_str(o, "dtype", NULL, &dt, err, errlen)); /* official: "fp8" or "bf16" */
    if (dt && !strcmp(dt, "fp8")) c->quant_fp8 = 1;
    return 0;
}

static int parse_misc(json_t *o, dv4_config *c, char *err, size_t errlen) {
    TRY(get_int(o, "num_nextn_predict_layers", "n_mtp_layers", 1, 0, 16,
                &c->num_nextn_predict_layers, err, errlen));
    TRY(get_int(o, "bos_token_id", NULL, 0, 0, INT_MAX, &c->bos_token_id, err, errlen));
    TRY(get_int(o, "eos_token_id", NULL, 1, 0, INT_MAX, &c->eos_token_id, err, errlen));
    TRY(get_bool(o, "tie_word_embeddings", 0, &c->tie_word_embeddings, err, errlen));
    TRY(get_int(o, "dspark_block_size", NULL, 0, 0, 64, &c->dspark_block_size, err, errlen));
    TRY(get_int(o, "dspark_noise_token_id", NULL, 0, 0, INT_MAX, &c->dspark_noise_token_id, err,
                errlen));
    TRY(get_int(o, "dspark_markov_rank", NULL, 0, 0, 65536, &c->dspark_markov_rank, err, errlen));
    c->n_dspark_target_layers = 0;
    if (json_object_get(o, "dspark_target_layer_ids"))
        TRY(get_int_array(o, "dspark_target_layer_ids", c->dspark_target_layer_ids, 8,
                          &c->n_dspark_target_layers, 0, CFG_MAX_LAYERS - 1, err, errlen));
    return 0;
}

/* ---- cross-field validation --------------------------------------------------------------- */

static int multiple(const char *key, int64_t v, int of, const char *why, char *err,
                    size_t errlen) {
    if (v % of == 0) return 0;
    return duet_err(err, errlen, DUET_EINVAL, "config.json: \"%s\" (%lld) must be a multiple of %d (%s)",
                    key, (long long)v, of, why);
}

static int validate_attn(const dv4_config *c, char *err, size_t errlen) {
    if (c->num_key_value_heads != 1)
        return bad_key(err, errlen, "num_key_value_heads", "must be 1 (one shared K=V head)");
    if (c->num_attention_heads % c->o_groups)
        return duet_err(err, errlen, DUET_EINVAL,
                        "config.json: \"num_attention_heads\" (%d) must be divisible by "
                        "\"o_groups\" (%d)", c->num_attention_heads, c->o_groups);
    if (c->qk_rope_head_dim >= c->head_dim || c->qk_rope_head_dim % 2)
        return bad_key(err, errlen, "qk_rope_head_dim", "must be even and smaller than head_dim");
    if (c->head_dim % 2) return bad_key(err, errlen, "head_dim", "must be even");
    TRY(multiple("head_dim", c->head_dim - c->qk_rope_head_dim, 64,
                 "head_dim - qk_rope_head_dim is quantized in FP8 blocks of 64", err, errlen));
    int ih = c->index_head_dim;
    if (ih & (ih - 1)) return bad_key(err, errlen, "index_head_dim", "must be a power of two");
    if (ih <= c->qk_rope_head_dim || ih % 32)
        return bad_key(err, errlen, "index_head_dim",
                       "must exceed qk_rope_head_dim and be a multiple of 32");
    if (c->n_compress_ratios < c->num_hidden_layers)
        return duet_err(err, errlen, DUET_EINVAL,
                        "config.json: \"compress_ratios\" has %d entries but num_hidden_layers is "
                        "%d", c->n_compress_ratios, c->num_hidden_layers);
    for (int i = 0; i < c->n_compress_ratios; i++)
        if (c->compress_ratios[i] != 0 && c->compress_ratios[i] != 4 &&
            c->compress_ratios[i] != 128)
            return duet_err(err, errlen, DUET_EINVAL,
                            "config.json: \"compress_ratios\"[%d] is %d; only 0, 4 and 128 are "
                            "supported", i, c->compress_ratios[i]);
    return 0;
}

static int validate_blocks(const dv4_config *c, char *err, size_t errlen) {
    if (c->quant_fp8) {
        int b = c->weight_block_n > c->weight_block_k ? c->weight_block_n : c->weight_block_k;
        const char *why = "dense FP8 weights use block scales";
        TRY(multiple("hidden_size", c->hidden_size, b, why, err, errlen));
        TRY(multiple("q_lora_rank", c->q_lora_rank, b, why, err, errlen));
        TRY(multiple("head_dim", c->head_dim, b, why, err, errlen));
        TRY(multiple("o_lora_rank", (int64_t)c->o_lora_rank * c->o_groups, b, why, err, errlen));
        TRY(multiple("num_attention_heads",
                     (int64_t)c->num_attention_heads / c->o_groups * c->head_dim, b, why, err,
                     errlen));
        TRY(multiple("moe_intermediate_size", c->moe_intermediate_size, b, why, err, errlen));
        TRY(multiple("index_n_heads", (int64_t)c->index_n_heads * c->index_head_dim, b, why, err,
                     errlen));
    }
    if (c->expert_fp4) {
        const char *why = "FP4 experts have one scale per 32 inputs";
        TRY(multiple("hidden_size", c->hidden_size, c->fp4_block, why, err, errlen));
        TRY(multiple("moe_intermediate_size", c->moe_intermediate_size, c->fp4_block, why, err,
                     errlen));
    }
    return 0;
}

static int validate_misc(const dv4_config *c, char *err, size_t errlen) {
    if (c->num_experts_per_tok > c->n_routed_experts)
        return bad_key(err, errlen, "num_experts_per_tok", "must not exceed n_routed_experts");
    if (c->bos_token_id >= c->vocab_size || c->eos_token_id >= c->vocab_size)
        return bad_key(err, errlen, "bos_token_id", "and eos_token_id must be below vocab_size");
    if ((int64_t)c->hc_mult * c->hidden_size > (1 << 20))
        return bad_key(err, errlen, "hc_mult", "times hidden_size is too large");
    if ((int64_t)c->num_attention_heads * c->head_dim > (1 << 20))
        return bad_key(err, errlen, "num_attention_heads", "times head_dim is too large");
    for (int i = 0; i < c->n_dspark_target_layers; i++)
        if (c->dspark_target_layer_ids[i] >= c->num_hidden_layers)
            return bad_key(err, errlen, "dspark_target_layer_ids",
                           "names a layer beyond num_hidden_layers");
    if (c->dspark_noise_token_id >= c->vocab_size)
        return bad_key(err, errlen, "dspark_noise_token_id", "must be below vocab_size");
    return 0;
}

/* ---- entry points -------------------------------------------------------------------------- */

static int parse_obj(json_t *o, dv4_config *c, char *err, size_t errlen) {
    const char *mt;
    TRY(get_str(o, "model_type", NULL, &mt, err, errlen));
    if (mt && strcmp(mt, "deepseek_v4"))
        return duet_err(err, errlen, DUET_EINVAL,
                        "config.json: model_type \"%s\" is not supported (expected deepseek_v4)",
                        mt);
    TRY(parse_dims(o, c, err, errlen));
    TRY(parse_rope(o, c, err, errlen));
    TRY(parse_moe(o, c, err, errlen));
    TRY(parse_quant(o, c, err, errlen));
    TRY(parse_misc(o, c, err, errlen));
    TRY(validate_attn(c, err, errlen));
    TRY(validate_blocks(c, err, errlen));
    return validate_misc(c, err, errlen);
}

int cfg_parse(const char *json, size_t len, dv4_config *c, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    json_error_t je;
    json_t *o = json_loadb(json, len, 0, &je);
    if (!o)
        return duet_err(err, errlen, DUET_EFORMAT, "config.json is not valid JSON: %s (line %d)",
                        je.text, je.line);
    int rc = json_is_object(o) ? parse_obj(o, c, err, errlen)
                               : duet_err(err, errlen, DUET_EFORMAT,
                                          "config.json must hold a JSON object");
    json_decref(o);
    return rc;
}

int cfg_load(const char *path, dv4_config *c, char *err, size_t errlen) {
    struct stat st;
    char buf[4096];
    if (!stat(path, &st) && S_ISDIR(st.st_mode)) {
        snprintf(buf, sizeof buf, "%s/config.json", path);
        path = buf;
    }
    FILE *f = fopen(path, "rb");
    if (!f) return duet_err(err, errlen, DUET_EIO, "cannot open %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *s = xmalloc(cap);
    size_t r;
    while ((r = fread(s + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            if (cap >= (64u << 20)) {
                fclose(f);
                free(s);
                return duet_err(err, errlen, DUET_EFORMAT, "%s is larger than 64 MB", path);
            }
            cap *= 2;
            s = xrealloc(s, cap);
        }
    }
    fclose(f);
    int rc = cfg_parse(s, n, c, err, errlen);
    free(s);
    return rc;
}
