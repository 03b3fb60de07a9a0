/*
 * test_study_run.c — the study's orchestration with a stand-in for the trainer
 * (dsmoe__study_test_hooks): the plan (strategies × α × seeds, folder names), each run's
 * config (strategy, then seed, α, then the caller's hook), the progress (run i of n,
 * skipped runs), a bad strategy refused before anything is trained, and an interrupted
 * study that, started again, skips its finished runs, resumes the unfinished one from its
 * checkpoint (resume = 1) and ends with the same summary as an uninterrupted study.
 */
#include "testlib.h"

#include "study/study_internal.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

/* Removes a folder tree left by an earlier run of the test. */
static void rm_tree(const char *path) {
    DIR *d = opendir(path);
    if (!d) {
        unlink(path);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char p[4096];
        snprintf(p, sizeof p, "%s/%s", path, e->d_name);
        rm_tree(p);
    }
    closedir(d);
    rmdir(path);
}

static int calls, fail_at = -1, eval_every_seen = 1;
static char last_names[64][128];
static int resumed[64];

static dsmoe_status fake_apply(const char *name, dsmoe_run_config *rc) {
    if (strcmp(name, "v3") != 0 && strcmp(name, "aux-loss") != 0)
        return DSMOE__FAIL(DSMOE_STATUS_INVALID_CONFIG, "unknown strategy '%s'", name);
    snprintf(rc->strategy, sizeof rc->strategy, "%s", name);
    rc->train.balance_alpha = strcmp(name, "aux-loss") == 0 ? 1e-3f : 1e-4f;
    rc->eval_every = 0;
    return DSMOE_OK;
}

static dsmoe_status apply_hook(dsmoe_run_config *rc, const char *strategy, void *user) {
    (void)strategy;
    rc->eval_every = *(const int64_t *)user; /* after the strategy, as the CLI's flags */
    return DSMOE_OK;
}

/* Writes a deterministic run: values from the strategy, α and seed. */
static dsmoe_status fake_run(const dsmoe_run_config *rc, const char *dir, const dsmoe_run_options *o,
                             dsmoe_run_result *res) {
    (void)res;
    int k = calls++;
    const char *base = strrchr(dir, '/');
    snprintf(last_names[k], sizeof last_names[k], "%s", base ? base + 1 : dir);
    resumed[k] = o->resume;
    eval_every_seen &= rc->eval_every == 777;
    if (rc->seed != rc->train.seed) eval_every_seen = 0;
    mkdir(dir, 0777);
    char p[4096];
    snprintf(p, sizeof p, "%s/metrics.jsonl", dir);
    FILE *f = fopen(p, "w");
    if (!f) return DSMOE__FAIL(DSMOE_STATUS_IO, "%s", p);
    fprintf(f,
            "{\"type\":\"run\",\"strategy\":\"%s\",\"seed\":%llu,\"steps\":%lld,\"experts\":4,\"top_k\":2,"
            "\"domains\":[\"a\",\"b\"],\"moe_layers\":[{\"layer\":1,\"mtp\":false}]}\n",
            rc->strategy, (unsigned long long)rc->seed, (long long)rc->steps);
    int aux = strcmp(rc->strategy, "aux-loss") == 0;
    int64_t stop = k == fail_at ? rc->steps / 2 : rc->steps;
    for (int64_t s = 1; s <= stop; s++) {
        int skew = aux ? 3 : 1;
        fprintf(f,
                "{\"type\":\"train\",\"step\":%lld,\"loss\":%.6f,\"grad_norm\":1,\"tokens_per_s\":100,"
                "\"layers\":[{\"layer\":1,\"counts\":[%d,%d,%d,%d]}]}\n",
                (long long)s, 3.0 - 0.1 * (double)s + 0.01 * (double)rc->seed + rc->train.balance_alpha * 10,
                10 + skew * (int)((s + (int64_t)rc->seed) % 5), 10, 10, 10);
        dsmoe_run_progress pr;
        memset(&pr, 0, sizeof pr);
        pr.step = s;
        pr.steps = rc->steps;
        pr.eta_s = (double)(rc->steps - s);
        if (o->progress) o->progress(&pr, o->user);
    }
    if (stop == rc->steps)
        fprintf(f,
                "{\"type\":\"eval\",\"step\":%lld,\"loss\":%.6f,\"layers\":[{\"layer\":1,\"counts\":[9,7,8,%d],"
                "\"domain_counts\":[[5,2,4,%d],[4,5,4,0]],\"top_weight_hist\":[0,0,0,0,0,0,0,0,0,0,0,1,2,3,4,5,"
                "6,7,8,%d],\"score_entropy\":1.25}]}\n",
                (long long)rc->steps, 2.0 + 0.01 * (double)rc->seed + rc->train.balance_alpha * 10, 6 + (int)rc->seed,
                6 + (int)rc->seed, aux ? 20 : 2);
    fclose(f);
    snprintf(p, sizeof p, "%s/checkpoint", dir);
    mkdir(p, 0777);
    if (k == fail_at) return DSMOE__FAIL(DSMOE_STATUS_IO, "killed at step %lld", (long long)stop);
    return DSMOE_OK;
}

typedef struct prog {
    int events, skipped, last_run, n_runs, bad_eta;
} prog;

static void on_progress(const dsmoe_study_progress *p, void *user) {
    prog *g = user;
    g->events++;
    g->skipped += p->skipped;
    g->last_run = p->run;
    g->n_runs = p->n_runs;
    if (!(p->study_eta_s >= 0)) g->bad_eta++;
}

static const char *const strategies[2] = {"v3", "aux-loss"};
static const double alphas[2] = {1e-3, 1e-2};
static int64_t eval_every = 777;

static dsmoe_study_config config(void) {
    dsmoe_study_config sc;
    memset(&sc, 0, sizeof sc);
    sc.base.steps = 10;
    sc.base.log_every = 1;
    sc.strategies = strategies;
    sc.n_strategies = 2;
    sc.alphas = alphas;
    sc.n_alphas = 2;
    sc.n_seeds = 2;
    sc.apply = apply_hook;
    sc.apply_user = &eval_every;
    return sc;
}

static char *read_all(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = calloc((size_t)n + 1, 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) {
        free(s);
        s = NULL;
    }
    fclose(f);
    return s;
}

static void test_plan(void) {
    dsmoe_study_config sc = config();
    char names[16][128];
    int32_t n = 0;
    ASSERT_OK(dsmoe_study_plan(&sc, names, 16, &n));
    ASSERT_EQ_INT(n, 6);
    static const char *const want[6] = {"v3-seed1", "v3-seed2", "aux-loss-a0.001-seed1", "aux-loss-a0.001-seed2",
                                        "aux-loss-a0.01-seed1", "aux-loss-a0.01-seed2"};
    for (int i = 0; i < 6 && i < n; i++) ASSERT_TRUE(strcmp(names[i], want[i]) == 0);
    sc.n_seeds = 0;
    ASSERT_STATUS(dsmoe_study_plan(&sc, names, 16, &n), DSMOE_STATUS_INVALID_CONFIG);
    sc = config();
    static const char *const twice[2] = {"v3", "v3"};
    sc.strategies = twice;
    ASSERT_STATUS(dsmoe_study_plan(&sc, names, 16, &n), DSMOE_STATUS_INVALID_CONFIG);
    sc = config();
    static const char *const only_v3[1] = {"v3"};
    sc.strategies = only_v3;
    sc.n_strategies = 1;
    ASSERT_STATUS(dsmoe_study_plan(&sc, names, 16, &n), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "aux-loss") != NULL);
    sc = config();
    static const double neg[1] = {-1};
    sc.alphas = neg;
    sc.n_alphas = 1;
    ASSERT_STATUS(dsmoe_study_plan(&sc, names, 16, &n), DSMOE_STATUS_INVALID_CONFIG);
}

static void test_without_trainer(void) {
    dsmoe__study_test_hooks.run = NULL;
    dsmoe__study_test_hooks.strategy_apply = NULL;
    dsmoe_study_config sc;
    dsmoe_clear_error();
    dsmoe_status st = dsmoe_study_config_default("tiny", &sc);
    if (st == DSMOE_OK) { /* the trainer is linked in */
        ASSERT_EQ_INT(sc.n_seeds, 3);
        ASSERT_TRUE(sc.strategies == NULL);
        return;
    }
    ASSERT_EQ_INT(st, DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "dsmoe_run") != NULL);
    sc = config();
    ASSERT_STATUS(dsmoe_study_run(&sc, tl_tmp("study_no_trainer"), 1, NULL, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
}

static void test_study_and_resume(void) {
    dsmoe__study_test_hooks.run = fake_run;
    dsmoe__study_test_hooks.strategy_apply = fake_apply;
    dsmoe_study_config sc = config();
    /* uninterrupted */
    calls = 0;
    fail_at = -1;
    prog g = {0};
    ASSERT_OK(dsmoe_study_run(&sc, tl_tmp("study_whole"), 1, on_progress, &g));
    ASSERT_EQ_INT(calls, 6);
    for (int i = 0; i < 6; i++) ASSERT_EQ_INT(resumed[i], 0);
    ASSERT_TRUE(strcmp(last_names[2], "aux-loss-a0.001-seed1") == 0);
    ASSERT_EQ_INT(g.skipped, 0);
    ASSERT_EQ_INT(g.last_run, 6);
    ASSERT_EQ_INT(g.n_runs, 6);
    ASSERT_EQ_INT(g.events, 6 * 10);
    ASSERT_EQ_INT(g.bad_eta, 0);
    ASSERT_EQ_INT(eval_every_seen, 1);
    /* interrupted in the third run, then started again */
    calls = 0;
    fail_at = 2;
    ASSERT_STATUS(dsmoe_study_run(&sc, tl_tmp("study_cut"), 1, NULL, NULL), DSMOE_STATUS_IO);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "run aux-loss-a0.001-seed1") != NULL);
    ASSERT_EQ_INT(calls, 3);
    calls = 0;
    fail_at = -1;
    prog g2 = {0};
    ASSERT_OK(dsmoe_study_run(&sc, tl_tmp("study_cut"), 1, on_progress, &g2));
    ASSERT_EQ_INT(calls, 4);
    ASSERT_TRUE(strcmp(last_names[0], "aux-loss-a0.001-seed1") == 0);
    ASSERT_EQ_INT(resumed[0], 1); /* the unfinished run, from its checkpoint */
    for (int i = 1; i < 4; i++) ASSERT_EQ_INT(resumed[i], 0);
    ASSERT_EQ_INT(g2.skipped, 2);
    char a[4096], b[4096];
    snprintf(a, sizeof a, "%s/summary.json", tl_tmp("study_whole"));
    snprintf(b, sizeof b, "%s/summary.json", tl_tmp("study_cut"));
    char *ja = read_all(a), *jb = read_all(b);
    ASSERT_TRUE(ja && jb && strcmp(ja, jb) == 0);
    ASSERT_TRUE(ja && strstr(ja, "\"aux-loss-a0.01\"") != NULL); /* α variants are groups of their own */
    free(ja);
    free(jb);
    /* all done: nothing trained */
    calls = 0;
    prog g3 = {0};
    ASSERT_OK(dsmoe_study_run(&sc, tl_tmp("study_cut"), 1, on_progress, &g3));
    ASSERT_EQ_INT(calls, 0);
    ASSERT_EQ_INT(g3.skipped, 6);
    /* a bad strategy: refused before anything is trained or created */
    static const char *const bad[2] = {"v3", "nonsense"};
    sc.strategies = bad;
    sc.n_alphas = 0;
    ASSERT_STATUS(dsmoe_study_run(&sc, tl_tmp("study_bad"), 1, NULL, NULL), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "nonsense") != NULL);
    ASSERT_EQ_INT(calls, 0);
    struct stat sb;
    ASSERT_TRUE(stat(tl_tmp("study_bad"), &sb) != 0);
    dsmoe__study_test_hooks.run = NULL;
    dsmoe__study_test_hooks.strategy_apply = NULL;
}

int main(void) {
    rm_tree(tl_tmp("study_whole"));
    rm_tree(tl_tmp("study_cut"));
    rm_tree(tl_tmp("study_bad"));
    RUN(test_plan);
    RUN(test_without_trainer);
    RUN(test_study_and_resume);
    return TEST_SUMMARY();
}
