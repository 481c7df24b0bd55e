/* rpc_client.h — a small blocking client of the worker protocol, and a handle on a real
 * duet-worker process, for tests.
 *
 * Why: integration tests must talk to the real binary over a real socket, byte for byte as a
 * coordinator would (and also send what no coordinator would: garbage, lies, oversized
 * lengths). Every wait has a timeout and is a poll() on a socket or pipe, never a sleep. This
 * is test code: it must never be linked into the worker or the coordinator.
 */
#ifndef DUET_TESTS_RPC_CLIENT_H
#define DUET_TESTS_RPC_CLIENT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/rpc.h"
#include "proto/duet.pb-c.h"

typedef struct {
    int fd;
    rpc_decoder *dec;
} rcli;

/* Connects to 127.0.0.1:port. Returns 0 or -1. */
int rcli_connect(rcli *c, int port, int timeout_ms);
void rcli_close(rcli *c);
int rcli_send_raw(rcli *c, const void *p, size_t n);
int rcli_send(rcli *c, int type, const ProtobufCMessage *m);
/* One frame within timeout_ms: returns 1 and a malloc'd copy of the payload (caller frees),
 * 0 if the peer closed the connection, -1 on timeout or error. */
int rcli_recv(rcli *c, int timeout_ms, int *type, uint8_t **payload, size_t *len);
/* 1 if the peer closed the connection within timeout_ms (frames before EOF are discarded). */
int rcli_wait_closed(rcli *c, int timeout_ms);
/* Challenge -> Hello(HMAC(token, nonce), ...) -> HelloReply. Returns the unpacked reply
 * (caller frees with duet__hello_reply__free_unpacked) or NULL if none came. */
Duet__HelloReply *rcli_handshake(rcli *c, const char *token, uint32_t version, uint32_t rank,
                                 uint32_t world, uint64_t fingerprint, int timeout_ms);
/* Receives the next frame and requires its type; returns the unpacked message or NULL. */
void *rcli_expect(rcli *c, int type, int timeout_ms);

/* A running duet-worker with its stdout and stderr on pipes. */
typedef struct {
    pid_t pid;
    int out_fd, err_fd;
    int port;
    char log[1 << 16];   /* stderr so far (older bytes dropped if it overflows) */
    size_t log_len, log_seen;
} wproc;

/* Starts bin with argv extra (NULL-terminated) and waits for its "listening on" line.
 * Returns 0 (p->port set) or -1. */
int wproc_start(wproc *p, const char *bin, const char *const *argv, int timeout_ms);
/* Reads stderr until a line containing needle appears after the last match. Returns 1/0. */
int wproc_wait_log(wproc *p, const char *needle, int timeout_ms);
/* Sends sig (0 = none), waits for the process to exit; returns its wait status or -1. */
int wproc_stop(wproc *p, int sig, int timeout_ms);

#endif
