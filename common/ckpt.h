/* ckpt.h — the tensor inventory of a deepseek_v4 checkpoint, derived from its config.
 *
 * Why: one enumeration of every expected tensor (name, dtype, shape; spec §4.3–4.5) serves both
 * tools/mkmodel (which writes them) and the loader (which validates presence, shape and dtype of
 * every tensor before any compute, naming the tensor and expected/found values in errors).
 * Also resolves transformers-style names (spec §4.7), so checkpoints saved by transformers load.
 */
#ifndef DUET_CKPT_H
#define DUET_CKPT_H

#include "common/config.h"
#include "common/safetensors.h"

typedef enum {
    CK_PLAIN,       /* BF16 / F32 / I64 used as-is */
    CK_FP8_WEIGHT,  /* F8_E4M3 [N,K]; its scale is name with ".weight" -> ".scale" */
    CK_FP8_SCALE,   /* F8_E8M0 [ceil(N/128), ceil(K/128)] */
    CK_FP4_WEIGHT,  /* I8 [N, K/2]; scale F8_E8M0 [N, K/32] */
    CK_FP4_SCALE
} ck_kind;

typedef struct {
    char name[160];            /* official runtime name, e.g. "layers.3.attn.wq_a.weight" */
    st_dtype dtype;
    int ndim;
    int64_t shape[4];
    ck_kind kind;
    int layer;                 /* -1 for globals */
} ck_spec;

/* Calls cb for every tensor the config implies (backbone only; draft modules are not
 * enumerated yet), in a stable order. Stops and returns cb's value if non-zero. */
int ck_foreach(const dv4_config *c, int (*cb)(const ck_spec *s, void *ctx), void *ctx);

/* A dequantizing view of a weight in any accepted storage. Official names are looked up first;
 * if absent, the transformers name (spec §4.7) is tried (stacked experts sliced by expert). */
typedef struct {
    ck_kind kind;              /* CK_PLAIN, CK_FP8_WEIGHT or CK_FP4_WEIGHT */
    st_dtype dtype;            /* storage dtype of data */
    int64_t rows, cols;        /* logical [N, K] (K unpacked for FP4); 1-D tensors: rows = 1 */
    const void *data;          /* row-major; for stacked HF experts points at the slice */
    const uint8_t *scale;      /* e8m0 scales for FP8/FP4, else NULL */
    int64_t scale_cols;        /* columns of the scale tensor */
    int block_n, block_k;      /* scale block: FP8 weight_block_n x _k (config); FP4 1 x 32 */
} ck_weight;

/* Validates every expected tensor of the config against the set: present (under either
 * name scheme), right dtype, right shape. Returns the first problem as a sentence. */
int ck_validate(const dv4_config *c, const st_set *s, char *err, size_t errlen);
/* Looks up one weight by its official name (e.g. "layers.0.attn.wq_a.weight"). */
int ck_get(const dv4_config *c, const st_set *s, const char *name, ck_weight *out, char *err,
           size_t errlen);
/* Row n of a weight as f32 (dequantized). out has w->cols floats. */
void ck_row_f32(const ck_weight *w, int64_t n, float *out);

/* Fingerprint of config + tensor index (names, dtypes, shapes): FNV-1a 64. */
uint64_t ck_fingerprint(const dv4_config *c, const st_set *s);

/* The transformers name (spec §4.7) of an official name, e.g. "layers.0.attn.wq_a.scale" ->
 * "model.layers.0.self_attn.q_a_proj.weight_scale_inv". Routed experts map to their stacked
 * tensor ("layers.1.ffn.experts.5.w3.weight" -> "model.layers.1.mlp.experts.gate_up_proj");
 * then *expert = 5 and *row0 = row offset of the slice inside the expert (w3: I, else 0),
 * otherwise both are -1. Returns 0, or DUET_ENOTFOUND if the name has no mapping. */
int ck_hf_name(const dv4_config *c, const char *name, char *out, size_t outlen, int *expert,
               int64_t *row0);

#endif
