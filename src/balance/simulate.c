/*
 * simulate.c — balancing studies without a model: a synthetic router-traffic generator
 * (dsmoe_traffic) and the loop that drives several balancing strategies side by side
 * on the same traffic (dsmoe_sim), what `dsmoe simulate` runs and what training and
 * the study call.
 *
 * Each step, T tokens of router logits are routed once per strategy with that
 * strategy's bias; the per-expert counts of the router pass feed the strategy's
 * dsmoe_balancer, whose step applies the update rule (auxiliary-loss-free balancing,
 * Wang et al. 2024; DeepSeek-V3 §2.1.2). The complementary sequence-wise loss (V3
 * eqs. 17–20) of each step is reported as seq_aux; nothing is trained, so it measures
 * but does not steer.
 *
 * Synthetic traffic: expert i of domain d has a mean logit mu_{d,i} taken from a
 * Zipf-like profile −skew·ln(1 + rank), centred, over a random ranking of the experts
 * (optionally drifting to new rankings over the run); token logits are mu plus
 * approximately normal noise (sum of four uniforms, unit variance). Each sequence
 * draws one domain. Everything is deterministic from the seed, and the streams are
 * those `dsmoe simulate` has always produced (the README's figures depend on them).
 *
 * All buffers are made at creation; dsmoe_traffic_next and dsmoe_sim_step allocate
 * nothing.
 */
#include "core/internal.h"
#include "dsmoe/balance.h"
#include "io/io_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ================================================================= traffic == */

struct dsmoe_traffic {
    dsmoe_traffic_config cfg; /* seq_len resolved */
    int32_t n_perm;           /* rankings per domain: ceil(drift) + 1 */
    int64_t step;             /* steps produced */
    float *profile;           /* (E) centred −skew·ln(1 + rank) */
    int32_t *perm;            /* (n_domains, n_perm, E): rank of expert i */
    float *mu;                /* (n_domains, E) popularity of the last step */
    dsmoe_rng r;
};

void dsmoe_traffic_config_default(int32_t n_experts, dsmoe_traffic_config *cfg) {
    if (!cfg) return;
    memset(cfg, 0, sizeof *cfg);
    cfg->n_experts = n_experts;
    cfg->steps = 400;
    cfg->tokens = 2048;
    cfg->seq_len = 0;
    cfg->n_domains = 1;
    cfg->skew = 0.3;
    cfg->noise = 1.0;
    cfg->drift = 0.0;
    cfg->seed = 1;
}

#define TBAD(...) return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, __VA_ARGS__)

dsmoe_status dsmoe_traffic_config_validate(const dsmoe_traffic_config *c) {
    if (!c) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "traffic config is NULL");
    if (c->n_experts < 1 || c->n_experts > DSMOE_MAX_EXPERTS)
        TBAD("traffic n_experts = %d: must be in 1..%d", (int)c->n_experts, DSMOE_MAX_EXPERTS);
    if (c->steps < 1) TBAD("traffic steps = %lld: must be >= 1", (long long)c->steps);
    if (c->tokens < 1) TBAD("traffic tokens = %lld: must be >= 1", (long long)c->tokens);
    if (c->seq_len < 0 || c->seq_len > c->tokens)
        TBAD("traffic seq_len = %lld: must be in 0..%lld (the tokens of a step)", (long long)c->seq_len,
             (long long)c->tokens);
    if (c->seq_len > 0 && c->tokens % c->seq_len != 0)
        TBAD("traffic seq_len = %lld does not divide the %lld tokens of a step",
             (long long)c->seq_len, (long long)c->tokens);
    if (c->n_domains < 1 || c->n_domains > 1024)
        TBAD("traffic n_domains = %d: must be in 1..1024", (int)c->n_domains);
    if (!(c->skew >= 0.0 && c->skew <= 100.0)) /* NaN fails too */
        TBAD("traffic skew = %g: must be in 0..100", c->skew);
    if (!(c->noise >= 0.0 && c->noise <= 1000.0))
        TBAD("traffic noise = %g: must be in 0..1000", c->noise);
    if (!(c->drift >= 0.0 && c->drift <= 1000.0))
        TBAD("traffic drift = %g: must be in 0..1000", c->drift);
    size_t n;
    if (!dsmoe__mul_size((size_t)c->tokens, (size_t)c->n_experts, &n) ||
        !dsmoe__mul_size(n, sizeof(float), &n))
        TBAD("traffic tokens = %lld times n_experts = %d floats overflow memory",
             (long long)c->tokens, (int)c->n_experts);
    return DSMOE_OK;
}

#undef TBAD

/* Approximately standard normal: four 16-bit uniforms summed, centred, unit variance. */
static float rng_noise(dsmoe_rng *r) {
    uint64_t x = dsmoe_rng_next(r);
    uint32_t s = (uint32_t)(x & 0xffff) + (uint32_t)((x >> 16) & 0xffff) +
                 (uint32_t)((x >> 32) & 0xffff) + (uint32_t)(x >> 48);
    /* each (v + 0.5)/65536 is uniform on (0,1): mean 2, variance 4/12 */
    return (float)(((double)s + 2.0) / 65536.0 - 2.0) * 1.7320508075688772f;
}

static uint64_t rng_below(dsmoe_rng *r, uint64_t n) { return dsmoe_rng_next(r) % n; }

/* The popularity (n_domains, E) of step st (clamped to the run). */
static void traffic_mu(dsmoe_traffic *tr, int64_t st) {
    const dsmoe_traffic_config *c = &tr->cfg;
    const int32_t E = c->n_experts;
    if (st > c->steps - 1) st = c->steps - 1;
    double x = c->steps > 1 ? c->drift * (double)st / (double)(c->steps - 1) : 0.0;
    int32_t k = (int32_t)floor(x);
    if (k > tr->n_perm - 2) k = tr->n_perm - 2;
    if (k < 0) k = 0;
    double frac = tr->n_perm > 1 ? x - k : 0.0;
    for (int32_t d = 0; d < c->n_domains; d++) {
        const int32_t *a = tr->perm + ((size_t)d * (size_t)tr->n_perm + (size_t)k) * (size_t)E;
        const int32_t *b = tr->n_perm > 1 ? a + E : a;
        for (int32_t i = 0; i < E; i++)
            tr->mu[(size_t)d * (size_t)E + (size_t)i] =
                (float)((1.0 - frac) * tr->profile[a[i]] + frac * tr->profile[b[i]]);
    }
}

dsmoe_status dsmoe_traffic_create(const dsmoe_traffic_config *cfg, dsmoe_traffic **out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "traffic: out is NULL");
    *out = NULL;
    dsmoe_status st = dsmoe_traffic_config_validate(cfg);
    if (st != DSMOE_OK) return st;
    dsmoe_traffic *tr = (dsmoe_traffic *)calloc(1, sizeof *tr);
    if (!tr) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "traffic: out of memory");
    tr->cfg = *cfg;
    if (tr->cfg.seq_len == 0) tr->cfg.seq_len = tr->cfg.tokens % 512 == 0 ? 512 : tr->cfg.tokens;
    const size_t E = (size_t)cfg->n_experts, D = (size_t)cfg->n_domains;
    tr->n_perm = (int32_t)ceil(cfg->drift) + 1;
    tr->profile = (float *)malloc(sizeof(float) * E);
    tr->perm = (int32_t *)calloc(E * D * (size_t)tr->n_perm, sizeof(int32_t));
    tr->mu = (float *)malloc(sizeof(float) * E * D);
    if (!tr->profile || !tr->perm || !tr->mu) {
        dsmoe_traffic_free(tr);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY,
                            "traffic: out of memory for %zu experts x %zu domains x %d rankings", E,
                            D, (int)(cfg->drift + 1.0));
    }
    tr->r.state = cfg->seed * 0x2545f4914f6cdd1dull + 0x5ead;
    double mean = 0.0;
    for (size_t r = 0; r < E; r++) mean += -cfg->skew * log(1.0 + (double)r);
    mean /= (double)E;
    for (size_t r = 0; r < E; r++)
        tr->profile[r] = (float)(-cfg->skew * log(1.0 + (double)r) - mean);
    for (size_t p = 0; p < D * (size_t)tr->n_perm; p++) {
        int32_t *pm = tr->perm + p * E;
        for (size_t i = 0; i < E; i++) pm[i] = (int32_t)i;
        for (size_t i = E - 1; i > 0; i--) { /* Fisher-Yates */
            size_t j = (size_t)rng_below(&tr->r, (uint64_t)i + 1);
            int32_t t = pm[i];
            pm[i] = pm[j];
            pm[j] = t;
        }
    }
    traffic_mu(tr, 0);
    *out = tr;
    return DSMOE_OK;
}

void dsmoe_traffic_free(dsmoe_traffic *tr) {
    if (!tr) return;
    free(tr->profile);
    free(tr->perm);
    free(tr->mu);
    free(tr);
}

const dsmoe_traffic_config *dsmoe_traffic_get_config(const dsmoe_traffic *tr) {
    return tr ? &tr->cfg : NULL;
}

int64_t dsmoe_traffic_step_index(const dsmoe_traffic *tr) { return tr ? tr->step : 0; }

const float *dsmoe_traffic_popularity(const dsmoe_traffic *tr, int32_t domain) {
    if (!tr || domain < 0 || domain >= tr->cfg.n_domains) return NULL;
    return tr->mu + (size_t)domain * (size_t)tr->cfg.n_experts;
}

dsmoe_status dsmoe_traffic_next(dsmoe_traffic *tr, float *logits, int32_t *domains) {
    if (!tr || !logits)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "traffic next: %s is NULL",
                            !tr ? "traffic" : "logits");
    const dsmoe_traffic_config *c = &tr->cfg;
    const size_t E = (size_t)c->n_experts;
    traffic_mu(tr, tr->step);
    const float noise = (float)c->noise;
    for (int64_t s0 = 0; s0 < c->tokens; s0 += c->seq_len) {
        int32_t d = c->n_domains > 1 ? (int32_t)rng_below(&tr->r, (uint64_t)c->n_domains) : 0;
        const float *mu = tr->mu + (size_t)d * E;
        for (int64_t t = s0; t < s0 + c->seq_len; t++) {
            float *u = logits + (size_t)t * E;
            for (size_t i = 0; i < E; i++) u[i] = mu[i] + noise * rng_noise(&tr->r);
            if (domains) domains[t] = d;
        }
    }
    tr->step++;
    return DSMOE_OK;
}

/* ============================================================== strategies == */

dsmoe_status dsmoe_sim_strategy_parse(const char *spec, int32_t n_experts, float gamma,
                                      dsmoe_sim_strategy *s) {
    if (!spec || !s)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "strategy parse: %s is NULL",
                            !spec ? "spec" : "output");
    const size_t len = strlen(spec);
    if (len >= sizeof s->name)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "strategy '%.16s...': longer than %d bytes",
                            spec, (int)sizeof s->name - 1);
    const char *colon = strchr(spec, ':');
    const size_t n = colon ? (size_t)(colon - spec) : len;
    dsmoe_sim_strategy r;
    memset(&r, 0, sizeof r);
    memcpy(r.name, spec, len + 1);
    dsmoe_balancer_config_default(n_experts, &r.balancer);
    r.balancer.gamma = gamma;
#define IS(word) (n == strlen(word) && strncmp(spec, word, n) == 0)
    if (IS("none")) {
        if (colon)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "strategy '%s': 'none' takes no rate",
                                spec);
        r.balance = 0;
        r.balancer.gamma = 0.0f;
        *s = r;
        return DSMOE_OK;
    }
    if (IS("sign")) {
        r.balancer.rule = DSMOE_BALANCE_RULE_SIGN;
    } else if (IS("proportional") || IS("prop")) {
        r.balancer.rule = DSMOE_BALANCE_RULE_PROPORTIONAL;
    } else {
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "strategy '%s': unknown (none, sign[:GAMMA], proportional[:GAMMA])",
                            spec);
    }
#undef IS
    r.balance = 1;
    if (colon) {
        char *end;
        double g = strtod(colon + 1, &end);
        if (colon[1] == '\0' || *end != '\0' || !isfinite(g) || g < 0.0 || g > 3.0e38)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "strategy '%s': the rate must be a number >= 0", spec);
        r.balancer.gamma = (float)g;
    }
    *s = r;
    return DSMOE_OK;
}

/* ============================================================== simulation == */

typedef struct sim_strategy_state {
    dsmoe_balancer *bal;
    int64_t *counts;      /* (E) this step */
    int64_t *run_counts;  /* (E) */
    int64_t *last_counts; /* (E) over the last window */
    dsmoe_load_stats stats;
    double gpt, seq_aux;
    double last_maxvio_sum, last_seq_aux_sum, last_gpt_sum;
    int64_t last_n;
    int64_t first_below;
} sim_strategy_state;

struct dsmoe_sim {
    dsmoe_sim_config cfg;
    int64_t steps_done;
    int64_t last_from; /* first step of the last window */
    sim_strategy_state st[DSMOE_SIM_MAX_STRATEGIES];
    int32_t *indices;  /* (T, K) */
    float *weights;    /* (T, K) */
    float *scores;     /* (T, E) */
    float *scratch;    /* (E) */
    void *rws, *lws;
    size_t rws_size, lws_size;
    dsmoe_balance_loss_config lc;
    /* trace */
    int trace_open;
    dsmoe__atomic_file trace;
    char *trace_path;
    char *line;        /* one trace line */
    size_t line_cap;
};

void dsmoe_sim_config_default(const dsmoe_router_config *router, dsmoe_sim_config *cfg) {
    if (!cfg) return;
    memset(cfg, 0, sizeof *cfg);
    if (router) cfg->router = *router;
    cfg->router.use_bias = 1;
    cfg->tokens = 2048;
    cfg->steps = 400;
    cfg->last_fraction = 0.2;
    cfg->threshold = 0.5;
    cfg->alpha = 1e-4f;
    cfg->seq_len = 512;
    cfg->seq_count = DSMOE_BALANCE_COUNT_ROUTED;
    cfg->n_threads = 1;
    const char *names[3] = {"none", "sign", "proportional"};
    cfg->n_strategies = 3;
    for (int i = 0; i < 3; i++)
        (void)dsmoe_sim_strategy_parse(names[i], cfg->router.n_experts, 0.001f,
                                       &cfg->strategies[i]);
}

#define SBAD(...) return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, __VA_ARGS__)

static int name_ok(const char *name, size_t cap) {
    size_t n = strnlen(name, cap);
    if (n == 0 || n == cap) return 0;
    for (size_t i = 0; i < n; i++)
        if (name[i] < 0x20 || name[i] > 0x7e || name[i] == '"' || name[i] == '\\') return 0;
    return 1;
}

dsmoe_status dsmoe_sim_config_validate(const dsmoe_sim_config *c) {
    if (!c) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "simulation config is NULL");
    dsmoe_status s = dsmoe_router_config_validate(&c->router);
    if (s != DSMOE_OK) return dsmoe__error_prefix(s, "router");
    if (c->router.use_bias != 1)
        SBAD("router: use_bias = %d: a simulation routes with each strategy's bias (1)",
             (int)c->router.use_bias);
    const int32_t E = c->router.n_experts;
    size_t n;
    if (c->tokens < 1) SBAD("tokens = %lld: must be >= 1", (long long)c->tokens);
    if (!dsmoe__mul_size((size_t)c->tokens, (size_t)E, &n) || !dsmoe__mul_size(n, sizeof(float), &n))
        SBAD("tokens = %lld times n_experts = %d floats overflow memory", (long long)c->tokens,
             (int)E);
    if (c->steps < 1) SBAD("steps = %lld: must be >= 1", (long long)c->steps);
    if (!(c->last_fraction > 0.0 && c->last_fraction <= 1.0))
        SBAD("last_fraction = %g: must be in (0, 1]", c->last_fraction);
    if (!(c->threshold >= 0.0) || !isfinite(c->threshold))
        SBAD("threshold = %g: must be finite and >= 0", c->threshold);
    if (!isfinite(c->alpha) || c->alpha < 0.0f)
        SBAD("alpha = %g: must be finite and >= 0", (double)c->alpha);
    if (c->seq_len < 1 || c->seq_len > c->tokens)
        SBAD("seq_len = %lld: must be in 1..%lld (the tokens of a step)", (long long)c->seq_len,
             (long long)c->tokens);
    if (c->tokens % c->seq_len != 0)
        SBAD("seq_len = %lld does not divide the %lld tokens of a step", (long long)c->seq_len,
             (long long)c->tokens);
    if (c->seq_count != DSMOE_BALANCE_COUNT_ROUTED && c->seq_count != DSMOE_BALANCE_COUNT_TOPK)
        SBAD("seq_count = %d: must be ROUTED (0) or TOPK (1)", (int)c->seq_count);
    if (c->n_strategies < 1 || c->n_strategies > DSMOE_SIM_MAX_STRATEGIES)
        SBAD("n_strategies = %d: must be in 1..%d", (int)c->n_strategies,
             DSMOE_SIM_MAX_STRATEGIES);
    for (int32_t i = 0; i < c->n_strategies; i++) {
        const dsmoe_sim_strategy *g = &c->strategies[i];
        if (!name_ok(g->name, sizeof g->name))
            SBAD("strategies[%d].name: must be 1..%d printable ASCII characters without '\"' or "
                 "'\\'",
                 (int)i, (int)sizeof g->name - 1);
        if (g->balance != 0 && g->balance != 1)
            SBAD("strategies[%d] (%s): balance = %d: must be 0 or 1", (int)i, g->name,
                 (int)g->balance);
        if (g->balance) {
            s = dsmoe_balancer_config_validate(&g->balancer);
            if (s != DSMOE_OK) {
                char pre[96];
                snprintf(pre, sizeof pre, "strategies[%d] (%s)", (int)i, g->name);
                return dsmoe__error_prefix(s, pre);
            }
            if (g->balancer.n_experts != E)
                SBAD("strategies[%d] (%s): balancer n_experts = %d: must equal the router's "
                     "n_experts = %d",
                     (int)i, g->name, (int)g->balancer.n_experts, (int)E);
        }
    }
    return DSMOE_OK;
}

#undef SBAD

void dsmoe_sim_free(dsmoe_sim *sim) {
    if (!sim) return;
    if (sim->trace_open) dsmoe__atomic_abort(&sim->trace);
    free(sim->trace_path);
    for (int i = 0; i < DSMOE_SIM_MAX_STRATEGIES; i++) {
        dsmoe_balancer_free(sim->st[i].bal);
        free(sim->st[i].counts);
        free(sim->st[i].run_counts);
        free(sim->st[i].last_counts);
    }
    free(sim->indices);
    free(sim->weights);
    free(sim->scores);
    free(sim->scratch);
    free(sim->line);
    dsmoe_free(sim->rws);
    dsmoe_free(sim->lws);
    free(sim);
}

dsmoe_status dsmoe_sim_create(const dsmoe_sim_config *cfg, dsmoe_sim **out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "simulation: out is NULL");
    *out = NULL;
    dsmoe_status s = dsmoe_sim_config_validate(cfg);
    if (s != DSMOE_OK) return s;
    dsmoe_sim *sim = (dsmoe_sim *)calloc(1, sizeof *sim);
    if (!sim) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "simulation: out of memory");
    sim->cfg = *cfg;
    const dsmoe_router_config *rc = &sim->cfg.router;
    const size_t E = (size_t)rc->n_experts, K = (size_t)rc->top_k, T = (size_t)cfg->tokens;
    int64_t last_n = (int64_t)ceil(cfg->last_fraction * (double)cfg->steps);
    sim->last_from = cfg->steps - last_n;
    if (sim->last_from < 0) sim->last_from = 0;
    if (sim->last_from >= cfg->steps) sim->last_from = cfg->steps - 1;

    sim->indices = (int32_t *)malloc(sizeof(int32_t) * T * K);
    sim->weights = (float *)malloc(sizeof(float) * T * K);
    sim->scores = (float *)malloc(sizeof(float) * T * E);
    sim->scratch = (float *)malloc(sizeof(float) * E);
    sim->rws_size = dsmoe_router_workspace_size(rc, cfg->tokens, 0, DSMOE_DTYPE_F32, cfg->n_threads);
    sim->rws = dsmoe_malloc(sim->rws_size ? sim->rws_size : 64);
    dsmoe_balance_loss_config_default(DSMOE_BALANCE_LOSS_SEQ, &sim->lc);
    sim->lc.alpha = cfg->alpha;
    sim->lc.seq_len = cfg->seq_len;
    sim->lc.count_from = cfg->seq_count;
    sim->lws_size = dsmoe_balance_loss_workspace_size(&sim->lc, rc, cfg->tokens);
    sim->lws = dsmoe_malloc(sim->lws_size ? sim->lws_size : 64);
    /* a trace line: fixed keys and the name, then E counts and E bias values */
    sim->line_cap = 512 + sizeof cfg->strategies[0].name + E * 48;
    sim->line = (char *)malloc(sim->line_cap);
    int ok = sim->indices && sim->weights && sim->scores && sim->scratch && sim->rws &&
             sim->lws && sim->line;
    for (int32_t i = 0; ok && i < cfg->n_strategies; i++) {
        sim_strategy_state *g = &sim->st[i];
        const dsmoe_sim_strategy *gs = &cfg->strategies[i];
        dsmoe_balancer_config bc = gs->balancer;
        if (!gs->balance) {
            dsmoe_balancer_config_default(rc->n_experts, &bc);
            bc.gamma = 0.0f;
        }
        s = dsmoe_balancer_create(&bc, &g->bal);
        if (s != DSMOE_OK) {
            dsmoe_sim_free(sim);
            return s;
        }
        g->counts = (int64_t *)calloc(E, sizeof(int64_t));
        g->run_counts = (int64_t *)calloc(E, sizeof(int64_t));
        g->last_counts = (int64_t *)calloc(E, sizeof(int64_t));
        g->first_below = -1;
        ok = g->counts && g->run_counts && g->last_counts;
    }
    if (!ok) {
        dsmoe_sim_free(sim);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY,
                            "simulation: out of memory for %zu tokens x %zu experts per step", T, E);
    }
    *out = sim;
    return DSMOE_OK;
}

const dsmoe_sim_config *dsmoe_sim_get_config(const dsmoe_sim *sim) {
    return sim ? &sim->cfg : NULL;
}

int64_t dsmoe_sim_steps(const dsmoe_sim *sim) { return sim ? sim->steps_done : 0; }

const dsmoe_balancer *dsmoe_sim_balancer(const dsmoe_sim *sim, int32_t s) {
    if (!sim || s < 0 || s >= sim->cfg.n_strategies) return NULL;
    return sim->st[s].bal;
}

dsmoe_status dsmoe_sim_set_bias(dsmoe_sim *sim, const float *bias) {
    if (!sim || !bias)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "simulation set_bias: %s is NULL",
                            !sim ? "simulation" : "bias");
    if (sim->steps_done > 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "simulation set_bias: only before the first step (%lld run)",
                            (long long)sim->steps_done);
    for (int32_t i = 0; i < sim->cfg.router.n_experts; i++)
        if (!isfinite(bias[i]))
            return dsmoe__error(DSMOE_STATUS_NON_FINITE, "simulation set_bias: bias[%d] = %g",
                                (int)i, (double)bias[i]);
    for (int32_t s = 0; s < sim->cfg.n_strategies; s++) {
        dsmoe_status st = dsmoe_balancer_set_bias(sim->st[s].bal, bias);
        if (st != DSMOE_OK) return st;
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_sim_trace_open(dsmoe_sim *sim, const char *path) {
    if (!sim || !path)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "simulation trace: %s is NULL",
                            !sim ? "simulation" : "path");
    if (sim->trace_open)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "simulation trace: already open");
    if (sim->steps_done > 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "simulation trace: only before the first step (%lld run)",
                            (long long)sim->steps_done);
    size_t n = strlen(path) + 1;
    free(sim->trace_path);
    sim->trace_path = (char *)malloc(n);
    if (!sim->trace_path) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "'%s': out of memory", path);
    memcpy(sim->trace_path, path, n);
    dsmoe_status s = dsmoe__atomic_open(&sim->trace, sim->trace_path);
    if (s != DSMOE_OK) return s;
    sim->trace_open = 1;
    return DSMOE_OK;
}

dsmoe_status dsmoe_sim_trace_finish(dsmoe_sim *sim) {
    if (!sim) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "simulation trace: NULL");
    if (!sim->trace_open) return DSMOE_OK;
    sim->trace_open = 0;
    return dsmoe__atomic_commit(&sim->trace);
}

/* Appends "x0,x1,...]" formats; returns the new length. The buffer was sized at
 * creation for E numbers of at most 24 characters each. */
static size_t put_i64s(char *p, size_t at, size_t cap, const int64_t *v, size_t n) {
    for (size_t i = 0; i < n; i++)
        at += (size_t)snprintf(p + at, cap - at, "%s%lld", i ? "," : "", (long long)v[i]);
    at += (size_t)snprintf(p + at, cap - at, "]");
    return at;
}
static size_t put_f32s(char *p, size_t at, size_t cap, const float *v, size_t n) {
    for (size_t i = 0; i < n; i++)
        at += (size_t)snprintf(p + at, cap - at, "%s%.9g", i ? "," : "", (double)v[i]);
    at += (size_t)snprintf(p + at, cap - at, "]");
    return at;
}

static dsmoe_status trace_line(dsmoe_sim *sim, int32_t s) {
    const sim_strategy_state *g = &sim->st[s];
    const size_t E = (size_t)sim->cfg.router.n_experts, cap = sim->line_cap;
    char *p = sim->line;
    dsmoe_balancer_info info;
    dsmoe_balancer_get_info(g->bal, &info);
    size_t at = (size_t)snprintf(
        p, cap, "{\"step\":%lld,\"strategy\":\"%s\",\"gamma\":%.6g,\"tokens\":%lld,\"counts\":[",
        (long long)sim->steps_done, sim->cfg.strategies[s].name, (double)info.last_gamma,
        (long long)sim->cfg.tokens);
    at = put_i64s(p, at, cap, g->counts, E);
    at += (size_t)snprintf(p + at, cap - at,
                           ",\"maxvio_batch\":%.9g,\"cv\":%.9g,\"entropy\":%.9g,\"dead\":%d,"
                           "\"group_maxvio\":%.9g,\"groups_per_token\":%.9g,\"seq_aux\":%.9g,"
                           "\"bias\":[",
                           g->stats.maxvio, g->stats.cv, g->stats.entropy, (int)g->stats.dead,
                           g->stats.group_maxvio, g->gpt, g->seq_aux);
    at = put_f32s(p, at, cap, dsmoe_balancer_bias(g->bal), E);
    at += (size_t)snprintf(p + at, cap - at, "}\n");
    if (at >= cap) /* cannot happen with the sizing above; never write a cut line */
        return dsmoe__error(DSMOE_STATUS_INTERNAL, "simulation trace: line of %zu bytes", at);
    return dsmoe__atomic_write(&sim->trace, p, at);
}

dsmoe_status dsmoe_sim_step(dsmoe_sim *sim, const float *logits) {
    if (!sim || !logits)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "simulation step: %s is NULL",
                            !sim ? "simulation" : "logits");
    const dsmoe_sim_config *c = &sim->cfg;
    const dsmoe_router_config *rc = &c->router;
    const int32_t E = rc->n_experts, K = rc->top_k;
    const int64_t T = c->tokens, step = sim->steps_done;
    const int in_last = step >= sim->last_from;
    for (int32_t s = 0; s < c->n_strategies; s++) {
        sim_strategy_state *g = &sim->st[s];
        dsmoe_router_output out = {sim->indices, sim->weights, sim->scores, NULL, g->counts};
        dsmoe_status st = dsmoe_router_forward(rc, &out, logits, dsmoe_balancer_bias(g->bal), T,
                                               sim->rws, sim->rws_size, c->n_threads);
        if (st != DSMOE_OK) {
            char pre[128];
            snprintf(pre, sizeof pre, "step %lld, %s: routing", (long long)step,
                     c->strategies[s].name);
            return dsmoe__error_prefix(st, pre);
        }
        st = dsmoe_balance_loss(&sim->lc, rc, &g->seq_aux, NULL, sim->scores, sim->indices, NULL,
                                T, sim->lws, sim->lws_size, c->n_threads);
        if (st == DSMOE_OK)
            st = dsmoe_load_groups_per_token(&g->gpt, sim->indices, NULL, T, K, E, rc->n_groups);
        if (st == DSMOE_OK) st = dsmoe_balancer_accumulate_counts(g->bal, g->counts, T);
        if (st == DSMOE_OK) st = dsmoe_balancer_step(g->bal);
        if (st == DSMOE_OK) st = dsmoe_load_stats_compute(g->counts, E, rc->n_groups, &g->stats);
        if (st != DSMOE_OK) {
            char pre[128];
            snprintf(pre, sizeof pre, "step %lld, %s: balancing", (long long)step,
                     c->strategies[s].name);
            return dsmoe__error_prefix(st, pre);
        }
        for (int32_t i = 0; i < E; i++) g->run_counts[i] += g->counts[i];
        if (in_last) {
            for (int32_t i = 0; i < E; i++) g->last_counts[i] += g->counts[i];
            g->last_maxvio_sum += g->stats.maxvio;
            g->last_seq_aux_sum += g->seq_aux;
            g->last_gpt_sum += g->gpt;
            g->last_n++;
        }
        if (g->first_below < 0 && g->stats.maxvio < c->threshold) g->first_below = step;
        if (sim->trace_open) {
            st = trace_line(sim, s);
            if (st != DSMOE_OK) {
                dsmoe__atomic_abort(&sim->trace);
                sim->trace_open = 0;
                return st;
            }
        }
    }
    sim->steps_done++;
    return DSMOE_OK;
}

dsmoe_status dsmoe_sim_get_record(const dsmoe_sim *sim, int32_t s, dsmoe_sim_record *out) {
    if (!sim || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "simulation record: %s is NULL",
                            !sim ? "simulation" : "output");
    if (s < 0 || s >= sim->cfg.n_strategies)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "simulation record: strategy %d outside 0..%d", (int)s,
                            (int)sim->cfg.n_strategies - 1);
    if (sim->steps_done == 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "simulation record: no step run yet");
    const sim_strategy_state *g = &sim->st[s];
    dsmoe_balancer_info info;
    dsmoe_balancer_get_info(g->bal, &info);
    memset(out, 0, sizeof *out);
    out->step = sim->steps_done - 1;
    out->tokens = sim->cfg.tokens;
    out->gamma = info.last_gamma;
    out->counts = g->counts;
    out->stats = g->stats;
    out->groups_per_token = g->gpt;
    out->seq_aux = g->seq_aux;
    out->bias = dsmoe_balancer_bias(g->bal);
    return DSMOE_OK;
}

dsmoe_status dsmoe_sim_get_summary(const dsmoe_sim *sim, int32_t s, dsmoe_sim_summary *out) {
    if (!sim || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "simulation summary: %s is NULL",
                            !sim ? "simulation" : "output");
    if (s < 0 || s >= sim->cfg.n_strategies)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "simulation summary: strategy %d outside 0..%d", (int)s,
                            (int)sim->cfg.n_strategies - 1);
    const sim_strategy_state *g = &sim->st[s];
    const int32_t E = sim->cfg.router.n_experts, G = sim->cfg.router.n_groups;
    dsmoe_sim_summary r;
    memset(&r, 0, sizeof r);
    r.steps = sim->steps_done;
    r.last_steps = g->last_n;
    r.first_step_below = g->first_below;
    r.run_counts = g->run_counts;
    dsmoe_status st = dsmoe_load_stats_compute(g->run_counts, E, G, &r.run);
    if (st == DSMOE_OK) st = dsmoe_load_stats_compute(g->last_counts, E, G, &r.last);
    if (st != DSMOE_OK) return st;
    if (g->last_n > 0) {
        r.maxvio_batch_last_mean = g->last_maxvio_sum / (double)g->last_n;
        r.seq_aux_last_mean = g->last_seq_aux_sum / (double)g->last_n;
        r.groups_per_token_last_mean = g->last_gpt_sum / (double)g->last_n;
    }
    const float *b = dsmoe_balancer_bias(g->bal);
    float lo = b[0], hi = b[0];
    for (int32_t i = 1; i < E; i++) {
        if (b[i] < lo) lo = b[i];
        if (b[i] > hi) hi = b[i];
    }
    r.bias_spread = (double)hi - (double)lo;
    const dsmoe_sim_strategy *gs = &sim->cfg.strategies[s];
    const float gamma = gs->balance ? gs->balancer.gamma : 0.0f;
    st = dsmoe_bias_bf16_check(b, E, gamma, &r.bf16);
    if (st != DSMOE_OK) return st;
    memcpy(sim->scratch, b, sizeof(float) * (size_t)E);
    dsmoe_bias_center(sim->scratch, E);
    st = dsmoe_bias_bf16_check(sim->scratch, E, gamma, &r.bf16_centred);
    if (st != DSMOE_OK) return st;
    *out = r;
    return DSMOE_OK;
}
