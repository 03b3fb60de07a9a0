/*
 * balance_loss.c — balance losses and their gradients with respect to the router
 * logits.
 *
 * DeepSeek-V3 report eqs. 17–20 (complementary sequence-wise balance loss), per
 * sequence of T_s tokens:
 *     L_Bal = α Σ_i f_i P_i,   f_i = E/(K T_s) Σ_t 1(i ∈ selection of t),
 *     s'_{i,t} = s_{i,t} / Σ_j s_{j,t},   P_i = (1/T_s) Σ_t s'_{i,t}.
 * DeepSeek-V2 report §2.2.2 (eqs. 20–28): expert-level (the same form), device-level
 *     L = α Σ_d f'_d P'_d,  f'_d = (1/|E_d|) Σ_{i∈E_d} f_i,  P'_d = Σ_{i∈E_d} P_i,
 * and communication balance loss
 *     L = α Σ_d f''_d P'_d, f''_d = D/(M T_s) Σ_t 1(token t reaches device d).
 * Switch Transformer / GShard: L = α E Σ_i (n_i / (K T_s)) P_i.
 * Router z-loss (ST-MoE eq. 5): L = α (1/T) Σ_t (log Σ_j exp u_{t,j})².
 *
 * Every balance loss above is L_s = Σ_i w_i P_i with per-expert weights w_i that
 * depend only on the (constant) counts, so dL/ds'_{i,t} = w_i / T_s; the chain
 * continues through s' = s/Σs and the score function (sigmoid or softmax). The
 * returned loss is the mean over the T / T_s sequences. Sums are in double, in a
 * fixed order; sequences (phase 1) and tokens (phase 2) run in parallel, each
 * computed by one thread, so bits never depend on the thread count.
 */
#include "core/internal.h"
#include "dsmoe/balance.h"

#include <math.h>
#include <string.h>

#define MAX_K 256

static const char *const kind_names[] = {"seq", "expert", "device", "comm", "switch", "zloss"};
#define N_KINDS ((int)(sizeof kind_names / sizeof kind_names[0]))

void dsmoe_balance_loss_config_default(dsmoe_balance_loss_kind kind,
                                       dsmoe_balance_loss_config *cfg) {
    if (!cfg) return;
    memset(cfg, 0, sizeof *cfg);
    cfg->kind = kind;
    switch (kind) {
    case DSMOE_BALANCE_LOSS_SEQ: cfg->alpha = 1e-4f; break;
    case DSMOE_BALANCE_LOSS_EXPERT: cfg->alpha = 3e-3f; break;
    case DSMOE_BALANCE_LOSS_DEVICE: cfg->alpha = 5e-2f; break;
    case DSMOE_BALANCE_LOSS_COMM: cfg->alpha = 2e-2f; break;
    case DSMOE_BALANCE_LOSS_SWITCH: cfg->alpha = 1e-2f; break;
    case DSMOE_BALANCE_LOSS_ZLOSS: cfg->alpha = 1e-3f; break;
    }
    cfg->seq_len = 0;
    cfg->count_from = DSMOE_BALANCE_COUNT_ROUTED;
    cfg->normalize_scores = 1;
    cfg->n_devices = 0;
    cfg->device_topm = 0;
}

dsmoe_status dsmoe_balance_loss_kind_parse(const char *name, dsmoe_balance_loss_kind *kind) {
    if (!name || !kind)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balance loss kind: NULL argument");
    for (int i = 0; i < N_KINDS; i++)
        if (strcmp(name, kind_names[i]) == 0) {
            *kind = (dsmoe_balance_loss_kind)i;
            return DSMOE_OK;
        }
    return dsmoe__error(DSMOE_STATUS_NOT_FOUND,
                        "unknown balance loss '%s' (known: seq, expert, device, comm, switch, "
                        "zloss)",
                        name);
}

const char *dsmoe_balance_loss_kind_name(dsmoe_balance_loss_kind kind) {
    return (int)kind >= 0 && (int)kind < N_KINDS ? kind_names[kind] : "?";
}

/* Resolved dimensions of one call. */
typedef struct loss_dims {
    int32_t E, K, D, M; /* experts, top-k, devices, devices per token */
    int64_t T, Ts, n_seq;
} loss_dims;

static dsmoe_status check_config(const dsmoe_balance_loss_config *lc,
                                 const dsmoe_router_config *rc, int64_t T, loss_dims *d) {
    if (!lc || !rc)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balance loss: %s is NULL",
                            !lc ? "loss config" : "router config");
    if ((int)lc->kind < 0 || (int)lc->kind >= N_KINDS)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "balance loss: kind = %d is unknown",
                            (int)lc->kind);
    if (!isfinite(lc->alpha) || lc->alpha < 0.0f)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "balance loss: alpha = %g must be finite and >= 0", (double)lc->alpha);
    if (lc->seq_len < 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "balance loss: seq_len = %lld < 0",
                            (long long)lc->seq_len);
    if (lc->count_from != DSMOE_BALANCE_COUNT_ROUTED && lc->count_from != DSMOE_BALANCE_COUNT_TOPK)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "balance loss: count_from = %d (ROUTED 0 or TOPK 1)",
                            (int)lc->count_from);
    if (lc->normalize_scores != 0 && lc->normalize_scores != 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "balance loss: normalize_scores = %d (0 or 1)",
                            (int)lc->normalize_scores);
    if (rc->n_experts < 1 || rc->n_experts > DSMOE_MAX_EXPERTS)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "balance loss: router n_experts = %d (1..%d)", (int)rc->n_experts,
                            DSMOE_MAX_EXPERTS);
    if (rc->top_k < 1 || rc->top_k > rc->n_experts || rc->top_k > MAX_K)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "balance loss: router top_k = %d (1..min(n_experts, %d))",
                            (int)rc->top_k, MAX_K);
    if (rc->score_func != DSMOE_SCORE_FUNC_SIGMOID && rc->score_func != DSMOE_SCORE_FUNC_SOFTMAX)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "balance loss: router score_func = %d",
                            (int)rc->score_func);
    if (T < 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balance loss: T = %lld < 0",
                            (long long)T);
    d->E = rc->n_experts;
    d->K = rc->top_k;
    d->D = 1;
    d->M = 1;
    if (lc->kind == DSMOE_BALANCE_LOSS_DEVICE || lc->kind == DSMOE_BALANCE_LOSS_COMM) {
        d->D = lc->n_devices > 0 ? lc->n_devices : rc->n_groups;
        d->M = lc->device_topm > 0 ? lc->device_topm : rc->topk_groups;
        if (lc->n_devices < 0 || d->D < 1 || d->E % d->D != 0)
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "balance loss: n_devices = %d must divide n_experts = %d",
                                (int)d->D, (int)d->E);
        if (lc->kind == DSMOE_BALANCE_LOSS_COMM && (lc->device_topm < 0 || d->M < 1 || d->M > d->D))
            return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                "balance loss: device_topm = %d must be 1..n_devices (%d)",
                                (int)d->M, (int)d->D);
    }
    d->T = T;
    d->Ts = lc->seq_len > 0 ? lc->seq_len : T;
    if (lc->kind == DSMOE_BALANCE_LOSS_ZLOSS) d->Ts = T;
    if (T > 0 && T % d->Ts != 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "balance loss: T = %lld is not a multiple of seq_len = %lld",
                            (long long)T, (long long)d->Ts);
    d->n_seq = T > 0 ? T / d->Ts : 0;
    return DSMOE_OK;
}

/* Workspace: per sequence, E weights + E score sums + D device figures + the loss
 * (doubles), then per sequence an error flag, token and position (int64); for
 * ZLOSS one double per token. 64 spare bytes allow aligning the caller's pointer. */
static size_t workspace_bytes(const dsmoe_balance_loss_config *lc, const loss_dims *d) {
    size_t n, m;
    if (lc->kind == DSMOE_BALANCE_LOSS_ZLOSS) {
        if (!dsmoe__mul_size((size_t)d->T, sizeof(double), &n)) return SIZE_MAX;
        return dsmoe__align64(n) + 64;
    }
    size_t per = (2 * (size_t)d->E + (size_t)d->D + 1) * sizeof(double) + 3 * sizeof(int64_t);
    if (!dsmoe__mul_size(per, (size_t)d->n_seq, &n)) return SIZE_MAX;
    m = dsmoe__align64(n) + 64;
    return m < n ? SIZE_MAX : m;
}

size_t dsmoe_balance_loss_workspace_size(const dsmoe_balance_loss_config *lc,
                                         const dsmoe_router_config *rc, int64_t T) {
    loss_dims d = {0, 0, 0, 0, 0, 0, 0};
    if (check_config(lc, rc, T, &d) != DSMOE_OK) return 0;
    return workspace_bytes(lc, &d);
}

/* The K experts of token t with the largest raw score, ties to the lower id, found
 * as successive maxima in the total order (value descending, index ascending). */
static void topk_raw(int32_t *sel, const float *s, int32_t E, int32_t K) {
    float pv = 0.0f;
    int32_t pi = -1;
    for (int32_t k = 0; k < K; k++) {
        int32_t best = -1;
        float bv = 0.0f;
        for (int32_t i = 0; i < E; i++) {
            float v = s[i];
            if (pi >= 0 && !(v < pv || (v == pv && i > pi))) continue; /* not after prev */
            if (best < 0 || v > bv) { best = i; bv = v; }
        }
        sel[k] = best;
        pv = bv;
        pi = best;
    }
}

/* Error flags of phase 1 (first problem in a sequence). */
enum { BAD_NONE = 0, BAD_INDEX = 1, BAD_SCORE = 2 };

/* Phase 1 for sequence q: counts and score sums → weights w (E), loss. ext (E): counts
 * over ext_T tokens to take f from instead of the sequence's own (NULL: its own).
 * Returns a BAD_* flag and the position of the first problem. */
static int seq_phase1(const dsmoe_balance_loss_config *lc, const loss_dims *d,
                      const float *scores, const int32_t *indices, const int64_t *ext,
                      int64_t ext_T, int64_t q, double *w, double *P, double *dev, double *loss,
                      int64_t *bad_t, int32_t *bad_e) {
    /* (D divides E, D >= 1: checked by the caller) */
    const int32_t E = d->E, K = d->K, D = d->D, EpD = D > 0 && E >= D ? E / D : 1;
    const int64_t Ts = d->Ts, t0 = q * Ts;
    for (int32_t i = 0; i < E; i++) { w[i] = 0.0; P[i] = 0.0; }
    for (int32_t i = 0; i < D; i++) dev[i] = 0.0;
    int32_t sel_buf[MAX_K];
    for (int64_t t = t0; t < t0 + Ts; t++) {
        const float *s = scores + (size_t)t * E;
        /* scores must be finite and >= 0 (they are affinities). */
        double S = 0.0;
        for (int32_t i = 0; i < E; i++) {
            if (!(s[i] >= 0.0f) || !isfinite(s[i])) {
                *bad_t = t;
                *bad_e = i;
                return BAD_SCORE;
            }
            S += (double)s[i];
        }
        if (lc->normalize_scores) {
            if (S > 0.0)
                for (int32_t i = 0; i < E; i++) P[i] += (double)s[i] / S;
        } else {
            for (int32_t i = 0; i < E; i++) P[i] += (double)s[i];
        }
        const int32_t *sel;
        if (ext) continue; /* f from the given counts */
        if (lc->count_from == DSMOE_BALANCE_COUNT_ROUTED) {
            sel = indices + (size_t)t * K;
            for (int32_t k = 0; k < K; k++)
                if (sel[k] < 0 || sel[k] >= E) {
                    *bad_t = t;
                    *bad_e = k;
                    return BAD_INDEX;
                }
        } else {
            topk_raw(sel_buf, s, E, K);
            sel = sel_buf;
        }
        for (int32_t k = 0; k < K; k++) w[sel[k]] += 1.0; /* counts for now */
        if (lc->kind == DSMOE_BALANCE_LOSS_COMM) {
            for (int32_t k = 0; k < K; k++) {
                int32_t dk = sel[k] / EpD, seen = 0;
                for (int32_t j = 0; j < k && !seen; j++) seen = sel[j] / EpD == dk;
                if (!seen) dev[dk] += 1.0;
            }
        }
    }
    /* P_i = (1/T_s) Σ_t s'_{i,t}; f_i = E/(K T_s)·count_i. */
    const double alpha = (double)lc->alpha;
    for (int32_t i = 0; i < E; i++) P[i] /= (double)Ts;
    if (ext)
        for (int32_t i = 0; i < E; i++) w[i] = (double)ext[i];
    const double fscale = (double)E / ((double)K * (double)(ext ? ext_T : Ts));
    switch (lc->kind) {
    case DSMOE_BALANCE_LOSS_SEQ:
    case DSMOE_BALANCE_LOSS_EXPERT:
    case DSMOE_BALANCE_LOSS_SWITCH:
        for (int32_t i = 0; i < E; i++) w[i] = alpha * (fscale * w[i]);
        break;
    case DSMOE_BALANCE_LOSS_DEVICE:
        /* f'_d = mean over the device of f_i. */
        for (int32_t g = 0; g < D; g++) {
            double fsum = 0.0;
            for (int32_t i = g * EpD; i < (g + 1) * EpD; i++) fsum += fscale * w[i];
            dev[g] = fsum / (double)EpD;
        }
        for (int32_t i = 0; i < E; i++) w[i] = alpha * dev[i / EpD];
        break;
    case DSMOE_BALANCE_LOSS_COMM: {
        const double cscale = (double)D / ((double)d->M * (double)Ts);
        for (int32_t g = 0; g < D; g++) dev[g] *= cscale;
        for (int32_t i = 0; i < E; i++) w[i] = alpha * dev[i / EpD];
        break;
    }
    case DSMOE_BALANCE_LOSS_ZLOSS: break;
    }
    double L = 0.0;
    for (int32_t i = 0; i < E; i++) L += w[i] * P[i];
    *loss = L;
    return BAD_NONE;
}

/* Phase 2 for token t: dlogits[t] += dL/du given g_i = dL/ds'_{i,t} = w_i * gscale. */
static void token_backward(const dsmoe_balance_loss_config *lc, const dsmoe_router_config *rc,
                           int32_t E, const double *w, double gscale, const float *s,
                           float *du) {
    double S = 1.0, a = 0.0;
    if (lc->normalize_scores) {
        S = 0.0;
        for (int32_t i = 0; i < E; i++) S += (double)s[i];
        if (!(S > 0.0)) return; /* no affinity mass: p = 0, no gradient */
        /* a = Σ_i g_i p_i with p = s / S */
        for (int32_t i = 0; i < E; i++) a += w[i] * gscale * ((double)s[i] / S);
    }
    /* ds_j = (g_j − a) / S (normalised) or g_j. */
    if (rc->score_func == DSMOE_SCORE_FUNC_SIGMOID) {
        for (int32_t j = 0; j < E; j++) {
            double ds = (w[j] * gscale - a) / S;
            double sj = (double)s[j];
            du[j] += (float)(ds * sj * (1.0 - sj));
        }
    } else {
        double b = 0.0; /* Σ_i s_i ds_i */
        for (int32_t i = 0; i < E; i++) b += (double)s[i] * ((w[i] * gscale - a) / S);
        for (int32_t j = 0; j < E; j++) {
            double ds = (w[j] * gscale - a) / S;
            du[j] += (float)((double)s[j] * (ds - b));
        }
    }
}

/* log Σ_j exp(u_j) in double; NaN if any logit is not finite. */
static double logsumexp(const float *u, int32_t E) {
    double m = -INFINITY;
    for (int32_t j = 0; j < E; j++) {
        if (!isfinite(u[j])) return NAN;
        if ((double)u[j] > m) m = (double)u[j];
    }
    double z = 0.0; /* >= 1: the maximum contributes exp(0) */
    for (int32_t j = 0; j < E; j++) z += exp((double)u[j] - m);
    return m + log(z); // cppcheck-suppress invalidFunctionArg
}

static dsmoe_status zloss(const dsmoe_balance_loss_config *lc, const loss_dims *d, double *loss,
                          float *dlogits, const float *logits, double *lse, int nt) {
    const int32_t E = d->E;
    const int64_t T = d->T;
    (void)nt; /* used by OpenMP only */
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t t = 0; t < T; t++) lse[t] = logsumexp(logits + (size_t)t * E, E);
    double sum = 0.0;
    for (int64_t t = 0; t < T; t++) {
        if (isnan(lse[t])) {
            int32_t j = 0;
            while (j < E && isfinite(logits[(size_t)t * E + j])) j++;
            return dsmoe__error(DSMOE_STATUS_NON_FINITE, "balance loss: logits[%lld, %d] = %g",
                                (long long)t, (int)j, (double)logits[(size_t)t * E + j]);
        }
        sum += lse[t] * lse[t];
    }
    const double alpha = (double)lc->alpha;
    *loss = T > 0 ? alpha * sum / (double)T : 0.0;
    if (dlogits && T > 0) {
        const double c = 2.0 * alpha / (double)T;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
        for (int64_t t = 0; t < T; t++) {
            const float *u = logits + (size_t)t * E;
            float *du = dlogits + (size_t)t * E;
            for (int32_t j = 0; j < E; j++)
                du[j] += (float)(c * lse[t] * exp((double)u[j] - lse[t]));
        }
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_balance_loss(const dsmoe_balance_loss_config *lc,
                                const dsmoe_router_config *rc, double *loss, float *dlogits,
                                const float *scores, const int32_t *indices,
                                const float *logits, int64_t T, void *workspace,
                                size_t workspace_size, int n_threads) {
    return dsmoe_balance_loss_ex(lc, rc, loss, dlogits, scores, indices, logits, T, NULL, 0,
                                 workspace, workspace_size, n_threads);
}

dsmoe_status dsmoe_balance_loss_ex(const dsmoe_balance_loss_config *lc,
                                   const dsmoe_router_config *rc, double *loss, float *dlogits,
                                   const float *scores, const int32_t *indices,
                                   const float *logits, int64_t T, const int64_t *counts,
                                   int64_t counts_T, void *workspace, size_t workspace_size,
                                   int n_threads) {
    loss_dims d = {0, 0, 0, 0, 0, 0, 0};
    dsmoe_status st = check_config(lc, rc, T, &d);
    if (st != DSMOE_OK) return st;
    if (!loss) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balance loss: loss is NULL");
    const int is_z = lc->kind == DSMOE_BALANCE_LOSS_ZLOSS;
    if (counts) {
        if (is_z || lc->kind == DSMOE_BALANCE_LOSS_COMM)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "balance loss: the %s loss takes no external counts",
                                kind_names[lc->kind]);
        if (d.n_seq > 1)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "balance loss: external counts need one sequence (seq_len = "
                                "%lld splits T = %lld into %lld)",
                                (long long)lc->seq_len, (long long)T, (long long)d.n_seq);
        if (counts_T < 1)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "balance loss: counts_T = %lld < 1", (long long)counts_T);
        for (int32_t i = 0; i < d.E; i++)
            if (counts[i] < 0)
                return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                    "balance loss: counts[%d] = %lld < 0", (int)i,
                                    (long long)counts[i]);
    }
    if (T > 0) {
        if (is_z && !logits)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "balance loss: the z-loss needs logits (NULL given)");
        if (!is_z && !scores)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "balance loss: scores is NULL");
        if (!is_z && !counts && lc->count_from == DSMOE_BALANCE_COUNT_ROUTED && !indices)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "balance loss: indices is NULL (needed for ROUTED counts)");
    }
    size_t need = workspace_bytes(lc, &d);
    if (!workspace || workspace_size < need)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "balance loss: workspace of %zu bytes, %zu needed", workspace_size,
                            need);
    const int nt = dsmoe__threads(n_threads);
    /* 64-byte aligned start inside the caller's workspace (64 spare bytes reserved) */
    void *wsv = (char *)workspace + ((64u - ((uintptr_t)workspace & 63u)) & 63u);
    double *ws = (double *)wsv;
    if (is_z) return zloss(lc, &d, loss, dlogits, logits, ws, nt);

    const int64_t n_seq = d.n_seq;
    const size_t E = (size_t)d.E, per = 2 * E + (size_t)d.D + 1;
    /* Per sequence q: w (E), P (E), dev (D), loss; then flags (n_seq, 3). */
    void *flags_v = ws + per * (size_t)n_seq;
    int64_t *flags = (int64_t *)flags_v;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && n_seq > 1)
    for (int64_t q = 0; q < n_seq; q++) {
        double *base = ws + (size_t)q * per;
        int64_t bt = 0;
        int32_t be = 0;
        int bad = seq_phase1(lc, &d, scores, indices, counts, counts_T, q, base, base + E,
                             base + 2 * E, base + 2 * E + d.D, &bt, &be);
        flags[3 * q] = bad;
        flags[3 * q + 1] = bt;
        flags[3 * q + 2] = be;
    }
    double total = 0.0;
    for (int64_t q = 0; q < n_seq; q++) {
        if (flags[3 * q] != BAD_NONE) {
            long long t = (long long)flags[3 * q + 1];
            int e = (int)flags[3 * q + 2];
            if (flags[3 * q] == BAD_INDEX)
                return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                    "balance loss: indices[%lld, %d] = %d outside 0..%d", t, e,
                                    (int)indices[(size_t)t * d.K + e], d.E - 1);
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "balance loss: scores[%lld, %d] = %g is not a finite "
                                "affinity >= 0",
                                t, e, (double)scores[(size_t)t * E + e]);
        }
        total += ws[(size_t)q * per + 2 * E + d.D];
    }
    *loss = n_seq > 0 ? total / (double)n_seq : 0.0;
    if (dlogits && T > 0) {
        /* dL/ds'_{i,t} = w_i / (T_s · n_seq) for the mean over sequences. */
        const double gscale = 1.0 / ((double)d.Ts * (double)n_seq);
        const int64_t Ts = d.Ts;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
        for (int64_t t = 0; t < T; t++) {
            const double *w = ws + (size_t)(t / Ts) * per;
            token_backward(lc, rc, d.E, w, gscale, scores + (size_t)t * E, dlogits + (size_t)t * E);
        }
    }
    return DSMOE_OK;
}
