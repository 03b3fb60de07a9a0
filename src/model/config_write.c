/*
 * config_write.c — a model configuration as config.json text (the DeepseekV3 keys that
 * dsmoe_model_config_from_json reads), so that models dsmoe writes are Hugging Face
 * model directories. Every number is printed so that reading it back gives the same
 * value (floats with 9 significant digits, doubles with 17), in the C locale.
 */
#include "io/io_internal.h"
#include "model/model_internal.h"

#include <locale.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Text being built: writes what fits, counts everything. */
typedef struct jout {
    char *buf;
    size_t cap, len;
} jout;

static void emit(jout *o, const char *fmt, ...) DSMOE__PRINTF(2, 3);
static void emit(jout *o, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    size_t room = o->len < o->cap ? o->cap - o->len : 0;
    int n = vsnprintf(room ? o->buf + o->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n > 0) o->len += (size_t)n;
}

static void key_int(jout *o, const char *k, long long v) { emit(o, "  \"%s\": %lld,\n", k, v); }
static void key_int_or_null(jout *o, const char *k, long long v) {
    if (v > 0) key_int(o, k, v);
    else emit(o, "  \"%s\": null,\n", k);
}
static void key_str(jout *o, const char *k, const char *v) { emit(o, "  \"%s\": \"%s\",\n", k, v); }
static void key_bool(jout *o, const char *k, int v) { emit(o, "  \"%s\": %s,\n", k, v ? "true" : "false"); }
static void key_float(jout *o, const char *k, float v) { emit(o, "  \"%s\": %.9g,\n", k, (double)v); }
static void key_double(jout *o, const char *k, double v) { emit(o, "  \"%s\": %.17g,\n", k, v); }

/* %g prints valid JSON numbers ("1e-06", "10000"); NaN and Inf cannot occur, the
 * config being validated first. */

int64_t dsmoe_model_config_to_json(const dsmoe_model_config *c, char *buf, size_t cap) {
    if (!c || (!buf && cap)) {
        dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "config to JSON: NULL argument");
        return -1;
    }
    if (dsmoe_model_config_validate(c) != DSMOE_OK) return -1;
    locale_t cl = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    locale_t old = cl ? uselocale(cl) : (locale_t)0;
    jout o = {buf, cap, 0};
    const int moe = c->n_routed_experts > 0;
    emit(&o, "{\n  \"architectures\": [\"DeepseekV3ForCausalLM\"],\n");
    key_str(&o, "model_type", "deepseek_v3");
    key_int(&o, "vocab_size", c->vocab_size);
    key_int(&o, "hidden_size", c->hidden_size);
    key_int(&o, "intermediate_size", c->intermediate_size);
    key_int(&o, "moe_intermediate_size", c->moe_intermediate_size);
    key_int(&o, "num_hidden_layers", c->num_hidden_layers);
    key_int(&o, "num_nextn_predict_layers", c->num_nextn_predict_layers);
    key_int(&o, "num_attention_heads", c->num_attention_heads);
    key_int(&o, "num_key_value_heads", c->num_attention_heads);
    key_int_or_null(&o, "n_shared_experts", moe ? c->n_shared_experts : 0);
    if (moe && c->n_shared_experts == 0) { /* 0 and null differ for the reader: keep 0 */
        o.len -= strlen("null,\n");
        emit(&o, "0,\n");
    }
    key_int_or_null(&o, "n_routed_experts", c->n_routed_experts);
    key_float(&o, "routed_scaling_factor", c->routed_scaling_factor);
    key_int_or_null(&o, "q_lora_rank", c->q_lora_rank);
    key_int(&o, "kv_lora_rank", c->kv_lora_rank);
    key_int(&o, "qk_rope_head_dim", c->qk_rope_head_dim);
    key_int(&o, "v_head_dim", c->v_head_dim);
    key_int(&o, "qk_nope_head_dim", c->qk_nope_head_dim);
    key_str(&o, "topk_method", c->topk_method == DSMOE_TOPK_METHOD_NOAUX_TC ? "noaux_tc"
                               : c->topk_method == DSMOE_TOPK_METHOD_GROUP_LIMITED_GREEDY
                                   ? "group_limited_greedy"
                                   : "greedy");
    key_int(&o, "n_group", c->n_group);
    key_int(&o, "topk_group", c->topk_group);
    key_int(&o, "num_experts_per_tok", c->num_experts_per_tok);
    key_int(&o, "moe_layer_freq", c->moe_layer_freq);
    key_int(&o, "first_k_dense_replace", c->first_k_dense_replace);
    key_bool(&o, "norm_topk_prob", c->norm_topk_prob);
    key_str(&o, "scoring_func", c->scoring_func == DSMOE_SCORE_FUNC_SIGMOID ? "sigmoid" : "softmax");
    key_str(&o, "hidden_act", "silu");
    key_int(&o, "max_position_embeddings", (long long)c->max_position_embeddings);
    key_float(&o, "rms_norm_eps", c->rms_norm_eps);
    key_double(&o, "rope_theta", c->rope_theta);
    if (c->rope_type == DSMOE_ROPE_TYPE_YARN) {
        emit(&o,
             "  \"rope_scaling\": {\"type\": \"yarn\", \"factor\": %.17g, "
             "\"original_max_position_embeddings\": %lld, \"beta_fast\": %.17g, "
             "\"beta_slow\": %.17g, \"mscale\": %.17g, \"mscale_all_dim\": %.17g},\n",
             c->rope_factor, (long long)c->rope_original_max_position_embeddings,
             c->rope_beta_fast, c->rope_beta_slow, c->rope_mscale, c->rope_mscale_all_dim);
    } else {
        emit(&o, "  \"rope_scaling\": null,\n");
    }
    key_bool(&o, "rope_interleave", 1);
    key_bool(&o, "attention_bias", 0);
    key_bool(&o, "tie_word_embeddings", c->tie_word_embeddings);
    if (c->fp8_block_rows > 0)
        emit(&o,
             "  \"quantization_config\": {\"quant_method\": \"fp8\", \"fmt\": \"e4m3\", "
             "\"activation_scheme\": \"dynamic\", \"weight_block_size\": [%d, %d]},\n",
             (int)c->fp8_block_rows, (int)c->fp8_block_cols);
    if (c->byte_vocab) key_str(&o, "dsmoe_vocab", "bytes");
    if (c->bos_token_id >= 0) key_int(&o, "bos_token_id", c->bos_token_id);
    if (c->eos_token_id >= 0) key_int(&o, "eos_token_id", c->eos_token_id);
    emit(&o, "  \"use_cache\": true\n}\n");
    if (cl) {
        uselocale(old);
        freelocale(cl);
    }
    return (int64_t)o.len;
}

dsmoe_status dsmoe_model_config_write(const dsmoe_model_config *c, const char *dir) {
    if (!c || !dir) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "config write: NULL argument");
    dsmoe_status s = dsmoe_model_config_validate(c);
    if (s != DSMOE_OK) return s;
    int64_t n = dsmoe_model_config_to_json(c, NULL, 0);
    if (n < 0) return dsmoe__error(DSMOE_STATUS_INTERNAL, "config write: %s", dsmoe_last_error());
    char *text = (char *)malloc((size_t)n + 1);
    if (!text) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "config write: out of memory");
    dsmoe_model_config_to_json(c, text, (size_t)n + 1);
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/config.json", dir) >= sizeof path) {
        free(text);
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "config write: folder name too long");
    }
    dsmoe__atomic_file f;
    s = dsmoe__atomic_open(&f, path);
    if (s == DSMOE_OK) {
        s = dsmoe__atomic_write(&f, text, (size_t)n);
        if (s == DSMOE_OK) s = dsmoe__atomic_commit(&f);
        else dsmoe__atomic_abort(&f);
    }
    free(text);
    return s;
}
