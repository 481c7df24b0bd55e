/* be_cuda_gemm.cu — matmul y[T, N] = x[T, K] · W[row0 : row0+N]ᵀ with the weight decoded in
 * the kernel: warp-per-row GEMV (T <= 16), 64x64 SIMT tiles, and bf16 hi/lo tensor-core GEMMs
 * through cuBLAS (T >= 32).
 *
 * Why apart: the matmul is where the time goes and has three paths with different accuracy
 * (fp32 SIMT ~2e-7, bf16 hi/lo ~2e-6); the routed experts (be_cuda_moe.cu) reuse its decode,
 * split and GEMM helpers through be_cuda_internal.cuh.
 */
#include "kernels/be_cuda_internal.cuh"

/* ======================================================================================== */
/* matmul: y[T, N] = x[T, K] · W[row0 : row0+N]ᵀ                                             */
/* ======================================================================================== */

/* --- small T: R weight rows per warp, 16-byte weight loads, TT tokens at once -------------
 * A block of 8 warps holds 8/KS row groups of R rows; the KS warps of a group take interleaved
 * slices of K (so that a few hundred rows still fill the GPU) and are summed in shared memory
 * in slice order. Each lane's partial sums are reduced over the warp by shuffles. */
template <int KIND, int TT, bool XS>
__global__ void __launch_bounds__(256) k_gemv(dw w, int row0, int N, const float *__restrict__ x,
                                              int ldx, float *__restrict__ y, int ldy, int T,
                                              int KS, int sh, int xgr, int xgs) {
    enum { R = gemv_r<TT>::R };
    __shared__ float red[8][R * TT];
    extern __shared__ float4 xs4[]; /* XS: [TT][K] */
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int g = warp / KS, ks = warp % KS;
    int n0 = (blockIdx.x * (8 / KS) + g) * R;
    int wn[R];
#pragma unroll
    for (int r = 0; r < R; r++) wn[r] = row0 + (n0 + r < N ? n0 + r : N - 1);
    {   /* before waiting for the previous kernel: this lane's first two chunks of each row into
         * L2 (weights only: nothing an earlier kernel wrote) */
        int nch = w.cols / wchunk<KIND>::EPC, c0 = lane + 32 * ks;
#pragma unroll
        for (int r = 0; r < R; r++) {
            const uint4 *rp = (const uint4 *)((const uint8_t *)w.data + (size_t)wn[r] * (nch * 16));
            if (c0 < nch) prefetch_l2(rp + c0);
            if (c0 + 32 * KS < nch) prefetch_l2(rp + c0 + 32 * KS);
        }
    }
    PDL_ENTER();
    /* grouped x (matmul_xg): every row of a block is in the block's first row's group */
    if (xgr) x += (size_t)(blockIdx.x * (8 / KS) * R / xgr) * xgs;
    const float *xr[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) xr[t] = x + (size_t)(t < T ? t : 0) * ldx;
    if (XS) xs_stage<KIND, TT>((float *)xs4, xr, w.cols);
    float acc[R][TT];
    gemv_rows<KIND, TT, R, XS>(w, wn, xr, (const float *)xs4, T, lane + 32 * ks, 32 * KS, sh, acc);
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++) acc[r][t] = warp_sum(acc[r][t]);
    if (KS > 1) {
        if (lane == 0)
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int t = 0; t < TT; t++) red[warp][r * TT + t] = acc[r][t];
        __syncthreads();
        if (ks) return;
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < TT; t++) {
                float v = red[warp][r * TT + t];
                for (int k = 1; k < KS; k++) v += red[warp + k][r * TT + t];
                acc[r][t] = v;
            }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++)
            if (lane == (r * TT + t) % 32 && t < T && n0 + r < N) y[(size_t)t * ldy + n0 + r] = acc[r][t];
}

/* --- any T: 64x64 tiles, weights decoded into shared memory, 4x4 outputs per thread ------ */
__global__ void __launch_bounds__(256) k_gemm(dw w, int row0, int N, const float *__restrict__ x,
                                              int ldx, float *__restrict__ y, int ldy, int T) {
    PDL_ENTER();
    gemm_tile(w, row0, N, x, ldx, NULL, y, ldy, T, blockIdx.y * TM, blockIdx.x * TN);
}

/* warps wanted in flight for a GEMV launch: 132 SMs x 32 on an H100 */
enum { GEMV_WARPS = 4096 };

/* false (nothing launched) when grouped x (xgr > 0) does not fit whole blocks */
template <int KIND, int TT>
static bool gemv_launch1(be_cuda *c, const dw &w, int row0, int N, const float *x, int ldx,
                         float *y, int ldy, int T, int sh, int xgr = 0, int xgs = 0) {
    enum { R = gemv_r<TT>::R };
    int groups = (N + R - 1) / R, nch = w.cols / wk_epc(w.kind), KS = 1;
    while (KS < 8 && groups * KS < GEMV_WARPS && 64 * KS <= nch) KS *= 2;
    int per = 8 / KS, nb = (groups + per - 1) / per;
    if (xgr && xgr % (per * R)) return false;
    if (gemv_xs(KIND, TT, w.cols))
        KL(c, (k_gemv<KIND, TT, KIND == WK_FP8 || KIND == WK_FP4>), nb, 256, (size_t)TT * w.cols * 4, w, row0, N, x, ldx, y, ldy, T, KS, sh, xgr, xgs);
    else
        KL(c, (k_gemv<KIND, TT, false>), nb, 256, 0, w, row0, N, x, ldx, y, ldy, T, KS, sh, xgr, xgs);
    return true;
}

template <int KIND>
static void gemv_launch(be_cuda *c, const dw &w, int row0, int N, const float *x, int ldx,
                        float *y, int ldy, int T, int sh) {
    for (int t = 0; t < T; t += 8) {
        int tt = T - t < 8 ? T - t : 8;
        const float *xt = x + (size_t)t * ldx;
        float *yt = y + (size_t)t * ldy;
        if (tt == 1) gemv_launch1<KIND, 1>(c, w, row0, N, xt, ldx, yt, ldy, tt, sh);
        else if (tt <= 2) gemv_launch1<KIND, 2>(c, w, row0, N, xt, ldx, yt, ldy, tt, sh);
        else if (tt <= 4) gemv_launch1<KIND, 4>(c, w, row0, N, xt, ldx, yt, ldy, tt, sh);
        else gemv_launch1<KIND, 8>(c, w, row0, N, xt, ldx, yt, ldy, tt, sh);
    }
}

/* gemv_shift(w), or -1 when the GEMV cannot take this call (x not 16-byte rows) */
static int gemv_ok(const dw &w, const float *x, int ldx) {
    if (((uintptr_t)x & 15) || ldx % 4) return -1;
    return gemv_shift(w);
}

/* --- many rows (T >= TC_MIN_T): bf16 tensor cores through cuBLAS, fp32-level accuracy -------
 * Weights decoded to bf16 are exact (e4m3 x 2^k, e2m1 x 2^k and bf16 are bf16 values), so only
 * the activations need care: x = hi + lo with hi = bf16(x), lo = bf16(x - hi) (|x - hi - lo| <=
 * 2^-16 |x|), and y = W·hi + W·lo with fp32 accumulation (CUBLAS_COMPUTE_32F: bf16 products,
 * fp32 sums; no TF32). The bf16 copy of the weight rows is a transient per-call scratch from the
 * capped allocator (never a permanent expanded copy); BF16 weights are used in place. F32
 * weights (not exact in bf16) and shapes the 8-wide decode cannot take stay on the SIMT path. */
#define CKB(x) ck_blas((x), #x, __FILE__, __LINE__)
void ck_blas(cublasStatus_t e, const char *what, const char *file, int line) {
    if (e == CUBLAS_STATUS_SUCCESS) return;
    fprintf(stderr, "duet cuda: %s failed at %s:%d: %s\n", what, file, line, cublasGetStatusString(e));
    abort();
}

/* The backend's cuBLAS handle, on its stream, with a 32 MiB workspace under the cap. */
static cublasHandle_t blas_handle(be_cuda *c) {
    if (c->blas) return c->blas;
    c->blas_ws_bytes = (size_t)32 << 20;
    c->blas_ws = dmalloc(c, c->blas_ws_bytes);
    CKB(cublasCreate(&c->blas));
    CKB(cublasSetStream(c->blas, c->s)); /* resets the workspace: set ours after it */
    CKB(cublasSetWorkspace(c->blas, c->blas_ws, c->blas_ws_bytes));
    CKB(cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH));
    return c->blas;
}

/* C[n, m] (row-major, ld ldc) = beta C + B[n, k] · A[m, k]ᵀ; A, B bf16 row-major (ld lda, ldb) */
void gemm_bf16(cublasHandle_t h, int m, int n, int k, const void *A, int lda, const void *Bm,
                      int ldb, float *Cm, int ldc, float beta) {
    float alpha = 1.0f;
    CKB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, A, CUDA_R_16BF, lda,
                     Bm, CUDA_R_16BF, ldb, &beta, Cm, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT));
    LAUNCHED();
}

void sgemm_nt(be_cuda *c, int M, int N, int K, const float *A, int lda, const float *Bm, int ldb,
              float *Cm, int ldc) {
    float alpha = 1.0f, beta = 0.0f;
    /* row-major C = A·Bᵀ is column-major Cᵀ = B·Aᵀ (cuBLAS's default math: no TF32) */
    CKB(cublasSgemm(blas_handle(c), CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, Bm, ldb, A, lda,
                    &beta, Cm, ldc));
    LAUNCHED();
}

/* the 8-wide bf16 decode applies: not F32, K % 8 == 0, scale blocks a multiple of 8 wide */
static int tc_ok(const dw &w) {
    if (w.kind == WK_F32 || w.cols % 8) return 0;
    if ((w.kind == WK_FP8 || w.kind == WK_FP4) && w.bk % 8) return 0;
    return 1;
}

__device__ __forceinline__ uint32_t bf16x2(float a, float b) {
    return (uint32_t)fd_f32_to_bf16(a) | ((uint32_t)fd_f32_to_bf16(b) << 16);
}

/* two bf16 values whose f32 form is exact in bf16: truncation is exact */
__device__ __forceinline__ uint32_t bf16x2_exact(float a, float b) {
    return (__float_as_uint(a) >> 16) | (__float_as_uint(b) & 0xFFFF0000u);
}

template <int KIND>
__global__ void __launch_bounds__(256) k_wdec(wdec_jobs j) {
    PDL_ENTER();
    int q = blockIdx.y;
    dw w = q == 0 ? j.w[0] : q == 1 ? j.w[1] : j.w[2];
    int row0 = q == 0 ? j.row0[0] : q == 1 ? j.row0[1] : j.row0[2];
    int N = q == 0 ? j.N[0] : q == 1 ? j.N[1] : j.N[2];
    uint16_t *out = q == 0 ? j.out[0] : q == 1 ? j.out[1] : j.out[2];
    int K = w.cols, K8 = K / 8;
    size_t total = (size_t)N * K8;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        int n = (int)(i / K8), k = (int)(i % K8) * 8, wn = row0 + n;
        uint4 o;
        if (KIND == WK_BF16) {
            o = __ldg((const uint4 *)((const uint16_t *)w.data + (size_t)wn * K + k));
        } else if (KIND == WK_FP8) {
            uint2 r = __ldg((const uint2 *)((const uint8_t *)w.data + (size_t)wn * K + k));
            float sc = fd_e8m0_to_f32(__ldg(w.scale + (size_t)(wn / w.bn) * w.scols + k / w.bk));
            uint32_t u[2] = {r.x, r.y}, ov[4];
#pragma unroll
            for (int b = 0; b < 2; b++) {
                __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u[b] & 0xFFFF), __NV_E4M3);
                __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u[b] >> 16), __NV_E4M3);
                float2 a = __half22float2(__half2(lo)), bb = __half22float2(__half2(hi));
                ov[2 * b] = bf16x2_exact(a.x * sc, a.y * sc);
                ov[2 * b + 1] = bf16x2_exact(bb.x * sc, bb.y * sc);
            }
            o = make_uint4(ov[0], ov[1], ov[2], ov[3]);
        } else {
            uint32_t r = __ldg((const uint32_t *)((const uint8_t *)w.data + (size_t)wn * (K / 2) + k / 2));
            float sc = fd_e8m0_to_f32(__ldg(w.scale + (size_t)wn * w.scols + k / w.bk));
            float v[8];
#pragma unroll
            for (int b = 0; b < 8; b++) v[b] = fd_e2m1_to_f32((r >> (4 * b)) & 15u) * sc;
            o = make_uint4(bf16x2_exact(v[0], v[1]), bf16x2_exact(v[2], v[3]), bf16x2_exact(v[4], v[5]),
                           bf16x2_exact(v[6], v[7]));
        }
        *(uint4 *)(out + (size_t)n * K + k) = o;
    }
}

void wdec_launch(be_cuda *c, cudaStream_t st, const wdec_jobs &j, int njobs) {
    size_t most = 0;
    for (int q = 0; q < njobs; q++) {
        size_t t = (size_t)j.N[q] * (j.w[q].cols / 8);
        if (t > most) most = t;
    }
    unsigned gx = (unsigned)((most + 255) / 256);
    if (gx > 4096) gx = 4096;
    if (gx == 0) return;
    dim3 g(gx, njobs);
    switch (j.w[0].kind) {
    case WK_FP8: k_wdec<WK_FP8><<<g, 256, 0, st>>>(j); break;
    case WK_FP4: k_wdec<WK_FP4><<<g, 256, 0, st>>>(j); break;
    default: k_wdec<WK_BF16><<<g, 256, 0, st>>>(j); break;
    }
    (void)c;
    LAUNCHED();
}

/* hi[r, k] = bf16(v), lo[r, k] = bf16(v - hi) with v = x[src(r), k], src(r) = rows ? rows[r] : r;
 * hi and lo are [T, K] (ld K). VEC: 4 elements per thread (K, ldx multiples of 4, x 16-aligned). */
template <bool VEC>
__global__ void __launch_bounds__(256) k_split(const float *__restrict__ x, int ldx,
                                               const int32_t *rows, int T, int K,
                                               uint16_t *__restrict__ hi, uint16_t *__restrict__ lo) {
    PDL_ENTER();
    int W = VEC ? K / 4 : K;
    size_t total = (size_t)T * W;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        int r = (int)(i / W), k = (int)(i % W) * (VEC ? 4 : 1);
        const float *xp = x + (size_t)(rows ? rows[r] : r) * ldx + k;
        size_t o = (size_t)r * K + k;
        if (VEC) {
            float4 v = __ldg((const float4 *)xp);
            uint16_t h0 = fd_f32_to_bf16(v.x), h1 = fd_f32_to_bf16(v.y), h2 = fd_f32_to_bf16(v.z),
                     h3 = fd_f32_to_bf16(v.w);
            *(uint2 *)(hi + o) = make_uint2((uint32_t)h0 | ((uint32_t)h1 << 16), (uint32_t)h2 | ((uint32_t)h3 << 16));
            *(uint2 *)(lo + o) = make_uint2(bf16x2(v.x - fd_bf16_to_f32(h0), v.y - fd_bf16_to_f32(h1)),
                                            bf16x2(v.z - fd_bf16_to_f32(h2), v.w - fd_bf16_to_f32(h3)));
        } else {
            float v = __ldg(xp);
            uint16_t h = fd_f32_to_bf16(v);
            hi[o] = h;
            lo[o] = fd_f32_to_bf16(v - fd_bf16_to_f32(h));
        }
    }
}

void split_launch(cudaStream_t st, const float *x, int ldx, const int32_t *rows, int T, int K,
                         uint16_t *hi, uint16_t *lo) {
    bool vec = K % 4 == 0 && ldx % 4 == 0 && ((uintptr_t)x & 15) == 0;
    size_t total = (size_t)T * (vec ? K / 4 : K);
    unsigned g = (unsigned)((total + 255) / 256);
    if (g > 8192) g = 8192;
    if (g == 0) return;
    if (vec) k_split<true><<<g, 256, 0, st>>>(x, ldx, rows, T, K, hi, lo);
    else k_split<false><<<g, 256, 0, st>>>(x, ldx, rows, T, K, hi, lo);
    LAUNCHED();
}

/* rows of a per-call buffer: the next power of two >= n (at most most), so that the caching
 * allocator sees few distinct sizes and reuses its blocks across calls */
int pow2_rows(int n, int most) {
    int r = 1;
    while (r < n && r < most) r *= 2;
    return r < most ? r : most;
}

/* scratch sizes rounded up to 2 MiB so that the caching allocator reuses blocks across calls */
void *tc_scratch(be_cuda *c, size_t bytes) {
    return scratch(&c->base, round_up(bytes ? bytes : 1, (size_t)2 << 20));
}

/* y[T, N] = x[T, K] · W[row0 : row0+N]ᵀ on the tensor cores (tc_ok(w), T >= 1) */
static void mm_tc(be_cuda *c, const dw &w, int row0, int N, const float *x, int ldx, float *y,
                  int ldy, int T) {
    int K = w.cols;
    const uint16_t *wb;
    void *wbuf = NULL;
    if (w.kind == WK_BF16) {
        wb = (const uint16_t *)w.data + (size_t)row0 * K;
    } else {
        wbuf = tc_scratch(c, (size_t)N * K * 2);
        wdec_jobs j;
        memset(&j, 0, sizeof j);
        j.w[0] = w;
        j.row0[0] = row0;
        j.N[0] = N;
        j.out[0] = (uint16_t *)wbuf;
        wdec_launch(c, c->s, j, 1);
        wb = (const uint16_t *)wbuf;
    }
    /* x in row chunks: hi and lo of a chunk take <= 128 MiB */
    int tc = (int)(((size_t)32 << 20) / (size_t)K);
    if (tc < TC_MIN_T) tc = TC_MIN_T;
    tc = pow2_rows(T, tc);
    uint16_t *xb = (uint16_t *)tc_scratch(c, (size_t)tc * K * 4);
    for (int t0 = 0; t0 < T; t0 += tc) {
        int n = T - t0 < tc ? T - t0 : tc;
        uint16_t *hi = xb, *lo = xb + (size_t)n * K;
        split_launch(c->s, x + (size_t)t0 * ldx, ldx, NULL, n, K, hi, lo);
        gemm_bf16(blas_handle(c), N, n, K, wb, K, hi, K, y + (size_t)t0 * ldy, ldy, 0.0f);
        gemm_bf16(blas_handle(c), N, n, K, wb, K, lo, K, y + (size_t)t0 * ldy, ldy, 1.0f);
    }
    cu_free(&c->base, xb);
    if (wbuf) cu_free(&c->base, wbuf);
}

void mm(be_cuda *c, const be_weight *W, int row0, int N, const float *x, int ldx, float *y,
               int ldy, int T) {
    if (T <= 0 || N <= 0) return;
    const dw &w = W->v;
    int sh = T <= 16 ? gemv_ok(w, x, ldx) : -1;
    if (sh >= 0) {
        switch (w.kind) {
        case WK_FP8: gemv_launch<WK_FP8>(c, w, row0, N, x, ldx, y, ldy, T, sh); break;
        case WK_FP4: gemv_launch<WK_FP4>(c, w, row0, N, x, ldx, y, ldy, T, sh); break;
        case WK_BF16: gemv_launch<WK_BF16>(c, w, row0, N, x, ldx, y, ldy, T, sh); break;
        default: gemv_launch<WK_F32>(c, w, row0, N, x, ldx, y, ldy, T, sh); break;
        }
        return;
    }
    if (T >= TC_MIN_T && tc_ok(w)) {
        if (!graph_refuse(c, "matmul on cuBLAS")) mm_tc(c, w, row0, N, x, ldx, y, ldy, T);
        return;
    }
    dim3 g((N + TN - 1) / TN, (T + TM - 1) / TM);
    KL(c, k_gemm, g, 256, 0, w, row0, N, x, ldx, y, ldy, T);
}

void cu_matmul(be *b, const be_weight *W, int row0, int N, const float *x, int ldx,
                      float *y, int ldy, int T) {
    mm(C(b), W, row0, N, x, ldx, y, ldy, T);
}

/* one GEMV launch for all groups when T <= 8 and blocks fit the groups, else a matmul each */
void cu_matmul_xg(be *b, const be_weight *W, int N, const float *x, int ldx, int xgr, int xgs,
                  float *y, int ldy, int T) {
    be_cuda *c = C(b);
    const dw &w = W->v;
    int sh = T >= 1 && T <= 8 ? gemv_ok(w, x, ldx) : -1;
    if (sh >= 0 && xgr > 0 && N % xgr == 0 && xgs % 4 == 0) {
        bool ok = false;
        switch (w.kind * 16 + (T == 1 ? 1 : T <= 2 ? 2 : T <= 4 ? 4 : 8)) {
#define XG(K_, TT_) case K_ * 16 + TT_: ok = gemv_launch1<K_, TT_>(c, w, 0, N, x, ldx, y, ldy, T, sh, xgr, xgs); break;
        XG(WK_FP8, 1) XG(WK_FP8, 2) XG(WK_FP8, 4) XG(WK_FP8, 8)
        XG(WK_BF16, 1) XG(WK_BF16, 2) XG(WK_BF16, 4) XG(WK_BF16, 8)
#undef XG
        default: break;
        }
        if (ok) return;
    }
    for (int g = 0; g * xgr < N; g++)
        mm(c, W, g * xgr, xgr, x + (size_t)g * xgs, ldx, y + (size_t)g * xgr, ldy, T);
}
