/*
 * test_study.c — the study layer: every summary value of the synthetic study
 * (tests/golden/study/, written by tests/ref/gen_study_golden.py) against the NumPy
 * recomputation; the group statistics in summary.json; the measures on hand-made cases
 * (MaxVio, entropy, mutual information, loss spikes, the last 20% of training); bad
 * metrics.jsonl files (truncated, wrong types, missing records) → FORMAT naming the line
 * and the field, an incomplete last line ignored; hostile strings escaped in the report;
 * a run of one step and a run without values still reported.
 */
#include "testlib.h"

#include "study/study_internal.h"

#include <errno.h>
#include <sys/stat.h>

static void mkdirs(const char *path) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') {
            *p = '\0';
            mkdir(buf, 0777);
            *p = '/';
        }
    mkdir(buf, 0777);
}

static void write_file(const char *dir, const char *name, const char *text) {
    mkdirs(dir);
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    if (!f) {
        TL_FAIL("cannot write %s", p);
        return;
    }
    fputs(text, f);
    fclose(f);
}

static char *read_all(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) {
        free(s);
        s = NULL;
    }
    if (s) s[n] = '\0';
    fclose(f);
    return s;
}

static int metric_index(const char *name) {
    for (int m = 0; m < DSMOE_SM_COUNT; m++)
        if (strcmp(dsmoe_summary_metric_name(m), name) == 0) return m;
    return -1;
}

static void expect_close(const char *what, double got, double want) {
    tl_checks++;
    if (isnan(want) ? !isnan(got) : !(fabs(got - want) <= 1e-9 * fmax(1.0, fabs(want))))
        TL_FAIL("%s: %.15g, NumPy %.15g", what, got, want);
}

/* ------------------------------------------------------ golden summaries -- */
static void test_golden_runs(void) {
    char *exp = read_all(tl_golden("study/expected.txt"));
    ASSERT_TRUE(exp != NULL);
    if (!exp) return;
    const char *runs[4] = {"aux-loss-seed1", "aux-loss-seed2", "v3-seed1", "v3-seed2"};
    dsmoe_run_summary s[4];
    for (int r = 0; r < 4; r++) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/study/runs/%s", DSMOE_TEST_DATA_DIR, runs[r]);
        ASSERT_OK(dsmoe_run_summarize(dir, &s[r]));
        ASSERT_TRUE(strcmp(s[r].name, runs[r]) == 0);
        ASSERT_EQ_INT(s[r].steps, 30);
        ASSERT_EQ_INT(s[r].experts, 8);
        ASSERT_EQ_INT(s[r].n_main_layers, 2);
        ASSERT_EQ_INT(s[r].seed, r % 2 + 1);
    }
    ASSERT_TRUE(strcmp(s[0].group, "aux-loss") == 0 && strcmp(s[3].group, "v3") == 0);
    int lines = 0, checked = 0;
    for (char *line = strtok(exp, "\n"); line; line = strtok(NULL, "\n")) {
        char run[128], metric[128], v[5][64];
        int n = sscanf(line, "%127s %127s %63s %63s %63s %63s %63s", run, metric, v[0], v[1], v[2], v[3], v[4]);
        lines++;
        if (strcmp(run, "group") == 0 || n != 3) continue;
        int r = 0;
        while (r < 4 && strcmp(runs[r], run) != 0) r++;
        if (r == 4) {
            TL_FAIL("unknown run %s", run);
            continue;
        }
        double want = strcmp(v[0], "nan") == 0 ? NAN : strtod(v[0], NULL);
        char what[300];
        snprintf(what, sizeof what, "%s %s", run, metric);
        if (strncmp(metric, "domain:", 7) == 0) {
            int d = 0;
            while (d < s[r].n_domains && strcmp(s[r].domains[d], metric + 7) != 0) d++;
            ASSERT_TRUE(d < s[r].n_domains);
            if (d < s[r].n_domains) expect_close(what, s[r].domain_loss[d], want);
            checked++;
            continue;
        }
        int m = metric_index(metric);
        ASSERT_TRUE(m >= 0);
        if (m < 0) continue;
        if (m == DSMOE_SM_MI_KEPT) continue; /* a study value: test_golden_study */
        expect_close(what, s[r].m[m], want);
        checked++;
    }
    ASSERT_TRUE(lines > 100);
    ASSERT_EQ_INT(checked, 4 * (DSMOE_SM_COUNT - 1 + 3));
    free(exp);
}

/* summary.json: the runs' mi_kept and every group's mean / std / min / max. */
static void test_golden_study(void) {
    const char *out = tl_tmp("study_golden_out");
    mkdirs(out);
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/study", DSMOE_TEST_DATA_DIR);
    ASSERT_OK(dsmoe_study_summarize(dir, out));
    char p[4096];
    snprintf(p, sizeof p, "%s/summary.json", out);
    char *js = read_all(p);
    char *exp = read_all(tl_golden("study/expected.txt"));
    ASSERT_TRUE(js && exp);
    if (!js || !exp) {
        free(js);
        free(exp);
        return;
    }
    dsmoe__jtree t = {0};
    ASSERT_OK(dsmoe__jtree_parse(&t, js, strlen(js), "summary.json"));
    int32_t groups = dsmoe__jv_get(&t, 0, "groups"), runs = dsmoe__jv_get(&t, 0, "runs");
    ASSERT_TRUE(groups >= 0 && runs >= 0 && t.nodes[groups].n == 2 && t.nodes[runs].n == 4);
    int checked = 0;
    for (char *line = strtok(exp, "\n"); line && groups >= 0 && runs >= 0; line = strtok(NULL, "\n")) {
        char a[128], b[128], c[128], v[4][64];
        int n = sscanf(line, "%127s %127s %127s %63s %63s %63s %63s", a, b, c, v[0], v[1], v[2], v[3]);
        if (n == 3 && strcmp(b, "mi_kept") == 0) { /* a run's mi_kept */
            for (int32_t k = 0; k < 4; k++) {
                int32_t r = dsmoe__jv_at(&t, runs, k);
                if (strcmp(t.nodes[dsmoe__jv_get(&t, r, "name")].str, a) != 0) continue;
                int32_t mv = dsmoe__jv_get(&t, dsmoe__jv_get(&t, r, "metrics"), "mi_kept");
                expect_close(line, t.nodes[mv].num, strtod(c, NULL));
                checked++;
            }
        }
        if (n != 7 || strcmp(a, "group") != 0) continue;
        for (int32_t k = 0; k < 2; k++) {
            int32_t g = dsmoe__jv_at(&t, groups, k);
            if (strcmp(t.nodes[dsmoe__jv_get(&t, g, "name")].str, b) != 0) continue;
            int dom = strncmp(c, "domain:", 7) == 0;
            int32_t mm = dom ? dsmoe__jv_get(&t, dsmoe__jv_get(&t, g, "domain_loss"), c + 7)
                             : dsmoe__jv_get(&t, dsmoe__jv_get(&t, g, "metrics"), c);
            ASSERT_TRUE(mm >= 0);
            if (mm < 0) continue;
            static const char *const keys[4] = {"mean", "std", "min", "max"};
            for (int q = 0; q < 4; q++) {
                char what[300];
                snprintf(what, sizeof what, "group %s %s %s", b, c, keys[q]);
                int32_t x = dsmoe__jv_get(&t, mm, keys[q]);
                double got = t.nodes[x].kind == DSMOE__JV_NULL ? NAN : t.nodes[x].num;
                expect_close(what, got, strcmp(v[q], "nan") == 0 ? NAN : strtod(v[q], NULL));
            }
            checked++;
        }
    }
    ASSERT_EQ_INT(checked, 4 + 2 * (DSMOE_SM_COUNT + 3));
    /* v3 is the reference; aux-loss's MaxVio_global is far outside the seeds' spread,
     * its spike count equal (within the spread) */
    ASSERT_TRUE(strcmp(t.nodes[dsmoe__jv_get(&t, 0, "reference")].str, "v3") == 0);
    ASSERT_TRUE(strcmp(t.nodes[dsmoe__jv_get(&t, dsmoe__jv_at(&t, groups, 0), "name")].str, "v3") == 0);
    int32_t aux = dsmoe__jv_at(&t, groups, 1); /* after v3: the strategies' order */
    int32_t vs = dsmoe__jv_get(&t, aux, "vs_reference");
    ASSERT_TRUE(vs >= 0);
    if (vs >= 0) {
        int32_t mg = dsmoe__jv_get(&t, vs, "maxvio_global"), sp = dsmoe__jv_get(&t, vs, "loss_spikes");
        ASSERT_TRUE(strcmp(t.nodes[dsmoe__jv_get(&t, mg, "verdict")].str, "differs") == 0);
        ASSERT_TRUE(strcmp(t.nodes[dsmoe__jv_get(&t, sp, "verdict")].str, "within seed spread") == 0);
    }
    dsmoe__jtree_free(&t);
    /* summary.csv: a header, 4 runs, 2 groups × 4 statistics */
    snprintf(p, sizeof p, "%s/summary.csv", out);
    char *csv = read_all(p);
    ASSERT_TRUE(csv != NULL);
    int rows = 0;
    for (char *q = csv; q && *q; q++) rows += *q == '\n';
    ASSERT_EQ_INT(rows, 1 + 4 + 8);
    ASSERT_TRUE(csv && strncmp(csv, "kind,name,group,seed,val_loss,", 30) == 0);
    free(csv);
    free(js);
    free(exp);
}

/* ------------------------------------------------------ hand-made cases -- */
static void test_measures(void) {
    const double flat[4] = {5, 5, 5, 5}, skew[4] = {1, 2, 3, 4}, one[4] = {0, 0, 8, 0}, none[4] = {0, 0, 0, 0};
    ASSERT_NEAR(dsmoe__maxvio(flat, 4), 0, 0);
    ASSERT_NEAR(dsmoe__maxvio(skew, 4), 0.6, 1e-15);
    ASSERT_NEAR(dsmoe__maxvio(one, 4), 3, 1e-15);
    ASSERT_TRUE(isnan(dsmoe__maxvio(none, 4)));
    ASSERT_NEAR(dsmoe__entropy_bits(flat, 4), 2, 1e-15);
    ASSERT_NEAR(dsmoe__entropy_bits(one, 4), 0, 0);
    ASSERT_NEAR(dsmoe__entropy_bits(skew, 4), -(0.1 * log2(0.1) + 0.2 * log2(0.2) + 0.3 * log2(0.3) + 0.4 * log2(0.4)),
                1e-15);
    /* MI: each domain to its own experts = log2 D; independent = 0; a hand-computed mix */
    const double diag[3 * 3] = {7, 0, 0, 0, 7, 0, 0, 0, 7};
    ASSERT_NEAR(dsmoe__mutual_info_bits(diag, 3, 3), log2(3.0), 1e-14);
    const double indep[2 * 3] = {1, 2, 3, 2, 4, 6};
    ASSERT_NEAR(dsmoe__mutual_info_bits(indep, 2, 3), 0, 1e-14);
    const double mix[2 * 2] = {3, 1, 1, 3}; /* p = 3/8, 1/8; marginals 1/2: 2·(3/8 log2 1.5 + 1/8 log2 0.5) */
    ASSERT_NEAR(dsmoe__mutual_info_bits(mix, 2, 2), 2 * (0.375 * log2(1.5) + 0.125 * log2(0.5)), 1e-14);
    const double mixnan[4] = {3, 1, NAN, 3};
    ASSERT_TRUE(isnan(dsmoe__mutual_info_bits(mixnan, 2, 2)));
    /* spikes: flat with one jump; the jump must exceed 10% of the window's mean */
    double L[40];
    for (int i = 0; i < 40; i++) L[i] = 2.0;
    ASSERT_EQ_INT(dsmoe__loss_spikes(L, 40, 20, 0.1, 0, 5), 0);
    L[30] = 2.2 + 1e-9; /* just above 10% over the mean */
    ASSERT_EQ_INT(dsmoe__loss_spikes(L, 40, 20, 0.1, 0, 5), 1);
    L[30] = 2.2 - 1e-9;
    ASSERT_EQ_INT(dsmoe__loss_spikes(L, 40, 20, 0.1, 0, 5), 0);
    L[3] = 9; /* before min_history records: not judged */
    ASSERT_EQ_INT(dsmoe__loss_spikes(L, 40, 20, 0.1, 0, 5), 0);
    L[3] = 2;
    L[10] = NAN; /* skipped, not a spike, not in the mean */
    L[11] = 2.3;
    ASSERT_EQ_INT(dsmoe__loss_spikes(L, 40, 20, 0.1, 0, 5), 1);
    /* the window: after a level shift from 1 to 1.5 the mean of the previous 20 is
     * 1 + 0.025 k at the k-th record; 1.5 - m > 0.1 m while m < 1.3636: k = 0..14 */
    for (int i = 0; i < 40; i++) L[i] = i < 20 ? 1.0 : 1.5;
    ASSERT_EQ_INT(dsmoe__loss_spikes(L, 40, 20, 0.1, 0, 5), 15);
    /* the noise band: losses alternating 1.6, 2.4 (a window of 20: mean 2, std 0.4, so
     * 3 std = 1.2): a record 1.15 above the mean is far over 10% of it but inside the
     * band, not a spike; 1.25 above is outside, a spike */
    for (int i = 0; i < 40; i++) L[i] = i % 2 ? 2.4 : 1.6;
    ASSERT_EQ_INT(dsmoe__loss_spikes(L, 40, 20, 0.1, 3, 5), 0);
    L[30] = 2.0 + 1.15;
    ASSERT_EQ_INT(dsmoe__loss_spikes(L, 40, 20, 0.1, 3, 5), 0);
    /* the 10% rule alone: every 2.4 from the 6th record on (18) and record 30 */
    ASSERT_EQ_INT(dsmoe__loss_spikes(L, 40, 20, 0.1, 0, 5), 19);
    L[30] = 2.0 + 1.25;
    ASSERT_EQ_INT(dsmoe__loss_spikes(L, 40, 20, 0.1, 3, 5), 1);
}

static void test_tail(void) {
    dsmoe__trace tr;
    memset(&tr, 0, sizeof tr);
    int64_t steps[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    tr.t_step = steps;
    tr.nt = 10;
    ASSERT_EQ_INT(dsmoe__tail_start(&tr), 8); /* steps 9, 10: the last 20% */
    int64_t logged[5] = {0, 25, 50, 75, 100};
    tr.t_step = logged;
    tr.nt = 5;
    ASSERT_EQ_INT(dsmoe__tail_start(&tr), 4); /* step 100 only (80 is not > 80) */
    int64_t single[1] = {1};
    tr.t_step = single;
    tr.nt = 1;
    ASSERT_EQ_INT(dsmoe__tail_start(&tr), 0);
    int64_t zero[1] = {0};
    tr.t_step = zero;
    ASSERT_EQ_INT(dsmoe__tail_start(&tr), 0);
}

#define RUN_LINE                                                                                          \
    "{\"type\":\"run\",\"version\":1,\"strategy\":\"v3\",\"preset\":\"tiny\",\"steps\":1,\"seed\":1," \
    "\"experts\":4,\"top_k\":2,\"domains\":[\"a\",\"b\"],\"moe_layers\":[{\"layer\":1,\"mtp\":false}," \
    "{\"layer\":3,\"mtp\":true}]}\n"
#define TRAIN_LINE                                                                                            \
    "{\"type\":\"train\",\"step\":1,\"loss\":2.5,\"grad_norm\":0.75,\"tokens_per_s\":100,\"layers\":[{\"layer\":1," \
    "\"mtp\":false,\"counts\":[1,2,3,4],\"bias_min\":-0.5,\"bias_max\":0.25},{\"layer\":3,\"mtp\":true,"     \
    "\"counts\":[9,0,0,0]}]}\n"
#define EVAL_LINE                                                                                              \
    "{\"type\":\"eval\",\"step\":1,\"loss\":1.5,\"domains\":{\"b\":{\"loss\":1.25,\"tokens\":4}},\"layers\":"   \
    "[{\"layer\":1,\"counts\":[2,2,2,0],\"domain_counts\":[[2,2,0,0],[0,0,2,0]],\"top_weight_hist\":"          \
    "[0,0,0,0,0,0,0,0,0,0,1,0,0,0,0,0,0,0,0,3],\"score_entropy\":1.5}]}\n"

static void test_one_step(void) {
    const char *dir = tl_tmp("study_one_step");
    write_file(dir, "metrics.jsonl", RUN_LINE TRAIN_LINE EVAL_LINE);
    dsmoe_run_summary s;
    ASSERT_OK(dsmoe_run_summarize(dir, &s));
    ASSERT_NEAR(s.m[DSMOE_SM_MAXVIO_BATCH_TAIL], 0.6, 1e-15);
    ASSERT_NEAR(s.m[DSMOE_SM_EP_MAX_SHARE], 0.4, 1e-15);
    ASSERT_NEAR(s.m[DSMOE_SM_EP_STEP_REL], 1.6, 1e-15);
    ASSERT_NEAR(s.m[DSMOE_SM_MAXVIO_GLOBAL], 2.0 / 1.5 - 1, 1e-15);
    ASSERT_NEAR(s.m[DSMOE_SM_LOAD_ENTROPY], log2(3.0), 1e-15);
    ASSERT_NEAR(s.m[DSMOE_SM_DEAD_EXPERTS], 1, 0);
    /* 4 tokens, 2 domains: p = 1/3,1/3 | 1/3 on experts 0,1 | 2 → I = H(domain) = log2 3 − 2/3 */
    ASSERT_NEAR(s.m[DSMOE_SM_MUTUAL_INFO], log2(3.0) - 2.0 / 3.0, 1e-14);
    ASSERT_NEAR(s.m[DSMOE_SM_TOP_WEIGHT_MEAN], (0.525 + 3 * 0.975) / 4, 1e-15);
    ASSERT_NEAR(s.m[DSMOE_SM_TOP_WEIGHT_HIGH], 0.75, 1e-15);
    ASSERT_NEAR(s.m[DSMOE_SM_SCORE_ENTROPY], 1.5, 0);
    ASSERT_NEAR(s.m[DSMOE_SM_BIAS_DRIFT], 0.5, 0);
    ASSERT_NEAR(s.m[DSMOE_SM_GRAD_NORM_MAX], 0.75, 0);
    ASSERT_NEAR(s.m[DSMOE_SM_TOKENS_PER_S], 100, 0);
    ASSERT_NEAR(s.m[DSMOE_SM_LOSS_SPIKES], 0, 0);
    ASSERT_TRUE(isnan(s.domain_loss[0]));
    ASSERT_NEAR(s.domain_loss[1], 1.25, 0);
    ASSERT_TRUE(isnan(s.m[DSMOE_SM_MI_KEPT]));
    dsmoe_report_options o;
    dsmoe_report_options_default(&o);
    char path[4096];
    ASSERT_OK(dsmoe_report_write(dir, &o, path, sizeof path));
    char *html = read_all(path);
    ASSERT_TRUE(html && strstr(html, "<circle") != NULL); /* one point: a marker */
    free(html);
    /* --layer: 3 is the MTP layer, 2 is none */
    o.layer = 3;
    ASSERT_STATUS(dsmoe_report_write(dir, &o, NULL, 0), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "--layer 3") != NULL);
    o.layer = 1;
    ASSERT_OK(dsmoe_report_write(dir, &o, NULL, 0));
}

/* Only the run record: every value NaN, the report still written ("no data"). */
static void test_no_values(void) {
    const char *dir = tl_tmp("study_no_values");
    write_file(dir, "metrics.jsonl",
               RUN_LINE "{\"type\":\"train\",\"step\":1,\"loss\":null,\"grad_norm\":null,\"layers\":[{\"layer\":1,"
                        "\"counts\":[0,0,0,0]}]}\n");
    dsmoe_run_summary s;
    ASSERT_OK(dsmoe_run_summarize(dir, &s));
    for (int m = 0; m < DSMOE_SM_COUNT; m++)
        if (m != DSMOE_SM_LOSS_SPIKES) ASSERT_TRUE(isnan(s.m[m]));
    char path[4096];
    ASSERT_OK(dsmoe_report_write(dir, NULL, path, sizeof path));
    char *html = read_all(path);
    ASSERT_TRUE(html && strstr(html, "no data") != NULL);
    free(html);
}

/* ---------------------------------------------------------- bad files -- */
static void expect_format(const char *tag, const char *text, const char *needle1, const char *needle2) {
    const char *dir = tl_tmp(tag);
    write_file(dir, "metrics.jsonl", text);
    dsmoe_run_summary s;
    dsmoe_clear_error();
    dsmoe_status st = dsmoe_run_summarize(dir, &s);
    tl_checks++;
    if (st != DSMOE_STATUS_FORMAT) {
        TL_FAIL("%s: got %s (%s), want FORMAT", tag, dsmoe_status_name(st), dsmoe_last_error());
        return;
    }
    const char *e = dsmoe_last_error();
    if (!strstr(e, "metrics.jsonl") || !strstr(e, needle1) || (needle2 && !strstr(e, needle2)))
        TL_FAIL("%s: message '%s' lacks '%s' / '%s'", tag, e, needle1, needle2 ? needle2 : "");
    ASSERT_STATUS(dsmoe_report_write(dir, NULL, NULL, 0), DSMOE_STATUS_FORMAT);
}

static void test_malformed(void) {
    expect_format("bad_empty", "", "no \"run\" record", NULL);
    expect_format("bad_first", TRAIN_LINE, "line 1", "not the \"run\" record");
    expect_format("bad_cut_middle", RUN_LINE "{\"type\":\"train\",\"step\":1,\"lo\n" TRAIN_LINE, "line 2", NULL);
    expect_format("bad_loss_type", RUN_LINE "{\"type\":\"train\",\"step\":1,\"loss\":\"2.5\",\"layers\":[]}\n",
                  "line 2", "'loss': expected a number, found a string");
    expect_format("bad_step", RUN_LINE "{\"type\":\"train\",\"step\":1.5,\"loss\":2,\"layers\":[]}\n", "'step'", NULL);
    expect_format("bad_counts_len",
                  RUN_LINE "{\"type\":\"train\",\"step\":1,\"loss\":2,\"layers\":[{\"layer\":1,\"counts\":[1,2,3]}]}\n",
                  "layers.counts", "3 values, expected 4");
    expect_format("bad_counts_neg",
                  RUN_LINE "{\"type\":\"train\",\"step\":1,\"loss\":2,\"layers\":[{\"layer\":1,\"counts\":[1,2,3,-4]}]}\n",
                  "layers.counts", "negative");
    expect_format("bad_layer",
                  RUN_LINE "{\"type\":\"train\",\"step\":1,\"loss\":2,\"layers\":[{\"layer\":7,\"counts\":[1,2,3,4]}]}\n",
                  "layer 7", NULL);
    expect_format("bad_missing_layer", RUN_LINE "{\"type\":\"train\",\"step\":1,\"loss\":2,\"layers\":[]}\n",
                  "main MoE layer", NULL);
    expect_format("bad_domain",
                  RUN_LINE "{\"type\":\"eval\",\"step\":1,\"loss\":2,\"domains\":{\"zz\":{\"loss\":1}},\"layers\":[]}\n",
                  "domains", "not in the run record");
    expect_format("bad_experts", "{\"type\":\"run\",\"strategy\":\"v3\",\"experts\":\"8\",\"top_k\":2,\"domains\":[],"
                                 "\"moe_layers\":[{\"layer\":1}]}\n",
                  "'experts'", "found a string");
    expect_format("bad_json", RUN_LINE "{\"type\":\"train\",\"step\":1,}\n", "line 2", "member name");
    expect_format("bad_nan", RUN_LINE "{\"type\":\"train\",\"step\":1,\"loss\":NaN,\"layers\":[]}\n", "line 2",
                  "bad number");
    expect_format("bad_two_runs", RUN_LINE RUN_LINE, "line 2", "second");
    expect_format("bad_not_object", RUN_LINE "[1,2]\n", "line 2", "not a JSON object");
    /* an incomplete last line (a run being written): ignored, and said */
    const char *dir = tl_tmp("cut_tail");
    write_file(dir, "metrics.jsonl", RUN_LINE TRAIN_LINE "{\"type\":\"eval\",\"step\":1,\"loss\":1.5,\"lay");
    dsmoe__trace tr;
    ASSERT_OK(dsmoe__trace_load(dir, &tr));
    ASSERT_EQ_INT(tr.truncated_tail, 1);
    ASSERT_EQ_INT(tr.nt, 1);
    ASSERT_EQ_INT(tr.ne, 0);
    dsmoe__trace_free(&tr);
    char path[4096];
    ASSERT_OK(dsmoe_report_write(dir, NULL, path, sizeof path));
    char *html = read_all(path);
    ASSERT_TRUE(html && strstr(html, "incomplete line") != NULL);
    free(html);
    /* a missing folder */
    ASSERT_STATUS(dsmoe_run_summarize(tl_tmp("no_such_run_folder"), NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_run_summary s;
    ASSERT_STATUS(dsmoe_run_summarize(tl_tmp("no_such_run_folder"), &s), DSMOE_STATUS_IO);
    ASSERT_STATUS(dsmoe_report_write(tl_tmp("no_such_run_folder"), NULL, NULL, 0), DSMOE_STATUS_IO);
}

/* Strings from the files and the folder names are escaped in every output. */
static void test_hostile(void) {
    char run[4096];
    snprintf(run, sizeof run, "%s/runs/x<i>\"'&amp;-seed1", tl_tmp("study_hostile"));
    write_file(run, "metrics.jsonl",
               "{\"type\":\"run\",\"strategy\":\"</script><script>alert(1)</script>\\\"'&\",\"preset\":\"<b>p\","
               "\"experts\":4,\"top_k\":2,\"domains\":[\"<svg onload=alert(1)>\",\"a\\u0001\\\"b\"],"
               "\"moe_layers\":[{\"layer\":1},{\"layer\":3,\"mtp\":true}]}\n" TRAIN_LINE
               "{\"type\":\"eval\",\"step\":1,\"loss\":1.5,\"layers\":[{\"layer\":1,\"counts\":[2,2,2,0],"
               "\"domain_counts\":[[2,2,0,0],[0,0,2,0]]}]}\n");
    char path[4096];
    ASSERT_OK(dsmoe_report_write(tl_tmp("study_hostile"), NULL, path, sizeof path));
    char *html = read_all(path);
    ASSERT_TRUE(html != NULL);
    if (html) {
        ASSERT_TRUE(strstr(html, "<script") == NULL);
        ASSERT_TRUE(strstr(html, "<svg onload") == NULL);
        ASSERT_TRUE(strstr(html, "x<i>") == NULL);
        ASSERT_TRUE(strstr(html, "<b>p") == NULL);
        ASSERT_TRUE(strstr(html, "\x01") == NULL);
        ASSERT_TRUE(strstr(html, "&lt;svg onload=alert(1)&gt;") != NULL);
        ASSERT_TRUE(strstr(html, "x&lt;i&gt;&quot;&#39;&amp;amp;") != NULL);
    }
    free(html);
    char p[4096];
    snprintf(p, sizeof p, "%s/summary.json", tl_tmp("study_hostile"));
    char *js = read_all(p);
    ASSERT_TRUE(js && strstr(js, "<") == NULL); /* < > & as \u escapes: safe inside HTML too */
    if (!js) return;
    dsmoe__jtree t = {0};
    ASSERT_OK(dsmoe__jtree_parse(&t, js, strlen(js), "summary.json"));
    int32_t r0 = dsmoe__jv_at(&t, dsmoe__jv_get(&t, 0, "runs"), 0);
    ASSERT_TRUE(r0 >= 0 && strcmp(t.nodes[dsmoe__jv_get(&t, r0, "name")].str, "x<i>\"'&amp;-seed1") == 0);
    dsmoe__jtree_free(&t);
    free(js);
}

/* Runs in the strategies' documented order, unknown ones after, seeds by number. */
static void test_order(void) {
    static const char *const names[5] = {"zzz-seed1", "v3-seed10", "aux-loss-a0.01-seed1", "v2-seed1", "v3-seed2"};
    for (int i = 0; i < 5; i++) {
        char d[4096];
        ASSERT_TRUE(snprintf(d, sizeof d, "%s/runs/%s", tl_tmp("study_order"), names[i]) <
                    (int)sizeof d);
        write_file(d, "metrics.jsonl", RUN_LINE TRAIN_LINE EVAL_LINE);
    }
    ASSERT_OK(dsmoe_study_summarize(tl_tmp("study_order"), tl_tmp("study_order")));
    char p[4096];
    snprintf(p, sizeof p, "%s/summary.json", tl_tmp("study_order"));
    char *js = read_all(p);
    if (!js) {
        TL_FAIL("no %s", p);
        return;
    }
    const char *want[5] = {"\"v3-seed2\"", "\"v3-seed10\"", "\"aux-loss-a0.01-seed1\"", "\"v2-seed1\"", "\"zzz-seed1\""};
    const char *at = js;
    for (int i = 0; i < 5; i++) {
        const char *q = strstr(at, want[i]);
        ASSERT_TRUE(q != NULL);
        if (q) at = q;
    }
    free(js);
}

/* A long series is drawn with at most DSMOE__MAX_POINTS points, the last one included;
 * a NaN breaks the line. */
static void test_svg_points(void) {
    enum { N = 5000 };
    static double x[N], y[N];
    for (int i = 0; i < N; i++) x[i] = y[i] = i;
    dsmoe__series s = {"a", 0, x, y, N, 0, 0};
    dsmoe__chart c = {"t", "x", "y", 0, 760, 360};
    dsmoe__buf b = {0};
    dsmoe__svg_lines(&b, &c, &s, 1);
    ASSERT_TRUE(b.s != NULL);
    if (!b.s) return;
    const char *p = strstr(b.s, "points=\"");
    ASSERT_TRUE(p != NULL);
    int pts = 0;
    for (const char *q = p ? p + 8 : ""; *q && *q != '"'; q++) pts += *q == ',';
    ASSERT_TRUE(pts <= DSMOE__MAX_POINTS + 1 && pts >= DSMOE__MAX_POINTS / 2);
    ASSERT_TRUE(strstr(b.s, "570.0,") != NULL); /* the last point, at the right edge */
    dsmoe__buf_free(&b);
    y[2500] = NAN;
    s.n = 10;
    y[5] = NAN;
    dsmoe__svg_lines(&b, &c, &s, 1);
    int lines = 0;
    for (const char *q = b.s; q && (q = strstr(q, "<polyline")) != NULL; q++) lines++;
    ASSERT_EQ_INT(lines, 2);
    dsmoe__buf_free(&b);
}

/* The JSON tree itself: escapes, surrogates, limits. */
static void test_jtree(void) {
    dsmoe__jtree t = {0};
    const char *ok = "{\"a\":[1,-2.5e3,true,null,\"\\u00e9\\ud83d\\ude00\\n\"],\"b\":{}}";
    ASSERT_OK(dsmoe__jtree_parse(&t, ok, strlen(ok), "t"));
    int32_t a = dsmoe__jv_get(&t, 0, "a");
    ASSERT_EQ_INT(t.nodes[a].n, 5);
    ASSERT_NEAR(t.nodes[dsmoe__jv_at(&t, a, 1)].num, -2500, 0);
    ASSERT_TRUE(strcmp(t.nodes[dsmoe__jv_at(&t, a, 4)].str, "\xc3\xa9\xf0\x9f\x98\x80\n") == 0);
    static const char *const bad[] = {"{\"a\":01}", "{\"a\":1", "[1,]", "\"\\ud800\"", "\"\\u0000\"", "\"a\x01\"",
                                      "\"\xff\"", "{\"a\" 1}", "[1] x", "1e999", "-", "[.5]", "tru"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ASSERT_STATUS(dsmoe__jtree_parse(&t, bad[i], strlen(bad[i]), "t"), DSMOE_STATUS_FORMAT);
    char deep[200];
    memset(deep, '[', 100);
    memset(deep + 100, ']', 100);
    ASSERT_STATUS(dsmoe__jtree_parse(&t, deep, 200, "t"), DSMOE_STATUS_FORMAT);
    dsmoe__jtree_free(&t);
}

int main(void) {
    RUN(test_golden_runs);
    RUN(test_golden_study);
    RUN(test_measures);
    RUN(test_tail);
    RUN(test_one_step);
    RUN(test_no_values);
    RUN(test_malformed);
    RUN(test_hostile);
    RUN(test_order);
    RUN(test_svg_points);
    RUN(test_jtree);
    return TEST_SUMMARY();
}
