/* tokenizer.c — loading a HF tokenizer.json, id/token lookups and whole-sequence decoding.
 *
 * Why: the tokenizer's tables are built once from the shipped tokenizer.json (ids, merges and
 * the `special` flags are read from the file, never hard-coded). The pre-tokenizer is
 * hand-written (encode.c) for speed, so loading checks that the file asks for exactly the
 * pre-tokenizer we implement and refuses anything else with a clear error.
 *
 * It must never: accept a file whose normalizer, pre-tokenizer, model options or added-token
 * options differ from what encode.c implements; crash on a corrupt or truncated file.
 */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "coordinator/tokenizer/tok_internal.h"

/* The three Split patterns of spec §5.2, as they appear in tokenizer.json. */
static const char *const PRETOK_RE[3] = {
    "\\p{N}{1,3}",
    "[\xe4\xb8\x80-\xe9\xbe\xa5\xe3\x81\x80-\xe3\x82\x9f\xe3\x82\xa0-\xe3\x83\xbf]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
};

/* ======== hashing ============================================================================ */

static uint64_t hash_bytes(const void *p, size_t n)
{
    const uint8_t *s = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

static size_t pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n)
        c *= 2;
    return c;
}

/* Open-addressing string -> id table whose keys are keys[id]. */
static void shash_put(int32_t *tab, size_t cap, const char **keys, int32_t id)
{
    size_t i = hash_bytes(keys[id], strlen(keys[id])) & (cap - 1);
    while (tab[i] >= 0 && strcmp(keys[tab[i]], keys[id]) != 0)
        i = (i + 1) & (cap - 1);
    tab[i] = id;
}

static int32_t shash_get(const int32_t *tab, size_t cap, const char **keys, const char *s,
                         size_t n)
{
    size_t i = hash_bytes(s, n) & (cap - 1);
    while (tab[i] >= 0) {
        const char *k = keys[tab[i]];
        if (strncmp(k, s, n) == 0 && k[n] == 0)
            return tab[i];
        i = (i + 1) & (cap - 1);
    }
    return -1;
}

static size_t merge_slot(uint64_t key, size_t cap)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> 40) & (cap - 1); /* cap <= 2^24 */
}

const tok_merge_t *tok_merge_find(const tok_t *t, int32_t l, int32_t r)
{
    uint64_t key = ((uint64_t)(uint32_t)l << 32) | (uint32_t)r;
    size_t i = merge_slot(key, t->merges_cap);
    for (;;) {
        const tok_merge_t *m = &t->merges[i];
        if (m->key == key)
            return m;
        if (m->key == 0)
            return NULL;
        i = (i + 1) & (t->merges_cap - 1);
    }
}

/* ======== GPT-2 byte <-> unicode map ========================================================= */

/* byte_cp[b] = the code point that stands for byte b in byte-level token spellings. */
static void byte_map(uint32_t byte_cp[256])
{
    uint32_t extra = 256;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        byte_cp[b] = keep ? (uint32_t)b : extra++;
    }
}

static size_t put_cp(char *o, uint32_t cp)
{
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    o[0] = (char)(0xC0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3F));
    return 2; /* the map only produces code points < 0x800 */
}

/* Next code point of a valid UTF-8 string (jansson guarantees validity); advances *p. */
static uint32_t next_cp(const uint8_t **p)
{
    const uint8_t *s = *p;
    uint32_t c = s[0];
    int len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (len > 1)
        c &= (0x7Fu >> len);
    for (int k = 1; k < len && s[k]; k++)
        c = (c << 6) | (s[k] & 0x3Fu);
    int k = 0;
    while (k < len && s[k])
        k++;
    *p = s + k;
    return c;
}

/* HF ByteLevel decoder rule: a token whose every character is in the byte map decodes to those
 * bytes; any other token decodes to its own UTF-8 bytes. Writes to o (room for strlen(s)). */
static size_t token_bytes(const char *s, const int16_t cp_byte[512], char *o)
{
    const uint8_t *p = (const uint8_t *)s;
    while (*p) {
        uint32_t c = next_cp(&p);
        if (c >= 512 || cp_byte[c] < 0) {
            size_t n = strlen(s);
            memcpy(o, s, n);
            return n;
        }
    }
    size_t m = 0;
    for (p = (const uint8_t *)s; *p;)
        o[m++] = (char)cp_byte[next_cp(&p)];
    return m;
}

/* ======== loading: validation of the JSON ==================================================== */

static int str_is(json_t *o, const char *key, const char *want)
{
    const char *v = json_string_value(json_object_get(o, key));
    return v && strcmp(v, want) == 0;
}

static int false_or_null(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return !v || json_is_null(v) || json_is_false(v);
}

static int check_pretok(json_t *root, char *err, size_t errlen)
{
    json_t *nz = json_object_get(root, "normalizer");
    if (nz && !json_is_null(nz) &&
        !(str_is(nz, "type", "Sequence") &&
          json_array_size(json_object_get(nz, "normalizers")) == 0))
        return duet_err(err, errlen, DUET_EFORMAT,
                        "tokenizer.json has a normalizer; this tokenizer implements only the "
                        "DeepSeek-V3/V4 setup with no normalizer");
    json_t *pt = json_object_get(root, "pre_tokenizer");
    json_t *seq = json_object_get(pt, "pretokenizers");
    int ok = str_is(pt, "type", "Sequence") && json_array_size(seq) == 4;
    for (size_t i = 0; ok && i < 3; i++) {
        json_t *s = json_array_get(seq, i);
        ok = str_is(s, "type", "Split") && str_is(s, "behavior", "Isolated") &&
             false_or_null(s, "invert") &&
             str_is(json_object_get(s, "pattern"), "Regex", PRETOK_RE[i]);
    }
    if (ok) {
        json_t *bl = json_array_get(seq, 3);
        ok = str_is(bl, "type", "ByteLevel") && json_is_false(json_object_get(bl, "use_regex")) &&
             false_or_null(bl, "add_prefix_space");
    }
    if (!ok)
        return duet_err(err, errlen, DUET_EFORMAT,
                        "tokenizer.json pre_tokenizer is not the DeepSeek-V3/V4 one (three "
                        "Split stages + ByteLevel, spec §5.2); this tokenizer cannot reproduce it");
    json_t *m = json_object_get(root, "model");
    if (!str_is(m, "type", "BPE") || !false_or_null(m, "byte_fallback") ||
        !false_or_null(m, "ignore_merges") || !json_is_null(json_object_get(m, "dropout")) ||
        !false_or_null(m, "continuing_subword_prefix") ||
        !false_or_null(m, "end_of_word_suffix"))
        return duet_err(err, errlen, DUET_EFORMAT,
                        "tokenizer.json model is not a plain byte-level BPE (type BPE, no dropout, "
                        "no byte fallback, no ignore_merges, no subword prefix/suffix)");
    if (!str_is(json_object_get(root, "decoder"), "type", "ByteLevel"))
        return duet_err(err, errlen, DUET_EFORMAT,
                        "tokenizer.json decoder is not ByteLevel");
    return 0;
}

/* ======== loading: tables ==================================================================== */

static void trie_add(struct tok_trie *tr, const char *s, int32_t id)
{
    if (tr->n == 0) {
        tr->cap = 256;
        tr->nodes = xmalloc(tr->cap * sizeof *tr->nodes);
        tr->nodes[0] = (struct tok_trie_node){-1, -1, -1, 0};
        tr->n = 1;
    }
    tr->first[(uint8_t)s[0]] = 1;
    int32_t node = 0;
    for (const uint8_t *p = (const uint8_t *)s; *p; p++) {
        int32_t c = tr->nodes[node].child;
        while (c >= 0 && tr->nodes[c].b != *p)
            c = tr->nodes[c].sibling;
        if (c < 0) {
            if (tr->n == tr->cap) {
                tr->cap *= 2;
                tr->nodes = xrealloc(tr->nodes, tr->cap * sizeof *tr->nodes);
            }
            c = (int32_t)tr->n++;
            tr->nodes[c] = (struct tok_trie_node){-1, tr->nodes[node].child, -1, *p};
            tr->nodes[node].child = c;
        }
        node = c;
    }
    tr->nodes[node].id = id;
}

/* Checks every id and added-token option; sets *max_id to the highest id. */
static int check_ids(json_t *vocab, json_t *added, int64_t *max_id, char *err, size_t errlen)
{
    const char *k;
    json_t *v;
    size_t i;
    *max_id = -1;
    json_object_foreach(vocab, k, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 16777216)
            return duet_err(err, errlen, DUET_EFORMAT,
                            "tokenizer.json vocab entry \"%s\" has no valid id (an integer "
                            "0..16777216 is required)", k);
        if (json_integer_value(v) > *max_id) *max_id = json_integer_value(v);
    }
    json_array_foreach(added, i, v) {
        json_t *id = json_object_get(v, "id");
        const char *c = json_string_value(json_object_get(v, "content"));
        if (!json_is_integer(id) || json_integer_value(id) < 0 ||
            json_integer_value(id) > 16777216 || !c || !*c)
            return duet_err(err, errlen, DUET_EFORMAT,
                            "tokenizer.json added_tokens[%zu] lacks a valid id or content", i);
        if (!false_or_null(v, "lstrip") || !false_or_null(v, "rstrip") ||
            !false_or_null(v, "single_word"))
            return duet_err(err, errlen, DUET_EFORMAT,
                            "tokenizer.json added token \"%s\" uses lstrip/rstrip/single_word, "
                            "which this tokenizer does not implement", c);
        if (json_integer_value(id) > *max_id) *max_id = json_integer_value(id);
    }
    if (*max_id < 255)
        return duet_err(err, errlen, DUET_EFORMAT, "tokenizer.json vocabulary is too small");
    return 0;
}

/* Copies every spelling into one arena; fills spell, vkey, idflags and the added-token tries. */
static int fill_ids(tok_t *t, json_t *vocab, json_t *added, char *err, size_t errlen)
{
    const char *k;
    json_t *v;
    size_t i, total = 0;
    json_object_foreach(vocab, k, v) total += strlen(k) + 1;
    json_array_foreach(added, i, v)
        total += strlen(json_string_value(json_object_get(v, "content"))) + 1;
    t->strs = xmalloc(total);
    t->strs_len = total;
    char *p = t->strs;
    json_object_foreach(vocab, k, v) {
        size_t id = (size_t)json_integer_value(v), n = strlen(k) + 1;
        if (t->vkey[id])
            return duet_err(err, errlen, DUET_EFORMAT,
                            "tokenizer.json vocab assigns id %zu twice", id);
        memcpy(p, k, n);
        t->vkey[id] = t->spell[id] = p;
        t->idflags[id] |= 1;
        p += n;
    }
    json_array_foreach(added, i, v) {
        size_t id = (size_t)json_integer_value(json_object_get(v, "id"));
        const char *c = json_string_value(json_object_get(v, "content"));
        size_t n = strlen(c) + 1;
        memcpy(p, c, n);
        t->spell[id] = p;
        t->idflags[id] |= 2;
        if (json_is_true(json_object_get(v, "special")))
            t->idflags[id] |= 4;
        trie_add(&t->trie[json_is_true(json_object_get(v, "normalized")) ? 1 : 0], p,
                 (int32_t)id);
        p += n;
    }
    return 0;
}

static int load_ids(tok_t *t, json_t *vocab, json_t *added, char *err, size_t errlen)
{
    int64_t max_id;
    int rc = check_ids(vocab, added, &max_id, err, errlen);
    if (rc != 0)
        return rc;
    t->n_ids = (size_t)max_id + 1;
    t->spell = xcalloc(t->n_ids, sizeof *t->spell);
    t->vkey = xcalloc(t->n_ids, sizeof *t->vkey);
    t->idflags = xcalloc(t->n_ids, 1);
    rc = fill_ids(t, vocab, added, err, errlen);
    if (rc != 0)
        return rc;
    t->vhash_cap = pow2_at_least(t->n_ids * 2);
    t->vhash = xmalloc(t->vhash_cap * sizeof *t->vhash);
    memset(t->vhash, 0xff, t->vhash_cap * sizeof *t->vhash);
    t->ahash_cap = pow2_at_least(json_array_size(added) * 2 + 2);
    t->ahash = xmalloc(t->ahash_cap * sizeof *t->ahash);
    memset(t->ahash, 0xff, t->ahash_cap * sizeof *t->ahash);
    for (size_t id = 0; id < t->n_ids; id++) {
        if (t->vkey[id])
            shash_put(t->vhash, t->vhash_cap, t->vkey, (int32_t)id);
        if (t->idflags[id] & 2)
            shash_put(t->ahash, t->ahash_cap, t->spell, (int32_t)id);
    }
    return 0;
}

static int load_decoded(tok_t *t, char *err, size_t errlen)
{
    uint32_t byte_cp[256];
    int16_t cp_byte[512];
    byte_map(byte_cp);
    memset(cp_byte, 0xff, sizeof cp_byte);
    for (int b = 0; b < 256; b++)
        cp_byte[byte_cp[b]] = (int16_t)b;
    t->dec_off = xcalloc(t->n_ids, sizeof *t->dec_off);
    t->dec_len = xcalloc(t->n_ids, sizeof *t->dec_len);
    t->dec = xmalloc(t->strs_len + 1);
    size_t off = 0;
    for (size_t id = 0; id < t->n_ids; id++) {
        if (!t->spell[id])
            continue;
        size_t n = token_bytes(t->spell[id], cp_byte, t->dec + off);
        t->dec_off[id] = (uint32_t)off;
        t->dec_len[id] = (uint32_t)n;
        off += n;
    }
    for (int b = 0; b < 256; b++) {
        char s[3];
        size_t n = put_cp(s, byte_cp[b]);
        t->byte_id[b] = shash_get(t->vhash, t->vhash_cap, t->vkey, s, n);
        if (t->byte_id[b] < 0)
            return duet_err(err, errlen, DUET_EFORMAT,
                            "tokenizer.json vocab lacks the single-byte token for byte 0x%02x; "
                            "it is not a byte-level BPE vocabulary", b);
    }
    return 0;
}

/* One merge: either "left right" or ["left", "right"]. */
static int merge_parts(json_t *m, const char **l, size_t *ln, const char **r, size_t *rn)
{
    if (json_is_string(m)) {
        const char *s = json_string_value(m);
        const char *sp = strchr(s, ' ');
        if (!sp || sp == s || !sp[1] || strchr(sp + 1, ' '))
            return -1;
        *l = s, *ln = (size_t)(sp - s), *r = sp + 1, *rn = strlen(sp + 1);
        return 0;
    }
    if (json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
        json_is_string(json_array_get(m, 1))) {
        *l = json_string_value(json_array_get(m, 0)), *ln = strlen(*l);
        *r = json_string_value(json_array_get(m, 1)), *rn = strlen(*r);
        return 0;
    }
    return -1;
}

static int load_merges(tok_t *t, json_t *merges, char *err, size_t errlen)
{
    if (!json_is_array(merges))
        return duet_err(err, errlen, DUET_EFORMAT, "tokenizer.json model.merges is missing");
    t->merges_cap = pow2_at_least(json_array_size(merges) * 2 + 2);
    t->merges = xcalloc(t->merges_cap, sizeof *t->merges);
    tok_buf_t cat = {0};
    size_t i;
    json_t *m;
    int rc = 0;
    json_array_foreach(merges, i, m) {
        const char *l, *r;
        size_t ln, rn;
        if (merge_parts(m, &l, &ln, &r, &rn) != 0) {
            rc = duet_err(err, errlen, DUET_EFORMAT,
                          "tokenizer.json merge %zu is not \"left right\" or [left, right]", i);
            break;
        }
        cat.n = 0;
        tok_buf_put(&cat, l, ln);
        tok_buf_put(&cat, r, rn);
        int32_t li = shash_get(t->vhash, t->vhash_cap, t->vkey, l, ln);
        int32_t ri = shash_get(t->vhash, t->vhash_cap, t->vkey, r, rn);
        int32_t ni = shash_get(t->vhash, t->vhash_cap, t->vkey, cat.p, cat.n);
        if (li < 0 || ri < 0 || ni < 0) {
            rc = duet_err(err, errlen, DUET_EFORMAT,
                          "tokenizer.json merge %zu (\"%s\") names a token missing from the "
                          "vocab", i, cat.p);
            break;
        }
        uint64_t key = ((uint64_t)(uint32_t)li << 32) | (uint32_t)ri;
        size_t s = merge_slot(key, t->merges_cap);
        while (t->merges[s].key != 0 && t->merges[s].key != key)
            s = (s + 1) & (t->merges_cap - 1);
        if (t->merges[s].key == 0) /* a repeated merge keeps its first (best) rank, as HF */
            t->merges[s] = (tok_merge_t){key, (uint32_t)i, ni};
        t->n_merges++;
    }
    free(cat.p);
    return rc;
}

int tok_load(const char *path, tok_t **out, char *err, size_t errlen)
{
    *out = NULL;
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) {
        FILE *f = fopen(path, "rb");
        if (!f)
            return duet_err(err, errlen, DUET_EIO, "cannot open tokenizer file %s", path);
        fclose(f);
        return duet_err(err, errlen, DUET_EFORMAT,
                        "tokenizer file %s is not valid JSON (line %d, column %d: %s); it may be "
                        "truncated or corrupt — download it again", path, je.line, je.column,
                        je.text);
    }
    tok_t *t = xcalloc(1, sizeof *t);
    json_t *model = json_object_get(root, "model");
    json_t *vocab = json_object_get(model, "vocab");
    json_t *added = json_object_get(root, "added_tokens");
    int rc = check_pretok(root, err, errlen);
    if (rc == 0 && (!json_is_object(vocab) || (added && !json_is_array(added))))
        rc = duet_err(err, errlen, DUET_EFORMAT,
                      "tokenizer.json lacks model.vocab (object) or added_tokens (array)");
    if (rc == 0)
        rc = load_ids(t, vocab, added, err, errlen);
    if (rc == 0)
        rc = load_decoded(t, err, errlen);
    if (rc == 0)
        rc = load_merges(t, json_object_get(model, "merges"), err, errlen);
    json_decref(root);
    if (rc != 0) {
        tok_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

void tok_free(tok_t *t)
{
    if (!t)
        return;
    free(t->spell);
    free(t->vkey);
    free(t->dec_off);
    free(t->dec_len);
    free(t->dec);
    free(t->idflags);
    free(t->strs);
    free(t->vhash);
    free(t->ahash);
    free(t->merges);
    free(t->trie[0].nodes);
    free(t->trie[1].nodes);
    free(t->sc_cls);
    free(t->sc_off);
    free(t->sanit.p);
    free(t->bpe_ids);
    free(t->bpe_aux);
    free(t->heap);
    free(t->cache);
    free(t->cache_bytes.p);
    free(t->cache_ids);
    free(t);
}

/* ======== lookups and decoding =============================================================== */

size_t tok_vocab_size(const tok_t *t) { return t->n_ids; }

const char *tok_id_to_token(const tok_t *t, int32_t id)
{
    return id >= 0 && (size_t)id < t->n_ids ? t->spell[id] : NULL;
}

int32_t tok_token_to_id(const tok_t *t, const char *token)
{
    size_t n = strlen(token);
    int32_t id = shash_get(t->ahash, t->ahash_cap, t->spell, token, n);
    if (id < 0)
        id = shash_get(t->vhash, t->vhash_cap, t->vkey, token, n);
    return id < 0 ? DUET_ENOTFOUND : id;
}

int tok_is_special(const tok_t *t, int32_t id)
{
    return id >= 0 && (size_t)id < t->n_ids && (t->idflags[id] & 4) != 0;
}

int tok_is_added(const tok_t *t, int32_t id)
{
    return id >= 0 && (size_t)id < t->n_ids && (t->idflags[id] & 2) != 0;
}

void tok_decode(const tok_t *t, const int32_t *ids, size_t n, int skip_special, char **out,
                size_t *out_len)
{
    tok_buf_t b = {0};
    tok_u8_t u8 = {0};
    tok_buf_put(&b, "", 0);
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || (size_t)id >= t->n_ids || !t->idflags[id])
            continue;
        if (skip_special && (t->idflags[id] & 4))
            continue;
        tok_u8_feed(&u8, (const uint8_t *)t->dec + t->dec_off[id], t->dec_len[id], &b);
    }
    tok_u8_flush(&u8, &b);
    *out = b.p;
    *out_len = b.n;
}
