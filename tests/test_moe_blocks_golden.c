/*
 * test_moe_blocks_golden.c — the MoE layer at T > 512 tokens against the independent
 * fp64 reference (tests/ref/gen_moe_blocks.py), so that every blocked loop runs over
 * several blocks, a partial last one included: the routed experts' row blocks of
 * DSMOE_MOE_ROW_BLOCK (experts with 0, 1-8, 8-16, 16-64, 64-256, 256-512 and more than
 * 512 rows), the shared expert's token blocks, the backward's row-block phase, its
 * weight gradients and its token blocks of dx, the router's projection blocks and fused
 * token blocks, capacity drops, bf16 weights and the packed layout.
 *
 * Every case runs on every kernel set this CPU has ("ref", "avx2", "avx512"): their
 * thresholds between the weight-streaming product and SGEMM differ (8, 16 and no
 * limit rows), so each path meets the reference. Checks per kernel set:
 *   y, routing weights, dx and every weight gradient (gate included, through the
 *   router, with and without dlogits_extra): |got - ref| <= atol + rtol·|ref|;
 *   chosen experts (order included), per-expert counts and drops: exactly;
 *   1 and 4 threads: bit-identical; the packed layout's y and experts.
 * The inputs are replayed from the generator's splitmix64 streams (see its header).
 */
#include "testlib.h"
#include "moe_golden_util.h"

#include <math.h>

#define CAP (1 << 16)

/* The generator's streams: dsmoe_rng_seed(seed·2^40 + kind·2^32 + attempt·2^24 + t),
 * u = (float)((next >> 40)·2^-24)·2 - 1 (exact in fp32). */
static void draw(float *out, int n, uint64_t seed, uint64_t kind, uint64_t attempt, uint64_t t,
                 float mul) {
    dsmoe_rng r;
    dsmoe_rng_seed(&r, (seed << 40) + (kind << 32) + (attempt << 24) + t);
    for (int i = 0; i < n; i++) {
        float u = (float)((double)(dsmoe_rng_next(&r) >> 40) * 0x1.0p-24) * 2.0f - 1.0f;
        out[i] = u * mul;
    }
}

/* fp32 against fp64 (stored rounded to fp32): atol relative to the array's scale. */
static int close_to(const char *what, const float *got, const double *ref, int64_t n) {
    double s = maxabs(ref, n);
    return tl_allclose(what, got, ref, n, 2e-6 * (s > 1 ? s : 1), 2e-5);
}

static float xbuf[CAP], dybuf[CAP], extra[CAP], ybuf[CAP], y4[CAP], dxbuf[CAP], dx4[CAP];
static double ref[CAP];

/* Every trainable tensor's gradient against grad.<name> (or, for the gate with
 * `noextra`, grad_noextra.gate.weight). */
static void check_grads(const char *what, dsmoe_moe *m, const dsmoe_safetensors *st, int noextra) {
    const int64_t nt = dsmoe_moe_tensor_count(m);
    for (int64_t i = 0; i < nt; i++) {
        dsmoe_moe_tensor t;
        ASSERT_OK(dsmoe_moe_tensor_at(m, i, &t));
        if (!t.trainable) continue;
        char gname[160], label[520];
        snprintf(gname, sizeof gname, "%s.%s",
                 noextra && strcmp(t.name, "gate.weight") == 0 ? "grad_noextra" : "grad", t.name);
        const int64_t n = get64(st, gname, ref, CAP);
        ASSERT_EQ_INT(n, t.shape[0] * t.shape[1]);
        snprintf(label, sizeof label, "%s %s", what, gname);
        if (n == t.shape[0] * t.shape[1]) close_to(label, t.grad, ref, n);
    }
}

/* Forward checks of layer m (just run on x): routing against the golden file. */
static void check_routing(const char *what, const dsmoe_moe *m, const dsmoe_safetensors *st,
                          int64_t T, int32_t E, int32_t K) {
    const dsmoe_moe_routing *r = dsmoe_moe_last_routing(m);
    ASSERT_TRUE(r != NULL);
    if (!r) return;
    ASSERT_EQ_INT(r->T, T);
    get64(st, "indices", ref, CAP);
    int64_t bad = -1;
    for (int64_t i = 0; i < T * K && bad < 0; i++)
        if (r->indices[i] != (int32_t)ref[i]) bad = i;
    if (bad >= 0)
        TL_FAIL("%s: expert %lld of token %lld is %d, want %d", what, (long long)(bad % K),
                (long long)(bad / K), (int)r->indices[bad], (int)ref[bad]);
    get64(st, "counts", ref, CAP);
    for (int32_t e = 0; e < E; e++) ASSERT_EQ_INT(r->counts[e], (int64_t)ref[e]);
    ASSERT_EQ_INT(r->n_dropped, meta_int(st, "dropped"));
    get64(st, "weights", ref, CAP);
    char label[520];
    snprintf(label, sizeof label, "%s weights", what);
    close_to(label, r->weights, ref, T * K);
}

static void run_case(const char *name, const char *isa) {
    char path[512], what[320];
    snprintf(path, sizeof path, "moe/%s.safetensors", name);
    snprintf(what, sizeof what, "%s [%s]", name, isa);
    dsmoe_safetensors *st = NULL;
    ASSERT_OK(dsmoe_safetensors_open(tl_golden(path), &st));
    if (!st) return;
    const char *prefix = meta(st, "prefix");
    dsmoe_moe_config cfg;
    dsmoe_moe_config_default(&cfg);
    router_from_meta(st, &cfg.router);
    cfg.n_shared = -1;
    cfg.train = (int32_t)meta_int(st, "train");
    cfg.weight_dtype = strcmp(meta(st, "weight_dtype"), "BF16") == 0 ? DSMOE_DTYPE_BF16
                                                                      : DSMOE_DTYPE_F32;
    cfg.capacity_factor = (float)meta_f(st, "capacity_factor");
    ASSERT_OK(dsmoe_moe_config_from_safetensors(&cfg, st, prefix));
    ASSERT_EQ_INT(cfg.n_shared, meta_int(st, "n_shared"));
    const int64_t T = meta_int(st, "T");
    const int32_t D = cfg.hidden_size, E = cfg.router.n_experts, K = cfg.router.top_k;
    const int noextra = (int)meta_int(st, "noextra");
    const uint64_t seed = (uint64_t)meta_int(st, "input_seed");
    ASSERT_TRUE(T > 2 * DSMOE_MOE_ROW_BLOCK && T * D <= CAP && T * E <= CAP);
    if (!(T > 0 && T * D <= CAP && T * E <= CAP)) goto close;
    cfg.max_tokens = T;
    cfg.n_threads = 4;

    /* the inputs */
    get64(st, "x_attempt", ref, CAP);
    for (int64_t t = 0; t < T; t++) {
        draw(xbuf + t * D, D, seed, 0, (uint64_t)ref[t], (uint64_t)t, 1.0f);
        draw(dybuf + t * D, D, seed, 1, 0, (uint64_t)t, 1.0f);
        draw(extra + t * E, E, seed, 2, 0, (uint64_t)t, 0.25f);
    }

    dsmoe_moe *m = NULL, *m4 = NULL, *mp = NULL;
    void *ws = NULL;
    ASSERT_OK(dsmoe_moe_create(&cfg, &m));
    ASSERT_OK(dsmoe_moe_create(&cfg, &m4));
    dsmoe_moe_config pc = cfg;
    pc.train = 0;
    pc.weight_layout = DSMOE_MOE_LAYOUT_PACKED;
    ASSERT_OK(dsmoe_moe_create(&pc, &mp));
    if (!m || !m4 || !mp) goto done;
    ASSERT_OK(dsmoe_moe_load_safetensors(m, st, prefix));
    ASSERT_OK(dsmoe_moe_load_safetensors(m4, st, prefix));
    ASSERT_OK(dsmoe_moe_load_safetensors(mp, st, prefix));
    /* m4 and mp share one caller scratch, filled with NaN bytes before each of their
     * calls: a block that the layer reads before writing (or forgets to write) shows up
     * as NaN instead of passing on whatever an earlier call left there. */
    const dsmoe_moe_config *c4 = dsmoe_moe_get_config(m4), *cp = dsmoe_moe_get_config(mp);
    size_t ws4 = dsmoe_moe_workspace_size(c4, c4->max_tokens, c4->n_threads);
    size_t wsp = dsmoe_moe_workspace_size(cp, cp->max_tokens, cp->n_threads);
    size_t wsn = ws4 > wsp ? ws4 : wsp;
    ws = dsmoe_malloc(wsn);
    ASSERT_TRUE(ws != NULL);
    if (!ws) goto done;
    ASSERT_OK(dsmoe_moe_set_workspace(m4, ws, wsn));
    ASSERT_OK(dsmoe_moe_set_workspace(mp, ws, wsn));

    /* forward: 1 thread against the reference, 4 threads bit for bit */
    ASSERT_OK(dsmoe_moe_forward(m, ybuf, xbuf, T, 1));
    memset(ws, 0xff, wsn);
    ASSERT_OK(dsmoe_moe_forward(m4, y4, xbuf, T, 4));
    get64(st, "y", ref, CAP);
    char label[400];
    snprintf(label, sizeof label, "%s y", what);
    close_to(label, ybuf, ref, T * D);
    tl_same_bits("y, 1 vs 4 threads", ybuf, y4, T * D);
    check_routing(what, m, st, T, E, K);

    /* the packed layout (inference only) */
    memset(ws, 0xff, wsn);
    ASSERT_OK(dsmoe_moe_forward(mp, y4, xbuf, T, 2));
    get64(st, "y", ref, CAP);
    snprintf(label, sizeof label, "%s y (packed layout)", what);
    close_to(label, y4, ref, T * D);
    snprintf(label, sizeof label, "%s (packed layout)", what);
    check_routing(label, mp, st, T, E, K);

    if (cfg.train) {
        /* backward; dx starts non-zero to check that it accumulates */
        for (int64_t i = 0; i < T * D; i++) dxbuf[i] = dx4[i] = 0.25f;
        dsmoe_moe_zero_grad(m);
        dsmoe_moe_zero_grad(m4);
        ASSERT_OK(dsmoe_moe_backward(m, dxbuf, dybuf, xbuf, extra, T, 1));
        memset(ws, 0xff, wsn);
        ASSERT_OK(dsmoe_moe_backward(m4, dx4, dybuf, xbuf, extra, T, 4));
        get64(st, "dx", ref, CAP);
        for (int64_t i = 0; i < T * D; i++) ref[i] += 0.25;
        snprintf(label, sizeof label, "%s dx", what);
        close_to(label, dxbuf, ref, T * D);
        tl_same_bits("dx, 1 vs 4 threads", dxbuf, dx4, T * D);
        size_t np = 0;
        float *g1 = dsmoe_moe_grads(m, &np), *g4 = dsmoe_moe_grads(m4, NULL);
        tl_same_bits("gradients, 1 vs 4 threads", g1, g4, (int64_t)np);
        check_grads(what, m, st, 0);
        if (noextra) {
            /* without dlogits_extra; dx starts at 0 */
            memset(dxbuf, 0, (size_t)(T * D) * sizeof(float));
            dsmoe_moe_zero_grad(m);
            ASSERT_OK(dsmoe_moe_backward(m, dxbuf, dybuf, xbuf, NULL, T, 2));
            get64(st, "dx_noextra", ref, CAP);
            snprintf(label, sizeof label, "%s dx without dlogits_extra", what);
            close_to(label, dxbuf, ref, T * D);
            snprintf(label, sizeof label, "%s without dlogits_extra", what);
            check_grads(label, m, st, 1);
        }
    }
done:
    dsmoe_moe_free(m);
    dsmoe_moe_free(m4);
    dsmoe_moe_free(mp);
    dsmoe_free(ws);
close:
    dsmoe_safetensors_close(st);
}

static void test_block_cases(void) {
    FILE *f = fopen(tl_golden("moe/MANIFEST.blocks"), "r");
    ASSERT_TRUE(f != NULL);
    if (!f) return;
    /* Resolve the default kernel set first: that also pins OpenBLAS to one thread per
     * call, which a dsmoe_set_isa() before any other call skips (the gradients then
     * differ between 1 and 4 threads in their last bits). */
    (void)dsmoe_isa();
    const char *isas[] = {"ref", "avx2", "avx512"};
    char line[256];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0]) continue;
        for (int v = 0; v < 3; v++) {
            if (dsmoe_set_isa(isas[v]) != DSMOE_OK) continue;
            int before = tl_failures;
            run_case(line, isas[v]);
            fprintf(stderr, "  case %-20s %-7s %s\n", line, isas[v],
                    tl_failures == before ? "ok" : "FAIL");
        }
        n++;
    }
    ASSERT_OK(dsmoe_set_isa(NULL));
    fclose(f);
    ASSERT_TRUE(n >= 3);
}

int main(void) {
    RUN(test_block_cases);
    return TEST_SUMMARY();
}
