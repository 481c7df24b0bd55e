/* pool.h — a fixed set of pthreads that run parallel-for loops for the CPU backend.
 *
 * Why: the CPU backend is the reference and the CI engine; matmuls and attention over tens of
 * thousands of rows want all cores, and spawning threads per op would dominate small steps.
 * One loop runs at a time per pool; the caller's thread takes part. No other concurrency here.
 */
#ifndef DUET_POOL_H
#define DUET_POOL_H

typedef struct pool pool;

/* n_threads <= 0: number of online CPUs. */
pool *pool_create(int n_threads);
void pool_destroy(pool *p);
int pool_size(const pool *p);
/* Calls fn(ctx, i) for i in [0, n), spread over the threads in contiguous chunks; returns when
 * all calls are done. */
void pool_for(pool *p, int n, void (*fn)(void *ctx, int i), void *ctx);

#endif
