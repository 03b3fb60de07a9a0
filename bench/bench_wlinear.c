/*
 * bench_wlinear.c — products with weights as stored (src/kernels/wlinear.h), the model's
 * attention, dense FFN and head projections, next to what bounds them, measured in the
 * same run (bench_machine.h: the CPU, the FMA peak, the read bandwidth):
 *   decode  T = 1 on each weight dtype and shape: GB/s of weights streamed, as a share
 *           of the header's read bandwidth of the same thread count and of a plain
 *           streaming read of the same bytes interleaved with the products (the weights
 *           are cycled over copies totalling at least 512 MiB, so they come from memory);
 *   prompt  T = 256: GFLOP/s as a share of the FMA peak of the same thread count, and
 *           against BLIS SGEMM (one call per thread on its share of the rows) on the
 *           same matrix widened to fp32 beforehand; on one thread also by thread CPU
 *           time against the FMA loop timed the same way (a busy machine's preemptions
 *           left out);
 *   MoE     the MoE layer's decode (dsmoe_moe_forward, T = 1, BF16 packed weights, D 2048,
 *           64 experts of 1408, top-6, 2 shared): bytes of the weights a token reads (the
 *           gate, its experts and the shared ones) per second as a share of the read
 *           bandwidth, and of a read of as many bytes interleaved with the forwards.
 * Best of --repeat runs each, one and two threads (--threads 1,2).
 *
 *   bench_wlinear [--repeat 5] [--threads 1,2] [--quick]
 */
#include "bench_common.h"
#include "dsmoe.h"
#include "kernels/blas.h"
#include "kernels/wlinear.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static void *xmalloc(size_t n) { return bench_malloc("bench_wlinear", n); }

static float randn(void) {
    static uint64_t s = 0x1234567ull;
    double a = 0;
    for (int i = 0; i < 4; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        a += (double)(s >> 11) * 0x1p-53;
    }
    return (float)((a - 2.0) * 1.7320508);
}

static const char *const TYPE_NAME[4] = {"f32", "bf16", "f16", "f8e4m3"};
static const int ESZ[4] = {4, 2, 2, 1};

/* Fills n weights of `type` (random values of unit scale); fp8 block scales 128 × 128. */
static void fill_weights(char *d, dsmoe__wtype type, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float f = randn();
        uint32_t u;
        memcpy(&u, &f, 4);
        if (type == DSMOE__WT_F32) {
            memcpy(d + i * 4, &f, 4);
        } else if (type == DSMOE__WT_BF16) {
            uint16_t h = (uint16_t)(u >> 16);
            memcpy(d + i * 2, &h, 2);
        } else if (type == DSMOE__WT_F16) {
            uint16_t h = (uint16_t)(((u >> 16) & 0x8000u) | (0x3800u + (u >> 13 & 0x3ff)));
            memcpy(d + i * 2, &h, 2);
        } else {
            uint8_t b = (uint8_t)(((u >> 24) & 0x80u) | (0x30u + ((u >> 20) & 0xf)));
            d[i] = (char)b;
        }
    }
}

typedef struct bench_mats {
    dsmoe__wmat *w;
    int copies;
    char *data;
    float *scale;
} bench_mats;

static void mats_make(bench_mats *m, dsmoe__wtype type, int64_t R, int64_t C, size_t min_total) {
    const size_t bytes = (size_t)(R * C) * (size_t)ESZ[type];
    m->copies = (int)((min_total + bytes - 1) / bytes);
    if (m->copies < 1) m->copies = 1;
    m->data = (char *)xmalloc(bytes * (size_t)m->copies);
    fill_weights(m->data, type, (size_t)(R * C));
    for (int c = 1; c < m->copies; c++) memcpy(m->data + bytes * (size_t)c, m->data, bytes);
    const int64_t nbr = (R + 127) / 128, nbc = (C + 127) / 128;
    m->scale = (float *)xmalloc((size_t)(nbr * nbc) * 4);
    for (int64_t i = 0; i < nbr * nbc; i++) m->scale[i] = 0.01f + 0.001f * (float)(i % 7);
    m->w = (dsmoe__wmat *)malloc(sizeof(dsmoe__wmat) * (size_t)m->copies);
    for (int c = 0; c < m->copies; c++) {
        dsmoe__wmat w = {m->data + bytes * (size_t)c, m->scale, R, C, 128, 128, type};
        m->w[c] = w;
    }
}

static void mats_free(bench_mats *m) {
    dsmoe_free(m->data);
    dsmoe_free(m->scale);
    free(m->w);
}

static double cpu_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* A streaming read of the bytes of one copy, split over nt threads (as the product
 * splits its rows). */
static void read_copy(const char *p, size_t bytes, int nt) {
    (void)nt; /* unused without OpenMP */
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int id = 0, n = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        const size_t nf = bytes / 4 / 64 * 64, part = nf / (size_t)n / 64 * 64;
        bench_read_seconds((const float *)(const void *)p + (size_t)id * part,
                           id + 1 == n ? nf - (size_t)id * part : part);
    }
}

typedef struct timing {
    double wall, cpu, read; /* best seconds: the product (wall, thread CPU), the plain read */
} timing;

/* One product of T tokens, best of reps, cycling over the copies; with read_ref, each
 * repetition also reads another copy's bytes (the same-run bandwidth reference). */
static timing time_wlinear(const bench_mats *m, const float *x, float *y, int64_t T, int nt, int reps,
                           void *scratch, int read_ref) {
    timing b = {1e30, 1e30, 1e30};
    const size_t bytes = (size_t)(m->w[0].rows * m->w[0].cols) * (size_t)ESZ[m->w[0].type];
    dsmoe__wlinear(y, m->w[0].rows, x, m->w[0].cols, T, &m->w[0], nt, scratch); /* warm-up */
    for (int r = 0; r < reps; r++) {
        const dsmoe__wmat *w = &m->w[(2 * r + 1) % m->copies];
        double s = bench_now(), c = cpu_now();
        dsmoe__wlinear(y, w->rows, x, w->cols, T, w, nt, scratch);
        c = cpu_now() - c;
        s = bench_now() - s;
        b.wall = s < b.wall ? s : b.wall;
        b.cpu = c < b.cpu ? c : b.cpu;
        if (read_ref) {
            const char *p = (const char *)m->w[(2 * r + 2) % m->copies].data;
            s = bench_now();
            read_copy(p, bytes, nt);
            s = bench_now() - s;
            b.read = s < b.read ? s : b.read;
        }
    }
    return b;
}

/* The FMA loop of bench_machine.h in short bursts (about 1 ms), best of reps, by thread
 * CPU time (one thread): GFLOP/s. */
static double fma_peak_cpu(int reps) {
    double best = 1e30;
    const long iters = 60000;
    volatile float sink = 0;
    for (int r = 0; r < reps; r++) {
        double c = cpu_now();
        sink = sink + bench_fma_loop512(iters);
        c = cpu_now() - c;
        best = c < best ? c : best;
    }
    (void)sink;
    return BENCH_FMA_FLOPS512 * (double)iters / best * 1e-9;
}

/* BLIS SGEMM y = x · W32ᵀ, the rows split in nt contiguous parts, one call per thread. */
static double time_sgemm(const float *W32, int64_t R, int64_t C, const float *x, float *y, int64_t T, int nt,
                         int reps) {
    double b = 1e30;
    for (int r = 0; r <= reps; r++) {
        double s = bench_now();
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
        for (int p = 0; p < nt; p++) {
            const int64_t r0 = R * p / nt, r1 = R * (p + 1) / nt;
            dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, (int)T, (int)(r1 - r0), (int)C, 1.0f, x, (int)C,
                         W32 + r0 * C, (int)C, 0.0f, y + r0, (int)R);
        }
        s = bench_now() - s;
        if (r > 0 && s < b) b = s;
    }
    return b;
}

static void run_moe(const bench_machine *mach, const int *th, int nth, int repeat) {
    const int D = 2048, F = 1408, E = 64, K = 6, ns = 2;
    dsmoe_moe_config c;
    dsmoe_moe_config_default(&c);
    dsmoe_router_preset("moonlight", &c.router);
    c.router.n_experts = E;
    c.router.n_groups = 1;
    c.router.topk_groups = 1;
    c.router.top_k = K;
    c.hidden_size = D;
    c.expert_size = F;
    c.n_shared = ns;
    c.train = 0;
    c.weight_dtype = DSMOE_DTYPE_BF16;
    c.weight_layout = DSMOE_MOE_LAYOUT_PACKED;
    c.max_tokens = 1;
    c.n_threads = th[nth - 1];
    dsmoe_moe *m = NULL;
    if (dsmoe_moe_create(&c, &m) != DSMOE_OK) {
        fprintf(stderr, "bench_wlinear: %s\n", dsmoe_last_error());
        exit(1);
    }
    dsmoe_moe_init_random(m, 42);
    const int reps = 50 * repeat;
    float *x = (float *)xmalloc((size_t)D * 4 * (size_t)(reps + 1)), y[2048];
    for (size_t j = 0; j < (size_t)D * (size_t)(reps + 1); j++) x[j] = randn();
    /* active bytes of one token: the gate (E, D) + K routed and ns shared experts, bf16 */
    const double active = (double)E * D * 2 + (double)(K + ns) * 3.0 * F * D * 2;
    /* the same-run reference: a streaming read of as many bytes, from a buffer of 4 times
     * that, interleaved with the forwards */
    const size_t rbytes = (size_t)active / 256 * 256;
    char *rbuf = (char *)xmalloc(4 * rbytes);
    memset(rbuf, 1, 4 * rbytes);
    for (int j = 0; j < nth; j++) {
        double b = 1e30, rb = 1e30;
        for (int r = 0; r <= reps; r++) {
            double s = bench_now();
            if (dsmoe_moe_forward(m, y, x + (size_t)r * D, 1, th[j]) != DSMOE_OK) {
                fprintf(stderr, "bench_wlinear: %s\n", dsmoe_last_error());
                exit(1);
            }
            s = bench_now() - s;
            if (r > 0 && s < b) b = s;
            s = bench_now();
            read_copy(rbuf + (size_t)(r % 4) * rbytes, rbytes, th[j]);
            s = bench_now() - s;
            if (s < rb) rb = s;
        }
        const double bw = th[j] > 1 ? mach->read_n : mach->read_1;
        printf("| %d | %.3f | %.1f | %.0f%% | %.1f | %.0f%% |\n", th[j], b * 1e3, active / b * 1e-9,
               100.0 * active / b / bw, (double)rbytes / rb * 1e-9, 100.0 * rb / b);
    }
    dsmoe_free(rbuf);
    dsmoe_free(x);
    dsmoe_moe_free(m);
}

int main(int argc, char **argv) {
    int repeat = 5, quick = 0;
    const char *threads_arg = "1,2";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--repeat") && i + 1 < argc) repeat = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads_arg = argv[++i];
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else {
            fprintf(stderr, "usage: bench_wlinear [--repeat 5] [--threads 1,2] [--quick]\n");
            return 2;
        }
    }
    if (repeat < 1) repeat = 1;
    int th[8], nth = 0;
    for (const char *p = threads_arg; *p && nth < 8;) {
        th[nth] = atoi(p);
        if (th[nth] < 1) {
            fprintf(stderr, "bench_wlinear: --threads takes counts >= 1\n");
            return 2;
        }
        nth++;
        p = strchr(p, ',');
        if (!p) break;
        p++;
    }
    if (nth == 0) th[nth++] = 1;
    const int maxth = th[nth - 1];
    bench_machine mach;
    bench_machine_measure(&mach, maxth, (size_t)1 << 30);
    bench_machine_print(stdout, &mach, dsmoe_isa());
    printf("BLIS kernels: %s\n\n", dsmoe__blas_kernels());

    /* decode: T = 1 */
    const int64_t dshape[][2] = {{2048, 2048}, {1408, 2048}, {4096, 2048}, {32000, 2048}};
    const int nds = quick ? 2 : 4;
    printf("Shares: of the header's figure and of a plain streaming read of the same bytes\n"
           "interleaved with the products (the same-run reference on a busy machine).\n\n");
    printf("| decode T = 1 | rows x cols | threads | ms | weights GB/s | %% of read bandwidth | same-bytes read GB/s | %% of it |\n|---|---|---|---|---|---|---|---|\n");
    float *x = (float *)xmalloc((size_t)256 * 2048 * 4), *y = (float *)xmalloc((size_t)256 * 32000 * 4);
    for (size_t i = 0; i < (size_t)256 * 2048; i++) x[i] = randn();
    for (int ty = 0; ty < 4; ty++)
        for (int s = 0; s < nds; s++) {
            const int64_t R = dshape[s][0], C = dshape[s][1];
            bench_mats m;
            mats_make(&m, (dsmoe__wtype)ty, R, C, (size_t)512 << 20);
            const double bytes = (double)(R * C) * ESZ[ty];
            for (int j = 0; j < nth; j++) {
                const timing tm = time_wlinear(&m, x, y, 1, th[j], 20 * repeat, NULL, 1);
                const double bw = th[j] > 1 ? mach.read_n : mach.read_1;
                printf("| %s | %lld x %lld | %d | %.3f | %.1f | %.0f%% | %.1f | %.0f%% |\n", TYPE_NAME[ty],
                       (long long)R, (long long)C, th[j], tm.wall * 1e3, bytes / tm.wall * 1e-9,
                       100.0 * bytes / tm.wall / bw, bytes / tm.read * 1e-9, 100.0 * tm.read / tm.wall);
            }
            fflush(stdout);
            mats_free(&m);
        }

    /* prompt: T = 256 */
    const int64_t T = 256;
    const int64_t pshape[][2] = {{2048, 2048}, {1408, 2048}, {2816, 2048}};
    const int nps = quick ? 2 : 3;
    const size_t per = dsmoe__wlinear_scratch(2048, T);
    void *scratch = dsmoe_malloc(per * (size_t)maxth);
    const double peak_cpu = fma_peak_cpu(200);
    printf("\nOne-thread figures also by thread CPU time (not counting time the thread was\n"
           "descheduled), against the FMA loop timed the same way: %.1f GFLOP/s.\n", peak_cpu);
    printf("\n| prompt T = 256 | rows x cols | threads | ms | GFLOP/s | %% of FMA peak | BLIS SGEMM (fp32) GFLOP/s | vs SGEMM | CPU-time GFLOP/s | %% of CPU-time peak |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (int ty = 0; ty < 4; ty++)
        for (int s = 0; s < nps; s++) {
            const int64_t R = pshape[s][0], C = pshape[s][1];
            bench_mats m;
            mats_make(&m, (dsmoe__wtype)ty, R, C, 0);
            float *W32 = (float *)xmalloc((size_t)(R * C) * 4);
            dsmoe__wmat_widen(W32, &m.w[0], 0, R);
            const double flops = 2.0 * (double)T * (double)R * (double)C;
            for (int j = 0; j < nth; j++) {
                const timing tm = time_wlinear(&m, x, y, T, th[j], repeat, scratch, 0);
                const double sg = time_sgemm(W32, R, C, x, y, T, th[j], repeat);
                const double peak = th[j] > 1 ? (mach.fma512_n > 0 ? mach.fma512_n : mach.fma256_n)
                                              : (mach.fma512_1 > 0 ? mach.fma512_1 : mach.fma256_1);
                printf("| %s | %lld x %lld | %d | %.3f | %.1f | %.0f%% | %.1f | %.2fx |", TYPE_NAME[ty],
                       (long long)R, (long long)C, th[j], tm.wall * 1e3, flops / tm.wall * 1e-9,
                       100.0 * flops / tm.wall * 1e-9 / peak, flops / sg * 1e-9, sg / tm.wall);
                if (th[j] == 1)
                    printf(" %.1f | %.0f%% |\n", flops / tm.cpu * 1e-9, 100.0 * flops / tm.cpu * 1e-9 / peak_cpu);
                else
                    printf(" - | - |\n");
            }
            fflush(stdout);
            dsmoe_free(W32);
            mats_free(&m);
        }
    dsmoe_free(scratch);
    dsmoe_free(x);
    dsmoe_free(y);

    printf("\nMoE layer decode, T = 1: bf16 packed weights, D 2048, 64 experts of 1408, top-6, 2 shared;\n"
           "active weights per token: the gate and 8 experts' three matrices (all bf16).\n\n");
    printf("| threads | ms per token | active weights GB/s | %% of read bandwidth | same-bytes read GB/s | %% of it |\n|---|---|---|---|---|---|\n");
    run_moe(&mach, th, nth, repeat);
    return 0;
}
