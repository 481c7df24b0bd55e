/* kvstate.c — per-sequence KV state (spec §3.1) in a pool of pages, and prefix snapshots.
 *
 * Why: the growing state (compressed entries of every CSA/HCA layer, CSA indexer keys) is where
 * long contexts spend memory; keeping it in fixed-size pages that sequences and cached prefix
 * blocks reference through page tables (backend.h "Paged growing state") means a sequence grows
 * without copying, a prefix-cache hit shares the cached pages in place instead of copying them,
 * and every byte of KV state comes out of one pool whose size the worker's block budget bounds.
 *
 * Units: a page holds one block of B tokens of growing state for every layer
 * (dv4_kv_sizes.block_bytes). A live sequence holds ceil(pos / B) pages; a snapshot holds one
 * page (shared with the sequence that saved it) plus its resume state (rings and previous-window
 * carries) copied into ceil(resume_bytes / block_bytes) pages of its own. Pages are freed when
 * their last holder lets go; a full page is never written again (every window of block i closes
 * by position (i+1)·B - 1), so sharing needs no copy-on-write. The fixed per-sequence state
 * (rings, compressor carries) is allocated per sequence, as the worker's budget assumes.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "worker/model_internal.h"

/* Formats (backend.h BE_KV_*) of the rings and compressed entries, and of the indexer keys. */
static int fmt_of(dv4_kv_dtype dt) { return (int)dt; }
static int ikey_fmt_of(dv4_kv_dtype dt) { return dt == DV4_KV_FP8 ? BE_KV_BF16 : (int)dt; }
int dv4_kv_fmt(const dv4_model *m) { return fmt_of(m->kv_dtype); }
int dv4_ikey_fmt(const dv4_model *m) { return ikey_fmt_of(m->kv_dtype); }

/* Sizes of one layer's state pieces at block size B and KV dtype dt. cc = 2 for the
 * overlapping (m = 4) compressors. ring, ent_per_block and ikey_per_block are bytes of stored
 * rows; the carries (cur, prev, icur, iprev) are f32 element counts (a and g halves both). */
typedef struct {
    size_t ring, cur, prev, icur, iprev; /* fixed: ring, current window (a+g), previous (a+g) */
    size_t ent_per_block, ikey_per_block; /* growing, per block of B tokens */
} layer_floats;

static layer_floats floats_of(const dv4_config *c, int ratio, int block, dv4_kv_dtype dt) {
    layer_floats f = {0};
    size_t dh = (size_t)c->head_dim, ihd = (size_t)c->index_head_dim;
    size_t rb = be_kv_row_bytes(fmt_of(dt), (int)dh), ib = be_kv_row_bytes(ikey_fmt_of(dt), (int)ihd);
    f.ring = (size_t)c->sliding_window * rb;
    if (!ratio) return f;
    size_t cc = ratio == 4 ? 2 : 1;
    f.cur = 2 * (size_t)ratio * cc * dh;
    f.prev = cc == 2 ? 2 * (size_t)ratio * dh : 0;
    f.ent_per_block = (size_t)(block / ratio) * rb;
    if (ratio == 4) {
        f.icur = 2 * (size_t)4 * 2 * ihd;
        f.iprev = 2 * (size_t)4 * ihd;
        f.ikey_per_block = (size_t)(block / 4) * ib;
    }
    return f;
}

static int check_block(int block, char *err, size_t errlen) {
    if (block <= 0 || block % 128)
        return duet_err(err, errlen, DUET_EINVAL,
                        "KV block size %d must be a positive multiple of 128 (the HCA ratio)",
                        block);
    return 0;
}

int dv4_kv_sizes_of(const dv4_config *c, int block, dv4_kv_dtype dt, dv4_kv_sizes *out,
                    char *err, size_t errlen) {
    int rc = check_block(block, err, errlen);
    if (rc) return rc;
    if (dt == DV4_KV_FP8 && (c->qk_rope_head_dim != FMT_KV_ROPE || !fmt_kv_fp8_ok(c->head_dim)))
        return duet_err(err, errlen, DUET_EINVAL,
                        "fp8 KV rows need %d RoPE dims and a head_dim that is %d more than a "
                        "multiple of %d; this model has %d and %d: use bf16", FMT_KV_ROPE,
                        FMT_KV_ROPE, FMT_KV_BLOCK, c->qk_rope_head_dim, c->head_dim);
    *out = (dv4_kv_sizes){0};
    size_t fz = sizeof(float);
    for (int i = 0; i < c->num_hidden_layers; i++) {
        layer_floats f = floats_of(c, cfg_ratio(c, i), block, dt);
        out->block_bytes += f.ent_per_block + f.ikey_per_block;
        out->resume_bytes += f.ring + (f.prev + f.iprev) * fz;
        out->fixed_bytes += f.ring + (f.cur + f.prev + f.icur + f.iprev) * fz;
    }
    return 0;
}

/* ======================================================================================== */
/* the page pool                                                                             */
/* ======================================================================================== */

struct dv4_page {
    void *mem;                 /* block_bytes of backend memory */
    int refs;                  /* holders: sequences and snapshots */
};

struct dv4_kvpool {
    int block;                 /* B and dtype the layout was made for */
    dv4_kv_dtype dt;
    size_t page_bytes;         /* = dv4_kv_sizes.block_bytes */
    int total, in_use, limit;  /* pages allocated, held, most that may exist (0: no limit) */
    dv4_page **free;           /* [total] stack of free pages */
    int n_free;
    void **slabs;              /* backend allocations of several pages each */
    dv4_page **descs;          /* the pages of each slab */
    int n_slabs;
};

/* Frees every slab (pages still held become dangling: only when the model goes). */
static void pool_free(dv4_model *m) {
    dv4_kvpool *p = m->pool;
    if (!p) return;
    for (int i = 0; i < p->n_slabs; i++) {
        m->b->ops->free(m->b, p->slabs[i]);
        free(p->descs[i]);
    }
    free(p->slabs);
    free(p->descs);
    free(p->free);
    free(p);
    m->pool = NULL;
}

/* The pool for the model's block size and dtype, made (and each layer's place in a page
 * computed) when there is none or, with no page held, when either changed. */
static dv4_kvpool *pool_of(dv4_model *m) {
    dv4_kvpool *p = m->pool;
    if (p && p->block == m->block && p->dt == m->kv_dtype) return p;
    if (p && p->in_use) abort(); /* the layout changed under held pages (dv4_set_* refuse it) */
    int limit = p ? p->limit : 0;
    pool_free(m);
    p = m->pool = xcalloc(1, sizeof *p);
    p->block = m->block;
    p->dt = m->kv_dtype;
    p->limit = limit;
    size_t off = 0;
    for (int i = 0; i < m->n_layers; i++) {
        dv4_layer *L = &m->layers[i];
        layer_floats f = floats_of(&m->cfg, L->ratio, m->block, m->kv_dtype);
        L->cmp_pg = (be_paging){off, L->ratio ? m->block / L->ratio : 0};
        off += f.ent_per_block;
        L->ikey_pg = (be_paging){off, L->ratio == 4 ? m->block / 4 : 0};
        off += f.ikey_per_block;
    }
    p->page_bytes = off ? off : sizeof(float); /* an SWA-only model still gets addressable pages */
    return p;
}

/* A page (refs = 1), or NULL when `limit` pages are in use. Slabs double the pool (at least 8,
 * at most 1024 pages at a time) without passing the limit. */
static dv4_page *page_get(dv4_model *m) {
    dv4_kvpool *p = pool_of(m);
    if (p->limit > 0 && p->in_use >= p->limit) return NULL;
    if (!p->n_free) {
        int n = p->total < 8 ? 8 : p->total > 1024 ? 1024 : p->total;
        if (p->limit > 0 && n > p->limit - p->total) n = p->limit - p->total;
        if (n <= 0) return NULL;
        char *mem = m->b->ops->alloc(m->b, (size_t)n * p->page_bytes);
        dv4_page *d = xcalloc((size_t)n, sizeof *d);
        p->slabs = xrealloc(p->slabs, (size_t)(p->n_slabs + 1) * sizeof *p->slabs);
        p->descs = xrealloc(p->descs, (size_t)(p->n_slabs + 1) * sizeof *p->descs);
        p->slabs[p->n_slabs] = mem;
        p->descs[p->n_slabs++] = d;
        p->total += n;
        p->free = xrealloc(p->free, (size_t)p->total * sizeof *p->free);
        for (int i = n - 1; i >= 0; i--) { /* lowest address on top */
            d[i].mem = mem + (size_t)i * p->page_bytes;
            p->free[p->n_free++] = &d[i];
        }
    }
    dv4_page *g = p->free[--p->n_free];
    g->refs = 1;
    p->in_use++;
    return g;
}

static dv4_page *page_ref(dv4_page *g) {
    g->refs++;
    return g;
}

static void page_unref(dv4_model *m, dv4_page *g) {
    if (!g || --g->refs > 0) return;
    m->pool->free[m->pool->n_free++] = g;
    m->pool->in_use--;
}

void dv4_kv_pool_limit(dv4_model *m, int pages) {
    if (m->pool && !m->pool->in_use) pool_free(m); /* a new budget: start from an empty pool */
    pool_of(m)->limit = pages > 0 ? pages : 0;
}

void dv4_kv_pool_stats(const dv4_model *m, int *pages_in_use, int *pages_allocated) {
    *pages_in_use = m->pool ? m->pool->in_use : 0;
    *pages_allocated = m->pool ? m->pool->total : 0;
}

void dv4_kv_pool_destroy(dv4_model *m) { pool_free(m); }

/* ======================================================================================== */
/* block size and KV dtype                                                                   */
/* ======================================================================================== */

int dv4_set_block_size(dv4_model *m, int block, char *err, size_t errlen) {
    int rc = check_block(block, err, errlen);
    if (rc) return rc;
    if (m->n_state > 0 && block != m->block)
        return duet_err(err, errlen, DUET_EINVAL,
                        "the KV block size cannot change to %d while %d sequences or prefix "
                        "snapshots of this model exist", block, m->n_state);
    m->block = block;
    return 0;
}

int dv4_block_size(const dv4_model *m) { return m->block; }

int dv4_kv_dtype_parse(const char *s, dv4_kv_dtype *out, char *err, size_t errlen) {
    if (s && !strcmp(s, "f32")) *out = DV4_KV_F32;
    else if (s && !strcmp(s, "bf16")) *out = DV4_KV_BF16;
    else if (s && !strcmp(s, "fp8")) *out = DV4_KV_FP8;
    else
        return duet_err(err, errlen, DUET_EINVAL,
                        "KV dtype '%s' is not supported; use f32 (the default), bf16 or fp8",
                        s ? s : "");
    return 0;
}

const char *dv4_kv_dtype_name(dv4_kv_dtype dt) {
    return dt == DV4_KV_BF16 ? "bf16" : dt == DV4_KV_FP8 ? "fp8" : "f32";
}

int dv4_set_kv_dtype(dv4_model *m, dv4_kv_dtype dt, char *err, size_t errlen) {
    if (dt != DV4_KV_F32 && dt != DV4_KV_BF16 && dt != DV4_KV_FP8)
        return duet_err(err, errlen, DUET_EINVAL, "KV dtype %d is not f32, bf16 or fp8", (int)dt);
    if (dt != DV4_KV_F32 && (!m->b->ops->ring_write_bf16 || !m->b->ops->ring_write_rows))
        return duet_err(err, errlen, DUET_EINVAL,
                        "the %s backend cannot store KV state in %s; use f32",
                        m->b->ops->name, dv4_kv_dtype_name(dt));
    dv4_kv_sizes z; /* refuses a dtype the model's rows do not fit (fp8) */
    int rc = dv4_kv_sizes_of(&m->cfg, m->block, dt, &z, err, errlen);
    if (rc) return rc;
    if (m->n_state > 0 && dt != m->kv_dtype)
        return duet_err(err, errlen, DUET_EINVAL,
                        "the KV dtype cannot change to %s while %d sequences or prefix "
                        "snapshots of this model exist; set it before the first sequence",
                        dv4_kv_dtype_name(dt), m->n_state);
    m->kv_dtype = dt;
    return 0;
}

dv4_kv_dtype dv4_get_kv_dtype(const dv4_model *m) { return m->kv_dtype; }

/* ======================================================================================== */
/* sequences                                                                                 */
/* ======================================================================================== */


/* Backend copy of `bytes` (a multiple of 4: the op moves floats; every KV array holds an even
 * number of bf16 values). */
static void copy_bytes(be *b, void *dst, const void *src, size_t bytes) {
    if (bytes % sizeof(float)) abort();
    b->ops->copy(b, dst, src, bytes / sizeof(float));
}

static void vfree(dv4_model *m, void *v) {
    if (v) m->b->ops->free(m->b, v);
}

int dv4_seq_new(dv4_model *m, int max_tokens, dv4_seq **out, char *err, size_t errlen) {
    const dv4_config *c = &m->cfg;
    *out = NULL;
    if (max_tokens <= 0 || max_tokens > c->max_position_embeddings)
        return duet_err(err, errlen, DUET_EINVAL,
                        "sequence length %d is outside [1, max_position_embeddings = %d]",
                        max_tokens, c->max_position_embeddings);
    be *b = m->b;
    pool_of(m); /* the layers' places in a page are known from here on */
    dv4_seq *s = xcalloc(1, sizeof *s);
    s->cap = max_tokens;
    s->block = m->block;
    s->n_layers = m->n_layers;
    s->cap_pages = (max_tokens + m->block - 1) / m->block;
    s->pg = xcalloc((size_t)s->cap_pages, sizeof *s->pg);
    s->tab = b->ops->alloc(b, (size_t)s->cap_pages * sizeof *s->tab);
    s->L = xcalloc((size_t)m->n_layers, sizeof *s->L);
    int dh = c->head_dim, ihd = c->index_head_dim;
    for (int i = 0; i < m->n_layers; i++) {
        dv4_seq_layer *S = &s->L[i];
        int r = m->layers[i].ratio;
        S->ring = b->ops->alloc(b, floats_of(c, 0, m->block, m->kv_dtype).ring);
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
        void *bufs[] = {S->ring, S->cur_a, S->cur_g, S->prev_a, S->prev_g, S->icur_a,
                        S->icur_g, S->iprev_a, S->iprev_g};
        for (size_t j = 0; j < sizeof bufs / sizeof *bufs; j++) vfree(m, bufs[j]);
    }
    for (int i = 0; i < s->n_pages; i++) page_unref(m, s->pg[i]);
    vfree(m, s->tab);
    m->n_state--;
    free(s->pg);
    free(s->L);
    free(s);
}

/* Appends pages g[0..n) (already held for s) to s's page table, host and backend copies. */
static void seq_add_pages(dv4_model *m, dv4_seq *s, dv4_page *const *g, int n) {
    void **addr = xmalloc((size_t)n * sizeof *addr);
    for (int i = 0; i < n; i++) {
        s->pg[s->n_pages + i] = g[i];
        addr[i] = g[i]->mem;
    }
    m->b->ops->upload(m->b, s->tab + s->n_pages, addr, (size_t)n * sizeof *addr);
    free(addr);
    s->n_pages += n;
    s->grown = s->n_pages * s->block;
}

int dv4_seq_reserve(dv4_model *m, dv4_seq *s, int tokens, char *err, size_t errlen) {
    if (tokens <= s->grown) return 0;
    if (tokens > s->cap)
        return duet_err(err, errlen, DUET_EINVAL,
                        "positions up to %d exceed the sequence capacity %d", tokens, s->cap);
    int need = (tokens + s->block - 1) / s->block - s->n_pages;
    dv4_page **g = xmalloc((size_t)need * sizeof *g);
    for (int i = 0; i < need; i++)
        if (!(g[i] = page_get(m))) {
            for (int j = 0; j < i; j++) page_unref(m, g[j]);
            free(g);
            return duet_err(err, errlen, DUET_ENOMEM,
                            "the KV page pool is full (%d pages of %d tokens); the coordinator "
                            "should not have scheduled this step", m->pool->limit, s->block);
        }
    seq_add_pages(m, s, g, need);
    free(g);
    return 0;
}

uint64_t dv4_seq_grown_bytes(const dv4_model *m, const dv4_seq *s) {
    return (uint64_t)s->n_pages * (m->pool ? m->pool->page_bytes : 0);
}

/* ======================================================================================== */
/* prefix snapshots                                                                          */
/* ======================================================================================== */

struct dv4_snap {
    int end, block;
    uint64_t bytes;            /* block_bytes + resume_bytes: what the worker accounts */
    dv4_page *page;            /* block [end - B, end): shared with the saving sequence */
    dv4_page **resume;         /* [n_resume] pages holding the resume state as one stream */
    int n_resume;
};

/* A byte stream over a snapshot's resume pages: the resume state of every layer in order
 * (ring, then prev_a, prev_g, iprev_a, iprev_g where the layer has them). */
typedef struct {
    dv4_model *m;
    dv4_page **pages;
    size_t at;                 /* bytes streamed so far */
} stream;

/* Copies `bytes` between backend memory p and the stream, in pieces that never cross a page
 * boundary; to_stream picks the direction. */
static void stream_copy(stream *st, void *p, size_t bytes, int to_stream) {
    size_t pb = st->m->pool->page_bytes;
    char *c = p;
    while (bytes) {
        size_t in = st->at % pb, n = pb - in < bytes ? pb - in : bytes;
        char *sp = (char *)st->pages[st->at / pb]->mem + in;
        if (to_stream) copy_bytes(st->m->b, sp, c, n);
        else copy_bytes(st->m->b, c, sp, n);
        st->at += n, c += n, bytes -= n;
    }
}

/* The resume state of s through the stream (to_stream: save; else restore into s). */
static void stream_resume(stream *st, dv4_seq *s, int to_stream) {
    dv4_model *m = st->m;
    const size_t fz = sizeof(float);
    for (int i = 0; i < s->n_layers; i++) {
        dv4_seq_layer *S = &s->L[i];
        int r = m->layers[i].ratio;
        layer_floats f = floats_of(&m->cfg, r, s->block, m->kv_dtype);
        stream_copy(st, S->ring, f.ring, to_stream);
        if (f.prev) {
            stream_copy(st, S->prev_a, f.prev / 2 * fz, to_stream);
            stream_copy(st, S->prev_g, f.prev / 2 * fz, to_stream);
        }
        if (f.iprev) {
            stream_copy(st, S->iprev_a, f.iprev / 2 * fz, to_stream);
            stream_copy(st, S->iprev_g, f.iprev / 2 * fz, to_stream);
        }
    }
}

void dv4_snap_free(dv4_model *m, dv4_snap *p) {
    if (!p) return;
    page_unref(m, p->page);
    for (int i = 0; i < p->n_resume; i++) page_unref(m, p->resume[i]);
    m->n_state--;
    free(p->resume);
    free(p);
}

int dv4_snap_save(dv4_model *m, const dv4_seq *s, dv4_snap **out, char *err, size_t errlen) {
    *out = NULL;
    int B = s->block;
    if (s->pos < B || s->pos % B)
        return duet_err(err, errlen, DUET_EINVAL,
                        "a prefix block can only be saved at a positive multiple of the block "
                        "size %d; the sequence is at position %d", B, s->pos);
    dv4_kv_sizes z;
    if (dv4_kv_sizes_of(&m->cfg, B, m->kv_dtype, &z, err, errlen)) return DUET_EINVAL;
    dv4_snap *p = xcalloc(1, sizeof *p);
    m->n_state++;
    p->end = s->pos;
    p->block = B;
    p->bytes = z.block_bytes + z.resume_bytes;
    p->page = page_ref(s->pg[s->pos / B - 1]);
    size_t pb = m->pool->page_bytes;
    int n = (int)((z.resume_bytes + pb - 1) / pb);
    p->resume = xcalloc((size_t)(n ? n : 1), sizeof *p->resume);
    for (; p->n_resume < n; p->n_resume++)
        if (!(p->resume[p->n_resume] = page_get(m))) {
            dv4_snap_free(m, p);
            return duet_err(err, errlen, DUET_ENOMEM,
                            "the KV page pool is full (%d pages); cannot save a prefix block",
                            m->pool->limit);
        }
    stream st = {m, p->resume, 0};
    stream_resume(&st, (dv4_seq *)s, 1); /* reads s only */
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
    if (n * B > max_tokens)
        return duet_err(err, errlen, DUET_EINVAL,
                        "positions up to %d exceed the sequence capacity %d", n * B, max_tokens);
    dv4_seq *s;
    int rc = dv4_seq_new(m, max_tokens, &s, err, errlen);
    if (rc) return rc;
    /* the cached blocks' pages, shared in place */
    dv4_page **g = xmalloc((size_t)n * sizeof *g);
    for (int k = 0; k < n; k++) g[k] = page_ref(chain[k]->page);
    seq_add_pages(m, s, g, n);
    free(g);
    stream st = {m, chain[n - 1]->resume, 0};
    stream_resume(&st, s, 0);
    s->pos = n * B;
    *out = s;
    return 0;
}

int dv4_snap_end(const dv4_snap *p) { return p->end; }
uint64_t dv4_snap_bytes(const dv4_snap *p) { return p->bytes; }

int dv4_seq_pos(const dv4_seq *s) { return s->pos; }
