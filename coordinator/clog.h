/* clog.h — the coordinator's log line and clock, shared by the pool and the main loop.
 *
 * Why: one format for every coordinator log line ("HH:MM:SS.mmm duet-coordinator: ...", UTC,
 * stderr, flushed) so operators can grep one shape. Never logs secrets (the auth token).
 */
#ifndef DUET_CLOG_H
#define DUET_CLOG_H

/* Monotonic seconds, for timeouts and ages. */
double coord_now_s(void);
/* One log line on stderr. */
void coord_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
