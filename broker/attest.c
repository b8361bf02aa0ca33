/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <sodium.h>
#include <systemd/sd-login.h>
#include "attest.h"
#include "../common/util.h"

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
#ifndef SO_PEERGROUPS
#define SO_PEERGROUPS 59
#endif
#ifndef PIDFD_NONBLOCK
#define PIDFD_NONBLOCK O_NONBLOCK
#endif

#define CACHE_SLOTS 256

/*
 * A file as stat() saw it. Another exec gives another inode; a rewrite
 * changes the size, mtime or ctime (and ctime cannot be set from user
 * space, unlike mtime).
 */
typedef struct file_id {
        dev_t dev;
        ino_t ino;
        off_t size;
        struct timespec mtime, ctime;
} file_id;

static file_id file_id_of(const struct stat *st)
{
        return (file_id){ .dev = st->st_dev, .ino = st->st_ino, .size = st->st_size, .mtime = st->st_mtim,
                          .ctime = st->st_ctim };
}

static bool file_id_is(const file_id *id, const struct stat *st)
{
        return id->dev == st->st_dev && id->ino == st->st_ino && id->size == st->st_size &&
               id->mtime.tv_sec == st->st_mtim.tv_sec && id->mtime.tv_nsec == st->st_mtim.tv_nsec &&
               id->ctime.tv_sec == st->st_ctim.tv_sec && id->ctime.tv_nsec == st->st_ctim.tv_nsec;
}

typedef struct cache_entry {
        file_id id;
        bool used;
        char sha256[65];
} cache_entry;

#define PROC_SLOTS 128

/* What attestation read about a process, for its next connections (see proc_lookup). */
typedef struct proc_entry {
        pid_t pid;
        uint64_t proc_ino; /* see ab_peer.proc_ino; 0: unknown */
        uint64_t start_time;
        file_id id; /* the executable */
        char *exe; /* NULL: empty slot */
        char sha256[65];
        char unit[AB_UNIT_MAX];
        char cgroup[AB_CGROUP_MAX];
} proc_entry;

struct ab_exe_cache {
        uint64_t max_size;
        cache_entry slot[CACHE_SLOTS];
        proc_entry proc[PROC_SLOTS]; /* by pid, one per slot: a newer process replaces an older one */
};

int ab_exe_cache_new(uint64_t max_exe_size, ab_exe_cache **ret)
{
        ab_exe_cache *c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->max_size = max_exe_size;
        *ret = c;
        return 0;
}

void ab_exe_cache_free(ab_exe_cache *c)
{
        if (!c)
                return;
        for (size_t i = 0; i < PROC_SLOTS; i++)
                free(c->proc[i].exe);
        free(c);
}

static int sys_pidfd_open(pid_t pid, unsigned flags)
{
        return (int)syscall(SYS_pidfd_open, pid, flags);
}

static int sys_pidfd_send_signal(int pidfd, int sig)
{
        return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

#ifndef PIDFS_MAGIC
#define PIDFS_MAGIC 0x50494446
#endif

/*
 * On pidfs (Linux 6.9 and later) a pidfd's inode number is its process's
 * own: given once from a 64-bit counter, never again in this boot, so a
 * recycled PID comes with another one. Whether pidfds live on pidfs is
 * asked once. 0 when they do not (or fstat fails).
 */
static uint64_t pidfs_ino(int pidfd)
{
        static int on_pidfs = -1;
        struct stat st;

        if (on_pidfs == 0 || fstat(pidfd, &st) < 0)
                return 0;
        if (on_pidfs < 0) {
                struct statfs sf;
                on_pidfs = fstatfs(pidfd, &sf) == 0 && sf.f_type == PIDFS_MAGIC && sizeof st.st_ino >= 8;
                if (!on_pidfs)
                        return 0;
        }
        return (uint64_t)st.st_ino;
}

/* The start of /proc/PID/what, NUL-terminated, in buf[0..max): 0 or -errno. */
static int read_proc(pid_t pid, const char *what, char *buf, size_t max)
{
        char path[64];
        ssize_t n;
        int fd;

        snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, what);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        n = read(fd, buf, max - 1);
        ab_close(fd);
        if (n <= 0)
                return -EIO;
        buf[n] = '\0';
        return 0;
}

/*
 * The real uid of process pid, from the "Uid:" line of /proc/PID/status
 * (real, effective, saved, fs); -1 if it cannot be read.
 */
static long long real_uid_of(pid_t pid)
{
        char buf[2048], *l;
        long long ruid;

        if (read_proc(pid, "status", buf, sizeof buf) < 0)
                return -1;
        l = strstr(buf, "\nUid:\t");
        if (!l || sscanf(l + 6, "%lld", &ruid) != 1 || ruid < 0 || ruid > UINT32_MAX)
                return -1;
        return ruid;
}

int ab_peer_from_socket(int fd, ab_peer *ret)
{
        struct ucred uc;
        socklen_t len = sizeof uc;
        ab_peer p = { .pidfd = -1 };
        int pidfd = -1;

        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &len) < 0)
                return -errno;
        if (len != sizeof uc || uc.pid <= 0)
                return -ENOTCONN;
        p.uid = uc.uid;
        p.gid = uc.gid;
        p.pid = uc.pid;

        len = sizeof pidfd;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) == 0 && pidfd >= 0) {
                p.pidfd_exact = true;
        } else {
                /* Older kernels: racy between connect and here, so the
                 * identity read below is still re-checked against the pidfd. */
                pidfd = sys_pidfd_open(uc.pid, 0);
                if (pidfd < 0)
                        return errno == ESRCH ? -ESRCH : -errno;
        }
        /* both hand out pidfds with O_CLOEXEC set */
        p.pidfd = pidfd;
        p.proc_ino = pidfs_ino(pidfd);

        /*
         * A setuid-root program (su, sudo, a PAM consumer) that a user
         * starts and stops (SIGSTOP) after it connects would hold root's
         * connections and spend root's rate budget: such a connection
         * counts against the user who started it. Identity and policy
         * still see uid 0. Read only for euid 0, and kept only if the
         * process still runs after the read (so the pid was not recycled).
         */
        p.charge_uid = p.uid;
        if (p.uid == 0) {
                long long ruid = real_uid_of(p.pid);
                if (ruid > 0 && ab_peer_alive(&p) == 0)
                        p.charge_uid = (uid_t)ruid;
        }

        len = sizeof p.groups;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, p.groups, &len) == 0)
                p.n_groups = (int)(len / sizeof(gid_t));
        else
                p.n_groups = 0; /* more than AB_MAX_GROUPS (ERANGE): match on gid only */
        *ret = p;
        return 0;
}

static void drop_pending(ab_peer_cache *pc);

void ab_peer_done(ab_peer *p)
{
        if (p->pidfd >= 0)
                close(p->pidfd);
        p->pidfd = -1;
        if (p->cache)
                drop_pending(p->cache);
        free(p->cache);
        p->cache = NULL;
}

static cache_entry *cache_lookup(ab_exe_cache *c, const struct stat *st)
{
        uint64_t h = (uint64_t)st->st_dev * 0x9e3779b97f4a7c15ull ^ (uint64_t)st->st_ino * 0xc2b2ae3d27d4eb4full ^
                     (uint64_t)st->st_mtim.tv_nsec ^ (uint64_t)st->st_size;
        return &c->slot[(h ^ (h >> 29)) % CACHE_SLOTS];
}

static bool same_file(const cache_entry *e, const struct stat *st)
{
        return e->used && file_id_is(&e->id, st);
}

int ab_exe_hash_fd(int fd, uint64_t size, const atomic_bool *cancel, char out[65])
{
        crypto_hash_sha256_state st;
        uint8_t digest[crypto_hash_sha256_BYTES];
        static __thread uint8_t buf[1 << 16];
        uint64_t total = 0;

        crypto_hash_sha256_init(&st);
        for (;;) {
                ssize_t n = pread(fd, buf, sizeof buf, (off_t)total);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (n == 0)
                        break;
                if (cancel && atomic_load(cancel))
                        return -ECANCELED;
                total += (uint64_t)n;
                if (total > size)
                        return -EFBIG; /* grew while we read: do not trust */
                crypto_hash_sha256_update(&st, buf, (unsigned long long)n);
        }
        crypto_hash_sha256_final(&st, digest);
        sodium_bin2hex(out, 65, digest, sizeof digest);
        return 0;
}

int ab_exe_cache_put(ab_exe_cache *c, int fd, const struct stat *st, const char hex[65])
{
        file_id id = file_id_of(st);
        struct stat now;
        cache_entry *e;

        if (fstat(fd, &now) < 0 || !file_id_is(&id, &now))
                return -ESTALE; /* changed while it was hashed */
        e = cache_lookup(c, st);
        *e = (cache_entry){ .id = id, .used = true };
        memcpy(e->sha256, hex, 65);
        return 0;
}

/*
 * The hash of the executable (as fstat() saw it), from the cache. 0: in out (""
 * when it is no regular file, larger than the cache's maximum, or could
 * not be hashed before); 1: not known yet, and hashing it is the caller's
 * (ab_attest hands it to a thread: a large file takes seconds, and any
 * local user can make a new one at will).
 */
static int exe_hash(ab_exe_cache *c, const struct stat *st, char out[65])
{
        cache_entry *e;

        out[0] = '\0';
        if (!S_ISREG(st->st_mode))
                return 0;
        e = cache_lookup(c, st);
        if (same_file(e, st)) {
                memcpy(out, e->sha256, 65);
                return 0;
        }
        if ((uint64_t)st->st_size > c->max_size)
                return 0;
        return 1;
}

static int read_start_time(pid_t pid, uint64_t *ret)
{
        char buf[1024], *p;
        int field, r;

        r = read_proc(pid, "stat", buf, sizeof buf);
        if (r < 0)
                return r;
        /* comm may contain spaces and parentheses: fields resume after the last ')' */
        p = strrchr(buf, ')');
        if (!p)
                return -EIO;
        p++;
        for (field = 2; field < 21 && p; field++)
                p = strchr(p + 1, ' ');
        if (!p)
                return -EIO;
        *ret = strtoull(p + 1, NULL, 10);
        return 0;
}

static void copy_bounded(char *dst, size_t max, const char *src)
{
        if (!src || strlen(src) >= max) {
                dst[0] = '\0';
                return;
        }
        memcpy(dst, src, strlen(src) + 1);
}

/*
 * What was read about a connection's peer, reused while it provably still
 * holds: the start time never changes for a process (and the pidfd pins the
 * process); the executable is re-identified by stat()ing /proc/PID/exe
 * (the kernel's link to the running image: a new exec gives another inode,
 * and the file's size/mtime/ctime change if it is rewritten); the unit and
 * cgroup are read once per program (see ab_attest).
 */
struct ab_peer_cache {
        bool have_start, have_exe, have_cgroup;
        uint64_t start_time;
        file_id id; /* the executable */
        char exe[AB_EXE_MAX];
        char sha256[65];
        char cgroup_raw[AB_CGROUP_MAX + 64];
        size_t cgroup_raw_len;
        char unit[AB_UNIT_MAX];
        char cgroup[AB_CGROUP_MAX];
        /* an executable to hash off the loop (ab_attest_take_hash): open, as stat() saw it */
        int pending_fd;
        struct stat pending_st;
        /* the last one handed out: if it is still not in the cache when asked again (it could
         * not be hashed), go on without its hash rather than ask again */
        bool tried;
        file_id tried_id;
        /* a hash this connection waited for (ab_attest_hash_known): used when the cache no longer
         * holds it (another file took its slot meanwhile) */
        bool known;
        file_id known_id;
        char known_hex[65];
};

static void drop_pending(ab_peer_cache *pc)
{
        if (pc->pending_fd >= 0)
                close(pc->pending_fd);
        pc->pending_fd = -1;
}

void ab_attest_drop_hash(ab_peer *p)
{
        if (p->cache)
                drop_pending(p->cache);
}

void ab_attest_hash_known(ab_peer *p, const struct stat *st, const char hex[65])
{
        ab_peer_cache *pc = p->cache;

        if (!pc)
                return;
        pc->known = true;
        pc->known_id = file_id_of(st);
        memcpy(pc->known_hex, hex, 65);
}

int ab_attest_take_hash(ab_peer *p, int *ret_fd, struct stat *ret_st)
{
        ab_peer_cache *pc = p->cache;

        if (!pc || pc->pending_fd < 0)
                return -ENOENT;
        *ret_fd = pc->pending_fd;
        *ret_st = pc->pending_st;
        pc->pending_fd = -1;
        pc->tried = true;
        pc->tried_id = file_id_of(ret_st);
        return 0;
}

static bool same_stat(const ab_peer_cache *c, const struct stat *st)
{
        return c->have_exe && file_id_is(&c->id, st);
}

/* 0, or 1: the executable must be hashed first (pc->pending_fd, see ab_attest_take_hash). */
static int read_exe(const ab_peer *p, ab_exe_cache *cache, ab_peer_cache *pc)
{
        char path[64];
        struct stat st;
        ssize_t n;
        int exefd, h;

        snprintf(path, sizeof path, "/proc/%d/exe", (int)p->pid);
        exefd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (exefd < 0 || fstat(exefd, &st) < 0) {
                ab_close(exefd);
                pc->have_exe = false;
                pc->exe[0] = pc->sha256[0] = '\0';
                return 0;
        }
        n = readlink(path, pc->exe, sizeof pc->exe - 1);
        pc->exe[n > 0 ? n : 0] = '\0';
        h = exe_hash(cache, &st, pc->sha256);
        if (h > 0 && pc->known && file_id_is(&pc->known_id, &st)) {
                /* waited for, and pushed out of the cache since (by any other file: its slot is
                 * a hash of stat fields a user can choose) */
                memcpy(pc->sha256, pc->known_hex, 65);
                h = 0;
        }
        if (h > 0) {
                if (!pc->tried || !file_id_is(&pc->tried_id, &st)) {
                        drop_pending(pc);
                        pc->pending_fd = exefd; /* the file the process runs, whatever the path holds now */
                        pc->pending_st = st;
                        pc->have_exe = false;
                        return 1;
                }
                /* handed out just before and still not hashed (unreadable, or it changed meanwhile):
                 * this once no hash, as for a file too large; the next call asks again */
        }
        pc->tried = false;
        ab_close(exefd);
        pc->have_exe = pc->sha256[0] != '\0';
        pc->id = file_id_of(&st);
        return 0;
}

/* Read /proc/PID/cgroup and derive unit and cgroup (have_cgroup: it fitted and can be kept). */
static void read_cgroup(const ab_peer *p, ab_peer_cache *pc)
{
        char path[64], buf[sizeof pc->cgroup_raw];
        char *unit = NULL, *cgroup = NULL;
        ssize_t n;
        int fd;

        snprintf(path, sizeof path, "/proc/%d/cgroup", (int)p->pid);
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return;
        n = read(fd, buf, sizeof buf);
        ab_close(fd);
        if (n < 0)
                n = 0;
        if (pc->have_cgroup && (size_t)n < sizeof buf && (size_t)n == pc->cgroup_raw_len &&
            memcmp(buf, pc->cgroup_raw, (size_t)n) == 0)
                return;
        pc->unit[0] = pc->cgroup[0] = '\0';
        if (sd_pid_get_unit(p->pid, &unit) >= 0)
                copy_bounded(pc->unit, sizeof pc->unit, unit);
        if (sd_pid_get_cgroup(p->pid, &cgroup) >= 0)
                copy_bounded(pc->cgroup, sizeof pc->cgroup, cgroup);
        free(unit);
        free(cgroup);
        /* cache only what fits entirely: a longer file is read anew each time */
        pc->have_cgroup = (size_t)n < sizeof buf;
        memcpy(pc->cgroup_raw, buf, (size_t)n);
        pc->cgroup_raw_len = (size_t)n;
}

bool ab_process_running(pid_t pid, uint64_t start_time)
{
        uint64_t st;
        return pid > 0 && read_start_time(pid, &st) == 0 && st == start_time;
}

/*
 * Is the process behind the pidfd still running? A running process keeps its
 * PID, so what was read through /proc/PID before this check belongs to it.
 *
 * The first test is pidfd_send_signal(pidfd, 0): 0 means the process exists
 * (a zombie counts: it cannot be recycled until reaped), ESRCH that it is
 * gone. Any other error proves nothing either way, and is answered by
 * poll() on the pidfd, which the kernel makes readable (POLLIN) once the
 * whole process has exited (already as a zombie: stricter, and a zombie
 * sends no requests); like the signal, it can only ever refer to the process
 * the pidfd was taken for, so a recycled PID cannot pass it:
 *   - ENOSYS: valgrind (3.19, Debian 12) does not know the syscall and fails
 *     it without asking the kernel; remembered, so it is not retried;
 *   - EPERM: usually the permission check (the broker runs as root without
 *     CAP_KILL, so a peer of another uid cannot be signalled), which only
 *     happens once the process was found; but a seccomp filter
 *     (SystemCallErrorNumber=EPERM) says the same without looking, so EPERM
 *     alone is not taken as proof of life.
 * If poll() itself fails, the last resort is the start time in /proc/PID/stat
 * against the one recorded at the first attestation (a recycled PID has a
 * later one); with none recorded the answer is "gone" (fail closed).
 */
int ab_peer_alive(const ab_peer *p)
{
        static bool no_send_signal;
        struct pollfd pfd = { .fd = p->pidfd, .events = POLLIN };
        uint64_t start;
        int r;

        if (p->pidfd < 0)
                return -ESRCH;
        if (!no_send_signal) {
                if (sys_pidfd_send_signal(p->pidfd, 0) == 0)
                        return 0;
                if (errno == ESRCH)
                        return -ESRCH;
                if (errno == ENOSYS)
                        no_send_signal = true;
        }
        do
                r = poll(&pfd, 1, 0);
        while (r < 0 && errno == EINTR);
        if (r == 0)
                return 0;      /* not readable: still running */
        if (r > 0)
                return -ESRCH; /* POLLIN: exited; POLLHUP: reaped; POLLERR/POLLNVAL: not a live pidfd */
        if (p->cache && p->cache->have_start && read_start_time(p->pid, &start) == 0 &&
            start == p->cache->start_time)
                return 0;
        return -ESRCH;
}

/*
 * Another connection of this process, running this program, read its
 * executable, unit and cgroup already: the process is the same one when pid
 * and start time match (a PID comes back only after the whole PID space
 * went round, never within one clock tick; and the pidfd check after the
 * reads stands), the program when stat() of /proc/PID/exe gives the same
 * file (as same_stat for one connection).
 */
static bool proc_lookup(ab_exe_cache *cache, pid_t pid, const struct stat *st, ab_peer_cache *pc)
{
        const proc_entry *e = &cache->proc[(unsigned)pid % PROC_SLOTS];

        if (!e->exe || e->pid != pid || e->start_time != pc->start_time || !file_id_is(&e->id, st))
                return false;
        memcpy(pc->exe, e->exe, strlen(e->exe) + 1);
        memcpy(pc->sha256, e->sha256, sizeof pc->sha256);
        memcpy(pc->unit, e->unit, sizeof pc->unit);
        memcpy(pc->cgroup, e->cgroup, sizeof pc->cgroup);
        pc->id = e->id;
        pc->have_exe = pc->have_cgroup = true;
        return true;
}

static void proc_store(ab_exe_cache *cache, const ab_peer *p, const ab_peer_cache *pc)
{
        proc_entry *e = &cache->proc[(unsigned)p->pid % PROC_SLOTS];
        char *exe = strdup(pc->exe);

        if (!exe)
                return;
        free(e->exe);
        *e = (proc_entry){ .pid = p->pid, .proc_ino = p->proc_ino, .start_time = pc->start_time, .id = pc->id,
                           .exe = exe };
        memcpy(e->sha256, pc->sha256, sizeof e->sha256);
        memcpy(e->unit, pc->unit, sizeof e->unit);
        memcpy(e->cgroup, pc->cgroup, sizeof e->cgroup);
}

/* Whether pid is in a user namespace other than this process's (or that cannot be told). */
static bool in_foreign_userns(pid_t pid)
{
        static dev_t own_dev;
        static ino_t own_ino;
        char path[64];
        struct stat st;

        if (!own_ino) {
                if (stat("/proc/self/ns/user", &st) < 0)
                        return true;
                own_dev = st.st_dev;
                own_ino = st.st_ino;
        }
        snprintf(path, sizeof path, "/proc/%d/ns/user", (int)pid);
        return stat(path, &st) < 0 || st.st_dev != own_dev || st.st_ino != own_ino;
}

int ab_attest(ab_peer *p, ab_exe_cache *cache, ab_identity *ret)
{
        ab_peer_cache *pc = p->cache;
        char path[64];
        struct stat st;
        int r;

        if (!pc) {
                pc = p->cache = calloc(1, sizeof *pc);
                if (!pc)
                        return -ENOMEM;
                pc->pending_fd = -1;
        }
        ret->uid = p->uid;
        ret->gid = p->gid;
        ret->pid = p->pid;
        ret->peer = p;

        if (!pc->have_start) {
                /* a process seen before (same pidfs inode: the same process, never a recycled PID)
                 * has the start time read then; else /proc/PID/stat */
                const proc_entry *e = &cache->proc[(unsigned)p->pid % PROC_SLOTS];
                if (p->proc_ino && e->exe && e->pid == p->pid && e->proc_ino == p->proc_ino) {
                        pc->start_time = e->start_time;
                } else {
                        r = read_start_time(p->pid, &pc->start_time);
                        if (r < 0)
                                return ab_peer_alive(p) < 0 ? -ESRCH : r;
                }
                pc->have_start = true;
        }
        /*
         * The executable is identified anew for every request (an exec or a
         * rewritten file shows in stat() of /proc/PID/exe). The cgroup is
         * read once per process and program, and again after an exec: what
         * policy matches in it is the systemd *system* unit, and only root
         * can move a process to another one (moving needs write access to
         * the cgroup.procs of both cgroups' common ancestor, and what a unit
         * delegates, user@UID.service, is a subtree of that one unit).
         * Within such a subtree the path shown in records may go stale.
         */
        snprintf(path, sizeof path, "/proc/%d/exe", (int)p->pid);
        if (stat(path, &st) < 0) {
                if (read_exe(p, cache, pc) > 0) /* fails closed: no executable, no hash */
                        goto hash_first;
                read_cgroup(p, pc);
        } else if (!same_stat(pc, &st) && !proc_lookup(cache, p->pid, &st, pc)) {
                if (read_exe(p, cache, pc) > 0)
                        goto hash_first;
                read_cgroup(p, pc); /* a new program: read everything anew */
                if (pc->have_exe && pc->have_cgroup)
                        proc_store(cache, p, pc);
        } else if (!pc->have_cgroup) {
                read_cgroup(p, pc); /* one too long to keep */
        }

        /* Per request, as a process may enter a new user namespace at any time (unshare -U). */
        ret->foreign_userns = in_foreign_userns(p->pid);

        /* Everything above was read by PID. If the pidfd's process still
         * exists, the PID was not recycled while we read. */
        r = ab_peer_alive(p);
        if (r < 0) {
                pc->have_exe = pc->have_cgroup = false;
                return r;
        }
        ret->start_time = pc->start_time;
        memcpy(ret->exe, pc->exe, strlen(pc->exe) + 1);
        /* set with the path by read_exe and proc_lookup, and what same_stat compared (an inode
         * number may be anything a file system says, 0 included) */
        ret->exe_known = pc->exe[0] != '\0';
        ret->exe_dev = pc->id.dev;
        ret->exe_ino = pc->id.ino;
        memcpy(ret->sha256, pc->sha256, sizeof ret->sha256);
        memcpy(ret->unit, pc->unit, strlen(pc->unit) + 1);
        memcpy(ret->cgroup, pc->cgroup, strlen(pc->cgroup) + 1);
        return 0;

hash_first:
        /* the file opened is the one a live process of this peer runs (else no hash is wanted) */
        r = ab_peer_alive(p);
        if (r < 0) {
                drop_pending(pc);
                return r;
        }
        return -EINPROGRESS;
}
