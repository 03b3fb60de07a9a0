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
 * Storage. All parameters live in one flat array (64-byte aligned when the layer
 * allocates it, or the caller's: see "Memory"); the gradients (train = 1) use the same
 * layout, so an optimizer is one flat pass (dsmoe_moe_params / dsmoe_moe_grads). Each expert's gate_proj and up_proj are
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
 * for blocks of up to 128 rows, with AVX2 up to 16), or BLIS SGEMM (which packs the
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
 * Memory. A layer has three kinds of memory, sized at create time for max_tokens
 * tokens and a thread count (dsmoe_moe_reserve grows them); forward and backward
 * allocate nothing:
 *  - parameters and gradients (dsmoe_moe_param_count elements each): owned, or in
 *    the caller's buffers (dsmoe_moe_create_with), so that a model keeps one
 *    parameter buffer, one gradient buffer and one optimizer pass over them;
 *  - the layer's state: what a forward leaves behind — the routing
 *    (dsmoe_moe_last_routing), the dispatch, and with train = 1 the activations the
 *    backward reads (gathered inputs, expert pre-activations and outputs). Always
 *    owned by the layer: one per layer of a model;
 *  - the scratch: everything else (router workspace, weight-row task lists, shared
 *    expert output, bf16 widening buffers, every backward temporary, and without
 *    train the expert activations). Owned, or one caller buffer of
 *    dsmoe_moe_workspace_size bytes shared by all the layers of a model
 *    (dsmoe_moe_create_with, dsmoe_moe_set_workspace): layers sharing it must run one
 *    at a time; nothing in it survives from one call to the next.
 * A layer object is not reentrant: one forward/backward at a time.
 *
 * Files. dsmoe_moe_write adds a layer under a prefix to a safetensors writer (many
 * layers go into one file), with its config in __metadata__
 * "dsmoe.moe_config@<prefix>" ("dsmoe.moe_config" for an empty prefix; JSON of
 * dsmoe_moe_config_json) and "dsmoe.format_version". Loading such a file takes the
 * routing config from it (dsmoe_moe_config_from_safetensors); files without it
 * (Hugging Face checkpoints) take the routing config from the caller.
 *
 * The routing config is the file's when dsmoe saved it, else opts->router.
 * Example (inference from a checkpoint in one call):
 *   dsmoe_moe_config opts;  dsmoe_moe_config_default(&opts);   // deepseek-v3 routing
 *   opts.n_shared = -1;                                  // infer from the file
 *   dsmoe_moe *moe;
 *   if (dsmoe_moe_load("layer.safetensors", "model.layers.3.mlp.", &opts, &moe) != DSMOE_OK)
 *       fprintf(stderr, "%s\n", dsmoe_last_error());
 *   dsmoe_moe_forward(moe, y, x, T, 0);                  // y, x: (T, D), T <= max_tokens
 *   const dsmoe_moe_routing *r = dsmoe_moe_last_routing(moe); // indices, weights, counts
 *   dsmoe_moe_free(moe);
 *
 * A model of L layers on one parameter buffer, one gradient buffer, one scratch:
 *   size_t np = 0, ws = 0;
 *   for (l = 0; l < L; l++) { np += dsmoe_moe_param_count(&cfg[l]);
 *       size_t w = dsmoe_moe_workspace_size(&cfg[l], cfg[l].max_tokens, cfg[l].n_threads);
 *       if (w > ws) ws = w; }
 *   float *P = dsmoe_malloc(np * 4), *G = dsmoe_malloc(np * 4); void *W = dsmoe_malloc(ws);
 *   for (l = 0, off = 0; l < L; off += dsmoe_moe_param_count(&cfg[l]), l++) {
 *       dsmoe_moe_buffers b = {P + off, G + off, W, ws};
 *       dsmoe_moe_create_with(&cfg[l], &b, &layer[l]); }
 *   ... forward each layer, backward each in reverse, then one optimizer pass over
 *   P and G (np floats); dsmoe_moe_write(layer[l], writer, "model.layers.<l>.mlp.")
 *   for each layer, then dsmoe_safetensors_writer_save.
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

/* Elements of the layer's flat parameter array for a config (storage dtype
 * weight_dtype, the layout of dsmoe_moe_params, padding included; always a multiple
 * of 16); the gradient array (train = 1) has as many floats. 0 with the error set
 * for an invalid config. */
DSMOE_API size_t dsmoe_moe_param_count(const dsmoe_moe_config *cfg);
/* Bytes of scratch a layer of this config needs for max_tokens tokens and n_threads
 * threads (<= 0: dsmoe_default_threads(), as create resolves cfg->n_threads). The
 * largest over a model's layers is the size of a workspace they can share. 0 with the
 * error set for an invalid config or max_tokens. */
DSMOE_API size_t dsmoe_moe_workspace_size(const dsmoe_moe_config *cfg, int64_t max_tokens,
                                          int n_threads);

/* Caller-owned memory for dsmoe_moe_create_with; NULL members are owned by the layer
 * as with dsmoe_moe_create. The layer never frees the caller's buffers; they must
 * outlive it.
 *   params     dsmoe_moe_param_count(cfg) elements of weight_dtype, aligned to 16
 *              elements (64 bytes for F32, 32 for BF16): layers placed back to back at
 *              offsets of dsmoe_moe_param_count satisfy this when the buffer is 64-byte
 *              aligned. Any dtype and layout: for F32 in the checkpoint layout it is
 *              the dsmoe_moe_params array (one optimizer pass); for BF16 or the packed
 *              layout it holds those elements (dsmoe_moe_params returns NULL, as
 *              always for them) and serves as one weight buffer for inference.
 *   grads      dsmoe_moe_param_count(cfg) floats, 64-byte aligned; only with train = 1.
 *   workspace  scratch of at least dsmoe_moe_workspace_size(cfg, cfg->max_tokens,
 *              cfg->n_threads) bytes, 64-byte aligned; may be shared by any number of
 *              layers (see "Memory"). */
typedef struct dsmoe_moe_buffers {
    void *params;
    float *grads;
    void *workspace;
    size_t workspace_size;
} dsmoe_moe_buffers;

/* dsmoe_moe_create on the caller's buffers (buf NULL: all owned). The layer sets
 * params and grads to zero (fill them after creation: load, init_random, or writing
 * through dsmoe_moe_params). Errors: INVALID_CONFIG; INVALID_ARGUMENT for a
 * misaligned buffer or grads without train; WORKSPACE_TOO_SMALL (naming the bytes
 * needed); OUT_OF_MEMORY. *out is NULL on error and the buffers are untouched. */
DSMOE_API dsmoe_status dsmoe_moe_create_with(const dsmoe_moe_config *cfg,
                                             const dsmoe_moe_buffers *buf, dsmoe_moe **out);
/* Attaches a caller scratch (64-byte aligned, at least dsmoe_moe_workspace_size(cfg,
 * max_tokens, n_threads) bytes of the layer's reserved sizes, else INVALID_ARGUMENT /
 * WORKSPACE_TOO_SMALL and nothing changes) in place of the current one; the layer's
 * own scratch, if any, is freed. ws NULL returns to an owned scratch (allocates;
 * OUT_OF_MEMORY leaves the layer as it was). The state is kept: the last routing and
 * the activations saved for the backward stay valid. */
DSMOE_API dsmoe_status dsmoe_moe_set_workspace(dsmoe_moe *moe, void *ws, size_t size);
/* NULL is a no-op. Frees what the layer owns, never the caller's buffers. */
DSMOE_API void dsmoe_moe_free(dsmoe_moe *moe);
/* The layer's configuration (max_tokens / n_threads as reserved). */
DSMOE_API const dsmoe_moe_config *dsmoe_moe_get_config(const dsmoe_moe *moe);
/* Grows the state and the scratch for max_tokens tokens and n_threads threads (never
 * shrinks). Not a hot path: allocates. An attached caller scratch is not grown:
 * WORKSPACE_TOO_SMALL (attach a larger one first). On error the layer is as it was.
 * The routing of the last forward stays readable: dsmoe_moe_last_routing and the
 * pointers it gave keep their values until the next forward, but the backward of that
 * forward is refused (its activations are not carried over): run the forward again. */
DSMOE_API dsmoe_status dsmoe_moe_reserve(dsmoe_moe *moe, int64_t max_tokens, int n_threads);
/* Bytes the layer owns: parameters and gradients (unless the caller's), bias, state
 * and its own scratch (not a caller's). */
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

/* Flat parameter and gradient arrays (fp32, same layout, `*n` floats =
 * dsmoe_moe_param_count, padding included and kept at 0). params is NULL for BF16
 * storage or the packed layout; grads NULL without train. Values written here are
 * not checked: keep them finite. */
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
/* What the last forward decided; pointers into the layer's state (never into a
 * shared scratch), valid until the next forward of this layer or dsmoe_moe_free,
 * dsmoe_moe_reserve and dsmoe_moe_set_workspace included. counts feed a balancer
 * (dsmoe_balancer) and scores / logits / indices a balance loss. */
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

/* Forward over T tokens of any length, in chunks of the layer's reserved max_tokens
 * (a capacity limit applies per chunk). r, or NULL, receives the routing of all T
 * tokens: indices / weights (T, K), scores / logits (T, E) where non-NULL, counts (E)
 * summed over the chunks (overwritten), n_dropped summed. On error in a later chunk
 * the message names the chunk's tokens (the router's token numbers are within it);
 * y is unspecified. dsmoe_moe_last_routing is the last chunk's afterwards. */
typedef struct dsmoe_moe_routing_out {
    int32_t *indices;   /* (T, K) or NULL */
    float *weights;     /* (T, K) or NULL */
    float *scores;      /* (T, E) or NULL */
    float *logits;      /* (T, E) or NULL */
    int64_t *counts;    /* (E) or NULL */
    int64_t n_dropped;  /* out */
} dsmoe_moe_routing_out;
DSMOE_API dsmoe_status dsmoe_moe_forward_chunked(dsmoe_moe *moe, float *y /* (T, D) */,
                                                 const float *x /* (T, D) */, int64_t T,
                                                 int n_threads, dsmoe_moe_routing_out *r);

/* ---------------------------------------------------------- checkpoints -- */
/* Fills cfg->hidden_size, expert_size and router.n_experts from the shapes of
 * <prefix>gate.weight (E, D) and <prefix>experts.0.gate_proj.weight (F, D). If
 * cfg->n_shared < 0 it is inferred from <prefix>shared_experts.gate_proj.weight
 * (N_s·F rows; 0 if absent), else checked against it. When dsmoe saved the layer
 * (dsmoe_moe_saved_config finds its config), cfg->router and cfg->capacity_factor
 * are replaced by the saved ones, whatever the caller set (FORMAT if the saved sizes
 * disagree with the tensors); otherwise they are left as the caller set them. The
 * caller's weight_dtype, weight_layout, train, max_tokens and n_threads are kept. A
 * dsmoe format version in __metadata__ newer than this library's is an error
 * (FORMAT, with a hint). NOT_FOUND / SHAPE_MISMATCH name the tensor; cfg is unchanged
 * on error. Only these three tensors are read: dsmoe_moe_check_safetensors checks
 * the rest before a layer is allocated. */
DSMOE_API dsmoe_status dsmoe_moe_config_from_safetensors(dsmoe_moe_config *cfg,
                                                         const dsmoe_safetensors *st,
                                                         const char *prefix);
/* The config dsmoe saved with the layer under `prefix` (__metadata__
 * "dsmoe.moe_config@<prefix>", or "dsmoe.moe_config" for an empty prefix and for
 * single-layer files written before per-prefix keys), parsed strictly and validated;
 * the runtime fields (train, max_tokens, n_threads, weight_layout) are the defaults.
 * NOT_FOUND if the file has none (e.g. a Hugging Face checkpoint); FORMAT naming the
 * key for a malformed or invalid one. */
DSMOE_API dsmoe_status dsmoe_moe_saved_config(const dsmoe_safetensors *st, const char *prefix,
                                              dsmoe_moe_config *out);
/* Checks, without a layer and without allocating, every tensor a layer of config cfg
 * reads from `st` under `prefix`: presence (NOT_FOUND), dtype F32/BF16/F16 (FORMAT),
 * shape (SHAPE_MISMATCH), all shapes before any value, then every value finite
 * (NON_FINITE naming the tensor and the element: a NaN or Inf weight would make every
 * output it touches NaN). The message names the tensor. */
DSMOE_API dsmoe_status dsmoe_moe_check_safetensors(const dsmoe_moe_config *cfg,
                                                   const dsmoe_safetensors *st,
                                                   const char *prefix);
/* Copies every tensor of the layer from `st` (names under `prefix`, which may be
 * NULL or ""). Accepted dtypes: F32, BF16, F16 (converted to the layer's storage;
 * F32 -> BF16 rounds to nearest even). The bias is required iff router.use_bias.
 * Everything is checked first (dsmoe_moe_check_safetensors: presence, dtype, shape,
 * finite weights and bias); on error the message names the tensor and the layer is
 * unchanged. Tensors of other names in the file are ignored. */
DSMOE_API dsmoe_status dsmoe_moe_load_safetensors(dsmoe_moe *moe, const dsmoe_safetensors *st,
                                                  const char *prefix);
/* One call: config from the file (dsmoe_moe_config_from_safetensors on a copy of
 * opts, or of dsmoe_moe_config_default with n_shared = -1 if opts is NULL), every
 * tensor checked (dsmoe_moe_check_safetensors) BEFORE the layer is allocated, then
 * create and load. prefix NULL: the file's only layer (dsmoe_moe_find_prefix).
 * *out is NULL on error; the message names the tensor, key or file. */
DSMOE_API dsmoe_status dsmoe_moe_load_from(const dsmoe_safetensors *st, const char *prefix,
                                           const dsmoe_moe_config *opts, dsmoe_moe **out);
DSMOE_API dsmoe_status dsmoe_moe_load(const char *path, const char *prefix,
                                      const dsmoe_moe_config *opts, dsmoe_moe **out);
/* MoE layers in a file: the prefixes P (empty or ending in '.') with both
 * P"gate.weight" and P"experts.0.gate_proj.weight", in header order. */
DSMOE_API int64_t dsmoe_moe_layer_count(const dsmoe_safetensors *st);
/* The i-th prefix into buf; INVALID_ARGUMENT if i is out of range or buf too small. */
DSMOE_API dsmoe_status dsmoe_moe_layer_prefix(const dsmoe_safetensors *st, int64_t i, char *buf,
                                              size_t size);
/* The prefix of the file's only layer; *n_found (may be NULL) is the layer count.
 * NOT_FOUND for none; INVALID_ARGUMENT for several (the message names two). */
DSMOE_API dsmoe_status dsmoe_moe_find_prefix(const dsmoe_safetensors *st, char *buf, size_t size,
                                             int64_t *n_found);
/* Adds the layer's tensors (storage dtype; the bias F32; checkpoint layout) under
 * `prefix` to `wr`, with __metadata__ "format": "pt", "dsmoe.format_version" and
 * the config key of the prefix (see "Files"). Call it for each layer of a model with
 * distinct prefixes, then dsmoe_safetensors_writer_save. The writer borrows the
 * layer's tensors: do not change or free the layer until the save. UNSUPPORTED for a
 * packed layer (its row-major copies would outlive the call: use dsmoe_moe_save). */
DSMOE_API dsmoe_status dsmoe_moe_write(const dsmoe_moe *moe, dsmoe_safetensors_writer *wr,
                                       const char *prefix);
/* dsmoe_moe_write of one layer into a new file at `path`, written atomically (any
 * layout: a packed layer goes through row-major copies). */
DSMOE_API dsmoe_status dsmoe_moe_save(const dsmoe_moe *moe, const char *path,
                                      const char *prefix);
/* One-line JSON of the layer config (router included); returns the length needed. */
DSMOE_API int dsmoe_moe_config_json(const dsmoe_moe_config *cfg, char *buf, size_t size);

#ifdef __cplusplus
}
#endif
#endif /* DSMOE_MOE_H */
