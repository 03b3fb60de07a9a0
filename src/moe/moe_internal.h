/*
 * moe_internal.h — internals of the MoE layer exposed to the tests (not installed).
 */
#ifndef DSMOE_MOE_INTERNAL_H
#define DSMOE_MOE_INTERNAL_H

#include "core/internal.h"
#include "dsmoe/moe.h"
#include "kernels/kernels.h"

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

/* dsmoe_moe_load_safetensors; checked = 1 skips the tensor checks (the caller ran
 * dsmoe_moe_check_safetensors with the layer's config). */
dsmoe_status dsmoe__moe_load(dsmoe_moe *m, const dsmoe_safetensors *st, const char *prefix,
                             int checked);
/* The __metadata__ key of a layer's saved config: "dsmoe.moe_config" for an empty
 * prefix, else "dsmoe.moe_config@<prefix>". Returns 0 if it does not fit. */
int dsmoe__moe_config_key(char *buf, size_t size, const char *prefix);

/* Rows of an expert's row block up to which the layer (and the EP layer, which must
 * give the same bits) uses the weight-streaming product dsmoe__moe_gemm_nt, above which
 * SGEMM, for the kernel set in use and the weights' type: with AVX-512 16 for FP32 and
 * 128 for BF16 (widened for SGEMM), 16 with AVX2, else DSMOE_MOE_DECODE_MAX_T. Always
 * >= DSMOE_MOE_DECODE_MAX_T. */
int dsmoe__moe_skinny_max(dsmoe_dtype weight_dtype);

/* Test hooks: allocations of layer memory (parameters, gradients, bias, workspace)
 * so far, and the 1-based allocation to fail (0: none). */
extern int64_t dsmoe__moe_alloc_calls;
extern int64_t dsmoe__moe_alloc_fail_at;

#endif /* DSMOE_MOE_INTERNAL_H */
