/* worker_sample.h — token sampling on rank 0 from one row of logits.
 *
 * Why: sampling is the only decision a worker makes about tokens, and it must be reproducible:
 * the random draw for a sequence depends only on (seed, stream, position), never on batching,
 * thread count or how many steps ran before, so a replayed step samples the same token and the
 * n choices of one request (streams) differ. Order per token (server-api §3.1): banned/allowed
 * masks and logit_bias → repetition / presence / frequency penalties → temperature → top-k →
 * top-p → min-p → draw. Logprobs are of the RAW logits. This header must never know about RPC,
 * sequences or the model.
 */
#ifndef DUET_WORKER_SAMPLE_H
#define DUET_WORKER_SAMPLE_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    float temperature; /* 0 (or below 1e-5) = greedy argmax, ties → lowest id */
    float top_p;       /* (0, 1): nucleus; otherwise off */
    int top_k;         /* > 0: keep the k largest; otherwise off */
    float min_p;       /* (0, 1]: drop tokens with p < min_p * p_max; otherwise off */
    uint64_t seed;
    uint32_t stream;   /* RNG stream (the request's choice index) */
    /* penalties: repetition over every counted token (prompt + generated; vLLM: positive
     * logits divided, negative multiplied; 0 or 1 = off), presence / frequency over generated
     * tokens (OpenAI: logit -= presence + frequency × count; 0 = off) */
    float repetition_penalty, presence_penalty, frequency_penalty;
    const int32_t *bias_ids;     /* [n_bias] logit_bias: added to these ids' logits */
    const float *bias_values;    /* [n_bias], finite */
    int n_bias;
    const int32_t *banned_ids;   /* [n_banned] never drawn */
    int n_banned;
    const int32_t *allowed_ids;  /* [n_allowed]; n_allowed > 0: only these may be drawn */
    int n_allowed;
} worker_sample_params;

/* Occurrence counts of a sequence's token ids by distinct id, kept incrementally: `all` over
 * every position, `gen` over positions >= prompt_len. Zero-initialise; free with
 * worker_counts_free. Memory and the sampler's penalty work are O(distinct ids). */
typedef struct {
    int32_t *id;          /* [cap] open addressing, -1 = empty */
    uint32_t *all, *gen;  /* [cap] */
    uint32_t cap, n;      /* cap: a power of two (0 before the first id) */
    uint32_t prompt_len;  /* the split the gen counts were made with */
    size_t folded;        /* ids[0, folded) are counted */
} worker_counts;

/* Counts ids[folded, n_ids) (positions = indices). A different prompt_len recounts from 0. */
void worker_counts_update(worker_counts *c, const int32_t *ids, size_t n_ids,
                          uint32_t prompt_len);
void worker_counts_free(worker_counts *c);

/* Checks parameters against the vocabulary before any compute: ids in [0, vocab), finite
 * bias values, and at least one id left after the allowed/banned masks. 0, or DUET_EINVAL
 * with a sentence. */
int worker_sample_check(const worker_sample_params *p, int vocab, char *err, size_t errlen);

/* Samples one token id from logits[vocab] for absolute position pos (the position the token
 * will occupy); counts (NULL = none) feed the penalties. *logprob = log-softmax of the raw
 * logits (temperature 1, no masks, no penalties) at the chosen id. If n_top > 0,
 * top_ids/top_logprobs[n_top] receive the n_top most likely ids of the raw distribution,
 * descending (ties → lower id first; n_top <= vocab). Returns the id, or -1 with a sentence
 * in err when the masks leave nothing allowed. */
int32_t worker_sample(const float *logits, int vocab, const worker_sample_params *p,
                      const worker_counts *counts, uint64_t pos, float *logprob, int n_top,
                      int32_t *top_ids, float *top_logprobs, char *err, size_t errlen);

/* The uniform draw in [0, 1) of a sampled token at absolute position pos: a pure function of
 * (seed, stream, pos), shared by worker_sample and the device sampler (backend op `sample`)
 * so that both walk the same u. */
double worker_sample_u01(uint64_t seed, uint32_t stream, uint64_t pos);

/* The k first ids of raw logits[vocab] in the sampler's order (NaN as -inf, value descending,
 * ties → lower id) into ids[k], their values (NaN → -inf) into vals[k]; k is capped at vocab.
 * O(vocab + k log k): what the CPU backend's `sample` op ranks its candidates with. */
void worker_sample_rank(const float *logits, int vocab, int k, int32_t *ids, float *vals);

#endif
