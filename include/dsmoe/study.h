/*
 * dsmoe/study.h — routing studies: several routing strategies × seeds trained on the same
 * model, data and budget (one run folder each, dsmoe_run), the measurements of each run
 * computed from its metrics.jsonl, the study summary across seeds (summary.json,
 * summary.csv), and the report: one self-contained HTML page with inline SVG charts plus
 * the same charts as standalone .svg files. Every measure is defined in docs/study.md and
 * recomputable from the run's files alone.
 *
 * Errors: INVALID_ARGUMENT (a NULL or bad argument), IO (naming the path), FORMAT (a
 * metrics.jsonl that is not the schema of docs/train.md, naming the file, the line and
 * the field), OUT_OF_MEMORY.
 */
#ifndef DSMOE_STUDY_H
#define DSMOE_STUDY_H

#include "dsmoe/train.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------- summaries -- */
/* The measures of one run, in this order in summary.json, summary.csv and the report's
 * table (names from dsmoe_summary_metric_name). A value the run's files cannot give (no
 * evaluation yet, a null in the file, one step) is NaN, written as null / empty. */
typedef enum dsmoe_summary_metric {
    DSMOE_SM_VAL_LOSS = 0,      /* last evaluation: mean validation cross-entropy (nats) */
    DSMOE_SM_VAL_PPL,           /* exp(val_loss) */
    DSMOE_SM_MAXVIO_GLOBAL,     /* last evaluation: mean over main MoE layers of the MaxVio
                                   of the counts summed over the validation set */
    DSMOE_SM_MAXVIO_BATCH_TAIL, /* mean over the train records of the last 20% of training
                                   of the batch MaxVio (mean over main MoE layers) */
    DSMOE_SM_LOAD_ENTROPY,      /* last evaluation: entropy (bits) of the load shares,
                                   mean over main MoE layers */
    DSMOE_SM_DEAD_EXPERTS,      /* last evaluation: experts with no token, summed over the
                                   main MoE layers */
    DSMOE_SM_TOP_WEIGHT_MEAN,   /* last evaluation: mean of a token's largest normalized
                                   weight (bin centres of top_weight_hist, all main layers) */
    DSMOE_SM_TOP_WEIGHT_HIGH,   /* share of tokens whose largest normalized weight is >= 0.9 */
    DSMOE_SM_SCORE_ENTROPY,     /* mean over main MoE layers of score_entropy (bits) */
    DSMOE_SM_MUTUAL_INFO,       /* I(domain; expert) in bits from the domain × expert counts,
                                   mean over main MoE layers */
    DSMOE_SM_MI_KEPT,           /* mutual_information / the study's reference (the mean over
                                   seeds of v3-no-balance, else the largest strategy mean);
                                   NaN outside a study */
    DSMOE_SM_LOSS_SPIKES,       /* train records whose loss exceeds the mean m of the previous
                                   DSMOE_SPIKE_WINDOW records by more than both
                                   DSMOE_SPIKE_THRESHOLD · m and DSMOE_SPIKE_SIGMAS times
                                   their standard deviation (so that the batch-to-batch
                                   noise of a mixed-domain corpus is not counted) */
    DSMOE_SM_GRAD_NORM_MAX,     /* largest gradient norm (before clipping) */
    DSMOE_SM_BIAS_DRIFT,        /* last train record: largest |bias| over main MoE layers
                                   (biases start at 0) */
    DSMOE_SM_TOKENS_PER_S,      /* median of the train records' tokens_per_s */
    DSMOE_SM_EP_MAX_SHARE,      /* mean over the last 20% of training and main MoE layers of
                                   the most loaded expert's share of the routed tokens */
    DSMOE_SM_EP_STEP_REL,       /* E × ep_max_share: the MoE step time of an expert-parallel
                                   deployment (one expert per device) relative to a
                                   perfectly balanced load (1 = balanced) */
    DSMOE_SM_COUNT
} dsmoe_summary_metric;

#define DSMOE_SPIKE_WINDOW 20
#define DSMOE_SPIKE_THRESHOLD 0.10
#define DSMOE_SPIKE_SIGMAS 3.0
#define DSMOE_SPIKE_MIN_HISTORY 5  /* records before the first that can be a spike */
#define DSMOE_TAIL_FRACTION 0.20
#define DSMOE_SUMMARY_MAX_DOMAINS 16

/* The metric's name as written in summary.json / summary.csv ("val_loss", ...), NULL
 * past the end. */
DSMOE_API const char *dsmoe_summary_metric_name(int i);

typedef struct dsmoe_run_summary {
    char name[128];          /* the run folder's base name */
    char strategy[64];       /* from the "run" record */
    char group[128];         /* the folder name less "-seed<k>" (strategy and variant) */
    int64_t seed;
    int64_t steps;           /* the last train record's step */
    int32_t experts, n_main_layers;
    double m[DSMOE_SM_COUNT];
    int32_t n_domains;
    char domains[DSMOE_SUMMARY_MAX_DOMAINS][48];
    double domain_loss[DSMOE_SUMMARY_MAX_DOMAINS]; /* last evaluation; NaN: no tokens */
} dsmoe_run_summary;

/* Computes the summary of the run in folder run_dir from its metrics.jsonl. */
DSMOE_API dsmoe_status dsmoe_run_summarize(const char *run_dir, dsmoe_run_summary *s);

/* Writes summary.json and summary.csv into out_dir for dir: a run folder (holding
 * metrics.jsonl) or a study folder (holding runs/<name>/metrics.jsonl). Also fills
 * DSMOE_SM_MI_KEPT across the study. */
DSMOE_API dsmoe_status dsmoe_study_summarize(const char *dir, const char *out_dir);

/* ---------------------------------------------------------------- report -- */
typedef struct dsmoe_report_options {
    const char *html_path;  /* NULL: <dir>/report.html */
    const char *svg_dir;    /* the standalone .svg files; NULL: the HTML file's folder */
    int32_t layer;          /* the model layer of the load heat map and the domain ×
                               expert matrix; -1: the first main MoE layer */
} dsmoe_report_options;

DSMOE_API void dsmoe_report_options_default(dsmoe_report_options *o);
/* Writes the report of dir (a run or a study folder) and its .svg files; the summary
 * files too (dsmoe_study_summarize into dir). The HTML path written is copied into
 * path_out (may be NULL) up to cap bytes. */
DSMOE_API dsmoe_status dsmoe_report_write(const char *dir, const dsmoe_report_options *o,
                                          char *path_out, size_t cap);

/* ----------------------------------------------------------------- study -- */
/* The study: every strategy (aux-loss once per alpha when alphas are given) with seeds
 * 1..n_seeds, run folders <out_dir>/runs/<strategy>[-a<alpha>]-seed<k>/. Each run's config
 * is base with the strategy applied (dsmoe_run_strategy_apply), then seed and
 * train.seed = k, then (for aux-loss with alphas) train.balance_alpha, then apply (may
 * be NULL): the hook through which the CLI's training flags apply after the strategy,
 * as `dsmoe train`'s do. A finished run (its checkpoint at the last step and an eval
 * record at that step) is skipped; an unfinished one resumes from its checkpoint. */
typedef dsmoe_status (*dsmoe_study_apply_fn)(dsmoe_run_config *rc, const char *strategy,
                                             void *user);

#define DSMOE_STUDY_MAX_RUNS 256

typedef struct dsmoe_study_config {
    dsmoe_run_config base;
    const char *const *strategies; /* NULL: all the strategies (dsmoe_run_strategy_name) */
    int32_t n_strategies;
    const double *alphas;          /* aux-loss's α values; NULL: the strategy's own */
    int32_t n_alphas;
    int32_t n_seeds;               /* >= 1 (default 3) */
    dsmoe_study_apply_fn apply;
    void *apply_user;
    /* NULL (or size 1): one process. Else every run is a data-parallel run over the
     * ranks (dsmoe_run_options.collective): every rank calls dsmoe_study_run with the
     * same config and out_dir; rank 0 alone creates the folders, decides which runs are
     * finished or resume, and writes the summary files; any rank's error stops every
     * rank with the same status ("rank r: ..."). */
    const dsmoe_run_collective *collective;
} dsmoe_study_config;

typedef struct dsmoe_study_progress {
    int32_t run, n_runs;            /* 1-based: the run in progress of n_runs */
    const char *name;               /* its folder name */
    int32_t skipped;                /* 1: the run was already finished (nothing trained) */
    const dsmoe_run_progress *step; /* the run's own progress (NULL when skipped) */
    double study_eta_s;             /* estimated seconds to the end of the study */
} dsmoe_study_progress;
typedef void (*dsmoe_study_progress_fn)(const dsmoe_study_progress *p, void *user);

/* Base config: the preset's run config (dsmoe_run_config_default); seeds 3; all
 * strategies. INVALID_CONFIG for an unknown preset. */
DSMOE_API dsmoe_status dsmoe_study_config_default(const char *preset, dsmoe_study_config *sc);
/* The folder names of the study's runs in order, into names[n][128]; *n_runs set. */
DSMOE_API dsmoe_status dsmoe_study_plan(const dsmoe_study_config *sc, char (*names)[128],
                                        int32_t cap, int32_t *n_runs);
/* Runs (or resumes) the study in out_dir, then writes its summary files. */
DSMOE_API dsmoe_status dsmoe_study_run(const dsmoe_study_config *sc, const char *out_dir,
                                       int32_t n_threads, dsmoe_study_progress_fn progress,
                                       void *user);

#ifdef __cplusplus
}
#endif
#endif /* DSMOE_STUDY_H */
