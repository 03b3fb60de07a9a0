/*
 * wlinear.h — products with weights kept as stored (F32, BF16, F16, or F8_E4M3 with
 * block scales), widened to fp32 as they stream: y = x · Wᵀ for W (rows, cols) in the
 * checkpoint layout [out, in]. The model layer's attention, dense FFN and head run on
 * these; the weights are usually memory-mapped file views (any alignment).
 *
 * Results are identical for any thread count: every output element is computed by one
 * thread, in an order fixed by the shapes alone (never by the thread count).
 *
 * Two paths, chosen by T alone (wlinear.c has the details):
 *   - T < DSMOE__WLINEAR_PANEL_T (decode, memory-bound): W streamed once, widened in
 *     registers; each result is a "16-lane" fma sum (column k into lane k mod 16, lanes
 *     combined as a fixed tree, kernels.h). The AVX-512 kernel and the scalar reference
 *     (DSMOE_FORCE_REF=1, or a CPU without AVX-512: AVX2 machines run the reference)
 *     give identical bits.
 *   - T >= DSMOE__WLINEAR_PANEL_T (prompt, compute-bound): panels of W rows widened into
 *     the thread's scratch, one BLIS SGEMM each. BLIS sums in its own order (and picks
 *     its kernels from the CPU), so this path agrees with the decode path and across
 *     CPUs within fp32 rounding (about C · 2^-24 relative to Σ|x·w|), not bit for bit.
 * Widening is exact (bf16, f16, fp8 values are fp32 values); an fp8 element is its
 * value times its block's scale, rounded once to fp32. fp8 S.1111.111 is NaN.
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

/* T from which the panel + SGEMM path is taken. */
#define DSMOE__WLINEAR_PANEL_T 16
/* About the bytes of one widened panel (fp32); panels have this / (4 · cols) rows,
 * rounded down to a multiple of 16 and kept in [16, 512]. */
#define DSMOE__WLINEAR_PANEL_BYTES (2u << 20)

/* Bytes of scratch one thread of dsmoe__wlinear needs for products with at most
 * max_cols columns and max_T tokens (64-byte multiple): 0 when max_T <
 * DSMOE__WLINEAR_PANEL_T, else one widened panel (up to about 2 MiB, or 64 · max_cols
 * for max_cols above 32768). */
size_t dsmoe__wlinear_scratch(int64_t max_cols, int64_t max_T);

/* y[t·ldy + o] = Σ_k x[t·ldx + k] · W[o][k] for t < T, o < W->rows (overwrites y).
 * Uses n_threads threads (OpenMP; 1: the caller's thread only); scratch holds
 * n_threads · dsmoe__wlinear_scratch(W->cols, T) bytes, 64-byte aligned. Call it from
 * outside any parallel region. No allocation. */
void dsmoe__wlinear(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T,
                    const dsmoe__wmat *W, int n_threads, void *scratch);

/* Widens rows [r0, r1) of W to fp32 into dst ((r1 − r0) · cols floats; any alignment).
 * Exact for F32 / BF16 / F16; F8E4M3: value × scale, one fp32 rounding. */
void dsmoe__wmat_widen(float *dst, const dsmoe__wmat *W, int64_t r0, int64_t r1);

#endif /* DSMOE_KERNELS_WLINEAR_H */
