/*
 * grad_loss.c — the ends of the model for training: the token embedding (gather and its
 * scatter-add backward) and the head with the cross-entropy loss, its logits computed a
 * chunk of rows at a time (model_grad.h has the formulas).
 */
#include "model/model_grad.h"

#include "kernels/blas.h"
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

/* Columns of dE per block of the embedding backward; rows per block of the head's logits
 * and dx; rows of the head's weight gradient per block. */
#define EMBED_COL_BLOCK 64
/* Rows of a chunk of logits come in multiples of HEAD_CHUNK_ROWS; a chunk's rows go to the
 * threads in blocks of HEAD_ROW_BLOCK. Each block's logits product transposes the head's
 * weights once (BLIS packed them once), so the blocks are as large as two threads allow:
 * 64 -> 128 took about 0.6 ms off a default step, 128 -> 256 the head's forward 2.28 ->
 * 2.19 ms and its backward 3.05 -> 2.94 (4 of 4 alternating pairs). A row's loss and
 * gradient do not depend on the block that holds it. */
#define HEAD_CHUNK_ROWS 64
#define HEAD_ROW_BLOCK 256
#define HEAD_W_BLOCK 128

/* ------------------------------------------------------------------ embedding */

dsmoe_status dsmoe__embed_forward(float *h, const float *E, const int32_t *tokens, int64_t N,
                                  int32_t D, int32_t V, int n_threads) {
    if (!h || !E || !tokens || N < 0 || D < 1 || V < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "embedding: NULL argument or N < 0, D < 1, V < 1");
    for (int64_t t = 0; t < N; t++)
        if (tokens[t] < 0 || tokens[t] >= V)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "embedding: token %d at position %lld is outside the "
                                "vocabulary 0 .. %d",
                                (int)tokens[t], (long long)t, (int)V - 1);
    const int nt = dsmoe__threads(n_threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && N > 256)
    for (int64_t t = 0; t < N; t++)
        memcpy(h + t * D, E + (int64_t)tokens[t] * D, (size_t)D * sizeof(float));
    return DSMOE_OK;
}

void dsmoe__embed_backward(float *dE, const float *dh, const int32_t *tokens, int64_t N, int32_t D,
                           int n_threads) {
    const int nt = dsmoe__threads(n_threads);
    const int64_t nb = (D + EMBED_COL_BLOCK - 1) / EMBED_COL_BLOCK;
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nb > 1)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t i0 = b * EMBED_COL_BLOCK, i1 = i0 + EMBED_COL_BLOCK < D ? i0 + EMBED_COL_BLOCK : D;
        for (int64_t t = 0; t < N; t++) {
            float *row = dE + (int64_t)tokens[t] * D;
            const float *g = dh + t * D;
            for (int64_t i = i0; i < i1; i++) row[i] += g[i];
        }
    }
}

/* ------------------------------------------------------------------ head and loss */

/* Rows of logits alive at once: DSMOE__LOSS_LOGITS floats, in whole multiples of
 * HEAD_CHUNK_ROWS rows (at least one), at most N. */
static int64_t chunk_rows(int64_t N, int32_t V) {
    int64_t r = DSMOE__LOSS_LOGITS / (V > 0 ? V : 1) / HEAD_CHUNK_ROWS * HEAD_CHUNK_ROWS;
    if (r < HEAD_CHUNK_ROWS) r = HEAD_CHUNK_ROWS;
    return N < r ? N : r;
}

/* The first position of the largest of l[0..V) (finite values): the maximum over 16
 * running lanes (exact in any order), then the first position holding it. One compare
 * chain over V took longer than the row's softmax. */
static int32_t first_argmax(const float *l, int32_t V) {
    float m16[16];
    for (int j = 0; j < 16; j++) m16[j] = l[0];
    int32_t k = 0;
    for (; k + 16 <= V; k += 16)
        for (int j = 0; j < 16; j++) m16[j] = l[k + j] > m16[j] ? l[k + j] : m16[j];
    float mx = m16[0];
    for (int j = 1; j < 16; j++) mx = m16[j] > mx ? m16[j] : mx;
    for (; k < V; k++) mx = l[k] > mx ? l[k] : mx;
    int32_t am = 0;
    while (am < V - 1 && !(l[am] == mx)) am++;
    return am;
}

size_t dsmoe__head_loss_workspace_size(int32_t V, int64_t N) {
    if (V < 1 || N < 0) return 0;
    const int64_t R = chunk_rows(N, V);
    return dsmoe__align64((size_t)R * (size_t)V * sizeof(float)) +
           dsmoe__align64((size_t)R * sizeof(double));
}

/* The targets' check and count (the rows whose target is not ignore_id). */
static dsmoe_status head_targets(const int32_t *targets, int32_t ignore_id, int64_t N, int32_t V,
                                 int64_t *n_out) {
    int64_t n = 0;
    for (int64_t t = 0; t < N; t++) {
        if (targets[t] == ignore_id) continue;
        if (targets[t] < 0 || targets[t] >= V)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "head loss: target %d at position %lld is outside the vocabulary "
                                "0 .. %d and is not the ignored id %d",
                                (int)targets[t], (long long)t, (int)V - 1, (int)ignore_id);
        n++;
    }
    *n_out = n;
    return DSMOE_OK;
}

/* Rows [i0, i0 + rb) of a chunk: their logits L (ld V) = x · Wᵀ, each row's loss into rl and,
 * with want_grad, the logits' gradient in place: (softmax − onehot) · g_scale (0 for
 * ignored rows). */
static void head_rows(float *L, double *rl, const float *xc, const float *W, const int32_t *tg_c,
                      int32_t ignore_id, float g_scale, int want_grad, int64_t i0, int rb, int32_t D,
                      int32_t V) {
    const dsmoe__kernel_table *kt = dsmoe__kernels();
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, rb, V, D, 1.0f, xc + i0 * D, D, W, D, 0.0f, L + i0 * V,
                 V);
    for (int64_t i = i0; i < i0 + rb; i++) {
        float *l = L + i * V;
        const int32_t tg = tg_c[i];
        if (tg == ignore_id) {
            rl[i] = 0.0;
            if (want_grad) memset(l, 0, (size_t)V * sizeof(float));
            continue;
        }
        /* p = softmax(l) in place (the vectorised kernel); the largest logit's
         * p is 1 / Σ exp(l − max), so lse = max − log p[argmax] */
        int32_t am = first_argmax(l, V);
        const double mx = (double)l[am], lt = (double)l[tg];
        kt->softmax(l, l, V);
        rl[i] = mx - log((double)l[am]) - lt;
        if (want_grad) {
            for (int32_t k = 0; k < V; k++) l[k] *= g_scale;
            l[tg] -= g_scale;
        }
    }
}

/* dx rows [i0, i0 + rb) of a chunk (= or += by acc_dx) = G · W. */
static void head_dx(float *dxc, const float *G, const float *W, int64_t i0, int rb, int32_t D,
                    int32_t V, int acc_dx) {
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__NOTRANS, rb, D, V, 1.0f, G + i0 * V, V, W, D,
                 acc_dx ? 1.0f : 0.0f, dxc + i0 * D, D);
}

/* dW (V, D) += Gᵀ · x over a chunk's rows, in blocks of W's rows. */
static void head_dw(float *dW, const float *G, const float *xc, int64_t rows, int32_t D, int32_t V,
                    int nt) {
    const int64_t nwb = (V + HEAD_W_BLOCK - 1) / HEAD_W_BLOCK;
    (void)nt;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && nwb > 1)
    for (int64_t b = 0; b < nwb; b++) {
        const int64_t v0 = b * HEAD_W_BLOCK;
        const int vb = (int)(V - v0 < HEAD_W_BLOCK ? V - v0 : HEAD_W_BLOCK);
        dsmoe__sgemm(DSMOE__TRANS, DSMOE__NOTRANS, vb, D, (int)rows, 1.0f, G + v0, V, xc, D, 1.0f,
                     dW + v0 * D, D);
    }
}

/* dsmoe__head_loss, and with G the chunks' logits' gradients kept there (N, V) instead of
 * in the workspace (dsmoe__head_loss_save). */
static dsmoe_status head_loss_run(double *loss, int64_t *n_targets, float *dx, float *dW, float *G,
                                  const float *x, const float *W, const int32_t *targets,
                                  int32_t ignore_id, float weight, int64_t N, int32_t D, int32_t V,
                                  void *ws, size_t ws_size, int acc_dx, int n_threads) {
    if (!x || !W || !targets || N < 0 || D < 1 || V < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "head loss: NULL argument or N < 0, D < 1, V < 1");
    const size_t need = dsmoe__head_loss_workspace_size(V, N);
    if (!ws || ws_size < need)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "head loss: workspace of %zu bytes, need %zu for V = %d", ws ? ws_size : 0,
                            need, (int)V);
    int64_t n = 0;
    dsmoe_status st = head_targets(targets, ignore_id, N, V, &n);
    if (st != DSMOE_OK) return st;
    const int nt = dsmoe__threads(n_threads);
    const int want_grad = dx || dW || G;
    const int64_t R = chunk_rows(N, V);
    double *rl = (double *)(void *)((char *)ws + dsmoe__align64((size_t)R * (size_t)V * sizeof(float)));
    const float g_scale = n > 0 ? (float)((double)weight / (double)n) : 0.0f;
    double total = 0.0;
    (void)nt;
    for (int64_t r0 = 0; r0 < N; r0 += R) {
        const int64_t rows = N - r0 < R ? N - r0 : R;
        const float *xc = x + r0 * D;
        float *L = G ? G + r0 * V : (float *)ws;
        /* Per block of rows: the logits (one product over all of V), the loss of each row
         * and, in place, the logits' gradient, then that block's dx = g · W. */
        const int64_t nrb = (rows + HEAD_ROW_BLOCK - 1) / HEAD_ROW_BLOCK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && nrb > 1)
        for (int64_t b = 0; b < nrb; b++) {
            const int64_t i0 = b * HEAD_ROW_BLOCK;
            const int rb = (int)(rows - i0 < HEAD_ROW_BLOCK ? rows - i0 : HEAD_ROW_BLOCK);
            head_rows(L, rl, xc, W, targets + r0, ignore_id, g_scale, want_grad, i0, rb, D, V);
            if (dx) head_dx(dx + r0 * D, L, W, i0, rb, D, V, acc_dx);
        }
        for (int64_t i = 0; i < rows; i++) total += rl[i];
        if (dW) head_dw(dW, L, xc, rows, D, V, nt);
    }
    if (loss) *loss = n > 0 ? total / (double)n : 0.0;
    if (n_targets) *n_targets = n;
    return DSMOE_OK;
}

dsmoe_status dsmoe__head_loss(double *loss, int64_t *n_targets, float *dx, float *dW,
                              const float *x, const float *W, const int32_t *targets,
                              int32_t ignore_id, float weight, int64_t N, int32_t D, int32_t V,
                              void *ws, size_t ws_size, int acc_dx, int n_threads) {
    return head_loss_run(loss, n_targets, dx, dW, NULL, x, W, targets, ignore_id, weight, N, D, V,
                         ws, ws_size, acc_dx, n_threads);
}

dsmoe_status dsmoe__head_loss_save(double *loss, float *G, const float *x, const float *W,
                                   const int32_t *targets, int32_t ignore_id, float weight,
                                   int64_t N, int32_t D, int32_t V, void *ws, size_t ws_size,
                                   int n_threads) {
    if (!G)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "head loss: NULL gradient buffer");
    return head_loss_run(loss, NULL, NULL, NULL, G, x, W, targets, ignore_id, weight, N, D, V, ws,
                         ws_size, 0, n_threads);
}

dsmoe_status dsmoe__head_loss_grad(float *dx, float *dW, const float *G, const float *x,
                                   const float *W, int64_t N, int32_t D, int32_t V, int acc_dx,
                                   int n_threads) {
    if (!G || !x || !W || N < 0 || D < 1 || V < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "head loss gradient: NULL argument or N < 0, D < 1, V < 1");
    const int nt = dsmoe__threads(n_threads);
    const int64_t R = chunk_rows(N, V);
    (void)nt;
    for (int64_t r0 = 0; r0 < N; r0 += R) {
        const int64_t rows = N - r0 < R ? N - r0 : R;
        const float *Gc = G + r0 * V;
        if (dx) {
            const int64_t nrb = (rows + HEAD_ROW_BLOCK - 1) / HEAD_ROW_BLOCK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && nrb > 1)
            for (int64_t b = 0; b < nrb; b++) {
                const int64_t i0 = b * HEAD_ROW_BLOCK;
                const int rb = (int)(rows - i0 < HEAD_ROW_BLOCK ? rows - i0 : HEAD_ROW_BLOCK);
                head_dx(dx + r0 * D, Gc, W, i0, rb, D, V, acc_dx);
            }
        }
        if (dW) head_dw(dW, Gc, x + r0 * D, rows, D, V, nt);
    }
    return DSMOE_OK;
}
