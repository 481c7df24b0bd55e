/* tok_internal.h — private structures shared by the tokenizer's .c files (and its tests).
 *
 * Why: load (tokenizer.c), encode (encode.c) and UTF-8/stream handling (utf8.c) share the
 * tables below; tests reach the pre-tokenizer and the two BPE variants through these
 * declarations. Never include this outside coordinator/tokenizer and tests/tokenizer.
 */
#ifndef DUET_TOK_INTERNAL_H
#define DUET_TOK_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "coordinator/tokenizer/tokenizer.h"

/* ---- growable byte buffer ------------------------------------------------------------------ */
typedef struct {
    char *p;
    size_t n;
    size_t cap;
} tok_buf_t;

void tok_buf_put(tok_buf_t *b, const void *src, size_t n);

/* ---- UTF-8 lossy state machine (maximal-subpart U+FFFD substitution, as Rust/Python) ------- */
typedef struct {
    uint8_t pend[4]; /* bytes of an incomplete character */
    uint8_t n;       /* bytes held in pend */
    uint8_t need;    /* total length of the character being assembled */
} tok_u8_t;

void tok_u8_feed(tok_u8_t *s, const uint8_t *src, size_t n, tok_buf_t *out);
void tok_u8_flush(tok_u8_t *s, tok_buf_t *out);
/* 1 if the n bytes are valid UTF-8 (no surrogates, no overlongs, <= U+10FFFF). */
int tok_utf8_valid(const uint8_t *s, size_t n);

/* ---- Unicode classes used by the pre-tokenizer regexes -------------------------------------- */
enum {
    TOK_C_L = 1 << 0,      /* \p{L} */
    TOK_C_M = 1 << 1,      /* \p{M} */
    TOK_C_N = 1 << 2,      /* \p{N} */
    TOK_C_P = 1 << 3,      /* \p{P} */
    TOK_C_S = 1 << 4,      /* \p{S} */
    TOK_C_WS = 1 << 5,     /* \s (Unicode White_Space, Oniguruma) */
    TOK_C_CRLF = 1 << 6,   /* \r or \n */
    TOK_C_CJK = 1 << 7,    /* [一-龥぀-ゟ゠-ヿ] */
    TOK_C_APUNCT = 1 << 8, /* [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~] */
    TOK_C_AALPHA = 1 << 9, /* [A-Za-z] */
    TOK_C_SPACE = 1 << 10  /* U+0020 */
};

uint16_t tok_cp_class(uint32_t cp);
/* The same without the generated override table (input of tests/tokenizer/gen_unicode_delta.py). */
uint16_t tok_cp_class_utf8proc(uint32_t cp);

/* Splits one segment of valid UTF-8 (no added tokens inside) into the pieces of the three
 * Split(Isolated) stages of spec §5.2; calls fn(piece, len, ctx) for each piece in order. */
typedef void (*tok_piece_fn)(const uint8_t *piece, size_t len, void *ctx);
void tok_pretokenize(tok_t *t, const uint8_t *s, size_t n, tok_piece_fn fn, void *ctx);

/* ---- BPE ------------------------------------------------------------------------------------- */
typedef struct {
    uint64_t key;  /* left id << 32 | right id; 0 = empty slot (id pair (0,0) never merges) */
    uint32_t rank; /* merge priority, lower first */
    int32_t id;    /* id of the merged token */
} tok_merge_t;

typedef struct {
    uint64_t hash;
    uint32_t key_off, key_len; /* piece bytes in cache_bytes */
    uint32_t ids_off, ids_n;   /* ids in cache_ids */
} tok_cache_ent_t;

struct tok {
    size_t n_ids;          /* highest id + 1 */
    const char **spell;    /* [n_ids] tokenizer.json spelling (added content wins), or NULL */
    const char **vkey;     /* [n_ids] BPE vocabulary key, or NULL */
    uint32_t *dec_off;     /* [n_ids] offset of the decoded bytes in dec */
    uint32_t *dec_len;     /* [n_ids] length of the decoded bytes */
    char *dec;             /* decoded bytes of every token */
    uint8_t *idflags;      /* [n_ids] 1 = in vocab, 2 = added, 4 = special */
    char *strs;            /* arena holding every spelling */
    size_t strs_len;

    int32_t *vhash;        /* [vhash_cap] vocab key -> id (open addressing, -1 empty) */
    size_t vhash_cap;
    int32_t *ahash;        /* [ahash_cap] added content -> id */
    size_t ahash_cap;

    int32_t byte_id[256];  /* id of the single-byte token of each byte */
    tok_merge_t *merges;   /* [merges_cap] */
    size_t merges_cap;
    size_t n_merges;

    /* added-token tries: [0] non-normalized tokens (matched first), [1] normalized tokens */
    struct tok_trie {
        struct tok_trie_node { int32_t child, sibling, id; uint8_t b; } *nodes;
        size_t n, cap;
        uint8_t first[256];
    } trie[2];

    /* encoder scratch (not thread-safe; see tokenizer.h) */
    uint16_t *sc_cls;      /* [sc_cap] class per code point of the current segment */
    uint32_t *sc_off;      /* [sc_cap + 1] byte offset per code point */
    size_t sc_cap;
    tok_buf_t sanit;       /* sanitised copy of invalid UTF-8 input */
    int32_t *bpe_ids;      /* BPE work arrays */
    int32_t *bpe_aux;
    size_t bpe_cap;
    void *heap;
    size_t heap_cap;

    /* piece cache: piece bytes -> ids */
    tok_cache_ent_t *cache;
    size_t cache_cap, cache_n;
    tok_buf_t cache_bytes;
    int32_t *cache_ids;
    size_t cache_ids_n, cache_ids_cap;
};

/* Looks up a merge (left,right); returns the table entry or NULL. */
const tok_merge_t *tok_merge_find(const tok_t *t, int32_t l, int32_t r);
/* BPE of one piece of raw bytes; appends ids. The two variants must agree (tests check). */
void tok_bpe_simple(tok_t *t, const uint8_t *s, size_t n, tok_ids_t *out);
void tok_bpe_heap(tok_t *t, const uint8_t *s, size_t n, tok_ids_t *out);
void tok_ids_push(tok_ids_t *ids, int32_t id);

#endif
