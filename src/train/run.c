/*
 * run.c — a training run (dsmoe_run): batches from the corpus in a seeded order, the
 * training model's loss and backward, the global gradient norm and clipping, AdamW over
 * the trainable tensors on the warm-up + cosine schedule, the bias controller of every
 * MoE layer, evaluations over the validation windows, metrics.jsonl, and checkpoints
 * from which a resumed run continues bit for bit (see dsmoe/train.h, "runs", and
 * docs/train.md for the metrics' schema).
 */
#include "train/run_internal.h"

#include "io/io_internal.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { HIST_BINS = 20, ND = DSMOE_DOMAIN_COUNT };

/* Re-issues the current error with a formatted prefix ("step 12: ..."). */
static dsmoe_status prefixed(dsmoe_status st, const char *fmt, ...) DSMOE__PRINTF(2, 3);
static dsmoe_status prefixed(dsmoe_status st, const char *fmt, ...) {
    char pre[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof pre, fmt, ap);
    va_end(ap);
    return dsmoe__error_prefix(st, pre);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = (char *)malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* mkdir -p. IO naming the folder. */
static dsmoe_status make_dirs(const char *dir) {
    size_t n = strlen(dir);
    char *p = (char *)malloc(n + 1);
    if (!p) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
    memcpy(p, dir, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (p[i] != '/' && p[i] != '\0') continue;
        char c = p[i];
        p[i] = '\0';
        struct stat st;
        if (stat(p, &st) != 0) {
            if (mkdir(p, 0777) != 0 && errno != EEXIST) {
                dsmoe_status s = dsmoe__error(DSMOE_STATUS_IO, "cannot create folder '%s': %s", p,
                                              strerror(errno));
                free(p);
                return s;
            }
        } else if (!S_ISDIR(st.st_mode)) {
            dsmoe_status s = dsmoe__error(DSMOE_STATUS_IO, "'%s' exists and is not a folder", p);
            free(p);
            return s;
        }
        p[i] = c;
    }
    free(p);
    return DSMOE_OK;
}

/* ------------------------------------------------------------ collectives -- */

static int is_dp(const dsmoe_run_collective *c) { return c && c->size > 1; }

dsmoe_status dsmoe__run_agree(const dsmoe_run_collective *c, dsmoe_status st) {
    if (!is_dp(c)) return st;
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", st != DSMOE_OK ? dsmoe_last_error() : "");
    int32_t first = 0;
    int32_t s = c->agree(c->ctx, (int32_t)st, msg, sizeof msg, &first);
    if (s == 0) return DSMOE_OK;
    msg[sizeof msg - 1] = '\0';
    return dsmoe__error((dsmoe_status)s, "rank %d: %s", (int)first, msg);
}

static dsmoe_status comm_failed(const char *what) {
    return dsmoe__error(DSMOE_STATUS_IO, "run: the ranks' %s failed (communication)", what);
}

/* ------------------------------------------------------------------ state -- */

typedef struct run {
    dsmoe__run_config_store cs; /* the run's own config */
    const dsmoe_run_config *rc;
    const dsmoe_run_collective *coll; /* NULL: one process */
    int32_t rank, R, Bl;              /* this rank, the ranks, the rows per rank (B / R) */
    int attached;                     /* coll->attach succeeded: detach before the model goes */
    char *ckpt_dir, *metrics_path;
    int nt;
    int32_t B, T, E, K, n_moe;
    int64_t N;
    dsmoe_corpus *corpus;
    dsmoe_train_model *tm;
    size_t np;
    float *m, *v;              /* page allocations of mv_bytes (core/internal.h) */
    size_t mv_bytes;
    /* Expert sharding (coll->expert_shard): each rank holds its block of every MoE
     * layer's routed experts, rank q the experts bounds[q] .. bounds[q + 1] − 1. */
    int sharded;
    int32_t *bounds;           /* (R + 1) */
    int64_t *rep, *own;        /* (n_rep, 2), (n_own, 2): float ranges [lo, hi) of the
                                  replicated parameters and of this rank's experts */
    int32_t n_rep, n_own;
    int gathered_moments;      /* rank 0 during a sharded checkpoint */
    dsmoe__adamw_segment *seg; /* (n_seg) the trainable tensors, for AdamW */
    int64_t n_seg;
    double *seg_ss;    /* (n_seg) their sums of squares, for the gradient norm */
    uint8_t *seg_exp;  /* (n_seg) 1 for a routed expert's tensor */
    dsmoe_balancer **bal;
    int32_t *is_mtp;     /* (n_moe) */
    int32_t n_main_moe;  /* MoE layers of the main model */
    int32_t *batch;      /* (B, T + 1) */
    uint8_t *edom;       /* (B, T + 1) eval domains */
    double *pos_ce;      /* (N) */
    int64_t *bcounts;    /* (n_moe, E) the last batch's counts */
    int64_t *ecounts;    /* (n_moe, E) */
    int64_t *edc;        /* (n_moe, ND, E) */
    int64_t *ehist;      /* (n_moe, HIST_BINS) */
    double *esent;       /* (n_moe) score entropy sums */
    int64_t *etok;       /* (n_moe) tokens counted */
    double dom_loss[ND];
    int64_t dom_tok[ND];
    int64_t *data_bytes, *data_hash;
    FILE *metrics;
    dsmoe__ckpt_state ck;
    double elapsed0;     /* seconds of earlier sessions */
} run;

static void run_free(run *r) {
    if (r->attached && r->coll && r->coll->detach) r->coll->detach(r->coll->ctx);
    r->attached = 0;
    if (r->metrics) fclose(r->metrics);
    if (r->bal)
        for (int32_t k = 0; k < r->n_moe; k++) dsmoe_balancer_free(r->bal[k]);
    free((void *)r->bal);
    dsmoe_train_model_free(r->tm);
    dsmoe_corpus_free(r->corpus);
    dsmoe__pages_free(r->m, r->mv_bytes);
    dsmoe__pages_free(r->v, r->mv_bytes);
    free(r->bounds);
    free(r->rep);
    free(r->own);
    free(r->seg);
    free(r->seg_ss);
    free(r->seg_exp);
    free(r->is_mtp);
    free(r->batch);
    free(r->edom);
    free(r->pos_ce);
    free(r->bcounts);
    free(r->ecounts);
    free(r->edc);
    free(r->ehist);
    free(r->esent);
    free(r->etok);
    free(r->data_bytes);
    free(r->data_hash);
    free(r->ckpt_dir);
    free(r->metrics_path);
    free(r->cs.block);
}

static dsmoe_status sum_f64(const run *r, double *x, int64_t n, const char *what) {
    if (!is_dp(r->coll) || n <= 0) return DSMOE_OK;
    return r->coll->sum_f64(r->coll->ctx, x, n) ? comm_failed(what) : DSMOE_OK;
}

static dsmoe_status sum_i64(const run *r, int64_t *x, int64_t n, const char *what) {
    if (!is_dp(r->coll) || n <= 0) return DSMOE_OK;
    return r->coll->sum_i64(r->coll->ctx, x, n) ? comm_failed(what) : DSMOE_OK;
}

/* ---------------------------------------------------------------- metrics -- */

static void jnum(FILE *f, double x) {
    if (isfinite(x)) fprintf(f, "%.9g", x);
    else fputs("null", f);
}

static void jkey(FILE *f, const char *key, double x) {
    fprintf(f, ",\"%s\":", key);
    jnum(f, x);
}

/* Entropy in bits of counts (E) (0 when they sum to 0). */
static double entropy_bits(const int64_t *c, int32_t E) {
    double tot = 0, h = 0;
    for (int32_t e = 0; e < E; e++) tot += (double)c[e];
    if (tot <= 0) return 0;
    for (int32_t e = 0; e < E; e++)
        if (c[e] > 0) {
            double p = (double)c[e] / tot;
            h -= p * log2(p);
        }
    return h;
}

static double maxvio_of(const int64_t *c, int32_t E) {
    dsmoe_load_stats ls;
    if (dsmoe_load_stats_compute(c, E, 1, &ls) != DSMOE_OK) return NAN;
    return ls.maxvio;
}

static void jcounts(FILE *f, const int64_t *c, int32_t n) {
    fputc('[', f);
    for (int32_t i = 0; i < n; i++) fprintf(f, "%s%lld", i ? "," : "", (long long)c[i]);
    fputc(']', f);
}

/* The model config's JSON on one line. */
static void jmodel(FILE *f, const dsmoe_model_config *c) {
    char buf[4096];
    if (dsmoe_model_config_to_json(c, buf, sizeof buf) < 0) {
        fputs("null", f);
        return;
    }
    for (const char *p = buf; *p; p++) {
        if (*p == '\n') {
            while (p[1] == ' ') p++;
            continue;
        }
        fputc(*p, f);
    }
}

static void write_run_record(run *r) {
    const dsmoe_run_config *rc = r->rc;
    FILE *f = r->metrics;
    if (!f) return; /* not rank 0 */
    fprintf(f, "{\"type\":\"run\",\"version\":1,\"strategy\":\"%s\",\"preset\":\"%s\",\"steps\":%lld,"
               "\"batch\":%d,\"seq_len\":%d,\"seed\":%llu,\"threads\":%d,\"experts\":%d,\"top_k\":%d",
            rc->strategy, rc->preset, (long long)rc->steps, (int)r->B, (int)r->T,
            (unsigned long long)rc->seed, r->nt, (int)r->E, (int)r->K);
    if (r->R > 1) fprintf(f, ",\"ranks\":%d", (int)r->R);
    fputs(",\"domains\":[", f);
    for (int d = 0; d < ND; d++) fprintf(f, "%s\"%s\"", d ? "," : "", dsmoe_domain_name(d));
    fputs("],\"moe_layers\":[", f);
    for (int32_t k = 0; k < r->n_moe; k++)
        fprintf(f, "%s{\"layer\":%d,\"mtp\":%s}", k ? "," : "",
                (int)dsmoe_train_model_moe_layer(r->tm, k), r->is_mtp[k] ? "true" : "false");
    fputs("],\"model\":", f);
    jmodel(f, &rc->model);
    const dsmoe_adamw_config *a = &rc->adamw;
    fputs(",\"optimizer\":{\"name\":\"adamw\"", f);
    jkey(f, "lr", a->lr);
    jkey(f, "beta1", a->beta1);
    jkey(f, "beta2", a->beta2);
    jkey(f, "eps", a->eps);
    jkey(f, "weight_decay", a->weight_decay);
    jkey(f, "clip_norm", a->clip_norm);
    fprintf(f, ",\"warmup_steps\":%lld,\"total_steps\":%lld", (long long)a->warmup_steps,
            (long long)rc->steps);
    jkey(f, "min_lr_ratio", a->min_lr_ratio);
    fputs("},\"balancer\":{", f);
    fputs("\"gamma\":", f);
    jnum(f, r->bal ? rc->balancer.gamma : 0.0);
    fprintf(f, ",\"rule\":\"%s\"", rc->balancer.rule == DSMOE_BALANCE_RULE_SIGN ? "sign" : "proportional");
    jkey(f, "gamma_after", rc->balancer.gamma_after);
    fprintf(f, ",\"gamma_until_tokens\":%lld,\"recenter\":%d}",
            (long long)rc->balancer.gamma_until_tokens, (int)rc->balancer.recenter);
    fprintf(f, ",\"balance_loss\":{\"kind\":\"%s\"",
            dsmoe_balance_loss_kind_name((dsmoe_balance_loss_kind)rc->train.balance_kind));
    jkey(f, "alpha", rc->train.balance_alpha);
    fprintf(f, "},\"mtp\":{\"depths\":%d", (int)(rc->train.mtp_depths < 0
                                                     ? rc->model.num_nextn_predict_layers
                                                     : rc->train.mtp_depths));
    jkey(f, "lambda", rc->train.mtp_lambda);
    fprintf(f, "},\"corpus\":{\"seed\":%llu,\"tokens\":%lld", (unsigned long long)rc->corpus.seed,
            (long long)rc->corpus.tokens);
    jkey(f, "valid_fraction", rc->corpus.valid_fraction);
    fputs(",\"data_files\":[", f);
    for (int32_t i = 0; i < rc->n_data_files; i++) {
        fputs(i ? ",\"" : "\"", f);
        for (const char *p = rc->data_files[i]; *p; p++) {
            if (*p == '"' || *p == '\\') fprintf(f, "\\%c", *p);
            else if ((unsigned char)*p < 0x20) fprintf(f, "\\u%04x", (unsigned)(unsigned char)*p);
            else fputc(*p, f);
        }
        fputc('"', f);
    }
    fprintf(f, "]},\"params\":%zu,\"train_tokens\":%lld,\"valid_tokens\":%lld}\n", r->np,
            (long long)dsmoe_corpus_length(r->corpus, DSMOE_SPLIT_TRAIN),
            (long long)dsmoe_corpus_length(r->corpus, DSMOE_SPLIT_VALID));
    fflush(f);
}

static void write_train_record(run *r, int64_t step, double lr, const dsmoe_train_loss *l,
                               double gnorm, double tps, double elapsed, double maxvio_batch) {
    FILE *f = r->metrics;
    if (!f) return; /* not rank 0 */
    fprintf(f, "{\"type\":\"train\",\"step\":%lld", (long long)step);
    jkey(f, "lr", lr);
    jkey(f, "loss", l->total);
    jkey(f, "ce", l->ce);
    jkey(f, "mtp", l->mtp);
    jkey(f, "balance", l->balance);
    jkey(f, "grad_norm", gnorm);
    fprintf(f, ",\"tokens\":%lld", (long long)r->ck.tokens);
    jkey(f, "tokens_per_s", tps);
    jkey(f, "elapsed_s", elapsed);
    jkey(f, "maxvio_batch", maxvio_batch);
    fputs(",\"layers\":[", f);
    for (int32_t k = 0; k < r->n_moe; k++) {
        const int64_t *c = r->bcounts + (size_t)k * (size_t)r->E;
        fprintf(f, "%s{\"layer\":%d,\"mtp\":%s,\"counts\":", k ? "," : "",
                (int)dsmoe_train_model_moe_layer(r->tm, k), r->is_mtp[k] ? "true" : "false");
        jcounts(f, c, r->E);
        jkey(f, "maxvio", maxvio_of(c, r->E));
        jkey(f, "entropy", entropy_bits(c, r->E));
        const float *b = dsmoe_train_model_bias(r->tm, k);
        double mean = 0, var = 0, mn = 0, mx = 0;
        if (b) {
            mn = mx = b[0];
            for (int32_t e = 0; e < r->E; e++) {
                mean += b[e];
                mn = b[e] < mn ? b[e] : mn;
                mx = b[e] > mx ? b[e] : mx;
            }
            mean /= r->E;
            for (int32_t e = 0; e < r->E; e++) var += ((double)b[e] - mean) * ((double)b[e] - mean);
            var /= r->E;
        }
        jkey(f, "bias_mean", mean);
        jkey(f, "bias_std", sqrt(var));
        jkey(f, "bias_min", mn);
        jkey(f, "bias_max", mx);
        fputc('}', f);
    }
    fputs("]}\n", f);
    fflush(f);
}

/* ------------------------------------------------------------- evaluation -- */

/* Evaluates over the first validation windows; writes the "eval" record and sets
 * *val_loss and *val_maxvio. */
static dsmoe_status evaluate(run *r, int64_t step, double *val_loss, double *val_maxvio) {
    /* Data-parallel: rank r evaluates rows [r·Bl, (r+1)·Bl) of each batch of B windows;
     * the sums are reduced over the ranks afterwards. */
    const int32_t B = r->B, Bl = r->Bl, T = r->T, E = r->E, K = r->K;
    const int64_t row0 = (int64_t)r->rank * Bl;
    const int64_t nwin_all = dsmoe_corpus_window_count(r->corpus, DSMOE_SPLIT_VALID, T);
    int64_t nwin = nwin_all;
    if (r->rc->eval_tokens > 0) {
        int64_t want = (r->rc->eval_tokens + T - 1) / T;
        if (want < nwin) nwin = want;
    }
    const size_t nm = (size_t)r->n_moe;
    memset(r->ecounts, 0, nm * (size_t)E * sizeof(int64_t));
    memset(r->edc, 0, nm * ND * (size_t)E * sizeof(int64_t));
    memset(r->ehist, 0, nm * HIST_BINS * sizeof(int64_t));
    memset(r->esent, 0, nm * sizeof(double));
    memset(r->etok, 0, nm * sizeof(int64_t));
    memset(r->dom_loss, 0, sizeof r->dom_loss);
    memset(r->dom_tok, 0, sizeof r->dom_tok);
    double loss_sum = 0;
    int64_t n_tgt = 0;
    dsmoe_status st = DSMOE_OK;
    for (int64_t w0 = 0; w0 < nwin; w0 += B) {
        int any = 0;
        for (int32_t b = 0; b < Bl; b++) {
            int32_t *tok = r->batch + (size_t)b * (size_t)(T + 1);
            uint8_t *dom = r->edom + (size_t)b * (size_t)(T + 1);
            const int64_t w = w0 + row0 + b;
            if (w < nwin) {
                any = 1;
                if (dsmoe_corpus_window(r->corpus, DSMOE_SPLIT_VALID, T, w, tok, dom) < 0) {
                    st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "evaluation: window %lld",
                                      (long long)w);
                    goto local_done;
                }
            } else {
                for (int32_t t = 0; t <= T; t++) tok[t] = DSMOE_BYTE_VOCAB_PAD, dom[t] = 255;
            }
        }
        if (!any && !r->attached) continue; /* this rank's rows are all past the end (an
                                               attached MoE exec is collective: run them) */
        dsmoe_train_loss l;
        /* local counts: the balance loss is not used here, and ranks run unequal numbers */
        if ((st = dsmoe_train_model_loss(r->tm, r->batch, &l, DSMOE_TRAIN_LOSS_LOCAL_COUNTS)) !=
            DSMOE_OK) {
            st = prefixed(st, "evaluation at step %lld", (long long)step);
            goto local_done;
        }
        if ((st = dsmoe__train_model_position_ce(r->tm, r->pos_ce)) != DSMOE_OK) goto local_done;
        for (int32_t b = 0; b < Bl; b++)
            for (int32_t t = 0; t < T; t++) {
                const size_t i = (size_t)b * (size_t)(T + 1) + (size_t)t;
                if (r->batch[i + 1] == DSMOE_BYTE_VOCAB_PAD) continue;
                const double ce = r->pos_ce[(size_t)b * (size_t)T + (size_t)t];
                loss_sum += ce;
                n_tgt++;
                const uint8_t d = r->edom[i + 1];
                if (d < ND) r->dom_loss[d] += ce, r->dom_tok[d]++;
            }
        for (int32_t k = 0; k < r->n_moe; k++) {
            const dsmoe_moe_routing *ro = dsmoe_train_model_routing(r->tm, k);
            if (!ro) continue;
            int64_t *cnt = r->ecounts + (size_t)k * (size_t)E;
            int64_t *dc = r->edc + (size_t)k * ND * (size_t)E;
            int64_t *hist = r->ehist + (size_t)k * HIST_BINS;
            for (int32_t b = 0; b < Bl; b++)
                for (int32_t t = 0; t < T; t++) {
                    const size_t i = (size_t)b * (size_t)(T + 1) + (size_t)t;
                    if (r->batch[i] == DSMOE_BYTE_VOCAB_PAD) continue;
                    const size_t p = (size_t)b * (size_t)T + (size_t)t;
                    const uint8_t d = r->edom[i];
                    const int32_t *idx = ro->indices + p * (size_t)K;
                    const float *wt = ro->weights + p * (size_t)K;
                    double wmax = 0, wsum = 0;
                    for (int32_t j = 0; j < K; j++) {
                        cnt[idx[j]]++;
                        if (d < ND) dc[(size_t)d * (size_t)E + (size_t)idx[j]]++;
                        wsum += wt[j];
                        wmax = wt[j] > wmax ? wt[j] : wmax;
                    }
                    int bin = wsum > 0 ? (int)(wmax / wsum * HIST_BINS) : 0;
                    hist[bin < 0 ? 0 : bin >= HIST_BINS ? HIST_BINS - 1 : bin]++;
                    const float *s = ro->scores + p * (size_t)E;
                    double ssum = 0, h = 0;
                    for (int32_t e = 0; e < E; e++) ssum += s[e];
                    if (ssum > 0)
                        for (int32_t e = 0; e < E; e++)
                            if (s[e] > 0) {
                                double q = s[e] / ssum;
                                h -= q * log2(q);
                            }
                    r->esent[k] += h;
                    r->etok[k]++;
                }
        }
    }
local_done:
    if ((st = dsmoe__run_agree(r->coll, st)) != DSMOE_OK) return st;
    if ((st = sum_f64(r, &loss_sum, 1, "evaluation sums")) != DSMOE_OK ||
        (st = sum_f64(r, r->dom_loss, ND, "evaluation sums")) != DSMOE_OK ||
        (st = sum_f64(r, r->esent, (int64_t)nm, "evaluation sums")) != DSMOE_OK ||
        (st = sum_i64(r, &n_tgt, 1, "evaluation counts")) != DSMOE_OK ||
        (st = sum_i64(r, r->dom_tok, ND, "evaluation counts")) != DSMOE_OK ||
        (st = sum_i64(r, r->ecounts, (int64_t)(nm * (size_t)E), "evaluation counts")) != DSMOE_OK ||
        (st = sum_i64(r, r->edc, (int64_t)(nm * ND * (size_t)E), "evaluation counts")) != DSMOE_OK ||
        (st = sum_i64(r, r->ehist, (int64_t)(nm * HIST_BINS), "evaluation counts")) != DSMOE_OK ||
        (st = sum_i64(r, r->etok, (int64_t)nm, "evaluation counts")) != DSMOE_OK)
        return st;
    const double vl = n_tgt > 0 ? loss_sum / (double)n_tgt : NAN;
    double mv = 0;
    for (int32_t k = 0; k < r->n_moe; k++)
        if (!r->is_mtp[k]) mv += maxvio_of(r->ecounts + (size_t)k * (size_t)E, E);
    mv = r->n_main_moe > 0 ? mv / r->n_main_moe : 0;
    *val_loss = vl;
    *val_maxvio = mv;
    FILE *f = r->metrics;
    if (!f) return DSMOE_OK; /* not rank 0 */
    fprintf(f, "{\"type\":\"eval\",\"step\":%lld", (long long)step);
    jkey(f, "loss", vl);
    jkey(f, "ppl", exp(vl));
    jkey(f, "bits_per_byte", vl / log(2.0));
    fprintf(f, ",\"tokens\":%lld", (long long)n_tgt);
    jkey(f, "maxvio_global", mv);
    fputs(",\"domains\":{", f);
    int first = 1;
    for (int d = 0; d < ND; d++) {
        if (!r->dom_tok[d]) continue;
        fprintf(f, "%s\"%s\":{\"loss\":", first ? "" : ",", dsmoe_domain_name(d));
        jnum(f, r->dom_loss[d] / (double)r->dom_tok[d]);
        fprintf(f, ",\"tokens\":%lld}", (long long)r->dom_tok[d]);
        first = 0;
    }
    fputs("},\"layers\":[", f);
    for (int32_t k = 0; k < r->n_moe; k++) {
        const int64_t *c = r->ecounts + (size_t)k * (size_t)E;
        const int64_t *dc = r->edc + (size_t)k * ND * (size_t)E;
        fprintf(f, "%s{\"layer\":%d,\"mtp\":%s,\"counts\":", k ? "," : "",
                (int)dsmoe_train_model_moe_layer(r->tm, k), r->is_mtp[k] ? "true" : "false");
        jcounts(f, c, E);
        jkey(f, "maxvio_global", maxvio_of(c, E));
        jkey(f, "entropy", entropy_bits(c, E));
        int dead = 0;
        double tot = 0;
        for (int32_t e = 0; e < E; e++) dead += c[e] == 0, tot += (double)c[e];
        fprintf(f, ",\"dead_experts\":%d,\"domain_counts\":[", dead);
        for (int d = 0; d < ND; d++) {
            if (d) fputc(',', f);
            jcounts(f, dc + (size_t)d * (size_t)E, E);
        }
        fputc(']', f);
        /* Mutual information between a routed pair's domain and its expert. */
        double mi = 0, dtot = 0;
        for (int d = 0; d < ND; d++)
            for (int32_t e = 0; e < E; e++) dtot += (double)dc[(size_t)d * (size_t)E + (size_t)e];
        if (dtot > 0) {
            for (int d = 0; d < ND; d++) {
                double pd = 0;
                for (int32_t e = 0; e < E; e++) pd += (double)dc[(size_t)d * (size_t)E + (size_t)e];
                if (pd <= 0) continue;
                pd /= dtot;
                for (int32_t e = 0; e < E; e++) {
                    double pde = (double)dc[(size_t)d * (size_t)E + (size_t)e] / dtot;
                    if (pde <= 0) continue;
                    double pe = 0;
                    for (int dd = 0; dd < ND; dd++) pe += (double)dc[(size_t)dd * (size_t)E + (size_t)e];
                    pe /= dtot;
                    mi += pde * log2(pde / (pd * pe));
                }
            }
        }
        jkey(f, "mutual_information", mi);
        fputs(",\"top_weight_hist\":", f);
        jcounts(f, r->ehist + (size_t)k * HIST_BINS, HIST_BINS);
        jkey(f, "score_entropy", r->etok[k] > 0 ? r->esent[k] / (double)r->etok[k] : 0.0);
        fputc('}', f);
    }
    fputs("]}\n", f);
    fflush(f);
    return DSMOE_OK;
}

/* -------------------------------------------------------------- metrics io -- */

/* Drops the lines of metrics.jsonl after step `keep` (and any incomplete line), so the
 * file reads as the run up to its checkpoint. */
static dsmoe_status truncate_metrics(const char *path, int64_t keep) {
    FILE *f = fopen(path, "rb+");
    if (!f) {
        if (errno == ENOENT) return DSMOE_OK;
        return dsmoe__error(DSMOE_STATUS_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    char *line = NULL;
    size_t cap = 0;
    long cut = 0;
    for (;;) {
        long at = ftell(f);
        size_t n = 0;
        int c;
        while ((c = fgetc(f)) != EOF) {
            if (n + 2 > cap) {
                size_t nc = cap ? cap * 2 : 4096;
                char *nl = (char *)realloc(line, nc);
                if (!nl) {
                    free(line);
                    fclose(f);
                    return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: out of memory", path);
                }
                line = nl, cap = nc;
            }
            line[n++] = (char)c;
            if (c == '\n') break;
        }
        if (n == 0 || line[n - 1] != '\n') {
            cut = at;
            break;
        }
        line[n] = '\0';
        const char *s = strstr(line, "\"step\":");
        if (strncmp(line, "{\"type\":\"run\"", 13) != 0 && (!s || strtoll(s + 7, NULL, 10) > keep)) {
            cut = at;
            break;
        }
    }
    free(line);
    int bad = fflush(f) != 0 || ftruncate(fileno(f), (off_t)cut) != 0;
    fclose(f);
    if (bad) return dsmoe__error(DSMOE_STATUS_IO, "%s: cannot truncate: %s", path, strerror(errno));
    return DSMOE_OK;
}

static dsmoe_status sync_metrics(run *r) {
    if (fflush(r->metrics) != 0 || fsync(fileno(r->metrics)) != 0)
        return dsmoe__error(DSMOE_STATUS_IO, "%s: cannot write: %s", r->metrics_path, strerror(errno));
    return DSMOE_OK;
}

/* ------------------------------------------------------------------ setup -- */

static uint64_t corpus_hash(const dsmoe_corpus *c) {
    uint64_t h = DSMOE__HASH_INIT;
    for (int s = 0; s < 2; s++) {
        int64_t n = dsmoe_corpus_length(c, (dsmoe_split)s);
        h = dsmoe__hash_bytes(h, &n, sizeof n);
        h = dsmoe__hash_bytes(h, dsmoe_corpus_tokens(c, (dsmoe_split)s), (size_t)n * sizeof(uint16_t));
        h = dsmoe__hash_bytes(h, dsmoe_corpus_domains(c, (dsmoe_split)s), (size_t)n);
    }
    return h;
}

static dsmoe_status setup(run *r, const char *out_dir, const dsmoe_run_options *opts) {
    const dsmoe_run_config *rc = r->rc;
    dsmoe_status st;
    r->nt = opts && opts->n_threads > 0 ? opts->n_threads : dsmoe_default_threads();
    r->B = rc->train.batch;
    r->T = rc->train.seq_len;
    r->N = (int64_t)r->B * r->T;
    r->E = rc->model.n_routed_experts;
    r->K = rc->model.num_experts_per_tok;
    r->coll = opts ? opts->collective : NULL;
    r->R = is_dp(r->coll) ? r->coll->size : 1;
    r->rank = is_dp(r->coll) ? r->coll->rank : 0;
    if (r->rank < 0 || r->rank >= r->R)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "run: rank %d of %d ranks",
                            (int)r->rank, (int)r->R);
    if (r->B % r->R != 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run: batch = %d is not a multiple of the %d ranks (each rank trains on "
                            "batch / ranks sequences of the global batch)",
                            (int)r->B, (int)r->R);
    r->Bl = r->B / r->R;
    if (!(r->ckpt_dir = join(out_dir, "checkpoint")) ||
        !(r->metrics_path = join(out_dir, "metrics.jsonl")))
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "run: out of memory");
    /* Data. */
    const int32_t nf = rc->n_data_files;
    r->data_bytes = (int64_t *)calloc((size_t)(nf > 0 ? nf : 1), sizeof(int64_t));
    r->data_hash = (int64_t *)calloc((size_t)(nf > 0 ? nf : 1), sizeof(int64_t));
    if (!r->data_bytes || !r->data_hash) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "run: out of memory");
    for (int32_t i = 0; i < nf; i++) {
        uint64_t h = 0;
        if ((st = dsmoe__hash_file(rc->data_files[i], &h, &r->data_bytes[i])) != DSMOE_OK)
            return prefixed(st, "data file");
        r->data_hash[i] = (int64_t)h;
    }
    if (nf > 0) st = dsmoe_corpus_from_files(rc->data_files, nf, &rc->corpus, &r->corpus);
    else st = dsmoe_corpus_builtin(&rc->corpus, &r->corpus);
    if (st != DSMOE_OK) return st;
    const int64_t ntrain = dsmoe_corpus_length(r->corpus, DSMOE_SPLIT_TRAIN),
                  nvalid = dsmoe_corpus_length(r->corpus, DSMOE_SPLIT_VALID);
    if (ntrain < (int64_t)r->T + 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run: the training split has %lld tokens, fewer than seq_len + 1 = %d",
                            (long long)ntrain, (int)r->T + 1);
    if (nvalid < 2)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "run: the validation split has %lld tokens (raise valid_fraction or the "
                            "data)",
                            (long long)nvalid);
    /* Model, optimizer, balancers. */
    dsmoe_train_model_options to = rc->train;
    to.n_threads = r->nt;
    to.batch = r->Bl;
    int32_t first = 0, last = r->E - 1;
    r->sharded = r->R > 1 && r->coll->expert_shard && r->E > 0;
    if (r->sharded && r->coll->expert_shard(r->coll->ctx, r->E, &first, &last))
        return comm_failed("expert shard");
    if ((st = dsmoe_train_model_create_sharded(&rc->model, &to, first, last, &r->tm)) != DSMOE_OK)
        return st;
    if (dsmoe_train_model_moe_count(r->tm) == 0) r->sharded = 0; /* the same on every rank */
    dsmoe_train_model_params(r->tm, &r->np);
    /* Zero pages, resident once written: a sharded rank never writes the other ranks'
     * experts' moments. */
    r->mv_bytes = (r->np > 0 ? r->np : 16) * sizeof(float);
    const int huge = !dsmoe_train_model_expert_shard(r->tm, NULL, NULL); /* else released */
    r->m = (float *)dsmoe__pages_alloc(r->mv_bytes, huge);
    r->v = (float *)dsmoe__pages_alloc(r->mv_bytes, huge);
    if (!r->m || !r->v) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "run: out of memory");
    r->n_moe = dsmoe_train_model_moe_count(r->tm);
    const size_t nm = (size_t)(r->n_moe > 0 ? r->n_moe : 1), E = (size_t)(r->E > 0 ? r->E : 1);
    r->is_mtp = (int32_t *)calloc(nm, sizeof(int32_t));
    r->batch = (int32_t *)calloc((size_t)r->B * (size_t)(r->T + 1), sizeof(int32_t));
    r->edom = (uint8_t *)calloc((size_t)r->B * (size_t)(r->T + 1), 1);
    r->pos_ce = (double *)calloc((size_t)r->N, sizeof(double));
    r->bcounts = (int64_t *)calloc(nm * E, sizeof(int64_t));
    r->ecounts = (int64_t *)calloc(nm * E, sizeof(int64_t));
    r->edc = (int64_t *)calloc(nm * ND * E, sizeof(int64_t));
    r->ehist = (int64_t *)calloc(nm * HIST_BINS, sizeof(int64_t));
    r->esent = (double *)calloc(nm, sizeof(double));
    r->etok = (int64_t *)calloc(nm, sizeof(int64_t));
    if (!r->is_mtp || !r->batch || !r->edom || !r->pos_ce || !r->bcounts || !r->ecounts ||
        !r->edc || !r->ehist || !r->esent || !r->etok)
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "run: out of memory");
    for (int32_t k = 0; k < r->n_moe; k++) {
        r->is_mtp[k] = dsmoe_train_model_moe_layer(r->tm, k) >= rc->model.num_hidden_layers;
        r->n_main_moe += !r->is_mtp[k];
    }
    if (r->n_moe > 0 && rc->model.topk_method == DSMOE_TOPK_METHOD_NOAUX_TC) {
        r->bal = (dsmoe_balancer **)calloc(nm, sizeof(dsmoe_balancer *));
        if (!r->bal) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "run: out of memory");
        dsmoe_balancer_config bc = rc->balancer;
        bc.n_experts = r->E;
        for (int32_t k = 0; k < r->n_moe; k++)
            if ((st = dsmoe_balancer_create(&bc, &r->bal[k])) != DSMOE_OK) return st;
    }
    r->ck.rc = rc;
    r->ck.tm = r->tm;
    r->ck.m = r->m;
    r->ck.v = r->v;
    r->ck.bal = r->bal;
    r->ck.corpus_hash = corpus_hash(r->corpus);
    r->ck.data_bytes = r->data_bytes;
    r->ck.data_hash = r->data_hash;
    r->ck.last_train_loss = r->ck.last_val_loss = r->ck.last_val_maxvio = NAN;
    dsmoe_rng_seed(&r->ck.rng, rc->seed);
    return DSMOE_OK;
}

/* ------------------------------------------------------ expert sharding -- */

/* Collective (sharded runs): every rank's block of experts, checked to cover 0 .. E − 1
 * in rank order, and this rank's ranges. */
static dsmoe_status shard_setup(run *r) {
    const int32_t R = r->R, n_moe = dsmoe_train_model_moe_count(r->tm);
    int64_t *fl = (int64_t *)calloc((size_t)R * 2, sizeof(int64_t));
    r->bounds = (int32_t *)calloc((size_t)R + 1, sizeof(int32_t));
    r->rep = (int64_t *)calloc((size_t)n_moe * 2 + 2, sizeof(int64_t));
    r->own = (int64_t *)calloc((size_t)n_moe * 2 + 2, sizeof(int64_t));
    dsmoe_status st = DSMOE_OK;
    if (!fl || !r->bounds || !r->rep || !r->own)
        st = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "run: out of memory");
    /* (after the agreement a failed allocation has stopped every rank already) */
    if ((st = dsmoe__run_agree(r->coll, st)) != DSMOE_OK || !fl || !r->bounds || !r->rep || !r->own) {
        free(fl);
        return st != DSMOE_OK ? st : DSMOE_STATUS_OUT_OF_MEMORY;
    }
    int32_t first = 0, last = -1;
    dsmoe_train_model_expert_shard(r->tm, &first, &last);
    fl[2 * r->rank] = first;
    fl[2 * r->rank + 1] = last;
    if ((st = sum_i64(r, fl, 2 * (int64_t)R, "expert shards")) != DSMOE_OK) {
        free(fl);
        return st;
    }
    for (int32_t q = 0; q < R; q++) {
        const int64_t want = q == 0 ? 0 : fl[2 * q - 1] + 1;
        if (fl[2 * q] != want || fl[2 * q + 1] < fl[2 * q] - 1 ||
            (q == R - 1 && fl[2 * q + 1] != r->E - 1)) {
            st = dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                              "run: the ranks' expert shards must cover experts 0 .. %d in rank "
                              "order; rank %d holds %lld .. %lld",
                              (int)r->E - 1, (int)q, (long long)fl[2 * q], (long long)fl[2 * q + 1]);
            free(fl);
            return st;
        }
        r->bounds[q] = (int32_t)fl[2 * q];
    }
    r->bounds[R] = r->E;
    free(fl);
    /* The replicated ranges (around every layer's experts) and this rank's experts. */
    int64_t cur = 0, per = 0;
    for (int32_t k = 0; k < n_moe; k++) {
        int64_t lo = 0;
        dsmoe_train_model_expert_range(r->tm, k, 0, &lo, &per);
        r->rep[2 * r->n_rep] = cur;
        r->rep[2 * r->n_rep + 1] = lo;
        r->n_rep++;
        cur = lo + (int64_t)r->E * per;
        if (last >= first) {
            r->own[2 * r->n_own] = lo + (int64_t)first * per;
            r->own[2 * r->n_own + 1] = lo + (int64_t)(last + 1) * per;
            r->n_own++;
        }
    }
    r->rep[2 * r->n_rep] = cur;
    r->rep[2 * r->n_rep + 1] = (int64_t)r->np;
    r->n_rep++;
    return DSMOE_OK;
}

/* Tensor i is a routed expert's that this rank does not hold. */
static int not_held(const run *r, int64_t i) {
    if (!r->sharded) return 0;
    const int32_t e = dsmoe_train_model_tensor_expert(r->tm, i, NULL);
    return e >= 0 && (e < r->bounds[r->rank] || e >= r->bounds[r->rank + 1]);
}

/* The data-parallel gradient average: the whole array summed over the ranks (1/R), or
 * when sharded the replicated ranges, and this rank's experts scaled by 1/R here (the
 * others hold zeros there, so the sum in rank order is this value: the same bits). */
static dsmoe_status grad_average(run *r) {
    size_t ng = 0;
    float *g = dsmoe_train_model_grads(r->tm, &ng);
    const dsmoe_run_collective *c = r->coll;
    const double scale = 1.0 / r->R;
    if (!r->sharded)
        return c->sum_f32(c->ctx, g, (int64_t)ng, scale) ? comm_failed("gradient sum") : DSMOE_OK;
    for (int32_t j = 0; j < r->n_rep; j++)
        if (r->rep[2 * j + 1] > r->rep[2 * j] &&
            c->sum_f32(c->ctx, g + r->rep[2 * j], r->rep[2 * j + 1] - r->rep[2 * j], scale))
            return comm_failed("gradient sum");
    for (int32_t j = 0; j < r->n_own; j++)
        for (int64_t i = r->own[2 * j]; i < r->own[2 * j + 1]; i++) {
            const double a = 0.0 + (double)g[i]; /* as the sum's 0 + .. + g + .. + 0 */
            g[i] = (float)(a * scale);
        }
    return DSMOE_OK;
}

/* The global gradient norm: the trainable tensors' sums of squares; when sharded the
 * replicated ones here and the experts' summed over their owners. */
static dsmoe_status grad_norm(run *r, double *norm) {
    /* the tensors' sums on the threads, added in tensor order */
    dsmoe__sum_squares_each(r->seg, r->n_seg, r->seg_ss, r->nt);
    double ss = 0, own = 0;
    for (int64_t j = 0; j < r->n_seg; j++) {
        if (r->sharded && r->seg_exp[j]) own += r->seg_ss[j];
        else ss += r->seg_ss[j];
    }
    if (r->sharded) {
        dsmoe_status st = sum_f64(r, &own, 1, "gradient norm");
        if (st != DSMOE_OK) return st;
        ss += own;
    }
    *norm = sqrt(ss);
    return DSMOE_OK;
}

/* Collective (sharded runs) around rank 0's checkpoint: the other ranks' experts into
 * rank 0's arrays, at their places: the parameters (what = 0) before it writes the model
 * file, both moments (what = 1) before the training state. */
static dsmoe_status shard_gather(run *r, int what) {
    const dsmoe_run_collective *c = r->coll;
    float *arr[3] = {dsmoe_train_model_params(r->tm, NULL), r->m, r->v};
    const int32_t n_moe = dsmoe_train_model_moe_count(r->tm);
    for (int32_t k = 0; k < n_moe; k++)
        for (int32_t q = 1; q < r->R; q++) {
            if (r->bounds[q + 1] <= r->bounds[q]) continue;
            int64_t lo = 0, per = 0;
            dsmoe_train_model_expert_range(r->tm, k, r->bounds[q], &lo, &per);
            const int64_t n = (int64_t)(r->bounds[q + 1] - r->bounds[q]) * per;
            for (int j = what == 0 ? 0 : 1; j < (what == 0 ? 1 : 3); j++)
                if (c->copy_f32(c->ctx, arr[j] + lo, n, q, 0)) return comm_failed("expert gather");
        }
    return DSMOE_OK;
}

static void shard_release(run *r, int params);

/* Rank 0's dsmoe__ckpt_state.before_state: the parameters of the other ranks' experts
 * are written; give them back, then receive the moments. */
static dsmoe_status shard_between(void *ctx) {
    run *r = (run *)ctx;
    r->gathered_moments = 1;
    float *p = dsmoe_train_model_params(r->tm, NULL);
    const int32_t n_moe = dsmoe_train_model_moe_count(r->tm);
    for (int32_t k = 0; k < n_moe; k++) {
        int64_t lo = 0, per = 0;
        dsmoe_train_model_expert_range(r->tm, k, 0, &lo, &per);
        const int64_t a = lo + (int64_t)r->bounds[1] * per, b = lo + (int64_t)r->E * per;
        dsmoe__pages_release(p, (size_t)a * sizeof(float), (size_t)(b - a) * sizeof(float));
    }
    return shard_gather(r, 1);
}

/* Collective (sharded runs): a checkpoint. The other ranks send their experts'
 * parameters, then their moments; rank 0 receives the parameters, writes the model file,
 * gives them back, receives the moments (even when the model file failed, so that no
 * rank waits), writes the training state, gives them back. Rank 0 holds at most two
 * arrays of the other ranks' experts at a time. */
static dsmoe_status shard_save(run *r) {
    dsmoe_status st = shard_gather(r, 0);
    if (st != DSMOE_OK) return st;
    if (r->rank != 0) return shard_gather(r, 1);
    r->gathered_moments = 0;
    r->ck.before_state = shard_between;
    r->ck.hook_ctx = r;
    if ((st = sync_metrics(r)) == DSMOE_OK) st = dsmoe__ckpt_save(r->ckpt_dir, &r->ck);
    r->ck.before_state = NULL;
    dsmoe_status sg = DSMOE_OK;
    if (!r->gathered_moments) sg = shard_gather(r, 1);
    shard_release(r, 1);
    return st != DSMOE_OK ? st : sg;
}

/* Gives back the pages of the other ranks' experts in the moments, and with params in
 * the parameter array too (rank 0 after writing a checkpoint). */
static void shard_release(run *r, int params) {
    float *arr[3] = {r->m, r->v, dsmoe_train_model_params(r->tm, NULL)};
    const int32_t n_moe = dsmoe_train_model_moe_count(r->tm), E = r->E;
    const int64_t first = r->bounds[r->rank], end = r->bounds[r->rank + 1];
    for (int32_t k = 0; k < n_moe; k++) {
        int64_t lo = 0, per = 0;
        dsmoe_train_model_expert_range(r->tm, k, 0, &lo, &per);
        for (int j = 0; j < (params ? 3 : 2); j++) {
            dsmoe__pages_release(arr[j], (size_t)lo * sizeof(float),
                                 (size_t)(first * per) * sizeof(float));
            dsmoe__pages_release(arr[j], (size_t)(lo + end * per) * sizeof(float),
                                 (size_t)((E - end) * per) * sizeof(float));
        }
    }
}

/* -------------------------------------------------------------------- run -- */

static dsmoe_status train(run *r, const dsmoe_run_options *opts, dsmoe_run_result *res,
                          double t_start) {
    const dsmoe_run_config *rc = r->rc;
    dsmoe_adamw_config ac = rc->adamw;
    ac.total_steps = rc->steps;
    const int64_t step0 = r->ck.step;
    int64_t last = rc->steps;
    if (opts && opts->stop_at > 0 && opts->stop_at < last) last = opts->stop_at;
    const int64_t n_tensors = dsmoe_train_model_tensor_count(r->tm);
    dsmoe_status st = DSMOE_OK;
    double t_train = 0;
    int64_t session_tokens = 0;
    if (!r->seg) {
        const size_t ns = (size_t)(n_tensors > 0 ? n_tensors : 1);
        r->seg = (dsmoe__adamw_segment *)calloc(ns, sizeof(dsmoe__adamw_segment));
        r->seg_ss = (double *)calloc(ns, sizeof(double));
        r->seg_exp = (uint8_t *)calloc(ns, 1);
        if (!r->seg || !r->seg_ss || !r->seg_exp)
            return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "run: out of memory");
        r->n_seg = 0;
        for (int64_t i = 0; i < n_tensors; i++) {
            dsmoe_train_tensor t;
            dsmoe_train_model_tensor(r->tm, i, &t);
            if (!t.trainable || not_held(r, i)) continue; /* AdamW over what it holds */
            r->seg_exp[r->n_seg] = dsmoe_train_model_tensor_expert(r->tm, i, NULL) >= 0;
            dsmoe__adamw_segment *q = &r->seg[r->n_seg++];
            q->p = t.data;
            q->m = r->m + t.offset;
            q->v = r->v + t.offset;
            q->g = t.grad;
            q->n = t.n;
            q->decay = t.decay;
        }
    }
    for (int64_t step = step0 + 1; step <= last; step++) {
        const double t0 = now_s();
        if ((st = dsmoe_corpus_sample(r->corpus, DSMOE_SPLIT_TRAIN, &r->ck.rng, r->B, r->T,
                                      r->batch, NULL)) != DSMOE_OK)
            return st;
        /* This rank's rows of the global batch (all of it in one process). */
        const int32_t *rows = r->batch + (size_t)r->rank * (size_t)r->Bl * (size_t)(r->T + 1);
        dsmoe_train_loss l;
        st = dsmoe_train_model_loss(r->tm, rows, &l, 0);
        if (st == DSMOE_OK && !isfinite(l.total)) {
            st = dsmoe__error(DSMOE_STATUS_NON_FINITE,
                              "step %lld: the loss is %g (ce %g, mtp %g, balance %g); stopped, the "
                              "last checkpoint is as it was",
                              (long long)step, l.total, l.ce, l.mtp, l.balance);
        } else {
            if (st == DSMOE_OK) st = dsmoe_train_model_backward(r->tm);
            if (st != DSMOE_OK) st = prefixed(st, "step %lld", (long long)step);
        }
        if ((st = dsmoe__run_agree(r->coll, st)) != DSMOE_OK) return st;
        if (is_dp(r->coll)) {
            /* Every part of the loss is a mean over equally many rows (or sequences) per
             * rank: the global batch's is the mean of the ranks'. So is the gradient. */
            double lv[4] = {l.total, l.ce, l.mtp, l.balance};
            if ((st = sum_f64(r, lv, 4, "loss sum")) != DSMOE_OK) return st;
            l.total = lv[0] / r->R, l.ce = lv[1] / r->R, l.mtp = lv[2] / r->R, l.balance = lv[3] / r->R;
            if ((st = grad_average(r)) != DSMOE_OK) return st;
        }
        double gnorm = 0;
        if ((st = grad_norm(r, &gnorm)) != DSMOE_OK) return st;
        if (!isfinite(gnorm))
            return dsmoe__error(DSMOE_STATUS_NON_FINITE,
                                "step %lld: the gradient norm is %g; stopped, the last checkpoint "
                                "is as it was",
                                (long long)step, gnorm);
        const float scale = dsmoe_adamw_clip_factor(&ac, gnorm);
        const double lr = dsmoe_adamw_lr(&ac, step);
        /* every trainable tensor in one parallel region (the same bits as per tensor) */
        dsmoe__adamw_update_all(&ac, r->seg, r->n_seg, step, lr, scale, r->nt);
        double maxvio_batch = 0;
        for (int32_t k = 0; k < r->n_moe; k++) {
            const dsmoe_moe_routing *ro = dsmoe_train_model_routing(r->tm, k);
            memcpy(r->bcounts + (size_t)k * (size_t)r->E, ro->counts, (size_t)r->E * sizeof(int64_t));
        }
        /* The global batch's counts: the same bias update on every rank. */
        if ((st = sum_i64(r, r->bcounts, (int64_t)r->n_moe * r->E, "expert counts")) != DSMOE_OK)
            return st;
        for (int32_t k = 0; k < r->n_moe; k++) {
            int64_t *c = r->bcounts + (size_t)k * (size_t)r->E;
            if (!r->is_mtp[k]) maxvio_batch += maxvio_of(c, r->E);
            if (r->bal) {
                if ((st = dsmoe_balancer_accumulate_counts(r->bal[k], c, r->N)) != DSMOE_OK ||
                    (st = dsmoe_balancer_step(r->bal[k])) != DSMOE_OK ||
                    (st = dsmoe_train_model_set_bias(r->tm, k, dsmoe_balancer_bias(r->bal[k]))) !=
                        DSMOE_OK)
                    return prefixed(st, "step %lld: balancer of layer %d", (long long)step,
                                    (int)dsmoe_train_model_moe_layer(r->tm, k));
            }
        }
        if (r->n_main_moe > 0) maxvio_batch /= r->n_main_moe;
        r->ck.step = step;
        r->ck.tokens += r->N;
        r->ck.last_train_loss = l.total;
        session_tokens += r->N;
        t_train += now_s() - t0;
        const double tps = t_train > 0 ? (double)session_tokens / t_train : 0;
        const double elapsed = r->elapsed0 + (now_s() - t_start);
        if (step % rc->log_every == 0 || step == rc->steps)
            write_train_record(r, step, lr, &l, gnorm, tps, elapsed, maxvio_batch);
        dsmoe_run_progress p;
        memset(&p, 0, sizeof p);
        p.step = step;
        p.steps = rc->steps;
        p.loss = l.total;
        p.ce = l.ce;
        p.maxvio_batch = maxvio_batch;
        p.tokens_per_s = tps;
        p.eta_s = (double)(rc->steps - step) * (now_s() - t_start) / (double)(step - step0);
        p.val_loss = r->ck.last_val_loss;
        p.val_maxvio = r->ck.last_val_maxvio;
        if (opts && opts->progress) opts->progress(&p, opts->user);
        if ((rc->eval_every > 0 && step % rc->eval_every == 0) || step == rc->steps) {
            if ((st = evaluate(r, step, &r->ck.last_val_loss, &r->ck.last_val_maxvio)) != DSMOE_OK)
                return st;
            r->ck.last_eval_step = step;
            p.is_eval = 1;
            p.val_loss = r->ck.last_val_loss;
            p.val_maxvio = r->ck.last_val_maxvio;
            if (opts && opts->progress) opts->progress(&p, opts->user);
        }
        if ((rc->save_every > 0 && step % rc->save_every == 0) || step == rc->steps || step == last) {
            r->ck.elapsed_s = r->elapsed0 + (now_s() - t_start);
            if (r->sharded) { /* rank 0 gathers the experts as it writes */
                st = shard_save(r);
            } else if (r->rank == 0) { /* rank 0 writes; every rank hears of a failure */
                if ((st = sync_metrics(r)) == DSMOE_OK) st = dsmoe__ckpt_save(r->ckpt_dir, &r->ck);
            }
            if ((st = dsmoe__run_agree(r->coll, st)) != DSMOE_OK) return st;
        }
    }
    if (res) {
        res->tokens_per_s = t_train > 0 ? (double)session_tokens / t_train : 0;
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_run(const dsmoe_run_config *rc_in, const char *out_dir,
                       const dsmoe_run_options *opts, dsmoe_run_result *res) {
    const double t_start = now_s();
    if (!out_dir || !out_dir[0] || (!rc_in && !(opts && opts->resume)))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "run: NULL config (allowed only to resume) or out_dir");
    if (res) {
        memset(res, 0, sizeof *res);
        res->train_loss = res->val_loss = res->val_maxvio = NAN;
    }
    run r;
    memset(&r, 0, sizeof r);
    dsmoe_status st = DSMOE_OK;
    const int resume = opts && opts->resume;
    /* Data-parallel: rank 0 alone changes the folder; the others read it once rank 0
     * is done (each phase ends with an agreement, which also shares any rank's error). */
    const dsmoe_run_collective *coll = opts ? opts->collective : NULL;
    const int lead = !is_dp(coll) || coll->rank == 0;
    char *ckpt = join(out_dir, "checkpoint");
    if (!ckpt) st = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "run: out of memory");
    if ((st = dsmoe__run_agree(coll, st)) != DSMOE_OK) {
        free(ckpt);
        return st;
    }
    struct stat sb;
    if (resume) {
        if (lead) dsmoe__dir_tidy(ckpt);
        if ((st = dsmoe__run_agree(coll, DSMOE_OK)) != DSMOE_OK) goto done;
        if (stat(ckpt, &sb) != 0) {
            st = dsmoe__error(DSMOE_STATUS_IO, "%s: no checkpoint to resume from (%s)", ckpt,
                              strerror(errno));
            goto agreed_a;
        }
        if ((st = dsmoe__ckpt_read_config(ckpt, &r.cs)) != DSMOE_OK) goto agreed_a;
        if (rc_in) {
            dsmoe_run_config want = *rc_in;
            want.adamw.total_steps = want.steps;
            if (want.model.n_routed_experts > 0) want.balancer.n_experts = want.model.n_routed_experts;
            if ((st = dsmoe__run_config_compare(&want, &r.cs.rc)) != DSMOE_OK) {
                st = prefixed(st, "%s: cannot resume with another config", ckpt);
                goto agreed_a;
            }
        }
    } else {
        if (stat(ckpt, &sb) == 0) {
            st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                              "%s holds a run already: resume it, or train into another folder",
                              out_dir);
            goto agreed_a;
        }
        if ((st = dsmoe_run_config_validate(rc_in)) != DSMOE_OK) goto agreed_a;
        if ((st = dsmoe__run_config_own(&r.cs, rc_in)) != DSMOE_OK) goto agreed_a;
        r.cs.rc.adamw.total_steps = r.cs.rc.steps;
        if (r.cs.rc.model.n_routed_experts > 0) r.cs.rc.balancer.n_experts = r.cs.rc.model.n_routed_experts;
    }
    r.rc = &r.cs.rc;
    if ((st = dsmoe_run_config_validate(r.rc)) != DSMOE_OK) goto agreed_a;
    if (lead && (st = make_dirs(out_dir)) != DSMOE_OK) goto agreed_a;
agreed_a:
    if ((st = dsmoe__run_agree(coll, st)) != DSMOE_OK) goto done;
    if ((st = setup(&r, out_dir, opts)) != DSMOE_OK) goto agreed_b;
    /* the balance losses over the whole batch (expert, switch) sum their counts */
    if (is_dp(coll) && (st = dsmoe_train_model_set_counts_sum(r.tm, coll->sum_i64, coll->ctx)) !=
                           DSMOE_OK)
        goto agreed_b;
    if (is_dp(coll) && (coll->attach || r.sharded)) {
        /* collective: every rank that got here calls it, the others wait in agreed_b's
         * agreement first */
        if ((st = dsmoe__run_agree(coll, DSMOE_OK)) != DSMOE_OK) goto done;
        if (r.sharded && !coll->copy_f32) {
            st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                              "run: expert sharding needs the collective's copy_f32");
            goto agreed_b;
        }
        if (r.sharded && (st = shard_setup(&r)) != DSMOE_OK) goto agreed_b;
        if (r.sharded) shard_release(&r, 0); /* never written; kept out of huge pages */
        if (coll->attach) {
            if ((st = coll->attach(coll->ctx, r.tm)) != DSMOE_OK) goto agreed_b;
            r.attached = 1;
        }
    }
    if (resume) {
        if ((st = dsmoe__ckpt_load(r.ckpt_dir, &r.ck)) != DSMOE_OK) goto agreed_b;
        r.elapsed0 = r.ck.elapsed_s;
        if (!lead) goto agreed_b;
        if ((st = truncate_metrics(r.metrics_path, r.ck.step)) != DSMOE_OK) goto agreed_b;
        int fresh = stat(r.metrics_path, &sb) != 0 || sb.st_size == 0;
        if (!(r.metrics = fopen(r.metrics_path, "ab"))) {
            st = dsmoe__error(DSMOE_STATUS_IO, "%s: cannot open for writing: %s", r.metrics_path,
                              strerror(errno));
            goto agreed_b;
        }
        if (fresh) write_run_record(&r);
    } else if (lead) {
        if (!(r.metrics = fopen(r.metrics_path, "wb"))) {
            st = dsmoe__error(DSMOE_STATUS_IO, "%s: cannot open for writing: %s", r.metrics_path,
                              strerror(errno));
            goto agreed_b;
        }
        write_run_record(&r);
    }
    if (r.metrics && ferror(r.metrics))
        st = dsmoe__error(DSMOE_STATUS_IO, "%s: cannot write", r.metrics_path);
agreed_b:
    if ((st = dsmoe__run_agree(coll, st)) != DSMOE_OK) goto done;
    /* train's errors are the same on every rank (agreed, or from the same reduced values) */
    if ((st = train(&r, opts, res, t_start)) == DSMOE_OK) {
        if (r.metrics && ferror(r.metrics))
            st = dsmoe__error(DSMOE_STATUS_IO, "%s: cannot write", r.metrics_path);
        st = dsmoe__run_agree(coll, st);
    }
done:
    if (res) {
        res->step = r.ck.step;
        res->train_loss = r.ck.last_train_loss;
        res->val_loss = r.ck.last_val_loss;
        res->val_maxvio = r.ck.last_val_maxvio;
        res->seconds = now_s() - t_start;
    }
    run_free(&r);
    free(ckpt);
    return st;
}

dsmoe_status dsmoe_run_config_load(const char *dir, dsmoe_run_config *rc) {
    static _Thread_local char *block = NULL;
    if (!dir || !rc) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "run config load: NULL argument");
    char *ckpt = join(dir, "checkpoint");
    if (!ckpt) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "run config load: out of memory");
    dsmoe__run_config_store s = {0};
    dsmoe_status st = dsmoe__ckpt_read_config(ckpt, &s);
    free(ckpt);
    if (st != DSMOE_OK) return st;
    free(block);
    block = s.block;
    *rc = s.rc;
    return DSMOE_OK;
}
