/*
 * test_safetensors.c — safetensors reading and writing: round trips for every
 * dtype and ranks 0..4; files from the independent Python writer in
 * tests/ref/gen_io_fixtures.py (reference layout, byte-exact against ours; JSON
 * escapes and gaps); conversion to fp32; and malformed inputs built here —
 * truncations at every byte, flipped header bytes, bad lengths, bad JSON, bad
 * schema, overlapping or out-of-range offsets, duplicates — each of which must
 * fail with FORMAT, a message naming the problem, and a NULL output.
 */
#include "io_testutil.h"
#include "io/io_internal.h"

#include <sys/stat.h>
#include <unistd.h>

/* An exact-size file image: 8-byte length, `json` (padded with `pad` spaces),
 * then `data_len` data bytes (a repeating pattern). */
static unsigned char *st_image(const char *json, size_t json_len, size_t pad, size_t data_len,
                               size_t *len) {
    size_t n = json_len + pad;
    *len = 8 + n + data_len;
    unsigned char *b = (unsigned char *)malloc(*len ? *len : 1);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(b + 8, json, json_len);
    memset(b + 8 + json_len, ' ', pad);
    for (size_t i = 0; i < data_len; i++) b[8 + n + i] = (unsigned char)(i * 13 + 1);
    return b;
}

/* Opens every tensor and touches every byte; returns a checksum. */
static unsigned st_touch_all(const dsmoe_safetensors *st) {
    unsigned sum = 0;
    for (int64_t i = 0; i < dsmoe_safetensors_count(st); i++) {
        dsmoe_tensor_view v;
        if (dsmoe_safetensors_at(st, i, &v) != DSMOE_OK) abort();
        const unsigned char *p = (const unsigned char *)v.data;
        for (size_t k = 0; k < v.nbytes; k++) sum += p[k];
        dsmoe_tensor_view w;
        if (dsmoe_safetensors_get(st, v.name, &w) != DSMOE_OK || w.data != v.data) abort();
    }
    return sum;
}

static void expect_st_bad(const char *label, const void *buf, size_t len, const char *want) {
    dsmoe_safetensors *st = (dsmoe_safetensors *)(uintptr_t)1;
    dsmoe_clear_error();
    dsmoe_status s = dsmoe_safetensors_open_memory(buf, len, &st);
    tl_checks++;
    if (s != DSMOE_STATUS_FORMAT) {
        TL_FAIL("%s: got %s, want FORMAT (%s)", label, dsmoe_status_name(s), dsmoe_last_error());
        if (s == DSMOE_OK) dsmoe_safetensors_close(st);
        return;
    }
    if (!dsmoe_last_error()[0]) TL_FAIL("%s: empty message", label);
    ASSERT_MSG_HAS(label, want);
    if (st != NULL) TL_FAIL("%s: output not NULL", label);
}

static void expect_json_bad(const char *json, size_t data_len, const char *want) {
    size_t len;
    unsigned char *b = st_image(json, strlen(json), 0, data_len, &len);
    expect_st_bad(json, b, len, want);
    free(b);
}

static void expect_json_ok(const char *json, size_t data_len, int64_t count) {
    size_t len;
    unsigned char *b = st_image(json, strlen(json), 0, data_len, &len);
    dsmoe_safetensors *st = NULL;
    dsmoe_status s = dsmoe_safetensors_open_memory(b, len, &st);
    tl_checks++;
    if (s != DSMOE_OK) TL_FAIL("%s: %s", json, dsmoe_last_error());
    else ASSERT_EQ_INT(dsmoe_safetensors_count(st), count);
    if (st) st_touch_all(st);
    dsmoe_safetensors_close(st);
    free(b);
}

/* ------------------------------------------------------------ round trips -- */

typedef struct spec {
    const char *name;
    dsmoe_dtype dtype;
    int32_t ndim;
    int64_t shape[4];
} spec;

/* Every dtype, ranks 0..4, odd sizes, an empty tensor; mixed element sizes. */
static const spec rt_specs[] = {
    {"u8.odd", DSMOE_DTYPE_U8, 1, {7}},
    {"f64.matrix", DSMOE_DTYPE_F64, 2, {3, 5}},
    {"bf16.rank3", DSMOE_DTYPE_BF16, 3, {2, 3, 5}},
    {"i32.scalar", DSMOE_DTYPE_I32, 0, {0}},
    {"f16.rank4", DSMOE_DTYPE_F16, 4, {1, 3, 1, 7}},
    {"model.layers.0.mlp.gate.weight", DSMOE_DTYPE_F32, 2, {5, 3}},
    {"i64.vec", DSMOE_DTYPE_I64, 1, {3}},
    {"empty", DSMOE_DTYPE_F32, 2, {0, 3}},
    {"u8.scalar", DSMOE_DTYPE_U8, 0, {0}},
    {"f32.rank4", DSMOE_DTYPE_F32, 4, {2, 1, 3, 1}},
};
#define N_RT (int)(sizeof rt_specs / sizeof rt_specs[0])

static size_t spec_nbytes(const spec *s) {
    size_t n = dsmoe_dtype_size(s->dtype);
    for (int d = 0; d < s->ndim; d++) n *= (size_t)s->shape[d];
    return n;
}

static void check_view(const char *label, const dsmoe_tensor_view *v, const spec *s, const void *data) {
    tl_checks++;
    if (strcmp(v->name, s->name) != 0 || v->dtype != s->dtype || v->ndim != s->ndim ||
        v->nbytes != spec_nbytes(s)) {
        TL_FAIL("%s: got \"%s\" %s rank %d %zu bytes, want \"%s\" %s rank %d %zu bytes", label,
                v->name, dsmoe_dtype_name(v->dtype), (int)v->ndim, v->nbytes, s->name,
                dsmoe_dtype_name(s->dtype), (int)s->ndim, spec_nbytes(s));
        return;
    }
    for (int d = 0; d < s->ndim; d++) ASSERT_EQ_INT(v->shape[d], s->shape[d]);
    ASSERT_TRUE(v->data != NULL);
    if (v->nbytes && memcmp(v->data, data, v->nbytes) != 0) TL_FAIL("%s: \"%s\" data differs", label, s->name);
}

static void check_rt_file(const char *label, const dsmoe_safetensors *st, void *const *data) {
    ASSERT_EQ_INT(dsmoe_safetensors_count(st), N_RT);
    for (int i = 0; i < N_RT && i < dsmoe_safetensors_count(st); i++) {
        dsmoe_tensor_view v, w;
        ASSERT_OK(dsmoe_safetensors_at(st, i, &v)); /* file order = order added */
        check_view(label, &v, &rt_specs[i], data[i]);
        ASSERT_OK(dsmoe_safetensors_get(st, rt_specs[i].name, &w));
        check_view(label, &w, &rt_specs[i], data[i]);
    }
    ASSERT_EQ_INT(dsmoe_safetensors_metadata_count(st), 3);
    const char *k, *val;
    ASSERT_OK(dsmoe_safetensors_metadata_at(st, 0, &k, &val));
    ASSERT_TRUE(strcmp(k, "format") == 0 && strcmp(val, "pt") == 0);
    ASSERT_OK(dsmoe_safetensors_metadata_at(st, 2, &k, &val));
    ASSERT_TRUE(strcmp(k, "config") == 0 && strcmp(val, "{\"n\": 2}\n\ttab") == 0);
    ASSERT_TRUE(strcmp(dsmoe_safetensors_metadata(st, "dsmoe_version"), "0.1.0-replaced") == 0);
    ASSERT_TRUE(dsmoe_safetensors_metadata(st, "absent") == NULL);
}

static void test_roundtrip_all_dtypes_and_ranks(void) {
    const char *path = tl_tmp("test_st_rt.safetensors");
    void *data[N_RT];
    tl_seed(5);
    dsmoe_safetensors_writer *w;
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    ASSERT_OK(dsmoe_safetensors_writer_set_metadata(w, "format", "pt"));
    ASSERT_OK(dsmoe_safetensors_writer_set_metadata(w, "dsmoe_version", "0.1.0"));
    ASSERT_OK(dsmoe_safetensors_writer_set_metadata(w, "config", "{\"n\": 2}\n\ttab"));
    ASSERT_OK(dsmoe_safetensors_writer_set_metadata(w, "dsmoe_version", "0.1.0-replaced"));
    for (int i = 0; i < N_RT; i++) {
        size_t n = spec_nbytes(&rt_specs[i]);
        data[i] = malloc(n + 1);
        io_random_bytes(data[i], n);
        ASSERT_OK(dsmoe_safetensors_writer_add(w, rt_specs[i].name, rt_specs[i].dtype, rt_specs[i].ndim,
                                               rt_specs[i].shape, n ? data[i] : NULL));
    }
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path));
    dsmoe_safetensors_writer_free(w);
    ASSERT_EQ_INT(io_count_tmp_files(io_tmp_dir(), "test_st_"), 0);

    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(path, &st));
    if (st) check_rt_file("mmap", st, data);
    dsmoe_safetensors_close(st);
    ASSERT_OK(dsmoe__safetensors_open_file(path, 0, &st));
    if (st) check_rt_file("read", st, data);
    dsmoe_safetensors_close(st);

    size_t len;
    unsigned char *file = io_read_file(path, &len);
    ASSERT_OK(dsmoe_safetensors_open_memory(file, len, &st));
    if (st) {
        check_rt_file("memory", st, data);
        /* Zero-copy: views point into the caller's buffer. */
        dsmoe_tensor_view v;
        ASSERT_OK(dsmoe_safetensors_at(st, 1, &v));
        ASSERT_TRUE((const unsigned char *)v.data > file && (const unsigned char *)v.data < file + len);
    }

    /* Layout as the reference writes it: header a multiple of 8, padded with spaces;
     * data contiguous, larger elements first, each tensor aligned to its element size. */
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | file[i];
    ASSERT_EQ_INT(n % 8, 0);
    size_t json_end = 8 + (size_t)n;
    while (json_end > 8 && file[json_end - 1] == ' ') json_end--;
    ASSERT_EQ_INT(file[json_end - 1], '}');
    ASSERT_TRUE(8 + n - json_end < 8);
    size_t total = 0, prev_es = 8;
    for (int es = 8; es >= 1; es /= 2) /* walk in file order: by element size */
        for (int i = 0; i < N_RT; i++) {
            dsmoe_tensor_view v;
            if (!st || dsmoe_dtype_size(rt_specs[i].dtype) != (size_t)es) continue;
            ASSERT_OK(dsmoe_safetensors_at(st, i, &v));
            size_t off = (size_t)((const unsigned char *)v.data - file);
            ASSERT_EQ_INT(off, 8 + n + total);
            ASSERT_EQ_INT(off % (size_t)es, 0);
            ASSERT_TRUE((size_t)es <= prev_es);
            prev_es = (size_t)es;
            total += v.nbytes;
        }
    ASSERT_EQ_INT(8 + n + total, len); /* no gaps, nothing after */
    dsmoe_safetensors_close(st);
    free(file);
    for (int i = 0; i < N_RT; i++) free(data[i]);
    unlink(path);
}

/* --------------------------------------------------- Python-written files -- */

/* gen_io_fixtures.py ST_TENSORS, in the reference order: element size, then name. */
static const spec ref_specs[] = {
    {"a.f64", DSMOE_DTYPE_F64, 1, {3}},          {"b.i64", DSMOE_DTYPE_I64, 2, {2, 2}},
    {"c.f32", DSMOE_DTYPE_F32, 3, {2, 3, 5}},    {"d.i32", DSMOE_DTYPE_I32, 0, {0}},
    {"h.empty", DSMOE_DTYPE_F32, 2, {0, 3}},     {"e.bf16", DSMOE_DTYPE_BF16, 4, {1, 2, 3, 1}},
    {"f.f16", DSMOE_DTYPE_F16, 1, {5}},          {"g.u8", DSMOE_DTYPE_U8, 2, {3, 1}},
    {"i.u8", DSMOE_DTYPE_U8, 1, {7}},
};
#define N_REF (int)(sizeof ref_specs / sizeof ref_specs[0])

static void test_reference_writer_file(void) {
    const char *golden = tl_golden("io/st_ref.safetensors");
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(golden, &st));
    if (!st) return;
    void *want[N_REF];
    ASSERT_EQ_INT(dsmoe_safetensors_count(st), N_REF);
    dsmoe_safetensors_writer *w;
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    ASSERT_OK(dsmoe_safetensors_writer_set_metadata(w, "format", "pt"));
    ASSERT_OK(dsmoe_safetensors_writer_set_metadata(w, "dsmoe", "fixture"));
    for (int i = 0; i < N_REF; i++) {
        const spec *s = &ref_specs[i];
        int64_t numel = (int64_t)(spec_nbytes(s) / dsmoe_dtype_size(s->dtype));
        want[i] = malloc(spec_nbytes(s) + 8);
        io_fixture_values(s->dtype, numel, want[i]);
        dsmoe_tensor_view v;
        ASSERT_OK(dsmoe_safetensors_get(st, s->name, &v));
        check_view("st_ref", &v, s, want[i]);
        ASSERT_OK(dsmoe_safetensors_writer_add(w, s->name, s->dtype, s->ndim, s->shape, want[i]));
    }
    ASSERT_TRUE(strcmp(dsmoe_safetensors_metadata(st, "format"), "pt") == 0);
    ASSERT_TRUE(strcmp(dsmoe_safetensors_metadata(st, "dsmoe"), "fixture") == 0);

    /* Our writer, given the same tensors in the same order, writes the same bytes. */
    const char *path = tl_tmp("test_st_ref.safetensors");
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path));
    size_t l1, l2;
    unsigned char *ours = io_read_file(path, &l1), *theirs = io_read_file(golden, &l2);
    tl_checks++;
    if (!ours || !theirs || l1 != l2 || memcmp(ours, theirs, l1) != 0)
        TL_FAIL("writer output differs from the reference layout (%zu vs %zu bytes)", l1, l2);
    free(ours);
    free(theirs);
    dsmoe_safetensors_writer_free(w);
    dsmoe_safetensors_close(st);
    for (int i = 0; i < N_REF; i++) free(want[i]);
    unlink(path);
}

static void test_escapes_and_gaps_file(void) {
    static const char emb[] = "emb.\xc3\xa9\xf0\x9f\x98\x80"; /* "emb.é😀" */
    static const char quote[] = "q\"uote\\back";
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(tl_golden("io/st_escapes.safetensors"), &st));
    if (!st) return;
    ASSERT_EQ_INT(dsmoe_safetensors_count(st), 3);
    const spec specs[3] = {{emb, DSMOE_DTYPE_F32, 2, {2, 2}},
                           {"s", DSMOE_DTYPE_BF16, 1, {3}},
                           {quote, DSMOE_DTYPE_U8, 1, {3}}};
    for (int i = 0; i < 3; i++) {
        unsigned char want[16];
        io_fixture_values(specs[i].dtype, (int64_t)(spec_nbytes(&specs[i]) / dsmoe_dtype_size(specs[i].dtype)), want);
        dsmoe_tensor_view v;
        ASSERT_OK(dsmoe_safetensors_at(st, i, &v)); /* header order */
        check_view("st_escapes", &v, &specs[i], want);
    }
    ASSERT_EQ_INT(dsmoe_safetensors_metadata_count(st), 2);
    ASSERT_TRUE(strcmp(dsmoe_safetensors_metadata(st, "note"), "tab\there\nnewline \"q\" \\ /") == 0);
    ASSERT_TRUE(strcmp(dsmoe_safetensors_metadata(st, "\xc3\xa9t\xc3\xa9"), "\xf0\x9f\x98\x80") == 0);

    /* Written back by dsmoe (escaping names and values itself) and read again. */
    const char *path = tl_tmp("test_st_esc.safetensors");
    dsmoe_safetensors_writer *w;
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    for (int i = 0; i < 3; i++) {
        dsmoe_tensor_view v;
        ASSERT_OK(dsmoe_safetensors_at(st, i, &v));
        ASSERT_OK(dsmoe_safetensors_writer_add(w, v.name, v.dtype, v.ndim, v.shape, v.data));
    }
    for (int64_t i = 0; i < dsmoe_safetensors_metadata_count(st); i++) {
        const char *k, *val;
        ASSERT_OK(dsmoe_safetensors_metadata_at(st, i, &k, &val));
        ASSERT_OK(dsmoe_safetensors_writer_set_metadata(w, k, val));
    }
    ASSERT_OK(dsmoe_safetensors_writer_set_metadata(w, "ctl", "\x01\x1f\x7f\b\f\r"));
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path));
    dsmoe_safetensors_writer_free(w);
    dsmoe_safetensors *st2 = NULL;
    ASSERT_OK(dsmoe_safetensors_open(path, &st2));
    if (st2) {
        for (int i = 0; i < 3; i++) {
            dsmoe_tensor_view v, v2;
            ASSERT_OK(dsmoe_safetensors_at(st, i, &v));
            ASSERT_OK(dsmoe_safetensors_get(st2, specs[i].name, &v2));
            check_view("rewritten", &v2, &specs[i], v.data);
        }
        ASSERT_TRUE(strcmp(dsmoe_safetensors_metadata(st2, "note"), "tab\there\nnewline \"q\" \\ /") == 0);
        ASSERT_TRUE(strcmp(dsmoe_safetensors_metadata(st2, "ctl"), "\x01\x1f\x7f\b\f\r") == 0);
    }
    dsmoe_safetensors_close(st2);
    dsmoe_safetensors_close(st);
    unlink(path);
}

static void test_empty_file(void) {
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(tl_golden("io/st_empty.safetensors"), &st));
    ASSERT_EQ_INT(dsmoe_safetensors_count(st), 0);
    ASSERT_EQ_INT(dsmoe_safetensors_metadata_count(st), 0);
    dsmoe_tensor_view v;
    ASSERT_STATUS(dsmoe_safetensors_at(st, 0, &v), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_get(st, "x", &v), DSMOE_STATUS_NOT_FOUND);
    dsmoe_safetensors_close(st);
    const char *path = tl_tmp("test_st_empty.safetensors");
    dsmoe_safetensors_writer *w;
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path));
    dsmoe_safetensors_writer_free(w);
    size_t l1, l2;
    unsigned char *a = io_read_file(path, &l1), *b = io_read_file(tl_golden("io/st_empty.safetensors"), &l2);
    ASSERT_TRUE(a && b && l1 == 16 && l2 == 16 && memcmp(a, b, 16) == 0);
    free(a);
    free(b);
    unlink(path);
}

/* ------------------------------------------------------------ to fp32 -- */

static void test_tensor_to_f32(void) {
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(tl_golden("io/st_ref.safetensors"), &st));
    if (!st) return;
    static const char *const names[] = {"c.f32", "e.bf16", "f.f16", "h.empty"};
    for (int k = 0; k < 4; k++) {
        dsmoe_tensor_view v;
        ASSERT_OK(dsmoe_safetensors_get(st, names[k], &v));
        int64_t n = (int64_t)(v.nbytes / dsmoe_dtype_size(v.dtype));
        float got[32], want[32];
        double ref[32];
        io_fixture_values(DSMOE_DTYPE_F32, n, want); /* the fixtures hold v(i) exactly */
        for (int64_t i = 0; i < n; i++) ref[i] = want[i];
        ASSERT_OK(dsmoe_tensor_to_f32(&v, got));
        tl_allclose(names[k], got, ref, n, 0, 0);
    }
    /* Unaligned bf16 and f16 words convert too; values checked against core's scalar functions. */
    unsigned char buf[1 + 2 * 5];
    const float vals[5] = {1.0f, -2.5f, 65504.0f, 1e-3f, -0.0f};
    dsmoe_tensor_view v = {"u", DSMOE_DTYPE_BF16, 1, {5}, buf + 1, 10};
    for (int f = 0; f < 2; f++) {
        v.dtype = f ? DSMOE_DTYPE_F16 : DSMOE_DTYPE_BF16;
        for (int i = 0; i < 5; i++) {
            uint16_t h = f ? dsmoe_f32_to_f16(vals[i]) : dsmoe_f32_to_bf16(vals[i]);
            memcpy(buf + 1 + 2 * i, &h, 2);
        }
        float got[5];
        ASSERT_OK(dsmoe_tensor_to_f32(&v, got));
        for (int i = 0; i < 5; i++) {
            uint16_t h;
            memcpy(&h, buf + 1 + 2 * i, 2);
            float want = f ? dsmoe_f16_to_f32(h) : dsmoe_bf16_to_f32(h);
            tl_same_bits("unaligned", &got[i], &want, 1);
        }
    }
    float out[8];
    dsmoe_tensor_view iv;
    ASSERT_OK(dsmoe_safetensors_get(st, "d.i32", &iv));
    ASSERT_STATUS(dsmoe_tensor_to_f32(&iv, out), DSMOE_STATUS_UNSUPPORTED);
    ASSERT_MSG_HAS("i32", "d.i32");
    v.nbytes = 9;
    ASSERT_STATUS(dsmoe_tensor_to_f32(&v, out), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_tensor_to_f32(NULL, out), DSMOE_STATUS_INVALID_ARGUMENT);
    v.nbytes = 10;
    ASSERT_STATUS(dsmoe_tensor_to_f32(&v, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_safetensors_close(st);
}

/* ---------------------------------------------------------- malformed -- */

#define T1(dt, shape, offs) "{\"t\":{\"dtype\":\"" dt "\",\"shape\":" shape ",\"data_offsets\":" offs "}}"

static void test_malformed_headers(void) {
    /* Controls that must be accepted. */
    expect_json_ok("{}", 0, 0);
    expect_json_ok("{} \t\r\n", 0, 0);
    expect_json_ok(T1("F32", "[2]", "[0,8]"), 8, 1);
    expect_json_ok("{\"t\":{\"data_offsets\":[0,8],\"shape\":[2],\"dtype\":\"F32\"}}", 8, 1);
    expect_json_ok("{\"\\u0074\":{\"\\u0064type\":\"F\\u0033\\u0032\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, 1);
    expect_json_ok("{\"\\/\\b\\f\\n\\r\\t\\\"\\\\\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]}}", 1, 1);
    expect_json_ok("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
                   "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}", 8, 2);
    expect_json_ok("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
                   "\"z\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[2,2]}}", 4, 2);
    expect_json_ok(T1("U8", "[2]", "[3,5]"), 9, 1); /* gaps and unused bytes are tolerated */
    expect_json_ok(T1("F32", "[0,1099511627776]", "[0,0]"), 0, 1);
    expect_json_ok("{\"__metadata__\":{},\"t\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8, 1);

    static const struct {
        const char *json;
        size_t data;
        const char *want;
    } bad[] = {
        /* header start and end */
        {" {}", 0, "must start with '{'"},
        {"[]", 0, "must start with '{'"},
        {"\"x\"", 0, "must start with '{'"},
        {"{", 0, "missing '}'"},
        {"{} x", 0, "after the end of the JSON value"},
        {"{}}", 0, "after the end of the JSON value"},
        {"{}{}", 0, "after the end of the JSON value"},
        {"{}\x01", 0, "after the end"},
        /* JSON syntax */
        {"{,}", 0, "expected a quoted member name"},
        {"{\"a\"}", 0, "expected ':'"},
        {"{\"a\":}", 0, "must be an object"},
        {"{'t':{}}", 0, "expected a quoted member name"},
        {"{t:{}}", 0, "expected a quoted member name"},
        {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],}}", 8, "trailing comma"},
        {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2,],\"data_offsets\":[0,8]}}", 8, "trailing comma"},
        {"{\"t\":{\"dtype\":\"F32\" \"shape\":[2],\"data_offsets\":[0,8]}}", 8, "expected ',' or '}'"},
        {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2 2],\"data_offsets\":[0,8]}}", 8, "expected ',' or ']'"},
        {"{/*c*/}", 0, "expected a quoted member name"},
        /* strings */
        {"{\"t", 0, "unterminated string"},
        {"{\"t\\", 0, "unterminated string"},
        {"{\"a\x01\":{}}", 0, "unescaped control character"},
        {"{\"a\\x\":{}}", 0, "invalid escape"},
        {"{\"a\\u12\":{}}", 0, "4 hex digits"},
        {"{\"a\\uzzzz\":{}}", 0, "4 hex digits"},
        {"{\"a\\u0000\":{}}", 0, "NUL"},
        {"{\"a\\ud800\":{}}", 0, "lone UTF-16 surrogate"},
        {"{\"a\\udc00\":{}}", 0, "lone UTF-16 surrogate"},
        {"{\"a\\ud800\\u0041\":{}}", 0, "lone UTF-16 surrogate"},
        {"{\"a\xff\":{}}", 0, "invalid UTF-8"},
        {"{\"a\xc0\x80\":{}}", 0, "invalid UTF-8"},
        {"{\"a\xed\xa0\x80\":{}}", 0, "invalid UTF-8"},
        {"{\"a\xf4\x90\x80\x80\":{}}", 0, "invalid UTF-8"},
        {"{\"a\xe2\x82\":{}}", 0, "invalid UTF-8"},
        {"{\"a\x80\":{}}", 0, "invalid UTF-8"},
        /* tensor entries */
        {"{\"t\":[1]}", 0, "tensor \"t\" must be an object, found an array"},
        {"{\"t\":\"x\"}", 0, "must be an object, found a string"},
        {"{\"t\":1}", 0, "must be an object, found a number"},
        {"{\"t\":null}", 0, "found 'null}'"},
        {"{\"t\":{}}", 0, "tensor \"t\": missing \"dtype\""},
        {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "missing \"data_offsets\""},
        {"{\"t\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, "missing \"shape\""},
        {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}", 8, "unexpected key \"x\""},
        {"{\"t\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "duplicate key \"dtype\""},
        {T1("F8_E4M3", "[2]", "[0,2]"), 2, "dtype \"F8_E4M3\" is not supported"},
        {T1("f32", "[2]", "[0,8]"), 8, "dtype \"f32\" is not supported"},
        {T1("BOOL", "[2]", "[0,2]"), 2, "not supported"},
        {"{\"t\":{\"dtype\":32,\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "\"dtype\" must be a string"},
        {T1("F32", "2", "[0,8]"), 8, "\"shape\" must be an array"},
        {T1("F32", "[2.0]", "[0,8]"), 8, "fraction or exponent"},
        {T1("F32", "[2e0]", "[0,8]"), 8, "fraction or exponent"},
        {T1("F32", "[-2]", "[0,8]"), 8, "negative"},
        {T1("F32", "[\"2\"]", "[0,8]"), 8, "non-negative integer, found a string"},
        {T1("F32", "[null]", "[0,8]"), 8, "non-negative integer"},
        {T1("F32", "[[2]]", "[0,8]"), 8, "non-negative integer, found an array"},
        {T1("F32", "[02]", "[0,8]"), 8, "leading zeros"},
        {T1("F32", "[1,1,1,1,1,1,1,1,2]", "[0,8]"), 8, "more than 8 entries"},
        {T1("F32", "[1099511627777]", "[0,8]"), 8, "exceeds 2^40"},
        {T1("F32", "[18446744073709551616]", "[0,8]"), 8, "too large"},
        {T1("F32", "[99999999999999999999999999999999]", "[0,8]"), 8, "too large"},
        {T1("F32", "[1099511627776,1099511627776]", "[0,8]"), 8, "overflows"},
        {T1("U8", "[1099511627776,1099511627776,1099511627776,0]", "[0,0]"), 0, "overflows"},
        /* offsets */
        {T1("F32", "[2]", "[0]"), 8, "must hold 2 numbers, not 1"},
        {T1("F32", "[2]", "[0,8,8]"), 8, "more than 2 entries"},
        {T1("F32", "[2]", "[]"), 8, "must hold 2 numbers, not 0"},
        {T1("F32", "[2]", "{}"), 8, "\"data_offsets\" must be an array"},
        {T1("F32", "[2]", "[8,0]"), 8, "end before they begin"},
        {T1("F32", "[2]", "[0,8]"), 7, "run past the end of the 7-byte data section"},
        {T1("F32", "[2]", "[4,12]"), 8, "run past the end"},
        {T1("F32", "[2]", "[0,18446744073709551615]"), 8, "run past the end"},
        {T1("F32", "[2]", "[0,18446744073709551616]"), 8, "too large"},
        {T1("F32", "[2]", "[-1,7]"), 8, "negative"},
        {T1("F32", "[2]", "[0.0,8]"), 8, "fraction"},
        {T1("F32", "[2]", "[0,4]"), 8, "need 8 bytes but data_offsets [0, 4] hold 4"},
        {T1("F32", "[3]", "[0,8]"), 8, "need 12 bytes"},
        {T1("BF16", "[2,2]", "[0,16]"), 16, "need 8 bytes"},
        {T1("F32", "[]", "[0,8]"), 8, "need 4 bytes"},
        /* overlaps */
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[4,12]}}", 12, "overlap"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
         "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 4, "overlap"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]},"
         "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[10,12]},"
         "\"c\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[4,6]}}", 16, "overlap"},
        /* names */
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
         "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2, "duplicate tensor name \"a\""},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
         "\"\\u0061\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2, "duplicate tensor name"},
        /* metadata */
        {"{\"__metadata__\":{\"k\":1}}", 0, "__metadata__ value of \"k\" must be a string, found a number"},
        {"{\"__metadata__\":{\"k\":{}}}", 0, "must be a string, found an object"},
        {"{\"__metadata__\":{\"k\":[\"v\"]}}", 0, "must be a string, found an array"},
        {"{\"__metadata__\":{\"k\":null}}", 0, "must be a string"},
        {"{\"__metadata__\":{\"k\":true}}", 0, "must be a string"},
        {"{\"__metadata__\":\"x\"}", 0, "\"__metadata__\" must be an object"},
        {"{\"__metadata__\":[]}", 0, "\"__metadata__\" must be an object"},
        {"{\"__metadata__\":{},\"__metadata__\":{}}", 0, "duplicate \"__metadata__\""},
        {"{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0, "duplicate __metadata__ key \"k\""},
        {"{\"__metadata__\":{\"k\":\"v\",}}", 0, "trailing comma"},
        /* bare words JSON has no place for here */
        {"{\"t\":NaN}", 0, "found 'NaN}'"},
        {"{\"t\":{\"dtype\":\"F32\",\"shape\":[Infinity],\"data_offsets\":[0,8]}}", 8, "non-negative integer"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) expect_json_bad(bad[i].json, bad[i].data, bad[i].want);

    /* Deep nesting where a tensor, a shape or a metadata value is expected. */
    static const char *const prefixes[] = {"{\"t\":", "{\"t\":{\"dtype\":\"F32\",\"shape\":",
                                           "{\"__metadata__\":{\"k\":", "{\"__metadata__\":"};
    for (size_t p = 0; p < 4; p++) {
        size_t depth = 100000, pl = strlen(prefixes[p]);
        char *deep = (char *)malloc(pl + 2 * depth + 1);
        memcpy(deep, prefixes[p], pl);
        for (size_t i = 0; i < depth; i++) deep[pl + i] = p == 3 ? '{' : '[';
        for (size_t i = 0; i < depth; i++) deep[pl + depth + i] = p == 3 ? '}' : ']';
        size_t len;
        unsigned char *b = st_image(deep, pl + 2 * depth, 0, 0, &len);
        expect_st_bad("deep nesting", b, len, NULL);
        free(b);
        free(deep);
    }
    /* A JSON nesting bomb also fails at the first level that breaks the schema. */
    expect_json_bad("{\"__metadata__\":{\"k\":{\"k\":{\"k\":{}}}}}", 0, "must be a string, found an object");
}

static void test_bad_lengths(void) {
    /* Fewer than 8 bytes. */
    unsigned char small[8] = {2, 0, 0, 0, 0, 0, 0, 0};
    for (size_t n = 0; n < 8; n++) {
        unsigned char *c = (unsigned char *)malloc(n + 1);
        memcpy(c, small, n);
        expect_st_bad("short file", n ? c : NULL, n, "too short");
        free(c);
    }
    /* Header length past the end, above 100 MiB, and 2^64 - 1. */
    static const uint64_t lens[] = {3, 100, (uint64_t)100 * 1024 * 1024 + 1, UINT64_MAX,
                                    (uint64_t)1 << 63};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        unsigned char f[10] = {0, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
        for (int k = 0; k < 8; k++) f[k] = (unsigned char)(lens[i] >> (8 * k));
        expect_st_bad("bad header length", f, sizeof f, lens[i] > 1000 ? "100 MiB" : "runs past the end");
    }
    /* Zero header length. */
    unsigned char z[8] = {0};
    expect_st_bad("zero header length", z, 8, "not a safetensors file");
    unsigned char z2[10] = {0, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    expect_st_bad("zero header length before '{}'", z2, sizeof z2, "header length 0 at byte 0");
    ASSERT_STATUS(dsmoe_safetensors_open_memory(NULL, 5, &(dsmoe_safetensors *){NULL}),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_open_memory(z, 8, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
}

/* Something that is not a safetensors file at all (text, a .npy file, zeros) is
 * called that, instead of an absurd header length; a damaged safetensors file
 * (its byte 8 opens the JSON header) keeps the detailed message. */
static void test_not_a_safetensors_file(void) {
    static const char text[] = "model: deepseek-v3\nexperts: 256\n";
    expect_st_bad("a text file", text, sizeof text - 1, "not a safetensors file");
    expect_st_bad("a text file", text, sizeof text - 1, "above the 100 MiB limit");
    expect_st_bad("8 bytes of text", text, 8, "nothing follows them");
    unsigned char zeros[64] = {0};
    expect_st_bad("zeros", zeros, sizeof zeros, "not a safetensors file (bytes 0-7 give a header length of 0");
    expect_st_bad("zeros", zeros, sizeof zeros, "byte 8 is 0x00");
    /* A small length past the end and no '{' after it. */
    unsigned char small[12] = {100, 0, 0, 0, 0, 0, 0, 0, 'a', 'b', 'c', 'd'};
    expect_st_bad("small length, no JSON", small, sizeof small, "past the end of the 12-byte file");
    size_t nlen;
    unsigned char *npy = io_read_file(tl_golden("io/f32_3x4.npy"), &nlen);
    ASSERT_TRUE(npy != NULL);
    if (npy) expect_st_bad("a .npy file", npy, nlen, "not a safetensors file");
    free(npy);
    /* A real file cut short, or with a bad length: still the detailed messages. */
    size_t len;
    unsigned char *good = io_read_file(tl_golden("io/st_ref.safetensors"), &len);
    ASSERT_TRUE(good != NULL && len > 40);
    if (good) {
        expect_st_bad("cut to 40 bytes", good, 40, "runs past the end of the 40-byte file");
        unsigned char saved = good[7];
        good[7] = 0x10;
        expect_st_bad("huge length before a '{'", good, len, "exceeds the 100 MiB limit");
        good[7] = saved;
        good[8] = ' ';
        expect_st_bad("sane length, no '{'", good, len, "must start with '{'");
    }
    free(good);
    /* On disk, the message starts with the path. */
    const char *path = tl_tmp("test_st_text.safetensors");
    ASSERT_TRUE(io_write_file(path, text, sizeof text - 1));
    dsmoe_safetensors *st = NULL;
    ASSERT_STATUS(dsmoe_safetensors_open(path, &st), DSMOE_STATUS_FORMAT);
    char want[4200];
    snprintf(want, sizeof want, "%s: not a safetensors file (", path);
    tl_checks++;
    if (strncmp(dsmoe_last_error(), want, strlen(want)) != 0)
        TL_FAIL("message \"%s\" does not start with \"%s\"", dsmoe_last_error(), want);
    ASSERT_TRUE(st == NULL);
    unlink(path);
}

/* Every prefix of a valid file is invalid, and none is read past its end. */
static void test_truncation_at_every_byte(void) {
    size_t len;
    unsigned char *good = io_read_file(tl_golden("io/st_ref.safetensors"), &len);
    ASSERT_TRUE(good != NULL);
    if (!good) return;
    for (size_t cut = 0; cut < len; cut++) {
        unsigned char *c = (unsigned char *)malloc(cut ? cut : 1); /* exact size for ASan */
        memcpy(c, good, cut);
        char label[64];
        snprintf(label, sizeof label, "truncated to %zu of %zu", cut, len);
        expect_st_bad(label, c, cut, NULL);
        free(c);
    }
    free(good);
}

/* Every single-byte change in the length and header: OK or FORMAT, never a crash. */
static void test_header_byte_flips(void) {
    size_t len;
    unsigned char *good = io_read_file(tl_golden("io/st_ref.safetensors"), &len);
    ASSERT_TRUE(good != NULL);
    if (!good) return;
    size_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | good[i];
    static const unsigned char xors[] = {0x01, 0x02, 0x08, 0x20, 0x40, 0x80, 0xff};
    unsigned char *m = (unsigned char *)malloc(len);
    int ok = 0, bad = 0;
    for (size_t i = 0; i < 8 + n; i++) {
        for (size_t x = 0; x < sizeof xors; x++) {
            memcpy(m, good, len);
            m[i] ^= xors[x];
            dsmoe_safetensors *st = NULL;
            dsmoe_clear_error();
            dsmoe_status s = dsmoe_safetensors_open_memory(m, len, &st);
            if (s == DSMOE_OK) {
                ok++;
                st_touch_all(st);
                dsmoe_safetensors_close(st);
            } else {
                bad++;
                tl_checks++;
                if (s != DSMOE_STATUS_FORMAT || !dsmoe_last_error()[0] || st != NULL)
                    TL_FAIL("flip byte %zu ^ 0x%02x: %s \"%s\"", i, xors[x], dsmoe_status_name(s),
                            dsmoe_last_error());
            }
        }
    }
    ASSERT_TRUE(ok > 0 && bad > 0); /* e.g. a changed letter in a name stays valid */
    free(m);
    free(good);
}

/* --------------------------------------------------- files and arguments -- */

static void test_open_errors_and_lookups(void) {
    dsmoe_safetensors *st = (dsmoe_safetensors *)(uintptr_t)1;
    ASSERT_STATUS(dsmoe_safetensors_open(tl_tmp("no_such_dir/m.safetensors"), &st), DSMOE_STATUS_IO);
    ASSERT_MSG_HAS("missing file", "no_such_dir/m.safetensors");
    ASSERT_TRUE(st == NULL);
    ASSERT_STATUS(dsmoe_safetensors_open(io_tmp_dir(), &st), DSMOE_STATUS_IO);
    ASSERT_STATUS(dsmoe_safetensors_open(NULL, &st), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_open("x", NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    /* A malformed file on disk: FORMAT, the message names the file. */
    const char *path = tl_tmp("test_st_bad.safetensors");
    size_t len;
    unsigned char *b = st_image(T1("F32", "[2]", "[0,8]"), strlen(T1("F32", "[2]", "[0,8]")), 0, 4, &len);
    ASSERT_TRUE(io_write_file(path, b, len));
    free(b);
    for (int mode = 0; mode < 2; mode++) {
        ASSERT_STATUS(dsmoe__safetensors_open_file(path, mode, &st), DSMOE_STATUS_FORMAT);
        ASSERT_MSG_HAS("bad file", "test_st_bad.safetensors");
        ASSERT_MSG_HAS("bad file", "tensor \"t\"");
        ASSERT_TRUE(st == NULL);
    }
    unlink(path);

    ASSERT_OK(dsmoe_safetensors_open(tl_golden("io/st_ref.safetensors"), &st));
    if (!st) return;
    dsmoe_tensor_view v;
    ASSERT_STATUS(dsmoe_safetensors_get(st, "nope", &v), DSMOE_STATUS_NOT_FOUND);
    ASSERT_MSG_HAS("not found", "\"nope\"");
    ASSERT_TRUE(io_all_zero(&v, sizeof v));
    ASSERT_STATUS(dsmoe_safetensors_get(st, NULL, &v), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_get(st, "a.f64", NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_at(st, -1, &v), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_at(st, N_REF, &v), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_at(NULL, 0, &v), DSMOE_STATUS_INVALID_ARGUMENT);
    const char *k = "x", *val = "y";
    ASSERT_STATUS(dsmoe_safetensors_metadata_at(st, 2, &k, &val), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(k == NULL && val == NULL);
    ASSERT_TRUE(dsmoe_safetensors_metadata(NULL, "format") == NULL);
    ASSERT_TRUE(dsmoe_safetensors_metadata(st, NULL) == NULL);
    ASSERT_EQ_INT(dsmoe_safetensors_count(NULL), 0);
    ASSERT_EQ_INT(dsmoe_safetensors_metadata_count(NULL), 0);
    /* Every tensor can be found by its own name. */
    for (int64_t i = 0; i < dsmoe_safetensors_count(st); i++) {
        dsmoe_tensor_view a, g;
        ASSERT_OK(dsmoe_safetensors_at(st, i, &a));
        ASSERT_OK(dsmoe_safetensors_get(st, a.name, &g));
        ASSERT_TRUE(g.data == a.data && g.name == a.name);
    }
    dsmoe_safetensors_close(st);
    dsmoe_safetensors_close(NULL);
}

static void test_writer_errors(void) {
    char path[4096]; /* tl_tmp() reuses its buffer */
    snprintf(path, sizeof path, "%s", tl_tmp("test_st_werr.safetensors"));
    const int64_t shape[2] = {2, 3}, neg[2] = {2, -1}, big[3] = {1 << 30, 1 << 30, 1 << 30};
    float data[6] = {0};
    dsmoe_safetensors_writer *w;
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    ASSERT_STATUS(dsmoe_safetensors_writer_add(w, "x", (dsmoe_dtype)99, 2, shape, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_writer_add(w, "x", DSMOE_DTYPE_F32, 9, shape, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_writer_add(w, "x", DSMOE_DTYPE_F32, 2, neg, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_writer_add(w, "x", DSMOE_DTYPE_F32, 3, big, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_writer_add(w, "x", DSMOE_DTYPE_F32, 2, shape, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_writer_add(w, NULL, DSMOE_DTYPE_F32, 2, shape, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_writer_add(w, "", DSMOE_DTYPE_F32, 2, shape, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_writer_add(w, "__metadata__", DSMOE_DTYPE_F32, 2, shape, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_writer_add(w, "bad\xff", DSMOE_DTYPE_F32, 2, shape, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_writer_set_metadata(w, "k", "\xc0\x80"), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_writer_set_metadata(w, NULL, "v"), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_safetensors_writer_add(NULL, "x", DSMOE_DTYPE_F32, 2, shape, data), DSMOE_STATUS_INVALID_ARGUMENT);
    /* Zero-size tensors need no data. */
    const int64_t zero[1] = {0};
    ASSERT_OK(dsmoe_safetensors_writer_add(w, "z", DSMOE_DTYPE_F32, 1, zero, NULL));
    /* Duplicate names are found at save; nothing is written. */
    ASSERT_OK(dsmoe_safetensors_writer_add(w, "x", DSMOE_DTYPE_F32, 2, shape, data));
    ASSERT_OK(dsmoe_safetensors_writer_add(w, "x", DSMOE_DTYPE_F32, 2, shape, data));
    ASSERT_STATUS(dsmoe_safetensors_writer_save(w, path), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_MSG_HAS("duplicate", "\"x\" was added twice");
    struct stat sb;
    ASSERT_TRUE(stat(path, &sb) != 0);
    dsmoe_safetensors_writer_free(w);
    dsmoe_safetensors_writer_free(NULL);

    /* Unwritable destination: IO, and no temporary file left. */
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    ASSERT_OK(dsmoe_safetensors_writer_add(w, "x", DSMOE_DTYPE_F32, 2, shape, data));
    ASSERT_STATUS(dsmoe_safetensors_writer_save(w, tl_tmp("no_such_dir/m.safetensors")), DSMOE_STATUS_IO);
    ASSERT_MSG_HAS("missing folder", "no_such_dir");
    ASSERT_STATUS(dsmoe_safetensors_writer_save(w, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    char dir[4096]; /* a rename onto a folder fails after the data was written */
    snprintf(dir, sizeof dir, "%s", tl_tmp("test_st_a_folder"));
    rmdir(dir);
    ASSERT_TRUE(mkdir(dir, 0755) == 0);
    ASSERT_STATUS(dsmoe_safetensors_writer_save(w, dir), DSMOE_STATUS_IO);
    ASSERT_TRUE(rmdir(dir) == 0);
    ASSERT_EQ_INT(io_count_tmp_files(io_tmp_dir(), "test_st_"), 0);
    /* Saving twice replaces the file atomically. */
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path));
    ASSERT_OK(dsmoe_safetensors_writer_set_metadata(w, "v", "2"));
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path));
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(path, &st));
    ASSERT_TRUE(st && strcmp(dsmoe_safetensors_metadata(st, "v"), "2") == 0);
    dsmoe_safetensors_close(st);
    dsmoe_safetensors_writer_free(w);
    ASSERT_EQ_INT(io_count_tmp_files(io_tmp_dir(), "test_st_"), 0);
    unlink(path);
}

int main(void) {
    RUN(test_roundtrip_all_dtypes_and_ranks);
    RUN(test_reference_writer_file);
    RUN(test_escapes_and_gaps_file);
    RUN(test_empty_file);
    RUN(test_tensor_to_f32);
    RUN(test_malformed_headers);
    RUN(test_bad_lengths);
    RUN(test_not_a_safetensors_file);
    RUN(test_truncation_at_every_byte);
    RUN(test_header_byte_flips);
    RUN(test_open_errors_and_lookups);
    RUN(test_writer_errors);
    return TEST_SUMMARY();
}
