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
 * This file: the backend object's lifetime and the ops table, error checks. The ops are in
 * be_cuda_mem.cu (memory, the cap, staging, weights), be_cuda_gemm.cu (matmul: GEMV, tiles,
 * cuBLAS tensor cores), be_cuda_elem.cu (embed, norms, RoPE, mHC, elementwise), be_cuda_attn.cu,
 * be_cuda_cmp.cu (compressor, indexer), be_cuda_moe.cu and be_cuda_sample.cu (sampling); be_cuda_internal.cuh is what they share.
 */
#include "kernels/be_cuda_internal.cuh"

void ck_cuda(cudaError_t e, const char *what, const char *file, int line) {
    if (e == cudaSuccess) return;
    fprintf(stderr, "duet cuda: %s failed at %s:%d: %s\n", what, file, line, cudaGetErrorString(e));
    abort();
}

be_cuda *g_launch_be;

bool pdl_on(be_cuda *c) { return c->pdl; }

void launched(const char *file, int line) {
    ck_cuda(cudaGetLastError(), "kernel launch", file, line);
    if (g_launch_be && g_launch_be->sync_each)
        ck_cuda(cudaStreamSynchronize(g_launch_be->s), "kernel run", file, line);
}

/* ======================================================================================== */
/* lifetime and the ops table                                                                */
/* ======================================================================================== */

static void cu_destroy(be *b) {
    be_cuda *c = C(b);
    cudaStreamSynchronize(c->s);
    moe_tables_drop(c); /* its blocks go to the free list, freed below */
    graph_destroy(c);
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
    free(c->mtab);
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
    cu_destroy, cu_graph_begin, cu_graph_end, cu_matmul_xg, cu_mhc_norm, cu_ring_write_bf16,
    cu_ring_write_rows, cu_sample,
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
    c->pdl = !(getenv("DUET_CUDA_PDL") && !atoi(getenv("DUET_CUDA_PDL")));
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

extern "C" void *be_cuda_stream(const be *b) { return (void *)((const be_cuda *)b)->s; }
