/*
 * test_sgemm_small.c — the small-product path (src/kernels/sgemm_small.c, chosen by
 * dsmoe__sgemm in blas.c):
 *   isa        every kernel set's variant (ref, avx2, avx512 where the CPU has them)
 *              gives the scalar reference's bits, for every row tail (1 .. 2 tiles of
 *              8 and of 6 rows), every column tail (1 .. 2 panels of 32 and of 16
 *              columns), the four layouts, C overwritten or added to, padded leading
 *              dimensions; nothing past a row's last column is written;
 *   float64    the same products within K·eps·Σ|a·b| of the float64 product, over K in
 *              several BLIS blocks;
 *   BLIS bits  where blas.c enables the path, its bits are BLIS's (dsmoe__sgemm_blis)
 *              for every layout, both betas and K around BLIS's blocks of K, so the
 *              path a call takes never shows in a result;
 *   edges      K = 0 (beta 0 gives zeros, beta 1 leaves C), dsmoe__sgemm's choice.
 */
#include "kernels/blas.h"
#include "kernels/kernels.h"
#include "testlib.h"

static float *rand_buf(size_t n) {
    float *v = (float *)calloc(n + 1, sizeof(float));
    if (!v) abort();
    for (size_t i = 0; i < n; i++) v[i] = (float)tl_normal();
    return v;
}

typedef struct sg_case {
    int ta, tb, M, N, K, lda, ldb, ldc;
    float *A, *B, *C0;
} sg_case;

static void sg_init(sg_case *c, int ta, int tb, int M, int N, int K, int pad) {
    c->ta = ta, c->tb = tb, c->M = M, c->N = N, c->K = K;
    c->lda = (ta ? M : K) + pad;
    c->ldb = (tb ? K : N) + pad;
    c->ldc = N + pad;
    c->A = rand_buf((size_t)(ta ? K : M) * (size_t)c->lda);
    c->B = rand_buf((size_t)(tb ? N : K) * (size_t)c->ldb);
    c->C0 = rand_buf((size_t)M * (size_t)c->ldc);
}
static void sg_free(sg_case *c) {
    free(c->A);
    free(c->B);
    free(c->C0);
}
/* C against the float64 product (+ C0 when add); padding columns must hold C0's bits. */
static int sg_check64(const sg_case *c, const float *C, int add) {
    int bad = 0;
    for (int i = 0; i < c->M; i++) {
        for (int j = 0; j < c->ldc; j++) {
            const size_t at = (size_t)i * c->ldc + j;
            if (j >= c->N) {
                bad += memcmp(&C[at], &c->C0[at], sizeof(float)) != 0;
                continue;
            }
            double mag;
            double s = tl_gemm64_at(c->A, c->ta, c->lda, c->B, c->tb, c->ldb, i, j, c->K, &mag);
            if (add) s = (double)c->C0[at] + s, mag += fabs((double)c->C0[at]);
            bad += !(fabs((double)C[at] - s) <= (2.0 * c->K + 4.0) * 0x1.0p-24 * mag + 1e-30);
        }
    }
    return bad;
}

/* One case with C overwritten (add 0) or added to (add 1): the scalar reference against
 * float64, then every vector kernel set against the reference's bits. */
typedef struct sg_tally {
    int cases, bad_bits, bad64;
} sg_tally;
static void sg_run(const sg_case *c, int add, sg_tally *tl) {
    static const char *const isas[] = {"avx512", "avx2"};
    const dsmoe__kernel_table *ref = dsmoe__kernels_named("ref");
    const size_t nc = (size_t)c->M * (size_t)c->ldc;
    float *want = (float *)malloc(nc * sizeof(float));
    float *got = (float *)malloc(nc * sizeof(float));
    if (!want || !got) abort();
    memcpy(want, c->C0, nc * sizeof(float));
    ref->sgemm_small(c->ta, c->tb, c->M, c->N, c->K, c->A, c->lda, c->B, c->ldb, add, want, c->ldc);
    tl->bad64 += sg_check64(c, want, add) != 0;
    for (size_t s = 0; s < 2; s++) {
        const dsmoe__kernel_table *k = dsmoe__kernels_named(isas[s]);
        if (!k) continue;
        memcpy(got, c->C0, nc * sizeof(float));
        k->sgemm_small(c->ta, c->tb, c->M, c->N, c->K, c->A, c->lda, c->B, c->ldb, add, got, c->ldc);
        tl->cases++;
        if (memcmp(got, want, nc * sizeof(float)) != 0 && tl->bad_bits++ < 5)
            TL_FAIL("%s: %c%c M %d N %d K %d add %d differs from the scalar bits", isas[s],
                    c->ta ? 'T' : 'N', c->tb ? 'T' : 'N', c->M, c->N, c->K, add);
    }
    free(want);
    free(got);
}

static void test_isa_bits(void) {
    tl_seed(11);
    static const int Ks[] = {1, 2, 7, 33};
    sg_tally tl = {0, 0, 0};
    const int isa_n = (dsmoe__kernels_named("avx512") != NULL) + (dsmoe__kernels_named("avx2") != NULL);
    for (int M = 1; M <= 17; M++)
        for (int N = 1; N <= 66; N += (N < 40 ? 1 : N == 40 ? 8 : 9)) /* .. 40, 48, 57, 66 */
            for (size_t kk = 0; kk < sizeof Ks / sizeof Ks[0]; kk++)
                for (int lay = 0; lay < 4; lay++) {
                    sg_case c;
                    sg_init(&c, lay >> 1, lay & 1, M, N, Ks[kk], (M + N) % 3);
                    for (int add = 0; add < 2; add++) sg_run(&c, add, &tl);
                    sg_free(&c);
                }
    tl_checks += 2;
    if (tl.bad64) TL_FAIL("%d scalar products off the float64 product (or padding written)", tl.bad64);
    if (isa_n > 0 && tl.cases == 0) TL_FAIL("no vector variant ran");
    printf("  %d vector-variant products (%d kernel sets) against the scalar bits\n", tl.cases, isa_n);
}

/* Tall products: op(A) = A^T with more than 64 rows copies each panel of B (AVX-512: a
 * 48-column product as one panel while it fits the copy), and
 * every product prefetches the next panel and tile; both against the scalar bits and
 * float64, for column tails and both C modes. */
static void test_tall(void) {
    tl_seed(13);
    static const int Ms[] = {65, 72, 97, 130}, Ns[] = {1, 16, 17, 32, 33, 47, 48, 66},
                     Ks[] = {1, 9, 100, 400}; /* N 48: one 48-column panel; K 400: too long to copy */
    sg_tally tl = {0, 0, 0};
    for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++)
        for (size_t ni = 0; ni < sizeof Ns / sizeof Ns[0]; ni++)
            for (size_t ki = 0; ki < sizeof Ks / sizeof Ks[0]; ki++)
                for (int lay = 0; lay < 4; lay++) {
                    sg_case c;
                    sg_init(&c, lay >> 1, lay & 1, Ms[mi], Ns[ni], Ks[ki], (int)(mi + ni) % 3);
                    sg_run(&c, (int)(ni + ki) % 2, &tl);
                    sg_free(&c);
                }
    tl_checks += 2;
    if (tl.bad64) TL_FAIL("%d tall scalar products off the float64 product", tl.bad64);
    if (dsmoe__kernels_named("avx2") && tl.cases == 0) TL_FAIL("no vector variant ran");
    printf("  %d tall vector-variant products against the scalar bits\n", tl.cases);
}

/* dsmoe__sgemm_small over several BLIS blocks of K against float64 and BLIS. */
static void test_blocks(void) {
    tl_seed(12);
    int kmax = 0;
    const int kc = dsmoe__sgemm_small_kc(&kmax);
    const int kb = kc > 0 ? kc : 384, km = kc > 0 ? kmax : 480;
    const int Ks[] = {kb - 1, kb, kb + 1, km, km + 1, 2 * kb + 3, kb + km + 1, 3 * kb + 7};
    int bad64 = 0, badblis = 0, n = 0;
    for (size_t kk = 0; kk < sizeof Ks / sizeof Ks[0]; kk++) {
        for (int lay = 0; lay < 4; lay++) {
            for (int beta = 0; beta < 2; beta++) {
                const int M = 3 + (int)kk * 2 + lay, N = 5 + 7 * (int)kk + beta * 11;
                sg_case c;
                sg_init(&c, lay >> 1, lay & 1, M, N, Ks[kk], lay);
                const size_t nc = (size_t)M * (size_t)c.ldc;
                float *got = (float *)malloc(nc * sizeof(float));
                float *want = (float *)malloc(nc * sizeof(float));
                memcpy(got, c.C0, nc * sizeof(float));
                dsmoe__sgemm_small(c.ta, c.tb, M, N, c.K, c.A, c.lda, c.B, c.ldb, (float)beta, got, c.ldc);
                bad64 += sg_check64(&c, got, beta) != 0;
                if (kc > 0) {
                    memcpy(want, c.C0, nc * sizeof(float));
                    dsmoe__sgemm_blis(c.ta, c.tb, M, N, c.K, 1.0f, c.A, c.lda, c.B, c.ldb, (float)beta,
                                      want, c.ldc);
                    if (memcmp(got, want, nc * sizeof(float)) != 0 && badblis++ < 5)
                        TL_FAIL("%c%c M %d N %d K %d beta %d: bits differ from BLIS's", c.ta ? 'T' : 'N',
                                c.tb ? 'T' : 'N', M, N, c.K, beta);
                }
                n++;
                free(got);
                free(want);
                sg_free(&c);
            }
        }
    }
    tl_checks++;
    if (bad64) TL_FAIL("%d of %d blocked products off the float64 product", bad64, n);
    if (kc > 0)
        printf("  BLIS blocks of K %d (max %d): %d products, bits as BLIS's\n", kc, kmax, n);
    else
        printf("  small path disabled for this BLIS (%s): BLIS bits not compared\n", dsmoe__blas_kernels());
}

/* Random shapes through dsmoe__sgemm (either path) against BLIS: the same bits. */
static void test_blis_bits(void) {
    if (dsmoe__sgemm_small_kc(NULL) == 0) return;
    tl_seed(13);
    static const int dims[] = {1, 2, 3, 5, 8, 9, 12, 16, 17, 31, 32, 33, 48, 64, 100, 130, 260, 512};
    int bad = 0, n = 0;
    for (int t = 0; t < 200; t++) {
        const int M = dims[tl_next() % 18], N = dims[tl_next() % 18], K = dims[tl_next() % 18];
        const int lay = (int)(tl_next() % 4), beta = (int)(tl_next() % 2);
        sg_case c;
        sg_init(&c, lay >> 1, lay & 1, M, N, K, (int)(tl_next() % 3));
        const size_t nc = (size_t)M * (size_t)c.ldc;
        float *got = (float *)malloc(nc * sizeof(float)), *want = (float *)malloc(nc * sizeof(float));
        memcpy(got, c.C0, nc * sizeof(float));
        memcpy(want, c.C0, nc * sizeof(float));
        dsmoe__sgemm(c.ta, c.tb, M, N, K, 1.0f, c.A, c.lda, c.B, c.ldb, (float)beta, got, c.ldc);
        dsmoe__sgemm_blis(c.ta, c.tb, M, N, K, 1.0f, c.A, c.lda, c.B, c.ldb, (float)beta, want, c.ldc);
        if (memcmp(got, want, nc * sizeof(float)) != 0 && bad++ < 5)
            TL_FAIL("dsmoe__sgemm %c%c M %d N %d K %d beta %d: bits differ from BLIS's", c.ta ? 'T' : 'N',
                    c.tb ? 'T' : 'N', M, N, K, beta);
        n++;
        free(got);
        free(want);
        sg_free(&c);
    }
    tl_checks++;
    printf("  %d random products through dsmoe__sgemm: BLIS's bits\n", n);
}

static void test_edges(void) {
    float C[6] = {1, 2, 3, 4, 5, 6}, A[1] = {1}, B[1] = {1};
    dsmoe__sgemm_small(0, 0, 2, 2, 0, A, 1, B, 2, 1.0f, C, 3);
    tl_checks++;
    if (C[0] != 1 || C[1] != 2 || C[3] != 4 || C[4] != 5) TL_FAIL("K = 0, beta 1 changed C");
    dsmoe__sgemm_small(0, 0, 2, 2, 0, A, 1, B, 2, 0.0f, C, 3);
    tl_checks++;
    if (C[0] != 0 || C[1] != 0 || C[2] != 3 || C[3] != 0 || C[4] != 0 || C[5] != 6)
        TL_FAIL("K = 0, beta 0: not zeros in C (or padding written)");
}

int main(void) {
    RUN(test_isa_bits);
    RUN(test_tall);
    RUN(test_blocks);
    RUN(test_blis_bits);
    RUN(test_edges);
    return TEST_SUMMARY();
}
