/*
 * router.c — DeepSeek-V3 MoE routing: affinities, bias-corrected group-limited
 * top-k, weights, normalisation, scaling; and the backward pass.
 *
 * Implements DeepSeek-V3 report eqs. 15–16 (s = sigmoid(u), selection on s + b,
 * g = s / Σ s over the selected) with the official inference code's group stage
 * (node-limited routing: group score = sum of the top-2 biased scores, or the
 * max without a bias), its −inf exclusion of dropped groups, and the routed
 * scaling factor applied after normalisation (SPEC-routing §2). Softmax scoring
 * covers DeepSeek-V2 and Mixtral/Qwen-style routers.
 *
 * Every token is routed independently by route_token(); the batch drivers split
 * tokens over OpenMP threads, so the bits never depend on the thread count. The
 * element-wise math comes from the kernel table (bit-identical across ISAs);
 * selection is scalar and exact.
 */
#include "core/internal.h"
#include "dsmoe/router.h"
#include "kernels/kernels.h"

#include "kernels/blas.h"
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define DSMOE__MAX_TOPK 256
/* Tokens per SGEMM call in the projection: fixed so that results never depend on
 * the number of threads, large enough to amortise the SGEMM's packing of W. */
#define DSMOE__PROJ_BLOCK 512
/* At most this many tokens use the per-token (GEMV / bf16 dot) projection. */
#define DSMOE__SMALL_T 8
/* Threads used for routing at most (more are simply not used). */
#define DSMOE__MAX_THREADS 256

/* ------------------------------------------------------------------ presets -- */

static const char *const preset_names[] = {"deepseek-v3", "deepseek-v3-hf", "deepseek-v2",
                                           "moonlight",   "mixtral",        "qwen-moe",
                                           NULL};

const char *const *dsmoe_router_preset_names(void) { return preset_names; }

static void config_base(dsmoe_router_config *c) {
    memset(c, 0, sizeof *c);
    c->n_experts = 256;
    c->n_groups = 8;
    c->topk_groups = 4;
    c->top_k = 8;
    c->score_func = DSMOE_SCORE_FUNC_SIGMOID;
    c->group_score = DSMOE_GROUP_SCORE_TOPSUM;
    c->group_topm = 2;
    c->group_mask = DSMOE_GROUP_MASK_EXCLUDE;
    c->normalize = 1;
    c->norm_eps = 0.0f;
    c->scale = 2.5f;
    c->use_bias = 1;
    c->precision = DSMOE_PRECISION_FP32;
    c->nonfinite = DSMOE_NONFINITE_ERROR;
}

dsmoe_status dsmoe_router_preset(const char *name, dsmoe_router_config *cfg) {
    if (!cfg) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_router_preset: cfg is NULL");
    if (!name) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_router_preset: name is NULL");
    dsmoe_router_config c;
    config_base(&c);
    if (strcmp(name, "deepseek-v3") == 0) {
        /* base is V3: 256 experts, 8 groups, keep 4, top-8, sigmoid, top-2 sum, 2.5, bias */
    } else if (strcmp(name, "deepseek-v3-hf") == 0) {
        c.group_mask = DSMOE_GROUP_MASK_ZERO;
        c.norm_eps = 1e-20f;
    } else if (strcmp(name, "deepseek-v2") == 0) {
        c.n_experts = 160;
        c.n_groups = 8;
        c.topk_groups = 3;
        c.top_k = 6;
        c.score_func = DSMOE_SCORE_FUNC_SOFTMAX;
        c.group_score = DSMOE_GROUP_SCORE_MAX;
        c.group_topm = 1;
        c.normalize = 0;
        c.scale = 16.0f;
        c.use_bias = 0;
    } else if (strcmp(name, "moonlight") == 0) {
        c.n_experts = 64;
        c.n_groups = 1;
        c.topk_groups = 1;
        c.top_k = 6;
        c.scale = 2.446f;
    } else if (strcmp(name, "mixtral") == 0) {
        c.n_experts = 8;
        c.n_groups = 1;
        c.topk_groups = 1;
        c.top_k = 2;
        c.score_func = DSMOE_SCORE_FUNC_SOFTMAX;
        c.group_score = DSMOE_GROUP_SCORE_MAX;
        c.group_topm = 1;
        c.scale = 1.0f;
        c.use_bias = 0;
    } else if (strcmp(name, "qwen-moe") == 0) {
        c.n_experts = 64;
        c.n_groups = 1;
        c.topk_groups = 1;
        c.top_k = 8;
        c.score_func = DSMOE_SCORE_FUNC_SOFTMAX;
        c.group_score = DSMOE_GROUP_SCORE_MAX;
        c.group_topm = 1;
        c.scale = 1.0f;
        c.use_bias = 0;
    } else {
        return dsmoe__error(DSMOE_STATUS_NOT_FOUND,
                            "unknown router preset '%s' (known: deepseek-v3, deepseek-v3-hf, "
                            "deepseek-v2, moonlight, mixtral, qwen-moe)",
                            name);
    }
    *cfg = c;
    return DSMOE_OK;
}

/* --------------------------------------------------------------- validation -- */

#define BAD(...) return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, __VA_ARGS__)

dsmoe_status dsmoe_router_config_validate(const dsmoe_router_config *c) {
    if (!c) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "router config is NULL");
    if (c->n_experts < 1 || c->n_experts > DSMOE_MAX_EXPERTS)
        BAD("n_experts = %d: must be in 1..%d", (int)c->n_experts, DSMOE_MAX_EXPERTS);
    if (c->n_groups < 1 || c->n_groups > c->n_experts)
        BAD("n_groups = %d: must be in 1..n_experts (%d)", (int)c->n_groups, (int)c->n_experts);
    if (c->n_experts % c->n_groups != 0)
        BAD("n_experts = %d is not divisible by n_groups = %d", (int)c->n_experts, (int)c->n_groups);
    if (c->topk_groups < 1 || c->topk_groups > c->n_groups)
        BAD("topk_groups = %d: must be in 1..n_groups (%d)", (int)c->topk_groups, (int)c->n_groups);
    int32_t gsize = c->n_experts / c->n_groups;
    int32_t reach = c->topk_groups * gsize;
    if (c->top_k < 1 || c->top_k > reach || c->top_k > DSMOE__MAX_TOPK)
        BAD("top_k = %d: must be in 1..topk_groups*n_experts/n_groups (%d) and at most %d",
            (int)c->top_k, (int)reach, DSMOE__MAX_TOPK);
    if (c->score_func != DSMOE_SCORE_FUNC_SIGMOID && c->score_func != DSMOE_SCORE_FUNC_SOFTMAX)
        BAD("score_func = %d: must be sigmoid (0) or softmax (1)", (int)c->score_func);
    if (c->group_score != DSMOE_GROUP_SCORE_MAX && c->group_score != DSMOE_GROUP_SCORE_TOPSUM)
        BAD("group_score = %d: must be max (0) or topsum (1)", (int)c->group_score);
    if (c->group_score == DSMOE_GROUP_SCORE_TOPSUM && (c->group_topm < 1 || c->group_topm > gsize))
        BAD("group_topm = %d: must be in 1..group size (%d) for the top-m sum group score",
            (int)c->group_topm, (int)gsize);
    if (c->group_mask != DSMOE_GROUP_MASK_EXCLUDE && c->group_mask != DSMOE_GROUP_MASK_ZERO)
        BAD("group_mask = %d: must be exclude (0) or zero (1)", (int)c->group_mask);
    if (c->normalize != 0 && c->normalize != 1) BAD("normalize = %d: must be 0 or 1", (int)c->normalize);
    if (!isfinite(c->norm_eps) || c->norm_eps < 0.0f)
        BAD("norm_eps = %g: must be finite and >= 0", (double)c->norm_eps);
    if (!isfinite(c->scale) || c->scale <= 0.0f)
        BAD("scale = %g: must be finite and > 0", (double)c->scale);
    if (c->use_bias != 0 && c->use_bias != 1) BAD("use_bias = %d: must be 0 or 1", (int)c->use_bias);
    if (c->precision != DSMOE_PRECISION_FP32 && c->precision != DSMOE_PRECISION_BF16)
        BAD("precision = %d: must be fp32 (0) or bf16 (1)", (int)c->precision);
    if (c->nonfinite != DSMOE_NONFINITE_ERROR && c->nonfinite != DSMOE_NONFINITE_SANITIZE)
        BAD("nonfinite = %d: must be error (0) or sanitize (1)", (int)c->nonfinite);
    return DSMOE_OK;
}

#undef BAD

int dsmoe_router_config_json(const dsmoe_router_config *c, char *buf, size_t size) {
    return snprintf(buf, size,
                    "{\"n_experts\": %d, \"n_groups\": %d, \"topk_groups\": %d, \"top_k\": %d, "
                    "\"score_func\": \"%s\", \"group_score\": \"%s\", \"group_topm\": %d, "
                    "\"group_mask\": \"%s\", \"normalize\": %s, \"norm_eps\": %.9g, \"scale\": %.9g, "
                    "\"use_bias\": %s, \"precision\": \"%s\", \"nonfinite\": \"%s\"}",
                    (int)c->n_experts, (int)c->n_groups, (int)c->topk_groups, (int)c->top_k,
                    c->score_func == DSMOE_SCORE_FUNC_SOFTMAX ? "softmax" : "sigmoid",
                    c->group_score == DSMOE_GROUP_SCORE_TOPSUM ? "topsum" : "max",
                    (int)c->group_topm,
                    c->group_mask == DSMOE_GROUP_MASK_ZERO ? "zero" : "exclude",
                    c->normalize ? "true" : "false", (double)c->norm_eps, (double)c->scale,
                    c->use_bias ? "true" : "false",
                    c->precision == DSMOE_PRECISION_BF16 ? "bf16" : "fp32",
                    c->nonfinite == DSMOE_NONFINITE_SANITIZE ? "sanitize" : "error");
}

/* ---------------------------------------------------------------- workspace -- */

/* Scratch for one token on one thread. */
typedef struct token_scratch {
    float *s;       /* (B, E) affinities, when the caller does not want them */
    float *c;       /* (B, E) selection scores */
    float *u;       /* (E) sanitised / bf16-rounded logits, then the candidate scores */
    float *sv;      /* (E + 16) selection-kernel scratch values */
    int32_t *si;    /* (E + 16) selection-kernel scratch positions */
    float *gs;      /* (G) group scores */
    uint8_t *keep;  /* (G) kept-group flags */
    int32_t *gl;    /* (G) kept groups in increasing id order */
    float *topv;    /* (max(B·K, m, TG)) top values */
    int32_t *topi;  /* (max(K, m, TG)) top positions */
} token_scratch;

/* Tokens routed together by the fused path: the selection kernel works on blocks of 16
 * (tokens in lanes); their affinities stay in L1 / L2. */
#define DSMOE__ROUTE_BLOCK 16

static size_t top_cap(const dsmoe_router_config *c) {
    int32_t m = c->top_k * DSMOE__ROUTE_BLOCK;
    if (c->group_topm > m) m = c->group_topm;
    if (c->topk_groups > m) m = c->topk_groups;
    return (size_t)m;
}

static size_t scratch_bytes(const dsmoe_router_config *c) {
    size_t E = (size_t)c->n_experts, G = (size_t)c->n_groups, m = top_cap(c);
    return 2 * dsmoe__align64((size_t)DSMOE__ROUTE_BLOCK * E * 4) + dsmoe__align64(E * 4) +
           2 * dsmoe__align64((E + 16) * 4) + 2 * dsmoe__align64(G * 4) +
           dsmoe__align64(G) + 2 * dsmoe__align64(m * 4);
}

static void scratch_carve(const dsmoe_router_config *c, dsmoe__carver *cv, token_scratch *ts) {
    size_t E = (size_t)c->n_experts, G = (size_t)c->n_groups, m = top_cap(c);
    ts->s = (float *)dsmoe__carve(cv, (size_t)DSMOE__ROUTE_BLOCK * E * 4);
    ts->c = (float *)dsmoe__carve(cv, (size_t)DSMOE__ROUTE_BLOCK * E * 4);
    ts->u = (float *)dsmoe__carve(cv, E * 4);
    ts->sv = (float *)dsmoe__carve(cv, (E + 16) * 4);
    ts->si = (int32_t *)dsmoe__carve(cv, (E + 16) * 4);
    ts->gs = (float *)dsmoe__carve(cv, G * 4);
    ts->gl = (int32_t *)dsmoe__carve(cv, G * 4);
    ts->keep = (uint8_t *)dsmoe__carve(cv, G);
    ts->topv = (float *)dsmoe__carve(cv, m * 4);
    ts->topi = (int32_t *)dsmoe__carve(cv, m * 4);
}

static int needs_w32(const dsmoe_router_config *c, int64_t T, dsmoe_dtype gate_dtype) {
    if (c->precision == DSMOE_PRECISION_BF16 && gate_dtype == DSMOE_DTYPE_F32) return 1;
    if (gate_dtype == DSMOE_DTYPE_BF16 && T > DSMOE__SMALL_T) return 1;
    return 0;
}

static size_t hidden_extra_bytes(const dsmoe_router_config *c, int64_t T, int32_t D,
                                 dsmoe_dtype gate_dtype, int nt) {
    size_t E = (size_t)c->n_experts, bytes = 0, t;
    if (dsmoe__mul_size((size_t)T, E * 4, &t)) bytes += dsmoe__align64(t); /* logits (T, E) */
    if (needs_w32(c, T, gate_dtype)) bytes += dsmoe__align64(E * (size_t)D * 4);
    if (c->precision == DSMOE_PRECISION_BF16) /* bf16-rounded x block per thread */
        bytes += (size_t)nt * dsmoe__align64((size_t)DSMOE__PROJ_BLOCK * (size_t)D * 4);
    return bytes;
}

/* Staging buffers for the indices and weights (T, K) of the fused path, or NULL. Used
 * from this many tokens: below, the logits are in cache and the check pass is cheaper
 * than the staging (T = 1: 196 ns a token checked first, 217 staged). */
#define DSMOE__STAGE_MIN_T 64
typedef struct route_stage {
    int32_t *indices;
    float *weights;
} route_stage;

static size_t stage_bytes(const dsmoe_router_config *c, int64_t T) {
    size_t n;
    if (!dsmoe__mul_size((size_t)T, (size_t)c->top_k * 4, &n)) return 0;
    return 2 * dsmoe__align64(n);
}

size_t dsmoe_router_workspace_size(const dsmoe_router_config *cfg, int64_t T, int32_t D,
                                   dsmoe_dtype gate_dtype, int n_threads) {
    if (!cfg || dsmoe_router_config_validate(cfg) != DSMOE_OK || T < 0 || D < 0) return 0;
    int nt = dsmoe__threads(n_threads);
    size_t bytes = (size_t)nt * scratch_bytes(cfg) + 64 + stage_bytes(cfg, T);
    if (D > 0) bytes += hidden_extra_bytes(cfg, T, D, gate_dtype, nt);
    return bytes;
}

/* ------------------------------------------------------------ one token -- */

#define DSMOE__BF16_MAX 3.38953138925153547590470800371487866880e+38f /* 0x7f7f */

static inline float round_bf16(float x) { return dsmoe_bf16_to_f32(dsmoe_f32_to_bf16(x)); }

static inline float sanitize(float x) {
    if (x != x) return -FLT_MAX;
    if (x == INFINITY) return FLT_MAX;
    if (x == -INFINITY) return -FLT_MAX;
    return x;
}

/* How many of a group's largest selection scores make its score (1 = the maximum). */
static inline int32_t group_topm(const dsmoe_router_config *cfg) {
    return cfg->group_score == DSMOE_GROUP_SCORE_MAX ? 1 : cfg->group_topm;
}

/* Stage 5 in fp32: the chosen affinities, normalised (sum in k order), scaled. */
static inline void weights_fp32(const dsmoe_router_config *cfg, const float *s, const int32_t *idx,
                                float *w) {
    const int32_t K = cfg->top_k;
    for (int32_t j = 0; j < K; j++) w[j] = s[idx[j]];
    if (cfg->normalize) {
        float sum = w[0];
        for (int32_t j = 1; j < K; j++) sum += w[j];
        float denom = sum + cfg->norm_eps;
        if (denom > 0.0f) {
            for (int32_t j = 0; j < K; j++) w[j] = w[j] / denom;
        } else {
            for (int32_t j = 0; j < K; j++) w[j] = 1.0f / (float)K;
        }
    }
    for (int32_t j = 0; j < K; j++) w[j] = w[j] * cfg->scale;
}

/* Stages 3 and 4 from the separate kernels: score each group and keep the TG best
 * (lower id wins ties); then the K largest selection scores among the candidates. */
static void select_experts(const dsmoe_router_config *cfg, const dsmoe__kernel_table *k,
                           const float *c, int32_t *idx, token_scratch *ts) {
    const int32_t E = cfg->n_experts, G = cfg->n_groups, K = cfg->top_k;
    const int32_t gsize = E / G;
    if (G > 1) {
        const int32_t m = group_topm(cfg);
        k->group_scores(ts->gs, c, G, gsize, m, ts->sv, ts->si);
        k->topk(ts->topi, ts->topv, ts->gs, G, cfg->topk_groups, ts->sv, ts->si);
        memset(ts->keep, 0, (size_t)G);
        for (int32_t j = 0; j < cfg->topk_groups; j++) ts->keep[ts->topi[j]] = 1;
    }
    if (G == 1) {
        ts->gl[0] = 0;
        k->topk_blocks(idx, ts->topv, c, E, ts->gl, 1, K, ts->sv, ts->si);
    } else if (cfg->group_mask == DSMOE_GROUP_MASK_EXCLUDE) {
        /* candidates: the kept groups, in increasing id */
        int32_t ng = 0;
        for (int32_t g = 0; g < G; g++)
            if (ts->keep[g]) ts->gl[ng++] = g;
        k->topk_blocks(idx, ts->topv, c, gsize, ts->gl, ng, K, ts->sv, ts->si);
    } else {
        /* Hugging Face: dropped groups' scores become 0.0 and stay candidates */
        for (int32_t g = 0; g < G; g++) {
            float *dst = ts->u + (size_t)g * (size_t)gsize;
            if (ts->keep[g])
                memcpy(dst, c + (size_t)g * (size_t)gsize, (size_t)gsize * sizeof(float));
            else
                for (int32_t j = 0; j < gsize; j++) dst[j] = 0.0f;
        }
        ts->gl[0] = 0;
        k->topk_blocks(idx, ts->topv, ts->u, E, ts->gl, 1, K, ts->sv, ts->si);
    }
}

/* Routes one token. u: (E) logits; s: (E) affinities written here; idx, w: (K). */
static void route_token(const dsmoe_router_config *cfg, const dsmoe__kernel_table *k,
                       const float *u_in, const float *bias, float *s, int32_t *idx, float *w,
                       token_scratch *ts) {
    const int32_t E = cfg->n_experts, G = cfg->n_groups, K = cfg->top_k;
    const int32_t gsize = E / G;
    const int bf16 = cfg->precision == DSMOE_PRECISION_BF16;
    const float *u = u_in;

    if (cfg->nonfinite == DSMOE_NONFINITE_SANITIZE || bf16) {
        for (int32_t e = 0; e < E; e++) {
            float x = cfg->nonfinite == DSMOE_NONFINITE_SANITIZE ? sanitize(u_in[e]) : u_in[e];
            if (bf16) {
                /* values beyond the bf16 range saturate instead of rounding to ±Inf */
                x = round_bf16(x);
                if (x == INFINITY) x = DSMOE__BF16_MAX;
                if (x == -INFINITY) x = -DSMOE__BF16_MAX;
            }
            ts->u[e] = x;
        }
        u = ts->u;
    }

    /* 1. affinities */
    if (cfg->score_func == DSMOE_SCORE_FUNC_SOFTMAX) {
        k->softmax(s, u, E);
    } else if (bf16) {
        /* official bf16 path: fp32 sigmoid of the bf16 logit, rounded to bf16 (the fp32
         * value is the correctly rounded one, computed via double) */
        for (int32_t e = 0; e < E; e++)
            s[e] = u[e] < -DSMOE__EXP_HI ? 0.0f /* exp(-u) overflows fp32: torch gives 0 */
                                         : round_bf16((float)(1.0 / (1.0 + exp(-(double)u[e]))));
    } else {
        /* also c = s + b when biased; u is finite here (checked by route_batch, or
         * sanitised), so the kernel's NaN/Inf flag is never set */
        (void)k->sigmoid_bias(s, ts->c, u, bias, E);
    }

    /* 2. selection scores */
    const float *c = s;
    if (bias) {
        if (cfg->score_func == DSMOE_SCORE_FUNC_SOFTMAX || bf16)
            for (int32_t e = 0; e < E; e++) ts->c[e] = s[e] + bias[e];
        c = ts->c;
    }

    /* 3.+4. group stage and expert choice, in one kernel where the ISA has one */
    const int32_t m = group_topm(cfg);
    if (G > 1 && cfg->group_mask == DSMOE_GROUP_MASK_EXCLUDE && k->select_grouped &&
        k->select_grouped(idx, ts->topv, c, 1, G, gsize, m, cfg->topk_groups, K)) {
        /* done: idx holds the K experts */
    } else {
        select_experts(cfg, k, c, idx, ts);
    }

    /* 5. weights from the raw affinities, normalised, scaled */
    if (!bf16) {
        weights_fp32(cfg, s, idx, w);
    } else {
        for (int32_t j = 0; j < K; j++) w[j] = s[idx[j]];
        if (cfg->normalize) {
            float sum = w[0];
            for (int32_t j = 1; j < K; j++) sum += w[j];
            float denom = round_bf16(sum) + cfg->norm_eps;
            if (denom > 0.0f) {
                for (int32_t j = 0; j < K; j++) w[j] = round_bf16(w[j] / denom);
            } else {
                for (int32_t j = 0; j < K; j++) w[j] = round_bf16(1.0f / (float)K);
            }
        }
        for (int32_t j = 0; j < K; j++) w[j] = round_bf16(w[j] * cfg->scale);
    }
}

/* ------------------------------------------------------------ batch driver -- */

static dsmoe_status check_common(const dsmoe_router_config *cfg, const dsmoe_router_output *out,
                                 const float *bias, int64_t T, const char *fn) {
    dsmoe_status st = dsmoe_router_config_validate(cfg);
    if (st != DSMOE_OK) return st;
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: out is NULL", fn);
    if (T < 0) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: T = %lld < 0", fn, (long long)T);
    if (T > 0 && (!out->indices || !out->weights))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: out->indices and out->weights are required", fn);
    if (cfg->use_bias && !bias)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "%s: config has use_bias = 1 but bias is NULL", fn);
    if (!cfg->use_bias && bias)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "%s: a bias was given but config has use_bias = 0", fn);
    if (bias && dsmoe__kernels()->any_nonfinite(bias, cfg->n_experts))
        for (int32_t e = 0; e < cfg->n_experts; e++)
            if (!isfinite(bias[e]))
                return dsmoe__error(DSMOE_STATUS_NON_FINITE, "%s: bias[%d] = %g is not finite", fn,
                                    (int)e, (double)bias[e]);
    return DSMOE_OK;
}

static dsmoe_status report_nonfinite(const float *row, int64_t t, int32_t E, const char *fn,
                                     const char *what) {
    for (int32_t e = 0; e < E; e++) {
        float x = row[e];
        if (!isfinite(x))
            return dsmoe__error(DSMOE_STATUS_NON_FINITE, "%s: %s of token %lld, expert %d is %s", fn,
                                what, (long long)t, (int)e,
                                x != x ? "NaN" : (x > 0 ? "+Inf" : "-Inf"));
    }
    return dsmoe__error(DSMOE_STATUS_INTERNAL, "%s: non-finite %s of token %lld not found", fn, what,
                        (long long)t);
}

/* Whether the ISA's fused selection covers this config on the fp32 sigmoid path. */
static int fused_path(const dsmoe_router_config *cfg, const dsmoe__kernel_table *k) {
    const int32_t G = cfg->n_groups;
    if (cfg->score_func != DSMOE_SCORE_FUNC_SIGMOID || cfg->precision != DSMOE_PRECISION_FP32 ||
        cfg->nonfinite == DSMOE_NONFINITE_SANITIZE || G < 2 ||
        cfg->group_mask != DSMOE_GROUP_MASK_EXCLUDE || !k->select_grouped)
        return 0;
    const int32_t m = group_topm(cfg);
    /* n = 0 asks only whether the shape is covered */
    return k->select_grouped(NULL, NULL, NULL, 0, G, cfg->n_experts / G, m, cfg->topk_groups,
                             cfg->top_k);
}

/* weights_fp32 for nb <= DSMOE__ROUTE_BLOCK tokens (K <= 16) with the tokens innermost,
 * so that the compiler vectorises across tokens (the K divisions of a token are the
 * cost): per token the same operations in the same order, so the same bits. */
static void weights_block(const dsmoe_router_config *cfg, const float *s, const int32_t *idx,
                          float *w, int32_t nb) {
    const int32_t K = cfg->top_k, E = cfg->n_experts;
    float wb[16][DSMOE__ROUTE_BLOCK], sum[DSMOE__ROUTE_BLOCK];
    for (int32_t j = 0; j < K; j++)
        for (int32_t i = 0; i < nb; i++)
            wb[j][i] = s[(size_t)i * (size_t)E + (size_t)idx[(size_t)i * (size_t)K + (size_t)j]];
    if (cfg->normalize) {
        const float eps = cfg->norm_eps, invk = 1.0f / (float)K;
        for (int32_t i = 0; i < nb; i++) sum[i] = wb[0][i];
        for (int32_t j = 1; j < K; j++)
            for (int32_t i = 0; i < nb; i++) sum[i] += wb[j][i];
        for (int32_t i = 0; i < nb; i++) sum[i] += eps;
        for (int32_t j = 0; j < K; j++)
            for (int32_t i = 0; i < nb; i++) {
                const float q = wb[j][i] / sum[i];
                wb[j][i] = sum[i] > 0.0f ? q : invk;
            }
    }
    const float scale = cfg->scale;
    for (int32_t i = 0; i < nb; i++)
        for (int32_t j = 0; j < K; j++) w[(size_t)i * (size_t)K + (size_t)j] = wb[j][i] * scale;
}

/* route_range for the fused path: blocks of DSMOE__ROUTE_BLOCK tokens go through the
 * affinities, then the selection together (the AVX-512 kernel takes 16 tokens at a
 * time into lanes), then the weights. Same bits as route_token. This path runs only with the
 * error policy; the sigmoid tests the logits for NaN/Inf as it reads them, and the
 * range stops at the first bad token, whose index is returned (-1 if none): the caller
 * routes into its staging buffers then, or has checked the logits before. */
static int64_t route_range_fused(const dsmoe_router_config *cfg, const dsmoe__kernel_table *k,
                                 const dsmoe_router_output *out, const float *logits,
                                 const float *bias, int64_t t0, int64_t t1, token_scratch *ts) {
    const int32_t E = cfg->n_experts, K = cfg->top_k, G = cfg->n_groups;
    const int32_t m = group_topm(cfg);
    for (int64_t t = t0; t < t1; t += DSMOE__ROUTE_BLOCK) {
        const int64_t nb = t1 - t < DSMOE__ROUTE_BLOCK ? t1 - t : DSMOE__ROUTE_BLOCK;
        float *s = out->scores ? out->scores + (size_t)t * (size_t)E : ts->s;
        for (int64_t i = 0; i < nb; i++)
            if (k->sigmoid_bias(s + (size_t)i * (size_t)E, ts->c + (size_t)i * (size_t)E,
                                logits + (size_t)(t + i) * (size_t)E, bias, E))
                return t + i;
        int32_t *idx = out->indices + (size_t)t * (size_t)K;
        float *w = out->weights + (size_t)t * (size_t)K;
        k->select_grouped(idx, ts->topv, bias ? ts->c : s, nb, G, E / G, m, cfg->topk_groups, K);
        weights_block(cfg, s, idx, w, (int32_t)nb);
    }
    return -1;
}

/* Routes tokens [t0, t1) with one thread's scratch; the logits are finite (checked by
 * route_batch) or sanitised by route_token. */
static void route_range(const dsmoe_router_config *cfg, const dsmoe__kernel_table *k,
                        const dsmoe_router_output *out, const float *logits, const float *bias,
                        int64_t t0, int64_t t1, char *scratch, size_t per) {
    const int32_t E = cfg->n_experts, K = cfg->top_k;
    dsmoe__carver mine = {scratch, per, 0};
    token_scratch ts;
    scratch_carve(cfg, &mine, &ts);
    if (t1 - t0 >= 2 && fused_path(cfg, k)) {
        (void)route_range_fused(cfg, k, out, logits, bias, t0, t1, &ts);
        return;
    }
    for (int64_t t = t0; t < t1; t++) {
        float *s = out->scores ? out->scores + (size_t)t * (size_t)E : ts.s;
        route_token(cfg, k, logits + (size_t)t * (size_t)E, bias, s,
                    out->indices + (size_t)t * (size_t)K, out->weights + (size_t)t * (size_t)K, &ts);
    }
}

/* The first token in [t0, t1) with a NaN/Inf logit, or -1: one vector pass over the
 * range, then (only when there is one) a search row by row. */
static int64_t first_nonfinite(const dsmoe__kernel_table *k, const float *logits, int32_t E,
                               int64_t t0, int64_t t1) {
    if (t1 <= t0 || !k->any_nonfinite(logits + (size_t)t0 * (size_t)E, (t1 - t0) * (int64_t)E))
        return -1;
    for (int64_t t = t0; t < t1; t++)
        if (k->any_nonfinite(logits + (size_t)t * (size_t)E, E)) return t;
    return -1;
}

/* One thread's share of route_batch: tokens [t0, t1) of T split in n ranges. */
typedef struct batch_part {
    const dsmoe_router_config *cfg;
    const dsmoe__kernel_table *k;
    const dsmoe_router_output *out; /* the caller's outputs */
    const dsmoe_router_output *so;  /* where the staged routing writes */
    const float *logits, *bias;
    int64_t T;
    char *base;
    size_t per;
    int staged, check;
} batch_part;

static void part_range(const batch_part *p, int tid, int n, int64_t *t0, int64_t *t1) {
    const int64_t chunk = (p->T + n - 1) / n;
    *t0 = (int64_t)tid * chunk;
    *t1 = *t0 + chunk < p->T ? *t0 + chunk : p->T;
    if (*t0 > *t1) *t0 = *t1;
}

/* Phase 1: route into the staging buffers (testing the logits on the way) or check the
 * logits; the first bad token of the range, or -1. Writes no output. */
static int64_t part_check(const batch_part *p, int tid, int n) {
    int64_t t0, t1;
    part_range(p, tid, n, &t0, &t1);
    if (t0 >= t1) return -1;
    if (p->staged) {
        dsmoe__carver mine = {p->base + (size_t)tid * p->per, p->per, 0};
        token_scratch ts;
        scratch_carve(p->cfg, &mine, &ts);
        return route_range_fused(p->cfg, p->k, p->so, p->logits, p->bias, t0, t1, &ts);
    }
    return p->check ? first_nonfinite(p->k, p->logits, p->cfg->n_experts, t0, t1) : -1;
}

/* Phase 2, once no range had a bad token: copy the staged results out, or route. */
static void part_write(const batch_part *p, int tid, int n) {
    int64_t t0, t1;
    part_range(p, tid, n, &t0, &t1);
    if (t0 >= t1) return;
    if (p->staged) {
        const size_t K = (size_t)p->cfg->top_k, o = (size_t)t0 * K, len = (size_t)(t1 - t0) * K;
        memcpy(p->out->indices + o, p->so->indices + o, len * sizeof(int32_t));
        memcpy(p->out->weights + o, p->so->weights + o, len * sizeof(float));
    } else {
        route_range(p->cfg, p->k, p->out, p->logits, p->bias, t0, t1, p->base + (size_t)tid * p->per, p->per);
    }
}

/* Routes T tokens, or, with the error policy and a NaN/Inf logit anywhere, writes
 * nothing and returns the first bad token (-1 when routed): no output is written until
 * every logit has been checked, so an error leaves the outputs as they were. Two ways:
 *  - staged (the fused path, no scores wanted, staging buffers in the workspace): the
 *    tokens are routed into the staging buffers while the sigmoid tests their logits,
 *    then copied to the outputs (64 bytes a token for DeepSeek-V3);
 *  - otherwise every logit is checked in one streaming pass first, then routed (the
 *    pass costs about 12 ns a token at T = 4096 with the logits in L3, about 8%).
 * Each thread checks and routes one contiguous range; tokens are independent, so the
 * split never changes a bit. */
static int64_t route_batch(const dsmoe_router_config *cfg, const dsmoe_router_output *out,
                           const float *logits, const float *bias, int64_t T, char *base,
                           size_t per, int nt, const route_stage *stage) {
    const int32_t E = cfg->n_experts, K = cfg->top_k;
    const dsmoe__kernel_table *k = dsmoe__kernels();
    const int check = cfg->nonfinite == DSMOE_NONFINITE_ERROR;
    const int staged = check && stage && !out->scores && T >= DSMOE__STAGE_MIN_T && fused_path(cfg, k);
    dsmoe_router_output so = *out; /* where the routing writes */
    if (staged) {
        so.indices = stage->indices;
        so.weights = stage->weights;
    }
    int64_t bad = -1;

    /* at least 16 tokens per thread; one thread runs without a parallel region */
    if ((int64_t)nt > (T + 15) / 16) nt = (int)((T + 15) / 16);
    if (nt > DSMOE__MAX_THREADS) nt = DSMOE__MAX_THREADS;
    const batch_part bp = {cfg, k, out, &so, logits, bias, T, base, per, staged, check};
    if (nt <= 1) {
        bad = part_check(&bp, 0, 1);
        if (bad < 0) part_write(&bp, 0, 1);
    } else {
        int64_t first[DSMOE__MAX_THREADS];
#pragma omp parallel num_threads(nt)
        {
            int tid = 0, n = 1;
#ifdef _OPENMP
            tid = omp_get_thread_num();
            n = omp_get_num_threads();
#endif
            first[tid] = part_check(&bp, tid, n);
#pragma omp barrier
            int any = 0; /* the same answer on every thread: every range checked, none written */
            for (int i = 0; i < n; i++) any |= first[i] >= 0;
            if (!any) part_write(&bp, tid, n);
#pragma omp barrier
#pragma omp single
            for (int i = 0; i < n; i++)
                if (first[i] >= 0 && (bad < 0 || first[i] < bad)) bad = first[i];
        }
    }
    if (bad >= 0) return bad;
    if (out->counts) {
        memset(out->counts, 0, (size_t)E * sizeof(int64_t));
        dsmoe__count_experts(out->counts, out->indices, T * (int64_t)K);
    }
    return -1;
}

/* Carves the per-thread scratch and routes; reports a non-finite logit as an error. */
static dsmoe_status route_checked(const dsmoe_router_config *cfg, const dsmoe_router_output *out,
                                  const float *logits, const float *bias, int64_t T,
                                  dsmoe__carver *cv, int nt, const char *fn, const char *what) {
    size_t per = scratch_bytes(cfg);
    char *base = (char *)dsmoe__carve(cv, (size_t)nt * per);
    if (!base) return dsmoe__error(DSMOE_STATUS_INTERNAL, "%s: workspace carving failed", fn);
    /* staging buffers when the workspace has room for them (dsmoe_router_workspace_size
     * includes it; a workspace of the bare minimum takes the check-first way) */
    route_stage stage = {NULL, NULL};
    size_t nk;
    if (T > 0 && dsmoe__mul_size((size_t)T, (size_t)cfg->top_k * 4, &nk)) {
        dsmoe__carver trial = *cv;
        stage.indices = (int32_t *)dsmoe__carve(&trial, nk);
        stage.weights = (float *)dsmoe__carve(&trial, nk);
        if (stage.indices && stage.weights) *cv = trial;
    }
    int64_t bad = route_batch(cfg, out, logits, bias, T, base, per, nt,
                              stage.indices && stage.weights ? &stage : NULL);
    if (bad >= 0)
        return report_nonfinite(logits + (size_t)bad * (size_t)cfg->n_experts, bad, cfg->n_experts,
                                fn, what);
    return DSMOE_OK;
}

dsmoe_status dsmoe_router_forward(const dsmoe_router_config *cfg, const dsmoe_router_output *out,
                                  const float *logits, const float *bias, int64_t T,
                                  void *workspace, size_t workspace_size, int n_threads) {
    static const char fn[] = "dsmoe_router_forward";
    dsmoe_status st = check_common(cfg, out, bias, T, fn);
    if (st != DSMOE_OK) return st;
    if (T > 0 && !logits) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: logits is NULL", fn);
    int nt = dsmoe__threads(n_threads);
    if (T < nt) nt = T > 0 ? (int)T : 1;
    size_t need = (size_t)nt * scratch_bytes(cfg) + 64;
    if (!workspace || workspace_size < need)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "%s: workspace of %zu bytes given, %zu needed (dsmoe_router_workspace_size)",
                            fn, workspace ? workspace_size : (size_t)0, need);
    dsmoe__carver cv = {(char *)workspace, workspace_size, 0};
    /* align the first carve */
    cv.used = (size_t)((64 - ((uintptr_t)workspace & 63)) & 63);
    return route_checked(cfg, out, logits, bias, T, &cv, nt, fn, "logit");
}

/* --------------------------------------------------------- projection path -- */

dsmoe_status dsmoe_router_forward_hidden(const dsmoe_router_config *cfg,
                                         const dsmoe_router_output *out, const float *hidden,
                                         const void *gate_weight, dsmoe_dtype gate_dtype, int32_t D,
                                         const float *bias, int64_t T, void *workspace,
                                         size_t workspace_size, int n_threads) {
    static const char fn[] = "dsmoe_router_forward_hidden";
    dsmoe_status st = check_common(cfg, out, bias, T, fn);
    if (st != DSMOE_OK) return st;
    if (D < 1) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: hidden size D = %d < 1", fn, (int)D);
    if (gate_dtype != DSMOE_DTYPE_F32 && gate_dtype != DSMOE_DTYPE_BF16)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: gate weight dtype %s is not F32 or BF16",
                            fn, dsmoe_dtype_name(gate_dtype));
    if (!gate_weight) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: gate_weight is NULL", fn);
    if (T > 0 && !hidden) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: hidden is NULL", fn);
    const int32_t E = cfg->n_experts;
    const int bf16 = cfg->precision == DSMOE_PRECISION_BF16;
    int nt = dsmoe__threads(n_threads);
    size_t need = (size_t)nt * scratch_bytes(cfg) + 64 + hidden_extra_bytes(cfg, T, D, gate_dtype, nt);
    if (!workspace || workspace_size < need)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "%s: workspace of %zu bytes given, %zu needed (dsmoe_router_workspace_size)",
                            fn, workspace ? workspace_size : (size_t)0, need);
    if (T > 0 && dsmoe__kernels()->any_nonfinite(hidden, T * (int64_t)D) && cfg->nonfinite == DSMOE_NONFINITE_ERROR) {
        for (int64_t t = 0; t < T; t++)
            for (int32_t d = 0; d < D; d++)
                if (!isfinite(hidden[(size_t)t * (size_t)D + (size_t)d]))
                    return dsmoe__error(DSMOE_STATUS_NON_FINITE,
                                        "%s: hidden state of token %lld, feature %d is not finite", fn,
                                        (long long)t, (int)d);
    }
    const dsmoe__kernel_table *k = dsmoe__kernels();
    dsmoe__carver cv = {(char *)workspace, workspace_size, 0};
    cv.used = (size_t)((64 - ((uintptr_t)workspace & 63)) & 63);
    /* the logits go to the workspace and are copied to out->logits only once routed,
     * so that a NON_FINITE error (a projection that overflows) changes no output */
    float *logits = (float *)dsmoe__carve(&cv, (size_t)T * (size_t)E * 4);
    if (!logits) return dsmoe__error(DSMOE_STATUS_INTERNAL, "%s: workspace carving failed", fn);
    const float *W = NULL;              /* fp32 (E, D) used by SGEMM, or NULL */
    const uint16_t *Wb = NULL;          /* bf16 (E, D) used by the dot kernel, or NULL */
    if (needs_w32(cfg, T, gate_dtype)) {
        float *w32 = (float *)dsmoe__carve(&cv, (size_t)E * (size_t)D * 4);
        if (!w32) return dsmoe__error(DSMOE_STATUS_INTERNAL, "%s: workspace carving failed", fn);
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int32_t e = 0; e < E; e++) {
            float *dst = w32 + (size_t)e * (size_t)D;
            if (gate_dtype == DSMOE_DTYPE_BF16) {
                k->bf16_to_f32(dst, (const uint16_t *)gate_weight + (size_t)e * (size_t)D, D);
            } else {
                const float *src = (const float *)gate_weight + (size_t)e * (size_t)D;
                for (int32_t d = 0; d < D; d++) dst[d] = round_bf16(src[d]);
            }
        }
        W = w32;
    } else if (gate_dtype == DSMOE_DTYPE_BF16) {
        Wb = (const uint16_t *)gate_weight;
    } else {
        W = (const float *)gate_weight;
    }
    float *xbuf = NULL;
    size_t xper = dsmoe__align64((size_t)DSMOE__PROJ_BLOCK * (size_t)D * 4);
    if (bf16) {
        xbuf = (float *)dsmoe__carve(&cv, (size_t)nt * xper);
        if (!xbuf) return dsmoe__error(DSMOE_STATUS_INTERNAL, "%s: workspace carving failed", fn);
    }

    /* logits = x · Wᵀ, in fixed blocks of tokens (or per token for tiny T) */
    int64_t nblk = (T + DSMOE__PROJ_BLOCK - 1) / DSMOE__PROJ_BLOCK;
    int small = T <= DSMOE__SMALL_T;
    if (small) {
        for (int64_t t = 0; t < T; t++) {
            const float *x = hidden + (size_t)t * (size_t)D;
            float *lt = logits + (size_t)t * (size_t)E;
            if (bf16) {
                for (int32_t d = 0; d < D; d++) xbuf[d] = round_bf16(x[d]);
                x = xbuf;
            }
            if (Wb) {
#pragma omp parallel for num_threads(nt) schedule(static)
                for (int32_t e = 0; e < E; e++) lt[e] = k->dot_bf16(x, Wb + (size_t)e * (size_t)D, D);
            } else {
                dsmoe__sgemv(E, D, W, D, x, lt);
            }
        }
    } else {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int64_t b = 0; b < nblk; b++) {
            int64_t t0 = b * DSMOE__PROJ_BLOCK;
            int64_t rows = T - t0 < DSMOE__PROJ_BLOCK ? T - t0 : DSMOE__PROJ_BLOCK;
            const float *x = hidden + (size_t)t0 * (size_t)D;
            if (bf16) {
                int tid = 0;
#ifdef _OPENMP
                tid = omp_get_thread_num();
#endif
                float *xb = (float *)(void *)((char *)xbuf + (size_t)tid * xper);
                for (size_t i = 0; i < (size_t)rows * (size_t)D; i++) xb[i] = round_bf16(x[i]);
                x = xb;
            }
            dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, (int)rows, E, D, 1.0f, x, D, W, D,
                        0.0f, logits + (size_t)t0 * (size_t)E, E);
        }
    }
    if (bf16)
        for (size_t i = 0; i < (size_t)T * (size_t)E; i++) logits[i] = round_bf16(logits[i]);
    int nr = nt;
    if (T < nr) nr = T > 0 ? (int)T : 1;
    st = route_checked(cfg, out, logits, bias, T, &cv, nr, fn, "projected logit");
    if (st == DSMOE_OK && out->logits && T > 0)
        memcpy(out->logits, logits, (size_t)T * (size_t)E * sizeof(float));
    return st;
}

/* ---------------------------------------------------------------- backward -- */

dsmoe_status dsmoe_router_backward(const dsmoe_router_config *cfg, float *dlogits,
                                   const float *dweights, const int32_t *indices,
                                   const float *scores, int64_t T, int n_threads) {
    static const char fn[] = "dsmoe_router_backward";
    dsmoe_status st = dsmoe_router_config_validate(cfg);
    if (st != DSMOE_OK) return st;
    if (T < 0) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: T = %lld < 0", fn, (long long)T);
    if (T > 0 && (!dlogits || !dweights || !indices || !scores))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "%s: dlogits, dweights, indices and scores are required", fn);
    const int32_t E = cfg->n_experts, K = cfg->top_k;
    for (int64_t i = 0; i < T * (int64_t)K; i++)
        if (indices[i] < 0 || indices[i] >= E)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: indices[%lld] = %d is out of range 0..%d",
                                fn, (long long)i, (int)indices[i], (int)E - 1);
    int nt = dsmoe__threads(n_threads);
    (void)nt; /* used by OpenMP only */
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t t = 0; t < T; t++) {
        const float *s = scores + (size_t)t * (size_t)E;
        const float *dw = dweights + (size_t)t * (size_t)K;
        const int32_t *idx = indices + (size_t)t * (size_t)K;
        float *du = dlogits + (size_t)t * (size_t)E;
        /* ds_k = dL/ds at the selected experts (fp64 accumulation, fixed order) */
        double ds[DSMOE__MAX_TOPK];
        double scale = (double)cfg->scale;
        if (cfg->normalize) {
            double sum = 0.0, dot = 0.0;
            for (int32_t j = 0; j < K; j++) sum += (double)s[idx[j]];
            double denom = sum + (double)cfg->norm_eps;
            if (denom > 0.0) {
                for (int32_t j = 0; j < K; j++) dot += (double)dw[j] * (double)s[idx[j]];
                for (int32_t j = 0; j < K; j++)
                    ds[j] = scale * ((double)dw[j] / denom - dot / (denom * denom));
            } else {
                for (int32_t j = 0; j < K; j++) ds[j] = 0.0;
            }
        } else {
            for (int32_t j = 0; j < K; j++) ds[j] = scale * (double)dw[j];
        }
        if (cfg->score_func == DSMOE_SCORE_FUNC_SIGMOID) {
            for (int32_t j = 0; j < K; j++) {
                double sv = (double)s[idx[j]];
                du[idx[j]] += (float)(ds[j] * sv * (1.0 - sv));
            }
        } else {
            /* du_i = s_i (ds_i − Σ_j ds_j s_j), ds zero off the selection */
            double dot = 0.0;
            for (int32_t j = 0; j < K; j++) dot += ds[j] * (double)s[idx[j]];
            for (int32_t e = 0; e < E; e++) du[e] += (float)(-(double)s[e] * dot);
            for (int32_t j = 0; j < K; j++) du[idx[j]] += (float)((double)s[idx[j]] * ds[j]);
        }
    }
    return DSMOE_OK;
}
