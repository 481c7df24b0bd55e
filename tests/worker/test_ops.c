/* test_ops.c — the CPU backend's ops against independent, direct formulas of the spec.
 *
 * Why: the golden test checks the whole model; these check each op where a mistake would be
 * hard to localise from logits: the RoPE/YaRN tables (spec §1.4 values), Sinkhorn and the
 * mHC contraction order (§2.3), RoPE and its inverse, attention sinks (§2.4.5), the compressor's
 * window pooling and first-window rule (§2.4.3), indexer top-k (§2.4.4) and MoE routing (§2.5:
 * bias for selection only, renormalise ×scale, hash routing, clamps). Every reference here is
 * written in double precision straight from the spec text, not from the backend's code.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "worker/backend.h"
#include "worker/model.h"

static be *B;
static void setup(void) { B = be_cpu_create(2); }
static void teardown(void) { B->ops->destroy(B); }

static unsigned long long rng = 88172645463325252ull;
static double urand(void) { /* xorshift, uniform in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / (double)(1ull << 52) - 1.0;
}
static void fill_rand(float *x, size_t n, double s) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(urand() * s);
}
static ck_weight f32w(const float *data, int rows, int cols) {
    ck_weight w = {.kind = CK_PLAIN, .dtype = ST_F32, .rows = rows, .cols = cols, .data = data};
    return w;
}
#define CLOSE(a, b, tol) ck_assert_msg(fabs((double)(a) - (double)(b)) <= (tol) * (1 + fabs((double)(b))), \
                                       "%s = %.9g, expected %.9g", #a, (double)(a), (double)(b))

/* ---- RoPE tables (spec §1.4) ------------------------------------------------------------ */

START_TEST(rope_tables_v4_flash) {
    dv4_config c = {.qk_rope_head_dim = 64, .rope_theta = 10000, .compress_rope_theta = 160000,
                    .has_yarn = 1, .yarn_factor = 16, .yarn_original_max_pos = 65536,
                    .yarn_beta_fast = 32, .yarn_beta_slow = 1};
    float om[32], oc[32];
    dv4_rope_tables(&c, om, oc);
    for (int i = 0; i < 32; i++) CLOSE(om[i], pow(10000, -2.0 * i / 64), 1e-6);
    for (int i = 0; i <= 15; i++) CLOSE(oc[i], pow(160000, -2.0 * i / 64), 1e-6);
    CLOSE(oc[16], 0.0022656250, 1e-5);
    CLOSE(oc[20], 2.96978e-4, 1e-5);
    CLOSE(oc[25], 5.37231e-6, 1e-5);
    CLOSE(oc[31], 5.68053e-7, 1e-5);
    for (int i = 25; i < 32; i++) CLOSE(oc[i], pow(160000, -2.0 * i / 64) / 16, 1e-6);
}
END_TEST

START_TEST(rope_tables_tiny) { /* spec §6: original 256 -> lo = 0, hi = 10 */
    dv4_config c = {.qk_rope_head_dim = 64, .rope_theta = 10000, .compress_rope_theta = 160000,
                    .has_yarn = 1, .yarn_factor = 16, .yarn_original_max_pos = 256,
                    .yarn_beta_fast = 32, .yarn_beta_slow = 1};
    float om[32], oc[32];
    dv4_rope_tables(&c, om, oc);
    CLOSE(oc[0], 1.0, 1e-7);
    CLOSE(oc[1], 0.623188257, 1e-6);
    CLOSE(oc[9], 0.00537231332, 1e-6);
    CLOSE(oc[10], 0.00147772126, 1e-6);
    CLOSE(oc[31], 5.6805294e-07, 1e-6);
}
END_TEST

START_TEST(rope_inverse_and_pairs) {
    enum { H = 3, DH = 16, DR = 8 };
    float x[H * DH], y[H * DH], om[DR / 2] = {1.0f, 0.5f, 0.1f, 0.01f};
    int32_t pos[1] = {7};
    fill_rand(x, H * DH, 1);
    memcpy(y, x, sizeof x);
    B->ops->rope(B, y, 1, H, DH, DR, pos, om, 0);
    for (int h = 0; h < H; h++) {
        for (int i = 0; i < DH - DR; i++) ck_assert(y[h * DH + i] == x[h * DH + i]);
        for (int i = 0; i < DR / 2; i++) { /* interleaved pair (2i, 2i+1) of the last DR dims */
            double a = x[h * DH + DH - DR + 2 * i], b = x[h * DH + DH - DR + 2 * i + 1];
            double ang = 7.0 * om[i];
            CLOSE(y[h * DH + DH - DR + 2 * i], a * cos(ang) - b * sin(ang), 1e-5);
            CLOSE(y[h * DH + DH - DR + 2 * i + 1], a * sin(ang) + b * cos(ang), 1e-5);
        }
    }
    B->ops->rope(B, y, 1, H, DH, DR, pos, om, 1);
    for (int i = 0; i < H * DH; i++) CLOSE(y[i], x[i], 1e-5);
}
END_TEST

/* ---- mHC (spec §2.3) -------------------------------------------------------------------- */

enum { NH = 4, DM = 8, NMIX = (2 + NH) * NH };

static void ref_mhc(const float *X, const float *fn, const float *base, const float *scale,
                    double *pre, double *post, double C[NH][NH]) {
    double ss = 0, mu[NMIX];
    for (int i = 0; i < NH * DM; i++) ss += (double)X[i] * X[i];
    double r = 1 / sqrt(ss / (NH * DM) + 1e-6);
    for (int k = 0; k < NMIX; k++) {
        double s = 0;
        for (int i = 0; i < NH * DM; i++) s += (double)fn[k * NH * DM + i] * X[i];
        mu[k] = r * s;
    }
    for (int j = 0; j < NH; j++) {
        pre[j] = 1 / (1 + exp(-(mu[j] * scale[0] + base[j]))) + 1e-6;
        post[j] = 2 / (1 + exp(-(mu[NH + j] * scale[1] + base[NH + j])));
    }
    for (int j = 0; j < NH; j++) {
        double mx = -1e30, s = 0;
        for (int k = 0; k < NH; k++) {
            C[j][k] = mu[2 * NH + NH * j + k] * scale[2] + base[2 * NH + NH * j + k];
            mx = fmax(mx, C[j][k]);
        }
        for (int k = 0; k < NH; k++) s += (C[j][k] = exp(C[j][k] - mx));
        for (int k = 0; k < NH; k++) C[j][k] = C[j][k] / s + 1e-6;
    }
    for (int it = 0; it < 20; it++) {
        if (it)
            for (int j = 0; j < NH; j++) {
                double s = 0;
                for (int k = 0; k < NH; k++) s += C[j][k];
                for (int k = 0; k < NH; k++) C[j][k] /= s + 1e-6;
            }
        for (int k = 0; k < NH; k++) {
            double s = 0;
            for (int j = 0; j < NH; j++) s += C[j][k];
            for (int j = 0; j < NH; j++) C[j][k] /= s + 1e-6;
        }
    }
}

START_TEST(mhc_pre_post) {
    float X[NH * DM], fn[NMIX * NH * DM], base[NMIX], scale[3] = {0.7f, 1.3f, 2.1f};
    fill_rand(X, NH * DM, 2);
    fill_rand(fn, NMIX * NH * DM, 0.5);
    fill_rand(base, NMIX, 1);
    float u[DM], post[NH], comb[NH * NH], v[DM];
    B->ops->mhc_pre(B, X, fn, base, scale, 1, NH, DM, 20, 1e-6f, 1e-6f, u, post, comb);
    double pre[NH], rpost[NH], C[NH][NH];
    ref_mhc(X, fn, base, scale, pre, rpost, C);
    for (int j = 0; j < NH; j++) CLOSE(post[j], rpost[j], 1e-5);
    for (int j = 0; j < NH; j++)
        for (int k = 0; k < NH; k++) CLOSE(comb[j * NH + k], C[j][k], 1e-5);
    for (int k = 0; k < NH; k++) { /* Sinkhorn: doubly stochastic */
        double cs = 0, rs = 0;
        for (int j = 0; j < NH; j++) cs += comb[j * NH + k], rs += comb[k * NH + j];
        CLOSE(cs, 1.0, 1e-4);
        CLOSE(rs, 1.0, 1e-3);
    }
    for (int i = 0; i < DM; i++) {
        double s = 0;
        for (int j = 0; j < NH; j++) s += pre[j] * X[j * DM + i];
        CLOSE(u[i], s, 1e-5);
    }
    /* post: X'_k = post_k v + sum_j C[j][k] X_j (contract the FIRST index) */
    fill_rand(v, DM, 1);
    float Y[NH * DM];
    memcpy(Y, X, sizeof X);
    B->ops->mhc_post(B, Y, v, post, comb, 1, NH, DM);
    for (int k = 0; k < NH; k++)
        for (int i = 0; i < DM; i++) {
            double s = rpost[k] * v[i];
            for (int j = 0; j < NH; j++) s += C[j][k] * X[j * DM + i];
            CLOSE(Y[k * DM + i], s, 1e-5);
        }
}
END_TEST

/* ---- attention sinks (spec §2.4.5) ------------------------------------------------------ */

START_TEST(attention_sink_only_in_denominator) {
    enum { D = 4 };
    float q[D] = {1, 0, 0, 0}, kv[2 * D] = {2, 1, 0, 0, -1, 0, 3, 0}, sink = 0.5f, out[D];
    be_keyplan plan = {.row_lo = 0, .row_hi = 2};
    be_attn_args a = {.T = 1, .n_heads = 1, .head_dim = D, .scale = 0.5f, .q = q, .kv = kv,
                      .sink = &sink, .plan = &plan, .out = out};
    B->ops->attention(B, &a);
    double s0 = 2 * 0.5, s1 = -1 * 0.5, e0 = exp(s0), e1 = exp(s1), es = exp(0.5);
    for (int i = 0; i < D; i++) CLOSE(out[i], (e0 * kv[i] + e1 * kv[D + i]) / (e0 + e1 + es), 1e-6);
}
END_TEST

/* ---- compressor (spec §2.4.3) ----------------------------------------------------------- */

enum { CM = 4, CD = 8, CR = 4 };

/* direct formula: entry w pools, per channel, softmax over candidate gates */
static void ref_entry(int c, int w, const float *a, const float *g, const float *ape,
                      const float *norm, const float *om, double *out) {
    int cd = c * CD;
    for (int ch = 0; ch < CD; ch++) {
        double num = 0, den = 0, mx = -1e300;
        double gv[2 * CM], av[2 * CM];
        int n = 0;
        if (c == 2 && w > 0)
            for (int r = 0; r < CM; r++) { /* A-halves of window w-1 */
                int t = (w - 1) * CM + r;
                gv[n] = g[t * cd + ch] + ape[r * cd + ch];
                av[n++] = a[t * cd + ch];
            }
        for (int r = 0; r < CM; r++) { /* window w: B-halves (c = 2) or the only half */
            int t = w * CM + r, off = c == 2 ? CD : 0;
            gv[n] = g[t * cd + off + ch] + ape[r * cd + off + ch];
            av[n++] = a[t * cd + off + ch];
        }
        for (int i = 0; i < n; i++) mx = fmax(mx, gv[i]);
        for (int i = 0; i < n; i++) num += exp(gv[i] - mx) * av[i], den += exp(gv[i] - mx);
        out[ch] = num / den;
    }
    double ss = 0;
    for (int i = 0; i < CD; i++) ss += out[i] * out[i];
    double r = 1 / sqrt(ss / CD + 1e-6);
    for (int i = 0; i < CD; i++) out[i] *= r * norm[i];
    for (int i = 0; i < CR / 2; i++) {
        double ang = (double)(w * CM) * om[i], x0 = out[CD - CR + 2 * i], x1 = out[CD - CR + 2 * i + 1];
        out[CD - CR + 2 * i] = x0 * cos(ang) - x1 * sin(ang);
        out[CD - CR + 2 * i + 1] = x0 * sin(ang) + x1 * cos(ang);
    }
}

static void run_compress(int c, int T, const int *splits, int n_splits) {
    int cd = c * CD;
    float *a = xmalloc(sizeof(float) * T * cd), *g = xmalloc(sizeof(float) * T * cd);
    float ape[CM * 2 * CD], norm[CD], om[CR / 2] = {0.3f, 0.02f};
    fill_rand(a, (size_t)T * cd, 1);
    fill_rand(g, (size_t)T * cd, 2);
    fill_rand(ape, CM * 2 * CD, 1);
    for (int i = 0; i < CD; i++) norm[i] = 0.5f + i * 0.1f;
    float cur_a[CM * 2 * CD] = {0}, cur_g[CM * 2 * CD] = {0}, prev_a[CM * CD] = {0}, prev_g[CM * CD];
    for (int i = 0; i < CM * CD; i++) prev_g[i] = -INFINITY;
    /* entries paged 3 to a page, the pages in reverse order of the blocks they hold */
    enum { PER = 3, NPG = 6 };
    float entries[NPG * PER * CD];
    void *tab[NPG];
    for (int p = 0; p < NPG; p++) tab[p] = entries + (size_t)(NPG - 1 - p) * PER * CD;
    be_paging pg = {0, PER};
    int32_t pos[64];
    for (int i = 0; i < T; i++) pos[i] = i;
    int start = 0;
    for (int s = 0; s <= n_splits; s++) {
        int end = s < n_splits ? splits[s] : T;
        be_compress_args args = {.T = end - start, .m = CM, .c = c, .d = CD, .rope_dims = CR,
                                 .pos = pos + start, .a = a + start * cd, .g = g + start * cd,
                                 .ape = ape, .norm = norm, .eps = 1e-6f, .omega = om,
                                 .cur_a = cur_a, .cur_g = cur_g, .prev_a = prev_a,
                                 .prev_g = prev_g, .entries = tab, .paging = pg};
        B->ops->compress(B, &args);
        start = end;
    }
    for (int w = 0; w < T / CM; w++) {
        double ref[CD];
        ref_entry(c, w, a, g, ape, norm, om, ref);
        const float *e = be_page_row(tab, pg, (size_t)w, CD * sizeof(float));
        for (int i = 0; i < CD; i++) CLOSE(e[i], ref[i], 1e-5);
    }
    free(a);
    free(g);
}

START_TEST(compress_hca_like) { run_compress(1, 12, NULL, 0); }
END_TEST
START_TEST(compress_csa_overlap) { run_compress(2, 14, NULL, 0); }
END_TEST
START_TEST(compress_csa_chunked) { /* window state carried across chunk boundaries */
    static const int splits[] = {1, 3, 6, 7, 11};
    run_compress(2, 14, splits, 5);
}
END_TEST

/* ---- indexer top-k (spec §2.4.4) -------------------------------------------------------- */

START_TEST(index_topk_matches_brute_force) {
    enum { NI = 3, HD = 8, NK = 40, K = 5 };
    float q[NI * HD], w[NI], keys[NK * HD];
    fill_rand(q, NI * HD, 1);
    fill_rand(w, NI, 1);
    fill_rand(keys, NK * HD, 1);
    int32_t idx[2 * K];
    int nvis[2] = {NK, 3};
    float q2[2 * NI * HD], w2[2 * NI];
    memcpy(q2, q, sizeof q);
    memcpy(q2 + NI * HD, q, sizeof q);
    memcpy(w2, w, sizeof w);
    memcpy(w2 + NI, w, sizeof w);
    void *tab[] = {keys, keys + 16 * HD, keys + 32 * HD}; /* 16 keys to a page */
    be_index_args a = {.T = 2, .n_heads = NI, .head_dim = HD, .topk = K, .q = q2, .w = w2,
                       .keys = tab, .n_visible = nvis, .idx = idx, .paging = {0, 16}};
    B->ops->index_topk(B, &a);
    double sc[NK];
    for (int e = 0; e < NK; e++) {
        sc[e] = 0;
        for (int h = 0; h < NI; h++) {
            double d = 0;
            for (int i = 0; i < HD; i++) d += (double)q[h * HD + i] * keys[e * HD + i];
            sc[e] += w[h] * (d > 0 ? d : 0);
        }
    }
    for (int j = 0; j < K; j++) { /* each chosen entry beats every unchosen one */
        int e = idx[j];
        ck_assert(e >= 0 && e < NK);
        for (int o = 0; o < NK; o++) {
            int chosen = 0;
            for (int jj = 0; jj < K; jj++) chosen |= idx[jj] == o;
            if (!chosen) ck_assert(sc[e] >= sc[o]);
        }
    }
    int seen = 0; /* row 1: only 3 visible -> exactly entries 0, 1, 2 */
    for (int j = 0; j < 3; j++) seen |= 1 << idx[K + j];
    ck_assert_int_eq(seen, 7);
}
END_TEST

/* ---- MoE routing (spec §2.5) ------------------------------------------------------------ */

enum { ME = 4, MK = 2, MD = 8, MI = 4 };

static double ref_moe_row(const float *x, const float *gate, const float *bias,
                          const int64_t *hash_row, float *w1[], float *w2[], float *w3[],
                          double limit, double scale, int out_i, int *sel_out) {
    double s[ME];
    for (int e = 0; e < ME; e++) {
        double l = 0;
        for (int i = 0; i < MD; i++) l += (double)gate[e * MD + i] * x[i];
        s[e] = sqrt(log1p(exp(l)));
    }
    int sel[MK];
    if (hash_row) {
        for (int k = 0; k < MK; k++) sel[k] = (int)hash_row[k];
    } else {
        int used[ME] = {0};
        for (int k = 0; k < MK; k++) {
            int best = -1;
            for (int e = 0; e < ME; e++)
                if (!used[e] && (best < 0 || s[e] + bias[e] > s[best] + bias[best])) best = e;
            used[best] = 1;
            sel[k] = best;
        }
    }
    double sum = 0, y = 0;
    for (int k = 0; k < MK; k++) sum += s[sel[k]];
    for (int k = 0; k < MK; k++) {
        int e = sel[k];
        if (sel_out) sel_out[k] = e;
        double wt = s[e] / sum * scale;
        for (int j = 0; j < MI; j++) {
            double g = 0, p = 0;
            for (int i = 0; i < MD; i++) g += (double)w1[e][j * MD + i] * x[i], p += (double)w3[e][j * MD + i] * x[i];
            g = fmin(g, limit);
            p = fmax(fmin(p, limit), -limit);
            y += w2[e][out_i * MI + j] * (g / (1 + exp(-g)) * p * wt);
        }
    }
    return y;
}

static void moe_case(int hash) {
    float gate[ME * MD], bias[ME], *w1[ME], *w2[ME], *w3[ME], x[MD], out[MD];
    be_weight *bw1[ME], *bw2[ME], *bw3[ME];
    fill_rand(gate, ME * MD, 1);
    fill_rand(x, MD, 1);
    for (int e = 0; e < ME; e++) {
        w1[e] = xmalloc(sizeof(float) * MI * MD);
        w3[e] = xmalloc(sizeof(float) * MI * MD);
        w2[e] = xmalloc(sizeof(float) * MD * MI);
        fill_rand(w1[e], MI * MD, 3); /* large: the clamp at 1.0 below engages */
        fill_rand(w3[e], MI * MD, 3);
        fill_rand(w2[e], MD * MI, 1);
        ck_weight a = f32w(w1[e], MI, MD), b = f32w(w2[e], MD, MI), c = f32w(w3[e], MI, MD);
        bw1[e] = B->ops->weight(B, &a);
        bw2[e] = B->ops->weight(B, &b);
        bw3[e] = B->ops->weight(B, &c);
    }
    /* the bias pushes the expert with the lowest score into the selection */
    double s[ME];
    int lowest = 0;
    for (int e = 0; e < ME; e++) {
        double l = 0;
        for (int i = 0; i < MD; i++) l += (double)gate[e * MD + i] * x[i];
        s[e] = l;
        if (l < s[lowest]) lowest = e;
        bias[e] = 0;
    }
    bias[lowest] = 100;
    int64_t tid2eid[2 * MK] = {3, 1, 0, 2};
    ck_weight gw = f32w(gate, ME, MD);
    be_weight *bg = B->ops->weight(B, &gw);
    be_moe_layer L = {.n_experts = ME, .top_k = MK, .inter = MI, .hidden = MD, .gate = bg,
                      .bias = hash ? NULL : bias, .tid2eid = hash ? tid2eid : NULL, .vocab = 2,
                      .w1 = (const be_weight **)bw1, .w2 = (const be_weight **)bw2,
                      .w3 = (const be_weight **)bw3, .route_scale = 1.5f, .swiglu_limit = 1.0f,
                      .norm_topk = 1};
    int32_t id = 1;
    B->ops->moe(B, &L, x, &id, 1, out);
    int sel[MK];
    for (int i = 0; i < MD; i++) {
        double r = ref_moe_row(x, gate, hash ? NULL : bias, hash ? tid2eid + MK : NULL, w1, w2, w3,
                               1.0, 1.5, i, sel);
        CLOSE(out[i], r, 1e-5);
    }
    if (hash) ck_assert(sel[0] == 0 && sel[1] == 2);
    else ck_assert(sel[0] == lowest);
    for (int e = 0; e < ME; e++) {
        B->ops->weight_free(B, bw1[e]);
        B->ops->weight_free(B, bw2[e]);
        B->ops->weight_free(B, bw3[e]);
        free(w1[e]);
        free(w2[e]);
        free(w3[e]);
    }
    B->ops->weight_free(B, bg);
}

START_TEST(moe_score_routing_bias_selects_only) { moe_case(0); }
END_TEST
START_TEST(moe_hash_routing) { moe_case(1); }
END_TEST

int main(void) {
    Suite *s = suite_create("ops");
    TCase *tc = tcase_create("cpu");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, rope_tables_v4_flash);
    tcase_add_test(tc, rope_tables_tiny);
    tcase_add_test(tc, rope_inverse_and_pairs);
    tcase_add_test(tc, mhc_pre_post);
    tcase_add_test(tc, attention_sink_only_in_denominator);
    tcase_add_test(tc, compress_hca_like);
    tcase_add_test(tc, compress_csa_overlap);
    tcase_add_test(tc, compress_csa_chunked);
    tcase_add_test(tc, index_topk_matches_brute_force);
    tcase_add_test(tc, moe_score_routing_bias_selects_only);
    tcase_add_test(tc, moe_hash_routing);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
