/*
 * test_model_grad.c — the model's training blocks (src/model/model_grad.h): forward
 * against the inference blocks of blocks.c and against fp64 copies of the same math
 * written here, and every backward against central finite differences of the fp64
 * forward, for every parameter tensor and the input, element by element:
 *     L = Σ y ⊙ r,  r random, so dy = r.
 * The finite differences are taken in double (step 1e-5 on values of order 1: truncation
 * and rounding errors of the difference quotient near 1e-10), so they are the exact
 * gradient to far below fp32 rounding, and the bound on the fp32 analytic gradient is a
 * bound on its rounding alone: |analytic − fd| <= tol · max|fd| over the tensor. The
 * observed maxima are printed; the bounds leave a factor of 10 or more over them.
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
    double s = maxabs_d(ref, n);
    return tl_allclose(what, got, ref, n, rel * (s > 0 ? s : 1), 0);
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
    double *fd = (double *)malloc((size_t)t->n * sizeof(double));
    for (int64_t i = 0; i < t->n; i++) {
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
    double s = maxabs_d(fd, t->n), worst = 0;
    for (int64_t i = 0; i < t->n; i++) worst = fmax(worst, fabs((double)t->g[i] - fd[i]) / s);
    char what[160];
    snprintf(what, sizeof what, "%s d%s", block, t->name);
    tl_checks++;
    if (!(s > 0)) TL_FAIL("%s: the gradient is zero everywhere (no check)", what);
    tl_allclose(what, t->g, fd, t->n, tol * s, 0);
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
    double *g = (double *)malloc((size_t)(N * I) * sizeof(double));
    double *u = (double *)malloc((size_t)(N * I) * sizeof(double));
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
    close_scaled("linear forward", y, P.y, N * out, 2e-6);
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

int main(void) {
    RUN(test_rmsnorm);
    RUN(test_linear);
    RUN(test_swiglu);
    RUN(test_swiglu_threads);
    return TEST_SUMMARY();
}
