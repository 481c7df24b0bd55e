/* fuzz_outparse.c — libFuzzer harness for the streaming output parser (coordinator/chat).
 *
 * Why: the parser reads model output, which is untrusted text; it must never crash, leak
 * markup or report a call with invalid JSON, whatever the bytes and however they are split.
 * Input layout: byte 0 = configuration bits, byte 1 = split seed (its top bit turns on a few
 * stop strings), the rest = generated text.
 * Each input is parsed twice — whole, and cut into pieces of 1..16 bytes — and the harness
 * aborts when an invariant fails:
 *   - every completed call's arguments is a JSON object (jansson);
 *   - "｜DSML｜", "</think>" and EOS never appear in content, reasoning or arguments;
 *   - streamed deltas joined equal the final content / reasoning / completed arguments;
 *   - both runs give identical results.
 * It must never write files or depend on anything but its input.
 */
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/chat/outparse.h"
#include "coordinator/chat/sbuf.h"

#define FZ_DSML "｜DSML｜"
#define FZ_EOS "<｜end▁of▁sentence｜>"
#define FZ_MAXC 64

typedef struct {
    chat_sb reasoning, content;
    chat_sb args[FZ_MAXC];
    char ids[FZ_MAXC][40];
    size_t n_starts;
    int counter;
} fz_cap;

#define FZ_CHECK(cond, msg)                                                                   \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "fuzz_outparse: invariant failed: %s (%s:%d)\n", msg, __FILE__,  \
                    __LINE__);                                                                \
            abort();                                                                          \
        }                                                                                     \
    } while (0)

static void fz_emit(void *user, const op_event *ev) {
    fz_cap *c = user;
    if (ev->kind == OP_EV_REASONING) chat_sb_put(&c->reasoning, ev->text, ev->len);
    if (ev->kind == OP_EV_CONTENT) chat_sb_put(&c->content, ev->text, ev->len);
    if (ev->kind == OP_EV_TOOL_START) {
        FZ_CHECK(ev->index == c->n_starts, "tool indexes are 0,1,2,...");
        if (ev->index < FZ_MAXC) snprintf(c->ids[ev->index], sizeof c->ids[0], "%s", ev->id);
        c->n_starts++;
    }
    if (ev->kind == OP_EV_TOOL_ARGS) {
        FZ_CHECK(ev->index < c->n_starts, "arguments only after the call header");
        if (ev->index < FZ_MAXC) chat_sb_put(&c->args[ev->index], ev->text, ev->len);
    }
}

static void fz_id(void *user, char *out, size_t outlen) {
    fz_cap *c = user;
    snprintf(out, outlen, "call_%d", c->counter++);
}

static int fz_markup(const char *s, size_t n) {
    return memmem(s, n, FZ_DSML, strlen(FZ_DSML)) || memmem(s, n, "</think>", 8) ||
           memmem(s, n, FZ_EOS, strlen(FZ_EOS));
}

static const char *const FZ_NAMES[] = {"f", "get_weather", "get_time"};
static const char *const FZ_STOPS[] = {"ab", "</a", "\n\n", "｜", ""};

/* Parses text in pieces (seed 0 = whole); checks the invariants; returns the parser. */
static op_parser *fz_run(uint8_t flags, bool stops, unsigned seed, const char *text,
                         size_t len, fz_cap *cap) {
    op_config cfg;
    op_config_init(&cfg);
    cfg.thinking = flags & 1;
    cfg.tool_choice = (op_tool_choice)((flags >> 1) & 3);
    cfg.named_tool = "f";
    cfg.parallel_tool_calls = !(flags & 8);
    cfg.ignore_eos = flags & 16;
    cfg.buffered = flags & 32;
    if (flags & 64) {
        cfg.tool_names = FZ_NAMES;
        cfg.n_tool_names = 3;
    }
    if (stops) {
        cfg.stop = FZ_STOPS;
        cfg.n_stop = 5;
        cfg.include_stop_str = flags & 8;
    }
    cfg.emit = fz_emit;
    cfg.emit_user = cap;
    cfg.gen_id = fz_id;
    cfg.id_user = cap;
    op_parser *p = op_new(&cfg);
    size_t at = 0;
    while (at < len) {
        size_t n = seed ? 1 + (size_t)(rand_r(&seed) % 16) : len;
        if (n > len - at) n = len - at;
        op_feed(p, text + at, n);
        at += n;
    }
    const op_result *r = op_finish(p, (op_end)((flags >> 7) & 1));
    FZ_CHECK(!fz_markup(r->content, r->content_len), "no markup in content");
    FZ_CHECK(!fz_markup(r->reasoning, r->reasoning_len), "no markup in reasoning");
    FZ_CHECK(cap->content.len == r->content_len &&
                 (!r->content_len || !memcmp(cap->content.p, r->content, r->content_len)),
             "content deltas equal content");
    FZ_CHECK(cap->reasoning.len == r->reasoning_len &&
                 (!r->reasoning_len ||
                  !memcmp(cap->reasoning.p, r->reasoning, r->reasoning_len)),
             "reasoning deltas equal reasoning");
    for (size_t k = 0; k < r->n_calls; k++) {
        const op_call *c = &r->calls[k];
        json_t *v = json_loadb(c->arguments, c->arguments_len, JSON_ALLOW_NUL, NULL);
        FZ_CHECK(json_is_object(v), "arguments are a JSON object");
        json_decref(v);
        FZ_CHECK(!fz_markup(c->arguments, c->arguments_len), "no markup in arguments");
        size_t s = 0;
        while (s < cap->n_starts && s < FZ_MAXC && strcmp(cap->ids[s], c->id)) s++;
        FZ_CHECK(s < cap->n_starts, "every completed call was announced");
        if (s < FZ_MAXC)
            FZ_CHECK(cap->args[s].len == c->arguments_len &&
                         !memcmp(cap->args[s].p, c->arguments, c->arguments_len),
                     "argument deltas equal the arguments");
    }
    return p;
}

static void fz_free(fz_cap *c) {
    chat_sb_free(&c->reasoning);
    chat_sb_free(&c->content);
    for (int i = 0; i < FZ_MAXC; i++) chat_sb_free(&c->args[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    uint8_t flags = data[0];
    unsigned seed = data[1] | 1u;
    const char *text = (const char *)data + 2;
    size_t len = size - 2;
    fz_cap a = {0}, b = {0};
    bool stops = data[1] & 0x80;
    op_parser *pa = fz_run(flags, stops, 0, text, len, &a);
    op_parser *pb = fz_run(flags, stops, seed, text, len, &b);
    const op_result *ra = op_finish(pa, OP_END_STOP), *rb = op_finish(pb, OP_END_STOP);
    FZ_CHECK(ra->content_len == rb->content_len && !strcmp(ra->content, rb->content),
             "content independent of the split");
    FZ_CHECK(!strcmp(ra->reasoning, rb->reasoning), "reasoning independent of the split");
    FZ_CHECK(!strcmp(ra->finish_reason, rb->finish_reason), "finish independent of the split");
    FZ_CHECK(ra->n_calls == rb->n_calls, "calls independent of the split");
    FZ_CHECK(ra->stop_reason == rb->stop_reason, "stop string independent of the split");
    for (size_t k = 0; k < ra->n_calls; k++) {
        FZ_CHECK(!strcmp(ra->calls[k].name, rb->calls[k].name), "names independent");
        FZ_CHECK(!strcmp(ra->calls[k].arguments, rb->calls[k].arguments), "args independent");
    }
    op_free(pa);
    op_free(pb);
    fz_free(&a);
    fz_free(&b);
    return 0;
}
