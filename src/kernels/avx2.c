/* avx2.c — AVX2 + FMA kernels (8 lanes); bodies in simd_body.h. Compiled with
 * -mavx2 -mfma only; called only when the CPU reports AVX2 and FMA. */
#include "kernels.h"

#include <immintrin.h>

#define VF __m256
#define VI __m256i
#define W 8
#define SFX _avx2
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_STORE(p, v) _mm256_storeu_ps((p), (v))
#define V_SET1(x) _mm256_set1_ps(x)
#define V_ADD _mm256_add_ps
#define V_SUB _mm256_sub_ps
#define V_MUL _mm256_mul_ps
#define V_DIV _mm256_div_ps
#define V_FMA _mm256_fmadd_ps
#define V_MIN _mm256_min_ps
#define V_MAX _mm256_max_ps
#define V_RINT(x) _mm256_round_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define V_CVT_I _mm256_cvtps_epi32
#define V_I_SRAI1(v) _mm256_srai_epi32((v), 1)
#define V_I_SUB _mm256_sub_epi32
#define V_I_SET1 _mm256_set1_epi32
#define V_I_AND _mm256_and_si256
#define V_I_MAXU _mm256_max_epu32
#define V_CAST_I _mm256_castps_si256
#define V_I_STORE(p, v) _mm256_storeu_si256((__m256i *)(void *)(p), (v))
#define V_I_EXP2(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32((n), _mm256_set1_epi32(127)), 23))
#define V_SEL_GT(x, t, a, b) _mm256_blendv_ps((a), (b), _mm256_cmp_ps((x), (t), _CMP_GT_OQ))
#define V_SEL_LT(x, t, a, b) _mm256_blendv_ps((a), (b), _mm256_cmp_ps((x), (t), _CMP_LT_OQ))
#define V_NEG(x) _mm256_xor_ps((x), _mm256_set1_ps(-0.0f))
#define V_LOAD_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)(p))), 16))

#include "simd_body.h"

/* Selection kernels (same algorithms as avx512.c, 8 lanes). */
static inline float hmax8(__m256 x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static void group_scores_avx2(float *gs, const float *c, int32_t G, int32_t gsize, int32_t m,
                              float *sv, int32_t *si) {
    if ((m != 1 && m != 2) || gsize % 8 != 0) {
        dsmoe__group_scores_ref(gs, c, G, gsize, m, sv, si);
        return;
    }
    const int32_t V = gsize / 8;
    for (int32_t g = 0; g < G; g++) {
        const float *cg = c + (size_t)g * (size_t)gsize;
        __m256 hi = _mm256_loadu_ps(cg);
        if (m == 1) {
            for (int32_t j = 1; j < V; j++) hi = _mm256_max_ps(hi, _mm256_loadu_ps(cg + 8 * j));
            gs[g] = hmax8(hi);
            continue;
        }
        __m256 lo;
        hi = lane_top2_avx2(cg, V, &lo);
        float top1 = hmax8(hi);
        int eq = _mm256_movemask_ps(_mm256_cmp_ps(hi, _mm256_set1_ps(top1), _CMP_EQ_OQ));
        int lane = __builtin_ctz((unsigned)eq);
        float h[8], l[8];
        _mm256_storeu_ps(h, hi);
        _mm256_storeu_ps(l, lo);
        h[lane] = l[lane];
        float top2 = hmax8(_mm256_loadu_ps(h));
        gs[g] = top1 + top2;
    }
}

static void topk_avx2(int32_t *pos, float *val, const float *v, int32_t n, int32_t K, float *sv,
                      int32_t *si) {
    if (K < 1 || K > 8 || n < 16 || n % 8 != 0) {
        dsmoe__topk_ref(pos, val, v, n, K, sv, si);
        return;
    }
    const int32_t V = n / 8;
    __m256 mx = _mm256_loadu_ps(v);
    for (int32_t j = 1; j < V; j++) mx = _mm256_max_ps(mx, _mm256_loadu_ps(v + 8 * j));
    float lm[8], tv[8] = {0};
    int32_t ti[8], len = 0;
    _mm256_storeu_ps(lm, mx);
    for (int32_t i = 0; i < 8; i++) dsmoe__topk_push(tv, ti, &len, K, lm[i], i);
    const __m256 t = _mm256_set1_ps(tv[K - 1]);
    int32_t cnt = 0;
    for (int32_t j = 0; j < V; j++) {
        unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + 8 * j), t, _CMP_GE_OQ));
        while (bits) {
            int b = __builtin_ctz(bits);
            sv[cnt] = v[8 * j + b];
            si[cnt] = 8 * j + b;
            cnt++;
            bits &= bits - 1;
        }
    }
    len = 0;
    for (int32_t i = 0; i < cnt; i++) dsmoe__topk_push(val, pos, &len, K, sv[i], si[i]);
}

static void topk_blocks_avx2(int32_t *ids, float *val, const float *v, int32_t gsize,
                             const int32_t *groups, int32_t ng, int32_t K, float *sv, int32_t *si) {
    const int32_t n = ng * gsize;
    if (K < 1 || K > 8 || gsize % 8 != 0 || n < 16) {
        dsmoe__topk_blocks_ref(ids, val, v, gsize, groups, ng, K, sv, si);
        return;
    }
    const int32_t V = gsize / 8;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int32_t q = 0; q < ng; q++) {
        const float *b = v + (size_t)groups[q] * (size_t)gsize;
        for (int32_t j = 0; j < V; j++) mx = _mm256_max_ps(mx, _mm256_loadu_ps(b + 8 * j));
    }
    float lm[8], tv[8] = {0};
    int32_t ti[8], len = 0;
    _mm256_storeu_ps(lm, mx);
    for (int32_t i = 0; i < 8; i++) dsmoe__topk_push(tv, ti, &len, K, lm[i], i);
    const __m256 t = _mm256_set1_ps(tv[K - 1]);
    int32_t cnt = 0;
    for (int32_t q = 0; q < ng; q++) {
        const int32_t e0 = groups[q] * gsize;
        for (int32_t j = 0; j < V; j++) {
            unsigned bits = (unsigned)_mm256_movemask_ps(
                _mm256_cmp_ps(_mm256_loadu_ps(v + e0 + 8 * j), t, _CMP_GE_OQ));
            while (bits) {
                int b = __builtin_ctz(bits);
                sv[cnt] = v[e0 + 8 * j + b];
                si[cnt] = e0 + 8 * j + b;
                cnt++;
                bits &= bits - 1;
            }
        }
    }
    len = 0;
    for (int32_t i = 0; i < cnt; i++) dsmoe__topk_push(val, ids, &len, K, sv[i], si[i]);
}

static int any_nonfinite_avx2(const float *x, int64_t n) {
    const __m256i expo = _mm256_set1_epi32(0x7f800000);
    __m256i bad = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i b = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(const void *)(x + i)), expo);
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(b, expo));
    }
    int any = !_mm256_testz_si256(bad, bad);
    for (; i < n; i++) any |= !isfinite(x[i]);
    return any;
}

/* ------------------------------------------------- fused group-limited selection -- */

/* The AVX2 form of select_grouped_avx512 for 2 <= G <= 8 groups of 8·V (V <= 32) experts,
 * m = 1 or 2, K <= 16: the groups' top-2 pairs by the same butterfly on 8 lanes, the
 * groups ranked by counting; with K = 2·TG and m = 2 the candidates at or above the least
 * second-best value of a kept group (about ten) are collected in increasing id and
 * inserted as the reference does; otherwise all the kept groups' experts are. */
static int select_grouped_avx2(int32_t *ids, float *val, const float *c, int64_t n, int32_t G,
                               int32_t gsize, int32_t m, int32_t TG, int32_t K) {
    if (G < 2 || G > 8 || gsize % 8 != 0 || gsize > 256 || (m != 1 && m != 2) || K > 16 ||
        TG < 1 || TG > G || K < 1 || K > TG * gsize)
        return 0;
    const int32_t V = gsize / 8;
    const size_t E = (size_t)G * (size_t)gsize;
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t t = 0; t < n; t++) {
        const float *ct = c + (size_t)t * E;
        int32_t *it = ids + (size_t)t * (size_t)K;
        float *vt = val + (size_t)t * (size_t)K;
        __m256 h[8], l[8];
        for (int32_t g = 0; g < 8; g++) {
            h[g] = ninf;
            l[g] = ninf;
        }
        for (int32_t g = 0; g < G; g++) {
            h[g] = lane_top2_avx2(ct + (size_t)g * (size_t)gsize, V, &l[g]);
        }
        __m256 ph[4], pl[4], qh[2], ql[2], sh, sl;
        for (int p = 0; p < 4; p++) /* group 2p: lanes 0-3, 2p+1: 4-7 */
            SEL_LEVEL(_mm256_permute2f128_ps, 0x20, 0x31, h[2 * p], l[2 * p], h[2 * p + 1],
                       l[2 * p + 1], ph[p], pl[p]);
        for (int p = 0; p < 2; p++) /* lanes: g4p, g4p, g4p+2, g4p+2 | g4p+1, g4p+1, g4p+3, g4p+3 */
            SEL_LEVEL(_mm256_shuffle_ps, _MM_SHUFFLE(1, 0, 1, 0), _MM_SHUFFLE(3, 2, 3, 2), ph[2 * p],
                       pl[2 * p], ph[2 * p + 1], pl[2 * p + 1], qh[p], ql[p]);
        /* lanes: g0, g2, g4, g6 | g1, g3, g5, g7 */
        SEL_LEVEL(_mm256_shuffle_ps, _MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1), qh[0], ql[0],
                   qh[1], ql[1], sh, sl);
        const __m256 t1 = _mm256_permutevar8x32_ps(sh, order); /* lane g <- group g */
        const __m256 t2 = _mm256_permutevar8x32_ps(sl, order);
        const __m256 gs = m == 2 ? _mm256_add_ps(t1, t2) : t1;
        /* rank of each group: the groups that beat it (larger, or equal and lower id) */
        float pg[8];
        _mm256_storeu_ps(pg, gs);
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i rank = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            const __m256 y = _mm256_set1_ps(pg[j]);
            const __m256i after = _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(j));
            const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(y, gs, _CMP_GE_OQ));
            const __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(y, gs, _CMP_GT_OQ));
            rank = _mm256_sub_epi32(rank, _mm256_blendv_epi8(gt, ge, after));
        }
        const unsigned keep =
            (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(TG), rank))) &
            ((1u << G) - 1u);
        /* the threshold: a lower bound of the K-th largest candidate, or none */
        float theta = -INFINITY;
        if (m == 2 && K == 2 * TG) {
            float p2[8];
            _mm256_storeu_ps(p2, t2);
            theta = INFINITY;
            for (unsigned kb = keep; kb; kb &= kb - 1) {
                const float x = p2[__builtin_ctz(kb)];
                theta = x < theta ? x : theta;
            }
        }
        /* candidates at or above it, in increasing id, inserted as the reference does */
        const __m256 th = _mm256_set1_ps(theta);
        float tv[16] = {0};
        int32_t ti[16] = {0};
        int32_t len = 0;
        for (unsigned kb = keep; kb; kb &= kb - 1) {
            const int32_t e0 = __builtin_ctz(kb) * gsize;
            for (int32_t j = 0; j < V; j++) {
                const float *p = ct + e0 + 8 * j;
                unsigned mk = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), th, _CMP_GE_OQ));
                for (; mk; mk &= mk - 1) {
                    const int i = __builtin_ctz(mk);
                    dsmoe__topk_push(tv, ti, &len, K, p[i], e0 + 8 * j + i);
                }
            }
        }
        memcpy(it, ti, (size_t)K * sizeof(int32_t));
        memcpy(vt, tv, (size_t)K * sizeof(float));
    }
    return 1;
}

const dsmoe__kernel_table dsmoe__kernels_avx2 = {
    .name = "avx2",
    .sigmoid = k_sigmoid_avx2,
    .sigmoid_bias = k_sigmoid_bias_avx2,
    .any_nonfinite = any_nonfinite_avx2,
    .softmax = k_softmax_avx2,
    .softmax_scaled = k_softmax_scaled_avx2,
    .bf16_to_f32 = k_bf16_to_f32_avx2,
    .dot_bf16 = k_dot_bf16_avx2,
    .swiglu = k_swiglu_avx2,
    .swiglu_backward = k_swiglu_backward_avx2,
    .group_scores = group_scores_avx2,
    .topk = topk_avx2,
    .topk_blocks = topk_blocks_avx2,
    .select_grouped = select_grouped_avx2,
    .gemm_nt = dsmoe__gemm_nt_avx2,
    .gemm_pk = dsmoe__gemm_pk_avx2,
    .sgemm_small = dsmoe__sgemm_small_avx2,
};
