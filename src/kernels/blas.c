/* blas.c — BLIS calls, single-threaded per call and lock-free (see blas.h). */
#include "kernels/blas.h"

#include <blis.h>

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
                 NULL, &r);
}

void dsmoe__sgemv(int M, int N, const float *A, int lda, const float *x, float *y) {
    if (M <= 0) return;
    rntm_t r;
    one_thread(&r);
    float one = 1.0f, zero = 0.0f;
    bli_sgemv_ex(BLIS_NO_TRANSPOSE, BLIS_NO_CONJUGATE, M, N, &one, (float *)A, lda, 1,
                 (float *)x, 1, &zero, y, 1, NULL, &r);
}
