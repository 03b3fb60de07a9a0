/*
 * test_simd_select.c — the fused group-limited selection kernel (select_grouped)
 * against the composition of the scalar reference kernels it replaces: group
 * scores, the TG best groups, then the K best experts of the kept groups.
 *
 * Thousands of random shapes (2..8 groups, group sizes 8..256, m = 1 and 2, every
 * TG and K it accepts) and value patterns chosen to stress its shortcuts: smooth
 * random values, heavy ties (a handful of distinct values, so the candidate pass
 * overflows 16 lanes and the fallbacks run), tied group scores, all-equal rows,
 * and negative values. Ids must match exactly and values bit for bit. Shapes the
 * kernel does not cover must return 0 and leave the outputs untouched.
 */
#include "kernels/kernels.h"
#include "testlib.h"

enum { MAXE = 8 * 256 };

static void fill(float *c, int32_t E, int32_t gsize, int pattern) {
    switch (pattern) {
    case 0: /* smooth: sigmoid-like scores plus a small bias */
        for (int32_t e = 0; e < E; e++) c[e] = (float)(1.0 / (1.0 + exp(-3.0 * tl_normal())) + 0.01 * tl_normal());
        break;
    case 1: /* heavy ties: four distinct values */
        for (int32_t e = 0; e < E; e++) c[e] = 0.25f * (float)(tl_next() % 4);
        break;
    case 2: /* every group a copy of the first: tied group scores */
        for (int32_t e = 0; e < gsize; e++) c[e] = (float)tl_normal();
        for (int32_t e = gsize; e < E; e++) c[e] = c[e % gsize];
        break;
    case 3: /* all equal */
        for (int32_t e = 0; e < E; e++) c[e] = 0.5f;
        break;
    default: /* negative, wide range, a few exact duplicates */
        for (int32_t e = 0; e < E; e++) c[e] = (float)(-10.0 + 3.0 * tl_normal());
        for (int32_t i = 0; i < E / 8; i++) c[tl_next() % (uint64_t)E] = c[tl_next() % (uint64_t)E];
        break;
    }
}

/* The reference composition, as route_token runs it without the fused kernel. */
static void reference(int32_t *ids, float *val, const float *c, int32_t G, int32_t gsize, int32_t m,
                      int32_t TG, int32_t K) {
    float gs[8], sv[MAXE + 16], tv[8];
    int32_t si[MAXE + 16], ti[8], gl[8];
    dsmoe__group_scores_ref(gs, c, G, gsize, m, sv, si);
    dsmoe__topk_ref(ti, tv, gs, G, TG, sv, si);
    uint8_t keep[8] = {0};
    for (int32_t j = 0; j < TG; j++) keep[ti[j]] = 1;
    int32_t ng = 0;
    for (int32_t g = 0; g < G; g++)
        if (keep[g]) gl[ng++] = g;
    dsmoe__topk_blocks_ref(ids, val, c, gsize, gl, ng, K, sv, si);
}

static void test_select_matches_reference(void) {
    const char *names[2] = {"avx2", "avx512"};
    static float c[MAXE];
    int tested = 0;
    for (int ni = 0; ni < 2; ni++) {
        const dsmoe__kernel_table *k = dsmoe__kernels_named(names[ni]);
        if (!k || !k->select_grouped) continue;
        tl_seed(7000 + (uint64_t)ni);
        int bad = 0;
        for (int it = 0; it < 6000 && bad < 5; it++) {
            const int32_t G = 2 + (int32_t)(tl_next() % 7);
            /* group sizes in steps of 8 (AVX2 covers those; AVX-512 steps of 16) */
            const int32_t V8 = it % 10 == 0 ? 32 : 1 + (int32_t)(tl_next() % 8);
            const int32_t gsize = 8 * V8, E = G * gsize;
            const int covered = gsize % (ni == 0 ? 8 : 16) == 0;
            const int32_t m = 1 + (int32_t)(tl_next() % 2);
            const int32_t TG = 1 + (int32_t)(tl_next() % (uint64_t)G);
            int32_t kmax = TG * gsize < 16 ? TG * gsize : 16;
            /* V3's K = 2·TG takes the top-2 threshold: make it common */
            int32_t K = (tl_next() % 2 && 2 * TG <= kmax) ? 2 * TG : 1 + (int32_t)(tl_next() % (uint64_t)kmax);
            const int pattern = (int)(tl_next() % 5);
            fill(c, E, gsize, pattern);
            int32_t ids0[16], ids1[16];
            float v0[16], v1[16];
            reference(ids0, v0, c, G, gsize, m, TG, K);
            tl_checks++;
            if (!k->select_grouped(ids1, v1, c, 1, G, gsize, m, TG, K)) {
                if (covered) {
                    TL_FAIL("%s: shape G %d gsize %d m %d TG %d K %d refused", names[ni], (int)G,
                            (int)gsize, (int)m, (int)TG, (int)K);
                    bad++;
                }
                continue;
            }
            tested++;
            for (int32_t j = 0; j < K; j++) {
                if (ids0[j] != ids1[j] || memcmp(&v0[j], &v1[j], 4) != 0) {
                    TL_FAIL("%s: G %d gsize %d m %d TG %d K %d pattern %d: slot %d is expert %d "
                            "(%.9g), reference %d (%.9g)",
                            names[ni], (int)G, (int)gsize, (int)m, (int)TG, (int)K, pattern, (int)j,
                            (int)ids1[j], (double)v1[j], (int)ids0[j], (double)v0[j]);
                    bad++;
                    break;
                }
            }
        }
    }
    fprintf(stderr, "  %d fused selections compared\n", tested);
}

/* Rows of at most 16 experts (the small presets' G·gsize <= 16: 16 experts in 4 groups
 * of 4, 8 in 2 of 4, ...): every shape (2..8 groups, every group size that fits, m = 1
 * and 2 up to the group size, every TG and K), each value pattern, several tokens per
 * call, against the reference token by token. */
static void test_select_small_rows(void) {
    const dsmoe__kernel_table *k = dsmoe__kernels_named("avx512");
    if (!k || !k->select_grouped) return;
    tl_seed(7100);
    static float c[8 * 16];
    int tested = 0, bad = 0;
    for (int32_t G = 2; G <= 8 && bad < 5; G++)
        for (int32_t gsize = 1; G * gsize <= 16 && bad < 5; gsize++)
            for (int32_t m = 1; m <= 2 && m <= gsize; m++)
                for (int32_t TG = 1; TG <= G; TG++)
                    for (int32_t K = 1; K <= TG * gsize; K++)
                        for (int pattern = 0; pattern < 5; pattern++) {
                            const int32_t E = G * gsize, n = 1 + (int32_t)(tl_next() % 8);
                            for (int32_t t = 0; t < n; t++) fill(c + (size_t)t * (size_t)E, E, gsize, pattern);
                            int32_t ids[8 * 16], ids0[16];
                            float v[8 * 16], v0[16];
                            tl_checks++;
                            if (!k->select_grouped(ids, v, c, n, G, gsize, m, TG, K)) {
                                TL_FAIL("avx512: small shape G %d gsize %d m %d TG %d K %d refused",
                                        (int)G, (int)gsize, (int)m, (int)TG, (int)K);
                                bad++;
                                continue;
                            }
                            tested++;
                            for (int32_t t = 0; t < n; t++) {
                                reference(ids0, v0, c + (size_t)t * (size_t)E, G, gsize, m, TG, K);
                                for (int32_t j = 0; j < K; j++)
                                    if (ids0[j] != ids[t * K + j] || memcmp(&v0[j], &v[t * K + j], 4) != 0) {
                                        TL_FAIL("avx512: G %d gsize %d m %d TG %d K %d pattern %d "
                                                "token %d: slot %d is expert %d, reference %d",
                                                (int)G, (int)gsize, (int)m, (int)TG, (int)K, pattern,
                                                (int)t, (int)j, (int)ids[t * K + j], (int)ids0[j]);
                                        bad++;
                                        t = n;
                                        break;
                                    }
                            }
                        }
    ASSERT_TRUE(tested > 1000);
    fprintf(stderr, "  %d small-row selections compared\n", tested);
}

/* Many tokens per call: the AVX-512 kernel takes blocks of 16 tokens into lanes for
 * m = 2, K = 2·TG <= 8 (DeepSeek-V3's shape among them), the rest one or two at a time.
 * Token counts around multiples of 16, every token its own value pattern (so that one
 * block mixes tokens with few candidates, tokens whose candidates overflow 16 lanes,
 * tied group scores and negative rows), each token compared with the reference. */
static void test_select_many_tokens(void) {
    const char *names[2] = {"avx2", "avx512"};
    enum { NMAX = 53 };
    static float c[NMAX * MAXE];
    static int32_t ids[NMAX * 16];
    static float val[NMAX * 16];
    const int32_t counts[] = {1, 2, 15, 16, 17, 31, 32, 33, 48, 53};
    int tested = 0;
    for (int ni = 0; ni < 2; ni++) {
        const dsmoe__kernel_table *k = dsmoe__kernels_named(names[ni]);
        if (!k || !k->select_grouped) continue;
        tl_seed(9100 + (uint64_t)ni);
        int bad = 0;
        for (int it = 0; it < 400 && bad < 5; it++) {
            const int32_t G = it % 4 == 0 ? 8 : 2 + (int32_t)(tl_next() % 7);
            const int32_t gsize = it % 4 == 0 ? 32 : 16 * (1 + (int32_t)(tl_next() % 4)), E = G * gsize;
            const int32_t m = it % 8 == 7 ? 1 : 2;
            const int32_t TG = it % 4 == 0 ? 4 : 1 + (int32_t)(tl_next() % (uint64_t)(G < 4 ? G : 4));
            const int32_t K = it % 8 == 5 ? 1 + (int32_t)(tl_next() % 8) : 2 * TG;
            const int32_t n = counts[it % (int)(sizeof counts / sizeof counts[0])];
            for (int32_t t = 0; t < n; t++) {
                /* mostly smooth rows (the block path), some of each other pattern */
                const uint64_t r = tl_next() % 10;
                fill(c + (size_t)t * (size_t)E, E, gsize, r < 6 ? 0 : (int)(r - 5));
            }
            ASSERT_EQ_INT(k->select_grouped(ids, val, c, n, G, gsize, m, TG, K), 1);
            for (int32_t t = 0; t < n && bad < 5; t++) {
                int32_t ids0[16];
                float v0[16];
                reference(ids0, v0, c + (size_t)t * (size_t)E, G, gsize, m, TG, K);
                tl_checks++;
                tested++;
                for (int32_t j = 0; j < K; j++) {
                    const int32_t got = ids[(size_t)t * (size_t)K + (size_t)j];
                    const float gv = val[(size_t)t * (size_t)K + (size_t)j];
                    if (got != ids0[j] || memcmp(&gv, &v0[j], 4) != 0) {
                        TL_FAIL("%s: n %d token %d, G %d gsize %d m %d TG %d K %d: slot %d is "
                                "expert %d (%.9g), reference %d (%.9g)",
                                names[ni], (int)n, (int)t, (int)G, (int)gsize, (int)m, (int)TG,
                                (int)K, (int)j, (int)got, (double)gv, (int)ids0[j], (double)v0[j]);
                        bad++;
                        break;
                    }
                }
            }
        }
    }
    fprintf(stderr, "  %d tokens of multi-token selections compared\n", tested);
}

/* Shapes outside the kernel's cover: 0, outputs untouched. */
static void test_select_refuses(void) {
    static float c[16 * 300];
    for (int i = 0; i < 16 * 300; i++) c[i] = (float)i;
    struct {
        int32_t G, gsize, m, TG, K;
    } cases[] = {
        {1, 64, 2, 1, 6},   /* one group */
        {9, 16, 2, 4, 8},   /* more than 8 groups */
        {8, 20, 2, 3, 6},   /* group size not a multiple of 8 */
        {4, 272, 2, 2, 8},  /* group size over 256 */
        {8, 32, 3, 4, 8},   /* top-3 group score */
        {8, 32, 2, 4, 17},  /* K over 16 */
        {8, 32, 2, 9, 8},   /* TG > G */
        {8, 32, 2, 0, 8},   /* TG = 0 */
        {2, 16, 2, 1, 17},  /* K over the candidates */
        {4, 4, 2, 2, 9},    /* K over the candidates of a row of 16 */
        {4, 1, 2, 2, 2},    /* top-2 group score of groups of one */
        {4, 4, 2, 0, 2},    /* TG = 0, a row of 16 */
    };
    const char *names[2] = {"avx2", "avx512"};
    for (int ni = 0; ni < 2; ni++) {
        const dsmoe__kernel_table *k = dsmoe__kernels_named(names[ni]);
        if (!k || !k->select_grouped) continue;
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            int32_t ids[32];
            float v[32];
            memset(ids, 0x5a, sizeof ids);
            memset(v, 0x5a, sizeof v);
            ASSERT_EQ_INT(k->select_grouped(ids, v, c, 1, cases[i].G, cases[i].gsize, cases[i].m,
                                            cases[i].TG, cases[i].K),
                          0);
            for (int j = 0; j < 32; j++) {
                uint32_t w;
                memcpy(&w, &v[j], 4);
                ASSERT_EQ_INT((uint32_t)ids[j], 0x5a5a5a5au);
                ASSERT_EQ_INT(w, 0x5a5a5a5au);
            }
        }
    }
}

int main(void) {
    RUN(test_select_matches_reference);
    RUN(test_select_small_rows);
    RUN(test_select_many_tokens);
    RUN(test_select_refuses);
    return TEST_SUMMARY();
}
