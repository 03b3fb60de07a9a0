/*
 * balance.c — the auxiliary-loss-free bias controller (dsmoe_balancer) and bias
 * storage checks.
 *
 * Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
 * Mixture-of-Experts" (arXiv 2408.15664), and DeepSeek-V3 report §2.1.2: after each
 * training step, with c_i the tokens routed to expert i over the global batch and
 * c̄ = Σ c_i / E,
 *     b_i ← b_i + γ · sign(c̄ − c_i)         (sign rule, V3; sign(0) = 0)
 *     b_i ← b_i + γ · (c̄ − c_i) / c̄         (proportional rule, P-LFB Table 3)
 * The update is computed in double and added to the fp32 bias with one rounding.
 * The bias only ever enters the selection score c = s + b (router.c).
 */
#include "core/internal.h"
#include "dsmoe/balance.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Indices into the state vector (also the "balancer.state" tensor). */
enum {
    ST_FORMAT = 0,
    ST_EXPERTS,
    ST_RULE,
    ST_RECENTER,
    ST_GAMMA_UNTIL,
    ST_STEPS,
    ST_TOKENS,
    ST_PENDING_TOKENS,
    ST_COUNT_
};
enum { RT_GAMMA = 0, RT_GAMMA_AFTER, RT_LAST_GAMMA, RT_COUNT_ };
#define BALANCER_FORMAT 1

struct dsmoe_balancer {
    dsmoe_balancer_config cfg;
    int64_t state[ST_COUNT_]; /* serialised as is */
    float rates[RT_COUNT_];   /* serialised as is */
    float *bias;              /* (E) */
    int64_t *counts;          /* (3, E): pending, last, total */
    int64_t *reduce;          /* (E + 1) all-reduce buffer: counts, tokens */
    double *delta;            /* (E) update scratch */
    dsmoe_allreduce_fn allreduce;
    void *allreduce_user;
};


void dsmoe_balancer_config_default(int32_t n_experts, dsmoe_balancer_config *cfg) {
    if (!cfg) return;
    memset(cfg, 0, sizeof *cfg);
    cfg->n_experts = n_experts;
    cfg->rule = DSMOE_BALANCE_RULE_SIGN;
    cfg->gamma = 0.001f;
    cfg->gamma_until_tokens = 0;
    cfg->gamma_after = 0.0f;
    cfg->recenter = 0;
}

dsmoe_status dsmoe_balancer_config_validate(const dsmoe_balancer_config *cfg) {
    if (!cfg) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balancer config is NULL");
    if (cfg->n_experts < 1 || cfg->n_experts > DSMOE_MAX_EXPERTS)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "balancer n_experts = %d: must be 1..%d", (int)cfg->n_experts,
                            DSMOE_MAX_EXPERTS);
    if (cfg->rule != DSMOE_BALANCE_RULE_SIGN && cfg->rule != DSMOE_BALANCE_RULE_PROPORTIONAL)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "balancer rule = %d: must be SIGN (0) or PROPORTIONAL (1)",
                            (int)cfg->rule);
    if (!isfinite(cfg->gamma) || cfg->gamma < 0.0f)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "balancer gamma = %g: must be finite and >= 0", (double)cfg->gamma);
    if (!isfinite(cfg->gamma_after) || cfg->gamma_after < 0.0f)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "balancer gamma_after = %g: must be finite and >= 0",
                            (double)cfg->gamma_after);
    if (cfg->gamma_until_tokens < 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "balancer gamma_until_tokens = %lld: must be >= 0 (0: no schedule)",
                            (long long)cfg->gamma_until_tokens);
    if (cfg->recenter != 0 && cfg->recenter != 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "balancer recenter = %d: must be 0 or 1",
                            (int)cfg->recenter);
    return DSMOE_OK;
}

dsmoe_status dsmoe_balancer_create(const dsmoe_balancer_config *cfg, dsmoe_balancer **out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balancer output pointer is NULL");
    *out = NULL;
    dsmoe_status st = dsmoe_balancer_config_validate(cfg);
    if (st != DSMOE_OK) return st;
    size_t E = (size_t)cfg->n_experts;
    dsmoe_balancer *b = (dsmoe_balancer *)calloc(1, sizeof *b);
    if (b) {
        b->bias = (float *)calloc(E, sizeof(float));
        b->counts = (int64_t *)calloc(3 * E, sizeof(int64_t));
        b->reduce = (int64_t *)calloc(E + 1, sizeof(int64_t));
        b->delta = (double *)calloc(E, sizeof(double));
    }
    if (!b || !b->bias || !b->counts || !b->reduce || !b->delta) {
        dsmoe_balancer_free(b);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "balancer: cannot allocate state for %zu experts",
                            E);
    }
    b->cfg = *cfg;
    b->state[ST_FORMAT] = BALANCER_FORMAT;
    b->state[ST_EXPERTS] = cfg->n_experts;
    b->state[ST_RULE] = cfg->rule;
    b->state[ST_RECENTER] = cfg->recenter;
    b->state[ST_GAMMA_UNTIL] = cfg->gamma_until_tokens;
    b->rates[RT_GAMMA] = cfg->gamma;
    b->rates[RT_GAMMA_AFTER] = cfg->gamma_after;
    b->rates[RT_LAST_GAMMA] = 0.0f;
    *out = b;
    return DSMOE_OK;
}

void dsmoe_balancer_free(dsmoe_balancer *b) {
    if (!b) return;
    free(b->bias);
    free(b->counts);
    free(b->reduce);
    free(b->delta);
    free(b);
}

const dsmoe_balancer_config *dsmoe_balancer_get_config(const dsmoe_balancer *b) {
    return b ? &b->cfg : NULL;
}

const float *dsmoe_balancer_bias(const dsmoe_balancer *b) { return b ? b->bias : NULL; }

dsmoe_status dsmoe_balancer_set_bias(dsmoe_balancer *b, const float *bias) {
    if (!b || !bias)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balancer set_bias: %s is NULL",
                            !b ? "balancer" : "bias");
    for (int32_t i = 0; i < b->cfg.n_experts; i++)
        if (!isfinite(bias[i]))
            return dsmoe__error(DSMOE_STATUS_NON_FINITE, "balancer set_bias: bias[%d] = %g",
                                (int)i, (double)bias[i]);
    memcpy(b->bias, bias, (size_t)b->cfg.n_experts * sizeof(float));
    return DSMOE_OK;
}

void dsmoe_bias_center(float *bias, int32_t E) {
    if (!bias || E < 1) return;
    double sum = 0.0;
    for (int32_t i = 0; i < E; i++) sum += (double)bias[i];
    double mean = sum / (double)E;
    for (int32_t i = 0; i < E; i++) bias[i] = (float)((double)bias[i] - mean);
}

void dsmoe_balancer_center_bias(dsmoe_balancer *b) {
    if (b) dsmoe_bias_center(b->bias, b->cfg.n_experts);
}

dsmoe_status dsmoe_balancer_accumulate_counts(dsmoe_balancer *b, const int64_t *counts,
                                              int64_t n_tokens) {
    if (!b || !counts)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balancer accumulate: %s is NULL",
                            !b ? "balancer" : "counts");
    if (n_tokens < 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "balancer accumulate: n_tokens = %lld < 0", (long long)n_tokens);
    int32_t E = b->cfg.n_experts;
    for (int32_t i = 0; i < E; i++)
        if (counts[i] < 0)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "balancer accumulate: counts[%d] = %lld < 0", (int)i,
                                (long long)counts[i]);
    for (int32_t i = 0; i < E; i++) b->counts[i] += counts[i];
    b->state[ST_PENDING_TOKENS] += n_tokens;
    return DSMOE_OK;
}

dsmoe_status dsmoe_balancer_accumulate(dsmoe_balancer *b, const int32_t *indices,
                                       const uint8_t *mask, int64_t T, int32_t K) {
    if (!b || (!indices && T > 0))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balancer accumulate: %s is NULL",
                            !b ? "balancer" : "indices");
    if (T < 0 || K < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "balancer accumulate: T = %lld, K = %d (need T >= 0, K >= 1)",
                            (long long)T, (int)K);
    int32_t E = b->cfg.n_experts;
    /* Validate first so that a bad index changes nothing. */
    int64_t n = 0;
    dsmoe_status st = dsmoe__check_indices(indices, mask, T, K, E, "balancer accumulate", &n);
    if (st != DSMOE_OK) return st;
    for (int64_t t = 0; t < T; t++)
        if (!mask || mask[t]) dsmoe__count_experts(b->counts, indices + t * K, K);
    b->state[ST_PENDING_TOKENS] += n;
    return DSMOE_OK;
}

void dsmoe_balancer_set_allreduce(dsmoe_balancer *b, dsmoe_allreduce_fn fn, void *user) {
    if (!b) return;
    b->allreduce = fn;
    b->allreduce_user = user;
}

dsmoe_status dsmoe_balancer_step(dsmoe_balancer *b) {
    if (!b) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balancer step: balancer is NULL");
    int32_t E = b->cfg.n_experts;
    int64_t *pending = b->counts, *last = b->counts + E, *total = b->counts + 2 * (size_t)E;
    int64_t *red = b->reduce;
    memcpy(red, pending, (size_t)E * sizeof(int64_t));
    red[E] = b->state[ST_PENDING_TOKENS];
    if (b->allreduce) {
        int rc = b->allreduce(red, (int64_t)E + 1, b->allreduce_user);
        if (rc != 0)
            return dsmoe__error(DSMOE_STATUS_IO,
                                "balancer step: the all-reduce callback failed (returned %d); "
                                "nothing changed",
                                rc);
        for (int32_t i = 0; i <= E; i++)
            if (red[i] < 0)
                return dsmoe__error(DSMOE_STATUS_IO,
                                    "balancer step: all-reduced %s[%d] = %lld < 0",
                                    i < E ? "counts" : "tokens", (int)(i < E ? i : 0),
                                    (long long)red[i]);
    }

    /* Rate of this step: gamma while the tokens of earlier steps are below the limit. */
    float gamma = b->cfg.gamma;
    if (b->cfg.gamma_until_tokens > 0 && b->state[ST_TOKENS] >= b->cfg.gamma_until_tokens)
        gamma = b->cfg.gamma_after;

    int64_t sum = 0;
    for (int32_t i = 0; i < E; i++) sum += red[i];
    double mean = (double)sum / (double)E;
    if (sum > 0 && gamma > 0.0f) {
        double g = (double)gamma, dsum = 0.0;
        for (int32_t i = 0; i < E; i++) {
            double e = mean - (double)red[i];
            double d;
            if (b->cfg.rule == DSMOE_BALANCE_RULE_SIGN)
                d = e > 0.0 ? g : (e < 0.0 ? -g : 0.0);
            else
                d = g * e / mean;
            b->delta[i] = d;
            dsum += d;
        }
        double dmean = b->cfg.recenter ? dsum / (double)E : 0.0;
        for (int32_t i = 0; i < E; i++)
            b->bias[i] = (float)((double)b->bias[i] + (b->delta[i] - dmean));
    }
    for (int32_t i = 0; i < E; i++) {
        last[i] = red[i];
        total[i] += red[i];
        pending[i] = 0;
    }
    b->state[ST_TOKENS] += red[E];
    b->state[ST_PENDING_TOKENS] = 0;
    b->state[ST_STEPS]++;
    b->rates[RT_LAST_GAMMA] = gamma;
    return DSMOE_OK;
}

void dsmoe_balancer_get_info(const dsmoe_balancer *b, dsmoe_balancer_info *info) {
    if (!info) return;
    memset(info, 0, sizeof *info);
    if (!b) return;
    info->n_experts = b->cfg.n_experts;
    info->steps = b->state[ST_STEPS];
    info->tokens = b->state[ST_TOKENS];
    info->pending_tokens = b->state[ST_PENDING_TOKENS];
    info->last_gamma = b->rates[RT_LAST_GAMMA];
}

const int64_t *dsmoe_balancer_counts_pending(const dsmoe_balancer *b) {
    return b ? b->counts : NULL;
}
const int64_t *dsmoe_balancer_counts_last(const dsmoe_balancer *b) {
    return b ? b->counts + b->cfg.n_experts : NULL;
}
const int64_t *dsmoe_balancer_counts_total(const dsmoe_balancer *b) {
    return b ? b->counts + 2 * (size_t)b->cfg.n_experts : NULL;
}

/* ------------------------------------------------------------ save / load -- */

static const char *const tensor_suffix[4] = {"e_score_correction_bias", "balancer.counts",
                                             "balancer.state", "balancer.rates"};

static dsmoe_status make_name(char *buf, size_t size, const char *prefix, int which) {
    int n = snprintf(buf, size, "%s%s", prefix ? prefix : "", tensor_suffix[which]);
    if (n < 0 || (size_t)n >= size)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balancer: tensor prefix too long (%d)",
                            n);
    return DSMOE_OK;
}

dsmoe_status dsmoe_balancer_write(const dsmoe_balancer *b, dsmoe_safetensors_writer *w,
                                  const char *prefix) {
    if (!b || !w)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balancer write: %s is NULL",
                            !b ? "balancer" : "writer");
    int64_t E = b->cfg.n_experts;
    int64_t shapes[4][2] = {{E, 0}, {3, E}, {ST_COUNT_, 0}, {RT_COUNT_, 0}};
    int32_t ndims[4] = {1, 2, 1, 1};
    dsmoe_dtype dtypes[4] = {DSMOE_DTYPE_F32, DSMOE_DTYPE_I64, DSMOE_DTYPE_I64, DSMOE_DTYPE_F32};
    const void *data[4] = {b->bias, b->counts, b->state, b->rates};
    char name[1024];
    for (int i = 0; i < 4; i++) {
        dsmoe_status st = make_name(name, sizeof name, prefix, i);
        if (st != DSMOE_OK) return st;
        st = dsmoe_safetensors_writer_add(w, name, dtypes[i], ndims[i], shapes[i], data[i]);
        if (st != DSMOE_OK) return st;
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_balancer_save(const dsmoe_balancer *b, const char *path) {
    if (!b || !path)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balancer save: %s is NULL",
                            !b ? "balancer" : "path");
    dsmoe_safetensors_writer *w = NULL;
    dsmoe_status st = dsmoe_safetensors_writer_create(&w);
    if (st == DSMOE_OK) st = dsmoe_balancer_write(b, w, "");
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_set_metadata(w, "format", "dsmoe.balancer");
    if (st == DSMOE_OK) st = dsmoe_safetensors_writer_save(w, path);
    dsmoe_safetensors_writer_free(w);
    return st;
}

/* Looks up a tensor and checks its dtype and shape. */
static dsmoe_status get_tensor(const dsmoe_safetensors *sf, const char *prefix, int which,
                               dsmoe_dtype dtype, int32_t ndim, const int64_t *shape,
                               dsmoe_tensor_view *v) {
    char name[1024];
    dsmoe_status st = make_name(name, sizeof name, prefix, which);
    if (st != DSMOE_OK) return st;
    st = dsmoe_safetensors_get(sf, name, v);
    if (st != DSMOE_OK)
        return dsmoe__error(DSMOE_STATUS_FORMAT, "balancer: tensor '%s' missing", name);
    int ok = v->dtype == dtype && v->ndim == ndim;
    for (int32_t d = 0; ok && d < ndim; d++) ok = v->shape[d] == shape[d];
    if (!ok)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "balancer: tensor '%s' has dtype %s and %d dims; expected %s of "
                            "shape (%lld%s%lld)",
                            name, dsmoe_dtype_name(v->dtype), (int)v->ndim,
                            dsmoe_dtype_name(dtype), (long long)shape[0], ndim > 1 ? ", " : "",
                            ndim > 1 ? (long long)shape[1] : 0LL);
    return DSMOE_OK;
}

dsmoe_status dsmoe_balancer_read(const dsmoe_safetensors *sf, const char *prefix,
                                 dsmoe_balancer **out) {
    if (!sf || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balancer read: %s is NULL",
                            !sf ? "file" : "output pointer");
    *out = NULL;
    dsmoe_tensor_view vs, vr, vb, vc;
    int64_t shp[2] = {ST_COUNT_, 0};
    dsmoe_status st = get_tensor(sf, prefix, 2, DSMOE_DTYPE_I64, 1, shp, &vs);
    if (st != DSMOE_OK) return st;
    int64_t state[ST_COUNT_];
    memcpy(state, vs.data, sizeof state); /* the view may be unaligned */
    char name[1024];
    make_name(name, sizeof name, prefix, 2);
    if (state[ST_FORMAT] != BALANCER_FORMAT)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "balancer: '%s' says format %lld; this library reads format %d",
                            name, (long long)state[ST_FORMAT], BALANCER_FORMAT);
    shp[0] = RT_COUNT_;
    st = get_tensor(sf, prefix, 3, DSMOE_DTYPE_F32, 1, shp, &vr);
    if (st != DSMOE_OK) return st;
    float rates[RT_COUNT_];
    memcpy(rates, vr.data, sizeof rates);

    dsmoe_balancer_config cfg;
    memset(&cfg, 0, sizeof cfg);
    if (state[ST_EXPERTS] < 1 || state[ST_EXPERTS] > DSMOE_MAX_EXPERTS)
        return dsmoe__error(DSMOE_STATUS_FORMAT, "balancer: '%s' has n_experts = %lld", name,
                            (long long)state[ST_EXPERTS]);
    cfg.n_experts = (int32_t)state[ST_EXPERTS];
    cfg.rule = state[ST_RULE] == 1 ? DSMOE_BALANCE_RULE_PROPORTIONAL : DSMOE_BALANCE_RULE_SIGN;
    if (state[ST_RULE] != 0 && state[ST_RULE] != 1)
        return dsmoe__error(DSMOE_STATUS_FORMAT, "balancer: '%s' has rule = %lld", name,
                            (long long)state[ST_RULE]);
    cfg.recenter = (int32_t)(state[ST_RECENTER] == 1);
    if (state[ST_RECENTER] != 0 && state[ST_RECENTER] != 1)
        return dsmoe__error(DSMOE_STATUS_FORMAT, "balancer: '%s' has recenter = %lld", name,
                            (long long)state[ST_RECENTER]);
    cfg.gamma_until_tokens = state[ST_GAMMA_UNTIL];
    cfg.gamma = rates[RT_GAMMA];
    cfg.gamma_after = rates[RT_GAMMA_AFTER];
    if (state[ST_STEPS] < 0 || state[ST_TOKENS] < 0 || state[ST_PENDING_TOKENS] < 0)
        return dsmoe__error(DSMOE_STATUS_FORMAT, "balancer: '%s' has a negative counter", name);
    if (!isfinite(rates[RT_LAST_GAMMA]) || rates[RT_LAST_GAMMA] < 0.0f)
        return dsmoe__error(DSMOE_STATUS_FORMAT, "balancer: last gamma = %g is invalid",
                            (double)rates[RT_LAST_GAMMA]);
    st = dsmoe_balancer_config_validate(&cfg);
    if (st != DSMOE_OK)
        return dsmoe__error(DSMOE_STATUS_FORMAT, "balancer: stored configuration: %s",
                            dsmoe_last_error());

    int64_t E = cfg.n_experts;
    int64_t shb[1] = {E}, shc[2] = {3, E};
    st = get_tensor(sf, prefix, 0, DSMOE_DTYPE_F32, 1, shb, &vb);
    if (st != DSMOE_OK) return st;
    st = get_tensor(sf, prefix, 1, DSMOE_DTYPE_I64, 2, shc, &vc);
    if (st != DSMOE_OK) return st;

    dsmoe_balancer *b = NULL;
    st = dsmoe_balancer_create(&cfg, &b);
    if (st != DSMOE_OK || !b) return st;
    memcpy(b->bias, vb.data, (size_t)E * sizeof(float));
    memcpy(b->counts, vc.data, 3 * (size_t)E * sizeof(int64_t));
    for (int64_t i = 0; i < E; i++) {
        if (!isfinite(b->bias[i])) {
            make_name(name, sizeof name, prefix, 0);
            dsmoe_balancer_free(b);
            return dsmoe__error(DSMOE_STATUS_FORMAT, "balancer: '%s'[%lld] is not finite", name,
                                (long long)i);
        }
    }
    for (int64_t i = 0; i < 3 * E; i++) {
        if (b->counts[i] < 0) {
            long long v = (long long)b->counts[i];
            make_name(name, sizeof name, prefix, 1);
            dsmoe_balancer_free(b);
            return dsmoe__error(DSMOE_STATUS_FORMAT, "balancer: '%s'[%lld, %lld] = %lld < 0",
                                name, (long long)(i / E), (long long)(i % E), v);
        }
    }
    memcpy(b->state, state, sizeof state);
    b->rates[RT_LAST_GAMMA] = rates[RT_LAST_GAMMA];
    *out = b;
    return DSMOE_OK;
}

dsmoe_status dsmoe_balancer_load(const char *path, dsmoe_balancer **out) {
    if (!path || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balancer load: %s is NULL",
                            !path ? "path" : "output pointer");
    *out = NULL;
    dsmoe_safetensors *sf = NULL;
    dsmoe_status st = dsmoe_safetensors_open(path, &sf);
    if (st != DSMOE_OK) return st;
    st = dsmoe_balancer_read(sf, "", out);
    dsmoe_safetensors_close(sf);
    if (st != DSMOE_OK) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", dsmoe_last_error());
        return dsmoe__error(st, "%s: %s", path, msg);
    }
    return DSMOE_OK;
}

/* --------------------------------------------------------- bias storage -- */

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Distinct values of a sorted array (+0 and -0 count as one). */
static int32_t count_distinct(const float *v, int32_t n) {
    int32_t d = n > 0;
    for (int32_t i = 1; i < n; i++) d += v[i] != v[i - 1];
    return d;
}

dsmoe_status dsmoe_bias_bf16_check(const float *bias, int32_t E, float gamma,
                                   dsmoe_bias_bf16_report *report) {
    if (!bias || !report)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "bias bf16 check: %s is NULL",
                            !bias ? "bias" : "report");
    if (E < 1 || E > DSMOE_MAX_EXPERTS)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "bias bf16 check: E = %d", (int)E);
    if (!isfinite(gamma) || gamma < 0.0f)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "bias bf16 check: gamma = %g",
                            (double)gamma);
    for (int32_t i = 0; i < E; i++)
        if (!isfinite(bias[i]))
            return dsmoe__error(DSMOE_STATUS_NON_FINITE, "bias bf16 check: bias[%d] = %g", (int)i,
                                (double)bias[i]);
    /* Sorted fp32 copy and sorted bf16-rounded copy. */
    float *tmp = (float *)malloc(2 * (size_t)E * sizeof(float));
    if (!tmp) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "bias bf16 check: %d values", (int)E);
    float *f = tmp, *h = tmp + E;
    memset(report, 0, sizeof *report);
    double sum = 0.0;
    for (int32_t i = 0; i < E; i++) {
        f[i] = bias[i];
        float err = fabsf(dsmoe_bf16_to_f32(dsmoe_f32_to_bf16(bias[i])) - bias[i]);
        if (err > report->max_abs_error) report->max_abs_error = err;
        if (gamma > 0.0f) {
            uint16_t w = dsmoe_f32_to_bf16(bias[i]);
            if (dsmoe_f32_to_bf16(bias[i] + gamma) == w || dsmoe_f32_to_bf16(bias[i] - gamma) == w)
                report->step_lost++;
        }
        sum += (double)bias[i];
    }
    report->mean = (float)(sum / (double)E);
    /* Rounding is monotone, so rounding the sorted fp32 values gives the sorted bf16
     * values, and each run of equal bf16 values holds exactly the fp32 values that
     * round to it. */
    qsort(f, (size_t)E, sizeof(float), cmp_float);
    for (int32_t i = 0; i < E; i++) h[i] = dsmoe_bf16_to_f32(dsmoe_f32_to_bf16(f[i]));
    report->distinct_f32 = count_distinct(f, E);
    report->distinct_bf16 = count_distinct(h, E);
    /* Within a run, an expert has collapsed if some other value of the run is more than
     * tol away from its own (tol = gamma/2: fp32 noise below half a step is not a loss). */
    const float tol = gamma > 0.0f ? 0.5f * gamma : 0.0f;
    for (int32_t i = 0; i < E;) {
        int32_t j = i;
        while (j < E && h[j] == h[i]) j++;
        for (int32_t k = i; k < j; k++)
            if (f[k] - f[i] > tol || f[j - 1] - f[k] > tol) report->collapsed++;
        i = j;
    }
    free(tmp);
    return DSMOE_OK;
}
