/* tokbench.c — single-threaded throughput, load time and memory of the C tokenizer.
 *
 * Why: the coordinator encodes every prompt on its event loop; this measures how fast, so that
 * speed claims rest on numbers (docs/benchmarks/tokenizer.csv, written by run_tokbench.py, which
 * also runs HF tokenizers on the same documents and checks the ids are identical).
 *
 *   tokbench TOKENIZER_JSON DOCS_FILE IDS_OUT [PASSES]
 * DOCS_FILE holds NUL-separated UTF-8 documents. IDS_OUT receives, per document, a uint32 count
 * and that many int32 ids (native endianness) from the first pass. Prints one JSON object.
 *
 * It must never: be run as a unit test (it takes seconds and its numbers depend on the machine).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/err.h"
#include "coordinator/tokenizer/tokenizer.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Resident set size of this process in bytes (VmRSS), or 0 if unknown. */
static size_t rss_bytes(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return 0;
    char line[256];
    size_t kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %zu kB", &kb) == 1)
            break;
    fclose(f);
    return kb * 1024;
}

static char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = xmalloc((size_t)n + 1);
    *len = fread(p, 1, (size_t)n, f);
    fclose(f);
    return p;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: tokbench TOKENIZER_JSON DOCS_FILE IDS_OUT [PASSES]\n");
        return 2;
    }
    int passes = argc > 4 ? atoi(argv[4]) : 3;
    if (passes < 1)
        passes = 1;
    size_t len;
    char *buf = read_all(argv[2], &len);
    if (!buf) {
        fprintf(stderr, "tokbench: cannot read %s\n", argv[2]);
        return 1;
    }
    /* document boundaries */
    size_t ndocs = 0, cap = 1024;
    size_t *start = xmalloc(cap * sizeof *start), *dlen = xmalloc(cap * sizeof *dlen);
    for (size_t i = 0, s = 0; i <= len; i++) {
        if (i < len && buf[i] != 0)
            continue;
        if (i > s || i < len) {
            if (ndocs == cap) {
                cap *= 2;
                start = xrealloc(start, cap * sizeof *start);
                dlen = xrealloc(dlen, cap * sizeof *dlen);
            }
            start[ndocs] = s;
            dlen[ndocs++] = i - s;
        }
        s = i + 1;
    }
    size_t rss0 = rss_bytes();
    double t0 = now_s();
    char err[512];
    tok_t *t;
    if (tok_load(argv[1], &t, err, sizeof err) != 0) {
        fprintf(stderr, "tokbench: %s\n", err);
        return 1;
    }
    double load_s = now_s() - t0;
    size_t rss_loaded = rss_bytes();
    FILE *out = fopen(argv[3], "wb");
    if (!out) {
        fprintf(stderr, "tokbench: cannot write %s\n", argv[3]);
        return 1;
    }
    tok_ids_t ids = {0};
    double first_s = 0, best_s = 1e30;
    size_t tokens = 0;
    for (int p = 0; p < passes; p++) {
        size_t ntok = 0;
        double a = now_s();
        for (size_t d = 0; d < ndocs; d++) {
            ids.n = 0;
            tok_encode(t, buf + start[d], dlen[d], &ids);
            ntok += ids.n;
            if (p == 0) {
                uint32_t n = (uint32_t)ids.n;
                fwrite(&n, sizeof n, 1, out);
                fwrite(ids.v, sizeof *ids.v, ids.n, out);
            }
        }
        double el = now_s() - a;
        if (p == 0) {
            first_s = el;
            tokens = ntok;
            /* the first pass includes writing ids; time a clean pass for it too */
        } else if (el < best_s) {
            best_s = el;
        }
    }
    if (passes == 1)
        best_s = first_s;
    fclose(out);
    size_t rss_after = rss_bytes();
    printf("{\"impl\": \"duet\", \"docs\": %zu, \"bytes\": %zu, \"tokens\": %zu, "
           "\"load_s\": %.4f, \"first_pass_s\": %.4f, \"best_pass_s\": %.4f, "
           "\"rss_load_mb\": %.1f, \"rss_after_encode_mb\": %.1f}\n",
           ndocs, len - (ndocs ? ndocs - 1 : 0), tokens, load_s, first_s, best_s,
           (double)(rss_loaded - rss0) / 1048576.0, (double)(rss_after - rss0) / 1048576.0);
    tok_ids_free(&ids);
    tok_free(t);
    free(start);
    free(dlen);
    free(buf);
    return 0;
}
