/*
 * test_softmax_scaled.c — attention's row softmax (kernels.h softmax_scaled), which the
 * training MLA calls once per query row in the forward and again in the backward:
 *   bits     every kernel set (ref, avx2, avx512 where the CPU has them) gives exactly
 *            the bits of the composition it replaces — scale each score, the set's
 *            softmax, zeros after n, lse = max − log(p[first argmax]) — and the scalar
 *            reference's bits, for every row length 1 .. 80 and a few long ones, every
 *            tail, rows with tied maxima and with exps that underflow to 0;
 *   float64  probabilities and log-sum-exp within a few ulps of a float64 softmax;
 *   bounds   nothing before the row or past len is written.
 */
#include "kernels/kernels.h"
#include "testlib.h"

/* The composition the kernel replaces (grad_mla.c's former softmax_row). */
static float composed(const dsmoe__kernel_table *k, float *p, int64_t n, int64_t len, float scale) {
    for (int64_t j = 0; j < n; j++) p[j] *= scale;
    float mx = p[0];
    for (int64_t j = 1; j < n; j++) mx = p[j] > mx ? p[j] : mx;
    int64_t am = 0;
    while (am < n - 1 && !(p[am] == mx)) am++;
    k->softmax(p, p, n);
    for (int64_t j = n; j < len; j++) p[j] = 0.0f;
    return mx - logf(p[am]);
}

/* Scores of one row: normal, spread by `spread`, with `ties` copies of the maximum. */
static void fill_row(float *p, int64_t len, double spread, int ties) {
    for (int64_t j = 0; j < len; j++) p[j] = (float)(spread * tl_normal());
    if (ties && len > 2) {
        float mx = p[0];
        for (int64_t j = 1; j < len; j++) mx = p[j] > mx ? p[j] : mx;
        for (int t = 0; t < ties; t++) p[(int64_t)(tl_uniform() * (double)len) % len] = mx;
    }
}

static void test_bits_and_float64(void) {
    tl_seed(41);
    static const char *const sets[] = {"ref", "avx2", "avx512"};
    static const double spreads[] = {0.5, 4.0, 60.0}; /* 60: most exps underflow to 0 */
    const dsmoe__kernel_table *ref = dsmoe__kernels_named("ref");
    int64_t lens[90];
    int nl = 0;
    for (int64_t n = 1; n <= 80; n++) lens[nl++] = n;
    lens[nl++] = 127, lens[nl++] = 128, lens[nl++] = 129, lens[nl++] = 255, lens[nl++] = 256,
    lens[nl++] = 257, lens[nl++] = 1000;
    int rows = 0, bad_comp = 0, bad_ref = 0, bad64 = 0, bad_bounds = 0;
    double worst = 0.0;
    for (int li = 0; li < nl; li++) {
        const int64_t n = lens[li], pad = (n * 7) % 19, len = n + pad;
        for (size_t sp = 0; sp < sizeof spreads / sizeof spreads[0]; sp++) {
            const float scale = (float)(0.05 + tl_uniform());
            float *row = (float *)malloc((size_t)len * sizeof(float));
            float *want = (float *)malloc((size_t)len * sizeof(float));
            float *rref = (float *)malloc((size_t)len * sizeof(float));
            float *got = (float *)tl_guarded_alloc((size_t)len * sizeof(float));
            if (!row || !want || !rref || !got) abort();
            fill_row(row, len, spreads[sp], (int)(sp + li) % 3);
            /* float64 softmax of the scaled (float) scores */
            double m64 = -INFINITY, s64 = 0.0;
            for (int64_t j = 0; j < n; j++) {
                const double x = (double)(row[j] * scale);
                m64 = x > m64 ? x : m64;
            }
            for (int64_t j = 0; j < n; j++) s64 += exp((double)(row[j] * scale) - m64);
            memcpy(rref, row, (size_t)len * sizeof(float));
            float lse_ref = 0.0f;
            ref->softmax_scaled(rref, n, len, scale, &lse_ref);
            for (size_t s = 0; s < sizeof sets / sizeof sets[0]; s++) {
                const dsmoe__kernel_table *k = dsmoe__kernels_named(sets[s]);
                if (!k) continue;
                memcpy(want, row, (size_t)len * sizeof(float));
                const float lse_want = composed(k, want, n, len, scale);
                memcpy(got, row, (size_t)len * sizeof(float));
                float lse = 0.0f;
                k->softmax_scaled(got, n, len, scale, &lse);
                rows++;
                if (memcmp(got, want, (size_t)len * sizeof(float)) != 0 ||
                    memcmp(&lse, &lse_want, sizeof lse) != 0) {
                    if (bad_comp++ < 5)
                        TL_FAIL("%s: n %lld len %lld spread %g: not the composition's bits "
                                "(lse %.9g vs %.9g)",
                                sets[s], (long long)n, (long long)len, spreads[sp], (double)lse,
                                (double)lse_want);
                }
                if (memcmp(got, rref, (size_t)len * sizeof(float)) != 0 ||
                    memcmp(&lse, &lse_ref, sizeof lse) != 0)
                    bad_ref++;
                bad_bounds += !tl_guard_ok(got);
                /* without lse: the same probabilities */
                memcpy(want, row, (size_t)len * sizeof(float));
                k->softmax_scaled(want, n, len, scale, NULL);
                bad_comp += memcmp(got, want, (size_t)len * sizeof(float)) != 0;
                for (int64_t j = 0; j < len; j++) {
                    const double p64 =
                        j < n ? exp((double)(row[j] * scale) - m64) / s64 : 0.0;
                    const double err = fabs((double)got[j] - p64);
                    worst = err / (p64 + 1e-37) > worst ? err / (p64 + 1e-37) : worst;
                    /* a few ulps, plus the rounding of x − max in float (relative
                     * |x − max|·2^-24 in the exp), plus exps below float's range */
                    const double d = j < n ? m64 - (double)(row[j] * scale) : 0.0;
                    bad64 += !(err <= (1e-6 + d * 0x1.0p-23) * p64 + 1e-37);
                }
                const double lse64 = m64 + log(s64);
                bad64 += !(fabs((double)lse - lse64) <= 1e-6 * (fabs(lse64) + 1.0));
            }
            free(row);
            free(want);
            free(rref);
            tl_guarded_free(got);
        }
    }
    tl_checks += 4;
    if (bad_ref) TL_FAIL("%d rows differ from the scalar reference's bits", bad_ref);
    if (bad64) TL_FAIL("%d values off the float64 softmax (worst relative %.3g)", bad64, worst);
    if (bad_bounds) TL_FAIL("%d rows wrote outside [0, len)", bad_bounds);
    if (rows < 3 * nl) TL_FAIL("only %d rows checked", rows);
    printf("  %d rows against the composition, the scalar bits and float64 (worst relative "
           "%.2g)\n",
           rows, worst);
}

int main(void) {
    RUN(test_bits_and_float64);
    return TEST_SUMMARY();
}
