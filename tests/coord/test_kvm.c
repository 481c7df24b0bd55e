/* test_kvm.c — the KV manager (coordinator/engine/kvm.c): hash chains, lookups that leave one
 * token to compute, pending entries, LRU eviction of leaves only, units accounting, reset.
 *
 * Why: the coordinator and the workers must agree block for block; every rule the scheduler
 * relies on is checked here without workers. Block size 128 keeps the prompts small. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "coordinator/engine/kvm.h"

#define B 128

static int32_t toks[8 * B];

static void fill(int32_t seed) {
    for (int i = 0; i < 8 * B; i++) toks[i] = (seed * 7919 + i * 31) % 1024;
}

/* Caches blocks [0, n) of toks as one chain, committed. */
static void cache_chain(kvm *k, int n) {
    uint64_t parent = 0;
    for (int i = 0; i < n; i++) {
        uint64_t h = kvm_chain_hash(parent, toks + i * B, B), id;
        kvm_save(k, parent, h, &id);
        parent = h;
    }
    kvm_step_end(k, 1);
}

START_TEST(hash_chain_is_sha256_of_parent_and_ids) {
    fill(1);
    uint64_t h1 = kvm_chain_hash(0, toks, B), h2 = kvm_chain_hash(h1, toks + B, B);
    /* independent recomputation: SHA-256(parent LE64 || ids LE32), first 8 bytes LE */
    unsigned char buf[8 + 4 * B], md[32];
    unsigned int len;
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(h1 >> (8 * i));
    for (int j = 0; j < B; j++)
        for (int i = 0; i < 4; i++) buf[8 + 4 * j + i] = (unsigned char)((uint32_t)toks[B + j] >> (8 * i));
    ck_assert(EVP_Digest(buf, sizeof buf, md, &len, EVP_sha256(), NULL));
    uint64_t want = 0;
    for (int i = 7; i >= 0; i--) want = want << 8 | md[i];
    ck_assert_uint_eq(h2, want);
    /* a chain depends on every earlier block: same block 2 after another block 1 differs */
    fill(2);
    ck_assert_uint_ne(kvm_chain_hash(kvm_chain_hash(0, toks, B), toks + B, B), h2);
    ck_assert_uint_ne(h1, kvm_chain_hash(0, toks, B));
}
END_TEST

START_TEST(lookup_leaves_one_token) {
    kvm *k = kvm_new(B);
    kvm_reset(k, 100, 2, 4096);
    fill(3);
    cache_chain(k, 3);
    uint64_t hs[8], ids[8];
    /* exactly 3 blocks of prompt: only 2 may be restored (the last token must be computed) */
    ck_assert_uint_eq(kvm_lookup(k, toks, 3 * B, hs, ids), 2);
    ck_assert_uint_eq(kvm_lookup(k, toks, 3 * B + 1, hs, ids), 3);
    ck_assert_uint_eq(hs[0], kvm_chain_hash(0, toks, B));
    ck_assert_uint_eq(kvm_lookup(k, toks, B, hs, ids), 0);
    ck_assert_uint_eq(kvm_lookup(k, toks, 1, hs, ids), 0);
    /* a changed tail: the common prefix still hits */
    toks[2 * B + 5] ^= 1;
    ck_assert_uint_eq(kvm_lookup(k, toks, 4 * B, hs, ids), 2);
    /* a changed first block: nothing */
    toks[0] ^= 1;
    ck_assert_uint_eq(kvm_lookup(k, toks, 4 * B, hs, ids), 0);
    kvm_step_end(k, 1);
    kvm_note_query(k, 400, 256);
    kvm_stats st;
    kvm_get_stats(k, &st);
    ck_assert_uint_eq(st.queries, 400);
    ck_assert_uint_eq(st.hits, 256);
    kvm_free(k);
}
END_TEST

START_TEST(pending_entries_commit_or_vanish) {
    kvm *k = kvm_new(B);
    kvm_reset(k, 100, 1, 0);
    fill(4);
    uint64_t h = kvm_chain_hash(0, toks, B), id, id2, hs[4], ids[4];
    ck_assert_int_eq(kvm_save(k, 0, h, &id), 1);
    ck_assert_int_eq(kvm_save(k, 0, h, &id2), 0); /* already there (pending) */
    ck_assert_uint_eq(kvm_lookup(k, toks, 2 * B, hs, ids), 0); /* pending: not restorable */
    ck_assert_int_eq(kvm_next_pending(k, toks, 2 * B, 0, 0), 1); /* ...but coming next step */
    ck_assert_int_eq(kvm_next_pending(k, toks, B, 0, 0), 0);     /* not needed: leaves 1 token */
    kvm_step_end(k, 0);                                        /* the step failed */
    kvm_stats st;
    kvm_get_stats(k, &st);
    ck_assert_uint_eq(st.entries, 0);
    ck_assert_uint_eq(st.used_blocks, 0);
    uint64_t *drops;
    ck_assert_uint_eq(kvm_take_drops(k, &drops), 0); /* never written: nothing to drop */
    ck_assert_int_eq(kvm_save(k, 0, h, &id), 1);
    kvm_step_end(k, 1);
    ck_assert_uint_eq(kvm_lookup(k, toks, 2 * B, hs, ids), 1);
    ck_assert_uint_eq(ids[0], id);
    ck_assert_int_eq(kvm_next_pending(k, toks, 2 * B, 0, 0), 0); /* committed now */
    kvm_step_end(k, 1);
    /* a child whose parent is not cached is not saved (it could never be found) */
    uint64_t orphan = kvm_chain_hash(12345, toks + B, B);
    ck_assert_int_eq(kvm_save(k, 12345, orphan, &id2), 0);
    kvm_free(k);
}
END_TEST

START_TEST(lru_evicts_leaves_only) {
    kvm *k = kvm_new(B);
    kvm_reset(k, 6, 2, 0); /* room for 3 cached blocks */
    fill(5);
    cache_chain(k, 2); /* chain A: a1 <- a2 */
    uint64_t a1 = kvm_chain_hash(0, toks, B);
    int32_t other[B];
    for (int i = 0; i < B; i++) other[i] = 1000 - i;
    uint64_t c1 = kvm_chain_hash(0, other, B), id;
    ck_assert_int_eq(kvm_save(k, 0, c1, &id), 1); /* C: newest */
    kvm_step_end(k, 1);
    /* a fourth block needs room: the LRU leaf is a2 (a1 is not a leaf) */
    int32_t third[B];
    for (int i = 0; i < B; i++) third[i] = 500 + i;
    uint64_t d1 = kvm_chain_hash(0, third, B);
    ck_assert_int_eq(kvm_save(k, 0, d1, &id), 1);
    kvm_step_end(k, 1);
    uint64_t *drops;
    ck_assert_uint_eq(kvm_take_drops(k, &drops), 1);
    uint64_t hs[8], ids[8];
    ck_assert_uint_eq(kvm_lookup(k, toks, 3 * B, hs, ids), 1); /* a1 stays, a2 went */
    ck_assert_uint_eq(hs[0], a1);
    free(drops);
    /* a live sequence needs room: the LRU leaf not pinned by that lookup goes (C, then D) */
    uint32_t held = 0;
    ck_assert_int_eq(kvm_seq_grow(k, &held, 2 * B), 0); /* 2 blocks: evicts C */
    ck_assert_uint_eq(kvm_take_drops(k, &drops), 1);
    ck_assert_uint_eq(drops[0], 3); /* ids: a1 1, a2 2, C 3, D 4 */
    free(drops);
    ck_assert_int_eq(kvm_seq_grow(k, &held, 5 * B), -1); /* D goes, a1 is pinned: short */
    ck_assert_uint_eq(held, 2);
    kvm_step_end(k, 1); /* pins released: a1 may go now */
    ck_assert_int_eq(kvm_seq_grow(k, &held, 5 * B), 0);
    ck_assert_uint_eq(held, 5);
    ck_assert_uint_eq(kvm_take_drops(k, &drops), 2);
    free(drops);
    kvm_stats st;
    kvm_get_stats(k, &st);
    ck_assert_uint_eq(st.entries, 0);
    ck_assert_uint_eq(st.used_blocks, 5);
    kvm_free(k);
}
END_TEST

START_TEST(units_accounting) {
    kvm *k = kvm_new(B);
    kvm_reset(k, 10, 3, 1000);
    uint32_t a = 0, b = 0;
    ck_assert_int_eq(kvm_seq_grow(k, &a, 1), 0);
    ck_assert_uint_eq(a, 1);
    ck_assert_int_eq(kvm_seq_grow(k, &a, B), 0);
    ck_assert_uint_eq(a, 1);
    ck_assert_int_eq(kvm_seq_grow(k, &a, B + 1), 0);
    ck_assert_uint_eq(a, 2);
    ck_assert_int_eq(kvm_seq_grow(k, &b, 5 * B), 0);
    kvm_stats st;
    kvm_get_stats(k, &st);
    ck_assert_uint_eq(st.live_blocks, 7);
    fill(6);
    uint64_t h = kvm_chain_hash(0, toks, B), id;
    ck_assert_int_eq(kvm_save(k, 0, h, &id), 1); /* 3 units: 10 used */
    kvm_step_end(k, 1);
    kvm_get_stats(k, &st);
    ck_assert_uint_eq(st.used_blocks, 10);
    ck_assert_int_eq(kvm_save(k, h, kvm_chain_hash(h, toks + B, B), &id), 0); /* no room */
    uint32_t c = 0;
    ck_assert_int_eq(kvm_seq_grow(k, &c, 1), 0); /* evicts the cached block */
    kvm_get_stats(k, &st);
    ck_assert_uint_eq(st.entries, 0);
    ck_assert_uint_eq(st.used_blocks, 8);
    ck_assert_uint_eq(st.evictions, 1);
    ck_assert_int_eq(kvm_seq_grow(k, &c, 4 * B), -1); /* would need 11 */
    ck_assert_uint_eq(c, 1);
    kvm_seq_free(k, &b);
    ck_assert_uint_eq(b, 0);
    ck_assert_int_eq(kvm_seq_grow(k, &c, 4 * B), 0);
    kvm_get_stats(k, &st);
    ck_assert_uint_eq(st.used_blocks, 6);
    kvm_free(k);
}
END_TEST

START_TEST(flush_and_reset) {
    kvm *k = kvm_new(B);
    kvm_reset(k, 100, 1, 64);
    fill(7);
    cache_chain(k, 4);
    uint64_t hs[8], ids[8], *drop;
    ck_assert_uint_eq(kvm_lookup(k, toks, 2 * B + 1, hs, ids), 2); /* pins the first two */
    size_t n = kvm_flush(k, &drop);
    ck_assert_uint_eq(n, 2); /* blocks 3 and 4; the pinned chain stays */
    free(drop);
    kvm_step_end(k, 1);
    n = kvm_flush(k, &drop);
    ck_assert_uint_eq(n, 2);
    free(drop);
    kvm_stats st;
    kvm_get_stats(k, &st);
    ck_assert_uint_eq(st.entries, 0);
    ck_assert_uint_eq(kvm_take_drops(k, &drop), 0); /* flushed ids went out via Release */
    /* reset: everything forgotten, new budget */
    cache_chain(k, 3);
    uint32_t held = 0;
    kvm_seq_grow(k, &held, 3 * B);
    kvm_reset(k, 50, 2, 64);
    kvm_get_stats(k, &st);
    ck_assert_uint_eq(st.entries, 0);
    ck_assert_uint_eq(st.live_blocks, 0);
    ck_assert_uint_eq(st.blocks_total, 50);
    ck_assert_uint_eq(kvm_lookup(k, toks, 4 * B, hs, ids), 0);
    /* no budget reported: no accounting, no cache */
    kvm_reset(k, 0, 1, 0);
    ck_assert_int_eq(kvm_enabled(k), 0);
    uint64_t id;
    ck_assert_int_eq(kvm_seq_grow(k, &held, 1000 * B), 0);
    ck_assert_int_eq(kvm_save(k, 0, 1, &id), 0);
    kvm_free(k);
}
END_TEST

START_TEST(index_survives_churn) {
    /* many entries in and out: every committed chain block stays findable */
    kvm *k = kvm_new(B);
    kvm_reset(k, 64, 1, 0);
    for (int round = 0; round < 200; round++) {
        fill(round + 100);
        cache_chain(k, 3);
        uint64_t hs[8], ids[8];
        ck_assert_uint_eq(kvm_lookup(k, toks, 3 * B + 1, hs, ids), 3);
        kvm_step_end(k, 1);
        uint64_t *d;
        free((kvm_take_drops(k, &d), d));
        kvm_stats st;
        kvm_get_stats(k, &st);
        ck_assert_uint_le(st.used_blocks, 64);
    }
    kvm_free(k);
}
END_TEST

int main(void) {
    Suite *s = suite_create("kvm");
    TCase *tc = tcase_create("kvm");
    tcase_add_test(tc, hash_chain_is_sha256_of_parent_and_ids);
    tcase_add_test(tc, lookup_leaves_one_token);
    tcase_add_test(tc, pending_entries_commit_or_vanish);
    tcase_add_test(tc, lru_evicts_leaves_only);
    tcase_add_test(tc, units_accounting);
    tcase_add_test(tc, flush_and_reset);
    tcase_add_test(tc, index_survives_churn);
    suite_add_tcase(s, tc);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}
