/* forward.c — the DeepSeek-V4 forward pass over a batch of sequence chunks (spec §2).
 *
 * Why: written once, against backend.h, so that every backend runs the same sequence of ops and
 * the CPU backend is the reference for all of them. Reads top to bottom like spec §2.7:
 * embed → per layer (mHC pre, attention, mHC post, mHC pre, MoE, mHC post) → HC head, norm,
 * LM head. The batch is a list of chunks, one per sequence, each at its own absolute
 * positions (prefill, chunked prefill and decode are the same code). Host-side work is limited
 * to metadata: positions, key plans, visibility counts. Never pads inside a sequence.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "worker/model_internal.h"

/* Scratch buffers for one step, in backend memory; shapes for T rows. */
typedef struct {
    float *h;      /* [T, n_hc, D] residual streams */
    float *x;      /* [T, D] collapsed, normed sublayer input (mhc_norm) */
    float *post;   /* [T, n_hc] */
    float *comb;   /* [T, n_hc, n_hc] */
    float *cq;     /* [T, q_lora] */
    float *q;      /* [T, H, dh] */
    float *kv;     /* [T, dh] */
    float *o;      /* [T, H, dh] */
    float *y;      /* [T, G*o_lora] */
    float *v;      /* [T, D] sublayer output */
    float *ca, *cg;/* [T, 2*dh] compressor projections */
    float *iq;     /* [T, nI, ihd] */
    float *iw;     /* [T, nI] */
    int32_t *idx;  /* [T, topk] */
} scratch;

typedef struct {
    dv4_model *m;
    be *b;
    const dv4_config *c;
    int T, n_chunks;
    const dv4_chunk *chunks;
    int *row0;          /* [n_chunks] first batch row of each chunk */
    int32_t *ids;       /* [T] host */
    int32_t *pos;       /* [T] host */
    int *chunk_of;      /* [T] */
    be_keyplan *plan;   /* [T] */
    int *n_vis;         /* [T] */
    char *err;
    size_t errlen;
    scratch s;
    const dv4_dsample *ds; /* device sampling, or NULL */
    float *lg;             /* with ds: the last pass's logits [rows, vocab], freed after sampling */
} step;

static void *balloc(step *st, size_t bytes) { return st->b->ops->alloc(st->b, bytes); }

/* Bytes of each scratch buffer for T rows, in the order of the scratch struct's fields. */
enum { N_SCRATCH = 15 };
static void scratch_sizes(const dv4_config *c, size_t T, size_t *z) {
    size_t D = c->hidden_size, hc = c->hc_mult, H = c->num_attention_heads;
    size_t dh = c->head_dim, f = sizeof(float);
    size_t cw = 2 * (dh > (size_t)c->index_head_dim ? dh : (size_t)c->index_head_dim);
    size_t sz[N_SCRATCH] = {
        T * hc * D * f, T * D * f, T * hc * f, T * hc * hc * f,             /* h x post comb */
        T * c->q_lora_rank * f, T * H * dh * f, T * dh * f, T * H * dh * f, /* cq q kv o */
        T * c->o_groups * c->o_lora_rank * f, T * D * f,                    /* y v */
        T * cw * f, T * cw * f,                                             /* ca cg */
        T * c->index_n_heads * c->index_head_dim * f, T * c->index_n_heads * f, /* iq iw */
        T * (c->index_topk > 0 ? c->index_topk : 1) * sizeof(int32_t)};    /* idx */
    memcpy(z, sz, sizeof sz);
}

uint64_t dv4_step_scratch_bytes(const dv4_config *c, int T) {
    size_t z[N_SCRATCH];
    scratch_sizes(c, (size_t)T, z);
    uint64_t sum = 0;
    for (int i = 0; i < N_SCRATCH; i++) sum += z[i];
    return sum;
}

static void scratch_alloc(step *st) {
    size_t z[N_SCRATCH];
    scratch_sizes(st->c, (size_t)st->T, z);
    scratch *s = &st->s;
    s->h = balloc(st, z[0]), s->x = balloc(st, z[1]);
    s->post = balloc(st, z[2]), s->comb = balloc(st, z[3]), s->cq = balloc(st, z[4]);
    s->q = balloc(st, z[5]), s->kv = balloc(st, z[6]), s->o = balloc(st, z[7]);
    s->y = balloc(st, z[8]), s->v = balloc(st, z[9]), s->ca = balloc(st, z[10]);
    s->cg = balloc(st, z[11]), s->iq = balloc(st, z[12]), s->iw = balloc(st, z[13]);
    s->idx = balloc(st, z[14]);
}

static void scratch_free(step *st) {
    scratch *s = &st->s;
    void *p[] = {s->h, s->x, s->post, s->comb, s->cq, s->q, s->kv, s->o, s->y, s->v,
                 s->ca, s->cg, s->iq, s->iw, s->idx};
    for (size_t i = 0; i < sizeof p / sizeof *p; i++) st->b->ops->free(st->b, p[i]);
}

/* ======================================================================================== */
/* compressors (spec §2.4.3) — per chunk, since state is per sequence                        */
/* ======================================================================================== */

/* Runs the compressor with projections wkv/wgate over each chunk's rows of x.
 * d = entry width, m = ratio; writes entries into the sequence's array. The projections of all
 * rows are two matmuls (rows are independent), not two per chunk: a decode batch of B sequences
 * would otherwise launch 2·B small matmuls per compressor. */
static void run_compressor(step *st, int layer, int indexer) {
    const dv4_config *c = st->c;
    dv4_layer *L = &st->m->layers[layer];
    be *b = st->b;
    int m = indexer ? 4 : L->ratio, cc = m == 4 ? 2 : 1;
    int d = indexer ? c->index_head_dim : c->head_dim, D = c->hidden_size;
    const be_weight *wkv = indexer ? L->ic_wkv : L->c_wkv, *wg = indexer ? L->ic_wgate : L->c_wgate;
    b->ops->matmul(b, wkv, 0, cc * d, st->s.x, D, st->s.ca, cc * d, st->T);
    b->ops->matmul(b, wg, 0, cc * d, st->s.x, D, st->s.cg, cc * d, st->T);
    for (int k = 0; k < st->n_chunks; k++) {
        const dv4_chunk *ch = &st->chunks[k];
        dv4_seq_layer *S = &ch->seq->L[layer];
        int r0 = st->row0[k];
        be_compress_args a = {
            .T = ch->n, .m = m, .c = cc, .d = d, .rope_dims = c->qk_rope_head_dim,
            .pos = st->pos + r0, .a = st->s.ca + (size_t)r0 * cc * d,
            .g = st->s.cg + (size_t)r0 * cc * d,
            .ape = indexer ? L->ic_ape : L->c_ape, .norm = indexer ? L->ic_norm : L->c_norm,
            .eps = (float)c->rms_norm_eps, .omega = st->m->omega_cmp,
            .cur_a = indexer ? S->icur_a : S->cur_a, .cur_g = indexer ? S->icur_g : S->cur_g,
            .prev_a = indexer ? S->iprev_a : S->prev_a, .prev_g = indexer ? S->iprev_g : S->prev_g,
            .entries = ch->seq->tab,
            .kv_fmt = indexer ? dv4_ikey_fmt(st->m) : dv4_kv_fmt(st->m),
            .paging = indexer ? L->ikey_pg : L->cmp_pg,
        };
        b->ops->compress(b, &a);
    }
}

/* Lightning indexer (spec §2.4.4): fills s.idx with each row's selected compressed entries. */
static void run_indexer(step *st, int layer) {
    const dv4_config *c = st->c;
    dv4_layer *L = &st->m->layers[layer];
    be *b = st->b;
    int nI = c->index_n_heads, ihd = c->index_head_dim, T = st->T;
    run_compressor(st, layer, 1);
    b->ops->matmul(b, L->i_wq_b, 0, nI * ihd, st->s.cq, c->q_lora_rank, st->s.iq, nI * ihd, T);
    b->ops->rope(b, st->s.iq, T, nI, ihd, c->qk_rope_head_dim, st->pos, st->m->omega_cmp, 0);
    b->ops->matmul(b, L->i_wproj, 0, nI, st->s.x, c->hidden_size, st->s.iw, nI, T);
    b->ops->scale_rows(b, st->s.iw, T, nI, (float)(1.0 / sqrt((double)ihd * nI)));
    /* one call for every row: each row reads its own sequence's keys (a decode batch of B
     * sequences made B calls, each a one-block top-k launch) */
    void *const **rk = NULL;
    if (st->n_chunks > 1) {
        rk = xmalloc((size_t)T * sizeof *rk);
        for (int r = 0; r < T; r++) rk[r] = st->chunks[st->chunk_of[r]].seq->tab;
    }
    be_index_args a = {
        .T = T, .n_heads = nI, .head_dim = ihd, .topk = c->index_topk, .q = st->s.iq,
        .w = st->s.iw, .keys = st->chunks[0].seq->tab, .n_visible = st->n_vis,
        .idx = st->s.idx, .kv_fmt = dv4_ikey_fmt(st->m),
        .row_keys = (void *const *const *)rk, .paging = L->ikey_pg,
    };
    b->ops->index_topk(b, &a);
    free(rk);
}

/* ======================================================================================== */
/* attention (spec §2.4)                                                                     */
/* ======================================================================================== */

static void attention(step *st, int layer) {
    const dv4_config *c = st->c;
    dv4_layer *L = &st->m->layers[layer];
    be *b = st->b;
    scratch *s = &st->s;
    int world = st->m->shard.world;
    int T = st->T, D = c->hidden_size, H = c->num_attention_heads / world, dh = c->head_dim;
    int dr = c->qk_rope_head_dim, W = c->sliding_window, m = L->ratio;
    float eps = (float)c->rms_norm_eps;

    /* query path §2.4.1 */
    b->ops->matmul(b, L->wq_a, 0, c->q_lora_rank, s->x, D, s->o, c->q_lora_rank, T);
    b->ops->rmsnorm(b, s->o, L->q_norm, s->cq, T, c->q_lora_rank, eps);
    b->ops->matmul(b, L->wq_b, 0, H * dh, s->cq, c->q_lora_rank, s->q, H * dh, T);
    b->ops->head_rms(b, s->q, T * H, dh, eps);
    b->ops->rope(b, s->q, T, H, dh, dr, st->pos, L->omega, 0);
    /* raw kv §2.4.2 */
    b->ops->matmul(b, L->wkv, 0, dh, s->x, D, s->o, dh, T);
    b->ops->rmsnorm(b, s->o, L->kv_norm, s->kv, T, dh, eps);
    b->ops->rope(b, s->kv, T, 1, dh, dr, st->pos, L->omega, 0);

    /* visibility of compressed entries: w < floor((t+1)/m) */
    for (int r = 0; r < T; r++) st->n_vis[r] = m ? (st->pos[r] + 1) / m : 0;
    if (m == 4) run_indexer(st, layer);
    if (m) run_compressor(st, layer, 0);

    /* key plans §2.4.5 */
    for (int r = 0; r < T; r++) {
        int k = st->chunk_of[r], r0 = st->row0[k], P = st->pos[r0], t = st->pos[r];
        dv4_seq_layer *S = &st->chunks[k].seq->L[layer];
        int lo = t - W + 1 > 0 ? t - W + 1 : 0;
        be_keyplan *p = &st->plan[r];
        p->ring = S->ring;
        p->ring_size = W;
        p->ring_lo = lo < P ? lo : P;
        p->ring_hi = P;
        p->row_lo = r0 + (lo > P ? lo - P : 0);
        p->row_hi = r + 1;
        p->cmp = st->chunks[k].seq->tab;
        p->n_cmp = st->n_vis[r];
        if (m == 4 && p->n_cmp > c->index_topk) p->n_cmp = c->index_topk;
    }
    be_attn_args a = {
        .T = T, .n_heads = H, .head_dim = dh, .scale = (float)(1.0 / sqrt((double)dh)),
        .q = s->q, .kv = s->kv, .sink = L->sink, .plan = st->plan,
        .cmp_idx = m == 4 ? s->idx : NULL, .idx_stride = c->index_topk, .out = s->o,
        .kv_fmt = dv4_kv_fmt(st->m), .cmp_paging = L->cmp_pg,
    };
    b->ops->attention(b, &a);
    /* the rows' kv into their sequences' rings, one call for the step: a row that a later row
     * of its chunk overwrites (chunks longer than the window) is skipped */
    void **rings = xmalloc((size_t)T * sizeof *rings);
    for (int r = 0; r < T; r++) {
        const dv4_chunk *ch = &st->chunks[st->chunk_of[r]];
        rings[r] = r - st->row0[st->chunk_of[r]] >= ch->n - W ? ch->seq->L[layer].ring : NULL;
    }
    b->ops->ring_write_rows(b, rings, W, dh, s->kv, st->pos, T, a.kv_fmt);
    free(rings);

    /* output path §2.4.6 (this rank's groups; partial sums are all-reduced by the caller) */
    b->ops->rope(b, s->o, T, H, dh, dr, st->pos, L->omega, 1);
    int G = L->groups, ol = c->o_lora_rank, hpg = L->heads_per_group;
    b->ops->matmul_xg(b, L->wo_a, G * ol, s->o, H * dh, ol, hpg * dh, s->y, G * ol, T);
    b->ops->matmul(b, L->wo_b, 0, D, s->y, G * ol, s->v, D, T);
}

/* ======================================================================================== */
/* one block (spec §2.7) and the whole step                                                  */
/* ======================================================================================== */

/* Sums this rank's partial sublayer output over ranks (TP/EP); a no-op on one process. */
static int reduce(step *st, float *v, size_t n) {
    comm *cm = st->m->shard.comm;
    if (st->m->shard.world == 1) return 0;
    return cm->ops->allreduce_sum(cm, v, n, st->err, st->errlen);
}

static int block(step *st, int layer) {
    const dv4_config *c = st->c;
    dv4_layer *L = &st->m->layers[layer];
    be *b = st->b;
    scratch *s = &st->s;
    int T = st->T, D = c->hidden_size, hc = c->hc_mult, it = c->hc_sinkhorn_iters;
    float he = (float)c->hc_eps, ne = (float)c->rms_norm_eps;

    b->ops->mhc_norm(b, 0, s->h, L->hc_attn_fn, L->hc_attn_base, L->hc_attn_scale, T, hc, D, it,
                     he, ne, L->attn_norm, s->x, s->post, s->comb);
    attention(st, layer);
    if (reduce(st, s->v, (size_t)T * D)) return DUET_EIO;
    b->ops->mhc_post(b, s->h, s->v, s->post, s->comb, T, hc, D);

    b->ops->mhc_norm(b, 0, s->h, L->hc_ffn_fn, L->hc_ffn_base, L->hc_ffn_scale, T, hc, D, it,
                     he, ne, L->ffn_norm, s->x, s->post, s->comb);
    b->ops->moe(b, &L->moe, s->x, st->ids, T, s->v);
    if (reduce(st, s->v, (size_t)T * D)) return DUET_EIO;
    b->ops->mhc_post(b, s->h, s->v, s->post, s->comb, T, hc, D);
    return 0;
}

int dv4_logit_rows(const dv4_chunk *chunks, int n_chunks) {
    int rows = 0;
    for (int k = 0; k < n_chunks; k++)
        rows += chunks[k].logits == DV4_LOGITS_ALL ? chunks[k].n
              : chunks[k].logits == DV4_LOGITS_LAST ? 1 : 0;
    return rows;
}

static int check_chunks(const dv4_model *m, const dv4_chunk *chunks, int n_chunks, char *err,
                        size_t errlen) {
    if (n_chunks <= 0) return duet_err(err, errlen, DUET_EINVAL, "a step needs at least one chunk");
    for (int k = 0; k < n_chunks; k++) {
        const dv4_chunk *ch = &chunks[k];
        if (!ch->seq || ch->n <= 0)
            return duet_err(err, errlen, DUET_EINVAL, "chunk %d: no sequence or no tokens", k);
        for (int j = 0; j < k; j++)
            if (chunks[j].seq == ch->seq)
                return duet_err(err, errlen, DUET_EINVAL,
                                "chunks %d and %d belong to the same sequence", j, k);
        if (ch->seq->pos + ch->n > ch->seq->cap)
            return duet_err(err, errlen, DUET_EINVAL,
                            "chunk %d: positions up to %d exceed the sequence capacity %d", k,
                            ch->seq->pos + ch->n, ch->seq->cap);
        for (int i = 0; i < ch->n; i++)
            if (ch->ids[i] < 0 || ch->ids[i] >= m->cfg.vocab_size)
                return duet_err(err, errlen, DUET_EINVAL,
                                "chunk %d: token id %d at index %d is outside [0, %d)", k,
                                ch->ids[i], i, m->cfg.vocab_size);
    }
    return 0;
}

/* The step's ops, from the embedding to the logits download; no host state changes (a
 * backend that graphs steps runs them up to twice: record, then capture or direct). */
static int run_ops(step *st, float *logits) {
    dv4_model *m = st->m;
    const dv4_chunk *chunks = st->chunks;
    int n_chunks = st->n_chunks, T = st->T, rc = 0;
    const dv4_config *c = st->c;
    be *b = st->b;
    scratch_alloc(st);
    scratch *s = &st->s;
    int D = c->hidden_size, hc = c->hc_mult;

    b->ops->embed(b, m->embed, st->ids, T, hc, s->h);
    for (int l = 0; l < m->n_layers && !rc; l++) rc = block(st, l);

    /* final collapse, norm, LM head (spec §2.6) on the rows that want logits */
    int rows = dv4_logit_rows(chunks, n_chunks);
    if (rows > 0 && !rc) {
        float *hsel = b->ops->alloc(b, (size_t)rows * hc * D * sizeof(float));
        float *ysel = b->ops->alloc(b, (size_t)rows * D * sizeof(float));
        float *lg = b->ops->alloc(b, (size_t)rows * c->vocab_size * sizeof(float));
        int out = 0;
        for (int k = 0; k < n_chunks; k++) {
            int first = chunks[k].logits == DV4_LOGITS_ALL ? 0 : chunks[k].n - 1;
            int n = chunks[k].logits == DV4_LOGITS_ALL ? chunks[k].n
                  : chunks[k].logits == DV4_LOGITS_LAST ? 1 : 0;
            b->ops->copy(b, hsel + (size_t)out * hc * D,
                         s->h + (size_t)(st->row0[k] + first) * hc * D, (size_t)n * hc * D);
            out += n;
        }
        b->ops->mhc_norm(b, 1, hsel, m->hc_head_fn, m->hc_head_base, m->hc_head_scale, rows, hc, D,
                         0, (float)c->hc_eps, (float)c->rms_norm_eps, m->norm, ysel, NULL, NULL);
        b->ops->matmul(b, m->head, 0, c->vocab_size, ysel, D, lg, c->vocab_size, rows);
        if (st->ds) st->lg = lg; /* sampled, then downloaded by rows, after the passes */
        else b->ops->download(b, logits, lg, (size_t)rows * c->vocab_size * sizeof(float));
        b->ops->free(b, hsel);
        b->ops->free(b, ysel);
        if (!st->ds) b->ops->free(b, lg);
    }
    scratch_free(st);
    return rc;
}

/* ======================================================================================== */
/* device sampling (dv4_dsample)                                                             */
/* ======================================================================================== */

/* Samples ds's requests from the step's logits on the device, then downloads the rows the
 * host still needs (runs of adjacent rows in one copy each). */
static void sample_on_device(step *st, int rows, float *logits) {
    const dv4_dsample *ds = st->ds;
    be *b = st->b;
    size_t V = (size_t)st->c->vocab_size;
    b->ops->sample(b, st->lg, (int)V, ds->n, ds->req, ds->res);
    unsigned char *need = xmalloc((size_t)rows);
    for (int r = 0; r < rows; r++) need[r] = 1;
    for (int i = 0; i < ds->n; i++) need[ds->req[i].row] = ds->res[i].fallback != 0;
    if (ds->keep)
        for (int r = 0; r < rows; r++) need[r] |= ds->keep[r];
    for (int r = 0; r < rows;) {
        if (!need[r]) { r++; continue; }
        int e = r;
        while (e < rows && need[e]) e++;
        b->ops->download(b, logits + r * V, st->lg + r * V, (size_t)(e - r) * V * sizeof(float));
        r = e;
    }
    free(need);
}

int dv4_forward(dv4_model *m, const dv4_chunk *chunks, int n_chunks, float *logits, char *err,
                size_t errlen) {
    return dv4_forward_ds(m, chunks, n_chunks, logits, NULL, err, errlen);
}

int dv4_forward_ds(dv4_model *m, const dv4_chunk *chunks, int n_chunks, float *logits,
                   const dv4_dsample *ds, char *err, size_t errlen) {
    int rc = check_chunks(m, chunks, n_chunks, err, errlen);
    if (!rc && ds && !m->b->ops->sample)
        rc = duet_err(err, errlen, DUET_EINVAL, "the %s backend has no sample op; sample on "
                      "the host (turn device sampling off)", m->b->ops->name);
    int rows = dv4_logit_rows(chunks, n_chunks);
    for (int i = 0; ds && i < ds->n && !rc; i++)
        if (ds->req[i].row < 0 || ds->req[i].row >= rows)
            rc = duet_err(err, errlen, DUET_EINVAL, "sample request %d names logits row %d; the "
                          "step has %d", i, ds->req[i].row, rows);
    for (int k = 0; k < n_chunks && !rc; k++) /* state grows by whole blocks, before any math */
        rc = dv4_seq_reserve(m, chunks[k].seq, chunks[k].seq->pos + chunks[k].n, err, errlen);
    if (rc) return rc;
    const dv4_config *c = &m->cfg;
    be *b = m->b;
    step st = {.m = m, .b = b, .c = c, .n_chunks = n_chunks, .chunks = chunks, .err = err,
               .errlen = errlen, .ds = ds && ds->n > 0 ? ds : NULL};
    for (int k = 0; k < n_chunks; k++) st.T += chunks[k].n;
    int T = st.T;
    st.row0 = xmalloc((size_t)n_chunks * sizeof *st.row0);
    st.ids = xmalloc((size_t)T * sizeof *st.ids);
    st.pos = xmalloc((size_t)T * sizeof *st.pos);
    st.chunk_of = xmalloc((size_t)T * sizeof *st.chunk_of);
    st.plan = xcalloc((size_t)T, sizeof *st.plan);
    st.n_vis = xcalloc((size_t)T, sizeof *st.n_vis);
    for (int k = 0, r = 0; k < n_chunks; k++) {
        st.row0[k] = r;
        for (int i = 0; i < chunks[k].n; i++, r++) {
            st.ids[r] = chunks[k].ids[i];
            st.pos[r] = chunks[k].seq->pos + i;
            st.chunk_of[r] = k;
        }
    }
    /* one pass, or (a backend graphing this step) a record pass and then a replay, a capture
     * or a direct run: graphs need one process (no all-reduce inside a step) */
    int pass = b->ops->graph_begin && m->shard.world == 1 ? b->ops->graph_begin(b, T)
                                                          : BE_PASS_DIRECT;
    for (;;) {
        rc = run_ops(&st, logits);
        if (pass == BE_PASS_DIRECT) break;
        pass = b->ops->graph_end(b);
        if (pass == BE_PASS_DONE) break;
    }
    if (st.lg) {
        if (!rc) sample_on_device(&st, rows, logits);
        b->ops->free(b, st.lg);
    }
    /* a failed step leaves sequence state half-written: the caller must drop the sequences */
    for (int k = 0; k < n_chunks && !rc; k++) chunks[k].seq->pos += chunks[k].n;
    free(st.row0);
    free(st.ids);
    free(st.pos);
    free(st.chunk_of);
    free(st.plan);
    free(st.n_vis);
    return rc;
}
