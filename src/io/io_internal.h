/*
 * io_internal.h — pieces shared by the file-format readers and writers (npy.c,
 * safetensors.c): shape arithmetic with overflow checks, whole-file mapping with a
 * read() fallback and a bounded reader for pipes and devices, atomic file
 * replacement and UTF-8 validation. Not installed.
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

/* How a format tells the stream reader how long a file is: a pipe or a character
 * device has no size until it ends, so dsmoe__map_file asks the format, from the
 * bytes read so far buf[0..have), how many it needs. The probe sets *want and
 * *kind, or fails (FORMAT, a message without the path) when those bytes cannot
 * begin a valid file, so that /dev/zero or a text stream stops at once. */
typedef enum dsmoe__len_kind {
    DSMOE__LEN_MORE,   /* at least *want (> have) bytes before it can say more */
    DSMOE__LEN_EXACT,  /* the file is exactly *want bytes: a longer stream is an error */
    DSMOE__LEN_PREFIX, /* only the first *want bytes are used: the rest is not read */
} dsmoe__len_kind;
typedef dsmoe_status (*dsmoe__len_probe)(const unsigned char *buf, size_t have, size_t *want,
                                         dsmoe__len_kind *kind);

/* Maps `path` read-only. A regular file is mapped, or (use_mmap == 0, or mmap()
 * fails) read into memory up to the size fstat() gave. Anything else (a pipe, a
 * FIFO, a character device) is read into memory as far as `probe` (may be NULL)
 * says the format needs, and never beyond `max_stream` bytes (0: the default
 * DSMOE_IO_MAX_STREAM_BYTES): a longer stream fails with FORMAT naming the path
 * and the limit, having held at most max_stream + 1 bytes. Errors: IO (message
 * names the path and errno text), FORMAT (a probe's verdict, or the limit; the
 * message starts with the path), OUT_OF_MEMORY. `m` is zeroed on failure. */
dsmoe_status dsmoe__map_file(const char *path, int use_mmap, dsmoe__len_probe probe,
                             uint64_t max_stream, dsmoe__mapped *m);
/* Releases a mapping; zeroed and NULL mappings are harmless. */
void dsmoe__unmap_file(dsmoe__mapped *m);

/* The probes of the two formats, for dsmoe__map_file (npy.c, safetensors.c). */
dsmoe_status dsmoe__npy_probe(const unsigned char *buf, size_t have, size_t *want,
                              dsmoe__len_kind *kind);
dsmoe_status dsmoe__safetensors_probe(const unsigned char *buf, size_t have, size_t *want,
                                      dsmoe__len_kind *kind);

/* Atomic replacement of a file. The destination is `path` or, when `path` is a
 * symbolic link, the file at the end of its chain of links (which may not exist
 * yet): the data is written through the link, the link itself stays. Anything
 * else that is not a regular file (a folder, a FIFO, a device) is refused at
 * open. Data goes to "<dest>.tmp.<pid>.<n>" in the destination's folder, created
 * with the destination's permission bits when it exists (and its owner and group
 * where the system allows) or 0666 less the umask when it does not, and locked
 * (fcntl) while it is written; commit() fsyncs it, renames it over the
 * destination (atomic on POSIX) and fsyncs the folder. On any failure the
 * temporary file is removed and the destination is left untouched. open() also
 * removes temporary files of that exact pattern for the same destination that a
 * killed save left behind: those whose process is gone (kill(pid, 0) fails with
 * ESRCH) and whose lock is free. Errors are IO with the path and errno text. */
typedef struct dsmoe__atomic_file {
    int fd;
    const char *path; /* as the caller named it, for messages */
    char *dest;       /* the file replaced: path, or the target of its links */
    char *tmp_path;
} dsmoe__atomic_file;
dsmoe_status dsmoe__atomic_open(dsmoe__atomic_file *f, const char *path);
dsmoe_status dsmoe__atomic_write(dsmoe__atomic_file *f, const void *data, size_t n);
/* Syncs and renames; the temporary file is gone afterwards, success or not. */
dsmoe_status dsmoe__atomic_commit(dsmoe__atomic_file *f);
/* Discards the temporary file (after a failed write); safe after commit. */
void dsmoe__atomic_abort(dsmoe__atomic_file *f);

/* Replacing a whole folder (a checkpoint) so that a kill at any moment leaves either
 * the old folder or the new one complete at `dest`:
 *   begin()   creates the empty folder "<dest>.tmp.<pid>.<n>" next to dest (first
 *             removing such folders of processes that are gone, and recovering an
 *             interrupted swap, below) for the caller to fill with files;
 *   commit()  fsyncs every file in it and the folder, then puts it in place: rename()
 *             when dest does not exist; otherwise an atomic exchange of the two
 *             folders (Linux renameat2 RENAME_EXCHANGE), after which the old one is
 *             removed. Where the exchange is unsupported, dest is first renamed to
 *             "<dest>.old.<pid>.<n>", then the new folder to dest: a kill between the
 *             two leaves no dest, which dsmoe__dir_recover() (called by begin, and by
 *             readers before they open dest) restores from the ".old" folder.
 *             The parent folder is fsynced. On failure the temporary folder is
 *             removed and dest is as before.
 *   abort()   removes the temporary folder.
 * Folders are flat or shallow; symbolic links inside are removed, never followed. */
typedef struct dsmoe__dir_txn {
    char *dest; /* the folder replaced */
    char *tmp;  /* the folder being filled */
} dsmoe__dir_txn;
dsmoe_status dsmoe__dir_begin(dsmoe__dir_txn *t, const char *dest);
dsmoe_status dsmoe__dir_commit(dsmoe__dir_txn *t);
void dsmoe__dir_abort(dsmoe__dir_txn *t);
dsmoe_status dsmoe__dir_recover(const char *dest);
/* dsmoe__dir_recover(), then the temporary folders of dead processes removed as begin()
 * does: for a writer that may not save again (resuming a finished run), so that a kill
 * between a commit's exchange and its removal of the old folder leaves nothing behind
 * for good. Readers call dsmoe__dir_recover() alone. */
dsmoe_status dsmoe__dir_tidy(const char *dest);
/* Tests only: nonzero makes commit() take the two-rename path. */
extern int dsmoe__dir_force_fallback;

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
