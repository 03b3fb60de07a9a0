/*
 * moe_golden_util.h — reading the MoE golden files written by tests/ref/ (metadata
 * keys, tensors as doubles, the router config they were made with), shared by
 * test_moe_golden.c and test_moe_blocks_golden.c. Include after testlib.h.
 */
#ifndef DSMOE_MOE_GOLDEN_UTIL_H
#define DSMOE_MOE_GOLDEN_UTIL_H

#include "testlib.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* A metadata value; a missing key is a test failure ("0" is returned). */
static inline const char *meta(const dsmoe_safetensors *st, const char *key) {
    const char *v = dsmoe_safetensors_metadata(st, key);
    if (!v) {
        TL_FAIL("metadata key %s missing", key);
        return "0";
    }
    return v;
}
static inline long meta_int(const dsmoe_safetensors *st, const char *key) {
    return strtol(meta(st, key), NULL, 10);
}
static inline double meta_f(const dsmoe_safetensors *st, const char *key) {
    return strtod(meta(st, key), NULL);
}

/* A golden tensor (F64, F32 or I32) as doubles; returns the element count, 0 (and a
 * test failure) if it is missing, larger than cap or of another dtype. */
static inline int64_t get64(const dsmoe_safetensors *st, const char *name, double *out,
                            int64_t cap) {
    dsmoe_tensor_view v;
    if (dsmoe_safetensors_get(st, name, &v) != DSMOE_OK) {
        TL_FAIL("golden tensor %s missing", name);
        return 0;
    }
    int64_t n = 1;
    for (int d = 0; d < v.ndim; d++) n *= v.shape[d];
    if (n > cap || (v.dtype != DSMOE_DTYPE_F64 && v.dtype != DSMOE_DTYPE_F32 &&
                    v.dtype != DSMOE_DTYPE_I32)) {
        TL_FAIL("golden tensor %s: too large or not F64/F32/I32", name);
        return 0;
    }
    const char *p = (const char *)v.data;
    for (int64_t i = 0; i < n; i++) {
        if (v.dtype == DSMOE_DTYPE_F64) {
            memcpy(&out[i], p + i * 8, 8);
        } else if (v.dtype == DSMOE_DTYPE_F32) {
            float f;
            memcpy(&f, p + i * 4, 4);
            out[i] = f;
        } else {
            int32_t k;
            memcpy(&k, p + i * 4, 4);
            out[i] = k;
        }
    }
    return n;
}

static inline double maxabs(const double *a, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs(a[i]));
    return m;
}

/* The router config a golden file was generated with (its metadata). */
static inline void router_from_meta(const dsmoe_safetensors *st, dsmoe_router_config *r) {
    dsmoe_router_preset("deepseek-v3", r);
    r->n_experts = (int32_t)meta_int(st, "E");
    r->top_k = (int32_t)meta_int(st, "K");
    r->n_groups = (int32_t)meta_int(st, "G");
    r->topk_groups = (int32_t)meta_int(st, "TG");
    r->score_func = strcmp(meta(st, "score"), "softmax") == 0 ? DSMOE_SCORE_FUNC_SOFTMAX
                                                              : DSMOE_SCORE_FUNC_SIGMOID;
    r->group_score = strcmp(meta(st, "group_score"), "max") == 0 ? DSMOE_GROUP_SCORE_MAX
                                                                  : DSMOE_GROUP_SCORE_TOPSUM;
    r->group_topm = (int32_t)meta_int(st, "group_topm");
    r->group_mask = strcmp(meta(st, "mask"), "zero") == 0 ? DSMOE_GROUP_MASK_ZERO
                                                          : DSMOE_GROUP_MASK_EXCLUDE;
    r->normalize = (int32_t)meta_int(st, "normalize");
    r->norm_eps = (float)meta_f(st, "norm_eps");
    r->scale = (float)meta_f(st, "scale");
    r->use_bias = (int32_t)meta_int(st, "use_bias");
    r->precision = DSMOE_PRECISION_FP32;
}

#endif /* DSMOE_MOE_GOLDEN_UTIL_H */
