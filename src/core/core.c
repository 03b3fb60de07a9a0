/*
 * core.c — versions, status strings, thread-local error detail, dtypes, arrays,
 * aligned allocation, bf16/f16 conversion and thread defaults.
 */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

const char *dsmoe_version(void) { return DSMOE_VERSION_STRING; }
int dsmoe_version_number(void) { return DSMOE_VERSION_NUMBER; }

const char *dsmoe_strerror(dsmoe_status status) {
    switch (status) {
#define DSMOE__STATUS_TEXT(name, value, text) \
    case DSMOE_STATUS_##name:                 \
        return text;
        DSMOE_STATUS_LIST(DSMOE__STATUS_TEXT)
#undef DSMOE__STATUS_TEXT
    }
    return "unknown status";
}

const char *dsmoe_status_name(dsmoe_status status) {
    switch (status) {
#define DSMOE__STATUS_NAME(name, value, text) \
    case DSMOE_STATUS_##name:                 \
        return #name;
        DSMOE_STATUS_LIST(DSMOE__STATUS_NAME)
#undef DSMOE__STATUS_NAME
    }
    return "UNKNOWN";
}

static _Thread_local char dsmoe__last_error[1024];

const char *dsmoe_last_error(void) { return dsmoe__last_error; }
void dsmoe_clear_error(void) { dsmoe__last_error[0] = '\0'; }

dsmoe_status dsmoe__error(dsmoe_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dsmoe__last_error, sizeof dsmoe__last_error, fmt, ap);
    va_end(ap);
    return status;
}

size_t dsmoe_dtype_size(dsmoe_dtype dtype) {
    switch (dtype) {
    case DSMOE_DTYPE_F32:
    case DSMOE_DTYPE_I32: return 4;
    case DSMOE_DTYPE_BF16:
    case DSMOE_DTYPE_F16: return 2;
    case DSMOE_DTYPE_F64:
    case DSMOE_DTYPE_I64: return 8;
    case DSMOE_DTYPE_U8: return 1;
    default: return 0;
    }
}

const char *dsmoe_dtype_name(dsmoe_dtype dtype) {
    switch (dtype) {
    case DSMOE_DTYPE_F32: return "F32";
    case DSMOE_DTYPE_I32: return "I32";
    case DSMOE_DTYPE_BF16: return "BF16";
    case DSMOE_DTYPE_F16: return "F16";
    case DSMOE_DTYPE_F64: return "F64";
    case DSMOE_DTYPE_I64: return "I64";
    case DSMOE_DTYPE_U8: return "U8";
    default: return "?";
    }
}

int64_t dsmoe_array_numel(const dsmoe_array *a) {
    int64_t n = 1;
    for (int32_t i = 0; i < a->ndim; i++) n *= a->shape[i];
    return n;
}

dsmoe_status dsmoe_array_alloc(dsmoe_array *a, dsmoe_dtype dtype, int32_t ndim,
                               const int64_t *shape) {
    if (!a) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_array_alloc: NULL array");
    memset(a, 0, sizeof *a);
    size_t es = dsmoe_dtype_size(dtype);
    if (es == 0) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_array_alloc: bad dtype %d", (int)dtype);
    if (ndim < 0 || ndim > DSMOE_MAX_DIMS || (ndim > 0 && !shape))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_array_alloc: bad ndim %d", (int)ndim);
    size_t n = es;
    for (int32_t i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (uint64_t)shape[i] > ((uint64_t)1 << 40) ||
            !dsmoe__mul_size(n, (size_t)shape[i], &n))
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "dsmoe_array_alloc: bad or overflowing dimension %d (%lld)", (int)i,
                                (long long)shape[i]);
    }
    void *p = dsmoe_malloc(n ? n : 1);
    if (!p) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "dsmoe_array_alloc: %zu bytes", n);
    memset(p, 0, n ? n : 1);
    a->dtype = dtype;
    a->ndim = ndim;
    for (int32_t i = 0; i < ndim; i++) a->shape[i] = shape[i];
    a->data = p;
    a->nbytes = n;
    return DSMOE_OK;
}

void dsmoe_array_free(dsmoe_array *a) {
    if (!a) return;
    dsmoe_free(a->data);
    memset(a, 0, sizeof *a);
}

DSMOE__CLONES float dsmoe__dot16(const float *a, const float *b, size_t n) {
    float acc[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] = acc[l] + a[i + l] * b[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] = acc[l] + a[i] * b[i];
    for (int h = 8; h >= 1; h >>= 1)
        for (int l = 0; l < h; l++) acc[l] = acc[l] + acc[l + h];
    return acc[0];
}

void *dsmoe_malloc(size_t nbytes) {
    if (nbytes == 0) nbytes = 64;
    size_t n = dsmoe__align64(nbytes);
    if (n < nbytes) return NULL;
    if (n >= DSMOE__HUGE_MIN) { /* core.h: large buffers in huge pages */
        const size_t h = (n + DSMOE__HUGE_ALIGN - 1) & ~(DSMOE__HUGE_ALIGN - 1);
        void *p = h >= n ? aligned_alloc(DSMOE__HUGE_ALIGN, h) : NULL;
        if (p) dsmoe__pages_huge(p, h);
        return p;
    }
    return aligned_alloc(64, n);
}

void dsmoe_free(void *p) { free(p); }

static uint32_t dsmoe__f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}
static float dsmoe__bits_f32(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

uint16_t dsmoe_f32_to_bf16(float x) {
    uint32_t u = dsmoe__f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float dsmoe_bf16_to_f32(uint16_t h) { return dsmoe__bits_f32((uint32_t)h << 16); }

uint16_t dsmoe_f32_to_f16(float x) {
    uint32_t u = dsmoe__f32_bits(x);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t ax = u & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow (>= 65520) -> inf */
    if (ax < 0x38800000u) { /* subnormal or zero in half */
        if (ax < 0x33000000u) return (uint16_t)sign;             /* < 2^-25 rounds to 0 */
        uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(ax >> 23); /* 14..24 */
        uint32_t half = mant >> (shift);
        uint32_t rem = mant & ((1u << shift) - 1u);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1u))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = ((ax >> 13) - (112u << 10));
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

float dsmoe_f16_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t e = ((uint32_t)h >> 10) & 0x1fu;
    uint32_t m = (uint32_t)h & 0x3ffu;
    if (e == 0) {
        float v = ldexpf((float)m, -24);
        return sign ? -v : v;
    }
    if (e == 31) return dsmoe__bits_f32(sign | 0x7f800000u | (m << 13));
    return dsmoe__bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

int dsmoe_default_threads(void) {
#ifdef _OPENMP
    int n = omp_get_max_threads();
    return n > 0 ? n : 1;
#else
    return 1;
#endif
}

int dsmoe__threads(int n_threads) {
    if (n_threads > 0) return n_threads;
    return dsmoe_default_threads();
}

/* ---------------------------------------------------------- random numbers -- */

void dsmoe_rng_seed(dsmoe_rng *r, uint64_t seed) { r->state = seed * 0x2545f4914f6cdd1dull + 7; }

uint64_t dsmoe_rng_next(dsmoe_rng *r) {
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double dsmoe_rng_uniform(dsmoe_rng *r) { return (double)(dsmoe_rng_next(r) >> 11) * 0x1.0p-53; }

double dsmoe_rng_normal(dsmoe_rng *r) {
    /* u1 in (0, 1): the log never sees 0 */
    double u1 = ((double)(dsmoe_rng_next(r) >> 11) + 0.5) * 0x1.0p-53, u2 = dsmoe_rng_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ---------------------------------------------------------- histogram -- */

void dsmoe__count_experts(int64_t *counts, const int32_t *idx, int64_t n) {
    for (int64_t i = 0; i < n; i++) counts[idx[i]]++;
}

dsmoe_status dsmoe__check_indices(const int32_t *indices, const uint8_t *mask, int64_t T,
                                  int32_t K, int32_t E, const char *what, int64_t *n_kept) {
    int64_t n = 0;
    for (int64_t t = 0; t < T; t++) {
        if (mask && !mask[t]) continue;
        n++;
        for (int32_t k = 0; k < K; k++) {
            int32_t e = indices[t * K + k];
            if (e < 0 || e >= E)
                return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                    "%s: indices[%lld, %d] = %d outside 0..%d", what,
                                    (long long)t, (int)k, (int)e, (int)E - 1);
        }
    }
    if (n_kept) *n_kept = n;
    return DSMOE_OK;
}
