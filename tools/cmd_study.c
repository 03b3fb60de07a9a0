/*
 * cmd_study.c — `dsmoe study --out DIR`: several routing strategies × seeds trained on
 * the same model, data and budget, one run folder each, then the summary files and the
 * report (library: dsmoe/study.h, dsmoe_study_run).
 *
 * Training flags apply to every run after its strategy, as in `dsmoe train`: they are
 * checked once here and recorded (study_flags), then replayed onto each run's config by
 * the study's apply hook. The flags known here are the run's own (steps, evaluation,
 * logging, checkpoints, batch, sequence length); `dsmoe train`'s whole flag parser plugs
 * in at train_flag() below.
 */
#include "cli.h"

#include "dsmoe/study.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const study_usage =
    "usage: dsmoe study --out DIR [options] [training options]\n"
    "\n"
    "Trains several routing strategies on the same model, data and token budget, each with\n"
    "several seeds, one after another: DIR/runs/<strategy>-seed<k>/ (a run folder as\n"
    "`dsmoe train` writes). An interrupted study started again with the same options skips\n"
    "the finished runs and resumes the unfinished one from its last checkpoint. Ends with\n"
    "DIR/summary.json, DIR/summary.csv and the report DIR/report.html (dsmoe report).\n"
    "\n"
    "  --out DIR            the study folder (required)\n"
    "  --strategies LIST    comma-separated (default: all of v3, v3-no-balance,\n"
    "                       v3-proportional, v3-no-norm, aux-loss, v2, softmax-norm)\n"
    "  --seeds N            seeds 1..N of each strategy (default 3): initialisation and data\n"
    "                       order; differences smaller than the spread across seeds are\n"
    "                       reported as such\n"
    "  --alpha LIST         aux-loss's loss coefficient(s), comma-separated: one aux-loss\n"
    "                       variant per value (DIR/runs/aux-loss-a<alpha>-seed<k>/)\n"
    "  --preset NAME        model preset: tiny, small, default (default: default)\n"
    "  --threads N          threads per run (default: all cores; results do not depend on it)\n"
    "  --quiet              no progress display\n"
    "  --help               this text\n"
    "training options (every run):\n"
    "  --steps N            optimizer steps per run\n"
    "  --batch N            sequences per step\n"
    "  --seq-len N          tokens per sequence\n"
    "  --eval-every N       evaluate every N steps (and after the last)\n"
    "  --eval-tokens N      validation tokens per evaluation (0: the whole split)\n"
    "  --log-every N        a metrics line every N steps\n"
    "  --save-every N       checkpoint every N steps (and after the last)\n"
    "\n"
    "Definitions of every measure: docs/study.md.\n";

/* One training flag at argv[*i] onto rc: 1 consumed, 0 not a training flag, -1 bad
 * value (message printed). The hook for `dsmoe train`'s parser: replace the body by a
 * call of its flag function with the same contract. */
static int train_flag(int argc, char **argv, int *i, dsmoe_run_config *rc) {
    static const struct {
        const char *name;
        long long lo, hi;
    } flags[] = {{"--steps", 1, 1LL << 40},     {"--batch", 1, 1 << 20},      {"--seq-len", 1, 1 << 24},
                 {"--eval-every", 0, 1LL << 40}, {"--eval-tokens", 0, 1LL << 40}, {"--log-every", 1, 1LL << 40},
                 {"--save-every", 0, 1LL << 40}};
    for (size_t k = 0; k < sizeof flags / sizeof flags[0]; k++) {
        const char *v = NULL;
        int missing = 0;
        if (!cli_opt(argc, argv, i, flags[k].name, &v, &missing)) continue;
        long long x;
        if (missing || !cli_parse_int(v, flags[k].lo, flags[k].hi, &x)) {
            cli_fail(CLI_USAGE, "study", "%s needs an integer in %lld..%lld", flags[k].name, flags[k].lo, flags[k].hi);
            return -1;
        }
        switch (k) {
        case 0: rc->steps = x; break;
        case 1: rc->train.batch = (int32_t)x; break;
        case 2: rc->train.seq_len = (int32_t)x; break;
        case 3: rc->eval_every = x; break;
        case 4: rc->eval_tokens = x; break;
        case 5: rc->log_every = x; break;
        default: rc->save_every = x; break;
        }
        return 1;
    }
    return 0;
}

typedef struct study_flags {
    int argc;
    char **argv;
    int *at; /* argv indices where training flags start */
    int n;
} study_flags;

static dsmoe_status apply_flags(dsmoe_run_config *rc, const char *strategy, void *user) {
    (void)strategy;
    const study_flags *f = user;
    for (int k = 0; k < f->n; k++) {
        int i = f->at[k];
        if (train_flag(f->argc, f->argv, &i, rc) != 1) return DSMOE_STATUS_INVALID_CONFIG; /* checked before */
    }
    /* as `dsmoe train`: a shorter run keeps the preset's warm-up inside it */
    if (rc->adamw.warmup_steps > rc->steps / 10) rc->adamw.warmup_steps = rc->steps / 10;
    return DSMOE_OK;
}

static void fmt_time(char *buf, size_t n, double s) {
    if (!(s >= 0) || s > 1e8) snprintf(buf, n, "?");
    else if (s >= 3600) snprintf(buf, n, "%dh%02dm", (int)(s / 3600), (int)fmod(s / 60, 60));
    else if (s >= 60) snprintf(buf, n, "%dm%02ds", (int)(s / 60), (int)fmod(s, 60));
    else snprintf(buf, n, "%.0fs", s);
}

typedef struct progress_state {
    int tty, quiet;
    int32_t last_run;
} progress_state;

static void on_progress(const dsmoe_study_progress *p, void *user) {
    progress_state *ps = user;
    if (ps->quiet) return;
    char eta[32];
    fmt_time(eta, sizeof eta, p->study_eta_s);
    if (p->skipped) {
        fprintf(stderr, "%sstudy: run %d/%d %s: finished before, skipped\n", ps->tty ? "\r\033[K" : "", p->run,
                p->n_runs, p->name);
        return;
    }
    if (p->run != ps->last_run) {
        if (ps->tty) fprintf(stderr, "\r\033[K");
        fprintf(stderr, "study: run %d/%d %s\n", p->run, p->n_runs, p->name);
        ps->last_run = p->run;
    }
    if (!p->step || !ps->tty) return;
    fprintf(stderr, "\r\033[Kstudy: run %d/%d %s step %lld/%lld loss %.4f maxvio %.3f  study ETA %s", p->run,
            p->n_runs, p->name, (long long)p->step->step, (long long)p->step->steps, p->step->loss,
            p->step->maxvio_batch, eta);
}

/* Splits a comma-separated list in place into items (at most cap). */
static int split_list(char *s, const char **items, int cap) {
    int n = 0;
    for (char *tok = s; tok;) {
        char *comma = strchr(tok, ',');
        if (comma) *comma = '\0';
        if (n == cap || !*tok) return -1;
        items[n++] = tok;
        tok = comma ? comma + 1 : NULL;
    }
    return n;
}

int cmd_study(int argc, char **argv) {
    const char *out = NULL, *preset = "default";
    char *strat_buf = NULL, *alpha_buf = NULL;
    const char *strategies[64];
    double alphas[32];
    int n_strat = 0, n_alpha = 0, quiet = 0, rc_code = CLI_OK;
    long long seeds = 3, threads = 0;
    study_flags sf = {argc, argv, NULL, 0};
    sf.at = calloc((size_t)argc + 1, sizeof *sf.at);
    if (!sf.at) return cli_fail(CLI_RUNTIME, "study", "out of memory");
    /* the preset first: the training flags are checked against its config */
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--preset") == 0) preset = argv[i + 1];
    dsmoe_study_config sc;
    memset(&sc, 0, sizeof sc);
    dsmoe_run_config scratch;
    memset(&scratch, 0, sizeof scratch);
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        int missing = 0, t;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(study_usage, stdout);
            goto done;
        } else if (cli_opt(argc, argv, &i, "--out", &v, &missing)) {
            if (missing) { rc_code = cli_fail(CLI_USAGE, "study", "--out needs a folder"); goto done; }
            out = v;
        } else if (cli_opt(argc, argv, &i, "--preset", &v, &missing)) {
            if (missing) { rc_code = cli_fail(CLI_USAGE, "study", "--preset needs a name"); goto done; }
        } else if (cli_opt(argc, argv, &i, "--strategies", &v, &missing)) {
            free(strat_buf);
            strat_buf = missing ? NULL : strdup(v);
            if (!strat_buf || (n_strat = split_list(strat_buf, strategies, 64)) < 1) {
                rc_code = cli_fail(CLI_USAGE, "study", "--strategies needs a comma-separated list of names");
                goto done;
            }
        } else if (cli_opt(argc, argv, &i, "--alpha", &v, &missing)) {
            const char *items[32];
            free(alpha_buf);
            alpha_buf = missing ? NULL : strdup(v);
            if (!alpha_buf || (n_alpha = split_list(alpha_buf, items, 32)) < 1) {
                rc_code = cli_fail(CLI_USAGE, "study", "--alpha needs a comma-separated list of numbers");
                goto done;
            }
            for (int k = 0; k < n_alpha; k++)
                if (!cli_parse_float(items[k], &alphas[k]) || !(alphas[k] >= 0) || !isfinite(alphas[k])) {
                    rc_code = cli_fail(CLI_USAGE, "study", "--alpha: '%s' is not a number >= 0", items[k]);
                    goto done;
                }
        } else if (cli_opt(argc, argv, &i, "--seeds", &v, &missing)) {
            if (missing || !cli_parse_int(v, 1, 1000, &seeds)) {
                rc_code = cli_fail(CLI_USAGE, "study", "--seeds needs a number in 1..1000");
                goto done;
            }
        } else if (cli_opt(argc, argv, &i, "--threads", &v, &missing)) {
            if (missing || !cli_parse_int(v, 0, 4096, &threads)) {
                rc_code = cli_fail(CLI_USAGE, "study", "--threads needs a number in 0..4096");
                goto done;
            }
        } else if (strcmp(argv[i], "--quiet") == 0) {
            quiet = 1;
        } else {
            int at = i;
            t = train_flag(argc, argv, &i, &scratch);
            if (t < 0) { rc_code = CLI_USAGE; goto done; }
            if (t == 0) {
                rc_code = cli_fail(CLI_USAGE, "study", "unknown option '%s' (see dsmoe study --help)", argv[i]);
                goto done;
            }
            sf.at[sf.n++] = at;
        }
    }
    if (!out) { rc_code = cli_fail(CLI_USAGE, "study", "--out DIR is required (see --help)"); goto done; }
    dsmoe_status st = dsmoe_study_config_default(preset, &sc);
    if (st) {
        rc_code = st == DSMOE_STATUS_INVALID_CONFIG ? cli_fail_config(CLI_USAGE, "study", "%s", dsmoe_last_error())
                                                    : cli_fail(CLI_RUNTIME, "study", "%s", dsmoe_last_error());
        goto done;
    }
    if (n_strat > 0) {
        sc.strategies = strategies;
        sc.n_strategies = n_strat;
    }
    if (n_alpha > 0) {
        sc.alphas = alphas;
        sc.n_alphas = n_alpha;
    }
    sc.n_seeds = (int32_t)seeds;
    sc.apply = apply_flags;
    sc.apply_user = &sf;
    progress_state ps = {cli_stderr_is_tty(), quiet, 0};
    st = dsmoe_study_run(&sc, out, (int32_t)threads, on_progress, &ps);
    if (ps.tty && !quiet) fprintf(stderr, "\r\033[K");
    if (st) {
        rc_code = st == DSMOE_STATUS_INVALID_CONFIG ? cli_fail_config(CLI_USAGE, "study", "%s", dsmoe_last_error())
                                                    : cli_fail(CLI_RUNTIME, "study", "%s", dsmoe_last_error());
        goto done;
    }
    char path[4096];
    if (dsmoe_report_write(out, NULL, path, sizeof path) != DSMOE_OK) {
        rc_code = cli_fail(CLI_RUNTIME, "study", "report: %s", dsmoe_last_error());
        goto done;
    }
    printf("%s\n", path);
done:
    free(sf.at);
    free(strat_buf);
    free(alpha_buf);
    return rc_code;
}
