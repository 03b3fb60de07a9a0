/*
 * bench_gemm.c — the MoE layer's weight-streaming product (src/kernels/moe_gemm.c) by rows per
 * expert: C (n, R) = X (n, D) · W (R, D)ᵀ over the W1 (2F, D) and W2 (D, F) of E experts
 * of the Moonlight-like shape (D 2048, F 1408; --inner 2816 gives the two shared experts
 * taken together), one thread, for n = 1 .. 32 rows of X,
 * next to what bounds it, measured in the same run: the memory read bandwidth (a
 * streaming read of the same weights), the SGEMM of the same n rows through the library's
 * BLAS wrapper (BLIS, one thread: what the layer would call otherwise), that SGEMM's
 * rate on a large product and the machine's FMA peak (a register-only FMA loop; the first
 * line, with the CPU: bench_machine.h).
 * The same product on the same weights in the packed layout (src/kernels/moe_gemm_pk.c, panels
 * of 16 rows) runs alongside ("packed_*" fields).
 * Each n alternates the four, best of --repeat; one JSON line per n.
 *
 *   bench_gemm [--experts 32] [--inner 1408] [--repeat 3] [--isa avx512|avx2|ref]
 *             [--rows 1,2,3,4,...]
 *
 * At decode batch sizes the experts see a few rows each (T · K / E on average: 3 for a
 * Moonlight-like layer at T = 32), so this table is where the layer's T = 32 time goes.
 */
#include "bench_common.h"
#include "dsmoe.h"
#include "kernels/blas.h"
#include "moe/moe_internal.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *xmalloc(size_t n) { return bench_malloc("bench_gemm", n); }

typedef int (*product_fn)(const char *, float *, int64_t, const float *const *, int, const void *,
                          dsmoe_dtype, int, int, int);

/* Seconds for the product of n rows against the W1 (2F, D) and W2 (D, F) of E experts
 * stored one after the other in W (checkpoint or packed layout, as `f` expects). */
static double time_experts(product_fn f, const char *isa, const float *W, int E, int F, int D,
                           int n, const float *const *xr, const float *const *hr, float *GU,
                           float *Y) {
    const size_t per = (size_t)3 * F * D;
    double t = bench_now();
    for (int e = 0; e < E; e++) {
        const float *w1 = W + (size_t)e * per, *w2 = w1 + (size_t)2 * F * D;
        f(isa, GU, 2 * F, xr, n, w1, DSMOE_DTYPE_F32, 0, 2 * F, D);
        f(isa, Y, D, hr, n, w2, DSMOE_DTYPE_F32, 0, D, F);
    }
    return bench_now() - t;
}

int main(int argc, char **argv) {
    int E = 32, F = 1408, repeat = 3;
    const char *isa = NULL, *rows_arg = "1,2,3,4,5,6,7,8,12,16,32";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--experts") && i + 1 < argc) E = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--inner") && i + 1 < argc) F = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--repeat") && i + 1 < argc) repeat = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--isa") && i + 1 < argc) isa = argv[++i];
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc) rows_arg = argv[++i];
        else {
            fprintf(stderr, "usage: bench_gemm [--experts E] [--inner F] [--repeat N] "
                            "[--isa avx512|avx2|ref] [--rows 1,2,3,...]\n");
            return 2;
        }
    }
    if (E < 1 || E > 256 || F < 16 || F > 8192 || repeat < 1) {
        fprintf(stderr, "bench_gemm: --experts 1..256, --inner 16..8192, --repeat >= 1\n");
        return 2;
    }
    if (!isa) isa = dsmoe_isa();
    int ns[64], nn = 0;
    for (const char *p = rows_arg; *p && nn < 64;) {
        int v = atoi(p);
        if (v < 1 || v > DSMOE__MOE_SKINNY_N) {
            fprintf(stderr, "bench_gemm: rows must be 1..%d\n", DSMOE__MOE_SKINNY_N);
            return 2;
        }
        ns[nn++] = v;
        while (*p && *p != ',') p++;
        if (*p == ',') p++;
    }
    const int D = 2048, nmax = DSMOE__MOE_SKINNY_N;
    const size_t per = (size_t)3 * F * D, total = per * (size_t)E;
    float *W = (float *)xmalloc(total * sizeof(float));
    float *Wp = (float *)xmalloc(total * sizeof(float)); /* packed: 2F and D are multiples of 16 */
    float *X = (float *)xmalloc((size_t)nmax * D * sizeof(float));
    float *GU = (float *)xmalloc((size_t)nmax * 2 * F * sizeof(float)); /* W1 product */
    float *H = (float *)xmalloc((size_t)nmax * F * sizeof(float));      /* W2's input */
    float *Y = (float *)xmalloc((size_t)nmax * D * sizeof(float));
    for (size_t i = 0; i < total; i++) W[i] = (float)((i * 2654435761u) % 1001) * 1e-3f - 0.5f;
    if (F % 8 != 0 || D % 16 != 0) {
        fprintf(stderr, "bench_gemm: --inner must be a multiple of 8\n");
        return 2;
    }
    for (int e = 0; e < E; e++) {
        const float *w1 = W + (size_t)e * per;
        dsmoe__moe_pack_rows(Wp + (size_t)e * per, w1, sizeof(float), 2 * F, D);
        dsmoe__moe_pack_rows(Wp + (size_t)e * per + (size_t)2 * F * D, w1 + (size_t)2 * F * D,
                             sizeof(float), D, F);
    }
    for (size_t i = 0; i < (size_t)nmax * D; i++) X[i] = (float)(i % 17) * 0.05f - 0.4f;
    for (size_t i = 0; i < (size_t)nmax * F; i++) H[i] = (float)(i % 13) * 0.05f - 0.3f;
    const float *xr[DSMOE__MOE_SKINNY_N], *hr[DSMOE__MOE_SKINNY_N];
    for (int i = 0; i < nmax; i++) {
        xr[i] = X + (size_t)i * D;
        hr[i] = H + (size_t)i * F;
    }
    if (!dsmoe__moe_gemm_nt_isa(isa, GU, 2 * F, xr, 1, W, DSMOE_DTYPE_F32, 0, 2 * F, D)) {
        fprintf(stderr, "bench_gemm: kernel set '%s' is not available here\n", isa);
        return 2;
    }
    /* SGEMM rate on a large product (compute-bound reference): (512, D) · W1ᵀ */
    double peak = 0;
    {
        const int M = 512;
        float *A = (float *)xmalloc((size_t)M * D * sizeof(float));
        float *P = (float *)xmalloc((size_t)M * 2 * F * sizeof(float));
        for (size_t i = 0; i < (size_t)M * D; i++) A[i] = (float)(i % 19) * 0.05f - 0.45f;
        for (int rep = 0; rep < 3; rep++) {
            double t = bench_now();
            dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, M, 2 * F, D, 1.0f, A, D, W, D, 0.0f, P,
                         2 * F);
            t = bench_now() - t;
            double r = 2.0 * M * 2 * F * D / t;
            peak = r > peak ? r : peak;
        }
        dsmoe_free(A);
        dsmoe_free(P);
    }
    /* the machine: CPU, FMA peak and read bandwidth, one thread (bench_machine.h) */
    bench_machine mach;
    bench_machine_measure(&mach, 1, (size_t)1 << 30);
    double fma = bench_machine_peak(&mach);
    if (fma <= 0) fma = 1e-9;
    printf("{\"impl\": \"machine\", ");
    bench_machine_json(stdout, &mach, isa);
    printf("}\n");
    printf("{\"impl\": \"sgemm\", \"gflops_per_s\": %.3f, \"isa\": \"%s\", \"peak_fraction\": %.4f, "
           "\"blas\": \"BLIS %s\"}\n",
           peak / 1e9, isa, peak / 1e9 / fma, dsmoe__blas_kernels());
    const double bytes = (double)total * sizeof(float);
    for (int j = 0; j < nn; j++) {
        const int n = ns[j];
        double t_k = 1e30, t_b = 1e30, t_r = 1e30, t_p = 1e30;
        for (int rep = 0; rep < repeat; rep++) {
            double t = time_experts(dsmoe__moe_gemm_nt_isa, isa, W, E, F, D, n, xr, hr, GU, Y);
            t_k = t < t_k ? t : t_k;
            t = time_experts(dsmoe__moe_gemm_pk_isa, isa, Wp, E, F, D, n, xr, hr, GU, Y);
            t_p = t < t_p ? t : t_p;
            t = bench_now();
            for (int e = 0; e < E; e++) {
                const float *w1 = W + (size_t)e * per, *w2 = w1 + (size_t)2 * F * D;
                dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, n, 2 * F, D, 1.0f, X, D, w1, D, 0.0f,
                             GU, 2 * F);
                dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, n, D, F, 1.0f, H, F, w2, F, 0.0f, Y, D);
            }
            t = bench_now() - t;
            t_b = t < t_b ? t : t_b;
            t = bench_read_seconds(W, total);
            t_r = t < t_r ? t : t_r;
        }
        const double flops = 2.0 * n * (double)total;
        printf("{\"impl\": \"dsmoe\", \"inner\": %d, \"rows\": %d, \"seconds\": %.6g, \"weights_gb_per_s\": %.3f, "
               "\"read_gb_per_s\": %.3f, \"bandwidth_fraction\": %.4f, \"gflops_per_s\": %.3f, "
               "\"sgemm_fraction\": %.4f, \"blas_seconds\": %.6g, \"speedup_vs_blas\": %.3f, "
               "\"packed_seconds\": %.6g, \"packed_weights_gb_per_s\": %.3f, "
               "\"packed_gflops_per_s\": %.3f, \"packed_speedup\": %.3f, \"peak_fraction\": %.4f, "
               "\"packed_peak_fraction\": %.4f}\n",
               F, n, t_k, bytes / t_k / 1e9, bytes / t_r / 1e9, t_r / t_k, flops / t_k / 1e9,
               flops / t_k / peak, t_b, t_b / t_k, t_p, bytes / t_p / 1e9, flops / t_p / 1e9,
               t_k / t_p, flops / t_k / 1e9 / fma, flops / t_p / 1e9 / fma);
        fflush(stdout);
    }
    dsmoe_free(W);
    dsmoe_free(Wp);
    dsmoe_free(X);
    dsmoe_free(GU);
    dsmoe_free(H);
    dsmoe_free(Y);
    return 0;
}
