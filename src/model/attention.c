/*
 * attention.c — multi-head latent attention over a cache of compressed latents
 * (DeepSeek-V2 paper §2.1, SPEC-model §3), in its two forms:
 *
 *   naive     per head h, the latent of every position j < P is expanded through
 *             kv_b_proj's rows of h: k_nope_j = W_UK_h · latent_j (n), value_j =
 *             W_UV_h · latent_j (v); score(i, j) = (q_nope_i · k_nope_j + q_pe_i · k_pe_j)
 *             · scale; out_i = Σ_j softmax_j · value_j.
 *   absorbed  W_UK_h moves into the query and W_UV_h behind the weighted sum:
 *             q̃_i = q_nope_i · W_UK_h (c), score(i, j) = (q̃_i · latent_j + q_pe_i · k_pe_j)
 *             · scale, out_i = W_UV_h · Σ_j softmax_j · latent_j.
 *
 * The same products associated differently, so the two agree within fp32 rounding.
 * Query i sits at position pos0 + i and sees positions 0 .. pos0 + i (causal). Softmax
 * in fp32 (max subtracted, exp, sum, then each weight divided by the sum, as blocks.c).
 * Plain C loops: the compiler vectorises the dot products (omp simd reductions) and the
 * weighted sums.
 *
 * Threads: the naive form over heads (a head's expansion serves all its queries), the
 * absorbed form over (query, head) pairs; each result is computed by one thread in an
 * order fixed by the shapes, so the bits never depend on the thread count.
 */
#include "model/model_internal.h"

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Σ_k a[k] · b[k]: vector lanes of partial sums (the compiler's fixed split; never
 * dependent on the thread count). */
static float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < n; k++) acc += a[k] * b[k];
    return acc;
}

size_t dsmoe__attn_scratch_floats(const dsmoe_model_config *c, int64_t P) {
    const int64_t n = c->qk_nope_head_dim, v = c->v_head_dim, kc = c->kv_lora_rank;
    int64_t naive = P * (n + v) + P, absorbed = P + 2 * kc;
    int64_t m = naive > absorbed ? naive : absorbed;
    return dsmoe__align64((size_t)m * sizeof(float)) / sizeof(float);
}

/* Softmax of p[0..cnt) in place: exp(p − max) then each divided by the sum. */
static void softmax(float *p, int64_t cnt) {
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < cnt; j++)
        if (p[j] > mx) mx = p[j];
    for (int64_t j = 0; j < cnt; j++) {
        p[j] = expf(p[j] - mx);
        sum += p[j];
    }
    for (int64_t j = 0; j < cnt; j++) p[j] /= sum;
}

void dsmoe__attn_naive(const dsmoe__attn_args *a) {
    const dsmoe_model_config *c = a->c;
    const int64_t H = c->num_attention_heads, n = c->qk_nope_head_dim, r = c->qk_rope_head_dim,
                  v = c->v_head_dim, kc = c->kv_lora_rank, T = a->T, P = a->pos0 + a->T;
    const int nt = a->n_threads > 1 ? a->n_threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t h = 0; h < H; h++) {
        float *kvx = a->scratch + a->per_thread * (size_t)thread_id(); /* (P, n + v) */
        float *p = kvx + P * (n + v);                                  /* (P) */
        const float *W = a->kv_b + h * (n + v) * kc;                   /* (n + v, c) */
        for (int64_t j = 0; j < P; j++) {
            const float *lat = a->kv + j * (kc + r);
            for (int64_t o = 0; o < n + v; o++) kvx[j * (n + v) + o] = dot(W + o * kc, lat, kc);
        }
        for (int64_t i = 0; i < T; i++) {
            const float *qn = a->q + (i * H + h) * (n + r), *qp = qn + n;
            const int64_t cnt = a->pos0 + i + 1;
            for (int64_t j = 0; j < cnt; j++)
                p[j] = (dot(qn, kvx + j * (n + v), n) + dot(qp, a->kv + j * (kc + r) + kc, r)) *
                       a->scale;
            softmax(p, cnt);
            float *o = a->out + (i * H + h) * v;
            for (int64_t k = 0; k < v; k++) o[k] = 0.0f;
            for (int64_t j = 0; j < cnt; j++) {
                const float *val = kvx + j * (n + v) + n;
                for (int64_t k = 0; k < v; k++) o[k] += p[j] * val[k];
            }
        }
    }
}

void dsmoe__attn_absorbed(const dsmoe__attn_args *a) {
    const dsmoe_model_config *c = a->c;
    const int64_t H = c->num_attention_heads, n = c->qk_nope_head_dim, r = c->qk_rope_head_dim,
                  v = c->v_head_dim, kc = c->kv_lora_rank, T = a->T;
    const int nt = a->n_threads > 1 ? a->n_threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t it = 0; it < T * H; it++) {
        const int64_t i = it / H, h = it % H, cnt = a->pos0 + i + 1;
        float *qt = a->scratch + a->per_thread * (size_t)thread_id(); /* (c) */
        float *lat = qt + kc;                                          /* (c) */
        float *p = lat + kc;                                           /* (P) */
        const float *W = a->kv_b + h * (n + v) * kc;                   /* (n + v, c) */
        const float *qn = a->q + (i * H + h) * (n + r), *qp = qn + n;
        /* q̃ = q_nope · W_UK_h: the rows of W_UK_h weighted by q_nope, in row order */
        for (int64_t k = 0; k < kc; k++) qt[k] = 0.0f;
        for (int64_t o = 0; o < n; o++) {
            const float qo = qn[o], *w = W + o * kc;
            for (int64_t k = 0; k < kc; k++) qt[k] += qo * w[k];
        }
        for (int64_t j = 0; j < cnt; j++) {
            const float *row = a->kv + j * (kc + r);
            p[j] = (dot(qt, row, kc) + dot(qp, row + kc, r)) * a->scale;
        }
        softmax(p, cnt);
        for (int64_t k = 0; k < kc; k++) lat[k] = 0.0f;
        for (int64_t j = 0; j < cnt; j++) {
            const float *row = a->kv + j * (kc + r);
            for (int64_t k = 0; k < kc; k++) lat[k] += p[j] * row[k];
        }
        float *o = a->out + (i * H + h) * v;
        for (int64_t k = 0; k < v; k++) o[k] = dot(W + (n + k) * kc, lat, kc);
    }
}
