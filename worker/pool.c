/* pool.c — parallel-for over a fixed set of pthreads (see pool.h).
 *
 * Work is handed out in chunks through an atomic counter; a generation number wakes the
 * workers for each loop and a countdown tells the caller when every worker has finished.
 */
#include "worker/pool.h"

#include <pthread.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <unistd.h>

#include "common/err.h"

struct pool {
    int n;                 /* threads including the caller */
    pthread_t *th;
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    unsigned long gen;     /* incremented per loop */
    int busy;              /* workers still running the current loop */
    int quit;
    /* the current loop */
    void (*fn)(void *, int);
    void *ctx;
    int total, chunk;
    atomic_int next;
};

static void run_chunks(pool *p) {
    for (;;) {
        int i0 = atomic_fetch_add(&p->next, p->chunk);
        if (i0 >= p->total) break;
        int i1 = i0 + p->chunk < p->total ? i0 + p->chunk : p->total;
        for (int i = i0; i < i1; i++) p->fn(p->ctx, i);
    }
}

static void *worker(void *arg) {
    pool *p = arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->gen == seen && !p->quit) pthread_cond_wait(&p->wake, &p->mu);
        if (p->quit) break;
        seen = p->gen;
        pthread_mutex_unlock(&p->mu);
        run_chunks(p);
        pthread_mutex_lock(&p->mu);
        if (--p->busy == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

pool *pool_create(int n_threads) {
    if (n_threads <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = c > 0 ? (int)c : 1;
    }
    pool *p = xcalloc(1, sizeof *p);
    p->n = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    p->th = xcalloc((size_t)n_threads, sizeof *p->th);
    for (int i = 1; i < n_threads; i++) pthread_create(&p->th[i], NULL, worker, p);
    return p;
}

void pool_destroy(pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->quit = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->th[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    free(p->th);
    free(p);
}

int pool_size(const pool *p) { return p->n; }

void pool_for(pool *p, int n, void (*fn)(void *ctx, int i), void *ctx) {
    if (n <= 0) return;
    if (p->n == 1 || n == 1) {
        for (int i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->total = n;
    p->chunk = n / (p->n * 4) > 0 ? n / (p->n * 4) : 1;
    atomic_store(&p->next, 0);
    p->busy = p->n - 1;
    p->gen++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    run_chunks(p);
    pthread_mutex_lock(&p->mu);
    while (p->busy > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
