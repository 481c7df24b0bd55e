/* pyjson.c — Python-compatible json.dumps (see pyjson.h). Must never emit invalid JSON and
 * never change key order. */
#include "coordinator/chat/pyjson.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"

#define PYJSON_MAX_DEPTH 512

void chat_pyjson_string(chat_sb *out, const char *s, size_t n) {
    chat_sb_putc(out, '"');
    size_t run = 0; /* start of the pending run of bytes that need no escaping */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char ubuf[8];
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        default:
            if (c < 0x20) {
                snprintf(ubuf, sizeof ubuf, "\\u%04x", c);
                esc = ubuf;
            }
        }
        if (!esc) continue;
        chat_sb_put(out, s + run, i - run);
        chat_sb_puts(out, esc);
        run = i + 1;
    }
    chat_sb_put(out, s + run, n - run);
    chat_sb_putc(out, '"');
}

/* Shortest "%.*e" rendering of d that reads back as d; returns the digit count. */
static int shortest_e(double d, char *buf, size_t buflen) {
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, buflen, "%.*e", prec - 1, d);
        if (strtod(buf, NULL) == d) return prec;
    }
    return 17;
}

void chat_pyjson_real(chat_sb *out, double d) {
    if (d == 0) {
        chat_sb_puts(out, signbit(d) ? "-0.0" : "0.0");
        return;
    }
    char buf[64];
    shortest_e(d, buf, sizeof buf);
    /* buf = [-]D[.DDD]e(+|-)XX ; split into sign, digits and decimal exponent */
    const char *p = buf;
    int neg = (*p == '-');
    if (neg) p++;
    char digits[32];
    size_t nd = 0;
    for (; *p && *p != 'e'; p++)
        if (*p != '.') digits[nd++] = *p;
    digits[nd] = '\0';
    int exp10 = atoi(p + 1); /* value = 0.D1D2... * 10^(exp10+1) */
    if (neg) chat_sb_putc(out, '-');
    if (exp10 < -4 || exp10 >= 16) {
        chat_sb_putc(out, digits[0]);
        if (nd > 1) {
            chat_sb_putc(out, '.');
            chat_sb_put(out, digits + 1, nd - 1);
        }
        chat_sb_printf(out, "e%c%02d", exp10 < 0 ? '-' : '+', abs(exp10));
    } else if (exp10 < 0) {
        chat_sb_puts(out, "0.");
        for (int i = 0; i < -exp10 - 1; i++) chat_sb_putc(out, '0');
        chat_sb_put(out, digits, nd);
    } else {
        size_t ip = (size_t)exp10 + 1; /* digits before the point */
        for (size_t i = 0; i < ip; i++) chat_sb_putc(out, i < nd ? digits[i] : '0');
        chat_sb_putc(out, '.');
        if (nd > ip)
            chat_sb_put(out, digits + ip, nd - ip);
        else
            chat_sb_putc(out, '0');
    }
}

static int dumps(chat_sb *out, const json_t *v, int depth, char *err, size_t errlen) {
    if (depth > PYJSON_MAX_DEPTH)
        return duet_err(err, errlen, DUET_EINVAL,
                        "JSON value nests deeper than %d levels; flatten it", PYJSON_MAX_DEPTH);
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        const char *key;
        json_t *val;
        int first = 1;
        chat_sb_putc(out, '{');
        json_object_foreach((json_t *)v, key, val) {
            if (!first) chat_sb_puts(out, ", ");
            first = 0;
            chat_pyjson_string(out, key, strlen(key));
            chat_sb_puts(out, ": ");
            int rc = dumps(out, val, depth + 1, err, errlen);
            if (rc) return rc;
        }
        chat_sb_putc(out, '}');
        return 0;
    }
    case JSON_ARRAY: {
        chat_sb_putc(out, '[');
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i) chat_sb_puts(out, ", ");
            int rc = dumps(out, json_array_get(v, i), depth + 1, err, errlen);
            if (rc) return rc;
        }
        chat_sb_putc(out, ']');
        return 0;
    }
    case JSON_STRING:
        chat_pyjson_string(out, json_string_value(v), json_string_length(v));
        return 0;
    case JSON_INTEGER:
        chat_sb_printf(out, "%lld", (long long)json_integer_value(v));
        return 0;
    case JSON_REAL:
        chat_pyjson_real(out, json_real_value(v));
        return 0;
    case JSON_TRUE: chat_sb_puts(out, "true"); return 0;
    case JSON_FALSE: chat_sb_puts(out, "false"); return 0;
    case JSON_NULL: chat_sb_puts(out, "null"); return 0;
    }
    return duet_err(err, errlen, DUET_EINVAL, "JSON value of unknown type");
}

int chat_pyjson_dumps(chat_sb *out, const json_t *v, char *err, size_t errlen) {
    return dumps(out, v, 0, err, errlen);
}
