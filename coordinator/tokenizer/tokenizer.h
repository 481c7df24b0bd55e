/* tokenizer.h — the DeepSeek-V4 byte-level BPE tokenizer: text <-> token ids.
 *
 * Why: the coordinator turns prompt text (with special-token spellings such as "<｜User｜>") into
 * ids and streams generated ids back as UTF-8 text. This header is kept narrow so that HTTP and
 * scheduler code never depends on BPE internals. The results must be identical to Hugging Face
 * `tokenizers` loading the same tokenizer.json (spec §5.1–5.3).
 *
 * It must never: crash or read out of bounds on any input bytes or any id; emit a broken UTF-8
 * sequence from the decoder or the stream; silently accept a tokenizer.json whose pre-tokenizer
 * or normalizer it does not implement exactly.
 *
 * Invalid UTF-8 in encoder input: HF tokenizers only accepts valid UTF-8 (a Rust str). We replace
 * each maximal invalid subsequence by U+FFFD (EF BF BD) before encoding — exactly what a Python
 * caller gets from bytes.decode("utf-8", errors="replace") — so encoding never fails on bytes.
 *
 * Threading: a loaded tok_t is read-only except for its encoder scratch and piece cache, so
 * tok_encode must not run concurrently on one tok_t (use one tok_t per thread); decoding,
 * lookups and streams (one per sequence) may run concurrently with each other.
 */
#ifndef DUET_TOKENIZER_H
#define DUET_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

typedef struct tok tok_t;
typedef struct tok_stream tok_stream_t;

/* A growable id vector; zero-initialise it, free it with tok_ids_free. */
typedef struct {
    int32_t *v; /* [n] token ids */
    size_t n;
    size_t cap;
} tok_ids_t;

/* Loads a HF tokenizer.json (byte-level BPE, the DeepSeek-V3/V4 pre-tokenizer). On failure
 * returns DUET_EIO / DUET_EFORMAT with a sentence in err and leaves *out NULL. */
int tok_load(const char *path, tok_t **out, char *err, size_t errlen);
void tok_free(tok_t *t);

/* Longest text tok_encode accepts (bytes). A single pre-tokenizer piece of n bytes needs about
 * 36n bytes of scratch, so this bounds the worst case to a few GiB; real prompts are far shorter. */
#define TOK_MAX_TEXT ((size_t)64 << 20)

/* Encodes len bytes of text (any bytes; see the invalid-UTF-8 rule above) and APPENDS the ids
 * to out. No BOS/EOS is added: special tokens are written as text and matched (longest first).
 * Returns 0, or DUET_ENOMEM (nothing appended) if len > TOK_MAX_TEXT. */
int tok_encode(tok_t *t, const char *text, size_t len, tok_ids_t *out);

/* Same as tok_encode, but added-token spellings are NOT recognised: all of the text goes through
 * the pre-tokenizer and BPE (so "<｜User｜>" becomes ordinary BPE pieces). Equals HF tokenizers
 * with the added_tokens list emptied. For text a user typed, when spellings must not turn into
 * control tokens. */
int tok_encode_plain(tok_t *t, const char *text, size_t len, tok_ids_t *out);
void tok_ids_free(tok_ids_t *ids);

/* Decodes ids to UTF-8 text in a fresh NUL-terminated xmalloc'd buffer (*out, *out_len bytes
 * excluding the NUL). skip_special drops added tokens flagged "special" in tokenizer.json.
 * Ids with no token (negative, gaps, >= tok_vocab_size) decode to nothing, as in HF. Byte
 * sequences that are not valid UTF-8 become U+FFFD per maximal subpart (HF's lossy decode). */
void tok_decode(const tok_t *t, const int32_t *ids, size_t n, int skip_special, char **out,
                size_t *out_len);

/* Highest assigned id + 1 (129280 for DeepSeek-V4, = HF get_vocab_size()). */
size_t tok_vocab_size(const tok_t *t);
/* The token's spelling as in tokenizer.json (byte-level form for BPE tokens), or NULL. */
const char *tok_id_to_token(const tok_t *t, int32_t id);
/* The id of an exact token spelling (added tokens first, then the BPE vocabulary), or
 * DUET_ENOTFOUND. */
int32_t tok_token_to_id(const tok_t *t, const char *token);
/* 1 if id is an added token flagged special (skipped by skip_special decoding), else 0. */
int tok_is_special(const tok_t *t, int32_t id);
/* 1 if id is an added token (special or not), else 0. */
int tok_is_added(const tok_t *t, int32_t id);

/* Incremental detokenizer for streaming: feed ids one at a time, get the text that became
 * complete. Output is always whole UTF-8 characters; bytes of a character split across tokens
 * are held back until complete; invalid bytes become U+FFFD as soon as they are known invalid.
 * Concatenating all put outputs and the flush output equals tok_decode of all ids. The returned
 * pointer is valid until the next call on the stream. */
tok_stream_t *tok_stream_new(const tok_t *t, int skip_special);
const char *tok_stream_put(tok_stream_t *s, int32_t id, size_t *len);
/* Ends the stream: an incomplete trailing character becomes U+FFFD. The stream is reset and may
 * be reused. */
const char *tok_stream_flush(tok_stream_t *s, size_t *len);
void tok_stream_free(tok_stream_t *s);

#endif
