/* test_cuda_golden.c — the forward pass on the CUDA backend against the transformers fixtures.
 *
 * Why: test_cuda_ops proves each op against the CPU op; this proves the whole model on the GPU
 * against the independent reference (tests/golden/fixtures, DeepseekV4ForCausalLM in fp32), with
 * the same cases as tests/golden/test_golden.c (prefill600, decode300, chunk37, odd chunk sizes,
 * batch2 whole + interleaved, hash). Plain C without Check: the GPU machine has no libcheck.
 *
 * The cases and the acceptance rule are golden_cases.c's (shared with the CPU test): relative L2
 * <= 1e-4 per case (fp32 activations on the GPU land near the CPU's ~1.5e-6), worst row <= 1e-3,
 * the same argmax wherever the margin is clear. Prints one line per case and PASS/FAIL.
 * Then prefill600 and decode300 again on a model whose KV state is bf16 (tag golden-cuda-bf16kv)
 * and one whose KV state is FP8 rows (golden-cuda-fp8kv) under GOLDEN_TOL_BF16_KV /
 * GOLDEN_TOL_FP8_KV, as the CPU test does.
 *
 * Then the graphs (be_cuda_graph.cu): decode steps of one and of two sequences (T = 1, 2, 3 at
 * positions crossing compressor windows, indexer bounds and state growth) run once directly and
 * once through graphs must give the same logits bit for bit; the graphed run must replay most
 * steps from the cache (few captures) and fall back to direct steps never, except under
 * DUET_CUDA_MOE_HOST=1 (host grouping cannot be captured: every step falls back).
 *
 * usage: test_cuda_golden MODEL_DIR FIXTURE_DIR [MEM_FRACTION]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/be_cuda.h"
#include "tests/golden/golden_cases.h"
#include "worker/model.h"

enum { GP = 150, GSTEPS = 300 }; /* prompt tokens; decode steps */

/* Prompts of 150 and 187 tokens, then GSTEPS steps: sequence A decodes 1 token per step; B joins
 * at step 40 and decodes 1 (steps where it is odd: 2) tokens. Logits of every step's last rows.
 * Every decode step also samples on the device (the sample op after the graphed passes): A's
 * row greedy, B's at temperature 0.9 with top_k 40; ids[rows] receives the draws, and every
 * row is kept (downloaded) so that the logits can be compared. */
static int graph_run(dv4_model *m, float *out, int32_t *drawn, int *rows_out) {
    char err[512];
    const dv4_config *c = dv4_cfg(m);
    int V = c->vocab_size, rows = 0, rc = 0;
    dv4_seq *a = NULL, *bq = NULL;
    int32_t ids[256];
    for (int i = 0; i < 256; i++) ids[i] = (int32_t)((i * 7919 + 13) % V);
    float *scratch = malloc((size_t)256 * V * sizeof *scratch);
    if (dv4_seq_new(m, GP + 64 + GSTEPS * 3, &a, err, sizeof err) ||
        dv4_seq_new(m, GP + 64 + GSTEPS * 3, &bq, err, sizeof err)) {
        printf("FAIL: graphs: %s\n", err);
        free(scratch);
        return 1;
    }
    dv4_chunk pa = {a, ids, GP, DV4_LOGITS_LAST}, pb = {bq, ids + 3, GP + 37, DV4_LOGITS_LAST};
    rc = dv4_forward(m, &pa, 1, scratch, err, sizeof err) || dv4_forward(m, &pb, 1, scratch, err, sizeof err);
    for (int s = 0; s < GSTEPS && !rc; s++) {
        dv4_chunk ch[2] = {{a, ids + (s % 200), 1, DV4_LOGITS_LAST},
                           {bq, ids + (s % 190), (s % 2) ? 2 : 1, DV4_LOGITS_LAST}};
        int n = s >= 40 ? 2 : 1;
        be_sample_req rq[2] = {{.row = 0, .temperature = 0},
                               {.row = 1, .temperature = 0.9f, .top_k = 40, .u01 = (s % 17) / 17.0}};
        be_sample_res rs[2];
        unsigned char keep[2] = {1, 1};
        dv4_dsample ds = {n, rq, rs, keep};
        rc = dv4_forward_ds(m, ch, n, out + (size_t)rows * V, &ds, err, sizeof err);
        for (int k = 0; k < n && !rc; k++) drawn[rows + k] = rs[k].fallback ? -1 : rs[k].id;
        rows += n;
    }
    if (rc) printf("FAIL: graphs: %s\n", err);
    dv4_seq_free(m, a);
    dv4_seq_free(m, bq);
    free(scratch);
    *rows_out = rows;
    return rc;
}

static int graph_check(dv4_model *m, be *b) {
    int V = dv4_cfg(m)->vocab_size, r0 = 0, r1 = 0, fails = 0;
    float *l0 = calloc((size_t)GSTEPS * 2 * V, sizeof *l0), *l1 = calloc((size_t)GSTEPS * 2 * V, sizeof *l1);
    int32_t *d0 = calloc((size_t)GSTEPS * 2, sizeof *d0), *d1 = calloc((size_t)GSTEPS * 2, sizeof *d1);
    be_cuda_graph_stats s0, s1, s2;
    be_cuda_graph_enable(b, 0);
    be_cuda_graph_get_stats(b, &s0);
    fails += graph_run(m, l0, d0, &r0);
    be_cuda_graph_enable(b, 1);
    be_cuda_graph_get_stats(b, &s1);
    fails += graph_run(m, l1, d1, &r1);
    be_cuda_graph_get_stats(b, &s2);
    unsigned long long rep = s2.replays - s1.replays, cap = s2.captures - s1.captures,
                       fb = s2.fallbacks - s1.fallbacks, fb0 = s1.fallbacks - s0.fallbacks;
    int same = r0 == r1 && !memcmp(l0, l1, (size_t)r0 * V * sizeof *l0);
    size_t first = 0;
    while (!same && first < (size_t)r0 * V && l0[first] == l1[first]) first++;
    const char *mh = getenv("DUET_CUDA_MOE_HOST");
    int host = mh && atoi(mh);
    printf("graphs: %d steps (%d logit rows) direct vs graphed: %s; graphed run: %llu replayed, "
           "%llu captured, %llu direct%s%s (direct run: %llu records)\n",
           GSTEPS + 2, r0, same ? "identical bits" : "DIFFERENT", rep, cap, fb, fb ? ": " : "",
           fb ? s2.last_fallback : "", fb0);
    if (!same) {
        printf("FAIL: graphs: first difference at row %zu col %zu: %.9g vs %.9g\n", first / V,
               first % V, l0[first], l1[first]);
        fails++;
    }
    if (fb0) {
        printf("FAIL: graphs: steps recorded while graphs were off\n");
        fails++;
    }
    /* without host grouping: every step graphed, and replays (not captures) for most of them */
    if (!host && (fb || rep + cap != (unsigned long long)GSTEPS + 2 - 2 || rep < 4 * cap)) {
        printf("FAIL: graphs: want every decode step graphed and >= 4 replays per capture\n");
        fails++;
    }
    if (host && fb < GSTEPS) {
        printf("FAIL: graphs: host MoE grouping should run every step directly\n");
        fails++;
    }
    /* device draws: the same in both runs, and greedy rows (A: the first row of each step)
     * are the argmax of the row (ties → lowest id) */
    int greedy_bad = 0, draws_differ = 0, fell_back = 0;
    for (int r = 0, s = 0; r < r0 && r < r1; s++) {
        int n = s >= 40 ? 2 : 1;
        for (int k = 0; k < n; k++, r++) {
            draws_differ += d0[r] != d1[r];
            fell_back += d1[r] < 0;
        }
        const float *row = l1 + (size_t)(r - n) * V;
        int best = 0;
        for (int i = 1; i < V; i++) best = row[i] > row[best] ? i : best;
        greedy_bad += d1[r - n] != best;
    }
    printf("graphs: device sampling in every step: %d draws differ between direct and graphed, "
           "%d greedy draws not the argmax, %d fell back to the host\n", draws_differ,
           greedy_bad, fell_back);
    if (draws_differ || greedy_bad) {
        printf("FAIL: graphs: device sampling\n");
        fails++;
    }
    free(l0);
    free(l1);
    free(d0);
    free(d1);
    return fails;
}

/* prefill600 and decode300 with KV dtype dt under its looser rule: a model of its own (the
 * dtype is fixed once sequences exist) */
static int golden_kv_dtype(const char *model_dir, const char *fix_dir, be *b, dv4_kv_dtype dt,
                           const char *tag, double tol) {
    char err[512];
    dv4_model *m;
    if (dv4_load(model_dir, b, NULL, &m, err, sizeof err) ||
        dv4_set_kv_dtype(m, dt, err, sizeof err)) {
        printf("FAIL: %s: %s\n", tag, err);
        return 1;
    }
    golden g = {m, fix_dir, tag, tol};
    int fails = golden_chunked(&g, "prefill600", "prefill600", 0) + golden_decode300(&g);
    dv4_free(m);
    return fails;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL_DIR FIXTURE_DIR [MEM_FRACTION]\n", argv[0]);
        return 2;
    }
    double frac = argc > 3 ? atof(argv[3]) : 0.9;
    char err[512];
    be *b = be_cuda_create(0, frac, err, sizeof err);
    if (!b) {
        printf("FAIL: %s\n", err);
        return 1;
    }
    int maj, min;
    const char *dev = be_cuda_device_name(b, &maj, &min);
    printf("device: %s (sm_%d%d)\n", dev, maj, min);
    dv4_model *m;
    if (dv4_load(argv[1], b, NULL, &m, err, sizeof err)) {
        printf("FAIL: load: %s\n", err);
        return 1;
    }
    printf("loaded %s: %.1f MiB of weights on the device, %.1f MiB in use\n", argv[1],
           dv4_rank_weight_bytes(m) / 1048576.0, be_cuda_mem_used(b) / 1048576.0);
    golden g = {m, argv[2], "golden-cuda", 0};
    int n_fail = golden_all(&g);
    n_fail += graph_check(m, b);
    dv4_free(m);
    n_fail += golden_kv_dtype(argv[1], argv[2], b, DV4_KV_BF16, "golden-cuda-bf16kv", GOLDEN_TOL_BF16_KV);
    n_fail += golden_kv_dtype(argv[1], argv[2], b, DV4_KV_FP8, "golden-cuda-fp8kv", GOLDEN_TOL_FP8_KV);
    if (be_cuda_sync(b, err, sizeof err)) {
        printf("FAIL: %s\n", err);
        n_fail++;
    }
    b->ops->destroy(b);
    printf("test_cuda_golden: %s\n", n_fail ? "FAIL" : "PASS");
    return n_fail ? 1 : 0;
}
