/*
 * json.c — the strict pull-style JSON reader declared in json.h. Every read is
 * bounded by `end`; every decoded byte is bounded by the arena's capacity.
 */
#include "io/json.h"
#include "io/io_internal.h"

#include <stdio.h>
#include <string.h>

void dsmoe__json_init(dsmoe__json *j, const void *s, size_t n, size_t base, const char *what,
                      char *arena, size_t arena_cap) {
    memset(j, 0, sizeof *j);
    j->s = (const unsigned char *)s;
    j->end = n;
    j->base = base;
    j->what = what;
    j->arena = arena;
    j->arena_cap = arena_cap;
}

dsmoe_status dsmoe__json_fail(const dsmoe__json *j, size_t at, const char *fmt, ...) {
    char msg[640];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return dsmoe__error(DSMOE_STATUS_FORMAT, "%s at byte %zu: %s", j->what, j->base + at, msg);
}

static void json_ws(dsmoe__json *j) {
    while (j->pos < j->end) {
        unsigned char c = j->s[j->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        j->pos++;
    }
}

size_t dsmoe__json_offset(dsmoe__json *j) {
    json_ws(j);
    return j->base + j->pos;
}

dsmoe__json_kind dsmoe__json_peek(dsmoe__json *j) {
    json_ws(j);
    if (j->pos >= j->end) return DSMOE__JSON_END;
    unsigned char c = j->s[j->pos];
    switch (c) {
    case '{': return DSMOE__JSON_OBJECT;
    case '[': return DSMOE__JSON_ARRAY;
    case '"': return DSMOE__JSON_STRING;
    case 't':
    case 'f': return DSMOE__JSON_BOOL;
    case 'n': return DSMOE__JSON_NULL;
    default: return (c == '-' || (c >= '0' && c <= '9')) ? DSMOE__JSON_NUMBER : DSMOE__JSON_INVALID;
    }
}

const char *dsmoe__json_found(dsmoe__json *j, char *buf, size_t cap) {
    static const char *const names[] = {"the end of the input", "an object", "an array",
                                        "a string", "a number", "true/false", "null"};
    dsmoe__json_kind k = dsmoe__json_peek(j);
    if (k == DSMOE__JSON_INVALID || k == DSMOE__JSON_BOOL || k == DSMOE__JSON_NULL) {
        /* Show the bytes themselves: they may be a bare word like True or NaN. */
        size_t n = j->end - j->pos < 12 ? j->end - j->pos : 12;
        char ex[48];
        snprintf(buf, cap, "'%s'", dsmoe__excerpt(j->s + j->pos, n, ex, sizeof ex));
        return buf;
    }
    snprintf(buf, cap, "%s", names[k]);
    return buf;
}

dsmoe_status dsmoe__json_begin(dsmoe__json *j, char open, const char *what) {
    char f[64];
    if (dsmoe__json_peek(j) != (open == '{' ? DSMOE__JSON_OBJECT : DSMOE__JSON_ARRAY))
        return dsmoe__json_fail(j, j->pos, "%s must be %s, found %s", what,
                                open == '{' ? "an object" : "an array",
                                dsmoe__json_found(j, f, sizeof f));
    if (j->depth >= DSMOE__JSON_MAX_DEPTH)
        return dsmoe__json_fail(j, j->pos, "nesting deeper than %d levels", DSMOE__JSON_MAX_DEPTH);
    j->closer[j->depth] = open == '{' ? '}' : ']';
    j->has_items[j->depth] = 0;
    j->depth++;
    j->pos++;
    return DSMOE_OK;
}

dsmoe_status dsmoe__json_next(dsmoe__json *j, int *more) {
    *more = 0;
    if (j->depth <= 0) return dsmoe__json_fail(j, j->pos, "internal: no open object or array");
    int top = j->depth - 1;
    char close = j->closer[top];
    json_ws(j);
    if (j->pos >= j->end)
        return dsmoe__json_fail(j, j->pos, "unexpected end of input: missing '%c'", close);
    unsigned char c = j->s[j->pos];
    if (c == (unsigned char)close) {
        j->pos++;
        j->depth--;
        return DSMOE_OK;
    }
    if (j->has_items[top]) {
        if (c != ',') {
            char f[64];
            return dsmoe__json_fail(j, j->pos, "expected ',' or '%c', found %s", close,
                                    dsmoe__json_found(j, f, sizeof f));
        }
        j->pos++;
        json_ws(j);
        if (j->pos < j->end && j->s[j->pos] == (unsigned char)close)
            return dsmoe__json_fail(j, j->pos, "trailing comma before '%c'", close);
    }
    j->has_items[top] = 1;
    *more = 1;
    return DSMOE_OK;
}

dsmoe_status dsmoe__json_next_member(dsmoe__json *j, int *more, const char **key, size_t *key_len,
                                     size_t *key_at) {
    dsmoe_status s = dsmoe__json_next(j, more);
    if (s != DSMOE_OK || !*more) return s;
    char f[64];
    *key_at = dsmoe__json_offset(j);
    if (dsmoe__json_peek(j) != DSMOE__JSON_STRING)
        return dsmoe__json_fail(j, j->pos, "expected a quoted member name, found %s",
                                dsmoe__json_found(j, f, sizeof f));
    if ((s = dsmoe__json_string(j, key, key_len)) != DSMOE_OK) return s;
    json_ws(j);
    if (j->pos >= j->end || j->s[j->pos] != ':')
        return dsmoe__json_fail(j, j->pos, "expected ':' after a member name, found %s",
                                dsmoe__json_found(j, f, sizeof f));
    j->pos++;
    return DSMOE_OK;
}

static int json_hex4(const unsigned char *p, uint32_t *out) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = p[i];
        uint32_t d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return 0;
        v = v << 4 | d;
    }
    *out = v;
    return 1;
}

/* Appends n bytes to the arena. The arena is sized so this cannot fail for a
 * well-behaved caller; the check keeps a wrong size from becoming an overrun. */
static int json_put(dsmoe__json *j, const void *p, size_t n) {
    if (n > j->arena_cap - j->arena_used) return 0;
    memcpy(j->arena + j->arena_used, p, n);
    j->arena_used += n;
    return 1;
}

static size_t json_utf8_encode(uint32_t cp, unsigned char *o) {
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | cp >> 6);
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | cp >> 12);
        o[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | cp >> 18);
    o[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
    o[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

dsmoe_status dsmoe__json_string(dsmoe__json *j, const char **str, size_t *len) {
    char f[64];
    if (dsmoe__json_peek(j) != DSMOE__JSON_STRING)
        return dsmoe__json_fail(j, j->pos, "expected a string, found %s",
                                dsmoe__json_found(j, f, sizeof f));
    size_t open = j->pos++;
    size_t start = j->arena_used;
    for (;;) {
        if (j->pos >= j->end) return dsmoe__json_fail(j, open, "unterminated string");
        const unsigned char *p = j->s + j->pos;
        unsigned char c = *p;
        if (c == '"') {
            j->pos++;
            break;
        }
        if (c < 0x20)
            return dsmoe__json_fail(j, j->pos, "unescaped control character 0x%02x in a string", c);
        if (c != '\\') {
            size_t k = dsmoe__utf8_seq(p, j->end - j->pos);
            if (k == 0) return dsmoe__json_fail(j, j->pos, "invalid UTF-8 in a string");
            if (!json_put(j, p, k)) goto arena_full;
            j->pos += k;
            continue;
        }
        if (j->end - j->pos < 2) return dsmoe__json_fail(j, open, "unterminated string");
        unsigned char e = p[1], out[4];
        size_t n = 1;
        switch (e) {
        case '"': out[0] = '"'; break;
        case '\\': out[0] = '\\'; break;
        case '/': out[0] = '/'; break;
        case 'b': out[0] = '\b'; break;
        case 'f': out[0] = '\f'; break;
        case 'n': out[0] = '\n'; break;
        case 'r': out[0] = '\r'; break;
        case 't': out[0] = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (j->end - j->pos < 6 || !json_hex4(p + 2, &cp))
                return dsmoe__json_fail(j, j->pos, "\\u must be followed by 4 hex digits");
            size_t used = 6;
            if (cp >= 0xD800 && cp <= 0xDBFF) { /* high surrogate: a low one must follow */
                if (j->end - j->pos < 12 || p[6] != '\\' || p[7] != 'u' || !json_hex4(p + 8, &lo) ||
                    lo < 0xDC00 || lo > 0xDFFF)
                    return dsmoe__json_fail(j, j->pos, "lone UTF-16 surrogate \\u%04X in a string",
                                            (unsigned)cp);
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                used = 12;
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                return dsmoe__json_fail(j, j->pos, "lone UTF-16 surrogate \\u%04X in a string",
                                        (unsigned)cp);
            } else if (cp == 0) {
                return dsmoe__json_fail(j, j->pos, "\\u0000 (NUL) in a string is not supported");
            }
            n = json_utf8_encode(cp, out);
            if (!json_put(j, out, n)) goto arena_full;
            j->pos += used;
            continue;
        }
        default: {
            char ex[16];
            return dsmoe__json_fail(j, j->pos, "invalid escape '\\%s' in a string",
                                    dsmoe__excerpt(&e, 1, ex, sizeof ex));
        }
        }
        if (!json_put(j, out, n)) goto arena_full;
        j->pos += 2;
    }
    if (!json_put(j, "", 1)) goto arena_full;
    *str = j->arena + start;
    *len = j->arena_used - start - 1;
    return DSMOE_OK;
arena_full:
    return dsmoe__json_fail(j, open, "internal: string arena exhausted");
}

dsmoe_status dsmoe__json_uint(dsmoe__json *j, const char *what, uint64_t *v) {
    char f[64];
    dsmoe__json_kind k = dsmoe__json_peek(j);
    if (k != DSMOE__JSON_NUMBER)
        return dsmoe__json_fail(j, j->pos, "%s must be a non-negative integer, found %s", what,
                                dsmoe__json_found(j, f, sizeof f));
    size_t start = j->pos;
    if (j->s[j->pos] == '-')
        return dsmoe__json_fail(j, start, "%s must be a non-negative integer, found a negative number",
                                what);
    uint64_t x = 0;
    int overflow = 0;
    while (j->pos < j->end && j->s[j->pos] >= '0' && j->s[j->pos] <= '9') {
        unsigned d = (unsigned)(j->s[j->pos] - '0');
        if (x > (UINT64_MAX - d) / 10) overflow = 1;
        x = x * 10 + d;
        j->pos++;
    }
    if (j->pos - start > 1 && j->s[start] == '0')
        return dsmoe__json_fail(j, start, "%s: numbers may not have leading zeros", what);
    if (j->pos < j->end && (j->s[j->pos] == '.' || j->s[j->pos] == 'e' || j->s[j->pos] == 'E'))
        return dsmoe__json_fail(j, start, "%s must be an integer, found a fraction or exponent", what);
    if (overflow) return dsmoe__json_fail(j, start, "%s is too large (above 2^64 - 1)", what);
    *v = x;
    return DSMOE_OK;
}

dsmoe_status dsmoe__json_finish(dsmoe__json *j) {
    char f[64];
    if (dsmoe__json_peek(j) != DSMOE__JSON_END)
        return dsmoe__json_fail(j, j->pos, "unexpected %s after the end of the JSON value",
                                dsmoe__json_found(j, f, sizeof f));
    return DSMOE_OK;
}
