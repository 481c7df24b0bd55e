/* outparse.h — streaming parser of DeepSeek-V4 model output into OpenAI-style deltas.
 *
 * Why: the model writes one text stream — reasoning, "</think>", content, then an optional DSML
 * tool block (model spec §5.5). Clients want separate reasoning / content / tool_calls deltas
 * as tokens arrive (server-api §4). This parser is fed the decoded text of each token, in any
 * split, and calls back with deltas; it also keeps the non-streaming totals. It must never let
 * markup ("｜DSML｜", "</think>", EOS) leak into content, reasoning or arguments, never report a
 * completed call whose arguments are not valid JSON, and never crash on any input bytes.
 *
 * Guarantees (tested, and fuzzed by tests/fuzz):
 *  - the final result does not depend on how the text was split into op_feed calls;
 *  - the deltas of one kind joined equal the final field (content, reasoning, each call's
 *    arguments) — except that a call dropped later (malformed block, EOS or end mid-invoke) may
 *    have sent a header and fragments in incremental mode (server-api §4.4);
 *  - all emitted text is valid UTF-8 (each maximal invalid subpart of the input becomes one
 *    U+FFFD; an incomplete sequence is held back, and becomes U+FFFD at op_finish);
 *  - every completed call's arguments is one JSON object "{"KEY": VALUE, ...}" (", " and ": "
 *    separators, keys in generated order, "{}" without parameters).
 *
 * Decisions where the specs are silent (see also tests/chat/README.md):
 *  - whitespace (space, \t, \r, \n) is accepted wherever the grammar has "\n" between tags;
 *  - a string="false" value that is not valid JSON (by jansson) is sent as a JSON string
 *    (op_result.repairs counts it); an empty one becomes "";
 *  - a repeated parameter name: the later parameter is skipped entirely;
 *  - an invoke whose name is not declared (tool_names), or any invoke after the first with
 *    parallel_tool_calls=false or a named tool_choice, or whose name differs from the named
 *    tool: skipped, no delta at all (dropped_invokes counts it);
 *  - malformed markup inside the block (unknown tag, "｜DSML｜" inside a value, a header without
 *    name="..."): the open invoke is dropped, everything up to EOS is dropped, parse_failures++;
 *  - text after "</｜DSML｜tool_calls>" other than EOS is dropped (dropped_bytes counts it);
 *  - structural spellings in text (BOS, "<think>", a second "</think>", a stray "｜DSML｜" in
 *    content/reasoning; BOS, "<think>", "</think>" inside parameter values) are removed, and
 *    so is a marker that only appears across the gap left by a removal ("<｜e" + removed +
 *    "nd▁of▁sentence｜>"), so no markup can be spelled by the released text;
 *  - tool_choice none: no "\n"/"\n\n" holdback; a block that appears anyway (mask failure) is
 *    consumed and its calls are dropped;
 *  - a stop string is matched on content as the parser releases it: one spelled only across
 *    the gap of a removed structural spelling does not match; after a match the choice ends
 *    (further input is ignored) and op_eos_seen stays false — op_stopped() says so;
 *  - at op_finish, held-back text is released as text, except an unfinished tool-block opener
 *    (held text containing "<｜DSML｜"), which is dropped with its leading newlines.
 */
#ifndef DUET_CHAT_OUTPARSE_H
#define DUET_CHAT_OUTPARSE_H

#include <stdbool.h>
#include <stddef.h>

typedef enum {
    OP_TOOLS_AUTO = 0, /* calls parsed if the model writes a block */
    OP_TOOLS_NONE,     /* no calls are ever reported */
    OP_TOOLS_REQUIRED, /* like auto; op_result.required_unmet when the turn ends without one */
    OP_TOOLS_NAMED     /* only named_tool, at most one call */
} op_tool_choice;

typedef enum {
    OP_EV_REASONING,  /* text: reasoning delta */
    OP_EV_CONTENT,    /* text: content delta */
    OP_EV_TOOL_START, /* index, id, name: a new call (arguments "" so far) */
    OP_EV_TOOL_ARGS   /* index, text: an arguments fragment */
} op_event_kind;

typedef struct {
    op_event_kind kind;
    size_t index;     /* tool-call index within the choice (0, 1, ...) for TOOL_* */
    const char *id;   /* TOOL_START: "call_..." */
    const char *name; /* TOOL_START */
    const char *text; /* REASONING / CONTENT / TOOL_ARGS: valid UTF-8, not NUL-terminated */
    size_t len;       /* bytes in text (> 0) */
} op_event;

/* Pointers in ev are valid only during the call. */
typedef void (*op_emit_fn)(void *user, const op_event *ev);
/* Writes a NUL-terminated call id (at most outlen-1 bytes) into out. */
typedef void (*op_id_fn)(void *user, char *out, size_t outlen);

typedef struct {
    bool thinking; /* the prompt ended in "<think>": output starts in reasoning */
    op_tool_choice tool_choice;
    const char *named_tool;        /* OP_TOOLS_NAMED: the function name */
    const char *const *tool_names; /* declared names; NULL = accept any name */
    size_t n_tool_names;
    bool parallel_tool_calls; /* false: at most one call */
    bool buffered;  /* tool_stream=buffered: each call sent whole when its invoke closes */
    bool ignore_eos; /* EOS is invisible and parsing continues */
    const char *const *stop; /* stop strings, matched in content only (never in reasoning or
                                arguments); empty ones skipped, at most 16 used; borrowed */
    size_t n_stop;
    bool include_stop_str; /* the matched stop string stays in content */
    op_emit_fn emit; /* may be NULL (non-streaming) */
    void *emit_user;
    op_id_fn gen_id; /* NULL: "call_" + 24 random [A-Za-z0-9] from getrandom() */
    void *id_user;
} op_config;

typedef enum {
    OP_END_STOP = 0, /* EOS, a stop string or a stop token id */
    OP_END_LENGTH,   /* max_tokens or the context end */
    OP_END_ABORT     /* operator abort or drain deadline */
} op_end;

typedef struct {
    char *id;
    char *name;
    char *arguments; /* valid JSON object text */
    size_t arguments_len;
} op_call;

typedef struct {
    const char *reasoning; /* NUL-terminated; "" in chat mode */
    size_t reasoning_len;
    const char *content; /* NUL-terminated */
    size_t content_len;
    const op_call *calls; /* completed calls only, in index order */
    size_t n_calls;
    const char *finish_reason; /* "stop", "length", "tool_calls" or "abort" */
    bool eos_seen;
    const char *stop_reason; /* the matched stop string (points into cfg.stop), or NULL */
    bool required_unmet;    /* REQUIRED/NAMED and no call completed */
    size_t dropped_invokes; /* skipped by name/parallel rules, malformed, or left open */
    size_t parse_failures;  /* malformed blocks */
    size_t repairs;         /* string="false" values sent as strings */
    size_t dropped_bytes;   /* text dropped after the block or after a parse failure */
} op_result;

typedef struct op_parser op_parser;

/* thinking=false, tool_choice auto, parallel_tool_calls=true, everything else off/NULL. */
void op_config_init(op_config *cfg);
/* The parser copies cfg (tool_names/named_tool are borrowed and must outlive it). */
op_parser *op_new(const op_config *cfg);
void op_free(op_parser *p);
/* Feeds len bytes of generated text. Text after EOS (without ignore_eos) or after op_finish
 * is ignored. Never fails on any bytes. */
void op_feed(op_parser *p, const char *text, size_t len);
/* True once EOS was seen (generation should stop). */
bool op_eos_seen(const op_parser *p);
/* True once EOS or a stop string ended the choice (generation should stop). */
bool op_stopped(const op_parser *p);
/* Flushes held-back text, drops an open call, decides the finish reason. The result belongs
 * to the parser (valid until op_free). Calling it twice returns the same result. */
const op_result *op_finish(op_parser *p, op_end end);

#endif
