/*
 * test_balance_golden.c — the balancer, the load statistics and every balance loss
 * against the independent fp64 reference (tests/ref/balance_ref.py, files written by
 * tests/ref/gen_balance_golden.py into tests/golden/balance/).
 *
 * steps/: 8 training steps of 48 tokens routed by the C router (E=16, G=4, TG=2,
 * K=4, sigmoid, top-2-sum, bias) with the balancer's bias, each step fed in two
 * micro-batches: per-step counts must match exactly, the bias after every step to
 * 1e-6, MaxVio and the other statistics to 1e-12. Variants: sign, proportional,
 * sign re-centred, sign with a rate schedule, sign with padding masked out.
 * losses/: every loss and its dlogits on sigmoid and softmax routers; the batch split
 * in two halves with f from the whole batch's counts (dsmoe_balance_loss_ex, as data
 * parallelism uses it) against the reference, and the mean of the halves against the
 * whole-batch call (1e-6 relative).
 */
#include "testlib.h"

static int load(const char *rel, dsmoe_dtype dt, dsmoe_array *a) {
    dsmoe_status st = dsmoe_npy_read(tl_golden(rel), a);
    tl_checks++;
    if (st != DSMOE_OK) {
        TL_FAIL("cannot read %s: %s", rel, dsmoe_last_error());
        return 0;
    }
    if (a->dtype != dt) {
        TL_FAIL("%s: dtype %s", rel, dsmoe_dtype_name(a->dtype));
        dsmoe_array_free(a);
        return 0;
    }
    return 1;
}

enum { E = 16, G = 4, TG = 2, K = 4, S = 8, T = 48 };

static dsmoe_router_config golden_router(dsmoe_score_func f) {
    dsmoe_router_config rc;
    dsmoe_router_preset("deepseek-v3", &rc);
    rc.n_experts = E;
    rc.n_groups = G;
    rc.topk_groups = TG;
    rc.top_k = K;
    rc.score_func = f;
    rc.group_topm = 2;
    rc.group_score = f == DSMOE_SCORE_FUNC_SIGMOID ? DSMOE_GROUP_SCORE_TOPSUM : DSMOE_GROUP_SCORE_MAX;
    rc.use_bias = f == DSMOE_SCORE_FUNC_SIGMOID;
    rc.normalize = f == DSMOE_SCORE_FUNC_SIGMOID;
    return rc;
}

typedef struct variant {
    const char *name;
    dsmoe_balance_rule rule;
    float gamma;
    int recenter;
    int64_t until;
    float after;
    int masked;
} variant;

static void run_variant(const variant *v) {
    char rel[256];
    dsmoe_array logits = {0}, bias0 = {0}, mask = {0}, counts = {0}, bias = {0}, maxvio = {0},
                stats = {0};
    if (!load("balance/steps/logits.npy", DSMOE_DTYPE_F32, &logits)) return;
    load("balance/steps/bias0.npy", DSMOE_DTYPE_F32, &bias0);
    load("balance/steps/mask.npy", DSMOE_DTYPE_U8, &mask);
    snprintf(rel, sizeof rel, "balance/steps/%s_counts.npy", v->name);
    load(rel, DSMOE_DTYPE_I64, &counts);
    snprintf(rel, sizeof rel, "balance/steps/%s_bias.npy", v->name);
    load(rel, DSMOE_DTYPE_F64, &bias);
    snprintf(rel, sizeof rel, "balance/steps/%s_maxvio.npy", v->name);
    load(rel, DSMOE_DTYPE_F64, &maxvio);
    int is_sign = strcmp(v->name, "sign") == 0;
    if (is_sign) load("balance/steps/sign_stats.npy", DSMOE_DTYPE_F64, &stats);
    if (!bias0.data || !mask.data || !counts.data || !bias.data || !maxvio.data ||
        (is_sign && !stats.data))
        goto done;
    ASSERT_EQ_INT(logits.shape[0], S);
    ASSERT_EQ_INT(logits.shape[1], T);
    ASSERT_EQ_INT(logits.shape[2], E);

    dsmoe_router_config rc = golden_router(DSMOE_SCORE_FUNC_SIGMOID);
    dsmoe_balancer_config bc;
    dsmoe_balancer_config_default(E, &bc);
    bc.rule = v->rule;
    bc.gamma = v->gamma;
    bc.recenter = v->recenter;
    bc.gamma_until_tokens = v->until;
    bc.gamma_after = v->after;
    dsmoe_balancer *b = NULL;
    ASSERT_OK(dsmoe_balancer_create(&bc, &b));
    ASSERT_OK(dsmoe_balancer_set_bias(b, (const float *)bias0.data));
    size_t wsn = dsmoe_router_workspace_size(&rc, T, 0, DSMOE_DTYPE_F32, 1);
    void *ws = malloc(wsn);
    int32_t step_idx[T * K]; /* the step's choices, both micro-batches */
    float w[T * K] = {0};
    int64_t mbc[E], step_counts[E];
    const float *L = (const float *)logits.data;
    const uint8_t *mk = (const uint8_t *)mask.data;
    for (int st = 0; st < S; st++) {
        memset(step_counts, 0, sizeof step_counts);
        for (int mb = 0; mb < 2; mb++) { /* two micro-batches of T/2 tokens */
            const int64_t h = T / 2, t0 = mb * h;
            int32_t *idx = step_idx + t0 * K;
            dsmoe_router_output out = {idx, w, NULL, NULL, mbc};
            ASSERT_OK(dsmoe_router_forward(&rc, &out, L + ((size_t)st * T + t0) * E,
                                           dsmoe_balancer_bias(b), h, ws, wsn, 1));
            if (v->masked) {
                ASSERT_OK(dsmoe_balancer_accumulate(b, idx, mk + (size_t)st * T + t0, h, K));
                int64_t c[E];
                ASSERT_OK(dsmoe_load_counts(c, idx, mk + (size_t)st * T + t0, h, K, E));
                for (int i = 0; i < E; i++) step_counts[i] += c[i];
            } else {
                ASSERT_OK(dsmoe_balancer_accumulate_counts(b, mbc, h));
                for (int i = 0; i < E; i++) step_counts[i] += mbc[i];
            }
        }
        ASSERT_OK(dsmoe_balancer_step(b));
        const int64_t *want_c = (const int64_t *)counts.data + (size_t)st * E;
        const int64_t *last = dsmoe_balancer_counts_last(b);
        int same = 1;
        for (int i = 0; i < E; i++) same &= last[i] == want_c[i] && step_counts[i] == want_c[i];
        tl_checks++;
        if (!same) {
            TL_FAIL("%s step %d: counts differ from the reference", v->name, st);
            break;
        }
        char what[64];
        snprintf(what, sizeof what, "%s bias step %d", v->name, st);
        tl_allclose(what, dsmoe_balancer_bias(b), (const double *)bias.data + (size_t)st * E, E,
                    1e-6, 0);
        dsmoe_load_stats ls;
        ASSERT_OK(dsmoe_load_stats_compute(last, E, G, &ls));
        ASSERT_NEAR(ls.maxvio, ((const double *)maxvio.data)[st], 1e-12);
        if (is_sign) {
            const double *r = (const double *)stats.data + (size_t)st * 6;
            double gpt = -1;
            ASSERT_NEAR(ls.cv, r[1], 1e-12);
            ASSERT_NEAR(ls.entropy, r[2], 1e-12);
            ASSERT_EQ_INT(ls.dead, (int64_t)r[3]);
            ASSERT_NEAR(ls.group_maxvio, r[4], 1e-12);
            ASSERT_OK(dsmoe_load_groups_per_token(&gpt, step_idx, NULL, T, K, E, G));
            ASSERT_NEAR(gpt, r[5], 1e-12);
        }
    }
    dsmoe_balancer_info info;
    dsmoe_balancer_get_info(b, &info);
    ASSERT_EQ_INT(info.steps, S);
    free(ws);
    dsmoe_balancer_free(b);
done:
    dsmoe_array_free(&logits);
    dsmoe_array_free(&bias0);
    dsmoe_array_free(&mask);
    dsmoe_array_free(&counts);
    dsmoe_array_free(&bias);
    dsmoe_array_free(&maxvio);
    dsmoe_array_free(&stats);
}

static void test_steps(void) {
    const variant vs[] = {
        {"sign", DSMOE_BALANCE_RULE_SIGN, 0.01f, 0, 0, 0.0f, 0},
        {"prop", DSMOE_BALANCE_RULE_PROPORTIONAL, 0.01f, 0, 0, 0.0f, 0},
        {"center", DSMOE_BALANCE_RULE_SIGN, 0.01f, 1, 0, 0.0f, 0},
        {"sched", DSMOE_BALANCE_RULE_SIGN, 0.01f, 0, 3 * T, 0.002f, 0},
        {"masked", DSMOE_BALANCE_RULE_SIGN, 0.01f, 0, 0, 0.0f, 1},
    };
    for (size_t i = 0; i < sizeof vs / sizeof vs[0]; i++) run_variant(&vs[i]);
}

/* ------------------------------------------------------------- losses -- */

typedef struct loss_case {
    const char *name;
    dsmoe_balance_loss_kind kind;
    float alpha;
    int64_t seq_len;
    dsmoe_balance_count count_from;
    int normalize;
} loss_case;

static void run_losses(const char *rname, dsmoe_score_func f) {
    enum { LT = 24 };
    const loss_case cases[] = {
        {"seq", DSMOE_BALANCE_LOSS_SEQ, 0.3f, 8, DSMOE_BALANCE_COUNT_ROUTED, 1},
        {"seqtopk", DSMOE_BALANCE_LOSS_SEQ, 0.3f, 8, DSMOE_BALANCE_COUNT_TOPK, 1},
        {"seqraw", DSMOE_BALANCE_LOSS_SEQ, 0.3f, 8, DSMOE_BALANCE_COUNT_ROUTED, 0},
        {"expert", DSMOE_BALANCE_LOSS_EXPERT, 0.2f, 0, DSMOE_BALANCE_COUNT_ROUTED, 1},
        {"device", DSMOE_BALANCE_LOSS_DEVICE, 0.1f, 8, DSMOE_BALANCE_COUNT_ROUTED, 1},
        {"comm", DSMOE_BALANCE_LOSS_COMM, 0.15f, 8, DSMOE_BALANCE_COUNT_ROUTED, 1},
        {"switch", DSMOE_BALANCE_LOSS_SWITCH, 0.05f, 0, DSMOE_BALANCE_COUNT_ROUTED, 1},
        {"zloss", DSMOE_BALANCE_LOSS_ZLOSS, 0.01f, 0, DSMOE_BALANCE_COUNT_ROUTED, 1},
    };
    char rel[256];
    dsmoe_array logits = {0}, scores = {0}, indices = {0}, bias = {0};
    snprintf(rel, sizeof rel, "balance/losses/%s_logits.npy", rname);
    if (!load(rel, DSMOE_DTYPE_F32, &logits)) return;
    snprintf(rel, sizeof rel, "balance/losses/%s_scores.npy", rname);
    load(rel, DSMOE_DTYPE_F32, &scores);
    snprintf(rel, sizeof rel, "balance/losses/%s_indices.npy", rname);
    load(rel, DSMOE_DTYPE_I32, &indices);
    dsmoe_router_config rc = golden_router(f);
    if (rc.use_bias) {
        snprintf(rel, sizeof rel, "balance/losses/%s_bias.npy", rname);
        load(rel, DSMOE_DTYPE_F32, &bias);
    }
    if (!scores.data || !indices.data || (rc.use_bias && !bias.data)) goto done;
    ASSERT_EQ_INT(logits.shape[0], LT);

    /* the C router makes the same choice and (to fp32 accuracy) the same scores */
    {
        size_t wsn = dsmoe_router_workspace_size(&rc, LT, 0, DSMOE_DTYPE_F32, 1);
        void *ws = malloc(wsn);
        int32_t idx[LT * K];
        float w[LT * K], s[LT * E];
        dsmoe_router_output out = {idx, w, s, NULL, NULL};
        ASSERT_OK(dsmoe_router_forward(&rc, &out, (const float *)logits.data,
                                       rc.use_bias ? (const float *)bias.data : NULL, LT, ws, wsn, 1));
        ASSERT_TRUE(memcmp(idx, indices.data, sizeof idx) == 0);
        double sref[LT * E];
        for (int i = 0; i < LT * E; i++) sref[i] = ((const float *)scores.data)[i];
        tl_allclose("router scores", s, sref, LT * E, 1e-7, 1e-6);
        free(ws);
    }

    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const loss_case *lcase = &cases[c];
        dsmoe_array Lref = {0}, Gref = {0};
        snprintf(rel, sizeof rel, "balance/losses/%s_%s_loss.npy", rname, lcase->name);
        if (!load(rel, DSMOE_DTYPE_F64, &Lref)) continue;
        snprintf(rel, sizeof rel, "balance/losses/%s_%s_dlogits.npy", rname, lcase->name);
        if (!load(rel, DSMOE_DTYPE_F64, &Gref)) {
            dsmoe_array_free(&Lref);
            continue;
        }
        dsmoe_balance_loss_config lc;
        dsmoe_balance_loss_config_default(lcase->kind, &lc);
        lc.alpha = lcase->alpha;
        lc.seq_len = lcase->seq_len;
        lc.count_from = lcase->count_from;
        lc.normalize_scores = lcase->normalize;
        lc.n_devices = 4;  /* = G */
        lc.device_topm = 2; /* = TG */
        size_t wsn = dsmoe_balance_loss_workspace_size(&lc, &rc, LT);
        void *ws = tl_guarded_alloc(wsn);
        float *dl = (float *)tl_guarded_alloc(sizeof(float) * LT * E);
        for (int i = 0; i < LT * E; i++) dl[i] = 0.0f;
        double L = 0;
        ASSERT_OK(dsmoe_balance_loss(&lc, &rc, &L, dl, (const float *)scores.data,
                                     lcase->count_from == DSMOE_BALANCE_COUNT_TOPK
                                         ? NULL
                                         : (const int32_t *)indices.data,
                                     (const float *)logits.data, LT, ws, wsn, 2));
        double lref = ((const double *)Lref.data)[0];
        char what[96];
        snprintf(what, sizeof what, "%s %s loss %.12g vs %.12g", rname, lcase->name, L, lref);
        tl_checks++;
        if (!(fabs(L - lref) <= 1e-6 * fabs(lref) + 1e-12)) TL_FAIL("%s", what);
        /* gradient scale: tolerance relative to the largest reference entry */
        double gmax = 0;
        for (int i = 0; i < LT * E; i++) gmax = fmax(gmax, fabs(((const double *)Gref.data)[i]));
        snprintf(what, sizeof what, "%s %s dlogits", rname, lcase->name);
        tl_allclose(what, dl, (const double *)Gref.data, LT * E, 1e-5 * gmax, 1e-4);
        ASSERT_TRUE(tl_guard_ok(ws));
        ASSERT_TRUE(tl_guard_ok(dl));
        tl_guarded_free(ws);
        tl_guarded_free(dl);
        dsmoe_array_free(&Lref);
        dsmoe_array_free(&Gref);
    }
done:
    dsmoe_array_free(&logits);
    dsmoe_array_free(&scores);
    dsmoe_array_free(&indices);
    dsmoe_array_free(&bias);
}

static void test_losses_sigmoid(void) { run_losses("sig", DSMOE_SCORE_FUNC_SIGMOID); }
static void test_losses_softmax(void) { run_losses("smx", DSMOE_SCORE_FUNC_SOFTMAX); }

/* The batch of 24 tokens split in two halves of 12 (two processes): each half's loss and
 * gradient with f from the summed counts of the halves (dsmoe_load_counts of each) against
 * the reference, and the mean of the halves against dsmoe_balance_loss over the batch. */
static void run_splits(const char *rname, dsmoe_score_func f) {
    enum { LT = 24, H = LT / 2 };
    const struct {
        const char *name;
        dsmoe_balance_loss_kind kind;
        float alpha;
    } cases[] = {{"expert", DSMOE_BALANCE_LOSS_EXPERT, 0.2f},
                 {"switch", DSMOE_BALANCE_LOSS_SWITCH, 0.05f},
                 {"device1", DSMOE_BALANCE_LOSS_DEVICE, 0.1f}};
    char rel[256];
    dsmoe_array logits = {0}, scores = {0}, indices = {0};
    snprintf(rel, sizeof rel, "balance/losses/%s_logits.npy", rname);
    if (!load(rel, DSMOE_DTYPE_F32, &logits)) return;
    snprintf(rel, sizeof rel, "balance/losses/%s_scores.npy", rname);
    load(rel, DSMOE_DTYPE_F32, &scores);
    snprintf(rel, sizeof rel, "balance/losses/%s_indices.npy", rname);
    load(rel, DSMOE_DTYPE_I32, &indices);
    if (!scores.data || !indices.data) goto done;
    const float *s = (const float *)scores.data, *u = (const float *)logits.data;
    const int32_t *idx = (const int32_t *)indices.data;
    const dsmoe_router_config rc = golden_router(f);
    /* each half counts its tokens; the sum is the batch's */
    int64_t counts[E], half_counts[E];
    ASSERT_OK(dsmoe_load_counts(counts, idx, NULL, H, K, E));
    ASSERT_OK(dsmoe_load_counts(half_counts, idx + H * K, NULL, H, K, E));
    for (int i = 0; i < E; i++) counts[i] += half_counts[i];
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        dsmoe_balance_loss_config lc;
        dsmoe_balance_loss_config_default(cases[c].kind, &lc);
        lc.alpha = cases[c].alpha;
        lc.n_devices = G;
        size_t wsn = dsmoe_balance_loss_workspace_size(&lc, &rc, LT);
        void *ws = malloc(wsn);
        float whole_g[LT * E], half_g[LT * E];
        double whole = 0, mean = 0;
        memset(whole_g, 0, sizeof whole_g);
        memset(half_g, 0, sizeof half_g);
        ASSERT_OK(dsmoe_balance_loss(&lc, &rc, &whole, whole_g, s, idx, u, LT, ws, wsn, 1));
        for (int h = 0; h < 2; h++) {
            double L = 0;
            /* indices are not read with external counts: NULL */
            ASSERT_OK(dsmoe_balance_loss_ex(&lc, &rc, &L, half_g + h * H * E, s + h * H * E, NULL,
                                            u + h * H * E, H, counts, LT, ws, wsn, 2));
            mean += L / 2;
            dsmoe_array Lref = {0}, Gref = {0};
            snprintf(rel, sizeof rel, "balance/losses/%s_%s_half%d_loss.npy", rname,
                     cases[c].name, h);
            if (!load(rel, DSMOE_DTYPE_F64, &Lref)) continue;
            snprintf(rel, sizeof rel, "balance/losses/%s_%s_half%d_dlogits.npy", rname,
                     cases[c].name, h);
            if (load(rel, DSMOE_DTYPE_F64, &Gref)) {
                const double lref = ((const double *)Lref.data)[0];
                char what[128];
                snprintf(what, sizeof what, "%s %s half %d loss %.12g vs %.12g", rname,
                         cases[c].name, h, L, lref);
                tl_checks++;
                if (!(fabs(L - lref) <= 1e-6 * fabs(lref) + 1e-12)) TL_FAIL("%s", what);
                double gmax = 0;
                for (int i = 0; i < H * E; i++)
                    gmax = fmax(gmax, fabs(((const double *)Gref.data)[i]));
                snprintf(what, sizeof what, "%s %s half %d dlogits", rname, cases[c].name, h);
                tl_allclose(what, half_g + h * H * E, (const double *)Gref.data, H * E,
                            1e-5 * gmax, 1e-4);
            }
            dsmoe_array_free(&Lref);
            dsmoe_array_free(&Gref);
        }
        /* the processes' mean: the whole batch's loss and gradient */
        ASSERT_NEAR(mean, whole, 1e-6 * whole);
        double gmax = 0, dmax = 0;
        for (int i = 0; i < LT * E; i++) {
            gmax = fmax(gmax, fabs((double)whole_g[i]));
            dmax = fmax(dmax, fabs((double)half_g[i] / 2 - (double)whole_g[i]));
        }
        ASSERT_TRUE(gmax > 0 && dmax <= 1e-6 * gmax);
        free(ws);
    }
    /* refused: several sequences, the comm loss, no tokens counted, a negative count */
    {
        dsmoe_balance_loss_config lc;
        dsmoe_balance_loss_config_default(DSMOE_BALANCE_LOSS_EXPERT, &lc);
        char ws[65536];
        double L = 7;
        lc.seq_len = 6;
        ASSERT_STATUS(dsmoe_balance_loss_ex(&lc, &rc, &L, NULL, s, NULL, u, H, counts, LT, ws,
                                            sizeof ws, 1),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "one sequence") != NULL);
        lc.seq_len = 0;
        ASSERT_STATUS(dsmoe_balance_loss_ex(&lc, &rc, &L, NULL, s, NULL, u, H, counts, 0, ws,
                                            sizeof ws, 1),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "counts_T") != NULL);
        counts[5] = -1;
        ASSERT_STATUS(dsmoe_balance_loss_ex(&lc, &rc, &L, NULL, s, NULL, u, H, counts, LT, ws,
                                            sizeof ws, 1),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "counts[5]") != NULL);
        counts[5] = 0;
        dsmoe_balance_loss_config_default(DSMOE_BALANCE_LOSS_COMM, &lc);
        lc.n_devices = G;
        ASSERT_STATUS(dsmoe_balance_loss_ex(&lc, &rc, &L, NULL, s, idx, u, H, counts, LT, ws,
                                            sizeof ws, 1),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "comm") != NULL);
        ASSERT_TRUE(L == 7); /* unchanged */
    }
done:
    dsmoe_array_free(&logits);
    dsmoe_array_free(&scores);
    dsmoe_array_free(&indices);
}

static void test_split_sigmoid(void) { run_splits("sig", DSMOE_SCORE_FUNC_SIGMOID); }
static void test_split_softmax(void) { run_splits("smx", DSMOE_SCORE_FUNC_SOFTMAX); }

int main(void) {
    RUN(test_steps);
    RUN(test_losses_sigmoid);
    RUN(test_losses_softmax);
    RUN(test_split_sigmoid);
    RUN(test_split_softmax);
    return TEST_SUMMARY();
}
