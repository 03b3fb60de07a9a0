/* avx512.c — AVX-512F kernels (16 lanes); bodies in simd_body.h. Compiled with
 * -mavx512f -mfma only; called only when the CPU reports AVX-512F. */
#include "kernels.h"

#include <immintrin.h>

#define VF __m512
#define VI __m512i
#define W 16
#define SFX _avx512
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_STORE(p, v) _mm512_storeu_ps((p), (v))
#define V_SET1(x) _mm512_set1_ps(x)
#define V_ADD _mm512_add_ps
#define V_SUB _mm512_sub_ps
#define V_MUL _mm512_mul_ps
#define V_DIV _mm512_div_ps
#define V_FMA _mm512_fmadd_ps
#define V_MIN _mm512_min_ps
#define V_MAX _mm512_max_ps
#define V_RINT(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define V_CVT_I _mm512_cvtps_epi32
#define V_I_SRAI1(v) _mm512_srai_epi32((v), 1)
#define V_I_SUB _mm512_sub_epi32
#define V_I_SET1 _mm512_set1_epi32
#define V_I_AND _mm512_and_si512
#define V_I_MAXU _mm512_max_epu32
#define V_CAST_I _mm512_castps_si512
#define V_I_STORE(p, v) _mm512_storeu_si512((void *)(p), (v))
#define V_I_EXP2(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32((n), _mm512_set1_epi32(127)), 23))
#define V_SEL_GT(x, t, a, b) _mm512_mask_blend_ps(_mm512_cmp_ps_mask((x), (t), _CMP_GT_OQ), (a), (b))
#define V_SEL_LT(x, t, a, b) _mm512_mask_blend_ps(_mm512_cmp_ps_mask((x), (t), _CMP_LT_OQ), (a), (b))
#define V_NEG(x) _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u)))
#define V_LOAD_BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(const void *)(p))), 16))

#define SIMD_OWN_SOFTMAX_SCALED 1
#include "simd_body.h"

/* Selection kernels. Comparisons only, so exactness is by construction; the shapes
 * they do not cover fall back to the scalar reference. */

/* Per lane: hi = largest, lo = second largest of the group's vectors; the group's
 * top-2 sum is max(hi) + max(hi with its first maximal lane replaced by lo). */
static void group_scores_avx512(float *gs, const float *c, int32_t G, int32_t gsize, int32_t m,
                                float *sv, int32_t *si) {
    if ((m != 1 && m != 2) || gsize % 16 != 0) {
        dsmoe__group_scores_ref(gs, c, G, gsize, m, sv, si);
        return;
    }
    const int32_t V = gsize / 16;
    for (int32_t g = 0; g < G; g++) {
        const float *cg = c + (size_t)g * (size_t)gsize;
        __m512 hi = _mm512_loadu_ps(cg);
        if (m == 1) {
            for (int32_t j = 1; j < V; j++) hi = _mm512_max_ps(hi, _mm512_loadu_ps(cg + 16 * j));
            gs[g] = _mm512_reduce_max_ps(hi);
            continue;
        }
        __m512 lo;
        hi = lane_top2_avx512(cg, V, &lo);
        float top1 = _mm512_reduce_max_ps(hi);
        __mmask16 eq = _mm512_cmp_ps_mask(hi, _mm512_set1_ps(top1), _CMP_EQ_OQ);
        __mmask16 first = (__mmask16)(eq & (__mmask16)(-(int)eq));
        float top2 = _mm512_reduce_max_ps(_mm512_mask_blend_ps(first, hi, lo));
        gs[g] = top1 + top2;
    }
}

/* For each lane i of x (also stored at px), the number of lanes that beat it: larger,
 * or equal with a lower lane number. No shuffles: each lane j, broadcast from memory,
 * beats the lanes after it when >= and the lanes up to it when >. */
static inline __m512i rank16_bcast(__m512 x, const float *px) {
    const __m512i one = _mm512_set1_epi32(1);
    __m512i ra = _mm512_setzero_si512(), rb = _mm512_setzero_si512();
    for (int j = 0; j < 16; j++) {
        const __m512 y = _mm512_set1_ps(px[j]);
        const __mmask16 after = (__mmask16)(0xfffeu << j);
        ra = _mm512_mask_add_epi32(ra, _mm512_mask_cmp_ps_mask(after, y, x, _CMP_GE_OQ), ra, one);
        rb = _mm512_mask_add_epi32(rb, _mm512_mask_cmp_ps_mask((__mmask16)~after, y, x, _CMP_GT_OQ), rb, one);
    }
    return _mm512_add_epi32(ra, rb);
}

static inline __m512i rank16(__m512 x) {
    float px[16];
    _mm512_storeu_ps(px, x);
    return rank16_bcast(x, px);
}

/* Branch-free selection among m <= 16 finite candidates by rank counting: the rank
 * of candidate i is the number of candidates that beat it (larger, or equal with a
 * lower position), computed for all lanes at once (rank16); candidates of rank < K
 * land at their rank. Equivalent to the
 * reference's stable insertion. v, ids: m entries in increasing position order. */
static void rank_select16(int32_t *pos, float *val, const float *v, const int32_t *ids, int32_t m,
                          int32_t K) {
    const __mmask16 live = (__mmask16)(m >= 16 ? 0xffffu : ((1u << m) - 1u));
    const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, v);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i rank = rank16(x);
    /* invert the permutation for the K output slots (scatters are slow on some CPUs) */
    int32_t inv[16] = {0};
    for (int32_t r = 0; r < K; r++) {
        unsigned at = _mm512_mask_cmpeq_epi32_mask(live, rank, _mm512_set1_epi32(r));
        inv[r] = __builtin_ctz(at | 0x10000u) & 15;
    }
    const __m512i iv = _mm512_loadu_si512((const void *)inv);
    const __m512i id = ids ? _mm512_mask_loadu_epi32(lane, live, ids) : lane;
    const __mmask16 outk = (__mmask16)((1u << K) - 1u);
    _mm512_mask_storeu_ps(val, outk, _mm512_permutexvar_ps(iv, x));
    _mm512_mask_storeu_epi32(pos, outk, _mm512_permutexvar_epi32(iv, id));
}

/* The K-th largest (1-based) of 16 finite values (ties counted), by rank counting. */
static float kth_largest16(const float *v, int32_t K) {
    const __m512 x = _mm512_loadu_ps(v);
    const __m512i rank = rank16_bcast(x, v);
    __mmask16 at = _mm512_cmp_epi32_mask(rank, _mm512_set1_epi32(K - 1), _MM_CMPINT_EQ);
    return _mm512_cvtss_f32(_mm512_maskz_compress_ps(at, x));
}

/* Threshold selection: the K-th largest of the 16 lane maxima is a lower bound of the
 * K-th largest value (the lane maxima are 16 distinct elements), so only elements at
 * or above it can be chosen; they are compressed in index order and ranked. More
 * than 16 survivors (many ties) fall back to the scalar reference. */
static void topk_avx512(int32_t *pos, float *val, const float *v, int32_t n, int32_t K, float *sv,
                        int32_t *si) {
    if (K > 16 || n < K) {
        dsmoe__topk_ref(pos, val, v, n, K, sv, si);
        return;
    }
    if (n <= 16) {
        rank_select16(pos, val, v, NULL, n, K);
        return;
    }
    if (n % 16 != 0) {
        dsmoe__topk_ref(pos, val, v, n, K, sv, si);
        return;
    }
    const int32_t V = n / 16;
    __m512 mx = _mm512_loadu_ps(v);
    for (int32_t j = 1; j < V; j++) mx = _mm512_max_ps(mx, _mm512_loadu_ps(v + 16 * j));
    float lm[16];
    _mm512_storeu_ps(lm, mx);
    const __m512 t = _mm512_set1_ps(kth_largest16(lm, K));
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    int32_t cnt = 0;
    for (int32_t j = 0; j < V; j++) {
        __m512 x = _mm512_loadu_ps(v + 16 * j);
        __mmask16 k = _mm512_cmp_ps_mask(x, t, _CMP_GE_OQ);
        /* register compress + full store (scratch has 16 entries of slack) */
        _mm512_storeu_ps(sv + cnt, _mm512_maskz_compress_ps(k, x));
        _mm512_storeu_si512((void *)(si + cnt), _mm512_maskz_compress_epi32(k, idx));
        cnt += __builtin_popcount((unsigned)k);
        idx = _mm512_add_epi32(idx, step);
    }
    if (cnt <= 16) {
        rank_select16(pos, val, sv, si, cnt, K);
    } else {
        int32_t len = 0;
        for (int32_t i = 0; i < cnt; i++) dsmoe__topk_push(val, pos, &len, K, sv[i], si[i]);
    }
}

/* topk over kept blocks without gathering them: the same threshold argument over
 * the lane maxima of every kept vector. */
static void topk_blocks_avx512(int32_t *ids, float *val, const float *v, int32_t gsize,
                               const int32_t *groups, int32_t ng, int32_t K, float *sv,
                               int32_t *si) {
    const int32_t n = ng * gsize;
    if (K > 16 || gsize % 16 != 0 || n < 32) {
        dsmoe__topk_blocks_ref(ids, val, v, gsize, groups, ng, K, sv, si);
        return;
    }
    const int32_t V = gsize / 16;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int32_t q = 0; q < ng; q++) {
        const float *b = v + (size_t)groups[q] * (size_t)gsize;
        for (int32_t j = 0; j < V; j++) mx = _mm512_max_ps(mx, _mm512_loadu_ps(b + 16 * j));
    }
    float lm[16];
    _mm512_storeu_ps(lm, mx);
    const __m512 t = _mm512_set1_ps(kth_largest16(lm, K));
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int32_t cnt = 0;
    for (int32_t q = 0; q < ng; q++) {
        const int32_t e0 = groups[q] * gsize;
        for (int32_t j = 0; j < V; j++) {
            __m512 x = _mm512_loadu_ps(v + e0 + 16 * j);
            __mmask16 k = _mm512_cmp_ps_mask(x, t, _CMP_GE_OQ);
            if (!k) continue;
            __m512i id = _mm512_add_epi32(lane, _mm512_set1_epi32(e0 + 16 * j));
            _mm512_storeu_ps(sv + cnt, _mm512_maskz_compress_ps(k, x));
            _mm512_storeu_si512((void *)(si + cnt), _mm512_maskz_compress_epi32(k, id));
            cnt += __builtin_popcount((unsigned)k);
        }
    }
    if (cnt <= 16) {
        rank_select16(ids, val, sv, si, cnt, K);
    } else {
        int32_t len = 0;
        for (int32_t i = 0; i < cnt; i++) dsmoe__topk_push(val, ids, &len, K, sv[i], si[i]);
    }
}

/* ------------------------------------------------- fused group-limited selection -- */

/* The lanes o .. o+n-1 (o + n <= 16). */
#define SEL_SPAN(o, n) ((__mmask16)(((1u << (n)) - 1u) << (o)))

/* The same for the first 8 lanes (lanes 8..15 of the result are meaningless). */
static inline __m512i rank8_bcast(__m512 x, const float *px) {
    const __m512i one = _mm512_set1_epi32(1);
    __m512i ra = _mm512_setzero_si512(), rb = _mm512_setzero_si512();
    for (int j = 0; j < 8; j++) {
        const __m512 y = _mm512_set1_ps(px[j]);
        const __mmask16 after = (__mmask16)((0xfeu << j) & 0xffu);
        ra = _mm512_mask_add_epi32(ra, _mm512_mask_cmp_ps_mask(after, y, x, _CMP_GE_OQ), ra, one);
        rb = _mm512_mask_add_epi32(rb, _mm512_mask_cmp_ps_mask((__mmask16)(~after & 0xffu), y, x, _CMP_GT_OQ), rb, one);
    }
    return _mm512_add_epi32(ra, rb);
}

/* Group-limited selection for 2 <= G <= 8 groups of 16·V (V <= 16) experts, m = 1 or 2,
 * K <= 16, in registers except the final placement:
 *  1. per group, per lane: the two largest of its V vectors; the 8 groups' pairs are
 *     then reduced across lanes together by a transposing butterfly (each merge keeps
 *     the two largest of four), leaving group g's (top1, top2) in lane g;
 *  2. group scores top1 (+ top2), ranked with lane rotations: keep rank < TG;
 *  3. a lower bound θ of the K-th largest candidate: with K = 2·TG and m = 2, the least
 *     top2 of a kept group (the 2·TG values top1/top2 of the kept groups are distinct
 *     candidates); otherwise (or when more than 16 candidates reach it) also the K-th
 *     largest of the 16 lane maxima over the kept groups; past that (many ties), a
 *     scalar insertion over the candidates >= θ;
 *  4. the candidates >= θ, in increasing id, packed into one register (compress, then
 *     expand into place by a tree), ranked, and placed by rank.
 * Comparisons and one exact addition (top1 + top2) only, so the result equals the
 * reference's composition bit for bit. Tokens go two at a time through the common
 * path, so that the two dependency chains overlap. */

typedef struct sel_shape {
    int32_t G, gsize, V, m, TG, K;
} sel_shape;

/* Stage 1: group g's top1/top2 in lane g of t1/t2 (lanes G..15: -inf); with raw, the
 * butterfly stops one level early: group g's top pairs are then split between lanes
 * 4(g mod 4) + 2(g / 4) and the next (-inf for groups from G), for the caller to merge. */
static inline __attribute__((always_inline)) void sel_tops_(const float *c, const sel_shape *sp, __m512 *t1, __m512 *t2, int raw) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 h[8], l[8];
    for (int32_t g = 0; g < 8; g++) {
        h[g] = ninf;
        l[g] = ninf;
    }
    for (int32_t g = 0; g < sp->G; g++) {
        h[g] = lane_top2_avx512(c + (size_t)g * (size_t)sp->gsize, sp->V, &l[g]);
    }
    /* butterfly: 8 groups x 16 lanes -> group g in lane 4(g mod 4) + g/4 */
    __m512 ph[4], pl[4], qh[2], ql[2], rh, rl, sh, sl;
    for (int p = 0; p < 4; p++) /* group 2p: lanes 0-7, 2p+1: 8-15 */
        SEL_LEVEL(_mm512_shuffle_f32x4, _MM_SHUFFLE(1, 0, 1, 0), _MM_SHUFFLE(3, 2, 3, 2), h[2 * p],
                  l[2 * p], h[2 * p + 1], l[2 * p + 1], ph[p], pl[p]);
    for (int p = 0; p < 2; p++) /* quad j: group 4p + j */
        SEL_LEVEL(_mm512_shuffle_f32x4, _MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1), ph[2 * p],
                  pl[2 * p], ph[2 * p + 1], pl[2 * p + 1], qh[p], ql[p]);
    /* quad j: g_j, g_j, g_4+j, g_4+j */
    SEL_LEVEL(_mm512_shuffle_ps, _MM_SHUFFLE(1, 0, 1, 0), _MM_SHUFFLE(3, 2, 3, 2), qh[0], ql[0], qh[1],
              ql[1], rh, rl);
    if (raw) {
        *t1 = rh;
        *t2 = rl;
        return;
    }
    /* quad j: g_j, g_4+j, g_j, g_4+j */
    SEL_LEVEL(_mm512_shuffle_ps, _MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1), rh, rl, rh, rl, sh, sl);
    /* lane g <- group g (lanes 8..15: -inf) */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    *t1 = _mm512_mask_permutexvar_ps(ninf, 0x00ff, order, sh);
    *t2 = _mm512_mask_permutexvar_ps(ninf, 0x00ff, order, sl);
}

static inline __attribute__((always_inline)) void sel_tops(const float *c, const sel_shape *sp, __m512 *t1, __m512 *t2) {
    sel_tops_(c, sp, t1, t2, 0);
}

/* Stages 1-2: group g's top1/top2 in lane g of t1/t2; the kept groups as a bit set. */
static inline __attribute__((always_inline)) unsigned sel_groups(const float *c, const sel_shape *sp, __m512 *t1, __m512 *t2) {
    sel_tops(c, sp, t1, t2);
    const __m512 gs = sp->m == 2 ? _mm512_add_ps(*t1, *t2) : *t1;
    const __mmask16 live = (__mmask16)((1u << sp->G) - 1u);
    float pg[16];
    _mm512_storeu_ps(pg, gs);
    return _mm512_mask_cmplt_epi32_mask(live, rank8_bcast(gs, pg), _mm512_set1_epi32(sp->TG));
}

/* The kept groups' vectors (first expert id of each), in increasing id; their count. */
static inline __attribute__((always_inline)) int32_t sel_vectors(unsigned keep, const sel_shape *sp, int32_t *vid) {
    int32_t nv = 0;
    for (unsigned kb = keep; kb; kb &= kb - 1)
        for (int32_t j = 0; j < sp->V; j++) vid[nv++] = __builtin_ctz(kb) * sp->gsize + 16 * j;
    return nv;
}

/* The K-th largest of the lane maxima over the kept vectors: 16 distinct candidates
 * (every lane holds one of each kept vector), so a lower bound of the K-th largest. */
static inline float sel_theta_lanemax(const float *c, const int32_t *vid, int32_t nv, int32_t K) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int32_t q = 0; q < nv; q++) mx = _mm512_max_ps(mx, _mm512_loadu_ps(c + vid[q]));
    float lm[16];
    _mm512_storeu_ps(lm, mx);
    return kth_largest16(lm, K);
}

/* Masks of the candidates >= theta; returns their number. */
static inline __attribute__((always_inline)) int32_t sel_masks(const float *c, const int32_t *vid, int32_t nv, float theta,
                                __mmask16 *km) {
    const __m512 th = _mm512_set1_ps(theta);
    int32_t total = 0;
    for (int32_t q = 0; q < nv; q++) {
        km[q] = _mm512_cmp_ps_mask(_mm512_loadu_ps(c + vid[q]), th, _CMP_GE_OQ);
        total += __builtin_popcount((unsigned)km[q]);
    }
    return total;
}

/* Packs the (at most 16) masked candidates into one register in increasing id: each quad
 * of vectors by a two-level tree of compress + expand, then the quads in turn; ranks
 * them and writes the K best by rank. */
static inline __attribute__((always_inline)) void sel_pack(const float *c, const int32_t *vid,
                                                           const __mmask16 *km, int32_t nv,
                                                           __m512 *pv_out, __m512i *pi_out) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 accv = _mm512_setzero_ps();
    __m512i acci = _mm512_setzero_si512();
    int32_t cnt = 0;
    for (int32_t q = 0; q < nv; q += 4) {
        __m512 xv[4];
        __m512i xi[4];
        int32_t n[4];
        for (int r = 0; r < 4; r++) {
            const int32_t at = q + r < nv ? q + r : q;
            const __mmask16 k = q + r < nv ? km[at] : 0;
            xv[r] = _mm512_maskz_compress_ps(k, _mm512_loadu_ps(c + vid[at]));
            xi[r] = _mm512_maskz_compress_epi32(k, _mm512_add_epi32(lane, _mm512_set1_epi32(vid[at])));
            n[r] = __builtin_popcount((unsigned)k);
        }
        const __mmask16 b1 = SEL_SPAN(n[0], n[1]), b3 = SEL_SPAN(n[2], n[3]);
        const __mmask16 b13 = SEL_SPAN(n[0] + n[1], n[2] + n[3]);
        const __mmask16 bq = SEL_SPAN(cnt, n[0] + n[1] + n[2] + n[3]);
        __m512 v01 = _mm512_mask_expand_ps(xv[0], b1, xv[1]);
        __m512 v23 = _mm512_mask_expand_ps(xv[2], b3, xv[3]);
        __m512i i01 = _mm512_mask_expand_epi32(xi[0], b1, xi[1]);
        __m512i i23 = _mm512_mask_expand_epi32(xi[2], b3, xi[3]);
        v01 = _mm512_mask_expand_ps(v01, b13, v23);
        i01 = _mm512_mask_expand_epi32(i01, b13, i23);
        accv = _mm512_mask_expand_ps(accv, bq, v01);
        acci = _mm512_mask_expand_epi32(acci, bq, i01);
        cnt += n[0] + n[1] + n[2] + n[3];
    }
    /* lanes past the candidates: -inf, so that the ranks form a permutation */
    *pv_out = _mm512_mask_mov_ps(accv, (__mmask16)~((1u << cnt) - 1u), _mm512_set1_ps(-INFINITY));
    *pi_out = acci;
}

static inline __attribute__((always_inline)) void sel_finish(const float *c, const int32_t *vid, const __mmask16 *km, int32_t nv,
                              int32_t K, int32_t *ids, float *val) {
    __m512 accv;
    __m512i acci;
    sel_pack(c, vid, km, nv, &accv, &acci);
    int32_t pid[16];
    float pv[16];
    _mm512_storeu_ps(pv, accv);
    _mm512_storeu_si512((void *)pid, acci);
    const __m512i rank = rank16_bcast(accv, pv);
    for (int32_t r = 0; r < K; r++) {
        /* the lane of rank r (exactly one) */
        unsigned at = _mm512_cmpeq_epi32_mask(rank, _mm512_set1_epi32(r));
        int i = __builtin_ctz(at | 0x10000u) & 15;
        ids[r] = pid[i];
        val[r] = pv[i];
    }
}

/* One token from its kept groups onwards, starting at the given bound (pass 0: the top-2
 * bound theta; pass 1: theta is raised to the lane-maximum bound). */
static void sel_rest(const float *c, const sel_shape *sp, const int32_t *vid, int32_t nv,
                     float theta, int pass, int32_t *ids, float *val) {
    __mmask16 km[128];
    for (;; pass++) {
        if (pass == 1) {
            float tb = sel_theta_lanemax(c, vid, nv, sp->K);
            if (tb > theta) theta = tb;
        }
        if (pass == 2) {
            /* more than 16 candidates reach both bounds (many ties): scalar insertion
             * over the candidates at or above θ, in increasing id */
            float tv[16] = {0};
            int32_t ti[16] = {0};
            int32_t len = 0;
            for (int32_t q = 0; q < nv; q++)
                for (int32_t j = 0; j < 16; j++) {
                    float x = c[vid[q] + j];
                    if (x >= theta) dsmoe__topk_push(tv, ti, &len, sp->K, x, vid[q] + j);
                }
            memcpy(ids, ti, (size_t)sp->K * sizeof(int32_t));
            memcpy(val, tv, (size_t)sp->K * sizeof(float));
            return;
        }
        if (sel_masks(c, vid, nv, theta, km) <= 16) {
            sel_finish(c, vid, km, nv, sp->K, ids, val);
            return;
        }
    }
}

/* sel_pack through memory: each vector's candidates compressed and stored at the running
 * count (the next store overwrites the zeros past them), then -inf past the last; rowv /
 * rowi hold 32 entries. No expands (two uops each on Zen 4). */
static inline __attribute__((always_inline)) void sel_pack_rows(const float *c, const int32_t *vid,
                                                                const __mmask16 *km, int32_t nv,
                                                                float *rowv, int32_t *rowi) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int32_t o = 0;
    for (int32_t q = 0; q < nv; q++) {
        const __mmask16 k = km[q];
        _mm512_storeu_ps(rowv + o, _mm512_maskz_compress_ps(k, _mm512_loadu_ps(c + vid[q])));
        _mm512_storeu_si512((void *)(rowi + o),
                            _mm512_maskz_compress_epi32(k, _mm512_add_epi32(lane, _mm512_set1_epi32(vid[q]))));
        o += __builtin_popcount((unsigned)k);
    }
    _mm512_storeu_ps(rowv + o, _mm512_set1_ps(-INFINITY));
}

/* Transposes the 16 x 16 matrix whose rows are r[0..15] (r[i] lane j <- r[j] lane i):
 * three levels of in-128-bit-lane shuffles and 128-bit block shuffles, 64 in all. */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

/* One insertion step at rank position R (R constant): the new candidate (v, id) takes
 * position R where it is larger (strictly: an equal value already there came from a
 * lower id and stays first); from there on the carry is the displaced entry, which
 * takes each next position whatever its value (mv: the lanes where it is). */
#define SEL_INS(R)                                                                        \
    do {                                                                                  \
        const __mmask16 gt_ = (__mmask16)(_mm512_mask_cmp_ps_mask((__mmask16)~mv, v, rv[R], \
                                                                  _CMP_GT_OQ) | mv);      \
        mv = gt_;                                                                         \
        const __m512 ov_ = rv[R];                                                         \
        const __m512i oi_ = ri[R];                                                        \
        rv[R] = _mm512_mask_mov_ps(ov_, gt_, v);                                          \
        ri[R] = _mm512_mask_mov_epi32(oi_, gt_, id);                                      \
        v = _mm512_mask_mov_ps(v, gt_, ov_);                                              \
        id = _mm512_mask_mov_epi32(id, gt_, oi_);                                         \
    } while (0)

/* 16 tokens, m = 2, K = 2·TG <= 8: per token as sel_one up to the packed candidates
 * (at most 16, in increasing id, -inf past them); then the 16 tokens' candidate lists
 * are transposed (lane = token) and the K best found by insertion with plain vertical
 * compares and blends, no rank counting, no mask-to-register round trips; transposed
 * back and stored. Tokens with more than 16 candidates go through sel_rest. */
static void sel_block16(const float *c, const sel_shape *sp, int32_t *ids, float *val) {
    const size_t E = (size_t)sp->G * (size_t)sp->gsize;
    const int32_t K = sp->K;
    __m512 pv[16];
    __m512i pi[16];
    float bv[16][32];
    int32_t bi[16][32];
    float th[16];
    unsigned keep[16], over = 0;
    int32_t maxcnt = 0;
    {
        /* stage 2 with lane = token: group scores, ranks, kept groups, bound θ */
        __m512 t1[16], t2[16];
        for (int t = 0; t < 16; t++) sel_tops_(c + (size_t)t * E, sp, &t1[t], &t2[t], 1);
        transpose16(t1);
        transpose16(t2);
        const __m512i one = _mm512_set1_epi32(1);
        __m512 gs[8], g1[8], g2[8];
        __m512i rk[8];
        for (int g = 0; g < 8; g++) {
            const int a = 4 * (g % 4) + 2 * (g / 4);
            SEL_MERGE(g1[g], g2[g], t1[a], t2[a], t1[a + 1], t2[a + 1]);
            gs[g] = _mm512_add_ps(g1[g], g2[g]);
            rk[g] = _mm512_setzero_si512();
        }
        for (int g = 1; g < 8; g++)
            for (int h = 0; h < g; h++) {
                /* h < g: h beats g when >=, g beats h when > */
                const __mmask16 hg = _mm512_cmp_ps_mask(gs[h], gs[g], _CMP_GE_OQ);
                const __mmask16 gh = _mm512_cmp_ps_mask(gs[g], gs[h], _CMP_GT_OQ);
                rk[g] = _mm512_mask_add_epi32(rk[g], hg, rk[g], one);
                rk[h] = _mm512_mask_add_epi32(rk[h], gh, rk[h], one);
            }
        const __m512i tg = _mm512_set1_epi32(sp->TG);
        __m512i kb = _mm512_setzero_si512();
        __m512 tv = _mm512_set1_ps(INFINITY);
        for (int g = 0; g < sp->G; g++) {
            const __mmask16 kg = _mm512_cmplt_epi32_mask(rk[g], tg);
            kb = _mm512_mask_or_epi32(kb, kg, kb, _mm512_set1_epi32(1 << g));
            tv = _mm512_mask_min_ps(tv, kg, tv, g2[g]);
        }
        _mm512_storeu_si512((void *)keep, kb);
        _mm512_storeu_ps(th, tv);
    }
    for (int t = 0; t < 16; t++) {
        const float *ct = c + (size_t)t * E;
        __mmask16 km[128];
        int32_t vid[128];
        const int32_t nv = sel_vectors(keep[t], sp, vid);
        const int32_t cnt = sel_masks(ct, vid, nv, th[t], km);
        if (cnt > 16) {
            over |= 1u << t;
            _mm512_storeu_ps(bv[t], _mm512_set1_ps(-INFINITY));
            _mm512_storeu_si512((void *)bi[t], _mm512_setzero_si512());
            continue;
        }
        sel_pack_rows(ct, vid, km, nv, bv[t], bi[t]);
        if (cnt > maxcnt) maxcnt = cnt;
    }
    for (int t = 0; t < 16; t++) {
        pv[t] = _mm512_loadu_ps(bv[t]);
        pi[t] = _mm512_loadu_si512((const void *)bi[t]);
    }
    transpose16(pv);
    {
        __m512 tp[16];
        for (int j = 0; j < 16; j++) tp[j] = _mm512_castsi512_ps(pi[j]);
        transpose16(tp);
        for (int j = 0; j < 16; j++) pi[j] = _mm512_castps_si512(tp[j]);
    }
    __m512 rv[8];
    __m512i ri[8];
    for (int r = 0; r < 8; r++) {
        rv[r] = _mm512_set1_ps(-INFINITY);
        ri[r] = _mm512_setzero_si512();
    }
    /* the first 8 slots (every token has at least K <= 8 candidates, or is redone
     * below): slot J finds positions J.. empty, so it needs the steps up to J only */
#define SEL_SLOT(J)                                                                       \
    do {                                                                                  \
        __m512 v = pv[J];                                                                 \
        __m512i id = pi[J];                                                               \
        __mmask16 mv = 0;                                                                 \
        SEL_INS(0);                                                                       \
        if ((J) >= 1) SEL_INS(1);                                                         \
        if ((J) >= 2) SEL_INS(2);                                                         \
        if ((J) >= 3) SEL_INS(3);                                                         \
        if ((J) >= 4) SEL_INS(4);                                                         \
        if ((J) >= 5) SEL_INS(5);                                                         \
        if ((J) >= 6) SEL_INS(6);                                                         \
        if ((J) >= 7) SEL_INS(7);                                                         \
    } while (0)
    SEL_SLOT(0); SEL_SLOT(1); SEL_SLOT(2); SEL_SLOT(3);
    SEL_SLOT(4); SEL_SLOT(5); SEL_SLOT(6); SEL_SLOT(7);
#undef SEL_SLOT
    for (int32_t j = 8; j < maxcnt; j++) {
        __m512 v = pv[j];
        __m512i id = pi[j];
        __mmask16 mv = 0;
        SEL_INS(0); SEL_INS(1); SEL_INS(2); SEL_INS(3);
        SEL_INS(4); SEL_INS(5); SEL_INS(6); SEL_INS(7);
    }
    __m512 ov[16], oi[16];
    for (int r = 0; r < 8; r++) {
        ov[r] = rv[r];
        oi[r] = _mm512_castsi512_ps(ri[r]);
        ov[r + 8] = _mm512_setzero_ps();
        oi[r + 8] = _mm512_setzero_ps();
    }
    transpose16(ov);
    transpose16(oi);
    const __mmask16 outk = (__mmask16)((1u << K) - 1u);
    for (int t = 0; t < 16; t++) {
        _mm512_mask_storeu_ps(val + (size_t)t * (size_t)K, outk, ov[t]);
        _mm512_mask_storeu_epi32(ids + (size_t)t * (size_t)K, outk, _mm512_castps_si512(oi[t]));
    }
    for (; over; over &= over - 1) {
        const int t = __builtin_ctz(over);
        __mmask16 km[128];
        int32_t vid[128];
        (void)km;
        const int32_t nv = sel_vectors(keep[t], sp, vid);
        sel_rest(c + (size_t)t * E, sp, vid, nv, th[t], 1, ids + (size_t)t * (size_t)K,
                 val + (size_t)t * (size_t)K);
    }
}
#undef SEL_INS

/* One token, start to end. */
static __attribute__((noinline)) void sel_one(const float *ct, const sel_shape *sp, int top2,
                                              int32_t *it, float *vt) {
    __m512 t1, t2;
    int32_t vid[128];
    const unsigned keep = sel_groups(ct, sp, &t1, &t2);
    const int32_t nv = sel_vectors(keep, sp, vid);
    if (!top2) {
        sel_rest(ct, sp, vid, nv, -INFINITY, 1, it, vt);
        return;
    }
    __mmask16 km[128];
    const float theta = _mm512_mask_reduce_min_ps((__mmask16)keep, t2);
    if (sel_masks(ct, vid, nv, theta, km) <= 16)
        sel_finish(ct, vid, km, nv, sp->K, it, vt);
    else
        sel_rest(ct, sp, vid, nv, theta, 1, it, vt);
}

/* Rows of at most 16 experts (G·gsize <= 16, as the small presets have), one vector
 * each: every stage by rank counting as in rank_select16 (the rank of a lane among a
 * set of lanes is the number of the set's lanes that beat it: larger, or equal with a
 * lower id). A group's score is its lane of in-group rank 0 (the maximum, the first of
 * equals, as the reference's strict >) plus, for m = 2, its lane of rank 1 (the top two
 * added largest first); the kept groups are the TG of lowest rank among the G scores;
 * the K kept lanes of lowest rank land at their rank. gm[j]: the lanes of j's group;
 * grp: each lane's group. */
static void sel_small(const float *ct, int32_t G, int32_t gsize, int32_t m, int32_t TG, int32_t K,
                      const __mmask16 *gm, __m512i grp, int32_t *it, float *vt) {
    const int32_t E = G * gsize;
    const __mmask16 live = (__mmask16)(E >= 16 ? 0xffffu : (1u << E) - 1u);
    const __mmask16 glive = (__mmask16)((1u << G) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(live, ct);
    const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512();
    __m512i rg = zero;
    for (int32_t j = 0; j < E; j++) {
        const __m512 b = _mm512_set1_ps(ct[j]);
        const __mmask16 beat = _mm512_mask_cmp_ps_mask(gm[j], b, x, _CMP_GT_OQ) |
                               (_mm512_mask_cmp_ps_mask(gm[j], b, x, _CMP_EQ_OQ) &
                                (__mmask16)(0xfffeu << j));
        rg = _mm512_mask_add_epi32(rg, beat, rg, one);
    }
    __m512 gs = _mm512_maskz_compress_ps(_mm512_mask_cmpeq_epi32_mask(live, rg, zero), x);
    if (m == 2)
        gs = _mm512_add_ps(gs, _mm512_maskz_compress_ps(_mm512_mask_cmpeq_epi32_mask(live, rg, one), x));
    float gv[16];
    _mm512_storeu_ps(gv, gs);
    __m512i rk = zero;
    for (int32_t g = 0; g < G; g++) {
        const __m512 b = _mm512_set1_ps(gv[g]);
        const __mmask16 beat = _mm512_mask_cmp_ps_mask(glive, b, gs, _CMP_GT_OQ) |
                               (_mm512_mask_cmp_ps_mask(glive, b, gs, _CMP_EQ_OQ) &
                                (__mmask16)(0xfffeu << g));
        rk = _mm512_mask_add_epi32(rk, beat, rk, one);
    }
    const __mmask16 keep = _mm512_mask_cmplt_epi32_mask(glive, rk, _mm512_set1_epi32(TG));
    const __mmask16 cand = _mm512_mask_cmpeq_epi32_mask(
        live, _mm512_permutexvar_epi32(grp, _mm512_maskz_mov_epi32(keep, one)), one);
    __m512i re = zero;
    for (unsigned cj = cand; cj; cj &= cj - 1) {
        const int32_t j = __builtin_ctz(cj);
        const __m512 b = _mm512_set1_ps(ct[j]);
        const __mmask16 beat = _mm512_mask_cmp_ps_mask(cand, b, x, _CMP_GT_OQ) |
                               (_mm512_mask_cmp_ps_mask(cand, b, x, _CMP_EQ_OQ) &
                                (__mmask16)(0xfffeu << j));
        re = _mm512_mask_add_epi32(re, beat, re, one);
    }
    for (int32_t r = 0; r < K; r++) {
        const unsigned at = _mm512_mask_cmpeq_epi32_mask(cand, re, _mm512_set1_epi32(r));
        const int32_t e = __builtin_ctz(at | 0x10000u) & 15;
        it[r] = e;
        vt[r] = ct[e];
    }
}

static int select_grouped_avx512(int32_t *ids, float *val, const float *c, int64_t n, int32_t G,
                                 int32_t gsize, int32_t m, int32_t TG, int32_t K) {
    if (G >= 2 && gsize >= 1 && G * gsize <= 16 && (m == 1 || m == 2) && m <= gsize &&
        TG >= 1 && TG <= G && K >= 1 && K <= TG * gsize) {
        __mmask16 gm[16];
        int32_t gl[16] = {0};
        for (int32_t j = 0; j < G * gsize; j++) {
            gm[j] = (__mmask16)(((1u << gsize) - 1u) << (j / gsize * gsize));
            gl[j] = j / gsize;
        }
        const __m512i grp = _mm512_loadu_si512((const void *)gl);
        const size_t E = (size_t)G * (size_t)gsize;
        for (int64_t t = 0; t < n; t++)
            sel_small(c + (size_t)t * E, G, gsize, m, TG, K, gm, grp, ids + (size_t)t * (size_t)K,
                      val + (size_t)t * (size_t)K);
        return 1;
    }
    if (G < 2 || G > 8 || gsize % 16 != 0 || gsize > 256 || (m != 1 && m != 2) || K > 16 ||
        TG < 1 || TG > G || K < 1 || K > TG * gsize)
        return 0;
    if (n <= 0) return 1;
    const sel_shape sp = {G, gsize, gsize / 16, m, TG, K};
    const size_t E = (size_t)G * (size_t)gsize;
    const int top2 = m == 2 && K == 2 * TG;
    int64_t t = 0;
    if (top2) {
        if (K <= 8)
            for (; t + 16 <= n; t += 16)
                sel_block16(c + (size_t)t * E, &sp, ids + (size_t)t * (size_t)K,
                            val + (size_t)t * (size_t)K);
        for (; t + 2 <= n; t += 2) {
            const float *ca = c + (size_t)t * E, *cb = ca + E;
            int32_t *ia = ids + (size_t)t * (size_t)K, *ib = ia + K;
            float *va = val + (size_t)t * (size_t)K, *vb = va + K;
            __m512 a1, a2, b1, b2;
            __mmask16 ka[128], kb[128];
            int32_t vida[128], vidb[128];
            const unsigned keepa = sel_groups(ca, &sp, &a1, &a2);
            const unsigned keepb = sel_groups(cb, &sp, &b1, &b2);
            const int32_t nva = sel_vectors(keepa, &sp, vida), nvb = sel_vectors(keepb, &sp, vidb);
            const float tha = _mm512_mask_reduce_min_ps((__mmask16)keepa, a2);
            const float thb = _mm512_mask_reduce_min_ps((__mmask16)keepb, b2);
            const int32_t na = sel_masks(ca, vida, nva, tha, ka);
            const int32_t nb = sel_masks(cb, vidb, nvb, thb, kb);
            if (na <= 16) sel_finish(ca, vida, ka, nva, K, ia, va);
            if (nb <= 16) sel_finish(cb, vidb, kb, nvb, K, ib, vb);
            if (na > 16) sel_rest(ca, &sp, vida, nva, tha, 1, ia, va);
            if (nb > 16) sel_rest(cb, &sp, vidb, nvb, thb, 1, ib, vb);
        }
    }
    for (; t < n; t++)
        sel_one(c + (size_t)t * E, &sp, top2, ids + (size_t)t * (size_t)K, val + (size_t)t * (size_t)K);
    return 1;
}

/* NaN/Inf = exponent field all ones: the lane-wise maximum of the exponent fields (four
 * independent accumulators, one-cycle integer max) is tested once at the end, instead of
 * a mask OR per vector, whose k-register chain made this 4x slower. */
static int any_nonfinite_avx512(const float *x, int64_t n) {
    const __m512i expo = _mm512_set1_epi32(0x7f800000);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_max_epu32(a0, _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i)), expo));
        a1 = _mm512_max_epu32(a1, _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i + 16)), expo));
        a2 = _mm512_max_epu32(a2, _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i + 32)), expo));
        a3 = _mm512_max_epu32(a3, _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i + 48)), expo));
    }
    for (; i + 16 <= n; i += 16)
        a0 = _mm512_max_epu32(a0, _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i)), expo));
    if (i < n) {
        __mmask16 live = (__mmask16)((1u << (n - i)) - 1u);
        a1 = _mm512_max_epu32(a1, _mm512_and_si512(_mm512_maskz_loadu_epi32(live, x + i), expo));
    }
    const __m512i m = _mm512_max_epu32(_mm512_max_epu32(a0, a1), _mm512_max_epu32(a2, a3));
    return _mm512_cmpeq_epi32_mask(m, expo) != 0;
}


/* kernels.h's softmax_scaled with a row's tail in masked lanes: the same lane operations
 * as the simd_body.h body (whose tails went through a 16-float copy and scalar loops, a
 * fixed cost that the attention's short rows paid on every row), so the same bits: the
 * maximum is exact in any order, the sum's lanes are added in tree16's order, and the
 * tail's lanes past n hold -inf for the exp, as there. */
static void softmax_scaled_masked_avx512(float *p, int64_t n, int64_t len, float scale,
                                         float *lse) {
    const __m512 vsc = _mm512_set1_ps(scale);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    const int64_t nf = n & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (n - nf)) - 1u);
    for (int64_t i = 0; i < nf; i += 16) {
        const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(p + i), vsc);
        _mm512_storeu_ps(p + i, x);
        vmax = _mm512_max_ps(vmax, x);
    }
    if (tail) {
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p + nf), vsc);
        _mm512_mask_storeu_ps(p + nf, tail, x);
        vmax = _mm512_mask_max_ps(vmax, tail, vmax, x);
    }
    const float m = _mm512_reduce_max_ps(vmax);
    const __m512 vm = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= nf; i += 64) {
        __m512 e[4];
        for (int q = 0; q < 4; q++) e[q] = _mm512_sub_ps(_mm512_loadu_ps(p + i + 16 * q), vm);
        v_exp4_avx512(e);
        for (int q = 0; q < 4; q++) {
            _mm512_storeu_ps(p + i + 16 * q, e[q]);
            acc = _mm512_add_ps(acc, e[q]);
        }
    }
    for (; i < nf; i += 16) {
        const __m512 e = v_exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(p + i), vm));
        _mm512_storeu_ps(p + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (tail) {
        const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, p + nf);
        const __m512 e = v_exp_avx512(_mm512_sub_ps(x, vm));
        _mm512_mask_storeu_ps(p + nf, tail, e);
        acc = _mm512_add_ps(acc, e);
    }
    /* tree16: lanes j + 8, then j + 4, j + 2, j + 1 added to lane j */
    const __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(acc),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
    const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    const float s = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
    const __m512 vs = _mm512_set1_ps(s);
    for (i = 0; i < nf; i += 16) _mm512_storeu_ps(p + i, _mm512_div_ps(_mm512_loadu_ps(p + i), vs));
    if (tail) _mm512_mask_storeu_ps(p + nf, tail, _mm512_div_ps(_mm512_maskz_loadu_ps(tail, p + nf), vs));
    for (i = n; i < len; i++) p[i] = 0.0f;
    if (lse) *lse = m - logf(1.0f / s);
}

const dsmoe__kernel_table dsmoe__kernels_avx512 = {
    .name = "avx512",
    .sigmoid = k_sigmoid_avx512,
    .sigmoid_bias = k_sigmoid_bias_avx512,
    .any_nonfinite = any_nonfinite_avx512,
    .softmax = k_softmax_avx512,
    .softmax_scaled = softmax_scaled_masked_avx512,
    .bf16_to_f32 = k_bf16_to_f32_avx512,
    .dot_bf16 = k_dot_bf16_avx512,
    .swiglu = k_swiglu_avx512,
    .swiglu_backward = k_swiglu_backward_avx512,
    .group_scores = group_scores_avx512,
    .topk = topk_avx512,
    .topk_blocks = topk_blocks_avx512,
    .select_grouped = select_grouped_avx512,
    .gemm_nt = dsmoe__gemm_nt_avx512,
    .gemm_pk = dsmoe__gemm_pk_avx512,
    .sgemm_small = dsmoe__sgemm_small_avx512,
};
