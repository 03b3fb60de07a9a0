/*
 * grad.c — training forward and backward of the model's elementwise and dense blocks:
 * RMSNorm, linear layers, the dense SwiGLU MLP (model_grad.h has the formulas and the
 * conventions). Attention is in grad_mla.c, embedding and the loss in grad_loss.c.
 *
 * Threads: every parallel loop runs over blocks fixed by the sizes (rows, columns or
 * tiles of a weight gradient), and each output element is computed inside one block in
 * a fixed order, so the bits do not depend on the thread count.
 */
#include "model/model_grad.h"

#include "kernels/blas.h"
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

/* Smallest cut of a weight gradient's larger dimension (it is cut in about 4 tiles): at
 * 256, MLA's projections (256 x 128 .. 256 x 256) made one tile each and ran on one
 * thread. A tile's elements are the same chains over the tokens whatever the cut. */
#define GRAD_COL_BLOCK 64

static int64_t nblocks(int64_t n, int64_t b) { return (n + b - 1) / b; }

/* The piece a product's dimension n is cut into for the threads: about a quarter of n,
 * a multiple of 16, at least min_piece (and n when n is smaller). BLIS packs each operand
 * once per call, so the pieces are as large as two to four threads allow: 64-row pieces
 * ran the default preset's products at a third to a half of BLIS's speed on whole ones.
 * Fixed by the sizes alone; each output element is one BLIS dot product over the full
 * inner dimension whatever piece holds it. */
static int64_t piece(int64_t n, int64_t min_piece) {
    int64_t p = ((n + 3) / 4 + 15) / 16 * 16;
    if (p < min_piece) p = min_piece;
    return p < n ? p : n;
}

/* Row task k of a product over n rows cut for the threads, largest first: pieces of a
 * quarter of n (piece()), two of them, then two of half that, and so on down to
 * min_piece rows, the rest in pieces of min_piece. The first tasks are large (few
 * packings of the weights, the products' best speed); the last are small, so that
 * the threads end close together (with four equal pieces, one thread waited for the
 * other's last piece at the end of every product). *r0 and the return value: its first
 * row and its rows; 0 past the last task. Fixed by n alone; each output row is the same
 * chains whatever piece holds it. */
static int64_t row_task(int64_t n, int64_t min_piece, int64_t k, int64_t *r0) {
    int64_t p = piece(n, min_piece), at = 0;
    for (int64_t i = 0; at < n; i++) {
        if (i >= 2 && (i & 1) == 0 && p / 2 >= min_piece) p = (p / 2 + 15) / 16 * 16;
        const int64_t rows = n - at < p ? n - at : p;
        if (i == k) {
            *r0 = at;
            return rows;
        }
        at += rows;
    }
    return 0;
}

static int64_t row_tasks(int64_t n, int64_t min_piece) {
    int64_t k = 0, r0;
    while (row_task(n, min_piece, k, &r0) > 0) k++;
    return k;
}

/* Element-wise passes run over fixed chunks of this many elements. */
#define EW_CHUNK 16384

/* Work below which a pass stays on the calling thread: starting and joining a parallel
 * region costs about as much as this (a futex wake with OMP_WAIT_POLICY passive), so at
 * the tiny sizes more threads only add time. Rows and blocks are the same either way:
 * the bits never depend on it. Elements of a row-wise pass; multiply-adds of a product. */
#define PAR_MIN_ELEMS 65536
#define PAR_MIN_MACS (1 << 22)
#define PAR_ROWS(N, n) ((N) > 1 && (N) * (n) >= PAR_MIN_ELEMS)

/* ------------------------------------------------------------------ RMSNorm */

void dsmoe__rmsnorm_train_forward(float *y, float *inv_rms, const float *x, const float *w,
                                  int64_t N, int32_t n, int64_t ldx, int64_t ldy, float eps,
                                  int n_threads) {
    const int nt = dsmoe__threads(n_threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && PAR_ROWS(N, n))
    for (int64_t t = 0; t < N; t++) {
        const float *xr = x + t * ldx;
        float *yr = y + t * ldy;
        const float inv = dsmoe__rms_inv(xr, n, eps);
        inv_rms[t] = inv;
        for (int32_t i = 0; i < n; i++) yr[i] = xr[i] * inv * w[i];
    }
}

void dsmoe__add_rmsnorm_train_forward(float *h, float *y, float *inv_rms, const float *a,
                                      const float *b, const float *w, int64_t N, int32_t n,
                                      float eps, int n_threads) {
    const int nt = dsmoe__threads(n_threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && PAR_ROWS(N, n))
    for (int64_t t = 0; t < N; t++) {
        const float *ar = a + t * n, *br = b + t * n;
        float *hr = h + t * n, *yr = y + t * n;
        for (int32_t i = 0; i < n; i++) hr[i] = ar[i] + br[i];
        const float inv = dsmoe__rms_inv(hr, n, eps);
        inv_rms[t] = inv;
        for (int32_t i = 0; i < n; i++) yr[i] = hr[i] * inv * w[i];
    }
}

/* Σ g_i·w_i·x_i in 16 running sums (lane i mod 16), then halved pairwise: independent
 * chains the compiler vectorises, where one chain of n dependent adds took a quarter of
 * the norms' backward. */
static inline __attribute__((always_inline)) float dot3_lanes(const float *g, const float *w,
                                                           const float *x, int32_t n) {
    float acc[16] = {0};
    int32_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += g[i + l] * w[i + l] * x[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += g[i] * w[i] * x[i];
    for (int h = 8; h >= 1; h >>= 1)
        for (int l = 0; l < h; l++) acc[l] += acc[l + h];
    return acc[0];
}

/* One row of the norm's dx (vectorised for the CPU at hand: the same operations). */
DSMOE__CLONES static void rms_dx_row(float *dr, const float *gr, const float *xr, const float *w,
                                   float inv, int32_t n, int acc_dx) {
    const float k = inv * inv * dot3_lanes(gr, w, xr, n) / (float)n;
    for (int32_t i = 0; i < n; i++) {
        float d = inv * (w[i] * gr[i] - xr[i] * k);
        dr[i] = acc_dx ? dr[i] + d : d;
    }
}

/* dw's columns [i0, i1) (at most DSMOE__GRAD_ROW_BLOCK) over all rows, in row order. */
DSMOE__CLONES static void rms_dw_block(float *dw, const float *dy, const float *x,
                                     const float *inv_rms, int64_t N, int64_t lddy, int64_t ldx,
                                     int64_t i0, int64_t i1) {
    float acc[DSMOE__GRAD_ROW_BLOCK] = {0};
    for (int64_t t = 0; t < N; t++) {
        const float *xr = x + t * ldx, *gr = dy + t * lddy;
        const float inv = inv_rms[t];
        for (int64_t i = i0; i < i1; i++) acc[i - i0] += gr[i] * xr[i] * inv;
    }
    for (int64_t i = i0; i < i1; i++) dw[i] += acc[i - i0];
}

void dsmoe__rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                             const float *w, const float *inv_rms, int64_t N, int32_t n,
                             int64_t lddx, int64_t lddy, int64_t ldx, int acc_dx, int n_threads) {
    const int nt = dsmoe__threads(n_threads);
    const int64_t nb = dw ? nblocks(n, DSMOE__GRAD_ROW_BLOCK) : 0;
    (void)nt;
    /* One parallel region: dx by rows, then dw by column blocks (rows in order inside
     * each); the two loops write different arrays, so no barrier between them. */
#pragma omp parallel num_threads(nt) if (nt > 1 && ((dx && PAR_ROWS(N, n)) || nb > 1))
    {
        if (dx) {
#pragma omp for schedule(static) nowait
            for (int64_t t = 0; t < N; t++)
                rms_dx_row(dx + t * lddx, dy + t * lddy, x + t * ldx, w, inv_rms[t], n, acc_dx);
        }
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < nb; b++) {
            const int64_t i0 = b * DSMOE__GRAD_ROW_BLOCK;
            const int64_t i1 = i0 + DSMOE__GRAD_ROW_BLOCK < n ? i0 + DSMOE__GRAD_ROW_BLOCK : n;
            rms_dw_block(dw, dy, x, inv_rms, N, lddy, ldx, i0, i1);
        }
    }
}

/* ------------------------------------------------------------------ linear */

void dsmoe__linear_forward(float *y, int64_t ldy, const float *x, int64_t ldx, const float *W,
                           int64_t N, int32_t in, int32_t out, int n_threads) {
    if (N <= 0 || out <= 0) return;
    if (in <= 0) {
        for (int64_t t = 0; t < N; t++) memset(y + t * ldy, 0, (size_t)out * sizeof(float));
        return;
    }
    const int nt = dsmoe__threads(n_threads);
    const int64_t nb = row_tasks(N, DSMOE__GRAD_ROW_BLOCK);
    const int par = nt > 1 && nb > 1 && (double)N * in * out >= PAR_MIN_MACS;
    (void)nt, (void)par;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (par)
    for (int64_t b = 0; b < nb; b++) {
        int64_t r0 = 0;
        const int rows = (int)row_task(N, DSMOE__GRAD_ROW_BLOCK, b, &r0);
        dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, rows, out, in, 1.0f, x + r0 * ldx, (int)ldx, W,
                     in, 0.0f, y + r0 * ldy, (int)ldy);
    }
}

void dsmoe__linear_backward(float *dx, int64_t lddx, float *dW, const float *dy, int64_t lddy,
                            const float *x, int64_t ldx, const float *W, int64_t N, int32_t in,
                            int32_t out, int acc_dx, int n_threads) {
    if (N <= 0 || in <= 0) return;
    const int nt = dsmoe__threads(n_threads);
    const int big = (double)N * in * out >= PAR_MIN_MACS;
    (void)nt, (void)big;
    if (dx && out <= 0 && !acc_dx)
        for (int64_t t = 0; t < N; t++) memset(dx + t * lddx, 0, (size_t)in * sizeof(float));
    if (out <= 0) return;
    /* One parallel loop over dW's tiles, then dx's row blocks (independent work: each
     * task writes its own part of dW or dx). dW: the larger of the two dimensions is cut,
     * the other kept whole; but dW's rows (the product's M) are not cut below 128 while its
     * columns can be cut instead: MLA's kv_b and o_proj (256 x 128) in pieces of 64 rows ran
     * at 150 GFLOP/s (B's panel is copied from 65 rows on, see sgemm_small.c), in two of
     * 64 columns at 177, MLA's backward 0.4 ms a default step faster. */
    const int64_t ndx = dx ? row_tasks(N, DSMOE__GRAD_ROW_BLOCK) : 0;
    const int cut_out = out >= in && (piece(out, GRAD_COL_BLOCK) >= 128 || in < 2 * GRAD_COL_BLOCK);
    const int64_t po = cut_out ? piece(out, GRAD_COL_BLOCK) : out;
    const int64_t pi = cut_out ? in : piece(in, GRAD_COL_BLOCK);
    const int64_t nbo = nblocks(out, po), nbi = nblocks(in, pi), ndw = dW ? nbo * nbi : 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && ndw + ndx > 1 && big)
    for (int64_t k = 0; k < ndw + ndx; k++) {
        if (k < ndw) {
            const int64_t o0 = (k / nbi) * po, i0 = (k % nbi) * pi;
            const int orows = (int)(out - o0 < po ? out - o0 : po);
            const int icols = (int)(in - i0 < pi ? in - i0 : pi);
            dsmoe__sgemm(DSMOE__TRANS, DSMOE__NOTRANS, orows, icols, (int)N, 1.0f, dy + o0,
                         (int)lddy, x + i0, (int)ldx, 1.0f, dW + o0 * in + i0, in);
        } else {
            int64_t r0 = 0;
            const int rows = (int)row_task(N, DSMOE__GRAD_ROW_BLOCK, k - ndw, &r0);
            dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__NOTRANS, rows, in, out, 1.0f, dy + r0 * lddy,
                         (int)lddy, W, in, acc_dx ? 1.0f : 0.0f, dx + r0 * lddx, (int)lddx);
        }
    }
}

/* ------------------------------------------------------------------ dense SwiGLU */

size_t dsmoe__swiglu_save_size(int32_t I, int64_t N) {
    if (I < 0 || N < 0) return 0;
    return dsmoe__align64((size_t)N * (size_t)I * sizeof(float)) * 3;
}

size_t dsmoe__swiglu_workspace_size(int32_t I, int64_t N) {
    if (I < 0 || N < 0) return 0;
    return dsmoe__align64((size_t)N * (size_t)I * sizeof(float)) * 2;
}

static dsmoe_status swiglu_check(const char *what, const void *x, const void *y,
                                 const dsmoe__mlp_params *p, int64_t N, int32_t D, int32_t I,
                                 const void *save, size_t save_size, const void *ws,
                                 size_t ws_size) {
    if (!x || !y || !p || !p->gate || !p->up || !p->down || N < 0 || D < 1 || I < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "SwiGLU %s: NULL argument or weight, or N < 0, D < 1, I < 1", what);
    size_t need_s = dsmoe__swiglu_save_size(I, N), need_w = dsmoe__swiglu_workspace_size(I, N);
    if (!save || save_size < need_s)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "SwiGLU %s: saved-activation buffer of %zu bytes, need %zu for N = %lld",
                            what, save ? save_size : 0, need_s, (long long)N);
    if (!ws || ws_size < need_w)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "SwiGLU %s: workspace of %zu bytes, need %zu for N = %lld", what,
                            ws ? ws_size : 0, need_w, (long long)N);
    return DSMOE_OK;
}

dsmoe_status dsmoe__swiglu_train_forward(float *y, const float *x, const dsmoe__mlp_params *p,
                                         int64_t N, int32_t D, int32_t I, void *save,
                                         size_t save_size, void *ws, size_t ws_size,
                                         int n_threads) {
    dsmoe_status st = swiglu_check("forward", x, y, p, N, D, I, save, save_size, ws, ws_size);
    if (st != DSMOE_OK) return st;
    if (N == 0) return DSMOE_OK;
    const size_t half = dsmoe__align64((size_t)N * (size_t)I * sizeof(float));
    float *g = (float *)save, *u = (float *)(void *)((char *)save + half),
          *h = (float *)(void *)((char *)save + 2 * half);
    const int nt = dsmoe__threads(n_threads);
    dsmoe__linear_forward(g, I, x, D, p->gate, N, D, I, nt);
    dsmoe__linear_forward(u, I, x, D, p->up, N, D, I, nt);
    const int64_t n = N * I, nc = nblocks(n, EW_CHUNK);
    const dsmoe__kernel_table *kt = dsmoe__kernels();
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nc > 1 && n >= PAR_MIN_ELEMS)
    for (int64_t c = 0; c < nc; c++) {
        const int64_t k0 = c * EW_CHUNK, m = n - k0 < EW_CHUNK ? n - k0 : EW_CHUNK;
        kt->swiglu(h + k0, g + k0, u + k0, m);
    }
    dsmoe__linear_forward(y, D, h, I, p->down, N, I, D, nt);
    return DSMOE_OK;
}

dsmoe_status dsmoe__swiglu_train_backward(float *dx, const dsmoe__mlp_grads *gr, const float *dy,
                                          const float *x, const dsmoe__mlp_params *p, int64_t N,
                                          int32_t D, int32_t I, const void *save,
                                          size_t save_size, void *ws, size_t ws_size, int acc_dx,
                                          int n_threads) {
    dsmoe_status st = swiglu_check("backward", x, dy, p, N, D, I, save, save_size, ws, ws_size);
    if (st != DSMOE_OK) return st;
    if (!gr || !gr->gate || !gr->up || !gr->down)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "SwiGLU backward: NULL gradient");
    if (N == 0) return DSMOE_OK;
    const size_t half = dsmoe__align64((size_t)N * (size_t)I * sizeof(float));
    const float *g = (const float *)save;
    const float *u = (const float *)(const void *)((const char *)save + half);
    const float *h = (const float *)(const void *)((const char *)save + 2 * half);
    float *du = (float *)ws, *dh = (float *)(void *)((char *)ws + half);
    const int nt = dsmoe__threads(n_threads);
    const int64_t n = N * I, nc = nblocks(n, EW_CHUNK);
    const dsmoe__kernel_table *kt = dsmoe__kernels();
    (void)nt;
    dsmoe__linear_backward(dh, I, gr->down, dy, D, h, I, p->down, N, I, D, 0, nt);
    /* du takes σ(g) first, then du; dh becomes dg. */
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nc > 1 && n >= PAR_MIN_ELEMS)
    for (int64_t c = 0; c < nc; c++) {
        const int64_t k0 = c * EW_CHUNK, m = n - k0 < EW_CHUNK ? n - k0 : EW_CHUNK;
        float *hc = du + k0, *dc = dh + k0;
        const float *gc = g + k0, *uc = u + k0;
        kt->sigmoid(hc, gc, m);
        for (int64_t k = 0; k < m; k++) {
            const float sg = hc[k], d = dc[k];
            hc[k] = d * (gc[k] * sg);
            dc[k] = d * uc[k] * (sg * (1.0f + gc[k] * (1.0f - sg)));
        }
    }
    dsmoe__linear_backward(dx, D, gr->gate, dh, I, x, D, p->gate, N, D, I, acc_dx, nt);
    dsmoe__linear_backward(dx, D, gr->up, du, I, x, D, p->up, N, D, I, 1, nt);
    return DSMOE_OK;
}
