/* model.c — loading a DeepSeek-V4 checkpoint onto a backend.
 *
 * Why: the forward pass (forward.c) should read like the spec; everything about where weights
 * come from (official or transformers names, FP8/FP4/BF16 storage) lives here (sequence state:
 * kvstate.c). Validation happens before any weight reaches the backend, so a corrupt
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
    dv4_kv_pool_destroy(m);
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

uint64_t dv4_rank_weight_bytes(const dv4_model *m) { return m->rank_bytes; }

void dv4_set_comm(dv4_model *m, comm *c) { m->shard.comm = c; }
