/* peak.cu — the two ceilings a benchmark is judged against, measured on the device in the same
 * run: device copy bandwidth (a large device-to-device copy, bytes read + written) and the
 * tensor-core matrix rate (cuBLAS bf16 GEMM and cuBLASLt FP8 e4m3 GEMM, 8192^3, fp32 accumulate).
 *
 * Why: datasheet numbers are leads, not ceilings; tools/bench reports its decode and prefill
 * rates as fractions of these. Must never be used by the engine's forward pass (only by
 * benchmarks), and must never leave memory allocated: everything is freed before returning.
 */
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdio.h>

#include "kernels/peak.h"

extern "C" {
#include "common/err.h"
}

#define PK(x)                                                                                     \
    do {                                                                                          \
        cudaError_t e_ = (x);                                                                     \
        if (e_ != cudaSuccess) {                                                                  \
            rc = duet_err(err, errlen, DUET_EIO, "%s: %s", #x, cudaGetErrorString(e_));           \
            goto out;                                                                             \
        }                                                                                         \
    } while (0)
#define PB(x)                                                                                     \
    do {                                                                                          \
        int s_ = (int)(x);                                                                        \
        if (s_ != 0) {                                                                            \
            rc = duet_err(err, errlen, DUET_EIO, "%s: cuBLAS status %d", #x, s_);                 \
            goto out;                                                                             \
        }                                                                                         \
    } while (0)

__global__ void k_peak_fill(uint8_t *p, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t x = (uint32_t)i * 2654435761u ^ seed;
        x ^= x >> 15;
        x *= 0x2c1b3c6du;
        x ^= x >> 12;
        uint8_t v = (uint8_t)x;
        if ((v & 0x7F) >= 0x60) v &= 0xBF; /* keep FP8/bf16 bytes finite and moderate */
        p[i] = v;
    }
}

extern "C" int peak_copy_gbs(size_t bytes, int iters, double *gbs, char *err, size_t errlen) {
    int rc = 0;
    void *a = NULL, *b = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    float ms = 0;
    PK(cudaMalloc(&a, bytes));
    PK(cudaMalloc(&b, bytes));
    k_peak_fill<<<1024, 256>>>((uint8_t *)a, bytes, 1);
    PK(cudaGetLastError());
    PK(cudaEventCreate(&e0));
    PK(cudaEventCreate(&e1));
    PK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice)); /* warm-up */
    PK(cudaEventRecord(e0));
    for (int i = 0; i < iters; i++)
        PK(cudaMemcpyAsync(i & 1 ? a : b, i & 1 ? b : a, bytes, cudaMemcpyDeviceToDevice));
    PK(cudaEventRecord(e1));
    PK(cudaEventSynchronize(e1));
    PK(cudaEventElapsedTime(&ms, e0, e1));
    *gbs = 2.0 * (double)bytes * iters / (ms * 1e-3) / 1e9;
out:
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return rc;
}

extern "C" int peak_gemm_tflops(int n, int iters, double *bf16_tflops, double *fp8_tflops,
                                char *err, size_t errlen) {
    int rc = 0;
    void *A = NULL, *B = NULL, *Cm = NULL, *ws = NULL;
    cublasHandle_t h = NULL;
    cublasLtHandle_t lt = NULL;
    cublasLtMatmulDesc_t desc = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    size_t nn = (size_t)n * n, wsb = (size_t)64 << 20;
    float alpha = 1.0f, beta = 0.0f, ms = 0;
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
    *bf16_tflops = *fp8_tflops = 0;
    PK(cudaMalloc(&A, nn * 2));
    PK(cudaMalloc(&B, nn * 2));
    PK(cudaMalloc(&Cm, nn * 2));
    PK(cudaMalloc(&ws, wsb));
    k_peak_fill<<<1024, 256>>>((uint8_t *)A, nn * 2, 2);
    k_peak_fill<<<1024, 256>>>((uint8_t *)B, nn * 2, 3);
    PK(cudaGetLastError());
    PK(cudaEventCreate(&e0));
    PK(cudaEventCreate(&e1));
    PB(cublasCreate(&h));
    /* bf16: C = A B, fp32 accumulate */
    for (int w = 0; w < 2; w++) {
        PK(cudaEventRecord(e0));
        for (int i = 0; i < (w ? iters : 1); i++)
            PB(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, A, CUDA_R_16BF, n, B,
                            CUDA_R_16BF, n, &beta, Cm, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
        PK(cudaEventRecord(e1));
        PK(cudaEventSynchronize(e1));
    }
    PK(cudaEventElapsedTime(&ms, e0, e1));
    *bf16_tflops = 2.0 * n * (double)n * n * iters / (ms * 1e-3) / 1e12;
    /* fp8 e4m3 (TN, the layout FP8 needs), bf16 out, fp32 accumulate */
    PB(cublasLtCreate(&lt));
    PB(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    PB(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof tA));
    PB(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof tB));
    PB(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, n, n, n));
    PB(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, n, n, n));
    PB(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, n, n, n));
    PB(cublasLtMatmulPreferenceCreate(&pref));
    PB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb));
    PB(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 1, &heur, &found));
    if (!found) {
        rc = duet_err(err, errlen, DUET_EIO, "cuBLASLt found no FP8 GEMM algorithm");
        goto out;
    }
    for (int w = 0; w < 2; w++) {
        PK(cudaEventRecord(e0));
        for (int i = 0; i < (w ? iters : 1); i++)
            PB(cublasLtMatmul(lt, desc, &alpha, A, la, B, lb, &beta, Cm, lc, Cm, lc, &heur.algo, ws,
                              wsb, 0));
        PK(cudaEventRecord(e1));
        PK(cudaEventSynchronize(e1));
    }
    PK(cudaEventElapsedTime(&ms, e0, e1));
    *fp8_tflops = 2.0 * n * (double)n * n * iters / (ms * 1e-3) / 1e12;
out:
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (lt) cublasLtDestroy(lt);
    if (h) cublasDestroy(h);
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    cudaFree(A);
    cudaFree(B);
    cudaFree(Cm);
    cudaFree(ws);
    return rc;
}
