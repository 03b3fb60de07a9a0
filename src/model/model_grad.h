/*
 * model_grad.h — the model's blocks for training: forward passes that save what their
 * backward needs, and the backward passes; not installed.
 *
 * A batch is B sequences of T tokens each, stored as N = B·T rows (sequence-major), at
 * positions 0 .. T − 1 in every sequence (no cache). Activations and parameters are fp32,
 * parameters in the checkpoint layout [out, in], row-major; the math is that of the
 * inference blocks (blocks.c) and of SPEC-model §1–§5.
 *
 * Conventions (llm.c's):
 *   - argument order: outputs, inputs, parameters, saved statistics, dimensions,
 *     workspace, threads;
 *   - gradients are named d…; every backward ACCUMULATES parameter gradients (dW += …),
 *     so the caller zeroes them once per step (and the gradients of a tied head and
 *     embedding may be one buffer); the input gradient dx is written when acc_dx == 0
 *     and added to when acc_dx == 1 (the residual stream: dh += block backward);
 *   - nothing is allocated: saved activations live in a caller buffer sized by the
 *     block's _save_size(), scratch in a workspace sized by _workspace_size();
 *   - n_threads <= 0 means the default (dsmoe_default_threads). Work is cut into blocks
 *     fixed by the sizes alone (never by the thread count) and each output element is
 *     computed by one block in a fixed order, so the results are the same bits for
 *     every thread count. No float atomics. Products go through kernels/blas.h
 *     (BLIS, one thread per call).
 *
 * Composing a training step (h the residual stream (N, D); tests/test_model_grad.c's
 * test_compose_layer does exactly this for one layer and checks it against fp64):
 *   forward:  h = embed_forward(tokens)
 *             per layer:  x1 = rmsnorm_train_forward(h) [inv1];  h += mla_train_forward(x1)
 *                         x2 = rmsnorm_train_forward(h) [inv2];  h += swiglu_train_forward(x2)
 *                                                                (or the MoE layer)
 *             x3 = rmsnorm_train_forward(h) [inv3];  loss = head_loss(x3)
 *   backward: dx3 from head_loss;  dh = rmsnorm_backward(dx3)            (acc_dx 0)
 *             per layer, last first:
 *                         dx2 = swiglu_train_backward(dh);  dh += rmsnorm_backward(dx2)
 *                         dx1 = mla_train_backward(dh);     dh += rmsnorm_backward(dx1)
 *             embed_backward(dE, dh)
 * Besides the blocks' saved buffers the caller keeps, per layer, each norm's input (the
 * stream h before the block: rmsnorm_backward's x) and output (x1, x2: the next block's
 * backward reads its input for the weight gradients), or recomputes them.
 */
#ifndef DSMOE_MODEL_GRAD_H
#define DSMOE_MODEL_GRAD_H

#include "model/model_internal.h"

#include <stddef.h>
#include <stdint.h>

/* Rows per block of the row-blocked products (the unit of work of the threads). */
#define DSMOE__GRAD_ROW_BLOCK 64
/* Floats of logits alive at once in dsmoe__head_loss (4 MiB): the rows of a chunk. */
#define DSMOE__LOSS_LOGITS (1 << 20)

/* ------------------------------------------------------------------ RMSNorm */

/* y (N, n) [ldy] = x (N, n) [ldx] · inv · w, inv = rsqrt(mean(x²) + eps) per row, saved
 * in inv_rms (N). The same arithmetic, bit for bit, as dsmoe__rmsnorm. y may equal x
 * only when the backward does not need x (it does: keep x). */
void dsmoe__rmsnorm_train_forward(float *y, float *inv_rms, const float *x, const float *w,
                                  int64_t N, int32_t n, int64_t ldx, int64_t ldy, float eps,
                                  int n_threads);
/* h (N, n) = a + b (rows of n, all three with row stride n), then y and inv_rms from h
 * as dsmoe__rmsnorm_train_forward (ldy = n): the residual add and the next norm in one
 * pass over the rows, the same bits as the two apart. y may not overlap a, b or h. */
void dsmoe__add_rmsnorm_train_forward(float *h, float *y, float *inv_rms, const float *a,
                                      const float *b, const float *w, int64_t N, int32_t n,
                                      float eps, int n_threads);
/* dx (N, n) [lddx] (= or += by acc_dx) and dw (n) += from dy (N, n) [lddy], the forward's
 * input x [ldx] and inv_rms (N):
 *   dx = inv · (w ⊙ dy − x · inv² · Σ(dy ⊙ w ⊙ x) / n),  dw += Σ_rows dy ⊙ x · inv.
 * dx must not overlap dy or x. dw may be NULL (no weight gradient). */
void dsmoe__rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                             const float *w, const float *inv_rms, int64_t N, int32_t n,
                             int64_t lddx, int64_t lddy, int64_t ldx, int acc_dx, int n_threads);

/* ------------------------------------------------------------------ linear */

/* y (N, out) [ldy] = x (N, in) [ldx] · Wᵀ, W (out, in). Blocks of DSMOE__GRAD_ROW_BLOCK
 * rows. */
void dsmoe__linear_forward(float *y, int64_t ldy, const float *x, int64_t ldx, const float *W,
                           int64_t N, int32_t in, int32_t out, int n_threads);
/* dx (N, in) [lddx] (= or += by acc_dx) = dy (N, out) [lddy] · W; dW (out, in) += dyᵀ · x.
 * dx or dW may be NULL (not wanted). dW's blocks are fixed tiles of (out, in), each
 * reducing over all N rows in one product. */
void dsmoe__linear_backward(float *dx, int64_t lddx, float *dW, const float *dy, int64_t lddy,
                            const float *x, int64_t ldx, const float *W, int64_t N, int32_t in,
                            int32_t out, int acc_dx, int n_threads);

/* ------------------------------------------------------------------ dense SwiGLU */

/* A dense MLP's parameters and their gradients: gate, up (I, D), down (D, I). */
typedef struct dsmoe__mlp_params {
    const float *gate, *up, *down;
} dsmoe__mlp_params;
typedef struct dsmoe__mlp_grads {
    float *gate, *up, *down;
} dsmoe__mlp_grads;

/* Saved bytes: the pre-activations g = gate x and u = up x and the product h = silu(g) ⊙ u
 * (the down projection's input, which the backward would otherwise recompute), 3·I floats
 * per row. */
size_t dsmoe__swiglu_save_size(int32_t I, int64_t N);
/* Workspace bytes of forward and backward (only the backward uses it): 2·N·I floats. */
size_t dsmoe__swiglu_workspace_size(int32_t I, int64_t N);
/* y (N, D) = down(silu(g) ⊙ u), silu(g) = g·σ(g) = g / (1 + e^−g). INVALID_ARGUMENT,
 * WORKSPACE_TOO_SMALL (save or workspace). */
dsmoe_status dsmoe__swiglu_train_forward(float *y, const float *x, const dsmoe__mlp_params *p,
                                         int64_t N, int32_t D, int32_t I, void *save,
                                         size_t save_size, void *ws, size_t ws_size,
                                         int n_threads);
/* dx (N, D) (= or +=), grads += from dy (N, D), the forward's x and save:
 *   dh = dy · down;  d_down += dyᵀ · (silu(g) ⊙ u);
 *   dg = dh ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))),  du = dh ⊙ silu(g);
 *   dx = dg · gate + du · up;  d_gate += dgᵀ x,  d_up += duᵀ x. */
dsmoe_status dsmoe__swiglu_train_backward(float *dx, const dsmoe__mlp_grads *g, const float *dy,
                                          const float *x, const dsmoe__mlp_params *p, int64_t N,
                                          int32_t D, int32_t I, const void *save,
                                          size_t save_size, void *ws, size_t ws_size, int acc_dx,
                                          int n_threads);

/* ------------------------------------------------------------------ MLA */

/* One layer's attention gradients, the layout of dsmoe__mla_weights: q_proj when
 * q_lora_rank == 0, else q_a_proj, q_a_norm, q_b_proj; the others always. */
typedef struct dsmoe__mla_grads {
    float *q_proj;                        /* (H(n+r), D) */
    float *q_a_proj, *q_a_norm, *q_b_proj; /* (q, D), (q), (H(n+r), q) */
    float *kv_a_proj;                     /* (c + r, D) */
    float *kv_a_norm;                     /* (c) */
    float *kv_b_proj;                     /* (H(n+v), c) */
    float *o_proj;                        /* (D, H v) */
} dsmoe__mla_grads;

/* Saved bytes of the training forward for B sequences of T tokens. Per token, in floats:
 *   q_lora_rank > 0: the q_a output before its norm (q) and its inverse rms (1);
 *   the queries after RoPE, H(n + r);
 *   kv_a's output with the latent before its norm and k_pe after RoPE (c + r), and the
 *   latent's inverse rms (1);
 *   kv_b's output [k_nope | value] per head, H(n + v);
 *   the attention output before o_proj, H v; the log-sum-exp of each head's scores, H;
 * and per (sequence, head) the attention probabilities of the causal blocks of 64 query
 * rows: the block from query i0 keeps (rows, i0 + rows), Σ over the blocks (T² + 64·T)/2
 * floats when 64 divides T. In all 4 · (H(2n + r + 2v + 1) + c + r + 1 + (q > 0 ? q + 1
 * : 0)) bytes per token plus the probabilities (each array rounded up to 64 bytes). The
 * backward reads the probabilities instead of recomputing the scores and their softmax
 * (which took a tenth of its time); the log-sum-exp is kept for callers. The input x is
 * not saved: the backward takes it as an argument. */
size_t dsmoe__mla_save_size(const dsmoe_model_config *c, int64_t B, int64_t T);
/* Workspace bytes of the training forward and backward (the larger of the two): the
 * backward's (B·T) × (H(2n + 2r + 2v) + 2c + r + 2q) floats, the RoPE table, and for each
 * (sequence, head) a block of min(T, 64) × T floats (the gradient of a block of query
 * rows' probabilities) and two of T × (n + r) (its keys [k_nope | k_pe] side by side and
 * their gradient): B·H·(64 + 2(n + r))·T floats, linear in T. */
size_t dsmoe__mla_train_workspace_size(const dsmoe_model_config *c, int64_t B, int64_t T);
/* y (B·T, D) = naive MLA of x (B·T, D), each sequence causal at positions 0 .. T − 1,
 * as dsmoe__mla_forward (softmax in fp32; products through BLAS, so equal to it up to
 * fp32 rounding), saving what the backward needs in save. Threads over fixed row
 * blocks for the projections and over (sequence, head) for the attention, which takes
 * the queries 64 rows at a time against the keys up to the block's last row (scores,
 * probabilities · values and the backward's products through BLAS; the masked upper
 * part of a block's diagonal square is computed and discarded).
 * INVALID_ARGUMENT (NULL, bad sizes, missing weights, T above
 * max_position_embeddings), WORKSPACE_TOO_SMALL. */
dsmoe_status dsmoe__mla_train_forward(const dsmoe_model_config *c, const dsmoe__mla_weights *w,
                                      float *y, const float *x, int64_t B, int64_t T, void *save,
                                      size_t save_size, void *ws, size_t ws_size, int n_threads);
/* dx (B·T, D) (= or += by acc_dx) and every gradient of g (+=) from dy (B·T, D), the
 * forward's input x and save:
 *   dout = dy · o_proj;  d o_proj += dyᵀ · out
 *   per (sequence, head), j <= i: p = softmax_j(scale · s_ij) as the forward had it,
 *     dp = dout_i · v_j,
 *     D_i = dout_i · out_i, ds = p (dp − D_i) · scale;
 *     dq_i += ds k_j,  dk_j += ds q_i,  dv_j += p dout_i
 *     (k_pe is shared by the heads: each head's part is kept apart and summed in head
 *     order afterwards, so that the sum does not depend on the threads)
 *   RoPE backward: the pairs rotated back, (dx0, dx1) = (c dy0 + s dy1, −s dy0 + c dy1)
 *   then kv_b, kv_a_layernorm, kv_a_proj_with_mqa and q_b, q_a_layernorm, q_a_proj (or
 *   q_proj) through dsmoe__linear_backward / dsmoe__rmsnorm_backward.
 * Errors as the forward; INVALID_ARGUMENT for a missing gradient. */
dsmoe_status dsmoe__mla_train_backward(const dsmoe_model_config *c, const dsmoe__mla_weights *w,
                                       const dsmoe__mla_grads *g, float *dx, const float *dy,
                                       const float *x, int64_t B, int64_t T, const void *save,
                                       size_t save_size, void *ws, size_t ws_size, int acc_dx,
                                       int n_threads);

/* ------------------------------------------------------------------ embedding, head, loss */

/* h (N, D) = E (V, D) rows tokens (N). INVALID_ARGUMENT naming the first token outside
 * 0 .. V − 1 (its position and value); nothing is written then. */
dsmoe_status dsmoe__embed_forward(float *h, const float *E, const int32_t *tokens, int64_t N,
                                  int32_t D, int32_t V, int n_threads);
/* dE (V, D) += the rows of dh (N, D) scattered to tokens (N), in token-position order for
 * every element (threads over fixed blocks of D's columns), so a row hit by several
 * positions gets the same sum for any thread count. The tokens must be valid (as
 * dsmoe__embed_forward checked them). */
void dsmoe__embed_backward(float *dE, const float *dh, const int32_t *tokens, int64_t N, int32_t D,
                           int n_threads);

/* Workspace bytes of dsmoe__head_loss: the logits of a chunk of rows and their losses.
 * A chunk is min(N, R) rows, R the multiple of 64 rows at or below DSMOE__LOSS_LOGITS / V
 * (at least 64): 4 MiB of logits at most for V up to 16384, 64 × V floats above. */
size_t dsmoe__head_loss_workspace_size(int32_t V, int64_t N);
/* The head and the cross-entropy loss of the rows of x (N, D) (the final norm's output):
 *   logits = x · Wᵀ, W (V, D);  ℓ_t = logsumexp(logits_t) − logits_t[targets[t]];
 *   *loss = (1 / n) Σ ℓ_t over the n rows whose target is not ignore_id (0 when n = 0),
 *   *n_targets = n (either may be NULL).
 * With dx or dW non-NULL, also the gradients of weight · *loss (weight: an MTP depth's
 * λ / D, or 1): with g = (softmax(logits_t) − onehot(targets[t])) · weight / n (0 for
 * ignored rows), dx (N, D) (= or += by acc_dx) = g · W, dW (V, D) += gᵀ · x.
 * The logits exist a chunk of rows at a time (above); chunks run in order (dW sums them
 * in that order), and inside a chunk the threads share fixed blocks of 64 rows (logits,
 * loss, dx) or of 64 rows of W (dW). Softmax: the kernels' vectorised softmax (fp32,
 * kernels.h), lse = max − log p[argmax] and the loss in double.
 * INVALID_ARGUMENT naming the first target outside 0 .. V − 1 that is not ignore_id
 * (nothing is written then), NULL arguments; WORKSPACE_TOO_SMALL. */
dsmoe_status dsmoe__head_loss(double *loss, int64_t *n_targets, float *dx, float *dW,
                              const float *x, const float *W, const int32_t *targets,
                              int32_t ignore_id, float weight, int64_t N, int32_t D, int32_t V,
                              void *ws, size_t ws_size, int acc_dx, int n_threads);
/* dsmoe__head_loss split at the logits, for a training step whose backward follows its
 * forward: _save computes *loss (may be NULL) and G (N, V) = the logits' gradient g above
 * (weight as there), the forward's half; _grad then makes dx (= or += by acc_dx) = G · W and
 * dW += Gᵀ · x from it without computing the logits again. Together they give exactly the
 * bits of dsmoe__head_loss with gradients (the same chunks, blocks and products). The
 * errors of dsmoe__head_loss. */
dsmoe_status dsmoe__head_loss_save(double *loss, float *G, const float *x, const float *W,
                                   const int32_t *targets, int32_t ignore_id, float weight,
                                   int64_t N, int32_t D, int32_t V, void *ws, size_t ws_size,
                                   int n_threads);
dsmoe_status dsmoe__head_loss_grad(float *dx, float *dW, const float *G, const float *x,
                                   const float *W, int64_t N, int32_t D, int32_t V, int acc_dx,
                                   int n_threads);

#endif /* DSMOE_MODEL_GRAD_H */
