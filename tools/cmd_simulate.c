/*
 * cmd_simulate.c — `dsmoe simulate`: study load balancing without training a model.
 *
 * A thin front end of the library's simulation (dsmoe/balance.h, "simulation"): it
 * parses the flags into a dsmoe_traffic_config and a dsmoe_sim_config, feeds each
 * step's logits (synthetic from dsmoe_traffic, or replayed from a .npy recording) to
 * dsmoe_sim_step, and prints the summaries. The trace file is written by the library
 * (atomically).
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
    "                         group_maxvio, groups_per_token, seq_aux, bias (after the update);\n"
    "                         the file is replaced only when the run succeeds\n"
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

static void fmt_num(char *buf, size_t n, double v) {
    if (v != 0.0 && (fabs(v) < 1e-3 || fabs(v) >= 1e5))
        snprintf(buf, n, "%.3g", v);
    else
        snprintf(buf, n, "%.4f", v);
}

/* The shortest %g form that reads back as the same float (a rate the user typed as
 * 0.001 prints as 0.001, not as its float value 0.00100000005). */
static void fmt_rate(char *buf, size_t n, float v) {
    for (int p = 6; p <= 9; p++) {
        snprintf(buf, n, "%.*g", p, (double)v);
        if (strtof(buf, NULL) == v) return;
    }
}

static const char *rule_name(const dsmoe_sim_strategy *g) {
    if (!g->balance) return "none";
    return g->balancer.rule == DSMOE_BALANCE_RULE_SIGN ? "sign" : "proportional";
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
    rf.cfg.use_bias = 1;
    if (cli_router_validate(cmd, &rf) < 0) return CLI_USAGE;

    /* the simulation's config, but for the step count and tokens of a recording */
    dsmoe_sim_config sc;
    dsmoe_sim_config_default(&rf.cfg, &sc);
    const int32_t E = sc.router.n_experts;
    {
        char list[512];
        const char *spec = rule ? rule : compare ? compare : "none,sign,proportional";
        if (strlen(spec) >= sizeof list) return cli_fail(CLI_USAGE, cmd, "--compare list too long");
        snprintf(list, sizeof list, "%s", spec);
        sc.n_strategies = 0;
        char *save = NULL;
        for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            if (sc.n_strategies == DSMOE_SIM_MAX_STRATEGIES)
                return cli_fail(CLI_USAGE, cmd, "--compare: at most %d strategies",
                                DSMOE_SIM_MAX_STRATEGIES);
            dsmoe_sim_strategy *g = &sc.strategies[sc.n_strategies++];
            if (dsmoe_sim_strategy_parse(tok, E, (float)gamma, g) != DSMOE_OK)
                return cli_fail(CLI_USAGE, cmd, "--compare: %s", dsmoe_last_error());
            if (g->balance) {
                g->balancer.gamma_until_tokens = gamma_until;
                g->balancer.gamma_after = (float)gamma_after;
                g->balancer.recenter = recenter;
            }
        }
        if (sc.n_strategies == 0) return cli_fail(CLI_USAGE, cmd, "--compare: no strategy given");
    }
    sc.alpha = (float)alpha;
    sc.threshold = threshold;
    sc.last_fraction = last_frac;
    sc.seq_count = seq_topk ? DSMOE_BALANCE_COUNT_TOPK : DSMOE_BALANCE_COUNT_ROUTED;
    sc.n_threads = (int)threads;

    int rc = CLI_RUNTIME;
    dsmoe_array rec = {0}, bias0 = {0};
    dsmoe_traffic *tr = NULL;
    dsmoe_sim *sim = NULL;
    float *logits = NULL;
    int64_t S, T;
    dsmoe_traffic_config tc;
    dsmoe_traffic_config_default(E, &tc);

    if (logits_path) {
        if (dsmoe_npy_read(logits_path, &rec) != DSMOE_OK) {
            cli_fail_file(CLI_RUNTIME, cmd, logits_path);
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
        tc.steps = S;
        tc.tokens = T;
        tc.seq_len = seq_len < 0 ? 0 : seq_len;
        tc.n_domains = (int32_t)domains;
        tc.skew = skew;
        tc.noise = noise;
        tc.drift = drift;
        tc.seed = (uint64_t)seed;
        if (dsmoe_traffic_config_validate(&tc) != DSMOE_OK) {
            rc = cli_fail_config(CLI_USAGE, cmd, "%s", dsmoe_last_error());
            goto done;
        }
        if (dsmoe_traffic_create(&tc, &tr) != DSMOE_OK) {
            cli_fail(CLI_RUNTIME, cmd, "%s", dsmoe_last_error());
            goto done;
        }
        seq_len = dsmoe_traffic_get_config(tr)->seq_len;
        logits = malloc(sizeof(float) * (size_t)T * (size_t)E);
        if (!logits) {
            cli_fail(CLI_RUNTIME, cmd, "out of memory for %lld tokens per step", (long long)T);
            goto done;
        }
    }
    sc.tokens = T;
    sc.steps = S;
    sc.seq_len = seq_len;
    if (dsmoe_sim_config_validate(&sc) != DSMOE_OK) {
        rc = cli_fail_config(CLI_USAGE, cmd, "%s", dsmoe_last_error());
        goto done;
    }
    if (dsmoe_sim_create(&sc, &sim) != DSMOE_OK) {
        cli_fail(CLI_RUNTIME, cmd, "%s", dsmoe_last_error());
        goto done;
    }
    if (bias0_path) {
        int64_t want[1] = {E};
        if (cli_load_npy(cmd, bias0_path, DSMOE_DTYPE_F32, 1, want, &bias0)) goto done;
        if (dsmoe_sim_set_bias(sim, (const float *)bias0.data) != DSMOE_OK) {
            cli_fail(CLI_RUNTIME, cmd, "%s: %s", bias0_path, dsmoe_last_error());
            goto done;
        }
    }
    if (trace_path && dsmoe_sim_trace_open(sim, trace_path) != DSMOE_OK) {
        cli_fail(CLI_RUNTIME, cmd, "--trace %s: %s", trace_path, dsmoe_last_error());
        goto done;
    }

    const int progress = !quiet && cli_stderr_is_tty();
    for (int64_t st = 0; st < S; st++) {
        const float *L = logits;
        if (logits_path) L = (const float *)rec.data + (size_t)st * (size_t)T * (size_t)E;
        else dsmoe_traffic_next(tr, logits, NULL);
        dsmoe_status ds = dsmoe_sim_step(sim, L);
        if (ds != DSMOE_OK) {
            cli_fail(CLI_RUNTIME, cmd, "%s: %s", dsmoe_strerror(ds), dsmoe_last_error());
            goto done;
        }
        if (progress && (st % 10 == 9 || st == S - 1)) {
            fprintf(stderr, "\rsimulate: step %lld/%lld", (long long)st + 1, (long long)S);
            for (int32_t s = 0; s < sc.n_strategies; s++) {
                dsmoe_sim_record r;
                if (dsmoe_sim_get_record(sim, s, &r) == DSMOE_OK)
                    fprintf(stderr, "  %s %.3f", sc.strategies[s].name, r.stats.maxvio);
            }
            fprintf(stderr, "   ");
            fflush(stderr);
        }
    }
    if (progress) fprintf(stderr, "\r\033[K");
    if (trace_path && dsmoe_sim_trace_finish(sim) != DSMOE_OK) {
        cli_fail(CLI_RUNTIME, cmd, "--trace %s: %s", trace_path, dsmoe_last_error());
        goto done;
    }

    /* summary */
    dsmoe_sim_summary sum[DSMOE_SIM_MAX_STRATEGIES];
    memset(sum, 0, sizeof sum);
    int none_at = -1;
    for (int32_t s = 0; s < sc.n_strategies; s++) {
        if (dsmoe_sim_get_summary(sim, s, &sum[s]) != DSMOE_OK) {
            cli_fail(CLI_RUNTIME, cmd, "summary: %s", dsmoe_last_error());
            goto done;
        }
        if (!sc.strategies[s].balance && none_at < 0) none_at = (int)s;
    }
    const int64_t n_last = sum[0].last_steps;
    char cfgjson[1024];
    dsmoe_router_config_json(&sc.router, cfgjson, sizeof cfgjson);
    int last_pct = (int)lround(100.0 * (double)n_last / (double)S);
    const int32_t K = sc.router.top_k;
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
        for (int32_t s = 0; s < sc.n_strategies; s++) {
            const dsmoe_sim_strategy *g = &sc.strategies[s];
            const dsmoe_sim_summary *m = &sum[s];
            char gm[32];
            fmt_rate(gm, sizeof gm, g->balance ? g->balancer.gamma : 0.0f);
            printf("%s{\"name\":\"%s\",\"rule\":\"%s\",\"gamma\":%s,\"maxvio_run\":%.9g,"
                   "\"maxvio_last\":%.9g,\"maxvio_batch_last_mean\":%.9g,\"first_step_below\":%lld,"
                   "\"bias_spread\":%.9g,\"seq_aux_last_mean\":%.9g,\"cv_last\":%.9g,"
                   "\"entropy_last\":%.9g,\"dead_last\":%d,\"group_maxvio_last\":%.9g,"
                   "\"groups_per_token_last\":%.9g,\"bias_mean\":%.9g,\"bf16_distinct\":%d,"
                   "\"bf16_collapsed\":%d,\"bf16_step_lost\":%d,\"bf16_centred_collapsed\":%d,"
                   "\"bf16_centred_step_lost\":%d}",
                   s ? "," : "", g->name, rule_name(g), gm,
                   m->run.maxvio, m->last.maxvio, m->maxvio_batch_last_mean,
                   (long long)m->first_step_below, m->bias_spread, m->seq_aux_last_mean,
                   m->last.cv, m->last.entropy, (int)m->last.dead, m->last.group_maxvio,
                   m->groups_per_token_last_mean, (double)m->bf16.mean, (int)m->bf16.distinct_bf16,
                   (int)m->bf16.collapsed, (int)m->bf16.step_lost, (int)m->bf16_centred.collapsed,
                   (int)m->bf16_centred.step_lost);
        }
        printf("]}\n");
    } else {
        if (logits_path)
            printf("replayed %s: %lld steps x %lld tokens, E=%d K=%d G=%d TG=%d, seq-len %lld\n",
                   logits_path, (long long)S, (long long)T, (int)E, (int)K, (int)sc.router.n_groups,
                   (int)sc.router.topk_groups, seq_len);
        else
            printf("synthetic traffic: skew %g, noise %g, drift %g, %lld domain%s, seed %lld; %lld "
                   "steps x %lld tokens, E=%d K=%d G=%d TG=%d, seq-len %lld\n",
                   skew, noise, drift, domains, domains > 1 ? "s" : "", seed, (long long)S,
                   (long long)T, (int)E, (int)K, (int)sc.router.n_groups,
                   (int)sc.router.topk_groups, seq_len);
        printf("\n| strategy | gamma | MaxVio run | MaxVio last %d%% | mean MaxVio_batch last %d%% | "
               "first step < %g | final bias spread | seq_aux last %d%% |%s\n",
               last_pct, last_pct, threshold, last_pct, none_at >= 0 ? " vs none |" : "");
        printf("|---|---:|---:|---:|---:|---:|---:|---:|%s\n", none_at >= 0 ? "---:|" : "");
        for (int32_t s = 0; s < sc.n_strategies; s++) {
            const dsmoe_sim_strategy *g = &sc.strategies[s];
            const dsmoe_sim_summary *m = &sum[s];
            char gm[32], a[32], b[32], c[32], d[32], e[32], f[32], h[32];
            snprintf(gm, sizeof gm, "%g", g->balance ? (double)g->balancer.gamma : 0.0);
            /* %g: six digits, as the rate was typed */
            fmt_num(a, sizeof a, m->run.maxvio);
            fmt_num(b, sizeof b, m->last.maxvio);
            fmt_num(c, sizeof c, m->maxvio_batch_last_mean);
            if (m->first_step_below >= 0) snprintf(d, sizeof d, "%lld", (long long)m->first_step_below);
            else snprintf(d, sizeof d, "never");
            fmt_num(e, sizeof e, m->bias_spread);
            snprintf(f, sizeof f, "%.3e", m->seq_aux_last_mean);
            h[0] = '\0';
            if (none_at >= 0) {
                double ratio = m->last.maxvio > 0 ? sum[none_at].last.maxvio / m->last.maxvio
                                                  : INFINITY;
                if (isinf(ratio)) snprintf(h, sizeof h, " inf |");
                else snprintf(h, sizeof h, " %.1fx |", ratio);
            }
            printf("| %s | %s | %s | %s | %s | %s | %s | %s |%s\n", g->name, gm, a, b, c, d, e, f, h);
        }
        printf("\nfinal bias stored in bf16 (collapsed: experts now equal to an expert more than "
               "gamma/2 away in fp32; step lost: a +-gamma update would round away):\n");
        for (int32_t s = 0; s < sc.n_strategies; s++) {
            const dsmoe_sim_summary *m = &sum[s];
            if (!sc.strategies[s].balance) continue;
            printf("  %-16s mean %+.4f: %d collapsed, %d step lost; mean-centred: %d collapsed, "
                   "%d step lost\n",
                   sc.strategies[s].name, (double)m->bf16.mean, (int)m->bf16.collapsed,
                   (int)m->bf16.step_lost, (int)m->bf16_centred.collapsed,
                   (int)m->bf16_centred.step_lost);
        }
    }
    rc = CLI_OK;
done:
    dsmoe_sim_free(sim);
    dsmoe_traffic_free(tr);
    dsmoe_array_free(&rec);
    dsmoe_array_free(&bias0);
    free(logits);
    return rc;
}
