/*
 * test_model_config_write.c — config.json written by dsmoe (dsmoe_model_config_to_json,
 * dsmoe_model_config_write) reads back to the same configuration, for every golden
 * model directory, every reference config file and every preset; the text is
 * deterministic, the length query and truncation are safe, and invalid configs and
 * unknown presets are refused.
 */
#include "model/model_internal.h"
#include "model_testutil.h"

#include <dirent.h>

/* Field by field (the struct may have padding). */
static int same_config(const dsmoe_model_config *a, const dsmoe_model_config *b) {
#define F(x) (a->x == b->x)
    return F(hidden_size) && F(intermediate_size) && F(moe_intermediate_size) && F(num_hidden_layers) &&
           F(first_k_dense_replace) && F(moe_layer_freq) && F(num_attention_heads) && F(q_lora_rank) &&
           F(kv_lora_rank) && F(qk_nope_head_dim) && F(qk_rope_head_dim) && F(v_head_dim) &&
           F(n_routed_experts) && F(n_shared_experts) && F(num_experts_per_tok) && F(n_group) &&
           F(topk_group) && F(scoring_func) && F(topk_method) && F(norm_topk_prob) &&
           F(routed_scaling_factor) && F(rms_norm_eps) && F(rope_theta) && F(max_position_embeddings) &&
           F(rope_type) && F(rope_factor) && F(rope_original_max_position_embeddings) &&
           F(rope_beta_fast) && F(rope_beta_slow) && F(rope_mscale) && F(rope_mscale_all_dim) &&
           F(tie_word_embeddings) && F(vocab_size) && F(num_nextn_predict_layers) &&
           F(fp8_block_rows) && F(fp8_block_cols) && F(byte_vocab) && F(bos_token_id) && F(eos_token_id);
#undef F
}

static void round_trip(const char *what, const dsmoe_model_config *c) {
    int64_t n = dsmoe_model_config_to_json(c, NULL, 0);
    if (n <= 0) {
        TL_FAIL("%s: %s", what, dsmoe_last_error());
        return;
    }
    char *t = (char *)malloc((size_t)n + 1), *u = (char *)malloc((size_t)n + 1);
    ASSERT_EQ_INT(dsmoe_model_config_to_json(c, t, (size_t)n + 1), n);
    ASSERT_EQ_INT((int64_t)strlen(t), n);
    dsmoe_model_config back;
    if (dsmoe_model_config_from_json(t, (size_t)n, &back) != DSMOE_OK)
        TL_FAIL("%s: written config does not read back: %s\n%s", what, dsmoe_last_error(), t);
    else if (!same_config(c, &back))
        TL_FAIL("%s: config differs after a round trip\n%s", what, t);
    /* deterministic, and the same text from the read-back config */
    ASSERT_EQ_INT(dsmoe_model_config_to_json(&back, u, (size_t)n + 1), n);
    ASSERT_TRUE(memcmp(t, u, (size_t)n + 1) == 0);
    /* truncation: NUL-terminated, nothing written past cap */
    memset(u, 'x', (size_t)n + 1);
    ASSERT_EQ_INT(dsmoe_model_config_to_json(c, u, 10), n);
    ASSERT_TRUE(u[9] == '\0' && memcmp(u, t, 9) == 0 && u[10] == 'x');
    free(t);
    free(u);
}

static void test_golden_dirs(void) {
    size_t len;
    char *m = mt_read(MT_GOLDEN "MANIFEST", &len);
    ASSERT_TRUE(m != NULL);
    int cases = 0;
    for (char *name = m ? strtok(m, "\n") : NULL; name; name = strtok(NULL, "\n")) {
        char dir[600];
        dsmoe_model_config c;
        snprintf(dir, sizeof dir, "%s%s", MT_GOLDEN, name);
        ASSERT_OK(dsmoe_model_config_from_dir(dir, &c));
        round_trip(name, &c);
        cases++;
    }
    ASSERT_TRUE(cases >= 4);
    free(m);
}

/* The reference configs (DeepSeek-V3, V2, V2-Lite, Moonlight, ...). */
static void test_reference_configs(void) {
    DIR *d = opendir(MT_GOLDEN "configs");
    ASSERT_TRUE(d != NULL);
    if (!d) return;
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        size_t l = strlen(e->d_name);
        if (l < 6 || strcmp(e->d_name + l - 5, ".json") != 0) continue;
        char path[700];
        size_t len;
        snprintf(path, sizeof path, "%sconfigs/%s", MT_GOLDEN, e->d_name);
        char *text = mt_read(path, &len);
        dsmoe_model_config c;
        if (text && dsmoe_model_config_from_json(text, len, &c) == DSMOE_OK) {
            round_trip(e->d_name, &c);
            n++;
        }
        free(text);
    }
    closedir(d);
    ASSERT_TRUE(n >= 3);
}

static void test_presets(void) {
    const char *names[] = {"tiny", "small", "default"};
    int64_t prev = 0;
    for (int i = 0; i < 3; i++) {
        dsmoe_model_config c;
        ASSERT_OK(dsmoe_model_config_preset(names[i], &c));
        ASSERT_OK(dsmoe_model_config_validate(&c));
        ASSERT_TRUE(c.byte_vocab == 1 && c.vocab_size >= 259 && c.num_nextn_predict_layers == 1);
        ASSERT_TRUE(dsmoe_model_layer_is_moe(&c, c.num_hidden_layers - 1) && !dsmoe_model_layer_is_moe(&c, 0));
        round_trip(names[i], &c);
        int64_t sz = (int64_t)c.hidden_size * c.num_hidden_layers * c.n_routed_experts;
        ASSERT_TRUE(sz > prev); /* larger and larger */
        prev = sz;
    }
    dsmoe_model_config c;
    ASSERT_STATUS(dsmoe_model_config_preset("huge", &c), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "huge") != NULL);
}

static void test_write_file_and_refusals(void) {
    dsmoe_model_config c;
    ASSERT_OK(dsmoe_model_config_preset("tiny", &c));
    const char *dir = tl_tmp("config_write_dir");
    mkdir(dir, 0700);
    ASSERT_OK(dsmoe_model_config_write(&c, dir));
    dsmoe_model_config back;
    ASSERT_OK(dsmoe_model_config_from_dir(dir, &back));
    ASSERT_TRUE(same_config(&c, &back));
    /* an invalid config is refused and the file stays as it was */
    c.qk_rope_head_dim = 3;
    char buf[64];
    ASSERT_EQ_INT(dsmoe_model_config_to_json(&c, buf, sizeof buf), -1);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "qk_rope_head_dim") != NULL);
    ASSERT_STATUS(dsmoe_model_config_write(&c, dir), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_OK(dsmoe_model_config_from_dir(dir, &back));
    ASSERT_EQ_INT(back.qk_rope_head_dim, 4);
    ASSERT_STATUS(dsmoe_model_config_write(&back, tl_tmp("no/such/folder")), DSMOE_STATUS_IO);
    ASSERT_EQ_INT(dsmoe_model_config_to_json(NULL, NULL, 0), -1);
}

int main(void) {
    RUN(test_golden_dirs);
    RUN(test_reference_configs);
    RUN(test_presets);
    RUN(test_write_file_and_refusals);
    return TEST_SUMMARY();
}
