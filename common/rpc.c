/* rpc.c — framing and authentication of the coordinator⇄worker connection (see rpc.h).
 *
 * Why: the byte-level rules of the wire live in one loop-free file that both event loops feed,
 * so a frame means the same thing on both ends and the decoder can be tested byte by byte.
 * Every byte that arrives here is untrusted: this file must never trust a length before
 * checking it against the maximum, never read past what was fed, never allocate more than
 * one maximal frame plus what was fed, and never crash on garbage. It must never compare
 * secrets with memcmp (CRYPTO_memcmp only) nor write a token to a log.
 */
#include "common/rpc.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <protobuf-c/protobuf-c.h>

#include "common/err.h"

/* ---- message types ----------------------------------------------------------------------- */

const char *rpc_type_name(int type) {
    static const char *const names[] = {
        NULL,        "Challenge", "Hello", "HelloReply", "LoadModel", "LoadProgress",
        "StepPlan",  "StepResult", "Release", "Heartbeat", "Stats",    "Shutdown"};
    if (type >= 1 && type <= RPC_TYPE_MAX) return names[type];
    return "unknown";
}

/* ---- frame decoder ----------------------------------------------------------------------- */

struct rpc_decoder {
    uint8_t *buf;
    size_t cap;
    size_t rd;      /* start of the next frame not yet popped */
    size_t wr;      /* end of the bytes fed */
    size_t checked; /* start of the first frame whose header has not been validated */
    uint32_t max_frame;
    int failed;     /* sticky: once a frame was malformed, the stream is unusable */
};

static uint32_t get_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

rpc_decoder *rpc_decoder_new(uint32_t max_frame) {
    rpc_decoder *d = xcalloc(1, sizeof *d);
    d->max_frame = max_frame ? max_frame : RPC_MAX_FRAME;
    return d;
}

void rpc_decoder_free(rpc_decoder *d) {
    if (!d) return;
    free(d->buf);
    free(d);
}

void rpc_decoder_set_max(rpc_decoder *d, uint32_t max_frame) {
    d->max_frame = max_frame ? max_frame : RPC_MAX_FRAME;
}

size_t rpc_decoder_buffered(const rpc_decoder *d) { return d->wr - d->rd; }

/* Validates every frame header that is now complete, so that an oversized length is refused
 * when its 4 bytes arrive, not after 256 MiB of payload were buffered. */
static int check_headers(rpc_decoder *d, char *err, size_t errlen) {
    while (d->checked <= d->wr && d->wr - d->checked >= 5) {
        const uint8_t *h = d->buf + d->checked;
        uint32_t len = get_le32(h);
        int type = h[4];
        if (len == 0)
            return duet_err(err, errlen, DUET_EFORMAT,
                            "frame with length 0 (a frame holds at least its type byte)");
        if (len > d->max_frame)
            return duet_err(err, errlen, DUET_EFORMAT,
                            "frame of %u bytes exceeds the maximum of %u bytes", len,
                            d->max_frame);
        if (type < 1 || type > RPC_TYPE_MAX)
            return duet_err(err, errlen, DUET_EFORMAT,
                            "frame of unknown message type %d (known types are 1..%d)", type,
                            RPC_TYPE_MAX);
        d->checked += 4 + (size_t)len;
    }
    return 0;
}

int rpc_decoder_feed(rpc_decoder *d, const void *data, size_t len, char *err, size_t errlen) {
    if (d->failed)
        return duet_err(err, errlen, DUET_EFORMAT,
                        "the stream already held a malformed frame; close the connection");
    if (len == 0) return 0;
    /* drop popped frames first: payload pointers from rpc_decoder_next die here (documented) */
    if (d->rd > 0) {
        size_t live = d->wr - d->rd;
        memmove(d->buf, d->buf + d->rd, live);
        d->checked -= d->rd;
        d->wr = live;
        d->rd = 0;
    }
    if (d->cap - d->wr < len) {
        size_t need = d->wr + len, cap = d->cap ? d->cap : 4096;
        while (cap < need) cap = cap > SIZE_MAX / 2 ? need : cap * 2;
        d->buf = xrealloc(d->buf, cap);
        d->cap = cap;
    }
    memcpy(d->buf + d->wr, data, len);
    d->wr += len;
    int rc = check_headers(d, err, errlen);
    if (rc) d->failed = 1;
    return rc;
}

int rpc_decoder_next(rpc_decoder *d, int *type, const uint8_t **payload, size_t *len) {
    if (d->failed || d->wr - d->rd < 5) return 0;
    const uint8_t *h = d->buf + d->rd;
    uint32_t flen = get_le32(h);
    /* headers up to `checked` were validated by feed; never pop one that was not */
    if (d->rd >= d->checked || d->wr - d->rd - 4 < flen) return 0;
    *type = h[4];
    *payload = h + 5;
    *len = flen - 1;
    d->rd += 4 + (size_t)flen;
    return 1;
}

void rpc_frame_header(uint8_t hdr[5], int type, size_t len) {
    uint32_t l = (uint32_t)(len + 1);
    hdr[0] = (uint8_t)l;
    hdr[1] = (uint8_t)(l >> 8);
    hdr[2] = (uint8_t)(l >> 16);
    hdr[3] = (uint8_t)(l >> 24);
    hdr[4] = (uint8_t)type;
}

uint8_t *rpc_frame_pack(int type, const struct ProtobufCMessage *msg, uint32_t max_frame,
                        size_t *len, char *err, size_t errlen) {
    if (!max_frame) max_frame = RPC_MAX_FRAME;
    size_t n = protobuf_c_message_get_packed_size(msg);
    if (n + 1 > max_frame) {
        duet_err(err, errlen, DUET_ENOMEM,
                 "%s message of %zu bytes exceeds the maximum frame of %u bytes",
                 rpc_type_name(type), n, max_frame);
        return NULL;
    }
    uint8_t *f = xmalloc(5 + n);
    rpc_frame_header(f, type, n);
    protobuf_c_message_pack(msg, f + 5);
    *len = 5 + n;
    return f;
}

/* ---- authentication ---------------------------------------------------------------------- */

int rpc_read_token_file(const char *path, char *token, size_t cap, char *err, size_t errlen) {
    if (cap) token[0] = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return duet_err(err, errlen, DUET_EIO, "cannot open auth token file %s: %s", path,
                        strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return duet_err(err, errlen, DUET_EIO, "cannot stat auth token file %s: %s", path,
                        strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return duet_err(err, errlen, DUET_EINVAL, "auth token file %s is not a regular file",
                        path);
    }
    if (st.st_mode & 077) {
        close(fd);
        return duet_err(err, errlen, DUET_EINVAL,
                        "auth token file %s is readable or writable by group or others "
                        "(mode %04o); run `chmod 600 %s`",
                        path, (unsigned)(st.st_mode & 07777), path);
    }
    char buf[4096];
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof buf - 1 - n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            return duet_err(err, errlen, DUET_EIO, "cannot read auth token file %s: %s", path,
                            strerror(e));
        }
        if (r == 0 || (n += (size_t)r) == sizeof buf - 1) break;
    }
    close(fd);
    buf[n] = 0;
    /* first line, surrounding blanks trimmed */
    char *s = buf;
    while (*s == ' ' || *s == '\t') s++;
    size_t l = strcspn(s, "\r\n");
    while (l > 0 && (s[l - 1] == ' ' || s[l - 1] == '\t')) l--;
    int rc = 0;
    if (memchr(s, 0, l))
        rc = duet_err(err, errlen, DUET_EFORMAT, "auth token file %s holds a NUL byte", path);
    else if (l < 16)
        rc = duet_err(err, errlen, DUET_EINVAL,
                      "auth token in %s is %zu bytes; use at least 16 (e.g. `openssl rand "
                      "-hex 32 > %s`)",
                      path, l, path);
    else if (l + 1 > cap)
        rc = duet_err(err, errlen, DUET_EINVAL,
                      "auth token in %s is %zu bytes; at most %zu are accepted", path, l,
                      cap ? cap - 1 : 0);
    else {
        memcpy(token, s, l);
        token[l] = 0;
    }
    OPENSSL_cleanse(buf, sizeof buf);
    return rc;
}

void rpc_random_nonce(uint8_t nonce[RPC_NONCE_BYTES]) {
    if (RAND_bytes(nonce, RPC_NONCE_BYTES) == 1) return;
    /* OpenSSL's generator failed to seed: the kernel's is the same source underneath */
    size_t got = 0;
    while (got < RPC_NONCE_BYTES) {
        ssize_t r = getrandom(nonce + got, RPC_NONCE_BYTES - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            fprintf(stderr, "fatal: no source of random bytes for the auth nonce\n");
            abort();
        }
        got += (size_t)r;
    }
}

void rpc_auth_proof(const char *token, const uint8_t *nonce, size_t nonce_len,
                    uint8_t proof[RPC_PROOF_BYTES]) {
    unsigned int n = RPC_PROOF_BYTES;
    if (!HMAC(EVP_sha256(), token, (int)strlen(token), nonce, nonce_len, proof, &n)) {
        /* cannot happen with SHA-256 built in; a zero proof never verifies anyway */
        memset(proof, 0, RPC_PROOF_BYTES);
    }
}

int rpc_auth_check(const char *token, const uint8_t *nonce, size_t nonce_len,
                   const uint8_t *proof, size_t proof_len) {
    if (!proof || proof_len != RPC_PROOF_BYTES || !nonce || nonce_len == 0) return 0;
    uint8_t want[RPC_PROOF_BYTES];
    unsigned int n = RPC_PROOF_BYTES;
    if (!HMAC(EVP_sha256(), token, (int)strlen(token), nonce, nonce_len, want, &n)) return 0;
    int ok = CRYPTO_memcmp(want, proof, RPC_PROOF_BYTES) == 0;
    OPENSSL_cleanse(want, sizeof want);
    return ok;
}
