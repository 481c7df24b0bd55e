/* formats.h — the number formats of the DeepSeek-V4 checkpoint and its QAT simulation.
 *
 * Why: FP8 e4m3 weights with e8m0 block scales, packed FP4 (e2m1) experts and bf16 tensors are
 * decoded in many places (loader, CPU backend, tools, tests); doing it once, by bit manipulation
 * and never by numeric casts, keeps every consumer bit-identical. Spec §2.1, §4.2.
 * Never allocates; never touches files.
 */
#ifndef DUET_FORMATS_H
#define DUET_FORMATS_H

#include <stddef.h>
#include <stdint.h>

/* ---- scalar decode ---------------------------------------------------------------------- */
float fmt_bf16_to_f32(uint16_t b);
uint16_t fmt_f32_to_bf16(float f);        /* round-to-nearest-even; NaN stays NaN */
float fmt_e4m3_to_f32(uint8_t b);         /* e4m3fn: bias 7, max 448, 0x7F/0xFF = NaN, no inf */
uint8_t fmt_f32_to_e4m3(float f);         /* RNE, saturates to ±448; NaN -> 0x7F */
float fmt_e8m0_to_f32(uint8_t b);         /* 2^(b-127); 0xFF = NaN */
uint8_t fmt_f32_to_e8m0(float f);         /* exact power of two f>0 -> its byte (f must be 2^k) */
float fmt_e2m1_to_f32(uint8_t nibble);    /* low 4 bits: [0,.5,1,1.5,2,3,4,6] bit3 = sign */
uint8_t fmt_f32_to_e2m1(float f);         /* nearest, ties to even mantissa, clamps to ±6 */

/* ---- whole rows ------------------------------------------------------------------------- */
/* Row n of an FP8 weight [N,K] with e8m0 block scales [ceil(N/bn), ceil(K/bk)] -> out[K] f32. */
void fmt_dequant_fp8_row(const uint8_t *w, const uint8_t *scale, int64_t K, int64_t n,
                         int bn, int bk, float *out);
/* Row n of an FP4 weight (logical [N,K], stored [N,K/2], low nibble = even k) with e8m0 scales
 * [N, K/bk] (bk = 32) -> out[K] f32. */
void fmt_dequant_fp4_row(const uint8_t *w, const uint8_t *scale, int64_t K, int64_t n, int bk,
                         float *out);
void fmt_bf16_to_f32_n(const uint16_t *in, float *out, size_t n);

/* ---- quantizers used by tools/mkmodel (and tests): f32 [N,K] -> stored format ----------- */
/* FP8 e4m3 with e8m0 block scales: scale = 2^ceil(log2(amax/448)) per bn x bk block
 * (amax floor 1e-4 as in act_quant); w_out [N*K] bytes, s_out [ceil(N/bn)*ceil(K/bk)]. */
void fmt_quant_fp8_block(const float *w, int64_t N, int64_t K, int bn, int bk, uint8_t *w_out,
                         uint8_t *s_out);
/* FP4 e2m1 with per-row e8m0 scales over bk columns: scale = 2^ceil(log2(amax/6)),
 * w_out [N*K/2] (low nibble = even k), s_out [N*K/bk]. */
void fmt_quant_fp4(const float *w, int64_t N, int64_t K, int bk, uint8_t *w_out, uint8_t *s_out);

/* ---- FP8 KV rows (the worker's KV dtype fp8; spec §3.1, vLLM's fp8_ds_mla layout) ----------
 * A row of d values whose last FMT_KV_ROPE are RoPE dims (d - FMT_KV_ROPE a positive multiple
 * of 64): the first nope = d - 64 values as e4m3 bytes in blocks of 64, one ue8m0 scale byte per
 * block (2^(byte - 127), chosen as fmt_act_quant_fp8 chooses it), zero padding to a multiple of
 * 4 bytes, then the RoPE dims as bf16. d = 512: 448 + 7 + 1 + 128 = 584 bytes. A decoded nope
 * value equals fmt_act_quant_fp8's round trip of it exactly; a RoPE value is its bf16. */
enum { FMT_KV_ROPE = 64, FMT_KV_BLOCK = 64 };
int fmt_kv_fp8_ok(int d);                                /* d is such a row width */
size_t fmt_kv_fp8_row_bytes(int d);
size_t fmt_kv_fp8_rope_off(int d);                        /* byte offset of the bf16 RoPE dims */
void fmt_kv_fp8_encode(const float *x, int d, uint8_t *row);
void fmt_kv_fp8_decode(const uint8_t *row, int d, float *x);

/* ---- QAT simulation (spec §2.1), in place on f32 ----------------------------------------- */
void fmt_act_quant_fp8(float *x, size_t n, int block);   /* FP8 round trip, pow2 scales */
void fmt_fp4_roundtrip(float *x, size_t n, int block);   /* FP4 round trip, pow2 scales */
void fmt_hadamard(float *x, int n);                      /* Sylvester WHT * 1/sqrt(n), n pow2 */

#endif
