/* SPDX-License-Identifier: MIT */
/*
 * Torture suite: the broker under everything a local attacker or a failing
 * machine can do. Each case ends by checking that a well-behaved client is
 * still answered correctly, and that the broker's file descriptors and
 * memory went back to where they were.
 *
 * Scale: TORTURE_SCALE=1 (CI, default) or 10 (the full run: 2,000 idle
 * connections, 100k flood requests, ...). Figures are printed, never
 * asserted as timings.
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
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include "../integration/harness.h"

static int scale = 1;

static const char policy_json[] =
        "{\"version\":1,\"agents\":["
        "{\"id\":\"root-agent\",\"owner\":\"ops@example.com\",\"match\":{\"user\":\"@broker\"},"
        " \"session\":{\"max_lifetime\":\"1h\",\"reauth_interval\":\"15m\"},"
        " \"grants\":[{\"audience\":\"mcp://t\",\"scopes\":[\"r\",\"w\"],\"max_ttl\":600}]},"
        "{\"id\":\"nobody-agent\",\"owner\":\"ops@example.com\",\"match\":{\"uid\":65534},"
        " \"grants\":[{\"audience\":\"mcp://t\",\"scopes\":[\"r\"],\"max_ttl\":600}]}]}";

static const char issue_msg[] =
        "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"mcp://t\",\"scopes\":[\"r\"]}}";

/* A well-behaved client: a fresh connection gets GetInfo and a token. */
static void assert_serves(hx_broker *b)
{
        hx_conn *c = NULL;
        json_t *r = NULL;
        long long t0 = hx_now_ms();

        assert_int_equal(hx_conn_open(b, b->sock, &c), 0);
        assert_int_equal(hx_conn_call(c, "{\"method\":\"org.varlink.service.GetInfo\"}", &r), 1);
        assert_null(hx_reply_error(r));
        json_decref(r);
        assert_int_equal(hx_conn_call(c, issue_msg, &r), 1);
        if (hx_reply_error(r))
                fprintf(stderr, "torture: issue failed: %s %s\n", hx_reply_error(r), hx_reply_str(r, "reason"));
        assert_null(hx_reply_error(r));
        assert_non_null(hx_reply_str(r, "token"));
        json_decref(r);
        hx_conn_close(b, c);
        printf("    well-behaved client answered in %lld ms\n", hx_now_ms() - t0);
}

static int setup(void **state)
{
        struct rlimit rl = { 65536, 65536 };
        hx_broker *b;

        setrlimit(RLIMIT_NOFILE, &rl);
        if (hx_setup_policy(state, policy_json, false) < 0)
                return -1;
        b = *state;
        hx_add_arg(b, "--max-connections");
        hx_add_arg(b, "8192");
        hx_add_arg(b, "--max-connections-per-uid");
        hx_add_arg(b, "6000");
        hx_add_arg(b, "--rate-limit");
        hx_add_arg(b, "3000/3000");
        hx_add_arg(b, "--idle-timeout");
        hx_add_arg(b, "60");
        return hx_broker_start(b) == 0 ? 0 : -1;
}

/* Raw connections that do not go through the harness's table (it holds 32). */
static int raw_connect(const char *path)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
                int r = -errno;
                close(fd);
                return r;
        }
        return fd;
}

/* ---- 1. many idle, slow, deaf and vanishing clients ------------------------- */

static void test_slowloris(void **state)
{
        hx_broker *b = *state;
        int n = 200 * scale, *fds = calloc((size_t)n, sizeof *fds), fd0, fd1, held = 0;
        long rss0 = hx_proc_status_kb(b->pid, "VmRSS:"), rss1;
        char big[8192];

        assert_non_null(fds);
        fd0 = hx_proc_fd_count(b->pid);
        for (int i = 0; i < n; i++) {
                fds[i] = raw_connect(b->sock);
                if (fds[i] >= 0)
                        held++;
                switch (i % 4) {
                case 0: break;                                                  /* idle */
                case 1: (void)!write(fds[i], "{\"meth", 6); break;               /* half a message */
                case 2:                                                          /* never reads */
                        for (int k = 0; k < 20; k++)
                                (void)!write(fds[i], issue_msg, sizeof issue_msg);
                        break;
                case 3: (void)!write(fds[i], "{\"method\":\"org.varlink.ser", 26); /* then vanishes */
                        close(fds[i]);
                        fds[i] = -1;
                        break;
                }
        }
        printf("    %d connections opened (%d held), broker fds %d -> %d\n", n, held, fd0, hx_proc_fd_count(b->pid));
        /* one byte at a time on a few of them while the good client is served */
        for (int round = 0; round < 5; round++) {
                for (int i = 1; i < n; i += 40)
                        if (fds[i] >= 0)
                                (void)!write(fds[i], "x", 1);
                assert_serves(b);
                usleep(100 * 1000);
        }
        /* a burst that fills socket buffers of a deaf client */
        memset(big, ' ', sizeof big);
        for (int i = 2; i < n; i += 4)
                if (fds[i] >= 0)
                        (void)!send(fds[i], big, sizeof big, MSG_DONTWAIT | MSG_NOSIGNAL);
        assert_serves(b);
        for (int i = 0; i < n; i++)
                if (fds[i] >= 0)
                        close(fds[i]);
        free(fds);
        /* the broker notices the closes on its next loop turns */
        long long until = hx_now_ms() + 5000;
        while ((fd1 = hx_proc_fd_count(b->pid)) > fd0 + 2 && hx_now_ms() < until)
                usleep(50 * 1000);
        rss1 = hx_proc_status_kb(b->pid, "VmRSS:");
        printf("    after close: broker fds %d (baseline %d), RSS %ld KiB (baseline %ld KiB)\n", fd1, fd0, rss1, rss0);
        assert_true(fd1 <= fd0 + 2);
        assert_serves(b);
}

/* ---- 2. hostile bytes ----------------------------------------------------- */

static void test_hostile_messages(void **state)
{
        hx_broker *b = *state;
        static const char *const msgs[] = {
                "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"a\",\"scopes\":[\"r\"],\"ttl\":1e309}}",
                "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"a\",\"scopes\":[\"r\"],\"ttl\":-99999999999999999999}}",
                "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"\\u0000x\",\"scopes\":[\"r\"]}}",
                "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"\xff\xfe\",\"scopes\":[\"r\"]}}",
                "{\"method\":\"io.agentbroker.Introspect\",\"parameters\":{\"token\":\"a.b.c\\u0000\"}}",
                "{\"method\":\"io.agentbroker.Revoke\",\"parameters\":{\"jti\":[1,2,3]}}",
                "{\"method\":\"io.agentbroker.Attenuate\",\"parameters\":{\"token\":{}}}",
                "[1,2,3]",
                "\"just a string\"",
                "{\"method\":\"io.agentbroker..IssueToken\"}",
                "{\"method\":\"io.agentbroker.IssueToken\",\"method\":\"x.Y\"}",
        };
        unsigned answered = 0, closed = 0;
        uint32_t seed = 12345;

        for (size_t i = 0; i < sizeof msgs / sizeof msgs[0]; i++) {
                hx_conn *c = NULL;
                json_t *r = NULL;
                assert_int_equal(hx_conn_open(b, b->sock, &c), 0);
                int k = hx_conn_call(c, msgs[i], &r);
                if (k == 1) {
                        assert_non_null(hx_reply_error(r)); /* an error, never a token */
                        answered++;
                } else {
                        closed++;
                }
                json_decref(r);
                hx_conn_close(b, c);
        }
        /* deep nesting, both as array and object */
        {
                size_t depth = 20000;
                char *deep = malloc(depth * 2 + 64);
                hx_conn *c = NULL;
                json_t *r = NULL;
                assert_non_null(deep);
                memset(deep, '[', depth);
                memset(deep + depth, ']', depth);
                deep[depth * 2] = '\0';
                assert_int_equal(hx_conn_open(b, b->sock, &c), 0);
                if (hx_conn_call(c, deep, &r) == 1) {
                        assert_non_null(hx_reply_error(r));
                        answered++;
                }
                json_decref(r);
                hx_conn_close(b, c);
                free(deep);
        }
        /* random garbage, truncated and oversized messages */
        for (int i = 0; i < 50 * scale; i++) {
                char buf[2048];
                size_t len = (seed = seed * 1103515245u + 12345u) % sizeof buf;
                int fd = raw_connect(b->sock);
                assert_true(fd >= 0);
                for (size_t k = 0; k < len; k++)
                        buf[k] = (char)((seed = seed * 1103515245u + 12345u) >> 16);
                (void)!send(fd, buf, len, MSG_NOSIGNAL);
                if (i % 3 == 0)
                        (void)!send(fd, "", 1, MSG_NOSIGNAL); /* a NUL: a complete (bad) message */
                close(fd);
        }
        {
                size_t big = 70000;
                char *m = malloc(big);
                hx_conn *c = NULL;
                assert_non_null(m);
                memset(m, 'a', big);
                assert_int_equal(hx_conn_open(b, b->sock, &c), 0);
                (void)hx_conn_send(c, m, big);
                json_t *r = NULL;
                if (hx_conn_recv_json(c, 5000, &r) == 1) {
                        assert_string_equal(hx_reply_error(r), "io.agentbroker.MessageTooLarge");
                        answered++;
                }
                json_decref(r);
                assert_true(hx_conn_wait_closed(c, 5000) >= 0);
                hx_conn_close(b, c);
                free(m);
        }
        printf("    hostile messages: %u answered with an error, %u closed\n", answered, closed);
        assert_serves(b);
}

/* ---- 3. a flood from one uid, another uid keeps being served ----------------- */

typedef struct flood_arg {
        const char *sock;
        int n;
} flood_arg;

static int nobody_issues(void *arg, char *out, size_t outmax)
{
        const char *sock = arg;
        int ok = 0, fail = 0;
        for (int i = 0; i < 50; i++) {
                int fd = raw_connect(sock);
                char buf[4096];
                ssize_t n, got = 0;
                if (fd < 0) {
                        fail++;
                        continue;
                }
                (void)!send(fd, issue_msg, sizeof issue_msg, MSG_NOSIGNAL);
                while ((n = recv(fd, buf + got, sizeof buf - 1 - (size_t)got, 0)) > 0) {
                        got += n;
                        if (memchr(buf, '\0', (size_t)got))
                                break;
                }
                buf[got > 0 ? got : 0] = '\0';
                if (strstr(buf, "\"token\""))
                        ok++;
                else
                        fail++;
                close(fd);
                usleep(20 * 1000);
        }
        snprintf(out, outmax, "%d %d", ok, fail);
        return 0;
}

static void test_flood_fairness(void **state)
{
        hx_broker *b = *state;
        int total = 10000 * scale, conns = 8, sent = 0, replies = 0, limited = 0, granted = 0;
        int fds[8];
        pid_t nob;
        int pipefd[2];
        char out[64] = "";
        long long t0 = hx_now_ms();

        /* nobody's client runs meanwhile, in a child */
        assert_int_equal(pipe(pipefd), 0);
        nob = fork();
        assert_true(nob >= 0);
        if (nob == 0) {
                char res[64];
                int ex = 0;
                close(pipefd[0]);
                if (hx_run_as(65534, 65534, nobody_issues, (void *)b->sock, 30000, res, sizeof res, &ex) != 0)
                        snprintf(res, sizeof res, "0 -1");
                (void)!write(pipefd[1], res, strlen(res));
                _exit(0);
        }
        close(pipefd[1]);
        for (int i = 0; i < conns; i++) {
                fds[i] = raw_connect(b->sock);
                assert_true(fds[i] >= 0);
                fcntl(fds[i], F_SETFL, O_NONBLOCK);
        }
        /* pipelined: keep up to 64 requests in flight per connection */
        int inflight[8] = { 0 };
        char buf[65536];
        while (replies < total) {
                for (int i = 0; i < conns; i++) {
                        while (sent < total && inflight[i] < 64 &&
                               send(fds[i], issue_msg, sizeof issue_msg, MSG_NOSIGNAL | MSG_DONTWAIT) == sizeof issue_msg) {
                                inflight[i]++;
                                sent++;
                        }
                        ssize_t n = recv(fds[i], buf, sizeof buf, MSG_DONTWAIT);
                        for (ssize_t k = 0; k < n; k++)
                                if (buf[k] == '\0') {
                                        replies++;
                                        inflight[i]--;
                                }
                        if (n > 0) {
                                buf[n - 1] = '\0';
                                if (strstr(buf, "RateLimited"))
                                        limited++;
                                if (strstr(buf, "\"token\""))
                                        granted++;
                        }
                }
                if (hx_now_ms() - t0 > 120000)
                        break;
        }
        for (int i = 0; i < conns; i++)
                close(fds[i]);
        ssize_t n = read(pipefd[0], out, sizeof out - 1);
        out[n > 0 ? n : 0] = '\0';
        close(pipefd[0]);
        waitpid(nob, NULL, 0);
        int ok = 0, fail = 0;
        sscanf(out, "%d %d", &ok, &fail);
        printf("    flood: %d requests, %d replies in %lld ms (rate-limited replies seen in %d reads); "
               "nobody meanwhile: %d ok, %d failed\n",
               sent, replies, hx_now_ms() - t0, limited, ok, fail);
        assert_int_equal(replies, total);
        assert_true(limited > 0); /* the flooding uid hit its rate limit, with a clear error */
        assert_true(ok >= 45); /* the other uid is served during the flood */
        assert_serves(b);
}

/* ---- 4. clock jumps --------------------------------------------------------- */

static void test_clock_jumps(void **state)
{
        hx_broker *b = *state;
        char clock[PATH_MAX + 16], *tok = NULL;
        hx_conn *c = NULL;
        json_t *r = NULL;
        int st;

        /* restart with an injectable clock */
        assert_int_equal(hx_broker_stop(b, &st), 0);
        snprintf(clock, sizeof clock, "%s/clock", b->dir);
        assert_int_equal(hx_write_file(clock, "0\n", 0644), 0);
        setenv("AGENT_BROKER_TEST_CLOCK", clock, 1);
        assert_int_equal(hx_broker_start(b), 0);
        unsetenv("AGENT_BROKER_TEST_CLOCK");

        assert_int_equal(hx_conn_open(b, b->sock, &c), 0);
        assert_int_equal(hx_conn_call(c, issue_msg, &r), 1);
        assert_null(hx_reply_error(r));
        tok = strdup(hx_reply_str(r, "token"));
        json_decref(r);

        /* forward past the token's expiry and the session's reauth interval */
        assert_int_equal(hx_write_file(clock, "3600\n", 0644), 0);
        char q[4096];
        snprintf(q, sizeof q, "{\"method\":\"io.agentbroker.Introspect\",\"parameters\":{\"token\":\"%s\"}}", tok);
        assert_int_equal(hx_conn_call(c, q, &r), 1);
        assert_false(json_is_true(json_object_get(hx_reply_params(r), "active")));
        printf("    clock +1h: old token %s\n", hx_reply_str(r, "reason"));
        json_decref(r);
        assert_int_equal(hx_conn_call(c, issue_msg, &r), 1);
        printf("    clock +1h: IssueToken -> %s\n", hx_reply_error(r) ? hx_reply_error(r) : "token");
        assert_non_null(hx_reply_error(r)); /* reauth or session expired: never a silent pass */
        json_decref(r);

        /* backwards by a day: the session's times lie in the future; nothing crashes, no token is
         * accepted as valid before its nbf */
        assert_int_equal(hx_write_file(clock, "-86400\n", 0644), 0);
        assert_int_equal(hx_conn_call(c, q, &r), 1);
        assert_false(json_is_true(json_object_get(hx_reply_params(r), "active")));
        printf("    clock -1d: old token %s\n", hx_reply_str(r, "reason"));
        json_decref(r);
        assert_int_equal(hx_conn_call(c, "{\"method\":\"io.agentbroker.Authenticate\"}", &r), 1);
        json_decref(r);
        hx_conn_close(b, c);
        free(tok);

        /* back to now: the session was re-authenticated "a day ago", and that re-authentication
         * (its opening lay ahead of the clock then) started its max_lifetime anew: a day later it
         * has run out, and the process must open a new session before it gets a token */
        assert_int_equal(hx_write_file(clock, "0\n", 0644), 0);
        assert_int_equal(hx_conn_open(b, b->sock, &c), 0);
        assert_int_equal(hx_conn_call(c, issue_msg, &r), 1);
        printf("    clock back to now: IssueToken -> %s\n", hx_reply_error(r) ? hx_reply_error(r) : "token");
        assert_string_equal(hx_reply_error(r), "io.agentbroker.SessionExpired");
        json_decref(r);
        assert_int_equal(hx_conn_call(c, "{\"method\":\"io.agentbroker.Authenticate\"}", &r), 1);
        assert_null(hx_reply_error(r));
        json_decref(r);
        hx_conn_close(b, c);
        assert_serves(b);
}

/* ---- 5. broken state: fail closed with a clear error ----------------------------- */

static void test_broken_state(void **state)
{
        hx_broker *b = *state;
        char path[PATH_MAX + 32];
        int st;
        char *log = NULL;

        assert_int_equal(hx_broker_stop(b, &st), 0);
        /* a key file with the wrong permissions */
        snprintf(path, sizeof path, "%s/signing.key", b->state);
        assert_int_equal(chmod(path, 0644), 0);
        assert_int_not_equal(hx_broker_start(b), 0);
        assert_int_equal(hx_read_file(b->log, 1 << 20, &log, NULL), 0);
        assert_non_null(strstr(log, "signing key"));
        free(log);
        log = NULL;
        assert_int_equal(chmod(path, 0600), 0);

        /* a corrupted LMDB file */
        snprintf(path, sizeof path, "%s/data.mdb", b->state);
        {
                char save[PATH_MAX + 32];
                snprintf(save, sizeof save, "%s.save", path);
                assert_int_equal(rename(path, save), 0);
                assert_int_equal(hx_write_file(path, "this is not an LMDB file, not at all, no............", 0600), 0);
                assert_int_not_equal(hx_broker_start(b), 0);
                assert_int_equal(hx_read_file(b->log, 1 << 20, &log, NULL), 0);
                assert_non_null(strstr(log, "store"));
                free(log);
                log = NULL;
                assert_int_equal(rename(save, path), 0);
        }
        /* a read-only state dir is fine for reading the key but not for LMDB's lock file if absent */
        assert_int_equal(hx_broker_start(b), 0);
        assert_serves(b);
}

int main(void)
{
        const char *s = getenv("TORTURE_SCALE");
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_slowloris, setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_hostile_messages, setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_flood_fairness, setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_clock_jumps, setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_broken_state, setup, hx_teardown),
        };
        if (s && atoi(s) > 0)
                scale = atoi(s);
        printf("torture scale %d\n", scale);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
