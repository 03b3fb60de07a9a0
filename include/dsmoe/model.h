/*
 * dsmoe/model.h — DeepSeek-V3-style whole models (Hugging Face model directories):
 * the configuration read from config.json.
 *
 * What exists now: configuration. The model directory and the forward pass
 * (embedding, RMSNorm, MLA with RoPE/YaRN, dense and MoE FFNs, head) are not in the
 * library yet.
 *
 * Configuration. dsmoe_model_config_from_json() reads the DeepseekV3 keys of a
 * config.json (and DeepseekV2's, which differ only in the routing keys). The router
 * is chosen by `scoring_func` and `topk_method`, never by `model_type`:
 *   noaux_tc             bias e_score_correction_bias; group score = sum of the top 2
 *   group_limited_greedy no bias; group score = max
 *   greedy               no bias; no group stage (n_group, topk_group ignored)
 * Weights are normalised iff `norm_topk_prob` and always multiplied by
 * `routed_scaling_factor` (DeepSeek-V3's reading). A value dsmoe cannot honour is an
 * error naming the key (INVALID_CONFIG): another `hidden_act` than silu,
 * `attention_bias` true, `rope_interleave` false, an unknown `topk_method`,
 * `scoring_func` or rope type, a `quantization_config` other than fp8 e4m3 block
 * scales, and the combinations on which the DeepSeek code bases disagree (see
 * dsmoe_model_config_from_json). Keys that do not change the math (token ids,
 * dropout, torch_dtype, training-only loss weights, ...) are ignored.
 *
 * Example:
 *   dsmoe_model_config cfg;
 *   if (dsmoe_model_config_from_dir("DeepSeek-V3", &cfg) != DSMOE_OK)
 *       fprintf(stderr, "%s\n", dsmoe_last_error());
 *   dsmoe_router_config rc;
 *   dsmoe_model_router_config(&cfg, &rc);             // the MoE layers' router
 */
#ifndef DSMOE_MODEL_H
#define DSMOE_MODEL_H

#include "core.h"
#include "moe.h"
#include "router.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The routing method (config.json `topk_method`). */
typedef enum dsmoe_topk_method {
    DSMOE_TOPK_METHOD_NOAUX_TC = 0,             /* "noaux_tc" (V3) */
    DSMOE_TOPK_METHOD_GROUP_LIMITED_GREEDY = 1, /* "group_limited_greedy" (V2) */
    DSMOE_TOPK_METHOD_GREEDY = 2                /* "greedy" (V2-Lite) */
} dsmoe_topk_method;

/* Rotary embedding frequencies (config.json `rope_scaling`). */
typedef enum dsmoe_rope_type {
    DSMOE_ROPE_TYPE_DEFAULT = 0, /* rope_scaling null (or rope_type "default") */
    DSMOE_ROPE_TYPE_YARN = 1     /* rope_scaling {"type" or "rope_type": "yarn", ...} */
} dsmoe_rope_type;

/* Notation: D hidden_size, H num_attention_heads, n qk_nope_head_dim, r
 * qk_rope_head_dim, v v_head_dim, c kv_lora_rank, q q_lora_rank, E n_routed_experts,
 * F moe_intermediate_size, V vocab_size, L num_hidden_layers. */
typedef struct dsmoe_model_config {
    int32_t hidden_size;             /* D */
    int32_t intermediate_size;       /* dense FFN inner size */
    int32_t moe_intermediate_size;   /* F, routed and shared expert inner size */
    int32_t num_hidden_layers;       /* L */
    int32_t first_k_dense_replace;   /* layers 0 .. k-1 are dense */
    int32_t moe_layer_freq;          /* layer l >= k is MoE iff l % freq == 0 */
    int32_t num_attention_heads;     /* H */
    int32_t q_lora_rank;             /* q; 0 when null (a plain q_proj) */
    int32_t kv_lora_rank;            /* c */
    int32_t qk_nope_head_dim;        /* n */
    int32_t qk_rope_head_dim;        /* r, even */
    int32_t v_head_dim;              /* v */
    int32_t n_routed_experts;        /* E; 0 when null (every layer dense) */
    int32_t n_shared_experts;        /* N_s; 0 when null */
    int32_t num_experts_per_tok;     /* K */
    int32_t n_group;                 /* G as written (greedy routes with one group) */
    int32_t topk_group;              /* TG as written */
    dsmoe_score_func scoring_func;   /* "sigmoid" or "softmax" */
    dsmoe_topk_method topk_method;
    int32_t norm_topk_prob;          /* 0 / 1 */
    float routed_scaling_factor;
    float rms_norm_eps;
    double rope_theta;
    int64_t max_position_embeddings; /* positions 0 .. this - 1 */
    dsmoe_rope_type rope_type;
    double rope_factor;              /* YaRN s (>= 1) */
    int64_t rope_original_max_position_embeddings; /* YaRN L0 */
    double rope_beta_fast, rope_beta_slow;         /* YaRN β_fast, β_slow */
    double rope_mscale, rope_mscale_all_dim;       /* equal (checked) */
    int32_t tie_word_embeddings;     /* 1: the head is embed_tokens (no lm_head.weight) */
    int32_t vocab_size;              /* V */
    int32_t num_nextn_predict_layers;/* MTP depths stored at layers L .. L + this - 1 */
    int32_t fp8_block_rows, fp8_block_cols; /* quantization_config weight_block_size, or 0
                                               without a quantization_config */
} dsmoe_model_config;

/* Reads config.json text json[0..len) (UTF-8, strict JSON; need not be NUL-terminated).
 * Keys whose defaults agree in Hugging Face's DeepseekV2Config and DeepseekV3Config
 * may be absent and take them: moe_layer_freq 1, first_k_dense_replace 0,
 * rms_norm_eps 1e-6, rope_theta 10000, rope_scaling null, hidden_act "silu",
 * attention_bias false, tie_word_embeddings false; num_nextn_predict_layers is 0
 * when absent (V2 files have no MTP). Every other key listed in dsmoe_model_config is
 * required (q_lora_rank, n_routed_experts and n_shared_experts may be null), because
 * the two classes default it differently; the routing keys only when experts exist.
 * YaRN keys: factor and original_max_position_embeddings required; beta_fast 32,
 * beta_slow 1, mscale 1, mscale_all_dim 0 by default, and mscale must equal
 * mscale_all_dim: the official code scales the attention scores by the square of
 * mscale_all_dim's factor, Hugging Face's multiplies cos/sin by the ratio of the two
 * factors, and only equal values make them agree. Unknown keys inside rope_scaling
 * and quantization_config are refused (they may change the math).
 * Refused combinations (INVALID_CONFIG naming the key): norm_topk_prob true with a
 * routed_scaling_factor other than 1 under a V2 topk_method (V2 code scales only
 * unnormalised weights, V3 code always); a group stage the router cannot run
 * (n_routed_experts % n_group, topk_group, num_experts_per_tok too large).
 * Errors: FORMAT (not JSON: message names the byte offset), INVALID_CONFIG (message
 * names the key, e.g. "config.json: rope_scaling.factor must be >= 1, found 0.5"),
 * INVALID_ARGUMENT. *cfg is unchanged on error. */
DSMOE_API dsmoe_status dsmoe_model_config_from_json(const char *json, size_t len,
                                                    dsmoe_model_config *cfg);
/* Reads <dir>/config.json (at most 16 MiB). Errors as above, IO naming the path. */
DSMOE_API dsmoe_status dsmoe_model_config_from_dir(const char *dir, dsmoe_model_config *cfg);
/* Checks a config made or changed by hand; INVALID_CONFIG naming the config.json key. */
DSMOE_API dsmoe_status dsmoe_model_config_validate(const dsmoe_model_config *cfg);

/* 1 if layer l (0 <= l < L + num_nextn_predict_layers) has the MoE FFN: E > 0,
 * l >= first_k_dense_replace and l % moe_layer_freq == 0 (Hugging Face's rule). */
DSMOE_API int dsmoe_model_layer_is_moe(const dsmoe_model_config *cfg, int32_t l);
/* The router of the MoE layers (precision FP32, the official −inf group mask, no
 * normalisation epsilon). INVALID_CONFIG when the model has no experts. */
DSMOE_API dsmoe_status dsmoe_model_router_config(const dsmoe_model_config *cfg,
                                                 dsmoe_router_config *out);
/* The MoE layer config of the MoE layers (D, F, N_s, the router; F32 checkpoint layout,
 * inference, max_tokens 512). */
DSMOE_API dsmoe_status dsmoe_model_moe_config(const dsmoe_model_config *cfg,
                                              dsmoe_moe_config *out);

#ifdef __cplusplus
}
#endif
#endif /* DSMOE_MODEL_H */
