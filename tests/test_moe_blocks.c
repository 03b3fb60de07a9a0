/*
 * test_moe_blocks.c — the MoE layer's blocks over weight rows, against an fp64 oracle
 * written here from the layer's equations (moe.h), token by token with no blocking:
 *
 *   wide experts  D = 520, F = 261 (2F = 522; padded to 272 rows in the packed layout)
 *                 and a shared expert: the backward's weight-gradient blocks of 256
 *                 rows (W1: 256 + 256 + 10, W2: 256 + 256 + 8), the bf16 widening of
 *                 256 weight rows before SGEMM, and the matrix-vector (decode) path's
 *                 chunks of 512 weight rows (W1: 512 + 32 packed, W2: 512 + 8);
 *   many experts  E = 260: the gate gradient's blocks of 256 rows (256 + 4), with
 *                 T = 300 tokens (two token blocks of dx).
 *
 * The golden files of tests/ref cannot hold such layers; this oracle recomputes y, the
 * routing weights, dx and every gradient in fp64 from the layer's own parameters, the
 * experts it chose (checked to be a top-k of the fp64 selection scores, up to 1e-5)
 * and dy, dlogits_extra. The router is sigmoid, one group, normalised and scaled:
 *   s = σ(u), w_k = scale·s_k / Σ_j s_j,  ∂L/∂s_k = scale·(dw_k/S − Σ_j dw_j s_j / S²),
 *   ∂L/∂u_k = ∂L/∂s_k · s_k (1 − s_k) (+ dlogits_extra).
 * Each case runs on every kernel set this CPU has (their product paths differ) and on
 * 1 and 4 threads (bit-identical); the forward also with bf16 weights and in the packed
 * layout (whose decode chunks cross from gate_proj's panels into up_proj's).
 */
#include "testlib.h"

#include <math.h>

typedef struct oracle_layer {
    int32_t D, F, Fs, E, K;
    double scale;
    double *bias;        /* (E) */
    double *Wg;          /* (E, D) */
    double **W1g, **W1u; /* E + 1 matrices (F, D); [E]: shared (Fs, D) */
    double **W2;         /* E + 1 matrices (D, F) / (D, Fs) */
    /* gradients, same shapes */
    double *dWg, **dW1g, **dW1u, **dW2;
} oracle_layer;

static double *dalloc(size_t n) {
    double *p = (double *)calloc(n ? n : 1, sizeof(double));
    if (!p) abort();
    return p;
}

/* Reads tensor `name` of m (F32 or BF16, checkpoint layout) into a new fp64 array. */
static double *read_tensor(const dsmoe_moe *m, const char *name, int64_t rows, int64_t cols) {
    dsmoe_moe_tensor t;
    double *out = dalloc((size_t)(rows * cols));
    if (dsmoe_moe_tensor_get(m, name, &t) != DSMOE_OK || t.shape[0] != rows ||
        (t.ndim == 2 && t.shape[1] != cols) || t.layout != DSMOE_MOE_LAYOUT_CHECKPOINT) {
        TL_FAIL("tensor %s missing or of another shape", name);
        return out;
    }
    for (int64_t i = 0; i < rows * cols; i++)
        out[i] = t.dtype == DSMOE_DTYPE_BF16 ? (double)dsmoe_bf16_to_f32(((const uint16_t *)t.data)[i])
                                             : (double)((const float *)t.data)[i];
    return out;
}

static void oracle_init(oracle_layer *o, const dsmoe_moe *m) {
    const dsmoe_moe_config *c = dsmoe_moe_get_config(m);
    memset(o, 0, sizeof *o);
    o->D = c->hidden_size;
    o->F = c->expert_size;
    o->Fs = c->n_shared * c->expert_size;
    o->E = c->router.n_experts;
    o->K = c->router.top_k;
    o->scale = (double)c->router.scale;
    o->bias = dalloc((size_t)o->E);
    const float *b = dsmoe_moe_bias(m);
    for (int32_t e = 0; e < o->E && b; e++) o->bias[e] = b[e];
    o->Wg = read_tensor(m, "gate.weight", o->E, o->D);
    o->dWg = dalloc((size_t)o->E * (size_t)o->D);
    const size_t n = (size_t)o->E + 1;
    o->W1g = (double **)calloc(n, sizeof(double *));
    o->W1u = (double **)calloc(n, sizeof(double *));
    o->W2 = (double **)calloc(n, sizeof(double *));
    o->dW1g = (double **)calloc(n, sizeof(double *));
    o->dW1u = (double **)calloc(n, sizeof(double *));
    o->dW2 = (double **)calloc(n, sizeof(double *));
    if (!o->W1g || !o->W1u || !o->W2 || !o->dW1g || !o->dW1u || !o->dW2) abort();
    for (int32_t e = 0; e <= o->E; e++) {
        const int32_t f = e < o->E ? o->F : o->Fs;
        if (f == 0) continue;
        char name[128], pre[64];
        if (e < o->E)
            snprintf(pre, sizeof pre, "experts.%d.", (int)e);
        else
            snprintf(pre, sizeof pre, "shared_experts.");
        snprintf(name, sizeof name, "%sgate_proj.weight", pre);
        o->W1g[e] = read_tensor(m, name, f, o->D);
        snprintf(name, sizeof name, "%sup_proj.weight", pre);
        o->W1u[e] = read_tensor(m, name, f, o->D);
        snprintf(name, sizeof name, "%sdown_proj.weight", pre);
        o->W2[e] = read_tensor(m, name, o->D, f);
        o->dW1g[e] = dalloc((size_t)f * (size_t)o->D);
        o->dW1u[e] = dalloc((size_t)f * (size_t)o->D);
        o->dW2[e] = dalloc((size_t)f * (size_t)o->D);
    }
}

static void oracle_free(oracle_layer *o) {
    for (int32_t e = 0; e <= o->E; e++) {
        if (o->W1g) free(o->W1g[e]);
        if (o->W1u) free(o->W1u[e]);
        if (o->W2) free(o->W2[e]);
        if (o->dW1g) free(o->dW1g[e]);
        if (o->dW1u) free(o->dW1u[e]);
        if (o->dW2) free(o->dW2[e]);
    }
    free(o->W1g);
    free(o->W1u);
    free(o->W2);
    free(o->dW1g);
    free(o->dW1u);
    free(o->dW2);
    free(o->bias);
    free(o->Wg);
    free(o->dWg);
}

static double sig(double v) { return 1.0 / (1.0 + exp(-v)); }

/* Expert e on one token: y += wk·E_e(x); with dy: dw = dy·E_e(x), the weight
 * gradients of L = wk·dy·E_e(x) accumulate and dx += ∂L/∂x. */
static double oracle_expert(oracle_layer *o, int32_t e, const float *x, double wk, const float *dy,
                            double *y, double *dx, double *g, double *u, double *h, double *ye) {
    const int32_t D = o->D, f = e < o->E ? o->F : o->Fs;
    for (int32_t j = 0; j < f; j++) {
        double a = 0, b = 0;
        for (int32_t d = 0; d < D; d++) {
            a += o->W1g[e][(size_t)j * D + d] * x[d];
            b += o->W1u[e][(size_t)j * D + d] * x[d];
        }
        g[j] = a;
        u[j] = b;
        h[j] = a * sig(a) * b;
    }
    double dw = 0;
    for (int32_t d = 0; d < D; d++) {
        double a = 0;
        for (int32_t j = 0; j < f; j++) a += o->W2[e][(size_t)d * f + j] * h[j];
        ye[d] = a;
        y[d] += wk * a;
        if (dy) dw += (double)dy[d] * a;
    }
    if (!dy) return 0;
    for (int32_t j = 0; j < f; j++) {
        double dh = 0;
        for (int32_t d = 0; d < D; d++) {
            const double dyd = wk * dy[d];
            dh += o->W2[e][(size_t)d * f + j] * dyd;
            o->dW2[e][(size_t)d * f + j] += dyd * h[j];
        }
        const double s = sig(g[j]);
        const double dg = dh * u[j] * s * (1.0 + g[j] * (1.0 - s)), du = dh * g[j] * s;
        for (int32_t d = 0; d < D; d++) {
            o->dW1g[e][(size_t)j * D + d] += dg * x[d];
            o->dW1u[e][(size_t)j * D + d] += du * x[d];
            dx[d] += dg * o->W1g[e][(size_t)j * D + d] + du * o->W1u[e][(size_t)j * D + d];
        }
    }
    return dw;
}

/* The whole layer on T tokens, with the experts `idx` (T, K) the layer chose (checked
 * against the fp64 selection scores). Writes y, w (T, K) and, with dy, dx and the
 * gradients (from zero). */
static void oracle_run(oracle_layer *o, const float *x, const float *dy, const float *extra,
                       const int32_t *idx, int64_t T, double *y, double *w, double *dx) {
    const int32_t D = o->D, E = o->E, K = o->K;
    const int32_t fmax = o->F > o->Fs ? o->F : o->Fs;
    double *s = dalloc((size_t)E), *du = dalloc((size_t)E), *g = dalloc((size_t)fmax);
    double *u = dalloc((size_t)fmax), *h = dalloc((size_t)fmax), *ye = dalloc((size_t)D);
    double dw[64];
    int bad_sel = 0;
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * D;
        double *yt = y + t * D, *dxt = dx ? dx + t * D : NULL;
        for (int32_t d = 0; d < D; d++) {
            yt[d] = 0;
            if (dxt) dxt[d] = 0;
        }
        for (int32_t e = 0; e < E; e++) {
            double a = 0;
            for (int32_t d = 0; d < D; d++) a += o->Wg[(size_t)e * D + d] * xt[d];
            s[e] = sig(a);
            du[e] = extra ? extra[t * E + e] : 0.0;
        }
        /* the chosen experts: distinct, and no other expert's selection score beats
         * the lowest chosen one by more than 1e-5 */
        const int32_t *it = idx + t * K;
        double lowest = INFINITY, S = 0;
        for (int32_t k = 0; k < K; k++) {
            lowest = fmin(lowest, s[it[k]] + o->bias[it[k]]);
            S += s[it[k]];
            for (int32_t j = 0; j < k; j++) bad_sel |= it[j] == it[k];
        }
        for (int32_t e = 0; e < E; e++) {
            int chosen = 0;
            for (int32_t k = 0; k < K; k++) chosen |= it[k] == e;
            if (!chosen && s[e] + o->bias[e] > lowest + 1e-5) bad_sel = 1;
        }
        double dot = 0;
        for (int32_t k = 0; k < K; k++) {
            w[t * K + k] = o->scale * s[it[k]] / S;
            dw[k] = oracle_expert(o, it[k], xt, w[t * K + k], dy ? dy + t * D : NULL, yt, dxt,
                                  g, u, h, ye);
            dot += dw[k] * s[it[k]];
        }
        if (o->Fs) oracle_expert(o, E, xt, 1.0, dy ? dy + t * D : NULL, yt, dxt, g, u, h, ye);
        if (!dy) continue;
        for (int32_t k = 0; k < K; k++) {
            const double sk = s[it[k]];
            du[it[k]] += o->scale * (dw[k] / S - dot / (S * S)) * sk * (1.0 - sk);
        }
        for (int32_t e = 0; e < E; e++)
            for (int32_t d = 0; d < D; d++) {
                o->dWg[(size_t)e * D + d] += du[e] * xt[d];
                dxt[d] += du[e] * o->Wg[(size_t)e * D + d];
            }
    }
    if (bad_sel) TL_FAIL("the layer chose experts that are not a top-%d of the fp64 scores", (int)K);
    free(s);
    free(du);
    free(g);
    free(u);
    free(h);
    free(ye);
}

static double maxabs(const double *a, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs(a[i]));
    return m;
}

static int close_to(const char *what, const float *got, const double *ref, int64_t n) {
    const double s = maxabs(ref, n);
    return tl_allclose(what, got, ref, n, 2e-6 * (s > 1e-3 ? s : 1e-3), 2e-5);
}

/* The oracle's gradient of tensor t (named as in the checkpoint). */
static const double *oracle_grad(const oracle_layer *o, const char *name) {
    if (strcmp(name, "gate.weight") == 0) return o->dWg;
    int e = -1;
    char part[32] = "";
    if (sscanf(name, "experts.%d.%31[a-z_]", &e, part) != 2) {
        e = o->E;
        if (sscanf(name, "shared_experts.%31[a-z_]", part) != 1) return NULL;
    }
    if (e < 0 || e > o->E) return NULL;
    if (strcmp(part, "gate_proj") == 0) return o->dW1g[e];
    if (strcmp(part, "up_proj") == 0) return o->dW1u[e];
    if (strcmp(part, "down_proj") == 0) return o->dW2[e];
    return NULL;
}

static void *xalloc(size_t n) {
    void *p = n ? malloc(n) : NULL;
    if (!p) abort();
    return p;
}

static float *frand(int64_t n, double mul) {
    float *p = (float *)xalloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) p[i] = (float)(tl_normal() * mul);
    return p;
}

/* One configuration: the layer (train) on every kernel set against the oracle; bf16
 * weights (forward) too when `bf16`. */
static void run_config(const char *label, dsmoe_moe_config cfg, const float *bias, int64_t T,
                       uint64_t seed, int bf16) {
    const int32_t D = cfg.hidden_size, E = cfg.router.n_experts, K = cfg.router.top_k;
    if (T < 1 || D < 1 || E < 1 || K < 1 || K > 64) {
        TL_FAIL("%s: bad test configuration", label);
        return;
    }
    cfg.train = 1;
    cfg.max_tokens = T;
    cfg.n_threads = 4;
    dsmoe_moe *m = NULL, *m4 = NULL, *mb = NULL;
    ASSERT_OK(dsmoe_moe_create(&cfg, &m));
    ASSERT_OK(dsmoe_moe_create(&cfg, &m4));
    dsmoe_moe_config bc = cfg;
    bc.train = 0;
    bc.weight_dtype = DSMOE_DTYPE_BF16;
    if (bf16) ASSERT_OK(dsmoe_moe_create(&bc, &mb));
    if (!m || !m4 || (bf16 && !mb)) goto done;
    dsmoe_moe_init_random(m, seed);
    dsmoe_moe_init_random(m4, seed);
    ASSERT_OK(dsmoe_moe_set_bias(m, bias));
    ASSERT_OK(dsmoe_moe_set_bias(m4, bias));
    if (mb) {
        dsmoe_moe_init_random(mb, seed);
        ASSERT_OK(dsmoe_moe_set_bias(mb, bias));
    }
    tl_seed(seed);
    float *x = frand(T * D, 1.0), *dy = frand(T * D, 1.0), *extra = frand(T * E, 0.1);
    float *y = (float *)xalloc(sizeof(float) * (size_t)(T * D));
    float *y4 = (float *)xalloc(sizeof(float) * (size_t)(T * D));
    float *dx = (float *)xalloc(sizeof(float) * (size_t)(T * D));
    float *dx4 = (float *)xalloc(sizeof(float) * (size_t)(T * D));
    int32_t *idx = (int32_t *)xalloc(sizeof(int32_t) * (size_t)(T * K));
    int32_t *idxb = (int32_t *)xalloc(sizeof(int32_t) * (size_t)(T * K));
    double *by = dalloc((size_t)(T * D)), *bw = dalloc((size_t)(T * K));
    double *ry = dalloc((size_t)(T * D)), *rw = dalloc((size_t)(T * K)), *rdx = dalloc((size_t)(T * D));
    oracle_layer o, ob;
    oracle_init(&o, m);
    if (mb) oracle_init(&ob, mb);
    const char *isas[] = {"ref", "avx2", "avx512"};
    int first = 1;
    char what[256];
    for (int v = 0; v < 3; v++) {
        if (dsmoe_set_isa(isas[v]) != DSMOE_OK) continue;
        snprintf(what, sizeof what, "%s T=%lld [%s]", label, (long long)T, isas[v]);
        ASSERT_OK(dsmoe_moe_forward(m, y, x, T, 1));
        ASSERT_OK(dsmoe_moe_forward(m4, y4, x, T, 4));
        tl_same_bits("y, 1 vs 4 threads", y, y4, T * D);
        const dsmoe_moe_routing *r = dsmoe_moe_last_routing(m);
        ASSERT_TRUE(r != NULL);
        if (!r) break;
        if (first) {
            /* the oracle follows the layer's choice of experts (checked against fp64) */
            memcpy(idx, r->indices, sizeof(int32_t) * (size_t)(T * K));
            oracle_run(&o, x, dy, extra, idx, T, ry, rw, rdx);
            int64_t maxc = 0;
            for (int32_t e = 0; e < E; e++) maxc = r->counts[e] > maxc ? r->counts[e] : maxc;
            fprintf(stderr, "  %s: most rows for one expert %lld\n", label, (long long)maxc);
        }
        ASSERT_TRUE(memcmp(idx, r->indices, sizeof(int32_t) * (size_t)(T * K)) == 0);
        char l2[400];
        snprintf(l2, sizeof l2, "%s y", what);
        close_to(l2, y, ry, T * D);
        snprintf(l2, sizeof l2, "%s routing weights", what);
        close_to(l2, r->weights, rw, T * K);
        /* backward, dx from zero */
        memset(dx, 0, sizeof(float) * (size_t)(T * D));
        memset(dx4, 0, sizeof(float) * (size_t)(T * D));
        dsmoe_moe_zero_grad(m);
        dsmoe_moe_zero_grad(m4);
        ASSERT_OK(dsmoe_moe_backward(m, dx, dy, x, extra, T, 1));
        ASSERT_OK(dsmoe_moe_backward(m4, dx4, dy, x, extra, T, 4));
        snprintf(l2, sizeof l2, "%s dx", what);
        close_to(l2, dx, rdx, T * D);
        tl_same_bits("dx, 1 vs 4 threads", dx, dx4, T * D);
        size_t np = 0;
        float *g1 = dsmoe_moe_grads(m, &np), *g4 = dsmoe_moe_grads(m4, NULL);
        tl_same_bits("gradients, 1 vs 4 threads", g1, g4, (int64_t)np);
        for (int64_t i = 0; i < dsmoe_moe_tensor_count(m); i++) {
            dsmoe_moe_tensor t;
            ASSERT_OK(dsmoe_moe_tensor_at(m, i, &t));
            if (!t.trainable) continue;
            const double *rg = oracle_grad(&o, t.name);
            ASSERT_TRUE(rg != NULL);
            snprintf(l2, sizeof l2, "%s grad %s", what, t.name);
            if (rg) close_to(l2, t.grad, rg, t.shape[0] * t.shape[1]);
        }
        if (mb) {
            /* bf16 weights: the oracle on the same (bf16) values; forward only */
            ASSERT_OK(dsmoe_moe_forward(mb, y, x, T, 2));
            const dsmoe_moe_routing *rb = dsmoe_moe_last_routing(mb);
            ASSERT_TRUE(rb != NULL);
            if (!rb) break;
            if (first) {
                memcpy(idxb, rb->indices, sizeof(int32_t) * (size_t)(T * K));
                oracle_run(&ob, x, NULL, NULL, idxb, T, by, bw, NULL);
            }
            ASSERT_TRUE(memcmp(idxb, rb->indices, sizeof(int32_t) * (size_t)(T * K)) == 0);
            snprintf(l2, sizeof l2, "%s y with bf16 weights", what);
            close_to(l2, y, by, T * D);
        }
        for (int pk = 0; pk < 1 + (mb != NULL); pk++) {
            /* the packed layout (inference), fp32 and bf16: the same values */
            dsmoe_moe_config pc = pk ? bc : cfg;
            pc.train = 0;
            pc.weight_layout = DSMOE_MOE_LAYOUT_PACKED;
            dsmoe_moe *mp = NULL;
            ASSERT_OK(dsmoe_moe_create(&pc, &mp));
            if (!mp) break;
            dsmoe_moe_init_random(mp, seed);
            ASSERT_OK(dsmoe_moe_set_bias(mp, bias));
            ASSERT_OK(dsmoe_moe_forward(mp, y4, x, T, 2));
            const dsmoe_moe_routing *rp = dsmoe_moe_last_routing(mp);
            ASSERT_TRUE(rp != NULL && memcmp(pk ? idxb : idx, rp->indices,
                                             sizeof(int32_t) * (size_t)(T * K)) == 0);
            snprintf(l2, sizeof l2, "%s y, packed layout%s", what, pk ? ", bf16" : "");
            close_to(l2, y4, pk ? by : ry, T * D);
            dsmoe_moe_free(mp);
        }
        first = 0;
    }
    ASSERT_OK(dsmoe_set_isa(NULL));
    oracle_free(&o);
    if (mb) oracle_free(&ob);
    free(x);
    free(dy);
    free(extra);
    free(y);
    free(y4);
    free(dx);
    free(dx4);
    free(idx);
    free(idxb);
    free(by);
    free(bw);
    free(ry);
    free(rw);
    free(rdx);
done:
    dsmoe_moe_free(m);
    dsmoe_moe_free(m4);
    dsmoe_moe_free(mb);
}

static dsmoe_moe_config config(int32_t D, int32_t F, int32_t ns, int32_t E, int32_t K) {
    dsmoe_moe_config c;
    dsmoe_moe_config_default(&c);
    c.router = tl_router_cfg(E, 1, 1, K, DSMOE_SCORE_FUNC_SIGMOID, DSMOE_GROUP_SCORE_TOPSUM, 2,
                             DSMOE_GROUP_MASK_EXCLUDE, 1, 0.0f, 2.5f, 1);
    c.hidden_size = D;
    c.expert_size = F;
    c.n_shared = ns;
    return c;
}

/* Wide experts: weight-gradient blocks, bf16 widening blocks (batched, T = 40: one
 * expert over 16 rows takes SGEMM on the "ref" and "avx2" sets) and decode chunks
 * (T = 8). */
static void test_wide_experts(void) {
    const float bias[4] = {0.3f, 0.0f, -0.05f, -0.1f};
    dsmoe_moe_config c = config(520, 261, 1, 4, 1);
    run_config("wide experts, batched", c, bias, 40, 71, 1);
    run_config("wide experts, decode", c, bias, 8, 72, 1);
}

/* Many experts: the gate gradient's row blocks (E = 260), two token blocks of dx. */
static void test_many_experts(void) {
    float bias[260];
    for (int e = 0; e < 260; e++) bias[e] = 0.002f * (float)(e % 7);
    dsmoe_moe_config c = config(24, 3, 1, 260, 2);
    run_config("260 experts", c, bias, 300, 73, 0);
}

int main(void) {
    (void)dsmoe_isa(); /* resolve the default set first (pins OpenBLAS to one thread) */
    RUN(test_wide_experts);
    RUN(test_many_experts);
    return TEST_SUMMARY();
}
