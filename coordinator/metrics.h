/* metrics.h — the coordinator's Prometheus metrics (server-api §10).
 *
 * Why: the engine, the HTTP front and the worker pool all count things; one registry renders
 * them as Prometheus text 0.0.4 for GET /metrics. Every family is declared once, inside
 * metrics.c, with its type, help text and buckets (the names of §10, prefix "duet:"); callers
 * name a family and give the extra labels as Prometheus label text without braces, e.g.
 * "finished_reason=\"stop\"" (NULL or "" = none). The model_name label is added to every series
 * by the registry. An unknown family name is a programming error: it is logged once and ignored
 * (never a crash). With vllm_names, each family whose name mirrors vLLM's is also rendered
 * under its "vllm:" name. Single-threaded: everything runs on the coordinator's event loop.
 */
#ifndef DUET_COORD_METRICS_H
#define DUET_COORD_METRICS_H

#include <stddef.h>

typedef struct metrics metrics;

metrics *metrics_new(const char *model_name, int vllm_names);
void metrics_free(metrics *m);

/* counter += v (v >= 0) */
void metrics_inc(metrics *m, const char *family, const char *labels, double v);
/* gauge = v */
void metrics_set(metrics *m, const char *family, const char *labels, double v);
/* histogram observation */
void metrics_observe(metrics *m, const char *family, const char *labels, double v);

/* The text exposition (malloc'd, NUL-terminated, *len bytes). Gauges that are computed on
 * demand (running/waiting, KV usage, worker_up, ...) are set by the caller just before. */
char *metrics_render(metrics *m, size_t *len);

#endif
