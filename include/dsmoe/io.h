/*
 * dsmoe/io.h — NumPy .npy arrays and safetensors files.
 *
 * Readers validate everything they are given: a truncated, oversized or hostile
 * file yields DSMOE_STATUS_FORMAT (or IO) with a message naming the problem and
 * the offending offset or field; it never crashes and leaves the output zeroed
 * (arrays) or NULL (file objects). A file that does not start like the format is
 * reported as "<path>: not a .npy file (...)" or "<path>: not a safetensors file
 * (...)". The formats, limits and rules are described in docs/formats.md.
 *
 * Reading: a regular file is memory-mapped. A pipe, FIFO or character device
 * (e.g. /dev/stdin, <(zcat f.gz)) is read into memory as far as its header says
 * the file goes, and never beyond DSMOE_IO_MAX_STREAM_BYTES: a longer stream, or a
 * header that declares more, fails with FORMAT naming the path and the limit.
 * Bytes that cannot start a valid file (/dev/zero, a text stream) fail at once.
 *
 * Writing is atomic: the bytes go to "<dest>.tmp.<pid>.<n>" in the destination's
 * folder, which is fsync()ed and renamed over the destination, so a crash leaves
 * either the old file or the new one. The new file keeps the permission bits of
 * the file it replaces (and its owner and group where the system allows); a new
 * file gets 0666 less the umask. A symbolic link is written through: its target
 * (the end of the chain, created if missing) is replaced and the link stays. A
 * destination that is a folder, a FIFO, a device or a socket is refused (IO)
 * before anything is written. Every save also removes "<dest>.tmp.<pid>.<n>"
 * files that a killed save of the same destination left behind (process gone,
 * file lock free). A destination with several hard links is detached from the
 * others, as with any save by rename.
 *
 * Data is little-endian; the host must be little-endian too (x86-64, AArch64).
 *
 * Example:
 *     dsmoe_array x;
 *     if (dsmoe_npy_read("hidden.npy", &x) != DSMOE_OK)
 *         fprintf(stderr, "%s\n", dsmoe_last_error());
 *     dsmoe_safetensors *st;
 *     dsmoe_tensor_view w;
 *     if (dsmoe_safetensors_open("layer.safetensors", &st) == DSMOE_OK &&
 *         dsmoe_safetensors_get(st, "mlp.gate.weight", &w) == DSMOE_OK)
 *         printf("%s: %s (%lld, %lld)\n", w.name, dsmoe_dtype_name(w.dtype),
 *                (long long)w.shape[0], (long long)w.shape[1]);
 *     dsmoe_safetensors_close(st);
 *     dsmoe_array_free(&x);
 */
#ifndef DSMOE_IO_H
#define DSMOE_IO_H

#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Most bytes read from a file that is not a regular file (a pipe, a FIFO, a
 * character device): 4 GiB. Regular files are mapped and have no such limit. */
#define DSMOE_IO_MAX_STREAM_BYTES ((uint64_t)1 << 32)

/* ---------------------------------------------------------------- .npy -- */
/* Supported descriptors: '<f4' F32, '<i4' I32, '<u2' BF16 (bf16 words stored as
 * uint16, dsmoe's convention), '<f2' F16, '<f8' F64, '<i8' I64, '|u1' U8 ('<u1'
 * is read too). Big-endian data, fortran_order=True, structured and other dtypes
 * are rejected. Format versions 1.0, 2.0 and 3.0 are read; 1.0 is written (the
 * header of an array of at most DSMOE_MAX_DIMS dimensions always fits), laid out
 * byte for byte as NumPy >= 1.23 writes it (64-byte aligned, padded with spaces
 * and a final '\n'). Scalars (ndim 0) and zero-size arrays are valid.
 * Limits: header <= 64 KiB, ndim <= DSMOE_MAX_DIMS, each dimension <= 2^40,
 * data <= 2^40 bytes. The data must end exactly at the end of the file: trailing
 * bytes are an error (a file holding several arrays is not read). */

/* Reads a file into `out` (allocated, 64-byte aligned; free with dsmoe_array_free).
 * Errors: IO (cannot open or read; message names the path), FORMAT (message names
 * the path, the byte offset and the problem), OUT_OF_MEMORY, INVALID_ARGUMENT. */
DSMOE_API dsmoe_status dsmoe_npy_read(const char *path, dsmoe_array *out);
/* Parses an in-memory .npy image buf[0..len) (copies the data into `out`). Reads
 * nothing outside the buffer. Errors as dsmoe_npy_read, without a path. */
DSMOE_API dsmoe_status dsmoe_npy_parse(const void *buf, size_t len, dsmoe_array *out);
/* Writes `a` atomically. a->nbytes must match its dtype and shape.
 * Errors: INVALID_ARGUMENT (bad dtype, rank, shape, nbytes, NULL data with
 * nbytes > 0), IO (message names the path and the system error). */
DSMOE_API dsmoe_status dsmoe_npy_write(const char *path, const dsmoe_array *a);
/* Convenience: writes a C array of the given dtype and shape without copying.
 * `shape` may be NULL when ndim == 0; `data` may be NULL for zero-size arrays. */
DSMOE_API dsmoe_status dsmoe_npy_write_raw(const char *path, dsmoe_dtype dtype, int32_t ndim,
                                           const int64_t *shape, const void *data);

/* --------------------------------------------------------- safetensors -- */
/* A safetensors file opened read-only and memory-mapped (read into memory when
 * mmap() is not possible). Tensors are views into the file image, valid until
 * dsmoe_safetensors_close(). The object is immutable after opening: any number of
 * threads may read it at once. If another process truncates a mapped file while
 * it is open, touching the lost pages raises SIGBUS, as with any mmap() reader.
 *
 * Opening validates: the 8-byte header length N (<= 100 MiB, inside the file);
 * the header is one strict JSON object (UTF-8, escapes incl. \uXXXX; \u0000 is
 * refused) of tensors {"dtype", "shape", "data_offsets"} (no other keys) and an
 * optional "__metadata__" object of string values; dtypes F32 BF16 F16 F64 I32 I64
 * U8; shapes of at most DSMOE_MAX_DIMS non-negative integers (each <= 2^40) whose
 * product times the dtype size equals end - begin (overflow checked); offsets
 * inside the data section; no two non-empty tensors overlap; names and metadata
 * keys unique. Gaps between tensors and unused bytes after the last are allowed. */
typedef struct dsmoe_safetensors dsmoe_safetensors;

typedef struct dsmoe_tensor_view {
    const char *name;    /* owned by the file object; valid UTF-8, NUL-free */
    dsmoe_dtype dtype;   /* F32, BF16, F16, F64, I32, I64, U8 */
    int32_t ndim;
    int64_t shape[DSMOE_MAX_DIMS]; /* unused entries are 0 */
    const void *data;    /* little-endian, C order; never NULL. Aligned to the element
                          * size in files from dsmoe's writer, possibly unaligned in
                          * others: read through memcpy or dsmoe_tensor_to_f32 */
    size_t nbytes;       /* product of the shape times the dtype size */
} dsmoe_tensor_view;

/* Opens and validates `path`. Errors: IO, FORMAT (message names the path, the
 * byte offset, the tensor and the problem), OUT_OF_MEMORY, INVALID_ARGUMENT.
 * *out is NULL on failure. */
DSMOE_API dsmoe_status dsmoe_safetensors_open(const char *path, dsmoe_safetensors **out);
/* Same, over a caller-owned buffer that must outlive the object (no copy). */
DSMOE_API dsmoe_status dsmoe_safetensors_open_memory(const void *buf, size_t len,
                                                     dsmoe_safetensors **out);
/* Closes; NULL is a no-op. */
DSMOE_API void dsmoe_safetensors_close(dsmoe_safetensors *st);
/* Number of tensors (0 for NULL). */
DSMOE_API int64_t dsmoe_safetensors_count(const dsmoe_safetensors *st);
/* The i-th tensor in header order (0 <= i < count); for files from dsmoe's writer
 * that is the order added. INVALID_ARGUMENT when i is out of range. */
DSMOE_API dsmoe_status dsmoe_safetensors_at(const dsmoe_safetensors *st, int64_t i,
                                            dsmoe_tensor_view *out);
/* Looks a tensor up by name (binary search); NOT_FOUND (message names it) if absent. */
DSMOE_API dsmoe_status dsmoe_safetensors_get(const dsmoe_safetensors *st, const char *name,
                                             dsmoe_tensor_view *out);
/* Value of a `__metadata__` key, or NULL (owned by the file object). */
DSMOE_API const char *dsmoe_safetensors_metadata(const dsmoe_safetensors *st, const char *key);
DSMOE_API int64_t dsmoe_safetensors_metadata_count(const dsmoe_safetensors *st);
/* The i-th metadata entry in header order; *key and *value are NULL on error. */
DSMOE_API dsmoe_status dsmoe_safetensors_metadata_at(const dsmoe_safetensors *st, int64_t i,
                                                     const char **key, const char **value);

/* Converts a F32/BF16/F16 view to fp32 into dst (numel floats; the view may be
 * unaligned). UNSUPPORTED for other dtypes; INVALID_ARGUMENT if the view's
 * dtype, shape and nbytes disagree. */
DSMOE_API dsmoe_status dsmoe_tensor_to_f32(const dsmoe_tensor_view *t, float *dst);

/* Writer: collects tensors and metadata, then writes the file atomically
 * (temporary file + fsync + rename). Layout as the reference implementation's:
 * the JSON header (metadata first, then the tensors in the order added) is padded
 * with spaces to a multiple of 8 bytes; tensor data follows contiguously, without
 * gaps, largest element size first (F64/I64, F32/I32, BF16/F16, U8; the order
 * added within each size), so each tensor starts at a multiple of its element
 * size. Not thread-safe; one writer per thread. */
typedef struct dsmoe_safetensors_writer dsmoe_safetensors_writer;
DSMOE_API dsmoe_status dsmoe_safetensors_writer_create(dsmoe_safetensors_writer **out);
/* Adds a tensor. `name` and `shape` are copied; `data` (shape product times dtype
 * size bytes; may be NULL if that is 0) is borrowed until save. INVALID_ARGUMENT
 * for an empty, non-UTF-8 or "__metadata__" name, a bad dtype, rank or shape.
 * Duplicate names are reported by save. */
DSMOE_API dsmoe_status dsmoe_safetensors_writer_add(dsmoe_safetensors_writer *w,
                                                    const char *name, dsmoe_dtype dtype,
                                                    int32_t ndim, const int64_t *shape,
                                                    const void *data);
/* Sets a `__metadata__` entry (both copied, UTF-8); setting a key again replaces
 * its value. */
DSMOE_API dsmoe_status dsmoe_safetensors_writer_set_metadata(dsmoe_safetensors_writer *w,
                                                             const char *key,
                                                             const char *value);
/* Writes the file. INVALID_ARGUMENT for duplicate tensor names (nothing written),
 * IO on a system error (the destination is left as it was). The writer can be
 * saved again, or added to, afterwards. */
DSMOE_API dsmoe_status dsmoe_safetensors_writer_save(dsmoe_safetensors_writer *w,
                                                     const char *path);
/* Frees; NULL is a no-op. */
DSMOE_API void dsmoe_safetensors_writer_free(dsmoe_safetensors_writer *w);

#ifdef __cplusplus
}
#endif
#endif /* DSMOE_IO_H */
