/*
 * test_train_step.c — the whole training model (dsmoe_train_model): its layout, its
 * loss gradient against central differences of the loss for every tensor of the tiny
 * preset (with and without the balance loss), the same bits for 1 and 2 threads, the
 * loss at initialisation, an overfit run with AdamW, and bad tokens.
 */
#include "testlib.h"

#include <sys/stat.h>
#include <unistd.h>

enum { TB = 2, TT = 8 };

/* 2: two MTP depths. 1: the tiny preset changed to a tied head, a compressed query (q_lora_rank 8) and MoE
 * in both layers. */
static int variant = 0;

/* The balance loss kind make() sets (the expert-level test changes it). */
static int32_t g_kind = DSMOE_BALANCE_LOSS_SEQ;

static dsmoe_train_model *make(int nt, float std, float alpha, uint64_t seed, int B, int T) {
    dsmoe_model_config c;
    ASSERT_OK(dsmoe_model_config_preset("tiny", &c));
    if (variant == 1) {
        c.tie_word_embeddings = 1;
        c.q_lora_rank = 8;
        c.first_k_dense_replace = 0;
    }
    if (variant == 2) c.num_nextn_predict_layers = 2;
    dsmoe_train_model_options o;
    dsmoe_train_model_options_default(&o);
    o.n_threads = nt;
    o.batch = B;
    o.seq_len = T;
    o.init_std = std;
    o.balance_alpha = alpha;
    o.balance_kind = g_kind;
    o.seed = seed;
    dsmoe_train_model *tm = NULL;
    ASSERT_OK(dsmoe_train_model_create(&c, &o, &tm));
    return tm;
}

/* The total loss of tokens (asserting success). */
static double loss_of(dsmoe_train_model *tm, const int32_t *tok) {
    dsmoe_train_loss l = {-1, -1, -1, -1};
    ASSERT_OK(dsmoe_train_model_loss(tm, tok, &l, 0));
    return l.total;
}

static void fill_tokens(int32_t *tok, int64_t n, int32_t V, uint64_t seed) {
    tl_seed(seed);
    for (int64_t i = 0; i < n; i++) tok[i] = (int32_t)(tl_next() % (uint64_t)V);
}

/* The layout: the table's names and shapes in order, 64-byte aligned tensors inside the
 * arrays, no two overlapping, the bias outside, weight decay for matrices only. */
static void test_layout(void) {
    dsmoe_train_model *tm = make(1, 0.02f, 0, 1, TB, TT);
    if (!tm) return;
    const dsmoe_model_config *c = dsmoe_train_model_config(tm);
    int64_t n = dsmoe_train_model_tensor_count(tm);
    ASSERT_EQ_INT(n, dsmoe_model_tensor_count(c, c->num_nextn_predict_layers));
    const int64_t n_main = dsmoe_model_tensor_count(c, 0);
    size_t np = 0;
    float *P = dsmoe_train_model_params(tm, &np);
    char *used = (char *)calloc(np, 1);
    int64_t covered = 0, n_bias = 0;
    for (int64_t i = 0; i < n; i++) {
        dsmoe_train_tensor t;
        dsmoe_model_tensor_spec s;
        ASSERT_OK(dsmoe_train_model_tensor(tm, i, &t));
        ASSERT_OK(dsmoe_model_tensor_at(c, c->num_nextn_predict_layers, i, &s));
        ASSERT_TRUE(strcmp(t.spec.name, s.name) == 0);
        ASSERT_EQ_INT(t.n, s.shape[0] * (s.ndim == 2 ? s.shape[1] : 1));
        if (!t.trainable) {
            ASSERT_TRUE(t.grad == NULL && t.offset == -1 && t.data != NULL);
            if (s.mtp && strstr(s.name, "embed_tokens")) {
                dsmoe_train_tensor e;
                ASSERT_OK(dsmoe_train_model_tensor(tm, 0, &e)); /* the main embedding */
                ASSERT_TRUE(t.data == e.data);
                continue;
            }
            if (s.mtp && strstr(s.name, "shared_head.head")) {
                dsmoe_train_tensor h;
                ASSERT_OK(dsmoe_train_model_tensor(tm, c->tie_word_embeddings ? 0 : n_main - 1, &h));
                ASSERT_TRUE(t.data == h.data);
                continue;
            }
            ASSERT_TRUE(strstr(s.name, "e_score_correction_bias") != NULL);
            n_bias++;
            continue;
        }
        ASSERT_EQ_INT(t.decay, s.ndim == 2);
        ASSERT_TRUE(t.data == P + t.offset);
        ASSERT_EQ_INT(((uintptr_t)t.data) % 64, 0);
        ASSERT_TRUE(t.offset + t.n <= (int64_t)np);
        for (int64_t j = 0; j < t.n; j++) {
            if (used[t.offset + j]) {
                TL_FAIL("%s overlaps another tensor", s.name);
                break;
            }
            used[t.offset + j] = 1;
        }
        covered += t.n;
    }
    ASSERT_EQ_INT(n_bias, dsmoe_train_model_moe_count(tm));
    ASSERT_TRUE(covered <= (int64_t)np && (int64_t)np - covered < 16 * n);
    free(used);
    dsmoe_train_model_free(tm);
}

/* Routing indices of every MoE layer, concatenated. */
static void routing_of(dsmoe_train_model *tm, int32_t *out, int64_t per) {
    for (int32_t k = 0; k < dsmoe_train_model_moe_count(tm); k++) {
        const dsmoe_moe_routing *r = dsmoe_train_model_routing(tm, k);
        memcpy(out + k * per, r->indices, (size_t)per * sizeof(int32_t));
    }
}

/* For every trainable tensor: the loss's derivative along a random ±1 direction v,
 * (L(p + hv) − L(p − hv)) / 2h, against Σ g·v of the backward. Perturbations that change
 * any routing decision are retried with a smaller h (the loss is not differentiable
 * across them). Tolerance: the loss is computed from fp32 activations, so each loss
 * value carries a rounding noise of about 1e-6 relative (measured: the loss of the same
 * parameters through different summation orders differs in the 7th digit); the
 * difference quotient's noise is then about 1e-6 · |L| / h, plus the O(h²) truncation
 * term; 3e-3 relative to the largest directional derivative over the tensors plus 3% of
 * this one's covers both with h = 3e-3 (weights of std 0.2; measured worst: 2.6e-3 of
 * the largest, 0.3% of its own). */
static void fd_check_all(float alpha) {
    const int B = TB, T = TT;
    dsmoe_train_model *tm = make(1, 0.2f, alpha, 3, B, T);
    if (!tm) return;
    const dsmoe_model_config *c = dsmoe_train_model_config(tm);
    int32_t tok[TB * (TT + 1)];
    fill_tokens(tok, B * (T + 1), c->vocab_size, 13);
    dsmoe_train_loss parts;
    ASSERT_OK(dsmoe_train_model_loss(tm, tok, &parts, 0));
    const double L0 = parts.total;
    if (alpha > 0) ASSERT_TRUE(parts.balance > 0);
    else ASSERT_TRUE(parts.balance == 0);
    ASSERT_TRUE(c->num_nextn_predict_layers == 0 || parts.mtp > 0);
    ASSERT_NEAR(L0, parts.ce + 0.3 * parts.mtp + parts.balance, 1e-6 * L0);
    ASSERT_OK(dsmoe_train_model_backward(tm));
    const int32_t K = c->num_experts_per_tok, nm = dsmoe_train_model_moe_count(tm);
    const int64_t per = (int64_t)B * T * K;
    int32_t *r0 = (int32_t *)calloc((size_t)(per * nm + 1), sizeof(int32_t));
    int32_t *r1 = (int32_t *)malloc((size_t)(per * nm + 1) * sizeof(int32_t));
    routing_of(tm, r0, per);
    size_t np;
    float *G = dsmoe_train_model_grads(tm, &np);
    float *g = (float *)malloc(np * sizeof(float));
    memcpy(g, G, np * sizeof(float));
    int64_t n = dsmoe_train_model_tensor_count(tm);
    double *an = (double *)calloc((size_t)n, sizeof(double)), *fd = (double *)calloc((size_t)n, sizeof(double));
    int *ok = (int *)calloc((size_t)n, sizeof(int));
    double amax = 0;
    int checked = 0, trainable = 0;
    for (int64_t i = 0; i < n; i++) {
        dsmoe_train_tensor t;
        ASSERT_OK(dsmoe_train_model_tensor(tm, i, &t));
        if (!t.trainable) continue;
        trainable++;
        float *save = (float *)malloc((size_t)t.n * sizeof(float));
        signed char *v = (signed char *)malloc((size_t)t.n);
        memcpy(save, t.data, (size_t)t.n * sizeof(float));
        tl_seed(100 + (uint64_t)i);
        double a = 0;
        for (int64_t j = 0; j < t.n; j++) {
            v[j] = (tl_next() & 1) ? 1 : -1;
            a += (double)g[t.offset + j] * v[j];
        }
        an[i] = a;
        for (double h = 3e-3; h > 1e-4 && !ok[i]; h /= 4) {
            double lp, lm;
            int same = 1;
            for (int64_t j = 0; j < t.n; j++) t.data[j] = (float)(save[j] + h * v[j]);
            lp = loss_of(tm, tok);
            routing_of(tm, r1, per);
            same &= memcmp(r0, r1, (size_t)(per * nm) * sizeof(int32_t)) == 0;
            for (int64_t j = 0; j < t.n; j++) t.data[j] = (float)(save[j] - h * v[j]);
            lm = loss_of(tm, tok);
            routing_of(tm, r1, per);
            same &= memcmp(r0, r1, (size_t)(per * nm) * sizeof(int32_t)) == 0;
            memcpy(t.data, save, (size_t)t.n * sizeof(float));
            if (same) {
                fd[i] = (lp - lm) / (2 * h);
                ok[i] = 1;
            }
        }
        if (!ok[i]) fprintf(stderr, "  %s: every perturbation changed the routing\n", t.spec.name);
        if (ok[i]) {
            checked++;
            if (fabs(an[i]) > amax) amax = fabs(an[i]);
        }
        free(save);
        free(v);
    }
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!ok[i]) continue;
        dsmoe_train_tensor t;
        dsmoe_train_model_tensor(tm, i, &t);
        double err = fabs(fd[i] - an[i]), tol = 3e-3 * amax + 3e-2 * fabs(an[i]);
        double rel = err / (amax > 0 ? amax : 1);
        if (rel > worst) worst = rel;
        if (!(err <= tol) || getenv("DSMOE_TEST_VERBOSE"))
            fprintf(stderr, "  %-52s analytic %+.6e  fd %+.6e  err %.2e tol %.2e\n", t.spec.name,
                    an[i], fd[i], err, tol);
        ASSERT_TRUE(err <= tol);
        /* Every tensor takes part in the loss, except a routed expert no token chose. */
        int layer, e, chosen = 1;
        if (sscanf(t.spec.name, "model.layers.%d.mlp.experts.%d.", &layer, &e) == 2) {
            int k = 0;
            while (dsmoe_train_model_moe_layer(tm, k) != layer) k++;
            chosen = 0;
            for (int64_t j = 0; j < per; j++) chosen += r0[k * per + j] == e;
        }
        ASSERT_TRUE((an[i] != 0) == (chosen > 0));
    }
    fprintf(stderr, "  alpha %g: %d of %d trainable tensors checked, worst err / max %.2e\n",
            (double)alpha, checked, trainable, worst);
    ASSERT_TRUE(checked >= trainable - 2);
    /* The parameters were restored: the loss is the same bits. */
    double L1;
    L1 = loss_of(tm, tok);
    ASSERT_TRUE(L1 == L0);
    free(r0);
    free(r1);
    free(g);
    free(an);
    free(fd);
    free(ok);
    dsmoe_train_model_free(tm);
}

static void test_fd_plain(void) { fd_check_all(0.0f); }
/* A large α, so that the balance loss's gradient is not lost in the tolerance. */
static void test_fd_balance(void) { fd_check_all(0.5f); }
/* The expert-level loss over the whole batch (the aux-loss and v2 strategies). */
static void test_fd_balance_expert(void) {
    g_kind = DSMOE_BALANCE_LOSS_EXPERT;
    fd_check_all(0.5f);
    g_kind = DSMOE_BALANCE_LOSS_SEQ;
}
static void test_against_inference(void);
static void test_fd_variant(void) {
    variant = 1;
    fd_check_all(0.0f);
    fd_check_all(0.5f);
    test_layout();
    test_against_inference();
    variant = 2; /* two depths: the second's gradient into the first's state */
    fd_check_all(0.0f);
    test_layout();
    variant = 0;
}

/* 1 and 2 threads: the same loss and gradients, bit for bit. */
static void test_threads(void) {
    for (int pass = 0; pass < 2; pass++) {
        float alpha = pass ? 0.01f : 0.0f;
        dsmoe_train_model *a = make(1, 0.1f, alpha, 5, 3, 16), *b = make(2, 0.1f, alpha, 5, 3, 16);
        if (!a || !b) return;
        int32_t tok[3 * 17];
        fill_tokens(tok, 3 * 17, dsmoe_train_model_config(a)->vocab_size, 7);
        double la, lb;
        la = loss_of(a, tok);
        lb = loss_of(b, tok);
        ASSERT_TRUE(memcmp(&la, &lb, sizeof la) == 0);
        ASSERT_OK(dsmoe_train_model_backward(a));
        ASSERT_OK(dsmoe_train_model_backward(b));
        size_t na, nb;
        float *ga = dsmoe_train_model_grads(a, &na), *gb = dsmoe_train_model_grads(b, &nb);
        ASSERT_EQ_INT(na, nb);
        ASSERT_TRUE(tl_same_bits("grads", ga, gb, (int64_t)na));
        dsmoe_train_model_free(a);
        dsmoe_train_model_free(b);
    }
}

/* At initialisation (std 0.02) the logits are nearly 0: the loss is ln V plus about
 * Var(logit) / 2 = (0.02² · D) / 2 ≈ 0.006 (final-norm outputs of rms 1 against head rows
 * of std 0.02), and the mean of −logit[target] over the B·T = 32 targets has a standard
 * deviation of 0.02·√D / √32 ≈ 0.02: 0.08 is ln V's tolerance (the bias plus 3.5 σ). A few
 * AdamW steps on one repeated batch then drive it far down (the model memorises it). */
static void test_init_and_overfit(void) {
    const int B = 2, T = 16;
    dsmoe_train_model *tm = make(2, 0.02f, 1e-4f, 9, B, T);
    if (!tm) return;
    const int32_t V = dsmoe_train_model_config(tm)->vocab_size;
    int32_t tok[2 * 17];
    fill_tokens(tok, B * (T + 1), V, 13);
    dsmoe_train_loss parts;
    ASSERT_OK(dsmoe_train_model_loss(tm, tok, &parts, 0));
    ASSERT_NEAR(parts.ce, log((double)V), 0.08);
    ASSERT_NEAR(parts.mtp, log((double)V), 0.08 * 1.5); /* 28 targets: the last is past the end */
    const double L0 = parts.total;
    dsmoe_adamw_config ac;
    dsmoe_adamw_config_default(&ac);
    ac.lr = 1e-2f;
    ac.warmup_steps = 0;
    ac.total_steps = 1000;
    ac.weight_decay = 0;
    size_t np;
    dsmoe_train_model_params(tm, &np);
    float *m = (float *)calloc(np, sizeof(float)), *v = (float *)calloc(np, sizeof(float));
    float *P = dsmoe_train_model_params(tm, NULL);
    const int steps = 40;
    for (int s = 1; s <= steps; s++) {
        (void)loss_of(tm, tok); /* the forward the backward needs */
        ASSERT_OK(dsmoe_train_model_backward(tm));
        int64_t n = dsmoe_train_model_tensor_count(tm);
        double ss = 0;
        for (int64_t i = 0; i < n; i++) {
            dsmoe_train_tensor t;
            dsmoe_train_model_tensor(tm, i, &t);
            if (t.trainable) ss += dsmoe_sum_squares(t.grad, t.n, 1);
        }
        float gs = dsmoe_adamw_clip_factor(&ac, sqrt(ss));
        double lr = dsmoe_adamw_lr(&ac, s);
        for (int64_t i = 0; i < n; i++) {
            dsmoe_train_tensor t;
            dsmoe_train_model_tensor(tm, i, &t);
            if (!t.trainable) continue;
            dsmoe_adamw_update(&ac, t.data, m + t.offset, v + t.offset, t.grad, t.n, s, lr,
                               t.decay ? ac.weight_decay : 0, gs, 1);
        }
        (void)P;
    }
    double L = loss_of(tm, tok);
    fprintf(stderr, "  overfit: loss %.4f at init (ln V %.4f), %.4f after %d AdamW steps\n", L0,
            log((double)V), L, steps);
    ASSERT_TRUE(L < 0.25 * L0);
    /* Routing statistics of the last forward: K assignments per position. */
    for (int32_t k = 0; k < dsmoe_train_model_moe_count(tm); k++) {
        const dsmoe_moe_routing *r = dsmoe_train_model_routing(tm, k);
        int64_t tot = 0;
        for (int e = 0; e < dsmoe_train_model_config(tm)->n_routed_experts; e++) tot += r->counts[e];
        ASSERT_EQ_INT(tot, (int64_t)B * T * dsmoe_train_model_config(tm)->num_experts_per_tok);
    }
    free(m);
    free(v);
    dsmoe_train_model_free(tm);
}

/* A token outside the vocabulary is refused, naming its place; nothing changes: the
 * previous forward still gives the same gradients. The bias accessors. */
static void test_bad_tokens(void) {
    const int B = 2, T = 8;
    dsmoe_train_model *tm = make(1, 0.1f, 0, 4, B, T);
    if (!tm) return;
    const int32_t V = dsmoe_train_model_config(tm)->vocab_size;
    int32_t tok[2 * 9], bad[2 * 9];
    fill_tokens(tok, B * (T + 1), V, 17);
    (void)loss_of(tm, tok);
    dsmoe_train_loss L;
    ASSERT_OK(dsmoe_train_model_backward(tm));
    size_t np;
    float *G = dsmoe_train_model_grads(tm, &np);
    float *g0 = (float *)malloc(np * sizeof(float));
    memcpy(g0, G, np * sizeof(float));
    int32_t vals[2] = {V, -1};
    for (int k = 0; k < 2; k++) {
        memcpy(bad, tok, sizeof bad);
        bad[1 * (T + 1) + 3] = vals[k];
        L.total = 12345;
        ASSERT_STATUS(dsmoe_train_model_loss(tm, bad, &L, 0), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "sequence 1, position 3") != NULL);
        ASSERT_TRUE(L.total == 12345);
    }
    /* the target position (T) is checked too */
    memcpy(bad, tok, sizeof bad);
    bad[T] = V + 5;
    ASSERT_STATUS(dsmoe_train_model_loss(tm, bad, &L, 0), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "sequence 0, position 8") != NULL);
    ASSERT_STATUS(dsmoe_train_model_loss(tm, tok, &L, 2u), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_OK(dsmoe_train_model_backward(tm));
    ASSERT_TRUE(tl_same_bits("grads after refused tokens", G, g0, (int64_t)np));
    /* Bias: set, read back, a NaN refused; the bias moves the routing, not the grads' layout. */
    const int32_t E = dsmoe_train_model_config(tm)->n_routed_experts;
    float bias[64];
    for (int e = 0; e < E; e++) bias[e] = 0.01f * (float)e;
    ASSERT_OK(dsmoe_train_model_set_bias(tm, 0, bias));
    ASSERT_TRUE(memcmp(dsmoe_train_model_bias(tm, 0), bias, (size_t)E * sizeof(float)) == 0);
    bias[2] = NAN;
    ASSERT_STATUS(dsmoe_train_model_set_bias(tm, 0, bias), DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(dsmoe_train_model_bias(tm, 0)[2] == 0.02f);
    ASSERT_STATUS(dsmoe_train_model_set_bias(tm, 9, bias), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_train_model *fresh = NULL;
    ASSERT_STATUS(dsmoe_train_model_backward(fresh), DSMOE_STATUS_INVALID_ARGUMENT);
    free(g0);
    dsmoe_train_model_free(tm);
    /* A new model has no forward to differentiate. */
    tm = make(1, 0.1f, 0, 4, B, T);
    ASSERT_STATUS(dsmoe_train_model_backward(tm), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(dsmoe_train_model_routing(tm, 0) == NULL);
    dsmoe_train_model_free(tm);
}

/* An independent check of the layout and the composition: the parameters written under
 * the accessor's names into a model directory, opened by the inference model
 * (dsmoe_model, itself checked against the fp64 NumPy reference), give the same loss
 * as dsmoe_train_model_loss (fp32 through other summation orders: 1e-5 relative), pad
 * targets left out of the mean. A non-zero correction bias goes along, so the bias accessor is checked too. */
static void test_against_inference(void) {
    const int B = 2, T = 12;
    dsmoe_train_model *tm = make(1, 0.1f, 0, 21, B, T);
    if (!tm) return;
    const dsmoe_model_config *c = dsmoe_train_model_config(tm);
    const int32_t V = c->vocab_size, E = c->n_routed_experts;
    float bias[64];
    for (int k = 0; k < dsmoe_train_model_moe_count(tm); k++) {
        for (int e = 0; e < E; e++) bias[e] = 0.05f * (float)((e * 5 + k) % 7) - 0.15f;
        ASSERT_OK(dsmoe_train_model_set_bias(tm, k, bias));
    }
    char dir[4096], path[4200];
    snprintf(dir, sizeof dir, "%s", tl_tmp("dsmoe_test_train_step_model"));
    char suffix[32];
    snprintf(suffix, sizeof suffix, ".%ld", (long)getpid());
    strncat(dir, suffix, sizeof dir - strlen(dir) - 1);
    ASSERT_TRUE(mkdir(dir, 0755) == 0);
    ASSERT_OK(dsmoe_model_config_write(c, dir));
    dsmoe_safetensors_writer *w = NULL;
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    for (int64_t i = 0; i < dsmoe_train_model_tensor_count(tm); i++) {
        dsmoe_train_tensor t;
        ASSERT_OK(dsmoe_train_model_tensor(tm, i, &t));
        ASSERT_OK(dsmoe_safetensors_writer_add(w, t.spec.name, DSMOE_DTYPE_F32, t.spec.ndim,
                                               t.spec.shape, t.data));
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path));
    dsmoe_safetensors_writer_free(w);
    dsmoe_model *m = NULL;
    ASSERT_OK(dsmoe_model_open(dir, NULL, &m));
    int32_t tok[2 * 13];
    fill_tokens(tok, B * (T + 1), V, 23);
    ASSERT_TRUE(c->byte_vocab);
    tok[5] = tok[2 * (T + 1) - 1] = DSMOE_BYTE_VOCAB_PAD; /* targets that do not count */
    dsmoe_train_loss parts;
    ASSERT_OK(dsmoe_train_model_loss(tm, tok, &parts, 0));
    const double L = parts.ce; /* the main model's: the inference model runs only that */
    if (m) {
        dsmoe_model_cache *cache = NULL;
        ASSERT_OK(dsmoe_model_cache_create(m, T, &cache));
        float *logits = (float *)malloc((size_t)T * (size_t)V * sizeof(float));
        double total = 0;
        int n_targets = 0;
        for (int b = 0; b < B; b++) {
            ASSERT_OK(dsmoe_model_cache_truncate(cache, 0));
            ASSERT_OK(dsmoe_model_forward(m, cache, tok + b * (T + 1), T, logits, DSMOE_MODEL_ATTN_NAIVE));
            for (int t = 0; t < T; t++) {
                if (tok[b * (T + 1) + t + 1] == DSMOE_BYTE_VOCAB_PAD) continue;
                n_targets++;
                const float *l = logits + (size_t)t * V;
                double mx = l[0], se = 0;
                for (int v = 1; v < V; v++) mx = fmax(mx, l[v]);
                for (int v = 0; v < V; v++) se += exp(l[v] - mx);
                // cppcheck-suppress invalidFunctionArg ; se >= 1: the max's own term is exp(0)
                total += mx + log(se) - l[tok[b * (T + 1) + t + 1]];
            }
        }
        ASSERT_EQ_INT(n_targets, B * T - 2);
        double ref = total / n_targets;
        fprintf(stderr, "  loss %.9f, inference model %.9f\n", L, ref);
        ASSERT_NEAR(L, ref, 1e-5 * ref);
        free(logits);
        dsmoe_model_cache_free(cache);
    }
    dsmoe_model_free(m);
    unlink(path);
    snprintf(path, sizeof path, "%s/config.json", dir);
    unlink(path);
    rmdir(dir);
    dsmoe_train_model_free(tm);
}

/* The tensor of a name (asserting it exists). */
static dsmoe_train_tensor tensor_named(dsmoe_train_model *tm, const char *name) {
    dsmoe_train_tensor t;
    memset(&t, 0, sizeof t);
    for (int64_t i = 0; i < dsmoe_train_model_tensor_count(tm); i++) {
        ASSERT_OK(dsmoe_train_model_tensor(tm, i, &t));
        if (strcmp(t.spec.name, name) == 0) return t;
    }
    TL_FAIL("no tensor %s", name);
    return t;
}

static void rmsnorm64v(double *y, const double *x, int n, double eps) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    double inv = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * inv;
}

/* The MTP loss's alignment, computed by hand: with each depth's block reduced to the
 * identity (o_proj and every expert's down_proj 0) and eh_proj = [I | 0] (the previous
 * state ignored), depth k's logits at position i are head · norm(norm(embed(t_{i+k})))
 * and its target is t_{i+k+1}, for i + k + 1 <= T only. Two depths. */
static void test_mtp_by_hand(void) {
    variant = 2;
    const int B = 2, T = 6;
    dsmoe_train_model *tm = make(1, 0.3f, 0, 31, B, T);
    variant = 0;
    if (!tm) return;
    const dsmoe_model_config *c = dsmoe_train_model_config(tm);
    const int L = c->num_hidden_layers, D = c->hidden_size, V = c->vocab_size;
    const double eps = c->rms_norm_eps;
    char name[128];
    for (int d = 0; d < 2; d++) {
        snprintf(name, sizeof name, "model.layers.%d.self_attn.o_proj.weight", L + d);
        dsmoe_train_tensor t = tensor_named(tm, name);
        if (t.data) memset(t.data, 0, (size_t)t.n * sizeof(float));
        for (int e = -1; e < c->n_routed_experts; e++) {
            if (e < 0) snprintf(name, sizeof name, "model.layers.%d.mlp.shared_experts.down_proj.weight", L + d);
            else snprintf(name, sizeof name, "model.layers.%d.mlp.experts.%d.down_proj.weight", L + d, e);
            t = tensor_named(tm, name);
            if (t.data) memset(t.data, 0, (size_t)t.n * sizeof(float));
        }
        snprintf(name, sizeof name, "model.layers.%d.eh_proj.weight", L + d);
        t = tensor_named(tm, name);
        if (t.data) {
            memset(t.data, 0, (size_t)t.n * sizeof(float));
            for (int r = 0; r < D; r++) t.data[(size_t)r * 2 * D + r] = 1.0f;
        }
    }
    const float *E = tensor_named(tm, "model.embed_tokens.weight").data;
    const float *H = tensor_named(tm, "lm_head.weight").data;
    int32_t tok[2 * 7];
    fill_tokens(tok, B * (T + 1), V, 37);
    dsmoe_train_loss parts;
    ASSERT_OK(dsmoe_train_model_loss(tm, tok, &parts, 0));
    double *x = (double *)malloc((size_t)D * sizeof(double)), *y = (double *)malloc((size_t)D * sizeof(double));
    double mtp = 0;
    for (int k = 1; k <= 2; k++) {
        double sum = 0;
        int n = 0;
        for (int b = 0; b < B; b++)
            for (int i = 0; i + k + 1 <= T; i++) {
                const int32_t *row = tok + b * (T + 1);
                for (int j = 0; j < D; j++) x[j] = E[(size_t)row[i + k] * D + j];
                rmsnorm64v(y, x, D, eps);
                rmsnorm64v(x, y, D, eps);
                double mx = -INFINITY, se = 0, lt = 0;
                double *lg = (double *)malloc((size_t)V * sizeof(double));
                for (int v = 0; v < V; v++) {
                    double a = 0;
                    for (int j = 0; j < D; j++) a += (double)H[(size_t)v * D + j] * x[j];
                    lg[v] = a;
                    mx = fmax(mx, a);
                }
                for (int v = 0; v < V; v++) se += exp(lg[v] - mx);
                lt = lg[row[i + k + 1]];
                free(lg);
                // cppcheck-suppress invalidFunctionArg ; se >= 1: the max's own term is exp(0)
                sum += mx + log(se) - lt;
                n++;
            }
        mtp += sum / n;
    }
    mtp /= 2;
    fprintf(stderr, "  mtp loss %.9f, by hand %.9f\n", parts.mtp, mtp);
    ASSERT_NEAR(parts.mtp, mtp, 1e-5 * mtp);
    free(x);
    free(y);
    dsmoe_train_model_free(tm);
}

int main(void) {
    RUN(test_layout);
    RUN(test_against_inference);
    RUN(test_fd_plain);
    RUN(test_fd_balance);
    RUN(test_fd_balance_expert);
    RUN(test_fd_variant);
    RUN(test_mtp_by_hand);
    RUN(test_threads);
    RUN(test_init_and_overfit);
    RUN(test_bad_tokens);
    return TEST_SUMMARY();
}
