/* mkmodel — write a deterministic random DeepSeek-V4 checkpoint for a config.
 *
 *   mkmodel --config tools/mkmodel/tiny.json --out DIR --seed N [--shards K]
 *           [--names official|hf] [--layers L]
 *
 * Why: engine, golden and integration tests need complete checkpoints (every tensor of
 * ck_foreach, official format: FP8 + e8m0 block scales, FP4 experts, sharded with an index)
 * that are byte-identical on every machine for a seed. Values come from a per-tensor integer PRNG
 * (splitmix64 seeded by seed and tensor name) through uniform distributions built from integer
 * bits, and are quantized with common/formats; no libm transcendental is involved (sqrtf is
 * correctly rounded by IEEE 754). Tensors are generated row block by row block and streamed to
 * disk shard by shard, so memory stays bounded at full V4-Flash size.
 * `--names hf` writes the same (dequantized) values as F32 under the transformers names of spec
 * §4.7 with experts stacked, and drops quantization_config and expert_dtype from config.json
 * (transformers then loads it as is; our parser defaults expert_dtype to fp4, the same config).
 * Must never produce different bytes for the same arguments, and never leave a half-written
 * checkpoint looking complete (the index is written last).
 */
#include "common/ckpt.h"

/* Bit-identical results on every machine need unfused multiply-adds: GCC in ISO C mode never
 * contracts, clang would (-ffp-contract=on) when the target has FMA. */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#include "common/config.h"
#include "common/err.h"
#include "common/formats.h"
#include "common/safetensors.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---- PRNG and distributions ---------------------------------------------------------------- */

typedef struct {
    uint64_t s;
} rng_t;

static uint64_t rng_next(rng_t *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [lo, hi): 24 random bits -> exact float in [0,1), one multiply-add. */
static float rng_uniform(rng_t *r, float lo, float hi) {
    float u = (float)(rng_next(r) >> 40) * (1.0f / 16777216.0f);
    float span = hi - lo;
    return lo + u * span;
}

static uint64_t name_hash(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

/* The generator of one logical tensor: its PRNG stream starts from (seed, base name), where
 * base drops ".weight"/".scale" so a weight and its scale come from the same values. */
static void rng_for(rng_t *r, uint64_t seed, const char *name) {
    char base[160];
    snprintf(base, sizeof base, "%s", name);
    size_t n = strlen(base);
    if (n > 6 && !strcmp(base + n - 6, ".scale")) base[n - 6] = 0;
    else if (n > 7 && !strcmp(base + n - 7, ".weight")) base[n - 7] = 0;
    r->s = seed * 0xD1B54A32D192ED03ull ^ name_hash(base);
    rng_next(r);
}

static int has(const char *name, const char *part) { return strstr(name, part) != NULL; }
static int ends(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

/* Value range [lo, hi) for the tensor `name` with K inputs per row (std of U(-a,a) = a/sqrt 3). */
static void value_range(const char *name, int64_t K, int hidden, float *lo, float *hi) {
    float a = sqrtf(3.0f / (float)K); /* linear default: std 1/sqrt(K) */
    if (ends(name, "norm.weight")) { *lo = 0.5f; *hi = 1.5f; return; }
    if (ends(name, "embed.weight")) a = sqrtf(3.0f); /* rows of RMS ~1 */
    else if (ends(name, "attn_sink")) a = 1.0f;
    else if (ends(name, ".ape")) a = 0.5f;
    else if (ends(name, "gate.bias")) a = 0.5f;
    else if (has(name, "hc_") && ends(name, "_base")) a = 0.5f;
    else if (has(name, "hc_") && ends(name, "_scale")) { *lo = 0.1f; *hi = 1.0f; return; }
    else if (has(name, "hc_") && ends(name, "_fn")) a = 0.5f * sqrtf(3.0f / (float)K);
    else if (has(name, "experts.") && !has(name, ".w2")) /* std 0.3 at K = 256: clamps engage */
        a = 4.8f * sqrtf(3.0f / (float)K);
    (void)hidden;
    *lo = -a;
    *hi = a;
}

/* ---- tensor plans ------------------------------------------------------------------------- */

typedef struct {
    char name[200];      /* name written to the file */
    st_dtype dtype;
    int ndim;
    int64_t shape[4];
    uint64_t nbytes;
    int spec;            /* index of the (first) generating spec */
    int hf_stack;        /* 0, 1 = gate_up_proj (w1,w3 per expert), 2 = down_proj (w2) */
    int layer;
} plan_t;

typedef struct {
    ck_spec *v;
    size_t n, cap;
} specs_t;

static int collect(const ck_spec *s, void *ctx) {
    specs_t *a = ctx;
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 1024;
        a->v = xrealloc(a->v, a->cap * sizeof *a->v);
    }
    a->v[a->n++] = *s;
    return 0;
}

static uint64_t plan_bytes(const plan_t *p) {
    uint64_t n = st_dtype_size(p->dtype);
    for (int i = 0; i < p->ndim; i++) n *= (uint64_t)p->shape[i];
    return n;
}

static void push(plan_t **v, size_t *n, size_t *cap, const plan_t *p) {
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 1024;
        *v = xrealloc(*v, *cap * sizeof **v);
    }
    (*v)[(*n)++] = *p;
}

/* Official plan: one entry per spec, as enumerated. */
static plan_t *plan_official(const specs_t *sp, size_t *np) {
    plan_t *v = NULL;
    size_t n = 0, cap = 0;
    for (size_t i = 0; i < sp->n; i++) {
        plan_t p = {0};
        snprintf(p.name, sizeof p.name, "%s", sp->v[i].name);
        p.dtype = sp->v[i].dtype;
        p.ndim = sp->v[i].ndim;
        memcpy(p.shape, sp->v[i].shape, sizeof p.shape);
        p.spec = (int)i;
        p.layer = sp->v[i].layer;
        p.nbytes = plan_bytes(&p);
        push(&v, &n, &cap, &p);
    }
    *np = n;
    return v;
}

/* Transformers plan: F32 (I64 kept), no scales, routed experts stacked per layer. */
static plan_t *plan_hf(const dv4_config *c, const specs_t *sp, size_t *np) {
    plan_t *v = NULL;
    size_t n = 0, cap = 0;
    for (size_t i = 0; i < sp->n; i++) {
        const ck_spec *s = &sp->v[i];
        if (s->kind == CK_FP8_SCALE || s->kind == CK_FP4_SCALE) continue;
        plan_t p = {0};
        int e;
        int64_t r0;
        ck_hf_name(c, s->name, p.name, sizeof p.name, &e, &r0);
        p.spec = (int)i;
        p.layer = s->layer;
        p.dtype = s->dtype == ST_I64 ? ST_I64 : ST_F32;
        p.ndim = s->ndim;
        memcpy(p.shape, s->shape, sizeof p.shape);
        if (s->kind == CK_FP4_WEIGHT) p.shape[1] *= 2;
        if (e >= 0) {
            if (e != 0 || r0 != 0) continue; /* one stacked tensor per layer and kind */
            int down = has(p.name, "down_proj");
            p.hf_stack = down ? 2 : 1;
            p.ndim = 3;
            p.shape[0] = c->n_routed_experts;
            p.shape[1] = down ? c->hidden_size : 2 * (int64_t)c->moe_intermediate_size;
            p.shape[2] = down ? c->moe_intermediate_size : c->hidden_size;
        }
        p.nbytes = plan_bytes(&p);
        push(&v, &n, &cap, &p);
    }
    *np = n;
    return v;
}

/* ---- value generation --------------------------------------------------------------------- */

enum { G_BF16, G_F32, G_I64, G_FP8, G_FP4 };

/* Generator of one weight, one step at a time (FP8: a block of bn rows; otherwise one row). */
typedef struct {
    const dv4_config *c;
    rng_t rng;
    int kind;
    int64_t N, K, row; /* logical shape; next row to generate */
    float lo, hi;
    int64_t step_rows;
    int need_deq;      /* fill deq (transformers output) */
    float *val;        /* [step_rows, K] generated values */
    float *deq;        /* [step_rows, K] values as stored (dequantized / rounded) */
    uint8_t *q;        /* stored bytes of the step */
    size_t qbytes;
    uint8_t *sc;       /* scale bytes of the step (FP8/FP4) */
    size_t scbytes;
} wgen_t;

static void wgen_init(wgen_t *g, const dv4_config *c, uint64_t seed, const ck_spec *s,
                      int need_deq) {
    memset(g, 0, sizeof *g);
    g->c = c;
    g->need_deq = need_deq;
    g->N = s->ndim == 1 ? 1 : s->shape[0];
    g->K = s->ndim == 1 ? s->shape[0] : s->shape[1];
    g->kind = s->dtype == ST_F32 ? G_F32 : s->dtype == ST_I64 ? G_I64 : G_BF16;
    if (s->kind == CK_FP8_WEIGHT) g->kind = G_FP8;
    if (s->kind == CK_FP4_WEIGHT) {
        g->kind = G_FP4;
        g->K *= 2;
    }
    g->step_rows = g->kind == G_FP8 ? c->weight_block_n : 1;
    rng_for(&g->rng, seed, s->name);
    value_range(s->name, g->K, c->hidden_size, &g->lo, &g->hi);
    size_t cells = (size_t)(g->step_rows * g->K);
    g->val = xmalloc(cells * sizeof(float));
    g->deq = xmalloc(cells * sizeof(float));
    g->q = xmalloc(cells * 8);
    g->sc = xmalloc((size_t)g->K + 1);
}

static void wgen_free(wgen_t *g) {
    free(g->val);
    free(g->deq);
    free(g->q);
    free(g->sc);
}

/* Row of distinct expert ids in [0, E): partial Fisher–Yates over an identity permutation. */
static void gen_tid2eid(wgen_t *g) {
    int E = g->c->n_routed_experts;
    int *perm = xmalloc((size_t)E * sizeof *perm);
    for (int i = 0; i < E; i++) perm[i] = i;
    for (int64_t k = 0; k < g->K; k++) {
        int j = (int)k + (int)(rng_next(&g->rng) % (uint64_t)(E - k));
        int t = perm[k];
        perm[k] = perm[j];
        perm[j] = t;
        int64_t v = perm[k];
        memcpy(g->q + k * 8, &v, 8);
        g->deq[k] = (float)v;
    }
    free(perm);
    g->qbytes = (size_t)g->K * 8;
}

static void step_fp8(wgen_t *g, int64_t rows) {
    const dv4_config *c = g->c;
    int bk = c->weight_block_k;
    int64_t sc = (g->K + bk - 1) / bk;
    fmt_quant_fp8_block(g->val, rows, g->K, c->weight_block_n, bk, g->q, g->sc);
    for (int64_t r = 0; g->need_deq && r < rows; r++)
        fmt_dequant_fp8_row(g->q, g->sc, g->K, r, c->weight_block_n, bk, g->deq + r * g->K);
    g->qbytes = (size_t)(rows * g->K);
    g->scbytes = (size_t)sc;
}

/* Generates the next step; returns its row count (0 when done). */
static int64_t wgen_step(wgen_t *g) {
    int64_t rows = g->N - g->row < g->step_rows ? g->N - g->row : g->step_rows;
    if (rows <= 0) return 0;
    g->row += rows;
    if (g->kind == G_I64) {
        gen_tid2eid(g);
        return rows;
    }
    size_t cells = (size_t)(rows * g->K);
    for (size_t i = 0; i < cells; i++) g->val[i] = rng_uniform(&g->rng, g->lo, g->hi);
    if (g->kind == G_FP8) {
        step_fp8(g, rows);
    } else if (g->kind == G_FP4) {
        fmt_quant_fp4(g->val, 1, g->K, g->c->fp4_block, g->q, g->sc);
        if (g->need_deq) fmt_dequant_fp4_row(g->q, g->sc, g->K, 0, g->c->fp4_block, g->deq);
        g->qbytes = (size_t)g->K / 2;
        g->scbytes = (size_t)(g->K / g->c->fp4_block);
    } else if (g->kind == G_BF16) {
        for (size_t i = 0; i < cells; i++) {
            uint16_t b = fmt_f32_to_bf16(g->val[i]);
            memcpy(g->q + 2 * i, &b, 2);
            g->deq[i] = fmt_bf16_to_f32(b);
        }
        g->qbytes = cells * 2;
    } else {
        memcpy(g->q, g->val, cells * 4);
        memcpy(g->deq, g->val, cells * 4);
        g->qbytes = cells * 4;
    }
    return rows;
}

/* ---- writing -------------------------------------------------------------------------------- */

typedef struct {
    const dv4_config *c;
    uint64_t seed;
    const specs_t *sp;
    int hf;
} job_t;

/* Streams every step of weight spec `s`: stored bytes, its scale bytes, or dequantized f32. */
enum { OUT_Q, OUT_SCALE, OUT_F32 };
static int stream_spec(const job_t *j, const ck_spec *s, int what, st_writer *w, char *err,
                       size_t errlen) {
    wgen_t g;
    wgen_init(&g, j->c, j->seed, s, what == OUT_F32);
    int rc = 0;
    int64_t rows;
    while (!rc && (rows = wgen_step(&g)) > 0) {
        if (what == OUT_Q || (what == OUT_F32 && g.kind == G_I64))
            rc = st_writer_stream(w, g.q, g.qbytes, err, errlen);
        else if (what == OUT_SCALE)
            rc = st_writer_stream(w, g.sc, g.scbytes, err, errlen);
        else
            rc = st_writer_stream(w, g.deq, (size_t)(rows * g.K) * 4, err, errlen);
    }
    wgen_free(&g);
    return rc;
}

/* Stacked transformers experts of one layer: gate_up = [w1; w3] per expert, down = w2. */
static int stream_stack(const job_t *j, const plan_t *p, st_writer *w, char *err, size_t errlen) {
    const ck_spec *first = &j->sp->v[p->spec]; /* experts.0.w1 (gate_up) or experts.0.w2 */
    size_t stride = first->kind == CK_FP4_WEIGHT || first->kind == CK_FP8_WEIGHT ? 6 : 3;
    if (p->hf_stack == 2) first -= stride / 3;
    for (int e = 0; e < j->c->n_routed_experts; e++) {
        const ck_spec *w1 = first + (size_t)e * stride;
        const ck_spec *w2 = w1 + stride / 3, *w3 = w1 + 2 * (stride / 3);
        int rc = p->hf_stack == 2 ? stream_spec(j, w2, OUT_F32, w, err, errlen)
                                  : stream_spec(j, w1, OUT_F32, w, err, errlen);
        if (!rc && p->hf_stack == 1) rc = stream_spec(j, w3, OUT_F32, w, err, errlen);
        if (rc) return rc;
    }
    return 0;
}

static int stream_plan(const job_t *j, const plan_t *p, st_writer *w, char *err, size_t errlen) {
    const ck_spec *s = &j->sp->v[p->spec];
    if (j->hf) return p->hf_stack ? stream_stack(j, p, w, err, errlen)
                                  : stream_spec(j, s, OUT_F32, w, err, errlen);
    if (s->kind == CK_FP8_SCALE || s->kind == CK_FP4_SCALE)
        return stream_spec(j, s - 1, OUT_SCALE, w, err, errlen); /* weight precedes its scale */
    return stream_spec(j, s, OUT_Q, w, err, errlen);
}

/* Alignment class inside a shard: 8-byte multiples first, then by element size descending, so
 * every tensor's data starts at a multiple of its element size. */
static int align_class(const plan_t *p) {
    if (p->nbytes % 8 == 0) return 0;
    size_t es = st_dtype_size(p->dtype);
    return es >= 4 ? 1 : es == 2 ? 2 : 3;
}

static int write_shard(const job_t *j, plan_t *pl, const int *idx, size_t n, const char *path,
                       char *err, size_t errlen) {
    st_writer *w = st_writer_new();
    int rc = 0;
    for (int cls = 0; cls < 4 && !rc; cls++)
        for (size_t i = 0; i < n && !rc; i++)
            if (align_class(&pl[idx[i]]) == cls)
                rc = st_writer_declare(w, pl[idx[i]].name, pl[idx[i]].dtype, pl[idx[i]].ndim,
                                       pl[idx[i]].shape, err, errlen);
    if (!rc) rc = st_writer_begin(w, path, err, errlen);
    for (int cls = 0; cls < 4 && !rc; cls++)
        for (size_t i = 0; i < n && !rc; i++)
            if (align_class(&pl[idx[i]]) == cls) rc = stream_plan(j, &pl[idx[i]], w, err, errlen);
    if (!rc) rc = st_writer_end(w, err, errlen);
    st_writer_free(w);
    return rc;
}

/* Shard of every plan entry: by cumulative bytes, scales stay with their weight, no shard empty. */
static int assign_shards(const plan_t *pl, size_t n, int K, int *shard, char *err, size_t errlen) {
    uint64_t total = 0, cum = 0;
    for (size_t i = 0; i < n; i++) total += pl[i].nbytes;
    if (total == 0) total = 1;
    int prev = 0;
    for (size_t i = 0; i < n; i++) {
        int t = (int)((long double)cum * K / (long double)total);
        int s = t > prev + 1 ? prev + 1 : (t < prev ? prev : t);
        if ((int64_t)K - (int64_t)(n - i) > s) s = K - (int)(n - i);
        if (i == 0) s = 0;
        if (ends(pl[i].name, ".scale")) s = prev;
        shard[i] = prev = s;
        cum += pl[i].nbytes;
    }
    if (n == 0 || shard[n - 1] != K - 1)
        return duet_err(err, errlen, DUET_EINVAL,
                        "--shards %d is too many for a checkpoint of %zu tensors", K, n);
    return 0;
}

/* ---- config and index files ----------------------------------------------------------------- */

/* Loads the input config JSON and applies --layers (dropping DSpark target ids beyond it). */
static json_t *load_config(const char *path, int layers, char *err, size_t errlen) {
    json_error_t je;
    json_t *o = json_load_file(path, 0, &je);
    if (!o || !json_is_object(o)) {
        duet_err(err, errlen, DUET_EFORMAT, "%s: not a JSON object: %s (line %d)", path,
                 o ? "wrong type" : je.text, je.line);
        json_decref(o);
        return NULL;
    }
    if (layers > 0) {
        const char *key = json_object_get(o, "n_layers") && !json_object_get(o, "num_hidden_layers")
                              ? "n_layers" : "num_hidden_layers";
        json_object_set_new(o, key, json_integer(layers));
        json_t *ids = json_object_get(o, "dspark_target_layer_ids");
        for (size_t i = json_array_size(ids); i-- > 0;)
            if (json_integer_value(json_array_get(ids, i)) >= layers) json_array_remove(ids, i);
    }
    return o;
}

static int parse_json_cfg(json_t *o, dv4_config *c, char *err, size_t errlen) {
    char *s = json_dumps(o, JSON_COMPACT);
    int rc = cfg_parse(s, strlen(s), c, err, errlen);
    free(s);
    return rc;
}

static int write_json(json_t *o, const char *dir, const char *name, char *err, size_t errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (json_dump_file(o, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER))
        return duet_err(err, errlen, DUET_EIO, "cannot write %s", path);
    return 0;
}

static void shard_file(char *out, size_t n, int i, int K) {
    snprintf(out, n, "model-%05d-of-%05d.safetensors", i + 1, K);
}

static int write_index(const plan_t *pl, size_t n, const int *shard, int K, const char *dir,
                       char *err, size_t errlen) {
    json_t *idx = json_object(), *meta = json_object(), *wm = json_object();
    uint64_t total = 0;
    char f[64];
    for (size_t i = 0; i < n; i++) {
        total += pl[i].nbytes;
        shard_file(f, sizeof f, shard[i], K);
        json_object_set_new(wm, pl[i].name, json_string(f));
    }
    json_object_set_new(meta, "total_size", json_integer((json_int_t)total));
    json_object_set_new(idx, "metadata", meta);
    json_object_set_new(idx, "weight_map", wm);
    int rc = write_json(idx, dir, "model.safetensors.index.json", err, errlen);
    json_decref(idx);
    return rc;
}

/* ---- main ----------------------------------------------------------------------------------- */

typedef struct {
    const char *config, *out, *names;
    uint64_t seed;
    int shards, layers, have_seed;
} args_t;

static int usage(void) {
    fprintf(stderr, "usage: mkmodel --config CONFIG.json --out DIR --seed N [--shards K] "
                    "[--names official|hf] [--layers L]\n");
    return 2;
}

static int parse_args(int argc, char **argv, args_t *a) {
    memset(a, 0, sizeof *a);
    a->shards = 1;
    a->names = "official";
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!v) return -1;
        i++;
        if (!strcmp(k, "--config")) a->config = v;
        else if (!strcmp(k, "--out")) a->out = v;
        else if (!strcmp(k, "--names")) a->names = v;
        else if (!strcmp(k, "--seed")) {
            a->seed = strtoull(v, &end, 0);
            a->have_seed = 1;
        } else if (!strcmp(k, "--shards")) a->shards = (int)strtol(v, &end, 10);
        else if (!strcmp(k, "--layers")) a->layers = (int)strtol(v, &end, 10);
        else return -1;
        if (end && *end) return -1;
    }
    if (!a->config || !a->out || !a->have_seed || a->shards < 1 || a->shards > 99999 ||
        a->layers < 0 || (strcmp(a->names, "official") && strcmp(a->names, "hf")))
        return -1;
    return 0;
}

static int write_shards(const job_t *j, plan_t *pl, size_t np, int K, const char *dir, char *err,
                        size_t errlen) {
    int *shard = xmalloc((np + 1) * sizeof *shard), *idx = xmalloc((np + 1) * sizeof *idx);
    int rc = assign_shards(pl, np, K, shard, err, errlen);
    char f[64], path[4096];
    for (int s = 0; !rc && s < K; s++) {
        size_t n = 0;
        for (size_t i = 0; i < np; i++)
            if (shard[i] == s) idx[n++] = (int)i;
        shard_file(f, sizeof f, s, K);
        snprintf(path, sizeof path, "%s/%s", dir, f);
        rc = write_shard(j, pl, idx, n, path, err, errlen);
    }
    if (!rc) rc = write_index(pl, np, shard, K, dir, err, errlen);
    free(shard);
    free(idx);
    return rc;
}

/* mkdir -p: creates missing parents; 0 if the directory exists afterwards. */
static int mkdir_p(const char *path) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            if (mkdir(buf, 0777) && errno != EEXIST) return -1;
            *p = '/';
        }
    return mkdir(buf, 0777) && errno != EEXIST ? -1 : 0;
}

static int run(const args_t *a, char *err, size_t errlen) {
    json_t *o = load_config(a->config, a->layers, err, errlen);
    if (!o) return DUET_EFORMAT;
    dv4_config c;
    int hf = !strcmp(a->names, "hf");
    int rc = parse_json_cfg(o, &c, err, errlen);
    if (!rc && mkdir_p(a->out))
        rc = duet_err(err, errlen, DUET_EIO, "cannot create %s: %s", a->out, strerror(errno));
    if (!rc && hf) { /* as transformers wants it (spec §6); expert_dtype defaults to fp4 here */
        json_object_del(o, "quantization_config");
        json_object_del(o, "expert_dtype");
    }
    if (!rc) rc = write_json(o, a->out, "config.json", err, errlen);
    json_decref(o);
    if (rc) return rc;
    specs_t sp = {0};
    ck_foreach(&c, collect, &sp);
    size_t np;
    plan_t *pl = hf ? plan_hf(&c, &sp, &np) : plan_official(&sp, &np);
    job_t j = {&c, a->seed, &sp, hf};
    rc = write_shards(&j, pl, np, a->shards, a->out, err, errlen);
    free(pl);
    free(sp.v);
    return rc;
}

int main(int argc, char **argv) {
    args_t a;
    if (parse_args(argc, argv, &a)) return usage();
    char err[1024];
    if (run(&a, err, sizeof err)) {
        fprintf(stderr, "mkmodel: %s\n", err);
        return 1;
    }
    return 0;
}
