/*
 * test_balance_grad.c — finite-difference checks of every balance loss's gradient
 * with respect to the router logits, for sigmoid and softmax routers, with the
 * paper's normalised scores and with raw scores, routed and plain-top-K counts.
 *
 * Central differences over every logit: u ± h, affinities recomputed in double
 * and rounded to fp32 (what the router hands over), counts held fixed; with
 * plain-top-K counts, perturbations that change a token's top-K are skipped.
 */
#include "testlib.h"

enum { E = 16, G = 4, TG = 2, K = 4, T = 12 };

static void affinities(float *s, const double *u, dsmoe_score_func f) {
    for (int t = 0; t < T; t++) {
        const double *r = u + t * E;
        if (f == DSMOE_SCORE_FUNC_SIGMOID) {
            for (int j = 0; j < E; j++) s[t * E + j] = (float)(1.0 / (1.0 + exp(-r[j])));
        } else {
            double m = r[0], z = 0;
            for (int j = 1; j < E; j++) m = fmax(m, r[j]);
            for (int j = 0; j < E; j++) z += exp(r[j] - m);
            for (int j = 0; j < E; j++) s[t * E + j] = (float)(exp(r[j] - m) / z);
        }
    }
}

/* Top-K of one token's scores as a bit set (ties: lower id). */
static uint32_t topk_set(const float *s) {
    uint32_t set = 0;
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int j = 0; j < E; j++)
            if (!(set >> j & 1) && (best < 0 || s[j] > s[best])) best = j;
        set |= 1u << best;
    }
    return set;
}

static double eval(const dsmoe_balance_loss_config *lc, const dsmoe_router_config *rc,
                   const double *u, const int32_t *idx, float *dl) {
    float s[T * E], uf[T * E];
    affinities(s, u, rc->score_func);
    for (int i = 0; i < T * E; i++) uf[i] = (float)u[i];
    size_t n = dsmoe_balance_loss_workspace_size(lc, rc, T);
    void *ws = malloc(n);
    double L = NAN;
    ASSERT_OK(dsmoe_balance_loss(lc, rc, &L, dl, s, idx, uf, T, ws, n, 1));
    free(ws);
    return L;
}

static void check(dsmoe_score_func f, dsmoe_balance_loss_kind kind, dsmoe_balance_count cf,
                  int normalize, int64_t seq_len) {
    dsmoe_router_config rc;
    dsmoe_router_preset("deepseek-v3", &rc);
    rc.n_experts = E;
    rc.n_groups = G;
    rc.topk_groups = TG;
    rc.top_k = K;
    rc.score_func = f;
    rc.use_bias = 0;
    dsmoe_balance_loss_config lc;
    dsmoe_balance_loss_config_default(kind, &lc);
    lc.alpha = 1.0f;
    lc.seq_len = seq_len;
    lc.count_from = cf;
    lc.normalize_scores = normalize;

    double u[T * E];
    tl_seed(1000 + 17 * (uint64_t)kind + 5 * (uint64_t)f + 3 * (uint64_t)cf + (uint64_t)normalize);
    for (int i = 0; i < T * E; i++) u[i] = 1.5 * tl_normal();
    for (int i = 0; i < T * E; i++) u[i] = (double)(float)u[i];
    /* routed indices from the C router */
    int32_t idx[T * K];
    {
        float uf[T * E], w[T * K];
        for (int i = 0; i < T * E; i++) uf[i] = (float)u[i];
        size_t n = dsmoe_router_workspace_size(&rc, T, 0, DSMOE_DTYPE_F32, 1);
        void *ws = malloc(n);
        dsmoe_router_output out = {idx, w, NULL, NULL, NULL};
        ASSERT_OK(dsmoe_router_forward(&rc, &out, uf, NULL, T, ws, n, 1));
        free(ws);
    }
    float dl[T * E];
    memset(dl, 0, sizeof dl);
    eval(&lc, &rc, u, idx, dl);
    double gmax = 0;
    for (int i = 0; i < T * E; i++) gmax = fmax(gmax, fabs((double)dl[i]));
    const double h = 1e-2;
    float s0[T * E], sp[T * E];
    affinities(s0, u, f);
    int bad = 0, checked = 0, skipped = 0;
    double maxerr = 0;
    for (int i = 0; i < T * E; i++) {
        double up[T * E], dn[T * E];
        memcpy(up, u, sizeof up);
        memcpy(dn, u, sizeof dn);
        up[i] += h;
        dn[i] -= h;
        if (cf == DSMOE_BALANCE_COUNT_TOPK) {
            int t = i / E, changed = 0;
            affinities(sp, up, f);
            changed |= topk_set(sp + t * E) != topk_set(s0 + t * E);
            affinities(sp, dn, f);
            changed |= topk_set(sp + t * E) != topk_set(s0 + t * E);
            if (changed) {
                skipped++;
                continue;
            }
        }
        double fd = (eval(&lc, &rc, up, idx, NULL) - eval(&lc, &rc, dn, idx, NULL)) / (2 * h);
        double err = fabs(fd - (double)dl[i]);
        maxerr = fmax(maxerr, err);
        checked++;
        if (!(err <= 2e-3 * gmax + 2e-2 * fabs(fd))) {
            if (bad < 3)
                fprintf(stderr, "  logit %d: analytic %.8g, finite difference %.8g\n", i,
                        (double)dl[i], fd);
            bad++;
        }
    }
    tl_checks++;
    if (bad || checked < T * E / 2 || gmax == 0)
        TL_FAIL("%s %s %s norm=%d: %d of %d bad (%d skipped), max err %.3g, max |g| %.3g",
                f ? "softmax" : "sigmoid", dsmoe_balance_loss_kind_name(kind),
                cf ? "topk" : "routed", normalize, bad, checked, skipped, maxerr, gmax);
}

static void test_grad_sigmoid(void) {
    for (int k = 0; k <= DSMOE_BALANCE_LOSS_ZLOSS; k++)
        check(DSMOE_SCORE_FUNC_SIGMOID, (dsmoe_balance_loss_kind)k, DSMOE_BALANCE_COUNT_ROUTED, 1, 4);
    check(DSMOE_SCORE_FUNC_SIGMOID, DSMOE_BALANCE_LOSS_SEQ, DSMOE_BALANCE_COUNT_TOPK, 1, 4);
    check(DSMOE_SCORE_FUNC_SIGMOID, DSMOE_BALANCE_LOSS_SEQ, DSMOE_BALANCE_COUNT_ROUTED, 0, 6);
    check(DSMOE_SCORE_FUNC_SIGMOID, DSMOE_BALANCE_LOSS_COMM, DSMOE_BALANCE_COUNT_TOPK, 0, 0);
}

static void test_grad_softmax(void) {
    for (int k = 0; k <= DSMOE_BALANCE_LOSS_ZLOSS; k++)
        check(DSMOE_SCORE_FUNC_SOFTMAX, (dsmoe_balance_loss_kind)k, DSMOE_BALANCE_COUNT_ROUTED, 1, 4);
    check(DSMOE_SCORE_FUNC_SOFTMAX, DSMOE_BALANCE_LOSS_EXPERT, DSMOE_BALANCE_COUNT_TOPK, 1, 3);
    check(DSMOE_SCORE_FUNC_SOFTMAX, DSMOE_BALANCE_LOSS_DEVICE, DSMOE_BALANCE_COUNT_ROUTED, 0, 12);
}

int main(void) {
    RUN(test_grad_sigmoid);
    RUN(test_grad_softmax);
    return TEST_SUMMARY();
}
