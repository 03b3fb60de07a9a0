/*
 * test_io_file.c — the file plumbing under both formats: reading pipes, FIFOs and
 * character devices (bounded by what the header declares and by a hard limit, so
 * /dev/zero or an endless stream cannot exhaust memory), and atomic saves (the
 * destination's permission bits kept, symbolic links written through, folders,
 * FIFOs and devices refused, temporary files of a killed save removed by the next
 * save, the old file intact after a SIGKILL in the middle of a save).
 *
 * Everything happens in a folder of its own under DSMOE_TMP. Writers into FIFOs
 * are forked children with an alarm, so a bug cannot hang the test.
 */
#include "io_testutil.h"
#include "io/io_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char g_dir[2048];

/* A path in the test's own folder (a fresh buffer each call: a test keeps fewer than 64 alive). */
static const char *p_(const char *name) {
    static char bufs[64][2048 + 512];
    static int k;
    char *b = bufs[k++ % 64];
    snprintf(b, sizeof bufs[0], "%s/%.500s", g_dir, name);
    return b;
}

static void setup_dir(void) {
    snprintf(g_dir, sizeof g_dir, "%.2000s/test_io_file.d", io_tmp_dir());
    if (mkdir(g_dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "cannot create %s\n", g_dir);
        exit(1);
    }
    /* Leftovers of an earlier, interrupted run. */
    DIR *d = opendir(g_dir);
    for (struct dirent *e; d && (e = readdir(d)) != NULL;)
        if (e->d_name[0] != '.') unlink(p_(e->d_name));
    if (d) closedir(d);
}

/* A small valid .npy image: float32 (2, 3) of the fixture values. */
static unsigned char *npy_image(size_t *len) {
    const char *tmp = p_("image.npy");
    const int64_t shape[2] = {2, 3};
    float v[6];
    io_fixture_values(DSMOE_DTYPE_F32, 6, v);
    if (dsmoe_npy_write_raw(tmp, DSMOE_DTYPE_F32, 2, shape, v) != DSMOE_OK) abort();
    unsigned char *b = io_read_file(tmp, len);
    unlink(tmp);
    return b;
}

/* A small valid safetensors image with two tensors and metadata. */
static unsigned char *st_image(size_t *len) {
    const char *tmp = p_("image.safetensors");
    const int64_t s1[2] = {2, 3}, s2[1] = {5};
    static float a[6];
    static int32_t b[5];
    io_fixture_values(DSMOE_DTYPE_F32, 6, a);
    io_fixture_values(DSMOE_DTYPE_I32, 5, b);
    dsmoe_safetensors_writer *w;
    if (dsmoe_safetensors_writer_create(&w) != DSMOE_OK) abort();
    if (dsmoe_safetensors_writer_add(w, "a", DSMOE_DTYPE_F32, 2, s1, a) != DSMOE_OK ||
        dsmoe_safetensors_writer_add(w, "b", DSMOE_DTYPE_I32, 1, s2, b) != DSMOE_OK ||
        dsmoe_safetensors_writer_set_metadata(w, "format", "pt") != DSMOE_OK ||
        dsmoe_safetensors_writer_save(w, tmp) != DSMOE_OK)
        abort();
    dsmoe_safetensors_writer_free(w);
    unsigned char *img = io_read_file(tmp, len);
    unlink(tmp);
    return img;
}

/* Forks a child that opens `fifo` for writing and writes buf[0..len), then, when
 * `endless`, the byte `fill` forever (until the reader goes away). */
static pid_t fifo_writer(const char *fifo, const void *buf, size_t len, int endless,
                         unsigned char fill) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    alarm(30); /* never outlive a broken test */
    signal(SIGPIPE, SIG_DFL);
    int fd = open(fifo, O_WRONLY);
    if (fd < 0) _exit(2);
    const unsigned char *p = (const unsigned char *)buf;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w <= 0) _exit(3);
        p += w;
        len -= (size_t)w;
    }
    if (endless) {
        static unsigned char chunk[65536];
        memset(chunk, fill, sizeof chunk);
        for (;;)
            if (write(fd, chunk, sizeof chunk) < 0) _exit(0); /* EPIPE: the reader is done */
    }
    close(fd);
    _exit(0);
}

/* Reaps a writer; an endless one that is still blocked is killed first. */
static void reap(pid_t pid) {
    int status;
    if (waitpid(pid, &status, WNOHANG) == 0) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
    }
}

static const char *make_fifo(const char *name) {
    const char *f = p_(name);
    unlink(f);
    if (mkfifo(f, 0600) != 0) {
        TL_FAIL("mkfifo %s: %s", f, strerror(errno));
        return NULL;
    }
    return f;
}

/* Milliseconds since an arbitrary start. */
static double now_ms(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec * 1e3 + (double)tv.tv_usec / 1e3;
}

/* ------------------------------------------------------------- streams -- */

/* A valid file through a FIFO reads exactly as the regular file does. */
static void test_fifo_small_valid_files(void) {
    size_t nlen, slen;
    unsigned char *npy = npy_image(&nlen), *st = st_image(&slen);
    const char *fifo = make_fifo("valid.fifo");
    if (!fifo) return;

    pid_t w = fifo_writer(fifo, npy, nlen, 0, 0);
    dsmoe_array a;
    ASSERT_OK(dsmoe_npy_read(fifo, &a));
    reap(w);
    dsmoe_array want;
    ASSERT_OK(dsmoe_npy_parse(npy, nlen, &want));
    ASSERT_TRUE(a.dtype == want.dtype && a.ndim == 2 && a.shape[0] == 2 && a.shape[1] == 3 &&
                a.nbytes == want.nbytes && memcmp(a.data, want.data, a.nbytes) == 0);
    dsmoe_array_free(&a);
    dsmoe_array_free(&want);

    for (int mode = 0; mode < 2; mode++) { /* mmap fails on a FIFO either way */
        w = fifo_writer(fifo, st, slen, 0, 0);
        dsmoe_safetensors *f = NULL;
        ASSERT_OK(dsmoe__safetensors_open_file(fifo, mode, &f));
        reap(w);
        dsmoe_tensor_view v;
        ASSERT_EQ_INT(dsmoe_safetensors_count(f), 2);
        ASSERT_OK(dsmoe_safetensors_get(f, "b", &v));
        int32_t b[5];
        io_fixture_values(DSMOE_DTYPE_I32, 5, b);
        ASSERT_TRUE(v.nbytes == sizeof b && memcmp(v.data, b, sizeof b) == 0);
        ASSERT_TRUE(dsmoe_safetensors_metadata(f, "format") != NULL);
        dsmoe_safetensors_close(f);
    }
    /* Truncated through a FIFO: the parser's own message, with the path. */
    w = fifo_writer(fifo, st, slen - 3, 0, 0);
    dsmoe_safetensors *f = (dsmoe_safetensors *)(uintptr_t)1;
    ASSERT_STATUS(dsmoe_safetensors_open(fifo, &f), DSMOE_STATUS_FORMAT);
    ASSERT_MSG_HAS("truncated stream", "valid.fifo");
    ASSERT_MSG_HAS("truncated stream", "run past the end");
    ASSERT_TRUE(f == NULL);
    reap(w);
    w = fifo_writer(fifo, npy, nlen - 1, 0, 0);
    ASSERT_STATUS(dsmoe_npy_read(fifo, &a), DSMOE_STATUS_FORMAT);
    ASSERT_MSG_HAS("truncated npy stream", "truncated");
    reap(w);
    unlink(fifo);
    free(npy);
    free(st);
}

/* Endless streams stop at what the header declares: a .npy must end there (an
 * error), a safetensors file's bytes after its last tensor are not read. */
static void test_fifo_endless_streams(void) {
    size_t nlen, slen;
    unsigned char *npy = npy_image(&nlen), *st = st_image(&slen);
    const char *fifo = make_fifo("endless.fifo");
    if (!fifo) return;
    double t0 = now_ms();

    pid_t w = fifo_writer(fifo, npy, nlen, 1, 0x41);
    dsmoe_array a;
    memset(&a, 0x5a, sizeof a);
    ASSERT_STATUS(dsmoe_npy_read(fifo, &a), DSMOE_STATUS_FORMAT);
    ASSERT_MSG_HAS("endless npy", "endless.fifo");
    ASSERT_MSG_HAS("endless npy", "goes on past byte");
    ASSERT_TRUE(io_all_zero(&a, sizeof a));
    reap(w);

    w = fifo_writer(fifo, st, slen, 1, 0x41);
    dsmoe_safetensors *f = NULL;
    ASSERT_OK(dsmoe_safetensors_open(fifo, &f));
    reap(w);
    ASSERT_EQ_INT(dsmoe_safetensors_count(f), 2);
    dsmoe_safetensors_close(f);

    /* Endless garbage after a few valid-looking bytes: the hard limit (small here,
     * 4 GiB by default) stops it, holding at most limit + 1 bytes. */
    w = fifo_writer(fifo, "xyz", 3, 1, 0);
    dsmoe__mapped m;
    dsmoe_clear_error();
    dsmoe_status s = dsmoe__map_file(fifo, 1, NULL, (uint64_t)1 << 20, &m);
    ASSERT_EQ_INT(s, DSMOE_STATUS_FORMAT);
    ASSERT_MSG_HAS("hard limit", "endless.fifo");
    ASSERT_MSG_HAS("hard limit", "1048576-byte limit");
    ASSERT_TRUE(m.data == NULL && m.heap == NULL && m.size == 0);
    reap(w);
    /* A stream that fits the limit is read whole. */
    w = fifo_writer(fifo, npy, nlen, 0, 0);
    ASSERT_OK(dsmoe__map_file(fifo, 1, NULL, nlen, &m));
    ASSERT_TRUE(m.size == nlen && m.heap != NULL && memcmp(m.data, npy, nlen) == 0);
    dsmoe__unmap_file(&m);
    reap(w);
    w = fifo_writer(fifo, npy, nlen, 0, 0);
    ASSERT_EQ_INT(dsmoe__map_file(fifo, 1, NULL, nlen - 1, &m), DSMOE_STATUS_FORMAT);
    reap(w);

    /* A header that declares more than the limit fails before the data is read. */
    static const char hdr[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (2147483648, 4), }";
    unsigned char pre[10 + sizeof hdr];
    memcpy(pre, "\x93NUMPY\x01\x00", 8);
    pre[8] = (unsigned char)(sizeof hdr - 1);
    pre[9] = 0;
    memcpy(pre + 10, hdr, sizeof hdr - 1);
    w = fifo_writer(fifo, pre, 10 + sizeof hdr - 1, 1, 0);
    ASSERT_STATUS(dsmoe_npy_read(fifo, &a), DSMOE_STATUS_FORMAT);
    ASSERT_MSG_HAS("declared above the limit", "above the 4294967296-byte limit");
    reap(w);

    /* All of it is quick: nothing read much more than its header declares. */
    double ms = now_ms() - t0;
    tl_checks++;
    if (ms > 5000) TL_FAIL("the endless streams took %.0f ms", ms);
    unlink(fifo);
    free(npy);
    free(st);
}

/* /dev/zero as either format fails at once ("not a ... file"), naming the path. */
static void test_dev_zero(void) {
    if (access("/dev/zero", R_OK) != 0) {
        fprintf(stderr, "  (no /dev/zero: skipped)\n");
        return;
    }
    dsmoe_array a;
    memset(&a, 0x5a, sizeof a);
    ASSERT_STATUS(dsmoe_npy_read("/dev/zero", &a), DSMOE_STATUS_FORMAT);
    ASSERT_MSG_HAS("/dev/zero as npy", "/dev/zero: not a .npy file");
    ASSERT_TRUE(io_all_zero(&a, sizeof a));
    dsmoe_safetensors *st = (dsmoe_safetensors *)(uintptr_t)1;
    for (int mode = 0; mode < 2; mode++) {
        ASSERT_STATUS(dsmoe__safetensors_open_file("/dev/zero", mode, &st), DSMOE_STATUS_FORMAT);
        ASSERT_MSG_HAS("/dev/zero as safetensors", "/dev/zero: not a safetensors file");
        ASSERT_TRUE(st == NULL);
    }
    /* Without a format to ask, the limit stops it. */
    dsmoe__mapped m;
    ASSERT_EQ_INT(dsmoe__map_file("/dev/zero", 1, NULL, 4096, &m), DSMOE_STATUS_FORMAT);
    ASSERT_MSG_HAS("/dev/zero, no probe", "4096-byte limit");
    ASSERT_TRUE(m.data == NULL);
}

/* ---------------------------------------------------------- atomic saves -- */

static mode_t mode_of(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (st.st_mode & 07777) : (mode_t)-1;
}

/* Saves `path` with each of the three writers that go through the atomic file. */
typedef dsmoe_status (*save_fn)(const char *path);
static dsmoe_status save_npy(const char *path) {
    const int64_t shape[1] = {3};
    const float v[3] = {1, 2, 3};
    return dsmoe_npy_write_raw(path, DSMOE_DTYPE_F32, 1, shape, v);
}
static dsmoe_status save_st(const char *path) {
    const int64_t shape[1] = {2};
    const int32_t v[2] = {7, 8};
    dsmoe_safetensors_writer *w;
    dsmoe_status s = dsmoe_safetensors_writer_create(&w);
    if (s == DSMOE_OK) s = dsmoe_safetensors_writer_add(w, "x", DSMOE_DTYPE_I32, 1, shape, v);
    if (s == DSMOE_OK) s = dsmoe_safetensors_writer_save(w, path);
    dsmoe_safetensors_writer_free(w);
    return s;
}
static dsmoe_status save_balancer(const char *path) {
    dsmoe_balancer_config cfg;
    dsmoe_balancer_config_default(8, &cfg);
    dsmoe_balancer *b;
    dsmoe_status s = dsmoe_balancer_create(&cfg, &b);
    if (s == DSMOE_OK) s = dsmoe_balancer_save(b, path);
    dsmoe_balancer_free(b);
    return s;
}
static const struct {
    const char *name;
    save_fn fn;
} savers[] = {{"npy_write", save_npy}, {"safetensors_writer_save", save_st},
              {"balancer_save", save_balancer}};
#define N_SAVERS (int)(sizeof savers / sizeof savers[0])

/* A replaced file keeps its permission bits, even those the umask would clear;
 * a new file gets 0666 less the umask. */
static void test_atomic_keeps_mode(void) {
    static const mode_t modes[] = {0600, 0640, 0664, 0444};
    mode_t old_mask = umask(022);
    for (int k = 0; k < N_SAVERS; k++) {
        for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
            const char *path = p_("mode.bin");
            unlink(path);
            ASSERT_OK(savers[k].fn(path));
            ASSERT_EQ_INT(mode_of(path), 0644); /* new: 0666 & ~022 */
            ASSERT_TRUE(chmod(path, modes[i]) == 0);
            ASSERT_OK(savers[k].fn(path));
            tl_checks++;
            if (mode_of(path) != modes[i])
                TL_FAIL("%s: mode %04o became %04o", savers[k].name, (unsigned)modes[i],
                        (unsigned)mode_of(path));
            unlink(path);
        }
    }
    /* A umask that would narrow the mode does not. */
    umask(077);
    const char *path = p_("mode_umask.npy");
    ASSERT_OK(save_npy(path));
    ASSERT_EQ_INT(mode_of(path), 0600);
    ASSERT_TRUE(chmod(path, 0664) == 0);
    ASSERT_OK(save_npy(path));
    ASSERT_EQ_INT(mode_of(path), 0664);
    unlink(path);
    umask(old_mask);
    ASSERT_EQ_INT(io_count_tmp_files(g_dir, "mode"), 0);
}

/* Reads an int32 safetensors "x" file's first element, or -1. */
static int first_x(const char *path) {
    dsmoe_safetensors *st;
    if (dsmoe_safetensors_open(path, &st) != DSMOE_OK) return -1;
    dsmoe_tensor_view v;
    int32_t x = -1;
    if (dsmoe_safetensors_get(st, "x", &v) == DSMOE_OK) memcpy(&x, v.data, 4);
    dsmoe_safetensors_close(st);
    return x;
}

static int is_link(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0 && S_ISLNK(st.st_mode);
}

/* A symbolic link is written through: the target is replaced, the link stays. */
static void test_atomic_symlinks(void) {
    const char *target = p_("target.safetensors"), *link = p_("link.safetensors");
    const char *sub = p_("sub"), *deep = p_("sub/deep.safetensors");
    const char *chain = p_("chain.safetensors"), *dangling = p_("dangling.safetensors");
    const char *missing = p_("missing.safetensors"), *loop1 = p_("loop1"), *loop2 = p_("loop2");
    unlink(target);
    unlink(link);
    unlink(deep);
    rmdir(sub);
    unlink(chain);
    unlink(dangling);
    unlink(missing);
    unlink(loop1);
    unlink(loop2);

    ASSERT_TRUE(io_write_file(target, "old", 3));
    ASSERT_TRUE(chmod(target, 0640) == 0);
    ASSERT_TRUE(symlink("target.safetensors", link) == 0); /* relative to the link's folder */
    ASSERT_OK(save_st(link));
    ASSERT_TRUE(is_link(link));
    ASSERT_EQ_INT(first_x(target), 7);
    ASSERT_EQ_INT(mode_of(target), 0640);
    char buf[256];
    ssize_t n = readlink(link, buf, sizeof buf - 1);
    ASSERT_TRUE(n == (ssize_t)strlen("target.safetensors") && memcmp(buf, "target.safetensors", (size_t)n) == 0);

    /* A chain of two links, the second into another folder with a relative target. */
    ASSERT_TRUE(mkdir(sub, 0755) == 0);
    ASSERT_TRUE(io_write_file(deep, "old", 3));
    ASSERT_TRUE(symlink("sub/deep.safetensors", chain) == 0);
    ASSERT_TRUE(unlink(link) == 0 && symlink("chain.safetensors", link) == 0);
    ASSERT_OK(save_st(link));
    ASSERT_TRUE(is_link(link) && is_link(chain));
    ASSERT_EQ_INT(first_x(deep), 7);
    ASSERT_EQ_INT(io_count_tmp_files(sub, "deep"), 0);
    ASSERT_EQ_INT(io_count_tmp_files(g_dir, "chain"), 0);

    /* A dangling link: its target is created, the link stays. */
    ASSERT_TRUE(symlink("missing.safetensors", dangling) == 0);
    ASSERT_OK(save_st(dangling));
    ASSERT_TRUE(is_link(dangling));
    ASSERT_EQ_INT(first_x(missing), 7);

    /* A loop: IO, clearly, and nothing created. */
    ASSERT_TRUE(symlink("loop2", loop1) == 0 && symlink("loop1", loop2) == 0);
    ASSERT_STATUS(save_npy(loop1), DSMOE_STATUS_IO);
    ASSERT_MSG_HAS("link loop", "symbolic links");
    ASSERT_MSG_HAS("link loop", "loop1");
    ASSERT_TRUE(is_link(loop1) && is_link(loop2));
    ASSERT_EQ_INT(io_count_tmp_files(g_dir, "loop"), 0);

    unlink(loop1);
    unlink(loop2);
    unlink(dangling);
    unlink(missing);
    unlink(link);
    unlink(chain);
    unlink(deep);
    rmdir(sub);
    unlink(target);
}

/* A folder, a FIFO or a device as the destination is refused before writing. */
static void test_atomic_refuses_non_regular(void) {
    const char *fifo = make_fifo("dest.fifo");
    if (fifo) {
        for (int k = 0; k < N_SAVERS; k++) {
            ASSERT_STATUS(savers[k].fn(fifo), DSMOE_STATUS_IO);
            ASSERT_MSG_HAS(savers[k].name, "dest.fifo");
            ASSERT_MSG_HAS(savers[k].name, "a pipe or FIFO");
        }
        struct stat st;
        ASSERT_TRUE(lstat(fifo, &st) == 0 && S_ISFIFO(st.st_mode));
        /* Through a link to it too. */
        const char *link = p_("to_fifo");
        unlink(link);
        ASSERT_TRUE(symlink("dest.fifo", link) == 0);
        ASSERT_STATUS(save_npy(link), DSMOE_STATUS_IO);
        ASSERT_MSG_HAS("link to a FIFO", "a pipe or FIFO");
        unlink(link);
        unlink(fifo);
    }
    /* /dev/null stays a device (a save run as root would otherwise replace it). */
    struct stat before, after;
    if (stat("/dev/null", &before) == 0 && S_ISCHR(before.st_mode)) {
        ASSERT_STATUS(save_npy("/dev/null"), DSMOE_STATUS_IO);
        ASSERT_MSG_HAS("/dev/null", "a character device");
        ASSERT_TRUE(stat("/dev/null", &after) == 0 && S_ISCHR(after.st_mode) &&
                    after.st_rdev == before.st_rdev);
    }
    ASSERT_EQ_INT(io_count_tmp_files(g_dir, "dest"), 0);
}

/* A rename that fails at commit removes the temporary file and names both paths. */
static void test_atomic_rename_failure(void) {
    const char *path = p_("becomes_a_folder");
    rmdir(path);
    unlink(path);
    dsmoe__atomic_file f;
    ASSERT_OK(dsmoe__atomic_open(&f, path));
    ASSERT_OK(dsmoe__atomic_write(&f, "abc", 3));
    ASSERT_EQ_INT(io_count_tmp_files(g_dir, "becomes_a_folder"), 1);
    ASSERT_TRUE(mkdir(path, 0755) == 0);
    ASSERT_STATUS(dsmoe__atomic_commit(&f), DSMOE_STATUS_IO);
    ASSERT_MSG_HAS("rename onto a folder", "rename");
    ASSERT_MSG_HAS("rename onto a folder", "becomes_a_folder");
    ASSERT_EQ_INT(io_count_tmp_files(g_dir, "becomes_a_folder"), 0);
    dsmoe__atomic_abort(&f); /* harmless after commit */
    ASSERT_TRUE(rmdir(path) == 0);
}

/* The pid of a process that has exited and been reaped. */
static pid_t dead_pid(void) {
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    waitpid(pid, NULL, 0);
    return pid;
}

static int exists(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0;
}

/* Stale temporary files of this destination's exact pattern are removed when
 * their process is gone and their lock is free; nothing else is touched. */
static void test_stale_tmp_cleanup(void) {
    const char *dest = p_("stale.npy");
    ASSERT_OK(save_npy(dest));
    pid_t dead = dead_pid();
    char n_dead[64], n_live1[64], n_self[64], n_other[64], n_bad1[64], n_bad2[64], n_bad3[64],
        n_locked[64];
    snprintf(n_dead, sizeof n_dead, "stale.npy.tmp.%ld.7", (long)dead);
    snprintf(n_live1, sizeof n_live1, "stale.npy.tmp.1.3");
    snprintf(n_self, sizeof n_self, "stale.npy.tmp.%ld.99", (long)getpid());
    snprintf(n_other, sizeof n_other, "other.npy.tmp.%ld.7", (long)dead);
    snprintf(n_bad1, sizeof n_bad1, "stale.npy.tmp.%ld.7.bak", (long)dead);
    snprintf(n_bad2, sizeof n_bad2, "stale.npy.tmp.%ldx.7", (long)dead);
    snprintf(n_bad3, sizeof n_bad3, "stale.npy.tmp.%ld.", (long)dead);
    const char *names[] = {n_dead, n_live1, n_self, n_other, n_bad1, n_bad2, n_bad3};
    const int removed[] = {1, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < 7; i++) ASSERT_TRUE(io_write_file(p_(names[i]), "junk", 4));

    /* A stale-looking file whose lock a live process holds (a writer in another
     * pid namespace or on another host looks like this) is kept. */
    pid_t dead2 = dead_pid();
    snprintf(n_locked, sizeof n_locked, "stale.npy.tmp.%ld.8", (long)dead2);
    const char *locked = p_(n_locked);
    ASSERT_TRUE(io_write_file(locked, "junk", 4));
    int ready[2];
    ASSERT_TRUE(pipe(ready) == 0);
    pid_t holder = fork();
    if (holder == 0) {
        alarm(30);
        int fd = open(locked, O_WRONLY);
        struct flock lk;
        memset(&lk, 0, sizeof lk);
        lk.l_type = F_WRLCK;
        lk.l_whence = SEEK_SET;
        char c = fd >= 0 && fcntl(fd, F_SETLK, &lk) == 0 ? 'y' : 'n';
        if (write(ready[1], &c, 1) != 1) _exit(1);
        pause();
        _exit(0);
    }
    char c = 0;
    ASSERT_TRUE(read(ready[0], &c, 1) == 1 && c == 'y');

    ASSERT_OK(save_npy(dest));
    for (int i = 0; i < 7; i++) {
        tl_checks++;
        if (exists(p_(names[i])) == removed[i])
            TL_FAIL("%s: %s", names[i], removed[i] ? "not removed" : "removed");
    }
    ASSERT_TRUE(exists(locked));
    kill(holder, SIGKILL);
    waitpid(holder, NULL, 0);
    close(ready[0]);
    close(ready[1]);
    /* Lock gone with its process: the next save removes it. */
    ASSERT_OK(save_npy(dest));
    ASSERT_TRUE(!exists(locked));
    for (int i = 1; i < 7; i++) unlink(p_(names[i]));
    unlink(dest);
}

static int read_npy_first(const char *path, float *v) {
    dsmoe_array a;
    if (dsmoe_npy_read(path, &a) != DSMOE_OK) return 0;
    int ok = a.dtype == DSMOE_DTYPE_F32 && a.nbytes >= 4;
    if (ok) memcpy(v, a.data, 4);
    dsmoe_array_free(&a);
    return ok;
}

/* SIGKILL in the middle of a save leaves the old file intact and a temporary
 * file that the next save removes. */
static void test_kill_mid_save(void) {
    const char *dest = p_("killed.npy");
    const int64_t shape[1] = {3};
    const float old[3] = {1, 2, 3};
    ASSERT_OK(dsmoe_npy_write_raw(dest, DSMOE_DTYPE_F32, 1, shape, old));

    /* Deterministic: the child stops inside the save, between two writes. */
    int ready[2];
    ASSERT_TRUE(pipe(ready) == 0);
    pid_t child = fork();
    if (child == 0) {
        alarm(30);
        dsmoe__atomic_file f;
        static unsigned char half[1 << 20];
        memset(half, 0x7f, sizeof half);
        char c = dsmoe__atomic_open(&f, dest) == DSMOE_OK &&
                         dsmoe__atomic_write(&f, half, sizeof half) == DSMOE_OK
                     ? 'y'
                     : 'n';
        if (write(ready[1], &c, 1) != 1) _exit(1);
        pause();
        _exit(0);
    }
    char c = 0;
    ASSERT_TRUE(read(ready[0], &c, 1) == 1 && c == 'y');
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    close(ready[0]);
    close(ready[1]);
    float v = 0;
    ASSERT_TRUE(read_npy_first(dest, &v) && v == 1.0f);
    ASSERT_EQ_INT(io_count_tmp_files(g_dir, "killed.npy"), 1);
    const float fresh[3] = {4, 5, 6};
    ASSERT_OK(dsmoe_npy_write_raw(dest, DSMOE_DTYPE_F32, 1, shape, fresh));
    ASSERT_EQ_INT(io_count_tmp_files(g_dir, "killed.npy"), 0);
    ASSERT_TRUE(read_npy_first(dest, &v) && v == 4.0f);

    /* Through the public API at an arbitrary moment: the file is always one whole
     * version or the other. */
    enum { BIG = 4 << 20 };
    float *data = (float *)malloc(BIG * sizeof(float));
    for (int round = 0; round < 4; round++) {
        pid_t saver = fork();
        if (saver == 0) {
            alarm(30);
            for (int i = 0; i < BIG; i++) data[i] = 9.0f;
            const int64_t big[1] = {BIG};
            for (;;) dsmoe_npy_write_raw(dest, DSMOE_DTYPE_F32, 1, big, data);
        }
        struct timespec ts = {0, 20000000L + 15000000L * round};
        nanosleep(&ts, NULL);
        kill(saver, SIGKILL);
        waitpid(saver, NULL, 0);
        ASSERT_TRUE(read_npy_first(dest, &v) && (v == 4.0f || v == 9.0f));
    }
    free(data);
    ASSERT_OK(dsmoe_npy_write_raw(dest, DSMOE_DTYPE_F32, 1, shape, fresh));
    ASSERT_EQ_INT(io_count_tmp_files(g_dir, "killed.npy"), 0);
    unlink(dest);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN); /* a reader that stops early must not kill the test */
    setup_dir();
    RUN(test_fifo_small_valid_files);
    RUN(test_fifo_endless_streams);
    RUN(test_dev_zero);
    RUN(test_atomic_keeps_mode);
    RUN(test_atomic_symlinks);
    RUN(test_atomic_refuses_non_regular);
    RUN(test_atomic_rename_failure);
    RUN(test_stale_tmp_cleanup);
    RUN(test_kill_mid_save);
    rmdir(g_dir);
    return TEST_SUMMARY();
}
