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

#endif
