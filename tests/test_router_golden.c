/*
 * test_router_golden.c — the router against golden vectors of the independent fp64
 * NumPy reference (tests/ref/dsmoe_ref.py, written by tests/ref/gen_router_golden.py).
 *
 * Every case folder listed in golden/router/MANIFEST holds a config.txt and .npy
 * arrays. For each case the test builds the config, runs dsmoe_router_forward (or
 * _forward_hidden) with scores and counts, and checks:
 *   indices   exactly, order included (descending selection score, lower id first);
 *   weights   |got - ref| <= 2e-6·|ref| + 1e-30 from logits, 2e-5·|ref| from hidden
 *             states (fp32 GEMM versus fp64), bit-exact in bf16 precision;
 *   scores    likewise (bit-exact for bf16 sigmoid affinities);
 *   counts    equal to the histogram of the indices;
 *   logits    the projected logits of hidden-input cases;
 *   backward  dsmoe_router_backward into a zeroed dlogits, from the reference's
 *             (fp32-rounded) scores and indices, against dlogits.npy with
 *             rtol 1e-5 and atol 1e-6 of the row's largest gradient;
 *   presets   when config.txt names a preset, dsmoe_router_preset gives the same
 *             semantics.
 * Guard words surround every output and the workspace.
 */
#include "testlib.h"

#include <ctype.h>

/* ------------------------------------------------------------- config.txt -- */

typedef struct golden_case {
    char name[128];
    char preset[64];
    dsmoe_router_config cfg;
    int hidden;               /* input = hidden */
    int32_t D;
    dsmoe_dtype gate_dtype;
    int nkeys;
} golden_case;

static char *trim(char *s) {
    while (*s && isspace((unsigned char)*s)) s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1])) *--e = '\0';
    return s;
}

static int parse_int(const char *v, int32_t *out) {
    char *end;
    long x = strtol(v, &end, 10);
    if (end == v || *end) return 0;
    *out = (int32_t)x;
    return 1;
}

static int parse_float(const char *v, float *out) {
    char *end;
    float x = strtof(v, &end);
    if (end == v || *end) return 0;
    *out = x;
    return 1;
}

/* Reads <dir>/config.txt; returns 1 on success (failures are reported). */
static int load_config(const char *dir, golden_case *gc) {
    char path[4200];
    snprintf(path, sizeof path, "%s/config.txt", dir);
    FILE *f = fopen(path, "r");
    if (!f) {
        TL_FAIL("%s: cannot open config.txt", gc->name);
        return 0;
    }
    dsmoe_router_config *c = &gc->cfg;
    memset(c, 0, sizeof *c);
    c->nonfinite = DSMOE_NONFINITE_ERROR;
    gc->gate_dtype = DSMOE_DTYPE_F32;
    char line[1024];
    int ok = 1, lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        char *l = trim(line);
        if (!*l || *l == '#') continue;
        char *eq = strchr(l, '=');
        if (!eq) {
            TL_FAIL("%s: config.txt line %d has no '='", gc->name, lineno);
            ok = 0;
            continue;
        }
        *eq = '\0';
        char *k = trim(l), *v = trim(eq + 1);
        int good = 1;
        gc->nkeys++;
        if (!strcmp(k, "description")) {
            gc->nkeys--;
        } else if (!strcmp(k, "preset")) {
            snprintf(gc->preset, sizeof gc->preset, "%s", v);
            gc->nkeys--;
        } else if (!strcmp(k, "experts")) {
            good = parse_int(v, &c->n_experts);
        } else if (!strcmp(k, "groups")) {
            good = parse_int(v, &c->n_groups);
        } else if (!strcmp(k, "topk_groups")) {
            good = parse_int(v, &c->topk_groups);
        } else if (!strcmp(k, "top_k")) {
            good = parse_int(v, &c->top_k);
        } else if (!strcmp(k, "score")) {
            good = !strcmp(v, "sigmoid") || !strcmp(v, "softmax");
            c->score_func = !strcmp(v, "softmax") ? DSMOE_SCORE_FUNC_SOFTMAX : DSMOE_SCORE_FUNC_SIGMOID;
        } else if (!strcmp(k, "group_score")) {
            good = !strcmp(v, "max") || !strcmp(v, "topsum");
            c->group_score = !strcmp(v, "topsum") ? DSMOE_GROUP_SCORE_TOPSUM : DSMOE_GROUP_SCORE_MAX;
        } else if (!strcmp(k, "group_topm")) {
            good = parse_int(v, &c->group_topm);
        } else if (!strcmp(k, "mask")) {
            good = !strcmp(v, "exclude") || !strcmp(v, "zero");
            c->group_mask = !strcmp(v, "zero") ? DSMOE_GROUP_MASK_ZERO : DSMOE_GROUP_MASK_EXCLUDE;
        } else if (!strcmp(k, "normalize")) {
            good = parse_int(v, &c->normalize);
        } else if (!strcmp(k, "norm_eps")) {
            good = parse_float(v, &c->norm_eps);
        } else if (!strcmp(k, "scale")) {
            good = parse_float(v, &c->scale);
        } else if (!strcmp(k, "use_bias")) {
            good = parse_int(v, &c->use_bias);
        } else if (!strcmp(k, "precision")) {
            good = !strcmp(v, "fp32") || !strcmp(v, "bf16");
            c->precision = !strcmp(v, "bf16") ? DSMOE_PRECISION_BF16 : DSMOE_PRECISION_FP32;
        } else if (!strcmp(k, "input")) {
            good = !strcmp(v, "logits") || !strcmp(v, "hidden");
            gc->hidden = !strcmp(v, "hidden");
        } else if (!strcmp(k, "hidden_dim")) {
            good = parse_int(v, &gc->D);
        } else if (!strcmp(k, "gate_dtype")) {
            good = !strcmp(v, "f32") || !strcmp(v, "bf16");
            gc->gate_dtype = !strcmp(v, "bf16") ? DSMOE_DTYPE_BF16 : DSMOE_DTYPE_F32;
        } else {
            TL_FAIL("%s: config.txt line %d: unknown key '%s'", gc->name, lineno, k);
            ok = 0;
            continue;
        }
        if (!good) {
            TL_FAIL("%s: config.txt line %d: bad value '%s' for %s", gc->name, lineno, v, k);
            ok = 0;
        }
    }
    fclose(f);
    if (ok && gc->nkeys != 16) {
        TL_FAIL("%s: config.txt has %d of the 16 keys", gc->name, gc->nkeys);
        ok = 0;
    }
    return ok;
}

/* ------------------------------------------------------------------ arrays -- */

/* Reads <dir>/<file> and checks dtype and shape (-1 = any). */
static int load_npy(const char *dir, const char *file, dsmoe_dtype dtype, int32_t ndim,
                    int64_t d0, int64_t d1, dsmoe_array *a) {
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    dsmoe_status st = dsmoe_npy_read(path, a);
    tl_checks++;
    if (st != DSMOE_OK) {
        TL_FAIL("%s: %s: %s", file, dsmoe_status_name(st), dsmoe_last_error());
        return 0;
    }
    int64_t want[2] = {d0, d1};
    int ok = a->dtype == dtype && a->ndim == ndim;
    for (int32_t i = 0; ok && i < ndim; i++)
        if (want[i] >= 0 && a->shape[i] != want[i]) ok = 0;
    if (!ok) {
        TL_FAIL("%s/%s: dtype %s ndim %d shape (%lld, %lld), want %s ndim %d (%lld, %lld)", dir,
                file, dsmoe_dtype_name(a->dtype), (int)a->ndim, (long long)a->shape[0],
                (long long)(a->ndim > 1 ? a->shape[1] : 0), dsmoe_dtype_name(dtype), (int)ndim,
                (long long)d0, (long long)d1);
        dsmoe_array_free(a);
    }
    return ok;
}

/* ---------------------------------------------------------------- checking -- */

static float bf16_round(float x) { return dsmoe_bf16_to_f32(dsmoe_f32_to_bf16(x)); }

static unsigned bits_of(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (unsigned)u;
}

/* Compares one (T, n) float output with a double reference, row by row:
 * |got - ref| <= rtol·|ref| + atol + arow·max|ref row|. bits: bit-exact to (float)ref. */
static int compare_rows(const char *cname, const char *what, const float *got, const double *ref,
                        int64_t T, int64_t n, double rtol, double atol, double arow, int bits) {
    int bad = 0;
    double worst = 0;
    int64_t worst_at = -1;
    for (int64_t t = 0; t < T; t++) {
        double rmax = 0;
        for (int64_t i = 0; i < n; i++) rmax = fmax(rmax, fabs(ref[t * n + i]));
        for (int64_t i = 0; i < n; i++) {
            double r = ref[t * n + i], g = got[t * n + i];
            int ok;
            if (bits) {
                float rf = (float)r;
                ok = memcmp(&rf, &got[t * n + i], 4) == 0;
            } else {
                ok = fabs(g - r) <= rtol * fabs(r) + atol + arow * rmax;
            }
            double rel = fabs(g - r) / fmax(fabs(r), 1e-30);
            if (rel > worst || g != g) {
                worst = rel;
                worst_at = t * n + i;
            }
            if (!ok) {
                if (bad < 6)
                    fprintf(stderr, "  %s %s[token %lld][%lld]: got %.9g (0x%08x) want %.12g (err %.3g)\n",
                            cname, what, (long long)t, (long long)i, g,
                            bits_of(got[t * n + i]), r,
                            fabs(g - r));
                bad++;
            }
        }
    }
    tl_checks++;
    if (bad) {
        TL_FAIL("%s: %s: %d of %lld values off (worst relative error %.3g at %lld)", cname, what,
                bad, (long long)(T * n), worst, (long long)worst_at);
        return 0;
    }
    return 1;
}

static void print_row_i(const char *label, const int32_t *v, int32_t K) {
    fprintf(stderr, "    %s:", label);
    for (int32_t k = 0; k < K; k++) fprintf(stderr, " %d", (int)v[k]);
    fprintf(stderr, "\n");
}

static int compare_indices(const char *cname, const int32_t *got, const int32_t *ref, int64_t T,
                           int32_t K, const float *w, const double *wref) {
    int bad = 0;
    for (int64_t t = 0; t < T; t++) {
        if (memcmp(got + t * K, ref + t * K, (size_t)K * sizeof(int32_t)) == 0) continue;
        if (bad < 4) {
            fprintf(stderr, "  %s: token %lld chose different experts\n", cname, (long long)t);
            print_row_i("got ", got + t * K, K);
            print_row_i("want", ref + t * K, K);
            fprintf(stderr, "    weights got/want:");
            for (int32_t k = 0; k < K; k++)
                fprintf(stderr, " %.6g/%.6g", (double)w[t * K + k], wref[t * K + k]);
            fprintf(stderr, "\n");
        }
        bad++;
    }
    tl_checks++;
    if (bad) TL_FAIL("%s: indices differ in %d of %lld tokens", cname, bad, (long long)T);
    return bad == 0;
}

/* On a mismatch, writes what the router produced next to the test's scratch files
 * (router_golden_<case>_{indices,weights,scores}.npy) for a closer look in NumPy. */
static void dump_outputs(const char *cname, const int32_t *idx, const float *w, const float *s,
                         int64_t T, int32_t K, int32_t E) {
    char file[256];
    int64_t tk[2] = {T, K}, te[2] = {T, E};
    snprintf(file, sizeof file, "router_golden_%s_indices.npy", cname);
    if (dsmoe_npy_write_raw(tl_tmp(file), DSMOE_DTYPE_I32, 2, tk, idx) != DSMOE_OK) return;
    snprintf(file, sizeof file, "router_golden_%s_weights.npy", cname);
    dsmoe_npy_write_raw(tl_tmp(file), DSMOE_DTYPE_F32, 2, tk, w);
    snprintf(file, sizeof file, "router_golden_%s_scores.npy", cname);
    dsmoe_npy_write_raw(tl_tmp(file), DSMOE_DTYPE_F32, 2, te, s);
    fprintf(stderr, "  %s: outputs written to %s\n", cname, tl_tmp(""));
}

/* The preset named in config.txt must have the same routing semantics. */
static void check_preset(const golden_case *gc) {
    dsmoe_router_config p;
    dsmoe_status st = dsmoe_router_preset(gc->preset, &p);
    tl_checks++;
    if (st != DSMOE_OK) {
        TL_FAIL("%s: preset '%s': %s", gc->name, gc->preset, dsmoe_last_error());
        return;
    }
    const dsmoe_router_config *c = &gc->cfg;
    char a[512], b[512];
    dsmoe_router_config_json(&p, a, sizeof a);
    dsmoe_router_config_json(c, b, sizeof b);
    int same = p.n_experts == c->n_experts && p.n_groups == c->n_groups &&
               p.topk_groups == c->topk_groups && p.top_k == c->top_k &&
               p.score_func == c->score_func && p.normalize == c->normalize &&
               p.scale == c->scale && p.use_bias == c->use_bias;
    if (c->n_groups > 1 && c->topk_groups < c->n_groups) {
        same = same && p.group_score == c->group_score && p.group_mask == c->group_mask;
        if (c->group_score == DSMOE_GROUP_SCORE_TOPSUM) same = same && p.group_topm == c->group_topm;
    }
    if (c->normalize) same = same && p.norm_eps == c->norm_eps;
    if (!same) TL_FAIL("%s: preset %s differs from config.txt:\n  preset %s\n  golden %s", gc->name,
                       gc->preset, a, b);
}

/* ------------------------------------------------------------------ a case -- */

static void run_case(const char *name) {
    golden_case gc;
    memset(&gc, 0, sizeof gc);
    snprintf(gc.name, sizeof gc.name, "%s", name);
    char rel[256], dir[4096];
    snprintf(rel, sizeof rel, "router/%s", name);
    snprintf(dir, sizeof dir, "%s", tl_golden(rel));
    if (!load_config(dir, &gc)) return;
    const dsmoe_router_config *cfg = &gc.cfg;
    ASSERT_OK(dsmoe_router_config_validate(cfg));
    if (gc.preset[0]) check_preset(&gc);
    const int32_t E = cfg->n_experts, K = cfg->top_k, D = gc.D;
    const int hidden = gc.hidden;
    const int bf16 = cfg->precision == DSMOE_PRECISION_BF16;

    dsmoe_array in = {0}, gate = {0}, proj = {0}, bias = {0}, idx = {0}, w = {0}, s = {0}, dw = {0},
                dl = {0};
    int ok = 1;
    if (hidden) {
        ok &= load_npy(dir, "hidden.npy", DSMOE_DTYPE_F32, 2, -1, D, &in);
        ok &= load_npy(dir, "gate_weight.npy", gc.gate_dtype, 2, E, D, &gate);
        if (ok) ok &= load_npy(dir, "proj_logits.npy", DSMOE_DTYPE_F64, 2, in.shape[0], E, &proj);
    } else {
        ok &= load_npy(dir, "logits.npy", DSMOE_DTYPE_F32, 2, -1, E, &in);
    }
    if (!ok) goto done;
    const int64_t T = in.shape[0];
    if (cfg->use_bias) ok &= load_npy(dir, "bias.npy", DSMOE_DTYPE_F32, 1, E, -1, &bias);
    ok &= load_npy(dir, "indices.npy", DSMOE_DTYPE_I32, 2, T, K, &idx);
    ok &= load_npy(dir, "weights.npy", DSMOE_DTYPE_F64, 2, T, K, &w);
    ok &= load_npy(dir, "scores.npy", DSMOE_DTYPE_F64, 2, T, E, &s);
    ok &= load_npy(dir, "dweights.npy", DSMOE_DTYPE_F32, 2, T, K, &dw);
    ok &= load_npy(dir, "dlogits.npy", DSMOE_DTYPE_F64, 2, T, E, &dl);
    if (!ok) goto done;

    {
        int32_t *o_idx = tl_guarded_alloc((size_t)(T * K) * sizeof(int32_t));
        float *o_w = tl_guarded_alloc((size_t)(T * K) * sizeof(float));
        float *o_s = tl_guarded_alloc((size_t)(T * E) * sizeof(float));
        float *o_l = tl_guarded_alloc((size_t)(T * E) * sizeof(float));
        int64_t *o_c = tl_guarded_alloc((size_t)E * sizeof(int64_t));
        float *o_dl = tl_guarded_alloc((size_t)(T * E) * sizeof(float));
        float *s32 = malloc((size_t)(T * E) * sizeof(float));
        dsmoe_router_output out = {o_idx, o_w, o_s, hidden ? o_l : NULL, o_c};
        const int nt = 2;
        size_t ws_size =
            dsmoe_router_workspace_size(cfg, T, hidden ? D : 0, gc.gate_dtype, nt);
        ASSERT_TRUE(ws_size > 0);
        void *ws = tl_guarded_alloc(ws_size);
        const float *b = cfg->use_bias ? (const float *)bias.data : NULL;
        dsmoe_status st;
        int fail_before = tl_failures;
        if (hidden)
            st = dsmoe_router_forward_hidden(cfg, &out, in.data, gate.data, gc.gate_dtype, D, b, T,
                                             ws, ws_size, nt);
        else
            st = dsmoe_router_forward(cfg, &out, in.data, b, T, ws, ws_size, nt);
        tl_checks++;
        if (st != DSMOE_OK) {
            TL_FAIL("%s: forward: %s: %s", name, dsmoe_status_name(st), dsmoe_last_error());
        } else {
            const double *wref = w.data;
            compare_indices(name, o_idx, idx.data, T, K, o_w, wref);
            double wr = hidden ? 2e-5 : 2e-6;
            compare_rows(name, "weights", o_w, wref, T, K, wr, 1e-30, 0, bf16);
            /* scores: bf16 sigmoid affinities are bf16 numbers (exact); softmax
             * probabilities are fp32 in either precision */
            int sbits = bf16 && cfg->score_func == DSMOE_SCORE_FUNC_SIGMOID;
            compare_rows(name, "scores", o_s, s.data, T, E, wr, hidden ? 1e-7 : 1e-30, 0, sbits);
            /* counts: histogram of the chosen experts */
            int cbad = 0;
            int64_t total = 0;
            for (int32_t e = 0; e < E; e++) {
                int64_t n = 0;
                for (int64_t i = 0; i < T * K; i++) n += o_idx[i] == e;
                if (o_c[e] != n) cbad++;
                total += o_c[e];
            }
            tl_checks++;
            if (cbad || total != T * K)
                TL_FAIL("%s: counts disagree with the indices at %d experts (total %lld, want %lld)",
                        name, cbad, (long long)total, (long long)(T * K));
            if (hidden) {
                /* projected logits: fp32 GEMM vs fp64; bf16 precision rounds them to bf16,
                 * exactly (the generator keeps them away from rounding midpoints) */
                const double *pr = proj.data;
                if (bf16) {
                    float *pb = malloc((size_t)(T * E) * sizeof(float));
                    for (int64_t i = 0; i < T * E; i++) pb[i] = bf16_round((float)pr[i]);
                    tl_same_bits("projected logits (bf16)", o_l, pb, T * E);
                    free(pb);
                } else {
                    tl_allclose("projected logits", o_l, pr, T * E, 1e-6, 1e-5);
                }
            }
        }
        if (tl_failures != fail_before) dump_outputs(name, o_idx, o_w, o_s, T, K, E);
        /* backward from the reference's scores (rounded to fp32) and indices */
        const double *sr = s.data;
        for (int64_t i = 0; i < T * E; i++) s32[i] = (float)sr[i];
        memset(o_dl, 0, (size_t)(T * E) * sizeof(float));
        ASSERT_OK(dsmoe_router_backward(cfg, o_dl, dw.data, idx.data, s32, T, nt));
        compare_rows(name, "dlogits", o_dl, dl.data, T, E, 1e-5, 1e-35, 1e-6, 0);

        ASSERT_TRUE(tl_guard_ok(o_idx));
        ASSERT_TRUE(tl_guard_ok(o_w));
        ASSERT_TRUE(tl_guard_ok(o_s));
        ASSERT_TRUE(tl_guard_ok(o_l));
        ASSERT_TRUE(tl_guard_ok(o_c));
        ASSERT_TRUE(tl_guard_ok(o_dl));
        ASSERT_TRUE(tl_guard_ok(ws));
        tl_guarded_free(o_idx);
        tl_guarded_free(o_w);
        tl_guarded_free(o_s);
        tl_guarded_free(o_l);
        tl_guarded_free(o_c);
        tl_guarded_free(o_dl);
        tl_guarded_free(ws);
        free(s32);
    }
done:
    dsmoe_array_free(&in);
    dsmoe_array_free(&gate);
    dsmoe_array_free(&proj);
    dsmoe_array_free(&bias);
    dsmoe_array_free(&idx);
    dsmoe_array_free(&w);
    dsmoe_array_free(&s);
    dsmoe_array_free(&dw);
    dsmoe_array_free(&dl);
}

/* ------------------------------------------------------------------- main -- */

static char case_names[256][128];
static int n_cases = 0;

static void test_manifest(void) {
    FILE *f = fopen(tl_golden("router/MANIFEST"), "r");
    tl_checks++;
    if (!f) {
        TL_FAIL("cannot open %s", tl_golden("router/MANIFEST"));
        return;
    }
    char line[512];
    while (fgets(line, sizeof line, f) && n_cases < 256) {
        char *l = trim(line);
        if (!*l || *l == '#') continue;
        snprintf(case_names[n_cases++], sizeof case_names[0], "%s", l);
    }
    fclose(f);
    ASSERT_TRUE(n_cases >= 30);
}

int main(void) {
    RUN(test_manifest);
    for (int i = 0; i < n_cases; i++) {
        int before = tl_failures;
        tl_current = case_names[i];
        tl_tests++;
        run_case(case_names[i]);
        if (tl_failures != before) tl_failed_tests++;
        fprintf(stderr, "%s %s\n", tl_failures == before ? "ok  " : "FAIL", case_names[i]);
    }
    return TEST_SUMMARY();
}
