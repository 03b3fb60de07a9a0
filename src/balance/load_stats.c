/*
 * load_stats.c — load statistics of routed traffic, from per-expert counts and the
 * routed indices (no pass over the logits).
 *
 * MaxVio = (max_i Load_i − mean Load) / mean Load (Wang et al. 2024, arXiv
 * 2408.15664, §4.1): over one batch MaxVio_batch, over counts summed across a run
 * MaxVio_global. Also the coefficient of variation, the entropy of the load
 * distribution normalised by ln E, dead experts, the load of each group of E/G
 * contiguous experts (a node under DeepSeek-V3 node-limited routing, report §2.1.2)
 * and the mean number of groups each token reaches (at most TG = M).
 */
#include "core/internal.h"
#include "dsmoe/balance.h"

#include <math.h>
#include <string.h>

/* MaxVio and CV of n loads, in double. */
static void vio_cv(const int64_t *c, int32_t n, double *maxvio, double *cv) {
    int64_t total = 0, mx = c[0];
    for (int32_t i = 0; i < n; i++) {
        total += c[i];
        if (c[i] > mx) mx = c[i];
    }
    *maxvio = 0.0;
    *cv = 0.0;
    if (total <= 0) return;
    double mean = (double)total / (double)n, var = 0.0;
    for (int32_t i = 0; i < n; i++) {
        double e = (double)c[i] - mean;
        var += e * e;
    }
    *maxvio = ((double)mx - mean) / mean;
    *cv = sqrt(var / (double)n) / mean;
}

static dsmoe_status check_groups(const char *what, int32_t E, int32_t G) {
    if (G < 1 || G > E || E % G != 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "%s: n_groups = %d must divide n_experts = %d", what, (int)G, (int)E);
    return DSMOE_OK;
}

dsmoe_status dsmoe_load_stats_compute(const int64_t *counts, int32_t E, int32_t G,
                                      dsmoe_load_stats *out) {
    if (!counts || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "load stats: %s is NULL",
                            !counts ? "counts" : "output");
    if (E < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "load stats: E = %d < 1", (int)E);
    dsmoe_status st = check_groups("load stats", E, G);
    if (st != DSMOE_OK) return st;
    for (int32_t i = 0; i < E; i++)
        if (counts[i] < 0)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "load stats: counts[%d] = %lld < 0",
                                (int)i, (long long)counts[i]);
    dsmoe_load_stats s;
    memset(&s, 0, sizeof s);
    s.n_experts = E;
    s.n_groups = G;
    s.max = counts[0];
    s.min = counts[0];
    for (int32_t i = 0; i < E; i++) {
        s.total += counts[i];
        if (counts[i] > s.max) { s.max = counts[i]; s.argmax = i; }
        if (counts[i] < s.min) s.min = counts[i];
        if (counts[i] == 0) s.dead++;
    }
    s.mean = (double)s.total / (double)E;
    vio_cv(counts, E, &s.maxvio, &s.cv);
    if (s.total > 0) {
        if (E == 1) {
            s.entropy = 1.0;
        } else {
            double h = 0.0;
            for (int32_t i = 0; i < E; i++) {
                if (counts[i] == 0) continue;
                double p = (double)counts[i] / (double)s.total;
                h -= p * log(p);
            }
            s.entropy = h / log((double)E);
        }
    }
    if (G > 1) {
        /* Group loads computed on the fly (nothing stored). */
        const int32_t EpG = E / G;
        int64_t gmax = -1;
        double gmean = (double)s.total / (double)G, var = 0.0;
        for (int32_t g = 0; g < G; g++) {
            int64_t c = 0;
            for (int32_t i = g * EpG; i < (g + 1) * EpG; i++) c += counts[i];
            if (c > gmax) gmax = c;
            double e = (double)c - gmean;
            var += e * e;
        }
        if (s.total > 0) {
            s.group_maxvio = ((double)gmax - gmean) / gmean;
            s.group_cv = sqrt(var / (double)G) / gmean;
        }
    } else {
        s.group_maxvio = 0.0;
        s.group_cv = 0.0;
    }
    *out = s;
    return DSMOE_OK;
}

dsmoe_status dsmoe_load_counts(int64_t *counts, const int32_t *indices, const uint8_t *mask,
                               int64_t T, int32_t K, int32_t E) {
    if (!counts || (!indices && T > 0))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "load counts: %s is NULL",
                            !counts ? "counts" : "indices");
    if (T < 0 || K < 1 || E < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "load counts: T = %lld, K = %d, E = %d (need T >= 0, K >= 1, E >= 1)",
                            (long long)T, (int)K, (int)E);
    /* checked first: a bad index leaves counts as they were */
    dsmoe_status st = dsmoe__check_indices(indices, mask, T, K, E, "load counts", NULL);
    if (st != DSMOE_OK) return st;
    memset(counts, 0, (size_t)E * sizeof(int64_t));
    for (int64_t t = 0; t < T; t++)
        if (!mask || mask[t]) dsmoe__count_experts(counts, indices + t * K, K);
    return DSMOE_OK;
}

dsmoe_status dsmoe_load_group_counts(int64_t *group_counts, const int64_t *counts, int32_t E,
                                     int32_t G) {
    if (!group_counts || !counts)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "group counts: %s is NULL",
                            !group_counts ? "group_counts" : "counts");
    if (E < 1) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "group counts: E = %d", (int)E);
    dsmoe_status st = check_groups("group counts", E, G);
    if (st != DSMOE_OK) return st;
    const int32_t EpG = E / G;
    for (int32_t g = 0; g < G; g++) {
        int64_t c = 0;
        for (int32_t i = g * EpG; i < (g + 1) * EpG; i++) c += counts[i];
        group_counts[g] = c;
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_load_groups_per_token(double *mean, const int32_t *indices,
                                         const uint8_t *mask, int64_t T, int32_t K, int32_t E,
                                         int32_t G) {
    if (!mean || (!indices && T > 0))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "groups per token: %s is NULL",
                            !mean ? "mean" : "indices");
    if (T < 0 || K < 1 || E < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "groups per token: T = %lld, K = %d, E = %d", (long long)T, (int)K,
                            (int)E);
    dsmoe_status st = check_groups("groups per token", E, G);
    if (st != DSMOE_OK) return st;
    const int32_t EpG = E / G;
    int64_t reach = 0, n = 0;
    for (int64_t t = 0; t < T; t++) {
        if (mask && !mask[t]) continue;
        const int32_t *sel = indices + t * K;
        for (int32_t k = 0; k < K; k++) {
            if (sel[k] < 0 || sel[k] >= E)
                return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                    "groups per token: indices[%lld, %d] = %d outside 0..%d",
                                    (long long)t, (int)k, (int)sel[k], (int)E - 1);
            int32_t g = sel[k] / EpG, seen = 0;
            for (int32_t j = 0; j < k && !seen; j++) seen = sel[j] / EpG == g;
            reach += !seen;
        }
        n++;
    }
    *mean = n > 0 ? (double)reach / (double)n : 0.0;
    return DSMOE_OK;
}
