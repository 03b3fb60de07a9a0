/*
 * test_balance.c — unit and property tests of the bias controller, the balance
 * losses and the load statistics: update directions, sign(0) = 0, re-centring,
 * schedule, micro-batches, padding masks, the all-reduce hook, save/load round
 * trips, bf16 storage checks, perfect-balance values, bad input, thread
 * determinism.
 */
#include "testlib.h"

static dsmoe_balancer *make(int32_t E, dsmoe_balance_rule rule, float gamma, int recenter) {
    dsmoe_balancer_config c;
    dsmoe_balancer_config_default(E, &c);
    c.rule = rule;
    c.gamma = gamma;
    c.recenter = recenter;
    dsmoe_balancer *b = NULL;
    ASSERT_OK(dsmoe_balancer_create(&c, &b));
    return b;
}

/* ------------------------------------------------------------- config -- */

static void test_config(void) {
    dsmoe_balancer_config c;
    dsmoe_balancer_config_default(256, &c);
    ASSERT_EQ_INT(c.rule, DSMOE_BALANCE_RULE_SIGN);
    ASSERT_TRUE(c.gamma == 0.001f);
    ASSERT_OK(dsmoe_balancer_config_validate(&c));
    dsmoe_balancer_config bad = c;
    bad.n_experts = 0;
    ASSERT_STATUS(dsmoe_balancer_config_validate(&bad), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "n_experts") != NULL);
    bad = c;
    bad.gamma = -1.0f;
    ASSERT_STATUS(dsmoe_balancer_config_validate(&bad), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "gamma") != NULL);
    bad = c;
    bad.gamma = NAN;
    ASSERT_STATUS(dsmoe_balancer_config_validate(&bad), DSMOE_STATUS_INVALID_CONFIG);
    bad = c;
    bad.gamma_after = INFINITY;
    ASSERT_STATUS(dsmoe_balancer_config_validate(&bad), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "gamma_after") != NULL);
    bad = c;
    bad.rule = (dsmoe_balance_rule)7;
    ASSERT_STATUS(dsmoe_balancer_config_validate(&bad), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "rule") != NULL);
    bad = c;
    bad.gamma_until_tokens = -5;
    ASSERT_STATUS(dsmoe_balancer_config_validate(&bad), DSMOE_STATUS_INVALID_CONFIG);
    bad = c;
    bad.recenter = 2;
    ASSERT_STATUS(dsmoe_balancer_config_validate(&bad), DSMOE_STATUS_INVALID_CONFIG);
    dsmoe_balancer *b = (dsmoe_balancer *)&c; /* must be overwritten with NULL */
    bad = c;
    bad.n_experts = 70000;
    ASSERT_STATUS(dsmoe_balancer_create(&bad, &b), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(b == NULL);
    ASSERT_STATUS(dsmoe_balancer_create(NULL, &b), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_balancer_free(NULL);
    dsmoe_balancer_center_bias(NULL);
    ASSERT_TRUE(dsmoe_balancer_bias(NULL) == NULL);
}

/* ------------------------------------------------------- update rules -- */

static void test_sign_directions(void) {
    const int32_t E = 37;
    tl_seed(11);
    for (int trial = 0; trial < 20; trial++) {
        dsmoe_balancer *b = make(E, DSMOE_BALANCE_RULE_SIGN, 0.001f, 0);
        float b0[37];
        for (int i = 0; i < E; i++) b0[i] = (float)(0.1 * tl_normal());
        ASSERT_OK(dsmoe_balancer_set_bias(b, b0));
        /* random counts, with experts 1 and 2 exactly at the mean M: expert 0 takes
         * c_0 = (E - 2) M - sum(others) > 0 so that the total is E M */
        int64_t c[37], rest = 0, sum = 0;
        for (int i = 3; i < E; i++) {
            c[i] = (int64_t)(tl_uniform() * 10);
            rest += c[i];
        }
        int64_t M = rest / (E - 3) + 1 + (int64_t)(tl_uniform() * 3);
        c[1] = c[2] = M;
        c[0] = (E - 2) * M - rest;
        for (int i = 0; i < E; i++) sum += c[i];
        ASSERT_EQ_INT(sum, E * M);
        ASSERT_OK(dsmoe_balancer_accumulate_counts(b, c, 100));
        ASSERT_OK(dsmoe_balancer_step(b));
        const float *nb = dsmoe_balancer_bias(b);
        double m = (double)sum / E;
        for (int i = 0; i < E; i++) {
            double want = (double)c[i] > m ? -0.001 : ((double)c[i] < m ? 0.001 : 0.0);
            double got = (double)nb[i] - (double)b0[i];
            if ((double)c[i] > m) ASSERT_TRUE(nb[i] < b0[i]);      /* overloaded: down */
            else if ((double)c[i] < m) ASSERT_TRUE(nb[i] > b0[i]); /* underloaded: up */
            else tl_same_bits("sign(0) = 0", &nb[i], &b0[i], 1); /* unchanged */
            ASSERT_NEAR(got, want, 3e-8); /* one fp32 rounding of b0 + γ */
        }
        dsmoe_balancer_free(b);
    }
}

static void test_sign_zero_exact(void) {
    /* Exactly-average experts keep their bias bit for bit; a zero bias moves to ±γ. */
    dsmoe_balancer *b = make(4, DSMOE_BALANCE_RULE_SIGN, 0.001f, 0);
    int64_t c[4] = {1, 2, 3, 2};
    ASSERT_OK(dsmoe_balancer_accumulate_counts(b, c, 2));
    ASSERT_OK(dsmoe_balancer_step(b));
    const float *nb = dsmoe_balancer_bias(b);
    ASSERT_TRUE(nb[0] == 0.001f && nb[1] == 0.0f && nb[2] == -0.001f && nb[3] == 0.0f);
    dsmoe_balancer_info info;
    dsmoe_balancer_get_info(b, &info);
    ASSERT_EQ_INT(info.steps, 1);
    ASSERT_EQ_INT(info.tokens, 2);
    ASSERT_EQ_INT(info.pending_tokens, 0);
    ASSERT_NEAR(info.last_gamma, 0.001, 1e-10);
    ASSERT_EQ_INT(dsmoe_balancer_counts_last(b)[2], 3);
    ASSERT_EQ_INT(dsmoe_balancer_counts_pending(b)[2], 0);
    /* a step without tokens changes nothing but the step counter */
    ASSERT_OK(dsmoe_balancer_step(b));
    ASSERT_TRUE(nb[0] == 0.001f && nb[2] == -0.001f);
    dsmoe_balancer_get_info(b, &info);
    ASSERT_EQ_INT(info.steps, 2);
    ASSERT_EQ_INT(dsmoe_balancer_counts_total(b)[2], 3);
    dsmoe_balancer_free(b);
}

static void test_proportional(void) {
    const int32_t E = 16;
    tl_seed(5);
    dsmoe_balancer *b = make(E, DSMOE_BALANCE_RULE_PROPORTIONAL, 0.01f, 0);
    int64_t c[16], sum = 0;
    for (int i = 0; i < E; i++) {
        c[i] = (int64_t)(tl_uniform() * 50);
        sum += c[i];
    }
    ASSERT_OK(dsmoe_balancer_accumulate_counts(b, c, 10));
    ASSERT_OK(dsmoe_balancer_step(b));
    const float *nb = dsmoe_balancer_bias(b);
    double m = (double)sum / E;
    for (int i = 0; i < E; i++) {
        ASSERT_NEAR(nb[i], (double)0.01f * (m - (double)c[i]) / m, 1e-8);
        if ((double)c[i] > m) ASSERT_TRUE(nb[i] < 0.0f);
        if ((double)c[i] < m) ASSERT_TRUE(nb[i] > 0.0f);
    }
    dsmoe_balancer_free(b);
}

static void test_recenter(void) {
    const int32_t E = 64;
    tl_seed(9);
    for (int rule = 0; rule < 2; rule++) {
        dsmoe_balancer *b = make(E, (dsmoe_balance_rule)rule, 0.003f, 1);
        for (int st = 0; st < 5; st++) {
            int64_t c[64];
            for (int i = 0; i < E; i++) c[i] = (int64_t)(tl_uniform() * tl_uniform() * 200);
            float before[64];
            memcpy(before, dsmoe_balancer_bias(b), sizeof before);
            ASSERT_OK(dsmoe_balancer_accumulate_counts(b, c, 50));
            ASSERT_OK(dsmoe_balancer_step(b));
            const float *nb = dsmoe_balancer_bias(b);
            double dsum = 0.0, bsum = 0.0;
            for (int i = 0; i < E; i++) {
                dsum += (double)nb[i] - (double)before[i];
                bsum += nb[i];
            }
            ASSERT_NEAR(dsum, 0.0, 1e-8); /* updates sum to zero (up to fp32 rounding) */
            ASSERT_NEAR(bsum, 0.0, 1e-7); /* the bias stays centred */
        }
        dsmoe_balancer_free(b);
    }
}

static void test_schedule(void) {
    dsmoe_balancer_config c;
    dsmoe_balancer_config_default(4, &c);
    c.gamma = 0.01f;
    c.gamma_until_tokens = 25;
    c.gamma_after = 0.0f;
    dsmoe_balancer *b = NULL;
    ASSERT_OK(dsmoe_balancer_create(&c, &b));
    int64_t cnt[4] = {4, 0, 0, 0};
    /* steps of 10 tokens: before steps 1, 2, 3 the applied tokens are 0, 10, 20 (< 25),
     * so γ; from step 4 on (30 >= 25) γ_after = 0. */
    float expect[6] = {-0.01f, -0.02f, -0.03f, -0.03f, -0.03f, -0.03f};
    for (int st = 0; st < 6; st++) {
        ASSERT_OK(dsmoe_balancer_accumulate_counts(b, cnt, 10));
        ASSERT_OK(dsmoe_balancer_step(b));
        ASSERT_NEAR(dsmoe_balancer_bias(b)[0], expect[st], 1e-7);
        dsmoe_balancer_info info;
        dsmoe_balancer_get_info(b, &info);
        ASSERT_NEAR(info.last_gamma, st < 3 ? 0.01 : 0.0, 1e-9);
    }
    dsmoe_balancer_free(b);
}

/* --------------------------------------------------- accumulate, mask -- */

static void test_accumulate(void) {
    const int32_t E = 8, K = 2;
    int32_t idx[6 * 2] = {0, 1, 2, 3, 0, 7, 7, 6, 5, 4, 0, 1};
    uint8_t mask[6] = {1, 1, 0, 1, 0, 1};
    dsmoe_balancer *a = make(E, DSMOE_BALANCE_RULE_SIGN, 0.001f, 0);
    dsmoe_balancer *b = make(E, DSMOE_BALANCE_RULE_SIGN, 0.001f, 0);
    /* two micro-batches == one batch */
    ASSERT_OK(dsmoe_balancer_accumulate(a, idx, mask, 3, K));
    ASSERT_OK(dsmoe_balancer_accumulate(a, idx + 3 * K, mask + 3, 3, K));
    ASSERT_OK(dsmoe_balancer_accumulate(b, idx, mask, 6, K));
    const int64_t *pa = dsmoe_balancer_counts_pending(a), *pb = dsmoe_balancer_counts_pending(b);
    int64_t want[8] = {2, 2, 1, 1, 0, 0, 1, 1}; /* tokens 0, 1, 3, 5 */
    for (int i = 0; i < E; i++) {
        ASSERT_EQ_INT(pa[i], want[i]);
        ASSERT_EQ_INT(pb[i], want[i]);
    }
    dsmoe_balancer_info info;
    dsmoe_balancer_get_info(a, &info);
    ASSERT_EQ_INT(info.pending_tokens, 4);
    /* same through counts */
    int64_t counts[8];
    ASSERT_OK(dsmoe_load_counts(counts, idx, mask, 6, K, E));
    for (int i = 0; i < E; i++) ASSERT_EQ_INT(counts[i], want[i]);
    /* a bad index changes nothing */
    int32_t badidx[4] = {0, 1, 2, 8};
    ASSERT_STATUS(dsmoe_balancer_accumulate(a, badidx, NULL, 2, K), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "indices[1, 1]") != NULL);
    for (int i = 0; i < E; i++) ASSERT_EQ_INT(pa[i], want[i]);
    int64_t neg[8] = {0, 0, -1, 0, 0, 0, 0, 0};
    ASSERT_STATUS(dsmoe_balancer_accumulate_counts(a, neg, 1), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "counts[2]") != NULL);
    ASSERT_STATUS(dsmoe_balancer_accumulate_counts(a, want, -1), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_balancer_accumulate_counts(a, NULL, 1), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_balancer_get_info(a, &info);
    ASSERT_EQ_INT(info.pending_tokens, 4);
    ASSERT_OK(dsmoe_balancer_step(a));
    ASSERT_OK(dsmoe_balancer_step(b));
    ASSERT_TRUE(tl_same_bits("micro-batches", dsmoe_balancer_bias(a), dsmoe_balancer_bias(b), E));
    dsmoe_balancer_free(a);
    dsmoe_balancer_free(b);
}

/* --------------------------------------------------------- all-reduce -- */

typedef struct fake_world {
    int64_t other[9]; /* what the other process contributes: E counts + tokens */
    int calls;
    int fail;
} fake_world;

static int fake_allreduce(int64_t *v, int64_t n, void *user) {
    fake_world *w = (fake_world *)user;
    w->calls++;
    if (w->fail) return 3;
    for (int64_t i = 0; i < n; i++) v[i] += w->other[i];
    return 0;
}

static void test_allreduce(void) {
    const int32_t E = 8;
    fake_world w = {{0, 0, 0, 0, 9, 9, 9, 9, 5}, 0, 0};
    dsmoe_balancer *b = make(E, DSMOE_BALANCE_RULE_SIGN, 0.5f, 0);
    dsmoe_balancer_set_allreduce(b, fake_allreduce, &w);
    int64_t mine[8] = {9, 9, 9, 9, 0, 0, 0, 0}; /* alone: first half overloaded */
    ASSERT_OK(dsmoe_balancer_accumulate_counts(b, mine, 5));
    /* a failing all-reduce changes nothing */
    w.fail = 1;
    ASSERT_STATUS(dsmoe_balancer_step(b), DSMOE_STATUS_IO);
    ASSERT_EQ_INT(dsmoe_balancer_counts_pending(b)[0], 9);
    ASSERT_TRUE(dsmoe_balancer_bias(b)[0] == 0.0f);
    dsmoe_balancer_info info;
    dsmoe_balancer_get_info(b, &info);
    ASSERT_EQ_INT(info.steps, 0);
    w.fail = 0;
    ASSERT_OK(dsmoe_balancer_step(b));
    ASSERT_EQ_INT(w.calls, 2);
    /* the global counts are all 9: balanced, nothing moves */
    for (int i = 0; i < E; i++) ASSERT_TRUE(dsmoe_balancer_bias(b)[i] == 0.0f);
    for (int i = 0; i < E; i++) ASSERT_EQ_INT(dsmoe_balancer_counts_last(b)[i], 9);
    dsmoe_balancer_get_info(b, &info);
    ASSERT_EQ_INT(info.tokens, 10);
    /* without the other process the first half would have gone down */
    dsmoe_balancer_set_allreduce(b, NULL, NULL);
    ASSERT_OK(dsmoe_balancer_accumulate_counts(b, mine, 5));
    ASSERT_OK(dsmoe_balancer_step(b));
    ASSERT_TRUE(dsmoe_balancer_bias(b)[0] == -0.5f && dsmoe_balancer_bias(b)[7] == 0.5f);
    dsmoe_balancer_free(b);
}

/* ---------------------------------------------------------- save/load -- */

static void run_steps(dsmoe_balancer *b, int steps, uint64_t seed) {
    const int32_t E = dsmoe_balancer_get_config(b)->n_experts;
    tl_seed(seed);
    int64_t c[64];
    for (int st = 0; st < steps; st++) {
        for (int i = 0; i < E; i++) c[i] = (int64_t)(tl_uniform() * (1 + i % 7) * 20);
        ASSERT_OK(dsmoe_balancer_accumulate_counts(b, c, 40));
        ASSERT_OK(dsmoe_balancer_step(b));
    }
}

static void same_state(const dsmoe_balancer *a, const dsmoe_balancer *b) {
    const dsmoe_balancer_config *ca = dsmoe_balancer_get_config(a), *cb = dsmoe_balancer_get_config(b);
    ASSERT_EQ_INT(ca->n_experts, cb->n_experts);
    ASSERT_EQ_INT(ca->rule, cb->rule);
    ASSERT_TRUE(ca->gamma == cb->gamma && ca->gamma_after == cb->gamma_after);
    ASSERT_EQ_INT(ca->gamma_until_tokens, cb->gamma_until_tokens);
    ASSERT_EQ_INT(ca->recenter, cb->recenter);
    int32_t E = ca->n_experts;
    tl_same_bits("bias", dsmoe_balancer_bias(a), dsmoe_balancer_bias(b), E);
    dsmoe_balancer_info ia, ib;
    dsmoe_balancer_get_info(a, &ia);
    dsmoe_balancer_get_info(b, &ib);
    ASSERT_EQ_INT(ia.steps, ib.steps);
    ASSERT_EQ_INT(ia.tokens, ib.tokens);
    ASSERT_EQ_INT(ia.pending_tokens, ib.pending_tokens);
    ASSERT_TRUE(ia.last_gamma == ib.last_gamma);
    for (int i = 0; i < E; i++) {
        ASSERT_EQ_INT(dsmoe_balancer_counts_pending(a)[i], dsmoe_balancer_counts_pending(b)[i]);
        ASSERT_EQ_INT(dsmoe_balancer_counts_last(a)[i], dsmoe_balancer_counts_last(b)[i]);
        ASSERT_EQ_INT(dsmoe_balancer_counts_total(a)[i], dsmoe_balancer_counts_total(b)[i]);
    }
}

static void test_save_load(void) {
    dsmoe_balancer_config c;
    dsmoe_balancer_config_default(48, &c);
    c.rule = DSMOE_BALANCE_RULE_PROPORTIONAL;
    c.gamma = 0.0123f;
    c.gamma_until_tokens = 300;
    c.gamma_after = 0.0007f;
    c.recenter = 1;
    dsmoe_balancer *a = NULL, *b = NULL;
    ASSERT_OK(dsmoe_balancer_create(&c, &a));
    run_steps(a, 5, 1);
    int64_t pend[48];
    for (int i = 0; i < 48; i++) pend[i] = i;
    ASSERT_OK(dsmoe_balancer_accumulate_counts(a, pend, 7)); /* mid-step state */
    const char *path = tl_tmp("balancer_roundtrip.safetensors");
    ASSERT_OK(dsmoe_balancer_save(a, path));
    ASSERT_OK(dsmoe_balancer_load(path, &b));
    if (!b) return;
    same_state(a, b);
    /* a resumed run continues exactly: same traffic, same bits */
    run_steps(a, 10, 2);
    run_steps(b, 10, 2);
    same_state(a, b);

    /* several layers in one file under prefixes */
    dsmoe_safetensors_writer *w = NULL;
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    ASSERT_OK(dsmoe_balancer_write(a, w, "model.layers.3.mlp.gate."));
    ASSERT_OK(dsmoe_balancer_write(b, w, "model.layers.4.mlp.gate."));
    const char *path2 = tl_tmp("balancer_layers.safetensors");
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path2));
    dsmoe_safetensors_writer_free(w);
    dsmoe_safetensors *sf = NULL;
    ASSERT_OK(dsmoe_safetensors_open(path2, &sf));
    dsmoe_tensor_view v;
    ASSERT_OK(dsmoe_safetensors_get(sf, "model.layers.3.mlp.gate.e_score_correction_bias", &v));
    ASSERT_EQ_INT(v.dtype, DSMOE_DTYPE_F32);
    ASSERT_EQ_INT(v.shape[0], 48);
    dsmoe_balancer *l4 = NULL;
    ASSERT_OK(dsmoe_balancer_read(sf, "model.layers.4.mlp.gate.", &l4));
    if (l4) same_state(b, l4);
    dsmoe_balancer *none = (dsmoe_balancer *)&c;
    ASSERT_STATUS(dsmoe_balancer_read(sf, "model.layers.5.mlp.gate.", &none), DSMOE_STATUS_FORMAT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "model.layers.5.mlp.gate.") != NULL);
    ASSERT_TRUE(none == NULL);
    dsmoe_safetensors_close(sf);
    dsmoe_balancer_free(l4);

    /* a file without balancer tensors, and one with a wrong shape */
    float x[3] = {1, 2, 3};
    int64_t shp[1] = {3};
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    ASSERT_OK(dsmoe_safetensors_writer_add(w, "e_score_correction_bias", DSMOE_DTYPE_F32, 1, shp, x));
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path2));
    dsmoe_safetensors_writer_free(w);
    dsmoe_balancer *bad = NULL;
    ASSERT_STATUS(dsmoe_balancer_load(path2, &bad), DSMOE_STATUS_FORMAT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "balancer.state") != NULL);
    int64_t state[8] = {1, 48, 0, 0, 0, 0, 0, 0};
    float rates[3] = {0.001f, 0.0f, 0.0f};
    int64_t shs[1] = {8}, shr[1] = {3};
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    ASSERT_OK(dsmoe_safetensors_writer_add(w, "e_score_correction_bias", DSMOE_DTYPE_F32, 1, shp, x));
    ASSERT_OK(dsmoe_safetensors_writer_add(w, "balancer.state", DSMOE_DTYPE_I64, 1, shs, state));
    ASSERT_OK(dsmoe_safetensors_writer_add(w, "balancer.rates", DSMOE_DTYPE_F32, 1, shr, rates));
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path2));
    dsmoe_safetensors_writer_free(w);
    ASSERT_STATUS(dsmoe_balancer_load(path2, &bad), DSMOE_STATUS_FORMAT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "e_score_correction_bias") != NULL);
    state[0] = 2; /* future format */
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    ASSERT_OK(dsmoe_safetensors_writer_add(w, "balancer.state", DSMOE_DTYPE_I64, 1, shs, state));
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path2));
    dsmoe_safetensors_writer_free(w);
    ASSERT_STATUS(dsmoe_balancer_load(path2, &bad), DSMOE_STATUS_FORMAT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "format") != NULL);
    ASSERT_TRUE(dsmoe_balancer_load(tl_tmp("no_such_balancer.safetensors"), &bad) != DSMOE_OK);
    ASSERT_TRUE(bad == NULL);
    dsmoe_balancer_free(a);
    dsmoe_balancer_free(b);
}

static void test_set_bias(void) {
    dsmoe_balancer *b = make(4, DSMOE_BALANCE_RULE_SIGN, 0.001f, 0);
    float ok[4] = {1, 2, 3, 6}, bad[4] = {1, NAN, 3, 4};
    ASSERT_OK(dsmoe_balancer_set_bias(b, ok));
    ASSERT_STATUS(dsmoe_balancer_set_bias(b, bad), DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "bias[1]") != NULL);
    ASSERT_TRUE(dsmoe_balancer_bias(b)[1] == 2.0f); /* unchanged */
    dsmoe_balancer_center_bias(b);
    ASSERT_TRUE(dsmoe_balancer_bias(b)[0] == -2.0f && dsmoe_balancer_bias(b)[3] == 3.0f);
    dsmoe_balancer_free(b);
}

/* ------------------------------------------------------------- bf16 -- */

static void test_bf16_check(void) {
    /* Around 4.0 the bf16 spacing is 2^-5 = 0.03125: values 0.001 apart collapse and a
     * ±0.001 step is lost; after centring around 0 they stay distinct. */
    float b[6] = {4.000f, 4.001f, 4.002f, 4.1f, 3.9f, 4.003f};
    dsmoe_bias_bf16_report r;
    ASSERT_OK(dsmoe_bias_bf16_check(b, 6, 0.001f, &r));
    ASSERT_EQ_INT(r.distinct_f32, 6);
    ASSERT_TRUE(r.distinct_bf16 < 6);
    ASSERT_EQ_INT(r.collapsed, 4); /* 4.000 .. 4.003 all round to 4.0 */
    ASSERT_EQ_INT(r.step_lost, 6);
    ASSERT_TRUE(r.max_abs_error > 0.001f);
    ASSERT_NEAR(r.mean, 4.001, 1e-5);
    dsmoe_bias_center(b, 6);
    dsmoe_bias_bf16_report rc;
    ASSERT_OK(dsmoe_bias_bf16_check(b, 6, 0.001f, &rc));
    ASSERT_EQ_INT(rc.distinct_bf16, 6);
    ASSERT_EQ_INT(rc.collapsed, 0);
    ASSERT_NEAR(rc.mean, 0.0, 1e-7);
    ASSERT_TRUE(rc.step_lost < 6);
    /* exact duplicates in fp32 are not "collapsed" */
    float d[3] = {0.5f, 0.5f, 0.25f};
    ASSERT_OK(dsmoe_bias_bf16_check(d, 3, 0.0f, &r));
    ASSERT_EQ_INT(r.distinct_f32, 2);
    ASSERT_EQ_INT(r.collapsed, 0);
    ASSERT_EQ_INT(r.step_lost, 0);
    /* fp32 noise far below a step is not a collapse when gamma sets the resolution */
    float noisy[2] = {0.003f, nextafterf(0.003f, 1.0f)};
    ASSERT_OK(dsmoe_bias_bf16_check(noisy, 2, 0.001f, &r));
    ASSERT_EQ_INT(r.distinct_f32, 2);
    ASSERT_EQ_INT(r.distinct_bf16, 1);
    ASSERT_EQ_INT(r.collapsed, 0);
    ASSERT_OK(dsmoe_bias_bf16_check(noisy, 2, 0.0f, &r));
    ASSERT_EQ_INT(r.collapsed, 2);
    float nan[2] = {0.0f, NAN};
    ASSERT_STATUS(dsmoe_bias_bf16_check(nan, 2, 0.0f, &r), DSMOE_STATUS_NON_FINITE);
    ASSERT_STATUS(dsmoe_bias_bf16_check(d, 0, 0.0f, &r), DSMOE_STATUS_INVALID_ARGUMENT);
}

/* -------------------------------------------------------- statistics -- */

static void test_load_stats(void) {
    int64_t c[8] = {0, 2, 2, 4, 8, 0, 4, 4}; /* total 24, mean 3 */
    dsmoe_load_stats s;
    ASSERT_OK(dsmoe_load_stats_compute(c, 8, 2, &s));
    ASSERT_EQ_INT(s.total, 24);
    ASSERT_NEAR(s.mean, 3.0, 0);
    ASSERT_EQ_INT(s.max, 8);
    ASSERT_EQ_INT(s.min, 0);
    ASSERT_EQ_INT(s.argmax, 4);
    ASSERT_EQ_INT(s.dead, 2);
    ASSERT_NEAR(s.maxvio, 5.0 / 3.0, 1e-15);
    double var = (9 + 1 + 1 + 1 + 25 + 9 + 1 + 1) / 8.0;
    ASSERT_NEAR(s.cv, sqrt(var) / 3.0, 1e-15);
    double h = 0;
    for (int i = 0; i < 8; i++)
        if (c[i]) h -= (c[i] / 24.0) * log(c[i] / 24.0);
    ASSERT_NEAR(s.entropy, h / log(8.0), 1e-15);
    /* groups {0,2,2,4} = 8 and {8,0,4,4} = 16; mean 12 */
    ASSERT_NEAR(s.group_maxvio, 4.0 / 12.0, 1e-15);
    ASSERT_NEAR(s.group_cv, 4.0 / 12.0, 1e-15);
    int64_t g[2];
    ASSERT_OK(dsmoe_load_group_counts(g, c, 8, 2));
    ASSERT_EQ_INT(g[0], 8);
    ASSERT_EQ_INT(g[1], 16);
    /* even load: MaxVio 0, CV 0, entropy 1 */
    int64_t even[4] = {5, 5, 5, 5};
    ASSERT_OK(dsmoe_load_stats_compute(even, 4, 1, &s));
    ASSERT_NEAR(s.maxvio, 0, 0);
    ASSERT_NEAR(s.cv, 0, 0);
    ASSERT_NEAR(s.entropy, 1.0, 1e-15);
    /* all on one expert: entropy 0; empty: zeros */
    int64_t one[4] = {0, 0, 7, 0}, none[4] = {0, 0, 0, 0};
    ASSERT_OK(dsmoe_load_stats_compute(one, 4, 1, &s));
    ASSERT_NEAR(s.entropy, 0, 0);
    ASSERT_NEAR(s.maxvio, 3.0, 1e-15);
    ASSERT_OK(dsmoe_load_stats_compute(none, 4, 2, &s));
    ASSERT_NEAR(s.maxvio, 0, 0);
    ASSERT_EQ_INT(s.dead, 4);
    ASSERT_OK(dsmoe_load_stats_compute(one, 1, 1, &s));
    ASSERT_NEAR(s.entropy, 0, 0); /* one expert, no tokens on it */
    int64_t single[1] = {3};
    ASSERT_OK(dsmoe_load_stats_compute(single, 1, 1, &s));
    ASSERT_NEAR(s.entropy, 1, 0);
    /* errors */
    int64_t neg[2] = {1, -1};
    ASSERT_STATUS(dsmoe_load_stats_compute(neg, 2, 1, &s), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "counts[1]") != NULL);
    ASSERT_STATUS(dsmoe_load_stats_compute(c, 8, 3, &s), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "n_groups") != NULL);
    ASSERT_STATUS(dsmoe_load_stats_compute(NULL, 8, 1, &s), DSMOE_STATUS_INVALID_ARGUMENT);
    /* groups per token: E = 8, G = 4 (pairs) */
    int32_t idx[3 * 2] = {0, 1, 0, 7, 2, 5};
    uint8_t mask[3] = {1, 1, 0};
    double m;
    ASSERT_OK(dsmoe_load_groups_per_token(&m, idx, NULL, 3, 2, 8, 4));
    ASSERT_NEAR(m, 5.0 / 3.0, 1e-15);
    ASSERT_OK(dsmoe_load_groups_per_token(&m, idx, mask, 3, 2, 8, 4));
    ASSERT_NEAR(m, 1.5, 1e-15);
    idx[5] = -1;
    ASSERT_STATUS(dsmoe_load_groups_per_token(&m, idx, NULL, 3, 2, 8, 4),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    int64_t c8[8] = {7, 7, 7, 7, 7, 7, 7, 7};
    ASSERT_STATUS(dsmoe_load_counts(c8, idx, NULL, 3, 2, 8), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "indices[2, 1]") != NULL);
    for (int e = 0; e < 8; e++) ASSERT_EQ_INT(c8[e], 7); /* a bad index changes nothing */
}

/* ------------------------------------------------------------ losses -- */

static dsmoe_router_config small_router(int32_t E, int32_t G, int32_t TG, int32_t K,
                                        dsmoe_score_func f) {
    dsmoe_router_config rc;
    dsmoe_router_preset("deepseek-v3", &rc);
    rc.n_experts = E;
    rc.n_groups = G;
    rc.topk_groups = TG;
    rc.top_k = K;
    rc.score_func = f;
    return rc;
}

static double loss_of(const dsmoe_balance_loss_config *lc, const dsmoe_router_config *rc,
                      float *dl, const float *s, const int32_t *idx, const float *u, int64_t T,
                      int nt) {
    size_t n = dsmoe_balance_loss_workspace_size(lc, rc, T);
    ASSERT_TRUE(n > 0);
    void *ws = malloc(n);
    double L = -1;
    ASSERT_OK(dsmoe_balance_loss(lc, rc, &L, dl, s, idx, u, T, ws, n, nt));
    free(ws);
    return L;
}

static void test_loss_perfect_balance(void) {
    /* E = 8, K = 2, D = 4 devices of 2; every expert chosen equally often, every token
     * on M = 2 devices, equal scores: each count-based loss equals alpha. */
    const int32_t E = 8, K = 2, T = 16;
    dsmoe_router_config rc = small_router(E, 4, 2, K, DSMOE_SCORE_FUNC_SIGMOID);
    float s[16 * 8];
    int32_t idx[16 * 2];
    for (int i = 0; i < T * E; i++) s[i] = 0.3f;
    for (int t = 0; t < T; t++) {
        idx[2 * t] = (2 * t) % E;           /* device (2t mod 8)/2 */
        idx[2 * t + 1] = (2 * t + 3) % E;   /* the next device */
    }
    for (int kind = 0; kind <= DSMOE_BALANCE_LOSS_SWITCH; kind++) {
        for (int norm = 0; norm < 2; norm++) {
            dsmoe_balance_loss_config lc;
            dsmoe_balance_loss_config_default((dsmoe_balance_loss_kind)kind, &lc);
            lc.alpha = 0.5f;
            lc.seq_len = 8;
            lc.normalize_scores = norm;
            /* normalised: any equal scores; raw: scores that sum to 1 */
            for (int i = 0; i < T * E; i++) s[i] = norm ? 0.3f : 1.0f / E;
            double L = loss_of(&lc, &rc, NULL, s, idx, NULL, T, 1);
            ASSERT_NEAR(L, 0.5, 1e-7);
        }
    }
    for (int i = 0; i < T * E; i++) s[i] = 0.3f;
    /* defaults of alpha, and the V3 loss at balance is exactly its alpha = 1e-4 */
    dsmoe_balance_loss_config lc;
    dsmoe_balance_loss_config_default(DSMOE_BALANCE_LOSS_SEQ, &lc);
    ASSERT_NEAR(lc.alpha, 1e-4, 1e-11);
    ASSERT_NEAR(loss_of(&lc, &rc, NULL, s, idx, NULL, T, 1), lc.alpha, 1e-15);
    /* imbalance costs more: everything on experts 0 and 1 (f = 4, P = 0.25 each: 2α) */
    for (int t = 0; t < T; t++) {
        idx[2 * t] = 0;
        idx[2 * t + 1] = 1;
        s[t * E + 0] = s[t * E + 1] = 0.9f;
    }
    ASSERT_NEAR(loss_of(&lc, &rc, NULL, s, idx, NULL, T, 1), 2.0 * lc.alpha, 1e-10);
}

static void test_loss_zloss_value(void) {
    const int32_t E = 8, T = 3;
    dsmoe_router_config rc = small_router(E, 1, 1, 2, DSMOE_SCORE_FUNC_SIGMOID);
    float u[3 * 8] = {0};
    dsmoe_balance_loss_config lc;
    dsmoe_balance_loss_config_default(DSMOE_BALANCE_LOSS_ZLOSS, &lc);
    double L = loss_of(&lc, &rc, NULL, NULL, NULL, u, T, 1);
    ASSERT_NEAR(L, (double)lc.alpha * log(8.0) * log(8.0), 1e-15);
    u[5] = NAN;
    double ws[64];
    ASSERT_STATUS(dsmoe_balance_loss(&lc, &rc, &L, NULL, NULL, NULL, u, T, ws, sizeof ws, 1),
                  DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "logits[0, 5]") != NULL);
}

static void test_loss_errors(void) {
    const int32_t E = 8, K = 2, T = 6;
    dsmoe_router_config rc = small_router(E, 4, 2, K, DSMOE_SCORE_FUNC_SIGMOID);
    float s[6 * 8], dl[6 * 8];
    int32_t idx[6 * 2];
    for (int i = 0; i < T * E; i++) s[i] = 0.5f;
    for (int i = 0; i < T * K; i++) idx[i] = i % E;
    for (int i = 0; i < T * E; i++) dl[i] = 1.0f;
    dsmoe_balance_loss_config lc;
    dsmoe_balance_loss_config_default(DSMOE_BALANCE_LOSS_SEQ, &lc);
    char ws[8192];
    double L;
    lc.seq_len = 4;
    ASSERT_STATUS(dsmoe_balance_loss(&lc, &rc, &L, dl, s, idx, NULL, T, ws, sizeof ws, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "seq_len") != NULL);
    lc.seq_len = 3;
    idx[7] = 8;
    ASSERT_STATUS(dsmoe_balance_loss(&lc, &rc, &L, dl, s, idx, NULL, T, ws, sizeof ws, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "indices[3, 1]") != NULL);
    idx[7] = 7;
    s[13] = -0.1f;
    ASSERT_STATUS(dsmoe_balance_loss(&lc, &rc, &L, dl, s, idx, NULL, T, ws, sizeof ws, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "scores[1, 5]") != NULL);
    s[13] = 0.5f;
    for (int i = 0; i < T * E; i++) ASSERT_TRUE(dl[i] == 1.0f); /* nothing written */
    ASSERT_STATUS(dsmoe_balance_loss(&lc, &rc, &L, dl, s, NULL, NULL, T, ws, sizeof ws, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_balance_loss(&lc, &rc, &L, dl, s, idx, NULL, T, ws, 16, 1),
                  DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    lc.alpha = -1;
    ASSERT_STATUS(dsmoe_balance_loss(&lc, &rc, &L, dl, s, idx, NULL, T, ws, sizeof ws, 1),
                  DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "alpha") != NULL);
    dsmoe_balance_loss_config_default(DSMOE_BALANCE_LOSS_DEVICE, &lc);
    lc.n_devices = 3;
    ASSERT_STATUS(dsmoe_balance_loss(&lc, &rc, &L, dl, s, idx, NULL, T, ws, sizeof ws, 1),
                  DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "n_devices") != NULL);
    dsmoe_balance_loss_config_default(DSMOE_BALANCE_LOSS_COMM, &lc);
    lc.device_topm = 5;
    ASSERT_STATUS(dsmoe_balance_loss(&lc, &rc, &L, dl, s, idx, NULL, T, ws, sizeof ws, 1),
                  DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "device_topm") != NULL);
    dsmoe_balance_loss_config_default(DSMOE_BALANCE_LOSS_ZLOSS, &lc);
    ASSERT_STATUS(dsmoe_balance_loss(&lc, &rc, &L, dl, s, idx, NULL, T, ws, sizeof ws, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "logits") != NULL);
    /* T = 0: a zero loss */
    dsmoe_balance_loss_config_default(DSMOE_BALANCE_LOSS_SEQ, &lc);
    ASSERT_OK(dsmoe_balance_loss(&lc, &rc, &L, dl, NULL, NULL, NULL, 0, ws, sizeof ws, 1));
    ASSERT_NEAR(L, 0, 0);
    /* names */
    dsmoe_balance_loss_kind k;
    ASSERT_OK(dsmoe_balance_loss_kind_parse("comm", &k));
    ASSERT_EQ_INT(k, DSMOE_BALANCE_LOSS_COMM);
    ASSERT_STATUS(dsmoe_balance_loss_kind_parse("aux", &k), DSMOE_STATUS_NOT_FOUND);
    ASSERT_TRUE(strcmp(dsmoe_balance_loss_kind_name(DSMOE_BALANCE_LOSS_ZLOSS), "zloss") == 0);
}

/* Loss and gradient: accumulation (+=) and bit-identity across thread counts. */
static void test_loss_threads_accumulate(void) {
    const int32_t E = 64, K = 6, T = 96;
    for (int f = 0; f < 2; f++) {
        dsmoe_router_config rc = small_router(E, 8, 3, K, (dsmoe_score_func)f);
        float *u = malloc(sizeof(float) * T * E), *s = malloc(sizeof(float) * T * E);
        int32_t *idx = malloc(sizeof(int32_t) * T * K);
        tl_seed(77 + f);
        for (int t = 0; t < T; t++) {
            double mx = -1e9, z = 0;
            for (int j = 0; j < E; j++) {
                u[t * E + j] = (float)(2 * tl_normal());
                if (u[t * E + j] > mx) mx = u[t * E + j];
            }
            for (int j = 0; j < E; j++) z += exp(u[t * E + j] - mx);
            for (int j = 0; j < E; j++)
                s[t * E + j] = f ? (float)(exp(u[t * E + j] - mx) / z)
                                 : (float)(1 / (1 + exp(-(double)u[t * E + j])));
            for (int k = 0; k < K; k++) idx[t * K + k] = (int32_t)((t * 7 + k * 11) % E);
        }
        for (int kind = 0; kind <= DSMOE_BALANCE_LOSS_ZLOSS; kind++) {
            dsmoe_balance_loss_config lc;
            dsmoe_balance_loss_config_default((dsmoe_balance_loss_kind)kind, &lc);
            lc.seq_len = 16;
            lc.count_from = kind == 1 ? DSMOE_BALANCE_COUNT_TOPK : DSMOE_BALANCE_COUNT_ROUTED;
            float *d1 = calloc((size_t)T * E, sizeof(float)), *d4 = calloc((size_t)T * E, sizeof(float));
            double L1 = loss_of(&lc, &rc, d1, s, idx, u, T, 1);
            double L4 = loss_of(&lc, &rc, d4, s, idx, u, T, 4);
            ASSERT_TRUE(L1 == L4);
            tl_same_bits("threads", d1, d4, (int64_t)T * E);
            /* a second call adds the same gradient again */
            float *d2 = malloc(sizeof(float) * T * E);
            memcpy(d2, d1, sizeof(float) * T * E);
            double L2 = loss_of(&lc, &rc, d2, s, idx, u, T, 3);
            ASSERT_TRUE(L2 == L1);
            int okacc = 1;
            for (int i = 0; i < T * E; i++) okacc &= d2[i] == d1[i] + d1[i];
            ASSERT_TRUE(okacc);
            /* the value does not depend on whether a gradient is asked for */
            ASSERT_TRUE(loss_of(&lc, &rc, NULL, s, idx, u, T, 2) == L1);
            free(d1);
            free(d4);
            free(d2);
        }
        free(u);
        free(s);
        free(idx);
    }
}

int main(void) {
    RUN(test_config);
    RUN(test_sign_directions);
    RUN(test_sign_zero_exact);
    RUN(test_proportional);
    RUN(test_recenter);
    RUN(test_schedule);
    RUN(test_accumulate);
    RUN(test_allreduce);
    RUN(test_save_load);
    RUN(test_set_bias);
    RUN(test_bf16_check);
    RUN(test_load_stats);
    RUN(test_loss_perfect_balance);
    RUN(test_loss_zloss_value);
    RUN(test_loss_errors);
    RUN(test_loss_threads_accumulate);
    return TEST_SUMMARY();
}
