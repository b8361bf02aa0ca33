/* SPDX-License-Identifier: MIT */
/*
 * Who is calling: everything here comes from the kernel (socket peer
 * credentials, a pidfd, /proc), never from what the client says.
 */
#ifndef AB_ATTEST_H
#define AB_ATTEST_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>

#define AB_MAX_GROUPS 64
#define AB_EXE_MAX 4096
#define AB_UNIT_MAX 256
#define AB_CGROUP_MAX 1024

typedef struct ab_peer_cache ab_peer_cache;

/* What is known about a connected peer from the moment it connected. */
typedef struct ab_peer {
        uid_t uid;
        gid_t gid;
        pid_t pid;
        uid_t charge_uid;    /* whose connection and rate limits it counts against: uid, or the
                                real uid of a setuid-root program (su run by a user) */
        int pidfd;           /* refers to the connecting process, never a recycled PID */
        bool pidfd_exact;    /* from SO_PEERPIDFD (exact) rather than pidfd_open (racy) */
        uint64_t proc_ino;   /* the pidfd's inode on pidfs: one process's for the whole boot; 0: no pidfs */
        int n_groups;
        gid_t groups[AB_MAX_GROUPS]; /* supplementary groups at connect time */
        ab_peer_cache *cache;        /* identity read earlier, see ab_attest (lazy) */
} ab_peer;

/* The identity of a peer process, re-read for each request. */
typedef struct ab_identity {
        uid_t uid;
        gid_t gid;
        pid_t pid;
        uint64_t start_time;          /* /proc/PID/stat starttime (clock ticks after boot) */
        char exe[AB_EXE_MAX];         /* path for display; may end " (deleted)" */
        bool foreign_userns;          /* in a user namespace other than the broker's: it may have
                                         mounted another file at any path */
        bool exe_known;               /* the broker identified the file the process runs: */
        dev_t exe_dev;                /* its device and inode (stat of /proc/PID/exe) */
        ino_t exe_ino;
        char sha256[65];              /* hex, "" when not computed (too large, unreadable) */
        char unit[AB_UNIT_MAX];       /* systemd unit, "" if none */
        char cgroup[AB_CGROUP_MAX];   /* cgroup path, "" if none */
        const ab_peer *peer;
} ab_identity;

typedef struct ab_exe_cache ab_exe_cache;

/* A bounded cache of executable hashes keyed by (dev, ino, size, mtime). */
int ab_exe_cache_new(uint64_t max_exe_size, ab_exe_cache **ret);
void ab_exe_cache_free(ab_exe_cache *c);

/*
 * Read the peer credentials of a connected AF_UNIX socket and take a pidfd
 * for the peer. Returns 0, or -errno (the peer is gone or not local).
 */
int ab_peer_from_socket(int fd, ab_peer *ret);
void ab_peer_done(ab_peer *p);

/*
 * Attest a peer: read its executable (hashing the file opened through
 * /proc/PID/exe, not the path), unit and cgroup, then check through the
 * pidfd that the process is still the one that connected. Returns 0,
 * -ESRCH (the peer exited or its PID may have been recycled), or -errno.
 * /proc_root is normally "/proc" (tests may point elsewhere).
 */
int ab_attest(ab_peer *p, ab_exe_cache *cache, ab_identity *ret);
/*
 * ab_attest() returns -EINPROGRESS when the executable is not in the cache
 * yet (a new program, or the file changed): hashing it may take seconds
 * (up to the cache's maximum size), so it is the caller's to do off the
 * event loop. ab_attest_take_hash() hands over the file, open and as
 * fstat() saw it (the caller closes it); ab_exe_hash_fd() hashes it (in any
 * thread; cancel, when set, stops it); ab_exe_cache_put() keeps the result
 * unless the file changed meanwhile. Then ab_attest() again finds it. A
 * file handed over and still not in the cache at the very next call is not
 * handed over again then: that call is attested without the hash (and the
 * one after asks again), so a file that cannot be hashed never makes a
 * call wait for ever.
 */
int ab_attest_take_hash(ab_peer *p, int *ret_fd, struct stat *ret_st);
/* Close the file ab_attest() left to hash (this connection waits for another one's hash first). */
void ab_attest_drop_hash(ab_peer *p);
/*
 * The hash of the file as st describes it, for this peer: ab_attest() uses
 * it while the file is unchanged, also once another file has pushed it out
 * of the shared cache.
 */
void ab_attest_hash_known(ab_peer *p, const struct stat *st, const char hex[65]);
int ab_exe_hash_fd(int fd, uint64_t size, const atomic_bool *cancel, char out[65]);
/* 0, or -ESTALE: the file changed while it was hashed (nothing kept). */
int ab_exe_cache_put(ab_exe_cache *c, int fd, const struct stat *st, const char hex[65]);

/* true if gid is among the peer's supplementary groups */
static inline bool ab_peer_in_group(const ab_peer *p, gid_t gid)
{
        for (int i = 0; i < p->n_groups; i++)
                if (p->groups[i] == gid)
                        return true;
        return false;
}

/*
 * 0 if the pidfd's process still exists, -ESRCH if not: pidfd_send_signal(0),
 * or poll() on the pidfd where that cannot tell (ENOSYS under valgrind,
 * EPERM without CAP_KILL or from seccomp); see attest.c.
 */
int ab_peer_alive(const ab_peer *p);

/*
 * Is the process pid with this start time (/proc/PID/stat, clock ticks
 * after boot) still there (a zombie counts)? A recycled pid has another
 * start time. For housekeeping of records bound to processes.
 */
bool ab_process_running(pid_t pid, uint64_t start_time);

#endif
