/*
 * grad_mla.c — multi-head latent attention for training (naive form, SPEC-model §3–§5):
 * the forward over B sequences of T tokens saving what the backward needs, and the
 * backward (formulas in model_grad.h).
 *
 * The attention of one (sequence, head) is one task: it reads that sequence's rows and
 * writes only that head's columns (and its own part of dk_pe), so the tasks run on any
 * threads in any order with the same bits. Inside a task the queries go in fixed blocks
 * of ATT_QB rows, in order: the scores of a block against the keys up to its last row,
 * a (rows × keys) matrix written where the forward saves that block's probabilities,
 * come from BLAS products, the causal mask and the softmax (fp32, as blocks.c) from the
 * softmax_scaled kernel in place, and the products with the values and the backward's
 * products (which read the saved probabilities) from BLAS again.
 */
#include "model/model_grad.h"

#include "kernels/blas.h"
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

/* Query rows per block of the attention. */
#define ATT_QB 64

/* Elements below which a row-wise pass stays on the calling thread (a parallel region's
 * wake and join cost about as much); the rows are the same either way. */
#define MLA_PAR_MIN 65536

typedef struct mla_dims {
    int64_t B, T, N, D, H, n, r, v, c, q, half;
    int64_t qb; /* rows of a query block: min(T, ATT_QB) */
} mla_dims;

static mla_dims dims_of(const dsmoe_model_config *c, int64_t B, int64_t T) {
    mla_dims m;
    m.B = B;
    m.T = T;
    m.N = B * T;
    m.D = c->hidden_size;
    m.H = c->num_attention_heads;
    m.n = c->qk_nope_head_dim;
    m.r = c->qk_rope_head_dim;
    m.v = c->v_head_dim;
    m.c = c->kv_lora_rank;
    m.q = c->q_lora_rank > 0 ? c->q_lora_rank : 0;
    m.half = m.r / 2;
    m.qb = T < ATT_QB ? T : ATT_QB;
    return m;
}

/* Lays out consecutive 64-byte-aligned arrays: offsets first (so that the sizes need no
 * buffer), pointers from a buffer after. */
typedef struct lay {
    size_t off;
} lay;
static size_t take(lay *l, int64_t count, size_t elem) {
    size_t at = l->off;
    l->off += dsmoe__align64((size_t)count * elem);
    return at;
}
#define AT(type, base, off) ((type *)(void *)((const char *)(base) + (off)))

typedef struct mla_save_off {
    size_t qa, qa_inv, qf, kv, kv_inv, kvb, out, lse, prob, total;
} mla_save_off;
typedef struct mla_save {
    float *qa, *qa_inv; /* (N, q), (N) — q > 0 only */
    float *qf;          /* (N, H, n + r) after RoPE */
    float *kv, *kv_inv; /* (N, c + r): latent before its norm | k_pe after RoPE; (N) */
    float *kvb;         /* (N, H, n + v) */
    float *out;         /* (N, H, v) */
    float *lse;         /* (N, H) */
    float *prob;        /* (B·H, prob_floats): each task's probabilities, block by block */
} mla_save;

/* Floats of one (sequence, head)'s saved probabilities: each block of qb query rows from
 * i0 keeps its (rows, i0 + rows) probabilities (zeros right of the diagonal), row-major;
 * block i0 starts at prob_at(m, i0). The backward reads them instead of recomputing the
 * scores and their softmax. */
static int64_t prob_at(const mla_dims *m, int64_t i0) {
    int64_t at = 0;
    for (int64_t b0 = 0; b0 < i0 && b0 < m->T; b0 += m->qb) {
        const int64_t rows = m->T - b0 < m->qb ? m->T - b0 : m->qb;
        at += rows * (b0 + rows);
    }
    return at;
}
static int64_t prob_floats(const mla_dims *m) { return prob_at(m, m->T); }

static mla_save_off save_offsets(const mla_dims *m) {
    lay l = {0};
    mla_save_off o;
    o.qa = take(&l, m->N * m->q, sizeof(float));
    o.qa_inv = take(&l, m->q > 0 ? m->N : 0, sizeof(float));
    o.qf = take(&l, m->N * m->H * (m->n + m->r), sizeof(float));
    o.kv = take(&l, m->N * (m->c + m->r), sizeof(float));
    o.kv_inv = take(&l, m->N, sizeof(float));
    o.kvb = take(&l, m->N * m->H * (m->n + m->v), sizeof(float));
    o.out = take(&l, m->N * m->H * m->v, sizeof(float));
    o.lse = take(&l, m->N * m->H, sizeof(float));
    o.prob = take(&l, m->B * m->H * prob_floats(m), sizeof(float));
    o.total = l.off;
    return o;
}
static mla_save save_at(const mla_dims *m, const void *base) {
    const mla_save_off o = save_offsets(m);
    mla_save s;
    s.qa = AT(float, base, o.qa);
    s.qa_inv = AT(float, base, o.qa_inv);
    s.qf = AT(float, base, o.qf);
    s.kv = AT(float, base, o.kv);
    s.kv_inv = AT(float, base, o.kv_inv);
    s.kvb = AT(float, base, o.kvb);
    s.out = AT(float, base, o.out);
    s.lse = AT(float, base, o.lse);
    s.prob = AT(float, base, o.prob);
    return s;
}

/* Scratch floats of one attention task: its keys (T, n + r) in the forward; the gradient
 * of a block's probabilities (qb, T), the keys and their gradient in the backward. */
static int64_t task_floats(const mla_dims *m, int backward) {
    return (backward ? m->qb * m->T : 0) + (backward ? 2 : 1) * m->T * (m->n + m->r);
}

typedef struct mla_fws_off {
    size_t qa_n, lat_n, cs, inv_freq, att, total;
} mla_fws_off;
typedef struct mla_fws {
    float *qa_n, *lat_n, *cs; /* (N, q), (N, c), (T, r) */
    double *inv_freq;         /* (r / 2) */
    float *att;               /* (B·H, T(n + r)): each task's keys [k_nope | k_pe] side by
                                 side */
} mla_fws;

static mla_fws_off fws_offsets(const mla_dims *m) {
    lay l = {0};
    mla_fws_off o;
    o.qa_n = take(&l, m->N * m->q, sizeof(float));
    o.lat_n = take(&l, m->N * m->c, sizeof(float));
    o.cs = take(&l, m->T * m->r, sizeof(float));
    o.inv_freq = take(&l, m->half, sizeof(double));
    o.att = take(&l, m->B * m->H * task_floats(m, 0), sizeof(float));
    o.total = l.off;
    return o;
}
static mla_fws fws_at(const mla_dims *m, void *base) {
    const mla_fws_off o = fws_offsets(m);
    mla_fws w;
    w.qa_n = AT(float, base, o.qa_n);
    w.lat_n = AT(float, base, o.lat_n);
    w.cs = AT(float, base, o.cs);
    w.inv_freq = AT(double, base, o.inv_freq);
    w.att = AT(float, base, o.att);
    return w;
}

typedef struct mla_bws_off {
    size_t dout, qa_n, lat_n, dq, dkvb, dkpe_h, dkv, dlat, dqa, cs, inv_freq, att, total;
} mla_bws_off;
typedef struct mla_bws {
    float *dout;          /* (N, H v) */
    float *qa_n, *lat_n;  /* (N, q), (N, c) recomputed from the saved values */
    float *dq;            /* (N, H, n + r) */
    float *dkvb;          /* (N, H, n + v) */
    float *dkpe_h;        /* (N, H, r): each head's part of dk_pe */
    float *dkv;           /* (N, c + r) */
    float *dlat, *dqa;    /* (N, c), (N, q) */
    float *cs;            /* (T, r) */
    double *inv_freq;     /* (r / 2) */
    float *att;           /* (B·H, qb·T + 2·T(n + r)): each task's gradient of a block's
                             probabilities, its keys [k_nope | k_pe] and their gradient */
} mla_bws;

static mla_bws_off bws_offsets(const mla_dims *m) {
    lay l = {0};
    mla_bws_off o;
    o.dout = take(&l, m->N * m->H * m->v, sizeof(float));
    o.qa_n = take(&l, m->N * m->q, sizeof(float));
    o.lat_n = take(&l, m->N * m->c, sizeof(float));
    o.dq = take(&l, m->N * m->H * (m->n + m->r), sizeof(float));
    o.dkvb = take(&l, m->N * m->H * (m->n + m->v), sizeof(float));
    o.dkpe_h = take(&l, m->N * m->H * m->r, sizeof(float));
    o.dkv = take(&l, m->N * (m->c + m->r), sizeof(float));
    o.dlat = take(&l, m->N * m->c, sizeof(float));
    o.dqa = take(&l, m->N * m->q, sizeof(float));
    o.cs = take(&l, m->T * m->r, sizeof(float));
    o.inv_freq = take(&l, m->half, sizeof(double));
    o.att = take(&l, m->B * m->H * task_floats(m, 1), sizeof(float));
    o.total = l.off;
    return o;
}
static mla_bws bws_at(const mla_dims *m, void *base) {
    const mla_bws_off o = bws_offsets(m);
    mla_bws w;
    w.dout = AT(float, base, o.dout);
    w.qa_n = AT(float, base, o.qa_n);
    w.lat_n = AT(float, base, o.lat_n);
    w.dq = AT(float, base, o.dq);
    w.dkvb = AT(float, base, o.dkvb);
    w.dkpe_h = AT(float, base, o.dkpe_h);
    w.dkv = AT(float, base, o.dkv);
    w.dlat = AT(float, base, o.dlat);
    w.dqa = AT(float, base, o.dqa);
    w.cs = AT(float, base, o.cs);
    w.inv_freq = AT(double, base, o.inv_freq);
    w.att = AT(float, base, o.att);
    return w;
}

static int dims_ok(const dsmoe_model_config *c) {
    return c->hidden_size > 0 && c->num_attention_heads > 0 && c->qk_nope_head_dim >= 0 &&
           c->qk_rope_head_dim >= 0 && c->qk_rope_head_dim % 2 == 0 &&
           c->qk_nope_head_dim + c->qk_rope_head_dim > 0 && c->v_head_dim > 0 &&
           c->kv_lora_rank > 0 && c->q_lora_rank >= 0;
}

size_t dsmoe__mla_save_size(const dsmoe_model_config *c, int64_t B, int64_t T) {
    if (!c || B < 0 || T < 0 || !dims_ok(c)) return 0;
    mla_dims m = dims_of(c, B, T);
    return save_offsets(&m).total;
}

size_t dsmoe__mla_train_workspace_size(const dsmoe_model_config *c, int64_t B, int64_t T) {
    if (!c || B < 0 || T < 0 || !dims_ok(c)) return 0;
    mla_dims m = dims_of(c, B, T);
    size_t f = fws_offsets(&m).total, b = bws_offsets(&m).total;
    return f > b ? f : b;
}

/* Common argument checks of forward and backward. */
static dsmoe_status mla_check(const char *what, const dsmoe_model_config *c,
                              const dsmoe__mla_weights *w, const void *x, const void *y, int64_t B,
                              int64_t T, const void *save, size_t save_size, const void *ws,
                              size_t ws_size) {
    if (!c || !w || !x || !y || B < 0 || T < 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "MLA %s: NULL argument or B < 0 or T < 0", what);
    if (!dims_ok(c))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "MLA %s: bad attention sizes (hidden_size, num_attention_heads, "
                            "head dims, kv_lora_rank > 0, qk_rope_head_dim even)", what);
    if (c->max_position_embeddings > 0 && T > c->max_position_embeddings)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "MLA %s: T = %lld exceeds max_position_embeddings %lld", what,
                            (long long)T, (long long)c->max_position_embeddings);
    if (c->q_lora_rank > 0 ? !(w->q_a_proj && w->q_a_norm && w->q_b_proj) : !w->q_proj)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "MLA %s: %s weights missing", what,
                            c->q_lora_rank > 0 ? "q_a_proj / q_a_layernorm / q_b_proj" : "q_proj");
    if (!w->kv_a_proj || !w->kv_a_norm || !w->kv_b_proj || !w->o_proj)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "MLA %s: kv or o weights missing", what);
    size_t need_s = dsmoe__mla_save_size(c, B, T), need_w = dsmoe__mla_train_workspace_size(c, B, T);
    if (!save || save_size < need_s)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "MLA %s: saved-activation buffer of %zu bytes, need %zu for B = %lld, "
                            "T = %lld", what, save ? save_size : 0, need_s, (long long)B,
                            (long long)T);
    if (!ws || ws_size < need_w)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "MLA %s: workspace of %zu bytes, need %zu for B = %lld, T = %lld", what,
                            ws ? ws_size : 0, need_w, (long long)B, (long long)T);
    return DSMOE_OK;
}

/* Values rotated per pass of rope_rows_range (longer rope parts take several). */
#define ROPE_VEC_MAX 128

/* Rotates the 2·half values of x by one position's angles, pair by pair, forward
 * ((x0 c − x1 s, x0 s + x1 c)) or back (the transpose: s negated in ss), with the pair's
 * angles spread over both its lanes: x' = x·cc + x̃·ss, x̃ = x with each pair's two values
 * swapped, cc = (c, c), ss = (−s, s). The same products and one addition each (x0·c +
 * (−(x1·s)) = x0·c − x1·s and x1·c + x0·s = x0·s + x1·c exactly) as the pairwise form it
 * replaced, so the same bits, in a form the compiler vectorises. */
static inline void rope_vec(float *x, const float *cc, const float *ss, int64_t half) {
    float t[ROPE_VEC_MAX];
    memcpy(t, x, (size_t)(2 * half) * sizeof(float));
    for (int64_t j = 0; j < half; j++) {
        const int64_t i = 2 * j;
        x[i] = t[i] * cc[i] + t[i + 1] * ss[i];
        x[i + 1] = t[i + 1] * cc[i + 1] + t[i] * ss[i + 1];
    }
}

/* Values i0 .. i0 + len − 1 of row t's rope parts (every head's q_pe and the k_pe). */
static inline void rope_row_part(const mla_dims *m, float *qf, float *kv, const float *cs, int dir,
                                 int64_t t, int64_t i0, int64_t len, float *cc, float *ss) {
    const int64_t r = m->r;
    const float *ct = cs + (t % m->T) * r + i0;
    for (int64_t i = 0; i < len; i += 2) {
        const float c = ct[i], sn = dir > 0 ? ct[i + 1] : -ct[i + 1];
        cc[i] = c, cc[i + 1] = c;
        ss[i] = -sn, ss[i + 1] = sn;
    }
    for (int64_t h = 0; h < m->H; h++)
        rope_vec(qf + (t * m->H + h) * (m->n + r) + m->n + i0, cc, ss, len / 2);
    rope_vec(kv + t * (m->c + r) + m->c + i0, cc, ss, len / 2);
}

DSMOE__CLONES static void rope_rows_range(const mla_dims *m, float *qf, float *kv, const float *cs,
                                          int dir, int64_t t0, int64_t t1) {
    const int64_t r = m->r;
    float cc[ROPE_VEC_MAX] = {0}, ss[ROPE_VEC_MAX] = {0};
    if (r <= ROPE_VEC_MAX) { /* one pass a row (the length known outside the row loop) */
        for (int64_t t = t0; t < t1; t++) rope_row_part(m, qf, kv, cs, dir, t, 0, r, cc, ss);
        return;
    }
    for (int64_t t = t0; t < t1; t++)
        for (int64_t i0 = 0; i0 < r; i0 += ROPE_VEC_MAX)
            rope_row_part(m, qf, kv, cs, dir, t, i0, r - i0 < ROPE_VEC_MAX ? r - i0 : ROPE_VEC_MAX,
                          cc, ss);
}

/* RoPE (dir 1) or its backward (dir −1) on the q_pe parts of q (N, H, n + r) and the
 * k_pe part of kv (N, c + r); row t is position t % T. */
static void rope_rows(const mla_dims *m, float *qf, float *kv, const float *cs, int dir, int nt) {
    const int64_t N = m->N, nb = (N + 63) / 64;
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) \
    if (nt > 1 && N * (m->H + 1) * m->r >= MLA_PAR_MIN)
    for (int64_t b = 0; b < nb; b++)
        rope_rows_range(m, qf, kv, cs, dir, b * 64, b * 64 + 64 < N ? b * 64 + 64 : N);
}

/* y = x · inv · w with a saved inverse rms: the forward's normalised values, bit for bit. */
static void rms_apply(float *y, int64_t ldy, const float *x, int64_t ldx, const float *w,
                      const float *inv, int64_t N, int64_t n, int nt) {
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && N * n >= MLA_PAR_MIN)
    for (int64_t t = 0; t < N; t++)
        for (int64_t i = 0; i < n; i++) y[t * ldy + i] = x[t * ldx + i] * inv[t] * w[i];
}

/* C (M, N) [ldc] = op(A) · op(B) + beta · C, with K = 0 meaning op(A) · op(B) = 0. */
static void mm(int ta, int tb, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
               const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (beta == 0.0f)
            for (int64_t i = 0; i < M; i++) memset(C + i * ldc, 0, (size_t)N * sizeof(float));
        return;
    }
    dsmoe__sgemm(ta, tb, (int)M, (int)N, (int)K, 1.0f, A, (int)lda, B, (int)ldb, beta, C, (int)ldc);
}

/* rows × cols floats from src (row stride lds) to dst (row stride ldd): the attention's
 * short rows (a head's 16 .. 64 columns), where a library call per row cost more than
 * its copy. */
DSMOE__CLONES static void copy_cols(float *dst, int64_t ldd, const float *src, int64_t lds,
                                    int64_t rows, int64_t cols) {
    for (int64_t j = 0; j < rows; j++)
        for (int64_t k = 0; k < cols; k++) dst[j * ldd + k] = src[j * lds + k];
}

/* The keys of sequence b, head h side by side, K (T, n + r) = [k_nope | k_pe]: one
 * product of n + r for the scores, dQ and dK instead of two each. */
static void attn_keys(const mla_dims *m, const mla_save *s, int64_t b, int64_t h, float *K) {
    const int64_t H = m->H, n = m->n, r = m->r, v = m->v, r0 = b * m->T;
    copy_cols(K, n + r, s->kvb + (r0 * H + h) * (n + v), H * (n + v), m->T, n);
    copy_cols(K + n, n + r, s->kv + r0 * (m->c + r) + m->c, m->c + r, m->T, r);
}

/* Raw scores S (rows, keys) [ld lds] of queries i0 .. i0 + rows − 1 of sequence b, head h,
 * against keys 0 .. keys − 1 of K (attn_keys): q_nope · k_nope + q_pe · k_pe. */
static void attn_scores(const mla_dims *m, const mla_save *s, const float *K, int64_t b, int64_t h,
                        int64_t i0, int64_t rows, int64_t keys, float *S, int64_t lds) {
    const int64_t H = m->H, n = m->n, r = m->r, r0 = b * m->T;
    const float *Q = s->qf + ((r0 + i0) * H + h) * (n + r);
    mm(DSMOE__NOTRANS, DSMOE__TRANS, rows, keys, n + r, Q, H * (n + r), K, n + r, 0.0f, S, lds);
}

/* Row i of a block of raw scores: p[0..i] = softmax(scale · p[0..i]), p[i+1..keys) = 0
 * (the kernels' softmax_scaled, kernels.h); with lse, returns the log-sum-exp of the
 * scaled scores. The forward keeps the probabilities for the backward. */
static float softmax_row(const dsmoe__kernel_table *kt, float *p, int64_t i, int64_t keys,
                         float scale, int lse) {
    float l = 0.0f;
    kt->softmax_scaled(p, i + 1, keys, scale, lse ? &l : NULL);
    return l;
}

/* The attention of sequence b, head h: out, lse and the probabilities of its rows (saved
 * for the backward); P (task_floats(m, 0)) is scratch for its keys. */
static void attn_forward_task(const mla_dims *m, const mla_save *s, int64_t b, int64_t h, float *P,
                              float scale) {
    const int64_t H = m->H, n = m->n, v = m->v, r0 = b * m->T;
    const dsmoe__kernel_table *kt = dsmoe__kernels();
    float *K = P;
    float *prob = s->prob + (b * H + h) * prob_floats(m);
    attn_keys(m, s, b, h, K);
    for (int64_t i0 = 0; i0 < m->T; i0 += m->qb) {
        const int64_t rows = m->T - i0 < m->qb ? m->T - i0 : m->qb, keys = i0 + rows;
        float *Pb = prob + prob_at(m, i0);
        attn_scores(m, s, K, b, h, i0, rows, keys, Pb, keys);
        for (int64_t ii = 0; ii < rows; ii++)
            s->lse[(r0 + i0 + ii) * H + h] = softmax_row(kt, Pb + ii * keys, i0 + ii, keys, scale, 1);
        mm(DSMOE__NOTRANS, DSMOE__NOTRANS, rows, v, keys, Pb, keys, s->kvb + (r0 * H + h) * (n + v) + n,
           H * (n + v), 0.0f, s->out + ((r0 + i0) * H + h) * v, H * v);
    }
}

dsmoe_status dsmoe__mla_train_forward(const dsmoe_model_config *c, const dsmoe__mla_weights *w,
                                      float *y, const float *x, int64_t B, int64_t T, void *save,
                                      size_t save_size, void *ws, size_t ws_size, int n_threads) {
    dsmoe_status st = mla_check("forward", c, w, x, y, B, T, save, save_size, ws, ws_size);
    if (st != DSMOE_OK) return st;
    const mla_dims m = dims_of(c, B, T);
    if (m.N == 0) return DSMOE_OK;
    const int nt = dsmoe__threads(n_threads);
    const mla_save s = save_at(&m, save);
    const mla_fws f = fws_at(&m, ws);
    const int32_t D = (int32_t)m.D, Hq = (int32_t)(m.H * (m.n + m.r)), ckr = (int32_t)(m.c + m.r);
    /* Queries (N, H, n + r). */
    if (m.q > 0) {
        dsmoe__linear_forward(s.qa, m.q, x, D, w->q_a_proj, m.N, D, (int32_t)m.q, nt);
        dsmoe__rmsnorm_train_forward(f.qa_n, s.qa_inv, s.qa, w->q_a_norm, m.N, (int32_t)m.q, m.q,
                                     m.q, c->rms_norm_eps, nt);
        dsmoe__linear_forward(s.qf, Hq, f.qa_n, m.q, w->q_b_proj, m.N, (int32_t)m.q, Hq, nt);
    } else {
        dsmoe__linear_forward(s.qf, Hq, x, D, w->q_proj, m.N, D, Hq, nt);
    }
    /* [latent | k_pe] (N, c + r); the normalised latent (N, c). */
    dsmoe__linear_forward(s.kv, ckr, x, D, w->kv_a_proj, m.N, D, ckr, nt);
    dsmoe__rmsnorm_train_forward(f.lat_n, s.kv_inv, s.kv, w->kv_a_norm, m.N, (int32_t)m.c, ckr,
                                 m.c, c->rms_norm_eps, nt);
    /* RoPE on q_pe and k_pe. */
    dsmoe__rope_inv_freq(f.inv_freq, c);
    dsmoe__rope_table(f.cs, f.inv_freq, (int32_t)m.half, 0, m.T);
    rope_rows(&m, s.qf, s.kv, f.cs, 1, nt);
    /* [k_nope | value] per head (N, H, n + v). */
    const int32_t Hkv = (int32_t)(m.H * (m.n + m.v));
    dsmoe__linear_forward(s.kvb, Hkv, f.lat_n, m.c, w->kv_b_proj, m.N, (int32_t)m.c, Hkv, nt);
    /* Attention per (sequence, head). */
    const float scale = (float)dsmoe__attn_scale(c);
    const int64_t ntask = m.B * m.H;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && ntask > 1)
    for (int64_t k = 0; k < ntask; k++)
        attn_forward_task(&m, &s, k / m.H, k % m.H, f.att + k * task_floats(&m, 0), scale);
    const int32_t Hv = (int32_t)(m.H * m.v);
    dsmoe__linear_forward(y, D, s.out, Hv, w->o_proj, m.N, Hv, D, nt);
    return DSMOE_OK;
}

/* dS = P ⊙ (dP − D) · scale over the causal part of a block of query rows i0 .. i0 + rows − 1
 * (zeros right of the diagonal), D_i = dO_i · O_i. Each D_i is one chain over its v
 * products in order, the chains of the block's rows run side by side (one row's chain
 * alone was bounded by the add latency); dS element by element (vectorised). */
DSMOE__CLONES static void attn_ds(float *dP, int64_t ldp, const float *Pb, int64_t keys,
                                  const float *dO, const float *O, int64_t ldo, int64_t rows,
                                  int64_t i0, int64_t v, float scale) {
    float D[ATT_QB];
    for (int64_t ii = 0; ii < rows; ii++) D[ii] = 0.0f;
    for (int64_t k = 0; k < v; k++)
        for (int64_t ii = 0; ii < rows; ii++) D[ii] += dO[ii * ldo + k] * O[ii * ldo + k];
    for (int64_t ii = 0; ii < rows; ii++) {
        const int64_t i = i0 + ii;
        const float *p = Pb + ii * keys;
        const float Di = D[ii];
        float *dp = dP + ii * ldp;
        for (int64_t j = 0; j <= i; j++) dp[j] = p[j] * (dp[j] - Di) * scale;
        for (int64_t j = i + 1; j < keys; j++) dp[j] = 0.0f;
    }
}

/* The backward of the attention of sequence b, head h: dq of its rows, its dk_nope and
 * dv columns of dkvb and its part of dk_pe; P (task_floats(m, 1)) scratch. */
static void attn_backward_task(const mla_dims *m, const mla_save *s, const mla_bws *g, int64_t b,
                               int64_t h, float *P, float scale) {
    const int64_t H = m->H, n = m->n, r = m->r, v = m->v, r0 = b * m->T, nr = n + r;
    const float *V = s->kvb + (r0 * H + h) * (n + v) + n;
    float *dKn = g->dkvb + (r0 * H + h) * (n + v), *dV = dKn + n;
    float *dKp = g->dkpe_h + (r0 * H + h) * r;
    float *dP = P, *K = dP + m->qb * m->T, *dK = K + m->T * nr;
    const float *prob = s->prob + (b * H + h) * prob_floats(m);
    attn_keys(m, s, b, h, K);
    memset(dK, 0, (size_t)(m->T * nr) * sizeof(float));
    for (int64_t j = 0; j < m->T; j++) memset(dV + j * H * (n + v), 0, (size_t)v * sizeof(float));
    for (int64_t i0 = 0; i0 < m->T; i0 += m->qb) {
        const int64_t rows = m->T - i0 < m->qb ? m->T - i0 : m->qb, keys = i0 + rows;
        const float *Q = s->qf + ((r0 + i0) * H + h) * (n + r);
        const float *dO = g->dout + ((r0 + i0) * H + h) * v;
        float *dQ = g->dq + ((r0 + i0) * H + h) * (n + r);
        const float *Pb = prob + prob_at(m, i0); /* the forward's probabilities */
        /* dP = dO · Vᵀ */
        mm(DSMOE__NOTRANS, DSMOE__TRANS, rows, keys, v, dO, H * v, V, H * (n + v), 0.0f, dP, m->T);
        attn_ds(dP, m->T, Pb, keys, dO, s->out + ((r0 + i0) * H + h) * v, H * v, rows, i0, v,
                scale);
        /* dQ = dS · K;  dK += dSᵀ · Q;  dV += Pᵀ · dO. */
        mm(DSMOE__NOTRANS, DSMOE__NOTRANS, rows, nr, keys, dP, m->T, K, nr, 0.0f, dQ, H * nr);
        mm(DSMOE__TRANS, DSMOE__NOTRANS, keys, nr, rows, dP, m->T, Q, H * nr, 1.0f, dK, nr);
        mm(DSMOE__TRANS, DSMOE__NOTRANS, keys, v, rows, Pb, keys, dO, H * v, 1.0f, dV, H * (n + v));
    }
    /* dK back to its places: dk_nope into dkvb, this head's part of dk_pe */
    copy_cols(dKn, H * (n + v), dK, nr, m->T, n);
    copy_cols(dKp, H * r, dK + n, nr, m->T, r);
}

dsmoe_status dsmoe__mla_train_backward(const dsmoe_model_config *c, const dsmoe__mla_weights *w,
                                       const dsmoe__mla_grads *gr, float *dx, const float *dy,
                                       const float *x, int64_t B, int64_t T, const void *save,
                                       size_t save_size, void *ws, size_t ws_size, int acc_dx,
                                       int n_threads) {
    dsmoe_status st = mla_check("backward", c, w, x, dy, B, T, save, save_size, ws, ws_size);
    if (st != DSMOE_OK) return st;
    if (!dx || !gr || !gr->kv_a_proj || !gr->kv_a_norm || !gr->kv_b_proj || !gr->o_proj ||
        (c->q_lora_rank > 0 ? !(gr->q_a_proj && gr->q_a_norm && gr->q_b_proj) : !gr->q_proj))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "MLA backward: NULL dx or gradient tensor");
    const mla_dims m = dims_of(c, B, T);
    if (m.N == 0) return DSMOE_OK;
    const int nt = dsmoe__threads(n_threads);
    const mla_save s = save_at(&m, save);
    const mla_bws g = bws_at(&m, ws);
    const int32_t D = (int32_t)m.D, Hq = (int32_t)(m.H * (m.n + m.r)), ckr = (int32_t)(m.c + m.r),
                  Hkv = (int32_t)(m.H * (m.n + m.v)), Hv = (int32_t)(m.H * m.v);
    /* o_proj. */
    dsmoe__linear_backward(g.dout, Hv, gr->o_proj, dy, D, s.out, Hv, w->o_proj, m.N, Hv, D, 0, nt);
    /* The normalised latent and q_a output, as the forward had them. */
    rms_apply(g.lat_n, m.c, s.kv, ckr, w->kv_a_norm, s.kv_inv, m.N, m.c, nt);
    if (m.q > 0) rms_apply(g.qa_n, m.q, s.qa, m.q, w->q_a_norm, s.qa_inv, m.N, m.q, nt);
    /* Attention per (sequence, head). */
    const float scale = (float)dsmoe__attn_scale(c);
    const int64_t ntask = m.B * m.H;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && ntask > 1)
    for (int64_t k = 0; k < ntask; k++) {
        attn_backward_task(&m, &s, &g, k / m.H, k % m.H, g.att + k * task_floats(&m, 1), scale);
    }
    /* dk_pe: the heads' parts summed in head order, into dkv's k_pe columns. */
#pragma omp parallel for schedule(static) num_threads(nt) \
    if (nt > 1 && m.N * m.H * m.r >= MLA_PAR_MIN)
    for (int64_t t = 0; t < m.N; t++)
        for (int64_t k = 0; k < m.r; k++) {
            float a = 0.0f;
            for (int64_t h = 0; h < m.H; h++) a += g.dkpe_h[(t * m.H + h) * m.r + k];
            g.dkv[t * ckr + m.c + k] = a;
        }
    /* RoPE backward on dq_pe and dk_pe. */
    dsmoe__rope_inv_freq(g.inv_freq, c);
    dsmoe__rope_table(g.cs, g.inv_freq, (int32_t)m.half, 0, m.T);
    rope_rows(&m, g.dq, g.dkv, g.cs, -1, nt);
    /* kv_b, then the latent's norm into dkv's latent columns, then kv_a. */
    dsmoe__linear_backward(g.dlat, m.c, gr->kv_b_proj, g.dkvb, Hkv, g.lat_n, m.c, w->kv_b_proj, m.N,
                           (int32_t)m.c, Hkv, 0, nt);
    dsmoe__rmsnorm_backward(g.dkv, gr->kv_a_norm, g.dlat, s.kv, w->kv_a_norm, s.kv_inv, m.N,
                            (int32_t)m.c, ckr, m.c, ckr, 0, nt);
    dsmoe__linear_backward(dx, D, gr->kv_a_proj, g.dkv, ckr, x, D, w->kv_a_proj, m.N, D, ckr,
                           acc_dx, nt);
    /* Queries. */
    if (m.q > 0) {
        dsmoe__linear_backward(g.dqa, m.q, gr->q_b_proj, g.dq, Hq, g.qa_n, m.q, w->q_b_proj, m.N,
                               (int32_t)m.q, Hq, 0, nt);
        /* qa_n is free now: it takes d(q_a output). */
        dsmoe__rmsnorm_backward(g.qa_n, gr->q_a_norm, g.dqa, s.qa, w->q_a_norm, s.qa_inv, m.N,
                                (int32_t)m.q, m.q, m.q, m.q, 0, nt);
        dsmoe__linear_backward(dx, D, gr->q_a_proj, g.qa_n, m.q, x, D, w->q_a_proj, m.N, D,
                               (int32_t)m.q, 1, nt);
    } else {
        dsmoe__linear_backward(dx, D, gr->q_proj, g.dq, Hq, x, D, w->q_proj, m.N, D, Hq, 1, nt);
    }
    return DSMOE_OK;
}
