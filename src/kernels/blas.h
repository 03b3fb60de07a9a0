/*
 * blas.h — the only way dsmoe calls OpenBLAS.
 *
 * OpenBLAS as Debian ships it (0.3.21, OpenMP build) is not safe to call from two
 * threads at once: its buffer pool is sized for one caller (NUM_PARALLEL = 1), and
 * two concurrent SGEMMs occasionally share a buffer and return wrong numbers (a test
 * that repeats a two-thread projection 400 times caught it now and then). These
 * wrappers let one call run at a time, process-wide; parallel regions still overlap
 * everything else (gathers, routing, the layer's own products).
 */
#ifndef DSMOE_BLAS_H
#define DSMOE_BLAS_H

#include <cblas.h>

void dsmoe__sgemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, float alpha,
                  const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);
void dsmoe__sgemv(int M, int N, const float *A, int lda, const float *x, float *y);

#endif /* DSMOE_BLAS_H */
