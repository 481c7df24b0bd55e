/* admin.h — the coordinator's admin socket (spec/server-api.md §12), used by duetctl.
 *
 * Why: operators drain, resume, reload and inspect a running coordinator without HTTP and
 * without exposing anything on the network. The socket is a Unix stream socket in a 0700
 * directory, itself 0600; every connection's peer uid is checked (SO_PEERCRED: the server's
 * uid or root, anyone else is closed without a reply). The protocol is line-delimited JSON,
 * one request object per line (at most 64 KiB), answered in order with one response line
 * each. This file owns the socket, the framing and the JSON envelope; what a command does is
 * the caller's handler. It must never expose the socket over TCP, never answer a foreign uid,
 * and never let one bad line end the connection (except a line over the size limit, which
 * cannot be resynchronised).
 */
#ifndef DUET_COORD_ADMIN_H
#define DUET_COORD_ADMIN_H

#include <stddef.h>

#include <event2/event.h>
#include <jansson.h>

#define ADMIN_MAX_LINE 65536
#define ADMIN_MAX_CONNS 8
#define ADMIN_IDLE_TIMEOUT_S 60

typedef struct admin admin;
typedef struct admin_req admin_req; /* one request awaiting its answer */

/* Called once per well-formed request (an object with a string "cmd"); req is the whole request
 * object (borrowed for the call; json_incref to keep it). The handler must answer exactly once,
 * now or later, with admin_reply_ok or admin_reply_err. Malformed lines never reach it. */
typedef void (*admin_handler)(void *ctx, admin_req *r, const char *cmd, json_t *req);

/* The default socket path (§12): /run/duet/admin.sock when /run/duet is a writable directory,
 * else $XDG_RUNTIME_DIR/duet/admin.sock, else /tmp/duet-<uid>/admin.sock. */
int admin_default_path(char *out, size_t cap, char *err, size_t errlen);

/* Creates the directory (0700) if needed, removes a stale socket (only when connecting to it
 * fails), binds (umask 0177, then chmod 0600) and listens on base. */
int admin_open(struct event_base *base, const char *path, admin_handler fn, void *ctx,
               admin **out, char *err, size_t errlen);
/* Writes out the answers already given (for at most about a second), closes every connection
 * (a pending request's admin_req stays valid until replied to; that reply goes nowhere) and
 * removes the socket file. */
void admin_close(admin *a);
const char *admin_path(const admin *a);

/* Answer a request: result is stolen (NULL = {}). Frees r. */
void admin_reply_ok(admin_req *r, json_t *result);
/* code: bad_request | unknown_command | not_found | conflict | internal (or a command-specific
 * code documented by its handler). Frees r. */
void admin_reply_err(admin_req *r, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* 0 once the client has gone away (the reply will be dropped). */
int admin_req_connected(const admin_req *r);

#endif
