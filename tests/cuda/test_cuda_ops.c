/* test_cuda_ops.c — every CUDA backend op against the CPU backend (the reference), on fresh
 * random inputs.
 *
 * Why: the CPU backend (worker/be_cpu.c) agrees with transformers to ~1.5e-6; every CUDA op must
 * compute the same function on any valid input (ggml's test-backend-ops idea). Each case draws
 * new inputs (seed printed; pass one as argv[1] to replay), poisons outputs with NaN before the
 * op so unwritten elements fail, runs the op on both backends and prints
 *   op | case | error | threshold | PASS/FAIL
 * where error is the normalised error max|gpu - cpu| / max(max|cpu|, 1e-30) over all outputs
 * (a NaN anywhere is an infinite error). Thresholds: 1e-5 for fp32 arithmetic in a different
 * order (matmul, norms, mHC, attention, MoE), 1e-6 for element-wise ops that should be exact
 * up to libm ulps, and for QAT ops (compressor, fp8_qat, hadamard_fp4) a bound that allows
 * a rare one-step flip of a quantised value at a rounding boundary; index_topk counts the rows
 * whose selected set differs from the CPU's beyond a near tie (1e-5 of the row's largest
 * score, by a double reference); the bf16-KV cases (attention, ring_write, compress, index_topk with
 * bf16 rings, entries and keys) and the FP8-KV cases (FP8 rings and entries) use the same
 * thresholds, except compress (one bf16 / e4m3 step at a rounding boundary); MoE with T < 16 (grouped on the device) is also compared bit for bit
 * with the host grouping (DUET_CUDA_MOE_HOST=1); sample compares ids exactly where neither
 * backend fell back (and the fallback flags), logprobs to 1e-5, and prints its time. Plain C without Check: the GPU machine has no libcheck. Exit 0 when
 * every case passes. Must never be registered outside the 'cuda' meson suite (needs a GPU).
 *
 * usage: test_cuda_ops [SEED]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/err.h"
#include "common/formats.h"
#include "kernels/be_cuda.h"
#include "worker/backend.h"

static be *G, *CPU;
static uint64_t rng_s;
static int n_fail, n_pass;

static uint64_t rnd(void) {
    rng_s ^= rng_s << 13;
    rng_s ^= rng_s >> 7;
    rng_s ^= rng_s << 17;
    return rng_s;
}
static float frand(float lo, float hi) {
    return lo + (hi - lo) * (float)((rnd() >> 11) * (1.0 / 9007199254740992.0));
}
static float *rvec(size_t n, float lo, float hi) {
    float *v = xmalloc((n ? n : 1) * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = frand(lo, hi);
    return v;
}

/* device copy of a host array */
static void *dup_dev(const void *h, size_t bytes) {
    void *d = G->ops->alloc(G, bytes);
    G->ops->upload(G, d, h, bytes);
    return d;
}
static float *dev_nan(size_t n) {
    float *d = G->ops->alloc(G, n * sizeof(float));
    G->ops->fill(G, d, NAN, n);
    return d;
}
static float *host_of(const float *d, size_t n) {
    float *h = xmalloc((n ? n : 1) * sizeof *h);
    G->ops->download(G, h, d, n * sizeof *h);
    return h;
}

static double nerr(const float *got, const float *ref, size_t n) {
    double mx = 0, ref_mx = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]) && isfinite(ref[i])) return INFINITY;
        double d = fabs((double)got[i] - ref[i]);
        if (d > mx) mx = d;
        if (fabs(ref[i]) > ref_mx) ref_mx = fabs(ref[i]);
    }
    return mx / (ref_mx > 1e-30 ? ref_mx : 1e-30);
}

static void report(const char *op, const char *cas, double err, double thr) {
    int ok = err <= thr;
    printf("%-14s %-34s %10.3e %9.1e  %s\n", op, cas, err, thr, ok ? "PASS" : "FAIL");
    fflush(stdout);
    if (ok) n_pass++;
    else n_fail++;
}

/* compares a device array with a host reference, frees the device copy */
static double cmp_dev(const float *d, const float *ref, size_t n) {
    float *h = host_of(d, n);
    double e = nerr(h, ref, n);
    free(h);
    return e;
}

/* ---- KV state rows (backend.h "KV state storage": f32, bf16, FP8) ------------------------- */

static const char *kvname(int fmt) { return fmt == BE_KV_BF16 ? " bf16kv" : fmt == BE_KV_FP8 ? " fp8kv" : ""; }

/* host rows [rows, d] of x in format fmt (as both backends store them) */
static void *to_kv(const float *x, int rows, int d, int fmt) {
    size_t rb = be_kv_row_bytes(fmt, d);
    unsigned char *h = xmalloc((rows ? (size_t)rows : 1) * rb);
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * d;
        unsigned char *hr = h + (size_t)r * rb;
        if (fmt == BE_KV_F32) memcpy(hr, xr, rb);
        else if (fmt == BE_KV_BF16)
            for (int i = 0; i < d; i++) ((uint16_t *)hr)[i] = fmt_f32_to_bf16(xr[i]);
        else fmt_kv_fp8_encode(xr, d, hr);
    }
    return h;
}
/* host rows in format fmt widened to f32 [rows, d] */
static float *kv_widen(const void *h, int rows, int d, int fmt) {
    size_t rb = be_kv_row_bytes(fmt, d);
    float *f = xmalloc((rows ? (size_t)rows : 1) * d * sizeof *f);
    for (int r = 0; r < rows; r++) {
        const unsigned char *hr = (const unsigned char *)h + (size_t)r * rb;
        float *fr = f + (size_t)r * d;
        if (fmt == BE_KV_F32) memcpy(fr, hr, rb);
        else if (fmt == BE_KV_BF16) fmt_bf16_to_f32_n((const uint16_t *)hr, fr, (size_t)d);
        else fmt_kv_fp8_decode(hr, d, fr);
    }
    return f;
}
/* normalised error of host KV rows against a host reference of the same format */
static double cmp_host_kv(const void *got, const void *ref, int rows, int d, int fmt) {
    float *a = kv_widen(got, rows, d, fmt), *b = kv_widen(ref, rows, d, fmt);
    double e = nerr(a, b, (size_t)rows * d);
    free(a);
    free(b);
    return e;
}
/* device KV rows against the host reference of the same format */
static double cmp_kv(const void *dv, const void *ref, int rows, int d, int fmt) {
    size_t bytes = (size_t)rows * be_kv_row_bytes(fmt, d);
    void *h = xmalloc(bytes ? bytes : 1);
    G->ops->download(G, h, dv, bytes);
    double e = cmp_host_kv(h, ref, rows, d, fmt);
    free(h);
    return e;
}

/* ---- paged KV arrays (backend.h "Paged growing state") ------------------------------------ */

/* A [n, row_bytes] KV array paged `per` rows to a page in one backend's memory: every page
 * starts its rows `off` bytes in (another layer's rows would sit before them), pages are laid
 * out in reverse order of the blocks they hold, and the page table is in that backend's memory
 * (on the CPU backend, host memory). */
typedef struct {
    be *b;
    char *buf;
    void **tab;
    be_paging pg;
    int n_pages;
    size_t rowb, page_bytes;
} paged;

static paged paged_new(be *b, const void *src, int n, size_t rowb, int per) {
    paged p = {.b = b, .rowb = rowb, .pg = {96, per}};
    p.n_pages = (n + per - 1) / per + 1;
    p.page_bytes = p.pg.off + (size_t)per * rowb + 32;
    p.buf = b->ops->alloc(b, (size_t)p.n_pages * p.page_bytes);
    void **h = xmalloc((size_t)p.n_pages * sizeof *h);
    for (int i = 0; i < p.n_pages; i++) h[i] = p.buf + (size_t)(p.n_pages - 1 - i) * p.page_bytes;
    p.tab = b->ops->alloc(b, (size_t)p.n_pages * sizeof *h);
    b->ops->upload(b, p.tab, h, (size_t)p.n_pages * sizeof *h);
    for (int w = 0; src && w < n; w++)
        b->ops->upload(b, be_page_row(h, p.pg, (size_t)w, rowb), (const char *)src + w * rowb, rowb);
    free(h);
    return p;
}

/* rows [0, n) back into host memory, contiguous */
static void *paged_get(const paged *p, int n) {
    char *all = xmalloc((size_t)p->n_pages * p->page_bytes), *out = xmalloc((n ? n : 1) * p->rowb);
    p->b->ops->download(p->b, all, p->buf, (size_t)p->n_pages * p->page_bytes);
    void **h = xmalloc((size_t)p->n_pages * sizeof *h);
    for (int i = 0; i < p->n_pages; i++) h[i] = all + (size_t)(p->n_pages - 1 - i) * p->page_bytes;
    for (int w = 0; w < n; w++) memcpy(out + w * p->rowb, be_page_row(h, p->pg, (size_t)w, p->rowb), p->rowb);
    free(h);
    free(all);
    return out;
}

static void paged_free(paged *p) {
    p->b->ops->free(p->b, p->buf);
    p->b->ops->free(p->b, p->tab);
}

/* ---- weights ------------------------------------------------------------------------------ */

typedef struct {
    ck_weight w;
    void *data;
    uint8_t *scale;
} hweight;

enum { K_FP8, K_FP4, K_BF16, K_F32 };
static const char *kname[] = {"fp8", "fp4", "bf16", "f32"};

static void hw_make(hweight *h, int kind, int64_t N, int64_t K, float amp) {
    memset(h, 0, sizeof *h);
    float *f = rvec((size_t)(N * K), -amp, amp);
    h->w.rows = N;
    h->w.cols = K;
    if (kind == K_FP8) {
        int64_t sr = (N + 127) / 128, sc = (K + 127) / 128;
        h->data = xmalloc((size_t)(N * K));
        h->scale = xmalloc((size_t)(sr * sc));
        fmt_quant_fp8_block(f, N, K, 128, 128, h->data, h->scale);
        h->w.kind = CK_FP8_WEIGHT;
        h->w.dtype = ST_F8_E4M3;
        h->w.scale_cols = sc;
        h->w.block_n = h->w.block_k = 128;
    } else if (kind == K_FP4) {
        h->data = xmalloc((size_t)(N * K / 2));
        h->scale = xmalloc((size_t)(N * K / 32));
        fmt_quant_fp4(f, N, K, 32, h->data, h->scale);
        h->w.kind = CK_FP4_WEIGHT;
        h->w.dtype = ST_I8;
        h->w.scale_cols = K / 32;
        h->w.block_n = 1;
        h->w.block_k = 32;
    } else if (kind == K_BF16) {
        uint16_t *b = xmalloc((size_t)(N * K) * 2);
        for (int64_t i = 0; i < N * K; i++) b[i] = fmt_f32_to_bf16(f[i]);
        h->data = b;
        h->w.kind = CK_PLAIN;
        h->w.dtype = ST_BF16;
    } else {
        h->data = f;
        f = NULL;
        h->w.kind = CK_PLAIN;
        h->w.dtype = ST_F32;
    }
    h->w.data = h->data;
    h->w.scale = h->scale;
    free(f);
}
static void hw_free(hweight *h) {
    free(h->data);
    free(h->scale);
}

/* ---- matmul ------------------------------------------------------------------------------- */

static void t_matmul(int kind, int N, int K, int T, int row0, int nrows, int pad,
                     int64_t sr0, int64_t snr, int64_t sc0, int64_t snc) {
    hweight h;
    hw_make(&h, kind, N, K, 1.0f);
    be_weight *wc, *wg;
    int Ks = (int)(snc > 0 ? snc : K);
    if (snr > 0) {
        wc = CPU->ops->weight_slice(CPU, &h.w, sr0, snr, sc0, snc);
        wg = G->ops->weight_slice(G, &h.w, sr0, snr, sc0, snc);
    } else {
        wc = CPU->ops->weight(CPU, &h.w);
        wg = G->ops->weight(G, &h.w);
    }
    int ldx = Ks + pad, ldy = nrows + pad;
    float *x = rvec((size_t)T * ldx, -1, 1);
    float *y = xmalloc((size_t)T * ldy * sizeof *y);
    for (size_t i = 0; i < (size_t)T * ldy; i++) y[i] = 0;
    CPU->ops->matmul(CPU, wc, row0, nrows, x, ldx, y, ldy, T);
    float *dx = dup_dev(x, (size_t)T * ldx * sizeof *x);
    float *dy = G->ops->alloc(G, (size_t)T * ldy * sizeof(float));
    G->ops->matmul(G, wg, row0, nrows, dx, ldx, dy, ldy, T);
    float *gy = host_of(dy, (size_t)T * ldy);
    /* compare only the written [T, nrows] region */
    double mx = 0, rmx = 0;
    int bad = 0;
    for (int t = 0; t < T; t++)
        for (int n = 0; n < nrows; n++) {
            float a = gy[(size_t)t * ldy + n], r = y[(size_t)t * ldy + n];
            if (!isfinite(a)) bad = 1;
            if (fabs(a - r) > mx) mx = fabs(a - r);
            if (fabs(r) > rmx) rmx = fabs(r);
        }
    char cas[96];
    snprintf(cas, sizeof cas, "%s N%d K%d T%d r0=%d%s", kname[kind], nrows, Ks, T, row0,
             snr > 0 ? (sr0 % 128 || sc0 % 128 ? " slice-unal" : " slice-al") : "");
    report("matmul", cas, bad ? INFINITY : mx / rmx, 1e-5);
    CPU->ops->weight_free(CPU, wc);
    G->ops->weight_free(G, wg);
    G->ops->free(G, dx);
    G->ops->free(G, dy);
    free(x);
    free(y);
    free(gy);
    hw_free(&h);
}

/* matmul_xg: G groups of R rows, group g reads x + g * XS (the attention output projection) */
static void t_matmul_xg(int kind, int G_, int R, int K, int T) {
    hweight h;
    hw_make(&h, kind, (int64_t)G_ * R, K, 1.0f);
    be_weight *wc = CPU->ops->weight(CPU, &h.w), *wg = G->ops->weight(G, &h.w);
    int N = G_ * R, ldx = G_ * K, ldy = N;
    float *x = rvec((size_t)T * ldx, -1, 1);
    float *y = xmalloc((size_t)T * ldy * sizeof *y);
    CPU->ops->matmul_xg(CPU, wc, N, x, ldx, R, K, y, ldy, T);
    float *dx = dup_dev(x, (size_t)T * ldx * sizeof *x);
    float *dy = dev_nan((size_t)T * ldy);
    G->ops->matmul_xg(G, wg, N, dx, ldx, R, K, dy, ldy, T);
    char cas[96];
    snprintf(cas, sizeof cas, "%s G%d x R%d K%d T%d", kname[kind], G_, R, K, T);
    report("matmul_xg", cas, cmp_dev(dy, y, (size_t)T * ldy), 1e-5);
    CPU->ops->weight_free(CPU, wc);
    G->ops->weight_free(G, wg);
    G->ops->free(G, dx);
    G->ops->free(G, dy);
    free(x);
    free(y);
    hw_free(&h);
}

/* ---- embed, norms, rope -------------------------------------------------------------------- */

static void t_embed(int kind) {
    int V = 300, D = 256, T = 9, hc = 4;
    hweight h;
    hw_make(&h, kind, V, D, 1.0f);
    be_weight *wc = CPU->ops->weight(CPU, &h.w), *wg = G->ops->weight(G, &h.w);
    int32_t ids[9];
    for (int t = 0; t < T; t++) ids[t] = (int32_t)(rnd() % V);
    float *ref = xmalloc((size_t)T * hc * D * sizeof *ref);
    CPU->ops->embed(CPU, wc, ids, T, hc, ref);
    float *d = dev_nan((size_t)T * hc * D);
    G->ops->embed(G, wg, ids, T, hc, d);
    char cas[64];
    snprintf(cas, sizeof cas, "%s V%d D%d T%d hc%d", kname[kind], V, D, T, hc);
    report("embed", cas, cmp_dev(d, ref, (size_t)T * hc * D), 0);
    CPU->ops->weight_free(CPU, wc);
    G->ops->weight_free(G, wg);
    G->ops->free(G, d);
    free(ref);
    hw_free(&h);
}

static void t_rmsnorm(int T, int n) {
    float *x = rvec((size_t)T * n, -3, 3), *w = rvec((size_t)n, 0.5f, 1.5f);
    float *ref = xmalloc((size_t)T * n * sizeof *ref);
    CPU->ops->rmsnorm(CPU, x, w, ref, T, n, 1e-6f);
    float *dx = dup_dev(x, (size_t)T * n * 4), *dw = dup_dev(w, (size_t)n * 4), *dy = dev_nan((size_t)T * n);
    G->ops->rmsnorm(G, dx, dw, dy, T, n, 1e-6f);
    char cas[64];
    snprintf(cas, sizeof cas, "T%d n%d", T, n);
    report("rmsnorm", cas, cmp_dev(dy, ref, (size_t)T * n), 1e-6);
    /* head_rms in place */
    memcpy(ref, x, (size_t)T * n * sizeof *ref);
    CPU->ops->head_rms(CPU, ref, T, n, 1e-6f);
    G->ops->head_rms(G, dx, T, n, 1e-6f);
    report("head_rms", cas, cmp_dev(dx, ref, (size_t)T * n), 1e-6);
    G->ops->free(G, dx);
    G->ops->free(G, dw);
    G->ops->free(G, dy);
    free(x);
    free(w);
    free(ref);
}

static void t_rope(int T, int H, int hd, int dr, int inverse) {
    float *x = rvec((size_t)T * H * hd, -2, 2), *om = xmalloc((size_t)dr / 2 * sizeof *om);
    for (int i = 0; i < dr / 2; i++) om[i] = powf(10000.f, -2.0f * i / dr);
    int32_t *pos = xmalloc((size_t)T * sizeof *pos);
    for (int t = 0; t < T; t++) pos[t] = (int32_t)(rnd() % 5000);
    float *dx = dup_dev(x, (size_t)T * H * hd * 4);
    CPU->ops->rope(CPU, x, T, H, hd, dr, pos, om, inverse);
    G->ops->rope(G, dx, T, H, hd, dr, pos, om, inverse);
    char cas[64];
    snprintf(cas, sizeof cas, "T%d H%d hd%d dr%d%s", T, H, hd, dr, inverse ? " inverse" : "");
    report("rope", cas, cmp_dev(dx, x, (size_t)T * H * hd), 2e-6);
    G->ops->free(G, dx);
    free(x);
    free(om);
    free(pos);
}

/* ---- mHC ----------------------------------------------------------------------------------- */

static void t_mhc(int T, int n, int D) {
    int nmix = (2 + n) * n;
    float *h = rvec((size_t)T * n * D, -1, 1), *fn = rvec((size_t)nmix * n * D, -0.05f, 0.05f);
    float *base = rvec((size_t)nmix, -0.5f, 0.5f), *scale = rvec(3, 0.5f, 1.5f);
    float *u = xmalloc((size_t)T * D * 4), *post = xmalloc((size_t)T * n * 4),
          *comb = xmalloc((size_t)T * n * n * 4);
    CPU->ops->mhc_pre(CPU, h, fn, base, scale, T, n, D, 20, 1e-6f, 1e-6f, u, post, comb);
    float *dh = dup_dev(h, (size_t)T * n * D * 4), *dfn = dup_dev(fn, (size_t)nmix * n * D * 4);
    float *db = dup_dev(base, (size_t)nmix * 4), *ds = dup_dev(scale, 12);
    float *du = dev_nan((size_t)T * D), *dp = dev_nan((size_t)T * n), *dc = dev_nan((size_t)T * n * n);
    G->ops->mhc_pre(G, dh, dfn, db, ds, T, n, D, 20, 1e-6f, 1e-6f, du, dp, dc);
    char cas[64];
    snprintf(cas, sizeof cas, "T%d n_hc%d D%d u", T, n, D);
    report("mhc_pre", cas, cmp_dev(du, u, (size_t)T * D), 1e-5);
    snprintf(cas, sizeof cas, "T%d n_hc%d D%d post", T, n, D);
    report("mhc_pre", cas, cmp_dev(dp, post, (size_t)T * n), 1e-5);
    snprintf(cas, sizeof cas, "T%d n_hc%d D%d comb", T, n, D);
    report("mhc_pre", cas, cmp_dev(dc, comb, (size_t)T * n * n), 1e-5);
    /* post: use the CPU's post/comb on both sides so this op is tested alone */
    float *v = rvec((size_t)T * D, -1, 1);
    float *dv = dup_dev(v, (size_t)T * D * 4);
    G->ops->upload(G, dp, post, (size_t)T * n * 4);
    G->ops->upload(G, dc, comb, (size_t)T * n * n * 4);
    CPU->ops->mhc_post(CPU, h, v, post, comb, T, n, D);
    G->ops->mhc_post(G, dh, dv, dp, dc, T, n, D);
    snprintf(cas, sizeof cas, "T%d n_hc%d D%d", T, n, D);
    report("mhc_post", cas, cmp_dev(dh, h, (size_t)T * n * D), 1e-6);
    /* hc_head on the updated streams */
    float *y = xmalloc((size_t)T * D * 4);
    CPU->ops->hc_head(CPU, h, fn, base, scale, T, n, D, 1e-6f, 1e-6f, y);
    G->ops->hc_head(G, dh, dfn, db, ds, T, n, D, 1e-6f, 1e-6f, du);
    report("hc_head", cas, cmp_dev(du, y, (size_t)T * D), 1e-5);
    /* mhc_norm: mhc_pre / hc_head fused with the RMSNorm of the collapsed stream */
    float *nw = rvec((size_t)D, 0.5f, 1.5f), *dnw = dup_dev(nw, (size_t)D * 4);
    for (int hm = 0; hm < 2; hm++) {
        CPU->ops->mhc_norm(CPU, hm, h, fn, base, scale, T, n, D, 20, 1e-6f, 1e-6f, nw, y, post, comb);
        G->ops->mhc_norm(G, hm, dh, dfn, db, ds, T, n, D, 20, 1e-6f, 1e-6f, dnw, du, dp, dc);
        snprintf(cas, sizeof cas, "T%d n_hc%d D%d %s x", T, n, D, hm ? "head" : "pre");
        report("mhc_norm", cas, cmp_dev(du, y, (size_t)T * D), 1e-5);
        if (!hm) {
            snprintf(cas, sizeof cas, "T%d n_hc%d D%d pre comb", T, n, D);
            report("mhc_norm", cas, cmp_dev(dc, comb, (size_t)T * n * n), 1e-5);
        }
    }
    G->ops->free(G, dnw);
    free(nw);
    void *ds_[] = {dh, dfn, db, ds, du, dp, dc, dv};
    for (size_t i = 0; i < sizeof ds_ / sizeof *ds_; i++) G->ops->free(G, ds_[i]);
    free(h); free(fn); free(base); free(scale); free(u); free(post); free(comb); free(v); free(y);
}

/* ---- attention, ring_write ------------------------------------------------------------------ */

/* T query rows of one sequence at positions P..P+T-1 with a ring of W, n_ent compressed
 * entries; sparse: cmp_idx of topk random entries per row */
static void t_attention(int T, int H, int d, int W, int P, int n_ent, int sparse, int topk,
                        int fmt) {
    float *q = rvec((size_t)T * H * d, -1, 1), *kv = rvec((size_t)T * d, -1, 1);
    int n_cr = n_ent ? n_ent : 1;
    size_t rb = be_kv_row_bytes(fmt, d);
    float *ring32 = rvec((size_t)W * d, -1, 1), *cmp32 = rvec((size_t)n_cr * d, -1, 1);
    /* host state in the KV format under test */
    void *ring = to_kv(ring32, W, d, fmt), *cmp = to_kv(cmp32, n_cr, d, fmt);
    float *sink = rvec((size_t)H, -1, 1);
    int32_t *idx = xcalloc((size_t)T * (topk ? topk : 1), sizeof *idx);
    be_keyplan *pc = xcalloc((size_t)T, sizeof *pc), *pg = xcalloc((size_t)T, sizeof *pg);
    float *dq = dup_dev(q, (size_t)T * H * d * 4), *dkv = dup_dev(kv, (size_t)T * d * 4);
    void *dring = dup_dev(ring, (size_t)W * rb);
    int per = 5; /* entries per page */
    paged cc = paged_new(CPU, cmp, n_cr, rb, per);
    paged cg = paged_new(G, cmp, n_cr, rb, per);
    float *dsink = dup_dev(sink, (size_t)H * 4);
    for (int r = 0; r < T; r++) {
        int t = P + r, lo = t - W + 1 > 0 ? t - W + 1 : 0;
        be_keyplan p = {ring, W, lo < P ? lo : P, P, lo > P ? lo - P : 0, r + 1, cc.tab, 0};
        int vis = n_ent * (r + 1) / T;
        if (sparse) {
            p.n_cmp = vis < topk ? vis : topk;
            for (int i = 0; i < p.n_cmp; i++) idx[(size_t)r * topk + i] = (int32_t)(rnd() % (vis ? vis : 1));
        } else {
            p.n_cmp = vis;
        }
        pc[r] = p;
        pg[r] = p;
        pg[r].ring = dring;
        pg[r].cmp = cg.tab;
    }
    int32_t *didx = dup_dev(idx, (size_t)T * (topk ? topk : 1) * 4);
    float *out = xmalloc((size_t)T * H * d * 4);
    be_attn_args a = {T, H, d, 1.0f / sqrtf((float)d), q, kv, sink, pc, sparse ? idx : NULL, topk, out,
                      fmt, cc.pg};
    CPU->ops->attention(CPU, &a);
    float *dout = dev_nan((size_t)T * H * d);
    be_attn_args ga = {T, H, d, 1.0f / sqrtf((float)d), dq, dkv, dsink, pg, sparse ? didx : NULL, topk,
                       dout, fmt, cg.pg};
    G->ops->attention(G, &ga);
    char cas[96];
    const char *kvn = kvname(fmt);
    snprintf(cas, sizeof cas, "T%d H%d d%d W%d P%d cmp%d%s%s", T, H, d, W, P, n_ent,
             sparse ? " sparse" : "", kvn);
    report("attention", cas, cmp_dev(dout, out, (size_t)T * H * d), 1e-5);
    /* ring_write of this step's kv: the same bits on both sides (the same rounding); FP8 rings
     * through ring_write_rows, skipping the rows a later row of the chunk overwrites */
    int32_t *pos = xmalloc((size_t)T * sizeof *pos);
    for (int r = 0; r < T; r++) pos[r] = P + r;
    if (fmt == BE_KV_FP8) {
        void **rc = xmalloc((size_t)T * sizeof *rc), **rg = xmalloc((size_t)T * sizeof *rg);
        for (int r = 0; r < T; r++) rc[r] = r >= T - W ? ring : NULL, rg[r] = r >= T - W ? dring : NULL;
        CPU->ops->ring_write_rows(CPU, rc, W, d, kv, pos, T, fmt);
        G->ops->ring_write_rows(G, rg, W, d, dkv, pos, T, fmt);
        free(rc);
        free(rg);
    } else if (fmt == BE_KV_BF16) {
        CPU->ops->ring_write_bf16(CPU, ring, W, d, kv, pos, T);
        G->ops->ring_write_bf16(G, dring, W, d, dkv, pos, T);
    } else {
        CPU->ops->ring_write(CPU, ring, W, d, kv, pos, T);
        G->ops->ring_write(G, dring, W, d, dkv, pos, T);
    }
    snprintf(cas, sizeof cas, "W%d d%d T%d P%d%s", W, d, T, P, kvn);
    report("ring_write", cas, cmp_kv(dring, ring, W, d, fmt), 0);
    if (T < W) { /* ring_write_rows: each row its own ring (a decode batch), here all the same
                  * ring at distinct slots, one row shifted by a window to a second copy */
        void *ring2 = xmalloc((size_t)W * rb);
        memcpy(ring2, ring, (size_t)W * rb);
        void *dring2 = dup_dev(ring2, (size_t)W * rb);
        void **rc = xmalloc((size_t)T * sizeof *rc), **rg = xmalloc((size_t)T * sizeof *rg);
        for (int r = 0; r < T; r++) {
            rc[r] = r % 2 ? ring2 : ring;
            rg[r] = r % 2 ? dring2 : dring;
            pos[r] = P + 5 + r;
        }
        CPU->ops->ring_write_rows(CPU, rc, W, d, kv, pos, T, fmt);
        G->ops->ring_write_rows(G, rg, W, d, dkv, pos, T, fmt);
        snprintf(cas, sizeof cas, "W%d d%d T%d P%d%s 2 rings", W, d, T, P, kvn);
        report("ring_write_rows", cas, cmp_kv(dring, ring, W, d, fmt) + cmp_kv(dring2, ring2, W, d, fmt), 0);
        G->ops->free(G, dring2);
        free(ring2);
        free(rc);
        free(rg);
    }
    void *dd[] = {dq, dkv, dring, dsink, didx, dout};
    for (size_t i = 0; i < sizeof dd / sizeof *dd; i++) G->ops->free(G, dd[i]);
    paged_free(&cc);
    paged_free(&cg);
    free(ring), free(cmp);
    free(q); free(kv); free(ring32); free(cmp32); free(sink); free(idx); free(pc); free(pg); free(out); free(pos);
}

/* ---- compressor ------------------------------------------------------------------------------ */

typedef struct {
    be *b;
    float *cur_a, *cur_g, *prev_a, *prev_g;
    paged entries;
} cstate;

static void cs_new(cstate *s, be *b, int m, int c, int d, int cap, int fmt) {
    s->b = b;
    size_t cd = (size_t)c * d;
    s->cur_a = b->ops->alloc(b, m * cd * 4);
    s->cur_g = b->ops->alloc(b, m * cd * 4);
    s->prev_a = b->ops->alloc(b, (size_t)m * d * 4);
    s->prev_g = b->ops->alloc(b, (size_t)m * d * 4);
    b->ops->fill(b, s->prev_g, -INFINITY, (size_t)m * d);
    s->entries = paged_new(b, NULL, cap / m + 1, be_kv_row_bytes(fmt, d), 3);
}
static void cs_free(cstate *s) {
    float *p[] = {s->cur_a, s->cur_g, s->prev_a, s->prev_g};
    for (int i = 0; i < 4; i++) s->b->ops->free(s->b, p[i]);
    paged_free(&s->entries);
}

static void t_compress(int m, int c, int d, int dr, int fp8, int had, const int *chunks, int nch,
                       int fmt) {
    int cap = 0;
    for (int i = 0; i < nch; i++) cap += chunks[i];
    int cd = c * d;
    cstate sc, sg;
    cs_new(&sc, CPU, m, c, d, cap, fmt);
    cs_new(&sg, G, m, c, d, cap, fmt);
    float *ape = rvec((size_t)m * cd, -0.5f, 0.5f), *norm = rvec((size_t)d, 0.5f, 1.5f);
    float *om = xmalloc((size_t)dr / 2 * 4);
    for (int i = 0; i < dr / 2; i++) om[i] = powf(160000.f, -2.0f * i / dr);
    float *dape = dup_dev(ape, (size_t)m * cd * 4), *dnorm = dup_dev(norm, (size_t)d * 4);
    int pos0 = 0;
    double worst = 0;
    for (int k = 0; k < nch; k++) {
        int T = chunks[k];
        float *a = rvec((size_t)T * cd, -1, 1), *g = rvec((size_t)T * cd, -2, 2);
        int32_t *pos = xmalloc((size_t)T * 4);
        for (int t = 0; t < T; t++) pos[t] = pos0 + t;
        float *da = dup_dev(a, (size_t)T * cd * 4), *dg = dup_dev(g, (size_t)T * cd * 4);
        be_compress_args ac = {T, m, c, d, dr, pos, a, g, ape, norm, 1e-6f, om, sc.cur_a, sc.cur_g,
                               sc.prev_a, sc.prev_g, sc.entries.tab, fp8, had, fmt, sc.entries.pg};
        be_compress_args ag = {T, m, c, d, dr, pos, da, dg, dape, dnorm, 1e-6f, om, sg.cur_a, sg.cur_g,
                               sg.prev_a, sg.prev_g, sg.entries.tab, fp8, had, fmt, sg.entries.pg};
        CPU->ops->compress(CPU, &ac);
        G->ops->compress(G, &ag);
        pos0 += T;
        int nw = pos0 / m;
        void *eg = paged_get(&sg.entries, nw), *ec = paged_get(&sc.entries, nw);
        double e = cmp_host_kv(eg, ec, nw, d, fmt);
        free(eg);
        free(ec);
        double e2 = cmp_dev(sg.cur_g, sc.cur_g, (size_t)m * cd);
        double e3 = cmp_dev(sg.cur_a, sc.cur_a, (size_t)m * cd);
        if (c == 2) {
            float *pa = host_of(sg.prev_g, (size_t)m * d);
            double e4 = 0;
            for (size_t i = 0; i < (size_t)m * d; i++) {
                float r = sc.prev_g[i];
                if (isinf(r) ? pa[i] != r : fabs(pa[i] - r) > 1e-6 * (fabs(r) + 1)) e4 = INFINITY;
            }
            free(pa);
            double e5 = cmp_dev(sg.prev_a, sc.prev_a, (size_t)m * d);
            e2 = e2 > e4 ? e2 : e4;
            e3 = e3 > e5 ? e3 : e5;
        }
        if (e > worst) worst = e;
        if (e2 > worst) worst = e2;
        if (e3 > worst) worst = e3;
        G->ops->free(G, da);
        G->ops->free(G, dg);
        free(a); free(g); free(pos);
    }
    char cas[96];
    snprintf(cas, sizeof cas, "m%d c%d d%d%s%s%s %d chunks/%d tok", m, c, d, fp8 ? " fp8qat" : "",
             had ? " had+fp4" : "", kvname(fmt), nch, cap);
    /* QAT: a value at a rounding boundary may land one FP8/FP4 step away (1/8 of a scale);
     * bf16 entries: likewise one bf16 step (2^-8 of the value) where the f32 results differ
     * by an ulp across a rounding boundary, a few values per case */
    report("compress", cas, worst, fmt == BE_KV_FP8 ? 7e-2 : fmt ? 4e-3 : fp8 || had ? 2e-4 : 1e-5);
    cs_free(&sc);
    cs_free(&sg);
    G->ops->free(G, dape);
    G->ops->free(G, dnorm);
    free(ape); free(norm); free(om);
}

/* ---- indexer ------------------------------------------------------------------------------- */

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* multi: rows of two sequences in one call (row_keys): odd rows read a second key set */
static void t_index_x(int T, int H, int hd, int topk, int n_ent, int fmt, int multi) {
    float *q = rvec((size_t)T * H * hd, -1, 1), *w = rvec((size_t)T * H, -0.2f, 1),
          *keys32 = rvec((size_t)n_ent * hd, -1, 1), *keysb32 = rvec((size_t)n_ent * hd, -1, 1);
    void *keys = to_kv(keys32, n_ent, hd, fmt), *keysb = to_kv(keysb32, n_ent, hd, fmt);
    int *nv = xmalloc((size_t)T * sizeof *nv);
    for (int t = 0; t < T; t++) nv[t] = (int)((int64_t)n_ent * (t + 1) / T);
    int32_t *ic = xmalloc((size_t)T * topk * 4);
    for (size_t i = 0; i < (size_t)T * topk; i++) ic[i] = -1;
    size_t rowb = be_kv_row_bytes(fmt, hd);
    int per = 64; /* keys per page (B = 256, m = 4) */
    paged kc = paged_new(CPU, keys, n_ent, rowb, per), kcb = paged_new(CPU, keysb, n_ent, rowb, per);
    paged kg = paged_new(G, keys, n_ent, rowb, per), kgb = paged_new(G, keysb, n_ent, rowb, per);
    void *const **rkc = xmalloc((size_t)T * sizeof *rkc), **rkg = xmalloc((size_t)T * sizeof *rkg);
    for (int t = 0; t < T; t++) rkc[t] = t % 2 ? kcb.tab : kc.tab;
    be_index_args ac = {T, H, hd, topk, q, w, kc.tab, nv, ic, fmt,
                        multi ? (void *const *const *)rkc : NULL, kc.pg};
    CPU->ops->index_topk(CPU, &ac);
    float *dq = dup_dev(q, (size_t)T * H * hd * 4), *dw = dup_dev(w, (size_t)T * H * 4);
    for (int t = 0; t < T; t++) rkg[t] = t % 2 ? kgb.tab : kg.tab;
    int32_t *dix = G->ops->alloc(G, (size_t)T * topk * 4);
    be_index_args ag = {T, H, hd, topk, dq, dw, kg.tab, nv, dix, fmt,
                        multi ? (void *const *const *)rkg : NULL, kg.pg};
    G->ops->index_topk(G, &ag);
    int32_t *ig = xmalloc((size_t)T * topk * 4);
    G->ops->download(G, ig, dix, (size_t)T * topk * 4);
    /* a row whose set differs from the CPU's is wrong unless the swap is a near tie: every
     * entry the GPU kept scores (double, from the stored keys) at least as high as every entry
     * it dropped, within 1e-5 of the row's largest score (both sum their dot products in their
     * own order: the SGEMM path of a long step rounds differently from the CPU loop) */
    float *kw = kv_widen(keys, n_ent, hd, fmt), *kwb = kv_widen(keysb, n_ent, hd, fmt);
    double *sc = xmalloc((size_t)n_ent * sizeof *sc);
    unsigned char *kept = xmalloc((size_t)n_ent);
    int bad_rows = 0, near_ties = 0;
    for (int t = 0; t < T; t++) {
        int k = topk < nv[t] ? topk : nv[t];
        qsort(ic + (size_t)t * topk, (size_t)k, 4, cmp_i32);
        qsort(ig + (size_t)t * topk, (size_t)k, 4, cmp_i32);
        if (!memcmp(ic + (size_t)t * topk, ig + (size_t)t * topk, (size_t)k * 4)) continue;
        const float *kt = multi && t % 2 ? kwb : kw;
        double mx = 0, lo_kept = INFINITY, hi_dropped = -INFINITY;
        for (int e = 0; e < nv[t]; e++) {
            sc[e] = 0;
            for (int hh = 0; hh < H; hh++) {
                double d = 0;
                for (int i = 0; i < hd; i++)
                    d += (double)q[((size_t)t * H + hh) * hd + i] * kt[(size_t)e * hd + i];
                sc[e] += w[(size_t)t * H + hh] * (d > 0 ? d : 0);
            }
            mx = fabs(sc[e]) > mx ? fabs(sc[e]) : mx;
            kept[e] = 0;
        }
        for (int j = 0; j < k; j++) {
            int e = ig[(size_t)t * topk + j];
            if (e < 0 || e >= nv[t] || kept[e]) { lo_kept = -INFINITY; break; }
            kept[e] = 1;
        }
        for (int e = 0; e < nv[t]; e++) {
            if (kept[e] && sc[e] < lo_kept) lo_kept = sc[e];
            if (!kept[e] && sc[e] > hi_dropped) hi_dropped = sc[e];
        }
        if (lo_kept >= hi_dropped - 1e-5 * mx) near_ties++;
        else bad_rows++;
    }
    char cas[96];
    snprintf(cas, sizeof cas, "T%d H%d hd%d topk%d ent%d%s%s (%d near ties)", T, H, hd, topk,
             n_ent, kvname(fmt), multi ? " 2 seqs" : "", near_ties);
    report("index_topk", cas, bad_rows, 0);
    free(kw); free(kwb); free(sc); free(kept);
    G->ops->free(G, dq); G->ops->free(G, dw); G->ops->free(G, dix);
    paged_free(&kc); paged_free(&kcb); paged_free(&kg); paged_free(&kgb);
    free(keys), free(keysb);
    free(q); free(w); free(keys32); free(keysb32); free(nv); free(ic); free(ig); free(rkc); free(rkg);
}
static void t_index(int T, int H, int hd, int topk, int n_ent, int fmt) {
    t_index_x(T, H, hd, topk, n_ent, fmt, 0);
}

/* ---- MoE ----------------------------------------------------------------------------------- */

/* ep_half: odd experts belong to "another rank" (NULL weights) on both backends */
static void t_moe(int T, int E, int K, int D, int I, int hash, int ep_half) {
    hweight gate, ex[3 * 16], sh[3];
    hw_make(&gate, K_FP8, E, D, 0.2f);
    be_weight *gc = CPU->ops->weight(CPU, &gate.w), *gg = G->ops->weight(G, &gate.w);
    const be_weight *w1c[16], *w2c[16], *w3c[16], *w1g[16], *w2g[16], *w3g[16];
    for (int e = 0; e < E; e++) {
        hw_make(&ex[3 * e], K_FP4, I, D, 0.1f);
        hw_make(&ex[3 * e + 1], K_FP4, D, I, 0.1f);
        hw_make(&ex[3 * e + 2], K_FP4, I, D, 0.1f);
        w1c[e] = CPU->ops->weight(CPU, &ex[3 * e].w);
        w2c[e] = CPU->ops->weight(CPU, &ex[3 * e + 1].w);
        w3c[e] = CPU->ops->weight(CPU, &ex[3 * e + 2].w);
        w1g[e] = G->ops->weight(G, &ex[3 * e].w);
        w2g[e] = G->ops->weight(G, &ex[3 * e + 1].w);
        w3g[e] = G->ops->weight(G, &ex[3 * e + 2].w);
    }
    hw_make(&sh[0], K_FP8, I, D, 0.1f);
    hw_make(&sh[1], K_FP8, D, I, 0.1f);
    hw_make(&sh[2], K_FP8, I, D, 0.1f);
    be_weight *s1c = CPU->ops->weight(CPU, &sh[0].w), *s2c = CPU->ops->weight(CPU, &sh[1].w),
              *s3c = CPU->ops->weight(CPU, &sh[2].w);
    be_weight *s1g = G->ops->weight(G, &sh[0].w), *s2g = G->ops->weight(G, &sh[1].w),
              *s3g = G->ops->weight(G, &sh[2].w);
    float *bias = rvec((size_t)E, -0.1f, 0.1f), *dbias = dup_dev(bias, (size_t)E * 4);
    int vocab = 64;
    int64_t *tid = xmalloc((size_t)vocab * K * sizeof *tid);
    for (int v = 0; v < vocab; v++)
        for (int k = 0; k < K; k++) tid[v * K + k] = (v * 7 + k * 3) % E; /* distinct per row */
    int32_t *ids = xmalloc((size_t)T * 4);
    for (int t = 0; t < T; t++) ids[t] = (int32_t)(rnd() % vocab);
    be_moe_layer Lc = {E, K, I, D, gc, hash ? NULL : bias, hash ? tid : NULL, vocab, w1c, w2c, w3c,
                       s1c, s2c, s3c, I, 1.5f, 10.0f, 1};
    be_moe_layer Lg = Lc;
    Lg.gate = gg;
    Lg.bias = hash ? NULL : dbias;
    Lg.w1 = w1g; Lg.w2 = w2g; Lg.w3 = w3g;
    const be_weight *n1c[16], *n2c[16], *n3c[16], *n1g[16], *n2g[16], *n3g[16];
    if (ep_half) {
        for (int e = 0; e < E; e++) {
            int off = e & 1;
            n1c[e] = off ? NULL : w1c[e]; n2c[e] = off ? NULL : w2c[e]; n3c[e] = off ? NULL : w3c[e];
            n1g[e] = off ? NULL : w1g[e]; n2g[e] = off ? NULL : w2g[e]; n3g[e] = off ? NULL : w3g[e];
        }
        Lc.w1 = n1c; Lc.w2 = n2c; Lc.w3 = n3c;
        Lg.w1 = n1g; Lg.w2 = n2g; Lg.w3 = n3g;
    }
    Lg.s1 = s1g; Lg.s2 = s2g; Lg.s3 = s3g;
    float *x = rvec((size_t)T * D, -2, 2), *out = xmalloc((size_t)T * D * 4);
    CPU->ops->moe(CPU, &Lc, x, ids, T, out);
    float *dx = dup_dev(x, (size_t)T * D * 4), *dout = dev_nan((size_t)T * D);
    G->ops->moe(G, &Lg, dx, ids, T, dout);
    char cas[96];
    snprintf(cas, sizeof cas, "T%d E%d k%d D%d I%d %s%s", T, E, K, D, I, hash ? "hash" : "score",
             ep_half ? " half-experts" : "");
    report("moe", cas, cmp_dev(dout, out, (size_t)T * D), 1e-5);
    if (T < 16) {
        /* T < 16 groups the experts on the device (no host sync); the host grouping
         * (DUET_CUDA_MOE_HOST=1) runs the same kernels on the same rows: the same bits */
        char prev[16] = "";
        const char *pv = getenv("DUET_CUDA_MOE_HOST");
        if (pv) snprintf(prev, sizeof prev, "%s", pv);
        float *dout2 = dev_nan((size_t)T * D);
        setenv("DUET_CUDA_MOE_HOST", "1", 1);
        G->ops->moe(G, &Lg, dx, ids, T, dout2);
        if (pv) setenv("DUET_CUDA_MOE_HOST", prev, 1);
        else unsetenv("DUET_CUDA_MOE_HOST");
        float *hd = host_of(dout, (size_t)T * D), *hh = host_of(dout2, (size_t)T * D);
        report("moe dev=host", cas, memcmp(hd, hh, (size_t)T * D * sizeof *hd) ? 1.0 : 0.0, 0);
        free(hd);
        free(hh);
        G->ops->free(G, dout2);
    }
    for (int e = 0; e < E; e++) {
        CPU->ops->weight_free(CPU, (be_weight *)w1c[e]); CPU->ops->weight_free(CPU, (be_weight *)w2c[e]);
        CPU->ops->weight_free(CPU, (be_weight *)w3c[e]); G->ops->weight_free(G, (be_weight *)w1g[e]);
        G->ops->weight_free(G, (be_weight *)w2g[e]); G->ops->weight_free(G, (be_weight *)w3g[e]);
        for (int j = 0; j < 3; j++) hw_free(&ex[3 * e + j]);
    }
    CPU->ops->weight_free(CPU, gc); G->ops->weight_free(G, gg);
    CPU->ops->weight_free(CPU, s1c); CPU->ops->weight_free(CPU, s2c); CPU->ops->weight_free(CPU, s3c);
    G->ops->weight_free(G, s1g); G->ops->weight_free(G, s2g); G->ops->weight_free(G, s3g);
    hw_free(&gate);
    for (int j = 0; j < 3; j++) hw_free(&sh[j]);
    G->ops->free(G, dbias); G->ops->free(G, dx); G->ops->free(G, dout);
    free(bias); free(tid); free(ids); free(x); free(out);
}

/* ---- elementwise --------------------------------------------------------------------------- */

static void t_elementwise(void) {
    int T = 37, n = 512;
    size_t N = (size_t)T * n;
    float *x = rvec(N, -3, 3), *y = rvec(N, -3, 3);
    float *dx = dup_dev(x, N * 4), *dy = dup_dev(y, N * 4);
    CPU->ops->scale_rows(CPU, x, T, n, 0.37f);
    G->ops->scale_rows(G, dx, T, n, 0.37f);
    report("scale_rows", "T37 n512", cmp_dev(dx, x, N), 0);
    CPU->ops->add(CPU, y, x, N);
    G->ops->add(G, dy, dx, N);
    report("add", "n18944", cmp_dev(dy, y, N), 0);
    G->ops->copy(G, dx, dy, N);
    report("copy", "n18944", cmp_dev(dx, y, N), 0);
    G->ops->fill(G, dx, 2.5f, N);
    for (size_t i = 0; i < N; i++) x[i] = 2.5f;
    report("fill", "n18944", cmp_dev(dx, x, N), 0);
    /* fp8_qat over dims [0, 448) of rows of 512 in blocks of 64 */
    float *z = rvec(N, -4, 4);
    G->ops->upload(G, dx, z, N * 4);
    CPU->ops->fp8_qat(CPU, z, T, n, 448, 64);
    G->ops->fp8_qat(G, dx, T, n, 448, 64);
    report("fp8_qat", "T37 dim512 nope448 block64", cmp_dev(dx, z, N), 2e-4);
    float *hq = rvec((size_t)T * 128, -2, 2), *dhq = dup_dev(hq, (size_t)T * 128 * 4);
    CPU->ops->hadamard_fp4(CPU, hq, T, 128);
    G->ops->hadamard_fp4(G, dhq, T, 128);
    report("hadamard_fp4", "rows37 dim128", cmp_dev(dhq, hq, (size_t)T * 128), 2e-4);
    G->ops->free(G, dx); G->ops->free(G, dy); G->ops->free(G, dhq);
    free(x); free(y); free(z); free(hq);
}

/* ---- vector + memory cap ------------------------------------------------------------------- */

static void t_vector_and_cap(void) {
    hweight h;
    hw_make(&h, K_BF16, 1, 300, 1.0f);
    float *vc = CPU->ops->vector(CPU, &h.w), *vg = G->ops->vector(G, &h.w);
    report("vector", "bf16 [300]", cmp_dev(vg, vc, 300), 0);
    free(vc);
    G->ops->free(G, vg);
    hw_free(&h);
    char err[300];
    size_t left = be_cuda_mem_cap(G) - be_cuda_mem_used(G);
    int rc1 = be_cuda_fits(G, left / 2, err, sizeof err);
    int rc2 = be_cuda_fits(G, left + ((size_t)1 << 20), err, sizeof err);
    printf("memory cap: %.1f MiB cap, %.1f MiB used; refusal: \"%s\"\n", be_cuda_mem_cap(G) / 1048576.0,
           be_cuda_mem_used(G) / 1048576.0, err);
    report("mem_cap", "fits(half) ok, fits(left+1MiB) refused", rc1 == 0 && rc2 == DUET_ENOMEM ? 0 : 1, 0);
    be *bad = be_cuda_create(0, 1.5, err, sizeof err);
    report("mem_cap", "fraction 1.5 refused", bad == NULL ? 0 : 1, 0);
}

/* ---- sample: ids equal where neither backend fell back; logprobs to 1e-5 ------------------ */

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

/* rows of peaked logits (Gaussian × scale; ties: rounded to 0.5; some NaN and -inf), random
 * parameters (a quarter greedy), sampled by both backends in one call each; then the GPU op
 * timed on the same batch (best of 3, the call includes its uploads and the results' copy) */
static void t_sample(int V, int rows, float scale, int ties) {
    float *x = xmalloc((size_t)rows * V * sizeof *x);
    for (size_t i = 0; i < (size_t)rows * V; i++) {
        float g = 0;
        for (int k = 0; k < 4; k++) g += frand(-1.7320508f, 1.7320508f); /* ~N(0, 4) */
        x[i] = scale * g / 2;
        if (ties) x[i] = roundf(2 * x[i]) / 2;
        if (i % 997 == 3) x[i] = i % 2 ? NAN : -INFINITY;
    }
    be_sample_req *rq = xmalloc((size_t)rows * sizeof *rq);
    be_sample_res *rc = xmalloc((size_t)rows * sizeof *rc), *rg = xmalloc((size_t)rows * sizeof *rg);
    static const int topks[] = {0, 0, 1, 20, 50, 1024, 3000};
    for (int i = 0; i < rows; i++) {
        int r = (int)(rnd() % 4);
        rq[i] = (be_sample_req){.row = (int)(rnd() % (uint64_t)rows),
                                .temperature = r == 0 ? 0 : frand(0.5f, 1.3f),
                                .top_p = rnd() % 2 ? frand(0.5f, 0.99f) : 0,
                                .min_p = rnd() % 3 == 0 ? frand(0.01f, 0.2f) : 0,
                                .top_k = topks[rnd() % 7], .n_top = (int)(rnd() % 21),
                                .u01 = frand(0, 1)};
    }
    CPU->ops->sample(CPU, x, V, rows, rq, rc);
    float *dx = dup_dev(x, (size_t)rows * V * sizeof *x);
    G->ops->sample(G, dx, V, rows, rq, rg);
    int bad_id = 0, bad_fb = 0, n_fb = 0;
    double lp_err = 0;
    for (int i = 0; i < rows; i++) {
        n_fb += rg[i].fallback;
        bad_fb += rg[i].fallback != rc[i].fallback;
        if (!rg[i].fallback && !rc[i].fallback) {
            bad_id += rg[i].id != rc[i].id;
            double e = fabs((double)rg[i].logprob - rc[i].logprob);
            if (!(e <= lp_err) && !(rg[i].logprob == rc[i].logprob)) lp_err = e;
        }
        bad_id += rg[i].n_top != rc[i].n_top;
        for (int k = 0; k < rc[i].n_top && k < BE_SAMPLE_MAX_TOP; k++) {
            bad_id += rg[i].top_ids[k] != rc[i].top_ids[k];
            double e = fabs((double)rg[i].top_logprobs[k] - rc[i].top_logprobs[k]);
            if (!(e <= lp_err) && !(rg[i].top_logprobs[k] == rc[i].top_logprobs[k])) lp_err = e;
        }
    }
    char cas[64];
    snprintf(cas, sizeof cas, "V%d rows%d%s ids (%d fb)", V, rows, ties ? " ties" : "", n_fb);
    report("sample", cas, bad_id + bad_fb, 0);
    snprintf(cas, sizeof cas, "V%d rows%d%s logprobs", V, rows, ties ? " ties" : "");
    report("sample", cas, lp_err, 1e-5);
    double best = INFINITY;
    for (int k = 0; k < 3; k++) {
        double t0 = now_us();
        G->ops->sample(G, dx, V, rows, rq, rg);
        double t = now_us() - t0;
        best = t < best ? t : best;
    }
    printf("sample time V=%d rows=%d: %.1f us per call, %.2f us per row\n", V, rows, best,
           best / rows);
    G->ops->free(G, dx);
    free(x); free(rq); free(rc); free(rg);
}

int main(int argc, char **argv) {
    rng_s = argc > 1 ? strtoull(argv[1], NULL, 0) : (uint64_t)time(NULL) * 2654435761u + 1;
    if (!rng_s) rng_s = 1;
    printf("test_cuda_ops seed %llu\n", (unsigned long long)rng_s);
    char err[300];
    G = be_cuda_create(0, 0.9, err, sizeof err);
    if (!G) {
        printf("FAIL: %s\n", err);
        return 1;
    }
    int maj, min;
    const char *name = be_cuda_device_name(G, &maj, &min);
    printf("device: %s (sm_%d%d)\n", name, maj, min);
    CPU = be_cpu_create(0);
    printf("%-14s %-34s %10s %9s  %s\n", "op", "case", "error", "threshold", "result");

    static const int kinds[] = {K_FP8, K_FP4, K_BF16, K_F32};
    for (int ki = 0; ki < 4; ki++) {
        int k = kinds[ki];
        t_matmul(k, 384, 512, 1, 0, 384, 0, 0, 0, 0, 0);
        t_matmul(k, 384, 512, 5, 64, 300, 8, 0, 0, 0, 0);
        t_matmul(k, 384, 512, 16, 0, 384, 0, 0, 0, 0, 0);
        t_matmul(k, 384, 512, 37, 7, 250, 4, 0, 0, 0, 0);
        t_matmul(k, 384, 512, 300, 0, 384, 0, 0, 0, 0, 0);
        t_matmul(k, 384, 512, 3, 0, 128, 0, 128, 128, 128, 256);  /* block-aligned slice */
        t_matmul(k, 384, 512, 9, 0, 100, 0, 3, 100, 40, 200);     /* unaligned slice */
    }
    t_matmul(K_FP8, 300, 200, 4, 0, 300, 0, 0, 0, 0, 0); /* K not a multiple of 16: tiled path */
    t_matmul(K_BF16, 100, 202, 20, 0, 100, 1, 0, 0, 0, 0); /* K % 4 != 0: scalar tile loads */
    t_matmul(K_F32, 64, 130, 33, 0, 64, 0, 0, 0, 0, 0);
    t_matmul(K_FP8, 1000, 384, 70, 0, 1000, 0, 0, 0, 0, 0);
    t_matmul_xg(K_FP8, 8, 128, 512, 1);   /* one grouped GEMV launch */
    t_matmul_xg(K_FP8, 8, 128, 512, 3);
    t_matmul_xg(K_FP8, 4, 256, 1024, 8);
    t_matmul_xg(K_FP8, 3, 100, 256, 2);   /* groups not whole blocks: a matmul each */
    t_matmul_xg(K_BF16, 4, 64, 256, 20);  /* T > 8: a matmul each */
    t_embed(K_FP8);
    t_embed(K_BF16);
    t_rmsnorm(7, 4096);
    t_rmsnorm(64, 128);
    t_rope(9, 8, 128, 64, 0);
    t_rope(9, 8, 512, 64, 1);
    t_mhc(1, 4, 4096);
    t_mhc(5, 4, 256);
    t_mhc(3, 4, 4096);
    t_mhc(64, 4, 512);
    t_attention(1, 8, 128, 8, 40, 10, 0, 0, 0);
    t_attention(37, 8, 128, 8, 0, 9, 0, 0, 0);
    t_attention(20, 8, 128, 8, 100, 25, 1, 16, 0);
    t_attention(5, 16, 512, 128, 300, 600, 1, 512, 0);
    t_attention(3, 4, 512, 128, 1000, 7, 0, 0, 0);
    t_attention(300, 8, 512, 128, 0, 75, 1, 64, 0);
    static const int ch1[] = {1, 3, 7, 130, 1, 1, 1, 2, 37};
    static const int ch2[] = {300};
    static const int ch3[] = {5, 128, 1, 127, 200, 1};
    t_compress(4, 2, 128, 64, 1, 0, ch1, 9, 0);
    t_compress(4, 2, 128, 64, 0, 1, ch1, 9, 0);
    t_compress(4, 2, 512, 64, 1, 0, ch2, 1, 0);
    t_compress(128, 1, 128, 64, 1, 0, ch3, 6, 0);
    t_compress(128, 1, 512, 64, 0, 0, ch2, 1, 0);
    t_index(1, 16, 128, 16, 40, 0);
    t_index(37, 16, 128, 16, 9, 0);
    t_index(50, 64, 128, 512, 2000, 0);
    t_index(300, 64, 128, 512, 2000, 0); /* a long step of one sequence: scores by SGEMM */
    t_index_x(8, 64, 128, 512, 2000, 0, 1); /* a decode batch: rows of two sequences, one call */
    t_index_x(37, 16, 128, 16, 90, 0, 1);
    /* bf16 KV state (rings, entries, keys) and FP8 rows (rings, entries; keys stay bf16): the
     * same attention shapes; FP8 attention reads stored rows and this step's rows rounded
     * alike, its ring writes give the same bytes */
    for (int fmt = BE_KV_BF16; fmt <= BE_KV_FP8; fmt++) {
        t_attention(1, 8, 128, 8, 40, 10, 0, 0, fmt);
        t_attention(20, 8, 128, 8, 100, 25, 1, 16, fmt);
        t_attention(5, 16, 512, 128, 300, 600, 1, 512, fmt);
        t_attention(300, 8, 512, 128, 0, 75, 1, 64, fmt);
    }
    t_compress(4, 2, 128, 64, 0, 1, ch1, 9, 1);
    t_compress(4, 2, 512, 64, 1, 0, ch2, 1, 1);
    t_compress(128, 1, 128, 64, 1, 0, ch3, 6, 1);
    t_index(37, 16, 128, 16, 9, 1);
    t_index(50, 64, 128, 512, 2000, 1);
    t_index(300, 64, 128, 512, 2000, 1);
    t_index_x(8, 64, 128, 512, 2000, 1, 1);
    /* FP8 compress: one e4m3 step at a rounding boundary (1/8 of a power of two) where the
     * f32 results differ by an ulp */
    t_compress(4, 2, 512, 64, 0, 0, ch2, 1, 2);
    t_compress(128, 1, 128, 64, 0, 0, ch3, 6, 2);
    t_compress(128, 1, 512, 64, 1, 0, ch2, 1, 2);
    t_moe(1, 8, 2, 256, 128, 0, 0);
    t_moe(7, 8, 2, 256, 128, 1, 0);
    t_moe(40, 16, 6, 256, 128, 0, 0);
    t_moe(200, 8, 2, 256, 128, 0, 0);
    t_moe(33, 16, 6, 256, 128, 0, 1);
    t_moe(9, 16, 6, 256, 128, 1, 1);
    t_moe(15, 16, 6, 256, 128, 0, 0);
    t_moe(1, 16, 6, 256, 128, 0, 1);
    t_elementwise();
    t_sample(129280, 128, 3.0f, 0);
    t_sample(129280, 16, 3.0f, 1);
    t_sample(20000, 64, 2.0f, 0);
    t_sample(700, 33, 1.0f, 1);
    t_sample(129280, 1, 3.0f, 0);
    t_vector_and_cap();
    if (be_cuda_sync(G, err, sizeof err)) {
        printf("FAIL: %s\n", err);
        n_fail++;
    }
    printf("test_cuda_ops: %d passed, %d failed\n", n_pass, n_fail);
    G->ops->destroy(G);
    CPU->ops->destroy(CPU);
    return n_fail ? 1 : 0;
}
