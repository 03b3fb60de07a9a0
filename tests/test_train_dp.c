/*
 * test_train_dp.c — data-parallel runs through dsmoe_run_options.collective without MPI:
 * R threads, each a rank with its own dsmoe_run, joined by an in-process collective
 * (sums in rank order over shared memory, error agreement). At the tiny preset: every
 * rank sees the same losses, bit for bit; they follow the one-process run on the same
 * global batch (relative 1e-5); two runs of 2 ranks write the same checkpoint bytes;
 * R = 1 through the hook is the one-process run bit for bit; batch % R != 0 is refused
 * on every rank naming the batch; a data file one rank cannot read stops every rank
 * with that rank's message. The balance losses over the whole batch (aux-loss, v2) follow
 * one process on 2 and 4 ranks too. Expert sharding: a training model holding a block of experts
 * has one process's values there and zeros elsewhere, and a sharded run whose blocks
 * leave an expert out or that has no exec stops every rank naming it.
 * (tests/ep_train.sh runs the same over MPI with the CLI, expert parallelism included.)
 */
/* mincore, which glibc declares only with _DEFAULT_SOURCE */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif
#include "testlib.h"

#include <pthread.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <sys/stat.h>
#include <unistd.h>

enum { MAXR = 4, MAXSTEPS = 16 };

/* ------------------------------------------------- in-process collective -- */

typedef struct world {
    int R;
    pthread_barrier_t bar;
    void *slot[MAXR];
    int32_t st[MAXR];
    char msg[MAXR][1024];
} world;

typedef struct rank_ctx {
    world *w;
    int rank;
} rank_ctx;

static int w_sum_f32(void *ctx, float *x, int64_t n, double scale) {
    rank_ctx *c = (rank_ctx *)ctx;
    world *w = c->w;
    float *tmp = (float *)malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (!tmp) abort();
    w->slot[c->rank] = x;
    pthread_barrier_wait(&w->bar);
    for (int64_t i = 0; i < n; i++) {
        double a = 0;
        for (int r = 0; r < w->R; r++) a += (double)((const float *)w->slot[r])[i];
        tmp[i] = (float)(a * scale);
    }
    pthread_barrier_wait(&w->bar);
    memcpy(x, tmp, (size_t)n * sizeof(float));
    free(tmp);
    return 0;
}

static int w_sum_f64(void *ctx, double *x, int64_t n) {
    rank_ctx *c = (rank_ctx *)ctx;
    world *w = c->w;
    double *tmp = (double *)malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
    if (!tmp) abort();
    w->slot[c->rank] = x;
    pthread_barrier_wait(&w->bar);
    for (int64_t i = 0; i < n; i++) {
        double a = 0;
        for (int r = 0; r < w->R; r++) a += ((const double *)w->slot[r])[i];
        tmp[i] = a;
    }
    pthread_barrier_wait(&w->bar);
    memcpy(x, tmp, (size_t)n * sizeof(double));
    free(tmp);
    return 0;
}

static int w_sum_i64(void *ctx, int64_t *x, int64_t n) {
    rank_ctx *c = (rank_ctx *)ctx;
    world *w = c->w;
    int64_t *tmp = (int64_t *)malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (!tmp) abort();
    w->slot[c->rank] = x;
    pthread_barrier_wait(&w->bar);
    for (int64_t i = 0; i < n; i++) {
        int64_t a = 0;
        for (int r = 0; r < w->R; r++) a += ((const int64_t *)w->slot[r])[i];
        tmp[i] = a;
    }
    pthread_barrier_wait(&w->bar);
    memcpy(x, tmp, (size_t)n * sizeof(int64_t));
    free(tmp);
    return 0;
}

static int32_t w_agree(void *ctx, int32_t status, char *msg, size_t cap, int32_t *first) {
    rank_ctx *c = (rank_ctx *)ctx;
    world *w = c->w;
    w->st[c->rank] = status;
    snprintf(w->msg[c->rank], sizeof w->msg[0], "%s", msg);
    pthread_barrier_wait(&w->bar);
    int32_t out = 0;
    for (int r = 0; r < w->R; r++)
        if (w->st[r] != 0) {
            out = w->st[r];
            *first = r;
            snprintf(msg, cap, "%s", w->msg[r]);
            break;
        }
    pthread_barrier_wait(&w->bar);
    return out;
}

/* x of rank `from` into rank `to`'s (every rank calls it). */
static int w_copy_f32(void *ctx, float *x, int64_t n, int32_t from, int32_t to) {
    rank_ctx *c = (rank_ctx *)ctx;
    world *w = c->w;
    w->slot[c->rank] = x;
    pthread_barrier_wait(&w->bar);
    if (c->rank == to) memcpy(x, w->slot[from], (size_t)n * sizeof(float));
    pthread_barrier_wait(&w->bar);
    return 0;
}

/* Expert sharding: the default blocks (rank r: floor(r·E/R) .. floor((r+1)·E/R) − 1), or
 * with shard_gap a split that leaves expert 0 to nobody. */
static int shard_gap;
static int w_expert_shard(void *ctx, int32_t E, int32_t *first, int32_t *last) {
    rank_ctx *c = (rank_ctx *)ctx;
    *first = (int32_t)((int64_t)c->rank * E / c->w->R) + (shard_gap && c->rank == 0);
    *last = (int32_t)((int64_t)(c->rank + 1) * E / c->w->R) - 1;
    return 0;
}

/* ---------------------------------------------------------------- ranks -- */

typedef struct rank_job {
    rank_ctx ctx;
    dsmoe_run_collective coll;
    const dsmoe_run_config *rc;
    const char *dir;
    dsmoe_status st;
    char err[1024];
    dsmoe_run_result res;
    double loss[MAXSTEPS + 1];
} rank_job;

static void on_progress(const dsmoe_run_progress *p, void *user) {
    rank_job *j = (rank_job *)user;
    if (!p->is_eval && p->step <= MAXSTEPS) j->loss[p->step] = p->loss;
}

static void *rank_main(void *arg) {
    rank_job *j = (rank_job *)arg;
    dsmoe_run_options o;
    memset(&o, 0, sizeof o);
    o.n_threads = 1;
    o.progress = on_progress;
    o.user = j;
    o.collective = &j->coll;
    j->st = dsmoe_run(j->rc, j->dir, &o, &j->res);
    snprintf(j->err, sizeof j->err, "%s", j->st != DSMOE_OK ? dsmoe_last_error() : "");
    return NULL;
}

static int use_shard; /* give the ranks' collective expert_shard */

/* Runs R ranks; rcs[r] is rank r's config. */
static void run_ranks(int R, const dsmoe_run_config *const *rcs, const char *dir, rank_job *jobs) {
    world w;
    memset(&w, 0, sizeof w);
    w.R = R;
    pthread_barrier_init(&w.bar, NULL, (unsigned)R);
    pthread_t th[MAXR];
    for (int r = 0; r < R; r++) {
        memset(&jobs[r], 0, sizeof jobs[r]);
        jobs[r].ctx.w = &w;
        jobs[r].ctx.rank = r;
        jobs[r].coll.rank = r;
        jobs[r].coll.size = R;
        jobs[r].coll.ctx = &jobs[r].ctx;
        jobs[r].coll.sum_f32 = w_sum_f32;
        jobs[r].coll.sum_f64 = w_sum_f64;
        jobs[r].coll.sum_i64 = w_sum_i64;
        jobs[r].coll.agree = w_agree;
        jobs[r].coll.expert_shard = use_shard ? w_expert_shard : NULL;
        jobs[r].coll.copy_f32 = w_copy_f32;
        jobs[r].rc = rcs[r];
        jobs[r].dir = dir;
        pthread_create(&th[r], NULL, rank_main, &jobs[r]);
    }
    for (int r = 0; r < R; r++) pthread_join(th[r], NULL);
    pthread_barrier_destroy(&w.bar);
}

/* ---------------------------------------------------------------- utils -- */

static int same_file(const char *a, const char *b) {
    size_t na = 0, nb = 0;
    char *pa = tl_slurp(a, &na), *pb = tl_slurp(b, &nb);
    int same = pa && pb && na == nb && memcmp(pa, pb, na) == 0;
    free(pa);
    free(pb);
    return same;
}

static dsmoe_run_config tiny_config(void) {
    dsmoe_run_config rc;
    if (dsmoe_run_config_default("tiny", &rc) != DSMOE_OK) abort();
    rc.steps = 6;
    rc.adamw.warmup_steps = 1;
    rc.corpus.tokens = 60000;
    rc.eval_every = 3;
    rc.eval_tokens = 512;
    rc.train.batch = 8;
    return rc;
}

static char dirs[6][4096];

static const char *fresh(int i, const char *name) {
    snprintf(dirs[i], sizeof dirs[i], "%s", tl_tmp(name));
    tl_rm_rf(dirs[i]);
    return dirs[i];
}

/* ---------------------------------------------------------------- tests -- */

static void test_matches_one_process(void) {
    const dsmoe_run_config rc = tiny_config();
    const dsmoe_run_config *rcs[MAXR] = {&rc, &rc, &rc, &rc};
    rank_job one[1], two[MAXR], two_b[MAXR], four[MAXR], solo[1];
    run_ranks(1, rcs, fresh(0, "train_dp_one"), one);
    ASSERT_OK(one[0].st);
    /* R = 1 through the hook: the one-process run, bit for bit */
    run_ranks(1, rcs, fresh(4, "train_dp_solo"), solo);
    ASSERT_OK(solo[0].st);
    {
        dsmoe_run_options o;
        memset(&o, 0, sizeof o);
        o.n_threads = 1;
        ASSERT_OK(dsmoe_run(&rc, fresh(5, "train_dp_plain"), &o, NULL));
        char a[4200], b[4200];
        snprintf(a, sizeof a, "%s/checkpoint/model.safetensors", dirs[4]);
        snprintf(b, sizeof b, "%s/checkpoint/model.safetensors", dirs[5]);
        ASSERT_TRUE(same_file(a, b));
    }
    run_ranks(2, rcs, fresh(1, "train_dp_two"), two);
    run_ranks(2, rcs, fresh(2, "train_dp_two_b"), two_b);
    run_ranks(4, rcs, fresh(3, "train_dp_four"), four);
    for (int r = 0; r < 4; r++) {
        if (r < 2) ASSERT_OK(two[r].st);
        if (r < 2) ASSERT_OK(two_b[r].st);
        ASSERT_OK(four[r].st);
    }
    double worst = 0;
    for (int s = 1; s <= 6; s++) {
        const double l1 = one[0].loss[s];
        ASSERT_TRUE(l1 > 0);
        for (int r = 0; r < 4; r++) {
            ASSERT_TRUE(four[r].loss[s] == four[0].loss[s]); /* every rank the same bits */
            if (r < 2) ASSERT_TRUE(two[r].loss[s] == two[0].loss[s]);
        }
        ASSERT_TRUE(two_b[0].loss[s] == two[0].loss[s]); /* repeated: the same bits */
        ASSERT_NEAR(two[0].loss[s], l1, 1e-5 * l1);
        ASSERT_NEAR(four[0].loss[s], l1, 1e-5 * l1);
        double d2 = fabs(two[0].loss[s] - l1) / l1, d4 = fabs(four[0].loss[s] - l1) / l1;
        worst = d2 > worst ? d2 : worst;
        worst = d4 > worst ? d4 : worst;
    }
    ASSERT_NEAR(two[1].res.val_loss, one[0].res.val_loss, 1e-5 * one[0].res.val_loss);
    ASSERT_NEAR(four[3].res.val_loss, one[0].res.val_loss, 1e-5 * one[0].res.val_loss);
    fprintf(stderr, "     largest relative train-loss difference to one process: %.3g\n", worst);
    char a[4200], b[4200];
    snprintf(a, sizeof a, "%s/checkpoint/model.safetensors", dirs[1]);
    snprintf(b, sizeof b, "%s/checkpoint/model.safetensors", dirs[2]);
    ASSERT_TRUE(same_file(a, b));
    /* rank 0 alone wrote the folder: metrics.jsonl holds one run */
    snprintf(a, sizeof a, "%s/metrics.jsonl", dirs[3]);
    char *m = tl_slurp(a, NULL);
    ASSERT_TRUE(m != NULL);
    if (m) {
        ASSERT_TRUE(strstr(m, "\"ranks\":4") != NULL);
        int runs = 0;
        for (char *p = m; (p = strstr(p, "\"type\":\"run\"")) != NULL; p++) runs++;
        ASSERT_EQ_INT(runs, 1);
    }
    free(m);
}

static void test_errors(void) {
    dsmoe_run_config rc = tiny_config();
    const dsmoe_run_config *rcs[MAXR] = {&rc, &rc, &rc, &rc};
    rank_job jobs[MAXR];
    /* batch 8 over 3 ranks */
    run_ranks(3, rcs, fresh(0, "train_dp_b3"), jobs);
    for (int r = 0; r < 3; r++) {
        ASSERT_EQ_INT(jobs[r].st, DSMOE_STATUS_INVALID_CONFIG);
        ASSERT_TRUE(strstr(jobs[r].err, "batch = 8 is not a multiple of the 3 ranks") != NULL);
    }
    struct stat sb;
    char p[4200];
    snprintf(p, sizeof p, "%s/checkpoint", dirs[0]);
    ASSERT_TRUE(stat(p, &sb) != 0);
    /* a data file rank 1 cannot read */
    char data[4200], missing[4300];
    snprintf(data, sizeof data, "%s", tl_tmp("train_dp_data.txt"));
    snprintf(missing, sizeof missing, "%s.missing", data);
    FILE *f = fopen(data, "wb");
    ASSERT_TRUE(f != NULL);
    if (!f) return;
    for (int i = 1; i <= 300; i++) fprintf(f, "line %d of a small text file\n\n", i);
    fclose(f);
    const char *files0[1] = {data}, *files1[1] = {missing};
    dsmoe_run_config r0 = rc, r1 = rc;
    r0.train.seq_len = r1.train.seq_len = 16;
    r0.corpus.valid_fraction = r1.corpus.valid_fraction = 0.2;
    r0.data_files = files0, r0.n_data_files = 1;
    r1.data_files = files1, r1.n_data_files = 1;
    const dsmoe_run_config *mixed[2] = {&r0, &r1};
    run_ranks(2, mixed, fresh(1, "train_dp_miss"), jobs);
    for (int r = 0; r < 2; r++) {
        ASSERT_EQ_INT(jobs[r].st, DSMOE_STATUS_IO);
        ASSERT_TRUE(strstr(jobs[r].err, "rank 1: ") != NULL);
        ASSERT_TRUE(strstr(jobs[r].err, ".missing") != NULL);
    }
}

/* The value after "key": in the train record of step `step` in metrics.jsonl at path
 * (NAN if absent). */
static double train_field(const char *path, int step, const char *key) {
    char *m = tl_slurp(path, NULL);
    double v = NAN;
    char head[64], k[64];
    snprintf(head, sizeof head, "{\"type\":\"train\",\"step\":%d,", step);
    snprintf(k, sizeof k, "\"%s\":", key);
    const char *line = m ? strstr(m, head) : NULL;
    const char *end = line ? strchr(line, '\n') : NULL;
    const char *p = line ? strstr(line, k) : NULL;
    if (p && (!end || p < end)) v = strtod(p + strlen(k), NULL);
    free(m);
    return v;
}

/* The balance losses over the whole batch (aux-loss and v2: the expert kind, sigmoid and
 * softmax scores; aux-loss with the switch kind) take f from the counts summed over the
 * ranks: 2 and 4 ranks follow one process on the train loss, the balance loss, the
 * gradient norm and the validation loss (1e-5). */
static void test_batch_balance_losses(void) {
    const char *strategies[3] = {"aux-loss", "v2", "aux-loss"};
    double worst = 0;
    for (int si = 0; si < 3; si++) {
        dsmoe_run_config rc = tiny_config();
        ASSERT_OK(dsmoe_run_strategy_apply(strategies[si], &rc));
        ASSERT_TRUE(rc.train.balance_alpha > 0);
        ASSERT_TRUE(rc.train.balance_kind == DSMOE_BALANCE_LOSS_EXPERT);
        if (si == 2) rc.train.balance_kind = DSMOE_BALANCE_LOSS_SWITCH;
        const dsmoe_run_config *rcs[MAXR] = {&rc, &rc, &rc, &rc};
        rank_job one[1], two[MAXR], four[MAXR];
        run_ranks(1, rcs, fresh(0, "train_dp_bal_one"), one);
        run_ranks(2, rcs, fresh(1, "train_dp_bal_two"), two);
        run_ranks(4, rcs, fresh(2, "train_dp_bal_four"), four);
        ASSERT_OK(one[0].st);
        for (int r = 0; r < 4; r++) {
            if (r < 2) ASSERT_OK(two[r].st);
            ASSERT_OK(four[r].st);
        }
        if (one[0].st != DSMOE_OK || two[0].st != DSMOE_OK || four[0].st != DSMOE_OK) {
            fprintf(stderr, "     %s: %s | %s | %s\n", strategies[si], one[0].err, two[0].err,
                    four[0].err);
            continue;
        }
        char m1[4200], m2[4200], m4[4200];
        snprintf(m1, sizeof m1, "%s/metrics.jsonl", dirs[0]);
        snprintf(m2, sizeof m2, "%s/metrics.jsonl", dirs[1]);
        snprintf(m4, sizeof m4, "%s/metrics.jsonl", dirs[2]);
        const char *keys[3] = {"loss", "balance", "grad_norm"};
        for (int s = 1; s <= 6; s++) {
            for (int r = 1; r < 4; r++) {
                ASSERT_TRUE(four[r].loss[s] == four[0].loss[s]);
                if (r < 2) ASSERT_TRUE(two[r].loss[s] == two[0].loss[s]);
            }
            for (int ki = 0; ki < 3; ki++) {
                const double a = train_field(m1, s, keys[ki]);
                const double b = train_field(m2, s, keys[ki]);
                const double c = train_field(m4, s, keys[ki]);
                ASSERT_TRUE(a > 0);
                ASSERT_NEAR(b, a, 1e-5 * a);
                ASSERT_NEAR(c, a, 1e-5 * a);
                const double d = fmax(fabs(b - a), fabs(c - a)) / a;
                worst = d > worst ? d : worst;
            }
        }
        ASSERT_NEAR(two[1].res.val_loss, one[0].res.val_loss, 1e-5 * one[0].res.val_loss);
        ASSERT_NEAR(four[3].res.val_loss, one[0].res.val_loss, 1e-5 * one[0].res.val_loss);
    }
    fprintf(stderr,
            "     aux-loss, v2: largest relative difference to one process (loss, balance, "
            "gradient norm): %.3g\n",
            worst);
}

/* A rank whose loss fails before a MoE layer's counts sum (here: a bad token) joins that
 * sum with the error flag: the other rank fails too (IO, naming it) instead of waiting. */
typedef struct loss_job {
    dsmoe_train_model *tm;
    const int32_t *tok;
    dsmoe_status st;
    char err[1024];
} loss_job;

static void *loss_main(void *arg) {
    loss_job *j = (loss_job *)arg;
    dsmoe_train_loss l;
    j->st = dsmoe_train_model_loss(j->tm, j->tok, &l, 0);
    snprintf(j->err, sizeof j->err, "%s", j->st != DSMOE_OK ? dsmoe_last_error() : "");
    return NULL;
}

static void test_counts_sum_failure(void) {
    dsmoe_run_config rc = tiny_config();
    dsmoe_train_model_options o;
    dsmoe_train_model_options_default(&o);
    o.n_threads = 1;
    o.batch = 2;
    o.seq_len = 16;
    o.balance_alpha = 1e-3f;
    o.balance_kind = DSMOE_BALANCE_LOSS_EXPERT;
    world w;
    memset(&w, 0, sizeof w);
    w.R = 2;
    pthread_barrier_init(&w.bar, NULL, 2);
    rank_ctx ctx[2] = {{&w, 0}, {&w, 1}};
    loss_job jobs[2];
    int32_t tok[2][2 * 17];
    for (int r = 0; r < 2; r++) {
        memset(&jobs[r], 0, sizeof jobs[r]);
        ASSERT_OK(dsmoe_train_model_create(&rc.model, &o, &jobs[r].tm));
        if (!jobs[r].tm) return;
        ASSERT_OK(dsmoe_train_model_set_counts_sum(jobs[r].tm, w_sum_i64, &ctx[r]));
        for (int i = 0; i < 2 * 17; i++) tok[r][i] = (i * 7 + r) % 200;
        jobs[r].tok = tok[r];
    }
    tok[1][20] = -3; /* rank 1: a bad token, found before any MoE layer */
    pthread_t th[2];
    for (int r = 0; r < 2; r++) pthread_create(&th[r], NULL, loss_main, &jobs[r]);
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    ASSERT_EQ_INT(jobs[1].st, DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(jobs[1].err, "token -3") != NULL);
    ASSERT_EQ_INT(jobs[0].st, DSMOE_STATUS_IO);
    ASSERT_TRUE(strstr(jobs[0].err, "another process failed") != NULL);
    /* both well again: the losses run, and their backward */
    tok[1][20] = 5;
    for (int r = 0; r < 2; r++) pthread_create(&th[r], NULL, loss_main, &jobs[r]);
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < 2; r++) {
        ASSERT_OK(jobs[r].st);
        ASSERT_OK(dsmoe_train_model_backward(jobs[r].tm));
        dsmoe_train_model_free(jobs[r].tm);
    }
    pthread_barrier_destroy(&w.bar);
}

/* Resident pages among those wholly inside floats [lo, hi) of a page-aligned array
 * (-1 where mincore is not available). */
static long resident_pages(const float *base, int64_t lo, int64_t hi) {
#if defined(__linux__)
    const size_t ps = (size_t)sysconf(_SC_PAGESIZE);
    size_t a = ((size_t)lo * 4 + ps - 1) / ps * ps, b = (size_t)hi * 4 / ps * ps;
    if (b <= a) return 0;
    unsigned char *vec = (unsigned char *)malloc((b - a) / ps);
    if (!vec || mincore((void *)((const char *)base + a), b - a, vec) != 0) {
        free(vec);
        return -1;
    }
    long n = 0;
    for (size_t i = 0; i < (b - a) / ps; i++) n += vec[i] & 1;
    free(vec);
    return n;
#else
    (void)base, (void)lo, (void)hi;
    return -1;
#endif
}

/* A training model holding experts first .. last: the same values as the whole model's
 * there, zeros elsewhere, ranges that tile the layer, and no loss without an exec. */
static void test_sharded_model(void) {
    const dsmoe_run_config rc = tiny_config();
    dsmoe_train_model_options o = rc.train;
    o.n_threads = 1;
    dsmoe_train_model *full = NULL, *part = NULL;
    ASSERT_OK(dsmoe_train_model_create(&rc.model, &o, &full));
    const int32_t E = rc.model.n_routed_experts, first = 2, last = E / 2;
    ASSERT_OK(dsmoe_train_model_create_sharded(&rc.model, &o, first, last, &part));
    if (!full || !part) goto out;
    int32_t f = -1, l = -1;
    ASSERT_EQ_INT(dsmoe_train_model_expert_shard(part, &f, &l), 1);
    ASSERT_TRUE(f == first && l == last);
    ASSERT_EQ_INT(dsmoe_train_model_expert_shard(full, &f, &l), 0);
    ASSERT_TRUE(f == 0 && l == E - 1);
    /* the other experts' pages of the parameter and gradient arrays are not resident
     * (checked before anything reads them: a read maps the zero page, which mincore
     * counts) */
    {
        float *arr[2] = {dsmoe_train_model_params(part, NULL), dsmoe_train_model_grads(part, NULL)};
        long pages = 0, res = 0;
        for (int32_t k = 0; k < dsmoe_train_model_moe_count(part); k++)
            for (int j = 0; j < 2; j++) {
                int64_t lo = 0, per = 0;
                ASSERT_OK(dsmoe_train_model_expert_range(part, k, 0, &lo, &per));
                const int64_t cut[2][2] = {{lo, lo + first * per},
                                           {lo + (last + 1) * per, lo + E * per}};
                for (int c = 0; c < 2; c++) {
                    long q = resident_pages(arr[j], cut[c][0], cut[c][1]);
                    if (q < 0) res = -1000000;
                    res += q;
                    pages += (long)((cut[c][1] - cut[c][0]) * 4 / 4096);
                }
            }
        if (res >= 0) ASSERT_EQ_INT(res, 0);
        fprintf(stderr, "     other experts' pages resident: %ld (of about %ld)\n", res, pages);
    }
    int held = 0, zero = 0, rep = 0;
    for (int64_t i = 0; i < dsmoe_train_model_tensor_count(full); i++) {
        dsmoe_train_tensor a, b;
        ASSERT_OK(dsmoe_train_model_tensor(full, i, &a));
        ASSERT_OK(dsmoe_train_model_tensor(part, i, &b));
        int32_t k = -1;
        const int32_t e = dsmoe_train_model_tensor_expert(part, i, &k);
        ASSERT_EQ_INT(e, dsmoe_train_model_tensor_expert(full, i, NULL));
        if (!a.trainable) continue;
        if (e >= 0) { /* inside its expert's range */
            int64_t off = -1, n = 0;
            ASSERT_OK(dsmoe_train_model_expert_range(part, k, e, &off, &n));
            ASSERT_TRUE(b.offset >= off && b.offset + b.n <= off + n);
        }
        if (e < 0 || (e >= first && e <= last)) {
            ASSERT_TRUE(memcmp(a.data, b.data, (size_t)a.n * sizeof(float)) == 0);
            e < 0 ? rep++ : held++;
        } else {
            int nz = 0;
            for (int64_t j = 0; j < b.n; j++) nz += b.data[j] != 0.0f;
            ASSERT_EQ_INT(nz, 0);
            zero++;
        }
    }
    ASSERT_TRUE(held > 0 && zero > 0 && rep > 0);
    /* experts e and e + 1 are adjacent; the block of all experts ends where it should */
    int64_t o0 = 0, n0 = 0, o1 = 0, n1 = 0;
    ASSERT_OK(dsmoe_train_model_expert_range(part, 0, 0, &o0, &n0));
    ASSERT_OK(dsmoe_train_model_expert_range(part, 0, 1, &o1, &n1));
    ASSERT_TRUE(o1 == o0 + n0 && n1 == n0);
    ASSERT_STATUS(dsmoe_train_model_expert_range(part, 0, E, &o0, &n0), DSMOE_STATUS_INVALID_ARGUMENT);
    int32_t *tok = (int32_t *)calloc((size_t)o.batch * (size_t)(o.seq_len + 1), sizeof(int32_t));
    dsmoe_train_loss lo;
    ASSERT_STATUS(dsmoe_train_model_loss(part, tok, &lo, 0), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "exec") != NULL);
    free(tok);
    dsmoe_train_model *bad = NULL;
    ASSERT_STATUS(dsmoe_train_model_create_sharded(&rc.model, &o, 3, E, &bad),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(bad == NULL);
out:
    dsmoe_train_model_free(full);
    dsmoe_train_model_free(part);
}

/* A sharded run: the ranks' blocks must cover the experts; without an exec that runs
 * the experts elsewhere every rank stops naming it. */
static void test_sharded_run_errors(void) {
    const dsmoe_run_config rc = tiny_config();
    const dsmoe_run_config *rcs[MAXR] = {&rc, &rc, &rc, &rc};
    rank_job jobs[MAXR];
    use_shard = 1;
    shard_gap = 1;
    run_ranks(2, rcs, fresh(0, "train_dp_shard_gap"), jobs);
    for (int r = 0; r < 2; r++) {
        ASSERT_EQ_INT(jobs[r].st, DSMOE_STATUS_INVALID_CONFIG);
        ASSERT_TRUE(strstr(jobs[r].err, "expert shards must cover") != NULL);
    }
    shard_gap = 0;
    run_ranks(2, rcs, fresh(1, "train_dp_shard_noexec"), jobs);
    for (int r = 0; r < 2; r++) {
        ASSERT_EQ_INT(jobs[r].st, DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(jobs[r].err, "rank 0: ") != NULL);
        ASSERT_TRUE(strstr(jobs[r].err, "exec") != NULL);
    }
    use_shard = 0;
}

int main(void) {
    RUN(test_matches_one_process);
    RUN(test_errors);
    RUN(test_batch_balance_losses);
    RUN(test_counts_sum_failure);
    RUN(test_sharded_model);
    RUN(test_sharded_run_errors);
    return TEST_SUMMARY();
}
