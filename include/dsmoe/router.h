/*
 * dsmoe/router.h — DeepSeek-V3 Mixture-of-Experts routing (forward and backward).
 *
 * Per token t with logits u (E) — given, or projected as u = x · Wᵀ from hidden
 * states x (D) and a gate weight W (E, D) — the router computes:
 *
 *   s_i = sigmoid(u_i)            or  s = softmax(u)            (affinities)
 *   c_i = s_i + b_i                                             (selection score; bias optional)
 *   group score_g = max_{i∈g} c_i  or  sum of the m largest c_i in g   (if G > 1)
 *   keep the TG best groups; experts of other groups are excluded (official code's −inf)
 *     or get c = 0 (Hugging Face's 0.0 fill, for bit-compatibility with it)
 *   idx = the K experts with the largest c, ordered by descending c
 *   w_k = s_{idx_k}                                             (raw affinity: bias never in weights)
 *   w_k = w_k / (Σ_j w_j + eps)   if normalize                  (eps default 0)
 *   w_k = w_k · scale
 *
 * (DeepSeek-V3 report eqs. 15–16 with the routed scaling factor and the node-limited
 * group stage of the official inference code.) Ties resolve deterministically: the
 * lower group id, then the lower expert id wins. A normalisation denominator that is
 * exactly 0 (all selected affinities underflowed) gives uniform weights scale/K
 * instead of the official code's NaN.
 *
 * Threading: calls are reentrant; n_threads <= 0 means dsmoe_default_threads().
 * Results are bit-identical for any thread count and any kernel ISA.
 * Allocation: none — the caller passes a workspace of dsmoe_router_workspace_size() bytes.
 *
 * Example:
 *   dsmoe_router_config cfg;
 *   dsmoe_router_preset("deepseek-v3", &cfg);
 *   size_t ws_size = dsmoe_router_workspace_size(&cfg, T, 0, DSMOE_DTYPE_F32, 1);
 *   void *ws = dsmoe_malloc(ws_size);
 *   dsmoe_router_output out = { .indices = idx, .weights = w };   // (T, K) each
 *   if (dsmoe_router_forward(&cfg, &out, logits, bias, T, ws, ws_size, 1) != DSMOE_OK)
 *       fprintf(stderr, "%s\n", dsmoe_last_error());
 */
#ifndef DSMOE_ROUTER_H
#define DSMOE_ROUTER_H

#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum dsmoe_score_func {
    DSMOE_SCORE_FUNC_SIGMOID = 0,
    DSMOE_SCORE_FUNC_SOFTMAX = 1
} dsmoe_score_func;

typedef enum dsmoe_group_score {
    DSMOE_GROUP_SCORE_MAX = 0,    /* max selection score in the group (V2, or V3 without bias) */
    DSMOE_GROUP_SCORE_TOPSUM = 1  /* sum of the group_topm largest selection scores (V3: m = 2) */
} dsmoe_group_score;

typedef enum dsmoe_group_mask {
    DSMOE_GROUP_MASK_EXCLUDE = 0, /* experts of dropped groups can never be chosen (official, −inf) */
    DSMOE_GROUP_MASK_ZERO = 1     /* their selection score becomes 0.0 (Hugging Face) */
} dsmoe_group_mask;

typedef enum dsmoe_precision {
    DSMOE_PRECISION_FP32 = 0,     /* fp32 throughout (Hugging Face precision) */
    DSMOE_PRECISION_BF16 = 1      /* emulates the official bf16 inference path bit-exactly */
} dsmoe_precision;

typedef enum dsmoe_nonfinite {
    DSMOE_NONFINITE_ERROR = 0,    /* a NaN/Inf logit is an error naming the token and expert */
    DSMOE_NONFINITE_SANITIZE = 1  /* NaN -> -FLT_MAX, ±Inf -> ±FLT_MAX before scoring */
} dsmoe_nonfinite;

/* Plain configuration. Fill with dsmoe_router_preset() or dsmoe_router_config_default(),
 * then change fields; dsmoe_router_config_validate() checks it. */
typedef struct dsmoe_router_config {
    int32_t n_experts;            /* E, routed experts (1..65536) */
    int32_t n_groups;             /* G, E % G == 0 */
    int32_t topk_groups;          /* TG, groups kept per token, 1..G */
    int32_t top_k;                /* K, experts per token, 1..TG·E/G (and <= 256) */
    dsmoe_score_func score_func;
    dsmoe_group_score group_score;
    int32_t group_topm;           /* m for TOPSUM, 1..E/G */
    dsmoe_group_mask group_mask;
    int32_t normalize;            /* 1: divide the K weights by their sum (+ norm_eps) */
    float norm_eps;               /* >= 0, default 0 (official); HF uses 1e-20 */
    float scale;                  /* routed scaling factor, finite and > 0 */
    int32_t use_bias;             /* 1: a bias vector (E) is required by forward */
    dsmoe_precision precision;
    dsmoe_nonfinite nonfinite;
} dsmoe_router_config;

/* Presets: "deepseek-v3" (256/8/4/8, sigmoid, top-2 sum, normalize, 2.5, bias),
 * "deepseek-v2" (160/8/3/6, softmax, max, no normalize, 16), "moonlight"
 * (64/1/1/6, sigmoid, normalize, 2.446, bias), "mixtral" (8 experts, top-2, softmax,
 * renormalize, scale 1) and "qwen-moe" (64 experts, top-8, softmax, renormalize),
 * "deepseek-v3-hf" (deepseek-v3 with the 0.0 mask and eps 1e-20 of Hugging Face).
 * Returns NOT_FOUND for an unknown name (the message lists the known ones). */
DSMOE_API dsmoe_status dsmoe_router_preset(const char *name, dsmoe_router_config *cfg);
/* NULL-terminated list of preset names. */
DSMOE_API const char *const *dsmoe_router_preset_names(void);
/* Validates; INVALID_CONFIG with a message naming the bad field. */
DSMOE_API dsmoe_status dsmoe_router_config_validate(const dsmoe_router_config *cfg);
/* Writes a one-line JSON description of the config into buf (always NUL-terminated).
 * Returns the length it needed (like snprintf). */
DSMOE_API int dsmoe_router_config_json(const dsmoe_router_config *cfg, char *buf, size_t size);

/* Outputs of a forward pass. indices and weights are required; the rest optional. */
typedef struct dsmoe_router_output {
    int32_t *indices;   /* (T, K) chosen experts, descending selection score */
    float *weights;     /* (T, K) routing weights */
    float *scores;      /* (T, E) affinities s (before bias), or NULL */
    float *logits;      /* (T, E) projected logits (forward_hidden only), or NULL */
    int64_t *counts;    /* (E) tokens per expert in this batch (overwritten), or NULL */
} dsmoe_router_output;

/* Workspace bytes for T tokens. D = hidden size for dsmoe_router_forward_hidden
 * (0 for logits input); gate_dtype is the gate weight's dtype there (F32 or BF16). */
DSMOE_API size_t dsmoe_router_workspace_size(const dsmoe_router_config *cfg, int64_t T,
                                             int32_t D, dsmoe_dtype gate_dtype, int n_threads);

/* Routes T tokens from logits (T, E). bias: (E) fp32, required iff cfg->use_bias
 * (finite; checked). Errors: INVALID_CONFIG, INVALID_ARGUMENT (NULL pointers, T < 0),
 * NON_FINITE (message names the first bad token and its expert), WORKSPACE_TOO_SMALL.
 * Arguments and every logit are checked before any output is written, so after any
 * error the outputs are unchanged: with a workspace of dsmoe_router_workspace_size()
 * bytes the fused DeepSeek-V3 path routes into the workspace while it tests the logits
 * and copies the (T, K) results out at the end; otherwise (scores wanted, other shapes,
 * or a workspace of only the minimum the error message names) the logits are checked in
 * one streaming pass first. No memory outside the outputs and the workspace is ever
 * written. */
DSMOE_API dsmoe_status dsmoe_router_forward(const dsmoe_router_config *cfg,
                                            const dsmoe_router_output *out,
                                            const float *logits, /* (T, E) */
                                            const float *bias,   /* (E) or NULL */
                                            int64_t T, void *workspace, size_t workspace_size,
                                            int n_threads);

/* Routes T tokens from hidden states (T, D) and a gate weight (E, D) stored as F32
 * or BF16 (uint16 words). The projection uses BLIS SGEMM in fixed blocks of
 * tokens (or a vectorised dot kernel for a handful of tokens), so that bits do not
 * depend on the thread count. In BF16 precision x and W are rounded to bf16 and
 * the logits to bf16 (accumulation is fp32: not bit-exact to torch's bf16 GEMM,
 * but bit-exact from the logits on). Errors as dsmoe_router_forward, plus NON_FINITE
 * for a NaN/Inf hidden state (checked first) or projected logit; after any error the
 * outputs, out->logits included, are unchanged. */
DSMOE_API dsmoe_status dsmoe_router_forward_hidden(const dsmoe_router_config *cfg,
                                                   const dsmoe_router_output *out,
                                                   const float *hidden,     /* (T, D) */
                                                   const void *gate_weight, /* (E, D) */
                                                   dsmoe_dtype gate_dtype, int32_t D,
                                                   const float *bias, /* (E) or NULL */
                                                   int64_t T, void *workspace,
                                                   size_t workspace_size, int n_threads);

/* Backward: given dL/dweights (T, K), accumulates (+=) dL/dlogits (T, E) through
 * the scaling, the normalisation and the sigmoid or softmax. `scores` are the
 * affinities s (T, E) saved from the forward and `indices` its choice. The bias
 * gets no gradient; unselected experts get none through the weights (for softmax,
 * every logit gets one through the softmax Jacobian). The zero-sum fallback of
 * the normalisation has zero gradient. BF16 precision is differentiated as fp32. */
DSMOE_API dsmoe_status dsmoe_router_backward(const dsmoe_router_config *cfg,
                                             float *dlogits,         /* (T, E) += */
                                             const float *dweights,  /* (T, K) */
                                             const int32_t *indices, /* (T, K) */
                                             const float *scores,    /* (T, E) */
                                             int64_t T, int n_threads);

#ifdef __cplusplus
}
#endif
#endif /* DSMOE_ROUTER_H */
