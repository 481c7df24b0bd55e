/* test_formats.c — bit-exactness of common/formats against independent formulas.
 *
 * Why: every weight and every QAT round trip of the engine goes through these codecs; a single
 * wrong rounding or sign would silently shift every logit. Each check compares with a reference
 * computed a different way (ldexp formulas, brute-force nearest search), never with the code
 * under test. Must never depend on the machine's FP environment beyond IEEE-754 defaults.
 */
#include "common/formats.h"

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- independent references ---------------------------------------------------------------- */

static double ref_e4m3(int b) {
    int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    if (e == 15 && m == 7) return NAN;
    double v = e == 0 ? ldexp(m / 8.0, -6) : ldexp(1.0 + m / 8.0, e - 7);
    return s ? -v : v;
}

/* Nearest finite e4m3 code to a (>= 0), ties to the even code (even mantissa). */
static int brute_e4m3(double a) {
    int best = 0;
    double bd = INFINITY;
    for (int c = 0; c <= 0x7E; c++) {
        double d = fabs(ref_e4m3(c) - a);
        if (d < bd || (d == bd && (c & 1) == 0)) {
            bd = d;
            best = c;
        }
    }
    return best;
}

/* ---- FP8 e4m3 ---------------------------------------------------------------------------- */

START_TEST(e4m3_decode_every_byte) {
    for (int b = 0; b < 256; b++) {
        double r = ref_e4m3(b);
        float f = fmt_e4m3_to_f32((uint8_t)b);
        if (isnan(r)) {
            ck_assert_msg(isnan(f), "byte 0x%02X must decode to NaN", b);
            continue;
        }
        ck_assert_msg((double)f == r, "byte 0x%02X: got %g want %g", b, f, r);
        ck_assert_int_eq(signbit(f) != 0, (b & 0x80) != 0);
    }
    ck_assert(isnan(fmt_e4m3_to_f32(0x7F)) && isnan(fmt_e4m3_to_f32(0xFF)));
    ck_assert(fmt_e4m3_to_f32(0x7E) == 448.0f && fmt_e4m3_to_f32(0xFE) == -448.0f);
    ck_assert(fmt_e4m3_to_f32(0x01) == ldexpf(1.0f, -9));
}
END_TEST

START_TEST(e4m3_encode_roundtrip_and_rne) {
    for (int b = 0; b < 256; b++) {
        if (b == 0x7F || b == 0xFF) continue;
        ck_assert_int_eq(fmt_f32_to_e4m3(fmt_e4m3_to_f32((uint8_t)b)), b);
    }
    ck_assert_int_eq(fmt_f32_to_e4m3(1.0625f), 0x38); /* tie between 1 and 1.125 -> even */
    ck_assert_int_eq(fmt_f32_to_e4m3(1.1875f), 0x3A); /* tie between 1.125 and 1.25 -> even */
    ck_assert_int_eq(fmt_f32_to_e4m3(ldexpf(1.0f, -10)), 0x00);     /* half min subnormal */
    ck_assert_int_eq(fmt_f32_to_e4m3(3 * ldexpf(1.0f, -10)), 0x02); /* 1.5 ulp -> 2 */
    ck_assert_int_eq(fmt_f32_to_e4m3(1000.0f), 0x7E);
    ck_assert_int_eq(fmt_f32_to_e4m3(-1000.0f), 0xFE);
    ck_assert_int_eq(fmt_f32_to_e4m3(INFINITY), 0x7E);
    ck_assert_int_eq(fmt_f32_to_e4m3(NAN), 0x7F);
    ck_assert_int_eq(fmt_f32_to_e4m3(-0.0f), 0x80);
    /* every midpoint between neighbours and random values vs brute-force nearest */
    for (int c = 0; c < 0x7E; c++) {
        double mid = (ref_e4m3(c) + ref_e4m3(c + 1)) / 2;
        ck_assert_int_eq(fmt_f32_to_e4m3((float)mid), brute_e4m3(mid));
        ck_assert_int_eq(fmt_f32_to_e4m3(-(float)mid), 0x80 | brute_e4m3(mid));
    }
    srand(1);
    for (int i = 0; i < 20000; i++) {
        float a = ldexpf((float)rand() / (float)RAND_MAX, rand() % 20 - 11);
        if (a > 448) continue;
        ck_assert_msg(fmt_f32_to_e4m3(a) == brute_e4m3(a), "value %a", (double)a);
    }
}
END_TEST

/* ---- e8m0, bf16, e2m1 ---------------------------------------------------------------------- */

START_TEST(e8m0_all) {
    ck_assert(isnan(fmt_e8m0_to_f32(0xFF)));
    for (int b = 0; b < 255; b++) {
        float f = fmt_e8m0_to_f32((uint8_t)b);
        ck_assert_msg((double)f == ldexp(1.0, b - 127), "byte %d", b);
        ck_assert_int_eq(fmt_f32_to_e8m0(f), b);
    }
    ck_assert(fmt_e8m0_to_f32(0) == ldexpf(1.0f, -127)); /* float subnormal */
    ck_assert(fmt_e8m0_to_f32(254) == ldexpf(1.0f, 127));
    ck_assert(fmt_e8m0_to_f32(127) == 1.0f);
}
END_TEST

START_TEST(bf16_rne) {
    ck_assert_uint_eq(fmt_f32_to_bf16(1.0f), 0x3F80);
    ck_assert_uint_eq(fmt_f32_to_bf16(1.0f + ldexpf(1, -8)), 0x3F80);     /* tie -> even */
    ck_assert_uint_eq(fmt_f32_to_bf16(1.0f + 3 * ldexpf(1, -8)), 0x3F82); /* tie -> even (up) */
    ck_assert_uint_eq(fmt_f32_to_bf16(1.0f + ldexpf(1, -8) + ldexpf(1, -20)), 0x3F81);
    ck_assert_uint_eq(fmt_f32_to_bf16(-2.0f), 0xC000);
    ck_assert(isnan(fmt_bf16_to_f32(fmt_f32_to_bf16(NAN))));
    ck_assert(fmt_bf16_to_f32(0x3F81) == 1.0f + ldexpf(1, -7));
    for (uint32_t h = 0; h < 65536; h += 7) { /* bf16 values survive the round trip */
        float f = fmt_bf16_to_f32((uint16_t)h);
        if (!isnan(f)) ck_assert_uint_eq(fmt_f32_to_bf16(f), h);
    }
    uint16_t in[3] = {0x3F80, 0xC000, 0x0000};
    float out[3];
    fmt_bf16_to_f32_n(in, out, 3);
    ck_assert(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0.0f);
}
END_TEST

START_TEST(e2m1_table_and_nibbles) {
    const float tab[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.f, -.5f, -1, -1.5f, -2, -3, -4, -6};
    for (int n = 0; n < 16; n++) {
        ck_assert(fmt_e2m1_to_f32((uint8_t)n) == tab[n]);
        ck_assert_int_eq(signbit(fmt_e2m1_to_f32((uint8_t)n)) != 0, n >= 8);
        ck_assert_int_eq(fmt_f32_to_e2m1(tab[n]), n);
    }
    /* midpoints: ties to the even mantissa */
    ck_assert_int_eq(fmt_f32_to_e2m1(0.25f), 0);
    ck_assert_int_eq(fmt_f32_to_e2m1(0.75f), 2);
    ck_assert_int_eq(fmt_f32_to_e2m1(1.25f), 2);
    ck_assert_int_eq(fmt_f32_to_e2m1(1.75f), 4);
    ck_assert_int_eq(fmt_f32_to_e2m1(2.5f), 4);
    ck_assert_int_eq(fmt_f32_to_e2m1(3.5f), 6);
    ck_assert_int_eq(fmt_f32_to_e2m1(5.0f), 6);
    ck_assert_int_eq(fmt_f32_to_e2m1(-5.5f), 15);
    ck_assert_int_eq(fmt_f32_to_e2m1(100.0f), 7);
    /* packed row: low nibble = even k */
    uint8_t w[2] = {0x21, 0x9F}, s[1] = {128}; /* scale 2 */
    float out[4];
    fmt_dequant_fp4_row(w, s, 4, 0, 4, out);
    ck_assert(out[0] == 1.0f && out[1] == 2.0f && out[2] == -12.0f && out[3] == -1.0f);
}
END_TEST

/* ---- rows and block quantizers ------------------------------------------------------------- */

START_TEST(fp8_block_quant_dequant) {
    enum { N = 130, K = 200 };
    float *w = malloc(sizeof(float) * N * K), row[K];
    uint8_t *q = malloc(N * K), s[2 * 2];
    srand(2);
    for (int i = 0; i < N * K; i++) w[i] = ((float)rand() / (float)RAND_MAX - 0.5f) * 0.3f;
    w[5] = 5.0f; /* block (0,0) amax 5 -> scale 2^ceil(log2(5/448)) = 2^-6 */
    fmt_quant_fp8_block(w, N, K, 128, 128, q, s);
    ck_assert_int_eq(s[0], 127 - 6);
    for (int n = 0; n < N; n++) {
        fmt_dequant_fp8_row(q, s, K, n, 128, 128, row);
        for (int k = 0; k < K; k++) {
            float sc = fmt_e8m0_to_f32(s[(n / 128) * 2 + k / 128]);
            float tol = fmaxf(fabsf(w[n * K + k]) * 0.0625f, sc * ldexpf(1, -9));
            ck_assert_msg(fabsf(row[k] - w[n * K + k]) <= tol, "n %d k %d", n, k);
            ck_assert(row[k] == ref_e4m3(q[n * K + k]) * sc);
        }
    }
    free(w);
    free(q);
}
END_TEST

START_TEST(fp4_quant_roundtrip) {
    float w[64], out[64];
    uint8_t q[32], s[2];
    for (int k = 0; k < 64; k++) w[k] = (float)((k % 16) - 8) * 0.5f; /* multiples of .5 in [-4,3.5] */
    w[63] = 6.0f;                                              /* second block amax 6 -> scale 1 */
    fmt_quant_fp4(w, 1, 64, 32, q, s);
    ck_assert_int_eq(s[1], 127);
    ck_assert_int_eq(q[0] & 15, fmt_f32_to_e2m1(w[0] / fmt_e8m0_to_f32(s[0])));
    ck_assert_int_eq(q[0] >> 4, fmt_f32_to_e2m1(w[1] / fmt_e8m0_to_f32(s[0])));
    fmt_dequant_fp4_row(q, s, 64, 0, 32, out);
    ck_assert(out[63] == 6.0f && out[0] == -4.0f && out[2] == -3.0f);
}
END_TEST

/* ---- QAT simulation ------------------------------------------------------------------------ */

/* FP8 KV rows: nope dims decode to exactly the act_quant round trip (blocks of 64), RoPE dims
 * to their bf16; sizes as vLLM's fp8_ds_mla for d = 512 */
START_TEST(kv_fp8_rows) {
    ck_assert_uint_eq(fmt_kv_fp8_row_bytes(512), 584);
    ck_assert_uint_eq(fmt_kv_fp8_rope_off(512), 456);
    ck_assert_uint_eq(fmt_kv_fp8_row_bytes(128), 196);
    ck_assert(fmt_kv_fp8_ok(512) && fmt_kv_fp8_ok(128));
    ck_assert(!fmt_kv_fp8_ok(64) && !fmt_kv_fp8_ok(100) && !fmt_kv_fp8_ok(0));
    uint32_t seed = 12345;
    for (int rep = 0; rep < 200; rep++) {
        int d = rep % 2 ? 512 : 128;
        float x[512], ref[512], got[512];
        uint8_t row[584];
        /* magnitudes from 1e-7 to 1e6, blocks of very different scale, exact zeros */
        double mag = pow(10.0, (rep % 14) - 7);
        for (int i = 0; i < d; i++) {
            seed = seed * 1664525u + 1013904223u;
            x[i] = (float)(((double)(seed >> 8) / 16777216.0 - 0.5) * mag * (1 + i / 64));
            if (rep % 7 == 0 && i % 5 == 0) x[i] = 0.0f;
        }
        memcpy(ref, x, sizeof x);
        fmt_act_quant_fp8(ref, (size_t)d - FMT_KV_ROPE, FMT_KV_BLOCK);
        for (int i = d - FMT_KV_ROPE; i < d; i++) ref[i] = fmt_bf16_to_f32(fmt_f32_to_bf16(x[i]));
        fmt_kv_fp8_encode(x, d, row);
        fmt_kv_fp8_decode(row, d, got);
        for (int i = 0; i < d; i++)
            ck_assert_msg(!memcmp(&got[i], &ref[i], 4), "d %d rep %d dim %d: %.9g != %.9g", d,
                          rep, i, got[i], ref[i]);
        for (size_t i = (size_t)(d - 64) + (size_t)(d - 64) / 64; i < fmt_kv_fp8_rope_off(d); i++)
            ck_assert_uint_eq(row[i], 0); /* padding is zero: equal rows are equal bytes */
    }
}
END_TEST

START_TEST(act_quant_examples) {
    float x[4] = {3.0f, -0.1f, 0.0f, 1e-6f};
    fmt_act_quant_fp8(x, 4, 4); /* amax 3 -> scale 2^-7; 3*128 = 384 exact */
    ck_assert(x[0] == 3.0f);
    ck_assert(x[1] == -13.0f / 128.0f); /* -12.8 -> -13 on the step-1 grid of [8, 16) */
    ck_assert(x[2] == 0.0f);
    ck_assert(x[3] == 0.0f); /* 1e-6 * 128 is below half the smallest subnormal 2^-9 */
    float z[8] = {0};
    fmt_act_quant_fp8(z, 8, 4);
    for (int i = 0; i < 8; i++) ck_assert(z[i] == 0.0f);
    float y[32] = {6.0f, 1.0f, 0.3f, -2.9f, 0.25f};
    fmt_fp4_roundtrip(y, 32, 32); /* amax 6 -> scale 1 */
    ck_assert(y[0] == 6.0f && y[1] == 1.0f && y[2] == 0.5f && y[3] == -3.0f && y[4] == 0.0f);
    float v[32] = {12.0f, 5.0f};
    fmt_fp4_roundtrip(v, 32, 32); /* amax 12 -> scale 2; 5/2 = 2.5 ties to 2 */
    ck_assert(v[0] == 12.0f && v[1] == 4.0f);
}
END_TEST

START_TEST(hadamard) {
    float x[128], y[128];
    memset(x, 0, sizeof x);
    x[0] = 1.0f;
    fmt_hadamard(x, 128);
    for (int i = 0; i < 128; i++) ck_assert(x[i] == 0.08838834764831845f);
    srand(3);
    for (int i = 0; i < 128; i++) x[i] = y[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    fmt_hadamard(x, 128);
    float d = 0;
    for (int i = 0; i < 128; i++) d += fabsf(x[i] - y[i]);
    ck_assert(d > 1.0f); /* it did something */
    fmt_hadamard(x, 128);
    for (int i = 0; i < 128; i++) ck_assert_msg(fabsf(x[i] - y[i]) < 1e-6f, "i %d", i);
    float a[4] = {1, 2, 3, 4};
    fmt_hadamard(a, 4); /* [10, -2, -4, 0] / 2 */
    ck_assert(a[0] == 5.0f && a[1] == -1.0f && a[2] == -2.0f && a[3] == 0.0f);
}
END_TEST

int main(void) {
    Suite *s = suite_create("formats");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, e4m3_decode_every_byte);
    tcase_add_test(tc, e4m3_encode_roundtrip_and_rne);
    tcase_add_test(tc, e8m0_all);
    tcase_add_test(tc, bf16_rne);
    tcase_add_test(tc, e2m1_table_and_nibbles);
    tcase_add_test(tc, fp8_block_quant_dequant);
    tcase_add_test(tc, fp4_quant_roundtrip);
    tcase_add_test(tc, act_quant_examples);
    tcase_add_test(tc, kv_fp8_rows);
    tcase_add_test(tc, hadamard);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
