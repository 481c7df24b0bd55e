/* kvm.h — the coordinator's KV manager: block accounting and prefix-cache metadata
 * (docs/design/kv-and-scheduling.md).
 *
 * Why: the coordinator decides what every worker holds, so it must know, block for block, what
 * the workers' KV memory contains without asking them. Workers follow the same rules (a live
 * sequence at position p holds ceil(p / B) blocks, a cached prefix block holds
 * snapshot_block_cost blocks, the sum never exceeds kv_blocks_total), so this file is the only
 * place that decides whether a step fits. It holds metadata only — hashes, ids, counts — never
 * KV data; it never talks to a worker (the scheduler carries its decisions in StepPlans).
 *
 * Units: "blocks" of B = block_size tokens. A cached block is identified by a content hash
 * chain over token ids: h_i = SHA-256(h_{i-1} as 8 bytes little-endian || the B ids of block i
 * as int32 little-endian), truncated to its first 8 bytes (little-endian); h_0's parent is 0.
 *
 * Lifetimes: lookup pins and new (pending) entries belong to the step being built; kvm_step_end
 * commits or drops them. Evicted ids wait in a drop list for the next StepPlan. kvm_reset forgets
 * everything (worker group re-formed). With blocks_total == 0 (workers that report no budget)
 * nothing is accounted and nothing is cached.
 */
#ifndef DUET_COORD_ENGINE_KVM_H
#define DUET_COORD_ENGINE_KVM_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvm kvm;

typedef struct {
    uint32_t block_size;      /* B, tokens */
    uint32_t blocks_total;    /* capacity (0 = unlimited: not reported, cache off) */
    uint32_t snap_cost;       /* blocks one cached block costs */
    uint64_t block_bytes;     /* bytes of one block on a worker */
    uint32_t live_blocks;     /* held by live sequences */
    uint32_t entries;         /* cached blocks (pending included) */
    uint32_t used_blocks;     /* live_blocks + entries * snap_cost */
    uint64_t queries, hits;   /* prefix-cache lookups, in prompt tokens (cumulative) */
    uint64_t evictions;       /* entries evicted for room (cumulative) */
} kvm_stats;

kvm *kvm_new(uint32_t block_size);
void kvm_free(kvm *k);
/* Forgets every sequence and cached block (and the drop list) and sets the budget reported by
 * the newly formed worker group. Query/hit counters are kept. */
void kvm_reset(kvm *k, uint32_t blocks_total, uint32_t snap_cost, uint64_t block_bytes);
int kvm_enabled(const kvm *k); /* 1 when the workers reported a budget */
uint32_t kvm_block_size(const kvm *k);
void kvm_get_stats(const kvm *k, kvm_stats *out);

/* h = H(parent, ids[0..n)) (n = B for a cache block). */
uint64_t kvm_chain_hash(uint64_t parent, const int32_t *ids, uint32_t n);

/* ---- live sequences: *held is the sequence's block count, owned by the caller ---------- */

/* Makes the sequence hold ceil(new_pos / B) blocks, evicting LRU cached leaves if needed.
 * 0 on success; -1 when even after evicting every evictable entry the units are short (then
 * *held is unchanged; some entries may have been evicted). */
int kvm_seq_grow(kvm *k, uint32_t *held, uint32_t new_pos);
void kvm_seq_free(kvm *k, uint32_t *held);

/* ---- prefix cache ------------------------------------------------------------------------ */

/* The longest chain of committed cached blocks that is a prefix of ids[0..n), leaving at least
 * one token uncovered (the caller needs logits). Writes the chain's hashes and block ids
 * ([return value] each; the arrays hold at least (n - 1) / B entries), pins the chain until
 * kvm_step_end and marks it used. Counts nothing: see kvm_note_query. */
uint32_t kvm_lookup(kvm *k, const int32_t *ids, uint32_t n, uint64_t *hashes,
                    uint64_t *block_ids);
/* 1 when the block after a looked-up chain of `got` blocks (its last hash `parent`, 0 for none)
 * is pending: being computed by another sequence in the step being built. A sequence admitted
 * one step later gets it from the cache (n > 1 choices of one prompt share its prefill). */
int kvm_next_pending(kvm *k, const int32_t *ids, uint32_t n, uint64_t parent, uint32_t got);
/* Counts one admission's lookup: queried prompt tokens and the tokens taken from the cache. */
void kvm_note_query(kvm *k, uint64_t queried, uint64_t hit);
/* Offers the block with chain hash `hash` (parent = the previous block's hash, 0 for the first
 * block) for caching. Returns 1 and a new block id when a pending entry was created (the caller
 * adds a BlockSave to the chunk); 0 when it is already cached (marked used), when its parent is
 * not cached, or when no units are free even after LRU eviction. */
int kvm_save(kvm *k, uint64_t parent, uint64_t hash, uint64_t *block_id);
/* The step built since the last call finished: ok → pending entries become usable; !ok → they
 * are forgotten. Pins are released either way. */
void kvm_step_end(kvm *k, int ok);
/* Moves the ids evicted since the last call into *ids (malloc'd, caller frees; NULL when 0). */
size_t kvm_take_drops(kvm *k, uint64_t **ids);
/* Drops every committed entry that no step in flight restores (children before parents).
 * Returns the count; the ids go to *ids (malloc'd, caller frees) for Release.block_ids. */
size_t kvm_flush(kvm *k, uint64_t **ids);

#endif
