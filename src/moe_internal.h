/*
 * moe_internal.h — internals of the MoE layer exposed to the tests (not installed).
 */
#ifndef DSMOE_MOE_INTERNAL_H
#define DSMOE_MOE_INTERNAL_H

#include "internal.h"

/* Counting-sort dispatch of T·K assignments (indices (T, K), every value in 0..E-1)
 * by expert, stable in (token, k). capacity < 0: no limit; else each expert keeps
 * its first `capacity` assignments in that order. Outputs:
 *   counts (E)      assignments per expert before drops
 *   kept (E)        after drops
 *   offsets (E + 1) first row of each expert; offsets[E] = rows in use
 *   slot (T, K)     row of each assignment, -1 if dropped
 *   row_tok (T·K)   token of each row
 * Returns the number of dropped assignments. */
int64_t dsmoe__moe_dispatch(int64_t *counts, int64_t *kept, int64_t *offsets, int32_t *slot,
                            int32_t *row_tok, const int32_t *indices, int64_t T, int32_t K,
                            int32_t E, int64_t capacity);

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

#endif /* DSMOE_MOE_INTERNAL_H */
