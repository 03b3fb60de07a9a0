/*
 * dsmoe/model.h — DeepSeek-V3-style whole models (Hugging Face model directories):
 * the configuration read from config.json, the table of tensors a configuration
 * implies, the model directory (model.safetensors, or shards listed by
 * model.safetensors.index.json) checked against that table, and the model itself
 * (dsmoe_model): prompts and decoding with a compressed-latent cache, sampling, and
 * parameter counts. docs/model.md states the math; tests check it against the fp64
 * reference tests/ref/model_ref.py.
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
 *   dsmoe_model_files *mf;
 *   if (dsmoe_model_config_from_dir("DeepSeek-V3", &cfg) != DSMOE_OK ||
 *       dsmoe_model_files_open("DeepSeek-V3", &cfg, &mf) != DSMOE_OK)
 *       fprintf(stderr, "%s\n", dsmoe_last_error());
 *   dsmoe_model_tensor_info ti;
 *   dsmoe_model_files_get(mf, "model.layers.0.self_attn.kv_b_proj.weight", &ti);
 *   float *w = malloc(ti.shape[0] * ti.shape[1] * sizeof *w);
 *   dsmoe_model_files_read_f32(mf, ti.name, w);     // fp8 blocks dequantised
 *   dsmoe_model_files_close(mf);
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
    int32_t byte_vocab;              /* 1 when config.json says "dsmoe_vocab": "bytes": ids
                                        0 .. 255 are the bytes, specials above (V >= 256) */
    int32_t bos_token_id, eos_token_id; /* -1 when absent or null; < V; >= 256 with
                                           byte_vocab */
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
 * Token ids: bos_token_id and eos_token_id are an integer, null, or a non-empty list of
 * integers (the first is used); -1 when absent or null; an id must be < vocab_size.
 * dsmoe's byte vocabulary: "dsmoe_vocab": "bytes" sets byte_vocab (ids 0..255 are the
 * bytes; it needs vocab_size >= 256 and special ids >= 256); null or absent: 0; any other
 * value is INVALID_CONFIG naming dsmoe_vocab.
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

/* Configurations by name for models trained from scratch: DeepSeek-V3's architecture
 * (MLA without q compression, one dense layer first, sigmoid routing with the
 * correction bias over groups, normalised weights, one shared expert, one MTP depth)
 * with the byte vocabulary (260 ids), scaled down:
 *   tiny     D 32, 2 layers, 2 heads, 8 experts of 16, top-2 of 2 groups (unit tests)
 *   small    D 128, 4 layers, 4 heads, 16 experts of 64, top-4, 4 groups / 2
 *   default  D 256, 4 layers, 4 heads, 16 experts of 128, top-4, 4 groups / 2 (6.5 M
 *            parameters)
 * INVALID_ARGUMENT naming an unknown name. Every field may be changed afterwards
 * (dsmoe_model_config_validate checks the result). */
DSMOE_API dsmoe_status dsmoe_model_config_preset(const char *name, dsmoe_model_config *out);

/* The config as config.json text with the DeepseekV3 keys (and "dsmoe_vocab",
 * "bos_token_id", "eos_token_id" when set), which dsmoe_model_config_from_json reads
 * back to the same values: floats printed with 9 significant digits, doubles with 17,
 * in the C locale. Writes at most cap bytes into buf (NUL-terminated when the text
 * fits; buf may be NULL when cap is 0) and returns the text's length without the NUL,
 * or −1 with INVALID_CONFIG (dsmoe_model_config_validate's message) or
 * INVALID_ARGUMENT. */
DSMOE_API int64_t dsmoe_model_config_to_json(const dsmoe_model_config *cfg, char *buf, size_t cap);
/* Writes <dir>/config.json atomically (dir must exist). Errors: those above, IO. */
DSMOE_API dsmoe_status dsmoe_model_config_write(const dsmoe_model_config *cfg, const char *dir);

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

/* ------------------------------------------------------------ tensor table -- */
/* The tensors a configuration implies, under their Hugging Face names (every name
 * carries "model." except lm_head.weight), in this order: model.embed_tokens.weight
 * (V, D); per layer l: input_layernorm (D), self_attn.{q_proj (H(n+r), D) | q_a_proj
 * (q, D), q_a_layernorm (q), q_b_proj (H(n+r), q)}, kv_a_proj_with_mqa (c+r, D),
 * kv_a_layernorm (c), kv_b_proj (H(n+v), c), o_proj (D, Hv), post_attention_layernorm
 * (D), then mlp.{gate_proj, up_proj (I, D), down_proj (D, I)} for a dense layer or
 * mlp.gate.weight (E, D), mlp.gate.e_score_correction_bias (E) (noaux_tc only),
 * mlp.experts.<e>.{gate_proj, up_proj (F, D), down_proj (D, F)},
 * mlp.shared_experts.{gate_proj, up_proj (N_s F, D), down_proj (D, N_s F)} for a MoE
 * layer; model.norm.weight (D); lm_head.weight (V, D) unless tied. Each MTP depth d
 * (layer L + d) then adds embed_tokens (V, D), enorm (D), hnorm (D), eh_proj (D, 2D),
 * shared_head.norm (D), shared_head.head (V, D) and an ordinary block. Every name ends
 * in ".weight" except the correction bias. */
#define DSMOE_MODEL_NAME_MAX 96

typedef struct dsmoe_model_tensor_spec {
    char name[DSMOE_MODEL_NAME_MAX];
    int32_t ndim;           /* 1 or 2 */
    int64_t shape[2];       /* [out, in] for matrices; shape[1] = 0 for vectors */
    int32_t layer;          /* -1 for embedding, final norm and head */
    int32_t mtp;            /* 1 for the tensors of an MTP depth */
} dsmoe_model_tensor_spec;

/* Number of tensors with `mtp_depths` MTP depths (0 .. num_nextn_predict_layers);
 * -1 (with INVALID_CONFIG) for an invalid config or depth count. */
DSMOE_API int64_t dsmoe_model_tensor_count(const dsmoe_model_config *cfg, int32_t mtp_depths);
/* The i-th tensor in the order above. INVALID_ARGUMENT when i is out of range. */
DSMOE_API dsmoe_status dsmoe_model_tensor_at(const dsmoe_model_config *cfg, int32_t mtp_depths,
                                             int64_t i, dsmoe_model_tensor_spec *out);

/* ------------------------------------------------------------ model files -- */
/* A model directory opened read-only: <dir>/model.safetensors, or the shards that
 * <dir>/model.safetensors.index.json lists in its "weight_map" (both present is an
 * error). Files are memory-mapped (read into memory where mmap is impossible).
 * Opening checks everything against the tensor table of the config:
 *   - a listed shard name with a '/' or a shard that fails to open: error naming it;
 *   - a tensor of the table that is missing: NOT_FOUND naming it (MTP depths are all
 *     or nothing: a depth with none of its tensors is simply absent, see
 *     dsmoe_model_files_mtp_depths; a depth with some is an error naming the first
 *     missing one);
 *   - a tensor in the files that the table does not have, a weight_map entry whose
 *     shard lacks it, a shard tensor not in weight_map: FORMAT naming it;
 *   - a shape other than the table's: SHAPE_MISMATCH naming the tensor, both shapes;
 *   - stored dtypes: F32, BF16, F16, or F8_E4M3 for matrices (2-D) with a companion
 *     <name>_scale_inv F32 of shape (ceil(out / br), ceil(in / bc)), (br, bc) from the
 *     config's quantization_config (an F8 tensor without one is an error); other
 *     dtypes are FORMAT naming the tensor.
 * The object is immutable after opening: any number of threads may read it.
 * *out is NULL on error. */
typedef struct dsmoe_model_files dsmoe_model_files;

DSMOE_API dsmoe_status dsmoe_model_files_open(const char *dir, const dsmoe_model_config *cfg,
                                              dsmoe_model_files **out);
/* NULL is a no-op. Views and names obtained from the object die with it. */
DSMOE_API void dsmoe_model_files_close(dsmoe_model_files *mf);
/* MTP depths present in the files (0 .. num_nextn_predict_layers). */
DSMOE_API int32_t dsmoe_model_files_mtp_depths(const dsmoe_model_files *mf);
/* Number of shard files (1 for a single model.safetensors). */
DSMOE_API int32_t dsmoe_model_files_shard_count(const dsmoe_model_files *mf);

typedef struct dsmoe_model_tensor_info {
    const char *name;          /* owned by the object */
    const char *stored_dtype;  /* "F32", "BF16", "F16" or "F8_E4M3" */
    int32_t ndim;
    int64_t shape[2];
    int32_t shard;             /* index of its file (0 for a single file) */
    int32_t has_scale;         /* 1 for F8_E4M3 (block scales in <name>_scale_inv) */
} dsmoe_model_tensor_info;

/* Looks a table tensor up (not the _scale_inv companions); NOT_FOUND names it. */
DSMOE_API dsmoe_status dsmoe_model_files_get(const dsmoe_model_files *mf, const char *name,
                                             dsmoe_model_tensor_info *out);
/* Widens a table tensor to fp32 into dst (shape[0]·max(shape[1], 1) floats): F32 as
 * is, BF16 and F16 exactly, F8_E4M3 times its block's scale_inv (w = fp8 · scale,
 * the scale of block (i / br, j / bc) for element (i, j)). A NaN or Inf in the result
 * is NON_FINITE naming the tensor and the element (dst is then unspecified).
 * NOT_FOUND names an unknown tensor. Reentrant. */
DSMOE_API dsmoe_status dsmoe_model_files_read_f32(const dsmoe_model_files *mf, const char *name,
                                                  float *dst);

/* The value of an F8_E4M3 byte (the "fn" variant: bias 7, no infinities, 0x7F and
 * 0xFF are NaN, largest finite 448). */
DSMOE_API float dsmoe_fp8_e4m3_to_f32(uint8_t b);

/* ------------------------------------------------------------------ model -- */
/* A whole model ready to run: the configuration, the files of a model directory kept
 * mapped, and every weight as stored (F32, BF16, F16, F8_E4M3 with block scales),
 * widened to fp32 as the products stream it (dsmoe_model_options.widen_f32 widens all
 * of them once at open instead). MoE layers whose matrices are all BF16 or all F32 are
 * dsmoe_moe layers (a copy in that dtype); others (F8_E4M3 or F16 experts) run from the
 * stored weights. Stored MTP depths are checked, and loaded only with
 * dsmoe_model_options.mtp (for dsmoe_model_forward_mtp and speculative decoding, below).
 *
 * Tokens go through dsmoe_model_forward() with a cache (dsmoe_model_cache): the call
 * appends T tokens at the cache's next positions; they attend causally to the cached
 * positions and to each other, and their logits come out. A prompt is one call,
 * decoding one call per token. The cache keeps, per layer and position, only the
 * normalised compressed latent (kv_lora_rank values) and the rotated rope key
 * (qk_rope_head_dim values), in fp32: the memory saving MLA exists for.
 *
 * Two attention paths give the same results within fp32 rounding:
 *   naive     the latent of every position is expanded through kv_b_proj into per-head
 *             keys and values (prompts: many new tokens);
 *   absorbed  kv_b_proj's key half is absorbed into the query and its value half into
 *             the output, so attention runs on the cached latent directly (decoding).
 *
 * Threads: over output rows of the products, over heads in attention, over experts and
 * tokens in the MoE layers; the same bits for any n_threads. One dsmoe_model runs one
 * forward at a time (it owns the scratch); each sequence has its own cache.
 */
typedef struct dsmoe_model dsmoe_model;
typedef struct dsmoe_model_cache dsmoe_model_cache;

typedef struct dsmoe_model_options {
    int32_t n_threads;  /* <= 0: dsmoe_default_threads() */
    int32_t max_tokens; /* tokens per internal chunk (scratch is sized for it); <= 0: 256 */
    int32_t widen_f32;  /* 1: widen every weight to fp32 once at open */
    int32_t mtp;        /* 1: also load the stored MTP depths (dsmoe_model_mtp_depths);
                           0: leave them unread (they cost memory and open time) */
} dsmoe_model_options;

/* n_threads 0, max_tokens 256, widen_f32 0, mtp 0. */
DSMOE_API void dsmoe_model_options_default(dsmoe_model_options *opts);

/* Opens the model directory dir (config.json and the weights, checked as
 * dsmoe_model_files_open does). opts NULL: the defaults. Errors: those of
 * dsmoe_model_config_from_dir and dsmoe_model_files_open, NON_FINITE naming a tensor
 * with a NaN or Inf weight, OUT_OF_MEMORY. *out is NULL on error. */
DSMOE_API dsmoe_status dsmoe_model_open(const char *dir, const dsmoe_model_options *opts,
                                        dsmoe_model **out);
/* NULL is a no-op. */
DSMOE_API void dsmoe_model_free(dsmoe_model *m);
DSMOE_API const dsmoe_model_config *dsmoe_model_get_config(const dsmoe_model *m);
/* The open files (tensor lookup, MTP depths, shard count), owned by the model. */
DSMOE_API const dsmoe_model_files *dsmoe_model_get_files(const dsmoe_model *m);

/* A cache of up to `capacity` positions (1 .. max_position_embeddings) for sequences
 * of model m; usable with m only. Besides capacity · dsmoe_model_cache_bytes_per_token
 * bytes it owns the attention scratch for that capacity (about n_threads · capacity ·
 * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim + 64) floats), so that forward
 * allocates nothing.
 * Errors: INVALID_ARGUMENT, OUT_OF_MEMORY. */
DSMOE_API dsmoe_status dsmoe_model_cache_create(const dsmoe_model *m, int64_t capacity,
                                                dsmoe_model_cache **out);
/* NULL is a no-op. */
DSMOE_API void dsmoe_model_cache_free(dsmoe_model_cache *cache);
/* Positions held (the next token's position). */
DSMOE_API int64_t dsmoe_model_cache_length(const dsmoe_model_cache *cache);
DSMOE_API int64_t dsmoe_model_cache_capacity(const dsmoe_model_cache *cache);
/* Forgets the positions >= length (0 <= length <= current length): 0 starts a new
 * sequence, a shorter length drops rejected draft tokens. INVALID_ARGUMENT otherwise. */
DSMOE_API dsmoe_status dsmoe_model_cache_truncate(dsmoe_model_cache *cache, int64_t length);
/* Cache bytes per position: num_hidden_layers · (kv_lora_rank + qk_rope_head_dim) · 4.
 * From the config alone; -1 (with the validator's error) for a NULL or invalid config,
 * here and in the next function. */
DSMOE_API int64_t dsmoe_model_cache_bytes_per_token(const dsmoe_model_config *cfg);
/* The same for a plain multi-head cache of this attention (keys H·(n + r) and values
 * H·v per layer, fp32): what MLA saves against. */
DSMOE_API int64_t dsmoe_model_mha_cache_bytes_per_token(const dsmoe_model_config *cfg);

/* Flags of dsmoe_model_forward. */
#define DSMOE_MODEL_ATTN_AUTO 0u     /* naive when the call has T > 4 new tokens, absorbed
                                        otherwise (the whole call, every chunk) */
#define DSMOE_MODEL_ATTN_NAIVE 1u
#define DSMOE_MODEL_ATTN_ABSORBED 2u
#define DSMOE_MODEL_LOGITS_LAST 4u   /* logits of the last token only: (V) not (T, V) */

/* Runs tokens[0..T) at positions len .. len + T − 1 (len: the cache's length before the
 * call) and appends them to the cache. logits: (T, vocab_size) fp32, or (vocab_size)
 * with DSMOE_MODEL_LOGITS_LAST; NULL computes none (the cache still advances). Any
 * T >= 1 (run in chunks of max_tokens). Errors, with the cache and logits unchanged:
 * INVALID_ARGUMENT (NULL, T < 1, unknown or conflicting flags, a cache of another
 * model; also a token id outside [0, vocab_size), the message naming its index and
 * value), WORKSPACE_TOO_SMALL when len + T exceeds the cache's capacity (the message
 * says both), NON_FINITE when a hidden state becomes NaN or Inf (naming the layer; the
 * cache goes back to len, and only the logits of chunks before the failing one may
 * have been written). */
DSMOE_API dsmoe_status dsmoe_model_forward(dsmoe_model *m, dsmoe_model_cache *cache,
                                           const int32_t *tokens, int64_t T, float *logits,
                                           unsigned flags);
/* dsmoe_model_forward that also writes the final-norm hidden states it computed:
 * hidden (T, hidden_size) = RMSNorm_final(h) of every token, the input of the head and of
 * MTP depth 1 (NULL: none, exactly dsmoe_model_forward). A token's logits and hidden
 * state are the same bits with or without hidden. Errors as dsmoe_model_forward; on
 * NON_FINITE the hidden rows of chunks before the failing one may have been written. */
DSMOE_API dsmoe_status dsmoe_model_forward_hidden(dsmoe_model *m, dsmoe_model_cache *cache,
                                                  const int32_t *tokens, int64_t T,
                                                  float *logits, float *hidden, unsigned flags);

/* ---------------------------------------------------- multi-token prediction -- */
/* The MTP depths (DeepSeek-V3 §2.2), with the math the training model uses
 * (include/dsmoe/train.h): depth k = 1 .. Dm is layer L + k − 1 of the files and, at
 * position i,
 *   h'_i = eh_proj [enorm(embed_k(t_{i+k})) ; hnorm(h^{k−1}_i)]    (embedding first)
 *   h^k_i = block_{L+k−1}(h')_i        (MLA over depth k's own cache, then FFN / MoE)
 *   logits^k_i = head_k(shared_head.norm(h^k_i))          predicting token t_{i+k+1}
 * with h^0 the main model's final-norm output (dsmoe_model_forward_hidden) and embed_k,
 * head_k the depth's stored embed_tokens and shared_head.head (copies of the main
 * model's in DeepSeek-V3 and in dsmoe's checkpoints). The block's rotary positions are
 * the main model's: depth k's cache position i holds position i's latent. */

/* MTP depths loaded (dsmoe_model_options.mtp): dsmoe_model_files_mtp_depths of the
 * files, or 0 without the option (or for NULL). */
DSMOE_API int32_t dsmoe_model_mtp_depths(const dsmoe_model *m);

/* A cache of MTP depth `depth` (1 .. dsmoe_model_mtp_depths(m)): one layer's latents
 * and rope keys for `capacity` positions (and attention scratch, as
 * dsmoe_model_cache_create). Length, capacity and truncate as for the main model's
 * cache; dsmoe_model_forward refuses it and dsmoe_model_forward_mtp refuses a main
 * cache. Errors: INVALID_ARGUMENT (naming a depth the model has not loaded),
 * OUT_OF_MEMORY. */
DSMOE_API dsmoe_status dsmoe_model_mtp_cache_create(const dsmoe_model *m, int32_t depth,
                                                    int64_t capacity, dsmoe_model_cache **out);
/* The MTP depth of a cache (0 for a main model's cache or NULL). */
DSMOE_API int32_t dsmoe_model_cache_mtp_depth(const dsmoe_model_cache *cache);

/* Runs the cache's MTP depth k at positions len .. len + T − 1 (len: the cache's length)
 * and appends them to the cache:
 *   hidden     (T, hidden_size) h^{k−1} at those positions: for k = 1 the main model's
 *              final-norm output there, else depth k − 1's hidden_out;
 *   tokens     (T) t_{i+k}: the token k positions after each position i;
 *   hidden_out (T, hidden_size) h^k, the block's output before shared_head.norm (the
 *              next depth's input), or NULL;
 *   logits     (T, vocab_size), or (vocab_size) with DSMOE_MODEL_LOGITS_LAST, or NULL:
 *              depth k's logits for t_{i+k+1}.
 * flags as dsmoe_model_forward's. Allocates nothing; the same bits for any n_threads.
 * Errors, with the cache unchanged: INVALID_ARGUMENT (NULL, a main model's cache or
 * another model's, T < 1, flags, a token outside [0, vocab_size) or a non-finite hidden
 * value, naming its index), WORKSPACE_TOO_SMALL (capacity), NON_FINITE (naming the
 * depth). */
DSMOE_API dsmoe_status dsmoe_model_forward_mtp(dsmoe_model *m, dsmoe_model_cache *cache,
                                               const float *hidden, const int32_t *tokens,
                                               int64_t T, float *hidden_out, float *logits,
                                               unsigned flags);

/* ------------------------------------------------------ speculative decoding -- */
/* Decoding with drafts from the MTP depths, verified by the main model, as DeepSeek-V3
 * serves it. The last produced token t_m is not yet in the main cache (which holds
 * positions 0 .. m − 1). Each step:
 *   1. draft: depth k = 1 .. N runs at the positions it has not committed, ending at
 *      m − 1, and its last position's largest logit is the draft d_k of t_{m+k}
 *      (a depth k above the model's Dm reuses depth Dm's weights, with a cache of its
 *      own, as vLLM does);
 *   2. verify: ONE main forward of [t_m, d_1 .. d_N] (absorbed attention): logits and
 *      final-norm hidden states of positions m .. m + N;
 *   3. accept: for j = 0, 1, ..: s_j = dsmoe_sample(logits of position m + j) with the
 *      caller's temperature, top_p and rng; while j < N and s_j == d_{j+1} the draft is
 *      accepted and j advances; the first s_j that differs (or s_N) ends the step. The
 *      step produces s_0 .. s_a (a accepted drafts, then the main model's own token)
 *      and truncates the main cache to m + a + 1 positions.
 * Every produced token is the main model's draw from its own distribution, one rng draw
 * per produced token as in plain decoding (one forward per token), and the verify pass
 * gives each position the same logit bits as plain decoding (absorbed attention, and
 * products whose per-token bits do not depend on the other tokens for up to
 * DSMOE_MODEL_SPEC_MAX_DRAFT + 1 tokens): the produced tokens are exactly those of plain
 * decoding with the same rng, greedy or sampled; the drafts change only the speed. (This
 * is the rule "accept when the sampled token equals the draft", not speculative
 * sampling's min(1, p/q): simpler, exact, and with greedy drafts it accepts a draft with
 * the main model's probability of it.)
 * The depth caches keep only the positions whose inputs are all produced tokens; the
 * positions that used drafts are recomputed at the next step. Memory: the main cache, N
 * depth caches and N arrays of capacity × hidden_size floats (the hidden states that
 * feed the depths), all allocated at create; steps allocate nothing. */
#define DSMOE_MODEL_SPEC_MAX_DRAFT 7

typedef struct dsmoe_model_spec dsmoe_model_spec;

typedef struct dsmoe_model_spec_stats {
    int64_t passes;   /* verify passes (steps) */
    int64_t produced; /* tokens the steps produced (not the prefill's first) */
    int64_t drafted[DSMOE_MODEL_SPEC_MAX_DRAFT];  /* drafts d_k offered (index k − 1) */
    int64_t accepted[DSMOE_MODEL_SPEC_MAX_DRAFT]; /* drafts d_k accepted (so were d_1 ..
                                                     d_{k−1}) */
} dsmoe_model_spec_stats;

/* A decoder of n_draft drafts per step (1 .. DSMOE_MODEL_SPEC_MAX_DRAFT) for sequences
 * of up to `capacity` positions (1 .. max_position_embeddings) on model m, which must
 * have MTP depths loaded; m must outlive it. Errors: INVALID_ARGUMENT (NULL, n_draft or
 * capacity out of range, or "the model has no MTP depths loaded"), OUT_OF_MEMORY. */
DSMOE_API dsmoe_status dsmoe_model_spec_create(dsmoe_model *m, int32_t n_draft, int64_t capacity,
                                               dsmoe_model_spec **out);
/* NULL is a no-op. */
DSMOE_API void dsmoe_model_spec_free(dsmoe_model_spec *s);
/* Starts a sequence (forgetting any earlier one): the prompt (P >= 1 tokens) in one
 * main forward (DSMOE_MODEL_ATTN_AUTO and the last logits, as plain decoding prefills
 * it), then *first = dsmoe_sample of its logits. The statistics restart. Errors: NULL
 * arguments, those of dsmoe_model_forward and dsmoe_sample (the decoder then holds no
 * sequence). */
DSMOE_API dsmoe_status dsmoe_model_spec_prefill(dsmoe_model_spec *s, const int32_t *prompt,
                                                int64_t P, float temperature, float top_p,
                                                dsmoe_rng *rng, int32_t *first);
/* One step: writes the 1 .. n_draft + 1 produced tokens to out (room for n_draft + 1)
 * and their count to *n_out. Near the capacity it drafts fewer tokens (none when one
 * position is left); with none left it is WORKSPACE_TOO_SMALL. Errors: INVALID_ARGUMENT
 * (NULL, no sequence), those of the forwards and of dsmoe_sample (the decoder then holds
 * no sequence). */
DSMOE_API dsmoe_status dsmoe_model_spec_step(dsmoe_model_spec *s, float temperature, float top_p,
                                             dsmoe_rng *rng, int32_t *out, int32_t *n_out);
/* The counts since the prefill (NULL for NULL). */
DSMOE_API const dsmoe_model_spec_stats *dsmoe_model_spec_get_stats(const dsmoe_model_spec *s);
/* The drafts d_1 .. d_n of the last step (n into *n; 0 before the first step). */
DSMOE_API const int32_t *dsmoe_model_spec_drafts(const dsmoe_model_spec *s, int32_t *n);
/* The main model's cache: positions 0 .. m − 1 (every produced token but the last). */
DSMOE_API dsmoe_model_cache *dsmoe_model_spec_cache(dsmoe_model_spec *s);

/* Parameter counts of a configuration's main model (dsmoe info). */
typedef struct dsmoe_model_counts {
    int64_t total;          /* every parameter of the main model: the sum of the parts below */
    int64_t active;         /* per token: total minus the routed experts a token does not
                               use, (E − K) · 3·D·F per MoE layer */
    int64_t embedding;      /* V · D */
    int64_t head;           /* V · D, or 0 when tied to the embedding */
    int64_t attention;      /* every layer's MLA weights and its two norms */
    int64_t dense_ffn;      /* the dense layers' SwiGLU */
    int64_t routed_experts; /* every routed expert of every MoE layer */
    int64_t shared_experts;
    int64_t router;         /* gate weights and correction biases */
    int64_t final_norm;     /* D */
    int64_t mtp;            /* all MTP depths' tensors (not in total) */
} dsmoe_model_counts;

/* Fills *out from the config alone (no files). Errors: INVALID_ARGUMENT (NULL),
 * INVALID_CONFIG (the validator's message); *out unchanged on error. */
DSMOE_API dsmoe_status dsmoe_model_count_params(const dsmoe_model_config *cfg,
                                                dsmoe_model_counts *out);

/* Samples a token id from logits (V > 0). temperature <= 0: greedy, the largest logit
 * (the lowest id among equal ones), rng unused. Otherwise softmax(logits / temperature)
 * restricted to the smallest set of most likely tokens whose probability reaches top_p
 * (0 < top_p <= 1; 1 keeps every token; ties at the cut keep the lower ids), one draw
 * of rng (dsmoe_rng_uniform) per call. −Inf logits are never drawn. scratch: 2·V floats
 * (the probabilities and the kept ids); rng and scratch may be NULL when greedy.
 * Returns the id, or −1 with the last error "dsmoe_sample: <STATUS>: ...":
 * INVALID_ARGUMENT (NULL, V outside 1 .. 2^24, top_p, a non-finite temperature) or
 * NON_FINITE (a NaN or +Inf logit, naming its index, or every logit −Inf); rng unchanged.
 * Reentrant. */
DSMOE_API int32_t dsmoe_sample(const float *logits, int32_t V, float temperature, float top_p,
                               dsmoe_rng *rng, float *scratch);

#ifdef __cplusplus
}
#endif
#endif /* DSMOE_MODEL_H */
