/*
 * blocks.c — the forward pass's building blocks for a prompt (positions 0 .. T-1),
 * written from SPEC-model §1–§5 (DeepSeek-V2/V3 papers' multi-head latent attention):
 *
 *   RMSNorm      y = x · rsqrt(mean(x²) + eps) · w
 *   RoPE         pairs (x[2i], x[2i+1]) rotated by pos · f_i, f_i = θ^(−2i/r), with YaRN's
 *                interpolation of the low frequencies when configured
 *   MLA (naive)  q = q_b(RMSNorm(q_a x)) or q_proj x; [latent | k_pe] = kv_a x;
 *                latent = RMSNorm(latent); RoPE on q_pe, k_pe; [k_nope | v] = kv_b latent;
 *                causal softmax((q_nope·k_nope + q_pe·k_pe) · scale); o_proj
 *   SwiGLU       down(silu(gate x) ⊙ up x)
 *
 * These are the reference path: plain loops, fp32 arithmetic with fp32 accumulation in
 * index order (softmax in fp32 too, as the official code), RoPE angles and YaRN
 * frequencies in double. No threads, no allocation: scratch comes from the caller's
 * workspace. The BLAS/threaded products and the absorbed (decoding) form come later.
 */
#include "model/model_internal.h"

#include <math.h>
#include <string.h>

/* The RMSNorm forward's scale: the sum of squares as dsmoe__dot16 adds. */
float dsmoe__rms_inv(const float *x, int32_t n, float eps) {
    return 1.0f / sqrtf(dsmoe__dot16(x, x, (size_t)(n > 0 ? n : 0)) / (float)n + eps);
}

void dsmoe__rmsnorm(float *y, const float *x, const float *w, int64_t T, int32_t n, int64_t ldx,
                    int64_t ldy, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * ldx;
        float *yr = y + t * ldy;
        const float inv = dsmoe__rms_inv(xr, n, eps);
        for (int32_t i = 0; i < n; i++) yr[i] = xr[i] * inv * w[i];
    }
}

void dsmoe__rope_inv_freq(double *f, const dsmoe_model_config *c) {
    const int32_t r = c->qk_rope_head_dim, half = r / 2;
    const double theta = c->rope_theta;
    for (int32_t i = 0; i < half; i++) f[i] = pow(theta, -2.0 * i / r);
    if (c->rope_type != DSMOE_ROPE_TYPE_YARN) return;
    const double L0 = (double)c->rope_original_max_position_embeddings, s = c->rope_factor;
    const double pi = 3.14159265358979323846;
    double corr_fast = r * log(L0 / (2 * pi * c->rope_beta_fast)) / (2 * log(theta));
    double corr_slow = r * log(L0 / (2 * pi * c->rope_beta_slow)) / (2 * log(theta));
    double low = floor(corr_fast), high = ceil(corr_slow);
    if (low < 0) low = 0;
    if (high > r - 1) high = r - 1;
    if (low == high) high += 0.001;
    for (int32_t i = 0; i < half; i++) {
        double ramp = (i - low) / (high - low);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        f[i] = f[i] / s * ramp + f[i] * (1.0 - ramp);
    }
}

double dsmoe__attn_scale(const dsmoe_model_config *c) {
    double s = 1.0 / sqrt((double)(c->qk_nope_head_dim + c->qk_rope_head_dim));
    if (c->rope_type == DSMOE_ROPE_TYPE_YARN) {
        double m = 0.1 * c->rope_mscale_all_dim * log(c->rope_factor) + 1.0;
        s *= m * m;
    }
    return s;
}

void dsmoe__rope_table(float *cs, const double *inv_freq, int32_t half, int64_t pos0, int64_t T) {
    for (int64_t t = 0; t < T; t++)
        for (int32_t i = 0; i < half; i++) {
            double a = (double)(pos0 + t) * inv_freq[i];
            cs[(t * half + i) * 2] = (float)cos(a);
            cs[(t * half + i) * 2 + 1] = (float)sin(a);
        }
}

/* Rotates the pairs of x (2·half values) by the angles of one position's table row. */
void dsmoe__rope_rotate(float *x, const float *cs, int32_t half) {
    for (int32_t i = 0; i < half; i++) {
        float c = cs[2 * i], s = cs[2 * i + 1];
        float x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * c - x1 * s;
        x[2 * i + 1] = x0 * s + x1 * c;
    }
}

/* y (T, out) row stride ldy = x (T, in) row stride ldx · Wᵀ, W (out, in). */
static void linear(float *y, int64_t ldy, const float *x, int64_t ldx, const float *W, int64_t T,
                   int64_t in, int64_t out) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t o = 0; o < out; o++) {
            const float *xr = x + t * ldx, *wr = W + o * in;
            float acc = 0.0f;
            for (int64_t k = 0; k < in; k++) acc += xr[k] * wr[k];
            y[t * ldy + o] = acc;
        }
}

/* Scratch of the naive MLA for T tokens, in floats, and its pieces. */
typedef struct mla_sizes {
    int64_t q, qa, kv, kvb, cs, p, out;
} mla_sizes;

static mla_sizes mla_layout(const dsmoe_model_config *c, int64_t T) {
    const int64_t H = c->num_attention_heads, n = c->qk_nope_head_dim, r = c->qk_rope_head_dim,
                  v = c->v_head_dim;
    mla_sizes m;
    m.q = T * H * (n + r);
    m.qa = c->q_lora_rank > 0 ? T * c->q_lora_rank : 0;
    m.kv = T * (c->kv_lora_rank + r);
    m.kvb = T * H * (n + v);
    m.cs = T * r; /* (T, r/2) cos, sin pairs */
    m.p = T;
    m.out = T * H * v;
    return m;
}

size_t dsmoe__mla_workspace_size(const dsmoe_model_config *c, int64_t T) {
    if (!c || T < 0) return 0;
    mla_sizes m = mla_layout(c, T);
    const int64_t parts[] = {m.q, m.qa, m.kv, m.kvb, m.cs, m.p, m.out};
    size_t total = 0;
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        total += dsmoe__align64((size_t)parts[i] * sizeof(float));
    return total + dsmoe__align64((size_t)(c->qk_rope_head_dim / 2) * sizeof(double));
}

dsmoe_status dsmoe__mla_forward(const dsmoe_model_config *c, const dsmoe__mla_weights *w, float *y,
                                const float *x, int64_t T, void *workspace, size_t ws_size) {
    if (!c || !w || !y || !x || T < 0 || (!workspace && ws_size))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "MLA forward: NULL argument or T < 0");
    const int64_t D = c->hidden_size, H = c->num_attention_heads, n = c->qk_nope_head_dim,
                  r = c->qk_rope_head_dim, v = c->v_head_dim, kc = c->kv_lora_rank,
                  q = c->q_lora_rank, half = r / 2;
    if (q > 0 ? !(w->q_a_proj && w->q_a_norm && w->q_b_proj) : !w->q_proj)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "MLA forward: %s weights missing",
                            q > 0 ? "q_a_proj / q_a_layernorm / q_b_proj" : "q_proj");
    if (!w->kv_a_proj || !w->kv_a_norm || !w->kv_b_proj || !w->o_proj)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "MLA forward: kv or o weights missing");
    size_t need = dsmoe__mla_workspace_size(c, T);
    if (ws_size < need)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "MLA forward: workspace of %zu bytes, need %zu for T = %lld", ws_size,
                            need, (long long)T);
    if (T == 0) return DSMOE_OK;
    mla_sizes m = mla_layout(c, T);
    dsmoe__carver cv = {(char *)workspace, ws_size, 0};
    float *qf = (float *)dsmoe__carve(&cv, (size_t)m.q * sizeof(float));
    float *qa = (float *)dsmoe__carve(&cv, (size_t)m.qa * sizeof(float));
    float *kv = (float *)dsmoe__carve(&cv, (size_t)m.kv * sizeof(float));
    float *kvb = (float *)dsmoe__carve(&cv, (size_t)m.kvb * sizeof(float));
    float *cs = (float *)dsmoe__carve(&cv, (size_t)m.cs * sizeof(float));
    float *p = (float *)dsmoe__carve(&cv, (size_t)m.p * sizeof(float));
    float *out = (float *)dsmoe__carve(&cv, (size_t)m.out * sizeof(float));
    double *inv_freq = (double *)dsmoe__carve(&cv, (size_t)half * sizeof(double));

    /* Queries (T, H, n + r). */
    if (q > 0) {
        linear(qa, q, x, D, w->q_a_proj, T, D, q);
        dsmoe__rmsnorm(qa, qa, w->q_a_norm, T, (int32_t)q, q, q, c->rms_norm_eps);
        linear(qf, H * (n + r), qa, q, w->q_b_proj, T, q, H * (n + r));
    } else {
        linear(qf, H * (n + r), x, D, w->q_proj, T, D, H * (n + r));
    }
    /* Latent (normalised) and the one shared k_pe head, (T, c + r). */
    linear(kv, kc + r, x, D, w->kv_a_proj, T, D, kc + r);
    dsmoe__rmsnorm(kv, kv, w->kv_a_norm, T, (int32_t)kc, kc + r, kc + r, c->rms_norm_eps);
    /* RoPE on q_pe and k_pe. */
    dsmoe__rope_inv_freq(inv_freq, c);
    dsmoe__rope_table(cs, inv_freq, (int32_t)half, 0, T);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < H; h++) dsmoe__rope_rotate(qf + (t * H + h) * (n + r) + n, cs + t * r, (int32_t)half);
        dsmoe__rope_rotate(kv + t * (kc + r) + kc, cs + t * r, (int32_t)half);
    }
    /* Keys (no-position part) and values per head, (T, H, n + v). */
    linear(kvb, H * (n + v), kv, kc + r, w->kv_b_proj, T, kc, H * (n + v));
    /* Causal attention per head and query, softmax in fp32. */
    const float scale = (float)dsmoe__attn_scale(c);
    for (int64_t h = 0; h < H; h++)
        for (int64_t i = 0; i < T; i++) {
            const float *qn = qf + (i * H + h) * (n + r), *qp = qn + n;
            float mx = -INFINITY;
            for (int64_t j = 0; j <= i; j++) {
                const float *kn = kvb + (j * H + h) * (n + v), *kp = kv + j * (kc + r) + kc;
                float s1 = 0.0f, s2 = 0.0f;
                for (int64_t k = 0; k < n; k++) s1 += qn[k] * kn[k];
                for (int64_t k = 0; k < r; k++) s2 += qp[k] * kp[k];
                p[j] = (s1 + s2) * scale;
                if (p[j] > mx) mx = p[j];
            }
            float sum = 0.0f;
            for (int64_t j = 0; j <= i; j++) {
                p[j] = expf(p[j] - mx);
                sum += p[j];
            }
            float *o = out + (i * H + h) * v;
            for (int64_t k = 0; k < v; k++) o[k] = 0.0f;
            for (int64_t j = 0; j <= i; j++) {
                const float *val = kvb + (j * H + h) * (n + v) + n;
                float pj = p[j] / sum;
                for (int64_t k = 0; k < v; k++) o[k] += pj * val[k];
            }
        }
    linear(y, D, out, H * v, w->o_proj, T, H * v, D);
    return DSMOE_OK;
}

void dsmoe__swiglu(float *y, const float *x, const float *gate, const float *up, const float *down,
                   int64_t T, int32_t D, int32_t I, float *scratch) {
    float *g = scratch, *u = scratch + T * I;
    linear(g, I, x, D, gate, T, D, I);
    linear(u, I, x, D, up, T, D, I);
    for (int64_t k = 0; k < T * I; k++) g[k] = g[k] / (1.0f + expf(-g[k])) * u[k];
    linear(y, D, g, I, down, T, I, D);
}
