/* worker_sample.h — token sampling on rank 0 from one row of logits.
 *
 * Why: sampling is the only decision a worker makes about tokens, and it must be reproducible:
 * the random draw for a sequence depends only on (seed, position), never on batching, thread
 * count or how many steps ran before, so a replayed step samples the same token. This header
 * must never know about RPC, sequences or the model.
 */
#ifndef DUET_WORKER_SAMPLE_H
#define DUET_WORKER_SAMPLE_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    float temperature; /* 0 (or below 1e-5) = greedy argmax */
    float top_p;       /* (0, 1): nucleus; otherwise off */
    int top_k;         /* > 0: keep the k largest; otherwise off */
    float min_p;       /* (0, 1]: drop tokens with p < min_p * p_max; otherwise off */
    uint64_t seed;
} worker_sample_params;

/* Samples one token id from logits[vocab] for absolute position pos (the position the token
 * will occupy). *logprob = log-softmax of the raw logits (temperature 1, no truncation) at the
 * chosen id. If n_top > 0, top_ids/top_logprobs[n_top] receive the n_top most likely ids of
 * the raw distribution (n_top <= vocab). */
int32_t worker_sample(const float *logits, int vocab, const worker_sample_params *p, uint64_t pos,
                      float *logprob, int n_top, int32_t *top_ids, float *top_logprobs);

#endif
