/* SPDX-License-Identifier: MIT */
/*
 * bench: agent-brokerd against the Ed25519 limit (issue 8).
 *
 * Starts a real agent-brokerd on a temporary socket, state dir and audit
 * log (durable audit is always on), drives it from forked client
 * processes over raw varlink, and prints one table: raw libsodium sign/s
 * and verify/s measured in the same run, IssueToken and Introspect at 1, 8
 * and 64 clients on kept connections, a fresh connection per request, PAM
 * authentication through the real pam_agent_broker.so, cold start under
 * systemd-socket-activate, and the broker's memory after 10,000 sessions.
 *
 * A benchmark prints; it never fails because a machine is slow. It exits 1
 * when something errs (a request fails, the broker dies or does not stop
 * cleanly), 2 on a usage error.
 *
 * Usage: bench [--seconds S] [--json] [--sessions N] [--cold-runs N]
 *              [--only LIST] [--build DIR] [--keep]
 * BENCH_BROKER_WRAPPER="strace -f -c -o FILE" runs the main broker (the
 * one the load phases use) under a tool; for perf, attach to the pid it
 * prints (docs/performance.md).
 */
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <ftw.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <jansson.h>
#include <security/pam_appl.h>
#include <sodium.h>
#include "../../client/agentbroker.h"

#define AUDIENCE "bench://api"
#define SCOPE "read"
#define PAM_AUDIENCE "pam:bench"
#define BENCH_PAM_SERVICE "bench"
#define MAX_CLIENTS 64
#define REPLY_MAX (AB_MAX_MESSAGE + 1)
#define IO_TIMEOUT_S 10      /* one reply; longer is a stall, reported as an error */
#define READY_TIMEOUT_MS 60000
#define START_TIMEOUT_MS 15000
#define STOP_TIMEOUT_MS 10000
#define SESSION_CONCURRENCY 16

static const char issue_req[] = "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUDIENCE
                                "\",\"scopes\":[\"" SCOPE "\"]}}";

/* ---- options and global state --------------------------------------------- */

static struct {
        double seconds;
        bool json;
        unsigned sessions;
        unsigned cold_runs;
        double sessions_timeout;
        size_t msg_bytes;
        bool keep;
        char only[256];
        char build[PATH_MAX];
        char pam_module[PATH_MAX];
} opt = { .seconds = 5, .sessions = 10000, .cold_runs = 7, .sessions_timeout = 180, .msg_bytes = 300 };

static char dir[PATH_MAX];   /* temporary directory, removed at exit unless --keep */
static char user[256];       /* the user running the bench (and the broker) */
static pid_t main_pid;       /* the benchmark process (children must not clean up) */
static pid_t live_brokers[8]; /* what we started, and the daemons inside wrappers */
static int n_errors;

typedef struct broker {
        char sock[PATH_MAX], admin[PATH_MAX], state[PATH_MAX], audit[PATH_MAX], log[PATH_MAX];
        pid_t pid;        /* what we started: the daemon, or a wrapper or activator around it */
        pid_t daemon_pid; /* the agent-brokerd process itself (for CPU time and RSS) */
        bool wrapped;     /* under BENCH_BROKER_WRAPPER: its exit status is the wrapper's */
} broker;

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        fputs("bench: ", stderr);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        fputs("bench: ERROR: ", stderr);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
        n_errors++;
}

static bool phase_on(const char *name)
{
        char list[sizeof opt.only], *save = NULL;

        if (!opt.only[0])
                return true;
        memcpy(list, opt.only, sizeof list);
        for (char *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save))
                if (strcmp(t, name) == 0)
                        return true;
        return false;
}

/* ---- small helpers -------------------------------------------------------- */

static int64_t now_ns(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(int64_t t)
{
        struct timespec ts = { .tv_sec = t / 1000000000LL, .tv_nsec = t % 1000000000LL };
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
                ;
}

static void sleep_ms(int ms)
{
        sleep_until(now_ns() + (int64_t)ms * 1000000);
}

static int write_file(const char *path, const char *text)
{
        FILE *f = fopen(path, "we");
        int r = 0;

        if (!f)
                return -errno;
        if (fputs(text, f) < 0)
                r = -EIO;
        if (fclose(f) != 0 && r == 0)
                r = -errno;
        return r;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
        (void)st;
        (void)flag;
        (void)ftw;
        return remove(path) < 0 && errno != ENOENT ? -1 : 0;
}

/* A value in kB from /proc/PID/status ("VmRSS", "VmHWM", ...), -1 if absent. */
static long proc_status_kb(pid_t pid, const char *key)
{
        char path[64], line[256];
        size_t klen = strlen(key);
        long v = -1;
        FILE *f;

        snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
        f = fopen(path, "re");
        if (!f)
                return -1;
        while (fgets(line, sizeof line, f))
                if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
                        v = strtol(line + klen + 1, NULL, 10);
                        break;
                }
        fclose(f);
        return v;
}

static const char *fs_name(const char *path)
{
        struct statfs sf;

        if (statfs(path, &sf) < 0)
                return "unknown";
        switch ((unsigned long)sf.f_type) {
        case 0xEF53: return "ext4";
        case 0x01021994: return "tmpfs (fdatasync costs nothing)";
        case 0x58465342: return "xfs";
        case 0x9123683E: return "btrfs";
        case 0x794c7630: return "overlayfs";
        case 0x2FC12FC1: return "zfs";
        default: return "other";
        }
}

/* true if a Unix socket bound to path is listening (from /proc/net/unix). */
static bool unix_listening(const char *path)
{
        FILE *f = fopen("/proc/net/unix", "re");
        char line[PATH_MAX + 128];
        bool found = false;

        if (!f)
                return false;
        while (!found && fgets(line, sizeof line, f)) {
                unsigned flags;
                char p[PATH_MAX];
                if (sscanf(line, "%*s %*s %*s %x %*s %*s %*s %4095s", &flags, p) == 2 && (flags & 0x10000) &&
                    strcmp(p, path) == 0)
                        found = true;
        }
        fclose(f);
        return found;
}

/* ---- raw varlink ---------------------------------------------------------- */

static int uconnect(const char *path)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        struct timeval tv = { .tv_sec = IO_TIMEOUT_S };
        int fd;

        if (strlen(path) >= sizeof sa.sun_path)
                return -ENAMETOOLONG;
        memcpy(sa.sun_path, path, strlen(path) + 1);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0) {
                int r = -errno;
                close(fd);
                return r;
        }
        return fd;
}

/*
 * Send msg (msg_len bytes plus its NUL) and read one reply into buf (room
 * for REPLY_MAX + 1 bytes), NUL-terminated, without pipelining: the NUL
 * must be the last byte received. Returns the reply length or -errno
 * (-EAGAIN: no reply within IO_TIMEOUT_S; -EPROTO: closed or extra bytes).
 */
static ssize_t vcall(int fd, const char *msg, size_t msg_len, char *buf)
{
        size_t len = 0, off = 0;

        while (off < msg_len + 1) {
                ssize_t n = send(fd, msg + off, msg_len + 1 - off, MSG_NOSIGNAL);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                off += (size_t)n;
        }
        for (;;) {
                ssize_t n = read(fd, buf + len, REPLY_MAX - len);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (n == 0)
                        return -EPROTO;
                len += (size_t)n;
                if (buf[len - 1] == '\0')
                        break;
                if (memchr(buf + len - n, '\0', (size_t)n) || len >= REPLY_MAX)
                        return -EPROTO;
        }
        return (ssize_t)len - 1;
}

/* The string value of "key":"..." in a compact JSON reply, copied into out. */
static bool reply_str(const char *reply, const char *key, char *out, size_t outmax)
{
        char pat[64];
        const char *p, *e;

        snprintf(pat, sizeof pat, "\"%s\":\"", key);
        p = strstr(reply, pat);
        if (!p)
                return false;
        p += strlen(pat);
        e = strchr(p, '"');
        if (!e || (size_t)(e - p) >= outmax)
                return false;
        memcpy(out, p, (size_t)(e - p));
        out[e - p] = '\0';
        return true;
}

/* ---- the daemon ----------------------------------------------------------- */

static void track_broker(pid_t pid, bool on)
{
        for (size_t i = 0; i < sizeof live_brokers / sizeof live_brokers[0]; i++)
                if (on ? live_brokers[i] == 0 : live_brokers[i] == pid) {
                        live_brokers[i] = on ? pid : 0;
                        return;
                }
}

static void broker_paths(broker *b, const char *name)
{
        memset(b, 0, sizeof *b);
        snprintf(b->sock, sizeof b->sock, "%s/%s.sock", dir, name);
        snprintf(b->admin, sizeof b->admin, "%s/%s-admin.sock", dir, name);
        snprintf(b->state, sizeof b->state, "%s/%s-state", dir, name);
        snprintf(b->audit, sizeof b->audit, "%s/%s-state/audit.jsonl", dir, name);
        snprintf(b->log, sizeof b->log, "%s/%s.log", dir, name);
}

static const char *activator_path(void)
{
        static const char *const candidates[] = {
                "/usr/bin/systemd-socket-activate", "/bin/systemd-socket-activate",
                "/lib/systemd/systemd-socket-activate", "/usr/lib/systemd/systemd-socket-activate",
        };
        for (size_t i = 0; i < sizeof candidates / sizeof candidates[0]; i++)
                if (access(candidates[i], X_OK) == 0)
                        return candidates[i];
        return NULL;
}

/*
 * Fork and exec the broker (wrapped by `wrapper`, a shell word list, if
 * set; under systemd-socket-activate if activated) with stderr to b->log.
 * Does not wait for it to answer.
 */
static int broker_spawn(broker *b, bool activated, const char *wrapper)
{
        char daemon[PATH_MAX + 32], policy[PATH_MAX + 32], bound[PATH_MAX + 32], bound_admin[PATH_MAX + 32];
        const char *act = activated ? activator_path() : NULL;
        pid_t pid, parent = getpid();
        int logfd;

        snprintf(daemon, sizeof daemon, "%s/agent-brokerd", opt.build);
        snprintf(policy, sizeof policy, "%s/policy.json", dir);
        snprintf(bound, sizeof bound, "%s.bound", b->sock);
        snprintf(bound_admin, sizeof bound_admin, "%s.bound", b->admin);
        if (activated && !act)
                return -ENOENT;
        logfd = open(b->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (logfd < 0)
                return -errno;
        fflush(NULL);
        pid = fork();
        if (pid < 0) {
                int r = -errno;
                close(logfd);
                return r;
        }
        if (pid == 0) {
                char *argv[40];
                size_t k = 0;
                char script[1024];
                int devnull = open("/dev/null", O_RDWR);

                prctl(PR_SET_PDEATHSIG, SIGKILL);
                if (getppid() != parent)
                        _exit(126);
                if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(logfd, 1) < 0 || dup2(logfd, 2) < 0)
                        _exit(126);
                signal(SIGPIPE, SIG_DFL);
                unsetenv("NOTIFY_SOCKET");
                unsetenv("LISTEN_FDS");
                unsetenv("LISTEN_PID");
                unsetenv("LISTEN_FDNAMES");
                if (wrapper && *wrapper) {
                        snprintf(script, sizeof script, "exec %s \"$@\"", wrapper);
                        argv[k++] = (char *)"/bin/sh";
                        argv[k++] = (char *)"-c";
                        argv[k++] = script;
                        argv[k++] = (char *)"sh";
                }
                if (act) {
                        argv[k++] = (char *)act;
                        argv[k++] = (char *)"-l";
                        argv[k++] = b->sock;
                        argv[k++] = (char *)"-l";
                        argv[k++] = b->admin;
                        argv[k++] = (char *)"--fdname=agent:admin";
                }
                argv[k++] = daemon;
                argv[k++] = (char *)"--socket";
                argv[k++] = act ? bound : b->sock;
                argv[k++] = (char *)"--admin-socket";
                argv[k++] = act ? bound_admin : b->admin;
                argv[k++] = (char *)"--state-dir";
                argv[k++] = b->state;
                argv[k++] = (char *)"--audit-log";
                argv[k++] = b->audit;
                argv[k++] = (char *)"--policy";
                argv[k++] = policy;
                argv[k++] = (char *)"--rate-limit";
                argv[k++] = (char *)"0";
                argv[k++] = (char *)"--max-connections";
                argv[k++] = (char *)"8192";
                argv[k++] = (char *)"--max-connections-per-uid";
                argv[k++] = (char *)"8192";
                argv[k] = NULL;
                execv(argv[0], argv);
                dprintf(2, "bench: exec %s: %s\n", argv[0], strerror(errno));
                _exit(127);
        }
        close(logfd);
        b->pid = pid;
        b->wrapped = wrapper && *wrapper;
        track_broker(pid, true);
        return 0;
}

static bool broker_alive(broker *b)
{
        int st;

        if (b->pid <= 0)
                return false;
        if (waitpid(b->pid, &st, WNOHANG) == b->pid) {
                track_broker(b->pid, false);
                b->pid = 0;
                fail("the broker exited unexpectedly (status 0x%x); see %s", (unsigned)st, b->log);
                return false;
        }
        return true;
}

/* The comm of a process is agent-brokerd. */
static bool is_daemon(pid_t pid)
{
        char path[64], comm[64] = "";
        FILE *f;

        snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
        f = fopen(path, "re");
        if (!f)
                return false;
        if (!fgets(comm, sizeof comm, f))
                comm[0] = '\0';
        fclose(f);
        return strncmp(comm, "agent-brokerd", 13) == 0;
}

/* pid, or its first descendant (a few levels down) that is agent-brokerd. */
static pid_t find_daemon(pid_t pid, int depth)
{
        char path[96];
        FILE *f;
        long child;
        pid_t found = 0;

        if (is_daemon(pid))
                return pid;
        if (depth == 0)
                return 0;
        snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)pid, (int)pid);
        f = fopen(path, "re");
        if (!f)
                return 0;
        while (!found && fscanf(f, "%ld", &child) == 1)
                found = find_daemon((pid_t)child, depth - 1);
        fclose(f);
        return found;
}

/* Start the broker and wait until GetInfo answers. */
static int broker_start(broker *b, const char *wrapper)
{
        static const char getinfo[] = "{\"method\":\"org.varlink.service.GetInfo\"}";
        int64_t deadline = now_ns() + (int64_t)START_TIMEOUT_MS * 1000000;
        char *buf = malloc(REPLY_MAX + 1);
        int r = broker_spawn(b, false, wrapper);

        if (!buf || r < 0) {
                free(buf);
                return r < 0 ? r : -ENOMEM;
        }
        for (;;) {
                int fd;
                if (!broker_alive(b)) {
                        r = -ECHILD;
                        break;
                }
                fd = uconnect(b->sock);
                if (fd >= 0) {
                        ssize_t n = vcall(fd, getinfo, sizeof getinfo - 1, buf);
                        close(fd);
                        if (n > 0 && strstr(buf, "\"interfaces\"")) {
                                pid_t d = find_daemon(b->pid, 4);
                                b->daemon_pid = d > 0 ? d : b->pid;
                                if (b->daemon_pid != b->pid)
                                        track_broker(b->daemon_pid, true);
                                r = 0;
                                break;
                        }
                }
                if (now_ns() > deadline) {
                        r = -ETIMEDOUT;
                        break;
                }
                sleep_ms(10);
        }
        free(buf);
        return r;
}

/* SIGTERM, wait (bounded). 0 if it exited with status 0. */
static int broker_stop(broker *b)
{
        int64_t deadline = now_ns() + (int64_t)STOP_TIMEOUT_MS * 1000000;
        int st = 0;

        if (b->pid <= 0)
                return -ECHILD;
        /* a wrapper (strace, valgrind, perf) ends when the daemon inside it does */
        kill(b->daemon_pid > 0 ? b->daemon_pid : b->pid, SIGTERM);
        for (;;) {
                pid_t w = waitpid(b->pid, &st, WNOHANG);
                if (w == b->pid)
                        break;
                if (now_ns() > deadline) {
                        if (b->daemon_pid > 0 && b->daemon_pid != b->pid) {
                                kill(b->daemon_pid, SIGKILL);
                                track_broker(b->daemon_pid, false);
                        }
                        kill(b->pid, SIGKILL);
                        waitpid(b->pid, &st, 0);
                        track_broker(b->pid, false);
                        b->pid = 0;
                        fail("the broker did not stop within %d ms of SIGTERM", STOP_TIMEOUT_MS);
                        return -ETIMEDOUT;
                }
                sleep_ms(5);
        }
        track_broker(b->pid, false);
        if (b->daemon_pid > 0 && b->daemon_pid != b->pid)
                track_broker(b->daemon_pid, false);
        b->pid = 0;
        if (b->wrapped) {
                if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
                        note("the wrapped broker ended with status 0x%x (the wrapper's)", (unsigned)st);
        } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                fail("the broker did not exit cleanly (status 0x%x); see %s", (unsigned)st, b->log);
                return -EIO;
        }
        return 0;
}

/* Lines of the broker's log, and how many speak of errors or refusals. */
static void log_scan(const char *path, unsigned *ret_lines, unsigned *ret_bad, char *first_bad, size_t fbmax)
{
        FILE *f = fopen(path, "re");
        char line[1024];

        *ret_lines = *ret_bad = 0;
        if (first_bad && fbmax)
                first_bad[0] = '\0';
        if (!f)
                return;
        while (fgets(line, sizeof line, f)) {
                (*ret_lines)++;
                if (strcasestr(line, "error") || strcasestr(line, "cannot") || strcasestr(line, "fail") ||
                    strcasestr(line, "refus") || strcasestr(line, "too many") || strcasestr(line, "warning")) {
                        if (*ret_bad == 0 && first_bad)
                                snprintf(first_bad, fbmax, "%.*s", (int)strcspn(line, "\n"), line);
                        (*ret_bad)++;
                }
        }
        fclose(f);
}

/* User + system CPU time of a process (all its threads) in seconds, -1 if gone. */
static double proc_cpu_s(pid_t pid)
{
        char path[64], buf[2048], *p;
        unsigned long long ut = 0, stime = 0;
        ssize_t n;
        int fd;

        snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return -1;
        n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0)
                return -1;
        buf[n] = '\0';
        p = strrchr(buf, ')'); /* comm may contain anything */
        if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &stime) != 2)
                return -1;
        return (double)(ut + stime) / (double)sysconf(_SC_CLK_TCK);
}

static int cmp_u32_fwd(const void *a, const void *b)
{
        uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
        return x < y ? -1 : x > y;
}

/* Seconds the process's threads waited on a run queue (runnable, not running), -1 if unknown. */
static double proc_runq_wait_s(pid_t pid)
{
        char path[64];
        unsigned long long sum = 0;
        bool any = false;
        struct dirent *de;
        DIR *d;

        snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
        d = opendir(path);
        if (!d)
                return -1;
        while ((de = readdir(d))) {
                char p[128];
                unsigned long long run, wait;
                FILE *f;
                if (de->d_name[0] == '.')
                        continue;
                snprintf(p, sizeof p, "/proc/%d/task/%s/schedstat", (int)pid, de->d_name);
                f = fopen(p, "re");
                if (!f)
                        continue;
                if (fscanf(f, "%llu %llu", &run, &wait) == 2) {
                        sum += wait;
                        any = true;
                }
                fclose(f);
        }
        closedir(d);
        return any ? (double)sum / 1e9 : -1;
}

/* ---- raw Ed25519 ---------------------------------------------------------- */

static double raw_rate(bool verify, double seconds)
{
        unsigned char pk[crypto_sign_PUBLICKEYBYTES], sk[crypto_sign_SECRETKEYBYTES], sig[crypto_sign_BYTES];
        unsigned char *msg = malloc(opt.msg_bytes);
        int64_t t0, t, end;
        uint64_t n = 0;

        if (!msg)
                return 0;
        crypto_sign_keypair(pk, sk);
        randombytes_buf(msg, opt.msg_bytes);
        crypto_sign_detached(sig, NULL, msg, opt.msg_bytes, sk);
        t0 = now_ns();
        end = t0 + (int64_t)(seconds * 1e9);
        do {
                for (int i = 0; i < 64; i++) {
                        if (verify) {
                                if (crypto_sign_verify_detached(sig, msg, opt.msg_bytes, pk) != 0) {
                                        fail("raw verify failed");
                                        free(msg);
                                        return 0;
                                }
                        } else {
                                crypto_sign_detached(sig, NULL, msg, opt.msg_bytes, sk);
                        }
                }
                n += 64;
                t = now_ns();
        } while (t < end);
        sodium_memzero(sk, sizeof sk);
        free(msg);
        return (double)n / ((double)(t - t0) / 1e9);
}

/*
 * The disk's part: append 512 bytes to a file next to the state dirs and
 * fdatasync, for `seconds`; the median latency in ms (-1 on error). What
 * one audit group commit costs at least on this filesystem.
 */
static double fsync_p50(double seconds, double *ret_rate)
{
        char path[PATH_MAX + 16], rec[512];
        uint32_t *v = NULL;
        size_t n = 0, cap = 0;
        int64_t t0 = now_ns(), end = t0 + (int64_t)(seconds * 1e9);
        double p50 = -1;
        int fd;

        snprintf(path, sizeof path, "%s/fsync-probe", dir);
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (fd < 0)
                return -1;
        memset(rec, 'a', sizeof rec);
        rec[sizeof rec - 1] = '\n';
        while (now_ns() < end) {
                int64_t a = now_ns(), b;
                if (write(fd, rec, sizeof rec) != (ssize_t)sizeof rec || fdatasync(fd) < 0)
                        goto out;
                b = now_ns();
                if (n == cap) {
                        uint32_t *nv = realloc(v, (cap = cap ? cap * 2 : 4096) * sizeof *v);
                        if (!nv)
                                goto out;
                        v = nv;
                }
                v[n++] = (uint32_t)(b - a > (int64_t)UINT32_MAX ? UINT32_MAX : b - a);
        }
        qsort(v, n, sizeof *v, cmp_u32_fwd);
        p50 = n ? v[n / 2] / 1e6 : -1;
        *ret_rate = (double)n / ((double)(now_ns() - t0) / 1e9);
out:
        free(v);
        close(fd);
        unlink(path);
        return p50;
}

/* ---- load phases ---------------------------------------------------------- */

typedef enum kind { K_ISSUE, K_INTROSPECT, K_CONNECT, K_PAM } kind;

typedef struct slot {
        uint64_t done;      /* completed within the window */
        uint64_t recorded;  /* latency samples written */
        uint64_t cycle_ns;  /* PAM: sum of pam_start + authenticate + end */
        int failed;
        char err[240];
} slot;

typedef struct shared {
        int64_t start, deadline;
        slot slot[MAX_CLIENTS];
} shared;

typedef struct load {
        kind kind;
        unsigned clients;
        const char *sock;
        const char *msg;     /* request for K_ISSUE, K_INTROSPECT, K_CONNECT */
        size_t msg_len;
        const char *check;   /* substring a good reply contains */
        const char *pam_module;
        pid_t broker_pid;    /* for its CPU time during the window */
        shared *sh;
        uint32_t *samples;   /* clients * cap, nanoseconds */
        size_t cap;
} load;

typedef struct result {
        bool measured;
        char status[96];     /* why not, if not */
        unsigned clients;
        uint64_t requests;
        double rps, p50, p99, p999, max, mean_cycle; /* latencies in ms */
        double ratio;
        double broker_cpu;   /* broker CPU time / window: 1.0 is one core busy */
        double cpu_us;       /* broker CPU microseconds per request */
        double client_us;    /* the load generator's CPU microseconds per request (all clients, whole run) */
        double runq_wait;    /* share of the window the broker was runnable but waited for a CPU */
} result;

static void slot_fail(slot *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void slot_fail(slot *s, const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->err, sizeof s->err, fmt, ap);
        va_end(ap);
        s->failed = 1;
}

static const char *ecode(ssize_t r)
{
        return r == -EAGAIN ? "no reply within 10 s (stall)" : r == -EPROTO ? "connection closed or garbled" :
                                                                              strerror((int)-r);
}

/* One request on fd (or on a new connection for K_CONNECT). 0 or -1 (s->err set). */
static int do_request(const load *L, int *fd, char *buf, slot *s)
{
        ssize_t n;

        if (L->kind == K_CONNECT) {
                *fd = uconnect(L->sock);
                if (*fd < 0) {
                        slot_fail(s, "connect: %s", strerror(-*fd));
                        return -1;
                }
        }
        n = vcall(*fd, L->msg, L->msg_len, buf);
        if (L->kind == K_CONNECT) {
                close(*fd);
                *fd = -1;
        }
        if (n < 0) {
                slot_fail(s, "request: %s", ecode(n));
                return -1;
        }
        if (strncmp(buf, "{\"parameters\":", 14) != 0 || !strstr(buf, L->check)) {
                slot_fail(s, "bad reply: %.200s", buf);
                return -1;
        }
        return 0;
}

/* PAM ------------------------------------------------------------------------ */

typedef struct pam_ctx {
        char confdir[PATH_MAX];
        char *token;
} pam_ctx;

static int pam_conv_fn(int n, const struct pam_message **msg, struct pam_response **resp, void *data)
{
        pam_ctx *pc = data;
        struct pam_response *r = calloc((size_t)n, sizeof *r);

        if (!r)
                return PAM_BUF_ERR;
        for (int i = 0; i < n; i++) {
                if (msg[i]->msg_style == PAM_PROMPT_ECHO_OFF || msg[i]->msg_style == PAM_PROMPT_ECHO_ON) {
                        r[i].resp = strdup(pc->token);
                        if (!r[i].resp) {
                                for (int j = 0; j < i; j++)
                                        free(r[j].resp);
                                free(r);
                                return PAM_BUF_ERR;
                        }
                }
        }
        *resp = r;
        return PAM_SUCCESS;
}

/* One pam_start_confdir + pam_authenticate + pam_end; *auth_ns is the authenticate call alone. */
static int pam_once(pam_ctx *pc, slot *s, int64_t *auth_ns)
{
        struct pam_conv conv = { pam_conv_fn, pc };
        pam_handle_t *ph = NULL;
        int64_t t0, t1;
        int r = pam_start_confdir(BENCH_PAM_SERVICE, user, &conv, pc->confdir, &ph);

        if (r != PAM_SUCCESS) {
                slot_fail(s, "pam_start_confdir: %s", pam_strerror(ph, r));
                return -1;
        }
        t0 = now_ns();
        r = pam_authenticate(ph, PAM_SILENT);
        t1 = now_ns();
        if (r != PAM_SUCCESS)
                slot_fail(s, "pam_authenticate: %s (%d)", pam_strerror(ph, r), r);
        pam_end(ph, r);
        *auth_ns = t1 - t0;
        return r == PAM_SUCCESS ? 0 : -1;
}

static int pam_setup(const load *L, int idx, pam_ctx *pc, slot *s)
{
        const char *scopes[] = { "login" };
        ab_client *c = NULL;
        char conf[PATH_MAX + 64], line[2 * PATH_MAX + 256];
        int r;

        /* A token of this process's own fresh session: auth_time is now (max_auth_age=300). */
        r = ab_client_connect(L->sock, IO_TIMEOUT_S * 1000, &c);
        if (r == 0)
                r = ab_issue_token(c, PAM_AUDIENCE, scopes, 1, 0, NULL, &pc->token);
        if (r < 0) {
                slot_fail(s, "IssueToken for %s: %s: %s", PAM_AUDIENCE, ab_strerror(r),
                          c ? ab_client_error_message(c) : "");
                ab_client_free(c);
                return -1;
        }
        ab_client_free(c);
        snprintf(pc->confdir, sizeof pc->confdir, "%s/pam.d-%d", dir, idx);
        if (mkdir(pc->confdir, 0700) < 0 && errno != EEXIST) {
                slot_fail(s, "mkdir %s: %s", pc->confdir, strerror(errno));
                return -1;
        }
        snprintf(conf, sizeof conf, "%s/" BENCH_PAM_SERVICE, pc->confdir);
        snprintf(line, sizeof line,
                 "auth required %s socket=%s audience=" PAM_AUDIENCE " scope=login max_auth_age=300\n",
                 L->pam_module, L->sock);
        if (write_file(conf, line) < 0) {
                slot_fail(s, "cannot write %s", conf);
                return -1;
        }
        return 0;
}

/* The client process: warm up (opens its session), report ready, run the window. */
static int client_main(const load *L, unsigned idx, int ready_w, int go_r)
{
        slot *s = &L->sh->slot[idx];
        uint32_t *smp = L->samples + (size_t)idx * L->cap;
        char *buf = malloc(REPLY_MAX + 1);
        pam_ctx pc = { .token = NULL };
        int fd = -1, r = 0;
        uint64_t done = 0, rec = 0, cycle = 0;
        int64_t auth_ns = 0, deadline;
        char c;

        if (!buf) {
                slot_fail(s, "out of memory");
                r = -1;
        }
        if (r == 0 && L->kind == K_PAM) {
                r = pam_setup(L, (int)idx, &pc, s);
                if (r == 0)
                        r = pam_once(&pc, s, &auth_ns);
        } else if (r == 0) {
                if (L->kind != K_CONNECT) {
                        fd = uconnect(L->sock);
                        if (fd < 0) {
                                slot_fail(s, "connect: %s", strerror(-fd));
                                r = -1;
                        }
                }
                if (r == 0)
                        r = do_request(L, &fd, buf, s);
        }
        c = r == 0 ? 'r' : 'e';
        if (write(ready_w, &c, 1) != 1)
                _exit(1);
        close(ready_w);
        if (r < 0)
                _exit(1);
        /* the parent closes the go pipe when every client is ready */
        while (read(go_r, &c, 1) < 0 && errno == EINTR)
                ;
        sleep_until(L->sh->start);
        deadline = L->sh->deadline;
        for (;;) {
                int64_t t0 = now_ns(), t1;
                if (t0 >= deadline)
                        break;
                if (L->kind == K_PAM) {
                        r = pam_once(&pc, s, &auth_ns);
                        t1 = now_ns();
                        cycle += (uint64_t)(t1 - t0);
                } else {
                        r = do_request(L, &fd, buf, s);
                        t1 = now_ns();
                        auth_ns = t1 - t0;
                }
                if (r < 0)
                        break;
                if (t1 <= deadline)
                        done++;
                if (rec < L->cap)
                        smp[rec++] = auth_ns > (int64_t)UINT32_MAX ? UINT32_MAX : (uint32_t)auth_ns;
        }
        s->done = done;
        s->recorded = rec;
        s->cycle_ns = cycle;
        _exit(r < 0 ? 1 : 0);
}


static double pct(const uint32_t *v, size_t n, double p)
{
        size_t i;

        if (n == 0)
                return 0;
        i = (size_t)ceil(p * (double)n);
        i = i == 0 ? 0 : i - 1;
        if (i >= n)
                i = n - 1;
        return v[i] / 1e6;
}

/* Fork L->clients processes, release them together, collect counts and latencies. */
static int run_load(load *L, result *res)
{
        size_t total_cap = (size_t)(400000.0 * opt.seconds) + 100000, all_n = 0;
        size_t map_len;
        int ready[2] = { -1, -1 }, go[2] = { -1, -1 }, r = 0;
        pid_t pids[MAX_CLIENTS];
        unsigned n_started = 0, n_ready = 0, n_bad = 0;
        uint64_t done = 0, cycles = 0;
        double client_s = 0;
        uint32_t *all = NULL;
        char c;

        memset(res, 0, sizeof *res);
        res->clients = L->clients;
        L->cap = total_cap / L->clients;
        map_len = sizeof(shared) + L->cap * L->clients * sizeof(uint32_t);
        L->sh = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (L->sh == MAP_FAILED) {
                fail("mmap: %s", strerror(errno));
                return -1;
        }
        L->samples = (uint32_t *)(L->sh + 1);
        if (pipe2(ready, O_CLOEXEC) < 0 || pipe2(go, O_CLOEXEC) < 0) {
                fail("pipe: %s", strerror(errno));
                r = -1;
                goto out;
        }
        fflush(NULL);
        for (unsigned i = 0; i < L->clients; i++) {
                pid_t pid = fork();
                if (pid < 0) {
                        fail("fork: %s", strerror(errno));
                        r = -1;
                        break;
                }
                if (pid == 0) {
                        prctl(PR_SET_PDEATHSIG, SIGKILL);
                        close(ready[0]);
                        close(go[1]);
                        client_main(L, i, ready[1], go[0]);
                        _exit(1);
                }
                pids[n_started++] = pid;
        }
        close(ready[1]);
        ready[1] = -1;
        while (n_ready < n_started) {
                struct pollfd p = { .fd = ready[0], .events = POLLIN };
                ssize_t n;
                if (poll(&p, 1, READY_TIMEOUT_MS) <= 0) {
                        fail("clients not ready within %d ms", READY_TIMEOUT_MS);
                        r = -1;
                        break;
                }
                n = read(ready[0], &c, 1);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                n_ready++;
                if (c != 'r')
                        n_bad++;
        }
        L->sh->start = now_ns() + 20 * 1000000LL;
        L->sh->deadline = L->sh->start + (int64_t)(opt.seconds * 1e9);
        close(go[1]); /* go */
        go[1] = -1;
        if (L->broker_pid > 0) {
                double c0, c1, w0, w1;
                sleep_until(L->sh->start);
                c0 = proc_cpu_s(L->broker_pid);
                w0 = proc_runq_wait_s(L->broker_pid);
                sleep_until(L->sh->deadline);
                c1 = proc_cpu_s(L->broker_pid);
                w1 = proc_runq_wait_s(L->broker_pid);
                if (c0 >= 0 && c1 >= c0)
                        res->broker_cpu = (c1 - c0) / opt.seconds;
                if (w0 >= 0 && w1 >= w0)
                        res->runq_wait = (w1 - w0) / opt.seconds;
        }
        {
                unsigned n_failed = 0, first = 0;
                struct rusage ru0, ru1;
                getrusage(RUSAGE_CHILDREN, &ru0);
                for (unsigned i = 0; i < n_started; i++) {
                        int st;
                        while (waitpid(pids[i], &st, 0) < 0 && errno == EINTR)
                                ;
                        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                                if (n_failed++ == 0)
                                        first = i;
                                if (!L->sh->slot[i].failed)
                                        slot_fail(&L->sh->slot[i], "exited abnormally (status 0x%x)", (unsigned)st);
                        }
                }
                getrusage(RUSAGE_CHILDREN, &ru1);
                client_s = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec + ru1.ru_stime.tv_sec -
                                    ru0.ru_stime.tv_sec) +
                           (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec + ru1.ru_stime.tv_usec -
                                    ru0.ru_stime.tv_usec) / 1e6;
                if (n_failed) {
                        fail("%u of %u clients failed; client %u: %s", n_failed, n_started, first,
                             L->sh->slot[first].err);
                        r = -1;
                }
        }
        if (n_bad)
                r = -1;
        for (unsigned i = 0; i < n_started; i++) {
                done += L->sh->slot[i].done;
                cycles += L->sh->slot[i].cycle_ns;
                all_n += L->sh->slot[i].recorded;
        }
        all = malloc((all_n ? all_n : 1) * sizeof *all);
        if (!all) {
                fail("out of memory");
                r = -1;
                goto out;
        }
        all_n = 0;
        for (unsigned i = 0; i < n_started; i++) {
                memcpy(all + all_n, L->samples + (size_t)i * L->cap, L->sh->slot[i].recorded * sizeof *all);
                all_n += L->sh->slot[i].recorded;
        }
        qsort(all, all_n, sizeof *all, cmp_u32_fwd);
        res->measured = true;
        res->requests = done;
        res->rps = (double)done / opt.seconds;
        res->cpu_us = done ? res->broker_cpu * opt.seconds / (double)done * 1e6 : 0;
        res->client_us = all_n ? client_s / (double)all_n * 1e6 : 0;
        res->p50 = pct(all, all_n, 0.50);
        res->p99 = pct(all, all_n, 0.99);
        res->p999 = pct(all, all_n, 0.999);
        res->max = all_n ? all[all_n - 1] / 1e6 : 0;
        res->mean_cycle = all_n ? (double)cycles / (double)all_n / 1e6 : 0;
        if (r < 0)
                snprintf(res->status, sizeof res->status, "errors (see above)");
out:
        free(all);
        for (int i = 0; i < 2; i++) {
                if (ready[i] >= 0)
                        close(ready[i]);
                if (go[i] >= 0)
                        close(go[i]);
        }
        munmap(L->sh, map_len);
        L->sh = NULL;
        return r;
}

/* ---- cold start ----------------------------------------------------------- */

/* One socket-activated start: ms from connect to the IssueToken reply, or -1. */
static double cold_once(broker *b)
{
        int64_t deadline, t0, t1;
        char *buf = malloc(REPLY_MAX + 1);
        ssize_t n;
        int fd, r;
        double ms = -1;

        if (!buf)
                return -1;
        unlink(b->sock);
        unlink(b->admin);
        r = broker_spawn(b, true, NULL);
        if (r < 0) {
                fail("cannot start systemd-socket-activate: %s", strerror(-r));
                free(buf);
                return -1;
        }
        deadline = now_ns() + (int64_t)START_TIMEOUT_MS * 1000000;
        while (!(unix_listening(b->sock) && unix_listening(b->admin))) {
                if (!broker_alive(b) || now_ns() > deadline) {
                        fail("systemd-socket-activate did not listen on %s", b->sock);
                        free(buf);
                        return -1;
                }
                sleep_ms(2);
        }
        sleep_ms(50); /* the activator is in epoll_wait by now */
        t0 = now_ns();
        fd = uconnect(b->sock);
        if (fd < 0) {
                fail("cold start: connect: %s", strerror(-fd));
        } else {
                n = vcall(fd, issue_req, sizeof issue_req - 1, buf);
                t1 = now_ns();
                close(fd);
                if (n < 0)
                        fail("cold start: IssueToken: %s; see %s", ecode(n), b->log);
                else if (strncmp(buf, "{\"parameters\":", 14) != 0)
                        fail("cold start: IssueToken: %.200s", buf);
                else
                        ms = (double)(t1 - t0) / 1e6;
        }
        broker_stop(b);
        free(buf);
        return ms;
}

static int cmp_double(const void *a, const void *b)
{
        double x = *(const double *)a, y = *(const double *)b;
        return x < y ? -1 : x > y;
}

typedef struct cold_result {
        bool measured;
        char status[96];
        unsigned runs;
        double first, median, min, max;
} cold_result;

static void run_cold(cold_result *cr)
{
        broker b;
        double v[64];
        unsigned n = 0;

        memset(cr, 0, sizeof *cr);
        if (!activator_path()) {
                snprintf(cr->status, sizeof cr->status, "n/a (systemd-socket-activate not found)");
                return;
        }
        broker_paths(&b, "cold");
        /* run 0: empty state dir (creates the key, LMDB and audit file); then restarts */
        for (unsigned i = 0; i <= opt.cold_runs && i < 64; i++) {
                double ms = cold_once(&b);
                if (ms < 0) {
                        snprintf(cr->status, sizeof cr->status, "errors (see above)");
                        return;
                }
                if (i == 0)
                        cr->first = ms;
                else
                        v[n++] = ms;
        }
        qsort(v, n, sizeof v[0], cmp_double);
        cr->measured = n > 0;
        cr->runs = n;
        if (n) {
                cr->median = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
                cr->min = v[0];
                cr->max = v[n - 1];
        }
}

/* ---- sessions and memory --------------------------------------------------- */

typedef struct sess_result {
        bool measured;
        char status[96];
        unsigned target, reached, distinct;
        double seconds;
        long rss0_kb, rss_kb, hwm_kb, anon_kb, file_kb;
        long long mdb_disk, mdb_size;
} sess_result;

#define SID_MAX 32

static int cmp_sid(const void *a, const void *b)
{
        return strcmp(a, b);
}

/* The first of many concurrent session processes to fail names the error. */
static void first_fail(slot *err, const char *what, const char *detail)
{
        if (__atomic_exchange_n(&err->failed, 1, __ATOMIC_SEQ_CST) == 0)
                snprintf(err->err, sizeof err->err, "%s: %.200s", what, detail);
}

static int session_child(const char *sock, char *sid_out, slot *err)
{
        char *buf = malloc(REPLY_MAX + 1);
        int fd = uconnect(sock);
        ssize_t n;

        if (!buf || fd < 0) {
                first_fail(err, "connect", fd < 0 ? strerror(-fd) : "out of memory");
                return 1;
        }
        n = vcall(fd, issue_req, sizeof issue_req - 1, buf);
        if (n < 0) {
                first_fail(err, "IssueToken", ecode(n));
                return 1;
        }
        if (strncmp(buf, "{\"parameters\":", 14) != 0 || !reply_str(buf, "sid", sid_out, SID_MAX)) {
                first_fail(err, "IssueToken", buf);
                return 1;
        }
        return 0;
}

static void run_sessions(sess_result *sr)
{
        broker b;
        char (*sids)[SID_MAX];
        slot *errs;
        size_t len = sizeof(slot) + (size_t)opt.sessions * SID_MAX;
        void *map;
        unsigned running = 0, next = 0, ok = 0;
        int64_t t0, limit;
        char mdb[PATH_MAX + 16];
        struct stat st;
        int r;

        memset(sr, 0, sizeof *sr);
        sr->target = opt.sessions;
        map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (map == MAP_FAILED) {
                fail("mmap: %s", strerror(errno));
                snprintf(sr->status, sizeof sr->status, "errors (see above)");
                return;
        }
        errs = map;
        sids = (char (*)[SID_MAX])(errs + 1);
        broker_paths(&b, "sessions");
        r = broker_start(&b, NULL);
        if (r < 0) {
                fail("the sessions broker did not start: %s; see %s", strerror(-r), b.log);
                snprintf(sr->status, sizeof sr->status, "errors (see above)");
                munmap(map, len);
                return;
        }
        sr->rss0_kb = proc_status_kb(b.daemon_pid, "VmRSS");
        t0 = now_ns();
        limit = t0 + (int64_t)(opt.sessions_timeout * 1e9);
        fflush(NULL);
        while (next < opt.sessions || running > 0) {
                int wst;
                while (running < SESSION_CONCURRENCY && next < opt.sessions && now_ns() < limit) {
                        unsigned i = next;
                        pid_t pid = fork();
                        if (pid < 0) {
                                fail("fork: %s", strerror(errno));
                                break;
                        }
                        if (pid == 0) {
                                prctl(PR_SET_PDEATHSIG, SIGKILL);
                                _exit(session_child(b.sock, sids[i], errs));
                        }
                        next++;
                        running++;
                }
                if (running == 0)
                        break;
                if (wait(&wst) < 0) {
                        if (errno == EINTR)
                                continue;
                        break;
                }
                running--;
                if (WIFEXITED(wst) && WEXITSTATUS(wst) == 0)
                        ok++;
                else if (!errs->failed)
                        first_fail(errs, "a session process died", "killed or crashed");
        }
        sr->seconds = (double)(now_ns() - t0) / 1e9;
        if (errs->failed)
                fail("sessions: %s", errs->err);
        sr->reached = ok;
        qsort(sids, next, SID_MAX, cmp_sid); /* the loop ends with no child running */
        for (unsigned i = 0; i < next; i++)
                if (sids[i][0] && (i == 0 || strcmp(sids[i], sids[i - 1]) != 0))
                        sr->distinct++;
        if (broker_alive(&b)) {
                sr->rss_kb = proc_status_kb(b.daemon_pid, "VmRSS");
                sr->hwm_kb = proc_status_kb(b.daemon_pid, "VmHWM");
                sr->anon_kb = proc_status_kb(b.daemon_pid, "RssAnon");
                sr->file_kb = proc_status_kb(b.daemon_pid, "RssFile");
                sr->measured = true;
        }
        snprintf(mdb, sizeof mdb, "%s/data.mdb", b.state);
        if (stat(mdb, &st) == 0) {
                sr->mdb_disk = (long long)st.st_blocks * 512;
                sr->mdb_size = (long long)st.st_size;
        }
        broker_stop(&b);
        if (errs->failed || sr->distinct != ok)
                snprintf(sr->status, sizeof sr->status, "errors (see above)");
        if (sr->distinct != ok)
                fail("sessions: %u processes succeeded but %u distinct session ids came back", ok, sr->distinct);
        munmap(map, len);
}

/* ---- output --------------------------------------------------------------- */

typedef struct target {
        const char *name, *want;
        char got[96];
        int holds; /* 1 yes, 0 no, -1 not measured */
} target;

static const char *holds_str(int h)
{
        return h > 0 ? "holds" : h == 0 ? "MISSED" : "not measured";
}

static void print_row(const char *name, const result *r, const char *limit)
{
        if (!r->measured) {
                printf("  %-30s %7u  %s\n", name, r->clients, r->status[0] ? r->status : "not run");
                return;
        }
        printf("  %-30s %7u %8.0f %8.3f %8.3f %8.3f %8.3f %5.0f%% %6.0f %6.0f", name, r->clients, r->rps, r->p50,
               r->p99, r->p999, r->max, r->broker_cpu * 100, r->cpu_us, r->client_us);
        if (limit)
                printf("   %5.1f%% of %s", r->ratio * 100, limit);
        if (r->status[0])
                printf("  [%s]", r->status);
        if (r->runq_wait >= 0.05)
                printf("  [broker waited for a CPU %.0f%% of the time]", r->runq_wait * 100);
        putchar('\n');
}

static json_t *row_json(const char *name, const result *r, const char *limit)
{
        json_t *o = json_pack("{s:s,s:I}", "name", name, "clients", (json_int_t)r->clients);

        if (!r->measured) {
                json_object_set_new(o, "status", json_string(r->status[0] ? r->status : "not run"));
                return o;
        }
        json_object_set_new(o, "requests", json_integer((json_int_t)r->requests));
        json_object_set_new(o, "requests_per_s", json_real(r->rps));
        json_object_set_new(o, "p50_ms", json_real(r->p50));
        json_object_set_new(o, "p99_ms", json_real(r->p99));
        json_object_set_new(o, "p99_9_ms", json_real(r->p999));
        json_object_set_new(o, "max_ms", json_real(r->max));
        json_object_set_new(o, "broker_cpu_cores", json_real(r->broker_cpu));
        json_object_set_new(o, "broker_cpu_us_per_request", json_real(r->cpu_us));
        json_object_set_new(o, "client_cpu_us_per_request", json_real(r->client_us));
        json_object_set_new(o, "broker_runqueue_wait_share", json_real(r->runq_wait));
        if (limit) {
                json_object_set_new(o, "ratio", json_real(r->ratio));
                json_object_set_new(o, "limit", json_string(limit));
        }
        if (r->mean_cycle > 0)
                json_object_set_new(o, "mean_full_cycle_ms", json_real(r->mean_cycle));
        if (r->status[0])
                json_object_set_new(o, "status", json_string(r->status));
        return o;
}

static void cpu_model(char *out, size_t outmax)
{
        FILE *f = fopen("/proc/cpuinfo", "re");
        char line[512];

        snprintf(out, outmax, "unknown CPU");
        if (!f)
                return;
        while (fgets(line, sizeof line, f))
                if (strncmp(line, "model name", 10) == 0) {
                        char *p = strchr(line, ':');
                        if (p) {
                                p += 1 + strspn(p + 1, " \t");
                                snprintf(out, outmax, "%.*s", (int)strcspn(p, "\n"), p);
                        }
                        break;
                }
        fclose(f);
}

static void loadavg(char *out, size_t outmax)
{
        FILE *f = fopen("/proc/loadavg", "re");
        double a = 0;

        snprintf(out, outmax, "?");
        if (f && fscanf(f, "%lf", &a) == 1)
                snprintf(out, outmax, "%.2f", a);
        if (f)
                fclose(f);
}

/* Whole-machine CPU ticks from /proc/stat: total and stolen by the hypervisor. */
static void cpu_ticks(unsigned long long *ret_total, unsigned long long *ret_steal)
{
        unsigned long long v[8] = { 0 };
        FILE *f = fopen("/proc/stat", "re");

        *ret_total = *ret_steal = 0;
        if (!f)
                return;
        if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
                   &v[7]) == 8) {
                for (int i = 0; i < 8; i++)
                        *ret_total += v[i];
                *ret_steal = v[7];
        }
        fclose(f);
}

/* ---- main ----------------------------------------------------------------- */

static void cleanup(void)
{
        if (getpid() != main_pid)
                return;
        for (size_t i = 0; i < sizeof live_brokers / sizeof live_brokers[0]; i++)
                if (live_brokers[i] > 0) {
                        kill(live_brokers[i], SIGKILL);
                        waitpid(live_brokers[i], NULL, WNOHANG); /* reaped later if it is our child */
                        live_brokers[i] = 0;
                }
        if (dir[0] && !opt.keep)
                nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
        else if (dir[0])
                fprintf(stderr, "bench: kept %s\n", dir);
}

static void on_signal(int sig)
{
        (void)sig;
        exit(130); /* runs cleanup() */
}

static void usage(FILE *f)
{
        fprintf(f, "Usage: bench [OPTIONS]\n\n"
                   "Benchmark agent-brokerd against the raw Ed25519 limit and print one table.\n\n"
                   "  --seconds S        duration of each throughput measurement (default 5)\n"
                   "  --json             print the results as JSON instead of the table\n"
                   "  --sessions N       sessions to open for the memory figure (default 10000)\n"
                   "  --sessions-timeout S   stop forking session processes after S s (default 180)\n"
                   "  --cold-runs N      socket-activated restarts for the cold-start median (default 7)\n"
                   "  --msg-bytes N      message size for the raw sign/verify figure (default 300)\n"
                   "  --only LIST        run only these phases: issue,introspect,connect,pam,cold,sessions\n"
                   "                     (the raw Ed25519 limit is always measured)\n"
                   "  --build DIR        build directory with agent-brokerd (default: this program's)\n"
                   "  --pam-module PATH  absolute path of the PAM module (default: DIR/pam_agent_broker.so)\n"
                   "  --keep             keep the temporary directory (logs, state, audit)\n\n"
                   "BENCH_BROKER_WRAPPER (e.g. \"strace -f -c -o FILE\") runs the load-phase broker under a tool\n"
                   "that passes SIGTERM on; for perf, attach with perf record -p to the pid printed at start.\n"
                   "Exit status: 0, 1 if anything failed (never because of a slow figure), 2 usage.\n");
}

static int parse_args(int argc, char **argv)
{
        enum { O_SECONDS = 256, O_JSON, O_SESSIONS, O_SESS_TIMEOUT, O_COLD, O_MSG, O_ONLY, O_BUILD, O_PAM, O_KEEP };
        static const struct option longopts[] = {
                { "seconds", required_argument, NULL, O_SECONDS },
                { "json", no_argument, NULL, O_JSON },
                { "sessions", required_argument, NULL, O_SESSIONS },
                { "sessions-timeout", required_argument, NULL, O_SESS_TIMEOUT },
                { "cold-runs", required_argument, NULL, O_COLD },
                { "msg-bytes", required_argument, NULL, O_MSG },
                { "only", required_argument, NULL, O_ONLY },
                { "build", required_argument, NULL, O_BUILD },
                { "pam-module", required_argument, NULL, O_PAM },
                { "keep", no_argument, NULL, O_KEEP },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        int c;
        char *end;

        while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
                errno = 0;
                switch (c) {
                case O_SECONDS:
                        opt.seconds = strtod(optarg, &end);
                        if (*end || !(opt.seconds >= 0.1 && opt.seconds <= 3600))
                                goto bad;
                        break;
                case O_JSON: opt.json = true; break;
                case O_SESSIONS:
                        opt.sessions = (unsigned)strtoul(optarg, &end, 10);
                        if (*end || opt.sessions < 1 || opt.sessions > 1000000)
                                goto bad;
                        break;
                case O_SESS_TIMEOUT:
                        opt.sessions_timeout = strtod(optarg, &end);
                        if (*end || !(opt.sessions_timeout > 0))
                                goto bad;
                        break;
                case O_COLD:
                        opt.cold_runs = (unsigned)strtoul(optarg, &end, 10);
                        if (*end || opt.cold_runs < 1 || opt.cold_runs > 63)
                                goto bad;
                        break;
                case O_MSG:
                        opt.msg_bytes = strtoul(optarg, &end, 10);
                        if (*end || opt.msg_bytes < 1 || opt.msg_bytes > 65536)
                                goto bad;
                        break;
                case O_ONLY:
                        if (strlen(optarg) >= sizeof opt.only)
                                goto bad;
                        snprintf(opt.only, sizeof opt.only, "%s", optarg);
                        break;
                case O_BUILD:
                        if (strlen(optarg) >= sizeof opt.build)
                                goto bad;
                        snprintf(opt.build, sizeof opt.build, "%s", optarg);
                        break;
                case O_PAM:
                        if (strlen(optarg) >= sizeof opt.pam_module || optarg[0] != '/')
                                goto bad;
                        snprintf(opt.pam_module, sizeof opt.pam_module, "%s", optarg);
                        break;
                case O_KEEP: opt.keep = true; break;
                case 'h': usage(stdout); exit(0);
                default: usage(stderr); return -1;
                }
                continue;
        bad:
                fprintf(stderr, "bench: bad value for --%s: %s\n", longopts[c - O_SECONDS].name, optarg);
                return -1;
        }
        if (optind < argc) {
                usage(stderr);
                return -1;
        }
        return 0;
}

/* The build directory: --build, else this program's ../.. ($(B)/tests/bench), else $B or ./build. */
static void find_build(void)
{
        char exe[PATH_MAX], p[PATH_MAX + 32];
        ssize_t n;

        if (!opt.build[0]) {
                n = readlink("/proc/self/exe", exe, sizeof exe - 1);
                if (n > 0) {
                        exe[n] = '\0';
                        for (int i = 0; i < 2; i++) {
                                char *s = strrchr(exe, '/');
                                if (s)
                                        *s = '\0';
                        }
                        snprintf(p, sizeof p, "%s/agent-brokerd", exe);
                        if (access(p, X_OK) == 0)
                                snprintf(opt.build, sizeof opt.build, "%s", exe);
                }
        }
        if (!opt.build[0]) {
                const char *b = getenv("B");
                snprintf(opt.build, sizeof opt.build, "%s", b && *b ? b : "build");
        }
        if (opt.build[0] != '/' && getcwd(exe, sizeof exe)) {
                snprintf(p, sizeof p, "%s/%s", exe, opt.build);
                snprintf(opt.build, sizeof opt.build, "%s", p);
        }
}

int main(int argc, char **argv)
{
        static const char *const phase_names[] = { "IssueToken, kept connection", "Introspect, kept connection" };
        static const unsigned client_counts[] = { 1, 8, 64 };
        char policy[8192], path[PATH_MAX + 64], cpu[256], load0[32], pam_module[PATH_MAX + 32];
        double sign = 0, verify = 0, raw_s, sign0, verify0, sign1 = 0, verify1 = 0, fsync_ms, fsync_rate = 0;
        result issue[3], intro[3], conn, pam;
        cold_result cold;
        sess_result sess;
        broker b;
        struct passwd *pw;
        long rss_after[8] = { 0 };
        const char *rss_when[8];
        size_t n_rss = 0;
        unsigned log_lines = 0, log_bad = 0;
        char log_first_bad[512] = "";
        long long audit_bytes = 0;
        uint64_t audited_requests = 0;
        target tg[6];
        int r, n_hold = 0, n_measured = 0;
        unsigned long long tick0, steal0, tick1, steal1;
        double steal_pct;

        if (parse_args(argc, argv) < 0)
                return 2;
        if (sodium_init() < 0) {
                fprintf(stderr, "bench: sodium_init failed\n");
                return 1;
        }
        main_pid = getpid();
        find_build();
        memset(issue, 0, sizeof issue);
        memset(intro, 0, sizeof intro);
        memset(&conn, 0, sizeof conn);
        memset(&pam, 0, sizeof pam);
        memset(&cold, 0, sizeof cold);
        memset(&sess, 0, sizeof sess);
        for (unsigned i = 0; i < 3; i++)
                issue[i].clients = intro[i].clients = client_counts[i];
        conn.clients = 8;
        pam.clients = 1;
        pw = getpwuid(getuid());
        if (!pw) {
                fprintf(stderr, "bench: who is uid %u?\n", (unsigned)getuid());
                return 1;
        }
        snprintf(user, sizeof user, "%s", pw->pw_name);
        snprintf(path, sizeof path, "%s/agent-brokerd", opt.build);
        if (access(path, X_OK) < 0) {
                fprintf(stderr, "bench: %s: %s (build it first, or --build DIR)\n", path, strerror(errno));
                return 2;
        }
        if (opt.pam_module[0])
                snprintf(pam_module, sizeof pam_module, "%s", opt.pam_module);
        else
                snprintf(pam_module, sizeof pam_module, "%s/pam_agent_broker.so", opt.build);
        signal(SIGPIPE, SIG_IGN);
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
        atexit(cleanup);
        {
                const char *t = getenv("BENCH_TMPDIR");
                snprintf(dir, sizeof dir, "%s/agent-broker-bench.XXXXXX", t && *t ? t : "/tmp");
                if (!mkdtemp(dir)) {
                        fprintf(stderr, "bench: mkdtemp %s: %s\n", dir, strerror(errno));
                        dir[0] = '\0';
                        return 1;
                }
        }
        snprintf(policy, sizeof policy,
                 "{\"version\": 1, \"agents\": [{\"id\": \"bench\", \"owner\": \"bench@example.com\",\n"
                 "  \"description\": \"the benchmark's own processes\", \"match\": {\"user\": \"@broker\"},\n"
                 "  \"session\": {\"max_lifetime\": \"8h\", \"reauth_interval\": \"1h\"},\n"
                 "  \"grants\": [{\"audience\": \"" AUDIENCE "\", \"scopes\": [\"" SCOPE "\"], \"max_ttl\": \"1h\"},\n"
                 "             {\"audience\": \"" PAM_AUDIENCE "\", \"scopes\": [\"login\"], \"max_ttl\": 300,\n"
                 "              \"max_auth_age\": 300, \"users\": [\"%s\"]}]}]}\n",
                 user);
        snprintf(path, sizeof path, "%s/policy.json", dir);
        if (write_file(path, policy) < 0) {
                fprintf(stderr, "bench: cannot write %s\n", path);
                return 1;
        }
        cpu_model(cpu, sizeof cpu);
        loadavg(load0, sizeof load0);
        cpu_ticks(&tick0, &steal0);

        /* 1. the limit */
        raw_s = opt.seconds < 0.5 ? 0.5 : opt.seconds > 3 ? 3 : opt.seconds;
        /* always: every ratio needs it */
        note("raw Ed25519 sign and verify, %zu-byte message, %.1f s each", opt.msg_bytes, raw_s);
        sign = sign0 = raw_rate(false, raw_s);
        verify = verify0 = raw_rate(true, raw_s);
        fsync_ms = fsync_p50(raw_s < 1 ? raw_s : 1, &fsync_rate);

        /* 2. the load phases, on one broker */
        broker_paths(&b, "main");
        if (phase_on("issue") || phase_on("introspect") || phase_on("connect") || phase_on("pam")) {
                r = broker_start(&b, getenv("BENCH_BROKER_WRAPPER"));
                if (r < 0) {
                        fail("the broker did not start: %s; see %s", strerror(-r), b.log);
                        return 1;
                }
                note("broker pid %d, log %s", (int)b.daemon_pid, b.log);
                rss_when[n_rss] = "start";
                rss_after[n_rss++] = proc_status_kb(b.daemon_pid, "VmRSS");
        }
        for (unsigned k = 0; k < 2; k++) {
                result *rows = k == 0 ? issue : intro;
                char introspect_req[2048], token[1024];
                load L = { .sock = b.sock, .broker_pid = b.daemon_pid };

                if (!phase_on(k == 0 ? "issue" : "introspect"))
                        continue;
                if (k == 0) {
                        L.kind = K_ISSUE;
                        L.msg = issue_req;
                        L.msg_len = sizeof issue_req - 1;
                        L.check = "\"token\":\"";
                } else {
                        /* a token obtained beforehand, valid for the whole run */
                        int fd = uconnect(b.sock);
                        char *buf = malloc(REPLY_MAX + 1);
                        static const char req[] = "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{"
                                                  "\"audience\":\"" AUDIENCE "\",\"scopes\":[\"" SCOPE
                                                  "\"],\"ttl\":3600}}";
                        ssize_t n = fd >= 0 && buf ? vcall(fd, req, sizeof req - 1, buf) : -EIO;
                        if (fd >= 0)
                                close(fd);
                        if (n < 0 || !reply_str(buf, "token", token, sizeof token)) {
                                fail("IssueToken for the Introspect phase: %s",
                                     n < 0 ? ecode(n) : buf);
                                free(buf);
                                continue;
                        }
                        free(buf);
                        snprintf(introspect_req, sizeof introspect_req,
                                 "{\"method\":\"io.agentbroker.Introspect\",\"parameters\":{\"token\":\"%s\","
                                 "\"audience\":\"" AUDIENCE "\"}}",
                                 token);
                        L.kind = K_INTROSPECT;
                        L.msg = introspect_req;
                        L.msg_len = strlen(introspect_req);
                        L.check = "\"active\":true";
                }
                for (unsigned i = 0; i < 3; i++) {
                        L.clients = client_counts[i];
                        note("%s, %u client%s, %.1f s", phase_names[k], L.clients, L.clients > 1 ? "s" : "",
                             opt.seconds);
                        run_load(&L, &rows[i]);
                        audited_requests += rows[i].requests;
                        if (!broker_alive(&b))
                                return 1;
                }
                rss_when[n_rss] = k == 0 ? "IssueToken" : "Introspect";
                rss_after[n_rss++] = proc_status_kb(b.daemon_pid, "VmRSS");
        }
        if (phase_on("connect")) {
                load L = { .kind = K_CONNECT, .clients = 8, .sock = b.sock, .broker_pid = b.daemon_pid, .msg = issue_req,
                           .msg_len = sizeof issue_req - 1, .check = "\"token\":\"" };
                note("connect + attest + IssueToken per request, 8 clients, %.1f s", opt.seconds);
                run_load(&L, &conn);
                audited_requests += conn.requests;
                if (!broker_alive(&b))
                        return 1;
                rss_when[n_rss] = "connect-per-request";
                rss_after[n_rss++] = proc_status_kb(b.daemon_pid, "VmRSS");
        }
        if (phase_on("pam")) {
                pam.clients = 1;
                if (access(pam_module, R_OK) < 0) {
                        snprintf(pam.status, sizeof pam.status, "n/a (module not built)");
                        note("PAM: %s not found: n/a (module not built)", pam_module);
                } else {
                        load L = { .kind = K_PAM, .clients = 1, .sock = b.sock, .broker_pid = b.daemon_pid,
                                   .pam_module = pam_module };
                        note("PAM pam_authenticate through %s, 1 client, %.1f s", pam_module, opt.seconds);
                        run_load(&L, &pam);
                        audited_requests += pam.requests;
                        if (!broker_alive(&b))
                                return 1;
                        rss_when[n_rss] = "PAM";
                        rss_after[n_rss++] = proc_status_kb(b.daemon_pid, "VmRSS");
                }
        }
        if (b.pid > 0) {
                /* the file and its rotated predecessors (audit.jsonl.1, ...) */
                for (int i = 0; i < 10; i++) {
                        struct stat st;
                        char f[PATH_MAX + 16];
                        if (i == 0)
                                snprintf(f, sizeof f, "%s", b.audit);
                        else
                                snprintf(f, sizeof f, "%s.%d", b.audit, i);
                        if (stat(f, &st) == 0)
                                audit_bytes += (long long)st.st_size;
                }
                broker_stop(&b);
                log_scan(b.log, &log_lines, &log_bad, log_first_bad, sizeof log_first_bad);
                if (log_bad)
                        note("the broker logged %u line(s) about errors; the first: %s", log_bad, log_first_bad);
        }

        /* the limit again: the ratios use the mean of both (a busy or throttled machine shows as a drift) */
        if (phase_on("issue") || phase_on("introspect") || phase_on("connect")) {
                note("raw Ed25519 sign and verify again");
                sign1 = raw_rate(false, raw_s);
                verify1 = raw_rate(true, raw_s);
                sign = (sign0 + sign1) / 2;
                verify = (verify0 + verify1) / 2;
        }
        for (unsigned i = 0; i < 3; i++) {
                issue[i].ratio = issue[i].rps / sign;
                intro[i].ratio = intro[i].rps / verify;
        }
        conn.ratio = conn.rps / sign;

        /* 3. cold start */
        if (phase_on("cold")) {
                note("cold start under systemd-socket-activate, 1 + %u runs", opt.cold_runs);
                run_cold(&cold);
        } else {
                snprintf(cold.status, sizeof cold.status, "not run");
        }

        /* 4. sessions and memory */
        if (phase_on("sessions")) {
                note("%u sessions (one process each, %u at a time, at most %.0f s)", opt.sessions,
                     SESSION_CONCURRENCY, opt.sessions_timeout);
                run_sessions(&sess);
        } else {
                snprintf(sess.status, sizeof sess.status, "not run");
        }

        cpu_ticks(&tick1, &steal1);
        steal_pct = tick1 > tick0 ? 100.0 * (double)(steal1 - steal0) / (double)(tick1 - tick0) : 0;

        /* targets */
        memset(tg, 0, sizeof tg);
        tg[0].name = "IssueToken, 8 clients";
        tg[0].want = ">= 50% of sign/s, p99 < 1 ms";
        /* a target whose figure was not measured shows why */
        tg[0].holds = issue[1].measured ? issue[1].ratio >= 0.5 && issue[1].p99 < 1.0 : -1;
        snprintf(tg[0].got, sizeof tg[0].got, "%.1f%%, p99 %.3f ms", issue[1].ratio * 100, issue[1].p99);
        tg[1].name = "Introspect, 8 clients";
        tg[1].want = ">= 60% of verify/s";
        tg[1].holds = intro[1].measured ? intro[1].ratio >= 0.6 : -1;
        snprintf(tg[1].got, sizeof tg[1].got, "%.1f%%", intro[1].ratio * 100);
        tg[2].name = "connect per request, 8 clients";
        tg[2].want = ">= 30% of sign/s";
        tg[2].holds = conn.measured ? conn.ratio >= 0.3 : -1;
        snprintf(tg[2].got, sizeof tg[2].got, "%.1f%%", conn.ratio * 100);
        tg[3].name = "PAM authenticate";
        tg[3].want = "p50 < 2 ms";
        tg[3].holds = pam.measured ? pam.p50 < 2.0 : -1;
        if (pam.measured)
                snprintf(tg[3].got, sizeof tg[3].got, "p50 %.3f ms", pam.p50);
        else
                snprintf(tg[3].got, sizeof tg[3].got, "%s", pam.status[0] ? pam.status : "not run");
        tg[4].name = "cold start to first reply";
        tg[4].want = "median < 20 ms";
        tg[4].holds = cold.measured ? cold.median < 20.0 : -1;
        snprintf(tg[4].got, sizeof tg[4].got, "%.1f ms", cold.median);
        tg[5].name = "broker RSS, 10,000 sessions";
        tg[5].want = "VmRSS < 16 MiB";
        tg[5].holds = sess.measured && sess.reached >= 10000 ? sess.rss_kb < 16 * 1024 : -1;
        snprintf(tg[5].got, sizeof tg[5].got, "%.1f MiB at %u sessions", sess.rss_kb / 1024.0, sess.reached);
        {
                const char *why[6] = { issue[1].status, intro[1].status, conn.status, pam.status, cold.status,
                                       sess.status };
                bool missing[6] = { !issue[1].measured, !intro[1].measured, !conn.measured, !pam.measured,
                                    !cold.measured, !sess.measured };
                for (int i = 0; i < 6; i++)
                        if (missing[i])
                                snprintf(tg[i].got, sizeof tg[i].got, "%s", why[i][0] ? why[i] : "not run");
        }
        for (int i = 0; i < 6; i++) {
                n_measured += tg[i].holds >= 0;
                n_hold += tg[i].holds > 0;
        }

        if (opt.json) {
                json_t *o = json_object(), *rows = json_array(), *t = json_array(), *rss = json_array();
                char name[64];
                for (unsigned i = 0; i < 3; i++) {
                        snprintf(name, sizeof name, "IssueToken");
                        json_array_append_new(rows, row_json(name, &issue[i], "sign"));
                }
                for (unsigned i = 0; i < 3; i++)
                        json_array_append_new(rows, row_json("Introspect", &intro[i], "verify"));
                json_array_append_new(rows, row_json("connect+attest+IssueToken", &conn, "sign"));
                json_array_append_new(rows, row_json("PAM authenticate", &pam, NULL));
                for (int i = 0; i < 6; i++)
                        json_array_append_new(t, json_pack("{s:s,s:s,s:s,s:o}", "target", tg[i].name, "want",
                                                           tg[i].want, "got", tg[i].got, "holds",
                                                           tg[i].holds < 0 ? json_null() : json_boolean(tg[i].holds)));
                for (size_t i = 0; i < n_rss; i++)
                        json_array_append_new(rss, json_pack("{s:s,s:I}", "after", rss_when[i], "vmrss_kb",
                                                             (json_int_t)rss_after[i]));
                json_object_set_new(o, "machine", json_pack("{s:s,s:I,s:s,s:s,s:f}", "cpu", cpu, "cpus",
                                                            (json_int_t)sysconf(_SC_NPROCESSORS_ONLN), "loadavg_at_start",
                                                            load0, "state_fs", fs_name(dir), "cpu_steal_pct", steal_pct));
                json_object_set_new(o, "seconds", json_real(opt.seconds));
                json_object_set_new(o, "raw", json_pack("{s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:I}", "sign_per_s", sign, "verify_per_s", verify,
                                                        "sign_before", sign0, "verify_before", verify0,
                                                        "sign_after", sign1, "verify_after", verify1,
                                                        "fdatasync_p50_ms", fsync_ms,
                                                        "message_bytes", (json_int_t)opt.msg_bytes));
                json_object_set_new(o, "rows", rows);
                json_object_set_new(o, "cold_start", cold.measured ?
                                    json_pack("{s:I,s:f,s:f,s:f,s:f}", "runs", (json_int_t)cold.runs, "median_ms",
                                              cold.median, "min_ms", cold.min, "max_ms", cold.max, "first_boot_ms",
                                              cold.first) :
                                    json_pack("{s:s}", "status", cold.status));
                json_object_set_new(o, "sessions", sess.measured ?
                                    json_pack("{s:I,s:I,s:I,s:f,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "target",
                                              (json_int_t)sess.target, "reached", (json_int_t)sess.reached,
                                              "distinct", (json_int_t)sess.distinct, "seconds", sess.seconds,
                                              "vmrss_kb_before", (json_int_t)sess.rss0_kb, "vmrss_kb",
                                              (json_int_t)sess.rss_kb, "vmhwm_kb", (json_int_t)sess.hwm_kb,
                                              "rss_anon_kb", (json_int_t)sess.anon_kb, "rss_file_kb",
                                              (json_int_t)sess.file_kb, "data_mdb_disk_bytes",
                                              (json_int_t)sess.mdb_disk, "data_mdb_size_bytes",
                                              (json_int_t)sess.mdb_size) :
                                    json_pack("{s:s}", "status", sess.status));
                json_object_set_new(o, "load_broker_rss", rss);
                json_object_set_new(o, "audit_bytes_per_request",
                                    json_real(audited_requests ? (double)audit_bytes / (double)audited_requests : 0));
                json_object_set_new(o, "broker_log", json_pack("{s:I,s:I}", "lines", (json_int_t)log_lines,
                                                               "error_lines", (json_int_t)log_bad));
                json_object_set_new(o, "targets", t);
                json_object_set_new(o, "errors", json_integer(n_errors));
                json_dumpf(o, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
                putchar('\n');
                json_decref(o);
                return n_errors ? 1 : 0;
        }

        printf("\nagent-broker benchmark: %ld x %s, load average %s at start, %.1f s per measurement\n",
               sysconf(_SC_NPROCESSORS_ONLN), cpu, load0, opt.seconds);
        printf("durable audit on (every reply waits for the fdatasync of its batch); state dir on %s; CPU steal during the run "
               "%.1f%%\n\n",
               fs_name(dir), steal_pct);
        printf("  limit: libsodium Ed25519 on one core, %zu-byte message:  sign %.0f/s   verify %.0f/s", opt.msg_bytes,
               sign, verify);
        if (sign1 > 0)
                printf("\n         (mean of before the load phases: %.0f and %.0f, and after: %.0f and %.0f)", sign0,
                       verify0, sign1, verify1);
        printf("\n  disk: append 512 B + fdatasync in the state dir's filesystem: p50 %.3f ms (%.0f/s in a loop)\n\n",
               fsync_ms, fsync_rate);
        printf("  %-30s %7s %8s %8s %8s %8s %8s %6s %6s %6s   %s\n", "", "clients", "req/s", "p50 ms", "p99 ms",
               "p99.9 ms", "max ms", "broker", "us/req", "cli us", "vs limit");
        for (unsigned i = 0; i < 3; i++)
                print_row(i == 0 ? "IssueToken (kept connection)" : "", &issue[i], "sign");
        for (unsigned i = 0; i < 3; i++)
                print_row(i == 0 ? "Introspect (kept connection)" : "", &intro[i], "verify");
        print_row("connect+attest+IssueToken", &conn, "sign");
        print_row("PAM pam_authenticate", &pam, NULL);
        if (pam.measured)
                printf("  %-30s mean pam_start_confdir+authenticate+end cycle %.3f ms\n", "", pam.mean_cycle);
        printf("  (broker: its CPU time over the window, 100%% = one core busy; us/req: broker CPU per request;\n"
               "   cli us: the load generator's CPU per request, for what is left of the machine)\n\n");
        if (cold.measured)
                printf("  cold start (socket-activated, connect to IssueToken reply): median %.1f ms of %u "
                       "restarts (min %.1f, max %.1f); first boot on an empty state dir %.1f ms\n",
                       cold.median, cold.runs, cold.min, cold.max, cold.first);
        else
                printf("  cold start: %s\n", cold.status);
        if (sess.measured)
                printf("  sessions: %u of %u opened (%u processes, %u distinct sids, %.1f s); broker VmRSS %.1f MiB "
                       "(anon %.1f, file %.1f; %.1f MiB before), VmHWM %.1f MiB\n"
                       "  LMDB data.mdb: %.2f MiB on disk (st_blocks*512), %.2f MiB apparent size\n",
                       sess.reached, sess.target, sess.reached, sess.distinct, sess.seconds, sess.rss_kb / 1024.0,
                       sess.anon_kb / 1024.0, sess.file_kb / 1024.0, sess.rss0_kb / 1024.0, sess.hwm_kb / 1024.0,
                       sess.mdb_disk / 1048576.0, sess.mdb_size / 1048576.0);
        else
                printf("  sessions: %s\n", sess.status);
        if (n_rss) {
                printf("  load-phase broker VmRSS after:");
                for (size_t i = 0; i < n_rss; i++)
                        printf(" %s %.1f MiB%s", rss_when[i], rss_after[i] / 1024.0, i + 1 < n_rss ? "," : "");
                printf("; audit %.0f bytes per request; log %u lines, %u about errors\n",
                       audited_requests ? (double)audit_bytes / (double)audited_requests : 0.0, log_lines, log_bad);
        }
        printf("\n  %-32s %-32s %-34s %s\n", "target", "wanted", "measured", "");
        for (int i = 0; i < 6; i++)
                printf("  %-32s %-32s %-34s %s\n", tg[i].name, tg[i].want, tg[i].got, holds_str(tg[i].holds));
        printf("\n  %d of %d measured targets hold%s\n", n_hold, n_measured,
               n_errors ? "; THERE WERE ERRORS (see above)" : "");
        return n_errors ? 1 : 0;
}
