/*
 * bench_common.h — what the C benchmarks share: a monotonic clock, an allocation that
 * exits on failure, and (from bench_machine.h) the machine's header: the CPU, the FMA
 * peak and the read bandwidth that the figures are reported as shares of.
 */
#ifndef DSMOE_BENCH_COMMON_H
#define DSMOE_BENCH_COMMON_H

#include "bench_machine.h"
#include "dsmoe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static inline double bench_now(void) { return bench_machine_now(); }

static inline void *bench_malloc(const char *prog, size_t n) {
    void *p = dsmoe_malloc(n);
    if (!p) {
        fprintf(stderr, "%s: out of memory (%zu bytes)\n", prog, n);
        exit(1);
    }
    return p;
}

/* The benchmarks' token ids, as the PyTorch twins (model_torch.py, train_torch.py) draw
 * them: a 64-bit LCG from seed, id = (x >> 33) % V. */
static inline void bench_tokens(int32_t *out, int64_t n, int32_t V, uint64_t seed) {
    uint64_t x = seed;
    for (int64_t i = 0; i < n; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        out[i] = (int32_t)((x >> 33) % (uint64_t)V);
    }
}

/* Parses a comma-separated list of thread counts ("1,2") into th[0 .. max-1]; returns the
 * count, or -1 (after a message naming prog) when an entry is not a number >= 1. */
static inline int bench_parse_threads(const char *prog, const char *arg, int *th, int max) {
    int n = 0;
    for (const char *p = arg; *p && n < max;) {
        th[n] = atoi(p);
        if (th[n] < 1) {
            fprintf(stderr, "%s: --threads takes counts >= 1, got '%s'\n", prog, arg);
            return -1;
        }
        n++;
        p = strchr(p, ',');
        if (!p) break;
        p++;
    }
    return n;
}

#endif
