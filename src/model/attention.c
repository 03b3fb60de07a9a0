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
 * The naive form's products are BLAS calls (kernels/blas.h, one thread each): per head
 * the expansion latent · W_hᵀ of every position, then per block of 64 queries the scores
 * q_nope · k_nopeᵀ + q_pe · k_peᵀ and the weighted sum of the values, so a prompt's
 * attention runs near the machine's FMA rate. The absorbed form's scores and output go
 * through the MoE layer's skinny product dsmoe__moe_gemm_nt (kernels.h): up to 64 rows
 * against contiguous rows, 16 fixed partial sums, the same bits on every ISA; a score is
 * one dot product [q̃ | q_pe] · [latent | k_pe] against the cache rows themselves. Its
 * weighted sums and q̃ are plain loops over rows in order (vectorised by the compiler).
 *
 * Threads: the naive form over heads (a head's expansion serves all its queries), the
 * absorbed form over (query, block of heads) pairs: a decoding token's heads share each
 * cache row as it streams by, and the blocks shrink to give every thread work when the
 * tokens are few. Each result is computed by one thread in an order fixed by the shapes
 * (never by the blocking), so the bits never depend on the thread count.
 */
#include "kernels/blas.h"
#include "kernels/kernels.h"
#include "model/model_internal.h"

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Queries per block (rows of one dsmoe__moe_gemm_nt call). */
#define QB DSMOE__MOE_SKINNY_N

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

size_t dsmoe__attn_scratch_floats(const dsmoe_model_config *c, int64_t P) {
    const int64_t n = c->qk_nope_head_dim, r = c->qk_rope_head_dim, v = c->v_head_dim,
                  kc = c->kv_lora_rank;
    int64_t naive = P * (n + v) + QB * P, absorbed = QB * (2 * kc + r) + QB * P;
    int64_t m = naive > absorbed ? naive : absorbed;
    return dsmoe__align64((size_t)m * sizeof(float)) / sizeof(float);
}

/* Row i of S (cnt entries) times scale, then softmax in place: exp(s − max), each
 * divided by the sum. */
static void softmax(float *p, int64_t cnt, float scale) {
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < cnt; j++) {
        p[j] *= scale;
        if (p[j] > mx) mx = p[j];
    }
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
    (void)nt; /* unused without OpenMP */
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t h = 0; h < H; h++) {
        float *kv = a->scratch + a->per_thread * (size_t)thread_id(); /* (P, n + v) */
        float *S = kv + P * (n + v);                                   /* (QB, P) */
        const float *W = a->kv_b + h * (n + v) * kc;                   /* (n + v, c) */
        /* k_nope_j | value_j of every position: latent (P, c) · W_hᵀ */
        dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, (int)P, (int)(n + v), (int)kc, 1.0f, a->kv,
                     (int)(kc + r), W, (int)kc, 0.0f, kv, (int)(n + v));
        for (int64_t i0 = 0; i0 < T; i0 += QB) {
            const int nb = (int)(T - i0 < QB ? T - i0 : QB);
            const int64_t Pb = a->pos0 + i0 + nb; /* positions the block's last query sees */
            const float *qb = a->q + (i0 * H + h) * (n + r);
            const int ldq = (int)(H * (n + r));
            /* scores: q_nope · k_nopeᵀ + q_pe · k_peᵀ over the first Pb positions */
            dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, nb, (int)Pb, (int)n, 1.0f, qb, ldq, kv,
                         (int)(n + v), 0.0f, S, (int)Pb);
            dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, nb, (int)Pb, (int)r, 1.0f, qb + n, ldq,
                         a->kv + kc, (int)(kc + r), 1.0f, S, (int)Pb);
            /* causal softmax per row; the positions a query does not see weigh 0 */
            for (int i = 0; i < nb; i++) {
                const int64_t cnt = a->pos0 + i0 + i + 1;
                float *p = S + i * Pb;
                softmax(p, cnt, a->scale);
                for (int64_t j = cnt; j < Pb; j++) p[j] = 0.0f;
            }
            /* out = P · values */
            dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__NOTRANS, nb, (int)v, (int)Pb, 1.0f, S, (int)Pb,
                         kv + n, (int)(n + v), 0.0f, a->out + (i0 * H + h) * v, (int)(H * v));
        }
    }
}

void dsmoe__attn_absorbed(const dsmoe__attn_args *a) {
    const dsmoe_model_config *c = a->c;
    const int64_t H = c->num_attention_heads, n = c->qk_nope_head_dim, r = c->qk_rope_head_dim,
                  v = c->v_head_dim, kc = c->kv_lora_rank, T = a->T;
    const int nt = a->n_threads > 1 ? a->n_threads : 1;
    /* Heads in blocks of at most 64: a block's queries meet each cache row once. With
     * fewer queries than threads the blocks shrink so that every thread has one; a
     * result never depends on which heads share a block. */
    int64_t nhb = (H + QB - 1) / QB, want = (nt + T - 1) / T;
    if (want > H) want = H;
    if (nhb < want) nhb = want;
    const int64_t HB = (H + nhb - 1) / nhb;
    nhb = (H + HB - 1) / HB;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t it = 0; it < T * nhb; it++) {
        const int64_t i = it / nhb, h0 = it % nhb * HB, cnt = a->pos0 + i + 1;
        const int hb = (int)(H - h0 < HB ? H - h0 : HB);
        float *xq = a->scratch + a->per_thread * (size_t)thread_id(); /* (QB, c + r) */
        float *lat = xq + QB * (kc + r);                                /* (QB, c) */
        float *S = lat + QB * kc;                                       /* (QB, cnt) */
        const float *X[QB];
        /* [q̃ | q_pe] per head: q̃ = q_nope · W_UK_h, the rows of W_UK_h weighted in order */
        for (int b = 0; b < hb; b++) {
            const float *qn = a->q + (i * H + h0 + b) * (n + r);
            const float *W = a->kv_b + (h0 + b) * (n + v) * kc; /* (n + v, c) */
            float *qt = xq + b * (kc + r);
            for (int64_t k = 0; k < kc; k++) qt[k] = 0.0f;
            for (int64_t o = 0; o < n; o++) {
                const float qo = qn[o], *w = W + o * kc;
                for (int64_t k = 0; k < kc; k++) qt[k] += qo * w[k];
            }
            memcpy(qt + kc, qn + n, (size_t)r * sizeof(float));
            X[b] = qt;
        }
        /* scores of the block's heads against the cache rows [latent | k_pe] */
        dsmoe__moe_gemm_nt(S, cnt, X, hb, a->kv, DSMOE_DTYPE_F32, 0, (int)cnt, (int)(kc + r));
        for (int b = 0; b < hb; b++) {
            softmax(S + b * cnt, cnt, a->scale);
            float *l = lat + b * kc;
            for (int64_t k = 0; k < kc; k++) l[k] = 0.0f;
        }
        /* Σ_j p_j latent_j per head, positions in order (each cache row read once) */
        for (int64_t j = 0; j < cnt; j++) {
            const float *row = a->kv + j * (kc + r);
            for (int b = 0; b < hb; b++) {
                const float pj = S[b * cnt + j];
                float *l = lat + b * kc;
                for (int64_t k = 0; k < kc; k++) l[k] += pj * row[k];
            }
        }
        /* out_h = W_UV_h · Σ_j p_j latent_j */
        for (int b = 0; b < hb; b++) {
            const float *W = a->kv_b + (h0 + b) * (n + v) * kc;
            const float *l = lat + b * kc;
            dsmoe__moe_gemm_nt(a->out + (i * H + h0 + b) * v, v, &l, 1, W + n * kc,
                               DSMOE_DTYPE_F32, 0, (int)v, (int)kc);
        }
    }
}
