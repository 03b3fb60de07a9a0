/*
 * test_router_props.c — properties of dsmoe_router_* on random inputs, for every
 * preset and odd configurations (group sizes 1..64, K = E, top-3 sums, 0.0 mask):
 *   - the chosen experts equal an independent selection written here (stable sort on
 *     value descending, index ascending, over c = s + b with the group stage), so they
 *     are distinct, in range and inside the kept groups;
 *   - weights are scale·s/(Σs + eps) at the chosen experts (bf16: the bf16 steps) and
 *     sum to the scale when normalising; the bias never changes a weight;
 *   - 1, 2 and 3 threads, and every available ISA, give identical bits (forward,
 *     hidden-state forward, backward); backward accumulates;
 *   - T = 0; every invalid config field, missing bias, NULL outputs, non-finite
 *     logits/bias/hidden, small workspaces give the documented status and a message
 *     naming the field, token or expert; sanitize mode routes rows of NaN/±Inf;
 *   - presets validate; unknown names are NOT_FOUND;
 *   - guard words around every output and workspace stay intact.
 */
#include "testlib.h"

#include <float.h>

/* ----------------------------------------------------------------- configs -- */


#define SIG DSMOE_SCORE_FUNC_SIGMOID
#define SOFT DSMOE_SCORE_FUNC_SOFTMAX
#define GMAX DSMOE_GROUP_SCORE_MAX
#define GSUM DSMOE_GROUP_SCORE_TOPSUM
#define EXCL DSMOE_GROUP_MASK_EXCLUDE
#define ZERO DSMOE_GROUP_MASK_ZERO

/* Presets plus odd shapes; n written to *n. */
static int all_configs(dsmoe_router_config *out, int cap) {
    int n = 0;
    const char *const *names = dsmoe_router_preset_names();
    for (int i = 0; names[i] && n < cap; i++) {
        if (dsmoe_router_preset(names[i], &out[n]) == DSMOE_OK) n++;
    }
    dsmoe_router_config odd[] = {
        tl_router_cfg(24, 4, 2, 3, SIG, GSUM, 2, EXCL, 1, 0.0f, 2.5f, 1),
        tl_router_cfg(12, 3, 2, 3, SIG, GSUM, 2, EXCL, 1, 0.0f, 1.5f, 1),
        tl_router_cfg(30, 5, 2, 4, SIG, GSUM, 3, EXCL, 1, 0.0f, 2.0f, 1),
        tl_router_cfg(7, 1, 1, 7, SIG, GSUM, 2, EXCL, 1, 0.0f, 1.0f, 1),
        tl_router_cfg(48, 6, 3, 5, SOFT, GMAX, 1, EXCL, 0, 0.0f, 16.0f, 0),
        tl_router_cfg(20, 4, 4, 20, SIG, GSUM, 2, EXCL, 1, 0.0f, 1.0f, 1),
        tl_router_cfg(64, 8, 3, 6, SIG, GSUM, 2, ZERO, 1, 1e-20f, 2.5f, 1),
        tl_router_cfg(16, 16, 4, 4, SIG, GMAX, 1, EXCL, 1, 0.0f, 1.0f, 0),
        tl_router_cfg(33, 11, 3, 5, SOFT, GSUM, 3, ZERO, 1, 0.0f, 1.0f, 1),
        tl_router_cfg(40, 8, 2, 6, SIG, GSUM, 1, EXCL, 0, 0.0f, 0.7f, 1),
        tl_router_cfg(256, 8, 4, 8, SIG, GSUM, 2, EXCL, 1, 0.0f, 2.5f, 1),
    };
    for (size_t i = 0; i < sizeof odd / sizeof odd[0] && n < cap; i++) out[n++] = odd[i];
    /* bf16 precision variants of a few */
    dsmoe_router_config b;
    if (n < cap && dsmoe_router_preset("deepseek-v3", &b) == DSMOE_OK) {
        b.precision = DSMOE_PRECISION_BF16;
        out[n++] = b;
    }
    if (n < cap && dsmoe_router_preset("deepseek-v2", &b) == DSMOE_OK) {
        b.precision = DSMOE_PRECISION_BF16;
        out[n++] = b;
    }
    if (n < cap && dsmoe_router_preset("moonlight", &b) == DSMOE_OK) {
        b.precision = DSMOE_PRECISION_BF16;
        out[n++] = b;
    }
    return n;
}

static void describe(const dsmoe_router_config *c, char *buf, size_t n) {
    dsmoe_router_config_json(c, buf, n);
}

/* ---------------------------------------------------------- routed buffers -- */

typedef struct routed {
    int64_t T;
    int32_t E, K;
    int32_t *idx;   /* (T, K) */
    float *w;       /* (T, K) */
    float *s;       /* (T, E) */
    float *l;       /* (T, E) projected logits */
    int64_t *cnt;   /* (E) */
    float *dl;      /* (T, E) */
} routed;

static void routed_alloc(routed *r, int64_t T, int32_t E, int32_t K) {
    r->T = T;
    r->E = E;
    r->K = K;
    r->idx = tl_guarded_alloc((size_t)(T * K) * sizeof(int32_t) + 4);
    r->w = tl_guarded_alloc((size_t)(T * K) * sizeof(float) + 4);
    r->s = tl_guarded_alloc((size_t)(T * E) * sizeof(float) + 4);
    r->l = tl_guarded_alloc((size_t)(T * E) * sizeof(float) + 4);
    r->cnt = tl_guarded_alloc((size_t)E * sizeof(int64_t));
    r->dl = tl_guarded_alloc((size_t)(T * E) * sizeof(float) + 4);
}

static void routed_free(routed *r) {
    ASSERT_TRUE(tl_guard_ok(r->idx));
    ASSERT_TRUE(tl_guard_ok(r->w));
    ASSERT_TRUE(tl_guard_ok(r->s));
    ASSERT_TRUE(tl_guard_ok(r->l));
    ASSERT_TRUE(tl_guard_ok(r->cnt));
    ASSERT_TRUE(tl_guard_ok(r->dl));
    tl_guarded_free(r->idx);
    tl_guarded_free(r->w);
    tl_guarded_free(r->s);
    tl_guarded_free(r->l);
    tl_guarded_free(r->cnt);
    tl_guarded_free(r->dl);
}

/* Forward from logits (and backward of dw into a zeroed r->dl) with a guarded
 * workspace of exactly the reported size. */
static dsmoe_status route_logits(const dsmoe_router_config *cfg, routed *r, const float *logits,
                                 const float *bias, const float *dw, int nt) {
    dsmoe_router_output out = {r->idx, r->w, r->s, NULL, r->cnt};
    size_t ws_size = dsmoe_router_workspace_size(cfg, r->T, 0, DSMOE_DTYPE_F32, nt);
    void *ws = tl_guarded_alloc(ws_size ? ws_size : 1);
    dsmoe_status st = dsmoe_router_forward(cfg, &out, logits, bias, r->T, ws, ws_size, nt);
    ASSERT_TRUE(tl_guard_ok(ws));
    tl_guarded_free(ws);
    if (st == DSMOE_OK && dw) {
        memset(r->dl, 0, (size_t)(r->T * r->E) * sizeof(float));
        st = dsmoe_router_backward(cfg, r->dl, dw, r->idx, r->s, r->T, nt);
    }
    return st;
}

/* Forward from logits with or without the scores output (counts always), guarded
 * workspace of exactly the reported size. */
static dsmoe_status route_logits_opt(const dsmoe_router_config *cfg, routed *r, const float *logits,
                                     const float *bias, int with_scores, int nt) {
    dsmoe_router_output out = {r->idx, r->w, with_scores ? r->s : NULL, NULL, r->cnt};
    size_t ws_size = dsmoe_router_workspace_size(cfg, r->T, 0, DSMOE_DTYPE_F32, nt);
    void *ws = tl_guarded_alloc(ws_size ? ws_size : 1);
    dsmoe_status st = dsmoe_router_forward(cfg, &out, logits, bias, r->T, ws, ws_size, nt);
    ASSERT_TRUE(tl_guard_ok(ws));
    tl_guarded_free(ws);
    return st;
}

static dsmoe_status route_hidden(const dsmoe_router_config *cfg, routed *r, const float *x,
                                 const void *W, dsmoe_dtype wdt, int32_t D, const float *bias,
                                 int nt) {
    dsmoe_router_output out = {r->idx, r->w, r->s, r->l, r->cnt};
    size_t ws_size = dsmoe_router_workspace_size(cfg, r->T, D, wdt, nt);
    void *ws = tl_guarded_alloc(ws_size ? ws_size : 1);
    dsmoe_status st =
        dsmoe_router_forward_hidden(cfg, &out, x, W, wdt, D, bias, r->T, ws, ws_size, nt);
    ASSERT_TRUE(tl_guard_ok(ws));
    tl_guarded_free(ws);
    return st;
}

static float *rand_logits(int64_t T, int32_t E, double std) {
    float *l = malloc((size_t)(T * E) * sizeof(float) + 4);
    for (int64_t i = 0; i < T * E; i++) l[i] = (float)(std * tl_normal());
    return l;
}

static float *rand_bias(int32_t E, double std) {
    float *b = malloc((size_t)E * sizeof(float));
    for (int32_t e = 0; e < E; e++) b[e] = (float)(std * tl_normal());
    return b;
}

static int same_routed(const char *what, const routed *a, const routed *b, int with_hidden,
                       int with_backward) {
    int ok = 1;
    tl_checks++;
    if (memcmp(a->idx, b->idx, (size_t)(a->T * a->K) * sizeof(int32_t)) != 0) {
        TL_FAIL("%s: indices differ", what);
        ok = 0;
    }
    if (memcmp(a->cnt, b->cnt, (size_t)a->E * sizeof(int64_t)) != 0) {
        TL_FAIL("%s: counts differ", what);
        ok = 0;
    }
    ok &= tl_same_bits(what, a->w, b->w, a->T * a->K);
    ok &= tl_same_bits(what, a->s, b->s, a->T * a->E);
    if (with_hidden) ok &= tl_same_bits(what, a->l, b->l, a->T * a->E);
    if (with_backward) ok &= tl_same_bits(what, a->dl, b->dl, a->T * a->E);
    return ok;
}

/* ------------------------------------------------- independent selection -- */

static float bf16r(float x) { return dsmoe_bf16_to_f32(dsmoe_f32_to_bf16(x)); }

/* The analyzer does not know the config invariants this reference relies on (G divides
 * E, group_topm <= E/G): it reads past the group or the sorted prefix on paths a valid
 * config never takes. NOLINTBEGIN(clang-analyzer-core.UndefinedBinaryOperatorResult) */

/* Positions of v[0..n) sorted by value descending, then position ascending
 * (insertion sort: stable by construction). */
static void sort_desc(int32_t *ord, const float *v, int32_t n) {
    for (int32_t i = 0; i < n; i++) ord[i] = i;
    for (int32_t i = 1; i < n; i++) {
        int32_t x = ord[i], j = i;
        while (j > 0 && v[x] > v[ord[j - 1]]) {
            ord[j] = ord[j - 1];
            j--;
        }
        ord[j] = x;
    }
}

/* The K experts dsmoe must choose for one token, from its affinities s and the
 * bias: c = s + b in fp32; group score = max or sum of the m largest (largest
 * first); the TG best groups (lower id wins ties); exclude / 0.0 mask; top K. */
static void expected_selection(const dsmoe_router_config *cfg, const float *s, const float *bias,
                               int32_t *idx, uint8_t *kept) {
    const int32_t E = cfg->n_experts, G = cfg->n_groups, n = E / G, K = cfg->top_k;
    if (E < 1 || G < 1 || G > E) return;
    float *c = malloc((size_t)E * sizeof(float));
    float *gs = malloc((size_t)G * sizeof(float));
    int32_t *ord = malloc((size_t)E * sizeof(int32_t));
    for (int32_t e = 0; e < E; e++) c[e] = bias ? s[e] + bias[e] : s[e];
    for (int32_t g = 0; g < G; g++) {
        sort_desc(ord, c + g * n, n);
        int32_t m = cfg->group_score == DSMOE_GROUP_SCORE_MAX ? 1 : cfg->group_topm;
        float acc = c[g * n + ord[0]];
        for (int32_t j = 1; j < m; j++) acc += c[g * n + ord[j]];
        gs[g] = acc;
    }
    sort_desc(ord, gs, G);
    for (int32_t g = 0; g < G; g++) kept[g] = 0;
    for (int32_t j = 0; j < (G > 1 ? cfg->topk_groups : G); j++) kept[ord[j]] = 1;
    /* candidates: excluded experts get -inf (never chosen: K <= TG·n), or 0.0 */
    for (int32_t e = 0; e < E; e++)
        if (!kept[e / n]) c[e] = cfg->group_mask == DSMOE_GROUP_MASK_ZERO ? 0.0f : -INFINITY;
    sort_desc(ord, c, E);
    memcpy(idx, ord, (size_t)K * sizeof(int32_t));
    free(c);
    free(gs);
    free(ord);
}
/* NOLINTEND(clang-analyzer-core.UndefinedBinaryOperatorResult) */

/* Expected weights at the chosen experts from the affinities. fp32: within 1e-6
 * relative of scale·s/(Σs + eps); bf16: the bf16 steps, exactly. */
static int check_weights(const dsmoe_router_config *cfg, const float *s, const int32_t *idx,
                         const float *w, int64_t t, const char *what) {
    const int32_t K = cfg->top_k;
    int ok = 1;
    if (cfg->precision == DSMOE_PRECISION_FP32) {
        double sum = 0;
        for (int32_t k = 0; k < K; k++) sum += s[idx[k]];
        double den = sum + (double)cfg->norm_eps;
        double wsum = 0;
        for (int32_t k = 0; k < K; k++) {
            double want = cfg->normalize ? (den > 0 ? s[idx[k]] / den : 1.0 / K) : s[idx[k]];
            want *= cfg->scale;
            wsum += w[k];
            if (!(fabs(w[k] - want) <= 2e-6 * fabs(want) + 1e-37)) ok = 0;
        }
        if (cfg->normalize && sum > 1e-12 && !(fabs(wsum - cfg->scale) <= 1e-6 * cfg->scale))
            ok = 0;
    } else {
        float sum = s[idx[0]];
        for (int32_t k = 1; k < K; k++) sum += s[idx[k]];
        float den = bf16r(sum) + cfg->norm_eps;
        for (int32_t k = 0; k < K; k++) {
            float q = s[idx[k]];
            if (cfg->normalize) q = den > 0.0f ? bf16r(q / den) : bf16r(1.0f / (float)K);
            float want = bf16r(q * cfg->scale);
            if (memcmp(&want, &w[k], 4) != 0) ok = 0;
        }
    }
    tl_checks++;
    if (!ok) {
        TL_FAIL("%s: token %lld: weights are not scale·s/Σs at the chosen experts", what,
                (long long)t);
        for (int32_t k = 0; k < K; k++)
            fprintf(stderr, "    expert %d s %.9g w %.9g\n", (int)idx[k], (double)s[idx[k]],
                    (double)w[k]);
    }
    return ok;
}

/* ------------------------------------------------------------------- tests -- */

static void test_selection_and_weights(void) {
    dsmoe_router_config cfgs[32];
    int n = all_configs(cfgs, 32);
    ASSERT_TRUE(n >= 20);
    for (int ci = 0; ci < n; ci++) {
        const dsmoe_router_config *cfg = &cfgs[ci];
        char desc[512];
        describe(cfg, desc, sizeof desc);
        const int32_t E = cfg->n_experts, K = cfg->top_k, G = cfg->n_groups;
        const int64_t T = 40;
        tl_seed(100 + (uint64_t)ci);
        float *logits = rand_logits(T, E, 2.0);
        float *bias = cfg->use_bias ? rand_bias(E, 0.1) : NULL;
        routed r;
        routed_alloc(&r, T, E, K);
        ASSERT_OK(route_logits(cfg, &r, logits, bias, NULL, 2));
        int32_t *want = calloc((size_t)K, sizeof(int32_t));
        uint8_t *kept = malloc((size_t)G);
        int bad_sel = 0, bad_range = 0, bad_dup = 0, bad_group = 0;
        for (int64_t t = 0; t < T; t++) {
            const int32_t *idx = r.idx + t * K;
            const float *s = r.s + t * E;
            for (int32_t k = 0; k < K; k++) {
                if (idx[k] < 0 || idx[k] >= E) {
                    bad_range++;
                    continue;
                }
                for (int32_t j = 0; j < k; j++) bad_dup += idx[j] == idx[k];
            }
            if (bad_range) break;
            expected_selection(cfg, s, bias, want, kept);
            if (memcmp(want, idx, (size_t)K * sizeof(int32_t)) != 0) {
                if (bad_sel++ < 3) {
                    fprintf(stderr, "  %s token %lld:\n", desc, (long long)t);
                    for (int32_t k = 0; k < K; k++)
                        fprintf(stderr, "    got %d want %d\n", (int)idx[k], (int)want[k]);
                }
            }
            if (cfg->group_mask == DSMOE_GROUP_MASK_EXCLUDE)
                for (int32_t k = 0; k < K; k++) bad_group += !kept[idx[k] / (E / G)];
            if (!check_weights(cfg, s, idx, r.w + t * K, t, desc)) break;
        }
        tl_checks += 4;
        if (bad_range) TL_FAIL("%s: indices out of range", desc);
        if (bad_dup) TL_FAIL("%s: %d repeated experts", desc, bad_dup);
        if (bad_group) TL_FAIL("%s: %d experts outside the kept groups", desc, bad_group);
        if (bad_sel) TL_FAIL("%s: %d tokens differ from the independent selection", desc, bad_sel);
        /* counts = histogram of the indices */
        int64_t total = 0;
        int cbad = 0;
        for (int32_t e = 0; e < E; e++) {
            int64_t c = 0;
            for (int64_t i = 0; i < T * K; i++) c += r.idx[i] == e;
            cbad += c != r.cnt[e];
            total += r.cnt[e];
        }
        ASSERT_EQ_INT(cbad, 0);
        ASSERT_EQ_INT(total, T * K);
        free(want);
        free(kept);
        routed_free(&r);
        free(logits);
        free(bias);
    }
}

/* The bias only selects: shifting it by a constant keeps (almost) every selection,
 * and wherever the selection is the same the weights are the same bits. */
static void test_bias_never_in_weights(void) {
    dsmoe_router_config cfgs[32];
    int n = all_configs(cfgs, 32);
    for (int ci = 0; ci < n; ci++) {
        const dsmoe_router_config *cfg = &cfgs[ci];
        if (!cfg->use_bias) continue;
        char desc[512];
        describe(cfg, desc, sizeof desc);
        const int32_t E = cfg->n_experts, K = cfg->top_k;
        const int64_t T = 40;
        tl_seed(200 + (uint64_t)ci);
        float *logits = rand_logits(T, E, 2.0);
        float *b1 = rand_bias(E, 0.1);
        float *b2 = malloc((size_t)E * sizeof(float));
        float *b3 = malloc((size_t)E * sizeof(float));
        for (int32_t e = 0; e < E; e++) {
            b2[e] = b1[e] + 0.375f;
            b3[e] = b1[e] * 0.5f; /* a different bias: weights still scale·s/Σs */
        }
        routed r1, r2, r3;
        routed_alloc(&r1, T, E, K);
        routed_alloc(&r2, T, E, K);
        routed_alloc(&r3, T, E, K);
        ASSERT_OK(route_logits(cfg, &r1, logits, b1, NULL, 1));
        ASSERT_OK(route_logits(cfg, &r2, logits, b2, NULL, 1));
        ASSERT_OK(route_logits(cfg, &r3, logits, b3, NULL, 1));
        ASSERT_TRUE(tl_same_bits("scores do not depend on the bias", r1.s, r2.s, T * E));
        int same = 0;
        for (int64_t t = 0; t < T; t++) {
            if (memcmp(r1.idx + t * K, r2.idx + t * K, (size_t)K * 4) != 0) continue;
            same++;
            tl_same_bits(desc, r1.w + t * K, r2.w + t * K, K);
        }
        ASSERT_TRUE(same >= T - 2); /* fp32 rounding of b + 0.375 may flip a near-tie */
        for (int64_t t = 0; t < T; t++)
            if (!check_weights(cfg, r3.s + t * E, r3.idx + t * K, r3.w + t * K, t, desc)) break;
        routed_free(&r1);
        routed_free(&r2);
        routed_free(&r3);
        free(logits);
        free(b1);
        free(b2);
        free(b3);
    }
}

static void test_threads_identical(void) {
    dsmoe_router_config cfgs[32];
    int n = all_configs(cfgs, 32);
    for (int ci = 0; ci < n; ci++) {
        const dsmoe_router_config *cfg = &cfgs[ci];
        char desc[512];
        describe(cfg, desc, sizeof desc);
        const int32_t E = cfg->n_experts, K = cfg->top_k;
        const int64_t T = 100;
        tl_seed(300 + (uint64_t)ci);
        float *logits = rand_logits(T, E, 2.0);
        float *bias = cfg->use_bias ? rand_bias(E, 0.1) : NULL;
        float *dw = rand_logits(T, K, 1.0);
        routed r[3];
        for (int i = 0; i < 3; i++) {
            routed_alloc(&r[i], T, E, K);
            ASSERT_OK(route_logits(cfg, &r[i], logits, bias, dw, i + 1));
        }
        same_routed(desc, &r[0], &r[1], 0, 1);
        same_routed(desc, &r[0], &r[2], 0, 1);
        for (int i = 0; i < 3; i++) routed_free(&r[i]);
        free(logits);
        free(bias);
        free(dw);
    }
}

/* Hidden-state input: f32 and bf16 gates, small (per-token) and blocked paths. */
static void hidden_case(const dsmoe_router_config *cfg, int64_t T, int32_t D, dsmoe_dtype wdt,
                        routed *r, int nt, const float *x, const void *W, const float *bias) {
    routed_alloc(r, T, cfg->n_experts, cfg->top_k);
    ASSERT_OK(route_hidden(cfg, r, x, W, wdt, D, bias, nt));
}

static void test_hidden_threads_and_isas(void) {
    dsmoe_router_config v3, v2;
    ASSERT_OK(dsmoe_router_preset("deepseek-v3", &v3));
    ASSERT_OK(dsmoe_router_preset("deepseek-v2", &v2));
    dsmoe_router_config cfgs[4] = {v3, v2, v3, v2};
    cfgs[0].n_experts = 64;
    cfgs[0].n_groups = 8;
    cfgs[0].topk_groups = 3;
    cfgs[0].top_k = 6;
    cfgs[1].n_experts = 40;
    cfgs[1].n_groups = 4;
    cfgs[1].topk_groups = 2;
    cfgs[1].top_k = 5;
    cfgs[2] = cfgs[0];
    cfgs[2].precision = DSMOE_PRECISION_BF16;
    cfgs[3] = cfgs[1];
    cfgs[3].precision = DSMOE_PRECISION_BF16;
    const int32_t D = 67;
    const int64_t Ts[2] = {5, 600};
    const char *isas[2] = {"avx2", "avx512"};
    for (int ci = 0; ci < 4; ci++) {
        const dsmoe_router_config *cfg = &cfgs[ci];
        const int32_t E = cfg->n_experts;
        for (int wi = 0; wi < 2; wi++) {
            dsmoe_dtype wdt = wi ? DSMOE_DTYPE_BF16 : DSMOE_DTYPE_F32;
            tl_seed(400 + (uint64_t)(ci * 2 + wi));
            float *W = rand_logits(E, D, 1.5 / sqrt((double)D));
            uint16_t *Wb = malloc((size_t)E * (size_t)D * 2);
            for (int64_t i = 0; i < (int64_t)E * D; i++) Wb[i] = dsmoe_f32_to_bf16(W[i]);
            const void *Wp = wi ? (const void *)Wb : (const void *)W;
            float *bias = cfg->use_bias ? rand_bias(E, 0.05) : NULL;
            for (int ti = 0; ti < 2; ti++) {
                int64_t T = Ts[ti];
                float *x = rand_logits(T, D, 1.0);
                char what[256];
                snprintf(what, sizeof what, "hidden cfg %d gate %s T %lld", ci,
                         dsmoe_dtype_name(wdt), (long long)T);
                routed r[3];
                for (int i = 0; i < 3; i++) hidden_case(cfg, T, D, wdt, &r[i], i + 1, x, Wp, bias);
                same_routed(what, &r[0], &r[1], 1, 0);
                same_routed(what, &r[0], &r[2], 1, 0);
                /* every available ISA against the scalar reference */
                routed ref;
                ASSERT_OK(dsmoe_set_isa("ref"));
                hidden_case(cfg, T, D, wdt, &ref, 2, x, Wp, bias);
                for (int ii = 0; ii < 2; ii++) {
                    if (dsmoe_set_isa(isas[ii]) != DSMOE_OK) continue;
                    routed q;
                    hidden_case(cfg, T, D, wdt, &q, 2, x, Wp, bias);
                    char w2[300];
                    snprintf(w2, sizeof w2, "%s isa %s", what, isas[ii]);
                    same_routed(w2, &ref, &q, 1, 0);
                    routed_free(&q);
                }
                ASSERT_OK(dsmoe_set_isa(NULL));
                routed_free(&ref);
                for (int i = 0; i < 3; i++) routed_free(&r[i]);
                free(x);
            }
            free(W);
            free(Wb);
            free(bias);
        }
    }
}

/* The projection runs fixed blocks of tokens on several threads at once; repeated
 * runs must keep giving the one-thread bits (catches a BLAS that is not safe to call
 * concurrently, which shows up only now and then). */
static void test_hidden_repeatable(void) {
    dsmoe_router_config cfg;
    ASSERT_OK(dsmoe_router_preset("deepseek-v3", &cfg));
    cfg.n_experts = 64;
    cfg.topk_groups = 3;
    cfg.top_k = 6;
    const int32_t E = 64, D = 67;
    const int64_t T = 600; /* two blocks of tokens, started together */
    tl_seed(450);
    float *x = rand_logits(T, D, 1.0);
    float *W = rand_logits(E, D, 1.5 / sqrt((double)D));
    float *bias = rand_bias(E, 0.05);
    routed one, many;
    routed_alloc(&one, T, E, cfg.top_k);
    routed_alloc(&many, T, E, cfg.top_k);
    ASSERT_OK(route_hidden(&cfg, &one, x, W, DSMOE_DTYPE_F32, D, bias, 1));
    int differ = 0, reps = 400;
    for (int i = 0; i < reps; i++) {
        ASSERT_OK(route_hidden(&cfg, &many, x, W, DSMOE_DTYPE_F32, D, bias, 2));
        if (memcmp(one.l, many.l, (size_t)(T * E) * sizeof(float)) != 0) differ++;
    }
    tl_checks++;
    if (differ)
        TL_FAIL("forward_hidden with 2 threads: projected logits differ from 1 thread in %d of %d "
                "repeated runs (T = %lld, D = %d)",
                differ, reps, (long long)T, (int)D);
    routed_free(&one);
    routed_free(&many);
    free(x);
    free(W);
    free(bias);
}

static void test_isas_identical(void) {
    dsmoe_router_config cfgs[32];
    int n = all_configs(cfgs, 32);
    const char *isas[2] = {"avx2", "avx512"};
    int tested = 0;
    for (int ci = 0; ci < n; ci++) {
        const dsmoe_router_config *cfg = &cfgs[ci];
        char desc[512];
        describe(cfg, desc, sizeof desc);
        const int32_t E = cfg->n_experts, K = cfg->top_k;
        /* 53 = three blocks of 16 tokens in lanes and a tail of 5 (one thread), ranges of
         * 18 and 17 (three threads) */
        const int64_t T = 53;
        tl_seed(500 + (uint64_t)ci);
        float *logits = rand_logits(T, E, 3.0);
        /* saturated, tied and tiny rows too, in the first and in the third block of 16 */
        for (int64_t r0 = 0; r0 <= 33; r0 += 33)
            for (int32_t e = 0; e < E; e++) {
                float *l = logits + (size_t)r0 * (size_t)E;
                l[e] = 80.0f;
                l[E + e] = -80.0f;
                l[2 * E + e] = (float)(e % 3);
                l[3 * E + e] = -100.0f;
                /* where exp(-u) reaches 2^128 (the sigmoid's overflow edge) */
                l[4 * E + e] = -87.5f - 1.5f * (float)e / (float)E;
                /* a few distinct values: ties among the candidates */
                l[5 * E + e] = 0.5f * (float)((e * 7) % 5);
            }
        float *bias = cfg->use_bias ? rand_bias(E, 0.1) : NULL;
        float *dw = rand_logits(T, K, 1.0);
        routed ref;
        routed_alloc(&ref, T, E, K);
        ASSERT_OK(dsmoe_set_isa("ref"));
        ASSERT_OK(route_logits(cfg, &ref, logits, bias, dw, 2));
        for (int ii = 0; ii < 2; ii++) {
            if (dsmoe_set_isa(isas[ii]) != DSMOE_OK) {
                if (ci == 0) fprintf(stderr, "  (isa %s not available: skipped)\n", isas[ii]);
                continue;
            }
            for (int nt = 1; nt <= 3; nt += 2) {
                routed q;
                routed_alloc(&q, T, E, K);
                ASSERT_OK(route_logits(cfg, &q, logits, bias, dw, nt));
                char what[600];
                snprintf(what, sizeof what, "isa %s vs ref, %d threads, %s", isas[ii], nt, desc);
                same_routed(what, &ref, &q, 0, 1);
                routed_free(&q);
                tested++;
            }
        }
        ASSERT_OK(dsmoe_set_isa(NULL));
        routed_free(&ref);
        free(logits);
        free(bias);
        free(dw);
    }
    fprintf(stderr, "  %d config x ISA comparisons\n", tested);
}

/* Backward accumulates: into a buffer holding P it gives P + (the gradient it gives
 * into zeros), up to fp32 rounding of the additions. */
static void test_backward_accumulates(void) {
    dsmoe_router_config cfgs[32];
    int n = all_configs(cfgs, 32);
    for (int ci = 0; ci < n; ci++) {
        const dsmoe_router_config *cfg = &cfgs[ci];
        const int32_t E = cfg->n_experts, K = cfg->top_k;
        const int64_t T = 9;
        tl_seed(600 + (uint64_t)ci);
        float *logits = rand_logits(T, E, 2.0);
        float *bias = cfg->use_bias ? rand_bias(E, 0.1) : NULL;
        float *dw = rand_logits(T, K, 1.0);
        routed r;
        routed_alloc(&r, T, E, K);
        ASSERT_OK(route_logits(cfg, &r, logits, bias, dw, 1));
        float *acc = malloc((size_t)(T * E) * sizeof(float));
        double *want = malloc((size_t)(T * E) * sizeof(double));
        for (int64_t i = 0; i < T * E; i++) {
            acc[i] = (float)tl_normal();
            want[i] = (double)acc[i] + (double)r.dl[i];
        }
        ASSERT_OK(dsmoe_router_backward(cfg, acc, dw, r.idx, r.s, T, 2));
        int off = 0;
        for (int64_t i = 0; i < T * E; i++) {
            double tol = 4.0 * FLT_EPSILON * (fabs(want[i]) + fabs((double)r.dl[i]) + 1.0);
            off += !(fabs((double)acc[i] - want[i]) <= tol);
        }
        ASSERT_EQ_INT(off, 0);
        /* sigmoid: unselected experts get no gradient */
        if (cfg->score_func == DSMOE_SCORE_FUNC_SIGMOID) {
            int stray = 0;
            for (int64_t t = 0; t < T; t++)
                for (int32_t e = 0; e < E; e++) {
                    int chosen = 0;
                    for (int32_t k = 0; k < K; k++) chosen |= r.idx[t * K + k] == e;
                    if (!chosen && r.dl[t * E + e] != 0.0f) stray++;
                }
            ASSERT_EQ_INT(stray, 0);
        }
        free(acc);
        free(want);
        routed_free(&r);
        free(logits);
        free(bias);
        free(dw);
    }
}

static void test_zero_tokens(void) {
    dsmoe_router_config cfg;
    ASSERT_OK(dsmoe_router_preset("deepseek-v3", &cfg));
    const int32_t E = cfg.n_experts;
    routed r;
    routed_alloc(&r, 0, E, cfg.top_k);
    for (int32_t e = 0; e < E; e++) r.cnt[e] = 99;
    float dummy[1] = {0};
    float *bias = rand_bias(E, 0.1);
    ASSERT_OK(route_logits(&cfg, &r, dummy, bias, dummy, 1));
    int nz = 0;
    for (int32_t e = 0; e < E; e++) nz += r.cnt[e] != 0;
    ASSERT_EQ_INT(nz, 0);
    float *W = rand_logits(E, 4, 1.0);
    ASSERT_OK(route_hidden(&cfg, &r, dummy, W, DSMOE_DTYPE_F32, 4, bias, 2));
    free(W);
    ASSERT_OK(dsmoe_router_backward(&cfg, r.dl, dummy, r.idx, r.s, 0, 2));
    size_t ws = dsmoe_router_workspace_size(&cfg, 0, 0, DSMOE_DTYPE_F32, 1);
    ASSERT_TRUE(ws > 0);
    routed_free(&r);
    free(bias);
}

/* ---------------------------------------------------------------- validation -- */

static void expect_bad_field(const dsmoe_router_config *c, const char *field, const char *what) {
    dsmoe_clear_error();
    dsmoe_status st = dsmoe_router_config_validate(c);
    tl_checks++;
    if (st != DSMOE_STATUS_INVALID_CONFIG) {
        TL_FAIL("%s: validate gave %s, want INVALID_CONFIG", what, dsmoe_status_name(st));
        return;
    }
    tl_checks++;
    if (!strstr(dsmoe_last_error(), field))
        TL_FAIL("%s: message '%s' does not name %s", what, dsmoe_last_error(), field);
    /* forward refuses it too, and writes nothing */
    int32_t idx[4] = {-7, -7, -7, -7};
    float w[4] = {0}, logits[64] = {0}, bias[64] = {0}, ws[4096];
    dsmoe_router_output out = {idx, w, NULL, NULL, NULL};
    ASSERT_STATUS(dsmoe_router_forward(c, &out, logits, c->use_bias == 1 ? bias : NULL, 1, ws,
                                       sizeof ws, 1),
                  DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_EQ_INT(idx[0], -7);
}

static void test_validation(void) {
    dsmoe_router_config base = tl_router_cfg(16, 4, 2, 3, SIG, GSUM, 2, EXCL, 1, 0.0f, 2.5f, 1);
    ASSERT_OK(dsmoe_router_config_validate(&base));
    dsmoe_router_config c;
#define BAD(field_name, stmt)                          \
    do {                                               \
        c = base;                                      \
        stmt;                                          \
        expect_bad_field(&c, field_name, #stmt);       \
    } while (0)
    BAD("n_experts", c.n_experts = 0);
    BAD("n_experts", c.n_experts = -16);
    BAD("n_groups", (c.n_experts = 18, c.n_groups = 4)); /* E % G != 0 */
    BAD("n_groups", c.n_groups = 0);
    BAD("topk_groups", c.topk_groups = 5);
    BAD("topk_groups", c.topk_groups = 0);
    BAD("top_k", c.top_k = 9); /* > TG·E/G = 8 */
    BAD("top_k", c.top_k = 0);
    BAD("top_k", c.top_k = -1);
    BAD("group_topm", c.group_topm = 5); /* > E/G = 4 */
    BAD("group_topm", c.group_topm = 0);
    BAD("scale", c.scale = NAN);
    BAD("scale", c.scale = INFINITY);
    BAD("scale", c.scale = 0.0f);
    BAD("scale", c.scale = -2.5f);
    BAD("norm_eps", c.norm_eps = -1e-20f);
    BAD("norm_eps", c.norm_eps = NAN);
    BAD("norm_eps", c.norm_eps = INFINITY);
    BAD("score_func", c.score_func = (dsmoe_score_func)7);
    BAD("group_score", c.group_score = (dsmoe_group_score)5);
    BAD("group_mask", c.group_mask = (dsmoe_group_mask)3);
    BAD("precision", c.precision = (dsmoe_precision)2);
    BAD("nonfinite", c.nonfinite = (dsmoe_nonfinite)9);
    BAD("normalize", c.normalize = 2);
    BAD("use_bias", c.use_bias = -1);
#undef BAD
    /* group_topm is irrelevant for the max group score */
    c = base;
    c.group_score = GMAX;
    c.group_topm = 99;
    ASSERT_OK(dsmoe_router_config_validate(&c));
    /* K = TG·E/G is the largest valid K */
    c = base;
    c.top_k = 8;
    ASSERT_OK(dsmoe_router_config_validate(&c));
    ASSERT_STATUS(dsmoe_router_config_validate(NULL), DSMOE_STATUS_INVALID_ARGUMENT);
}

static void test_bad_arguments(void) {
    dsmoe_router_config cfg = tl_router_cfg(16, 4, 2, 3, SIG, GSUM, 2, EXCL, 1, 0.0f, 2.5f, 1);
    const int64_t T = 5;
    const int32_t E = 16, K = 3;
    routed r;
    routed_alloc(&r, T, E, K);
    float *logits = rand_logits(T, E, 1.0);
    float *bias = rand_bias(E, 0.1);
    size_t ws_size = dsmoe_router_workspace_size(&cfg, T, 0, DSMOE_DTYPE_F32, 2);
    void *ws = tl_guarded_alloc(ws_size);
    dsmoe_router_output out = {r.idx, r.w, r.s, NULL, r.cnt};

    ASSERT_OK(dsmoe_router_forward(&cfg, &out, logits, bias, T, ws, ws_size, 2));
    /* missing bias when use_bias */
    ASSERT_STATUS(dsmoe_router_forward(&cfg, &out, logits, NULL, T, ws, ws_size, 2),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "bias") != NULL);
    /* NULL outputs / inputs */
    dsmoe_router_output o2 = out;
    o2.indices = NULL;
    ASSERT_STATUS(dsmoe_router_forward(&cfg, &o2, logits, bias, T, ws, ws_size, 2),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    o2 = out;
    o2.weights = NULL;
    ASSERT_STATUS(dsmoe_router_forward(&cfg, &o2, logits, bias, T, ws, ws_size, 2),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_router_forward(&cfg, NULL, logits, bias, T, ws, ws_size, 2),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_router_forward(&cfg, &out, NULL, bias, T, ws, ws_size, 2),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_router_forward(&cfg, &out, logits, bias, -1, ws, ws_size, 2),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_router_forward(NULL, &out, logits, bias, T, ws, ws_size, 2),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_router_backward(&cfg, NULL, r.w, r.idx, r.s, T, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_router_backward(&cfg, r.dl, r.w, r.idx, NULL, T, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    /* workspace too small or absent */
    ASSERT_STATUS(dsmoe_router_forward(&cfg, &out, logits, bias, T, ws, ws_size / 2, 2),
                  DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    ASSERT_STATUS(dsmoe_router_forward(&cfg, &out, logits, bias, T, NULL, ws_size, 2),
                  DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    {
        size_t need = dsmoe_router_workspace_size(&cfg, T, 9, DSMOE_DTYPE_BF16, 2);
        float x[5 * 9] = {0};
        uint16_t W[16 * 9] = {0};
        ASSERT_STATUS(dsmoe_router_forward_hidden(&cfg, &out, x, W, DSMOE_DTYPE_BF16, 9, bias, T,
                                                  ws, need > ws_size ? ws_size : need - 1, 2),
                      DSMOE_STATUS_WORKSPACE_TOO_SMALL);
        ASSERT_STATUS(dsmoe_router_forward_hidden(&cfg, &out, x, W, DSMOE_DTYPE_I32, 9, bias, T,
                                                  ws, ws_size, 2),
                      DSMOE_STATUS_INVALID_ARGUMENT);
    }
    /* non-finite logits name the token and the expert */
    float keep = logits[3 * E + 11];
    logits[3 * E + 11] = NAN;
    ASSERT_STATUS(dsmoe_router_forward(&cfg, &out, logits, bias, T, ws, ws_size, 2),
                  DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "token 3") != NULL);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "expert 11") != NULL);
    logits[3 * E + 11] = keep;
    logits[4 * E + 15] = -INFINITY;
    ASSERT_STATUS(dsmoe_router_forward(&cfg, &out, logits, bias, T, ws, ws_size, 2),
                  DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "token 4") != NULL);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "expert 15") != NULL);
    logits[4 * E + 15] = 0.5f;
    /* non-finite bias */
    bias[7] = INFINITY;
    ASSERT_STATUS(dsmoe_router_forward(&cfg, &out, logits, bias, T, ws, ws_size, 2),
                  DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "bias") != NULL);
    bias[7] = 0.0f;
    ASSERT_TRUE(tl_guard_ok(ws));
    tl_guarded_free(ws);
    routed_free(&r);
    free(logits);
    free(bias);
}

/* The NON_FINITE message for a large config: "token 3" and "expert 17". */
static void test_nonfinite_message(void) {
    dsmoe_router_config cfg;
    ASSERT_OK(dsmoe_router_preset("deepseek-v3", &cfg));
    const int32_t E = 256;
    const int64_t T = 6;
    routed r;
    routed_alloc(&r, T, E, cfg.top_k);
    float *logits = rand_logits(T, E, 1.0);
    float *bias = rand_bias(E, 0.1);
    logits[3 * E + 17] = INFINITY;
    dsmoe_router_output out = {r.idx, r.w, r.s, NULL, r.cnt};
    size_t ws_size = dsmoe_router_workspace_size(&cfg, T, 0, DSMOE_DTYPE_F32, 2);
    void *ws = tl_guarded_alloc(ws_size);
    ASSERT_STATUS(dsmoe_router_forward(&cfg, &out, logits, bias, T, ws, ws_size, 2),
                  DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "token 3") != NULL);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "expert 17") != NULL);
    /* hidden states: the token and the feature */
    const int32_t D = 8;
    float *x = rand_logits(T, D, 1.0);
    float *W = rand_logits(E, D, 0.3);
    x[2 * D + 5] = NAN;
    size_t ws2 = dsmoe_router_workspace_size(&cfg, T, D, DSMOE_DTYPE_F32, 2);
    void *wsh = tl_guarded_alloc(ws2);
    out.logits = r.l;
    ASSERT_STATUS(dsmoe_router_forward_hidden(&cfg, &out, x, W, DSMOE_DTYPE_F32, D, bias, T, wsh,
                                              ws2, 2),
                  DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "token 2") != NULL);
    ASSERT_TRUE(tl_guard_ok(wsh));
    ASSERT_TRUE(tl_guard_ok(ws));
    tl_guarded_free(wsh);
    tl_guarded_free(ws);
    routed_free(&r);
    free(logits);
    free(bias);
    free(x);
    free(W);
}

/* A NaN/Inf anywhere, even in one of the last tokens, changes no output: every logit is
 * checked before the first is routed. Logits and hidden-state paths, every config, 1-4
 * threads (each thread routes its own range, so a bad token in the last range used to
 * leave the others' results written). */
static void fill_sentinel(routed *r) {
    for (int64_t i = 0; i < r->T * r->K; i++) {
        r->idx[i] = -7;
        r->w[i] = 1234.5f;
    }
    for (int64_t i = 0; i < r->T * r->E; i++) {
        r->s[i] = -99.0f;
        r->l[i] = 555.0f;
    }
    for (int32_t e = 0; e < r->E; e++) r->cnt[e] = -5;
}

static int sentinel_intact(const routed *r) {
    for (int64_t i = 0; i < r->T * r->K; i++)
        if (r->idx[i] != -7 || r->w[i] != 1234.5f) return 0;
    for (int64_t i = 0; i < r->T * r->E; i++)
        if (r->s[i] != -99.0f || r->l[i] != 555.0f) return 0;
    for (int32_t e = 0; e < r->E; e++)
        if (r->cnt[e] != -5) return 0;
    return 1;
}

static void test_nonfinite_changes_nothing(void) {
    dsmoe_router_config cfgs[32];
    const int nc = all_configs(cfgs, 32);
    const int64_t Ts[2] = {64, 6}; /* 64: SGEMM projection, 16 tokens a thread; 6: per token */
    const int32_t D = 8;
    char desc[512];
    for (int c = 0; c < nc; c++) {
        const dsmoe_router_config *cfg = &cfgs[c];
        if (cfg->nonfinite != DSMOE_NONFINITE_ERROR) continue;
        describe(cfg, desc, sizeof desc);
        const int32_t E = cfg->n_experts, K = cfg->top_k;
        for (int ti = 0; ti < 2; ti++) {
            const int64_t T = Ts[ti];
            routed r;
            routed_alloc(&r, T, E, K);
            float *logits = rand_logits(T, E, 1.0);
            float *bias = cfg->use_bias ? rand_bias(E, 0.1) : NULL;
            float *x = rand_logits(T, D, 1.0);
            float *W = rand_logits(E, D, 0.3);
            for (int64_t i = 0; i < (int64_t)E * D; i++) W[i] = fabsf(W[i]) + 0.5f;
            for (int nt = 1; nt <= 4; nt++) {
                const float bads[3] = {NAN, INFINITY, -INFINITY};
                for (int b = 0; b < 3; b++) {
                    /* a late token: the last thread's range */
                    const int64_t t = T - 2;
                    const int32_t e = (int32_t)((b * 7 + 3) % E);
                    const float keep = logits[t * E + e];
                    logits[t * E + e] = bads[b];
                    /* with scores (checked first) and without (the fused path routes into
                     * staging buffers, testing the logits as it goes) */
                    for (int with_s = 0; with_s < 2; with_s++) {
                        fill_sentinel(&r);
                        tl_checks++;
                        if (route_logits_opt(cfg, &r, logits, bias, with_s, nt) != DSMOE_STATUS_NON_FINITE)
                            TL_FAIL("%s T=%lld nt=%d: a bad logit was not reported", desc, (long long)T, nt);
                        tl_checks++;
                        if (!sentinel_intact(&r))
                            TL_FAIL("%s T=%lld nt=%d scores=%d: outputs written before NON_FINITE (logits)",
                                    desc, (long long)T, nt, with_s);
                    }
                    logits[t * E + e] = keep;
                }
                /* hidden path: a bad hidden state, then a projection that overflows */
                const float xk = x[(T - 2) * D + 3];
                x[(T - 2) * D + 3] = NAN;
                fill_sentinel(&r);
                tl_checks++;
                if (route_hidden(cfg, &r, x, W, DSMOE_DTYPE_F32, D, bias, nt) != DSMOE_STATUS_NON_FINITE)
                    TL_FAIL("%s T=%lld nt=%d: a NaN hidden state was not reported", desc, (long long)T, nt);
                tl_checks++;
                if (!sentinel_intact(&r))
                    TL_FAIL("%s T=%lld nt=%d: outputs written before NON_FINITE (hidden)", desc,
                            (long long)T, nt);
                x[(T - 2) * D + 3] = xk;
                float row[8];
                memcpy(row, x + (T - 2) * D, sizeof row);
                for (int32_t d = 0; d < D; d++) x[(T - 2) * D + d] = 3e38f;
                fill_sentinel(&r);
                tl_checks++;
                if (route_hidden(cfg, &r, x, W, DSMOE_DTYPE_F32, D, bias, nt) != DSMOE_STATUS_NON_FINITE)
                    TL_FAIL("%s T=%lld nt=%d: an overflowing projection was not reported", desc,
                            (long long)T, nt);
                tl_checks++;
                if (!sentinel_intact(&r))
                    TL_FAIL("%s T=%lld nt=%d: outputs written before NON_FINITE (projection)", desc,
                            (long long)T, nt);
                /* the same without scores (the staged fused path) */
                fill_sentinel(&r);
                float *keep_s = r.s;
                r.s = NULL;
                tl_checks++;
                if (route_hidden(cfg, &r, x, W, DSMOE_DTYPE_F32, D, bias, nt) != DSMOE_STATUS_NON_FINITE)
                    TL_FAIL("%s T=%lld nt=%d: an overflowing projection was not reported (no scores)", desc,
                            (long long)T, nt);
                r.s = keep_s;
                tl_checks++;
                if (!sentinel_intact(&r))
                    TL_FAIL("%s T=%lld nt=%d: outputs written before NON_FINITE (projection, no scores)", desc,
                            (long long)T, nt);
                memcpy(x + (T - 2) * D, row, sizeof row);
                /* and the clean batch routes, writing every output, the same with and
                 * without scores (staged or not) */
                fill_sentinel(&r);
                ASSERT_OK(route_logits_opt(cfg, &r, logits, bias, 0, nt));
                int32_t *idx0 = malloc((size_t)(T * K) * sizeof(int32_t));
                float *w0 = malloc((size_t)(T * K) * sizeof(float));
                memcpy(idx0, r.idx, (size_t)(T * K) * sizeof(int32_t));
                memcpy(w0, r.w, (size_t)(T * K) * sizeof(float));
                ASSERT_OK(route_logits_opt(cfg, &r, logits, bias, 1, nt));
                tl_checks++;
                if (memcmp(idx0, r.idx, (size_t)(T * K) * sizeof(int32_t)) != 0 ||
                    memcmp(w0, r.w, (size_t)(T * K) * sizeof(float)) != 0)
                    TL_FAIL("%s T=%lld nt=%d: routing without scores differs from routing with them", desc,
                            (long long)T, nt);
                free(idx0);
                free(w0);
                fill_sentinel(&r);
                ASSERT_OK(route_hidden(cfg, &r, x, W, DSMOE_DTYPE_F32, D, bias, nt));
                tl_checks++;
                if (r.idx[(T - 1) * K] == -7 || r.l[0] == 555.0f)
                    TL_FAIL("%s T=%lld nt=%d: a clean batch left outputs unwritten", desc, (long long)T, nt);
            }
            routed_free(&r);
            free(logits);
            free(bias);
            free(x);
            free(W);
        }
    }
}

/* Sanitize mode: rows full of NaN / ±Inf still give distinct in-range experts and
 * finite weights (summing to the scale when normalising). */
static void test_sanitize(void) {
    dsmoe_router_config cfgs[32];
    int n = all_configs(cfgs, 32);
    for (int ci = 0; ci < n; ci++) {
        dsmoe_router_config cfg = cfgs[ci];
        cfg.nonfinite = DSMOE_NONFINITE_SANITIZE;
        char desc[512];
        describe(&cfg, desc, sizeof desc);
        const int32_t E = cfg.n_experts, K = cfg.top_k;
        const int64_t T = 6;
        tl_seed(700 + (uint64_t)ci);
        float *logits = rand_logits(T, E, 1.0);
        for (int32_t e = 0; e < E; e++) {
            logits[e] = NAN;
            logits[E + e] = INFINITY;
            logits[2 * E + e] = -INFINITY;
            float v[4] = {NAN, INFINITY, -INFINITY, 0.5f};
            logits[3 * E + e] = v[e % 4];
            if (e % 5 == 0) logits[4 * E + e] = NAN; /* row 4: mostly finite */
        }
        float *bias = cfg.use_bias ? rand_bias(E, 0.1) : NULL;
        routed r;
        routed_alloc(&r, T, E, K);
        ASSERT_OK(route_logits(&cfg, &r, logits, bias, NULL, 2));
        int bad = 0;
        for (int64_t t = 0; t < T; t++) {
            int before = bad;
            double wsum = 0;
            for (int32_t k = 0; k < K; k++) {
                int32_t e = r.idx[t * K + k];
                if (e < 0 || e >= E) bad++;
                for (int32_t j = 0; j < k; j++) bad += r.idx[t * K + j] == e;
                if (!isfinite(r.w[t * K + k]) || r.w[t * K + k] < 0) bad++;
                wsum += r.w[t * K + k];
            }
            if (cfg.normalize && cfg.norm_eps == 0.0f && !(fabs(wsum - cfg.scale) <= 1e-2 * cfg.scale))
                bad++;
            if (bad != before) {
                fprintf(stderr, "  sanitize row %lld (%s):", (long long)t,
                        t == 0 ? "NaN" : t == 1 ? "+Inf" : t == 2 ? "-Inf" : t == 3 ? "mixed" : "some NaN");
                for (int32_t k = 0; k < K; k++)
                    fprintf(stderr, " %d:%g", (int)r.idx[t * K + k], (double)r.w[t * K + k]);
                fprintf(stderr, "\n");
            }
        }
        tl_checks++;
        if (bad) TL_FAIL("%s: sanitize mode: %d bad indices/weights", desc, bad);
        routed_free(&r);
        free(logits);
        free(bias);
    }
}

static void test_presets(void) {
    const char *const *names = dsmoe_router_preset_names();
    const char *want[] = {"deepseek-v3", "deepseek-v3-hf", "deepseek-v2", "moonlight", "mixtral",
                          "qwen-moe"};
    int count = 0;
    for (int i = 0; names[i]; i++) {
        dsmoe_router_config c;
        ASSERT_OK(dsmoe_router_preset(names[i], &c));
        ASSERT_OK(dsmoe_router_config_validate(&c));
        count++;
    }
    for (size_t j = 0; j < sizeof want / sizeof want[0]; j++) {
        int found = 0;
        for (int i = 0; names[i]; i++) found |= !strcmp(names[i], want[j]);
        tl_checks++;
        if (!found) TL_FAIL("preset %s missing from dsmoe_router_preset_names()", want[j]);
    }
    ASSERT_TRUE(count >= 6);
    dsmoe_router_config c;
    ASSERT_STATUS(dsmoe_router_preset("deepseek-v4", &c), DSMOE_STATUS_NOT_FOUND);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "deepseek-v4") != NULL);
    ASSERT_STATUS(dsmoe_router_preset(NULL, &c), DSMOE_STATUS_INVALID_ARGUMENT);
    /* the V3 preset's headline numbers */
    ASSERT_OK(dsmoe_router_preset("deepseek-v3", &c));
    ASSERT_EQ_INT(c.n_experts, 256);
    ASSERT_EQ_INT(c.n_groups, 8);
    ASSERT_EQ_INT(c.topk_groups, 4);
    ASSERT_EQ_INT(c.top_k, 8);
    ASSERT_EQ_INT(c.score_func, DSMOE_SCORE_FUNC_SIGMOID);
    ASSERT_EQ_INT(c.group_score, DSMOE_GROUP_SCORE_TOPSUM);
    ASSERT_EQ_INT(c.group_topm, 2);
    ASSERT_EQ_INT(c.group_mask, DSMOE_GROUP_MASK_EXCLUDE);
    ASSERT_EQ_INT(c.normalize, 1);
    ASSERT_TRUE(c.norm_eps == 0.0f);
    ASSERT_TRUE(c.scale == 2.5f);
    ASSERT_EQ_INT(c.use_bias, 1);
    ASSERT_EQ_INT(c.precision, DSMOE_PRECISION_FP32);
    char json[512];
    int len = dsmoe_router_config_json(&c, json, sizeof json);
    ASSERT_TRUE(len > 0 && (size_t)len < sizeof json);
    ASSERT_TRUE(strstr(json, "256") != NULL);
    char tiny[8];
    ASSERT_EQ_INT(dsmoe_router_config_json(&c, tiny, sizeof tiny), len);
    ASSERT_EQ_INT(strlen(tiny), sizeof tiny - 1);
}

int main(void) {
    RUN(test_presets);
    RUN(test_validation);
    RUN(test_bad_arguments);
    RUN(test_nonfinite_message);
    RUN(test_nonfinite_changes_nothing);
    RUN(test_zero_tokens);
    RUN(test_selection_and_weights);
    RUN(test_bias_never_in_weights);
    RUN(test_threads_identical);
    RUN(test_isas_identical);
    RUN(test_hidden_threads_and_isas);
    RUN(test_hidden_repeatable);
    RUN(test_backward_accumulates);
    RUN(test_sanitize);
    return TEST_SUMMARY();
}
