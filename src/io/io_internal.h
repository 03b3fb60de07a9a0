/*
 * io_internal.h — pieces shared by the file-format readers and writers (npy.c,
 * safetensors.c): shape arithmetic with overflow checks, whole-file mapping with a
 * read() fallback, atomic file replacement and UTF-8 validation. Not installed.
 */
#ifndef DSMOE_IO_INTERNAL_H
#define DSMOE_IO_INTERNAL_H

#include "core/internal.h"
#include "dsmoe/io.h"

#include <stddef.h>
#include <stdint.h>

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && \
    __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "dsmoe's .npy and safetensors code assumes a little-endian host"
#endif

/* Largest single dimension a reader accepts (2^40), as dsmoe_array_alloc does. */
#define DSMOE__MAX_DIM ((int64_t)1 << 40)

/* Byte size of a C-ordered array: `esize` times the product of the shape.
 * Fails (returns 0) if ndim is outside 0..DSMOE_MAX_DIMS, a dimension is negative
 * or above DSMOE__MAX_DIM, or the product of the NON-ZERO dimensions times esize
 * exceeds INT64_MAX. The last rule means any partial product of the dimensions
 * fits in int64_t, even for zero-size arrays such as (0, 2^40, 2^40), so callers
 * may multiply dimensions freely. On failure *bad_dim is the offending dimension
 * index (or -1 for a bad ndim, ndim for an overflowing product) when non-NULL. */
int dsmoe__shape_nbytes(int32_t ndim, const int64_t *shape, size_t esize, size_t *nbytes,
                        int32_t *bad_dim);

/* A whole file in memory: mapped read-only, or read into a heap buffer. */
typedef struct dsmoe__mapped {
    const unsigned char *data; /* file contents (never NULL after a successful map) */
    size_t size;               /* bytes */
    void *map_base;            /* mmap()ed region, or NULL */
    void *heap;                /* malloc()ed copy, or NULL */
} dsmoe__mapped;

/* Maps `path` read-only. With use_mmap == 0, or when mmap() fails (pipes, some
 * file systems), the file is read into memory instead. Errors: IO (message names
 * the path and errno text), OUT_OF_MEMORY. `m` is zeroed on failure. */
dsmoe_status dsmoe__map_file(const char *path, int use_mmap, dsmoe__mapped *m);
/* Releases a mapping; zeroed and NULL mappings are harmless. */
void dsmoe__unmap_file(dsmoe__mapped *m);

/* Atomic replacement of a file: data goes to "<path>.tmp.<pid>.<n>" in the same
 * folder, which commit() fsyncs, renames over `path` (atomic on POSIX) and follows
 * with an fsync of the folder. On any failure the temporary file is removed and
 * `path` is left untouched. Errors are IO with the path and errno text. */
typedef struct dsmoe__atomic_file {
    int fd;
    const char *path;
    char *tmp_path;
} dsmoe__atomic_file;
dsmoe_status dsmoe__atomic_open(dsmoe__atomic_file *f, const char *path);
dsmoe_status dsmoe__atomic_write(dsmoe__atomic_file *f, const void *data, size_t n);
/* Syncs and renames; the temporary file is gone afterwards, success or not. */
dsmoe_status dsmoe__atomic_commit(dsmoe__atomic_file *f);
/* Discards the temporary file (after a failed write); safe after commit. */
void dsmoe__atomic_abort(dsmoe__atomic_file *f);

/* Length of the valid UTF-8 sequence starting at s[0] (1..4), or 0 if it is not
 * one (truncated, overlong, a surrogate, above U+10FFFF, a stray continuation). */
size_t dsmoe__utf8_seq(const unsigned char *s, size_t avail);
/* True if s[0..n) is entirely valid UTF-8. */
int dsmoe__utf8_valid(const char *s, size_t n);

/* Quotes untrusted bytes s[0..n) into buf (cap >= 8) for an error message:
 * printable ASCII and valid UTF-8 are kept, anything else becomes '?', and a
 * "..." marks a cut when it does not fit. Returns buf. */
const char *dsmoe__excerpt(const void *s, size_t n, char *buf, size_t cap);

/* Re-issues the current error message with "<prefix>: " in front (same status). */
dsmoe_status dsmoe__error_prefix(dsmoe_status status, const char *prefix);

/* dsmoe_safetensors_open with a choice of mmap (1) or read() (0), for tests. */
dsmoe_status dsmoe__safetensors_open_file(const char *path, int use_mmap, dsmoe_safetensors **out);

#endif /* DSMOE_IO_INTERNAL_H */
