/*
 * npy.c — NumPy .npy arrays (format versions 1.0, 2.0, 3.0).
 *
 * Layout: the magic "\x93NUMPY", a major and a minor version byte, the header
 * length (uint16 LE in 1.0, uint32 LE in 2.0 and 3.0), then the header: a Python
 * dict literal such as
 *     {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
 * padded with spaces and ended by '\n', then the raw array data.
 *
 * The header is read by a small strict parser of exactly that literal subset
 * (strings in single or double quotes without escapes, True/False, tuples of
 * non-negative decimal integers; any whitespace; trailing commas; keys in any
 * order) — never by sscanf. Every error names the problem and its file offset.
 * The data section must end exactly at the end of the input: trailing bytes are
 * rejected (a truncated or concatenated file is more likely than a valid one).
 */
#include "io/io_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NPY_MAGIC "\x93NUMPY"
#define NPY_MAGIC_LEN 6
#define NPY_MAX_HEADER ((size_t)64 * 1024)
#define NPY_MAX_DATA ((size_t)1 << 40)
#define NPY_ALIGN 64
/* NumPy >= 1.23 leaves room after the header for the leading axis to grow. */
#define NPY_GROWTH_DIGITS 21

/* The supported descriptors. '<u2' carries bf16 words (dsmoe's convention). */
static const struct {
    const char *descr;
    dsmoe_dtype dtype;
} npy_descrs[] = {
    {"<f4", DSMOE_DTYPE_F32}, {"<i4", DSMOE_DTYPE_I32}, {"<u2", DSMOE_DTYPE_BF16},
    {"<f2", DSMOE_DTYPE_F16}, {"<f8", DSMOE_DTYPE_F64}, {"<i8", DSMOE_DTYPE_I64},
    {"|u1", DSMOE_DTYPE_U8},  {"<u1", DSMOE_DTYPE_U8},
};
#define NPY_SUPPORTED "'<f4', '<i4', '<u2' (bf16), '<f2', '<f8', '<i8', '|u1'"

static const char *npy_descr_of(dsmoe_dtype dtype) {
    for (size_t i = 0; i < sizeof npy_descrs / sizeof npy_descrs[0]; i++)
        if (npy_descrs[i].dtype == dtype) return npy_descrs[i].descr;
    return NULL;
}

/* ------------------------------------------------------- header parser -- */

/* Cursor over the header bytes; positions are file offsets. */
typedef struct npy_cursor {
    const unsigned char *s;
    size_t pos, end;
} npy_cursor;

typedef struct npy_header {
    dsmoe_dtype dtype;
    int32_t ndim;
    int64_t shape[DSMOE_MAX_DIMS];
    size_t nbytes;      /* data bytes */
    size_t data_offset; /* where the data starts */
} npy_header;

#define NPY_FAIL(c, ...) npy_fail((c)->pos, __VA_ARGS__)
static dsmoe_status npy_fail(size_t at, const char *fmt, ...) DSMOE__PRINTF(2, 3);
static dsmoe_status npy_fail(size_t at, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return dsmoe__error(DSMOE_STATUS_FORMAT, "npy header at byte %zu: %s", at, msg);
}

static void npy_skip_ws(npy_cursor *c) {
    while (c->pos < c->end) {
        unsigned char ch = c->s[c->pos];
        if (ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r' && ch != '\f') break;
        c->pos++;
    }
}

/* Next non-blank byte (consumed only by the caller), or -1 at the end. */
static int npy_peek(npy_cursor *c) {
    npy_skip_ws(c);
    return c->pos < c->end ? c->s[c->pos] : -1;
}

/* What stands at the cursor, quoted for a message. */
static const char *npy_found(const npy_cursor *c, char *buf, size_t cap) {
    if (c->pos >= c->end) return "the end of the header";
    size_t n = c->end - c->pos < 16 ? c->end - c->pos : 16;
    char ex[64];
    snprintf(buf, cap, "'%s'", dsmoe__excerpt(c->s + c->pos, n, ex, sizeof ex));
    return buf;
}

static dsmoe_status npy_expect(npy_cursor *c, char want, const char *where) {
    char f[96];
    if (npy_peek(c) != want)
        return NPY_FAIL(c, "expected '%c' %s, found %s", want, where, npy_found(c, f, sizeof f));
    c->pos++;
    return DSMOE_OK;
}

/* A quoted string without escapes: returns its span. */
static dsmoe_status npy_string(npy_cursor *c, const unsigned char **str, size_t *len) {
    char f[96];
    int q = npy_peek(c);
    if (q != '\'' && q != '"')
        return NPY_FAIL(c, "expected a quoted string, found %s", npy_found(c, f, sizeof f));
    size_t start = ++c->pos;
    while (c->pos < c->end && c->s[c->pos] != q) {
        unsigned char ch = c->s[c->pos];
        if (ch == '\\') return NPY_FAIL(c, "escape sequences are not supported in header strings");
        if (ch < 0x20 || ch == 0x7f) return NPY_FAIL(c, "control character 0x%02x in a string", ch);
        c->pos++;
    }
    if (c->pos >= c->end) return npy_fail(start - 1, "unterminated string");
    *str = c->s + start;
    *len = c->pos - start;
    c->pos++;
    return DSMOE_OK;
}

static int npy_is_ident(int ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '_';
}

static dsmoe_status npy_bool(npy_cursor *c, int *value) {
    npy_skip_ws(c);
    size_t start = c->pos;
    while (c->pos < c->end && npy_is_ident(c->s[c->pos])) c->pos++;
    size_t n = c->pos - start;
    if (n == 4 && memcmp(c->s + start, "True", 4) == 0) {
        *value = 1;
    } else if (n == 5 && memcmp(c->s + start, "False", 5) == 0) {
        *value = 0;
    } else {
        char f[96];
        c->pos = start;
        return NPY_FAIL(c, "'fortran_order' must be True or False, found %s",
                        npy_found(c, f, sizeof f));
    }
    return DSMOE_OK;
}

/* A non-negative decimal integer <= DSMOE__MAX_DIM, as Python 3 spells it. */
static dsmoe_status npy_dim(npy_cursor *c, int32_t index, int64_t *out) {
    char f[96];
    int ch = npy_peek(c);
    if (ch == '-') return NPY_FAIL(c, "shape: dimension %d is negative", (int)index);
    if (ch < '0' || ch > '9')
        return NPY_FAIL(c, "shape: expected a dimension, found %s", npy_found(c, f, sizeof f));
    size_t start = c->pos;
    int64_t v = 0;
    while (c->pos < c->end && c->s[c->pos] >= '0' && c->s[c->pos] <= '9') {
        v = v * 10 + (c->s[c->pos] - '0');
        if (v > DSMOE__MAX_DIM)
            return npy_fail(start, "shape: dimension %d exceeds the limit of 2^40", (int)index);
        c->pos++;
    }
    if (c->pos - start > 1 && c->s[start] == '0')
        return npy_fail(start, "shape: dimension %d has a leading zero", (int)index);
    if (c->pos < c->end && npy_is_ident(c->s[c->pos]))
        return NPY_FAIL(c, "shape: dimension %d is not a plain decimal integer", (int)index);
    *out = v;
    return DSMOE_OK;
}

/* '(' [dim (',' dim)* [',']] ')' — a 1-tuple needs its comma, as in Python. */
static dsmoe_status npy_shape(npy_cursor *c, npy_header *h) {
    char f[96];
    dsmoe_status s;
    int ch = npy_peek(c);
    if (ch == '[') return NPY_FAIL(c, "'shape' must be a tuple, found a list");
    if ((s = npy_expect(c, '(', "to open the 'shape' tuple")) != DSMOE_OK) return s;
    size_t open = c->pos - 1;
    int32_t n = 0;
    int comma = 0; /* a comma followed the last dimension */
    while (npy_peek(c) != ')') {
        if (n > 0 && !comma)
            return NPY_FAIL(c, "shape: expected ',' or ')', found %s", npy_found(c, f, sizeof f));
        if (n == DSMOE_MAX_DIMS)
            return NPY_FAIL(c, "shape: more than %d dimensions", DSMOE_MAX_DIMS);
        if ((s = npy_dim(c, n, &h->shape[n])) != DSMOE_OK) return s;
        n++;
        comma = npy_peek(c) == ',';
        if (comma) c->pos++;
    }
    if (n == 1 && !comma)
        return npy_fail(open, "shape (%lld) is a number, not a tuple: write (%lld,)",
                        (long long)h->shape[0], (long long)h->shape[0]);
    c->pos++; /* ')' */
    h->ndim = n;
    return DSMOE_OK;
}

static dsmoe_status npy_descr(npy_cursor *c, npy_header *h) {
    if (npy_peek(c) == '[')
        return NPY_FAIL(c, "'descr' is a list (a structured dtype), which is not supported");
    size_t at = c->pos;
    const unsigned char *str = (const unsigned char *)""; /* set by npy_string */
    size_t len = 0;
    dsmoe_status s = npy_string(c, &str, &len);
    if (s != DSMOE_OK) return s;
    for (size_t i = 0; i < sizeof npy_descrs / sizeof npy_descrs[0]; i++) {
        if (len == strlen(npy_descrs[i].descr) && memcmp(str, npy_descrs[i].descr, len) == 0) {
            h->dtype = npy_descrs[i].dtype;
            return DSMOE_OK;
        }
    }
    char ex[64];
    dsmoe__excerpt(str, len, ex, sizeof ex);
    if (len > 0 && str[0] == '>')
        return npy_fail(at, "big-endian data ('%s') is not supported; save with .astype('<%s')",
                        ex, ex + 1);
    return npy_fail(at, "dtype '%s' is not supported (supported: " NPY_SUPPORTED ")", ex);
}

/* The whole dict: '{' entries '}' followed only by whitespace. */
static dsmoe_status npy_dict(npy_cursor *c, npy_header *h) {
    static const char *const keys[3] = {"descr", "fortran_order", "shape"};
    char f[96];
    int seen[3] = {0, 0, 0};
    int fortran = 0;
    dsmoe_status s;
    if (npy_peek(c) != '{')
        return NPY_FAIL(c, "the header is not a dict: expected '{', found %s",
                        npy_found(c, f, sizeof f));
    c->pos++;
    for (;;) {
        if (npy_peek(c) == '}') break;
        size_t at = c->pos;
        const unsigned char *key = NULL;
        size_t klen = 0;
        if ((s = npy_string(c, &key, &klen)) != DSMOE_OK) return s;
        int k = -1;
        for (int i = 0; i < 3; i++)
            if (klen == strlen(keys[i]) && memcmp(key, keys[i], klen) == 0) k = i;
        char ex[64];
        if (k < 0)
            return npy_fail(at, "unexpected key '%s' (expected 'descr', 'fortran_order', 'shape')",
                            dsmoe__excerpt(key, klen, ex, sizeof ex));
        if (seen[k]) return npy_fail(at, "duplicate key '%s'", keys[k]);
        seen[k] = 1;
        if ((s = npy_expect(c, ':', "after a key")) != DSMOE_OK) return s;
        if (k == 0) s = npy_descr(c, h);
        else if (k == 1) s = npy_bool(c, &fortran);
        else s = npy_shape(c, h);
        if (s != DSMOE_OK) return s;
        int ch = npy_peek(c);
        if (ch == ',') {
            c->pos++;
        } else if (ch != '}') {
            return NPY_FAIL(c, "expected ',' or '}' after the value of '%s', found %s", keys[k],
                            npy_found(c, f, sizeof f));
        }
    }
    c->pos++; /* '}' */
    if (npy_peek(c) != -1)
        return NPY_FAIL(c, "unexpected %s after the header dict", npy_found(c, f, sizeof f));
    for (int i = 0; i < 3; i++)
        if (!seen[i]) return npy_fail(c->end, "missing key '%s'", keys[i]);
    if (fortran)
        return npy_fail(c->end, "fortran_order is True: only C-ordered arrays are supported "
                                "(save np.ascontiguousarray(a))");
    return DSMOE_OK;
}

/* The magic, as far as the input goes: a file that does not start with it is not
 * a .npy file at all (a text file, /dev/zero), which is said so. */
static dsmoe_status npy_check_magic(const unsigned char *b, size_t len) {
    size_t n = len < NPY_MAGIC_LEN ? len : NPY_MAGIC_LEN;
    if (n > 0 && memcmp(b, NPY_MAGIC, n) != 0) {
        char ex[64];
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "not a .npy file (no \\x93NUMPY magic at byte 0; it starts with '%s')",
                            dsmoe__excerpt(b, n, ex, 32));
    }
    return DSMOE_OK;
}

/* Magic, version and header length from a preamble of `len` >= 10 bytes (12 for
 * versions 2 and 3): *start is where the header begins, *hlen its length. Returns
 * OK with *start = 0 when version 2 or 3 needs the two more bytes it lacks. */
static dsmoe_status npy_preamble(const unsigned char *b, size_t len, size_t *start, size_t *hlen) {
    dsmoe_status s = npy_check_magic(b, len);
    if (s != DSMOE_OK) return s;
    unsigned major = b[6], minor = b[7];
    if ((major < 1 || major > 3) || minor != 0)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "npy: format version %u.%u at byte 6 is not supported (1.0, 2.0, 3.0 are)",
                            major, minor);
    *start = 0;
    if (major == 1) {
        *start = 10;
        *hlen = (size_t)b[8] | (size_t)b[9] << 8;
    } else if (len >= 12) {
        *start = 12;
        *hlen = (size_t)b[8] | (size_t)b[9] << 8 | (size_t)b[10] << 16 | (size_t)b[11] << 24;
    } else {
        return DSMOE_OK;
    }
    if (*hlen > NPY_MAX_HEADER)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "npy: header length %zu at byte 8 exceeds the 64 KiB limit", *hlen);
    return DSMOE_OK;
}

/* The header dict b[start, start + hlen) and the data size it declares. */
static dsmoe_status npy_header_dict(const unsigned char *b, size_t start, size_t hlen,
                                    npy_header *h) {
    /* Version 3.0 headers are UTF-8; the parser only accepts ASCII outside strings,
     * and strings are compared byte for byte, so no decoding is needed. */
    npy_cursor c = {b, start, start + hlen};
    dsmoe_status s = npy_dict(&c, h);
    if (s != DSMOE_OK) return s;
    int32_t bad;
    if (!dsmoe__shape_nbytes(h->ndim, h->shape, dsmoe_dtype_size(h->dtype), &h->nbytes, &bad) ||
        h->nbytes > NPY_MAX_DATA)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "npy: the shape's data size overflows the 2^40-byte limit");
    h->data_offset = start + hlen;
    return DSMOE_OK;
}

/* Preamble, header and data size; checks that the data fills the input exactly. */
static dsmoe_status npy_parse_header(const unsigned char *b, size_t len, npy_header *h) {
    memset(h, 0, sizeof *h);
    dsmoe_status s = npy_check_magic(b, len);
    if (s != DSMOE_OK) return s;
    if (len < 10)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "npy: %zu bytes is too short for the 10-byte preamble", len);
    size_t start = 0, hlen = 0;
    if ((s = npy_preamble(b, len, &start, &hlen)) != DSMOE_OK) return s;
    if (start == 0)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "npy: %zu bytes is too short for the 12-byte version %u.0 preamble",
                            len, (unsigned)b[6]);
    if (hlen > len - start)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "npy: truncated: the %zu-byte header at byte %zu runs past the end of "
                            "the %zu-byte input",
                            hlen, start, len);
    if ((s = npy_header_dict(b, start, hlen, h)) != DSMOE_OK) return s;
    size_t avail = len - h->data_offset;
    if (avail < h->nbytes)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "npy: truncated: the header declares %zu data bytes from byte %zu but "
                            "only %zu follow",
                            h->nbytes, h->data_offset, avail);
    if (avail > h->nbytes)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "npy: %zu unexpected bytes after the data, from byte %zu",
                            avail - h->nbytes, h->data_offset + h->nbytes);
    return DSMOE_OK;
}

/* Stream length from the first bytes: the preamble, then the header, then exactly
 * the declared data. The same checks as npy_parse_header, so the same messages. */
dsmoe_status dsmoe__npy_probe(const unsigned char *buf, size_t have, size_t *want,
                              dsmoe__len_kind *kind) {
    *kind = DSMOE__LEN_MORE;
    dsmoe_status s = npy_check_magic(buf, have);
    if (s != DSMOE_OK) return s;
    size_t start = 0, hlen = 0;
    if (have >= 10 && (s = npy_preamble(buf, have, &start, &hlen)) != DSMOE_OK) return s;
    if (start == 0) {
        *want = have < 10 ? 10 : 12;
        return DSMOE_OK;
    }
    if (have < start + hlen) {
        *want = start + hlen;
        return DSMOE_OK;
    }
    npy_header h;
    memset(&h, 0, sizeof h);
    if ((s = npy_header_dict(buf, start, hlen, &h)) != DSMOE_OK) return s;
    *want = h.data_offset + h.nbytes;
    *kind = DSMOE__LEN_EXACT;
    return DSMOE_OK;
}

/* ------------------------------------------------------------- reading -- */

dsmoe_status dsmoe_npy_parse(const void *buf, size_t len, dsmoe_array *out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_npy_parse: NULL output");
    memset(out, 0, sizeof *out);
    if (!buf && len > 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_npy_parse: NULL buffer");
    npy_header h;
    dsmoe_status s = npy_parse_header((const unsigned char *)buf, buf ? len : 0, &h);
    if (s != DSMOE_OK) return s;
    void *data = dsmoe_malloc(h.nbytes);
    if (!data)
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "npy: cannot allocate %zu bytes", h.nbytes);
    if (h.nbytes) memcpy(data, (const unsigned char *)buf + h.data_offset, h.nbytes);
    out->dtype = h.dtype;
    out->ndim = h.ndim;
    memcpy(out->shape, h.shape, sizeof h.shape);
    out->data = data;
    out->nbytes = h.nbytes;
    return DSMOE_OK;
}

dsmoe_status dsmoe_npy_read(const char *path, dsmoe_array *out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_npy_read: NULL output");
    memset(out, 0, sizeof *out);
    if (!path) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_npy_read: NULL path");
    dsmoe__mapped m;
    dsmoe_status s = dsmoe__map_file(path, 1, dsmoe__npy_probe, 0, &m);
    if (s != DSMOE_OK) return s;
    s = dsmoe_npy_parse(m.data, m.size, out);
    dsmoe__unmap_file(&m);
    if (s != DSMOE_OK) return dsmoe__error_prefix(s, path);
    return DSMOE_OK;
}

/* ------------------------------------------------------------- writing -- */

dsmoe_status dsmoe_npy_write_raw(const char *path, dsmoe_dtype dtype, int32_t ndim,
                                 const int64_t *shape, const void *data) {
    const char *descr = npy_descr_of(dtype);
    if (!descr)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "npy write: bad dtype %d", (int)dtype);
    size_t nbytes;
    int32_t bad;
    if (!dsmoe__shape_nbytes(ndim, shape, dsmoe_dtype_size(dtype), &nbytes, &bad)) {
        if (bad < 0 || bad >= ndim)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "npy write: bad rank %d or overflowing shape", (int)ndim);
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "npy write: bad dimension %d (%lld)",
                            (int)bad, (long long)shape[bad]);
    }
    if (!data && nbytes > 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "npy write: NULL data");

    /* Header exactly as NumPy (>= 1.23) writes it, so files compare byte for byte. */
    char dict[256], dims[8 * 24 + 8];
    size_t o = 0;
    dims[o++] = '(';
    for (int32_t i = 0; i < ndim; i++)
        o += (size_t)snprintf(dims + o, sizeof dims - o, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (ndim == 1) dims[o++] = ',';
    dims[o++] = ')';
    dims[o] = '\0';
    int n = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': %s, }",
                     descr, dims);
    size_t hlen = (size_t)n;
    if (ndim > 0) {
        char first[24];
        hlen += NPY_GROWTH_DIGITS - (size_t)snprintf(first, sizeof first, "%lld", (long long)shape[0]);
    }
    size_t pad = NPY_ALIGN - (10 + hlen + 1) % NPY_ALIGN; /* 1..64 spaces, as NumPy */
    hlen += pad + 1;
    unsigned char head[512]; /* 10 + hlen <= 10 + 255 + 21 + 64 + 1 */
    memcpy(head, NPY_MAGIC, NPY_MAGIC_LEN);
    head[6] = 1; /* format version 1.0 */
    head[7] = 0;
    head[8] = (unsigned char)(hlen & 0xff);
    head[9] = (unsigned char)(hlen >> 8);
    memcpy(head + 10, dict, (size_t)n);
    memset(head + 10 + n, ' ', hlen - (size_t)n - 1);
    head[10 + hlen - 1] = '\n';

    dsmoe__atomic_file f;
    dsmoe_status s = dsmoe__atomic_open(&f, path);
    if (s == DSMOE_OK) s = dsmoe__atomic_write(&f, head, 10 + hlen);
    if (s == DSMOE_OK && nbytes) s = dsmoe__atomic_write(&f, data, nbytes);
    if (s == DSMOE_OK) return dsmoe__atomic_commit(&f);
    dsmoe__atomic_abort(&f);
    return s;
}

dsmoe_status dsmoe_npy_write(const char *path, const dsmoe_array *a) {
    if (!a) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "npy write: NULL array");
    size_t want;
    if (dsmoe_dtype_size(a->dtype) &&
        dsmoe__shape_nbytes(a->ndim, a->shape, dsmoe_dtype_size(a->dtype), &want, NULL) &&
        want != a->nbytes)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "npy write: array nbytes %zu does not match its shape (%zu bytes)",
                            a->nbytes, want);
    return dsmoe_npy_write_raw(path, a->dtype, a->ndim, a->shape, a->data);
}
