/* golden_cases.h — the spec §6 golden cases, shared by the CPU test (Check) and the GPU test.
 *
 * Why: the same comparison with transformers' logits must run on every backend; one copy of
 * the cases keeps them from drifting apart. Plain C (the GPU machine has no libcheck): each case
 * prints one line per comparison and returns the number of failed comparisons; a missing
 * fixture or a refused forward pass counts as a failure with the reason printed.
 *
 * Acceptance per comparison: relative L2 error of the selected logits <= 1e-4, worst row
 * <= 1e-3, and the same argmax at every position whose reference top-1/top-2 margin is above
 * 1e-4 of the logit range (near-ties are reported, not failed; none occur with seed 1).
 */
#ifndef DUET_GOLDEN_CASES_H
#define DUET_GOLDEN_CASES_H

#include "worker/model.h"

typedef struct {
    dv4_model *m;          /* loaded on the backend under test */
    const char *fix_dir;   /* tests/golden/fixtures */
    const char *tag;       /* printed first on every line, e.g. "golden" or "golden-cuda" */
} golden;

/* The fixture case `cas` run in chunks of `chunk` tokens (0 = one prefill). */
int golden_chunked(golden *g, const char *cas, const char *label, int chunk);
/* Prefill of 300, then 300 single-token decode steps. */
int golden_decode300(golden *g);
/* Two sequences in the same steps: whole prompts, then interleaved chunks of 50 and 37. */
int golden_batch2(golden *g);
/* Every case above in a fixed order (prefill600, decode300, chunk37, chunks of 1/3/8/129,
 * batch2, hash). */
int golden_all(golden *g);

#endif
