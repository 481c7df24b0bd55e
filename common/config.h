/* config.h — the model configuration (config.json) of a deepseek_v4 checkpoint.
 *
 * Why: every value the engine uses comes from config.json, never from V4-Flash constants: test
 * configs vary them (spec §6 "practical notes"). Reads HF-style keys (spec §1.1) and the official
 * inference/config.json short names (dim, n_layers, ...). Validates ranges and cross-field rules
 * (heads divisible by groups, dims multiples of quant blocks, ...) with errors naming the key.
 */
#ifndef DUET_CONFIG_H
#define DUET_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#define CFG_MAX_LAYERS 128

typedef struct {
    int vocab_size;            /* rows of embed/head */
    int hidden_size;           /* D */
    int num_hidden_layers;     /* backbone layers (draft layers not included) */
    int num_attention_heads;   /* H query heads */
    int num_key_value_heads;   /* must be 1 (shared K=V head) */
    int head_dim;              /* d_h, also compressed kv dim */
    int qk_rope_head_dim;      /* d_r: rope on the LAST d_r dims of each head */
    int q_lora_rank;
    int o_groups;
    int o_lora_rank;
    int sliding_window;        /* raw kv ring size */
    int n_compress_ratios;     /* entries in compress_ratios (may exceed num_hidden_layers) */
    int compress_ratios[CFG_MAX_LAYERS]; /* 0, 4 (CSA) or 128 (HCA) */
    double rope_theta;         /* m = 0 layers */
    double compress_rope_theta;/* m > 0 layers */
    int has_yarn;              /* rope_scaling present with type yarn */
    double yarn_factor;
    int yarn_original_max_pos;
    double yarn_beta_fast, yarn_beta_slow;
    int max_position_embeddings;
    int index_n_heads, index_head_dim, index_topk;
    int hc_mult, hc_sinkhorn_iters;
    double hc_eps, rms_norm_eps;
    int n_routed_experts, num_experts_per_tok, n_shared_experts, moe_intermediate_size;
    int norm_topk_prob;
    double routed_scaling_factor;
    int num_hash_layers;
    double swiglu_limit;       /* <= 0 disables the clamp */
    int num_nextn_predict_layers;
    int bos_token_id, eos_token_id;
    int tie_word_embeddings;
    int expert_fp4;            /* 1 = routed experts packed FP4 (default when expert_dtype absent) */
    int quant_fp8;             /* 1 = quantization_config fp8 present (dense weights FP8) */
    int weight_block_n, weight_block_k; /* FP8 block size, 128x128 */
    int fp4_block;             /* FP4 scale block along K: 32 */
    /* DSpark (0731/-DSpark); zero when absent */
    int dspark_block_size, dspark_noise_token_id, dspark_markov_rank;
    int n_dspark_target_layers, dspark_target_layer_ids[8];
} dv4_config;

/* Parses config.json text. Returns 0 or DUET_EFORMAT/DUET_EINVAL with a sentence in err. */
int cfg_parse(const char *json, size_t len, dv4_config *c, char *err, size_t errlen);
/* Reads and parses a file (path to config.json, or a directory containing one). */
int cfg_load(const char *path, dv4_config *c, char *err, size_t errlen);

/* Derived helpers */
static inline int cfg_ratio(const dv4_config *c, int layer) {
    return layer < c->n_compress_ratios ? c->compress_ratios[layer] : 0;
}
static inline int cfg_is_hash_layer(const dv4_config *c, int layer) {
    return layer < c->num_hash_layers;
}

#endif
