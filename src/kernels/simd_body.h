/*
 * simd_body.h — the vector kernels, written once over a small set of macros and
 * included by avx2.c (8 lanes) and avx512.c (16 lanes). Every function performs
 * exactly the operations of ref.c in the same order; tails fall back to the
 * scalar reference, and reductions store their 16 partial sums and finish with
 * the reference's tree, so all ISAs agree bit for bit.
 *
 * Required macros: VF (float vector), VI (int vector), W (lanes), V_LOAD, V_STORE,
 * V_SET1, V_ADD, V_SUB, V_MUL, V_DIV, V_FMA(a,b,c)=a*b+c, V_MIN, V_MAX, V_RINT,
 * V_CVT_I, V_I_SRAI1, V_I_SUB, V_I_EXP2(n) (float 2^n from ints), V_I_SET1, V_I_AND,
 * V_I_MAXU (unsigned max), V_CAST_I (float bits as ints), V_I_STORE, V_SEL_GT(x,t,a,b)
 * (x>t ? b : a), V_SEL_LT(x,t,a,b) (x<t ? b : a), V_NEG, V_LOAD_BF16(ptr), and SFX.
 */
#include <math.h>
#include <string.h>

/* Group-selection helpers shared by the fused selection kernels of avx2.c / avx512.c.
 * SEL_MERGE: the two largest of two (top1, top2) pairs, lane by lane. SEL_LEVEL: one level
 * of the transposing butterfly: SHUF(x, y, imm) with immediates IA / IB picks, from the
 * pair vectors x and y, the lanes each merge pairs; the merged pairs go to (oh, ol). */
#define SEL_MERGE(h, l, ah, al, bh, bl)                                                   \
    do {                                                                                  \
        VF h_ = V_MAX((ah), (bh));                                                        \
        (l) = V_MAX(V_MIN((ah), (bh)), V_MAX((al), (bl)));                                \
        (h) = h_;                                                                         \
    } while (0)
#define SEL_LEVEL(SHUF, IA, IB, xh, xl, yh, yl, oh, ol)                                   \
    do {                                                                                  \
        VF ah_ = SHUF((xh), (yh), (IA)), bh_ = SHUF((xh), (yh), (IB));                    \
        VF al_ = SHUF((xl), (yl), (IA)), bl_ = SHUF((xl), (yl), (IB));                    \
        SEL_MERGE(oh, ol, ah_, al_, bh_, bl_);                                            \
    } while (0)

#define DSMOE__CAT2(a, b) a##b
#define DSMOE__CAT(a, b) DSMOE__CAT2(a, b)
#define FN(name) DSMOE__CAT(name, SFX)

/* exp of an in-range argument before the 2^n scaling: returns the polynomial of the
 * reduced argument and n (see exp_reduced in ref.c). */
static inline VF FN(v_exp_reduced)(VF x, VF *n_out) {
    VF n = V_RINT(V_MUL(x, V_SET1(DSMOE__LOG2E)));
    VF r = V_FMA(n, V_SET1(-DSMOE__LN2_HI), x);
    r = V_FMA(n, V_SET1(-DSMOE__LN2_LO), r);
    VF z = V_MUL(r, r);
    VF p = V_SET1(DSMOE__EXP_C0);
    p = V_FMA(p, r, V_SET1(DSMOE__EXP_C1));
    p = V_FMA(p, r, V_SET1(DSMOE__EXP_C2));
    p = V_FMA(p, r, V_SET1(DSMOE__EXP_C3));
    p = V_FMA(p, r, V_SET1(DSMOE__EXP_C4));
    p = V_FMA(p, r, V_SET1(DSMOE__EXP_C5));
    p = V_FMA(p, z, r);
    *n_out = n;
    return V_ADD(p, V_SET1(1.0f));
}

static inline VF FN(v_exp)(VF x) {
    VF xc = V_MIN(V_MAX(x, V_SET1(DSMOE__EXP_LO)), V_SET1(DSMOE__EXP_HI));
    VF n;
    VF p = FN(v_exp_reduced)(xc, &n);
    VI ni = V_CVT_I(n);
    VI n1 = V_I_SRAI1(ni);
    VI n2 = V_I_SUB(ni, n1);
    VF res = V_MUL(V_MUL(p, V_I_EXP2(n1)), V_I_EXP2(n2));
    res = V_SEL_GT(x, V_SET1(DSMOE__EXP_HI), res, V_SET1(INFINITY));
    res = V_SEL_LT(x, V_SET1(DSMOE__EXP_LO), res, V_SET1(0.0f));
    return res;
}

/* exp for 1/(1 + exp(y)): see dsmoe__expf_sig in ref.c */
/* Per lane, the two largest of the V vectors at cg (top2 = -inf when V = 1). */
static inline VF FN(lane_top2)(const float *cg, int32_t V, VF *top2) {
    VF hi = V_LOAD(cg), lo = V_SET1(-INFINITY);
    if (V >= 2) {
        /* max(-inf, min(hi, x)) is min(hi, x) for finite x: one operation fewer */
        VF x = V_LOAD(cg + W);
        lo = V_MIN(hi, x);
        hi = V_MAX(hi, x);
    }
    for (int32_t j = 2; j < V; j++) {
        VF x = V_LOAD(cg + W * j);
        lo = V_MAX(lo, V_MIN(hi, x));
        hi = V_MAX(hi, x);
    }
    *top2 = lo;
    return hi;
}

static inline VF FN(v_exp_sig)(VF y) {
    VF xc = V_MAX(V_MIN(y, V_SET1(DSMOE__EXP_HI)), V_SET1(-87.0f));
    VF n;
    VF p = FN(v_exp_reduced)(xc, &n);
    return V_MUL(p, V_I_EXP2(V_CVT_I(n)));
}

static void FN(k_sigmoid)(float *out, const float *in, int64_t n) {
    int64_t i = 0;
    const VF one = V_SET1(1.0f);
    for (; i + W <= n; i += W) {
        VF x = V_LOAD(in + i);
        V_STORE(out + i, V_DIV(one, V_ADD(one, FN(v_exp_sig)(V_NEG(x)))));
    }
    for (; i < n; i++) out[i] = dsmoe__sigmoidf(in[i]);
}

/* v_exp_sig (and below v_exp) of 4 vectors in place, stage by stage with constant
 * indices (EXP4_STAGE; loops over arrays GCC at -O2 keeps in memory): the same operations
 * per lane, so the same bits, with the 4 dependency chains overlapping where one chain at
 * a time filled the scheduler. */
#define EXP4_STAGE(e) \
    do {                                                                                  \
        { enum { j = 0 }; e; } { enum { j = 1 }; e; } { enum { j = 2 }; e; } { enum { j = 3 }; e; } \
    } while (0)
/* v_exp_reduced of 4 clamped arguments xc: the polynomials p and the exponents n. */
static inline void FN(v_exp_reduced4)(const VF xc[4], VF n[4], VF p[4]) {
    VF r[4], z[4];
    EXP4_STAGE(n[j] = V_RINT(V_MUL(xc[j], V_SET1(DSMOE__LOG2E))));
    EXP4_STAGE(r[j] = V_FMA(n[j], V_SET1(-DSMOE__LN2_HI), xc[j]));
    EXP4_STAGE(r[j] = V_FMA(n[j], V_SET1(-DSMOE__LN2_LO), r[j]));
    EXP4_STAGE(z[j] = V_MUL(r[j], r[j]));
    EXP4_STAGE(p[j] = V_FMA(V_SET1(DSMOE__EXP_C0), r[j], V_SET1(DSMOE__EXP_C1)));
    EXP4_STAGE(p[j] = V_FMA(p[j], r[j], V_SET1(DSMOE__EXP_C2)));
    EXP4_STAGE(p[j] = V_FMA(p[j], r[j], V_SET1(DSMOE__EXP_C3)));
    EXP4_STAGE(p[j] = V_FMA(p[j], r[j], V_SET1(DSMOE__EXP_C4)));
    EXP4_STAGE(p[j] = V_FMA(p[j], r[j], V_SET1(DSMOE__EXP_C5)));
    EXP4_STAGE(p[j] = V_ADD(V_FMA(p[j], z[j], r[j]), V_SET1(1.0f)));
}
static inline void FN(v_exp_sig4)(VF y[4]) {
    VF n[4], p[4];
    EXP4_STAGE(y[j] = V_MAX(V_MIN(y[j], V_SET1(DSMOE__EXP_HI)), V_SET1(-87.0f)));
    FN(v_exp_reduced4)(y, n, p);
    EXP4_STAGE(y[j] = V_MUL(p[j], V_I_EXP2(V_CVT_I(n[j]))));
}
/* 1 / (1 + exp_sig(-x)) for 4 vectors, the exps stage by stage (v_exp_sig4), so that the
 * 4 dependency chains (each about 80 cycles long) overlap inside the out-of-order window:
 * the same operations per lane as v_exp_sig, so the same bits. */
static inline void FN(v_sigmoid4)(VF *s0, VF *s1, VF *s2, VF *s3, VF x0, VF x1, VF x2, VF x3) {
    const VF one = V_SET1(1.0f);
    VF y[4] = {V_NEG(x0), V_NEG(x1), V_NEG(x2), V_NEG(x3)};
    FN(v_exp_sig4)(y);
    *s0 = V_DIV(one, V_ADD(one, y[0]));
    *s1 = V_DIV(one, V_ADD(one, y[1]));
    *s2 = V_DIV(one, V_ADD(one, y[2]));
    *s3 = V_DIV(one, V_ADD(one, y[3]));
}

static int FN(k_sigmoid_bias)(float *s, float *c, const float *u, const float *b, int64_t n) {
    int64_t i = 0;
    const VF one = V_SET1(1.0f);
    const VI expo = V_I_SET1(0x7f800000);
    VI nf = V_I_SET1(0); /* lane-wise max of the exponent fields: all ones = NaN/Inf */
    for (; i + 4 * W <= n; i += 4 * W) {
        const VF x0 = V_LOAD(u + i), x1 = V_LOAD(u + i + W);
        const VF x2 = V_LOAD(u + i + 2 * W), x3 = V_LOAD(u + i + 3 * W);
        nf = V_I_MAXU(nf, V_I_AND(V_CAST_I(x0), expo));
        nf = V_I_MAXU(nf, V_I_AND(V_CAST_I(x1), expo));
        nf = V_I_MAXU(nf, V_I_AND(V_CAST_I(x2), expo));
        nf = V_I_MAXU(nf, V_I_AND(V_CAST_I(x3), expo));
        VF s0, s1, s2, s3;
        FN(v_sigmoid4)(&s0, &s1, &s2, &s3, x0, x1, x2, x3);
        V_STORE(s + i, s0);
        V_STORE(s + i + W, s1);
        V_STORE(s + i + 2 * W, s2);
        V_STORE(s + i + 3 * W, s3);
        if (b) {
            V_STORE(c + i, V_ADD(s0, V_LOAD(b + i)));
            V_STORE(c + i + W, V_ADD(s1, V_LOAD(b + i + W)));
            V_STORE(c + i + 2 * W, V_ADD(s2, V_LOAD(b + i + 2 * W)));
            V_STORE(c + i + 3 * W, V_ADD(s3, V_LOAD(b + i + 3 * W)));
        }
    }
    for (; i + W <= n; i += W) {
        VF x = V_LOAD(u + i);
        nf = V_I_MAXU(nf, V_I_AND(V_CAST_I(x), expo));
        VF sv = V_DIV(one, V_ADD(one, FN(v_exp_sig)(V_NEG(x))));
        V_STORE(s + i, sv);
        if (b) V_STORE(c + i, V_ADD(sv, V_LOAD(b + i)));
    }
    int32_t e[W];
    V_I_STORE(e, nf);
    int bad = 0;
    for (int j = 0; j < W; j++) bad |= e[j] == 0x7f800000;
    for (; i < n; i++) {
        if (!isfinite(u[i])) return 1;
        s[i] = dsmoe__sigmoidf(u[i]);
        if (b) c[i] = s[i] + b[i];
    }
    return bad;
}

static float FN(tree16)(float *p) {
    for (int s = 8; s >= 1; s >>= 1)
        for (int j = 0; j < s; j++) p[j] += p[j + s];
    return p[0];
}

/* out[j] = exp(in[j] − m) for j < n (out may be in) and their sum in 16 running lanes
 * (lane j & 15) finished by tree16: softmax's arithmetic. The tail runs as one more block
 * of 16 whose lanes past n hold −inf, whose exp is +0 and leaves the lane sums unchanged. */
static float FN(exp_sum16)(float *out, const float *in, int64_t n, float m) {
    const VF vm = V_SET1(m);
    VF acc0 = V_SET1(0.0f);
#if W == 8
    VF acc1 = V_SET1(0.0f);
#endif
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        VF e0 = FN(v_exp)(V_SUB(V_LOAD(in + i), vm));
        V_STORE(out + i, e0);
        acc0 = V_ADD(acc0, e0);
#if W == 8
        VF e1 = FN(v_exp)(V_SUB(V_LOAD(in + i + 8), vm));
        V_STORE(out + i + 8, e1);
        acc1 = V_ADD(acc1, e1);
#endif
    }
    const int64_t rest = n - i;
    if (rest > 0) {
        float t[16];
        for (int l = 0; l < 16; l++) t[l] = l < rest ? in[i + l] : -INFINITY;
        VF e0 = FN(v_exp)(V_SUB(V_LOAD(t), vm));
        V_STORE(t, e0);
        acc0 = V_ADD(acc0, e0);
#if W == 8
        VF e1 = FN(v_exp)(V_SUB(V_LOAD(t + 8), vm));
        V_STORE(t + 8, e1);
        acc1 = V_ADD(acc1, e1);
#endif
        memcpy(out + i, t, (size_t)rest * sizeof(float));
    }
    float ps[16];
    V_STORE(ps, acc0);
#if W == 8
    V_STORE(ps + 8, acc1);
#endif
    return FN(tree16)(ps);
}

/* p[j] = p[j] / s for j < n */
static void FN(div_all)(float *p, int64_t n, float s) {
    const VF vs = V_SET1(s);
    int64_t i = 0;
    for (; i + W <= n; i += W) V_STORE(p + i, V_DIV(V_LOAD(p + i), vs));
    for (; i < n; i++) p[i] = p[i] / s;
}

static void FN(k_softmax)(float *out, const float *in, int64_t n) {
    if (n <= 0) return;
    /* the maximum (exact in any order) of the finite values; when some are NaN every
     * output is NaN whatever m is (their exps enter the sum) */
    VF vmax = V_SET1(in[0]);
    int64_t i = 0;
    for (; i + W <= n; i += W) vmax = V_MAX(vmax, V_LOAD(in + i));
    float t[16];
    V_STORE(t, vmax);
    float m = in[0];
    for (int l = 0; l < W; l++) m = t[l] > m ? t[l] : m;
    for (; i < n; i++) m = in[i] > m ? in[i] : m;
    FN(div_all)(out, n, FN(exp_sum16)(out, in, n, m));
}

#ifndef SIMD_OWN_SOFTMAX_SCALED /* avx512.c has its own, with masked tails */
/* kernels.h: softmax's arithmetic on the scaled row, in three vector passes. */
static void FN(k_softmax_scaled)(float *p, int64_t n, int64_t len, float scale, float *lse) {
    const VF vsc = V_SET1(scale);
    VF vmax = V_SET1(-INFINITY);
    int64_t i = 0;
    for (; i + W <= n; i += W) {
        VF x = V_MUL(V_LOAD(p + i), vsc);
        V_STORE(p + i, x);
        vmax = V_MAX(vmax, x);
    }
    float t[16];
    V_STORE(t, vmax);
    float m = -INFINITY;
    for (int l = 0; l < W; l++) m = t[l] > m ? t[l] : m;
    for (; i < n; i++) {
        p[i] *= scale;
        m = p[i] > m ? p[i] : m;
    }
    const float s = FN(exp_sum16)(p, p, n, m);
    FN(div_all)(p, n, s);
    if (len > n) memset(p + n, 0, (size_t)(len - n) * sizeof(float));
    if (lse) *lse = m - logf(1.0f / s);
}
#endif

static void FN(k_bf16_to_f32)(float *out, const uint16_t *in, int64_t n) {
    int64_t i = 0;
    for (; i + W <= n; i += W) V_STORE(out + i, V_LOAD_BF16(in + i));
    for (; i < n; i++) {
        uint32_t b = (uint32_t)in[i] << 16;
        memcpy(&out[i], &b, 4);
    }
}

static float FN(k_dot_bf16)(const float *x, const uint16_t *w, int64_t n) {
    float p[16];
    VF acc0 = V_SET1(0.0f);
#if W == 8
    VF acc1 = V_SET1(0.0f);
#endif
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = V_FMA(V_LOAD(x + i), V_LOAD_BF16(w + i), acc0);
#if W == 8
        acc1 = V_FMA(V_LOAD(x + i + 8), V_LOAD_BF16(w + i + 8), acc1);
#endif
    }
    V_STORE(p, acc0);
#if W == 8
    V_STORE(p + 8, acc1);
#endif
    for (; i < n; i++) {
        uint32_t b = (uint32_t)w[i] << 16;
        float wf;
        memcpy(&wf, &b, 4);
        p[i & 15] = fmaf(x[i], wf, p[i & 15]);
    }
    return FN(tree16)(p);
}

static inline void FN(v_exp4)(VF x[4]) {
    VF xc[4], n[4], p[4];
    VI ni[4], n1[4], n2[4];
    EXP4_STAGE(xc[j] = V_MIN(V_MAX(x[j], V_SET1(DSMOE__EXP_LO)), V_SET1(DSMOE__EXP_HI)));
    FN(v_exp_reduced4)(xc, n, p);
    EXP4_STAGE(ni[j] = V_CVT_I(n[j]));
    EXP4_STAGE(n1[j] = V_I_SRAI1(ni[j]));
    EXP4_STAGE(n2[j] = V_I_SUB(ni[j], n1[j]));
    EXP4_STAGE(p[j] = V_MUL(V_MUL(p[j], V_I_EXP2(n1[j])), V_I_EXP2(n2[j])));
    EXP4_STAGE(p[j] = V_SEL_GT(x[j], V_SET1(DSMOE__EXP_HI), p[j], V_SET1(INFINITY)));
    EXP4_STAGE(x[j] = V_SEL_LT(x[j], V_SET1(DSMOE__EXP_LO), p[j], V_SET1(0.0f)));
}
#undef EXP4_STAGE

static void FN(k_swiglu)(float *h, const float *g, const float *u, int64_t n) {
    int64_t i = 0;
    const VF one = V_SET1(1.0f);
    for (; i + 4 * W <= n; i += 4 * W) {
        VF gv[4], e[4];
        for (int q = 0; q < 4; q++) gv[q] = V_LOAD(g + i + q * W), e[q] = V_NEG(gv[q]);
        FN(v_exp_sig4)(e);
        for (int q = 0; q < 4; q++)
            V_STORE(h + i + q * W, V_MUL(V_DIV(gv[q], V_ADD(one, e[q])), V_LOAD(u + i + q * W)));
    }
    for (; i + W <= n; i += W) {
        VF gv = V_LOAD(g + i);
        VF silu = V_DIV(gv, V_ADD(one, FN(v_exp_sig)(V_NEG(gv))));
        V_STORE(h + i, V_MUL(silu, V_LOAD(u + i)));
    }
    for (; i < n; i++) {
        float e = dsmoe__expf_sig(-g[i]);
        float silu = g[i] / (1.0f + e);
        h[i] = silu * u[i];
    }
}

static void FN(k_swiglu_backward)(float *dg, float *du, const float *dh, const float *g,
                                  const float *u, int64_t n) {
    int64_t i = 0;
    const VF one = V_SET1(1.0f);
    for (; i + 4 * W <= n; i += 4 * W) {
        VF e[4];
        for (int q = 0; q < 4; q++) e[q] = V_NEG(V_LOAD(g + i + q * W));
        FN(v_exp_sig4)(e);
        for (int q = 0; q < 4; q++) {
            const int64_t o = i + q * W;
            VF gv = V_LOAD(g + o), uv = V_LOAD(u + o), dhv = V_LOAD(dh + o);
            VF sg = V_DIV(one, V_ADD(one, e[q]));
            VF silu = V_MUL(gv, sg);
            VF dsilu = V_MUL(sg, V_ADD(one, V_MUL(gv, V_SUB(one, sg))));
            VF t = V_MUL(dhv, uv);
            V_STORE(dg + o, V_ADD(V_LOAD(dg + o), V_MUL(t, dsilu)));
            V_STORE(du + o, V_ADD(V_LOAD(du + o), V_MUL(dhv, silu)));
        }
    }
    for (; i + W <= n; i += W) {
        VF gv = V_LOAD(g + i), uv = V_LOAD(u + i), dhv = V_LOAD(dh + i);
        VF sg = V_DIV(one, V_ADD(one, FN(v_exp_sig)(V_NEG(gv))));
        VF silu = V_MUL(gv, sg);
        VF dsilu = V_MUL(sg, V_ADD(one, V_MUL(gv, V_SUB(one, sg))));
        VF t = V_MUL(dhv, uv);
        V_STORE(dg + i, V_ADD(V_LOAD(dg + i), V_MUL(t, dsilu)));
        V_STORE(du + i, V_ADD(V_LOAD(du + i), V_MUL(dhv, silu)));
    }
    for (; i < n; i++) {
        float sg = 1.0f / (1.0f + dsmoe__expf_sig(-g[i]));
        float silu = g[i] * sg;
        float dsilu = sg * (1.0f + g[i] * (1.0f - sg));
        float t = dh[i] * u[i];
        dg[i] = dg[i] + t * dsilu;
        du[i] = du[i] + dh[i] * silu;
    }
}
