/* be_cuda.cu — the CUDA backend: every op of worker/backend.h on one GPU.
 *
 * Why: the forward pass is written once against backend.h; this file runs it on a GPU with the
 * same numbers as the CPU reference (worker/be_cpu.c): fp32 activations and fp32 accumulation,
 * weights kept in their stored format in device memory and decoded inside the kernels (FP8 e4m3
 * with e8m0 block scales, packed FP4 e2m1 with per-32 e8m0 scales, BF16, F32). A weight slice
 * that does not start on a scale block is converted to BF16 on upload (lossless: e4m3 x 2^k and
 * e2m1 x 2^k are exact in bf16). Everything runs on one stream, so ordering is the stream's;
 * host metadata (positions, key plans, ids) goes through a pinned staging ring.
 *
 * Must never: use managed memory; allocate device memory past the cap without a sentence;
 * let a CUDA error pass silently (every call is checked; an error aborts naming file and line,
 * since backend ops have no error return).
 *
 * Sections: memory and the cap · weights · matmul · norms, RoPE, embed · mHC · attention ·
 * compressor · indexer · MoE · elementwise · the ops table · synthetic weights.
 */
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

#define CK(x) ck_cuda((x), #x, __FILE__, __LINE__)
static void ck_cuda(cudaError_t e, const char *what, const char *file, int line) {
    if (e == cudaSuccess) return;
    fprintf(stderr, "duet cuda: %s failed at %s:%d: %s\n", what, file, line, cudaGetErrorString(e));
    abort();
}
#define LAUNCHED() launched(__FILE__, __LINE__)

/* ======================================================================================== */
/* the backend object, memory and the cap                                                    */
/* ======================================================================================== */

typedef struct { void *p; size_t n; } blk;

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
#define MOE_LANES 4
    int lanes_ready;
    cudaStream_t lane_s[MOE_LANES];
    cublasHandle_t lane_blas[MOE_LANES];
    void *lane_ws[MOE_LANES];
    cudaEvent_t lane_ev[MOE_LANES], ev_join;
} be_cuda;

static be_cuda *C(be *b) { return (be_cuda *)b; }
static be_cuda *g_launch_be; /* for LAUNCHED's optional sync; set per create (one per process ok) */

static void launched(const char *file, int line) {
    ck_cuda(cudaGetLastError(), "kernel launch", file, line);
    if (g_launch_be && g_launch_be->sync_each)
        ck_cuda(cudaStreamSynchronize(g_launch_be->s), "kernel run", file, line);
}

static size_t host_mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return (size_t)-1;
    char line[256];
    size_t kb = (size_t)-1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %zu kB", &kb) == 1) break;
    fclose(f);
    return kb == (size_t)-1 ? kb : kb * 1024;
}

static int fits(be_cuda *c, size_t bytes, char *err, size_t errlen) {
    if (c->used - c->free_bytes + bytes > c->cap)
        return duet_err(err, errlen, DUET_ENOMEM,
                        "device memory cap reached: %.1f MiB in use + %.1f MiB asked > cap %.1f "
                        "MiB (raise the memory fraction or load less)",
                        (c->used - c->free_bytes) / 1048576.0, bytes / 1048576.0, c->cap / 1048576.0);
    if (c->integrated) {
        size_t avail = host_mem_available();
        size_t reserve = (size_t)1 << 30; /* leave 1 GiB to the host */
        if (avail != (size_t)-1 && bytes + reserve > avail)
            return duet_err(err, errlen, DUET_ENOMEM,
                            "integrated GPU: %.1f MiB asked but the host has only %.1f MiB "
                            "available (MemAvailable, 1 GiB kept for the host)",
                            bytes / 1048576.0, avail / 1048576.0);
    }
    return 0;
}

extern "C" int be_cuda_fits(be *b, size_t bytes, char *err, size_t errlen) {
    return fits(C(b), bytes, err, errlen);
}
extern "C" size_t be_cuda_mem_used(const be *b) {
    const be_cuda *c = (const be_cuda *)b;
    return c->used - c->free_bytes;
}
extern "C" size_t be_cuda_mem_cap(const be *b) { return ((const be_cuda *)b)->cap; }

static void drop_free_blocks(be_cuda *c) {
    for (size_t i = 0; i < c->n_free; i++) {
        CK(cudaFree(c->freel[i].p));
        c->used -= c->freel[i].n;
    }
    c->n_free = 0;
    c->free_bytes = 0;
}

/* cudaMalloc under the cap; aborts with a sentence when it does not fit. */
static void *dmalloc(be_cuda *c, size_t bytes) {
    char err[300];
    if (bytes == 0) bytes = 16;
    if (c->used + bytes > c->cap) drop_free_blocks(c);
    {
        if (fits(c, bytes, err, sizeof err)) {
            fprintf(stderr, "duet cuda: %s\n", err);
            abort();
        }
    }
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        drop_free_blocks(c);
        CK(cudaMalloc(&p, bytes));
    }
    c->used += bytes;
    return p;
}
static void dfree(be_cuda *c, void *p, size_t bytes) {
    if (!p) return;
    CK(cudaFree(p));
    c->used -= bytes;
}

static size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

static void *alloc_impl(be *b, size_t bytes, int zero) {
    be_cuda *c = C(b);
    size_t n = round_up(bytes ? bytes : 1, 256);
    void *p = NULL;
    for (size_t i = 0; i < c->n_free; i++)
        if (c->freel[i].n == n) {
            p = c->freel[i].p;
            c->freel[i] = c->freel[--c->n_free];
            c->free_bytes -= n;
            break;
        }
    if (!p) p = dmalloc(c, n);
    if (c->n_live == c->cap_live) {
        c->cap_live = c->cap_live ? 2 * c->cap_live : 1024;
        c->live = (blk *)xrealloc(c->live, c->cap_live * sizeof *c->live);
    }
    c->live[c->n_live++] = (blk){p, n};
    if (zero) CK(cudaMemsetAsync(p, 0, n, c->s));
    return p;
}
static void *cu_alloc(be *b, size_t bytes) { return alloc_impl(b, bytes, 1); }
/* scratch of an op: not zeroed (every element is written before it is read) */
static void *scratch(be *b, size_t bytes) { return alloc_impl(b, bytes, 0); }

static void cu_free(be *b, void *p) {
    be_cuda *c = C(b);
    if (!p) return;
    for (size_t i = c->n_live; i-- > 0;)
        if (c->live[i].p == p) {
            blk k = c->live[i];
            c->live[i] = c->live[--c->n_live];
            if (c->n_free == c->cap_free) {
                c->cap_free = c->cap_free ? 2 * c->cap_free : 256;
                c->freel = (blk *)xrealloc(c->freel, c->cap_free * sizeof *c->freel);
            }
            c->freel[c->n_free++] = k;
            c->free_bytes += k.n;
            return;
        }
    /* interior pointers (e.g. sink + h0) are never freed by the model; anything else is a bug */
    fprintf(stderr, "duet cuda: free of a pointer this backend did not allocate (%p)\n", p);
    abort();
}

static void cu_upload(be *b, void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, C(b)->s));
    CK(cudaStreamSynchronize(C(b)->s));
}
static void cu_download(be *b, void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, C(b)->s));
    CK(cudaStreamSynchronize(C(b)->s));
}

/* Makes room for `bytes` of staging (several stage() calls together) so that no wrap happens
 * in between: arrays staged for kernels not launched yet are never overwritten by a later
 * stage() of the same op. An op that stages more than one array before launching calls this
 * first. Grows the ring when needed (after a sync: nothing of this op is staged yet). */
static void stage_reserve(be_cuda *c, size_t bytes) {
    size_t n = round_up(bytes ? bytes : 1, 256);
    if (n > c->meta_cap || !c->pin) {
        CK(cudaStreamSynchronize(c->s));
        if (c->pin) CK(cudaFreeHost(c->pin));
        if (c->dmeta) dfree(c, c->dmeta, c->meta_cap);
        c->meta_cap = round_up(n > ((size_t)16 << 20) ? n : ((size_t)16 << 20), (size_t)1 << 20) * 2;
        CK(cudaHostAlloc((void **)&c->pin, c->meta_cap, cudaHostAllocDefault));
        c->dmeta = (unsigned char *)dmalloc(c, c->meta_cap);
        c->meta_off = 0;
    }
    if (c->meta_off + n > c->meta_cap) {
        CK(cudaStreamSynchronize(c->s));
        c->meta_off = 0;
    }
}

/* Stages host metadata for the kernels of this op: returns its device address. Asynchronous
 * (pinned ring + copy on the stream); a wrap waits for the stream first, so nothing still in
 * flight is overwritten. */
static void *stage(be_cuda *c, const void *src, size_t bytes) {
    size_t n = round_up(bytes ? bytes : 1, 256);
    stage_reserve(c, n);
    memcpy(c->pin + c->meta_off, src, bytes);
    void *d = c->dmeta + c->meta_off;
    CK(cudaMemcpyAsync(d, c->pin + c->meta_off, bytes, cudaMemcpyHostToDevice, c->s));
    c->meta_off += n;
    return d;
}

__global__ void k_fill(float *x, float v, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = v;
}

static int grid_for(size_t n, int threads) {
    size_t g = (n + threads - 1) / threads;
    return (int)(g > 65535 * 8 ? 65535 * 8 : (g ? g : 1));
}

static void cu_fill(be *b, float *x, float v, size_t n) {
    if (!n) return;
    k_fill<<<grid_for(n, 256), 256, 0, C(b)->s>>>(x, v, n);
    LAUNCHED();
}
static void cu_copy(be *b, float *dst, const float *src, size_t n) {
    if (!n) return;
    CK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, C(b)->s));
}

/* ======================================================================================== */
/* weights                                                                                  */
/* ======================================================================================== */

enum { WK_F32, WK_BF16, WK_FP8, WK_FP4 };

/* Device view of a weight, passed by value to kernels. */
typedef struct {
    int kind;
    int rows, cols;            /* logical [N, K] */
    const void *data;          /* F32/BF16/FP8: [N, K]; FP4: [N, K/2] bytes */
    const uint8_t *scale;      /* FP8: [ceil(N/bn), scols]; FP4: [N, scols] */
    int scols, bn, bk;
} dw;

struct be_weight {
    dw v;
    size_t bytes;              /* device bytes of data + scale */
    size_t dbytes, sbytes;
    void *data;
    uint8_t *scale;
};

extern "C" size_t be_cuda_weight_bytes(const be_weight *w) { return w ? w->bytes : 0; }

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

static be_weight *wnew(be_cuda *c, int kind, int64_t rows, int64_t cols, size_t data_bytes,
                       size_t scale_bytes) {
    be_weight *w = (be_weight *)xcalloc(1, sizeof *w);
    w->v.kind = kind;
    w->v.rows = (int)rows;
    w->v.cols = (int)cols;
    w->data = dmalloc(c, data_bytes);
    if (scale_bytes) w->scale = (uint8_t *)dmalloc(c, scale_bytes);
    w->bytes = data_bytes + scale_bytes;
    w->dbytes = data_bytes;
    w->sbytes = scale_bytes;
    w->v.data = w->data;
    w->v.scale = w->scale;
    return w;
}

static void h2d(be_cuda *c, void *dst, const void *src, size_t n) {
    CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, c->s));
    CK(cudaStreamSynchronize(c->s));
}

static be_weight *cu_weight_slice(be *b, const ck_weight *w, int64_t r0, int64_t nr,
                                  int64_t c0, int64_t nc) {
    be_cuda *c = C(b);
    if (w->kind == CK_FP8_WEIGHT && r0 % w->block_n == 0 && c0 % w->block_k == 0) {
        int64_t bn = w->block_n, bk = w->block_k;
        int64_t sr0 = r0 / bn, snr = (r0 + nr + bn - 1) / bn - sr0;
        int64_t sc0 = c0 / bk, snc = (c0 + nc + bk - 1) / bk - sc0;
        uint8_t *hd = (uint8_t *)xmalloc((size_t)(nr * nc)), *hs = (uint8_t *)xmalloc((size_t)(snr * snc));
        const uint8_t *src = (const uint8_t *)w->data;
        for (int64_t r = 0; r < nr; r++) memcpy(hd + r * nc, src + (r0 + r) * w->cols + c0, (size_t)nc);
        for (int64_t r = 0; r < snr; r++)
            memcpy(hs + r * snc, w->scale + (sr0 + r) * w->scale_cols + sc0, (size_t)snc);
        be_weight *o = wnew(c, WK_FP8, nr, nc, (size_t)(nr * nc), (size_t)(snr * snc));
        o->v.scols = (int)snc;
        o->v.bn = (int)bn;
        o->v.bk = (int)bk;
        h2d(c, o->data, hd, (size_t)(nr * nc));
        h2d(c, o->scale, hs, (size_t)(snr * snc));
        free(hd);
        free(hs);
        return o;
    }
    if (w->kind == CK_FP4_WEIGHT && c0 % w->block_k == 0 && nc % 2 == 0 && w->cols % 2 == 0) {
        int64_t bk = w->block_k, snc = (nc + bk - 1) / bk, sc0 = c0 / bk;
        size_t db = (size_t)(nr * nc / 2), sb = (size_t)(nr * snc);
        uint8_t *hd = (uint8_t *)xmalloc(db), *hs = (uint8_t *)xmalloc(sb);
        const uint8_t *src = (const uint8_t *)w->data;
        for (int64_t r = 0; r < nr; r++) {
            memcpy(hd + r * (nc / 2), src + (r0 + r) * (w->cols / 2) + c0 / 2, (size_t)(nc / 2));
            memcpy(hs + r * snc, w->scale + (r0 + r) * w->scale_cols + sc0, (size_t)snc);
        }
        be_weight *o = wnew(c, WK_FP4, nr, nc, db, sb);
        o->v.scols = (int)snc;
        o->v.bn = 1;
        o->v.bk = (int)bk;
        h2d(c, o->data, hd, db);
        h2d(c, o->scale, hs, sb);
        free(hd);
        free(hs);
        return o;
    }
    if (w->kind == CK_PLAIN && (w->dtype == ST_F32 || w->dtype == ST_BF16)) {
        size_t es = w->dtype == ST_F32 ? 4 : 2;
        size_t db = (size_t)(nr * nc) * es;
        unsigned char *hd = (unsigned char *)xmalloc(db);
        const unsigned char *src = (const unsigned char *)w->data;
        for (int64_t r = 0; r < nr; r++)
            memcpy(hd + (size_t)(r * nc) * es, src + (size_t)((r0 + r) * w->cols + c0) * es, (size_t)nc * es);
        be_weight *o = wnew(c, w->dtype == ST_F32 ? WK_F32 : WK_BF16, nr, nc, db, 0);
        h2d(c, o->data, hd, db);
        free(hd);
        return o;
    }
    /* unaligned FP8/FP4 slices and other dtypes: exact BF16 (FP8/FP4) or F32 (other plain) */
    int to_bf16 = w->kind != CK_PLAIN;
    size_t es = to_bf16 ? 2 : 4, db = (size_t)(nr * nc) * es;
    unsigned char *hd = (unsigned char *)xmalloc(db);
    float *row = (float *)xmalloc((size_t)w->cols * sizeof *row);
    for (int64_t r = 0; r < nr; r++) {
        ck_row_f32(w, r0 + r, row);
        for (int64_t k = 0; k < nc; k++) {
            if (to_bf16) ((uint16_t *)hd)[r * nc + k] = fmt_f32_to_bf16(row[c0 + k]);
            else ((float *)hd)[r * nc + k] = row[c0 + k];
        }
    }
    free(row);
    be_weight *o = wnew(c, to_bf16 ? WK_BF16 : WK_F32, nr, nc, db, 0);
    h2d(c, o->data, hd, db);
    free(hd);
    return o;
}

static be_weight *cu_weight(be *b, const ck_weight *w) {
    return cu_weight_slice(b, w, 0, w->rows, 0, w->cols);
}

static void cu_weight_free(be *b, be_weight *w) {
    if (!w) return;
    be_cuda *c = C(b);
    CK(cudaStreamSynchronize(c->s));
    dfree(c, w->data, w->dbytes);
    dfree(c, w->scale, w->sbytes);
    free(w);
}

static float *cu_vector(be *b, const ck_weight *w) {
    size_t n = (size_t)(w->rows * w->cols);
    float *h = (float *)xmalloc(n * sizeof *h);
    for (int64_t r = 0; r < w->rows; r++) ck_row_f32(w, r, h + r * w->cols);
    float *d = (float *)cu_alloc(b, n * sizeof *d);
    h2d(C(b), d, h, n * sizeof *d);
    free(h);
    return d;
}

/* ======================================================================================== */
/* matmul: y[T, N] = x[T, K] · W[row0 : row0+N]ᵀ                                             */
/* ======================================================================================== */

/* --- small T: one warp per weight row, 16-byte weight loads, TT tokens at once ----------- */

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Weight rows are read in 16-byte chunks: raw() loads chunk `ch` of row n, dec() expands it
 * into EPC floats (without scale), scale() is the chunk's e8m0 scale (1 for BF16/F32). */
template <int KIND> struct wchunk;
template <> struct wchunk<WK_FP8> {
    enum { EPC = 16 };
    static __device__ __forceinline__ uint4 raw(const dw &w, int n, int ch) {
        return __ldg((const uint4 *)((const uint8_t *)w.data + (size_t)n * w.cols) + ch);
    }
    static __device__ __forceinline__ float scale(const dw &w, int n, int ch) {
        return fd_e8m0_to_f32(__ldg(w.scale + (n / w.bn) * w.scols + (ch * 16) / w.bk));
    }
    static __device__ __forceinline__ void dec(uint4 v, float *o) {
        uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u[i] & 0xFFFF), __NV_E4M3);
            __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u[i] >> 16), __NV_E4M3);
            float2 a = __half22float2(__half2(lo)), bb = __half22float2(__half2(hi));
            o[4 * i] = a.x; o[4 * i + 1] = a.y; o[4 * i + 2] = bb.x; o[4 * i + 3] = bb.y;
        }
    }
};
template <> struct wchunk<WK_FP4> {
    enum { EPC = 32 };
    static __device__ __forceinline__ uint4 raw(const dw &w, int n, int ch) {
        return __ldg((const uint4 *)((const uint8_t *)w.data + (size_t)n * (w.cols / 2)) + ch);
    }
    static __device__ __forceinline__ float scale(const dw &w, int n, int ch) {
        return fd_e8m0_to_f32(__ldg(w.scale + (size_t)n * w.scols + (ch * 32) / w.bk));
    }
    static __device__ __forceinline__ void dec(uint4 v, float *o) {
        uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 8; j++) o[8 * i + j] = fd_e2m1_to_f32((u[i] >> (4 * j)) & 15u);
    }
};
template <> struct wchunk<WK_BF16> {
    enum { EPC = 8 };
    static __device__ __forceinline__ uint4 raw(const dw &w, int n, int ch) {
        return __ldg((const uint4 *)((const uint16_t *)w.data + (size_t)n * w.cols) + ch);
    }
    static __device__ __forceinline__ float scale(const dw &, int, int) { return 1.0f; }
    static __device__ __forceinline__ void dec(uint4 v, float *o) {
        uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            o[2 * i] = __uint_as_float(u[i] << 16);
            o[2 * i + 1] = __uint_as_float(u[i] & 0xFFFF0000u);
        }
    }
};
template <> struct wchunk<WK_F32> {
    enum { EPC = 4 };
    static __device__ __forceinline__ uint4 raw(const dw &w, int n, int ch) {
        return __ldg((const uint4 *)((const float *)w.data + (size_t)n * w.cols) + ch);
    }
    static __device__ __forceinline__ float scale(const dw &, int, int) { return 1.0f; }
    static __device__ __forceinline__ void dec(uint4 v, float *o) {
        o[0] = __uint_as_float(v.x); o[1] = __uint_as_float(v.y);
        o[2] = __uint_as_float(v.z); o[3] = __uint_as_float(v.w);
    }
};

/* acc[t] += (one chunk of row wn) · x[t] for t < T */
template <int KIND, int TT>
__device__ __forceinline__ void gemv_chunk(uint4 rv, float s, int ch, const float *const *xr, int T,
                                           float *acc) {
    typedef wchunk<KIND> WC;
    float wv[WC::EPC];
    WC::dec(rv, wv);
#pragma unroll
    for (int t = 0; t < TT; t++) {
        if (t < T) {
            const float4 *xp = (const float4 *)(xr[t] + ch * WC::EPC);
            float part = 0.f;
#pragma unroll
            for (int i = 0; i < WC::EPC / 4; i++) {
                float4 xv = __ldg(xp + i);
                part += wv[4 * i] * xv.x + wv[4 * i + 1] * xv.y + wv[4 * i + 2] * xv.z +
                        wv[4 * i + 3] * xv.w;
            }
            acc[t] += part * s;
        }
    }
}

/* One warp: the dot products of weight row wn with up to TT input rows xr[t]; the lane sums
 * are reduced over the warp (every lane gets them). Four chunks are loaded before use so that
 * 2 KB per warp are in flight. */
template <int KIND, int TT>
__device__ __forceinline__ void gemv_row(const dw &w, int wn, const float *const *xr, int T, int lane,
                                         float *acc) {
    typedef wchunk<KIND> WC;
    int nch = w.cols / WC::EPC, ch = lane;
#pragma unroll
    for (int t = 0; t < TT; t++) acc[t] = 0.f;
    for (; ch + 96 < nch; ch += 128) {
        uint4 r0 = WC::raw(w, wn, ch), r1 = WC::raw(w, wn, ch + 32), r2 = WC::raw(w, wn, ch + 64),
              r3 = WC::raw(w, wn, ch + 96);
        float s0 = WC::scale(w, wn, ch), s1 = WC::scale(w, wn, ch + 32),
              s2 = WC::scale(w, wn, ch + 64), s3 = WC::scale(w, wn, ch + 96);
        gemv_chunk<KIND, TT>(r0, s0, ch, xr, T, acc);
        gemv_chunk<KIND, TT>(r1, s1, ch + 32, xr, T, acc);
        gemv_chunk<KIND, TT>(r2, s2, ch + 64, xr, T, acc);
        gemv_chunk<KIND, TT>(r3, s3, ch + 96, xr, T, acc);
    }
    for (; ch < nch; ch += 32) gemv_chunk<KIND, TT>(WC::raw(w, wn, ch), WC::scale(w, wn, ch), ch, xr, T, acc);
#pragma unroll
    for (int t = 0; t < TT; t++) acc[t] = warp_sum(acc[t]);
}

template <int KIND, int TT>
__global__ void __launch_bounds__(256) k_gemv(dw w, int row0, int N, const float *__restrict__ x,
                                              int ldx, float *__restrict__ y, int ldy, int T) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int n = blockIdx.x * 8 + warp;
    if (n >= N) return;
    const float *xr[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) xr[t] = x + (size_t)(t < T ? t : 0) * ldx;
    float acc[TT];
    gemv_row<KIND, TT>(w, row0 + n, xr, T, lane, acc);
#pragma unroll
    for (int t = 0; t < TT; t++)
        if (t < T && lane == 0) y[(size_t)t * ldy + n] = acc[t];
}

/* --- any T: 64x64 tiles, weights decoded into shared memory, 4x4 outputs per thread ------ */
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

__global__ void __launch_bounds__(256) k_gemm(dw w, int row0, int N, const float *__restrict__ x,
                                              int ldx, float *__restrict__ y, int ldy, int T) {
    gemm_tile(w, row0, N, x, ldx, NULL, y, ldy, T, blockIdx.y * TM, blockIdx.x * TN);
}

/* grouped over experts: tile blockIdx.y = {expert e, first pair p0, pairs n <= 64};
 * y[p0 + r] = W_e · x[xrows ? xrows[p0 + r] : p0 + r] */
typedef struct { int e, p0, n; } gtile;
__global__ void __launch_bounds__(256) k_gemm_grouped(const dw *ws, const gtile *tiles, int N,
                                                      const float *__restrict__ x, int ldx,
                                                      const int32_t *xrows, float *__restrict__ y,
                                                      int ldy) {
    gtile tl = tiles[blockIdx.y];
    gemm_tile(ws[tl.e], 0, N, xrows ? x : x + (size_t)tl.p0 * ldx, ldx, xrows ? xrows + tl.p0 : NULL,
              y + (size_t)tl.p0 * ldy, ldy, tl.n, 0, blockIdx.x * TN);
}

template <int KIND>
static void gemv_launch(be_cuda *c, const dw &w, int row0, int N, const float *x, int ldx,
                        float *y, int ldy, int T) {
    dim3 g((N + 7) / 8);
    for (int t = 0; t < T; t += 8) {
        int tt = T - t < 8 ? T - t : 8;
        const float *xt = x + (size_t)t * ldx;
        float *yt = y + (size_t)t * ldy;
        if (tt == 1) k_gemv<KIND, 1><<<g, 256, 0, c->s>>>(w, row0, N, xt, ldx, yt, ldy, tt);
        else if (tt <= 2) k_gemv<KIND, 2><<<g, 256, 0, c->s>>>(w, row0, N, xt, ldx, yt, ldy, tt);
        else if (tt <= 4) k_gemv<KIND, 4><<<g, 256, 0, c->s>>>(w, row0, N, xt, ldx, yt, ldy, tt);
        else k_gemv<KIND, 8><<<g, 256, 0, c->s>>>(w, row0, N, xt, ldx, yt, ldy, tt);
        LAUNCHED();
    }
}

static int gemv_ok(const dw &w, const float *x, int ldx) {
    int epc = w.kind == WK_FP8 ? 16 : w.kind == WK_FP4 ? 32 : w.kind == WK_BF16 ? 8 : 4;
    if (w.cols % epc || ((uintptr_t)x & 15) || ldx % 4) return 0;
    if (w.kind == WK_FP8 && w.bk % 16) return 0;
    if (w.kind == WK_FP4 && w.bk % 32) return 0;
    return 1;
}

/* --- many rows (T >= TC_MIN_T): bf16 tensor cores through cuBLAS, fp32-level accuracy -------
 * Weights decoded to bf16 are exact (e4m3 x 2^k, e2m1 x 2^k and bf16 are bf16 values), so only
 * the activations need care: x = hi + lo with hi = bf16(x), lo = bf16(x - hi) (|x - hi - lo| <=
 * 2^-16 |x|), and y = W·hi + W·lo with fp32 accumulation (CUBLAS_COMPUTE_32F: bf16 products,
 * fp32 sums; no TF32). The bf16 copy of the weight rows is a transient per-call scratch from the
 * capped allocator (never a permanent expanded copy); BF16 weights are used in place. F32
 * weights (not exact in bf16) and shapes the 8-wide decode cannot take stay on the SIMT path. */
enum { TC_MIN_T = 32 };
/* a routed expert goes to the tensor cores from this many rows: its bf16 decode (~48 MB written
 * and read back for V4-Flash's 2048 x 4096 FP4 matrices, ~25 us) costs less than the SIMT
 * tile's fp32 FLOPs from about here on; below it the GEMV chunks read the FP4 bytes directly */
enum { MOE_TC_MIN = 16 };

#define CKB(x) ck_blas((x), #x, __FILE__, __LINE__)
static void ck_blas(cublasStatus_t e, const char *what, const char *file, int line) {
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
static void gemm_bf16(cublasHandle_t h, int m, int n, int k, const void *A, int lda, const void *Bm,
                      int ldb, float *Cm, int ldc, float beta) {
    float alpha = 1.0f;
    CKB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, A, CUDA_R_16BF, lda,
                     Bm, CUDA_R_16BF, ldb, &beta, Cm, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT));
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

/* Up to 3 decode jobs per launch (blockIdx.y): out[q][n, k] = bf16(W_q[row0_q + n, k]), ld K. */
typedef struct { dw w[3]; int row0[3], N[3]; uint16_t *out[3]; } wdec_jobs;

template <int KIND>
__global__ void __launch_bounds__(256) k_wdec(wdec_jobs j) {
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

static void wdec_launch(be_cuda *c, cudaStream_t st, const wdec_jobs &j, int njobs) {
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

static void split_launch(cudaStream_t st, const float *x, int ldx, const int32_t *rows, int T, int K,
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
static int pow2_rows(int n, int most) {
    int r = 1;
    while (r < n && r < most) r *= 2;
    return r < most ? r : most;
}

/* scratch sizes rounded up to 2 MiB so that the caching allocator reuses blocks across calls */
static void *tc_scratch(be_cuda *c, size_t bytes) {
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

static void mm(be_cuda *c, const be_weight *W, int row0, int N, const float *x, int ldx, float *y,
               int ldy, int T) {
    if (T <= 0 || N <= 0) return;
    const dw &w = W->v;
    if (T <= 16 && gemv_ok(w, x, ldx)) {
        switch (w.kind) {
        case WK_FP8: gemv_launch<WK_FP8>(c, w, row0, N, x, ldx, y, ldy, T); break;
        case WK_FP4: gemv_launch<WK_FP4>(c, w, row0, N, x, ldx, y, ldy, T); break;
        case WK_BF16: gemv_launch<WK_BF16>(c, w, row0, N, x, ldx, y, ldy, T); break;
        default: gemv_launch<WK_F32>(c, w, row0, N, x, ldx, y, ldy, T); break;
        }
        return;
    }
    if (T >= TC_MIN_T && tc_ok(w)) {
        mm_tc(c, w, row0, N, x, ldx, y, ldy, T);
        return;
    }
    dim3 g((N + TN - 1) / TN, (T + TM - 1) / TM);
    k_gemm<<<g, 256, 0, c->s>>>(w, row0, N, x, ldx, y, ldy, T);
    LAUNCHED();
}

static void cu_matmul(be *b, const be_weight *W, int row0, int N, const float *x, int ldx,
                      float *y, int ldy, int T) {
    mm(C(b), W, row0, N, x, ldx, y, ldy, T);
}

/* ======================================================================================== */
/* embedding, norms, RoPE                                                                   */
/* ======================================================================================== */

__global__ void k_embed(dw w, const int32_t *ids, int n_hc, float *h) {
    int t = blockIdx.x, D = w.cols;
    int id = ids[t];
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float v = wget(w, id, i);
        for (int j = 0; j < n_hc; j++) h[((size_t)t * n_hc + j) * D + i] = v;
    }
}

static void cu_embed(be *b, const be_weight *table, const int32_t *ids, int T, int n_hc, float *h) {
    if (T <= 0) return;
    const int32_t *d = (const int32_t *)stage(C(b), ids, (size_t)T * sizeof *ids);
    k_embed<<<T, 256, 0, C(b)->s>>>(table->v, d, n_hc, h);
    LAUNCHED();
}

/* block-wide sum (all threads get the result); blockDim.x a multiple of 32, <= 1024 */
__device__ float block_sum(float v, float *sh) {
    v = warp_sum(v);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float s = 0;
    for (int i = 0; i < nw; i++) s += sh[i];
    return s;
}

__device__ __forceinline__ float inv_rms_dev(double ss, int n, float eps) {
    return (float)(1.0 / sqrt(ss / n + eps));
}

/* one block per row; w may be NULL (head_rms); y may equal x */
__global__ void k_rmsnorm(const float *x, const float *w, float *y, int n, float eps) {
    __shared__ float sh[32];
    const float *xr = x + (size_t)blockIdx.x * n;
    float *yr = y + (size_t)blockIdx.x * n;
    float ss = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, sh);
    float r = inv_rms_dev(ss, n, eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = w ? w[i] * (xr[i] * r) : xr[i] * r;
}

static void cu_rmsnorm(be *b, const float *x, const float *w, float *y, int T, int n, float eps) {
    if (T <= 0) return;
    k_rmsnorm<<<T, 256, 0, C(b)->s>>>(x, w, y, n, eps);
    LAUNCHED();
}
static void cu_head_rms(be *b, float *x, int rows, int dim, float eps) {
    if (rows <= 0) return;
    k_rmsnorm<<<rows, dim >= 256 ? 256 : 128, 0, C(b)->s>>>(x, NULL, x, dim, eps);
    LAUNCHED();
}

__device__ __forceinline__ void rope_pair(float *r, int i, int pos, const float *omega, int inverse) {
    float ang = (float)pos * omega[i];
    float cs = cosf(ang), sn = sinf(ang);
    if (inverse) sn = -sn;
    float a = r[2 * i], bb = r[2 * i + 1];
    r[2 * i] = a * cs - bb * sn;
    r[2 * i + 1] = a * sn + bb * cs;
}

/* grid (T*n_heads), threads over pairs */
__global__ void k_rope(float *x, int n_heads, int head_dim, int rope_dims, const int32_t *pos,
                       const float *omega, int inverse) {
    int row = blockIdx.x, t = row / n_heads;
    float *r = x + (size_t)row * head_dim + head_dim - rope_dims;
    for (int i = threadIdx.x; i < rope_dims / 2; i += blockDim.x) rope_pair(r, i, pos[t], omega, inverse);
}

static void cu_rope(be *b, float *x, int T, int n_heads, int head_dim, int rope_dims,
                    const int32_t *pos, const float *omega, int inverse) {
    if (T <= 0 || n_heads <= 0) return;
    be_cuda *c = C(b);
    stage_reserve(c, (size_t)T * sizeof *pos + (size_t)rope_dims * sizeof *omega + 512);
    const int32_t *dp = (const int32_t *)stage(c, pos, (size_t)T * sizeof *pos);
    const float *dom = (const float *)stage(c, omega, (size_t)(rope_dims / 2) * sizeof *omega);
    k_rope<<<T * n_heads, 32, 0, c->s>>>(x, n_heads, head_dim, rope_dims, dp, dom, inverse);
    LAUNCHED();
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

/* Stage 1 of mHC pre / HC head: grid (n_mix, T, S): block (k, t, s) writes the partial dot of
 * fn[k] with token t's streams over width slice s, and (k == 0) the partial sum of squares.
 * Splitting the width over S blocks keeps a decode step (T = 1) from running on one SM. */
__global__ void __launch_bounds__(256) k_mhc_mix(const float *h, const float *fn, int n_mix, int width,
                                                 int slice, float *part, float *sspart) {
    __shared__ float sh[32];
    int k = blockIdx.x, t = blockIdx.y, sidx = blockIdx.z, S = gridDim.z;
    const float *X = h + (size_t)t * width, *f = fn + (size_t)k * width;
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

/* Stage 2: block per token; mode 0: mhc_pre (writes u, post, comb), 1: hc_head (u only) */
__global__ void __launch_bounds__(256) k_mhc_fin(const float *h, const float *part, const float *sspart,
                                                 int S, const float *base, const float *scale, int n,
                                                 int D, int iters, float hc_eps, float norm_eps,
                                                 float *u, float *post, float *comb, int head_mode) {
    __shared__ float mu[16 * 16];
    __shared__ float pre[16];
    __shared__ float Cm[16 * 16];
    int t = blockIdx.x;
    int n_mix = head_mode ? n : (2 + n) * n;
    const float *X = h + (size_t)t * n * D;
    __shared__ float rr;
    if (threadIdx.x == blockDim.x - 1) {
        double ss = 0;
        for (int s2 = 0; s2 < S; s2++) ss += sspart[(size_t)t * S + s2];
        rr = inv_rms_dev(ss, n * D, norm_eps);
    }
    for (int k = threadIdx.x; k < n_mix; k += blockDim.x) { /* partial sums in a fixed order */
        float d = 0;
        for (int s2 = 0; s2 < S; s2++) d += part[((size_t)t * n_mix + k) * S + s2];
        mu[k] = d;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 0; k < n_mix; k++) mu[k] *= rr;
        for (int j = 0; j < n; j++) pre[j] = sigmoid_dev(mu[j] * scale[0] + base[j]) + hc_eps;
        if (!head_mode) {
            for (int j = 0; j < n; j++)
                post[t * n + j] = 2.0f * sigmoid_dev(mu[n + j] * scale[1] + base[n + j]);
            for (int j = 0; j < n * n; j++) Cm[j] = mu[2 * n + j] * scale[2] + base[2 * n + j];
            sinkhorn_dev(Cm, n, iters, hc_eps);
            for (int j = 0; j < n * n; j++) comb[(size_t)t * n * n + j] = Cm[j];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float s = 0;
        for (int j = 0; j < n; j++) s += pre[j] * X[(size_t)j * D + i];
        u[(size_t)t * D + i] = s;
    }
}

static void mhc_run(be *b, const float *h, const float *fn, const float *base, const float *scale,
                    int T, int n, int D, int iters, float hc_eps, float norm_eps, float *u,
                    float *post, float *comb, int head_mode) {
    be_cuda *c = C(b);
    int n_mix = head_mode ? n : (2 + n) * n, width = n * D;
    if (n > 8 || width % 4) {
        fprintf(stderr, "duet cuda: mHC with n_hc %d and width %d unsupported\n", n, width);
        abort();
    }
    int S = (int)(528 / ((long)T * n_mix));
    S = S < 1 ? 1 : S > 32 ? 32 : S;
    int slice = (width + S - 1) / S;
    slice = (slice + 3) / 4 * 4;
    S = (width + slice - 1) / slice;
    float *part = (float *)scratch(b, (size_t)T * n_mix * S * sizeof(float));
    float *sspart = (float *)scratch(b, (size_t)T * S * sizeof(float));
    k_mhc_mix<<<dim3(n_mix, T, S), 256, 0, c->s>>>(h, fn, n_mix, width, slice, part, sspart);
    LAUNCHED();
    k_mhc_fin<<<T, 256, 0, c->s>>>(h, part, sspart, S, base, scale, n, D, iters, hc_eps, norm_eps, u,
                                   post, comb, head_mode);
    LAUNCHED();
    cu_free(b, part);
    cu_free(b, sspart);
}

static void cu_mhc_pre(be *b, const float *h, const float *fn, const float *base,
                       const float *scale, int T, int n_hc, int D, int iters, float hc_eps,
                       float norm_eps, float *u, float *post, float *comb) {
    if (T <= 0) return;
    mhc_run(b, h, fn, base, scale, T, n_hc, D, iters, hc_eps, norm_eps, u, post, comb, 0);
}

static void cu_hc_head(be *b, const float *h, const float *fn, const float *base,
                       const float *scale, int T, int n_hc, int D, float hc_eps, float norm_eps,
                       float *y) {
    if (T <= 0) return;
    mhc_run(b, h, fn, base, scale, T, n_hc, D, 0, hc_eps, norm_eps, y, NULL, NULL, 1);
}

/* thread per (t, i): X[k][i] = post[k] v[i] + sum_j C[j][k] X[j][i] */
__global__ void k_mhc_post(float *h, const float *v, const float *post, const float *comb, int T,
                           int n, int D) {
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

static void cu_mhc_post(be *b, float *h, const float *v, const float *post, const float *comb,
                        int T, int n_hc, int D) {
    if (T <= 0) return;
    size_t n = (size_t)T * D;
    k_mhc_post<<<(unsigned)((n + 255) / 256), 256, 0, C(b)->s>>>(h, v, post, comb, T, n_hc, D);
    LAUNCHED();
}

/* ======================================================================================== */
/* attention with sinks over a key plan (spec §2.4.5)                                        */
/* ======================================================================================== */

enum { ATT_WARPS = 16, ATT_MAXD = 512 };

/* one block per (t, h); warps take keys round-robin with an online softmax each, merged with
 * the sink at the end. Lane owns dims lane + 32*j. */
__global__ void __launch_bounds__(ATT_WARPS * 32) k_attn(be_attn_args a, const be_keyplan *plan) {
    __shared__ float wm[ATT_WARPS], wl[ATT_WARPS];
    __shared__ float wacc[ATT_WARPS][ATT_MAXD];
    int t = blockIdx.x / a.n_heads, h = blockIdx.x % a.n_heads, d = a.head_dim;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nd = d / 32;
    const be_keyplan p = plan[t];
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

static void cu_attention(be *b, const be_attn_args *a) {
    if (a->T <= 0) return;
    be_cuda *c = C(b);
    if (a->head_dim % 32 || a->head_dim > ATT_MAXD) {
        fprintf(stderr, "duet cuda: attention head_dim %d is not a multiple of 32 up to %d\n",
                a->head_dim, ATT_MAXD);
        abort();
    }
    const be_keyplan *dp = (const be_keyplan *)stage(c, a->plan, (size_t)a->T * sizeof *a->plan);
    be_attn_args da = *a;
    da.plan = NULL;
    k_attn<<<a->T * a->n_heads, ATT_WARPS * 32, 0, c->s>>>(da, dp);
    LAUNCHED();
}

__global__ void k_ring_write(float *ring, int ring_size, int dim, const float *kv,
                             const int32_t *pos) {
    int t = blockIdx.x;
    float *dst = ring + (size_t)(pos[t] % ring_size) * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = kv[(size_t)t * dim + i];
}

static void cu_ring_write(be *b, float *ring, int ring_size, int dim, const float *kv,
                          const int32_t *pos, int T) {
    if (T <= 0) return;
    be_cuda *c = C(b);
    /* several tokens may map to one slot (T > ring_size): only the last one may write */
    int first = T > ring_size ? T - ring_size : 0;
    const int32_t *dp = (const int32_t *)stage(c, pos + first, (size_t)(T - first) * sizeof *pos);
    k_ring_write<<<T - first, 128, 0, c->s>>>(ring, ring_size, dim, kv + (size_t)first * dim, dp);
    LAUNCHED();
}

/* ======================================================================================== */
/* compressor (spec §2.4.3)                                                                  */
/* ======================================================================================== */

/* Value of the A (gate: G) input of window row r, half `off` (0 or d), channel ch, for a row at
 * absolute position p: from this call's inputs if p >= pos0, else from the state at call start
 * (cur_*: rows of the current window; prev_*: the last closed window's A-halves). */
typedef struct {
    int T, m, c, d, rope_dims, pos0;
    const float *a, *g, *ape, *norm;
    float eps;
    const float *omega;
    float *cur_a, *cur_g, *prev_a, *prev_g, *entries;
    int fp8_nope_qat, hadamard_fp4_qat;
} cmp_dev;

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

/* block per closing window; shared z[d] */
__global__ void __launch_bounds__(256) k_cmp_windows(cmp_dev a, int w_first) {
    extern __shared__ float z[];
    __shared__ float sh[32];
    int w = w_first + blockIdx.x, m = a.m, d = a.d;
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
    for (int i = threadIdx.x; i < d; i += blockDim.x) a.entries[(size_t)w * d + i] = z[i];
}

/* prev <- A-halves of window wl (closed in this call), from inputs or the state at call start */
__global__ void k_cmp_prev(cmp_dev a, int wl) {
    int m = a.m, d = a.d, cd = a.c * d;
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
__global__ void k_cmp_cur(cmp_dev a) {
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

static void cu_compress(be *b, const be_compress_args *a) {
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
    cmp_dev d = {T, m, a->c, a->d, a->rope_dims, pos0, a->a, a->g, a->ape, a->norm, a->eps,
                 (const float *)stage(c, a->omega, (size_t)(a->rope_dims / 2) * sizeof(float)),
                 a->cur_a, a->cur_g, a->prev_a, a->prev_g, a->entries, a->fp8_nope_qat,
                 a->hadamard_fp4_qat};
    /* windows closing at tokens of this call: positions w*m + m-1 in [pos0, pos0+T) */
    int w_first = pos0 / m;                    /* smallest w with w*m + m - 1 >= pos0 */
    int w_end = (pos0 + T) / m;                /* windows w < w_end close by pos0 + T - 1 */
    int nw = w_end - w_first;
    if (nw > 0) {
        k_cmp_windows<<<nw, 256, (size_t)a->d * sizeof(float), c->s>>>(d, w_first);
        LAUNCHED();
        if (a->c == 2) {
            k_cmp_prev<<<grid_for((size_t)m * a->d, 256), 256, 0, c->s>>>(d, w_end - 1);
            LAUNCHED();
        }
    }
    k_cmp_cur<<<grid_for((size_t)m * a->c * a->d, 256), 256, 0, c->s>>>(d);
    LAUNCHED();
}

/* ======================================================================================== */
/* indexer scores and top-k (spec §2.4.4)                                                    */
/* ======================================================================================== */

/* grid (ceil(nv_max/8), T); q row staged in shared memory; warp per entry */
__global__ void __launch_bounds__(256) k_index_scores(be_index_args a, const int *nvis,
                                                      float *scores, int ld) {
    extern __shared__ float qs[];
    int t = blockIdx.y, nv = nvis[t], hd = a.head_dim, H = a.n_heads;
    const float *q = a.q + (size_t)t * H * hd;
    for (int i = threadIdx.x; i < H * hd; i += blockDim.x) qs[i] = q[i];
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int e = blockIdx.x * 8 + warp;
    if (e >= nv) return;
    const float *key = a.keys + (size_t)e * hd;
    const float *w = a.w + (size_t)t * H;
    float kv[16];
    int nk = (hd + 31) / 32;
    for (int j = 0; j < 16; j++) kv[j] = (j < nk && lane + 32 * j < hd) ? key[lane + 32 * j] : 0.f;
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

/* block per row: radix-select the k-th largest key, then write all larger entries and the
 * lowest-indexed equal ones (the set the CPU heap keeps, up to ties) */
__global__ void __launch_bounds__(256) k_topk(const float *scores, int ld, const int *nvis, int topk,
                                              int32_t *idx) {
    __shared__ unsigned hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ int s_need, s_cnt;
    int t = blockIdx.x, nv = nvis[t];
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
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            uint32_t key = ord_key(sc[i]);
            if ((key & mask) == (pre & mask)) atomicAdd(&hist[(key >> shift) & 255], 1u);
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
    for (int i = threadIdx.x; i < nv; i += blockDim.x)
        if (ord_key(sc[i]) > thr) out[atomicAdd(&s_cnt, 1)] = i;
    __syncthreads();
    int n_eq = 0;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) n_eq += ord_key(sc[i]) == thr;
    n_eq = __syncthreads_count(n_eq > 0) ? (int)block_sum((float)n_eq, (float *)hist) : 0;
    int base = s_cnt;
    __syncthreads(); /* everyone has read s_cnt before it moves again */
    if (n_eq <= k - base) { /* every equal entry is taken: order does not matter */
        for (int i = threadIdx.x; i < nv; i += blockDim.x)
            if (ord_key(sc[i]) == thr) out[atomicAdd(&s_cnt, 1)] = i;
        return;
    }
    if (threadIdx.x == 0) { /* ties beyond k: the lowest indices, in order */
        int n = s_cnt;
        for (int i = 0; i < nv && n < k; i++)
            if (ord_key(sc[i]) == thr) out[n++] = i;
    }
}

static void cu_index_topk(be *b, const be_index_args *a) {
    if (a->T <= 0) return;
    be_cuda *c = C(b);
    int nvmax = 0;
    for (int t = 0; t < a->T; t++) nvmax = a->n_visible[t] > nvmax ? a->n_visible[t] : nvmax;
    if (nvmax == 0) return;
    if (a->head_dim > 512 || (size_t)a->n_heads * a->head_dim * 4 > 200 * 1024) {
        fprintf(stderr, "duet cuda: indexer shape %d x %d unsupported\n", a->n_heads, a->head_dim);
        abort();
    }
    const int *dn = (const int *)stage(c, a->n_visible, (size_t)a->T * sizeof(int));
    float *scores = (float *)cu_alloc(b, (size_t)a->T * nvmax * sizeof(float));
    size_t smem = (size_t)a->n_heads * a->head_dim * sizeof(float);
    if (smem > 48 * 1024)
        CK(cudaFuncSetAttribute(k_index_scores, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 g((nvmax + 7) / 8, a->T);
    k_index_scores<<<g, 256, smem, c->s>>>(*a, dn, scores, nvmax);
    LAUNCHED();
    k_topk<<<a->T, 256, 0, c->s>>>(scores, nvmax, dn, a->topk, a->idx);
    LAUNCHED();
    cu_free(b, scores);
}

/* ======================================================================================== */
/* MoE (spec §2.5)                                                                          */
/* ======================================================================================== */

__device__ __forceinline__ float softplus_dev(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* block per token (256 threads): scores sqrt(softplus(logit)), selection (bias top-K, ties to
 * the lowest expert id like the CPU, or hash ids), weights. E <= 1024, K <= 16. */
__global__ void __launch_bounds__(256) k_route(const float *logits, int E, int K, const float *bias,
                                               const int32_t *hash_sel, int norm_topk,
                                               float route_scale, int32_t *sel, float *wsel) {
    __shared__ float sc[1024];
    __shared__ int st[16];
    __shared__ float wv[32];
    __shared__ int we[32];
    int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float *lt = logits + (size_t)t * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) sc[e] = sqrtf(softplus_dev(lt[e]));
    __syncthreads();
    if (hash_sel) {
        if (threadIdx.x < K) st[threadIdx.x] = hash_sel[(size_t)t * K + threadIdx.x];
    } else {
        for (int k = 0; k < K; k++) {
            float bv = -INFINITY;
            int be = -1;
            for (int e = threadIdx.x; e < E; e += blockDim.x) {
                int used = 0;
                for (int q = 0; q < k; q++) used |= st[q] == e;
                float v = sc[e] + (bias ? bias[e] : 0.0f);
                if (!used && (be < 0 || v > bv)) { bv = v; be = e; }
            }
            for (int o = 16; o > 0; o >>= 1) {
                float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                int oe = __shfl_xor_sync(0xffffffffu, be, o);
                if (oe >= 0 && (be < 0 || ov > bv || (ov == bv && oe < be))) { bv = ov; be = oe; }
            }
            if (lane == 0) { wv[warp] = bv; we[warp] = be; }
            __syncthreads();
            if (threadIdx.x == 0) {
                float b2 = -INFINITY;
                int e2 = -1;
                for (int w = 0; w < nw; w++)
                    if (we[w] >= 0 && (e2 < 0 || wv[w] > b2 || (wv[w] == b2 && we[w] < e2))) {
                        b2 = wv[w];
                        e2 = we[w];
                    }
                st[k] = e2;
            }
            __syncthreads();
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0;
        for (int k = 0; k < K; k++) sum += sc[st[k]];
        for (int k = 0; k < K; k++) {
            sel[(size_t)t * K + k] = st[k];
            wsel[(size_t)t * K + k] = (norm_topk ? sc[st[k]] / (sum + 1e-20f) : sc[st[k]]) * route_scale;
        }
    }
}

__global__ void k_gather(const float *x, const int32_t *rows, int n, int D, float *xs) {
    size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * D) return;
    int r = (int)(idx / D), i = (int)(idx % D);
    xs[idx] = x[(size_t)rows[r] * D + i];
}

__global__ void k_swiglu(float *g, const float *p, int n, int I, float limit, const float *wts) {
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
    k_swiglu<<<(unsigned)((nI + 255) / 256), 256, 0, c->s>>>(g, p, n, I, limit, wts);
    LAUNCHED();
    mm(c, w2, 0, D, g, I, ys, D, n);
}

/* ---- grouped routed experts: pairs (token, expert) sorted by expert, in chunks of <= 8 ------ */
typedef struct { int e, p0, n; } mchunk;   /* expert, first sorted pair, pairs (<= 8) */

__device__ __forceinline__ float swiglu_dev(float gv, float pv, float limit, float wgt) {
    if (limit > 0) {
        if (gv > limit) gv = limit;
        if (pv > limit) pv = limit;
        if (pv < -limit) pv = -limit;
    }
    return gv / (1.0f + expf(-gv)) * pv * wgt;
}

/* hbuf[pair, n] = swiglu(w1[e][n] · x[tok], w3[e][n] · x[tok]) * weight; grid (I/8, chunks) */
template <int KIND>
__global__ void __launch_bounds__(256) k_moe_up(const dw *w1s, const dw *w3s, const mchunk *chunks,
                                                const int32_t *pair_tok, const float *pair_w,
                                                const float *x, int ldx, int I, float limit,
                                                float *hbuf) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n = blockIdx.x * 8 + warp;
    if (n >= I) return;
    mchunk ck = chunks[blockIdx.y];
    const float *xr[8];
#pragma unroll
    for (int t = 0; t < 8; t++) xr[t] = x + (size_t)pair_tok[ck.p0 + (t < ck.n ? t : 0)] * ldx;
    float g[8], p[8];
    gemv_row<KIND, 8>(w1s[ck.e], n, xr, ck.n, lane, g);
    gemv_row<KIND, 8>(w3s[ck.e], n, xr, ck.n, lane, p);
    if (lane == 0)
#pragma unroll
        for (int t = 0; t < 8; t++)
            if (t < ck.n) hbuf[(size_t)(ck.p0 + t) * I + n] = swiglu_dev(g[t], p[t], limit, pair_w[ck.p0 + t]);
}

/* ys[pair, n] = w2[e][n] · hbuf[pair]; grid (D/8, chunks) */
template <int KIND>
__global__ void __launch_bounds__(256) k_moe_down(const dw *w2s, const mchunk *chunks, const float *hbuf,
                                                  int I, int D, float *ys) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n = blockIdx.x * 8 + warp;
    if (n >= D) return;
    mchunk ck = chunks[blockIdx.y];
    const float *xr[8];
#pragma unroll
    for (int t = 0; t < 8; t++) xr[t] = hbuf + (size_t)(ck.p0 + (t < ck.n ? t : 0)) * I;
    float acc[8];
    gemv_row<KIND, 8>(w2s[ck.e], n, xr, ck.n, lane, acc);
    if (lane == 0)
#pragma unroll
        for (int t = 0; t < 8; t++)
            if (t < ck.n) ys[(size_t)(ck.p0 + t) * D + n] = acc[t];
}

/* out[t] = shared[t] + sum_k ys[inv[t, k]] (inv -1: the pair's expert is another rank's) */
__global__ void k_moe_combine(float *out, const float *ys, const int32_t *inv, int T, int K, int D,
                              const float *shared) {
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

/* The kind shared by every present routed expert and usable by the chunked GEMV, or -1. */
static int experts_kind(const be_moe_layer *L) {
    int kind = -1;
    for (int e = 0; e < L->n_experts; e++) {
        if (!L->w1[e]) continue;
        const be_weight *ws[3] = {L->w1[e], L->w2[e], L->w3[e]};
        for (int j = 0; j < 3; j++) {
            const dw &w = ws[j]->v;
            if (kind < 0) kind = w.kind;
            int epc = w.kind == WK_FP8 ? 16 : w.kind == WK_FP4 ? 32 : w.kind == WK_BF16 ? 8 : 4;
            if (w.kind != kind || w.cols % epc || (w.kind == WK_FP8 && w.bk % 16) ||
                (w.kind == WK_FP4 && w.bk % 32))
                return -1;
        }
    }
    return kind;
}

template <int KIND>
static void moe_grouped_launch(be_cuda *c, const dw *dw1, const dw *dw2, const dw *dw3,
                               const mchunk *dch, int nch, const int32_t *ptok, const float *pw,
                               const float *x, int D, int I, float limit, float *hbuf, float *ys) {
    k_moe_up<KIND><<<dim3((I + 7) / 8, nch), 256, 0, c->s>>>(dw1, dw3, dch, ptok, pw, x, D, I, limit, hbuf);
    LAUNCHED();
    k_moe_down<KIND><<<dim3((D + 7) / 8, nch), 256, 0, c->s>>>(dw2, dch, hbuf, I, D, ys);
    LAUNCHED();
}

/* ---- routed experts with many rows on the tensor cores (bf16 hi/lo, as mm_tc) ------------- */

/* u [2n, 2I]: rows < n from x hi, rows >= n from x lo; columns < I: w1, >= I: w3. Writes
 * h = swiglu(w1·x, w3·x) * wts[r] split into hi (rows < n) and lo (rows >= n) of h2 [2n, I]. */
__global__ void __launch_bounds__(256) k_swiglu_split(const float *__restrict__ u, int n, int I,
                                                      float limit, const float *__restrict__ wts,
                                                      uint16_t *__restrict__ h2) {
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

static void cu_moe(be *b, const be_moe_layer *L, const float *x, const int32_t *ids, int T,
                   float *out) {
    if (T <= 0) return;
    be_cuda *c = C(b);
    int E = L->n_experts, K = L->top_k, D = L->hidden, I = L->inter;
    int SI = L->shared_inter ? L->shared_inter : I, IM = SI > I ? SI : I;
    float *logits = (float *)cu_alloc(b, (size_t)T * E * sizeof(float));
    /* sel [T, K] int32 then wsel [T, K] f32 in one buffer: one download */
    int32_t *sel = (int32_t *)cu_alloc(b, (size_t)T * K * 8);
    float *wsel = (float *)(sel + (size_t)T * K);
    mm(c, L->gate, 0, E, x, D, logits, E, T);
    const int32_t *hsel = NULL;
    if (L->tid2eid) {
        int32_t *h = (int32_t *)xmalloc((size_t)T * K * sizeof *h);
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++) h[(size_t)t * K + k] = (int32_t)L->tid2eid[(size_t)ids[t] * K + k];
        hsel = (const int32_t *)stage(c, h, (size_t)T * K * sizeof *h);
        free(h);
    }
    if (E > 1024 || K > 16) {
        fprintf(stderr, "duet cuda: MoE with %d experts, top-%d unsupported (max 1024, 16)\n", E, K);
        abort();
    }
    k_route<<<T, 256, 0, c->s>>>(logits, E, K, L->bias, hsel, L->norm_topk, L->route_scale, sel, wsel);
    LAUNCHED();
    /* group rows by expert on the host (one sync per layer) */
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
    int kind = experts_kind(L);
    int np = cnt[E];
    int nchunks = 0;
    for (int e = 0; e < E; e++)
        if (L->w1[e]) nchunks += (cnt[e + 1] - cnt[e] + 7) / 8;
    if (kind >= 0 && nchunks > 0 && nchunks <= 65535) {
        /* grouped: every routed expert in two launches, then one combine */
        /* experts with >= MOE_TC_MIN rows go to the tensor cores (moe_tc), the rest to the
         * SIMT grouped GEMV chunks or 64-row tiles */
        unsigned char *big = (unsigned char *)xcalloc((size_t)E, 1);
        if (kind != WK_F32)
            for (int e = 0; e < E; e++) big[e] = L->w1[e] && cnt[e + 1] - cnt[e] >= MOE_TC_MIN;
        mchunk *ch = (mchunk *)xmalloc((size_t)nchunks * sizeof *ch);
        int nc = 0;
        for (int e = 0; e < E; e++)
            for (int p0 = cnt[e]; L->w1[e] && !big[e] && p0 < cnt[e + 1]; p0 += 8)
                ch[nc++] = (mchunk){e, p0, cnt[e + 1] - p0 < 8 ? cnt[e + 1] - p0 : 8};
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
        dw *tw = (dw *)xcalloc((size_t)3 * E, sizeof *tw);
        for (int e = 0; e < E; e++)
            if (L->w1[e]) {
                tw[e] = L->w1[e]->v;
                tw[E + e] = L->w2[e]->v;
                tw[2 * E + e] = L->w3[e]->v;
            }
        const dw *dtw = (const dw *)stage(c, tw, (size_t)3 * E * sizeof *tw);
        const mchunk *dch = (const mchunk *)stage(c, ch, (size_t)nchunks * sizeof *ch);
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
            k_gemm_grouped<<<dim3((I + TN - 1) / TN, ntl), 256, 0, c->s>>>(dtw, dtl, I, x, D, dtok, hbuf, I);
            LAUNCHED();
            k_gemm_grouped<<<dim3((I + TN - 1) / TN, ntl), 256, 0, c->s>>>(dtw + 2 * E, dtl, I, x, D, dtok, pb, I);
            LAUNCHED();
            size_t nI = (size_t)np * I;
            k_swiglu<<<(unsigned)((nI + 255) / 256), 256, 0, c->s>>>(hbuf, pb, np, I, L->swiglu_limit, dpw);
            LAUNCHED();
            k_gemm_grouped<<<dim3((D + TN - 1) / TN, ntl), 256, 0, c->s>>>(dtw + E, dtl, D, hbuf, I, NULL, ysb, D);
            LAUNCHED();
            cu_free(b, pb);
            free(tl);
        } else switch (kind) {
        case WK_FP4: moe_grouped_launch<WK_FP4>(c, dtw, dtw + E, dtw + 2 * E, dch, nc, dtok, dpw, x, D, I, L->swiglu_limit, hbuf, ysb); break;
        case WK_FP8: moe_grouped_launch<WK_FP8>(c, dtw, dtw + E, dtw + 2 * E, dch, nc, dtok, dpw, x, D, I, L->swiglu_limit, hbuf, ysb); break;
        case WK_BF16: moe_grouped_launch<WK_BF16>(c, dtw, dtw + E, dtw + 2 * E, dch, nc, dtok, dpw, x, D, I, L->swiglu_limit, hbuf, ysb); break;
        default: moe_grouped_launch<WK_F32>(c, dtw, dtw + E, dtw + 2 * E, dch, nc, dtok, dpw, x, D, I, L->swiglu_limit, hbuf, ysb); break;
        }
        moe_tc(c, L, cnt, big, x, dtok, dpw, ysb);
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
        k_moe_combine<<<(unsigned)((nD + 255) / 256), 256, 0, c->s>>>(out, ysb, dinv, T, K, D, shb);
        LAUNCHED();
        cu_free(b, hbuf);
        cu_free(b, ysb);
        if (shb) cu_free(b, shb);
        free(ch);
        free(big);
        free(inv);
        free(tw);
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
        k_gather<<<(unsigned)((nD + 255) / 256), 256, 0, c->s>>>(x, drows + cnt[e], n, D, xs);
        LAUNCHED();
        expert_ffn(c, L->w1[e], L->w2[e], L->w3[e], xs, n, D, I, dwts + cnt[e], L->swiglu_limit,
                   g, p, ys);
        k_scatter_add<<<(unsigned)((nD + 255) / 256), 256, 0, c->s>>>(out, ys, drows + cnt[e], n, D);
        LAUNCHED();
    }
    if (L->s1) {
        expert_ffn(c, L->s1, L->s2, L->s3, x, T, D, SI, NULL, L->swiglu_limit, g, p, ys);
        size_t nD = (size_t)T * D;
        k_scatter_add<<<(unsigned)((nD + 255) / 256), 256, 0, c->s>>>(out, ys, NULL, T, D);
        LAUNCHED();
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

/* ======================================================================================== */
/* elementwise                                                                              */
/* ======================================================================================== */

__global__ void k_scale(float *x, size_t n, float s) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] *= s;
}
__global__ void k_add(float *y, const float *x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}
/* thread per (row, block) */
__global__ void k_fp8_qat(float *x, int T, int dim, int nope, int block) {
    int nb = nope / block;
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= T * nb) return;
    int t = idx / nb, j = idx % nb;
    fd_act_quant_fp8(x + (size_t)t * dim + (size_t)j * block, block);
}
/* block per row: WHT in shared memory, then FP4 round trip per 32 */
__global__ void k_hadamard_fp4(float *x, int dim) {
    extern __shared__ float z[];
    float *xr = x + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) z[i] = xr[i];
    fd_hadamard_block(z, dim);
    for (int i = threadIdx.x * 32; i < dim; i += blockDim.x * 32) fd_fp4_roundtrip(z + i, dim - i < 32 ? dim - i : 32);
    __syncthreads();
    for (int i = threadIdx.x; i < dim; i += blockDim.x) xr[i] = z[i];
}

static void cu_scale_rows(be *b, float *x, int T, int n, float s) {
    size_t N = (size_t)T * n;
    if (!N) return;
    k_scale<<<grid_for(N, 256), 256, 0, C(b)->s>>>(x, N, s);
    LAUNCHED();
}
static void cu_add(be *b, float *y, const float *x, size_t n) {
    if (!n) return;
    k_add<<<grid_for(n, 256), 256, 0, C(b)->s>>>(y, x, n);
    LAUNCHED();
}
static void cu_fp8_qat(be *b, float *x, int T, int dim, int nope, int block) {
    int n = T * (nope / block);
    if (n <= 0) return;
    k_fp8_qat<<<(n + 127) / 128, 128, 0, C(b)->s>>>(x, T, dim, nope, block);
    LAUNCHED();
}
static void cu_hadamard_fp4(be *b, float *x, int rows, int dim) {
    if (rows <= 0) return;
    k_hadamard_fp4<<<rows, 128, (size_t)dim * sizeof(float), C(b)->s>>>(x, dim);
    LAUNCHED();
}

/* ======================================================================================== */
/* lifetime and the ops table                                                                */
/* ======================================================================================== */

static void cu_destroy(be *b) {
    be_cuda *c = C(b);
    cudaStreamSynchronize(c->s);
    for (size_t i = 0; i < c->n_live; i++) cudaFree(c->live[i].p);
    for (size_t i = 0; i < c->n_free; i++) cudaFree(c->freel[i].p);
    if (c->pin) cudaFreeHost(c->pin);
    if (c->dmeta) cudaFree(c->dmeta);
    if (c->blas) cublasDestroy(c->blas);
    if (c->lanes_ready) {
        for (int i = 0; i < MOE_LANES; i++) {
            cublasDestroy(c->lane_blas[i]);
            cudaStreamDestroy(c->lane_s[i]);
            cudaEventDestroy(c->lane_ev[i]);
            cudaFree(c->lane_ws[i]);
        }
        cudaEventDestroy(c->ev_join);
    }
    if (c->blas_ws) cudaFree(c->blas_ws);
    cudaStreamDestroy(c->s);
    free(c->live);
    free(c->freel);
    if (g_launch_be == c) g_launch_be = NULL;
    free(c);
}

static const struct be_ops cuda_ops = {
    "cuda",
    cu_alloc, cu_free, cu_upload, cu_download, cu_fill, cu_copy,
    cu_weight, cu_weight_slice, cu_weight_free, cu_vector,
    cu_matmul, cu_embed, cu_rmsnorm, cu_head_rms, cu_rope,
    cu_mhc_pre, cu_mhc_post, cu_hc_head,
    cu_attention, cu_ring_write, cu_compress, cu_index_topk, cu_moe,
    cu_scale_rows, cu_add, cu_fp8_qat, cu_hadamard_fp4,
    cu_destroy,
};

extern "C" be *be_cuda_create(int device, double mem_fraction, char *err, size_t errlen) {
    if (!(mem_fraction > 0 && mem_fraction <= 1)) {
        duet_err(err, errlen, DUET_EINVAL, "GPU memory fraction %g is outside (0, 1]", mem_fraction);
        return NULL;
    }
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        duet_err(err, errlen, DUET_EINVAL, "no CUDA device found (%s)",
                 e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return NULL;
    }
    if (device < 0 || device >= n) {
        duet_err(err, errlen, DUET_EINVAL, "CUDA device %d does not exist (%d found)", device, n);
        return NULL;
    }
    if ((e = cudaSetDevice(device)) != cudaSuccess) {
        duet_err(err, errlen, DUET_EIO, "CUDA device %d: %s", device, cudaGetErrorString(e));
        return NULL;
    }
    cudaDeviceProp pr;
    if ((e = cudaGetDeviceProperties(&pr, device)) != cudaSuccess) {
        duet_err(err, errlen, DUET_EIO, "CUDA device %d: %s", device, cudaGetErrorString(e));
        return NULL;
    }
    be_cuda *c = (be_cuda *)xcalloc(1, sizeof *c);
    c->base.ops = &cuda_ops;
    c->base.n_threads = 1;
    c->dev = device;
    snprintf(c->name, sizeof c->name, "%s", pr.name);
    c->ccmaj = pr.major;
    c->ccmin = pr.minor;
    int integ = 0;
    cudaDeviceGetAttribute(&integ, cudaDevAttrIntegrated, device);
    c->integrated = integ;
    size_t fr = 0, tot = 0;
    if ((e = cudaMemGetInfo(&fr, &tot)) != cudaSuccess) {
        duet_err(err, errlen, DUET_EIO, "CUDA device %d: %s", device, cudaGetErrorString(e));
        free(c);
        return NULL;
    }
    c->cap = (size_t)(mem_fraction * (double)tot);
    if (c->cap > fr && !integ) c->cap = fr; /* another process holds part of the card */
    c->sync_each = getenv("DUET_CUDA_SYNC") && atoi(getenv("DUET_CUDA_SYNC"));
    if ((e = cudaStreamCreateWithFlags(&c->s, cudaStreamNonBlocking)) != cudaSuccess) {
        duet_err(err, errlen, DUET_EIO, "CUDA stream: %s", cudaGetErrorString(e));
        free(c);
        return NULL;
    }
    g_launch_be = c;
    return &c->base;
}

extern "C" int be_cuda_sync(be *b, char *err, size_t errlen) {
    cudaError_t e = cudaStreamSynchronize(C(b)->s);
    if (e != cudaSuccess) return duet_err(err, errlen, DUET_EIO, "CUDA: %s", cudaGetErrorString(e));
    return 0;
}

extern "C" const char *be_cuda_device_name(const be *b, int *cc_major, int *cc_minor) {
    const be_cuda *c = (const be_cuda *)b;
    if (cc_major) *cc_major = c->ccmaj;
    if (cc_minor) *cc_minor = c->ccmin;
    return c->name;
}

/* ======================================================================================== */
/* synthetic weights (tools/bench): generated on the device, never on the host               */
/* ======================================================================================== */

__device__ __forceinline__ uint32_t hash32(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return (uint32_t)x;
}

/* bytes: random, but FP8 bytes avoid NaN (0x7F/0xFF) */
__global__ void k_rand_bytes(uint8_t *p, size_t n, uint64_t seed, int fp8, uint8_t fixed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint8_t v = fixed ? fixed : (uint8_t)hash32(seed * 0x9E3779B97F4A7C15ULL + i);
        if (fp8 && (v & 0x7F) == 0x7F) v ^= 1;
        p[i] = v;
    }
}
__global__ void k_rand_bf16(uint16_t *p, size_t n, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float u = (hash32(seed * 0x9E3779B97F4A7C15ULL + i) >> 8) * (1.0f / 16777216.0f);
        p[i] = fd_f32_to_bf16((u - 0.5f) * 0.05f);
    }
}
__global__ void k_rand_f32(float *p, size_t n, uint64_t seed, float lo, float hi) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float u = (hash32(seed * 0x9E3779B97F4A7C15ULL + i) >> 8) * (1.0f / 16777216.0f);
        p[i] = lo + (hi - lo) * u;
    }
}

extern "C" be_weight *be_cuda_weight_random(be *b, ck_kind kind, st_dtype dtype, int64_t rows,
                                            int64_t cols, uint64_t seed) {
    be_cuda *c = C(b);
    be_weight *w;
    if (kind == CK_FP8_WEIGHT) {
        int64_t sr = (rows + 127) / 128, sc = (cols + 127) / 128;
        w = wnew(c, WK_FP8, rows, cols, (size_t)(rows * cols), (size_t)(sr * sc));
        w->v.scols = (int)sc;
        w->v.bn = 128;
        w->v.bk = 128;
        k_rand_bytes<<<grid_for((size_t)(rows * cols), 256), 256, 0, c->s>>>((uint8_t *)w->data, (size_t)(rows * cols), seed, 1, 0);
        k_rand_bytes<<<grid_for((size_t)(sr * sc), 256), 256, 0, c->s>>>(w->scale, (size_t)(sr * sc), seed, 0, 127 - 8);
    } else if (kind == CK_FP4_WEIGHT) {
        int64_t sc = cols / 32;
        w = wnew(c, WK_FP4, rows, cols, (size_t)(rows * cols / 2), (size_t)(rows * sc));
        w->v.scols = (int)sc;
        w->v.bn = 1;
        w->v.bk = 32;
        k_rand_bytes<<<grid_for((size_t)(rows * cols / 2), 256), 256, 0, c->s>>>((uint8_t *)w->data, (size_t)(rows * cols / 2), seed, 0, 0);
        k_rand_bytes<<<grid_for((size_t)(rows * sc), 256), 256, 0, c->s>>>(w->scale, (size_t)(rows * sc), seed, 0, 127 - 6);
    } else {
        (void)dtype;
        w = wnew(c, WK_BF16, rows, cols, (size_t)(rows * cols) * 2, 0);
        k_rand_bf16<<<grid_for((size_t)(rows * cols), 256), 256, 0, c->s>>>((uint16_t *)w->data, (size_t)(rows * cols), seed);
    }
    LAUNCHED();
    return w;
}

extern "C" float *be_cuda_vector_random(be *b, size_t n, float lo, float hi, uint64_t seed) {
    float *p = (float *)cu_alloc(b, n * sizeof(float));
    k_rand_f32<<<grid_for(n, 256), 256, 0, C(b)->s>>>(p, n, seed, lo, hi);
    LAUNCHED();
    return p;
}
