/*
 * ref.c — scalar reference kernels: the specification every ISA variant matches
 * bit for bit (see kernels.h for the algorithms and the summation order).
 */
#include "kernels.h"

#include <math.h>
#include <string.h>

float dsmoe__expf(float x) {
    if (x != x) return x;
    if (x > DSMOE__EXP_HI) return INFINITY;
    if (x < DSMOE__EXP_LO) return 0.0f;
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
    p = p + 1.0f;
    int32_t ni = (int32_t)n;
    int32_t n1 = ni >> 1; /* floor(n/2), arithmetic shift as in the SIMD code */
    int32_t n2 = ni - n1;
    uint32_t b1 = (uint32_t)(n1 + 127) << 23, b2 = (uint32_t)(n2 + 127) << 23;
    float f1, f2;
    memcpy(&f1, &b1, 4);
    memcpy(&f2, &b2, 4);
    return (p * f1) * f2;
}

float dsmoe__sigmoidf(float x) { return 1.0f / (1.0f + dsmoe__expf(-x)); }

static void ref_sigmoid(float *out, const float *in, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = dsmoe__sigmoidf(in[i]);
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
        float e = dsmoe__expf(-g[i]);
        float silu = g[i] / (1.0f + e);
        h[i] = silu * u[i];
    }
}

static void ref_swiglu_backward(float *dg, float *du, const float *dh, const float *g,
                                const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float sg = 1.0f / (1.0f + dsmoe__expf(-g[i]));
        float silu = g[i] * sg;
        float dsilu = sg * (1.0f + g[i] * (1.0f - sg));
        float t = dh[i] * u[i];
        dg[i] = dg[i] + t * dsilu;
        du[i] = du[i] + dh[i] * silu;
    }
}

const dsmoe__kernel_table dsmoe__kernels_ref = {
    "ref", ref_sigmoid, ref_softmax, ref_bf16_to_f32, ref_dot_bf16, ref_swiglu, ref_swiglu_backward,
};
