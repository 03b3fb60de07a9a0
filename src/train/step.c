/*
 * step.c — the whole model for training (main model and MTP depths): one parameter array and one gradient
 * array in the tensor table's order, the loss of a batch and its backward, composed
 * from the model's training blocks (model/model_grad.h) and the MoE layer (see
 * dsmoe/train.h, "training model").
 */
#include "model/model_grad.h"
#include "train/train_internal.h"

#include "dsmoe/balance.h"
#include "dsmoe/moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Per-block timers, compiled only into the benchmark's profiling build
 * (bench/bench_train.c, target bench_train_prof); nothing otherwise. */
#ifdef DSMOE_TRAIN_PROFILE
#include <time.h>
enum {
    PROF_NORM, PROF_MLA_F, PROF_MOE_F, PROF_BAL_F, PROF_FFN_F, PROF_RESID, PROF_HEAD_F, PROF_MTP_F,
    PROF_ZERO, PROF_HEAD_B, PROF_MOE_B, PROF_BAL_B, PROF_FFN_B, PROF_NORM_B, PROF_MLA_B,
    PROF_MTP_B, PROF_EMBED, PROF_COUNT
};
double dsmoe__train_prof[PROF_COUNT];
const char *const dsmoe__train_prof_names[PROF_COUNT] = {
    "norm_f", "mla_f", "moe_f", "balance_f", "dense_ffn_f", "residual_f", "head_f", "mtp_f",
    "zero_grads", "head_b", "moe_b", "balance_b", "dense_ffn_b", "norm_b", "mla_b", "mtp_b",
    "embed"};
const int dsmoe__train_prof_count = PROF_COUNT;
static double prof_now(void) {
    struct timespec t;
    timespec_get(&t, TIME_UTC); /* C11 (the POSIX clocks need feature macros) */
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
#define PROF_BEGIN() double prof_t0_ = prof_now()
#define PROF_END(id) (dsmoe__train_prof[id] += prof_now() - prof_t0_, prof_t0_ = prof_now())
#define PROF_RESTART() (prof_t0_ = prof_now())
#else
#define PROF_RESTART() (void)0
#define PROF_BEGIN() (void)0
#define PROF_END(id) (void)0
#endif

/* One transformer layer's parameters, gradients and saved activations. */
typedef struct tm_layer {
    const float *w_in, *w_post;
    float *g_in, *g_post;
    dsmoe__mla_weights mla;
    dsmoe__mla_grads mla_g;
    dsmoe__mlp_params mlp; /* dense layers */
    dsmoe__mlp_grads mlp_g;
    dsmoe_moe *moe;        /* MoE layers */
    /* Saved by the forward: the stream before the layer (h_in) and after attention
     * (h_mid), the normalised inputs of the two blocks and their inverse rms. */
    float *h_in, *h_mid, *x1, *x2, *inv1, *inv2;
    void *mla_save, *ffn_save;
} tm_layer;

/* One MTP depth's own parameters and saved activations (its block is a tm_layer). */
typedef struct tm_depth {
    const float *enorm, *hnorm, *eh_proj, *sh_norm;
    float *g_enorm, *g_hnorm, *g_eh_proj, *g_sh_norm;
    int32_t *tok, *tgt;         /* (N): token t + k embedded, target t + k + 1 */
    float *e, *cat, *inv_e, *inv_h, *h_out, *x_sh, *inv_sh; /* cat (N, 2D) */
    float *glog; /* (N, V): the head's logits' gradient, from the forward for the backward */
} tm_depth;

typedef struct tm_tensor {
    dsmoe_model_tensor_spec spec;
    int64_t offset; /* floats into params / grads; -1 for the correction bias */
    int64_t n;
    int32_t moe;    /* MoE layer index k, or -1 */
} tm_tensor;

struct dsmoe_train_model {
    dsmoe_model_config cfg;
    dsmoe_train_model_options opt;
    int nt;
    int64_t B, T, N;
    int32_t D, V, E, L, LT; /* LT = L + Dm blocks */
    int32_t ignore_id;
    float *params, *grads; /* page allocations of params_bytes (core/internal.h) */
    size_t n_params, params_bytes;
    /* The routed experts held, the same in every MoE layer (all unless sharded): the
     * others' pages of params and grads are never written and not resident. */
    int32_t ex_first, ex_last, sharded;
    int64_t *moe_exp;  /* (n_moe) float offset of the k-th MoE layer's expert 0 */
    int64_t ex_stride; /* floats per expert (gate_proj and up_proj, down_proj, padding) */
    int64_t *res;      /* (n_res, 2) the float ranges [lo, hi) of params / grads held */
    int32_t n_res;
    int64_t n_tensors;
    tm_tensor *tensors;
    tm_layer *layers;        /* L main layers, then the Dm MTP depths' blocks */
    int32_t Dm;              /* MTP depths trained */
    tm_depth *depths;
    int32_t n_moe;
    int32_t *moe_layer;  /* layer index of the k-th MoE layer */
    dsmoe_train_moe_exec exec; /* MoE layers run by the caller (forward NULL: locally) */
    dsmoe_router_config rc;
    dsmoe_balance_loss_config blc;
    /* Data parallelism: the sum over the processes of the MoE layers' counts, for the
     * balance losses over the whole batch (NULL: this process's counts). gcounts (n_moe,
     * E + 2): per MoE layer, the last loss's summed counts, rows and error flag; cs_next:
     * the MoE layer whose sum comes next in the running loss (-1: none pending); cs_used:
     * the last loss took f from gcounts (its backward does too). */
    int (*counts_sum)(void *ctx, int64_t *x, int64_t n);
    void *counts_ctx;
    int64_t *gcounts;
    int32_t cs_next, cs_used;
    const float *embed, *norm, *head;
    float *g_embed, *g_norm, *g_head;
    /* Activations and scratch. */
    int32_t *inputs, *targets; /* (N) */
    float *h_fin, *x_fin, *inv_fin, *a, *dh, *dx, *dlogits, *dx_fin, *dcat, *de;
    float *glog; /* (N, V): the head's logits' gradient, from the forward for the backward */
    void *ws, *moe_ws, *bal_ws;
    size_t ws_size, moe_ws_size, bal_ws_size, mla_save_size, ffn_save_size;
    int have_forward;
};

void dsmoe_train_model_options_default(dsmoe_train_model_options *o) {
    if (!o) return;
    o->n_threads = 0;
    o->batch = 8;
    o->seq_len = 64;
    o->seed = 1;
    o->init_std = 0.02f;
    o->balance_alpha = 0.0f;
    o->mtp_depths = -1;
    o->mtp_lambda = 0.3f;
    o->balance_kind = DSMOE_BALANCE_LOSS_SEQ;
}

void dsmoe_train_model_free(dsmoe_train_model *tm) {
    if (!tm) return;
    if (tm->depths) {
        for (int32_t d = 0; d < tm->Dm; d++) {
            tm_depth *dp = &tm->depths[d];
            dsmoe_free(dp->tok);
            dsmoe_free(dp->tgt);
            dsmoe_free(dp->glog);
            dsmoe_free(dp->e);
            dsmoe_free(dp->cat);
            dsmoe_free(dp->inv_e);
            dsmoe_free(dp->inv_h);
            dsmoe_free(dp->h_out);
            dsmoe_free(dp->x_sh);
            dsmoe_free(dp->inv_sh);
        }
        free(tm->depths);
    }
    if (tm->layers) {
        for (int32_t l = 0; l < tm->LT; l++) {
            tm_layer *ly = &tm->layers[l];
            dsmoe_moe_free(ly->moe);
            dsmoe_free(ly->h_in);
            dsmoe_free(ly->h_mid);
            dsmoe_free(ly->x1);
            dsmoe_free(ly->x2);
            dsmoe_free(ly->inv1);
            dsmoe_free(ly->inv2);
            dsmoe__pages_free(ly->mla_save, tm->mla_save_size);
            dsmoe_free(ly->ffn_save);
        }
        free(tm->layers);
    }
    free(tm->tensors);
    free(tm->moe_layer);
    free(tm->moe_exp);
    free(tm->res);
    dsmoe__pages_free(tm->params, tm->params_bytes);
    dsmoe__pages_free(tm->grads, tm->params_bytes);
    dsmoe_free(tm->inputs);
    dsmoe_free(tm->targets);
    dsmoe_free(tm->h_fin);
    dsmoe_free(tm->x_fin);
    dsmoe_free(tm->inv_fin);
    dsmoe_free(tm->a);
    dsmoe_free(tm->dh);
    dsmoe_free(tm->dx);
    dsmoe_free(tm->dlogits);
    dsmoe_free(tm->dx_fin);
    dsmoe_free(tm->glog);
    dsmoe_free(tm->dcat);
    dsmoe_free(tm->de);
    dsmoe_free(tm->ws);
    dsmoe_free(tm->moe_ws);
    dsmoe_free(tm->bal_ws);
    dsmoe_free(tm->gcounts);
    free(tm);
}

/* The part of a MoE tensor's name after "model.layers.<l>.mlp.", or NULL. */
static const char *moe_suffix(const char *name) {
    const char *p = strstr(name, ".mlp.");
    return p ? p + 5 : NULL;
}

static int is_name(const dsmoe_model_tensor_spec *s, const char *suffix) {
    size_t n = strlen(s->name), k = strlen(suffix);
    return n >= k && strcmp(s->name + n - k, suffix) == 0;
}

/* Points the layer structs at the tensors of the parameter and gradient arrays. */
static void bind_tensor(dsmoe_train_model *tm, const tm_tensor *t) {
    const dsmoe_model_tensor_spec *s = &t->spec;
    if (t->offset < 0 || t->moe >= 0) return;
    float *p = tm->params + t->offset, *g = tm->grads + t->offset;
    if (s->layer < 0) {
        if (strcmp(s->name, "model.embed_tokens.weight") == 0) tm->embed = p, tm->g_embed = g;
        else if (strcmp(s->name, "model.norm.weight") == 0) tm->norm = p, tm->g_norm = g;
        else if (strcmp(s->name, "lm_head.weight") == 0) tm->head = p, tm->g_head = g;
        return;
    }
    if (s->mtp) {
        tm_depth *dp = &tm->depths[s->layer - tm->L];
#define B1(suf, pf, gf)                                                                            \
    if (is_name(s, suf) && !strstr(s->name, ".mlp.") && !strstr(s->name, "self_attn")) {           \
        dp->pf = p;                                                                                \
        dp->gf = g;                                                                                \
        return;                                                                                    \
    }
        B1(".enorm.weight", enorm, g_enorm)
        B1(".hnorm.weight", hnorm, g_hnorm)
        B1(".eh_proj.weight", eh_proj, g_eh_proj)
        B1(".shared_head.norm.weight", sh_norm, g_sh_norm)
#undef B1
    }
    tm_layer *ly = &tm->layers[s->layer];
#define B2(suf, pf, gf)                                                                            \
    if (is_name(s, suf)) {                                                                         \
        ly->pf = p;                                                                                \
        ly->gf = g;                                                                                \
        return;                                                                                    \
    }
    B2("input_layernorm.weight", w_in, g_in)
    B2("post_attention_layernorm.weight", w_post, g_post)
    B2("self_attn.q_proj.weight", mla.q_proj, mla_g.q_proj)
    B2("self_attn.q_a_proj.weight", mla.q_a_proj, mla_g.q_a_proj)
    B2("self_attn.q_a_layernorm.weight", mla.q_a_norm, mla_g.q_a_norm)
    B2("self_attn.q_b_proj.weight", mla.q_b_proj, mla_g.q_b_proj)
    B2("self_attn.kv_a_proj_with_mqa.weight", mla.kv_a_proj, mla_g.kv_a_proj)
    B2("self_attn.kv_a_layernorm.weight", mla.kv_a_norm, mla_g.kv_a_norm)
    B2("self_attn.kv_b_proj.weight", mla.kv_b_proj, mla_g.kv_b_proj)
    B2("self_attn.o_proj.weight", mla.o_proj, mla_g.o_proj)
    B2("mlp.gate_proj.weight", mlp.gate, mlp_g.gate)
    B2("mlp.up_proj.weight", mlp.up, mlp_g.up)
    B2("mlp.down_proj.weight", mlp.down, mlp_g.down)
#undef B2
}

#define ALLOC(ptr, bytes)                                                                          \
    do {                                                                                           \
        if (!((ptr) = dsmoe_malloc((bytes) > 0 ? (bytes) : 64))) goto oom;                         \
        memset((ptr), 0, (bytes) > 0 ? (bytes) : 64);                                              \
    } while (0)

/* Routed expert e of MoE tensor t ("...mlp.experts.<e>."), or -1. */
static int32_t tensor_expert(const tm_tensor *t) {
    if (t->moe < 0) return -1;
    const char *p = strstr(t->spec.name, ".mlp.experts.");
    return p ? (int32_t)strtol(p + 13, NULL, 10) : -1;
}

/* Tensor t is a routed expert's that this model does not hold. */
static int not_held(const dsmoe_train_model *tm, const tm_tensor *t) {
    const int32_t e = tm->sharded ? tensor_expert(t) : -1;
    return e >= 0 && (e < tm->ex_first || e > tm->ex_last);
}

/* The float offset of expert 0 of layer moe in the parameter array and the floats per
 * expert (the layer's layout: experts back to back, each padded to 16 floats). */
static dsmoe_status expert_layout(const dsmoe_train_model *tm, dsmoe_moe *moe, int64_t *lo,
                                  int64_t *stride) {
    dsmoe_moe_tensor g0, d0, g1;
    dsmoe_status st;
    if ((st = dsmoe_moe_tensor_get(moe, "experts.0.gate_proj.weight", &g0)) != DSMOE_OK ||
        (st = dsmoe_moe_tensor_get(moe, "experts.0.down_proj.weight", &d0)) != DSMOE_OK)
        return st;
    *lo = (int64_t)((const float *)g0.data - tm->params);
    const int64_t d_off = (int64_t)((const float *)d0.data - tm->params);
    *stride = d_off - *lo + ((d0.shape[0] * d0.shape[1] + 15) & ~(int64_t)15);
    if (tm->E > 1) {
        if ((st = dsmoe_moe_tensor_get(moe, "experts.1.gate_proj.weight", &g1)) != DSMOE_OK) return st;
        if ((int64_t)((const float *)g1.data - tm->params) - *lo != *stride)
            return dsmoe__error(DSMOE_STATUS_INTERNAL, "train model: unexpected expert layout");
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_train_model_create(const dsmoe_model_config *cfg,
                                      const dsmoe_train_model_options *opts,
                                      dsmoe_train_model **out) {
    return dsmoe_train_model_create_sharded(cfg, opts, 0, cfg ? cfg->n_routed_experts - 1 : -1, out);
}

dsmoe_status dsmoe_train_model_create_sharded(const dsmoe_model_config *cfg,
                                              const dsmoe_train_model_options *opts,
                                              int32_t first, int32_t last,
                                              dsmoe_train_model **out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "train model: NULL out");
    *out = NULL;
    if (!cfg) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "train model: NULL config");
    dsmoe_status st = dsmoe_model_config_validate(cfg);
    if (st != DSMOE_OK) return st;
    const int32_t E_all = cfg->n_routed_experts;
    if (E_all > 0 && !(first >= 0 && last >= first - 1 && last < E_all))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "train model: expert shard %d .. %d outside 0 .. %d", (int)first,
                            (int)last, (int)E_all - 1);
    dsmoe_train_model_options o;
    if (opts) o = *opts;
    else dsmoe_train_model_options_default(&o);
    if (o.batch < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "train model: batch must be >= 1, found %d",
                            (int)o.batch);
    if (o.seq_len < 1 || o.seq_len > cfg->max_position_embeddings)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "train model: seq_len must be in 1 .. max_position_embeddings (%lld), "
                            "found %d",
                            (long long)cfg->max_position_embeddings, (int)o.seq_len);
    if (!(o.init_std > 0 && isfinite(o.init_std)))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "train model: init_std must be a positive number, found %g",
                            (double)o.init_std);
    if (!(o.balance_alpha >= 0 && isfinite(o.balance_alpha)))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "train model: balance_alpha must be >= 0, found %g",
                            (double)o.balance_alpha);
    if (o.mtp_depths > cfg->num_nextn_predict_layers)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "train model: mtp_depths %d above num_nextn_predict_layers %d",
                            (int)o.mtp_depths, (int)cfg->num_nextn_predict_layers);
    if (o.balance_kind != DSMOE_BALANCE_LOSS_SEQ && o.balance_kind != DSMOE_BALANCE_LOSS_EXPERT &&
        o.balance_kind != DSMOE_BALANCE_LOSS_SWITCH && o.balance_kind != DSMOE_BALANCE_LOSS_ZLOSS)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "train model: balance_kind must be seq, expert, switch or zloss, "
                            "found %d",
                            (int)o.balance_kind);
    if (!(o.mtp_lambda >= 0 && isfinite(o.mtp_lambda)))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "train model: mtp_lambda must be >= 0, found %g", (double)o.mtp_lambda);

    dsmoe_train_model *tm = (dsmoe_train_model *)calloc(1, sizeof *tm);
    if (!tm) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "train model: out of memory");
    tm->cfg = *cfg;
    tm->opt = o;
    tm->nt = dsmoe__threads(o.n_threads);
    tm->B = o.batch;
    tm->T = o.seq_len;
    tm->N = tm->B * tm->T;
    tm->D = cfg->hidden_size;
    tm->V = cfg->vocab_size;
    tm->L = cfg->num_hidden_layers;
    tm->E = cfg->n_routed_experts;
    tm->Dm = o.mtp_depths < 0 ? cfg->num_nextn_predict_layers : o.mtp_depths;
    tm->LT = tm->L + tm->Dm;
    tm->ignore_id = cfg->byte_vocab ? DSMOE_BYTE_VOCAB_PAD : -1;
    tm->ex_first = tm->E > 0 ? first : 0;
    tm->ex_last = tm->E > 0 ? last : -1;
    const int64_t N = tm->N, D = tm->D;

    dsmoe_moe_config mc;
    memset(&mc, 0, sizeof mc);
    tm->n_moe = 0;
    for (int32_t l = 0; l < tm->LT; l++) tm->n_moe += dsmoe_model_layer_is_moe(cfg, l) ? 1 : 0;
    if (tm->n_moe > 0) {
        if ((st = dsmoe_model_moe_config(cfg, &mc)) != DSMOE_OK) goto fail;
        mc.train = 1;
        mc.max_tokens = N;
        mc.n_threads = tm->nt;
        tm->rc = mc.router;
        dsmoe_balance_loss_config_default((dsmoe_balance_loss_kind)o.balance_kind, &tm->blc);
        tm->blc.alpha = o.balance_alpha;
        tm->blc.seq_len = o.balance_kind == DSMOE_BALANCE_LOSS_SEQ ? tm->T : 0;
    }

    /* The layout. */
    tm->n_tensors = dsmoe_model_tensor_count(cfg, tm->Dm);
    if (tm->n_tensors < 0) {
        st = DSMOE_STATUS_INVALID_CONFIG;
        goto fail;
    }
    tm->tensors = (tm_tensor *)calloc((size_t)tm->n_tensors, sizeof *tm->tensors);
    tm->layers = (tm_layer *)calloc((size_t)tm->LT, sizeof *tm->layers);
    tm->depths = (tm_depth *)calloc((size_t)(tm->Dm > 0 ? tm->Dm : 1), sizeof *tm->depths);
    tm->moe_layer = (int32_t *)calloc((size_t)(tm->n_moe > 0 ? tm->n_moe : 1), sizeof(int32_t));
    tm->moe_exp = (int64_t *)calloc((size_t)(tm->n_moe > 0 ? tm->n_moe : 1), sizeof(int64_t));
    tm->res = (int64_t *)calloc(2 * (size_t)tm->n_moe + 2, sizeof(int64_t) * 2);
    if (!tm->tensors || !tm->layers || !tm->depths || !tm->moe_layer || !tm->moe_exp || !tm->res)
        goto oom;
    tm->sharded = tm->n_moe > 0 && !(tm->ex_first == 0 && tm->ex_last == tm->E - 1);
    size_t off = 0;
    int64_t moe_block_off[1024];
    if (tm->LT > 1024) {
        st = dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "train model: num_hidden_layers above 1024");
        goto fail;
    }
    for (int64_t i = 0; i < tm->n_tensors; i++) {
        tm_tensor *t = &tm->tensors[i];
        if ((st = dsmoe_model_tensor_at(cfg, tm->Dm, i, &t->spec)) != DSMOE_OK) goto fail;
        t->n = t->spec.shape[0] * (t->spec.ndim == 2 ? t->spec.shape[1] : 1);
        t->moe = -1;
        int32_t l = t->spec.layer;
        if (t->spec.mtp && (is_name(&t->spec, ".embed_tokens.weight") ||
                            is_name(&t->spec, ".shared_head.head.weight"))) {
            t->offset = -3; /* the main model's embedding and head, shared */
            continue;
        }
        if (l >= 0 && dsmoe_model_layer_is_moe(cfg, l) && moe_suffix(t->spec.name)) {
            int32_t k = 0;
            for (int32_t j = 0; j < l; j++) k += dsmoe_model_layer_is_moe(cfg, j) ? 1 : 0;
            t->moe = k;
            if (is_name(&t->spec, "mlp.gate.weight")) { /* the first of the layer's block */
                tm->moe_layer[k] = l;
                moe_block_off[l] = (int64_t)off;
                off += (dsmoe_moe_param_count(&mc) + 15) & ~(size_t)15;
            }
            t->offset = -2; /* resolved once the layer exists */
            continue;
        }
        t->offset = (int64_t)off;
        off += ((size_t)t->n + 15) & ~(size_t)15;
    }
    tm->n_params = off;
    /* Page allocations of zeros: a page becomes resident when first written, so the
     * experts a sharded model does not hold never are (below). */
    tm->params_bytes = (off > 0 ? off : 16) * sizeof(float);
    if (!(tm->params = (float *)dsmoe__pages_alloc(tm->params_bytes, !tm->sharded)) ||
        !(tm->grads = (float *)dsmoe__pages_alloc(tm->params_bytes, !tm->sharded)))
        goto oom;

    /* Workspaces and activations. */
    size_t ws = dsmoe__mla_train_workspace_size(cfg, tm->B, tm->T);
    size_t w2 = dsmoe__swiglu_workspace_size(cfg->intermediate_size, N);
    size_t w3 = dsmoe__head_loss_workspace_size(tm->V, N);
    if (w2 > ws) ws = w2;
    if (w3 > ws) ws = w3;
    tm->ws_size = ws;
    ALLOC(tm->ws, ws);
    tm->mla_save_size = dsmoe__mla_save_size(cfg, tm->B, tm->T);
    tm->ffn_save_size = dsmoe__swiglu_save_size(cfg->intermediate_size, N);
    if (tm->n_moe > 0) {
        tm->moe_ws_size = dsmoe_moe_workspace_size(&mc, N, tm->nt);
        if (!tm->moe_ws_size) {
            st = DSMOE_STATUS_INVALID_CONFIG;
            goto fail;
        }
        ALLOC(tm->moe_ws, tm->moe_ws_size);
        tm->bal_ws_size = dsmoe_balance_loss_workspace_size(&tm->blc, &tm->rc, N);
        ALLOC(tm->bal_ws, tm->bal_ws_size);
        ALLOC(tm->dlogits, (size_t)(N * tm->E) * sizeof(float));
    }
    const size_t ND = (size_t)(N * D) * sizeof(float);
    ALLOC(tm->inputs, (size_t)N * sizeof(int32_t));
    ALLOC(tm->targets, (size_t)N * sizeof(int32_t));
    ALLOC(tm->h_fin, ND);
    ALLOC(tm->x_fin, ND);
    ALLOC(tm->inv_fin, (size_t)N * sizeof(float));
    ALLOC(tm->a, ND);
    ALLOC(tm->dh, ND);
    ALLOC(tm->dx, ND);
    ALLOC(tm->dx_fin, ND);
    ALLOC(tm->glog, (size_t)N * (size_t)tm->V * sizeof(float));
    if (tm->Dm > 0) {
        ALLOC(tm->dcat, 2 * ND);
        ALLOC(tm->de, ND);
    }
    for (int32_t d = 0; d < tm->Dm; d++) {
        tm_depth *dp = &tm->depths[d];
        ALLOC(dp->tok, (size_t)N * sizeof(int32_t));
        ALLOC(dp->tgt, (size_t)N * sizeof(int32_t));
        ALLOC(dp->glog, (size_t)N * (size_t)tm->V * sizeof(float));
        ALLOC(dp->e, ND);
        ALLOC(dp->cat, 2 * ND);
        ALLOC(dp->inv_e, (size_t)N * sizeof(float));
        ALLOC(dp->inv_h, (size_t)N * sizeof(float));
        ALLOC(dp->h_out, ND);
        ALLOC(dp->x_sh, ND);
        ALLOC(dp->inv_sh, (size_t)N * sizeof(float));
    }
    for (int32_t l = 0, k = 0; l < tm->LT; l++) {
        tm_layer *ly = &tm->layers[l];
        ALLOC(ly->h_in, ND);
        ALLOC(ly->h_mid, ND);
        ALLOC(ly->x1, ND);
        ALLOC(ly->x2, ND);
        ALLOC(ly->inv1, (size_t)N * sizeof(float));
        ALLOC(ly->inv2, (size_t)N * sizeof(float));
        /* whole pages, not a 2 MiB-rounded buffer: a layer's attention probabilities
         * (grad_mla.c) took its save just past dsmoe_malloc's huge-page size */
        if (!(ly->mla_save = dsmoe__pages_alloc(tm->mla_save_size, 1))) goto oom;
        if (dsmoe_model_layer_is_moe(cfg, l)) {
            dsmoe_moe_buffers b = {tm->params + moe_block_off[l], tm->grads + moe_block_off[l],
                                   tm->moe_ws, tm->moe_ws_size};
            if ((st = dsmoe_moe_create_with(&mc, &b, &ly->moe)) != DSMOE_OK) goto fail;
            int64_t lo = 0, stride = 0;
            if ((st = expert_layout(tm, ly->moe, &lo, &stride)) != DSMOE_OK) goto fail;
            tm->moe_exp[k] = lo;
            tm->ex_stride = stride;
            if (tm->sharded) {
                /* The layer writes only pieces of its block that are not zero already,
                 * yet its creation still makes most of the other experts' pages
                 * resident (test_train_dp's mincore check): give them back at once. */
                const int64_t a = lo + (int64_t)tm->ex_first * stride,
                              b2 = lo + (int64_t)(tm->ex_last + 1) * stride,
                              z = lo + (int64_t)tm->E * stride;
                float *arr[2] = {tm->params, tm->grads};
                for (int j = 0; j < 2; j++) {
                    dsmoe__pages_release(arr[j], (size_t)lo * sizeof(float),
                                         (size_t)(a - lo) * sizeof(float));
                    dsmoe__pages_release(arr[j], (size_t)b2 * sizeof(float),
                                         (size_t)(z - b2) * sizeof(float));
                }
            }
            k++;
        } else {
            ALLOC(ly->ffn_save, tm->ffn_save_size);
        }
    }
    /* Resolve the MoE tensors and bind everything. */
    for (int64_t i = 0; i < tm->n_tensors; i++) {
        tm_tensor *t = &tm->tensors[i];
        if (t->moe >= 0) {
            dsmoe_moe_tensor mt;
            dsmoe_moe *moe = tm->layers[t->spec.layer].moe;
            if ((st = dsmoe_moe_tensor_get(moe, moe_suffix(t->spec.name), &mt)) != DSMOE_OK)
                goto fail;
            if (mt.shape[0] != t->spec.shape[0] ||
                (t->spec.ndim == 2 && mt.shape[1] != t->spec.shape[1])) {
                st = dsmoe__error(DSMOE_STATUS_SHAPE_MISMATCH, "train model: %s: MoE layer shape differs",
                                  t->spec.name);
                goto fail;
            }
            t->offset = mt.trainable ? (int64_t)((float *)mt.data - tm->params) : -1;
        }
        bind_tensor(tm, t);
    }
    if (cfg->tie_word_embeddings) tm->head = tm->embed, tm->g_head = tm->g_embed;
    /* The ranges held: everything but the experts outside [ex_first, ex_last]. */
    {
        int64_t cur = 0;
        for (int32_t k = 0; k < (tm->sharded ? tm->n_moe : 0); k++) {
            const int64_t lo = tm->moe_exp[k];
            tm->res[2 * tm->n_res] = cur; /* the replicated tensors before the experts */
            tm->res[2 * tm->n_res + 1] = lo;
            tm->n_res++;
            if (tm->ex_last >= tm->ex_first) { /* the experts held */
                tm->res[2 * tm->n_res] = lo + (int64_t)tm->ex_first * tm->ex_stride;
                tm->res[2 * tm->n_res + 1] = lo + (int64_t)(tm->ex_last + 1) * tm->ex_stride;
                tm->n_res++;
            }
            cur = lo + (int64_t)tm->E * tm->ex_stride;
        }
        tm->res[2 * tm->n_res] = cur;
        tm->res[2 * tm->n_res + 1] = (int64_t)tm->n_params;
        tm->n_res++;
    }

    /* Initialisation: tensor i from the stream (seed, i); a sharded model skips the
     * experts it does not hold (each tensor has its own stream: the others' values are
     * one process's). */
    for (int64_t i = 0; i < tm->n_tensors; i++) {
        tm_tensor *t = &tm->tensors[i];
        if (t->offset < 0) continue; /* the bias: 0 from create */
        if (not_held(tm, t)) continue;
        float *p = tm->params + t->offset;
        if (t->spec.ndim == 1) {
            for (int64_t j = 0; j < t->n; j++) p[j] = 1.0f;
            continue;
        }
        dsmoe_rng r;
        dsmoe_rng_seed(&r, o.seed * 0x9E3779B97F4A7C15ull + (uint64_t)i + 1u);
        for (int64_t j = 0; j < t->n; j++) p[j] = (float)(dsmoe_rng_normal(&r) * o.init_std);
    }
    *out = tm;
    return DSMOE_OK;
oom:
    st = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "train model: out of memory");
fail:
    dsmoe_train_model_free(tm);
    return st;
}

const dsmoe_model_config *dsmoe_train_model_config(const dsmoe_train_model *tm) {
    return tm ? &tm->cfg : NULL;
}

float *dsmoe_train_model_params(dsmoe_train_model *tm, size_t *n) {
    if (n) *n = tm ? tm->n_params : 0;
    return tm ? tm->params : NULL;
}

float *dsmoe_train_model_grads(dsmoe_train_model *tm, size_t *n) {
    if (n) *n = tm ? tm->n_params : 0;
    return tm ? tm->grads : NULL;
}

int64_t dsmoe_train_model_tensor_count(const dsmoe_train_model *tm) {
    return tm ? tm->n_tensors : 0;
}

dsmoe_status dsmoe_train_model_tensor(dsmoe_train_model *tm, int64_t i, dsmoe_train_tensor *out) {
    if (!tm || !out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "train model tensor: NULL");
    if (i < 0 || i >= tm->n_tensors)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "train model tensor: index %lld outside 0 .. %lld", (long long)i,
                            (long long)tm->n_tensors - 1);
    const tm_tensor *t = &tm->tensors[i];
    memset(out, 0, sizeof *out);
    out->spec = t->spec;
    out->n = t->n;
    out->offset = t->offset < 0 ? -1 : t->offset;
    if (t->offset == -3) { /* an MTP depth's embedding or head: the main model's */
        out->data = (float *)(is_name(&t->spec, ".embed_tokens.weight") ? tm->embed : tm->head);
    } else if (t->offset >= 0) {
        out->data = tm->params + t->offset;
        out->grad = tm->grads + t->offset;
        out->trainable = 1;
        out->decay = t->spec.ndim == 2;
    } else {
        out->data = (float *)dsmoe_moe_bias(tm->layers[t->spec.layer].moe);
    }
    return DSMOE_OK;
}

int32_t dsmoe_train_model_moe_count(const dsmoe_train_model *tm) { return tm ? tm->n_moe : 0; }

int dsmoe_train_model_expert_shard(const dsmoe_train_model *tm, int32_t *first, int32_t *last) {
    if (first) *first = tm ? tm->ex_first : 0;
    if (last) *last = tm ? tm->ex_last : -1;
    return tm ? tm->sharded : 0;
}

dsmoe_status dsmoe_train_model_expert_range(const dsmoe_train_model *tm, int32_t k, int32_t e,
                                            int64_t *offset, int64_t *n) {
    if (!tm || !offset || !n)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "train model expert_range: NULL");
    if (k < 0 || k >= tm->n_moe || e < 0 || e >= tm->E)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "train model expert_range: MoE layer %d, expert %d out of range",
                            (int)k, (int)e);
    *offset = tm->moe_exp[k] + (int64_t)e * tm->ex_stride;
    *n = tm->ex_stride;
    return DSMOE_OK;
}

int32_t dsmoe_train_model_tensor_expert(const dsmoe_train_model *tm, int64_t i, int32_t *k) {
    if (!tm || i < 0 || i >= tm->n_tensors) return -1;
    const tm_tensor *t = &tm->tensors[i];
    const int32_t e = tensor_expert(t);
    if (e >= 0 && k) *k = t->moe;
    return e;
}

int32_t dsmoe_train_model_moe_layer(const dsmoe_train_model *tm, int32_t k) {
    return tm && k >= 0 && k < tm->n_moe ? tm->moe_layer[k] : -1;
}

/* The k of MoE layer l. */
static int32_t moe_index(const dsmoe_train_model *tm, int32_t l) {
    for (int32_t k = 0; k < tm->n_moe; k++)
        if (tm->moe_layer[k] == l) return k;
    return -1;
}

static const dsmoe_moe_routing *layer_routing(const dsmoe_train_model *tm, int32_t l) {
    if (tm->exec.forward) return tm->exec.routing(tm->exec.ctx, moe_index(tm, l));
    return dsmoe_moe_last_routing(tm->layers[l].moe);
}

const dsmoe_moe_routing *dsmoe_train_model_routing(const dsmoe_train_model *tm, int32_t k) {
    if (!tm || k < 0 || k >= tm->n_moe || !tm->have_forward) return NULL;
    return layer_routing(tm, tm->moe_layer[k]);
}

dsmoe_moe *dsmoe_train_model_moe(dsmoe_train_model *tm, int32_t k) {
    return tm && k >= 0 && k < tm->n_moe ? tm->layers[tm->moe_layer[k]].moe : NULL;
}

dsmoe_status dsmoe_train_model_set_counts_sum(dsmoe_train_model *tm,
                                             int (*fn)(void *ctx, int64_t *x, int64_t n),
                                             void *ctx) {
    if (!tm) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "train model set_counts_sum: NULL");
    if (fn && !tm->gcounts && tm->n_moe > 0) {
        /* a row per MoE layer and a spare one for the error flag of a failed loss */
        const size_t bytes = (size_t)(tm->n_moe + 1) * (size_t)(tm->E + 2) * sizeof(int64_t);
        if (!(tm->gcounts = (int64_t *)dsmoe_malloc(bytes)))
            return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY,
                                "train model set_counts_sum: out of memory");
        memset(tm->gcounts, 0, bytes);
    }
    tm->counts_sum = fn;
    tm->counts_ctx = fn ? ctx : NULL;
    tm->cs_used = 0;
    tm->have_forward = 0; /* a backward must follow a loss of the new kind */
    return DSMOE_OK;
}

/* The balance loss of MoE layer l over the N rows in the forward (dlogits NULL) or its
 * gradient into dlogits (backward). With the counts sum in use (tm->cs_used), f comes
 * from the counts the forward summed over the processes: the forward makes the call of
 * E + 2 values (counts, rows, error flag 0) and keeps the result for the backward. */
static dsmoe_status layer_balance_loss(dsmoe_train_model *tm, int32_t l, double *bl,
                                       float *dlogits) {
    const dsmoe_moe_routing *r = layer_routing(tm, l);
    const int64_t N = tm->N;
    if (!tm->cs_used)
        return dsmoe_balance_loss(&tm->blc, &tm->rc, bl, dlogits, r->scores, r->indices,
                                  r->logits, N, tm->bal_ws, tm->bal_ws_size, tm->nt);
    const int32_t k = moe_index(tm, l), E = tm->E;
    int64_t *g = tm->gcounts + (size_t)k * (size_t)(E + 2);
    if (!dlogits) {
        dsmoe_status st = dsmoe_load_counts(g, r->indices, NULL, N, tm->rc.top_k, E);
        if (st != DSMOE_OK) return st; /* the caller sends the error flag */
        g[E] = N;
        g[E + 1] = 0;
        tm->cs_next = k + 1 < tm->n_moe ? k + 1 : -1;
        if (tm->counts_sum(tm->counts_ctx, g, E + 2)) {
            tm->cs_next = -1;
            return dsmoe__error(DSMOE_STATUS_IO,
                                "train model: the sum of MoE layer %d's counts over the "
                                "processes failed", (int)l);
        }
        if (g[E + 1] != 0) {
            tm->cs_next = -1; /* every process fails here */
            return dsmoe__error(DSMOE_STATUS_IO,
                                "train model: MoE layer %d: another process failed in this loss",
                                (int)l);
        }
    }
    return dsmoe_balance_loss_ex(&tm->blc, &tm->rc, bl, dlogits, r->scores, r->indices,
                                 r->logits, N, g, g[E], tm->bal_ws, tm->bal_ws_size, tm->nt);
}

dsmoe_status dsmoe_train_model_set_moe_exec(dsmoe_train_model *tm, const dsmoe_train_moe_exec *ex) {
    if (!tm) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "train model set_moe_exec: NULL");
    if (ex && (!ex->forward || !ex->backward || !ex->routing))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "train model set_moe_exec: forward, backward and routing are all needed");
    if (ex) tm->exec = *ex;
    else memset(&tm->exec, 0, sizeof tm->exec);
    tm->have_forward = 0;
    return DSMOE_OK;
}

const float *dsmoe_train_model_bias(const dsmoe_train_model *tm, int32_t k) {
    if (!tm || k < 0 || k >= tm->n_moe) return NULL;
    return dsmoe_moe_bias(tm->layers[tm->moe_layer[k]].moe);
}

dsmoe_status dsmoe_train_model_set_bias(dsmoe_train_model *tm, int32_t k, const float *bias) {
    if (!tm || !bias) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "train model set_bias: NULL");
    if (k < 0 || k >= tm->n_moe)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "train model set_bias: MoE layer %d outside 0 .. %d", (int)k,
                            (int)tm->n_moe - 1);
    return dsmoe_moe_set_bias(tm->layers[tm->moe_layer[k]].moe, bias);
}

/* The norm the stream takes after a block (the next block's input norm, the final norm or an
 * MTP depth's shared-head norm): block_forward adds its residual and applies it in one pass
 * (dsmoe__add_rmsnorm_train_forward: the same bits as the add and the norm apart). */
typedef struct next_norm {
    const float *w;
    float *y, *inv;
} next_norm;

/* Block l (a main layer or an MTP depth's) on the stream h_in = layers[l].h_in: h_out =
 * h_in + MLA(norm(h_in)) + FFN(norm(.)), and nx->y = nx's norm of h_out; adds the balance
 * loss of a MoE block to *bal. normed: the block's input norm (x1, inv1) was already
 * applied by the block before. */
static dsmoe_status block_forward(dsmoe_train_model *tm, int32_t l, float *h_out, double *bal,
                                  int normed, const next_norm *nx) {
    const int64_t B = tm->B, T = tm->T, N = tm->N;
    const int32_t D = tm->D;
    const int nt = tm->nt;
    const float eps = tm->cfg.rms_norm_eps;
    tm_layer *ly = &tm->layers[l];
    dsmoe_status st;
    PROF_BEGIN();
    if (!normed) {
        dsmoe__rmsnorm_train_forward(ly->x1, ly->inv1, ly->h_in, ly->w_in, N, D, D, D, eps, nt);
        PROF_END(PROF_NORM);
    }
    if ((st = dsmoe__mla_train_forward(&tm->cfg, &ly->mla, tm->a, ly->x1, B, T, ly->mla_save,
                                       tm->mla_save_size, tm->ws, tm->ws_size, nt)) != DSMOE_OK)
        return st;
    PROF_END(PROF_MLA_F);
    dsmoe__add_rmsnorm_train_forward(ly->h_mid, ly->x2, ly->inv2, ly->h_in, tm->a, ly->w_post, N,
                                     D, eps, nt);
    PROF_END(PROF_NORM);
    if (ly->moe) {
        if ((st = tm->exec.forward
                      ? tm->exec.forward(tm->exec.ctx, moe_index(tm, l), tm->a, ly->x2, N, nt)
                      : dsmoe_moe_forward(ly->moe, tm->a, ly->x2, N, nt)) != DSMOE_OK)
            return st;
        PROF_END(PROF_MOE_F);
        if (tm->blc.alpha > 0) {
            double bl = 0;
            if ((st = layer_balance_loss(tm, l, &bl, NULL)) != DSMOE_OK) return st;
            *bal += bl;
            PROF_END(PROF_BAL_F);
        }
    } else if ((st = dsmoe__swiglu_train_forward(tm->a, ly->x2, &ly->mlp, N, D,
                                                 tm->cfg.intermediate_size, ly->ffn_save,
                                                 tm->ffn_save_size, tm->ws, tm->ws_size, nt)) !=
               DSMOE_OK) {
        return st;
    }
    PROF_END(PROF_FFN_F);
    dsmoe__add_rmsnorm_train_forward(h_out, nx->y, nx->inv, ly->h_mid, tm->a, nx->w, N, D, eps, nt);
    PROF_END(PROF_RESID);
    return DSMOE_OK;
}

/* Backward of block l: dh (N, D) holds dL/dh_out on entry and dL/dh_in on return. */
static dsmoe_status block_backward(dsmoe_train_model *tm, int32_t l, float *dh) {
    const int64_t B = tm->B, T = tm->T, N = tm->N;
    const int32_t D = tm->D;
    const int nt = tm->nt;
    float *dx = tm->dx;
    tm_layer *ly = &tm->layers[l];
    dsmoe_status st;
    PROF_BEGIN();
    if (ly->moe) {
        const float *dl = NULL;
        if (tm->blc.alpha > 0) {
            double bl = 0;
            memset(tm->dlogits, 0, (size_t)(N * tm->E) * sizeof(float));
            if ((st = layer_balance_loss(tm, l, &bl, tm->dlogits)) != DSMOE_OK) return st;
            dl = tm->dlogits;
            PROF_END(PROF_BAL_B);
        }
        memset(dx, 0, (size_t)(N * D) * sizeof(float));
        if ((st = tm->exec.forward
                      ? tm->exec.backward(tm->exec.ctx, moe_index(tm, l), dx, dh, ly->x2, dl, N, nt)
                      : dsmoe_moe_backward(ly->moe, dx, dh, ly->x2, dl, N, nt)) != DSMOE_OK)
            return st;
        PROF_END(PROF_MOE_B);
    } else {
        dsmoe__mlp_grads mg = ly->mlp_g;
        if ((st = dsmoe__swiglu_train_backward(dx, &mg, dh, ly->x2, &ly->mlp, N, D,
                                               tm->cfg.intermediate_size, ly->ffn_save,
                                               tm->ffn_save_size, tm->ws, tm->ws_size, 0, nt)) !=
            DSMOE_OK)
            return st;
        PROF_END(PROF_FFN_B);
    }
    dsmoe__rmsnorm_backward(dh, ly->g_post, dx, ly->h_mid, ly->w_post, ly->inv2, N, D, D, D, D, 1,
                            nt);
    PROF_END(PROF_NORM_B);
    if ((st = dsmoe__mla_train_backward(&tm->cfg, &ly->mla, &ly->mla_g, dx, dh, ly->x1, B, T,
                                        ly->mla_save, tm->mla_save_size, tm->ws, tm->ws_size, 0,
                                        nt)) != DSMOE_OK)
        return st;
    PROF_END(PROF_MLA_B);
    dsmoe__rmsnorm_backward(dh, ly->g_in, dx, ly->h_in, ly->w_in, ly->inv1, N, D, D, D, D, 1, nt);
    PROF_END(PROF_NORM_B);
    return DSMOE_OK;
}

/* The hidden state an MTP depth d starts from: the main model's final-norm output for
 * d = 0, the previous depth's block output otherwise. */
static const float *depth_prev(const dsmoe_train_model *tm, int32_t d) {
    return d == 0 ? tm->x_fin : tm->depths[d - 1].h_out;
}

static dsmoe_status train_loss(dsmoe_train_model *tm, const int32_t *tokens,
                               dsmoe_train_loss *out, int32_t use_sum) {
    const int64_t B = tm->B, T = tm->T, N = tm->N;
    const int32_t D = tm->D, V = tm->V;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t <= T; t++) {
            int32_t v = tokens[b * (T + 1) + t];
            if (v < 0 || v >= V)
                return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                    "train model loss: token %d at sequence %lld, position %lld is "
                                    "outside 0 .. %d",
                                    (int)v, (long long)b, (long long)t, (int)V - 1);
        }
    if (tm->sharded && !tm->exec.forward)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "train model loss: the model holds routed experts %d .. %d only: its "
                            "MoE layers need an exec that runs the others elsewhere "
                            "(dsmoe_train_model_set_moe_exec)",
                            (int)tm->ex_first, (int)tm->ex_last);
    tm->have_forward = 0;
    tm->cs_used = use_sum;
    for (int64_t b = 0; b < B; b++) {
        memcpy(tm->inputs + b * T, tokens + b * (T + 1), (size_t)T * sizeof(int32_t));
        memcpy(tm->targets + b * T, tokens + b * (T + 1) + 1, (size_t)T * sizeof(int32_t));
    }
    const int nt = tm->nt;
    const float eps = tm->cfg.rms_norm_eps;
    dsmoe_status st;
    double bal = 0.0;
    float *h = tm->L > 0 ? tm->layers[0].h_in : tm->h_fin;
    PROF_BEGIN();
    if ((st = dsmoe__embed_forward(h, tm->embed, tm->inputs, N, D, V, nt)) != DSMOE_OK) return st;
    PROF_END(PROF_EMBED);
    /* Each block's residual add takes the next norm along: the next block's input norm,
     * after the last block the final norm. */
    for (int32_t l = 0; l < tm->L; l++) {
        const int last = l + 1 == tm->L;
        float *h_next = last ? tm->h_fin : tm->layers[l + 1].h_in;
        const next_norm nx = last ? (next_norm){tm->norm, tm->x_fin, tm->inv_fin}
                                  : (next_norm){tm->layers[l + 1].w_in, tm->layers[l + 1].x1,
                                                tm->layers[l + 1].inv1};
        if ((st = block_forward(tm, l, h_next, &bal, l > 0, &nx)) != DSMOE_OK) return st;
    }
    PROF_RESTART(); /* the blocks timed themselves */
    if (tm->L == 0) {
        dsmoe__rmsnorm_train_forward(tm->x_fin, tm->inv_fin, tm->h_fin, tm->norm, N, D, D, D, eps,
                                     nt);
        PROF_END(PROF_NORM);
    }
    double ce = 0;
    /* The head's losses keep their logits' gradients for the backward (weights as there). */
    const float wd = tm->Dm > 0 ? tm->opt.mtp_lambda / (float)tm->Dm : 0.0f;
    if ((st = dsmoe__head_loss_save(&ce, tm->glog, tm->x_fin, tm->head, tm->targets, tm->ignore_id,
                                    1.0f, N, D, V, tm->ws, tm->ws_size, nt)) != DSMOE_OK)
        return st;
    PROF_END(PROF_HEAD_F);
    /* MTP depth k = d + 1, position i: the embedding of token i + k and the previous
     * depth's state at i predict token i + k + 1 (ignored past the window's end). */
    double mtp = 0;
    for (int32_t d = 0; d < tm->Dm; d++) {
        tm_depth *dp = &tm->depths[d];
        const int64_t k = d + 1;
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < T; i++) {
                const int32_t *row = tokens + b * (T + 1);
                dp->tok[b * T + i] = row[i + k <= T ? i + k : T];
                dp->tgt[b * T + i] = i + k + 1 <= T ? row[i + k + 1] : tm->ignore_id;
            }
        if ((st = dsmoe__embed_forward(dp->e, tm->embed, dp->tok, N, D, V, nt)) != DSMOE_OK)
            return st;
        dsmoe__rmsnorm_train_forward(dp->cat, dp->inv_e, dp->e, dp->enorm, N, D, D, 2 * D, eps, nt);
        dsmoe__rmsnorm_train_forward(dp->cat + D, dp->inv_h, depth_prev(tm, d), dp->hnorm, N, D, D,
                                     2 * D, eps, nt);
        tm_layer *ly = &tm->layers[tm->L + d];
        dsmoe__linear_forward(ly->h_in, D, dp->cat, 2 * D, dp->eh_proj, N, 2 * D, D, nt);
        PROF_END(PROF_MTP_F);
        const next_norm nx = {dp->sh_norm, dp->x_sh, dp->inv_sh};
        if ((st = block_forward(tm, tm->L + d, dp->h_out, &bal, 0, &nx)) != DSMOE_OK) return st;
        PROF_RESTART();
        double l_d = 0;
        if ((st = dsmoe__head_loss_save(&l_d, dp->glog, dp->x_sh, tm->head, dp->tgt, tm->ignore_id,
                                        wd, N, D, V, tm->ws, tm->ws_size, nt)) != DSMOE_OK)
            return st;
        PROF_END(PROF_HEAD_F);
        mtp += l_d;
    }
    if (tm->Dm > 0) mtp /= tm->Dm;
    tm->have_forward = 1;
    out->ce = ce;
    out->mtp = mtp;
    out->balance = bal;
    out->total = ce + (double)tm->opt.mtp_lambda * mtp + bal;
    return DSMOE_OK;
}

dsmoe_status dsmoe_train_model_loss(dsmoe_train_model *tm, const int32_t *tokens,
                                    dsmoe_train_loss *out, unsigned flags) {
    if (!tm || !tokens || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "train model loss: NULL argument");
    if (flags & ~(unsigned)DSMOE_TRAIN_LOSS_LOCAL_COUNTS)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "train model loss: unknown flags %#x",
                            flags);
    /* the balance losses over the whole batch take f from the counts summed over the
     * processes, unless told otherwise */
    const int32_t use_sum = tm->counts_sum && tm->gcounts && tm->blc.alpha > 0 &&
                            !(flags & DSMOE_TRAIN_LOSS_LOCAL_COUNTS) &&
                            (tm->blc.kind == DSMOE_BALANCE_LOSS_EXPERT ||
                             tm->blc.kind == DSMOE_BALANCE_LOSS_SWITCH);
    tm->cs_next = use_sum ? 0 : -1;
    dsmoe_status st = train_loss(tm, tokens, out, use_sum);
    if (st != DSMOE_OK && tm->cs_next >= 0) {
        /* This process failed before MoE layer cs_next's sum, in which the others wait:
         * it joins that sum with the error flag set, so that they fail there too. */
        const int32_t E = tm->E;
        int64_t *g = tm->gcounts + (size_t)tm->n_moe * (size_t)(E + 2); /* the spare row */
        memset(g, 0, (size_t)(E + 2) * sizeof(int64_t));
        g[E + 1] = 1;
        (void)tm->counts_sum(tm->counts_ctx, g, E + 2);
        tm->cs_next = -1;
    }
    return st;
}

#define ZERO_CHUNK ((int64_t)1 << 16)

dsmoe_status dsmoe_train_model_backward(dsmoe_train_model *tm) {
    if (!tm) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "train model backward: NULL");
    if (!tm->have_forward)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "train model backward: no successful loss to differentiate");
    const int64_t N = tm->N;
    const int32_t D = tm->D, V = tm->V;
    const int nt = tm->nt;
    dsmoe_status st;
    PROF_BEGIN();
    /* The ranges held (all of it unless sharded), in chunks of 64 Ki floats on the
     * threads (34 MB at the default preset: one thread wrote it while the other waited). */
#pragma omp parallel num_threads(nt) if (nt > 1)
    for (int32_t j = 0; j < tm->n_res; j++) {
        const int64_t a = tm->res[2 * j], b = tm->res[2 * j + 1];
        const int64_t nc = (b - a + ZERO_CHUNK - 1) / ZERO_CHUNK;
#pragma omp for schedule(static) nowait
        for (int64_t c = 0; c < nc; c++) {
            const int64_t c0 = a + c * ZERO_CHUNK, c1 = c0 + ZERO_CHUNK < b ? c0 + ZERO_CHUNK : b;
            memset(tm->grads + c0, 0, (size_t)(c1 - c0) * sizeof(float));
        }
    }
    PROF_END(PROF_ZERO);
    float *dh = tm->dh;
    /* MTP depths, last first: dh carries dL/d(depth d's block output), the hnorm
     * backward hands dL/d(previous state) on (to dx_fin for depth 0). The heads' logits'
     * gradients come from the forward (weighted there). */
    for (int32_t d = tm->Dm - 1; d >= 0; d--) {
        tm_depth *dp = &tm->depths[d];
        if ((st = dsmoe__head_loss_grad(tm->dx, tm->g_head, dp->glog, dp->x_sh, tm->head, N, D, V, 0,
                                        nt)) != DSMOE_OK)
            return st;
        PROF_END(PROF_HEAD_B);
        dsmoe__rmsnorm_backward(dh, dp->g_sh_norm, tm->dx, dp->h_out, dp->sh_norm, dp->inv_sh, N, D,
                                D, D, D, d == tm->Dm - 1 ? 0 : 1, nt);
        PROF_END(PROF_NORM_B);
        if ((st = block_backward(tm, tm->L + d, dh)) != DSMOE_OK) return st;
        PROF_RESTART();
        dsmoe__linear_backward(tm->dcat, 2 * D, dp->g_eh_proj, dh, D, dp->cat, 2 * D, dp->eh_proj, N,
                               2 * D, D, 0, nt);
        dsmoe__rmsnorm_backward(tm->de, dp->g_enorm, tm->dcat, dp->e, dp->enorm, dp->inv_e, N, D, D,
                                2 * D, D, 0, nt);
        dsmoe__embed_backward(tm->g_embed, tm->de, dp->tok, N, D, nt);
        dsmoe__rmsnorm_backward(d == 0 ? tm->dx_fin : dh, dp->g_hnorm, tm->dcat + D, depth_prev(tm, d),
                                dp->hnorm, dp->inv_h, N, D, D, 2 * D, D, 0, nt);
        PROF_END(PROF_MTP_B);
    }
    if ((st = dsmoe__head_loss_grad(tm->dx_fin, tm->g_head, tm->glog, tm->x_fin, tm->head, N, D, V,
                                    tm->Dm > 0 ? 1 : 0, nt)) != DSMOE_OK)
        return st;
    PROF_END(PROF_HEAD_B);
    dsmoe__rmsnorm_backward(dh, tm->g_norm, tm->dx_fin, tm->h_fin, tm->norm, tm->inv_fin, N, D, D, D,
                            D, 0, nt);
    PROF_END(PROF_NORM_B);
    for (int32_t l = tm->L - 1; l >= 0; l--)
        if ((st = block_backward(tm, l, dh)) != DSMOE_OK) return st;
    PROF_RESTART();
    dsmoe__embed_backward(tm->g_embed, dh, tm->inputs, N, D, nt);
    PROF_END(PROF_EMBED);
    return DSMOE_OK;
}

dsmoe_status dsmoe__train_model_position_ce(dsmoe_train_model *tm, double *ce) {
    if (!tm || !ce || !tm->have_forward)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "train model position losses: no successful loss precedes");
    const int32_t D = tm->D, V = tm->V;
    for (int64_t t = 0; t < tm->N; t++) {
        dsmoe_status st = dsmoe__head_loss(&ce[t], NULL, NULL, NULL, tm->x_fin + t * D, tm->head,
                                           tm->targets + t, tm->ignore_id, 1.0f, 1, D, V, tm->ws,
                                           tm->ws_size, 0, 1);
        if (st != DSMOE_OK) return st;
    }
    return DSMOE_OK;
}
