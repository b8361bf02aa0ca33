/* SPDX-License-Identifier: MIT */
/* Integration test harness: see harness.h. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <libgen.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include <sodium.h>
#include "harness.h"

#define HX_MAX_REPLY (1024 * 1024)

bool hx_under_wrapper(void)
{
        const char *w = getenv("AB_TEST_WRAPPER");
        return w && *w;
}

long long hx_now_ms(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void hx_sleep_ms(int ms)
{
        struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
}

static int remaining(long long deadline)
{
        long long left = deadline - hx_now_ms();
        if (left <= 0)
                return 0;
        return left > 60000 ? 60000 : (int)left;
}

/* ---- build dir ------------------------------------------------------------ */

static bool has_daemon(const char *dir)
{
        char p[PATH_MAX];
        if ((size_t)snprintf(p, sizeof p, "%s/agent-brokerd", dir) >= sizeof p)
                return false;
        return access(p, X_OK) == 0;
}

const char *hx_build_dir(void)
{
        static char dir[PATH_MAX];
        char exe[PATH_MAX];
        ssize_t n;

        if (dir[0])
                return dir;
        /* build/tests/test-x → build */
        n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        if (n > 0) {
                exe[n] = '\0';
                char *slash = strrchr(exe, '/');
                if (slash) {
                        *slash = '\0';
                        slash = strrchr(exe, '/');
                        if (slash && slash != exe) {
                                *slash = '\0';
                                if (has_daemon(exe)) {
                                        snprintf(dir, sizeof dir, "%s", exe);
                                        return dir;
                                }
                        }
                }
        }
        /* Else $B (relative to the current directory), else ./build. */
        const char *b = getenv("B");
        if (!b || !*b)
                b = "build";
        if (b[0] == '/' || !getcwd(exe, sizeof exe))
                snprintf(dir, sizeof dir, "%s", b);
        else
                snprintf(dir, sizeof dir, "%s/%s", exe, b);
        return dir;
}

int hx_build_path(const char *name, char *out, size_t outmax)
{
        if ((size_t)snprintf(out, outmax, "%s/%s", hx_build_dir(), name) >= outmax)
                return -ENAMETOOLONG;
        return 0;
}

/* ---- files ---------------------------------------------------------------- */

static int write_all(int fd, const void *buf, size_t len)
{
        const char *p = buf;
        while (len > 0) {
                ssize_t n = write(fd, p, len);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                p += n;
                len -= (size_t)n;
        }
        return 0;
}

int hx_write_file(const char *path, const char *text, mode_t mode)
{
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
        int r;

        if (fd < 0)
                return -errno;
        r = write_all(fd, text, strlen(text));
        if (r == 0 && fchmod(fd, mode) < 0)
                r = -errno;
        if (close(fd) < 0 && r == 0)
                r = -errno;
        return r;
}

int hx_read_file(const char *path, size_t max, char **ret, size_t *ret_len)
{
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        size_t len = 0, cap = 4096;
        char *buf;

        if (fd < 0)
                return -errno;
        buf = malloc(cap);
        if (!buf) {
                close(fd);
                return -ENOMEM;
        }
        for (;;) {
                ssize_t n;
                if (cap - len < 2) {
                        char *nb;
                        if (cap >= max + 1) {
                                free(buf);
                                close(fd);
                                return -EFBIG;
                        }
                        cap *= 2;
                        nb = realloc(buf, cap);
                        if (!nb) {
                                free(buf);
                                close(fd);
                                return -ENOMEM;
                        }
                        buf = nb;
                }
                n = read(fd, buf + len, cap - len - 1);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        int r = -errno;
                        free(buf);
                        close(fd);
                        return r;
                }
                if (n == 0)
                        break;
                len += (size_t)n;
                if (len > max) {
                        free(buf);
                        close(fd);
                        return -EFBIG;
                }
        }
        close(fd);
        buf[len] = '\0';
        *ret = buf;
        if (ret_len)
                *ret_len = len;
        return 0;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
        (void)st;
        (void)flag;
        (void)ftw;
        if (remove(path) < 0 && errno != ENOENT)
                return -1;
        return 0;
}

int hx_rm_rf(const char *path)
{
        if (nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS) < 0)
                return errno == ENOENT ? 0 : -errno;
        return 0;
}

int hx_sha256_file(const char *path, char hex[65])
{
        crypto_hash_sha256_state st;
        unsigned char h[crypto_hash_sha256_BYTES], buf[65536];
        int fd;

        if (sodium_init() < 0)
                return -EIO;
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        crypto_hash_sha256_init(&st);
        for (;;) {
                ssize_t n = read(fd, buf, sizeof buf);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        int r = -errno;
                        close(fd);
                        return r;
                }
                if (n == 0)
                        break;
                crypto_hash_sha256_update(&st, buf, (unsigned long long)n);
        }
        close(fd);
        crypto_hash_sha256_final(&st, h);
        sodium_bin2hex(hex, 65, h, sizeof h);
        return 0;
}

/* ---- the daemon ----------------------------------------------------------- */

int hx_broker_init(hx_broker *b)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd;

        memset(b, 0, sizeof *b);
        b->notify_fd = -1;
        b->last_status = -1;
        snprintf(b->dir, sizeof b->dir, "/tmp/agent-broker-it.XXXXXX");
        if (!mkdtemp(b->dir)) {
                b->dir[0] = '\0';
                return -errno;
        }
        /* Traversable by nobody: the agent socket inside is 0666. */
        if (chmod(b->dir, 0755) < 0)
                return -errno;
        snprintf(b->sock, sizeof b->sock, "%s/agent.sock", b->dir);
        snprintf(b->admin_sock, sizeof b->admin_sock, "%s/admin.sock", b->dir);
        snprintf(b->state, sizeof b->state, "%s/state", b->dir);
        snprintf(b->policy, sizeof b->policy, "%s/policy.json", b->dir);
        snprintf(b->log, sizeof b->log, "%s/broker.log", b->dir);
        snprintf(b->notify, sizeof b->notify, "%s/notify.sock", b->dir);

        fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return -errno;
        memcpy(sa.sun_path, b->notify, strlen(b->notify) + 1);
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
                int r = -errno;
                close(fd);
                return r;
        }
        b->notify_fd = fd;
        if (getenv("HX_VERBOSE"))
                fprintf(stderr, "harness: daemon %s/agent-brokerd, directory %s\n", hx_build_dir(), b->dir);
        return 0;
}

int hx_broker_write_policy(hx_broker *b, const char *json)
{
        return hx_write_file(b->policy, json, 0644);
}

/* Reap the daemon if it exited. true if it is gone. */
static bool reap(hx_broker *b)
{
        int st;
        pid_t r;

        if (b->pid <= 0)
                return true;
        r = waitpid(b->pid, &st, WNOHANG);
        if (r == b->pid || (r < 0 && errno == ECHILD)) {
                b->last_status = r == b->pid ? st : -1;
                b->pid = 0;
                return true;
        }
        return false;
}

static bool getinfo_ok(const char *path, int timeout_ms)
{
        hx_conn *c = NULL;
        json_t *root = NULL;
        bool ok = false;

        if (hx_conn_open(NULL, path, &c) < 0)
                return false;
        if (hx_conn_send_msg(c, "{\"method\":\"org.varlink.service.GetInfo\"}") == 0 &&
            hx_conn_recv_json(c, timeout_ms, &root) == 1 && !hx_reply_error(root) &&
            json_is_array(json_object_get(hx_reply_params(root), "interfaces")))
                ok = true;
        json_decref(root);
        hx_conn_close(NULL, c);
        return ok;
}

int hx_wait_answering(hx_broker *b, const char *path, int timeout_ms)
{
        long long deadline = hx_now_ms() + timeout_ms;

        for (;;) {
                if (b && b->pid > 0 && reap(b))
                        return -ECHILD;
                if (getinfo_ok(path, 1000))
                        return 0;
                if (hx_now_ms() >= deadline)
                        return -ETIMEDOUT;
                hx_sleep_ms(20);
        }
}

int hx_broker_start_argv(hx_broker *b, char *const argv[], const char *sock_path)
{
        pid_t parent = getpid(), pid;
        int logfd;

        if (b->pid > 0)
                return -EBUSY;
        logfd = open(b->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (logfd < 0)
                return -errno;
        hx_drain_notify(b);
        fflush(NULL);
        pid = fork();
        if (pid < 0) {
                int r = -errno;
                close(logfd);
                return r;
        }
        if (pid == 0) {
                sigset_t all;
                int devnull;

                /* Never outlive the test, even if it is killed. */
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                if (getppid() != parent)
                        _exit(126);
                sigemptyset(&all);
                sigprocmask(SIG_SETMASK, &all, NULL);
                signal(SIGPIPE, SIG_DFL);
                devnull = open("/dev/null", O_RDWR);
                if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(logfd, 1) < 0 || dup2(logfd, 2) < 0)
                        _exit(126);
                if (b->use_notify)
                        setenv("NOTIFY_SOCKET", b->notify, 1);
                else
                        unsetenv("NOTIFY_SOCKET");
                unsetenv("LISTEN_FDS");
                unsetenv("LISTEN_PID");
                unsetenv("LISTEN_FDNAMES");
                unsetenv("AGENT_BROKER_SOCKET");
                /* make check-valgrind: HX_DAEMON_WRAPPER="valgrind ..." runs the daemon under it */
                const char *wrap = getenv("HX_DAEMON_WRAPPER");
                if (wrap && *wrap && strstr(argv[0], "agent-brokerd")) {
                        char *sh[HX_MAX_EXTRA_ARGS + 16];
                        char script[512];
                        size_t k = 0;
                        snprintf(script, sizeof script, "exec %s \"$@\"", wrap);
                        sh[k++] = (char *)"/bin/sh";
                        sh[k++] = (char *)"-c";
                        sh[k++] = script;
                        sh[k++] = (char *)"sh";
                        for (size_t i = 0; argv[i] && k < sizeof sh / sizeof sh[0] - 1; i++)
                                sh[k++] = argv[i];
                        sh[k] = NULL;
                        execv(sh[0], sh);
                }
                execv(argv[0], argv);
                dprintf(2, "harness: exec %s: %s\n", argv[0], strerror(errno));
                _exit(127);
        }
        close(logfd);
        b->pid = pid;
        return hx_wait_answering(b, sock_path, HX_START_TIMEOUT_MS);
}

int hx_broker_start(hx_broker *b)
{
        char daemon[PATH_MAX];
        char *argv[10 + HX_MAX_EXTRA_ARGS + 1];
        size_t n = 0;

        if (hx_build_path("agent-brokerd", daemon, sizeof daemon) < 0)
                return -ENAMETOOLONG;
        argv[n++] = daemon;
        argv[n++] = (char *)"--socket";
        argv[n++] = b->sock;
        argv[n++] = (char *)"--admin-socket";
        argv[n++] = b->admin_sock;
        argv[n++] = (char *)"--state-dir";
        argv[n++] = b->state;
        argv[n++] = (char *)"--policy";
        argv[n++] = b->policy;
        for (size_t i = 0; i < b->n_extra_args && i < HX_MAX_EXTRA_ARGS; i++)
                argv[n++] = (char *)b->extra_args[i];
        argv[n] = NULL;
        return hx_broker_start_argv(b, argv, b->sock);
}

void hx_proc_diag(pid_t pid)
{
        static const char *const files[] = { "status", "wchan", "stack", "syscall" };
        char p[64], *text = NULL;

        for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
                snprintf(p, sizeof p, "/proc/%d/%s", (int)pid, files[i]);
                if (hx_read_file(p, 1 << 16, &text, NULL) == 0) {
                        fprintf(stderr, "---- %s ----\n%s\n", p, text);
                        free(text);
                        text = NULL;
                }
        }
}

int hx_proc_fd_count(pid_t pid)
{
        char dir[64];
        DIR *d;
        struct dirent *de;
        int n = 0;

        snprintf(dir, sizeof dir, "/proc/%d/fd", (int)pid);
        d = opendir(dir);
        if (!d)
                return -1;
        while ((de = readdir(d)))
                if (de->d_name[0] != '.')
                        n++;
        closedir(d);
        return n;
}

long hx_proc_status_kb(pid_t pid, const char *key)
{
        char path[64], line[256];
        long v = -1;
        FILE *fp;

        snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
        fp = fopen(path, "re");
        if (!fp)
                return -1;
        while (fgets(line, sizeof line, fp))
                if (strncmp(line, key, strlen(key)) == 0) {
                        v = strtol(line + strlen(key), NULL, 10);
                        break;
                }
        fclose(fp);
        return v;
}

int hx_broker_stop(hx_broker *b, int *ret_status)
{
        long long deadline;

        if (b->pid <= 0)
                return -ESRCH;
        if (kill(b->pid, SIGTERM) < 0 && errno != ESRCH)
                return -errno;
        deadline = hx_now_ms() + HX_STOP_TIMEOUT_MS;
        while (!reap(b)) {
                if (hx_now_ms() >= deadline) {
                        int st;
                        hx_proc_diag(b->pid);
                        kill(b->pid, SIGKILL);
                        waitpid(b->pid, &st, 0);
                        b->last_status = st;
                        b->pid = 0;
                        if (ret_status)
                                *ret_status = st;
                        return -ETIMEDOUT;
                }
                hx_sleep_ms(5);
        }
        if (ret_status)
                *ret_status = b->last_status;
        return 0;
}

void hx_broker_dump_log(const hx_broker *b)
{
        char *text = NULL;

        if (!b->log[0] || hx_read_file(b->log, 1 << 20, &text, NULL) < 0)
                return;
        fprintf(stderr, "---- %s ----\n%s---- end of log ----\n", b->log, text);
        free(text);
}

void hx_broker_cleanup(hx_broker *b)
{
        for (size_t i = 0; i < HX_MAX_CONNS; i++)
                if (b->conns[i])
                        hx_conn_close(b, b->conns[i]);
        if (b->pid > 0) {
                long long deadline = hx_now_ms() + 3000;
                kill(b->pid, SIGTERM);
                while (!reap(b)) {
                        if (hx_now_ms() >= deadline) {
                                kill(b->pid, SIGKILL);
                                waitpid(b->pid, NULL, 0);
                                b->pid = 0;
                                break;
                        }
                        hx_sleep_ms(5);
                }
        }
        if (getenv("HX_VERBOSE"))
                hx_broker_dump_log(b);
        if (b->notify_fd >= 0)
                close(b->notify_fd);
        b->notify_fd = -1;
        if (b->dir[0] && strncmp(b->dir, "/tmp/agent-broker-it.", 21) == 0)
                hx_rm_rf(b->dir);
        b->dir[0] = '\0';
}

void hx_drain_notify(hx_broker *b)
{
        char buf[4096];

        if (b->notify_fd < 0)
                return;
        while (recv(b->notify_fd, buf, sizeof buf, MSG_DONTWAIT) >= 0)
                ;
}

int hx_broker_finish(hx_broker *b)
{
        static const char *const bad[] = { "ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                                           "WARNING: ThreadSanitizer",
                                           "SUMMARY: UndefinedBehaviorSanitizer" };
        char *log = NULL;
        int r = 0, st = -1;

        if (b->pid > 0) {
                int k = hx_broker_stop(b, &st);
                if (k < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                        fprintf(stderr, "teardown: the broker did not exit cleanly (r=%d, wait status 0x%x)\n", k,
                                (unsigned)st);
                        r = -1;
                }
        }
        if (b->log[0] && hx_read_file(b->log, 16 << 20, &log, NULL) == 0) {
                for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
                        if (strstr(log, bad[i])) {
                                fprintf(stderr, "teardown: the broker log has \"%s\"\n", bad[i]);
                                r = -1;
                        }
                free(log);
        }
        if (r < 0)
                hx_broker_dump_log(b);
        hx_broker_cleanup(b);
        return r;
}

int hx_wait_notify(hx_broker *b, const char *needle, int timeout_ms, char *out, size_t outmax)
{
        long long deadline = hx_now_ms() + timeout_ms;
        char buf[4096];

        if (b->notify_fd < 0)
                return -EBADF;
        for (;;) {
                struct pollfd p = { .fd = b->notify_fd, .events = POLLIN };
                ssize_t n;
                int left = remaining(deadline);

                if (left == 0)
                        return -ETIMEDOUT;
                if (poll(&p, 1, left) <= 0)
                        continue;
                n = recv(b->notify_fd, buf, sizeof buf - 1, MSG_DONTWAIT);
                if (n < 0)
                        continue;
                buf[n] = '\0';
                if (strstr(buf, needle)) {
                        if (out)
                                snprintf(out, outmax, "%s", buf);
                        return 0;
                }
        }
}

/* ---- raw varlink ---------------------------------------------------------- */

int hx_listen_unix(const char *path, int backlog)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

        assert_true(fd >= 0);
        assert_true(strlen(path) < sizeof sa.sun_path);
        memcpy(sa.sun_path, path, strlen(path) + 1);
        unlink(path);
        assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
        assert_int_equal(listen(fd, backlog), 0);
        return fd;
}

pid_t hx_fake_server(const char *path, void (*serve)(int fd, const void *ud), const void *ud)
{
        int lfd = hx_listen_unix(path, 8);
        pid_t pid = fork();

        assert_true(pid >= 0);
        if (pid == 0) {
                alarm(60); /* never outlive the test by much */
                for (;;) {
                        int fd = accept(lfd, NULL, NULL);
                        if (fd < 0)
                                _exit(0);
                        serve(fd, ud);
                        close(fd);
                }
        }
        close(lfd);
        return pid;
}

void hx_serve_reply(int fd, const void *reply)
{
        char buf[4096];
        ssize_t n;

        while ((n = recv(fd, buf, sizeof buf, 0)) > 0)
                for (ssize_t i = 0; i < n; i++)
                        if (buf[i] == '\0')
                                (void)send(fd, reply, strlen(reply) + 1, MSG_NOSIGNAL);
}

int hx_conn_open(hx_broker *b, const char *path, hx_conn **ret)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        hx_conn *c;
        int fd;

        if (strlen(path) >= sizeof sa.sun_path)
                return -ENAMETOOLONG;
        memcpy(sa.sun_path, path, strlen(path) + 1);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
                int r = -errno;
                close(fd);
                return r;
        }
        c = calloc(1, sizeof *c);
        if (!c) {
                close(fd);
                return -ENOMEM;
        }
        c->fd = fd;
        if (b) {
                size_t i;
                for (i = 0; i < HX_MAX_CONNS; i++)
                        if (!b->conns[i]) {
                                b->conns[i] = c;
                                break;
                        }
                if (i == HX_MAX_CONNS) {
                        close(fd);
                        free(c);
                        return -EMFILE;
                }
        }
        *ret = c;
        return 0;
}

void hx_conn_close(hx_broker *b, hx_conn *c)
{
        if (!c)
                return;
        if (b)
                for (size_t i = 0; i < HX_MAX_CONNS; i++)
                        if (b->conns[i] == c)
                                b->conns[i] = NULL;
        if (c->fd >= 0)
                close(c->fd);
        free(c->buf);
        free(c);
}

int hx_conn_send(hx_conn *c, const void *buf, size_t len)
{
        const char *p = buf;
        long long deadline = hx_now_ms() + HX_IO_TIMEOUT_MS;

        while (len > 0) {
                struct pollfd pf = { .fd = c->fd, .events = POLLOUT };
                ssize_t n;
                int left = remaining(deadline);

                if (left == 0)
                        return -ETIMEDOUT;
                if (poll(&pf, 1, left) <= 0)
                        continue;
                n = send(c->fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR || errno == EAGAIN)
                                continue;
                        return -errno;
                }
                p += n;
                len -= (size_t)n;
        }
        return 0;
}

int hx_conn_send_msg(hx_conn *c, const char *text)
{
        return hx_conn_send(c, text, strlen(text) + 1);
}

int hx_conn_recv(hx_conn *c, int timeout_ms, char **ret, size_t *ret_len)
{
        long long deadline = hx_now_ms() + timeout_ms;

        for (;;) {
                char *nul = c->len ? memchr(c->buf, '\0', c->len) : NULL;
                struct pollfd pf = { .fd = c->fd, .events = POLLIN };
                ssize_t n;
                int left;

                if (nul) {
                        size_t mlen = (size_t)(nul - c->buf);
                        char *m = malloc(mlen + 1);
                        if (!m)
                                return -ENOMEM;
                        memcpy(m, c->buf, mlen + 1);
                        memmove(c->buf, nul + 1, c->len - mlen - 1);
                        c->len -= mlen + 1;
                        *ret = m;
                        if (ret_len)
                                *ret_len = mlen;
                        return 1;
                }
                if (c->cap - c->len < 4096) {
                        size_t ncap = c->cap ? c->cap * 2 : 8192;
                        char *nb;
                        if (ncap > HX_MAX_REPLY)
                                return -EMSGSIZE;
                        nb = realloc(c->buf, ncap);
                        if (!nb)
                                return -ENOMEM;
                        c->buf = nb;
                        c->cap = ncap;
                }
                left = remaining(deadline);
                if (left == 0)
                        return -ETIMEDOUT;
                if (poll(&pf, 1, left) <= 0)
                        continue;
                n = recv(c->fd, c->buf + c->len, c->cap - c->len, MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR || errno == EAGAIN)
                                continue;
                        return -errno;
                }
                if (n == 0)
                        return c->len ? -EPROTO : 0;
                c->len += (size_t)n;
        }
}

int hx_conn_recv_json(hx_conn *c, int timeout_ms, json_t **ret_root)
{
        char *msg = NULL;
        size_t len = 0;
        json_t *root;
        int r;

        r = hx_conn_recv(c, timeout_ms, &msg, &len);
        if (r != 1)
                return r;
        root = json_loadb(msg, len, JSON_REJECT_DUPLICATES, NULL);
        free(msg);
        if (!json_is_object(root)) {
                json_decref(root);
                return -EBADMSG;
        }
        *ret_root = root;
        return 1;
}

int hx_conn_call(hx_conn *c, const char *text, json_t **ret_root)
{
        int r = hx_conn_send_msg(c, text);
        if (r < 0)
                return r;
        return hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, ret_root);
}

int hx_conn_wait_closed(hx_conn *c, int timeout_ms)
{
        char *msg = NULL;
        int r = hx_conn_recv(c, timeout_ms, &msg, NULL);

        free(msg);
        if (r == 0 || r == -ECONNRESET)
                return 0;
        if (r == -ETIMEDOUT)
                return -ETIMEDOUT;
        return 1;
}

bool hx_conn_quiet(hx_conn *c, int ms)
{
        char *msg = NULL;
        int r = hx_conn_recv(c, ms, &msg, NULL);
        free(msg);
        return r == -ETIMEDOUT;
}

const char *hx_reply_error(const json_t *root)
{
        return json_string_value(json_object_get(root, "error"));
}

json_t *hx_reply_params(const json_t *root)
{
        static json_t *empty;
        json_t *p = json_object_get(root, "parameters");
        if (json_is_object(p))
                return p;
        if (!empty)
                empty = json_object();
        return empty;
}

const char *hx_reply_str(const json_t *root, const char *key)
{
        return json_string_value(json_object_get(hx_reply_params(root), key));
}

/* ---- child programs ------------------------------------------------------- */

void hx_run_result_done(hx_run_result *r)
{
        free(r->out);
        free(r->err);
        r->out = r->err = NULL;
}

static int drop_to(uid_t uid, gid_t gid)
{
        gid_t groups[4];

        if (setgroups(0, NULL) < 0 || setgid(gid) < 0 || setuid(uid) < 0)
                return -1;
        if (getuid() != uid || geteuid() != uid || getgid() != gid || getegid() != gid)
                return -1;
        if (getgroups(4, groups) != 0)
                return -1;
        if (uid != 0 && setuid(0) == 0) /* must be irreversible */
                return -1;
        return 0;
}

typedef struct sink {
        char *buf;
        size_t len, cap;
} sink;

static int sink_read(sink *s, int fd)
{
        char tmp[8192];
        ssize_t n = read(fd, tmp, sizeof tmp);

        if (n < 0)
                return errno == EINTR || errno == EAGAIN ? 1 : -errno;
        if (n == 0)
                return 0;
        if (s->len + (size_t)n + 1 > s->cap) {
                size_t ncap = s->cap ? s->cap : 8192;
                char *nb;
                while (ncap < s->len + (size_t)n + 1)
                        ncap *= 2;
                if (ncap > 16 * 1024 * 1024)
                        return -EFBIG;
                nb = realloc(s->buf, ncap);
                if (!nb)
                        return -ENOMEM;
                s->buf = nb;
                s->cap = ncap;
        }
        memcpy(s->buf + s->len, tmp, (size_t)n);
        s->len += (size_t)n;
        s->buf[s->len] = '\0';
        return 1;
}

/* Wait for pid until deadline; SIGKILL after. Returns the status; *killed if we had to. */
static int wait_bounded(pid_t pid, long long deadline, bool *killed)
{
        int st = 0;

        *killed = false;
        for (;;) {
                pid_t r = waitpid(pid, &st, WNOHANG);
                if (r == pid)
                        return st;
                if (r < 0 && errno != EINTR)
                        return -1;
                if (hx_now_ms() >= deadline) {
                        kill(pid, SIGKILL);
                        waitpid(pid, &st, 0);
                        *killed = true;
                        return st;
                }
                hx_sleep_ms(2);
        }
}

int hx_run(char *const argv[], const char *stdin_text, int uid, int timeout_ms, hx_run_result *ret)
{
        int in[2] = { -1, -1 }, out[2] = { -1, -1 }, err[2] = { -1, -1 };
        pid_t parent = getpid(), pid;
        sink so = { 0 }, se = { 0 };
        long long deadline = hx_now_ms() + timeout_ms;
        size_t in_off = 0, in_len = stdin_text ? strlen(stdin_text) : 0;
        bool killed = false;
        int st;

        memset(ret, 0, sizeof *ret);
        if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
                int r = -errno;
                for (int i = 0; i < 2; i++) {
                        if (in[i] >= 0) close(in[i]);
                        if (out[i] >= 0) close(out[i]);
                        if (err[i] >= 0) close(err[i]);
                }
                return r;
        }
        fflush(NULL);
        pid = fork();
        if (pid < 0) {
                int r = -errno;
                for (int i = 0; i < 2; i++) {
                        close(in[i]);
                        close(out[i]);
                        close(err[i]);
                }
                return r;
        }
        if (pid == 0) {
                sigset_t all;
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                if (getppid() != parent)
                        _exit(126);
                sigemptyset(&all);
                sigprocmask(SIG_SETMASK, &all, NULL);
                signal(SIGPIPE, SIG_DFL);
                if (dup2(in[0], 0) < 0 || dup2(out[1], 1) < 0 || dup2(err[1], 2) < 0)
                        _exit(126);
                if (uid >= 0 && drop_to((uid_t)uid, (gid_t)uid) < 0) {
                        dprintf(2, "harness: could not drop to uid %d\n", uid);
                        _exit(125);
                }
                execv(argv[0], argv);
                dprintf(2, "harness: exec %s: %s\n", argv[0], strerror(errno));
                _exit(127);
        }
        close(in[0]);
        close(out[1]);
        close(err[1]);
        if (in_len == 0) {
                close(in[1]);
                in[1] = -1;
        } else {
                fcntl(in[1], F_SETFL, O_NONBLOCK);
        }
        while (out[0] >= 0 || err[0] >= 0) {
                struct pollfd p[3] = {
                        { .fd = out[0], .events = POLLIN },
                        { .fd = err[0], .events = POLLIN },
                        { .fd = in[1], .events = POLLOUT },
                };
                int left = remaining(deadline);
                if (left == 0) {
                        killed = true;
                        break;
                }
                if (poll(p, 3, left) <= 0)
                        continue;
                if (p[0].revents) {
                        int r = sink_read(&so, out[0]);
                        if (r <= 0) {
                                close(out[0]);
                                out[0] = -1;
                        }
                }
                if (p[1].revents) {
                        int r = sink_read(&se, err[0]);
                        if (r <= 0) {
                                close(err[0]);
                                err[0] = -1;
                        }
                }
                if (in[1] >= 0 && p[2].revents) {
                        ssize_t n = (p[2].revents & (POLLERR | POLLHUP))
                                            ? -1
                                            : write(in[1], stdin_text + in_off, in_len - in_off);
                        if (n > 0)
                                in_off += (size_t)n;
                        if ((n < 0 && errno != EAGAIN && errno != EINTR) || in_off == in_len ||
                            (p[2].revents & (POLLERR | POLLHUP))) {
                                close(in[1]);
                                in[1] = -1;
                        }
                }
        }
        if (in[1] >= 0)
                close(in[1]);
        if (out[0] >= 0)
                close(out[0]);
        if (err[0] >= 0)
                close(err[0]);
        if (killed) {
                kill(pid, SIGKILL);
                waitpid(pid, &st, 0);
        } else {
                bool k2;
                st = wait_bounded(pid, deadline, &k2);
                killed = k2;
        }
        ret->status = st;
        ret->timed_out = killed;
        ret->exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        ret->out = so.buf ? so.buf : strdup("");
        ret->err = se.buf ? se.buf : strdup("");
        return 0;
}

int hx_ctlv(hx_broker *b, int uid, const char *const *args, int timeout_ms, hx_run_result *ret)
{
        char ctl[PATH_MAX];
        char *argv[64];
        size_t n = 0;

        if (hx_build_path("agent-brokerctl", ctl, sizeof ctl) < 0)
                return -ENAMETOOLONG;
        argv[n++] = ctl;
        argv[n++] = (char *)"--socket";
        argv[n++] = b->sock;
        argv[n++] = (char *)"--admin-socket";
        argv[n++] = b->admin_sock;
        for (size_t i = 0; args[i]; i++) {
                if (n >= 63)
                        return -E2BIG;
                argv[n++] = (char *)args[i];
        }
        argv[n] = NULL;
        return hx_run(argv, NULL, uid, timeout_ms, ret);
}

int hx_ctl(hx_broker *b, int uid, hx_run_result *ret, ...)
{
        const char *args[64];
        size_t n = 0;
        va_list ap;

        va_start(ap, ret);
        while (n < 63 && (args[n] = va_arg(ap, const char *)))
                n++;
        va_end(ap);
        args[n] = NULL;
        return hx_ctlv(b, uid, args, HX_RUN_TIMEOUT_MS, ret);
}

int hx_run_as(uid_t uid, gid_t gid, hx_child_fn fn, void *arg, int timeout_ms, char *ret_out, size_t outmax,
              int *ret_exit)
{
        int p[2];
        pid_t parent = getpid(), pid;
        sink s = { 0 };
        long long deadline = hx_now_ms() + timeout_ms;
        bool killed = false;
        int st;

        if (pipe2(p, O_CLOEXEC) < 0)
                return -errno;
        fflush(NULL);
        pid = fork();
        if (pid < 0) {
                int r = -errno;
                close(p[0]);
                close(p[1]);
                return r;
        }
        if (pid == 0) {
                char *buf;
                int rc;
                close(p[0]);
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                if (getppid() != parent)
                        _exit(126);
                if (drop_to(uid, gid) < 0) {
                        dprintf(p[1], "harness: could not drop to uid %u", (unsigned)uid);
                        _exit(125);
                }
                buf = calloc(1, outmax ? outmax : 1);
                if (!buf)
                        _exit(124);
                rc = fn(arg, buf, outmax);
                buf[outmax ? outmax - 1 : 0] = '\0';
                (void)write_all(p[1], buf, strlen(buf));
                _exit(rc & 0xff); /* _exit: no atexit handlers of the test process */
        }
        close(p[1]);
        for (;;) {
                struct pollfd pf = { .fd = p[0], .events = POLLIN };
                int left = remaining(deadline), r;
                if (left == 0) {
                        killed = true;
                        break;
                }
                if (poll(&pf, 1, left) <= 0)
                        continue;
                r = sink_read(&s, p[0]);
                if (r <= 0)
                        break;
        }
        close(p[0]);
        if (killed) {
                kill(pid, SIGKILL);
                waitpid(pid, &st, 0);
        } else {
                st = wait_bounded(pid, deadline, &killed);
        }
        if (ret_out && outmax) {
                snprintf(ret_out, outmax, "%s", s.buf ? s.buf : "");
        }
        free(s.buf);
        if (killed)
                return -ETIMEDOUT;
        *ret_exit = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        return 0;
}

/* ---- tokens --------------------------------------------------------------- */

static int b64url_val(char ch)
{
        if (ch >= 'A' && ch <= 'Z') return ch - 'A';
        if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
        if (ch >= '0' && ch <= '9') return ch - '0' + 52;
        if (ch == '-') return 62;
        if (ch == '_') return 63;
        return -1;
}

json_t *hx_jwt_segment_json(const char *token, int index)
{
        const char *start = token, *end;
        unsigned char *buf;
        size_t n = 0, len;
        unsigned acc = 0;
        int bits = 0;
        json_t *j;

        for (int i = 0; i < index; i++) {
                start = strchr(start, '.');
                if (!start)
                        return NULL;
                start++;
        }
        end = strchr(start, '.');
        len = end ? (size_t)(end - start) : strlen(start);
        buf = malloc(len + 1);
        if (!buf)
                return NULL;
        for (size_t i = 0; i < len; i++) {
                int v = b64url_val(start[i]);
                if (v < 0) {
                        free(buf);
                        return NULL;
                }
                acc = (acc << 6) | (unsigned)v;
                bits += 6;
                if (bits >= 8) {
                        bits -= 8;
                        buf[n++] = (unsigned char)((acc >> bits) & 0xff);
                }
        }
        j = json_loadb((const char *)buf, n, 0, NULL);
        free(buf);
        if (!json_is_object(j)) {
                json_decref(j);
                return NULL;
        }
        return j;
}

/* ---- cmocka fixtures and assertions ---------------------------------------- */

int hx_setup(void **state)
{
        hx_broker *b = calloc(1, sizeof *b);
        if (!b)
                return -1;
        if (hx_broker_init(b) < 0) {
                hx_broker_cleanup(b);
                free(b);
                return -1;
        }
        *state = b;
        return 0;
}

int hx_setup_policy(void **state, const char *policy_json, bool start)
{
        hx_broker *b;
        int r;

        if (hx_setup(state) < 0)
                return -1;
        b = *state;
        r = hx_broker_write_policy(b, policy_json);
        if (r == 0 && start) {
                r = hx_broker_start(b);
                if (r < 0) {
                        fprintf(stderr, "broker did not start: %s\n", strerror(-r));
                        hx_broker_dump_log(b);
                }
        }
        if (r < 0) {
                hx_broker_cleanup(b);
                free(b);
                *state = NULL;
                return -1;
        }
        return 0;
}

int hx_teardown(void **state)
{
        hx_broker *b = *state;
        int r = 0;

        if (b) {
                r = hx_broker_finish(b);
                free(b);
        }
        *state = NULL;
        return r;
}

int hx_fixture_setup(void **state)
{
        hx_fixture *f = calloc(1, sizeof *f);
        if (!f)
                return -1;
        if (hx_broker_init(&f->b) < 0) {
                hx_broker_cleanup(&f->b);
                free(f);
                return -1;
        }
        snprintf(f->work, sizeof f->work, "%s/work", f->b.dir);
        if (mkdir(f->work, 0755) < 0) {
                hx_broker_cleanup(&f->b);
                free(f);
                return -1;
        }
        *state = f;
        return 0;
}

int hx_fixture_teardown(void **state)
{
        hx_fixture *f = *state;
        int r;

        if (!f)
                return 0;
        if (f->helper > 0) {
                kill(f->helper, SIGKILL);
                waitpid(f->helper, NULL, 0);
        }
        /* lazily: the broker may still hold files open on it; it is stopped next */
        if (f->mnt[0] && umount2(f->mnt, MNT_DETACH) < 0)
                fprintf(stderr, "teardown: umount %s: %s\n", f->mnt, strerror(errno));
        r = hx_broker_finish(&f->b);
        free(f);
        *state = NULL;
        return r;
}

void hx_fixture_mount(hx_fixture *f, const char *where, const char *size)
{
        char opts[64];
        snprintf(opts, sizeof opts, "size=%s,mode=0700", size);
        (void)mkdir(where, 0700);
        if (mount("tmpfs", where, "tmpfs", MS_NOSUID | MS_NODEV, opts) < 0) {
                fprintf(stderr, "mount tmpfs on %s: %s\n", where, strerror(errno));
                fail();
        }
        snprintf(f->mnt, sizeof f->mnt, "%s", where);
}

void hx_add_arg(hx_broker *b, const char *arg)
{
        assert_true(b->n_extra_args < HX_MAX_EXTRA_ARGS);
        b->extra_args[b->n_extra_args++] = arg;
}

void hx_start(hx_broker *b)
{
        int r = hx_broker_start(b);
        if (r < 0) {
                fprintf(stderr, "broker did not start: %s\n", strerror(-r));
                hx_broker_dump_log(b);
        }
        assert_int_equal(r, 0);
}

void hx_stop_clean(hx_broker *b)
{
        int st = -1, r = hx_broker_stop(b, &st);
        if (r < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                fprintf(stderr, "broker stop: r=%d status=0x%x\n", r, (unsigned)st);
                hx_broker_dump_log(b);
        }
        assert_int_equal(r, 0);
        assert_true(WIFEXITED(st));
        assert_int_equal(WEXITSTATUS(st), 0);
}

hx_conn *hx_connect(hx_broker *b, const char *path)
{
        hx_conn *c = NULL;
        assert_int_equal(hx_conn_open(b, path, &c), 0);
        return c;
}

json_t *hx_call(hx_conn *c, const char *text)
{
        json_t *root = NULL;
        int r = hx_conn_call(c, text, &root);
        if (r != 1)
                fprintf(stderr, "call %.200s: %d (%s)\n", text, r, r < 0 ? strerror(-r) : "eof");
        assert_int_equal(r, 1);
        return root;
}

char *hx_call_msg(const char *method, json_t *params)
{
        json_t *m = json_pack("{s:s, s:o}", "method", method, "parameters", params ? params : json_object());
        char *text;
        assert_non_null(m);
        text = json_dumps(m, JSON_COMPACT);
        json_decref(m);
        assert_non_null(text);
        return text;
}

json_t *hx_rpc(hx_conn *c, const char *method, json_t *params)
{
        char *text = hx_call_msg(method, params);
        json_t *root = hx_call(c, text);
        free(text);
        return root;
}

void hx_assert_ok(const json_t *root)
{
        const char *e = hx_reply_error(root);
        if (e) {
                char *s = json_dumps(root, JSON_COMPACT);
                fprintf(stderr, "unexpected error reply %s\n", s ? s : "?");
                free(s);
        }
        assert_null(e);
}

void hx_assert_error_name(const json_t *root, const char *name)
{
        const char *e = hx_reply_error(root);
        if (!e || strcmp(e, name) != 0) {
                char *s = json_dumps(root, JSON_COMPACT);
                fprintf(stderr, "expected error %s, got %s\n", name, s ? s : "?");
                free(s);
        }
        assert_non_null(e);
        assert_string_equal(e, name);
}

void hx_assert_error(const json_t *root, const char *name)
{
        hx_assert_error_name(root, name);
        if (strncmp(name, "io.agentbroker.", 15) == 0) {
                const char *reason = hx_reply_str(root, "reason");
                assert_non_null(reason);
                assert_true(strlen(reason) > 0);
        }
}

void hx_path_in(char *out, size_t outmax, const char *dir, const char *name)
{
        int n = snprintf(out, outmax, "%s/%s", dir, name);
        assert_true(n > 0 && (size_t)n < outmax);
}

char *hx_read_text(const char *path, size_t max, size_t *ret_len)
{
        char *text = NULL;
        size_t len = 0;
        int r = hx_read_file(path, max, &text, &len);
        if (r < 0)
                fprintf(stderr, "read %s: %s\n", path, strerror(-r));
        assert_int_equal(r, 0);
        if (ret_len)
                *ret_len = len;
        return text;
}

void hx_set_test_clock(const char *path, long long offset)
{
        char text[32];
        struct timespec ts = { 0, 2000000 };
        snprintf(text, sizeof text, "%lld\n", offset);
        nanosleep(&ts, NULL);
        assert_int_equal(hx_write_file(path, text, 0644), 0);
}

static const char py_jwt_verify[] =
        "import json, sys\n"
        "import jwt\n"
        "jwks = json.load(open(sys.argv[1]))\n"
        "audience = sys.argv[2]\n"
        "jwk = jwt.PyJWK(jwks['keys'][0])\n"
        "key = getattr(jwk, 'key', jwk)\n"
        "for line in sys.stdin:\n"
        "    tok = line.strip()\n"
        "    if not tok:\n"
        "        continue\n"
        "    try:\n"
        "        claims = jwt.decode(tok, key, algorithms=['EdDSA'], audience=audience,\n"
        "                            options={'require': ['exp', 'iat', 'nbf', 'iss', 'sub', 'aud', 'jti']})\n"
        "        header = jwt.get_unverified_header(tok)\n"
        "        print(json.dumps({'valid': True, 'claims': claims, 'header': header}))\n"
        "    except Exception as e:\n"
        "        print(json.dumps({'valid': False, 'error': type(e).__name__, 'message': str(e)}))\n"
        "    sys.stdout.flush()\n";

json_t *hx_py_jwt_verify(hx_broker *b, const char *jwks_json, const char *audience, char *const *tokens, size_t n)
{
        char script[PATH_MAX], jwks_path[PATH_MAX], *input, *line, *save = NULL;
        size_t size = 1, off = 0;
        hx_run_result res;
        json_t *results = json_array();

        assert_int_equal(access("/usr/bin/python3", X_OK), 0);
        snprintf(script, sizeof script, "%s/verify.py", b->dir);
        snprintf(jwks_path, sizeof jwks_path, "%s/jwks.json", b->dir);
        assert_int_equal(hx_write_file(script, py_jwt_verify, 0644), 0);
        assert_int_equal(hx_write_file(jwks_path, jwks_json, 0644), 0);
        for (size_t i = 0; i < n; i++)
                size += strlen(tokens[i]) + 1;
        input = malloc(size);
        assert_non_null(input);
        for (size_t i = 0; i < n; i++)
                off += (size_t)snprintf(input + off, size - off, "%s\n", tokens[i]);
        input[off] = '\0';
        char *argv[] = { (char *)"/usr/bin/python3", script, jwks_path, (char *)audience, NULL };
        assert_int_equal(hx_run(argv, input, -1, HX_RUN_TIMEOUT_MS, &res), 0);
        free(input);
        if (res.exit_code != 0)
                fprintf(stderr, "verifier failed (%d): %s\n", res.exit_code, res.err);
        assert_false(res.timed_out);
        assert_int_equal(res.exit_code, 0);
        for (line = strtok_r(res.out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                json_t *j = json_loads(line, 0, NULL);
                assert_non_null(j);
                json_array_append_new(results, j);
        }
        hx_run_result_done(&res);
        assert_int_equal(json_array_size(results), n);
        return results;
}

char *hx_jwt_tamper(const char *token, int seg)
{
        char *t = strdup(token), *start, *end;
        size_t len, i;

        assert_non_null(t);
        start = t;
        for (int k = 0; k < seg; k++)
                start = strchr(start, '.') + 1;
        end = strchr(start, '.');
        len = end ? (size_t)(end - start) : strlen(start);
        assert_true(len > 8);
        i = len / 2;
        start[i] = start[i] == 'A' ? 'g' : 'A';
        return t;
}
