/* test_rpc.c — unit tests of common/rpc.c: the frame decoder and the auth helpers.
 *
 * Why: every byte the decoder sees is untrusted and arrives in arbitrary pieces, so the tests
 * feed the same frames split at every byte and one byte at a time, and check that each kind of
 * malformed header is refused with a sentence. Must never depend on timing or the network.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/err.h"
#include "common/rpc.h"
#include "proto/duet.pb-c.h"

/* ---- helpers ----------------------------------------------------------------------------- */

typedef struct {
    int type;
    size_t len;
    uint8_t payload[64];
} frame;

static size_t put_frame(uint8_t *out, int type, const uint8_t *payload, size_t len) {
    rpc_frame_header(out, type, len);
    memcpy(out + 5, payload, len);
    return 5 + len;
}

/* three frames: a 0-byte payload, a 3-byte one, a 40-byte one */
static size_t sample_stream(uint8_t *buf, frame *want) {
    size_t n = 0;
    want[0] = (frame){RPC_HEARTBEAT, 0, {0}};
    want[1] = (frame){RPC_HELLO, 3, {1, 2, 3}};
    want[2] = (frame){RPC_STEP_PLAN, 40, {0}};
    for (int i = 0; i < 40; i++) want[2].payload[i] = (uint8_t)(i * 7 + 1);
    for (int i = 0; i < 3; i++) n += put_frame(buf + n, want[i].type, want[i].payload, want[i].len);
    return n;
}

static int pop_all(rpc_decoder *d, frame *got, int have) {
    int type;
    const uint8_t *p;
    size_t len;
    while (rpc_decoder_next(d, &type, &p, &len) == 1) {
        ck_assert_int_lt(have, 3);
        ck_assert_uint_le(len, sizeof got[have].payload);
        got[have].type = type;
        got[have].len = len;
        memcpy(got[have].payload, p, len);
        have++;
    }
    return have;
}

static void check_same(const frame *got, const frame *want, int n) {
    for (int i = 0; i < n; i++) {
        ck_assert_int_eq(got[i].type, want[i].type);
        ck_assert_uint_eq(got[i].len, want[i].len);
        ck_assert_mem_eq(got[i].payload, want[i].payload, want[i].len ? want[i].len : 1);
    }
}

/* ---- decoder ----------------------------------------------------------------------------- */

START_TEST(split_at_every_byte) {
    uint8_t buf[256];
    frame want[3], got[3];
    size_t n = sample_stream(buf, want);
    for (size_t cut = 0; cut <= n; cut++) {
        rpc_decoder *d = rpc_decoder_new(1024);
        char err[256];
        memset(got, 0, sizeof got);
        ck_assert_int_eq(rpc_decoder_feed(d, buf, cut, err, sizeof err), 0);
        int have = pop_all(d, got, 0);
        ck_assert_int_eq(rpc_decoder_feed(d, buf + cut, n - cut, err, sizeof err), 0);
        have = pop_all(d, got, have);
        ck_assert_int_eq(have, 3);
        check_same(got, want, 3);
        ck_assert_uint_eq(rpc_decoder_buffered(d), 0);
        rpc_decoder_free(d);
    }
}
END_TEST

START_TEST(one_byte_at_a_time) {
    uint8_t buf[256];
    frame want[3], got[3];
    size_t n = sample_stream(buf, want);
    rpc_decoder *d = rpc_decoder_new(1024);
    char err[256];
    int have = 0;
    for (size_t i = 0; i < n; i++) {
        ck_assert_int_eq(rpc_decoder_feed(d, buf + i, 1, err, sizeof err), 0);
        have = pop_all(d, got, have);
    }
    ck_assert_int_eq(have, 3);
    check_same(got, want, 3);
    rpc_decoder_free(d);
}
END_TEST

START_TEST(several_frames_one_feed) {
    uint8_t buf[256];
    frame want[3], got[3];
    size_t n = sample_stream(buf, want);
    rpc_decoder *d = rpc_decoder_new(1024);
    char err[256];
    ck_assert_int_eq(rpc_decoder_feed(d, buf, n, err, sizeof err), 0);
    ck_assert_uint_eq(rpc_decoder_buffered(d), n);
    /* popped one at a time, in order */
    int type;
    const uint8_t *p;
    size_t len;
    ck_assert_int_eq(rpc_decoder_next(d, &type, &p, &len), 1);
    ck_assert_int_eq(type, RPC_HEARTBEAT);
    ck_assert_uint_eq(len, 0);
    ck_assert_int_eq(rpc_decoder_next(d, &type, &p, &len), 1);
    ck_assert_int_eq(type, RPC_HELLO);
    ck_assert_uint_eq(len, 3);
    ck_assert_int_eq(p[2], 3);
    ck_assert_int_eq(rpc_decoder_next(d, &type, &p, &len), 1);
    ck_assert_int_eq(type, RPC_STEP_PLAN);
    ck_assert_int_eq(rpc_decoder_next(d, &type, &p, &len), 0);
    (void)got;
    rpc_decoder_free(d);
}
END_TEST

START_TEST(zero_length_refused) {
    uint8_t hdr[5] = {0, 0, 0, 0, RPC_HELLO};
    rpc_decoder *d = rpc_decoder_new(1024);
    char err[256] = "";
    ck_assert_int_eq(rpc_decoder_feed(d, hdr, 5, err, sizeof err), DUET_EFORMAT);
    ck_assert_ptr_nonnull(strstr(err, "length 0"));
    int type;
    const uint8_t *p;
    size_t len;
    ck_assert_int_eq(rpc_decoder_next(d, &type, &p, &len), 0);
    /* sticky: the stream stays refused */
    ck_assert_int_eq(rpc_decoder_feed(d, hdr, 1, err, sizeof err), DUET_EFORMAT);
    rpc_decoder_free(d);
}
END_TEST

START_TEST(oversized_refused_at_header) {
    rpc_decoder *d = rpc_decoder_new(1024);
    char err[256] = "";
    uint8_t hdr[5];
    rpc_frame_header(hdr, RPC_STEP_PLAN, 1024); /* length 1025 > 1024 */
    /* the first four bytes alone are not yet a verdict (the type byte is missing) */
    ck_assert_int_eq(rpc_decoder_feed(d, hdr, 4, err, sizeof err), 0);
    ck_assert_int_eq(rpc_decoder_feed(d, hdr + 4, 1, err, sizeof err), DUET_EFORMAT);
    ck_assert_ptr_nonnull(strstr(err, "exceeds the maximum"));
    rpc_decoder_free(d);

    /* exactly the maximum is accepted */
    d = rpc_decoder_new(1024);
    uint8_t *big = calloc(1, 5 + 1023);
    rpc_frame_header(big, RPC_STEP_PLAN, 1023);
    ck_assert_int_eq(rpc_decoder_feed(d, big, 5 + 1023, err, sizeof err), 0);
    int type;
    const uint8_t *p;
    size_t len;
    ck_assert_int_eq(rpc_decoder_next(d, &type, &p, &len), 1);
    ck_assert_uint_eq(len, 1023);
    free(big);
    rpc_decoder_free(d);

    /* 0xffffffff with the default maximum */
    d = rpc_decoder_new(0);
    uint8_t huge[5] = {0xff, 0xff, 0xff, 0xff, RPC_HELLO};
    ck_assert_int_eq(rpc_decoder_feed(d, huge, 5, err, sizeof err), DUET_EFORMAT);
    rpc_decoder_free(d);
}
END_TEST

START_TEST(max_can_grow) {
    /* a small limit while unauthenticated, the full one after */
    rpc_decoder *d = rpc_decoder_new(64);
    char err[256];
    uint8_t hdr[5];
    rpc_frame_header(hdr, RPC_STEP_PLAN, 100);
    rpc_decoder *d2 = rpc_decoder_new(64);
    ck_assert_int_eq(rpc_decoder_feed(d2, hdr, 5, err, sizeof err), DUET_EFORMAT);
    rpc_decoder_free(d2);
    rpc_decoder_set_max(d, 0);
    ck_assert_int_eq(rpc_decoder_feed(d, hdr, 5, err, sizeof err), 0);
    uint8_t body[100] = {0};
    ck_assert_int_eq(rpc_decoder_feed(d, body, 100, err, sizeof err), 0);
    int type;
    const uint8_t *p;
    size_t len;
    ck_assert_int_eq(rpc_decoder_next(d, &type, &p, &len), 1);
    ck_assert_uint_eq(len, 100);
    rpc_decoder_free(d);
}
END_TEST

START_TEST(unknown_type_refused) {
    int bad[] = {0, RPC_TYPE_MAX + 1, 255};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        rpc_decoder *d = rpc_decoder_new(1024);
        char err[256] = "";
        uint8_t f[8];
        size_t n = put_frame(f, bad[i], (const uint8_t *)"ab", 2);
        ck_assert_int_eq(rpc_decoder_feed(d, f, n, err, sizeof err), DUET_EFORMAT);
        ck_assert_ptr_nonnull(strstr(err, "unknown message type"));
        rpc_decoder_free(d);
    }
}
END_TEST

START_TEST(bad_frame_after_good_ones) {
    /* a good frame followed, in the same feed, by a header with an unknown type */
    uint8_t f[32];
    size_t n = put_frame(f, RPC_HEARTBEAT, (const uint8_t *)"x", 1);
    n += put_frame(f + n, 77, (const uint8_t *)"y", 1);
    rpc_decoder *d = rpc_decoder_new(1024);
    char err[256];
    ck_assert_int_eq(rpc_decoder_feed(d, f, n, err, sizeof err), DUET_EFORMAT);
    int type;
    const uint8_t *p;
    size_t len;
    ck_assert_int_eq(rpc_decoder_next(d, &type, &p, &len), 0);
    rpc_decoder_free(d);
}
END_TEST

START_TEST(pack_round_trip) {
    Duet__Hello h = DUET__HELLO__INIT;
    uint8_t proof[RPC_PROOF_BYTES];
    memset(proof, 0xab, sizeof proof);
    h.protocol_version = RPC_PROTOCOL_VERSION;
    h.auth_proof.data = proof;
    h.auth_proof.len = sizeof proof;
    h.rank = 1;
    h.world_size = 2;
    h.model_fingerprint = 0x0123456789abcdefull;
    char err[256];
    size_t n;
    uint8_t *f = rpc_frame_pack(RPC_HELLO, &h.base, 0, &n, err, sizeof err);
    ck_assert_ptr_nonnull(f);
    rpc_decoder *d = rpc_decoder_new(0);
    ck_assert_int_eq(rpc_decoder_feed(d, f, n, err, sizeof err), 0);
    int type;
    const uint8_t *p;
    size_t len;
    ck_assert_int_eq(rpc_decoder_next(d, &type, &p, &len), 1);
    ck_assert_int_eq(type, RPC_HELLO);
    Duet__Hello *u = duet__hello__unpack(NULL, len, p);
    ck_assert_ptr_nonnull(u);
    ck_assert_uint_eq(u->model_fingerprint, 0x0123456789abcdefull);
    ck_assert_uint_eq(u->world_size, 2);
    ck_assert_mem_eq(u->auth_proof.data, proof, sizeof proof);
    duet__hello__free_unpacked(u, NULL);
    free(f);
    /* a message larger than the given maximum is refused with a sentence */
    ck_assert_ptr_null(rpc_frame_pack(RPC_HELLO, &h.base, 16, &n, err, sizeof err));
    ck_assert_ptr_nonnull(strstr(err, "exceeds the maximum frame"));
    rpc_decoder_free(d);
    ck_assert_str_eq(rpc_type_name(RPC_STEP_RESULT), "StepResult");
    ck_assert_str_eq(rpc_type_name(99), "unknown");
}
END_TEST

/* ---- auth -------------------------------------------------------------------------------- */

START_TEST(hmac_known_vector) {
    /* RFC 4231 test case 2 */
    uint8_t proof[RPC_PROOF_BYTES];
    const char *data = "what do ya want for nothing?";
    rpc_auth_proof("Jefe", (const uint8_t *)data, strlen(data), proof);
    static const uint8_t want[32] = {
        0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95, 0x75, 0xc7,
        0x5a, 0x00, 0x3f, 0x08, 0x9d, 0x27, 0x39, 0x83, 0x9d, 0xec, 0x58, 0xb9, 0x64, 0xec, 0x38, 0x43};
    ck_assert_mem_eq(proof, want, 32);
}
END_TEST

START_TEST(auth_valid_and_invalid) {
    const char *tok = "0123456789abcdef-secret";
    uint8_t nonce[RPC_NONCE_BYTES], nonce2[RPC_NONCE_BYTES], proof[RPC_PROOF_BYTES];
    rpc_random_nonce(nonce);
    rpc_random_nonce(nonce2);
    ck_assert_int_ne(memcmp(nonce, nonce2, sizeof nonce), 0);
    rpc_auth_proof(tok, nonce, sizeof nonce, proof);
    ck_assert_int_eq(rpc_auth_check(tok, nonce, sizeof nonce, proof, sizeof proof), 1);
    /* another token, another nonce, a flipped bit, a short proof, no proof */
    ck_assert_int_eq(rpc_auth_check("0123456789abcdef-secreT", nonce, sizeof nonce, proof, 32), 0);
    ck_assert_int_eq(rpc_auth_check(tok, nonce2, sizeof nonce2, proof, sizeof proof), 0);
    proof[31] ^= 1;
    ck_assert_int_eq(rpc_auth_check(tok, nonce, sizeof nonce, proof, sizeof proof), 0);
    proof[31] ^= 1;
    ck_assert_int_eq(rpc_auth_check(tok, nonce, sizeof nonce, proof, 31), 0);
    ck_assert_int_eq(rpc_auth_check(tok, nonce, sizeof nonce, NULL, 0), 0);
}
END_TEST

static void write_file(const char *path, const char *text, mode_t mode) {
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
    ck_assert_int_eq(chmod(path, mode), 0);
}

START_TEST(token_file_rules) {
    char dir[] = "/tmp/duet-rpc-test-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char path[128], tok[128], err[512];
    snprintf(path, sizeof path, "%s/token", dir);

    /* good: first line, blanks trimmed */
    write_file(path, "  0123456789abcdefXYZ \nsecond line\n", 0600);
    ck_assert_int_eq(rpc_read_token_file(path, tok, sizeof tok, err, sizeof err), 0);
    ck_assert_str_eq(tok, "0123456789abcdefXYZ");
    write_file(path, "0123456789abcdef", 0400);
    ck_assert_int_eq(rpc_read_token_file(path, tok, sizeof tok, err, sizeof err), 0);
    ck_assert_str_eq(tok, "0123456789abcdef");

    /* group- or other-accessible: refused, naming the fix */
    mode_t bad[] = {0644, 0640, 0604, 0660, 0602};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        write_file(path, "0123456789abcdefXYZ\n", bad[i]);
        ck_assert_int_eq(rpc_read_token_file(path, tok, sizeof tok, err, sizeof err),
                         DUET_EINVAL);
        ck_assert_ptr_nonnull(strstr(err, "chmod 600"));
    }

    /* too short */
    write_file(path, "short-token\n", 0600);
    ck_assert_int_eq(rpc_read_token_file(path, tok, sizeof tok, err, sizeof err), DUET_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "at least 16"));
    /* too long for the caller's buffer */
    write_file(path, "0123456789abcdef0123456789abcdef", 0600);
    ck_assert_int_eq(rpc_read_token_file(path, tok, 20, err, sizeof err), DUET_EINVAL);
    /* missing, and a directory */
    char missing[160];
    snprintf(missing, sizeof missing, "%s/nope", dir);
    ck_assert_int_eq(rpc_read_token_file(missing, tok, sizeof tok, err, sizeof err), DUET_EIO);
    ck_assert_ptr_nonnull(strstr(err, "cannot open"));
    chmod(dir, 0700);
    ck_assert_int_ne(rpc_read_token_file(dir, tok, sizeof tok, err, sizeof err), 0);

    unlink(path);
    rmdir(dir);
}
END_TEST

int main(void) {
    Suite *s = suite_create("rpc");
    TCase *t = tcase_create("decoder");
    tcase_add_test(t, split_at_every_byte);
    tcase_add_test(t, one_byte_at_a_time);
    tcase_add_test(t, several_frames_one_feed);
    tcase_add_test(t, zero_length_refused);
    tcase_add_test(t, oversized_refused_at_header);
    tcase_add_test(t, unknown_type_refused);
    tcase_add_test(t, max_can_grow);
    tcase_add_test(t, bad_frame_after_good_ones);
    tcase_add_test(t, pack_round_trip);
    suite_add_tcase(s, t);
    TCase *a = tcase_create("auth");
    tcase_add_test(a, hmac_known_vector);
    tcase_add_test(a, auth_valid_and_invalid);
    tcase_add_test(a, token_file_rules);
    suite_add_tcase(s, a);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}
