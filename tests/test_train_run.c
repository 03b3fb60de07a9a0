/*
 * test_train_run.c — training runs (dsmoe_run) at the tiny preset: the loss falls well
 * below the corpus's unigram entropy; the checkpoint is a model directory whose model
 * (dsmoe_model_open) gives the training model's loss; a run stopped and resumed (twice)
 * ends with the same parameters, moments and metrics, bit for bit, as an uninterrupted
 * one, and so does a run on two threads; corrupt, truncated and foreign checkpoints and a
 * changed config are refused naming the file or field, leaving the checkpoint as it was;
 * missing data and an unwritable folder are named; a NaN stops the run at the step,
 * with the last checkpoint intact; the strategies and the config's validation.
 */
#include "testlib.h"

#include <errno.h>
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

/* out = a b c (cut to cap - 1 bytes). */
static char *cat3(char *out, size_t cap, const char *a, const char *b, const char *c) {
    size_t o = 0;
    const char *parts[3] = {a, b, c};
    for (int i = 0; i < 3; i++)
        for (const char *p = parts[i]; *p && o + 1 < cap; p++) out[o++] = *p;
    out[o] = '\0';
    return out;
}

static char *path_in(const char *dir, const char *name) {
    static char buf[4][4096];
    static int k = 0;
    k = (k + 1) % 4;
    return cat3(buf[k], sizeof buf[k], dir, "/", name);
}

static int write_file(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fwrite(p, 1, n, f) == n;
    return fclose(f) == 0 && ok;
}

static int same_file(const char *a, const char *b) {
    size_t na, nb;
    char *pa = tl_slurp(a, &na), *pb = tl_slurp(b, &nb);
    int same = pa && pb && na == nb && memcmp(pa, pb, na) == 0;
    free(pa);
    free(pb);
    return same;
}

/* metrics.jsonl without what may differ between sessions: times, speeds, threads. */
static char *metrics_core(const char *dir) {
    char *s = tl_slurp(path_in(dir, "metrics.jsonl"), NULL);
    if (!s) return NULL;
    static const char *const keys[] = {"\"tokens_per_s\":", "\"elapsed_s\":", "\"threads\":"};
    for (size_t k = 0; k < 3; k++)
        for (char *p; (p = strstr(s, keys[k])) != NULL;) {
            char *e = strchr(p, ',');
            if (!e) break;
            memmove(p, e + 1, strlen(e + 1) + 1);
        }
    return s;
}

static dsmoe_run_config tiny_config(int64_t steps) {
    dsmoe_run_config rc;
    if (dsmoe_run_config_default("tiny", &rc) != DSMOE_OK) abort();
    rc.steps = steps;
    rc.adamw.warmup_steps = steps / 10;
    rc.corpus.tokens = 60000;
    rc.eval_every = 10;
    rc.eval_tokens = 512;
    rc.save_every = 10;
    return rc;
}

static dsmoe_status run_in(const dsmoe_run_config *rc, const char *dir, int nt, int resume,
                           int64_t stop_at, dsmoe_run_result *res) {
    dsmoe_run_options o;
    memset(&o, 0, sizeof o);
    o.n_threads = nt;
    o.resume = resume;
    o.stop_at = stop_at;
    return dsmoe_run(rc, dir, &o, res);
}

/* The step saved in a checkpoint's training state (-1 if unreadable). */
static int64_t saved_step(const char *dir) {
    dsmoe_safetensors *st = NULL;
    dsmoe_tensor_view v;
    int64_t step = -1;
    if (dsmoe_safetensors_open(path_in(path_in(dir, "checkpoint"), "training_state.safetensors"),
                               &st) == DSMOE_OK &&
        dsmoe_safetensors_get(st, "run.state", &v) == DSMOE_OK)
        memcpy(&step, (const int64_t *)v.data + 1, sizeof step);
    dsmoe_safetensors_close(st);
    return step;
}

/* The same parameters, moments and balancers in two runs' checkpoints, and the same
 * metrics apart from times. */
static void assert_same_runs(const char *a, const char *b) {
    char ma[4096], mb[4096];
    cat3(ma, sizeof ma, a, "/checkpoint/model.safetensors", "");
    cat3(mb, sizeof mb, b, "/checkpoint/model.safetensors", "");
    ASSERT_TRUE(same_file(ma, mb));
    dsmoe_safetensors *sa = NULL, *sb = NULL;
    cat3(ma, sizeof ma, a, "/checkpoint/training_state.safetensors", "");
    cat3(mb, sizeof mb, b, "/checkpoint/training_state.safetensors", "");
    ASSERT_OK(dsmoe_safetensors_open(ma, &sa));
    ASSERT_OK(dsmoe_safetensors_open(mb, &sb));
    if (sa && sb) {
        ASSERT_EQ_INT(dsmoe_safetensors_count(sa), dsmoe_safetensors_count(sb));
        for (int64_t i = 0; i < dsmoe_safetensors_count(sa); i++) {
            dsmoe_tensor_view va, vb;
            ASSERT_OK(dsmoe_safetensors_at(sa, i, &va));
            if (dsmoe_safetensors_get(sb, va.name, &vb) != DSMOE_OK) {
                TL_FAIL("%s missing in %s", va.name, b);
                continue;
            }
            if (strcmp(va.name, "run.state_f64") == 0) { /* the last entry is wall time */
                ASSERT_TRUE(memcmp(va.data, vb.data, 3 * sizeof(double)) == 0);
                continue;
            }
            if (va.nbytes != vb.nbytes || memcmp(va.data, vb.data, va.nbytes) != 0)
                TL_FAIL("tensor %s differs between %s and %s", va.name, a, b);
        }
    }
    dsmoe_safetensors_close(sa);
    dsmoe_safetensors_close(sb);
    char *xa = metrics_core(a), *xb = metrics_core(b);
    ASSERT_TRUE(xa && xb);
    if (xa && xb && strcmp(xa, xb) != 0) {
        size_t i = 0;
        while (xa[i] && xa[i] == xb[i]) i++;
        TL_FAIL("metrics of %s and %s differ at byte %zu: ...%.80s vs ...%.80s", a, b, i,
                xa + (i > 40 ? i - 40 : 0), xb + (i > 40 ? i - 40 : 0));
    }
    free(xa);
    free(xb);
}

/* ------------------------------------------------------------------ tests -- */

/* Well below the unigram entropy of the training split after 200 steps. */
static void test_learns(void) {
    dsmoe_run_config rc = tiny_config(200);
    rc.eval_every = 0;
    rc.eval_tokens = 2048;
    rc.save_every = 0;
    const char *dir = tl_tmp("train_run_learns");
    tl_rm_rf(dir);
    dsmoe_run_result res;
    ASSERT_OK(run_in(&rc, dir, 1, 0, 0, &res));
    dsmoe_corpus *c = NULL;
    ASSERT_OK(dsmoe_corpus_builtin(&rc.corpus, &c));
    if (!c) return;
    double counts[DSMOE_BYTE_VOCAB_SIZE] = {0}, h = 0;
    const int64_t n = dsmoe_corpus_length(c, DSMOE_SPLIT_TRAIN);
    const uint16_t *tok = dsmoe_corpus_tokens(c, DSMOE_SPLIT_TRAIN);
    for (int64_t i = 0; i < n; i++) counts[tok[i]] += 1;
    for (int v = 0; v < DSMOE_BYTE_VOCAB_SIZE; v++)
        if (counts[v] > 0) h -= counts[v] / (double)n * log(counts[v] / (double)n);
    dsmoe_corpus_free(c);
    fprintf(stderr, "  unigram entropy %.3f nats; validation loss %.3f, MaxVio_global %.3f\n", h,
            res.val_loss, res.val_maxvio);
    ASSERT_EQ_INT(res.step, 200);
    ASSERT_TRUE(res.val_loss < 0.7 * h);
    ASSERT_TRUE(res.train_loss < 0.75 * h);
    ASSERT_TRUE(res.val_maxvio >= 0 && res.val_maxvio < 2);
    /* The metrics: the run record, 200 train records, one eval record, steps in order. */
    char *m = tl_slurp(path_in(dir, "metrics.jsonl"), NULL);
    ASSERT_TRUE(m != NULL);
    if (!m) return;
    int lines = 0, train = 0, evals = 0;
    for (char *p = m; *p; p++) lines += *p == '\n';
    for (char *p = m; (p = strstr(p, "{\"type\":\"train\"")) != NULL; p++) train++;
    for (char *p = m; (p = strstr(p, "{\"type\":\"eval\"")) != NULL; p++) evals++;
    ASSERT_EQ_INT(lines, 202);
    ASSERT_EQ_INT(train, 200);
    ASSERT_EQ_INT(evals, 1);
    ASSERT_TRUE(strncmp(m, "{\"type\":\"run\"", 13) == 0);
    ASSERT_TRUE(strstr(m, "\"maxvio_global\":") && strstr(m, "\"domain_counts\":[[") &&
                strstr(m, "\"mutual_information\":") && strstr(m, "\"top_weight_hist\":[") &&
                strstr(m, "\"score_entropy\":") && strstr(m, "\"bias_std\":"));
    free(m);
    tl_rm_rf(dir);
}

/* The checkpoint opens as a model whose loss on a window equals the training model's
 * with the saved tensors, and the saved config is the run's. */
static void test_checkpoint_model(void) {
    dsmoe_run_config rc = tiny_config(20);
    const char *dir = tl_tmp("train_run_ckpt");
    tl_rm_rf(dir);
    ASSERT_OK(run_in(&rc, dir, 1, 0, 0, NULL));
    char ck[4096];
    cat3(ck, sizeof ck, dir, "/checkpoint", "");
    dsmoe_model *m = NULL;
    ASSERT_OK(dsmoe_model_open(ck, NULL, &m));
    if (!m) return;
    enum { T = 24 };
    dsmoe_train_model_options o = rc.train;
    o.batch = 1;
    o.seq_len = T;
    o.n_threads = 1;
    dsmoe_train_model *tm = NULL;
    ASSERT_OK(dsmoe_train_model_create(&rc.model, &o, &tm));
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(path_in(ck, "model.safetensors"), &st));
    if (!tm || !st) return;
    for (int64_t i = 0; i < dsmoe_train_model_tensor_count(tm); i++) {
        dsmoe_train_tensor t;
        dsmoe_tensor_view v;
        ASSERT_OK(dsmoe_train_model_tensor(tm, i, &t));
        ASSERT_OK(dsmoe_safetensors_get(st, t.spec.name, &v));
        ASSERT_EQ_INT(v.nbytes, t.n * 4);
        if (t.trainable) memcpy(t.data, v.data, v.nbytes);
    }
    int32_t biased = 0;
    for (int32_t k = 0; k < dsmoe_train_model_moe_count(tm); k++) {
        char name[128];
        dsmoe_tensor_view v;
        snprintf(name, sizeof name, "model.layers.%d.mlp.gate.e_score_correction_bias",
                 (int)dsmoe_train_model_moe_layer(tm, k));
        ASSERT_OK(dsmoe_safetensors_get(st, name, &v));
        ASSERT_OK(dsmoe_train_model_set_bias(tm, k, (const float *)v.data));
        for (int32_t e = 0; e < rc.model.n_routed_experts; e++) biased += ((const float *)v.data)[e] != 0;
    }
    ASSERT_TRUE(biased > 0); /* the bias controller moved the biases, and they were saved */
    int32_t tok[T + 1];
    const char *text = "12+34=46\n(5+6)*7=77\nrev abc|cba";
    tok[0] = DSMOE_BYTE_VOCAB_BOS;
    for (int i = 1; i <= T; i++) tok[i] = (unsigned char)text[i - 1];
    dsmoe_train_loss l;
    ASSERT_OK(dsmoe_train_model_loss(tm, tok, &l, 0));
    dsmoe_model_cache *cache = NULL;
    ASSERT_OK(dsmoe_model_cache_create(m, T, &cache));
    float *logits = (float *)malloc((size_t)T * DSMOE_BYTE_VOCAB_SIZE * sizeof(float));
    if (cache && logits) {
        ASSERT_OK(dsmoe_model_forward(m, cache, tok, T, logits, 0));
        double ce = 0;
        for (int t = 0; t < T; t++) {
            const float *z = logits + (size_t)t * DSMOE_BYTE_VOCAB_SIZE;
            double mx = z[0], s = 0;
            for (int v = 1; v < DSMOE_BYTE_VOCAB_SIZE; v++) mx = z[v] > mx ? z[v] : mx;
            for (int v = 0; v < DSMOE_BYTE_VOCAB_SIZE; v++) s += exp(z[v] - mx);
            ce += mx + log(s) - z[tok[t + 1]];
        }
        ce /= T;
        ASSERT_NEAR(ce, l.ce, 1e-4 * l.ce);
    }
    free(logits);
    dsmoe_model_cache_free(cache);
    dsmoe_safetensors_close(st);
    dsmoe_train_model_free(tm);
    dsmoe_model_free(m);
    dsmoe_run_config back;
    ASSERT_OK(dsmoe_run_config_load(dir, &back));
    ASSERT_EQ_INT(back.steps, 20);
    ASSERT_TRUE(strcmp(back.strategy, "v3") == 0 && strcmp(back.preset, "tiny") == 0);
    ASSERT_TRUE(back.adamw.lr == rc.adamw.lr && back.balancer.gamma == rc.balancer.gamma);
    tl_rm_rf(dir);
}

/* Stopped at 15 and at 27 (not save points), resumed each time: the same bits as the
 * uninterrupted run; a finished run resumed does nothing. */
static void test_resume_bits(void) {
    dsmoe_run_config rc = tiny_config(40);
    char a[4096], b[4096];
    cat3(a, sizeof a, tl_tmp("train_run_whole"), "", "");
    cat3(b, sizeof b, tl_tmp("train_run_parts"), "", "");
    tl_rm_rf(a);
    tl_rm_rf(b);
    dsmoe_run_result ra, rb;
    ASSERT_OK(run_in(&rc, a, 1, 0, 0, &ra));
    ASSERT_OK(run_in(&rc, b, 1, 0, 15, &rb));
    ASSERT_EQ_INT(rb.step, 15);
    ASSERT_EQ_INT(saved_step(b), 15);
    ASSERT_OK(run_in(NULL, b, 1, 1, 27, &rb));
    ASSERT_EQ_INT(rb.step, 27);
    ASSERT_OK(run_in(&rc, b, 1, 1, 0, &rb)); /* the same config may be given */
    ASSERT_EQ_INT(rb.step, 40);
    ASSERT_TRUE(ra.val_loss == rb.val_loss && ra.train_loss == rb.train_loss);
    assert_same_runs(a, b);
    ASSERT_OK(run_in(NULL, b, 1, 1, 0, &rb));
    ASSERT_EQ_INT(rb.step, 40);
    assert_same_runs(a, b);
    /* Metrics lines written after the checkpoint (a kill before the next one) are dropped
     * on resume. */
    tl_rm_rf(b);
    ASSERT_OK(run_in(&rc, b, 1, 0, 20, &rb));
    FILE *f = fopen(path_in(b, "metrics.jsonl"), "ab");
    if (f) {
        fputs("{\"type\":\"train\",\"step\":21,\"loss\":1}\n{\"type\":\"train\",\"st", f);
        fclose(f);
    }
    ASSERT_OK(run_in(NULL, b, 1, 1, 0, &rb));
    assert_same_runs(a, b);
    tl_rm_rf(a);
    tl_rm_rf(b);
}

/* One thread and two: the same bits. */
static void test_threads(void) {
    dsmoe_run_config rc = tiny_config(20);
    char a[4096], b[4096];
    cat3(a, sizeof a, tl_tmp("train_run_t1"), "", "");
    cat3(b, sizeof b, tl_tmp("train_run_t2"), "", "");
    tl_rm_rf(a);
    tl_rm_rf(b);
    ASSERT_OK(run_in(&rc, a, 1, 0, 0, NULL));
    ASSERT_OK(run_in(&rc, b, 2, 0, 0, NULL));
    assert_same_runs(a, b);
    tl_rm_rf(a);
    tl_rm_rf(b);
}

/* Corrupt, truncated, foreign: refused naming the file; the checkpoint is unchanged. */
static void test_corrupt(void) {
    dsmoe_run_config rc = tiny_config(20);
    const char *dir0 = tl_tmp("train_run_corrupt");
    char dir[4096], ck[4096];
    cat3(dir, sizeof dir, dir0, "", "");
    cat3(ck, sizeof ck, dir, "/checkpoint", "");
    tl_rm_rf(dir);
    ASSERT_OK(run_in(&rc, dir, 1, 0, 10, NULL));
    static const char *const files[] = {"model.safetensors", "training_state.safetensors",
                                        "config.json", "dsmoe_checksums.txt"};
    for (int f = 0; f < 4; f++)
        for (int how = 0; how < 2; how++) { /* 0: truncate, 1: flip a byte */
            char *p = path_in(ck, files[f]);
            size_t n;
            char *orig = tl_slurp(p, &n);
            if (!orig) {
                TL_FAIL("cannot read %s", p);
                continue;
            }
            char *bad = (char *)malloc(n);
            memcpy(bad, orig, n);
            size_t bn = n;
            if (how == 0) bn = n / 2 + 1;
            else bad[n / 2 + (f == 3 ? 25 : 3)] ^= 0x10;
            ASSERT_TRUE(write_file(p, bad, bn));
            ASSERT_STATUS(run_in(NULL, dir, 1, 1, 0, NULL), DSMOE_STATUS_FORMAT);
            if (!strstr(dsmoe_last_error(), files[f]) && !(f == 3 && strstr(dsmoe_last_error(), ".safetensors")))
                TL_FAIL("%s %s: message \"%s\" does not name it", how ? "flipped" : "truncated",
                        files[f], dsmoe_last_error());
            size_t n2;
            char *now = tl_slurp(p, &n2); /* left as it was (damaged), nothing else written */
            ASSERT_TRUE(now && n2 == bn && memcmp(now, bad, bn) == 0);
            free(now);
            ASSERT_EQ_INT(saved_step(dir), f == 1 ? saved_step(dir) : 10);
            ASSERT_TRUE(write_file(p, orig, n));
            free(orig);
            free(bad);
        }
    /* A changed config: named. */
    dsmoe_run_config other = rc;
    other.adamw.lr *= 2;
    ASSERT_STATUS(run_in(&other, dir, 1, 1, 0, NULL), DSMOE_STATUS_INVALID_CONFIG);
    if (!strstr(dsmoe_last_error(), "lr")) TL_FAIL("message: %s", dsmoe_last_error());
    other = rc;
    other.model.hidden_size = 48;
    ASSERT_STATUS(run_in(&other, dir, 1, 1, 0, NULL), DSMOE_STATUS_INVALID_CONFIG);
    /* A foreign folder: a model directory without the training files. */
    tl_rm_rf(path_in(ck, "dsmoe_checksums.txt"));
    ASSERT_STATUS(run_in(NULL, dir, 1, 1, 0, NULL), DSMOE_STATUS_FORMAT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "dsmoe_checksums.txt") != NULL);
    /* A fresh run does not overwrite a run's folder. */
    ASSERT_STATUS(run_in(&rc, dir, 1, 0, 0, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    tl_rm_rf(dir);
    /* No checkpoint to resume. */
    ASSERT_STATUS(run_in(NULL, dir, 1, 1, 0, NULL), DSMOE_STATUS_IO);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "checkpoint") != NULL);
}

/* Missing data, unwritable folder, changed data: named. */
static void test_io_errors(void) {
    dsmoe_run_config rc = tiny_config(10);
    const char *missing[1] = {"no/such/file.txt"};
    rc.data_files = missing;
    rc.n_data_files = 1;
    const char *dir0 = tl_tmp("train_run_io");
    char dir[4096];
    cat3(dir, sizeof dir, dir0, "", "");
    tl_rm_rf(dir);
    ASSERT_STATUS(run_in(&rc, dir, 1, 0, 0, NULL), DSMOE_STATUS_IO);
    if (!strstr(dsmoe_last_error(), "no/such/file.txt")) TL_FAIL("message: %s", dsmoe_last_error());
    /* A folder under a regular file. */
    rc = tiny_config(10);
    char file[4096], under[4200];
    cat3(file, sizeof file, dir, ".file", "");
    ASSERT_TRUE(write_file(file, "x", 1));
    cat3(under, sizeof under, file, "/run", "");
    ASSERT_STATUS(run_in(&rc, under, 1, 0, 0, NULL), DSMOE_STATUS_IO);
    ASSERT_TRUE(strstr(dsmoe_last_error(), file) != NULL);
    unlink(file);
    /* A data file that changes between the checkpoint and the resume. */
    char data[4096];
    cat3(data, sizeof data, dir, ".txt", "");
    char text[20000];
    size_t o = 0;
    for (int i = 0; o + 64 < sizeof text; i++)
        o += (size_t)snprintf(text + o, sizeof text - o, "line %d of the text, %d\n\n", i, i * 7);
    ASSERT_TRUE(write_file(data, text, o));
    const char *files[1] = {data};
    rc.data_files = files;
    rc.n_data_files = 1;
    rc.corpus.valid_fraction = 0.2;
    rc.train.seq_len = 16;
    ASSERT_OK(run_in(&rc, dir, 1, 0, 5, NULL));
    text[10] = 'X';
    ASSERT_TRUE(write_file(data, text, o));
    ASSERT_STATUS(run_in(NULL, dir, 1, 1, 0, NULL), DSMOE_STATUS_FORMAT);
    if (!strstr(dsmoe_last_error(), data)) TL_FAIL("message: %s", dsmoe_last_error());
    unlink(data);
    tl_rm_rf(dir);
}

/* A NaN (an absurd learning rate) stops the run naming the step; the last checkpoint is
 * the step before, whole and loadable. */
static void test_nan_stop(void) {
    dsmoe_run_config rc = tiny_config(50);
    rc.adamw.lr = 1e3f;
    rc.adamw.warmup_steps = 3;
    rc.save_every = 1;
    const char *dir = tl_tmp("train_run_nan");
    tl_rm_rf(dir);
    dsmoe_run_result res;
    ASSERT_STATUS(run_in(&rc, dir, 1, 0, 0, &res), DSMOE_STATUS_NON_FINITE);
    char want[64];
    snprintf(want, sizeof want, "step %lld:", (long long)res.step + 1);
    ASSERT_TRUE(strstr(dsmoe_last_error(), want) != NULL);
    ASSERT_TRUE(res.step >= 1);
    ASSERT_EQ_INT(saved_step(dir), res.step);
    dsmoe_model *m = NULL;
    ASSERT_OK(dsmoe_model_open(path_in(dir, "checkpoint"), NULL, &m));
    dsmoe_model_free(m);
    /* Resuming meets the same NaN at the same step. */
    dsmoe_run_result r2;
    ASSERT_STATUS(run_in(NULL, dir, 1, 1, 0, &r2), DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(strstr(dsmoe_last_error(), want) != NULL);
    ASSERT_EQ_INT(saved_step(dir), res.step);
    tl_rm_rf(dir);
}

/* Every strategy trains a few steps; their routing fields and balancing. */
static void test_strategies(void) {
    int n = 0;
    for (const char *s; (s = dsmoe_run_strategy_name(n)) != NULL; n++) {
        dsmoe_run_config rc = tiny_config(4);
        rc.eval_tokens = 256;
        ASSERT_OK(dsmoe_run_strategy_apply(s, &rc));
        ASSERT_OK(dsmoe_run_config_validate(&rc));
        ASSERT_TRUE(strcmp(rc.strategy, s) == 0);
        const char *dir = tl_tmp("train_run_strategy");
        tl_rm_rf(dir);
        dsmoe_run_result res;
        ASSERT_OK(run_in(&rc, dir, 1, 0, 0, &res));
        ASSERT_TRUE(isfinite(res.val_loss));
        tl_rm_rf(dir);
    }
    ASSERT_EQ_INT(n, 7);
    dsmoe_run_config rc = tiny_config(4);
    ASSERT_OK(dsmoe_run_strategy_apply("v2", &rc));
    ASSERT_TRUE(rc.model.scoring_func == DSMOE_SCORE_FUNC_SOFTMAX && !rc.model.norm_topk_prob &&
                rc.balancer.gamma == 0 && rc.train.balance_kind == DSMOE_BALANCE_LOSS_EXPERT);
    ASSERT_OK(dsmoe_run_strategy_apply("aux-loss", &rc));
    ASSERT_TRUE(rc.model.scoring_func == DSMOE_SCORE_FUNC_SIGMOID && rc.model.norm_topk_prob &&
                rc.balancer.gamma == 0 && rc.train.balance_alpha == 1e-3f);
    ASSERT_STATUS(dsmoe_run_strategy_apply("v4", &rc), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "v4") && strstr(dsmoe_last_error(), "aux-loss"));
    ASSERT_TRUE(strcmp(rc.strategy, "aux-loss") == 0);
    static const char *const presets[] = {"tiny", "small", "default"};
    for (int i = 0; i < 3; i++) {
        ASSERT_OK(dsmoe_run_config_default(presets[i], &rc));
        ASSERT_OK(dsmoe_run_config_validate(&rc));
    }
    ASSERT_STATUS(dsmoe_run_config_default("huge", &rc), DSMOE_STATUS_INVALID_CONFIG);
    rc = tiny_config(4);
    rc.train.seq_len = 100000;
    ASSERT_STATUS(dsmoe_run_config_validate(&rc), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "seq_len") != NULL);
    rc = tiny_config(4);
    rc.adamw.lr = -1;
    ASSERT_STATUS(dsmoe_run_config_validate(&rc), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "lr") != NULL);
}

#include <time.h>
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
#define TIMED(fn)                                                        \
    do {                                                                 \
        double t0_ = now_s();                                            \
        RUN(fn);                                                         \
        fprintf(stderr, "     %.1f s\n", now_s() - t0_);                 \
    } while (0)

int main(void) {
    TIMED(test_learns);
    TIMED(test_checkpoint_model);
    TIMED(test_resume_bits);
    TIMED(test_threads);
    TIMED(test_corrupt);
    TIMED(test_io_errors);
    TIMED(test_nan_stop);
    TIMED(test_strategies);
    return TEST_SUMMARY();
}
