/* be_cuda.h — the CUDA backend: every backend.h op on one GPU, fp32 activations.
 *
 * Why: the forward pass (worker/forward.c) is written once against backend.h; this header is
 * the only thing a host program needs to run it on a GPU. Weights stay in their stored format
 * in device memory (FP8 e4m3 + e8m0 128x128 block scales, packed FP4 e2m1 + e8m0 per-32
 * scales, BF16, F32) and are decoded inside the kernels; activations are fp32 like the CPU
 * reference. Device memory is capped: a fraction of the card's total (like vLLM's
 * gpu-memory-utilization) and, on integrated GPUs sharing host memory (GB10), the host's
 * MemAvailable too. This header must never expose CUDA types: C11 callers include it.
 */
#ifndef DUET_BE_CUDA_H
#define DUET_BE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "worker/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Opens GPU `device` with a memory cap of mem_fraction (0, 1] of its total memory. Returns NULL
 * with a sentence in err when there is no such device, the fraction is out of range, or the
 * device cannot be initialised. The backend's alloc op aborts with a sentence naming the cap
 * when an allocation would pass it (backend.h: alloc never fails softly); callers that want
 * to refuse cleanly ask be_cuda_fits first. */
be *be_cuda_create(int device, double mem_fraction, char *err, size_t errlen);

/* 0 if `bytes` more device memory fit under the cap (and, on integrated GPUs, under the host's
 * MemAvailable); else DUET_ENOMEM with a sentence giving the numbers. */
int be_cuda_fits(be *b, size_t bytes, char *err, size_t errlen);

/* Bytes in use on the device (weights, activations, state, staging; cached free blocks, which
 * are given back when the cap is reached, are not counted) and the cap. */
size_t be_cuda_mem_used(const be *b);
size_t be_cuda_mem_cap(const be *b);

/* Waits for all queued work; returns 0 or DUET_EIO with the CUDA error as a sentence. */
int be_cuda_sync(be *b, char *err, size_t errlen);

/* Name of the device ("NVIDIA H100 80GB HBM3") and its compute capability. */
const char *be_cuda_device_name(const be *b, int *cc_major, int *cc_minor);

/* The backend's CUDA stream (a cudaStream_t), on which every op is queued: for benchmarks
 * that time ops between CUDA events. */
void *be_cuda_stream(const be *b);

/* Decode-size steps as CUDA graphs: off by default (DUET_CUDA_GRAPH=1 turns them on; see
 * be_cuda_graph.cu for why). Counters since creation:
 * replays of a cached graph, captures of a new one, steps that ran directly after a record
 * pass found something a graph cannot hold (last_fallback says what), graphs cached now. */
typedef struct {
    uint64_t replays, captures, fallbacks;
    double record_s;  /* host seconds in record passes (then replays wait for the GPU) */
    uint64_t sig_bytes; /* signature bytes of the last record pass */
    int cached;
    char last_fallback[96];
} be_cuda_graph_stats;
void be_cuda_graph_get_stats(be *b, be_cuda_graph_stats *st);
/* Turns graphs on or off for the steps that follow (overrides DUET_CUDA_GRAPH). */
void be_cuda_graph_enable(be *b, int on);

/* ---- synthetic weights for benchmarks (tools/bench) -------------------------------------- */
/* A weight of kind CK_FP8_WEIGHT (block_n x block_k e8m0 scales), CK_FP4_WEIGHT (1 x 32) or
 * CK_PLAIN bf16 (dtype ST_BF16) with the given logical shape, filled on the GPU with random
 * values (uniform bytes; scales chosen so values stay O(1)); no host copy ever exists. */
be_weight *be_cuda_weight_random(be *b, ck_kind kind, st_dtype dtype, int64_t rows,
                                 int64_t cols, uint64_t seed);
/* A device f32 vector [n] of uniform values in [lo, hi). */
float *be_cuda_vector_random(be *b, size_t n, float lo, float hi, uint64_t seed);
/* Bytes a weight occupies in device memory (data + scales). */
size_t be_cuda_weight_bytes(const be_weight *w);

#ifdef __cplusplus
}
#endif

#endif
