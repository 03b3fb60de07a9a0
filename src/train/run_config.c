/*
 * run_config.c — a training run's configuration: the presets' run configs, the routing
 * strategies, validation, and the numeric fields under stable names (for the checkpoint
 * and for comparing a resumed run's config with the saved one).
 */
#include "train/run_internal.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------- defaults -- */

dsmoe_status dsmoe_run_config_default(const char *preset, dsmoe_run_config *rc) {
    if (!preset || !rc) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "run config: NULL argument");
    dsmoe_run_config c;
    memset(&c, 0, sizeof c);
    if (dsmoe_model_config_preset(preset, &c.model) != DSMOE_OK)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: unknown preset '%s' (tiny, small, default)", preset);
    dsmoe_train_model_options_default(&c.train);
    dsmoe_adamw_config_default(&c.adamw);
    dsmoe_balancer_config_default(c.model.n_routed_experts, &c.balancer);
    dsmoe_corpus_config_default(&c.corpus);
    snprintf(c.preset, sizeof c.preset, "%s", preset);
    c.seed = 1;
    c.log_every = 1;
    if (strcmp(preset, "tiny") == 0) { /* unit tests: a second or two */
        c.train.batch = 4, c.train.seq_len = 32;
        c.steps = 200, c.adamw.warmup_steps = 20, c.adamw.lr = 1e-2f;
        c.corpus.tokens = 200000;
        c.eval_every = 100, c.eval_tokens = 4096, c.save_every = 100;
    } else if (strcmp(preset, "small") == 0) { /* about a minute */
        c.train.batch = 8, c.train.seq_len = 128;
        c.steps = 300, c.adamw.warmup_steps = 30, c.adamw.lr = 3e-3f;
        c.corpus.tokens = 1000000;
        c.eval_every = 100, c.eval_tokens = 16384, c.save_every = 100;
    } else { /* default: about five minutes on two cores */
        c.train.batch = 8, c.train.seq_len = 128;
        c.steps = 400, c.adamw.warmup_steps = 40, c.adamw.lr = 3e-3f;
        c.corpus.tokens = 2000000;
        c.eval_every = 100, c.eval_tokens = 16384, c.save_every = 100;
    }
    c.adamw.total_steps = c.steps;
    dsmoe_status st = dsmoe_run_strategy_apply("v3", &c);
    if (st != DSMOE_OK) return st;
    *rc = c;
    return DSMOE_OK;
}

/* ------------------------------------------------------------ strategies -- */

static const char *const strategy_names[] = {"v3",       "v3-no-balance", "v3-proportional",
                                             "v3-no-norm", "aux-loss",    "v2",
                                             "softmax-norm"};
enum { N_STRATEGIES = (int)(sizeof strategy_names / sizeof strategy_names[0]) };

const char *dsmoe_run_strategy_name(int i) {
    return i >= 0 && i < N_STRATEGIES ? strategy_names[i] : NULL;
}

dsmoe_status dsmoe_run_strategy_apply(const char *name, dsmoe_run_config *rc) {
    if (!name || !rc) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "run strategy: NULL argument");
    int s = -1;
    for (int i = 0; i < N_STRATEGIES; i++)
        if (strcmp(name, strategy_names[i]) == 0) s = i;
    if (s < 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "strategy: unknown name '%s' (v3, v3-no-balance, v3-proportional, "
                            "v3-no-norm, aux-loss, v2, softmax-norm)",
                            name);
    dsmoe_model_config *m = &rc->model;
    const int v2 = s == 5 || s == 6;
    m->scoring_func = v2 ? DSMOE_SCORE_FUNC_SOFTMAX : DSMOE_SCORE_FUNC_SIGMOID;
    m->topk_method = v2 ? DSMOE_TOPK_METHOD_GROUP_LIMITED_GREEDY : DSMOE_TOPK_METHOD_NOAUX_TC;
    m->norm_topk_prob = s == 3 || s == 5 ? 0 : 1;
    dsmoe_balancer_config_default(m->n_routed_experts, &rc->balancer);
    rc->balancer.gamma = s <= 3 && s != 1 ? 1e-3f : 0.0f;
    rc->balancer.rule = s == 2 ? DSMOE_BALANCE_RULE_PROPORTIONAL : DSMOE_BALANCE_RULE_SIGN;
    if (s == 4) {
        rc->train.balance_kind = DSMOE_BALANCE_LOSS_EXPERT, rc->train.balance_alpha = 1e-3f;
    } else if (v2) {
        rc->train.balance_kind = DSMOE_BALANCE_LOSS_EXPERT, rc->train.balance_alpha = 3e-3f;
    } else {
        rc->train.balance_kind = DSMOE_BALANCE_LOSS_SEQ;
        rc->train.balance_alpha = s == 1 ? 0.0f : 1e-4f;
    }
    snprintf(rc->strategy, sizeof rc->strategy, "%s", name);
    return DSMOE_OK;
}

/* ------------------------------------------------------------ validation -- */

dsmoe_status dsmoe_run_config_validate(const dsmoe_run_config *rc) {
    if (!rc) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "run config: NULL");
    dsmoe_status st = dsmoe_model_config_validate(&rc->model);
    if (st != DSMOE_OK) return st;
    const dsmoe_model_config *m = &rc->model;
    const dsmoe_train_model_options *t = &rc->train;
    if (!m->byte_vocab || m->vocab_size < DSMOE_BYTE_VOCAB_SIZE)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: vocab_size = %d: training runs use the byte vocabulary "
                            "(dsmoe_vocab bytes, vocab_size >= %d)",
                            (int)m->vocab_size, DSMOE_BYTE_VOCAB_SIZE);
    if (t->batch < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "run config: batch = %d: must be >= 1",
                            (int)t->batch);
    if (t->seq_len < 1 || t->seq_len > m->max_position_embeddings)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: seq_len = %d: must be 1 .. max_position_embeddings (%lld)",
                            (int)t->seq_len, (long long)m->max_position_embeddings);
    if (!(t->init_std > 0) || !isfinite(t->init_std))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: init_std = %g: must be finite and > 0", (double)t->init_std);
    if (!(t->balance_alpha >= 0) || !isfinite(t->balance_alpha))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: alpha = %g: must be finite and >= 0",
                            (double)t->balance_alpha);
    if (!(t->mtp_lambda >= 0) || !isfinite(t->mtp_lambda))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: mtp_lambda = %g: must be finite and >= 0",
                            (double)t->mtp_lambda);
    if (t->mtp_depths < -1 || t->mtp_depths > m->num_nextn_predict_layers)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: mtp_depths = %d: must be -1 (all) .. "
                            "num_nextn_predict_layers (%d)",
                            (int)t->mtp_depths, (int)m->num_nextn_predict_layers);
    if (t->balance_kind != DSMOE_BALANCE_LOSS_SEQ && t->balance_kind != DSMOE_BALANCE_LOSS_EXPERT &&
        t->balance_kind != DSMOE_BALANCE_LOSS_SWITCH && t->balance_kind != DSMOE_BALANCE_LOSS_ZLOSS)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: balance_kind = %d: must be seq, expert, switch or zloss",
                            (int)t->balance_kind);
    if (rc->steps < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "run config: steps = %lld: must be >= 1",
                            (long long)rc->steps);
    dsmoe_adamw_config a = rc->adamw;
    a.total_steps = rc->steps;
    if ((st = dsmoe_adamw_config_validate(&a)) != DSMOE_OK) return st;
    if (m->n_routed_experts > 0) {
        dsmoe_balancer_config b = rc->balancer;
        b.n_experts = m->n_routed_experts;
        if ((st = dsmoe_balancer_config_validate(&b)) != DSMOE_OK) return st;
    }
    const dsmoe_corpus_config *c = &rc->corpus;
    if (rc->n_data_files < 0 || (rc->n_data_files > 0 && !rc->data_files))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: n_data_files = %d without data_files",
                            (int)rc->n_data_files);
    for (int32_t i = 0; i < rc->n_data_files; i++)
        if (!rc->data_files[i] || !rc->data_files[i][0])
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "run config: data file %d is NULL or empty", (int)i);
    if (rc->n_data_files == 0 && (c->tokens < 1024 || c->tokens > ((int64_t)1 << 31)))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: corpus tokens = %lld: must be 1024 .. 2^31",
                            (long long)c->tokens);
    if (c->tokens < 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "run config: corpus tokens = %lld: must be >= 0",
                            (long long)c->tokens);
    if (!(c->valid_fraction >= 0 && c->valid_fraction <= 0.5))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: valid_fraction = %g: must be in [0, 0.5]",
                            c->valid_fraction);
    if (c->domains >> 5)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: domains = %#x: only bits 0 .. 4 are built-in domains",
                            (unsigned)c->domains);
    if (rc->eval_every < 0 || rc->eval_tokens < 0 || rc->save_every < 0 || rc->log_every < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run config: eval_every, eval_tokens, save_every must be >= 0 and "
                            "log_every >= 1 (found %lld, %lld, %lld, %lld)",
                            (long long)rc->eval_every, (long long)rc->eval_tokens,
                            (long long)rc->save_every, (long long)rc->log_every);
    if (memchr(rc->strategy, 0, sizeof rc->strategy) == NULL ||
        memchr(rc->preset, 0, sizeof rc->preset) == NULL)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "run config: strategy or preset is not terminated");
    return DSMOE_OK;
}

/* --------------------------------------------------------- named fields -- */

typedef struct field {
    const char *name;
    size_t off;
    char type; /* i int32 / enum, I int64, u uint64, f float, d double */
} field;

#define F(name, member, type) {name, offsetof(dsmoe_run_config, member), type}
static const field int_fields[DSMOE__RUN_INT_FIELDS] = {
    F("batch", train.batch, 'i'),
    F("seq_len", train.seq_len, 'i'),
    F("init_seed", train.seed, 'u'),
    F("mtp_depths", train.mtp_depths, 'i'),
    F("balance_kind", train.balance_kind, 'i'),
    F("warmup_steps", adamw.warmup_steps, 'I'),
    F("total_steps", adamw.total_steps, 'I'),
    F("balancer_experts", balancer.n_experts, 'i'),
    F("bias_rule", balancer.rule, 'e'),
    F("gamma_until_tokens", balancer.gamma_until_tokens, 'I'),
    F("recenter", balancer.recenter, 'i'),
    F("corpus_seed", corpus.seed, 'u'),
    F("corpus_tokens", corpus.tokens, 'I'),
    F("domains", corpus.domains, 'w'),
    F("steps", steps, 'I'),
    F("seed", seed, 'u'),
    F("eval_every", eval_every, 'I'),
    F("eval_tokens", eval_tokens, 'I'),
    F("save_every", save_every, 'I'),
    F("log_every", log_every, 'I'),
    F("n_data_files", n_data_files, 'i'),
};
static const field float_fields[DSMOE__RUN_FLOAT_FIELDS] = {
    F("init_std", train.init_std, 'f'),
    F("alpha", train.balance_alpha, 'f'),
    F("mtp_lambda", train.mtp_lambda, 'f'),
    F("lr", adamw.lr, 'f'),
    F("beta1", adamw.beta1, 'f'),
    F("beta2", adamw.beta2, 'f'),
    F("eps", adamw.eps, 'f'),
    F("weight_decay", adamw.weight_decay, 'f'),
    F("clip", adamw.clip_norm, 'f'),
    F("min_lr_ratio", adamw.min_lr_ratio, 'f'),
    F("gamma", balancer.gamma, 'f'),
    F("gamma_after", balancer.gamma_after, 'f'),
    F("valid_fraction", corpus.valid_fraction, 'd'),
};
#undef F

const char *dsmoe__run_field_name(int is_float, int i) {
    if (is_float) return i >= 0 && i < DSMOE__RUN_FLOAT_FIELDS ? float_fields[i].name : NULL;
    return i >= 0 && i < DSMOE__RUN_INT_FIELDS ? int_fields[i].name : NULL;
}

void dsmoe__run_config_pack(const dsmoe_run_config *rc, int64_t *ints, double *flts) {
    const char *base = (const char *)rc;
    for (int i = 0; i < DSMOE__RUN_INT_FIELDS; i++) {
        const field *f = &int_fields[i];
        int32_t i32;
        int64_t i64;
        uint32_t u32;
        dsmoe_balance_rule e;
        switch (f->type) {
        case 'i': memcpy(&i32, base + f->off, sizeof i32); ints[i] = i32; break;
        case 'w': memcpy(&u32, base + f->off, sizeof u32); ints[i] = (int64_t)u32; break;
        case 'e': memcpy(&e, base + f->off, sizeof e); ints[i] = (int64_t)e; break;
        default: memcpy(&i64, base + f->off, sizeof i64); ints[i] = i64; break; /* I, u */
        }
    }
    for (int i = 0; i < DSMOE__RUN_FLOAT_FIELDS; i++) {
        const field *f = &float_fields[i];
        if (f->type == 'f') {
            float x;
            memcpy(&x, base + f->off, sizeof x);
            flts[i] = (double)x;
        } else {
            memcpy(&flts[i], base + f->off, sizeof(double));
        }
    }
}

void dsmoe__run_config_unpack(dsmoe_run_config *rc, const int64_t *ints, const double *flts) {
    char *base = (char *)rc;
    for (int i = 0; i < DSMOE__RUN_INT_FIELDS; i++) {
        const field *f = &int_fields[i];
        int32_t i32 = (int32_t)ints[i];
        uint32_t u32 = (uint32_t)ints[i];
        dsmoe_balance_rule e = (dsmoe_balance_rule)ints[i];
        switch (f->type) {
        case 'i': memcpy(base + f->off, &i32, sizeof i32); break;
        case 'w': memcpy(base + f->off, &u32, sizeof u32); break;
        case 'e': memcpy(base + f->off, &e, sizeof e); break;
        default: memcpy(base + f->off, &ints[i], sizeof(int64_t)); break;
        }
    }
    for (int i = 0; i < DSMOE__RUN_FLOAT_FIELDS; i++) {
        const field *f = &float_fields[i];
        if (f->type == 'f') {
            float x = (float)flts[i];
            memcpy(base + f->off, &x, sizeof x);
        } else {
            memcpy(base + f->off, &flts[i], sizeof(double));
        }
    }
}

static int str_eq(const char *a, const char *b) {
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

dsmoe_status dsmoe__run_config_compare(const dsmoe_run_config *a, const dsmoe_run_config *b) {
    char ja[4096], jb[4096];
    if (dsmoe_model_config_to_json(&a->model, ja, sizeof ja) < 0 ||
        dsmoe_model_config_to_json(&b->model, jb, sizeof jb) < 0 || strcmp(ja, jb) != 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "the model config differs from the saved run's");
    int64_t ia[DSMOE__RUN_INT_FIELDS], ib[DSMOE__RUN_INT_FIELDS];
    double fa[DSMOE__RUN_FLOAT_FIELDS], fb[DSMOE__RUN_FLOAT_FIELDS];
    dsmoe__run_config_pack(a, ia, fa);
    dsmoe__run_config_pack(b, ib, fb);
    for (int i = 0; i < DSMOE__RUN_INT_FIELDS; i++)
        if (ia[i] != ib[i])
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "%s = %lld differs from the saved run's %lld", int_fields[i].name,
                                (long long)ia[i], (long long)ib[i]);
    for (int i = 0; i < DSMOE__RUN_FLOAT_FIELDS; i++)
        if (fa[i] != fb[i])
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "%s = %.9g differs from the saved run's %.9g", float_fields[i].name,
                                fa[i], fb[i]);
    if (strcmp(a->strategy, b->strategy) != 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "strategy '%s' differs from the saved run's '%s'",
                            a->strategy, b->strategy);
    if (strcmp(a->preset, b->preset) != 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "preset '%s' differs from the saved run's '%s'",
                            a->preset, b->preset);
    if (!str_eq(a->corpus.fortunes_dir, b->corpus.fortunes_dir))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "fortunes_dir differs from the saved run's");
    for (int32_t i = 0; i < a->n_data_files; i++)
        if (!str_eq(a->data_files[i], b->data_files[i]))
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "data file %d '%s' differs from the saved run's '%s'", (int)i,
                                a->data_files[i], b->data_files[i]);
    return DSMOE_OK;
}

dsmoe_status dsmoe__run_config_own(dsmoe__run_config_store *s, const dsmoe_run_config *rc) {
    size_t need = sizeof(char *) * (size_t)(rc->n_data_files + 1);
    if (rc->corpus.fortunes_dir) need += strlen(rc->corpus.fortunes_dir) + 1;
    for (int32_t i = 0; i < rc->n_data_files; i++) need += strlen(rc->data_files[i]) + 1;
    char *block = (char *)malloc(need);
    if (!block) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "run config: out of memory");
    const char **files = (const char **)(void *)block;
    char *p = block + sizeof(char *) * (size_t)(rc->n_data_files + 1);
    s->rc = *rc;
    for (int32_t i = 0; i < rc->n_data_files; i++) {
        size_t n = strlen(rc->data_files[i]) + 1;
        memcpy(p, rc->data_files[i], n);
        files[i] = p;
        p += n;
    }
    files[rc->n_data_files] = NULL;
    if (rc->corpus.fortunes_dir) {
        size_t n = strlen(rc->corpus.fortunes_dir) + 1;
        memcpy(p, rc->corpus.fortunes_dir, n);
        s->rc.corpus.fortunes_dir = p;
    }
    s->rc.data_files = rc->n_data_files > 0 ? files : NULL;
    s->block = block;
    return DSMOE_OK;
}
