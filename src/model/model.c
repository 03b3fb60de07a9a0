/*
 * model.c — the whole model (dsmoe_model): a model directory opened with every weight
 * as stored, a cache of compressed latents per sequence, and the forward pass
 * (SPEC-model §1–§6):
 *
 *   h = embed_tokens[tokens]                                     (T, D)
 *   for l < L:  h += MLA_l(RMSNorm(h));  h += FFN_l(RMSNorm(h))   dense SwiGLU or MoE
 *   logits = head(RMSNorm(h))                                    head = embed when tied
 *
 * and, with dsmoe_model_options.mtp, the MTP depths (dsmoe_model_forward_mtp): depth k's
 * block is layers[L + k − 1], run on eh_proj [enorm(embed_k(t)) ; hnorm(h^{k−1})] with a
 * cache of its own (one layer), then shared_head.norm and shared_head.head.
 *
 * MLA here writes each new token's normalised latent and rotated k_pe into the cache
 * (the only per-position state) and attends through attention.c, naive or absorbed.
 * Products with stored weights go through dsmoe__wlinear (kernels/wlinear.h): F32,
 * BF16, F16 and F8_E4M3 with block scales widen as they stream. kv_b_proj is widened
 * to fp32 at open (the attention reads its per-head slices by rows and by columns), as
 * are the norm weights. MoE layers all BF16 or all F32 are dsmoe_moe layers on one
 * parameter buffer and one shared scratch, in the packed layout; others (F8 or F16
 * experts) run from the stored weights (moe_views.c).
 *
 * Memory: everything a forward needs is allocated at open (chunk scratch for
 * max_tokens tokens) or at cache creation (the cache, and the attention scratch for its
 * capacity); dsmoe_model_forward allocates nothing.
 */
#include "kernels/kernels.h"
#include "kernels/wlinear.h"
#include "model/model_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One layer's weights. */
typedef struct mlayer {
    dsmoe__wmat q_proj;                  /* (H(n+r), D) when q_lora_rank == 0 */
    dsmoe__wmat q_a, q_b;                /* (q, D), (H(n+r), q) otherwise */
    dsmoe__wmat kv_a;                    /* (c + r, D) */
    dsmoe__wmat o_proj;                  /* (D, H v) */
    float *q_a_norm, *kv_a_norm;         /* (q), (c) */
    float *in_norm, *post_norm;          /* (D), (D) */
    float *kv_b;                         /* (H(n+v), c) fp32 */
    dsmoe__wmat gate, up, down;          /* dense: (I, D), (I, D), (D, I) */
    dsmoe_moe *moe;                      /* MoE layers held by a dsmoe_moe layer, or */
    dsmoe__moe_views *views;             /* MoE layers run from the stored weights */
} mlayer;

/* One MTP depth's own tensors (its block is layers[L + k − 1]). */
typedef struct mdepth {
    dsmoe__wmat embed, head;       /* (V, D) each: embed_tokens, shared_head.head */
    dsmoe__wmat eh_proj;           /* (D, 2D) */
    float *enorm, *hnorm, *sh_norm; /* (D) each */
} mdepth;

struct dsmoe_model {
    dsmoe_model_config cfg;
    dsmoe_model_files *mf;
    int nt;      /* threads */
    int64_t Tm;  /* tokens per chunk */
    int widen;
    dsmoe__wmat embed, head; /* (V, D) each */
    float *final_norm;       /* (D) */
    mlayer *layers;          /* (L + Dm): the main layers, then the MTP depths' blocks */
    int32_t Dm;              /* MTP depths loaded */
    mdepth *depths;          /* (Dm) */
    float **owned;           /* widened tensors */
    int64_t n_owned, cap_owned;
    void *moe_params, *moe_ws;
    size_t moe_ws_size;
    dsmoe_router_config rc; /* the router of the MoE layers */
    void *views_ws;         /* scratch of the layers run from stored weights */
    size_t views_ws_size;
    double *inv_freq; /* (r/2) */
    float scale;
    /* chunk scratch (one allocation) */
    void *scratch;
    float *h, *x, *y;   /* (Tm, D) */
    float *q;           /* (Tm, H(n+r)) */
    float *qa;          /* (Tm, q) */
    float *att;         /* (Tm, H v) */
    float *ffn;         /* (2, Tm, I) */
    float *cs;          /* (Tm, r/2, 2) */
    float *cat;         /* (Tm, 2D) an MTP depth's [enorm(embed) ; hnorm(h)], or NULL */
    void *wl;           /* nt · dsmoe__wlinear_scratch(max_cols, Tm) */
    size_t max_cols;
};

struct dsmoe_model_cache {
    const dsmoe_model *m;
    int32_t depth;      /* 0: the main model's; k: MTP depth k's */
    int32_t layer0, nl; /* the model layers it holds: layer0 .. layer0 + nl − 1 */
    int64_t cap, len;
    float *kv;          /* (nl, cap, c + r) */
    float *scratch;     /* (nt, per_thread) attention scratch */
    size_t per_thread;
};

void dsmoe_model_options_default(dsmoe_model_options *opts) {
    if (!opts) return;
    opts->n_threads = 0;
    opts->max_tokens = 256;
    opts->widen_f32 = 0;
    opts->mtp = 0;
}

/* ------------------------------------------------------------ loading -- */

static float *own(dsmoe_model *m, size_t n) {
    if (m->n_owned == m->cap_owned) {
        int64_t nc = m->cap_owned ? 2 * m->cap_owned : 64;
        float **g = (float **)realloc(m->owned, (size_t)nc * sizeof *g);
        if (!g) return NULL;
        m->owned = g;
        m->cap_owned = nc;
    }
    float *p = (float *)dsmoe_malloc(n * sizeof(float));
    if (p) m->owned[m->n_owned++] = p;
    return p;
}

/* A tensor widened to fp32 into memory the model owns (NON_FINITE checked). */
static dsmoe_status load_f32(dsmoe_model *m, const char *name, float **out) {
    dsmoe_model_tensor_info ti;
    dsmoe_status s = dsmoe_model_files_get(m->mf, name, &ti);
    if (s != DSMOE_OK) return s;
    size_t n = (size_t)ti.shape[0] * (size_t)(ti.ndim == 2 ? ti.shape[1] : 1);
    float *p = own(m, n);
    if (!p) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "model: %zu floats for %s", n, name);
    *out = p;
    return dsmoe_model_files_read_f32(m->mf, name, p);
}

/* A matrix as a product operand: the stored data (every element checked finite), or
 * fp32 with widen_f32. row: scratch of cols floats. */
static dsmoe_status load_mat(dsmoe_model *m, const char *name, dsmoe__wmat *w, float *row) {
    dsmoe_status s = dsmoe__model_files_view(m->mf, name, w);
    if (s != DSMOE_OK) return s;
    if ((size_t)w->cols > m->max_cols) m->max_cols = (size_t)w->cols;
    if (m->widen) {
        const int64_t rows = w->rows, cols = w->cols;
        float *p = NULL;
        if ((s = load_f32(m, name, &p)) != DSMOE_OK) return s;
        memset(w, 0, sizeof *w);
        w->data = p;
        w->rows = rows;
        w->cols = cols;
        w->type = DSMOE__WT_F32;
        return DSMOE_OK;
    }
    for (int64_t i = 0; i < w->rows; i++) {
        dsmoe__wmat_widen(row, w, i, i + 1);
        for (int64_t k = 0; k < w->cols; k++)
            if (!isfinite(row[k]))
                return dsmoe__error(DSMOE_STATUS_NON_FINITE,
                                    "tensor %s: element %lld (row %lld, column %lld) is %g", name,
                                    (long long)i * (long long)w->cols + (long long)k, (long long)i,
                                    (long long)k,
                                    (double)row[k]);
    }
    return DSMOE_OK;
}

static dsmoe_status lname(char *buf, size_t cap, int32_t l, const char *what) {
    int k = snprintf(buf, cap, "model.layers.%d.%s", (int)l, what);
    if (k < 0 || (size_t)k >= cap)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "model: tensor name too long");
    return DSMOE_OK;
}

/* 1 if every weight matrix of MoE layer l is stored as `dtype` ("BF16", "F32"). */
static int moe_all(const dsmoe_model *m, int32_t l, const dsmoe_moe_config *mc, const char *dtype) {
    const int64_t E = mc->router.n_experts, Ns = mc->n_shared;
    char name[DSMOE_MODEL_NAME_MAX + 64], what[64];
    static const char *const parts[3] = {"gate_proj", "up_proj", "down_proj"};
    for (int64_t e = -1; e <= E; e++) {
        for (int p = 0; p < 3; p++) {
            if (e == -1 && p > 0) break;
            if (e == E && Ns == 0) break;
            if (e == -1) snprintf(what, sizeof what, "mlp.gate.weight");
            else if (e == E) snprintf(what, sizeof what, "mlp.shared_experts.%s.weight", parts[p]);
            else snprintf(what, sizeof what, "mlp.experts.%lld.%s.weight", (long long)e, parts[p]);
            if (lname(name, sizeof name, l, what) != DSMOE_OK) return 0;
            dsmoe_model_tensor_info ti;
            if (dsmoe_model_files_get(m->mf, name, &ti) != DSMOE_OK) return 0;
            if (strcmp(ti.stored_dtype, dtype) != 0) return 0;
        }
    }
    return 1;
}

/* The MoE layer config of layer l as the model runs it. */
static void moe_layer_config(const dsmoe_model *m, int32_t l, dsmoe_moe_config *mc) {
    dsmoe_model_moe_config(&m->cfg, mc);
    mc->max_tokens = m->Tm;
    mc->n_threads = m->nt;
    mc->weight_layout = DSMOE_MOE_LAYOUT_PACKED;
    mc->weight_dtype = !m->widen && moe_all(m, l, mc, "BF16") ? DSMOE_DTYPE_BF16 : DSMOE_DTYPE_F32;
}

/* 1 if MoE layer l runs from its stored weights: not widened, and its matrices are not
 * all BF16 or all F32 (the dtypes a dsmoe_moe layer holds), e.g. F8_E4M3 or F16 experts. */
static int moe_from_views(const dsmoe_model *m, int32_t l) {
    if (m->widen) return 0;
    dsmoe_moe_config mc;
    dsmoe_model_moe_config(&m->cfg, &mc);
    return !moe_all(m, l, &mc, "BF16") && !moe_all(m, l, &mc, "F32");
}

static void views_free(dsmoe__moe_views *v) {
    if (!v) return;
    free(v->experts);
    free(v);
}

/* MoE layer l as views of its stored matrices (each checked finite). row: scratch of
 * max(D, F, N_s F) floats. */
static dsmoe_status views_setup(dsmoe_model *m, int32_t l, float *row) {
    const dsmoe_model_config *c = &m->cfg;
    const int64_t E = c->n_routed_experts;
    dsmoe__moe_views *v = (dsmoe__moe_views *)calloc(1, sizeof *v);
    if (v) v->experts = (dsmoe__wmat *)calloc((size_t)(3 * E), sizeof *v->experts);
    if (!v || !v->experts) {
        views_free(v);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "model: MoE layer %d", (int)l);
    }
    m->layers[l].views = v;
    static const char *const parts[3] = {"gate_proj", "up_proj", "down_proj"};
    char name[DSMOE_MODEL_NAME_MAX + 64], what[96];
    dsmoe_status s = lname(name, sizeof name, l, "mlp.gate.weight");
    if (s == DSMOE_OK) s = load_mat(m, name, &v->gate, row);
    if (s == DSMOE_OK && m->rc.use_bias &&
        (s = lname(name, sizeof name, l, "mlp.gate.e_score_correction_bias")) == DSMOE_OK)
        s = load_f32(m, name, &v->bias);
    for (int64_t e = 0; e < E && s == DSMOE_OK; e++)
        for (int p = 0; p < 3 && s == DSMOE_OK; p++) {
            snprintf(what, sizeof what, "mlp.experts.%lld.%s.weight", (long long)e, parts[p]);
            if ((s = lname(name, sizeof name, l, what)) == DSMOE_OK)
                s = load_mat(m, name, &v->experts[3 * e + p], row);
        }
    for (int p = 0; p < 3 && s == DSMOE_OK && c->n_shared_experts > 0; p++) {
        snprintf(what, sizeof what, "mlp.shared_experts.%s.weight", parts[p]);
        if ((s = lname(name, sizeof name, l, what)) == DSMOE_OK)
            s = load_mat(m, name, &v->shared[p], row);
    }
    if (s == DSMOE_OK && v->bias)
        for (int64_t e = 0; e < E; e++)
            if (!isfinite(v->bias[e]))
                return dsmoe__error(DSMOE_STATUS_NON_FINITE,
                                    "tensor model.layers.%d.mlp.gate.e_score_correction_bias: "
                                    "element %lld is not finite", (int)l, (long long)e);
    return s;
}

/* Fills MoE layer l from the files. tmp: max(F, N_s F, E) · D floats (packing). */
static dsmoe_status moe_fill(dsmoe_model *m, int32_t l, dsmoe_moe *moe, float *tmp) {
    const size_t esz = dsmoe_moe_get_config(moe)->weight_dtype == DSMOE_DTYPE_BF16 ? 2 : 4;
    for (int64_t i = 0; i < dsmoe_moe_tensor_count(moe); i++) {
        dsmoe_moe_tensor t;
        char name[DSMOE_MODEL_NAME_MAX + 64], what[80];
        dsmoe_status s = dsmoe_moe_tensor_at(moe, i, &t);
        if (s != DSMOE_OK) return s;
        snprintf(what, sizeof what, "mlp.%s", t.name);
        if ((s = lname(name, sizeof name, l, what)) != DSMOE_OK) return s;
        const size_t cnt = (size_t)t.shape[0] * (size_t)(t.ndim == 2 ? t.shape[1] : 1);
        if (!t.trainable) { /* the correction bias: a buffer, set through its setter */
            float *b = tmp;
            if ((s = dsmoe_model_files_read_f32(m->mf, name, b)) != DSMOE_OK) return s;
            if ((s = dsmoe_moe_set_bias(moe, b)) != DSMOE_OK) return s;
            continue;
        }
        void *dst = t.layout == DSMOE_MOE_LAYOUT_PACKED ? (void *)tmp : t.data;
        if (t.dtype == DSMOE_DTYPE_F32) {
            if ((s = dsmoe_model_files_read_f32(m->mf, name, (float *)dst)) != DSMOE_OK) return s;
        } else { /* BF16 stored as BF16: copied, checked bit-wise */
            dsmoe__wmat w;
            if ((s = dsmoe__model_files_view(m->mf, name, &w)) != DSMOE_OK) return s;
            memcpy(dst, w.data, cnt * 2);
            const uint16_t *b = (const uint16_t *)dst;
            for (size_t k = 0; k < cnt; k++)
                if ((b[k] & 0x7f80u) == 0x7f80u)
                    return dsmoe__error(DSMOE_STATUS_NON_FINITE,
                                        "tensor %s: element %zu is not finite", name, k);
        }
        if (dst != t.data) dsmoe__moe_pack_rows(t.data, dst, esz, t.shape[0], t.shape[1]);
    }
    return DSMOE_OK;
}

static dsmoe_status moe_setup(dsmoe_model *m) {
    const dsmoe_model_config *c = &m->cfg;
    const int32_t L = c->num_hidden_layers + m->Dm;
    size_t total = 0, ws = 0;
    int any = 0, any_views = 0;
    dsmoe_status s0 = dsmoe_model_router_config(c, &m->rc);
    if (s0 != DSMOE_OK) return s0;
    for (int32_t l = 0; l < L; l++) {
        if (!dsmoe_model_layer_is_moe(c, l)) continue;
        if (moe_from_views(m, l)) {
            any_views = 1;
            continue;
        }
        dsmoe_moe_config mc;
        moe_layer_config(m, l, &mc);
        size_t np = dsmoe_moe_param_count(&mc) * (mc.weight_dtype == DSMOE_DTYPE_BF16 ? 2 : 4);
        size_t w = dsmoe_moe_workspace_size(&mc, mc.max_tokens, mc.n_threads);
        if (np == 0 || w == 0) return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                                   "model: MoE layer %d: %s", (int)l,
                                                   dsmoe_last_error());
        total += dsmoe__align64(np);
        if (w > ws) ws = w;
        any = 1;
    }
    if (!any && !any_views) return DSMOE_OK;
    if (any) {
        m->moe_params = dsmoe_malloc(total);
        m->moe_ws = dsmoe_malloc(ws);
        m->moe_ws_size = ws;
    }
    if (any_views) {
        m->views_ws_size = dsmoe__moe_views_workspace(c, &m->rc, m->Tm, m->nt);
        m->views_ws = dsmoe_malloc(m->views_ws_size);
    }
    const int64_t F = c->moe_intermediate_size, Fs = (int64_t)c->n_shared_experts * F,
                  E = c->n_routed_experts;
    int64_t big = (F > Fs ? F : Fs) > E ? (F > Fs ? F : Fs) : E;
    big *= c->hidden_size; /* the largest matrix, packed through this copy */
    float *tmp = (float *)malloc((size_t)big * sizeof(float));
    if ((any && (!m->moe_params || !m->moe_ws)) || (any_views && !m->views_ws) || !tmp) {
        free(tmp);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "model: %zu bytes of MoE weights", total);
    }
    size_t off = 0;
    dsmoe_status s = DSMOE_OK;
    for (int32_t l = 0; l < L && s == DSMOE_OK; l++) {
        if (!dsmoe_model_layer_is_moe(c, l)) continue;
        if (moe_from_views(m, l)) {
            s = views_setup(m, l, tmp);
            continue;
        }
        dsmoe_moe_config mc;
        moe_layer_config(m, l, &mc);
        size_t np = dsmoe_moe_param_count(&mc) * (mc.weight_dtype == DSMOE_DTYPE_BF16 ? 2 : 4);
        dsmoe_moe_buffers b = {(char *)m->moe_params + off, NULL, m->moe_ws, ws};
        off += dsmoe__align64(np);
        s = dsmoe_moe_create_with(&mc, &b, &m->layers[l].moe);
        if (s == DSMOE_OK) s = moe_fill(m, l, m->layers[l].moe, tmp);
    }
    free(tmp);
    return s;
}

static dsmoe_status layer_load(dsmoe_model *m, int32_t l, float *row) {
    const dsmoe_model_config *c = &m->cfg;
    mlayer *L = &m->layers[l];
    char name[DSMOE_MODEL_NAME_MAX + 32];
    dsmoe_status s;
#define MAT(field, what)                                                                       \
    if ((s = lname(name, sizeof name, l, what)) != DSMOE_OK ||                                 \
        (s = load_mat(m, name, &L->field, row)) != DSMOE_OK)                                   \
        return s;
#define VEC(field, what)                                                                       \
    if ((s = lname(name, sizeof name, l, what)) != DSMOE_OK ||                                 \
        (s = load_f32(m, name, &L->field)) != DSMOE_OK)                                        \
        return s;
    VEC(in_norm, "input_layernorm.weight");
    VEC(post_norm, "post_attention_layernorm.weight");
    if (c->q_lora_rank > 0) {
        MAT(q_a, "self_attn.q_a_proj.weight");
        VEC(q_a_norm, "self_attn.q_a_layernorm.weight");
        MAT(q_b, "self_attn.q_b_proj.weight");
    } else {
        MAT(q_proj, "self_attn.q_proj.weight");
    }
    MAT(kv_a, "self_attn.kv_a_proj_with_mqa.weight");
    VEC(kv_a_norm, "self_attn.kv_a_layernorm.weight");
    VEC(kv_b, "self_attn.kv_b_proj.weight");
    MAT(o_proj, "self_attn.o_proj.weight");
    if (!dsmoe_model_layer_is_moe(c, l)) {
        MAT(gate, "mlp.gate_proj.weight");
        MAT(up, "mlp.up_proj.weight");
        MAT(down, "mlp.down_proj.weight");
    }
#undef MAT
#undef VEC
    return DSMOE_OK;
}

/* The chunk scratch for Tm tokens. */
static dsmoe_status scratch_setup(dsmoe_model *m) {
    const dsmoe_model_config *c = &m->cfg;
    const int64_t Tm = m->Tm, D = c->hidden_size, H = c->num_attention_heads,
                  n = c->qk_nope_head_dim, r = c->qk_rope_head_dim, v = c->v_head_dim,
                  q = c->q_lora_rank, I = c->intermediate_size;
    int any_dense = 0;
    for (int32_t l = 0; l < c->num_hidden_layers + m->Dm; l++)
        if (!dsmoe_model_layer_is_moe(c, l)) any_dense = 1;
    const size_t wl = dsmoe__wlinear_scratch((int64_t)m->max_cols, Tm);
    const int64_t parts[] = {Tm * D, Tm * D, Tm * D, Tm * H * (n + r), Tm * q, Tm * H * v,
                             any_dense ? 2 * Tm * I : 0, Tm * r, m->Dm > 0 ? 2 * Tm * D : 0};
    size_t total = 0;
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        total += dsmoe__align64((size_t)parts[i] * sizeof(float));
    total += (size_t)m->nt * wl;
    m->scratch = dsmoe_malloc(total);
    if (!m->scratch)
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "model: %zu bytes of scratch", total);
    dsmoe__carver cv = {(char *)m->scratch, total, 0};
    float **dst[] = {&m->h, &m->x, &m->y, &m->q, &m->qa, &m->att, &m->ffn, &m->cs, &m->cat};
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        *dst[i] = (float *)dsmoe__carve(&cv, (size_t)parts[i] * sizeof(float));
    m->wl = dsmoe__carve(&cv, (size_t)m->nt * wl);
    return DSMOE_OK;
}

/* MTP depth k's own tensors (its block is loaded as layer L + k − 1). */
static dsmoe_status depth_load(dsmoe_model *m, int32_t k, float *row) {
    const int32_t l = m->cfg.num_hidden_layers + k - 1;
    mdepth *d = &m->depths[k - 1];
    char name[DSMOE_MODEL_NAME_MAX + 32];
    dsmoe_status s;
    if ((s = lname(name, sizeof name, l, "embed_tokens.weight")) != DSMOE_OK ||
        (s = load_mat(m, name, &d->embed, row)) != DSMOE_OK ||
        (s = lname(name, sizeof name, l, "shared_head.head.weight")) != DSMOE_OK ||
        (s = load_mat(m, name, &d->head, row)) != DSMOE_OK ||
        (s = lname(name, sizeof name, l, "eh_proj.weight")) != DSMOE_OK ||
        (s = load_mat(m, name, &d->eh_proj, row)) != DSMOE_OK ||
        (s = lname(name, sizeof name, l, "enorm.weight")) != DSMOE_OK ||
        (s = load_f32(m, name, &d->enorm)) != DSMOE_OK ||
        (s = lname(name, sizeof name, l, "hnorm.weight")) != DSMOE_OK ||
        (s = load_f32(m, name, &d->hnorm)) != DSMOE_OK ||
        (s = lname(name, sizeof name, l, "shared_head.norm.weight")) != DSMOE_OK ||
        (s = load_f32(m, name, &d->sh_norm)) != DSMOE_OK)
        return s;
    return layer_load(m, l, row);
}

static dsmoe_status model_load(dsmoe_model *m) {
    const dsmoe_model_config *c = &m->cfg;
    const int32_t L = c->num_hidden_layers;
    dsmoe_status s;
    m->layers = (mlayer *)calloc((size_t)L + (size_t)m->Dm, sizeof *m->layers);
    m->depths = (mdepth *)calloc((size_t)m->Dm + 1, sizeof *m->depths);
    m->inv_freq = (double *)calloc((size_t)(c->qk_rope_head_dim / 2) + 1, sizeof(double));
    /* the widest matrix row of the model, for the finiteness scan */
    int64_t wide = c->hidden_size;
    const int64_t others[] = {c->q_lora_rank, (int64_t)c->num_attention_heads * c->v_head_dim,
                              c->intermediate_size, c->kv_lora_rank};
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++)
        if (others[i] > wide) wide = others[i];
    if (m->Dm > 0 && 2 * (int64_t)c->hidden_size > wide) wide = 2 * (int64_t)c->hidden_size;
    float *row = (float *)malloc((size_t)wide * sizeof(float));
    if (!m->layers || !m->depths || !m->inv_freq || !row) {
        free(row);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "model: %d layers", (int)L);
    }
    s = load_mat(m, "model.embed_tokens.weight", &m->embed, row);
    if (s == DSMOE_OK) s = load_f32(m, "model.norm.weight", &m->final_norm);
    if (s == DSMOE_OK) {
        if (c->tie_word_embeddings) m->head = m->embed;
        else s = load_mat(m, "lm_head.weight", &m->head, row);
    }
    for (int32_t l = 0; l < L && s == DSMOE_OK; l++) s = layer_load(m, l, row);
    for (int32_t k = 1; k <= m->Dm && s == DSMOE_OK; k++) s = depth_load(m, k, row);
    free(row);
    if (s == DSMOE_OK) s = moe_setup(m);
    if (s == DSMOE_OK) s = scratch_setup(m);
    dsmoe__rope_inv_freq(m->inv_freq, c);
    m->scale = (float)dsmoe__attn_scale(c);
    return s;
}

dsmoe_status dsmoe_model_open(const char *dir, const dsmoe_model_options *opts,
                              dsmoe_model **out) {
    if (out) *out = NULL;
    if (!dir || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_open: NULL argument");
    dsmoe_model_options o;
    dsmoe_model_options_default(&o);
    if (opts) o = *opts;
    dsmoe_model *m = (dsmoe_model *)calloc(1, sizeof *m);
    if (!m) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "dsmoe_model_open");
    m->nt = dsmoe__threads(o.n_threads);
    m->Tm = o.max_tokens > 0 ? o.max_tokens : 256;
    m->widen = o.widen_f32 != 0;
    dsmoe_status s = dsmoe_model_config_from_dir(dir, &m->cfg);
    if (s == DSMOE_OK) s = dsmoe_model_files_open(dir, &m->cfg, &m->mf);
    if (s == DSMOE_OK && o.mtp) m->Dm = dsmoe_model_files_mtp_depths(m->mf);
    if (s == DSMOE_OK) s = model_load(m);
    if (s != DSMOE_OK) {
        dsmoe_model_free(m);
        return s;
    }
    *out = m;
    return DSMOE_OK;
}

void dsmoe_model_free(dsmoe_model *m) {
    if (!m) return;
    if (m->layers)
        for (int32_t l = 0; l < m->cfg.num_hidden_layers + m->Dm; l++) {
            dsmoe_moe_free(m->layers[l].moe);
            views_free(m->layers[l].views);
        }
    free(m->layers);
    free(m->depths);
    for (int64_t i = 0; i < m->n_owned; i++) dsmoe_free(m->owned[i]);
    free(m->owned);
    dsmoe_free(m->moe_params);
    dsmoe_free(m->moe_ws);
    dsmoe_free(m->views_ws);
    dsmoe_free(m->scratch);
    free(m->inv_freq);
    dsmoe_model_files_close(m->mf);
    free(m);
}

const dsmoe_model_config *dsmoe_model_get_config(const dsmoe_model *m) { return m ? &m->cfg : NULL; }

const dsmoe_model_files *dsmoe_model_get_files(const dsmoe_model *m) { return m ? m->mf : NULL; }

int32_t dsmoe_model_mtp_depths(const dsmoe_model *m) { return m ? m->Dm : 0; }

/* ------------------------------------------------------------ the cache -- */

/* A cache of nl layers from layer0 (depth 0: the main model's). */
static dsmoe_status cache_create(const dsmoe_model *m, int32_t depth, int32_t layer0, int32_t nl,
                                 int64_t capacity, dsmoe_model_cache **out, const char *fn) {
    const dsmoe_model_config *c = &m->cfg;
    if (capacity < 1 || capacity > c->max_position_embeddings)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "%s: capacity %lld outside 1 .. %lld (max_position_embeddings)", fn,
                            (long long)capacity, (long long)c->max_position_embeddings);
    size_t row = (size_t)c->kv_lora_rank + (size_t)c->qk_rope_head_dim, kvn, per, scr;
    per = dsmoe__attn_scratch_floats(c, capacity);
    if (!dsmoe__mul_size((size_t)nl * row, (size_t)capacity, &kvn) ||
        !dsmoe__mul_size(kvn, sizeof(float), &kvn) ||
        !dsmoe__mul_size(per, (size_t)m->nt * sizeof(float), &scr))
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: capacity %lld", fn,
                            (long long)capacity);
    dsmoe_model_cache *k = (dsmoe_model_cache *)calloc(1, sizeof *k);
    if (k) {
        k->kv = (float *)dsmoe_malloc(kvn);
        k->scratch = (float *)dsmoe_malloc(scr);
    }
    if (!k || !k->kv || !k->scratch) {
        dsmoe_model_cache_free(k);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: %zu + %zu bytes for capacity %lld",
                            fn, kvn, scr, (long long)capacity);
    }
    k->m = m;
    k->depth = depth;
    k->layer0 = layer0;
    k->nl = nl;
    k->cap = capacity;
    k->len = 0;
    k->per_thread = per;
    *out = k;
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_cache_create(const dsmoe_model *m, int64_t capacity,
                                      dsmoe_model_cache **out) {
    if (out) *out = NULL;
    if (!m || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_cache_create: NULL argument");
    return cache_create(m, 0, 0, m->cfg.num_hidden_layers, capacity, out,
                        "dsmoe_model_cache_create");
}

dsmoe_status dsmoe_model_mtp_cache_create(const dsmoe_model *m, int32_t depth, int64_t capacity,
                                          dsmoe_model_cache **out) {
    if (out) *out = NULL;
    if (!m || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_model_mtp_cache_create: NULL argument");
    if (depth < 1 || depth > m->Dm)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_model_mtp_cache_create: depth %d outside 1 .. %d (the MTP "
                            "depths loaded%s)", (int)depth, (int)m->Dm,
                            m->Dm == 0 ? ": open the model with dsmoe_model_options.mtp and "
                                         "stored MTP layers" : "");
    return cache_create(m, depth, m->cfg.num_hidden_layers + depth - 1, 1, capacity, out,
                        "dsmoe_model_mtp_cache_create");
}

int32_t dsmoe_model_cache_mtp_depth(const dsmoe_model_cache *cache) {
    return cache ? cache->depth : 0;
}

void dsmoe_model_cache_free(dsmoe_model_cache *cache) {
    if (!cache) return;
    dsmoe_free(cache->kv);
    dsmoe_free(cache->scratch);
    free(cache);
}

int64_t dsmoe_model_cache_length(const dsmoe_model_cache *cache) { return cache ? cache->len : 0; }

int64_t dsmoe_model_cache_capacity(const dsmoe_model_cache *cache) { return cache ? cache->cap : 0; }

dsmoe_status dsmoe_model_cache_truncate(dsmoe_model_cache *cache, int64_t length) {
    if (!cache)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_cache_truncate: NULL cache");
    if (length < 0 || length > cache->len)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_model_cache_truncate: length %lld outside 0 .. %lld (the "
                            "cache's length)", (long long)length, (long long)cache->len);
    cache->len = length;
    return DSMOE_OK;
}

/* ------------------------------------------------------------ forward -- */

static int all_finite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* MLA of layer l for the chunk's T tokens (normalised input m->x) into m->y; writes
 * the tokens' latents and k_pe into the cache at pos0 .. pos0 + T − 1. */
static void mla(dsmoe_model *m, dsmoe_model_cache *k, int32_t l, int64_t T, int64_t pos0,
                int naive) {
    const dsmoe_model_config *c = &m->cfg;
    const mlayer *L = &m->layers[l];
    const int64_t D = c->hidden_size, H = c->num_attention_heads, n = c->qk_nope_head_dim,
                  r = c->qk_rope_head_dim, v = c->v_head_dim, kc = c->kv_lora_rank,
                  q = c->q_lora_rank, half = r / 2;
    const int nt = m->nt;
    if (q > 0) {
        dsmoe__wlinear(m->qa, q, m->x, D, T, &L->q_a, nt, m->wl);
        dsmoe__rmsnorm(m->qa, m->qa, L->q_a_norm, T, (int32_t)q, q, q, c->rms_norm_eps);
        dsmoe__wlinear(m->q, H * (n + r), m->qa, q, T, &L->q_b, nt, m->wl);
    } else {
        dsmoe__wlinear(m->q, H * (n + r), m->x, D, T, &L->q_proj, nt, m->wl);
    }
    /* the layer's rows */
    float *kv = k->kv + ((int64_t)(l - k->layer0) * k->cap) * (kc + r);
    float *kvn = kv + pos0 * (kc + r); /* the new tokens' rows */
    dsmoe__wlinear(kvn, kc + r, m->x, D, T, &L->kv_a, nt, m->wl);
    dsmoe__rmsnorm(kvn, kvn, L->kv_a_norm, T, (int32_t)kc, kc + r, kc + r, c->rms_norm_eps);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < H; h++)
            dsmoe__rope_rotate(m->q + (t * H + h) * (n + r) + n, m->cs + t * r, (int32_t)half);
        dsmoe__rope_rotate(kvn + t * (kc + r) + kc, m->cs + t * r, (int32_t)half);
    }
    dsmoe__attn_args a = {c, m->q, kv, L->kv_b, m->att, T, pos0, m->scale, nt, k->scratch,
                          k->per_thread};
    if (naive) dsmoe__attn_naive(&a);
    else dsmoe__attn_absorbed(&a);
    dsmoe__wlinear(m->y, D, m->att, H * v, T, &L->o_proj, nt, m->wl);
}

/* Block l (a main layer or an MTP depth's) on the chunk's stream m->h (T, D), the rope
 * table m->cs of positions pos0 .. already made. */
static dsmoe_status block(dsmoe_model *m, dsmoe_model_cache *k, int32_t l, int64_t T, int64_t pos0,
                          int naive) {
    const dsmoe_model_config *c = &m->cfg;
    const int64_t D = c->hidden_size, I = c->intermediate_size;
    const int nt = m->nt;
    const mlayer *L = &m->layers[l];
    dsmoe__rmsnorm(m->x, m->h, L->in_norm, T, (int32_t)D, D, D, c->rms_norm_eps);
    mla(m, k, l, T, pos0, naive);
    for (int64_t i = 0; i < T * D; i++) m->h[i] += m->y[i];
    dsmoe__rmsnorm(m->x, m->h, L->post_norm, T, (int32_t)D, D, D, c->rms_norm_eps);
    if (L->moe || L->views) {
        dsmoe_status s = L->moe ? dsmoe_moe_forward(L->moe, m->y, m->x, T, nt)
                                : dsmoe__moe_views_forward(L->views, c, &m->rc, m->y, m->x, T, nt,
                                                           m->views_ws, m->views_ws_size);
        if (s != DSMOE_OK)
            return dsmoe__error(s, "model: layer %d (MoE): %s", (int)l, dsmoe_last_error());
    } else {
        float *g = m->ffn, *u = m->ffn + T * I;
        dsmoe__wlinear(g, I, m->x, D, T, &L->gate, nt, m->wl);
        dsmoe__wlinear(u, I, m->x, D, T, &L->up, nt, m->wl);
        for (int64_t i = 0; i < T * I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        dsmoe__wlinear(m->y, D, g, I, T, &L->down, nt, m->wl);
    }
    for (int64_t i = 0; i < T * D; i++) m->h[i] += m->y[i];
    if (!all_finite(m->h, T * D)) {
        if (k->depth > 0)
            return dsmoe__error(DSMOE_STATUS_NON_FINITE,
                                "model: the hidden state of MTP depth %d (layer %d, positions "
                                "%lld .. %lld) is not finite", (int)k->depth, (int)l,
                                (long long)pos0, (long long)(pos0 + T - 1));
        return dsmoe__error(DSMOE_STATUS_NON_FINITE,
                            "model: the hidden state after layer %d (positions %lld .. %lld) "
                            "is not finite", (int)l, (long long)pos0, (long long)(pos0 + T - 1));
    }
    return DSMOE_OK;
}

/* The head on the stream m->h (T, D): final norm w into hidden (T, D) or m->x, then
 * logits (T, V) rows, or the last token's (V) with last_only, or none (NULL). */
static void head(dsmoe_model *m, const dsmoe__wmat *W, const float *w, int64_t T, float *logits,
                 float *hidden, int last_only) {
    const dsmoe_model_config *c = &m->cfg;
    const int64_t D = c->hidden_size, V = c->vocab_size;
    if (hidden) {
        dsmoe__rmsnorm(hidden, m->h, w, T, (int32_t)D, D, D, c->rms_norm_eps);
        if (!logits) return;
        const int64_t t0 = last_only ? T - 1 : 0;
        dsmoe__wlinear(logits, V, hidden + t0 * D, D, T - t0, W, m->nt, m->wl);
        return;
    }
    if (!logits) return;
    const int64_t t0 = last_only ? T - 1 : 0;
    dsmoe__rmsnorm(m->x, m->h + t0 * D, w, T - t0, (int32_t)D, D, D, c->rms_norm_eps);
    dsmoe__wlinear(logits, V, m->x, D, T - t0, W, m->nt, m->wl);
}

/* One chunk of T <= Tm tokens at positions pos0 .. of the main model. */
static dsmoe_status chunk(dsmoe_model *m, dsmoe_model_cache *k, const int32_t *tokens, int64_t T,
                          int64_t pos0, int naive, float *logits, float *hidden, int last_only) {
    const dsmoe_model_config *c = &m->cfg;
    const int64_t D = c->hidden_size;
    for (int64_t t = 0; t < T; t++) dsmoe__wmat_widen(m->h + t * D, &m->embed, tokens[t], tokens[t] + 1);
    dsmoe__rope_table(m->cs, m->inv_freq, c->qk_rope_head_dim / 2, pos0, T);
    for (int32_t l = 0; l < c->num_hidden_layers; l++) {
        dsmoe_status s = block(m, k, l, T, pos0, naive);
        if (s != DSMOE_OK) return s;
    }
    head(m, &m->head, m->final_norm, T, logits, hidden, last_only);
    return DSMOE_OK;
}

/* One chunk of T <= Tm positions pos0 .. of MTP depth k->depth: hidden (T, D) h^{k−1},
 * tokens t_{i+k}; h^k into hidden_out (or none), logits as chunk's. */
static dsmoe_status chunk_mtp(dsmoe_model *m, dsmoe_model_cache *k, const float *hidden,
                              const int32_t *tokens, int64_t T, int64_t pos0, int naive,
                              float *hidden_out, float *logits, int last_only) {
    const dsmoe_model_config *c = &m->cfg;
    const int64_t D = c->hidden_size;
    const mdepth *d = &m->depths[k->depth - 1];
    for (int64_t t = 0; t < T; t++) dsmoe__wmat_widen(m->h + t * D, &d->embed, tokens[t], tokens[t] + 1);
    /* [enorm(embed) ; hnorm(h)] (T, 2D), then eh_proj */
    dsmoe__rmsnorm(m->cat, m->h, d->enorm, T, (int32_t)D, D, 2 * D, c->rms_norm_eps);
    dsmoe__rmsnorm(m->cat + D, hidden, d->hnorm, T, (int32_t)D, D, 2 * D, c->rms_norm_eps);
    dsmoe__wlinear(m->h, D, m->cat, 2 * D, T, &d->eh_proj, m->nt, m->wl);
    dsmoe__rope_table(m->cs, m->inv_freq, c->qk_rope_head_dim / 2, pos0, T);
    dsmoe_status s = block(m, k, k->layer0, T, pos0, naive);
    if (s != DSMOE_OK) return s;
    if (hidden_out) memcpy(hidden_out, m->h, (size_t)(T * D) * sizeof(float));
    head(m, &d->head, d->sh_norm, T, logits, NULL, last_only);
    return DSMOE_OK;
}

/* The checks both forwards share; *naive and *last from the flags. */
static dsmoe_status check_call(const dsmoe_model *m, const dsmoe_model_cache *cache,
                               const int32_t *tokens, int64_t T, unsigned flags, const char *fn,
                               int *naive, int *last) {
    if (T < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: T = %lld < 1", fn, (long long)T);
    const unsigned known = DSMOE_MODEL_ATTN_NAIVE | DSMOE_MODEL_ATTN_ABSORBED | DSMOE_MODEL_LOGITS_LAST;
    if (flags & ~known)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: unknown flags 0x%x", fn,
                            flags & ~known);
    if ((flags & DSMOE_MODEL_ATTN_NAIVE) && (flags & DSMOE_MODEL_ATTN_ABSORBED))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "%s: ATTN_NAIVE and ATTN_ABSORBED together", fn);
    if (cache->m != m)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: the cache belongs to another model",
                            fn);
    const int32_t V = m->cfg.vocab_size;
    for (int64_t t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= V)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "%s: token %lld is %d, outside [0, %d) (vocab_size)", fn,
                                (long long)t, (int)tokens[t], (int)V);
    if (T > cache->cap - cache->len)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "%s: the cache holds %lld of %lld positions; %lld more tokens do not "
                            "fit", fn, (long long)cache->len, (long long)cache->cap, (long long)T);
    *naive = (flags & DSMOE_MODEL_ATTN_NAIVE)      ? 1
             : (flags & DSMOE_MODEL_ATTN_ABSORBED) ? 0
                                                   : T > 4;
    *last = (flags & DSMOE_MODEL_LOGITS_LAST) != 0;
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_forward_hidden(dsmoe_model *m, dsmoe_model_cache *cache,
                                        const int32_t *tokens, int64_t T, float *logits,
                                        float *hidden, unsigned flags) {
    const char *fn = hidden ? "dsmoe_model_forward_hidden" : "dsmoe_model_forward";
    if (!m || !cache || !tokens)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: NULL %s", fn,
                            !m ? "model" : !cache ? "cache" : "tokens");
    if (cache->depth != 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "%s: the cache is MTP depth %d's, not the main model's (see "
                            "dsmoe_model_forward_mtp)", fn, (int)cache->depth);
    int naive = 0, last = 0;
    dsmoe_status s = check_call(m, cache, tokens, T, flags, fn, &naive, &last);
    if (s != DSMOE_OK) return s;
    const int64_t V = m->cfg.vocab_size, D = m->cfg.hidden_size, len0 = cache->len;
    for (int64_t t0 = 0; t0 < T; t0 += m->Tm) {
        const int64_t Tc = T - t0 < m->Tm ? T - t0 : m->Tm;
        float *lg = NULL;
        if (logits && !last) lg = logits + t0 * V;
        else if (logits && t0 + Tc == T) lg = logits;
        s = chunk(m, cache, tokens + t0, Tc, cache->len, naive, lg, hidden ? hidden + t0 * D : NULL,
                  last);
        if (s != DSMOE_OK) {
            cache->len = len0;
            return s;
        }
        cache->len += Tc;
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_forward(dsmoe_model *m, dsmoe_model_cache *cache, const int32_t *tokens,
                                 int64_t T, float *logits, unsigned flags) {
    return dsmoe_model_forward_hidden(m, cache, tokens, T, logits, NULL, flags);
}

dsmoe_status dsmoe_model_forward_mtp(dsmoe_model *m, dsmoe_model_cache *cache, const float *hidden,
                                     const int32_t *tokens, int64_t T, float *hidden_out,
                                     float *logits, unsigned flags) {
    const char *fn = "dsmoe_model_forward_mtp";
    if (!m || !cache || !hidden || !tokens)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: NULL %s", fn,
                            !m ? "model" : !cache ? "cache" : !hidden ? "hidden" : "tokens");
    if (cache->depth == 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "%s: the cache is the main model's, not an MTP depth's (see "
                            "dsmoe_model_mtp_cache_create)", fn);
    int naive = 0, last = 0;
    dsmoe_status s = check_call(m, cache, tokens, T, flags, fn, &naive, &last);
    if (s != DSMOE_OK) return s;
    const int64_t V = m->cfg.vocab_size, D = m->cfg.hidden_size, len0 = cache->len;
    for (int64_t i = 0; i < T * D; i++)
        if (!isfinite(hidden[i]))
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "%s: hidden[%lld][%lld] is %g, not finite", fn, (long long)(i / D),
                                (long long)(i % D), (double)hidden[i]);
    for (int64_t t0 = 0; t0 < T; t0 += m->Tm) {
        const int64_t Tc = T - t0 < m->Tm ? T - t0 : m->Tm;
        float *lg = NULL;
        if (logits && !last) lg = logits + t0 * V;
        else if (logits && t0 + Tc == T) lg = logits;
        s = chunk_mtp(m, cache, hidden + t0 * D, tokens + t0, Tc, cache->len, naive,
                      hidden_out ? hidden_out + t0 * D : NULL, lg, last);
        if (s != DSMOE_OK) {
            cache->len = len0;
            return s;
        }
        cache->len += Tc;
    }
    return DSMOE_OK;
}
