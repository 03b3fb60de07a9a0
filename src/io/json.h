/*
 * json.h — a strict, pull-style JSON reader for untrusted input (RFC 8259).
 *
 * The caller walks the document it expects: dsmoe__json_begin() opens an object
 * or array, dsmoe__json_next() / dsmoe__json_next_member() step through it,
 * dsmoe__json_string() and dsmoe__json_uint() read scalars, and
 * dsmoe__json_finish() checks that only whitespace follows. Anything the caller
 * did not ask for is an error, so the accepted language is a subset of JSON:
 * no comments, no trailing commas, no single quotes, no NaN, no leading zeros.
 * Strings are decoded (all escapes, \uXXXX with surrogate pairs) into an arena
 * the caller provides, checked to be valid UTF-8 and NUL-free (\u0000 is refused
 * so decoded strings are C strings). Nesting is limited to DSMOE__JSON_MAX_DEPTH.
 * Errors are DSMOE_STATUS_FORMAT with "<what> at byte <offset>: <problem>".
 *
 * Nothing here allocates: memory use is the caller's arena, which needs at most
 * as many bytes as the input (each decoded string plus its NUL is shorter than
 * its quoted form).
 */
#ifndef DSMOE_JSON_H
#define DSMOE_JSON_H

#include "core/internal.h"
#include "dsmoe/io.h"

#include <stddef.h>
#include <stdint.h>

#define DSMOE__JSON_MAX_DEPTH 64

typedef enum dsmoe__json_kind {
    DSMOE__JSON_END,     /* no more input */
    DSMOE__JSON_OBJECT,
    DSMOE__JSON_ARRAY,
    DSMOE__JSON_STRING,
    DSMOE__JSON_NUMBER,
    DSMOE__JSON_BOOL,
    DSMOE__JSON_NULL,
    DSMOE__JSON_INVALID  /* a byte no JSON value starts with */
} dsmoe__json_kind;

typedef struct dsmoe__json {
    const unsigned char *s; /* input */
    size_t pos, end;
    size_t base;            /* file offset of s[0], for messages */
    const char *what;       /* message prefix, e.g. "safetensors header" */
    char *arena;            /* decoded strings */
    size_t arena_used, arena_cap;
    int depth;
    char closer[DSMOE__JSON_MAX_DEPTH];    /* '}' or ']' per open level */
    char has_items[DSMOE__JSON_MAX_DEPTH]; /* an item was read at that level */
} dsmoe__json;

void dsmoe__json_init(dsmoe__json *j, const void *s, size_t n, size_t base, const char *what,
                      char *arena, size_t arena_cap);
/* Kind of the next value, judged by its first byte (whitespace skipped). */
dsmoe__json_kind dsmoe__json_peek(dsmoe__json *j);
/* File offset of the next non-blank byte. */
size_t dsmoe__json_offset(dsmoe__json *j);
/* Describes the next token for a message: "an array", "the end of the input",
 * "'x...'"; writes into buf and returns it. */
const char *dsmoe__json_found(dsmoe__json *j, char *buf, size_t cap);
/* Formats a FORMAT error "<what> at byte <at>: ...". */
dsmoe_status dsmoe__json_fail(const dsmoe__json *j, size_t at, const char *fmt, ...)
    DSMOE__PRINTF(3, 4);

/* Opens an object ('{') or array ('['); `what` names the value for messages. */
dsmoe_status dsmoe__json_begin(dsmoe__json *j, char open, const char *what);
/* Steps inside the innermost array: *more = 1 before each element (consuming the
 * separating comma), 0 after consuming the closing bracket. */
dsmoe_status dsmoe__json_next(dsmoe__json *j, int *more);
/* Same for an object; when *more = 1 also reads the member's key (decoded into
 * the arena) and the ':' after it, and sets *key_at to the key's file offset. */
dsmoe_status dsmoe__json_next_member(dsmoe__json *j, int *more, const char **key, size_t *key_len,
                                     size_t *key_at);
/* Reads a string into the arena (NUL-terminated; *len excludes the NUL). */
dsmoe_status dsmoe__json_string(dsmoe__json *j, const char **str, size_t *len);
/* Reads a non-negative integer that fits in uint64_t; a minus sign, fraction or
 * exponent is an error, as is overflow. `what` names the value for messages. */
dsmoe_status dsmoe__json_uint(dsmoe__json *j, const char *what, uint64_t *v);
/* Checks that only whitespace remains (call after the top-level value). */
dsmoe_status dsmoe__json_finish(dsmoe__json *j);

#endif /* DSMOE_JSON_H */
