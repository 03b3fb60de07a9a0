/*
 * test_io_dirtxn.c — replacing whole folders (checkpoints) atomically
 * (dsmoe__dir_begin / _commit / _abort / _recover in src/io/io_file.c): contents
 * replaced, nothing left behind, stale temporary folders of dead processes removed and
 * live ones kept, failures leave the old folder, and a process killed with SIGKILL at
 * random moments while saving over and over always leaves one complete generation, on
 * both the exchange path and the two-rename fallback.
 */
#include "io/io_internal.h"
#include "testlib.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char g_dest[4096];

static void put_file(const char *dir, const char *name, unsigned gen, size_t n) {
    char path[8192];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) {
        TL_FAIL("cannot write %s", path);
        return;
    }
    for (size_t i = 0; i < n; i += sizeof gen) fwrite(&gen, sizeof gen, 1, f);
    fclose(f);
}

/* The generation all files of dest agree on, -1 if they disagree or are incomplete,
 * -2 if dest is missing. */
static long folder_generation(const char *dest, size_t n) {
    struct stat st;
    if (stat(dest, &st) != 0) return -2;
    long gen = -1;
    const char *names[3] = {"a.bin", "b.bin", "c.bin"};
    for (int k = 0; k < 3; k++) {
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", dest, names[k]);
        FILE *f = fopen(path, "rb");
        if (!f) return -1;
        unsigned *buf = (unsigned *)malloc(n + 8);
        size_t got = fread(buf, 1, n + 8, f);
        fclose(f);
        long g = got == n ? (long)buf[0] : -1;
        for (size_t i = 0; g >= 0 && i < n / sizeof(unsigned); i++)
            if (buf[i] != (unsigned)g) g = -1;
        free(buf);
        if (g < 0 || (k > 0 && g != gen)) return -1;
        gen = g;
    }
    return gen;
}

/* Names next to dest of the form "<base>.<anything>". */
static int leftovers(const char *dest) {
    const char *base = strrchr(dest, '/') + 1;
    char dir[4096];
    snprintf(dir, sizeof dir, "%.*s", (int)(base - dest - 1), dest);
    DIR *d = opendir(dir);
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d)) != NULL;)
        if (strncmp(e->d_name, base, strlen(base)) == 0 && e->d_name[strlen(base)] == '.') n++;
    if (d) closedir(d);
    return n;
}

static int save(const char *dest, unsigned gen, size_t n) {
    dsmoe__dir_txn t;
    if (dsmoe__dir_begin(&t, dest) != DSMOE_OK) return 0;
    put_file(t.tmp, "a.bin", gen, n);
    put_file(t.tmp, "b.bin", gen, n);
    put_file(t.tmp, "c.bin", gen, n);
    return dsmoe__dir_commit(&t) == DSMOE_OK;
}

static void test_replace(void) {
    for (int fb = 0; fb < 2; fb++) {
        dsmoe__dir_force_fallback = fb;
        snprintf(g_dest, sizeof g_dest, "%s", tl_tmp(fb ? "ckpt_replace_fb" : "ckpt_replace"));
        for (unsigned g = 1; g <= 3; g++) {
            ASSERT_TRUE(save(g_dest, g, 4096));
            ASSERT_EQ_INT(folder_generation(g_dest, 4096), g);
            ASSERT_EQ_INT(leftovers(g_dest), 0);
        }
        /* abort leaves the old folder and no temporary one */
        dsmoe__dir_txn t;
        ASSERT_OK(dsmoe__dir_begin(&t, g_dest));
        put_file(t.tmp, "a.bin", 9, 4096);
        dsmoe__dir_abort(&t);
        ASSERT_EQ_INT(folder_generation(g_dest, 4096), 3);
        ASSERT_EQ_INT(leftovers(g_dest), 0);
    }
    dsmoe__dir_force_fallback = 0;
}

static void test_stale_and_refusals(void) {
    snprintf(g_dest, sizeof g_dest, "%s", tl_tmp("ckpt_stale"));
    ASSERT_TRUE(save(g_dest, 1, 64));
    /* a dead process's temporary folder (with a file) goes, a live one's stays */
    pid_t child = fork();
    if (child == 0) _exit(0);
    waitpid(child, NULL, 0);
    char dead[4200], live[4200];
    snprintf(dead, sizeof dead, "%s.tmp.%ld.7", g_dest, (long)child);
    snprintf(live, sizeof live, "%s.tmp.%ld.7", g_dest, (long)getppid());
    mkdir(dead, 0700);
    put_file(dead, "a.bin", 5, 64);
    mkdir(live, 0700);
    ASSERT_TRUE(save(g_dest, 2, 64));
    struct stat st;
    ASSERT_TRUE(stat(dead, &st) != 0 && stat(live, &st) == 0);
    rmdir(live);
    /* a file where the folder should be */
    const char *file = tl_tmp("ckpt_is_a_file");
    FILE *f = fopen(file, "w");
    fclose(f);
    dsmoe__dir_txn t;
    ASSERT_STATUS(dsmoe__dir_begin(&t, file), DSMOE_STATUS_IO);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "not a folder") != NULL);
    ASSERT_STATUS(dsmoe__dir_begin(&t, tl_tmp("no/such/parent/ckpt")), DSMOE_STATUS_IO);
    /* recover: dest missing, an ".old" folder present */
    snprintf(dead, sizeof dead, "%s.old.%ld.3", g_dest, (long)child);
    ASSERT_TRUE(rename(g_dest, dead) == 0);
    ASSERT_OK(dsmoe__dir_recover(g_dest));
    ASSERT_EQ_INT(folder_generation(g_dest, 64), 2);
    ASSERT_EQ_INT(leftovers(g_dest), 0);
    /* tidy: a dead writer's folder left between a commit's exchange and its removal of
     * the old one (dest whole) goes without a save; recover alone leaves it; a live
     * process's stays */
    snprintf(dead, sizeof dead, "%s.tmp.%ld.9", g_dest, (long)child);
    mkdir(dead, 0700);
    put_file(dead, "a.bin", 1, 64);
    mkdir(live, 0700);
    ASSERT_OK(dsmoe__dir_recover(g_dest));
    ASSERT_TRUE(stat(dead, &st) == 0);
    ASSERT_OK(dsmoe__dir_tidy(g_dest));
    ASSERT_TRUE(stat(dead, &st) != 0 && stat(live, &st) == 0);
    ASSERT_EQ_INT(folder_generation(g_dest, 64), 2);
    rmdir(live);
    ASSERT_EQ_INT(leftovers(g_dest), 0);
}

/* A child saves generations 1, 2, 3, ... as fast as it can; it is killed at a random
 * moment; the folder must then hold exactly one complete generation. */
static void kill_during_saves(int fallback, int rounds) {
    const size_t n = 256 * 1024;
    unsigned seed = (unsigned)time(NULL);
    int survived = 0;
    for (int r = 0; r < rounds; r++) {
        snprintf(g_dest, sizeof g_dest, "%s", tl_tmp(fallback ? "ckpt_kill_fb" : "ckpt_kill"));
        int pipefd[2];
        if (pipe(pipefd) != 0) return;
        pid_t pid = fork();
        if (pid == 0) {
            close(pipefd[0]);
            dsmoe__dir_force_fallback = fallback;
            for (unsigned g = 1;; g++) {
                if (!save(g_dest, g, n)) _exit(3);
                if (g == 1 && write(pipefd[1], "1", 1) != 1) _exit(4);
            }
        }
        close(pipefd[1]);
        char c;
        ASSERT_TRUE(read(pipefd[0], &c, 1) == 1); /* the first generation is complete */
        close(pipefd[0]);
        struct timespec ts = {0, (long)(rand_r(&seed) % 40000) * 1000L};
        nanosleep(&ts, NULL);
        kill(pid, SIGKILL);
        int status;
        waitpid(pid, &status, 0);
        if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)) {
            TL_FAIL("saver exited on its own (status %d)", status);
            continue;
        }
        ASSERT_OK(dsmoe__dir_recover(g_dest)); /* what a reader does first */
        long g = folder_generation(g_dest, n);
        if (g < 1) TL_FAIL("round %d: no complete generation after the kill (%ld)", r, g);
        else survived++;
        /* the next save cleans up what the killed one left */
        ASSERT_TRUE(save(g_dest, 1000, 64));
        ASSERT_EQ_INT(leftovers(g_dest), 0);
    }
    ASSERT_EQ_INT(survived, rounds);
}

static void test_kill_exchange(void) { kill_during_saves(0, 12); }
static void test_kill_fallback(void) { kill_during_saves(1, 12); }

int main(void) {
    RUN(test_replace);
    RUN(test_stale_and_refusals);
    RUN(test_kill_exchange);
    RUN(test_kill_fallback);
    return TEST_SUMMARY();
}
