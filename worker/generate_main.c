/* generate_main.c — `duet-generate`: greedy generation from token ids on one process.
 *
 * Why: the smallest end-to-end use of the engine, without coordinator or RPC — for the
 * quickstart, for debugging a checkpoint, and for measuring raw CPU tokens/s. Input and output
 * are token ids (the tokenizer lives in the coordinator).
 *
 *   duet-generate --model DIR --prompt "0 17 42" [-n 16] [--threads N] [--chunk C]
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/err.h"
#include "worker/model.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: duet-generate --model DIR --prompt \"ID ID ...\" [-n TOKENS] [--threads N]\n"
            "                     [--chunk C]\n"
            "Greedy generation on the CPU backend; prints the new token ids and tokens/s.\n");
}

static int parse_ids(const char *s, int32_t **ids, int *n, int vocab, char *err, size_t errlen) {
    int cap = 16;
    *ids = xmalloc((size_t)cap * sizeof **ids);
    *n = 0;
    while (*s) {
        while (*s == ' ' || *s == ',' || *s == '\t' || *s == '\n') s++;
        if (!*s) break;
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s)
            return duet_err(err, errlen, DUET_EINVAL, "--prompt: '%.20s' is not a token id", s);
        if (v < 0 || v >= vocab)
            return duet_err(err, errlen, DUET_EINVAL,
                            "--prompt: token id %ld is outside the vocabulary [0, %d)", v, vocab);
        if (*n == cap) *ids = xrealloc(*ids, (size_t)(cap *= 2) * sizeof **ids);
        (*ids)[(*n)++] = (int32_t)v;
        s = end;
    }
    if (*n == 0) return duet_err(err, errlen, DUET_EINVAL, "--prompt: no token ids given");
    return 0;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

int main(int argc, char **argv) {
    const char *model = NULL, *prompt = NULL;
    int n_new = 16, threads = 0, chunk = 0;
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'}, {"prompt", required_argument, 0, 'p'},
        {"tokens", required_argument, 0, 'n'}, {"threads", required_argument, 0, 't'},
        {"chunk", required_argument, 0, 'c'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "m:p:n:t:c:h", opts, NULL)) != -1) {
        switch (o) {
        case 'm': model = optarg; break;
        case 'p': prompt = optarg; break;
        case 'n': n_new = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 'c': chunk = atoi(optarg); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!model || !prompt || n_new < 0) {
        usage(stderr);
        return 2;
    }
    char err[512];
    be *b = be_cpu_create(threads);
    dv4_model *m;
    double t0 = now_s();
    if (dv4_load(model, b, NULL, &m, err, sizeof err)) {
        fprintf(stderr, "duet-generate: %s\n", err);
        b->ops->destroy(b);
        return 1;
    }
    const dv4_config *c = dv4_cfg(m);
    double t_load = now_s() - t0;
    int32_t *ids = NULL;
    int n = 0;
    int rc = 1;
    dv4_seq *s = NULL;
    float *logits = xmalloc((size_t)c->vocab_size * sizeof *logits);
    if (parse_ids(prompt, &ids, &n, c->vocab_size, err, sizeof err) ||
        dv4_seq_new(m, n + n_new, &s, err, sizeof err)) {
        fprintf(stderr, "duet-generate: %s\n", err);
        goto out;
    }
    if (chunk <= 0) chunk = n;
    t0 = now_s();
    for (int i = 0; i < n; i += chunk) {
        int len = n - i < chunk ? n - i : chunk;
        dv4_chunk ch = {s, ids + i, len, i + len == n ? DV4_LOGITS_LAST : DV4_LOGITS_NONE};
        if (dv4_forward(m, &ch, 1, logits, err, sizeof err)) {
            fprintf(stderr, "duet-generate: %s\n", err);
            goto out;
        }
    }
    double t_prefill = now_s() - t0;
    t0 = now_s();
    printf("generated:");
    for (int i = 0; i < n_new; i++) {
        int32_t next = argmax(logits, c->vocab_size);
        printf(" %d", next);
        fflush(stdout);
        if (i + 1 == n_new) break;
        dv4_chunk ch = {s, &next, 1, DV4_LOGITS_LAST};
        if (dv4_forward(m, &ch, 1, logits, err, sizeof err)) {
            fprintf(stderr, "\nduet-generate: %s\n", err);
            goto out;
        }
    }
    double t_dec = now_s() - t0;
    printf("\n");
    fflush(stdout);
    fprintf(stderr,
            "load %.3f s | prefill %d tokens %.3f s (%.1f tok/s) | decode %d tokens %.3f s "
            "(%.1f tok/s) | %d threads\n",
            t_load, n, t_prefill, n / t_prefill, n_new > 1 ? n_new - 1 : 0, t_dec,
            n_new > 1 ? (n_new - 1) / t_dec : 0.0, b->n_threads);
    rc = 0;
out:
    free(logits);
    free(ids);
    dv4_seq_free(m, s);
    dv4_free(m);
    b->ops->destroy(b);
    return rc;
}
