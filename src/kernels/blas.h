/*
 * blas.h — the only way dsmoe calls a BLAS: BLIS (Debian's libblis, the pthread build),
 * through its typed expert API. Row-major throughout.
 *
 * Threading contract:
 *   - Every call runs in the calling thread only: each call passes BLIS a runtime
 *     object (rntm_t) of its own set to one thread, so BLIS never starts threads and
 *     BLIS_NUM_THREADS / BLIS_JC_NT / ... and OMP_NUM_THREADS in the environment have
 *     no effect on these calls. dsmoe's own OpenMP loops over fixed blocks give the
 *     parallelism.
 *   - Calls are safe from any number of threads at once, with no lock: BLIS keeps no
 *     per-call state outside the rntm_t and its thread-safe memory pools. Each call's
 *     result depends only on its arguments (dimensions, strides, data): never on the
 *     thread count or on other calls running at the same time (tests/test_blas.c).
 *   - The kernel set is chosen once from the CPU (blas.c: BLIS 0.9.0 does not know
 *     recent AMD CPUs), never from the environment.
 *   - Nothing global is changed: no BLAS or BLIS setting of the host process is read
 *     back or set (no openblas_set_num_threads, no bli_thread_set_num_threads), and a
 *     host that uses its own BLAS (OpenBLAS, MKL, another BLIS) keeps its settings.
 *     When libblis.a is linked into libdsmoe.so its symbols are hidden, so dsmoe's BLIS
 *     and the host's BLAS never interpose on each other.
 */
#ifndef DSMOE_BLAS_H
#define DSMOE_BLAS_H

/* Operand layouts: A as stored, or its transpose. */
enum { DSMOE__NOTRANS = 0, DSMOE__TRANS = 1 };

/* C (M, N) [ldc] = alpha · op(A) · op(B) + beta · C; op(A) is (M, K), op(B) is (K, N);
 * ta / tb are DSMOE__NOTRANS or DSMOE__TRANS. beta = 0 ignores C's old contents. */
void dsmoe__sgemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                  const float *B, int ldb, float beta, float *C, int ldc);
/* Products of at most this many multiply-adds (M·N·K), with alpha 1 and beta 0 or 1,
 * take the small-product path (sgemm_small.c: no packing, no allocation) instead of
 * BLIS, with BLIS's bits (blas.c says when the path is enabled). */
#define DSMOE__SGEMM_SMALL_MACS (128.0 * 1024 * 1024)

/* The small-product path itself, whatever the sizes (alpha 1; beta 0 or 1), in BLIS's
 * partition of K; for tests and benchmarks. */
void dsmoe__sgemm_small(int ta, int tb, int M, int N, int K, const float *A, int lda,
                        const float *B, int ldb, float beta, float *C, int ldc);
/* dsmoe__sgemm always through BLIS, for tests and benchmarks. */
void dsmoe__sgemm_blis(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float beta, float *C, int ldc);
/* BLIS's KC (and its maximum into *kc_max) when the small path is enabled, else 0. */
int dsmoe__sgemm_small_kc(int *kc_max);

/* y (M) = A (M, N) [lda] · x */
void dsmoe__sgemv(int M, int N, const float *A, int lda, const float *x, float *y);

/* The BLIS kernel set the products use ("skx", "haswell", ...), for benchmarks. */
const char *dsmoe__blas_kernels(void);

#endif /* DSMOE_BLAS_H */
