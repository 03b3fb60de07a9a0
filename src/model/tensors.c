/*
 * tensors.c — the table of tensors a model configuration implies (Hugging Face
 * DeepseekV3 names and shapes, SPEC-model §2 and §7), enumerated by index without
 * storing it: the embedding, each layer's block, the final norm, the head, then the
 * MTP depths (layers L .. L + depths - 1), each with its extra tensors and a block.
 */
#include "model/model_internal.h"

#include <stdio.h>
#include <string.h>

static int spec_set(dsmoe_model_tensor_spec *o, int32_t layer, int32_t mtp, int64_t rows,
                     int64_t cols, const char *fmt, ...) DSMOE__PRINTF(6, 7);
static int spec_set(dsmoe_model_tensor_spec *o, int32_t layer, int32_t mtp, int64_t rows,
                     int64_t cols, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(o->name, sizeof o->name, fmt, ap);
    va_end(ap);
    o->ndim = cols > 0 ? 2 : 1;
    o->shape[0] = rows;
    o->shape[1] = cols;
    o->layer = layer;
    o->mtp = mtp;
    return 0;
}

/* Tensors of the attention part of a block (norms included). */
static int64_t attn_count(const dsmoe_model_config *c) { return (c->q_lora_rank > 0 ? 3 : 1) + 6; }

static int64_t ffn_count(const dsmoe_model_config *c, int32_t l) {
    if (!dsmoe_model_layer_is_moe(c, l)) return 3;
    return 1 + (c->topk_method == DSMOE_TOPK_METHOD_NOAUX_TC) + 3 * (int64_t)c->n_routed_experts +
           (c->n_shared_experts > 0 ? 3 : 0);
}

static int64_t block_count(const dsmoe_model_config *c, int32_t l) {
    return attn_count(c) + ffn_count(c, l);
}

/* The i-th tensor of layer l's block (0 <= i < block_count). */
static int block_spec(const dsmoe_model_config *c, int32_t l, int32_t mtp, int64_t i,
                       dsmoe_model_tensor_spec *o) {
    const int64_t D = c->hidden_size, H = c->num_attention_heads, n = c->qk_nope_head_dim,
                  r = c->qk_rope_head_dim, v = c->v_head_dim, kc = c->kv_lora_rank,
                  q = c->q_lora_rank;
    const char *p = "model.layers.";
    if (i == 0) return spec_set(o, l, mtp, D, 0, "%s%d.input_layernorm.weight", p, (int)l);
    i--;
    if (q > 0) {
        if (i == 0) return spec_set(o, l, mtp, q, D, "%s%d.self_attn.q_a_proj.weight", p, (int)l);
        if (i == 1) return spec_set(o, l, mtp, q, 0, "%s%d.self_attn.q_a_layernorm.weight", p, (int)l);
        if (i == 2)
            return spec_set(o, l, mtp, H * (n + r), q, "%s%d.self_attn.q_b_proj.weight", p, (int)l);
        i -= 3;
    } else {
        if (i == 0)
            return spec_set(o, l, mtp, H * (n + r), D, "%s%d.self_attn.q_proj.weight", p, (int)l);
        i -= 1;
    }
    switch (i) {
    case 0: return spec_set(o, l, mtp, kc + r, D, "%s%d.self_attn.kv_a_proj_with_mqa.weight", p, (int)l);
    case 1: return spec_set(o, l, mtp, kc, 0, "%s%d.self_attn.kv_a_layernorm.weight", p, (int)l);
    case 2: return spec_set(o, l, mtp, H * (n + v), kc, "%s%d.self_attn.kv_b_proj.weight", p, (int)l);
    case 3: return spec_set(o, l, mtp, D, H * v, "%s%d.self_attn.o_proj.weight", p, (int)l);
    case 4: return spec_set(o, l, mtp, D, 0, "%s%d.post_attention_layernorm.weight", p, (int)l);
    default: break;
    }
    i -= 5;
    static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
    if (!dsmoe_model_layer_is_moe(c, l)) {
        const int64_t I = c->intermediate_size;
        return spec_set(o, l, mtp, i == 2 ? D : I, i == 2 ? I : D, "%s%d.mlp.%s.weight", p, (int)l,
                        proj[i]);
    }
    const int64_t E = c->n_routed_experts, F = c->moe_intermediate_size,
                  Fs = (int64_t)c->n_shared_experts * F;
    if (i == 0) return spec_set(o, l, mtp, E, D, "%s%d.mlp.gate.weight", p, (int)l);
    i--;
    if (c->topk_method == DSMOE_TOPK_METHOD_NOAUX_TC) {
        if (i == 0) return spec_set(o, l, mtp, E, 0, "%s%d.mlp.gate.e_score_correction_bias", p, (int)l);
        i--;
    }
    if (i < 3 * E) {
        int64_t e = i / 3, k = i % 3;
        return spec_set(o, l, mtp, k == 2 ? D : F, k == 2 ? F : D, "%s%d.mlp.experts.%lld.%s.weight",
                        p, (int)l, (long long)e, proj[k]);
    }
    i -= 3 * E;
    return spec_set(o, l, mtp, i == 2 ? D : Fs, i == 2 ? Fs : D, "%s%d.mlp.shared_experts.%s.weight",
                    p, (int)l, proj[i]);
}

#define MTP_EXTRA 6

static int mtp_extra_spec(const dsmoe_model_config *c, int32_t l, int64_t i,
                           dsmoe_model_tensor_spec *o) {
    const int64_t D = c->hidden_size, V = c->vocab_size;
    const char *p = "model.layers.";
    switch (i) {
    case 0: return spec_set(o, l, 1, V, D, "%s%d.embed_tokens.weight", p, (int)l);
    case 1: return spec_set(o, l, 1, D, 0, "%s%d.enorm.weight", p, (int)l);
    case 2: return spec_set(o, l, 1, D, 0, "%s%d.hnorm.weight", p, (int)l);
    case 3: return spec_set(o, l, 1, D, 2 * D, "%s%d.eh_proj.weight", p, (int)l);
    case 4: return spec_set(o, l, 1, D, 0, "%s%d.shared_head.norm.weight", p, (int)l);
    default: return spec_set(o, l, 1, V, D, "%s%d.shared_head.head.weight", p, (int)l);
    }
}

int64_t dsmoe_model_tensor_count(const dsmoe_model_config *c, int32_t mtp_depths) {
    if (!c) {
        dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_tensor_count: NULL config");
        return -1;
    }
    if (dsmoe_model_config_validate(c) != DSMOE_OK) return -1;
    if (mtp_depths < 0 || mtp_depths > c->num_nextn_predict_layers) {
        dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                     "MTP depths %d outside 0..num_nextn_predict_layers (%d)", (int)mtp_depths,
                     (int)c->num_nextn_predict_layers);
        return -1;
    }
    int64_t n = 2 + !c->tie_word_embeddings;
    for (int32_t l = 0; l < c->num_hidden_layers + mtp_depths; l++)
        n += block_count(c, l) + (l >= c->num_hidden_layers ? MTP_EXTRA : 0);
    return n;
}

dsmoe_status dsmoe_model_tensor_at(const dsmoe_model_config *c, int32_t mtp_depths, int64_t i,
                                   dsmoe_model_tensor_spec *o) {
    if (!o) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_tensor_at: NULL out");
    int64_t count = dsmoe_model_tensor_count(c, mtp_depths);
    if (count < 0) return DSMOE_STATUS_INVALID_CONFIG;
    if (i < 0 || i >= count)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "tensor index %lld outside 0..%lld",
                            (long long)i, (long long)count - 1);
    memset(o, 0, sizeof *o);
    const int64_t D = c->hidden_size, V = c->vocab_size;
    const int32_t L = c->num_hidden_layers;
    if (i == 0) {
        spec_set(o, -1, 0, V, D, "model.embed_tokens.weight");
        return DSMOE_OK;
    }
    i--;
    for (int32_t l = 0; l < L; l++) {
        int64_t b = block_count(c, l);
        if (i < b) {
            block_spec(c, l, 0, i, o);
            return DSMOE_OK;
        }
        i -= b;
    }
    if (i == 0) {
        spec_set(o, -1, 0, D, 0, "model.norm.weight");
        return DSMOE_OK;
    }
    i--;
    if (!c->tie_word_embeddings) {
        if (i == 0) {
            spec_set(o, -1, 0, V, D, "lm_head.weight");
            return DSMOE_OK;
        }
        i--;
    }
    for (int32_t l = L; l < L + mtp_depths; l++) {
        if (i < MTP_EXTRA) {
            mtp_extra_spec(c, l, i, o);
            return DSMOE_OK;
        }
        i -= MTP_EXTRA;
        int64_t b = block_count(c, l);
        if (i < b) {
            block_spec(c, l, 1, i, o);
            return DSMOE_OK;
        }
        i -= b;
    }
    return dsmoe__error(DSMOE_STATUS_INTERNAL, "tensor table: index past the end");
}
