/* safetensors.h — read (memory-mapped) and write safetensors files and sharded checkpoints.
 *
 * Why: the real checkpoint is 46–48 shards totalling ~160 GB; it must be mapped, never copied,
 * and every byte of its headers is untrusted input. The reader validates the whole header
 * (JSON well-formed, known dtype, shape × dtype size == byte span, spans inside the file, no
 * overlapping spans) before any caller sees a tensor, and reports problems as sentences naming
 * the file and tensor. Knows nothing about the model; see ckpt.h for that.
 */
#ifndef DUET_SAFETENSORS_H
#define DUET_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    ST_F32, ST_F16, ST_BF16, ST_F8_E4M3, ST_F8_E8M0, ST_I8, ST_U8, ST_I16, ST_I32, ST_I64,
    ST_BOOL, ST_F64, ST_NDTYPES
} st_dtype;

#define ST_MAX_DIMS 8

typedef struct {
    const char *name;            /* owned by the st_file/st_set */
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;            /* points into the mapping; read-only */
    size_t nbytes;
    const char *file;            /* path of the shard holding it */
} st_tensor;

const char *st_dtype_name(st_dtype t);      /* "F8_E4M3", ... */
size_t st_dtype_size(st_dtype t);           /* bytes per element */
int st_dtype_parse(const char *s, st_dtype *out);
int64_t st_numel(const st_tensor *t);

/* A set of tensors from one file or a sharded checkpoint directory. */
typedef struct st_set st_set;

/* Opens `path`: a .safetensors file, or a directory holding model.safetensors.index.json
 * (weight_map resolves every name to its shard; every listed shard must exist and hold exactly
 * the names mapped to it) or a single model.safetensors. Returns 0 or a negative DUET_E*. */
int st_open(const char *path, st_set **out, char *err, size_t errlen);
void st_close(st_set *s);
size_t st_count(const st_set *s);
const st_tensor *st_at(const st_set *s, size_t i);
const st_tensor *st_find(const st_set *s, const char *name);   /* NULL if absent; O(1) */
/* Total payload bytes (sum of nbytes). */
uint64_t st_total_bytes(const st_set *s);

/* ---- writer ------------------------------------------------------------------------------ */
typedef struct st_writer st_writer;
st_writer *st_writer_new(void);
/* Adds a tensor; `data` is copied. Names must be unique. */
int st_writer_add(st_writer *w, const char *name, st_dtype dtype, int ndim, const int64_t *shape,
                  const void *data, size_t nbytes, char *err, size_t errlen);
size_t st_writer_bytes(const st_writer *w);   /* payload bytes added so far */
/* Writes one file (tensors in insertion order, 8-byte aligned header). Does not reset. */
int st_writer_write(st_writer *w, const char *path, char *err, size_t errlen);
void st_writer_free(st_writer *w);

/* Streaming (bounded memory, for full-size checkpoints): declare every tensor first (no data),
 * then st_writer_begin writes the header, st_writer_stream appends payload bytes in declaration
 * order (any chunking), st_writer_end closes and checks that every declared byte was written. */
int st_writer_declare(st_writer *w, const char *name, st_dtype dtype, int ndim,
                      const int64_t *shape, char *err, size_t errlen);
int st_writer_begin(st_writer *w, const char *path, char *err, size_t errlen);
int st_writer_stream(st_writer *w, const void *data, size_t nbytes, char *err, size_t errlen);
int st_writer_end(st_writer *w, char *err, size_t errlen);

#endif
