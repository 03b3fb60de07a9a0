/*
 * model_testutil.h — helpers shared by the model tests: whole files in and out, text
 * substitution for malformed variants of fixtures, scratch folders under DSMOE_TMP,
 * .npy goldens as fp64.
 */
#ifndef DSMOE_MODEL_TESTUTIL_H
#define DSMOE_MODEL_TESTUTIL_H

#include "testlib.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MT_GOLDEN DSMOE_TEST_DATA_DIR "/model/"

/* Whole file into a malloc'd, NUL-terminated buffer (NULL if unreadable). */
static inline char *mt_read(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    *len = 0;
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = (char *)malloc(cap + 1);
    for (size_t got; buf && (got = fread(buf + n, 1, cap - n, f)) > 0;) {
        n += got;
        if (n == cap) {
            cap *= 2;
            char *g = (char *)realloc(buf, cap + 1);
            if (!g) free(buf);
            buf = g;
        }
    }
    fclose(f);
    if (buf) buf[n] = '\0';
    *len = buf ? n : 0;
    return buf;
}

static inline int mt_write(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fwrite(data, 1, len, f) == len;
    return fclose(f) == 0 && ok;
}

/* text with the first occurrence of `from` replaced by `to` (malloc'd, NUL-terminated),
 * or NULL (and a test failure) when `from` does not occur. */
static inline char *mt_subst(const char *text, size_t len, const char *from, const char *to,
                      size_t *out_len) {
    const char *at = strstr(text, from);
    if (!at) {
        TL_FAIL("fixture has no '%s'", from);
        return NULL;
    }
    size_t a = (size_t)(at - text), nf = strlen(from), nt = strlen(to);
    char *o = (char *)malloc(len - nf + nt + 1);
    memcpy(o, text, a);
    memcpy(o + a, to, nt);
    memcpy(o + a + nt, at + nf, len - a - nf);
    *out_len = len - nf + nt;
    o[*out_len] = '\0';
    return o;
}

/* A fresh empty folder DSMOE_TMP/<name> (path into buf). */
static inline const char *mt_scratch(char *buf, size_t cap, const char *name) {
    const char *tmp = getenv("DSMOE_TMP");
    snprintf(buf, cap, "%s/%s", tmp && tmp[0] ? tmp : "/tmp", name);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", buf, buf);
    if (system(cmd) != 0) TL_FAIL("cannot make %s", buf);
    return buf;
}

/* Copies a file (whole). */
static inline int mt_copy(const char *from, const char *to) {
    size_t len;
    char *t = mt_read(from, &len);
    int ok = t && mt_write(to, t, len);
    free(t);
    return ok;
}

/* A golden .npy (F64, F32 or I32) as fp64 into a malloc'd array; *n its element count. */
static inline double *mt_npy64(const char *path, int64_t *n) {
    dsmoe_array a;
    *n = 0;
    if (dsmoe_npy_read(path, &a) != DSMOE_OK) {
        TL_FAIL("cannot read %s: %s", path, dsmoe_last_error());
        return NULL;
    }
    int64_t k = dsmoe_array_numel(&a);
    double *o = (double *)calloc((size_t)(k ? k : 1), sizeof *o);
    for (int64_t i = 0; i < k; i++) {
        if (a.dtype == DSMOE_DTYPE_F64) o[i] = ((const double *)a.data)[i];
        else if (a.dtype == DSMOE_DTYPE_F32) o[i] = ((const float *)a.data)[i];
        else if (a.dtype == DSMOE_DTYPE_I32) o[i] = ((const int32_t *)a.data)[i];
        else TL_FAIL("%s: unexpected dtype", path);
    }
    dsmoe_array_free(&a);
    *n = k;
    return o;
}

/* max |a[i]| */
static inline double mt_maxabs(const double *a, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs(a[i]));
    return m;
}

/* fp32 results against fp64: errors relative to the array's scale (max |ref|, at least 1). */
static inline int mt_close_to(const char *what, const float *got, const double *ref, int64_t n,
                              double rel) {
    double s = mt_maxabs(ref, n);
    return tl_allclose(what, got, ref, n, rel * (s > 1 ? s : 1), rel);
}

#endif /* DSMOE_MODEL_TESTUTIL_H */
