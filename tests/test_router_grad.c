/*
 * test_router_grad.c — finite-difference checks of dsmoe_router_backward.
 *
 * Loss L = Σ_k dweights_k · weights_k (accumulated in double from the fp32 weights).
 * For every logit u_e of a few random tokens, a central difference
 *   (L(u + h e_e) − L(u − h e_e)) / (u_e⁺ − u_e⁻),   h = 1e-3 (the step actually taken
 * in fp32 is the denominator), is compared with the analytic dL/du_e from the
 * backward at the unperturbed point. Perturbations that change the chosen experts on
 * either side are skipped (L is discontinuous there). Tolerance: 2e-3 relative plus
 * an absolute term of the fp32 noise of L divided by the step.
 *
 * Configurations: sigmoid with and without normalisation, softmax with and without
 * normalisation, a visible norm_eps, the 0.0 mask with negative biases (chosen
 * dropped-group experts carry gradient through their raw affinity), full-size V3
 * and V2 presets. The bias has no gradient path: perturbing it (without changing the
 * selection) leaves the weights bit-identical, and the backward does not depend on
 * it given the same selection.
 */
#include "testlib.h"

#include <float.h>

typedef struct grad_case {
    const char *name;
    dsmoe_router_config cfg;
    double logit_std, bias_mean, bias_std;
    int tokens;
} grad_case;


/* One-token router with its own workspace. */
typedef struct one {
    const dsmoe_router_config *cfg;
    void *ws;
    size_t ws_size;
    int32_t *idx;
    float *w, *s;
} one;

static void one_init(one *o, const dsmoe_router_config *cfg) {
    o->cfg = cfg;
    o->ws_size = dsmoe_router_workspace_size(cfg, 1, 0, DSMOE_DTYPE_F32, 1);
    o->ws = tl_guarded_alloc(o->ws_size);
    o->idx = malloc((size_t)cfg->top_k * sizeof(int32_t));
    o->w = malloc((size_t)cfg->top_k * sizeof(float));
    o->s = malloc((size_t)cfg->n_experts * sizeof(float));
}

static void one_free(one *o) {
    ASSERT_TRUE(tl_guard_ok(o->ws));
    tl_guarded_free(o->ws);
    free(o->idx);
    free(o->w);
    free(o->s);
}

static int one_route(one *o, const float *u, const float *bias) {
    dsmoe_router_output out = {o->idx, o->w, o->s, NULL, NULL};
    dsmoe_status st = dsmoe_router_forward(o->cfg, &out, u, bias, 1, o->ws, o->ws_size, 1);
    if (st != DSMOE_OK) {
        TL_FAIL("forward: %s: %s", dsmoe_status_name(st), dsmoe_last_error());
        return 0;
    }
    return 1;
}

static double loss(const one *o, const float *dw) {
    double L = 0;
    for (int32_t k = 0; k < o->cfg->top_k; k++) L += (double)dw[k] * (double)o->w[k];
    return L;
}

static double loss_noise(const one *o, const float *dw) {
    double a = 0;
    for (int32_t k = 0; k < o->cfg->top_k; k++) a += fabs((double)dw[k] * (double)o->w[k]);
    return a * FLT_EPSILON;
}

static void check_case(const grad_case *gc, uint64_t seed) {
    const dsmoe_router_config *cfg = &gc->cfg;
    const int32_t E = cfg->n_experts, K = cfg->top_k;
    ASSERT_OK(dsmoe_router_config_validate(cfg));
    tl_seed(seed);
    float *bias = NULL;
    if (cfg->use_bias) {
        bias = malloc((size_t)E * sizeof(float));
        for (int32_t e = 0; e < E; e++) bias[e] = (float)(gc->bias_mean + gc->bias_std * tl_normal());
    }
    float *u = malloc((size_t)E * sizeof(float));
    float *up = malloc((size_t)E * sizeof(float));
    float *du = malloc((size_t)E * sizeof(float));
    float *dw = malloc((size_t)K * sizeof(float));
    int32_t *idx0 = malloc((size_t)K * sizeof(int32_t));
    one o;
    one_init(&o, cfg);
    const float h = 1e-3f;
    int checked = 0, skipped = 0, bad = 0, nonzero = 0;
    double worst = 0;
    for (int t = 0; t < gc->tokens; t++) {
        for (int32_t e = 0; e < E; e++) u[e] = (float)(gc->logit_std * tl_normal());
        for (int32_t k = 0; k < K; k++) dw[k] = (float)tl_normal();
        if (!one_route(&o, u, bias)) break;
        memcpy(idx0, o.idx, (size_t)K * sizeof(int32_t));
        memset(du, 0, (size_t)E * sizeof(float));
        ASSERT_OK(dsmoe_router_backward(cfg, du, dw, o.idx, o.s, 1, 1));
        for (int32_t e = 0; e < E; e++) {
            memcpy(up, u, (size_t)E * sizeof(float));
            float hi = u[e] + h, lo = u[e] - h;
            up[e] = hi;
            if (!one_route(&o, up, bias)) break;
            int same = memcmp(o.idx, idx0, (size_t)K * sizeof(int32_t)) == 0;
            double Lp = loss(&o, dw), noise = loss_noise(&o, dw);
            up[e] = lo;
            if (!one_route(&o, up, bias)) break;
            same = same && memcmp(o.idx, idx0, (size_t)K * sizeof(int32_t)) == 0;
            double Lm = loss(&o, dw);
            if (!same) {
                skipped++;
                continue;
            }
            double fd = (Lp - Lm) / ((double)hi - (double)lo);
            double g = du[e];
            double tol = 2e-3 * fabs(g) + 8.0 * noise / ((double)hi - (double)lo) + 1e-7;
            double err = fabs(fd - g);
            checked++;
            nonzero += g != 0.0;
            if (err / tol > worst) worst = err / tol;
            if (!(err <= tol)) {
                if (bad < 5)
                    fprintf(stderr, "  %s token %d logit %d: backward %.9g, finite difference %.9g "
                                    "(err %.3g > tol %.3g)\n",
                            gc->name, t, (int)e, g, fd, err, tol);
                bad++;
            }
        }
    }
    tl_checks++;
    if (bad) TL_FAIL("%s: %d of %d gradients disagree with finite differences", gc->name, bad, checked);
    fprintf(stderr, "  %-28s %4d checked (%d nonzero), %3d skipped (selection changed), "
                    "worst err/tol %.3f\n",
            gc->name, checked, nonzero, skipped, worst);
    ASSERT_TRUE(checked > 0 && nonzero > 0);
    ASSERT_TRUE(skipped * 4 < checked);
    one_free(&o);
    free(bias);
    free(u);
    free(up);
    free(du);
    free(dw);
    free(idx0);
}

#define SIG DSMOE_SCORE_FUNC_SIGMOID
#define SOFT DSMOE_SCORE_FUNC_SOFTMAX
#define GMAX DSMOE_GROUP_SCORE_MAX
#define GSUM DSMOE_GROUP_SCORE_TOPSUM
#define EXCL DSMOE_GROUP_MASK_EXCLUDE
#define ZERO DSMOE_GROUP_MASK_ZERO

static void test_finite_differences(void) {
    grad_case cases[] = {
        {"sigmoid normalize", tl_router_cfg(16, 4, 2, 4, SIG, GSUM, 2, EXCL, 1, 0.0f, 2.5f, 1), 1.5, 0, 0.1, 4},
        {"sigmoid no normalize", tl_router_cfg(12, 3, 2, 3, SIG, GSUM, 2, EXCL, 0, 0.0f, 1.7f, 1), 1.5, 0, 0.1, 4},
        {"sigmoid eps 0.05", tl_router_cfg(16, 4, 2, 4, SIG, GSUM, 2, EXCL, 1, 0.05f, 2.5f, 0), 1.5, 0, 0, 4},
        {"sigmoid G=1 K=E", tl_router_cfg(7, 1, 1, 7, SIG, GSUM, 2, EXCL, 1, 0.0f, 1.0f, 1), 1.5, 0, 0.2, 4},
        {"sigmoid top-3 sum", tl_router_cfg(30, 5, 2, 4, SIG, GSUM, 3, EXCL, 1, 0.0f, 2.0f, 1), 1.5, 0, 0.1, 3},
        {"sigmoid mask zero neg bias", tl_router_cfg(16, 4, 2, 3, SIG, GSUM, 2, ZERO, 1, 0.0f, 2.5f, 1), 1.5, -1.0, 0.3, 4},
        {"softmax normalize", tl_router_cfg(8, 1, 1, 2, SOFT, GMAX, 1, EXCL, 1, 0.0f, 1.0f, 0), 1.5, 0, 0, 6},
        {"softmax normalize K=6", tl_router_cfg(24, 1, 1, 6, SOFT, GMAX, 1, EXCL, 1, 0.0f, 1.0f, 0), 1.5, 0, 0, 4},
        {"softmax no normalize", tl_router_cfg(20, 4, 2, 3, SOFT, GMAX, 1, EXCL, 0, 0.0f, 4.0f, 0), 1.5, 0, 0, 4},
        {"softmax eps 0.1", tl_router_cfg(12, 3, 2, 3, SOFT, GSUM, 2, EXCL, 1, 0.1f, 1.0f, 1), 1.5, 0, 0.05, 4},
        {"softmax mask zero", tl_router_cfg(24, 4, 2, 4, SOFT, GMAX, 1, ZERO, 1, 0.0f, 1.0f, 1), 1.5, -0.2, 0.05, 4},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) check_case(&cases[i], 1000 + i);
    const char *presets[] = {"deepseek-v3", "deepseek-v2", "deepseek-v3-hf", "moonlight"};
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        grad_case gc = {presets[i], {0}, 1.5, 0, 0.05, 2};
        ASSERT_OK(dsmoe_router_preset(presets[i], &gc.cfg));
        check_case(&gc, 2000 + i);
    }
}

/* The bias has no gradient path: perturbing it (selection unchanged) leaves every
 * weight bit-identical, and the backward given the same selection and scores does not
 * depend on it. */
static void test_bias_has_no_gradient(void) {
    dsmoe_router_config cfgs[3] = {
        tl_router_cfg(16, 4, 2, 4, SIG, GSUM, 2, EXCL, 1, 0.0f, 2.5f, 1),
        tl_router_cfg(24, 4, 2, 4, SOFT, GMAX, 1, ZERO, 1, 0.0f, 1.0f, 1),
        tl_router_cfg(12, 3, 2, 3, SIG, GSUM, 2, EXCL, 0, 0.0f, 1.7f, 1),
    };
    for (int ci = 0; ci < 3; ci++) {
        const dsmoe_router_config *cfg = &cfgs[ci];
        const int32_t E = cfg->n_experts, K = cfg->top_k;
        tl_seed(3000 + (uint64_t)ci);
        float *u = malloc((size_t)E * sizeof(float)), *b = malloc((size_t)E * sizeof(float));
        float *bp = malloc((size_t)E * sizeof(float));
        float *dw = malloc((size_t)K * sizeof(float));
        float *w0 = malloc((size_t)K * sizeof(float)), *s0 = malloc((size_t)E * sizeof(float));
        float *du0 = calloc((size_t)E, sizeof(float)), *du1 = calloc((size_t)E, sizeof(float));
        int32_t *i0 = malloc((size_t)K * sizeof(int32_t));
        for (int32_t e = 0; e < E; e++) {
            u[e] = (float)(1.5 * tl_normal());
            b[e] = (float)(0.1 * tl_normal());
        }
        for (int32_t k = 0; k < K; k++) dw[k] = (float)tl_normal();
        one o;
        one_init(&o, cfg);
        if (one_route(&o, u, b)) {
            memcpy(i0, o.idx, (size_t)K * sizeof(int32_t));
            memcpy(w0, o.w, (size_t)K * sizeof(float));
            memcpy(s0, o.s, (size_t)E * sizeof(float));
            ASSERT_OK(dsmoe_router_backward(cfg, du0, dw, o.idx, o.s, 1, 1));
            int same_sel = 0, tried = 0;
            for (int32_t e = 0; e < E; e++) {
                for (int sign = -1; sign <= 1; sign += 2) {
                    memcpy(bp, b, (size_t)E * sizeof(float));
                    bp[e] += (float)sign * 1e-3f;
                    if (!one_route(&o, u, bp)) break;
                    tried++;
                    if (memcmp(o.idx, i0, (size_t)K * sizeof(int32_t)) != 0) continue;
                    same_sel++;
                    tl_same_bits("weights under a bias perturbation", o.w, w0, K);
                    tl_same_bits("scores under a bias perturbation", o.s, s0, E);
                    memset(du1, 0, (size_t)E * sizeof(float));
                    ASSERT_OK(dsmoe_router_backward(cfg, du1, dw, o.idx, o.s, 1, 1));
                    tl_same_bits("dlogits under a bias perturbation", du1, du0, E);
                }
            }
            ASSERT_TRUE(same_sel * 2 > tried);
        }
        one_free(&o);
        free(u);
        free(b);
        free(bp);
        free(dw);
        free(w0);
        free(s0);
        free(du0);
        free(du1);
        free(i0);
    }
}

/* The all-underflow fallback (uniform weights) has zero gradient. */
static void test_fallback_zero_gradient(void) {
    dsmoe_router_config cfg = tl_router_cfg(16, 4, 2, 4, SIG, GSUM, 2, EXCL, 1, 0.0f, 2.5f, 1);
    float u[16], b[16], dw[4] = {0.3f, -1.0f, 2.0f, 0.7f}, du[16] = {0};
    for (int e = 0; e < 16; e++) {
        u[e] = -100.0f;
        b[e] = 0.01f * (float)e;
    }
    one o;
    one_init(&o, &cfg);
    if (one_route(&o, u, b)) {
        for (int k = 0; k < 4; k++) ASSERT_TRUE(o.w[k] == 2.5f / 4.0f);
        ASSERT_OK(dsmoe_router_backward(&cfg, du, dw, o.idx, o.s, 1, 1));
        int nz = 0;
        for (int e = 0; e < 16; e++) nz += du[e] != 0.0f;
        ASSERT_EQ_INT(nz, 0);
    }
    one_free(&o);
}

int main(void) {
    RUN(test_finite_differences);
    RUN(test_bias_has_no_gradient);
    RUN(test_fallback_zero_gradient);
    return TEST_SUMMARY();
}
