/* backend.h — the coarse operations the DeepSeek-V4 forward pass is written against.
 *
 * Why: the forward pass (forward.c) is written once; backends (cpu now, cuda next) implement
 * these operations. Operations are coarse where a GPU wants fusion ("sparse attention with sinks
 * over a key plan", "MoE with routing and experts", "mHC pre/post"), so a backend can fuse
 * freely behind them. Activations and sequence state live in backend memory (`be_alloc`); the
 * forward pass never dereferences them. Small per-step metadata (positions, key plans, token ids)
 * is passed as host arrays; a device backend uploads it. Every op of every backend is checked
 * against the cpu backend (the reference: fp32 accumulation, dequantized weights).
 * This header must never grow HTTP, JSON or scheduler concepts.
 */
#ifndef DUET_BACKEND_H
#define DUET_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "common/ckpt.h"
#include "common/formats.h"

typedef struct be be;               /* a backend instance */
typedef struct be_weight be_weight; /* a weight in its stored format, owned by the backend */

/* KV state storage (spec §3.1): a sequence's raw-KV ring, compressed entries and indexer keys
 * are rows stored in one of these formats; all math is f32 (values are widened on read).
 * Ops that touch them take a `kv_fmt`; compressor carries, this step's kv and every activation
 * stay f32. A row of d values takes be_kv_row_bytes(fmt, d) bytes. */
enum {
    BE_KV_F32 = 0,  /* float */
    BE_KV_BF16 = 1, /* uint16 bf16, round to nearest even */
    BE_KV_FP8 = 2,  /* common/formats.h "FP8 KV rows": e4m3 nope dims with a ue8m0 scale per 64,
                       bf16 RoPE dims (the last 64); rows whose width fmt_kv_fp8_ok() accepts */
};
static inline size_t be_kv_row_bytes(int fmt, int d) {
    return fmt == BE_KV_FP8 ? fmt_kv_fp8_row_bytes(d) : (size_t)d * (fmt == BE_KV_BF16 ? 2 : 4);
}

/* Paged growing state (spec §3.1: compressed entries and indexer keys grow with the context).
 * A sequence's growing state lives in KV pages of B tokens, one page per block, each page
 * holding that block's entries of EVERY layer; a page table (backend memory, [n_pages] page
 * pointers in block order) is the sequence's only handle on them, so cached prefix blocks are
 * shared in place by every sequence that restores them. Entry w of one layer's array (rows of
 * `row` elements, per_page = B / m rows per page) is at byte
 *     off + (w mod per_page) · row · elem_bytes    of page    table[w div per_page],
 * where `off` is that layer's array within a page (the same in every page). */
typedef struct {
    size_t off;             /* bytes from a page's start to this layer's array */
    int per_page;           /* rows of this array per page: B / m */
} be_paging;

/* The start of row w of a paged array with rows of row_bytes, by the rule above (for a backend
 * whose memory the host can address; device kernels apply the same rule). */
static inline void *be_page_row(void *const *table, be_paging pg, size_t w, size_t row_bytes) {
    return (char *)table[w / (size_t)pg.per_page] + pg.off + (w % (size_t)pg.per_page) * row_bytes;
}

/* Per-token key plan for sparse attention (host memory). For the query in batch row r at
 * absolute position t: raw-window keys come from the sequence's ring for positions
 * [ring_lo, ring_hi) (slot = pos mod ring_size) and from batch rows [row_lo, row_hi) of the
 * current step's kv; compressed keys are entries 0..n_cmp-1 of the sequence's paged array
 * (`cmp` page table, be_attn_args.cmp_paging; HCA: all visible), or, when `cmp_idx` is
 * non-NULL, the entries listed in row r of cmp_idx ([T, idx_stride] int32, backend memory,
 * n_cmp valid). */
typedef struct {
    const void *ring;       /* [ring_size, head_dim] KV dtype, backend memory, may be NULL if unused */
    int ring_size;
    int ring_lo, ring_hi;   /* absolute positions */
    int row_lo, row_hi;     /* batch rows */
    void *const *cmp;       /* page table of the compressed entries (backend memory) or NULL */
    int n_cmp;
} be_keyplan;

typedef struct {
    int T, n_heads, head_dim;
    float scale;              /* softmax scale, 1/sqrt(head_dim) */
    const float *q;           /* [T, n_heads, head_dim] */
    const float *kv;          /* [T, head_dim] this step's raw kv (keys = values) */
    const float *sink;        /* [n_heads] sink logits */
    const be_keyplan *plan;   /* [T] host */
    const int32_t *cmp_idx;   /* [T, idx_stride] backend memory, or NULL */
    int idx_stride;
    float *out;               /* [T, n_heads, head_dim] */
    int kv_fmt;               /* of the plan rings and cmp entries; this step's kv rows are
                                 read rounded as a row of that format holds them (a query sees
                                 the same keys however the sequence was chunked) */
    be_paging cmp_paging;     /* where this layer's entries are in a page ([*, head_dim] rows) */
} be_attn_args;

/* Compressor over the tokens of ONE sequence (spec §2.4.3), in order. `a` and `g` are the
 * projections [T, c*d] (g already without ape; the op adds ape[pos mod m]). State per sequence:
 * cur_a/cur_g [m, c*d] (rows = position within the current window), prev_a/prev_g [m, d]
 * (A-halves of the last complete window; c = 2 only; start as 0 / -inf). Every window that closes
 * at a token of this call is pooled, RMS-normed (norm weight), RoPE'd at its window start
 * (omega, last rope_dims dims), optionally QAT-rounded, and written to entry w (paged). */
typedef struct {
    int T, m, c, d, rope_dims;
    const int32_t *pos;       /* [T] host, consecutive positions */
    const float *a, *g;       /* [T, c*d] */
    const float *ape;         /* [m, c*d] */
    const float *norm;        /* [d] */
    float eps;
    const float *omega;       /* [rope_dims/2] host */
    float *cur_a, *cur_g, *prev_a, *prev_g;
    void *const *entries;     /* page table (backend memory): entries [*, d] KV dtype, paged */
    int fp8_nope_qat;         /* 1: FP8 round trip of dims [0, d-rope_dims) in blocks of 64 */
    int hadamard_fp4_qat;     /* 1: Hadamard + FP4 round trip (indexer keys) */
    int kv_fmt;               /* of the entries (rounded after the QAT round trips) */
    be_paging paging;         /* where this layer's entries are in a page */
} be_compress_args;

/* Lightning indexer scores and top-k (spec §2.4.4) for T query rows of one sequence (or, with
 * row_keys, of several). */
typedef struct {
    int T, n_heads, head_dim, topk;
    const float *q;           /* [T, n_heads, head_dim], RoPE'd */
    const float *w;           /* [T, n_heads] head weights, already scaled */
    void *const *keys;        /* page table (backend memory) of the sequence's index keys
                                 ([*, head_dim] KV dtype, paged as `paging` says) */
    const int *n_visible;     /* [T] host: entries visible to each row */
    int32_t *idx;             /* [T, topk] output (backend memory); row r has min(topk, n_visible[r]) */
    int kv_fmt;               /* of the keys */
    void *const *const *row_keys; /* [T] host, or NULL: row r reads the keys of page table
                                     row_keys[r] (rows of several sequences in one call; `keys`
                                     unused) */
    be_paging paging;
} be_index_args;

/* Weights of one MoE layer (spec §2.5). */
typedef struct {
    int n_experts, top_k, inter, hidden;
    const be_weight *gate;            /* [E, D] router */
    const float *bias;                /* [E] selection bias, or NULL (hash layer) */
    const int64_t *tid2eid;           /* [vocab, top_k] host, or NULL (score layer) */
    int vocab;
    const be_weight **w1, **w2, **w3; /* [E] routed experts; NULL for experts of other ranks */
    const be_weight *s1, *s2, *s3;    /* shared expert (this rank's slice of its intermediate:
                                         s1/s3 [shared_inter, D], s2 [D, shared_inter]), or NULL */
    int shared_inter;
    float route_scale, swiglu_limit;
    int norm_topk;
} be_moe_layer;

/* One draw of the `sample` op (host memory). The semantics are worker_sample's for a row that
 * needs no shaping (no logit_bias, masks or penalties; the worker keeps those rows on the
 * host): NaN logits count as -inf; temperature < 1e-5 (or no finite logit) → argmax, ties →
 * lowest id, exact; else the candidates in the order (value desc, id asc) are cut by top_k,
 * then top_p against the total weight exp((v - max) / T) of every kept candidate, then min_p,
 * and drawn by an inverse-CDF walk with u = u01 × (weight left). Only the first
 * BE_SAMPLE_RANKED candidates (or top_k if smaller) are ranked: a row whose cut or walk needs
 * one beyond them comes back with `fallback` set, and the caller samples it on the host. Sums
 * run in another order than worker_sample's, so a sampled id may differ from the host's when
 * u falls within rounding (~1e-15 relative) of a boundary; greedy rows and ids never do. */
enum { BE_SAMPLE_MAX_TOP = 20, BE_SAMPLE_RANKED = 1024 };
typedef struct {
    int32_t row;         /* logits row to read */
    float temperature;   /* < 1e-5: greedy */
    float top_p;         /* (0, 1): nucleus; otherwise off */
    float min_p;         /* (0, 1]: drop weights < min_p × the max's; otherwise off */
    int32_t top_k;       /* > 0: keep the k largest; otherwise off */
    int32_t n_top;       /* top logprobs wanted, 0..BE_SAMPLE_MAX_TOP */
    double u01;          /* the uniform draw in [0, 1): worker_sample_u01(seed, stream, pos) */
} be_sample_req;
typedef struct {
    int32_t id;          /* the token drawn (undefined when fallback) */
    int32_t fallback;    /* 1: the cut or the walk needed candidates past the ranked ones */
    float logprob;       /* log-softmax of the raw logits (temperature 1) at id */
    int32_t n_top;       /* = req.n_top (at most V) */
    int32_t top_ids[BE_SAMPLE_MAX_TOP];     /* the raw distribution's most likely ids, */
    float top_logprobs[BE_SAMPLE_MAX_TOP];  /* descending, ties → lower id */
} be_sample_res;

struct be_ops {
    const char *name;
    /* memory */
    void *(*alloc)(be *b, size_t bytes);            /* zeroed; aborts on OOM */
    void (*free)(be *b, void *p);
    void (*upload)(be *b, void *dst, const void *src, size_t bytes);
    void (*download)(be *b, void *dst, const void *src, size_t bytes);
    void (*fill)(be *b, float *x, float v, size_t n);
    void (*copy)(be *b, float *dst, const float *src, size_t n);
    /* weights: keeps the stored format (FP8 blocks / FP4 / BF16 / F32); data may be referenced */
    be_weight *(*weight)(be *b, const ck_weight *w);
    /* the sub-matrix rows [r0, r0+nr) × columns [c0, c0+nc) of w, as a weight of its own
     * (tensor/expert parallel shards); ops index it from 0 */
    be_weight *(*weight_slice)(be *b, const ck_weight *w, int64_t r0, int64_t nr, int64_t c0,
                               int64_t nc);
    void (*weight_free)(be *b, be_weight *w);
    /* plain f32 vector from any 1-D weight (norms, biases, sinks, ape, hc params) */
    float *(*vector)(be *b, const ck_weight *w);
    /* y[T, N] = x[T, K] · W[row0 : row0+N, :]ᵀ ; x row stride ldx, y row stride ldy (floats) */
    void (*matmul)(be *b, const be_weight *W, int row0, int N, const float *x, int ldx, float *y,
                   int ldy, int T);
    void (*embed)(be *b, const be_weight *table, const int32_t *ids, int T, int n_hc, float *h);
    void (*rmsnorm)(be *b, const float *x, const float *w, float *y, int T, int n, float eps);
    /* per-head unweighted RMS over n_heads×dim rows */
    void (*head_rms)(be *b, float *x, int rows, int dim, float eps);
    /* RoPE on the last rope_dims of each head (interleaved pairs); inverse: rotate by -θ */
    void (*rope)(be *b, float *x, int T, int n_heads, int head_dim, int rope_dims,
                 const int32_t *pos, const float *omega, int inverse);
    /* mHC (spec §2.3): h [T, n_hc, D] -> u [T, D], post [T, n_hc], comb [T, n_hc, n_hc] */
    void (*mhc_pre)(be *b, const float *h, const float *fn, const float *base,
                    const float *scale, int T, int n_hc, int D, int iters, float hc_eps,
                    float norm_eps, float *u, float *post, float *comb);
    void (*mhc_post)(be *b, float *h, const float *v, const float *post, const float *comb,
                     int T, int n_hc, int D);
    void (*hc_head)(be *b, const float *h, const float *fn, const float *base,
                    const float *scale, int T, int n_hc, int D, float hc_eps, float norm_eps,
                    float *y);
    void (*attention)(be *b, const be_attn_args *a);
    /* ring[pos mod ring_size] = kv[row] for the rows of one sequence */
    void (*ring_write)(be *b, float *ring, int ring_size, int dim, const float *kv,
                       const int32_t *pos, int T);
    void (*compress)(be *b, const be_compress_args *a);
    void (*index_topk)(be *b, const be_index_args *a);
    /* moe: out [T, D] from x [T, D]; ids [T] host */
    void (*moe)(be *b, const be_moe_layer *L, const float *x, const int32_t *ids, int T,
                float *out);
    /* elementwise helpers */
    void (*scale_rows)(be *b, float *x, int T, int n, float s);
    void (*add)(be *b, float *y, const float *x, size_t n);          /* y += x */
    void (*fp8_qat)(be *b, float *x, int T, int dim, int nope, int block); /* round trip dims [0,nope) */
    void (*hadamard_fp4)(be *b, float *x, int rows, int dim);
    void (*destroy)(be *b);
    /* optional (NULL: every step runs directly): small steps as device graphs. The forward pass
     * calls graph_begin(T) before a step's ops; BE_PASS_RECORD: run the ops (they are only
     * recorded; downloads are filled later), then graph_end says what next: BE_PASS_DONE (the
     * step ran from a graph; downloads are filled), BE_PASS_CAPTURE (run the same ops again,
     * then graph_end again) or BE_PASS_DIRECT (run them again, directly). The ops of every pass
     * must be the same calls with the same host data; host state may change only after DONE. */
    int (*graph_begin)(be *b, int T);
    int (*graph_end)(be *b);
    /* (last: the CUDA table is positional) grouped inputs: rows [g·xg_rows, (g+1)·xg_rows) of W (N a multiple of xg_rows) take
     * x + g·xg_stride: y[T, N] in one call where the attention output's groups (spec §2.4.6)
     * would be N / xg_rows matmuls */
    void (*matmul_xg)(be *b, const be_weight *W, int N, const float *x, int ldx, int xg_rows,
                      int xg_stride, float *y, int ldy, int T);
    /* mhc_pre (head_mode 0) or hc_head (1, post/comb unused), then RMSNorm of the collapsed
     * stream: x[T, D] = rmsnorm(u) · norm_w, u not kept. Every block's sublayer input and the
     * final norm (spec §2.7, §2.6) in one op where they were two. */
    void (*mhc_norm)(be *b, int head_mode, const float *h, const float *fn, const float *base,
                     const float *scale, int T, int n_hc, int D, int iters, float hc_eps,
                     float norm_eps, const float *norm_w, float *x, float *post, float *comb);
    /* ring_write into a bf16 ring ([ring_size, dim] uint16): each value rounded to nearest even */
    void (*ring_write_bf16)(be *b, uint16_t *ring, int ring_size, int dim, const float *kv,
                            const int32_t *pos, int T);
    /* ring_write for rows of several sequences in one call: row t goes to rings[t] ([T] host
     * array of backend pointers, rows of format kv_fmt; a NULL ring skips the row) at slot
     * pos[t] mod ring_size. No two written rows may map to one slot of one ring. */
    void (*ring_write_rows)(be *b, void *const *rings, int ring_size, int dim, const float *kv,
                            const int32_t *pos, int T, int kv_fmt);
    /* optional (NULL: sample on the host from downloaded logits): draws n tokens, request i
     * from row req[i].row of logits ([*, V] f32, backend memory), results into res[n] (host,
     * filled on return: the op waits for the device). See be_sample_req for the algorithm. */
    void (*sample)(be *b, const float *logits, int V, int n, const be_sample_req *req,
                   be_sample_res *res);
};

enum { BE_PASS_DIRECT = 0, BE_PASS_RECORD = 1, BE_PASS_CAPTURE = 2, BE_PASS_DONE = 3 };

struct be {
    const struct be_ops *ops;
    int n_threads;
};

/* The CPU backend: plain C11 + pthreads, fp32 accumulation. n_threads <= 0: all cores. */
be *be_cpu_create(int n_threads);

#endif
