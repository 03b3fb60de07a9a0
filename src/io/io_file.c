/*
 * io_file.c — file plumbing under the .npy and safetensors code: checked shape
 * arithmetic, read-only whole-file mapping (mmap with a read() fallback, and a
 * bounded reader for pipes and devices), atomic replacement (temporary file +
 * fsync + rename, through symbolic links, keeping the permissions, removing what a
 * killed save left), atomic replacement of whole folders, and UTF-8 validation.
 */
/* syscall() for renameat2, which glibc declares only with _GNU_SOURCE (2.28+). */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif
#include "io/io_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

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

/* What a stat() mode is, for messages. */
static const char *dsmoe__file_kind(mode_t mode) {
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISFIFO(mode)) return "a pipe or FIFO";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISSOCK(mode)) return "a socket";
    if (S_ISLNK(mode)) return "a symbolic link";
    return "not a regular file";
}

/* Reads fd into a heap buffer: as far as `probe` says the format needs (or, with
 * no probe, to the end), never holding more than limit + 1 bytes. `regular`: the
 * file had `limit` bytes at fstat() time, and reading stops there. */
static dsmoe_status dsmoe__read_stream(int fd, const char *path, int regular,
                                       dsmoe__len_probe probe, size_t limit, dsmoe__mapped *m) {
    size_t cap = 0, used = 0, want = 0;
    dsmoe__len_kind kind = DSMOE__LEN_MORE;
    unsigned char *buf = NULL;
    dsmoe_status s = DSMOE_OK;
    if (regular) {
        kind = DSMOE__LEN_PREFIX;
        want = limit;
        probe = NULL;
    }
    for (;;) {
        if (probe && kind == DSMOE__LEN_MORE && used >= want) {
            static const unsigned char none[1] = {0};
            s = probe(buf ? buf : none, used, &want, &kind);
            if (s != DSMOE_OK) {
                s = dsmoe__error_prefix(s, path);
                break;
            }
            if (kind == DSMOE__LEN_MORE && want <= used) want = used + 1;
            if (kind != DSMOE__LEN_MORE && want > limit) {
                s = dsmoe__error(DSMOE_STATUS_FORMAT,
                                 "%s: its header makes it %zu bytes long, above the %zu-byte limit "
                                 "for reading a file that is not a regular file (a pipe or a device); "
                                 "read it from a regular file",
                                 path, want, limit);
                break;
            }
        }
        /* Read up to `stop` bytes: one more than an exact length (to see that the
         * stream ends there), or one more than the limit (to see that it is exceeded). */
        size_t stop = kind == DSMOE__LEN_PREFIX ? want : kind == DSMOE__LEN_EXACT ? want + 1 : limit + 1;
        if (used >= stop) break;
        if (used == cap) {
            size_t nc = cap ? (cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2) : 65536;
            if (nc > stop) nc = stop;
            unsigned char *nb = (unsigned char *)realloc(buf, nc);
            if (!nb) {
                s = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "'%s': cannot allocate %zu bytes",
                                 path, nc);
                break;
            }
            buf = nb;
            cap = nc;
        }
        size_t n = (cap < stop ? cap : stop) - used;
        if (n > ((size_t)1 << 30)) n = (size_t)1 << 30;
        ssize_t got = read(fd, buf + used, n);
        if (got < 0) {
            if (errno == EINTR) continue;
            s = dsmoe__error(DSMOE_STATUS_IO, "'%s': read failed at byte %zu: %s", path, used,
                             strerror(errno));
            break;
        }
        if (got == 0) break; /* the end: a short file is the parser's to report */
        used += (size_t)got;
    }
    if (s == DSMOE_OK && !regular && used > limit)
        s = dsmoe__error(DSMOE_STATUS_FORMAT,
                         "%s: longer than the %zu-byte limit for reading a file that is not a "
                         "regular file (a pipe or a device); read it from a regular file",
                         path, limit);
    else if (s == DSMOE_OK && kind == DSMOE__LEN_EXACT && used > want)
        s = dsmoe__error(DSMOE_STATUS_FORMAT,
                         "%s: the stream goes on past byte %zu, where its header says the file ends",
                         path, want);
    if (s != DSMOE_OK) {
        free(buf);
        return s;
    }
    m->heap = buf;
    m->data = buf;
    m->size = used;
    return DSMOE_OK;
}

dsmoe_status dsmoe__map_file(const char *path, int use_mmap, dsmoe__len_probe probe,
                             uint64_t max_stream, dsmoe__mapped *m) {
    static const unsigned char empty[1] = {0};
    memset(m, 0, sizeof *m);
    if (!path) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "NULL path");
    if (max_stream == 0 || max_stream > DSMOE_IO_MAX_STREAM_BYTES)
        max_stream = DSMOE_IO_MAX_STREAM_BYTES;
    int fd = dsmoe__open_retry(path, O_RDONLY | O_CLOEXEC | O_NOCTTY, 0);
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
    if (regular && (uint64_t)st.st_size > SIZE_MAX) {
        close(fd);
        return dsmoe__error(DSMOE_STATUS_IO, "'%s': the file is too large to map", path);
    }
    if (use_mmap && regular) {
        void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p != MAP_FAILED) {
            close(fd);
            m->map_base = p;
            m->data = (const unsigned char *)p;
            m->size = (size_t)st.st_size;
            return DSMOE_OK;
        }
    }
    size_t limit = regular ? (size_t)st.st_size : (size_t)max_stream;
    dsmoe_status s = dsmoe__read_stream(fd, path, regular, probe, limit, m);
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

/* Where a file name's folder ends: dir is path[0..*dir_len) ("." when 0 and the
 * path has no slash), the base name starts at path + *base_at. */
static void dsmoe__split(const char *path, size_t *dir_len, size_t *base_at) {
    const char *slash = strrchr(path, '/');
    if (!slash) {
        *dir_len = 0;
        *base_at = 0;
    } else {
        *dir_len = slash == path ? 1 : (size_t)(slash - path);
        *base_at = (size_t)(slash - path) + 1;
    }
}

static char *dsmoe__dir_of(const char *path) {
    size_t dl, ba;
    dsmoe__split(path, &dl, &ba);
    if (dl == 0) return strdup(".");
    char *dir = (char *)malloc(dl + 1);
    if (dir) {
        memcpy(dir, path, dl);
        dir[dl] = '\0';
    }
    return dir;
}

/* The target of the symbolic link `link`, as a path usable from here: relative
 * targets are taken from the link's folder. NULL with errno set on failure. */
static char *dsmoe__follow_link(const char *link) {
    size_t cap = 256;
    char *t = NULL;
    for (;;) {
        char *nt = (char *)realloc(t, cap);
        if (!nt) {
            free(t);
            errno = ENOMEM;
            return NULL;
        }
        t = nt;
        ssize_t n = readlink(link, t, cap);
        if (n < 0) {
            int e = errno;
            free(t);
            errno = e;
            return NULL;
        }
        if ((size_t)n < cap) {
            t[n] = '\0';
            break;
        }
        cap *= 2;
    }
    if (t[0] == '/' || !strchr(link, '/')) return t;
    size_t dl, ba;
    dsmoe__split(link, &dl, &ba);
    size_t tl = strlen(t);
    char *full = (char *)malloc(ba + tl + 1);
    if (!full) {
        free(t);
        errno = ENOMEM;
        return NULL;
    }
    memcpy(full, link, ba); /* the folder with its final '/' */
    memcpy(full + ba, t, tl + 1);
    free(t);
    return full;
}

/* The file an atomic save of `path` replaces: `path` itself, or the end of its
 * chain of symbolic links. *exists tells whether that file exists; *st is its
 * status then. Refuses (IO) anything that is not a regular file. */
static dsmoe_status dsmoe__resolve_dest(const char *path, char **dest, int *exists,
                                        struct stat *st) {
    *dest = NULL;
    *exists = 0;
    /* stat() follows every link at once: this catches a folder, a pipe or a device
     * at the end of a chain (or behind /dev/stdout), whatever the links look like. */
    if (stat(path, st) == 0 && !S_ISREG(st->st_mode))
        return dsmoe__error(DSMOE_STATUS_IO,
                            "cannot write '%s': it is %s, and dsmoe writes a file by replacing it "
                            "with a new one",
                            path, dsmoe__file_kind(st->st_mode));
    char *cur = strdup(path);
    if (!cur) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "'%s': out of memory", path);
    for (int hops = 0;; hops++) {
        if (lstat(cur, st) != 0) {
            int e = errno;
            if (e == ENOENT) break; /* a new file (perhaps the target of a dangling link) */
            dsmoe_status s = dsmoe__error(DSMOE_STATUS_IO, "cannot write '%s': '%s': %s", path,
                                          cur, strerror(e));
            free(cur);
            return s;
        }
        if (!S_ISLNK(st->st_mode)) {
            if (!S_ISREG(st->st_mode)) { /* changed since the stat() above */
                dsmoe_status s = dsmoe__error(DSMOE_STATUS_IO, "cannot write '%s': '%s' is %s",
                                              path, cur, dsmoe__file_kind(st->st_mode));
                free(cur);
                return s;
            }
            *exists = 1;
            break;
        }
        if (hops == 40) {
            free(cur);
            return dsmoe__error(DSMOE_STATUS_IO,
                                "cannot write '%s': more than 40 symbolic links in a chain (a loop?)",
                                path);
        }
        char *next = dsmoe__follow_link(cur);
        if (!next) {
            int e = errno;
            dsmoe_status s = dsmoe__error(DSMOE_STATUS_IO,
                                          "cannot write '%s': cannot read the symbolic link '%s': %s",
                                          path, cur, strerror(e));
            free(cur);
            return s;
        }
        free(cur);
        cur = next;
    }
    *dest = cur;
    return DSMOE_OK;
}

/* Parses 1..10 decimal digits at *p into *v (<= max); advances *p. */
static int dsmoe__digits(const char **p, unsigned long max, unsigned long *v) {
    const char *s = *p;
    unsigned long x = 0;
    int n = 0;
    while (*s >= '0' && *s <= '9' && n < 11) {
        x = x * 10 + (unsigned long)(*s - '0');
        s++;
        n++;
    }
    if (n == 0 || n > 10 || x > max) return 0;
    *p = s;
    *v = x;
    return 1;
}

/* Removes "<base>.tmp.<pid>.<n>" files beside `dest` that a killed save left: the
 * pid names no live process and nobody holds the file's lock (the lock also
 * protects a live writer whose pid this process cannot see: another pid namespace,
 * another host on a shared file system). Best effort: errors are ignored. */
/* 1 if `name` is "<base>.<tag>.<pid>.<n>" left by a process that is gone: another
 * process (not this one: another thread's save may be in progress), and kill(pid, 0)
 * fails with ESRCH (EPERM means alive, someone else's). */
static int dsmoe__left_by_dead(const char *name, const char *base, size_t blen, const char *tag) {
    const size_t tlen = strlen(tag);
    unsigned long pid, n;
    if (strncmp(name, base, blen) != 0 || name[blen] != '.' ||
        strncmp(name + blen + 1, tag, tlen) != 0 || name[blen + 1 + tlen] != '.')
        return 0;
    const char *p = name + blen + tlen + 2;
    if (!dsmoe__digits(&p, 0x7fffffffUL, &pid) || *p++ != '.' ||
        !dsmoe__digits(&p, 0xffffffffUL, &n) || *p != '\0' || pid == 0)
        return 0;
    if ((pid_t)pid == getpid()) return 0;
    return kill((pid_t)pid, 0) != 0 && errno == ESRCH;
}

static void dsmoe__remove_stale_tmp(const char *dest) {
    size_t dl, ba;
    dsmoe__split(dest, &dl, &ba);
    const char *base = dest + ba;
    size_t blen = strlen(base);
    char *dir = dsmoe__dir_of(dest);
    if (!dir) return;
    DIR *d = opendir(dir);
    if (!d) {
        free(dir);
        return;
    }
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        const char *name = e->d_name;
        if (!dsmoe__left_by_dead(name, base, blen, "tmp")) continue;
        size_t fl = strlen(dir) + 1 + strlen(name) + 1;
        char *full = (char *)malloc(fl);
        if (!full) break;
        snprintf(full, fl, "%s/%s", dir, name);
        int fd = dsmoe__open_retry(full, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, 0);
        struct stat st;
        if (fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
            struct flock lk;
            memset(&lk, 0, sizeof lk);
            lk.l_type = F_RDLCK;
            lk.l_whence = SEEK_SET;
            int rc = fcntl(fd, F_SETLK, &lk);
            int err = errno;
            /* Free lock, or a file system without locks: the pid alone decides. */
            if (rc == 0 || (err != EACCES && err != EAGAIN)) (void)unlink(full);
        }
        if (fd >= 0) close(fd);
        free(full);
    }
    closedir(d);
    free(dir);
}

dsmoe_status dsmoe__atomic_open(dsmoe__atomic_file *f, const char *path) {
    f->fd = -1;
    f->path = path;
    f->dest = NULL;
    f->tmp_path = NULL;
    if (!path || !path[0]) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "empty or NULL path");
    struct stat st;
    int exists;
    dsmoe_status s = dsmoe__resolve_dest(path, &f->dest, &exists, &st);
    if (s != DSMOE_OK) return s;
    if (!f->dest) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "'%s': out of memory", path);
    dsmoe__remove_stale_tmp(f->dest);
    size_t cap = strlen(f->dest) + 48;
    f->tmp_path = (char *)malloc(cap);
    if (!f->tmp_path) {
        free(f->dest);
        f->dest = NULL;
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "'%s': out of memory", path);
    }
    /* An existing file keeps its permission bits: created with them (the umask can
     * only narrow them, so the file is never more open than the one it replaces)
     * and set exactly by fchmod() below. A new file gets 0666 less the umask. */
    const mode_t mode = exists ? (st.st_mode & 0777) : 0666;
    for (int attempt = 0; attempt < 100; attempt++) {
        unsigned n = atomic_fetch_add(&dsmoe__tmp_counter, 1u);
        snprintf(f->tmp_path, cap, "%s.tmp.%ld.%u", f->dest, (long)getpid(), n);
        f->fd = dsmoe__open_retry(f->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY,
                                  (int)mode);
        if (f->fd >= 0 || errno != EEXIST) break;
    }
    if (f->fd < 0) {
        int e = errno;
        s = dsmoe__error(DSMOE_STATUS_IO, "cannot create temporary file '%s': %s", f->tmp_path,
                         strerror(e));
        free(f->tmp_path);
        free(f->dest);
        f->tmp_path = f->dest = NULL;
        return s;
    }
    /* A lock held while the file is written tells dsmoe__remove_stale_tmp in other
     * processes that this file is alive. Best effort: some file systems lack locks. */
    struct flock lk;
    memset(&lk, 0, sizeof lk);
    lk.l_type = F_WRLCK;
    lk.l_whence = SEEK_SET;
    (void)fcntl(f->fd, F_SETLK, &lk);
    if (exists) {
        /* Owner and group as before where allowed (root; a group one belongs to). */
        if (st.st_uid != geteuid() || st.st_gid != getegid()) {
            if (fchown(f->fd, st.st_uid, st.st_gid) != 0)
                (void)!fchown(f->fd, (uid_t)-1, st.st_gid);
        }
        if (fchmod(f->fd, mode) != 0) {
            s = dsmoe__error(DSMOE_STATUS_IO, "cannot set the permissions of '%s': %s",
                             f->tmp_path, strerror(errno));
            dsmoe__atomic_abort(f);
            return s;
        }
    }
    return DSMOE_OK;
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
    free(f->dest);
    f->tmp_path = NULL;
    f->dest = NULL;
}

/* fsync of the folder holding `path`, so the rename itself is durable. Best
 * effort: some file systems refuse to fsync a directory. */
static void dsmoe__sync_parent(const char *path) {
    char *dir = dsmoe__dir_of(path);
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
        int rc = close(f->fd); /* also drops the lock, just before the rename */
        f->fd = -1;
        if (rc != 0)
            s = dsmoe__error(DSMOE_STATUS_IO, "closing '%s' failed: %s", f->tmp_path, strerror(errno));
        else if (rename(f->tmp_path, f->dest) != 0)
            s = dsmoe__error(DSMOE_STATUS_IO, "cannot rename '%s' to '%s': %s", f->tmp_path, f->dest,
                             strerror(errno));
    }
    if (s != DSMOE_OK) {
        dsmoe__atomic_abort(f);
        return s;
    }
    free(f->tmp_path);
    f->tmp_path = NULL;
    dsmoe__sync_parent(f->dest);
    free(f->dest);
    f->dest = NULL;
    return DSMOE_OK;
}

/* -------------------------------------------------- folder replacement -- */

int dsmoe__dir_force_fallback; /* tests: take the two-rename path */

/* Removes path: a file, or a folder and what it holds (depth-limited; never follows
 * symbolic links). Best effort. */
static void dsmoe__remove_tree(int parent, const char *name, int depth) {
    if (unlinkat(parent, name, 0) == 0 || errno == ENOENT || depth > 8) return;
    int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return;
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        return;
    }
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        dsmoe__remove_tree(fd, e->d_name, depth + 1);
    }
    closedir(d);
    (void)unlinkat(parent, name, AT_REMOVEDIR);
}

/* Removes "<base>.<tag>.<pid>.<n>" folders next to dest whose process is gone. */
static void dsmoe__remove_stale_dirs(const char *dest, const char *tag) {
    size_t dl, ba;
    dsmoe__split(dest, &dl, &ba);
    const char *base = dest + ba;
    size_t blen = strlen(base);
    char *dir = dsmoe__dir_of(dest);
    if (!dir) return;
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!d) {
        if (dfd >= 0) close(dfd);
        free(dir);
        return;
    }
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        const char *name = e->d_name;
        if (!dsmoe__left_by_dead(name, base, blen, tag)) continue;
        dsmoe__remove_tree(dfd, name, 0);
    }
    closedir(d);
    free(dir);
}

/* fsyncs every regular file directly in folder `path`, then the folder. */
static dsmoe_status dsmoe__sync_tree(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return dsmoe__error(DSMOE_STATUS_IO, "cannot open '%s': %s", path, strerror(errno));
    DIR *d = fdopendir(dup(fd));
    dsmoe_status s = DSMOE_OK;
    for (struct dirent *e; d && s == DSMOE_OK && (e = readdir(d)) != NULL;) {
        int f = openat(fd, e->d_name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        struct stat st;
        if (f >= 0 && fstat(f, &st) == 0 && S_ISREG(st.st_mode) && fsync(f) != 0)
            s = dsmoe__error(DSMOE_STATUS_IO, "fsync of '%s/%s' failed: %s", path, e->d_name,
                             strerror(errno));
        if (f >= 0) close(f);
    }
    if (d) closedir(d);
    if (s == DSMOE_OK && fsync(fd) != 0)
        s = dsmoe__error(DSMOE_STATUS_IO, "fsync of '%s' failed: %s", path, strerror(errno));
    close(fd);
    return s;
}

static char *dsmoe__sibling(const char *dest, const char *tag) {
    size_t cap = strlen(dest) + 64;
    char *p = (char *)malloc(cap);
    if (p)
        snprintf(p, cap, "%s.%s.%ld.%u", dest, tag, (long)getpid(),
                 atomic_fetch_add(&dsmoe__tmp_counter, 1u));
    return p;
}

dsmoe_status dsmoe__dir_begin(dsmoe__dir_txn *t, const char *dest) {
    memset(t, 0, sizeof *t);
    if (!dest || !dest[0]) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "folder: empty name");
    dsmoe_status s = dsmoe__dir_recover(dest);
    if (s != DSMOE_OK) return s;
    struct stat st;
    if (lstat(dest, &st) == 0 && !S_ISDIR(st.st_mode))
        return dsmoe__error(DSMOE_STATUS_IO, "'%s' exists and is not a folder", dest);
    dsmoe__remove_stale_dirs(dest, "tmp");
    t->dest = strdup(dest);
    t->tmp = dsmoe__sibling(dest, "tmp");
    if (!t->dest || !t->tmp) {
        dsmoe__dir_abort(t);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "'%s': out of memory", dest);
    }
    if (mkdir(t->tmp, 0777) != 0) {
        s = dsmoe__error(DSMOE_STATUS_IO, "cannot create folder '%s': %s", t->tmp, strerror(errno));
        free(t->tmp);
        t->tmp = NULL;
        dsmoe__dir_abort(t);
        return s;
    }
    return DSMOE_OK;
}

void dsmoe__dir_abort(dsmoe__dir_txn *t) {
    if (!t) return;
    if (t->tmp) dsmoe__remove_tree(AT_FDCWD, t->tmp, 0);
    free(t->tmp);
    free(t->dest);
    memset(t, 0, sizeof *t);
}

/* Swaps two existing folders atomically (Linux renameat2 RENAME_EXCHANGE); -1 with
 * errno where the system or file system cannot. */
static int dsmoe__exchange(const char *a, const char *b) {
#if defined(__linux__) && defined(SYS_renameat2)
    if (dsmoe__dir_force_fallback) {
        errno = EINVAL;
        return -1;
    }
    return (int)syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, 2 /* RENAME_EXCHANGE */);
#else
    (void)a, (void)b;
    errno = ENOSYS;
    return -1;
#endif
}

dsmoe_status dsmoe__dir_commit(dsmoe__dir_txn *t) {
    dsmoe_status s = dsmoe__sync_tree(t->tmp);
    if (s != DSMOE_OK) {
        dsmoe__dir_abort(t);
        return s;
    }
    struct stat st;
    if (lstat(t->dest, &st) != 0) { /* the first save */
        if (rename(t->tmp, t->dest) != 0) {
            s = dsmoe__error(DSMOE_STATUS_IO, "cannot rename '%s' to '%s': %s", t->tmp, t->dest,
                             strerror(errno));
            dsmoe__dir_abort(t);
            return s;
        }
    } else if (dsmoe__exchange(t->tmp, t->dest) != 0) {
        /* Two renames: dest goes aside as "<dest>.old.<pid>.<n>" first; a reader that
         * finds dest missing takes that one back (dsmoe__dir_recover). */
        if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP && errno != EPERM) {
            s = dsmoe__error(DSMOE_STATUS_IO, "cannot replace '%s': %s", t->dest, strerror(errno));
            dsmoe__dir_abort(t);
            return s;
        }
        char *old = dsmoe__sibling(t->dest, "old");
        if (!old || rename(t->dest, old) != 0) {
            s = dsmoe__error(DSMOE_STATUS_IO, "cannot move '%s' aside: %s", t->dest,
                             old ? strerror(errno) : "out of memory");
            free(old);
            dsmoe__dir_abort(t);
            return s;
        }
        if (rename(t->tmp, t->dest) != 0) {
            s = dsmoe__error(DSMOE_STATUS_IO, "cannot rename '%s' to '%s': %s", t->tmp, t->dest,
                             strerror(errno));
            (void)rename(old, t->dest);
            free(old);
            dsmoe__dir_abort(t);
            return s;
        }
        dsmoe__sync_parent(t->dest);
        dsmoe__remove_tree(AT_FDCWD, old, 0);
        free(old);
        free(t->tmp);
        t->tmp = NULL;
    }
    /* after an exchange the old folder is at tmp: remove it */
    dsmoe__sync_parent(t->dest);
    if (t->tmp) dsmoe__remove_tree(AT_FDCWD, t->tmp, 0);
    free(t->tmp);
    free(t->dest);
    memset(t, 0, sizeof *t);
    return DSMOE_OK;
}

dsmoe_status dsmoe__dir_recover(const char *dest) {
    struct stat st;
    if (lstat(dest, &st) == 0) {
        dsmoe__remove_stale_dirs(dest, "old");
        return DSMOE_OK;
    }
    /* dest missing: an interrupted two-rename swap left it at "<dest>.old.<pid>.<n>";
     * the newest such folder (by name order of n is not enough: take any, there is at
     * most one per interrupted save, and saves of one folder do not overlap). */
    size_t dl, ba;
    dsmoe__split(dest, &dl, &ba);
    const char *base = dest + ba;
    size_t blen = strlen(base);
    char *dir = dsmoe__dir_of(dest);
    if (!dir) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "'%s': out of memory", dest);
    DIR *d = opendir(dir);
    char *found = NULL;
    for (struct dirent *e; d && !found && (e = readdir(d)) != NULL;) {
        if (strncmp(e->d_name, base, blen) == 0 && strncmp(e->d_name + blen, ".old.", 5) == 0) {
            size_t cap = strlen(dir) + strlen(e->d_name) + 2;
            found = (char *)malloc(cap);
            if (found) snprintf(found, cap, "%s/%s", dir, e->d_name);
        }
    }
    if (d) closedir(d);
    free(dir);
    dsmoe_status s = DSMOE_OK;
    if (found && rename(found, dest) != 0)
        s = dsmoe__error(DSMOE_STATUS_IO, "cannot restore '%s' from '%s': %s", dest, found,
                         strerror(errno));
    if (found && s == DSMOE_OK) dsmoe__sync_parent(dest);
    free(found);
    return s;
}

dsmoe_status dsmoe__dir_tidy(const char *dest) {
    dsmoe_status s = dsmoe__dir_recover(dest);
    if (s == DSMOE_OK) dsmoe__remove_stale_dirs(dest, "tmp");
    return s;
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
