/* be_cuda_cmp.cu — the KV compressor (spec §2.4.3: windows, gates, carried window state, QAT)
 * and the indexer (spec §2.4.4: scores and exact top-k).
 *
 * Why apart: both work on compressed entries and carry state across calls; they are checked
 * together by the compressor/indexer cases of tests/cuda/test_cuda_ops.c. Entries are f32, bf16
 * or FP8 rows, indexer keys f32 or bf16 (kv_fmt; kv_dev.cuh); the window carries are always f32.
 */
#include "kernels/be_cuda_internal.cuh"
#include "kernels/kv_dev.cuh"

/* ======================================================================================== */
/* compressor (spec §2.4.3)                                                                  */
/* ======================================================================================== */

/* Value of the A (gate: G) input of window row r, half `off` (0 or d), channel ch, for a row at
 * absolute position p: from this call's inputs if p >= pos0, else from the state at call start
 * (cur_*: rows of the current window; prev_*: the last closed window's A-halves). */
/* no padding bytes (kernel arguments are compared byte for byte by the graph cache); pos0 is
 * filled in the kernel from the call's position (device or parameter), never by the host */
typedef struct {
    int T, m, c, d, rope_dims, pos0;
    float eps;
    int fp8_nope_qat;
    const float *a, *g, *ape, *norm;
    const float *omega;
    float *cur_a, *cur_g, *prev_a, *prev_g;
    void *const *entries;      /* page table: rows [*, d] f32, or bf16 when kv_fmt */
    int hadamard_fp4_qat, kv_fmt;
    be_paging paging;
} cmp_dev;
typedef inl<int, 1> pos0_inl;

/* the window range [w_first, w_end) that closes at tokens of this call */
__device__ __forceinline__ cmp_dev cmp_at(const cmp_dev &ain, const int *dp, const pos0_inl &pm,
                                          int *w_first, int *w_end) {
    cmp_dev a = ain;
    a.pos0 = inl_at(dp, pm, 0);
    *w_first = a.pos0 / a.m;          /* smallest w with w*m + m - 1 >= pos0 */
    *w_end = (a.pos0 + a.T) / a.m;    /* windows w < w_end close by pos0 + T - 1 */
    return a;
}

/* candidate i of window w, channel ch: c == 1: row i of the window; c == 2: even i = row i/2's
 * B-half of window w, odd i = row i/2's A-half of window w-1 (the CPU's order) */
__device__ __forceinline__ void cmp_cand(const cmp_dev &a, int w, int i, int ch, float *av, float *gv) {
    int m = a.m, d = a.d, cd = a.c * d;
    int r = a.c == 2 ? i / 2 : i;
    if (a.c == 1 || (i & 1) == 0) {
        int off = a.c == 2 ? d : 0, p = w * m + r;
        if (p >= a.pos0) {
            int t = p - a.pos0;
            *av = a.a[(size_t)t * cd + off + ch];
            *gv = a.g[(size_t)t * cd + off + ch] + a.ape[(size_t)r * cd + off + ch];
        } else {
            *av = a.cur_a[(size_t)r * cd + off + ch];
            *gv = a.cur_g[(size_t)r * cd + off + ch];
        }
        return;
    }
    int pp = (w - 1) * m + r;
    if (pp >= a.pos0) {
        int t = pp - a.pos0;
        *av = a.a[(size_t)t * cd + ch];
        *gv = a.g[(size_t)t * cd + ch] + a.ape[(size_t)r * cd + ch];
    } else if (w * m - 1 >= a.pos0) { /* window w-1 closes in this call: rows from cur at start */
        *av = a.cur_a[(size_t)r * cd + ch];
        *gv = a.cur_g[(size_t)r * cd + ch];
    } else {
        *av = a.prev_a[(size_t)r * d + ch];
        *gv = a.prev_g[(size_t)r * d + ch];
    }
}

/* block per window that may close (blocks past the closing ones return); shared z[d] */
__global__ void __launch_bounds__(256) k_cmp_windows(cmp_dev ain, const int *dp, pos0_inl pm) {
    PDL_ENTER();
    extern __shared__ float z[];
    __shared__ float sh[32];
    int w_first, w_end;
    cmp_dev a = cmp_at(ain, dp, pm, &w_first, &w_end);
    int w = w_first + blockIdx.x, m = a.m, d = a.d;
    if (w >= w_end) return;
    for (int ch = threadIdx.x; ch < d; ch += blockDim.x) {
        int nc = m * a.c;
        float mx = -INFINITY, av, gv;
        for (int i = 0; i < nc; i++) {
            cmp_cand(a, w, i, ch, &av, &gv);
            mx = gv > mx ? gv : mx;
        }
        double den = 0, num = 0;
        for (int i = 0; i < nc; i++) {
            cmp_cand(a, w, i, ch, &av, &gv);
            double e = exp((double)gv - mx);
            den += e;
            num += e * av;
        }
        z[ch] = (float)(num / den);
    }
    __syncthreads();
    float ss = 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += z[i] * z[i];
    ss = block_sum(ss, sh);
    float r = inv_rms_dev(ss, d, a.eps);
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) z[i] = a.norm[i] * (z[i] * r);
    __syncthreads();
    float *rp = z + d - a.rope_dims;
    for (int i = threadIdx.x; i < a.rope_dims / 2; i += blockDim.x) rope_pair(rp, i, w * m, a.omega, 0);
    __syncthreads();
    if (a.fp8_nope_qat) {
        int nope = d - a.rope_dims;
        for (int i = threadIdx.x * 64; i + 64 <= nope; i += blockDim.x * 64) fd_act_quant_fp8(z + i, 64);
        __syncthreads();
    }
    if (a.hadamard_fp4_qat) {
        fd_hadamard_block(z, d);
        for (int i = threadIdx.x * 32; i < d; i += blockDim.x * 32)
            fd_fp4_roundtrip(z + i, d - i < 32 ? d - i : 32);
        __syncthreads();
    }
    void *row = kv_page_row(a.entries, a.paging, w, kv_row_bytes(a.kv_fmt, d));
    if (a.kv_fmt == 2) { /* z is complete: every pass above ends with a barrier */
        kv_fp8_put_block((uint8_t *)row, z, d);
    } else {
        for (int i = threadIdx.x; i < d; i += blockDim.x) kv_set(row, (size_t)i, a.kv_fmt, z[i]);
    }
}

/* prev <- A-halves of the last window closed in this call (if any), from inputs or the state at
 * call start */
__global__ void k_cmp_prev(cmp_dev ain, const int *dp, pos0_inl pm) {
    PDL_ENTER();
    int w_first, w_end;
    cmp_dev a = cmp_at(ain, dp, pm, &w_first, &w_end);
    if (w_end <= w_first) return;
    int wl = w_end - 1, m = a.m, d = a.d, cd = a.c * d;
    for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < m * d; idx += gridDim.x * blockDim.x) {
        int r = idx / d, ch = idx % d, p = wl * m + r;
        float av, gv;
        if (p >= a.pos0) {
            int t = p - a.pos0;
            av = a.a[(size_t)t * cd + ch];
            gv = a.g[(size_t)t * cd + ch] + a.ape[(size_t)r * cd + ch];
        } else {
            av = a.cur_a[(size_t)r * cd + ch];
            gv = a.cur_g[(size_t)r * cd + ch];
        }
        a.prev_a[(size_t)r * d + ch] = av;
        a.prev_g[(size_t)r * d + ch] = gv;
    }
}

/* cur rows <- the last token of this call at each window row */
__global__ void k_cmp_cur(cmp_dev ain, const int *dp, pos0_inl pm) {
    PDL_ENTER();
    int w_first, w_end;
    cmp_dev a = cmp_at(ain, dp, pm, &w_first, &w_end);
    int m = a.m, cd = a.c * a.d;
    for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < m * cd; idx += gridDim.x * blockDim.x) {
        int j = idx / cd, i = idx % cd;
        int t = ((j - a.pos0 % m) % m + m) % m; /* first token at row j */
        if (t >= a.T) continue;
        t += (a.T - 1 - t) / m * m;             /* last one */
        a.cur_a[(size_t)j * cd + i] = a.a[(size_t)t * cd + i];
        a.cur_g[(size_t)j * cd + i] = a.g[(size_t)t * cd + i] + a.ape[(size_t)j * cd + i];
    }
}

void cu_compress(be *b, const be_compress_args *a) {
    if (a->T <= 0) return;
    be_cuda *c = C(b);
    int m = a->m, pos0 = a->pos[0], T = a->T;
    for (int t = 1; t < T; t++)
        if (a->pos[t] != pos0 + t) {
            fprintf(stderr, "duet cuda: compress needs consecutive positions\n");
            abort();
        }
    if (m > 128 || (a->c == 2 && m > 128) || a->d > 4096) {
        fprintf(stderr, "duet cuda: compress ratio %d or width %d unsupported\n", m, a->d);
        abort();
    }
    cmp_dev d;
    memset(&d, 0, sizeof d);
    d.T = T, d.m = m, d.c = a->c, d.d = a->d, d.rope_dims = a->rope_dims, d.eps = a->eps;
    d.a = a->a, d.g = a->g, d.ape = a->ape, d.norm = a->norm;
    d.cur_a = a->cur_a, d.cur_g = a->cur_g, d.prev_a = a->prev_a, d.prev_g = a->prev_g;
    d.entries = a->entries, d.fp8_nope_qat = a->fp8_nope_qat;
    d.hadamard_fp4_qat = a->hadamard_fp4_qat, d.kv_fmt = a->kv_fmt;
    d.paging.off = a->paging.off, d.paging.per_page = a->paging.per_page;
    pos0_inl pm;
    const int *dp = inl_put(c, &pos0, 1, pm);
    /* windows closing at tokens of this call: positions w*m + m-1 in [pos0, pos0+T). A graphed
     * step launches for the most windows T tokens can close (the kernels find the real range
     * from the position), so that the launches do not depend on the position. */
    int nw = (pos0 + T) / m - pos0 / m, nw_max = (T + m - 1) / m;
    if (c->gmode) nw = nw_max;
    if (nw > 0) {
        /* omega: staged only when a window may close (k_cmp_windows) */
        d.omega = (const float *)stage(c, a->omega, (size_t)(a->rope_dims / 2) * sizeof(float));
        KL(c, k_cmp_windows, nw, 256, (size_t)a->d * sizeof(float), d, dp, pm);
        if (a->c == 2) KL(c, k_cmp_prev, grid_for((size_t)m * a->d, 256), 256, 0, d, dp, pm);
    }
    KL(c, k_cmp_cur, grid_for((size_t)m * a->c * a->d, 256), 256, 0, d, dp, pm);
}

/* ======================================================================================== */
/* indexer scores and top-k (spec §2.4.4)                                                    */
/* ======================================================================================== */

/* grid (ceil(nv_max/8), T); q row staged in shared memory; warp per entry */
typedef inl<int, 64> nvis_inl;
enum { IDX_GEMM_MIN_T = 64 }; /* rows of one sequence from which the scores are a GEMM */
__global__ void __launch_bounds__(256) k_index_scores(be_index_args a, const int *nvis, nvis_inl nm,
                                                      void *const *const *rkeys, float *scores,
                                                      int ld) {
    PDL_ENTER();
    extern __shared__ float qs[];
    int t = blockIdx.y, nv = inl_at(nvis, nm, t), hd = a.head_dim, H = a.n_heads;
    const float *q = a.q + (size_t)t * H * hd;
    for (int i = threadIdx.x; i < H * hd; i += blockDim.x) qs[i] = q[i];
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int e = blockIdx.x * 8 + warp;
    if (e >= nv) return;
    const float *w = a.w + (size_t)t * H;
    float kv[16];
    int nk = (hd + 31) / 32;
    const void *key = kv_page_row(rkeys ? rkeys[t] : a.keys, a.paging, e, kv_row_bytes(a.kv_fmt, hd));
    for (int j = 0; j < 16; j++)
        kv[j] = (j < nk && lane + 32 * j < hd) ? kv_at(key, (size_t)(lane + 32 * j), a.kv_fmt) : 0.f;
    float score = 0;
    for (int g = 0; g < H; g++) {
        float dot = 0;
        for (int j = 0; j < 16; j++)
            if (j < nk && lane + 32 * j < hd) dot += qs[g * hd + lane + 32 * j] * kv[j];
        dot = warp_sum(dot);
        score += w[g] * (dot > 0 ? dot : 0);
    }
    if (lane == 0) scores[(size_t)t * ld + e] = score;
}

__device__ __forceinline__ uint32_t ord_key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Appends, in index order, every i < nv whose key is > thr (eq = 0) or == thr (eq = 1) to
 * out[*cnt ...], writing only positions < limit; block-wide (every thread calls it), without
 * atomics: a ballot per warp and the warps' totals give each entry its position. */
__device__ void topk_append(const float *sc, int nv, uint32_t thr, int eq, int32_t *out,
                            int *cnt, int limit) {
    __shared__ int warp_tot[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (int)(blockDim.x + 31) >> 5;
    for (int base = 0; base < nv; base += blockDim.x) {
        int i = base + (int)threadIdx.x, f = 0;
        if (i < nv) {
            uint32_t key = ord_key(sc[i]);
            f = eq ? key == thr : key > thr;
        }
        unsigned bal = __ballot_sync(0xffffffffu, f);
        if (lane == 0) warp_tot[w] = __popc(bal);
        __syncthreads();
        int off = 0, tot = 0;
        for (int j = 0; j < nw; j++) {
            off += j < w ? warp_tot[j] : 0;
            tot += warp_tot[j];
        }
        int pos = *cnt + off + __popc(bal & ((1u << lane) - 1u));
        if (f && pos < limit) out[pos] = i;
        __syncthreads(); /* every thread has read *cnt and warp_tot */
        if (threadIdx.x == 0) *cnt += tot;
        __syncthreads();
        if (*cnt >= limit) return; /* uniform: the same value in every thread */
    }
}

/* block per row: radix-select the k-th largest key, then write all larger entries and the
 * lowest-indexed equal ones (the set the CPU heap keeps, up to ties) */
__global__ void __launch_bounds__(256) k_topk(const float *scores, int ld, const int *nvis,
                                              nvis_inl nm, int topk, int32_t *idx) {
    PDL_ENTER();
    __shared__ unsigned hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ int s_need, s_cnt;
    int t = blockIdx.x, nv = inl_at(nvis, nm, t);
    int k = topk < nv ? topk : nv;
    const float *sc = scores + (size_t)t * ld;
    int32_t *out = idx + (size_t)t * topk;
    if (k <= 0) return;
    if (k == nv) {
        for (int i = threadIdx.x; i < nv; i += blockDim.x) out[i] = i;
        return;
    }
    if (threadIdx.x == 0) { s_prefix = 0; s_need = k; }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        uint32_t pre = s_prefix, mask = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
        /* 4 loads in flight per thread, warp-aggregated histogram adds */
        for (int base = 0; base < nv; base += 4 * (int)blockDim.x) {
            uint32_t kk[4];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                int i = base + u * (int)blockDim.x + (int)threadIdx.x;
                kk[u] = i < nv ? ord_key(sc[i]) : 0u;
            }
#pragma unroll
            for (int u = 0; u < 4; u++) {
                int i = base + u * (int)blockDim.x + (int)threadIdx.x;
                hist_add_warp(hist, i < nv && (kk[u] & mask) == (pre & mask), (kk[u] >> shift) & 255u);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int need = s_need;
            for (int dgt = 255; dgt >= 0; dgt--) {
                if ((int)hist[dgt] >= need) {
                    s_prefix = pre | ((uint32_t)dgt << shift);
                    break;
                }
                need -= (int)hist[dgt];
            }
            s_need = need; /* how many entries equal to the final key to take */
        }
        __syncthreads();
    }
    uint32_t thr = s_prefix;
    if (threadIdx.x == 0) s_cnt = 0;
    __syncthreads();
    /* every larger entry, then the lowest-indexed equal ones, each in index order: the output
     * is the same bits on every run (attention then sums its keys in a fixed order) */
    topk_append(sc, nv, thr, 0, out, &s_cnt, k);
    topk_append(sc, nv, thr, 1, out, &s_cnt, k);
}

/* ---- scores of a long step as a GEMM ----------------------------------------------------- */

/* Kc[e, :] = index key e of one sequence as f32 (warp per entry) */
__global__ void k_gather_keys(void *const *tab, be_paging pg, int fmt, int n, int hd, float *Kc) {
    PDL_ENTER();
    int e = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (e >= n) return;
    const void *key = kv_page_row(tab, pg, e, kv_row_bytes(fmt, hd));
    for (int i = lane; i < hd; i += 32) Kc[(size_t)e * hd + i] = kv_at(key, (size_t)i, fmt);
}

/* scores[t, e] = Σ_h w[t, h] · relu(dots[(t - t0)·H + h, e]) for e < n_visible[t], heads in
 * order as the CPU sums them; grid (ceil(ne/256), rows) */
__global__ void k_index_reduce(const float *dots, int ne, const float *w, int H, int t0,
                               const int *nvis, nvis_inl nm, float *scores, int ld) {
    PDL_ENTER();
    int r = blockIdx.y, t = t0 + r, e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= inl_at(nvis, nm, t)) return;
    const float *dr = dots + (size_t)r * H * ne + e, *wr = w + (size_t)t * H;
    float sc = 0;
    for (int h = 0; h < H; h++) {
        float d = dr[(size_t)h * ne];
        sc += wr[h] * (d > 0 ? d : 0);
    }
    scores[(size_t)t * ld + e] = sc;
}

/* The scores of T rows of one sequence (a prefill chunk): the keys gathered once, then for
 * chunks of rows one cuBLAS SGEMM (rows·heads × entries, dims deep) and a reduction over heads,
 * instead of a warp per (row, entry) reducing 64 dot products by shuffles (that kernel was a
 * quarter of an 8K prefill). */
static void index_scores_gemm(be *b, const be_index_args *a, int nvmax, const int *dn,
                              const nvis_inl &nm, float *scores, int ld) {
    be_cuda *c = C(b);
    int H = a->n_heads, hd = a->head_dim;
    float *Kc = (float *)scratch(b, (size_t)nvmax * hd * sizeof(float));
    be_paging pg;
    memset(&pg, 0, sizeof pg);
    pg.off = a->paging.off, pg.per_page = a->paging.per_page;
    KL(c, k_gather_keys, (unsigned)((nvmax + 7) / 8), 256, 0, a->keys, pg, a->kv_fmt, nvmax, hd, Kc);
    int R = (int)(((size_t)64 << 20) / ((size_t)H * nvmax * sizeof(float)));
    R = R < 1 ? 1 : R > a->T ? a->T : R;
    float *dots = (float *)scratch(b, (size_t)R * H * nvmax * sizeof(float));
    for (int t0 = 0; t0 < a->T; t0 += R) {
        int n = a->T - t0 < R ? a->T - t0 : R;
        sgemm_nt(c, n * H, nvmax, hd, a->q + (size_t)t0 * H * hd, hd, Kc, hd, dots, nvmax);
        KL(c, k_index_reduce, dim3((nvmax + 255) / 256, n), 256, 0, dots, nvmax, a->w, H, t0, dn, nm,
           scores, ld);
    }
    cu_free(b, dots);
    cu_free(b, Kc);
}

void cu_index_topk(be *b, const be_index_args *a) {
    if (a->T <= 0) return;
    be_cuda *c = C(b);
    int nvmax = 0;
    for (int t = 0; t < a->T; t++) nvmax = a->n_visible[t] > nvmax ? a->n_visible[t] : nvmax;
    if (nvmax == 0) return;
    if (a->kv_fmt == BE_KV_FP8) {
        fprintf(stderr, "duet cuda: indexer keys are f32 or bf16, not FP8 rows\n");
        abort();
    }
    if (a->head_dim > 512 || (size_t)a->n_heads * a->head_dim * 4 > 200 * 1024) {
        fprintf(stderr, "duet cuda: indexer shape %d x %d unsupported\n", a->n_heads, a->head_dim);
        abort();
    }
    nvis_inl nm;
    const int *dn = inl_put(c, a->n_visible, (size_t)a->T, nm);
    /* a graphed step sizes scores and grid by a power of two >= the most visible entries, so
     * that its launches change only when that bound doubles (the kernels read n_visible) */
    int ld = nvmax;
    if (c->gmode)
        for (ld = 64; ld < nvmax;) ld *= 2;
    be_index_args ka; /* field by field: no padding bytes in the arguments the graph cache compares */
    memset(&ka, 0, sizeof ka);
    ka.T = a->T, ka.n_heads = a->n_heads, ka.head_dim = a->head_dim, ka.topk = a->topk;
    ka.q = a->q, ka.w = a->w, ka.keys = a->keys, ka.idx = a->idx, ka.kv_fmt = a->kv_fmt;
    ka.paging.off = a->paging.off, ka.paging.per_page = a->paging.per_page;
    /* n_visible and row_keys stay NULL (host pointers): kernels read dn and drk */
    void *const *const *drk = a->row_keys
        ? (void *const *const *)stage(c, a->row_keys, (size_t)a->T * sizeof *a->row_keys) : nullptr;
    /* row t's scores are written and read for entries < n_visible[t] only: not zeroed */
    float *scores = (float *)scratch(b, (size_t)a->T * ld * sizeof(float));
    size_t smem = (size_t)a->n_heads * a->head_dim * sizeof(float);
    static size_t smem_set; /* the attribute is per function: set once for the largest size */
    if (smem > 48 * 1024 && smem > smem_set) {
        CK(cudaFuncSetAttribute(k_index_scores, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        smem_set = smem;
    }
    if (!a->row_keys && a->T >= IDX_GEMM_MIN_T && !c->gmode) {
        index_scores_gemm(b, a, nvmax, dn, nm, scores, ld);
    } else {
        dim3 g((ld + 7) / 8, a->T);
        KL(c, k_index_scores, g, 256, smem, ka, dn, nm, drk, scores, ld);
    }
    KL(c, k_topk, a->T, 256, 0, scores, ld, dn, nm, a->topk, a->idx);
    cu_free(b, scores);
}
