/* test_comm.c — the TCP data plane's collectives, rank by rank, over real loopback sockets.
 *
 * Why: the sharded forward pass only uses all-reduce; the other collectives of comm.h
 * (all-gather, all-to-all-v, broadcast) are there for expert-token exchange and must be right
 * before anything builds on them. Each rank is a thread with its own comm; values are chosen
 * so every byte can be checked. Also: messages of several MiB in every direction at once (no
 * deadlock), bit-identical reductions on every rank, and a peer that leaves mid-collective
 * (a clear error, no hang).
 */
#include <arpa/inet.h>
#include <check.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/err.h"
#include "worker/comm.h"

enum { W = 3, BIG = 1 << 20 /* floats: 4 MiB per message */ };

static char peers_s[W][32];
static const char *peers[W];

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    ck_assert(bind(fd, (struct sockaddr *)&a, sizeof a) == 0);
    ck_assert(getsockname(fd, (struct sockaddr *)&a, &len) == 0);
    close(fd);
    return ntohs(a.sin_port);
}

static void new_peers(void) {
    for (int r = 0; r < W; r++) {
        snprintf(peers_s[r], sizeof peers_s[r], "127.0.0.1:%d", free_port());
        peers[r] = peers_s[r];
    }
}

typedef struct {
    int rank;
    int mode;          /* 0: all collectives; 1: rank 2 leaves before the all-reduce */
    int rc;
    char err[256];
    float *reduced;    /* [BIG] result of the all-reduce, for the cross-rank comparison */
} job;

static int check_gather_etc(comm *c, int me, char *err, size_t errlen) {
    /* all-gather: rank r contributes 5 bytes of value r+1 */
    uint8_t send[5], recv[5 * W];
    memset(send, me + 1, sizeof send);
    if (c->ops->allgather(c, send, sizeof send, recv, err, errlen)) return -1;
    for (int i = 0; i < 5 * W; i++)
        if (recv[i] != i / 5 + 1) return duet_err(err, errlen, -1, "allgather byte %d = %d", i, recv[i]);
    /* all-to-all-v: rank r sends (r+1)*(j+1) bytes of value 16*r+j to rank j */
    size_t sb[W], so[W], rb[W], ro[W], st = 0, rt = 0;
    for (int j = 0; j < W; j++) {
        sb[j] = (size_t)(me + 1) * (j + 1) * 1000;
        so[j] = st;
        st += sb[j];
        rb[j] = (size_t)(j + 1) * (me + 1) * 1000;
        ro[j] = rt;
        rt += rb[j];
    }
    uint8_t *s = xmalloc(st), *r = xmalloc(rt);
    for (int j = 0; j < W; j++) memset(s + so[j], 16 * me + j, sb[j]);
    int rc = c->ops->alltoallv(c, s, sb, so, r, rb, ro, err, errlen);
    for (int j = 0; j < W && !rc; j++)
        for (size_t i = 0; i < rb[j]; i++)
            if (r[ro[j] + i] != 16 * j + me) {
                rc = duet_err(err, errlen, -1, "alltoallv from rank %d byte %zu wrong", j, i);
                break;
            }
    free(s);
    free(r);
    if (rc) return rc;
    /* broadcast from rank 1 */
    int32_t b[1000];
    for (int i = 0; i < 1000; i++) b[i] = me == 1 ? i * 7 : -1;
    if (c->ops->broadcast(c, b, sizeof b, 1, err, errlen)) return -1;
    for (int i = 0; i < 1000; i++)
        if (b[i] != i * 7) return duet_err(err, errlen, -1, "broadcast element %d = %d", i, b[i]);
    return 0;
}

static void *rank_main(void *arg) {
    job *j = arg;
    comm *c = NULL;
    j->rc = comm_tcp_create(j->rank, W, peers, j->mode ? 2000 : 20000, &c, j->err, sizeof j->err);
    if (j->rc) return NULL;
    if (j->mode == 1 && j->rank == 2) { /* leaves the group */
        comm_destroy(c);
        return NULL;
    }
    if (!j->mode) j->rc = check_gather_etc(c, j->rank, j->err, sizeof j->err);
    j->reduced = xmalloc((size_t)BIG * sizeof(float));
    for (size_t i = 0; i < BIG; i++) j->reduced[i] = (float)(j->rank + 1) * 0.1f + (float)i * 1e-3f;
    if (!j->rc) j->rc = c->ops->allreduce_sum(c, j->reduced, BIG, j->err, sizeof j->err);
    comm_destroy(c);
    return NULL;
}

static void run(job *jobs, int mode) {
    pthread_t th[W];
    new_peers();
    for (int r = 0; r < W; r++) {
        jobs[r] = (job){.rank = r, .mode = mode};
        pthread_create(&th[r], NULL, rank_main, &jobs[r]);
    }
    for (int r = 0; r < W; r++) pthread_join(th[r], NULL);
}

START_TEST(collectives) {
    job jobs[W];
    run(jobs, 0);
    for (int r = 0; r < W; r++) ck_assert_msg(jobs[r].rc == 0, "rank %d: %s", r, jobs[r].err);
    for (size_t i = 0; i < BIG; i += 4099) { /* sum in rank order, same bits everywhere */
        float want = 0;
        for (int r = 0; r < W; r++) want += (float)(r + 1) * 0.1f + (float)i * 1e-3f;
        ck_assert_msg(jobs[0].reduced[i] == want, "element %zu: %g != %g", i, jobs[0].reduced[i], want);
    }
    for (int r = 1; r < W; r++)
        ck_assert(memcmp(jobs[r].reduced, jobs[0].reduced, (size_t)BIG * sizeof(float)) == 0);
    for (int r = 0; r < W; r++) free(jobs[r].reduced);
}
END_TEST

START_TEST(peer_leaves) {
    job jobs[W];
    run(jobs, 1);
    for (int r = 0; r < 2; r++) {
        ck_assert_msg(jobs[r].rc != 0, "rank %d finished an all-reduce without rank 2", r);
        /* "rank 2 closed the connection", or the same about the other survivor if it gave up
         * first: either way a sentence from the data plane, within the timeout */
        ck_assert_msg(strstr(jobs[r].err, "data plane") != NULL, "rank %d: %s", r, jobs[r].err);
        free(jobs[r].reduced);
    }
}
END_TEST

START_TEST(world_one_is_a_no_op) {
    comm *c;
    char err[128];
    const char *p[] = {"127.0.0.1:1"};
    ck_assert(comm_tcp_create(0, 1, p, 100, &c, err, sizeof err) == 0);
    float x[3] = {1, 2, 3};
    ck_assert(c->ops->allreduce_sum(c, x, 3, err, sizeof err) == 0);
    ck_assert(x[0] == 1 && x[1] == 2 && x[2] == 3);
    comm_destroy(c);
    ck_assert_int_ne(comm_tcp_create(2, 2, p, 100, &c, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "outside world size") != NULL, "%s", err);
    ck_assert(c == NULL);
}
END_TEST

int main(void) {
    Suite *s = suite_create("comm");
    TCase *tc = tcase_create("tcp");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, collectives);
    tcase_add_test(tc, peer_leaves);
    tcase_add_test(tc, world_one_is_a_no_op);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
