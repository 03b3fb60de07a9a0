/*
 * test_moe.c — unit and property tests of the MoE layer: configuration checks, the
 * tensor table, dispatch (permute then un-permute is the identity, stable order,
 * capacity drops), batched vs matrix-vector paths and thread-count invariance on
 * multi-block shapes, bf16 storage, the packed layout (its product's bits on every
 * kernel set, the layer against the checkpoint layout, views, save and load), the
 * bias, error paths, and safetensors round trips plus loads of missing / mis-shaped /
 * wrong-dtype tensors.
 */
#include "testlib.h"
#include "moe/moe_internal.h"

#include <math.h>

static void router_small(dsmoe_router_config *r, int E, int G, int TG, int K) {
    dsmoe_router_preset("deepseek-v3", r);
    r->n_experts = E;
    r->n_groups = G;
    r->topk_groups = TG;
    r->top_k = K;
    if (E / G < 2) r->group_score = DSMOE_GROUP_SCORE_MAX;
}

static dsmoe_moe_config small_config(int D, int F, int E, int K, int G, int TG, int ns) {
    dsmoe_moe_config c;
    dsmoe_moe_config_default(&c);
    router_small(&c.router, E, G, TG, K);
    c.hidden_size = D;
    c.expert_size = F;
    c.n_shared = ns;
    c.max_tokens = 64;
    return c;
}

static void random_bias(dsmoe_moe *m, int E) {
    float b[256];
    for (int e = 0; e < E; e++) b[e] = (float)(tl_uniform() * 0.1 - 0.05);
    ASSERT_OK(dsmoe_moe_set_bias(m, b));
}

static float *random_x(int64_t T, int D) {
    float *x = (float *)malloc(sizeof(float) * (size_t)(T * D > 0 ? T * D : 1));
    for (int64_t i = 0; i < T * D; i++) x[i] = (float)tl_normal();
    return x;
}

/* ------------------------------------------------------------------ config -- */

static void test_config_validation(void) {
    dsmoe_moe_config c = small_config(16, 8, 8, 2, 1, 1, 1);
    ASSERT_OK(dsmoe_moe_config_validate(&c));
    dsmoe_moe_config b = c;
    b.hidden_size = 0;
    ASSERT_STATUS(dsmoe_moe_config_validate(&b), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "hidden_size") != NULL);
    b = c;
    b.expert_size = -3;
    ASSERT_STATUS(dsmoe_moe_config_validate(&b), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "expert_size") != NULL);
    b = c;
    b.n_shared = -1;
    ASSERT_STATUS(dsmoe_moe_config_validate(&b), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "n_shared") != NULL);
    b = c;
    b.weight_dtype = DSMOE_DTYPE_F16;
    ASSERT_STATUS(dsmoe_moe_config_validate(&b), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "weight_dtype") != NULL);
    b = c;
    b.weight_dtype = DSMOE_DTYPE_BF16;
    b.train = 1;
    ASSERT_STATUS(dsmoe_moe_config_validate(&b), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "train") != NULL);
    b = c;
    b.capacity_factor = -1.0f;
    ASSERT_STATUS(dsmoe_moe_config_validate(&b), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "capacity_factor") != NULL);
    b = c;
    b.max_tokens = 0;
    ASSERT_STATUS(dsmoe_moe_config_validate(&b), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "max_tokens") != NULL);
    b = c;
    b.router.top_k = 9;
    ASSERT_STATUS(dsmoe_moe_config_validate(&b), DSMOE_STATUS_INVALID_CONFIG);
    dsmoe_moe *m = (dsmoe_moe *)&b;
    ASSERT_STATUS(dsmoe_moe_create(&b, &m), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(m == NULL);
    dsmoe_moe_free(NULL);

    dsmoe_moe_config p;
    ASSERT_OK(dsmoe_moe_preset("moonlight", &p));
    ASSERT_EQ_INT(p.hidden_size, 2048);
    ASSERT_EQ_INT(p.expert_size, 1408);
    ASSERT_EQ_INT(p.n_shared, 2);
    ASSERT_EQ_INT(p.router.n_experts, 64);
    ASSERT_EQ_INT(p.router.top_k, 6);
    ASSERT_OK(dsmoe_moe_preset("deepseek-v3", &p));
    ASSERT_EQ_INT(p.hidden_size, 7168);
    ASSERT_EQ_INT(p.router.n_experts, 256);
    ASSERT_OK(dsmoe_moe_config_validate(&p));
    ASSERT_STATUS(dsmoe_moe_preset("nope", &p), DSMOE_STATUS_NOT_FOUND);
    char json[2048];
    int n = dsmoe_moe_config_json(&c, json, sizeof json);
    ASSERT_TRUE(n > 0 && (size_t)n < sizeof json);
    ASSERT_TRUE(strstr(json, "\"moe_intermediate_size\":8") != NULL);
}

static void test_tensor_table(void) {
    dsmoe_moe_config c = small_config(12, 6, 4, 2, 2, 1, 2);
    c.train = 1;
    dsmoe_moe *m = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    if (!m) return;
    ASSERT_EQ_INT(dsmoe_moe_tensor_count(m), 1 + 1 + 3 * 4 + 3);
    dsmoe_moe_tensor t;
    ASSERT_OK(dsmoe_moe_tensor_at(m, 0, &t));
    ASSERT_TRUE(strcmp(t.name, "gate.weight") == 0);
    ASSERT_EQ_INT(t.shape[0], 4);
    ASSERT_EQ_INT(t.shape[1], 12);
    ASSERT_OK(dsmoe_moe_tensor_at(m, 1, &t));
    ASSERT_TRUE(strcmp(t.name, "gate.e_score_correction_bias") == 0);
    ASSERT_EQ_INT(t.ndim, 1);
    ASSERT_EQ_INT(t.trainable, 0);
    ASSERT_TRUE(t.grad == NULL);
    ASSERT_OK(dsmoe_moe_tensor_get(m, "experts.3.down_proj.weight", &t));
    ASSERT_EQ_INT(t.shape[0], 12);
    ASSERT_EQ_INT(t.shape[1], 6);
    ASSERT_OK(dsmoe_moe_tensor_get(m, "shared_experts.up_proj.weight", &t));
    ASSERT_EQ_INT(t.shape[0], 12);
    ASSERT_EQ_INT(t.shape[1], 12);
    ASSERT_STATUS(dsmoe_moe_tensor_get(m, "experts.4.up_proj.weight", &t), DSMOE_STATUS_NOT_FOUND);
    ASSERT_STATUS(dsmoe_moe_tensor_at(m, 99, &t), DSMOE_STATUS_INVALID_ARGUMENT);
    /* tensors tile the flat parameter array without overlap; grads share the layout */
    size_t np = 0, ng = 0;
    float *p = dsmoe_moe_params(m, &np), *g = dsmoe_moe_grads(m, &ng);
    ASSERT_TRUE(p != NULL && g != NULL);
    ASSERT_EQ_INT(np, ng);
    unsigned char *seen = (unsigned char *)calloc(np, 1);
    int ok = 1;
    for (int64_t i = 0; i < dsmoe_moe_tensor_count(m); i++) {
        dsmoe_moe_tensor u;
        dsmoe_moe_tensor_at(m, i, &u);
        if (!u.trainable) continue;
        size_t off = (size_t)((float *)u.data - p);
        ok &= u.grad == g + off;
        for (int64_t j = 0; j < u.shape[0] * u.shape[1]; j++) {
            ok &= off + (size_t)j < np && !seen[off + (size_t)j];
            if (off + (size_t)j < np) seen[off + (size_t)j] = 1;
        }
    }
    ASSERT_TRUE(ok);
    free(seen);
    dsmoe_moe_free(m);
}

/* ---------------------------------------------------------------- dispatch -- */

static void check_dispatch(int64_t T, int32_t K, int32_t E, int64_t cap) {
    int32_t *idx = (int32_t *)malloc(sizeof(int32_t) * (size_t)(T * K + 1));
    for (int64_t t = 0; t < T; t++) {
        for (int32_t k = 0; k < K; k++) {
            int32_t e, dup;
            do { /* distinct experts per token, skewed towards low ids */
                double u = tl_uniform();
                e = (int32_t)(u * u * E);
                dup = 0;
                for (int32_t j = 0; j < k; j++) dup |= idx[t * K + j] == e;
            } while (dup);
            idx[t * K + k] = e;
        }
    }
    int64_t *counts = (int64_t *)malloc(sizeof(int64_t) * (size_t)E);
    int64_t *kept = (int64_t *)malloc(sizeof(int64_t) * (size_t)E);
    int64_t *offs = (int64_t *)malloc(sizeof(int64_t) * (size_t)(E + 1));
    int32_t *slot = (int32_t *)malloc(sizeof(int32_t) * (size_t)(T * K + 1));
    int32_t *rtok = (int32_t *)malloc(sizeof(int32_t) * (size_t)(T * K + 1));
    int64_t dropped = dsmoe__moe_dispatch(counts, kept, offs, slot, rtok, idx, T, K, E, cap);
    int64_t total = 0, ndrop = 0;
    for (int32_t e = 0; e < E; e++) {
        total += counts[e];
        int64_t want = cap >= 0 && counts[e] > cap ? cap : counts[e];
        ASSERT_EQ_INT(kept[e], want);
        ASSERT_EQ_INT(offs[e + 1] - offs[e], want);
        ndrop += counts[e] - want;
    }
    ASSERT_EQ_INT(total, T * K);
    ASSERT_EQ_INT(dropped, ndrop);
    /* permute rows of X by the dispatch, un-permute: identity on kept (t, k) */
    const int D = 5;
    float *X = random_x(T, D);
    float *G = (float *)malloc(sizeof(float) * (size_t)(offs[E] * D + 1));
    for (int64_t r = 0; r < offs[E]; r++) memcpy(G + r * D, X + (int64_t)rtok[r] * D, D * 4);
    int ok = 1, stable = 1, policy = 1;
    unsigned char *hit = (unsigned char *)calloc((size_t)offs[E] + 1, 1);
    int64_t *seen = (int64_t *)calloc((size_t)E, sizeof(int64_t));
    for (int64_t t = 0; t < T; t++) {
        for (int32_t k = 0; k < K; k++) {
            int64_t i = t * K + k;
            int32_t e = idx[i];
            int64_t s = slot[i];
            seen[e]++;
            /* drop policy: the first `cap` of each expert in (t, k) order are kept */
            policy &= (s >= 0) == (cap < 0 || seen[e] <= cap);
            if (s < 0) continue;
            ok &= s >= offs[e] && s < offs[e + 1] && !hit[s] && rtok[s] == t;
            if (s >= 0 && s < offs[E]) hit[s] = 1;
            ok &= memcmp(G + s * D, X + t * D, D * 4) == 0;
        }
    }
    /* stable: an expert's rows in token order (a token picks an expert at most once) */
    for (int32_t e = 0; e < E; e++)
        for (int64_t r = offs[e] + 1; r < offs[e + 1]; r++) stable &= rtok[r] > rtok[r - 1];
    for (int64_t r = 0; r < offs[E]; r++) ok &= hit[r];
    ASSERT_TRUE(ok);
    ASSERT_TRUE(stable);
    ASSERT_TRUE(policy);
    free(hit);
    free(seen);
    free(G);
    free(X);
    free(idx);
    free(counts);
    free(kept);
    free(offs);
    free(slot);
    free(rtok);
}

static void test_dispatch_roundtrip(void) {
    tl_seed(11);
    check_dispatch(1, 1, 1, -1);
    check_dispatch(37, 3, 8, -1);
    check_dispatch(200, 6, 64, -1);
    check_dispatch(200, 6, 64, 10);
    check_dispatch(50, 2, 4, 1);
    check_dispatch(0, 4, 8, -1);
}

/* ------------------------------------------------------------ skinny GEMM -- */

/* dsmoe__moe_gemm_nt: every ISA variant gives the same bits (and the same bits for a
 * row whatever n and the row range), close to an fp64 product; odd D (tails), odd R,
 * n up to DSMOE__MOE_SKINNY_N, fp32 and bf16 weights. D = 1045 and 2083 take the
 * AVX-512 code's rows of X above 8 through parts of 1024 steps (plus a short last
 * part and a tail). */
static void test_skinny_gemm(void) {
    tl_seed(41);
    static const int Ds[] = {1, 15, 16, 17, 40, 131, 1045, 2083};
    static const int ns[] = {1, 3, 4, 5, 9, 64};
    const char *isas[] = {"ref", "avx2", "avx512"};
    for (int di = 0; di < 8; di++) {
        for (int ni = 0; ni < 6; ni++) {
            const int D = Ds[di], n = ns[ni], R = 11;
            float *W = (float *)malloc(sizeof(float) * R * D), *X = (float *)malloc(sizeof(float) * n * D);
            uint16_t *Wb = (uint16_t *)malloc(sizeof(uint16_t) * R * D);
            for (int i = 0; i < R * D; i++) {
                W[i] = (float)tl_normal();
                Wb[i] = dsmoe_f32_to_bf16(W[i]);
            }
            for (int i = 0; i < n * D; i++) X[i] = (float)tl_normal();
            const float *rows[DSMOE__MOE_SKINNY_N];
            for (int i = 0; i < n; i++) rows[i] = X + (size_t)i * D;
            for (int bf = 0; bf < 2; bf++) {
                const void *w = bf ? (const void *)Wb : (const void *)W;
                dsmoe_dtype dt = bf ? DSMOE_DTYPE_BF16 : DSMOE_DTYPE_F32;
                float C0[64 * 11], C1[64 * 11];
                double ref[64 * 11];
                for (int i = 0; i < n; i++)
                    for (int r = 0; r < R; r++) {
                        double acc = 0;
                        for (int d = 0; d < D; d++)
                            acc += (double)(bf ? dsmoe_bf16_to_f32(Wb[r * D + d]) : W[r * D + d]) * X[i * D + d];
                        ref[i * R + r] = acc;
                    }
                ASSERT_TRUE(dsmoe__moe_gemm_nt_isa("ref", C0, R, rows, n, w, dt, 0, R, D));
                tl_allclose("skinny gemm vs fp64", C0, ref, n * R, 1e-5 * sqrt((double)D), 1e-5);
                for (int v = 1; v < 3; v++) {
                    memset(C1, 0, sizeof C1);
                    if (!dsmoe__moe_gemm_nt_isa(isas[v], C1, R, rows, n, w, dt, 0, R, D)) continue;
                    tl_same_bits(isas[v], C0, C1, n * R);
                }
                /* a sub-range of rows and a single row of X give the same bits */
                memset(C1, 0, sizeof C1);
                dsmoe__moe_gemm_nt(C1, R, rows, n, w, dt, 3, 8, D);
                int ok = 1;
                for (int i = 0; i < n; i++)
                    for (int r = 3; r < 8; r++) ok &= memcmp(&C1[i * R + r], &C0[i * R + r], 4) == 0;
                ASSERT_TRUE(ok);
                float one[11];
                dsmoe__moe_gemm_nt(one, R, rows + n - 1, 1, w, dt, 0, R, D);
                tl_same_bits("last row alone", one, C0 + (size_t)(n - 1) * R, R);
            }
            free(W);
            free(Wb);
            free(X);
        }
    }
    ASSERT_EQ_INT(dsmoe__moe_gemm_nt_isa("ref", NULL, 1, NULL, DSMOE__MOE_SKINNY_N + 1, NULL,
                                         DSMOE_DTYPE_F32, 0, 0, 1), 0);
}

/* ------------------------------------------------------ paths and threads -- */

/* A layer whose experts see several row blocks (> DSMOE_MOE_ROW_BLOCK rows each):
 * batched result vs per-token matrix-vector results, and 1/2/3 threads bit-equal. */
static void test_paths_and_threads(void) {
    tl_seed(3);
    const int D = 33, F = 20, E = 4, K = 2;
    const int64_t T = 700;
    dsmoe_moe_config c = small_config(D, F, E, K, 2, 2, 1);
    c.max_tokens = T;
    c.train = 1;
    dsmoe_moe *m = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    if (!m) return;
    dsmoe_moe_init_random(m, 7);
    random_bias(m, E);
    float *x = random_x(T, D);
    float *y1 = (float *)malloc(sizeof(float) * T * D), *y2 = (float *)malloc(sizeof(float) * T * D);
    float *y3 = (float *)malloc(sizeof(float) * T * D);
    ASSERT_OK(dsmoe_moe_forward(m, y1, x, T, 1));
    const dsmoe_moe_routing *r = dsmoe_moe_last_routing(m);
    int64_t maxc = 0;
    for (int e = 0; e < E; e++) maxc = r->counts[e] > maxc ? r->counts[e] : maxc;
    ASSERT_TRUE(maxc > DSMOE_MOE_ROW_BLOCK); /* several row blocks */
    ASSERT_OK(dsmoe_moe_forward(m, y2, x, T, 2));
    ASSERT_OK(dsmoe_moe_forward(m, y3, x, T, 3));
    tl_same_bits("y 1 vs 2 threads", y1, y2, T * D);
    tl_same_bits("y 1 vs 3 threads", y1, y3, T * D);
    /* per token (T = 1, decode path) and blocks of 8 (decode) vs batched */
    double *ref = (double *)malloc(sizeof(double) * T * D);
    for (int64_t i = 0; i < T * D; i++) ref[i] = y1[i];
    float *yt = (float *)malloc(sizeof(float) * T * D);
    for (int64_t t = 0; t < T; t++) ASSERT_OK(dsmoe_moe_forward(m, yt + t * D, x + t * D, 1, 1));
    tl_allclose("per-token vs batched", yt, ref, T * D, 1e-5, 1e-4);
    for (int64_t t = 0; t < T; t += 8) {
        int64_t n = T - t < 8 ? T - t : 8;
        ASSERT_OK(dsmoe_moe_forward(m, yt + t * D, x + t * D, n, 2));
    }
    tl_allclose("blocks of 8 vs batched", yt, ref, T * D, 1e-5, 1e-4);
    /* backward bit-equal across thread counts */
    float *dy = random_x(T, D);
    size_t np = 0;
    float *g = dsmoe_moe_grads(m, &np);
    float *g1 = (float *)malloc(sizeof(float) * np);
    float *dx1 = (float *)calloc((size_t)(T * D), sizeof(float));
    float *dx2 = (float *)calloc((size_t)(T * D), sizeof(float));
    ASSERT_OK(dsmoe_moe_forward(m, y1, x, T, 1));
    dsmoe_moe_zero_grad(m);
    ASSERT_OK(dsmoe_moe_backward(m, dx1, dy, x, NULL, T, 1));
    memcpy(g1, g, sizeof(float) * np);
    for (int nt = 2; nt <= 3; nt++) {
        ASSERT_OK(dsmoe_moe_forward(m, y2, x, T, nt));
        dsmoe_moe_zero_grad(m);
        memset(dx2, 0, sizeof(float) * T * D);
        ASSERT_OK(dsmoe_moe_backward(m, dx2, dy, x, NULL, T, nt));
        tl_same_bits("dx 1 vs N threads", dx1, dx2, T * D);
        tl_same_bits("grads 1 vs N threads", g1, g, (int64_t)np);
    }
    /* backward accumulates: a second backward doubles the gradients */
    ASSERT_OK(dsmoe_moe_backward(m, dx2, dy, x, NULL, T, 2));
    double *g2 = (double *)malloc(sizeof(double) * np);
    for (size_t i = 0; i < np; i++) g2[i] = 2.0 * g1[i];
    tl_allclose("second backward accumulates", g, g2, (int64_t)np, 2e-5, 2e-5);
    free(g2);
    free(g1);
    free(dx1);
    free(dx2);
    free(dy);
    free(ref);
    free(yt);
    free(x);
    free(y1);
    free(y2);
    free(y3);
    dsmoe_moe_free(m);
}

/* Every kernel set: the decode path (the skinny product only) gives the same bits; the
 * batched path (SGEMM for the larger experts where the skinny product does not serve
 * them) agrees within rounding, in fp32 and in bf16 storage (its widening scratch). */
static void test_kernel_sets(void) {
    tl_seed(13);
    const int D = 36, F = 20, E = 4, K = 2;
    const int64_t T = 48;
    dsmoe_moe_config c = small_config(D, F, E, K, 1, 1, 1);
    dsmoe_moe *m = NULL, *mb = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    c.weight_dtype = DSMOE_DTYPE_BF16;
    ASSERT_OK(dsmoe_moe_create(&c, &mb));
    if (!m || !mb) goto done;
    dsmoe_moe_init_random(m, 3);
    dsmoe_moe_init_random(mb, 3);
    float *x = random_x(T, D);
    float y0[8 * 36] = {0}, y1[8 * 36] = {0}, b0[48 * 36] = {0}, b1[48 * 36] = {0};
    float bb0[48 * 36] = {0}, bb1[48 * 36] = {0};
    double ref[48 * 36];
    const char *isas[] = {"ref", "avx2", "avx512"};
    int first = 1;
    for (int v = 0; v < 3; v++) {
        if (dsmoe_set_isa(isas[v]) != DSMOE_OK) continue;
        float *yd = first ? y0 : y1, *yb = first ? b0 : b1, *ybb = first ? bb0 : bb1;
        ASSERT_OK(dsmoe_moe_forward(m, yd, x, 8, 2));
        ASSERT_OK(dsmoe_moe_forward(m, yb, x, T, 2));
        ASSERT_OK(dsmoe_moe_forward(mb, ybb, x, T, 2));
        if (!first) {
            tl_same_bits(isas[v], y0, y1, 8 * D);
            for (int64_t i = 0; i < T * D; i++) ref[i] = b0[i];
            tl_allclose("batched across kernel sets", b1, ref, T * D, 1e-5, 1e-4);
            for (int64_t i = 0; i < T * D; i++) ref[i] = bb0[i];
            tl_allclose("bf16 batched across kernel sets", bb1, ref, T * D, 1e-5, 1e-4);
        }
        first = 0;
    }
    dsmoe_set_isa(NULL);
    free(x);
done:
    dsmoe_moe_free(m);
    dsmoe_moe_free(mb);
}

/* ---------------------------------------------------------------- bf16 -- */

static void test_bf16_storage(void) {
    tl_seed(5);
    const int D = 40, F = 24, E = 8, K = 2;
    dsmoe_moe_config c = small_config(D, F, E, K, 2, 1, 1);
    c.weight_dtype = DSMOE_DTYPE_BF16;
    dsmoe_moe *mb = NULL, *mf = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &mb));
    c.weight_dtype = DSMOE_DTYPE_F32;
    ASSERT_OK(dsmoe_moe_create(&c, &mf));
    if (!mb || !mf) goto done;
    dsmoe_moe_init_random(mb, 9);
    /* the same bf16 values, widened into the fp32 layer */
    for (int64_t i = 0; i < dsmoe_moe_tensor_count(mb); i++) {
        dsmoe_moe_tensor tb, tf;
        dsmoe_moe_tensor_at(mb, i, &tb);
        dsmoe_moe_tensor_at(mf, i, &tf);
        if (!tb.trainable) continue;
        ASSERT_EQ_INT(tb.dtype, DSMOE_DTYPE_BF16);
        for (int64_t j = 0; j < tb.shape[0] * tb.shape[1]; j++)
            ((float *)tf.data)[j] = dsmoe_bf16_to_f32(((uint16_t *)tb.data)[j]);
    }
    random_bias(mb, E);
    ASSERT_OK(dsmoe_moe_set_bias(mf, dsmoe_moe_bias(mb)));
    ASSERT_TRUE(dsmoe_moe_params(mb, NULL) == NULL);
    for (int64_t T = 1; T <= 40; T += 13) {
        float *x = random_x(T, D);
        float *yb = (float *)malloc(sizeof(float) * T * D), *yf = (float *)malloc(sizeof(float) * T * D);
        double *ref = (double *)malloc(sizeof(double) * T * D);
        ASSERT_OK(dsmoe_moe_forward(mb, yb, x, T, 2));
        ASSERT_OK(dsmoe_moe_forward(mf, yf, x, T, 2));
        for (int64_t i = 0; i < T * D; i++) ref[i] = yf[i];
        tl_allclose("bf16 storage vs widened fp32", yb, ref, T * D, 1e-5, 1e-4);
        int same = 1;
        const dsmoe_moe_routing *rb = dsmoe_moe_last_routing(mb);
        ASSERT_OK(dsmoe_moe_forward(mf, yf, x, T, 1));
        const dsmoe_moe_routing *rf = dsmoe_moe_last_routing(mf);
        for (int64_t i = 0; i < T * K; i++) same &= rb->indices[i] == rf->indices[i];
        ASSERT_TRUE(same);
        free(x);
        free(yb);
        free(yf);
        free(ref);
    }
    ASSERT_STATUS(dsmoe_moe_backward(mb, NULL, NULL, NULL, NULL, 1, 1), DSMOE_STATUS_UNSUPPORTED);
done:
    dsmoe_moe_free(mb);
    dsmoe_moe_free(mf);
}

/* ---------------------------------------------------------------- packed -- */

static unsigned char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    *n = 0;
    if (!f) return NULL;
    unsigned char *b = NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long len = ftell(f);
        if (len >= 0 && fseek(f, 0, SEEK_SET) == 0 && (b = (unsigned char *)malloc((size_t)len + 1)))
            *n = fread(b, 1, (size_t)len, f);
    }
    fclose(f);
    return b;
}

/* The packed layout's product: every kernel set gives the bits of the scalar code (one
 * fma chain per result), which agrees with an fp64 sum; sub-ranges of rows starting on
 * a panel give the same bits and leave other columns alone; pack/unpack round trip. */
static void test_packed_gemm(void) {
    tl_seed(43);
    static const int Rs[] = {1, 15, 16, 17, 37, 100};
    static const int Ks[] = {1, 7, 33, 131, 1045};
    static const int ns[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 64};
    const char *isas[] = {"ref", "avx2", "avx512"};
    for (int ri = 0; ri < 6; ri++)
        for (int ki = 0; ki < 5; ki++)
            for (int ni = 0; ni < 11; ni++) {
                const int R = Rs[ri], K = Ks[ki], n = ns[ni], Rp = (R + 15) / 16 * 16, ldc = R + 5;
                float *W = (float *)malloc(sizeof(float) * R * K), *X = (float *)malloc(sizeof(float) * n * K);
                uint16_t *Wb = (uint16_t *)malloc(sizeof(uint16_t) * R * K);
                float *P = (float *)malloc(sizeof(float) * Rp * K), *W2 = (float *)malloc(sizeof(float) * R * K);
                uint16_t *Pb = (uint16_t *)malloc(sizeof(uint16_t) * Rp * K);
                float *C0 = (float *)malloc(sizeof(float) * n * ldc), *C1 = (float *)malloc(sizeof(float) * n * ldc);
                double *ref = (double *)malloc(sizeof(double) * n * ldc);
                for (int i = 0; i < R * K; i++) {
                    W[i] = (float)tl_normal();
                    Wb[i] = dsmoe_f32_to_bf16(W[i]);
                }
                for (int i = 0; i < n * K; i++) X[i] = (float)tl_normal();
                const float *rows[DSMOE__MOE_SKINNY_N];
                for (int i = 0; i < n; i++) rows[i] = X + (size_t)i * K;
                dsmoe__moe_pack_rows(P, W, 4, R, K);
                dsmoe__moe_pack_rows(Pb, Wb, 2, R, K);
                dsmoe__moe_unpack_rows(W2, P, 4, R, K);
                ASSERT_TRUE(memcmp(W, W2, sizeof(float) * R * K) == 0);
                int zero_pad = 1;
                for (int r = R; r < Rp; r++)
                    for (int k = 0; k < K; k++) zero_pad &= P[((r / 16) * K + k) * 16 + r % 16] == 0.0f;
                ASSERT_TRUE(zero_pad);
                for (int bf = 0; bf < 2; bf++) {
                    const void *w = bf ? (const void *)Pb : (const void *)P;
                    const dsmoe_dtype dt = bf ? DSMOE_DTYPE_BF16 : DSMOE_DTYPE_F32;
                    for (int i = 0; i < n * ldc; i++) C0[i] = C1[i] = -7.0f;
                    for (int i = 0; i < n; i++)
                        for (int r = 0; r < ldc; r++) {
                            double acc = 0;
                            for (int k = 0; k < K && r < R; k++)
                                acc += (double)(bf ? dsmoe_bf16_to_f32(Wb[r * K + k]) : W[r * K + k]) * X[i * K + k];
                            ref[i * ldc + r] = r < R ? acc : -7.0;
                        }
                    ASSERT_TRUE(dsmoe__moe_gemm_pk_isa("ref", C0, ldc, rows, n, w, dt, 0, R, K));
                    tl_allclose("packed gemm vs fp64 (columns >= R untouched)", C0, ref, n * ldc,
                                1e-5 * sqrt((double)K), 1e-5);
                    for (int v = 1; v < 3; v++) {
                        for (int i = 0; i < n * ldc; i++) C1[i] = -7.0f;
                        if (!dsmoe__moe_gemm_pk_isa(isas[v], C1, ldc, rows, n, w, dt, 0, R, K)) continue;
                        tl_same_bits(isas[v], C0, C1, n * ldc);
                    }
                    /* rows from 16 on (a panel boundary), then one row of X alone */
                    for (int i = 0; i < n * ldc; i++) C1[i] = -7.0f;
                    dsmoe__moe_gemm_pk(C1, ldc, rows, n, w, dt, 16, R, K);
                    int ok = 1;
                    for (int i = 0; i < n; i++)
                        for (int r = 0; r < ldc; r++)
                            ok &= r >= 16 && r < R ? memcmp(&C1[i * ldc + r], &C0[i * ldc + r], 4) == 0
                                                   : C1[i * ldc + r] == -7.0f;
                    ASSERT_TRUE(ok);
                    dsmoe__moe_gemm_pk(C1, ldc, rows + n - 1, 1, w, dt, 0, R, K);
                    tl_same_bits("last row alone", C1, C0 + (size_t)(n - 1) * ldc, R);
                }
                free(W);
                free(Wb);
                free(W2);
                free(P);
                free(Pb);
                free(X);
                free(C0);
                free(C1);
                free(ref);
            }
    float c = 0, x = 1, w[16 * 2] = {0};
    const float *xr = &x;
    ASSERT_EQ_INT(dsmoe__moe_gemm_pk_isa("ref", &c, 1, &xr, 1, w, DSMOE_DTYPE_F32, 8, 16, 2), 0);
    ASSERT_EQ_INT(dsmoe__moe_gemm_pk_isa("ref", &c, 1, &xr, DSMOE__MOE_SKINNY_N + 1, w,
                                         DSMOE_DTYPE_F32, 0, 16, 2), 0);
}

/* A packed layer against the checkpoint layer with the same weights: odd sizes (rows
 * padded in every matrix), decode and batched paths (experts with several row blocks),
 * fp32 and bf16; the same bits for 1-3 threads and on every kernel set (the packed
 * layer has one product on every path); views in the documented layout; save from a
 * packed layer writes the checkpoint layout (the very bytes of the checkpoint layer's
 * file) and loads back into a packed layer bit for bit. */
static void test_packed_layer(void) {
    tl_seed(47);
    const int D = 37, F = 13, E = 4, K = 2;
    const int64_t T = 600;
    for (int bf = 0; bf < 2; bf++) {
        dsmoe_moe_config c = small_config(D, F, E, K, 2, 2, 2);
        c.max_tokens = T;
        c.weight_dtype = bf ? DSMOE_DTYPE_BF16 : DSMOE_DTYPE_F32;
        dsmoe_moe *mc = NULL, *mp = NULL, *ml = NULL;
        dsmoe_safetensors *st = NULL;
        float *x = random_x(T, D);
        float *yc = (float *)malloc(sizeof(float) * T * D), *yp = (float *)malloc(sizeof(float) * T * D);
        float *y2 = (float *)malloc(sizeof(float) * T * D);
        double *ref = (double *)malloc(sizeof(double) * T * D);
        ASSERT_OK(dsmoe_moe_create(&c, &mc));
        c.weight_layout = DSMOE_MOE_LAYOUT_PACKED;
        ASSERT_OK(dsmoe_moe_create(&c, &mp));
        ASSERT_OK(dsmoe_moe_create(&c, &ml));
        if (!mc || !mp || !ml) goto next;
        dsmoe_moe_init_random(mc, 5);
        dsmoe_moe_init_random(mp, 5);
        random_bias(mc, E);
        ASSERT_OK(dsmoe_moe_set_bias(mp, dsmoe_moe_bias(mc)));
        ASSERT_TRUE(dsmoe_moe_params(mp, NULL) == NULL);
        /* views: the same values, read through the documented formula */
        for (int64_t i = 0; i < dsmoe_moe_tensor_count(mc); i++) {
            dsmoe_moe_tensor tc, tp;
            dsmoe_moe_tensor_at(mc, i, &tc);
            dsmoe_moe_tensor_at(mp, i, &tp);
            ASSERT_EQ_INT(tc.layout, DSMOE_MOE_LAYOUT_CHECKPOINT);
            const int expert = strstr(tp.name, "_proj") != NULL;
            ASSERT_EQ_INT(tp.layout, expert ? DSMOE_MOE_LAYOUT_PACKED : DSMOE_MOE_LAYOUT_CHECKPOINT);
            int same = 1;
            const size_t es = bf && tp.ndim == 2 ? 2 : 4;
            for (int64_t j = 0; j < tc.shape[0] * (tc.ndim == 2 ? tc.shape[1] : 1); j++) {
                int64_t at = j;
                if (tp.layout == DSMOE_MOE_LAYOUT_PACKED) {
                    const int64_t r = j / tp.shape[1], col = j % tp.shape[1];
                    at = ((r / 16) * tp.shape[1] + col) * 16 + r % 16;
                }
                same &= memcmp((const char *)tc.data + j * es, (const char *)tp.data + at * es, es) == 0;
            }
            if (!same) TL_FAIL("tensor %s differs in the packed view", tc.name);
        }
        static const int64_t Ts[] = {1, 5, 8, 9, 40, 600};
        for (int ti = 0; ti < 6; ti++) {
            const int64_t n = Ts[ti];
            ASSERT_OK(dsmoe_moe_forward(mc, yc, x, n, 2));
            ASSERT_OK(dsmoe_moe_forward(mp, yp, x, n, 1));
            for (int64_t i = 0; i < n * D; i++) ref[i] = yc[i];
            tl_allclose("packed vs checkpoint layout", yp, ref, n * D, 1e-5, 1e-4);
            for (int nt = 2; nt <= 3; nt++) {
                ASSERT_OK(dsmoe_moe_forward(mp, y2, x, n, nt));
                tl_same_bits("packed, 1 vs N threads", yp, y2, n * D);
            }
            const char *isas[] = {"ref", "avx2", "avx512"};
            for (int v = 0; v < 3; v++) {
                if (dsmoe_set_isa(isas[v]) != DSMOE_OK) continue;
                ASSERT_OK(dsmoe_moe_forward(mp, y2, x, n, 2));
                tl_same_bits(isas[v], yp, y2, n * D);
            }
            dsmoe_set_isa(NULL);
        }
        const dsmoe_moe_routing *r = dsmoe_moe_last_routing(mp);
        int64_t maxc = 0;
        for (int e = 0; e < E; e++) maxc = r->counts[e] > maxc ? r->counts[e] : maxc;
        ASSERT_TRUE(maxc > DSMOE_MOE_ROW_BLOCK); /* several row blocks of > 64 rows */
        /* save: the checkpoint layout, byte for byte; load back into a packed layer */
        char pc[4096], pp[4096];
        snprintf(pc, sizeof pc, "%s", tl_tmp("moe_packed_c.safetensors"));
        snprintf(pp, sizeof pp, "%s", tl_tmp("moe_packed_p.safetensors"));
        ASSERT_OK(dsmoe_moe_save(mc, pc, "mlp."));
        ASSERT_OK(dsmoe_moe_save(mp, pp, "mlp."));
        size_t nc = 0, npk = 0;
        unsigned char *bc = read_all(pc, &nc), *bp = read_all(pp, &npk);
        ASSERT_TRUE(bc && bp && nc == npk && memcmp(bc, bp, nc) == 0);
        free(bc);
        free(bp);
        ASSERT_OK(dsmoe_safetensors_open(pc, &st));
        if (st) ASSERT_OK(dsmoe_moe_load_safetensors(ml, st, "mlp."));
        ASSERT_OK(dsmoe_moe_forward(mp, yp, x, 40, 2));
        ASSERT_OK(dsmoe_moe_forward(ml, y2, x, 40, 2));
        tl_same_bits("packed layer loaded from the checkpoint layout", yp, y2, 40 * D);
        ASSERT_STATUS(dsmoe_moe_backward(mp, NULL, yp, x, NULL, 40, 1), DSMOE_STATUS_UNSUPPORTED);
    next:
        dsmoe_safetensors_close(st);
        dsmoe_moe_free(mc);
        dsmoe_moe_free(mp);
        dsmoe_moe_free(ml);
        free(x);
        free(yc);
        free(yp);
        free(y2);
        free(ref);
    }
    /* packed is inference only; an unknown layout is refused */
    dsmoe_moe_config c = small_config(D, F, E, K, 2, 2, 0);
    dsmoe_moe *m = NULL;
    c.weight_layout = DSMOE_MOE_LAYOUT_PACKED;
    c.train = 1;
    ASSERT_STATUS(dsmoe_moe_create(&c, &m), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "inference only") != NULL);
    c.train = 0;
    c.weight_layout = 2;
    ASSERT_STATUS(dsmoe_moe_create(&c, &m), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(m == NULL);
}

/* ---------------------------------------------------------------- errors -- */

static void test_errors_and_bias(void) {
    tl_seed(8);
    const int D = 8, F = 4, E = 4, K = 2;
    dsmoe_moe_config c = small_config(D, F, E, K, 1, 1, 0);
    c.max_tokens = 4;
    dsmoe_moe *m = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    if (!m) return;
    dsmoe_moe_init_random(m, 1);
    float *x = random_x(16, D), y[16 * 8];
    ASSERT_TRUE(dsmoe_moe_last_routing(m) == NULL);
    ASSERT_STATUS(dsmoe_moe_forward(m, y, x, 5, 1), DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "max_tokens") != NULL);
    ASSERT_STATUS(dsmoe_moe_forward(m, y, NULL, 2, 1), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_moe_forward(m, y, x, -1, 1), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_OK(dsmoe_moe_reserve(m, 16, 1));
    ASSERT_EQ_INT(dsmoe_moe_get_config(m)->max_tokens, 16);
    ASSERT_OK(dsmoe_moe_forward(m, y, x, 16, 1));
    ASSERT_OK(dsmoe_moe_forward(m, y, x, 0, 1));
    ASSERT_EQ_INT(dsmoe_moe_last_routing(m)->T, 0);
    /* NaN input: NON_FINITE naming the token, no routing left behind */
    x[3 * D + 1] = NAN;
    ASSERT_STATUS(dsmoe_moe_forward(m, y, x, 5, 1), DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "token 3") != NULL);
    ASSERT_TRUE(dsmoe_moe_last_routing(m) == NULL);
    x[3 * D + 1] = 0.5f;
    /* backward without train */
    ASSERT_OK(dsmoe_moe_forward(m, y, x, 5, 1));
    ASSERT_STATUS(dsmoe_moe_backward(m, NULL, y, x, NULL, 5, 1), DSMOE_STATUS_UNSUPPORTED);
    ASSERT_TRUE(dsmoe_moe_grads(m, NULL) == NULL);
    /* bias: finite only, nothing changes on error */
    float b[4] = {0.1f, -0.2f, 0.3f, 0.0f}, bad[4] = {0.0f, INFINITY, 0.0f, 0.0f};
    ASSERT_OK(dsmoe_moe_set_bias(m, b));
    ASSERT_STATUS(dsmoe_moe_set_bias(m, bad), DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "expert 1") != NULL);
    ASSERT_TRUE(memcmp(dsmoe_moe_bias(m), b, sizeof b) == 0);
    /* the bias steers selection: a large bias on expert 3 puts it in every token's top-K */
    float big[4] = {0.0f, 0.0f, 0.0f, 5.0f};
    ASSERT_OK(dsmoe_moe_set_bias(m, big));
    ASSERT_OK(dsmoe_moe_forward(m, y, x, 16, 1));
    ASSERT_EQ_INT(dsmoe_moe_last_routing(m)->counts[3], 16);
    dsmoe_moe_free(m);

    /* layer without bias */
    c.router.use_bias = 0;
    c.train = 1;
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    if (!m) return;
    ASSERT_STATUS(dsmoe_moe_set_bias(m, b), DSMOE_STATUS_UNSUPPORTED);
    ASSERT_TRUE(dsmoe_moe_bias(m) == NULL);
    ASSERT_EQ_INT(dsmoe_moe_tensor_count(m), 1 + 3 * E);
    float dx[4 * 8] = {0};
    ASSERT_STATUS(dsmoe_moe_backward(m, dx, y, x, NULL, 4, 1), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_OK(dsmoe_moe_forward(m, y, x, 4, 1));
    ASSERT_STATUS(dsmoe_moe_backward(m, dx, y, x, NULL, 3, 1), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "T = 3") != NULL);
    ASSERT_STATUS(dsmoe_moe_backward(m, dx, NULL, x, NULL, 4, 1), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_OK(dsmoe_moe_backward(m, dx, y, x, NULL, 4, 1));
    ASSERT_OK(dsmoe_moe_backward(m, NULL, y, x, NULL, 4, 1));
    dsmoe_moe_free(m);
    free(x);
}

/* ------------------------------------------------------------- capacity -- */

static void test_capacity(void) {
    tl_seed(21);
    const int D = 12, F = 6, E = 4, K = 2;
    const int64_t T = 30;
    dsmoe_moe_config c = small_config(D, F, E, K, 1, 1, 1);
    dsmoe_moe *a = NULL, *b = NULL, *big = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &a));
    c.capacity_factor = 0.5f;
    ASSERT_OK(dsmoe_moe_create(&c, &b));
    c.capacity_factor = (float)E / K; /* C = T: never drops */
    ASSERT_OK(dsmoe_moe_create(&c, &big));
    if (!a || !b || !big) goto done;
    dsmoe_moe_init_random(a, 4);
    dsmoe_moe_init_random(b, 4);
    dsmoe_moe_init_random(big, 4);
    float *x = random_x(T, D);
    float ya[30 * 12], yb[30 * 12], yc[30 * 12];
    ASSERT_OK(dsmoe_moe_forward(a, ya, x, T, 1));
    ASSERT_EQ_INT(dsmoe_moe_last_routing(a)->capacity, -1);
    ASSERT_EQ_INT(dsmoe_moe_last_routing(a)->n_dropped, 0);
    ASSERT_OK(dsmoe_moe_forward(big, yc, x, T, 1));
    ASSERT_EQ_INT(dsmoe_moe_last_routing(big)->n_dropped, 0);
    tl_same_bits("capacity never reached == no capacity", ya, yc, T * D);
    ASSERT_OK(dsmoe_moe_forward(b, yb, x, T, 1));
    const dsmoe_moe_routing *r = dsmoe_moe_last_routing(b);
    int64_t cap = (int64_t)ceil(0.5 * T * K / E), want = 0;
    ASSERT_EQ_INT(r->capacity, cap);
    for (int e = 0; e < E; e++) want += r->counts[e] > cap ? r->counts[e] - cap : 0;
    ASSERT_EQ_INT(r->n_dropped, want);
    ASSERT_TRUE(want > 0);
    /* the first token loses nothing (every expert has room for it) */
    int same = 1;
    for (int d = 0; d < D; d++) same &= fabsf(ya[d] - yb[d]) <= 1e-6f * (1 + fabsf(ya[d]));
    ASSERT_TRUE(same);
    free(x);
done:
    dsmoe_moe_free(a);
    dsmoe_moe_free(b);
    dsmoe_moe_free(big);
}

/* ---------------------------------------------------------- safetensors -- */

static void test_save_load_roundtrip(void) {
    tl_seed(31);
    const int D = 10, F = 6, E = 8, K = 2;
    dsmoe_moe_config c = small_config(D, F, E, K, 2, 1, 2);
    dsmoe_moe *m = NULL, *m2 = NULL, *mb = NULL;
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    if (!m) return;
    dsmoe_moe_init_random(m, 77);
    random_bias(m, E);
    const char *path = tl_tmp("moe_roundtrip.safetensors");
    ASSERT_OK(dsmoe_moe_save(m, path, "model.layers.7.mlp."));
    ASSERT_OK(dsmoe_safetensors_open(path, &st));
    if (!st) goto done;
    ASSERT_TRUE(dsmoe_safetensors_metadata(st, "dsmoe.format_version") != NULL);
    ASSERT_TRUE(strcmp(dsmoe_safetensors_metadata(st, "format"), "pt") == 0);
    /* the config under the layer's own key (many layers can share a file) */
    ASSERT_TRUE(dsmoe_safetensors_metadata(st, "dsmoe.moe_config") == NULL);
    const char *meta = dsmoe_safetensors_metadata(st, "dsmoe.moe_config@model.layers.7.mlp.");
    ASSERT_TRUE(meta && strstr(meta, "\"n_shared_experts\":2"));
    dsmoe_tensor_view v;
    ASSERT_OK(dsmoe_safetensors_get(st, "model.layers.7.mlp.experts.5.up_proj.weight", &v));
    ASSERT_EQ_INT(v.dtype, DSMOE_DTYPE_F32);
    ASSERT_EQ_INT(v.shape[0], F);
    ASSERT_EQ_INT(v.shape[1], D);
    /* shapes inferred from the file */
    dsmoe_moe_config c2;
    dsmoe_moe_config_default(&c2);
    router_small(&c2.router, 256, 2, 1, K);
    c2.n_shared = -1;
    ASSERT_OK(dsmoe_moe_config_from_safetensors(&c2, st, "model.layers.7.mlp."));
    ASSERT_EQ_INT(c2.hidden_size, D);
    ASSERT_EQ_INT(c2.expert_size, F);
    ASSERT_EQ_INT(c2.router.n_experts, E);
    ASSERT_EQ_INT(c2.n_shared, 2);
    /* the saved routing replaces the caller's (256 experts, groups 2 / 1 here) */
    ASSERT_TRUE(memcmp(&c2.router, &c.router, sizeof c.router) == 0);
    c2.n_shared = 1;
    ASSERT_STATUS(dsmoe_moe_config_from_safetensors(&c2, st, "model.layers.7.mlp."),
                  DSMOE_STATUS_SHAPE_MISMATCH);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "shared_experts.gate_proj.weight") != NULL);
    ASSERT_EQ_INT(c2.n_shared, 1); /* unchanged on error */
    ASSERT_STATUS(dsmoe_moe_config_from_safetensors(&c2, st, "model.layers.8.mlp."),
                  DSMOE_STATUS_NOT_FOUND);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "model.layers.8.mlp.gate.weight") != NULL);
    c2.n_shared = 2;
    ASSERT_OK(dsmoe_moe_create(&c2, &m2));
    if (!m2) goto done;
    ASSERT_OK(dsmoe_moe_load_safetensors(m2, st, "model.layers.7.mlp."));
    size_t n1, n2;
    float *p1 = dsmoe_moe_params(m, &n1), *p2 = dsmoe_moe_params(m2, &n2);
    ASSERT_EQ_INT(n1, n2);
    ASSERT_TRUE(memcmp(p1, p2, n1 * sizeof(float)) == 0);
    ASSERT_TRUE(memcmp(dsmoe_moe_bias(m), dsmoe_moe_bias(m2), E * sizeof(float)) == 0);
    /* into bf16 storage: F32 -> BF16 rounds to nearest even */
    c2.weight_dtype = DSMOE_DTYPE_BF16;
    ASSERT_OK(dsmoe_moe_create(&c2, &mb));
    if (!mb) goto done;
    ASSERT_OK(dsmoe_moe_load_safetensors(mb, st, "model.layers.7.mlp."));
    dsmoe_moe_tensor tf, tb;
    ASSERT_OK(dsmoe_moe_tensor_get(m, "experts.2.down_proj.weight", &tf));
    ASSERT_OK(dsmoe_moe_tensor_get(mb, "experts.2.down_proj.weight", &tb));
    int ok = 1;
    for (int j = 0; j < D * F; j++)
        ok &= ((uint16_t *)tb.data)[j] == dsmoe_f32_to_bf16(((float *)tf.data)[j]);
    ASSERT_TRUE(ok);
    /* a bf16 layer saves BF16 tensors, which load back into fp32 exactly */
    const char *pb = tl_tmp("moe_roundtrip_bf16.safetensors");
    ASSERT_OK(dsmoe_moe_save(mb, pb, NULL));
    dsmoe_safetensors_close(st);
    st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(pb, &st));
    if (!st) goto done;
    ASSERT_OK(dsmoe_safetensors_get(st, "experts.2.down_proj.weight", &v));
    ASSERT_EQ_INT(v.dtype, DSMOE_DTYPE_BF16);
    ASSERT_OK(dsmoe_safetensors_get(st, "gate.e_score_correction_bias", &v));
    ASSERT_EQ_INT(v.dtype, DSMOE_DTYPE_F32);
    ASSERT_OK(dsmoe_moe_load_safetensors(m2, st, ""));
    ASSERT_OK(dsmoe_moe_tensor_get(m2, "experts.2.down_proj.weight", &tf));
    ok = 1;
    for (int j = 0; j < D * F; j++)
        ok &= ((float *)tf.data)[j] == dsmoe_bf16_to_f32(((uint16_t *)tb.data)[j]);
    ASSERT_TRUE(ok);
done:
    dsmoe_safetensors_close(st);
    dsmoe_moe_free(m);
    dsmoe_moe_free(m2);
    dsmoe_moe_free(mb);
}

/* Writes a layer file from m's tensors, replacing tensor `victim` by (dtype, shape)
 * or leaving it out (dtype < 0); extra metadata optional. */
static void write_variant(const char *path, dsmoe_moe *m, const char *victim, int dtype,
                          int32_t ndim, const int64_t *shape, const char *meta_ver) {
    dsmoe_safetensors_writer *w = NULL;
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    if (!w) return;
    static float junk[4096];
    static char names[64][80];
    for (int i = 0; i < 4096; i++) junk[i] = NAN;
    int64_t n = dsmoe_moe_tensor_count(m);
    for (int64_t i = 0; i < n && i < 64; i++) {
        dsmoe_moe_tensor t;
        dsmoe_moe_tensor_at(m, i, &t);
        snprintf(names[i], sizeof names[i], "p.%s", t.name);
        if (strcmp(t.name, victim) == 0) {
            if (dtype >= 0) ASSERT_OK(dsmoe_safetensors_writer_add(w, names[i], (dsmoe_dtype)dtype, ndim, shape, junk));
            continue;
        }
        ASSERT_OK(dsmoe_safetensors_writer_add(w, names[i], t.dtype, t.ndim, t.shape, t.data));
    }
    if (meta_ver) ASSERT_OK(dsmoe_safetensors_writer_set_metadata(w, "dsmoe.format_version", meta_ver));
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path));
    dsmoe_safetensors_writer_free(w);
}

static void expect_load_error(dsmoe_moe *m, const char *path, dsmoe_status want, const char *needle) {
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(path, &st));
    if (!st) return;
    size_t n;
    float *p = dsmoe_moe_params(m, &n);
    float *before = (float *)malloc(n * sizeof(float));
    memcpy(before, p, n * sizeof(float));
    float bias[8];
    memcpy(bias, dsmoe_moe_bias(m), sizeof bias);
    ASSERT_STATUS(dsmoe_moe_load_safetensors(m, st, "p."), want);
    if (!strstr(dsmoe_last_error(), needle))
        TL_FAIL("error '%s' does not name '%s'", dsmoe_last_error(), needle);
    ASSERT_TRUE(memcmp(before, p, n * sizeof(float)) == 0); /* nothing changed */
    ASSERT_TRUE(memcmp(bias, dsmoe_moe_bias(m), sizeof bias) == 0);
    free(before);
    dsmoe_safetensors_close(st);
}

static void test_load_errors(void) {
    const int D = 6, F = 4, E = 8, K = 2;
    dsmoe_moe_config c = small_config(D, F, E, K, 2, 1, 1);
    dsmoe_moe *src = NULL, *m = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &src));
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    if (!src || !m) goto done;
    dsmoe_moe_init_random(src, 1);
    dsmoe_moe_init_random(m, 2);
    const char *path = tl_tmp("moe_bad.safetensors");
    int64_t s46[2] = {4, 6}, s64[2] = {6, 4}, s3[1] = {3}, s8[1] = {8}, s3d[3] = {1, 4, 6};
    /* missing expert tensor */
    write_variant(path, src, "experts.5.up_proj.weight", -1, 0, NULL, NULL);
    expect_load_error(m, path, DSMOE_STATUS_NOT_FOUND, "p.experts.5.up_proj.weight");
    /* mis-shaped: transposed down_proj, wrong rank, wrong bias length */
    write_variant(path, src, "experts.1.down_proj.weight", DSMOE_DTYPE_F32, 2, s46, NULL);
    expect_load_error(m, path, DSMOE_STATUS_SHAPE_MISMATCH, "p.experts.1.down_proj.weight");
    ASSERT_TRUE(strstr(dsmoe_last_error(), "(4, 6)") && strstr(dsmoe_last_error(), "(6, 4)"));
    write_variant(path, src, "experts.0.gate_proj.weight", DSMOE_DTYPE_F32, 3, s3d, NULL);
    expect_load_error(m, path, DSMOE_STATUS_SHAPE_MISMATCH, "p.experts.0.gate_proj.weight");
    write_variant(path, src, "gate.e_score_correction_bias", DSMOE_DTYPE_F32, 1, s3, NULL);
    expect_load_error(m, path, DSMOE_STATUS_SHAPE_MISMATCH, "p.gate.e_score_correction_bias");
    /* wrong dtype */
    write_variant(path, src, "shared_experts.down_proj.weight", DSMOE_DTYPE_I32, 2, s64, NULL);
    expect_load_error(m, path, DSMOE_STATUS_FORMAT, "p.shared_experts.down_proj.weight");
    ASSERT_TRUE(strstr(dsmoe_last_error(), "I32") != NULL);
    /* non-finite bias (the junk is NaN) */
    write_variant(path, src, "gate.e_score_correction_bias", DSMOE_DTYPE_F32, 1, s8, NULL);
    expect_load_error(m, path, DSMOE_STATUS_NON_FINITE, "p.gate.e_score_correction_bias");
    /* a file from a newer dsmoe format */
    write_variant(path, src, "none", -1, 0, NULL, "99");
    {
        dsmoe_safetensors *st = NULL;
        ASSERT_OK(dsmoe_safetensors_open(path, &st));
        dsmoe_moe_config cc = c;
        cc.n_shared = -1;
        ASSERT_STATUS(dsmoe_moe_config_from_safetensors(&cc, st, "p."), DSMOE_STATUS_FORMAT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "upgrade") != NULL);
        dsmoe_safetensors_close(st);
    }
    /* and a good file loads */
    write_variant(path, src, "none", -1, 0, NULL, "1");
    {
        dsmoe_safetensors *st = NULL;
        ASSERT_OK(dsmoe_safetensors_open(path, &st));
        ASSERT_OK(dsmoe_moe_load_safetensors(m, st, "p."));
        ASSERT_TRUE(memcmp(dsmoe_moe_params(src, NULL), dsmoe_moe_params(m, NULL),
                           sizeof(float) * 16) == 0);
        dsmoe_safetensors_close(st);
    }
done:
    dsmoe_moe_free(src);
    dsmoe_moe_free(m);
}

/* A tensor of the file as fp64 (n elements at most). */
static int64_t ref_tensor(const dsmoe_safetensors *st, const char *prefix, const char *name,
                          double *out, int64_t n, int64_t *rows) {
    char full[256];
    snprintf(full, sizeof full, "%s%s", prefix, name);
    dsmoe_tensor_view v;
    if (dsmoe_safetensors_get(st, full, &v) != DSMOE_OK) return -1;
    int64_t cnt = v.shape[0] * (v.ndim > 1 ? v.shape[1] : 1);
    if (cnt > n) return -1;
    float tmp[1024];
    if (cnt > 1024 || dsmoe_tensor_to_f32(&v, tmp) != DSMOE_OK) return -1;
    for (int64_t i = 0; i < cnt; i++) out[i] = tmp[i];
    if (rows) *rows = v.shape[0];
    return cnt;
}

/* out += a · SwiGLU expert `which` ("experts.3." or "shared_experts.") of the file at x,
 * in fp64 from the file's tensors (independent of the layer's storage and products). */
static void ref_expert(const dsmoe_safetensors *st, const char *prefix, const char *which, int D,
                       double a, const float *x, double *out) {
    double wg[1024] = {0}, wu[1024] = {0}, w2[1024] = {0}, h[64] = {0};
    char nm[128];
    int64_t f = 0;
    snprintf(nm, sizeof nm, "%sgate_proj.weight", which);
    ASSERT_TRUE(ref_tensor(st, prefix, nm, wg, 1024, &f) > 0);
    snprintf(nm, sizeof nm, "%sup_proj.weight", which);
    ASSERT_TRUE(ref_tensor(st, prefix, nm, wu, 1024, NULL) > 0);
    snprintf(nm, sizeof nm, "%sdown_proj.weight", which);
    ASSERT_TRUE(ref_tensor(st, prefix, nm, w2, 1024, NULL) > 0);
    if (f < 1 || f > 64) return;
    for (int64_t j = 0; j < f; j++) {
        double g = 0, u = 0;
        for (int d = 0; d < D; d++) {
            g += wg[j * D + d] * x[d];
            u += wu[j * D + d] * x[d];
        }
        h[j] = g / (1.0 + exp(-g)) * u;
    }
    for (int d = 0; d < D; d++) {
        double acc = 0;
        for (int64_t j = 0; j < f; j++) acc += w2[d * f + j] * h[j];
        out[d] += a * acc;
    }
}

/* The fuzz seeds of fuzz_layer are complete layers (and balancer states) that load and
 * run: a fuzzer that starts from broken seeds explores only the early error paths. Sizes
 * are inferred from the shapes; the forward (top-1 of one group, normalised: weight =
 * scale) picks the expert of largest sigmoid(u) + b and gives scale · expert(x) +
 * shared(x), against an fp64 reference from the file's tensors; the balancer's bias (the
 * seeds' (e - E/2)·0.01) reads back. */
static void test_fuzz_seeds_load(void) {
    const struct {
        const char *file, *prefix;
        int32_t D, F, E, shared, bias;
    } seeds[] = {
        {"layer_f32_shared.safetensors", "", 8, 4, 4, 1, 1},
        {"layer_bf16_prefix.safetensors", "model.layers.1.mlp.", 8, 2, 4, 0, 0},
        {"layer_f16_two_shared.safetensors", "", 4, 2, 2, 2, 1},
    };
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        char rel[256];
        snprintf(rel, sizeof rel, "../../fuzz/seeds/layer/%s", seeds[i].file);
        dsmoe_safetensors *st = NULL;
        ASSERT_OK(dsmoe_safetensors_open(tl_golden(rel), &st));
        if (!st) continue;
        dsmoe_moe_config c;
        dsmoe_moe_config_default(&c);
        c.n_shared = -1;
        ASSERT_OK(dsmoe_moe_config_from_safetensors(&c, st, seeds[i].prefix));
        ASSERT_EQ_INT(c.hidden_size, seeds[i].D);
        ASSERT_EQ_INT(c.expert_size, seeds[i].F);
        ASSERT_EQ_INT(c.router.n_experts, seeds[i].E);
        ASSERT_EQ_INT(c.n_shared, seeds[i].shared);
        c.router.n_groups = 1;
        c.router.topk_groups = 1;
        c.router.top_k = 1;
        c.router.use_bias = seeds[i].bias;
        c.max_tokens = 2;
        dsmoe_moe *m = NULL;
        ASSERT_OK(dsmoe_moe_create(&c, &m));
        if (!m) {
            dsmoe_safetensors_close(st);
            continue;
        }
        ASSERT_OK(dsmoe_moe_load_safetensors(m, st, seeds[i].prefix));
        float x[16], y[16];
        for (int d = 0; d < seeds[i].D; d++) x[d] = 0.25f * (float)(d % 5) - 0.5f;
        ASSERT_OK(dsmoe_moe_forward(m, y, x, 1, 1));
        const dsmoe_moe_routing *r = dsmoe_moe_last_routing(m);
        const int D = seeds[i].D, E = seeds[i].E;
        double wg[256], bias[64] = {0}, yref[16] = {0}, best = -1e300;
        ASSERT_TRUE(ref_tensor(st, seeds[i].prefix, "gate.weight", wg, 256, NULL) == E * D);
        if (seeds[i].bias)
            ASSERT_TRUE(ref_tensor(st, seeds[i].prefix, "gate.e_score_correction_bias", bias, 64,
                                   NULL) == E);
        double chosen = 0;
        for (int e = 0; e < E; e++) {
            double u = 0;
            for (int d = 0; d < D; d++) u += wg[e * D + d] * x[d];
            const double sel = 1.0 / (1.0 + exp(-u)) + bias[e];
            if (sel > best) best = sel;
            if (r && e == r->indices[0]) chosen = sel;
        }
        ASSERT_TRUE(r != NULL);
        if (r) {
            ASSERT_TRUE(chosen >= best - 1e-6); /* the expert of largest selection score */
            ASSERT_NEAR(r->weights[0], c.router.scale, 1e-6);
            char which[32];
            snprintf(which, sizeof which, "experts.%d.", (int)r->indices[0]);
            ref_expert(st, seeds[i].prefix, which, D, c.router.scale, x, yref);
            if (seeds[i].shared)
                ref_expert(st, seeds[i].prefix, "shared_experts.", D, 1.0, x, yref);
            tl_allclose("seed layer output", y, yref, D, 1e-5, 1e-4);
        }
        if (seeds[i].bias) {
            char pre[64];
            snprintf(pre, sizeof pre, "%sgate.", seeds[i].prefix);
            dsmoe_balancer *b = NULL;
            ASSERT_OK(dsmoe_balancer_read(st, pre, &b));
            if (b) {
                ASSERT_NEAR(dsmoe_balancer_bias(b)[0], -0.01 * seeds[i].E / 2, 1e-6);
                dsmoe_balancer_free(b);
            }
        }
        dsmoe_moe_free(m);
        dsmoe_safetensors_close(st);
    }
}

int main(void) {
    RUN(test_config_validation);
    RUN(test_tensor_table);
    RUN(test_dispatch_roundtrip);
    RUN(test_skinny_gemm);
    RUN(test_paths_and_threads);
    RUN(test_bf16_storage);
    RUN(test_packed_gemm);
    RUN(test_packed_layer);
    RUN(test_kernel_sets);
    RUN(test_errors_and_bias);
    RUN(test_capacity);
    RUN(test_save_load_roundtrip);
    RUN(test_load_errors);
    RUN(test_fuzz_seeds_load);
    return TEST_SUMMARY();
}
