/*
 * pages.c — page-aligned allocations whose parts can be handed back to the system
 * (dsmoe__pages_*, core/internal.h): an expert-parallel training rank keeps only its own
 * experts' pages of the parameter, gradient and moment arrays resident.
 */
/* MAP_ANONYMOUS and madvise, which glibc declares only with _DEFAULT_SOURCE. */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif
#include "core/internal.h"

#include <stdlib.h>
#include <string.h>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#if defined(MAP_ANONYMOUS) && defined(MADV_DONTNEED)
#define DSMOE__HAVE_PAGES 1
#endif
#endif

size_t dsmoe__page_size(void) {
#ifdef DSMOE__HAVE_PAGES
    long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? (size_t)p : 4096u;
#else
    return 4096u;
#endif
}

void dsmoe__pages_huge(void *p, size_t bytes) {
#if defined(DSMOE__HAVE_PAGES) && defined(MADV_HUGEPAGE)
    if (p) madvise(p, bytes, MADV_HUGEPAGE); /* advice only: a refusal changes nothing */
#else
    (void)p;
    (void)bytes;
#endif
}

void *dsmoe__pages_alloc(size_t bytes, int huge) {
    if (bytes == 0) bytes = 1;
#ifdef DSMOE__HAVE_PAGES
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    if (huge) dsmoe__pages_huge(p, bytes);
    return p;
#else
    (void)huge;
    const size_t ps = dsmoe__page_size(), n = (bytes + ps - 1) / ps * ps;
    if (n < bytes) return NULL;
    void *p = aligned_alloc(ps, n);
    if (p) memset(p, 0, n);
    return p;
#endif
}

void dsmoe__pages_free(void *p, size_t bytes) {
    if (!p) return;
    if (bytes == 0) bytes = 1;
#ifdef DSMOE__HAVE_PAGES
    munmap(p, bytes);
#else
    free(p);
#endif
}

void dsmoe__pages_release(void *base, size_t off, size_t len) {
#ifdef DSMOE__HAVE_PAGES
    const size_t ps = dsmoe__page_size();
    const size_t a = (off + ps - 1) / ps * ps, b = (off + len) / ps * ps;
    if (!base || b <= a) return;
#ifdef MADV_NOHUGEPAGE
    /* and keeps them out of transparent huge pages, which a write next to the range
     * would otherwise fault in whole (2 MiB) or khugepaged collapse */
    madvise((char *)base + a, b - a, MADV_NOHUGEPAGE);
#endif
    madvise((char *)base + a, b - a, MADV_DONTNEED);
#else
    (void)base;
    (void)off;
    (void)len;
#endif
}
