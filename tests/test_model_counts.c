/*
 * test_model_counts.c — dsmoe_model_count_params and the cache sizes per token:
 * every part against sums over the tensor table (dsmoe_model_tensor_count / _at,
 * each tensor sorted into its part by its Hugging Face name here), the tokens' active
 * share against the routed experts the table lists, and the published figures of
 * DeepSeek-V3 (671B total, 37B active, the 14B MTP module: 685B stored) and
 * DeepSeek-V2-Lite (15.7B total, 2.4B active without the embedding), from the
 * published config.json files in tests/golden/model/configs/.
 */
#include "model_testutil.h"

#define CFG_DIR MT_GOLDEN "configs/"

typedef struct parts {
    int64_t total, active, embedding, head, attention, dense_ffn, routed_experts, shared_experts,
        router, final_norm, mtp;
} parts;

/* The parts, summed over the tensor table with every stored MTP depth. */
static parts table_parts(const dsmoe_model_config *c) {
    parts p;
    memset(&p, 0, sizeof p);
    const int32_t depths = c->num_nextn_predict_layers;
    const int64_t n = dsmoe_model_tensor_count(c, depths);
    ASSERT_TRUE(n > 0);
    /* routed parameters per MoE layer (summed below), to take the unused experts off */
    int64_t unused = 0;
    for (int64_t i = 0; i < n; i++) {
        dsmoe_model_tensor_spec t;
        ASSERT_OK(dsmoe_model_tensor_at(c, depths, i, &t));
        const int64_t k = t.shape[0] * (t.ndim == 2 ? t.shape[1] : 1);
        const char *s = t.name;
        if (t.mtp) {
            p.mtp += k;
            continue;
        }
        if (strcmp(s, "model.embed_tokens.weight") == 0) p.embedding += k;
        else if (strcmp(s, "lm_head.weight") == 0) p.head += k;
        else if (strcmp(s, "model.norm.weight") == 0) p.final_norm += k;
        else if (strstr(s, ".self_attn.") || strstr(s, ".input_layernorm.") ||
                 strstr(s, ".post_attention_layernorm."))
            p.attention += k;
        else if (strstr(s, ".mlp.experts.")) {
            p.routed_experts += k;
            /* each routed tensor belongs to one of E experts; K of them are used */
            unused += k - k * c->num_experts_per_tok / c->n_routed_experts;
            ASSERT_EQ_INT(k * c->num_experts_per_tok % c->n_routed_experts, 0);
        } else if (strstr(s, ".mlp.shared_experts.")) p.shared_experts += k;
        else if (strstr(s, ".mlp.gate.")) p.router += k;
        else if (strstr(s, ".mlp.gate_proj.") || strstr(s, ".mlp.up_proj.") ||
                 strstr(s, ".mlp.down_proj."))
            p.dense_ffn += k;
        else TL_FAIL("tensor %s in no part", s);
    }
    /* A token uses K of the E experts: K/E of the routed tensors' parameters (exact
     * when each tensor's size times K is a multiple of E, checked above). */
    p.total = p.embedding + p.head + p.attention + p.dense_ffn + p.routed_experts +
              p.shared_experts + p.router + p.final_norm;
    p.active = p.total - unused;
    return p;
}

static void check_against_table(const dsmoe_model_config *c, const char *what) {
    dsmoe_model_counts k;
    memset(&k, 0x7f, sizeof k);
    ASSERT_OK(dsmoe_model_count_params(c, &k));
    parts p = table_parts(c);
#define SAME(f)                                                                           \
    do {                                                                                  \
        tl_checks++;                                                                      \
        if (k.f != p.f)                                                                   \
            TL_FAIL("%s: %s %lld, the tensor table gives %lld", what, #f, (long long)k.f, \
                    (long long)p.f);                                                      \
    } while (0)
    SAME(total);
    SAME(active);
    SAME(embedding);
    SAME(head);
    SAME(attention);
    SAME(dense_ffn);
    SAME(routed_experts);
    SAME(shared_experts);
    SAME(router);
    SAME(final_norm);
    SAME(mtp);
#undef SAME
    ASSERT_EQ_INT(k.total, k.embedding + k.head + k.attention + k.dense_ffn + k.routed_experts +
                               k.shared_experts + k.router + k.final_norm);
    /* Caches: per layer c + r values (MLA) against H(n + r) keys and H v values. */
    const int64_t L = c->num_hidden_layers, H = c->num_attention_heads;
    ASSERT_EQ_INT(dsmoe_model_cache_bytes_per_token(c),
                  L * (c->kv_lora_rank + c->qk_rope_head_dim) * 4);
    ASSERT_EQ_INT(dsmoe_model_mha_cache_bytes_per_token(c),
                  L * H * (c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim) * 4);
}

static int load_cfg(const char *name, dsmoe_model_config *c) {
    char path[512];
    snprintf(path, sizeof path, "%s%s", CFG_DIR, name);
    size_t len;
    char *t = mt_read(path, &len);
    if (!t) {
        TL_FAIL("cannot read %s", path);
        return 0;
    }
    dsmoe_status s = dsmoe_model_config_from_json(t, len, c);
    free(t);
    if (s != DSMOE_OK) TL_FAIL("%s: %s", path, dsmoe_last_error());
    return s == DSMOE_OK;
}

/* DeepSeek-V3: 671B parameters, 37B activated per token (the technical report), and the
 * Hugging Face checkpoint's 685B = 671B main model + 14B MTP module. Exact values from
 * the config by hand: attention per layer 2·7168 + 1536·7168 + 1536 + 128·192·1536 +
 * 576·7168 + 512 + 128·256·512 + 7168·128·128 = 187,121,664. */
static void test_deepseek_v3(void) {
    dsmoe_model_config c;
    if (!load_cfg("deepseek_v3.json", &c)) return;
    check_against_table(&c, "deepseek-v3");
    dsmoe_model_counts k;
    ASSERT_OK(dsmoe_model_count_params(&c, &k));
    ASSERT_EQ_INT(k.attention, 61LL * 187121664LL);
    ASSERT_EQ_INT(k.embedding, 129280LL * 7168);
    ASSERT_EQ_INT(k.routed_experts, 58LL * 256 * 3 * 7168 * 2048);
    ASSERT_EQ_INT(k.router, 58LL * (256 * 7168 + 256));
    ASSERT_EQ_INT(k.total, 671026419200LL);
    ASSERT_TRUE(k.total > 670.5e9 && k.total < 671.5e9);
    ASSERT_TRUE(k.active > 37.0e9 && k.active < 38.0e9);
    ASSERT_TRUE(k.total + k.mtp > 684.0e9 && k.total + k.mtp < 686.0e9);
    ASSERT_TRUE(k.mtp > 13.0e9 && k.mtp < 14.5e9);
    /* 61 · (512 + 64) · 4 bytes against 61 · 128 · (192 + 128) · 4: 71x smaller */
    ASSERT_EQ_INT(dsmoe_model_cache_bytes_per_token(&c), 140544);
    ASSERT_EQ_INT(dsmoe_model_mha_cache_bytes_per_token(&c), 9994240);
}

/* DeepSeek-V2-Lite: 15.7B total, 2.4B activated (the V2 paper; its activated count
 * leaves the embedding out: 2.45B here). */
static void test_deepseek_v2_lite(void) {
    dsmoe_model_config c;
    if (!load_cfg("deepseek_v2_lite.json", &c)) return;
    check_against_table(&c, "deepseek-v2-lite");
    dsmoe_model_counts k;
    ASSERT_OK(dsmoe_model_count_params(&c, &k));
    ASSERT_EQ_INT(k.total, 15706484224LL);
    ASSERT_TRUE(k.total > 15.65e9 && k.total < 15.75e9);
    ASSERT_TRUE(k.active - k.embedding >= 2.4e9 && k.active - k.embedding < 2.5e9);
    ASSERT_EQ_INT(k.router, 26LL * 64 * 2048); /* greedy: no correction bias */
    ASSERT_EQ_INT(k.mtp, 0);
}

static void test_other_configs(void) {
    dsmoe_model_config c;
    if (load_cfg("moonlight.json", &c)) check_against_table(&c, "moonlight");
    if (load_cfg("deepseek_v2.json", &c)) check_against_table(&c, "deepseek-v2");
    /* Tied embeddings, moe_layer_freq 2, MTP depths, a plain q_proj, no shared experts,
     * and a model without experts. */
    const char *j =
        "{\"hidden_size\": 12, \"intermediate_size\": 20, \"moe_intermediate_size\": 6,"
        " \"num_hidden_layers\": 5, \"first_k_dense_replace\": 1, \"moe_layer_freq\": 2,"
        " \"num_attention_heads\": 3, \"q_lora_rank\": null, \"kv_lora_rank\": 5,"
        " \"qk_nope_head_dim\": 4, \"qk_rope_head_dim\": 2, \"v_head_dim\": 3,"
        " \"n_routed_experts\": 8, \"n_shared_experts\": null, \"num_experts_per_tok\": 2,"
        " \"n_group\": 2, \"topk_group\": 1, \"scoring_func\": \"sigmoid\","
        " \"topk_method\": \"noaux_tc\", \"norm_topk_prob\": true,"
        " \"routed_scaling_factor\": 1.5, \"vocab_size\": 300, \"tie_word_embeddings\": true,"
        " \"num_nextn_predict_layers\": 2, \"max_position_embeddings\": 64}";
    ASSERT_OK(dsmoe_model_config_from_json(j, strlen(j), &c));
    check_against_table(&c, "tiny tied");
    dsmoe_model_counts k;
    ASSERT_OK(dsmoe_model_count_params(&c, &k));
    ASSERT_EQ_INT(k.head, 0);
    ASSERT_EQ_INT(k.shared_experts, 0);
    ASSERT_TRUE(k.mtp > 0);
    const char *d = "{\"hidden_size\": 8, \"intermediate_size\": 16, \"num_hidden_layers\": 2,"
                    " \"num_attention_heads\": 2, \"q_lora_rank\": 3, \"kv_lora_rank\": 4,"
                    " \"qk_nope_head_dim\": 2, \"qk_rope_head_dim\": 2, \"v_head_dim\": 2,"
                    " \"n_routed_experts\": null, \"vocab_size\": 10,"
                    " \"max_position_embeddings\": 64}";
    ASSERT_OK(dsmoe_model_config_from_json(d, strlen(d), &c));
    check_against_table(&c, "dense");
    ASSERT_OK(dsmoe_model_count_params(&c, &k));
    ASSERT_EQ_INT(k.active, k.total);
    ASSERT_EQ_INT(k.routed_experts + k.router + k.shared_experts, 0);
}

static void test_errors(void) {
    dsmoe_model_config c;
    dsmoe_model_counts k, before;
    ASSERT_STATUS(dsmoe_model_count_params(NULL, &k), DSMOE_STATUS_INVALID_ARGUMENT);
    if (!load_cfg("deepseek_v3.json", &c)) return;
    ASSERT_STATUS(dsmoe_model_count_params(&c, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    c.kv_lora_rank = 0;
    memset(&k, 0x11, sizeof k);
    before = k;
    ASSERT_STATUS(dsmoe_model_count_params(&c, &k), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "kv_lora_rank") != NULL);
    ASSERT_TRUE(memcmp(&k, &before, sizeof k) == 0);
    ASSERT_EQ_INT(dsmoe_model_cache_bytes_per_token(&c), -1);
    ASSERT_EQ_INT(dsmoe_model_mha_cache_bytes_per_token(&c), -1);
    ASSERT_EQ_INT(dsmoe_model_cache_bytes_per_token(NULL), -1);
    /* Sizes each within the validator's limits whose product overflows int64. */
    if (!load_cfg("deepseek_v3.json", &c)) return;
    c.hidden_size = 1 << 20;
    c.moe_intermediate_size = 1 << 20;
    c.num_hidden_layers = 4096;
    c.n_routed_experts = 65536;
    ASSERT_STATUS(dsmoe_model_count_params(&c, &k), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "more than 4e18 parameters") != NULL);
}

int main(void) {
    RUN(test_deepseek_v3);
    RUN(test_deepseek_v2_lite);
    RUN(test_other_configs);
    RUN(test_errors);
    return TEST_SUMMARY();
}
