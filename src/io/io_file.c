/*
 * io_file.c — file plumbing under the .npy and safetensors code: checked shape
 * arithmetic, read-only whole-file mapping (mmap with a read() fallback), atomic
 * replacement (temporary file + fsync + rename) and UTF-8 validation.
 */
#include "io/io_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------ shapes -- */

int dsmoe__shape_nbytes(int32_t ndim, const int64_t *shape, size_t esize, size_t *nbytes,
                        int32_t *bad_dim) {
    if (bad_dim) *bad_dim = -1;
    if (ndim < 0 || ndim > DSMOE_MAX_DIMS || (ndim > 0 && !shape) || esize == 0) return 0;
    uint64_t prod = esize; /* product of the non-zero dimensions times esize */
    int zero = 0;
    for (int32_t i = 0; i < ndim; i++) {
        if (shape[i] < 0 || shape[i] > DSMOE__MAX_DIM) {
            if (bad_dim) *bad_dim = i;
            return 0;
        }
        if (shape[i] == 0) {
            zero = 1;
            continue;
        }
        if ((uint64_t)shape[i] > (uint64_t)INT64_MAX / prod) {
            if (bad_dim) *bad_dim = ndim;
            return 0;
        }
        prod *= (uint64_t)shape[i];
    }
    if (!zero && prod > SIZE_MAX) {
        if (bad_dim) *bad_dim = ndim;
        return 0;
    }
    *nbytes = zero ? 0 : (size_t)prod;
    return 1;
}

/* ------------------------------------------------------------ errors -- */

dsmoe_status dsmoe__error_prefix(dsmoe_status status, const char *prefix) {
    char detail[1024];
    snprintf(detail, sizeof detail, "%s", dsmoe_last_error());
    return dsmoe__error(status, "%s: %s", prefix, detail);
}

/* ------------------------------------------------------------ reading -- */

static int dsmoe__open_retry(const char *path, int flags, int mode) {
    int fd;
    do fd = open(path, flags, mode);
    while (fd < 0 && errno == EINTR);
    return fd;
}

/* Reads the rest of fd into a growing heap buffer. */
static dsmoe_status dsmoe__read_all(int fd, const char *path, size_t size_hint,
                                    dsmoe__mapped *m) {
    size_t cap = size_hint ? size_hint + 1 : 65536; /* +1: EOF is seen without a regrow */
    size_t used = 0;
    unsigned char *buf = (unsigned char *)malloc(cap);
    if (!buf) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "'%s': cannot allocate %zu bytes", path, cap);
    for (;;) {
        if (used == cap) {
            if (cap > SIZE_MAX / 2) {
                free(buf);
                return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "'%s': file too large", path);
            }
            unsigned char *nb = (unsigned char *)realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "'%s': cannot allocate %zu bytes",
                                    path, cap * 2);
            }
            buf = nb;
            cap *= 2;
        }
        size_t want = cap - used;
        if (want > ((size_t)1 << 30)) want = (size_t)1 << 30;
        ssize_t got = read(fd, buf + used, want);
        if (got < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            free(buf);
            return dsmoe__error(DSMOE_STATUS_IO, "'%s': read failed at byte %zu: %s", path, used,
                                strerror(e));
        }
        if (got == 0) break;
        used += (size_t)got;
    }
    m->heap = buf;
    m->data = buf;
    m->size = used;
    return DSMOE_OK;
}

dsmoe_status dsmoe__map_file(const char *path, int use_mmap, dsmoe__mapped *m) {
    static const unsigned char empty[1] = {0};
    memset(m, 0, sizeof *m);
    if (!path) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "NULL path");
    int fd = dsmoe__open_retry(path, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0) return dsmoe__error(DSMOE_STATUS_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return dsmoe__error(DSMOE_STATUS_IO, "cannot stat '%s': %s", path, strerror(e));
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return dsmoe__error(DSMOE_STATUS_IO, "'%s' is a directory", path);
    }
    int regular = S_ISREG(st.st_mode);
    if (regular && st.st_size == 0) {
        close(fd);
        m->data = empty;
        return DSMOE_OK;
    }
    if (use_mmap && regular && (uint64_t)st.st_size <= SIZE_MAX) {
        void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p != MAP_FAILED) {
            close(fd);
            m->map_base = p;
            m->data = (const unsigned char *)p;
            m->size = (size_t)st.st_size;
            return DSMOE_OK;
        }
    }
    size_t hint = regular && (uint64_t)st.st_size < SIZE_MAX ? (size_t)st.st_size : 0;
    dsmoe_status s = dsmoe__read_all(fd, path, hint, m);
    close(fd);
    if (s != DSMOE_OK) memset(m, 0, sizeof *m);
    return s;
}

void dsmoe__unmap_file(dsmoe__mapped *m) {
    if (!m) return;
    if (m->map_base) munmap(m->map_base, m->size);
    free(m->heap);
    memset(m, 0, sizeof *m);
}

/* ------------------------------------------------------------ writing -- */

static atomic_uint dsmoe__tmp_counter;

dsmoe_status dsmoe__atomic_open(dsmoe__atomic_file *f, const char *path) {
    f->fd = -1;
    f->path = path;
    f->tmp_path = NULL;
    if (!path || !path[0]) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "empty or NULL path");
    size_t cap = strlen(path) + 48;
    f->tmp_path = (char *)malloc(cap);
    if (!f->tmp_path) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "'%s': out of memory", path);
    for (int attempt = 0; attempt < 100; attempt++) {
        unsigned n = atomic_fetch_add(&dsmoe__tmp_counter, 1u);
        snprintf(f->tmp_path, cap, "%s.tmp.%ld.%u", path, (long)getpid(), n);
        /* 0666 & ~umask: the final file gets the usual permissions. */
        f->fd = dsmoe__open_retry(f->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (f->fd >= 0) return DSMOE_OK;
        if (errno != EEXIST) break;
    }
    int e = errno;
    dsmoe_status s = dsmoe__error(DSMOE_STATUS_IO, "cannot create temporary file '%s': %s",
                                  f->tmp_path, strerror(e));
    free(f->tmp_path);
    f->tmp_path = NULL;
    return s;
}

dsmoe_status dsmoe__atomic_write(dsmoe__atomic_file *f, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    while (n > 0) {
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t w = write(f->fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) continue;
            return dsmoe__error(DSMOE_STATUS_IO, "writing '%s': %s", f->tmp_path, strerror(errno));
        }
        p += w;
        n -= (size_t)w;
    }
    return DSMOE_OK;
}

void dsmoe__atomic_abort(dsmoe__atomic_file *f) {
    if (f->fd >= 0) close(f->fd);
    f->fd = -1;
    if (f->tmp_path) unlink(f->tmp_path);
    free(f->tmp_path);
    f->tmp_path = NULL;
}

/* fsync of the folder holding `path`, so the rename itself is durable. Best
 * effort: some file systems refuse to fsync a directory. */
static void dsmoe__sync_parent(const char *path) {
    const char *slash = strrchr(path, '/');
    char *dir;
    if (!slash) {
        dir = strdup(".");
    } else {
        size_t len = slash == path ? 1 : (size_t)(slash - path);
        dir = (char *)malloc(len + 1);
        if (dir) {
            memcpy(dir, path, len);
            dir[len] = '\0';
        }
    }
    if (!dir) return;
    int fd = dsmoe__open_retry(dir, O_RDONLY | O_CLOEXEC, 0);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(dir);
}

dsmoe_status dsmoe__atomic_commit(dsmoe__atomic_file *f) {
    dsmoe_status s = DSMOE_OK;
    if (fsync(f->fd) != 0) {
        s = dsmoe__error(DSMOE_STATUS_IO, "fsync of '%s' failed: %s", f->tmp_path, strerror(errno));
    } else {
        int rc = close(f->fd);
        f->fd = -1;
        if (rc != 0)
            s = dsmoe__error(DSMOE_STATUS_IO, "closing '%s' failed: %s", f->tmp_path, strerror(errno));
        else if (rename(f->tmp_path, f->path) != 0)
            s = dsmoe__error(DSMOE_STATUS_IO, "cannot rename '%s' to '%s': %s", f->tmp_path, f->path,
                             strerror(errno));
    }
    if (s != DSMOE_OK) {
        dsmoe__atomic_abort(f);
        return s;
    }
    free(f->tmp_path);
    f->tmp_path = NULL;
    dsmoe__sync_parent(f->path);
    return DSMOE_OK;
}

/* ------------------------------------------------------------ UTF-8 -- */

size_t dsmoe__utf8_seq(const unsigned char *s, size_t avail) {
    if (avail == 0) return 0;
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    uint32_t cp, min;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2, cp = c & 0x1Fu, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3, cp = c & 0x0Fu, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4, cp = c & 0x07u, min = 0x10000;
    } else {
        return 0; /* continuation byte, overlong 2-byte lead (C0, C1) or F5..FF */
    }
    if (avail < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0u) != 0x80u) return 0;
        cp = (cp << 6) | (s[i] & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

const char *dsmoe__excerpt(const void *s, size_t n, char *buf, size_t cap) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, o = 0;
    while (i < n) {
        size_t k = p[i] >= 0x80 ? dsmoe__utf8_seq(p + i, n - i) : 1;
        if (o + (k ? k : 1) + 4 > cap) { /* keep room for "..." and the NUL */
            memcpy(buf + o, "...", 3);
            o += 3;
            break;
        }
        if (k == 0 || (k == 1 && (p[i] < 0x20 || p[i] == 0x7f))) {
            buf[o++] = '?';
            i++;
        } else {
            memcpy(buf + o, p + i, k);
            o += k;
            i += k;
        }
    }
    buf[o] = '\0';
    return buf;
}

int dsmoe__utf8_valid(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t k = dsmoe__utf8_seq(p + i, n - i);
        if (k == 0) return 0;
        i += k;
    }
    return 1;
}
