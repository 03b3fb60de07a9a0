/*
 * bench_moe.c — times dsmoe's MoE layer forward and backward at a Moonlight-like shape
 * (D 2048, F 1408, E 64, K 6, two shared experts) and at DeepSeek-V3's routing shape
 * (E 256 in 8 groups keeping 4, K 8, one shared expert) with D and F scaled by 1/4 to
 * fit memory, next to the references measured in the same run: the SGEMM rate of the
 * BLAS the layer calls (BLIS, one thread per call, as the layer calls it: one large
 * product with the FLOPs of the T = 512 forward, on each thread at once), the machine's
 * memory read bandwidth (a streaming read of a buffer far larger than the caches) and its
 * FMA peak (a register-only FMA loop), with the CPU (bench_machine.h). Prints one JSON
 * line per measurement; bench/bench_moe.sh turns them, with moe_torch.py's, into a table.
 *
 *   bench_moe [--shape moonlight|v3-quarter|all] [--tokens 1,32,512] [--backward 512]
 *             [--repeat 5] [--threads 1] [--bf16] [--packed]
 *   bench_moe --threads 1,2 [--shape moonlight] [--tokens 512] [--backward 512] [--repeat 5]
 *
 * A list of thread counts measures thread scaling instead: the forward at the last
 * token count and the backward, each timed at every thread count in turn within each
 * repetition (so all counts see the same machine state), best of the repetitions,
 * with the speed-up over the first count; the SGEMM reference likewise (the total rate
 * of that many concurrent single-threaded callers).
 *
 * --packed times the forward on a layer in the packed weight layout (inference only;
 * the backward's layer is always in the checkpoint layout).
 *
 * Every repetition uses different tokens (so different experts); the best (shortest)
 * repetition is reported after one warm-up, as moe_torch.py does: on a shared machine
 * the minimum is the least disturbed measure of what each implementation can do. FLOPs count the expert products and the gate projection
 * (2 per multiply-add); the backward counts its four expert products and the gate's two.
 */
#include "bench_common.h"
#include "dsmoe.h"

#include "kernels/blas.h" /* the library's BLAS wrapper: the same products the layer runs */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct shape {
    const char *name;
    int D, F, E, K, G, TG, ns;
    float scale;
} shape;

static const shape shapes[] = {
    {"moonlight", 2048, 1408, 64, 6, 1, 1, 2, 2.446f},
    {"v3-quarter", 1792, 512, 256, 8, 8, 4, 1, 2.5f},
};

static double best(const double *v, int n) {
    double b = v[0];
    for (int i = 1; i < n; i++) b = v[i] < b ? v[i] : b;
    return b;
}

static uint64_t rng = 0x1234567;
static float randn(void) {
    double u1, u2;
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    u1 = ((double)(rng >> 11) + 0.5) * 0x1.0p-53;
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    u2 = (double)(rng >> 11) * 0x1.0p-53;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static void *xmalloc(size_t n) { return bench_malloc("bench_moe", n); }

/* The machine's FMA peak (GFLOP/s, the widest ISA, on the benchmark's threads), measured
 * in main with the read bandwidth (bench_machine.h); every figure is also reported as a
 * share of it ("peak_fraction"). */
static double fma_peak;

/* SGEMM rate: C (M, N) = A (M, K) · B (N, K)ᵀ with N = 2F, K = D and M set to give
 * `flops`, through the library's wrapper (BLIS, one thread per call); with `threads`
 * > 1, that many callers at once, each on its own operands (total rate). Best of 3. */
static double sgemm_rate(double flops, int N, int K, int threads) {
    int M = (int)ceil(flops / (2.0 * N * K));
    if (M < 1) M = 1;
    const size_t per = (size_t)M * K + (size_t)N * K + (size_t)M * N;
    float *buf = (float *)xmalloc(per * (size_t)threads * 4);
    for (size_t i = 0; i < per * (size_t)threads; i++) buf[i] = randn();
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        double t = bench_now();
#pragma omp parallel for num_threads(threads) schedule(static, 1)
        for (int c = 0; c < threads; c++) {
            float *A = buf + per * (size_t)c, *B = A + (size_t)M * K, *C = B + (size_t)N * K;
            dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, M, N, K, 1.0f, A, K, B, K, 0.0f, C, N);
        }
        t = bench_now() - t;
        if (t < best) best = t;
    }
    dsmoe_free(buf);
    return 2.0 * M * N * (double)K * threads / best;
}

static dsmoe_moe *make_layer(const shape *s, int train, int bf16, int packed, int64_t maxT,
                             int threads) {
    dsmoe_moe_config c;
    dsmoe_moe_config_default(&c);
    dsmoe_router_preset(s->G > 1 ? "deepseek-v3" : "moonlight", &c.router);
    c.router.n_experts = s->E;
    c.router.n_groups = s->G;
    c.router.topk_groups = s->TG;
    c.router.top_k = s->K;
    c.router.scale = s->scale;
    c.hidden_size = s->D;
    c.expert_size = s->F;
    c.n_shared = s->ns;
    c.train = train;
    c.weight_dtype = bf16 ? DSMOE_DTYPE_BF16 : DSMOE_DTYPE_F32;
    c.weight_layout = packed && !train ? DSMOE_MOE_LAYOUT_PACKED : DSMOE_MOE_LAYOUT_CHECKPOINT;
    c.max_tokens = maxT;
    c.n_threads = threads;
    dsmoe_moe *m = NULL;
    if (dsmoe_moe_create(&c, &m) != DSMOE_OK) {
        fprintf(stderr, "bench_moe: %s\n", dsmoe_last_error());
        exit(1);
    }
    dsmoe_moe_init_random(m, 42);
    return m;
}

static void run_shape(const shape *s, const int *Ts, int nT, int Tb, int repeat, int threads,
                      int bf16, int packed, double bw) {
    const double esz = bf16 ? 2.0 : 4.0;
    const double expert_flops = 3.0 * s->F * s->D, shared_flops = 3.0 * s->ns * s->F * s->D;
    const double fwd512 = 2.0 * 512 * (s->K * expert_flops + shared_flops + (double)s->E * s->D);
    const double peak = sgemm_rate(fwd512, 2 * s->F, s->D, 1);
    printf("{\"impl\": \"sgemm\", \"shape\": \"%s\", \"gflops_per_s\": %.3f, \"peak_fraction\": %.4f}\n", s->name,
           peak / 1e9, peak / 1e9 / fma_peak);
    fflush(stdout);
    int64_t maxT = 0;
    for (int i = 0; i < nT; i++) maxT = Ts[i] > maxT ? Ts[i] : maxT;
    dsmoe_moe *m = maxT > 0 ? make_layer(s, 0, bf16, packed, maxT, threads) : NULL;
    for (int i = 0; i < nT; i++) {
        const int T = Ts[i];
        if (T < 1) continue;
        const int reps = T > 32 ? repeat : T > 8 ? (2 * repeat > 10 ? 2 * repeat : 10) : (2 * repeat > 50 ? 2 * repeat : 50);
        float *x = (float *)xmalloc((size_t)T * s->D * 4 * (size_t)(reps + 1));
        float *y = (float *)xmalloc((size_t)T * s->D * 4);
        for (size_t j = 0; j < (size_t)T * s->D * (size_t)(reps + 1); j++) x[j] = randn();
        double *times = (double *)malloc(sizeof(double) * (size_t)reps), active = 0;
        for (int r = 0; r <= reps; r++) {
            const float *xr = x + (size_t)r * T * s->D;
            double t = bench_now();
            if (dsmoe_moe_forward(m, y, xr, T, threads) != DSMOE_OK) {
                fprintf(stderr, "bench_moe: %s\n", dsmoe_last_error());
                exit(1);
            }
            t = bench_now() - t;
            if (r == 0) continue;
            times[r - 1] = t;
            const dsmoe_moe_routing *ro = dsmoe_moe_last_routing(m);
            int used = 0;
            for (int e = 0; e < s->E; e++) used += ro->counts[e] > 0;
            active += (used * expert_flops + shared_flops + (double)s->E * s->D) * esz / reps;
        }
        double sec = best(times, reps);
        double flops = 2.0 * T * (s->K * expert_flops + shared_flops + (double)s->E * s->D);
        printf("{\"impl\": \"dsmoe\", \"shape\": \"%s\", \"pass\": \"forward\", \"T\": %d, "
               "\"seconds\": %.6g, \"gflops_per_s\": %.3f, \"sgemm_fraction\": %.4f, "
               "\"active_bytes\": %.6g, \"read_gb_per_s\": %.3f, \"bandwidth_fraction\": %.4f, "
               "\"dtype\": \"%s\", \"layout\": \"%s\", \"threads\": %d, \"reps\": %d, "
               "\"peak_fraction\": %.4f}\n",
               s->name, T, sec, flops / sec / 1e9, flops / sec / peak, active, active / sec / 1e9,
               active / sec / bw, bf16 ? "bf16" : "f32", packed ? "packed" : "checkpoint",
               threads, reps, flops / sec / 1e9 / fma_peak);
        fflush(stdout);
        free(times);
        dsmoe_free(x);
        dsmoe_free(y);
    }
    dsmoe_moe_free(m);
    if (Tb > 0 && !bf16) {
        m = make_layer(s, 1, 0, 0, Tb, threads);
        const int reps = repeat < 3 ? repeat : 3;
        float *x = (float *)xmalloc((size_t)Tb * s->D * 4), *y = (float *)xmalloc((size_t)Tb * s->D * 4);
        float *dy = (float *)xmalloc((size_t)Tb * s->D * 4), *dx = (float *)xmalloc((size_t)Tb * s->D * 4);
        double *times = (double *)malloc(sizeof(double) * (size_t)reps);
        for (int r = 0; r <= reps; r++) {
            for (size_t j = 0; j < (size_t)Tb * s->D; j++) {
                x[j] = randn();
                dy[j] = randn();
                dx[j] = 0;
            }
            dsmoe_moe_zero_grad(m);
            if (dsmoe_moe_forward(m, y, x, Tb, threads) != DSMOE_OK) exit(1);
            double t = bench_now();
            if (dsmoe_moe_backward(m, dx, dy, x, NULL, Tb, threads) != DSMOE_OK) {
                fprintf(stderr, "bench_moe: %s\n", dsmoe_last_error());
                exit(1);
            }
            t = bench_now() - t;
            if (r) times[r - 1] = t;
        }
        double sec = best(times, reps);
        double flops = 2.0 * 2.0 * Tb * (s->K * expert_flops + shared_flops) + 2.0 * 2.0 * Tb * s->E * s->D;
        printf("{\"impl\": \"dsmoe\", \"shape\": \"%s\", \"pass\": \"backward\", \"T\": %d, "
               "\"seconds\": %.6g, \"gflops_per_s\": %.3f, \"sgemm_fraction\": %.4f, "
               "\"dtype\": \"f32\", \"threads\": %d, \"reps\": %d, \"peak_fraction\": %.4f}\n",
               s->name, Tb, sec, flops / sec / 1e9, flops / sec / peak, threads, reps,
               flops / sec / 1e9 / fma_peak);
        fflush(stdout);
        free(times);
        dsmoe_free(x);
        dsmoe_free(y);
        dsmoe_free(dy);
        dsmoe_free(dx);
        dsmoe_moe_free(m);
    }
}

/* Thread scaling: forward at T and backward at Tb on one training layer, each timed at
 * every thread count in turn within each repetition; best of `repeat`. */
static void run_scaling(const shape *s, int T, int Tb, int repeat, const int *th, int nth) {
    const double expert_flops = 3.0 * s->F * s->D, shared_flops = 3.0 * s->ns * s->F * s->D;
    const double fwd_flops = 2.0 * T * (s->K * expert_flops + shared_flops + (double)s->E * s->D);
    const double bwd_flops = 2.0 * 2.0 * Tb * (s->K * expert_flops + shared_flops) +
                             2.0 * 2.0 * Tb * s->E * s->D;
    int maxth = 1;
    for (int j = 0; j < nth; j++) maxth = th[j] > maxth ? th[j] : maxth;
    double sg[16];
    for (int j = 0; j < nth; j++) sg[j] = sgemm_rate(2.0 * 512 * (s->K * expert_flops + shared_flops), 2 * s->F, s->D, th[j]);
    const int Tm = T > Tb ? T : Tb;
    dsmoe_moe *m = make_layer(s, 1, 0, 0, Tm, maxth);
    float *x = (float *)xmalloc((size_t)Tm * s->D * 4), *y = (float *)xmalloc((size_t)Tm * s->D * 4);
    float *dy = (float *)xmalloc((size_t)Tm * s->D * 4), *dx = (float *)xmalloc((size_t)Tm * s->D * 4);
    double fwd[16], bwd[16];
    for (int j = 0; j < nth; j++) fwd[j] = bwd[j] = 1e30;
    for (int r = 0; r <= repeat; r++) { /* repetition 0 warms up */
        for (size_t i = 0; i < (size_t)Tm * s->D; i++) {
            x[i] = randn();
            dy[i] = randn();
        }
        for (int j = 0; j < nth; j++) {
            double t = bench_now();
            if (T > 0 && dsmoe_moe_forward(m, y, x, T, th[j]) != DSMOE_OK) goto fail;
            t = bench_now() - t;
            if (r && T > 0 && t < fwd[j]) fwd[j] = t;
            if (Tb <= 0) continue;
            if (dsmoe_moe_forward(m, y, x, Tb, th[j]) != DSMOE_OK) goto fail;
            memset(dx, 0, (size_t)Tb * s->D * 4);
            dsmoe_moe_zero_grad(m);
            t = bench_now();
            if (dsmoe_moe_backward(m, dx, dy, x, NULL, Tb, th[j]) != DSMOE_OK) goto fail;
            t = bench_now() - t;
            if (r && t < bwd[j]) bwd[j] = t;
        }
    }
    for (int j = 0; j < nth; j++) {
        printf("{\"impl\": \"sgemm\", \"shape\": \"%s\", \"threads\": %d, \"gflops_per_s\": %.3f, "
               "\"speedup\": %.3f}\n", s->name, th[j], sg[j] / 1e9, sg[j] / sg[0]);
        if (T > 0)
            printf("{\"impl\": \"dsmoe\", \"shape\": \"%s\", \"pass\": \"forward\", \"T\": %d, "
                   "\"threads\": %d, \"seconds\": %.6g, \"gflops_per_s\": %.3f, \"speedup\": %.3f, "
                   "\"reps\": %d}\n", s->name, T, th[j], fwd[j], fwd_flops / fwd[j] / 1e9, fwd[0] / fwd[j], repeat);
        if (Tb > 0)
            printf("{\"impl\": \"dsmoe\", \"shape\": \"%s\", \"pass\": \"backward\", \"T\": %d, "
                   "\"threads\": %d, \"seconds\": %.6g, \"gflops_per_s\": %.3f, \"speedup\": %.3f, "
                   "\"reps\": %d}\n", s->name, Tb, th[j], bwd[j], bwd_flops / bwd[j] / 1e9, bwd[0] / bwd[j], repeat);
    }
    fflush(stdout);
    dsmoe_free(x);
    dsmoe_free(y);
    dsmoe_free(dy);
    dsmoe_free(dx);
    dsmoe_moe_free(m);
    return;
fail:
    fprintf(stderr, "bench_moe: %s\n", dsmoe_last_error());
    exit(1);
}

int main(int argc, char **argv) {
    const char *which = "all", *tokens = "1,32,512";
    const char *threads_arg = "1";
    int Tb = 512, repeat = 5, bf16 = 0, packed = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--shape") == 0 && v) which = argv[++i];
        else if (strcmp(a, "--tokens") == 0 && v) tokens = argv[++i];
        else if (strcmp(a, "--backward") == 0 && v) Tb = atoi(argv[++i]);
        else if (strcmp(a, "--repeat") == 0 && v) repeat = atoi(argv[++i]);
        else if (strcmp(a, "--threads") == 0 && v) threads_arg = argv[++i];
        else if (strcmp(a, "--bf16") == 0) bf16 = 1;
        else if (strcmp(a, "--packed") == 0) packed = 1;
        else {
            fprintf(stderr, "usage: bench_moe [--shape moonlight|v3-quarter|all] [--tokens 1,32,512]\n"
                            "                 [--backward T] [--repeat N] [--threads N] [--bf16]\n"
                            "                 [--packed]\n"
                            "       bench_moe --threads 1,2 [--shape S] [--tokens T] [--backward T] [--repeat N]\n");
            return 2;
        }
    }
    if (repeat < 1) repeat = 1;
    int Ts[16], nT = 0;
    for (const char *p = tokens; *p && nT < 16;) { /* "" or "0": no forward timings */
        Ts[nT++] = atoi(p);
        p = strchr(p, ',');
        if (!p) break;
        p++;
    }
    int th[16] = {1};
    int nth = bench_parse_threads("bench_moe", threads_arg, th, 16);
    if (nth < 0) return 2;
    if (nth == 0) nth = 1;
    const int threads = th[0];
    /* the machine: CPU, FMA peak, read bandwidth (1 GiB streaming sum), most threads asked */
    bench_machine mach;
    bench_machine_measure(&mach, th[nth - 1] > threads ? th[nth - 1] : threads, (size_t)1 << 30);
    const double bw = mach.read_n;
    fma_peak = bench_machine_peak(&mach);
    if (fma_peak <= 0) fma_peak = 1e-9; /* no SIMD FMA: shares are meaningless */
    printf("{\"impl\": \"memory\", \"read_gb_per_s\": %.3f, \"blas\": \"BLIS %s\", \"version\": \"%s\", ",
           bw / 1e9, dsmoe__blas_kernels(), dsmoe_version());
    bench_machine_json(stdout, &mach, dsmoe_isa());
    printf("}\n");
    if (nth > 1) {
        printf("{\"impl\": \"build\", \"isa\": \"%s\", \"blas\": \"BLIS %s\", \"version\": \"%s\"}\n",
               dsmoe_isa(), dsmoe__blas_kernels(), dsmoe_version());
        int found = 0;
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
            if (strcmp(which, "all") != 0 && strcmp(which, shapes[i].name) != 0) continue;
            found = 1;
            run_scaling(&shapes[i], nT ? Ts[nT - 1] : 0, Tb, repeat, th, nth);
        }
        if (!found) {
            fprintf(stderr, "bench_moe: unknown shape '%s'\n", which);
            return 2;
        }
        return 0;
    }
    fflush(stdout);
    int found = 0;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        if (strcmp(which, "all") != 0 && strcmp(which, shapes[i].name) != 0) continue;
        found = 1;
        run_shape(&shapes[i], Ts, nT, Tb, repeat, threads, bf16, packed, bw);
    }
    if (!found) {
        fprintf(stderr, "bench_moe: unknown shape '%s'\n", which);
        return 2;
    }
    return 0;
}
