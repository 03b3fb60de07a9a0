/*
 * test_optim_bits.c — the bits of the optimizer's loops (src/train/optim.c) against plain
 * scalar references written here: dsmoe_sum_squares sums blocks of 4096 in index order
 * (whatever the loop's interleaving of blocks), and dsmoe_adamw_update's vector lanes
 * give the scalar formula's bits, on every length and alignment around the lane width.
 */
#include "train/train_internal.h"
#include "testlib.h"

#include <math.h>

/* The documented order: each block of 4096 summed in index order from 0, then the
 * blocks' sums added to the total in index order. */
static double ref_sum_squares(const float *g, int64_t n) {
    double total = 0.0;
    for (int64_t b = 0; b < n; b += 4096) {
        double s = 0.0;
        for (int64_t i = b; i < n && i < b + 4096; i++) s += (double)g[i] * (double)g[i];
        total += s;
    }
    return total;
}

/* Values whose squares do not add exactly, so that any other order shows. */
static void test_sum_squares_order(void) {
    const int64_t ns[] = {0, 1, 4095, 4096, 4097, 16383, 16384, 16385, 32768 + 3 * 4096 + 11, 100003};
    const int64_t nmax = 100003;
    float *g = (float *)malloc((size_t)nmax * sizeof *g);
    tl_seed(11);
    for (int64_t i = 0; i < nmax; i++) g[i] = (float)(tl_normal() * exp(4.0 * tl_uniform()));
    for (size_t j = 0; j < sizeof ns / sizeof ns[0]; j++)
        for (int off = 0; off < 2; off++) {
            const int64_t n = ns[j] - off > 0 ? ns[j] - off : 0;
            const double want = ref_sum_squares(g + off, n);
            for (int nt = 1; nt <= 2; nt++) {
                const double got = dsmoe_sum_squares(g + off, n, nt);
                if (memcmp(&got, &want, sizeof got) != 0)
                    TL_FAIL("n = %lld, offset %d, %d threads: %.17g, want %.17g", (long long)n, off,
                            nt, got, want);
            }
        }
    free(g);
}

/* The scalar AdamW step, with the constants computed as the implementation computes them. */
static void ref_adamw(const dsmoe_adamw_config *c, float *p, float *m, float *v, const float *g,
                      int64_t n, int64_t t, double lr, double wd, float grad_scale) {
    const float decay = (float)(1.0 - lr * wd), b1 = c->beta1, b2 = c->beta2,
                a1 = (float)(1.0 - c->beta1), a2 = (float)(1.0 - c->beta2), eps = c->eps;
    const double bc1 = 1.0 - pow((double)c->beta1, (double)t),
                 bc2 = 1.0 - pow((double)c->beta2, (double)t);
    const float step = (float)(lr / bc1), bc2s = (float)sqrt(bc2);
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i] * grad_scale;
        float pi = p[i] * decay;
        float mi = m[i] * b1 + a1 * gi;
        float vi = v[i] * b2 + (a2 * gi) * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi + (-step * mi) / (sqrtf(vi) / bc2s + eps);
    }
}

/* Every length from 1 to 37 at four alignments, with and without weight decay, gradients
 * from tiny (eps matters) to large, three steps; then one long tensor on 2 threads. */
static void test_adamw_lanes(void) {
    dsmoe_adamw_config c;
    dsmoe_adamw_config_default(&c);
    enum { NMAX = 40 + 70001 };
    float *buf = (float *)malloc((size_t)NMAX * 7 * sizeof(float));
    float *p1 = buf, *m1 = p1 + NMAX, *v1 = m1 + NMAX, *p2 = v1 + NMAX, *m2 = p2 + NMAX,
          *v2 = m2 + NMAX, *g = v2 + NMAX;
    tl_seed(3);
    for (int64_t i = 0; i < NMAX; i++) g[i] = (float)(tl_normal() * exp(-12.0 * tl_uniform()));
    for (int64_t n = 1; n <= 37; n++)
        for (int off = 0; off < 4; off++)
            for (int d = 0; d < 2; d++) {
                for (int64_t i = 0; i < NMAX; i++) {
                    p1[i] = p2[i] = (float)(i % 13) * 0.25f - 1.5f;
                    m1[i] = m2[i] = v1[i] = v2[i] = 0.0f;
                }
                for (int64_t t = 1; t <= 3; t++) {
                    const double wd = d ? 0.1 : 0.0;
                    dsmoe_adamw_update(&c, p1 + off, m1 + off, v1 + off, g + off + t, n, t, 3e-3,
                                       wd, 0.7f, 1);
                    ref_adamw(&c, p2 + off, m2 + off, v2 + off, g + off + t, n, t, 3e-3, wd, 0.7f);
                }
                if (memcmp(p1, p2, (size_t)NMAX * 3 * sizeof(float)) != 0)
                    TL_FAIL("n = %lld, offset %d, wd %d: the bits differ from the scalar formula",
                            (long long)n, off, d);
            }
    const int64_t n = 70001;
    for (int64_t i = 0; i < NMAX; i++) {
        p1[i] = p2[i] = (float)tl_normal();
        m1[i] = m2[i] = v1[i] = v2[i] = 0.0f;
    }
    for (int64_t t = 1; t <= 2; t++) {
        dsmoe_adamw_update(&c, p1 + 1, m1 + 1, v1 + 1, g + 3, n, t, 1e-3, 0.05, 1.0f, 2);
        ref_adamw(&c, p2 + 1, m2 + 1, v2 + 1, g + 3, n, t, 1e-3, 0.05, 1.0f);
    }
    ASSERT_TRUE(memcmp(p1, p2, (size_t)NMAX * 3 * sizeof(float)) == 0);
    free(buf);
}

int main(void) {
    RUN(test_sum_squares_order);
    RUN(test_adamw_lanes);
    return TEST_SUMMARY();
}
