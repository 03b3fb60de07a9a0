/*
 * io_testutil.h — helpers shared by test_npy.c and test_safetensors.c: the
 * element values of the fixtures written by tests/ref/gen_io_fixtures.py, whole-
 * file reading, zero checks and a scan for leftover temporary files.
 */
#ifndef DSMOE_IO_TESTUTIL_H
#define DSMOE_IO_TESTUTIL_H

#include "testlib.h"

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Fixture values (see gen_io_fixtures.py): element i of a tensor of `dtype`. */
static inline void io_fixture_values(dsmoe_dtype dtype, int64_t n, void *out) {
    for (int64_t i = 0; i < n; i++) {
        int64_t base = (7 * i) % 23 - 11;
        float f = (float)base * 0.25f;
        switch (dtype) {
        case DSMOE_DTYPE_F32: ((float *)out)[i] = f; break;
        case DSMOE_DTYPE_BF16: ((uint16_t *)out)[i] = dsmoe_f32_to_bf16(f); break;
        case DSMOE_DTYPE_F16: ((uint16_t *)out)[i] = dsmoe_f32_to_f16(f); break;
        case DSMOE_DTYPE_F64: ((double *)out)[i] = (double)base * 0.25 / 3.0; break;
        case DSMOE_DTYPE_I32: ((int32_t *)out)[i] = (int32_t)(base * 100000 + i); break;
        case DSMOE_DTYPE_I64: ((int64_t *)out)[i] = base * 10000000000LL + i; break;
        case DSMOE_DTYPE_U8: ((uint8_t *)out)[i] = (uint8_t)((37 * i + 5) % 256); break;
        default: abort();
        }
    }
}

/* Deterministic random bytes. */
static inline void io_random_bytes(void *p, size_t n) {
    unsigned char *b = (unsigned char *)p;
    for (size_t i = 0; i < n; i++) b[i] = (unsigned char)(tl_next() >> 56);
}

/* Whole file into a malloc'd buffer (NULL if unreadable); *len its size. */
static inline unsigned char *io_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    *len = 0;
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    unsigned char *buf = (unsigned char *)malloc(cap);
    for (size_t got; buf && (got = fread(buf + n, 1, cap - n, f)) > 0;) {
        n += got;
        if (n == cap) {
            cap *= 2;
            unsigned char *grown = (unsigned char *)realloc(buf, cap);
            if (!grown) free(buf);
            buf = grown;
        }
    }
    fclose(f);
    *len = buf ? n : 0;
    return buf;
}

static inline int io_write_file(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fwrite(data, 1, len, f) == len;
    return fclose(f) == 0 && ok;
}

static inline int io_all_zero(const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    for (size_t i = 0; i < n; i++)
        if (b[i]) return 0;
    return 1;
}

/* Number of entries in `dir` named `prefix`*".tmp."* (temporary files left by a
 * writer). The prefix keeps tests that run in parallel out of each other's way. */
static inline int io_count_tmp_files(const char *dir, const char *prefix) {
    DIR *d = opendir(dir);
    int n = 0;
    if (!d) return -1;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0 && strstr(e->d_name, ".tmp.")) n++;
    closedir(d);
    return n;
}

/* The folder tl_tmp() writes into. */
static inline const char *io_tmp_dir(void) {
    const char *d = getenv("DSMOE_TMP");
    return d && d[0] ? d : "/tmp";
}

/* Fails the test unless the detail message contains `want` (if given). */
#define ASSERT_MSG_HAS(label, want)                                                    \
    do {                                                                               \
        tl_checks++;                                                                   \
        if ((want) && !strstr(dsmoe_last_error(), (want)))                             \
            TL_FAIL("%s: message \"%s\" lacks \"%s\"", (label), dsmoe_last_error(), (want)); \
    } while (0)

#endif /* DSMOE_IO_TESTUTIL_H */
