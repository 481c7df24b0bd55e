/* encoder.h — DeepSeek-V4 chat prompt encoder: OpenAI-style messages → prompt TEXT.
 *
 * Why: the model only understands the exact prompt layout of the official encoding_dsv4.py
 * (model spec §5.4); one byte off changes tokens and quality, and breaks prefix caching. This
 * module reproduces that layout from the request's jansson values. Special tokens appear as
 * their spellings ("<｜User｜>"); the tokenizer (coordinator/tokenizer) turns them into ids.
 * It must never crash or abort on bad input: every problem is reported as a sentence naming
 * the offending field ("messages[2].role: unknown role 'bot'").
 *
 * Input (all borrowed, never modified; load JSON with JSON_PRESERVE_ORDER so tool schemas keep
 * their key order):
 *   messages         array of {role, content, ...}. Roles: system, user, assistant, tool,
 *                    latest_reminder, developer (the encoder's internal "user-like" role; set
 *                    developer_as_system for the OpenAI meaning, server-api §3.2).
 *                    content: string, null, or an array of {"type":"text","text":S} parts
 *                    (joined with "\n"; for tool messages joined with "\n\n" like the official
 *                    encoder). assistant: reasoning_content (or alias reasoning), tool_calls
 *                    [{id?, type?, function:{name, arguments: JSON string or object}}].
 *                    tool: tool_call_id (optional here; unknown ids keep their given order).
 *                    Extensions of the official format accepted per message: tools (system /
 *                    developer), response_format (raw schema, dumped as is), task
 *                    (action|query|authority|domain|title|read_url).
 *   tools            OpenAI tools array or NULL: each function object is rendered into the
 *                    first system message (an empty one is inserted at index 0 if none).
 *   response_format  OpenAI {"type":"text"|"json_object"|"json_schema",...} or NULL; the schema
 *                    ({"type": "object"} for json_object) is attached the same way.
 */
#ifndef DUET_CHAT_ENCODER_H
#define DUET_CHAT_ENCODER_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

typedef enum {
    ENC_FLAVOUR_PREVIEW = 0, /* preview / DSpark encoder: max → P_ABS, high/low → no prefix */
    ENC_FLAVOUR_0731 = 1     /* 0731 encoder: low → none, high → P_ABS, max → P_BEYOND */
} enc_flavour;

typedef enum { ENC_EFFORT_LOW = 0, ENC_EFFORT_HIGH = 1, ENC_EFFORT_MAX = 2 } enc_effort;

typedef struct {
    const json_t *messages;        /* array, >= 1 element */
    const json_t *tools;           /* array or NULL */
    const json_t *response_format; /* object or NULL */
    bool thinking;                 /* true: thinking mode (prompt ends "<think>"); false: chat */
    enc_effort effort;             /* used only when thinking */
    enc_flavour flavour;
    bool drop_thinking;       /* official default true; ignored when any tools are present */
    bool developer_as_system; /* true: role developer is rendered as system (server-api §3.2) */
} enc_request;

/* Defaults: thinking on, effort low, flavour 0731, drop_thinking true, developer internal. */
void enc_request_init(enc_request *req);

/* Renders the prompt. On success *out_text is a NUL-terminated xmalloc'd string (free() it)
 * of *out_len bytes, starting with "<｜begin▁of▁sentence｜>". Returns 0, or DUET_EINVAL with err
 * naming the field. */
int enc_render(const enc_request *req, char **out_text, size_t *out_len, char *err,
               size_t errlen);

/* The reasoning-effort prefix written right after BOS in thinking mode ("" when none). */
const char *enc_effort_prefix(enc_flavour flavour, enc_effort effort);

/* Parses "low"/"high"/"max" (returns 0) — anything else returns DUET_EINVAL. */
int enc_effort_parse(const char *s, enc_effort *out);

#endif
