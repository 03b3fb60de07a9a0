/*
 * cmd_study.c — `dsmoe study --out DIR`: several routing strategies × seeds trained on
 * the same model, data and budget, one run folder each, then the summary files and the
 * report (library: dsmoe/study.h, dsmoe_study_run).
 *
 * Training flags apply to every run after its strategy, as in `dsmoe train`: every
 * `dsmoe train` run-config flag is accepted (cli_train_flag), checked once here and its
 * place recorded (study_flags), then replayed onto each run's config by the study's apply
 * hook, which ends with `dsmoe train`'s own rules (cli_train_finish).
 *
 * Under mpirun every run is data-parallel over the ranks (as `mpirun dsmoe train`); rank 0
 * prints, writes the summary files and the report.
 */
#include "cli.h"
#include "cli_mpi.h"

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
    "Under `mpirun -np R`: each run is data-parallel over the R ranks, as in `dsmoe train`\n"
    "(the batch a multiple of R); rank 0 prints and writes the summary and the report.\n"
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
    "  --expert-parallel    under mpirun: each run also shards its MoE layers' routed experts\n"
    "                       over the ranks (as dsmoe train --expert-parallel)\n"
    "  --quiet              no progress display\n"
    "  --help               this text\n"
    "\n"
    "Every `dsmoe train` flag below applies to every run, after its strategy. The study's\n"
    "own --alpha (a list, above) takes the place of train's; the seeds come from --seeds\n"
    "(--seed and --init-seed are refused); each run resumes by itself (--resume is\n"
    "accepted and changes nothing). Definitions of every measure: docs/study.md.\n";

static void print_usage(void) {
    fputs(study_usage, stdout);
    fputs("\n", stdout);
    cli_train_flags_help(stdout);
    fputs("\nExamples:\n"
          "  dsmoe study --out studies/default                 # the published study (hours)\n"
          "  dsmoe study --preset tiny --strategies v3,aux-loss --seeds 2 --steps 200 --out studies/tiny\n"
          "  dsmoe report studies/tiny\n",
          stdout);
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
    int warmup_given = 0;
    for (int k = 0; k < f->n; k++) {
        int i = f->at[k];
        if (cli_train_flag("study", f->argc, f->argv, &i, rc, &warmup_given) != 1)
            return DSMOE_STATUS_INVALID_CONFIG; /* checked before */
    }
    cli_train_finish(rc, warmup_given);
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
    int n_strat = 0, n_alpha = 0, quiet = 0, rc_code = CLI_OK, agreed = 0;
    const int lead = cli_mpi_rank() == 0;
    long long seeds = 3, threads = 0;
    int expert_parallel = 0;
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
            print_usage();
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
        } else if (strcmp(argv[i], "--expert-parallel") == 0) {
            expert_parallel = 1;
        } else if (strcmp(argv[i], "--resume") == 0) {
            /* a study always resumes */
        } else if (strcmp(argv[i], "--seed") == 0 || strcmp(argv[i], "--init-seed") == 0) {
            rc_code = cli_fail(CLI_USAGE, "study", "%s: the study sets each run's seeds (1..N of --seeds N)", argv[i]);
            goto done;
        } else if (strcmp(argv[i], "--strategy") == 0) {
            rc_code = cli_fail(CLI_USAGE, "study", "--strategy: a study takes --strategies LIST");
            goto done;
        } else {
            int at = i;
            t = cli_train_flag("study", argc, argv, &i, &scratch, NULL);
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
    /* under mpirun: data-parallel runs; a rank that failed above meets the others here */
    sc.collective = cli_mpi_run_collective(expert_parallel);
    if (cli_mpi_active() && (rc_code = cli_mpi_agree(CLI_OK, "study")) != CLI_OK) {
        agreed = 1;
        goto done;
    }
    progress_state ps = {cli_stderr_is_tty(), quiet || !lead, 0};
    st = dsmoe_study_run(&sc, out, (int32_t)threads, on_progress, &ps);
    if (ps.tty && !ps.quiet) fprintf(stderr, "\r\033[K");
    if (st) { /* the same error on every rank: rank 0 prints it */
        char msg[1536];
        cli_train_flag_message(dsmoe_last_error(), msg, sizeof msg);
        const int code = st == DSMOE_STATUS_INVALID_CONFIG ? CLI_USAGE : CLI_RUNTIME;
        rc_code = lead ? cli_fail(code, "study", "%s", msg) : code;
        agreed = 1;
        goto done;
    }
    char path[4096];
    if (!lead) goto done;
    if (dsmoe_report_write(out, NULL, path, sizeof path) != DSMOE_OK) {
        rc_code = cli_fail(CLI_RUNTIME, "study", "report: %s", dsmoe_last_error());
        goto done;
    }
    printf("%s\n", path);
done:
    if (cli_mpi_active() && !agreed) rc_code = cli_mpi_agree(rc_code, "study"); /* none left waiting */
    free(sf.at);
    free(strat_buf);
    free(alpha_buf);
    return rc_code;
}
