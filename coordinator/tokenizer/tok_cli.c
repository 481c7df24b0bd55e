/* tok_cli.c — command-line front end of the tokenizer (tests and manual checks).
 *
 * Why: the live exactness test and people debugging prompts need to run the C encoder on
 * arbitrary text and compare with HF tokenizers from Python.
 *
 *   tok-cli encode TOKENIZER_JSON [FILE]       whole file (default stdin) -> one line of ids
 *   tok-cli encode-docs TOKENIZER_JSON FILE [--plain]   NUL-separated documents -> one line of
 *                                              ids each (--plain: tok_encode_plain)
 *   tok-cli decode TOKENIZER_JSON [--skip-special]   ids on stdin -> text on stdout
 *   tok-cli decode-docs TOKENIZER_JSON [--skip-special]  one id list per stdin line -> for
 *                                              each, a line with the byte length, then the text
 *   tok-cli classes [--utf8proc]               pre-tokenizer class of every code point (tests)
 *
 * It must never: crash on any input bytes; print partial output on a load error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "coordinator/tokenizer/tok_internal.h"

static int read_all(const char *path, char **out, size_t *len)
{
    FILE *f = path ? fopen(path, "rb") : stdin;
    if (!f)
        return -1;
    size_t cap = 1 << 16, n = 0;
    char *p = xmalloc(cap);
    size_t got;
    while ((got = fread(p + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap)
            p = xrealloc(p, cap *= 2);
    }
    if (path)
        fclose(f);
    *out = p;
    *len = n;
    return 0;
}

static void print_ids(const tok_ids_t *ids)
{
    for (size_t i = 0; i < ids->n; i++)
        printf(i ? " %d" : "%d", ids->v[i]);
    putchar('\n');
}

static int cmd_encode(tok_t *t, const char *path, int docs, int plain)
{
    char *buf;
    size_t len;
    if (read_all(path, &buf, &len) != 0) {
        fprintf(stderr, "tok-cli: cannot read %s\n", path ? path : "stdin");
        return 1;
    }
    tok_ids_t ids = {0};
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && (!docs || buf[i] != 0))
            continue;
        if (docs && i == len && start == len)
            break; /* trailing separator */
        ids.n = 0;
        if (plain)
            tok_encode_plain(t, buf + start, i - start, &ids);
        else
            tok_encode(t, buf + start, i - start, &ids);
        print_ids(&ids);
        start = i + 1;
    }
    tok_ids_free(&ids);
    free(buf);
    return 0;
}

static void decode_print(tok_t *t, const tok_ids_t *ids, int skip, int with_len)
{
    char *text;
    size_t n;
    tok_decode(t, ids->v, ids->n, skip, &text, &n);
    if (with_len)
        printf("%zu\n", n);
    fwrite(text, 1, n, stdout);
    free(text);
}

/* docs = 0: all ids on stdin form one sequence; docs = 1: one sequence per line. */
static int cmd_decode(tok_t *t, int skip, int docs)
{
    tok_ids_t ids = {0};
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, stdin) > 0) {
        char *p = line, *end;
        for (long v; (v = strtol(p, &end, 10)), end != p; p = end)
            tok_ids_push(&ids, (int32_t)v);
        if (docs) {
            decode_print(t, &ids, skip, 1);
            ids.n = 0;
        }
    }
    if (!docs)
        decode_print(t, &ids, skip, 0);
    free(line);
    tok_ids_free(&ids);
    return 0;
}

/* One line per code point 1..10FFFF (no surrogates): "HEX CLASS", CLASS one of LM N PS WS X. */
static int cmd_classes(int raw)
{
    for (uint32_t c = 1; c < 0x110000; c++) {
        if (c >= 0xD800 && c <= 0xDFFF)
            continue;
        uint16_t f = raw ? tok_cp_class_utf8proc(c) : tok_cp_class(c);
        const char *k = (f & TOK_C_WS) ? "WS" : (f & (TOK_C_L | TOK_C_M)) ? "LM"
                        : (f & TOK_C_N) ? "N" : (f & (TOK_C_P | TOK_C_S)) ? "PS" : "X";
        printf("%X %s\n", c, k);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "classes") == 0)
        return cmd_classes(argc > 2 && strcmp(argv[2], "--utf8proc") == 0);
    if (argc < 3) {
        fprintf(stderr, "usage: tok-cli encode|encode-docs|decode TOKENIZER_JSON [FILE|--skip-special]\n");
        return 2;
    }
    char err[512];
    tok_t *t;
    if (tok_load(argv[2], &t, err, sizeof err) != 0) {
        fprintf(stderr, "tok-cli: %s\n", err);
        return 1;
    }
    int rc;
    if (strcmp(argv[1], "encode") == 0)
        rc = cmd_encode(t, argc > 3 ? argv[3] : NULL, 0, 0);
    else if (strcmp(argv[1], "encode-docs") == 0 && argc > 3)
        rc = cmd_encode(t, argv[3], 1, argc > 4 && strcmp(argv[4], "--plain") == 0);
    else if (strcmp(argv[1], "decode") == 0 || strcmp(argv[1], "decode-docs") == 0)
        rc = cmd_decode(t, argc > 3 && strcmp(argv[3], "--skip-special") == 0,
                        strcmp(argv[1], "decode-docs") == 0);
    else {
        fprintf(stderr, "tok-cli: unknown command %s\n", argv[1]);
        rc = 2;
    }
    tok_free(t);
    return rc;
}
