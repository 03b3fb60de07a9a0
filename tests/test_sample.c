/*
 * test_sample.c — dsmoe_sample: greedy picks (ties to the lowest id), the sampled
 * frequencies against the exact softmax(l / temperature) probabilities and against the
 * renormalised nucleus (a chi-square bound over many draws), the nucleus set itself
 * (cut points between cumulative sums, ties at the cut, a tiny top_p), one rng draw per
 * call and reproducible seeds, a large vocabulary against a sort-based reference, and
 * the refusals (NaN, +Inf, all −Inf, bad V / top_p / temperature, NULL).
 */
#include "testlib.h"

#include <math.h>

#define MAXV 16

/* softmax(l / t) in fp64 (−Inf logits weigh 0). */
static void exact_probs(const float *l, int V, double t, double *p) {
    double m = -INFINITY, s = 0;
    for (int i = 0; i < V; i++)
        if (l[i] > m) m = l[i];
    for (int i = 0; i < V; i++) s += (p[i] = l[i] == -INFINITY ? 0.0 : exp((l[i] - m) / t));
    for (int i = 0; i < V; i++) p[i] /= s;
}

/* Draws N tokens into counts (V). */
static void draw(const float *l, int V, float t, float top_p, uint64_t seed, int N, long *counts) {
    float scratch[2 * MAXV];
    dsmoe_rng rng;
    dsmoe_rng_seed(&rng, seed);
    memset(counts, 0, sizeof(long) * (size_t)V);
    for (int k = 0; k < N; k++) {
        int32_t id = dsmoe_sample(l, V, t, top_p, &rng, scratch);
        if (id < 0 || id >= V) {
            TL_FAIL("draw %d: id %d (%s)", k, (int)id, dsmoe_last_error());
            return;
        }
        counts[id]++;
    }
}

/* Pearson's chi-square of counts against probabilities p (cells with p = 0 must be
 * empty); dof = cells with p > 0, minus one. The bounds below are far in the tail
 * (p < 1e-6 for the degrees of freedom used), so a correct sampler never fails them
 * for the fixed seeds, and a wrong probability of a few percent always does. */
static double chi2(const long *counts, const double *p, int V, int N, int *dof) {
    double x = 0;
    *dof = -1;
    for (int i = 0; i < V; i++) {
        if (p[i] == 0) {
            if (counts[i]) TL_FAIL("token %d (probability 0) drawn %ld times", i, counts[i]);
            continue;
        }
        double e = p[i] * N;
        x += (counts[i] - e) * (counts[i] - e) / e;
        (*dof)++;
    }
    return x;
}

static void test_greedy(void) {
    const float l[6] = {1.0f, 3.0f, -2.0f, 3.0f, -INFINITY, 3.0f};
    dsmoe_rng rng;
    dsmoe_rng_seed(&rng, 5);
    dsmoe_rng before = rng;
    ASSERT_EQ_INT(dsmoe_sample(l, 6, 0.0f, 1.0f, &rng, NULL), 1); /* ties: lowest id */
    ASSERT_EQ_INT(dsmoe_sample(l, 6, -1.0f, 0.5f, NULL, NULL), 1); /* rng, scratch unused */
    ASSERT_TRUE(rng.state == before.state);
    const float m[4] = {-INFINITY, -INFINITY, -7.0f, -INFINITY};
    ASSERT_EQ_INT(dsmoe_sample(m, 4, 0.0f, 1.0f, NULL, NULL), 2);
    const float one[1] = {-3.0f};
    ASSERT_EQ_INT(dsmoe_sample(one, 1, 0.0f, 1.0f, NULL, NULL), 0);
    /* the largest of many, at the end and at the start */
    float big[MAXV];
    for (int i = 0; i < MAXV; i++) big[i] = (float)i * 0.25f;
    ASSERT_EQ_INT(dsmoe_sample(big, MAXV, 0.0f, 1.0f, NULL, NULL), MAXV - 1);
    big[0] = 100.0f;
    ASSERT_EQ_INT(dsmoe_sample(big, MAXV, 0.0f, 1.0f, NULL, NULL), 0);
}

/* Frequencies at several temperatures, every token kept. */
static void test_temperature_statistics(void) {
    const float l[7] = {0.5f, 2.0f, -1.0f, 1.2f, 0.0f, 2.0f, -0.3f};
    const double temps[3] = {0.5, 1.0, 2.5};
    const int N = 200000;
    long counts[7];
    double p[7];
    for (int k = 0; k < 3; k++) {
        exact_probs(l, 7, temps[k], p);
        draw(l, 7, (float)temps[k], 1.0f, 100 + (uint64_t)k, N, counts);
        int dof;
        double x = chi2(counts, p, 7, N, &dof);
        ASSERT_EQ_INT(dof, 6);
        if (!(x < 40.0)) TL_FAIL("temperature %g: chi-square %.1f (6 dof) > 40", temps[k], x);
    }
    /* A wrong distribution fails the same bound: draws at t = 1 against t = 1.1. */
    exact_probs(l, 7, 1.1, p);
    draw(l, 7, 1.0f, 1.0f, 7, N, counts);
    int dof;
    ASSERT_TRUE(chi2(counts, p, 7, N, &dof) > 40.0);
}

/* The nucleus: with top_p between the k-th and (k+1)-th cumulative sums of the sorted
 * probabilities exactly the k most likely tokens are drawn, at their renormalised
 * probabilities. */
static void test_top_p_set(void) {
    const float l[8] = {0.1f, 1.7f, -0.4f, 1.1f, 0.9f, -2.0f, 2.3f, 0.3f};
    const int order[8] = {6, 1, 3, 4, 7, 0, 2, 5}; /* by descending logit */
    const double t = 0.8;
    double p[8], cum[9] = {0};
    exact_probs(l, 8, t, p);
    for (int k = 0; k < 8; k++) cum[k + 1] = cum[k] + p[order[k]];
    const int N = 100000;
    long counts[8];
    for (int k = 1; k <= 7; k++) {
        /* halfway between the sums of k − 1 and k tokens: the top k are kept */
        double top_p = 0.5 * (cum[k - 1] + cum[k]);
        draw(l, 8, (float)t, (float)top_p, 300 + (uint64_t)k, N, counts);
        double q[8] = {0};
        for (int j = 0; j < k; j++) q[order[j]] = p[order[j]] / cum[k];
        int dof;
        double x = chi2(counts, q, 8, N, &dof);
        ASSERT_EQ_INT(dof, k - 1);
        for (int j = 0; j < k; j++)
            if (!counts[order[j]]) TL_FAIL("top_p %g: kept token %d never drawn", top_p, order[j]);
        if (!(x < 45.0)) TL_FAIL("top_p %g (%d kept): chi-square %.1f > 45", top_p, k, x);
        /* just above the sum of k − 1 tokens still needs the k-th */
        if (k >= 2) {
            draw(l, 8, (float)t, (float)(cum[k - 1] * (1 + 1e-5)), 400 + (uint64_t)k, 20000, counts);
            for (int j = 0; j < 8; j++) {
                int kept = 0;
                for (int m = 0; m < k; m++) kept |= order[m] == j;
                if (!kept && counts[j]) TL_FAIL("top_p just above cum[%d]: token %d drawn", k - 1, j);
                if (kept && !counts[j]) TL_FAIL("top_p just above cum[%d]: token %d never drawn", k - 1, j);
            }
        }
    }
    /* top_p tiny: only the most likely token, in sampling mode too */
    draw(l, 8, (float)t, 1e-6f, 9, 1000, counts);
    ASSERT_EQ_INT(counts[6], 1000);
}

/* Equal probabilities at the cut: the lower ids are kept. */
static void test_top_p_ties(void) {
    const float l[5] = {1.0f, 3.0f, 3.0f, 0.0f, 3.0f};
    double p[5];
    exact_probs(l, 5, 1.0, p);
    /* 1.5 of the three tied tokens' probability: two of them (ids 1 and 2) are kept */
    const float top_p = (float)(1.5 * p[1]);
    long counts[5];
    draw(l, 5, 1.0f, top_p, 11, 20000, counts);
    ASSERT_TRUE(counts[1] > 0 && counts[2] > 0);
    ASSERT_EQ_INT(counts[0] + counts[3] + counts[4], 0);
    const double q[5] = {0, 0.5, 0.5, 0, 0};
    int dof;
    ASSERT_TRUE(chi2(counts, q, 5, 20000, &dof) < 30.0);
    /* Four equal logits weigh exactly 1 each: top_p 0.5 is reached by exactly two
     * tokens (the smallest set), so a third is never kept. */
    const float e[4] = {2.0f, 2.0f, 2.0f, 2.0f};
    long c4[4];
    draw(e, 4, 1.0f, 0.5f, 12, 20000, c4);
    ASSERT_TRUE(c4[0] > 0 && c4[1] > 0);
    ASSERT_EQ_INT(c4[2] + c4[3], 0);
}

/* −Inf logits are never drawn, even at a high temperature with everything kept. */
static void test_neg_inf(void) {
    const float l[6] = {-INFINITY, 0.0f, -INFINITY, -30.0f, 5.0f, -INFINITY};
    long counts[6];
    double p[6];
    draw(l, 6, 100.0f, 1.0f, 21, 50000, counts);
    ASSERT_EQ_INT(counts[0] + counts[2] + counts[5], 0);
    exact_probs(l, 6, 100.0, p);
    int dof;
    ASSERT_TRUE(chi2(counts, p, 6, 50000, &dof) < 35.0);
    draw(l, 6, 100.0f, 0.99f, 22, 50000, counts);
    ASSERT_EQ_INT(counts[0] + counts[2] + counts[5], 0);
}

/* One rng draw per call; the same seed, the same tokens; another seed, others. */
static void test_seeds(void) {
    float l[MAXV], scratch[2 * MAXV];
    for (int i = 0; i < MAXV; i++) l[i] = (float)sin(i * 1.3) * 2.0f;
    dsmoe_rng a, b, c;
    dsmoe_rng_seed(&a, 42);
    dsmoe_rng_seed(&b, 42);
    dsmoe_rng_seed(&c, 43);
    int same = 1, differ = 0;
    for (int k = 0; k < 200; k++) {
        dsmoe_rng one = a;
        (void)dsmoe_rng_uniform(&one);
        int32_t x = dsmoe_sample(l, MAXV, 1.3f, k % 2 ? 0.7f : 1.0f, &a, scratch);
        ASSERT_TRUE(a.state == one.state);
        int32_t y = dsmoe_sample(l, MAXV, 1.3f, k % 2 ? 0.7f : 1.0f, &b, scratch);
        int32_t z = dsmoe_sample(l, MAXV, 1.3f, k % 2 ? 0.7f : 1.0f, &c, scratch);
        same &= x == y;
        differ += x != z;
    }
    ASSERT_TRUE(same);
    ASSERT_TRUE(differ > 20);
}

/* A DeepSeek-V3-sized row against a reference that sorts the whole vocabulary. */
typedef struct {
    float w;
    int32_t id;
} wid;
static int wid_cmp(const void *x, const void *y) {
    const wid *a = (const wid *)x, *b = (const wid *)y;
    if (a->w != b->w) return a->w > b->w ? -1 : 1;
    return a->id < b->id ? -1 : 1;
}

static void test_large_vocab(void) {
    const int32_t V = 129280;
    float *l = (float *)malloc(sizeof(float) * V), *scratch = (float *)malloc(sizeof(float) * 2 * V);
    wid *ref = (wid *)malloc(sizeof(wid) * V);
    dsmoe_rng g;
    dsmoe_rng_seed(&g, 77);
    for (int32_t i = 0; i < V; i++) l[i] = (float)(3.0 * dsmoe_rng_normal(&g));
    l[5] = l[17] = l[99] = 14.0f; /* a tie at the top */
    const float temps[3] = {0.7f, 1.0f, 1.6f}, tops[3] = {0.5f, 0.9f, 1.0f};
    for (int c = 0; c < 9; c++) {
        const float t = temps[c / 3], top_p = tops[c % 3];
        float m = -INFINITY;
        for (int32_t i = 0; i < V; i++) m = l[i] > m ? l[i] : m;
        double total = 0;
        for (int32_t i = 0; i < V; i++) {
            ref[i].w = (float)exp(((double)l[i] - m) / t);
            ref[i].id = i;
            total += ref[i].w;
        }
        qsort(ref, (size_t)V, sizeof *ref, wid_cmp);
        int32_t kept = 0;
        double kept_sum = 0;
        if (top_p >= 1.0f) {
            kept = V;
            kept_sum = total;
        } else {
            while (kept < V && kept_sum < (double)top_p * total) kept_sum += ref[kept++].w;
        }
        dsmoe_rng rng;
        dsmoe_rng_seed(&rng, 1000 + (uint64_t)c);
        for (int k = 0; k < 50; k++) {
            dsmoe_rng copy = rng;
            const double target = dsmoe_rng_uniform(&copy) * kept_sum;
            int32_t id = dsmoe_sample(l, V, t, top_p, &rng, scratch);
            /* the token whose cumulative interval holds the target (in id order when
             * everything is kept, nucleus order otherwise; both orders give the same
             * token only up to rounding at interval ends, so check membership there) */
            int in = 0;
            for (int32_t j = 0; j < kept && !in; j++) in = ref[j].id == id;
            if (!in) TL_FAIL("case %d draw %d: token %d outside the nucleus of %d", c, k, id, kept);
            if (top_p < 1.0f) {
                double run = 0;
                int32_t want = ref[kept - 1].id;
                for (int32_t j = 0; j < kept; j++) {
                    run += ref[j].w;
                    if (target < run) {
                        want = ref[j].id;
                        break;
                    }
                }
                if (id != want) TL_FAIL("case %d draw %d: token %d, reference %d", c, k, id, want);
            }
        }
    }
    free(l);
    free(scratch);
    free(ref);
}

static void test_errors(void) {
    float l[4] = {0.0f, 1.0f, 2.0f, 3.0f}, scratch[8];
    dsmoe_rng rng;
    dsmoe_rng_seed(&rng, 1);
#define REFUSED(call, status, needle)                                                     \
    do {                                                                                  \
        dsmoe_clear_error();                                                              \
        dsmoe_rng before = rng;                                                           \
        int32_t r_ = (call);                                                              \
        ASSERT_EQ_INT(r_, -1);                                                            \
        if (!strstr(dsmoe_last_error(), dsmoe_status_name(status)))                       \
            TL_FAIL("%s: message '%s' lacks %s", #call, dsmoe_last_error(),               \
                    dsmoe_status_name(status));                                           \
        if (!strstr(dsmoe_last_error(), needle))                                          \
            TL_FAIL("%s: message '%s' lacks '%s'", #call, dsmoe_last_error(), needle);    \
        ASSERT_TRUE(rng.state == before.state);                                           \
    } while (0)
    REFUSED(dsmoe_sample(NULL, 4, 1.0f, 1.0f, &rng, scratch), DSMOE_STATUS_INVALID_ARGUMENT, "NULL");
    REFUSED(dsmoe_sample(l, 0, 1.0f, 1.0f, &rng, scratch), DSMOE_STATUS_INVALID_ARGUMENT, "V");
    REFUSED(dsmoe_sample(l, 4, 1.0f, 0.0f, &rng, scratch), DSMOE_STATUS_INVALID_ARGUMENT, "top_p");
    REFUSED(dsmoe_sample(l, 4, 1.0f, 1.5f, &rng, scratch), DSMOE_STATUS_INVALID_ARGUMENT, "top_p");
    REFUSED(dsmoe_sample(l, 4, 1.0f, NAN, &rng, scratch), DSMOE_STATUS_INVALID_ARGUMENT, "top_p");
    REFUSED(dsmoe_sample(l, 4, 0.0f, -0.5f, &rng, scratch), DSMOE_STATUS_INVALID_ARGUMENT, "top_p");
    REFUSED(dsmoe_sample(l, 4, NAN, 1.0f, &rng, scratch), DSMOE_STATUS_INVALID_ARGUMENT, "temperature");
    REFUSED(dsmoe_sample(l, 4, INFINITY, 1.0f, &rng, scratch), DSMOE_STATUS_INVALID_ARGUMENT,
            "temperature");
    REFUSED(dsmoe_sample(l, 4, 1.0f, 1.0f, NULL, scratch), DSMOE_STATUS_INVALID_ARGUMENT, "rng");
    REFUSED(dsmoe_sample(l, 4, 1.0f, 1.0f, &rng, NULL), DSMOE_STATUS_INVALID_ARGUMENT, "scratch");
    l[2] = NAN;
    REFUSED(dsmoe_sample(l, 4, 1.0f, 1.0f, &rng, scratch), DSMOE_STATUS_NON_FINITE, "logit 2 is NaN");
    REFUSED(dsmoe_sample(l, 4, 0.0f, 1.0f, &rng, scratch), DSMOE_STATUS_NON_FINITE, "logit 2 is NaN");
    l[2] = INFINITY;
    REFUSED(dsmoe_sample(l, 4, 1.0f, 0.9f, &rng, scratch), DSMOE_STATUS_NON_FINITE, "logit 2 is +Inf");
    REFUSED(dsmoe_sample(l, 4, 0.0f, 1.0f, &rng, scratch), DSMOE_STATUS_NON_FINITE, "logit 2 is +Inf");
    for (int i = 0; i < 4; i++) l[i] = -INFINITY;
    REFUSED(dsmoe_sample(l, 4, 1.0f, 1.0f, &rng, scratch), DSMOE_STATUS_NON_FINITE, "-Inf");
    REFUSED(dsmoe_sample(l, 4, 0.0f, 1.0f, &rng, scratch), DSMOE_STATUS_NON_FINITE, "-Inf");
#undef REFUSED
}

int main(void) {
    RUN(test_greedy);
    RUN(test_temperature_statistics);
    RUN(test_top_p_set);
    RUN(test_top_p_ties);
    RUN(test_neg_inf);
    RUN(test_seeds);
    RUN(test_large_vocab);
    RUN(test_errors);
    return TEST_SUMMARY();
}
