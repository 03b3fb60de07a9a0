/*
 * study.c — the study: every strategy (× α for aux-loss) × seed as a run folder under
 * <out>/runs/, trained one after another through dsmoe_run, with the progress of the
 * whole study (run i of n, ETA); finished runs are skipped and an unfinished one resumes
 * from its checkpoint, so an interrupted study continues where it stopped. Ends by
 * writing the summary files.
 *
 * The train layer's runs (dsmoe_run and the run configs, src/train/run*.c) are referenced
 * weakly in a tree that does not have them yet (CMake defines DSMOE_HAVE_RUNS when
 * src/train/run.c exists): without them dsmoe_study_run and dsmoe_study_config_default
 * fail with INVALID_ARGUMENT saying so, and everything else in this layer (summaries,
 * reports) works.
 */
#include "study_internal.h"

#include "io/io_internal.h"
#include "train/train_internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#if defined(DSMOE_HAVE_RUNS) || !defined(__GNUC__)
#define HAVE(fn) 1
#else
#pragma weak dsmoe_run
#pragma weak dsmoe_run_config_default
#pragma weak dsmoe_run_strategy_apply
#pragma weak dsmoe_run_strategy_name
#pragma weak dsmoe_run_config_validate
#define HAVE(fn) ((fn) != NULL)
#endif

dsmoe__study_hooks dsmoe__study_test_hooks = {NULL, NULL};

static dsmoe_status no_runs(const char *what) {
    return DSMOE__FAIL(DSMOE_STATUS_INVALID_ARGUMENT, "%s: training runs (dsmoe_run) are not built into this library",
                        what);
}

dsmoe_status dsmoe_study_config_default(const char *preset, dsmoe_study_config *sc) {
    if (!sc) return DSMOE__FAIL(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_study_config_default: NULL config");
    if (!HAVE(dsmoe_run_config_default)) return no_runs("dsmoe_study_config_default");
    dsmoe_study_config tmp;
    memset(&tmp, 0, sizeof tmp);
    dsmoe_status st = dsmoe_run_config_default(preset ? preset : "default", &tmp.base);
    if (st) return st;
    tmp.n_seeds = 3;
    *sc = tmp;
    return DSMOE_OK;
}

static int n_strategies(const dsmoe_study_config *sc) {
    if (sc->strategies) return sc->n_strategies;
    int n = 0;
    if (HAVE(dsmoe_run_strategy_name))
        while (dsmoe_run_strategy_name(n)) n++;
    return n;
}

static const char *strategy_at(const dsmoe_study_config *sc, int i) {
    return sc->strategies ? sc->strategies[i] : dsmoe_run_strategy_name(i);
}

/* Run k of the plan: its strategy, alpha (NaN: the strategy's own), seed and name. */
typedef struct planned {
    const char *strategy;
    double alpha;
    int32_t seed;
    char name[128];
} planned;

static dsmoe_status plan(const dsmoe_study_config *sc, planned *out, int32_t cap, int32_t *n) {
    *n = 0;
    if (sc->n_seeds < 1 || sc->n_seeds > 1000)
        return DSMOE__FAIL(DSMOE_STATUS_INVALID_CONFIG, "seeds = %d: must be 1..1000", sc->n_seeds);
    if (sc->n_alphas < 0 || (sc->n_alphas > 0 && !sc->alphas))
        return DSMOE__FAIL(DSMOE_STATUS_INVALID_CONFIG, "alphas: %d values but no array", sc->n_alphas);
    for (int32_t a = 0; a < sc->n_alphas; a++)
        if (!(sc->alphas[a] >= 0) || !isfinite(sc->alphas[a]))
            return DSMOE__FAIL(DSMOE_STATUS_INVALID_CONFIG, "alpha = %g: must be finite and >= 0", sc->alphas[a]);
    int ns = n_strategies(sc);
    if (ns < 1) return DSMOE__FAIL(DSMOE_STATUS_INVALID_CONFIG, "strategies: none given");
    if (sc->n_alphas > 0) {
        int has_aux = 0;
        for (int i = 0; i < ns; i++) has_aux |= strategy_at(sc, i) && strcmp(strategy_at(sc, i), "aux-loss") == 0;
        if (!has_aux)
            return DSMOE__FAIL(DSMOE_STATUS_INVALID_CONFIG, "alpha: values for aux-loss, which is not among the strategies");
    }
    for (int i = 0; i < ns; i++) {
        const char *s = strategy_at(sc, i);
        if (!s || !s[0] || strlen(s) > 60 || strchr(s, '/'))
            return DSMOE__FAIL(DSMOE_STATUS_INVALID_CONFIG, "strategies: a bad name '%s'", s ? s : "(null)");
        for (int j = 0; j < i; j++)
            if (strcmp(strategy_at(sc, j), s) == 0)
                return DSMOE__FAIL(DSMOE_STATUS_INVALID_CONFIG, "strategies: '%s' given twice", s);
        int aux = strcmp(s, "aux-loss") == 0 && sc->n_alphas > 0;
        int na = aux ? sc->n_alphas : 1;
        for (int a = 0; a < na; a++)
            for (int32_t k = 1; k <= sc->n_seeds; k++) {
                if (*n == cap) return DSMOE__FAIL(DSMOE_STATUS_INVALID_CONFIG, "more than %d runs", cap);
                planned *p = &out[(*n)++];
                p->strategy = s;
                p->alpha = aux ? sc->alphas[a] : NAN;
                p->seed = k;
                if (aux) snprintf(p->name, sizeof p->name, "%s-a%g-seed%d", s, p->alpha, k);
                else snprintf(p->name, sizeof p->name, "%s-seed%d", s, k);
            }
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_study_plan(const dsmoe_study_config *sc, char (*names)[128], int32_t cap, int32_t *n_runs) {
    if (!sc || !n_runs || (cap > 0 && !names))
        return DSMOE__FAIL(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_study_plan: NULL argument");
    planned *p = calloc(DSMOE_STUDY_MAX_RUNS, sizeof *p);
    if (!p) return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
    int32_t n;
    dsmoe_status st = plan(sc, p, DSMOE_STUDY_MAX_RUNS, &n);
    if (!st) {
        for (int32_t i = 0; i < n && i < cap; i++) memcpy(names[i], p[i].name, 128);
        *n_runs = n;
    }
    free(p);
    return st;
}

/* The config of one planned run. */
static dsmoe_status run_config(const dsmoe_study_config *sc, const planned *p, dsmoe_run_config *rc) {
    *rc = sc->base;
    dsmoe_status st = dsmoe__study_test_hooks.strategy_apply ? dsmoe__study_test_hooks.strategy_apply(p->strategy, rc)
                      : HAVE(dsmoe_run_strategy_apply)       ? dsmoe_run_strategy_apply(p->strategy, rc)
                                                             : no_runs("dsmoe_study_run");
    if (st) return st;
    rc->seed = (uint64_t)p->seed;
    rc->train.seed = (uint64_t)p->seed;
    if (!isnan(p->alpha)) rc->train.balance_alpha = (float)p->alpha;
    if (sc->apply && (st = sc->apply(rc, p->strategy, sc->apply_user))) return st;
    return DSMOE_OK;
}

static dsmoe_status run_error(dsmoe_status st, const char *name) {
    char prefix[160];
    snprintf(prefix, sizeof prefix, "run %s", name);
    return dsmoe__error_prefix(st, prefix);
}

static int is_dir(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static dsmoe_status make_dir(const char *p) {
    if (mkdir(p, 0777) == 0 || (errno == EEXIST && is_dir(p))) return DSMOE_OK;
    return DSMOE__FAIL(DSMOE_STATUS_IO, "%s: cannot create the folder: %s", p, strerror(errno));
}

/* 1: the run in dir reached `steps` (a train and an eval record at that step, and a
 * checkpoint); 0: not (or no readable metrics). */
static int finished(const char *dir, int64_t steps) {
    size_t L = strlen(dir) + 16;
    char *ck = malloc(L);
    if (!ck) return 0;
    snprintf(ck, L, "%s/checkpoint", dir);
    int has_ck = is_dir(ck);
    free(ck);
    if (!has_ck) return 0;
    dsmoe__trace tr;
    if (dsmoe__trace_load(dir, &tr) != DSMOE_OK) {
        dsmoe_clear_error();
        return 0;
    }
    int done = tr.nt > 0 && tr.t_step[tr.nt - 1] == steps && tr.ne > 0 && tr.e_step[tr.ne - 1] == steps;
    dsmoe__trace_free(&tr);
    return done;
}

static int has_checkpoint(const char *dir) {
    size_t L = strlen(dir) + 16;
    char *ck = malloc(L);
    if (!ck) return 0;
    snprintf(ck, L, "%s/checkpoint", dir);
    int r = is_dir(ck);
    free(ck);
    return r;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct study_cb {
    dsmoe_study_progress sp;
    dsmoe_study_progress_fn fn;
    void *user;
    double run_t0;
    double done_s;     /* wall time of the runs trained in this call */
    int32_t done_runs;
    int32_t left_after; /* runs still to train after this one */
} study_cb;

static void on_step(const dsmoe_run_progress *p, void *user) {
    study_cb *c = user;
    double el = now_s() - c->run_t0;
    double per_run = c->done_runs > 0 ? c->done_s / c->done_runs : el + (p->eta_s > 0 ? p->eta_s : 0);
    c->sp.step = p;
    c->sp.study_eta_s = (p->eta_s > 0 ? p->eta_s : 0) + per_run * c->left_after;
    if (c->fn) c->fn(&c->sp, c->user);
}

dsmoe_status dsmoe_study_run(const dsmoe_study_config *sc, const char *out_dir, int32_t n_threads,
                             dsmoe_study_progress_fn progress, void *user) {
    if (!sc || !out_dir) return DSMOE__FAIL(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_study_run: NULL argument");
    dsmoe_status (*run)(const dsmoe_run_config *, const char *, const dsmoe_run_options *, dsmoe_run_result *) =
        dsmoe__study_test_hooks.run ? dsmoe__study_test_hooks.run : HAVE(dsmoe_run) ? dsmoe_run : NULL;
    if (!run || (!HAVE(dsmoe_run_strategy_apply) && !dsmoe__study_test_hooks.strategy_apply) ||
        (!sc->strategies && !HAVE(dsmoe_run_strategy_name)))
        return no_runs("dsmoe_study_run");
    planned *pl = calloc(DSMOE_STUDY_MAX_RUNS, sizeof *pl);
    dsmoe_run_config *rcs = calloc(DSMOE_STUDY_MAX_RUNS, sizeof *rcs);
    uint8_t *done = calloc(DSMOE_STUDY_MAX_RUNS, 1);
    size_t L = strlen(out_dir) + 160;
    char *runs = malloc(L), *dir = malloc(L);
    dsmoe_status st = DSMOE_OK;
    int32_t n = 0;
    if (!pl || !rcs || !done || !runs || !dir) {
        st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
        goto out;
    }
    /* data-parallel: rank 0 alone touches the study folder; the others follow its word */
    const dsmoe_run_collective *co =
        sc->collective && sc->collective->size > 1 ? sc->collective : NULL;
    const int lead = !co || co->rank == 0;
    if ((st = plan(sc, pl, DSMOE_STUDY_MAX_RUNS, &n))) goto out;
    /* every run's config first, so that a bad flag fails before any training */
    for (int32_t i = 0; i < n; i++) {
        if ((st = run_config(sc, &pl[i], &rcs[i]))) {
            st = run_error(st, pl[i].name);
            goto out;
        }
        if (!dsmoe__study_test_hooks.run && HAVE(dsmoe_run_config_validate) && (st = dsmoe_run_config_validate(&rcs[i]))) {
            st = run_error(st, pl[i].name);
            goto out;
        }
    }
    /* done[i]: 1 finished, 2 to resume, 0 to start (rank 0's view, sent to every rank) */
    int64_t state[DSMOE_STUDY_MAX_RUNS] = {0};
    snprintf(runs, L, "%s/runs", out_dir);
    if (lead && ((st = make_dir(out_dir)) || (st = make_dir(runs)))) goto agreed;
    for (int32_t i = 0; i < n; i++) {
        snprintf(dir, L, "%s/%s", runs, pl[i].name);
        state[i] = !lead ? 0 : finished(dir, rcs[i].steps) ? 1 : has_checkpoint(dir) ? 2 : 0;
    }
agreed:
    if ((st = dsmoe__run_agree(co, st))) goto out;
    if (co && co->sum_i64(co->ctx, state, n)) {
        st = DSMOE__FAIL(DSMOE_STATUS_IO, "study: the ranks' run states failed (communication)");
        goto out;
    }
    int32_t left = 0;
    for (int32_t i = 0; i < n; i++) {
        done[i] = (uint8_t)state[i];
        left += done[i] != 1;
    }
    study_cb cb;
    memset(&cb, 0, sizeof cb);
    cb.fn = progress;
    cb.user = user;
    cb.sp.n_runs = n;
    for (int32_t i = 0; i < n; i++) {
        snprintf(dir, L, "%s/%s", runs, pl[i].name);
        cb.sp.run = i + 1;
        cb.sp.name = pl[i].name;
        cb.sp.step = NULL;
        if (done[i] == 1) {
            cb.sp.skipped = 1;
            cb.sp.study_eta_s = cb.done_runs > 0 ? cb.done_s / cb.done_runs * left : 0;
            if (progress) progress(&cb.sp, user);
            continue;
        }
        cb.sp.skipped = 0;
        left--;
        cb.left_after = left;
        cb.run_t0 = now_s();
        dsmoe_run_options ro;
        memset(&ro, 0, sizeof ro);
        ro.n_threads = n_threads;
        ro.resume = done[i] == 2;
        ro.progress = on_step;
        ro.user = &cb;
        ro.collective = co;
        if ((st = run(&rcs[i], dir, &ro, NULL))) {
            st = run_error(st, pl[i].name);
            goto out;
        }
        cb.done_s += now_s() - cb.run_t0;
        cb.done_runs++;
    }
    st = dsmoe__run_agree(co, lead ? dsmoe_study_summarize(out_dir, out_dir) : DSMOE_OK);
out:
    free(pl);
    free(rcs);
    free(done);
    free(runs);
    free(dir);
    return st;
}
