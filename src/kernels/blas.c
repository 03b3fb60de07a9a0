/* blas.c — BLIS calls, single-threaded per call and lock-free (see blas.h). */
#include "kernels/blas.h"
#include "kernels/kernels.h"

#include <blis.h>
#include <pthread.h>
#include <string.h>

/* The BLIS context (kernels and block sizes) for this CPU, chosen once. BLIS 0.9.0
 * does not recognise recent AMD CPUs and falls back to its portable C kernels (a
 * third of the speed); with AVX-512 (F, DQ, BW, VL) its Skylake-X kernels are the
 * fastest it has on Zen 4 and later as well. The choice depends only on the CPU, so
 * results never depend on the thread count or the environment. Looking a context up
 * by architecture is BLIS's internal interface, reachable only in the static archive;
 * with a shared BLIS, BLIS's own choice stands. */
static cntx_t *blis_context;
static arch_t blis_arch;
static pthread_once_t blis_once = PTHREAD_ONCE_INIT;

static void blis_choose(void) {
    bli_init();
    blis_arch = bli_arch_query_id();
#if defined(DSMOE_BLIS_CONTEXTS) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    arch_t want = bli_arch_query_id();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        want = BLIS_ARCH_SKX;
    else if (want == BLIS_ARCH_GENERIC && __builtin_cpu_supports("avx2") &&
             __builtin_cpu_supports("fma"))
        want = BLIS_ARCH_HASWELL;
    if (want != blis_arch) {
        blis_context = bli_gks_lookup_ind_cntx(want, BLIS_NAT);
        if (blis_context) blis_arch = want;
    }
#endif
}

/* The small-product path (sgemm_small.c) for the products whose packing BLIS's time and
 * memory would go to (its packing pools, about 17.5 MB per thread whatever the size):
 * enabled when its bits are BLIS's, that is when BLIS's float micro-kernels are the
 * x86 assembly ones, whose every element is one fma chain over k in increasing order,
 * restarted per block of K (KC elements, the last block taking up to KC_max), each block
 * added to C. Then the path taken never shows in a result, and may depend on the sizes
 * of a call (tests/test_blas.c compares the two bit for bit). */
static int small_kc, small_kc_max;

static void small_choose(void) {
    cntx_t *cx = blis_context ? blis_context : (cntx_t *)bli_gks_query_cntx();
    if (!cx) return;
    switch (blis_arch) {
    case BLIS_ARCH_SKX:
    case BLIS_ARCH_HASWELL:
    case BLIS_ARCH_ZEN:
    case BLIS_ARCH_ZEN2:
    case BLIS_ARCH_ZEN3: break;
    default: return;
    }
    const dim_t kc = bli_cntx_get_blksz_def_dt(BLIS_FLOAT, BLIS_KC, cx);
    const dim_t kmax = bli_cntx_get_blksz_max_dt(BLIS_FLOAT, BLIS_KC, cx);
    if (kc < 1 || kmax < kc || kmax > DSMOE__SGEMM_SMALL_KMAX) return;
    small_kc = (int)kc;
    small_kc_max = (int)kmax;
}

static void choose(void) {
    blis_choose();
    small_choose();
}

static cntx_t *context(void) {
    pthread_once(&blis_once, choose);
    return blis_context; /* NULL: BLIS's own choice */
}

int dsmoe__sgemm_small_kc(int *kc_max) {
    (void)context();
    if (kc_max) *kc_max = small_kc_max;
    return small_kc;
}

void dsmoe__sgemm_small(int ta, int tb, int M, int N, int K, const float *A, int lda,
                        const float *B, int ldb, float beta, float *C, int ldc) {
    (void)context();
    const dsmoe__sgemm_small_fn f = dsmoe__kernels()->sgemm_small;
    const int kc = small_kc > 0 ? small_kc : DSMOE__SGEMM_SMALL_KMAX;
    const int kmax = small_kc > 0 ? small_kc_max : DSMOE__SGEMM_SMALL_KMAX;
    if (K <= 0) {
        if (beta == 0.0f)
            for (int i = 0; i < M; i++) memset(C + (size_t)i * (size_t)ldc, 0, (size_t)N * sizeof(float));
        return;
    }
    /* BLIS's partition of K: blocks of kc, the rest in one block once it is <= kmax */
    for (int k0 = 0; k0 < K;) {
        const int kb = K - k0 <= kmax ? K - k0 : kc;
        f(ta, tb, M, N, kb, ta ? A + (size_t)k0 * (size_t)lda : A + k0, lda,
          tb ? B + k0 : B + (size_t)k0 * (size_t)ldb, ldb, k0 > 0 || beta != 0.0f, C, ldc);
        k0 += kb;
    }
}

/* A runtime object that tells BLIS to use the calling thread only. One per call: BLIS
 * copies it, but a shared one would still be written by concurrent initialisations. */
static void one_thread(rntm_t *r) {
    bli_rntm_init(r);
    bli_rntm_set_num_threads(1, r);
}

void dsmoe__sgemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                  const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    (void)context();
    if (small_kc > 0 && alpha == 1.0f && (beta == 0.0f || beta == 1.0f) &&
        (double)M * (double)N * (double)K <= DSMOE__SGEMM_SMALL_MACS) {
        dsmoe__sgemm_small(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    dsmoe__sgemm_blis(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void dsmoe__sgemm_blis(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    rntm_t r;
    one_thread(&r);
    /* row-major: row stride = leading dimension, column stride 1; BLIS takes the
     * operands as non-const pointers but reads A and B only */
    bli_sgemm_ex(ta ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, tb ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE,
                 M, N, K, &alpha, (float *)A, lda, 1, (float *)B, ldb, 1, &beta, C, ldc, 1,
                 context(), &r);
}

void dsmoe__sgemv(int M, int N, const float *A, int lda, const float *x, float *y) {
    if (M <= 0) return;
    rntm_t r;
    one_thread(&r);
    float one = 1.0f, zero = 0.0f;
    bli_sgemv_ex(BLIS_NO_TRANSPOSE, BLIS_NO_CONJUGATE, M, N, &one, (float *)A, lda, 1,
                 (float *)x, 1, &zero, y, 1, context(), &r);
}

const char *dsmoe__blas_kernels(void) {
    (void)context();
    return bli_arch_string(blis_arch);
}
