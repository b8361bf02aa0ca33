/* SPDX-License-Identifier: MIT */
/*
 * LD_PRELOAD shim for test-workers: a disk that stops answering. While the
 * file named by AB_STALL_FILE exists, fdatasync() and fsync() wait for it to
 * go away, then do the real call. With AB_STALL_MATCH set, only for files
 * whose path contains it (the audit file, while LMDB's commits go on).
 * Nothing else changes.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int fdatasync(int fd);
int fsync(int fd);

static int matches(int fd)
{
        const char *m = getenv("AB_STALL_MATCH");
        char link[64], path[4096];
        ssize_t n;

        if (!m)
                return 1;
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        n = readlink(link, path, sizeof path - 1);
        if (n <= 0)
                return 0;
        path[n] = '\0';
        return strstr(path, m) != NULL;
}

static void stall(int fd)
{
        const char *f = getenv("AB_STALL_FILE");
        struct timespec ts = { .tv_sec = 0, .tv_nsec = 10 * 1000 * 1000 };

        while (f && matches(fd) && access(f, F_OK) == 0)
                nanosleep(&ts, NULL);
}

int fdatasync(int fd)
{
        int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
        stall(fd);
        return real(fd);
}

int fsync(int fd)
{
        int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
        stall(fd);
        return real(fd);
}
