/* test_shard.c — tensor + expert parallelism over the TCP data plane, in one process.
 *
 * Why: before processes and RPC are involved, the sharded forward pass itself must give the
 * same logits as one process: each rank runs in its own thread with its own CPU backend and a
 * real TCP mesh on loopback. Checks, for 2 and 4 ranks on the tiny model: logits of a 600-token
 * prompt (fixture tokens) within 1e-5 relative L2 of the single-process run, identical on every
 * rank (replicated state must not drift), a chunked continuation, and that each rank holds
 * less than the whole model. Also: a world size that does not divide the heads is refused.
 *
 * usage: test_shard MODEL_DIR FIXTURE_FILE
 */
#include <arpa/inet.h>
#include <check.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/err.h"
#include "common/safetensors.h"
#include "worker/model.h"

static const char *g_model, *g_fix;
static int32_t *g_tok;
static int g_T, V;
static float *g_ref; /* single-process logits [T, V] */
static uint64_t g_bytes1;

enum { MAXW = 4, SPLIT = 411 };

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    ck_assert(bind(fd, (struct sockaddr *)&a, sizeof a) == 0);
    ck_assert(getsockname(fd, (struct sockaddr *)&a, &len) == 0);
    close(fd);
    return ntohs(a.sin_port);
}

typedef struct {
    int rank, world;
    const char *const *peers;
    float *logits;   /* [T, V] */
    uint64_t bytes;
    int rc;
    char err[256];
} rank_job;

/* One rank: form the mesh, load its shard, prefill [0, SPLIT) then the rest as a 2nd chunk. */
static void *rank_main(void *arg) {
    rank_job *j = arg;
    be *b = be_cpu_create(1);
    comm *cm = NULL;
    dv4_model *m = NULL;
    dv4_seq *s = NULL;
    j->rc = comm_tcp_create(j->rank, j->world, j->peers, 20000, &cm, j->err, sizeof j->err);
    dv4_shard sh = {j->rank, j->world, cm};
    if (!j->rc) j->rc = dv4_load(g_model, b, &sh, &m, j->err, sizeof j->err);
    if (!j->rc) j->bytes = dv4_rank_weight_bytes(m);
    if (!j->rc) j->rc = dv4_seq_new(m, g_T, &s, j->err, sizeof j->err);
    dv4_chunk a = {s, g_tok, SPLIT, DV4_LOGITS_ALL}, c2 = {s, g_tok + SPLIT, g_T - SPLIT, DV4_LOGITS_ALL};
    if (!j->rc) j->rc = dv4_forward(m, &a, 1, j->logits, j->err, sizeof j->err);
    if (!j->rc) j->rc = dv4_forward(m, &c2, 1, j->logits + (size_t)SPLIT * V, j->err, sizeof j->err);
    dv4_seq_free(m, s);
    dv4_free(m);
    comm_destroy(cm);
    b->ops->destroy(b);
    return NULL;
}

static void setup(void) {
    char err[256];
    st_set *f;
    ck_assert_msg(st_open(g_fix, &f, err, sizeof err) == 0, "%s", err);
    const st_tensor *t = st_find(f, "tokens");
    ck_assert(t && t->dtype == ST_I64);
    g_T = (int)t->shape[0];
    g_tok = xmalloc((size_t)g_T * sizeof *g_tok);
    for (int i = 0; i < g_T; i++) g_tok[i] = (int32_t)((const int64_t *)t->data)[i];
    st_close(f);
    be *b = be_cpu_create(0);
    dv4_model *m;
    dv4_seq *s;
    ck_assert_msg(dv4_load(g_model, b, NULL, &m, err, sizeof err) == 0, "%s", err);
    V = dv4_cfg(m)->vocab_size;
    g_bytes1 = dv4_rank_weight_bytes(m);
    g_ref = xmalloc((size_t)g_T * V * sizeof *g_ref);
    ck_assert(dv4_seq_new(m, g_T, &s, err, sizeof err) == 0);
    dv4_chunk ch = {s, g_tok, g_T, DV4_LOGITS_ALL};
    ck_assert_msg(dv4_forward(m, &ch, 1, g_ref, err, sizeof err) == 0, "%s", err);
    dv4_seq_free(m, s);
    dv4_free(m);
    b->ops->destroy(b);
}

static void teardown(void) {
    free(g_tok);
    free(g_ref);
}

static void run_world(int world) {
    char peers_s[MAXW][32];
    const char *peers[MAXW];
    for (int r = 0; r < world; r++) {
        snprintf(peers_s[r], sizeof peers_s[r], "127.0.0.1:%d", free_port());
        peers[r] = peers_s[r];
    }
    rank_job jobs[MAXW];
    pthread_t th[MAXW];
    for (int r = 0; r < world; r++) {
        jobs[r] = (rank_job){.rank = r, .world = world, .peers = peers};
        jobs[r].logits = xmalloc((size_t)g_T * V * sizeof(float));
        pthread_create(&th[r], NULL, rank_main, &jobs[r]);
    }
    for (int r = 0; r < world; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < world; r++) ck_assert_msg(jobs[r].rc == 0, "rank %d: %s", r, jobs[r].err);
    double num = 0, den = 0;
    int flips = 0;
    for (size_t i = 0; i < (size_t)g_T * V; i++) {
        double d = (double)jobs[0].logits[i] - g_ref[i];
        num += d * d;
        den += (double)g_ref[i] * g_ref[i];
    }
    for (int p = 0; p < g_T; p++) {
        int a = 0, b = 0;
        for (int v = 1; v < V; v++) {
            if (jobs[0].logits[(size_t)p * V + v] > jobs[0].logits[(size_t)p * V + a]) a = v;
            if (g_ref[(size_t)p * V + v] > g_ref[(size_t)p * V + b]) b = v;
        }
        flips += a != b;
    }
    double rel = sqrt(num / den);
    printf("world %d: rel_l2 vs 1 process %.3e, argmax flips %d, bytes per rank %llu of %llu\n",
           world, rel, flips, (unsigned long long)jobs[0].bytes, (unsigned long long)g_bytes1);
    ck_assert_msg(rel <= 1e-5, "world %d: relative L2 %.3e", world, rel);
    ck_assert_int_eq(flips, 0);
    for (int r = 1; r < world; r++)
        ck_assert_msg(memcmp(jobs[r].logits, jobs[0].logits, (size_t)g_T * V * sizeof(float)) == 0,
                      "rank %d logits differ from rank 0", r);
    for (int r = 0; r < world; r++) {
        ck_assert_msg(jobs[r].bytes < g_bytes1, "rank %d holds the whole model", r);
        free(jobs[r].logits);
    }
}

START_TEST(world2) { run_world(2); }
END_TEST
START_TEST(world4) { run_world(4); }
END_TEST

START_TEST(world_must_divide) {
    char err[256];
    be *b = be_cpu_create(1);
    comm *cm;
    const char *peers[] = {"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"};
    ck_assert(comm_tcp_create(0, 1, peers, 1000, &cm, err, sizeof err) == 0);
    dv4_shard sh = {0, 3, cm}; /* 8 heads do not split over 3 ranks */
    dv4_model *m = NULL;
    ck_assert_int_ne(dv4_load(g_model, b, &sh, &m, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "world size 3") || strstr(err, "across 3 workers"), "%s", err);
    ck_assert(m == NULL);
    comm_destroy(cm);
    b->ops->destroy(b);
}
END_TEST

START_TEST(peer_gone_is_an_error) {
    char err[256];
    comm *cm;
    char peer[32];
    snprintf(peer, sizeof peer, "127.0.0.1:%d", free_port());
    const char *peers[] = {"127.0.0.1:1", peer};
    /* rank 1 of 2 whose rank 0 never comes: a clear error within the timeout */
    ck_assert_int_ne(comm_tcp_create(1, 2, peers, 300, &cm, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "cannot reach peer") != NULL, "%s", err);
}
END_TEST

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL_DIR FIXTURE_FILE\n", argv[0]);
        return 2;
    }
    g_model = argv[1];
    g_fix = argv[2];
    Suite *s = suite_create("shard");
    TCase *tc = tcase_create("tcp");
    tcase_set_timeout(tc, 600);
    tcase_add_unchecked_fixture(tc, setup, teardown);
    tcase_add_test(tc, world2);
    tcase_add_test(tc, world4);
    tcase_add_test(tc, world_must_divide);
    tcase_add_test(tc, peer_gone_is_an_error);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
