/*
 * test_simulate.c — the simulation API of balance.h: the synthetic traffic generator
 * (dsmoe_traffic) and the strategy loop (dsmoe_sim).
 *
 * - traffic bit for bit against an independent Python implementation
 *   (tests/ref/gen_simulate_golden.py -> tests/golden/balance/simulate/);
 * - determinism (same seed, same stream; another seed, another stream);
 * - the generator's statistics: with no noise every token is the documented profile
 *   −skew·ln(1 + r), centred, over a permutation; per-expert means and the noise's
 *   standard deviation; one domain per sequence, domains drawn evenly, each domain's
 *   tokens centred on its own popularity; drift interpolating between rankings and
 *   holding the last one after the run;
 * - the strategy loop against the fp64 NumPy reference of the balancer
 *   (tests/golden/balance/steps/: counts exact, bias to 1e-6);
 * - MaxVio (batch, global, last window), first step below the threshold and the
 *   window means recomputed independently from the trace file the simulation wrote;
 * - identical records for any thread count; the trace written atomically;
 * - validation: every bad field is INVALID_CONFIG naming it, bad strategy specs,
 *   calls out of order, NULLs.
 */
#include "testlib.h"

#include <dirent.h>

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

static int has(const char *needle) {
    const char *m = dsmoe_last_error();
    tl_checks++;
    if (!strstr(m, needle)) {
        TL_FAIL("message '%s' does not name '%s'", m, needle);
        return 0;
    }
    return 1;
}

/* ================================================================= traffic == */

static void test_traffic_golden(void) {
    dsmoe_array L = {0}, D = {0};
    if (!load("balance/simulate/traffic_logits.npy", DSMOE_DTYPE_F32, &L)) return;
    if (!load("balance/simulate/traffic_domains.npy", DSMOE_DTYPE_I32, &D)) {
        dsmoe_array_free(&L);
        return;
    }
    dsmoe_traffic_config tc;
    dsmoe_traffic_config_default(16, &tc);
    tc.steps = 5;
    tc.tokens = 48;
    tc.seq_len = 12;
    tc.n_domains = 3;
    tc.skew = 0.7;
    tc.noise = 0.8;
    tc.drift = 1.5;
    tc.seed = 5;
    ASSERT_EQ_INT(L.shape[0], 5);
    ASSERT_EQ_INT(L.shape[1], 48);
    ASSERT_EQ_INT(L.shape[2], 16);
    dsmoe_traffic *tr = NULL;
    ASSERT_OK(dsmoe_traffic_create(&tc, &tr));
    float logits[48 * 16];
    int32_t dom[48];
    for (int s = 0; tr && s < 5; s++) {
        ASSERT_OK(dsmoe_traffic_next(tr, logits, dom));
        char what[64];
        snprintf(what, sizeof what, "traffic step %d", s);
        tl_checks++;
        if (!tl_same_bits(what, logits, (const float *)L.data + (size_t)s * 48 * 16, 48 * 16))
            TL_FAIL("step %d: logits differ from the Python reference", s);
        tl_checks++;
        if (memcmp(dom, (const int32_t *)D.data + (size_t)s * 48, sizeof dom) != 0)
            TL_FAIL("step %d: domains differ from the Python reference", s);
    }
    ASSERT_EQ_INT(dsmoe_traffic_step_index(tr), 5);
    dsmoe_traffic_free(tr);
    dsmoe_array_free(&L);
    dsmoe_array_free(&D);
}

static void test_traffic_determinism(void) {
    dsmoe_traffic_config tc;
    dsmoe_traffic_config_default(32, &tc);
    tc.tokens = 64;
    tc.seq_len = 16;
    tc.n_domains = 3;
    tc.drift = 2.0;
    tc.steps = 6;
    tc.seed = 11;
    dsmoe_traffic *a = NULL, *b = NULL, *c = NULL;
    ASSERT_OK(dsmoe_traffic_create(&tc, &a));
    ASSERT_OK(dsmoe_traffic_create(&tc, &b));
    tc.seed = 12;
    ASSERT_OK(dsmoe_traffic_create(&tc, &c));
    if (!a || !b || !c) goto out;
    float la[64 * 32], lb[64 * 32], lc[64 * 32];
    int32_t da[64], db[64];
    int differ = 0;
    for (int s = 0; s < 6; s++) {
        ASSERT_OK(dsmoe_traffic_next(a, la, da));
        ASSERT_OK(dsmoe_traffic_next(b, lb, db));
        ASSERT_OK(dsmoe_traffic_next(c, lc, NULL));
        ASSERT_TRUE(memcmp(la, lb, sizeof la) == 0);
        ASSERT_TRUE(memcmp(da, db, sizeof da) == 0);
        differ |= memcmp(la, lc, sizeof la) != 0;
    }
    ASSERT_TRUE(differ);
    ASSERT_EQ_INT(dsmoe_traffic_get_config(a)->seq_len, 16);
out:
    dsmoe_traffic_free(a);
    dsmoe_traffic_free(b);
    dsmoe_traffic_free(c);
}

/* With no noise every token's logits are the popularity: the documented profile
 * −skew·ln(1 + r), centred, assigned to the experts by a permutation. */
static void test_traffic_profile(void) {
    const int32_t E = 24;
    const double skew = 0.9;
    dsmoe_traffic_config tc;
    dsmoe_traffic_config_default(E, &tc);
    tc.tokens = 10;
    tc.noise = 0.0;
    tc.skew = skew;
    tc.seed = 3;
    dsmoe_traffic *tr = NULL;
    ASSERT_OK(dsmoe_traffic_create(&tc, &tr));
    if (!tr) return;
    ASSERT_EQ_INT(dsmoe_traffic_get_config(tr)->seq_len, 10); /* 512 does not divide 10 */
    float logits[10 * 24];
    ASSERT_OK(dsmoe_traffic_next(tr, logits, NULL));
    const float *mu = dsmoe_traffic_popularity(tr, 0);
    ASSERT_TRUE(mu != NULL);
    ASSERT_TRUE(dsmoe_traffic_popularity(tr, 1) == NULL);
    ASSERT_TRUE(dsmoe_traffic_popularity(tr, -1) == NULL);
    for (int t = 0; mu && t < 10; t++) ASSERT_TRUE(memcmp(logits + t * E, mu, sizeof(float) * E) == 0);
    /* sorted descending, value r must be the centred profile at rank r */
    double want[24], mean = 0.0, sorted[24];
    for (int r = 0; r < E; r++) mean += -skew * log(1.0 + r);
    mean /= E;
    for (int r = 0; r < E; r++) want[r] = -skew * log(1.0 + r) - mean;
    for (int i = 0; i < E; i++) sorted[i] = mu ? mu[i] : 0.0;
    for (int i = 1; i < E; i++) /* insertion sort, descending */
        for (int j = i; j > 0 && sorted[j] > sorted[j - 1]; j--) {
            double x = sorted[j];
            sorted[j] = sorted[j - 1];
            sorted[j - 1] = x;
        }
    for (int r = 0; r < E; r++) ASSERT_NEAR(sorted[r], want[r], 1e-6);
    /* the ranking is not the identity (a permutation was drawn) */
    int identity = 1;
    for (int i = 1; mu && i < E; i++) identity &= mu[i] <= mu[i - 1];
    ASSERT_TRUE(!identity);
    dsmoe_traffic_free(tr);

    /* skew 0: every expert equally popular */
    tc.skew = 0.0;
    ASSERT_OK(dsmoe_traffic_create(&tc, &tr));
    if (!tr) return;
    ASSERT_OK(dsmoe_traffic_next(tr, logits, NULL));
    for (int i = 0; i < 10 * E; i++)
        if (logits[i] != 0.0f) {
            TL_FAIL("skew 0, noise 0: logit %d = %g", i, (double)logits[i]);
            break;
        }
    dsmoe_traffic_free(tr);
}

/* Noise: per expert the mean over many tokens is the popularity and the standard
 * deviation is `noise`; the noise is bounded by 2·sqrt(3)·... (sum of 4 uniforms). */
static void test_traffic_noise(void) {
    const int32_t E = 8;
    const int64_t T = 8192;
    const double noise = 1.7;
    dsmoe_traffic_config tc;
    dsmoe_traffic_config_default(E, &tc);
    tc.tokens = T;
    tc.noise = noise;
    tc.skew = 0.5;
    tc.seed = 9;
    dsmoe_traffic *tr = NULL;
    ASSERT_OK(dsmoe_traffic_create(&tc, &tr));
    float *L = (float *)malloc(sizeof(float) * (size_t)T * E);
    if (!tr || !L) goto out;
    ASSERT_OK(dsmoe_traffic_next(tr, L, NULL));
    const float *mu = dsmoe_traffic_popularity(tr, 0);
    double maxz = 0.0;
    for (int32_t i = 0; i < E; i++) {
        double s = 0.0, s2 = 0.0;
        for (int64_t t = 0; t < T; t++) {
            double z = (double)L[t * E + i] - mu[i];
            s += z;
            s2 += z * z;
            if (fabs(z) > maxz) maxz = fabs(z);
        }
        double m = s / (double)T, sd = sqrt(s2 / (double)T - m * m);
        ASSERT_NEAR(m, 0.0, 5.0 * noise / sqrt((double)T)); /* 5 standard errors */
        ASSERT_NEAR(sd, noise, 0.05 * noise);
    }
    /* four uniforms on (0,1) summed, centred, times sqrt(3): |z| < 2 sqrt(3) */
    ASSERT_TRUE(maxz <= noise * 2.0 * sqrt(3.0) + 1e-5);
    ASSERT_TRUE(maxz > noise * 2.0); /* tails reached beyond 2 sigma */
out:
    free(L);
    dsmoe_traffic_free(tr);
}

/* Domains: one per sequence, drawn evenly; each domain's tokens average to its own
 * popularity, and the domains have different rankings. */
static void test_traffic_domains(void) {
    const int32_t E = 8, ND = 4;
    const int64_t T = 4096, SL = 16;
    dsmoe_traffic_config tc;
    dsmoe_traffic_config_default(E, &tc);
    tc.tokens = T;
    tc.seq_len = SL;
    tc.n_domains = ND;
    tc.skew = 1.0;
    tc.noise = 0.5;
    tc.seed = 21;
    dsmoe_traffic *tr = NULL;
    ASSERT_OK(dsmoe_traffic_create(&tc, &tr));
    float *L = (float *)malloc(sizeof(float) * (size_t)T * E);
    int32_t *dom = (int32_t *)malloc(sizeof(int32_t) * (size_t)T);
    if (!tr || !L || !dom) goto out;
    ASSERT_OK(dsmoe_traffic_next(tr, L, dom));
    int64_t n_seq[4] = {0}, n_tok[4] = {0};
    double sum[4][8] = {{0}};
    int bad = 0;
    for (int64_t s0 = 0; s0 < T; s0 += SL) {
        int32_t d = dom[s0];
        if (d < 0 || d >= ND) {
            bad = 1;
            break;
        }
        n_seq[d]++;
        for (int64_t t = s0; t < s0 + SL; t++) {
            bad |= dom[t] != d; /* one domain per sequence */
            n_tok[d]++;
            for (int32_t i = 0; i < E; i++) sum[d][i] += L[t * E + i];
        }
    }
    ASSERT_TRUE(!bad);
    const double n_sequences = (double)T / (double)SL, p = 1.0 / ND;
    for (int d = 0; d < ND; d++) {
        /* binomial: within 4.5 standard deviations of n/ND */
        ASSERT_NEAR((double)n_seq[d], n_sequences * p, 4.5 * sqrt(n_sequences * p * (1 - p)));
        const float *mu = dsmoe_traffic_popularity(tr, d);
        for (int32_t i = 0; mu && n_tok[d] > 0 && i < E; i++)
            ASSERT_NEAR(sum[d][i] / (double)n_tok[d], mu[i], 5.0 * 0.5 / sqrt((double)n_tok[d]));
    }
    /* rankings differ between domains: the most popular experts are not all the same */
    int32_t top[4];
    for (int d = 0; d < ND; d++) {
        const float *mu = dsmoe_traffic_popularity(tr, d);
        top[d] = 0;
        for (int32_t i = 1; mu && i < E; i++)
            if (mu[i] > mu[top[d]]) top[d] = i;
    }
    ASSERT_TRUE(!(top[0] == top[1] && top[1] == top[2] && top[2] == top[3]));
out:
    free(L);
    free(dom);
    dsmoe_traffic_free(tr);
}

/* Drift 1 over 3 steps: step 0 is ranking A, step 2 ranking B, step 1 halfway; after
 * the run the popularity holds at B. */
static void test_traffic_drift(void) {
    const int32_t E = 16;
    dsmoe_traffic_config tc;
    dsmoe_traffic_config_default(E, &tc);
    tc.tokens = 4;
    tc.steps = 3;
    tc.drift = 1.0;
    tc.noise = 0.0;
    tc.seed = 4;
    dsmoe_traffic *tr = NULL;
    ASSERT_OK(dsmoe_traffic_create(&tc, &tr));
    if (!tr) return;
    float L[4 * 16], mu[5][16];
    for (int s = 0; s < 5; s++) {
        ASSERT_OK(dsmoe_traffic_next(tr, L, NULL));
        memcpy(mu[s], dsmoe_traffic_popularity(tr, 0), sizeof mu[s]);
        ASSERT_TRUE(memcmp(L, mu[s], sizeof mu[s]) == 0);
    }
    ASSERT_TRUE(memcmp(mu[0], mu[2], sizeof mu[0]) != 0); /* a new ranking */
    for (int32_t i = 0; i < E; i++) {
        float half = (float)(0.5 * (double)mu[0][i] + 0.5 * (double)mu[2][i]);
        tl_checks++;
        if (mu[1][i] != half) TL_FAIL("drift: expert %d at step 1: %g, want %g", i, (double)mu[1][i], (double)half);
    }
    /* A and B are both permutations of the same profile */
    float a[16], b[16];
    memcpy(a, mu[0], sizeof a);
    memcpy(b, mu[2], sizeof b);
    for (int i = 1; i < E; i++)
        for (int j = i; j > 0 && a[j] > a[j - 1]; j--) { float x = a[j]; a[j] = a[j - 1]; a[j - 1] = x; }
    for (int i = 1; i < E; i++)
        for (int j = i; j > 0 && b[j] > b[j - 1]; j--) { float x = b[j]; b[j] = b[j - 1]; b[j - 1] = x; }
    ASSERT_TRUE(memcmp(a, b, sizeof a) == 0);
    /* past the run: held at the last ranking */
    ASSERT_TRUE(memcmp(mu[3], mu[2], sizeof mu[0]) == 0);
    ASSERT_TRUE(memcmp(mu[4], mu[2], sizeof mu[0]) == 0);
    dsmoe_traffic_free(tr);
}

/* ============================================================== simulation == */

enum { GE = 16, GG = 4, GTG = 2, GK = 4, GS = 8, GT = 48 };

static dsmoe_router_config small_router(void) {
    dsmoe_router_config rc;
    dsmoe_router_preset("deepseek-v3", &rc);
    rc.n_experts = GE;
    rc.n_groups = GG;
    rc.topk_groups = GTG;
    rc.top_k = GK;
    rc.group_topm = 2;
    return rc;
}

/* The strategy loop against the NumPy reference of the balancer
 * (tests/ref/gen_balance_golden.py): per-step counts exact, bias to 1e-6, MaxVio to
 * 1e-12, for sign, proportional, re-centred and scheduled strategies side by side. */
static void test_sim_golden(void) {
    static const struct {
        const char *file, *spec;
        int64_t until;
        float after;
        int recenter;
    } V[4] = {{"sign", "sign:0.01", 0, 0.0f, 0},
              {"prop", "proportional:0.01", 0, 0.0f, 0},
              {"center", "sign:0.01", 0, 0.0f, 1},
              {"sched", "sign:0.01", 3 * GT, 0.002f, 0}};
    dsmoe_array logits = {0}, bias0 = {0}, counts[4] = {{0}}, bias[4] = {{0}}, mv[4] = {{0}};
    int ok = load("balance/steps/logits.npy", DSMOE_DTYPE_F32, &logits) &&
             load("balance/steps/bias0.npy", DSMOE_DTYPE_F32, &bias0);
    for (int v = 0; ok && v < 4; v++) {
        char rel[128];
        snprintf(rel, sizeof rel, "balance/steps/%s_counts.npy", V[v].file);
        ok &= load(rel, DSMOE_DTYPE_I64, &counts[v]);
        snprintf(rel, sizeof rel, "balance/steps/%s_bias.npy", V[v].file);
        ok &= load(rel, DSMOE_DTYPE_F64, &bias[v]);
        snprintf(rel, sizeof rel, "balance/steps/%s_maxvio.npy", V[v].file);
        ok &= load(rel, DSMOE_DTYPE_F64, &mv[v]);
    }
    dsmoe_sim *sim = NULL;
    if (!ok) goto out;
    dsmoe_router_config rc = small_router();
    dsmoe_sim_config sc;
    dsmoe_sim_config_default(&rc, &sc);
    sc.tokens = GT;
    sc.steps = GS;
    sc.seq_len = 16;
    sc.n_strategies = 5;
    ASSERT_OK(dsmoe_sim_strategy_parse("none", GE, 0.001f, &sc.strategies[0]));
    for (int v = 0; v < 4; v++) {
        dsmoe_sim_strategy *g = &sc.strategies[v + 1];
        ASSERT_OK(dsmoe_sim_strategy_parse(V[v].spec, GE, 0.001f, g));
        snprintf(g->name, sizeof g->name, "%s", V[v].file);
        g->balancer.recenter = V[v].recenter;
        g->balancer.gamma_until_tokens = V[v].until;
        g->balancer.gamma_after = V[v].after;
    }
    ASSERT_OK(dsmoe_sim_create(&sc, &sim));
    if (!sim) goto out;
    ASSERT_OK(dsmoe_sim_set_bias(sim, (const float *)bias0.data));
    for (int st = 0; st < GS; st++) {
        ASSERT_OK(dsmoe_sim_step(sim, (const float *)logits.data + (size_t)st * GT * GE));
        dsmoe_sim_record r;
        ASSERT_OK(dsmoe_sim_get_record(sim, 0, &r));
        ASSERT_TRUE(memcmp(r.bias, bias0.data, sizeof(float) * GE) == 0); /* none keeps it */
        ASSERT_NEAR(r.gamma, 0.0, 0.0);
        for (int v = 0; v < 4; v++) {
            ASSERT_OK(dsmoe_sim_get_record(sim, v + 1, &r));
            ASSERT_EQ_INT(r.step, st);
            const int64_t *want = (const int64_t *)counts[v].data + (size_t)st * GE;
            tl_checks++;
            if (memcmp(r.counts, want, sizeof(int64_t) * GE) != 0)
                TL_FAIL("%s step %d: counts differ from the reference", V[v].file, st);
            char what[64];
            snprintf(what, sizeof what, "%s bias after step %d", V[v].file, st);
            tl_checks++;
            if (!tl_allclose(what, r.bias, (const double *)bias[v].data + (size_t)st * GE, GE, 1e-6, 0))
                TL_FAIL("%s", what);
            ASSERT_NEAR(r.stats.maxvio, ((const double *)mv[v].data)[st], 1e-12);
        }
    }
out:
    dsmoe_sim_free(sim);
    dsmoe_array_free(&logits);
    dsmoe_array_free(&bias0);
    for (int v = 0; v < 4; v++) {
        dsmoe_array_free(&counts[v]);
        dsmoe_array_free(&bias[v]);
        dsmoe_array_free(&mv[v]);
    }
}

/* Reads the integers of the JSON array after `key` in `line` into v (n of them). */
static int json_i64s(const char *line, const char *key, int64_t *v, int n) {
    const char *p = strstr(line, key);
    if (!p) return -1;
    p += strlen(key);
    int k = 0;
    while (*p && *p != ']') {
        char *end;
        long long x = strtoll(p, &end, 10);
        if (end == p) return -1;
        if (k < n) v[k] = x;
        k++;
        p = end;
        if (*p == ',') p++;
    }
    return k;
}

static double json_num(const char *line, const char *key) {
    const char *p = strstr(line, key);
    return p ? strtod(p + strlen(key), NULL) : NAN;
}

static double maxvio_of(const int64_t *c, int n) {
    int64_t tot = 0, mx = c[0];
    for (int i = 0; i < n; i++) {
        tot += c[i];
        if (c[i] > mx) mx = c[i];
    }
    double mean = (double)tot / n;
    return tot > 0 ? ((double)mx - mean) / mean : 0.0;
}

/* A synthetic run with a trace: MaxVio_batch of each line, MaxVio_global, the last
 * window, the first step below the threshold and the window means, recomputed from
 * the trace file alone, must equal what the simulation reports. */
static void test_sim_trace_maxvio(void) {
    const int32_t E = 32, S = 25;
    const int64_t T = 256;
    dsmoe_router_config rc;
    dsmoe_router_preset("deepseek-v3", &rc);
    rc.n_experts = E;
    rc.n_groups = 4;
    rc.topk_groups = 2;
    rc.top_k = 4;
    rc.group_topm = 2;
    dsmoe_traffic_config tc;
    dsmoe_traffic_config_default(E, &tc);
    tc.tokens = T;
    tc.steps = S;
    tc.seq_len = 64;
    tc.skew = 0.6;
    tc.n_domains = 2;
    tc.seed = 17;
    dsmoe_sim_config sc;
    dsmoe_sim_config_default(&rc, &sc);
    sc.tokens = T;
    sc.steps = S;
    sc.seq_len = 64;
    sc.last_fraction = 0.3; /* the last ceil(7.5) = 8 steps */
    sc.threshold = 0.65625; /* 21/32: a MaxVio the proportional strategy hits exactly at step 3 */
    sc.n_strategies = 3;
    ASSERT_OK(dsmoe_sim_strategy_parse("none", E, 0.02f, &sc.strategies[0]));
    ASSERT_OK(dsmoe_sim_strategy_parse("sign", E, 0.02f, &sc.strategies[1]));
    ASSERT_OK(dsmoe_sim_strategy_parse("prop:0.05", E, 0.02f, &sc.strategies[2]));
    const char *path = tl_tmp("test_simulate_trace.jsonl");
    remove(path);
    dsmoe_traffic *tr = NULL;
    dsmoe_sim *sim = NULL;
    float *L = (float *)malloc(sizeof(float) * (size_t)T * E);
    FILE *f = NULL;
    ASSERT_OK(dsmoe_traffic_create(&tc, &tr));
    ASSERT_OK(dsmoe_sim_create(&sc, &sim));
    if (!tr || !sim || !L) goto out;
    ASSERT_OK(dsmoe_sim_trace_open(sim, path));
    for (int s = 0; s < S; s++) {
        ASSERT_OK(dsmoe_traffic_next(tr, L, NULL));
        ASSERT_OK(dsmoe_sim_step(sim, L));
    }
    ASSERT_EQ_INT(dsmoe_sim_steps(sim), S);
    ASSERT_OK(dsmoe_sim_trace_finish(sim));
    f = fopen(path, "r");
    ASSERT_TRUE(f != NULL);
    if (!f) goto out;
    static char line[1 << 16];
    int64_t run[3][32] = {{0}}, last[3][32] = {{0}}, c[32];
    double mvsum[3] = {0}, auxsum[3] = {0};
    int64_t first[3] = {-1, -1, -1};
    int n_lines = 0;
    const int last_from = S - 8;
    while (fgets(line, sizeof line, f)) {
        int s = n_lines % 3, step = n_lines / 3;
        n_lines++;
        ASSERT_EQ_INT((int64_t)json_num(line, "\"step\":"), step);
        char want_name[80];
        snprintf(want_name, sizeof want_name, "\"strategy\":\"%s\"", sc.strategies[s].name);
        ASSERT_TRUE(strstr(line, want_name) != NULL);
        ASSERT_EQ_INT(json_i64s(line, "\"counts\":[", c, E), E);
        int64_t tot = 0;
        for (int i = 0; i < E; i++) tot += c[i];
        ASSERT_EQ_INT(tot, T * 4);
        double mv = maxvio_of(c, E);
        ASSERT_NEAR(json_num(line, "\"maxvio_batch\":"), mv, 1e-8 * (1 + mv));
        for (int i = 0; i < E; i++) run[s][i] += c[i];
        if (step >= last_from) {
            for (int i = 0; i < E; i++) last[s][i] += c[i];
            mvsum[s] += mv;
            auxsum[s] += json_num(line, "\"seq_aux\":");
        }
        if (first[s] < 0 && mv < 0.65625) first[s] = step;
    }
    ASSERT_EQ_INT(n_lines, 3 * S);
    for (int s = 0; s < 3; s++) {
        dsmoe_sim_summary m;
        ASSERT_OK(dsmoe_sim_get_summary(sim, s, &m));
        ASSERT_EQ_INT(m.steps, S);
        ASSERT_EQ_INT(m.last_steps, 8);
        ASSERT_TRUE(memcmp(m.run_counts, run[s], sizeof run[s]) == 0);
        ASSERT_NEAR(m.run.maxvio, maxvio_of(run[s], E), 1e-12);
        ASSERT_NEAR(m.last.maxvio, maxvio_of(last[s], E), 1e-12);
        ASSERT_NEAR(m.maxvio_batch_last_mean, mvsum[s] / 8, 1e-8);
        ASSERT_NEAR(m.seq_aux_last_mean, auxsum[s] / 8, 1e-8 * auxsum[s]);
        ASSERT_EQ_INT(m.first_step_below, first[s]);
    }
    /* balancing works on this skewed traffic: the global MaxVio drops */
    dsmoe_sim_summary none, sign;
    ASSERT_OK(dsmoe_sim_get_summary(sim, 0, &none));
    ASSERT_OK(dsmoe_sim_get_summary(sim, 1, &sign));
    ASSERT_TRUE(none.last.maxvio > 2.0 * sign.last.maxvio);
    ASSERT_NEAR(none.bias_spread, 0.0, 0.0);
    ASSERT_TRUE(sign.bias_spread > 0.0);
out:
    if (f) fclose(f);
    remove(path);
    free(L);
    dsmoe_sim_free(sim);
    dsmoe_traffic_free(tr);
}

/* Records bit-identical for 1 and 3 threads. */
static void test_sim_threads(void) {
    dsmoe_router_config rc;
    dsmoe_router_preset("deepseek-v3", &rc);
    dsmoe_traffic_config tc;
    dsmoe_traffic_config_default(rc.n_experts, &tc);
    tc.tokens = 1024;
    tc.steps = 3;
    dsmoe_sim *sim[2] = {NULL, NULL};
    dsmoe_traffic *tr = NULL;
    float *L = (float *)malloc(sizeof(float) * 1024 * 256);
    ASSERT_OK(dsmoe_traffic_create(&tc, &tr));
    for (int k = 0; k < 2; k++) {
        dsmoe_sim_config sc;
        dsmoe_sim_config_default(&rc, &sc);
        sc.tokens = 1024;
        sc.steps = 3;
        sc.n_threads = k ? 3 : 1;
        ASSERT_OK(dsmoe_sim_create(&sc, &sim[k]));
    }
    if (!tr || !sim[0] || !sim[1] || !L) goto out;
    for (int s = 0; s < 3; s++) {
        ASSERT_OK(dsmoe_traffic_next(tr, L, NULL));
        ASSERT_OK(dsmoe_sim_step(sim[0], L));
        ASSERT_OK(dsmoe_sim_step(sim[1], L));
        for (int g = 0; g < 3; g++) {
            dsmoe_sim_record a, b;
            ASSERT_OK(dsmoe_sim_get_record(sim[0], g, &a));
            ASSERT_OK(dsmoe_sim_get_record(sim[1], g, &b));
            ASSERT_TRUE(memcmp(a.counts, b.counts, sizeof(int64_t) * 256) == 0);
            ASSERT_TRUE(memcmp(a.bias, b.bias, sizeof(float) * 256) == 0);
            ASSERT_TRUE(memcmp(&a.seq_aux, &b.seq_aux, sizeof a.seq_aux) == 0);
        }
    }
out:
    free(L);
    dsmoe_traffic_free(tr);
    dsmoe_sim_free(sim[0]);
    dsmoe_sim_free(sim[1]);
}

static int count_tmp_files(const char *dir, const char *stem) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strncmp(e->d_name, stem, strlen(stem)) == 0 && strstr(e->d_name, ".tmp.")) n++;
    closedir(d);
    return n;
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static int file_is(const char *path, const char *text) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char buf[64] = {0};
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    return n == strlen(text) && memcmp(buf, text, n) == 0;
}

/* The trace replaces its path only when finished: freed unfinished, or after a
 * failed step, the old file stays and no temporary file is left behind. */
static void test_sim_trace_atomic(void) {
    dsmoe_router_config rc = small_router();
    dsmoe_sim_config sc;
    dsmoe_sim_config_default(&rc, &sc);
    sc.tokens = 16;
    sc.seq_len = 16;
    sc.steps = 2;
    char path[4096], dir[4096];
    snprintf(path, sizeof path, "%s", tl_tmp("test_simulate_atomic.jsonl"));
    snprintf(dir, sizeof dir, "%s", tl_tmp(""));
    write_text(path, "old\n");
    float L[16 * GE];
    for (int i = 0; i < 16 * GE; i++) L[i] = (float)((i * 37) % 11) * 0.1f;
    dsmoe_sim *sim = NULL;
    ASSERT_OK(dsmoe_sim_create(&sc, &sim));
    if (!sim) return;
    ASSERT_OK(dsmoe_sim_trace_open(sim, path));
    ASSERT_STATUS(dsmoe_sim_trace_open(sim, path), DSMOE_STATUS_INVALID_ARGUMENT); /* twice */
    ASSERT_OK(dsmoe_sim_step(sim, L));
    ASSERT_TRUE(file_is(path, "old\n")); /* not yet replaced */
    ASSERT_EQ_INT(count_tmp_files(dir, "test_simulate_atomic.jsonl"), 1);
    dsmoe_sim_free(sim); /* unfinished: discarded */
    ASSERT_TRUE(file_is(path, "old\n"));
    ASSERT_EQ_INT(count_tmp_files(dir, "test_simulate_atomic.jsonl"), 0);

    /* a failing step (a NaN logit) discards nothing it should not; finish replaces */
    sim = NULL;
    ASSERT_OK(dsmoe_sim_create(&sc, &sim));
    if (!sim) return;
    ASSERT_OK(dsmoe_sim_trace_open(sim, path));
    ASSERT_OK(dsmoe_sim_step(sim, L));
    L[5 * GE + 3] = NAN;
    ASSERT_STATUS(dsmoe_sim_step(sim, L), DSMOE_STATUS_NON_FINITE);
    has("token 5, expert 3");
    ASSERT_EQ_INT(dsmoe_sim_steps(sim), 1);
    ASSERT_OK(dsmoe_sim_trace_finish(sim));
    ASSERT_OK(dsmoe_sim_trace_finish(sim)); /* no trace open: no-op */
    ASSERT_TRUE(!file_is(path, "old\n"));
    FILE *f = fopen(path, "r");
    int lines = 0, ch;
    while (f && (ch = fgetc(f)) != EOF) lines += ch == '\n';
    if (f) fclose(f);
    ASSERT_EQ_INT(lines, 3); /* one step x three strategies */
    ASSERT_EQ_INT(count_tmp_files(dir, "test_simulate_atomic.jsonl"), 0);
    /* only before the first step */
    ASSERT_STATUS(dsmoe_sim_trace_open(sim, path), DSMOE_STATUS_INVALID_ARGUMENT);
    float b[GE] = {0};
    ASSERT_STATUS(dsmoe_sim_set_bias(sim, b), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_sim_free(sim);
    remove(path);

    /* a folder that does not exist: IO, nothing created */
    sim = NULL;
    ASSERT_OK(dsmoe_sim_create(&sc, &sim));
    ASSERT_STATUS(dsmoe_sim_trace_open(sim, tl_tmp("no-such-dir/t.jsonl")), DSMOE_STATUS_IO);
    ASSERT_STATUS(dsmoe_sim_trace_open(sim, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_sim_free(sim);
}

/* ============================================================== validation == */

#define BAD_TRAFFIC(field, expr, needle)                                                 \
    do {                                                                                 \
        dsmoe_traffic_config c_;                                                         \
        dsmoe_traffic_config_default(16, &c_);                                           \
        c_.field = expr;                                                                 \
        dsmoe_traffic *t_ = NULL;                                                        \
        ASSERT_STATUS(dsmoe_traffic_create(&c_, &t_), DSMOE_STATUS_INVALID_CONFIG);      \
        has(needle);                                                                     \
        ASSERT_TRUE(t_ == NULL);                                                         \
    } while (0)

static void test_traffic_validation(void) {
    BAD_TRAFFIC(n_experts, 0, "n_experts = 0");
    BAD_TRAFFIC(n_experts, DSMOE_MAX_EXPERTS + 1, "n_experts");
    BAD_TRAFFIC(steps, 0, "steps = 0");
    BAD_TRAFFIC(tokens, -3, "tokens = -3");
    BAD_TRAFFIC(seq_len, 100, "seq_len = 100 does not divide the 2048 tokens");
    BAD_TRAFFIC(seq_len, -1, "seq_len = -1");
    BAD_TRAFFIC(seq_len, 4096, "seq_len = 4096");
    BAD_TRAFFIC(n_domains, 0, "n_domains = 0");
    BAD_TRAFFIC(n_domains, 1025, "n_domains = 1025");
    BAD_TRAFFIC(skew, -0.1, "skew = -0.1");
    BAD_TRAFFIC(skew, NAN, "skew");
    BAD_TRAFFIC(noise, 1e9, "noise");
    BAD_TRAFFIC(drift, -1, "drift = -1");
    BAD_TRAFFIC(drift, INFINITY, "drift");
    ASSERT_STATUS(dsmoe_traffic_create(NULL, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_traffic *t = NULL;
    ASSERT_STATUS(dsmoe_traffic_create(NULL, &t), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_traffic_config c;
    dsmoe_traffic_config_default(16, &c);
    c.tokens = 8;
    ASSERT_OK(dsmoe_traffic_create(&c, &t));
    ASSERT_STATUS(dsmoe_traffic_next(t, NULL, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_traffic_next(NULL, NULL, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_EQ_INT(dsmoe_traffic_step_index(t), 0);
    dsmoe_traffic_free(t);
    dsmoe_traffic_free(NULL);
}

static void test_strategy_parse(void) {
    dsmoe_sim_strategy s;
    ASSERT_OK(dsmoe_sim_strategy_parse("none", 16, 0.5f, &s));
    ASSERT_EQ_INT(s.balance, 0);
    ASSERT_TRUE(strcmp(s.name, "none") == 0);
    ASSERT_OK(dsmoe_sim_strategy_parse("sign", 16, 0.25f, &s));
    ASSERT_EQ_INT(s.balance, 1);
    ASSERT_EQ_INT(s.balancer.rule, DSMOE_BALANCE_RULE_SIGN);
    ASSERT_NEAR(s.balancer.gamma, 0.25, 0.0);
    ASSERT_EQ_INT(s.balancer.n_experts, 16);
    ASSERT_OK(dsmoe_sim_strategy_parse("proportional:1e-2", 16, 0.25f, &s));
    ASSERT_EQ_INT(s.balancer.rule, DSMOE_BALANCE_RULE_PROPORTIONAL);
    ASSERT_NEAR(s.balancer.gamma, 0.01f, 0.0);
    ASSERT_TRUE(strcmp(s.name, "proportional:1e-2") == 0);
    ASSERT_OK(dsmoe_sim_strategy_parse("prop:0", 16, 0.25f, &s));
    ASSERT_EQ_INT(s.balancer.rule, DSMOE_BALANCE_RULE_PROPORTIONAL);
    static const char *bad[] = {"", "magic", "none:0.1", "sign:", "sign:-3", "sign:abc",
                                "sign:nan", "sign:inf", "sign:1e39", "signs", ":0.1",
                                "sign:0.1:2"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ASSERT_STATUS(dsmoe_sim_strategy_parse(bad[i], 16, 0.1f, &s), DSMOE_STATUS_INVALID_ARGUMENT);
        if (bad[i][0]) has(bad[i]);
    }
    char longspec[80] = "proportional:0.";
    memset(longspec + 15, '0', sizeof longspec - 17);
    longspec[sizeof longspec - 2] = '1';
    longspec[sizeof longspec - 1] = '\0';
    ASSERT_STATUS(dsmoe_sim_strategy_parse(longspec, 16, 0.1f, &s), DSMOE_STATUS_INVALID_ARGUMENT);
    has("longer than 63 bytes");
    ASSERT_STATUS(dsmoe_sim_strategy_parse(NULL, 16, 0.1f, &s), DSMOE_STATUS_INVALID_ARGUMENT);
}

static void bad_sim(const dsmoe_sim_config *c, const char *needle) {
    dsmoe_sim *s = NULL;
    ASSERT_STATUS(dsmoe_sim_create(c, &s), DSMOE_STATUS_INVALID_CONFIG);
    has(needle);
    ASSERT_TRUE(s == NULL);
}

static void test_sim_validation(void) {
    dsmoe_router_config rc = small_router();
    dsmoe_sim_config base, c;
    dsmoe_sim_config_default(&rc, &base);
    base.tokens = 64;
    base.seq_len = 16;
    ASSERT_OK(dsmoe_sim_config_validate(&base));
    ASSERT_EQ_INT(base.router.use_bias, 1);
    ASSERT_EQ_INT(base.n_strategies, 3);
    c = base; c.router.n_groups = 3; bad_sim(&c, "router: n_experts = 16 is not divisible by n_groups = 3");
    c = base; c.router.top_k = 99; bad_sim(&c, "top_k = 99");
    c = base; c.router.use_bias = 0; bad_sim(&c, "use_bias = 0");
    c = base; c.tokens = 0; bad_sim(&c, "tokens = 0");
    c = base; c.steps = 0; bad_sim(&c, "steps = 0");
    c = base; c.last_fraction = 0.0; bad_sim(&c, "last_fraction = 0");
    c = base; c.last_fraction = 1.5; bad_sim(&c, "last_fraction = 1.5");
    c = base; c.threshold = -1.0; bad_sim(&c, "threshold = -1");
    c = base; c.threshold = NAN; bad_sim(&c, "threshold");
    c = base; c.alpha = -1e-4f; bad_sim(&c, "alpha");
    c = base; c.alpha = INFINITY; bad_sim(&c, "alpha = inf");
    c = base; c.seq_len = 30; bad_sim(&c, "seq_len = 30 does not divide the 64 tokens");
    c = base; c.seq_len = 0; bad_sim(&c, "seq_len = 0");
    c = base; c.seq_count = (dsmoe_balance_count)7; bad_sim(&c, "seq_count = 7");
    c = base; c.n_strategies = 0; bad_sim(&c, "n_strategies = 0");
    c = base; c.n_strategies = DSMOE_SIM_MAX_STRATEGIES + 1; bad_sim(&c, "n_strategies = 9");
    c = base; c.strategies[1].name[0] = '\0'; bad_sim(&c, "strategies[1].name");
    c = base; snprintf(c.strategies[2].name, 64, "a\"b"); bad_sim(&c, "strategies[2].name");
    c = base; memset(c.strategies[0].name, 'x', 64); bad_sim(&c, "strategies[0].name");
    c = base; c.strategies[1].balance = 2; bad_sim(&c, "strategies[1] (sign): balance = 2");
    c = base; c.strategies[1].balancer.gamma = -1.0f; bad_sim(&c, "strategies[1] (sign): balancer gamma = -1");
    c = base; c.strategies[2].balancer.gamma_after = NAN; bad_sim(&c, "strategies[2] (proportional): balancer gamma_after");
    c = base; c.strategies[2].balancer.gamma_until_tokens = -5; bad_sim(&c, "gamma_until_tokens = -5");
    c = base; c.strategies[1].balancer.n_experts = 8; bad_sim(&c, "strategies[1] (sign): balancer n_experts = 8");
    /* a 'none' strategy's balancer fields are not used */
    c = base; c.strategies[0].balancer.gamma = -1.0f;
    ASSERT_OK(dsmoe_sim_config_validate(&c));
    ASSERT_STATUS(dsmoe_sim_config_validate(NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_sim *s = NULL;
    ASSERT_STATUS(dsmoe_sim_create(&base, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_OK(dsmoe_sim_create(&base, &s));
    if (!s) return;
    ASSERT_TRUE(dsmoe_sim_get_config(s)->tokens == 64);
    ASSERT_TRUE(dsmoe_sim_balancer(s, 2) != NULL);
    ASSERT_TRUE(dsmoe_sim_balancer(s, 3) == NULL);
    dsmoe_sim_record r;
    ASSERT_STATUS(dsmoe_sim_get_record(s, 0, &r), DSMOE_STATUS_INVALID_ARGUMENT); /* no step yet */
    dsmoe_sim_summary m;
    ASSERT_OK(dsmoe_sim_get_summary(s, 0, &m));
    ASSERT_EQ_INT(m.steps, 0);
    ASSERT_EQ_INT(m.first_step_below, -1);
    ASSERT_STATUS(dsmoe_sim_get_summary(s, 3, &m), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_sim_get_summary(s, -1, &m), DSMOE_STATUS_INVALID_ARGUMENT);
    float bias[GE];
    for (int i = 0; i < GE; i++) bias[i] = 0.01f * (float)i;
    bias[7] = INFINITY;
    ASSERT_STATUS(dsmoe_sim_set_bias(s, bias), DSMOE_STATUS_NON_FINITE);
    has("bias[7]");
    /* nothing changed */
    const float *b0 = dsmoe_balancer_bias(dsmoe_sim_balancer(s, 1));
    for (int i = 0; i < GE; i++) ASSERT_NEAR(b0[i], 0.0, 0.0);
    ASSERT_STATUS(dsmoe_sim_step(s, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_sim_step(NULL, bias), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_sim_get_record(s, 5, &r), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_sim_free(s);
    dsmoe_sim_free(NULL);
}

int main(void) {
    RUN(test_traffic_golden);
    RUN(test_traffic_determinism);
    RUN(test_traffic_profile);
    RUN(test_traffic_noise);
    RUN(test_traffic_domains);
    RUN(test_traffic_drift);
    RUN(test_sim_golden);
    RUN(test_sim_trace_maxvio);
    RUN(test_sim_threads);
    RUN(test_sim_trace_atomic);
    RUN(test_traffic_validation);
    RUN(test_strategy_parse);
    RUN(test_sim_validation);
    return TEST_SUMMARY();
}
