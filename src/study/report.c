/*
 * report.c — a run or a study folder as one self-contained HTML page (inline SVG, no
 * script, no network): training and validation loss, batch MaxVio of every run on one
 * chart, the per-expert load over time of one layer, the domain × expert routing matrix,
 * the distribution of the largest normalized routing weight, and the summary table; the
 * same charts as standalone .svg files. Layout: a fixed-height header, then one
 * fixed-size figure per chart (REPORT_HEADER_H, REPORT_FIG_H apart), then the tables —
 * so a screenshot test knows where each chart lies.
 */
#include "study_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define REPORT_HEADER_H 120
#define REPORT_FIG_H 420 /* 400 + 20 margin */
#define CHART_W 760
#define CHART_H 360
#define MAX_COLS 150
#define MAX_CELLS 20000

void dsmoe_report_options_default(dsmoe_report_options *o) {
    if (!o) return;
    o->html_path = NULL;
    o->svg_dir = NULL;
    o->layer = -1;
}

typedef struct rep {
    dsmoe__trace *tr;
    dsmoe_run_summary *sum;
    int32_t n;
    int32_t *group;       /* group index per run */
    int32_t ng;
    int32_t *first;       /* first run of each group */
    int32_t *lmain;       /* per run: main index of the chosen layer */
    int32_t layer;
    dsmoe__buf html;
    const char *svg_dir;
    int32_t n_charts;
    dsmoe_status st;
} rep;

static void sanitize(const char *in, char *out, size_t cap) {
    size_t k = 0;
    for (const char *p = in; *p && k + 1 < cap; p++) {
        char ch = *p;
        int ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' ||
                 ch == '.' || ch == '_';
        out[k++] = ok ? ch : '_';
    }
    out[k] = '\0';
}

/* Writes the chart as <svg_dir>/<file> and into the page as figure number n_charts. */
static void emit(rep *R, const char *file, const char *caption, dsmoe__buf *svg) {
    if (R->st) return;
    size_t L = strlen(R->svg_dir) + strlen(file) + 2;
    char *p = malloc(L);
    if (!p) {
        R->st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
        return;
    }
    snprintf(p, L, "%s/%s", R->svg_dir, file);
    dsmoe_status st = dsmoe__buf_save(svg, p);
    free(p);
    if (st) {
        R->st = st;
        return;
    }
    dsmoe__buf_printf(&R->html, "<figure class=\"chart\" id=\"chart-%d\">\n", R->n_charts);
    dsmoe__buf_put(&R->html, svg->s, svg->n);
    dsmoe__buf_printf(&R->html, "<figcaption>");
    dsmoe__buf_xml(&R->html, caption);
    dsmoe__buf_printf(&R->html, " <span class=\"file\">(");
    dsmoe__buf_xml(&R->html, file);
    dsmoe__buf_printf(&R->html, ")</span></figcaption></figure>\n");
    R->n_charts++;
}

static dsmoe__chart chart(const char *title, const char *xl, const char *yl, int log_y) {
    dsmoe__chart c = {title, xl, yl, log_y, CHART_W, CHART_H};
    return c;
}

static void chart_loss(rep *R) {
    int32_t ns = 0;
    size_t n2 = R->n > 0 ? (size_t)R->n * 2 : 2;
    dsmoe__series *s = calloc(n2, sizeof *s);
    double **xs = calloc(n2, sizeof *xs);
    char (*lab)[160] = calloc(n2, sizeof *lab);
    if (!s || !xs || !lab) {
        R->st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    for (int32_t i = 0; i < R->n; i++) {
        const dsmoe__trace *t = &R->tr[i];
        int first = R->first[R->group[i]] == i;
        double *x = malloc((size_t)(t->nt + t->ne + 1) * sizeof *x);
        if (!x) {
            R->st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
            goto done;
        }
        xs[i] = x;
        for (int64_t r = 0; r < t->nt; r++) x[r] = (double)t->t_step[r];
        for (int64_t r = 0; r < t->ne; r++) x[t->nt + r] = (double)t->e_step[r];
        snprintf(lab[ns], sizeof lab[0], "%s train", R->sum[i].group);
        s[ns] = (dsmoe__series){first ? lab[ns] : NULL, R->group[i], x, t->t_loss, t->nt, 0, 0};
        ns++;
        snprintf(lab[ns], sizeof lab[0], "%s validation", R->sum[i].group);
        s[ns] = (dsmoe__series){first ? lab[ns] : NULL, R->group[i], x + t->nt, t->e_loss, t->ne, 1, 1};
        ns++;
    }
    dsmoe__buf b = {0};
    dsmoe__chart c = chart("Loss", "step", "cross-entropy (nats)", 0);
    dsmoe__svg_lines(&b, &c, s, ns);
    emit(R, "loss.svg", "Training loss (solid) and validation loss (dashed, at each evaluation) of every run; one colour per strategy.", &b);
    dsmoe__buf_free(&b);
done:
    if (xs)
        for (int32_t i = 0; i < R->n; i++) free(xs[i]);
    free(xs);
    free(s);
    free(lab);
}

static void chart_maxvio(rep *R) {
    size_t n = R->n > 0 ? (size_t)R->n : 1;
    dsmoe__series *s = calloc(n, sizeof *s);
    double **xs = calloc(n, sizeof *xs), **ys = calloc(n, sizeof *ys);
    if (!s || !xs || !ys) {
        R->st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    for (int32_t i = 0; i < R->n; i++) {
        const dsmoe__trace *t = &R->tr[i];
        xs[i] = malloc((size_t)(t->nt + 1) * sizeof(double));
        ys[i] = malloc((size_t)(t->nt + 1) * sizeof(double));
        if (!xs[i] || !ys[i]) {
            R->st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
            goto done;
        }
        for (int64_t r = 0; r < t->nt; r++) {
            double a = 0;
            for (int32_t l = 0; l < t->n_main; l++)
                a += dsmoe__maxvio(t->t_counts + ((size_t)r * (size_t)t->n_main + (size_t)l) * (size_t)t->E, t->E);
            xs[i][r] = (double)t->t_step[r];
            ys[i][r] = a / t->n_main;
        }
        s[i] = (dsmoe__series){R->first[R->group[i]] == i ? R->sum[i].group : NULL, R->group[i], xs[i], ys[i],
                               t->nt, 0, 0};
    }
    dsmoe__buf b = {0};
    dsmoe__chart c = chart("Batch MaxVio", "step", "MaxVio of the batch (log scale)", 1);
    dsmoe__svg_lines(&b, &c, s, R->n);
    emit(R, "maxvio.svg", "MaxVio of each training batch, (max load - mean load) / mean load, mean over the main MoE layers; every run, one colour per strategy.", &b);
    dsmoe__buf_free(&b);
done:
    for (int32_t i = 0; xs && ys && i < R->n; i++) {
        free(xs[i]);
        free(ys[i]);
    }
    free(xs);
    free(ys);
    free(s);
}

static void chart_load(rep *R, int32_t g) {
    int32_t i = R->first[g];
    const dsmoe__trace *t = &R->tr[i];
    const int32_t E = t->E, lm = R->lmain[i];
    /* at most MAX_COLS columns, and about MAX_CELLS cells for many experts */
    int32_t maxc = E > MAX_CELLS / MAX_COLS ? (MAX_CELLS / E > 10 ? MAX_CELLS / E : 10) : MAX_COLS;
    int32_t cols = t->nt < maxc ? (int32_t)t->nt : maxc;
    double *v = calloc((size_t)E * (size_t)(cols ? cols : 1), sizeof *v);
    double *w = calloc((size_t)(cols ? cols : 1), sizeof *w);
    if (!v || !w) {
        free(v);
        free(w);
        R->st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
        return;
    }
    double vmax = 0;
    for (int64_t r = 0; r < t->nt; r++) {
        int32_t k = (int32_t)(r * cols / t->nt);
        const double *c = t->t_counts + ((size_t)r * (size_t)t->n_main + (size_t)lm) * (size_t)E;
        double sum = 0;
        for (int32_t e = 0; e < E; e++) sum += c[e];
        if (!(sum > 0)) continue;
        for (int32_t e = 0; e < E; e++) v[(size_t)e * (size_t)cols + (size_t)k] += c[e] * E / sum;
        w[k] += 1;
    }
    for (int32_t k = 0; k < cols; k++)
        for (int32_t e = 0; e < E; e++) {
            double *x = &v[(size_t)e * (size_t)cols + (size_t)k];
            *x = w[k] > 0 ? *x / w[k] : NAN;
            if (isfinite(*x) && *x > vmax) vmax = *x;
        }
    char title[256], xl[128], file[200], san[128], cap[400];
    snprintf(title, sizeof title, "Expert load over time, layer %d: %s", R->layer, t->name);
    if (t->nt > 0)
        snprintf(xl, sizeof xl, "training, step %lld to %lld", (long long)t->t_step[0], (long long)t->t_step[t->nt - 1]);
    else
        snprintf(xl, sizeof xl, "training");
    sanitize(R->sum[i].group, san, sizeof san);
    snprintf(file, sizeof file, "load-%d-%s.svg", g, san);
    snprintf(cap, sizeof cap, "Tokens routed to each expert of layer %d relative to the mean (1 = balanced), per training batch: run %s.",
             R->layer, t->name);
    dsmoe__buf b = {0};
    dsmoe__chart c = chart(title, xl, "expert", 0);
    dsmoe__svg_heat(&b, &c, v, E, cols, NULL, NULL, vmax, "load / mean load");
    emit(R, file, cap, &b);
    dsmoe__buf_free(&b);
    free(v);
    free(w);
}

static void chart_domains(rep *R, int32_t g) {
    int32_t i = R->first[g];
    const dsmoe__trace *t = &R->tr[i];
    const int32_t E = t->E, D = t->D, lm = R->lmain[i];
    double *v = calloc((size_t)(D ? D : 1) * (size_t)E, sizeof *v);
    const char **rl = calloc((size_t)(D ? D : 1), sizeof *rl);
    char (*cl)[12] = calloc((size_t)E, sizeof *cl);
    const char **clp = calloc((size_t)E, sizeof *clp);
    if (!v || !rl || !cl || !clp) {
        R->st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    double vmax = 0;
    if (t->ne > 0) {
        const double *dc = t->e_dcounts + (((size_t)t->ne - 1) * (size_t)t->n_main + (size_t)lm) * (size_t)D * (size_t)E;
        for (int32_t d = 0; d < D; d++) {
            double sum = 0;
            for (int32_t e = 0; e < E; e++) sum += dc[(size_t)d * E + (size_t)e];
            for (int32_t e = 0; e < E; e++) {
                double x = sum > 0 ? dc[(size_t)d * E + (size_t)e] / sum : NAN;
                v[(size_t)d * E + (size_t)e] = x;
                if (isfinite(x) && x > vmax) vmax = x;
            }
        }
    }
    for (int32_t d = 0; d < D; d++) rl[d] = t->domains[d];
    for (int32_t e = 0; e < E; e++) {
        snprintf(cl[e], sizeof cl[e], "%d", e);
        clp[e] = cl[e];
    }
    char title[256], file[200], san[128], cap[400];
    snprintf(title, sizeof title, "Domain x expert, layer %d: %s", R->layer, t->name);
    sanitize(R->sum[i].group, san, sizeof san);
    snprintf(file, sizeof file, "domains-%d-%s.svg", g, san);
    snprintf(cap, sizeof cap, "Share of each domain's routed tokens that go to each expert of layer %d over the validation set at the last evaluation (rows sum to 1): run %s.",
             R->layer, t->name);
    dsmoe__buf b = {0};
    dsmoe__chart c = chart(title, "expert", "domain", 0);
    dsmoe__svg_heat(&b, &c, v, D, E, rl, clp, vmax, "P(expert | domain)");
    emit(R, file, cap, &b);
    dsmoe__buf_free(&b);
done:
    free(v);
    free(rl);
    free(cl);
    free(clp);
}

static void chart_topweight(rep *R) {
    size_t ng = R->ng > 0 ? (size_t)R->ng : 1;
    double *h = calloc(ng * DSMOE__HIST_BINS, sizeof *h);
    dsmoe__series *s = calloc(ng, sizeof *s);
    double x[DSMOE__HIST_BINS];
    if (!h || !s) {
        R->st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    for (int k = 0; k < DSMOE__HIST_BINS; k++) x[k] = (k + 0.5) / DSMOE__HIST_BINS;
    for (int32_t i = 0; i < R->n; i++) {
        const dsmoe__trace *t = &R->tr[i];
        if (t->ne == 0) continue;
        for (int32_t l = 0; l < t->n_main; l++)
            for (int k = 0; k < DSMOE__HIST_BINS; k++)
                h[(size_t)R->group[i] * DSMOE__HIST_BINS + (size_t)k] +=
                    t->e_hist[(((size_t)t->ne - 1) * (size_t)t->n_main + (size_t)l) * DSMOE__HIST_BINS + (size_t)k];
    }
    for (int32_t g = 0; g < R->ng; g++) {
        double *hg = h + (size_t)g * DSMOE__HIST_BINS, tot = 0;
        for (int k = 0; k < DSMOE__HIST_BINS; k++) tot += hg[k];
        for (int k = 0; k < DSMOE__HIST_BINS; k++) hg[k] = tot > 0 ? hg[k] / tot : NAN;
        s[g] = (dsmoe__series){R->sum[R->first[g]].group, g, x, hg, DSMOE__HIST_BINS, 0, 1};
    }
    dsmoe__buf b = {0};
    dsmoe__chart c = chart("Largest normalized routing weight per token", "largest of a token's K weights / their sum",
                           "share of tokens", 0);
    dsmoe__svg_lines(&b, &c, s, R->ng);
    emit(R, "topweight.svg", "Distribution of a token's largest routing weight divided by the sum of its K weights (bins of 0.05), validation set at the last evaluation, all main MoE layers and seeds of each strategy: mass near 1 means one expert takes nearly all the weight.", &b);
    dsmoe__buf_free(&b);
done:
    free(h);
    free(s);
}

static const char *const style =
    "<style>\n"
    "html,body{margin:0;padding:0;background:#ffffff;color:#222222;font-family:sans-serif;font-size:14px}\n"
    "header{height:" "120" "px;overflow:hidden;padding:0 12px;box-sizing:border-box}\n"
    "h1{font-size:20px;margin:10px 0 6px 0}\n"
    "figure.chart{margin:0 0 20px 0;padding:0;width:760px;height:400px;overflow:hidden}\n"
    "figure.chart svg{display:block}\n"
    "figcaption{font-size:12px;color:#444444;padding:2px 12px}\n"
    ".file{color:#888888}\n"
    "table.sum{border-collapse:collapse;margin:12px;font-size:12px}\n"
    "table.sum th,table.sum td{border:1px solid #cccccc;padding:3px 6px;text-align:right}\n"
    "table.sum td:first-child{text-align:left}\n"
    "td.diff{font-weight:bold}\n"
    "td.ns{color:#999999;font-style:italic}\n"
    ".note{margin:0 12px;font-size:12px;color:#444444;max-width:900px}\n"
    "</style>\n";

static void header(rep *R, const char *dir) {
    dsmoe__buf *h = &R->html;
    dsmoe__buf_printf(h, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                         "<title>dsmoe report</title>\n%s</head>\n<body>\n<header>\n<h1>dsmoe routing report: ",
                      style);
    dsmoe__buf_xml(h, dir);
    dsmoe__buf_printf(h, "</h1>\n<p>%d run%s, %d strateg%s:", R->n, R->n == 1 ? "" : "s", R->ng, R->ng == 1 ? "y" : "ies");
    for (int32_t g = 0; g < R->ng; g++) {
        dsmoe__buf_printf(h, "%s ", g ? "," : "");
        dsmoe__buf_xml(h, R->sum[R->first[g]].group);
    }
    const dsmoe__trace *t = &R->tr[0];
    dsmoe__buf_printf(h, ". Preset ");
    dsmoe__buf_xml(h, t->preset[0] ? t->preset : "?");
    dsmoe__buf_printf(h, ", %d experts, top-%d, %d main MoE layer%s; the load charts show layer %d.", t->E, t->K,
                      t->n_main, t->n_main == 1 ? "" : "s", R->layer);
    int trunc = 0;
    for (int32_t i = 0; i < R->n; i++) trunc += R->tr[i].truncated_tail;
    if (trunc) dsmoe__buf_printf(h, " %d run%s ended in an incomplete line (ignored).", trunc, trunc == 1 ? "" : "s");
    dsmoe__buf_printf(h, " Definitions: docs/study.md.</p>\n</header>\n");
}

dsmoe_status dsmoe_report_write(const char *dir, const dsmoe_report_options *opts, char *path_out, size_t cap) {
    if (!dir) return DSMOE__FAIL(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_report_write: NULL folder");
    dsmoe_report_options o;
    dsmoe_report_options_default(&o);
    if (opts) o = *opts;
    rep R;
    memset(&R, 0, sizeof R);
    char **paths = NULL;
    int32_t n = 0;
    char *html_path = NULL, *svg_dir = NULL;
    dsmoe_status st = dsmoe__list_runs(dir, &paths, &n);
    if (st) return st;
    if (n < 1) return DSMOE__FAIL(DSMOE_STATUS_IO, "%s: no runs", dir);
    R.tr = calloc((size_t)n, sizeof *R.tr);
    R.sum = calloc((size_t)n, sizeof *R.sum);
    R.group = calloc((size_t)n, sizeof *R.group);
    R.first = calloc((size_t)n, sizeof *R.first);
    R.lmain = calloc((size_t)n, sizeof *R.lmain);
    if (!R.tr || !R.sum || !R.group || !R.first || !R.lmain) {
        st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    for (int32_t i = 0; i < n; i++) {
        if ((st = dsmoe__trace_load(paths[i], &R.tr[i]))) goto done;
        R.n = i + 1;
        dsmoe__summarize_trace(&R.tr[i], &R.sum[i]);
        int32_t g = 0;
        while (g < R.ng && strcmp(R.sum[R.first[g]].group, R.sum[i].group) != 0) g++;
        if (g == R.ng) R.first[R.ng++] = i;
        R.group[i] = g;
    }
    R.layer = o.layer >= 0 ? o.layer : R.tr[0].main_layer[0];
    for (int32_t i = 0; i < n; i++) {
        int32_t m = 0;
        while (m < R.tr[i].n_main && R.tr[i].main_layer[m] != R.layer) m++;
        if (m == R.tr[i].n_main) {
            char list[256] = "";
            for (int32_t k = 0; k < R.tr[i].n_main && strlen(list) < 200; k++)
                snprintf(list + strlen(list), sizeof list - strlen(list), "%s%d", k ? ", " : "", R.tr[i].main_layer[k]);
            st = DSMOE__FAIL(DSMOE_STATUS_INVALID_ARGUMENT, "--layer %d is not a main MoE layer of run %s (those are: %s)",
                              R.layer, R.tr[i].name, list);
            goto done;
        }
        R.lmain[i] = m;
    }
    size_t L = strlen(dir) + 16;
    if (o.html_path) {
        html_path = strdup(o.html_path);
    } else if ((html_path = malloc(L)) != NULL) {
        snprintf(html_path, L, "%s/report.html", dir);
    }
    if (!html_path) {
        st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    if (o.svg_dir) {
        svg_dir = strdup(o.svg_dir);
    } else {
        svg_dir = strdup(html_path);
        if (svg_dir) {
            char *slash = strrchr(svg_dir, '/');
            if (slash == svg_dir) slash[1] = '\0';
            else if (slash) *slash = '\0';
            else strcpy(svg_dir, ".");
        }
    }
    if (!svg_dir) {
        st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    R.svg_dir = svg_dir;
    if ((st = dsmoe_study_summarize(dir, dir))) goto done;
    header(&R, dir);
    chart_loss(&R);
    chart_maxvio(&R);
    for (int32_t g = 0; g < R.ng && !R.st; g++) chart_load(&R, g);
    for (int32_t g = 0; g < R.ng && !R.st; g++) chart_domains(&R, g);
    chart_topweight(&R);
    if ((st = R.st)) goto done;
    dsmoe__buf_printf(&R.html, "<h2 style=\"margin:12px\">Summary</h2>\n");
    if ((st = dsmoe__summary_table(dir, &R.html))) goto done;
    dsmoe__buf_printf(&R.html, "<p class=\"note\">summary.json and summary.csv beside the runs hold every value.</p>\n"
                               "</body>\n</html>\n");
    if ((st = dsmoe__buf_save(&R.html, html_path))) goto done;
    if (path_out && cap > 0) snprintf(path_out, cap, "%s", html_path);
done:
    for (int32_t i = 0; i < R.n; i++) dsmoe__trace_free(&R.tr[i]);
    dsmoe__free_list(paths, n);
    free(R.tr);
    free(R.sum);
    free(R.group);
    free(R.first);
    free(R.lmain);
    dsmoe__buf_free(&R.html);
    free(html_path);
    free(svg_dir);
    return st;
}
