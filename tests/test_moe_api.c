/*
 * test_moe_api.c — the MoE layer inside a model: parameters and gradients in caller
 * buffers (one buffer, one optimizer pass for several layers), one scratch shared by
 * layers of different configs (outputs and gradients bit-identical to layers that own
 * theirs), the routing kept valid across dsmoe_moe_reserve, many layers in one
 * safetensors file with their routing configs (written, discovered, loaded back bit
 * for bit), the saved config's parser on malformed metadata, every tensor checked
 * before a layer is allocated (crafted files that claim huge layers), NaN / Inf
 * weights refused naming the element, a failed allocation in create (each of them),
 * and the forward over long inputs in chunks.
 */
#include "testlib.h"
#include "moe/moe_internal.h"

#include <math.h>

static dsmoe_moe_config cfg_of(int D, int F, int E, int K, int G, int TG, int ns, int train) {
    dsmoe_moe_config c;
    dsmoe_moe_config_default(&c);
    dsmoe_router_preset("deepseek-v3", &c.router);
    c.router.n_experts = E;
    c.router.n_groups = G;
    c.router.topk_groups = TG;
    c.router.top_k = K;
    if (E / G < 2) c.router.group_score = DSMOE_GROUP_SCORE_MAX;
    c.hidden_size = D;
    c.expert_size = F;
    c.n_shared = ns;
    c.train = train;
    c.max_tokens = 40;
    c.n_threads = 2;
    return c;
}

static float *rand_buf(size_t n, double scale) {
    float *x = (float *)malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) x[i] = (float)(tl_normal() * scale);
    return x;
}

static void rand_bias(dsmoe_moe *m) {
    float b[256];
    const int E = dsmoe_moe_get_config(m)->router.n_experts;
    for (int e = 0; e < E; e++) b[e] = (float)(tl_uniform() * 0.1 - 0.05);
    ASSERT_OK(dsmoe_moe_set_bias(m, b));
}

/* Two configs unlike each other: the second is larger in every dimension that sizes
 * the scratch except D, has no shared expert and another routing. */
static void two_configs(dsmoe_moe_config *a, dsmoe_moe_config *b, int train) {
    *a = cfg_of(12, 6, 8, 2, 2, 1, 1, train);
    *b = cfg_of(10, 9, 16, 4, 4, 2, 0, train);
    b->router.scale = 1.5f;
}

/* ------------------------------------------------------------ buffers -- */

static void test_param_count_and_caller_buffers(void) {
    tl_seed(1);
    dsmoe_moe_config ca, cb;
    two_configs(&ca, &cb, 1);
    const size_t na = dsmoe_moe_param_count(&ca), nb = dsmoe_moe_param_count(&cb);
    ASSERT_TRUE(na > 0 && nb > 0);
    ASSERT_EQ_INT(na % 16, 0);
    dsmoe_moe *own_a = NULL, *own_b = NULL, *la = NULL, *lb = NULL;
    ASSERT_OK(dsmoe_moe_create(&ca, &own_a));
    ASSERT_OK(dsmoe_moe_create(&cb, &own_b));
    if (!own_a || !own_b) goto done0;
    size_t n = 0;
    ASSERT_TRUE(dsmoe_moe_params(own_a, &n) != NULL);
    ASSERT_EQ_INT(n, na);
    /* one parameter buffer, one gradient buffer for both layers, poisoned first: the
     * layers zero their parts */
    float *P = (float *)dsmoe_malloc((na + nb) * sizeof(float));
    float *G = (float *)dsmoe_malloc((na + nb) * sizeof(float));
    for (size_t i = 0; i < na + nb; i++) P[i] = G[i] = NAN;
    dsmoe_moe_buffers ba = {P, G, NULL, 0}, bb = {P + na, G + na, NULL, 0};
    ASSERT_OK(dsmoe_moe_create_with(&ca, &ba, &la));
    ASSERT_OK(dsmoe_moe_create_with(&cb, &bb, &lb));
    if (!la || !lb) goto done;
    int zero = 1;
    for (size_t i = 0; i < na + nb; i++) zero &= P[i] == 0.0f && G[i] == 0.0f;
    ASSERT_TRUE(zero);
    ASSERT_TRUE(dsmoe_moe_params(la, &n) == P && n == na);
    ASSERT_TRUE(dsmoe_moe_params(lb, &n) == P + na && n == nb);
    ASSERT_TRUE(dsmoe_moe_grads(lb, &n) == G + na && n == nb);
    /* every tensor of layer b lies inside its part of the buffers */
    int inside = 1;
    for (int64_t i = 0; i < dsmoe_moe_tensor_count(lb); i++) {
        dsmoe_moe_tensor t;
        ASSERT_OK(dsmoe_moe_tensor_at(lb, i, &t));
        if (!t.trainable) continue;
        const float *d = (const float *)t.data;
        const size_t cnt = (size_t)(t.shape[0] * t.shape[1]);
        inside &= d >= P + na && d + cnt <= P + na + nb;
        inside &= t.grad == G + (d - P);
    }
    ASSERT_TRUE(inside);
    /* the same weights as the owning layers: forward and backward bit-identical, the
     * gradients landing in G */
    dsmoe_moe_init_random(own_a, 5);
    dsmoe_moe_init_random(own_b, 6);
    dsmoe_moe_init_random(la, 5);
    dsmoe_moe_init_random(lb, 6);
    const int64_t T = 23;
    float *x = rand_buf((size_t)T * 12, 1.0), *xb = rand_buf((size_t)T * 10, 1.0);
    float *dy = rand_buf((size_t)T * 12, 1.0), *dyb = rand_buf((size_t)T * 10, 1.0);
    float *y1 = rand_buf((size_t)T * 12, 0), *y2 = rand_buf((size_t)T * 12, 0);
    float *yb1 = rand_buf((size_t)T * 10, 0), *yb2 = rand_buf((size_t)T * 10, 0);
    ASSERT_OK(dsmoe_moe_forward(own_a, y1, x, T, 2));
    ASSERT_OK(dsmoe_moe_forward(la, y2, x, T, 2));
    tl_same_bits("caller-buffer layer a: y", y1, y2, T * 12);
    ASSERT_OK(dsmoe_moe_forward(own_b, yb1, xb, T, 2));
    ASSERT_OK(dsmoe_moe_forward(lb, yb2, xb, T, 2));
    tl_same_bits("caller-buffer layer b: y", yb1, yb2, T * 10);
    ASSERT_OK(dsmoe_moe_backward(own_a, NULL, dy, x, NULL, T, 2));
    ASSERT_OK(dsmoe_moe_backward(la, NULL, dy, x, NULL, T, 2));
    ASSERT_OK(dsmoe_moe_backward(own_b, NULL, dyb, xb, NULL, T, 2));
    ASSERT_OK(dsmoe_moe_backward(lb, NULL, dyb, xb, NULL, T, 2));
    tl_same_bits("layer a grads in G", dsmoe_moe_grads(own_a, NULL), G, (int64_t)na);
    tl_same_bits("layer b grads in G", dsmoe_moe_grads(own_b, NULL), G + na, (int64_t)nb);
    /* one optimizer pass over P and G moves both layers */
    for (size_t i = 0; i < na + nb; i++) P[i] -= 0.1f * G[i];
    dsmoe_moe_tensor t;
    ASSERT_OK(dsmoe_moe_tensor_get(lb, "experts.3.down_proj.weight", &t));
    dsmoe_moe_tensor to;
    ASSERT_OK(dsmoe_moe_tensor_get(own_b, "experts.3.down_proj.weight", &to));
    ASSERT_TRUE(((float *)t.data)[1] == ((float *)to.data)[1] - 0.1f * to.grad[1]);
    /* the layer owns less */
    ASSERT_TRUE(dsmoe_moe_memory_size(la) + 2 * na * sizeof(float) <=
                dsmoe_moe_memory_size(own_a) + 64);
    free(x);
    free(xb);
    free(dy);
    free(dyb);
    free(y1);
    free(y2);
    free(yb1);
    free(yb2);
done:
    dsmoe_moe_free(la);
    dsmoe_moe_free(lb);
    /* the buffers are the caller's: still there after the layers are gone */
    P[0] = 1.0f;
    G[na + nb - 1] = 1.0f;
    dsmoe_free(P);
    dsmoe_free(G);
done0:
    dsmoe_moe_free(own_a);
    dsmoe_moe_free(own_b);
}

/* Caller buffers that are mostly zero already (a fresh page allocation, as a sharded
 * training model gives): the create skips the zero pieces, yet every stray nonzero value,
 * wherever it sits in a 4 KiB piece or in the last, partial one, is zeroed. */
static void test_caller_buffers_sparse_values(void) {
    dsmoe_moe_config ca, cb;
    two_configs(&ca, &cb, 1);
    const size_t na = dsmoe_moe_param_count(&ca);
    ASSERT_TRUE(na > 2048);
    float *P = (float *)dsmoe_malloc(na * sizeof(float));
    float *G = (float *)dsmoe_malloc(na * sizeof(float));
    dsmoe_moe *la = NULL;
    if (!P || !G) goto done;
    memset(P, 0, na * sizeof(float));
    memset(G, 0, na * sizeof(float));
    P[0] = 1.0f;       /* first float of the first piece */
    P[1023] = -2.0f;   /* last float of the first piece */
    P[na - 1] = 3.0f;  /* the last piece */
    G[1024] = 4.0f;    /* first float of the second piece */
    G[na - 1] = NAN;
    dsmoe_moe_buffers b = {P, G, NULL, 0};
    ASSERT_OK(dsmoe_moe_create_with(&ca, &b, &la));
    int zero = 1;
    for (size_t i = 0; i < na; i++) zero &= P[i] == 0.0f && G[i] == 0.0f;
    ASSERT_TRUE(zero);
done:
    dsmoe_moe_free(la);
    dsmoe_free(P);
    dsmoe_free(G);
}

static void test_buffer_errors(void) {
    dsmoe_moe_config c = cfg_of(12, 6, 8, 2, 2, 1, 1, 0);
    dsmoe_moe *m = (dsmoe_moe *)(uintptr_t)1;
    float *P = (float *)dsmoe_malloc((dsmoe_moe_param_count(&c) + 16) * sizeof(float));
    dsmoe_moe_buffers b = {P + 1, NULL, NULL, 0}; /* not on 16 floats */
    ASSERT_STATUS(dsmoe_moe_create_with(&c, &b, &m), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(m == NULL);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "params") != NULL);
    b.params = P;
    b.grads = P; /* grads without train */
    ASSERT_STATUS(dsmoe_moe_create_with(&c, &b, &m), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "train") != NULL);
    b.grads = NULL;
    const size_t ws = dsmoe_moe_workspace_size(&c, c.max_tokens, c.n_threads);
    ASSERT_TRUE(ws > 0);
    char *W = (char *)dsmoe_malloc(ws + 64);
    b.workspace = W;
    b.workspace_size = ws - 1;
    ASSERT_STATUS(dsmoe_moe_create_with(&c, &b, &m), DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    b.workspace = W + 8;
    b.workspace_size = ws;
    ASSERT_STATUS(dsmoe_moe_create_with(&c, &b, &m), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "workspace") != NULL);
    c.hidden_size = 0;
    ASSERT_EQ_INT(dsmoe_moe_param_count(&c), 0);
    ASSERT_EQ_INT(dsmoe_moe_workspace_size(&c, 8, 1), 0);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "hidden_size") != NULL);
    dsmoe_free(W);
    dsmoe_free(P);
}

/* ------------------------------------------------------------ workspace -- */

/* Layers a and b sharing one scratch give exactly what layers owning theirs give,
 * interleaved as a model runs them: forward a, forward b, backward b, backward a. */
static void run_shared(int train) {
    tl_seed(2 + (uint64_t)train);
    dsmoe_moe_config ca, cb;
    two_configs(&ca, &cb, train);
    size_t ws = dsmoe_moe_workspace_size(&ca, ca.max_tokens, ca.n_threads);
    const size_t wsb = dsmoe_moe_workspace_size(&cb, cb.max_tokens, cb.n_threads);
    if (wsb > ws) ws = wsb;
    void *W = dsmoe_malloc(ws);
    memset(W, 0xff, ws); /* NaN patterns: nothing may be read before it is written */
    dsmoe_moe *oa = NULL, *ob = NULL, *sa = NULL, *sb = NULL;
    dsmoe_moe_buffers bw = {NULL, NULL, W, ws};
    ASSERT_OK(dsmoe_moe_create(&ca, &oa));
    ASSERT_OK(dsmoe_moe_create(&cb, &ob));
    ASSERT_OK(dsmoe_moe_create_with(&ca, &bw, &sa));
    ASSERT_OK(dsmoe_moe_create(&cb, &sb));
    if (!oa || !ob || !sa || !sb) goto done;
    const size_t before = dsmoe_moe_memory_size(sb);
    ASSERT_OK(dsmoe_moe_set_workspace(sb, W, ws)); /* attached after creation */
    ASSERT_TRUE(dsmoe_moe_memory_size(sb) < before);
    dsmoe_moe_init_random(oa, 11);
    dsmoe_moe_init_random(sa, 11);
    dsmoe_moe_init_random(ob, 12);
    dsmoe_moe_init_random(sb, 12);
    tl_seed(3);
    rand_bias(oa);
    tl_seed(3);
    rand_bias(sa);
    const int64_t T = 37; /* batched path */
    for (int pass = 0; pass < 2; pass++) {
        const int64_t Tn = pass ? 5 : T; /* then the decode path */
        float *xa = rand_buf((size_t)Tn * 12, 1.0), *xb = rand_buf((size_t)Tn * 10, 1.0);
        float *dya = rand_buf((size_t)Tn * 12, 1.0), *dyb = rand_buf((size_t)Tn * 10, 1.0);
        float *ya1 = rand_buf((size_t)Tn * 12, 0), *ya2 = rand_buf((size_t)Tn * 12, 0);
        float *yb1 = rand_buf((size_t)Tn * 10, 0), *yb2 = rand_buf((size_t)Tn * 10, 0);
        float *dxa1 = rand_buf((size_t)Tn * 12, 0), *dxa2 = rand_buf((size_t)Tn * 12, 0);
        ASSERT_OK(dsmoe_moe_forward(oa, ya1, xa, Tn, 2));
        ASSERT_OK(dsmoe_moe_forward(ob, yb1, xb, Tn, 2));
        ASSERT_OK(dsmoe_moe_forward(sa, ya2, xa, Tn, 2));
        ASSERT_OK(dsmoe_moe_forward(sb, yb2, xb, Tn, 1)); /* overwrites the scratch */
        tl_same_bits("shared scratch: y of a", ya1, ya2, Tn * 12);
        tl_same_bits("shared scratch: y of b", yb1, yb2, Tn * 10);
        /* a's routing is its own state: b's forward left it alone */
        const dsmoe_moe_routing *r1 = dsmoe_moe_last_routing(oa), *r2 = dsmoe_moe_last_routing(sa);
        ASSERT_TRUE(r1 && r2);
        if (r1 && r2) {
            ASSERT_TRUE(memcmp(r1->indices, r2->indices, (size_t)Tn * 2 * sizeof(int32_t)) == 0);
            tl_same_bits("shared scratch: routing weights of a", r1->weights, r2->weights, Tn * 2);
            tl_same_bits("shared scratch: logits of a", r1->logits, r2->logits, Tn * 8);
            ASSERT_TRUE(memcmp(r1->counts, r2->counts, 8 * sizeof(int64_t)) == 0);
        }
        if (train) {
            ASSERT_OK(dsmoe_moe_backward(ob, NULL, dyb, xb, NULL, Tn, 2));
            ASSERT_OK(dsmoe_moe_backward(sb, NULL, dyb, xb, NULL, Tn, 2));
            ASSERT_OK(dsmoe_moe_backward(oa, dxa1, dya, xa, NULL, Tn, 2));
            ASSERT_OK(dsmoe_moe_backward(sa, dxa2, dya, xa, NULL, Tn, 1));
            size_t n = 0;
            const float *g1 = dsmoe_moe_grads(oa, &n), *g2 = dsmoe_moe_grads(sa, NULL);
            tl_same_bits("shared scratch: grads of a", g1, g2, (int64_t)n);
            g1 = dsmoe_moe_grads(ob, &n);
            g2 = dsmoe_moe_grads(sb, NULL);
            tl_same_bits("shared scratch: grads of b", g1, g2, (int64_t)n);
            tl_same_bits("shared scratch: dx of a", dxa1, dxa2, Tn * 12);
        }
        free(xa);
        free(xb);
        free(dya);
        free(dyb);
        free(ya1);
        free(ya2);
        free(yb1);
        free(yb2);
        free(dxa1);
        free(dxa2);
    }
    /* a scratch too small or misaligned is refused and nothing changes */
    ASSERT_STATUS(dsmoe_moe_set_workspace(sa, W, 64), DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    ASSERT_STATUS(dsmoe_moe_set_workspace(sa, (char *)W + 4, ws - 64),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    /* growing a layer with an attached scratch needs a larger one first */
    ASSERT_STATUS(dsmoe_moe_reserve(sa, 4000, 0), DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "dsmoe_moe_workspace_size") != NULL);
    ASSERT_EQ_INT(dsmoe_moe_get_config(sa)->max_tokens, 40);
    /* back to an owned scratch: still the same results */
    ASSERT_OK(dsmoe_moe_set_workspace(sa, NULL, 0));
    ASSERT_OK(dsmoe_moe_reserve(sa, 4000, 0));
    {
        float *x = rand_buf(3 * 12, 1.0), *y1 = rand_buf(3 * 12, 0), *y2 = rand_buf(3 * 12, 0);
        ASSERT_OK(dsmoe_moe_forward(oa, y1, x, 3, 1));
        ASSERT_OK(dsmoe_moe_forward(sa, y2, x, 3, 1));
        tl_same_bits("owned scratch again: y", y1, y2, 3 * 12);
        free(x);
        free(y1);
        free(y2);
    }
done:
    dsmoe_moe_free(oa);
    dsmoe_moe_free(ob);
    dsmoe_moe_free(sa);
    dsmoe_moe_free(sb);
    dsmoe_free(W);
}

static void test_shared_workspace_inference(void) { run_shared(0); }
static void test_shared_workspace_training(void) { run_shared(1); }

/* The routing pointers of the last forward stay valid (same values) across a reserve
 * that moves the workspace; the backward of that forward is refused, a new forward
 * works. ASan turns a dangling pointer into a failure. */
static void test_routing_survives_reserve(void) {
    tl_seed(4);
    dsmoe_moe_config c = cfg_of(12, 6, 8, 2, 2, 1, 1, 1);
    dsmoe_moe *m = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    if (!m) return;
    dsmoe_moe_init_random(m, 9);
    const int64_t T = 20;
    float *x = rand_buf((size_t)T * 12, 1.0), *y = rand_buf((size_t)T * 12, 0);
    float *dy = rand_buf((size_t)T * 12, 1.0);
    ASSERT_OK(dsmoe_moe_forward(m, y, x, T, 2));
    const dsmoe_moe_routing *r = dsmoe_moe_last_routing(m);
    ASSERT_TRUE(r != NULL);
    if (!r) goto done;
    const int32_t *idx = r->indices;
    const float *w = r->weights, *sc = r->scores;
    const int64_t *cnt = r->counts;
    int32_t idx0[40];
    float w0[40], s0[160];
    int64_t c0[8];
    memcpy(idx0, idx, sizeof idx0);
    memcpy(w0, w, sizeof w0);
    memcpy(s0, sc, sizeof s0);
    memcpy(c0, cnt, sizeof c0);
    ASSERT_OK(dsmoe_moe_reserve(m, 1000, 0)); /* grows: a new state block */
    ASSERT_TRUE(memcmp(idx, idx0, sizeof idx0) == 0);
    ASSERT_TRUE(memcmp(w, w0, sizeof w0) == 0);
    ASSERT_TRUE(memcmp(sc, s0, sizeof s0) == 0);
    ASSERT_TRUE(memcmp(cnt, c0, sizeof c0) == 0);
    ASSERT_TRUE(dsmoe_moe_last_routing(m) == r && r->indices == idx);
    ASSERT_OK(dsmoe_moe_reserve(m, 2000, 0)); /* twice: the first forward's state stays */
    ASSERT_TRUE(memcmp(idx, idx0, sizeof idx0) == 0);
    ASSERT_STATUS(dsmoe_moe_backward(m, NULL, dy, x, NULL, T, 2), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "dsmoe_moe_reserve") != NULL);
    ASSERT_OK(dsmoe_moe_forward(m, y, x, T, 2));
    r = dsmoe_moe_last_routing(m);
    ASSERT_TRUE(r && memcmp(r->indices, idx0, sizeof idx0) == 0);
    ASSERT_OK(dsmoe_moe_backward(m, NULL, dy, x, NULL, T, 2));
done:
    free(x);
    free(y);
    free(dy);
    dsmoe_moe_free(m);
}

/* ------------------------------------------------------------ files -- */

static void test_many_layers_one_file(void) {
    tl_seed(5);
    dsmoe_moe_config ca, cb;
    two_configs(&ca, &cb, 0);
    cb.capacity_factor = 1.25f;
    cb.router.norm_eps = 1e-20f;
    cb.router.group_mask = DSMOE_GROUP_MASK_ZERO;
    dsmoe_moe *a = NULL, *b = NULL, *la = NULL, *lb = NULL, *pk = NULL;
    dsmoe_safetensors_writer *wr = NULL;
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_moe_create(&ca, &a));
    ASSERT_OK(dsmoe_moe_create(&cb, &b));
    if (!a || !b) goto done;
    dsmoe_moe_init_random(a, 21);
    dsmoe_moe_init_random(b, 22);
    rand_bias(a);
    rand_bias(b);
    const char *path = tl_tmp("moe_api_two_layers.safetensors");
    ASSERT_OK(dsmoe_safetensors_writer_create(&wr));
    ASSERT_OK(dsmoe_moe_write(a, wr, "model.layers.0.mlp."));
    ASSERT_OK(dsmoe_moe_write(b, wr, "model.layers.1.mlp."));
    ASSERT_OK(dsmoe_safetensors_writer_save(wr, path));
    /* a packed layer cannot lend row-major tensors to a writer */
    dsmoe_moe_config cp = ca;
    cp.weight_layout = DSMOE_MOE_LAYOUT_PACKED;
    ASSERT_OK(dsmoe_moe_create(&cp, &pk));
    ASSERT_STATUS(dsmoe_moe_write(pk, wr, "packed."), DSMOE_STATUS_UNSUPPORTED);
    ASSERT_OK(dsmoe_safetensors_open(path, &st));
    if (!st) goto done;
    /* discovery */
    ASSERT_EQ_INT(dsmoe_moe_layer_count(st), 2);
    char p[64];
    ASSERT_OK(dsmoe_moe_layer_prefix(st, 1, p, sizeof p));
    ASSERT_TRUE(strcmp(p, "model.layers.1.mlp.") == 0);
    ASSERT_STATUS(dsmoe_moe_layer_prefix(st, 2, p, sizeof p), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_moe_layer_prefix(st, 0, p, 4), DSMOE_STATUS_INVALID_ARGUMENT);
    int64_t nf = 0;
    ASSERT_STATUS(dsmoe_moe_find_prefix(st, p, sizeof p, &nf), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_EQ_INT(nf, 2);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "model.layers.0.mlp.") != NULL);
    /* each layer's saved config */
    dsmoe_moe_config sa, sb;
    ASSERT_OK(dsmoe_moe_saved_config(st, "model.layers.0.mlp.", &sa));
    ASSERT_OK(dsmoe_moe_saved_config(st, "model.layers.1.mlp.", &sb));
    ASSERT_TRUE(memcmp(&sa.router, &ca.router, sizeof ca.router) == 0);
    ASSERT_TRUE(memcmp(&sb.router, &cb.router, sizeof cb.router) == 0);
    ASSERT_TRUE(sb.capacity_factor == cb.capacity_factor);
    ASSERT_EQ_INT(sb.hidden_size, 10);
    ASSERT_EQ_INT(sa.n_shared, 1);
    ASSERT_STATUS(dsmoe_moe_saved_config(st, "model.layers.2.mlp.", &sa), DSMOE_STATUS_NOT_FOUND);
    /* loaded back with default options (deepseek-v3 routing, which both contradict):
     * the saved routing wins, and the layers compute the same bits */
    ASSERT_OK(dsmoe_moe_load_from(st, "model.layers.0.mlp.", NULL, &la));
    ASSERT_OK(dsmoe_moe_load(path, "model.layers.1.mlp.", NULL, &lb));
    if (!la || !lb) goto done;
    ASSERT_TRUE(memcmp(&dsmoe_moe_get_config(lb)->router, &cb.router, sizeof cb.router) == 0);
    size_t n1, n2;
    const float *p1 = dsmoe_moe_params(b, &n1), *p2 = dsmoe_moe_params(lb, &n2);
    ASSERT_EQ_INT(n1, n2);
    ASSERT_TRUE(memcmp(p1, p2, n1 * sizeof(float)) == 0);
    ASSERT_TRUE(memcmp(dsmoe_moe_bias(b), dsmoe_moe_bias(lb), 16 * sizeof(float)) == 0);
    const int64_t T = 30;
    float *xa = rand_buf((size_t)T * 12, 1.0), *xb = rand_buf((size_t)T * 10, 1.0);
    float *y1 = rand_buf((size_t)T * 12, 0), *y2 = rand_buf((size_t)T * 12, 0);
    ASSERT_OK(dsmoe_moe_forward(a, y1, xa, T, 2));
    ASSERT_OK(dsmoe_moe_forward(la, y2, xa, T, 2));
    tl_same_bits("layer 0 from the shared file", y1, y2, T * 12);
    ASSERT_OK(dsmoe_moe_forward(b, y1, xb, T, 2));
    ASSERT_OK(dsmoe_moe_forward(lb, y2, xb, T, 2));
    tl_same_bits("layer 1 from the shared file", y1, y2, T * 10);
    ASSERT_TRUE(dsmoe_moe_last_routing(lb)->n_dropped == dsmoe_moe_last_routing(b)->n_dropped);
    ASSERT_TRUE(dsmoe_moe_last_routing(lb)->n_dropped > 0); /* the capacity came along */
    /* no prefix: the file has two layers */
    dsmoe_moe *none = (dsmoe_moe *)(uintptr_t)1;
    ASSERT_STATUS(dsmoe_moe_load(path, NULL, NULL, &none), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(none == NULL);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "moe_api_two_layers.safetensors") != NULL);
    free(xa);
    free(xb);
    free(y1);
    free(y2);
done:
    dsmoe_safetensors_close(st);
    dsmoe_safetensors_writer_free(wr);
    dsmoe_moe_free(a);
    dsmoe_moe_free(b);
    dsmoe_moe_free(la);
    dsmoe_moe_free(lb);
    dsmoe_moe_free(pk);
}

/* A file with layer m's tensors under "" and the given saved-config metadata. */
static void write_with_meta(const char *path, dsmoe_moe *m, const char *key, const char *json) {
    dsmoe_safetensors_writer *wr = NULL;
    ASSERT_OK(dsmoe_safetensors_writer_create(&wr));
    for (int64_t i = 0; i < dsmoe_moe_tensor_count(m); i++) {
        dsmoe_moe_tensor t;
        dsmoe_moe_tensor_at(m, i, &t);
        ASSERT_OK(dsmoe_safetensors_writer_add(wr, t.name, t.dtype, t.ndim, t.shape, t.data));
    }
    if (key) ASSERT_OK(dsmoe_safetensors_writer_set_metadata(wr, key, json));
    ASSERT_OK(dsmoe_safetensors_writer_save(wr, path));
    dsmoe_safetensors_writer_free(wr);
}

static void test_saved_config_errors(void) {
    dsmoe_moe_config c = cfg_of(12, 6, 8, 2, 2, 1, 1, 0);
    c.router.top_k = 3;
    dsmoe_moe *m = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    if (!m) return;
    char good[2048];
    dsmoe_moe_config_json(&c, good, sizeof good);
    const char *path = tl_tmp("moe_api_meta.safetensors");
    /* the plain key of older single-layer files applies to any prefix */
    write_with_meta(path, m, "dsmoe.moe_config", good);
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(path, &st));
    dsmoe_moe_config got;
    dsmoe_moe_config_default(&got);
    got.n_shared = -1;
    ASSERT_OK(dsmoe_moe_config_from_safetensors(&got, st, ""));
    ASSERT_EQ_INT(got.router.top_k, 3);
    dsmoe_safetensors_close(st);
    struct {
        const char *from, *to, *needle;
        dsmoe_status want;
    } cases[] = {
        {"\"top_k\": 3", "\"top_k\": 3, \"extra\": 1", "unknown router key", DSMOE_STATUS_FORMAT},
        {"\"num_experts_per_tok\":3,", "", "a key is missing", DSMOE_STATUS_FORMAT},
        {"\"top_k\": 3", "\"top_k\": 3.5", "integer", DSMOE_STATUS_FORMAT},
        {"\"top_k\": 3", "\"top_k\": 3, \"top_k\": 3", "repeated", DSMOE_STATUS_FORMAT},
        {"\"sigmoid\"", "\"tanh\"", "unknown value", DSMOE_STATUS_FORMAT},
        {"\"num_experts_per_tok\":3", "\"num_experts_per_tok\":4", "disagree", DSMOE_STATUS_FORMAT},
        /* valid JSON, invalid config: top_k > topk_groups · E / G */
        {"\"num_experts_per_tok\":3", "\"num_experts_per_tok\":5", "top_k", DSMOE_STATUS_FORMAT},
        /* sizes that disagree with the tensors */
        {"\"hidden_size\":12", "\"hidden_size\":13", "disagrees with its tensors",
         DSMOE_STATUS_FORMAT},
        {"}}", "}} ", "", DSMOE_STATUS_OK},
        {"}}", "}}x", "text after", DSMOE_STATUS_FORMAT},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char bad[2048];
        const char *at = strstr(good, cases[i].from);
        ASSERT_TRUE(at != NULL);
        if (!at) continue;
        snprintf(bad, sizeof bad, "%.*s%s%s", (int)(at - good), good, cases[i].to,
                 at + strlen(cases[i].from));
        if (i == 6) { /* both counts, consistently */
            char *k = strstr(bad, "\"top_k\": 3");
            if (k) k[9] = '5';
        }
        write_with_meta(path, m, "dsmoe.moe_config", bad);
        ASSERT_OK(dsmoe_safetensors_open(path, &st));
        if (!st) continue;
        dsmoe_moe_config_default(&got);
        got.n_shared = -1;
        const dsmoe_moe_config before = got;
        dsmoe_status s = dsmoe_moe_config_from_safetensors(&got, st, "");
        if (s != cases[i].want)
            TL_FAIL("metadata case %zu: status %s, want %s (%s)", i, dsmoe_strerror(s),
                    dsmoe_strerror(cases[i].want), dsmoe_last_error());
        if (cases[i].want != DSMOE_OK) {
            ASSERT_TRUE(strstr(dsmoe_last_error(), cases[i].needle) != NULL);
            ASSERT_TRUE(memcmp(&got, &before, sizeof got) == 0); /* unchanged */
        }
        dsmoe_safetensors_close(st);
        st = NULL;
    }
    dsmoe_moe_free(m);
}

/* ------------------------------------------------------------ validation -- */

/* st_file: a safetensors file of tensors (name, dtype, shape) with zero data. */
typedef struct spec {
    const char *name;
    dsmoe_dtype dtype;
    int64_t r, c;
} spec;

static void write_zeros(const char *path, const spec *s, int n) {
    dsmoe_safetensors_writer *wr = NULL;
    ASSERT_OK(dsmoe_safetensors_writer_create(&wr));
    size_t most = 0;
    for (int i = 0; i < n; i++) {
        size_t b = (size_t)(s[i].r * s[i].c) * dsmoe_dtype_size(s[i].dtype);
        if (b > most) most = b;
    }
    void *zeros = calloc(most ? most : 1, 1);
    for (int i = 0; i < n; i++) {
        int64_t shape[2] = {s[i].r, s[i].c};
        ASSERT_OK(dsmoe_safetensors_writer_add(wr, s[i].name, s[i].dtype, 2, shape, zeros));
    }
    ASSERT_OK(dsmoe_safetensors_writer_save(wr, path));
    dsmoe_safetensors_writer_free(wr);
    free(zeros);
}

/* Files that claim huge layers fail naming the first missing tensor without a single
 * allocation of layer memory (the 800 GB claim once reached a use after free). */
static void test_crafted_claims_allocate_nothing(void) {
    const spec huge[] = {{"gate.weight", DSMOE_DTYPE_BF16, 65536, 1},
                         {"experts.0.gate_proj.weight", DSMOE_DTYPE_BF16, 1048576, 1}};
    const spec big[] = {{"model.layers.0.mlp.gate.weight", DSMOE_DTYPE_BF16, 256, 512},
                        {"model.layers.0.mlp.experts.0.gate_proj.weight", DSMOE_DTYPE_BF16, 2048,
                         512}};
    struct {
        const spec *s;
        const char *file, *missing;
        int32_t K, G;
    } cases[] = {
        {huge, "moe_api_huge.safetensors", "experts.0.up_proj.weight", 1, 1},
        {big, "moe_api_big.safetensors", "model.layers.0.mlp.experts.0.up_proj.weight", 8, 8},
    };
    for (int i = 0; i < 2; i++) {
        const char *path = tl_tmp(cases[i].file);
        write_zeros(path, cases[i].s, 2);
        dsmoe_moe_config opts;
        dsmoe_moe_config_default(&opts);
        opts.n_shared = -1;
        opts.router.n_groups = cases[i].G;
        opts.router.topk_groups = 1;
        opts.router.top_k = cases[i].K;
        opts.router.group_score = DSMOE_GROUP_SCORE_MAX;
        opts.router.use_bias = 0;
        const int64_t calls = dsmoe__moe_alloc_calls;
        dsmoe_moe *m = (dsmoe_moe *)(uintptr_t)1;
        ASSERT_STATUS(dsmoe_moe_load(path, NULL, &opts, &m), DSMOE_STATUS_NOT_FOUND);
        ASSERT_TRUE(m == NULL);
        ASSERT_TRUE(strstr(dsmoe_last_error(), cases[i].missing) != NULL);
        ASSERT_EQ_INT(dsmoe__moe_alloc_calls, calls); /* nothing allocated */
        /* the same config, all of its tensors present, would be this large */
        opts.max_tokens = 1;
        dsmoe_safetensors *st = NULL;
        ASSERT_OK(dsmoe_safetensors_open(path, &st));
        ASSERT_OK(dsmoe_moe_config_from_safetensors(&opts, st, i ? "model.layers.0.mlp." : ""));
        ASSERT_TRUE((double)dsmoe_moe_param_count(&opts) * 4 > 3e9);
        dsmoe_safetensors_close(st);
    }
}

/* A failed allocation in create, at each of its allocations: OUT_OF_MEMORY, *out NULL,
 * nothing leaked or touched after free (ASan). */
static void test_create_allocation_failures(void) {
    dsmoe_moe_config c = cfg_of(12, 6, 8, 2, 2, 1, 1, 1);
    const int64_t before = dsmoe__moe_alloc_calls;
    dsmoe_moe *m = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    const int64_t per_create = dsmoe__moe_alloc_calls - before;
    ASSERT_TRUE(per_create >= 5); /* params, bias, grads, state, scratch */
    dsmoe_moe_free(m);
    for (int64_t k = 1; k <= per_create; k++) {
        dsmoe__moe_alloc_fail_at = dsmoe__moe_alloc_calls + k;
        m = (dsmoe_moe *)(uintptr_t)1;
        ASSERT_STATUS(dsmoe_moe_create(&c, &m), DSMOE_STATUS_OUT_OF_MEMORY);
        ASSERT_TRUE(m == NULL);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "moe") != NULL);
    }
    dsmoe__moe_alloc_fail_at = 0;
    /* on caller buffers, a failure (here: the state) leaves them untouched */
    {
        const size_t np = dsmoe_moe_param_count(&c);
        float *P = (float *)dsmoe_malloc(np * sizeof(float));
        float *G = (float *)dsmoe_malloc(np * sizeof(float));
        for (size_t i = 0; i < np; i++) P[i] = G[i] = 7.0f;
        dsmoe_moe_buffers b = {P, G, NULL, 0};
        dsmoe__moe_alloc_fail_at = dsmoe__moe_alloc_calls + 2; /* bias, then the state */
        ASSERT_STATUS(dsmoe_moe_create_with(&c, &b, &m), DSMOE_STATUS_OUT_OF_MEMORY);
        dsmoe__moe_alloc_fail_at = 0;
        int same = 1;
        for (size_t i = 0; i < np; i++) same &= P[i] == 7.0f && G[i] == 7.0f;
        ASSERT_TRUE(same);
        dsmoe_free(P);
        dsmoe_free(G);
    }
    /* and in reserve: the layer stays as it was */
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    if (!m) return;
    dsmoe__moe_alloc_fail_at = dsmoe__moe_alloc_calls + 2;
    ASSERT_STATUS(dsmoe_moe_reserve(m, 500, 0), DSMOE_STATUS_OUT_OF_MEMORY);
    dsmoe__moe_alloc_fail_at = 0;
    ASSERT_EQ_INT(dsmoe_moe_get_config(m)->max_tokens, 40);
    float x[12] = {1}, y[12];
    ASSERT_OK(dsmoe_moe_forward(m, y, x, 1, 1));
    dsmoe_moe_free(m);
}

/* NaN or Inf in any weight (F32, BF16, F16 files) is refused naming the tensor and the
 * element; the layer is unchanged. */
static void test_nonfinite_weights(void) {
    tl_seed(7);
    dsmoe_moe_config c = cfg_of(12, 6, 8, 2, 2, 1, 1, 0);
    dsmoe_moe *src = NULL, *m = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &src));
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    if (!src || !m) goto done;
    dsmoe_moe_init_random(src, 31);
    dsmoe_moe_init_random(m, 32);
    const char *path = tl_tmp("moe_api_nan.safetensors");
    const dsmoe_dtype dts[3] = {DSMOE_DTYPE_F32, DSMOE_DTYPE_BF16, DSMOE_DTYPE_F16};
    const float bads[3] = {NAN, INFINITY, -INFINITY};
    for (int k = 0; k < 3; k++) {
        /* every tensor in dtype dts[k]; experts.5.up_proj.weight (2, 7) non-finite */
        dsmoe_safetensors_writer *wr = NULL;
        ASSERT_OK(dsmoe_safetensors_writer_create(&wr));
        void *bufs[64] = {0};
        for (int64_t i = 0; i < dsmoe_moe_tensor_count(src) && i < 64; i++) {
            dsmoe_moe_tensor t;
            dsmoe_moe_tensor_at(src, i, &t);
            const size_t n = (size_t)(t.shape[0] * (t.ndim > 1 ? t.shape[1] : 1));
            const dsmoe_dtype dt = t.trainable ? dts[k] : DSMOE_DTYPE_F32;
            bufs[i] = malloc(n * 4);
            for (size_t j = 0; j < n; j++) {
                float v = ((const float *)t.data)[j];
                if (strcmp(t.name, "experts.5.up_proj.weight") == 0 && j == 2 * 12 + 7) v = bads[k];
                if (dt == DSMOE_DTYPE_F32) ((float *)bufs[i])[j] = v;
                else if (dt == DSMOE_DTYPE_BF16) ((uint16_t *)bufs[i])[j] = dsmoe_f32_to_bf16(v);
                else ((uint16_t *)bufs[i])[j] = dsmoe_f32_to_f16(v);
            }
            ASSERT_OK(dsmoe_safetensors_writer_add(wr, t.name, dt, t.ndim, t.shape, bufs[i]));
        }
        ASSERT_OK(dsmoe_safetensors_writer_save(wr, path));
        dsmoe_safetensors_writer_free(wr);
        for (int i = 0; i < 64; i++) free(bufs[i]);
        dsmoe_safetensors *st = NULL;
        ASSERT_OK(dsmoe_safetensors_open(path, &st));
        if (!st) continue;
        size_t n = 0;
        const float *p = dsmoe_moe_params(m, &n);
        float *keep = (float *)malloc(n * sizeof(float));
        memcpy(keep, p, n * sizeof(float));
        ASSERT_STATUS(dsmoe_moe_load_safetensors(m, st, ""), DSMOE_STATUS_NON_FINITE);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "'experts.5.up_proj.weight': element (2, 7)") !=
                    NULL);
        ASSERT_TRUE(memcmp(keep, p, n * sizeof(float)) == 0);
        ASSERT_STATUS(dsmoe_moe_check_safetensors(&c, st, ""), DSMOE_STATUS_NON_FINITE);
        dsmoe_moe *l = (dsmoe_moe *)(uintptr_t)1;
        ASSERT_STATUS(dsmoe_moe_load_from(st, "", &c, &l), DSMOE_STATUS_NON_FINITE);
        ASSERT_TRUE(l == NULL);
        free(keep);
        dsmoe_safetensors_close(st);
    }
done:
    dsmoe_moe_free(src);
    dsmoe_moe_free(m);
}

/* ------------------------------------------------------------ chunks -- */

/* dsmoe_moe_forward_chunked over T = 45 tokens with max_tokens 8 is the sequence of
 * per-chunk forwards (same bits), and its counts are the histogram of its indices. */
static void test_forward_chunked(void) {
    tl_seed(8);
    dsmoe_moe_config c = cfg_of(12, 6, 8, 2, 2, 1, 1, 0);
    c.max_tokens = 8;
    dsmoe_moe *m = NULL, *ref = NULL;
    ASSERT_OK(dsmoe_moe_create(&c, &m));
    ASSERT_OK(dsmoe_moe_create(&c, &ref));
    if (!m || !ref) goto done;
    dsmoe_moe_init_random(m, 41);
    dsmoe_moe_init_random(ref, 41);
    const int64_t T = 45, D = 12, K = 2, E = 8;
    float *x = rand_buf((size_t)(T * D), 1.0), *y = rand_buf((size_t)(T * D), 0);
    float *yr = rand_buf((size_t)(T * D), 0), *lg = rand_buf((size_t)(T * E), 0);
    float *w = rand_buf((size_t)(T * K), 0);
    int32_t idx[90];
    int64_t counts[8], hist[8] = {0};
    dsmoe_moe_routing_out r = {idx, w, NULL, lg, counts, -1};
    ASSERT_OK(dsmoe_moe_forward_chunked(m, y, x, T, 2, &r));
    ASSERT_EQ_INT(r.n_dropped, 0);
    for (int64_t t0 = 0; t0 < T; t0 += 8) {
        const int64_t n = T - t0 < 8 ? T - t0 : 8;
        ASSERT_OK(dsmoe_moe_forward(ref, yr + t0 * D, x + t0 * D, n, 1));
        const dsmoe_moe_routing *ro = dsmoe_moe_last_routing(ref);
        ASSERT_TRUE(memcmp(ro->indices, idx + t0 * K, (size_t)(n * K) * sizeof(int32_t)) == 0);
        tl_same_bits("chunked: weights", ro->weights, w + t0 * K, n * K);
        tl_same_bits("chunked: logits", ro->logits, lg + t0 * E, n * E);
    }
    tl_same_bits("chunked: y", y, yr, T * D);
    for (int64_t i = 0; i < T * K; i++) hist[idx[i]]++;
    ASSERT_TRUE(memcmp(hist, counts, sizeof hist) == 0);
    /* y only */
    ASSERT_OK(dsmoe_moe_forward_chunked(m, y, x, T, 1, NULL));
    tl_same_bits("chunked without routing: y", y, yr, T * D);
    /* a NaN in the third chunk: the message names the chunk */
    x[(20 * D) + 3] = NAN;
    ASSERT_STATUS(dsmoe_moe_forward_chunked(m, y, x, T, 1, &r), DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "tokens 16..23") != NULL);
    ASSERT_STATUS(dsmoe_moe_forward_chunked(m, y, x, -1, 1, &r), DSMOE_STATUS_INVALID_ARGUMENT);
    free(x);
    free(y);
    free(yr);
    free(lg);
    free(w);
done:
    dsmoe_moe_free(m);
    dsmoe_moe_free(ref);
}

static void test_find_prefix_none(void) {
    const spec s[] = {{"model.embed.weight", DSMOE_DTYPE_F32, 4, 4},
                      {"model.layers.0.mlp.gate.weight", DSMOE_DTYPE_F32, 4, 4}};
    const char *path = tl_tmp("moe_api_nolayer.safetensors");
    write_zeros(path, s, 2);
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(path, &st));
    if (!st) return;
    char p[64];
    int64_t n = -1;
    ASSERT_EQ_INT(dsmoe_moe_layer_count(st), 0);
    ASSERT_STATUS(dsmoe_moe_find_prefix(st, p, sizeof p, &n), DSMOE_STATUS_NOT_FOUND);
    ASSERT_EQ_INT(n, 0);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "no MoE layer") != NULL);
    dsmoe_safetensors_close(st);
}

int main(void) {
    RUN(test_param_count_and_caller_buffers);
    RUN(test_caller_buffers_sparse_values);
    RUN(test_buffer_errors);
    RUN(test_shared_workspace_inference);
    RUN(test_shared_workspace_training);
    RUN(test_routing_survives_reserve);
    RUN(test_many_layers_one_file);
    RUN(test_saved_config_errors);
    RUN(test_crafted_claims_allocate_nothing);
    RUN(test_create_allocation_failures);
    RUN(test_nonfinite_weights);
    RUN(test_forward_chunked);
    RUN(test_find_prefix_none);
    return TEST_SUMMARY();
}
