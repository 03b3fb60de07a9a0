/*
 * test_wlinear.c — products with weights as stored (src/kernels/wlinear.h):
 *   widen      dsmoe__wmat_widen against hand-computed bf16 / f16 / fp8 values (subnormals,
 *              negative zero, infinities, the fp8 NaN patterns 0x7F / 0xFF, block scales
 *              with rows and columns not multiples of the block), from data and scales
 *              at odd addresses, and against this file's own conversion on random words
 *              (every ISA: the same bits);
 *   products   dsmoe__wlinear for all four dtypes against a float64 reference built here
 *              from this file's own conversion, over odd shapes (rows / cols not multiples
 *              of 16, cols = 1, rows = 1), T = 1, 2, 3, 7, 15 (decode path) and 16, 64,
 *              300 (panel path; several panels, a partial last one), strided x and y
 *              (the gaps of y untouched), data 2 bytes off alignment; error bound
 *              (cols + 16) · 2^-24 · Σ|x·w| per element;
 *   threads    1 and 2 threads give the same bits;
 *   ISAs       the decode path gives the same bits under the scalar reference and
 *              AVX-512; the panel path agrees within the bound.
 */
#include "kernels/wlinear.h"
#include "testlib.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const TYPE_NAME[4] = {"f32", "bf16", "f16", "f8e4m3"};
static const int ESZ[4] = {4, 2, 2, 1};

/* ------------------------------------------- this file's own conversion -- */

static double t_bf16(uint16_t h) {
    int s = h >> 15, e = (h >> 7) & 0xff, m = h & 0x7f;
    double v;
    if (e == 0xff) return m ? NAN : (s ? -INFINITY : INFINITY);
    v = e == 0 ? ldexp((double)m, -133) : ldexp(128.0 + m, e - 134);
    return s ? -v : v;
}

static double t_f16(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v;
    if (e == 0x1f) return m ? NAN : (s ? -INFINITY : INFINITY);
    v = e == 0 ? ldexp((double)m, -24) : ldexp(1024.0 + m, e - 25);
    return s ? -v : v;
}

static double t_f8(uint8_t b) {
    int s = b >> 7, e = (b >> 3) & 0xf, m = b & 7;
    double v;
    if (e == 0xf && m == 7) return NAN;
    v = e == 0 ? ldexp((double)m, -9) : ldexp(8.0 + m, e - 10);
    return s ? -v : v;
}

/* A weight matrix of `type` in memory 2 bytes past a 64-byte boundary. */
typedef struct tmat {
    dsmoe__wmat w;
    char *dbuf, *sbuf;
    double *wide; /* the widened values (float64 of the fp32 values), rows · cols */
} tmat;

static float rnd_scale(void) { return (float)(0.25 + tl_uniform() * 2.0); }

static void tmat_make(tmat *m, dsmoe__wtype type, int64_t rows, int64_t cols, int32_t br, int32_t bc) {
    memset(m, 0, sizeof *m);
    const size_t n = (size_t)(rows * cols);
    m->dbuf = (char *)aligned_alloc(64, dsmoe__align64(n * 4 + 64));
    char *d = m->dbuf + 2;
    m->wide = (double *)malloc((n + 1) * sizeof(double));
    int64_t nbr = 1, nbc = 1;
    float *scales = NULL;
    if (type == DSMOE__WT_F8E4M3) {
        nbr = (rows + br - 1) / br;
        nbc = (cols + bc - 1) / bc;
        m->sbuf = (char *)aligned_alloc(64, dsmoe__align64((size_t)(nbr * nbc) * 4 + 64));
        scales = (float *)malloc((size_t)(nbr * nbc) * sizeof(float));
        for (int64_t i = 0; i < nbr * nbc; i++) scales[i] = rnd_scale();
        memcpy(m->sbuf + 2, scales, (size_t)(nbr * nbc) * 4);
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0; k < cols; k++) {
            const size_t i = (size_t)(r * cols + k);
            double v;
            if (type == DSMOE__WT_F32) {
                float f = (float)tl_normal();
                memcpy(d + i * 4, &f, 4);
                v = f;
            } else if (type == DSMOE__WT_BF16) {
                float f = (float)tl_normal();
                uint32_t u;
                memcpy(&u, &f, 4);
                uint16_t h = (uint16_t)(u >> 16);
                memcpy(d + i * 2, &h, 2);
                v = t_bf16(h);
            } else if (type == DSMOE__WT_F16) {
                /* sign, exponent 0 (subnormal) .. 17, any mantissa */
                uint16_t h = (uint16_t)(((tl_next() & 1) << 15) | ((tl_next() % 18) << 10) | (tl_next() & 0x3ff));
                memcpy(d + i * 2, &h, 2);
                v = t_f16(h);
            } else {
                uint8_t b;
                do b = (uint8_t)tl_next(); while ((b & 0x7f) == 0x7f);
                d[i] = (char)b;
                v = (double)(float)(t_f8(b) * (double)scales[(r / br) * nbc + k / bc]);
            }
            m->wide[i] = v;
        }
    free(scales);
    m->w.data = d;
    m->w.scale = m->sbuf ? m->sbuf + 2 : NULL;
    m->w.rows = rows;
    m->w.cols = cols;
    m->w.br = br;
    m->w.bc = bc;
    m->w.type = type;
}

static void tmat_free(tmat *m) {
    free(m->dbuf);
    free(m->sbuf);
    free(m->wide);
}

/* ------------------------------------------------------------------ widen -- */

static int same_or_both_nan(float a, double want) {
    if (isnan(want)) return isnan(a);
    return (double)a == want && !signbit(a) == !signbit(want);
}

static void widen_one(dsmoe__wtype type, const void *word, float scale, float *out) {
    char buf[16] = {0}, sbuf[8] = {0};
    memcpy(buf + 2, word, (size_t)ESZ[type]);
    memcpy(sbuf + 2, &scale, 4);
    dsmoe__wmat w = {buf + 2, sbuf + 2, 1, 1, 1, 1, type};
    dsmoe__wmat_widen(out, &w, 0, 1);
}

static void test_widen_values(void) {
    static const struct { uint16_t h; double v; } bf[] = {
        {0x3f80, 1.0}, {0xbf80, -1.0}, {0x0000, 0.0}, {0x8000, -0.0}, {0x0001, 0x1p-133},
        {0x807f, -0x7fp-133}, {0x0080, 0x1p-126}, {0x7f7f, 0x1.fep127}, {0x7f80, INFINITY},
        {0xff80, -INFINITY}, {0x7fc0, NAN}, {0x4049, 3.140625}};
    static const struct { uint16_t h; double v; } hf[] = {
        {0x3c00, 1.0}, {0xc000, -2.0}, {0x0000, 0.0}, {0x8000, -0.0}, {0x0001, 0x1p-24},
        {0x03ff, 0x3ffp-24}, {0x8200, -0x1p-15}, {0x0400, 0x1p-14}, {0x7bff, 65504.0},
        {0x7c00, INFINITY}, {0xfc00, -INFINITY}, {0x7e00, NAN}, {0x7c01, NAN}, {0x3555, 0x155p-12 + 0.25}};
    static const struct { uint8_t b; double v; } f8[] = {
        {0x00, 0.0}, {0x80, -0.0}, {0x01, 0x1p-9}, {0x07, 7 * 0x1p-9}, {0x87, -7 * 0x1p-9},
        {0x08, 0x1p-6}, {0x38, 1.0}, {0x3c, 1.5}, {0x40, 2.0}, {0xc8, -4.0}, {0x7e, 448.0},
        {0xfe, -448.0}, {0x7f, NAN}, {0xff, NAN}, {0x77, 240.0}};
    const char *isas[2] = {"ref", "avx512"};
    for (int v = 0; v < 2; v++) {
        if (dsmoe_set_isa(isas[v]) != DSMOE_OK) continue;
        for (size_t i = 0; i < sizeof bf / sizeof bf[0]; i++) {
            float out;
            widen_one(DSMOE__WT_BF16, &bf[i].h, 1.0f, &out);
            ASSERT_TRUE(same_or_both_nan(out, bf[i].v));
        }
        for (size_t i = 0; i < sizeof hf / sizeof hf[0]; i++) {
            float out;
            widen_one(DSMOE__WT_F16, &hf[i].h, 1.0f, &out);
            ASSERT_TRUE(same_or_both_nan(out, hf[i].v));
        }
        for (size_t i = 0; i < sizeof f8 / sizeof f8[0]; i++) {
            float out;
            widen_one(DSMOE__WT_F8E4M3, &f8[i].b, 1.0f, &out);
            ASSERT_TRUE(same_or_both_nan(out, f8[i].v));
            /* times a scale: one rounding of the exact product */
            widen_one(DSMOE__WT_F8E4M3, &f8[i].b, 0.3f, &out);
            ASSERT_TRUE(same_or_both_nan(out, (double)(float)(f8[i].v * (double)0.3f)));
            widen_one(DSMOE__WT_F8E4M3, &f8[i].b, 0x1p-20f, &out);
            ASSERT_TRUE(same_or_both_nan(out, f8[i].v * 0x1p-20));
        }
    }
    dsmoe_set_isa(NULL);
}

/* Block scales: 5 × 7 with 2 × 3 blocks, by hand. */
static void test_widen_blocks(void) {
    const float scales[9] = {1, 2, 4, 0.5f, 0.25f, 8, 16, 32, 0.125f}; /* (3, 3) */
    char dbuf[64], sbuf[64];
    for (int i = 0; i < 35; i++) dbuf[2 + i] = 0x38; /* 1.0 everywhere */
    memcpy(sbuf + 2, scales, sizeof scales);
    dsmoe__wmat w = {dbuf + 2, sbuf + 2, 5, 7, 2, 3, DSMOE__WT_F8E4M3};
    const char *isas[2] = {"ref", "avx512"};
    for (int v = 0; v < 2; v++) {
        if (dsmoe_set_isa(isas[v]) != DSMOE_OK) continue;
        float out[35];
        dsmoe__wmat_widen(out, &w, 0, 5);
        for (int r = 0; r < 5; r++)
            for (int k = 0; k < 7; k++) ASSERT_TRUE(out[r * 7 + k] == scales[(r / 2) * 3 + k / 3]);
        /* rows 3..4 alone */
        dsmoe__wmat_widen(out, &w, 3, 5);
        ASSERT_TRUE(out[0] == 0.5f && out[6] == 8.0f && out[7] == 16.0f && out[13] == 0.125f);
    }
    dsmoe_set_isa(NULL);
}

/* Random words and block scales (cols across 16-column chunks and blocks not multiples
 * of 16): every ISA gives this file's values exactly. */
static void test_widen_random(void) {
    const int64_t shapes[][4] = {{3, 37, 1, 1}, {9, 131, 4, 20}, {33, 256, 128, 128}, {5, 300, 2, 7}};
    for (int ty = 0; ty < 4; ty++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            tmat m;
            tmat_make(&m, (dsmoe__wtype)ty, shapes[s][0], shapes[s][1], (int32_t)shapes[s][2],
                      (int32_t)shapes[s][3]);
            const int64_t n = shapes[s][0] * shapes[s][1];
            float *out = (float *)malloc((size_t)n * 4);
            const char *isas[2] = {"ref", "avx512"};
            for (int v = 0; v < 2; v++) {
                if (dsmoe_set_isa(isas[v]) != DSMOE_OK) continue;
                dsmoe__wmat_widen(out, &m.w, 0, shapes[s][0]);
                int bad = 0;
                for (int64_t i = 0; i < n; i++) bad += !same_or_both_nan(out[i], m.wide[i]);
                if (bad) TL_FAIL("widen %s %s shape %zu: %d wrong", TYPE_NAME[ty], isas[v], s, bad);
                tl_checks++;
            }
            dsmoe_set_isa(NULL);
            free(out);
            tmat_free(&m);
        }
}

/* --------------------------------------------------------------- products -- */

#define GUARD_VAL 12345.0f

/* y (T, ldy) for one call; returns the buffer (caller frees). */
static float *run_product(const tmat *m, const float *x, int64_t ldx, int64_t T, int64_t ldy, int nt) {
    const size_t per = dsmoe__wlinear_scratch(m->w.cols, T);
    void *scratch = per ? aligned_alloc(64, per * (size_t)nt) : NULL;
    float *y = (float *)malloc((size_t)(T * ldy) * sizeof(float));
    for (int64_t i = 0; i < T * ldy; i++) y[i] = GUARD_VAL;
    dsmoe__wlinear(y, ldy, x, ldx, T, &m->w, nt, scratch);
    free(scratch);
    return y;
}

/* Checks y against the float64 reference; the gaps of y keep their guard value. */
static int check_product(const char *what, const float *y, int64_t ldy, const tmat *m, const float *x,
                         int64_t ldx, int64_t T) {
    const int64_t R = m->w.rows, C = m->w.cols;
    int bad = 0;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t o = 0; o < R; o++) {
            double s = 0, a = 0;
            for (int64_t k = 0; k < C; k++) {
                const double p = (double)x[t * ldx + k] * m->wide[o * C + k];
                s += p;
                a += fabs(p);
            }
            const double tol = (double)(C + 16) * 0x1p-24 * a + 1e-30;
            const double got = y[t * ldy + o];
            if (!(fabs(got - s) <= tol)) {
                if (bad < 3)
                    fprintf(stderr, "  %s: y[%lld][%lld] = %.9g, want %.12g (tol %.3g)\n", what, (long long)t,
                            (long long)o, got, s, tol);
                bad++;
            }
        }
        for (int64_t o = R; o < ldy; o++)
            if (y[t * ldy + o] != GUARD_VAL) bad++;
    }
    tl_checks++;
    if (bad) TL_FAIL("%s: %d wrong", what, bad);
    return !bad;
}

static void product_case(dsmoe__wtype ty, int64_t R, int64_t C, int64_t T, int32_t br, int32_t bc) {
    tmat m;
    tmat_make(&m, ty, R, C, br, bc);
    const int64_t ldx = C + 3, ldy = R + 5;
    float *x = (float *)malloc((size_t)(T * ldx) * sizeof(float));
    for (int64_t i = 0; i < T * ldx; i++) x[i] = (float)tl_normal();
    char what[160];
    float *first = NULL, *first_isa = NULL;
    const char *isas[2] = {"ref", "avx512"};
    for (int v = 0; v < 2; v++) {
        if (dsmoe_set_isa(isas[v]) != DSMOE_OK) continue;
        float *y1 = run_product(&m, x, ldx, T, ldy, 1), *y2 = run_product(&m, x, ldx, T, ldy, 2);
        snprintf(what, sizeof what, "%s R %lld C %lld T %lld %s", TYPE_NAME[ty], (long long)R, (long long)C,
                 (long long)T, isas[v]);
        check_product(what, y1, ldy, &m, x, ldx, T);
        tl_same_bits(what, y1, y2, T * ldy); /* 1 vs 2 threads */
        free(y2);
        if (!first) {
            first = y1;
            first_isa = y1;
        } else {
            /* the decode path: the same bits on every ISA */
            if (T < DSMOE__WLINEAR_PANEL_T) tl_same_bits(what, first_isa, y1, T * ldy);
            free(y1);
        }
    }
    dsmoe_set_isa(NULL);
    free(first);
    free(x);
    tmat_free(&m);
}

static void test_products_decode(void) {
    const int64_t shapes[][2] = {{1, 1}, {1, 17}, {3, 1}, {17, 33}, {37, 130}, {64, 64}, {29, 300}, {8, 16}};
    const int64_t Ts[] = {1, 2, 3, 4, 5, 7, 15};
    for (int ty = 0; ty < 4; ty++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            for (size_t t = 0; t < sizeof Ts / sizeof Ts[0]; t++)
                product_case((dsmoe__wtype)ty, shapes[s][0], shapes[s][1], Ts[t], 3, 20);
}

static void test_products_panels(void) {
    const int64_t shapes[][2] = {{1, 1}, {3, 1}, {17, 33}, {129, 300}, {1100, 300}, {40, 40000}};
    const int64_t Ts[] = {16, 64, 300};
    for (int ty = 0; ty < 4; ty++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            for (size_t t = 0; t < sizeof Ts / sizeof Ts[0]; t++) {
                if (shapes[s][0] * shapes[s][1] * Ts[t] > 40000000) continue;
                product_case((dsmoe__wtype)ty, shapes[s][0], shapes[s][1], Ts[t], 128, 128);
            }
}

/* fp8 with 128 × 128 blocks (the checkpoint's) and rows / cols past a block edge. */
static void test_products_fp8_blocks(void) {
    product_case(DSMOE__WT_F8E4M3, 130, 260, 1, 128, 128);
    product_case(DSMOE__WT_F8E4M3, 130, 260, 3, 128, 128);
    product_case(DSMOE__WT_F8E4M3, 130, 260, 20, 128, 128);
    product_case(DSMOE__WT_F8E4M3, 19, 45, 2, 1, 1);
}

/* fp8 with large scales (above 2^8, where the kernel multiplies twice), subnormal
 * ones, and NaN weights (a row holding one gives NaN, the others stay right). */
static void test_products_fp8_special(void) {
    for (int withnan = 0; withnan < 2; withnan++) {
        tmat m;
        const int64_t R = 11, C = 100, nbc = 4;
        tmat_make(&m, DSMOE__WT_F8E4M3, R, C, 4, 32);
        const float sc[12] = {1e20f, 300.0f, 3e-39f, 0.5f, 256.0f, 255.9f, 1.0f, 1e-30f, 7.0f, 2e30f, 1e-3f, 9.0f};
        memcpy((char *)m.sbuf + 2, sc, sizeof sc);
        const uint8_t *d = (const uint8_t *)m.w.data;
        if (withnan) {
            ((uint8_t *)m.w.data)[3 * C + 40] = 0x7f; /* row 3 */
            ((uint8_t *)m.w.data)[9 * C + 97] = 0xff; /* row 9, in the tail chunk */
        }
        for (int64_t r = 0; r < R; r++)
            for (int64_t k = 0; k < C; k++)
                m.wide[r * C + k] = (double)(float)(t_f8(d[r * C + k]) * (double)sc[(r / 4) * nbc + k / 32]);
        const int64_t T = 2;
        float x[2 * 100];
        for (int i = 0; i < 200; i++) x[i] = (float)tl_normal();
        const char *isas[2] = {"ref", "avx512"};
        float *first = NULL;
        for (int v = 0; v < 2; v++) {
            if (dsmoe_set_isa(isas[v]) != DSMOE_OK) continue;
            float *y = run_product(&m, x, C, T, R, 1);
            if (!withnan) {
                check_product(isas[v], y, R, &m, x, C, T);
            } else {
                for (int64_t t = 0; t < T; t++)
                    for (int64_t o = 0; o < R; o++) ASSERT_TRUE(!isnan(y[t * R + o]) == (o != 3 && o != 9));
            }
            if (!first)
                first = y;
            else {
                for (int64_t i = 0; i < T * R; i++)
                    if (!isnan(first[i]) || !isnan(y[i])) ASSERT_TRUE(memcmp(&first[i], &y[i], 4) == 0);
                free(y);
            }
        }
        dsmoe_set_isa(NULL);
        free(first);
        tmat_free(&m);
    }
}

/* Scratch sizes cover every narrower shape. */
static void test_scratch(void) {
    ASSERT_EQ_INT(dsmoe__wlinear_scratch(2048, 1), 0);
    ASSERT_EQ_INT(dsmoe__wlinear_scratch(2048, DSMOE__WLINEAR_PANEL_T - 1), 0);
    const size_t s = dsmoe__wlinear_scratch(50000, 256);
    ASSERT_TRUE(s % 64 == 0 && s >= (size_t)16 * 4 * 50000);
    for (int64_t c = 1; c <= 50000; c += 997) ASSERT_TRUE(dsmoe__wlinear_scratch(c, 256) <= s);
}

int main(void) {
    RUN(test_widen_values);
    RUN(test_widen_blocks);
    RUN(test_widen_random);
    RUN(test_scratch);
    RUN(test_products_decode);
    RUN(test_products_panels);
    RUN(test_products_fp8_blocks);
    RUN(test_products_fp8_special);
    return TEST_SUMMARY();
}
