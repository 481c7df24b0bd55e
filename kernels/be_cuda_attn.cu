/* be_cuda_attn.cu — attention with sinks over a key plan (spec §2.4.5) and the sliding-window
 * ring write.
 *
 * Why apart: its own kernel shape (block per (token, heads), online softmax per warp) and its
 * own inputs (the key plan staged per call); nothing else uses it. Rings and compressed entries
 * are f32, bf16 or FP8 rows (a.kv_fmt; kv_dev.cuh); this step's kv rows are f32, read as a
 * stored row of that format would give them back.
 */
#include "kernels/be_cuda_internal.cuh"
#include "kernels/kv_dev.cuh"

/* ======================================================================================== */
/* attention with sinks over a key plan (spec §2.4.5)                                        */
/* ======================================================================================== */

enum { ATT_WARPS = 16, ATT_MAXD = 512, ATT_HB_MIN_T = 64 };

/* An FP8 row's values at this lane's dims lane + 32·jj into kv[ATT_MAXD/32] (zero past d): NJ =
 * nope dims / 32 (two jj per scale block), then the two bf16 RoPE jj. With NJ a constant the
 * loads and conversions are straight-line: with a run-time bound both ways of every jj were
 * issued (predicated) and the FP8 attention ran 3.5x the bf16 one. */
template <int NJ>
__device__ __forceinline__ void fp8_key(const uint8_t *kp, int lane, float (&kv)[ATT_MAXD / 32]) {
    const uint16_t *rp = (const uint16_t *)(kp + kv_fp8_rope_off(NJ * 32 + 64)) + lane;
#pragma unroll
    for (int jj = 0; jj < NJ; jj += 2) {
        float sc = kv_fp8_scale(kp[NJ * 32 + (jj >> 1)]);
        kv[jj] = __fmul_rn(kv_e4m3(kp[lane + 32 * jj]), sc);
        kv[jj + 1] = __fmul_rn(kv_e4m3(kp[lane + 32 * jj + 32]), sc);
    }
#pragma unroll
    for (int jj = NJ; jj < ATT_MAXD / 32; jj++) kv[jj] = jj < NJ + 2 ? fd_bf16_to_f32(rp[32 * (jj - NJ)]) : 0.f;
}
/* the same for any head_dim fmt_kv_fp8_ok accepts (run-time bound) */
__device__ __forceinline__ void fp8_key_any(const uint8_t *kp, int d, int lane, float (&kv)[ATT_MAXD / 32]) {
    int nj = (d - 64) / 32, nd = d / 32;
    const uint16_t *rp = (const uint16_t *)(kp + kv_fp8_rope_off(d)) + lane;
#pragma unroll
    for (int jj = 0; jj < ATT_MAXD / 32; jj++)
        kv[jj] = jj < nj ? __fmul_rn(kv_e4m3(kp[lane + 32 * jj]), kv_fp8_scale(kp[d - 64 + (jj >> 1)]))
               : jj < nd ? fd_bf16_to_f32(rp[32 * (jj - nj)]) : 0.f;
}

typedef inl<be_keyplan, 8> plan_inl;

/* Key j of token t's plan p, at this lane's dims lane + 32·jj, into kv (zero past d). One load
 * loop per storage kind (the format is warp-uniform): the attention re-reads every key once per
 * head group, so per-element format branches tripled its time. */
__device__ __forceinline__ void attn_key(const be_attn_args &a, const be_keyplan &p, int t, int j,
                                         int n_ring, int n_rows, int lane, float (&kv)[ATT_MAXD / 32]) {
    int d = a.head_dim, nd = d / 32;
    const char *key; /* the key's row: stored (ring, cmp) in a.kv_fmt, this step's f32 */
    int kf = a.kv_fmt;
    size_t rb = kv_row_bytes(kf, d);
    if (j < n_ring) key = (const char *)p.ring + (size_t)((p.ring_lo + j) % p.ring_size) * rb;
    else if (j < n_ring + n_rows) key = (const char *)(a.kv + (size_t)(p.row_lo + j - n_ring) * d), kf = 0;
    else {
        int i = j - n_ring - n_rows;
        int e = a.cmp_idx ? a.cmp_idx[(size_t)t * a.idx_stride + i] : i;
        key = (const char *)kv_page_row(p.cmp, a.cmp_paging, e, rb);
    }
    if (kf == 1) {
        const uint16_t *kp = (const uint16_t *)key + lane;
#pragma unroll
        for (int jj = 0; jj < ATT_MAXD / 32; jj++) kv[jj] = jj < nd ? fd_bf16_to_f32(kp[32 * jj]) : 0.f;
    } else if (kf == 2) { /* V4's 512 and the tiny model's 128 with static loops */
        const uint8_t *kp = (const uint8_t *)key;
        if (d == 512) fp8_key<14>(kp, lane, kv);
        else if (d == 128) fp8_key<2>(kp, lane, kv);
        else fp8_key_any(kp, d, lane, kv);
    } else { /* f32: an f32 ring, or this step's rows (already rounded as the ring will hold
              * them: cu_attention's k_kv_round) */
        const float *kp = (const float *)key + lane;
#pragma unroll
        for (int jj = 0; jj < ATT_MAXD / 32; jj++) kv[jj] = jj < nd ? kp[32 * jj] : 0.f;
    }
}

/* One block per (token, HB heads): the NW warps take keys round-robin, each key loaded once for
 * the block's HB heads (the single KV head is shared by all 64: HB > 1 divides the key loads of
 * a long step by HB), an online softmax per (warp, head), merged with the sink at the end. Lane
 * owns dims lane + 32·j. A head's sums run in the same order for a given (HB, NW). */
template <int HB, int NW>
__global__ void __launch_bounds__(NW * 32) k_attn(be_attn_args a, const be_keyplan *plan,
                                                  plan_inl pm) {
    PDL_ENTER();
    __shared__ float wm[NW][HB], wl[NW][HB];
    __shared__ float wacc[NW][ATT_MAXD];
    int hgroups = a.n_heads / HB;
    int t = blockIdx.x / hgroups, h0 = (blockIdx.x % hgroups) * HB, d = a.head_dim;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nd = d / 32;
    const be_keyplan p = inl_at(plan, pm, t);
    float qv[HB][ATT_MAXD / 32], acc[HB][ATT_MAXD / 32], m[HB], l[HB];
#pragma unroll
    for (int hh = 0; hh < HB; hh++) {
        const float *q = a.q + ((size_t)t * a.n_heads + h0 + hh) * d;
#pragma unroll
        for (int j = 0; j < ATT_MAXD / 32; j++) {
            qv[hh][j] = j < nd ? q[lane + 32 * j] : 0.f;
            acc[hh][j] = 0.f;
        }
        m[hh] = -INFINITY, l[hh] = 0.f;
    }
    int n_ring = p.ring_hi - p.ring_lo, n_rows = p.row_hi - p.row_lo;
    int n_keys = n_ring + n_rows + p.n_cmp;
    for (int j = warp; j < n_keys; j += NW) {
        float kv[ATT_MAXD / 32];
        attn_key(a, p, t, j, n_ring, n_rows, lane, kv);
#pragma unroll
        for (int hh = 0; hh < HB; hh++) {
            float dot = 0.f;
#pragma unroll
            for (int jj = 0; jj < ATT_MAXD / 32; jj++) dot += qv[hh][jj] * kv[jj];
            float s = warp_sum(dot) * a.scale;
            float mn = s > m[hh] ? s : m[hh];
            float corr = expf(m[hh] - mn), e = expf(s - mn);
            l[hh] = l[hh] * corr + e;
#pragma unroll
            for (int jj = 0; jj < ATT_MAXD / 32; jj++) acc[hh][jj] = acc[hh][jj] * corr + e * kv[jj];
            m[hh] = mn;
        }
    }
    if (lane == 0)
#pragma unroll
        for (int hh = 0; hh < HB; hh++) wm[warp][hh] = m[hh], wl[warp][hh] = l[hh];
#pragma unroll
    for (int hh = 0; hh < HB; hh++) {
#pragma unroll
        for (int jj = 0; jj < ATT_MAXD / 32; jj++)
            if (jj < nd) wacc[warp][lane + 32 * jj] = acc[hh][jj];
        __syncthreads();
        int h = h0 + hh;
        float sink = a.sink[h], M = sink;
        for (int w = 0; w < NW; w++) M = wm[w][hh] > M ? wm[w][hh] : M;
        double den = exp((double)sink - M);
        float f[NW];
        for (int w = 0; w < NW; w++) {
            f[w] = wl[w][hh] > 0 ? expf(wm[w][hh] - M) : 0.f;
            den += (double)wl[w][hh] * f[w];
        }
        float inv = (float)(1.0 / den);
        float *o = a.out + ((size_t)t * a.n_heads + h) * d;
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            float sum = 0;
            for (int w = 0; w < NW; w++) sum += f[w] * wacc[w][i];
            o[i] = sum * inv;
        }
        __syncthreads(); /* wacc is rewritten for the next head */
    }
}

/* out[T, d] = this step's kv rows as a stored row of format fmt gives them back (warp per row,
 * lane dims lane + 32·j as in k_attn): what every query of the step reads for them, computed
 * once instead of once per (query, head, key) */
__global__ void k_kv_round(const float *kv, int T, int d, int fmt, float *out) {
    PDL_ENTER();
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= T) return;
    const float *x = kv + (size_t)r * d;
    float *o = out + (size_t)r * d;
    int nj = fmt == 2 ? (d - 64) / 32 : 0; /* FP8: nope dims in blocks of 64 (two j), then bf16 */
    for (int j = 0; j < nj; j += 2) {
        float v0 = x[lane + 32 * j], v1 = x[lane + 32 * j + 32];
        float am = fmaxf(fabsf(v0), fabsf(v1));
        for (int off = 16; off > 0; off >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, off));
        int e = kv_fp8_exp(am);
        o[lane + 32 * j] = kv_fp8_v(kv_fp8_q(v0, e), e);
        o[lane + 32 * j + 32] = kv_fp8_v(kv_fp8_q(v1, e), e);
    }
    for (int i = lane + 32 * nj; i < d; i += 32) o[i] = kv_round(x[i], 1);
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
    float *rkv = nullptr; /* this step's rows rounded as the stored format holds them */
    if (a->kv_fmt != BE_KV_F32) {
        rkv = (float *)scratch(b, (size_t)a->T * a->head_dim * sizeof(float));
        KL(c, k_kv_round, (unsigned)((a->T + 7) / 8), 256, 0, a->kv, a->T, a->head_dim, a->kv_fmt, rkv);
    }
    be_attn_args da; /* field by field: no padding bytes in the arguments the graph cache compares */
    memset(&da, 0, sizeof da);
    da.T = a->T, da.n_heads = a->n_heads, da.head_dim = a->head_dim, da.scale = a->scale;
    da.q = a->q, da.kv = rkv ? rkv : a->kv, da.sink = a->sink, da.cmp_idx = a->cmp_idx;
    da.idx_stride = a->idx_stride, da.out = a->out, da.kv_fmt = a->kv_fmt;
    da.cmp_paging.off = a->cmp_paging.off, da.cmp_paging.per_page = a->cmp_paging.per_page;
    /* a long step (prefill): 4 heads per block share each key load; a short one (decode):
     * a head per block, 16 warps, for parallelism */
    if (a->T >= ATT_HB_MIN_T && a->n_heads % 4 == 0)
        KL(c, (k_attn<4, 8>), a->T * (a->n_heads / 4), 8 * 32, 0, da, dp, pm);
    else
        KL(c, (k_attn<1, ATT_WARPS>), a->T * a->n_heads, ATT_WARPS * 32, 0, da, dp, pm);
    if (rkv) cu_free(b, rkv);
}

typedef inl<int32_t, 64> pos_inl;
typedef inl<void *, 16> rings_inl;
/* K = float (f32 ring), uint16_t (bf16 ring, rounded to nearest even) or uint8_t (FP8 rows);
 * block per row t, into `ring`, or (per_row) into row t's ring from rings / rm (inl_at): a NULL
 * ring skips the row */
template <typename K>
__global__ void k_ring_write(K *ring, void *const *rings, rings_inl rm, int per_row, int ring_size,
                             int dim, const float *kv, const int32_t *pos, pos_inl pm) {
    PDL_ENTER();
    int t = blockIdx.x;
    if (per_row && !(ring = (K *)inl_at(rings, rm, t))) return;
    int slot = inl_at(pos, pm, t) % ring_size;
    if constexpr (sizeof(K) == 1)
        kv_fp8_put_block((uint8_t *)ring + (size_t)slot * kv_row_bytes(2, dim), kv + (size_t)t * dim, dim);
    else
        for (int i = threadIdx.x; i < dim; i += blockDim.x)
            kv_set(ring, (size_t)slot * dim + i, sizeof(K) == 2, kv[(size_t)t * dim + i]);
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
    rings_inl rm;
    memset(&rm, 0, sizeof rm);
    KL(c, (k_ring_write<K>), T - first, 128, 0, ring, (void *const *)nullptr, rm, 0, ring_size, dim,
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
                        const int32_t *pos, int T, int kv_fmt) {
    if (T <= 0) return;
    be_cuda *c = C(b);
    /* small batches (a decode step) pass rings and positions in the parameters */
    stage_reserve(c, (size_t)T * sizeof *rings + (size_t)T * sizeof *pos + 2 * 256);
    rings_inl rm;
    void *const *dr = inl_put(c, (void *const *)rings, (size_t)T, rm);
    pos_inl pm;
    const int32_t *dp = inl_put(c, pos, (size_t)T, pm);
    if (kv_fmt == 2) KL(c, (k_ring_write<uint8_t>), T, 128, 0, nullptr, dr, rm, 1, ring_size, dim, kv, dp, pm);
    else if (kv_fmt) KL(c, (k_ring_write<uint16_t>), T, 128, 0, nullptr, dr, rm, 1, ring_size, dim, kv, dp, pm);
    else KL(c, (k_ring_write<float>), T, 128, 0, nullptr, dr, rm, 1, ring_size, dim, kv, dp, pm);
}
