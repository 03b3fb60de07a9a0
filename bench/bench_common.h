/*
 * bench_common.h — what the C benchmarks share: a monotonic clock, an allocation that
 * exits on failure, and one streaming read of a buffer (the memory-bandwidth reference
 * the weight-streaming figures are compared with).
 */
#ifndef DSMOE_BENCH_COMMON_H
#define DSMOE_BENCH_COMMON_H

#include "dsmoe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline double bench_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static inline void *bench_malloc(const char *prog, size_t n) {
    void *p = dsmoe_malloc(n);
    if (!p) {
        fprintf(stderr, "%s: out of memory (%zu bytes)\n", prog, n);
        exit(1);
    }
    return p;
}

/* Seconds to read n floats (a multiple of 64) once: 4 independent 16-lane sums. */
typedef float bench_v16 __attribute__((vector_size(64)));
static inline double bench_read_seconds(const float *buf, size_t n) {
    bench_v16 a = {0}, b = {0}, c = {0}, d = {0};
    double t = bench_now();
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
    t = bench_now() - t;
    bench_v16 s = a + b + c + d;
    volatile float sink = s[0];
    (void)sink;
    return t;
}

#endif
