/* outparse.c — streaming DeepSeek-V4 output parser (see outparse.h; server-api §4).
 *
 * Shape: input bytes are first made valid UTF-8 (an incomplete tail waits for the next feed),
 * then appended to `in`. A state machine consumes `in` as far as it can decide: in text states
 * (reasoning, content, parameter values, skipped regions) a marker scanner finds the first
 * complete marker and holds back a tail that could still become one; in structural states
 * (between tags) it matches the expected tags after optional whitespace. Whatever cannot be
 * decided yet stays in `in`. It must never emit a byte of markup as text and never complete a
 * call with arguments that are not a JSON object.
 */
#include "coordinator/chat/outparse.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "common/err.h"
#include "coordinator/chat/pyjson.h"
#include "coordinator/chat/sbuf.h"

#define OP_DSML "｜DSML｜"
#define OP_EOS "<｜end▁of▁sentence｜>"
#define OP_HDR_MAX 512 /* bytes allowed in an invoke/parameter header before '>' */
#define OP_ID_MAX 64
#define OP_STOP_MAX 16 /* stop strings used (server-api §3.1 allows at most 16) */
#define OP_TAIL_MAX 64 /* bytes of released text kept for cross(); > the longest marker */

/* ---------------------------------------------------------------- markers */

enum {
    MK_EOS, MK_THINK_END, MK_THINK, MK_BOS, MK_DSML, MK_OPEN2, MK_OPEN1, MK_OPEN0,
    MK_PARAM_CLOSE, MK_INV_CLOSE, MK_INVOKE, MK_BLOCK_CLOSE, MK_PARAM, MK_COUNT
};

typedef struct {
    const char *s;
    size_t n;
} marker;

#define MK(str) {str, sizeof(str) - 1}
static const marker MARKERS[MK_COUNT] = {
    [MK_EOS] = MK(OP_EOS),
    [MK_THINK_END] = MK("</think>"),
    [MK_THINK] = MK("<think>"),
    [MK_BOS] = MK("<｜begin▁of▁sentence｜>"),
    [MK_DSML] = MK(OP_DSML),
    [MK_OPEN2] = MK("\n\n<" OP_DSML "tool_calls>"),
    [MK_OPEN1] = MK("\n<" OP_DSML "tool_calls>"),
    [MK_OPEN0] = MK("<" OP_DSML "tool_calls>"),
    [MK_PARAM_CLOSE] = MK("</" OP_DSML "parameter>"),
    [MK_INV_CLOSE] = MK("</" OP_DSML "invoke>"),
    [MK_INVOKE] = MK("<" OP_DSML "invoke"),
    [MK_BLOCK_CLOSE] = MK("</" OP_DSML "tool_calls>"),
    [MK_PARAM] = MK("<" OP_DSML "parameter"),
};

/* ---------------------------------------------------------------- parser state */

enum {
    S_REASON, S_CONTENT, S_BLOCK, S_INV_HDR, S_INV_BODY, S_PAR_HDR, S_PAR_STR, S_PAR_RAW,
    S_PAR_SKIP, S_INV_SKIP, S_DISCARD, S_AFTER, S_DONE
};

struct op_parser {
    op_config cfg;
    int state;
    bool finished, eos_seen;
    chat_sb in;              /* undecided input, valid UTF-8 */
    unsigned char u8[4];     /* incomplete UTF-8 tail of the last feed */
    size_t n_u8;
    chat_sb reasoning, content;
    op_call *calls;          /* completed calls */
    size_t n_calls;
    /* the invoke being parsed */
    bool inv_open;           /* accepted, counted, maybe announced */
    size_t inv_index;
    char inv_id[OP_ID_MAX];
    char *inv_name;
    chat_sb inv_args;        /* arguments text so far */
    chat_sb inv_keys;        /* parameter names so far, each NUL-terminated */
    size_t inv_nparams;
    chat_sb raw;             /* string="false" value being buffered */
    chat_sb tail;            /* last released text of tail_state (cross()) */
    int tail_state;
    bool barrier;            /* a marker was just removed; cross() must run */
    marker stops[OP_STOP_MAX]; /* non-empty stop strings; marker id MK_COUNT + j */
    size_t n_stops;
    bool first[256];         /* bytes that can start a marker or a stop string */
    size_t n_started;        /* invokes accepted (the next index) */
    op_result res;
};

void op_config_init(op_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->tool_choice = OP_TOOLS_AUTO;
    cfg->parallel_tool_calls = true;
}

op_parser *op_new(const op_config *cfg) {
    op_parser *p = xcalloc(1, sizeof *p);
    p->cfg = *cfg;
    p->state = cfg->thinking ? S_REASON : S_CONTENT;
    p->first['<'] = p->first['\n'] = p->first[0xEF] = true; /* every markup marker */
    for (size_t i = 0; i < cfg->n_stop && p->n_stops < OP_STOP_MAX; i++) {
        if (!cfg->stop || !cfg->stop[i] || !cfg->stop[i][0]) continue;
        p->stops[p->n_stops++] = (marker){cfg->stop[i], strlen(cfg->stop[i])};
        p->first[(unsigned char)cfg->stop[i][0]] = true;
    }
    return p;
}

void op_free(op_parser *p) {
    if (!p) return;
    chat_sb_free(&p->in);
    chat_sb_free(&p->reasoning);
    chat_sb_free(&p->content);
    chat_sb_free(&p->inv_args);
    chat_sb_free(&p->inv_keys);
    chat_sb_free(&p->raw);
    chat_sb_free(&p->tail);
    for (size_t i = 0; i < p->n_calls; i++) {
        free(p->calls[i].id);
        free(p->calls[i].name);
        free(p->calls[i].arguments);
    }
    free(p->calls);
    free(p->inv_name);
    free(p);
}

bool op_eos_seen(const op_parser *p) { return p->eos_seen; }

bool op_stopped(const op_parser *p) { return p->state == S_DONE; }

/* ---------------------------------------------------------------- emission */

static void tail_note(op_parser *p, const char *s, size_t n);

static void emit(op_parser *p, op_event_kind kind, const char *s, size_t n) {
    if (n == 0) return;
    if (kind == OP_EV_REASONING) chat_sb_put(&p->reasoning, s, n);
    if (kind == OP_EV_CONTENT) chat_sb_put(&p->content, s, n);
    if (kind == OP_EV_REASONING || kind == OP_EV_CONTENT) tail_note(p, s, n);
    if (!p->cfg.emit) return;
    op_event ev = {.kind = kind, .index = p->inv_index, .text = s, .len = n};
    p->cfg.emit(p->cfg.emit_user, &ev);
}

/* Appends an arguments fragment of the open invoke (sent now unless buffered). */
static void args_put(op_parser *p, const char *s, size_t n) {
    chat_sb_put(&p->inv_args, s, n);
    if (!p->cfg.buffered) emit(p, OP_EV_TOOL_ARGS, s, n);
}

static void announce(op_parser *p) {
    if (!p->cfg.emit) return;
    op_event ev = {.kind = OP_EV_TOOL_START, .index = p->inv_index, .id = p->inv_id,
                   .name = p->inv_name};
    p->cfg.emit(p->cfg.emit_user, &ev);
}

static void default_id(char *out, size_t outlen) {
    static const char alnum[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    unsigned char rnd[24];
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
        for (size_t i = 0; i < sizeof rnd; i++) rnd[i] = (unsigned char)rand();
    char id[5 + 24 + 1] = "call_";
    for (size_t i = 0; i < 24; i++) id[5 + i] = alnum[rnd[i] % 62];
    id[29] = '\0';
    snprintf(out, outlen, "%s", id);
}

/* ---------------------------------------------------------------- UTF-8 */

/* Length of the valid UTF-8 sequence at s (1..4); 0 if s[0..n) is a valid but incomplete
 * prefix; -k if invalid, k = bytes of the maximal invalid subpart (replaced by one U+FFFD). */
static int u8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    int len;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) len = 3;
    else if (c >= 0xF0 && c <= 0xF4) len = 4;
    else return -1;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n) return 0;
        unsigned b = s[i];
        if (b < (i == 1 ? lo : 0x80) || b > (i == 1 ? hi : 0xBF)) return -i;
    }
    return len;
}

/* Appends the valid UTF-8 of s to p->in (invalid subparts → U+FFFD), keeping an incomplete
 * tail (at most 3 bytes) in p->u8 unless final. */
static void u8_append(op_parser *p, const unsigned char *s, size_t n, bool final) {
    size_t i = 0;
    while (i < n) {
        int k = u8_seq(s + i, n - i);
        if (k == 0 && !final) {
            memcpy(p->u8, s + i, n - i);
            p->n_u8 = n - i;
            return;
        }
        if (k <= 0) {
            chat_sb_puts(&p->in, "\xEF\xBF\xBD");
            i += k == 0 ? n - i : (size_t)-k;
            continue;
        }
        chat_sb_put(&p->in, (const char *)s + i, (size_t)k);
        i += (size_t)k;
    }
}

/* ---------------------------------------------------------------- marker scanning */

static const marker *mk(const op_parser *p, int id) {
    return id < MK_COUNT ? &MARKERS[id] : &p->stops[id - MK_COUNT];
}

/* Finds the first decided marker among ids[0..nid) in buf. Returns 1 with *pos and *which set, or
 * 0 with *safe = how many leading bytes can no longer be part of a marker. At a position where
 * a marker could still complete (and not final) scanning stops: longest-first by position. */
static int scan(const op_parser *p, const int *ids, size_t nid, bool final, size_t *pos,
                int *which, size_t *safe) {
    const char *buf = p->in.p;
    size_t len = p->in.len;
    for (size_t i = 0; i < len; i++) {
        if (!p->first[(unsigned char)buf[i]]) continue;
        int best = -1;
        bool pending = false;
        for (size_t k = 0; k < nid; k++) {
            const marker *m = mk(p, ids[k]);
            size_t rem = len - i;
            if (rem >= m->n) {
                if (!memcmp(buf + i, m->s, m->n) && (best < 0 || m->n > mk(p, best)->n))
                    best = ids[k];
            } else if (!final && !memcmp(buf + i, m->s, rem)) {
                pending = true;
            }
        }
        if (pending) {
            *safe = i;
            return 0;
        }
        if (best >= 0) {
            *pos = i;
            *which = best;
            return 1;
        }
    }
    *safe = len;
    return 0;
}

/* Keeps the last bytes of text released in the current state (see cross()). */
static void tail_note(op_parser *p, const char *s, size_t n) {
    if (!n) return;
    if (p->tail_state != p->state) {
        chat_sb_clear(&p->tail);
        p->tail_state = p->state;
    }
    chat_sb_put(&p->tail, s, n);
    if (p->tail.len > OP_TAIL_MAX) chat_sb_consume(&p->tail, p->tail.len - OP_TAIL_MAX);
    p->barrier = false;
}

/* After a marker was removed from text, the text released before it and the text after it
 * could spell a marker across the gap ("<｜e" + removed + "nd▁of▁sentence｜>"). Such a
 * marker is removed too (its part after the gap). Returns 1 if something was removed, 0 if
 * more input is needed to decide, -1 if nothing spans the gap (the gap is closed). */
static int cross(op_parser *p, const int *ids, size_t nid, bool final) {
    const chat_sb *t = &p->tail;
    bool pending = false;
    size_t remove = 0;
    for (size_t k = 0; t->len && p->tail_state == p->state && k < nid; k++) {
        const marker *m = mk(p, ids[k]);
        for (size_t h = 1; h < m->n && h <= t->len; h++) {
            if (memcmp(t->p + t->len - h, m->s, h)) continue;
            size_t need = m->n - h;
            if (p->in.len >= need) {
                if (!memcmp(p->in.p, m->s + h, need) && need > remove) remove = need;
            } else if (!final && !memcmp(p->in.p, m->s + h, p->in.len)) {
                pending = true;
            }
        }
    }
    if (pending) return 0;
    if (remove) {
        chat_sb_consume(&p->in, remove);
        return 1;
    }
    p->barrier = false;
    return -1;
}

/* ---------------------------------------------------------------- invokes */

static bool tools_allowed(const op_parser *p) { return p->cfg.tool_choice != OP_TOOLS_NONE; }

static void inv_reset(op_parser *p) {
    p->inv_open = false;
    free(p->inv_name);
    p->inv_name = NULL;
    chat_sb_clear(&p->inv_args);
    chat_sb_clear(&p->inv_keys);
    chat_sb_clear(&p->raw);
    p->inv_nparams = 0;
}

/* Malformed markup: drop the open invoke and everything up to EOS. */
static void fail(op_parser *p) {
    p->res.parse_failures++;
    if (p->inv_open) p->res.dropped_invokes++;
    inv_reset(p);
    p->state = S_DISCARD;
}

static void on_eos(op_parser *p) {
    p->eos_seen = true;
    if (p->inv_open) p->res.dropped_invokes++;
    inv_reset(p);
    p->state = S_DONE;
}

static bool name_declared(const op_parser *p, const char *name) {
    if (!p->cfg.tool_names) return true;
    for (size_t i = 0; i < p->cfg.n_tool_names; i++)
        if (p->cfg.tool_names[i] && !strcmp(p->cfg.tool_names[i], name)) return true;
    return false;
}

static bool accept_invoke(const op_parser *p, const char *name) {
    const op_config *c = &p->cfg;
    if (c->tool_choice == OP_TOOLS_NONE || !name_declared(p, name)) return false;
    if (c->tool_choice == OP_TOOLS_NAMED && (!c->named_tool || strcmp(c->named_tool, name)))
        return false;
    if ((!c->parallel_tool_calls || c->tool_choice == OP_TOOLS_NAMED) && p->n_started > 0)
        return false;
    return true;
}

static void close_invoke(op_parser *p) {
    args_put(p, p->inv_nparams ? "}" : "{}", p->inv_nparams ? 1 : 2);
    if (p->cfg.buffered) {
        announce(p);
        emit(p, OP_EV_TOOL_ARGS, p->inv_args.p, p->inv_args.len);
    }
    p->calls = xrealloc(p->calls, (p->n_calls + 1) * sizeof *p->calls);
    op_call *c = &p->calls[p->n_calls++];
    c->id = xstrdup(p->inv_id);
    c->name = xstrdup(p->inv_name);
    c->arguments = chat_sb_take(&p->inv_args, &c->arguments_len);
    inv_reset(p);
    p->state = S_BLOCK;
}

/* ---------------------------------------------------------------- headers */

static size_t skip_ws(const char *s, size_t i, size_t n) {
    while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n')) i++;
    return i;
}

/* Matches `ATTR="VALUE"` at s[*i..n); VALUE has no '"' and no "｜DSML｜" (header_len already
 * refused '<'). Returns a malloc'd VALUE or NULL. */
static char *attr(const char *s, size_t *i, size_t n, const char *name) {
    size_t k = skip_ws(s, *i, n), nl = strlen(name);
    if (n - k < nl + 2 || memcmp(s + k, name, nl) || s[k + nl] != '=' || s[k + nl + 1] != '"')
        return NULL;
    k += nl + 2;
    const char *q = memchr(s + k, '"', n - k);
    if (!q || memmem(s + k, (size_t)(q - (s + k)), OP_DSML, sizeof OP_DSML - 1)) return NULL;
    size_t vlen = (size_t)(q - (s + k));
    char *v = xmalloc(vlen + 1);
    memcpy(v, s + k, vlen);
    v[vlen] = '\0';
    *i = (size_t)(q - s) + 1;
    return v;
}

/* Header text up to '>' in p->in: returns its length, 0 if more input is needed, -1 if
 * malformed (a '<' first, no '>' in the first OP_HDR_MAX bytes, or final without '>'). Looks
 * only at the first OP_HDR_MAX + 1 bytes, so the outcome does not depend on the split. */
static long header_len(const op_parser *p, bool final) {
    size_t lim = p->in.len < OP_HDR_MAX + 1 ? p->in.len : OP_HDR_MAX + 1;
    const char *gt = memchr(p->in.p, '>', lim);
    const char *lt = memchr(p->in.p, '<', lim);
    if (gt && (!lt || lt > gt)) return (long)(gt - p->in.p);
    if (lt || p->in.len > OP_HDR_MAX || final) return -1;
    return 0;
}

static int step_inv_hdr(op_parser *p, bool final) {
    long hl = header_len(p, final);
    if (hl == 0) return 0;
    size_t i = 0;
    char *name = hl > 0 ? attr(p->in.p, &i, (size_t)hl, "name") : NULL;
    if (!name || skip_ws(p->in.p, i, (size_t)hl) != (size_t)hl || !*name) {
        free(name);
        fail(p);
        return 1;
    }
    chat_sb_consume(&p->in, (size_t)hl + 1);
    if (!accept_invoke(p, name)) {
        free(name);
        p->res.dropped_invokes++;
        p->state = S_INV_SKIP;
        return 1;
    }
    p->inv_open = true;
    p->inv_name = name;
    p->inv_index = p->n_started++;
    if (p->cfg.gen_id) p->cfg.gen_id(p->cfg.id_user, p->inv_id, sizeof p->inv_id);
    else default_id(p->inv_id, sizeof p->inv_id);
    if (!p->cfg.buffered) announce(p);
    p->state = S_INV_BODY;
    return 1;
}

static bool key_seen(const op_parser *p, const char *key) {
    for (size_t i = 0; i < p->inv_keys.len; i += strlen(p->inv_keys.p + i) + 1)
        if (!strcmp(p->inv_keys.p + i, key)) return true;
    return false;
}

static int step_par_hdr(op_parser *p, bool final) {
    long hl = header_len(p, final);
    if (hl == 0) return 0;
    size_t i = 0;
    char *key = hl > 0 ? attr(p->in.p, &i, (size_t)hl, "name") : NULL;
    char *str = key ? attr(p->in.p, &i, (size_t)hl, "string") : NULL;
    bool ok = str && (!strcmp(str, "true") || !strcmp(str, "false")) &&
              skip_ws(p->in.p, i, (size_t)hl) == (size_t)hl;
    bool is_str = ok && !strcmp(str, "true");
    free(str);
    if (!ok) {
        free(key);
        fail(p);
        return 1;
    }
    chat_sb_consume(&p->in, (size_t)hl + 1);
    if (key_seen(p, key)) {
        free(key);
        p->state = S_PAR_SKIP;
        return 1;
    }
    chat_sb_put(&p->inv_keys, key, strlen(key) + 1);
    chat_sb frag = {0};
    chat_sb_puts(&frag, p->inv_nparams++ ? ", " : "{");
    chat_pyjson_string(&frag, key, strlen(key));
    chat_sb_puts(&frag, is_str ? ": \"" : ": ");
    args_put(p, frag.p, frag.len);
    chat_sb_free(&frag);
    free(key);
    p->state = is_str ? S_PAR_STR : S_PAR_RAW;
    return 1;
}

/* ---------------------------------------------------------------- text states */

/* Drops an unfinished tool-block opener held at the very end (see outparse.h). */
static void drop_unfinished_opener(op_parser *p) {
    static const char open[] = "<" OP_DSML;
    const char *hit = memmem(p->in.p, p->in.len, open, sizeof open - 1);
    if (!hit) return;
    size_t at = (size_t)(hit - p->in.p);
    while (at > 0 && p->in.p[at - 1] == '\n') at--;
    p->res.dropped_bytes += p->in.len - at;
    p->in.len = at;
    p->in.p[at] = '\0';
}

static int step_text(op_parser *p, bool final) {
    op_event_kind kind = p->state == S_REASON ? OP_EV_REASONING : OP_EV_CONTENT;
    int ids[8 + OP_STOP_MAX];
    size_t nid = 0;
    ids[nid++] = MK_EOS;
    ids[nid++] = MK_THINK_END;
    ids[nid++] = MK_THINK;
    ids[nid++] = MK_BOS;
    ids[nid++] = MK_DSML;
    ids[nid++] = MK_OPEN0;
    if (tools_allowed(p)) {
        ids[nid++] = MK_OPEN1;
        ids[nid++] = MK_OPEN2;
    }
    if (final) drop_unfinished_opener(p);
    int c = p->barrier ? cross(p, ids, nid, final) : -1; /* markup only, not stop strings */
    if (c >= 0) return c;
    for (size_t j = 0; p->state == S_CONTENT && j < p->n_stops; j++)
        ids[nid++] = MK_COUNT + (int)j;
    size_t pos, safe;
    int which;
    if (!scan(p, ids, nid, final, &pos, &which, &safe)) {
        emit(p, kind, p->in.p, safe);
        chat_sb_consume(&p->in, safe);
        return 0;
    }
    if (which >= MK_COUNT) { /* a stop string in content: the choice ends here */
        const marker *m = mk(p, which);
        emit(p, kind, p->in.p, pos + (p->cfg.include_stop_str ? m->n : 0));
        p->res.stop_reason = m->s;
        p->state = S_DONE;
        chat_sb_clear(&p->in);
        return 0;
    }
    emit(p, kind, p->in.p, pos);
    chat_sb_consume(&p->in, pos + MARKERS[which].n);
    if (which == MK_THINK || which == MK_BOS || which == MK_DSML ||
        (which == MK_THINK_END && p->state == S_CONTENT) ||
        (which == MK_EOS && p->cfg.ignore_eos)) {
        p->barrier = true; /* structural spelling out of place: removed */
        return 1;
    }
    if (which == MK_EOS) on_eos(p);
    else if (which == MK_THINK_END) p->state = S_CONTENT;
    else p->state = S_BLOCK; /* one of the openers */
    return 1;
}

/* Appends a decided piece of a string="true" value, JSON-escaped. */
static void put_str_value(op_parser *p, const char *s, size_t n) {
    if (!n) return;
    chat_sb esc = {0};
    chat_pyjson_string(&esc, s, n);
    args_put(p, esc.p + 1, esc.len - 2); /* without the quotes */
    chat_sb_free(&esc);
}

static void finish_raw_value(op_parser *p) {
    json_t *v = p->raw.len ? json_loadb(p->raw.p, p->raw.len,
                                        JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL)
                           : NULL;
    if (v) {
        args_put(p, p->raw.p, p->raw.len);
    } else {
        p->res.repairs++;
        chat_sb q = {0};
        chat_pyjson_string(&q, p->raw.p ? p->raw.p : "", p->raw.len);
        args_put(p, q.p, q.len);
        chat_sb_free(&q);
    }
    json_decref(v);
    chat_sb_clear(&p->raw);
}

/* Values and skipped regions: text up to a closing marker. */
static int step_value(op_parser *p, bool final) {
    int ids[6], close = p->state == S_INV_SKIP ? MK_INV_CLOSE : MK_PARAM_CLOSE;
    bool value = p->state == S_PAR_STR || p->state == S_PAR_RAW;
    size_t nid = 0;
    ids[nid++] = MK_EOS;
    if (p->state != S_DISCARD && p->state != S_AFTER) ids[nid++] = close;
    if (value) {
        ids[nid++] = MK_DSML;
        ids[nid++] = MK_THINK_END;
        ids[nid++] = MK_THINK;
        ids[nid++] = MK_BOS;
    }
    int c = p->barrier ? cross(p, ids, nid, final) : -1;
    if (c >= 0) return c;
    size_t pos, safe;
    int which;
    int found = scan(p, ids, nid, final, &pos, &which, &safe);
    size_t n = found ? pos : safe;
    if (p->state == S_PAR_STR) put_str_value(p, p->in.p, n);
    else if (p->state == S_PAR_RAW) chat_sb_put(&p->raw, p->in.p, n);
    if (p->state == S_PAR_STR || p->state == S_PAR_RAW) tail_note(p, p->in.p, n);
    else if (p->state == S_DISCARD || p->state == S_AFTER) p->res.dropped_bytes += n;
    chat_sb_consume(&p->in, n);
    if (!found) return 0;
    chat_sb_consume(&p->in, MARKERS[which].n);
    if ((which == MK_EOS && p->cfg.ignore_eos) || which == MK_THINK_END || which == MK_THINK ||
        which == MK_BOS) {
        p->barrier = true; /* invisible EOS, or a structural spelling removed from a value */
    } else if (which == MK_EOS) {
        on_eos(p);
    } else if (which == MK_DSML) {
        fail(p);
    } else if (p->state == S_INV_SKIP) {
        p->state = S_BLOCK;
    } else {
        if (p->state == S_PAR_STR) args_put(p, "\"", 1);
        if (p->state == S_PAR_RAW) finish_raw_value(p);
        p->state = S_INV_BODY;
    }
    return 1;
}

/* Between tags: whitespace, then one of the expected tags (or EOS). */
static int step_struct(op_parser *p, bool final) {
    size_t ws = skip_ws(p->in.p, 0, p->in.len);
    chat_sb_consume(&p->in, ws);
    if (p->in.len == 0) return 0;
    int alts[3] = {MK_EOS, p->state == S_BLOCK ? MK_INVOKE : MK_PARAM,
                   p->state == S_BLOCK ? MK_BLOCK_CLOSE : MK_INV_CLOSE};
    bool pending = false;
    for (int k = 0; k < 3; k++) {
        const marker *m = &MARKERS[alts[k]];
        if (p->in.len >= m->n && !memcmp(p->in.p, m->s, m->n)) {
            chat_sb_consume(&p->in, m->n);
            if (alts[k] == MK_EOS) {
                if (!p->cfg.ignore_eos) on_eos(p);
            } else if (alts[k] == MK_INVOKE) p->state = S_INV_HDR;
            else if (alts[k] == MK_PARAM) p->state = S_PAR_HDR;
            else if (alts[k] == MK_BLOCK_CLOSE) p->state = S_AFTER;
            else close_invoke(p);
            return 1;
        }
        if (p->in.len < m->n && !memcmp(p->in.p, m->s, p->in.len)) pending = true;
    }
    if (pending && !final) return 0;
    fail(p);
    return 1;
}

static int step(op_parser *p, bool final) {
    switch (p->state) {
    case S_REASON:
    case S_CONTENT: return step_text(p, final);
    case S_BLOCK:
    case S_INV_BODY: return step_struct(p, final);
    case S_INV_HDR: return step_inv_hdr(p, final);
    case S_PAR_HDR: return step_par_hdr(p, final);
    case S_PAR_STR:
    case S_PAR_RAW:
    case S_PAR_SKIP:
    case S_INV_SKIP:
    case S_DISCARD:
    case S_AFTER: return step_value(p, final);
    default: /* S_DONE: everything after EOS is ignored */
        chat_sb_clear(&p->in);
        return 0;
    }
}

static void run(op_parser *p, bool final) {
    while (p->in.len > 0 && step(p, final)) {
    }
}

void op_feed(op_parser *p, const char *text, size_t len) {
    if (p->finished || p->state == S_DONE || !len) return;
    if (p->n_u8) { /* the incomplete tail of the previous feed goes first */
        chat_sb joined = {0};
        chat_sb_put(&joined, (const char *)p->u8, p->n_u8);
        chat_sb_put(&joined, text, len);
        p->n_u8 = 0;
        u8_append(p, (const unsigned char *)joined.p, joined.len, false);
        chat_sb_free(&joined);
    } else {
        u8_append(p, (const unsigned char *)text, len, false);
    }
    run(p, false);
}

/* ---------------------------------------------------------------- finish */

const op_result *op_finish(op_parser *p, op_end end) {
    if (p->finished) return &p->res;
    if (p->n_u8 && p->state != S_DONE) {
        u8_append(p, p->u8, p->n_u8, true);
        p->n_u8 = 0;
    }
    if (p->state != S_DONE) run(p, true);
    if (p->inv_open) p->res.dropped_invokes++; /* left open: never reported */
    inv_reset(p);
    p->finished = true;
    op_result *r = &p->res;
    r->reasoning = p->reasoning.p ? p->reasoning.p : "";
    r->reasoning_len = p->reasoning.len;
    r->content = p->content.p ? p->content.p : "";
    r->content_len = p->content.len;
    r->calls = p->calls;
    r->n_calls = p->n_calls;
    r->eos_seen = p->eos_seen;
    r->required_unmet = (p->cfg.tool_choice == OP_TOOLS_REQUIRED ||
                         p->cfg.tool_choice == OP_TOOLS_NAMED) && p->n_calls == 0;
    if (end == OP_END_LENGTH) r->finish_reason = "length";
    else if (end == OP_END_ABORT) r->finish_reason = "abort";
    else r->finish_reason = p->n_calls ? "tool_calls" : "stop";
    return r;
}
