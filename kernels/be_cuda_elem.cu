/* be_cuda_elem.cu — row-wise and elementwise ops: embedding, RMSNorm, RoPE, the mHC mixes
 * (spec §2.3, §2.6), scale, add, FP8 QAT and the Hadamard + FP4 round trip.
 *
 * Why apart: one block per row or one thread per element, bandwidth-bound and short; they share
 * block_sum and nothing else with the rest of the backend.
 */
#include "kernels/be_cuda_internal.cuh"

/* ======================================================================================== */
/* embedding, norms, RoPE                                                                   */
/* ======================================================================================== */

typedef inl<int32_t, 64> ids_inl;
__global__ void k_embed(dw w, const int32_t *ids, ids_inl idm, int n_hc, float *h) {
    PDL_ENTER();
    int t = blockIdx.x, D = w.cols;
    int id = inl_at(ids, idm, t);
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float v = wget(w, id, i);
        for (int j = 0; j < n_hc; j++) h[((size_t)t * n_hc + j) * D + i] = v;
    }
}

void cu_embed(be *b, const be_weight *table, const int32_t *ids, int T, int n_hc, float *h) {
    if (T <= 0) return;
    ids_inl m;
    const int32_t *d = inl_put(C(b), ids, (size_t)T, m);
    KL(C(b), k_embed, T, 256, 0, table->v, d, m, n_hc, h);
}

/* one block per row; w may be NULL (head_rms); y may equal x */
__global__ void k_rmsnorm(const float *x, const float *w, float *y, int n, float eps) {
    PDL_ENTER();
    __shared__ float sh[32];
    const float *xr = x + (size_t)blockIdx.x * n;
    float *yr = y + (size_t)blockIdx.x * n;
    float ss = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, sh);
    float r = inv_rms_dev(ss, n, eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = w ? w[i] * (xr[i] * r) : xr[i] * r;
}

/* one block per row, n % 4 == 0, 16-byte aligned rows, n <= 16 blockDim.x: every thread loads
 * its (at most 4) float4 of the row once, keeps them for the second pass: one memory round
 * trip per row instead of a strided loop per pass */
__global__ void __launch_bounds__(1024) k_rmsnorm4(const float *x, const float *w, float *y, int n,
                                                   float eps) {
    PDL_ENTER();
    __shared__ float sh[32];
    int n4 = n / 4;
    const float4 *xr = (const float4 *)(x + (size_t)blockIdx.x * n);
    float4 *yr = (float4 *)(y + (size_t)blockIdx.x * n);
    float4 v[4];
    float ss = 0;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        int i = threadIdx.x + q * blockDim.x;
        if (i < n4) {
            v[q] = xr[i];
            ss += v[q].x * v[q].x + v[q].y * v[q].y + v[q].z * v[q].z + v[q].w * v[q].w;
        }
    }
    ss = block_sum(ss, sh);
    float r = inv_rms_dev(ss, n, eps);
#pragma unroll
    for (int q = 0; q < 4; q++) {
        int i = threadIdx.x + q * blockDim.x;
        if (i < n4) {
            float4 o = make_float4(v[q].x * r, v[q].y * r, v[q].z * r, v[q].w * r);
            if (w) {
                float4 wv = ((const float4 *)w)[i];
                o = make_float4(wv.x * o.x, wv.y * o.y, wv.z * o.z, wv.w * o.w);
            }
            yr[i] = o;
        }
    }
}

static void rmsnorm_launch(be_cuda *c, const float *x, const float *w, float *y, int rows, int n,
                           float eps) {
    int nt = (n / 4 + 31) / 32 * 32;
    nt = nt < 1024 ? nt : 1024;
    if (n % 4 == 0 && n <= 16 * nt && !(((uintptr_t)x | (uintptr_t)y | (uintptr_t)w) & 15))
        KL(c, k_rmsnorm4, rows, nt, 0, x, w, y, n, eps);
    else
        KL(c, k_rmsnorm, rows, n >= 256 ? 256 : 128, 0, x, w, y, n, eps);
}

void cu_rmsnorm(be *b, const float *x, const float *w, float *y, int T, int n, float eps) {
    if (T <= 0) return;
    rmsnorm_launch(C(b), x, w, y, T, n, eps);
}
void cu_head_rms(be *b, float *x, int rows, int dim, float eps) {
    if (rows <= 0) return;
    rmsnorm_launch(C(b), x, NULL, x, rows, dim, eps);
}

/* positions and frequencies of a RoPE call with T <= 16 and rope_dims <= 128, in the parameters */
typedef struct { int32_t pos[16]; float om[64]; } rope_inl;

/* grid (T*n_heads), threads over pairs; pos/omega NULL: from m */
__global__ void k_rope(float *x, int n_heads, int head_dim, int rope_dims, const int32_t *pos,
                       const float *omega, rope_inl m, int inverse) {
    PDL_ENTER();
    int row = blockIdx.x, t = row / n_heads;
    float *r = x + (size_t)row * head_dim + head_dim - rope_dims;
    int p = pos ? pos[t] : m.pos[t];
    for (int i = threadIdx.x; i < rope_dims / 2; i += blockDim.x)
        rope_pair_w(r, i, p, omega ? omega[i] : m.om[i], inverse);
}

void cu_rope(be *b, float *x, int T, int n_heads, int head_dim, int rope_dims,
                    const int32_t *pos, const float *omega, int inverse) {
    if (T <= 0 || n_heads <= 0) return;
    be_cuda *c = C(b);
    rope_inl m;
    const int32_t *dp = NULL;
    const float *dom = NULL;
    size_t np = round_up((size_t)T, 4), no = (size_t)(rope_dims / 2);
    if (T <= 16 && no <= 64 && !c->gmode) {
        memcpy(m.pos, pos, (size_t)T * sizeof *pos);
        memcpy(m.om, omega, no * sizeof *omega);
    } else { /* positions and omega in one staged copy (always in a graph: they change) */
        memset(&m, 0, sizeof m);
        int32_t *hb = (int32_t *)xmalloc((np + no) * 4);
        memcpy(hb, pos, (size_t)T * sizeof *pos);
        memcpy(hb + np, omega, no * sizeof *omega);
        dp = (const int32_t *)stage(c, hb, (np + no) * 4);
        dom = (const float *)(dp + np);
        free(hb);
    }
    KL(c, k_rope, T * n_heads, 32, 0, x, n_heads, head_dim, rope_dims, dp, dom, m, inverse);
}

/* ======================================================================================== */
/* mHC (spec §2.3, §2.6)                                                                     */
/* ======================================================================================== */

__device__ __forceinline__ float sigmoid_dev(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ void sinkhorn_dev(float *Cm, int n, int iters, float eps) {
    for (int j = 0; j < n; j++) {
        float *row = Cm + j * n, mx = row[0], s = 0;
        for (int k = 1; k < n; k++) mx = row[k] > mx ? row[k] : mx;
        for (int k = 0; k < n; k++) s += (row[k] = expf(row[k] - mx));
        for (int k = 0; k < n; k++) row[k] = row[k] / s + eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0)
            for (int j = 0; j < n; j++) {
                float s = 0;
                for (int k = 0; k < n; k++) s += Cm[j * n + k];
                for (int k = 0; k < n; k++) Cm[j * n + k] /= s + eps;
            }
        for (int k = 0; k < n; k++) {
            float s = 0;
            for (int j = 0; j < n; j++) s += Cm[j * n + k];
            for (int j = 0; j < n; j++) Cm[j * n + k] /= s + eps;
        }
    }
}

/* Sinkhorn by one warp for n·n <= 32: lane j·n + k holds C[j][k] (c); the same operations in
 * the same order per element as sinkhorn_dev (row and column sums in index order). Returns
 * the lane's element. All 32 lanes must call. */
__device__ float sinkhorn_warp(float c, int n, int iters, float eps) {
    int l = threadIdx.x & 31, j = l / n, k = l % n;
    float mx = __shfl_sync(0xffffffffu, c, j * n);
    for (int q = 1; q < n; q++) {
        float o = __shfl_sync(0xffffffffu, c, j * n + q);
        mx = o > mx ? o : mx;
    }
    float e = expf(c - mx), s = 0;
    for (int q = 0; q < n; q++) s += __shfl_sync(0xffffffffu, e, j * n + q);
    c = e / s + eps;
    for (int it = 0; it < iters; it++) {
        if (it > 0) {
            s = 0;
            for (int q = 0; q < n; q++) s += __shfl_sync(0xffffffffu, c, j * n + q);
            c /= s + eps;
        }
        s = 0;
        for (int q = 0; q < n; q++) s += __shfl_sync(0xffffffffu, c, (q * n + k) & 31);
        c /= s + eps;
    }
    return c;
}

/* no padding bytes (kernel arguments are compared byte for byte by the graph cache) */
typedef struct {
    const float *h, *part, *sspart;
    const float *base, *scale;
    float *u, *post, *comb;
    const float *nw; /* non-NULL: u is RMS-normed with these weights, in place (mhc_norm) */
    int S, n, D, iters, head_mode, pad_;
    float hc_eps, norm_eps;
} mhc_fin_args;

/* Stage 2 for token t, by one block (any multiple of 32 threads; many tokens: k_mhc_fin);
 * mode 0: mhc_pre (writes u, post, comb), 1: hc_head (u only). The partials are read through L2
 * (__ldcg): the mix launch wrote them. */
__device__ void mhc_fin_body(const mhc_fin_args &a, int t) {
    const float *h = a.h, *part = a.part, *sspart = a.sspart, *base = a.base, *scale = a.scale;
    int S = a.S, n = a.n, D = a.D, iters = a.iters, head_mode = a.head_mode;
    float hc_eps = a.hc_eps, norm_eps = a.norm_eps, *u = a.u, *post = a.post, *comb = a.comb;
    __shared__ float mu[16 * 16];
    __shared__ float pre[16];
    __shared__ float Cm[16 * 16];
    int n_mix = head_mode ? n : (2 + n) * n;
    const float *X = h + (size_t)t * n * D;
    __shared__ float rr;
    /* partial sums, a warp per mix (lanes over the S slices, then a fixed shuffle tree): the
     * loads of one sum are in flight together instead of one after another */
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int k = warp; k <= n_mix; k += nw) {
        if (k < n_mix) {
            float d = 0;
            for (int s2 = lane; s2 < S; s2 += 32) d += __ldcg(part + ((size_t)t * n_mix + k) * S + s2);
            d = warp_sum(d);
            if (lane == 0) mu[k] = d;
        } else {
            double ss = 0;
            for (int s2 = lane; s2 < S; s2 += 32) ss += __ldcg(sspart + (size_t)t * S + s2);
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            if (lane == 0) rr = inv_rms_dev(ss, n * D, norm_eps);
        }
    }
    __syncthreads();
    for (int k = threadIdx.x; k < n_mix; k += blockDim.x) mu[k] *= rr;
    __syncthreads();
    int l = threadIdx.x;
    if (l < n) pre[l] = sigmoid_dev(mu[l] * scale[0] + base[l]) + hc_eps;
    if (!head_mode) {
        if (l < n) post[t * n + l] = 2.0f * sigmoid_dev(mu[n + l] * scale[1] + base[n + l]);
        if (n * n <= 32) {
            if (l < 32) { /* warp 0 */
                float cv = l < n * n ? mu[2 * n + l] * scale[2] + base[2 * n + l] : 0.f;
                cv = sinkhorn_warp(cv, n, iters, hc_eps);
                if (l < n * n) comb[(size_t)t * n * n + l] = cv;
            }
        } else if (l == 0) {
            for (int j = 0; j < n * n; j++) Cm[j] = mu[2 * n + j] * scale[2] + base[2 * n + j];
            sinkhorn_dev(Cm, n, iters, hc_eps);
            for (int j = 0; j < n * n; j++) comb[(size_t)t * n * n + j] = Cm[j];
        }
    }
    __syncthreads();
    float ss = 0; /* of u, for the fused RMSNorm */
    bool vec = D % 4 == 0 && !((uintptr_t)X & 15) && !((uintptr_t)u & 15);
    if (vec) {
        /* float4 (one pass of loads in flight for D <= 4·blockDim) */
        for (int i = threadIdx.x; i < D / 4; i += blockDim.x) {
            float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int j = 0; j < n; j++) {
                float4 xv = ((const float4 *)(X + (size_t)j * D))[i];
                s.x += pre[j] * xv.x; s.y += pre[j] * xv.y; s.z += pre[j] * xv.z; s.w += pre[j] * xv.w;
            }
            ((float4 *)(u + (size_t)t * D))[i] = s;
            ss += s.x * s.x + s.y * s.y + s.z * s.z + s.w * s.w;
        }
    } else {
        for (int i = threadIdx.x; i < D; i += blockDim.x) {
            float s = 0;
            for (int j = 0; j < n; j++) s += pre[j] * X[(size_t)j * D + i];
            u[(size_t)t * D + i] = s;
            ss += s * s;
        }
    }
    if (!a.nw) return;
    /* RMSNorm in place: each thread rescales the elements it wrote (as k_rmsnorm: w · (u · r)) */
    __shared__ float shn[32];
    ss = block_sum(ss, shn);
    float r = inv_rms_dev(ss, D, norm_eps);
    float *ur = u + (size_t)t * D;
    if (vec) {
        for (int i = threadIdx.x; i < D / 4; i += blockDim.x) {
            float4 v = ((float4 *)ur)[i], w = ((const float4 *)a.nw)[i];
            v.x = w.x * (v.x * r); v.y = w.y * (v.y * r); v.z = w.z * (v.z * r); v.w = w.w * (v.w * r);
            ((float4 *)ur)[i] = v;
        }
    } else {
        for (int i = threadIdx.x; i < D; i += blockDim.x) ur[i] = a.nw[i] * (ur[i] * r);
    }
}

/* Stage 2 as its own launch: block per token */
__global__ void __launch_bounds__(1024) k_mhc_fin(mhc_fin_args a) { PDL_ENTER(); mhc_fin_body(a, blockIdx.x); }

/* Stage 1 of mHC pre / HC head: grid (n_mix + n_gram, T, S): block (k, t, s) writes, for k <
 * n_mix, the partial dot of fn[k] with token t's streams over width slice s (k == 0 also the
 * partial sum of squares); for k >= n_mix (gram != NULL), the partial dot of stream pair
 * g = k - n_mix (j1 <= j2, in order) over D slice s (dslice wide): the Gram matrix of the streams
 * gives the collapsed row's norm (‖Σ pre_j X_j‖² = Σ pre_j pre_k G_jk) without a second pass.
 * Splitting the width over S blocks keeps a decode step (T = 1) from running on one SM. */
__global__ void __launch_bounds__(256) k_mhc_mix(const float *h, const float *fn, int n_mix, int width,
                                                 int slice, float *part, float *sspart, float *gram,
                                                 int n, int D, int dslice) {
    PDL_ENTER();
    __shared__ float sh[32];
    int k = blockIdx.x, t = blockIdx.y, sidx = blockIdx.z, S = gridDim.z;
    const float *X = h + (size_t)t * width;
    if (k >= n_mix) { /* a Gram entry: streams j1 <= j2 of pair g */
        int g = k - n_mix, j1 = 0;
        while (g >= n - j1) g -= n - j1, j1++;
        int j2 = j1 + g;
        const float *A = X + (size_t)j1 * D, *Bv = X + (size_t)j2 * D;
        int i0 = sidx * dslice, i1 = i0 + dslice < D ? i0 + dslice : D;
        float d = 0;
        for (int i = i0 + threadIdx.x * 4; i < i1; i += blockDim.x * 4) {
            float4 av = *(const float4 *)(A + i), bv = *(const float4 *)(Bv + i);
            d += av.x * bv.x + av.y * bv.y + av.z * bv.z + av.w * bv.w;
        }
        d = block_sum(d, sh);
        if (threadIdx.x == 0) gram[((size_t)t * (gridDim.x - n_mix) + (k - n_mix)) * S + sidx] = d;
        return;
    }
    const float *f = fn + (size_t)k * width;
    int i0 = sidx * slice, i1 = i0 + slice < width ? i0 + slice : width;
    float d = 0, ss = 0;
    for (int i = i0 + threadIdx.x * 4; i < i1; i += blockDim.x * 4) {
        float4 xv = *(const float4 *)(X + i), fv = *(const float4 *)(f + i);
        d += fv.x * xv.x + fv.y * xv.y + fv.z * xv.z + fv.w * xv.w;
        if (k == 0) ss += xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
    }
    d = block_sum(d, sh);
    if (k == 0) ss = block_sum(ss, sh);
    if (threadIdx.x == 0) {
        part[((size_t)t * n_mix + k) * S + sidx] = d;
        if (k == 0) sspart[(size_t)t * S + sidx] = ss;
    }
}

/* Stage 2 of a few tokens over many blocks: grid (nb, T). Every block of token t sums the
 * partials (mixes, squares, Gram: a few hundred floats), and collapses its share of the row
 * u = Σ pre_j X_j (float4 units blockIdx.x·blockDim + thread, step nb·blockDim), normed with
 * the Gram norm when a.nw; block 0 also writes post and comb (Sinkhorn). One block per token
 * did all of it after the others (~20 µs per call at T = 1). */
__global__ void __launch_bounds__(256) k_mhc_fin_par(mhc_fin_args a, const float *gram, int n_gram) {
    PDL_ENTER();
    __shared__ float mu[(2 + 8) * 8], pre[8], Cm[64];
    __shared__ double G[36];
    __shared__ float rr;
    int t = blockIdx.y, S = a.S, n = a.n, D = a.D;
    int n_mix = a.head_mode ? n : (2 + n) * n;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int k = warp; k < n_mix + 1 + n_gram; k += nwarps) {
        if (k < n_mix) {
            float d = 0;
            for (int s2 = lane; s2 < S; s2 += 32) d += a.part[((size_t)t * n_mix + k) * S + s2];
            d = warp_sum(d);
            if (lane == 0) mu[k] = d;
        } else {
            const float *src = k == n_mix ? a.sspart + (size_t)t * S
                                          : gram + ((size_t)t * n_gram + (k - n_mix - 1)) * S;
            double v = 0;
            for (int s2 = lane; s2 < S; s2 += 32) v += src[s2];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) {
                if (k == n_mix) rr = inv_rms_dev(v, n * D, a.norm_eps);
                else G[k - n_mix - 1] = v;
            }
        }
    }
    __syncthreads();
    int l = threadIdx.x;
    if (l < n) pre[l] = sigmoid_dev(mu[l] * rr * a.scale[0] + a.base[l]) + a.hc_eps;
    if (!a.head_mode && blockIdx.x == 0) {
        if (l < n) a.post[t * n + l] = 2.0f * sigmoid_dev(mu[n + l] * rr * a.scale[1] + a.base[n + l]);
        if (n * n <= 32) {
            if (l < 32) { /* warp 0 */
                float cv = l < n * n ? mu[2 * n + l] * rr * a.scale[2] + a.base[2 * n + l] : 0.f;
                cv = sinkhorn_warp(cv, n, a.iters, a.hc_eps);
                if (l < n * n) a.comb[(size_t)t * n * n + l] = cv;
            }
        } else if (l == 0) {
            for (int j = 0; j < n * n; j++) Cm[j] = mu[2 * n + j] * rr * a.scale[2] + a.base[2 * n + j];
            sinkhorn_dev(Cm, n, a.iters, a.hc_eps);
            for (int j = 0; j < n * n; j++) a.comb[(size_t)t * n * n + j] = Cm[j];
        }
    }
    __syncthreads();
    float r = 1.f;
    if (a.nw) { /* ‖u‖² = Σ_j Σ_k pre_j pre_k G_jk (G symmetric, pairs j <= k stored) */
        double q = 0;
        for (int j = 0, g = 0; j < n; j++)
            for (int k2 = j; k2 < n; k2++, g++)
                q += (j == k2 ? 1.0 : 2.0) * (double)pre[j] * pre[k2] * G[g];
        r = inv_rms_dev(q, D, a.norm_eps);
    }
    const float *X = a.h + (size_t)t * n * D;
    float4 *u = (float4 *)(a.u + (size_t)t * D);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < D / 4; i += gridDim.x * blockDim.x) {
        float4 sv = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int j = 0; j < n; j++) {
            float4 xv = ((const float4 *)(X + (size_t)j * D))[i];
            sv.x += pre[j] * xv.x; sv.y += pre[j] * xv.y; sv.z += pre[j] * xv.z; sv.w += pre[j] * xv.w;
        }
        if (a.nw) {
            float4 w = ((const float4 *)a.nw)[i];
            sv.x = w.x * (sv.x * r); sv.y = w.y * (sv.y * r); sv.z = w.z * (sv.z * r); sv.w = w.w * (sv.w * r);
        }
        u[i] = sv;
    }
}

enum { MHC_PAR_T = 16 }; /* up to this many tokens, stage 2 over many blocks per token */

static void mhc_run(be *b, const float *h, const float *fn, const float *base, const float *scale,
                    int T, int n, int D, int iters, float hc_eps, float norm_eps, float *u,
                    float *post, float *comb, int head_mode, const float *nw = nullptr) {
    be_cuda *c = C(b);
    int n_mix = head_mode ? n : (2 + n) * n, width = n * D;
    if (n > 8 || width % 4 || D % 4) {
        fprintf(stderr, "duet cuda: mHC with n_hc %d and width %d unsupported\n", n, width);
        abort();
    }
    bool par = T <= MHC_PAR_T;
    int n_gram = par ? n * (n + 1) / 2 : 0;
    int S = (int)(264 / ((long)T * (n_mix + n_gram))); /* ~2 blocks per SM at T = 1 */
    S = S < 1 ? 1 : S > 32 ? 32 : S;
    int slice = (width + S - 1) / S;
    slice = (slice + 3) / 4 * 4;
    S = (width + slice - 1) / slice;
    int dslice = ((D + S - 1) / S + 3) / 4 * 4;
    float *part = (float *)scratch(b, (size_t)T * n_mix * S * sizeof(float));
    float *sspart = (float *)scratch(b, (size_t)T * S * sizeof(float));
    float *gram = par ? (float *)scratch(b, (size_t)T * n_gram * S * sizeof(float)) : nullptr;
    if (nw && ((uintptr_t)nw & 15)) { /* the float4 norm pass reads nw as float4 with u */
        fprintf(stderr, "duet cuda: mHC norm weights not 16-byte aligned\n");
        abort();
    }
    mhc_fin_args fa = {h, part, sspart, base, scale, u, post, comb, nw, S, n, D, iters, head_mode, 0,
                       hc_eps, norm_eps};
    KL(c, k_mhc_mix, dim3(n_mix + n_gram, T, S), 256, 0, h, fn, n_mix, width, slice, part, sspart,
       gram, n, D, dslice);
    if (par) { /* 1 float4 per thread: D / 1024 blocks of 256 per token */
        int nb = (D / 4 + 255) / 256;
        KL(c, k_mhc_fin_par, dim3(nb, T), 256, 0, fa, gram, n_gram);
        cu_free(b, gram);
    } else {
        KL(c, k_mhc_fin, T, 1024, 0, fa);
    }
    cu_free(b, part);
    cu_free(b, sspart);
}

void cu_mhc_pre(be *b, const float *h, const float *fn, const float *base,
                       const float *scale, int T, int n_hc, int D, int iters, float hc_eps,
                       float norm_eps, float *u, float *post, float *comb) {
    if (T <= 0) return;
    mhc_run(b, h, fn, base, scale, T, n_hc, D, iters, hc_eps, norm_eps, u, post, comb, 0);
}

void cu_hc_head(be *b, const float *h, const float *fn, const float *base,
                       const float *scale, int T, int n_hc, int D, float hc_eps, float norm_eps,
                       float *y) {
    if (T <= 0) return;
    mhc_run(b, h, fn, base, scale, T, n_hc, D, 0, hc_eps, norm_eps, y, NULL, NULL, 1);
}

void cu_mhc_norm(be *b, int head_mode, const float *h, const float *fn, const float *base,
                 const float *scale, int T, int n_hc, int D, int iters, float hc_eps,
                 float norm_eps, const float *norm_w, float *x, float *post, float *comb) {
    if (T <= 0) return;
    mhc_run(b, h, fn, base, scale, T, n_hc, D, head_mode ? 0 : iters, hc_eps, norm_eps, x,
            head_mode ? NULL : post, head_mode ? NULL : comb, head_mode, norm_w);
}

/* thread per (t, i): X[k][i] = post[k] v[i] + sum_j C[j][k] X[j][i] */
__global__ void k_mhc_post(float *h, const float *v, const float *post, const float *comb, int T,
                           int n, int D) {
    PDL_ENTER();
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * D) return;
    int t = (int)(idx / D), i = (int)(idx % D);
    float *X = h + (size_t)t * n * D;
    const float *Cm = comb + (size_t)t * n * n;
    float xs[16];
    for (int j = 0; j < n; j++) xs[j] = X[(size_t)j * D + i];
    float vt = v[(size_t)t * D + i];
    for (int k = 0; k < n; k++) {
        float s = post[t * n + k] * vt;
        for (int j = 0; j < n; j++) s += Cm[j * n + k] * xs[j];
        X[(size_t)k * D + i] = s;
    }
}

void cu_mhc_post(be *b, float *h, const float *v, const float *post, const float *comb,
                        int T, int n_hc, int D) {
    if (T <= 0) return;
    size_t n = (size_t)T * D;
    KL(C(b), k_mhc_post, (unsigned)((n + 255) / 256), 256, 0, h, v, post, comb, T, n_hc, D);
}

/* ======================================================================================== */
/* elementwise                                                                              */
/* ======================================================================================== */

__global__ void k_scale(float *x, size_t n, float s) {
    PDL_ENTER();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] *= s;
}
__global__ void k_add(float *y, const float *x, size_t n) {
    PDL_ENTER();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}
/* thread per (row, block) */
__global__ void k_fp8_qat(float *x, int T, int dim, int nope, int block) {
    PDL_ENTER();
    int nb = nope / block;
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= T * nb) return;
    int t = idx / nb, j = idx % nb;
    fd_act_quant_fp8(x + (size_t)t * dim + (size_t)j * block, block);
}
/* block per row: WHT in shared memory, then FP4 round trip per 32 */
__global__ void k_hadamard_fp4(float *x, int dim) {
    PDL_ENTER();
    extern __shared__ float z[];
    float *xr = x + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) z[i] = xr[i];
    fd_hadamard_block(z, dim);
    for (int i = threadIdx.x * 32; i < dim; i += blockDim.x * 32) fd_fp4_roundtrip(z + i, dim - i < 32 ? dim - i : 32);
    __syncthreads();
    for (int i = threadIdx.x; i < dim; i += blockDim.x) xr[i] = z[i];
}

void cu_scale_rows(be *b, float *x, int T, int n, float s) {
    size_t N = (size_t)T * n;
    if (!N) return;
    KL(C(b), k_scale, grid_for(N, 256), 256, 0, x, N, s);
}
void cu_add(be *b, float *y, const float *x, size_t n) {
    if (!n) return;
    KL(C(b), k_add, grid_for(n, 256), 256, 0, y, x, n);
}
void cu_fp8_qat(be *b, float *x, int T, int dim, int nope, int block) {
    int n = T * (nope / block);
    if (n <= 0) return;
    KL(C(b), k_fp8_qat, (n + 127) / 128, 128, 0, x, T, dim, nope, block);
}
void cu_hadamard_fp4(be *b, float *x, int rows, int dim) {
    if (rows <= 0) return;
    KL(C(b), k_hadamard_fp4, rows, 128, (size_t)dim * sizeof(float), x, dim);
}
