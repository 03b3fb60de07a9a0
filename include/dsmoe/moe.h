/*
 * dsmoe/moe.h — the DeepSeekMoE feed-forward layer (DeepSeek-V3 report §2.1.2, eq. 12;
 * SPEC-routing §2 step 9): gate projection → routing → dispatch → routed SwiGLU
 * experts → weighted combine → plus the shared experts; forward and backward.
 *
 * For a token x (D):
 *   u = x · Wgᵀ                      gate projection, Wg (E, D)
 *   (idx, w) = route(u, b)            dsmoe_router_forward (bias b used for selection only)
 *   expert_e(x) = W2_e · (silu(Wg_e·x) ⊙ (Wu_e·x))     SwiGLU, gate_proj / up_proj (F, D),
 *                                                      down_proj (D, F)
 *   y = Σ_k w_k · expert_{idx_k}(x) + shared(x)        shared: one SwiGLU of inner size N_s·F
 *
 * Tensors use the Hugging Face DeepseekV3 names under a prefix such as
 * "model.layers.3.mlp.":  gate.weight (E, D), gate.e_score_correction_bias (E),
 * experts.<e>.{gate_proj,up_proj}.weight (F, D), experts.<e>.down_proj.weight (D, F),
 * shared_experts.{gate_proj,up_proj}.weight (N_s·F, D), shared_experts.down_proj.weight
 * (D, N_s·F).
 *
 * Storage. All parameters live in one 64-byte aligned allocation with a pointer
 * table; the gradients (train = 1) use the same layout, so an optimizer is one flat
 * pass (dsmoe_moe_params / dsmoe_moe_grads). Each expert's gate_proj and up_proj are
 * stored concatenated as one (2F, D) matrix, followed by its down_proj (D, F), so that
 * the first product is one pass over the weights. The correction bias is a buffer, not
 * a parameter: it has no gradient and is changed only by dsmoe_moe_set_bias (e.g. from
 * a balancer). weight_dtype BF16 keeps every weight matrix in bf16 (inference only,
 * half the memory and bandwidth); the products widen bf16 exactly to fp32 as they read
 * it (where SGEMM runs instead, in chunks of 256 weight rows into a per-thread scratch
 * of the layer).
 *
 * Packed layout (weight_layout = DSMOE_MOE_LAYOUT_PACKED; inference only, F32 or BF16).
 * Every expert matrix (routed and shared gate_proj, up_proj, down_proj; not the gate
 * weight) is stored in panels of 16 rows, each panel column after column: element
 * (r, c) of a (rows, cols) matrix at data[((r / 16) · cols + c) · 16 + r % 16], with
 * the rows padded with zeros to a multiple of 16. The forward then streams each panel
 * as one sequence and sums outer products (no SGEMM at any T): on one thread of the
 * AMD EPYC it was tuned on, the Moonlight-like layer takes about 20% less time at
 * T = 2..32 than in the checkpoint layout (docs/benchmarks.md). Each product is then one
 * fma chain per result over the inner index in increasing order, so the bits differ
 * from the checkpoint layout's (same math). Loading and saving convert: files are
 * always in the checkpoint layout. dsmoe_moe_tensor.layout says which layout a view
 * is in; dsmoe_moe_params returns NULL.
 *
 * Dispatch. The (token, k) assignments are grouped by expert with a counting sort
 * that is stable (tokens ascending, then k ascending), so the order is deterministic.
 * Each expert runs on its gathered rows as two products (X·W1ᵀ, SwiGLU, H·W2ᵀ), in
 * fixed blocks of at most DSMOE_MOE_ROW_BLOCK rows: the layer's own product, which
 * streams each weight row once for 4 rows of X at a time in registers (with AVX-512
 * for any number of rows, with AVX2 up to 16), or BLIS SGEMM (which packs the
 * whole weight matrix first). The combine adds, for each token, w_0·y_0, w_1·y_1, ...
 * in k order (the router's order, descending selection score), then the shared
 * expert's output. For T <= DSMOE_MOE_DECODE_MAX_T tokens the layer skips the gather
 * and splits each active expert's weights into fixed chunks of rows across threads.
 * The paths round differently (same math, different summation order); the bits depend
 * on the kernel set (dsmoe_isa()) but never on the thread count.
 *
 * Capacity (for studies; off by default). With capacity_factor c > 0 each expert
 * takes at most C = ceil(c · T · K / E) assignments per forward. Drop policy: the
 * first C assignments in dispatch order (token index ascending, then k) are kept;
 * later ones are dropped: they contribute nothing to y (the remaining weights are
 * NOT renormalised) and get no gradient. The routing counts report tokens routed
 * before the drops; dsmoe_moe_last_routing() also reports how many were dropped.
 *
 * Threads. OpenMP over experts × row blocks, token blocks and weight-row blocks whose
 * boundaries never depend on the thread count; BLIS runs single-threaded inside
 * each task, with no lock between tasks, and ignores BLIS_NUM_THREADS; no BLAS setting
 * of the host process is read or changed. Results are bit-identical for any n_threads (n_threads <= 0 means
 * dsmoe_default_threads(); it is capped at the count reserved for the layer).
 *
 * Memory. The layer owns its workspace, sized for max_tokens tokens and a thread
 * count at create time (dsmoe_moe_reserve grows it). Forward and backward allocate
 * nothing. A layer object is not reentrant: one forward/backward at a time.
 *
 * Example (inference from a checkpoint):
 *   dsmoe_safetensors *st;  dsmoe_safetensors_open("layer.safetensors", &st);
 *   dsmoe_moe_config cfg;   dsmoe_moe_config_default(&cfg);
 *   dsmoe_router_preset("deepseek-v3", &cfg.router);
 *   cfg.n_shared = -1;                                   // infer from the file
 *   dsmoe_moe_config_from_safetensors(&cfg, st, "model.layers.3.mlp.");
 *   dsmoe_moe *moe;  dsmoe_moe_create(&cfg, &moe);
 *   dsmoe_moe_load_safetensors(moe, st, "model.layers.3.mlp.");
 *   dsmoe_moe_forward(moe, y, x, T, 0);                  // y, x: (T, D)
 *   const dsmoe_moe_routing *r = dsmoe_moe_last_routing(moe); // indices, weights, counts
 *   dsmoe_moe_free(moe); dsmoe_safetensors_close(st);
 *
 * Training step with the loss-free bias and a balance loss on the router logits:
 *   dsmoe_moe_forward(moe, y, x, T, 0);
 *   ... loss, dy; dlogits (T, E) = 0, then a balance loss backward accumulates into it
 *       from dsmoe_moe_last_routing(moe)->scores / ->indices ...
 *   dsmoe_moe_backward(moe, dx, dy, x, dlogits, T, 0);  // dx += ..., grads += ...
 *   ... a balancer turns dsmoe_moe_last_routing(moe)->counts into a new bias:
 *   dsmoe_moe_set_bias(moe, new_bias);
 */
#ifndef DSMOE_MOE_H
#define DSMOE_MOE_H

#include "core.h"
#include "io.h"
#include "router.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Tokens per call up to which the matrix-vector (decode) path is used. */
#define DSMOE_MOE_DECODE_MAX_T 8
/* Fixed row block of the batched expert products (thread-count independent). */
#define DSMOE_MOE_ROW_BLOCK 256
/* Format version written to (and checked in) safetensors __metadata__ by dsmoe. */
#define DSMOE_MOE_FORMAT_VERSION 1

/* How the layer stores its expert matrices (see "Packed layout" above). */
typedef enum dsmoe_moe_layout {
    DSMOE_MOE_LAYOUT_CHECKPOINT = 0, /* row-major, as in the checkpoint */
    DSMOE_MOE_LAYOUT_PACKED = 1      /* panels of 16 rows; inference only */
} dsmoe_moe_layout;

typedef struct dsmoe_moe_config {
    int32_t hidden_size;        /* D (hidden_size) */
    int32_t expert_size;        /* F (moe_intermediate_size) */
    int32_t n_shared;           /* N_s shared experts (one SwiGLU of inner size N_s·F); 0 = none;
                                   -1 only as input to dsmoe_moe_config_from_safetensors */
    dsmoe_router_config router; /* E = router.n_experts, K = router.top_k, groups, scoring;
                                   router.use_bias: the layer has e_score_correction_bias */
    dsmoe_dtype weight_dtype;   /* F32 (default) or BF16 (inference only) */
    int32_t train;              /* 1: allocate gradients and keep activations for backward */
    int64_t max_tokens;         /* tokens per forward the workspace is sized for (>= 1) */
    int32_t n_threads;          /* threads the workspace is sized for (<= 0: default) */
    float capacity_factor;      /* 0: no limit (default); > 0: see "Capacity" above */
    int32_t weight_layout;      /* dsmoe_moe_layout: CHECKPOINT (default) or PACKED */
} dsmoe_moe_config;

/* D = 0, F = 0, N_s = 0, router = "deepseek-v3" preset, F32, train 0, max_tokens 512,
 * n_threads 0, capacity 0, checkpoint layout. */
DSMOE_API void dsmoe_moe_config_default(dsmoe_moe_config *cfg);
/* Whole-layer presets: "deepseek-v3" (D 7168, F 2048, N_s 1), "deepseek-v2" (5120,
 * 1536, 2), "moonlight" (2048, 1408, 2), with the router preset of the same name;
 * other fields as dsmoe_moe_config_default. NOT_FOUND for other names. */
DSMOE_API dsmoe_status dsmoe_moe_preset(const char *name, dsmoe_moe_config *cfg);
/* INVALID_CONFIG naming the bad field (the router config included). */
DSMOE_API dsmoe_status dsmoe_moe_config_validate(const dsmoe_moe_config *cfg);

typedef struct dsmoe_moe dsmoe_moe;

/* Creates a layer with zero weights and zero bias. Errors: INVALID_CONFIG,
 * OUT_OF_MEMORY. *out is NULL on error. */
DSMOE_API dsmoe_status dsmoe_moe_create(const dsmoe_moe_config *cfg, dsmoe_moe **out);
/* NULL is a no-op. */
DSMOE_API void dsmoe_moe_free(dsmoe_moe *moe);
/* The layer's configuration (max_tokens / n_threads as reserved). */
DSMOE_API const dsmoe_moe_config *dsmoe_moe_get_config(const dsmoe_moe *moe);
/* Grows the workspace for T tokens and n_threads threads (never shrinks). Not a hot
 * path: allocates. OUT_OF_MEMORY leaves the layer as it was. */
DSMOE_API dsmoe_status dsmoe_moe_reserve(dsmoe_moe *moe, int64_t max_tokens, int n_threads);
/* Bytes held by the layer: parameters, gradients, workspace. */
DSMOE_API size_t dsmoe_moe_memory_size(const dsmoe_moe *moe);

/* Fills the weights deterministically from `seed`: every matrix uniform in
 * ±1/sqrt(fan_in) (torch.nn.Linear's default bound); the bias is set to 0. */
DSMOE_API void dsmoe_moe_init_random(dsmoe_moe *moe, uint64_t seed);

/* ---------------------------------------------------------- tensors -- */
/* One named tensor of the layer, as in a checkpoint. data points into the layer's
 * parameter allocation (dtype weight_dtype; the bias is always F32), grad into the
 * gradients (NULL without train or for the bias). Valid until dsmoe_moe_free. */
typedef struct dsmoe_moe_tensor {
    char name[64];       /* without prefix, e.g. "experts.3.gate_proj.weight" */
    dsmoe_dtype dtype;
    int32_t ndim;
    int64_t shape[2];
    void *data;
    float *grad;
    int32_t trainable;   /* 0 for the correction bias */
    int32_t layout;      /* dsmoe_moe_layout of data: PACKED for the expert matrices of a
                            packed layer (element (r, c) at ((r/16)·shape[1] + c)·16 + r%16) */
} dsmoe_moe_tensor;

/* 1 (gate) + use_bias + 3·E + (N_s > 0 ? 3 : 0) tensors, in checkpoint order:
 * gate.weight, gate.e_score_correction_bias, experts.0.gate_proj/up_proj/down_proj,
 * ..., shared_experts.gate_proj/up_proj/down_proj. */
DSMOE_API int64_t dsmoe_moe_tensor_count(const dsmoe_moe *moe);
DSMOE_API dsmoe_status dsmoe_moe_tensor_at(const dsmoe_moe *moe, int64_t i,
                                           dsmoe_moe_tensor *out);
/* Looks a tensor up by its name without prefix; NOT_FOUND names it. */
DSMOE_API dsmoe_status dsmoe_moe_tensor_get(const dsmoe_moe *moe, const char *name,
                                            dsmoe_moe_tensor *out);

/* Flat parameter and gradient arrays (fp32, same layout, `*n` floats, padding
 * included and kept at 0). params is NULL for BF16 storage or the packed layout; grads
 * NULL without train. */
DSMOE_API float *dsmoe_moe_params(dsmoe_moe *moe, size_t *n);
DSMOE_API float *dsmoe_moe_grads(dsmoe_moe *moe, size_t *n);
/* Sets every gradient to 0 (no-op without train). */
DSMOE_API void dsmoe_moe_zero_grad(dsmoe_moe *moe);

/* Bias (E) used for selection only (e_score_correction_bias). set_bias copies it
 * after checking it is finite (NON_FINITE names the expert; nothing changes);
 * UNSUPPORTED if router.use_bias is 0. dsmoe_moe_bias returns NULL then. */
DSMOE_API dsmoe_status dsmoe_moe_set_bias(dsmoe_moe *moe, const float *bias /* (E) */);
DSMOE_API const float *dsmoe_moe_bias(const dsmoe_moe *moe);

/* ---------------------------------------------------------- forward / backward -- */
/* What the last forward decided; pointers into the layer, valid until the next
 * forward. counts feed a balancer (dsmoe_balancer) and scores / logits / indices a
 * balance loss. */
typedef struct dsmoe_moe_routing {
    int64_t T;
    const int32_t *indices;   /* (T, K) chosen experts, descending selection score */
    const float *weights;     /* (T, K) routing weights (before capacity drops) */
    const float *scores;      /* (T, E) affinities s */
    const float *logits;      /* (T, E) gate logits u */
    const int64_t *counts;    /* (E) assignments per expert in this forward (before drops) */
    int64_t n_dropped;        /* assignments dropped by the capacity limit */
    int64_t capacity;         /* per-expert capacity used, or -1 without a limit */
} dsmoe_moe_routing;

/* y (T, D) = layer(x (T, D)). 0 <= T <= reserved max_tokens (WORKSPACE_TOO_SMALL
 * otherwise, naming max_tokens). x must be finite: the router reports a NaN/Inf
 * logit as NON_FINITE naming the token (or sanitizes, per router.nonfinite).
 * On error y is unspecified and the saved routing is invalid (backward refuses). */
DSMOE_API dsmoe_status dsmoe_moe_forward(dsmoe_moe *moe, float *y /* (T, D) */,
                                         const float *x /* (T, D) */, int64_t T,
                                         int n_threads);
/* Routing of the last successful forward, or NULL if there is none. */
DSMOE_API const dsmoe_moe_routing *dsmoe_moe_last_routing(const dsmoe_moe *moe);

/* Backward of the last forward (requires train = 1, same x and T): accumulates
 *   dx (T, D)           += dL/dx through the experts, the shared experts and the gate,
 *   every weight grad   += dL/dW (gate weight through the router backward),
 * from dy = dL/dy (T, D). dlogits_extra (T, E), or NULL, is an extra dL/du on the
 * gate logits — e.g. a balance loss's gradient — added before the gate projection's
 * backward. dx may be NULL (input gradient not wanted). Errors: UNSUPPORTED (no
 * train, or BF16 storage), INVALID_ARGUMENT (no forward to differentiate, T differs
 * from the forward's, NULL dy/x). */
DSMOE_API dsmoe_status dsmoe_moe_backward(dsmoe_moe *moe, float *dx /* (T, D) += */,
                                          const float *dy /* (T, D) */,
                                          const float *x /* (T, D) */,
                                          const float *dlogits_extra /* (T, E) or NULL */,
                                          int64_t T, int n_threads);

/* ---------------------------------------------------------- checkpoints -- */
/* Fills cfg->hidden_size, expert_size and router.n_experts from the shapes of
 * <prefix>gate.weight (E, D) and <prefix>experts.0.gate_proj.weight (F, D). If
 * cfg->n_shared < 0 it is inferred from <prefix>shared_experts.gate_proj.weight
 * (N_s·F rows; 0 if absent), else checked against it. A dsmoe format version in
 * __metadata__ newer than this library's is an error (FORMAT, with a hint).
 * NOT_FOUND / SHAPE_MISMATCH name the tensor; cfg is unchanged on error. */
DSMOE_API dsmoe_status dsmoe_moe_config_from_safetensors(dsmoe_moe_config *cfg,
                                                         const dsmoe_safetensors *st,
                                                         const char *prefix);
/* Copies every tensor of the layer from `st` (names under `prefix`, which may be
 * NULL or ""). Accepted dtypes: F32, BF16, F16 (converted to the layer's storage;
 * F32 -> BF16 rounds to nearest even). The bias is required iff router.use_bias
 * (and must be finite). Everything is checked before anything is written: a
 * missing tensor (NOT_FOUND), a wrong shape (SHAPE_MISMATCH) or dtype (FORMAT)
 * names the tensor and leaves the layer unchanged. Tensors of other names in the
 * file are ignored. */
DSMOE_API dsmoe_status dsmoe_moe_load_safetensors(dsmoe_moe *moe, const dsmoe_safetensors *st,
                                                  const char *prefix);
/* Writes the layer's tensors (storage dtype; the bias F32) under `prefix` to `path`
 * atomically, with __metadata__ {"format": "pt", "dsmoe.format_version": "1",
 * "dsmoe.moe_config": <JSON of the config>}. */
DSMOE_API dsmoe_status dsmoe_moe_save(const dsmoe_moe *moe, const char *path,
                                      const char *prefix);
/* One-line JSON of the layer config (router included); returns the length needed. */
DSMOE_API int dsmoe_moe_config_json(const dsmoe_moe_config *cfg, char *buf, size_t size);

#ifdef __cplusplus
}
#endif
#endif /* DSMOE_MOE_H */
