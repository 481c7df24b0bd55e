/* kvm.c — block accounting and the prefix-cache table behind kvm.h.
 *
 * Why this shape: the table is small (at most blocks_total / snapshot_block_cost entries) and
 * is touched a few times per sequence per step, so entries live in one array with a free list
 * and an open-addressed index (linear probing, backward-shift deletion) maps hash → entry. The
 * chain structure is kept as parent indices plus children counts so that only leaves are
 * evicted (a chain shrinks from its tail, so every cached block stays reachable from the root).
 * LRU picks the least recently used evictable leaf by a scan: eviction is rare next to lookups
 * and the scan is O(entries), which keeps the structure trivially correct.
 */
#include "coordinator/engine/kvm.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "common/err.h"

typedef struct {
    uint64_t hash, id;
    int32_t parent;      /* entry index, -1 = first block of a chain */
    uint32_t children;   /* entries whose parent this is */
    uint32_t pins;       /* restores in the step being built / in flight */
    uint64_t last_use;   /* kvm clock */
    uint8_t used;        /* slot in use */
    uint8_t pending;     /* saved by the step in flight: not restorable yet */
} entry;

typedef struct {
    uint32_t *v;
    size_t n, cap;
} ivec;

typedef struct {
    uint64_t *v;
    size_t n, cap;
} uvec;

struct kvm {
    uint32_t B, total, snap_cost;
    uint64_t block_bytes;
    uint32_t live;          /* blocks held by live sequences */
    entry *e;               /* [cap_e] */
    uint32_t cap_e, n_e;    /* slots, entries in use */
    uint32_t *free_e;       /* free slot stack */
    uint32_t n_free;
    uint32_t *slot;         /* [n_slot] index: entry + 1, 0 = empty */
    uint32_t n_slot;        /* power of two, > 2 * cap_e */
    uint64_t clock, next_id;
    uint64_t queries, hits, evictions;
    ivec pins, pending;     /* of the current step */
    uvec drops;             /* evicted ids not yet sent */
};

static void ivec_push(ivec *v, uint32_t x) {
    if (v->n == v->cap) v->v = xrealloc(v->v, (v->cap = v->cap ? 2 * v->cap : 16) * sizeof *v->v);
    v->v[v->n++] = x;
}

static void uvec_push(uvec *v, uint64_t x) {
    if (v->n == v->cap) v->v = xrealloc(v->v, (v->cap = v->cap ? 2 * v->cap : 16) * sizeof *v->v);
    v->v[v->n++] = x;
}

uint64_t kvm_chain_hash(uint64_t parent, const int32_t *ids, uint32_t n) {
    uint8_t buf[8 + 4 * 256], *heap = NULL, *b = buf;
    size_t len = 8 + 4 * (size_t)n;
    if (len > sizeof buf) b = heap = xmalloc(len);
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(parent >> (8 * i));
    for (uint32_t j = 0; j < n; j++) {
        uint32_t x = (uint32_t)ids[j];
        for (int i = 0; i < 4; i++) b[8 + 4 * j + (uint32_t)i] = (uint8_t)(x >> (8 * i));
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (!EVP_Digest(b, len, md, &mdlen, EVP_sha256(), NULL) || mdlen < 8) {
        /* libcrypto cannot fail on SHA-256 of memory short of an allocation failure */
        free(heap);
        abort();
    }
    free(heap);
    uint64_t h = 0;
    for (int i = 7; i >= 0; i--) h = h << 8 | md[i];
    return h;
}

/* ---- the index -------------------------------------------------------------------------- */

static uint32_t slot_of(const kvm *k, uint64_t h) {
    return (uint32_t)((h * 0x9E3779B97F4A7C15ULL) >> 32) & (k->n_slot - 1);
}

static int32_t find(const kvm *k, uint64_t h) {
    if (!k->n_slot) return -1;
    for (uint32_t s = slot_of(k, h);; s = (s + 1) & (k->n_slot - 1)) {
        uint32_t x = k->slot[s];
        if (!x) return -1;
        if (k->e[x - 1].hash == h) return (int32_t)(x - 1);
    }
}

static void index_insert(kvm *k, uint32_t idx) {
    uint32_t s = slot_of(k, k->e[idx].hash);
    while (k->slot[s]) s = (s + 1) & (k->n_slot - 1);
    k->slot[s] = idx + 1;
}

static void index_remove(kvm *k, uint64_t h) {
    uint32_t m = k->n_slot - 1, s = slot_of(k, h);
    while (k->slot[s] && k->e[k->slot[s] - 1].hash != h) s = (s + 1) & m;
    if (!k->slot[s]) return;
    k->slot[s] = 0;
    /* backward shift: move later members of the cluster into the hole when allowed */
    for (uint32_t j = (s + 1) & m; k->slot[j]; j = (j + 1) & m) {
        uint32_t home = slot_of(k, k->e[k->slot[j] - 1].hash);
        /* j's entry may move to s when s lies cyclically in [home, j) */
        if (((j - home) & m) >= ((j - s) & m)) {
            k->slot[s] = k->slot[j];
            k->slot[j] = 0;
            s = j;
        }
    }
}

/* ---- entries ---------------------------------------------------------------------------- */

static uint32_t used_blocks(const kvm *k) { return k->live + k->n_e * k->snap_cost; }
static uint32_t free_blocks(const kvm *k) {
    uint32_t u = used_blocks(k);
    return u >= k->total ? 0 : k->total - u;
}

static void remove_entry(kvm *k, uint32_t i, int to_drops) {
    entry *x = &k->e[i];
    if (x->parent >= 0) k->e[x->parent].children--;
    if (to_drops) uvec_push(&k->drops, x->id);
    index_remove(k, x->hash);
    x->used = 0;
    k->n_e--;
    k->free_e[k->n_free++] = i;
}

static int evictable(const entry *x) {
    return x->used && !x->children && !x->pins && !x->pending;
}

/* Evicts the least recently used evictable leaf; 0 on success, -1 when there is none. */
static int evict_one(kvm *k) {
    int32_t best = -1;
    for (uint32_t i = 0; i < k->cap_e; i++)
        if (evictable(&k->e[i]) && (best < 0 || k->e[i].last_use < k->e[best].last_use))
            best = (int32_t)i;
    if (best < 0) return -1;
    remove_entry(k, (uint32_t)best, 1);
    k->evictions++;
    return 0;
}

/* Frees units by eviction until `need` are free; -1 when that is impossible. */
static int make_room(kvm *k, uint32_t need) {
    while (free_blocks(k) < need)
        if (evict_one(k)) return -1;
    return 0;
}

/* ---- public ----------------------------------------------------------------------------- */

kvm *kvm_new(uint32_t block_size) {
    kvm *k = xcalloc(1, sizeof *k);
    k->B = block_size ? block_size : 256;
    return k;
}

static void clear(kvm *k) {
    free(k->e);
    free(k->free_e);
    free(k->slot);
    k->e = NULL;
    k->free_e = k->slot = NULL;
    k->cap_e = k->n_e = k->n_free = k->n_slot = 0;
    k->live = 0;
    k->pins.n = k->pending.n = k->drops.n = 0;
}

void kvm_free(kvm *k) {
    if (!k) return;
    clear(k);
    free(k->pins.v);
    free(k->pending.v);
    free(k->drops.v);
    free(k);
}

void kvm_reset(kvm *k, uint32_t blocks_total, uint32_t snap_cost, uint64_t block_bytes) {
    clear(k);
    k->total = blocks_total;
    k->snap_cost = snap_cost ? snap_cost : 1;
    k->block_bytes = block_bytes;
    if (!blocks_total) return;
    k->cap_e = blocks_total / k->snap_cost;
    if (!k->cap_e) return;
    k->e = xcalloc(k->cap_e, sizeof *k->e);
    k->free_e = xmalloc(k->cap_e * sizeof *k->free_e);
    for (uint32_t i = 0; i < k->cap_e; i++) k->free_e[i] = k->cap_e - 1 - i;
    k->n_free = k->cap_e;
    k->n_slot = 16;
    while (k->n_slot <= 2 * k->cap_e) k->n_slot *= 2;
    k->slot = xcalloc(k->n_slot, sizeof *k->slot);
}

int kvm_enabled(const kvm *k) { return k->total > 0; }
uint32_t kvm_block_size(const kvm *k) { return k->B; }

void kvm_get_stats(const kvm *k, kvm_stats *o) {
    *o = (kvm_stats){.block_size = k->B,
                     .blocks_total = k->total,
                     .snap_cost = k->snap_cost,
                     .block_bytes = k->block_bytes,
                     .live_blocks = k->live,
                     .entries = k->n_e,
                     .used_blocks = used_blocks(k),
                     .queries = k->queries,
                     .hits = k->hits,
                     .evictions = k->evictions};
}

int kvm_seq_grow(kvm *k, uint32_t *held, uint32_t new_pos) {
    uint32_t want = (uint32_t)(((uint64_t)new_pos + k->B - 1) / k->B);
    if (want <= *held) return 0;
    if (k->total && make_room(k, want - *held)) return -1;
    k->live += want - *held;
    *held = want;
    return 0;
}

void kvm_seq_free(kvm *k, uint32_t *held) {
    k->live = *held > k->live ? 0 : k->live - *held;
    *held = 0;
}

uint32_t kvm_lookup(kvm *k, const int32_t *ids, uint32_t n, uint64_t *hashes,
                    uint64_t *block_ids) {
    if (!k->total || !k->n_e || n < 1) return 0;
    uint32_t max = (n - 1) / k->B, got = 0;
    uint64_t h = 0;
    k->clock++;
    while (got < max) {
        h = kvm_chain_hash(h, ids + (size_t)got * k->B, k->B);
        int32_t i = find(k, h);
        if (i < 0 || k->e[i].pending) break;
        hashes[got] = h;
        block_ids[got] = k->e[i].id;
        got++;
    }
    for (uint32_t j = 0; j < got; j++) {
        int32_t i = find(k, hashes[j]);
        k->e[i].pins++;
        k->e[i].last_use = k->clock;
        ivec_push(&k->pins, (uint32_t)i);
    }
    return got;
}

int kvm_next_pending(kvm *k, const int32_t *ids, uint32_t n, uint64_t parent, uint32_t got) {
    if (!k->total || !k->n_e || n < 1 || got >= (n - 1) / k->B) return 0;
    int32_t i = find(k, kvm_chain_hash(parent, ids + (size_t)got * k->B, k->B));
    return i >= 0 && k->e[i].pending;
}

void kvm_note_query(kvm *k, uint64_t queried, uint64_t hit) {
    k->queries += queried;
    k->hits += hit;
}

int kvm_save(kvm *k, uint64_t parent, uint64_t hash, uint64_t *block_id) {
    if (!k->total || !k->cap_e) return 0;
    int32_t i = find(k, hash);
    if (i >= 0) {
        k->e[i].last_use = ++k->clock;
        return 0;
    }
    int32_t pi = -1;
    if (parent) {
        pi = find(k, parent);
        if (pi < 0) return 0; /* an orphan could never be found from the root */
    }
    /* the parent must survive the eviction that makes room for its child */
    if (pi >= 0) k->e[pi].pins++;
    int rc = make_room(k, k->snap_cost);
    if (pi >= 0) k->e[pi].pins--;
    if (rc || !k->n_free) return 0;
    uint32_t x = k->free_e[--k->n_free];
    entry *e = &k->e[x];
    *e = (entry){.hash = hash, .id = ++k->next_id, .parent = pi, .last_use = ++k->clock,
                 .used = 1, .pending = 1};
    if (pi >= 0) k->e[pi].children++;
    k->n_e++;
    index_insert(k, x);
    ivec_push(&k->pending, x);
    *block_id = e->id;
    return 1;
}

void kvm_step_end(kvm *k, int ok) {
    for (size_t j = 0; j < k->pins.n; j++) {
        entry *e = &k->e[k->pins.v[j]];
        if (e->used && e->pins) e->pins--;
    }
    k->pins.n = 0;
    /* newest first: a pending child goes before its pending parent */
    for (size_t j = k->pending.n; j-- > 0;) {
        uint32_t i = k->pending.v[j];
        if (!k->e[i].used) continue;
        if (ok) k->e[i].pending = 0;
        else remove_entry(k, i, 0); /* never written (the step failed): nothing to drop */
    }
    k->pending.n = 0;
}

size_t kvm_take_drops(kvm *k, uint64_t **ids) {
    size_t n = k->drops.n;
    *ids = NULL;
    if (!n) return 0;
    *ids = xmalloc(n * sizeof **ids);
    memcpy(*ids, k->drops.v, n * sizeof **ids);
    k->drops.n = 0;
    return n;
}

size_t kvm_flush(kvm *k, uint64_t **ids) {
    size_t before = k->drops.n;
    for (;;) { /* leaves first, until only pinned/pending chains remain */
        int any = 0;
        for (uint32_t i = 0; i < k->cap_e; i++)
            if (evictable(&k->e[i])) {
                remove_entry(k, i, 1);
                any = 1;
            }
        if (!any) break;
    }
    size_t n = k->drops.n - before;
    *ids = NULL;
    if (n) {
        *ids = xmalloc(n * sizeof **ids);
        memcpy(*ids, k->drops.v + before, n * sizeof **ids);
    }
    k->drops.n = before; /* these go out through Release now, not in the next plan */
    return n;
}
