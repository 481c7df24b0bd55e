/* pyjson.h — JSON text exactly as Python's json.dumps(value, ensure_ascii=False) writes it.
 *
 * Why: the DeepSeek-V4 prompt embeds tool schemas, response-format schemas and non-string tool
 * arguments as Python json.dumps output (separators ", " and ": ", keys in the object's own
 * order, non-ASCII kept raw). A byte of difference changes the prompt tokens, so this must
 * match Python byte for byte for every value jansson can hold. It must never reorder keys
 * (load input with JSON_PRESERVE_ORDER) and never emit invalid JSON.
 *
 * Limits (documented differences from Python, all on input jansson cannot represent):
 *  - integers outside int64 and reals that overflow double are rejected by jansson at load time,
 *    where Python would keep a big integer or write Infinity;
 *  - NaN / Infinity cannot occur (jansson refuses them), so they are never written;
 *  - a real is written like Python's repr(float): shortest round-trip digits, exponent form
 *    when the decimal exponent is < -4 or >= 16 ("1e-05", "1e+16"), otherwise fixed form with
 *    at least one fractional digit ("100.0", "-0.0").
 */
#ifndef DUET_CHAT_PYJSON_H
#define DUET_CHAT_PYJSON_H

#include <jansson.h>
#include <stddef.h>

#include "coordinator/chat/sbuf.h"

/* Appends json.dumps(v, ensure_ascii=False). Returns 0, or DUET_EINVAL when v nests deeper
 * than 512 levels (err says so). */
int chat_pyjson_dumps(chat_sb *out, const json_t *v, char *err, size_t errlen);
/* Appends a JSON string literal of the n bytes at s (quotes included), escaping `"`, `\` and
 * control characters the way Python does (\n \r \t \b \f, others \u00xx lowercase). */
void chat_pyjson_string(chat_sb *out, const char *s, size_t n);
/* Appends Python's repr() of a finite double. */
void chat_pyjson_real(chat_sb *out, double d);

#endif
