/* be_cuda_graph.cu — small steps (decode) as CUDA graphs: record, look up, replay or capture.
 *
 * Why: a decode step of V4-Flash is ~700 small launches; issued one by one the host needs
 * 4-5 us each, so at batch 1 the GPU waits on the host most of the step. A graph replays them
 * with one host call. Graphs hold kernel arguments by value, while a step's positions, key plans
 * and ids change every step, so:
 *   - every per-step value reaches kernels through stage()/inl_put(), which in a graphed step
 *     write one pinned metadata arena at fixed offsets; the graph's first node copies it to the
 *     device, so a replay reads this step's values;
 *   - scratch comes from a device arena with a first-fit allocator that starts empty every step,
 *     so the same ops get the same addresses;
 *   - a record pass (no CUDA call) collects each launch's kernel, grid and argument bytes: the
 *     step's signature. A cached graph with the same signature is the graph a capture of this
 *     step would make, so it is replayed; else the ops run again under stream capture.
 * What cannot be captured (cuBLAS, host syncs, other streams) refuses (graph_refuse) and the
 * step runs directly.
 *
 * Off by default (DUET_CUDA_GRAPH=1 or be_cuda_graph_enable turns it on): on the H100 a V4-Flash
 * decode step is GPU-bound once kernels launch with programmatic dependent launch (PDL), so the
 * record pass (~0.35-0.9 ms of host time before the replay can start) costs more than the
 * launches it saves: duet-bench, 20 layers, batch 1: 161 tok/s direct vs 146-154 graphed
 * (docs/benchmarks/cuda-h100.md). Graphs pay where the host is the bottleneck: faster kernels,
 * fewer layers, slower hosts.
 *
 * Must never: replay a graph whose signature differs from the step's; leave the stream in
 * capture mode after a pass; let a graphed step's scratch outlive it.
 */
#include <time.h>

#include "kernels/be_cuda_internal.cuh"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

enum { G_CACHE = 48, G_MAX_T = 15, G_ALIGN = 16 };

typedef struct {
    uint64_t h;
    unsigned char *sig;
    size_t nsig, meta;
    cudaGraphExec_t x;
    uint64_t used; /* tick of the last use (LRU) */
} gexec;

typedef struct {
    size_t off, n;
    int used;
} gblk;

typedef struct {
    void *dst;
    size_t off, n;
} gdl;

struct gstate {
    unsigned char *pin, *dev; /* metadata arena [cap]: pinned host + device mirror */
    size_t cap, off;
    unsigned char *scr;       /* scratch arena [scr_cap] on the device, first fit */
    size_t scr_cap;
    gblk *blk;
    int nblk, capblk;
    unsigned char *out;       /* pinned [out_cap]: downloads land here, copied out after */
    size_t out_cap, out_off;
    gdl *dl;
    int ndl, capdl;
    unsigned char *sig, *rsig; /* this pass's signature; the record pass's, for the capture */
    size_t nsig, capsig, nrsig, caprsig, rmeta;
    uint64_t rh;
    gexec ex[G_CACHE];
    int nex;
    uint64_t tick;
    int bad, T, off_env;
    double t_rec; /* start of the record pass */
    const char *why;
    char whybuf[160];
    size_t want_meta, want_scr, want_out; /* sizes a pass needed beyond the arenas: grown next */
    be_cuda_graph_stats st;
};

static gstate *G(be_cuda *c) {
    if (!c->g) {
        c->g = (gstate *)xcalloc(1, sizeof *c->g);
        const char *e = getenv("DUET_CUDA_GRAPH"); /* off unless 1: see the note atop */
        c->g->off_env = !(e && atoi(e));
    }
    return c->g;
}

/* ---- signature ---------------------------------------------------------------------------- */

static void grow(unsigned char **p, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t n = *cap ? *cap : 65536;
    while (n < need) n *= 2;
    *p = (unsigned char *)xrealloc(*p, n);
    *cap = n;
}

unsigned char *gsig_room(be_cuda *c, size_t n) {
    gstate *g = c->g;
    if (g->nsig + n > g->capsig) grow(&g->sig, &g->capsig, g->nsig + n);
    unsigned char *p = g->sig + g->nsig;
    g->nsig += n;
    return p;
}

void gsig(be_cuda *c, const void *p, size_t n) { memcpy(gsig_room(c, n), p, n); }

/* 64-bit hash of the signature, 8 bytes per round */
static uint64_t sig_hash(const unsigned char *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 29;
    }
    uint64_t w = 0;
    memcpy(&w, p + i, n - i);
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ull;
    return h ^ (h >> 32);
}

bool graph_refuse(be_cuda *c, const char *why) {
    if (!c->gmode) return false;
    if (!c->g->bad) c->g->why = why;
    c->g->bad = 1;
    return true;
}

/* ---- arenas -------------------------------------------------------------------------------- */

void *gstage(be_cuda *c, const void *src, size_t bytes) {
    gstate *g = c->g;
    size_t n = round_up(bytes ? bytes : 1, G_ALIGN);
    if (g->off + n > g->cap) {
        graph_refuse(c, "metadata arena full (grown for the next step)");
        g->want_meta = g->off + n;
        g->off += n;
        return g->dev; /* never read: the step is run again directly */
    }
    memcpy(g->pin + g->off, src, bytes);
    void *d = g->dev + g->off;
    g->off += n;
    return d;
}

void *garena_alloc(be_cuda *c, size_t bytes) {
    gstate *g = c->g;
    size_t n = round_up(bytes ? bytes : 1, 256);
    for (int i = 0; i < g->nblk; i++) {
        gblk *k = &g->blk[i];
        if (k->used || k->n < n) continue;
        if (k->n > n) { /* split: the rest stays free right after */
            if (g->nblk == g->capblk) {
                g->capblk = g->capblk ? 2 * g->capblk : 256;
                g->blk = (gblk *)xrealloc(g->blk, (size_t)g->capblk * sizeof *g->blk);
                k = &g->blk[i];
            }
            memmove(&g->blk[i + 2], &g->blk[i + 1], (size_t)(g->nblk - i - 1) * sizeof *g->blk);
            g->blk[i + 1] = (gblk){k->off + n, k->n - n, 0};
            g->nblk++;
            k->n = n;
        }
        k->used = 1;
        return g->scr + k->off;
    }
    /* does not fit: remember how much the step needs in all, refuse this step */
    size_t top = 0;
    for (int i = 0; i < g->nblk; i++)
        if (g->blk[i].used) top += g->blk[i].n;
    if (top + n > g->want_scr) g->want_scr = top + n;
    graph_refuse(c, "scratch arena full (grown for the next step)");
    return g->scr; /* never read: the step is run again directly */
}

bool garena_free(be_cuda *c, void *p) {
    gstate *g = c->g;
    if (!g || !g->scr || (unsigned char *)p < g->scr || (unsigned char *)p >= g->scr + g->scr_cap)
        return false;
    size_t off = (size_t)((unsigned char *)p - g->scr);
    for (int i = 0; i < g->nblk; i++) {
        if (g->blk[i].off != off || !g->blk[i].used) continue;
        g->blk[i].used = 0;
        if (i + 1 < g->nblk && !g->blk[i + 1].used) { /* merge with the next */
            g->blk[i].n += g->blk[i + 1].n;
            memmove(&g->blk[i + 1], &g->blk[i + 2], (size_t)(g->nblk - i - 2) * sizeof *g->blk);
            g->nblk--;
        }
        if (i > 0 && !g->blk[i - 1].used) { /* and the previous */
            g->blk[i - 1].n += g->blk[i].n;
            memmove(&g->blk[i], &g->blk[i + 1], (size_t)(g->nblk - i - 1) * sizeof *g->blk);
            g->nblk--;
        }
        return true;
    }
    return true; /* the refused allocation's placeholder */
}

static void arena_reset(gstate *g) {
    g->off = 0;
    g->out_off = 0;
    g->ndl = 0;
    g->nsig = 0;
    g->bad = 0;
    g->why = NULL;
    if (!g->capblk) {
        g->capblk = 256;
        g->blk = (gblk *)xmalloc((size_t)g->capblk * sizeof *g->blk);
    }
    g->nblk = 1;
    g->blk[0] = (gblk){0, g->scr_cap, 0};
}

void gdownload(be_cuda *c, void *dst, const void *src, size_t bytes) {
    gstate *g = c->g;
    size_t n = round_up(bytes, G_ALIGN), off = g->out_off;
    g->out_off += n;
    if (g->out_off > g->out_cap) {
        g->want_out = g->out_off;
        graph_refuse(c, "download buffer full (grown for the next step)");
        return;
    }
    gsig(c, &src, sizeof src);
    gsig(c, &bytes, sizeof bytes);
    gsig(c, &off, sizeof off);
    if (g->ndl == g->capdl) {
        g->capdl = g->capdl ? 2 * g->capdl : 8;
        g->dl = (gdl *)xrealloc(g->dl, (size_t)g->capdl * sizeof *g->dl);
    }
    g->dl[g->ndl++] = (gdl){dst, off, bytes};
    if (c->gmode == G_CAPTURE)
        CK(cudaMemcpyAsync(g->out + off, src, bytes, cudaMemcpyDeviceToHost, c->s));
}

void gmemset(be_cuda *c, void *p, size_t n) {
    int tag = 1;
    gsig(c, &tag, sizeof tag);
    gsig(c, &p, sizeof p);
    gsig(c, &n, sizeof n);
    if (c->gmode == G_CAPTURE) CK(cudaMemsetAsync(p, 0, n, c->s));
}

void gcopy(be_cuda *c, void *dst, const void *src, size_t n) {
    int tag = 2;
    gsig(c, &tag, sizeof tag);
    gsig(c, &dst, sizeof dst);
    gsig(c, &src, sizeof src);
    gsig(c, &n, sizeof n);
    if (c->gmode == G_CAPTURE) CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, c->s));
}

/* ---- the cache ----------------------------------------------------------------------------- */

static void exec_drop(gexec *e) {
    if (e->x) cudaGraphExecDestroy(e->x);
    free(e->sig);
    memset(e, 0, sizeof *e);
}

static void cache_clear(gstate *g) {
    for (int i = 0; i < g->nex; i++) exec_drop(&g->ex[i]);
    g->nex = 0;
}

/* Grows an arena a pass found too small (no graph refers to the old one afterwards). */
static void arenas_fit(be_cuda *c) {
    gstate *g = c->g;
    int changed = 0;
    if (!g->pin || g->want_meta > g->cap) {
        size_t n = round_up(g->want_meta > ((size_t)1 << 20) ? g->want_meta * 2 : (size_t)1 << 20, 4096);
        CK(cudaStreamSynchronize(c->s));
        if (g->pin) CK(cudaFreeHost(g->pin));
        if (g->dev) CK(cudaFree(g->dev)), c->used -= g->cap;
        CK(cudaHostAlloc((void **)&g->pin, n, cudaHostAllocDefault));
        g->dev = (unsigned char *)dmalloc(c, n);
        g->cap = n;
        changed = 1;
    }
    if (!g->scr || g->want_scr > g->scr_cap) {
        size_t n = round_up(g->want_scr > ((size_t)64 << 20) ? g->want_scr * 2 : (size_t)64 << 20, (size_t)1 << 20);
        CK(cudaStreamSynchronize(c->s));
        if (g->scr) CK(cudaFree(g->scr)), c->used -= g->scr_cap;
        g->scr = (unsigned char *)dmalloc(c, n);
        g->scr_cap = n;
        changed = 1;
    }
    if (!g->out || g->want_out > g->out_cap) {
        size_t n = round_up(g->want_out > ((size_t)8 << 20) ? g->want_out * 2 : (size_t)8 << 20, 4096);
        CK(cudaStreamSynchronize(c->s));
        if (g->out) CK(cudaFreeHost(g->out));
        CK(cudaHostAlloc((void **)&g->out, n, cudaHostAllocDefault));
        g->out_cap = n;
        changed = 1;
    }
    if (changed) cache_clear(g);
}

void graph_destroy(be_cuda *c) {
    gstate *g = c->g;
    if (!g) return;
    cache_clear(g);
    if (g->pin) cudaFreeHost(g->pin);
    if (g->dev) cudaFree(g->dev);
    if (g->scr) cudaFree(g->scr);
    if (g->out) cudaFreeHost(g->out);
    free(g->blk);
    free(g->dl);
    free(g->sig);
    free(g->rsig);
    free(g);
    c->g = NULL;
}

/* ---- a step -------------------------------------------------------------------------------- */

int cu_graph_begin(be *b, int T) {
    be_cuda *c = C(b);
    gstate *g = G(c);
    if (g->off_env || c->sync_each || T <= 0 || T > G_MAX_T) return BE_PASS_DIRECT;
    arenas_fit(c);
    arena_reset(g);
    g->T = T;
    g->t_rec = now_s();
    c->gmode = G_RECORD;
    return BE_PASS_RECORD;
}

/* the step ran (replay or fresh capture): wait, copy the downloads out */
static void finish(be_cuda *c, cudaGraphExec_t x) {
    gstate *g = c->g;
    CK(cudaGraphLaunch(x, c->s));
    CK(cudaStreamSynchronize(c->s));
    for (int i = 0; i < g->ndl; i++) memcpy(g->dl[i].dst, g->out + g->dl[i].off, g->dl[i].n);
}

static int direct(be_cuda *c) {
    gstate *g = c->g;
    g->st.fallbacks++;
    snprintf(g->st.last_fallback, sizeof g->st.last_fallback, "%s", g->why ? g->why : "?");
    c->gmode = G_OFF;
    return BE_PASS_DIRECT;
}

int cu_graph_end(be *b) {
    be_cuda *c = C(b);
    gstate *g = c->g;
    if (c->gmode == G_RECORD) {
        if (g->bad) return direct(c);
        uint64_t h = sig_hash(g->sig, g->nsig);
        g->st.sig_bytes = g->nsig;
        for (int i = 0; i < g->nex; i++) {
            gexec *e = &g->ex[i];
            if (e->h != h || e->nsig != g->nsig || e->meta != g->off || memcmp(e->sig, g->sig, g->nsig))
                continue;
            e->used = ++g->tick;
            c->gmode = G_OFF;
            g->st.record_s += now_s() - g->t_rec;
            finish(c, e->x);
            g->st.replays++;
            return BE_PASS_DONE;
        }
        /* no graph for this signature: keep the record pass's, run the ops under capture */
        unsigned char *t = g->rsig;
        size_t tc = g->caprsig;
        g->rsig = g->sig, g->caprsig = g->capsig, g->nrsig = g->nsig;
        g->sig = t, g->capsig = tc;
        g->rh = h;
        g->rmeta = g->off;
        arena_reset(g);
        c->gmode = G_CAPTURE;
        CK(cudaStreamBeginCapture(c->s, cudaStreamCaptureModeThreadLocal));
        if (g->rmeta) CK(cudaMemcpyAsync(g->dev, g->pin, g->rmeta, cudaMemcpyHostToDevice, c->s));
        return BE_PASS_CAPTURE;
    }
    if (c->gmode != G_CAPTURE) return BE_PASS_DONE;
    cudaGraph_t gr = NULL;
    CK(cudaStreamEndCapture(c->s, &gr));
    c->gmode = G_OFF;
    if (g->bad || g->nsig != g->nrsig || g->off != g->rmeta || memcmp(g->sig, g->rsig, g->nsig)) {
        cudaGraphDestroy(gr);
        if (!g->bad) {
            size_t i = 0, n = g->nsig < g->nrsig ? g->nsig : g->nrsig;
            while (i < n && g->sig[i] == g->rsig[i]) i++;
            snprintf(g->whybuf, sizeof g->whybuf,
                     "the capture pass launched other work than the record pass (signatures of "
                     "%zu and %zu bytes differ from byte %zu; metadata %zu vs %zu bytes)",
                     g->nsig, g->nrsig, i, g->off, g->rmeta);
            g->why = g->whybuf;
        }
        return direct(c);
    }
    cudaGraphExec_t x = NULL;
    CK(cudaGraphInstantiate(&x, gr, 0));
    CK(cudaGraphDestroy(gr));
    /* into the cache: a free slot or the least recently used */
    int slot = 0;
    if (g->nex < G_CACHE)
        slot = g->nex++;
    else
        for (int i = 1; i < G_CACHE; i++)
            if (g->ex[i].used < g->ex[slot].used) slot = i;
    exec_drop(&g->ex[slot]);
    gexec *e = &g->ex[slot];
    e->h = g->rh;
    e->sig = (unsigned char *)xmalloc(g->nsig ? g->nsig : 1);
    memcpy(e->sig, g->sig, g->nsig);
    e->nsig = g->nsig;
    e->meta = g->off;
    e->x = x;
    e->used = ++g->tick;
    g->st.captures++;
    finish(c, x);
    return BE_PASS_DONE;
}

extern "C" void be_cuda_graph_enable(be *b, int on) { G(C(b))->off_env = !on; }

extern "C" void be_cuda_graph_get_stats(be *b, be_cuda_graph_stats *st) {
    be_cuda *c = C(b);
    memset(st, 0, sizeof *st);
    if (c->g) {
        *st = c->g->st;
        st->cached = c->g->nex;
    }
}
