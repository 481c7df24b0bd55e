/* kv_dev.cuh — device access to KV state stored as f32 or bf16 (backend.h "KV state storage").
 *
 * Why: the attention, the ring write, the compressor and the indexer all read or write the same
 * three arrays (rings, compressed entries, indexer keys) in either dtype; one pair of helpers
 * keeps the rounding (fd_f32_to_bf16: nearest even, as the CPU's fmt_f32_to_bf16) and the
 * widening identical in every kernel. Math never happens here: values cross as f32.
 */
#ifndef DUET_KV_DEV_CUH
#define DUET_KV_DEV_CUH

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

/* the start of row w of a paged KV array (backend.h "Paged growing state"): page table `tab`
 * (device memory), rows of row_bytes */
__device__ __forceinline__ void *kv_page_row(void *const *tab, be_paging pg, int w, size_t row_bytes) {
    return (char *)tab[w / pg.per_page] + pg.off + (size_t)(w % pg.per_page) * row_bytes;
}

#endif
