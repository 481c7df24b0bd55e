/* ckpt.c — the expected tensor inventory of a deepseek_v4 checkpoint and typed access to it.
 *
 * Why: the loader must reject a checkpoint whose tensors do not match its config before any
 * compute, naming the tensor and what was expected; mkmodel must write exactly what the loader
 * expects. Both use ck_foreach. Also maps official runtime names to transformers names (spec
 * §4.7) so checkpoints saved by transformers load. Must never read a tensor's bytes beyond the
 * shape it was validated with, and never abort on a malformed checkpoint.
 */
#include "common/ckpt.h"

#include "common/err.h"
#include "common/formats.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- enumeration -------------------------------------------------------------------------- */

typedef struct {
    const dv4_config *c;
    int (*cb)(const ck_spec *s, void *ctx);
    void *ctx;
    int layer;
    const char *prefix; /* "" or "layers.L." */
} emit_t;

static int emit(emit_t *e, const char *name, st_dtype dt, ck_kind kind, int ndim, int64_t a,
                int64_t b) {
    ck_spec s;
    memset(&s, 0, sizeof s);
    size_t lp = strlen(e->prefix), ln = strlen(name);
    if (lp + ln >= sizeof s.name) return DUET_EINVAL; /* names are short; cannot happen */
    memcpy(s.name, e->prefix, lp);
    memcpy(s.name + lp, name, ln + 1);
    s.dtype = dt;
    s.kind = kind;
    s.ndim = ndim;
    s.shape[0] = a;
    s.shape[1] = b;
    s.layer = e->layer;
    return e->cb(&s, e->ctx);
}

#define EMIT(...)                          \
    do {                                   \
        int rc_ = emit(__VA_ARGS__);       \
        if (rc_) return rc_;               \
    } while (0)

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* A dense linear "<base>.weight" [N, K]: FP8 + block scale when quant_fp8, else BF16. */
static int linear(emit_t *e, const char *base, int64_t N, int64_t K) {
    char w[160], s[160];
    snprintf(w, sizeof w, "%s.weight", base);
    snprintf(s, sizeof s, "%s.scale", base);
    const dv4_config *c = e->c;
    if (!c->quant_fp8) return emit(e, w, ST_BF16, CK_PLAIN, 2, N, K);
    EMIT(e, w, ST_F8_E4M3, CK_FP8_WEIGHT, 2, N, K);
    return emit(e, s, ST_F8_E8M0, CK_FP8_SCALE, 2, cdiv(N, c->weight_block_n),
                cdiv(K, c->weight_block_k));
}

/* A routed-expert linear: packed FP4 when expert_fp4, else as a dense linear. */
static int expert_linear(emit_t *e, const char *base, int64_t N, int64_t K) {
    char w[160], s[160];
    if (!e->c->expert_fp4) return linear(e, base, N, K);
    snprintf(w, sizeof w, "%s.weight", base);
    snprintf(s, sizeof s, "%s.scale", base);
    EMIT(e, w, ST_I8, CK_FP4_WEIGHT, 2, N, K / 2);
    return emit(e, s, ST_F8_E8M0, CK_FP4_SCALE, 2, N, K / e->c->fp4_block);
}

static int globals(emit_t *e) {
    const dv4_config *c = e->c;
    int64_t V = c->vocab_size, D = c->hidden_size, hc = c->hc_mult;
    EMIT(e, "embed.weight", ST_BF16, CK_PLAIN, 2, V, D);
    if (!c->tie_word_embeddings) EMIT(e, "head.weight", ST_BF16, CK_PLAIN, 2, V, D);
    EMIT(e, "norm.weight", ST_BF16, CK_PLAIN, 1, D, 0);
    EMIT(e, "hc_head_fn", ST_F32, CK_PLAIN, 2, hc, hc * D);
    EMIT(e, "hc_head_base", ST_F32, CK_PLAIN, 1, hc, 0);
    return emit(e, "hc_head_scale", ST_F32, CK_PLAIN, 1, 1, 0);
}

/* Compressor "<base>." with projection width W = c*d, window m, norm width d. */
static int compressor(emit_t *e, const char *base, int64_t W, int64_t m, int64_t d) {
    char n[160];
    int64_t D = e->c->hidden_size;
    snprintf(n, sizeof n, "%s.wkv.weight", base);
    EMIT(e, n, ST_BF16, CK_PLAIN, 2, W, D);
    snprintf(n, sizeof n, "%s.wgate.weight", base);
    EMIT(e, n, ST_BF16, CK_PLAIN, 2, W, D);
    snprintf(n, sizeof n, "%s.ape", base);
    EMIT(e, n, ST_F32, CK_PLAIN, 2, m, W);
    snprintf(n, sizeof n, "%s.norm.weight", base);
    return emit(e, n, ST_BF16, CK_PLAIN, 1, d, 0);
}

static int attention(emit_t *e, int L) {
    const dv4_config *c = e->c;
    int64_t D = c->hidden_size, H = c->num_attention_heads, hd = c->head_dim;
    int64_t ql = c->q_lora_rank, G = c->o_groups, ol = c->o_lora_rank;
    int ratio = cfg_ratio(c, L);
    int rc;
    if ((rc = linear(e, "attn.wq_a", ql, D))) return rc;
    EMIT(e, "attn.q_norm.weight", ST_BF16, CK_PLAIN, 1, ql, 0);
    if ((rc = linear(e, "attn.wq_b", H * hd, ql))) return rc;
    if ((rc = linear(e, "attn.wkv", hd, D))) return rc;
    EMIT(e, "attn.kv_norm.weight", ST_BF16, CK_PLAIN, 1, hd, 0);
    if ((rc = linear(e, "attn.wo_a", G * ol, H * hd / G))) return rc;
    if ((rc = linear(e, "attn.wo_b", D, G * ol))) return rc;
    EMIT(e, "attn.attn_sink", ST_F32, CK_PLAIN, 1, H, 0);
    if (ratio == 0) return 0;
    int64_t cc = ratio == 4 ? 2 : 1;
    if ((rc = compressor(e, "attn.compressor", cc * hd, ratio, hd))) return rc;
    if (ratio != 4) return 0;
    int64_t ih = c->index_n_heads, ihd = c->index_head_dim;
    if ((rc = linear(e, "attn.indexer.wq_b", ih * ihd, ql))) return rc;
    EMIT(e, "attn.indexer.weights_proj.weight", ST_BF16, CK_PLAIN, 2, ih, D);
    return compressor(e, "attn.indexer.compressor", 2 * ihd, 4, ihd);
}

static int moe(emit_t *e, int L) {
    const dv4_config *c = e->c;
    int64_t D = c->hidden_size, E = c->n_routed_experts, I = c->moe_intermediate_size;
    int64_t S = (int64_t)c->n_shared_experts * I;
    int rc;
    EMIT(e, "ffn.gate.weight", ST_BF16, CK_PLAIN, 2, E, D);
    if (cfg_is_hash_layer(c, L))
        EMIT(e, "ffn.gate.tid2eid", ST_I64, CK_PLAIN, 2, c->vocab_size, c->num_experts_per_tok);
    else
        EMIT(e, "ffn.gate.bias", ST_F32, CK_PLAIN, 1, E, 0);
    if (S > 0) {
        if ((rc = linear(e, "ffn.shared_experts.w1", S, D))) return rc;
        if ((rc = linear(e, "ffn.shared_experts.w2", D, S))) return rc;
        if ((rc = linear(e, "ffn.shared_experts.w3", S, D))) return rc;
    }
    char b[96];
    for (int64_t x = 0; x < E; x++) {
        snprintf(b, sizeof b, "ffn.experts.%lld.w1", (long long)x);
        if ((rc = expert_linear(e, b, I, D))) return rc;
        snprintf(b, sizeof b, "ffn.experts.%lld.w2", (long long)x);
        if ((rc = expert_linear(e, b, D, I))) return rc;
        snprintf(b, sizeof b, "ffn.experts.%lld.w3", (long long)x);
        if ((rc = expert_linear(e, b, I, D))) return rc;
    }
    return 0;
}

static int layer(emit_t *e, int L) {
    const dv4_config *c = e->c;
    int64_t D = c->hidden_size, hc = c->hc_mult, mix = (2 + hc) * hc;
    int rc;
    EMIT(e, "hc_attn_fn", ST_F32, CK_PLAIN, 2, mix, hc * D);
    EMIT(e, "hc_attn_base", ST_F32, CK_PLAIN, 1, mix, 0);
    EMIT(e, "hc_attn_scale", ST_F32, CK_PLAIN, 1, 3, 0);
    EMIT(e, "hc_ffn_fn", ST_F32, CK_PLAIN, 2, mix, hc * D);
    EMIT(e, "hc_ffn_base", ST_F32, CK_PLAIN, 1, mix, 0);
    EMIT(e, "hc_ffn_scale", ST_F32, CK_PLAIN, 1, 3, 0);
    EMIT(e, "attn_norm.weight", ST_BF16, CK_PLAIN, 1, D, 0);
    EMIT(e, "ffn_norm.weight", ST_BF16, CK_PLAIN, 1, D, 0);
    if ((rc = attention(e, L))) return rc;
    return moe(e, L);
}

int ck_foreach(const dv4_config *c, int (*cb)(const ck_spec *s, void *ctx), void *ctx) {
    emit_t e = {c, cb, ctx, -1, ""};
    int rc = globals(&e);
    char pfx[32];
    for (int L = 0; !rc && L < c->num_hidden_layers; L++) {
        snprintf(pfx, sizeof pfx, "layers.%d.", L);
        e.prefix = pfx;
        e.layer = L;
        rc = layer(&e, L);
    }
    return rc;
}

/* ---- transformers names (spec §4.7) -------------------------------------------------------- */

typedef struct {
    const char *from, *to;
} rename_t;

/* Prefix rewrites of the part after "layers.L."; the first matching entry wins. */
static const rename_t layer_renames[] = {
    {"attn_norm.", "input_layernorm."},
    {"ffn_norm.", "post_attention_layernorm."},
    {"hc_attn_fn", "attn_hc.fn"},
    {"hc_attn_base", "attn_hc.base"},
    {"hc_attn_scale", "attn_hc.scale"},
    {"hc_ffn_fn", "ffn_hc.fn"},
    {"hc_ffn_base", "ffn_hc.base"},
    {"hc_ffn_scale", "ffn_hc.scale"},
    {"attn.indexer.compressor.wkv.", "self_attn.compressor.indexer.kv_proj."},
    {"attn.indexer.compressor.wgate.", "self_attn.compressor.indexer.gate_proj."},
    {"attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"},
    {"attn.indexer.compressor.norm.", "self_attn.compressor.indexer.kv_norm."},
    {"attn.indexer.wq_b.", "self_attn.compressor.indexer.q_b_proj."},
    {"attn.indexer.weights_proj.", "self_attn.compressor.indexer.scorer.weights_proj."},
    {"attn.compressor.wkv.", "self_attn.compressor.kv_proj."},
    {"attn.compressor.wgate.", "self_attn.compressor.gate_proj."},
    {"attn.compressor.ape", "self_attn.compressor.position_bias"},
    {"attn.compressor.norm.", "self_attn.compressor.kv_norm."},
    {"attn.wq_a.", "self_attn.q_a_proj."},
    {"attn.q_norm.", "self_attn.q_a_norm."},
    {"attn.wq_b.", "self_attn.q_b_proj."},
    {"attn.wkv.", "self_attn.kv_proj."},
    {"attn.kv_norm.", "self_attn.kv_norm."},
    {"attn.wo_a.", "self_attn.o_a_proj."},
    {"attn.wo_b.", "self_attn.o_b_proj."},
    {"attn.attn_sink", "self_attn.sinks"},
    {"ffn.gate.weight", "mlp.gate.weight"},
    {"ffn.gate.bias", "mlp.gate.e_score_correction_bias"},
    {"ffn.gate.tid2eid", "mlp.gate.tid2eid"},
    {"ffn.shared_experts.w1.", "mlp.shared_experts.gate_proj."},
    {"ffn.shared_experts.w2.", "mlp.shared_experts.down_proj."},
    {"ffn.shared_experts.w3.", "mlp.shared_experts.up_proj."},
};

static const rename_t global_renames[] = {
    {"embed.weight", "model.embed_tokens.weight"}, {"head.weight", "lm_head.weight"},
    {"norm.weight", "model.norm.weight"},          {"hc_head_fn", "model.hc_head.hc_fn"},
    {"hc_head_base", "model.hc_head.hc_base"},     {"hc_head_scale", "model.hc_head.hc_scale"},
};

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

/* "…w1.weight" style expert name -> expert id and which (1, 2, 3); 0 if not an expert name. */
static int parse_expert(const char *rest, int *expert, int *which, const char **suffix) {
    int x, w, n = 0;
    if (sscanf(rest, "ffn.experts.%d.w%d%n", &x, &w, &n) != 2 || n == 0) return 0;
    if (w < 1 || w > 3 || x < 0 || rest[n] != '.') return 0;
    *expert = x;
    *which = w;
    *suffix = rest + n + 1;
    return 1;
}

int ck_hf_name(const dv4_config *c, const char *name, char *out, size_t outlen, int *expert,
               int64_t *row0) {
    *expert = -1;
    *row0 = -1;
    for (size_t i = 0; i < sizeof global_renames / sizeof *global_renames; i++)
        if (!strcmp(name, global_renames[i].from)) {
            snprintf(out, outlen, "%s", global_renames[i].to);
            return 0;
        }
    int L, n = 0;
    if (sscanf(name, "layers.%d.%n", &L, &n) != 1 || n == 0) return DUET_ENOTFOUND;
    const char *rest = name + n;
    int x, w;
    const char *suf;
    char tail[64] = "";
    if (parse_expert(rest, &x, &w, &suf)) {
        if (!strcmp(suf, "scale")) snprintf(tail, sizeof tail, "_scale_inv");
        else if (strcmp(suf, "weight")) return DUET_ENOTFOUND;
        snprintf(out, outlen, "model.layers.%d.mlp.experts.%s%s", L,
                 w == 2 ? "down_proj" : "gate_up_proj", tail);
        *expert = x;
        *row0 = w == 3 ? c->moe_intermediate_size : 0;
        return 0;
    }
    for (size_t i = 0; i < sizeof layer_renames / sizeof *layer_renames; i++) {
        size_t fl = strlen(layer_renames[i].from);
        if (strncmp(rest, layer_renames[i].from, fl)) continue;
        const char *r = rest + fl;
        if (ends_with(r, "scale") && !strcmp(r, "scale"))
            snprintf(out, outlen, "model.layers.%d.%sweight_scale_inv", L, layer_renames[i].to);
        else
            snprintf(out, outlen, "model.layers.%d.%s%s", L, layer_renames[i].to, r);
        return 0;
    }
    return DUET_ENOTFOUND;
}

/* ---- typed access ------------------------------------------------------------------------- */

static void fmt_shape(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

/* "x.weight" -> "x.scale" (official) or "x.weight_scale_inv" (hf) into out. */
static void scale_name(const char *wname, int hf, char *out, size_t n) {
    size_t l = strlen(wname);
    if (ends_with(wname, ".weight")) l -= 7;
    snprintf(out, n, "%.*s%s", (int)l, wname, hf ? ".weight_scale_inv" : ".scale");
}

static int is_expert_name(const char *name) {
    int x, w;
    const char *suf;
    const char *p = strstr(name, "ffn.experts.");
    return p && parse_expert(p, &x, &w, &suf);
}

/* Checks scale tensor sc (2-D [srows, scols], or stacked 3-D [E, R, scols] holding rows
 * [srow0, srow0 + srows)) and points w's scale fields at its rows. */
static int attach_scale(ck_weight *w, const st_tensor *t, const st_tensor *sc, int64_t srows,
                        int64_t scols, int64_t srow0, char *err, size_t errlen) {
    char got[96], want[96];
    if (!sc)
        return duet_err(err, errlen, DUET_ENOTFOUND, "tensor %s: its scale tensor is missing",
                        t->name);
    if (sc->dtype != ST_F8_E8M0)
        return duet_err(err, errlen, DUET_EFORMAT, "tensor %s: expected dtype F8_E8M0, found %s",
                        sc->name, st_dtype_name(sc->dtype));
    int ok;
    if (sc->ndim == 2) ok = srow0 == 0 && sc->shape[0] == srows && sc->shape[1] == scols;
    else ok = sc->ndim == 3 && sc->shape[2] == scols &&
              srow0 + srows <= sc->shape[0] * sc->shape[1];
    if (!ok) {
        int64_t exp[2] = {srows, scols};
        fmt_shape(want, sizeof want, 2, exp);
        fmt_shape(got, sizeof got, sc->ndim, sc->shape);
        return duet_err(err, errlen, DUET_EFORMAT, "tensor %s: expected shape %s, found %s",
                        sc->name, want, got);
    }
    w->scale = (const uint8_t *)sc->data + srow0 * scols;
    w->scale_cols = scols;
    return 0;
}

/* Fills w from tensor t (rows [r0, r0+rows) of a stacked 3-D tensor when r0 >= 0). */
static int view_tensor(const dv4_config *c, const st_set *s, const st_tensor *t, const char *sname,
                       int fp4_hint, int64_t r0, int64_t rows, ck_weight *w, char *err,
                       size_t errlen) {
    memset(w, 0, sizeof *w);
    w->dtype = t->dtype;
    w->block_n = c->weight_block_n;
    w->block_k = c->weight_block_k;
    int64_t R, C;
    if (t->ndim == 3 && r0 >= 0) { R = rows; C = t->shape[2]; }
    else if (t->ndim == 2) { R = t->shape[0]; C = t->shape[1]; r0 = 0; }
    else if (t->ndim == 1) { R = 1; C = t->shape[0]; r0 = 0; }
    else return duet_err(err, errlen, DUET_EFORMAT, "tensor %s has unsupported rank %d",
                         t->name, t->ndim);
    const st_tensor *sc = st_find(s, sname);
    int64_t esz = (int64_t)st_dtype_size(t->dtype);
    if (t->dtype == ST_F8_E4M3) {
        w->kind = CK_FP8_WEIGHT;
        if (r0 % w->block_n)
            return duet_err(err, errlen, DUET_EFORMAT,
                            "tensor %s: stacked FP8 slice is not aligned to scale blocks", t->name);
        int rc = attach_scale(w, t, sc, cdiv(R, w->block_n), cdiv(C, w->block_k), r0 / w->block_n,
                              err, errlen);
        if (rc) return rc;
    } else if ((t->dtype == ST_I8 || t->dtype == ST_U8) && fp4_hint) {
        w->kind = CK_FP4_WEIGHT;
        C *= 2;
        w->block_n = 1;
        w->block_k = c->fp4_block;
        esz = 1;
        int rc = attach_scale(w, t, sc, R, C / c->fp4_block, r0, err, errlen);
        if (rc) return rc;
        w->data = (const uint8_t *)t->data + r0 * (C / 2);
        w->rows = R;
        w->cols = C;
        return 0;
    } else {
        w->kind = CK_PLAIN;
    }
    w->data = (const uint8_t *)t->data + r0 * C * esz;
    w->rows = R;
    w->cols = C;
    return 0;
}

static int get_hf(const dv4_config *c, const st_set *s, const char *name, ck_weight *out,
                  char *err, size_t errlen) {
    char hf[200], sn[220];
    int expert;
    int64_t row0;
    if (ck_hf_name(c, name, hf, sizeof hf, &expert, &row0))
        return duet_err(err, errlen, DUET_ENOTFOUND, "tensor %s: missing", name);
    const st_tensor *t = st_find(s, hf);
    if (!t)
        return duet_err(err, errlen, DUET_ENOTFOUND, "tensor %s: missing (also looked for %s)",
                        name, hf);
    if (expert < 0) scale_name(hf, 1, sn, sizeof sn);
    else snprintf(sn, sizeof sn, "%s_scale_inv", hf);
    if (expert < 0) return view_tensor(c, s, t, sn, is_expert_name(name), -1, 0, out, err, errlen);
    /* stacked: [E, 2I, D] gate_up or [E, D, I] down; slice rows of expert `expert` */
    int down = strstr(hf, "down_proj") != NULL;
    int64_t I = c->moe_intermediate_size, D = c->hidden_size;
    int64_t per = down ? D : 2 * I, rows = down ? D : I;
    if (t->ndim != 3 || t->shape[0] <= expert || t->shape[1] != per)
        return duet_err(err, errlen, DUET_EFORMAT,
                        "tensor %s: expected a stacked [%d, %lld, …] tensor for expert %d", hf,
                        c->n_routed_experts, (long long)per, expert);
    return view_tensor(c, s, t, sn, 1, (int64_t)expert * per + row0, rows, out, err, errlen);
}

int ck_get(const dv4_config *c, const st_set *s, const char *name, ck_weight *out, char *err,
           size_t errlen) {
    const st_tensor *t = st_find(s, name);
    if (!t) return get_hf(c, s, name, out, err, errlen);
    char sn[200];
    scale_name(name, 0, sn, sizeof sn);
    return view_tensor(c, s, t, sn, is_expert_name(name), -1, 0, out, err, errlen);
}

static float rd_f32(const uint8_t *p) {
    float f;
    memcpy(&f, p, 4);
    return f;
}

static float half_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023, u;
    if (e == 31) u = s | 0x7F800000u | (m << 13);
    else if (e) u = s | ((e + 112) << 23) | (m << 13);
    else {
        float v = (float)m * (1.0f / 16777216.0f); /* m * 2^-24, exact */
        return s ? -v : v;
    }
    return rd_f32((const uint8_t *)&u);
}

void ck_row_f32(const ck_weight *w, int64_t n, float *out) {
    if (w->kind == CK_FP8_WEIGHT) {
        const uint8_t *srow = w->scale + (n / w->block_n) * w->scale_cols;
        fmt_dequant_fp8_row((const uint8_t *)w->data + n * w->cols, srow, w->cols, 0, 1, w->block_k,
                            out);
        return;
    }
    if (w->kind == CK_FP4_WEIGHT) {
        fmt_dequant_fp4_row(w->data, w->scale, w->cols, n, w->block_k, out);
        return;
    }
    size_t esz = st_dtype_size(w->dtype);
    const uint8_t *p = (const uint8_t *)w->data + (size_t)n * (size_t)w->cols * esz;
    for (int64_t k = 0; k < w->cols; k++, p += esz) {
        uint16_t h;
        int64_t i;
        int32_t i32;
        switch (w->dtype) {
        case ST_F32: out[k] = rd_f32(p); break;
        case ST_BF16: memcpy(&h, p, 2); out[k] = fmt_bf16_to_f32(h); break;
        case ST_F16: memcpy(&h, p, 2); out[k] = half_to_f32(h); break;
        case ST_I64: memcpy(&i, p, 8); out[k] = (float)i; break;
        case ST_I32: memcpy(&i32, p, 4); out[k] = (float)i32; break;
        case ST_F8_E4M3: out[k] = fmt_e4m3_to_f32(*p); break;
        case ST_I8: out[k] = (float)(int8_t)*p; break;
        default: out[k] = (float)*p; break;
        }
    }
}

/* ---- validation --------------------------------------------------------------------------- */

typedef struct {
    const dv4_config *c;
    const st_set *s;
    char *err;
    size_t errlen;
} vctx;

static int check_exact(const ck_spec *sp, const st_tensor *t, char *err, size_t errlen) {
    char want[96], got[96];
    if (t->dtype != sp->dtype)
        return duet_err(err, errlen, DUET_EFORMAT, "tensor %s: expected dtype %s, found %s",
                        sp->name, st_dtype_name(sp->dtype), st_dtype_name(t->dtype));
    int same = t->ndim == sp->ndim;
    for (int i = 0; same && i < sp->ndim; i++) same = t->shape[i] == sp->shape[i];
    if (same) return 0;
    fmt_shape(want, sizeof want, sp->ndim, sp->shape);
    fmt_shape(got, sizeof got, t->ndim, t->shape);
    return duet_err(err, errlen, DUET_EFORMAT, "tensor %s: expected shape %s, found %s", sp->name,
                    want, got);
}

/* A weight found under its transformers name: logical shape and storage must fit the spec. */
static int check_hf(const ck_spec *sp, const ck_weight *w, char *err, size_t errlen) {
    int64_t R = sp->ndim == 1 ? 1 : sp->shape[0];
    int64_t C = sp->ndim == 1 ? sp->shape[0] : sp->shape[1];
    if (sp->kind == CK_FP4_WEIGHT) C *= 2;
    int fl = w->dtype == ST_F32 || w->dtype == ST_BF16 || w->dtype == ST_F16;
    int ok_dtype = sp->dtype == ST_I64 ? (w->dtype == ST_I64 || w->dtype == ST_I32)
                                       : (w->kind == CK_PLAIN ? fl : w->kind == sp->kind);
    if (!ok_dtype)
        return duet_err(err, errlen, DUET_EFORMAT,
                        "tensor %s (transformers name): storage %s does not fit expected %s",
                        sp->name, st_dtype_name(w->dtype), st_dtype_name(sp->dtype));
    if (w->rows != R || w->cols != C)
        return duet_err(err, errlen, DUET_EFORMAT,
                        "tensor %s (transformers name): expected %lld x %lld values, found %lld x "
                        "%lld", sp->name, (long long)R, (long long)C, (long long)w->rows,
                        (long long)w->cols);
    return 0;
}

static int validate_one(const ck_spec *sp, void *ctx) {
    vctx *v = ctx;
    const st_tensor *t = st_find(v->s, sp->name);
    if (t) return check_exact(sp, t, v->err, v->errlen);
    if (sp->kind == CK_FP8_SCALE || sp->kind == CK_FP4_SCALE) {
        char wn[170];
        snprintf(wn, sizeof wn, "%.*sweight", (int)(strlen(sp->name) - 5), sp->name);
        if (st_find(v->s, wn))
            return duet_err(v->err, v->errlen, DUET_ENOTFOUND, "tensor %s: missing", sp->name);
        return 0; /* transformers layout: checked together with its weight */
    }
    ck_weight w;
    int rc = get_hf(v->c, v->s, sp->name, &w, v->err, v->errlen);
    return rc ? rc : check_hf(sp, &w, v->err, v->errlen);
}

int ck_validate(const dv4_config *c, const st_set *s, char *err, size_t errlen) {
    vctx v = {c, s, err, errlen};
    return ck_foreach(c, validate_one, &v);
}

/* ---- fingerprint -------------------------------------------------------------------------- */

typedef struct {
    const dv4_config *c;
    const st_set *s;
    uint64_t h;
} fctx;

static void fnv(uint64_t *h, const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) *h = (*h ^ b[i]) * 1099511628211ull;
}

static int fp_one(const ck_spec *sp, void *ctx) {
    fctx *f = ctx;
    char hf[200];
    int e;
    int64_t r0;
    fnv(&f->h, sp->name, strlen(sp->name) + 1);
    const st_tensor *t = st_find(f->s, sp->name);
    if (!t && !ck_hf_name(f->c, sp->name, hf, sizeof hf, &e, &r0)) t = st_find(f->s, hf);
    if (!t) return 0;
    int32_t dt = (int32_t)t->dtype, nd = t->ndim;
    fnv(&f->h, &dt, 4);
    fnv(&f->h, &nd, 4);
    fnv(&f->h, t->shape, (size_t)nd * sizeof t->shape[0]);
    return 0;
}

uint64_t ck_fingerprint(const dv4_config *c, const st_set *s) {
    fctx f = {c, s, 1469598103934665603ull};
    char buf[2048];
    int n = snprintf(buf, sizeof buf,
                     "%d %d %d %d %d %d %d %d %d %d %d %.17g %.17g %d %.17g %d %.17g %.17g %d %d %d "
                     "%d %d %d %.17g %.17g %d %d %d %d %d %.17g %d %.17g %d %d %d %d %d %d %d %d",
                     c->vocab_size, c->hidden_size, c->num_hidden_layers, c->num_attention_heads,
                     c->num_key_value_heads, c->head_dim, c->qk_rope_head_dim, c->q_lora_rank,
                     c->o_groups, c->o_lora_rank, c->sliding_window, c->rope_theta,
                     c->compress_rope_theta, c->has_yarn, c->yarn_factor, c->yarn_original_max_pos,
                     c->yarn_beta_fast, c->yarn_beta_slow, c->max_position_embeddings,
                     c->index_n_heads, c->index_head_dim, c->index_topk, c->hc_mult,
                     c->hc_sinkhorn_iters, c->hc_eps, c->rms_norm_eps, c->n_routed_experts,
                     c->num_experts_per_tok, c->n_shared_experts, c->moe_intermediate_size,
                     c->norm_topk_prob, c->routed_scaling_factor, c->num_hash_layers,
                     c->swiglu_limit, c->num_nextn_predict_layers, c->tie_word_embeddings,
                     c->expert_fp4, c->quant_fp8, c->weight_block_n, c->weight_block_k,
                     c->dspark_block_size, c->dspark_markov_rank);
    fnv(&f.h, buf, (size_t)n);
    fnv(&f.h, c->compress_ratios, (size_t)c->n_compress_ratios * sizeof(int));
    ck_foreach(c, fp_one, &f);
    return f.h;
}
