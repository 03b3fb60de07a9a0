/*
 * study_internal.h — shared by the study layer's files; not installed: a small JSON tree
 * for metrics.jsonl lines, the run traces read from a run folder, a growable text
 * buffer, XML escaping and the SVG charts.
 */
#ifndef DSMOE_STUDY_INTERNAL_H
#define DSMOE_STUDY_INTERNAL_H

#include "core/internal.h"
#include "dsmoe/study.h"

#include <stddef.h>
#include <stdint.h>

/* dsmoe__error whose result is visibly the (nonzero) status, for the static analyzer. */
#define DSMOE__FAIL(status, ...) ((void)dsmoe__error(status, __VA_ARGS__), (status))

/* ------------------------------------------------------------- JSON tree -- */
typedef enum { DSMOE__JV_NULL, DSMOE__JV_BOOL, DSMOE__JV_NUM, DSMOE__JV_STR, DSMOE__JV_ARR,
               DSMOE__JV_OBJ } dsmoe__jv_kind;
typedef struct dsmoe__jv {
    dsmoe__jv_kind kind;
    int32_t n;          /* items of an array / members of an object */
    double num;         /* NUM; BOOL: 0 or 1 */
    const char *str;    /* STR: decoded, NUL-terminated, valid UTF-8 */
    const char *key;    /* the member's key inside an object */
    int32_t first, next; /* child / sibling node index, -1: none */
} dsmoe__jv;
typedef struct dsmoe__jtree {
    dsmoe__jv *nodes;
    int32_t n, cap;
    char *text;         /* decoded strings */
    size_t text_used, text_cap;
} dsmoe__jtree;
/* Parses one JSON document s[0..n) (a whole line); FORMAT "<what>: <problem> at column
 * <c>" on error. The tree is reused across calls; free with dsmoe__jtree_free. */
dsmoe_status dsmoe__jtree_parse(dsmoe__jtree *t, const char *s, size_t n, const char *what);
void dsmoe__jtree_free(dsmoe__jtree *t);
/* Member `key` of object node i, or -1. */
int32_t dsmoe__jv_get(const dsmoe__jtree *t, int32_t i, const char *key);
/* The k-th item of array node i, or -1 (linear). */
int32_t dsmoe__jv_at(const dsmoe__jtree *t, int32_t i, int32_t k);
static inline const char *dsmoe__jv_kind_name(dsmoe__jv_kind k) {
    static const char *const names[] = {"null", "a boolean", "a number", "a string", "an array",
                                        "an object"};
    return names[k];
}

/* ------------------------------------------------------------ run traces -- */
#define DSMOE__HIST_BINS 20
typedef struct dsmoe__trace {
    char name[128];
    char strategy[64], preset[64];
    int64_t seed, steps_planned;
    int32_t E, K, D;                    /* experts, top-k, domains */
    char (*domains)[48];
    int32_t n_layers, n_main;           /* every MoE layer listed / the main ones */
    int32_t *layer_id;                  /* n_layers */
    uint8_t *layer_mtp;                 /* n_layers */
    int32_t *main_layer;                /* n_main: the model layer of each main MoE layer */
    /* train records */
    int64_t nt, cap_t;
    int64_t *t_step;
    double *t_loss, *t_grad, *t_tps;    /* NaN where null */
    double *t_counts;                   /* nt × n_main × E */
    double *t_bias_absmax;              /* nt × n_main: max(|bias_min|, |bias_max|) */
    /* eval records */
    int64_t ne, cap_e;
    int64_t *e_step;
    double *e_loss;                     /* ne */
    double *e_dloss;                    /* ne × D, NaN: absent */
    double *e_counts;                   /* ne × n_main × E */
    double *e_dcounts;                  /* ne × n_main × D × E */
    double *e_hist;                     /* ne × n_main × 20 */
    double *e_sent;                     /* ne × n_main */
    int truncated_tail;                 /* an incomplete last line was ignored */
} dsmoe__trace;

/* Reads <dir>/metrics.jsonl. An incomplete last line (no newline, not valid JSON) is
 * ignored (truncated_tail = 1): a run being written or killed mid-line. */
dsmoe_status dsmoe__trace_load(const char *dir, dsmoe__trace *tr);
/* Parses metrics.jsonl text (path for messages). */
dsmoe_status dsmoe__trace_parse(const char *text, size_t n, const char *path, dsmoe__trace *tr);
void dsmoe__trace_free(dsmoe__trace *tr);

/* Measures from traces (summary.c). */
double dsmoe__maxvio(const double *counts, int32_t E);
double dsmoe__entropy_bits(const double *counts, int32_t n);
double dsmoe__mutual_info_bits(const double *dcounts, int32_t D, int32_t E);
/* Losses above the trailing window's mean m by more than max(threshold·|m|, sigmas · the
 * window's standard deviation); NaN/Inf skipped; -1 when out of memory. */
int64_t dsmoe__loss_spikes(const double *loss, int64_t n, int32_t window, double threshold,
                           double sigmas, int32_t min_history);
/* First train record index of the last DSMOE_TAIL_FRACTION of training. */
int64_t dsmoe__tail_start(const dsmoe__trace *tr);
void dsmoe__summarize_trace(const dsmoe__trace *tr, dsmoe_run_summary *s);

/* Lists the run folders of dir: dir itself when it holds metrics.jsonl, else the
 * sub-folders of dir/runs holding one (sorted by name). names: malloc'd array of
 * malloc'd paths. */
dsmoe_status dsmoe__list_runs(const char *dir, char ***paths, int32_t *n);
void dsmoe__free_list(char **paths, int32_t n);

/* Tests only: non-NULL entries replace the train layer's functions in dsmoe_study_run
 * (so the orchestration, skipping and resuming are tested without training). */
typedef struct dsmoe__study_hooks {
    dsmoe_status (*run)(const dsmoe_run_config *rc, const char *out_dir, const dsmoe_run_options *opts,
                        dsmoe_run_result *res);
    dsmoe_status (*strategy_apply)(const char *name, dsmoe_run_config *rc);
} dsmoe__study_hooks;
extern dsmoe__study_hooks dsmoe__study_test_hooks;

/* ------------------------------------------------------------------ text -- */
typedef struct dsmoe__buf {
    char *s;
    size_t n, cap;
    int oom;
} dsmoe__buf;
void dsmoe__buf_printf(dsmoe__buf *b, const char *fmt, ...) DSMOE__PRINTF(2, 3);
void dsmoe__buf_put(dsmoe__buf *b, const char *s, size_t n);
/* Appends s with & < > " ' as entities, control bytes and invalid UTF-8 as U+FFFD. */
void dsmoe__buf_xml(dsmoe__buf *b, const char *s);
/* Appends s as a JSON string (quoted, escaped). */
void dsmoe__buf_json_str(dsmoe__buf *b, const char *s);
/* Appends a number as JSON (null when not finite). */
void dsmoe__buf_json_num(dsmoe__buf *b, double v);
void dsmoe__buf_free(dsmoe__buf *b);
/* Writes the buffer to path atomically (OUT_OF_MEMORY if the buffer ran out). */
dsmoe_status dsmoe__buf_save(const dsmoe__buf *b, const char *path);

/* The report's summary table (groups with their seed spread, then every run) as HTML. */
dsmoe_status dsmoe__summary_table(const char *dir, dsmoe__buf *b);

/* ------------------------------------------------------------------ SVG -- */
#define DSMOE__MAX_SERIES 256
#define DSMOE__MAX_POINTS 1200 /* per line: longer series are drawn every k-th point */
typedef struct dsmoe__series {
    const char *label;        /* legend text (escaped when written); NULL: no entry */
    int32_t color;            /* palette index */
    const double *x, *y;      /* n points; a NaN y breaks the line */
    int64_t n;
    int dashed, markers;
} dsmoe__series;
typedef struct dsmoe__chart {
    const char *title, *xlabel, *ylabel;
    int log_y;
    int32_t width, height;
} dsmoe__chart;
/* A line chart; a chart with no finite point says so. */
void dsmoe__svg_lines(dsmoe__buf *b, const dsmoe__chart *c, const dsmoe__series *s, int32_t ns);
/* A heat map of v (rows × cols, row-major; NaN: blank) from 0 (white) to vmax (dark),
 * with its colour scale; row_labels / col_labels may be NULL (then none). */
void dsmoe__svg_heat(dsmoe__buf *b, const dsmoe__chart *c, const double *v, int32_t rows,
                     int32_t cols, const char *const *row_labels, const char *const *col_labels,
                     double vmax, const char *scale_label);
const char *dsmoe__palette(int32_t i);

#endif /* DSMOE_STUDY_INTERNAL_H */
