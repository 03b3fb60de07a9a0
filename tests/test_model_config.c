/*
 * test_model_config.c — config.json reading (dsmoe_model_config_from_json / _from_dir):
 * the DeepSeek-V3, V2, V2-Lite and Moonlight files (tests/golden/model/configs/, written
 * after the published config.json files), the router and MoE configs they imply against
 * the library's presets for the same models, defaults, and every refusal naming its key.
 */
#include "model_testutil.h"

#include <math.h>

#define CFG_DIR MT_GOLDEN "configs/"

static char *load(const char *name, size_t *len) {
    char path[512];
    snprintf(path, sizeof path, "%s%s", CFG_DIR, name);
    char *t = mt_read(path, len);
    if (!t) TL_FAIL("cannot read %s", path);
    return t;
}

static void test_deepseek_v3(void) {
    size_t len;
    char *t = load("deepseek_v3.json", &len);
    if (!t) return;
    dsmoe_model_config c;
    ASSERT_OK(dsmoe_model_config_from_json(t, len, &c));
    ASSERT_EQ_INT(c.hidden_size, 7168);
    ASSERT_EQ_INT(c.intermediate_size, 18432);
    ASSERT_EQ_INT(c.moe_intermediate_size, 2048);
    ASSERT_EQ_INT(c.num_hidden_layers, 61);
    ASSERT_EQ_INT(c.first_k_dense_replace, 3);
    ASSERT_EQ_INT(c.moe_layer_freq, 1);
    ASSERT_EQ_INT(c.num_attention_heads, 128);
    ASSERT_EQ_INT(c.q_lora_rank, 1536);
    ASSERT_EQ_INT(c.kv_lora_rank, 512);
    ASSERT_EQ_INT(c.qk_nope_head_dim, 128);
    ASSERT_EQ_INT(c.qk_rope_head_dim, 64);
    ASSERT_EQ_INT(c.v_head_dim, 128);
    ASSERT_EQ_INT(c.n_routed_experts, 256);
    ASSERT_EQ_INT(c.n_shared_experts, 1);
    ASSERT_EQ_INT(c.num_experts_per_tok, 8);
    ASSERT_EQ_INT(c.n_group, 8);
    ASSERT_EQ_INT(c.topk_group, 4);
    ASSERT_EQ_INT(c.scoring_func, DSMOE_SCORE_FUNC_SIGMOID);
    ASSERT_EQ_INT(c.topk_method, DSMOE_TOPK_METHOD_NOAUX_TC);
    ASSERT_EQ_INT(c.norm_topk_prob, 1);
    ASSERT_TRUE(c.routed_scaling_factor == 2.5f);
    ASSERT_TRUE(c.rms_norm_eps == 1e-6f);
    ASSERT_TRUE(c.rope_theta == 10000.0);
    ASSERT_EQ_INT(c.max_position_embeddings, 163840);
    ASSERT_EQ_INT(c.rope_type, DSMOE_ROPE_TYPE_YARN);
    ASSERT_TRUE(c.rope_factor == 40.0);
    ASSERT_EQ_INT(c.rope_original_max_position_embeddings, 4096);
    ASSERT_TRUE(c.rope_beta_fast == 32.0 && c.rope_beta_slow == 1.0);
    ASSERT_TRUE(c.rope_mscale == 1.0 && c.rope_mscale_all_dim == 1.0);
    ASSERT_EQ_INT(c.tie_word_embeddings, 0);
    ASSERT_EQ_INT(c.vocab_size, 129280);
    ASSERT_EQ_INT(c.num_nextn_predict_layers, 1);
    ASSERT_EQ_INT(c.fp8_block_rows, 128);
    ASSERT_EQ_INT(c.fp8_block_cols, 128);
    /* Layers 0..2 dense, 3..60 MoE, the MTP layer 61 MoE too. */
    ASSERT_EQ_INT(dsmoe_model_layer_is_moe(&c, 2), 0);
    ASSERT_EQ_INT(dsmoe_model_layer_is_moe(&c, 3), 1);
    ASSERT_EQ_INT(dsmoe_model_layer_is_moe(&c, 61), 1);
    ASSERT_EQ_INT(dsmoe_model_layer_is_moe(&c, 62), 0);

    /* The router and the layer are the library's deepseek-v3 presets. */
    dsmoe_router_config r, want;
    ASSERT_OK(dsmoe_model_router_config(&c, &r));
    ASSERT_OK(dsmoe_router_preset("deepseek-v3", &want));
    ASSERT_TRUE(memcmp(&r, &want, sizeof r) == 0);
    dsmoe_moe_config m, mw;
    ASSERT_OK(dsmoe_model_moe_config(&c, &m));
    ASSERT_OK(dsmoe_moe_preset("deepseek-v3", &mw));
    ASSERT_EQ_INT(m.hidden_size, mw.hidden_size);
    ASSERT_EQ_INT(m.expert_size, mw.expert_size);
    ASSERT_EQ_INT(m.n_shared, mw.n_shared);
    ASSERT_TRUE(memcmp(&m.router, &mw.router, sizeof m.router) == 0);
    free(t);
}

static void test_deepseek_v2(void) {
    size_t len;
    char *t = load("deepseek_v2.json", &len);
    if (!t) return;
    dsmoe_model_config c;
    ASSERT_OK(dsmoe_model_config_from_json(t, len, &c));
    ASSERT_EQ_INT(c.scoring_func, DSMOE_SCORE_FUNC_SOFTMAX);
    ASSERT_EQ_INT(c.topk_method, DSMOE_TOPK_METHOD_GROUP_LIMITED_GREEDY);
    ASSERT_EQ_INT(c.rope_type, DSMOE_ROPE_TYPE_YARN);
    ASSERT_TRUE(c.rope_mscale == 0.707 && c.rope_mscale_all_dim == 0.707);
    ASSERT_EQ_INT(c.num_nextn_predict_layers, 0); /* absent in V2 files */
    ASSERT_EQ_INT(c.fp8_block_rows, 0);
    dsmoe_router_config r, want;
    ASSERT_OK(dsmoe_model_router_config(&c, &r));
    ASSERT_OK(dsmoe_router_preset("deepseek-v2", &want));
    ASSERT_TRUE(memcmp(&r, &want, sizeof r) == 0);
    free(t);
}

static void test_deepseek_v2_lite(void) {
    size_t len;
    char *t = load("deepseek_v2_lite.json", &len);
    if (!t) return;
    dsmoe_model_config c;
    ASSERT_OK(dsmoe_model_config_from_json(t, len, &c));
    ASSERT_EQ_INT(c.q_lora_rank, 0); /* null: a plain q_proj */
    ASSERT_EQ_INT(c.topk_method, DSMOE_TOPK_METHOD_GREEDY);
    ASSERT_EQ_INT(c.n_routed_experts, 64);
    ASSERT_EQ_INT(c.n_shared_experts, 2);
    dsmoe_router_config r;
    ASSERT_OK(dsmoe_model_router_config(&c, &r));
    ASSERT_EQ_INT(r.n_experts, 64);
    ASSERT_EQ_INT(r.n_groups, 1);
    ASSERT_EQ_INT(r.top_k, 6);
    ASSERT_EQ_INT(r.score_func, DSMOE_SCORE_FUNC_SOFTMAX);
    ASSERT_EQ_INT(r.use_bias, 0);
    ASSERT_EQ_INT(r.normalize, 0);
    ASSERT_TRUE(r.scale == 1.0f);
    /* greedy ignores n_group: the same file with n_group 7 (64 % 7 != 0) still routes. */
    size_t l2;
    char *t2 = mt_subst(t, len, "\"n_group\": 1", "\"n_group\": 7", &l2);
    if (t2) {
        ASSERT_OK(dsmoe_model_config_from_json(t2, l2, &c));
        ASSERT_OK(dsmoe_model_router_config(&c, &r));
        ASSERT_EQ_INT(r.n_groups, 1);
    }
    free(t2);
    free(t);
}

static void test_moonlight(void) {
    size_t len;
    char *t = load("moonlight.json", &len);
    if (!t) return;
    dsmoe_model_config c;
    ASSERT_OK(dsmoe_model_config_from_json(t, len, &c));
    ASSERT_EQ_INT(c.rope_type, DSMOE_ROPE_TYPE_DEFAULT);
    ASSERT_TRUE(c.rope_theta == 50000.0);
    ASSERT_TRUE(c.rms_norm_eps == 1e-5f);
    ASSERT_EQ_INT(c.q_lora_rank, 0);
    ASSERT_EQ_INT(c.vocab_size, 163840);
    dsmoe_router_config r, want;
    ASSERT_OK(dsmoe_model_router_config(&c, &r));
    ASSERT_OK(dsmoe_router_preset("moonlight", &want));
    ASSERT_TRUE(memcmp(&r, &want, sizeof r) == 0);
    free(t);
}

/* A minimal dense config: the defaults of absent keys. */
static void test_defaults_and_dense(void) {
    const char *j = "{\"hidden_size\": 8, \"intermediate_size\": 16, \"num_hidden_layers\": 2,"
                    " \"num_attention_heads\": 2, \"q_lora_rank\": null, \"kv_lora_rank\": 4,"
                    " \"qk_nope_head_dim\": 2, \"qk_rope_head_dim\": 2, \"v_head_dim\": 2,"
                    " \"n_routed_experts\": null, \"vocab_size\": 10,"
                    " \"max_position_embeddings\": 64}";
    dsmoe_model_config c;
    memset(&c, 0x5a, sizeof c);
    ASSERT_OK(dsmoe_model_config_from_json(j, strlen(j), &c));
    ASSERT_EQ_INT(c.n_routed_experts, 0);
    ASSERT_EQ_INT(c.moe_layer_freq, 1);
    ASSERT_EQ_INT(c.first_k_dense_replace, 0);
    ASSERT_TRUE(c.rms_norm_eps == 1e-6f);
    ASSERT_TRUE(c.rope_theta == 10000.0);
    ASSERT_EQ_INT(c.rope_type, DSMOE_ROPE_TYPE_DEFAULT);
    ASSERT_EQ_INT(c.tie_word_embeddings, 0);
    ASSERT_EQ_INT(c.num_nextn_predict_layers, 0);
    ASSERT_EQ_INT(dsmoe_model_layer_is_moe(&c, 0), 0);
    ASSERT_EQ_INT(dsmoe_model_layer_is_moe(&c, 1), 0);
    dsmoe_router_config r;
    ASSERT_STATUS(dsmoe_model_router_config(&c, &r), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "n_routed_experts") != NULL);
}

/* moe_layer_freq: Hugging Face's rule l >= k && l % freq == 0. */
static void test_layer_freq(void) {
    size_t len, l2;
    char *t = load("moonlight.json", &len);
    if (!t) return;
    char *t2 = mt_subst(t, len, "\"moe_layer_freq\": 1", "\"moe_layer_freq\": 3", &l2);
    dsmoe_model_config c;
    if (t2) {
        ASSERT_OK(dsmoe_model_config_from_json(t2, l2, &c));
        int want[8] = {0, 0, 0, 1, 0, 0, 1, 0};
        for (int l = 0; l < 8; l++) ASSERT_EQ_INT(dsmoe_model_layer_is_moe(&c, l), want[l]);
    }
    free(t2);
    free(t);
}

/* rope_type (the newer spelling) and rope_parameters. */
static void test_rope_spellings(void) {
    size_t len, l2;
    char *t = load("deepseek_v3.json", &len);
    if (!t) return;
    dsmoe_model_config c;
    char *t2 = mt_subst(t, len, "\"type\": \"yarn\"", "\"rope_type\": \"yarn\"", &l2);
    if (t2) {
        ASSERT_OK(dsmoe_model_config_from_json(t2, l2, &c));
        ASSERT_EQ_INT(c.rope_type, DSMOE_ROPE_TYPE_YARN);
        ASSERT_TRUE(c.rope_factor == 40.0);
    }
    free(t2);
    /* Both spellings at once: refused, naming the key. */
    t2 = mt_subst(t, len, "\"type\": \"yarn\"", "\"type\": \"yarn\", \"rope_type\": \"yarn\"", &l2);
    if (t2) {
        ASSERT_STATUS(dsmoe_model_config_from_json(t2, l2, &c), DSMOE_STATUS_INVALID_CONFIG);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "rope_scaling.rope_type") != NULL);
    }
    free(t2);
    /* transformers 5's rope_parameters, with rope_theta inside. */
    t2 = mt_subst(t, len, "\"rope_scaling\": {", "\"rope_parameters\": {\"rope_theta\": 20000.5, ", &l2);
    if (t2) {
        /* ... which disagrees with the top-level rope_theta: refused. */
        ASSERT_STATUS(dsmoe_model_config_from_json(t2, l2, &c), DSMOE_STATUS_INVALID_CONFIG);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "rope_parameters.rope_theta") != NULL);
        size_t l3;
        char *t3 = mt_subst(t2, l2, "\"rope_theta\": 10000,", "", &l3);
        if (t3) {
            ASSERT_OK(dsmoe_model_config_from_json(t3, l3, &c));
            ASSERT_EQ_INT(c.rope_type, DSMOE_ROPE_TYPE_YARN);
            ASSERT_TRUE(c.rope_theta == 20000.5);
        }
        free(t3);
    }
    free(t2);
    /* noaux_tc ranks groups by their two best experts: groups of one are refused. */
    t2 = mt_subst(t, len, "\"n_group\": 8", "\"n_group\": 256", &l2);
    if (t2) {
        size_t l3;
        char *t3 = mt_subst(t2, l2, "\"topk_group\": 4", "\"topk_group\": 8", &l3);
        if (t3) {
            ASSERT_STATUS(dsmoe_model_config_from_json(t3, l3, &c), DSMOE_STATUS_INVALID_CONFIG);
            ASSERT_TRUE(strstr(dsmoe_last_error(), "n_group (256) leaves groups of one") != NULL);
        }
        free(t3);
    }
    free(t2);
    free(t);
}

typedef struct refusal {
    const char *file, *from, *to;
    dsmoe_status status;
    const char *needle; /* must appear in the message */
} refusal;

static const refusal refusals[] = {
    {"deepseek_v3.json", "\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"",
     DSMOE_STATUS_INVALID_CONFIG, "hidden_act"},
    {"deepseek_v3.json", "\"attention_bias\": false", "\"attention_bias\": true",
     DSMOE_STATUS_INVALID_CONFIG, "attention_bias"},
    {"deepseek_v3.json", "\"topk_method\": \"noaux_tc\"", "\"topk_method\": \"aux_tc\"",
     DSMOE_STATUS_INVALID_CONFIG, "topk_method"},
    {"deepseek_v3.json", "\"scoring_func\": \"sigmoid\"", "\"scoring_func\": \"tanh\"",
     DSMOE_STATUS_INVALID_CONFIG, "scoring_func"},
    {"deepseek_v3.json", "\"type\": \"yarn\"", "\"type\": \"linear\"",
     DSMOE_STATUS_INVALID_CONFIG, "rope_scaling.type"},
    {"deepseek_v3.json", "\"type\": \"yarn\"", "\"rope_type\": \"dynamic\"",
     DSMOE_STATUS_INVALID_CONFIG, "rope_scaling.rope_type"},
    {"deepseek_v3.json", "\"type\": \"yarn\"", "\"kind\": \"yarn\"",
     DSMOE_STATUS_INVALID_CONFIG, "rope_scaling.kind"},
    {"deepseek_v3.json", "\"factor\": 40", "\"factor\": 0.5",
     DSMOE_STATUS_INVALID_CONFIG, "rope_scaling.factor"},
    {"deepseek_v3.json", "\"factor\": 40,", "", DSMOE_STATUS_INVALID_CONFIG, "rope_scaling.factor"},
    {"deepseek_v3.json", "\"original_max_position_embeddings\": 4096,", "",
     DSMOE_STATUS_INVALID_CONFIG, "rope_scaling.original_max_position_embeddings"},
    {"deepseek_v3.json", "\"mscale\": 1.0,", "\"mscale\": 0.5,",
     DSMOE_STATUS_INVALID_CONFIG, "rope_scaling.mscale"},
    {"deepseek_v3.json", "\"mscale_all_dim\": 1.0,", "",
     DSMOE_STATUS_INVALID_CONFIG, "rope_scaling.mscale"},
    {"deepseek_v3.json", "\"beta_fast\": 32", "\"beta_fast\": -1",
     DSMOE_STATUS_INVALID_CONFIG, "rope_scaling.beta_fast"},
    {"deepseek_v3.json", "\"beta_slow\": 1", "\"beta_slow\": 0",
     DSMOE_STATUS_INVALID_CONFIG, "rope_scaling.beta_slow"},
    {"deepseek_v3.json", "\"beta_fast\": 32", "\"attention_factor\": 2, \"beta_fast\": 32",
     DSMOE_STATUS_INVALID_CONFIG, "rope_scaling.attention_factor"},
    {"deepseek_v3.json", "\"rope_scaling\": {", "\"rope_scaling\": [",
     DSMOE_STATUS_INVALID_CONFIG, "rope_scaling"},
    {"deepseek_v3.json", "\"quant_method\": \"fp8\"", "\"quant_method\": \"gptq\"",
     DSMOE_STATUS_INVALID_CONFIG, "quantization_config.quant_method"},
    {"deepseek_v3.json", "\"fmt\": \"e4m3\"", "\"fmt\": \"e5m2\"",
     DSMOE_STATUS_INVALID_CONFIG, "quantization_config.fmt"},
    {"deepseek_v3.json", "\"activation_scheme\": \"dynamic\"", "\"activation_scheme\": \"static\"",
     DSMOE_STATUS_INVALID_CONFIG, "quantization_config.activation_scheme"},
    {"deepseek_v3.json", "128,\n      128", "128", DSMOE_STATUS_INVALID_CONFIG,
     "quantization_config.weight_block_size"},
    {"deepseek_v3.json", "128,\n      128", "128, 0", DSMOE_STATUS_INVALID_CONFIG,
     "quantization_config.weight_block_size"},
    {"deepseek_v3.json", "\"fmt\": \"e4m3\"", "\"fmt\": \"e4m3\", \"ignored_layers\": []",
     DSMOE_STATUS_INVALID_CONFIG, "quantization_config.ignored_layers"},
    {"deepseek_v3.json", "\"n_group\": 8", "\"n_group\": 7", DSMOE_STATUS_INVALID_CONFIG, "n_group"},
    {"deepseek_v3.json", "\"n_group\": 8", "\"n_group\": 256", DSMOE_STATUS_INVALID_CONFIG,
     "num_experts_per_tok (8) exceeds"},
    {"deepseek_v3.json", "\"topk_group\": 4", "\"topk_group\": 9", DSMOE_STATUS_INVALID_CONFIG,
     "topk_group"},
    {"deepseek_v3.json", "\"num_experts_per_tok\": 8", "\"num_experts_per_tok\": 300",
     DSMOE_STATUS_INVALID_CONFIG, "num_experts_per_tok"},
    {"deepseek_v3.json", "\"qk_rope_head_dim\": 64", "\"qk_rope_head_dim\": 63",
     DSMOE_STATUS_INVALID_CONFIG, "qk_rope_head_dim"},
    {"deepseek_v3.json", "\"hidden_size\": 7168,", "", DSMOE_STATUS_INVALID_CONFIG, "hidden_size"},
    {"deepseek_v3.json", "\"hidden_size\": 7168", "\"hidden_size\": 0", DSMOE_STATUS_INVALID_CONFIG,
     "hidden_size"},
    {"deepseek_v3.json", "\"hidden_size\": 7168", "\"hidden_size\": -7168",
     DSMOE_STATUS_INVALID_CONFIG, "hidden_size"},
    {"deepseek_v3.json", "\"hidden_size\": 7168", "\"hidden_size\": 7168.5",
     DSMOE_STATUS_INVALID_CONFIG, "hidden_size"},
    {"deepseek_v3.json", "\"hidden_size\": 7168", "\"hidden_size\": \"7168\"",
     DSMOE_STATUS_INVALID_CONFIG, "hidden_size"},
    {"deepseek_v3.json", "\"hidden_size\": 7168", "\"hidden_size\": null",
     DSMOE_STATUS_INVALID_CONFIG, "hidden_size"},
    {"deepseek_v3.json", "\"vocab_size\": 129280", "\"vocab_size\": 1e99",
     DSMOE_STATUS_INVALID_CONFIG, "vocab_size"},
    {"deepseek_v3.json", "\"norm_topk_prob\": true", "\"norm_topk_prob\": 1",
     DSMOE_STATUS_INVALID_CONFIG, "norm_topk_prob"},
    {"deepseek_v3.json", "\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": 0",
     DSMOE_STATUS_INVALID_CONFIG, "rms_norm_eps"},
    {"deepseek_v3.json", "\"rope_theta\": 10000", "\"rope_theta\": 1",
     DSMOE_STATUS_INVALID_CONFIG, "rope_theta"},
    {"deepseek_v3.json", "\"routed_scaling_factor\": 2.5", "\"routed_scaling_factor\": -2.5",
     DSMOE_STATUS_INVALID_CONFIG, "routed_scaling_factor"},
    {"deepseek_v3.json", "\"first_k_dense_replace\": 3", "\"first_k_dense_replace\": 62",
     DSMOE_STATUS_INVALID_CONFIG, "first_k_dense_replace"},
    {"deepseek_v3.json", "\"moe_layer_freq\": 1", "\"moe_layer_freq\": 0",
     DSMOE_STATUS_INVALID_CONFIG, "moe_layer_freq"},
    {"deepseek_v3.json", "\"num_nextn_predict_layers\": 1", "\"num_nextn_predict_layers\": 99",
     DSMOE_STATUS_INVALID_CONFIG, "num_nextn_predict_layers"},
    {"deepseek_v3.json", "\"scoring_func\": \"sigmoid\",", "", DSMOE_STATUS_INVALID_CONFIG,
     "scoring_func"},
    {"deepseek_v3.json", "\"routed_scaling_factor\": 2.5,", "", DSMOE_STATUS_INVALID_CONFIG,
     "routed_scaling_factor"},
    {"deepseek_v3.json", "\"q_lora_rank\": 1536,", "", DSMOE_STATUS_INVALID_CONFIG, "q_lora_rank"},
    {"deepseek_v3.json", "\"n_group\": 8,", "", DSMOE_STATUS_INVALID_CONFIG, "n_group"},
    {"deepseek_v3.json", "\"vocab_size\": 129280", "\"vocab_size\": 129280, \"hidden_size\": 7168",
     DSMOE_STATUS_INVALID_CONFIG, "hidden_size is given twice"},
    {"deepseek_v3.json", "\"use_cache\": true", "\"use_cache\": true, \"rope_interleave\": false",
     DSMOE_STATUS_INVALID_CONFIG, "rope_interleave"},
    /* Token ids and dsmoe's byte vocabulary. */
    {"deepseek_v3.json", "\"use_cache\": true", "\"use_cache\": true, \"dsmoe_vocab\": \"tiktoken\"",
     DSMOE_STATUS_INVALID_CONFIG, "dsmoe_vocab \"tiktoken\""},
    {"deepseek_v3.json", "\"use_cache\": true", "\"use_cache\": true, \"dsmoe_vocab\": 1",
     DSMOE_STATUS_INVALID_CONFIG, "dsmoe_vocab must be a string"},
    {"deepseek_v3.json", "\"use_cache\": true", "\"use_cache\": true, \"dsmoe_vocab\": \"bytes\"",
     DSMOE_STATUS_INVALID_CONFIG, "bos_token_id 0 is a byte"},
    {"deepseek_v3.json", "\"eos_token_id\": 1", "\"eos_token_id\": 129280",
     DSMOE_STATUS_INVALID_CONFIG, "eos_token_id must be in 0..vocab_size - 1 (129279)"},
    {"deepseek_v3.json", "\"bos_token_id\": 0", "\"bos_token_id\": -1",
     DSMOE_STATUS_INVALID_CONFIG, "bos_token_id"},
    {"deepseek_v3.json", "\"bos_token_id\": 0", "\"bos_token_id\": \"<s>\"",
     DSMOE_STATUS_INVALID_CONFIG, "bos_token_id must be an integer or null"},
    {"deepseek_v3.json", "\"eos_token_id\": 1", "\"eos_token_id\": []",
     DSMOE_STATUS_INVALID_CONFIG, "eos_token_id must be an integer, a non-empty list"},
    {"deepseek_v3.json", "\"eos_token_id\": 1", "\"eos_token_id\": [1, 2.5]",
     DSMOE_STATUS_INVALID_CONFIG, "eos_token_id"},
    {"deepseek_v3.json", "\"use_cache\": true", "\"use_cache\": true, \"rope_parameters\": null",
     DSMOE_STATUS_INVALID_CONFIG, "rope_parameters"},
    /* V2's scaling rule and V3's disagree once weights are normalised. */
    {"deepseek_v2.json", "\"norm_topk_prob\": false", "\"norm_topk_prob\": true",
     DSMOE_STATUS_INVALID_CONFIG, "routed_scaling_factor"},
    /* Not JSON at all: FORMAT with the byte offset. */
    {"deepseek_v3.json", "\"v_head_dim\": 128,", "\"v_head_dim\": 128,,",
     DSMOE_STATUS_FORMAT, "config.json at byte"},
    {"deepseek_v3.json", "\"aux_loss_alpha\": 0.001", "\"aux_loss_alpha\": 0.",
     DSMOE_STATUS_FORMAT, "aux_loss_alpha"},
    {"deepseek_v3.json", "\"aux_loss_alpha\": 0.001", "\"aux_loss_alpha\": 01",
     DSMOE_STATUS_FORMAT, "aux_loss_alpha"},
    {"deepseek_v3.json", "\"aux_loss_alpha\": 0.001", "\"aux_loss_alpha\": 1e999",
     DSMOE_STATUS_FORMAT, "aux_loss_alpha"},
    {"deepseek_v3.json", "\"seq_aux\": true", "\"seq_aux\": True", DSMOE_STATUS_FORMAT, "seq_aux"},
    {"deepseek_v3.json", "\"seq_aux\": true", "\"seq_aux\": NaN", DSMOE_STATUS_FORMAT, "seq_aux"},
    {"deepseek_v3.json", "\"vocab_size\": 129280\n}", "\"vocab_size\": 129280\n} {}", DSMOE_STATUS_FORMAT,
     "after the end"},
};

static void test_refusals(void) {
    for (size_t i = 0; i < sizeof refusals / sizeof refusals[0]; i++) {
        const refusal *r = &refusals[i];
        size_t len, l2;
        char *t = load(r->file, &len);
        if (!t) return;
        char *t2 = mt_subst(t, len, r->from, r->to, &l2);
        if (t2) {
            dsmoe_model_config c, before;
            memset(&c, 0x33, sizeof c);
            before = c;
            ASSERT_STATUS(dsmoe_model_config_from_json(t2, l2, &c), r->status);
            if (!strstr(dsmoe_last_error(), r->needle))
                TL_FAIL("case %zu (%s -> %s): message '%s' does not name '%s'", i, r->from, r->to,
                        dsmoe_last_error(), r->needle);
            ASSERT_TRUE(memcmp(&c, &before, sizeof c) == 0); /* unchanged on error */
        }
        free(t2);
        free(t);
    }
}

/* Every prefix of a valid file is refused without reading past it. */
static void test_truncations(void) {
    size_t len;
    char *t = load("moonlight.json", &len);
    if (!t) return;
    dsmoe_model_config c;
    for (size_t n = 0; n + 2 < len; n += 7) {
        char *p = (char *)malloc(n ? n : 1);
        memcpy(p, t, n);
        dsmoe_status s = dsmoe_model_config_from_json(p, n, &c);
        if (s == DSMOE_OK) TL_FAIL("prefix of %zu bytes accepted", n);
        free(p);
    }
    free(t);
}

/* "dsmoe_vocab": "bytes": ids 0..255 are the bytes, specials above; token ids absent,
 * null, an integer or a list (the first). */
static void test_byte_vocab(void) {
    size_t len, l2, l3;
    char *t = load("deepseek_v3.json", &len);
    if (!t) return;
    dsmoe_model_config c;
    ASSERT_OK(dsmoe_model_config_from_json(t, len, &c));
    ASSERT_EQ_INT(c.byte_vocab, 0);
    ASSERT_EQ_INT(c.bos_token_id, 0);
    ASSERT_EQ_INT(c.eos_token_id, 1);
    char *a = mt_subst(t, len, "\"bos_token_id\": 0", "\"bos_token_id\": 256", &l2);
    char *b = a ? mt_subst(a, l2, "\"eos_token_id\": 1",
                           "\"eos_token_id\": [257, 3], \"dsmoe_vocab\": \"bytes\"", &l3)
                : NULL;
    if (b) {
        ASSERT_OK(dsmoe_model_config_from_json(b, l3, &c));
        ASSERT_EQ_INT(c.byte_vocab, 1);
        ASSERT_EQ_INT(c.bos_token_id, 256);
        ASSERT_EQ_INT(c.eos_token_id, 257);
        /* a byte vocabulary needs room for the 256 bytes */
        c.vocab_size = 255;
        ASSERT_STATUS(dsmoe_model_config_validate(&c), DSMOE_STATUS_INVALID_CONFIG);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "vocab_size >= 256") != NULL);
        c.vocab_size = 260;
        c.eos_token_id = 255;
        ASSERT_STATUS(dsmoe_model_config_validate(&c), DSMOE_STATUS_INVALID_CONFIG);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "eos_token_id 255 is a byte") != NULL);
        c.eos_token_id = -1;
        ASSERT_OK(dsmoe_model_config_validate(&c));
    }
    free(a);
    free(b);
    /* absent and null: -1; "dsmoe_vocab": null is no byte vocabulary */
    a = mt_subst(t, len, "\"bos_token_id\": 0,", "", &l2);
    b = a ? mt_subst(a, l2, "\"eos_token_id\": 1", "\"eos_token_id\": null, \"dsmoe_vocab\": null",
                     &l3)
          : NULL;
    if (b) {
        ASSERT_OK(dsmoe_model_config_from_json(b, l3, &c));
        ASSERT_EQ_INT(c.bos_token_id, -1);
        ASSERT_EQ_INT(c.eos_token_id, -1);
        ASSERT_EQ_INT(c.byte_vocab, 0);
    }
    free(a);
    free(b);
    free(t);
}

static void test_from_dir(void) {
    char dir[512], path[600];
    mt_scratch(dir, sizeof dir, "model_config_dir");
    snprintf(path, sizeof path, "%s/config.json", dir);
    size_t len;
    char *t = load("deepseek_v2_lite.json", &len);
    if (!t) return;
    FILE *f = fopen(path, "wb");
    ASSERT_TRUE(f != NULL);
    if (!f) return;
    fwrite(t, 1, len, f);
    fclose(f);
    dsmoe_model_config c;
    ASSERT_OK(dsmoe_model_config_from_dir(dir, &c));
    ASSERT_EQ_INT(c.hidden_size, 2048);
    /* An error inside names the file's path. */
    size_t l2;
    char *t2 = mt_subst(t, len, "\"v_head_dim\": 128", "\"v_head_dim\": 0", &l2);
    f = fopen(path, "wb");
    if (f && t2) {
        fwrite(t2, 1, l2, f);
        fclose(f);
        ASSERT_STATUS(dsmoe_model_config_from_dir(dir, &c), DSMOE_STATUS_INVALID_CONFIG);
        ASSERT_TRUE(strstr(dsmoe_last_error(), path) != NULL);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "v_head_dim") != NULL);
    }
    remove(path);
    ASSERT_STATUS(dsmoe_model_config_from_dir(dir, &c), DSMOE_STATUS_IO);
    ASSERT_TRUE(strstr(dsmoe_last_error(), path) != NULL);
    ASSERT_STATUS(dsmoe_model_config_from_json(NULL, 0, &c), DSMOE_STATUS_INVALID_ARGUMENT);
    free(t2);
    free(t);
}

int main(void) {
    RUN(test_deepseek_v3);
    RUN(test_deepseek_v2);
    RUN(test_deepseek_v2_lite);
    RUN(test_moonlight);
    RUN(test_defaults_and_dense);
    RUN(test_layer_freq);
    RUN(test_rope_spellings);
    RUN(test_refusals);
    RUN(test_truncations);
    RUN(test_byte_vocab);
    RUN(test_from_dir);
    return TEST_SUMMARY();
}
