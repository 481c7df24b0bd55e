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
 *
 * usage: test_cuda_golden MODEL_DIR FIXTURE_DIR [MEM_FRACTION]
 */
#include <stdio.h>
#include <stdlib.h>

#include "kernels/be_cuda.h"
#include "tests/golden/golden_cases.h"
#include "worker/model.h"

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
    golden g = {m, argv[2], "golden-cuda"};
    int n_fail = golden_all(&g);
    dv4_free(m);
    if (be_cuda_sync(b, err, sizeof err)) {
        printf("FAIL: %s\n", err);
        n_fail++;
    }
    b->ops->destroy(b);
    printf("test_cuda_golden: %s\n", n_fail ? "FAIL" : "PASS");
    return n_fail ? 1 : 0;
}
