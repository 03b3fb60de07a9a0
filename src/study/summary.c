/*
 * summary.c — the measures of a run from its traces (definitions: docs/study.md and
 * dsmoe/study.h), and the study summary across seeds: per group (strategy and variant)
 * mean, standard deviation, minimum and maximum over seeds, and each difference from the
 * reference group judged against the seeds' spread. Written as summary.json and
 * summary.csv.
 */
#include "study_internal.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *const metric_names[DSMOE_SM_COUNT] = {
    "val_loss",        "val_ppl",         "maxvio_global",  "maxvio_batch_tail", "load_entropy",
    "dead_experts",    "top_weight_mean", "top_weight_high", "score_entropy",     "mutual_information",
    "mi_kept",         "loss_spikes",     "grad_norm_max",  "bias_drift",        "tokens_per_s",
    "ep_max_share",    "ep_step_rel",
};

const char *dsmoe_summary_metric_name(int i) {
    return i >= 0 && i < DSMOE_SM_COUNT ? metric_names[i] : NULL;
}

/* ------------------------------------------------------------- measures -- */
double dsmoe__maxvio(const double *counts, int32_t E) {
    double sum = 0, mx = 0;
    for (int32_t e = 0; e < E; e++) {
        sum += counts[e];
        if (counts[e] > mx) mx = counts[e];
    }
    if (!(sum > 0)) return NAN;
    double mean = sum / E;
    return (mx - mean) / mean;
}

double dsmoe__entropy_bits(const double *counts, int32_t n) {
    double sum = 0, h = 0;
    for (int32_t i = 0; i < n; i++) sum += counts[i];
    if (!(sum > 0)) return NAN;
    for (int32_t i = 0; i < n; i++)
        if (counts[i] > 0) {
            double p = counts[i] / sum;
            h -= p * log2(p);
        }
    return h;
}

double dsmoe__mutual_info_bits(const double *dc, int32_t D, int32_t E) {
    double N = 0;
    for (int64_t i = 0; i < (int64_t)D * E; i++) {
        if (isnan(dc[i])) return NAN;
        N += dc[i];
    }
    if (!(N > 0) || D < 1) return NAN;
    double pd[DSMOE_SUMMARY_MAX_DOMAINS];
    for (int32_t d = 0; d < D; d++) {
        double s = 0;
        for (int32_t e = 0; e < E; e++) s += dc[(int64_t)d * E + e];
        pd[d] = s / N;
    }
    double mi = 0;
    for (int32_t e = 0; e < E; e++) {
        double pe = 0;
        for (int32_t d = 0; d < D; d++) pe += dc[(int64_t)d * E + e];
        pe /= N;
        for (int32_t d = 0; d < D; d++) {
            double c = dc[(int64_t)d * E + e];
            if (c > 0) {
                double p = c / N;
                mi += p * log2(p / (pd[d] * pe));
            }
        }
    }
    return mi < 0 ? 0 : mi;
}

int64_t dsmoe__loss_spikes(const double *loss, int64_t n, int32_t window, double threshold,
                           double sigmas, int32_t min_history) {
    /* over the finite losses only, in order */
    int64_t spikes = 0, seen = 0;
    double *hist = malloc((size_t)(window > 0 ? window : 1) * sizeof *hist);
    if (!hist) return -1;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(loss[i])) continue;
        if (seen >= min_history && seen >= 1) {
            int64_t w = seen < window ? seen : window;
            double m = 0;
            for (int64_t k = 0; k < w; k++) m += hist[(seen - 1 - k) % window];
            m /= (double)w;
            double var = 0;
            for (int64_t k = 0; k < w; k++) {
                const double d = hist[(seen - 1 - k) % window] - m;
                var += d * d;
            }
            const double sd = sqrt(var / (double)w);
            const double band = fmax(threshold * fabs(m), sigmas * sd);
            if (loss[i] - m > band) spikes++;
        }
        hist[seen % window] = loss[i];
        seen++;
    }
    free(hist);
    return spikes;
}

int64_t dsmoe__tail_start(const dsmoe__trace *tr) {
    if (tr->nt == 0) return 0;
    int64_t S = tr->t_step[tr->nt - 1];
    for (int64_t i = 0; i < tr->nt; i++)
        if (tr->t_step[i] * 5 > S * 4) return i; /* step > (1 - 0.2) S, exactly */
    return tr->nt - 1;
}

static double median(double *v, int64_t n) {
    if (n == 0) return NAN;
    for (int64_t i = 1; i < n; i++) { /* insertion sort: the list is short */
        double x = v[i];
        int64_t j = i;
        while (j > 0 && v[j - 1] > x) {
            v[j] = v[j - 1];
            j--;
        }
        v[j] = x;
    }
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

void dsmoe__summarize_trace(const dsmoe__trace *tr, dsmoe_run_summary *s) {
    memset(s, 0, sizeof *s);
    for (int i = 0; i < DSMOE_SM_COUNT; i++) s->m[i] = NAN;
    snprintf(s->name, sizeof s->name, "%s", tr->name);
    snprintf(s->strategy, sizeof s->strategy, "%s", tr->strategy);
    snprintf(s->group, sizeof s->group, "%s", tr->name);
    char *dash = strstr(s->group, "-seed");
    while (dash) { /* the last "-seed<digits>" ending the name */
        char *p = dash + 5;
        if (*p && strspn(p, "0123456789") == strlen(p)) {
            *dash = '\0';
            break;
        }
        dash = strstr(dash + 1, "-seed");
    }
    s->seed = tr->seed;
    s->experts = tr->E;
    s->n_main_layers = tr->n_main;
    s->n_domains = tr->D;
    for (int32_t d = 0; d < tr->D; d++) {
        snprintf(s->domains[d], sizeof s->domains[d], "%s", tr->domains[d]);
        s->domain_loss[d] = NAN;
    }
    const size_t E = (size_t)tr->E, L = (size_t)tr->n_main, D = (size_t)tr->D;
    if (tr->nt > 0) {
        s->steps = tr->t_step[tr->nt - 1];
        int64_t t0 = dsmoe__tail_start(tr);
        double mv = 0, sh = 0;
        int64_t nmv = 0, nsh = 0;
        for (int64_t r = t0; r < tr->nt; r++) {
            double a = 0, b = 0;
            for (size_t l = 0; l < L; l++) {
                const double *c = tr->t_counts + ((size_t)r * L + l) * E;
                double v = dsmoe__maxvio(c, tr->E), sum = 0, mx = 0;
                for (size_t e = 0; e < E; e++) {
                    sum += c[e];
                    mx = c[e] > mx ? c[e] : mx;
                }
                a += v;
                b += sum > 0 ? mx / sum : NAN;
            }
            if (!isnan(a)) {
                mv += a / (double)L;
                nmv++;
            }
            if (!isnan(b)) {
                sh += b / (double)L;
                nsh++;
            }
        }
        s->m[DSMOE_SM_MAXVIO_BATCH_TAIL] = nmv ? mv / (double)nmv : NAN;
        s->m[DSMOE_SM_EP_MAX_SHARE] = nsh ? sh / (double)nsh : NAN;
        s->m[DSMOE_SM_EP_STEP_REL] = (double)tr->E * s->m[DSMOE_SM_EP_MAX_SHARE];
        int64_t sp = dsmoe__loss_spikes(tr->t_loss, tr->nt, DSMOE_SPIKE_WINDOW, DSMOE_SPIKE_THRESHOLD,
                                        DSMOE_SPIKE_SIGMAS, DSMOE_SPIKE_MIN_HISTORY);
        s->m[DSMOE_SM_LOSS_SPIKES] = sp >= 0 ? (double)sp : NAN;
        double g = NAN;
        double *tps = malloc((size_t)tr->nt * sizeof *tps);
        int64_t ntps = 0;
        for (int64_t r = 0; r < tr->nt; r++) {
            if (isfinite(tr->t_grad[r]) && !(tr->t_grad[r] <= g)) g = tr->t_grad[r];
            if (tps && isfinite(tr->t_tps[r])) tps[ntps++] = tr->t_tps[r];
        }
        s->m[DSMOE_SM_GRAD_NORM_MAX] = g;
        s->m[DSMOE_SM_TOKENS_PER_S] = tps ? median(tps, ntps) : NAN;
        free(tps);
        double bd = NAN;
        for (size_t l = 0; l < L; l++) {
            double v = tr->t_bias_absmax[(size_t)(tr->nt - 1) * L + l];
            if (isfinite(v) && !(v <= bd)) bd = v;
        }
        s->m[DSMOE_SM_BIAS_DRIFT] = bd;
    }
    if (tr->ne > 0) {
        size_t r = (size_t)tr->ne - 1;
        s->m[DSMOE_SM_VAL_LOSS] = tr->e_loss[r];
        s->m[DSMOE_SM_VAL_PPL] = exp(tr->e_loss[r]);
        for (size_t d = 0; d < D; d++) s->domain_loss[d] = tr->e_dloss[r * D + d];
        double mv = 0, ent = 0, dead = 0, se = 0, mi = 0;
        double hist[DSMOE__HIST_BINS] = {0};
        for (size_t l = 0; l < L; l++) {
            const double *c = tr->e_counts + (r * L + l) * E;
            mv += dsmoe__maxvio(c, tr->E);
            ent += dsmoe__entropy_bits(c, tr->E);
            for (size_t e = 0; e < E; e++) dead += c[e] == 0;
            se += tr->e_sent[r * L + l];
            mi += dsmoe__mutual_info_bits(tr->e_dcounts + (r * L + l) * D * E, tr->D, tr->E);
            for (int k = 0; k < DSMOE__HIST_BINS; k++) hist[k] += tr->e_hist[(r * L + l) * DSMOE__HIST_BINS + (size_t)k];
        }
        s->m[DSMOE_SM_MAXVIO_GLOBAL] = mv / (double)L;
        s->m[DSMOE_SM_LOAD_ENTROPY] = ent / (double)L;
        s->m[DSMOE_SM_DEAD_EXPERTS] = dead;
        s->m[DSMOE_SM_SCORE_ENTROPY] = se / (double)L;
        s->m[DSMOE_SM_MUTUAL_INFO] = mi / (double)L;
        double tot = 0, wsum = 0;
        for (int k = 0; k < DSMOE__HIST_BINS; k++) {
            tot += hist[k];
            wsum += hist[k] * (k + 0.5) * (1.0 / DSMOE__HIST_BINS);
        }
        if (tot > 0) {
            s->m[DSMOE_SM_TOP_WEIGHT_MEAN] = wsum / tot;
            s->m[DSMOE_SM_TOP_WEIGHT_HIGH] = (hist[18] + hist[19]) / tot;
        }
    }
}

dsmoe_status dsmoe_run_summarize(const char *run_dir, dsmoe_run_summary *s) {
    if (!run_dir || !s) return DSMOE__FAIL(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_run_summarize: NULL argument");
    dsmoe__trace tr;
    dsmoe_status st = dsmoe__trace_load(run_dir, &tr);
    if (st) return st;
    dsmoe__summarize_trace(&tr, s);
    dsmoe__trace_free(&tr);
    return DSMOE_OK;
}

/* ------------------------------------------------------------ run lists -- */
static int has_metrics(const char *dir) {
    size_t L = strlen(dir) + 32;
    char *p = malloc(L);
    if (!p) return 0;
    snprintf(p, L, "%s/metrics.jsonl", dir);
    struct stat sb;
    int ok = stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
    free(p);
    return ok;
}

/* Run order: the strategies in the order of docs/train.md (unknown ones after them, by
 * name), a strategy's α variants by name, then the seeds by number. */
static void split_name(const char *path, char *group, size_t cap, long long *seed) {
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    snprintf(group, cap, "%s", base);
    *seed = -1;
    char *dash = strstr(group, "-seed");
    while (dash) {
        char *p = dash + 5;
        if (*p && strspn(p, "0123456789") == strlen(p) && strlen(p) < 12) {
            *seed = atoll(p);
            *dash = '\0';
            break;
        }
        dash = strstr(dash + 1, "-seed");
    }
}

static int strategy_rank(const char *group) {
    static const char *const order[] = {"v3", "v3-no-balance", "v3-proportional", "v3-no-norm", "aux-loss", "v2",
                                        "softmax-norm"};
    const int n = (int)(sizeof order / sizeof order[0]);
    for (int i = 0; i < n; i++) {
        size_t L = strlen(order[i]);
        if (strncmp(group, order[i], L) == 0 && (group[L] == '\0' || strncmp(group + L, "-a", 2) == 0)) return i;
    }
    return n;
}

static int cmp_runs(const void *a, const void *b) {
    char ga[256], gb[256];
    long long sa, sb;
    split_name(*(const char *const *)a, ga, sizeof ga, &sa);
    split_name(*(const char *const *)b, gb, sizeof gb, &sb);
    int ra = strategy_rank(ga), rb = strategy_rank(gb);
    if (ra != rb) return ra < rb ? -1 : 1;
    int c = strcmp(ga, gb);
    if (c) return c;
    if (sa != sb) return sa < sb ? -1 : 1;
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

void dsmoe__free_list(char **paths, int32_t n) {
    for (int32_t i = 0; i < n; i++) free(paths[i]);
    free(paths);
}

dsmoe_status dsmoe__list_runs(const char *dir, char ***paths, int32_t *n) {
    *paths = NULL;
    *n = 0;
    if (has_metrics(dir)) {
        char **p = malloc(sizeof *p);
        if (!p || !(p[0] = strdup(dir))) {
            free(p);
            return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
        }
        *paths = p;
        *n = 1;
        return DSMOE_OK;
    }
    size_t L = strlen(dir) + 8;
    char *runs = malloc(L);
    if (!runs) return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
    snprintf(runs, L, "%s/runs", dir);
    DIR *d = opendir(runs);
    if (!d) {
        free(runs);
        return DSMOE__FAIL(DSMOE_STATUS_IO, "%s: neither a run folder (no metrics.jsonl) nor a study folder (no runs/)",
                            dir);
    }
    char **list = NULL;
    int32_t cnt = 0, cap = 0;
    dsmoe_status st = DSMOE_OK;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.') continue;
        size_t pl = strlen(runs) + strlen(de->d_name) + 2;
        char *p = malloc(pl);
        if (!p) {
            st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
            break;
        }
        snprintf(p, pl, "%s/%s", runs, de->d_name);
        if (!has_metrics(p)) {
            free(p);
            continue;
        }
        if (cnt == DSMOE_STUDY_MAX_RUNS) {
            free(p);
            st = DSMOE__FAIL(DSMOE_STATUS_INVALID_ARGUMENT, "%s: more than %d runs", runs, DSMOE_STUDY_MAX_RUNS);
            break;
        }
        if (cnt == cap) {
            cap = cap ? cap * 2 : 16;
            char **nl = realloc(list, (size_t)cap * sizeof *nl);
            if (!nl) {
                free(p);
                st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
                break;
            }
            list = nl;
        }
        list[cnt++] = p;
    }
    closedir(d);
    if (!st && cnt == 0) st = DSMOE__FAIL(DSMOE_STATUS_IO, "%s: no run folder with a metrics.jsonl", runs);
    free(runs);
    if (st) {
        dsmoe__free_list(list, cnt);
        return st;
    }
    qsort(list, (size_t)cnt, sizeof *list, cmp_runs);
    *paths = list;
    *n = cnt;
    return DSMOE_OK;
}

/* ---------------------------------------------------------- study summary -- */
/* Statistics of the measures (0 .. DSMOE_SM_COUNT - 1), then of the validation loss of
 * each domain of the first run (DSMOE_SM_COUNT + d). */
#define NSTAT (DSMOE_SM_COUNT + DSMOE_SUMMARY_MAX_DOMAINS)
typedef struct group_stat {
    char name[128];
    int32_t runs;
    double mean[NSTAT], sd[NSTAT], mn[NSTAT], mx[NSTAT];
    int32_t n[NSTAT];
} group_stat;

/* Measure m of run r, or its loss on domain m - DSMOE_SM_COUNT of run `first`. */
static double run_value(const dsmoe_run_summary *r, const dsmoe_run_summary *first, int m) {
    if (m < DSMOE_SM_COUNT) return r->m[m];
    const char *dn = first->domains[m - DSMOE_SM_COUNT];
    for (int32_t d = 0; d < r->n_domains; d++)
        if (strcmp(r->domains[d], dn) == 0) return r->domain_loss[d];
    return NAN;
}

static void group_stats(const dsmoe_run_summary *rs, int32_t nr, const char *name, group_stat *g) {
    memset(g, 0, sizeof *g);
    snprintf(g->name, sizeof g->name, "%s", name);
    for (int m = 0; m < DSMOE_SM_COUNT + rs[0].n_domains; m++) {
        double sum = 0, lo = INFINITY, hi = -INFINITY;
        int32_t n = 0;
        for (int32_t i = 0; i < nr; i++) {
            if (strcmp(rs[i].group, name) != 0) continue;
            if (m == 0) g->runs++;
            double v = run_value(&rs[i], &rs[0], m);
            if (!isfinite(v)) continue;
            sum += v;
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
            n++;
        }
        g->n[m] = n;
        if (n == 0) {
            g->mean[m] = g->sd[m] = g->mn[m] = g->mx[m] = NAN;
            continue;
        }
        double mean = sum / n, ss = 0;
        for (int32_t i = 0; i < nr; i++) {
            double v = run_value(&rs[i], &rs[0], m);
            if (strcmp(rs[i].group, name) == 0 && isfinite(v)) ss += (v - mean) * (v - mean);
        }
        g->mean[m] = mean;
        g->sd[m] = n > 1 ? sqrt(ss / (n - 1)) : 0;
        g->mn[m] = lo;
        g->mx[m] = hi;
    }
}

/* "differs": both groups have >= 2 seeds and their seed ranges do not overlap;
 * "within seed spread": they overlap; "one seed": the spread is unknown. */
static const char *verdict(const group_stat *a, const group_stat *ref, int m) {
    if (a->n[m] < 2 || ref->n[m] < 2) return "one seed";
    if (a->mn[m] > ref->mx[m] || a->mx[m] < ref->mn[m]) return "differs";
    return "within seed spread";
}

static void csv_str(dsmoe__buf *b, const char *s) {
    dsmoe__buf_put(b, "\"", 1);
    for (const char *p = s; *p; p++) {
        if (*p == '"') dsmoe__buf_put(b, "\"\"", 2);
        else if ((unsigned char)*p < 0x20) dsmoe__buf_put(b, " ", 1);
        else dsmoe__buf_put(b, p, 1);
    }
    dsmoe__buf_put(b, "\"", 1);
}

static void csv_num(dsmoe__buf *b, double v) {
    if (isfinite(v)) dsmoe__buf_printf(b, ",%.10g", v);
    else dsmoe__buf_put(b, ",", 1);
}

typedef struct study_sum {
    dsmoe_run_summary *rs;
    int32_t nr;
    group_stat *gs;
    int32_t ng;
    int32_t ref; /* reference group for comparisons */
    char mi_ref[128];
} study_sum;

static void study_sum_free(study_sum *ss) {
    free(ss->rs);
    free(ss->gs);
    memset(ss, 0, sizeof *ss);
}

static dsmoe_status study_sum_build(const char *dir, study_sum *ss) {
    memset(ss, 0, sizeof *ss);
    char **paths;
    int32_t n;
    dsmoe_status st = dsmoe__list_runs(dir, &paths, &n);
    if (st) return st;
    if (n < 1) return DSMOE__FAIL(DSMOE_STATUS_IO, "%s: no runs", dir);
    ss->rs = calloc((size_t)n, sizeof *ss->rs);
    ss->gs = calloc((size_t)n, sizeof *ss->gs);
    if (!ss->rs || !ss->gs) {
        dsmoe__free_list(paths, n);
        study_sum_free(ss);
        return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
    }
    for (int32_t i = 0; i < n && !st; i++) st = dsmoe_run_summarize(paths[i], &ss->rs[i]);
    dsmoe__free_list(paths, n);
    if (st) {
        study_sum_free(ss);
        return st;
    }
    ss->nr = n;
    /* groups in order of first appearance (runs are sorted by folder name) */
    for (int32_t i = 0; i < n; i++) {
        int32_t g = 0;
        while (g < ss->ng && strcmp(ss->gs[g].name, ss->rs[i].group) != 0) g++;
        if (g == ss->ng) snprintf(ss->gs[ss->ng++].name, sizeof ss->gs[0].name, "%s", ss->rs[i].group);
    }
    /* the reference of "mi_kept": v3-no-balance's mean, else the largest group mean */
    double ref = NAN;
    for (int32_t g = 0; g < ss->ng; g++) {
        group_stat tmp;
        group_stats(ss->rs, ss->nr, ss->gs[g].name, &tmp);
        double v = tmp.mean[DSMOE_SM_MUTUAL_INFO];
        if (strcmp(ss->gs[g].name, "v3-no-balance") == 0 && isfinite(v)) {
            ref = v;
            snprintf(ss->mi_ref, sizeof ss->mi_ref, "%s", ss->gs[g].name);
            break;
        }
        if (isfinite(v) && !(v <= ref)) {
            ref = v;
            snprintf(ss->mi_ref, sizeof ss->mi_ref, "%s", ss->gs[g].name);
        }
    }
    if (ss->nr > 1 || ss->ng > 1)
        for (int32_t i = 0; i < n; i++)
            ss->rs[i].m[DSMOE_SM_MI_KEPT] = ref > 0 ? ss->rs[i].m[DSMOE_SM_MUTUAL_INFO] / ref : NAN;
    for (int32_t g = 0; g < ss->ng; g++) {
        char name[128];
        memcpy(name, ss->gs[g].name, sizeof name);
        group_stats(ss->rs, ss->nr, name, &ss->gs[g]);
    }
    ss->ref = 0;
    for (int32_t g = 0; g < ss->ng; g++)
        if (strcmp(ss->gs[g].name, "v3") == 0) ss->ref = g;
    return DSMOE_OK;
}

static void write_json(const study_sum *ss, dsmoe__buf *b) {
    dsmoe__buf_printf(b, "{\"version\":1,\"metrics\":[");
    for (int m = 0; m < DSMOE_SM_COUNT; m++) {
        if (m) dsmoe__buf_put(b, ",", 1);
        dsmoe__buf_json_str(b, metric_names[m]);
    }
    dsmoe__buf_printf(b, "],\n\"reference\":");
    dsmoe__buf_json_str(b, ss->gs[ss->ref].name);
    dsmoe__buf_printf(b, ",\"mi_reference\":");
    if (ss->mi_ref[0]) dsmoe__buf_json_str(b, ss->mi_ref);
    else dsmoe__buf_put(b, "null", 4);
    dsmoe__buf_printf(b, ",\n\"runs\":[");
    for (int32_t i = 0; i < ss->nr; i++) {
        const dsmoe_run_summary *r = &ss->rs[i];
        dsmoe__buf_printf(b, "%s\n{\"name\":", i ? "," : "");
        dsmoe__buf_json_str(b, r->name);
        dsmoe__buf_printf(b, ",\"group\":");
        dsmoe__buf_json_str(b, r->group);
        dsmoe__buf_printf(b, ",\"strategy\":");
        dsmoe__buf_json_str(b, r->strategy);
        dsmoe__buf_printf(b, ",\"seed\":%lld,\"steps\":%lld,\"experts\":%d,\"metrics\":{", (long long)r->seed,
                          (long long)r->steps, r->experts);
        for (int m = 0; m < DSMOE_SM_COUNT; m++) {
            dsmoe__buf_printf(b, "%s\"%s\":", m ? "," : "", metric_names[m]);
            dsmoe__buf_json_num(b, r->m[m]);
        }
        dsmoe__buf_printf(b, "},\"domain_loss\":{");
        for (int32_t d = 0; d < r->n_domains; d++) {
            if (d) dsmoe__buf_put(b, ",", 1);
            dsmoe__buf_json_str(b, r->domains[d]);
            dsmoe__buf_put(b, ":", 1);
            dsmoe__buf_json_num(b, r->domain_loss[d]);
        }
        dsmoe__buf_printf(b, "}}");
    }
    dsmoe__buf_printf(b, "],\n\"groups\":[");
    const group_stat *ref = &ss->gs[ss->ref];
    for (int32_t g = 0; g < ss->ng; g++) {
        const group_stat *G = &ss->gs[g];
        dsmoe__buf_printf(b, "%s\n{\"name\":", g ? "," : "");
        dsmoe__buf_json_str(b, G->name);
        dsmoe__buf_printf(b, ",\"runs\":%d,\"metrics\":{", G->runs);
        for (int m = 0; m < DSMOE_SM_COUNT; m++) {
            dsmoe__buf_printf(b, "%s\"%s\":{\"n\":%d,\"mean\":", m ? "," : "", metric_names[m], G->n[m]);
            dsmoe__buf_json_num(b, G->mean[m]);
            dsmoe__buf_printf(b, ",\"std\":");
            dsmoe__buf_json_num(b, G->sd[m]);
            dsmoe__buf_printf(b, ",\"min\":");
            dsmoe__buf_json_num(b, G->mn[m]);
            dsmoe__buf_printf(b, ",\"max\":");
            dsmoe__buf_json_num(b, G->mx[m]);
            dsmoe__buf_printf(b, "}");
        }
        dsmoe__buf_printf(b, "},\"domain_loss\":{");
        const dsmoe_run_summary *r0 = &ss->rs[0];
        for (int32_t d = 0; d < r0->n_domains; d++) {
            int m = DSMOE_SM_COUNT + d;
            if (d) dsmoe__buf_put(b, ",", 1);
            dsmoe__buf_json_str(b, r0->domains[d]);
            dsmoe__buf_printf(b, ":{\"n\":%d,\"mean\":", G->n[m]);
            dsmoe__buf_json_num(b, G->mean[m]);
            dsmoe__buf_printf(b, ",\"std\":");
            dsmoe__buf_json_num(b, G->sd[m]);
            dsmoe__buf_printf(b, ",\"min\":");
            dsmoe__buf_json_num(b, G->mn[m]);
            dsmoe__buf_printf(b, ",\"max\":");
            dsmoe__buf_json_num(b, G->mx[m]);
            if (g != ss->ref) {
                dsmoe__buf_printf(b, ",\"diff\":");
                dsmoe__buf_json_num(b, G->mean[m] - ref->mean[m]);
                dsmoe__buf_printf(b, ",\"verdict\":\"%s\"", verdict(G, ref, m));
            }
            dsmoe__buf_printf(b, "}");
        }
        dsmoe__buf_printf(b, "}");
        if (g != ss->ref) {
            dsmoe__buf_printf(b, ",\"vs_reference\":{");
            for (int m = 0; m < DSMOE_SM_COUNT; m++) {
                dsmoe__buf_printf(b, "%s\"%s\":{\"diff\":", m ? "," : "", metric_names[m]);
                dsmoe__buf_json_num(b, G->mean[m] - ref->mean[m]);
                dsmoe__buf_printf(b, ",\"verdict\":\"%s\"}", verdict(G, ref, m));
            }
            dsmoe__buf_printf(b, "}");
        }
        dsmoe__buf_printf(b, "}");
    }
    dsmoe__buf_printf(b, "]}\n");
}

static void write_csv(const study_sum *ss, dsmoe__buf *b) {
    dsmoe__buf_printf(b, "kind,name,group,seed");
    for (int m = 0; m < DSMOE_SM_COUNT; m++) dsmoe__buf_printf(b, ",%s", metric_names[m]);
    const int nm = DSMOE_SM_COUNT + ss->rs[0].n_domains;
    for (int32_t d = 0; d < ss->rs[0].n_domains; d++) {
        char col[64];
        snprintf(col, sizeof col, "loss:%s", ss->rs[0].domains[d]);
        dsmoe__buf_put(b, ",", 1);
        csv_str(b, col);
    }
    dsmoe__buf_printf(b, "\n");
    for (int32_t i = 0; i < ss->nr; i++) {
        const dsmoe_run_summary *r = &ss->rs[i];
        dsmoe__buf_printf(b, "run,");
        csv_str(b, r->name);
        dsmoe__buf_put(b, ",", 1);
        csv_str(b, r->group);
        dsmoe__buf_printf(b, ",%lld", (long long)r->seed);
        for (int m = 0; m < nm; m++) csv_num(b, run_value(r, &ss->rs[0], m));
        dsmoe__buf_printf(b, "\n");
    }
    static const char *const kinds[4] = {"mean", "std", "min", "max"};
    for (int32_t g = 0; g < ss->ng; g++)
        for (int k = 0; k < 4; k++) {
            const group_stat *G = &ss->gs[g];
            const double *v = k == 0 ? G->mean : k == 1 ? G->sd : k == 2 ? G->mn : G->mx;
            dsmoe__buf_printf(b, "%s,", kinds[k]);
            csv_str(b, G->name);
            dsmoe__buf_put(b, ",", 1);
            csv_str(b, G->name);
            dsmoe__buf_printf(b, ",");
            for (int m = 0; m < nm; m++) csv_num(b, v[m]);
            dsmoe__buf_printf(b, "\n");
        }
}

static dsmoe_status save_in(const char *out_dir, const char *file, const dsmoe__buf *b) {
    size_t L = strlen(out_dir) + strlen(file) + 2;
    char *p = malloc(L);
    if (!p) return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
    snprintf(p, L, "%s/%s", out_dir, file);
    dsmoe_status st = dsmoe__buf_save(b, p);
    free(p);
    return st;
}

dsmoe_status dsmoe_study_summarize(const char *dir, const char *out_dir) {
    if (!dir || !out_dir) return DSMOE__FAIL(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_study_summarize: NULL argument");
    study_sum ss;
    dsmoe_status st = study_sum_build(dir, &ss);
    if (st) return st;
    dsmoe__buf j = {0}, c = {0};
    write_json(&ss, &j);
    write_csv(&ss, &c);
    st = save_in(out_dir, "summary.json", &j);
    if (!st) st = save_in(out_dir, "summary.csv", &c);
    dsmoe__buf_free(&j);
    dsmoe__buf_free(&c);
    study_sum_free(&ss);
    return st;
}

/* A table cell: mean ± sd over seeds, marked by its verdict against ref (NULL: none). */
static void stat_cell(dsmoe__buf *b, const group_stat *G, const group_stat *ref, int m) {
    if (G->n[m] == 0) {
        dsmoe__buf_printf(b, "<td>&#8211;</td>");
        return;
    }
    const char *v = ref ? verdict(G, ref, m) : "";
    const char *cls = strcmp(v, "differs") == 0 ? " class=\"diff\"" :
                      strcmp(v, "within seed spread") == 0 ? " class=\"ns\"" : "";
    dsmoe__buf_printf(b, "<td%s title=\"%s\">%.4g", cls, v, G->mean[m]);
    if (G->n[m] > 1) dsmoe__buf_printf(b, " &#177; %.2g", G->sd[m]);
    dsmoe__buf_printf(b, "</td>");
}

dsmoe_status dsmoe__summary_table(const char *dir, dsmoe__buf *b) {
    study_sum ss;
    dsmoe_status st = study_sum_build(dir, &ss);
    if (st) return st;
    static const int shown[] = {DSMOE_SM_VAL_LOSS,       DSMOE_SM_VAL_PPL,       DSMOE_SM_MAXVIO_GLOBAL,
                                DSMOE_SM_MAXVIO_BATCH_TAIL, DSMOE_SM_LOAD_ENTROPY, DSMOE_SM_DEAD_EXPERTS,
                                DSMOE_SM_TOP_WEIGHT_MEAN, DSMOE_SM_TOP_WEIGHT_HIGH, DSMOE_SM_SCORE_ENTROPY,
                                DSMOE_SM_MUTUAL_INFO,    DSMOE_SM_MI_KEPT,       DSMOE_SM_LOSS_SPIKES,
                                DSMOE_SM_GRAD_NORM_MAX,  DSMOE_SM_BIAS_DRIFT,    DSMOE_SM_TOKENS_PER_S,
                                DSMOE_SM_EP_STEP_REL};
    const int ns = (int)(sizeof shown / sizeof shown[0]);
    dsmoe__buf_printf(b, "<table class=\"sum\"><thead><tr><th>strategy</th><th>seeds</th>");
    for (int k = 0; k < ns; k++) dsmoe__buf_printf(b, "<th>%s</th>", metric_names[shown[k]]);
    dsmoe__buf_printf(b, "</tr></thead><tbody>\n");
    const group_stat *ref = &ss.gs[ss.ref];
    for (int32_t g = 0; g < ss.ng; g++) {
        const group_stat *G = &ss.gs[g];
        dsmoe__buf_printf(b, "<tr><td>");
        dsmoe__buf_xml(b, G->name);
        dsmoe__buf_printf(b, "%s</td><td>%d</td>", g == ss.ref ? " (reference)" : "", G->runs);
        for (int k = 0; k < ns; k++) stat_cell(b, G, g == ss.ref ? NULL : ref, shown[k]);
        dsmoe__buf_printf(b, "</tr>\n");
    }
    dsmoe__buf_printf(b, "</tbody></table>\n<p class=\"note\">mean &#177; standard deviation over seeds. "
                         "Compared with the reference strategy, a value in <b>bold</b> differs by more than "
                         "the seeds' spread (the ranges over seeds do not overlap); a value in "
                         "<i>grey italics</i> is within the seeds' spread: not a finding. With one seed "
                         "no difference can be judged.");
    if (ss.mi_ref[0]) {
        dsmoe__buf_printf(b, " mi_kept is relative to ");
        dsmoe__buf_xml(b, ss.mi_ref);
        dsmoe__buf_printf(b, ".");
    }
    dsmoe__buf_printf(b, "</p>\n");
    /* validation loss per domain */
    const dsmoe_run_summary *r0 = &ss.rs[0];
    if (r0->n_domains > 0) {
        dsmoe__buf_printf(b, "<table class=\"sum\"><thead><tr><th>validation loss (nats) per domain</th>");
        for (int32_t d = 0; d < r0->n_domains; d++) {
            dsmoe__buf_printf(b, "<th>");
            dsmoe__buf_xml(b, r0->domains[d]);
            dsmoe__buf_printf(b, "</th>");
        }
        dsmoe__buf_printf(b, "</tr></thead><tbody>\n");
        for (int32_t g = 0; g < ss.ng; g++) {
            const group_stat *G = &ss.gs[g];
            dsmoe__buf_printf(b, "<tr><td>");
            dsmoe__buf_xml(b, G->name);
            dsmoe__buf_printf(b, "</td>");
            for (int32_t d = 0; d < r0->n_domains; d++) stat_cell(b, G, g == ss.ref ? NULL : ref, DSMOE_SM_COUNT + d);
            dsmoe__buf_printf(b, "</tr>\n");
        }
        dsmoe__buf_printf(b, "</tbody></table>\n");
    }
    /* the runs, one row each */
    dsmoe__buf_printf(b, "<details><summary>every run</summary><table class=\"sum\"><thead><tr><th>run</th><th>steps</th>");
    for (int k = 0; k < ns; k++) dsmoe__buf_printf(b, "<th>%s</th>", metric_names[shown[k]]);
    dsmoe__buf_printf(b, "</tr></thead><tbody>\n");
    for (int32_t i = 0; i < ss.nr; i++) {
        dsmoe__buf_printf(b, "<tr><td>");
        dsmoe__buf_xml(b, ss.rs[i].name);
        dsmoe__buf_printf(b, "</td><td>%lld</td>", (long long)ss.rs[i].steps);
        for (int k = 0; k < ns; k++) {
            double v = ss.rs[i].m[shown[k]];
            if (isfinite(v)) dsmoe__buf_printf(b, "<td>%.4g</td>", v);
            else dsmoe__buf_printf(b, "<td>&#8211;</td>");
        }
        dsmoe__buf_printf(b, "</tr>\n");
    }
    dsmoe__buf_printf(b, "</tbody></table></details>\n");
    study_sum_free(&ss);
    return DSMOE_OK;
}
