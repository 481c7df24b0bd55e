/* golden_cases.c — see golden_cases.h. */
#include "tests/golden/golden_cases.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/err.h"
#include "common/safetensors.h"

#define TOL_REL_L2 1e-4

typedef struct {
    st_set *st;
    int T, S;
    int32_t *tokens;
    const int64_t *sel_pos, *argmax;
    const float *sel_logits, *margin;
} fixture;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int vocab(const golden *g) { return dv4_cfg(g->m)->vocab_size; }

static const st_tensor *need(const golden *g, st_set *s, const char *name, const char *suffix,
                             st_dtype dt) {
    char full[64];
    snprintf(full, sizeof full, "%s%s", name, suffix);
    const st_tensor *t = st_find(s, full);
    if (!t || t->dtype != dt) {
        printf("%s FAIL: fixture tensor %s %s\n", g->tag, full, t ? "has the wrong dtype" : "missing");
        return NULL;
    }
    return t;
}

static int fixture_open(const golden *g, fixture *f, const char *cas, const char *suffix) {
    char path[1024], err[512];
    snprintf(path, sizeof path, "%s/%s.safetensors", g->fix_dir, cas);
    memset(f, 0, sizeof *f);
    if (st_open(path, &f->st, err, sizeof err)) {
        printf("%s FAIL: fixture %s: %s\n", g->tag, path, err);
        return -1;
    }
    const st_tensor *tok = need(g, f->st, "tokens", suffix, ST_I64);
    const st_tensor *sp = need(g, f->st, "sel_pos", suffix, ST_I64);
    const st_tensor *sl = need(g, f->st, "sel_logits", suffix, ST_F32);
    const st_tensor *am = need(g, f->st, "argmax", suffix, ST_I64);
    const st_tensor *mg = need(g, f->st, "margin", suffix, ST_F32);
    if (!tok || !sp || !sl || !am || !mg || sl->shape[1] != vocab(g) ||
        sl->shape[0] != sp->shape[0] || am->shape[0] != tok->shape[0]) {
        if (tok && sp && sl && am && mg) printf("%s FAIL: fixture %s: inconsistent shapes\n", g->tag, path);
        st_close(f->st);
        return -1;
    }
    f->T = (int)tok->shape[0];
    f->S = (int)sp->shape[0];
    f->tokens = xmalloc((size_t)f->T * sizeof *f->tokens);
    for (int i = 0; i < f->T; i++) f->tokens[i] = (int32_t)((const int64_t *)tok->data)[i];
    f->sel_pos = sp->data;
    f->sel_logits = sl->data;
    f->argmax = am->data;
    f->margin = mg->data;
    return 0;
}

static void fixture_close(fixture *f) {
    free(f->tokens);
    st_close(f->st);
}

/* Compares logits [T, V] of every position with the fixture; returns 1 if it fails. */
static int compare(const golden *g, const char *label, const fixture *f, const float *logits,
                   double secs) {
    int V = vocab(g);
    double num = 0, den = 0, worst = 0, range = 0;
    for (int i = 0; i < f->S; i++) {
        int p = (int)f->sel_pos[i];
        if (p < 0 || p >= f->T) {
            printf("%s %-10s FAIL: selected position %d outside the %d tokens\n", g->tag, label, p, f->T);
            return 1;
        }
        const float *a = logits + (size_t)p * V, *r = f->sel_logits + (size_t)i * V;
        double rn = 0, rd = 0;
        for (int v = 0; v < V; v++) {
            double d = (double)a[v] - r[v];
            rn += d * d;
            rd += (double)r[v] * r[v];
            if (fabs(r[v]) > range) range = fabs(r[v]);
        }
        num += rn;
        den += rd;
        if (!(sqrt(rn / rd) <= worst)) worst = sqrt(rn / rd); /* a NaN is the worst */
    }
    double rel = sqrt(num / den), tol = g->tol > 0 ? g->tol : TOL_REL_L2;
    int flips = 0, near = 0;
    for (int p = 0; p < f->T; p++) {
        int a = 0;
        const float *row = logits + (size_t)p * V;
        for (int v = 1; v < V; v++)
            if (row[v] > row[a]) a = v;
        if (a != (int)f->argmax[p]) {
            if (f->margin[p] < tol * range) near++;
            else flips++;
        }
    }
    int ok = rel <= tol && worst <= 10 * tol && flips == 0;
    printf("%s %-10s rel_l2 %.3e  worst_row %.3e  argmax_flips %d  near_tie_flips %d  %.2f s  %s\n",
           g->tag, label, rel, worst, flips, near, secs, ok ? "PASS" : "FAIL");
    fflush(stdout);
    return !ok;
}

static int forward(const golden *g, dv4_chunk *ch, int n, float *out) {
    char err[256];
    if (dv4_forward(g->m, ch, n, out, err, sizeof err)) {
        printf("%s FAIL: forward: %s\n", g->tag, err);
        return -1;
    }
    return 0;
}

static dv4_seq *seq_new(const golden *g, int cap) {
    char err[256];
    dv4_seq *s = NULL;
    if (dv4_seq_new(g->m, cap, &s, err, sizeof err)) printf("%s FAIL: %s\n", g->tag, err);
    return s;
}

int golden_chunked(golden *g, const char *cas, const char *label, int chunk) {
    fixture f;
    if (fixture_open(g, &f, cas, "")) return 1;
    int V = vocab(g), bad = 0;
    float *logits = xmalloc((size_t)f.T * V * sizeof *logits);
    dv4_seq *s = seq_new(g, f.T);
    if (chunk <= 0) chunk = f.T;
    double t0 = now();
    for (int i = 0; s && i < f.T && !bad; i += chunk) {
        int n = f.T - i < chunk ? f.T - i : chunk;
        dv4_chunk ch = {s, f.tokens + i, n, DV4_LOGITS_ALL};
        bad = forward(g, &ch, 1, logits + (size_t)i * V) != 0;
    }
    int fails = !s || bad ? 1 : compare(g, label, &f, logits, now() - t0);
    dv4_seq_free(g->m, s);
    free(logits);
    fixture_close(&f);
    return fails;
}

int golden_decode300(golden *g) {
    fixture f;
    if (fixture_open(g, &f, "decode300", "")) return 1;
    int V = vocab(g), bad = f.T <= 300;
    float *logits = xmalloc((size_t)f.T * V * sizeof *logits);
    dv4_seq *s = seq_new(g, f.T);
    double t0 = now();
    dv4_chunk pre = {s, f.tokens, 300, DV4_LOGITS_ALL};
    bad = bad || !s || forward(g, &pre, 1, logits);
    for (int p = 300; p < f.T && !bad; p++) {
        dv4_chunk ch = {s, f.tokens + p, 1, DV4_LOGITS_LAST};
        bad = forward(g, &ch, 1, logits + (size_t)p * V) != 0;
    }
    int fails = bad ? 1 : compare(g, "decode300", &f, logits, now() - t0);
    dv4_seq_free(g->m, s);
    free(logits);
    fixture_close(&f);
    return fails;
}

int golden_batch2(golden *g) {
    fixture f[2];
    if (fixture_open(g, &f[0], "batch2", "0")) return 1;
    if (fixture_open(g, &f[1], "batch2", "1")) {
        fixture_close(&f[0]);
        return 1;
    }
    int V = vocab(g), fails = 0;
    float *lg[2], *both = xmalloc((size_t)(f[0].T + f[1].T) * V * sizeof *both);
    dv4_seq *s[2] = {seq_new(g, f[0].T), seq_new(g, f[1].T)};
    for (int k = 0; k < 2; k++) lg[k] = xmalloc((size_t)f[k].T * V * sizeof *lg[k]);
    dv4_chunk ch[2] = {{s[0], f[0].tokens, f[0].T, DV4_LOGITS_ALL},
                       {s[1], f[1].tokens, f[1].T, DV4_LOGITS_ALL}};
    double t0 = now();
    if (!s[0] || !s[1] || forward(g, ch, 2, both)) {
        fails = 1;
        goto out;
    }
    double t1 = now() - t0;
    fails += compare(g, "batch2.a", &f[0], both, t1);
    fails += compare(g, "batch2.b", &f[1], both + (size_t)f[0].T * V, t1);
    for (int k = 0; k < 2; k++) {
        dv4_seq_free(g->m, s[k]);
        s[k] = seq_new(g, f[k].T);
    }
    static const int csz[2] = {50, 37};
    int done[2] = {0, 0};
    t0 = now();
    while (done[0] < f[0].T || done[1] < f[1].T) {
        dv4_chunk c2[2];
        int n = 0, which[2];
        for (int k = 0; k < 2; k++) {
            if (done[k] >= f[k].T) continue;
            int len = f[k].T - done[k] < csz[k] ? f[k].T - done[k] : csz[k];
            c2[n] = (dv4_chunk){s[k], f[k].tokens + done[k], len, DV4_LOGITS_ALL};
            which[n++] = k;
        }
        if (!s[0] || !s[1] || forward(g, c2, n, both)) {
            fails++;
            goto out;
        }
        size_t off = 0;
        for (int j = 0; j < n; j++) {
            int k = which[j];
            memcpy(lg[k] + (size_t)done[k] * V, both + off, (size_t)c2[j].n * V * sizeof *both);
            off += (size_t)c2[j].n * V;
            done[k] += c2[j].n;
        }
    }
    t1 = now() - t0;
    fails += compare(g, "batch2.ia", &f[0], lg[0], t1);
    fails += compare(g, "batch2.ib", &f[1], lg[1], t1);
out:
    for (int k = 0; k < 2; k++) {
        dv4_seq_free(g->m, s[k]);
        free(lg[k]);
        fixture_close(&f[k]);
    }
    free(both);
    return fails;
}

int golden_all(golden *g) {
    int fails = golden_chunked(g, "prefill600", "prefill600", 0);
    fails += golden_decode300(g);
    fails += golden_chunked(g, "chunk37", "chunk37", 37);
    fails += golden_chunked(g, "prefill600", "chunk1", 1);
    fails += golden_chunked(g, "prefill600", "chunk3", 3);
    fails += golden_chunked(g, "prefill600", "chunk8", 8);
    fails += golden_chunked(g, "prefill600", "chunk129", 129);
    fails += golden_batch2(g);
    fails += golden_chunked(g, "hash", "hash", 0);
    return fails;
}
