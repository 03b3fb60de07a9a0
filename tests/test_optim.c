/*
 * test_optim.c — AdamW, the learning-rate schedule and global-norm clipping
 * (src/train/optim.c) against torch.optim.AdamW and clip_grad_norm_ (golden files by
 * tests/ref/gen_optim_golden.py): twelve steps over three tensors with and without
 * weight decay, one of tiny gradients where eps matters, warm-up, cosine and the flat
 * tail; plus the properties that need no reference.
 */
#include "train/train_internal.h"
#include "model_testutil.h"

#include <math.h>

#define G DSMOE_TEST_DATA_DIR "/train/"

static void test_against_torch(void) {
    int64_t n, S, k;
    double *hy = mt_npy64(G "adamw_hyper.npy", &k);
    double *sz = mt_npy64(G "adamw_sizes.npy", &k);
    double *wd = mt_npy64(G "adamw_wd.npy", &k);
    double *p0 = mt_npy64(G "adamw_p0.npy", &n);
    double *gr = mt_npy64(G "adamw_grads.npy", &k);
    double *lr_ref = mt_npy64(G "adamw_lr.npy", &S);
    double *norm_ref = mt_npy64(G "adamw_norm.npy", &k);
    double *p_ref = mt_npy64(G "adamw_p.npy", &k);
    double *m_ref = mt_npy64(G "adamw_m.npy", &k);
    double *v_ref = mt_npy64(G "adamw_v.npy", &k);
    if (!hy || !sz || !wd || !p0 || !gr || !lr_ref || !norm_ref || !p_ref || !m_ref || !v_ref) goto out;
    ASSERT_EQ_INT(S, (int64_t)hy[8]);
    dsmoe_adamw_config c;
    dsmoe_adamw_config_default(&c);
    c.lr = (float)hy[0];
    c.beta1 = (float)hy[1];
    c.beta2 = (float)hy[2];
    c.eps = (float)hy[3];
    c.clip_norm = (float)hy[4];
    c.warmup_steps = (int64_t)hy[5];
    c.total_steps = (int64_t)hy[6];
    c.min_lr_ratio = (float)hy[7];
    ASSERT_OK(dsmoe_adamw_config_validate(&c));
    float *p = (float *)calloc((size_t)n, sizeof *p), *m = (float *)calloc((size_t)n, sizeof *m),
          *v = (float *)calloc((size_t)n, sizeof *v), *g = (float *)calloc((size_t)n, sizeof *g);
    for (int64_t i = 0; i < n; i++) p[i] = (float)p0[i];
    for (int64_t s = 0; s < S; s++) {
        for (int64_t i = 0; i < n; i++) g[i] = (float)gr[s * n + i];
        double lr = dsmoe_adamw_lr(&c, s + 1);
        ASSERT_NEAR(lr, lr_ref[s], 1e-7 * lr_ref[s]); /* float hyper-parameters vs Python doubles */
        double ss = 0;
        int64_t off = 0;
        for (int t = 0; t < 3; t++) {
            ss += dsmoe_sum_squares(g + off, (int64_t)sz[t], 1);
            off += (int64_t)sz[t];
        }
        double norm = sqrt(ss);
        ASSERT_NEAR(norm, norm_ref[s], 1e-6 * norm_ref[s]);
        float f = dsmoe_adamw_clip_factor(&c, norm);
        off = 0;
        for (int t = 0; t < 3; t++) {
            dsmoe_adamw_update(&c, p + off, m + off, v + off, g + off, (int64_t)sz[t], s + 1, lr, wd[t], f, 1);
            off += (int64_t)sz[t];
        }
        /* the parameters after every step, to a few fp32 ulps of their change */
        for (int64_t i = 0; i < n; i++)
            if (fabs(p[i] - p_ref[s * n + i]) > 2e-6 * (fabs(p_ref[s * n + i]) + 1e-3))
                TL_FAIL("step %lld p[%lld] = %.9g, torch %.9g", (long long)s + 1, (long long)i, p[i],
                        p_ref[s * n + i]);
    }
    /* the moments: m is a signed average (cancellation), so its error is measured against
     * its tensor's largest value; v is positive, so against itself */
    int64_t off = 0;
    for (int t = 0; t < 3; t++) {
        double mmax = 0;
        for (int64_t i = off; i < off + (int64_t)sz[t]; i++) mmax = fmax(mmax, fabs(m_ref[i]));
        for (int64_t i = off; i < off + (int64_t)sz[t]; i++) {
            ASSERT_NEAR(m[i], m_ref[i], 1e-6 * mmax);
            ASSERT_NEAR(v[i], v_ref[i], 1e-5 * v_ref[i]);
        }
        off += (int64_t)sz[t];
    }
    free(p);
    free(m);
    free(v);
    free(g);
out:
    free(hy), free(sz), free(wd), free(p0), free(gr), free(lr_ref), free(norm_ref), free(p_ref),
        free(m_ref), free(v_ref);
}

static void test_schedule(void) {
    dsmoe_adamw_config c;
    dsmoe_adamw_config_default(&c);
    c.lr = 1.0f;
    c.warmup_steps = 10;
    c.total_steps = 110;
    c.min_lr_ratio = 0.25f;
    ASSERT_NEAR(dsmoe_adamw_lr(&c, 1), 0.1, 1e-12);
    ASSERT_NEAR(dsmoe_adamw_lr(&c, 10), 1.0, 1e-12);
    ASSERT_NEAR(dsmoe_adamw_lr(&c, 60), 0.625, 1e-12); /* halfway down the cosine */
    ASSERT_NEAR(dsmoe_adamw_lr(&c, 110), 0.25, 1e-12);
    ASSERT_NEAR(dsmoe_adamw_lr(&c, 500), 0.25, 1e-12);
    for (int64_t t = 11; t < 110; t++) ASSERT_TRUE(dsmoe_adamw_lr(&c, t + 1) <= dsmoe_adamw_lr(&c, t));
    c.warmup_steps = 0;
    ASSERT_NEAR(dsmoe_adamw_lr(&c, 1), 0.25 + 0.75 * 0.5 * (1 + cos(3.14159265358979 / 110)), 1e-12);
}

static void test_clip_and_norm(void) {
    dsmoe_adamw_config c;
    dsmoe_adamw_config_default(&c);
    c.clip_norm = 2.0f;
    ASSERT_TRUE(dsmoe_adamw_clip_factor(&c, 1.0) == 1.0f);
    ASSERT_NEAR(dsmoe_adamw_clip_factor(&c, 8.0), 2.0 / (8.0 + 1e-6), 1e-7);
    c.clip_norm = 0;
    ASSERT_TRUE(dsmoe_adamw_clip_factor(&c, 1e9) == 1.0f);
    /* sums over 10,000 values span several blocks: exact for small integers */
    float *g = (float *)malloc(10000 * sizeof *g);
    double want = 0;
    for (int i = 0; i < 10000; i++) {
        g[i] = (float)(i % 7) - 3.0f;
        want += (double)g[i] * g[i];
    }
    ASSERT_TRUE(dsmoe_sum_squares(g, 10000, 1) == want);
    ASSERT_TRUE(dsmoe_sum_squares(g, 10000, 2) == want);
    ASSERT_TRUE(dsmoe_sum_squares(g, 0, 1) == 0.0);
    free(g);
    /* Blocks shared by the threads from 64 on: for sizes around that and the blocks,
     * exactly the blocks' float64 sums (4096 values each) added in block order. */
    const int64_t big = 64 * 4096 * 2 + 4096 * 5 + 11;
    g = (float *)malloc((size_t)big * sizeof *g);
    if (!g) abort();
    tl_seed(5);
    for (int64_t i = 0; i < big; i++) g[i] = (float)tl_normal();
    static const int64_t ns[] = {4096 * 8 - 1, 4096 * 8, 64 * 4096, 64 * 4096 + 1,
                                 64 * 4096 * 2 + 4096 * 5 + 11};
    for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++) {
        double ref = 0.0;
        for (int64_t b = 0; b < ns[k]; b += 4096) {
            double sb = 0.0;
            for (int64_t i = b; i < ns[k] && i < b + 4096; i++) sb += (double)g[i] * (double)g[i];
            ref += sb;
        }
        for (int t = 1; t <= 3; t++) ASSERT_TRUE(dsmoe_sum_squares(g, ns[k], t) == ref);
    }
    free(g);
    /* past one region's 4096 blocks: two rounds, the block order kept across them */
    const int64_t huge = (int64_t)4096 * 4096 + 4096 * 3 + 5;
    g = (float *)malloc((size_t)huge * sizeof *g);
    if (!g) abort();
    for (int64_t i = 0; i < huge; i++) g[i] = (float)((i * 7919) % 1001) * 0.001f - 0.5f;
    double ref = 0.0;
    for (int64_t b = 0; b < huge; b += 4096) {
        double sb = 0.0;
        for (int64_t i = b; i < huge && i < b + 4096; i++) sb += (double)g[i] * (double)g[i];
        ref += sb;
    }
    ASSERT_TRUE(dsmoe_sum_squares(g, huge, 1) == ref);
    ASSERT_TRUE(dsmoe_sum_squares(g, huge, 2) == ref);
    free(g);
}

/* dsmoe__sum_squares_each (the run's gradient norm): each segment's sum, whatever the
 * thread count, equal to the float64 block-order sum of that segment alone. */
static void test_sum_squares_each(void) {
    static const int64_t sizes[] = {1, 4095, 4097, 70000, 300001, 17, 262144};
    enum { NS = (int)(sizeof sizes / sizeof sizes[0]) };
    dsmoe__adamw_segment seg[NS];
    memset(seg, 0, sizeof seg);
    tl_seed(9);
    for (int j = 0; j < NS; j++) {
        float *g = (float *)malloc((size_t)sizes[j] * sizeof(float));
        if (!g) abort();
        for (int64_t i = 0; i < sizes[j]; i++) g[i] = (float)tl_normal();
        seg[j].g = g;
        seg[j].n = sizes[j];
    }
    for (int t = 1; t <= 3; t++) {
        double out[NS];
        dsmoe__sum_squares_each(seg, NS, out, t);
        for (int j = 0; j < NS; j++) {
            double want = 0.0;
            for (int64_t b = 0; b < sizes[j]; b += 4096) {
                double sb = 0.0;
                for (int64_t i = b; i < sizes[j] && i < b + 4096; i++)
                    sb += (double)seg[j].g[i] * (double)seg[j].g[i];
                want += sb;
            }
            ASSERT_TRUE(out[j] == want);
        }
    }
    for (int j = 0; j < NS; j++) free((void *)seg[j].g);
}

/* Threads do not change a bit; wd 0 leaves a zero-gradient parameter alone, wd > 0
 * shrinks it by exactly (1 − lr·wd). */
static void test_update_properties(void) {
    dsmoe_adamw_config c;
    dsmoe_adamw_config_default(&c);
    const int64_t n = 200003;
    float *p1 = (float *)malloc(n * sizeof(float)), *p2 = (float *)malloc(n * sizeof(float));
    float *m1 = (float *)calloc(n, sizeof(float)), *m2 = (float *)calloc(n, sizeof(float));
    float *v1 = (float *)calloc(n, sizeof(float)), *v2 = (float *)calloc(n, sizeof(float));
    float *g = (float *)malloc(n * sizeof(float));
    tl_seed(3);
    for (int64_t i = 0; i < n; i++) {
        p1[i] = p2[i] = (float)tl_normal();
        g[i] = (float)tl_normal();
    }
    for (int t = 1; t <= 3; t++) {
        dsmoe_adamw_update(&c, p1, m1, v1, g, n, t, 1e-3, 0.1, 0.5f, 1);
        dsmoe_adamw_update(&c, p2, m2, v2, g, n, t, 1e-3, 0.1, 0.5f, 2);
    }
    ASSERT_TRUE(memcmp(p1, p2, n * sizeof(float)) == 0 && memcmp(m1, m2, n * sizeof(float)) == 0 &&
                memcmp(v1, v2, n * sizeof(float)) == 0);
    /* the first step moves every parameter by lr (sign of g) up to eps, before decay */
    float p = 2.0f, m = 0, v = 0, gz = 0.0f;
    dsmoe_adamw_update(&c, &p, &m, &v, &gz, 1, 1, 0.01, 0.0, 1.0f, 1);
    ASSERT_TRUE(p == 2.0f);
    dsmoe_adamw_update(&c, &p, &m, &v, &gz, 1, 2, 0.01, 0.5, 1.0f, 1);
    ASSERT_TRUE(p == 2.0f * (float)(1.0 - 0.01 * 0.5));
    float q = 1.0f, gq = 3.0f;
    m = v = 0;
    dsmoe_adamw_update(&c, &q, &m, &v, &gq, 1, 1, 0.01, 0.0, 1.0f, 1);
    ASSERT_NEAR(q, 1.0 - 0.01, 1e-7);
    free(p1), free(p2), free(m1), free(m2), free(v1), free(v2), free(g);
}

/* The whole-model update (run.c: one parallel region over every trainable tensor) gives
 * the bits of dsmoe_adamw_update called per tensor (tested against torch above), with
 * and without weight decay per tensor, tensors of 1 to 200003 values, on 1 and 2
 * threads. */
static void test_update_all(void) {
    dsmoe_adamw_config c;
    dsmoe_adamw_config_default(&c);
    c.weight_decay = 0.3f;
    enum { NS = 6 };
    const int64_t ns[NS] = {256, 1, 200003, 70000, 16385, 3};
    const int dec[NS] = {0, 1, 1, 0, 1, 1};
    int64_t n = 0;
    for (int j = 0; j < NS; j++) n += ns[j];
    float *buf = (float *)malloc((size_t)n * 7 * sizeof(float));
    float *p1 = buf, *m1 = p1 + n, *v1 = m1 + n, *p2 = v1 + n, *m2 = p2 + n, *v2 = m2 + n,
          *g = v2 + n;
    tl_seed(5);
    for (int64_t i = 0; i < n; i++) {
        p1[i] = p2[i] = (float)tl_normal();
        m1[i] = m2[i] = v1[i] = v2[i] = 0.0f;
        g[i] = (float)tl_normal();
    }
    for (int nt = 1; nt <= 2; nt++) {
        for (int t = 1; t <= 3; t++) {
            dsmoe__adamw_segment seg[NS];
            int64_t o = 0;
            for (int j = 0; j < NS; j++) {
                dsmoe_adamw_update(&c, p1 + o, m1 + o, v1 + o, g + o, ns[j], t, 2e-3,
                                   dec[j] ? (double)c.weight_decay : 0.0, 0.5f, 1);
                seg[j] = (dsmoe__adamw_segment){p2 + o, m2 + o, v2 + o, g + o, ns[j], dec[j]};
                o += ns[j];
            }
            dsmoe__adamw_update_all(&c, seg, NS, t, 2e-3, 0.5f, nt);
        }
        ASSERT_TRUE(memcmp(p1, p2, (size_t)n * 3 * sizeof(float)) == 0);
    }
    free(buf);
}

/* Each bad field is refused with its name, one at a time. */
static void test_validate(void) {
    dsmoe_adamw_config c;
    for (int k = 0; k < 10; k++) {
        dsmoe_adamw_config_default(&c);
        const char *field = NULL;
        switch (k) {
        case 0: c.lr = 0, field = "lr"; break;
        case 1: c.lr = INFINITY, field = "lr"; break;
        case 2: c.beta1 = 1.0f, field = "beta1"; break;
        case 3: c.beta2 = -0.1f, field = "beta2"; break;
        case 4: c.eps = 0, field = "eps"; break;
        case 5: c.weight_decay = -1, field = "weight_decay"; break;
        case 6: c.clip_norm = NAN, field = "clip_norm"; break;
        case 7: c.total_steps = 0, c.warmup_steps = 0, field = "total_steps"; break;
        case 8: c.warmup_steps = 2000, field = "warmup_steps"; break;
        default: c.min_lr_ratio = 1.5f, field = "min_lr_ratio"; break;
        }
        ASSERT_STATUS(dsmoe_adamw_config_validate(&c), DSMOE_STATUS_INVALID_CONFIG);
        if (!strstr(dsmoe_last_error(), field)) TL_FAIL("message '%s' does not name %s", dsmoe_last_error(), field);
    }
    dsmoe_adamw_config_default(&c);
    ASSERT_OK(dsmoe_adamw_config_validate(&c));
    ASSERT_STATUS(dsmoe_adamw_config_validate(NULL), DSMOE_STATUS_INVALID_ARGUMENT);
}

int main(void) {
    RUN(test_against_torch);
    RUN(test_schedule);
    RUN(test_clip_and_norm);
    RUN(test_sum_squares_each);
    RUN(test_update_properties);
    RUN(test_update_all);
    RUN(test_validate);
    return TEST_SUMMARY();
}
