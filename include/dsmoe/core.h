/*
 * dsmoe/core.h — versions, status codes, error reporting, dtypes, array views.
 *
 * Every fallible dsmoe function returns a dsmoe_status. DSMOE_OK is 0; any other
 * value is an error, named by dsmoe_strerror(), with a human-readable detail
 * (naming the bad field, token, tensor or file offset) in dsmoe_last_error(),
 * which is thread-local and valid until the next failing dsmoe call on the same
 * thread. The library never prints, exits or aborts.
 */
#ifndef DSMOE_CORE_H
#define DSMOE_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DSMOE_VERSION_MAJOR 0
#define DSMOE_VERSION_MINOR 1
#define DSMOE_VERSION_PATCH 0
#define DSMOE_VERSION_STRING "0.1.0"
/* Single integer for compile-time comparisons: major*10000 + minor*100 + patch. */
#define DSMOE_VERSION_NUMBER \
    (DSMOE_VERSION_MAJOR * 10000 + DSMOE_VERSION_MINOR * 100 + DSMOE_VERSION_PATCH)

#if defined(_WIN32) && defined(DSMOE_SHARED_BUILD)
#define DSMOE_API __declspec(dllexport)
#elif defined(__GNUC__)
#define DSMOE_API __attribute__((visibility("default")))
#else
#define DSMOE_API
#endif

/* Run-time version, "MAJOR.MINOR.PATCH"; compare with DSMOE_VERSION_STRING to
 * detect a header/library mismatch. */
DSMOE_API const char *dsmoe_version(void);
DSMOE_API int dsmoe_version_number(void);

/* Status codes: X(NAME, value, description). */
#define DSMOE_STATUS_LIST(X)                                                   \
    X(OK, 0, "success")                                                        \
    X(INVALID_ARGUMENT, 1, "invalid argument")                                 \
    X(INVALID_CONFIG, 2, "invalid configuration")                              \
    X(SHAPE_MISMATCH, 3, "shape mismatch")                                     \
    X(NON_FINITE, 4, "non-finite value in input")                              \
    X(OUT_OF_MEMORY, 5, "out of memory")                                       \
    X(WORKSPACE_TOO_SMALL, 6, "workspace too small")                           \
    X(IO, 7, "input/output error")                                             \
    X(FORMAT, 8, "malformed or unsupported file format")                       \
    X(NOT_FOUND, 9, "not found")                                               \
    X(UNSUPPORTED, 10, "unsupported operation")                                \
    X(INTERNAL, 11, "internal error")

typedef enum dsmoe_status {
#define DSMOE__STATUS_ENUM(name, value, text) DSMOE_STATUS_##name = (value),
    DSMOE_STATUS_LIST(DSMOE__STATUS_ENUM)
#undef DSMOE__STATUS_ENUM
} dsmoe_status;

/* Short alias for the success value. */
#define DSMOE_OK DSMOE_STATUS_OK

/* Static description of a status ("invalid configuration"); never NULL. */
DSMOE_API const char *dsmoe_strerror(dsmoe_status status);
/* Status name without prefix ("INVALID_CONFIG"); never NULL. */
DSMOE_API const char *dsmoe_status_name(dsmoe_status status);
/* Detail of the last error on this thread (empty string if none); never NULL. */
DSMOE_API const char *dsmoe_last_error(void);
/* Clears the thread's last error message. */
DSMOE_API void dsmoe_clear_error(void);

/* Element types of arrays and tensors. BF16 and F16 are stored as raw 16-bit words. */
typedef enum dsmoe_dtype {
    DSMOE_DTYPE_F32 = 0,
    DSMOE_DTYPE_I32 = 1,
    DSMOE_DTYPE_BF16 = 2,
    DSMOE_DTYPE_F16 = 3,
    DSMOE_DTYPE_F64 = 4,
    DSMOE_DTYPE_I64 = 5,
    DSMOE_DTYPE_U8 = 6,
    DSMOE_DTYPE_COUNT_ = 7
} dsmoe_dtype;

/* Size in bytes of one element (0 for an invalid dtype). */
DSMOE_API size_t dsmoe_dtype_size(dsmoe_dtype dtype);
/* Name as in safetensors ("F32", "BF16", ...); "?" for an invalid dtype. */
DSMOE_API const char *dsmoe_dtype_name(dsmoe_dtype dtype);

#define DSMOE_MAX_DIMS 8

/* An n-dimensional, C-ordered (row-major) array. When returned by a reader, `data`
 * is owned by the array and released with dsmoe_array_free(). */
typedef struct dsmoe_array {
    dsmoe_dtype dtype;
    int32_t ndim;
    int64_t shape[DSMOE_MAX_DIMS];
    void *data;
    size_t nbytes;
} dsmoe_array;

/* Number of elements (product of the shape; 1 for ndim == 0). */
DSMOE_API int64_t dsmoe_array_numel(const dsmoe_array *a);
/* Allocates a zeroed array (64-byte aligned). Returns OUT_OF_MEMORY or
 * INVALID_ARGUMENT (bad dtype, ndim, negative or overflowing shape). */
DSMOE_API dsmoe_status dsmoe_array_alloc(dsmoe_array *a, dsmoe_dtype dtype, int32_t ndim,
                                         const int64_t *shape);
/* Frees the data of an array made by dsmoe_array_alloc or a reader, and zeroes
 * the struct. NULL and already-freed arrays are harmless. */
DSMOE_API void dsmoe_array_free(dsmoe_array *a);

/* bf16 <-> fp32. Conversion to bf16 rounds to nearest even; NaN stays NaN. */
DSMOE_API uint16_t dsmoe_f32_to_bf16(float x);
DSMOE_API float dsmoe_bf16_to_f32(uint16_t h);
/* IEEE half <-> fp32 (round to nearest even). */
DSMOE_API uint16_t dsmoe_f32_to_f16(float x);
DSMOE_API float dsmoe_f16_to_f32(uint16_t h);

/* Aligned allocation (64 bytes) used for workspaces; free with dsmoe_free. From 4 MiB on
 * the buffer is aligned to 2 MiB and asks for transparent huge pages where the system
 * has them (Linux madvise MADV_HUGEPAGE): what a training step streams through its
 * workspaces and activations then costs far fewer page-table walks. */
DSMOE_API void *dsmoe_malloc(size_t nbytes);
DSMOE_API void dsmoe_free(void *p);

/* Name of the kernel set chosen at run time: "avx512", "avx2" or "ref". Setting
 * the environment variable DSMOE_FORCE_REF=1 before the first dsmoe call forces
 * "ref". dsmoe_set_isa() overrides it ("ref", "avx2", "avx512", or NULL for the
 * automatic choice); it returns UNSUPPORTED if the CPU lacks the ISA. Not
 * thread-safe: call it before starting work. */
DSMOE_API const char *dsmoe_isa(void);
DSMOE_API dsmoe_status dsmoe_set_isa(const char *name);

/* Largest number of routed experts (E) any dsmoe config, file or command accepts. */
#define DSMOE_MAX_EXPERTS 65536

/* ---------------------------------------------------------- random numbers -- */
/* splitmix64 (Steele, Lea & Flood, 2014): one 64-bit state, each call adds the golden
 * gamma and mixes. Deterministic on every platform; not for cryptography. The state
 * is plain data: copy it to fork a stream, store it to resume one. */
typedef struct dsmoe_rng {
    uint64_t state;
} dsmoe_rng;
/* state = seed · 0x2545F4914F6CDD1D + 7 (so that nearby seeds give unrelated streams). */
DSMOE_API void dsmoe_rng_seed(dsmoe_rng *r, uint64_t seed);
/* The next 64 random bits. */
DSMOE_API uint64_t dsmoe_rng_next(dsmoe_rng *r);
/* Uniform on [0, 1) with 53 random bits. */
DSMOE_API double dsmoe_rng_uniform(dsmoe_rng *r);
/* Standard normal (Box–Muller, one draw per call, two uniforms each). */
DSMOE_API double dsmoe_rng_normal(dsmoe_rng *r);

/* Number of threads used when a function is given n_threads <= 0. */
DSMOE_API int dsmoe_default_threads(void);

#ifdef __cplusplus
}
#endif
#endif /* DSMOE_CORE_H */
