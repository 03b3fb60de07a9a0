/*
 * safetensors.c — reading (memory-mapped, zero-copy) and writing safetensors files.
 *
 * Layout: an 8-byte little-endian header length N, N bytes of JSON
 *     {"__metadata__": {"key": "value", ...},
 *      "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
 * then the data section; offsets are relative to its start (byte 8 + N).
 *
 * The reader trusts nothing: N <= 100 MiB and inside the file; the header is read
 * by the strict JSON reader in json.c against exactly the schema above (unknown
 * keys in a tensor entry are refused: they could change how its bytes are meant);
 * dtypes F32 BF16 F16 F64 I32 I64 U8; shape product times dtype size (overflow
 * checked) equals end - begin; offsets inside the data section; non-empty byte
 * ranges do not overlap; names and metadata keys unique; metadata values strings.
 * Gaps between tensors and unused bytes after the last one are tolerated (the
 * reference reader refuses them; this writer never makes them).
 *
 * The writer follows the reference implementation: header padded with spaces to
 * a multiple of 8, tensor data contiguous (no gaps), largest element size first,
 * so every tensor starts at a multiple of its element size in the file.
 */
#include "io/io_internal.h"
#include "io/json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ST_MAX_HEADER ((uint64_t)100 * 1024 * 1024)
#define ST_SUPPORTED "F32, BF16, F16, F64, I32, I64, U8"

static int st_dtype_from_name(const char *s, dsmoe_dtype *out) {
    for (int d = 0; d < DSMOE_DTYPE_COUNT_; d++) {
        if (strcmp(s, dsmoe_dtype_name((dsmoe_dtype)d)) == 0) {
            *out = (dsmoe_dtype)d;
            return 1;
        }
    }
    return 0;
}

/* ============================================================== reader == */

typedef struct st_tensor {
    const char *name; /* in the arena */
    size_t at;        /* file offset of the name, for messages */
    dsmoe_dtype dtype;
    int32_t ndim;
    int64_t shape[DSMOE_MAX_DIMS];
    uint64_t begin, end; /* relative to the data section */
} st_tensor;

typedef struct st_meta {
    const char *key, *value; /* in the arena */
    size_t at;
} st_meta;

struct dsmoe_safetensors {
    dsmoe__mapped map;         /* owned file image; all zero for open_memory */
    const unsigned char *data; /* data section */
    size_t data_len;
    char *arena;               /* decoded names, keys and values */
    st_tensor *tensors;        /* header order */
    int64_t n_tensors;
    const st_tensor **by_name; /* sorted by name */
    st_meta *meta;             /* header order */
    int64_t n_meta;
    const st_meta **meta_by_key; /* sorted by key */
};

static int st_cmp_tensor_name(const void *a, const void *b) {
    return strcmp((*(const st_tensor *const *)a)->name, (*(const st_tensor *const *)b)->name);
}
static int st_cmp_meta_key(const void *a, const void *b) {
    return strcmp((*(const st_meta *const *)a)->key, (*(const st_meta *const *)b)->key);
}
static int st_cmp_tensor_range(const void *a, const void *b) {
    const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* A name quoted for a message (untrusted bytes made printable). */
#define ST_Q(s, buf) dsmoe__excerpt((s), strlen(s), (buf), sizeof(buf))

/* Grows *arr (of *cap elements of `size` bytes) so index n fits. */
static int st_grow(void **arr, int64_t *cap, int64_t n, size_t size) {
    if (n < *cap) return 1;
    int64_t nc = *cap ? *cap * 2 : 16;
    if ((uint64_t)nc > SIZE_MAX / size) return 0;
    void *p = realloc(*arr, (size_t)nc * size);
    if (!p) return 0;
    *arr = p;
    *cap = nc;
    return 1;
}

static dsmoe_status st_parse_metadata(dsmoe__json *j, dsmoe_safetensors *st, int64_t *cap) {
    dsmoe_status s = dsmoe__json_begin(j, '{', "\"__metadata__\"");
    for (int more; s == DSMOE_OK;) {
        const char *key, *value;
        size_t klen, vlen, at;
        if ((s = dsmoe__json_next_member(j, &more, &key, &klen, &at)) != DSMOE_OK || !more) break;
        if (dsmoe__json_peek(j) != DSMOE__JSON_STRING) {
            char q[96], f[64];
            return dsmoe__json_fail(j, dsmoe__json_offset(j) - j->base,
                                    "__metadata__ value of \"%s\" must be a string, found %s",
                                    ST_Q(key, q), dsmoe__json_found(j, f, sizeof f));
        }
        if ((s = dsmoe__json_string(j, &value, &vlen)) != DSMOE_OK) break;
        if (!st_grow((void **)&st->meta, cap, st->n_meta, sizeof *st->meta))
            return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "safetensors: out of memory for metadata");
        st->meta[st->n_meta++] = (st_meta){key, value, at};
    }
    return s;
}

/* Reads a JSON array of at most `max` non-negative integers into v[]. */
static dsmoe_status st_uint_array(dsmoe__json *j, const char *tname, const char *field, int max,
                                  uint64_t *v, int *n) {
    char q[96], what[160];
    snprintf(what, sizeof what, "tensor \"%s\": \"%s\"", ST_Q(tname, q), field);
    dsmoe_status s = dsmoe__json_begin(j, '[', what);
    *n = 0;
    for (int more; s == DSMOE_OK;) {
        if ((s = dsmoe__json_next(j, &more)) != DSMOE_OK || !more) break;
        if (*n == max)
            return dsmoe__json_fail(j, dsmoe__json_offset(j) - j->base, "%s has more than %d entries",
                                    what, max);
        s = dsmoe__json_uint(j, what, &v[(*n)++]);
    }
    return s;
}

/* One tensor entry {"dtype": .., "shape": [..], "data_offsets": [b, e]}, validated
 * against the data section. */
static dsmoe_status st_parse_tensor(dsmoe__json *j, st_tensor *t, size_t data_len) {
    static const char *const fields[3] = {"dtype", "shape", "data_offsets"};
    char q[96], q2[96];
    int seen[3] = {0, 0, 0};
    uint64_t dims[DSMOE_MAX_DIMS], offs[2];
    int noffs = 0;
    size_t entry_at = dsmoe__json_offset(j) - j->base;
    char what[128];
    snprintf(what, sizeof what, "tensor \"%s\"", ST_Q(t->name, q));
    dsmoe_status s = dsmoe__json_begin(j, '{', what);
    for (int more; s == DSMOE_OK;) {
        const char *key, *str;
        size_t klen, slen, at;
        if ((s = dsmoe__json_next_member(j, &more, &key, &klen, &at)) != DSMOE_OK || !more) break;
        int f = -1;
        for (int i = 0; i < 3; i++)
            if (strcmp(key, fields[i]) == 0) f = i;
        if (f < 0)
            return dsmoe__json_fail(j, at - j->base,
                                    "tensor \"%s\": unexpected key \"%s\" (expected dtype, shape, "
                                    "data_offsets)",
                                    ST_Q(t->name, q), ST_Q(key, q2));
        if (seen[f])
            return dsmoe__json_fail(j, at - j->base, "tensor \"%s\": duplicate key \"%s\"",
                                    ST_Q(t->name, q), fields[f]);
        seen[f] = 1;
        if (f == 0) {
            size_t vat = dsmoe__json_offset(j) - j->base;
            snprintf(what, sizeof what, "tensor \"%s\": \"dtype\"", ST_Q(t->name, q));
            if (dsmoe__json_peek(j) != DSMOE__JSON_STRING) {
                char fd[64];
                return dsmoe__json_fail(j, vat, "%s must be a string, found %s", what,
                                        dsmoe__json_found(j, fd, sizeof fd));
            }
            if ((s = dsmoe__json_string(j, &str, &slen)) != DSMOE_OK) return s;
            if (!st_dtype_from_name(str, &t->dtype))
                return dsmoe__json_fail(j, vat, "tensor \"%s\": dtype \"%s\" is not supported "
                                                "(supported: " ST_SUPPORTED ")",
                                        ST_Q(t->name, q), ST_Q(str, q2));
        } else if (f == 1) {
            int n;
            if ((s = st_uint_array(j, t->name, "shape", DSMOE_MAX_DIMS, dims, &n)) != DSMOE_OK)
                return s;
            t->ndim = n;
        } else {
            if ((s = st_uint_array(j, t->name, "data_offsets", 2, offs, &noffs)) != DSMOE_OK)
                return s;
            if (noffs != 2)
                return dsmoe__json_fail(j, at - j->base,
                                        "tensor \"%s\": \"data_offsets\" must hold 2 numbers, not %d",
                                        ST_Q(t->name, q), noffs);
        }
    }
    if (s != DSMOE_OK) return s;
    for (int i = 0; i < 3; i++)
        if (!seen[i])
            return dsmoe__json_fail(j, entry_at, "tensor \"%s\": missing \"%s\"", ST_Q(t->name, q),
                                    fields[i]);

    /* Semantics: shape, size, offsets. */
    for (int32_t i = 0; i < t->ndim; i++) {
        if (dims[i] > (uint64_t)DSMOE__MAX_DIM)
            return dsmoe__json_fail(j, entry_at, "tensor \"%s\": dimension %d (%llu) exceeds 2^40",
                                    ST_Q(t->name, q), (int)i, (unsigned long long)dims[i]);
        t->shape[i] = (int64_t)dims[i];
    }
    size_t nbytes;
    if (!dsmoe__shape_nbytes(t->ndim, t->shape, dsmoe_dtype_size(t->dtype), &nbytes, NULL))
        return dsmoe__json_fail(j, entry_at, "tensor \"%s\": the size of its shape overflows",
                                ST_Q(t->name, q));
    t->begin = offs[0];
    t->end = offs[1];
    if (t->begin > t->end)
        return dsmoe__json_fail(j, entry_at, "tensor \"%s\": data_offsets [%llu, %llu] end before they "
                                             "begin",
                                ST_Q(t->name, q), (unsigned long long)t->begin,
                                (unsigned long long)t->end);
    if (t->end > data_len)
        return dsmoe__json_fail(j, entry_at,
                                "tensor \"%s\": data_offsets [%llu, %llu] run past the end of the "
                                "%zu-byte data section",
                                ST_Q(t->name, q), (unsigned long long)t->begin,
                                (unsigned long long)t->end, data_len);
    if (t->end - t->begin != nbytes)
        return dsmoe__json_fail(j, entry_at,
                                "tensor \"%s\": shape and dtype %s need %zu bytes but data_offsets "
                                "[%llu, %llu] hold %llu",
                                ST_Q(t->name, q), dsmoe_dtype_name(t->dtype), nbytes,
                                (unsigned long long)t->begin, (unsigned long long)t->end,
                                (unsigned long long)(t->end - t->begin));
    return DSMOE_OK;
}

/* Unique names and keys, non-overlapping ranges; builds the lookup tables. */
static dsmoe_status st_check_tables(dsmoe_safetensors *st) {
    char q[96], q2[96];
    size_t nt = (size_t)st->n_tensors, nm = (size_t)st->n_meta;
    /* The index arrays hold pointers to structs: sizeof *array is a pointer's size, which
     * is meant (not a mistaken sizeof(&s)). NOLINTBEGIN(bugprone-sizeof-expression) */
    st->by_name = (const st_tensor **)malloc((nt ? nt : 1) * sizeof *st->by_name);
    st->meta_by_key = (const st_meta **)malloc((nm ? nm : 1) * sizeof *st->meta_by_key);
    const st_tensor **by_range = (const st_tensor **)malloc((nt ? nt : 1) * sizeof *by_range);
    if (!st->by_name || !st->meta_by_key || !by_range) {
        free(by_range);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "safetensors: out of memory for the index");
    }
    for (size_t i = 0; i < nt; i++) st->by_name[i] = by_range[i] = &st->tensors[i];
    for (size_t i = 0; i < nm; i++) st->meta_by_key[i] = &st->meta[i];
    qsort(st->by_name, nt, sizeof *st->by_name, st_cmp_tensor_name);
    qsort(st->meta_by_key, nm, sizeof *st->meta_by_key, st_cmp_meta_key);
    qsort(by_range, nt, sizeof *by_range, st_cmp_tensor_range);
    /* NOLINTEND(bugprone-sizeof-expression) */

    dsmoe_status s = DSMOE_OK;
    for (size_t i = 1; i < nt && s == DSMOE_OK; i++) {
        const st_tensor *a = st->by_name[i - 1], *b = st->by_name[i];
        if (strcmp(a->name, b->name) == 0)
            s = dsmoe__error(DSMOE_STATUS_FORMAT,
                             "safetensors header at byte %zu: duplicate tensor name \"%s\"",
                             a->at > b->at ? a->at : b->at, ST_Q(a->name, q));
    }
    for (size_t i = 1; i < nm && s == DSMOE_OK; i++) {
        const st_meta *a = st->meta_by_key[i - 1], *b = st->meta_by_key[i];
        if (strcmp(a->key, b->key) == 0)
            s = dsmoe__error(DSMOE_STATUS_FORMAT,
                             "safetensors header at byte %zu: duplicate __metadata__ key \"%s\"",
                             a->at > b->at ? a->at : b->at, ST_Q(a->key, q));
    }
    /* Non-empty ranges sorted by begin must not start before the furthest end so far. */
    const st_tensor *prev = NULL;
    for (size_t i = 0; i < nt && s == DSMOE_OK; i++) {
        const st_tensor *t = by_range[i];
        if (t->begin == t->end) continue;
        if (prev && t->begin < prev->end)
            s = dsmoe__error(DSMOE_STATUS_FORMAT,
                             "safetensors: tensors \"%s\" [%llu, %llu) and \"%s\" [%llu, %llu) "
                             "overlap",
                             ST_Q(prev->name, q), (unsigned long long)prev->begin,
                             (unsigned long long)prev->end, ST_Q(t->name, q2),
                             (unsigned long long)t->begin, (unsigned long long)t->end);
        if (!prev || t->end > prev->end) prev = t;
    }
    free(by_range);
    return s;
}

/* The 8-byte header length N of buf[0..len) (len >= 8) and the byte after it.
 * `total`: len is the whole file (else a stream's first bytes, whose length is
 * not known yet). A file whose N is absurd (0, above the limit or, when the length
 * is known, past the end) and whose byte 8 does not open a JSON object is not a
 * safetensors file at all (a text file, /dev/zero), which is said so; one that
 * does look like safetensors gets the specific message. */
static dsmoe_status st_check_start(const unsigned char *buf, size_t len, int total, uint64_t *np) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | buf[i];
    *np = n;
    int absurd = n == 0 || n > ST_MAX_HEADER || (total && n > len - 8);
    if (absurd && (len == 8 || buf[8] != '{')) {
        char at8[80], why[64] = "";
        if (len == 8) snprintf(at8, sizeof at8, "nothing follows them");
        else if (buf[8] >= 0x20 && buf[8] < 0x7f)
            snprintf(at8, sizeof at8, "byte 8 is '%c', not the '{' that opens the JSON header",
                     buf[8]);
        else snprintf(at8, sizeof at8, "byte 8 is 0x%02x, not the '{' that opens the JSON header",
                      buf[8]);
        if (n > ST_MAX_HEADER) snprintf(why, sizeof why, ", above the 100 MiB limit");
        else if (n) snprintf(why, sizeof why, ", past the end of the %zu-byte file", len);
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "not a safetensors file (bytes 0-7 give a header length of %llu%s, "
                            "and %s)",
                            (unsigned long long)n, why, at8);
    }
    if (n > ST_MAX_HEADER)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "safetensors: header length %llu at byte 0 exceeds the 100 MiB limit",
                            (unsigned long long)n);
    if (total && n > len - 8)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "safetensors: header length %llu at byte 0 runs past the end of the "
                            "%zu-byte file",
                            (unsigned long long)n, len);
    return DSMOE_OK;
}

/* Parses and validates the file image buf[0..len) into st (which owns nothing yet).
 * header_only: buf holds the 8 bytes and the header but (perhaps) not the data,
 * whose length is then taken as unbounded; used to learn a stream's length. */
static dsmoe_status st_parse(dsmoe_safetensors *st, const unsigned char *buf, size_t len,
                             int header_only) {
    if (len < 8)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "safetensors: %zu bytes is too short for the 8-byte header length", len);
    uint64_t n;
    dsmoe_status s = st_check_start(buf, len, 1, &n);
    if (s != DSMOE_OK) return s;
    const unsigned char *hdr = buf + 8;
    st->data = hdr + n;
    st->data_len = header_only ? SIZE_MAX : len - 8 - (size_t)n;
    if (n == 0)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "safetensors: header length 0 at byte 0 (the smallest header is '{}')");
    if (hdr[0] != '{')
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "safetensors header at byte 8: must start with '{' (a JSON object)");

    st->arena = (char *)malloc((size_t)n + 1);
    if (!st->arena)
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "safetensors: cannot allocate %llu bytes",
                            (unsigned long long)n + 1);
    dsmoe__json j;
    dsmoe__json_init(&j, hdr, (size_t)n, 8, "safetensors header", st->arena, (size_t)n + 1);
    int64_t tcap = 0, mcap = 0;
    int meta_seen = 0;
    s = dsmoe__json_begin(&j, '{', "the header");
    for (int more; s == DSMOE_OK;) {
        const char *name;
        size_t nlen, at;
        if ((s = dsmoe__json_next_member(&j, &more, &name, &nlen, &at)) != DSMOE_OK || !more) break;
        if (strcmp(name, "__metadata__") == 0) {
            if (meta_seen)
                return dsmoe__json_fail(&j, at - 8, "duplicate \"__metadata__\"");
            meta_seen = 1;
            s = st_parse_metadata(&j, st, &mcap);
            continue;
        }
        if (!st_grow((void **)&st->tensors, &tcap, st->n_tensors, sizeof *st->tensors))
            return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "safetensors: out of memory for tensors");
        st_tensor *t = &st->tensors[st->n_tensors++];
        memset(t, 0, sizeof *t);
        t->name = name;
        t->at = at;
        s = st_parse_tensor(&j, t, st->data_len);
    }
    if (s == DSMOE_OK) s = dsmoe__json_finish(&j);
    if (s == DSMOE_OK) s = st_check_tables(st);
    return s;
}

void dsmoe_safetensors_close(dsmoe_safetensors *st) {
    if (!st) return;
    dsmoe__unmap_file(&st->map);
    free(st->arena);
    free(st->tensors);
    free(st->by_name);
    free(st->meta);
    free(st->meta_by_key);
    free(st);
}

/* Stream length from the first bytes: the header length, then the header (parsed
 * and checked in full, so a bad one fails before any data is read), then the data
 * up to the end of the last tensor; bytes after it are not read (a regular file's
 * are not looked at either). */
dsmoe_status dsmoe__safetensors_probe(const unsigned char *buf, size_t have, size_t *want,
                                      dsmoe__len_kind *kind) {
    *kind = DSMOE__LEN_MORE;
    if (have < 9) { /* the length and the byte after it */
        *want = 9;
        return DSMOE_OK;
    }
    uint64_t n;
    dsmoe_status s = st_check_start(buf, have, 0, &n);
    if (s != DSMOE_OK) return s;
    if (have < 8 + n) { /* n <= 100 MiB here */
        *want = 8 + (size_t)n;
        return DSMOE_OK;
    }
    dsmoe_safetensors st;
    memset(&st, 0, sizeof st);
    s = st_parse(&st, buf, 8 + (size_t)n, 1);
    uint64_t end = 0;
    for (int64_t i = 0; s == DSMOE_OK && i < st.n_tensors; i++)
        if (st.tensors[i].end > end) end = st.tensors[i].end;
    free(st.arena);
    free(st.tensors);
    free(st.by_name);
    free(st.meta);
    free(st.meta_by_key);
    if (s != DSMOE_OK) return s;
    if (end > SIZE_MAX - 8 - n)
        return dsmoe__error(DSMOE_STATUS_FORMAT, "safetensors: the data section's size overflows");
    *want = 8 + (size_t)n + (size_t)end;
    *kind = DSMOE__LEN_PREFIX;
    return DSMOE_OK;
}

dsmoe_status dsmoe_safetensors_open_memory(const void *buf, size_t len, dsmoe_safetensors **out) {
    if (!out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_safetensors_open_memory: NULL output");
    *out = NULL;
    if (!buf && len > 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_safetensors_open_memory: NULL buffer");
    dsmoe_safetensors *st = (dsmoe_safetensors *)calloc(1, sizeof *st);
    if (!st) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "safetensors: out of memory");
    dsmoe_status s = st_parse(st, (const unsigned char *)buf, buf ? len : 0, 0);
    if (s != DSMOE_OK) {
        dsmoe_safetensors_close(st);
        return s;
    }
    *out = st;
    return DSMOE_OK;
}

dsmoe_status dsmoe__safetensors_open_file(const char *path, int use_mmap, dsmoe_safetensors **out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_safetensors_open: NULL output");
    *out = NULL;
    dsmoe__mapped m;
    dsmoe_status s = dsmoe__map_file(path, use_mmap, dsmoe__safetensors_probe, 0, &m);
    if (s != DSMOE_OK) return s;
    s = dsmoe_safetensors_open_memory(m.data, m.size, out);
    if (s != DSMOE_OK) {
        dsmoe__unmap_file(&m);
        return dsmoe__error_prefix(s, path);
    }
    /* open_memory sets *out whenever it returns DSMOE_OK; the analyzer cannot see that
     * dsmoe__error (another file) never returns DSMOE_OK. */
    (*out)->map = m; // NOLINT(clang-analyzer-core.NullDereference)
    return DSMOE_OK;
}

dsmoe_status dsmoe_safetensors_open(const char *path, dsmoe_safetensors **out) {
    return dsmoe__safetensors_open_file(path, 1, out);
}

int64_t dsmoe_safetensors_count(const dsmoe_safetensors *st) { return st ? st->n_tensors : 0; }

static void st_view(const dsmoe_safetensors *st, const st_tensor *t, dsmoe_tensor_view *out) {
    out->name = t->name;
    out->dtype = t->dtype;
    out->ndim = t->ndim;
    memcpy(out->shape, t->shape, sizeof out->shape);
    out->data = st->data + t->begin;
    out->nbytes = (size_t)(t->end - t->begin);
}

dsmoe_status dsmoe_safetensors_at(const dsmoe_safetensors *st, int64_t i, dsmoe_tensor_view *out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_safetensors_at: NULL output");
    memset(out, 0, sizeof *out);
    if (!st) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_safetensors_at: NULL file");
    if (i < 0 || i >= st->n_tensors)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_safetensors_at: index %lld outside [0, %lld)", (long long)i,
                            (long long)st->n_tensors);
    st_view(st, &st->tensors[i], out);
    return DSMOE_OK;
}

dsmoe_status dsmoe_safetensors_get(const dsmoe_safetensors *st, const char *name,
                                   dsmoe_tensor_view *out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_safetensors_get: NULL output");
    memset(out, 0, sizeof *out);
    if (!st || !name)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_safetensors_get: NULL argument");
    st_tensor key = {.name = name};
    const st_tensor *pk = &key;
    /* NOLINTBEGIN(bugprone-sizeof-expression): the index holds struct pointers */
    const st_tensor **hit = (const st_tensor **)bsearch(&pk, st->by_name, (size_t)st->n_tensors,
                                                        sizeof *st->by_name, st_cmp_tensor_name);
    /* NOLINTEND(bugprone-sizeof-expression) */
    if (!hit) {
        char q[96];
        return dsmoe__error(DSMOE_STATUS_NOT_FOUND, "no tensor named \"%s\"", ST_Q(name, q));
    }
    st_view(st, *hit, out);
    return DSMOE_OK;
}

const char *dsmoe_safetensors_metadata(const dsmoe_safetensors *st, const char *key) {
    if (!st || !key) return NULL;
    st_meta k = {.key = key};
    const st_meta *pk = &k;
    /* NOLINTBEGIN(bugprone-sizeof-expression): the index holds struct pointers */
    const st_meta **hit = (const st_meta **)bsearch(&pk, st->meta_by_key, (size_t)st->n_meta,
                                                    sizeof *st->meta_by_key, st_cmp_meta_key);
    /* NOLINTEND(bugprone-sizeof-expression) */
    return hit ? (*hit)->value : NULL;
}

int64_t dsmoe_safetensors_metadata_count(const dsmoe_safetensors *st) { return st ? st->n_meta : 0; }

dsmoe_status dsmoe_safetensors_metadata_at(const dsmoe_safetensors *st, int64_t i, const char **key,
                                           const char **value) {
    if (key) *key = NULL;
    if (value) *value = NULL;
    if (!st || !key || !value)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_safetensors_metadata_at: NULL argument");
    if (i < 0 || i >= st->n_meta)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_safetensors_metadata_at: index %lld outside [0, %lld)",
                            (long long)i, (long long)st->n_meta);
    *key = st->meta[i].key;
    *value = st->meta[i].value;
    return DSMOE_OK;
}

dsmoe_status dsmoe_tensor_to_f32(const dsmoe_tensor_view *t, float *dst) {
    if (!t) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_tensor_to_f32: NULL view");
    const char *name = t->name ? t->name : "(unnamed)";
    char q[96];
    size_t esize = dsmoe_dtype_size(t->dtype), nbytes;
    if (!esize || !dsmoe__shape_nbytes(t->ndim, t->shape, esize, &nbytes, NULL) || nbytes != t->nbytes)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_tensor_to_f32: tensor \"%s\": dtype, shape and nbytes (%zu) "
                            "disagree",
                            ST_Q(name, q), t->nbytes);
    if (nbytes && (!t->data || !dst))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_tensor_to_f32: NULL data or dst");
    size_t n = nbytes / esize;
    const unsigned char *p = (const unsigned char *)t->data;
    switch (t->dtype) {
    case DSMOE_DTYPE_F32:
        if (n) memcpy(dst, p, nbytes);
        return DSMOE_OK;
    case DSMOE_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2); /* the view may be unaligned */
            dst[i] = dsmoe_bf16_to_f32(h);
        }
        return DSMOE_OK;
    case DSMOE_DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            dst[i] = dsmoe_f16_to_f32(h);
        }
        return DSMOE_OK;
    default:
        return dsmoe__error(DSMOE_STATUS_UNSUPPORTED,
                            "dsmoe_tensor_to_f32: tensor \"%s\" is %s; only F32, BF16 and F16 "
                            "convert to fp32",
                            ST_Q(name, q), dsmoe_dtype_name(t->dtype));
    }
}

/* ============================================================== writer == */

typedef struct wt_tensor {
    char *name;
    dsmoe_dtype dtype;
    int32_t ndim;
    int64_t shape[DSMOE_MAX_DIMS];
    const void *data; /* borrowed */
    size_t nbytes;
    uint64_t begin;   /* assigned by save */
} wt_tensor;

typedef struct wt_meta {
    char *key, *value;
} wt_meta;

struct dsmoe_safetensors_writer {
    wt_tensor *t;
    int64_t n, cap;
    wt_meta *m;
    int64_t nm, mcap;
};

dsmoe_status dsmoe_safetensors_writer_create(dsmoe_safetensors_writer **out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "safetensors writer: NULL output");
    *out = (dsmoe_safetensors_writer *)calloc(1, sizeof **out);
    if (!*out) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "safetensors writer: out of memory");
    return DSMOE_OK;
}

void dsmoe_safetensors_writer_free(dsmoe_safetensors_writer *w) {
    if (!w) return;
    for (int64_t i = 0; i < w->n; i++) free(w->t[i].name);
    for (int64_t i = 0; i < w->nm; i++) {
        free(w->m[i].key);
        free(w->m[i].value);
    }
    free(w->t);
    free(w->m);
    free(w);
}

dsmoe_status dsmoe_safetensors_writer_add(dsmoe_safetensors_writer *w, const char *name,
                                          dsmoe_dtype dtype, int32_t ndim, const int64_t *shape,
                                          const void *data) {
    char q[96];
    if (!w || !name) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "safetensors writer: NULL argument");
    if (!name[0] || strcmp(name, "__metadata__") == 0 || !dsmoe__utf8_valid(name, strlen(name)))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "safetensors writer: bad tensor name \"%s\" (empty, reserved or not UTF-8)",
                            ST_Q(name, q));
    size_t esize = dsmoe_dtype_size(dtype), nbytes;
    int32_t bad;
    if (!esize)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "safetensors writer: tensor \"%s\": bad dtype %d",
                            ST_Q(name, q), (int)dtype);
    if (!dsmoe__shape_nbytes(ndim, shape, esize, &nbytes, &bad))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "safetensors writer: tensor \"%s\": bad rank %d or dimension %d",
                            ST_Q(name, q), (int)ndim, (int)bad);
    if (nbytes && !data)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "safetensors writer: tensor \"%s\": NULL data",
                            ST_Q(name, q));
    if (!st_grow((void **)&w->t, &w->cap, w->n, sizeof *w->t))
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "safetensors writer: out of memory");
    wt_tensor *t = &w->t[w->n];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name)))
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "safetensors writer: out of memory");
    t->dtype = dtype;
    t->ndim = ndim;
    if (ndim) memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    t->data = data;
    t->nbytes = nbytes;
    w->n++;
    return DSMOE_OK;
}

dsmoe_status dsmoe_safetensors_writer_set_metadata(dsmoe_safetensors_writer *w, const char *key,
                                                   const char *value) {
    if (!w || !key || !value)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "safetensors writer: NULL argument");
    if (!dsmoe__utf8_valid(key, strlen(key)) || !dsmoe__utf8_valid(value, strlen(value)))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "safetensors writer: metadata key or value is not valid UTF-8");
    char *v = strdup(value);
    if (!v) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "safetensors writer: out of memory");
    for (int64_t i = 0; i < w->nm; i++) {
        if (strcmp(w->m[i].key, key) == 0) { /* replace */
            free(w->m[i].value);
            w->m[i].value = v;
            return DSMOE_OK;
        }
    }
    char *k = strdup(key);
    if (!k || !st_grow((void **)&w->m, &w->mcap, w->nm, sizeof *w->m)) {
        free(k);
        free(v);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "safetensors writer: out of memory");
    }
    w->m[w->nm++] = (wt_meta){k, v};
    return DSMOE_OK;
}

/* Growable text buffer for the header; `oom` sticks once set. */
typedef struct st_buf {
    char *p;
    size_t n, cap;
    int oom;
} st_buf;

static void buf_put(st_buf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (n > b->cap - b->n) {
        size_t nc = b->cap ? b->cap : 256;
        while (nc - b->n < n) {
            if (nc > SIZE_MAX / 2) {
                b->oom = 1;
                return;
            }
            nc *= 2;
        }
        char *p = (char *)realloc(b->p, nc);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = nc;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}
static void buf_str(st_buf *b, const char *s) { buf_put(b, s, strlen(s)); }
static void buf_u64(st_buf *b, uint64_t v) {
    char t[24];
    buf_put(b, t, (size_t)snprintf(t, sizeof t, "%llu", (unsigned long long)v));
}
/* A JSON string, escaped as serde_json and Python's json do. */
static void buf_json_string(st_buf *b, const char *s) {
    buf_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char e[8];
        switch (*p) {
        case '"': buf_put(b, "\\\"", 2); break;
        case '\\': buf_put(b, "\\\\", 2); break;
        case '\b': buf_put(b, "\\b", 2); break;
        case '\f': buf_put(b, "\\f", 2); break;
        case '\n': buf_put(b, "\\n", 2); break;
        case '\r': buf_put(b, "\\r", 2); break;
        case '\t': buf_put(b, "\\t", 2); break;
        default:
            if (*p < 0x20) {
                snprintf(e, sizeof e, "\\u%04x", *p);
                buf_put(b, e, 6);
            } else {
                buf_put(b, (const char *)p, 1);
            }
        }
    }
    buf_put(b, "\"", 1);
}

static int wt_cmp_name(const void *a, const void *b) {
    return strcmp((*(const wt_tensor *const *)a)->name, (*(const wt_tensor *const *)b)->name);
}

dsmoe_status dsmoe_safetensors_writer_save(dsmoe_safetensors_writer *w, const char *path) {
    if (!w || !path) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "safetensors writer: NULL argument");
    size_t n = (size_t)w->n;
    /* order[]: tensors by element size (8, 4, 2, 1), stable; also used to find
     * duplicate names after a sort. Its elements are struct pointers.
     * NOLINTBEGIN(bugprone-sizeof-expression) */
    wt_tensor **order = (wt_tensor **)malloc((n ? n : 1) * sizeof *order);
    if (!order) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "safetensors writer: out of memory");
    for (size_t i = 0; i < n; i++) order[i] = &w->t[i];
    qsort(order, n, sizeof *order, wt_cmp_name);
    /* NOLINTEND(bugprone-sizeof-expression) */
    for (size_t i = 1; i < n; i++) {
        if (strcmp(order[i - 1]->name, order[i]->name) == 0) {
            char q[96];
            dsmoe_status s = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                          "safetensors writer: tensor \"%s\" was added twice",
                                          ST_Q(order[i]->name, q));
            free(order);
            return s;
        }
    }
    size_t k = 0;
    uint64_t off = 0;
    for (size_t es = 8; es >= 1; es /= 2)
        for (size_t i = 0; i < n; i++)
            if (dsmoe_dtype_size(w->t[i].dtype) == es) {
                w->t[i].begin = off;
                off += w->t[i].nbytes;
                order[k++] = &w->t[i];
            }

    /* Header: metadata first, then the tensors in the order added. */
    st_buf b = {0};
    buf_put(&b, "{", 1);
    if (w->nm) {
        buf_str(&b, "\"__metadata__\":{");
        for (int64_t i = 0; i < w->nm; i++) {
            if (i) buf_put(&b, ",", 1);
            buf_json_string(&b, w->m[i].key);
            buf_put(&b, ":", 1);
            buf_json_string(&b, w->m[i].value);
        }
        buf_str(&b, n ? "}," : "}");
    }
    for (size_t i = 0; i < n; i++) {
        const wt_tensor *t = &w->t[i];
        if (i) buf_put(&b, ",", 1);
        buf_json_string(&b, t->name);
        buf_str(&b, ":{\"dtype\":\"");
        buf_str(&b, dsmoe_dtype_name(t->dtype));
        buf_str(&b, "\",\"shape\":[");
        for (int32_t d = 0; d < t->ndim; d++) {
            if (d) buf_put(&b, ",", 1);
            buf_u64(&b, (uint64_t)t->shape[d]);
        }
        buf_str(&b, "],\"data_offsets\":[");
        buf_u64(&b, t->begin);
        buf_put(&b, ",", 1);
        buf_u64(&b, t->begin + t->nbytes);
        buf_str(&b, "]}");
    }
    buf_put(&b, "}", 1);
    while (!b.oom && b.n % 8) buf_put(&b, " ", 1);

    dsmoe_status s = DSMOE_OK;
    if (b.oom) {
        s = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "safetensors writer: out of memory for the header");
    } else if (b.n > ST_MAX_HEADER) {
        s = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                         "safetensors writer: the %zu-byte header exceeds the 100 MiB limit", b.n);
    } else {
        unsigned char len8[8];
        for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)b.n >> (8 * i));
        dsmoe__atomic_file f;
        s = dsmoe__atomic_open(&f, path);
        if (s == DSMOE_OK) s = dsmoe__atomic_write(&f, len8, 8);
        if (s == DSMOE_OK) s = dsmoe__atomic_write(&f, b.p, b.n);
        for (size_t i = 0; i < n && s == DSMOE_OK; i++)
            if (order[i]->nbytes) s = dsmoe__atomic_write(&f, order[i]->data, order[i]->nbytes);
        if (s == DSMOE_OK) s = dsmoe__atomic_commit(&f);
        else dsmoe__atomic_abort(&f);
    }
    free(b.p);
    free(order);
    return s;
}
