/* peak.h — measured device ceilings for benchmarks: copy bandwidth and tensor-core GEMM rate.
 *
 * Why: tools/bench states its results as fractions of what this device does in the same run
 * (not of datasheet numbers). Must never be called by the engine: benchmarks only. Uses the
 * current CUDA device and its default stream; allocates and frees its own buffers.
 */
#ifndef DUET_PEAK_H
#define DUET_PEAK_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Device-to-device copy of `bytes`, `iters` times: GB/s counting bytes read + written. */
int peak_copy_gbs(size_t bytes, int iters, double *gbs, char *err, size_t errlen);
/* n x n x n GEMMs: cuBLAS bf16 (fp32 accumulate) and cuBLASLt FP8 e4m3 TN (fp32 accumulate,
 * bf16 out), TFLOP/s. */
int peak_gemm_tflops(int n, int iters, double *bf16_tflops, double *fp8_tflops, char *err,
                     size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
