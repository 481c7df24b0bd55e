/* sample_bench.c — time of one worker_sample() draw over a V4-sized vocabulary.
 *
 * Why: the sampler runs on rank 0's CPU for every sampled token of a step; its cost per token
 * times the batch is added to every step. Prints one row per parameter set (ms per draw, the
 * mean over --draws draws at positions 0..draws-1); bench_sample.sh builds it against a chosen
 * worker_sample.c and writes the CSV. Usage: sample_bench [--vocab V] [--draws N] [--label L]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "worker/worker_sample.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv) {
    int V = 129280, draws = 20;
    const char *label = "current";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--vocab")) V = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--draws")) draws = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--label")) label = argv[i + 1];
        else {
            fprintf(stderr, "sample_bench: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (V < 2 || draws < 1) {
        fprintf(stderr, "sample_bench: --vocab must be >= 2 and --draws >= 1\n");
        return 2;
    }
    float *x = malloc((size_t)V * sizeof *x);
    unsigned s = 1;
    for (int i = 0; i < V; i++) { /* logits spread over [-10, 10) with ties */
        s = s * 1103515245u + 12345u;
        x[i] = (float)((s >> 8) % 100000) * 2e-4f - 10.0f;
    }
    struct {
        const char *name;
        float temperature, top_p, min_p;
        int top_k;
    } cases[] = {{"greedy", 0, 0, 0, 0},           {"temperature 0.7", 0.7f, 0, 0, 0},
                 {"top-p 0.9", 0.7f, 0.9f, 0, 0},  {"top-k 50", 0.7f, 0, 0, 50},
                 {"min-p 0.05", 0.7f, 0, 0.05f, 0}};
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        worker_sample_params p = {0};
        p.temperature = cases[k].temperature, p.top_p = cases[k].top_p;
        p.min_p = cases[k].min_p, p.top_k = cases[k].top_k, p.seed = 3;
        double t0 = now();
        for (int i = 0; i < draws; i++) worker_sample(x, V, &p, NULL, (uint64_t)i, NULL, 0, NULL, NULL, NULL, 0);
        printf("%s,%s,%d,%.3f\n", label, cases[k].name, V, (now() - t0) / draws * 1e3);
    }
    free(x);
    return 0;
}
