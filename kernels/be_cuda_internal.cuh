/* be_cuda_internal.cuh — what the be_cuda*.cu files share: the backend object, the device
 * weight view, the allocator and staging calls, the matmul entry points, and the small device
 * helpers used by kernels in more than one file.
 *
 * Why: the CUDA backend is split by subject (be_cuda.cu: object and ops table; be_cuda_mem.cu:
 * memory, weights; be_cuda_gemm.cu: matmul and cuBLAS; be_cuda_elem.cu: embed, norms, RoPE, mHC,
 * elementwise; be_cuda_attn.cu; be_cuda_cmp.cu: compressor, indexer; be_cuda_moe.cu) so that
 * each can be read and rebuilt alone. The files are compiled without relocatable device code,
 * so device helpers shared between them live here as inline functions; kernels are launched
 * only from the file that defines them. C++ only (never included by C callers: be_cuda.h is
 * their header).
 */
#ifndef DUET_BE_CUDA_INTERNAL_CUH
#define DUET_BE_CUDA_INTERNAL_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "common/ckpt.h"
#include "common/err.h"
#include "common/formats.h"
#include "worker/backend.h"
}
#include "kernels/be_cuda.h"
#include "kernels/fmt_dev.cuh"

/* ---- errors: every CUDA / cuBLAS call is checked; a failure aborts naming file and line --- */
#define CK(x) ck_cuda((x), #x, __FILE__, __LINE__)
void ck_cuda(cudaError_t e, const char *what, const char *file, int line);
#define CKB(x) ck_blas((x), #x, __FILE__, __LINE__)
void ck_blas(cublasStatus_t e, const char *what, const char *file, int line);
/* after every launch: the launch error, and a sync when DUET_CUDA_SYNC=1 */
#define LAUNCHED() launched(__FILE__, __LINE__)
void launched(const char *file, int line);

/* ---- the backend object (be_cuda.cu creates it) ------------------------------------------- */
typedef struct { void *p; size_t n; } blk;

/* routed experts on the tensor cores run on this many extra streams (be_cuda_moe.cu) */
#define MOE_LANES 4

typedef struct {
    be base;
    int dev, integrated, sync_each;
    cudaStream_t s;
    char name[256];
    int ccmaj, ccmin;
    size_t cap, used;          /* bytes: cap = fraction x total; used = live + cached blocks */
    size_t free_bytes;         /* of used: cached free blocks, given back when the cap is hit */
    /* caching allocator for alloc/free (scratch and state): live map + free list */
    blk *live; size_t n_live, cap_live;
    blk *freel; size_t n_free, cap_free;
    /* pinned staging ring for per-call host metadata; dev_meta mirrors its offsets */
    unsigned char *pin, *dmeta;
    size_t meta_cap, meta_off;
    /* cuBLAS for matmuls with many rows (bf16 tensor cores): created at the first such call,
     * its workspace allocated under the cap */
    cublasHandle_t blas;
    void *blas_ws;
    size_t blas_ws_bytes;
    /* routed experts on the tensor cores: MOE_LANES streams, each with its own cuBLAS handle
     * and workspace (under the cap), run different experts at once (created at first use) */
    int lanes_ready;
    cudaStream_t lane_s[MOE_LANES];
    cublasHandle_t lane_blas[MOE_LANES];
    void *lane_ws[MOE_LANES];
    cudaEvent_t lane_ev[MOE_LANES], ev_join;
    /* MoE layers' device tables of expert views (be_cuda_moe.cu), built at a layer's first
     * call and kept: key = the layer and its weight pointers; all dropped when a weight is freed */
    struct moe_tab *mtab;
    int n_mtab, cap_mtab;
    /* CUDA graphs of small steps (be_cuda_graph.cu): gmode G_OFF runs ops directly; G_RECORD
     * only records what they would launch (no CUDA call); G_CAPTURE captures them on s.
     * gpersist > 0: allocations outlive the step (tables built at a layer's first call) */
    int gmode, gpersist;
    struct gstate *g;
    int pdl; /* launches with programmatic dependent launch (DUET_CUDA_PDL, default 1) */
} be_cuda;

static inline be_cuda *C(be *b) { return (be_cuda *)b; }
extern be_cuda *g_launch_be; /* for LAUNCHED's optional sync; set per create (one per process ok) */

/* ---- memory under the cap, staging (be_cuda_mem.cu) --------------------------------------- */
static inline size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }
/* grid for a grid-stride loop over n elements, at most 65535 x 8 blocks */
static inline int grid_for(size_t n, int threads) {
    size_t g = (n + threads - 1) / threads;
    return (int)(g > 65535 * 8 ? 65535 * 8 : (g ? g : 1));
}
void *dmalloc(be_cuda *c, size_t bytes);          /* cudaMalloc under the cap, or abort */
void *cu_alloc(be *b, size_t bytes);              /* zeroed, from the caching allocator */
void *scratch(be *b, size_t bytes);               /* not zeroed: every element written first */
void cu_free(be *b, void *p);
/* forgets the cached MoE expert tables (be_cuda_moe.cu): a freed weight may be reused */
void moe_tables_drop(be_cuda *c);
void stage_reserve(be_cuda *c, size_t bytes);
void *stage(be_cuda *c, const void *src, size_t bytes);      /* host metadata -> device, async */

/* ---- CUDA graphs of small steps (be_cuda_graph.cu) ---------------------------------------
 * A graphed step runs the forward pass's ops twice at most: a record pass (every launch,
 * memset and copy appends its kernel, grid and argument bytes to the step's signature; host
 * metadata goes to one pinned arena; scratch comes from a device arena with deterministic
 * addresses), then, when no cached graph has the same signature, a capture pass of the same
 * ops. Replay = one copy of the metadata arena + the graph. Per-step values (positions, key
 * plans, ids) must therefore reach kernels through stage()/inl_put(), never as scalars in the
 * parameters: a scalar that changes makes a new signature (correct, but a capture per step). */
enum { G_OFF = 0, G_RECORD = 1, G_CAPTURE = 2 };
void gsig(be_cuda *c, const void *p, size_t n);
/* room for n more signature bytes; returns where they go (the caller fills all n) */
unsigned char *gsig_room(be_cuda *c, size_t n);
template <typename A> static inline unsigned char *gsig_put(unsigned char *p, const A &a) {
    memcpy(p, &a, sizeof a);
    return p + sizeof a;
}
/* true: launch now (G_OFF, G_CAPTURE); false: G_RECORD, recorded only */
template <typename... A>
static inline bool klaunch_ok(be_cuda *c, const void *k, dim3 g, dim3 b, size_t sm, const A &...a) {
    if (!c->gmode) return true;
    unsigned hdr[8] = {g.x, g.y, g.z, b.x, b.y, b.z, (unsigned)sm, 0u};
    unsigned char *p = gsig_room(c, sizeof k + sizeof hdr + (sizeof(A) + ... + 0));
    p = gsig_put(p, k);
    p = gsig_put(p, hdr);
    ((p = gsig_put(p, a)), ...);
    return c->gmode == G_CAPTURE;
}
/* Programmatic dependent launch (sm_90+). A kernel launched by KL may be scheduled while the
 * kernel before it still runs: it must call PDL_ENTER() (wait for the previous grids to finish
 * and their writes to be visible, then let the next kernel be scheduled) before it reads
 * anything an earlier kernel wrote; before that it may only touch weights (e.g. prefetch them
 * into L2, which is what hides the next matmul's DRAM latency behind this kernel's tail). Both
 * are no-ops for a kernel launched without the attribute. DUET_CUDA_PDL=0: launches without it. */
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
#define PDL_ENTER()     \
    do {                \
        pdl_wait();     \
        pdl_trigger();  \
    } while (0)
__device__ __forceinline__ void prefetch_l2(const void *p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}
bool pdl_on(be_cuda *c);
template <typename... KA, typename... A>
static inline cudaError_t klaunch_pdl(be_cuda *c, void (*k)(KA...), dim3 g, dim3 b, size_t sm,
                                      const A &...a) {
    cudaLaunchConfig_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDim = g, cfg.blockDim = b, cfg.dynamicSmemBytes = sm, cfg.stream = c->s;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at, cfg.numAttrs = pdl_on(c) ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, k, a...);
}
/* Every launch on the backend stream goes through KL (a template kernel in parentheses):
 * recorded in a graph's record pass, launched otherwise (with PDL), the launch error checked. */
#define KL(c, k, g, bl, sm, ...)                                                                 \
    do {                                                                                         \
        if (klaunch_ok((c), (const void *)(k), dim3(g), dim3(bl), (size_t)(sm), __VA_ARGS__)) {  \
            CK(klaunch_pdl((c), k, dim3(g), dim3(bl), (size_t)(sm), __VA_ARGS__));               \
            LAUNCHED();                                                                          \
        }                                                                                        \
    } while (0)
/* In a graphed step: marks it unfit (it is run again directly) and returns true; the op must
 * then return without launching. Outside graphs: false. For paths a graph cannot hold (host
 * syncs, cuBLAS, other streams). */
bool graph_refuse(be_cuda *c, const char *why);
/* graph-mode memory: scratch from the step arena; memset / device copies recorded or captured */
void *garena_alloc(be_cuda *c, size_t n);
bool garena_free(be_cuda *c, void *p);
void *gstage(be_cuda *c, const void *src, size_t bytes);
void gdownload(be_cuda *c, void *dst, const void *src, size_t bytes);
void gmemset(be_cuda *c, void *p, size_t n);
void gcopy(be_cuda *c, void *dst, const void *src, size_t n);
void graph_destroy(be_cuda *c);
int cu_graph_begin(be *b, int T);
int cu_graph_end(be *b);

/* Small host metadata in the kernel's parameters instead of a staged copy: a copy costs the host
 * ~3 us and puts a DMA between two kernels on the stream, ~150 of them per decode step. An op
 * passes inl<E, N> by value next to a device pointer: inl_put() fills it and returns NULL when
 * n <= N (the kernel reads inl_at() from the parameters), else stages src and returns its device
 * copy. Indexed directly (never by address) so that it stays in the parameter bank. */
template <typename E, int N> struct inl { E v[N]; };
template <typename E, int N>
static inline const E *inl_put(be_cuda *c, const E *src, size_t n, inl<E, N> &m) {
    if (n <= (size_t)N && !c->gmode) {
        memcpy(m.v, src, n * sizeof(E));
        return NULL;
    }
    memset(&m, 0, sizeof m); /* in a graph: zeros in the parameters, values in the arena */
    return (const E *)stage(c, src, n * sizeof(E));
}
template <typename E, int N>
__device__ __forceinline__ E inl_at(const E *d, const inl<E, N> &m, int i) {
    return d ? d[i] : m.v[i];
}

/* ---- weights ------------------------------------------------------------------------------ */
enum { WK_F32, WK_BF16, WK_FP8, WK_FP4 };

/* Device view of a weight, passed by value to kernels; no padding bytes (kernel arguments are
 * compared byte for byte by the graph cache). */
typedef struct {
    int kind;
    int rows, cols;            /* logical [N, K] */
    int scols, bn, bk;
    const void *data;          /* F32/BF16/FP8: [N, K]; FP4: [N, K/2] bytes */
    const uint8_t *scale;      /* FP8: [ceil(N/bn), scols]; FP4: [N, scols] */
} dw;

struct be_weight {
    dw v;
    size_t bytes;              /* device bytes of data + scale */
    size_t dbytes, sbytes;
    void *data;
    uint8_t *scale;
};

__device__ __forceinline__ float wget(const dw &w, int64_t n, int64_t k) {
    switch (w.kind) {
    case WK_F32: return ((const float *)w.data)[n * w.cols + k];
    case WK_BF16: return fd_bf16_to_f32(((const uint16_t *)w.data)[n * w.cols + k]);
    case WK_FP8:
        return fd_e4m3_to_f32(((const uint8_t *)w.data)[n * w.cols + k]) *
               fd_e8m0_to_f32(w.scale[(n / w.bn) * w.scols + k / w.bk]);
    default: {
        uint8_t byte = ((const uint8_t *)w.data)[n * (w.cols / 2) + k / 2];
        uint32_t nib = (k & 1) ? (byte >> 4) : (byte & 15);
        return fd_e2m1_to_f32(nib) * fd_e8m0_to_f32(w.scale[n * w.scols + k / w.bk]);
    }
    }
}

/* elements k..k+3 of row n (k % 4 == 0, K % 4 == 0, scale blocks a multiple of 4 wide) */
__device__ __forceinline__ void wget4(const dw &w, int64_t n, int64_t k, float *o) {
    switch (w.kind) {
    case WK_F32: {
        float4 v = *(const float4 *)((const float *)w.data + n * w.cols + k);
        o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
        return;
    }
    case WK_BF16: {
        uint2 v = *(const uint2 *)((const uint16_t *)w.data + n * w.cols + k);
        o[0] = __uint_as_float(v.x << 16); o[1] = __uint_as_float(v.x & 0xFFFF0000u);
        o[2] = __uint_as_float(v.y << 16); o[3] = __uint_as_float(v.y & 0xFFFF0000u);
        return;
    }
    case WK_FP8: {
        uint32_t v = *(const uint32_t *)((const uint8_t *)w.data + n * w.cols + k);
        float sc = fd_e8m0_to_f32(w.scale[(n / w.bn) * w.scols + k / w.bk]);
#pragma unroll
        for (int i = 0; i < 4; i++) o[i] = fd_e4m3_to_f32((uint8_t)(v >> (8 * i))) * sc;
        return;
    }
    default: {
        uint32_t v = *(const uint16_t *)((const uint8_t *)w.data + n * (w.cols / 2) + k / 2);
        float sc = fd_e8m0_to_f32(w.scale[n * w.scols + k / w.bk]);
#pragma unroll
        for (int i = 0; i < 4; i++) o[i] = fd_e2m1_to_f32((v >> (4 * i)) & 15u) * sc;
        return;
    }
    }
}

/* ---- reductions ---------------------------------------------------------------------------- */
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* hist[dg] += 1 for every lane whose `in` holds, one shared atomic per distinct dg of the warp
 * (radix-select histograms: most keys of a row share their top bytes, and lane-by-lane atomics
 * on one bin serialised the pass). Every lane of the warp calls it. */
__device__ __forceinline__ void hist_add_warp(unsigned *hist, bool in, uint32_t dg) {
    unsigned act = __ballot_sync(0xffffffffu, in);
    if (!in) return;
    unsigned peers = __match_any_sync(act, dg);
    if (__ffs(peers) - 1 == (int)(threadIdx.x & 31)) atomicAdd(&hist[dg], (unsigned)__popc(peers));
}

/* block-wide sum (all threads get the result); blockDim.x a multiple of 32, <= 1024 */
__device__ inline float block_sum(float v, float *sh) {
    v = warp_sum(v);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float s = 0;
    for (int i = 0; i < nw; i++) s += sh[i];
    return s;
}

/* ---- norms and RoPE (be_cuda_elem.cu's ops, be_cuda_cmp.cu's compressor) ------------------ */
__device__ __forceinline__ float inv_rms_dev(double ss, int n, float eps) {
    return (float)(1.0 / sqrt(ss / n + eps));
}

__device__ __forceinline__ void rope_pair_w(float *r, int i, int pos, float omega_i, int inverse) {
    float ang = (float)pos * omega_i;
    float cs = cosf(ang), sn = sinf(ang);
    if (inverse) sn = -sn;
    float a = r[2 * i], bb = r[2 * i + 1];
    r[2 * i] = a * cs - bb * sn;
    r[2 * i + 1] = a * sn + bb * cs;
}
__device__ __forceinline__ void rope_pair(float *r, int i, int pos, const float *omega, int inverse) {
    rope_pair_w(r, i, pos, omega[i], inverse);
}

/* ---- GEMV building blocks (be_cuda_gemm.cu's k_gemv, be_cuda_moe.cu's grouped experts) ----- */

/* 16 bytes of weights that are read once: no L1 allocation, so x (re-read by every row) stays */
__device__ __forceinline__ uint4 ld_stream16(const void *p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

/* Weight rows are read in 16-byte chunks of EPC elements, each 32-bit word of a chunk holds EPW
 * elements: dec() expands word u into EPW floats (times POST⁻¹: FP4 is expanded through f16,
 * 2^-14 of its value, so that the f16 -> f32 conversion does the work); the chunk's partial dot
 * is multiplied by POST and by the chunk's e8m0 scale (1 for BF16/F32). All scale factors are
 * powers of two, so the result is the same function as decoding to f32 first. */
template <int KIND> struct wchunk;
template <> struct wchunk<WK_FP8> {
    enum { EPC = 16, EPW = 4, SCALED = 1 };
    static __device__ __forceinline__ float post() { return 1.0f; }
    static __device__ __forceinline__ void dec(uint32_t u, float *o) {
        __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u & 0xFFFF), __NV_E4M3);
        __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u >> 16), __NV_E4M3);
        float2 a = __half22float2(__half2(lo)), bb = __half22float2(__half2(hi));
        o[0] = a.x; o[1] = a.y; o[2] = bb.x; o[3] = bb.y;
    }
};
template <> struct wchunk<WK_FP4> {
    enum { EPC = 32, EPW = 8, SCALED = 1 };
    static __device__ __forceinline__ float post() { return 16384.0f; }
    /* nibble j (s e1 e0 m) -> f16 bits s00 0e1e0 m000000000: 2^-14 of the e2m1 value (e = 0:
     * f16 subnormal m·2^-15); nibbles j and j + 4 share one f16x2 word, read as an f16x2 in
     * place (no repacking of its halves: the decode is bound by the integer pipe, which runs at
     * half the FMA pipe's rate; the left shifts go to the FMA pipe as IMAD.SHL) */
    static __device__ __forceinline__ void dec(uint32_t u, float *o) {
        const uint32_t M = 0x0E000E00u, S = 0x80008000u;
        uint32_t h[4] = {((u << 9) & M) | ((u << 12) & S), ((u << 5) & M) | ((u << 8) & S),
                         ((u << 1) & M) | ((u << 4) & S), ((u >> 3) & M) | (u & S)};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            __half2 hv;
            memcpy(&hv, &h[j], 4);
            float2 f = __half22float2(hv);
            o[j] = f.x;
            o[j + 4] = f.y;
        }
    }
};
template <> struct wchunk<WK_BF16> {
    enum { EPC = 8, EPW = 2, SCALED = 0 };
    static __device__ __forceinline__ float post() { return 1.0f; }
    static __device__ __forceinline__ void dec(uint32_t u, float *o) {
        o[0] = __uint_as_float(u << 16);
        o[1] = __uint_as_float(u & 0xFFFF0000u);
    }
};
template <> struct wchunk<WK_F32> {
    enum { EPC = 4, EPW = 1, SCALED = 0 };
    static __device__ __forceinline__ float post() { return 1.0f; }
    static __device__ __forceinline__ void dec(uint32_t u, float *o) { o[0] = __uint_as_float(u); }
};

/* elements per 16-byte chunk of a weight kind (host and device) */
__host__ __device__ static inline int wk_epc(int kind) {
    return kind == WK_FP8 ? 16 : kind == WK_FP4 ? 32 : kind == WK_BF16 ? 8 : 4;
}
/* log2 of the chunks per scale block along K, or -1 when the GEMV cannot take the weight (K not
 * whole chunks, scale blocks not a power-of-two number of chunks) */
static inline int gemv_shift(const dw &w) {
    int epc = wk_epc(w.kind);
    if (w.cols % epc) return -1;
    if (w.kind != WK_FP8 && w.kind != WK_FP4) return 0;
    if (w.bk <= 0 || w.bk % epc) return -1;
    int q = w.bk / epc, sh = 0;
    while ((1 << sh) < q) sh++;
    return (1 << sh) == q ? sh : -1;
}

template <int N> __device__ __forceinline__ void ldx(const float *p, float *o) {
    if (N >= 4) {
#pragma unroll
        for (int i = 0; i < N / 4; i++) {
            float4 v = __ldg((const float4 *)p + i);
            o[4 * i] = v.x; o[4 * i + 1] = v.y; o[4 * i + 2] = v.z; o[4 * i + 3] = v.w;
        }
    } else if (N == 2) {
        float2 v = __ldg((const float2 *)p);
        o[0] = v.x; o[1] = v.y;
    } else {
        o[0] = __ldg(p);
    }
}

/* x staged in shared memory (XS): row t at xs + t·K, in 16-byte units swizzled within each
 * chunk (unit u at u ^ ((u >> 3) & (UPC - 1)), UPC = units per chunk) so that the 8 lanes of a
 * quarter-warp, each reading the same unit of its own chunk, hit 8 different bank groups. */
__device__ __forceinline__ int xs_unit(int u, int upc) { return u ^ ((u >> 3) & (upc - 1)); }

/* block-wide: xs[t] = x rows xr[t] (t < TT; K floats each, K % 4 == 0), then a barrier */
template <int KIND, int TT>
__device__ __forceinline__ void xs_stage(float *xs, const float *const *xr, int K) {
    int upc = wchunk<KIND>::EPC / 4, nu = K / 4;
#pragma unroll
    for (int t = 0; t < TT; t++)
        for (int u = threadIdx.x; u < nu; u += blockDim.x)
            ((float4 *)(xs + (size_t)t * K))[xs_unit(u, upc)] = __ldg((const float4 *)xr[t] + u);
    __syncthreads();
}

/* acc[r][t] += (chunk ch of rows r) · x[t] for t < T; rv/s: the R rows' chunks and scales; x
 * from global rows xr[t] or (XS) from the staged rows xs + t·K */
template <int KIND, int TT, int R, bool XS>
__device__ __forceinline__ void gemv_chunk(const uint4 *rv, const float *s, int ch,
                                           const float *const *xr, const float *xs, int K, int T,
                                           float (&acc)[R][TT]) {
    typedef wchunk<KIND> WC;
    float part[R][TT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++) part[r][t] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float wv[R][WC::EPW];
#pragma unroll
        for (int r = 0; r < R; r++) {
            uint32_t u = i == 0 ? rv[r].x : i == 1 ? rv[r].y : i == 2 ? rv[r].z : rv[r].w;
            WC::dec(u, wv[r]);
        }
#pragma unroll
        for (int t = 0; t < TT; t++) {
            if (t < T) {
                float xv[WC::EPW];
                if (XS) {
#pragma unroll
                    for (int q = 0; q < WC::EPW / 4; q++) {
                        int u = ch * (WC::EPC / 4) + i * (WC::EPW / 4) + q;
                        float4 v = ((const float4 *)(xs + (size_t)t * K))[xs_unit(u, WC::EPC / 4)];
                        xv[4 * q] = v.x; xv[4 * q + 1] = v.y; xv[4 * q + 2] = v.z; xv[4 * q + 3] = v.w;
                    }
                } else {
                    ldx<WC::EPW>(xr[t] + ch * WC::EPC + i * WC::EPW, xv);
                }
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int e = 0; e < WC::EPW; e++) part[r][t] = fmaf(wv[r][e], xv[e], part[r][t]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++)
            if (t < T) acc[r][t] += WC::SCALED ? part[r][t] * WC::post() * s[r] : part[r][t];
}

/* e8m0 -> f32 as fd_e8m0_to_f32 (0xFF: NaN, 0: 2^-127), by selects instead of branches: one per
 * chunk and row in the GEMV loop */
__device__ __forceinline__ float e8m0_sel(uint8_t b) {
    uint32_t e = b, bits = e ? e << 23 : 0x00400000u;
    return __uint_as_float(e == 0xFFu ? 0x7FC00000u : bits);
}

/* One warp: this lane's share of the dot products of weight rows wn[0..R) with up to TT input
 * rows xr[t], over the chunks c0, c0 + cs, ... (lane-interleaved: a warp reads 512 contiguous
 * bytes of a row at a time). sh = gemv_shift(w). Two chunks of each row are loaded before use,
 * so 2·R 16-byte loads per lane are in flight. Not reduced over the warp. */
template <int KIND, int TT, int R, bool XS>
__device__ __forceinline__ void gemv_rows(const dw &w, const int *wn, const float *const *xr,
                                          const float *xs, int T, int c0, int cs, int sh,
                                          float (&acc)[R][TT]) {
    typedef wchunk<KIND> WC;
    int nch = w.cols / WC::EPC;
    const uint4 *rp[R];
    const uint8_t *sp[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        rp[r] = (const uint4 *)((const uint8_t *)w.data + (size_t)wn[r] * (nch * 16));
        sp[r] = WC::SCALED ? w.scale + (size_t)(KIND == WK_FP8 ? wn[r] / w.bn : wn[r]) * w.scols : NULL;
#pragma unroll
        for (int t = 0; t < TT; t++) acc[r][t] = 0.f;
    }
    int ch = c0;
    for (; ch + cs < nch; ch += 2 * cs) {
        uint4 ra[R], rb[R];
        float sa[R], sb[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            ra[r] = ld_stream16(rp[r] + ch);
            rb[r] = ld_stream16(rp[r] + ch + cs);
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            sa[r] = WC::SCALED ? e8m0_sel(__ldg(sp[r] + (ch >> sh))) : 1.f;
            sb[r] = WC::SCALED ? e8m0_sel(__ldg(sp[r] + ((ch + cs) >> sh))) : 1.f;
        }
        gemv_chunk<KIND, TT, R, XS>(ra, sa, ch, xr, xs, w.cols, T, acc);
        gemv_chunk<KIND, TT, R, XS>(rb, sb, ch + cs, xr, xs, w.cols, T, acc);
    }
    if (ch < nch) {
        uint4 ra[R];
        float sa[R];
#pragma unroll
        for (int r = 0; r < R; r++) ra[r] = ld_stream16(rp[r] + ch);
#pragma unroll
        for (int r = 0; r < R; r++) sa[r] = WC::SCALED ? e8m0_sel(__ldg(sp[r] + (ch >> sh))) : 1.f;
        gemv_chunk<KIND, TT, R, XS>(ra, sa, ch, xr, xs, w.cols, T, acc);
    }
}

/* rows per warp of the GEMV for TT input rows: more rows share each x load, fewer registers */
template <int TT> struct gemv_r { enum { R = TT >= 8 ? 2 : 4 }; };

/* x rows staged in shared memory: FP8/FP4 weights (one or more x units per chunk) and TT rows
 * of K floats within the default 48 KB */
static inline bool gemv_xs(int kind, int TT, int K) {
    return (kind == WK_FP8 || kind == WK_FP4) && (size_t)TT * K * 4 <= 48 * 1024;
}

/* ---- 64x64 SIMT tiles (be_cuda_gemm.cu's k_gemm, be_cuda_moe.cu's grouped experts) ------- */
enum { TM = 64, TN = 64, TK = 16 };

/* One 64x64 output tile at (t0, n0): rows t of x are x + (xrows ? xrows[t] : t) * ldx. */
__device__ __forceinline__ void gemm_tile(const dw &w, int row0, int N, const float *__restrict__ x,
                                          int ldx, const int32_t *xrows, float *__restrict__ y,
                                          int ldy, int T, int t0, int n0) {
    __shared__ float xs[TK][TM + 4];
    __shared__ float ws[TK][TN + 4];
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16, K = w.cols;
    /* 4 consecutive k per thread when rows are 4-aligned: one 4/8/16-byte load each */
    bool vec = K % 4 == 0 && ldx % 4 == 0 && ((uintptr_t)x & 15) == 0 &&
               ((w.kind != WK_FP8 && w.kind != WK_FP4) || w.bk % 4 == 0);
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += TK) {
        if (vec) {
            int r = threadIdx.x / 4, kq = (threadIdx.x % 4) * 4, k = k0 + kq;
            int t = t0 + r, n = n0 + r;
            float4 xv = make_float4(0.f, 0.f, 0.f, 0.f);
            if (t < T && k < K) xv = *(const float4 *)(x + (size_t)(xrows ? xrows[t] : t) * ldx + k);
            xs[kq][r] = xv.x; xs[kq + 1][r] = xv.y; xs[kq + 2][r] = xv.z; xs[kq + 3][r] = xv.w;
            float wv[4] = {0.f, 0.f, 0.f, 0.f};
            if (n < N && k < K) wget4(w, row0 + n, k, wv);
            ws[kq][r] = wv[0]; ws[kq + 1][r] = wv[1]; ws[kq + 2][r] = wv[2]; ws[kq + 3][r] = wv[3];
        } else {
            for (int i = threadIdx.x; i < TM * TK; i += 256) {
                int r = i / TK, kk = i % TK;
                int t = t0 + r, k = k0 + kk;
                xs[kk][r] = (t < T && k < K) ? x[(size_t)(xrows ? xrows[t] : t) * ldx + k] : 0.f;
                int n = n0 + r;
                ws[kk][r] = (n < N && k < K) ? wget(w, row0 + n, k) : 0.f;
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; kk++) {
            float a[4], bb[4];
#pragma unroll
            for (int i = 0; i < 4; i++) { a[i] = xs[kk][ty * 4 + i]; bb[i] = ws[kk][tx * 4 + i]; }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * bb[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int t = t0 + ty * 4 + i, n = n0 + tx * 4 + j;
            if (t < T && n < N) y[(size_t)t * ldy + n] = acc[i][j];
        }
}

/* ---- matmul (be_cuda_gemm.cu) -------------------------------------------------------------- */

/* y[T, N] = x[T, K] · W[row0 : row0+N]ᵀ: GEMV (T <= 16), tensor cores (T >= TC_MIN_T), tiles */
void mm(be_cuda *c, const be_weight *W, int row0, int N, const float *x, int ldx, float *y,
        int ldy, int T);
enum { TC_MIN_T = 32 };
/* a routed expert goes to the tensor cores from this many rows: its bf16 decode (~48 MB written
 * and read back for V4-Flash's 2048 x 4096 FP4 matrices, ~25 us) costs less than the SIMT
 * tile's fp32 FLOPs from about here on; below it the GEMV chunks read the FP4 bytes directly */
enum { MOE_TC_MIN = 16 };
/* C[M, N] (row-major, ld ldc) = A[M, K] · B[N, K]ᵀ, f32 row-major, on the backend's cuBLAS
 * handle and stream (fp32 math); the caller refuses graphs first */
void sgemm_nt(be_cuda *c, int M, int N, int K, const float *A, int lda, const float *Bm, int ldb,
              float *Cm, int ldc);
/* C[n, m] (row-major, ld ldc) = beta C + B[n, k] · A[m, k]ᵀ; A, B bf16 row-major (ld lda, ldb) */
void gemm_bf16(cublasHandle_t h, int m, int n, int k, const void *A, int lda, const void *Bm,
               int ldb, float *Cm, int ldc, float beta);
/* Up to 3 decode jobs per launch (blockIdx.y): out[q][n, k] = bf16(W_q[row0_q + n, k]), ld K. */
typedef struct { dw w[3]; int row0[3], N[3]; uint16_t *out[3]; } wdec_jobs;
void wdec_launch(be_cuda *c, cudaStream_t st, const wdec_jobs &j, int njobs);
/* hi[r] = bf16(x[rows ? rows[r] : r]), lo[r] = bf16(x - hi); hi, lo [T, K] */
void split_launch(cudaStream_t st, const float *x, int ldx, const int32_t *rows, int T, int K,
                  uint16_t *hi, uint16_t *lo);
int pow2_rows(int n, int most);
void *tc_scratch(be_cuda *c, size_t bytes);

/* ---- the ops of worker/backend.h, one file each subject ---------------------------------- */
void cu_upload(be *b, void *dst, const void *src, size_t bytes);
void cu_download(be *b, void *dst, const void *src, size_t bytes);
void cu_fill(be *b, float *x, float v, size_t n);
void cu_copy(be *b, float *dst, const float *src, size_t n);
be_weight *cu_weight(be *b, const ck_weight *w);
be_weight *cu_weight_slice(be *b, const ck_weight *w, int64_t r0, int64_t nr, int64_t c0,
                           int64_t nc);
void cu_weight_free(be *b, be_weight *w);
float *cu_vector(be *b, const ck_weight *w);
void cu_mhc_norm(be *b, int head_mode, const float *h, const float *fn, const float *base,
                 const float *scale, int T, int n_hc, int D, int iters, float hc_eps,
                 float norm_eps, const float *norm_w, float *x, float *post, float *comb);
void cu_matmul_xg(be *b, const be_weight *W, int N, const float *x, int ldx, int xgr, int xgs,
                  float *y, int ldy, int T);
void cu_matmul(be *b, const be_weight *W, int row0, int N, const float *x, int ldx, float *y,
               int ldy, int T);
void cu_embed(be *b, const be_weight *table, const int32_t *ids, int T, int n_hc, float *h);
void cu_rmsnorm(be *b, const float *x, const float *w, float *y, int T, int n, float eps);
void cu_head_rms(be *b, float *x, int rows, int dim, float eps);
void cu_rope(be *b, float *x, int T, int n_heads, int head_dim, int rope_dims,
             const int32_t *pos, const float *omega, int inverse);
void cu_mhc_pre(be *b, const float *h, const float *fn, const float *base, const float *scale,
                int T, int n, int D, int iters, float eps, float hc_eps, float *x_out,
                float *post, float *comb);
void cu_mhc_post(be *b, float *h, const float *v, const float *post, const float *comb, int T,
                 int n, int D);
void cu_hc_head(be *b, const float *h, const float *fn, const float *base, const float *scale,
                int T, int n, int D, float eps, float hc_eps, float *y);
void cu_attention(be *b, const be_attn_args *a);
void cu_ring_write(be *b, float *ring, int ring_size, int dim, const float *kv,
                   const int32_t *pos, int T);
void cu_ring_write_bf16(be *b, uint16_t *ring, int ring_size, int dim, const float *kv,
                        const int32_t *pos, int T);
void cu_ring_write_rows(be *b, void *const *rings, int ring_size, int dim, const float *kv,
                        const int32_t *pos, int T, int kv_fmt);
void cu_compress(be *b, const be_compress_args *a);
void cu_index_topk(be *b, const be_index_args *a);
void cu_moe(be *b, const be_moe_layer *L, const float *x, const int32_t *ids, int T, float *out);
void cu_scale_rows(be *b, float *x, int T, int n, float s);
void cu_add(be *b, float *y, const float *x, size_t n);
void cu_fp8_qat(be *b, float *x, int T, int dim, int nope, int block);
void cu_hadamard_fp4(be *b, float *x, int rows, int dim);
void cu_sample(be *b, const float *logits, int V, int n, const be_sample_req *req,
               be_sample_res *res);

#endif
