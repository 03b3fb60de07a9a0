/*
 * test_simd_elementwise.c — the element-wise kernels (kernels.h: sigmoid, sigmoid_bias,
 * softmax, swiglu, swiglu_backward) of every vector kernel set the CPU has (avx2,
 * avx512) against the scalar reference set, bit for bit: the contract that lets results
 * never depend on the CPU's kernel set. Every length 1 .. 200 (each vector block and
 * tail: the 4-vector blocks, single vectors and scalar ends), values from near 0 to
 * beyond the exp's clamps (|x| up to 120, where exp underflows or saturates), and the
 * accumulating kernel's prior contents. Nothing past n may be written.
 */
#include "kernels/kernels.h"
#include "testlib.h"

enum { NMAX = 200, GUARD = 8 };

static void fill(float *x, int64_t n, int scale) {
    static const double spread[] = {0.3, 3.0, 40.0};
    for (int64_t i = 0; i < n; i++) x[i] = (float)(spread[scale] * tl_normal());
    if (scale == 2 && n > 2) x[0] = 120.0f, x[n - 1] = -120.0f; /* past the clamps */
}

/* bits of a and b over n floats, and the guard floats after n still `fillv` */
static int same(const float *a, const float *b, int64_t n) { return memcmp(a, b, (size_t)n * sizeof(float)) == 0; }
static int guard_ok(const float *p, int64_t n) {
    for (int i = 0; i < GUARD; i++)
        if (p[n + i] != -7.0f) return 0;
    return 1;
}

static void test_bits(void) {
    tl_seed(71);
    static const char *const sets[] = {"avx2", "avx512"};
    const dsmoe__kernel_table *ref = dsmoe__kernels_named("ref");
    int ran = 0, bad = 0, bad_guard = 0;
    float g[NMAX + GUARD], u[NMAX + GUARD], dh[NMAX + GUARD], b[NMAX + GUARD];
    float w0[NMAX + GUARD], w1[NMAX + GUARD], v0[NMAX + GUARD], v1[NMAX + GUARD];
    for (size_t s = 0; s < sizeof sets / sizeof sets[0]; s++) {
        const dsmoe__kernel_table *k = dsmoe__kernels_named(sets[s]);
        if (!k) continue;
        for (int64_t n = 1; n <= NMAX; n++)
            for (int sc = 0; sc < 3; sc++) {
                fill(g, n, sc), fill(u, n, 1), fill(dh, n, 0), fill(b, n, 0);
                const char *what = NULL;
                /* sigmoid */
                for (int i = 0; i < NMAX + GUARD; i++) w0[i] = w1[i] = -7.0f;
                ref->sigmoid(w0, g, n), k->sigmoid(w1, g, n);
                if (!same(w0, w1, n)) what = "sigmoid";
                bad_guard += !guard_ok(w1, n);
                /* sigmoid_bias */
                for (int i = 0; i < NMAX + GUARD; i++) w0[i] = w1[i] = v0[i] = v1[i] = -7.0f;
                const int r0 = ref->sigmoid_bias(w0, v0, g, b, n), r1 = k->sigmoid_bias(w1, v1, g, b, n);
                if (r0 != r1 || !same(w0, w1, n) || !same(v0, v1, n)) what = "sigmoid_bias";
                bad_guard += !guard_ok(w1, n) + !guard_ok(v1, n);
                /* softmax */
                for (int i = 0; i < NMAX + GUARD; i++) w0[i] = w1[i] = -7.0f;
                ref->softmax(w0, g, n), k->softmax(w1, g, n);
                if (!same(w0, w1, n)) what = "softmax";
                bad_guard += !guard_ok(w1, n);
                /* swiglu */
                for (int i = 0; i < NMAX + GUARD; i++) w0[i] = w1[i] = -7.0f;
                ref->swiglu(w0, g, u, n), k->swiglu(w1, g, u, n);
                if (!same(w0, w1, n)) what = "swiglu";
                bad_guard += !guard_ok(w1, n);
                /* swiglu_backward: adds into dg and du */
                for (int i = 0; i < NMAX + GUARD; i++) w0[i] = w1[i] = v0[i] = v1[i] = -7.0f;
                for (int64_t i = 0; i < n; i++) w0[i] = w1[i] = b[i], v0[i] = v1[i] = -b[i];
                ref->swiglu_backward(w0, v0, dh, g, u, n), k->swiglu_backward(w1, v1, dh, g, u, n);
                if (!same(w0, w1, n) || !same(v0, v1, n)) what = "swiglu_backward";
                bad_guard += !guard_ok(w1, n) + !guard_ok(v1, n);
                ran++;
                if (what && bad++ < 5)
                    TL_FAIL("%s: %s n %lld spread %d: not the scalar reference's bits", sets[s], what,
                            (long long)n, sc);
            }
    }
    tl_checks += 2;
    if (bad_guard) TL_FAIL("%d outputs written past n", bad_guard);
    if (dsmoe__kernels_named("avx2") && ran == 0) TL_FAIL("no vector kernel set ran");
    printf("  %d rows of five kernels against the scalar bits\n", ran);
}

int main(void) {
    RUN(test_bits);
    return TEST_SUMMARY();
}
