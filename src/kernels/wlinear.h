/*
 * wlinear.h — products with weights kept as stored (F32, BF16, F16, or F8_E4M3 with
 * block scales), widened to fp32 as they stream: y = x · Wᵀ for W (rows, cols) in the
 * checkpoint layout [out, in]. The model layer's attention, dense FFN and head run on
 * these; the weights are usually memory-mapped file views (any alignment).
 *
 * Results are identical for any thread count: every output element is computed by one
 * thread, in an order fixed by the shapes alone (never by the thread count).
 */
#ifndef DSMOE_KERNELS_WLINEAR_H
#define DSMOE_KERNELS_WLINEAR_H

#include "core/internal.h"

#include <stddef.h>
#include <stdint.h>

typedef enum dsmoe__wtype {
    DSMOE__WT_F32 = 0,
    DSMOE__WT_BF16 = 1,
    DSMOE__WT_F16 = 2,
    DSMOE__WT_F8E4M3 = 3 /* "fn" variant, times its block's scale */
} dsmoe__wtype;

typedef struct dsmoe__wmat {
    const void *data;  /* rows · cols elements of `type`, row-major; any alignment */
    const void *scale; /* F8E4M3 only: F32 (ceil(rows / br), ceil(cols / bc)); any alignment */
    int64_t rows, cols;
    int32_t br, bc; /* F8E4M3 block size */
    dsmoe__wtype type;
} dsmoe__wmat;

/* Bytes of scratch one thread of dsmoe__wlinear needs for products with at most
 * max_cols columns and max_T tokens (64-byte multiple; may be 0). */
size_t dsmoe__wlinear_scratch(int64_t max_cols, int64_t max_T);

/* y[t·ldy + o] = Σ_k x[t·ldx + k] · W[o][k] for t < T, o < W->rows (overwrites y).
 * Uses n_threads threads (OpenMP; 1: the caller's thread only); scratch holds
 * n_threads · dsmoe__wlinear_scratch(W->cols, T) bytes, 64-byte aligned. Call it from
 * outside any parallel region. No allocation. */
void dsmoe__wlinear(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T,
                    const dsmoe__wmat *W, int n_threads, void *scratch);

/* Widens rows [r0, r1) of W to fp32 into dst ((r1 − r0) · cols floats). */
void dsmoe__wmat_widen(float *dst, const dsmoe__wmat *W, int64_t r0, int64_t r1);

#endif /* DSMOE_KERNELS_WLINEAR_H */
