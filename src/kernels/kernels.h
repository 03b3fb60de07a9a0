/*
 * kernels.h — vectorised element-wise kernels with a scalar reference.
 *
 * The scalar functions in ref.c are the specification. The AVX2 and AVX-512
 * variants perform the same IEEE operations in the same order (same polynomial,
 * same fused multiply-adds, same 16-lane summation tree), so every ISA gives
 * bit-identical results. The set is chosen once from the CPU features;
 * DSMOE_FORCE_REF=1 forces the reference.
 *
 * exp(x): Cody–Waite reduction x = n·ln2 + r, |r| <= ln2/2, degree-7 minimax
 * polynomial (Cephes expf coefficients), 2^n applied as two factors so that
 * subnormal results are handled. Max error about 1 ulp on [-103.97, 88.72];
 * 0 below, +inf above. Inputs must not be NaN.
 *
 * Canonical summation order ("16-lane tree"): element i is added to partial
 * sum i mod 16 in index order; the 16 partials are then combined as
 * p[j] += p[j+8], p[j] += p[j+4], p[j] += p[j+2], p[0] += p[1].
 */
#ifndef DSMOE_KERNELS_H
#define DSMOE_KERNELS_H

#include "core/internal.h"

#include <stdint.h>

/* The MoE products' ISA variants (moe_gemm.c, moe_gemm_pk.c); bf16 != 0: W is bf16. */
typedef void (*dsmoe__gemm_fn)(float *C, int64_t ldc, const float *const *X, int n, const void *W,
                               int bf16, int r0, int r1, int K);

/* The small products' ISA variants (sgemm_small.c): C (M, N) [ldc] = op(A) · op(B)
 * (add = 0) or C + op(A) · op(B) (add = 1), row-major, op(X) = X or X^T (ta, tb),
 * K <= DSMOE__SGEMM_SMALL_KMAX; each element one fma chain over k in increasing order
 * from +0, then added to C: identical bits on every ISA. No allocation, no packing
 * beyond a stack panel. blas.c's dsmoe__sgemm calls them for small products. */
#define DSMOE__SGEMM_SMALL_KMAX 512
typedef void (*dsmoe__sgemm_small_fn)(int ta, int tb, int M, int N, int K, const float *A, int lda,
                                      const float *B, int ldb, int add, float *C, int ldc);

typedef struct dsmoe__kernel_table {
    const char *name;
    /* out[i] = 1 / (1 + exp(-in[i])) */
    void (*sigmoid)(float *out, const float *in, int64_t n);
    /* s[i] = sigmoid(u[i]); if b: c[i] = s[i] + b[i] (one pass). Returns 1 if any u[i]
     * is NaN or ±Inf (s and c are then unspecified), else 0. */
    int (*sigmoid_bias)(float *s, float *c, const float *u, const float *b, int64_t n);
    /* 1 if any of x[0..n) is NaN or ±Inf, else 0 */
    int (*any_nonfinite)(const float *x, int64_t n);
    /* out = softmax(in) over n elements: exp(in - max) / (16-lane-tree sum) */
    void (*softmax)(float *out, const float *in, int64_t n);
    /* One row of attention probabilities in place: x_j = p_j · scale and p_j = softmax(x)_j
     * for j < n (n >= 1; exactly softmax's arithmetic on x: the same bits), p_j = 0 for
     * n <= j < len. With lse, *lse = max(x) − log(1 / s), s the exps' 16-lane-tree sum:
     * the log-sum-exp of x, 1 / s being the probability of the largest x. */
    void (*softmax_scaled)(float *p, int64_t n, int64_t len, float scale, float *lse);
    /* out[i] = bf16 word in[i] widened to fp32 (exact) */
    void (*bf16_to_f32)(float *out, const uint16_t *in, int64_t n);
    /* 16-lane-tree sum of fmaf(x[i], w[i]) with w bf16 */
    float (*dot_bf16)(const float *x, const uint16_t *w, int64_t n);
    /* h[i] = silu(g[i]) * u[i], silu(g) = g / (1 + exp(-g)) */
    void (*swiglu)(float *h, const float *g, const float *u, int64_t n);
    /* SwiGLU backward, accumulating: dg[i] += dh·u·σ(g)(1 + g(1 − σ(g))), du[i] += dh·silu(g).
     * Either dg or du may alias nothing else. */
    void (*swiglu_backward)(float *dg, float *du, const float *dh, const float *g,
                            const float *u, int64_t n);
    /* Group scores of the selection scores c (G groups of gsize): the max (m = 1) or
     * the sum of the m largest, added in descending order (largest first). */
    void (*group_scores)(float *gs, const float *c, int32_t G, int32_t gsize, int32_t m,
                         float *scratch_v, int32_t *scratch_i);
    /* The K largest of v[0..n) (finite values): positions into pos (K) and values into
     * val (K), by descending value, the lower position first among equal values.
     * scratch_v / scratch_i hold n entries each. */
    void (*topk)(int32_t *pos, float *val, const float *v, int32_t n, int32_t K,
                 float *scratch_v, int32_t *scratch_i);
    /* The K largest among the blocks v[g*gsize .. (g+1)*gsize) for g in groups[0..ng)
     * (increasing g): expert ids g*gsize + j into ids (K), values into val (K), by
     * descending value, lower id first among equal values. Scratch: ng*gsize + 16. */
    void (*topk_blocks)(int32_t *ids, float *val, const float *v, int32_t gsize,
                        const int32_t *groups, int32_t ng, int32_t K, float *scratch_v,
                        int32_t *scratch_i);
    /* Optional (NULL when the table has none): the whole group-limited selection for n
     * tokens (rows of c, G·gsize each), giving exactly what group_scores (max for m = 1,
     * top-2 sum for m = 2), topk of the TG best groups and topk_blocks over the kept
     * groups (increasing id) give: expert ids (n, K) and their values (n, K). Returns 1
     * when done, 0 (nothing written) for a shape it does not cover. c must be finite. */
    int (*select_grouped)(int32_t *ids, float *val, const float *c, int64_t n, int32_t G,
                          int32_t gsize, int32_t m, int32_t TG, int32_t K);
    /* The MoE layer's weight-streaming product on the checkpoint layout
     * (dsmoe__moe_gemm_nt) and on the packed layout (dsmoe__moe_gemm_pk). */
    dsmoe__gemm_fn gemm_nt;
    dsmoe__gemm_fn gemm_pk;
    /* The small products (sgemm_small.c). */
    dsmoe__sgemm_small_fn sgemm_small;
} dsmoe__kernel_table;

/* The active table (resolved once; thread-safe after the first call). */
const dsmoe__kernel_table *dsmoe__kernels(void);
/* A specific table, or NULL if unavailable on this CPU/build: "ref", "avx2", "avx512". */
const dsmoe__kernel_table *dsmoe__kernels_named(const char *name);

extern const dsmoe__kernel_table dsmoe__kernels_ref;
void dsmoe__gemm_nt_ref(float *C, int64_t ldc, const float *const *X, int n, const void *W, int bf16,
                        int r0, int r1, int K);
void dsmoe__gemm_pk_ref(float *C, int64_t ldc, const float *const *X, int n, const void *W, int bf16,
                        int r0, int r1, int K);
void dsmoe__sgemm_small_ref(int ta, int tb, int M, int N, int K, const float *A, int lda,
    const float *B, int ldb, int add, float *C, int ldc);
#if defined(DSMOE_HAVE_AVX2)
extern const dsmoe__kernel_table dsmoe__kernels_avx2;
void dsmoe__gemm_nt_avx2(float *C, int64_t ldc, const float *const *X, int n, const void *W,
                         int bf16, int r0, int r1, int K);
void dsmoe__gemm_pk_avx2(float *C, int64_t ldc, const float *const *X, int n, const void *W,
                         int bf16, int r0, int r1, int K);
void dsmoe__sgemm_small_avx2(int ta, int tb, int M, int N, int K, const float *A, int lda,
    const float *B, int ldb, int add, float *C, int ldc);
#endif
#if defined(DSMOE_HAVE_AVX512)
extern const dsmoe__kernel_table dsmoe__kernels_avx512;
void dsmoe__gemm_nt_avx512(float *C, int64_t ldc, const float *const *X, int n, const void *W,
                           int bf16, int r0, int r1, int K);
void dsmoe__gemm_pk_avx512(float *C, int64_t ldc, const float *const *X, int n, const void *W,
                           int bf16, int r0, int r1, int K);
void dsmoe__sgemm_small_avx512(int ta, int tb, int M, int N, int K, const float *A, int lda,
    const float *B, int ldb, int add, float *C, int ldc);
#endif

/* Inserts (v, i) into the descending list (vals, ids) of length *n (capacity cap).
 * Candidates must arrive in increasing index order: the strict comparison then keeps
 * the lower index first among equal values. */
static inline void dsmoe__topk_push(float *vals, int32_t *ids, int32_t *n, int32_t cap, float v,
                                    int32_t i) {
    int32_t len = *n;
    if (len == cap) {
        if (!(v > vals[cap - 1])) return;
        len = cap - 1;
    }
    int32_t p = len;
    while (p > 0 && v > vals[p - 1]) {
        vals[p] = vals[p - 1];
        ids[p] = ids[p - 1];
        p--;
    }
    vals[p] = v;
    ids[p] = i;
    *n = len + 1;
}

/* Scalar reference selection kernels (also the fallback of the SIMD versions). */
void dsmoe__group_scores_ref(float *gs, const float *c, int32_t G, int32_t gsize, int32_t m,
                             float *scratch_v, int32_t *scratch_i);
void dsmoe__topk_ref(int32_t *pos, float *val, const float *v, int32_t n, int32_t K,
                     float *scratch_v, int32_t *scratch_i);
void dsmoe__topk_blocks_ref(int32_t *ids, float *val, const float *v, int32_t gsize,
                            const int32_t *groups, int32_t ng, int32_t K, float *scratch_v,
                            int32_t *scratch_i);

/* Scalar building blocks shared with the router (identical to the reference). */
float dsmoe__expf(float x);
float dsmoe__expf_sig(float y);
float dsmoe__sigmoidf(float x);

/* Constants of the exp kernel, shared by every ISA file. */
#define DSMOE__EXP_HI 88.72283935546875f     /* above: +inf */
#define DSMOE__EXP_LO (-103.97208404541016f) /* below: 0 */
#define DSMOE__LOG2E 1.44269502162933349609375f
#define DSMOE__LN2_HI 0.693359375f
#define DSMOE__LN2_LO (-2.12194440e-4f)
#define DSMOE__EXP_C0 1.9875691500e-4f
#define DSMOE__EXP_C1 1.3981999507e-3f
#define DSMOE__EXP_C2 8.3334519073e-3f
#define DSMOE__EXP_C3 4.1665795894e-2f
#define DSMOE__EXP_C4 1.6666665459e-1f
#define DSMOE__EXP_C5 5.0000001201e-1f

/* Rows of an expert up to which the layer uses dsmoe__moe_gemm_nt instead of SGEMM. */
#define DSMOE__MOE_SKINNY_N 64

/* C[i][r] (row stride ldc) = X[i] · W[r] for rows i < n (0..DSMOE__MOE_SKINNY_N) of X,
 * given as n row pointers of D floats, and weight rows r0 <= r < r1 of W (R, D), F32 or
 * BF16 (wdt). Streams each weight row once; fixed 16-lane fma summation, identical bits
 * on every ISA and for any n (see moe_gemm.c). */
void dsmoe__moe_gemm_nt(float *C, int64_t ldc, const float *const *X, int n, const void *W,
                        dsmoe_dtype wdt, int r0, int r1, int D);
/* The same with the variant for kernel set `isa` ("ref", "avx2", "avx512"); returns 0
 * (doing nothing) if the build or the CPU lacks it, or n is out of range. For tests. */
int dsmoe__moe_gemm_nt_isa(const char *isa, float *C, int64_t ldc, const float *const *X, int n,
                           const void *W, dsmoe_dtype wdt, int r0, int r1, int D);

/* The same product on W in the packed layout (moe_gemm_pk.c): element (r, k) of W (R, K)
 * at P[((r / 16) · K + k) · 16 + r % 16], rows padded to a multiple of 16; r0 must be a
 * multiple of 16. Each result is one fma chain over k in increasing order: identical
 * bits on every ISA and for any n, different from dsmoe__moe_gemm_nt's. */
void dsmoe__moe_gemm_pk(float *C, int64_t ldc, const float *const *X, int n, const void *P,
                        dsmoe_dtype wdt, int r0, int r1, int K);
/* The variant for kernel set `isa`, as dsmoe__moe_gemm_nt_isa (0 also if r0 % 16 != 0). */
int dsmoe__moe_gemm_pk_isa(const char *isa, float *C, int64_t ldc, const float *const *X, int n,
                           const void *P, dsmoe_dtype wdt, int r0, int r1, int K);
/* W (R, K) row-major <-> P packed (ceil(R/16)·16·K elements, padding rows 0), element
 * size esz bytes. */
void dsmoe__moe_pack_rows(void *P, const void *W, size_t esz, int64_t R, int64_t K);
void dsmoe__moe_unpack_rows(void *W, const void *P, size_t esz, int64_t R, int64_t K);

#endif /* DSMOE_KERNELS_H */
