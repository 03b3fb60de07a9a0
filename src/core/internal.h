/*
 * internal.h — declarations shared by the library's translation units; not installed.
 * Internal non-static symbols use the dsmoe__ prefix.
 */
#ifndef DSMOE_INTERNAL_H
#define DSMOE_INTERNAL_H

#include "dsmoe/core.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define DSMOE__PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define DSMOE__PRINTF(a, b)
#endif

/* Records a formatted detail for dsmoe_last_error() and returns `status`. */
dsmoe_status dsmoe__error(dsmoe_status status, const char *fmt, ...) DSMOE__PRINTF(2, 3);

/* The expert histogram: counts[idx[i]] += 1 for i < n (accumulates; every idx[i] must
 * be a valid index into counts, which the caller has checked). */
void dsmoe__count_experts(int64_t *counts, const int32_t *idx, int64_t n);
/* Checks that every index of the (T, K) array `indices` in a token kept by `mask` (NULL:
 * all; mask[t] == 0 skips token t) lies in 0..E-1; INVALID_ARGUMENT naming `what`, the
 * first bad entry and its value otherwise. Returns the kept tokens in *n_kept (may be
 * NULL). Callers check first, then count, so that a bad index changes nothing. */
dsmoe_status dsmoe__check_indices(const int32_t *indices, const uint8_t *mask, int64_t T,
                                  int32_t K, int32_t E, const char *what, int64_t *n_kept);

/* Resolves a thread-count argument (<= 0 means the default). */
int dsmoe__threads(int n_threads);

/* Rounds up to a multiple of 64 bytes (workspace carving). */
static inline size_t dsmoe__align64(size_t n) { return (n + 63u) & ~(size_t)63u; }

/* Bump allocator over a caller's workspace: returns NULL when it runs out. */
typedef struct dsmoe__carver {
    char *base;
    size_t size;
    size_t used;
} dsmoe__carver;
static inline void *dsmoe__carve(dsmoe__carver *c, size_t nbytes) {
    size_t need = dsmoe__align64(nbytes);
    if (c->used > c->size || need > c->size - c->used) return NULL;
    void *p = c->base + c->used;
    c->used += need;
    return p;
}

/* Checked size arithmetic: returns 0 and leaves *out untouched on overflow. */
static inline int dsmoe__mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}

/* Page-aligned allocations (pages.c). dsmoe__pages_alloc: `bytes` of zeros, page-aligned,
 * in transparent huge pages where the system has them when `huge` (dsmoe__pages_huge),
 * whose pages become resident only when first written (anonymous mmap; elsewhere an
 * aligned, zeroed malloc, all of it resident); NULL when out of memory. Free with
 * dsmoe__pages_free and the same size. dsmoe__pages_release gives the whole pages inside
 * bytes [off, off + len) of such an allocation back to the system: they are no longer
 * resident and read as zeros afterwards (a no-op where the system has no madvise: the
 * values stay). The pages at the range's edges that it only partly covers are kept. */
size_t dsmoe__page_size(void);
void *dsmoe__pages_alloc(size_t bytes, int huge);
void dsmoe__pages_free(void *p, size_t bytes);
void dsmoe__pages_release(void *base, size_t off, size_t len);
/* Asks for transparent huge pages (2 MiB) over the whole 2 MiB pieces of [p, p + bytes)
 * (madvise MADV_HUGEPAGE; a no-op elsewhere). For the buffers a training step streams
 * through: with 4 KiB pages, writing a cold 256 KiB block of activations took 10-20
 * times as long as in a small program doing the same, and the default preset's step ran
 * about 5% slower. Not for memory that dsmoe__pages_release thins out. */
void dsmoe__pages_huge(void *p, size_t bytes);
/* Element loops compiled once per CPU level (GCC's target_clones on x86-64 Linux: AVX-512,
 * AVX2, baseline, chosen at load); the same operations in the same order on each, so the
 * same bits. Empty elsewhere. Check the clones' code for fused multiply-adds: GCC 12 turns
 * a loop over interleaved pairs that subtracts in one and adds in the other (a rotation's
 * x0·c − x1·s, x0·s + x1·c) into vfmaddsub even with -ffp-contract=off, which changes bits;
 * write such loops with intrinsics. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define DSMOE__CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DSMOE__CLONES
#endif
/* Σ a[i]·b[i] over i < n in 16 running sums (i into sum i mod 16), their halves then added
 * pairwise: 16 chains the compiler vectorises where one chain of n dependent adds was
 * bounded by the add latency. The RMSNorm forward's sum of squares and the MoE routing
 * weights' gradients (the layer's and the EP layer's: the same bits) (core.c). */
float dsmoe__dot16(const float *a, const float *b, size_t n);

/* dsmoe_malloc's threshold and alignment for huge pages */
#define DSMOE__HUGE_MIN ((size_t)4 << 20)
#define DSMOE__HUGE_ALIGN ((size_t)2 << 20)

#endif /* DSMOE_INTERNAL_H */
