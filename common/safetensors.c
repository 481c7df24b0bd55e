/* safetensors.c — validated mmap reader and writer for safetensors files and sharded checkpoints.
 *
 * Why: the checkpoint is ~160 GB in 46–48 shards; it is mapped read-only, never copied, and its
 * headers are untrusted. Every header is validated completely (length, JSON, dtypes, shapes,
 * spans, overlaps, uniqueness, index consistency) before a caller sees any tensor; errors name
 * the file and the tensor. Must never read outside a mapping, never trust a header number
 * without a bound check, never crash on malformed input. Knows nothing about the model.
 */
#include "common/safetensors.h"

#include "common/err.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER (256u << 20) /* a 72k-tensor header is ~10 MB; anything huge is corrupt */

/* ---- dtypes ------------------------------------------------------------------------------ */

static const char *const dt_names[ST_NDTYPES] = {"F32", "F16", "BF16", "F8_E4M3", "F8_E8M0", "I8",
                                                 "U8",  "I16", "I32",  "I64",     "BOOL",    "F64"};
static const size_t dt_sizes[ST_NDTYPES] = {4, 2, 2, 1, 1, 1, 1, 2, 4, 8, 1, 8};

const char *st_dtype_name(st_dtype t) { return (unsigned)t < ST_NDTYPES ? dt_names[t] : "?"; }
size_t st_dtype_size(st_dtype t) { return (unsigned)t < ST_NDTYPES ? dt_sizes[t] : 0; }

int st_dtype_parse(const char *s, st_dtype *out) {
    for (int i = 0; i < ST_NDTYPES; i++)
        if (!strcmp(s, dt_names[i])) {
            *out = (st_dtype)i;
            return 0;
        }
    return DUET_EFORMAT;
}

int64_t st_numel(const st_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* ---- set: mappings + tensors + hash index ----------------------------------------------- */

typedef struct {
    char *path;
    void *map;
    size_t size;
} st_map;

struct st_set {
    st_map *maps;
    size_t nmaps;
    st_tensor *t;
    size_t n, cap;
    uint32_t *slots; /* open addressing: index+1, 0 = empty */
    size_t nslots;
};

static uint64_t fnv1a(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

const st_tensor *st_find(const st_set *s, const char *name) {
    if (!s || !s->nslots) return NULL;
    for (size_t i = fnv1a(name) & (s->nslots - 1);; i = (i + 1) & (s->nslots - 1)) {
        uint32_t v = s->slots[i];
        if (!v) return NULL;
        if (!strcmp(s->t[v - 1].name, name)) return &s->t[v - 1];
    }
}

/* Builds the hash index; fails on a duplicate name (across shards). */
static int build_index(st_set *s, char *err, size_t errlen) {
    size_t ns = 16;
    while (ns < s->n * 2) ns <<= 1;
    s->slots = xcalloc(ns, sizeof *s->slots);
    s->nslots = ns;
    for (size_t k = 0; k < s->n; k++) {
        size_t i = fnv1a(s->t[k].name) & (ns - 1);
        for (; s->slots[i]; i = (i + 1) & (ns - 1))
            if (!strcmp(s->t[s->slots[i] - 1].name, s->t[k].name))
                return duet_err(err, errlen, DUET_EFORMAT,
                                "tensor %s appears twice (in %s and %s)", s->t[k].name,
                                s->t[s->slots[i] - 1].file, s->t[k].file);
        s->slots[i] = (uint32_t)(k + 1);
    }
    return 0;
}

size_t st_count(const st_set *s) { return s ? s->n : 0; }
const st_tensor *st_at(const st_set *s, size_t i) { return s && i < s->n ? &s->t[i] : NULL; }

uint64_t st_total_bytes(const st_set *s) {
    uint64_t b = 0;
    for (size_t i = 0; s && i < s->n; i++) b += s->t[i].nbytes;
    return b;
}

void st_close(st_set *s) {
    if (!s) return;
    for (size_t i = 0; i < s->n; i++) free((char *)s->t[i].name);
    for (size_t i = 0; i < s->nmaps; i++) {
        if (s->maps[i].map) munmap(s->maps[i].map, s->maps[i].size);
        free(s->maps[i].path);
    }
    free(s->maps);
    free(s->t);
    free(s->slots);
    free(s);
}

/* ---- parsing one file ------------------------------------------------------------------- */

typedef struct {
    uint64_t b, e;
    size_t idx;
} span;

static int span_cmp(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->b != y->b) return x->b < y->b ? -1 : 1;
    return x->e < y->e ? -1 : (x->e > y->e);
}

/* Parses "shape" into t; checks dims are non-negative integers and numel*size does not overflow. */
static int parse_shape(json_t *shape, st_tensor *t, uint64_t *bytes, const char *path,
                       char *err, size_t errlen) {
    if (!json_is_array(shape) || json_array_size(shape) > ST_MAX_DIMS)
        return duet_err(err, errlen, DUET_EFORMAT,
                        "%s: tensor %s: \"shape\" must be an array of at most %d integers", path,
                        t->name, ST_MAX_DIMS);
    t->ndim = (int)json_array_size(shape);
    uint64_t n = st_dtype_size(t->dtype);
    for (int i = 0; i < t->ndim; i++) {
        json_t *d = json_array_get(shape, (size_t)i);
        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return duet_err(err, errlen, DUET_EFORMAT,
                            "%s: tensor %s: shape entry %d is not a non-negative integer", path,
                            t->name, i);
        uint64_t v = (uint64_t)json_integer_value(d);
        if (v && n > UINT64_MAX / 2 / v)
            return duet_err(err, errlen, DUET_EFORMAT, "%s: tensor %s: shape is absurdly large",
                            path, t->name);
        n *= v;
        t->shape[i] = (int64_t)v;
    }
    *bytes = n;
    return 0;
}

static int parse_offsets(json_t *off, uint64_t *b, uint64_t *e) {
    if (!json_is_array(off) || json_array_size(off) != 2) return -1;
    json_t *x = json_array_get(off, 0), *y = json_array_get(off, 1);
    if (!json_is_integer(x) || !json_is_integer(y)) return -1;
    if (json_integer_value(x) < 0 || json_integer_value(y) < json_integer_value(x)) return -1;
    *b = (uint64_t)json_integer_value(x);
    *e = (uint64_t)json_integer_value(y);
    return 0;
}

/* Validates one header entry and appends the tensor to s. */
static int add_entry(st_set *s, const char *path, const char *name, json_t *v,
                     const uint8_t *data, uint64_t dsize, span *sp, char *err, size_t errlen) {
    if (!json_is_object(v))
        return duet_err(err, errlen, DUET_EFORMAT, "%s: tensor %s: header entry is not an object",
                        path, name);
    st_tensor t = {0};
    t.name = name;
    json_t *dt = json_object_get(v, "dtype");
    if (!json_is_string(dt))
        return duet_err(err, errlen, DUET_EFORMAT, "%s: tensor %s: missing \"dtype\"", path, name);
    if (st_dtype_parse(json_string_value(dt), &t.dtype))
        return duet_err(err, errlen, DUET_EFORMAT, "%s: tensor %s: unknown dtype \"%s\"", path,
                        name, json_string_value(dt));
    uint64_t bytes = 0, b = 0, e = 0;
    int rc = parse_shape(json_object_get(v, "shape"), &t, &bytes, path, err, errlen);
    if (rc) return rc;
    if (parse_offsets(json_object_get(v, "data_offsets"), &b, &e))
        return duet_err(err, errlen, DUET_EFORMAT,
                        "%s: tensor %s: \"data_offsets\" must be [begin, end] with 0 <= begin <= end",
                        path, name);
    if (e > dsize)
        return duet_err(err, errlen, DUET_EFORMAT,
                        "%s: tensor %s: data_offsets [%llu, %llu] lie outside the data area of "
                        "%llu bytes (file truncated?)",
                        path, name, (unsigned long long)b, (unsigned long long)e,
                        (unsigned long long)dsize);
    if (e - b != bytes)
        return duet_err(err, errlen, DUET_EFORMAT,
                        "%s: tensor %s: shape and dtype %s need %llu bytes but data_offsets span "
                        "%llu",
                        path, name, st_dtype_name(t.dtype), (unsigned long long)bytes,
                        (unsigned long long)(e - b));
    t.data = data + b;
    t.nbytes = (size_t)bytes;
    t.file = path;
    t.name = xstrdup(name);
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 64;
        s->t = xrealloc(s->t, s->cap * sizeof *s->t);
    }
    sp->b = b;
    sp->e = e;
    sp->idx = s->n;
    s->t[s->n++] = t;
    return 0;
}

/* Checks that no two non-empty spans overlap. spans[first..] are this file's. */
static int check_overlaps(st_set *s, span *sp, size_t n, const char *path, char *err,
                          size_t errlen) {
    qsort(sp, n, sizeof *sp, span_cmp);
    uint64_t end = 0;
    size_t last = 0;
    int have = 0;
    for (size_t i = 0; i < n; i++) {
        if (sp[i].b == sp[i].e) continue;
        if (have && sp[i].b < end)
            return duet_err(err, errlen, DUET_EFORMAT,
                            "%s: tensors %s and %s have overlapping data_offsets", path,
                            s->t[sp[last].idx].name, s->t[sp[i].idx].name);
        end = sp[i].e;
        last = i;
        have = 1;
    }
    return 0;
}

static int map_file(const char *path, st_map *m, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return duet_err(err, errlen, DUET_EIO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
        close(fd);
        return duet_err(err, errlen, DUET_EIO, "%s is not a regular file", path);
    }
    m->size = (size_t)st.st_size;
    if (m->size < 8) {
        close(fd);
        return duet_err(err, errlen, DUET_EFORMAT,
                        "%s: file is %zu bytes, too short for a safetensors header (truncated?)",
                        path, m->size);
    }
    m->map = mmap(NULL, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m->map == MAP_FAILED) {
        m->map = NULL;
        return duet_err(err, errlen, DUET_EIO, "cannot map %s: %s", path, strerror(errno));
    }
    return 0;
}

/* Maps and validates one safetensors file, appending its tensors to s. */
static int load_file(st_set *s, const char *path, char *err, size_t errlen) {
    s->maps = xrealloc(s->maps, (s->nmaps + 1) * sizeof *s->maps);
    st_map *m = &s->maps[s->nmaps];
    memset(m, 0, sizeof *m);
    m->path = xstrdup(path);
    s->nmaps++;
    int rc = map_file(m->path, m, err, errlen);
    if (rc) return rc;
    const uint8_t *p = m->map;
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) hlen |= (uint64_t)p[i] << (8 * i);
    if (hlen > m->size - 8 || hlen > ST_MAX_HEADER)
        return duet_err(err, errlen, DUET_EFORMAT,
                        "%s: header length %llu exceeds the file size %zu (truncated or not a "
                        "safetensors file)",
                        path, (unsigned long long)hlen, m->size);
    json_error_t je;
    json_t *root = json_loadb((const char *)p + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        if (strstr(je.text, "duplicate"))
            return duet_err(err, errlen, DUET_EFORMAT, "%s: header names a tensor twice (%s)",
                            path, je.text);
        return duet_err(err, errlen, DUET_EFORMAT, "%s: header is not valid JSON: %s (byte %d)",
                        path, je.text, je.position);
    }
    if (!json_is_object(root)) {
        json_decref(root);
        return duet_err(err, errlen, DUET_EFORMAT, "%s: header is not a JSON object", path);
    }
    const uint8_t *data = p + 8 + hlen;
    uint64_t dsize = m->size - 8 - hlen;
    span *sp = xcalloc(json_object_size(root) + 1, sizeof *sp);
    size_t nsp = 0;
    const char *key;
    json_t *v;
    rc = 0;
    json_object_foreach(root, key, v) {
        if (!strcmp(key, "__metadata__")) continue;
        rc = add_entry(s, m->path, key, v, data, dsize, &sp[nsp], err, errlen);
        if (rc) break;
        nsp++;
    }
    if (!rc) rc = check_overlaps(s, sp, nsp, path, err, errlen);
    free(sp);
    json_decref(root);
    return rc;
}

/* ---- directories and index.json ---------------------------------------------------------- */

static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = xmalloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static json_t *load_json_file(const char *path, char *err, size_t errlen, int *rc) {
    json_error_t je;
    json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!j) *rc = duet_err(err, errlen, DUET_EFORMAT, "%s: not valid JSON: %s (line %d)", path,
                           je.text, je.line);
    return j;
}

/* Checks every tensor of shard `file` is mapped to it, and counts them. */
static int check_shard_names(st_set *s, size_t first, json_t *wm, const char *fname,
                             const char *path, char *err, size_t errlen) {
    for (size_t i = first; i < s->n; i++) {
        json_t *f = json_object_get(wm, s->t[i].name);
        if (!json_is_string(f) || strcmp(json_string_value(f), fname))
            return duet_err(err, errlen, DUET_EFORMAT,
                            "%s: shard holds tensor %s, which model.safetensors.index.json %s",
                            path, s->t[i].name,
                            json_is_string(f) ? "maps to another shard" : "does not list");
    }
    return 0;
}

static int open_index(st_set *s, const char *dir, const char *ipath, char *err, size_t errlen) {
    int rc = 0;
    json_t *idx = load_json_file(ipath, err, errlen, &rc);
    if (!idx) return rc;
    json_t *wm = json_object_get(idx, "weight_map");
    if (!json_is_object(wm)) {
        json_decref(idx);
        return duet_err(err, errlen, DUET_EFORMAT, "%s: missing object \"weight_map\"", ipath);
    }
    json_t *done = json_object(); /* shard file name -> true */
    const char *name;
    json_t *v;
    json_object_foreach(wm, name, v) {
        if (!json_is_string(v) || strchr(json_string_value(v), '/')) {
            rc = duet_err(err, errlen, DUET_EFORMAT,
                          "%s: weight_map entry %s must be a shard file name", ipath, name);
            break;
        }
        const char *fname = json_string_value(v);
        if (json_object_get(done, fname)) continue;
        json_object_set_new(done, fname, json_true());
        char *p = path_join(dir, fname);
        size_t first = s->n;
        if (access(p, F_OK))
            rc = duet_err(err, errlen, DUET_EIO,
                          "%s: weight_map names shard %s (for tensor %s), which does not exist",
                          ipath, fname, name);
        else rc = load_file(s, p, err, errlen);
        if (!rc) rc = check_shard_names(s, first, wm, fname, p, err, errlen);
        free(p);
        if (rc) break;
    }
    if (!rc) rc = build_index(s, err, errlen);
    json_object_foreach(wm, name, v) {
        if (rc) break;
        if (!st_find(s, name))
            rc = duet_err(err, errlen, DUET_EFORMAT,
                          "%s: weight_map lists tensor %s in %s, but that shard does not hold it",
                          ipath, name, json_string_value(v));
    }
    json_decref(done);
    json_decref(idx);
    return rc;
}

int st_open(const char *path, st_set **out, char *err, size_t errlen) {
    *out = NULL;
    struct stat st;
    if (stat(path, &st))
        return duet_err(err, errlen, DUET_EIO, "cannot open %s: %s", path, strerror(errno));
    st_set *s = xcalloc(1, sizeof *s);
    int rc;
    if (S_ISDIR(st.st_mode)) {
        char *ip = path_join(path, "model.safetensors.index.json");
        char *sp = path_join(path, "model.safetensors");
        if (!access(ip, F_OK)) rc = open_index(s, path, ip, err, errlen);
        else if (!access(sp, F_OK)) {
            rc = load_file(s, sp, err, errlen);
            if (!rc) rc = build_index(s, err, errlen);
        } else
            rc = duet_err(err, errlen, DUET_ENOTFOUND,
                          "%s holds neither model.safetensors.index.json nor model.safetensors",
                          path);
        free(ip);
        free(sp);
    } else {
        rc = load_file(s, path, err, errlen);
        if (!rc) rc = build_index(s, err, errlen);
    }
    if (rc) {
        st_close(s);
        return rc;
    }
    *out = s;
    return 0;
}

/* ---- writer ------------------------------------------------------------------------------ */

typedef struct {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    void *data; /* NULL for declared (streamed) tensors */
    size_t nbytes;
} wt_entry;

struct st_writer {
    wt_entry *e;
    size_t n, cap;
    size_t bytes;
    json_t *names;
    FILE *f;          /* streaming state */
    size_t stream_left;
};

st_writer *st_writer_new(void) {
    st_writer *w = xcalloc(1, sizeof *w);
    w->names = json_object();
    return w;
}

size_t st_writer_bytes(const st_writer *w) { return w->bytes; }

static int writer_push(st_writer *w, const char *name, st_dtype dtype, int ndim,
                       const int64_t *shape, size_t *nbytes, char *err, size_t errlen) {
    if ((unsigned)dtype >= ST_NDTYPES || ndim < 0 || ndim > ST_MAX_DIMS)
        return duet_err(err, errlen, DUET_EINVAL, "tensor %s: bad dtype or rank", name);
    if (json_object_get(w->names, name))
        return duet_err(err, errlen, DUET_EINVAL, "tensor %s added twice", name);
    uint64_t n = st_dtype_size(dtype);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return duet_err(err, errlen, DUET_EINVAL, "tensor %s: negative dimension", name);
        n *= (uint64_t)shape[i];
    }
    if (*nbytes != (size_t)-1 && n != *nbytes)
        return duet_err(err, errlen, DUET_EINVAL,
                        "tensor %s: shape needs %llu bytes but %zu were given", name,
                        (unsigned long long)n, *nbytes);
    *nbytes = (size_t)n;
    if (w->n == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 64;
        w->e = xrealloc(w->e, w->cap * sizeof *w->e);
    }
    wt_entry *e = &w->e[w->n++];
    memset(e, 0, sizeof *e);
    e->name = xstrdup(name);
    e->dtype = dtype;
    e->ndim = ndim;
    for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
    e->nbytes = (size_t)n;
    json_object_set_new(w->names, name, json_true());
    w->bytes += (size_t)n;
    return 0;
}

int st_writer_add(st_writer *w, const char *name, st_dtype dtype, int ndim, const int64_t *shape,
                  const void *data, size_t nbytes, char *err, size_t errlen) {
    int rc = writer_push(w, name, dtype, ndim, shape, &nbytes, err, errlen);
    if (rc) return rc;
    w->e[w->n - 1].data = xmalloc(nbytes);
    if (nbytes) memcpy(w->e[w->n - 1].data, data, nbytes);
    return 0;
}

int st_writer_declare(st_writer *w, const char *name, st_dtype dtype, int ndim,
                      const int64_t *shape, char *err, size_t errlen) {
    size_t nb = (size_t)-1;
    return writer_push(w, name, dtype, ndim, shape, &nb, err, errlen);
}

/* Header JSON padded with spaces to a multiple of 8 bytes. Caller frees. */
static char *writer_header(const st_writer *w, size_t *len) {
    json_t *h = json_object();
    json_t *meta = json_object();
    json_object_set_new(meta, "format", json_string("pt"));
    json_object_set_new(h, "__metadata__", meta);
    uint64_t off = 0;
    for (size_t i = 0; i < w->n; i++) {
        const wt_entry *e = &w->e[i];
        json_t *t = json_object(), *sh = json_array();
        json_object_set_new(t, "dtype", json_string(st_dtype_name(e->dtype)));
        for (int d = 0; d < e->ndim; d++) json_array_append_new(sh, json_integer(e->shape[d]));
        json_object_set_new(t, "shape", sh);
        json_object_set_new(t, "data_offsets",
                            json_pack("[II]", (json_int_t)off, (json_int_t)(off + e->nbytes)));
        json_object_set_new(h, e->name, t);
        off += e->nbytes;
    }
    char *s = json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(h);
    size_t n = strlen(s), pad = (8 - n % 8) % 8;
    char *out = xmalloc(n + pad + 1);
    memcpy(out, s, n);
    memset(out + n, ' ', pad);
    out[n + pad] = 0;
    free(s);
    *len = n + pad;
    return out;
}

int st_writer_begin(st_writer *w, const char *path, char *err, size_t errlen) {
    if (w->f) return duet_err(err, errlen, DUET_EINVAL, "writer is already writing a file");
    w->f = fopen(path, "wb");
    if (!w->f) return duet_err(err, errlen, DUET_EIO, "cannot create %s: %s", path, strerror(errno));
    size_t hl;
    char *h = writer_header(w, &hl);
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    int ok = fwrite(len8, 1, 8, w->f) == 8 && fwrite(h, 1, hl, w->f) == hl;
    free(h);
    w->stream_left = w->bytes;
    if (!ok) {
        fclose(w->f);
        w->f = NULL;
        return duet_err(err, errlen, DUET_EIO, "cannot write %s: %s", path, strerror(errno));
    }
    return 0;
}

int st_writer_stream(st_writer *w, const void *data, size_t nbytes, char *err, size_t errlen) {
    if (!w->f) return duet_err(err, errlen, DUET_EINVAL, "writer has no open file");
    if (nbytes > w->stream_left)
        return duet_err(err, errlen, DUET_EINVAL, "more tensor bytes written than declared");
    if (nbytes && fwrite(data, 1, nbytes, w->f) != nbytes)
        return duet_err(err, errlen, DUET_EIO, "write failed: %s", strerror(errno));
    w->stream_left -= nbytes;
    return 0;
}

int st_writer_end(st_writer *w, char *err, size_t errlen) {
    if (!w->f) return duet_err(err, errlen, DUET_EINVAL, "writer has no open file");
    size_t left = w->stream_left;
    int bad = fclose(w->f) != 0;
    w->f = NULL;
    if (left)
        return duet_err(err, errlen, DUET_EINVAL, "%zu declared tensor bytes were never written",
                        left);
    if (bad) return duet_err(err, errlen, DUET_EIO, "closing the file failed: %s", strerror(errno));
    return 0;
}

int st_writer_write(st_writer *w, const char *path, char *err, size_t errlen) {
    for (size_t i = 0; i < w->n; i++)
        if (!w->e[i].data && w->e[i].nbytes)
            return duet_err(err, errlen, DUET_EINVAL,
                            "tensor %s was declared without data; use st_writer_stream",
                            w->e[i].name);
    int rc = st_writer_begin(w, path, err, errlen);
    for (size_t i = 0; !rc && i < w->n; i++)
        rc = st_writer_stream(w, w->e[i].data, w->e[i].nbytes, err, errlen);
    if (rc) {
        if (w->f) fclose(w->f);
        w->f = NULL;
        return rc;
    }
    return st_writer_end(w, err, errlen);
}

void st_writer_free(st_writer *w) {
    if (!w) return;
    if (w->f) fclose(w->f);
    for (size_t i = 0; i < w->n; i++) {
        free(w->e[i].name);
        free(w->e[i].data);
    }
    free(w->e);
    json_decref(w->names);
    free(w);
}
