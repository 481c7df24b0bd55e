/* be_cuda_sample.cu — the `sample` op (worker/backend.h be_sample_req): greedy, top-k, top-p and
 * min-p draws from logits rows that stay on the GPU.
 *
 * Why: rank 0 used to download every logits row ([rows, 129280] f32: 66 MB per step at batch
 * 128) and sample on the CPU (~3-4 ms per sampled draw on one core). Here one block per row
 * finds the max and argmax, the raw log-softmax normaliser, ranks the first P candidates
 * (P = BE_SAMPLE_RANKED, or top_k if smaller) by a radix select on an order-preserving key and a
 * bitonic sort in shared memory, then cuts and draws exactly as the CPU backend's reference
 * (worker/be_cpu.c cut_and_draw); only the small results go back to the host.
 *
 * Determinism: each row is one block of fixed size whose sums run in a fixed order, so the
 * draw depends only on the row's logits and u01, never on the batch. Greedy ids (ties → lowest
 * id), the ranked ids and the fallback decision follow the reference exactly; sums (double)
 * differ from the reference's sequential ones in rounding only, so a sampled id can differ
 * from the CPU's only when u × sum falls within ~1e-15 (relative) of a candidate boundary.
 *
 * Must never: be called inside a graphed pass (it waits for the device); read past row
 * req.row of [*, V]; return an id outside [0, V).
 */
#include <limits.h>

#include "kernels/be_cuda_internal.cuh"

enum { SB = BE_SAMPLE_RANKED }; /* threads per block = candidates ranked at most */
enum { SU = 8 };                /* loads in flight per thread in the passes over a row */

/* NaN → -inf (worker_sample's clean()), and -0 → +0 so that equal values get equal keys */
__device__ __forceinline__ float s_clean(float v) { return v != v ? -INFINITY : v == 0.f ? 0.f : v; }
/* order-preserving key: a larger value has a larger key */
__device__ __forceinline__ uint32_t s_key(float v) {
    uint32_t b = __float_as_uint(s_clean(v));
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float s_val(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}
/* a candidate as one integer: larger = earlier in the order (value desc, id asc) */
__device__ __forceinline__ unsigned long long s_cand(uint32_t key, int id) {
    return ((unsigned long long)key << 32) | (0xFFFFFFFFu - (uint32_t)id);
}
__device__ __forceinline__ int s_id(unsigned long long c) { return (int)(0xFFFFFFFFu - (uint32_t)c); }
__device__ __forceinline__ float s_cval(unsigned long long c) { return s_val((uint32_t)(c >> 32)); }

/* block-wide max (every thread gets it) */
__device__ unsigned long long bmax_u64(unsigned long long v, unsigned long long *sh) {
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long t = __shfl_xor_sync(0xffffffffu, v, o);
        v = t > v ? t : v;
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    unsigned long long r = sh[0];
    for (int i = 1; i < (int)(blockDim.x >> 5); i++) r = sh[i] > r ? sh[i] : r;
    return r;
}

/* block-wide sum in a fixed order (every thread gets it) */
__device__ double bsum_d(double v, double *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    double r = 0;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) r += sh[i];
    return r;
}

/* block-wide inclusive prefix sum */
__device__ double bscan_d(double v, double *sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        double t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
    }
    __syncthreads();
    if (lane == 31) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double s = lane < nw ? sh[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            double t = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += t;
        }
        __syncwarp();
        if (lane < nw) sh[lane] = s;
    }
    __syncthreads();
    return warp ? v + sh[warp - 1] : v;
}

/* the lowest thread index whose c holds, INT_MAX if none (every thread gets it) */
__device__ int first_true(bool c, int *slot) {
    __syncthreads();
    if (threadIdx.x == 0) *slot = INT_MAX;
    __syncthreads();
    if (c) atomicMin(slot, (int)threadIdx.x);
    __syncthreads();
    return *slot;
}

/* f(i, key, i < V) for every index i of this thread's share of x[V], every lane of the block
 * calling f the same number of times (f may use warp collectives); SU loads in flight per thread
 * (one block reads the whole row: a load at a time made every pass latency-bound). */
template <typename F>
__device__ __forceinline__ void scan_keys(const float *x, int V, F f) {
    for (int base = 0; base < V; base += SU * (int)blockDim.x) {
        uint32_t kk[SU];
#pragma unroll
        for (int u = 0; u < SU; u++) {
            int i = base + u * (int)blockDim.x + (int)threadIdx.x;
            kk[u] = i < V ? s_key(x[i]) : 0;
        }
#pragma unroll
        for (int u = 0; u < SU; u++) {
            int i = base + u * (int)blockDim.x + (int)threadIdx.x;
            f(i, kk[u], i < V);
        }
    }
}

/* The key of the K-th largest element of x[V] (1 <= K <= V) by a radix select, 8 bits a pass;
 * *eq_take = how many elements equal to it are among the K first. */
__device__ uint32_t kth_key(const float *x, int V, int K, unsigned *hist, int *sv, int *eq_take) {
    uint32_t prefix = 0, mask = 0;
    int remaining = K;
    for (int sh = 24; sh >= 0; sh -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        scan_keys(x, V, [&](int, uint32_t k, bool in) {
            hist_add_warp(hist, in && (k & mask) == prefix, (k >> sh) & 255u);
        });
        __syncthreads();
        if (threadIdx.x == 0) {
            int cum = 0, b = 255;
            for (; b > 0 && cum + (int)hist[b] < remaining; b--) cum += (int)hist[b];
            sv[0] = (int)(prefix | ((uint32_t)b << sh));
            sv[1] = remaining - cum;
        }
        __syncthreads();
        prefix = (uint32_t)sv[0];
        remaining = sv[1];
        mask |= 255u << sh;
    }
    *eq_take = remaining;
    return prefix;
}

/* cand[0, K) = the K first candidates (unsorted): every key above thr, and the eq_take
 * lowest ids whose key is thr (an ordered scan, so ties at the threshold keep the lower ids). */
__device__ void collect_ordered(const float *x, int V, int K, uint32_t thr, int eq_take,
                                unsigned long long *cand, int *wcnt, int *sv) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int n_gt = K - eq_take, gt_seen = 0, eq_seen = 0;
    if (threadIdx.x == 0) sv[2] = 0;
    __syncthreads();
    for (int base = 0; base < V; base += blockDim.x) {
        int i = base + threadIdx.x;
        uint32_t k = i < V ? s_key(x[i]) : 0;
        bool gt = i < V && k > thr, eq = i < V && k == thr;
        if (gt) cand[atomicAdd(&sv[2], 1)] = s_cand(k, i);
        unsigned bal = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) wcnt[warp] = __popc(bal);
        gt_seen += __syncthreads_count(gt);
        int off = 0, tot = 0;
        for (int w = 0; w < nw; w++) off += w < warp ? wcnt[w] : 0, tot += wcnt[w];
        int r = eq_seen + off + __popc(bal & ((1u << lane) - 1u));
        if (eq && r < eq_take) cand[n_gt + r] = s_cand(k, i);
        eq_seen += tot;
        __syncthreads(); /* wcnt is rewritten next round */
        if (gt_seen == n_gt && eq_seen >= eq_take) break; /* uniform: counts from barriers */
    }
    __syncthreads();
}

/* cand[0, K) (and, returned, how many slots are filled: >= K) = the K first candidates and
 * some equal to the K-th, unsorted: one pass of unordered appends (the sort that
 * follows orders them) of every key above thr and of ALL keys equal to it, SU loads in flight
 * per thread; when the equal keys do not all fit beside the greater ones (a row of many ties),
 * collect_ordered's barrier-per-1024 scan instead. The slots past K hold what the sort puts
 * last: a sorted prefix of K is the same either way. */
__device__ int collect(const float *x, int V, int K, uint32_t thr, int eq_take,
                       unsigned long long *cand, int *wcnt, int *sv) {
    __shared__ int n_gt, n_eq;
    if (threadIdx.x == 0) n_gt = 0, n_eq = 0;
    __syncthreads();
    int cap_eq = SB - (K - eq_take); /* slots left for keys equal to thr */
    scan_keys(x, V, [&](int i, uint32_t k, bool in) {
        if (in && k > thr) cand[atomicAdd(&n_gt, 1)] = s_cand(k, i);
        else if (in && k == thr) {
            int e = atomicAdd(&n_eq, 1);
            if (e < cap_eq) cand[K - eq_take + e] = s_cand(k, i);
        }
    });
    __syncthreads();
    int filled = K - eq_take + n_eq; /* uniform */
    if (n_eq > cap_eq) {
        for (int i = threadIdx.x; i < SB; i += blockDim.x) cand[i] = 0;
        collect_ordered(x, V, K, thr, eq_take, cand, wcnt, sv);
        filled = K;
    }
    __syncthreads();
    return filled;
}

/* cand[0, L) descending (L a power of two <= blockDim.x; zeros pad the end) */
__device__ void bitonic_desc(unsigned long long *cand, int L) {
    for (int k2 = 2; k2 <= L; k2 <<= 1)
        for (int j = k2 >> 1; j > 0; j >>= 1) {
            int i = threadIdx.x, p = i ^ j;
            if (i < L && p > i) {
                unsigned long long a = cand[i], b = cand[p];
                bool desc = (i & k2) == 0;
                if (desc ? a < b : a > b) cand[i] = b, cand[p] = a;
            }
            __syncthreads();
        }
}

/* The cut and the draw over the ranked candidates (be_cpu.c cut_and_draw, in parallel): w =
 * this thread's candidate weight, pre = its inclusive prefix sum (pre_sh: all of them), n =
 * kept by top_k, tot_all = the vocabulary's weight. The rank drawn, or -1 (fallback). */
__device__ int cut_and_draw_dev(double w, const double *pre_sh, int P, int n, int V,
                                double tot_all, const be_sample_req &q, int *slot) {
    int t = threadIdx.x, j;
    if (q.top_p > 0 && q.top_p < 1) {
        if (n > P && n != V) return -1;
        double thr = q.top_p * (n <= P ? pre_sh[n - 1] : tot_all);
        j = first_true(t < n && t < P && pre_sh[t] >= thr, slot);
        if (j != INT_MAX) n = j + 1;
        else if (n > P) return -1;
    }
    if (q.min_p > 0 && q.min_p <= 1) {
        j = first_true(t >= 1 && t < n && t < P && w < q.min_p, slot);
        if (j != INT_MAX) n = j;
        else if (n > P) return -1;
    }
    if (n > P && n != V) return -1;
    double u = q.u01 * (n <= P ? pre_sh[n - 1] : tot_all);
    j = first_true(t < n && t < P && u < pre_sh[t], slot);
    if (j != INT_MAX) return j;
    return n <= P ? n - 1 : -1;
}

/* One block (SB threads) per request. */
__global__ void __launch_bounds__(SB) k_sample(const float *__restrict__ logits, int V,
                                               const be_sample_req *__restrict__ req,
                                               be_sample_res *__restrict__ res) {
    PDL_ENTER();
    __shared__ unsigned long long cand[SB], red64[32];
    __shared__ double pre[SB], redd[32];
    __shared__ unsigned hist[256];
    __shared__ int wcnt[32], sv[4];
    const be_sample_req q = req[blockIdx.x];
    be_sample_res *r = &res[blockIdx.x];
    const float *x = logits + (size_t)q.row * V;
    int t = threadIdx.x;
    bool greedy = !(q.temperature >= 1e-5f);
    int n = q.top_k > 0 && q.top_k < V ? q.top_k : V;
    int P = n < SB ? n : SB;
    int nt = q.n_top < V ? q.n_top : V;
    nt = nt < 0 ? 0 : nt > BE_SAMPLE_MAX_TOP ? BE_SAMPLE_MAX_TOP : nt;

    /* max and argmax (ties → lowest id): the largest candidate */
    unsigned long long best = 0;
#pragma unroll SU
    for (int i = t; i < V; i += SB) {
        unsigned long long c = s_cand(s_key(x[i]), i);
        best = c > best ? c : best;
    }
    best = bmax_u64(best, red64);
    double mx = s_cval(best);
    bool samp = !greedy && isfinite(mx);
    /* the raw normaliser, and the whole vocabulary's weight when the cut may need it */
    bool need_all = samp && n == V && n > P;
    double z = 0, za = 0, T = q.temperature;
    /* the normaliser from single-precision exponentials summed in double: a double exp per
     * element made this pass most of a greedy row's time (the logprob moves by ~1e-7
     * relative); the weights the draw compares stay double, as the reference's */
    if (isfinite(mx)) {
        float fmx = (float)mx;
#pragma unroll SU
        for (int i = t; i < V; i += SB) {
            float v = s_clean(x[i]) - fmx;
            z += (double)expf(v);
            if (need_all) za += exp(((double)s_clean(x[i]) - mx) / T);
        }
    }
    z = bsum_d(z, redd);
    if (need_all) za = bsum_d(za, redd);
    double lse = isfinite(mx) ? mx + log(z) : 0;

    /* the K first candidates, sorted (none for a greedy row without top logprobs) */
    int K = samp ? P : 0;
    K = K > nt ? K : nt;
    if (K > 0) {
        cand[t] = 0;
        int eq_take;
        uint32_t thr = kth_key(x, V, K, hist, sv, &eq_take);
        int filled = collect(x, V, K, thr, eq_take, cand, wcnt, sv);
        int L = 2;
        while (L < filled) L <<= 1;
        bitonic_desc(cand, L);
    }

    if (t < nt) {
        r->top_ids[t] = s_id(cand[t]);
        r->top_logprobs[t] = (float)((double)s_cval(cand[t]) - lse);
    }
    int id = s_id(best), fb = 0;
    if (samp) {
        double w = t < P ? exp(((double)s_cval(cand[t]) - mx) / T) : 0;
        pre[t] = bscan_d(w, redd);
        __syncthreads();
        int j = cut_and_draw_dev(w, pre, P, n, V, za, q, &sv[3]);
        if (j < 0) fb = 1;
        else id = s_id(cand[j]);
    }
    if (t == 0) {
        r->id = id;
        r->fallback = fb;
        r->n_top = nt;
        r->logprob = (float)((double)s_clean(x[id]) - lse);
    }
}

void cu_sample(be *b, const float *logits, int V, int n, const be_sample_req *req,
               be_sample_res *res) {
    be_cuda *c = C(b);
    if (n <= 0) return;
    if (c->gmode) {
        fprintf(stderr, "duet cuda: the sample op was called inside a graphed pass; call it "
                        "after the step's passes (it waits for the device)\n");
        abort();
    }
    const be_sample_req *dreq = (const be_sample_req *)stage(c, req, (size_t)n * sizeof *req);
    be_sample_res *dres = (be_sample_res *)scratch(b, (size_t)n * sizeof *res);
    KL(c, k_sample, n, SB, 0, logits, V, dreq, dres);
    cu_download(b, res, dres, (size_t)n * sizeof *res);
    cu_free(b, dres);
}
