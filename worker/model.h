/* model.h — a loaded DeepSeek-V4 model: config, weights in backend memory, RoPE tables,
 * per-sequence state and the forward pass.
 *
 * Why: this is the narrow interface between the worker (RPC, scheduling of steps) and the math.
 * Callers hand in chunks of new tokens per sequence and get logits back; they never see
 * tensors. The forward pass is written once against backend.h and runs on any backend.
 */
#ifndef DUET_MODEL_H
#define DUET_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "common/config.h"
#include "common/safetensors.h"
#include "worker/backend.h"
#include "worker/comm.h"

typedef struct dv4_model dv4_model;
typedef struct dv4_seq dv4_seq;

/* Tensor + expert parallelism: this process is `rank` of `world`; query heads and output groups,
 * routed experts and the shared expert's intermediate are split across ranks, everything else
 * is replicated. Every rank must run dv4_forward with identical chunks in the same order; all
 * ranks return the full logits. comm is not owned. */
typedef struct {
    int rank, world;
    comm *comm;
} dv4_shard;

/* Opens the checkpoint directory (config.json + safetensors), validates every tensor against
 * the config, and prepares this rank's weights on backend b (not owned). shard NULL = the
 * whole model in this process. */
int dv4_load(const char *dir, be *b, const dv4_shard *shard, dv4_model **out, char *err,
             size_t errlen);
/* As dv4_load, calling progress(done, total, ctx) from the loading thread as layers complete
 * (bytes of the checkpoint covered so far / in all). */
typedef void (*dv4_progress_fn)(uint64_t done, uint64_t total, void *ctx);
int dv4_load_ex(const char *dir, be *b, const dv4_shard *shard, dv4_progress_fn progress,
                void *ctx, dv4_model **out, char *err, size_t errlen);
/* Replaces the data plane of a loaded sharded model (after a peer failure the group forms a
 * new one; the weights stay). c must have the same rank and world size. */
void dv4_set_comm(dv4_model *m, comm *c);
/* Bytes of checkpoint weights this rank holds (its slices of split tensors + replicated). */
uint64_t dv4_rank_weight_bytes(const dv4_model *m);
void dv4_free(dv4_model *m);
const dv4_config *dv4_cfg(const dv4_model *m);
uint64_t dv4_fingerprint(const dv4_model *m);

/* RoPE frequency tables (spec §1.4) for a config: main [rope_dims/2] (m = 0 layers) and
 * compress [rope_dims/2] (m > 0 layers, their compressed entries and indexer; YaRN). */
void dv4_rope_tables(const dv4_config *c, float *omega_main, float *omega_cmp);

/* Per-sequence state (spec §3.1): raw-KV rings, compressed entries, indexer keys, compressor
 * carry; sized for up to max_tokens positions. */
int dv4_seq_new(dv4_model *m, int max_tokens, dv4_seq **out, char *err, size_t errlen);
void dv4_seq_free(dv4_model *m, dv4_seq *s);
int dv4_seq_pos(const dv4_seq *s); /* tokens processed so far = next position */

/* One chunk of new tokens for one sequence in a step. */
typedef enum { DV4_LOGITS_NONE, DV4_LOGITS_LAST, DV4_LOGITS_ALL } dv4_logits_mode;
typedef struct {
    dv4_seq *seq;
    const int32_t *ids;   /* [n] token ids, positions seq->pos .. seq->pos+n-1 */
    int n;
    dv4_logits_mode logits;
} dv4_chunk;

/* Runs one step over several sequences (each at most once). Logits rows are written to
 * `logits` (host, [rows, vocab] f32) in chunk order: n rows for ALL, 1 for LAST, 0 for NONE.
 * On success each sequence's position advances by its chunk length. */
int dv4_forward(dv4_model *m, const dv4_chunk *chunks, int n_chunks, float *logits, char *err,
                size_t errlen);
/* Rows of logits that dv4_forward will write for these chunks. */
int dv4_logit_rows(const dv4_chunk *chunks, int n_chunks);

#endif
