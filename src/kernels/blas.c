/* blas.c — BLIS calls, single-threaded per call and lock-free (see blas.h). */
#include "kernels/blas.h"

#include <blis.h>
#include <pthread.h>

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

static cntx_t *context(void) {
    pthread_once(&blis_once, blis_choose);
    return blis_context; /* NULL: BLIS's own choice */
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
