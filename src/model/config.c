/*
 * config.c — the model configuration from a Hugging Face config.json (DeepseekV3 keys,
 * DeepseekV2's where they differ), its validation with messages naming the JSON key,
 * and the router / MoE layer configs it implies (SPEC-model §6, SPEC-routing §2).
 *
 * The file is read with the strict pull reader of io/json.h. That reader reads
 * strings and unsigned integers; numbers with a sign, fraction or exponent, true,
 * false and null are read here (json_number, json_literal), by the same grammar
 * (RFC 8259 §6), and values of keys that do not change the math are skipped
 * (json_skip) after being checked to be well-formed JSON.
 */
#include "io/json.h"
#include "model/model_internal.h"

#include <errno.h>
#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CFG_WHAT "config.json"
#define CFG_MAX_DIM (1 << 20)   /* largest size key accepted (hidden, ranks, head dims) */
#define CFG_MAX_HEADS 4096
#define CFG_MAX_LAYERS 4096
#define CFG_MAX_MTP DSMOE__MODEL_MAX_MTP
#define CFG_MAX_VOCAB (1 << 24)

/* ============================================================ JSON values == */

/* Reads a JSON number (the whole RFC 8259 grammar) as a double. The text is
 * converted by strtod in the "C" locale, so a host program's setlocale() cannot turn
 * "2.5" into 2. */
static dsmoe_status json_number(dsmoe__json *j, const char *key, double *v, int *integral) {
    char f[64];
    if (dsmoe__json_peek(j) != DSMOE__JSON_NUMBER)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "%s: %s must be a number, found %s",
                            CFG_WHAT, key, dsmoe__json_found(j, f, sizeof f));
    const unsigned char *s = j->s;
    size_t p = j->pos, start = j->pos, end = j->end;
    int is_int = 1;
    if (s[p] == '-') p++;
    if (p < end && s[p] == '0') {
        p++;
    } else if (p < end && s[p] >= '1' && s[p] <= '9') {
        while (p < end && s[p] >= '0' && s[p] <= '9') p++;
    } else {
        return dsmoe__json_fail(j, start, "%s: malformed number", key);
    }
    if (p < end && s[p] == '.') {
        is_int = 0;
        p++;
        if (p >= end || s[p] < '0' || s[p] > '9')
            return dsmoe__json_fail(j, start, "%s: malformed number (digits must follow '.')", key);
        while (p < end && s[p] >= '0' && s[p] <= '9') p++;
    }
    if (p < end && (s[p] == 'e' || s[p] == 'E')) {
        is_int = 0;
        p++;
        if (p < end && (s[p] == '+' || s[p] == '-')) p++;
        if (p >= end || s[p] < '0' || s[p] > '9')
            return dsmoe__json_fail(j, start, "%s: malformed number (exponent without digits)", key);
        while (p < end && s[p] >= '0' && s[p] <= '9') p++;
    }
    if (p < end && ((s[p] >= '0' && s[p] <= '9') || s[p] == '.'))
        return dsmoe__json_fail(j, start, "%s: malformed number (leading zero)", key);
    char buf[128];
    if (p - start >= sizeof buf)
        return dsmoe__json_fail(j, start, "%s: number longer than %zu characters", key,
                                sizeof buf - 1);
    memcpy(buf, s + start, p - start);
    buf[p - start] = '\0';
    locale_t c_loc = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    locale_t old = c_loc ? uselocale(c_loc) : (locale_t)0;
    errno = 0;
    char *stop = NULL;
    double x = strtod(buf, &stop);
    int err = errno;
    if (c_loc) {
        uselocale(old);
        freelocale(c_loc);
    }
    if (stop != buf + (p - start))
        return dsmoe__json_fail(j, start, "%s: number '%s' could not be converted", key, buf);
    if (err == ERANGE && !isfinite(x))
        return dsmoe__json_fail(j, start, "%s: number '%s' is out of range", key, buf);
    j->pos = p;
    *v = x;
    if (integral) *integral = is_int;
    return DSMOE_OK;
}

/* Consumes the literal `word` (true, false, null), which must not run on into
 * letters or digits. */
static int json_literal(dsmoe__json *j, const char *word) {
    size_t n = strlen(word);
    (void)dsmoe__json_peek(j); /* skips whitespace */
    if (j->end - j->pos < n || memcmp(j->s + j->pos, word, n) != 0) return 0;
    if (j->pos + n < j->end) {
        unsigned char c = j->s[j->pos + n];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return 0;
    }
    j->pos += n;
    return 1;
}

static dsmoe_status json_bool(dsmoe__json *j, const char *key, int *v) {
    char f[64];
    if (json_literal(j, "true")) {
        *v = 1;
        return DSMOE_OK;
    }
    if (json_literal(j, "false")) {
        *v = 0;
        return DSMOE_OK;
    }
    return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "%s: %s must be true or false, found %s",
                        CFG_WHAT, key, dsmoe__json_found(j, f, sizeof f));
}

dsmoe_status dsmoe__model_json_skip(dsmoe__json *j, const char *key) {
    char f[64];
    dsmoe_status s;
    int more;
    double d;
    const char *str;
    size_t len, at;
    switch (dsmoe__json_peek(j)) {
    case DSMOE__JSON_OBJECT:
        if ((s = dsmoe__json_begin(j, '{', key)) != DSMOE_OK) return s;
        for (;;) {
            if ((s = dsmoe__json_next_member(j, &more, &str, &len, &at)) != DSMOE_OK) return s;
            if (!more) return DSMOE_OK;
            if ((s = dsmoe__model_json_skip(j, key)) != DSMOE_OK) return s;
        }
    case DSMOE__JSON_ARRAY:
        if ((s = dsmoe__json_begin(j, '[', key)) != DSMOE_OK) return s;
        for (;;) {
            if ((s = dsmoe__json_next(j, &more)) != DSMOE_OK) return s;
            if (!more) return DSMOE_OK;
            if ((s = dsmoe__model_json_skip(j, key)) != DSMOE_OK) return s;
        }
    case DSMOE__JSON_STRING: return dsmoe__json_string(j, &str, &len);
    case DSMOE__JSON_NUMBER: return json_number(j, key, &d, NULL);
    case DSMOE__JSON_BOOL:
        if (json_literal(j, "true") || json_literal(j, "false")) return DSMOE_OK;
        break;
    case DSMOE__JSON_NULL:
        if (json_literal(j, "null")) return DSMOE_OK;
        break;
    default: break;
    }
    return dsmoe__json_fail(j, j->pos, "%s: expected a JSON value, found %s", key,
                            dsmoe__json_found(j, f, sizeof f));
}

/* An integer key in [lo, hi]; *was_null = 1 (and *v untouched) for null when
 * was_null is non-NULL, else null is an error. */
static dsmoe_status json_int(dsmoe__json *j, const char *key, int64_t lo, int64_t hi, int64_t *v,
                             int *was_null) {
    if (was_null) {
        *was_null = 0;
        if (json_literal(j, "null")) {
            *was_null = 1;
            return DSMOE_OK;
        }
    }
    double d = 0.0;
    int integral = 0;
    char f[64];
    if (dsmoe__json_peek(j) != DSMOE__JSON_NUMBER)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "%s: %s must be an integer%s, found %s",
                            CFG_WHAT, key, was_null ? " or null" : "",
                            dsmoe__json_found(j, f, sizeof f));
    dsmoe_status s = json_number(j, key, &d, &integral);
    if (s != DSMOE_OK) return s;
    if (!integral)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "%s: %s must be an integer, found %.17g", CFG_WHAT, key, d);
    if (!(d >= (double)lo && d <= (double)hi))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "%s: %s must be in %lld..%lld, found %.17g", CFG_WHAT, key,
                            (long long)lo, (long long)hi, d);
    *v = (int64_t)d;
    return DSMOE_OK;
}

static dsmoe_status json_str(dsmoe__json *j, const char *key, const char **v) {
    char f[64];
    size_t len;
    if (dsmoe__json_peek(j) != DSMOE__JSON_STRING)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "%s: %s must be a string, found %s",
                            CFG_WHAT, key, dsmoe__json_found(j, f, sizeof f));
    return dsmoe__json_string(j, v, &len);
}

/* ============================================================ the keys == */

/* Keys read from the top level; the bit of each in `seen`. */
typedef enum cfg_key {
    K_HIDDEN, K_INTER, K_MOE_INTER, K_LAYERS, K_FIRST_DENSE, K_MOE_FREQ, K_HEADS, K_Q_LORA,
    K_KV_LORA, K_NOPE, K_ROPE, K_V, K_E, K_SHARED, K_TOPK, K_GROUP, K_TOPK_GROUP, K_SCORING,
    K_TOPK_METHOD, K_NORM_TOPK, K_SCALE, K_EPS, K_THETA, K_MAXPOS, K_ROPE_SCALING, K_TIE,
    K_VOCAB, K_MTP, K_ACT, K_ATTN_BIAS, K_ROPE_INTERLEAVE, K_QUANT, K_ROPE_PARAMS, K_DSMOE_VOCAB,
    K_BOS, K_EOS, K_COUNT_
} cfg_key;

static const char *const cfg_key_names[K_COUNT_] = {
    "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "first_k_dense_replace", "moe_layer_freq", "num_attention_heads", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "scoring_func",
    "topk_method", "norm_topk_prob", "routed_scaling_factor", "rms_norm_eps", "rope_theta",
    "max_position_embeddings", "rope_scaling", "tie_word_embeddings", "vocab_size",
    "num_nextn_predict_layers", "hidden_act", "attention_bias", "rope_interleave",
    "quantization_config", "rope_parameters", "dsmoe_vocab", "bos_token_id", "eos_token_id"};

static dsmoe_status cfg_missing(const char *key, const char *why) {
    return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "%s: %s is missing%s", CFG_WHAT, key, why);
}

static dsmoe_status cfg_int32(dsmoe__json *j, const char *key, int64_t lo, int64_t hi, int32_t *v,
                              int allow_null) {
    int64_t x = 0;
    int was_null = 0;
    dsmoe_status s = json_int(j, key, lo, hi, &x, allow_null ? &was_null : NULL);
    if (s == DSMOE_OK) *v = was_null ? 0 : (int32_t)x;
    return s;
}

/* bos_token_id / eos_token_id: an id, null (-1), or a non-empty list of ids (some
 * generation configs list several end tokens: the first is used, every one must be an
 * id). The range against vocab_size is checked by the validation. */
static dsmoe_status cfg_token_id(dsmoe__json *j, const char *key, int32_t *v) {
    int64_t x = 0;
    int was_null = 0;
    dsmoe_status s;
    if (dsmoe__json_peek(j) != DSMOE__JSON_ARRAY) {
        if ((s = json_int(j, key, 0, CFG_MAX_VOCAB, &x, &was_null)) != DSMOE_OK) return s;
        *v = was_null ? -1 : (int32_t)x;
        return DSMOE_OK;
    }
    int more, n = 0;
    int32_t first = -1;
    if ((s = dsmoe__json_begin(j, '[', key)) != DSMOE_OK) return s;
    for (;;) {
        if ((s = dsmoe__json_next(j, &more)) != DSMOE_OK) return s;
        if (!more) break;
        if ((s = json_int(j, key, 0, CFG_MAX_VOCAB, &x, NULL)) != DSMOE_OK) return s;
        if (n++ == 0) first = (int32_t)x;
    }
    if (n == 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "%s: %s must be an integer, a non-empty list of integers or null, "
                            "found []", CFG_WHAT, key);
    *v = first;
    return DSMOE_OK;
}

/* rope_scaling, or transformers 5's rope_parameters (which may carry rope_theta: it
 * goes to *inner_theta, NaN when absent). */
static dsmoe_status cfg_rope_scaling(dsmoe__json *j, dsmoe_model_config *c, const char *obj,
                                     double *inner_theta) {
    dsmoe_status s;
    if (json_literal(j, "null")) {
        c->rope_type = DSMOE_ROPE_TYPE_DEFAULT;
        return DSMOE_OK;
    }
    if (dsmoe__json_peek(j) != DSMOE__JSON_OBJECT) {
        char f[64];
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "%s: %s must be an object or null, found %s",
                            CFG_WHAT, obj, dsmoe__json_found(j, f, sizeof f));
    }
    if ((s = dsmoe__json_begin(j, '{', obj)) != DSMOE_OK) return s;
    enum { R_TYPE, R_FACTOR, R_L0, R_BF, R_BS, R_MS, R_MSA, R_COUNT_ };
    static const char *const names[R_COUNT_] = {
        "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
        "mscale", "mscale_all_dim"};
    unsigned seen = 0;
    const char *type = NULL;
    const char *type_key = "type";
    double vals[R_COUNT_] = {0};
    int64_t l0 = 0;
    for (;;) {
        int more;
        const char *key;
        size_t len, at;
        char full[96];
        if ((s = dsmoe__json_next_member(j, &more, &key, &len, &at)) != DSMOE_OK) return s;
        if (!more) break;
        int r = -1;
        for (int i = 0; i < R_COUNT_; i++)
            if (strcmp(key, names[i]) == 0) r = i;
        if (strcmp(key, "rope_type") == 0) r = R_TYPE;
        if (r == R_TYPE && !(seen & (1u << R_TYPE))) type_key = key[0] == 'r' ? "rope_type" : "type";
        snprintf(full, sizeof full, "%s.%s", obj, key);
        if (r < 0) {
            if (strcmp(obj, "rope_parameters") == 0 && strcmp(key, "rope_theta") == 0) {
                if ((s = json_number(j, full, inner_theta, NULL)) != DSMOE_OK) return s;
                continue;
            }
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "%s: %s is not supported (it may change the rotary embedding)",
                                CFG_WHAT, full);
        }
        if (seen & (1u << r))
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "%s: %s is given twice%s", CFG_WHAT,
                                full, r == R_TYPE ? " (as type and rope_type)" : "");
        seen |= 1u << r;
        if (r == R_TYPE) {
            if ((s = json_str(j, full, &type)) != DSMOE_OK) return s;
        } else if (r == R_L0) {
            if ((s = json_int(j, full, 1, INT64_MAX / 2, &l0, NULL)) != DSMOE_OK) return s;
        } else if ((s = json_number(j, full, &vals[r], NULL)) != DSMOE_OK) {
            return s;
        }
    }
    char key_type[64];
    snprintf(key_type, sizeof key_type, "%s.%s", obj, type_key);
    if (!type) return cfg_missing(key_type, " (\"yarn\" is supported)");
    if (strcmp(type, "default") == 0 && strcmp(obj, "rope_parameters") == 0 &&
        !(seen & ~(1u << R_TYPE))) {
        c->rope_type = DSMOE_ROPE_TYPE_DEFAULT;
        return DSMOE_OK;
    }
    if (strcmp(type, "yarn") != 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "%s: %s \"%s\" is not supported (only \"yarn\")", CFG_WHAT, key_type,
                            type);
    char k2[96];
    if (!(seen & (1u << R_FACTOR))) {
        snprintf(k2, sizeof k2, "%s.factor", obj);
        return cfg_missing(k2, " (required for yarn)");
    }
    if (!(seen & (1u << R_L0))) {
        snprintf(k2, sizeof k2, "%s.original_max_position_embeddings", obj);
        return cfg_missing(k2, " (required for yarn)");
    }
    c->rope_type = DSMOE_ROPE_TYPE_YARN;
    c->rope_factor = vals[R_FACTOR];
    c->rope_original_max_position_embeddings = l0;
    c->rope_beta_fast = (seen & (1u << R_BF)) ? vals[R_BF] : 32.0;
    c->rope_beta_slow = (seen & (1u << R_BS)) ? vals[R_BS] : 1.0;
    c->rope_mscale = (seen & (1u << R_MS)) ? vals[R_MS] : 1.0;
    c->rope_mscale_all_dim = (seen & (1u << R_MSA)) ? vals[R_MSA] : 0.0;
    return DSMOE_OK;
}

static dsmoe_status cfg_quant(dsmoe__json *j, dsmoe_model_config *c) {
    dsmoe_status s;
    if (json_literal(j, "null")) return DSMOE_OK;
    if ((s = dsmoe__json_begin(j, '{', "quantization_config")) != DSMOE_OK) return s;
    int have_method = 0, have_block = 0;
    int32_t br = 0, bc = 0;
    for (;;) {
        int more;
        const char *key = "", *str = "";
        size_t len, at;
        char full[96];
        if ((s = dsmoe__json_next_member(j, &more, &key, &len, &at)) != DSMOE_OK) return s;
        if (!more) break;
        snprintf(full, sizeof full, "quantization_config.%s", key);
        if (strcmp(key, "quant_method") == 0) {
            if ((s = json_str(j, full, &str)) != DSMOE_OK) return s;
            if (strcmp(str, "fp8") != 0)
                return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                    "%s: %s \"%s\" is not supported (only \"fp8\")", CFG_WHAT,
                                    full, str);
            have_method = 1;
        } else if (strcmp(key, "fmt") == 0) {
            if ((s = json_str(j, full, &str)) != DSMOE_OK) return s;
            if (strcmp(str, "e4m3") != 0)
                return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                    "%s: %s \"%s\" is not supported (only \"e4m3\")", CFG_WHAT,
                                    full, str);
        } else if (strcmp(key, "activation_scheme") == 0) {
            /* Activations are not quantised here (fp32 compute); only "dynamic", which
             * stores no activation scales, is a file we read completely. */
            if ((s = json_str(j, full, &str)) != DSMOE_OK) return s;
            if (strcmp(str, "dynamic") != 0)
                return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                    "%s: %s \"%s\" is not supported (only \"dynamic\")",
                                    CFG_WHAT, full, str);
        } else if (strcmp(key, "weight_block_size") == 0) {
            int more2;
            int64_t v[2] = {0, 0};
            int n = 0;
            if ((s = dsmoe__json_begin(j, '[', full)) != DSMOE_OK) return s;
            for (;;) {
                if ((s = dsmoe__json_next(j, &more2)) != DSMOE_OK) return s;
                if (!more2) break;
                if (n == 2)
                    return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                        "%s: %s must have 2 entries", CFG_WHAT, full);
                if ((s = json_int(j, full, 1, CFG_MAX_DIM, &v[n++], NULL)) != DSMOE_OK) return s;
            }
            if (n != 2)
                return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "%s: %s must have 2 entries",
                                    CFG_WHAT, full);
            br = (int32_t)v[0];
            bc = (int32_t)v[1];
            have_block = 1;
        } else {
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "%s: %s is not supported (it may change how weights are stored)",
                                CFG_WHAT, full);
        }
    }
    if (!have_method) return cfg_missing("quantization_config.quant_method", "");
    if (!have_block) return cfg_missing("quantization_config.weight_block_size", "");
    c->fp8_block_rows = br;
    c->fp8_block_cols = bc;
    return DSMOE_OK;
}

static dsmoe_status cfg_member(dsmoe__json *j, cfg_key k, dsmoe_model_config *c,
                               double *inner_theta) {
    const char *key = cfg_key_names[k];
    const char *str = "";
    int b = 0;
    double d = 0.0;
    dsmoe_status s;
    switch (k) {
    case K_HIDDEN: return cfg_int32(j, key, 1, CFG_MAX_DIM, &c->hidden_size, 0);
    case K_INTER: return cfg_int32(j, key, 1, CFG_MAX_DIM, &c->intermediate_size, 0);
    case K_MOE_INTER: return cfg_int32(j, key, 1, CFG_MAX_DIM, &c->moe_intermediate_size, 0);
    case K_LAYERS: return cfg_int32(j, key, 1, CFG_MAX_LAYERS, &c->num_hidden_layers, 0);
    case K_FIRST_DENSE: return cfg_int32(j, key, 0, CFG_MAX_LAYERS, &c->first_k_dense_replace, 0);
    case K_MOE_FREQ: return cfg_int32(j, key, 1, CFG_MAX_LAYERS, &c->moe_layer_freq, 0);
    case K_HEADS: return cfg_int32(j, key, 1, CFG_MAX_HEADS, &c->num_attention_heads, 0);
    case K_Q_LORA: return cfg_int32(j, key, 1, CFG_MAX_DIM, &c->q_lora_rank, 1);
    case K_KV_LORA: return cfg_int32(j, key, 1, CFG_MAX_DIM, &c->kv_lora_rank, 0);
    case K_NOPE: return cfg_int32(j, key, 1, CFG_MAX_DIM, &c->qk_nope_head_dim, 0);
    case K_ROPE: return cfg_int32(j, key, 2, CFG_MAX_DIM, &c->qk_rope_head_dim, 0);
    case K_V: return cfg_int32(j, key, 1, CFG_MAX_DIM, &c->v_head_dim, 0);
    case K_E: return cfg_int32(j, key, 1, DSMOE_MAX_EXPERTS, &c->n_routed_experts, 1);
    case K_SHARED: return cfg_int32(j, key, 0, 1024, &c->n_shared_experts, 1);
    case K_TOPK: return cfg_int32(j, key, 1, DSMOE_MAX_EXPERTS, &c->num_experts_per_tok, 0);
    case K_GROUP: return cfg_int32(j, key, 1, DSMOE_MAX_EXPERTS, &c->n_group, 0);
    case K_TOPK_GROUP: return cfg_int32(j, key, 1, DSMOE_MAX_EXPERTS, &c->topk_group, 0);
    case K_SCORING:
        if ((s = json_str(j, key, &str)) != DSMOE_OK) return s;
        if (strcmp(str, "sigmoid") == 0) c->scoring_func = DSMOE_SCORE_FUNC_SIGMOID;
        else if (strcmp(str, "softmax") == 0) c->scoring_func = DSMOE_SCORE_FUNC_SOFTMAX;
        else
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "%s: scoring_func \"%s\" is not supported (sigmoid, softmax)",
                                CFG_WHAT, str);
        return DSMOE_OK;
    case K_TOPK_METHOD:
        if ((s = json_str(j, key, &str)) != DSMOE_OK) return s;
        if (strcmp(str, "noaux_tc") == 0) c->topk_method = DSMOE_TOPK_METHOD_NOAUX_TC;
        else if (strcmp(str, "group_limited_greedy") == 0)
            c->topk_method = DSMOE_TOPK_METHOD_GROUP_LIMITED_GREEDY;
        else if (strcmp(str, "greedy") == 0) c->topk_method = DSMOE_TOPK_METHOD_GREEDY;
        else
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "%s: topk_method \"%s\" is not supported (noaux_tc, "
                                "group_limited_greedy, greedy)", CFG_WHAT, str);
        return DSMOE_OK;
    case K_NORM_TOPK:
        if ((s = json_bool(j, key, &b)) == DSMOE_OK) c->norm_topk_prob = b;
        return s;
    case K_SCALE:
        if ((s = json_number(j, key, &d, NULL)) == DSMOE_OK) c->routed_scaling_factor = (float)d;
        return s;
    case K_EPS:
        if ((s = json_number(j, key, &d, NULL)) == DSMOE_OK) c->rms_norm_eps = (float)d;
        return s;
    case K_THETA: return json_number(j, key, &c->rope_theta, NULL);
    case K_MAXPOS: return json_int(j, key, 1, INT64_MAX / 2, &c->max_position_embeddings, NULL);
    case K_ROPE_SCALING: return cfg_rope_scaling(j, c, "rope_scaling", inner_theta);
    case K_ROPE_PARAMS: return cfg_rope_scaling(j, c, "rope_parameters", inner_theta);
    case K_TIE:
        if ((s = json_bool(j, key, &b)) == DSMOE_OK) c->tie_word_embeddings = b;
        return s;
    case K_VOCAB: return cfg_int32(j, key, 1, CFG_MAX_VOCAB, &c->vocab_size, 0);
    case K_MTP: return cfg_int32(j, key, 0, CFG_MAX_MTP, &c->num_nextn_predict_layers, 0);
    case K_ACT:
        if ((s = json_str(j, key, &str)) != DSMOE_OK) return s;
        if (strcmp(str, "silu") != 0)
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "%s: hidden_act \"%s\" is not supported (only \"silu\")",
                                CFG_WHAT, str);
        return DSMOE_OK;
    case K_ATTN_BIAS:
        if ((s = json_bool(j, key, &b)) != DSMOE_OK) return s;
        if (b)
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "%s: attention_bias true is not supported (DeepSeek attention "
                                "projections have no bias)", CFG_WHAT);
        return DSMOE_OK;
    case K_ROPE_INTERLEAVE:
        if ((s = json_bool(j, key, &b)) != DSMOE_OK) return s;
        if (!b)
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "%s: rope_interleave false is not supported (DeepSeek "
                                "checkpoints rotate adjacent pairs)", CFG_WHAT);
        return DSMOE_OK;
    case K_QUANT: return cfg_quant(j, c);
    case K_DSMOE_VOCAB:
        if (json_literal(j, "null")) {
            c->byte_vocab = 0;
            return DSMOE_OK;
        }
        if ((s = json_str(j, key, &str)) != DSMOE_OK) return s;
        if (strcmp(str, "bytes") != 0)
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "%s: dsmoe_vocab \"%s\" is not supported (only \"bytes\")",
                                CFG_WHAT, str);
        c->byte_vocab = 1;
        return DSMOE_OK;
    case K_BOS: return cfg_token_id(j, key, &c->bos_token_id);
    case K_EOS: return cfg_token_id(j, key, &c->eos_token_id);
    default: break;
    }
    return dsmoe__error(DSMOE_STATUS_INTERNAL, "config.json: unhandled key %s", key);
}

/* The defaults that DeepseekV2Config and DeepseekV3Config share (see model.h). */
static void cfg_defaults(dsmoe_model_config *c) {
    memset(c, 0, sizeof *c);
    c->moe_layer_freq = 1;
    c->first_k_dense_replace = 0;
    c->rms_norm_eps = 1e-6f;
    c->rope_theta = 10000.0;
    c->rope_type = DSMOE_ROPE_TYPE_DEFAULT;
    c->tie_word_embeddings = 0;
    c->num_nextn_predict_layers = 0;
    c->bos_token_id = c->eos_token_id = -1;
    c->scoring_func = DSMOE_SCORE_FUNC_SOFTMAX;
    c->topk_method = DSMOE_TOPK_METHOD_GREEDY;
    c->n_group = 1;
    c->topk_group = 1;
    c->routed_scaling_factor = 1.0f;
}

dsmoe_status dsmoe_model_config_from_json(const char *json, size_t len, dsmoe_model_config *cfg) {
    if (!json || !cfg)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_model_config_from_json: NULL json or cfg");
    char *arena = (char *)malloc(len + 1);
    if (!arena) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "config.json: %zu bytes", len);
    dsmoe__json j;
    dsmoe__json_init(&j, json, len, 0, CFG_WHAT, arena, len + 1);
    dsmoe_model_config c;
    cfg_defaults(&c);
    uint64_t seen = 0;
    double inner_theta = NAN;
    dsmoe_status s = dsmoe__json_begin(&j, '{', "the configuration");
    while (s == DSMOE_OK) {
        int more;
        const char *key;
        size_t klen, at;
        if ((s = dsmoe__json_next_member(&j, &more, &key, &klen, &at)) != DSMOE_OK || !more) break;
        int k = -1;
        for (int i = 0; i < K_COUNT_; i++)
            if (strcmp(key, cfg_key_names[i]) == 0) k = i;
        if (k < 0) {
            s = dsmoe__model_json_skip(&j, key); /* a key that does not change the math */
            continue;
        }
        if (seen & ((uint64_t)1 << k)) {
            s = dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "%s: %s is given twice (byte %zu)",
                             CFG_WHAT, key, at);
            break;
        }
        seen |= (uint64_t)1 << k;
        s = cfg_member(&j, (cfg_key)k, &c, &inner_theta);
    }
    if (s == DSMOE_OK) s = dsmoe__json_finish(&j);
    if (s == DSMOE_OK && (seen & ((uint64_t)1 << K_ROPE_SCALING)) &&
        (seen & ((uint64_t)1 << K_ROPE_PARAMS)))
        s = dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                         "%s: rope_parameters and rope_scaling are both given; keep one",
                         CFG_WHAT);
    free(arena);
    if (s != DSMOE_OK) return s;
    if (!isnan(inner_theta)) {
        if ((seen & ((uint64_t)1 << K_THETA)) && c.rope_theta != inner_theta)
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "%s: rope_parameters.rope_theta (%.17g) differs from rope_theta "
                                "(%.17g)", CFG_WHAT, inner_theta, c.rope_theta);
        c.rope_theta = inner_theta;
    }

    /* Required keys (their V2 and V3 defaults differ, or they are sizes). */
    static const cfg_key always[] = {K_HIDDEN, K_INTER, K_LAYERS, K_HEADS, K_Q_LORA, K_KV_LORA,
                                     K_NOPE, K_ROPE, K_V, K_E, K_VOCAB, K_MAXPOS};
    for (size_t i = 0; i < sizeof always / sizeof always[0]; i++)
        if (!(seen & ((uint64_t)1 << always[i]))) return cfg_missing(cfg_key_names[always[i]], "");
    if (c.n_routed_experts > 0) {
        static const cfg_key moe_keys[] = {K_MOE_INTER, K_SHARED, K_TOPK, K_SCORING, K_TOPK_METHOD,
                                           K_NORM_TOPK, K_SCALE};
        for (size_t i = 0; i < sizeof moe_keys / sizeof moe_keys[0]; i++)
            if (!(seen & ((uint64_t)1 << moe_keys[i])))
                return cfg_missing(cfg_key_names[moe_keys[i]], " (required with n_routed_experts)");
        if (c.topk_method != DSMOE_TOPK_METHOD_GREEDY) {
            if (!(seen & ((uint64_t)1 << K_GROUP)))
                return cfg_missing("n_group", " (required by this topk_method)");
            if (!(seen & ((uint64_t)1 << K_TOPK_GROUP)))
                return cfg_missing("topk_group", " (required by this topk_method)");
        }
    }
    if ((s = dsmoe_model_config_validate(&c)) != DSMOE_OK) return s;
    *cfg = c;
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_config_from_dir(const char *dir, dsmoe_model_config *cfg) {
    if (!dir || !cfg)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_config_from_dir: NULL argument");
    size_t n = strlen(dir);
    char *path = (char *)malloc(n + 16);
    if (!path) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "config path");
    snprintf(path, n + 16, "%s/config.json", dir);
    FILE *f = fopen(path, "rb");
    if (!f) {
        dsmoe_status s = dsmoe__error(DSMOE_STATUS_IO, "%s: %s", path, strerror(errno));
        free(path);
        return s;
    }
    const size_t cap = (size_t)16 << 20;
    char *buf = (char *)malloc(cap + 1);
    size_t len = buf ? fread(buf, 1, cap + 1, f) : 0;
    int rerr = ferror(f);
    fclose(f);
    dsmoe_status s;
    if (!buf) s = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: buffer", path);
    else if (rerr) s = dsmoe__error(DSMOE_STATUS_IO, "%s: read error", path);
    else if (len > cap) s = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: larger than 16 MiB", path);
    else if ((s = dsmoe_model_config_from_json(buf, len, cfg)) != DSMOE_OK) {
        char msg[768];
        snprintf(msg, sizeof msg, "%s", dsmoe_last_error());
        /* Messages start with "config.json"; give the full path instead. */
        const char *rest = strncmp(msg, CFG_WHAT, strlen(CFG_WHAT)) == 0 ? msg + strlen(CFG_WHAT) : msg;
        s = dsmoe__error(s, "%s%s%s", path, rest == msg ? ": " : "", rest);
    }
    free(buf);
    free(path);
    return s;
}

/* ============================================================ validation == */

static dsmoe_status bad(const char *fmt, ...) DSMOE__PRINTF(1, 2);
static dsmoe_status bad(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "%s: %s", CFG_WHAT, msg);
}

static int in_range(int64_t v, int64_t lo, int64_t hi) { return v >= lo && v <= hi; }

dsmoe_status dsmoe_model_config_validate(const dsmoe_model_config *c) {
    if (!c) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_config_validate: NULL");
    struct {
        const char *key;
        int64_t v, lo, hi;
    } ints[] = {
        {"hidden_size", c->hidden_size, 1, CFG_MAX_DIM},
        {"intermediate_size", c->intermediate_size, 1, CFG_MAX_DIM},
        {"num_hidden_layers", c->num_hidden_layers, 1, CFG_MAX_LAYERS},
        {"first_k_dense_replace", c->first_k_dense_replace, 0, c->num_hidden_layers},
        {"moe_layer_freq", c->moe_layer_freq, 1, CFG_MAX_LAYERS},
        {"num_attention_heads", c->num_attention_heads, 1, CFG_MAX_HEADS},
        {"q_lora_rank", c->q_lora_rank, 0, CFG_MAX_DIM},
        {"kv_lora_rank", c->kv_lora_rank, 1, CFG_MAX_DIM},
        {"qk_nope_head_dim", c->qk_nope_head_dim, 1, CFG_MAX_DIM},
        {"qk_rope_head_dim", c->qk_rope_head_dim, 2, CFG_MAX_DIM},
        {"v_head_dim", c->v_head_dim, 1, CFG_MAX_DIM},
        {"n_routed_experts", c->n_routed_experts, 0, DSMOE_MAX_EXPERTS},
        {"vocab_size", c->vocab_size, 1, CFG_MAX_VOCAB},
        {"max_position_embeddings", c->max_position_embeddings, 1, INT64_MAX / 2},
        {"num_nextn_predict_layers", c->num_nextn_predict_layers, 0, CFG_MAX_MTP},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (!in_range(ints[i].v, ints[i].lo, ints[i].hi))
            return bad("%s must be in %lld..%lld, found %lld", ints[i].key, (long long)ints[i].lo,
                       (long long)ints[i].hi, (long long)ints[i].v);
    if (c->qk_rope_head_dim % 2)
        return bad("qk_rope_head_dim must be even (RoPE rotates pairs), found %d",
                   (int)c->qk_rope_head_dim);
    if (!(c->rms_norm_eps > 0.0f && isfinite(c->rms_norm_eps)))
        return bad("rms_norm_eps must be finite and > 0, found %g", (double)c->rms_norm_eps);
    if (!(c->rope_theta > 1.0 && isfinite(c->rope_theta)))
        return bad("rope_theta must be finite and > 1, found %g", c->rope_theta);
    if (c->tie_word_embeddings != 0 && c->tie_word_embeddings != 1)
        return bad("tie_word_embeddings must be 0 or 1");
    if (c->n_routed_experts > 0) {
        const int64_t E = c->n_routed_experts;
        if (!in_range(c->moe_intermediate_size, 1, CFG_MAX_DIM))
            return bad("moe_intermediate_size must be in 1..%d, found %d", CFG_MAX_DIM,
                       (int)c->moe_intermediate_size);
        if (!in_range(c->n_shared_experts, 0, 1024))
            return bad("n_shared_experts must be in 0..1024, found %d", (int)c->n_shared_experts);
        if (!in_range(c->num_experts_per_tok, 1, E))
            return bad("num_experts_per_tok must be in 1..n_routed_experts (%lld), found %d",
                       (long long)E, (int)c->num_experts_per_tok);
        if (c->num_experts_per_tok > 256)
            return bad("num_experts_per_tok must be <= 256, found %d", (int)c->num_experts_per_tok);
        if (c->scoring_func != DSMOE_SCORE_FUNC_SIGMOID && c->scoring_func != DSMOE_SCORE_FUNC_SOFTMAX)
            return bad("scoring_func is not one of sigmoid, softmax");
        if (c->topk_method != DSMOE_TOPK_METHOD_NOAUX_TC &&
            c->topk_method != DSMOE_TOPK_METHOD_GROUP_LIMITED_GREEDY &&
            c->topk_method != DSMOE_TOPK_METHOD_GREEDY)
            return bad("topk_method is not one of noaux_tc, group_limited_greedy, greedy");
        if (c->norm_topk_prob != 0 && c->norm_topk_prob != 1)
            return bad("norm_topk_prob must be 0 or 1");
        if (!(c->routed_scaling_factor > 0.0f && isfinite(c->routed_scaling_factor)))
            return bad("routed_scaling_factor must be finite and > 0, found %g",
                       (double)c->routed_scaling_factor);
        if (c->topk_method != DSMOE_TOPK_METHOD_GREEDY) {
            if (!in_range(c->n_group, 1, E) || E % c->n_group)
                return bad("n_group (%d) must divide n_routed_experts (%lld)", (int)c->n_group,
                           (long long)E);
            if (!in_range(c->topk_group, 1, c->n_group))
                return bad("topk_group must be in 1..n_group (%d), found %d", (int)c->n_group,
                           (int)c->topk_group);
            const int64_t per = E / c->n_group;
            if (c->num_experts_per_tok > c->topk_group * per)
                return bad("num_experts_per_tok (%d) exceeds the experts of topk_group groups "
                           "(%d x %lld)", (int)c->num_experts_per_tok, (int)c->topk_group,
                           (long long)per);
            if (c->topk_method == DSMOE_TOPK_METHOD_NOAUX_TC && c->n_group > 1 && per < 2)
                return bad("n_group (%d) leaves groups of one expert; noaux_tc ranks groups by "
                           "their two best experts", (int)c->n_group);
        }
        if (c->topk_method != DSMOE_TOPK_METHOD_NOAUX_TC && c->norm_topk_prob &&
            c->routed_scaling_factor != 1.0f)
            return bad("routed_scaling_factor %g with norm_topk_prob true under a DeepSeek-V2 "
                       "topk_method: V2 code scales only unnormalised weights, V3 code always; "
                       "set one of them to make the file unambiguous",
                       (double)c->routed_scaling_factor);
    }
    if (c->rope_type == DSMOE_ROPE_TYPE_YARN) {
        if (!(c->rope_factor >= 1.0 && isfinite(c->rope_factor)))
            return bad("rope_scaling.factor must be finite and >= 1, found %g", c->rope_factor);
        if (c->rope_original_max_position_embeddings < 1)
            return bad("rope_scaling.original_max_position_embeddings must be >= 1, found %lld",
                       (long long)c->rope_original_max_position_embeddings);
        if (!(c->rope_beta_fast > 0 && isfinite(c->rope_beta_fast)))
            return bad("rope_scaling.beta_fast must be finite and > 0, found %g", c->rope_beta_fast);
        if (!(c->rope_beta_slow > 0 && isfinite(c->rope_beta_slow)))
            return bad("rope_scaling.beta_slow must be finite and > 0, found %g", c->rope_beta_slow);
        if (!isfinite(c->rope_mscale_all_dim))
            return bad("rope_scaling.mscale_all_dim must be finite");
        if (!(c->rope_mscale == c->rope_mscale_all_dim))
            return bad("rope_scaling.mscale (%g) differs from rope_scaling.mscale_all_dim (%g): "
                       "the official and Hugging Face code disagree on such files",
                       c->rope_mscale, c->rope_mscale_all_dim);
    } else if (c->rope_type != DSMOE_ROPE_TYPE_DEFAULT) {
        return bad("rope_scaling type is not one of default, yarn");
    }
    if (c->byte_vocab != 0 && c->byte_vocab != 1)
        return bad("dsmoe_vocab: byte_vocab must be 0 or 1, found %d", (int)c->byte_vocab);
    if (c->byte_vocab && c->vocab_size < 256)
        return bad("dsmoe_vocab \"bytes\" needs vocab_size >= 256 (ids 0..255 are the bytes), "
                   "found %d", (int)c->vocab_size);
    const struct {
        const char *key;
        int32_t id;
    } specials[2] = {{"bos_token_id", c->bos_token_id}, {"eos_token_id", c->eos_token_id}};
    for (int i = 0; i < 2; i++) {
        if (!in_range(specials[i].id, -1, (int64_t)c->vocab_size - 1))
            return bad("%s must be in 0..vocab_size - 1 (%d) or null, found %d", specials[i].key,
                       (int)c->vocab_size - 1, (int)specials[i].id);
        if (c->byte_vocab && specials[i].id >= 0 && specials[i].id < 256)
            return bad("%s %d is a byte under dsmoe_vocab \"bytes\": special tokens must be "
                       ">= 256", specials[i].key, (int)specials[i].id);
    }
    if ((c->fp8_block_rows == 0) != (c->fp8_block_cols == 0) ||
        !in_range(c->fp8_block_rows, 0, CFG_MAX_DIM) || !in_range(c->fp8_block_cols, 0, CFG_MAX_DIM))
        return bad("quantization_config.weight_block_size must be two sizes >= 1");
    if (c->n_routed_experts > 0) {
        dsmoe_moe_config m;
        dsmoe_status s = dsmoe_model_moe_config(c, &m);
        if (s != DSMOE_OK) return s;
    }
    return DSMOE_OK;
}

/* ============================================================ derived configs == */

int dsmoe_model_layer_is_moe(const dsmoe_model_config *c, int32_t l) {
    if (!c || c->n_routed_experts <= 0 || l < 0 || c->moe_layer_freq < 1) return 0;
    if (l >= c->num_hidden_layers + c->num_nextn_predict_layers) return 0;
    return l >= c->first_k_dense_replace && l % c->moe_layer_freq == 0;
}

dsmoe_status dsmoe_model_router_config(const dsmoe_model_config *c, dsmoe_router_config *out) {
    if (!c || !out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_router_config: NULL");
    if (c->n_routed_experts <= 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "%s: n_routed_experts is null: the model has no MoE layers", CFG_WHAT);
    dsmoe_router_config r;
    dsmoe_status s = dsmoe_router_preset("deepseek-v3", &r);
    if (s != DSMOE_OK) return s;
    int greedy = c->topk_method == DSMOE_TOPK_METHOD_GREEDY;
    r.n_experts = c->n_routed_experts;
    r.n_groups = greedy ? 1 : c->n_group;
    r.topk_groups = greedy ? 1 : c->topk_group;
    r.top_k = c->num_experts_per_tok;
    r.score_func = c->scoring_func;
    r.group_score = c->topk_method == DSMOE_TOPK_METHOD_NOAUX_TC ? DSMOE_GROUP_SCORE_TOPSUM
                                                                 : DSMOE_GROUP_SCORE_MAX;
    /* m of the top-m group score (unused by MAX; 1 there, as in the router presets). */
    r.group_topm = r.group_score == DSMOE_GROUP_SCORE_TOPSUM ? 2 : 1;
    if (r.group_topm > r.n_experts / r.n_groups) r.group_topm = r.n_experts / r.n_groups;
    r.group_mask = DSMOE_GROUP_MASK_EXCLUDE;
    r.normalize = c->norm_topk_prob;
    r.norm_eps = 0.0f;
    r.scale = c->routed_scaling_factor;
    r.use_bias = c->topk_method == DSMOE_TOPK_METHOD_NOAUX_TC;
    r.precision = DSMOE_PRECISION_FP32;
    r.nonfinite = DSMOE_NONFINITE_ERROR;
    if ((s = dsmoe_router_config_validate(&r)) != DSMOE_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", dsmoe_last_error());
        return dsmoe__error(s, "%s: the router of n_routed_experts, n_group, topk_group, "
                               "num_experts_per_tok: %s", CFG_WHAT, msg);
    }
    *out = r;
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_moe_config(const dsmoe_model_config *c, dsmoe_moe_config *out) {
    if (!c || !out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_moe_config: NULL");
    dsmoe_moe_config m;
    dsmoe_moe_config_default(&m);
    dsmoe_status s = dsmoe_model_router_config(c, &m.router);
    if (s != DSMOE_OK) return s;
    m.hidden_size = c->hidden_size;
    m.expert_size = c->moe_intermediate_size;
    m.n_shared = c->n_shared_experts;
    if ((s = dsmoe_moe_config_validate(&m)) != DSMOE_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", dsmoe_last_error());
        return dsmoe__error(s, "%s: the MoE layer of hidden_size, moe_intermediate_size, "
                               "n_shared_experts: %s", CFG_WHAT, msg);
    }
    *out = m;
    return DSMOE_OK;
}
