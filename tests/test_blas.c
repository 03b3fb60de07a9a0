/*
 * test_blas.c — the BLAS wrappers' contract (src/kernels/blas.h):
 *   products   dsmoe__sgemm in all four layouts and dsmoe__sgemv against a float64
 *              reference, with an error bound of the order of K·eps·Σ|a||b|;
 *   edges      M or N = 0 leaves C alone, K = 0 with beta 0 gives zeros, beta 0
 *              overwrites NaN in C, beta 1 accumulates, leading dimensions wider than
 *              the rows;
 *   threads    several threads calling at once, many times, over a mix of shapes
 *              (small ones on the small-product path, larger ones through BLIS), get exactly
 *              the bits of the same calls made one at a time;
 *   one thread BLIS_NUM_THREADS=4 in the environment: a large product still runs
 *              in the calling thread only (the process's thread count, sampled
 *              during the call, never grows).
 */
#include "kernels/blas.h"
#include "testlib.h"

#include <pthread.h>
#include <time.h>

typedef struct gemm_case {
    int ta, tb, M, N, K, lda, ldb, ldc;
    float alpha, beta;
    float *A, *B, *C0; /* operands and C's contents before the call */
    float *want;       /* bits of the call made alone */
} gemm_case;

static float *rand_buf(size_t n) {
    float *v = (float *)malloc(n * sizeof(float) + 1);
    for (size_t i = 0; i < n; i++) v[i] = (float)tl_normal();
    return v;
}

/* Rows and columns of op(X) stored with leading dimension ld. */
static size_t op_size(int trans, int rows, int cols, int ld) {
    return (size_t)(trans ? cols : rows) * (size_t)ld;
}

static void case_init(gemm_case *c, int ta, int tb, int M, int N, int K, int pad, float alpha,
                      float beta) {
    memset(c, 0, sizeof *c);
    c->ta = ta;
    c->tb = tb;
    c->M = M;
    c->N = N;
    c->K = K;
    c->lda = (ta ? M : K) + pad;
    c->ldb = (tb ? K : N) + pad;
    c->ldc = N + pad;
    c->alpha = alpha;
    c->beta = beta;
    c->A = rand_buf(op_size(ta, M, K, c->lda));
    c->B = rand_buf(op_size(tb, K, N, c->ldb));
    c->C0 = rand_buf((size_t)M * c->ldc);
    c->want = (float *)malloc((size_t)M * c->ldc * sizeof(float) + 1);
}

static void case_free(gemm_case *c) {
    free(c->A);
    free(c->B);
    free(c->C0);
    free(c->want);
}

static void case_run(const gemm_case *c, float *C) {
    memcpy(C, c->C0, (size_t)c->M * c->ldc * sizeof(float));
    dsmoe__sgemm(c->ta, c->tb, c->M, c->N, c->K, c->alpha, c->A, c->lda, c->B, c->ldb, c->beta,
                 C, c->ldc);
}

/* C against the float64 product; the padding columns of C must be untouched. */
static void case_check(const char *what, const gemm_case *c, const float *C) {
    int bad = 0;
    double worst = 0;
    for (int i = 0; i < c->M; i++) {
        for (int j = 0; j < c->ldc; j++) {
            const size_t at = (size_t)i * c->ldc + j;
            if (j >= c->N) {
                bad += memcmp(&C[at], &c->C0[at], sizeof(float)) != 0;
                continue;
            }
            double mag;
            const double s =
                tl_gemm64_at(c->A, c->ta, c->lda, c->B, c->tb, c->ldb, i, j, c->K, &mag);
            const double ref = c->alpha * s + (c->beta != 0.0f ? c->beta * (double)c->C0[at] : 0.0);
            mag = fabs((double)c->alpha) * mag + fabs(c->beta * (double)c->C0[at]);
            const double err = fabs((double)C[at] - ref);
            const double tol = (2.0 * c->K + 4.0) * 0x1.0p-24 * mag + 1e-30;
            if (!(err <= tol)) bad++;
            if (err / (mag + 1e-30) > worst) worst = err / (mag + 1e-30);
        }
    }
    tl_checks++;
    if (bad)
        TL_FAIL("%s: %d elements off the float64 product (or padding written); worst relative "
                "error %.3g",
                what, bad, worst);
}

static void test_products(void) {
    tl_seed(1);
    static const int dims[][3] = {{1, 1, 1}, {5, 7, 3}, {37, 96, 130}, {64, 200, 256}, {130, 70, 9}};
    for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++) {
        for (int ta = 0; ta < 2; ta++) {
            for (int tb = 0; tb < 2; tb++) {
                for (int variant = 0; variant < 2; variant++) {
                    gemm_case c;
                    /* variant 0: C = A·B; 1: C = 0.5·A·B + C with padded leading dimensions */
                    case_init(&c, ta, tb, dims[d][0], dims[d][1], dims[d][2], variant ? 3 : 0,
                              variant ? 0.5f : 1.0f, variant ? 1.0f : 0.0f);
                    float *C = (float *)malloc((size_t)c.M * c.ldc * sizeof(float));
                    case_run(&c, C);
                    char what[96];
                    snprintf(what, sizeof what, "sgemm %c%c %dx%dx%d %s", ta ? 'T' : 'N',
                             tb ? 'T' : 'N', c.M, c.N, c.K, variant ? "alpha 0.5 beta 1 padded" : "");
                    case_check(what, &c, C);
                    free(C);
                    case_free(&c);
                }
            }
        }
    }
}

static void test_gemv(void) {
    tl_seed(2);
    static const int dims[][2] = {{1, 1}, {64, 67}, {256, 7168}, {3, 1000}};
    for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++) {
        const int M = dims[d][0], N = dims[d][1], lda = N + (int)d;
        float *A = rand_buf((size_t)M * lda), *x = rand_buf((size_t)N), *y = rand_buf((size_t)M);
        y[0] = NAN; /* beta is 0: y's old contents are ignored */
        dsmoe__sgemv(M, N, A, lda, x, y);
        int bad = 0;
        for (int i = 0; i < M; i++) {
            double s = 0, mag = 0;
            for (int k = 0; k < N; k++) {
                s += (double)A[(size_t)i * lda + k] * x[k];
                mag += fabs((double)A[(size_t)i * lda + k] * x[k]);
            }
            bad += !(fabs(y[i] - s) <= (2.0 * N + 4.0) * 0x1.0p-24 * mag + 1e-30);
        }
        tl_checks++;
        if (bad) TL_FAIL("sgemv %dx%d: %d rows off the float64 product", M, N, bad);
        free(A);
        free(x);
        free(y);
    }
}

static void test_edges(void) {
    tl_seed(3);
    float A[12], B[12], C[12];
    for (int i = 0; i < 12; i++) {
        A[i] = (float)(i + 1);
        B[i] = (float)(2 * i - 5);
        C[i] = -7.0f;
    }
    /* M = 0 and N = 0: nothing is written */
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, 0, 3, 4, 1.0f, A, 4, B, 4, 0.0f, C, 3);
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, 3, 0, 4, 1.0f, A, 4, B, 4, 0.0f, C, 3);
    int untouched = 1;
    for (int i = 0; i < 12; i++) untouched &= C[i] == -7.0f;
    ASSERT_TRUE(untouched);
    /* K = 0, beta 0: C = 0 even where it held NaN */
    C[4] = NAN;
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__NOTRANS, 3, 3, 0, 1.0f, A, 1, B, 3, 0.0f, C, 4);
    int zeros = 1;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) zeros &= C[i * 4 + j] == 0.0f;
    ASSERT_TRUE(zeros);
    ASSERT_TRUE(C[3] == -7.0f && C[7] == -7.0f && C[11] == -7.0f); /* padding column */
    /* beta 0 overwrites NaN; beta 1 accumulates onto it exactly */
    for (int i = 0; i < 12; i++) C[i] = NAN;
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__NOTRANS, 2, 2, 3, 1.0f, A, 3, B, 2, 0.0f, C, 2);
    /* A = [1 2 3; 4 5 6], B = [-5 -3; -1 1; 3 5] */
    ASSERT_TRUE(C[0] == 1 * -5.0f + 2 * -1.0f + 3 * 3.0f);
    ASSERT_TRUE(C[3] == 4 * -3.0f + 5 * 1.0f + 6 * 5.0f);
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__NOTRANS, 2, 2, 3, 1.0f, A, 3, B, 2, 1.0f, C, 2);
    ASSERT_TRUE(C[0] == 2 * (1 * -5.0f + 2 * -1.0f + 3 * 3.0f));
    ASSERT_TRUE(isnan(C[4]));
}

/* ------------------------------------------------------------- concurrency -- */

#define N_WORKERS 4
#define ROUNDS 24

typedef struct worker {
    gemm_case *cases;
    int n_cases, id, mismatches;
    float *C;
    const float *gx, *gA;
    const float *gwant;
    int gM, gN;
} worker;

static void *worker_run(void *arg) {
    worker *w = (worker *)arg;
    float *y = (float *)malloc((size_t)w->gM * sizeof(float));
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < w->n_cases; i++) {
            /* each worker walks the cases in its own rotation, so that different shapes
             * (and the packed and unpacked paths) overlap */
            const gemm_case *c = &w->cases[(i + w->id * 2 + r) % w->n_cases];
            case_run(c, w->C);
            if (memcmp(w->C, c->want, (size_t)c->M * c->ldc * sizeof(float)) != 0)
                w->mismatches++;
        }
        dsmoe__sgemv(w->gM, w->gN, w->gA, w->gN, w->gx, y);
        if (memcmp(y, w->gwant, (size_t)w->gM * sizeof(float)) != 0) w->mismatches++;
    }
    free(y);
    return NULL;
}

static void test_concurrent_bits(void) {
    tl_seed(4);
    static const int shapes[][5] = {
        /* ta, tb, M, N, K: the layer's and the router's layouts */
        {0, 1, 1, 64, 67},    {0, 1, 48, 352, 256}, {0, 0, 40, 176, 256}, {1, 0, 64, 128, 48},
        {0, 0, 61, 256, 64},  {0, 1, 200, 64, 300}, {0, 1, 256, 256, 256}, {1, 0, 256, 192, 200},
    };
    enum { NC = sizeof shapes / sizeof shapes[0] };
    gemm_case cases[NC];
    size_t cmax = 0;
    for (int i = 0; i < NC; i++) {
        case_init(&cases[i], shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3], shapes[i][4],
                  i % 3, 1.0f, i % 2 ? 1.0f : 0.0f);
        case_run(&cases[i], cases[i].want); /* alone, before any thread starts */
        const size_t n = (size_t)cases[i].M * cases[i].ldc;
        cmax = n > cmax ? n : cmax;
    }
    const int gM = 64, gN = 2048;
    float *gA = rand_buf((size_t)gM * gN), *gx = rand_buf((size_t)gN);
    float *gwant = (float *)malloc((size_t)gM * sizeof(float));
    dsmoe__sgemv(gM, gN, gA, gN, gx, gwant);

    worker w[N_WORKERS];
    pthread_t th[N_WORKERS];
    for (int i = 0; i < N_WORKERS; i++) {
        w[i] = (worker){cases, NC, i, 0, (float *)malloc(cmax * sizeof(float)), gx, gA, gwant, gM, gN};
        ASSERT_EQ_INT(pthread_create(&th[i], NULL, worker_run, &w[i]), 0);
    }
    int mism = 0;
    for (int i = 0; i < N_WORKERS; i++) {
        pthread_join(th[i], NULL);
        mism += w[i].mismatches;
        free(w[i].C);
    }
    tl_checks++;
    if (mism)
        TL_FAIL("%d of %d concurrent calls (%d threads) differ from the same call made alone",
                mism, N_WORKERS * ROUNDS * (NC + 1), N_WORKERS);
    for (int i = 0; i < NC; i++) case_free(&cases[i]);
    free(gA);
    free(gx);
    free(gwant);
}

/* ------------------------------------------------------------ one thread -- */

static int process_threads(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    char line[256];
    int n = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "Threads:", 8) == 0) n = atoi(line + 8);
    fclose(f);
    return n;
}

typedef struct watch {
    volatile int stop;
    int most;
} watch;

static void *watch_run(void *arg) {
    watch *wt = (watch *)arg;
    const struct timespec pause = {0, 200000};
    while (!wt->stop) {
        int n = process_threads();
        if (n > wt->most) wt->most = n;
        nanosleep(&pause, NULL);
    }
    return NULL;
}

static void test_one_thread_per_call(void) {
    if (process_threads() < 0) {
        fprintf(stderr, "  (no /proc/self/status: thread count not checked)\n");
        return;
    }
    tl_seed(5);
    const int n = 768;
    gemm_case c;
    case_init(&c, 0, 1, n, n, n, 0, 1.0f, 0.0f);
    float *C = (float *)malloc((size_t)n * n * sizeof(float));
    watch wt = {0, 0};
    pthread_t th;
    ASSERT_EQ_INT(pthread_create(&th, NULL, watch_run, &wt), 0);
    const int before = process_threads(); /* this thread and the watcher */
    for (int r = 0; r < 3; r++) case_run(&c, C);
    wt.stop = 1;
    pthread_join(th, NULL);
    tl_checks++;
    if (wt.most > before)
        TL_FAIL("a product with BLIS_NUM_THREADS=4 in the environment started threads: %d "
                "threads seen during the call, %d before",
                wt.most, before);
    free(C);
    case_free(&c);
}

int main(void) {
    /* Set before BLIS initialises (at the first product): a BLIS that took its thread
     * count from the environment would start 4 threads per call. */
    setenv("BLIS_NUM_THREADS", "4", 1);
    RUN(test_one_thread_per_call);
    RUN(test_products);
    RUN(test_gemv);
    RUN(test_edges);
    RUN(test_concurrent_bits);
    return TEST_SUMMARY();
}
