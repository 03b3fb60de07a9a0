/*
 * dsmoe/io.h — NumPy .npy arrays and safetensors files.
 *
 * Readers validate everything they are given: a truncated, oversized or hostile
 * file yields DSMOE_STATUS_FORMAT (or IO) with a message naming the problem and
 * the offending offset or field; it never crashes and leaves the output zeroed.
 */
#ifndef DSMOE_IO_H
#define DSMOE_IO_H

#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- .npy -- */
/* Supported descriptors: '<f4' F32, '<i4' I32, '<u2' BF16 (bf16 words stored as
 * uint16, dsmoe's convention), '<f2' F16, '<f8' F64, '<i8' I64, '|u1' U8.
 * Big-endian data and fortran_order=True are rejected. Format versions 1.0,
 * 2.0 and 3.0 are read; 1.0 is written (2.0 when the header needs it).
 * Limits: header <= 64 KiB, ndim <= DSMOE_MAX_DIMS, data <= 2^40 bytes. */

/* Reads a file into `out` (allocated; free with dsmoe_array_free). */
DSMOE_API dsmoe_status dsmoe_npy_read(const char *path, dsmoe_array *out);
/* Parses an in-memory .npy image (copies the data into `out`). */
DSMOE_API dsmoe_status dsmoe_npy_parse(const void *buf, size_t len, dsmoe_array *out);
/* Writes `a` atomically (temporary file in the same folder, then rename). */
DSMOE_API dsmoe_status dsmoe_npy_write(const char *path, const dsmoe_array *a);
/* Convenience: writes a C array of the given dtype and shape without copying. */
DSMOE_API dsmoe_status dsmoe_npy_write_raw(const char *path, dsmoe_dtype dtype, int32_t ndim,
                                           const int64_t *shape, const void *data);

/* --------------------------------------------------------- safetensors -- */
/* A safetensors file opened read-only and memory-mapped. Tensors are views into
 * the mapping, valid until dsmoe_safetensors_close(). Thread-safe for readers. */
typedef struct dsmoe_safetensors dsmoe_safetensors;

typedef struct dsmoe_tensor_view {
    const char *name;    /* owned by the file object */
    dsmoe_dtype dtype;   /* F32, BF16, F16, F64, I32, I64, U8 */
    int32_t ndim;
    int64_t shape[DSMOE_MAX_DIMS];
    const void *data;    /* little-endian, C order; may be unaligned for F64/I64 */
    size_t nbytes;
} dsmoe_tensor_view;

/* Opens and validates `path` (header JSON, dtypes, shapes, offsets in range and
 * not overlapping, total size). */
DSMOE_API dsmoe_status dsmoe_safetensors_open(const char *path, dsmoe_safetensors **out);
/* Same, over a caller-owned buffer that must outlive the object (no copy). */
DSMOE_API dsmoe_status dsmoe_safetensors_open_memory(const void *buf, size_t len,
                                                     dsmoe_safetensors **out);
/* Closes; NULL is a no-op. */
DSMOE_API void dsmoe_safetensors_close(dsmoe_safetensors *st);
DSMOE_API int64_t dsmoe_safetensors_count(const dsmoe_safetensors *st);
/* The i-th tensor in file order (0 <= i < count). */
DSMOE_API dsmoe_status dsmoe_safetensors_at(const dsmoe_safetensors *st, int64_t i,
                                            dsmoe_tensor_view *out);
/* Looks a tensor up by name; NOT_FOUND (message names it) if absent. */
DSMOE_API dsmoe_status dsmoe_safetensors_get(const dsmoe_safetensors *st, const char *name,
                                             dsmoe_tensor_view *out);
/* Value of a `__metadata__` key, or NULL. */
DSMOE_API const char *dsmoe_safetensors_metadata(const dsmoe_safetensors *st, const char *key);
DSMOE_API int64_t dsmoe_safetensors_metadata_count(const dsmoe_safetensors *st);
DSMOE_API dsmoe_status dsmoe_safetensors_metadata_at(const dsmoe_safetensors *st, int64_t i,
                                                     const char **key, const char **value);

/* Converts a F32/BF16/F16 view to fp32 into dst (numel floats). */
DSMOE_API dsmoe_status dsmoe_tensor_to_f32(const dsmoe_tensor_view *t, float *dst);

/* Writer: collects tensors (borrowed until save) and metadata, then writes the
 * file atomically (temporary file + fsync + rename). Tensors are written in the
 * order added, 8-byte aligned. */
typedef struct dsmoe_safetensors_writer dsmoe_safetensors_writer;
DSMOE_API dsmoe_status dsmoe_safetensors_writer_create(dsmoe_safetensors_writer **out);
DSMOE_API dsmoe_status dsmoe_safetensors_writer_add(dsmoe_safetensors_writer *w,
                                                    const char *name, dsmoe_dtype dtype,
                                                    int32_t ndim, const int64_t *shape,
                                                    const void *data);
DSMOE_API dsmoe_status dsmoe_safetensors_writer_set_metadata(dsmoe_safetensors_writer *w,
                                                             const char *key,
                                                             const char *value);
DSMOE_API dsmoe_status dsmoe_safetensors_writer_save(dsmoe_safetensors_writer *w,
                                                     const char *path);
DSMOE_API void dsmoe_safetensors_writer_free(dsmoe_safetensors_writer *w);

#ifdef __cplusplus
}
#endif
#endif /* DSMOE_IO_H */
