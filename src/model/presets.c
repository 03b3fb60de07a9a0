/*
 * presets.c — model configurations by name, for models trained from scratch with the
 * byte-level vocabulary: DeepSeek-V3's architecture (MLA, first dense layers, sigmoid
 * routing with the correction bias and groups, normalised weights, shared experts, one
 * MTP depth) scaled down to what two CPU cores train.
 */
#include "model/model_internal.h"

#include <string.h>

/* The DeepSeek-V3 choices shared by every preset. */
static void v3_style(dsmoe_model_config *c) {
    memset(c, 0, sizeof *c);
    c->first_k_dense_replace = 1;
    c->moe_layer_freq = 1;
    c->q_lora_rank = 0;
    c->scoring_func = DSMOE_SCORE_FUNC_SIGMOID;
    c->topk_method = DSMOE_TOPK_METHOD_NOAUX_TC;
    c->norm_topk_prob = 1;
    c->routed_scaling_factor = 1.0f;
    c->rms_norm_eps = 1e-6f;
    c->rope_theta = 10000.0;
    c->rope_type = DSMOE_ROPE_TYPE_DEFAULT;
    c->tie_word_embeddings = 0;
    c->vocab_size = 260; /* the byte vocabulary: 256 bytes, BOS 256, EOS 257, PAD 258 */
    c->byte_vocab = 1;
    c->bos_token_id = 256;
    c->eos_token_id = 257;
    c->num_nextn_predict_layers = 1;
}

dsmoe_status dsmoe_model_config_preset(const char *name, dsmoe_model_config *out) {
    if (!name || !out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "model preset: NULL argument");
    dsmoe_model_config c;
    v3_style(&c);
    if (strcmp(name, "tiny") == 0) { /* unit tests: seconds */
        c.hidden_size = 32, c.intermediate_size = 64, c.moe_intermediate_size = 16;
        c.num_hidden_layers = 2, c.num_attention_heads = 2;
        c.kv_lora_rank = 16, c.qk_nope_head_dim = 8, c.qk_rope_head_dim = 4, c.v_head_dim = 8;
        c.n_routed_experts = 8, c.n_shared_experts = 1, c.num_experts_per_tok = 2;
        c.n_group = 2, c.topk_group = 1;
        c.max_position_embeddings = 256;
    } else if (strcmp(name, "small") == 0) { /* about a minute */
        c.hidden_size = 128, c.intermediate_size = 512, c.moe_intermediate_size = 64;
        c.num_hidden_layers = 4, c.num_attention_heads = 4;
        c.kv_lora_rank = 64, c.qk_nope_head_dim = 32, c.qk_rope_head_dim = 16, c.v_head_dim = 32;
        c.n_routed_experts = 16, c.n_shared_experts = 1, c.num_experts_per_tok = 4;
        c.n_group = 4, c.topk_group = 2;
        c.max_position_embeddings = 1024;
    } else if (strcmp(name, "default") == 0) { /* about five minutes; 6.5 M parameters */
        c.hidden_size = 256, c.intermediate_size = 1024, c.moe_intermediate_size = 128;
        c.num_hidden_layers = 4, c.num_attention_heads = 4;
        c.kv_lora_rank = 128, c.qk_nope_head_dim = 32, c.qk_rope_head_dim = 16, c.v_head_dim = 32;
        c.n_routed_experts = 16, c.n_shared_experts = 1, c.num_experts_per_tok = 4;
        c.n_group = 4, c.topk_group = 2;
        c.max_position_embeddings = 1024;
    } else {
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "model preset: unknown name '%s' (tiny, small, default)", name);
    }
    *out = c;
    return DSMOE_OK;
}
