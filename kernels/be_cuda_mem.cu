/* be_cuda_mem.cu — device memory under the cap, the caching allocator, the pinned staging ring,
 * weight upload (stored formats kept), and synthetic weights for tools/bench.
 *
 * Why apart: every other file allocates through these calls and none of them launches math;
 * the cap (mem_fraction of the card, and MemAvailable on integrated GPUs) is enforced here
 * only, before every cudaMalloc, so a refusal is one sentence from one place.
 */
#include "kernels/be_cuda_internal.cuh"

/* ======================================================================================== */
/* memory and the cap                                                                        */
/* ======================================================================================== */

static size_t host_mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return (size_t)-1;
    char line[256];
    size_t kb = (size_t)-1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %zu kB", &kb) == 1) break;
    fclose(f);
    return kb == (size_t)-1 ? kb : kb * 1024;
}

static int fits(be_cuda *c, size_t bytes, char *err, size_t errlen) {
    if (c->used - c->free_bytes + bytes > c->cap)
        return duet_err(err, errlen, DUET_ENOMEM,
                        "device memory cap reached: %.1f MiB in use + %.1f MiB asked > cap %.1f "
                        "MiB (raise the memory fraction or load less)",
                        (c->used - c->free_bytes) / 1048576.0, bytes / 1048576.0, c->cap / 1048576.0);
    if (c->integrated) {
        size_t avail = host_mem_available();
        size_t reserve = (size_t)1 << 30; /* leave 1 GiB to the host */
        if (avail != (size_t)-1 && bytes + reserve > avail)
            return duet_err(err, errlen, DUET_ENOMEM,
                            "integrated GPU: %.1f MiB asked but the host has only %.1f MiB "
                            "available (MemAvailable, 1 GiB kept for the host)",
                            bytes / 1048576.0, avail / 1048576.0);
    }
    return 0;
}

extern "C" int be_cuda_fits(be *b, size_t bytes, char *err, size_t errlen) {
    return fits(C(b), bytes, err, errlen);
}
extern "C" size_t be_cuda_mem_used(const be *b) {
    const be_cuda *c = (const be_cuda *)b;
    return c->used - c->free_bytes;
}
extern "C" size_t be_cuda_mem_cap(const be *b) { return ((const be_cuda *)b)->cap; }

static void drop_free_blocks(be_cuda *c) {
    for (size_t i = 0; i < c->n_free; i++) {
        CK(cudaFree(c->freel[i].p));
        c->used -= c->freel[i].n;
    }
    c->n_free = 0;
    c->free_bytes = 0;
}

/* cudaMalloc under the cap; aborts with a sentence when it does not fit. */
void *dmalloc(be_cuda *c, size_t bytes) {
    char err[300];
    if (bytes == 0) bytes = 16;
    if (c->used + bytes > c->cap) drop_free_blocks(c);
    {
        if (fits(c, bytes, err, sizeof err)) {
            fprintf(stderr, "duet cuda: %s\n", err);
            abort();
        }
    }
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        drop_free_blocks(c);
        CK(cudaMalloc(&p, bytes));
    }
    c->used += bytes;
    return p;
}
static void dfree(be_cuda *c, void *p, size_t bytes) {
    if (!p) return;
    CK(cudaFree(p));
    c->used -= bytes;
}

static void *alloc_impl(be *b, size_t bytes, int zero) {
    be_cuda *c = C(b);
    if (c->gmode && !c->gpersist) { /* a graphed step's scratch: the step arena */
        void *p = garena_alloc(c, bytes);
        if (zero) gmemset(c, p, round_up(bytes ? bytes : 1, 256));
        return p;
    }
    size_t n = round_up(bytes ? bytes : 1, 256);
    void *p = NULL;
    for (size_t i = 0; i < c->n_free; i++)
        if (c->freel[i].n == n) {
            p = c->freel[i].p;
            c->freel[i] = c->freel[--c->n_free];
            c->free_bytes -= n;
            break;
        }
    if (!p) p = dmalloc(c, n);
    if (c->n_live == c->cap_live) {
        c->cap_live = c->cap_live ? 2 * c->cap_live : 1024;
        c->live = (blk *)xrealloc(c->live, c->cap_live * sizeof *c->live);
    }
    c->live[c->n_live++] = (blk){p, n};
    if (zero) CK(cudaMemsetAsync(p, 0, n, c->s));
    return p;
}
void *cu_alloc(be *b, size_t bytes) { return alloc_impl(b, bytes, 1); }
/* scratch of an op: not zeroed (every element is written before it is read) */
void *scratch(be *b, size_t bytes) { return alloc_impl(b, bytes, 0); }

void cu_free(be *b, void *p) {
    be_cuda *c = C(b);
    if (!p) return;
    if (garena_free(c, p)) return;
    for (size_t i = c->n_live; i-- > 0;)
        if (c->live[i].p == p) {
            blk k = c->live[i];
            c->live[i] = c->live[--c->n_live];
            if (c->n_free == c->cap_free) {
                c->cap_free = c->cap_free ? 2 * c->cap_free : 256;
                c->freel = (blk *)xrealloc(c->freel, c->cap_free * sizeof *c->freel);
            }
            c->freel[c->n_free++] = k;
            c->free_bytes += k.n;
            return;
        }
    /* interior pointers (e.g. sink + h0) are never freed by the model; anything else is a bug */
    fprintf(stderr, "duet cuda: free of a pointer this backend did not allocate (%p)\n", p);
    abort();
}

void cu_upload(be *b, void *dst, const void *src, size_t bytes) {
    if (!bytes || graph_refuse(C(b), "upload (a host sync)")) return;
    CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, C(b)->s));
    CK(cudaStreamSynchronize(C(b)->s));
}
void cu_download(be *b, void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    if (C(b)->gmode) { /* filled when the graph has run */
        if (C(b)->gpersist) graph_refuse(C(b), "download inside a table build");
        else gdownload(C(b), dst, src, bytes);
        return;
    }
    CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, C(b)->s));
    CK(cudaStreamSynchronize(C(b)->s));
}

/* Makes room for `bytes` of staging (several stage() calls together) so that no wrap happens
 * in between: arrays staged for kernels not launched yet are never overwritten by a later
 * stage() of the same op. An op that stages more than one array before launching calls this
 * first. Grows the ring when needed (after a sync: nothing of this op is staged yet). */
void stage_reserve(be_cuda *c, size_t bytes) {
    if (c->gmode && !c->gpersist) return; /* the graph's arena: nothing wraps */
    size_t n = round_up(bytes ? bytes : 1, 256);
    if (n > c->meta_cap || !c->pin) {
        CK(cudaStreamSynchronize(c->s));
        if (c->pin) CK(cudaFreeHost(c->pin));
        if (c->dmeta) dfree(c, c->dmeta, c->meta_cap);
        c->meta_cap = round_up(n > ((size_t)16 << 20) ? n : ((size_t)16 << 20), (size_t)1 << 20) * 2;
        CK(cudaHostAlloc((void **)&c->pin, c->meta_cap, cudaHostAllocDefault));
        c->dmeta = (unsigned char *)dmalloc(c, c->meta_cap);
        c->meta_off = 0;
    }
    if (c->meta_off + n > c->meta_cap) {
        CK(cudaStreamSynchronize(c->s));
        c->meta_off = 0;
    }
}

/* Stages host metadata for the kernels of this op: returns its device address. Asynchronous
 * (pinned ring + copy on the stream); a wrap waits for the stream first, so nothing still in
 * flight is overwritten. */
void *stage(be_cuda *c, const void *src, size_t bytes) {
    if (c->gmode && !c->gpersist) return gstage(c, src, bytes);
    size_t n = round_up(bytes ? bytes : 1, 256);
    stage_reserve(c, n);
    memcpy(c->pin + c->meta_off, src, bytes);
    void *d = c->dmeta + c->meta_off;
    CK(cudaMemcpyAsync(d, c->pin + c->meta_off, bytes, cudaMemcpyHostToDevice, c->s));
    c->meta_off += n;
    return d;
}

__global__ void k_fill(float *x, float v, size_t n) {
    PDL_ENTER();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = v;
}

void cu_fill(be *b, float *x, float v, size_t n) {
    if (!n) return;
    KL(C(b), k_fill, grid_for(n, 256), 256, 0, x, v, n);
}
void cu_copy(be *b, float *dst, const float *src, size_t n) {
    if (!n) return;
    if (C(b)->gmode) gcopy(C(b), dst, src, n * sizeof(float));
    else CK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, C(b)->s));
}

/* ======================================================================================== */
/* weights                                                                                  */
/* ======================================================================================== */

extern "C" size_t be_cuda_weight_bytes(const be_weight *w) { return w ? w->bytes : 0; }

static be_weight *wnew(be_cuda *c, int kind, int64_t rows, int64_t cols, size_t data_bytes,
                       size_t scale_bytes) {
    be_weight *w = (be_weight *)xcalloc(1, sizeof *w);
    w->v.kind = kind;
    w->v.rows = (int)rows;
    w->v.cols = (int)cols;
    w->data = dmalloc(c, data_bytes);
    if (scale_bytes) w->scale = (uint8_t *)dmalloc(c, scale_bytes);
    w->bytes = data_bytes + scale_bytes;
    w->dbytes = data_bytes;
    w->sbytes = scale_bytes;
    w->v.data = w->data;
    w->v.scale = w->scale;
    return w;
}

static void h2d(be_cuda *c, void *dst, const void *src, size_t n) {
    CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, c->s));
    CK(cudaStreamSynchronize(c->s));
}

be_weight *cu_weight_slice(be *b, const ck_weight *w, int64_t r0, int64_t nr,
                                  int64_t c0, int64_t nc) {
    be_cuda *c = C(b);
    if (w->kind == CK_FP8_WEIGHT && r0 % w->block_n == 0 && c0 % w->block_k == 0) {
        int64_t bn = w->block_n, bk = w->block_k;
        int64_t sr0 = r0 / bn, snr = (r0 + nr + bn - 1) / bn - sr0;
        int64_t sc0 = c0 / bk, snc = (c0 + nc + bk - 1) / bk - sc0;
        uint8_t *hd = (uint8_t *)xmalloc((size_t)(nr * nc)), *hs = (uint8_t *)xmalloc((size_t)(snr * snc));
        const uint8_t *src = (const uint8_t *)w->data;
        for (int64_t r = 0; r < nr; r++) memcpy(hd + r * nc, src + (r0 + r) * w->cols + c0, (size_t)nc);
        for (int64_t r = 0; r < snr; r++)
            memcpy(hs + r * snc, w->scale + (sr0 + r) * w->scale_cols + sc0, (size_t)snc);
        be_weight *o = wnew(c, WK_FP8, nr, nc, (size_t)(nr * nc), (size_t)(snr * snc));
        o->v.scols = (int)snc;
        o->v.bn = (int)bn;
        o->v.bk = (int)bk;
        h2d(c, o->data, hd, (size_t)(nr * nc));
        h2d(c, o->scale, hs, (size_t)(snr * snc));
        free(hd);
        free(hs);
        return o;
    }
    if (w->kind == CK_FP4_WEIGHT && c0 % w->block_k == 0 && nc % 2 == 0 && w->cols % 2 == 0) {
        int64_t bk = w->block_k, snc = (nc + bk - 1) / bk, sc0 = c0 / bk;
        size_t db = (size_t)(nr * nc / 2), sb = (size_t)(nr * snc);
        uint8_t *hd = (uint8_t *)xmalloc(db), *hs = (uint8_t *)xmalloc(sb);
        const uint8_t *src = (const uint8_t *)w->data;
        for (int64_t r = 0; r < nr; r++) {
            memcpy(hd + r * (nc / 2), src + (r0 + r) * (w->cols / 2) + c0 / 2, (size_t)(nc / 2));
            memcpy(hs + r * snc, w->scale + (r0 + r) * w->scale_cols + sc0, (size_t)snc);
        }
        be_weight *o = wnew(c, WK_FP4, nr, nc, db, sb);
        o->v.scols = (int)snc;
        o->v.bn = 1;
        o->v.bk = (int)bk;
        h2d(c, o->data, hd, db);
        h2d(c, o->scale, hs, sb);
        free(hd);
        free(hs);
        return o;
    }
    if (w->kind == CK_PLAIN && (w->dtype == ST_F32 || w->dtype == ST_BF16)) {
        size_t es = w->dtype == ST_F32 ? 4 : 2;
        size_t db = (size_t)(nr * nc) * es;
        unsigned char *hd = (unsigned char *)xmalloc(db);
        const unsigned char *src = (const unsigned char *)w->data;
        for (int64_t r = 0; r < nr; r++)
            memcpy(hd + (size_t)(r * nc) * es, src + (size_t)((r0 + r) * w->cols + c0) * es, (size_t)nc * es);
        be_weight *o = wnew(c, w->dtype == ST_F32 ? WK_F32 : WK_BF16, nr, nc, db, 0);
        h2d(c, o->data, hd, db);
        free(hd);
        return o;
    }
    /* unaligned FP8/FP4 slices and other dtypes: exact BF16 (FP8/FP4) or F32 (other plain) */
    int to_bf16 = w->kind != CK_PLAIN;
    size_t es = to_bf16 ? 2 : 4, db = (size_t)(nr * nc) * es;
    unsigned char *hd = (unsigned char *)xmalloc(db);
    float *row = (float *)xmalloc((size_t)w->cols * sizeof *row);
    for (int64_t r = 0; r < nr; r++) {
        ck_row_f32(w, r0 + r, row);
        for (int64_t k = 0; k < nc; k++) {
            if (to_bf16) ((uint16_t *)hd)[r * nc + k] = fmt_f32_to_bf16(row[c0 + k]);
            else ((float *)hd)[r * nc + k] = row[c0 + k];
        }
    }
    free(row);
    be_weight *o = wnew(c, to_bf16 ? WK_BF16 : WK_F32, nr, nc, db, 0);
    h2d(c, o->data, hd, db);
    free(hd);
    return o;
}

be_weight *cu_weight(be *b, const ck_weight *w) {
    return cu_weight_slice(b, w, 0, w->rows, 0, w->cols);
}

void cu_weight_free(be *b, be_weight *w) {
    if (!w) return;
    be_cuda *c = C(b);
    CK(cudaStreamSynchronize(c->s));
    moe_tables_drop(c);
    dfree(c, w->data, w->dbytes);
    dfree(c, w->scale, w->sbytes);
    free(w);
}

float *cu_vector(be *b, const ck_weight *w) {
    size_t n = (size_t)(w->rows * w->cols);
    float *h = (float *)xmalloc(n * sizeof *h);
    for (int64_t r = 0; r < w->rows; r++) ck_row_f32(w, r, h + r * w->cols);
    float *d = (float *)cu_alloc(b, n * sizeof *d);
    h2d(C(b), d, h, n * sizeof *d);
    free(h);
    return d;
}

/* ======================================================================================== */
/* synthetic weights (tools/bench): generated on the device, never on the host               */
/* ======================================================================================== */

__device__ __forceinline__ uint32_t hash32(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return (uint32_t)x;
}

/* bytes: random, but FP8 bytes avoid NaN (0x7F/0xFF) */
__global__ void k_rand_bytes(uint8_t *p, size_t n, uint64_t seed, int fp8, uint8_t fixed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint8_t v = fixed ? fixed : (uint8_t)hash32(seed * 0x9E3779B97F4A7C15ULL + i);
        if (fp8 && (v & 0x7F) == 0x7F) v ^= 1;
        p[i] = v;
    }
}
__global__ void k_rand_bf16(uint16_t *p, size_t n, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float u = (hash32(seed * 0x9E3779B97F4A7C15ULL + i) >> 8) * (1.0f / 16777216.0f);
        p[i] = fd_f32_to_bf16((u - 0.5f) * 0.05f);
    }
}
__global__ void k_rand_f32(float *p, size_t n, uint64_t seed, float lo, float hi) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float u = (hash32(seed * 0x9E3779B97F4A7C15ULL + i) >> 8) * (1.0f / 16777216.0f);
        p[i] = lo + (hi - lo) * u;
    }
}

extern "C" be_weight *be_cuda_weight_random(be *b, ck_kind kind, st_dtype dtype, int64_t rows,
                                            int64_t cols, uint64_t seed) {
    be_cuda *c = C(b);
    be_weight *w;
    if (kind == CK_FP8_WEIGHT) {
        int64_t sr = (rows + 127) / 128, sc = (cols + 127) / 128;
        w = wnew(c, WK_FP8, rows, cols, (size_t)(rows * cols), (size_t)(sr * sc));
        w->v.scols = (int)sc;
        w->v.bn = 128;
        w->v.bk = 128;
        k_rand_bytes<<<grid_for((size_t)(rows * cols), 256), 256, 0, c->s>>>((uint8_t *)w->data, (size_t)(rows * cols), seed, 1, 0);
        k_rand_bytes<<<grid_for((size_t)(sr * sc), 256), 256, 0, c->s>>>(w->scale, (size_t)(sr * sc), seed, 0, 127 - 8);
    } else if (kind == CK_FP4_WEIGHT) {
        int64_t sc = cols / 32;
        w = wnew(c, WK_FP4, rows, cols, (size_t)(rows * cols / 2), (size_t)(rows * sc));
        w->v.scols = (int)sc;
        w->v.bn = 1;
        w->v.bk = 32;
        k_rand_bytes<<<grid_for((size_t)(rows * cols / 2), 256), 256, 0, c->s>>>((uint8_t *)w->data, (size_t)(rows * cols / 2), seed, 0, 0);
        k_rand_bytes<<<grid_for((size_t)(rows * sc), 256), 256, 0, c->s>>>(w->scale, (size_t)(rows * sc), seed, 0, 127 - 6);
    } else {
        (void)dtype;
        w = wnew(c, WK_BF16, rows, cols, (size_t)(rows * cols) * 2, 0);
        k_rand_bf16<<<grid_for((size_t)(rows * cols), 256), 256, 0, c->s>>>((uint16_t *)w->data, (size_t)(rows * cols), seed);
    }
    LAUNCHED();
    return w;
}

extern "C" float *be_cuda_vector_random(be *b, size_t n, float lo, float hi, uint64_t seed) {
    float *p = (float *)cu_alloc(b, n * sizeof(float));
    k_rand_f32<<<grid_for(n, 256), 256, 0, C(b)->s>>>(p, n, seed, lo, hi);
    LAUNCHED();
    return p;
}
