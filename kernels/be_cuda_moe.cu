/* be_cuda_moe.cu — the MoE layer (spec §2.5): gate, routing (score or hash), the routed experts
 * grouped by expert (GEMV chunks, 64-row tiles or bf16 tensor cores on several streams), the
 * shared expert and the weighted combine.
 *
 * Why apart: the routed experts are most of V4-Flash's weights and have their own grouping,
 * streams and scratch; the dense matmul helpers come from be_cuda_gemm.cu.
 */
#include "kernels/be_cuda_internal.cuh"

/* ======================================================================================== */
/* MoE (spec §2.5)                                                                          */
/* ======================================================================================== */

/* grouped over experts: tile blockIdx.y = {expert e, first pair p0, pairs n <= 64};
 * y[p0 + r] = W_e · x[xrows ? xrows[p0 + r] : p0 + r] */
typedef struct { int e, p0, n; } gtile;
__global__ void __launch_bounds__(256) k_gemm_grouped(const dw *ws, const gtile *tiles, int N,
                                                      const float *__restrict__ x, int ldx,
                                                      const int32_t *xrows, float *__restrict__ y,
                                                      int ldy) {
    PDL_ENTER();
    gtile tl = tiles[blockIdx.y];
    gemm_tile(ws[tl.e], 0, N, xrows ? x : x + (size_t)tl.p0 * ldx, ldx, xrows ? xrows + tl.p0 : NULL,
              y + (size_t)tl.p0 * ldy, ldy, tl.n, 0, blockIdx.x * TN);
}

__device__ __forceinline__ float softplus_dev(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* the hash layer's experts of pair i: staged (d) or in the parameters (m) */
typedef inl<int32_t, 64> hsel_inl;

/* One warp routes token t (logits lt, E <= 1024, K <= 32): scores sqrt(softplus(logit)),
 * selection (bias top-K by K rounds of a warp argmax, ties to the lowest expert id like the
 * CPU; or, hash, the ids of pairs t·K + k from hd / hm), weights (normalised in k order). Lane l
 * holds experts l + 32 j in registers; lane k < K returns the k-th expert (*e), its weight (*w). */
__device__ __forceinline__ void route_warp(const float *lt, int E, int K, const float *bias, int hash,
                                           const int32_t *hd, const hsel_inl &hm, int t,
                                           int norm_topk, float route_scale, int *e_out,
                                           float *w_out) {
    int lane = threadIdx.x & 31, mine = -1;
    if (hash) {
        if (lane < K) mine = inl_at(hd, hm, t * K + lane);
    } else {
        float v[32];
        unsigned used = 0;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            if (32 * j >= E) break; /* uniform: groups past E are never read below */
            int e = 32 * j + lane;
            v[j] = -INFINITY;
            if (e < E) v[j] = sqrtf(softplus_dev(lt[e])) + (bias ? bias[e] : 0.0f);
            else used |= 1u << j;
        }
        for (int k = 0; k < K; k++) {
            float bv = -INFINITY;
            int be = -1;
#pragma unroll
            for (int j = 0; j < 32; j++) {
                if (32 * j >= E) break;
                if (!((used >> j) & 1u) && (be < 0 || v[j] > bv)) { bv = v[j]; be = 32 * j + lane; }
            }
            for (int o = 16; o > 0; o >>= 1) {
                float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                int oe = __shfl_xor_sync(0xffffffffu, be, o);
                if (oe >= 0 && (be < 0 || ov > bv || (ov == bv && oe < be))) { bv = ov; be = oe; }
            }
            if (be >= 0 && (be & 31) == lane) used |= 1u << (be >> 5);
            if (lane == k) mine = be;
        }
    }
    float sc = lane < K && mine >= 0 ? sqrtf(softplus_dev(lt[mine])) : 0.0f, sum = 0;
    for (int k = 0; k < K; k++) sum += __shfl_sync(0xffffffffu, sc, k);
    *e_out = mine;
    *w_out = (norm_topk ? sc / (sum + 1e-20f) : sc) * route_scale;
}

/* warp per token (8 per block of 256): sel [T, K], wsel [T, K]. E <= 1024, K <= 16. */
__global__ void __launch_bounds__(256) k_route(const float *logits, int T, int E, int K,
                                               const float *bias, int hash, const int32_t *hd,
                                               hsel_inl hm, int norm_topk, float route_scale,
                                               int32_t *sel, float *wsel) {
    PDL_ENTER();
    int t = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (t >= T) return;
    int e;
    float w;
    route_warp(logits + (size_t)t * E, E, K, bias, hash, hd, hm, t, norm_topk, route_scale, &e, &w);
    if (lane < K) {
        sel[(size_t)t * K + lane] = e;
        wsel[(size_t)t * K + lane] = w;
    }
}

__global__ void k_gather(const float *x, const int32_t *rows, int n, int D, float *xs) {
    PDL_ENTER();
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * D) return;
    int r = (int)(idx / D), i = (int)(idx % D);
    xs[idx] = x[(size_t)rows[r] * D + i];
}

__global__ void k_swiglu(float *g, const float *p, int n, int I, float limit, const float *wts) {
    PDL_ENTER();
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * I) return;
    int r = (int)(idx / I);
    float gv = g[idx], pv = p[idx];
    if (limit > 0) {
        if (gv > limit) gv = limit;
        if (pv > limit) pv = limit;
        if (pv < -limit) pv = -limit;
    }
    g[idx] = gv / (1.0f + expf(-gv)) * pv * (wts ? wts[r] : 1.0f);
}

/* out[rows[r]] += ys[r], rows of one expert are distinct tokens, so no races */
__global__ void k_scatter_add(float *out, const float *ys, const int32_t *rows, int n, int D) {
    PDL_ENTER();
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * D) return;
    int r = (int)(idx / D), i = (int)(idx % D);
    int t = rows ? rows[r] : r;
    atomicAdd(&out[(size_t)t * D + i], ys[idx]);
}

static void expert_ffn(be_cuda *c, const be_weight *w1, const be_weight *w2, const be_weight *w3,
                       const float *xs, int n, int D, int I, const float *wts, float limit,
                       float *g, float *p, float *ys) {
    mm(c, w1, 0, I, xs, D, g, I, n);
    mm(c, w3, 0, I, xs, D, p, I, n);
    size_t nI = (size_t)n * I;
    KL(c, k_swiglu, (unsigned)((nI + 255) / 256), 256, 0, g, p, n, I, limit, wts);
    mm(c, w2, 0, D, g, I, ys, D, n);
}

/* ---- grouped routed experts: pairs (token, expert) sorted by expert, in chunks of <= 8 ------ */
typedef struct { int e, p0, n; } mchunk;   /* expert, first sorted pair, pairs (<= MOE_CS) */

__device__ __forceinline__ float swiglu_dev(float gv, float pv, float limit, float wgt) {
    if (limit > 0) {
        if (gv > limit) gv = limit;
        if (pv > limit) pv = limit;
        if (pv < -limit) pv = -limit;
    }
    return gv / (1.0f + expf(-gv)) * pv * wgt;
}

/* hbuf[pair, n] = swiglu(w1[e][n] · x[tok], w3[e][n] · x[tok]) * weight; grid (I/(8R), chunks),
 * R rows of w1 and of w3 per warp, TT >= the pairs of any chunk; nch (device, may be NULL):
 * chunks actually present, blocks past it return (device grouping); sh = gemv_shift */
template <int KIND, int TT, int R, bool XS>
__global__ void __launch_bounds__(256) k_moe_up(const dw *w1s, const dw *w3s, const mchunk *chunks,
                                                const int *nch, const int32_t *pair_tok,
                                                const float *pair_w, const float *x, int ldx,
                                                int I, float limit, int sh, float *hbuf) {
    PDL_ENTER();
    extern __shared__ float4 xs4[]; /* XS: [TT][D] */
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n0 = (blockIdx.x * 8 + warp) * R;
    if (nch && (int)blockIdx.y >= *nch) return;
    mchunk ck = chunks[blockIdx.y];
    const float *xr[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) xr[t] = x + (size_t)pair_tok[ck.p0 + (t < ck.n ? t : 0)] * ldx;
    if (XS) xs_stage<KIND, TT>((float *)xs4, xr, w1s[ck.e].cols);
    if (n0 >= I) return;
    int wn[R];
#pragma unroll
    for (int r = 0; r < R; r++) wn[r] = n0 + r < I ? n0 + r : I - 1;
    float g[R][TT], p[R][TT];
    gemv_rows<KIND, TT, R, XS>(w1s[ck.e], wn, xr, (const float *)xs4, ck.n, lane, 32, sh, g);
    gemv_rows<KIND, TT, R, XS>(w3s[ck.e], wn, xr, (const float *)xs4, ck.n, lane, 32, sh, p);
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++) {
            float gv = warp_sum(g[r][t]), pv = warp_sum(p[r][t]);
            if (lane == (r * TT + t) % 32 && t < ck.n && n0 + r < I)
                hbuf[(size_t)(ck.p0 + t) * I + n0 + r] = swiglu_dev(gv, pv, limit, pair_w[ck.p0 + t]);
        }
}

/* ys[pair, n] = w2[e][n] · hbuf[pair]; grid (D/(8R), chunks); nch, sh as k_moe_up. With cinv
 * and CMB (the shared expert, pairs = tokens, the combine fused): ys[t, n] = sum_k cys[cinv[t,
 * k], n] (k in order; cinv -1: another rank's expert) + w2[n] · hbuf[t], as k_moe_combine (a
 * template flag: the routed kernels keep their registers). */
template <int KIND, int TT, int R, bool XS, bool CMB>
__global__ void __launch_bounds__(256) k_moe_down(const dw *w2s, const mchunk *chunks, const int *nch,
                                                  const float *hbuf, int I, int D, int sh, float *ys,
                                                  const float *cys, const int32_t *cinv, int K) {
    PDL_ENTER();
    extern __shared__ float4 xs4[]; /* XS: [TT][I] */
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n0 = (blockIdx.x * 8 + warp) * R;
    if (nch && (int)blockIdx.y >= *nch) return;
    mchunk ck = chunks[blockIdx.y];
    const float *xr[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) xr[t] = hbuf + (size_t)(ck.p0 + (t < ck.n ? t : 0)) * I;
    if (XS) xs_stage<KIND, TT>((float *)xs4, xr, I);
    if (n0 >= D) return;
    int wn[R];
#pragma unroll
    for (int r = 0; r < R; r++) wn[r] = n0 + r < D ? n0 + r : D - 1;
    float acc[R][TT];
    gemv_rows<KIND, TT, R, XS>(w2s[ck.e], wn, xr, (const float *)xs4, ck.n, lane, 32, sh, acc);
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++) {
            float v = warp_sum(acc[r][t]);
            if (lane == (r * TT + t) % 32 && t < ck.n && n0 + r < D) {
                size_t o = (size_t)(ck.p0 + t) * D + n0 + r;
                if (CMB) {
                    float sum = 0;
                    for (int k = 0; k < K; k++) {
                        int p = cinv[(size_t)(ck.p0 + t) * K + k];
                        if (p >= 0) sum += cys[(size_t)p * D + n0 + r];
                    }
                    v = sum + v;
                }
                ys[o] = v;
            }
        }
}

/* out[t] = shared[t] + sum_k ys[inv[t, k]] (inv -1: the pair's expert is another rank's) */
__global__ void k_moe_combine(float *out, const float *ys, const int32_t *inv, int T, int K, int D,
                              const float *shared) {
    PDL_ENTER();
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * D) return;
    int t = (int)(idx / D), i = (int)(idx % D);
    float s = 0;
    for (int k = 0; k < K; k++) {
        int p = inv[(size_t)t * K + k];
        if (p >= 0) s += ys[(size_t)p * D + i];
    }
    out[idx] = shared ? s + shared[idx] : s;
}

/* The kind shared by every present routed expert and usable by the chunked GEMV, or -1; *sh:
 * their common gemv_shift. */
static int experts_kind(const be_moe_layer *L, int *sh) {
    int kind = -1;
    *sh = -1;
    for (int e = 0; e < L->n_experts; e++) {
        if (!L->w1[e]) continue;
        const be_weight *ws[3] = {L->w1[e], L->w2[e], L->w3[e]};
        for (int j = 0; j < 3; j++) {
            const dw &w = ws[j]->v;
            int s = gemv_shift(w);
            if (kind < 0) {
                kind = w.kind;
                *sh = s;
            }
            if (w.kind != kind || s < 0 || s != *sh) return -1;
        }
    }
    return kind;
}

/* One grouped up + down pair of launches: the routed experts' chunks ch (nch of them from the
 * host, or at most nch with the count in dnch on the device), or the shared expert (one chunk
 * of its T <= 8 tokens, pairs = tokens, weights 1, the combine fused into its down launch by
 * cys, cinv, K); w1, w2, w3: device views, one per expert. */
typedef struct {
    const dw *w1, *w2, *w3;
    const mchunk *ch;
    int nch;
    const int *dnch;
    const int32_t *ptok;
    const float *pw, *x;
    int D, I;
    float limit;
    int sh;
    float *hbuf, *ys;
    const float *cys;
    const int32_t *cinv;
    int K;
} moe_gemv;

template <int KIND, int TT, int R>
static void moe_grouped_tt(be_cuda *c, const moe_gemv &a) {
    enum { XS = KIND == WK_FP8 || KIND == WK_FP4 };
    int D = a.D, I = a.I;
    dim3 gu((I + 8 * R - 1) / (8 * R), a.nch), gd((D + 8 * R - 1) / (8 * R), a.nch);
    if (gemv_xs(KIND, TT, D))
        KL(c, (k_moe_up<KIND, TT, R, XS>), gu, 256, (size_t)TT * D * 4, a.w1, a.w3, a.ch, a.dnch, a.ptok, a.pw, a.x, D, I, a.limit, a.sh, a.hbuf);
    else
        KL(c, (k_moe_up<KIND, TT, R, false>), gu, 256, 0, a.w1, a.w3, a.ch, a.dnch, a.ptok, a.pw, a.x, D, I, a.limit, a.sh, a.hbuf);
    bool xs = gemv_xs(KIND, TT, I);
    size_t sm = xs ? (size_t)TT * I * 4 : 0;
    if (xs && a.cinv) KL(c, (k_moe_down<KIND, TT, R, XS, true>), gd, 256, sm, a.w2, a.ch, a.dnch, a.hbuf, I, D, a.sh, a.ys, a.cys, a.cinv, a.K);
    else if (xs) KL(c, (k_moe_down<KIND, TT, R, XS, false>), gd, 256, sm, a.w2, a.ch, a.dnch, a.hbuf, I, D, a.sh, a.ys, a.cys, a.cinv, a.K);
    else if (a.cinv) KL(c, (k_moe_down<KIND, TT, R, false, true>), gd, 256, 0, a.w2, a.ch, a.dnch, a.hbuf, I, D, a.sh, a.ys, a.cys, a.cinv, a.K);
    else KL(c, (k_moe_down<KIND, TT, R, false, false>), gd, 256, 0, a.w2, a.ch, a.dnch, a.hbuf, I, D, a.sh, a.ys, a.cys, a.cinv, a.K);
}

/* maxn: the most pairs of any chunk (<= MOE_CS = 2: TT 1 or 2 only). For TT = 1 (decode batch
 * 1) with FP4/FP8 weights, the rows per warp R are chosen per launch: every lane reads the same
 * chunks of a row whatever R is, so R changes no row's sums, only how many warps the grid has.
 * One chunk (the shared expert: 2048 rows up, 4096 down) takes R = 1: with R = 4 it was 64 and
 * 128 blocks for 132 SMs; more chunks (the routed experts, T·K = 6) take R = 2. On an H100,
 * duet-gemv-bench 20 moe, T = 1 (R routed / shared): 4/4 91.6 us, 4/2 85.8, 4/1 82.0, 2/1
 * 81.7, 1/1 91.1. */
template <int KIND> static void moe_grouped_launch(be_cuda *c, int maxn, const moe_gemv &a) {
    if (maxn > 1) {
        moe_grouped_tt<KIND, 2, gemv_r<2>::R>(c, a);
        return;
    }
    if constexpr (KIND == WK_FP4 || KIND == WK_FP8) {
        if (a.nch == 1 && !a.dnch) moe_grouped_tt<KIND, 1, 1>(c, a);
        else moe_grouped_tt<KIND, 1, 2>(c, a);
    } else {
        moe_grouped_tt<KIND, 1, gemv_r<1>::R>(c, a);
    }
}

static void moe_grouped(be_cuda *c, int kind, int maxn, const moe_gemv &a) {
    switch (kind) {
    case WK_FP4: moe_grouped_launch<WK_FP4>(c, maxn, a); break;
    case WK_FP8: moe_grouped_launch<WK_FP8>(c, maxn, a); break;
    case WK_BF16: moe_grouped_launch<WK_BF16>(c, maxn, a); break;
    default: moe_grouped_launch<WK_F32>(c, maxn, a); break;
    }
}

/* the routed experts' chunks: views dtw = [w1 of E | w2 of E | w3 of E] */
static void moe_routed(be_cuda *c, int kind, const dw *dtw, int E, const mchunk *dch, int nch,
                       const int *dnch, const int32_t *ptok, const float *pw, const float *x,
                       int D, int I, float limit, int sh, int maxn, float *hbuf, float *ys) {
    moe_gemv a = {dtw, dtw + E, dtw + 2 * E, dch, nch, dnch, ptok, pw, x, D, I, limit, sh, hbuf, ys,
                  NULL, NULL, 0};
    moe_grouped(c, kind, maxn, a);
}

/* ---- grouping on the device: no host sync (decode) ---------------------------------------
 * Pairs i = t·K + k with sel[i] = e are grouped by present expert (dws[e].data != NULL), in
 * token order within an expert, as the host grouping does; pairs of absent experts (another
 * rank's) get no row. Only the positions differ from the host grouping (absent experts take
 * no rows here), and every row's result is computed alone, so the output is the same bits. */

/* One block of 1024 for T < 32 tokens (T·K <= MOE_DEV_PAIRS pairs, E <= 1024): warp t routes
 * token t (route_warp, as k_route), then the pairs are grouped: per present expert a count,
 * offsets and chunk offsets by a warp scan, each pair's row (experts' rows in pair order:
 * off[e] + the earlier pairs of e), ptok[row] = token, pw[row] = weight, inv[pair] = row or -1,
 * and each expert's chunks of MOE_CS rows; *nch = chunks. */
enum { MOE_DEV_PAIRS = 512 };
/* Rows per GEMV chunk (device and host grouping): few pairs per expert in decode (top-6 of 256
 * experts: at T = 8 nearly every expert has one, at batch 128 ~3), so chunks of 2 take the GEMV
 * with TT = 2 (4 rows per warp, x in shared memory) where chunks of 8 took TT = 8 (2 rows per
 * warp, x from global) for the same bytes: MoE T = 8 960 -> 477 us per layer, decode batch 128
 * 371 -> 563 tok/s (chunks of 1: 513, of 4: 457). An expert with more rows is read once per
 * chunk, mostly from L2 (its chunks are neighbours in the grid). The chunking does not change
 * any row's arithmetic. */
enum { MOE_CS = 2 };
__global__ void __launch_bounds__(1024) k_moe_route_group(const float *logits, int T, int E, int K,
                                                          const float *bias, int hash,
                                                          const int32_t *hd, hsel_inl hm,
                                                          int norm_topk, float route_scale,
                                                          const dw *dws, int32_t *ptok, float *pw,
                                                          int32_t *inv, mchunk *chunks, int *nch) {
    PDL_ENTER();
    __shared__ int ssel[MOE_DEV_PAIRS];
    __shared__ float sw[MOE_DEV_PAIRS];
    __shared__ int cnt[1024], off[1024], coff[1024];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, TK = T * K;
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    if (warp < T) {
        int e;
        float w;
        route_warp(logits + (size_t)warp * E, E, K, bias, hash, hd, hm, warp, norm_topk,
                   route_scale, &e, &w);
        if (lane < K) {
            /* pairs of experts absent here (another rank's) or out of range take no row */
            ssel[warp * K + lane] = e >= 0 && e < E && dws[e].data ? e : -1;
            sw[warp * K + lane] = w;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < TK; i += blockDim.x)
        if (ssel[i] >= 0) atomicAdd(&cnt[ssel[i]], 1);
    __syncthreads();
    if (warp == 0) { /* lane l scans experts [l·per, (l+1)·per), then a shuffle scan */
        int per = (E + 31) / 32, e0 = lane * per, e1 = e0 + per < E ? e0 + per : E;
        int so = 0, sq = 0;
        for (int e = e0; e < e1; e++) {
            so += cnt[e];
            sq += (cnt[e] + MOE_CS - 1) / MOE_CS;
        }
        int io = so, iq = sq;
        for (int d = 1; d < 32; d <<= 1) {
            int a = __shfl_up_sync(0xffffffffu, io, d), b = __shfl_up_sync(0xffffffffu, iq, d);
            if (lane >= d) {
                io += a;
                iq += b;
            }
        }
        int o = io - so, q = iq - sq;
        for (int e = e0; e < e1; e++) {
            off[e] = o;
            coff[e] = q;
            o += cnt[e];
            q += (cnt[e] + MOE_CS - 1) / MOE_CS;
        }
        if (lane == 31) *nch = iq;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < TK; i += blockDim.x) {
        int e = ssel[i], r = -1;
        if (e >= 0) {
            r = off[e];
            for (int j = 0; j < i; j++) r += ssel[j] == e;
            ptok[r] = i / K;
            pw[r] = sw[i];
        }
        inv[i] = r;
    }
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        for (int j = 0; MOE_CS * j < cnt[e]; j++) {
            int r0 = MOE_CS * j;
            chunks[coff[e] + j] = mchunk{e, off[e] + r0, cnt[e] - r0 < MOE_CS ? cnt[e] - r0 : MOE_CS};
        }
}

/* ---- routed experts with many rows on the tensor cores (bf16 hi/lo, as mm_tc) ------------- */

/* u [2n, 2I]: rows < n from x hi, rows >= n from x lo; columns < I: w1, >= I: w3. Writes
 * h = swiglu(w1·x, w3·x) * wts[r] split into hi (rows < n) and lo (rows >= n) of h2 [2n, I]. */
__global__ void __launch_bounds__(256) k_swiglu_split(const float *__restrict__ u, int n, int I,
                                                      float limit, const float *__restrict__ wts,
                                                      uint16_t *__restrict__ h2) {
    PDL_ENTER();
    size_t total = (size_t)n * I;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        int r = (int)(i / I), j = (int)(i % I);
        const float *a = u + (size_t)r * 2 * I, *b = u + (size_t)(n + r) * 2 * I;
        float h = swiglu_dev(a[j] + b[j], a[I + j] + b[I + j], limit, wts[r]);
        uint16_t hh = fd_f32_to_bf16(h);
        h2[(size_t)r * I + j] = hh;
        h2[(size_t)(n + r) * I + j] = fd_f32_to_bf16(h - fd_bf16_to_f32(hh));
    }
}

/* out[r, d] = y2[r, d] + y2[n + r, d] (the hi and lo halves of one GEMM) */
__global__ void __launch_bounds__(256) k_add_halves(const float *__restrict__ y2, int n, int D,
                                                    float *__restrict__ out) {
    PDL_ENTER();
    size_t total = (size_t)n * D;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = y2[i] + y2[total + i];
}

static unsigned grid_cap(size_t n, unsigned most) {
    size_t g = (n + 255) / 256;
    return (unsigned)(g > most ? most : g ? g : 1);
}

static void lanes_init(be_cuda *c) {
    if (c->lanes_ready) return;
    for (int i = 0; i < MOE_LANES; i++) {
        size_t ws = (size_t)16 << 20;
        c->lane_ws[i] = dmalloc(c, ws);
        CK(cudaStreamCreateWithFlags(&c->lane_s[i], cudaStreamNonBlocking));
        CK(cudaEventCreateWithFlags(&c->lane_ev[i], cudaEventDisableTiming));
        CKB(cublasCreate(&c->lane_blas[i]));
        CKB(cublasSetStream(c->lane_blas[i], c->lane_s[i])); /* before the workspace: it resets it */
        CKB(cublasSetWorkspace(c->lane_blas[i], c->lane_ws[i], ws));
        CKB(cublasSetMathMode(c->lane_blas[i], CUBLAS_DEFAULT_MATH));
    }
    CK(cudaEventCreateWithFlags(&c->ev_join, cudaEventDisableTiming));
    c->lanes_ready = 1;
}

/* Routed experts with big[e] (all of one kind with tc_ok), spread over up to MOE_LANES streams
 * (least rows first) so that several experts' decodes and GEMMs run at once: one expert's
 * GEMMs have few rows (2 x 24 at a 1K prefill) and would leave most SMs idle. Per expert, on
 * its lane: its three weights decoded to bf16 in one launch (w1 and w3 stacked as W13 [2I, D],
 * w2 [D, I]: per lane a per-call scratch of 6·I·D bytes under the cap, reused for the lane's
 * experts), then per chunk of <= rc pairs: gather and split x (hi rows, then lo rows), one
 * GEMM for w1 and w3 over hi and lo, SwiGLU + split, one GEMM for w2, and the hi + lo halves
 * summed into ys[pair] (rows of different experts: no races). */
static void moe_tc(be_cuda *c, const be_moe_layer *L, const int *cnt, const unsigned char *big,
                   const float *x, const int32_t *dtok, const float *dpw, float *ys) {
    int E = L->n_experts, D = L->hidden, I = L->inter, nmax = 0, nb = 0;
    for (int e = 0; e < E; e++)
        if (big[e]) {
            nb++;
            if (cnt[e + 1] - cnt[e] > nmax) nmax = cnt[e + 1] - cnt[e];
        }
    if (!nb) return;
    lanes_init(c);
    int nl = nb < MOE_LANES ? nb : MOE_LANES;
    /* bytes per pair: x hi+lo (bf16), u (2 x 2I f32), h hi+lo (bf16), y hi+lo (f32) */
    size_t per_pair = (size_t)D * 4 + (size_t)I * 16 + (size_t)I * 4 + (size_t)D * 8;
    int rc = (int)(((size_t)32 << 20) / per_pair);
    if (rc < 64) rc = 64;
    rc = pow2_rows(nmax, rc);
    size_t wsz = (size_t)3 * I * D;
    uint16_t *wl[MOE_LANES], *x2[MOE_LANES], *h2[MOE_LANES];
    float *u[MOE_LANES], *y2[MOE_LANES];
    long load[MOE_LANES];
    for (int l = 0; l < nl; l++) {
        wl[l] = (uint16_t *)tc_scratch(c, wsz * 2);
        x2[l] = (uint16_t *)tc_scratch(c, (size_t)rc * D * 4);
        u[l] = (float *)tc_scratch(c, (size_t)rc * I * 16);
        h2[l] = (uint16_t *)tc_scratch(c, (size_t)rc * I * 4);
        y2[l] = (float *)tc_scratch(c, (size_t)rc * D * 8);
        load[l] = 0;
    }
    /* the buffers may have been used by earlier work on the main stream */
    CK(cudaEventRecord(c->ev_join, c->s));
    for (int l = 0; l < nl; l++) CK(cudaStreamWaitEvent(c->lane_s[l], c->ev_join, 0));
    for (int e = 0; e < E; e++) {
        if (!big[e]) continue;
        int l = 0;
        for (int q = 1; q < nl; q++)
            if (load[q] < load[l]) l = q;
        load[l] += 64 + cnt[e + 1] - cnt[e]; /* a fixed cost per expert (decode) + its rows */
        cudaStream_t st = c->lane_s[l];
        cublasHandle_t h = c->lane_blas[l];
        const uint16_t *w13 = wl[l], *w2 = wl[l] + (size_t)2 * I * D;
        wdec_jobs j;
        memset(&j, 0, sizeof j);
        j.w[0] = L->w1[e]->v; j.N[0] = I; j.out[0] = wl[l];
        j.w[1] = L->w3[e]->v; j.N[1] = I; j.out[1] = wl[l] + (size_t)I * D;
        j.w[2] = L->w2[e]->v; j.N[2] = D; j.out[2] = wl[l] + (size_t)2 * I * D;
        wdec_launch(c, st, j, 3);
        for (int p0 = cnt[e]; p0 < cnt[e + 1]; p0 += rc) {
            int n = cnt[e + 1] - p0 < rc ? cnt[e + 1] - p0 : rc;
            split_launch(st, x, D, dtok + p0, n, D, x2[l], x2[l] + (size_t)n * D);
            gemm_bf16(h, 2 * I, 2 * n, D, w13, D, x2[l], D, u[l], 2 * I, 0.0f);
            k_swiglu_split<<<grid_cap((size_t)n * I, 8192), 256, 0, st>>>(u[l], n, I, L->swiglu_limit, dpw + p0, h2[l]);
            LAUNCHED();
            gemm_bf16(h, D, 2 * n, I, w2, I, h2[l], I, y2[l], D, 0.0f);
            k_add_halves<<<grid_cap((size_t)n * D, 8192), 256, 0, st>>>(y2[l], n, D, ys + (size_t)p0 * D);
            LAUNCHED();
        }
    }
    /* the main stream goes on once every lane is done; the buffers go back to its allocator */
    for (int l = 0; l < nl; l++) {
        CK(cudaEventRecord(c->lane_ev[l], c->lane_s[l]));
        CK(cudaStreamWaitEvent(c->s, c->lane_ev[l], 0));
    }
    for (int l = 0; l < nl; l++) {
        cu_free(&c->base, wl[l]);
        cu_free(&c->base, x2[l]);
        cu_free(&c->base, u[l]);
        cu_free(&c->base, h2[l]);
        cu_free(&c->base, y2[l]);
    }
}

/* ---- the layer's device table of expert views, kept per layer ---------------------------- */
struct moe_tab {
    const be_moe_layer *L;
    int E;
    const be_weight **key; /* [3E + 3]: L's w1, w2, w3 and s1, s2, s3 when the table was built */
    dw *d;
};

static bool moe_tab_same(const moe_tab *m, const be_moe_layer *L) {
    size_t E = (size_t)m->E, pb = E * sizeof *m->key;
    return !memcmp(m->key, L->w1, pb) && !memcmp(m->key + E, L->w2, pb) &&
           !memcmp(m->key + 2 * E, L->w3, pb) && m->key[3 * E] == L->s1 &&
           m->key[3 * E + 1] == L->s2 && m->key[3 * E + 2] == L->s3;
}

void moe_tables_drop(be_cuda *c) {
    for (int i = 0; i < c->n_mtab; i++) {
        cu_free(&c->base, c->mtab[i].d);
        free(c->mtab[i].key);
    }
    c->n_mtab = 0;
}

/* After the views: the shared expert's grouping for T <= 8 tokens (pairs = tokens): chunk
 * ch[T - 1] = {expert 0, row 0, T rows}, tokens iota, weights ones */
struct moe_tail {
    mchunk ch[8];
    int32_t iota[8];
    float ones[8];
};
static const moe_tail *moe_table_tail(const dw *d, int E) { return (const moe_tail *)(d + 3 * E + 3); }

/* The device views of the layer's experts, [w1 of E | w2 of E | w3 of E | s1 s2 s3] and a
 * moe_tail (an expert absent on this rank, another rank's, or no shared expert: all zero, data
 * NULL). Built and
 * copied at the layer's first call, then kept on the device (a 36 KB table for 256 experts
 * re-staged every call cost a copy and its host work per layer); rebuilt when the layer's
 * weight pointers change, dropped when any weight is freed (its address may come back). */
static const dw *moe_table(be_cuda *c, const be_moe_layer *L) {
    int E = L->n_experts;
    for (int i = 0; i < c->n_mtab; i++) {
        moe_tab *m = &c->mtab[i];
        if (m->L != L) continue;
        if (m->E == E && moe_tab_same(m, L)) return m->d;
        cu_free(&c->base, m->d); /* stream-ordered: earlier kernels still read it safely */
        free(m->key);
        *m = c->mtab[--c->n_mtab];
        break;
    }
    size_t n = (size_t)3 * E + 3, bytes = n * sizeof(dw) + sizeof(moe_tail);
    dw *tw = (dw *)xcalloc(1, bytes);
    moe_tail *tl = (moe_tail *)(tw + n);
    for (int t = 0; t < 8; t++) {
        tl->ch[t] = (mchunk){0, 0, t + 1};
        tl->iota[t] = t;
        tl->ones[t] = 1.0f;
    }
    const be_weight **key = (const be_weight **)xcalloc(n, sizeof *key);
    for (int e = 0; e < E; e++) {
        key[e] = L->w1[e];
        key[E + e] = L->w2[e];
        key[2 * E + e] = L->w3[e];
        if (L->w1[e]) {
            tw[e] = L->w1[e]->v;
            tw[E + e] = L->w2[e]->v;
            tw[2 * E + e] = L->w3[e]->v;
        }
    }
    const be_weight *sw[3] = {L->s1, L->s2, L->s3};
    for (int j = 0; j < 3; j++) {
        key[3 * E + j] = sw[j];
        if (L->s1 && sw[j]) tw[3 * E + j] = sw[j]->v;
    }
    c->gpersist++; /* kept across steps: never from a graph's step arena or metadata */
    dw *d = (dw *)scratch(&c->base, bytes);
    CK(cudaMemcpyAsync(d, stage(c, tw, bytes), bytes, cudaMemcpyDeviceToDevice, c->s));
    c->gpersist--;
    free(tw);
    if (c->n_mtab == c->cap_mtab) {
        c->cap_mtab = c->cap_mtab ? 2 * c->cap_mtab : 64;
        c->mtab = (moe_tab *)xrealloc(c->mtab, (size_t)c->cap_mtab * sizeof *c->mtab);
    }
    c->mtab[c->n_mtab++] = (moe_tab){L, E, key, d};
    return d;
}

/* The kind of the shared expert's three weights when the grouped GEMV can take them (one kind,
 * one gemv_shift, *sh), else -1 */
static int shared_kind(const be_moe_layer *L, int *sh) {
    if (!L->s1 || !L->s2 || !L->s3) return -1;
    const dw *w[3] = {&L->s1->v, &L->s2->v, &L->s3->v};
    *sh = gemv_shift(*w[0]);
    for (int j = 0; j < 3; j++)
        if (w[j]->kind != w[0]->kind || gemv_shift(*w[j]) != *sh || *sh < 0) return -1;
    return w[0]->kind;
}

/* out[T, D] = shared expert(x) + sum_k ys[inv[t, k]] (ys, inv on the device). T <=
 * MOE_SHARED_FUSED_T with a GEMV kind: the shared expert as one grouped up launch (w1, w3,
 * SwiGLU) and one down launch that also sums the routed rows (the combine), from the layer's
 * table dtw (5 launches -> 2); otherwise matmuls, SwiGLU and k_moe_combine: from T = 8 on, the
 * grouped kernels' one row group per warp over all of K (no K split as in mm's GEMV) leave the
 * GPU too few warps (the whole MoE at T = 8: 960 -> 1275 us). */
enum { MOE_SHARED_FUSED_T = 2 }; /* <= MOE_CS: one chunk of moe_tail */
static void moe_finish(be_cuda *c, const be_moe_layer *L, const dw *dtw, const float *x, int T,
                       const float *ysb, const int32_t *dinv, float *out) {
    be *b = &c->base;
    int E = L->n_experts, K = L->top_k, D = L->hidden, SI = L->shared_inter ? L->shared_inter : L->inter;
    int ssh, sk = T <= MOE_SHARED_FUSED_T ? shared_kind(L, &ssh) : -1;
    if (sk >= 0) {
        float *hb = (float *)scratch(b, (size_t)T * SI * sizeof(float));
        const dw *s = dtw + 3 * E;
        const moe_tail *tl = moe_table_tail(dtw, E);
        moe_gemv a = {s, s + 1, s + 2, tl->ch + T - 1, 1, NULL, tl->iota, tl->ones, x, D, SI,
                      L->swiglu_limit, ssh, hb, out, ysb, dinv, K};
        moe_grouped(c, sk, T, a);
        cu_free(b, hb);
        return;
    }
    float *shb = NULL;
    if (L->s1) {
        float *g = (float *)scratch(b, (size_t)T * SI * sizeof(float));
        float *p = (float *)scratch(b, (size_t)T * SI * sizeof(float));
        shb = (float *)scratch(b, (size_t)T * D * sizeof(float));
        expert_ffn(c, L->s1, L->s2, L->s3, x, T, D, SI, NULL, L->swiglu_limit, g, p, shb);
        cu_free(b, g);
        cu_free(b, p);
    }
    size_t nD = (size_t)T * D;
    KL(c, k_moe_combine, (unsigned)((nD + 255) / 256), 256, 0, out, ysb, dinv, T, K, D, shb);
    if (shb) cu_free(b, shb);
}

/* T < MOE_TC_MIN, experts of one GEMV kind: routing, grouping, experts and combine all on the
 * device, without a host sync, in five launches: route + group (k_moe_route_group), routed up,
 * routed down, shared up, shared down + combine. No expert can have MOE_TC_MIN rows nor the
 * tile path's 16 rows on average, so the host grouping takes the GEMV chunks too: same kernels,
 * same bits. The chunk grid is sized for T·K chunks (at least one pair each); blocks past the
 * count return. */
static void moe_device(be_cuda *c, const be_moe_layer *L, const dw *dtw, int kind, int sh,
                       const float *x, int T, const float *logits, int hash, const int32_t *hd,
                       const hsel_inl &hm, float *out) {
    be *b = &c->base;
    int E = L->n_experts, K = L->top_k, D = L->hidden, I = L->inter, TK = T * K;
    /* int32: ptok [TK], inv [TK]; f32 pw [TK]; int nch; mchunk [TK] */
    int32_t *g = (int32_t *)scratch(b, ((size_t)3 * TK + 1) * 4 + (size_t)TK * sizeof(mchunk));
    int32_t *ptok = g, *inv = ptok + TK;
    float *pw = (float *)(inv + TK);
    int *nch = (int *)(pw + TK);
    mchunk *ch = (mchunk *)(nch + 1);
    float *hbuf = (float *)scratch(b, (size_t)TK * I * sizeof(float));
    float *ysb = (float *)scratch(b, (size_t)TK * D * sizeof(float));
    KL(c, k_moe_route_group, 1, 1024, 0, logits, T, E, K, L->bias, hash, hd, hm, L->norm_topk, L->route_scale, dtw, ptok, pw, inv, ch, nch);
    moe_routed(c, kind, dtw, E, ch, TK, nch, ptok, pw, x, D, I, L->swiglu_limit, sh, T < MOE_CS ? T : MOE_CS, hbuf, ysb);
    moe_finish(c, L, dtw, x, T, ysb, inv, out);
    cu_free(b, g);
    cu_free(b, hbuf);
    cu_free(b, ysb);
}

void cu_moe(be *b, const be_moe_layer *L, const float *x, const int32_t *ids, int T,
                   float *out) {
    if (T <= 0) return;
    be_cuda *c = C(b);
    int E = L->n_experts, K = L->top_k, D = L->hidden, I = L->inter;
    int SI = L->shared_inter ? L->shared_inter : I, IM = SI > I ? SI : I;
    if (E > 1024 || K > 16) {
        fprintf(stderr, "duet cuda: MoE with %d experts, top-%d unsupported (max 1024, 16)\n", E, K);
        abort();
    }
    /* every element is written before it is read: not zeroed */
    float *logits = (float *)scratch(b, (size_t)T * E * sizeof(float));
    mm(c, L->gate, 0, E, x, D, logits, E, T);
    const int32_t *hd = NULL;
    hsel_inl hm;
    memset(&hm, 0, sizeof hm); /* hashed by the graph cache even when unused */
    if (L->tid2eid) {
        int32_t *h = (int32_t *)xmalloc((size_t)T * K * sizeof *h);
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++) h[(size_t)t * K + k] = (int32_t)L->tid2eid[(size_t)ids[t] * K + k];
        hd = inl_put(c, h, (size_t)T * K, hm);
        free(h);
    }
    int sh, kind = experts_kind(L, &sh);
    /* DUET_CUDA_MOE_HOST=1: the host grouping below for every T (to compare the two) */
    const char *mh = getenv("DUET_CUDA_MOE_HOST");
    if (T < MOE_TC_MIN && kind >= 0 && T * K <= MOE_DEV_PAIRS && !(mh && atoi(mh))) {
        moe_device(c, L, moe_table(c, L), kind, sh, x, T, logits, L->tid2eid != NULL, hd, hm, out);
        cu_free(b, logits);
        return;
    }
    if (graph_refuse(c, "MoE grouped on the host")) {
        cu_free(b, logits);
        return;
    }
    /* sel [T, K] int32 then wsel [T, K] f32 in one buffer: one download */
    int32_t *sel = (int32_t *)scratch(b, (size_t)T * K * 8);
    float *wsel = (float *)(sel + (size_t)T * K);
    KL(c, k_route, (T + 7) / 8, 256, 0, logits, T, E, K, L->bias, L->tid2eid != nullptr, hd, hm, L->norm_topk, L->route_scale, sel, wsel);
    /* group rows by expert on the host (one sync per layer): the row counts choose each
     * expert's path (tensor cores, tiles or GEMV chunks) and size the cuBLAS calls */
    int32_t *hs = (int32_t *)xmalloc((size_t)T * K * 8);
    float *hw = (float *)(hs + (size_t)T * K);
    cu_download(b, hs, sel, (size_t)T * K * 8);
    int *cnt = (int *)xcalloc((size_t)E + 1, sizeof *cnt);
    for (int i = 0; i < T * K; i++)
        if (hs[i] >= 0 && hs[i] < E) cnt[hs[i] + 1]++;
    for (int e = 0; e < E; e++) cnt[e + 1] += cnt[e];
    int32_t *rows = (int32_t *)xmalloc((size_t)T * K * sizeof *rows);
    float *wts = (float *)xmalloc((size_t)T * K * sizeof *wts);
    int *fillp = (int *)xmalloc((size_t)E * sizeof *fillp);
    memcpy(fillp, cnt, (size_t)E * sizeof *fillp);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int e = hs[(size_t)t * K + k];
            if (e < 0 || e >= E) continue;
            rows[fillp[e]] = t;
            wts[fillp[e]++] = hw[(size_t)t * K + k];
        }
    int np = cnt[E];
    int nchunks = 0;
    for (int e = 0; e < E; e++)
        if (L->w1[e]) nchunks += (cnt[e + 1] - cnt[e] + MOE_CS - 1) / MOE_CS;
    /* (also with no chunk: T < MOE_TC_MIN then takes the device path's shared expert + combine) */
    if (kind >= 0 && nchunks <= 65535) {
        /* grouped: every routed expert in two launches, then one combine */
        /* experts with >= MOE_TC_MIN rows go to the tensor cores (moe_tc), the rest to the
         * SIMT grouped GEMV chunks or 64-row tiles */
        unsigned char *big = (unsigned char *)xcalloc((size_t)E, 1);
        if (kind != WK_F32)
            for (int e = 0; e < E; e++) big[e] = L->w1[e] && cnt[e + 1] - cnt[e] >= MOE_TC_MIN;
        mchunk *ch = (mchunk *)xcalloc((size_t)(nchunks ? nchunks : 1), sizeof *ch);
        int nc = 0;
        for (int e = 0; e < E; e++)
            for (int p0 = cnt[e]; L->w1[e] && !big[e] && p0 < cnt[e + 1]; p0 += MOE_CS)
                ch[nc++] = (mchunk){e, p0, cnt[e + 1] - p0 < MOE_CS ? cnt[e + 1] - p0 : MOE_CS};
        /* TT as the device grouping's (the TT = 1 and 2 kernels may round differently: the
         * same TT keeps the two groupings the same bits for T < MOE_TC_MIN) */
        int maxn = T < MOE_CS ? T : MOE_CS;
        int32_t *inv = (int32_t *)xmalloc((size_t)T * K * sizeof *inv);
        for (int i = 0; i < T * K; i++) inv[i] = -1;
        {
            int *fp = (int *)xmalloc((size_t)E * sizeof *fp);
            memcpy(fp, cnt, (size_t)E * sizeof *fp);
            for (int t = 0; t < T; t++)
                for (int k = 0; k < K; k++) {
                    int e = hs[(size_t)t * K + k];
                    if (e >= 0 && e < E && L->w1[e]) inv[(size_t)t * K + k] = fp[e]++;
                    else if (e >= 0 && e < E) fp[e]++;
                }
            free(fp);
        }
        stage_reserve(c, (size_t)3 * E * sizeof(dw) + (size_t)nchunks * sizeof(mchunk) +
                             (size_t)(np + 1) * 8 + (size_t)T * K * 4 +
                             (size_t)(np / 64 + E + 1) * sizeof(int) * 3 + 8 * 256);
        const dw *dtw = moe_table(c, L);
        const mchunk *dch = (const mchunk *)stage(c, ch, (size_t)(nchunks ? nchunks : 1) * sizeof *ch);
        int32_t *dtok = (int32_t *)stage(c, rows, (size_t)(np ? np : 1) * sizeof *rows);
        float *dpw = (float *)stage(c, wts, (size_t)(np ? np : 1) * sizeof *wts);
        int32_t *dinv = (int32_t *)stage(c, inv, (size_t)T * K * sizeof *inv);
        float *hbuf = nc ? (float *)scratch(b, (size_t)np * I * sizeof(float)) : NULL;
        float *ysb = (float *)scratch(b, (size_t)np * D * sizeof(float));
        int n_active = 0, np_small = 0;
        for (int e = 0; e < E; e++)
            if (L->w1[e] && !big[e] && cnt[e + 1] > cnt[e]) {
                n_active++;
                np_small += cnt[e + 1] - cnt[e];
            }
        if (!nc) {
            /* every expert with rows is on the tensor cores */
        } else if (np_small >= 16 * (n_active ? n_active : 1)) {
            /* many rows per expert: 64-row tiles, each expert's weights read once per tile */
            int ntl = 0;
            for (int e = 0; e < E; e++)
                if (L->w1[e] && !big[e]) ntl += (cnt[e + 1] - cnt[e] + 63) / 64;
            gtile *tl = (gtile *)xmalloc((size_t)(ntl ? ntl : 1) * sizeof *tl);
            int q = 0;
            for (int e = 0; e < E; e++)
                for (int p0 = cnt[e]; L->w1[e] && !big[e] && p0 < cnt[e + 1]; p0 += 64)
                    tl[q++] = (gtile){e, p0, cnt[e + 1] - p0 < 64 ? cnt[e + 1] - p0 : 64};
            const gtile *dtl = (const gtile *)stage(c, tl, (size_t)(ntl ? ntl : 1) * sizeof *tl);
            float *pb = (float *)scratch(b, (size_t)np * I * sizeof(float));
            KL(c, k_gemm_grouped, dim3((I + TN - 1) / TN, ntl), 256, 0, dtw, dtl, I, x, D, dtok, hbuf, I);
            KL(c, k_gemm_grouped, dim3((I + TN - 1) / TN, ntl), 256, 0, dtw + 2 * E, dtl, I, x, D, dtok, pb, I);
            size_t nI = (size_t)np * I;
            KL(c, k_swiglu, (unsigned)((nI + 255) / 256), 256, 0, hbuf, pb, np, I, L->swiglu_limit, dpw);
            KL(c, k_gemm_grouped, dim3((D + TN - 1) / TN, ntl), 256, 0, dtw + E, dtl, D, hbuf, I, nullptr, ysb, D);
            cu_free(b, pb);
            free(tl);
        } else {
            moe_routed(c, kind, dtw, E, dch, nc, NULL, dtok, dpw, x, D, I, L->swiglu_limit, sh, maxn, hbuf, ysb);
        }
        moe_tc(c, L, cnt, big, x, dtok, dpw, ysb);
        moe_finish(c, L, dtw, x, T, ysb, dinv, out);
        cu_free(b, hbuf);
        cu_free(b, ysb);
        free(ch);
        free(big);
        free(inv);
    } else {
    /* fallback: one expert at a time */
    stage_reserve(c, (size_t)T * K * 8 + 2 * 256);
    int32_t *drows = (int32_t *)stage(c, rows, (size_t)T * K * sizeof *rows);
    float *dwts = (float *)stage(c, wts, (size_t)T * K * sizeof *wts);
    float *xs = (float *)cu_alloc(b, (size_t)T * D * sizeof(float));
    float *ys = (float *)cu_alloc(b, (size_t)T * D * sizeof(float));
    float *g = (float *)cu_alloc(b, (size_t)T * IM * sizeof(float));
    float *p = (float *)cu_alloc(b, (size_t)T * IM * sizeof(float));
    CK(cudaMemsetAsync(out, 0, (size_t)T * D * sizeof(float), c->s));
    for (int e = 0; e < E; e++) {
        int n = cnt[e + 1] - cnt[e];
        if (!n || !L->w1[e]) continue;
        size_t nD = (size_t)n * D;
        KL(c, k_gather, (unsigned)((nD + 255) / 256), 256, 0, x, drows + cnt[e], n, D, xs);
        expert_ffn(c, L->w1[e], L->w2[e], L->w3[e], xs, n, D, I, dwts + cnt[e], L->swiglu_limit,
                   g, p, ys);
        KL(c, k_scatter_add, (unsigned)((nD + 255) / 256), 256, 0, out, ys, drows + cnt[e], n, D);
    }
    if (L->s1) {
        expert_ffn(c, L->s1, L->s2, L->s3, x, T, D, SI, NULL, L->swiglu_limit, g, p, ys);
        size_t nD = (size_t)T * D;
        KL(c, k_scatter_add, (unsigned)((nD + 255) / 256), 256, 0, out, ys, nullptr, T, D);
    }
    cu_free(b, xs);
    cu_free(b, ys);
    cu_free(b, g);
    cu_free(b, p);
    }
    cu_free(b, logits);
    cu_free(b, sel);
    free(hs);
    free(cnt);
    free(rows);
    free(wts);
    free(fillp);
}
