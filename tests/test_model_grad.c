/*
 * test_model_grad.c — the model's training blocks (src/model/model_grad.h): forward
 * against the inference blocks of blocks.c and against fp64 copies of the same math
 * written here, and every backward against central finite differences of the fp64
 * forward, for every parameter tensor and the input, element by element (every 3rd to
 * 71st element in the larger linear and head cases, which span several blocks):
 *     L = Σ y ⊙ r,  r random, so dy = r (the head's L is its mean cross-entropy).
 * The finite differences are taken in double (step 1e-5 on values of order 1: truncation
 * and rounding errors of the difference quotient near 1e-10), so they are the exact
 * gradient to far below fp32 rounding, and the bound on the fp32 analytic gradient is a
 * bound on its rounding alone: |analytic − fd| <= tol · max|fd| over the tensor. The
 * observed maxima are printed; the bounds leave a factor of 10 or more over them (the
 * largest: MLA gradients 8e-7 of their scale, forwards 4e-7).
 * Also: batches of B = 2 sequences (nothing leaks between them), causality, odd sizes,
 * and the same bits for 1 and 2 threads.
 */
#include "model/model_grad.h"
#include "testlib.h"

#include <math.h>

/* ------------------------------------------------------------------ helpers */

static float *randv(int64_t n, double scale) {
    float *p = (float *)malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) p[i] = (float)(tl_normal() * scale);
    return p;
}
static float *zerov(int64_t n) { return (float *)calloc((size_t)(n > 0 ? n : 1), sizeof(float)); }
static double *tod(const float *p, int64_t n) {
    double *d = (double *)malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
    for (int64_t i = 0; i < n; i++) d[i] = p[i];
    return d;
}
static float *copyv(const float *p, int64_t n) {
    float *q = (float *)malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    memcpy(q, p, (size_t)n * sizeof(float));
    return q;
}
static void *wsalloc(size_t n) { return tl_guarded_alloc(n ? n : 1); }

static double maxabs_d(const double *a, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs(a[i]));
    return m;
}

/* fp32 result against fp64: |got − ref| <= rel · max|ref|. */
static int close_scaled(const char *what, const float *got, const double *ref, int64_t n, double rel) {
    double s = maxabs_d(ref, n), worst = 0;
    if (!(s > 0)) s = 1;
    for (int64_t i = 0; i < n; i++) worst = fmax(worst, fabs((double)got[i] - ref[i]) / s);
    fprintf(stderr, "    %-28s max |err| / max |ref| = %.2g (bound %.0e)\n", what, worst, rel);
    return tl_allclose(what, got, ref, n, rel * s, 0);
}

/* One tensor under test: fp32 values (what the C code reads), an fp64 copy (what the
 * fp64 forward reads, perturbed by the finite differences) and the analytic gradient. */
typedef struct tens {
    const char *name;
    float *v;
    double *d;
    float *g;
    int64_t n;
} tens;

static tens mk_tens(const char *name, int64_t n, double scale) {
    tens t;
    t.name = name;
    t.n = n;
    t.v = randv(n, scale);
    t.d = tod(t.v, n);
    t.g = zerov(n);
    return t;
}
static void free_tens(tens *t) {
    free(t->v);
    free(t->d);
    free(t->g);
}

/* Central differences of the fp64 loss f() over every element of t->d (every g_stride-th
 * when that is above 1) against t->g. */
static int64_t g_stride = 1;
static void fd_check(const char *block, tens *t, double (*f)(void), double tol) {
    const double h = 1e-5;
    const int64_t n = t->n;
    double *fd = (double *)calloc((size_t)(n > 0 ? n : 1), sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        double v = t->d[i];
        if (i % g_stride) {
            fd[i] = t->g[i]; /* not checked */
            continue;
        }
        t->d[i] = v + h;
        double lp = f();
        t->d[i] = v - h;
        double lm = f();
        t->d[i] = v;
        fd[i] = (lp - lm) / (2 * h);
    }
    double s = maxabs_d(fd, n), worst = 0;
    for (int64_t i = 0; i < n; i++) worst = fmax(worst, fabs((double)t->g[i] - fd[i]) / s);
    char what[160];
    snprintf(what, sizeof what, "%s d%s", block, t->name);
    tl_checks++;
    if (!(s > 0)) TL_FAIL("%s: the gradient is zero everywhere (no check)", what);
    tl_allclose(what, t->g, fd, n, tol * s, 0);
    fprintf(stderr, "    %-28s max |err| / max |grad| = %.2g (bound %.0e)\n", what, worst, tol);
    free(fd);
}

static double dot64(const double *y, const float *r, int64_t n) {
    double L = 0;
    for (int64_t i = 0; i < n; i++) L += y[i] * (double)r[i];
    return L;
}

/* ------------------------------------------------------------------ fp64 copies */

static void rmsnorm64(double *y, const double *x, const double *w, int64_t N, int n, double eps) {
    for (int64_t t = 0; t < N; t++) {
        double ss = 0;
        for (int i = 0; i < n; i++) ss += x[t * n + i] * x[t * n + i];
        double inv = 1.0 / sqrt(ss / n + eps);
        for (int i = 0; i < n; i++) y[t * n + i] = x[t * n + i] * inv * w[i];
    }
}
/* y (N, out) = x (N, in) · Wᵀ */
static void linear64(double *y, const double *x, const double *W, int64_t N, int in, int out) {
    for (int64_t t = 0; t < N; t++)
        for (int o = 0; o < out; o++) {
            double a = 0;
            for (int k = 0; k < in; k++) a += x[t * in + k] * W[(int64_t)o * in + k];
            y[t * out + o] = a;
        }
}
static void swiglu64(double *y, const double *x, const double *gate, const double *up,
                     const double *down, int64_t N, int D, int I) {
    double *g = (double *)calloc((size_t)(N * I), sizeof(double));
    double *u = (double *)calloc((size_t)(N * I), sizeof(double));
    linear64(g, x, gate, N, D, I);
    linear64(u, x, up, N, D, I);
    for (int64_t k = 0; k < N * I; k++) g[k] = g[k] / (1 + exp(-g[k])) * u[k];
    linear64(y, g, down, N, I, D);
    free(g);
    free(u);
}

/* ------------------------------------------------------------------ RMSNorm, linear */

static struct {
    int64_t N;
    int n, in, out, I;
    float eps;
    tens x, w, W2, W3;
    float *r;
    double *y;
} P;

static double rms_loss(void) {
    rmsnorm64(P.y, P.x.d, P.w.d, P.N, P.n, P.eps);
    return dot64(P.y, P.r, P.N * P.n);
}

static void test_rmsnorm(void) {
    tl_seed(11);
    const int64_t N = 7;
    const int n = 13;
    P.N = N;
    P.n = n;
    P.eps = 1e-6f;
    P.x = mk_tens("x", N * n, 1.3);
    P.w = mk_tens("w", n, 1.0);
    P.r = randv(N * n, 1.0);
    P.y = (double *)malloc((size_t)(N * n) * sizeof(double));
    float *y = zerov(N * n), *y0 = zerov(N * n), *inv = zerov(N);
    /* Forward: the same bits as the inference RMSNorm, and fp64 within rounding. */
    dsmoe__rmsnorm_train_forward(y, inv, P.x.v, P.w.v, N, n, n, n, P.eps, 1);
    dsmoe__rmsnorm(y0, P.x.v, P.w.v, N, n, n, n, P.eps);
    tl_same_bits("rmsnorm forward = inference", y, y0, N * n);
    rms_loss();
    close_scaled("rmsnorm forward", y, P.y, N * n, 1e-6);
    /* Backward: dx written, then accumulated on top of itself. */
    dsmoe__rmsnorm_backward(P.x.g, P.w.g, P.r, P.x.v, P.w.v, inv, N, n, n, n, n, 0, 1);
    fd_check("rmsnorm", &P.x, rms_loss, 2e-6);
    fd_check("rmsnorm", &P.w, rms_loss, 2e-6);
    float *dx2 = copyv(P.x.g, N * n);
    dsmoe__rmsnorm_backward(dx2, NULL, P.r, P.x.v, P.w.v, inv, N, n, n, n, n, 1, 1);
    int ok = 1;
    for (int64_t i = 0; i < N * n; i++) ok &= dx2[i] == 2 * P.x.g[i];
    ASSERT_TRUE(ok);
    free(dx2);
    free(y);
    free(y0);
    free(inv);
    free(P.r);
    free(P.y);
    free_tens(&P.x);
    free_tens(&P.w);
}

static double lin_loss(void) {
    linear64(P.y, P.x.d, P.w.d, P.N, P.in, P.out);
    return dot64(P.y, P.r, P.N * P.out);
}

static void test_linear(void) {
    tl_seed(12);
    /* N > one row block, out > one tile, in > one column tile. */
    const int64_t N = 70;
    const int in = 259, out = 67;
    P.N = N;
    P.in = in;
    P.out = out;
    P.x = mk_tens("x", N * in, 1.0);
    P.w = mk_tens("W", (int64_t)out * in, 0.1);
    P.r = randv(N * out, 1.0);
    P.y = (double *)malloc((size_t)(N * out) * sizeof(double));
    float *y = zerov(N * out);
    dsmoe__linear_forward(y, out, P.x.v, in, P.w.v, N, in, out, 1);
    lin_loss();
    close_scaled("linear forward", y, P.y, N * out, 5e-6);
    dsmoe__linear_backward(P.x.g, in, P.w.g, P.r, out, P.x.v, in, P.w.v, N, in, out, 0, 1);
    /* Every 71st / 41st element (each costs two products), in every row block and tile. */
    const int64_t nx = P.x.n, nw = P.w.n;
    g_stride = 71;
    fd_check("linear", &P.x, lin_loss, 2e-6);
    g_stride = 41;
    fd_check("linear", &P.w, lin_loss, 2e-6);
    g_stride = 1;
    /* dW accumulates; dx accumulates with acc_dx = 1; NULL parts are skipped. */
    float *dx1 = copyv(P.x.g, nx), *dw1 = copyv(P.w.g, nw);
    dsmoe__linear_backward(P.x.g, in, P.w.g, P.r, out, P.x.v, in, P.w.v, N, in, out, 1, 1);
    int ok = 1;
    for (int64_t i = 0; i < nx; i++) ok &= P.x.g[i] == 2 * dx1[i];
    for (int64_t i = 0; i < nw; i++) ok &= P.w.g[i] == 2 * dw1[i];
    ASSERT_TRUE(ok);
    dsmoe__linear_backward(NULL, in, NULL, P.r, out, P.x.v, in, P.w.v, N, in, out, 0, 1);
    /* Two threads: the same bits. */
    float *y2 = zerov(N * out), *dx2 = zerov(nx), *dw2 = zerov(nw);
    dsmoe__linear_forward(y2, out, P.x.v, in, P.w.v, N, in, out, 2);
    dsmoe__linear_backward(dx2, in, dw2, P.r, out, P.x.v, in, P.w.v, N, in, out, 0, 2);
    tl_same_bits("linear y, 2 threads", y, y2, N * out);
    tl_same_bits("linear dx, 2 threads", dx1, dx2, nx);
    tl_same_bits("linear dW, 2 threads", dw1, dw2, nw);
    free(y);
    free(y2);
    free(dx1);
    free(dx2);
    free(dw1);
    free(dw2);
    free(P.r);
    free(P.y);
    free_tens(&P.x);
    free_tens(&P.w);
}

/* Many rows: the products go to the threads in pieces of falling size (a quarter of the
 * rows twice, an eighth twice, ... down to 64 rows), and dW in pieces of its rows or, when
 * those would be under 128 rows (256 x 128, MLA's kv_b and o_proj), of its columns. Every
 * row of y and dx, and dW summed over all of them, against fp64 on 1 and 2 threads: a
 * piece that missed, doubled or shifted rows or columns shows. */
static void linear_pieces_case(int in, int out) {
    const int64_t N = 1000; /* N · in · out above the size that runs on the threads */
    float *x = randv(N * in, 1.0), *W = randv((int64_t)out * in, 0.2), *r = randv(N * out, 1.0);
    double *y64 = (double *)calloc((size_t)(N * out), sizeof(double));
    double *dx64 = (double *)calloc((size_t)(N * in), sizeof(double));
    double *dw64 = (double *)calloc((size_t)out * (size_t)in, sizeof(double));
    for (int64_t t = 0; t < N; t++)
        for (int o = 0; o < out; o++) {
            double a = 0;
            for (int k = 0; k < in; k++) a += (double)x[t * in + k] * W[(int64_t)o * in + k];
            y64[t * out + o] = a;
            for (int k = 0; k < in; k++) {
                dx64[t * in + k] += (double)r[t * out + o] * W[(int64_t)o * in + k];
                dw64[(int64_t)o * in + k] += (double)r[t * out + o] * x[t * in + k];
            }
        }
    for (int nt = 1; nt <= 2; nt++) {
        char what[96];
        float *y = zerov(N * out), *dx = zerov(N * in), *dw = zerov((int64_t)out * in);
        dsmoe__linear_forward(y, out, x, in, W, N, in, out, nt);
        dsmoe__linear_backward(dx, in, dw, r, out, x, in, W, N, in, out, 0, nt);
        snprintf(what, sizeof what, "linear y, 1000 rows, %d x %d, %d thr", out, in, nt);
        close_scaled(what, y, y64, N * out, 5e-6);
        snprintf(what, sizeof what, "linear dx, 1000 rows, %d x %d, %d thr", out, in, nt);
        close_scaled(what, dx, dx64, N * in, 5e-6);
        snprintf(what, sizeof what, "linear dW, 1000 rows, %d x %d, %d thr", out, in, nt);
        close_scaled(what, dw, dw64, (int64_t)out * in, 5e-6);
        free(y);
        free(dx);
        free(dw);
    }
    free(x);
    free(W);
    free(r);
    free(y64);
    free(dx64);
    free(dw64);
}

static void test_linear_pieces(void) {
    tl_seed(14);
    linear_pieces_case(64, 80);   /* dW cut by rows (its columns too few to cut) */
    linear_pieces_case(128, 256); /* dW cut by columns: 64-row pieces would be too small */
    linear_pieces_case(256, 96);  /* dW cut by columns: fewer rows than columns */
    linear_pieces_case(256, 1024); /* dW cut by rows, 256 each */
}

/* ------------------------------------------------------------------ SwiGLU */

static double swiglu_loss(void) {
    swiglu64(P.y, P.x.d, P.w.d, P.W2.d, P.W3.d, P.N, P.n, P.I);
    return dot64(P.y, P.r, P.N * P.n);
}

static void swiglu_run(const dsmoe__mlp_params *p, const dsmoe__mlp_grads *g, float *y, float *dx,
                       int64_t N, int D, int I, int nt) {
    size_t ss = dsmoe__swiglu_save_size(I, N), ws = dsmoe__swiglu_workspace_size(I, N);
    void *save = wsalloc(ss), *w = wsalloc(ws);
    ASSERT_OK(dsmoe__swiglu_train_forward(y, P.x.v, p, N, D, I, save, ss, w, ws, nt));
    ASSERT_OK(dsmoe__swiglu_train_backward(dx, g, P.r, P.x.v, p, N, D, I, save, ss, w, ws, 0, nt));
    ASSERT_TRUE(tl_guard_ok(save) && tl_guard_ok(w));
    tl_guarded_free(save);
    tl_guarded_free(w);
}

static void test_swiglu(void) {
    tl_seed(13);
    const int64_t N = 9;
    const int D = 11, I = 7;
    P.N = N;
    P.n = D;
    P.I = I;
    P.x = mk_tens("x", N * D, 1.0);
    P.w = mk_tens("gate", (int64_t)I * D, 0.5);
    P.W2 = mk_tens("up", (int64_t)I * D, 0.5);
    P.W3 = mk_tens("down", (int64_t)D * I, 0.5);
    P.r = randv(N * D, 1.0);
    P.y = (double *)malloc((size_t)(N * D) * sizeof(double));
    dsmoe__mlp_params p = {P.w.v, P.W2.v, P.W3.v};
    dsmoe__mlp_grads g = {P.w.g, P.W2.g, P.W3.g};
    float *y = zerov(N * D), *y0 = zerov(N * D), *scratch = zerov(2 * N * I);
    swiglu_run(&p, &g, y, P.x.g, N, D, I, 1);
    dsmoe__swiglu(y0, P.x.v, p.gate, p.up, p.down, N, D, I, scratch);
    swiglu_loss();
    close_scaled("swiglu forward", y, P.y, N * D, 2e-6);
    double *y0d = tod(y0, N * D);
    close_scaled("swiglu forward = inference", y, y0d, N * D, 2e-6);
    free(y0d);
    fd_check("swiglu", &P.x, swiglu_loss, 3e-6);
    fd_check("swiglu", &P.w, swiglu_loss, 3e-6);
    fd_check("swiglu", &P.W2, swiglu_loss, 3e-6);
    fd_check("swiglu", &P.W3, swiglu_loss, 3e-6);
    /* Errors: refused before anything is written. */
    size_t ss = dsmoe__swiglu_save_size(I, N), ws = dsmoe__swiglu_workspace_size(I, N);
    void *save = wsalloc(ss), *w = wsalloc(ws);
    ASSERT_STATUS(dsmoe__swiglu_train_forward(y, P.x.v, &p, N, D, I, save, ss - 1, w, ws, 1),
                  DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    ASSERT_STATUS(dsmoe__swiglu_train_forward(y, P.x.v, &p, N, D, I, save, ss, w, ws - 1, 1),
                  DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    dsmoe__mlp_params bad = p;
    bad.up = NULL;
    ASSERT_STATUS(dsmoe__swiglu_train_forward(y, P.x.v, &bad, N, D, I, save, ss, w, ws, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    tl_guarded_free(save);
    tl_guarded_free(w);
    free(y);
    free(y0);
    free(scratch);
    free(P.r);
    free(P.y);
    free_tens(&P.x);
    free_tens(&P.w);
    free_tens(&P.W2);
    free_tens(&P.W3);
}

/* Sizes spanning several row blocks and weight tiles: 1 and 2 threads, the same bits. */
static void test_swiglu_threads(void) {
    tl_seed(14);
    const int64_t N = 150;
    const int D = 70, I = 300;
    P.x = mk_tens("x", N * D, 1.0);
    P.r = randv(N * D, 1.0);
    float *gate = randv((int64_t)I * D, 0.1), *up = randv((int64_t)I * D, 0.1),
          *down = randv((int64_t)D * I, 0.1);
    dsmoe__mlp_params p = {gate, up, down};
    float *y[2], *dx[2], *dg[2][3];
    for (int k = 0; k < 2; k++) {
        y[k] = zerov(N * D);
        dx[k] = zerov(N * D);
        for (int j = 0; j < 3; j++) dg[k][j] = zerov((int64_t)I * D);
        dsmoe__mlp_grads g = {dg[k][0], dg[k][1], dg[k][2]};
        swiglu_run(&p, &g, y[k], dx[k], N, D, I, k + 1);
    }
    tl_same_bits("swiglu y", y[0], y[1], N * D);
    tl_same_bits("swiglu dx", dx[0], dx[1], N * D);
    for (int j = 0; j < 3; j++) tl_same_bits("swiglu dW", dg[0][j], dg[1][j], (int64_t)I * D);
    /* RMSNorm over the same rows, two column blocks of dw. */
    float *inv[2], *n[2], *dn[2], *dw[2], *w = randv(D, 1.0);
    for (int k = 0; k < 2; k++) {
        inv[k] = zerov(N);
        n[k] = zerov(N * D);
        dn[k] = zerov(N * D);
        dw[k] = zerov(D);
        dsmoe__rmsnorm_train_forward(n[k], inv[k], P.x.v, w, N, D, D, D, 1e-6f, k + 1);
        dsmoe__rmsnorm_backward(dn[k], dw[k], P.r, P.x.v, w, inv[k], N, D, D, D, D, 0, k + 1);
    }
    tl_same_bits("rmsnorm y", n[0], n[1], N * D);
    tl_same_bits("rmsnorm dx", dn[0], dn[1], N * D);
    tl_same_bits("rmsnorm dw", dw[0], dw[1], D);
    for (int k = 0; k < 2; k++) {
        free(y[k]);
        free(dx[k]);
        for (int j = 0; j < 3; j++) free(dg[k][j]);
        free(inv[k]);
        free(n[k]);
        free(dn[k]);
        free(dw[k]);
    }
    free(w);
    free(gate);
    free(up);
    free(down);
    free(P.r);
    free_tens(&P.x);
}

/* ------------------------------------------------------------------ MLA */

static dsmoe_model_config mla_cfg(int D, int H, int n, int r, int v, int c, int q, int yarn) {
    dsmoe_model_config k;
    memset(&k, 0, sizeof k);
    k.hidden_size = D;
    k.num_attention_heads = H;
    k.qk_nope_head_dim = n;
    k.qk_rope_head_dim = r;
    k.v_head_dim = v;
    k.kv_lora_rank = c;
    k.q_lora_rank = q;
    k.rms_norm_eps = 1e-6f;
    k.rope_theta = 10000.0;
    k.max_position_embeddings = 4096;
    k.rope_type = yarn ? DSMOE_ROPE_TYPE_YARN : DSMOE_ROPE_TYPE_DEFAULT;
    k.rope_factor = yarn ? 4.0 : 1.0;
    k.rope_original_max_position_embeddings = 64;
    k.rope_beta_fast = 32;
    k.rope_beta_slow = 1;
    k.rope_mscale = k.rope_mscale_all_dim = yarn ? 1.0 : 0.0;
    return k;
}

/* The attention's tensors under test, in this order. */
enum { MQ, MQA, MQAN, MQB, MKVA, MKVAN, MKVB, MO, MX, MNT };

static struct {
    dsmoe_model_config c;
    int64_t B, T;
    tens t[MNT];
    float *r;
    double *y;
} M;

/* The fp64 naive MLA of M.t[MX].d (B·T, D) into M.y, written from SPEC-model §3–§5
 * (frequencies and the score scale from blocks.c, which test_model_golden checks). */
static void mla64(void) {
    const dsmoe_model_config *c = &M.c;
    const int D = c->hidden_size, H = c->num_attention_heads, n = c->qk_nope_head_dim,
              r = c->qk_rope_head_dim, v = c->v_head_dim, kc = c->kv_lora_rank, q = c->q_lora_rank;
    const int64_t T = M.T;
    double f[128]; /* r / 2 frequencies; the cases have r <= 256 */
    ASSERT_TRUE(r / 2 <= 128);
    dsmoe__rope_inv_freq(f, c);
    const double scale = dsmoe__attn_scale(c);
    double *Q = (double *)malloc((size_t)(T * H * (n + r)) * sizeof(double));
    double *KV = (double *)malloc((size_t)(T * (kc + r)) * sizeof(double));
    double *KVB = (double *)malloc((size_t)(T * H * (n + v)) * sizeof(double));
    double *O = (double *)malloc((size_t)(T * H * v) * sizeof(double));
    double *qa = (double *)malloc((size_t)(q + 1) * sizeof(double));
    double *lat = (double *)malloc((size_t)kc * sizeof(double));
    double *p = (double *)malloc((size_t)T * sizeof(double));
    for (int64_t b = 0; b < M.B; b++) {
        for (int64_t t = 0; t < T; t++) {
            const double *x = M.t[MX].d + (b * T + t) * D;
            double *qt = Q + t * H * (n + r), *kv = KV + t * (kc + r);
            if (q > 0) {
                linear64(qa, x, M.t[MQA].d, 1, D, q);
                rmsnorm64(qa, qa, M.t[MQAN].d, 1, q, c->rms_norm_eps);
                linear64(qt, qa, M.t[MQB].d, 1, q, H * (n + r));
            } else {
                linear64(qt, x, M.t[MQ].d, 1, D, H * (n + r));
            }
            linear64(kv, x, M.t[MKVA].d, 1, D, kc + r);
            rmsnorm64(lat, kv, M.t[MKVAN].d, 1, kc, c->rms_norm_eps);
            linear64(KVB + t * H * (n + v), lat, M.t[MKVB].d, 1, kc, H * (n + v));
            for (int i = 0; i < r / 2; i++) {
                double cs = cos((double)t * f[i]), sn = sin((double)t * f[i]);
                for (int h = 0; h <= H; h++) { /* h == H: the shared k_pe */
                    double *e = h < H ? qt + h * (n + r) + n : kv + kc;
                    double a = e[2 * i], bb = e[2 * i + 1];
                    e[2 * i] = a * cs - bb * sn;
                    e[2 * i + 1] = a * sn + bb * cs;
                }
            }
        }
        for (int h = 0; h < H; h++)
            for (int64_t i = 0; i < T; i++) {
                const double *qi = Q + (i * H + h) * (n + r);
                double mx = -INFINITY, sum = 0;
                for (int64_t j = 0; j <= i; j++) {
                    const double *kn = KVB + (j * H + h) * (n + v), *kp = KV + j * (kc + r) + kc;
                    double sc = 0;
                    for (int k = 0; k < n; k++) sc += qi[k] * kn[k];
                    for (int k = 0; k < r; k++) sc += qi[n + k] * kp[k];
                    p[j] = sc * scale;
                    mx = fmax(mx, p[j]);
                }
                for (int64_t j = 0; j <= i; j++) sum += (p[j] = exp(p[j] - mx));
                double *o = O + (i * H + h) * v;
                for (int k = 0; k < v; k++) {
                    double a = 0;
                    for (int64_t j = 0; j <= i; j++) a += p[j] / sum * KVB[(j * H + h) * (n + v) + n + k];
                    o[k] = a;
                }
            }
        linear64(M.y + b * T * D, O, M.t[MO].d, T, H * v, D);
    }
    free(Q);
    free(KV);
    free(KVB);
    free(O);
    free(qa);
    free(lat);
    free(p);
}

static double mla_loss(void) {
    mla64();
    return dot64(M.y, M.r, M.B * M.T * M.c.hidden_size);
}

static const char *mla_names[MNT] = {"q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj",
                                     "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj",
                                     "o_proj", "x"};

/* Makes M's tensors for config c (absent ones have n = 0). */
static void mla_setup(const dsmoe_model_config *c, int64_t B, int64_t T) {
    M.c = *c;
    M.B = B;
    M.T = T;
    const int64_t D = c->hidden_size, H = c->num_attention_heads, n = c->qk_nope_head_dim,
                  r = c->qk_rope_head_dim, v = c->v_head_dim, kc = c->kv_lora_rank,
                  q = c->q_lora_rank;
    const int64_t sz[MNT] = {q > 0 ? 0 : H * (n + r) * D, q * D, q, q > 0 ? H * (n + r) * q : 0,
                             (kc + r) * D, kc, H * (n + v) * kc, D * H * v, B * T * D};
    /* Weights ~ 1/sqrt(fan-in) so that the scores and outputs are of order 1; norm
     * weights around 1. */
    const double sc[MNT] = {1 / sqrt((double)D), 1 / sqrt((double)D), 0.3, 1 / sqrt((double)(q ? q : 1)),
                            1 / sqrt((double)D), 0.3, 1 / sqrt((double)kc), 1 / sqrt((double)(H * v)), 1.0};
    for (int k = 0; k < MNT; k++) {
        M.t[k] = mk_tens(mla_names[k], sz[k], sc[k]);
        if (k == MQAN || k == MKVAN)
            for (int64_t i = 0; i < sz[k]; i++) M.t[k].d[i] = M.t[k].v[i] += 1.0f;
    }
    M.r = randv(B * T * D, 1.0);
    M.y = (double *)malloc((size_t)(B * T * D) * sizeof(double));
}
static void mla_teardown(void) {
    for (int k = 0; k < MNT; k++) free_tens(&M.t[k]);
    free(M.r);
    free(M.y);
}

static dsmoe__mla_weights mla_w(void) {
    dsmoe__mla_weights w;
    int q = M.c.q_lora_rank > 0;
    w.q_proj = q ? NULL : M.t[MQ].v;
    w.q_a_proj = q ? M.t[MQA].v : NULL;
    w.q_a_norm = q ? M.t[MQAN].v : NULL;
    w.q_b_proj = q ? M.t[MQB].v : NULL;
    w.kv_a_proj = M.t[MKVA].v;
    w.kv_a_norm = M.t[MKVAN].v;
    w.kv_b_proj = M.t[MKVB].v;
    w.o_proj = M.t[MO].v;
    return w;
}
static dsmoe__mla_grads mla_g(float *const *gp) {
    dsmoe__mla_grads g;
    int q = M.c.q_lora_rank > 0;
    g.q_proj = q ? NULL : gp[MQ];
    g.q_a_proj = q ? gp[MQA] : NULL;
    g.q_a_norm = q ? gp[MQAN] : NULL;
    g.q_b_proj = q ? gp[MQB] : NULL;
    g.kv_a_proj = gp[MKVA];
    g.kv_a_norm = gp[MKVAN];
    g.kv_b_proj = gp[MKVB];
    g.o_proj = gp[MO];
    return g;
}

/* Training forward (and backward when dx != NULL) of M with input x and upstream dy:
 * y, dx and the parameter gradients in gp[] (zeroed here). */
static void mla_run(float *y, float *dx, float *const *gp, const float *x, const float *dy, int nt) {
    const dsmoe_model_config *c = &M.c;
    size_t ss = dsmoe__mla_save_size(c, M.B, M.T), ws = dsmoe__mla_train_workspace_size(c, M.B, M.T);
    void *save = wsalloc(ss), *w = wsalloc(ws);
    memset(save, 0x7f, ss); /* NaN-like garbage: nothing may read unwritten bytes */
    memset(w, 0x7f, ws);
    dsmoe__mla_weights W = mla_w();
    ASSERT_OK(dsmoe__mla_train_forward(c, &W, y, x, M.B, M.T, save, ss, w, ws, nt));
    if (dx) {
        for (int k = 0; k < MX; k++)
            if (M.t[k].n) memset(gp[k], 0, (size_t)M.t[k].n * sizeof(float));
        dsmoe__mla_grads G = mla_g(gp);
        ASSERT_OK(dsmoe__mla_train_backward(c, &W, &G, dx, dy, x, M.B, M.T, save, ss, w, ws, 0, nt));
    }
    ASSERT_TRUE(tl_guard_ok(save) && tl_guard_ok(w));
    tl_guarded_free(save);
    tl_guarded_free(w);
}

static void mla_case(const char *name, const dsmoe_model_config *c, int64_t B, int64_t T) {
    fprintf(stderr, "  %s\n", name);
    mla_setup(c, B, T);
    const int64_t N = B * T, D = c->hidden_size;
    float *y = zerov(N * D), *gp[MNT];
    for (int k = 0; k < MNT; k++) gp[k] = M.t[k].g;
    mla_run(y, M.t[MX].g, gp, M.t[MX].v, M.r, 1);
    /* Forward: fp64 and the inference MLA, one sequence at a time. */
    mla_loss();
    close_scaled("MLA forward vs fp64", y, M.y, N * D, 2e-6);
    size_t iws = dsmoe__mla_workspace_size(c, T);
    void *iw = malloc(iws);
    float *yi = zerov(N * D);
    dsmoe__mla_weights W = mla_w();
    for (int64_t b = 0; b < B; b++)
        ASSERT_OK(dsmoe__mla_forward(c, &W, yi + b * T * D, M.t[MX].v + b * T * D, T, iw, iws));
    double *yid = tod(yi, N * D);
    close_scaled("MLA forward vs inference", y, yid, N * D, 2e-6);
    /* Backward: every element of every tensor. */
    for (int k = 0; k < MNT; k++)
        if (M.t[k].n) fd_check("MLA", &M.t[k], mla_loss, 1e-5);
    free(yid);
    free(yi);
    free(iw);
    free(y);
    mla_teardown();
}

static void test_mla_grad(void) {
    tl_seed(21);
    dsmoe_model_config a = mla_cfg(13, 3, 5, 2, 7, 6, 9, 1);
    mla_case("q_lora_rank 9, YaRN, r = 2", &a, 2, 5);
    dsmoe_model_config b = mla_cfg(11, 2, 3, 6, 5, 7, 0, 0);
    mla_case("q_proj, no YaRN, r = 6", &b, 2, 6);
    dsmoe_model_config c = mla_cfg(10, 2, 4, 6, 3, 5, 7, 1);
    mla_case("q_lora_rank 7, YaRN, r = 6", &c, 2, 7);
    dsmoe_model_config d = mla_cfg(9, 3, 2, 4, 5, 3, 0, 1);
    mla_case("q_proj, YaRN, r = 4", &d, 1, 6);
    /* A rope part longer than one pass of the vector rotation (128 values). */
    dsmoe_model_config w = mla_cfg(5, 1, 2, 132, 3, 3, 0, 0);
    mla_case("q_proj, r = 132", &w, 1, 3);
    /* Two blocks of queries (64 + 6 rows); every 5th element. */
    dsmoe_model_config e = mla_cfg(9, 2, 3, 4, 5, 4, 5, 1);
    g_stride = 5;
    mla_case("q_lora_rank 5, YaRN, T = 70", &e, 1, 70);
    g_stride = 1;
}

/* Larger sizes: several row blocks; sequences do not leak into each other, causality,
 * 1 vs 2 threads bit for bit, argument errors. */
static void test_mla_props(void) {
    tl_seed(22);
    dsmoe_model_config c = mla_cfg(37, 4, 9, 6, 11, 13, 17, 1);
    const int64_t B = 2, T = 70, N = B * T, D = c.hidden_size;
    mla_setup(&c, B, T);
    float *y[2], *dx[2], *gp[2][MNT];
    for (int t = 0; t < 2; t++) {
        y[t] = zerov(N * D);
        dx[t] = zerov(N * D);
        for (int k = 0; k < MNT; k++) gp[t][k] = zerov(M.t[k].n);
    }
    mla_run(y[0], dx[0], gp[0], M.t[MX].v, M.r, 1);
    for (int nt = 2; nt <= 3; nt++) {
        mla_run(y[1], dx[1], gp[1], M.t[MX].v, M.r, nt);
        tl_same_bits("MLA y, 1 vs 2 or 3 threads", y[0], y[1], N * D);
        tl_same_bits("MLA dx, 1 vs 2 or 3 threads", dx[0], dx[1], N * D);
        for (int k = 0; k < MX; k++) tl_same_bits(mla_names[k], gp[0][k], gp[1][k], M.t[k].n);
    }
    /* Perturbing sequence 0 changes nothing in sequence 1. */
    float *x2 = copyv(M.t[MX].v, N * D);
    for (int64_t i = 0; i < T * D; i++) x2[i] += 0.5f;
    mla_run(y[1], NULL, NULL, x2, NULL, 2);
    tl_same_bits("MLA sequence 1 when sequence 0 changes", y[0] + T * D, y[1] + T * D, T * D);
    int changed = 0;
    for (int64_t i = 0; i < T * D; i++) changed |= y[0][i] != y[1][i];
    ASSERT_TRUE(changed);
    /* Causality: token t0 of sequence 1 changes no earlier row (t0 in the second block of
     * queries, after rows of its own block). */
    const int64_t t0 = 66;
    memcpy(x2, M.t[MX].v, (size_t)(N * D) * sizeof(float));
    for (int64_t i = 0; i < D; i++) x2[(T + t0) * D + i] -= 0.7f;
    mla_run(y[1], NULL, NULL, x2, NULL, 1);
    tl_same_bits("MLA rows before the perturbed token", y[0], y[1], (T + t0) * D);
    changed = 0;
    for (int64_t i = 0; i < D; i++) changed |= y[0][(T + t0) * D + i] != y[1][(T + t0) * D + i];
    for (int64_t i = 0; i < D; i++) changed |= y[0][(T + t0 + 3) * D + i] != y[1][(T + t0 + 3) * D + i];
    ASSERT_TRUE(changed);
    /* Backward, the same two properties: dy only on sequence 1 before t0 leaves dx zero in
     * sequence 0 and at t0 and after. */
    float *dy = zerov(N * D);
    memcpy(dy + T * D, M.r + T * D, (size_t)(t0 * D) * sizeof(float));
    mla_run(y[1], dx[1], gp[1], M.t[MX].v, dy, 2);
    int zero = 1, nonzero = 0;
    for (int64_t i = 0; i < T * D; i++) zero &= dx[1][i] == 0.0f;
    for (int64_t i = (T + t0) * D; i < N * D; i++) zero &= dx[1][i] == 0.0f;
    for (int64_t i = T * D; i < (T + t0) * D; i++) nonzero |= dx[1][i] != 0.0f;
    ASSERT_TRUE(zero);
    ASSERT_TRUE(nonzero);
    /* Errors. */
    size_t ss = dsmoe__mla_save_size(&c, B, T), ws = dsmoe__mla_train_workspace_size(&c, B, T);
    void *save = wsalloc(ss), *w = wsalloc(ws);
    dsmoe__mla_weights W = mla_w();
    ASSERT_STATUS(dsmoe__mla_train_forward(&c, &W, y[1], x2, B, T, save, ss - 1, w, ws, 1),
                  DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    ASSERT_STATUS(dsmoe__mla_train_forward(&c, &W, y[1], x2, B, T, save, ss, w, ws - 1, 1),
                  DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    W.q_b_proj = NULL;
    ASSERT_STATUS(dsmoe__mla_train_forward(&c, &W, y[1], x2, B, T, save, ss, w, ws, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    W = mla_w();
    dsmoe__mla_grads G = mla_g(gp[1]);
    G.kv_b_proj = NULL;
    ASSERT_STATUS(dsmoe__mla_train_backward(&c, &W, &G, dx[1], dy, x2, B, T, save, ss, w, ws, 0, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_model_config bad = c;
    bad.qk_rope_head_dim = 5;
    ASSERT_STATUS(dsmoe__mla_train_forward(&bad, &W, y[1], x2, B, T, save, ss, w, ws, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    bad = c;
    bad.max_position_embeddings = T - 1;
    ASSERT_STATUS(dsmoe__mla_train_forward(&bad, &W, y[1], x2, B, T, save, ss, w, ws, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    tl_guarded_free(save);
    tl_guarded_free(w);
    free(dy);
    free(x2);
    for (int t = 0; t < 2; t++) {
        free(y[t]);
        free(dx[t]);
        for (int k = 0; k < MNT; k++) free(gp[t][k]);
    }
    mla_teardown();
}

/* ------------------------------------------------------------------ embedding, head, loss */

static void test_embedding(void) {
    tl_seed(31);
    const int64_t N = 90;
    const int D = 150, V = 11; /* several column blocks; every row hit several times */
    float *E = randv((int64_t)V * D, 1.0), *h = zerov(N * D), *dh = randv(N * D, 1.0);
    int32_t *tok = (int32_t *)malloc((size_t)N * sizeof(int32_t));
    for (int64_t t = 0; t < N; t++) tok[t] = (int32_t)(tl_next() % (uint64_t)V);
    ASSERT_OK(dsmoe__embed_forward(h, E, tok, N, D, V, 2));
    int ok = 1;
    for (int64_t t = 0; t < N; t++) ok &= memcmp(h + t * D, E + (int64_t)tok[t] * D, (size_t)D * 4) == 0;
    ASSERT_TRUE(ok);
    /* Backward: the plain scatter in position order (same float sums), 1 and 2 threads,
     * on top of a non-zero gradient (it accumulates). */
    float *ref = randv((int64_t)V * D, 1.0), *d1 = copyv(ref, (int64_t)V * D),
          *d2 = copyv(ref, (int64_t)V * D);
    for (int64_t t = 0; t < N; t++)
        for (int i = 0; i < D; i++) ref[(int64_t)tok[t] * D + i] += dh[t * D + i];
    dsmoe__embed_backward(d1, dh, tok, N, D, 1);
    dsmoe__embed_backward(d2, dh, tok, N, D, 2);
    tl_same_bits("embedding backward", d1, ref, (int64_t)V * D);
    tl_same_bits("embedding backward, 2 threads", d2, ref, (int64_t)V * D);
    /* A bad token: refused, named, nothing written. */
    memset(h, 0, (size_t)(N * D) * sizeof(float));
    tok[37] = V;
    ASSERT_STATUS(dsmoe__embed_forward(h, E, tok, N, D, V, 1), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "position 37") != NULL);
    tok[37] = -1;
    ASSERT_STATUS(dsmoe__embed_forward(h, E, tok, N, D, V, 1), DSMOE_STATUS_INVALID_ARGUMENT);
    ok = 1;
    for (int64_t i = 0; i < N * D; i++) ok &= h[i] == 0.0f;
    ASSERT_TRUE(ok);
    free(E);
    free(h);
    free(dh);
    free(tok);
    free(ref);
    free(d1);
    free(d2);
}

static struct {
    int64_t N;
    int D, V;
    int32_t *tg, ignore;
    tens x, W;
} Lc;

/* The fp64 mean cross-entropy of the head. */
static double ce_loss(void) {
    double total = 0;
    int64_t n = 0;
    double *l = (double *)malloc((size_t)Lc.V * sizeof(double));
    for (int64_t t = 0; t < Lc.N; t++) {
        if (Lc.tg[t] == Lc.ignore) continue;
        linear64(l, Lc.x.d + t * Lc.D, Lc.W.d, 1, Lc.D, Lc.V);
        double mx = l[0];
        for (int k = 1; k < Lc.V; k++) mx = fmax(mx, l[k]);
        double s = exp(l[0] - mx);
        for (int k = 1; k < Lc.V; k++) s += exp(l[k] - mx);
        total += mx + log(s) - l[Lc.tg[t]];
        n++;
    }
    free(l);
    return n ? total / (double)n : 0;
}

static void head_run(double *loss, int64_t *cnt, float *dx, float *dW, float weight, int acc, int nt) {
    size_t ws = dsmoe__head_loss_workspace_size(Lc.V, Lc.N);
    void *w = wsalloc(ws);
    ASSERT_OK(dsmoe__head_loss(loss, cnt, dx, dW, Lc.x.v, Lc.W.v, Lc.tg, Lc.ignore, weight, Lc.N,
                               Lc.D, Lc.V, w, ws, acc, nt));
    ASSERT_TRUE(tl_guard_ok(w));
    tl_guarded_free(w);
}

/* dsmoe__head_loss_save then dsmoe__head_loss_grad (the training step's split): the loss
 * and the bits of dsmoe__head_loss's dx (= or +=) and dW on nt threads. */
static void split_check(const char *what, double want_loss, const float *want_dx, const float *want_dW,
                        float weight, int nt) {
    size_t ws = dsmoe__head_loss_workspace_size(Lc.V, Lc.N);
    void *w = wsalloc(ws);
    float *G = (float *)tl_guarded_alloc((size_t)Lc.N * (size_t)Lc.V * sizeof(float));
    float *dx = zerov(Lc.x.n), *dW = zerov(Lc.W.n);
    double loss = -1;
    ASSERT_OK(dsmoe__head_loss_save(&loss, G, Lc.x.v, Lc.W.v, Lc.tg, Lc.ignore, weight, Lc.N, Lc.D,
                                    Lc.V, w, ws, nt));
    ASSERT_TRUE(loss == want_loss);
    for (int64_t i = 0; i < Lc.x.n; i++) dx[i] = 0.5f * want_dx[i]; /* overwritten */
    ASSERT_OK(dsmoe__head_loss_grad(dx, dW, G, Lc.x.v, Lc.W.v, Lc.N, Lc.D, Lc.V, 0, nt));
    tl_same_bits(what, dx, want_dx, Lc.x.n);
    tl_same_bits(what, dW, want_dW, Lc.W.n);
    ASSERT_TRUE(tl_guard_ok(w) && tl_guard_ok(G));
    ASSERT_STATUS(dsmoe__head_loss_save(&loss, NULL, Lc.x.v, Lc.W.v, Lc.tg, Lc.ignore, weight,
                                        Lc.N, Lc.D, Lc.V, w, ws, nt),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe__head_loss_grad(dx, dW, NULL, Lc.x.v, Lc.W.v, Lc.N, Lc.D, Lc.V, 0, nt),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    tl_guarded_free(G);
    tl_guarded_free(w);
    free(dx);
    free(dW);
}

static void test_head_loss(void) {
    tl_seed(32);
    /* Two blocks of rows (64 + 6), five of dW's rows (one chunk of logits at this V). */
    Lc.N = 70;
    Lc.D = 13;
    Lc.V = 270;
    Lc.ignore = 3; /* a pad id inside the vocabulary */
    Lc.x = mk_tens("x", Lc.N * Lc.D, 1.0);
    Lc.W = mk_tens("W", (int64_t)Lc.V * Lc.D, 0.5);
    Lc.tg = (int32_t *)malloc((size_t)Lc.N * sizeof(int32_t));
    int64_t want_n = 0;
    for (int64_t t = 0; t < Lc.N; t++) {
        Lc.tg[t] = t % 9 == 4 ? Lc.ignore : (int32_t)(tl_next() % (uint64_t)Lc.V);
        want_n += Lc.tg[t] != Lc.ignore;
    }
    double loss = 0, loss2 = 0;
    int64_t cnt = 0;
    head_run(&loss, &cnt, Lc.x.g, Lc.W.g, 1.0f, 0, 1);
    ASSERT_EQ_INT(cnt, want_n);
    double ref = ce_loss();
    ASSERT_NEAR(loss, ref, 1e-6 * ref);
    /* Ignored rows get no gradient. */
    int ok = 1;
    for (int64_t t = 0; t < Lc.N; t++)
        if (Lc.tg[t] == Lc.ignore)
            for (int i = 0; i < Lc.D; i++) ok &= Lc.x.g[t * Lc.D + i] == 0.0f;
    ASSERT_TRUE(ok);
    g_stride = 3;
    fd_check("head loss", &Lc.x, ce_loss, 1e-5);
    g_stride = 7;
    fd_check("head loss", &Lc.W, ce_loss, 1e-5);
    g_stride = 1;
    /* The same bits: forward only, 2 threads; weight 0.5 halves the gradients exactly;
     * dx accumulates and dW adds up. */
    head_run(&loss2, NULL, NULL, NULL, 1.0f, 0, 1);
    ASSERT_TRUE(loss2 == loss);
    const int64_t nx = Lc.x.n, nw = Lc.W.n;
    float *dx = zerov(nx), *dW = zerov(nw);
    head_run(&loss2, NULL, dx, dW, 1.0f, 0, 2);
    ASSERT_TRUE(loss2 == loss);
    tl_same_bits("head dx, 2 threads", dx, Lc.x.g, nx);
    tl_same_bits("head dW, 2 threads", dW, Lc.W.g, nw);
    split_check("head loss split at the logits", loss, Lc.x.g, Lc.W.g, 1.0f, 2);
    {
        float *hx = zerov(nx), *hw = zerov(nw);
        double l5 = 0;
        head_run(&l5, NULL, hx, hw, 0.5f, 0, 1);
        split_check("head loss split at the logits, weight 0.5", l5, hx, hw, 0.5f, 1);
        free(hx);
        free(hw);
    }
    memset(dW, 0, (size_t)nw * sizeof(float));
    head_run(NULL, NULL, dx, dW, 0.5f, 1, 2);
    ok = 1;
    for (int64_t i = 0; i < nx; i++) ok &= dx[i] == 1.5f * Lc.x.g[i];
    for (int64_t i = 0; i < nw; i++) ok &= dW[i] == 0.5f * Lc.W.g[i];
    ASSERT_TRUE(ok);
    /* Every target ignored: loss 0, count 0, zero gradients. */
    int32_t *keep = Lc.tg;
    int32_t *all = (int32_t *)malloc((size_t)Lc.N * sizeof(int32_t));
    for (int64_t t = 0; t < Lc.N; t++) all[t] = Lc.ignore;
    Lc.tg = all;
    memset(dW, 0, (size_t)nw * sizeof(float));
    head_run(&loss2, &cnt, dx, dW, 1.0f, 0, 1);
    ok = loss2 == 0.0 && cnt == 0;
    for (int64_t i = 0; i < nx; i++) ok &= dx[i] == 0.0f;
    for (int64_t i = 0; i < nw; i++) ok &= dW[i] == 0.0f;
    ASSERT_TRUE(ok);
    /* A bad target: refused, named, dW untouched. */
    Lc.tg = keep;
    Lc.tg[66] = Lc.V;
    size_t ws = dsmoe__head_loss_workspace_size(Lc.V, Lc.N);
    void *w = wsalloc(ws);
    ASSERT_STATUS(dsmoe__head_loss(&loss2, NULL, dx, dW, Lc.x.v, Lc.W.v, Lc.tg, Lc.ignore, 1.0f,
                                   Lc.N, Lc.D, Lc.V, w, ws, 0, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "position 66") != NULL);
    ok = 1;
    for (int64_t i = 0; i < nw; i++) ok &= dW[i] == 0.0f;
    ASSERT_TRUE(ok);
    ASSERT_STATUS(dsmoe__head_loss(&loss2, NULL, dx, dW, Lc.x.v, Lc.W.v, Lc.tg, Lc.ignore, 1.0f,
                                   Lc.N, Lc.D, Lc.V, w, ws - 1, 0, 1),
                  DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    /* The workspace does not grow with N beyond one chunk. */
    ASSERT_TRUE(dsmoe__head_loss_workspace_size(Lc.V, 100000) ==
                dsmoe__head_loss_workspace_size(Lc.V, 1 << 24));
    tl_guarded_free(w);
    free(all);
    free(dx);
    free(dW);
    free(Lc.tg);
    free_tens(&Lc.x);
    free_tens(&Lc.W);
}

/* A vocabulary large enough that the logits go a chunk of 64 rows at a time: two chunks
 * (64 + 6 rows), the second's dx at its rows and dW summed over both, against fp64 finite
 * differences; 2 threads give the same bits. */
static void test_head_loss_chunks(void) {
    tl_seed(33);
    Lc.N = 70;
    Lc.D = 3;
    Lc.V = 17000;
    Lc.ignore = 5;
    /* fewer rows than N held at once */
    ASSERT_TRUE(dsmoe__head_loss_workspace_size(Lc.V, Lc.N) < (size_t)Lc.N * (size_t)Lc.V * 4);
    Lc.x = mk_tens("x", Lc.N * Lc.D, 1.0);
    Lc.W = mk_tens("W", (int64_t)Lc.V * Lc.D, 0.5);
    Lc.tg = (int32_t *)malloc((size_t)Lc.N * sizeof(int32_t));
    for (int64_t t = 0; t < Lc.N; t++)
        Lc.tg[t] = t % 11 == 3 ? Lc.ignore : (int32_t)(tl_next() % (uint64_t)Lc.V);
    double loss = 0, loss2 = 0;
    head_run(&loss, NULL, Lc.x.g, Lc.W.g, 1.0f, 0, 1);
    const double ref = ce_loss();
    ASSERT_NEAR(loss, ref, 1e-6 * ref);
    g_stride = 3;
    fd_check("head loss, 2 chunks", &Lc.x, ce_loss, 1e-5);
    g_stride = 1009;
    fd_check("head loss, 2 chunks", &Lc.W, ce_loss, 1e-5);
    g_stride = 1;
    float *dx = zerov(Lc.x.n), *dW = zerov(Lc.W.n);
    head_run(&loss2, NULL, dx, dW, 1.0f, 0, 2);
    ASSERT_TRUE(loss2 == loss);
    tl_same_bits("head dx, 2 chunks, 2 threads", dx, Lc.x.g, Lc.x.n);
    tl_same_bits("head dW, 2 chunks, 2 threads", dW, Lc.W.g, Lc.W.n);
    split_check("head loss split at the logits, 2 chunks", loss, Lc.x.g, Lc.W.g, 1.0f, 1);
    free(dx);
    free(dW);
    free(Lc.tg);
    free_tens(&Lc.x);
    free_tens(&Lc.W);
}

/* ------------------------------------------------------------------ one layer composed */

/* A one-layer model composed from the blocks as model_grad.h describes (embedding,
 * RMSNorm, MLA, residual, RMSNorm, SwiGLU, residual, final RMSNorm, head and loss):
 * the backward chain through the residual stream against fp64 finite differences of
 * the same model, for the embedding, the three norms, the head, the MLP and the MLA
 * weights. */
static struct {
    int V, I;
    int32_t *tok, *tg;
    tens E, w_in, w_post, w_fin, gate, up, down, head;
} C;

static double compose_loss(void) {
    const int64_t N = M.B * M.T;
    const int D = M.c.hidden_size, I = C.I;
    const double eps = M.c.rms_norm_eps;
    double *h = (double *)calloc((size_t)(N * D), sizeof(double));
    double *x = (double *)calloc((size_t)(N * D), sizeof(double));
    double *f = (double *)calloc((size_t)(N * D), sizeof(double));
    for (int64_t t = 0; t < N; t++) memcpy(h + t * D, C.E.d + (int64_t)C.tok[t] * D, (size_t)D * sizeof(double));
    rmsnorm64(M.t[MX].d, h, C.w_in.d, N, D, eps);
    mla64();
    for (int64_t i = 0; i < N * D; i++) h[i] += M.y[i];
    rmsnorm64(x, h, C.w_post.d, N, D, eps);
    swiglu64(f, x, C.gate.d, C.up.d, C.down.d, N, D, I);
    for (int64_t i = 0; i < N * D; i++) h[i] += f[i];
    rmsnorm64(x, h, C.w_fin.d, N, D, eps);
    /* Mean cross-entropy over the rows with a target. */
    double total = 0, *l = (double *)calloc((size_t)C.V, sizeof(double));
    int64_t n = 0;
    for (int64_t t = 0; t < N; t++) {
        if (C.tg[t] < 0) continue;
        linear64(l, x + t * D, C.head.d, 1, D, C.V);
        double mx = l[0];
        for (int k = 1; k < C.V; k++) mx = fmax(mx, l[k]);
        double s = exp(l[0] - mx);
        for (int k = 1; k < C.V; k++) s += exp(l[k] - mx);
        total += mx + log(s) - l[C.tg[t]];
        n++;
    }
    free(l);
    free(h);
    free(x);
    free(f);
    return total / (double)n;
}

static void test_compose_layer(void) {
    tl_seed(41);
    dsmoe_model_config c = mla_cfg(9, 2, 3, 4, 5, 4, 6, 1);
    const int64_t B = 2, T = 6, N = B * T;
    const int D = c.hidden_size, V = 11, I = 7;
    mla_setup(&c, B, T);
    C.V = V;
    C.I = I;
    C.E = mk_tens("embed_tokens", (int64_t)V * D, 1.0);
    C.w_in = mk_tens("input_layernorm", D, 0.2);
    C.w_post = mk_tens("post_attention_layernorm", D, 0.2);
    C.w_fin = mk_tens("norm", D, 0.2);
    tens *norms[3] = {&C.w_in, &C.w_post, &C.w_fin};
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < D; i++) norms[k]->d[i] = norms[k]->v[i] += 1.0f;
    C.gate = mk_tens("mlp.gate_proj", (int64_t)I * D, 0.4);
    C.up = mk_tens("mlp.up_proj", (int64_t)I * D, 0.4);
    C.down = mk_tens("mlp.down_proj", (int64_t)D * I, 0.4);
    C.head = mk_tens("lm_head", (int64_t)V * D, 0.4);
    C.tok = (int32_t *)malloc((size_t)N * sizeof(int32_t));
    C.tg = (int32_t *)malloc((size_t)N * sizeof(int32_t));
    for (int64_t t = 0; t < N; t++) {
        C.tok[t] = (int32_t)(tl_next() % (uint64_t)V);
        C.tg[t] = t % T == T - 1 ? -1 : (int32_t)(tl_next() % (uint64_t)V); /* last: no target */
    }
    /* Forward. */
    const size_t ND = (size_t)(N * D);
    float *h0 = zerov(N * D), *h1 = zerov(N * D), *h2 = zerov(N * D), *x1 = zerov(N * D),
          *x2 = zerov(N * D), *x3 = zerov(N * D), *a = zerov(N * D), *inv = zerov(3 * N);
    size_t mss = dsmoe__mla_save_size(&c, B, T), mws = dsmoe__mla_train_workspace_size(&c, B, T);
    size_t fss = dsmoe__swiglu_save_size(I, N), fws = dsmoe__swiglu_workspace_size(I, N);
    size_t hws = dsmoe__head_loss_workspace_size(V, N);
    size_t wsz = mws > fws ? mws : fws;
    wsz = wsz > hws ? wsz : hws;
    void *msave = wsalloc(mss), *fsave = wsalloc(fss), *ws = wsalloc(wsz);
    dsmoe__mla_weights W = mla_w();
    dsmoe__mlp_params mp = {C.gate.v, C.up.v, C.down.v};
    ASSERT_OK(dsmoe__embed_forward(h0, C.E.v, C.tok, N, D, V, 1));
    dsmoe__rmsnorm_train_forward(x1, inv, h0, C.w_in.v, N, D, D, D, c.rms_norm_eps, 1);
    ASSERT_OK(dsmoe__mla_train_forward(&c, &W, a, x1, B, T, msave, mss, ws, wsz, 1));
    for (size_t i = 0; i < ND; i++) h1[i] = h0[i] + a[i];
    dsmoe__rmsnorm_train_forward(x2, inv + N, h1, C.w_post.v, N, D, D, D, c.rms_norm_eps, 1);
    ASSERT_OK(dsmoe__swiglu_train_forward(a, x2, &mp, N, D, I, fsave, fss, ws, wsz, 1));
    for (size_t i = 0; i < ND; i++) h2[i] = h1[i] + a[i];
    dsmoe__rmsnorm_train_forward(x3, inv + 2 * N, h2, C.w_fin.v, N, D, D, D, c.rms_norm_eps, 1);
    double loss = 0;
    /* Backward: dh is the residual stream's gradient, dx the block inputs'. */
    float *dh = zerov(N * D), *dx = zerov(N * D);
    ASSERT_OK(dsmoe__head_loss(&loss, NULL, dx, C.head.g, x3, C.head.v, C.tg, -1, 1.0f, N, D, V,
                               ws, wsz, 0, 1));
    dsmoe__rmsnorm_backward(dh, C.w_fin.g, dx, h2, C.w_fin.v, inv + 2 * N, N, D, D, D, D, 0, 1);
    dsmoe__mlp_grads mg = {C.gate.g, C.up.g, C.down.g};
    ASSERT_OK(dsmoe__swiglu_train_backward(dx, &mg, dh, x2, &mp, N, D, I, fsave, fss, ws, wsz, 0, 1));
    dsmoe__rmsnorm_backward(dh, C.w_post.g, dx, h1, C.w_post.v, inv + N, N, D, D, D, D, 1, 1);
    float *gp[MNT];
    for (int k = 0; k < MNT; k++) gp[k] = M.t[k].g;
    dsmoe__mla_grads G = mla_g(gp);
    ASSERT_OK(dsmoe__mla_train_backward(&c, &W, &G, dx, dh, x1, B, T, msave, mss, ws, wsz, 0, 1));
    dsmoe__rmsnorm_backward(dh, C.w_in.g, dx, h0, C.w_in.v, inv, N, D, D, D, D, 1, 1);
    dsmoe__embed_backward(C.E.g, dh, C.tok, N, D, 1);
    ASSERT_TRUE(tl_guard_ok(msave) && tl_guard_ok(fsave) && tl_guard_ok(ws));
    /* Against the fp64 model. */
    double ref = compose_loss();
    ASSERT_NEAR(loss, ref, 2e-6 * ref);
    tens *all[] = {&C.E, &C.w_in, &C.w_post, &C.w_fin, &C.gate, &C.up, &C.down, &C.head};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) fd_check("layer", all[k], compose_loss, 1e-5);
    for (int k = 0; k < MX; k++)
        if (M.t[k].n) fd_check("layer", &M.t[k], compose_loss, 1e-5);
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) free_tens(all[k]);
    free(h0);
    free(h1);
    free(h2);
    free(x1);
    free(x2);
    free(x3);
    free(a);
    free(inv);
    free(dh);
    free(dx);
    free(C.tok);
    free(C.tg);
    tl_guarded_free(msave);
    tl_guarded_free(fsave);
    tl_guarded_free(ws);
    mla_teardown();
}

int main(void) {
    RUN(test_rmsnorm);
    RUN(test_linear);
    RUN(test_linear_pieces);
    RUN(test_swiglu);
    RUN(test_swiglu_threads);
    RUN(test_mla_grad);
    RUN(test_mla_props);
    RUN(test_embedding);
    RUN(test_head_loss);
    RUN(test_head_loss_chunks);
    RUN(test_compose_layer);
    return TEST_SUMMARY();
}
