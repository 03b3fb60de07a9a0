/*
 * model_internal.h — declarations shared by the model layer's files; not installed.
 */
#ifndef DSMOE_MODEL_INTERNAL_H
#define DSMOE_MODEL_INTERNAL_H

#include "core/internal.h"
#include "io/json.h"
#include "kernels/wlinear.h"
#include "dsmoe/model.h"

#include <stddef.h>
#include <stdint.h>

/* Largest num_nextn_predict_layers accepted. */
#define DSMOE__MODEL_MAX_MTP 16

/* Dequantises an F8_E4M3 matrix w (rows, cols) bytes with block scales
 * scale_inv (ceil(rows / br), ceil(cols / bc)) into dst (rows, cols):
 * dst[i][j] = fp8(w[i][j]) · scale_inv[i / br][j / bc]. scale_inv may be unaligned
 * (read through memcpy). Returns the index of the first non-finite result, or -1. */
int64_t dsmoe__fp8_dequant(float *dst, const uint8_t *w, int64_t rows, int64_t cols,
                           const void *scale_inv, int32_t br, int32_t bc);

/* A table tensor's stored data as a product operand (files.c): F32, BF16, F16, or
 * F8E4M3 with its block scales; vectors come out as (n, 1). Valid while mf is open.
 * NOT_FOUND names an unknown tensor. */
dsmoe_status dsmoe__model_files_view(const dsmoe_model_files *mf, const char *name,
                                     dsmoe__wmat *out);

/* ------------------------------------------------ forward building blocks (blocks.c) */

/* 1 / sqrt(mean(x²) + eps) over n values, the sum of squares by dsmoe__dot16 (blocks.c):
 * every RMSNorm forward's scale (inference and training, the same bits). */
float dsmoe__rms_inv(const float *x, int32_t n, float eps);
/* y (T, n), row strides ldy / ldx = x · rsqrt(mean(x²) + eps) · w (n). y may equal x. */
void dsmoe__rmsnorm(float *y, const float *x, const float *w, int64_t T, int32_t n, int64_t ldx,
                    int64_t ldy, float eps);
/* RoPE frequencies f (r/2): θ^(−2i/r), YaRN-interpolated when the config says so. */
void dsmoe__rope_inv_freq(double *f, const dsmoe_model_config *c);
/* The attention score scale (n + r)^-1/2, times mscale² under YaRN. */
double dsmoe__attn_scale(const dsmoe_model_config *c);
/* cos / sin pairs (T, half, 2) of positions pos0 .. pos0 + T − 1. */
void dsmoe__rope_table(float *cs, const double *inv_freq, int32_t half, int64_t pos0, int64_t T);
/* Rotates the adjacent pairs of x (2·half values) by one position's cos / sin row. */
void dsmoe__rope_rotate(float *x, const float *cs, int32_t half);

/* One layer's attention weights (fp32, checkpoint layout [out, in]). */
typedef struct dsmoe__mla_weights {
    const float *q_proj;                        /* (H(n+r), D), when q_lora_rank == 0 */
    const float *q_a_proj, *q_a_norm, *q_b_proj; /* (q, D), (q), (H(n+r), q) otherwise */
    const float *kv_a_proj;                     /* (c + r, D) */
    const float *kv_a_norm;                     /* (c) */
    const float *kv_b_proj;                     /* (H(n+v), c) */
    const float *o_proj;                        /* (D, H v) */
} dsmoe__mla_weights;

/* Workspace bytes of dsmoe__mla_forward for T tokens. */
size_t dsmoe__mla_workspace_size(const dsmoe_model_config *c, int64_t T);
/* Naive multi-head latent attention of a prompt: y (T, D) from the normalised x (T, D),
 * positions 0 .. T − 1, causal. INVALID_ARGUMENT, WORKSPACE_TOO_SMALL. */
dsmoe_status dsmoe__mla_forward(const dsmoe_model_config *c, const dsmoe__mla_weights *w, float *y,
                                const float *x, int64_t T, void *workspace, size_t ws_size);
/* Dense SwiGLU y (T, D) = down(silu(gate x) ⊙ up x); gate, up (I, D), down (D, I);
 * scratch holds 2·T·I floats. */
void dsmoe__swiglu(float *y, const float *x, const float *gate, const float *up, const float *down,
                   int64_t T, int32_t D, int32_t I, float *scratch);

/* --------------------------------------------- attention over the cache (attention.c) */

/* One layer's attention for T queries at positions pos0 .. pos0 + T − 1 over the
 * cached positions 0 .. pos0 + T − 1 (causal). */
typedef struct dsmoe__attn_args {
    const dsmoe_model_config *c;
    const float *q;    /* (T, H, n + r): q_nope | q_pe, q_pe rotated */
    const float *kv;   /* (pos0 + T, c + r): the layer's cache rows, latent | rotated k_pe */
    const float *kv_b; /* (H (n + v), c) fp32: per head W_UK_h (n, c) then W_UV_h (v, c) */
    float *out;        /* (T, H v) */
    int64_t T, pos0;
    float scale;       /* dsmoe__attn_scale */
    int n_threads;
    float *scratch;    /* n_threads · per_thread floats */
    size_t per_thread; /* >= dsmoe__attn_scratch_floats(c, pos0 + T) */
} dsmoe__attn_args;

/* Floats of scratch one thread of either form needs for P positions (a multiple of 16). */
size_t dsmoe__attn_scratch_floats(const dsmoe_model_config *c, int64_t P);
/* The naive form: every cached latent expanded through kv_b_proj (threads over heads). */
void dsmoe__attn_naive(const dsmoe__attn_args *a);
/* The absorbed form: attention on the latents (threads over query × head). */
void dsmoe__attn_absorbed(const dsmoe__attn_args *a);

/* Skips one well-formed JSON value of any kind (numbers by the full RFC 8259 grammar,
 * which io/json.h's reader does not read). `key` names it in messages. */
dsmoe_status dsmoe__model_json_skip(dsmoe__json *j, const char *key);

/* ------------------------------------ MoE layers from stored weights (moe_views.c) */

/* A MoE layer as views of its stored matrices (any dtype wlinear reads). */
typedef struct dsmoe__moe_views {
    dsmoe__wmat gate;        /* (E, D) router weight */
    float *bias;             /* (E) correction bias, or NULL; not owned */
    dsmoe__wmat *experts;    /* (3E): expert e's gate, up, down at 3e, 3e + 1, 3e + 2 */
    dsmoe__wmat shared[3];   /* shared experts' gate, up, down (unused when N_s = 0) */
} dsmoe__moe_views;

/* Workspace bytes of dsmoe__moe_views_forward for up to T tokens on nt threads. */
size_t dsmoe__moe_views_workspace(const dsmoe_model_config *c, const dsmoe_router_config *rc,
                                  int64_t T, int nt);
/* y (T, D) = the MoE layer of x (T, D): routed experts (rc) plus shared experts. The
 * same bits for any nt. Errors: the router's (NON_FINITE logits), WORKSPACE_TOO_SMALL. */
dsmoe_status dsmoe__moe_views_forward(const dsmoe__moe_views *v, const dsmoe_model_config *c,
                                      const dsmoe_router_config *rc, float *y, const float *x,
                                      int64_t T, int nt, void *ws, size_t ws_size);

#endif /* DSMOE_MODEL_INTERNAL_H */
