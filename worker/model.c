/* model.c — loading a DeepSeek-V4 checkpoint onto a backend, and per-sequence state.
 *
 * Why: the forward pass (forward.c) should read like the spec; everything about where weights
 * come from (official or transformers names, FP8/FP4/BF16 storage) and how sequence state is
 * laid out lives here. Validation happens before any weight reaches the backend, so a corrupt
 * or mismatched checkpoint is refused with a sentence naming the tensor.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/ckpt.h"
#include "common/err.h"
#include "worker/model_internal.h"

/* ======================================================================================== */
/* RoPE frequency tables (spec §1.4)                                                         */
/* ======================================================================================== */

static void rope_main(float *omega, int dr, double theta) {
    for (int i = 0; i < dr / 2; i++) omega[i] = (float)pow(theta, -2.0 * i / dr);
}

static double yarn_dim(int dr, double orig, double base, double r) {
    return dr * log(orig / (2.0 * M_PI * r)) / (2.0 * log(base));
}

static void rope_compress(float *omega, const dv4_config *c) {
    int dr = c->qk_rope_head_dim;
    double base = c->compress_rope_theta;
    if (!c->has_yarn) {
        rope_main(omega, dr, base);
        return;
    }
    double lo = floor(yarn_dim(dr, c->yarn_original_max_pos, base, c->yarn_beta_fast));
    double hi = ceil(yarn_dim(dr, c->yarn_original_max_pos, base, c->yarn_beta_slow));
    if (lo < 0) lo = 0;
    if (hi > dr - 1) hi = dr - 1;
    if (hi == lo) hi += 0.001;
    for (int i = 0; i < dr / 2; i++) {
        double f = pow(base, -2.0 * i / dr);
        double ramp = (i - lo) / (hi - lo);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        omega[i] = (float)(f * (1 - ramp) + f / c->yarn_factor * ramp);
    }
}

void dv4_rope_tables(const dv4_config *c, float *omega_main, float *omega_cmp) {
    rope_main(omega_main, c->qk_rope_head_dim, c->rope_theta);
    rope_compress(omega_cmp, c);
}

/* ======================================================================================== */
/* weights                                                                                  */
/* ======================================================================================== */

typedef struct {
    dv4_model *m;
    char *err;
    size_t errlen;
    int rc;
} ld;

static be_weight *W(ld *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static float *V(ld *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int get(ld *l, const char *name, ck_weight *w) {
    if (l->rc) return l->rc;
    l->rc = ck_get(&l->m->cfg, l->m->st, name, w, l->err, l->errlen);
    return l->rc;
}

/* bytes of checkpoint storage behind an nr × nc slice of w (scales included) */
static uint64_t slice_bytes(const ck_weight *w, int64_t nr, int64_t nc) {
    double e = (double)nr * (double)nc;
    switch (w->kind) {
    case CK_FP8_WEIGHT: return (uint64_t)(e + e / (128.0 * 128.0));
    case CK_FP4_WEIGHT: return (uint64_t)(e / 2 + e / 32);
    default: return (uint64_t)(e * st_dtype_size(w->dtype));
    }
}

/* Looks up the weight named by fmt/ap (official name; ck_get also tries transformers names). */
static int vget(ld *l, ck_weight *w, const char *fmt, va_list ap) {
    char name[200];
    vsnprintf(name, sizeof name, fmt, ap);
    return get(l, name, w);
}

/* rows [r0, r0+nr) x cols [c0, c0+nc) of a named weight; nr/nc < 0 = all */
static be_weight *vws(ld *l, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const char *fmt,
                      va_list ap) {
    ck_weight w;
    if (vget(l, &w, fmt, ap)) return NULL;
    if (nr < 0) nr = w.rows;
    if (nc < 0) nc = w.cols;
    l->m->rank_bytes += slice_bytes(&w, nr, nc);
    return l->m->b->ops->weight_slice(l->m->b, &w, r0, nr, c0, nc);
}

static be_weight *WS(ld *l, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static be_weight *WS(ld *l, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    be_weight *w = vws(l, r0, nr, c0, nc, fmt, ap);
    va_end(ap);
    return w;
}

static be_weight *W(ld *l, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    be_weight *w = vws(l, 0, -1, 0, -1, fmt, ap);
    va_end(ap);
    return w;
}

static float *V(ld *l, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    ck_weight w;
    int rc = vget(l, &w, fmt, ap);
    va_end(ap);
    if (rc) return NULL;
    l->m->rank_bytes += slice_bytes(&w, w.rows, w.cols);
    return l->m->b->ops->vector(l->m->b, &w);
}

static void load_layer(ld *l, int i) {
    dv4_model *m = l->m;
    const dv4_config *c = &m->cfg;
    dv4_layer *L = &m->layers[i];
    L->ratio = cfg_ratio(c, i);
    L->omega = L->ratio ? m->omega_cmp : m->omega_main;
    const char *p = "layers";
    L->hc_attn_fn = V(l, "%s.%d.hc_attn_fn", p, i);
    L->hc_attn_base = V(l, "%s.%d.hc_attn_base", p, i);
    L->hc_attn_scale = V(l, "%s.%d.hc_attn_scale", p, i);
    L->hc_ffn_fn = V(l, "%s.%d.hc_ffn_fn", p, i);
    L->hc_ffn_base = V(l, "%s.%d.hc_ffn_base", p, i);
    L->hc_ffn_scale = V(l, "%s.%d.hc_ffn_scale", p, i);
    L->attn_norm = V(l, "%s.%d.attn_norm.weight", p, i);
    L->ffn_norm = V(l, "%s.%d.ffn_norm.weight", p, i);
    L->wq_a = W(l, "%s.%d.attn.wq_a.weight", p, i);
    L->q_norm = V(l, "%s.%d.attn.q_norm.weight", p, i);
    const dv4_shard *sh = &m->shard;
    int dh = c->head_dim, Hl = c->num_attention_heads / sh->world, h0 = sh->rank * Hl;
    /* output groups of this rank's heads: whole groups when world divides o_groups, else one
     * group whose heads are spread over world/o_groups ranks (wo_a column slice) */
    int ol = c->o_lora_rank, hpg = c->num_attention_heads / c->o_groups;
    int g0 = h0 / hpg, Gl = (h0 + Hl - 1) / hpg + 1 - g0, hpl = Hl < hpg ? Hl : hpg;
    L->groups = Gl;
    L->heads_per_group = hpl;
    L->wq_b = WS(l, (int64_t)h0 * dh, (int64_t)Hl * dh, 0, -1, "%s.%d.attn.wq_b.weight", p, i);
    L->wkv = W(l, "%s.%d.attn.wkv.weight", p, i);
    L->kv_norm = V(l, "%s.%d.attn.kv_norm.weight", p, i);
    L->wo_a = WS(l, (int64_t)g0 * ol, (int64_t)Gl * ol, (int64_t)(h0 % hpg) * dh,
                 (int64_t)hpl * dh, "%s.%d.attn.wo_a.weight", p, i);
    L->wo_b = WS(l, 0, -1, (int64_t)g0 * ol, (int64_t)Gl * ol, "%s.%d.attn.wo_b.weight", p, i);
    L->sink_all = V(l, "%s.%d.attn.attn_sink", p, i);
    L->sink = L->sink_all ? L->sink_all + h0 : NULL;
    if (L->ratio) {
        L->c_wkv = W(l, "%s.%d.attn.compressor.wkv.weight", p, i);
        L->c_wgate = W(l, "%s.%d.attn.compressor.wgate.weight", p, i);
        L->c_ape = V(l, "%s.%d.attn.compressor.ape", p, i);
        L->c_norm = V(l, "%s.%d.attn.compressor.norm.weight", p, i);
    }
    if (L->ratio == 4) {
        L->i_wq_b = W(l, "%s.%d.attn.indexer.wq_b.weight", p, i);
        L->i_wproj = W(l, "%s.%d.attn.indexer.weights_proj.weight", p, i);
        L->ic_wkv = W(l, "%s.%d.attn.indexer.compressor.wkv.weight", p, i);
        L->ic_wgate = W(l, "%s.%d.attn.indexer.compressor.wgate.weight", p, i);
        L->ic_ape = V(l, "%s.%d.attn.indexer.compressor.ape", p, i);
        L->ic_norm = V(l, "%s.%d.attn.indexer.compressor.norm.weight", p, i);
    }
    /* MoE */
    int E = c->n_routed_experts, K = c->num_experts_per_tok;
    be_moe_layer *M = &L->moe;
    M->n_experts = E;
    M->top_k = K;
    M->inter = c->moe_intermediate_size;
    M->hidden = c->hidden_size;
    M->vocab = c->vocab_size;
    M->route_scale = (float)c->routed_scaling_factor;
    M->swiglu_limit = (float)c->swiglu_limit;
    M->norm_topk = c->norm_topk_prob;
    M->gate = L->gate = W(l, "%s.%d.ffn.gate.weight", p, i);
    if (cfg_is_hash_layer(c, i)) {
        ck_weight t;
        char name[200];
        snprintf(name, sizeof name, "%s.%d.ffn.gate.tid2eid", p, i);
        if (!get(l, name, &t)) {
            L->tid2eid = xmalloc((size_t)c->vocab_size * K * sizeof *L->tid2eid);
            memcpy(L->tid2eid, t.data, (size_t)c->vocab_size * K * sizeof *L->tid2eid);
            for (size_t j = 0; j < (size_t)c->vocab_size * K; j++)
                if (L->tid2eid[j] < 0 || L->tid2eid[j] >= E) {
                    l->rc = duet_err(l->err, l->errlen, DUET_EFORMAT,
                                     "tensor %s: entry %zu is expert %lld, outside [0, %d)", name,
                                     j, (long long)L->tid2eid[j], E);
                    break;
                }
        }
        M->tid2eid = L->tid2eid;
    } else {
        M->bias = L->gate_bias = V(l, "%s.%d.ffn.gate.bias", p, i);
    }
    L->experts = xcalloc((size_t)3 * E, sizeof *L->experts);
    int El = E / sh->world, e0 = sh->rank * El;
    for (int e = e0; e < e0 + El; e++) {
        L->experts[e] = W(l, "%s.%d.ffn.experts.%d.w1.weight", p, i, e);
        L->experts[E + e] = W(l, "%s.%d.ffn.experts.%d.w2.weight", p, i, e);
        L->experts[2 * E + e] = W(l, "%s.%d.ffn.experts.%d.w3.weight", p, i, e);
    }
    M->w1 = (const be_weight **)L->experts;
    M->w2 = (const be_weight **)L->experts + E;
    M->w3 = (const be_weight **)L->experts + 2 * E;
    if (c->n_shared_experts > 0) { /* intermediate split across ranks */
        int Il = c->moe_intermediate_size / sh->world, i0 = sh->rank * Il;
        M->shared_inter = Il;
        M->s1 = L->s1 = WS(l, i0, Il, 0, -1, "%s.%d.ffn.shared_experts.w1.weight", p, i);
        M->s2 = L->s2 = WS(l, 0, -1, i0, Il, "%s.%d.ffn.shared_experts.w2.weight", p, i);
        M->s3 = L->s3 = WS(l, i0, Il, 0, -1, "%s.%d.ffn.shared_experts.w3.weight", p, i);
    }
}

static int check_shard(const dv4_config *c, const dv4_shard *s, const be *b, char *err,
                       size_t errlen) {
    if (s->world < 1 || s->rank < 0 || s->rank >= s->world)
        return duet_err(err, errlen, DUET_EINVAL, "rank %d is outside world size %d", s->rank,
                        s->world);
    if (s->world > 1 && !s->comm)
        return duet_err(err, errlen, DUET_EINVAL, "world size %d needs a data plane", s->world);
    if (s->world > 1 && strcmp(b->ops->name, "cpu") != 0)
        return duet_err(err, errlen, DUET_EINVAL,
                        "world size %d on the %s backend needs a device data plane (NCCL), which "
                        "is not built yet; the TCP data plane moves host memory only",
                        s->world, b->ops->name);
    if (c->o_groups % s->world && s->world % c->o_groups)
        return duet_err(err, errlen, DUET_EINVAL,
                        "o_groups = %d and world size %d: one must divide the other", c->o_groups,
                        s->world);
    struct { const char *what; int n; } need[] = {
        {"num_attention_heads", c->num_attention_heads},
        {"n_routed_experts", c->n_routed_experts},
        {"moe_intermediate_size", c->moe_intermediate_size}};
    for (size_t i = 0; i < sizeof need / sizeof *need; i++)
        if (need[i].n % s->world)
            return duet_err(err, errlen, DUET_EINVAL,
                            "%s = %d cannot be split across %d workers; use a world size that "
                            "divides it", need[i].what, need[i].n, s->world);
    return 0;
}

int dv4_load(const char *dir, be *b, const dv4_shard *shard, dv4_model **out, char *err,
             size_t errlen) {
    return dv4_load_ex(dir, b, shard, NULL, NULL, out, err, errlen);
}

int dv4_load_ex(const char *dir, be *b, const dv4_shard *shard, dv4_progress_fn progress,
                void *ctx, dv4_model **out, char *err, size_t errlen) {
    *out = NULL;
    dv4_model *m = xcalloc(1, sizeof *m);
    m->b = b;
    m->block = 256;
    m->shard = shard ? *shard : (dv4_shard){0, 1, NULL};
    int rc = cfg_load(dir, &m->cfg, err, errlen);
    if (!rc) rc = st_open(dir, &m->st, err, errlen);
    if (!rc) rc = ck_validate(&m->cfg, m->st, err, errlen);
    if (!rc) rc = check_shard(&m->cfg, &m->shard, b, err, errlen);
    if (rc) {
        dv4_free(m);
        return rc;
    }
    const dv4_config *c = &m->cfg;
    m->omega_main = xcalloc((size_t)c->qk_rope_head_dim / 2, sizeof(float));
    m->omega_cmp = xcalloc((size_t)c->qk_rope_head_dim / 2, sizeof(float));
    dv4_rope_tables(c, m->omega_main, m->omega_cmp);
    ld l = {m, err, errlen, 0};
    m->embed = W(&l, "embed.weight");
    m->head = W(&l, "head.weight");
    m->norm = V(&l, "norm.weight");
    m->hc_head_fn = V(&l, "hc_head_fn");
    m->hc_head_base = V(&l, "hc_head_base");
    m->hc_head_scale = V(&l, "hc_head_scale");
    m->layers = xcalloc((size_t)c->num_hidden_layers, sizeof *m->layers);
    m->n_layers = c->num_hidden_layers;
    uint64_t total = st_total_bytes(m->st);
    for (int i = 0; i < c->num_hidden_layers && !l.rc; i++) {
        load_layer(&l, i);
        if (progress && !l.rc) progress(total * (uint64_t)(i + 1) / (uint64_t)c->num_hidden_layers, total, ctx);
    }
    if (l.rc) {
        dv4_free(m);
        return l.rc;
    }
    m->fingerprint = ck_fingerprint(c, m->st);
    *out = m;
    return 0;
}

static void wfree(dv4_model *m, be_weight *w) {
    if (w) m->b->ops->weight_free(m->b, w);
}
static void vfree(dv4_model *m, void *v) {
    if (v) m->b->ops->free(m->b, v);
}

void dv4_free(dv4_model *m) {
    if (!m) return;
    for (int i = 0; i < m->n_layers; i++) {
        dv4_layer *L = &m->layers[i];
        be_weight *ws[] = {L->wq_a, L->wq_b, L->wkv, L->wo_a, L->wo_b, L->c_wkv, L->c_wgate,
                           L->i_wq_b, L->i_wproj, L->ic_wkv, L->ic_wgate, L->gate, L->s1,
                           L->s2, L->s3};
        for (size_t j = 0; j < sizeof ws / sizeof *ws; j++) wfree(m, ws[j]);
        float *vs[] = {L->hc_attn_fn, L->hc_attn_base, L->hc_attn_scale, L->hc_ffn_fn,
                       L->hc_ffn_base, L->hc_ffn_scale, L->attn_norm, L->ffn_norm, L->q_norm,
                       L->kv_norm, L->sink_all, L->c_ape, L->c_norm, L->ic_ape, L->ic_norm,
                       L->gate_bias};
        for (size_t j = 0; j < sizeof vs / sizeof *vs; j++) vfree(m, vs[j]);
        if (L->experts)
            for (int e = 0; e < 3 * m->cfg.n_routed_experts; e++) wfree(m, L->experts[e]);
        free(L->experts);
        free(L->tid2eid);
    }
    free(m->layers);
    wfree(m, m->embed);
    wfree(m, m->head);
    vfree(m, m->norm);
    vfree(m, m->hc_head_fn);
    vfree(m, m->hc_head_base);
    vfree(m, m->hc_head_scale);
    free(m->omega_main);
    free(m->omega_cmp);
    st_close(m->st);
    free(m);
}

const dv4_config *dv4_cfg(const dv4_model *m) { return &m->cfg; }
uint64_t dv4_fingerprint(const dv4_model *m) { return m->fingerprint; }

/* ======================================================================================== */
/* per-sequence state (spec §3.1), growing block by block                                    */
/* ======================================================================================== */

/* Elements of one layer's state pieces. cc = 2 for the overlapping (m = 4) compressors. ring,
 * ent_per_block and ikey_per_block are KV-dtype elements; the carries are f32. */
typedef struct {
    size_t ring, cur, prev, icur, iprev; /* fixed: ring, current window (a+g), previous (a+g) */
    size_t ent_per_block, ikey_per_block; /* growing, per block of B tokens */
} layer_floats;

static layer_floats floats_of(const dv4_config *c, int ratio, int block) {
    layer_floats f = {0};
    size_t dh = (size_t)c->head_dim, ihd = (size_t)c->index_head_dim;
    f.ring = (size_t)c->sliding_window * dh;
    if (!ratio) return f;
    size_t cc = ratio == 4 ? 2 : 1;
    f.cur = 2 * (size_t)ratio * cc * dh;
    f.prev = cc == 2 ? 2 * (size_t)ratio * dh : 0;
    f.ent_per_block = (size_t)(block / ratio) * dh;
    if (ratio == 4) {
        f.icur = 2 * (size_t)4 * 2 * ihd;
        f.iprev = 2 * (size_t)4 * ihd;
        f.ikey_per_block = (size_t)(block / 4) * ihd;
    }
    return f;
}

static size_t kv_elem_bytes(dv4_kv_dtype dt) { return dt == DV4_KV_BF16 ? 2 : sizeof(float); }

static int check_block(int block, char *err, size_t errlen) {
    if (block <= 0 || block % 128)
        return duet_err(err, errlen, DUET_EINVAL,
                        "block size %d is not a positive multiple of 128 (every CSA and HCA "
                        "window must close on a block boundary)", block);
    return 0;
}

int dv4_kv_sizes_of(const dv4_config *c, int block, dv4_kv_dtype dt, dv4_kv_sizes *out,
                    char *err, size_t errlen) {
    int rc = check_block(block, err, errlen);
    if (rc) return rc;
    *out = (dv4_kv_sizes){0};
    size_t kz = kv_elem_bytes(dt), fz = sizeof(float);
    for (int i = 0; i < c->num_hidden_layers; i++) {
        layer_floats f = floats_of(c, cfg_ratio(c, i), block);
        out->block_bytes += (f.ent_per_block + f.ikey_per_block) * kz;
        out->resume_bytes += f.ring * kz + (f.prev + f.iprev) * fz;
        out->fixed_bytes += f.ring * kz + (f.cur + f.prev + f.icur + f.iprev) * fz;
    }
    return 0;
}

int dv4_set_block_size(dv4_model *m, int block, char *err, size_t errlen) {
    int rc = check_block(block, err, errlen);
    if (!rc) m->block = block;
    return rc;
}

int dv4_block_size(const dv4_model *m) { return m->block; }

int dv4_kv_dtype_parse(const char *s, dv4_kv_dtype *out, char *err, size_t errlen) {
    if (s && !strcmp(s, "f32")) *out = DV4_KV_F32;
    else if (s && !strcmp(s, "bf16")) *out = DV4_KV_BF16;
    else
        return duet_err(err, errlen, DUET_EINVAL,
                        "KV dtype '%s' is not supported; use f32 (the default) or bf16",
                        s ? s : "");
    return 0;
}

const char *dv4_kv_dtype_name(dv4_kv_dtype dt) { return dt == DV4_KV_BF16 ? "bf16" : "f32"; }

int dv4_set_kv_dtype(dv4_model *m, dv4_kv_dtype dt, char *err, size_t errlen) {
    if (dt != DV4_KV_F32 && dt != DV4_KV_BF16)
        return duet_err(err, errlen, DUET_EINVAL, "KV dtype %d is not f32 or bf16", (int)dt);
    if (dt == DV4_KV_BF16 && !m->b->ops->ring_write_bf16)
        return duet_err(err, errlen, DUET_EINVAL,
                        "the %s backend cannot store KV state in bf16; use f32",
                        m->b->ops->name);
    if (m->n_state > 0 && dt != m->kv_dtype)
        return duet_err(err, errlen, DUET_EINVAL,
                        "the KV dtype cannot change to %s while %d sequences or prefix "
                        "snapshots of this model exist; set it before the first sequence",
                        dv4_kv_dtype_name(dt), m->n_state);
    m->kv_dtype = dt;
    return 0;
}

dv4_kv_dtype dv4_get_kv_dtype(const dv4_model *m) { return m->kv_dtype; }

/* bytes of n KV-dtype elements of m */
static size_t kvb(const dv4_model *m, size_t n) { return n * kv_elem_bytes(m->kv_dtype); }

/* Backend copy of `bytes` (a multiple of 4: the op moves floats; every KV array holds an even
 * number of bf16 values). */
static void copy_bytes(be *b, void *dst, const void *src, size_t bytes) {
    if (bytes % sizeof(float)) abort();
    b->ops->copy(b, dst, src, bytes / sizeof(float));
}

int dv4_seq_new(dv4_model *m, int max_tokens, dv4_seq **out, char *err, size_t errlen) {
    const dv4_config *c = &m->cfg;
    *out = NULL;
    if (max_tokens <= 0 || max_tokens > c->max_position_embeddings)
        return duet_err(err, errlen, DUET_EINVAL,
                        "sequence length %d is outside [1, max_position_embeddings = %d]",
                        max_tokens, c->max_position_embeddings);
    be *b = m->b;
    dv4_seq *s = xcalloc(1, sizeof *s);
    s->cap = max_tokens;
    s->block = m->block;
    s->n_layers = m->n_layers;
    s->L = xcalloc((size_t)m->n_layers, sizeof *s->L);
    int dh = c->head_dim, ihd = c->index_head_dim;
    for (int i = 0; i < m->n_layers; i++) {
        dv4_seq_layer *S = &s->L[i];
        int r = m->layers[i].ratio;
        S->ring = b->ops->alloc(b, kvb(m, (size_t)c->sliding_window * dh));
        if (!r) continue;
        int cc = r == 4 ? 2 : 1;
        S->cur_a = b->ops->alloc(b, (size_t)r * cc * dh * sizeof(float));
        S->cur_g = b->ops->alloc(b, (size_t)r * cc * dh * sizeof(float));
        if (cc == 2) {
            S->prev_a = b->ops->alloc(b, (size_t)r * dh * sizeof(float));
            S->prev_g = b->ops->alloc(b, (size_t)r * dh * sizeof(float));
            b->ops->fill(b, S->prev_g, -INFINITY, (size_t)r * dh);
        }
        if (r == 4) {
            S->icur_a = b->ops->alloc(b, (size_t)4 * 2 * ihd * sizeof(float));
            S->icur_g = b->ops->alloc(b, (size_t)4 * 2 * ihd * sizeof(float));
            S->iprev_a = b->ops->alloc(b, (size_t)4 * ihd * sizeof(float));
            S->iprev_g = b->ops->alloc(b, (size_t)4 * ihd * sizeof(float));
            b->ops->fill(b, S->iprev_g, -INFINITY, (size_t)4 * ihd);
        }
    }
    m->n_state++;
    *out = s;
    return 0;
}

void dv4_seq_free(dv4_model *m, dv4_seq *s) {
    if (!s) return;
    for (int i = 0; i < s->n_layers; i++) {
        dv4_seq_layer *S = &s->L[i];
        void *bufs[] = {S->ring, S->cmp, S->cur_a, S->cur_g, S->prev_a, S->prev_g,
                        S->ikeys, S->icur_a, S->icur_g, S->iprev_a, S->iprev_g};
        for (size_t j = 0; j < sizeof bufs / sizeof *bufs; j++) vfree(m, bufs[j]);
    }
    m->n_state--;
    free(s->L);
    free(s);
}

/* *p grows from `old` to `now` bytes: backend alloc + copy + free (works on device memory). */
static void grow(be *b, void **p, size_t old, size_t now) {
    void *n = b->ops->alloc(b, now);
    if (old) copy_bytes(b, n, *p, old);
    if (*p) b->ops->free(b, *p);
    *p = n;
}

int dv4_seq_reserve(dv4_model *m, dv4_seq *s, int tokens, char *err, size_t errlen) {
    if (tokens <= s->grown) return 0;
    if (tokens > s->cap)
        return duet_err(err, errlen, DUET_EINVAL,
                        "positions up to %d exceed the sequence capacity %d", tokens, s->cap);
    int B = s->block, now = (tokens + B - 1) / B * B;
    for (int i = 0; i < s->n_layers; i++) {
        int r = m->layers[i].ratio;
        if (!r) continue;
        layer_floats f = floats_of(&m->cfg, r, B);
        size_t ob = (size_t)(s->grown / B), nb = (size_t)(now / B);
        grow(m->b, &s->L[i].cmp, kvb(m, ob * f.ent_per_block), kvb(m, nb * f.ent_per_block));
        if (r == 4)
            grow(m->b, &s->L[i].ikeys, kvb(m, ob * f.ikey_per_block),
                 kvb(m, nb * f.ikey_per_block));
    }
    s->grown = now;
    return 0;
}

uint64_t dv4_seq_grown_bytes(const dv4_model *m, const dv4_seq *s) {
    dv4_kv_sizes z;
    if (dv4_kv_sizes_of(&m->cfg, s->block, m->kv_dtype, &z, NULL, 0)) return 0;
    return (uint64_t)(s->grown / s->block) * z.block_bytes;
}

/* ---- prefix snapshots -------------------------------------------------------------------- */

typedef struct {
    void *cmp, *ikeys;                /* this block's entries [B/m, dh], keys [B/4, ihd] (KV dtype) */
    void *ring;                       /* [window, dh] (KV dtype) */
    float *prev_a, *prev_g, *iprev_a, *iprev_g; /* resume carries at the block's end (f32) */
} snap_layer;

struct dv4_snap {
    int end, block, n_layers;
    uint64_t bytes;
    snap_layer *L;
};

/* A copy of `bytes` of backend memory (NULL when there is nothing to copy). */
static void *dup_bytes(be *b, const void *src, size_t bytes, uint64_t *total) {
    if (!bytes || !src) return NULL;
    void *d = b->ops->alloc(b, bytes);
    copy_bytes(b, d, src, bytes);
    *total += bytes;
    return d;
}

int dv4_snap_save(dv4_model *m, const dv4_seq *s, dv4_snap **out, char *err, size_t errlen) {
    *out = NULL;
    int B = s->block;
    if (s->pos < B || s->pos % B)
        return duet_err(err, errlen, DUET_EINVAL,
                        "a prefix block can only be saved at a positive multiple of the block "
                        "size %d; the sequence is at position %d", B, s->pos);
    be *b = m->b;
    dv4_snap *p = xcalloc(1, sizeof *p);
    p->end = s->pos;
    p->block = B;
    p->n_layers = s->n_layers;
    p->L = xcalloc((size_t)s->n_layers, sizeof *p->L);
    const size_t fz = sizeof(float);
    for (int i = 0; i < s->n_layers; i++) {
        const dv4_seq_layer *S = &s->L[i];
        snap_layer *P = &p->L[i];
        int r = m->layers[i].ratio;
        layer_floats f = floats_of(&m->cfg, r, B);
        size_t blk = (size_t)(s->pos / B - 1);
        P->ring = dup_bytes(b, S->ring, kvb(m, f.ring), &p->bytes);
        if (!r) continue;
        P->cmp = dup_bytes(b, (const char *)S->cmp + kvb(m, blk * f.ent_per_block),
                           kvb(m, f.ent_per_block), &p->bytes);
        P->prev_a = dup_bytes(b, S->prev_a, f.prev / 2 * fz, &p->bytes);
        P->prev_g = dup_bytes(b, S->prev_g, f.prev / 2 * fz, &p->bytes);
        if (r != 4) continue;
        P->ikeys = dup_bytes(b, (const char *)S->ikeys + kvb(m, blk * f.ikey_per_block),
                             kvb(m, f.ikey_per_block), &p->bytes);
        P->iprev_a = dup_bytes(b, S->iprev_a, f.iprev / 2 * fz, &p->bytes);
        P->iprev_g = dup_bytes(b, S->iprev_g, f.iprev / 2 * fz, &p->bytes);
    }
    m->n_state++;
    *out = p;
    return 0;
}

int dv4_seq_restore(dv4_model *m, int max_tokens, dv4_snap *const *chain, int n, dv4_seq **out,
                    char *err, size_t errlen) {
    *out = NULL;
    int B = m->block;
    if (n <= 0) return duet_err(err, errlen, DUET_EINVAL, "restoring needs at least one block");
    for (int i = 0; i < n; i++)
        if (chain[i]->block != B || chain[i]->end != (i + 1) * B)
            return duet_err(err, errlen, DUET_EINVAL,
                            "prefix block %d of the chain ends at position %d (block size %d), "
                            "not at %d", i, chain[i]->end, chain[i]->block, (i + 1) * B);
    dv4_seq *s;
    int rc = dv4_seq_new(m, max_tokens, &s, err, errlen);
    if (!rc) rc = dv4_seq_reserve(m, s, n * B, err, errlen);
    if (rc) {
        dv4_seq_free(m, s);
        return rc;
    }
    be *b = m->b;
    const dv4_snap *last = chain[n - 1];
    for (int i = 0; i < s->n_layers; i++) {
        dv4_seq_layer *S = &s->L[i];
        const snap_layer *P = &last->L[i];
        int r = m->layers[i].ratio;
        layer_floats f = floats_of(&m->cfg, r, B);
        size_t eb = kvb(m, f.ent_per_block), kb = kvb(m, f.ikey_per_block);
        copy_bytes(b, S->ring, P->ring, kvb(m, f.ring));
        if (!r) continue;
        for (int k = 0; k < n; k++)
            copy_bytes(b, (char *)S->cmp + (size_t)k * eb, chain[k]->L[i].cmp, eb);
        if (P->prev_a) {
            b->ops->copy(b, S->prev_a, P->prev_a, f.prev / 2);
            b->ops->copy(b, S->prev_g, P->prev_g, f.prev / 2);
        }
        if (r != 4) continue;
        for (int k = 0; k < n; k++)
            copy_bytes(b, (char *)S->ikeys + (size_t)k * kb, chain[k]->L[i].ikeys, kb);
        b->ops->copy(b, S->iprev_a, P->iprev_a, f.iprev / 2);
        b->ops->copy(b, S->iprev_g, P->iprev_g, f.iprev / 2);
    }
    s->pos = n * B;
    *out = s;
    return 0;
}

void dv4_snap_free(dv4_model *m, dv4_snap *p) {
    if (!p) return;
    for (int i = 0; i < p->n_layers; i++) {
        snap_layer *P = &p->L[i];
        void *bufs[] = {P->cmp, P->ikeys, P->ring, P->prev_a, P->prev_g, P->iprev_a,
                        P->iprev_g};
        for (size_t j = 0; j < sizeof bufs / sizeof *bufs; j++) vfree(m, bufs[j]);
    }
    m->n_state--;
    free(p->L);
    free(p);
}

int dv4_snap_end(const dv4_snap *p) { return p->end; }
uint64_t dv4_snap_bytes(const dv4_snap *p) { return p->bytes; }

int dv4_seq_pos(const dv4_seq *s) { return s->pos; }

uint64_t dv4_rank_weight_bytes(const dv4_model *m) { return m->rank_bytes; }

void dv4_set_comm(dv4_model *m, comm *c) { m->shard.comm = c; }
