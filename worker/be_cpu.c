/* be_cpu.c — the CPU backend: the reference implementation of every backend op.
 *
 * Why: every other backend is tested against this one, and CI and the quickstart run on it.
 * Clarity over speed: fp32 everywhere, weights dequantized row by row as they are used (never
 * expanded in memory), accumulation in fp32 (double only where a sum spans a whole row of a
 * norm). Parallelism is a pthread parallel-for over independent rows. Spec sections are cited
 * next to each op. Must never hold per-request state of its own: all state is in the buffers
 * the caller passes.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/formats.h"
#include "worker/backend.h"
#include "worker/pool.h"
#include "worker/worker_sample.h"

typedef struct {
    be base;
    pool *pool;
    size_t cache_left; /* bytes still allowed for dequantized weight copies */
} be_cpu;

/* A weight as stored in the checkpoint (w), or — while the dequantization cache has room —
 * its exact f32 expansion (f32 != NULL, w rewritten to point at it). Both give identical
 * values; the cache only saves re-decoding FP8/FP4 rows on every use. */
struct be_weight {
    ck_weight w;          /* the whole stored tensor (or its f32 expansion when cached) */
    float *f32;
    int64_t r0, c0;       /* origin of this slice in w (0, 0 once cached) */
    int64_t rows, cols;   /* logical shape of the slice */
};

static pool *P(be *b) { return ((be_cpu *)b)->pool; }

/* ======================================================================================== */
/* memory                                                                                   */
/* ======================================================================================== */

static void *cpu_alloc(be *b, size_t bytes) { return xcalloc(1, bytes); }
static void cpu_free(be *b, void *p) { free(p); }
static void cpu_memcpy(be *b, void *dst, const void *src, size_t bytes) {
    if (bytes) memcpy(dst, src, bytes);
}
static void cpu_fill(be *b, float *x, float v, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = v;
}
static void cpu_copy(be *b, float *dst, const float *src, size_t n) {
    memmove(dst, src, n * sizeof *dst);
}

static be_weight *cpu_weight_slice(be *b, const ck_weight *w, int64_t r0, int64_t nr,
                                   int64_t c0, int64_t nc) {
    be_cpu *c = (be_cpu *)b;
    be_weight *bw = xcalloc(1, sizeof *bw);
    bw->w = *w;
    bw->r0 = r0;
    bw->c0 = c0;
    bw->rows = nr;
    bw->cols = nc;
    int whole_f32 = w->kind == CK_PLAIN && w->dtype == ST_F32 && nc == w->cols;
    size_t bytes = (size_t)nr * (size_t)nc * sizeof(float);
    if (!whole_f32 && bytes <= c->cache_left) {
        c->cache_left -= bytes;
        bw->f32 = xmalloc(bytes);
        float *row = xmalloc((size_t)w->cols * sizeof *row);
        for (int64_t r = 0; r < nr; r++) {
            ck_row_f32(w, r0 + r, row);
            memcpy(bw->f32 + r * nc, row + c0, (size_t)nc * sizeof *row);
        }
        free(row);
        bw->w = (ck_weight){.kind = CK_PLAIN, .dtype = ST_F32, .rows = nr, .cols = nc,
                            .data = bw->f32};
        bw->r0 = bw->c0 = 0;
    }
    return bw;
}
static be_weight *cpu_weight(be *b, const ck_weight *w) {
    return cpu_weight_slice(b, w, 0, w->rows, 0, w->cols);
}
static void cpu_weight_free(be *b, be_weight *w) {
    if (!w) return;
    if (w->f32) ((be_cpu *)b)->cache_left += (size_t)w->rows * (size_t)w->cols * sizeof(float);
    free(w->f32);
    free(w);
}

static float *cpu_vector(be *b, const ck_weight *w) {
    size_t n = (size_t)(w->rows * w->cols);
    float *v = xmalloc(n * sizeof *v);
    for (int64_t r = 0; r < w->rows; r++) ck_row_f32(w, r, v + r * w->cols);
    return v;
}

/* Row n of a (sliced) weight: f32 rows are used in place; others are decoded into `buf`
 * ([w->w.cols] floats, the whole stored row). */
static const float *wrow(const be_weight *w, int64_t n, float *buf) {
    const ck_weight *s = &w->w;
    if (s->kind == CK_PLAIN && s->dtype == ST_F32)
        return (const float *)s->data + (w->r0 + n) * s->cols + w->c0;
    ck_row_f32(s, w->r0 + n, buf);
    return buf + w->c0;
}

/* ======================================================================================== */
/* matmul: y[T, N] = x[T, K] · W[row0 : row0+N]ᵀ  (spec §2.1 "quantized linear", dequantized) */
/* ======================================================================================== */

typedef struct {
    const be_weight *w;
    int row0, T, ldx, ldy;
    const float *x;
    float *y;
} mm_ctx;

enum { MM_ROWS = 16 }; /* weight rows dequantized per task */

static void mm_task(void *vctx, int task) {
    mm_ctx *c = vctx;
    int K = (int)c->w->cols, KS = (int)c->w->w.cols;
    float *buf = xmalloc((size_t)KS * MM_ROWS * sizeof *buf);
    const float *rows[MM_ROWS];
    int n0 = task * MM_ROWS;
    int nn = MM_ROWS;
    for (int j = 0; j < nn; j++) rows[j] = wrow(c->w, c->row0 + n0 + j, buf + (size_t)j * KS);
    for (int t = 0; t < c->T; t++) {
        const float *x = c->x + (size_t)t * c->ldx;
        for (int j = 0; j < nn; j++) {
            const float *w = rows[j];
            float acc[8] = {0};
            int k = 0;
            for (; k + 8 <= K; k += 8)
                for (int u = 0; u < 8; u++) acc[u] += w[k + u] * x[k + u];
            float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            for (; k < K; k++) s += w[k] * x[k];
            c->y[(size_t)t * c->ldy + n0 + j] = s;
        }
    }
    free(buf);
}

static void mm_tail(const mm_ctx *c, int n0, int N) {
    int K = (int)c->w->cols;
    float *buf = xmalloc((size_t)c->w->w.cols * sizeof *buf);
    for (int n = n0; n < N; n++) {
        const float *w = wrow(c->w, c->row0 + n, buf);
        for (int t = 0; t < c->T; t++) {
            const float *x = c->x + (size_t)t * c->ldx;
            float s = 0;
            for (int k = 0; k < K; k++) s += w[k] * x[k];
            c->y[(size_t)t * c->ldy + n] = s;
        }
    }
    free(buf);
}

static void cpu_matmul(be *b, const be_weight *W, int row0, int N, const float *x, int ldx,
                       float *y, int ldy, int T) {
    if (T <= 0 || N <= 0) return;
    mm_ctx c = {W, row0, T, ldx, ldy, x, y};
    int tasks = N / MM_ROWS;
    if ((double)N * W->cols * T < 262144.0) /* too small to pay for waking the threads */
        for (int i = 0; i < tasks; i++) mm_task(&c, i);
    else
        pool_for(P(b), tasks, mm_task, &c);
    if (tasks * MM_ROWS < N) mm_tail(&c, tasks * MM_ROWS, N);
}

static void cpu_matmul_xg(be *b, const be_weight *W, int N, const float *x, int ldx, int xg_rows,
                          int xg_stride, float *y, int ldy, int T) {
    for (int g = 0; g * xg_rows < N; g++)
        cpu_matmul(b, W, g * xg_rows, xg_rows, x + (size_t)g * xg_stride, ldx, y + (size_t)g * xg_rows,
                   ldy, T);
}

/* ======================================================================================== */
/* embedding, norms, RoPE                                                                   */
/* ======================================================================================== */

static void cpu_embed(be *b, const be_weight *table, const int32_t *ids, int T, int n_hc,
                      float *h) {
    int D = (int)table->cols;
    float *buf = xmalloc((size_t)table->w.cols * sizeof *buf);
    for (int t = 0; t < T; t++) {
        float *row = h + (size_t)t * n_hc * D;
        memcpy(row, wrow(table, ids[t], buf), (size_t)D * sizeof *row);
        for (int j = 1; j < n_hc; j++) memcpy(row + (size_t)j * D, row, (size_t)D * sizeof *row);
    }
    free(buf);
}

static float inv_rms(const float *x, int n, float eps) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    return (float)(1.0 / sqrt(ss / n + eps));
}

static void cpu_rmsnorm(be *b, const float *x, const float *w, float *y, int T, int n,
                        float eps) {
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * n;
        float *yr = y + (size_t)t * n;
        float r = inv_rms(xr, n, eps);
        for (int i = 0; i < n; i++) yr[i] = w[i] * (xr[i] * r);
    }
}

static void cpu_head_rms(be *b, float *x, int rows, int dim, float eps) {
    for (int r = 0; r < rows; r++) {
        float *xr = x + (size_t)r * dim;
        float s = inv_rms(xr, dim, eps);
        for (int i = 0; i < dim; i++) xr[i] *= s;
    }
}

/* spec §2.1: interleaved pairs on the last rope_dims dims; angle = pos * omega_i in fp32 */
static void rope_vec(float *x, int head_dim, int rope_dims, int pos, const float *omega,
                     int inverse) {
    float *r = x + head_dim - rope_dims;
    for (int i = 0; i < rope_dims / 2; i++) {
        float ang = (float)pos * omega[i];
        float c = cosf(ang), s = sinf(ang);
        if (inverse) s = -s;
        float a = r[2 * i], bb = r[2 * i + 1];
        r[2 * i] = a * c - bb * s;
        r[2 * i + 1] = a * s + bb * c;
    }
}

static void cpu_rope(be *b, float *x, int T, int n_heads, int head_dim, int rope_dims,
                     const int32_t *pos, const float *omega, int inverse) {
    for (int t = 0; t < T; t++)
        for (int h = 0; h < n_heads; h++)
            rope_vec(x + ((size_t)t * n_heads + h) * head_dim, head_dim, rope_dims, pos[t],
                     omega, inverse);
}

/* ======================================================================================== */
/* mHC (spec §2.3, §2.6)                                                                     */
/* ======================================================================================== */

static float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

/* mu[k] = r * (fn[k] · flatten(X)) for k < n_mix */
static void mhc_mix(const float *X, const float *fn, int n_mix, int width, float norm_eps,
                    float *mu) {
    float r = inv_rms(X, width, norm_eps);
    for (int k = 0; k < n_mix; k++) {
        const float *f = fn + (size_t)k * width;
        double s = 0;
        for (int i = 0; i < width; i++) s += (double)f[i] * X[i];
        mu[k] = (float)s * r;
    }
}

static void sinkhorn(float *C, int n, int iters, float eps) {
    for (int j = 0; j < n; j++) { /* row softmax + eps */
        float *row = C + j * n, mx = row[0], s = 0;
        for (int k = 1; k < n; k++) mx = row[k] > mx ? row[k] : mx;
        for (int k = 0; k < n; k++) s += (row[k] = expf(row[k] - mx));
        for (int k = 0; k < n; k++) row[k] = row[k] / s + eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0)
            for (int j = 0; j < n; j++) {
                float s = 0;
                for (int k = 0; k < n; k++) s += C[j * n + k];
                for (int k = 0; k < n; k++) C[j * n + k] /= s + eps;
            }
        for (int k = 0; k < n; k++) {
            float s = 0;
            for (int j = 0; j < n; j++) s += C[j * n + k];
            for (int j = 0; j < n; j++) C[j * n + k] /= s + eps;
        }
    }
}

typedef struct {
    const float *h, *fn, *base, *scale;
    int n_hc, D, iters;
    float hc_eps, norm_eps;
    float *u, *post, *comb;
} mhc_ctx;

static void mhc_pre_task(void *vc, int t) {
    const mhc_ctx *c = vc;
    int n = c->n_hc, D = c->D, n_mix = (2 + n) * n;
    const float *X = c->h + (size_t)t * n * D;
    float mu[64 + 16];
    mhc_mix(X, c->fn, n_mix, n * D, c->norm_eps, mu);
    float pre[16];
    for (int j = 0; j < n; j++) {
        pre[j] = sigmoidf(mu[j] * c->scale[0] + c->base[j]) + c->hc_eps;
        c->post[t * n + j] = 2.0f * sigmoidf(mu[n + j] * c->scale[1] + c->base[n + j]);
    }
    float *C = c->comb + (size_t)t * n * n;
    for (int j = 0; j < n * n; j++) C[j] = mu[2 * n + j] * c->scale[2] + c->base[2 * n + j];
    sinkhorn(C, n, c->iters, c->hc_eps);
    float *u = c->u + (size_t)t * D;
    for (int i = 0; i < D; i++) {
        float s = 0;
        for (int j = 0; j < n; j++) s += pre[j] * X[(size_t)j * D + i];
        u[i] = s;
    }
}

static void cpu_mhc_pre(be *b, const float *h, const float *fn, const float *base,
                        const float *scale, int T, int n_hc, int D, int iters, float hc_eps,
                        float norm_eps, float *u, float *post, float *comb) {
    mhc_ctx c = {h, fn, base, scale, n_hc, D, iters, hc_eps, norm_eps, u, post, comb};
    pool_for(P(b), T, mhc_pre_task, &c);
}

static void cpu_mhc_post(be *b, float *h, const float *v, const float *post, const float *comb,
                         int T, int n_hc, int D) {
    int n = n_hc;
    float *tmp = xmalloc((size_t)n * D * sizeof *tmp);
    for (int t = 0; t < T; t++) {
        float *X = h + (size_t)t * n * D;
        const float *C = comb + (size_t)t * n * n, *vt = v + (size_t)t * D;
        for (int k = 0; k < n; k++)
            for (int i = 0; i < D; i++) {
                float s = post[t * n + k] * vt[i];
                for (int j = 0; j < n; j++) s += C[j * n + k] * X[(size_t)j * D + i];
                tmp[(size_t)k * D + i] = s;
            }
        memcpy(X, tmp, (size_t)n * D * sizeof *tmp);
    }
    free(tmp);
}

static void cpu_hc_head(be *b, const float *h, const float *fn, const float *base,
                        const float *scale, int T, int n_hc, int D, float hc_eps,
                        float norm_eps, float *y) {
    int n = n_hc;
    for (int t = 0; t < T; t++) {
        const float *X = h + (size_t)t * n * D;
        float mu[16], pre[16];
        mhc_mix(X, fn, n, n * D, norm_eps, mu);
        for (int j = 0; j < n; j++) pre[j] = sigmoidf(mu[j] * scale[0] + base[j]) + hc_eps;
        for (int i = 0; i < D; i++) {
            float s = 0;
            for (int j = 0; j < n; j++) s += pre[j] * X[(size_t)j * D + i];
            y[(size_t)t * D + i] = s;
        }
    }
}

/* ======================================================================================== */
/* attention with sinks over a key plan (spec §2.4.5)                                        */
/* ======================================================================================== */

typedef struct {
    const be_attn_args *a;
} attn_ctx;

/* Row i ([d] values) of a KV-state array of format fmt (backend.h BE_KV_*) as f32: an f32 row
 * in place, a bf16 or FP8 row widened into buf [d]. */
static const float *kv_row(const void *base, size_t i, int d, int fmt, float *buf) {
    const char *row = (const char *)base + i * be_kv_row_bytes(fmt, d);
    if (fmt == BE_KV_F32) return (const float *)row;
    if (fmt == BE_KV_BF16) fmt_bf16_to_f32_n((const uint16_t *)row, buf, (size_t)d);
    else fmt_kv_fp8_decode((const uint8_t *)row, d, buf);
    return buf;
}

/* Stores x [d] as a row of format fmt at dst. */
static void kv_put(void *dst, const float *x, int d, int fmt) {
    if (fmt == BE_KV_F32) memcpy(dst, x, (size_t)d * sizeof *x);
    else if (fmt == BE_KV_BF16)
        for (int i = 0; i < d; i++) ((uint16_t *)dst)[i] = fmt_f32_to_bf16(x[i]);
    else fmt_kv_fp8_encode(x, d, dst);
}

/* x [d] as a row of format fmt holds it (into buf; an f32 row: x itself) */
static const float *kv_round_row(const float *x, int d, int fmt, float *buf) {
    if (fmt == BE_KV_F32) return x;
    uint8_t row[4096];
    if (be_kv_row_bytes(fmt, d) > sizeof row) abort(); /* rows are <= 1024 values */
    kv_put(row, x, d, fmt);
    return kv_row(row, 0, d, fmt, buf);
}

static void attn_task(void *vc, int job) {
    const be_attn_args *a = ((attn_ctx *)vc)->a;
    int t = job / a->n_heads, h = job % a->n_heads, d = a->head_dim;
    const be_keyplan *p = &a->plan[t];
    const float *q = a->q + ((size_t)t * a->n_heads + h) * d;
    int n_ring = p->ring_hi - p->ring_lo, n_rows = p->row_hi - p->row_lo;
    int n_keys = n_ring + n_rows + p->n_cmp;
    size_t kvz = be_kv_row_bytes(a->kv_fmt, d); /* bytes of one stored key */
    const float **keys = xmalloc((size_t)(n_keys ? n_keys : 1) * sizeof *keys);
    float *s = xmalloc((size_t)(n_keys ? n_keys : 1) * sizeof *s);
    /* bf16/FP8 state: ring and compressed keys widened, this step's rows rounded as the ring
     * will hold them, [n_keys, d] */
    float *wide = a->kv_fmt ? xmalloc(((size_t)n_keys + 1) * d * sizeof *wide) : NULL;
    int k = 0, nw = 0;
    for (int pos = p->ring_lo; pos < p->ring_hi; pos++, nw++)
        keys[k++] = kv_row(p->ring, (size_t)(pos % p->ring_size), d, a->kv_fmt,
                           wide + (size_t)nw * d);
    for (int r = p->row_lo; r < p->row_hi; r++, nw++)
        keys[k++] = kv_round_row(a->kv + (size_t)r * d, d, a->kv_fmt, wide + (size_t)nw * d);
    for (int i = 0; i < p->n_cmp; i++, nw++) {
        int e = a->cmp_idx ? a->cmp_idx[(size_t)t * a->idx_stride + i] : i;
        keys[k++] = kv_row(be_page_row(p->cmp, a->cmp_paging, (size_t)e, kvz), 0, d,
                           a->kv_fmt, wide + (size_t)nw * d);
    }
    float mx = a->sink[h];
    for (int j = 0; j < n_keys; j++) {
        float dot = 0;
        for (int i = 0; i < d; i++) dot += q[i] * keys[j][i];
        s[j] = dot * a->scale;
        if (s[j] > mx) mx = s[j];
    }
    double den = exp((double)a->sink[h] - mx);
    float *o = a->out + ((size_t)t * a->n_heads + h) * d;
    memset(o, 0, (size_t)d * sizeof *o);
    for (int j = 0; j < n_keys; j++) {
        float e = expf(s[j] - mx);
        den += e;
        for (int i = 0; i < d; i++) o[i] += e * keys[j][i];
    }
    float inv = (float)(1.0 / den);
    for (int i = 0; i < d; i++) o[i] *= inv;
    free(keys);
    free(s);
    free(wide);
}

static void cpu_attention(be *b, const be_attn_args *a) {
    attn_ctx c = {a};
    pool_for(P(b), a->T * a->n_heads, attn_task, &c);
}

static void cpu_ring_write(be *b, float *ring, int ring_size, int dim, const float *kv,
                           const int32_t *pos, int T) {
    for (int t = 0; t < T; t++)
        memcpy(ring + (size_t)(pos[t] % ring_size) * dim, kv + (size_t)t * dim,
               (size_t)dim * sizeof *kv);
}

static void cpu_ring_write_bf16(be *b, uint16_t *ring, int ring_size, int dim, const float *kv,
                                const int32_t *pos, int T) {
    for (int t = 0; t < T; t++) {
        uint16_t *dst = ring + (size_t)(pos[t] % ring_size) * dim;
        for (int i = 0; i < dim; i++) dst[i] = fmt_f32_to_bf16(kv[(size_t)t * dim + i]);
    }
}

static void cpu_ring_write_rows(be *b, void *const *rings, int ring_size, int dim,
                                const float *kv, const int32_t *pos, int T, int kv_fmt) {
    size_t rb = be_kv_row_bytes(kv_fmt, dim);
    for (int t = 0; t < T; t++)
        if (rings[t])
            kv_put((char *)rings[t] + (size_t)(pos[t] % ring_size) * rb, kv + (size_t)t * dim,
                   dim, kv_fmt);
}

/* ======================================================================================== */
/* compressor (spec §2.4.3)                                                                  */
/* ======================================================================================== */

static void qat_fp8_nope(float *x, int dim, int nope) {
    for (int i = 0; i + 64 <= nope; i += 64) fmt_act_quant_fp8(x + i, 64, 64);
    (void)dim;
}

static void cpu_compress(be *b, const be_compress_args *a) {
    int m = a->m, c = a->c, d = a->d, cd = c * d;
    float *z = xmalloc((size_t)d * sizeof *z);
    for (int t = 0; t < a->T; t++) {
        int pos = a->pos[t], j = pos % m;
        memcpy(a->cur_a + (size_t)j * cd, a->a + (size_t)t * cd, (size_t)cd * sizeof(float));
        for (int i = 0; i < cd; i++)
            a->cur_g[(size_t)j * cd + i] = a->g[(size_t)t * cd + i] + a->ape[(size_t)j * cd + i];
        if (j != m - 1) continue;
        int w = pos / m;
        for (int ch = 0; ch < d; ch++) {
            /* candidates: c == 1: cur[0..m) ch; c == 2: prev A-halves + cur B-halves */
            float mx = -INFINITY;
            int off = c == 2 ? d : 0;
            for (int r = 0; r < m; r++) {
                float gv = a->cur_g[(size_t)r * cd + off + ch];
                if (gv > mx) mx = gv;
                if (c == 2 && a->prev_g[(size_t)r * d + ch] > mx) mx = a->prev_g[(size_t)r * d + ch];
            }
            double den = 0, num = 0;
            for (int r = 0; r < m; r++) {
                double e = exp((double)a->cur_g[(size_t)r * cd + off + ch] - mx);
                den += e;
                num += e * a->cur_a[(size_t)r * cd + off + ch];
                if (c == 2) {
                    double ep = exp((double)a->prev_g[(size_t)r * d + ch] - mx);
                    den += ep;
                    num += ep * a->prev_a[(size_t)r * d + ch];
                }
            }
            z[ch] = (float)(num / den);
        }
        if (c == 2)
            for (int r = 0; r < m; r++) {
                memcpy(a->prev_a + (size_t)r * d, a->cur_a + (size_t)r * cd, (size_t)d * sizeof(float));
                memcpy(a->prev_g + (size_t)r * d, a->cur_g + (size_t)r * cd, (size_t)d * sizeof(float));
            }
        float r = inv_rms(z, d, a->eps);
        for (int i = 0; i < d; i++) z[i] = a->norm[i] * (z[i] * r);
        rope_vec(z, d, a->rope_dims, w * m, a->omega, 0);
        if (a->fp8_nope_qat) qat_fp8_nope(z, d, d - a->rope_dims);
        if (a->hadamard_fp4_qat) {
            fmt_hadamard(z, d);
            fmt_fp4_roundtrip(z, (size_t)d, 32);
        }
        kv_put(be_page_row(a->entries, a->paging, (size_t)w, be_kv_row_bytes(a->kv_fmt, d)), z,
               d, a->kv_fmt);
    }
    free(z);
}

/* ======================================================================================== */
/* indexer scores and top-k (spec §2.4.4)                                                    */
/* ======================================================================================== */

typedef struct {
    const be_index_args *a;
} idx_ctx;

/* keeps the k largest (score, index) pairs in a min-heap */
static void heap_push(float *hs, int32_t *hi, int *n, int k, float s, int32_t i) {
    if (*n < k) {
        int c = (*n)++;
        while (c > 0) {
            int p = (c - 1) / 2;
            if (hs[p] <= s) break;
            hs[c] = hs[p];
            hi[c] = hi[p];
            c = p;
        }
        hs[c] = s;
        hi[c] = i;
        return;
    }
    if (s <= hs[0]) return;
    int c = 0;
    for (;;) {
        int l = 2 * c + 1, r = l + 1, m = c;
        float ms = s;
        if (l < k && hs[l] < ms) { m = l; ms = hs[l]; }
        if (r < k && hs[r] < ms) { m = r; }
        if (m == c) break;
        hs[c] = hs[m];
        hi[c] = hi[m];
        c = m;
    }
    hs[c] = s;
    hi[c] = i;
}

static void index_task(void *vc, int t) {
    const be_index_args *a = ((idx_ctx *)vc)->a;
    int nv = a->n_visible[t], k = a->topk < nv ? a->topk : nv, hd = a->head_dim;
    float *hs = xmalloc((size_t)(k ? k : 1) * sizeof *hs);
    int32_t *out = a->idx + (size_t)t * a->topk;
    int n = 0;
    const float *q = a->q + (size_t)t * a->n_heads * hd, *w = a->w + (size_t)t * a->n_heads;
    float *wide = a->kv_fmt ? xmalloc((size_t)hd * sizeof *wide) : NULL;
    for (int e = 0; e < nv; e++) {
        const void *row = be_page_row(a->row_keys ? a->row_keys[t] : a->keys, a->paging,
                                      (size_t)e, be_kv_row_bytes(a->kv_fmt, hd));
        const float *key = kv_row(row, 0, hd, a->kv_fmt, wide);
        float score = 0;
        for (int g = 0; g < a->n_heads; g++) {
            float dot = 0;
            for (int i = 0; i < hd; i++) dot += q[(size_t)g * hd + i] * key[i];
            score += w[g] * (dot > 0 ? dot : 0);
        }
        heap_push(hs, out, &n, k, score, e);
    }
    free(hs);
    free(wide);
}

static void cpu_index_topk(be *b, const be_index_args *a) {
    idx_ctx c = {a};
    pool_for(P(b), a->T, index_task, &c);
}

/* ======================================================================================== */
/* MoE (spec §2.5)                                                                          */
/* ======================================================================================== */

static float softplusf(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

static void swiglu(float *g, const float *p, int n, float limit, float wgt) {
    for (int i = 0; i < n; i++) {
        float gv = g[i], pv = p[i];
        if (limit > 0) {
            if (gv > limit) gv = limit;
            if (pv > limit) pv = limit;
            if (pv < -limit) pv = -limit;
        }
        g[i] = gv / (1.0f + expf(-gv)) * pv * wgt;
    }
}

/* one expert over the gathered rows xs [n, D]: ys [n, D] = W2(swiglu(W1 xs, W3 xs) * wts) */
static void expert_ffn(be *b, const be_weight *w1, const be_weight *w2, const be_weight *w3,
                       const float *xs, int n, int D, int I, const float *wts, float limit,
                       float *ys) {
    float *g = xmalloc((size_t)n * I * sizeof *g), *p = xmalloc((size_t)n * I * sizeof *p);
    cpu_matmul(b, w1, 0, I, xs, D, g, I, n);
    cpu_matmul(b, w3, 0, I, xs, D, p, I, n);
    for (int r = 0; r < n; r++)
        swiglu(g + (size_t)r * I, p + (size_t)r * I, I, limit, wts ? wts[r] : 1.0f);
    cpu_matmul(b, w2, 0, D, g, I, ys, D, n);
    free(g);
    free(p);
}

static void cpu_moe(be *b, const be_moe_layer *L, const float *x, const int32_t *ids, int T,
                    float *out) {
    int E = L->n_experts, K = L->top_k, D = L->hidden, I = L->inter;
    float *logits = xmalloc((size_t)T * E * sizeof *logits);
    cpu_matmul(b, L->gate, 0, E, x, D, logits, E, T);
    int32_t *sel = xmalloc((size_t)T * K * sizeof *sel);
    float *wsel = xmalloc((size_t)T * K * sizeof *wsel);
    for (int t = 0; t < T; t++) {
        float *lt = logits + (size_t)t * E;
        for (int e = 0; e < E; e++) lt[e] = sqrtf(softplusf(lt[e]));
        int32_t *st = sel + (size_t)t * K;
        if (L->tid2eid) {
            for (int k = 0; k < K; k++) st[k] = (int32_t)L->tid2eid[(size_t)ids[t] * K + k];
        } else { /* top-K of score + bias; ties: lowest expert id first */
            for (int k = 0; k < K; k++) {
                int best = -1;
                float bs = -INFINITY;
                for (int e = 0; e < E; e++) {
                    int used = 0;
                    for (int q = 0; q < k; q++) used |= st[q] == e;
                    float v = lt[e] + (L->bias ? L->bias[e] : 0.0f);
                    if (!used && (best < 0 || v > bs)) { best = e; bs = v; }
                }
                st[k] = best;
            }
        }
        float sum = 0;
        for (int k = 0; k < K; k++) sum += lt[st[k]];
        for (int k = 0; k < K; k++)
            wsel[(size_t)t * K + k] =
                (L->norm_topk ? lt[st[k]] / (sum + 1e-20f) : lt[st[k]]) * L->route_scale;
    }
    memset(out, 0, (size_t)T * D * sizeof *out);
    float *xs = xmalloc((size_t)T * D * sizeof *xs), *ys = xmalloc((size_t)T * D * sizeof *ys);
    float *wts = xmalloc((size_t)T * sizeof *wts);
    int *rows = xmalloc((size_t)T * sizeof *rows);
    for (int e = 0; e < E; e++) {
        if (!L->w1[e]) continue; /* another rank's expert */
        int n = 0;
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++)
                if (sel[(size_t)t * K + k] == e) {
                    rows[n] = t;
                    wts[n] = wsel[(size_t)t * K + k];
                    memcpy(xs + (size_t)n * D, x + (size_t)t * D, (size_t)D * sizeof *xs);
                    n++;
                }
        if (!n) continue;
        expert_ffn(b, L->w1[e], L->w2[e], L->w3[e], xs, n, D, I, wts, L->swiglu_limit, ys);
        for (int r = 0; r < n; r++)
            for (int i = 0; i < D; i++) out[(size_t)rows[r] * D + i] += ys[(size_t)r * D + i];
    }
    if (L->s1) {
        expert_ffn(b, L->s1, L->s2, L->s3, x, T, D, L->shared_inter ? L->shared_inter : I, NULL,
                   L->swiglu_limit, ys);
        for (size_t i = 0; i < (size_t)T * D; i++) out[i] += ys[i];
    }
    free(logits);
    free(sel);
    free(wsel);
    free(xs);
    free(ys);
    free(wts);
    free(rows);
}

/* ======================================================================================== */
/* elementwise                                                                              */
/* ======================================================================================== */

static void cpu_scale_rows(be *b, float *x, int T, int n, float s) {
    for (size_t i = 0; i < (size_t)T * n; i++) x[i] *= s;
}
static void cpu_add(be *b, float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}
static void cpu_fp8_qat(be *b, float *x, int T, int dim, int nope, int block) {
    for (int t = 0; t < T; t++)
        for (int i = 0; i + block <= nope; i += block)
            fmt_act_quant_fp8(x + (size_t)t * dim + i, (size_t)block, block);
}
static void cpu_hadamard_fp4(be *b, float *x, int rows, int dim) {
    for (int r = 0; r < rows; r++) {
        fmt_hadamard(x + (size_t)r * dim, dim);
        fmt_fp4_roundtrip(x + (size_t)r * dim, (size_t)dim, 32);
    }
}

static void cpu_destroy(be *b) {
    pool_destroy(P(b));
    free(b);
}

static void cpu_mhc_norm(be *b, int head_mode, const float *h, const float *fn,
                         const float *base, const float *scale, int T, int n_hc, int D, int iters,
                         float hc_eps, float norm_eps, const float *norm_w, float *x, float *post,
                         float *comb) {
    float *u = xmalloc((size_t)T * D * sizeof *u);
    if (head_mode) cpu_hc_head(b, h, fn, base, scale, T, n_hc, D, hc_eps, norm_eps, u);
    else cpu_mhc_pre(b, h, fn, base, scale, T, n_hc, D, iters, hc_eps, norm_eps, u, post, comb);
    cpu_rmsnorm(b, u, norm_w, x, T, D, norm_eps);
    free(u);
}

/* ---- sampling: the reference of the `sample` op (backend.h be_sample_req) ----------------- */

/* The cut and the draw over the ranked candidates: w[P] their weights exp((v - max) / T),
 * descending, pre[P] the inclusive prefix sums; n = the candidates kept by top_k (may exceed
 * P), tot_all = the weight of the whole vocabulary (used when n == V). Returns the rank drawn,
 * or -1 when a cut or the walk needs a rank >= P (fallback). The device op makes the same
 * decisions from its own (parallel) sums. */
static int cut_and_draw(const double *w, const double *pre, int P, int n, int V, double tot_all,
                        const be_sample_req *q) {
    int j;
    if (q->top_p > 0 && q->top_p < 1) {
        if (n > P && n != V) return -1;
        double thr = q->top_p * (n <= P ? pre[n - 1] : tot_all);
        for (j = 0; j < n && j < P && pre[j] < thr; j++) {}
        if (j < n && j < P) n = j + 1;
        else if (n > P) return -1;
    }
    if (q->min_p > 0 && q->min_p <= 1) {
        for (j = 1; j < n && j < P && w[j] >= q->min_p; j++) {}
        if (j < n && j < P) n = j;
        else if (n > P) return -1;
    }
    if (n > P && n != V) return -1;
    double u = q->u01 * (n <= P ? pre[n - 1] : tot_all);
    for (j = 0; j < n && j < P; j++)
        if (u < pre[j]) return j;
    return n <= P ? n - 1 : -1;
}

/* One request: rank the first max(P, n_top) candidates, logprobs against the raw log-softmax
 * normaliser, then greedy or cut and draw. Sums in double, sequentially. */
static void sample_row(const float *x, int V, const be_sample_req *q, be_sample_res *r) {
    int32_t ids[BE_SAMPLE_RANKED];
    float v[BE_SAMPLE_RANKED];
    double w[BE_SAMPLE_RANKED], pre[BE_SAMPLE_RANKED];
    int greedy = !(q->temperature >= 1e-5f);
    int n = q->top_k > 0 && q->top_k < V ? q->top_k : V;
    int P = n < BE_SAMPLE_RANKED ? n : BE_SAMPLE_RANKED;
    int nt = q->n_top < V ? q->n_top : V;
    nt = nt < 0 ? 0 : nt > BE_SAMPLE_MAX_TOP ? BE_SAMPLE_MAX_TOP : nt;
    int k = greedy ? 1 : P;
    worker_sample_rank(x, V, k > nt ? k : nt, ids, v);
    double mx = v[0], lse = 0, z = 0, tot_all = 0;
    if (isfinite(mx)) {
        for (int i = 0; i < V; i++) z += exp((double)(isnan(x[i]) ? -INFINITY : x[i]) - mx);
        lse = mx + log(z);
    }
    *r = (be_sample_res){.id = ids[0], .n_top = nt};
    for (int i = 0; i < nt; i++) r->top_ids[i] = ids[i], r->top_logprobs[i] = (float)(v[i] - lse);
    if (!greedy && isfinite(mx)) {
        double T = q->temperature;
        if (n == V && n > P)
            for (int i = 0; i < V; i++)
                tot_all += exp(((double)(isnan(x[i]) ? -INFINITY : x[i]) - mx) / T);
        for (int i = 0; i < P; i++) {
            w[i] = exp(((double)v[i] - mx) / T);
            pre[i] = (i ? pre[i - 1] : 0) + w[i];
        }
        int j = cut_and_draw(w, pre, P, n, V, tot_all, q);
        if (j < 0) r->fallback = 1;
        else r->id = ids[j];
    }
    float xc = isnan(x[r->id]) ? -INFINITY : x[r->id];
    r->logprob = (float)((double)xc - lse);
}

typedef struct {
    const float *logits;
    int V;
    const be_sample_req *req;
    be_sample_res *res;
} sample_ctx;

static void sample_task(void *ctx, int i) {
    sample_ctx *c = ctx;
    sample_row(c->logits + (size_t)c->req[i].row * c->V, c->V, &c->req[i], &c->res[i]);
}

static void cpu_sample(be *b, const float *logits, int V, int n, const be_sample_req *req,
                       be_sample_res *res) {
    sample_ctx c = {logits, V, req, res};
    pool_for(P(b), n, sample_task, &c);
}

static const struct be_ops cpu_ops = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_memcpy,
    .download = cpu_memcpy,
    .fill = cpu_fill,
    .copy = cpu_copy,
    .weight = cpu_weight,
    .weight_slice = cpu_weight_slice,
    .weight_free = cpu_weight_free,
    .vector = cpu_vector,
    .matmul = cpu_matmul,
    .matmul_xg = cpu_matmul_xg,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .head_rms = cpu_head_rms,
    .rope = cpu_rope,
    .mhc_pre = cpu_mhc_pre,
    .mhc_post = cpu_mhc_post,
    .hc_head = cpu_hc_head,
    .attention = cpu_attention,
    .ring_write = cpu_ring_write,
    .ring_write_bf16 = cpu_ring_write_bf16,
    .ring_write_rows = cpu_ring_write_rows,
    .compress = cpu_compress,
    .index_topk = cpu_index_topk,
    .moe = cpu_moe,
    .scale_rows = cpu_scale_rows,
    .add = cpu_add,
    .fp8_qat = cpu_fp8_qat,
    .hadamard_fp4 = cpu_hadamard_fp4,
    .destroy = cpu_destroy,
    .mhc_norm = cpu_mhc_norm,
    .sample = cpu_sample,
};

be *be_cpu_create(int n_threads) {
    be_cpu *c = xcalloc(1, sizeof *c);
    c->base.ops = &cpu_ops;
    c->pool = pool_create(n_threads);
    const char *mb = getenv("DUET_CPU_DEQUANT_CACHE_MB");
    c->cache_left = (size_t)(mb ? atol(mb) : 2048) << 20;
    c->base.n_threads = pool_size(c->pool);
    return &c->base;
}
