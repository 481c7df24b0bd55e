/* rpc.h — framing and authentication of the coordinator⇄worker connection.
 *
 * Why: both processes speak the same frames (proto/duet.proto) over different event loops
 * (libevent in the coordinator, libuv in the worker), so the byte-level rules live here, free
 * of any loop: a frame is [u32 LE length][u8 type][protobuf payload], length = 1 + payload,
 * length <= RPC_MAX_FRAME. The decoder is fed whatever bytes arrived and yields whole frames; a
 * malformed or oversized frame is an error naming the problem, after which the caller closes
 * that connection. Authentication: the worker sends a random nonce (Challenge); the
 * coordinator answers HMAC-SHA256(token, nonce) in Hello; compared in constant time.
 */
#ifndef DUET_RPC_H
#define DUET_RPC_H

#include <stddef.h>
#include <stdint.h>

#define RPC_PROTOCOL_VERSION 1u
#define RPC_MAX_FRAME (256u << 20) /* 256 MiB: a StepPlan of a 1M-token prompt fits */
#define RPC_NONCE_BYTES 32
#define RPC_PROOF_BYTES 32

typedef enum {
    RPC_CHALLENGE = 1, RPC_HELLO = 2, RPC_HELLO_REPLY = 3, RPC_LOAD_MODEL = 4,
    RPC_LOAD_PROGRESS = 5, RPC_STEP_PLAN = 6, RPC_STEP_RESULT = 7, RPC_RELEASE = 8,
    RPC_HEARTBEAT = 9, RPC_STATS = 10, RPC_SHUTDOWN = 11, RPC_TYPE_MAX = 11
} rpc_type;

const char *rpc_type_name(int type);

/* Incremental frame decoder. */
typedef struct rpc_decoder rpc_decoder;
rpc_decoder *rpc_decoder_new(uint32_t max_frame);
void rpc_decoder_free(rpc_decoder *d);
/* Appends bytes. Returns 0, or DUET_EFORMAT with err set (oversized length, unknown type,
 * zero length) — the connection must then be closed. */
int rpc_decoder_feed(rpc_decoder *d, const void *data, size_t len, char *err, size_t errlen);
/* Pops the next whole frame if one is complete: returns 1 and sets *type, *payload (valid until
 * the next feed/next call), *len; 0 if none is complete. */
int rpc_decoder_next(rpc_decoder *d, int *type, const uint8_t **payload, size_t *len);

/* Encodes a frame header for a payload of len bytes into hdr[5]. */
void rpc_frame_header(uint8_t hdr[5], int type, size_t len);

/* Auth: reads a token file (first line, trimmed; must be owner-only, mode 0600 or stricter,
 * and at least 16 bytes), fills token (NUL-terminated). */
int rpc_read_token_file(const char *path, char *token, size_t cap, char *err, size_t errlen);
void rpc_random_nonce(uint8_t nonce[RPC_NONCE_BYTES]);
void rpc_auth_proof(const char *token, const uint8_t *nonce, size_t nonce_len,
                    uint8_t proof[RPC_PROOF_BYTES]);
int rpc_auth_check(const char *token, const uint8_t *nonce, size_t nonce_len,
                   const uint8_t *proof, size_t proof_len); /* 1 = valid (constant time) */

/* ---- additions (rpc.c) ------------------------------------------------------------------ */
/* Changes the maximum frame size for every header not yet validated (e.g. a small limit while
 * a connection is unauthenticated, the full one after). 0 = RPC_MAX_FRAME. */
void rpc_decoder_set_max(rpc_decoder *d, uint32_t max_frame);
/* Bytes the decoder currently holds (whole frames not yet popped + a partial one). */
size_t rpc_decoder_buffered(const rpc_decoder *d);

/* Packs a protobuf-c message into one whole frame ([header][payload], xmalloc'd, caller
 * frees) and sets *len. Returns NULL with err set if the frame would exceed max_frame. */
struct ProtobufCMessage;
uint8_t *rpc_frame_pack(int type, const struct ProtobufCMessage *msg, uint32_t max_frame,
                        size_t *len, char *err, size_t errlen);

#endif
