/* stepexec.h — the worker's sequence and prefix-block state, and the execution of one StepPlan
 * over it: chunk checks, KV accounting, restores, forward passes split at block saves,
 * snapshots, token history and sampling.
 *
 * Why a seam here: rpcsrv.c is about sockets, jobs and the loop thread; this is about what a
 * step does to the worker's state (docs/design/kv-and-scheduling.md, worker half). Everything
 * here runs on the work thread, one call at a time; the counters read by the loop thread
 * (Heartbeat → Stats) are atomics. Promises: a step that fails its checks changes nothing
 * (except drop_blocks, which the coordinator has already forgotten); the accounted units
 * (live sequences ceil(pos/B) + snapshots × snapshot_block_cost) never exceed kv_blocks_total.
 */
#ifndef DUET_STEPEXEC_H
#define DUET_STEPEXEC_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "proto/duet.pb-c.h"
#include "worker/model.h"

typedef struct sx_seq sx_seq;
typedef struct sx_snapmap sx_snapmap;
struct pool;

typedef struct {
    dv4_model *m;                  /* not owned; NULL until configured */
    int rank;                      /* rank 0 samples and returns results */
    int block;                     /* B, tokens */
    int max_seq_len;
    uint32_t blocks_total;         /* kv_blocks_total */
    uint32_t snap_cost;            /* snapshot_block_cost */
    uint64_t block_bytes;          /* kv_block_bytes */
    sx_seq *seqs;                  /* [n_seqs] slots */
    int n_seqs;
    sx_snapmap *snaps;             /* block_id → snapshot */
    _Atomic uint32_t live_seqs, kv_blocks_used, cached_blocks;
    struct pool *spool;            /* rank 0: threads that sample a step's chunks (lazy) */
    int dev_sample;                /* rank 0: draws that need no shaping (no logit_bias, masks
                                      or penalties) use the backend's sample op on the device;
                                      set after sx_configure (rpcsrv.c: --device-sampling) */
} sx;

/* Sizes the budget and (re)creates empty state for a loaded model: block (0 → 256; a multiple
 * of 128), max_seqs slots of max_seq_len tokens, budget_bytes of KV memory. Frees every
 * sequence and snapshot first. Fails with a sentence (and no state) when the block size is
 * invalid or not even max_seqs one-block sequences fit. */
int sx_configure(sx *x, dv4_model *m, int rank, int block, int max_seqs, int max_seq_len,
                 uint64_t budget_bytes, char *err, size_t errlen);
/* Frees every sequence and snapshot (a new coordinator, a failed group); keeps the config. */
void sx_clear(sx *x);
/* sx_clear and forget the model and the slots. */
void sx_destroy(sx *x);
/* Release: frees these sequences and cached blocks; unknown ids are ignored. */
void sx_release(sx *x, const Duet__Release *r);

/* What a successful step returns (rank 0): results[n] point into the arrays below. */
typedef struct {
    Duet__SeqResult *res;
    Duet__SeqResult **ptrs;
    size_t n;
    float *logits;      /* backing store of SeqResult.logits */
    int32_t *top_ids;
    float *top_lps;
} sx_result;
void sx_result_free(sx_result *r);

/* Executes a plan. 0 on success; DUET_EINVAL with a sentence when a check failed (nothing
 * changed); DUET_EIO when the forward pass itself failed after the checks (a collective: the
 * caller must treat every sequence as lost and call sx_clear). */
int sx_step(sx *x, const Duet__StepPlan *p, sx_result *out, char *err, size_t errlen);

#endif
