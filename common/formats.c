/* formats.c — bit-exact codecs for bf16, FP8 e4m3fn, e8m0 and FP4 e2m1 (see formats.h).
 *
 * Why: every consumer (loader, CPU backend, mkmodel, tests) must decode and encode these formats
 * identically on every machine, so everything here works on IEEE-754 bit patterns: no libm
 * (log2/exp2/ldexp), no numeric casts that depend on rounding modes or FMA contraction.
 * Must never allocate, never touch files, never read outside the spans it is given.
 */
#include "common/formats.h"

/* Bit-identical results on every machine need unfused multiply-adds: GCC in ISO C mode never
 * contracts, clang would (-ffp-contract=on) when the target has FMA. */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

#include <string.h>

/* ---- bit helpers ------------------------------------------------------------------------ */

static uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* 2^e as float for e in [-149, 127]; exact, including subnormal powers. */
static float pow2f(int e) {
    if (e > 127) return u2f(0x7F800000u);
    if (e >= -126) return u2f((uint32_t)(e + 127) << 23);
    if (e >= -149) return u2f(1u << (e + 149));
    return 0.0f;
}

/* ceil(log2(y)) for finite y > 0, from the bit pattern (exact for subnormals too). */
static int ceil_log2f(float y) {
    uint32_t u = f2u(y) & 0x7FFFFFFFu;
    int e = (int)(u >> 23);
    uint32_t m = u & 0x7FFFFFu;
    if (e == 0) { /* subnormal: value = m * 2^-149 */
        int hi = 31 - __builtin_clz(m);
        return -149 + hi + ((m & (m - 1)) ? 1 : 0);
    }
    return e - 127 + (m ? 1 : 0);
}

/* Round a float in [0, 2^22] to the nearest integer, ties to even (current FP env is RNE). */
static float rne_int(float x) {
    volatile float big = 8388608.0f; /* 2^23: adding it drops the fraction with RNE */
    float t = x + big;
    return t - big;
}

/* ---- scalar codecs ---------------------------------------------------------------------- */

float fmt_bf16_to_f32(uint16_t b) { return u2f((uint32_t)b << 16); }

uint16_t fmt_f32_to_bf16(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float fmt_e4m3_to_f32(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80) << 24;
    int e = (b >> 3) & 0xF, m = b & 7;
    if (e == 15 && m == 7) return u2f(sign | 0x7FC00000u);
    if (e == 0) { /* subnormal: m/8 * 2^-6 = m * 2^-9, exact */
        float v = (float)m * pow2f(-9);
        return sign ? -v : v;
    }
    return u2f(sign | ((uint32_t)(e - 7 + 127) << 23) | ((uint32_t)m << 20));
}

uint8_t fmt_f32_to_e4m3(float f) {
    uint32_t u = f2u(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return 0x7F;
    if (a >= 0x43E00000u) return sign | 0x7E; /* >= 448 (and inf): saturate */
    if (a < 0x3C800000u) {                    /* < 2^-6: subnormal grid of 2^-9 */
        float q = rne_int(u2f(a) * 512.0f);   /* exact scaling, 0..8 */
        return sign | (uint8_t)(int)q;        /* 8 encodes 2^-6 (e=1, m=0) */
    }
    uint32_t r = (a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20; /* RNE to 3 mantissa bits */
    r -= 120u << 3;                                       /* rebias 127 -> 7 */
    if (r > 0x7E) r = 0x7E;
    return sign | (uint8_t)r;
}

float fmt_e8m0_to_f32(uint8_t b) {
    if (b == 0xFF) return u2f(0x7FC00000u);
    if (b == 0) return u2f(0x00400000u); /* 2^-127 is a float subnormal */
    return u2f((uint32_t)b << 23);
}

uint8_t fmt_f32_to_e8m0(float f) {
    if (!(f > 0.0f) || f2u(f) >= 0x7F800000u) return 0xFF;
    int e = ceil_log2f(f); /* exact for powers of two; rounds others up */
    if (e < -127) e = -127;
    if (e > 127) return 0xFF;
    return (uint8_t)(e + 127);
}

static const float e2m1_mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

float fmt_e2m1_to_f32(uint8_t nibble) {
    float v = e2m1_mag[nibble & 7];
    return (nibble & 8) ? -v : v;
}

uint8_t fmt_f32_to_e2m1(float f) {
    uint32_t u = f2u(f);
    uint8_t sign = (u >> 31) ? 8 : 0;
    float a = u2f(u & 0x7FFFFFFFu);
    uint8_t c;
    if (a != a) return 0; /* NaN has no FP4 encoding; documented as 0 */
    /* midpoints; ties go to the code with even mantissa (even code) */
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

/* ---- rows ------------------------------------------------------------------------------- */

void fmt_dequant_fp8_row(const uint8_t *w, const uint8_t *scale, int64_t K, int64_t n, int bn,
                         int bk, float *out) {
    int64_t sc = (K + bk - 1) / bk;
    const uint8_t *row = w + n * K;
    const uint8_t *srow = scale + (n / bn) * sc;
    for (int64_t k = 0; k < K; k++) out[k] = fmt_e4m3_to_f32(row[k]) * fmt_e8m0_to_f32(srow[k / bk]);
}

void fmt_dequant_fp4_row(const uint8_t *w, const uint8_t *scale, int64_t K, int64_t n, int bk,
                         float *out) {
    const uint8_t *row = w + n * (K / 2);
    const uint8_t *srow = scale + n * (K / bk);
    for (int64_t k = 0; k < K; k++) {
        uint8_t byte = row[k / 2];
        uint8_t nib = (k & 1) ? (uint8_t)(byte >> 4) : (uint8_t)(byte & 15);
        out[k] = fmt_e2m1_to_f32(nib) * fmt_e8m0_to_f32(srow[k / bk]);
    }
}

void fmt_bf16_to_f32_n(const uint16_t *in, float *out, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = fmt_bf16_to_f32(in[i]);
}

/* ---- quantizers ------------------------------------------------------------------------- */

/* Power-of-two scale exponent for a block with max |x| = amax and format max fmax_inv = 1/max. */
static int scale_exp(float amax, float floor_v, float fmax_inv) {
    if (!(amax >= floor_v)) amax = floor_v; /* also catches NaN */
    if (amax > 3.0e38f) amax = 3.0e38f;
    return ceil_log2f(amax * fmax_inv);
}

static float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

static float absf(float x) { return u2f(f2u(x) & 0x7FFFFFFFu); }

void fmt_quant_fp8_block(const float *w, int64_t N, int64_t K, int bn, int bk, uint8_t *w_out,
                         uint8_t *s_out) {
    int64_t sc = (K + bk - 1) / bk;
    for (int64_t nb = 0; nb < N; nb += bn) {
        int64_t n1 = nb + bn < N ? nb + bn : N;
        for (int64_t kb = 0; kb < K; kb += bk) {
            int64_t k1 = kb + bk < K ? kb + bk : K;
            float amax = 0.0f;
            for (int64_t n = nb; n < n1; n++)
                for (int64_t k = kb; k < k1; k++)
                    if (absf(w[n * K + k]) > amax) amax = absf(w[n * K + k]);
            int e = scale_exp(amax, 1e-4f, 1.0f / 448.0f);
            float inv = pow2f(-e);
            s_out[(nb / bn) * sc + kb / bk] = (uint8_t)(e + 127);
            for (int64_t n = nb; n < n1; n++)
                for (int64_t k = kb; k < k1; k++)
                    w_out[n * K + k] = fmt_f32_to_e4m3(clampf(w[n * K + k] * inv, -448.f, 448.f));
        }
    }
}

void fmt_quant_fp4(const float *w, int64_t N, int64_t K, int bk, uint8_t *w_out, uint8_t *s_out) {
    for (int64_t n = 0; n < N; n++) {
        for (int64_t kb = 0; kb < K; kb += bk) {
            float amax = 0.0f;
            for (int64_t k = kb; k < kb + bk; k++)
                if (absf(w[n * K + k]) > amax) amax = absf(w[n * K + k]);
            int e = scale_exp(amax, 6.0f * pow2f(-126), 1.0f / 6.0f);
            float inv = pow2f(-e);
            s_out[n * (K / bk) + kb / bk] = (uint8_t)(e + 127);
            for (int64_t k = kb; k < kb + bk; k += 2) {
                uint8_t lo = fmt_f32_to_e2m1(clampf(w[n * K + k] * inv, -6.f, 6.f));
                uint8_t hi = fmt_f32_to_e2m1(clampf(w[n * K + k + 1] * inv, -6.f, 6.f));
                w_out[n * (K / 2) + k / 2] = (uint8_t)(lo | (hi << 4));
            }
        }
    }
}

/* ---- FP8 KV rows --------------------------------------------------------------------------- */

int fmt_kv_fp8_ok(int d) { return d > FMT_KV_ROPE && (d - FMT_KV_ROPE) % FMT_KV_BLOCK == 0; }

size_t fmt_kv_fp8_rope_off(int d) {
    size_t nope = (size_t)(d - FMT_KV_ROPE), nb = nope / FMT_KV_BLOCK;
    return (nope + nb + 3) / 4 * 4;
}

size_t fmt_kv_fp8_row_bytes(int d) { return fmt_kv_fp8_rope_off(d) + 2 * FMT_KV_ROPE; }

void fmt_kv_fp8_encode(const float *x, int d, uint8_t *row) {
    int nope = d - FMT_KV_ROPE, nb = nope / FMT_KV_BLOCK;
    size_t ro = fmt_kv_fp8_rope_off(d);
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * FMT_KV_BLOCK;
        float amax = 0.0f;
        for (int i = 0; i < FMT_KV_BLOCK; i++)
            if (absf(xb[i]) > amax) amax = absf(xb[i]);
        int e = scale_exp(amax, 1e-4f, 1.0f / 448.0f);
        float inv = pow2f(-e);
        for (int i = 0; i < FMT_KV_BLOCK; i++)
            row[b * FMT_KV_BLOCK + i] = fmt_f32_to_e4m3(clampf(xb[i] * inv, -448.f, 448.f));
        row[nope + b] = (uint8_t)(e + 127);
    }
    for (size_t i = (size_t)(nope + nb); i < ro; i++) row[i] = 0;
    for (int i = 0; i < FMT_KV_ROPE; i++) {
        uint16_t h = fmt_f32_to_bf16(x[nope + i]);
        memcpy(row + ro + 2 * (size_t)i, &h, 2);
    }
}

void fmt_kv_fp8_decode(const uint8_t *row, int d, float *x) {
    int nope = d - FMT_KV_ROPE;
    size_t ro = fmt_kv_fp8_rope_off(d);
    for (int i = 0; i < nope; i++)
        x[i] = fmt_e4m3_to_f32(row[i]) * pow2f((int)row[nope + i / FMT_KV_BLOCK] - 127);
    for (int i = 0; i < FMT_KV_ROPE; i++) {
        uint16_t h;
        memcpy(&h, row + ro + 2 * (size_t)i, 2);
        x[nope + i] = fmt_bf16_to_f32(h);
    }
}

/* ---- QAT simulation --------------------------------------------------------------------- */

void fmt_act_quant_fp8(float *x, size_t n, int block) {
    for (size_t b0 = 0; b0 < n; b0 += (size_t)block) {
        size_t b1 = b0 + (size_t)block < n ? b0 + (size_t)block : n;
        float amax = 0.0f;
        for (size_t i = b0; i < b1; i++)
            if (absf(x[i]) > amax) amax = absf(x[i]);
        int e = scale_exp(amax, 1e-4f, 1.0f / 448.0f);
        float s = pow2f(e), inv = pow2f(-e);
        for (size_t i = b0; i < b1; i++) {
            float q = fmt_e4m3_to_f32(fmt_f32_to_e4m3(clampf(x[i] * inv, -448.f, 448.f)));
            x[i] = fmt_bf16_to_f32(fmt_f32_to_bf16(q * s));
        }
    }
}

void fmt_fp4_roundtrip(float *x, size_t n, int block) {
    for (size_t b0 = 0; b0 < n; b0 += (size_t)block) {
        size_t b1 = b0 + (size_t)block < n ? b0 + (size_t)block : n;
        float amax = 0.0f;
        for (size_t i = b0; i < b1; i++)
            if (absf(x[i]) > amax) amax = absf(x[i]);
        int e = scale_exp(amax, 6.0f * pow2f(-126), 1.0f / 6.0f);
        float s = pow2f(e), inv = pow2f(-e);
        for (size_t i = b0; i < b1; i++)
            x[i] = fmt_e2m1_to_f32(fmt_f32_to_e2m1(clampf(x[i] * inv, -6.f, 6.f))) * s;
    }
}

void fmt_hadamard(float *x, int n) {
    for (int h = 1; h < n; h <<= 1)
        for (int i = 0; i < n; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    /* 1/sqrt(n) for n = 2^k: 2^(-k/2), times sqrt(1/2) when k is odd (rounded once to float) */
    int k = 0;
    while ((1 << k) < n) k++;
    float scale = (k & 1) ? 0.70710678118654752f * pow2f(-(k - 1) / 2) : pow2f(-k / 2);
    for (int i = 0; i < n; i++) x[i] *= scale;
}
