/*
 * testlib.h — tiny test harness: always-on ASSERT_* macros that print both
 * values, tolerance comparison of float arrays that prints the first mismatches
 * and the maximum error, golden-file helpers and guard words around buffers.
 *
 * Each test file defines test functions and lists them in main():
 *   static void test_x(void) { ASSERT_EQ_INT(1 + 1, 2); }
 *   int main(void) { RUN(test_x); return TEST_SUMMARY(); }
 */
#ifndef DSMOE_TESTLIB_H
#define DSMOE_TESTLIB_H

#include "dsmoe.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int tl_failures = 0, tl_checks = 0, tl_tests = 0, tl_failed_tests = 0;
static const char *tl_current = "";

#define TL_FAIL(...)                                                  \
    do {                                                              \
        fprintf(stderr, "%s:%d: [%s] ", __FILE__, __LINE__, tl_current); \
        fprintf(stderr, __VA_ARGS__);                                 \
        fprintf(stderr, "\n");                                        \
        tl_failures++;                                                \
    } while (0)

#define ASSERT_TRUE(c)                                         \
    do {                                                       \
        tl_checks++;                                           \
        if (!(c)) TL_FAIL("expected true: %s", #c);            \
    } while (0)

#define ASSERT_EQ_INT(a, b)                                                         \
    do {                                                                            \
        long long tl_a = (long long)(a), tl_b = (long long)(b);                     \
        tl_checks++;                                                                \
        if (tl_a != tl_b) TL_FAIL("%s == %s: %lld != %lld", #a, #b, tl_a, tl_b);    \
    } while (0)

#define ASSERT_NEAR(a, b, tol)                                                            \
    do {                                                                                  \
        double tl_a = (double)(a), tl_b = (double)(b), tl_t = (double)(tol);              \
        tl_checks++;                                                                      \
        if (!(fabs(tl_a - tl_b) <= tl_t))                                                 \
            TL_FAIL("%s ~ %s: %.9g vs %.9g (|diff| %.3g > %.3g)", #a, #b, tl_a, tl_b,     \
                    fabs(tl_a - tl_b), tl_t);                                             \
    } while (0)

/* Asserts a dsmoe call succeeds, printing the status and last error otherwise. */
#define ASSERT_OK(call)                                                                  \
    do {                                                                                 \
        dsmoe_status tl_s = (call);                                                      \
        tl_checks++;                                                                     \
        if (tl_s != DSMOE_OK)                                                            \
            TL_FAIL("%s failed: %s: %s", #call, dsmoe_status_name(tl_s), dsmoe_last_error()); \
    } while (0)

/* Asserts a call fails with the given status and a non-empty message. */
#define ASSERT_STATUS(call, want)                                                          \
    do {                                                                                   \
        dsmoe_clear_error();                                                               \
        dsmoe_status tl_s = (call);                                                        \
        tl_checks++;                                                                       \
        if (tl_s != (want))                                                                \
            TL_FAIL("%s: got %s, want %s (%s)", #call, dsmoe_status_name(tl_s),            \
                    dsmoe_status_name(want), dsmoe_last_error());                          \
        else if (tl_s != DSMOE_OK && dsmoe_last_error()[0] == '\0')                        \
            TL_FAIL("%s: no error message", #call);                                        \
    } while (0)

#define RUN(fn)                                                          \
    do {                                                                 \
        int tl_before = tl_failures;                                     \
        tl_current = #fn;                                                \
        tl_tests++;                                                      \
        fn();                                                            \
        if (tl_failures != tl_before) tl_failed_tests++;                 \
        fprintf(stderr, "%s %s\n", tl_failures == tl_before ? "ok  " : "FAIL", #fn); \
    } while (0)

#define TEST_SUMMARY()                                                                  \
    (printf("%d passed, %d failed\n", tl_tests - tl_failed_tests, tl_failed_tests),      \
     fprintf(stderr, "(%d checks, %d failures)\n", tl_checks, tl_failures),              \
     tl_failures ? 1 : 0)

/* |a-b| <= atol + rtol*|ref| elementwise; prints up to 5 mismatches and the max error.
 * NaN anywhere is a mismatch. Returns 1 when all match. */
static inline int tl_allclose(const char *what, const float *got, const double *ref, int64_t n,
                       double atol, double rtol) {
    int bad = 0;
    double maxerr = 0;
    int64_t maxat = -1;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - ref[i]);
        if (!(e <= atol + rtol * fabs(ref[i]))) {
            if (bad < 5)
                fprintf(stderr, "  %s[%lld]: got %.9g want %.12g (err %.3g)\n", what,
                        (long long)i, (double)got[i], ref[i], e);
            bad++;
        }
        if (e > maxerr || e != e) { maxerr = e; maxat = i; }
    }
    tl_checks++;
    if (bad) {
        TL_FAIL("%s: %d of %lld mismatches, max err %.3g at %lld", what, bad, (long long)n,
                maxerr, (long long)maxat);
        return 0;
    }
    return 1;
}

/* Bitwise equality of two float arrays. */
static inline int tl_same_bits(const char *what, const float *a, const float *b, int64_t n) {
    tl_checks++;
    for (int64_t i = 0; i < n; i++) {
        if (memcmp(&a[i], &b[i], 4) != 0) {
            TL_FAIL("%s: bits differ at %lld: %.9g vs %.9g", what, (long long)i, (double)a[i],
                    (double)b[i]);
            return 0;
        }
    }
    return 1;
}

/* Deterministic PRNG (splitmix64) for test data. */
static dsmoe_rng tl_rng = {0x9e3779b97f4a7c15ull};
static inline void tl_seed(uint64_t s) { tl_rng.state = s * 0x9e3779b97f4a7c15ull + 1; }
static inline uint64_t tl_next(void) { return dsmoe_rng_next(&tl_rng); }
static inline double tl_uniform(void) { return (double)(tl_next() >> 11) * 0x1.0p-53; }
static inline double tl_normal(void) {
    double u1 = tl_uniform(), u2 = tl_uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* A router config with every field given (fp32, non-finite input is an error). */
static inline dsmoe_router_config tl_router_cfg(int32_t E, int32_t G, int32_t TG, int32_t K,
                                                dsmoe_score_func sf, dsmoe_group_score gsc,
                                                int32_t m, dsmoe_group_mask mask, int32_t norm,
                                                float eps, float scale, int32_t bias) {
    dsmoe_router_config c;
    memset(&c, 0, sizeof c);
    c.n_experts = E;
    c.n_groups = G;
    c.topk_groups = TG;
    c.top_k = K;
    c.score_func = sf;
    c.group_score = gsc;
    c.group_topm = m;
    c.group_mask = mask;
    c.normalize = norm;
    c.norm_eps = eps;
    c.scale = scale;
    c.use_bias = bias;
    c.precision = DSMOE_PRECISION_FP32;
    c.nonfinite = DSMOE_NONFINITE_ERROR;
    return c;
}

/* Path of a golden file: DSMOE_TEST_DATA_DIR "/" rel. */
static inline const char *tl_golden(const char *rel) {
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s/%s", DSMOE_TEST_DATA_DIR, rel);
    return buf;
}

/* Scratch folder for files written by tests (ctest sets DSMOE_TMP). */
static inline const char *tl_tmp(const char *name) {
    static char buf[4096];
    const char *d = getenv("DSMOE_TMP");
    snprintf(buf, sizeof buf, "%s/%s", d && d[0] ? d : "/tmp", name);
    return buf;
}

/* The whole file (NUL-terminated; its size in *len when len is not NULL), or NULL. */
static inline char *tl_slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = n >= 0 ? (char *)malloc((size_t)n + 1) : NULL;
    if (p && fread(p, 1, (size_t)n, f) != (size_t)n) {
        free(p);
        p = NULL;
    }
    fclose(f);
    if (p) p[n] = '\0';
    if (len) *len = p ? (size_t)n : 0;
    return p;
}

/* Removes a scratch folder and everything in it. */
static inline void tl_rm_rf(const char *path) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
    if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", path);
}

/* Element (i, j) of op(A) · op(B) in float64 (row-major; op(X) = Xᵀ when its flag is
 * set, X's rows ld apart), and the sum of the terms' magnitudes into *mag: the reference
 * the matrix-product tests measure their rounding bounds against. */
static inline double tl_gemm64_at(const float *A, int ta, int lda, const float *B, int tb,
                                  int ldb, int i, int j, int K, double *mag) {
    double s = 0.0, m = 0.0;
    for (int k = 0; k < K; k++) {
        const double a = ta ? (double)A[(size_t)k * lda + i] : (double)A[(size_t)i * lda + k];
        const double b = tb ? (double)B[(size_t)j * ldb + k] : (double)B[(size_t)k * ldb + j];
        s += a * b;
        m += fabs(a * b);
    }
    *mag = m;
    return s;
}

/* Guarded buffers: 64 bytes of 0xA5 before and after; tl_guard_ok checks them. */
#define TL_GUARD 64
static inline void *tl_guarded_alloc(size_t nbytes) {
    unsigned char *p = (unsigned char *)malloc(TL_GUARD * 2 + nbytes);
    if (!p) abort();
    memset(p, 0xA5, TL_GUARD * 2 + nbytes);
    memcpy(p, &nbytes, sizeof nbytes);
    return p + TL_GUARD;
}
static inline int tl_guard_ok(void *buf) {
    unsigned char *base = (unsigned char *)buf - TL_GUARD;
    size_t nbytes;
    memcpy(&nbytes, base, sizeof nbytes);
    for (size_t i = sizeof nbytes; i < TL_GUARD; i++)
        if (base[i] != 0xA5) return 0;
    for (size_t i = 0; i < TL_GUARD; i++)
        if (base[TL_GUARD + nbytes + i] != 0xA5) return 0;
    return 1;
}
static inline void tl_guarded_free(void *buf) {
    if (buf) free((unsigned char *)buf - TL_GUARD);
}

#endif /* DSMOE_TESTLIB_H */
