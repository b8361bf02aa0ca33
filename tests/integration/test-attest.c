/* SPDX-License-Identifier: MIT */
/*
 * Attestation under attack: a connection whose process has exited, a PID
 * recycled (forced through /proc/sys/kernel/ns_last_pid) by a process that
 * policy would grant, and a process that execs another binary after
 * connecting.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include "harness.h"

static const char issue_msg[] =
        "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"mcp://t\",\"scopes\":[\"r\"]}}";

/* root is granted; nobody is not */
static const char root_policy[] =
        "{\"version\":1,\"agents\":[{\"id\":\"root-agent\",\"owner\":\"ops@example.com\","
        "\"match\":{\"uid\":0},\"grants\":[{\"audience\":\"mcp://t\",\"scopes\":[\"r\"],\"max_ttl\":60}]}]}";

static int setup(void **state)
{
        return hx_setup_policy(state, root_policy, true);
}

static int connect_to(const char *path)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
                return -1;
        return fd;
}

static int send_fd(int chan, int fd)
{
        char c = 'x', cbuf[CMSG_SPACE(sizeof(int))];
        struct iovec iov = { &c, 1 };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof fd);
        return sendmsg(chan, &mh, 0) == 1 ? 0 : -1;
}

static int recv_fd(int chan)
{
        char c, cbuf[CMSG_SPACE(sizeof(int))];
        struct iovec iov = { &c, 1 };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
        struct cmsghdr *cm;
        int fd = -1;
        if (recvmsg(chan, &mh, MSG_CMSG_CLOEXEC) != 1)
                return -1;
        cm = CMSG_FIRSTHDR(&mh);
        if (cm && cm->cmsg_type == SCM_RIGHTS)
                memcpy(&fd, CMSG_DATA(cm), sizeof fd);
        return fd;
}

/* A child (as uid) connects, hands the connection to us over chan and exits; returns its pid. */
static pid_t connect_in_child(const char *sock, uid_t uid, int *ret_fd)
{
        int sp[2];
        pid_t pid;

        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) < 0)
                return -1;
        pid = fork();
        if (pid == 0) {
                int fd;
                close(sp[0]);
                if (uid != 0 && (setgroups(0, NULL) < 0 || setresgid(uid, uid, uid) < 0 || setresuid(uid, uid, uid) < 0))
                        _exit(2);
                fd = connect_to(sock);
                if (fd < 0 || send_fd(sp[1], fd) < 0)
                        _exit(3);
                _exit(0);
        }
        close(sp[1]);
        *ret_fd = recv_fd(sp[0]);
        close(sp[0]);
        waitpid(pid, NULL, 0);
        return pid;
}

static json_t *call_fd(int fd, const char *msg)
{
        char buf[16384];
        size_t got = 0;
        if (send(fd, msg, strlen(msg) + 1, MSG_NOSIGNAL) < 0)
                return NULL;
        while (got < sizeof buf - 1) {
                ssize_t n = recv(fd, buf + got, sizeof buf - 1 - got, 0);
                if (n <= 0)
                        return NULL;
                got += (size_t)n;
                if (memchr(buf, '\0', got))
                        break;
        }
        buf[got] = '\0';
        return json_loads(buf, 0, NULL);
}

/* The connecting process exited: nobody inherits its connection's identity. */
static void test_peer_gone(void **state)
{
        hx_broker *b = *state;
        int fd = -1;
        json_t *r;

        /* root (granted) connects and exits; we (also root) use its connection */
        assert_true(connect_in_child(b->sock, 0, &fd) > 0);
        assert_true(fd >= 0);
        r = call_fd(fd, issue_msg);
        assert_non_null(r);
        assert_string_equal(json_string_value(json_object_get(r, "error")), "io.agentbroker.PeerGone");
        json_decref(r);
        close(fd);
}

/* Force the PID of an exited, unprivileged peer onto a new root process. */
static void test_recycled_pid(void **state)
{
        hx_broker *b = *state;
        int fd = -1, lp;
        pid_t victim, again = 0;
        int sync[2];
        json_t *r;
        char v[32];

        lp = open("/proc/sys/kernel/ns_last_pid", O_RDWR | O_CLOEXEC);
        if (lp < 0) {
                fprintf(stderr, "skip: /proc/sys/kernel/ns_last_pid not writable here (%s)\n", strerror(errno));
                skip();
        }
        victim = connect_in_child(b->sock, HX_NOBODY_UID, &fd);
        assert_true(victim > 0 && fd >= 0);
        assert_int_equal(pipe(sync), 0);
        /* a root process (which policy grants) now takes the victim's PID */
        for (int tries = 0; tries < 50 && again != victim; tries++) {
                if (again > 0) {
                        kill(again, SIGKILL);
                        waitpid(again, NULL, 0);
                }
                snprintf(v, sizeof v, "%d", (int)victim - 1);
                assert_true(pwrite(lp, v, strlen(v), 0) > 0);
                again = fork();
                if (again == 0) {
                        char c;
                        close(sync[1]);
                        (void)!read(sync[0], &c, 1); /* stay alive while the request is made */
                        _exit(0);
                }
        }
        close(lp);
        close(sync[0]);
        if (again != victim) {
                fprintf(stderr, "skip: could not recycle pid %d (got %d)\n", (int)victim, (int)again);
                kill(again, SIGKILL);
                waitpid(again, NULL, 0);
                close(sync[1]);
                close(fd);
                skip();
        }
        printf("    pid %d recycled by a root process\n", (int)victim);
        r = call_fd(fd, issue_msg);
        close(sync[1]);
        waitpid(again, NULL, 0);
        assert_non_null(r);
        /* never a token: the connection belongs to the exited nobody process */
        assert_null(json_object_get(json_object_get(r, "parameters"), "token"));
        assert_string_equal(json_string_value(json_object_get(r, "error")), "io.agentbroker.PeerGone");
        json_decref(r);
        close(fd);
}

/* Restart b with one agent, "pinned": uid 0 and this test binary's sha256, granted mcp://t r. */
static void restart_pinned_to_self(hx_broker *b)
{
        char policy[2048], sha[65], self[4096];
        int st;
        ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);

        assert_true(n > 0);
        self[n] = '\0';
        assert_int_equal(hx_sha256_file(self, sha), 0);
        snprintf(policy, sizeof policy,
                 "{\"version\":1,\"agents\":[{\"id\":\"pinned\",\"owner\":\"ops@example.com\","
                 "\"match\":{\"uid\":0,\"sha256\":\"%s\"},\"grants\":[{\"audience\":\"mcp://t\",\"scopes\":[\"r\"],"
                 "\"max_ttl\":60}]}]}", sha);
        assert_int_equal(hx_broker_stop(b, &st), 0);
        assert_int_equal(hx_broker_write_policy(b, policy), 0);
        assert_int_equal(hx_broker_start(b), 0);
}

/* A process that execs another binary after connecting is attested as the new binary. */
static void test_exec_after_connect(void **state)
{
        hx_broker *b = *state;

        /* grant only this test binary's hash; then exec /bin/sh on the same connection */
        restart_pinned_to_self(b);

        pid_t pid = fork();
        if (pid == 0) {
                /* connect as the granted binary, then exec sh, which asks on the same connection */
                int c2 = connect_to(b->sock);
                char cmd[4096];
                if (c2 < 0 || fcntl(c2, F_SETFD, 0) < 0)
                        _exit(3);
                snprintf(cmd, sizeof cmd,
                         "printf '%%s\\0' '%s' >&%d; dd bs=4096 count=1 <&%d 2>/dev/null | tr -d '\\0' > %s/exec.out",
                         issue_msg, c2, c2, b->dir);
                execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
                _exit(127);
        }
        waitpid(pid, NULL, 0);
        char path[4200], *text = NULL;
        snprintf(path, sizeof path, "%s/exec.out", b->dir);
        assert_int_equal(hx_read_file(path, 1 << 16, &text, NULL), 0);
        printf("    after exec of /bin/sh on its own connection: %.100s\n", text);
        assert_null(strstr(text, "\"token\""));
        assert_non_null(strstr(text, "io.agentbroker.NotAnAgent"));
        free(text);
}

/*
 * The process cache (what is known about a process for its next
 * connections) must not outlive an exec: the granted binary gets a token on
 * one connection, then execs another program (same pid, same start time,
 * same pidfs inode), which opens a new connection and must be refused.
 */
static void test_exec_then_new_connection(void **state)
{
        hx_broker *b = *state;
        char helper[PATH_MAX], out[4200];
        int st;

        if (hx_under_wrapper()) {
                /* the broker sees the tool's executable, not this test's, so the first token fails */
                printf("SKIPPED: sha256 of this process under AB_TEST_WRAPPER\n");
                skip();
        }
        assert_int_equal(hx_build_path("tests/helper-issue", helper, sizeof helper), 0);
        restart_pinned_to_self(b);
        snprintf(out, sizeof out, "%s/exec2.out", b->dir);

        pid_t pid = fork();
        if (pid == 0) {
                int fd = connect_to(b->sock), o;
                json_t *r = fd < 0 ? NULL : call_fd(fd, issue_msg);
                if (!r || !json_is_object(json_object_get(r, "parameters")) ||
                    !json_object_get(json_object_get(r, "parameters"), "token"))
                        _exit(3); /* the granted binary must get its token first */
                close(fd);
                o = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
                if (o < 0 || dup2(o, 1) < 0)
                        _exit(4);
                execl(helper, helper, b->sock, "mcp://t", "r", (char *)NULL);
                _exit(127);
        }
        assert_int_equal(waitpid(pid, &st, 0), pid);
        assert_true(WIFEXITED(st));
        if (WEXITSTATUS(st) != 1)
                fprintf(stderr, "child exit %d\n", WEXITSTATUS(st));
        assert_int_equal(WEXITSTATUS(st), 1); /* helper-issue: denied */
        char *text = NULL;
        assert_int_equal(hx_read_file(out, 1 << 16, &text, NULL), 0);
        printf("    after exec of helper-issue, on a new connection: %.100s\n", text);
        assert_null(strstr(text, "OK "));
        assert_non_null(strstr(text, "io.agentbroker.NotAnAgent"));
        free(text);
}

/* Copy file from to to (mode 0755). */
static void copy_exec(const char *from, const char *to)
{
        char *data = NULL;
        size_t len = 0;
        int fd;

        assert_int_equal(hx_read_file(from, 64 << 20, &data, &len), 0);
        fd = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, data, len), (ssize_t)len);
        assert_int_equal(close(fd), 0);
        free(data);
}

/*
 * Run helper-issue as path, in a mount namespace of its own where fake (if
 * any) is bind-mounted over path; with userns, in a user namespace of its
 * own too (unshare -Urm, uid 0 mapped to itself), as an unprivileged user
 * would do it.
 */
static int issue_as_path(hx_broker *b, const char *path, const char *fake, bool userns)
{
        int st;
        pid_t pid = fork();

        if (pid == 0) {
                int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
                if (null >= 0)
                        (void)dup2(null, 1);
                if (userns) /* as a user would (util-linux, not unshare(2) here: a sanitizer's threads) */
                        execl("/usr/bin/unshare", "unshare", "-Urm", "--propagation", "private", "sh", "-c",
                              fake ? "mount --bind \"$1\" \"$2\" && exec \"$2\" \"$3\" mcp://t r"
                                   : "exec \"$2\" \"$3\" mcp://t r",
                              "sh", fake ? fake : "-", path, b->sock, (char *)NULL);
                if (userns)
                        _exit(6);
                if (fake && (unshare(CLONE_NEWNS) < 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0 ||
                             mount(fake, path, NULL, MS_BIND, NULL) < 0))
                        _exit(5);
                execl(path, path, b->sock, "mcp://t", "r", (char *)NULL);
                _exit(127);
        }
        assert_int_equal(waitpid(pid, &st, 0), pid);
        assert_true(WIFEXITED(st));
        return WEXITSTATUS(st);
}

/*
 * The exe selector is the file, not only its path: a process that runs
 * another file at the policy's path (bind-mounted there in a mount
 * namespace of its own, as any user can with unshare -Urm) is not the
 * agent. Before, the path text alone decided, and it got the token.
 */
static void test_exe_selector_is_the_file(void **state)
{
        hx_broker *b = *state;
        char helper[PATH_MAX], dir[PATH_MAX], tool[PATH_MAX + 16], fake[PATH_MAX + 16], policy[2 * PATH_MAX];
        int st;

        if (hx_under_wrapper()) {
                printf("SKIPPED: the broker sees the wrapper's executable\n");
                skip();
        }
        assert_int_equal(hx_build_path("tests/helper-issue", helper, sizeof helper), 0);
        snprintf(dir, sizeof dir, "%s/bin", b->dir);
        assert_int_equal(mkdir(dir, 0755), 0);
        snprintf(tool, sizeof tool, "%s/agent-tool", dir);
        snprintf(fake, sizeof fake, "%s/other-tool", dir);
        copy_exec(helper, tool);
        copy_exec(helper, fake); /* the same bytes, another file */
        snprintf(policy, sizeof policy,
                 "{\"version\":1,\"agents\":[{\"id\":\"tool\",\"owner\":\"ops@example.com\","
                 "\"match\":{\"uid\":0,\"exe\":\"%s\"},\"grants\":[{\"audience\":\"mcp://t\",\"scopes\":[\"r\"],"
                 "\"max_ttl\":60}]}]}",
                 tool);
        assert_int_equal(hx_broker_stop(b, &st), 0);
        assert_int_equal(hx_broker_write_policy(b, policy), 0);
        assert_int_equal(hx_broker_start(b), 0);

        assert_int_equal(issue_as_path(b, tool, NULL, false), 0); /* the file itself: a token */
        assert_int_equal(issue_as_path(b, fake, NULL, false), 1); /* another path: denied */
        assert_int_equal(issue_as_path(b, tool, fake, false), 1); /* another file at the path: denied */
        assert_int_equal(issue_as_path(b, tool, fake, true), 1);  /* the same from a user namespace */
        assert_int_equal(issue_as_path(b, tool, NULL, true), 0);  /* the file itself, from one: a token */
        assert_int_equal(issue_as_path(b, tool, NULL, false), 0);
}

/*
 * Hashing a new executable must not hold up anyone else. nobody (no agent)
 * runs a 400 MiB copy of python3 (sparse: the padding costs no disk) and
 * changes its mtime before each of 3 WhoAmI calls, so that each needs the
 * whole file hashed anew (about a second each here). Meanwhile root's 20
 * IssueToken calls are all answered before nobody's first reply: the
 * hashing runs off the event loop. (On the loop, each of root's calls
 * waited for a hash to finish.)
 */
static void test_large_new_executable_does_not_stall_others(void **state)
{
        hx_broker *b = *state;
        static const char script[] =
                "import os, socket, sys, time\n"
                "exe = os.readlink('/proc/self/exe')\n"
                "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                "print('ready', flush=True)\n"
                "for i in range(3):\n"
                "    os.utime(exe, None)\n"
                "    s.sendall(b'{\"method\":\"io.agentbroker.WhoAmI\"}\\0')\n"
                "    buf = b''\n"
                "    while not buf.endswith(b'\\0'):\n"
                "        d = s.recv(65536)\n"
                "        if not d: sys.exit(3)\n"
                "        buf += d\n"
                "    print('reply %d %.6f' % (i, time.clock_gettime(time.CLOCK_MONOTONIC)), flush=True)\n";
        char dir[] = "/tmp/ab-bigexe.XXXXXX", exe[64], py[64], line[256];
        struct timespec done;
        double first_reply = -1, victim_done;
        int out[2], fd, st = 0;
        pid_t pid;
        FILE *f;

        if (access("/usr/bin/python3", X_OK) != 0)
                skip();
        assert_non_null(mkdtemp(dir));
        assert_int_equal(chmod(dir, 0755), 0);
        snprintf(exe, sizeof exe, "%s/python3-big", dir);
        snprintf(py, sizeof py, "%s/attacker.py", dir);
        {
                char *data = NULL;
                size_t len = 0;
                assert_int_equal(hx_read_file("/usr/bin/python3", 64 << 20, &data, &len), 0);
                assert_int_equal(hx_write_file(py, script, 0644), 0);
                fd = open(exe, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
                assert_true(fd >= 0);
                assert_int_equal(write(fd, data, len), (ssize_t)len);
                assert_int_equal(ftruncate(fd, 400 << 20), 0);
                close(fd);
                free(data);
                assert_int_equal(chown(exe, HX_NOBODY_UID, HX_NOBODY_GID), 0); /* nobody may touch it */
        }
        assert_int_equal(pipe2(out, O_CLOEXEC), 0);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                dup2(out[1], 1);
                if (setgroups(0, NULL) < 0 || setresgid(HX_NOBODY_GID, HX_NOBODY_GID, HX_NOBODY_GID) < 0 ||
                    setresuid(HX_NOBODY_UID, HX_NOBODY_UID, HX_NOBODY_UID) < 0)
                        _exit(2);
                execl(exe, exe, py, b->sock, (char *)NULL);
                _exit(127);
        }
        close(out[1]);
        f = fdopen(out[0], "r");
        assert_non_null(f);
        assert_non_null(fgets(line, sizeof line, f));
        assert_string_equal(line, "ready\n");
        nanosleep(&(struct timespec){ 0, 200000000L }, NULL); /* its first call is in, its file being hashed */
        {
                int c = connect_to(b->sock);
                assert_true(c >= 0);
                for (int i = 0; i < 20; i++) {
                        json_t *r = call_fd(c, issue_msg);
                        assert_non_null(r);
                        assert_null(json_object_get(r, "error"));
                        json_decref(r);
                }
                close(c);
        }
        clock_gettime(CLOCK_MONOTONIC, &done);
        victim_done = (double)done.tv_sec + (double)done.tv_nsec / 1e9;
        while (fgets(line, sizeof line, f)) {
                int i;
                double t;
                if (sscanf(line, "reply %d %lf", &i, &t) == 2 && i == 0)
                        first_reply = t;
        }
        fclose(f);
        assert_int_equal(waitpid(pid, &st, 0), pid);
        assert_true(WIFEXITED(st));
        assert_int_equal(WEXITSTATUS(st), 0); /* its 3 calls were answered */
        fprintf(stderr, "root's 20 calls done %.3f s before nobody's first reply\n", first_reply - victim_done);
        assert_true(first_reply > 0);
        assert_true(victim_done < first_reply);
        unlink(exe);
        unlink(py);
        rmdir(dir);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_peer_gone, setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_recycled_pid, setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_exec_after_connect, setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_exec_then_new_connection, setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_exe_selector_is_the_file, setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_large_new_executable_does_not_stall_others, setup, hx_teardown),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
