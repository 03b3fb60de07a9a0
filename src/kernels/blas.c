/* blas.c — OpenBLAS calls, one at a time (see blas.h). Row-major throughout. */
#include "kernels/blas.h"

void dsmoe__sgemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, float alpha,
                  const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
#pragma omp critical(dsmoe_blas)
    cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* y (M) = A (M, N) · x */
void dsmoe__sgemv(int M, int N, const float *A, int lda, const float *x, float *y) {
#pragma omp critical(dsmoe_blas)
    cblas_sgemv(CblasRowMajor, CblasNoTrans, M, N, 1.0f, A, lda, x, 1, 0.0f, y, 1);
}
