/*
 * optim.c — AdamW, its learning-rate schedule and global-norm clipping, computed as
 * torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ do (see dsmoe/train.h).
 */
#include "train/train_internal.h"

#include <math.h>

/* The order of the fp32 operations follows torch.optim.AdamW's single-tensor path
 * (addcmul: (value·g)·g; addcdiv: (value·m) / denom), so results agree to rounding. */

void dsmoe_adamw_config_default(dsmoe_adamw_config *cfg) {
    if (!cfg) return;
    cfg->lr = 3e-3f;
    cfg->beta1 = 0.9f;
    cfg->beta2 = 0.95f;
    cfg->eps = 1e-8f;
    cfg->weight_decay = 0.1f;
    cfg->clip_norm = 1.0f;
    cfg->warmup_steps = 100;
    cfg->total_steps = 1000;
    cfg->min_lr_ratio = 0.1f;
}

dsmoe_status dsmoe_adamw_config_validate(const dsmoe_adamw_config *c) {
    if (!c) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "adamw: NULL config");
#define BAD(cond, field, fmt, v)                                                                   \
    if (cond) return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "adamw: " field " " fmt, v)
    BAD(!(c->lr > 0 && isfinite(c->lr)), "lr", "must be a positive number, found %g", (double)c->lr);
    BAD(!(c->beta1 >= 0 && c->beta1 < 1), "beta1", "must be in [0, 1), found %g", (double)c->beta1);
    BAD(!(c->beta2 >= 0 && c->beta2 < 1), "beta2", "must be in [0, 1), found %g", (double)c->beta2);
    BAD(!(c->eps > 0 && isfinite(c->eps)), "eps", "must be a positive number, found %g", (double)c->eps);
    BAD(!(c->weight_decay >= 0 && isfinite(c->weight_decay)), "weight_decay",
        "must be >= 0, found %g", (double)c->weight_decay);
    BAD(!(c->clip_norm >= 0 && isfinite(c->clip_norm)), "clip_norm", "must be >= 0, found %g",
        (double)c->clip_norm);
    BAD(c->total_steps < 1, "total_steps", "must be >= 1, found %lld", (long long)c->total_steps);
    BAD(c->warmup_steps < 0 || c->warmup_steps > c->total_steps, "warmup_steps",
        "must be in [0, total_steps], found %lld", (long long)c->warmup_steps);
    BAD(!(c->min_lr_ratio >= 0 && c->min_lr_ratio <= 1), "min_lr_ratio", "must be in [0, 1], found %g",
        (double)c->min_lr_ratio);
#undef BAD
    return DSMOE_OK;
}

double dsmoe_adamw_lr(const dsmoe_adamw_config *c, int64_t t) {
    const double lr = c->lr, lo = lr * c->min_lr_ratio;
    if (t < 1) t = 1;
    if (t <= c->warmup_steps) return lr * (double)t / (double)c->warmup_steps;
    if (t > c->total_steps) return lo;
    const double pi = 3.14159265358979323846;
    double prog = (double)(t - c->warmup_steps) / (double)(c->total_steps - c->warmup_steps);
    return lo + (lr - lo) * 0.5 * (1.0 + cos(pi * prog));
}

#define SS_BLOCK 4096

double dsmoe_sum_squares(const float *g, int64_t n, int n_threads) {
    (void)n_threads; /* memory-bound: one thread reads as fast; the order is fixed anyway */
    double total = 0.0;
    for (int64_t b = 0; b < n; b += SS_BLOCK) {
        double s = 0.0;
        int64_t e = b + SS_BLOCK < n ? b + SS_BLOCK : n;
        for (int64_t i = b; i < e; i++) s += (double)g[i] * (double)g[i];
        total += s;
    }
    return total;
}

float dsmoe_adamw_clip_factor(const dsmoe_adamw_config *c, double norm) {
    if (c->clip_norm <= 0) return 1.0f;
    double f = (double)c->clip_norm / (norm + 1e-6);
    return f < 1.0 ? (float)f : 1.0f;
}

void dsmoe_adamw_update(const dsmoe_adamw_config *c, float *p, float *m, float *v, const float *g,
                        int64_t n, int64_t t, double lr, double wd, float grad_scale, int n_threads) {
    if (t < 1) t = 1;
    const float decay = (float)(1.0 - lr * wd);
    const float b1 = c->beta1, b2 = c->beta2, a1 = (float)(1.0 - c->beta1),
                a2 = (float)(1.0 - c->beta2), eps = c->eps;
    const double bc1 = 1.0 - pow((double)c->beta1, (double)t),
                 bc2 = 1.0 - pow((double)c->beta2, (double)t);
    const float step = (float)(lr / bc1), bc2s = (float)sqrt(bc2);
    const int nt = n_threads > 1 ? n_threads : 1;
    (void)nt; /* unused without OpenMP */
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && n > 65536)
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i] * grad_scale;
        float pi = p[i] * decay;
        float mi = m[i] * b1 + a1 * gi;
        float vi = v[i] * b2 + (a2 * gi) * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi + (-step * mi) / (sqrtf(vi) / bc2s + eps);
    }
}
