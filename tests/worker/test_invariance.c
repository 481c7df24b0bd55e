/* test_invariance.c — batch, chunking and prefix-restore invariance of the forward pass, and
 * the block accounting of sequence state and snapshots (model API, tiny model, CPU backend).
 *
 * Why: the coordinator promises byte-identical outputs whether a request runs alone or among
 * others, and a prefix-cache hit must give logits IDENTICAL to a cold prefill. So a sequence's
 * logits must not depend on which sequences share its step, on how its prompt was chunked, or
 * on whether its prefix came from snapshots. Every comparison here is memcmp-exact. The
 * accounting tests pin "memory in use equals the accounted units" (design doc) and the sizes
 * of the real DeepSeek-V4-Flash shapes. With KV_DTYPE bf16 every test runs on bf16 KV state
 * (rings, compressed entries, indexer keys): rounding is deterministic, so every invariance
 * must still hold bit for bit, and the accounting must follow the dtype.
 *
 * usage: test_invariance MODEL_DIR [KV_DTYPE: f32 (default) | bf16]
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "worker/model.h"

static const char *g_model;
static dv4_kv_dtype g_dt;   /* KV dtype under test */
static be *g_b;
static dv4_model *g_m;
static int V;

enum { B = 128, N = 400 };  /* block size; prompt length (crosses CSA, HCA and block bounds) */
static int32_t g_ids[N + 8], g_other[2][N];
static float *g_ref;        /* cold single-chunk prefill of g_ids: [N, V] */

static void setup(void) {
    char err[512];
    g_b = be_cpu_create(2);
    ck_assert_msg(dv4_load(g_model, g_b, NULL, &g_m, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(dv4_set_block_size(g_m, B, err, sizeof err), 0);
    ck_assert_msg(dv4_set_kv_dtype(g_m, g_dt, err, sizeof err) == 0, "%s", err);
    V = dv4_cfg(g_m)->vocab_size;
    for (int i = 0; i < N + 8; i++) g_ids[i] = (int32_t)((i * 7919 + 13) % V);
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < N; i++) g_other[k][i] = (int32_t)((i * 31 + 101 * k + 5) % V);
    g_ref = xmalloc((size_t)N * V * sizeof *g_ref);
    dv4_seq *s;
    ck_assert(dv4_seq_new(g_m, 4096, &s, err, sizeof err) == 0);
    dv4_chunk ch = {s, g_ids, N, DV4_LOGITS_ALL};
    ck_assert_msg(dv4_forward(g_m, &ch, 1, g_ref, err, sizeof err) == 0, "%s", err);
    dv4_seq_free(g_m, s);
}

static void teardown(void) {
    free(g_ref);
    dv4_free(g_m);
    g_b->ops->destroy(g_b);
}

/* Runs one chunk of s over ids[pos, pos+n) with every row's logits into out[pos...]. */
static void run(dv4_seq *s, const int32_t *ids, int n, float *out) {
    char err[512];
    int pos = dv4_seq_pos(s);
    dv4_chunk ch = {s, ids + pos, n, DV4_LOGITS_ALL};
    ck_assert_msg(dv4_forward(g_m, &ch, 1, out + (size_t)pos * V, err, sizeof err) == 0, "%s",
                  err);
}

/* memcmp-exact rows [lo, hi) of got against the cold reference */
static void same_rows(const float *got, int lo, int hi, const char *what) {
    for (int r = lo; r < hi; r++)
        ck_assert_msg(!memcmp(got + (size_t)r * V, g_ref + (size_t)r * V, (size_t)V * sizeof *got),
                      "%s: logits of position %d differ from the cold prefill", what, r);
}

START_TEST(chunking_is_invariant) {
    char err[512];
    static const int cuts[][8] = {{1, 7, 100, 20, 128, 144, 0}, {128, 128, 128, 16, 0},
                                  {3, 397, 0}};
    float *got = xmalloc((size_t)N * V * sizeof *got);
    for (size_t c = 0; c < sizeof cuts / sizeof *cuts; c++) {
        dv4_seq *s;
        ck_assert(dv4_seq_new(g_m, 4096, &s, err, sizeof err) == 0);
        for (int i = 0; cuts[c][i]; i++) run(s, g_ids, cuts[c][i], got);
        ck_assert_int_eq(dv4_seq_pos(s), N);
        same_rows(got, 0, N, "chunked prefill");
        dv4_seq_free(g_m, s);
    }
    /* token by token (decode) for the first 140 positions */
    dv4_seq *s;
    ck_assert(dv4_seq_new(g_m, 4096, &s, err, sizeof err) == 0);
    for (int i = 0; i < 140; i++) run(s, g_ids, 1, got);
    same_rows(got, 0, 140, "one token at a time");
    dv4_seq_free(g_m, s);
    free(got);
}
END_TEST

START_TEST(restore_is_invariant) {
    char err[512];
    float *got = xmalloc((size_t)N * V * sizeof *got);
    /* a donor saves blocks [0,128), [128,256), [256,384): chunks that end on the boundaries */
    dv4_seq *d;
    dv4_snap *snap[3];
    ck_assert(dv4_seq_new(g_m, 4096, &d, err, sizeof err) == 0);
    ck_assert_int_ne(dv4_snap_save(g_m, d, &snap[0], err, sizeof err), 0); /* position 0 */
    run(d, g_ids, 50, got);
    ck_assert_int_ne(dv4_snap_save(g_m, d, &snap[0], err, sizeof err), 0); /* not a boundary */
    ck_assert_ptr_nonnull(strstr(err, "multiple of the block size"));
    run(d, g_ids, 78, got);
    for (int k = 0; k < 3; k++) {
        if (k) run(d, g_ids, B, got);
        ck_assert_int_eq(dv4_snap_save(g_m, d, &snap[k], err, sizeof err), 0);
        ck_assert_int_eq(dv4_snap_end(snap[k]), (k + 1) * B);
    }
    dv4_seq_free(g_m, d); /* snapshots live on their own */
    for (int n = 1; n <= 3; n++) {
        dv4_seq *s;
        ck_assert_msg(dv4_seq_restore(g_m, 4096, snap, n, &s, err, sizeof err) == 0, "%s", err);
        ck_assert_int_eq(dv4_seq_pos(s), n * B);
        /* the tail in two chunks, then three decode steps past the prompt */
        int tail = N - n * B;
        run(s, g_ids, tail / 2, got);
        run(s, g_ids, tail - tail / 2, got);
        same_rows(got, n * B, N, "restored prefix + tail");
        dv4_seq_free(g_m, s);
    }
    /* a chain out of order is refused with a sentence */
    dv4_snap *bad[2] = {snap[1], snap[0]};
    dv4_seq *s = NULL;
    ck_assert_int_ne(dv4_seq_restore(g_m, 4096, bad, 2, &s, err, sizeof err), 0);
    ck_assert_ptr_null(s);
    ck_assert_ptr_nonnull(strstr(err, "ends at position"));
    for (int k = 0; k < 3; k++) dv4_snap_free(g_m, snap[k]);
    free(got);
}
END_TEST

/* decode continues identically after a restore: 6 tokens past the prompt, cold vs restored */
START_TEST(restore_then_decode_is_invariant) {
    char err[512];
    enum { P = 2 * B + 3, STEPS = 6 };
    float *a = xmalloc((size_t)(P + STEPS) * V * sizeof *a);
    float *b = xmalloc((size_t)(P + STEPS) * V * sizeof *b);
    dv4_seq *cold, *warm;
    dv4_snap *snap[2];
    ck_assert(dv4_seq_new(g_m, 4096, &cold, err, sizeof err) == 0);
    run(cold, g_ids, B, a);
    ck_assert_int_eq(dv4_snap_save(g_m, cold, &snap[0], err, sizeof err), 0);
    run(cold, g_ids, B, a);
    ck_assert_int_eq(dv4_snap_save(g_m, cold, &snap[1], err, sizeof err), 0);
    run(cold, g_ids, 3, a);
    ck_assert_int_eq(dv4_seq_restore(g_m, 4096, snap, 2, &warm, err, sizeof err), 0);
    run(warm, g_ids, 3, b);
    for (int i = 0; i < STEPS; i++) {
        run(cold, g_ids, 1, a);
        run(warm, g_ids, 1, b);
    }
    size_t off = (size_t)2 * B * V, n = (size_t)(3 + STEPS) * V * sizeof *a;
    ck_assert_msg(!memcmp(a + off, b + off, n), "decode after a restore differs");
    dv4_seq_free(g_m, cold);
    dv4_seq_free(g_m, warm);
    dv4_snap_free(g_m, snap[0]);
    dv4_snap_free(g_m, snap[1]);
    free(a);
    free(b);
}
END_TEST

START_TEST(batching_is_invariant) {
    char err[512];
    /* alone: g_ref. Batched: the same prompt beside two others of other lengths, in both
     * orders, prefill then three decode steps; decode alone for comparison. */
    for (int order = 0; order < 2; order++) {
        dv4_seq *s[3];
        for (int k = 0; k < 3; k++) ck_assert(dv4_seq_new(g_m, 4096, &s[k], err, sizeof err) == 0);
        dv4_chunk ch[3] = {{s[0], g_ids, N, DV4_LOGITS_ALL},
                           {s[1], g_other[0], 57, DV4_LOGITS_LAST},
                           {s[2], g_other[1], 233, DV4_LOGITS_ALL}};
        if (order) { /* ours last */
            dv4_chunk t = ch[0];
            ch[0] = ch[2], ch[2] = t;
        }
        int rows = dv4_logit_rows(ch, 3);
        float *out = xmalloc((size_t)rows * V * sizeof *out);
        ck_assert(dv4_forward(g_m, ch, 3, out, err, sizeof err) == 0);
        float *ours = out + (order ? (size_t)(233 + 1) * V : 0);
        ck_assert_msg(!memcmp(ours, g_ref, (size_t)N * V * sizeof *out),
                      "batched prefill (order %d) differs from the prompt alone", order);
        free(out);
        /* decode: three steps of all three vs the same sequence alone */
        dv4_seq *alone;
        ck_assert(dv4_seq_new(g_m, 4096, &alone, err, sizeof err) == 0);
        dv4_chunk a0 = {alone, g_ids, N, DV4_LOGITS_NONE};
        ck_assert(dv4_forward(g_m, &a0, 1, NULL, err, sizeof err) == 0);
        float la[1024 * 4], lb[3 * 1024 * 4];
        ck_assert_int_le(V, 4096);
        for (int st = 0; st < 3; st++) {
            dv4_chunk d[3] = {{s[0], g_ids + N + st, 1, DV4_LOGITS_LAST},
                              {s[1], g_other[0] + 57 + st, 1, DV4_LOGITS_LAST},
                              {s[2], g_other[1] + 233 + st, 1, DV4_LOGITS_LAST}};
            if (order) {
                dv4_chunk t = d[0];
                d[0] = d[2], d[2] = t;
            }
            ck_assert(dv4_forward(g_m, d, 3, lb, err, sizeof err) == 0);
            dv4_chunk one = {alone, g_ids + N + st, 1, DV4_LOGITS_LAST};
            ck_assert(dv4_forward(g_m, &one, 1, la, err, sizeof err) == 0);
            ck_assert_msg(!memcmp(la, lb + (order ? 2 * (size_t)V : 0), (size_t)V * sizeof *la),
                          "batched decode step %d (order %d) differs from decode alone", st,
                          order);
        }
        dv4_seq_free(g_m, alone);
        for (int k = 0; k < 3; k++) dv4_seq_free(g_m, s[k]);
    }
}
END_TEST

START_TEST(accounting_matches_memory) {
    char err[512];
    dv4_kv_sizes z;
    ck_assert_int_eq(dv4_kv_sizes_of(dv4_cfg(g_m), B, g_dt, &z, err, sizeof err), 0);
    ck_assert_uint_gt(z.block_bytes, 0);
    ck_assert_uint_gt(z.fixed_bytes, z.resume_bytes);
    dv4_seq *s;
    ck_assert(dv4_seq_new(g_m, 4096, &s, err, sizeof err) == 0);
    ck_assert_uint_eq(dv4_seq_grown_bytes(g_m, s), 0);
    /* the dtype is fixed while a sequence exists */
    dv4_kv_dtype other = g_dt == DV4_KV_F32 ? DV4_KV_BF16 : DV4_KV_F32;
    ck_assert_int_eq(dv4_set_kv_dtype(g_m, other, err, sizeof err), DUET_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "before the first sequence"));
    ck_assert_int_eq(dv4_get_kv_dtype(g_m), g_dt);
    float *lg = xmalloc((size_t)V * sizeof *lg);
    int pos = 0;
    static const int steps[] = {1, 126, 1, 1, 200, 55, 1};
    for (size_t i = 0; i < sizeof steps / sizeof *steps; i++) {
        dv4_chunk ch = {s, g_ids + pos, steps[i], DV4_LOGITS_LAST};
        ck_assert(dv4_forward(g_m, &ch, 1, lg, err, sizeof err) == 0);
        pos += steps[i];
        ck_assert_uint_eq(dv4_seq_grown_bytes(g_m, s), (uint64_t)((pos + B - 1) / B) * z.block_bytes);
    }
    ck_assert_int_eq(pos, 3 * B + 1);
    ck_assert_int_eq(dv4_seq_reserve(g_m, s, 4097, err, sizeof err), DUET_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "capacity"));
    dv4_seq_free(g_m, s);
    ck_assert(dv4_seq_new(g_m, 4096, &s, err, sizeof err) == 0);
    dv4_chunk ch = {s, g_ids, B, DV4_LOGITS_NONE};
    ck_assert(dv4_forward(g_m, &ch, 1, NULL, err, sizeof err) == 0);
    dv4_snap *p;
    ck_assert_int_eq(dv4_snap_save(g_m, s, &p, err, sizeof err), 0);
    ck_assert_uint_eq(dv4_snap_bytes(p), z.block_bytes + z.resume_bytes);
    printf("tiny model, KV %s, B = %d: block %llu B, resume %llu B, fixed %llu B per sequence, "
           "snapshot %llu B\n", dv4_kv_dtype_name(g_dt), B, (unsigned long long)z.block_bytes,
           (unsigned long long)z.resume_bytes, (unsigned long long)z.fixed_bytes,
           (unsigned long long)dv4_snap_bytes(p));
    dv4_snap_free(g_m, p);
    dv4_seq_free(g_m, s);
    free(lg);
    /* block sizes that are not multiples of 128 are refused */
    ck_assert_int_eq(dv4_set_block_size(g_m, 192, err, sizeof err), DUET_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "multiple of 128"));
    ck_assert_int_eq(dv4_block_size(g_m), B);
}
END_TEST

/* Paged state (worker/kvstate.c): snapshots and restored sequences share the cached blocks'
 * pages in place; a page lives while anything holds it; the pool refuses past its limit. */
START_TEST(pages_are_shared) {
    char err[512];
    dv4_kv_sizes z;
    ck_assert_int_eq(dv4_kv_sizes_of(dv4_cfg(g_m), B, g_dt, &z, err, sizeof err), 0);
    int n_res = (int)((z.resume_bytes + z.block_bytes - 1) / z.block_bytes), used0, alloc;
    dv4_kv_pool_stats(g_m, &used0, &alloc);
    float *la = xmalloc((size_t)V * sizeof *la), *lb = xmalloc((size_t)V * sizeof *lb);
    dv4_seq *s, *r, *cold;
    dv4_snap *p[2];
    ck_assert(dv4_seq_new(g_m, 4096, &s, err, sizeof err) == 0);
    for (int k = 0; k < 2; k++) {
        dv4_chunk ch = {s, g_ids + k * B, B, DV4_LOGITS_NONE};
        ck_assert(dv4_forward(g_m, &ch, 1, NULL, err, sizeof err) == 0);
        ck_assert_int_eq(dv4_snap_save(g_m, s, &p[k], err, sizeof err), 0);
    }
    int used;
    dv4_kv_pool_stats(g_m, &used, &alloc);
    ck_assert_int_eq(used - used0, 2 + 2 * n_res); /* the blocks' pages counted once */
    ck_assert_int_eq(dv4_seq_restore(g_m, 4096, p, 2, &r, err, sizeof err), 0);
    dv4_kv_pool_stats(g_m, &used, &alloc);
    ck_assert_int_eq(used - used0, 2 + 2 * n_res); /* restoring copies no block */
    /* the saving sequence and the snapshots go; the restored sequence still reads their pages */
    dv4_seq_free(g_m, s);
    dv4_snap_free(g_m, p[0]);
    dv4_snap_free(g_m, p[1]);
    dv4_kv_pool_stats(g_m, &used, &alloc);
    ck_assert_int_eq(used - used0, 2);
    dv4_chunk one = {r, g_ids + 2 * B, 1, DV4_LOGITS_LAST};
    ck_assert(dv4_forward(g_m, &one, 1, la, err, sizeof err) == 0);
    ck_assert(dv4_seq_new(g_m, 4096, &cold, err, sizeof err) == 0);
    dv4_chunk all = {cold, g_ids, 2 * B + 1, DV4_LOGITS_LAST};
    ck_assert(dv4_forward(g_m, &all, 1, lb, err, sizeof err) == 0);
    ck_assert_msg(!memcmp(la, lb, (size_t)V * sizeof *la),
                  "a sequence restored from pages whose other holders are gone differs from a "
                  "cold prefill");
    /* at the limit, growing fails with a sentence and holds nothing more */
    dv4_kv_pool_stats(g_m, &used, &alloc);
    dv4_kv_pool_limit(g_m, used + 1);
    ck_assert_int_eq(dv4_seq_reserve(g_m, r, 5 * B, err, sizeof err), DUET_ENOMEM);
    ck_assert_ptr_nonnull(strstr(err, "pool is full"));
    int after;
    dv4_kv_pool_stats(g_m, &after, &alloc);
    ck_assert_int_eq(after, used);
    /* a prefix save needs pages for its resume state: refused at the limit, nothing held */
    dv4_seq *zs;
    ck_assert(dv4_seq_new(g_m, 4096, &zs, err, sizeof err) == 0);
    dv4_chunk zb = {zs, g_ids, B, DV4_LOGITS_NONE};
    dv4_kv_pool_limit(g_m, 0);
    ck_assert(dv4_forward(g_m, &zb, 1, NULL, err, sizeof err) == 0);
    dv4_kv_pool_stats(g_m, &used, &alloc);
    dv4_kv_pool_limit(g_m, used);
    dv4_snap *zp = NULL;
    ck_assert_int_eq(dv4_snap_save(g_m, zs, &zp, err, sizeof err), DUET_ENOMEM);
    ck_assert_ptr_nonnull(strstr(err, "cannot save a prefix block"));
    ck_assert_ptr_null(zp);
    dv4_kv_pool_stats(g_m, &after, &alloc);
    ck_assert_int_eq(after, used);
    dv4_seq_free(g_m, zs);
    dv4_kv_pool_limit(g_m, 0);
    dv4_seq_free(g_m, r);
    dv4_seq_free(g_m, cold);
    dv4_kv_pool_stats(g_m, &used, &alloc);
    ck_assert_int_eq(used, used0);
    free(la);
    free(lb);
}
END_TEST

/* dv4_forward_ds refuses a sample request naming a logits row the step does not have, before
 * any math (the sequence does not advance). */
START_TEST(forward_ds_refuses_bad_rows) {
    char err[512];
    dv4_seq *s;
    ck_assert(dv4_seq_new(g_m, 4096, &s, err, sizeof err) == 0);
    float *lg = xmalloc((size_t)V * sizeof *lg);
    dv4_chunk ch = {s, g_ids, 3, DV4_LOGITS_LAST};
    be_sample_req rq = {.row = 1};
    be_sample_res rs;
    dv4_dsample ds = {1, &rq, &rs, NULL};
    ck_assert_int_eq(dv4_forward_ds(g_m, &ch, 1, lg, &ds, err, sizeof err), DUET_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "names logits row 1; the step has 1"));
    ck_assert_int_eq(dv4_seq_pos(s), 0);
    rq.row = 0;
    ck_assert_msg(dv4_forward_ds(g_m, &ch, 1, lg, &ds, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(dv4_seq_pos(s), 3);
    dv4_seq_free(g_m, s);
    free(lg);
}
END_TEST

/* The real DeepSeek-V4-Flash shapes (spec §1, §3.1): 3440 state elements per token. */
START_TEST(v4_flash_sizes) {
    dv4_config c = {0};
    c.num_hidden_layers = 43;
    c.head_dim = 512;
    c.qk_rope_head_dim = 64;
    c.index_head_dim = 128;
    c.sliding_window = 128;
    c.n_compress_ratios = 44;
    for (int i = 0; i < 44; i++) c.compress_ratios[i] = i < 2 || i == 43 ? 0 : i % 2 ? 128 : 4;
    dv4_kv_sizes z;
    char err[256];
    ck_assert_int_eq(dv4_kv_sizes_of(&c, 256, DV4_KV_F32, &z, err, sizeof err), 0);
    ck_assert_uint_eq(z.block_bytes, 3440ull * 4 * 256);          /* 3,522,560 */
    ck_assert_uint_eq(z.resume_bytes, 43ull * 128 * 512 * 4 + 21ull * (2 * 4 * 512 + 2 * 4 * 128) * 4);
    ck_assert_uint_eq(z.fixed_bytes, z.resume_bytes + 21ull * (2 * 4 * 1024 + 2 * 4 * 256) * 4 +
                                         20ull * 2 * 128 * 512 * 4);
    uint64_t cost = (z.block_bytes + z.resume_bytes + z.block_bytes - 1) / z.block_bytes;
    ck_assert_uint_eq(cost, 5);
    printf("V4-Flash, B = 256: block %llu B (%.2f MiB), resume %llu B, fixed %llu B per "
           "sequence, snapshot_block_cost %llu\n", (unsigned long long)z.block_bytes,
           z.block_bytes / 1048576.0, (unsigned long long)z.resume_bytes,
           (unsigned long long)z.fixed_bytes, (unsigned long long)cost);
    ck_assert_int_eq(dv4_kv_sizes_of(&c, 100, DV4_KV_F32, &z, err, sizeof err), DUET_EINVAL);
    /* bf16: entries, keys and rings in 2 bytes (spec §3.1: 6,880 B/token), carries still f32 */
    dv4_kv_sizes h;
    ck_assert_int_eq(dv4_kv_sizes_of(&c, 256, DV4_KV_BF16, &h, err, sizeof err), 0);
    ck_assert_uint_eq(h.block_bytes, 3440ull * 2 * 256);          /* 1,761,280 */
    ck_assert_uint_eq(h.resume_bytes, 43ull * 128 * 512 * 2 + 21ull * (2 * 4 * 512 + 2 * 4 * 128) * 4);
    ck_assert_uint_eq(z.fixed_bytes - h.fixed_bytes, 43ull * 128 * 512 * 2);
    /* fp8: 584-byte rows for rings and entries, bf16 keys: 4,501.25 B/token */
    dv4_kv_sizes q;
    ck_assert_int_eq(dv4_kv_sizes_of(&c, 256, DV4_KV_FP8, &q, err, sizeof err), 0);
    ck_assert_uint_eq(q.block_bytes, 21ull * 64 * 584 + 21ull * 64 * 256 + 20ull * 2 * 584);
    ck_assert_uint_eq(q.block_bytes * 4, 4501ull * 256 * 4 + 256);
    ck_assert_uint_eq(z.resume_bytes - q.resume_bytes, 43ull * 128 * (512 * 4 - 584));
}
END_TEST

int main(int argc, char **argv) {
    char err[200];
    if (argc < 2 || argc > 3 || (argc == 3 && dv4_kv_dtype_parse(argv[2], &g_dt, err, sizeof err))) {
        fprintf(stderr, "usage: test_invariance MODEL_DIR [f32|bf16]%s%s\n", argc == 3 ? ": " : "",
                argc == 3 ? err : "");
        return 2;
    }
    g_model = argv[1];
    Suite *s = suite_create("invariance");
    TCase *t = tcase_create("invariance");
    tcase_set_timeout(t, 600);
    tcase_add_unchecked_fixture(t, setup, teardown);
    tcase_add_test(t, chunking_is_invariant);
    tcase_add_test(t, restore_is_invariant);
    tcase_add_test(t, restore_then_decode_is_invariant);
    tcase_add_test(t, batching_is_invariant);
    tcase_add_test(t, accounting_matches_memory);
    tcase_add_test(t, pages_are_shared);
    tcase_add_test(t, forward_ds_refuses_bad_rows);
    tcase_add_test(t, v4_flash_sizes);
    suite_add_tcase(s, t);
    SRunner *r = srunner_create(s);
    srunner_set_fork_status(r, CK_NOFORK);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}
