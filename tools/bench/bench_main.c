/* duet-bench — decode and prefill throughput of the CUDA backend on synthetic weights with the
 * real DeepSeek-V4-Flash shapes, beside the ceilings measured in the same run.
 *
 * Why: speed claims need a CSV and the command that made it. No checkpoint is read: every weight
 * is generated on the GPU in its stored format (FP8 e4m3 + 128x128 e8m0 scales for dense
 * weights, packed FP4 + per-32 scales for routed experts, BF16 where the checkpoint has BF16),
 * for the first N layers of the real schedule (layers 0-1 SWA + hash routing, 2 CSA + hash,
 * then HCA/CSA alternating), with as many layers as fit by default. Each step runs the op
 * sequence of worker/forward.c (same ops, same order, same per-chunk calls) through the backend
 * interface; sequence state (rings, compressed entries, indexer keys) is random, standing for a
 * context of --ctx tokens. Reported: decode tokens/s at several batch sizes, prefill tokens/s
 * for several prompt lengths, the batch-1 roofline (weight bytes read per token / measured copy
 * bandwidth) and the ratio, and a per-op time breakdown (each op timed between two syncs, so
 * without graphs). --graphs 1: decode steps as CUDA graphs (the engine's DUET_CUDA_GRAPH=1).
 * --kv bf16: rings, compressed entries and indexer keys stored as bf16; --kv fp8: rings and
 * entries as FP8 rows, keys bf16 (duet-worker --kv-dtype).
 * Must never be mistaken for the engine: it mirrors forward.c and must be kept in step with it.
 *
 * usage: duet-bench [--layers N] [--ctx L] [--batches 1,8,...] [--prefill 1024,...] [--steps S]
 *                   [--mem-fraction F] [--csv PATH] [--breakdown PATH] [--max-seconds S]
 *                   [--graphs 0|1]  (default 0, as the engine) [--kv f32|bf16|fp8] (default f32)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/err.h"
#include "kernels/be_cuda.h"
#include "kernels/peak.h"
#include "worker/model.h"

/* ---- V4-Flash shapes (spec §1) ------------------------------------------------------------ */
enum {
    VOCAB = 129280, D = 4096, H = 64, DH = 512, DR = 64, QL = 1024, G = 8, OL = 1024, W = 128,
    NI = 64, IHD = 128, TOPK = 512, HC = 4, E = 256, KTOP = 6, I = 2048, ITERS = 20
};
static const float EPS = 1e-6f;

static be *B;
static int bd_on;                 /* per-op breakdown: sync around every op */
typedef struct { const char *name; double s, flops; long n; } bd_row;
static bd_row bd[64];
static int n_bd;
static double cur_flops;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
static void sync_or_die(void) {
    char err[256];
    if (be_cuda_sync(B, err, sizeof err)) {
        fprintf(stderr, "duet-bench: %s\n", err);
        exit(1);
    }
}
static double tsync(void) {
    sync_or_die();
    return now();
}
static void bd_add(const char *name, double s) {
    int i = 0;
    while (i < n_bd && strcmp(bd[i].name, name)) i++;
    if (i == n_bd) bd[n_bd++] = (bd_row){name, 0, 0, 0};
    bd[i].s += s;
    bd[i].flops += cur_flops;
    bd[i].n++;
}
#define OP(name, call)                                                                            \
    do {                                                                                          \
        double t0_ = bd_on ? tsync() : 0;                                                         \
        call;                                                                                     \
        if (bd_on) bd_add(name, tsync() - t0_);                                                   \
        cur_flops = 0;                                                                            \
    } while (0)
#define MM(name, W_, row0, N, x, ldx, y, ldy, T)                                                  \
    do {                                                                                          \
        cur_flops = bd_on ? 2.0 * (double)(T) * (N) * be_weight_cols(W_) : 0;                    \
        OP(name, B->ops->matmul(B, W_, row0, N, x, ldx, y, ldy, T));                              \
    } while (0)

/* logical K of every weight (for FLOP counts): open-addressing map pointer -> cols */
enum { WMAP = 1 << 17 };
static const be_weight *g_w[WMAP];
static int64_t g_cols[WMAP];
static size_t wslot(const be_weight *w) {
    size_t h = ((uintptr_t)w >> 4) * 0x9E3779B97F4A7C15ull >> 47;
    while (g_w[h & (WMAP - 1)] && g_w[h & (WMAP - 1)] != w) h++;
    return h & (WMAP - 1);
}
static double be_weight_cols(const be_weight *w) {
    size_t i = wslot(w);
    return g_w[i] ? (double)g_cols[i] : 0;
}

static uint64_t seed_ctr = 1;
static be_weight *wrand(ck_kind kind, st_dtype dt, int64_t rows, int64_t cols) {
    be_weight *w = be_cuda_weight_random(B, kind, dt, rows, cols, seed_ctr++);
    size_t i = wslot(w);
    g_w[i] = w;
    g_cols[i] = cols;
    return w;
}
static be_weight *fp8(int64_t r, int64_t c) { return wrand(CK_FP8_WEIGHT, ST_F8_E4M3, r, c); }
static be_weight *bf16(int64_t r, int64_t c) { return wrand(CK_PLAIN, ST_BF16, r, c); }
static be_weight *fp4(int64_t r, int64_t c) { return wrand(CK_FP4_WEIGHT, ST_I8, r, c); }
static float *vrand(size_t n, float lo, float hi) { return be_cuda_vector_random(B, n, lo, hi, seed_ctr++); }

/* ---- weights ------------------------------------------------------------------------------- */

typedef struct {
    int ratio;
    float *omega;               /* host */
    float *hc_attn_fn, *hc_attn_base, *hc_attn_scale, *hc_ffn_fn, *hc_ffn_base, *hc_ffn_scale;
    float *attn_norm, *ffn_norm, *q_norm, *kv_norm, *sink;
    be_weight *wq_a, *wq_b, *wkv, *wo_a, *wo_b;
    be_weight *c_wkv, *c_wgate, *i_wq_b, *i_wproj, *ic_wkv, *ic_wgate;
    float *c_ape, *c_norm, *ic_ape, *ic_norm;
    be_moe_layer moe;
    be_weight *ex[3 * E];
    double dense_bytes, expert_bytes; /* device bytes: dense (read every token), one expert */
} blayer;

static float omega_main[DR / 2], omega_cmp[DR / 2];
static int64_t *tid2eid;

static double wb(const be_weight *w) { return (double)be_cuda_weight_bytes(w); }

static void layer_make(blayer *L, int i) {
    memset(L, 0, sizeof *L);
    L->ratio = i < 2 ? 0 : (i % 2 == 0 ? 4 : 128);
    L->omega = L->ratio ? omega_cmp : omega_main;
    int nmix = (2 + HC) * HC;
    L->hc_attn_fn = vrand((size_t)nmix * HC * D, -0.01f, 0.01f);
    L->hc_ffn_fn = vrand((size_t)nmix * HC * D, -0.01f, 0.01f);
    L->hc_attn_base = vrand((size_t)nmix, -0.5f, 0.5f);
    L->hc_ffn_base = vrand((size_t)nmix, -0.5f, 0.5f);
    L->hc_attn_scale = vrand(3, 0.5f, 1.5f);
    L->hc_ffn_scale = vrand(3, 0.5f, 1.5f);
    L->attn_norm = vrand(D, 0.5f, 1.5f);
    L->ffn_norm = vrand(D, 0.5f, 1.5f);
    L->q_norm = vrand(QL, 0.5f, 1.5f);
    L->kv_norm = vrand(DH, 0.5f, 1.5f);
    L->sink = vrand(H, -1, 1);
    L->wq_a = fp8(QL, D);
    L->wq_b = fp8((int64_t)H * DH, QL);
    L->wkv = fp8(DH, D);
    L->wo_a = fp8((int64_t)G * OL, (int64_t)H / G * DH);
    L->wo_b = fp8(D, (int64_t)G * OL);
    double dense = wb(L->wq_a) + wb(L->wq_b) + wb(L->wkv) + wb(L->wo_a) + wb(L->wo_b);
    if (L->ratio) {
        int cc = L->ratio == 4 ? 2 : 1;
        L->c_wkv = bf16((int64_t)cc * DH, D);
        L->c_wgate = bf16((int64_t)cc * DH, D);
        L->c_ape = vrand((size_t)L->ratio * cc * DH, -0.1f, 0.1f);
        L->c_norm = vrand(DH, 0.5f, 1.5f);
        dense += wb(L->c_wkv) + wb(L->c_wgate);
    }
    if (L->ratio == 4) {
        L->i_wq_b = fp8((int64_t)NI * IHD, QL);
        L->i_wproj = bf16(NI, D);
        L->ic_wkv = bf16(2 * IHD, D);
        L->ic_wgate = bf16(2 * IHD, D);
        L->ic_ape = vrand((size_t)4 * 2 * IHD, -0.1f, 0.1f);
        L->ic_norm = vrand(IHD, 0.5f, 1.5f);
        dense += wb(L->i_wq_b) + wb(L->i_wproj) + wb(L->ic_wkv) + wb(L->ic_wgate);
    }
    be_moe_layer *M = &L->moe;
    M->n_experts = E;
    M->top_k = KTOP;
    M->inter = I;
    M->hidden = D;
    M->vocab = VOCAB;
    M->route_scale = 1.5f;
    M->swiglu_limit = 10.0f;
    M->norm_topk = 1;
    M->gate = bf16(E, D);
    if (i < 3) M->tid2eid = tid2eid;
    else M->bias = vrand(E, -0.01f, 0.01f);
    for (int e = 0; e < E; e++) {
        L->ex[e] = fp4(I, D);
        L->ex[E + e] = fp4(D, I);
        L->ex[2 * E + e] = fp4(I, D);
    }
    M->w1 = (const be_weight **)L->ex;
    M->w2 = (const be_weight **)L->ex + E;
    M->w3 = (const be_weight **)L->ex + 2 * E;
    M->s1 = fp8(I, D);
    M->s2 = fp8(D, I);
    M->s3 = fp8(I, D);
    M->shared_inter = I;
    dense += wb(M->gate) + wb(M->s1) + wb(M->s2) + wb(M->s3);
    L->dense_bytes = dense;
    L->expert_bytes = wb(L->ex[0]) + wb(L->ex[E]) + wb(L->ex[2 * E]);
}

/* ---- sequence state ------------------------------------------------------------------------ */

typedef struct {
    void *ring;                 /* KV dtype (kv_fmt) */
    float *cur_a, *cur_g, *prev_a, *prev_g, *icur_a, *icur_g, *iprev_a, *iprev_g;
} sl;
/* Compressed entries and indexer keys are paged as the worker pages them (worker/kvstate.c):
 * pages of PAGE_TOKENS tokens holding every layer's entries, reached through a page table. */
typedef struct {
    int pos, cap;
    sl *L;
    void *slab;                 /* the sequence's pages, random contents */
    void **tab;                 /* [n_pages] page table (device) */
} bseq;

enum { PAGE_TOKENS = 256 };
static int n_layers;
static blayer *layers;
static int kv_fmt, ikey_fmt;     /* --kv: backend.h BE_KV_* of rings/entries and of index keys */
static be_paging *cmp_pg, *ikey_pg; /* [n_layers] each layer's place in a page */
static size_t page_bytes;

/* Each layer's place in a page, as kvstate.c lays pages out. */
static void paging_init(void) {
    size_t off = 0, rb = be_kv_row_bytes(kv_fmt, DH), ib = be_kv_row_bytes(ikey_fmt, IHD);
    cmp_pg = xcalloc((size_t)n_layers, sizeof *cmp_pg);
    ikey_pg = xcalloc((size_t)n_layers, sizeof *ikey_pg);
    for (int i = 0; i < n_layers; i++) {
        int r = layers[i].ratio;
        if (!r) continue;
        cmp_pg[i] = (be_paging){off, PAGE_TOKENS / r};
        off += (size_t)(PAGE_TOKENS / r) * rb;
        if (r != 4) continue;
        ikey_pg[i] = (be_paging){off, PAGE_TOKENS / 4};
        off += (size_t)(PAGE_TOKENS / 4) * ib;
    }
    page_bytes = off;
}

/* rows x dim random KV state in [-1, 1] in format fmt (stored by ring_write_rows) */
static void *kv_rand(int rows, int dim, int fmt) {
    float *f = vrand((size_t)rows * dim, -1, 1);
    if (fmt == BE_KV_F32) return f;
    void *h = B->ops->alloc(B, (size_t)rows * be_kv_row_bytes(fmt, dim));
    int32_t *pos = xmalloc((size_t)rows * sizeof *pos);
    void **rings = xmalloc((size_t)rows * sizeof *rings);
    for (int i = 0; i < rows; i++) pos[i] = i, rings[i] = h;
    B->ops->ring_write_rows(B, rings, rows, dim, f, pos, rows, fmt);
    sync_or_die();
    B->ops->free(B, f);
    free(pos);
    free(rings);
    return h;
}

static bseq *seq_new(int cap, int pos) {
    bseq *s = xcalloc(1, sizeof *s);
    s->cap = cap;
    s->pos = pos;
    s->L = xcalloc((size_t)n_layers, sizeof *s->L);
    int n_pages = cap / PAGE_TOKENS + 1;
    if (kv_fmt == BE_KV_FP8) { /* valid rows and keys everywhere: every byte 0x38 */
        s->slab = B->ops->alloc(B, (size_t)n_pages * page_bytes);
        uint32_t u = 0x38383838u; /* e4m3 1.0, scale 2^-71, bf16 4.4e-5: all finite */
        float v;
        memcpy(&v, &u, sizeof v);
        B->ops->fill(B, s->slab, v, (size_t)n_pages * page_bytes / 4);
    } else {
        s->slab = kv_rand((int)((size_t)n_pages * page_bytes / be_kv_row_bytes(kv_fmt, DH)), DH, kv_fmt);
    }
    void **addr = xmalloc((size_t)n_pages * sizeof *addr);
    for (int p = 0; p < n_pages; p++) addr[p] = (char *)s->slab + (size_t)p * page_bytes;
    s->tab = B->ops->alloc(B, (size_t)n_pages * sizeof *addr);
    B->ops->upload(B, s->tab, addr, (size_t)n_pages * sizeof *addr);
    free(addr);
    for (int i = 0; i < n_layers; i++) {
        sl *S = &s->L[i];
        int r = layers[i].ratio;
        S->ring = kv_rand(W, DH, kv_fmt);
        if (!r) continue;
        int cc = r == 4 ? 2 : 1;
        S->cur_a = vrand((size_t)r * cc * DH, -1, 1);
        S->cur_g = vrand((size_t)r * cc * DH, -1, 1);
        if (cc == 2) {
            S->prev_a = vrand((size_t)r * DH, -1, 1);
            S->prev_g = vrand((size_t)r * DH, -1, 1);
        }
        if (r == 4) {
            S->icur_a = vrand((size_t)4 * 2 * IHD, -1, 1);
            S->icur_g = vrand((size_t)4 * 2 * IHD, -1, 1);
            S->iprev_a = vrand((size_t)4 * IHD, -1, 1);
            S->iprev_g = vrand((size_t)4 * IHD, -1, 1);
        }
    }
    return s;
}
static void seq_free(bseq *s) {
    for (int i = 0; i < n_layers; i++) {
        sl *S = &s->L[i];
        void *p[] = {S->ring, S->cur_a, S->cur_g, S->prev_a, S->prev_g, S->icur_a, S->icur_g,
                     S->iprev_a, S->iprev_g};
        for (size_t j = 0; j < sizeof p / sizeof *p; j++)
            if (p[j]) B->ops->free(B, p[j]);
    }
    B->ops->free(B, s->slab);
    B->ops->free(B, s->tab);
    free(s->L);
    free(s);
}

/* ---- one step: the op sequence of worker/forward.c ------------------------------------------ */

typedef struct {
    int T, n;                     /* rows, chunks */
    bseq **seqs;
    int *len, *row0, *chunk_of, *n_vis;
    int32_t *ids, *pos;
    be_keyplan *plan;
    float *h, *x, *post, *comb, *cq, *q, *kv, *o, *y, *v, *ca, *cg, *iq, *iw;
    int32_t *idx;
} stp;

static float *fa(size_t n) { return B->ops->alloc(B, n * sizeof(float)); }

static void run_compressor(stp *s, int li, int indexer) {
    blayer *L = &layers[li];
    int m = indexer ? 4 : L->ratio, cc = m == 4 ? 2 : 1, d = indexer ? IHD : DH;
    be_weight *wkv = indexer ? L->ic_wkv : L->c_wkv, *wg = indexer ? L->ic_wgate : L->c_wgate;
    MM(indexer ? "indexer.compressor.matmul" : "compressor.matmul", wkv, 0, cc * d, s->x, D, s->ca, cc * d, s->T);
    MM(indexer ? "indexer.compressor.matmul" : "compressor.matmul", wg, 0, cc * d, s->x, D, s->cg, cc * d, s->T);
    for (int k = 0; k < s->n; k++) {
        sl *S = &s->seqs[k]->L[li];
        int r0 = s->row0[k];
        be_compress_args a = {
            .T = s->len[k], .m = m, .c = cc, .d = d, .rope_dims = DR, .pos = s->pos + r0,
            .a = s->ca + (size_t)r0 * cc * d, .g = s->cg + (size_t)r0 * cc * d,
            .ape = indexer ? L->ic_ape : L->c_ape,
            .norm = indexer ? L->ic_norm : L->c_norm, .eps = EPS, .omega = omega_cmp,
            .cur_a = indexer ? S->icur_a : S->cur_a, .cur_g = indexer ? S->icur_g : S->cur_g,
            .prev_a = indexer ? S->iprev_a : S->prev_a, .prev_g = indexer ? S->iprev_g : S->prev_g,
            .entries = s->seqs[k]->tab, .hadamard_fp4_qat = indexer,
            .kv_fmt = indexer ? ikey_fmt : kv_fmt,
            .paging = indexer ? ikey_pg[li] : cmp_pg[li]};
        OP(indexer ? "indexer.compress" : "compressor.compress", B->ops->compress(B, &a));
    }
}

static void run_indexer(stp *s, int li) {
    blayer *L = &layers[li];
    int T = s->T;
    run_compressor(s, li, 1);
    MM("indexer.matmul", L->i_wq_b, 0, NI * IHD, s->cq, QL, s->iq, NI * IHD, T);
    OP("rope", B->ops->rope(B, s->iq, T, NI, IHD, DR, s->pos, omega_cmp, 0));
    MM("indexer.matmul", L->i_wproj, 0, NI, s->x, D, s->iw, NI, T);
    OP("elementwise", B->ops->scale_rows(B, s->iw, T, NI, (float)(1.0 / sqrt((double)IHD * NI))));
    {
        void *const **rk = NULL; /* one call for every row, each with its own sequence's keys */
        if (s->n > 1) {
            rk = xmalloc((size_t)T * sizeof *rk);
            for (int r = 0; r < T; r++) rk[r] = s->seqs[s->chunk_of[r]]->tab;
        }
        be_index_args a = {.T = T, .n_heads = NI, .head_dim = IHD, .topk = TOPK, .q = s->iq,
                           .w = s->iw, .keys = s->seqs[0]->tab, .n_visible = s->n_vis,
                           .idx = s->idx, .kv_fmt = ikey_fmt,
                           .row_keys = (void *const *const *)rk, .paging = ikey_pg[li]};
        OP("indexer.topk", B->ops->index_topk(B, &a));
        free(rk);
    }
}

static void attention(stp *s, int li) {
    blayer *L = &layers[li];
    int T = s->T, m = L->ratio;
    MM("attn.matmul", L->wq_a, 0, QL, s->x, D, s->o, QL, T);
    OP("norm", B->ops->rmsnorm(B, s->o, L->q_norm, s->cq, T, QL, EPS));
    MM("attn.matmul", L->wq_b, 0, H * DH, s->cq, QL, s->q, H * DH, T);
    OP("norm", B->ops->head_rms(B, s->q, T * H, DH, EPS));
    OP("rope", B->ops->rope(B, s->q, T, H, DH, DR, s->pos, L->omega, 0));
    MM("attn.matmul", L->wkv, 0, DH, s->x, D, s->o, DH, T);
    OP("norm", B->ops->rmsnorm(B, s->o, L->kv_norm, s->kv, T, DH, EPS));
    OP("rope", B->ops->rope(B, s->kv, T, 1, DH, DR, s->pos, L->omega, 0));
    for (int r = 0; r < T; r++) s->n_vis[r] = m ? (s->pos[r] + 1) / m : 0;
    if (m == 4) run_indexer(s, li);
    if (m) run_compressor(s, li, 0);
    for (int r = 0; r < T; r++) {
        int k = s->chunk_of[r], r0 = s->row0[k], P = s->pos[r0], t = s->pos[r];
        sl *S = &s->seqs[k]->L[li];
        int lo = t - W + 1 > 0 ? t - W + 1 : 0;
        be_keyplan *p = &s->plan[r];
        p->ring = S->ring;
        p->ring_size = W;
        p->ring_lo = lo < P ? lo : P;
        p->ring_hi = P;
        p->row_lo = r0 + (lo > P ? lo - P : 0);
        p->row_hi = r + 1;
        p->cmp = s->seqs[k]->tab;
        p->n_cmp = s->n_vis[r];
        if (m == 4 && p->n_cmp > TOPK) p->n_cmp = TOPK;
    }
    be_attn_args a = {.T = T, .n_heads = H, .head_dim = DH, .scale = (float)(1.0 / sqrt((double)DH)),
                      .q = s->q, .kv = s->kv, .sink = L->sink, .plan = s->plan,
                      .cmp_idx = m == 4 ? s->idx : NULL, .idx_stride = TOPK, .out = s->o,
                      .kv_fmt = kv_fmt, .cmp_paging = cmp_pg[li]};
    OP("attn.core", B->ops->attention(B, &a));
    { /* as forward.c: one ring write for the step, rows a later row overwrites skipped */
        void **rings = xmalloc((size_t)T * sizeof *rings);
        for (int r = 0; r < T; r++) {
            int k = s->chunk_of[r];
            rings[r] = r - s->row0[k] >= s->len[k] - W ? s->seqs[k]->L[li].ring : NULL;
        }
        OP("attn.ring_write", B->ops->ring_write_rows(B, rings, W, DH, s->kv, s->pos, T, kv_fmt));
        free(rings);
    }
    OP("rope", B->ops->rope(B, s->o, T, H, DH, DR, s->pos, L->omega, 1));
    cur_flops = bd_on ? 2.0 * T * G * OL * (double)(H / G) * DH : 0;
    OP("attn.matmul", B->ops->matmul_xg(B, L->wo_a, G * OL, s->o, H * DH, OL, (H / G) * DH, s->y,
                                        G * OL, T));
    MM("attn.matmul", L->wo_b, 0, D, s->y, G * OL, s->v, D, T);
}

static be_weight *embed_w, *head_w;
static float *norm_w, *hc_head_fn, *hc_head_base, *hc_head_scale;

static void step_ops(stp *sp, float *logits_host);

/* Runs one step over chunks (seq k: len[k] new tokens); logits of each chunk's last row. */
static void step(bseq **seqs, const int *len, int n, float *logits_host) {
    stp s = {0};
    s.n = n;
    s.seqs = seqs;
    s.len = (int *)len;
    for (int k = 0; k < n; k++) s.T += len[k];
    int T = s.T;
    s.row0 = xmalloc((size_t)n * sizeof(int));
    s.chunk_of = xmalloc((size_t)T * sizeof(int));
    s.n_vis = xmalloc((size_t)T * sizeof(int));
    s.ids = xmalloc((size_t)T * sizeof(int32_t));
    s.pos = xmalloc((size_t)T * sizeof(int32_t));
    s.plan = xcalloc((size_t)T, sizeof *s.plan);
    for (int k = 0, r = 0; k < n; k++) {
        s.row0[k] = r;
        for (int i = 0; i < len[k]; i++, r++) {
            s.ids[r] = (int32_t)((r * 7919u + (unsigned)seqs[k]->pos * 31u) % VOCAB);
            s.pos[r] = seqs[k]->pos + i;
            s.chunk_of[r] = k;
        }
    }
    /* one pass, or a record pass and then a replay, capture or direct pass (as forward.c) */
    int pass = B->ops->graph_begin(B, T);
    for (;;) {
        step_ops(&s, logits_host);
        if (pass == BE_PASS_DIRECT) break;
        pass = B->ops->graph_end(B);
        if (pass == BE_PASS_DONE) break;
    }
    for (int k = 0; k < n; k++) seqs[k]->pos += len[k];
    free(s.row0); free(s.chunk_of); free(s.n_vis); free(s.ids); free(s.pos); free(s.plan);
}

/* The ops of a step, from the embedding to the logits download; no host state changes. */
static void step_ops(stp *sp, float *logits_host) {
    stp s = *sp;
    int T = s.T, n = s.n;
    const int *len = s.len;
    size_t t = (size_t)T;
    s.h = fa(t * HC * D); s.x = fa(t * D); s.post = fa(t * HC);
    s.comb = fa(t * HC * HC); s.cq = fa(t * QL); s.q = fa(t * H * DH); s.kv = fa(t * DH);
    s.o = fa(t * H * DH); s.y = fa(t * G * OL); s.v = fa(t * D); s.ca = fa(t * 2 * DH);
    s.cg = fa(t * 2 * DH); s.iq = fa(t * NI * IHD); s.iw = fa(t * NI);
    s.idx = B->ops->alloc(B, t * TOPK * sizeof(int32_t));
    OP("embed", B->ops->embed(B, embed_w, s.ids, T, HC, s.h));
    for (int l = 0; l < n_layers; l++) {
        blayer *L = &layers[l];
        OP("mhc", B->ops->mhc_norm(B, 0, s.h, L->hc_attn_fn, L->hc_attn_base, L->hc_attn_scale, T,
                                   HC, D, ITERS, EPS, EPS, L->attn_norm, s.x, s.post, s.comb));
        attention(&s, l);
        OP("mhc", B->ops->mhc_post(B, s.h, s.v, s.post, s.comb, T, HC, D));
        OP("mhc", B->ops->mhc_norm(B, 0, s.h, L->hc_ffn_fn, L->hc_ffn_base, L->hc_ffn_scale, T,
                                   HC, D, ITERS, EPS, EPS, L->ffn_norm, s.x, s.post, s.comb));
        /* FLOPs: gate + 6 routed and 1 shared expert (3 matrices of D x I each) per token */
        cur_flops = bd_on ? 2.0 * T * ((KTOP + 1) * 3.0 * D * I + (double)E * D) : 0;
        OP("moe", B->ops->moe(B, &L->moe, s.x, s.ids, T, s.v));
        OP("mhc", B->ops->mhc_post(B, s.h, s.v, s.post, s.comb, T, HC, D));
    }
    float *hsel = fa((size_t)n * HC * D), *ysel = fa((size_t)n * D), *lg = fa((size_t)n * VOCAB);
    for (int k = 0; k < n; k++)
        B->ops->copy(B, hsel + (size_t)k * HC * D, s.h + (size_t)(s.row0[k] + len[k] - 1) * HC * D,
                     (size_t)HC * D);
    OP("head", B->ops->mhc_norm(B, 1, hsel, hc_head_fn, hc_head_base, hc_head_scale, n, HC, D, 0,
                                EPS, EPS, norm_w, ysel, NULL, NULL));
    MM("head", head_w, 0, VOCAB, ysel, D, lg, VOCAB, n);
    OP("head", B->ops->download(B, logits_host, lg, (size_t)n * VOCAB * sizeof(float)));
    void *fr[] = {s.h, s.x, s.post, s.comb, s.cq, s.q, s.kv, s.o, s.y, s.v, s.ca, s.cg,
                  s.iq, s.iw, s.idx, hsel, ysel, lg};
    for (size_t i = 0; i < sizeof fr / sizeof *fr; i++) B->ops->free(B, fr[i]);
}

/* ---- driver ---------------------------------------------------------------------------------- */

static int parse_list(const char *s, int *out, int max) {
    int n = 0;
    while (*s && n < max) {
        out[n++] = atoi(s);
        const char *c = strchr(s, ',');
        if (!c) break;
        s = c + 1;
    }
    return n;
}

/* activation bytes of one step of T rows (scratch above + MoE and indexer temporaries) */
static double act_bytes(double T, double nvis) {
    double f = 4;
    return T * f * (HC * D + 3.0 * D + HC + HC * HC + QL + 2.0 * H * DH + DH + G * OL + 4.0 * DH +
                    NI * IHD + NI + TOPK + 2.0 * D + 2.0 * I + E) + T * nvis * f;
}

static FILE *csv, *bcsv;
static char devname[256];

static void dump_breakdown(const char *what, double total_s) {
    printf("  per-op breakdown (%s; each op between two syncs, total %.2f ms):\n", what, total_s * 1e3);
    for (int i = 0; i < n_bd; i++) {
        double tf = bd[i].flops > 0 ? bd[i].flops / bd[i].s / 1e12 : 0;
        printf("    %-28s %9.3f ms %5.1f%%  calls %6ld", bd[i].name, bd[i].s * 1e3,
               100 * bd[i].s / total_s, bd[i].n);
        if (tf > 0) printf("  %.2f TFLOP/s", tf);
        printf("\n");
        if (bcsv)
            fprintf(bcsv, "\"%s\",%d,\"%s\",\"%s\",%.4f,%.2f,%ld,%.3f\n", devname, n_layers, what,
                    bd[i].name, bd[i].s * 1e3, 100 * bd[i].s / total_s, bd[i].n, tf);
    }
    if (bcsv) fflush(bcsv);
    n_bd = 0;
}

int main(int argc, char **argv) {
    int want_layers = 0, ctx = 4096, steps = 4, batches[16] = {1, 8, 32, 64, 128}, nb = 5;
    int prompts[16] = {1024, 8192, 32768}, np = 3;
    double frac = 0.92, max_s = 1e9;
    int graphs = 0;
    const char *csv_path = NULL, *bd_path = NULL;
    char err[512];
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { fprintf(stderr, "duet-bench: %s needs a value\n", a); return 2; }
        if (!strcmp(a, "--layers")) want_layers = atoi(v);
        else if (!strcmp(a, "--ctx")) ctx = atoi(v);
        else if (!strcmp(a, "--steps")) steps = atoi(v);
        else if (!strcmp(a, "--batches")) nb = parse_list(v, batches, 16);
        else if (!strcmp(a, "--prefill")) np = parse_list(v, prompts, 16);
        else if (!strcmp(a, "--mem-fraction")) frac = atof(v);
        else if (!strcmp(a, "--csv")) csv_path = v;
        else if (!strcmp(a, "--breakdown")) bd_path = v;
        else if (!strcmp(a, "--max-seconds")) max_s = atof(v);
        else if (!strcmp(a, "--graphs")) graphs = atoi(v);
        else if (!strcmp(a, "--kv")) {
            dv4_kv_dtype dt;
            if (dv4_kv_dtype_parse(v, &dt, err, sizeof err)) {
                fprintf(stderr, "duet-bench: --kv: %s\n", err);
                return 2;
            }
            kv_fmt = (int)dt;
            ikey_fmt = dt == DV4_KV_FP8 ? BE_KV_BF16 : (int)dt;
        } else { fprintf(stderr, "duet-bench: unknown option %s\n", a); return 2; }
        i++;
    }
    double t_start = now();
    double copy_gbs = 0, bf16_tf = 0, fp8_tf = 0;
    if (peak_copy_gbs((size_t)2 << 30, 20, &copy_gbs, err, sizeof err)) {
        fprintf(stderr, "duet-bench: copy bandwidth: %s\n", err);
        return 1;
    }
    if (peak_gemm_tflops(8192, 20, &bf16_tf, &fp8_tf, err, sizeof err))
        fprintf(stderr, "duet-bench: GEMM peak: %s (continuing)\n", err);
    B = be_cuda_create(0, frac, err, sizeof err);
    if (!B) { fprintf(stderr, "duet-bench: %s\n", err); return 1; }
    be_cuda_graph_enable(B, graphs);
    int maj, min;
    snprintf(devname, sizeof devname, "%s", be_cuda_device_name(B, &maj, &min));
    printf("device %s (sm_%d%d), cap %.1f GiB; measured: copy %.0f GB/s (read+write), "
           "cuBLAS bf16 %.0f TFLOP/s, cuBLASLt fp8 %.0f TFLOP/s; KV dtype %s\n", devname, maj,
           min, be_cuda_mem_cap(B) / 1073741824.0, copy_gbs, bf16_tf, fp8_tf,
           dv4_kv_dtype_name((dv4_kv_dtype)kv_fmt));

    /* RoPE tables and the hash table */
    dv4_config c = {0};
    c.qk_rope_head_dim = DR; c.rope_theta = 10000; c.compress_rope_theta = 160000; c.has_yarn = 1;
    c.yarn_factor = 16; c.yarn_original_max_pos = 65536; c.yarn_beta_fast = 32; c.yarn_beta_slow = 1;
    dv4_rope_tables(&c, omega_main, omega_cmp);
    tid2eid = xmalloc((size_t)VOCAB * KTOP * sizeof *tid2eid);
    for (int v = 0; v < VOCAB; v++)
        for (int k = 0; k < KTOP; k++) tid2eid[(size_t)v * KTOP + k] = (v * 37 + k * 43) % E;

    /* globals, then as many layers as fit beside the largest step's activations and state */
    embed_w = bf16(VOCAB, D);
    head_w = bf16(VOCAB, D);
    norm_w = vrand(D, 0.5f, 1.5f);
    hc_head_fn = vrand((size_t)HC * HC * D, -0.01f, 0.01f);
    hc_head_base = vrand(HC, -0.5f, 0.5f);
    hc_head_scale = vrand(1, 0.5f, 1.5f);
    int maxT = 0, maxB = 0;
    for (int i = 0; i < np; i++) maxT = prompts[i] > maxT ? prompts[i] : maxT;
    for (int i = 0; i < nb; i++) maxB = batches[i] > maxB ? batches[i] : maxB;
    /* beside the weights: the largest step's activations, and per layer the sequence state
     * of the largest decode batch (CSA worst case) and of the longest prompt */
    double reserve = 1.3 * act_bytes(maxT, maxT / 4.0) + 1.3 * act_bytes(maxB, ctx / 4.0) + (1 << 30);
    double kvz = kv_fmt == BE_KV_F32 ? 4.0 : 2.0; /* bytes per KV element (FP8 rows: less) */
    double per_seq_layer = (W * DH + (ctx + steps + 8) / 4.0 * (DH + IHD)) * kvz;
    double state_per_layer = per_seq_layer * maxB + (double)maxT / 4 * (DH + IHD) * kvz;
    layers = xcalloc(64, sizeof *layers);
    for (n_layers = 0; n_layers < 43; n_layers++) {
        if (want_layers && n_layers >= want_layers) break;
        double est = 3.7e9; /* one V4-Flash layer: 3.42 GB experts + ~0.25 GB dense */
        if (!want_layers &&
            be_cuda_mem_used(B) + est + reserve + state_per_layer * (n_layers + 1) > be_cuda_mem_cap(B))
            break;
        if (be_cuda_fits(B, (size_t)est, err, sizeof err)) {
            fprintf(stderr, "duet-bench: layer %d: %s\n", n_layers, err);
            return 1;
        }
        layer_make(&layers[n_layers], n_layers);
    }
    paging_init();
    sync_or_die();
    double wbytes = 0, tok_bytes = wb(head_w) + (double)D * 2;
    for (int i = 0; i < n_layers; i++) {
        wbytes += layers[i].dense_bytes + E * layers[i].expert_bytes;
        tok_bytes += layers[i].dense_bytes + KTOP * layers[i].expert_bytes;
    }
    double roof = copy_gbs * 1e9 / tok_bytes;
    printf("%d layers (real schedule) = %.1f GiB of weights + embed/head %.1f GiB; batch-1 decode "
           "reads %.2f GB/token (dense + 6 experts per layer + head) -> roofline %.1f tok/s\n",
           n_layers, wbytes / 1073741824.0, 2 * wb(head_w) / 1073741824.0, tok_bytes / 1e9, roof);
    if (csv_path && !(csv = fopen(csv_path, "w"))) { perror(csv_path); return 1; }
    if (bd_path && !(bcsv = fopen(bd_path, "w"))) { perror(bd_path); return 1; }
    if (csv) {
        fprintf(csv, "device,layers,metric,batch_or_prompt,ctx,tokens_per_s,ms_per_step,roofline_tokens_per_s,ratio,note\n");
        fprintf(csv, "\"%s\",%d,copy_bandwidth_GBps,0,0,%.1f,0,0,0,\"D2D memcpy 2 GiB, read+write\"\n", devname, n_layers, copy_gbs);
        fprintf(csv, "\"%s\",%d,cublas_bf16_TFLOPs,8192,0,%.1f,0,0,0,\"8192^3\"\n", devname, n_layers, bf16_tf);
        fprintf(csv, "\"%s\",%d,cublaslt_fp8_TFLOPs,8192,0,%.1f,0,0,0,\"8192^3 TN\"\n", devname, n_layers, fp8_tf);
        fflush(csv);
    }
    if (bcsv) fprintf(bcsv, "device,layers,run,op,ms,percent,calls,tflops\n");

    float *logits = xmalloc((size_t)(maxB > 1 ? maxB : 1) * VOCAB * sizeof *logits);
    /* decode */
    for (int bi = 0; bi < nb; bi++) {
        int nbat = batches[bi];
        if (now() - t_start > max_s) { printf("time limit: skipping decode batch %d\n", nbat); continue; }
        bseq **seqs = xmalloc((size_t)nbat * sizeof *seqs);
        int *len = xmalloc((size_t)nbat * sizeof *len);
        for (int k = 0; k < nbat; k++) {
            seqs[k] = seq_new(ctx + steps + 8, ctx);
            len[k] = 1;
        }
        step(seqs, len, nbat, logits); /* warm-up */
        sync_or_die();
        be_cuda_graph_stats g0, g1;
        be_cuda_graph_get_stats(B, &g0);
        double t0 = now();
        for (int i = 0; i < steps; i++) step(seqs, len, nbat, logits);
        sync_or_die();
        double dt = (now() - t0) / steps;
        double tps = nbat / dt;
        be_cuda_graph_get_stats(B, &g1);
        printf("decode batch %4d ctx %d: %8.2f tok/s  %8.2f ms/step", nbat, ctx, tps, dt * 1e3);
        if (nbat == 1) printf("  roofline %.1f tok/s  ratio %.3f", roof, tps / roof);
        if (g1.replays > g0.replays)
            printf("  record pass %.0f us (signature %.0f KB)", 1e6 * (g1.record_s - g0.record_s) / (double)(g1.replays - g0.replays),
                   g1.sig_bytes / 1024.0);
        printf("  graphs: %llu replayed, %llu captured, %llu direct%s%s\n",
               (unsigned long long)(g1.replays - g0.replays),
               (unsigned long long)(g1.captures - g0.captures),
               (unsigned long long)(g1.fallbacks - g0.fallbacks), g1.fallbacks > g0.fallbacks ? ": " : "",
               g1.fallbacks > g0.fallbacks ? g1.last_fallback : "");
        fflush(stdout);
        if (csv) {
            fprintf(csv, "\"%s\",%d,decode,%d,%d,%.2f,%.3f,%.2f,%.4f,\"\"\n", devname, n_layers, nbat, ctx,
                    tps, dt * 1e3, nbat == 1 ? roof : 0, nbat == 1 ? tps / roof : 0);
            fflush(csv);
        }
        if (nbat == 1 || bi == nb - 1) {
            bd_on = 1; /* an op between two syncs: no graph */
            be_cuda_graph_enable(B, 0);
            double b0 = now();
            step(seqs, len, nbat, logits);
            double bt = now() - b0;
            bd_on = 0;
            be_cuda_graph_enable(B, graphs);
            char what[64];
            snprintf(what, sizeof what, "decode batch %d", nbat);
            dump_breakdown(what, bt);
        }
        for (int k = 0; k < nbat; k++) seq_free(seqs[k]);
        free(seqs);
        free(len);
    }
    /* prefill: one sequence, the whole prompt in one step, logits of the last token */
    for (int pi = 0; pi < np; pi++) {
        int T = prompts[pi];
        if (T <= 0) continue; /* --prefill 0: none */
        if (now() - t_start > max_s) { printf("time limit: skipping prefill %d\n", T); continue; }
        char e2[300];
        if (be_cuda_fits(B, (size_t)act_bytes(T, T / 4.0), e2, sizeof e2)) {
            printf("prefill %d: skipped: %s\n", T, e2);
            continue;
        }
        bseq *s = seq_new(T + 8, 0);
        int len = T;
        int bdrun = pi == 0 || T == 8192;
        if (pi == 0) { step(&s, &len, 1, logits); seq_free(s); s = seq_new(T + 8, 0); } /* warm-up */
        sync_or_die();
        double t0 = now();
        step(&s, &len, 1, logits);
        sync_or_die();
        double dt = now() - t0;
        printf("prefill %6d: %9.1f tok/s  %8.1f ms\n", T, T / dt, dt * 1e3);
        fflush(stdout);
        if (csv) {
            fprintf(csv, "\"%s\",%d,prefill,%d,0,%.2f,%.3f,0,0,\"\"\n", devname, n_layers, T, T / dt, dt * 1e3);
            fflush(csv);
        }
        if (bdrun && now() - t_start < max_s) {
            seq_free(s);
            s = seq_new(T + 8, 0);
            bd_on = 1; /* an op between two syncs: no graph */
            be_cuda_graph_enable(B, 0);
            double b0 = now();
            step(&s, &len, 1, logits);
            double bt = now() - b0;
            bd_on = 0;
            be_cuda_graph_enable(B, graphs);
            char what[64];
            snprintf(what, sizeof what, "prefill %d", T);
            dump_breakdown(what, bt);
        }
        seq_free(s);
    }
    if (csv) fclose(csv);
    if (bcsv) fclose(bcsv);
    printf("duet-bench: done in %.1f s\n", now() - t_start);
    return 0;
}
