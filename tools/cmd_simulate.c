/*
 * cmd_simulate.c — `dsmoe simulate`: study load balancing without training a model.
 *
 * Each step, T tokens of router logits (synthetic, or replayed from a recording) are
 * routed once per strategy with that strategy's bias; the per-expert counts of the
 * router pass feed the strategy's dsmoe_balancer, whose step applies the update rule
 * (auxiliary-loss-free balancing, Wang et al. 2024; DeepSeek-V3 §2.1.2). The same
 * traffic drives every strategy, so they compare side by side. The complementary
 * sequence-wise loss (V3 eqs. 17–20) of each step is reported as seq_aux; nothing is
 * trained, so it measures but does not steer.
 *
 * Synthetic traffic: expert i of domain d has a mean logit mu_{d,i} taken from a
 * Zipf-like profile -skew*ln(1 + rank), centred, over a random ranking of the experts
 * (optionally drifting to new rankings over the run); token logits are mu plus
 * approximately normal noise (sum of four uniforms, unit variance). Each sequence
 * draws one domain. Everything is deterministic from --seed.
 */
#include "cli.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const simulate_usage =
    "usage: dsmoe simulate [options] [router options]\n"
    "\n"
    "Drives the router and auxiliary-loss-free bias balancers with synthetic or recorded\n"
    "router traffic, one training step per batch, and reports the expert load over time.\n"
    "With no options: skewed synthetic traffic (like a freshly initialised router) on the\n"
    "deepseek-v3 preset, comparing no balancing, the sign rule and the proportional rule.\n"
    "\n"
    "traffic:\n"
    "  --logits S.npy         replay recorded router logits (steps, T, E) float32, one step per\n"
    "                         slice ((T, E) is one step)\n"
    "  --steps N              synthetic steps (default 400)\n"
    "  --tokens T             synthetic tokens per step (default 2048)\n"
    "  --skew S               Zipf-like popularity: mean logit -S*ln(1 + rank), centred\n"
    "                         (default 0.3; 0 = no preferred experts)\n"
    "  --noise X              per-token logit noise, standard deviation (default 1)\n"
    "  --drift R              the popularity ranking moves to a new random ranking R times\n"
    "                         over the run, smoothly (default 0)\n"
    "  --domains N            mixture of N domains with their own rankings; each sequence is\n"
    "                         drawn from one (default 1)\n"
    "  --seed S               seed of the synthetic traffic (default 1)\n"
    "balancing:\n"
    "  --compare LIST         strategies run side by side on the same traffic, comma-separated:\n"
    "                         none, sign[:GAMMA], proportional[:GAMMA]\n"
    "                         (default none,sign,proportional)\n"
    "  --rule sign|proportional   run this one rule (instead of --compare)\n"
    "  --gamma G              update rate of strategies without their own (default 0.001)\n"
    "  --gamma-until N        switch to --gamma-after once N tokens have been applied\n"
    "  --gamma-after G        the rate after --gamma-until (default 0)\n"
    "  --recenter             re-centre every update to zero mean\n"
    "  --bias0 B.npy          initial bias (E) float32 of every strategy (default 0;\n"
    "                         the router flag --bias B.npy means the same here)\n"
    "  --alpha A              sequence-wise balance loss coefficient for seq_aux (default 1e-4)\n"
    "  --seq-len N            tokens per sequence (divides T; default 512 for synthetic\n"
    "                         traffic when it divides T, else T)\n"
    "  --seq-count routed|topk    seq_aux counts from the routed choice (default) or the\n"
    "                         plain top-K of the scores\n"
    "output:\n"
    "  --trace T.jsonl        one JSON line per step and strategy: step, strategy, gamma,\n"
    "                         tokens, counts, maxvio_batch, cv, entropy, dead,\n"
    "                         group_maxvio, groups_per_token, seq_aux, bias (after the update)\n"
    "  --json                 print the summary as JSON instead of the table\n"
    "  --threshold X          report the first step whose MaxVio_batch is below X (default 0.5)\n"
    "  --last F               fraction of final steps for the 'last' figures (default 0.2)\n"
    "  --threads N            threads (default 1: a step's batch is small; results are\n"
    "                         identical for any N)\n"
    "  --quiet                no progress line (it is shown only on a terminal anyway)\n"
    "  --help                 this text\n"
    "\n"
    "The router always routes with the strategy's bias (presets without a bias get one).\n"
    "MaxVio = (max load - mean load) / mean load. Summary: MaxVio of the counts summed over\n"
    "the run and over the last steps, the mean of the per-step MaxVio_batch over the last\n"
    "steps, the first step (from 0) below --threshold, max - min of the final bias, the\n"
    "mean seq_aux over the last steps, and what storing the final bias in bf16 would do.\n"
    "\n";

#define MAX_STRATEGIES 8

typedef struct strategy {
    char label[64];
    int none;
    dsmoe_balance_rule rule;
    double gamma;
    dsmoe_balancer *bal;
    int64_t *run_counts;  /* (E) */
    int64_t *last_counts; /* (E) summed over the last steps */
    double last_maxvio_sum, last_seq_aux_sum;
    int64_t first_below;  /* step index, -1 never */
    dsmoe_load_stats final_run, final_last;
    double maxvio_batch_last_mean, seq_aux_last_mean, bias_spread, gpt_sum;
    dsmoe_bias_bf16_report bf16, bf16_centred; /* storing the final bias in bf16 */
} strategy;

/* ------------------------------------------------------------ traffic -- */

/* Approximately standard normal: four 16-bit uniforms summed, centred, unit variance. */
static float rng_noise(dsmoe_rng *r) {
    uint64_t x = dsmoe_rng_next(r);
    uint32_t s = (uint32_t)(x & 0xffff) + (uint32_t)((x >> 16) & 0xffff) +
                 (uint32_t)((x >> 32) & 0xffff) + (uint32_t)(x >> 48);
    /* each (v + 0.5)/65536 is uniform on (0,1): mean 2, variance 4/12 */
    return (float)(((double)s + 2.0) / 65536.0 - 2.0) * 1.7320508075688772f;
}
static uint64_t rng_below(dsmoe_rng *r, uint64_t n) { return dsmoe_rng_next(r) % n; }

typedef struct traffic {
    int32_t E, n_domains, n_perm;
    double skew, noise, drift;
    int64_t steps, T, seq_len;
    float *profile; /* (E) centred -skew*ln(1 + rank) */
    int32_t *perm;  /* (n_domains, n_perm, E): rank of expert i */
    float *mu;      /* (n_domains, E) popularity at the current step */
    dsmoe_rng r;
} traffic;

static int traffic_init(traffic *tr) {
    const int32_t E = tr->E;
    tr->n_perm = (int32_t)ceil(tr->drift) + 1;
    tr->profile = malloc(sizeof(float) * (size_t)E);
    tr->perm = calloc((size_t)E * (size_t)tr->n_domains * (size_t)tr->n_perm, sizeof(int32_t));
    tr->mu = malloc(sizeof(float) * (size_t)E * (size_t)tr->n_domains);
    if (!tr->profile || !tr->perm || !tr->mu) return 0;
    double mean = 0.0;
    for (int32_t r = 0; r < E; r++) mean += -tr->skew * log(1.0 + r);
    mean /= E;
    for (int32_t r = 0; r < E; r++) tr->profile[r] = (float)(-tr->skew * log(1.0 + r) - mean);
    for (int32_t p = 0; p < tr->n_domains * tr->n_perm; p++) {
        int32_t *pm = tr->perm + (size_t)p * E;
        for (int32_t i = 0; i < E; i++) pm[i] = i;
        for (int32_t i = E - 1; i > 0; i--) { /* Fisher-Yates */
            int32_t j = (int32_t)rng_below(&tr->r, (uint64_t)i + 1);
            int32_t t = pm[i];
            pm[i] = pm[j];
            pm[j] = t;
        }
    }
    return 1;
}

static void traffic_free(traffic *tr) {
    free(tr->profile);
    free(tr->perm);
    free(tr->mu);
}

/* Fills logits (T, E) of step `st`. */
static void traffic_step(traffic *tr, int64_t st, float *logits) {
    const int32_t E = tr->E;
    double x = tr->steps > 1 ? tr->drift * (double)st / (double)(tr->steps - 1) : 0.0;
    int32_t k = (int32_t)floor(x);
    if (k > tr->n_perm - 2) k = tr->n_perm - 2;
    if (k < 0) k = 0;
    double frac = tr->n_perm > 1 ? x - k : 0.0;
    for (int32_t d = 0; d < tr->n_domains; d++) {
        const int32_t *a = tr->perm + ((size_t)d * tr->n_perm + (size_t)k) * E;
        const int32_t *b = tr->n_perm > 1 ? a + E : a;
        for (int32_t i = 0; i < E; i++)
            tr->mu[(size_t)d * E + i] =
                (float)((1.0 - frac) * tr->profile[a[i]] + frac * tr->profile[b[i]]);
    }
    const float noise = (float)tr->noise;
    for (int64_t s0 = 0; s0 < tr->T; s0 += tr->seq_len) {
        int32_t d = tr->n_domains > 1 ? (int32_t)rng_below(&tr->r, (uint64_t)tr->n_domains) : 0;
        const float *mu = tr->mu + (size_t)d * E;
        for (int64_t t = s0; t < s0 + tr->seq_len; t++) {
            float *u = logits + (size_t)t * E;
            for (int32_t i = 0; i < E; i++) u[i] = mu[i] + noise * rng_noise(&tr->r);
        }
    }
}

/* ----------------------------------------------------------- strategies -- */

static int parse_strategy(const char *cmd, const char *spec, double gamma_default,
                          strategy *s) {
    memset(s, 0, sizeof *s);
    snprintf(s->label, sizeof s->label, "%s", spec);
    char name[32];
    const char *colon = strchr(spec, ':');
    size_t n = colon ? (size_t)(colon - spec) : strlen(spec);
    if (n == 0 || n >= sizeof name) {
        cli_fail(CLI_USAGE, cmd, "--compare: bad strategy '%s' (none, sign[:G], proportional[:G])", spec);
        return -1;
    }
    memcpy(name, spec, n);
    name[n] = '\0';
    s->gamma = gamma_default;
    if (strcmp(name, "none") == 0) {
        s->none = 1;
        s->gamma = 0.0;
        if (colon) {
            cli_fail(CLI_USAGE, cmd, "--compare: 'none' takes no rate ('%s')", spec);
            return -1;
        }
        return 0;
    }
    if (strcmp(name, "sign") == 0) {
        s->rule = DSMOE_BALANCE_RULE_SIGN;
    } else if (strcmp(name, "proportional") == 0 || strcmp(name, "prop") == 0) {
        s->rule = DSMOE_BALANCE_RULE_PROPORTIONAL;
    } else {
        cli_fail(CLI_USAGE, cmd, "--compare: unknown strategy '%s' (none, sign[:G], proportional[:G])",
                 name);
        return -1;
    }
    if (colon) {
        double g;
        if (!cli_parse_float(colon + 1, &g) || g < 0) {
            cli_fail(CLI_USAGE, cmd, "--compare: '%s': the rate must be a number >= 0", spec);
            return -1;
        }
        s->gamma = g;
    }
    return 0;
}

static void print_json_array_i64(FILE *f, const int64_t *v, int32_t n) {
    fputc('[', f);
    for (int32_t i = 0; i < n; i++) fprintf(f, "%s%lld", i ? "," : "", (long long)v[i]);
    fputc(']', f);
}

static void print_json_array_f32(FILE *f, const float *v, int32_t n) {
    fputc('[', f);
    for (int32_t i = 0; i < n; i++) fprintf(f, "%s%.9g", i ? "," : "", (double)v[i]);
    fputc(']', f);
}

static void fmt_num(char *buf, size_t n, double v) {
    if (v != 0.0 && (fabs(v) < 1e-3 || fabs(v) >= 1e5))
        snprintf(buf, n, "%.3g", v);
    else
        snprintf(buf, n, "%.4f", v);
}

/* --------------------------------------------------------------- main -- */

int cmd_simulate(int argc, char **argv) {
    const char *cmd = "simulate";
    cli_router_flags rf;
    const char *logits_path = NULL, *bias0_path = NULL, *trace_path = NULL;
    const char *compare = NULL, *rule = NULL;
    long long steps = 400, tokens = 2048, seed = 1, threads = 1, domains = 1, seq_len = -1;
    long long gamma_until = 0;
    double skew = 0.3, noise = 1.0, drift = 0.0, gamma = 0.001, gamma_after = 0.0, alpha = 1e-4;
    double threshold = 0.5, last_frac = 0.2;
    int recenter = 0, json = 0, quiet = 0, seq_topk = 0;
    int steps_set = 0, tokens_set = 0;

    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            printf("%s%s", simulate_usage, cli_router_help);
            return CLI_OK;
        }
    if (cli_router_begin(cmd, argc, argv, &rf) < 0) return CLI_USAGE;
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        int missing = 0;
        if (strcmp(argv[i], "--no-bias") == 0)
            return cli_fail(CLI_USAGE, cmd, "--no-bias: simulate always routes with the balancer's bias");
        int r = cli_router_flag(cmd, argc, argv, &i, &rf);
        if (r < 0) return CLI_USAGE;
        if (r > 0) continue;
#define OPT(name) cli_opt(argc, argv, &i, name, &v, &missing)
#define INT_ARG(var, lo, hi, what)                                                              \
    do {                                                                                        \
        if (!missing && !cli_parse_int(v, lo, hi, &(var)))                                      \
            return cli_fail(CLI_USAGE, cmd, "%s expects %s, got '%s'", argv[i - 1], what, v);   \
    } while (0)
#define FLOAT_ARG(var, cond, what)                                                              \
    do {                                                                                        \
        if (!missing && (!cli_parse_float(v, &(var)) || !(cond)))                               \
            return cli_fail(CLI_USAGE, cmd, "%s expects %s, got '%s'", argv[i - 1], what, v);   \
    } while (0)
        if (OPT("--logits")) logits_path = v;
        else if (OPT("--bias0")) bias0_path = v;
        else if (OPT("--trace")) trace_path = v;
        else if (OPT("--compare")) compare = v;
        else if (OPT("--rule")) {
            rule = v;
            if (!missing && strcmp(v, "sign") != 0 && strcmp(v, "proportional") != 0)
                return cli_fail(CLI_USAGE, cmd, "--rule expects sign or proportional, got '%s'", v);
        } else if (OPT("--steps")) {
            INT_ARG(steps, 1, 100000000, "a step count >= 1");
            steps_set = 1;
        } else if (OPT("--tokens")) {
            INT_ARG(tokens, 1, 100000000, "a token count >= 1");
            tokens_set = 1;
        } else if (OPT("--seed")) INT_ARG(seed, 0, (long long)1 << 62, "a non-negative integer");
        else if (OPT("--threads")) INT_ARG(threads, 1, 1024, "1..1024");
        else if (OPT("--domains")) INT_ARG(domains, 1, 1024, "1..1024");
        else if (OPT("--seq-len")) INT_ARG(seq_len, 1, 100000000, "a token count >= 1");
        else if (OPT("--gamma-until")) INT_ARG(gamma_until, 0, (long long)1 << 62, "a token count >= 0");
        else if (OPT("--skew")) FLOAT_ARG(skew, skew >= 0 && skew <= 100, "a number in 0..100");
        else if (OPT("--noise")) FLOAT_ARG(noise, noise >= 0 && noise <= 1000, "a number in 0..1000");
        else if (OPT("--drift")) FLOAT_ARG(drift, drift >= 0 && drift <= 1000, "a number in 0..1000");
        else if (OPT("--gamma")) FLOAT_ARG(gamma, gamma >= 0, "a rate >= 0");
        else if (OPT("--gamma-after")) FLOAT_ARG(gamma_after, gamma_after >= 0, "a rate >= 0");
        else if (OPT("--alpha")) FLOAT_ARG(alpha, alpha >= 0, "a coefficient >= 0");
        else if (OPT("--threshold")) FLOAT_ARG(threshold, threshold >= 0, "a number >= 0");
        else if (OPT("--last")) FLOAT_ARG(last_frac, last_frac > 0 && last_frac <= 1, "a fraction in (0, 1]");
        else if (OPT("--seq-count")) {
            if (!missing) {
                if (strcmp(v, "routed") == 0) seq_topk = 0;
                else if (strcmp(v, "topk") == 0) seq_topk = 1;
                else return cli_fail(CLI_USAGE, cmd, "--seq-count expects routed or topk, got '%s'", v);
            }
        } else if (strcmp(argv[i], "--recenter") == 0) recenter = 1;
        else if (strcmp(argv[i], "--json") == 0) json = 1;
        else if (strcmp(argv[i], "--quiet") == 0) quiet = 1;
        else
            return cli_fail(CLI_USAGE, cmd, "unknown option '%s' (see dsmoe simulate --help)", argv[i]);
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", argv[i]);
#undef OPT
#undef INT_ARG
#undef FLOAT_ARG
    }
    if (compare && rule) return cli_fail(CLI_USAGE, cmd, "give --compare or --rule, not both");
    if (logits_path && (steps_set || tokens_set))
        return cli_fail(CLI_USAGE, cmd, "--steps and --tokens are for synthetic traffic; --logits sets both");
    if (bias0_path && rf.bias_set)
        return cli_fail(CLI_USAGE, cmd, "give --bias0 or --bias, not both");
    if (!bias0_path && rf.bias_set) bias0_path = rf.bias_path;
    dsmoe_router_config *cfg = &rf.cfg;
    cfg->use_bias = 1;
    if (dsmoe_router_config_validate(cfg) != DSMOE_OK)
        return cli_fail(CLI_USAGE, cmd, "%s", dsmoe_last_error());

    /* strategies */
    strategy strat[MAX_STRATEGIES];
    int n_strat = 0;
    {
        char list[512];
        if (rule) snprintf(list, sizeof list, "%s", rule);
        else snprintf(list, sizeof list, "%s", compare ? compare : "none,sign,proportional");
        if (strlen(compare ? compare : "") >= sizeof list)
            return cli_fail(CLI_USAGE, cmd, "--compare list too long");
        char *save = NULL;
        for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            if (n_strat == MAX_STRATEGIES)
                return cli_fail(CLI_USAGE, cmd, "--compare: at most %d strategies", MAX_STRATEGIES);
            if (parse_strategy(cmd, tok, gamma, &strat[n_strat]) < 0) return CLI_USAGE;
            n_strat++;
        }
        if (n_strat == 0) return cli_fail(CLI_USAGE, cmd, "--compare: no strategy given");
    }

    const int32_t E = cfg->n_experts, K = cfg->top_k;
    int rc = CLI_RUNTIME;
    dsmoe_array rec = {0}, bias0 = {0};
    traffic tr;
    memset(&tr, 0, sizeof tr);
    float *logits = NULL, *weights = NULL, *scores = NULL;
    int32_t *indices = NULL;
    int64_t *counts = NULL;
    void *rws = NULL, *lws = NULL;
    FILE *trace = NULL;
    int64_t S, T;

    if (logits_path) {
        if (dsmoe_npy_read(logits_path, &rec) != DSMOE_OK) {
            cli_fail(CLI_RUNTIME, cmd, "%s: %s", logits_path, dsmoe_last_error());
            goto done;
        }
        if (rec.dtype != DSMOE_DTYPE_F32 || (rec.ndim != 3 && rec.ndim != 2) ||
            rec.shape[rec.ndim - 1] != E) {
            cli_fail(CLI_RUNTIME, cmd,
                     "%s: expected float32 logits of shape (steps, T, E=%d) or (T, E=%d), got %s "
                     "with %d dims, last %lld",
                     logits_path, (int)E, (int)E, dsmoe_dtype_name(rec.dtype), (int)rec.ndim,
                     (long long)(rec.ndim > 0 ? rec.shape[rec.ndim - 1] : 0));
            goto done;
        }
        S = rec.ndim == 3 ? rec.shape[0] : 1;
        T = rec.shape[rec.ndim - 2];
        if (S < 1 || T < 1) {
            cli_fail(CLI_RUNTIME, cmd, "%s: no steps or no tokens (shape %lld x %lld)", logits_path,
                     (long long)S, (long long)T);
            goto done;
        }
        if (seq_len < 0) seq_len = T;
    } else {
        S = steps;
        T = tokens;
        if (seq_len < 0) seq_len = T % 512 == 0 ? 512 : T;
    }
    if (T % seq_len != 0) {
        rc = cli_fail(CLI_USAGE, cmd, "--seq-len %lld does not divide the %lld tokens of a step",
                      seq_len, (long long)T);
        goto done;
    }
    if (bias0_path) {
        int64_t want[1] = {E};
        if (cli_load_npy(cmd, bias0_path, DSMOE_DTYPE_F32, 1, want, &bias0)) goto done;
    }
    if (!logits_path) {
        tr.E = E;
        tr.n_domains = (int32_t)domains;
        tr.skew = skew;
        tr.noise = noise;
        tr.drift = drift;
        tr.steps = S;
        tr.T = T;
        tr.seq_len = seq_len;
        tr.r.state = (uint64_t)seed * 0x2545f4914f6cdd1dull + 0x5ead;
        if (!traffic_init(&tr)) {
            cli_fail(CLI_RUNTIME, cmd, "out of memory");
            goto done;
        }
        logits = malloc(sizeof(float) * (size_t)T * (size_t)E);
    }
    indices = malloc(sizeof(int32_t) * (size_t)T * (size_t)K);
    weights = malloc(sizeof(float) * (size_t)T * (size_t)K);
    scores = malloc(sizeof(float) * (size_t)T * (size_t)E);
    counts = malloc(sizeof(int64_t) * (size_t)E);
    size_t rws_size = dsmoe_router_workspace_size(cfg, T, 0, DSMOE_DTYPE_F32, (int)threads);
    rws = dsmoe_malloc(rws_size);
    dsmoe_balance_loss_config lc;
    dsmoe_balance_loss_config_default(DSMOE_BALANCE_LOSS_SEQ, &lc);
    lc.alpha = (float)alpha;
    lc.seq_len = seq_len;
    lc.count_from = seq_topk ? DSMOE_BALANCE_COUNT_TOPK : DSMOE_BALANCE_COUNT_ROUTED;
    size_t lws_size = dsmoe_balance_loss_workspace_size(&lc, cfg, T);
    lws = dsmoe_malloc(lws_size ? lws_size : 64);
    if ((!logits_path && !logits) || !indices || !weights || !scores || !counts || !rws || !lws) {
        cli_fail(CLI_RUNTIME, cmd, "out of memory for %lld tokens per step", (long long)T);
        goto done;
    }
    for (int s = 0; s < n_strat; s++) {
        dsmoe_balancer_config bc;
        dsmoe_balancer_config_default(E, &bc);
        bc.rule = strat[s].rule;
        bc.gamma = (float)strat[s].gamma;
        bc.gamma_until_tokens = strat[s].none ? 0 : gamma_until;
        bc.gamma_after = strat[s].none ? 0.0f : (float)gamma_after;
        bc.recenter = recenter;
        dsmoe_status st = dsmoe_balancer_create(&bc, &strat[s].bal);
        if (st != DSMOE_OK) {
            rc = cli_fail(CLI_USAGE, cmd, "%s: %s", strat[s].label, dsmoe_last_error());
            goto done;
        }
        if (bias0.data && dsmoe_balancer_set_bias(strat[s].bal, (const float *)bias0.data) != DSMOE_OK) {
            cli_fail(CLI_RUNTIME, cmd, "%s: %s", bias0_path, dsmoe_last_error());
            goto done;
        }
        strat[s].run_counts = calloc((size_t)E, sizeof(int64_t));
        strat[s].last_counts = calloc((size_t)E, sizeof(int64_t));
        strat[s].first_below = -1;
        if (!strat[s].run_counts || !strat[s].last_counts) {
            cli_fail(CLI_RUNTIME, cmd, "out of memory");
            goto done;
        }
    }
    if (trace_path) {
        trace = fopen(trace_path, "w");
        if (!trace) {
            cli_fail(CLI_RUNTIME, cmd, "cannot write %s", trace_path);
            goto done;
        }
    }

    int64_t last_from = S - (int64_t)ceil(last_frac * (double)S);
    if (last_from < 0) last_from = 0;
    if (last_from >= S) last_from = S - 1;
    const int progress = !quiet && cli_stderr_is_tty();
    for (int64_t st = 0; st < S; st++) {
        const float *L;
        if (logits_path) {
            L = (const float *)rec.data + (size_t)st * (size_t)T * (size_t)E;
        } else {
            traffic_step(&tr, st, logits);
            L = logits;
        }
        for (int s = 0; s < n_strat; s++) {
            strategy *sg = &strat[s];
            dsmoe_router_output out = {indices, weights, scores, NULL, counts};
            dsmoe_status ds = dsmoe_router_forward(cfg, &out, L, dsmoe_balancer_bias(sg->bal), T, rws,
                                                   rws_size, (int)threads);
            if (ds != DSMOE_OK) {
                char what[96];
                snprintf(what, sizeof what, "routing step %lld", (long long)st);
                cli_fail_status(cmd, what, ds);
                goto done;
            }
            double seq_aux = 0.0, gpt = 0.0;
            ds = dsmoe_balance_loss(&lc, cfg, &seq_aux, NULL, scores, indices, NULL, T, lws, lws_size,
                                    (int)threads);
            if (ds == DSMOE_OK)
                ds = dsmoe_load_groups_per_token(&gpt, indices, NULL, T, K, E, cfg->n_groups);
            if (ds == DSMOE_OK) ds = dsmoe_balancer_accumulate_counts(sg->bal, counts, T);
            if (ds == DSMOE_OK) ds = dsmoe_balancer_step(sg->bal);
            dsmoe_load_stats ls;
            if (ds == DSMOE_OK) ds = dsmoe_load_stats_compute(counts, E, cfg->n_groups, &ls);
            if (ds != DSMOE_OK) {
                cli_fail_status(cmd, "balancing", ds);
                goto done;
            }
            for (int32_t i = 0; i < E; i++) sg->run_counts[i] += counts[i];
            if (st >= last_from) {
                for (int32_t i = 0; i < E; i++) sg->last_counts[i] += counts[i];
                sg->last_maxvio_sum += ls.maxvio;
                sg->last_seq_aux_sum += seq_aux;
                sg->gpt_sum += gpt;
            }
            if (sg->first_below < 0 && ls.maxvio < threshold) sg->first_below = st;
            if (trace) {
                dsmoe_balancer_info info;
                dsmoe_balancer_get_info(sg->bal, &info);
                fprintf(trace, "{\"step\":%lld,\"strategy\":\"%s\",\"gamma\":%.6g,\"tokens\":%lld,\"counts\":",
                        (long long)st, sg->label, (double)info.last_gamma, (long long)T);
                print_json_array_i64(trace, counts, E);
                fprintf(trace,
                        ",\"maxvio_batch\":%.9g,\"cv\":%.9g,\"entropy\":%.9g,\"dead\":%d,"
                        "\"group_maxvio\":%.9g,\"groups_per_token\":%.9g,\"seq_aux\":%.9g,\"bias\":",
                        ls.maxvio, ls.cv, ls.entropy, (int)ls.dead, ls.group_maxvio, gpt, seq_aux);
                print_json_array_f32(trace, dsmoe_balancer_bias(sg->bal), E);
                fputs("}\n", trace);
            }
        }
        if (progress && (st % 10 == 9 || st == S - 1)) {
            dsmoe_load_stats ls;
            fprintf(stderr, "\rsimulate: step %lld/%lld", (long long)st + 1, (long long)S);
            for (int s = 0; s < n_strat; s++) {
                if (dsmoe_load_stats_compute(dsmoe_balancer_counts_last(strat[s].bal), E, 1, &ls) ==
                    DSMOE_OK)
                    fprintf(stderr, "  %s %.3f", strat[s].label, ls.maxvio);
            }
            fprintf(stderr, "   ");
            fflush(stderr);
        }
    }
    if (progress) fprintf(stderr, "\r\033[K");
    if (trace) {
        int bad = ferror(trace);
        bad |= fclose(trace) != 0;
        trace = NULL;
        if (bad) {
            cli_fail(CLI_RUNTIME, cmd, "error writing %s", trace_path);
            goto done;
        }
    }

    /* summary */
    const int64_t n_last = S - last_from;
    int none_at = -1;
    for (int s = 0; s < n_strat; s++) {
        strategy *sg = &strat[s];
        if (sg->none && none_at < 0) none_at = s;
        dsmoe_load_stats_compute(sg->run_counts, E, cfg->n_groups, &sg->final_run);
        dsmoe_load_stats_compute(sg->last_counts, E, cfg->n_groups, &sg->final_last);
        sg->maxvio_batch_last_mean = sg->last_maxvio_sum / (double)n_last;
        sg->seq_aux_last_mean = sg->last_seq_aux_sum / (double)n_last;
        sg->gpt_sum /= (double)n_last;
        const float *b = dsmoe_balancer_bias(sg->bal);
        float lo = b[0], hi = b[0];
        for (int32_t i = 1; i < E; i++) {
            if (b[i] < lo) lo = b[i];
            if (b[i] > hi) hi = b[i];
        }
        sg->bias_spread = (double)hi - (double)lo;
        /* what bf16 storage would do to the final bias, as is and mean-centred */
        float *cb = malloc(sizeof(float) * (size_t)E);
        if (!cb || dsmoe_bias_bf16_check(b, E, (float)sg->gamma, &sg->bf16) != DSMOE_OK) {
            free(cb);
            cli_fail(CLI_RUNTIME, cmd, "bf16 check: %s", dsmoe_last_error());
            goto done;
        }
        memcpy(cb, b, sizeof(float) * (size_t)E);
        dsmoe_bias_center(cb, E);
        dsmoe_status bst = dsmoe_bias_bf16_check(cb, E, (float)sg->gamma, &sg->bf16_centred);
        free(cb);
        if (bst != DSMOE_OK) {
            cli_fail(CLI_RUNTIME, cmd, "bf16 check: %s", dsmoe_last_error());
            goto done;
        }
    }
    char cfgjson[1024];
    dsmoe_router_config_json(cfg, cfgjson, sizeof cfgjson);
    int last_pct = (int)lround(100.0 * (double)n_last / (double)S);
    if (json) {
        printf("{\"steps\":%lld,\"tokens_per_step\":%lld,\"seq_len\":%lld,\"last_steps\":%lld,"
               "\"threshold\":%.9g,\"alpha\":%.9g,\"traffic\":",
               (long long)S, (long long)T, seq_len, (long long)n_last, threshold, alpha);
        if (logits_path)
            printf("{\"replay\":true}");
        else
            printf("{\"replay\":false,\"skew\":%.9g,\"noise\":%.9g,\"drift\":%.9g,\"domains\":%lld,"
                   "\"seed\":%lld}",
                   skew, noise, drift, domains, seed);
        printf(",\"router\":%s,\"strategies\":[", cfgjson);
        for (int s = 0; s < n_strat; s++) {
            strategy *sg = &strat[s];
            printf("%s{\"name\":\"%s\",\"rule\":\"%s\",\"gamma\":%.9g,\"maxvio_run\":%.9g,"
                   "\"maxvio_last\":%.9g,\"maxvio_batch_last_mean\":%.9g,\"first_step_below\":%lld,"
                   "\"bias_spread\":%.9g,\"seq_aux_last_mean\":%.9g,\"cv_last\":%.9g,"
                   "\"entropy_last\":%.9g,\"dead_last\":%d,\"group_maxvio_last\":%.9g,"
                   "\"groups_per_token_last\":%.9g,\"bias_mean\":%.9g,\"bf16_distinct\":%d,"
                   "\"bf16_collapsed\":%d,\"bf16_step_lost\":%d,\"bf16_centred_collapsed\":%d,"
                   "\"bf16_centred_step_lost\":%d}",
                   s ? "," : "", sg->label,
                   sg->none ? "none" : (sg->rule == DSMOE_BALANCE_RULE_SIGN ? "sign" : "proportional"),
                   sg->gamma, sg->final_run.maxvio, sg->final_last.maxvio,
                   sg->maxvio_batch_last_mean, (long long)sg->first_below, sg->bias_spread,
                   sg->seq_aux_last_mean, sg->final_last.cv, sg->final_last.entropy,
                   (int)sg->final_last.dead, sg->final_last.group_maxvio, sg->gpt_sum,
                   (double)sg->bf16.mean, (int)sg->bf16.distinct_bf16, (int)sg->bf16.collapsed,
                   (int)sg->bf16.step_lost, (int)sg->bf16_centred.collapsed,
                   (int)sg->bf16_centred.step_lost);
        }
        printf("]}\n");
    } else {
        if (logits_path)
            printf("replayed %s: %lld steps x %lld tokens, E=%d K=%d G=%d TG=%d, seq-len %lld\n",
                   logits_path, (long long)S, (long long)T, (int)E, (int)K, (int)cfg->n_groups,
                   (int)cfg->topk_groups, seq_len);
        else
            printf("synthetic traffic: skew %g, noise %g, drift %g, %lld domain%s, seed %lld; %lld "
                   "steps x %lld tokens, E=%d K=%d G=%d TG=%d, seq-len %lld\n",
                   skew, noise, drift, domains, domains > 1 ? "s" : "", seed, (long long)S,
                   (long long)T, (int)E, (int)K, (int)cfg->n_groups, (int)cfg->topk_groups, seq_len);
        printf("\n| strategy | gamma | MaxVio run | MaxVio last %d%% | mean MaxVio_batch last %d%% | "
               "first step < %g | final bias spread | seq_aux last %d%% |%s\n",
               last_pct, last_pct, threshold, last_pct, none_at >= 0 ? " vs none |" : "");
        printf("|---|---:|---:|---:|---:|---:|---:|---:|%s\n", none_at >= 0 ? "---:|" : "");
        for (int s = 0; s < n_strat; s++) {
            strategy *sg = &strat[s];
            char g[32], a[32], b[32], c[32], d[32], e[32], f[32], h[32];
            snprintf(g, sizeof g, "%g", sg->gamma);
            fmt_num(a, sizeof a, sg->final_run.maxvio);
            fmt_num(b, sizeof b, sg->final_last.maxvio);
            fmt_num(c, sizeof c, sg->maxvio_batch_last_mean);
            if (sg->first_below >= 0) snprintf(d, sizeof d, "%lld", (long long)sg->first_below);
            else snprintf(d, sizeof d, "never");
            fmt_num(e, sizeof e, sg->bias_spread);
            snprintf(f, sizeof f, "%.3e", sg->seq_aux_last_mean);
            h[0] = '\0';
            if (none_at >= 0) {
                double ratio = sg->final_last.maxvio > 0
                                   ? strat[none_at].final_last.maxvio / sg->final_last.maxvio
                                   : INFINITY;
                if (isinf(ratio)) snprintf(h, sizeof h, " inf |");
                else snprintf(h, sizeof h, " %.1fx |", ratio);
            }
            printf("| %s | %s | %s | %s | %s | %s | %s | %s |%s\n", sg->label, g, a, b, c, d, e, f, h);
        }
        printf("\nfinal bias stored in bf16 (collapsed: experts now equal to an expert more than "
               "gamma/2 away in fp32; step lost: a +-gamma update would round away):\n");
        for (int s = 0; s < n_strat; s++) {
            strategy *sg = &strat[s];
            if (sg->none) continue;
            printf("  %-16s mean %+.4f: %d collapsed, %d step lost; mean-centred: %d collapsed, "
                   "%d step lost\n",
                   sg->label, (double)sg->bf16.mean, (int)sg->bf16.collapsed, (int)sg->bf16.step_lost,
                   (int)sg->bf16_centred.collapsed, (int)sg->bf16_centred.step_lost);
        }
    }
    rc = CLI_OK;
done:
    if (trace) fclose(trace);
    for (int s = 0; s < n_strat; s++) {
        dsmoe_balancer_free(strat[s].bal);
        free(strat[s].run_counts);
        free(strat[s].last_counts);
    }
    traffic_free(&tr);
    dsmoe_array_free(&rec);
    dsmoe_array_free(&bias0);
    free(logits);
    free(indices);
    free(weights);
    free(scores);
    free(counts);
    dsmoe_free(rws);
    dsmoe_free(lws);
    return rc;
}
