/*
 * ref.c — scalar reference kernels: the specification every ISA variant matches
 * bit for bit (see kernels.h for the algorithms and the summation order).
 */
#include "kernels.h"

#include <math.h>
#include <string.h>

/* exp(r)·... core: with n = rint(x·log2 e), returns (exp(x − n·ln 2), n), the reduced
 * argument r = x − n·ln2 (Cody–Waite, two fused steps) through the polynomial. */
static inline float exp_reduced(float x, float *n_out) {
    float n = rintf(x * DSMOE__LOG2E);
    float r = fmaf(n, -DSMOE__LN2_HI, x);
    r = fmaf(n, -DSMOE__LN2_LO, r);
    float z = r * r;
    float p = DSMOE__EXP_C0;
    p = fmaf(p, r, DSMOE__EXP_C1);
    p = fmaf(p, r, DSMOE__EXP_C2);
    p = fmaf(p, r, DSMOE__EXP_C3);
    p = fmaf(p, r, DSMOE__EXP_C4);
    p = fmaf(p, r, DSMOE__EXP_C5);
    p = fmaf(p, z, r);
    *n_out = n;
    return p + 1.0f;
}

static inline float pow2i(int32_t n) {
    uint32_t b = (uint32_t)(n + 127) << 23;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

float dsmoe__expf(float x) {
    if (x != x) return x;
    if (x > DSMOE__EXP_HI) return INFINITY;
    if (x < DSMOE__EXP_LO) return 0.0f;
    float n;
    float p = exp_reduced(x, &n);
    int32_t ni = (int32_t)n;
    int32_t n1 = ni >> 1; /* floor(n/2), arithmetic shift as in the SIMD code */
    return (p * pow2i(n1)) * pow2i(ni - n1);
}

/* exp for 1/(1 + exp(y)) forms: y is clamped to [-87, EXP_HI], where results below
 * 2^-126 cannot change 1 + e, and 2^n is applied as one factor (n = 128 gives +inf,
 * whose sigmoid is 0 — the true value there is below 2^-126). */
float dsmoe__expf_sig(float y) {
    if (y != y) return y;
    y = y > DSMOE__EXP_HI ? DSMOE__EXP_HI : y;
    y = y < -87.0f ? -87.0f : y;
    float n;
    float p = exp_reduced(y, &n);
    return p * pow2i((int32_t)n);
}

float dsmoe__sigmoidf(float x) { return 1.0f / (1.0f + dsmoe__expf_sig(-x)); }

static void ref_sigmoid(float *out, const float *in, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = dsmoe__sigmoidf(in[i]);
}

static int ref_sigmoid_bias(float *s, float *c, const float *u, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(u[i])) return 1;
        s[i] = dsmoe__sigmoidf(u[i]);
        if (b) c[i] = s[i] + b[i];
    }
    return 0;
}

static int ref_any_nonfinite(const float *x, int64_t n) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, &x[i], 4);
        bad |= (b & 0x7f800000u) == 0x7f800000u;
    }
    return bad != 0;
}

static float tree16(float *p) {
    for (int s = 8; s >= 1; s >>= 1)
        for (int j = 0; j < s; j++) p[j] += p[j + s];
    return p[0];
}

static void ref_softmax(float *out, const float *in, int64_t n) {
    if (n <= 0) return;
    float m = in[0];
    for (int64_t i = 1; i < n; i++) m = in[i] > m ? in[i] : m;
    float p[16] = {0};
    for (int64_t i = 0; i < n; i++) {
        float e = dsmoe__expf(in[i] - m);
        out[i] = e;
        p[i & 15] += e;
    }
    float s = tree16(p);
    for (int64_t i = 0; i < n; i++) out[i] = out[i] / s;
}

static void ref_softmax_scaled(float *p, int64_t n, int64_t len, float scale, float *lse) {
    int64_t am = 0; /* the first largest scaled score: its probability is 1 / s */
    for (int64_t i = 0; i < n; i++) {
        p[i] *= scale;
        am = p[i] > p[am] ? i : am;
    }
    const float m = p[am];
    ref_softmax(p, p, n);
    for (int64_t i = n; i < len; i++) p[i] = 0.0f;
    if (lse) *lse = m - logf(p[am]);
}

static void ref_bf16_to_f32(float *out, const uint16_t *in, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t b = (uint32_t)in[i] << 16;
        memcpy(&out[i], &b, 4);
    }
}

static float ref_dot_bf16(const float *x, const uint16_t *w, int64_t n) {
    float p[16] = {0};
    for (int64_t i = 0; i < n; i++) {
        uint32_t b = (uint32_t)w[i] << 16;
        float wf;
        memcpy(&wf, &b, 4);
        p[i & 15] = fmaf(x[i], wf, p[i & 15]);
    }
    return tree16(p);
}

static void ref_swiglu(float *h, const float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float e = dsmoe__expf_sig(-g[i]);
        float silu = g[i] / (1.0f + e);
        h[i] = silu * u[i];
    }
}

static void ref_swiglu_backward(float *dg, float *du, const float *dh, const float *g,
                                const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float sg = 1.0f / (1.0f + dsmoe__expf_sig(-g[i]));
        float silu = g[i] * sg;
        float dsilu = sg * (1.0f + g[i] * (1.0f - sg));
        float t = dh[i] * u[i];
        dg[i] = dg[i] + t * dsilu;
        du[i] = du[i] + dh[i] * silu;
    }
}

void dsmoe__group_scores_ref(float *gs, const float *c, int32_t G, int32_t gsize, int32_t m,
                             float *scratch_v, int32_t *scratch_i) {
    for (int32_t g = 0; g < G; g++) {
        const float *cg = c + (size_t)g * (size_t)gsize;
        float score;
        if (m <= 1) {
            score = cg[0];
            for (int32_t j = 1; j < gsize; j++) score = cg[j] > score ? cg[j] : score;
        } else {
            int32_t n = 0;
            for (int32_t j = 0; j < gsize; j++) dsmoe__topk_push(scratch_v, scratch_i, &n, m, cg[j], j);
            score = scratch_v[0];
            for (int32_t j = 1; j < n; j++) score += scratch_v[j];
        }
        gs[g] = score;
    }
}

void dsmoe__topk_ref(int32_t *pos, float *val, const float *v, int32_t n, int32_t K,
                     float *scratch_v, int32_t *scratch_i) {
    (void)scratch_v;
    (void)scratch_i;
    int32_t len = 0;
    for (int32_t i = 0; i < n; i++) dsmoe__topk_push(val, pos, &len, K, v[i], i);
}

void dsmoe__topk_blocks_ref(int32_t *ids, float *val, const float *v, int32_t gsize,
                            const int32_t *groups, int32_t ng, int32_t K, float *scratch_v,
                            int32_t *scratch_i) {
    (void)scratch_v;
    (void)scratch_i;
    int32_t len = 0;
    for (int32_t q = 0; q < ng; q++) {
        int32_t e0 = groups[q] * gsize;
        for (int32_t j = 0; j < gsize; j++) dsmoe__topk_push(val, ids, &len, K, v[e0 + j], e0 + j);
    }
}

const dsmoe__kernel_table dsmoe__kernels_ref = {
    .name = "ref",
    .sigmoid = ref_sigmoid,
    .sigmoid_bias = ref_sigmoid_bias,
    .any_nonfinite = ref_any_nonfinite,
    .softmax = ref_softmax,
    .softmax_scaled = ref_softmax_scaled,
    .bf16_to_f32 = ref_bf16_to_f32,
    .dot_bf16 = ref_dot_bf16,
    .swiglu = ref_swiglu,
    .swiglu_backward = ref_swiglu_backward,
    .group_scores = dsmoe__group_scores_ref,
    .topk = dsmoe__topk_ref,
    .topk_blocks = dsmoe__topk_blocks_ref,
    .gemm_nt = dsmoe__gemm_nt_ref,
    .gemm_pk = dsmoe__gemm_pk_ref,
    .sgemm_small = dsmoe__sgemm_small_ref,
};
