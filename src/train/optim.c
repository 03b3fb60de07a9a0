/*
 * optim.c — AdamW, its learning-rate schedule and global-norm clipping, computed as
 * torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ do (see dsmoe/train.h).
 */
#include "train/train_internal.h"
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(DSMOE_HAVE_AVX512) && defined(__x86_64__)
#include <immintrin.h>
#define ADAMW_AVX512 1
#endif

/* The order of the fp32 operations follows torch.optim.AdamW's single-tensor path
 * (addcmul: (value·g)·g; addcdiv: (value·m) / denom), so results agree to rounding. */

void dsmoe_adamw_config_default(dsmoe_adamw_config *cfg) {
    if (!cfg) return;
    cfg->lr = 3e-3f;
    cfg->beta1 = 0.9f;
    cfg->beta2 = 0.95f;
    cfg->eps = 1e-8f;
    cfg->weight_decay = 0.1f;
    cfg->clip_norm = 1.0f;
    cfg->warmup_steps = 100;
    cfg->total_steps = 1000;
    cfg->min_lr_ratio = 0.1f;
}

dsmoe_status dsmoe_adamw_config_validate(const dsmoe_adamw_config *c) {
    if (!c) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "adamw: NULL config");
#define BAD(cond, field, fmt, v)                                                                   \
    if (cond) return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "adamw: " field " " fmt, v)
    BAD(!(c->lr > 0 && isfinite(c->lr)), "lr", "must be a positive number, found %g", (double)c->lr);
    BAD(!(c->beta1 >= 0 && c->beta1 < 1), "beta1", "must be in [0, 1), found %g", (double)c->beta1);
    BAD(!(c->beta2 >= 0 && c->beta2 < 1), "beta2", "must be in [0, 1), found %g", (double)c->beta2);
    BAD(!(c->eps > 0 && isfinite(c->eps)), "eps", "must be a positive number, found %g", (double)c->eps);
    BAD(!(c->weight_decay >= 0 && isfinite(c->weight_decay)), "weight_decay",
        "must be >= 0, found %g", (double)c->weight_decay);
    BAD(!(c->clip_norm >= 0 && isfinite(c->clip_norm)), "clip_norm", "must be >= 0, found %g",
        (double)c->clip_norm);
    BAD(c->total_steps < 1, "total_steps", "must be >= 1, found %lld", (long long)c->total_steps);
    BAD(c->warmup_steps < 0 || c->warmup_steps > c->total_steps, "warmup_steps",
        "must be in [0, total_steps], found %lld", (long long)c->warmup_steps);
    BAD(!(c->min_lr_ratio >= 0 && c->min_lr_ratio <= 1), "min_lr_ratio", "must be in [0, 1], found %g",
        (double)c->min_lr_ratio);
#undef BAD
    return DSMOE_OK;
}

double dsmoe_adamw_lr(const dsmoe_adamw_config *c, int64_t t) {
    const double lr = c->lr, lo = lr * c->min_lr_ratio;
    if (t < 1) t = 1;
    if (t <= c->warmup_steps) return lr * (double)t / (double)c->warmup_steps;
    if (t > c->total_steps) return lo;
    const double pi = 3.14159265358979323846;
    double prog = (double)(t - c->warmup_steps) / (double)(c->total_steps - c->warmup_steps);
    return lo + (lr - lo) * 0.5 * (1.0 + cos(pi * prog));
}

#define SS_BLOCK 4096
/* Blocks whose sums one parallel region computes (16.7 M values: one region for most
 * tensors), and the fewest worth a region. */
#define SS_ROUND 4096
#define SS_PAR_MIN 64

/* Σ g² of one block in float64, one chain in index order. */
static double ss_block(const float *g, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)g[i] * (double)g[i];
    return s;
}

#ifdef ADAMW_AVX512
/* ss_block of 8 whole blocks, a block a float64 lane: 8 values of each block squared,
 * transposed so that vector c_k holds value k of every block, then added to the sums in
 * k order. Each block's sum stays one chain in index order (ss_block's bits); the
 * chains of the 8 blocks move together instead of waiting on the add's latency. */
__attribute__((target("avx512f"))) static void ss_blocks8(const float *g, double *out) {
    __m512d acc = _mm512_setzero_pd();
    for (int64_t i = 0; i < SS_BLOCK; i += 8) {
        __m512d r[8];
        for (int j = 0; j < 8; j++) {
            r[j] = _mm512_cvtps_pd(_mm256_loadu_ps(g + (int64_t)j * SS_BLOCK + i));
            r[j] = _mm512_mul_pd(r[j], r[j]);
        }
        const __m512d t0 = _mm512_unpacklo_pd(r[0], r[1]), t1 = _mm512_unpackhi_pd(r[0], r[1]),
                      t2 = _mm512_unpacklo_pd(r[2], r[3]), t3 = _mm512_unpackhi_pd(r[2], r[3]),
                      t4 = _mm512_unpacklo_pd(r[4], r[5]), t5 = _mm512_unpackhi_pd(r[4], r[5]),
                      t6 = _mm512_unpacklo_pd(r[6], r[7]), t7 = _mm512_unpackhi_pd(r[6], r[7]);
        const __m512d u0 = _mm512_shuffle_f64x2(t0, t2, 0x88), u1 = _mm512_shuffle_f64x2(t1, t3, 0x88),
                      u2 = _mm512_shuffle_f64x2(t0, t2, 0xdd), u3 = _mm512_shuffle_f64x2(t1, t3, 0xdd),
                      u4 = _mm512_shuffle_f64x2(t4, t6, 0x88), u5 = _mm512_shuffle_f64x2(t5, t7, 0x88),
                      u6 = _mm512_shuffle_f64x2(t4, t6, 0xdd), u7 = _mm512_shuffle_f64x2(t5, t7, 0xdd);
        acc = _mm512_add_pd(acc, _mm512_shuffle_f64x2(u0, u4, 0x88));
        acc = _mm512_add_pd(acc, _mm512_shuffle_f64x2(u1, u5, 0x88));
        acc = _mm512_add_pd(acc, _mm512_shuffle_f64x2(u2, u6, 0x88));
        acc = _mm512_add_pd(acc, _mm512_shuffle_f64x2(u3, u7, 0x88));
        acc = _mm512_add_pd(acc, _mm512_shuffle_f64x2(u0, u4, 0xdd));
        acc = _mm512_add_pd(acc, _mm512_shuffle_f64x2(u1, u5, 0xdd));
        acc = _mm512_add_pd(acc, _mm512_shuffle_f64x2(u2, u6, 0xdd));
        acc = _mm512_add_pd(acc, _mm512_shuffle_f64x2(u3, u7, 0xdd));
    }
    _mm512_storeu_pd(out, acc);
}
#endif

/* Blocks q .. q + 3 (those below nb) of the round at r0: four chains side by side. */
static void ss_blocks4(const float *g, int64_t n, int64_t r0, int q, int nb, double *sums) {
    const float *g0 = g + r0 + (int64_t)q * SS_BLOCK;
    if (q + 4 <= nb && r0 + (int64_t)(q + 4) * SS_BLOCK <= n) {
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
        const float *g1 = g0 + SS_BLOCK, *g2 = g1 + SS_BLOCK, *g3 = g2 + SS_BLOCK;
        for (int64_t i = 0; i < SS_BLOCK; i++) {
            s0 += (double)g0[i] * (double)g0[i];
            s1 += (double)g1[i] * (double)g1[i];
            s2 += (double)g2[i] * (double)g2[i];
            s3 += (double)g3[i] * (double)g3[i];
        }
        sums[q] = s0, sums[q + 1] = s1, sums[q + 2] = s2, sums[q + 3] = s3;
        return;
    }
    for (int k = q; k < nb && k < q + 4; k++) {
        const int64_t b = r0 + (int64_t)k * SS_BLOCK;
        sums[k] = ss_block(g + b, n - b < SS_BLOCK ? n - b : SS_BLOCK);
    }
}

double dsmoe_sum_squares(const float *g, int64_t n, int n_threads) {
    /* The blocks' sums added in block order: the same bits for any thread count. Rounds
     * of up to SS_ROUND blocks share the threads (eight blocks a work item, their chains
     * side by side: one chain is bound by the add's latency). */
    const int nt = n_threads > 1 ? n_threads : 1;
    (void)nt; /* unused without OpenMP */
    double total = 0.0;
#ifdef ADAMW_AVX512
    const int wide = strcmp(dsmoe__kernels()->name, "avx512") == 0;
#endif
    for (int64_t r0 = 0; r0 < n; r0 += (int64_t)SS_ROUND * SS_BLOCK) {
        double sums[SS_ROUND];
        const int64_t rest = n - r0;
        const int nb = (int)(rest >= (int64_t)SS_ROUND * SS_BLOCK ? SS_ROUND
                                                                  : (rest + SS_BLOCK - 1) / SS_BLOCK);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nb >= SS_PAR_MIN)
        for (int q = 0; q < nb; q += 8) {
#ifdef ADAMW_AVX512
            if (q + 8 <= nb && r0 + (int64_t)(q + 8) * SS_BLOCK <= n && wide) {
                ss_blocks8(g + r0 + (int64_t)q * SS_BLOCK, sums + q);
                continue;
            }
#endif
            for (int k = q; k < nb && k < q + 8; k += 4) ss_blocks4(g, n, r0, k, nb, sums);
        }
        for (int k = 0; k < nb; k++) total += sums[k];
    }
    return total;
}

void dsmoe__sum_squares_each(const dsmoe__adamw_segment *seg, int64_t n_seg, double *out,
                             int n_threads) {
    const int nt = n_threads > 1 ? n_threads : 1;
    int64_t total = 0;
    for (int64_t j = 0; j < n_seg; j++) total += seg[j].n;
    (void)nt, (void)total; /* read only by the OpenMP pragma */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && n_seg > 1 && total > 65536)
    for (int64_t j = 0; j < n_seg; j++) out[j] = dsmoe_sum_squares(seg[j].g, seg[j].n, 1);
}

float dsmoe_adamw_clip_factor(const dsmoe_adamw_config *c, double norm) {
    if (c->clip_norm <= 0) return 1.0f;
    double f = (double)c->clip_norm / (norm + 1e-6);
    return f < 1.0 ? (float)f : 1.0f;
}

/* The constants of one step: decay of a tensor without and with weight decay. */
typedef struct adamw_step {
    float decay[2], b1, b2, a1, a2, eps, step, bc2s;
} adamw_step;

static adamw_step adamw_step_of(const dsmoe_adamw_config *c, int64_t t, double lr, double wd) {
    if (t < 1) t = 1;
    adamw_step s;
    s.decay[0] = (float)(1.0 - lr * 0.0);
    s.decay[1] = (float)(1.0 - lr * wd);
    s.b1 = c->beta1;
    s.b2 = c->beta2;
    s.a1 = (float)(1.0 - c->beta1);
    s.a2 = (float)(1.0 - c->beta2);
    s.eps = c->eps;
    const double bc1 = 1.0 - pow((double)c->beta1, (double)t),
                 bc2 = 1.0 - pow((double)c->beta2, (double)t);
    s.step = (float)(lr / bc1);
    s.bc2s = (float)sqrt(bc2);
    return s;
}

/* adamw_range's loop over W lanes of vector type VT (the prefix P names the intrinsics:
 * _mm for SSE, _mm512 for AVX-512): each lane is the scalar loop's IEEE operations in its
 * order (square root and division are correctly rounded at any width), so every width
 * gives the scalar loop's bits. Advances i. */
#define ADAMW_LANES(VT, P, W)                                                                      \
    do {                                                                                           \
        const VT vb1 = P##_set1_ps(s->b1), vb2 = P##_set1_ps(s->b2), va1 = P##_set1_ps(s->a1),    \
                 va2 = P##_set1_ps(s->a2), veps = P##_set1_ps(s->eps),                             \
                 vnstep = P##_set1_ps(-s->step), vbc2s = P##_set1_ps(s->bc2s),                    \
                 vdecay = P##_set1_ps(decay), vgs = P##_set1_ps(grad_scale);                      \
        for (; i + (W) <= i1; i += (W)) {                                                          \
            VT gi = P##_mul_ps(P##_loadu_ps(g + i), vgs);                                          \
            VT pi = P##_mul_ps(P##_loadu_ps(p + i), vdecay);                                       \
            VT mi = P##_add_ps(P##_mul_ps(P##_loadu_ps(m + i), vb1), P##_mul_ps(va1, gi));         \
            VT vi = P##_add_ps(P##_mul_ps(P##_loadu_ps(v + i), vb2),                               \
                               P##_mul_ps(P##_mul_ps(va2, gi), gi));                               \
            P##_storeu_ps(m + i, mi);                                                              \
            P##_storeu_ps(v + i, vi);                                                              \
            VT den = P##_add_ps(P##_div_ps(P##_sqrt_ps(vi), vbc2s), veps);                         \
            P##_storeu_ps(p + i, P##_add_ps(pi, P##_div_ps(P##_mul_ps(vnstep, mi), den)));         \
        }                                                                                          \
    } while (0)

#ifdef ADAMW_AVX512
/* adamw_range's lanes 16 at a time (ADAMW_LANES: the same bits). */
__attribute__((target("avx512f"))) static int64_t adamw_range16(const adamw_step *s, float decay,
                                                               float *p, float *m, float *v,
                                                               const float *g, int64_t i0,
                                                               int64_t i1, float grad_scale) {
    int64_t i = i0;
    ADAMW_LANES(__m512, _mm512, 16);
    return i;
}
#endif

/* Elements [i0, i1) of one tensor. */
static void adamw_range(const adamw_step *s, float decay, float *p, float *m, float *v,
                        const float *g, int64_t i0, int64_t i1, float grad_scale) {
    const float b1 = s->b1, b2 = s->b2, a1 = s->a1, a2 = s->a2, eps = s->eps, step = s->step,
                bc2s = s->bc2s;
    int64_t i = i0;
#ifdef ADAMW_AVX512
    if (strcmp(dsmoe__kernels()->name, "avx512") == 0)
        i = adamw_range16(s, decay, p, m, v, g, i0, i1, grad_scale);
#endif
#if defined(__SSE2__)
    ADAMW_LANES(__m128, _mm, 4); /* four lanes: the same bits */
#endif
    for (; i < i1; i++) {
        float gi = g[i] * grad_scale;
        float pi = p[i] * decay;
        float mi = m[i] * b1 + a1 * gi;
        float vi = v[i] * b2 + (a2 * gi) * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi + (-step * mi) / (sqrtf(vi) / bc2s + eps);
    }
}

/* Elements per work item of the whole-model update: threads take items in a fixed
 * static split; each element's operations are the same whoever runs it. */
#define ADAMW_CHUNK 16384

void dsmoe_adamw_update(const dsmoe_adamw_config *c, float *p, float *m, float *v, const float *g,
                        int64_t n, int64_t t, double lr, double wd, float grad_scale, int n_threads) {
    const adamw_step s = adamw_step_of(c, t, lr, wd);
    const int nt = n_threads > 1 ? n_threads : 1;
    (void)nt; /* unused without OpenMP */
    if (nt > 1 && n > 65536) {
        const int64_t nc = (n + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t k = 0; k < nc; k++) {
            const int64_t i0 = k * ADAMW_CHUNK, i1 = i0 + ADAMW_CHUNK < n ? i0 + ADAMW_CHUNK : n;
            adamw_range(&s, s.decay[1], p, m, v, g, i0, i1, grad_scale);
        }
    } else {
        adamw_range(&s, s.decay[1], p, m, v, g, 0, n, grad_scale);
    }
}

void dsmoe__adamw_update_all(const dsmoe_adamw_config *c, const dsmoe__adamw_segment *seg,
                             int64_t n_seg, int64_t t, double lr, float grad_scale, int n_threads) {
    const adamw_step s = adamw_step_of(c, t, lr, (double)c->weight_decay);
    const int nt = n_threads > 1 ? n_threads : 1;
    int64_t total = 0;
    for (int64_t j = 0; j < n_seg; j++) total += seg[j].n;
    (void)nt; /* nt and total: read only by the OpenMP pragma */
    (void)total;
#pragma omp parallel num_threads(nt) if (nt > 1 && total > 65536)
    for (int64_t j = 0; j < n_seg; j++) {
        const dsmoe__adamw_segment *q = &seg[j];
        const float decay = s.decay[q->decay != 0];
        const int64_t nc = (q->n + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
#pragma omp for schedule(static) nowait
        for (int64_t k = 0; k < nc; k++) {
            const int64_t i0 = k * ADAMW_CHUNK, i1 = i0 + ADAMW_CHUNK < q->n ? i0 + ADAMW_CHUNK : q->n;
            adamw_range(&s, decay, q->p, q->m, q->v, q->g, i0, i1, grad_scale);
        }
    }
}
