/* comm.h — the data plane between workers: collectives over one interface, several backends.
 *
 * Why: the forward pass calls collectives explicitly (an all-reduce after attention and after
 * the MoE under TP/EP) and must not care how bytes move. Backends: TCP (CPU workers, tests,
 * CI) now; NCCL (GPU) and RDMA verbs later, behind the same calls. Every call is collective:
 * all ranks call it in the same order with the same sizes. Errors (a peer died, a timeout)
 * return a negative DUET_E* code with a sentence; after an error the comm is unusable and the
 * worker must be re-formed. Buffers are host memory for the TCP backend.
 */
#ifndef DUET_COMM_H
#define DUET_COMM_H

#include <stddef.h>

typedef struct comm comm;

struct comm_ops {
    /* buf[n] f32 summed over ranks, result on every rank (in place) */
    int (*allreduce_sum)(comm *c, float *buf, size_t n, char *err, size_t errlen);
    /* recv[world * bytes] = concatenation of every rank's send[bytes] */
    int (*allgather)(comm *c, const void *send, size_t bytes, void *recv, char *err,
                     size_t errlen);
    /* rank r sends send_bytes[j] bytes from send + send_off[j] to rank j and receives
     * recv_bytes[j] bytes into recv + recv_off[j] from rank j */
    int (*alltoallv)(comm *c, const void *send, const size_t *send_bytes, const size_t *send_off,
                     void *recv, const size_t *recv_bytes, const size_t *recv_off, char *err,
                     size_t errlen);
    int (*broadcast)(comm *c, void *buf, size_t bytes, int root, char *err, size_t errlen);
    void (*destroy)(comm *c);
};

struct comm {
    const struct comm_ops *ops;
    int rank, world;
};

/* Forms the TCP mesh: rank r listens on peers[r] ("host:port") and connects to every lower
 * rank, retrying until timeout_ms. A handshake checks ranks and world size. world == 1 gives
 * a comm whose collectives are no-ops. */
int comm_tcp_create(int rank, int world, const char *const *peers, int timeout_ms, comm **out,
                    char *err, size_t errlen);
static inline void comm_destroy(comm *c) {
    if (c) c->ops->destroy(c);
}

#endif
