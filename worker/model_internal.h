/* model_internal.h — the layout of a loaded model and of sequence state, shared by model.c
 * (loading) and forward.c (the math). Nothing outside worker/ includes this.
 */
#ifndef DUET_MODEL_INTERNAL_H
#define DUET_MODEL_INTERNAL_H

#include "worker/model.h"

typedef struct {
    int ratio;                 /* m: 0 (SWA), 4 (CSA), 128 (HCA) */
    const float *omega;        /* RoPE table of this layer (host, [rope_dims/2]) */
    /* mHC: fn [(2+n_hc)*n_hc, n_hc*D], base [(2+n_hc)*n_hc], scale [3] */
    float *hc_attn_fn, *hc_attn_base, *hc_attn_scale;
    float *hc_ffn_fn, *hc_ffn_base, *hc_ffn_scale;
    float *attn_norm, *ffn_norm;          /* [D] */
    be_weight *wq_a;           /* [q_lora, D] */
    float *q_norm;             /* [q_lora] */
    /* split across ranks (TP): wq_b rows, wo_a rows and wo_b columns of this rank's heads and
     * groups; shapes below are per rank with Hl = H/world, Gl = G/world */
    be_weight *wq_b;           /* [Hl*dh, q_lora] */
    be_weight *wkv;            /* [dh, D] */
    float *kv_norm;            /* [dh] */
    int groups;                /* Gl: output groups touched by this rank's heads */
    int heads_per_group;       /* this rank's heads in each of them (H/G, or Hl if fewer) */
    be_weight *wo_a;           /* [Gl*o_lora, heads_per_group*dh] */
    be_weight *wo_b;           /* [D, Gl*o_lora] */
    float *sink_all;           /* [H] */
    float *sink;               /* this rank's heads: sink_all + first local head */
    /* compressor (ratio > 0): wkv/wgate [c*dh, D], ape [m, c*dh], norm [dh] */
    be_weight *c_wkv, *c_wgate;
    float *c_ape, *c_norm;
    /* indexer (ratio 4): wq_b [nI*ihd, q_lora], weights_proj [nI, D], compressor [2*ihd, D] */
    be_weight *i_wq_b, *i_wproj, *ic_wkv, *ic_wgate;
    float *ic_ape, *ic_norm;
    /* MoE */
    be_weight *gate, *s1, *s2, *s3;
    float *gate_bias;          /* [E] or NULL */
    int64_t *tid2eid;          /* [vocab, k] host or NULL */
    be_weight **experts;       /* [3*E]: w1[0..E), w2[E..2E), w3[2E..3E); NULL unless owned
                                  by this rank (EP: experts [rank*E/world, (rank+1)*E/world)) */
    be_moe_layer moe;
    /* where this layer's compressed entries / indexer keys are in a KV page (kvstate.c) */
    be_paging cmp_pg, ikey_pg;
} dv4_layer;

typedef struct dv4_page dv4_page;
typedef struct dv4_kvpool dv4_kvpool;

struct dv4_model {
    dv4_config cfg;
    be *b;
    dv4_shard shard;
    st_set *st;
    uint64_t fingerprint;
    uint64_t rank_bytes;       /* checkpoint bytes of the weights this rank uses */
    be_weight *embed, *head;   /* [vocab, D] */
    float *norm;               /* [D] */
    float *hc_head_fn, *hc_head_base, *hc_head_scale;
    float *omega_main, *omega_cmp;
    int n_layers;
    dv4_layer *layers;
    int block;                 /* B: KV block size in tokens (dv4_set_block_size) */
    dv4_kv_dtype kv_dtype;     /* storage of rings, compressed entries, indexer keys */
    int n_state;               /* live sequences + snapshots (the KV dtype is fixed while > 0) */
    dv4_kvpool *pool;          /* pages of growing state (kvstate.c), made on first use */
};

/* the ring holds the model's KV dtype (f32 or bf16); the carries are always f32. Compressed
 * entries and indexer keys are paged: dv4_seq.tab and dv4_layer.cmp_pg / ikey_pg. */
typedef struct {
    void *ring;                /* [window, dh] raw kv, slot = pos mod window */
    float *cur_a, *cur_g;      /* [m, c*dh] current window */
    float *prev_a, *prev_g;    /* [m, dh] previous window A-halves (CSA) */
    float *icur_a, *icur_g, *iprev_a, *iprev_g; /* indexer compressor state */
} dv4_seq_layer;

struct dv4_seq {
    int pos;                   /* tokens processed */
    int cap;                   /* max tokens */
    int grown;                 /* positions the growing state holds: a multiple of block */
    int block;                 /* B the sequence grows by */
    int n_layers;
    dv4_seq_layer *L;
    dv4_page **pg;             /* [cap_pages] host: the pages of blocks 0..n_pages-1 */
    void **tab;                /* [cap_pages] backend memory: their addresses (the page table
                                  the kernels read) */
    int n_pages, cap_pages;
};

void dv4_kv_pool_destroy(dv4_model *m); /* frees the pool; no page may be held */
/* backend.h BE_KV_* format of the rings and compressed entries, and of the indexer keys */
int dv4_kv_fmt(const dv4_model *m);
int dv4_ikey_fmt(const dv4_model *m);

#endif
