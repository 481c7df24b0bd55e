/* fmt_dev.cuh — device twins of common/formats.c: FP8/FP4/e8m0/bf16 codecs and QAT round trips.
 *
 * Why: the CUDA backend must quantize exactly like the CPU reference (compressor QAT, indexer
 * keys), so these are line-by-line ports of formats.c working on IEEE-754 bit patterns; the
 * only difference is rintf() (round-to-nearest-even on the device) in place of the 2^23 trick.
 * Must never allocate or touch global state; every function is a pure __device__ function.
 */
#ifndef DUET_FMT_DEV_CUH
#define DUET_FMT_DEV_CUH

#include <stdint.h>

__device__ __forceinline__ uint32_t fd_f2u(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float fd_u2f(uint32_t u) { return __uint_as_float(u); }

__device__ __forceinline__ float fd_pow2f(int e) {
    if (e > 127) return fd_u2f(0x7F800000u);
    if (e >= -126) return fd_u2f((uint32_t)(e + 127) << 23);
    if (e >= -149) return fd_u2f(1u << (e + 149));
    return 0.0f;
}

__device__ __forceinline__ int fd_ceil_log2f(float y) {
    uint32_t u = fd_f2u(y) & 0x7FFFFFFFu;
    int e = (int)(u >> 23);
    uint32_t m = u & 0x7FFFFFu;
    if (e == 0) {
        int hi = 31 - __clz(m);
        return -149 + hi + ((m & (m - 1)) ? 1 : 0);
    }
    return e - 127 + (m ? 1 : 0);
}

__device__ __forceinline__ float fd_bf16_to_f32(uint16_t b) { return fd_u2f((uint32_t)b << 16); }

__device__ __forceinline__ uint16_t fd_f32_to_bf16(float f) {
    uint32_t u = fd_f2u(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

__device__ __forceinline__ float fd_e4m3_to_f32(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80) << 24;
    int e = (b >> 3) & 0xF, m = b & 7;
    if (e == 15 && m == 7) return fd_u2f(sign | 0x7FC00000u);
    if (e == 0) {
        float v = (float)m * fd_pow2f(-9);
        return sign ? -v : v;
    }
    return fd_u2f(sign | ((uint32_t)(e - 7 + 127) << 23) | ((uint32_t)m << 20));
}

__device__ __forceinline__ uint8_t fd_f32_to_e4m3(float f) {
    uint32_t u = fd_f2u(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return 0x7F;
    if (a >= 0x43E00000u) return sign | 0x7E;
    if (a < 0x3C800000u) {
        float q = rintf(__fmul_rn(fd_u2f(a), 512.0f));
        return sign | (uint8_t)(int)q;
    }
    uint32_t r = (a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
    r -= 120u << 3;
    if (r > 0x7E) r = 0x7E;
    return sign | (uint8_t)r;
}

__device__ __forceinline__ float fd_e8m0_to_f32(uint8_t b) {
    if (b == 0xFF) return fd_u2f(0x7FC00000u);
    if (b == 0) return fd_u2f(0x00400000u);
    return fd_u2f((uint32_t)b << 23);
}

/* e2m1 nibble -> float, by bits: exp = (nib>>1)&3, man = nib&1, sign = nib&8 */
__device__ __forceinline__ float fd_e2m1_to_f32(uint32_t nib) {
    uint32_t e = (nib >> 1) & 3u, m = nib & 1u;
    uint32_t bits = e ? (((e + 126u) << 23) | (m << 22)) : (m ? 0x3F000000u : 0u);
    return fd_u2f(bits | ((nib & 8u) << 28));
}

__device__ __forceinline__ uint8_t fd_f32_to_e2m1(float f) {
    uint32_t u = fd_f2u(f);
    uint8_t sign = (u >> 31) ? 8 : 0;
    float a = fd_u2f(u & 0x7FFFFFFFu);
    uint8_t c;
    if (a != a) return 0;
    if (a <= 0.25f) c = 0;
    else if (a < 0.75f) c = 1;
    else if (a <= 1.25f) c = 2;
    else if (a < 1.75f) c = 3;
    else if (a <= 2.5f) c = 4;
    else if (a < 3.5f) c = 5;
    else if (a <= 5.0f) c = 6;
    else c = 7;
    return sign | c;
}

__device__ __forceinline__ int fd_scale_exp(float amax, float floor_v, float fmax_inv) {
    if (!(amax >= floor_v)) amax = floor_v;
    if (amax > 3.0e38f) amax = 3.0e38f;
    return fd_ceil_log2f(__fmul_rn(amax, fmax_inv));
}

__device__ __forceinline__ float fd_clampf(float x, float lo, float hi) {
    return x < lo ? lo : (x > hi ? hi : x);
}

/* FP8 act-quant round trip of x[0..n) (one block), as fmt_act_quant_fp8 */
__device__ __forceinline__ void fd_act_quant_fp8(float *x, int n) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    int e = fd_scale_exp(amax, 1e-4f, 1.0f / 448.0f);
    float s = fd_pow2f(e), inv = fd_pow2f(-e);
    for (int i = 0; i < n; i++) {
        float q = fd_e4m3_to_f32(fd_f32_to_e4m3(fd_clampf(__fmul_rn(x[i], inv), -448.f, 448.f)));
        x[i] = fd_bf16_to_f32(fd_f32_to_bf16(__fmul_rn(q, s)));
    }
}

/* FP4 round trip of x[0..n) (one block), as fmt_fp4_roundtrip */
__device__ __forceinline__ void fd_fp4_roundtrip(float *x, int n) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    int e = fd_scale_exp(amax, __fmul_rn(6.0f, fd_pow2f(-126)), 1.0f / 6.0f);
    float s = fd_pow2f(e), inv = fd_pow2f(-e);
    for (int i = 0; i < n; i++)
        x[i] = __fmul_rn(fd_e2m1_to_f32(fd_f32_to_e2m1(fd_clampf(__fmul_rn(x[i], inv), -6.f, 6.f))), s);
}

/* 1/sqrt(n) for n = 2^k exactly as fmt_hadamard rounds it */
__device__ __forceinline__ float fd_hadamard_scale(int n) {
    int k = 0;
    while ((1 << k) < n) k++;
    return (k & 1) ? __fmul_rn(0.70710678118654752f, fd_pow2f(-(k - 1) / 2)) : fd_pow2f(-k / 2);
}

/* In-place Sylvester WHT of x[0..n) in shared memory by the whole block (n pow2, n/2 <= threads
 * not required: strided). Same butterflies and order of operations as fmt_hadamard. */
__device__ __forceinline__ void fd_hadamard_block(float *x, int n) {
    for (int h = 1; h < n; h <<= 1) {
        __syncthreads();
        for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
            int j = (i / h) * 2 * h + i % h;
            float a = x[j], b = x[j + h];
            x[j] = __fadd_rn(a, b);
            x[j + h] = __fsub_rn(a, b);
        }
    }
    __syncthreads();
    float sc = fd_hadamard_scale(n);
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = __fmul_rn(x[i], sc);
    __syncthreads();
}

#endif
