/*
 * trace.c — reads a run folder's metrics.jsonl (schema: docs/train.md, "Runs") into
 * arrays: the "run" record's header, the train records' losses, gradient norms, speeds,
 * per-layer expert counts and bias ranges, and the eval records' losses (overall and per
 * domain), counts, domain × expert counts, top-weight histograms and score entropies.
 * Every field is type-checked; a bad one is a FORMAT error naming the file, the line and
 * the field. Unknown record types and fields are ignored (later versions may add them).
 */
#include "study_internal.h"

#include "io/io_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_EXPERTS 65536
#define MAX_LAYERS 1024

typedef struct ctx {
    const dsmoe__jtree *t;
    const char *path;
    int64_t line;
} ctx;

static dsmoe_status bad(const ctx *c, const char *field, const char *problem) {
    return DSMOE__FAIL(DSMOE_STATUS_FORMAT, "%s line %lld: field '%s': %s", c->path,
                        (long long)c->line, field, problem);
}

static dsmoe_status wrong_type(const ctx *c, const char *field, int32_t node, const char *want) {
    char msg[96];
    snprintf(msg, sizeof msg, "expected %s, found %s", want,
             dsmoe__jv_kind_name(c->t->nodes[node].kind));
    return bad(c, field, msg);
}

/* A number member; missing: error when required, else NaN; null: NaN. */
static dsmoe_status get_num(const ctx *c, int32_t obj, const char *key, const char *field,
                            int required, double *v) {
    int32_t i = dsmoe__jv_get(c->t, obj, key);
    *v = NAN;
    if (i < 0) return required ? bad(c, field, "missing") : DSMOE_OK;
    const dsmoe__jv *n = &c->t->nodes[i];
    if (n->kind == DSMOE__JV_NULL) return DSMOE_OK;
    if (n->kind != DSMOE__JV_NUM) return wrong_type(c, field, i, "a number");
    *v = n->num;
    return DSMOE_OK;
}

static dsmoe_status get_int(const ctx *c, int32_t obj, const char *key, int64_t lo, int64_t hi,
                            int64_t *v) {
    double d;
    dsmoe_status st = get_num(c, obj, key, key, 1, &d);
    if (st) return st;
    if (isnan(d)) return bad(c, key, "null where an integer is needed");
    if (d != floor(d) || d < (double)lo || d > (double)hi) {
        char msg[96];
        snprintf(msg, sizeof msg, "%.17g is not an integer in %lld..%lld", d, (long long)lo,
                 (long long)hi);
        return bad(c, key, msg);
    }
    *v = (int64_t)d;
    return DSMOE_OK;
}

static dsmoe_status get_str(const ctx *c, int32_t obj, const char *key, int required,
                            char *out, size_t cap) {
    int32_t i = dsmoe__jv_get(c->t, obj, key);
    if (i < 0) {
        if (required) return bad(c, key, "missing");
        snprintf(out, cap, "%s", "");
        return DSMOE_OK;
    }
    if (c->t->nodes[i].kind != DSMOE__JV_STR) return wrong_type(c, key, i, "a string");
    const char *s = c->t->nodes[i].str;
    size_t L = strlen(s);
    if (L >= cap) return bad(c, key, "too long");
    memcpy(out, s, L + 1);
    return DSMOE_OK;
}

/* An array member of exactly n numbers (counts: each >= 0) into v. */
static dsmoe_status get_vec(const ctx *c, int32_t obj, const char *key, const char *field,
                            int64_t n, int counts, double *v) {
    int32_t a = dsmoe__jv_get(c->t, obj, key);
    if (a < 0) return bad(c, field, "missing");
    if (c->t->nodes[a].kind != DSMOE__JV_ARR) return wrong_type(c, field, a, "an array");
    if (c->t->nodes[a].n != n) {
        char msg[96];
        snprintf(msg, sizeof msg, "%d values, expected %lld", c->t->nodes[a].n, (long long)n);
        return bad(c, field, msg);
    }
    int64_t k = 0;
    for (int32_t i = c->t->nodes[a].first; i >= 0; i = c->t->nodes[i].next, k++) {
        const dsmoe__jv *e = &c->t->nodes[i];
        if (e->kind != DSMOE__JV_NUM) return wrong_type(c, field, i, "numbers");
        if (counts && !(e->num >= 0)) return bad(c, field, "a negative count");
        v[k] = e->num;
    }
    return DSMOE_OK;
}

static int32_t main_index(const dsmoe__trace *tr, int64_t layer, int *is_mtp) {
    for (int32_t i = 0, m = 0; i < tr->n_layers; i++) {
        if (tr->layer_id[i] == layer) {
            *is_mtp = tr->layer_mtp[i];
            return tr->layer_mtp[i] ? -1 : m;
        }
        if (!tr->layer_mtp[i]) m++;
    }
    *is_mtp = -1;
    return -1;
}

static dsmoe_status parse_run(const ctx *c, int32_t root, dsmoe__trace *tr) {
    dsmoe_status st;
    int64_t v;
    if ((st = get_str(c, root, "strategy", 1, tr->strategy, sizeof tr->strategy))) return st;
    if ((st = get_str(c, root, "preset", 0, tr->preset, sizeof tr->preset))) return st;
    double d;
    if ((st = get_num(c, root, "seed", "seed", 0, &d))) return st;
    tr->seed = isfinite(d) ? (int64_t)d : -1;
    if ((st = get_num(c, root, "steps", "steps", 0, &d))) return st;
    tr->steps_planned = isfinite(d) ? (int64_t)d : -1;
    if ((st = get_int(c, root, "experts", 1, MAX_EXPERTS, &v))) return st;
    tr->E = (int32_t)v;
    if ((st = get_int(c, root, "top_k", 1, tr->E, &v))) return st;
    tr->K = (int32_t)v;
    int32_t doms = dsmoe__jv_get(c->t, root, "domains");
    if (doms < 0) return bad(c, "domains", "missing");
    if (c->t->nodes[doms].kind != DSMOE__JV_ARR) return wrong_type(c, "domains", doms, "an array");
    tr->D = c->t->nodes[doms].n;
    if (tr->D > DSMOE_SUMMARY_MAX_DOMAINS) return bad(c, "domains", "more than 16 domains");
    tr->domains = calloc((size_t)(tr->D ? tr->D : 1), sizeof *tr->domains);
    if (!tr->domains) return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "%s: out of memory", c->path);
    int32_t k = 0;
    for (int32_t i = c->t->nodes[doms].first; i >= 0; i = c->t->nodes[i].next, k++) {
        if (c->t->nodes[i].kind != DSMOE__JV_STR) return wrong_type(c, "domains", i, "strings");
        snprintf(tr->domains[k], sizeof tr->domains[k], "%s", c->t->nodes[i].str);
    }
    int32_t ls = dsmoe__jv_get(c->t, root, "moe_layers");
    if (ls < 0) return bad(c, "moe_layers", "missing");
    if (c->t->nodes[ls].kind != DSMOE__JV_ARR) return wrong_type(c, "moe_layers", ls, "an array");
    tr->n_layers = c->t->nodes[ls].n;
    if (tr->n_layers < 1 || tr->n_layers > MAX_LAYERS) return bad(c, "moe_layers", "needs 1..1024 layers");
    tr->layer_id = calloc((size_t)tr->n_layers, sizeof *tr->layer_id);
    tr->layer_mtp = calloc((size_t)tr->n_layers, 1);
    tr->main_layer = calloc((size_t)tr->n_layers, sizeof *tr->main_layer);
    if (!tr->layer_id || !tr->layer_mtp || !tr->main_layer)
        return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "%s: out of memory", c->path);
    k = 0;
    for (int32_t i = c->t->nodes[ls].first; i >= 0; i = c->t->nodes[i].next, k++) {
        if (c->t->nodes[i].kind != DSMOE__JV_OBJ) return wrong_type(c, "moe_layers", i, "objects");
        if ((st = get_int(c, i, "layer", 0, 1 << 20, &v))) return st;
        tr->layer_id[k] = (int32_t)v;
        int32_t m = dsmoe__jv_get(c->t, i, "mtp");
        if (m >= 0 && c->t->nodes[m].kind != DSMOE__JV_BOOL)
            return wrong_type(c, "moe_layers.mtp", m, "a boolean");
        tr->layer_mtp[k] = (uint8_t)(m >= 0 && c->t->nodes[m].num != 0);
        for (int32_t j = 0; j < k; j++)
            if (tr->layer_id[j] == tr->layer_id[k]) return bad(c, "moe_layers", "a layer listed twice");
        if (!tr->layer_mtp[k]) tr->main_layer[tr->n_main++] = tr->layer_id[k];
    }
    if (tr->n_main < 1) return bad(c, "moe_layers", "no main (non-MTP) MoE layer");
    return DSMOE_OK;
}

static int grow(void **p, int64_t n, size_t esize) {
    void *q = realloc(*p, (size_t)n * esize);
    if (!q) return 0;
    *p = q;
    return 1;
}

static dsmoe_status grow_train(dsmoe__trace *tr) {
    if (tr->nt < tr->cap_t) return DSMOE_OK;
    int64_t nc = tr->cap_t ? tr->cap_t * 2 : 64;
    size_t LE = (size_t)tr->n_main * (size_t)tr->E;
    if (!grow((void **)&tr->t_step, nc, sizeof(int64_t)) || !grow((void **)&tr->t_loss, nc, sizeof(double)) ||
        !grow((void **)&tr->t_grad, nc, sizeof(double)) || !grow((void **)&tr->t_tps, nc, sizeof(double)) ||
        !grow((void **)&tr->t_counts, nc, LE * sizeof(double)) ||
        !grow((void **)&tr->t_bias_absmax, nc, (size_t)tr->n_main * sizeof(double)))
        return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "metrics: out of memory");
    tr->cap_t = nc;
    return DSMOE_OK;
}

static dsmoe_status grow_eval(dsmoe__trace *tr) {
    if (tr->ne < tr->cap_e) return DSMOE_OK;
    int64_t nc = tr->cap_e ? tr->cap_e * 2 : 16;
    size_t LE = (size_t)tr->n_main * (size_t)tr->E, D = (size_t)(tr->D ? tr->D : 1);
    if (!grow((void **)&tr->e_step, nc, sizeof(int64_t)) || !grow((void **)&tr->e_loss, nc, sizeof(double)) ||
        !grow((void **)&tr->e_dloss, nc, D * sizeof(double)) ||
        !grow((void **)&tr->e_counts, nc, LE * sizeof(double)) ||
        !grow((void **)&tr->e_dcounts, nc, LE * D * sizeof(double)) ||
        !grow((void **)&tr->e_hist, nc, (size_t)tr->n_main * DSMOE__HIST_BINS * sizeof(double)) ||
        !grow((void **)&tr->e_sent, nc, (size_t)tr->n_main * sizeof(double)))
        return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "metrics: out of memory");
    tr->cap_e = nc;
    return DSMOE_OK;
}

/* The "layers" array of a record: calls back per main layer with its index. */
static dsmoe_status layers_of(const ctx *c, int32_t root, const dsmoe__trace *tr, uint8_t *seen,
                              int32_t *items, int32_t *mains, int32_t *n) {
    int32_t ls = dsmoe__jv_get(c->t, root, "layers");
    if (ls < 0) return bad(c, "layers", "missing");
    if (c->t->nodes[ls].kind != DSMOE__JV_ARR) return wrong_type(c, "layers", ls, "an array");
    memset(seen, 0, (size_t)tr->n_main);
    *n = 0;
    for (int32_t i = c->t->nodes[ls].first; i >= 0; i = c->t->nodes[i].next) {
        if (c->t->nodes[i].kind != DSMOE__JV_OBJ) return wrong_type(c, "layers", i, "objects");
        int64_t id;
        dsmoe_status st = get_int(c, i, "layer", 0, 1 << 20, &id);
        if (st) return st;
        int is_mtp;
        int32_t m = main_index(tr, id, &is_mtp);
        if (is_mtp < 0) {
            char msg[96];
            snprintf(msg, sizeof msg, "layer %lld is not in the run record's moe_layers", (long long)id);
            return bad(c, "layers", msg);
        }
        if (is_mtp) continue;
        if (seen[m]) return bad(c, "layers", "a layer listed twice");
        seen[m] = 1;
        items[*n] = i;
        mains[*n] = m;
        (*n)++;
    }
    if (*n != tr->n_main) return bad(c, "layers", "a main MoE layer of the run record is missing");
    return DSMOE_OK;
}

static dsmoe_status parse_train(const ctx *c, int32_t root, dsmoe__trace *tr, int32_t *items,
                                int32_t *mains, uint8_t *seen) {
    dsmoe_status st = grow_train(tr);
    if (st) return st;
    int64_t r = tr->nt, step;
    if ((st = get_int(c, root, "step", 0, INT64_C(1) << 52, &step))) return st;
    tr->t_step[r] = step;
    if ((st = get_num(c, root, "loss", "loss", 1, &tr->t_loss[r]))) return st;
    if ((st = get_num(c, root, "grad_norm", "grad_norm", 0, &tr->t_grad[r]))) return st;
    if ((st = get_num(c, root, "tokens_per_s", "tokens_per_s", 0, &tr->t_tps[r]))) return st;
    int32_t n;
    if ((st = layers_of(c, root, tr, seen, items, mains, &n))) return st;
    for (int32_t j = 0; j < n; j++) {
        int32_t m = mains[j], it = items[j];
        double *cnt = tr->t_counts + ((size_t)r * (size_t)tr->n_main + (size_t)m) * (size_t)tr->E;
        if ((st = get_vec(c, it, "counts", "layers.counts", tr->E, 1, cnt))) return st;
        double lo, hi;
        if ((st = get_num(c, it, "bias_min", "layers.bias_min", 0, &lo))) return st;
        if ((st = get_num(c, it, "bias_max", "layers.bias_max", 0, &hi))) return st;
        tr->t_bias_absmax[r * tr->n_main + m] = fmax(fabs(lo), fabs(hi)); /* NaN if both null */
    }
    tr->nt++;
    return DSMOE_OK;
}

static dsmoe_status parse_eval(const ctx *c, int32_t root, dsmoe__trace *tr, int32_t *items,
                               int32_t *mains, uint8_t *seen) {
    dsmoe_status st = grow_eval(tr);
    if (st) return st;
    int64_t r = tr->ne, step;
    size_t D = (size_t)tr->D, E = (size_t)tr->E, L = (size_t)tr->n_main;
    if ((st = get_int(c, root, "step", 0, INT64_C(1) << 52, &step))) return st;
    tr->e_step[r] = step;
    if ((st = get_num(c, root, "loss", "loss", 1, &tr->e_loss[r]))) return st;
    for (size_t d = 0; d < D; d++) tr->e_dloss[(size_t)r * D + d] = NAN;
    int32_t doms = dsmoe__jv_get(c->t, root, "domains");
    if (doms >= 0) {
        if (c->t->nodes[doms].kind != DSMOE__JV_OBJ) return wrong_type(c, "domains", doms, "an object");
        for (int32_t i = c->t->nodes[doms].first; i >= 0; i = c->t->nodes[i].next) {
            int32_t d = 0;
            while (d < tr->D && strcmp(tr->domains[d], c->t->nodes[i].key) != 0) d++;
            if (d == tr->D) return bad(c, "domains", "a domain not in the run record");
            if (c->t->nodes[i].kind != DSMOE__JV_OBJ) return wrong_type(c, "domains", i, "an object");
            if ((st = get_num(c, i, "loss", "domains.loss", 1, &tr->e_dloss[(size_t)r * D + (size_t)d])))
                return st;
        }
    }
    int32_t n;
    if ((st = layers_of(c, root, tr, seen, items, mains, &n))) return st;
    for (int32_t j = 0; j < n; j++) {
        size_t m = (size_t)mains[j];
        int32_t it = items[j];
        size_t rm = (size_t)r * L + m;
        if ((st = get_vec(c, it, "counts", "layers.counts", (int64_t)E, 1, tr->e_counts + rm * E))) return st;
        double *dc = tr->e_dcounts + rm * D * E;
        for (size_t k = 0; k < D * E; k++) dc[k] = NAN;
        int32_t a = dsmoe__jv_get(c->t, it, "domain_counts");
        if (a >= 0 && c->t->nodes[a].kind != DSMOE__JV_NULL) {
            if (c->t->nodes[a].kind != DSMOE__JV_ARR) return wrong_type(c, "layers.domain_counts", a, "an array");
            if (c->t->nodes[a].n != tr->D) return bad(c, "layers.domain_counts", "not one row per domain");
            size_t d = 0;
            for (int32_t row = c->t->nodes[a].first; row >= 0; row = c->t->nodes[row].next, d++) {
                if (c->t->nodes[row].kind != DSMOE__JV_ARR)
                    return wrong_type(c, "layers.domain_counts", row, "arrays");
                if (c->t->nodes[row].n != tr->E) return bad(c, "layers.domain_counts", "a row without E values");
                size_t e = 0;
                for (int32_t x = c->t->nodes[row].first; x >= 0; x = c->t->nodes[x].next, e++) {
                    if (c->t->nodes[x].kind != DSMOE__JV_NUM)
                        return wrong_type(c, "layers.domain_counts", x, "numbers");
                    if (!(c->t->nodes[x].num >= 0)) return bad(c, "layers.domain_counts", "a negative count");
                    dc[d * E + e] = c->t->nodes[x].num;
                }
            }
        }
        double *h = tr->e_hist + rm * DSMOE__HIST_BINS;
        for (int k = 0; k < DSMOE__HIST_BINS; k++) h[k] = NAN;
        int32_t hn = dsmoe__jv_get(c->t, it, "top_weight_hist");
        if (hn >= 0 && c->t->nodes[hn].kind != DSMOE__JV_NULL)
            if ((st = get_vec(c, it, "top_weight_hist", "layers.top_weight_hist", DSMOE__HIST_BINS, 1, h)))
                return st;
        if ((st = get_num(c, it, "score_entropy", "layers.score_entropy", 0, &tr->e_sent[rm]))) return st;
    }
    tr->ne++;
    return DSMOE_OK;
}

dsmoe_status dsmoe__trace_parse(const char *text, size_t n, const char *path, dsmoe__trace *tr) {
    dsmoe__jtree t = {0};
    dsmoe_status st = DSMOE_OK;
    int32_t *items = NULL, *mains = NULL;
    uint8_t *seen = NULL;
    int have_run = 0;
    int64_t line = 0;
    char what[256];
    for (size_t pos = 0; pos < n;) {
        const char *nl = memchr(text + pos, '\n', n - pos);
        size_t end = nl ? (size_t)(nl - text) : n;
        line++;
        const char *s = text + pos;
        size_t len = end - pos;
        pos = nl ? end + 1 : n;
        size_t k = 0;
        while (k < len && (s[k] == ' ' || s[k] == '\t' || s[k] == '\r')) k++;
        if (k == len) continue; /* blank line */
        snprintf(what, sizeof what, "%s line %lld", path, (long long)line);
        st = dsmoe__jtree_parse(&t, s, len, what);
        if (st) {
            if (!nl && have_run) { /* a line being written, or cut by a kill */
                dsmoe_clear_error();
                tr->truncated_tail = 1;
                st = DSMOE_OK;
            }
            break;
        }
        ctx c = {&t, path, line};
        if (t.nodes[0].kind != DSMOE__JV_OBJ) {
            st = DSMOE__FAIL(DSMOE_STATUS_FORMAT, "%s: not a JSON object", what);
            break;
        }
        char type[16];
        if ((st = get_str(&c, 0, "type", 1, type, sizeof type))) {
            if (dsmoe__jv_get(&t, 0, "type") >= 0 && t.nodes[dsmoe__jv_get(&t, 0, "type")].kind == DSMOE__JV_STR) {
                dsmoe_clear_error(); /* a long unknown type: skipped below */
                st = DSMOE_OK;
                type[0] = '\0';
            } else {
                break;
            }
        }
        if (!have_run) {
            if (strcmp(type, "run") != 0) {
                st = DSMOE__FAIL(DSMOE_STATUS_FORMAT, "%s: the first record is not the \"run\" record", what);
                break;
            }
            if ((st = parse_run(&c, 0, tr))) break;
            items = calloc((size_t)tr->n_main, sizeof *items);
            mains = calloc((size_t)tr->n_main, sizeof *mains);
            seen = calloc((size_t)tr->n_main, 1);
            if (!items || !mains || !seen) {
                st = DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "%s: out of memory", path);
                break;
            }
            have_run = 1;
        } else if (strcmp(type, "run") == 0) {
            st = DSMOE__FAIL(DSMOE_STATUS_FORMAT, "%s: a second \"run\" record", what);
            break;
        } else if (strcmp(type, "train") == 0) {
            if ((st = parse_train(&c, 0, tr, items, mains, seen))) break;
        } else if (strcmp(type, "eval") == 0) {
            if ((st = parse_eval(&c, 0, tr, items, mains, seen))) break;
        }
    }
    if (!st && !have_run) st = DSMOE__FAIL(DSMOE_STATUS_FORMAT, "%s: no \"run\" record (empty file)", path);
    free(items);
    free(mains);
    free(seen);
    dsmoe__jtree_free(&t);
    return st;
}

dsmoe_status dsmoe__trace_load(const char *dir, dsmoe__trace *tr) {
    memset(tr, 0, sizeof *tr);
    size_t L = strlen(dir);
    char *path = malloc(L + 32);
    if (!path) return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "out of memory");
    snprintf(path, L + 32, "%s/metrics.jsonl", dir);
    const char *base = dir + L;
    while (base > dir && base[-1] == '/') base--;
    const char *bend = base;
    while (base > dir && base[-1] != '/') base--;
    size_t bl = (size_t)(bend - base);
    if (bl == 0 || (bl == 1 && base[0] == '.')) snprintf(tr->name, sizeof tr->name, "run");
    else snprintf(tr->name, sizeof tr->name, "%.*s", (int)(bl < sizeof tr->name ? bl : sizeof tr->name - 1), base);
    dsmoe__mapped m;
    dsmoe_status st = dsmoe__map_file(path, 0, NULL, 0, &m);
    if (!st) {
        st = dsmoe__trace_parse((const char *)m.data, m.size, path, tr);
        dsmoe__unmap_file(&m);
    }
    free(path);
    if (st) dsmoe__trace_free(tr);
    return st;
}

void dsmoe__trace_free(dsmoe__trace *tr) {
    free(tr->domains);
    free(tr->layer_id);
    free(tr->layer_mtp);
    free(tr->main_layer);
    free(tr->t_step);
    free(tr->t_loss);
    free(tr->t_grad);
    free(tr->t_tps);
    free(tr->t_counts);
    free(tr->t_bias_absmax);
    free(tr->e_step);
    free(tr->e_loss);
    free(tr->e_dloss);
    free(tr->e_counts);
    free(tr->e_dcounts);
    free(tr->e_hist);
    free(tr->e_sent);
    char name[128];
    memcpy(name, tr->name, sizeof name);
    memset(tr, 0, sizeof *tr);
    memcpy(tr->name, name, sizeof name);
}
