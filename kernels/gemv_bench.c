/* gemv_bench.c — duet-gemv-bench: device time of the decode-size ops of the CUDA backend
 * (matmul GEMV on V4-Flash shapes, the MoE layer, norms, RoPE, mHC) with achieved GB/s.
 *
 * Why: duet-bench's per-op breakdown syncs around every op, so for ops of a few microseconds
 * it measures launch + sync, not the kernel. Here each case runs back to back between two
 * CUDA events (no host sync in between), over enough weight copies that they do not sit in
 * L2, so time per call and weight bytes per second are what the GPU does (for ops shorter than
 * a launch, the host's launch rate: run under ncu for kernel times). Benchmarks only:
 * correctness is test_cuda_ops' job. Usage: duet-gemv-bench [reps [mm|moe|small]]
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/be_cuda.h"
#include "kernels/peak.h"

static be *B;
static cudaStream_t S;

static void die(const char *what) {
    fprintf(stderr, "duet-gemv-bench: %s\n", what);
    exit(1);
}

static double ev_ms(cudaEvent_t a, cudaEvent_t b) {
    float ms = 0;
    char err[256];
    if (be_cuda_sync(B, err, sizeof err)) die(err);
    if (cudaEventElapsedTime(&ms, a, b) != cudaSuccess) die("cudaEventElapsedTime failed");
    return ms;
}

/* matmul y[T, N] = x[T, K] W^T over ncopy weights in turn */
static void t_mm(const char *name, ck_kind kind, st_dtype dt, int N, int K, const int *Ts, int nT,
                 int reps) {
    size_t one = 0;
    be_weight *w[64];
    int nc = 0;
    do {
        w[nc] = be_cuda_weight_random(B, kind, dt, N, K, 100 + nc);
        one = be_cuda_weight_bytes(w[nc]);
        nc++;
    } while (nc < 64 && one * nc < ((size_t)256 << 20));
    float *x = be_cuda_vector_random(B, (size_t)16 * K, -1.f, 1.f, 7);
    float *y = (float *)B->ops->alloc(B, (size_t)16 * N * sizeof(float));
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    for (int i = 0; i < nT; i++) {
        int T = Ts[i];
        for (int r = 0; r < nc && r < reps; r++) B->ops->matmul(B, w[r], 0, N, x, K, y, N, T);
        cudaEventRecord(a, S);
        for (int r = 0; r < reps; r++) B->ops->matmul(B, w[r % nc], 0, N, x, K, y, N, T);
        cudaEventRecord(b, S);
        double us = ev_ms(a, b) * 1e3 / reps;
        printf("%-10s %5d x %-5d T=%-2d %8.2f us %7.0f GB/s\n", name, N, K, T, us, one / us * 1e-3);
    }
    for (int r = 0; r < nc; r++) B->ops->weight_free(B, w[r]);
    B->ops->free(B, x);
    B->ops->free(B, y);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
}

/* the MoE layer at V4-Flash sizes: 256 FP4 experts, top-6, FP8 shared expert */
static void t_moe(const int *Ts, int nT, int reps) {
    enum { E = 256, D = 4096, I = 2048, KT = 6 };
    const be_weight **w1 = calloc(E, sizeof *w1), **w2 = calloc(E, sizeof *w2),
                    **w3 = calloc(E, sizeof *w3);
    size_t eb = 0;
    for (int e = 0; e < E; e++) {
        w1[e] = be_cuda_weight_random(B, CK_FP4_WEIGHT, ST_I8, I, D, 1000 + 3 * e);
        w3[e] = be_cuda_weight_random(B, CK_FP4_WEIGHT, ST_I8, I, D, 1001 + 3 * e);
        w2[e] = be_cuda_weight_random(B, CK_FP4_WEIGHT, ST_I8, D, I, 1002 + 3 * e);
        if (!e) eb = be_cuda_weight_bytes(w1[e]) * 2 + be_cuda_weight_bytes(w2[e]);
    }
    be_moe_layer L = {.n_experts = E, .top_k = KT, .inter = I, .hidden = D, .w1 = w1, .w2 = w2,
                      .w3 = w3, .shared_inter = I, .route_scale = 1.5f, .swiglu_limit = 10.f,
                      .norm_topk = 1};
    L.gate = be_cuda_weight_random(B, CK_PLAIN, ST_BF16, E, D, 9);
    L.bias = be_cuda_vector_random(B, E, -0.1f, 0.1f, 10);
    L.s1 = be_cuda_weight_random(B, CK_FP8_WEIGHT, ST_F8_E4M3, I, D, 11);
    L.s3 = be_cuda_weight_random(B, CK_FP8_WEIGHT, ST_F8_E4M3, I, D, 12);
    L.s2 = be_cuda_weight_random(B, CK_FP8_WEIGHT, ST_F8_E4M3, D, I, 13);
    size_t sb = be_cuda_weight_bytes(L.s1) * 3 + be_cuda_weight_bytes(L.gate);
    enum { NX = 16 };
    float *x = be_cuda_vector_random(B, (size_t)NX * 16 * D, -1.f, 1.f, 14);
    float *out = (float *)B->ops->alloc(B, (size_t)16 * D * sizeof(float));
    int32_t ids[16] = {0};
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    for (int i = 0; i < nT; i++) {
        int T = Ts[i];
        for (int r = 0; r < NX && r < reps; r++) B->ops->moe(B, &L, x + (size_t)r * 16 * D, ids, T, out);
        cudaEventRecord(a, S);
        for (int r = 0; r < reps; r++) B->ops->moe(B, &L, x + (size_t)(r % NX) * 16 * D, ids, T, out);
        cudaEventRecord(b, S);
        double us = ev_ms(a, b) * 1e3 / reps;
        /* distinct experts of T tokens: at most T*KT; count T*KT (an upper bound on bytes) */
        int ne = T * KT < E ? T * KT : E;
        double bytes = (double)ne * eb + sb;
        printf("moe        E=%d top-%d T=%-2d %8.2f us %7.0f GB/s (<= %d experts)\n", E, KT, T, us,
               bytes / us * 1e-3, ne);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
}

#define TIME_OP(label, call)                                                                      \
    do {                                                                                          \
        for (int r_ = 0; r_ < 3; r_++) call;                                                      \
        cudaEventRecord(a, S);                                                                    \
        for (int r_ = 0; r_ < reps; r_++) call;                                                   \
        cudaEventRecord(b, S);                                                                    \
        printf("%-34s %8.2f us\n", label, ev_ms(a, b) * 1e3 / reps);                              \
    } while (0)

static void t_small(int reps) {
    enum { D = 4096, HC = 4, H = 64, DH = 512, DR = 64, QL = 1024 };
    float *h = be_cuda_vector_random(B, (size_t)HC * D, -1.f, 1.f, 20);
    float *fn = be_cuda_vector_random(B, (size_t)(2 + HC) * HC * HC * D, -0.01f, 0.01f, 21);
    float *base = be_cuda_vector_random(B, (size_t)(2 + HC) * HC, -0.5f, 0.5f, 22);
    float *scale = be_cuda_vector_random(B, 3, 0.5f, 1.f, 23);
    float *u = (float *)B->ops->alloc(B, (size_t)D * 4);
    float *post = (float *)B->ops->alloc(B, HC * 4), *comb = (float *)B->ops->alloc(B, HC * HC * 4);
    float *nw = be_cuda_vector_random(B, D, 0.5f, 1.5f, 24);
    float *q = be_cuda_vector_random(B, (size_t)H * DH, -1.f, 1.f, 25);
    float *y = (float *)B->ops->alloc(B, (size_t)H * DH * 4);
    float om[DR / 2];
    for (int i = 0; i < DR / 2; i++) om[i] = powf(10000.f, -2.f * i / DR);
    int32_t pos[1] = {4097};
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    TIME_OP("rmsnorm T=1 n=4096", B->ops->rmsnorm(B, u, nw, y, 1, D, 1e-6f));
    TIME_OP("rmsnorm T=1 n=1024", B->ops->rmsnorm(B, u, nw, y, 1, QL, 1e-6f));
    TIME_OP("head_rms 64 x 512", B->ops->head_rms(B, q, H, DH, 1e-6f));
    TIME_OP("rope T=1 64 heads", B->ops->rope(B, q, 1, H, DH, DR, pos, om, 0));
    TIME_OP("rope T=1 1 head", B->ops->rope(B, q, 1, 1, DH, DR, pos, om, 0));
    TIME_OP("mhc_pre T=1 n=4 D=4096 it=20",
            B->ops->mhc_pre(B, h, fn, base, scale, 1, HC, D, 20, 1e-6f, 1e-6f, u, post, comb));
    TIME_OP("mhc_post T=1 n=4 D=4096", B->ops->mhc_post(B, h, u, post, comb, 1, HC, D));
    TIME_OP("hc_head T=1 n=4 D=4096", B->ops->hc_head(B, h, fn, base, scale, 1, HC, D, 1e-6f, 1e-6f, u));
    cudaEventDestroy(a);
    cudaEventDestroy(b);
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 200;
    char err[256];
    B = be_cuda_create(0, 0.9, err, sizeof err);
    if (!B) die(err);
    S = (cudaStream_t)be_cuda_stream(B);
    double gbs = 0;
    if (peak_copy_gbs((size_t)1 << 30, 10, &gbs, err, sizeof err)) die(err);
    int cc0, cc1;
    printf("device %s; copy %.0f GB/s (read + write)\n", be_cuda_device_name(B, &cc0, &cc1), gbs);
    const char *only = argc > 2 ? argv[2] : "";
    const int Ts[] = {1, 4, 8, 16};
    if (!*only || !strcmp(only, "mm")) {
        t_mm("wq_a", CK_FP8_WEIGHT, ST_F8_E4M3, 1024, 4096, Ts, 4, reps);
        t_mm("wq_b", CK_FP8_WEIGHT, ST_F8_E4M3, 32768, 1024, Ts, 4, reps);
        t_mm("wkv", CK_FP8_WEIGHT, ST_F8_E4M3, 512, 4096, Ts, 4, reps);
        t_mm("wo_b", CK_FP8_WEIGHT, ST_F8_E4M3, 4096, 8192, Ts, 4, reps);
        t_mm("shared.w1", CK_FP8_WEIGHT, ST_F8_E4M3, 2048, 4096, Ts, 4, reps);
        t_mm("shared.w2", CK_FP8_WEIGHT, ST_F8_E4M3, 4096, 2048, Ts, 4, reps);
        t_mm("expert.w1", CK_FP4_WEIGHT, ST_I8, 2048, 4096, Ts, 4, reps);
        t_mm("expert.w2", CK_FP4_WEIGHT, ST_I8, 4096, 2048, Ts, 4, reps);
        t_mm("head", CK_PLAIN, ST_BF16, 129280, 4096, Ts, 2, reps / 4 ? reps / 4 : 1);
    }
    const int Tm[] = {1, 8};
    if (!*only || !strcmp(only, "moe")) t_moe(Tm, 2, reps / 2 ? reps / 2 : 1);
    if (!*only || !strcmp(only, "small")) t_small(reps * 5);
    B->ops->destroy(B);
    return 0;
}
