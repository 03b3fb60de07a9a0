/*
 * bench_machine.h — what every benchmark measures of the machine it runs on, so that its
 * figures mean the same on every machine: the CPU (model name, family / model /
 * stepping and the microarchitecture they imply, AVX2 / AVX-512F), the FMA peak (a loop
 * of independent fp32 FMA chains held in registers, AVX-512 and AVX2, for one thread and
 * for N threads) and the read bandwidth (a streaming sum of a buffer far larger than the
 * caches). Figures are then reported as shares of these next to the library references
 * (SGEMM, PyTorch), which on their own depend on what the reference's build does on the
 * machine (e.g. OpenBLAS 0.3.21 runs its AVX2 kernels on Zen 4 and Zen 5 alike).
 *
 * Header only and independent of the library (standard C, <cpuid.h>, intrinsics under
 * target attributes), so that both bench/ and the CLI's `dsmoe bench` use it; nothing
 * here exits or prints unless asked to.
 */
#ifndef DSMOE_BENCH_MACHINE_H
#define DSMOE_BENCH_MACHINE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define BENCH_X86 1
#else
#define BENCH_X86 0
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

static inline double bench_machine_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ------------------------------------------------------------------- CPU -- */

typedef struct bench_cpu {
    char vendor[16];  /* "AuthenticAMD", "GenuineIntel", ... */
    char name[64];    /* the brand string (a VM may show only "AMD EPYC") */
    int family;       /* display family: base + extended */
    int model;        /* display model: base + extended << 4 */
    int stepping;
    const char *uarch; /* the microarchitecture the family/model imply, or "unknown" */
    int avx2, avx512f;
} bench_cpu;

/* AMD's family 0x19 holds Zen 3 and Zen 4; 0x1A is Zen 5. Zen 4 runs 512-bit operations
 * on 256-bit units (two passes each); Zen 5 (server parts) has full-width units. */
static inline const char *bench_uarch(const char *vendor, int family, int model) {
    if (strcmp(vendor, "AuthenticAMD") != 0) return "unknown";
    if (family == 0x1A) return "Zen 5";
    if (family == 0x19) {
        if ((model >= 0x10 && model <= 0x1F) || (model >= 0x60 && model <= 0x7F) ||
            (model >= 0xA0 && model <= 0xAF))
            return "Zen 4";
        return "Zen 3";
    }
    if (family == 0x17) return "Zen 1/2";
    return "unknown";
}

static inline void bench_cpu_identify(bench_cpu *c) {
    memset(c, 0, sizeof *c);
    strcpy(c->vendor, "unknown");
    strcpy(c->name, "unknown");
    c->uarch = "unknown";
#if BENCH_X86
    unsigned a = 0, b = 0, cc = 0, d = 0;
    if (__get_cpuid(0, &a, &b, &cc, &d)) {
        memcpy(c->vendor, &b, 4);
        memcpy(c->vendor + 4, &d, 4);
        memcpy(c->vendor + 8, &cc, 4);
        c->vendor[12] = 0;
    }
    if (__get_cpuid(1, &a, &b, &cc, &d)) {
        int base_f = (int)((a >> 8) & 0xF), base_m = (int)((a >> 4) & 0xF);
        c->stepping = (int)(a & 0xF);
        c->family = base_f == 0xF ? base_f + (int)((a >> 20) & 0xFF) : base_f;
        c->model = base_f == 0xF || base_f == 0x6 ? base_m + (int)(((a >> 16) & 0xF) << 4) : base_m;
    }
    unsigned brand[12] = {0};
    if (__get_cpuid(0x80000000u, &a, &b, &cc, &d) && a >= 0x80000004u) {
        for (unsigned i = 0; i < 3; i++)
            __get_cpuid(0x80000002u + i, &brand[4 * i], &brand[4 * i + 1], &brand[4 * i + 2],
                        &brand[4 * i + 3]);
        char s[49];
        memcpy(s, brand, 48);
        s[48] = 0;
        const char *p = s;
        while (*p == ' ') p++;
        size_t n = strlen(p);
        while (n > 0 && p[n - 1] == ' ') n--;
        if (n >= sizeof c->name) n = sizeof c->name - 1;
        memcpy(c->name, p, n);
        c->name[n] = 0;
    }
    __builtin_cpu_init();
    c->avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    c->avx512f = __builtin_cpu_supports("avx512f");
    c->uarch = bench_uarch(c->vendor, c->family, c->model);
#endif
}

/* ------------------------------------------------------------- FMA peak -- */

/* `iters` steps of independent FMA chains kept in registers (enough of them to cover
 * the FMA latency times the number of FMA units: 16 of 512 bits, 12 of 256 bits, since
 * AVX2 has 16 registers); returns the sum so that nothing is optimised away. */
#if BENCH_X86
__attribute__((target("avx512f,fma"))) static inline float bench_fma_loop512(long iters) {
    const __m512 m = _mm512_set1_ps(0.999999f), a = _mm512_set1_ps(1e-7f);
    __m512 x0 = _mm512_set1_ps(1.0f), x1 = _mm512_set1_ps(1.1f), x2 = _mm512_set1_ps(1.2f),
           x3 = _mm512_set1_ps(1.3f), x4 = _mm512_set1_ps(1.4f), x5 = _mm512_set1_ps(1.5f),
           x6 = _mm512_set1_ps(1.6f), x7 = _mm512_set1_ps(1.7f), x8 = _mm512_set1_ps(1.8f),
           x9 = _mm512_set1_ps(1.9f), xa = _mm512_set1_ps(2.0f), xb = _mm512_set1_ps(2.1f),
           xc = _mm512_set1_ps(2.2f), xd = _mm512_set1_ps(2.3f), xe = _mm512_set1_ps(2.4f),
           xf = _mm512_set1_ps(2.5f);
    for (long i = 0; i < iters; i++) {
        x0 = _mm512_fmadd_ps(x0, m, a);
        x1 = _mm512_fmadd_ps(x1, m, a);
        x2 = _mm512_fmadd_ps(x2, m, a);
        x3 = _mm512_fmadd_ps(x3, m, a);
        x4 = _mm512_fmadd_ps(x4, m, a);
        x5 = _mm512_fmadd_ps(x5, m, a);
        x6 = _mm512_fmadd_ps(x6, m, a);
        x7 = _mm512_fmadd_ps(x7, m, a);
        x8 = _mm512_fmadd_ps(x8, m, a);
        x9 = _mm512_fmadd_ps(x9, m, a);
        xa = _mm512_fmadd_ps(xa, m, a);
        xb = _mm512_fmadd_ps(xb, m, a);
        xc = _mm512_fmadd_ps(xc, m, a);
        xd = _mm512_fmadd_ps(xd, m, a);
        xe = _mm512_fmadd_ps(xe, m, a);
        xf = _mm512_fmadd_ps(xf, m, a);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(x0, x1), _mm512_add_ps(x2, x3)),
                             _mm512_add_ps(_mm512_add_ps(x4, x5), _mm512_add_ps(x6, x7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(x8, x9), _mm512_add_ps(xa, xb)),
                                       _mm512_add_ps(_mm512_add_ps(xc, xd), _mm512_add_ps(xe, xf))));
    float out[16];
    _mm512_storeu_ps(out, s);
    return out[0];
}

__attribute__((target("avx2,fma"))) static inline float bench_fma_loop256(long iters) {
    const __m256 m = _mm256_set1_ps(0.999999f), a = _mm256_set1_ps(1e-7f);
    __m256 x0 = _mm256_set1_ps(1.0f), x1 = _mm256_set1_ps(1.1f), x2 = _mm256_set1_ps(1.2f),
           x3 = _mm256_set1_ps(1.3f), x4 = _mm256_set1_ps(1.4f), x5 = _mm256_set1_ps(1.5f),
           x6 = _mm256_set1_ps(1.6f), x7 = _mm256_set1_ps(1.7f), x8 = _mm256_set1_ps(1.8f),
           x9 = _mm256_set1_ps(1.9f), xa = _mm256_set1_ps(2.0f), xb = _mm256_set1_ps(2.1f);
    for (long i = 0; i < iters; i++) {
        x0 = _mm256_fmadd_ps(x0, m, a);
        x1 = _mm256_fmadd_ps(x1, m, a);
        x2 = _mm256_fmadd_ps(x2, m, a);
        x3 = _mm256_fmadd_ps(x3, m, a);
        x4 = _mm256_fmadd_ps(x4, m, a);
        x5 = _mm256_fmadd_ps(x5, m, a);
        x6 = _mm256_fmadd_ps(x6, m, a);
        x7 = _mm256_fmadd_ps(x7, m, a);
        x8 = _mm256_fmadd_ps(x8, m, a);
        x9 = _mm256_fmadd_ps(x9, m, a);
        xa = _mm256_fmadd_ps(xa, m, a);
        xb = _mm256_fmadd_ps(xb, m, a);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3)),
                             _mm256_add_ps(_mm256_add_ps(x4, x5), _mm256_add_ps(x6, x7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(x8, x9), _mm256_add_ps(xa, xb)));
    float out[8];
    _mm256_storeu_ps(out, s);
    return out[0];
}
#endif

/* FLOPs of one step of the loops above: chains × lanes × 2. */
#define BENCH_FMA_FLOPS512 (16.0 * 16.0 * 2.0)
#define BENCH_FMA_FLOPS256 (12.0 * 8.0 * 2.0)

/* fp32 GFLOP/s of the register-only FMA loop with 512-bit (wide = 1) or 256-bit vectors,
 * on `threads` threads at once (OpenMP; one thread without it), best of `reps` runs of
 * about 20 ms; 0 when the CPU lacks the ISA. */
static inline double bench_fma_peak_gflops(int wide, int threads, int reps) {
#if BENCH_X86
    __builtin_cpu_init();
    if (wide ? !__builtin_cpu_supports("avx512f") : !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
        return 0.0;
    const double per = wide ? BENCH_FMA_FLOPS512 : BENCH_FMA_FLOPS256;
    const long iters = 1500000; /* about 20 ms at 4 GHz, two FMA units */
    volatile float sink = 0.0f;
    double best = 0.0;
    if (threads < 1) threads = 1;
    for (int r = 0; r < reps; r++) {
        int n = 1; /* threads that ran */
        double t = bench_machine_now();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
        {
            float v = wide ? bench_fma_loop512(iters) : bench_fma_loop256(iters);
#ifdef _OPENMP
#pragma omp critical
            {
                sink = sink + v;
                n = omp_get_num_threads();
            }
#else
            sink = sink + v;
#endif
        }
        t = bench_machine_now() - t;
        const double g = per * (double)iters * (double)n / t * 1e-9;
        if (g > best) best = g;
    }
    (void)sink;
    return best;
#else
    (void)wide;
    (void)threads;
    (void)reps;
    return 0.0;
#endif
}

/* ------------------------------------------------------- read bandwidth -- */

/* Seconds to read n floats (a multiple of 64) once: 4 independent 16-lane sums. */
typedef float bench_v16 __attribute__((vector_size(64)));
static inline double bench_read_seconds(const float *buf, size_t n) {
    bench_v16 a = {0}, b = {0}, c = {0}, d = {0};
    double t = bench_machine_now();
    for (size_t i = 0; i + 64 <= n; i += 64) {
        bench_v16 x, y, z, w;
        memcpy(&x, buf + i, 64);
        memcpy(&y, buf + i + 16, 64);
        memcpy(&z, buf + i + 32, 64);
        memcpy(&w, buf + i + 48, 64);
        a += x;
        b += y;
        c += z;
        d += w;
    }
    t = bench_machine_now() - t;
    bench_v16 s = a + b + c + d;
    volatile float sink = s[0];
    (void)sink;
    return t;
}

/* Read bandwidth in bytes/s: `threads` threads (OpenMP) each summing its part of a
 * buffer of `bytes` (far larger than the caches), best of `reps`; 0 if the buffer
 * cannot be allocated. */
static inline double bench_read_bandwidth(size_t bytes, int threads, int reps) {
    size_t n = bytes / sizeof(float) / 64 * 64;
    if (threads < 1) threads = 1;
    float *buf = (float *)aligned_alloc(64, n * sizeof(float));
    if (!buf) return 0.0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i & 7);
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t = bench_machine_now();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
        {
            const size_t nt = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
            const size_t part = n / nt / 64 * 64;
            bench_read_seconds(buf + id * part, id + 1 == nt ? n - id * part : part);
        }
#else
        bench_read_seconds(buf, n);
#endif
        t = bench_machine_now() - t;
        if (t < best) best = t;
    }
    free(buf);
    return (double)n * sizeof(float) / best;
}

/* ------------------------------------------------------------- the header -- */

typedef struct bench_machine {
    bench_cpu cpu;
    int threads;
    double fma512_1, fma256_1; /* GFLOP/s, one thread (0: no such ISA) */
    double fma512_n, fma256_n; /* the same on `threads` threads */
    double read_1, read_n;     /* read bandwidth, bytes/s, one and `threads` threads */
} bench_machine;

/* Measures everything above, best of 5 FMA runs and 3 reads (about 0.5 s per thread
 * count; a buffer of `bw_bytes` for the bandwidth). */
static inline void bench_machine_measure(bench_machine *m, int threads, size_t bw_bytes) {
    memset(m, 0, sizeof *m);
    bench_cpu_identify(&m->cpu);
    m->threads = threads < 1 ? 1 : threads;
    m->fma512_1 = bench_fma_peak_gflops(1, 1, 5);
    m->fma256_1 = bench_fma_peak_gflops(0, 1, 5);
    m->read_1 = bench_read_bandwidth(bw_bytes, 1, 3);
    if (m->threads > 1) {
        m->fma512_n = bench_fma_peak_gflops(1, m->threads, 5);
        m->fma256_n = bench_fma_peak_gflops(0, m->threads, 5);
        m->read_n = bench_read_bandwidth(bw_bytes, m->threads, 3);
    } else {
        m->fma512_n = m->fma512_1;
        m->fma256_n = m->fma256_1;
        m->read_n = m->read_1;
    }
}

/* The FMA peak (GFLOP/s) the shares are taken of: the widest ISA the CPU has, on the
 * benchmark's thread count. */
static inline double bench_machine_peak(const bench_machine *m) {
    return m->fma512_n > 0 ? m->fma512_n : m->fma256_n;
}

/* One human-readable header of a few lines; `isa` is the kernel set the library chose. */
static inline void bench_machine_print(FILE *f, const bench_machine *m, const char *isa) {
    const bench_cpu *c = &m->cpu;
    fprintf(f, "CPU: %s (%s family 0x%X model 0x%X stepping %d: %s), AVX2 %s, AVX-512F %s; dsmoe kernels %s\n",
            c->name, c->vendor, (unsigned)c->family, (unsigned)c->model, c->stepping, c->uarch,
            c->avx2 ? "yes" : "no", c->avx512f ? "yes" : "no", isa ? isa : "?");
    fprintf(f, "FMA peak (register-only fp32 FMA loop), 1 thread: %.1f GFLOP/s AVX-512, %.1f AVX2", m->fma512_1,
            m->fma256_1);
    if (m->threads > 1)
        fprintf(f, "; %d threads: %.1f AVX-512, %.1f AVX2", m->threads, m->fma512_n, m->fma256_n);
    fprintf(f, "\nRead bandwidth (streaming sum), 1 thread: %.1f GB/s", m->read_1 * 1e-9);
    if (m->threads > 1) fprintf(f, "; %d threads: %.1f GB/s", m->threads, m->read_n * 1e-9);
    fprintf(f, "\n");
}

/* The same as JSON members (no braces), for the scripts that build the tables. */
static inline void bench_machine_json(FILE *f, const bench_machine *m, const char *isa) {
    const bench_cpu *c = &m->cpu;
    fprintf(f,
            "\"cpu_name\": \"%s\", \"cpu_vendor\": \"%s\", \"cpu_family\": %d, \"cpu_model\": %d, "
            "\"cpu_stepping\": %d, \"uarch\": \"%s\", \"avx2\": %s, \"avx512f\": %s, \"isa\": \"%s\", "
            "\"machine_threads\": %d, \"fma_peak_avx512_gflops\": %.3f, \"fma_peak_avx2_gflops\": %.3f, "
            "\"fma_peak_avx512_gflops_n\": %.3f, \"fma_peak_avx2_gflops_n\": %.3f, \"fma_peak_gflops\": %.3f, "
            "\"read_gb_per_s_1\": %.3f, \"read_gb_per_s_n\": %.3f",
            c->name, c->vendor, c->family, c->model, c->stepping, c->uarch, c->avx2 ? "true" : "false",
            c->avx512f ? "true" : "false", isa ? isa : "?", m->threads, m->fma512_1, m->fma256_1, m->fma512_n,
            m->fma256_n, bench_machine_peak(m), m->read_1 * 1e-9, m->read_n * 1e-9);
}

#endif /* DSMOE_BENCH_MACHINE_H */
