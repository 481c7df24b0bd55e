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

/* ---- KV dtype -----------------------------------------------------------------------------
 * How the KV state of every sequence is stored: raw-KV rings, compressed entries and indexer
 * keys in f32 (the default) or bf16 (half the bytes; rounded to nearest even on write, widened
 * to f32 on read, so all math stays f32); or fp8: rings and compressed entries as FP8 rows
 * (common/formats.h "FP8 KV rows": 584 bytes per 512-dim row, the nope dims exactly the FP8
 * round trip of the model's KV QAT, the RoPE dims bf16) and indexer keys in bf16. Compressor
 * carries are f32 always. The values equal the backend.h BE_KV_* formats of rings/entries. */
typedef enum { DV4_KV_F32 = 0, DV4_KV_BF16 = 1, DV4_KV_FP8 = 2 } dv4_kv_dtype;
/* "f32", "bf16" or "fp8" -> *out; anything else is DUET_EINVAL with a sentence naming the
 * choices. */
int dv4_kv_dtype_parse(const char *s, dv4_kv_dtype *out, char *err, size_t errlen);
const char *dv4_kv_dtype_name(dv4_kv_dtype dt);
/* Sets a loaded model's KV dtype. Only while no sequence or snapshot of it exists, and fp8 only
 * for head dims whose rows fmt_kv_fp8_ok() accepts with 64 RoPE dims (else DUET_EINVAL with a
 * sentence). */
int dv4_set_kv_dtype(dv4_model *m, dv4_kv_dtype dt, char *err, size_t errlen);
dv4_kv_dtype dv4_get_kv_dtype(const dv4_model *m);

/* ---- KV state in blocks (docs/design/kv-and-scheduling.md "Units", "Worker memory") -------
 * State is accounted in blocks of B tokens (B a multiple of 128, so every CSA and HCA window
 * closes on a block boundary). Sizes in bytes, this rank (the single KV head is replicated, so
 * every rank holds the same state): rings, entries and keys at the KV dtype, carries f32. */
typedef struct {
    uint64_t block_bytes;  /* growing state of B tokens: compressed entries of every CSA/HCA
                              layer + indexer keys */
    uint64_t resume_bytes; /* what a sequence needs to resume at a block boundary: raw-KV rings
                              + the previous-window carries (CSA main and indexer); the current
                              window of every compressor is dead there (rewritten before read) */
    uint64_t fixed_bytes;  /* per live sequence whatever its length: rings + every carry */
} dv4_kv_sizes;
/* Sizes for a config at block size B and KV dtype dt. Returns DUET_EINVAL with a sentence
 * unless B is a positive multiple of 128 and (fp8) the head dim fits FP8 rows. */
int dv4_kv_sizes_of(const dv4_config *c, int block, dv4_kv_dtype dt, dv4_kv_sizes *out,
                    char *err, size_t errlen);
/* The block size of a loaded model's sequences and snapshots (default 256). Changes only while
 * no sequence or snapshot exists (else DUET_EINVAL). Same errors as dv4_kv_sizes_of. */
int dv4_set_block_size(dv4_model *m, int block, char *err, size_t errlen);
int dv4_block_size(const dv4_model *m);

/* Per-sequence state (spec §3.1): raw-KV rings and compressor carries (allocated here), and
 * compressed entries + indexer keys, which grow block by block as positions are reserved
 * (dv4_seq_reserve; dv4_forward reserves what a chunk needs). max_tokens caps the positions. */
int dv4_seq_new(dv4_model *m, int max_tokens, dv4_seq **out, char *err, size_t errlen);
void dv4_seq_free(dv4_model *m, dv4_seq *s);
int dv4_seq_pos(const dv4_seq *s); /* tokens processed so far = next position */
/* Grows the growing state to hold positions [0, tokens) rounded up to whole blocks (backend
 * alloc + copy + free, so it works on device memory). Never shrinks. DUET_EINVAL with a
 * sentence if tokens exceeds the sequence's max_tokens. */
int dv4_seq_reserve(dv4_model *m, dv4_seq *s, int tokens, char *err, size_t errlen);
/* Bytes of growing state allocated (= blocks reserved × block_bytes). */
uint64_t dv4_seq_grown_bytes(const dv4_model *m, const dv4_seq *s);

/* The growing state (compressed entries, indexer keys) is paged (kvstate.c, backend.h "Paged
 * growing state"): pages of block_bytes come from one pool per model. At most `pages` pages
 * may be in use, or allocated (0: no limit; the worker sets its kv_blocks_total); a reserve or
 * save past it fails with DUET_ENOMEM and holds nothing more. Pages in use: held by sequences and snapshots (a page shared by a
 * sequence and the prefix snapshots it was saved to or restored from counts once). */
void dv4_kv_pool_limit(dv4_model *m, int pages);
void dv4_kv_pool_stats(const dv4_model *m, int *pages_in_use, int *pages_allocated);

/* ---- prefix snapshots ---------------------------------------------------------------------
 * A snapshot is one cached prefix block: the page of block [end - B, end) (compressed entries +
 * indexer keys, shared in place with the saving sequence) and a copy of the resume state at end
 * (rings + previous-window carries). A chain of n snapshots whose ends are B, 2B, ..., nB
 * restores a sequence at position nB (sharing the n pages, copying the last resume state) whose
 * next logits are bitwise those of a cold prefill (CPU backend). Save or restore fails with
 * DUET_ENOMEM when the page pool is at its limit. */
typedef struct dv4_snap dv4_snap;
/* Saves s at its current position, which must be a positive multiple of B. */
int dv4_snap_save(dv4_model *m, const dv4_seq *s, dv4_snap **out, char *err, size_t errlen);
/* A fresh sequence (capped at max_tokens) at position n·B from chain[0..n): entries of every
 * block, resume state of the last. chain[i] must end at (i+1)·B. Snapshots are not consumed. */
int dv4_seq_restore(dv4_model *m, int max_tokens, dv4_snap *const *chain, int n, dv4_seq **out,
                    char *err, size_t errlen);
void dv4_snap_free(dv4_model *m, dv4_snap *p);
int dv4_snap_end(const dv4_snap *p);
uint64_t dv4_snap_bytes(const dv4_snap *p); /* = block_bytes + resume_bytes */

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
/* Device sampling (the backend's optional `sample` op) for dv4_forward_ds: request i draws
 * from logits row req[i].row (rows in dv4_forward's order) right after the LM head; res[i]
 * is filled. A row's logits are downloaded into `logits` only when no request names it, when
 * keep[row] is set (the host needs the row: return_logits), or when its request came back with
 * `fallback` (the host samples it); other rows of `logits` are left unwritten. */
typedef struct {
    int n;
    const be_sample_req *req;  /* [n] host */
    be_sample_res *res;        /* [n] host */
    const unsigned char *keep; /* [rows] host, or NULL: no row needed beyond the rules above */
} dv4_dsample;
/* dv4_forward with device sampling; ds NULL (or the backend without the op: DUET_EINVAL) is
 * dv4_forward. */
int dv4_forward_ds(dv4_model *m, const dv4_chunk *chunks, int n_chunks, float *logits,
                   const dv4_dsample *ds, char *err, size_t errlen);
/* Rows of logits that dv4_forward will write for these chunks. */
int dv4_logit_rows(const dv4_chunk *chunks, int n_chunks);
/* Bytes of activations (backend memory) one dv4_forward over T tokens allocates, logits
 * excluded; device backends use it as their margin when sizing the KV budget. */
uint64_t dv4_step_scratch_bytes(const dv4_config *c, int T);

#endif
