/* kv_dev.cuh — device access to KV state stored as f32, bf16 or FP8 rows (backend.h "KV state
 * storage").
 *
 * Why: the attention, the ring write, the compressor and the indexer all read or write the same
 * three arrays (rings, compressed entries, indexer keys) in either dtype; one pair of helpers
 * keeps the rounding (fd_f32_to_bf16: nearest even, as the CPU's fmt_f32_to_bf16) and the
 * widening identical in every kernel. Math never happens here: values cross as f32.
 */
#ifndef DUET_KV_DEV_CUH
#define DUET_KV_DEV_CUH

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "kernels/fmt_dev.cuh"
#include "worker/backend.h"

/* element i of a KV array: f32 when bf16 == 0, else bf16 widened to f32 */
__device__ __forceinline__ float kv_at(const void *base, size_t i, int bf16) {
    return bf16 ? fd_bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* v as a bf16 KV array would hold it (bf16 != 0), else v: this step's f32 kv rows are seen at
 * the precision the ring will store them, so chunking never changes what a query sees */
__device__ __forceinline__ float kv_round(float v, int bf16) {
    return bf16 ? fd_bf16_to_f32(fd_f32_to_bf16(v)) : v;
}

/* stores v into element i of a KV array of the same kind */
__device__ __forceinline__ void kv_set(void *base, size_t i, int bf16, float v) {
    if (bf16) ((uint16_t *)base)[i] = fd_f32_to_bf16(v);
    else ((float *)base)[i] = v;
}

/* ---- FP8 rows (backend.h BE_KV_FP8; common/formats.h "FP8 KV rows", bit for bit) ---------- */

__host__ __device__ __forceinline__ size_t kv_fp8_rope_off(int d) {
    size_t nope = (size_t)(d - 64);
    return (nope + nope / 64 + 3) / 4 * 4;
}

/* bytes of one row of d values in format fmt (be_kv_row_bytes) */
__host__ __device__ __forceinline__ size_t kv_row_bytes(int fmt, int d) {
    return fmt == 2 ? kv_fp8_rope_off(d) + 128 : (size_t)d * (fmt == 1 ? 2 : 4);
}

/* the scale exponent of a block of 64 nope values whose max |x| is amax */
__device__ __forceinline__ int kv_fp8_exp(float amax) { return fd_scale_exp(amax, 1e-4f, 1.0f / 448.0f); }

/* x as the e4m3 byte of a block with scale exponent e, and back */
__device__ __forceinline__ uint8_t kv_fp8_q(float x, int e) {
    return fd_f32_to_e4m3(fd_clampf(__fmul_rn(x, fd_pow2f(-e)), -448.f, 448.f));
}
__device__ __forceinline__ float kv_fp8_v(uint8_t q, int e) { return __fmul_rn(fd_e4m3_to_f32(q), fd_pow2f(e)); }

/* Fast exact decode for readers of many values (the attention): e4m3 -> f16 is exact (one cvt
 * instruction), then f16 -> f32; the block scale 2^(s-127) from its bits (s >= 1: a normal
 * float; the encoder never writes s = 0, whose value the fallback still gives). The product is
 * the same float as kv_fp8_v's: both are exact (results are normal floats). */
__device__ __forceinline__ float kv_e4m3(uint8_t b) {
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)b, __NV_E4M3);
    return __half2float(__half(h));
}
__device__ __forceinline__ float kv_fp8_scale(uint8_t s) {
    return s ? __int_as_float((int)s << 23) : fd_pow2f(-127);
}

/* The block's threads store x[d] (f32, any memory) as an FP8 row; every thread calls it
 * (blockDim a multiple of 32). A warp per block of 64 nope values: two per lane, the amax by
 * shuffles (a max: the same value in any order, as the CPU's sequential one). */
__device__ __forceinline__ void kv_fp8_put_block(uint8_t *row, const float *x, int d) {
    int nope = d - 64, nb = nope / 64, lane = threadIdx.x & 31;
    size_t ro = kv_fp8_rope_off(d);
    for (int b = threadIdx.x >> 5; b < nb; b += blockDim.x >> 5) {
        float v0 = x[b * 64 + lane], v1 = x[b * 64 + 32 + lane];
        float am = fmaxf(fabsf(v0), fabsf(v1));
        for (int o = 16; o > 0; o >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, o));
        int e = kv_fp8_exp(am);
        row[b * 64 + lane] = kv_fp8_q(v0, e);
        row[b * 64 + 32 + lane] = kv_fp8_q(v1, e);
        if (lane == 0) row[nope + b] = (uint8_t)(e + 127);
    }
    for (size_t i = (size_t)(nope + nb) + threadIdx.x; i < ro; i += blockDim.x) row[i] = 0;
    for (int i = threadIdx.x; i < 64; i += blockDim.x)
        ((uint16_t *)(row + ro))[i] = fd_f32_to_bf16(x[nope + i]);
}

/* the start of row w of a paged KV array (backend.h "Paged growing state"): page table `tab`
 * (device memory), rows of row_bytes */
__device__ __forceinline__ void *kv_page_row(void *const *tab, be_paging pg, int w, size_t row_bytes) {
    return (char *)tab[w / pg.per_page] + pg.off + (size_t)(w % pg.per_page) * row_bytes;
}

#endif
