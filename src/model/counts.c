/*
 * counts.c — what a configuration costs, from the config alone (dsmoe info): parameter
 * counts of the main model by part, the parameters a token uses, and the cache bytes
 * per position of MLA's compressed latent against a plain multi-head cache.
 *
 * Per layer (notation of model.h):
 *   attention  2D (input and post-attention norms)
 *              + q·D + q + H(n+r)·q  (q_lora_rank > 0)  or  H(n+r)·D  (plain q_proj)
 *              + (c+r)·D + c + H(n+v)·c + D·Hv
 *   dense FFN  3·D·I
 *   MoE        routed E·3·D·F, shared 3·D·N_s·F, router E·D (+ E correction biases
 *              under noaux_tc)
 * Active per token: total − (E − K)·3·D·F per MoE layer (the routed experts a token
 * does not use). An MTP depth adds embed_tokens and shared_head.head (V·D each), enorm,
 * hnorm, shared_head.norm (D each), eh_proj (2D·D) and an ordinary block.
 * Cache per position: L·(c + r) fp32 values (MLA) against L·(H(n+r) + H·v) (plain
 * multi-head keys and values).
 */
#include "model/model_internal.h"

#include <string.h>

/* The attention part of one block, its two norms included. */
static int64_t attn_params(const dsmoe_model_config *c) {
    const int64_t D = c->hidden_size, H = c->num_attention_heads, n = c->qk_nope_head_dim,
                  r = c->qk_rope_head_dim, v = c->v_head_dim, kc = c->kv_lora_rank,
                  q = c->q_lora_rank;
    int64_t p = 2 * D;
    p += q > 0 ? q * D + q + H * (n + r) * q : H * (n + r) * D;
    p += (kc + r) * D + kc + H * (n + v) * kc + D * H * v;
    return p;
}

/* Adds layer l's FFN to the parts of *o. */
static void ffn_params(const dsmoe_model_config *c, int32_t l, dsmoe_model_counts *o) {
    const int64_t D = c->hidden_size;
    if (!dsmoe_model_layer_is_moe(c, l)) {
        o->dense_ffn += 3 * D * c->intermediate_size;
        return;
    }
    const int64_t E = c->n_routed_experts, F = c->moe_intermediate_size;
    o->routed_experts += E * 3 * D * F;
    o->shared_experts += 3 * D * (int64_t)c->n_shared_experts * F;
    o->router += E * D + (c->topk_method == DSMOE_TOPK_METHOD_NOAUX_TC ? E : 0);
}

static dsmoe_status check(const dsmoe_model_config *c, const char *fn) {
    if (!c) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "%s: NULL config", fn);
    return dsmoe_model_config_validate(c);
}

dsmoe_status dsmoe_model_count_params(const dsmoe_model_config *c, dsmoe_model_counts *out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_count_params: NULL out");
    dsmoe_status s = check(c, "dsmoe_model_count_params");
    if (s != DSMOE_OK) return s;
    const int64_t D = c->hidden_size, V = c->vocab_size;
    const int32_t L = c->num_hidden_layers;
    /* Sizes the validator accepts can still multiply past int64 (2^20-wide experts,
     * 65536 of them, 4096 layers): bound the largest terms in double first. */
    const double bound =
        (double)(L + c->num_nextn_predict_layers + 1) *
        ((double)c->n_routed_experts * 3.0 * (double)D * (double)c->moe_intermediate_size +
         3.0 * (double)D * ((double)c->intermediate_size +
                            (double)c->n_shared_experts * (double)c->moe_intermediate_size) +
         (double)attn_params(c) + 2.0 * (double)V * (double)D + 2.0 * (double)D * (double)D);
    if (!(bound < 4e18))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "config.json: the model has more than 4e18 parameters (%.3g)", bound);
    dsmoe_model_counts o;
    memset(&o, 0, sizeof o);
    o.embedding = V * D;
    o.head = c->tie_word_embeddings ? 0 : V * D;
    o.final_norm = D;
    int64_t moe_layers = 0;
    for (int32_t l = 0; l < L; l++) {
        o.attention += attn_params(c);
        ffn_params(c, l, &o);
        moe_layers += dsmoe_model_layer_is_moe(c, l);
    }
    o.total = o.embedding + o.head + o.attention + o.dense_ffn + o.routed_experts +
              o.shared_experts + o.router + o.final_norm;
    o.active = o.total - moe_layers * ((int64_t)c->n_routed_experts - c->num_experts_per_tok) * 3 *
                             D * c->moe_intermediate_size;
    /* MTP depths: their own parts, counted apart from the main model. */
    for (int32_t l = L; l < L + c->num_nextn_predict_layers; l++) {
        dsmoe_model_counts m;
        memset(&m, 0, sizeof m);
        ffn_params(c, l, &m);
        o.mtp += 2 * V * D + 3 * D + 2 * D * D + attn_params(c) + m.dense_ffn + m.routed_experts +
                 m.shared_experts + m.router;
    }
    *out = o;
    return DSMOE_OK;
}

int64_t dsmoe_model_cache_bytes_per_token(const dsmoe_model_config *c) {
    if (check(c, "dsmoe_model_cache_bytes_per_token") != DSMOE_OK) return -1;
    return (int64_t)c->num_hidden_layers * ((int64_t)c->kv_lora_rank + c->qk_rope_head_dim) *
           (int64_t)sizeof(float);
}

int64_t dsmoe_model_mha_cache_bytes_per_token(const dsmoe_model_config *c) {
    if (check(c, "dsmoe_model_mha_cache_bytes_per_token") != DSMOE_OK) return -1;
    const int64_t H = c->num_attention_heads;
    return (int64_t)c->num_hidden_layers *
           (H * ((int64_t)c->qk_nope_head_dim + c->qk_rope_head_dim) + H * c->v_head_dim) *
           (int64_t)sizeof(float);
}
