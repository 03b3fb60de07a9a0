/*
 * test_model_golden.c — the forward building blocks of src/model/blocks.c against the
 * independent fp64 reference (tests/ref/model_ref.py, files by gen_model_golden.py) on
 * every golden model directory: RoPE / YaRN frequencies, layer 0's attention (RMSNorm +
 * naive MLA: q_lora_rank with and without, YaRN on and off, adjacent-pair rotation over
 * T >= 9 positions), then the whole stack composed here from the blocks, the dense SwiGLU
 * and the library's MoE layer (dsmoe_moe_*): the residual stream after every layer and
 * the logits at every position. The twins (one model's weights laid out otherwise:
 * sharded / one file, with / without the stored MTP layer, fp8 blocks / dequantized F32)
 * have byte-identical golden logits and give bit-identical results here.
 */
#include "model/model_internal.h"
#include "model_testutil.h"

#include <math.h>

static double maxabs(const double *a, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs(a[i]));
    return m;
}

/* fp32 blocks against fp64: errors relative to the array's scale (max |ref|, at least 1).
 * Observed maxima are below 5e-7 of it (attention 2e-7, logits 3e-7 of their scale); the
 * bounds, 1e-5 and 2e-5 for the logits, leave a factor of 20 or more. */
static int close_to(const char *what, const float *got, const double *ref, int64_t n, double rel) {
    double s = maxabs(ref, n);
    return tl_allclose(what, got, ref, n, rel * (s > 1 ? s : 1), rel);
}

/* A tensor widened to fp32 (malloc'd). */
static float *weight(const dsmoe_model_files *mf, const char *name) {
    dsmoe_model_tensor_info t;
    if (dsmoe_model_files_get(mf, name, &t) != DSMOE_OK) {
        TL_FAIL("%s", dsmoe_last_error());
        return NULL;
    }
    int64_t n = t.shape[0] * (t.ndim == 2 ? t.shape[1] : 1);
    float *w = (float *)malloc((size_t)n * sizeof *w);
    if (dsmoe_model_files_read_f32(mf, name, w) != DSMOE_OK) TL_FAIL("%s", dsmoe_last_error());
    return w;
}

/* The same for "model.layers.<l>.<what>". */
static float *lweight(const dsmoe_model_files *mf, int32_t l, const char *what) {
    char name[DSMOE_MODEL_NAME_MAX];
    snprintf(name, sizeof name, "model.layers.%d.%s", (int)l, what);
    return weight(mf, name);
}

typedef struct layer_w {
    dsmoe__mla_weights a;
    float *own[8];
    float *in_norm, *post_norm;
} layer_w;

static void layer_load(layer_w *L, const dsmoe_model_files *mf, const dsmoe_model_config *c, int32_t l) {
    memset(L, 0, sizeof *L);
    int k = 0;
    if (c->q_lora_rank > 0) {
        L->a.q_a_proj = L->own[k++] = lweight(mf, l, "self_attn.q_a_proj.weight");
        L->a.q_a_norm = L->own[k++] = lweight(mf, l, "self_attn.q_a_layernorm.weight");
        L->a.q_b_proj = L->own[k++] = lweight(mf, l, "self_attn.q_b_proj.weight");
    } else {
        L->a.q_proj = L->own[k++] = lweight(mf, l, "self_attn.q_proj.weight");
    }
    L->a.kv_a_proj = L->own[k++] = lweight(mf, l, "self_attn.kv_a_proj_with_mqa.weight");
    L->a.kv_a_norm = L->own[k++] = lweight(mf, l, "self_attn.kv_a_layernorm.weight");
    L->a.kv_b_proj = L->own[k++] = lweight(mf, l, "self_attn.kv_b_proj.weight");
    L->a.o_proj = L->own[k++] = lweight(mf, l, "self_attn.o_proj.weight");
    L->in_norm = lweight(mf, l, "input_layernorm.weight");
    L->post_norm = lweight(mf, l, "post_attention_layernorm.weight");
}

static void layer_free(layer_w *L) {
    for (int k = 0; k < 8; k++) free(L->own[k]);
    free(L->in_norm);
    free(L->post_norm);
}

/* The MoE layer of layer l, filled from the files through the layer's tensor table. */
static dsmoe_moe *moe_load(const dsmoe_model_files *mf, const dsmoe_model_config *c, int32_t l, int64_t T) {
    dsmoe_moe_config mc;
    ASSERT_OK(dsmoe_model_moe_config(c, &mc));
    mc.max_tokens = T;
    mc.n_threads = 1;
    dsmoe_moe *moe = NULL;
    ASSERT_OK(dsmoe_moe_create(&mc, &moe));
    if (!moe) return NULL;
    for (int64_t i = 0; i < dsmoe_moe_tensor_count(moe); i++) {
        dsmoe_moe_tensor t;
        char name[DSMOE_MODEL_NAME_MAX + 64];
        ASSERT_OK(dsmoe_moe_tensor_at(moe, i, &t));
        snprintf(name, sizeof name, "model.layers.%d.mlp.%s", (int)l, t.name);
        if (!t.trainable) { /* the correction bias: a buffer, set through its setter */
            float *b = weight(mf, name);
            ASSERT_OK(dsmoe_moe_set_bias(moe, b));
            free(b);
            continue;
        }
        ASSERT_EQ_INT(t.dtype, DSMOE_DTYPE_F32);
        ASSERT_OK(dsmoe_model_files_read_f32(mf, name, (float *)t.data));
    }
    return moe;
}

/* The composed stack on golden case `name` against its reference files; returns the
 * stack's logits (malloc'd, *n_out elements) or NULL. */
static float *run_case(const char *name, int64_t *n_out) {
    char dir[512], path[700];
    float *out = NULL;
    *n_out = 0;
    snprintf(dir, sizeof dir, "%s%s", MT_GOLDEN, name);
    dsmoe_model_config c;
    dsmoe_model_files *mf = NULL;
    ASSERT_OK(dsmoe_model_config_from_dir(dir, &c));
    ASSERT_OK(dsmoe_model_files_open(dir, &c, &mf));
    if (!mf) return NULL;
    const int32_t D = c.hidden_size, V = c.vocab_size, half = c.qk_rope_head_dim / 2;
    int64_t T, n;
    snprintf(path, sizeof path, "%s/tokens.npy", dir);
    double *tok = mt_npy64(path, &T);
    ASSERT_TRUE(T >= 9);
    snprintf(path, sizeof path, "%s/inv_freq.npy", dir);
    int64_t nf;
    double *f_ref = mt_npy64(path, &nf);
    ASSERT_EQ_INT(nf, half);
    snprintf(path, sizeof path, "%s/attn0.npy", dir);
    double *attn_ref = mt_npy64(path, &n);
    snprintf(path, sizeof path, "%s/hidden.npy", dir);
    double *hid_ref = mt_npy64(path, &n);
    ASSERT_EQ_INT(n, (int64_t)(c.num_hidden_layers + 1) * T * D);
    snprintf(path, sizeof path, "%s/logits.npy", dir);
    double *logit_ref = mt_npy64(path, &n);
    ASSERT_EQ_INT(n, T * V);
    if (!tok || !f_ref || !attn_ref || !hid_ref || !logit_ref || T < 9) goto done;

    /* RoPE frequencies (YaRN's ramp included) in double. */
    double f[512] = {0};
    ASSERT_TRUE(half <= 512);
    if (half <= 512) dsmoe__rope_inv_freq(f, &c);
    for (int64_t i = 0; i < half && i < nf; i++) ASSERT_NEAR(f[i], f_ref[i], 1e-15 * f_ref[i]);

    size_t ws_size = dsmoe__mla_workspace_size(&c, T);
    void *ws = malloc(ws_size);
    float *h = (float *)calloc((size_t)(T * D), sizeof *h);
    float *x = (float *)calloc((size_t)(T * D), sizeof *x);
    float *y = (float *)calloc((size_t)(T * D), sizeof *y);
    float *scratch = (float *)calloc((size_t)(2 * T * c.intermediate_size), sizeof *scratch);
    float *emb = weight(mf, "model.embed_tokens.weight");
    for (int64_t t = 0; t < T; t++) memcpy(h + t * D, emb + (int64_t)tok[t] * D, (size_t)D * sizeof *h);
    ASSERT_TRUE(close_to("embedding", h, hid_ref, T * D, 0));

    /* The whole stack, layer by layer. */
    for (int32_t l = 0; l < c.num_hidden_layers; l++) {
        char what[64];
        layer_w L;
        layer_load(&L, mf, &c, l);
        dsmoe__rmsnorm(x, h, L.in_norm, T, D, D, D, c.rms_norm_eps);
        ASSERT_OK(dsmoe__mla_forward(&c, &L.a, y, x, T, ws, ws_size));
        if (l == 0) close_to("attention of layer 0", y, attn_ref, T * D, 1e-5);
        for (int64_t k = 0; k < T * D; k++) h[k] += y[k];
        dsmoe__rmsnorm(x, h, L.post_norm, T, D, D, D, c.rms_norm_eps);
        if (dsmoe_model_layer_is_moe(&c, l)) {
            dsmoe_moe *moe = moe_load(mf, &c, l, T);
            if (moe) ASSERT_OK(dsmoe_moe_forward(moe, y, x, T, 1));
            dsmoe_moe_free(moe);
        } else {
            float *g = lweight(mf, l, "mlp.gate_proj.weight");
            float *u = lweight(mf, l, "mlp.up_proj.weight");
            float *dn = lweight(mf, l, "mlp.down_proj.weight");
            dsmoe__swiglu(y, x, g, u, dn, T, D, c.intermediate_size, scratch);
            free(g);
            free(u);
            free(dn);
        }
        for (int64_t k = 0; k < T * D; k++) h[k] += y[k];
        snprintf(what, sizeof what, "hidden after layer %d (%s)", (int)l,
                 dsmoe_model_layer_is_moe(&c, l) ? "MoE" : "dense");
        close_to(what, h, hid_ref + (int64_t)(l + 1) * T * D, T * D, 1e-5);
        layer_free(&L);
    }
    float *fn = weight(mf, "model.norm.weight");
    float *head = c.tie_word_embeddings ? emb : weight(mf, "lm_head.weight");
    float *logits = (float *)calloc((size_t)(T * V), sizeof *logits);
    dsmoe__rmsnorm(x, h, fn, T, D, D, D, c.rms_norm_eps);
    for (int64_t t = 0; t < T; t++)
        for (int32_t v = 0; v < V; v++) {
            float acc = 0.0f;
            for (int32_t k = 0; k < D; k++) acc += x[t * D + k] * head[(int64_t)v * D + k];
            logits[t * V + v] = acc;
        }
    close_to("logits", logits, logit_ref, T * V, 2e-5);
    out = logits;
    *n_out = T * V;
    if (head != emb) free(head);
    free(fn);
    free(emb);
    free(scratch);
    free(h);
    free(x);
    free(y);
    free(ws);
done:
    free(tok);
    free(f_ref);
    free(attn_ref);
    free(hid_ref);
    free(logit_ref);
    dsmoe_model_files_close(mf);
    return out;
}

#define CASES "v3_yarn_q\nv2_glg_sharded\nmoonlight_freq\nfp8_blocks\nv2lite_greedy\n" \
              "v3_dense_moe\nv2_glg_single\nv3_yarn_q_nomtp\nfp8_blocks_f32\n"

/* The MANIFEST lists exactly these cases (the whole-model tests run on each of them). */
static void test_manifest(void) {
    size_t len;
    char *m = mt_read(MT_GOLDEN "MANIFEST", &len);
    ASSERT_TRUE(m != NULL);
    if (!m) return;
    if (strcmp(m, CASES) != 0) TL_FAIL("MANIFEST is\n%s", m);
    free(m);
}

/* The composed stack on every case of the MANIFEST. */
static void test_every_case(void) {
    size_t len;
    char *m = mt_read(MT_GOLDEN "MANIFEST", &len);
    ASSERT_TRUE(m != NULL);
    int cases = 0;
    for (char *line = m, *nl; line && *line; line = nl + 1) {
        nl = strchr(line, '\n');
        if (!nl) break;
        *nl = '\0';
        int before = tl_failures;
        int64_t n;
        free(run_case(line, &n));
        if (tl_failures != before) fprintf(stderr, "  (in case %s)\n", line);
        cases++;
    }
    ASSERT_EQ_INT(cases, 9);
    free(m);
}

/* The stored dtype of a tensor of case `name`, into buf; the shard and MTP counts. */
static void layout(const char *name, const char *tensor, char *buf, size_t cap, int32_t *shards,
                   int32_t *mtp) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s%s", MT_GOLDEN, name);
    dsmoe_model_config c;
    dsmoe_model_files *mf = NULL;
    buf[0] = '\0';
    *shards = *mtp = -1;
    ASSERT_OK(dsmoe_model_config_from_dir(dir, &c));
    ASSERT_OK(dsmoe_model_files_open(dir, &c, &mf));
    if (!mf) return;
    dsmoe_model_tensor_info t;
    ASSERT_OK(dsmoe_model_files_get(mf, tensor, &t));
    snprintf(buf, cap, "%s", t.stored_dtype);
    *shards = dsmoe_model_files_shard_count(mf);
    *mtp = dsmoe_model_files_mtp_depths(mf);
    dsmoe_model_files_close(mf);
}

/* Cases a and b hold the same model: identical golden tokens and logits files, both
 * load, and the stack gives the same bits on both. */
static void check_twins(const char *a, const char *b) {
    static const char *const files[] = {"tokens.npy", "logits.npy", "hidden.npy"};
    for (int k = 0; k < 3; k++) {
        char pa[700], pb[700];
        size_t la, lb;
        snprintf(pa, sizeof pa, "%s%s/%s", MT_GOLDEN, a, files[k]);
        snprintf(pb, sizeof pb, "%s%s/%s", MT_GOLDEN, b, files[k]);
        char *ta = mt_read(pa, &la), *tb = mt_read(pb, &lb);
        ASSERT_TRUE(ta != NULL && tb != NULL);
        if (ta && tb && (la != lb || memcmp(ta, tb, la) != 0))
            TL_FAIL("%s and %s: %s differ", a, b, files[k]);
        free(ta);
        free(tb);
    }
    int64_t na, nb;
    float *ya = run_case(a, &na), *yb = run_case(b, &nb);
    ASSERT_TRUE(ya != NULL && yb != NULL);
    ASSERT_EQ_INT(na, nb);
    if (ya && yb && na == nb && memcmp(ya, yb, (size_t)na * sizeof *ya) != 0)
        TL_FAIL("%s and %s: the stack's logits differ", a, b);
    free(ya);
    free(yb);
}

static void test_sharded_single(void) {
    char da[32], db[32];
    int32_t sa, sb, ma, mb;
    layout("v2_glg_sharded", "model.layers.1.mlp.experts.0.down_proj.weight", da, sizeof da, &sa, &ma);
    layout("v2_glg_single", "model.layers.1.mlp.experts.0.down_proj.weight", db, sizeof db, &sb, &mb);
    ASSERT_EQ_INT(sa, 3);
    ASSERT_EQ_INT(sb, 1);
    ASSERT_TRUE(strcmp(da, "BF16") == 0 && strcmp(db, "BF16") == 0);
    check_twins("v2_glg_sharded", "v2_glg_single");
}

static void test_mtp_ignored(void) {
    char da[32], db[32];
    int32_t sa, sb, ma, mb;
    layout("v3_yarn_q", "model.norm.weight", da, sizeof da, &sa, &ma);
    layout("v3_yarn_q_nomtp", "model.norm.weight", db, sizeof db, &sb, &mb);
    ASSERT_EQ_INT(ma, 1);
    ASSERT_EQ_INT(mb, 0);
    check_twins("v3_yarn_q", "v3_yarn_q_nomtp");
}

static void test_fp8_dequantized(void) {
    char da[32], db[32];
    int32_t sa, sb, ma, mb;
    layout("fp8_blocks", "model.layers.0.mlp.gate_proj.weight", da, sizeof da, &sa, &ma);
    layout("fp8_blocks_f32", "model.layers.0.mlp.gate_proj.weight", db, sizeof db, &sb, &mb);
    ASSERT_TRUE(strcmp(da, "F8_E4M3") == 0);
    ASSERT_TRUE(strcmp(db, "F32") == 0);
    check_twins("fp8_blocks", "fp8_blocks_f32");
}

static void test_mla_arguments(void) {
    dsmoe_model_config c;
    char path[512];
    snprintf(path, sizeof path, "%sv3_yarn_q", MT_GOLDEN);
    ASSERT_OK(dsmoe_model_config_from_dir(path, &c));
    dsmoe__mla_weights w;
    memset(&w, 0, sizeof w);
    float x[23], y[23];
    char ws[64];
    ASSERT_STATUS(dsmoe__mla_forward(&c, &w, y, x, 1, ws, sizeof ws), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "q_a_proj") != NULL);
    static float dummy[4096];
    w.q_a_proj = w.q_a_norm = w.q_b_proj = w.kv_a_proj = w.kv_a_norm = w.kv_b_proj = w.o_proj = dummy;
    ASSERT_STATUS(dsmoe__mla_forward(&c, &w, y, x, 1, ws, sizeof ws), DSMOE_STATUS_WORKSPACE_TOO_SMALL);
    ASSERT_TRUE(dsmoe__mla_workspace_size(&c, 7) > dsmoe__mla_workspace_size(&c, 1));
}

int main(void) {
    RUN(test_manifest);
    RUN(test_every_case);
    RUN(test_sharded_single);
    RUN(test_mtp_ignored);
    RUN(test_fp8_dequantized);
    RUN(test_mla_arguments);
    return TEST_SUMMARY();
}
