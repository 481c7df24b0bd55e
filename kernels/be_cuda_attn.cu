/* be_cuda_attn.cu — attention with sinks over a key plan (spec §2.4.5) and the sliding-window
 * ring write.
 *
 * Why apart: its own kernel shape (block per (token, head), online softmax per warp) and its
 * own inputs (the key plan staged per call); nothing else uses it. Rings and compressed entries
 * are f32 or bf16 (a.kv_bf16; kv_dev.cuh); this step's kv rows are f32, read at bf16 precision
 * when kv_bf16.
 */
#include "kernels/be_cuda_internal.cuh"
#include "kernels/kv_dev.cuh"

/* ======================================================================================== */
/* attention with sinks over a key plan (spec §2.4.5)                                        */
/* ======================================================================================== */

enum { ATT_WARPS = 16, ATT_MAXD = 512 };

/* one block per (t, h); warps take keys round-robin with an online softmax each, merged with
 * the sink at the end. Lane owns dims lane + 32*j. */
typedef inl<be_keyplan, 8> plan_inl;
__global__ void __launch_bounds__(ATT_WARPS * 32) k_attn(be_attn_args a, const be_keyplan *plan,
                                                         plan_inl pm) {
    PDL_ENTER();
    __shared__ float wm[ATT_WARPS], wl[ATT_WARPS];
    __shared__ float wacc[ATT_WARPS][ATT_MAXD];
    int t = blockIdx.x / a.n_heads, h = blockIdx.x % a.n_heads, d = a.head_dim;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nd = d / 32;
    const be_keyplan p = inl_at(plan, pm, t);
    const float *q = a.q + ((size_t)t * a.n_heads + h) * d;
    float qv[ATT_MAXD / 32], acc[ATT_MAXD / 32];
#pragma unroll
    for (int j = 0; j < ATT_MAXD / 32; j++) {
        qv[j] = j < nd ? q[lane + 32 * j] : 0.f;
        acc[j] = 0.f;
    }
    int n_ring = p.ring_hi - p.ring_lo, n_rows = p.row_hi - p.row_lo;
    int n_keys = n_ring + n_rows + p.n_cmp;
    float m = -INFINITY, l = 0.f;
    for (int j = warp; j < n_keys; j += ATT_WARPS) {
        /* row `row` of a [*, d] array: ring / cmp in the KV dtype, kv f32 (rounded to bf16 as
         * the ring will hold it when kv_bf16: a no-op on values read from bf16) */
        const void *key;
        size_t row;
        int kbf = a.kv_bf16;
        if (j < n_ring) key = p.ring, row = (size_t)((p.ring_lo + j) % p.ring_size);
        else if (j < n_ring + n_rows) key = a.kv, row = (size_t)(p.row_lo + j - n_ring), kbf = 0;
        else {
            int i = j - n_ring - n_rows;
            int e = a.cmp_idx ? a.cmp_idx[(size_t)t * a.idx_stride + i] : i;
            key = kv_page_row(p.cmp, a.cmp_paging, e, (size_t)d * (kbf ? 2 : 4)), row = 0;
        }
        /* one load loop per storage kind (the flag is warp-uniform): the attention re-reads
         * every key once per head, so per-element dtype branches and roundings of values that
         * are already bf16 tripled its time */
        float kv[ATT_MAXD / 32];
        if (kbf) {
            const uint16_t *kp = (const uint16_t *)key + row * d + lane;
#pragma unroll
            for (int jj = 0; jj < ATT_MAXD / 32; jj++) kv[jj] = jj < nd ? fd_bf16_to_f32(kp[32 * jj]) : 0.f;
        } else {
            const float *kp = (const float *)key + row * d + lane;
#pragma unroll
            for (int jj = 0; jj < ATT_MAXD / 32; jj++) kv[jj] = jj < nd ? kp[32 * jj] : 0.f;
            if (a.kv_bf16) /* this step's f32 kv rows, seen as the bf16 ring will hold them */
#pragma unroll
                for (int jj = 0; jj < ATT_MAXD / 32; jj++) kv[jj] = kv_round(kv[jj], 1);
        }
        float dot = 0.f;
#pragma unroll
        for (int jj = 0; jj < ATT_MAXD / 32; jj++) dot += qv[jj] * kv[jj];
        float s = warp_sum(dot) * a.scale;
        float mn = s > m ? s : m;
        float corr = expf(m - mn), e = expf(s - mn);
        l = l * corr + e;
#pragma unroll
        for (int jj = 0; jj < ATT_MAXD / 32; jj++) acc[jj] = acc[jj] * corr + e * kv[jj];
        m = mn;
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
#pragma unroll
    for (int jj = 0; jj < ATT_MAXD / 32; jj++)
        if (jj < nd) wacc[warp][lane + 32 * jj] = acc[jj];
    __syncthreads();
    float sink = a.sink[h], M = sink;
    for (int w = 0; w < ATT_WARPS; w++) M = wm[w] > M ? wm[w] : M;
    double den = exp((double)sink - M);
    float f[ATT_WARPS];
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = wl[w] > 0 ? expf(wm[w] - M) : 0.f;
        den += (double)wl[w] * f[w];
    }
    float inv = (float)(1.0 / den);
    float *o = a.out + ((size_t)t * a.n_heads + h) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float s = 0;
        for (int w = 0; w < ATT_WARPS; w++) s += f[w] * wacc[w][i];
        o[i] = s * inv;
    }
}

void cu_attention(be *b, const be_attn_args *a) {
    if (a->T <= 0) return;
    be_cuda *c = C(b);
    if (a->head_dim % 32 || a->head_dim > ATT_MAXD) {
        fprintf(stderr, "duet cuda: attention head_dim %d is not a multiple of 32 up to %d\n",
                a->head_dim, ATT_MAXD);
        abort();
    }
    plan_inl pm;
    const be_keyplan *dp = inl_put(c, a->plan, (size_t)a->T, pm);
    be_attn_args da; /* field by field: no padding bytes in the arguments the graph cache compares */
    memset(&da, 0, sizeof da);
    da.T = a->T, da.n_heads = a->n_heads, da.head_dim = a->head_dim, da.scale = a->scale;
    da.q = a->q, da.kv = a->kv, da.sink = a->sink, da.cmp_idx = a->cmp_idx;
    da.idx_stride = a->idx_stride, da.out = a->out, da.kv_bf16 = a->kv_bf16;
    da.cmp_paging.off = a->cmp_paging.off, da.cmp_paging.per_page = a->cmp_paging.per_page;
    KL(c, k_attn, a->T * a->n_heads, ATT_WARPS * 32, 0, da, dp, pm);
}

typedef inl<int32_t, 64> pos_inl;
/* K = float (f32 ring) or uint16_t (bf16 ring, rounded to nearest even); block per row t, into
 * rings[t] (device array: ring_write_rows) or, rings NULL, into ring */
template <typename K>
__global__ void k_ring_write(K *ring, void *const *rings, int ring_size, int dim, const float *kv,
                             const int32_t *pos, pos_inl pm) {
    PDL_ENTER();
    int t = blockIdx.x;
    if (rings) ring = (K *)rings[t];
    size_t slot = (size_t)(inl_at(pos, pm, t) % ring_size) * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        kv_set(ring, slot + i, sizeof(K) == 2, kv[(size_t)t * dim + i]);
}

template <typename K>
static void ring_write(be *b, K *ring, int ring_size, int dim, const float *kv, const int32_t *pos,
                       int T) {
    if (T <= 0) return;
    be_cuda *c = C(b);
    /* several tokens may map to one slot (T > ring_size): only the last one may write */
    int first = T > ring_size ? T - ring_size : 0;
    pos_inl pm;
    const int32_t *dp = inl_put(c, pos + first, (size_t)(T - first), pm);
    KL(c, (k_ring_write<K>), T - first, 128, 0, ring, nullptr, ring_size, dim,
       kv + (size_t)first * dim, dp, pm);
}

void cu_ring_write(be *b, float *ring, int ring_size, int dim, const float *kv,
                   const int32_t *pos, int T) {
    ring_write(b, ring, ring_size, dim, kv, pos, T);
}

void cu_ring_write_bf16(be *b, uint16_t *ring, int ring_size, int dim, const float *kv,
                        const int32_t *pos, int T) {
    ring_write(b, ring, ring_size, dim, kv, pos, T);
}

void cu_ring_write_rows(be *b, void *const *rings, int ring_size, int dim, const float *kv,
                        const int32_t *pos, int T, int kv_bf16) {
    if (T <= 0) return;
    be_cuda *c = C(b);
    stage_reserve(c, (size_t)T * sizeof *rings + (size_t)T * sizeof *pos + 2 * 256);
    void *const *dr = (void *const *)stage(c, rings, (size_t)T * sizeof *rings);
    pos_inl pm;
    const int32_t *dp = inl_put(c, pos, (size_t)T, pm);
    if (kv_bf16) KL(c, (k_ring_write<uint16_t>), T, 128, 0, nullptr, dr, ring_size, dim, kv, dp, pm);
    else KL(c, (k_ring_write<float>), T, 128, 0, nullptr, dr, ring_size, dim, kv, dp, pm);
}
