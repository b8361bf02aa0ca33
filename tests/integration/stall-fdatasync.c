/* SPDX-License-Identifier: MIT */
/*
 * LD_PRELOAD shim for test-workers: a disk that stops answering. While the
 * file named by AB_STALL_FILE exists, fdatasync() and fsync() wait for it to
 * go away, then do the real call. Nothing else changes.
 */
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int fdatasync(int fd);
int fsync(int fd);

static void stall(void)
{
        const char *f = getenv("AB_STALL_FILE");
        struct timespec ts = { .tv_sec = 0, .tv_nsec = 10 * 1000 * 1000 };

        while (f && access(f, F_OK) == 0)
                nanosleep(&ts, NULL);
}

int fdatasync(int fd)
{
        int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
        stall();
        return real(fd);
}

int fsync(int fd)
{
        int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
        stall();
        return real(fd);
}
