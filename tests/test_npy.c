/*
 * test_npy.c — .npy reading and writing: round trips for every dtype and ranks
 * 0..4, files written by NumPy itself (tests/golden/io, made by
 * tests/ref/gen_io_fixtures.py) read correctly and re-written byte for byte, and a
 * long list of malformed inputs built here, each of which must fail with FORMAT,
 * a message naming the problem, and a zeroed output.
 */
#include "io_testutil.h"
#include "io/io_internal.h"

#include <sys/stat.h>
#include <unistd.h>

static const dsmoe_dtype all_dtypes[] = {DSMOE_DTYPE_F32, DSMOE_DTYPE_I32, DSMOE_DTYPE_BF16,
                                         DSMOE_DTYPE_F16, DSMOE_DTYPE_F64, DSMOE_DTYPE_I64,
                                         DSMOE_DTYPE_U8};
#define N_DTYPES (int)(sizeof all_dtypes / sizeof all_dtypes[0])

/* A .npy image with the given version and raw header text (no padding added). */
static unsigned char *make_npy(int major, const char *header, const void *data, size_t nbytes,
                               size_t *len) {
    size_t hlen = strlen(header), pre = major == 1 ? 10 : 12;
    *len = pre + hlen + nbytes;
    unsigned char *b = (unsigned char *)malloc(*len + 1);
    memcpy(b, "\x93NUMPY", 6);
    b[6] = (unsigned char)major;
    b[7] = 0;
    for (size_t i = 0; i < pre - 8; i++) b[8 + i] = (unsigned char)(hlen >> (8 * i));
    memcpy(b + pre, header, hlen);
    if (nbytes) memcpy(b + pre + hlen, data, nbytes);
    return b;
}

/* Parses buf and expects FORMAT, a message containing `want`, and a zeroed array. */
static void expect_bad(const char *label, const void *buf, size_t len, const char *want) {
    dsmoe_array a;
    memset(&a, 0x5a, sizeof a);
    dsmoe_clear_error();
    dsmoe_status s = dsmoe_npy_parse(buf, len, &a);
    tl_checks++;
    if (s != DSMOE_STATUS_FORMAT) {
        TL_FAIL("%s: got %s, want FORMAT (%s)", label, dsmoe_status_name(s), dsmoe_last_error());
        if (s == DSMOE_OK) dsmoe_array_free(&a);
        return;
    }
    if (!dsmoe_last_error()[0]) TL_FAIL("%s: empty message", label);
    ASSERT_MSG_HAS(label, want);
    if (!io_all_zero(&a, sizeof a)) TL_FAIL("%s: output not zeroed", label);
}

static void expect_bad_header(const char *header, const char *want) {
    char data[64] = {0};
    size_t len;
    unsigned char *b = make_npy(1, header, data, 12, &len);
    expect_bad(header, b, len, want);
    free(b);
}

/* ------------------------------------------------------------ round trips -- */

static void check_same(const char *label, const dsmoe_array *got, dsmoe_dtype dtype, int32_t ndim,
                       const int64_t *shape, const void *data, size_t nbytes) {
    tl_checks++;
    if (got->dtype != dtype || got->ndim != ndim || got->nbytes != nbytes) {
        TL_FAIL("%s: got %s rank %d (%zu bytes), want %s rank %d (%zu bytes)", label,
                dsmoe_dtype_name(got->dtype), (int)got->ndim, got->nbytes, dsmoe_dtype_name(dtype),
                (int)ndim, nbytes);
        return;
    }
    for (int32_t d = 0; d < ndim; d++) ASSERT_EQ_INT(got->shape[d], shape[d]);
    for (int32_t d = ndim; d < DSMOE_MAX_DIMS; d++) ASSERT_EQ_INT(got->shape[d], 0);
    ASSERT_TRUE(got->data != NULL);
    if (nbytes && memcmp(got->data, data, nbytes) != 0) TL_FAIL("%s: data differs", label);
}

static void test_roundtrip_all_dtypes_and_ranks(void) {
    static const int64_t shapes[][4] = {{0}, {7}, {3, 5}, {2, 3, 5}, {1, 3, 1, 7}, {2, 0, 3}, {0}};
    static const int32_t ranks[] = {0, 1, 2, 3, 4, 3, 1};
    const char *path = tl_tmp("test_npy_rt.npy");
    tl_seed(11);
    for (int t = 0; t < N_DTYPES; t++) {
        for (int k = 0; k < (int)(sizeof ranks / sizeof ranks[0]); k++) {
            dsmoe_dtype dt = all_dtypes[t];
            int64_t numel = 1;
            for (int d = 0; d < ranks[k]; d++) numel *= shapes[k][d];
            size_t nbytes = (size_t)numel * dsmoe_dtype_size(dt);
            unsigned char *data = (unsigned char *)malloc(nbytes + 1);
            io_random_bytes(data, nbytes);
            char label[64];
            snprintf(label, sizeof label, "%s rank %d case %d", dsmoe_dtype_name(dt), ranks[k], k);

            ASSERT_OK(dsmoe_npy_write_raw(path, dt, ranks[k], shapes[k], data));
            dsmoe_array got;
            ASSERT_OK(dsmoe_npy_read(path, &got));
            check_same(label, &got, dt, ranks[k], shapes[k], data, nbytes);

            /* The header ends at a multiple of 64 bytes, with a '\n', as NumPy's. */
            size_t len;
            unsigned char *file = io_read_file(path, &len);
            ASSERT_TRUE(file != NULL && len >= nbytes + 64);
            size_t hend = len - nbytes;
            ASSERT_EQ_INT(hend % 64, 0);
            ASSERT_EQ_INT(file[hend - 1], '\n');
            ASSERT_EQ_INT(file[8] | file[9] << 8, hend - 10);

            /* The same image parsed from memory, and re-written from the array. */
            dsmoe_array again;
            ASSERT_OK(dsmoe_npy_parse(file, len, &again));
            check_same(label, &again, dt, ranks[k], shapes[k], data, nbytes);
            ASSERT_OK(dsmoe_npy_write(path, &again));
            size_t len2;
            unsigned char *file2 = io_read_file(path, &len2);
            ASSERT_TRUE(len2 == len && memcmp(file, file2, len) == 0);

            free(file);
            free(file2);
            dsmoe_array_free(&got);
            dsmoe_array_free(&again);
            free(data);
        }
    }
    ASSERT_EQ_INT(io_count_tmp_files(io_tmp_dir(), "test_npy"), 0);
    unlink(path);
}

static void test_max_rank_and_odd_sizes(void) {
    const int64_t shape[DSMOE_MAX_DIMS] = {1, 2, 1, 3, 1, 1, 5, 1};
    float data[30];
    for (int i = 0; i < 30; i++) data[i] = (float)i - 7.5f;
    const char *path = tl_tmp("test_npy_rank8.npy");
    ASSERT_OK(dsmoe_npy_write_raw(path, DSMOE_DTYPE_F32, DSMOE_MAX_DIMS, shape, data));
    dsmoe_array a;
    ASSERT_OK(dsmoe_npy_read(path, &a));
    check_same("rank 8", &a, DSMOE_DTYPE_F32, DSMOE_MAX_DIMS, shape, data, sizeof data);
    dsmoe_array_free(&a);
    /* A large odd dimension: the header's digits and growth padding change. */
    const int64_t big[1] = {100003};
    uint8_t *u = (uint8_t *)malloc(100003);
    io_random_bytes(u, 100003);
    ASSERT_OK(dsmoe_npy_write_raw(path, DSMOE_DTYPE_U8, 1, big, u));
    ASSERT_OK(dsmoe_npy_read(path, &a));
    check_same("u8 100003", &a, DSMOE_DTYPE_U8, 1, big, u, 100003);
    dsmoe_array_free(&a);
    free(u);
    unlink(path);
}

/* ----------------------------------------------------------- NumPy files -- */

typedef struct fixture {
    const char *file;
    dsmoe_dtype dtype;
    int32_t ndim;
    int64_t shape[4];
    int np_save_v1; /* written by np.save with defaults: our writer must match bytes */
} fixture;

static const fixture good_fixtures[] = {
    {"f32_3x4.npy", DSMOE_DTYPE_F32, 2, {3, 4}, 1},
    {"f32_v2_2x3.npy", DSMOE_DTYPE_F32, 2, {2, 3}, 0},
    {"f32_v3_2x3.npy", DSMOE_DTYPE_F32, 2, {2, 3}, 0},
    {"f32_2x1x3x2.npy", DSMOE_DTYPE_F32, 4, {2, 1, 3, 2}, 1},
    {"f32_scalar.npy", DSMOE_DTYPE_F32, 0, {0}, 1},
    {"f32_0x3.npy", DSMOE_DTYPE_F32, 2, {0, 3}, 1},
    {"i32_5.npy", DSMOE_DTYPE_I32, 1, {5}, 1},
    {"i64_2x3.npy", DSMOE_DTYPE_I64, 2, {2, 3}, 1},
    {"f64_7.npy", DSMOE_DTYPE_F64, 1, {7}, 1},
    {"f16_3x3.npy", DSMOE_DTYPE_F16, 2, {3, 3}, 1},
    {"u8_2x5.npy", DSMOE_DTYPE_U8, 2, {2, 5}, 1},
    {"bf16_2x3.npy", DSMOE_DTYPE_BF16, 2, {2, 3}, 1},
    {"f32_legacy16_4.npy", DSMOE_DTYPE_F32, 1, {4}, 0},
};

static void test_numpy_written_files(void) {
    const char *path = tl_tmp("test_npy_fixture.npy");
    for (size_t f = 0; f < sizeof good_fixtures / sizeof good_fixtures[0]; f++) {
        const fixture *fx = &good_fixtures[f];
        char rel[128];
        snprintf(rel, sizeof rel, "io/%s", fx->file);
        dsmoe_array a;
        dsmoe_status s = dsmoe_npy_read(tl_golden(rel), &a);
        ASSERT_OK(s);
        if (s != DSMOE_OK) continue;
        int64_t numel = 1;
        for (int d = 0; d < fx->ndim; d++) numel *= fx->shape[d];
        size_t nbytes = (size_t)numel * dsmoe_dtype_size(fx->dtype);
        void *want = malloc(nbytes + 8);
        io_fixture_values(fx->dtype, numel, want);
        check_same(fx->file, &a, fx->dtype, fx->ndim, fx->shape, want, nbytes);
        if (fx->np_save_v1) {
            ASSERT_OK(dsmoe_npy_write(path, &a));
            size_t l1, l2;
            unsigned char *ours = io_read_file(path, &l1), *theirs = io_read_file(tl_golden(rel), &l2);
            tl_checks++;
            if (!ours || !theirs || l1 != l2 || memcmp(ours, theirs, l1) != 0)
                TL_FAIL("%s: our writer's bytes differ from NumPy's (%zu vs %zu bytes)", fx->file, l1, l2);
            free(ours);
            free(theirs);
        }
        free(want);
        dsmoe_array_free(&a);
    }
    unlink(path);
}

static void test_numpy_files_we_reject(void) {
    static const struct {
        const char *file, *want;
    } bad[] = {
        {"io/bad_fortran_3x4.npy", "fortran_order is True"},
        {"io/bad_bigendian_3.npy", "big-endian"},
        {"io/bad_bool_3.npy", "'|b1' is not supported"},
        {"io/bad_struct_2.npy", "structured"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        dsmoe_array a;
        memset(&a, 0x5a, sizeof a);
        ASSERT_STATUS(dsmoe_npy_read(tl_golden(bad[i].file), &a), DSMOE_STATUS_FORMAT);
        ASSERT_MSG_HAS(bad[i].file, bad[i].want);
        ASSERT_MSG_HAS(bad[i].file, bad[i].file); /* the message names the file */
        ASSERT_TRUE(io_all_zero(&a, sizeof a));
    }
}

/* -------------------------------------------------------- header grammar -- */

static void test_header_variants_accepted(void) {
    /* Shape (3,) or (1, 3) of F32 in every case; data is 12 bytes. */
    static const struct {
        const char *header;
        int32_t ndim;
    } ok[] = {
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", 1},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,)}", 1},
        {"{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (3,)}", 1},
        {"{'shape': (3,), 'fortran_order': False, 'descr': '<f4'}", 1},
        {"{'fortran_order':False,'shape':(3,),'descr':'<f4',}", 1},
        {"  {\n\t'descr' : '<f4' ,\r\n 'fortran_order' :\tFalse , 'shape' : ( 3 , ) , }  \n", 1},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3)}", 2},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,3,)}", 2},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': ( 1 ,\n 3 )}\n", 2},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }\f", 1},
    };
    float data[3] = {1.5f, -2.0f, 0.25f};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        size_t len;
        unsigned char *b = make_npy(1, ok[i].header, data, sizeof data, &len);
        dsmoe_array a;
        dsmoe_status s = dsmoe_npy_parse(b, len, &a);
        tl_checks++;
        if (s != DSMOE_OK) {
            TL_FAIL("%s: %s", ok[i].header, dsmoe_last_error());
        } else {
            ASSERT_EQ_INT(a.ndim, ok[i].ndim);
            ASSERT_EQ_INT(a.shape[a.ndim - 1], 3);
            ASSERT_TRUE(memcmp(a.data, data, sizeof data) == 0);
        }
        dsmoe_array_free(&a);
        free(b);
    }
    /* '<u1' is accepted as well as NumPy's '|u1'; a v2 header with a bigger length. */
    size_t len;
    unsigned char bytes[3] = {1, 2, 3};
    unsigned char *b = make_npy(2, "{'descr': '<u1', 'fortran_order': False, 'shape': (3,)}",
                                bytes, 3, &len);
    dsmoe_array a;
    ASSERT_OK(dsmoe_npy_parse(b, len, &a));
    ASSERT_EQ_INT(a.dtype, DSMOE_DTYPE_U8);
    dsmoe_array_free(&a);
    free(b);
}

static void test_header_variants_rejected(void) {
    static const struct {
        const char *header, *want;
    } bad[] = {
        {"", "not a dict"},
        {"   ", "not a dict"},
        {"[]", "not a dict"},
        {"'descr'", "not a dict"},
        {"{", "expected a quoted string"},
        {"{}", "missing key 'descr'"},
        {"{,}", "expected a quoted string"},
        {"{'fortran_order': False, 'shape': (3,)}", "missing key 'descr'"},
        {"{'descr': '<f4', 'shape': (3,)}", "missing key 'fortran_order'"},
        {"{'descr': '<f4', 'fortran_order': False}", "missing key 'shape'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'extra': 1}", "unexpected key 'extra'"},
        {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (3,)}", "duplicate key 'descr'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3)}", "write (3,)"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': [3]}", "must be a tuple"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': 3}", "to open the 'shape' tuple"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (-3,)}", "negative"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1.5,)}", "expected ',' or ')'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (03,)}", "leading zero"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3L,)}", "not a plain decimal"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1_000,)}", "not a plain decimal"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (0x3,)}", "not a plain decimal"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2**3,)}", "expected ',' or ')'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (,)}", "expected a dimension"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,,)}", "expected a dimension"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3 4)}", "expected ',' or ')'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,)", "expected ',' or '}'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,", "expected a dimension"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627777,)}", "exceeds the limit"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999999,)}", "exceeds the limit"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1099511627776)}", "overflows"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 2)}", "overflows"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,1,1,1,1,1,1,1,1)}", "more than 8"},
        {"{'descr': '>f4', 'fortran_order': False, 'shape': (3,)}", "big-endian"},
        {"{'descr': '>u2', 'fortran_order': False, 'shape': (3,)}", "big-endian"},
        {"{'descr': '=f4', 'fortran_order': False, 'shape': (3,)}", "'=f4' is not supported"},
        {"{'descr': 'float32', 'fortran_order': False, 'shape': (3,)}", "not supported"},
        {"{'descr': '<c8', 'fortran_order': False, 'shape': (3,)}", "not supported"},
        {"{'descr': '<f4 ', 'fortran_order': False, 'shape': (3,)}", "not supported"},
        {"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,)}", "structured"},
        {"{'descr': 3, 'fortran_order': False, 'shape': (3,)}", "expected a quoted string"},
        {"{'descr': '<f4', 'fortran_order': True, 'shape': (3,)}", "fortran_order is True"},
        {"{'descr': '<f4', 'fortran_order': 'False', 'shape': (3,)}", "must be True or False"},
        {"{'descr': '<f4', 'fortran_order': false, 'shape': (3,)}", "must be True or False"},
        {"{'descr': '<f4', 'fortran_order': 0, 'shape': (3,)}", "must be True or False"},
        {"{'descr': '<f4', 'fortran_order': Falsey, 'shape': (3,)}", "must be True or False"},
        {"{'descr': '<f4\", 'fortran_order': False, 'shape': (3,)}", "not supported"},
        {"{'descr: '<f4', 'fortran_order': False, 'shape': (3,)}", "unexpected key"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'x", "unterminated string"},
        {"{'de\\x73cr': '<f4', 'fortran_order': False, 'shape': (3,)}", "escape"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,)}}", "after the header dict"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,)} x", "after the header dict"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,),,}", "expected a quoted string"},
        {"{'descr': '<f4' 'fortran_order': False, 'shape': (3,)}", "expected ',' or '}'"},
        {"{'descr' '<f4', 'fortran_order': False, 'shape': (3,)}", "expected ':'"},
        {"{'descr': '<f4', # comment\n 'fortran_order': False, 'shape': (3,)}", "expected a quoted"},
        {"{'descr': '<f\x01', 'fortran_order': False, 'shape': (3,)}", "control character"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,)}\\\n", "after the header dict"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) expect_bad_header(bad[i].header, bad[i].want);
    /* A NUL inside the header (strlen would stop there, so build it by hand). */
    static const char with_nul[] = "{'descr': '<f4',\0'fortran_order': False, 'shape': (3,)}";
    char data[12] = {0};
    size_t hl = sizeof with_nul - 1;
    unsigned char img[128];
    memcpy(img, "\x93NUMPY\x01\x00", 8);
    img[8] = (unsigned char)hl;
    img[9] = 0;
    memcpy(img + 10, with_nul, hl);
    memcpy(img + 10 + hl, data, 12);
    expect_bad("NUL in header", img, 10 + hl + 12, "expected a quoted string");
}

/* ----------------------------------------------- preamble, sizes, bytes -- */

static void test_preamble_and_sizes(void) {
    static const char hdr[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
    float data[3] = {1, 2, 3};
    size_t len;
    unsigned char *good = make_npy(1, hdr, data, sizeof data, &len);
    dsmoe_array a;
    ASSERT_OK(dsmoe_npy_parse(good, len, &a));
    dsmoe_array_free(&a);

    /* Truncation at every byte. */
    for (size_t cut = 0; cut < len; cut++) {
        char label[64];
        snprintf(label, sizeof label, "truncated to %zu of %zu bytes", cut, len);
        unsigned char *copy = (unsigned char *)malloc(cut + 1); /* exact size: ASan sees overreads */
        memcpy(copy, good, cut);
        expect_bad(label, cut ? copy : NULL, cut, cut < 10 ? "too short" : "truncated");
        free(copy);
    }
    /* Trailing bytes after the data. */
    unsigned char *longer = (unsigned char *)malloc(len + 5);
    memcpy(longer, good, len);
    memset(longer + len, 0, 5);
    expect_bad("1 trailing byte", longer, len + 1, "1 unexpected bytes after the data");
    expect_bad("5 trailing bytes", longer, len + 5, "5 unexpected bytes");
    free(longer);

    unsigned char *m = (unsigned char *)malloc(len);
    /* Bad magic, every magic byte. */
    for (int i = 0; i < 6; i++) {
        memcpy(m, good, len);
        m[i] ^= 0x20;
        expect_bad("bad magic", m, len, "magic");
    }
    /* Versions. */
    static const unsigned char versions[][2] = {{0, 0}, {1, 1}, {2, 1}, {4, 0}, {255, 0}, {1, 255}};
    for (size_t i = 0; i < sizeof versions / sizeof versions[0]; i++) {
        memcpy(m, good, len);
        m[6] = versions[i][0];
        m[7] = versions[i][1];
        expect_bad("bad version", m, len, "format version");
    }
    /* Header length past the end; zero header length. */
    memcpy(m, good, len);
    m[8] = 0xff;
    m[9] = 0x7f;
    expect_bad("header length past the end", m, len, "runs past the end");
    memcpy(m, good, len);
    m[8] = m[9] = 0;
    expect_bad("zero header length", m, len, "not a dict");
    /* A header length one short or one long shifts the data. */
    memcpy(m, good, len);
    m[8]++;
    expect_bad("header length + 1", m, len, NULL);
    memcpy(m, good, len);
    m[8]--;
    expect_bad("header length - 1", m, len, NULL);
    free(m);
    /* Version 2 preamble cut before its 4-byte length. */
    unsigned char v2[11] = {0x93, 'N', 'U', 'M', 'P', 'Y', 2, 0, 10, 0, 0};
    expect_bad("v2 preamble cut", v2, sizeof v2, "12-byte");
    free(good);

    /* A version 2 header of exactly 64 KiB is read; one byte more is refused. */
    for (size_t hl = 65536; hl <= 65537; hl++) {
        char *h = (char *)malloc(hl + 1);
        memset(h, ' ', hl);
        memcpy(h, hdr, sizeof hdr - 1);
        h[hl - 1] = '\n';
        h[hl] = '\0';
        unsigned char *b = make_npy(2, h, data, sizeof data, &len);
        if (hl == 65536) {
            ASSERT_OK(dsmoe_npy_parse(b, len, &a));
            dsmoe_array_free(&a);
        } else {
            expect_bad("header of 64 KiB + 1", b, len, "64 KiB");
        }
        free(b);
        free(h);
    }
    /* A huge declared header length in a small v2 file. */
    unsigned char huge[16] = {0x93, 'N', 'U', 'M', 'P', 'Y', 2, 0, 0xff, 0xff, 0xff, 0xff, '{', '}', ' ', '\n'};
    expect_bad("4 GiB header length", huge, sizeof huge, "64 KiB");
    /* Declared data far beyond the input (no allocation of it may happen). */
    expect_bad_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776,)}", "overflows");
    expect_bad_header("{'descr': '<u1', 'fortran_order': False, 'shape': (1099511627776,)}",
                      "truncated");
    expect_bad_header("{'descr': '<f4', 'fortran_order': False, 'shape': (4,)}", "truncated");
    expect_bad_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)}", "unexpected bytes");
}

/* Every single-byte change of a valid file: OK or FORMAT, never a crash. */
static void test_byte_flips_never_crash(void) {
    size_t len;
    unsigned char *good = io_read_file(tl_golden("io/f32_3x4.npy"), &len);
    ASSERT_TRUE(good != NULL);
    if (!good) return;
    static const unsigned char xors[] = {0x01, 0x20, 0x80, 0xff};
    unsigned char *m = (unsigned char *)malloc(len);
    int ok = 0, bad = 0;
    for (size_t i = 0; i < len; i++) {
        for (size_t x = 0; x < sizeof xors; x++) {
            memcpy(m, good, len);
            m[i] ^= xors[x];
            dsmoe_array a;
            dsmoe_clear_error();
            dsmoe_status s = dsmoe_npy_parse(m, len, &a);
            if (s == DSMOE_OK) {
                ok++;
                ASSERT_TRUE(a.nbytes <= len);
                dsmoe_array_free(&a);
            } else {
                bad++;
                tl_checks++;
                if (s != DSMOE_STATUS_FORMAT || !dsmoe_last_error()[0] || !io_all_zero(&a, sizeof a))
                    TL_FAIL("flip byte %zu ^ 0x%02x: %s \"%s\"", i, xors[x], dsmoe_status_name(s),
                            dsmoe_last_error());
            }
        }
    }
    /* Data bytes and padding spaces flipped to other blanks stay valid; the rest do not. */
    ASSERT_TRUE(ok > 0 && bad > 0);
    free(m);
    free(good);
}

/* Something that is not a .npy file at all is called that, not "too short" or
 * "bad version"; a damaged .npy file keeps its detailed message. */
static void test_not_a_npy_file(void) {
    static const char text[] = "model: deepseek-v3\nexperts: 256\n";
    expect_bad("a text file", text, sizeof text - 1, "not a .npy file");
    expect_bad("two bytes of text", "hi", 2, "not a .npy file");
    expect_bad("one zero byte", "", 1, "not a .npy file");
    size_t slen;
    unsigned char *st = io_read_file(tl_golden("io/st_ref.safetensors"), &slen);
    ASSERT_TRUE(st != NULL);
    if (st) expect_bad("a safetensors file", st, slen, "not a .npy file");
    free(st);
    /* A prefix of the magic is a truncated .npy file; a bad version is a bad version. */
    expect_bad("magic prefix", "\x93NUM", 4, "too short");
    expect_bad("version 9", "\x93NUMPY\x09\x00\x00\x00", 10, "format version 9.0");
    /* On disk, the message starts with the path. */
    const char *path = tl_tmp("test_npy_text.npy");
    ASSERT_TRUE(io_write_file(path, text, sizeof text - 1));
    dsmoe_array a;
    ASSERT_STATUS(dsmoe_npy_read(path, &a), DSMOE_STATUS_FORMAT);
    char want[4200];
    snprintf(want, sizeof want, "%s: not a .npy file (", path);
    tl_checks++;
    if (strncmp(dsmoe_last_error(), want, strlen(want)) != 0)
        TL_FAIL("message \"%s\" does not start with \"%s\"", dsmoe_last_error(), want);
    unlink(path);
}

/* ------------------------------------------------------- files, errors -- */

static void test_io_errors_and_bad_arguments(void) {
    dsmoe_array a;
    memset(&a, 0x5a, sizeof a);
    ASSERT_STATUS(dsmoe_npy_read(tl_tmp("no_such_dir/x.npy"), &a), DSMOE_STATUS_IO);
    ASSERT_MSG_HAS("missing file", "no_such_dir/x.npy");
    ASSERT_TRUE(io_all_zero(&a, sizeof a));
    ASSERT_STATUS(dsmoe_npy_read(io_tmp_dir(), &a), DSMOE_STATUS_IO);
    ASSERT_MSG_HAS("directory", "directory");
    ASSERT_STATUS(dsmoe_npy_read(NULL, &a), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_npy_read("x", NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_npy_parse(NULL, 10, &a), DSMOE_STATUS_INVALID_ARGUMENT);
    /* An empty file. */
    const char *empty = tl_tmp("test_npy_empty.npy");
    ASSERT_TRUE(io_write_file(empty, "", 0));
    ASSERT_STATUS(dsmoe_npy_read(empty, &a), DSMOE_STATUS_FORMAT);
    ASSERT_MSG_HAS("empty file", "too short");
    unlink(empty);

    const int64_t shape[2] = {2, 3}, neg[2] = {2, -3};
    float data[6] = {0};
    const char *path = tl_tmp("test_npy_args.npy");
    ASSERT_STATUS(dsmoe_npy_write_raw(path, (dsmoe_dtype)42, 2, shape, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_npy_write_raw(path, DSMOE_DTYPE_F32, 9, shape, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_npy_write_raw(path, DSMOE_DTYPE_F32, -1, shape, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_npy_write_raw(path, DSMOE_DTYPE_F32, 2, neg, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_npy_write_raw(path, DSMOE_DTYPE_F32, 2, shape, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_npy_write_raw(NULL, DSMOE_DTYPE_F32, 2, shape, data), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_npy_write(path, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_array wrong = {DSMOE_DTYPE_F32, 2, {2, 3}, data, 20};
    ASSERT_STATUS(dsmoe_npy_write(path, &wrong), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_MSG_HAS("nbytes mismatch", "does not match");
    struct stat st;
    ASSERT_TRUE(stat(path, &st) != 0); /* nothing was written */
    /* Zero-size arrays need no data pointer. */
    const int64_t zero[2] = {0, 3};
    ASSERT_OK(dsmoe_npy_write_raw(path, DSMOE_DTYPE_F32, 2, zero, NULL));
    ASSERT_OK(dsmoe_npy_read(path, &a));
    ASSERT_EQ_INT(a.nbytes, 0);
    ASSERT_TRUE(a.data != NULL);
    dsmoe_array_free(&a);
    unlink(path);

    /* A folder that does not exist: IO, and no temporary file anywhere. */
    ASSERT_STATUS(dsmoe_npy_write_raw(tl_tmp("no_such_dir/y.npy"), DSMOE_DTYPE_F32, 2, shape, data),
                  DSMOE_STATUS_IO);
    ASSERT_MSG_HAS("missing folder", "no_such_dir");
    ASSERT_EQ_INT(io_count_tmp_files(io_tmp_dir(), "test_npy"), 0);
}

static void test_atomic_replace(void) {
    char path[4096]; /* tl_tmp() reuses its buffer */
    snprintf(path, sizeof path, "%s", tl_tmp("test_npy_atomic.npy"));
    const int64_t s1[1] = {4}, s2[2] = {2, 2};
    const int32_t d1[4] = {1, 2, 3, 4};
    const double d2[4] = {0.5, 1.5, 2.5, 3.5};
    ASSERT_OK(dsmoe_npy_write_raw(path, DSMOE_DTYPE_I32, 1, s1, d1));
    ASSERT_OK(dsmoe_npy_write_raw(path, DSMOE_DTYPE_F64, 2, s2, d2));
    dsmoe_array a;
    ASSERT_OK(dsmoe_npy_read(path, &a));
    check_same("replaced", &a, DSMOE_DTYPE_F64, 2, s2, d2, sizeof d2);
    dsmoe_array_free(&a);
    ASSERT_EQ_INT(io_count_tmp_files(io_tmp_dir(), "test_npy"), 0);
    /* A folder as the destination is refused before anything is written (a rename
     * that fails is tested in test_io_file.c). */
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", tl_tmp("test_npy_a_folder"));
    rmdir(dir);
    ASSERT_TRUE(mkdir(dir, 0755) == 0);
    ASSERT_STATUS(dsmoe_npy_write_raw(dir, DSMOE_DTYPE_I32, 1, s1, d1), DSMOE_STATUS_IO);
    ASSERT_MSG_HAS("a folder as the destination", "is a directory");
    ASSERT_MSG_HAS("a folder as the destination", "test_npy_a_folder");
    ASSERT_EQ_INT(io_count_tmp_files(io_tmp_dir(), "test_npy"), 0);
    ASSERT_TRUE(rmdir(dir) == 0);
    /* The file gets ordinary permissions (0666 less the umask), not mkstemp's 0600. */
    struct stat st;
    ASSERT_TRUE(stat(path, &st) == 0);
    mode_t mask = umask(0);
    umask(mask);
    ASSERT_EQ_INT(st.st_mode & 0777, 0666 & ~mask);
    unlink(path);
}

/* The shared file mapper: mmap and read() give the same bytes. */
static void test_map_file_modes(void) {
    const char *path = tl_golden("io/f32_3x4.npy");
    dsmoe__mapped m1, m2;
    ASSERT_OK(dsmoe__map_file(path, 1, NULL, 0, &m1));
    ASSERT_OK(dsmoe__map_file(path, 0, NULL, 0, &m2));
    ASSERT_TRUE(m1.map_base != NULL && m2.heap != NULL);
    ASSERT_TRUE(m1.size == 176 && m2.size == 176 && memcmp(m1.data, m2.data, 176) == 0);
    dsmoe__unmap_file(&m1);
    dsmoe__unmap_file(&m2);
    dsmoe__unmap_file(&m2); /* harmless twice */
    const char *empty = tl_tmp("test_npy_map_empty");
    ASSERT_TRUE(io_write_file(empty, "", 0));
    for (int mode = 0; mode < 2; mode++) {
        ASSERT_OK(dsmoe__map_file(empty, mode, NULL, 0, &m1));
        ASSERT_TRUE(m1.data != NULL && m1.size == 0);
        dsmoe__unmap_file(&m1);
    }
    unlink(empty);
}

int main(void) {
    RUN(test_roundtrip_all_dtypes_and_ranks);
    RUN(test_max_rank_and_odd_sizes);
    RUN(test_numpy_written_files);
    RUN(test_numpy_files_we_reject);
    RUN(test_header_variants_accepted);
    RUN(test_header_variants_rejected);
    RUN(test_preamble_and_sizes);
    RUN(test_byte_flips_never_crash);
    RUN(test_not_a_npy_file);
    RUN(test_io_errors_and_bad_arguments);
    RUN(test_atomic_replace);
    RUN(test_map_file_modes);
    return TEST_SUMMARY();
}
