/*
 * test_moe_golden.c — the MoE layer against the independent fp64 reference
 * (tests/ref/moe_ref.py): forward output, routing, and every gradient (input, all
 * expert weights, the shared experts and the gate weight, with an extra gradient on
 * the logits as a balance loss would give), for several configurations, on every
 * kernel set this CPU has; each case is also run on 1 and 3 threads, which must agree
 * bit for bit. The cases at T > 512 are in test_moe_blocks_golden.c.
 */
#include "testlib.h"
#include "moe_golden_util.h"

#include <math.h>

#define MAXN 65536

static int64_t getf(const dsmoe_safetensors *st, const char *name, float *out, int64_t cap) {
    static double tmp[MAXN];
    int64_t n = get64(st, name, tmp, cap < MAXN ? cap : MAXN);
    for (int64_t i = 0; i < n; i++) out[i] = (float)tmp[i];
    return n;
}

/* Tolerance for fp32 against fp64: relative to the array's scale. */
static int close_to(const char *what, const float *got, const double *ref, int64_t n) {
    double s = maxabs(ref, n);
    return tl_allclose(what, got, ref, n, 3e-6 * (s > 1 ? s : 1), 2e-5);
}

static float xbuf[MAXN], ybuf[MAXN], y3[MAXN], dybuf[MAXN], extra[MAXN], dxbuf[MAXN], dx3[MAXN];
static double ref[MAXN], ref2[MAXN];

static void run_case(const char *name) {
    char path[512];
    snprintf(path, sizeof path, "moe/%s.safetensors", name);
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(tl_golden(path), &st));
    if (!st) return;
    const char *prefix = meta(st, "prefix");
    dsmoe_moe_config cfg;
    dsmoe_moe_config_default(&cfg);
    router_from_meta(st, &cfg.router);
    cfg.n_shared = -1;
    cfg.train = 1;
    cfg.capacity_factor = (float)meta_f(st, "capacity_factor");
    ASSERT_OK(dsmoe_moe_config_from_safetensors(&cfg, st, prefix));
    ASSERT_EQ_INT(cfg.hidden_size, meta_int(st, "D"));
    ASSERT_EQ_INT(cfg.expert_size, meta_int(st, "F"));
    ASSERT_EQ_INT(cfg.n_shared, meta_int(st, "n_shared"));
    const int64_t T = meta_int(st, "T");
    const int32_t D = cfg.hidden_size, E = cfg.router.n_experts, K = cfg.router.top_k;
    cfg.max_tokens = T;
    dsmoe_moe *m = NULL, *m3 = NULL;
    ASSERT_OK(dsmoe_moe_create(&cfg, &m));
    ASSERT_OK(dsmoe_moe_create(&cfg, &m3));
    if (!m || !m3) goto done;
    ASSERT_OK(dsmoe_moe_load_safetensors(m, st, prefix));
    ASSERT_OK(dsmoe_moe_load_safetensors(m3, st, prefix));
    getf(st, "x", xbuf, MAXN);
    getf(st, "dy", dybuf, MAXN);
    getf(st, "dlogits_extra", extra, MAXN);

    /* forward */
    ASSERT_OK(dsmoe_moe_forward(m, ybuf, xbuf, T, 1));
    ASSERT_OK(dsmoe_moe_forward(m3, y3, xbuf, T, 3));
    get64(st, "y", ref, MAXN);
    char what[512];
    snprintf(what, sizeof what, "%s y", name);
    close_to(what, ybuf, ref, T * D);
    tl_same_bits("y 1 vs 3 threads", ybuf, y3, T * D);
    const dsmoe_moe_routing *r = dsmoe_moe_last_routing(m);
    ASSERT_TRUE(r != NULL);
    if (!r) goto done;
    ASSERT_EQ_INT(r->T, T);
    get64(st, "indices", ref, MAXN);
    int idx_ok = 1;
    for (int64_t i = 0; i < T * K; i++) idx_ok &= r->indices[i] == (int32_t)ref[i];
    ASSERT_TRUE(idx_ok);
    get64(st, "weights", ref, MAXN);
    snprintf(what, sizeof what, "%s weights", name);
    close_to(what, r->weights, ref, T * K);
    get64(st, "logits", ref, MAXN);
    snprintf(what, sizeof what, "%s logits", name);
    close_to(what, r->logits, ref, T * E);
    ASSERT_EQ_INT(r->n_dropped, meta_int(st, "dropped"));
    int64_t total = 0;
    for (int32_t e = 0; e < E; e++) total += r->counts[e];
    ASSERT_EQ_INT(total, T * K);

    /* the packed weight layout (inference only): the same routing, y within tolerance */
    {
        dsmoe_moe_config pc = cfg;
        pc.train = 0;
        pc.weight_layout = DSMOE_MOE_LAYOUT_PACKED;
        dsmoe_moe *mp = NULL;
        ASSERT_OK(dsmoe_moe_create(&pc, &mp));
        if (mp) {
            ASSERT_OK(dsmoe_moe_load_safetensors(mp, st, prefix));
            ASSERT_OK(dsmoe_moe_forward(mp, y3, xbuf, T, 2));
            get64(st, "y", ref, MAXN);
            snprintf(what, sizeof what, "%s y (packed layout)", name);
            close_to(what, y3, ref, T * D);
            get64(st, "indices", ref, MAXN);
            const dsmoe_moe_routing *rp = dsmoe_moe_last_routing(mp);
            int same = rp != NULL;
            for (int64_t i = 0; same && i < T * K; i++) same &= rp->indices[i] == (int32_t)ref[i];
            ASSERT_TRUE(same);
        }
        dsmoe_moe_free(mp);
    }

    /* backward: dx starts non-zero to check accumulation */
    for (int64_t i = 0; i < T * D; i++) dxbuf[i] = dx3[i] = 0.25f;
    float *g1 = dsmoe_moe_grads(m, NULL), *g3 = dsmoe_moe_grads(m3, NULL);
    size_t np = 0;
    dsmoe_moe_grads(m, &np);
    for (size_t i = 0; i < np; i++) g1[i] = g3[i] = 0.0f;
    ASSERT_OK(dsmoe_moe_backward(m, dxbuf, dybuf, xbuf, extra, T, 1));
    ASSERT_OK(dsmoe_moe_backward(m3, dx3, dybuf, xbuf, extra, T, 3));
    get64(st, "dx", ref, MAXN);
    for (int64_t i = 0; i < T * D; i++) ref[i] += 0.25;
    snprintf(what, sizeof what, "%s dx", name);
    close_to(what, dxbuf, ref, T * D);
    tl_same_bits("dx 1 vs 3 threads", dxbuf, dx3, T * D);
    tl_same_bits("grads 1 vs 3 threads", g1, g3, (int64_t)np);
    int64_t nt = dsmoe_moe_tensor_count(m);
    for (int64_t i = 0; i < nt; i++) {
        dsmoe_moe_tensor t;
        ASSERT_OK(dsmoe_moe_tensor_at(m, i, &t));
        if (!t.trainable) {
            ASSERT_TRUE(t.grad == NULL);
            continue;
        }
        char gname[128];
        snprintf(gname, sizeof gname, "grad.%s", t.name);
        int64_t n = get64(st, gname, ref2, MAXN);
        ASSERT_EQ_INT(n, t.shape[0] * t.shape[1]);
        snprintf(what, sizeof what, "%s %s", name, gname);
        close_to(what, t.grad, ref2, n);
    }
done:
    dsmoe_moe_free(m);
    dsmoe_moe_free(m3);
    dsmoe_safetensors_close(st);
}

static void test_golden_cases(void) {
    FILE *f = fopen(tl_golden("moe/MANIFEST"), "r");
    ASSERT_TRUE(f != NULL);
    if (!f) return;
    char line[256];
    int n = 0;
    /* every kernel set: their thresholds between the streaming product and SGEMM
     * differ (8, 16 or no limit rows). The default set is resolved first, which pins
     * OpenBLAS to one thread per call (a dsmoe_set_isa() before any other call does not). */
    (void)dsmoe_isa();
    const char *isas[] = {"ref", "avx2", "avx512"};
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0]) continue;
        for (int v = 0; v < 3; v++) {
            if (dsmoe_set_isa(isas[v]) != DSMOE_OK) continue;
            int before = tl_failures;
            run_case(line);
            fprintf(stderr, "  case %-14s %-7s %s\n", line, isas[v],
                    tl_failures == before ? "ok" : "FAIL");
        }
        n++;
    }
    ASSERT_OK(dsmoe_set_isa(NULL));
    fclose(f);
    ASSERT_TRUE(n >= 7);
}

int main(void) {
    RUN(test_golden_cases);
    return TEST_SUMMARY();
}
