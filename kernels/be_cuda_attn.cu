/* be_cuda_attn.cu — attention with sinks over a key plan (spec §2.4.5) and the sliding-window
 * ring write.
 *
 * Why apart: its own kernel shape (block per (token, head), online softmax per warp) and its
 * own inputs (the key plan staged per call); nothing else uses it.
 */
#include "kernels/be_cuda_internal.cuh"

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
        const float *key;
        if (j < n_ring) key = p.ring + (size_t)((p.ring_lo + j) % p.ring_size) * d;
        else if (j < n_ring + n_rows) key = a.kv + (size_t)(p.row_lo + j - n_ring) * d;
        else {
            int i = j - n_ring - n_rows;
            int e = a.cmp_idx ? a.cmp_idx[(size_t)t * a.idx_stride + i] : i;
            key = p.cmp + (size_t)e * d;
        }
        float kv[ATT_MAXD / 32];
        float dot = 0.f;
#pragma unroll
        for (int jj = 0; jj < ATT_MAXD / 32; jj++) {
            kv[jj] = jj < nd ? key[lane + 32 * jj] : 0.f;
            dot += qv[jj] * kv[jj];
        }
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
    da.idx_stride = a->idx_stride, da.out = a->out;
    KL(c, k_attn, a->T * a->n_heads, ATT_WARPS * 32, 0, da, dp, pm);
}

typedef inl<int32_t, 64> pos_inl;
__global__ void k_ring_write(float *ring, int ring_size, int dim, const float *kv,
                             const int32_t *pos, pos_inl pm) {
    PDL_ENTER();
    int t = blockIdx.x;
    float *dst = ring + (size_t)(inl_at(pos, pm, t) % ring_size) * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = kv[(size_t)t * dim + i];
}

void cu_ring_write(be *b, float *ring, int ring_size, int dim, const float *kv,
                          const int32_t *pos, int T) {
    if (T <= 0) return;
    be_cuda *c = C(b);
    /* several tokens may map to one slot (T > ring_size): only the last one may write */
    int first = T > ring_size ? T - ring_size : 0;
    pos_inl pm;
    const int32_t *dp = inl_put(c, pos + first, (size_t)(T - first), pm);
    KL(c, k_ring_write, T - first, 128, 0, ring, ring_size, dim, kv + (size_t)first * dim, dp, pm);
}
