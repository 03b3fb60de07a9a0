/* dispatch.c — picks the kernel table once from the CPU features (or DSMOE_FORCE_REF). */
#include "core/internal.h"
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

static const dsmoe__kernel_table *dsmoe__active;

const dsmoe__kernel_table *dsmoe__kernels_named(const char *name) {
    if (!name) return NULL;
    if (strcmp(name, "ref") == 0) return &dsmoe__kernels_ref;
#if defined(DSMOE_HAVE_AVX512) && (defined(__x86_64__) || defined(__i386__))
    if (strcmp(name, "avx512") == 0) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") ? &dsmoe__kernels_avx512 : NULL;
    }
#endif
#if defined(DSMOE_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
    if (strcmp(name, "avx2") == 0) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? &dsmoe__kernels_avx2 : NULL;
    }
#endif
    return NULL;
}

static const dsmoe__kernel_table *dsmoe__choose(void) {
    const char *force = getenv("DSMOE_FORCE_REF");
    if (force && force[0] && strcmp(force, "0") != 0) return &dsmoe__kernels_ref;
    const dsmoe__kernel_table *k = dsmoe__kernels_named("avx512");
    if (!k) k = dsmoe__kernels_named("avx2");
    return k ? k : &dsmoe__kernels_ref;
}

const dsmoe__kernel_table *dsmoe__kernels(void) {
    const dsmoe__kernel_table *k = __atomic_load_n(&dsmoe__active, __ATOMIC_ACQUIRE);
    if (!k) {
        k = dsmoe__choose();
        __atomic_store_n(&dsmoe__active, k, __ATOMIC_RELEASE);
    }
    return k;
}

const char *dsmoe_isa(void) { return dsmoe__kernels()->name; }

dsmoe_status dsmoe_set_isa(const char *name) {
    const dsmoe__kernel_table *k = name ? dsmoe__kernels_named(name) : dsmoe__choose();
    if (!k)
        return dsmoe__error(DSMOE_STATUS_UNSUPPORTED,
                            "dsmoe_set_isa: '%s' is not available on this CPU or build (use ref, avx2, avx512)",
                            name);
    __atomic_store_n(&dsmoe__active, k, __ATOMIC_RELEASE);
    return DSMOE_OK;
}
